"""Indexer KL loss (dense warm-up and sparse), forward and backward."""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch

from .._validate import check_dim, check_same_device, check_tensor, resolve_backend
from .reference import indexer_loss_reference

__all__ = ["indexer_loss", "indexer_loss_from_attention", "indexer_loss_reference"]


def _check_indexer_tensors(q, k, w):
    """q [B, T, H, D], k [B, S, D], w [B, T, H]: returns (B, T, H, D, S)."""
    check_tensor("q", q, 4)
    check_tensor("k", k, 3)
    check_tensor("w", w, 3)
    B, T, H, D = q.shape
    check_dim("k", k, 2, D, "q's head dim")
    return B, T, H, D, k.shape[1]


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
    then skips its own normaliser pass. The reference recomputes it and ignores the argument.
    """
    B, T, H, D, S = _check_indexer_tensors(q, k, w)
    check_tensor("query", query, 4)
    check_tensor("key", key, 3)
    check_dim("query", query, 1, T, "q's rows")
    check_dim("key", key, 1, S, "k's rows")
    check_dim("key", key, 2, query.shape[-1], "query's head dim")
    check_same_device(q=q, k=k, w=w, query=query, key=key)
    if attn_lse is not None:
        if not sparse:
            raise ValueError("attn_lse applies to the sparse indexer loss only")
        check_tensor("attn_lse", attn_lse, 3)
        if tuple(attn_lse.shape) != (B, T, query.shape[2]):
            raise ValueError(
                f"attn_lse must be [B, T, Hq] = {(B, T, query.shape[2])}, got {tuple(attn_lse.shape)}"
            )
    impl = resolve_backend(backend, q.device, __name__)
    args = (q, k, w, query, key, softmax_scale, loss_coeff, topk_indices, sparse, starts, ends,
            use_relu, query_valid_rows, calculate_per_token_loss, tp_group)
    if impl == "triton":
        from .triton_impl import indexer_loss_triton

        return indexer_loss_triton(*args, attn_lse=attn_lse)
    return indexer_loss_reference(*args)


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
    B, T, H, D, S = _check_indexer_tensors(q, k, w)
    check_dim("w", w, 2, H, "q's heads")
    if topk_indices is None:
        raise ValueError("indexer_loss_from_attention needs topk_indices")
    if topk_indices.shape[:2] != (B, T) or topk_indices.ndim != 3:
        raise ValueError(f"topk_indices must be [B, T, K] = [{B}, {T}, K], got {tuple(topk_indices.shape)}")
    check_same_device(q=q, k=k, w=w, topk_indices=topk_indices)
    if q.dtype == torch.float64:
        raise TypeError("indexer_loss_from_attention runs the fused kernels (fp32/bf16/fp16); "
                        "use indexer_loss for fp64")
    from .sparse_triton import IndexerLossFromAttention
    from .triton_impl import causal_window

    if starts is None or ends is None:
        starts, ends = causal_window(B, T, S, device=q.device)
    if query_valid_rows is not None:
        query_valid_rows = query_valid_rows.to(torch.bool).expand(B, T)
    return IndexerLossFromAttention.apply(
        q, k, w, topk_indices, starts, ends, float(loss_coeff), bool(use_relu), query_valid_rows,
        bool(calculate_per_token_loss), tp_group, on_value,
    )
