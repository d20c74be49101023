"""Lightning indexer: scores and top-k (public function, reference, fused kernel)."""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .._validate import INDEX_DTYPES, check_dim, check_same_device, check_tensor, resolve_backend
from .reference import (
    causal_window,
    indexer_scores_reference,
    indexer_topk_reference,
    packed_causal_window,
    ratio_causal_window,
    topk_reference,
)

__all__ = [
    "indexer_topk",
    "causal_window",
    "ratio_causal_window",
    "packed_causal_window",
    "indexer_scores_reference",
    "indexer_topk_reference",
    "topk_reference",
]


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
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Top-k keys per query row: ``(indices int32 [B, T, topk], scores fp32 [B, T, topk])``.

    q ``[B, T, H, D]``, k ``[B, S, D]``, w ``[B, T, H]``; window ``[starts, end)`` per row
    (``[B, T]`` ints, default: causal). ``topk`` may exceed the number of valid keys: the
    missing slots are ``-1`` with score ``-inf``. No gradient flows through this function.
    The selected *set* follows the tie rule (lower key index wins); the order of the slots is
    unspecified (the reference lists them by descending score, the fused kernel does not), and
    every consumer treats a row as a set.
    """
    check_tensor("q", q, 4)
    check_tensor("k", k, 3)
    check_tensor("w", w, 3)
    B, T, H, D = q.shape
    check_dim("k", k, 0, B, "q's batch")
    check_dim("k", k, 2, D, "q's head dim")
    check_dim("w", w, 0, B, "q's batch")
    check_dim("w", w, 1, T, "q's rows")
    check_dim("w", w, 2, H, "q's heads")
    if not isinstance(topk, int) or topk <= 0:
        raise ValueError(f"topk must be a positive int, got {topk!r}")
    if (starts is None) != (ends is None):
        raise ValueError("starts and ends must be given together")
    if starts is not None:
        check_tensor("starts", starts, 2, INDEX_DTYPES)
        check_tensor("ends", ends, 2, INDEX_DTYPES)
        if tuple(starts.shape) != (B, T) or tuple(ends.shape) != (B, T):
            raise ValueError(f"starts/ends must be [B, T] = {(B, T)}")
    check_same_device(q=q, k=k, w=w, starts=starts, ends=ends)
    impl = resolve_backend(backend, q.device, __name__)
    with torch.no_grad():
        if impl == "triton":
            from .triton_impl import indexer_topk_triton

            return indexer_topk_triton(q, k, w, topk, starts, ends, use_relu, global_ids)
        return indexer_topk_reference(q, k, w, topk, starts, ends, use_relu, global_ids)
