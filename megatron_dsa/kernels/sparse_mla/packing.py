"""Row packing for the <= 32-head backward: groups of query rows walk the union of their keys.

At <= 32 heads per rank (a TP shard of a 128-head model) the backward's 64-row wgmma tile holds
``R = 64 / hpad`` query rows (``hpad`` = 16 or 32 heads, the last ones masked), and the group
walks the *union* of its rows' selected keys once: each union entry is gathered once, its MMAs
serve every row of the group (a row that did not select it is masked), and its dkv is added to
the fp32 workspace once instead of once per row. The dkv adds are what bounds this backward
(``docs/kernels_sparse_mla.md`` sections 4 and 6), so the cost follows the union's size: about
``R k`` entries when the rows share nothing (random ids: the unpacked cost), less as adjacent
rows share keys.

:func:`pack_rows` builds the union per group, device-side with fixed shapes (sorts, scans and
scatters; no host synchronization, so it can be captured in a CUDA graph):

* ``uid [G, R K]`` int32: the group's entries, sorted by key id, ``count[g]`` of them, then -1;
* ``uslot [G, R, R K]`` int16: for each row of the group and entry, the slot of that row which
  selected it, or -1 (row-major per row: the kernel reads two adjacent entries in one load);
* ``count [G]`` int32.

A row that holds the same id in several slots (the indexer never does; the contract counts
each slot) gets one entry per occurrence: occurrence ``o`` of id ``x`` in any row of the group
maps to entry ``(x, o)``, shared by the rows that hold ``x`` at least ``o + 1`` times. So every
valid (row, slot) is exactly one (entry, row) pair, and the packed sums equal the unpacked ones
term for term (:func:`unpack`, tested). Slots that are empty (-1, an id outside ``[0, Tk)``, or
past ``topk_length``) are dropped.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from .reference import slot_validity

__all__ = ["PackedRows", "pack_rows", "unpack", "heads_padded", "MAX_PACK_HEADS", "MAX_PACK_SLOTS"]

# Packing applies at <= 32 heads (two or more rows per 64-row tile).
MAX_PACK_HEADS = 32
# uslot stores slot numbers as int16.
MAX_PACK_SLOTS = 32767


class PackedRows(NamedTuple):
    uid: torch.Tensor     # [G, R K] int32
    uslot: torch.Tensor   # [G, R, R K] int16
    count: torch.Tensor   # [G] int32
    rows: int             # R, query rows per group
    hpad: int             # heads per row in the 64-row tile (16 or 32)


def heads_padded(heads: int) -> int:
    """The per-row head slice of the 64-row tile: 16 for <= 16 heads, 32 for 17-32."""
    if not 1 <= heads <= MAX_PACK_HEADS:
        raise ValueError(f"row packing takes 1..{MAX_PACK_HEADS} heads, got {heads}")
    return 16 if heads <= 16 else 32


def pack_rows(indices: torch.Tensor, num_keys: int, heads: int,
              topk_length: Optional[torch.Tensor] = None) -> PackedRows:
    """The union of each group's selected keys (module docstring). ``indices [T, K]`` int32 or
    int64, any id outside ``[0, num_keys)`` empty; ``topk_length [T]`` optional."""
    if indices.dim() != 2:
        raise ValueError(f"indices must be [T, K], got shape {tuple(indices.shape)}")
    T, K = indices.shape
    if K > MAX_PACK_SLOTS:
        raise ValueError(f"row packing stores slots as int16: K must be <= {MAX_PACK_SLOTS}, got {K}")
    hpad = heads_padded(heads)
    R = 64 // hpad
    G = (T + R - 1) // R
    dev = indices.device
    RK = R * K
    valid = slot_validity(indices, num_keys, topk_length)
    if G * R != T:  # pad the last group with empty rows
        pad = G * R - T
        valid = torch.cat([valid, valid.new_zeros(pad, K)])
        indices = torch.cat([indices, indices.new_full((pad, K), -1)])
    valid = valid.view(G, RK)
    pos = torch.arange(RK, device=dev)
    j = pos // K                                  # row within the group
    # a stable sort by (id, row) keeps each row's slots in order; empty slots last. The key is
    # int32 where it fits (radix sorts pass over the key's bytes)
    big = num_keys * R
    kdt = torch.int32 if big < 2**31 else torch.int64
    key = torch.where(valid, indices.view(G, RK).to(kdt) * R + j.to(kdt), big)
    idr, perm = torch.sort(key, dim=1, stable=True)
    ok = idr < big
    idr = idr.long()                              # id * R + row
    ids_s = idr // R
    j_s = idr % R
    slot_s = perm % K
    # occurrence number of (id, row): position minus the run's first position
    first = torch.ones_like(ok)
    first[:, 1:] = idr[:, 1:] != idr[:, :-1]
    start = torch.where(first, pos, 0).cummax(dim=1).values
    occ = pos - start
    # runs of one id; a run holds max(occ) + 1 entries, (id, 0), (id, 1), ...
    new_id = torch.ones_like(ok)
    new_id[:, 1:] = ids_s[:, 1:] != ids_s[:, :-1]
    run = new_id.long().cumsum(1) - 1
    per_run = torch.zeros(G, RK, dtype=torch.long, device=dev).scatter_reduce_(
        1, run, torch.where(ok, occ + 1, 0), "amax")
    base = per_run.cumsum(1) - per_run
    ent = base.gather(1, run) + occ
    count = per_run.sum(1).to(torch.int32)
    # scatter; empty slots go to a spare column that is cut off
    ent_w = torch.where(ok, ent, RK)
    uid = torch.full((G, RK + 1), -1, dtype=torch.int32, device=dev)
    uid.scatter_(1, ent_w, torch.where(ok, ids_s, -1).to(torch.int32))
    uslot = torch.full((G, R, RK + 1), -1, dtype=torch.int16, device=dev)
    uslot.view(G, R * (RK + 1)).scatter_(1, j_s * (RK + 1) + ent_w, torch.where(ok, slot_s, -1).to(torch.int16))
    return PackedRows(uid[:, :RK].contiguous(), uslot[:, :, :RK].contiguous(), count, R, hpad)


def unpack(packed: PackedRows, T: int, K: int) -> torch.Tensor:
    """The ``[T, K]`` indices the packing describes (-1 in slots it dropped): its inverse, for tests."""
    uid, uslot, _, R, _ = packed
    G = uid.shape[0]
    out = torch.full((G * R, K), -1, dtype=torch.long, device=uid.device)
    g, j, e = torch.nonzero(uslot >= 0, as_tuple=True)
    out[g * R + j, uslot[g, j, e].long()] = uid[g, e].long()
    return out[:T]
