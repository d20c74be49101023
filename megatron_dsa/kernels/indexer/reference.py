"""Plain-PyTorch reference for the lightning indexer: scores, windows and top-k.

This is the single source of truth that the fused kernels are tested against.

Shapes (one sequence per batch entry, batch-first):
  q        [B, T, H, D]   indexer queries
  k        [B, S, D]      indexer keys (one head, shared by all query heads)
  w        [B, T, H]      per-head weights
  starts   [B, T] int     first valid key of each query row (inclusive)
  ends     [B, T] int     one past the last valid key of each query row

  I[b, t, s] = sum_h w[b, t, h] * ReLU(q[b, t, h] . k[b, s])   for starts[b,t] <= s < ends[b,t]
             = -inf                                             elsewhere

Memory: scores are produced for a block of query rows at a time and the head sum is
accumulated head by head, so the fp32 ``[T, H, S]`` slab is never built.

Tie-breaking rule (shared with every fused kernel): among equal scores the lower key index
wins; the selected set is then listed in descending score order. Rows with fewer than ``k``
valid keys are padded with ``-1`` (score ``-inf``).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

__all__ = [
    "causal_window",
    "ratio_causal_window",
    "packed_causal_window",
    "window_mask",
    "indexer_scores_reference",
    "topk_reference",
    "indexer_topk_reference",
]


def causal_window(
    batch: int, sq: int, sk: Optional[int] = None, device=None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Top-left aligned causal window (Megatron-Core's default mask): row t sees keys [0, t+1).

    Keys beyond ``sk`` are clipped, so ``sk < sq`` is allowed.
    """
    sk = sq if sk is None else sk
    t = torch.arange(sq, device=device, dtype=torch.int32)
    ends = torch.clamp(t + 1, max=sk)
    starts = torch.zeros_like(ends)
    return starts.expand(batch, sq).contiguous(), ends.expand(batch, sq).contiguous()


def ratio_causal_window(
    batch: int, sq: int, sk: int, ratio: int = 1, device=None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Bottom-right ratio-causal window of cuDNN's DSA indexer (compressed keys).

    Query t sees key j iff ``j < (sk * ratio - sq + t + 1) // ratio``.
    """
    if ratio < 1:
        raise ValueError(f"ratio must be >= 1, got {ratio}")
    t = torch.arange(sq, device=device, dtype=torch.int64)
    ends = torch.div(sk * ratio - sq + t + 1, ratio, rounding_mode="floor").clamp(0, sk)
    ends = ends.to(torch.int32)
    starts = torch.zeros_like(ends)
    return starts.expand(batch, sq).contiguous(), ends.expand(batch, sq).contiguous()


def packed_causal_window(
    cu_seqlens: torch.Tensor, total: Optional[int] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Causal ``[start, end)`` per row of a packed (THD) batch, as ``[1, total]`` tensors.

    Pass ``total`` (the packed row count, known from the tensor shapes) to avoid reading
    ``cu_seqlens[-1]`` back to the host; rows past ``cu_seqlens[-1]`` (padding) get an
    empty window.
    """
    if cu_seqlens.ndim != 1 or cu_seqlens.numel() < 2:
        raise ValueError("cu_seqlens must be a 1-D tensor with at least 2 entries")
    cu = cu_seqlens.to(torch.int64)
    if total is None:
        total = int(cu[-1])  # host read; callers on a hot path pass total
    rows = torch.arange(total, device=cu.device, dtype=torch.int64)
    seq = torch.searchsorted(cu, rows, right=True) - 1
    seq = seq.clamp(max=cu.numel() - 2)
    padding = rows >= cu[-1]
    starts = torch.where(padding, rows, cu[seq]).to(torch.int32)
    ends = torch.where(padding, rows, rows + 1).to(torch.int32)
    return starts.unsqueeze(0), ends.unsqueeze(0)


def window_mask(starts: torch.Tensor, ends: torch.Tensor, sk: int) -> torch.Tensor:
    """Boolean ``[B, T, sk]`` validity mask of a window."""
    s = torch.arange(sk, device=starts.device)
    return (s >= starts.unsqueeze(-1).to(s.dtype)) & (s < ends.unsqueeze(-1).to(s.dtype))


def indexer_scores_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    w: torch.Tensor,
    starts: Optional[torch.Tensor] = None,
    ends: Optional[torch.Tensor] = None,
    use_relu: bool = True,
    row_block: int = 1024,
) -> torch.Tensor:
    """Masked index scores ``[B, T, S]`` in fp32 (fp64 for fp64 inputs), ``-inf`` outside."""
    B, T, H, D = q.shape
    S = k.shape[1]
    if starts is None or ends is None:
        starts, ends = causal_window(B, T, S, device=q.device)
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = torch.empty(B, T, S, dtype=cdt, device=q.device)
    kf = k.to(cdt)
    for t0 in range(0, T, row_block):
        t1 = min(T, t0 + row_block)
        acc = torch.zeros(B, t1 - t0, S, dtype=cdt, device=q.device)
        for h in range(H):
            s = torch.bmm(q[:, t0:t1, h].to(cdt), kf.transpose(1, 2))
            if use_relu:
                s = torch.relu(s)
            acc += s * w[:, t0:t1, h].to(cdt).unsqueeze(-1)
        valid = window_mask(starts[:, t0:t1], ends[:, t0:t1], S)
        out[:, t0:t1] = acc.masked_fill(~valid, float("-inf"))
    return out


def topk_reference(scores: torch.Tensor, topk: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Top-k over the last dim with the project's tie rule and ``-1`` padding.

    Returns ``(indices int32 [..., topk], values fp32 [..., topk])``. ``topk`` may exceed the
    number of columns; missing slots are ``-1`` / ``-inf``.
    """
    if topk <= 0:
        raise ValueError(f"topk must be positive, got {topk}")
    n = scores.shape[-1]
    kk = min(topk, n)
    # Stable descending sort: equal scores keep ascending key order (lower index wins).
    vals, idx = torch.sort(scores, dim=-1, descending=True, stable=True)
    vals, idx = vals[..., :kk], idx[..., :kk]
    idx = torch.where(torch.isneginf(vals), torch.full_like(idx, -1), idx).to(torch.int32)
    if kk < topk:
        pad = topk - kk
        idx = torch.cat([idx, idx.new_full(idx.shape[:-1] + (pad,), -1)], dim=-1)
        vals = torch.cat([vals, vals.new_full(vals.shape[:-1] + (pad,), float("-inf"))], dim=-1)
    return idx, vals


def indexer_topk_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    w: torch.Tensor,
    topk: int,
    starts: Optional[torch.Tensor] = None,
    ends: Optional[torch.Tensor] = None,
    use_relu: bool = True,
    global_ids: bool = False,
    row_block: int = 256,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Top-k key ids ``int32 [B, T, topk]`` and their scores, computed a row block at a time.

    With ``global_ids`` the ids are ``b * S + j`` (``-1`` padding stays ``-1``).
    """
    B, T, H, D = q.shape
    S = k.shape[1]
    if starts is None or ends is None:
        starts, ends = causal_window(B, T, S, device=q.device)
    idx = torch.empty(B, T, topk, dtype=torch.int32, device=q.device)
    vals = torch.empty(B, T, topk, dtype=torch.float64 if q.dtype == torch.float64 else torch.float32, device=q.device)
    for t0 in range(0, T, row_block):
        t1 = min(T, t0 + row_block)
        sc = indexer_scores_reference(
            q[:, t0:t1], k, w[:, t0:t1], starts[:, t0:t1], ends[:, t0:t1], use_relu=use_relu
        )
        idx[:, t0:t1], vals[:, t0:t1] = topk_reference(sc, topk)
    if global_ids:
        off = (torch.arange(B, device=q.device, dtype=torch.int32) * S).view(B, 1, 1)
        idx = torch.where(idx >= 0, idx + off, idx)
    return idx, vals
