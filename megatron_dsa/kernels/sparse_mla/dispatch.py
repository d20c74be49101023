"""Sparse MLA: the one place that decides which implementation runs, and the public function.

Backends (``backend=``):

=============  ==========================================  =====================================
backend        forward                                     backward
=============  ==========================================  =====================================
``auto``       CUDA tensors: the sm_90a CUDA kernels when  CUDA kernel when the forward is CUDA
               they take the inputs (bf16, d_qk = 576,     (deterministic: its persistent
               d_v = 512, Hopper, library built), else     per-SM-lane mode); else Triton
               Triton; CPU tensors: the reference          (deterministic: sort-and-reduce);
                                                           reference
``cuda``       the CUDA kernels, or an error saying why    CUDA (deterministic when asked)
``triton``     Triton (CUDA tensors, or Triton's CPU       Triton (deterministic when asked)
               interpreter), or an error
``reference``  plain PyTorch (autograd through it)         autograd
=============  ==========================================  =====================================

``deterministic=None`` follows ``torch.are_deterministic_algorithms_enabled()`` (what
Megatron's ``--deterministic-mode`` sets). Row packing (``packing.py``: several query rows per
64-row tile over the union of their keys) follows ``row_packing``:

* ``None`` (auto, the default): where it was measured faster: the CUDA backward at <= 32 heads
  (``cuda-packed``, deterministic or not; H200, S = 16K, 16 heads: 21.2 vs 29.8 ms on
  independent random ids) and the CUDA forward at <= 32 heads up to
  ``cuda_impl.fwd_pack_max_keys(heads)`` keys (16K at <= 16 heads, 32K at <= 32; H100, 16K, 16
  heads: 4.98 vs 5.97 ms, packing included).
* ``True``: also the CUDA forward at <= 32 heads beyond that, and the Triton backward
  (``triton-packed``).
* ``False``: never.

Elsewhere it changes nothing and the choice's reason says so. ``auto`` warns once per reason when CUDA tensors of
the CUDA kernels' shapes still run Triton (no Hopper GPU, no nvcc, a failed build).
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

import torch

from .._validate import INDEX_DTYPES, check_dim, check_positive_scale, check_same_device, check_tensor
from ..backends import BACKENDS, KernelChoice, check_backend, triton_reason, warn_once
from . import cuda_impl
from .ops import sparse_mla_op
from .cuda_impl import fwd_pack_max_keys
from .packing import MAX_PACK_HEADS, MAX_PACK_SLOTS
from .reference import sparse_mla_reference
from .triton_impl import ALL_HEADS_MAX

__all__ = ["select_backend", "loss_target_reason", "sparse_mla"]

OP = "sparse_mla"


def select_backend(backend: str, device: torch.device, dtype: torch.dtype, heads: int, d_qk: int, d_v: int,
                   deterministic: Optional[bool] = False, num_keys: Optional[int] = None,
                   warn: bool = True, row_packing: Optional[bool] = None) -> KernelChoice:
    """Which implementation runs sparse MLA for these inputs (raises when ``backend`` cannot).
    ``deterministic=None`` follows ``torch.are_deterministic_algorithms_enabled()``;
    ``row_packing``: module docstring."""
    choice = _select(backend, device, dtype, heads, d_qk, d_v, deterministic, num_keys, warn)
    return _with_block_keys(_with_packing(choice, backend, heads, row_packing, num_keys), device, num_keys)


def _with_packing(choice: KernelChoice, backend: str, heads: int, row_packing: Optional[bool],
                  num_keys: Optional[int] = None) -> KernelChoice:
    """``choice`` with row packing where ``row_packing`` (module docstring) applies it."""
    if row_packing is False:
        return choice
    if row_packing is None:  # auto: the CUDA backward at <= 32 heads, the forward up to fwd_pack_max_keys
        if choice.backward in _CUDA_BWD and heads <= MAX_PACK_HEADS:
            max_keys = fwd_pack_max_keys(heads)
            fwd_packs = choice.forward == "cuda" and num_keys is not None and num_keys <= max_keys
            if fwd_packs:
                what = f"the forward and backward at <= {MAX_PACK_HEADS} heads, the forward at <= {max_keys} keys"
            elif choice.forward == "cuda" and num_keys is None:  # (a report without a call's keys)
                what = (f"the backward at <= {MAX_PACK_HEADS} heads, the forward too where a call has "
                        f"<= {max_keys} keys")
            else:
                what = f"the backward at <= {MAX_PACK_HEADS} heads"
            return KernelChoice(OP, backend, "cuda-packed" if fwd_packs else choice.forward,
                                choice.backward.replace("cuda", "cuda-packed"),
                                f"{choice.reason}; row packing (auto: {what}; {_PACKER['cuda']})")
        return choice
    if choice.backward in (*_CUDA_BWD, "triton") and heads <= MAX_PACK_HEADS:
        fwd = "cuda-packed" if choice.forward == "cuda" else choice.forward
        kernel = choice.backward.split("-")[0]
        return KernelChoice(OP, backend, fwd, choice.backward.replace(kernel, f"{kernel}-packed"),
                            f"{choice.reason}; row packing ({_PACKER[kernel]})")
    where = (f"{heads} heads (it takes <= {MAX_PACK_HEADS})"
             if choice.backward in (*_CUDA_BWD, "triton")
             else f"the {choice.backward} backward")
    return KernelChoice(OP, backend, choice.forward, choice.backward, f"{choice.reason}; no row packing on {where}")


def _with_block_keys(choice: KernelChoice, device, num_keys) -> KernelChoice:
    """The reason names the 64-key kernel where the default-mode CUDA backward (unpacked or
    row-packed) runs it (``cuda_impl.bwd_block_keys``) and its L2 hints where they are on
    (``cuda_impl.l2_hints``), and its deterministic stages' 64-key blocks."""
    if (choice.backward in ("cuda-deterministic", "cuda-packed-deterministic")
            and cuda_impl.det_block_keys(num_keys) == 64):
        return dataclasses.replace(choice, reason=f"{choice.reason}; the backward in 64-key blocks")
    if choice.backward not in ("cuda", "cuda-packed") or cuda_impl.bwd_block_keys(False) != 64:
        return choice
    why = f"{choice.reason}; the backward in 64-key blocks"
    if num_keys is not None and cuda_impl.l2_hints(device, num_keys):
        why += " with L2 cache hints (dkv adds evict_last, kv gathers evict_first: kv and the workspace exceed the L2)"
    return dataclasses.replace(choice, reason=why)


# the unpacked CUDA backwards, which row packing applies to
_CUDA_BWD = ("cuda", "cuda-deterministic")

# which kernel packs the rows for each packed backward
_PACKER = {"cuda": "packed by cuda/pack_rows.cu, or by the Triton kernel where a group's bitmaps exceed "
                   "shared memory (about 270K keys at 16 heads)",
           "triton": "packed by the Triton kernel"}


def _select(backend, device, dtype, heads, d_qk, d_v, deterministic, num_keys, warn) -> KernelChoice:
    check_backend(OP, backend, BACKENDS)
    det = torch.are_deterministic_algorithms_enabled() if deterministic is None else bool(deterministic)
    tri_bwd = "triton-deterministic" if det else "triton"
    if backend == "reference":
        return KernelChoice(OP, backend, "reference", "reference", "asked for")
    if backend == "triton":
        why = triton_reason(device)
        if why is not None:
            raise ValueError(f"{OP}: backend='triton' cannot run: {why}")
        return KernelChoice(OP, backend, "triton", tri_bwd, "asked for")
    if backend == "cuda":
        why = cuda_impl.unsupported_reason(device, dtype, d_qk, d_v, num_keys)
        if why is not None:
            raise RuntimeError(f"{OP}: backend='cuda' cannot run: {why}")
        return KernelChoice(OP, backend, "cuda", "cuda-deterministic" if det else "cuda", "asked for")
    # auto
    if device.type != "cuda":
        return KernelChoice(OP, backend, "reference", "reference", f"{device.type} tensors run the PyTorch reference")
    why_cuda = cuda_impl.unsupported_reason(device, dtype, d_qk, d_v, num_keys)
    if why_cuda is None:
        if det:
            how = ("a bound pass, then integer dkv adds in per-key power-of-two quanta"
                   if cuda_impl.det_block_keys(num_keys) == 64 else "one dkv lane per SM")
            return KernelChoice(OP, backend, "cuda", "cuda-deterministic",
                                f"sm_90a CUDA kernels ({heads} heads; the deterministic backward: {how})")
        l2 = ""
        if num_keys is not None and cuda_impl.l2_order(device, num_keys):
            l2 = ("; the backward walks its rows in L2 order (ids ascending, short launches: the dkv "
                  "workspace exceeds the L2)")
            if cuda_impl.l2_order(device, num_keys, cuda_impl.FWD_KEY_BYTES):
                l2 += ", the forward its ids ascending (kv exceeds the L2)"
        return KernelChoice(OP, backend, "cuda", "cuda", f"sm_90a CUDA kernels ({heads} heads){l2}")
    kernel_shapes = dtype == torch.bfloat16 and d_qk == 576 and d_v == 512
    if warn and kernel_shapes:
        warn_once(OP, f"running Triton instead of the CUDA kernels: {why_cuda}")
    return KernelChoice(OP, backend, "triton", tri_bwd, why_cuda)


def loss_target_reason(choice: KernelChoice, heads: int) -> Optional[str]:
    """Why this backward cannot hand the indexer loss its target (``None`` when it can): the
    CUDA backward always can; the Triton one on its all-heads pass only."""
    if choice.backward.startswith("cuda") or choice.backward == "triton-packed":
        return None
    if choice.backward == "triton" and heads <= ALL_HEADS_MAX:
        return None
    if choice.backward == "reference":
        return "the reference backward does not emit it (pass attn_lse to indexer_loss instead)"
    return (f"the Triton backward emits it only on its all-heads pass (<= {ALL_HEADS_MAX} heads, "
            f"not deterministic); here {heads} heads, backward {choice.backward}")


def _unit_channels(t: torch.Tensor) -> torch.Tensor:
    """``t`` with unit channel stride and no broadcast (stride-0) dims: what the kernels read."""
    return t if t.stride(-1) == 1 and 0 not in t.stride() else t.contiguous()


def _kernel_indices(indices: torch.Tensor, num_keys: int) -> torch.Tensor:
    """int32 ids with unit column stride; int64 ids outside ``[0, num_keys)`` become -1 (empty)
    before the cast, so no id can wrap onto a valid key."""
    if indices.dtype == torch.int64:
        indices = torch.where((indices >= 0) & (indices < num_keys), indices, -1).to(torch.int32)
    return indices if indices.stride(-1) == 1 else indices.contiguous()


def sparse_mla(
    q: torch.Tensor,
    kv: torch.Tensor,
    indices: torch.Tensor,
    softmax_scale: float,
    d_v: int = 512,
    topk_length: Optional[torch.Tensor] = None,
    sink: Optional[torch.Tensor] = None,
    backend: str = "auto",
    loss_target: Optional[torch.Tensor] = None,
    deterministic: Optional[bool] = None,
    row_packing: Optional[bool] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Differentiable sparse attention: ``(out [T, H, d_v], lse fp32 [T, H])``.

    ``softmax_scale``: a finite number > 0.
    q ``[T, H, Dqk]``, kv ``[Tk, Dqk]`` (V = first ``d_v`` channels), indices ``[T, K]`` int32 or
    int64 (``-1`` and any id outside ``[0, Tk)`` = empty slot), topk_length ``[T]`` optional,
    sink ``[H]`` optional. Any strides. ``backend``: see the module docstring.
    ``deterministic``: a bit-reproducible backward (``None``: ``torch``'s deterministic flag).
    ``loss_target`` (fused backward only): the slot tensor returned by
    :func:`megatron_dsa.kernels.indexer_loss.indexer_loss_from_attention`; the backward hands it
    the head-summed attention probabilities per slot as its gradient.
    ``row_packing``: ``None`` (auto: the CUDA backward at <= 32 heads packs query rows), ``True``
    or ``False`` (module docstring).
    """
    check_tensor("q", q, 3)
    check_tensor("kv", kv, 2)
    check_tensor("indices", indices, 2, INDEX_DTYPES)
    T, H, Dqk = q.shape
    check_dim("kv", kv, 1, Dqk, "q's head dim")
    check_dim("indices", indices, 0, T, "q's rows")
    softmax_scale = check_positive_scale("softmax_scale", softmax_scale)
    if isinstance(d_v, bool) or not isinstance(d_v, int) or not 0 < d_v <= Dqk:
        raise ValueError(f"d_v must be an int in (0, {Dqk}], got {d_v!r}")
    if topk_length is not None:
        check_tensor("topk_length", topk_length, 1, INDEX_DTYPES)
        check_dim("topk_length", topk_length, 0, T, "q's rows")
    if sink is not None:
        check_tensor("sink", sink, 1)
        check_dim("sink", sink, 0, H, "q's heads")
    if kv.dtype != q.dtype:
        raise TypeError(f"kv dtype {kv.dtype} must match q dtype {q.dtype}")
    if row_packing is not None and not isinstance(row_packing, bool):
        raise TypeError(f"row_packing must be None (auto), True or False, got {row_packing!r}")
    check_same_device(q=q, kv=kv, indices=indices, topk_length=topk_length, sink=sink)
    choice = select_backend(backend, q.device, q.dtype, H, Dqk, d_v, deterministic, kv.shape[0],
                            row_packing=row_packing)
    if choice.backward.endswith("-packed") and indices.shape[1] > MAX_PACK_SLOTS:
        choice = dataclasses.replace(
            choice, forward=choice.forward.replace("-packed", ""), backward=choice.backward.replace("-packed", ""),
            reason=f"{choice.reason} off: row packing takes <= {MAX_PACK_SLOTS} slots per row, got {indices.shape[1]}")
    if loss_target is not None:
        if tuple(loss_target.shape) != tuple(indices.shape) or loss_target.dtype != torch.float32:
            raise ValueError(f"loss_target must be fp32 {tuple(indices.shape)} (the indices' shape), got "
                             f"{loss_target.dtype} {tuple(loss_target.shape)}")
        why = loss_target_reason(choice, H)
        if why is not None:
            raise ValueError(f"loss_target cannot be served: {why}")
    if choice.forward == "reference":
        return sparse_mla_reference(q, kv, indices, softmax_scale, d_v, topk_length, sink)
    return sparse_mla_op(
        _unit_channels(q), _unit_channels(kv), _kernel_indices(indices, kv.shape[0]), float(softmax_scale),
        int(d_v), topk_length.contiguous() if topk_length is not None else None,
        sink.contiguous() if sink is not None else None, choice.forward, choice.backward, loss_target,
    )
