"""Indexer KL loss (dense warm-up and sparse), forward and backward."""

from __future__ import annotations

from typing import Optional

import torch

from .._validate import check_dim, check_same_device, check_tensor, resolve_backend
from .reference import indexer_loss_reference

__all__ = ["indexer_loss", "indexer_loss_reference"]


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
    check_tensor("q", q, 4)
    check_tensor("k", k, 3)
    check_tensor("w", w, 3)
    check_tensor("query", query, 4)
    check_tensor("key", key, 3)
    B, T, H, D = q.shape
    S = k.shape[1]
    check_dim("k", k, 2, D, "q's head dim")
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
