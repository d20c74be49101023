"""Lightning indexer: the one place that decides which implementation runs, and the public
function.

Backends: ``auto`` (the Triton score kernel and the CUDA select on sm_90 GPUs; the Triton
score + select on other GPUs or when the CUDA library cannot be built; the reference for CPU
tensors; topk above the CUDA select's 6144 takes the Triton select), ``triton`` (CUDA tensors or
Triton's CPU interpreter; else an error), ``cuda`` (the Triton score kernel and the CUDA select,
``cuda_impl``: sm_90 GPUs with the library built; else an error), ``reference`` (plain PyTorch).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .._validate import check_indexer_tensors, check_same_device, check_windows
from ..backends import BACKENDS, KernelChoice, check_backend, cuda_capability, triton_reason, warn_once
from .cuda_impl import MAX_TOPK, cuda_select_reason
from .fp8 import fp8_kernel_inputs, fp8_selection_inputs
from .reference import indexer_topk_reference
from .triton_impl import indexer_topk_triton

__all__ = ["select_backend", "indexer_topk"]

OP = "indexer_topk"


def select_backend(backend: str, device: torch.device, dtype: torch.dtype, head_dim: int,
                   warn: bool = True) -> KernelChoice:
    """Which implementation runs the indexer's score + top-k (raises when ``backend`` cannot)."""
    check_backend(OP, backend, BACKENDS)
    if backend == "reference":
        return KernelChoice(OP, backend, "reference", None, "asked for")
    pow2 = head_dim >= 16 and head_dim & (head_dim - 1) == 0
    if backend in ("cuda", "triton"):  # cuda: the Triton score kernel with the CUDA select
        why = (cuda_select_reason if backend == "cuda" else triton_reason)(device)
        if why is None and not pow2:
            why = f"the Triton score kernel needs a power-of-two head dim >= 16, got {head_dim}"
        if why is not None:
            raise ValueError(f"{OP}: backend='{backend}' cannot run: {why}")
        return KernelChoice(OP, backend, backend, None, "asked for" if backend == "triton" else
                            "asked for: Triton score + CUDA select")
    if device.type != "cuda":
        return KernelChoice(OP, backend, "reference", None, f"{device.type} tensors run the PyTorch reference")
    if not pow2:
        why = f"head dim {head_dim} is not a power of two >= 16"
        if warn:
            warn_once(OP, f"running the PyTorch reference: {why}")
        return KernelChoice(OP, backend, "reference", None, why)
    why_cuda = cuda_select_reason(device)
    if why_cuda is None:
        return KernelChoice(OP, backend, "cuda", None,
                            f"Triton score + CUDA select (the Triton select above topk {MAX_TOPK})")
    if warn and device.type == "cuda" and cuda_capability(device) == (9, 0):
        warn_once(OP, f"selecting with the Triton select instead of the CUDA one: {why_cuda}")
    return KernelChoice(OP, backend, "triton", None, f"fused Triton score + top-k ({why_cuda})")


def indexer_topk(
    q: torch.Tensor,
    k: torch.Tensor,
    w: torch.Tensor,
    topk: int,
    starts: Optional[torch.Tensor] = None,
    ends: Optional[torch.Tensor] = None,
    use_relu: bool = True,
    global_ids: bool = False,
    backend: str = "auto",
    precision: str = "bf16",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Top-k keys per query row: ``(indices int32 [B, T, topk], scores fp32 [B, T, topk])``.

    q ``[B, T, H, D]``, k ``[B, S, D]``, w ``[B, T, H]``; window ``[starts, end)`` per row
    (``[B, T]`` ints, default: causal). ``topk`` may exceed the number of valid keys: the
    missing slots are ``-1`` with score ``-inf``. No gradient flows through this function.
    The selected *set* follows the tie rule (lower key index wins); the order of the slots is
    unspecified (the reference lists them by descending score, the fused kernel does not), and
    every consumer treats a row as a set. ``precision="fp8"`` selects with e4m3 numerics
    (``fp8.py``): the fused kernel reads e4m3 queries and keys, the reference scores the same
    values in fp32.
    """
    B, T, H, D, _ = check_indexer_tensors(q, k, w)
    if precision not in ("bf16", "fp8"):
        raise ValueError(f"precision must be 'bf16' or 'fp8', got {precision!r}")
    if isinstance(topk, bool) or not isinstance(topk, int) or topk <= 0:
        raise ValueError(f"topk must be a positive int, got {topk!r}")
    check_windows(starts, ends, B, T)
    check_same_device(q=q, k=k, w=w, starts=starts, ends=ends)
    choice = select_backend(backend, q.device, q.dtype, D)
    select_kernel = choice.forward
    if select_kernel == "cuda" and topk > MAX_TOPK:
        if backend == "cuda":
            raise ValueError(f"{OP}: backend='cuda' selects at most {MAX_TOPK} keys per row, got topk={topk}")
        select_kernel = "triton"
    fused = select_kernel in ("triton", "cuda")
    with torch.no_grad():
        k_scale = None
        if precision == "fp8" and fused:
            q, k, w, k_scale = fp8_kernel_inputs(q, k, w)
        elif precision == "fp8":
            q, k, w = fp8_selection_inputs(q, k, w)
        if fused:
            return indexer_topk_triton(q, k, w, topk, starts, ends, use_relu, global_ids, k_scale=k_scale,
                                       select_kernel=select_kernel)
        return indexer_topk_reference(q, k, w, topk, starts, ends, use_relu, global_ids)
