"""Indexer KL loss: the one place that decides which implementation runs, and the public
functions.

Backends: ``auto`` (CUDA tensors: the fused path; CPU tensors: the reference), ``triton``
(the fused path on CUDA tensors or Triton's CPU interpreter; else an error), ``reference``
(plain PyTorch). The fused path is the Triton kernels of ``triton_impl.py`` for the sparse and
the dense warm-up loss on fp32/bf16/fp16, and the row-chunked PyTorch path of ``chunked.py``
for fp64. There is no CUDA-C kernel for the loss: ``cuda`` is an error that says so.
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch

from .._validate import INDEX_DTYPES, check_dim, check_indexer_tensors, check_same_device, check_tensor, check_windows
from ..backends import BACKENDS, KernelChoice, check_backend, triton_reason
from ..indexer.reference import causal_window
from .chunked import indexer_loss_chunked
from .reference import indexer_loss_reference
from .triton_impl import DENSE_CHUNK_BYTES, IndexerLossDenseFused, IndexerLossFromAttention, IndexerLossSparseFused

__all__ = ["select_backend", "indexer_loss", "indexer_loss_from_attention"]

OP = "indexer_loss"


def select_backend(backend: str, device: torch.device, dtype: torch.dtype, sparse: bool,
                   warn: bool = True) -> KernelChoice:
    """Which implementation runs the indexer loss (raises when ``backend`` cannot).
    ``forward``: ``"triton"`` (fused kernels), ``"chunked"`` (row-chunked PyTorch) or
    ``"reference"``; the backward is the same implementation's. (``warn``: kept for the common
    signature; the loss has no fallback to warn about.)"""
    check_backend(OP, backend, BACKENDS)
    if backend == "cuda":
        raise ValueError(f"{OP}: backend='cuda': the indexer loss has no CUDA-C kernel; its fused path is "
                         "Triton (backend='triton' or 'auto')")
    if backend == "reference":
        return KernelChoice(OP, backend, "reference", "reference", "asked for")
    fused = "chunked" if dtype == torch.float64 else "triton"
    variant = "sparse" if sparse else "dense"
    why_fused = f"the {variant} loss on fp32/bf16/fp16" if fused == "triton" else "fp64 inputs"
    if backend == "triton":
        why = triton_reason(device)
        if why is not None:
            raise ValueError(f"{OP}: backend='triton' cannot run: {why}")
        return KernelChoice(OP, backend, fused, fused, f"asked for; {why_fused}")
    if device.type != "cuda":
        return KernelChoice(OP, backend, "reference", "reference", f"{device.type} tensors run the PyTorch reference")
    return KernelChoice(OP, backend, fused, fused, why_fused)


def _check_topk(topk_indices, B, T):
    check_tensor("topk_indices", topk_indices, 3, INDEX_DTYPES)
    if tuple(topk_indices.shape[:2]) != (B, T):
        raise ValueError(f"topk_indices must be [B, T, K] = [{B}, {T}, K], got {tuple(topk_indices.shape)}")


def _windows(starts, ends, B, T, S, device):
    """``(starts, ends, causal)``: the given ``[B, T]`` windows, or the default causal ones."""
    if starts is None:
        starts, ends = causal_window(B, T, S, device=device)
        return starts, ends, True
    return starts, ends, False


def indexer_loss(
    q: torch.Tensor,
    k: torch.Tensor,
    w: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    softmax_scale: float,
    loss_coeff: float,
    topk_indices: Optional[torch.Tensor] = None,
    sparse: bool = False,
    starts: Optional[torch.Tensor] = None,
    ends: Optional[torch.Tensor] = None,
    use_relu: bool = True,
    query_valid_rows: Optional[torch.Tensor] = None,
    calculate_per_token_loss: bool = False,
    tp_group=None,
    backend: str = "auto",
    attn_lse: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Scalar indexer KL loss; differentiable in q, k, w (see ``reference`` for the math).

    ``attn_lse`` ``[B, T, Hq]`` (optional, sparse variant only): the attention's per-head
    natural-log LSE over the same selected keys, as ``sparse_mla`` returns it; the fused kernel
    then skips its own normaliser pass. The reference and the chunked path recompute it.
    """
    B, T, H, D, S = check_indexer_tensors(q, k, w)
    check_tensor("query", query, 4)
    check_tensor("key", key, 3)
    check_dim("query", query, 0, B, "q's batch")
    check_dim("query", query, 1, T, "q's rows")
    check_dim("key", key, 0, B, "q's batch")
    check_dim("key", key, 1, S, "k's rows")
    check_dim("key", key, 2, query.shape[-1], "query's head dim")
    if sparse:
        if topk_indices is None:
            raise ValueError("topk_indices is required for the sparse indexer loss (sparse=True)")
        _check_topk(topk_indices, B, T)
    check_windows(starts, ends, B, T)
    check_same_device(q=q, k=k, w=w, query=query, key=key, topk_indices=topk_indices, starts=starts, ends=ends)
    if attn_lse is not None:
        if not sparse:
            raise ValueError("attn_lse applies to the sparse indexer loss only")
        check_tensor("attn_lse", attn_lse, 3)
        if tuple(attn_lse.shape) != (B, T, query.shape[2]):
            raise ValueError(
                f"attn_lse must be [B, T, Hq] = {(B, T, query.shape[2])}, got {tuple(attn_lse.shape)}"
            )
    choice = select_backend(backend, q.device, q.dtype, sparse)
    if choice.forward == "reference":
        return indexer_loss_reference(q, k, w, query, key, softmax_scale, loss_coeff, topk_indices, sparse, starts,
                                      ends, use_relu, query_valid_rows, calculate_per_token_loss, tp_group)
    starts, ends, causal = _windows(starts, ends, B, T, S, q.device)
    if query_valid_rows is not None:
        query_valid_rows = query_valid_rows.to(torch.bool).expand(B, T)
    if choice.forward == "triton" and not sparse:
        return IndexerLossDenseFused.apply(
            q, k, w, query, key, starts, ends, float(softmax_scale), float(loss_coeff), bool(use_relu),
            query_valid_rows, bool(calculate_per_token_loss), tp_group, causal, DENSE_CHUNK_BYTES,
        )
    if choice.forward == "triton":
        return IndexerLossSparseFused.apply(
            q, k, w, query, key, topk_indices, starts, ends, float(softmax_scale), float(loss_coeff),
            bool(use_relu), query_valid_rows, bool(calculate_per_token_loss), tp_group, attn_lse,
        )
    return indexer_loss_chunked(q, k, w, query, key, softmax_scale, loss_coeff, topk_indices, sparse, starts, ends,
                                causal, use_relu, query_valid_rows, calculate_per_token_loss, tp_group)


def indexer_loss_from_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    w: torch.Tensor,
    topk_indices: torch.Tensor,
    loss_coeff: float,
    starts: Optional[torch.Tensor] = None,
    ends: Optional[torch.Tensor] = None,
    use_relu: bool = True,
    query_valid_rows: Optional[torch.Tensor] = None,
    calculate_per_token_loss: bool = False,
    tp_group=None,
    on_value: Optional[Callable[[torch.Tensor], None]] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Sparse indexer KL loss with its target taken from the attention backward (fused only).

    The target (head-summed, L1-normalised attention probabilities over the selected keys) is
    what the sparse MLA backward forms anyway, so instead of a pass over all attention heads the
    loss receives it through autograd. Returns ``(loss, slot)``:

    * ``slot`` fp32 ``[B*T, K]``: pass it to ``sparse_mla(..., loss_target=slot)`` (rows
      flattened batch-major, the same rows as the attention's). Its "gradient" is the target.
    * ``loss``: a zero placeholder scalar to attach to the graph (e.g. through Megatron's
      ``DSAIndexerLossAutoScaler``); its gradient drives dq/dk/dw exactly as
      ``indexer_loss(..., sparse=True)`` would. The loss *value* exists only once the backward
      has run: it is handed to ``on_value(value)`` (a 0-dim fp32 tensor, same scaling as
      ``indexer_loss``), e.g. to add it to Megatron's loss tracker.

    Same contract as ``indexer_loss(..., sparse=True)`` otherwise. Raises in the backward if no
    target arrived (the attention was not given the slot).
    """
    B, T, H, D, S = check_indexer_tensors(q, k, w)
    if topk_indices is None:
        raise ValueError("topk_indices is required for indexer_loss_from_attention")
    _check_topk(topk_indices, B, T)
    check_windows(starts, ends, B, T)
    check_same_device(q=q, k=k, w=w, topk_indices=topk_indices, starts=starts, ends=ends)
    if q.dtype == torch.float64:
        raise TypeError("indexer_loss_from_attention runs the fused kernels (fp32/bf16/fp16); "
                        "use indexer_loss for fp64")
    why = triton_reason(q.device)
    if why is not None:
        raise ValueError(f"indexer_loss_from_attention needs the fused Triton kernels: {why}")
    starts, ends, _ = _windows(starts, ends, B, T, S, q.device)
    if query_valid_rows is not None:
        query_valid_rows = query_valid_rows.to(torch.bool).expand(B, T)
    return IndexerLossFromAttention.apply(
        q, k, w, topk_indices, starts, ends, float(loss_coeff), bool(use_relu), query_valid_rows,
        bool(calculate_per_token_loss), tp_group, on_value,
    )
