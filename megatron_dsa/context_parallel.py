"""Context-parallel layout of a DSA layer's rows.

Megatron splits a causal sequence for CP into ``2 * cp_size`` equal chunks and gives rank ``r``
chunks ``r`` and ``2 * cp_size - 1 - r`` (``get_batch_on_this_cp_rank``), so every rank holds
early and late rows and the causal work is balanced. A packed (THD) batch is split the same way
*per document* (``_get_batch_on_this_cp_rank_per_document_balancing``: every document's padded
length is a multiple of ``2 * cp_size``; ``cu_seqlens`` stay global). Under CP a DSA layer scores
its own query rows against *all* keys (all-gathered and put back in global order), with causal
and document windows taken from the rows' global positions; the top-k ids are global key ids:

* :func:`cp_positions` / :func:`cp_packed_positions` — the global positions of one rank's rows,
  in its local row order (computed on the device, no host read);
* :func:`cp_causal_window` / :func:`cp_packed_causal_window` — their ``[start, end)`` windows;
* :func:`cp_layout` — a rank's positions and the order that puts the all-gathered rows back;
* :func:`cp_gather` — the whole sequence from every rank's rows (differentiable);
* :func:`cp_work` — each rank's indexer and sparse-attention work, to check the balance.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch

__all__ = ["cp_positions", "cp_causal_window", "cp_packed_positions", "cp_packed_causal_window",
           "cp_packed_check", "cp_layout", "cp_work", "cp_gather"]


def _check(seq_len: int, cp_size: int, cp_rank: int) -> None:
    for name, v in (("seq_len", seq_len), ("cp_size", cp_size), ("cp_rank", cp_rank)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{name} must be an int, got {v!r}")
    if cp_size < 1:
        raise ValueError(f"cp_size must be >= 1, got {cp_size}")
    if not 0 <= cp_rank < cp_size:
        raise ValueError(f"cp_rank must be in [0, {cp_size}), got {cp_rank}")
    if seq_len % (2 * cp_size) and cp_size > 1:
        raise ValueError(f"seq_len ({seq_len}) must be divisible by 2 * cp_size ({2 * cp_size}) for the "
                         "load-balanced causal CP layout")


def cp_positions(seq_len: int, cp_size: int, cp_rank: int, device=None) -> torch.Tensor:
    """Global positions (int64 ``[seq_len // cp_size]``) of CP rank ``cp_rank``'s rows: chunks
    ``cp_rank`` and ``2 * cp_size - 1 - cp_rank`` of ``2 * cp_size``, in that order."""
    _check(seq_len, cp_size, cp_rank)
    if cp_size == 1:
        return torch.arange(seq_len, device=device)
    c = seq_len // (2 * cp_size)
    first = torch.arange(cp_rank * c, (cp_rank + 1) * c, device=device)
    second = torch.arange((2 * cp_size - 1 - cp_rank) * c, (2 * cp_size - cp_rank) * c, device=device)
    return torch.cat([first, second])


def cp_causal_window(positions: torch.Tensor, batch: int = 1) -> Tuple[torch.Tensor, torch.Tensor]:
    """Causal ``[start, end)`` windows (int32 ``[batch, rows]``) over the whole sequence's keys
    for rows at global ``positions``: row ``i`` sees keys ``[0, positions[i] + 1)``."""
    ends = (positions.to(torch.int64) + 1).to(torch.int32)
    starts = torch.zeros_like(ends)
    return starts.expand(batch, -1).contiguous(), ends.expand(batch, -1).contiguous()


def cp_packed_positions(cu_seqlens: torch.Tensor, cp_size: int, cp_rank: int, rows: int) -> torch.Tensor:
    """Global positions (int64 ``[rows]``) of CP rank ``cp_rank``'s ``rows`` packed rows.

    ``cu_seqlens`` are the global (padded) document boundaries; every document's length is a
    multiple of ``2 * cp_size`` and the rank holds, per document in order, that document's chunks
    ``cp_rank`` and ``2 * cp_size - 1 - cp_rank`` of ``2 * cp_size`` (Transformer Engine's
    ``thd_get_partitioned_indices``). Local rows past ``cu_seqlens[-1] / cp_size`` (trailing
    padding) map to the positions past ``cu_seqlens[-1]``, rank by rank. Device-side only.
    """
    _check(0, cp_size, cp_rank)  # (the packed rows' split is checked by cp_packed_check)
    cu = cu_seqlens.to(torch.int64).reshape(-1)
    if cu.numel() < 2:
        raise ValueError("cu_seqlens must be a 1-D tensor with at least 2 entries")
    if cp_size == 1:
        return torch.arange(rows, device=cu.device)
    local_cu = cu // cp_size
    i = torch.arange(rows, device=cu.device)
    doc = (torch.searchsorted(local_cu, i, right=True) - 1).clamp(max=cu.numel() - 2)
    half = (cu[doc + 1] - cu[doc]) // (2 * cp_size)
    o = i - local_cu[doc]
    chunk = torch.where(o < half, torch.full_like(o, cp_rank), torch.full_like(o, 2 * cp_size - 1 - cp_rank))
    pos = cu[doc] + chunk * half + torch.where(o < half, o, o - half)
    tail_len = rows - local_cu[-1]
    tail = cu[-1] + cp_rank * tail_len + (i - local_cu[-1])
    return torch.where(i >= local_cu[-1], tail, pos)


def cp_packed_check(cu_seqlens: torch.Tensor, cp_size: int, rows: int, name: str = "cu_seqlens") -> None:
    """Raise unless every document of ``cu_seqlens`` splits into ``2 * cp_size`` equal chunks and
    the documents fit the ``rows * cp_size`` packed rows (reads ``cu_seqlens`` on the host: the
    layer skips it while a CUDA graph is being captured)."""
    cu = cu_seqlens.detach().to("cpu", torch.int64).reshape(-1)
    lens = cu[1:] - cu[:-1]
    bad = torch.nonzero(lens % (2 * cp_size)).flatten()
    if bad.numel():
        d = int(bad[0])
        raise ValueError(
            f"{name}: document {d} has length {int(lens[d])}, not a multiple of 2 * "
            f"context_parallel_size = {2 * cp_size}; pad every document (cu_seqlens_q_padded) for the "
            "load-balanced per-document CP split"
        )
    if int(cu[-1]) > rows * cp_size:
        raise ValueError(f"{name}[-1] = {int(cu[-1])} exceeds the packed rows of the CP group "
                         f"({rows} per rank x {cp_size})")


def cp_packed_causal_window(cu_seqlens: torch.Tensor, positions: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``[start, end)`` windows (int32 ``[1, rows]``) of packed rows at global ``positions``: a
    row sees its own document's keys up to itself; rows past ``cu_seqlens[-1]`` see nothing."""
    cu = cu_seqlens.to(device=positions.device, dtype=torch.int64).reshape(-1)
    p = positions.to(torch.int64)
    doc = (torch.searchsorted(cu, p, right=True) - 1).clamp(max=cu.numel() - 2)
    padding = p >= cu[-1]
    starts = torch.where(padding, p, cu[doc]).to(torch.int32)
    ends = torch.where(padding, p, p + 1).to(torch.int32)
    return starts.unsqueeze(0), ends.unsqueeze(0)


def cp_layout(cp_size: int, cp_rank: int, rows: int, cu_seqlens: Optional[torch.Tensor] = None,
              device=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(positions, order)`` of one CP rank's ``rows`` rows: their global positions
    (:func:`cp_positions`, or :func:`cp_packed_positions` for a packed batch with global
    ``cu_seqlens``), and ``order[g]`` = the row of the rank-major all-gather that holds global
    position ``g`` (int64 ``[rows * cp_size]``, for :func:`cp_gather`). Device-side only."""
    if cu_seqlens is None:
        held = [cp_positions(rows * cp_size, cp_size, r, device=device) for r in range(cp_size)]
    else:
        held = [cp_packed_positions(cu_seqlens, cp_size, r, rows) for r in range(cp_size)]
    return held[cp_rank], torch.argsort(torch.cat(held))


def cp_work(seq_len: int, cp_size: int, topk: int, ranks: Optional[List[int]] = None) -> List[Dict[str, int]]:
    """Per rank: ``indexer`` = keys scored (sum of window lengths: the causal indexer's work) and
    ``attention`` = slots attended (sum of ``min(window, topk)``: the sparse attention's work)."""
    out = []
    for r in range(cp_size) if ranks is None else ranks:
        win = cp_positions(seq_len, cp_size, r) + 1
        out.append({"rank": r, "rows": int(win.numel()), "indexer": int(win.sum()),
                    "attention": int(win.clamp(max=topk).sum())})
    return out


class _GatherRows(torch.autograd.Function):
    """All-gather along ``dim`` over ``group``; the backward sums every rank's gradient of this
    rank's rows (reduce-scatter on NCCL, all-reduce + slice where the backend has none)."""

    @staticmethod
    def forward(ctx, t, dim, group):
        import torch.distributed as dist

        ctx.dim, ctx.group = dim, group
        t = t.contiguous()
        parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, t, group=group)
        return torch.cat(parts, dim)

    @staticmethod
    def backward(ctx, grad):
        import torch.distributed as dist

        size, rank = dist.get_world_size(ctx.group), dist.get_rank(ctx.group)
        if dist.get_backend(ctx.group) == "nccl" and ctx.dim == 0:
            grad = grad.contiguous()
            out = grad.new_empty((grad.shape[0] // size,) + tuple(grad.shape[1:]))
            dist.reduce_scatter_tensor(out, grad, group=ctx.group)
            return out, None, None
        grad = grad.clone(memory_format=torch.contiguous_format)  # one copy, reduced in place
        dist.all_reduce(grad, group=ctx.group)
        return grad.chunk(size, ctx.dim)[rank].contiguous(), None, None


def cp_gather(t: torch.Tensor, dim: int, group, order: torch.Tensor) -> torch.Tensor:
    """The whole sequence, in global order, from every CP rank's rows of ``t`` along ``dim``
    (``order`` from :func:`cp_layout`). Differentiable: the backward returns to each rank the
    summed gradient of its own rows."""
    return _GatherRows.apply(t, dim, group).index_select(dim, order)
