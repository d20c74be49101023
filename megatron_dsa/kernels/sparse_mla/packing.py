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

An id's first occurrence in each row of the group shares one entry. A row that holds the same
id in further slots (the indexer never does; the contract counts each slot) gets an entry of its
own for each further occurrence. So every valid (row, slot) is exactly one (entry, row) pair,
and the packed sums equal the unpacked ones term for term (:func:`unpack`, tested). Slots that
are empty (-1, an id outside ``[0, Tk)``, or past ``topk_length``) are dropped.

Algorithm (per group, :func:`pack_rows_triton` in one program, :func:`pack_rows_reference` in
torch ops): sort the keys ``(id R + row) K + slot`` of the group's ``R k`` slots; segmented
scans give each element its occurrence number within its (id, row) run and the start of its id
run; an entry starts at an id run's first element and at every repeated occurrence, its index is
the running count of starts, and a first occurrence takes the index of its id run's start.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from .reference import slot_validity

__all__ = ["PackedRows", "pack_rows", "pack_rows_reference", "pack_rows_triton", "unpack", "heads_padded",
           "MAX_PACK_HEADS", "MAX_PACK_SLOTS"]

# Packing applies at <= 32 heads (two or more rows per 64-row tile).
MAX_PACK_HEADS = 32
# uslot stores slot numbers as int16.
MAX_PACK_SLOTS = 32767
# The group kernel's launch: the group's R K keys spread over 16 warps' registers; a group of
# more than 8192 keys (k > 2048 at 16 heads) is packed by the torch-ops reference instead.
_CFG = {"pack_warps": 16, "max_block": 8192}


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


def _shape(indices: torch.Tensor, heads: int):
    if indices.dim() != 2:
        raise ValueError(f"indices must be [T, K], got shape {tuple(indices.shape)}")
    T, K = indices.shape
    if K > MAX_PACK_SLOTS:
        raise ValueError(f"row packing stores slots as int16: K must be <= {MAX_PACK_SLOTS}, got {K}")
    hpad = heads_padded(heads)
    R = 64 // hpad
    return T, K, hpad, R, (T + R - 1) // R


def pack_rows(indices: torch.Tensor, num_keys: int, heads: int,
              topk_length: Optional[torch.Tensor] = None) -> PackedRows:
    """The union of each group's selected keys (module docstring). ``indices [T, K]`` int32 or
    int64, any id outside ``[0, num_keys)`` empty; ``topk_length [T]`` optional. CUDA tensors
    (and Triton's interpreter) run one Triton program per group of up to 8192 keys; otherwise
    :func:`pack_rows_reference`, which gives the same tensors."""
    from ..triton_common import interpreting

    _, K, _, R, _ = _shape(indices, heads)
    if (indices.is_cuda or interpreting()) and triton.next_power_of_2(R * K) <= _CFG["max_block"]:
        return pack_rows_triton(indices, num_keys, heads, topk_length)
    return pack_rows_reference(indices, num_keys, heads, topk_length)


def pack_rows_reference(indices: torch.Tensor, num_keys: int, heads: int,
                        topk_length: Optional[torch.Tensor] = None) -> PackedRows:
    """:func:`pack_rows` in plain PyTorch ops (one sort per group, scans and scatters)."""
    T, K, hpad, R, G = _shape(indices, heads)
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
    # a stable sort by (id, row) keeps each row's slots in order; empty slots last
    big = num_keys * R
    kdt = torch.int32 if big < 2**31 else torch.int64
    key = torch.where(valid, indices.view(G, RK).to(kdt) * R + j.to(kdt), big)
    idr, perm = torch.sort(key, dim=1, stable=True)
    ok = idr < big
    idr = idr.long()                              # id * R + row
    ids_s = idr // R
    j_s = idr % R
    slot_s = perm % K

    def run_start(k):  # position of the first element of each element's run of equal k
        first = torch.ones_like(ok)
        first[:, 1:] = k[:, 1:] != k[:, :-1]
        return torch.where(first, pos, 0).cummax(dim=1).values

    occ = pos - run_start(idr)                    # occurrence number of the id in its row
    id_start = run_start(ids_s)
    # an entry starts at each id's first element and at every repeated occurrence
    starts = ok & ((id_start == pos) | (occ > 0))
    e = starts.long().cumsum(1) - 1
    ent = torch.where(occ > 0, e, e.gather(1, id_start))
    count = starts.sum(1).to(torch.int32)
    # scatter; empty slots go to a spare column that is cut off
    ent_w = torch.where(ok, ent, RK)
    uid = torch.full((G, RK + 1), -1, dtype=torch.int32, device=dev)
    uid.scatter_(1, ent_w, torch.where(ok, ids_s, -1).to(torch.int32))
    uslot = torch.full((G, R, RK + 1), -1, dtype=torch.int16, device=dev)
    uslot.view(G, R * (RK + 1)).scatter_(1, j_s * (RK + 1) + ent_w, torch.where(ok, slot_s, -1).to(torch.int16))
    return PackedRows(uid[:, :RK].contiguous(), uslot[:, :, :RK].contiguous(), count, R, hpad)


@triton.jit
def _seg_first(k1, v1, k2, v2):
    """Scan combine: along sorted keys, the value at the first element of each run of equal keys."""
    return k2, tl.where(k1 == k2, v1, v2)


@triton.jit
def _pack_rows_kernel(idx_ptr, len_ptr, uid_ptr, uslot_ptr, count_ptr, T, K, Tk, stride_t, stride_k,
                      R: tl.constexpr, BLOCK: tl.constexpr, HAS_LEN: tl.constexpr, KEY64: tl.constexpr):
    g = tl.program_id(0)
    RK = R * K
    pos = tl.arange(0, BLOCK)
    j = pos // K
    slot = pos - j * K
    row = g * R + j
    inb = (pos < RK) & (row < T)
    ids = tl.load(idx_ptr + row.to(tl.int64) * stride_t + slot * stride_k, mask=inb, other=-1)
    valid = inb & (ids >= 0) & (ids < Tk)         # (in the ids' own width: no wrap-around)
    if HAS_LEN:
        valid = valid & (slot < tl.load(len_ptr + row, mask=inb, other=0))
    kt = tl.int64 if KEY64 else tl.int32
    # one key per (id, row, slot), sorted: a group's ids in order, each row's slots in order;
    # empty slots last
    big = Tk.to(kt) * R * K
    key = tl.where(valid, (ids.to(kt) * R + j) * K + slot, big)
    key = tl.sort(key)
    ok = key < big
    idr = key // K                                # id * R + row
    slot_s = (key - idr * K).to(tl.int32)
    ids_s = idr // R
    j_s = (idr - ids_s * R).to(tl.int32)
    _, first_idr = tl.associative_scan((idr, pos), 0, _seg_first)
    occ = pos - first_idr                         # occurrence number of the id in its row
    _, id_start = tl.associative_scan((ids_s, pos), 0, _seg_first)
    # an entry starts at each id's first element and at every repeated occurrence
    starts = ok & ((id_start == pos) | (occ > 0))
    e = tl.cumsum(starts.to(tl.int32), 0) - 1
    _, e0 = tl.associative_scan((ids_s, e), 0, _seg_first)
    ent = tl.where(occ > 0, e, e0)
    ucap = RK.to(tl.int64)
    tl.store(uid_ptr + g * ucap + ent, ids_s.to(tl.int32), mask=ok)
    tl.store(uslot_ptr + (g * R + j_s) * ucap + ent, slot_s.to(tl.int16), mask=ok)
    tl.store(count_ptr + g, tl.sum(starts.to(tl.int32), 0))


def pack_rows_triton(indices: torch.Tensor, num_keys: int, heads: int,
                     topk_length: Optional[torch.Tensor] = None) -> PackedRows:
    """:func:`pack_rows` as one Triton program per group (a sort of the group's ``R K`` keys in
    registers, three segmented scans and the scatters): the same tensors as the reference."""
    T, K, hpad, R, G = _shape(indices, heads)
    dev = indices.device
    RK = R * K
    uid = torch.full((G, RK), -1, dtype=torch.int32, device=dev)
    uslot = torch.full((G, R, RK), -1, dtype=torch.int16, device=dev)
    count = torch.zeros(G, dtype=torch.int32, device=dev)
    if G > 0 and K > 0:
        lens = topk_length.to(torch.int32).contiguous() if topk_length is not None else None
        block = triton.next_power_of_2(RK)
        _pack_rows_kernel[(G,)](
            indices, lens if lens is not None else count, uid, uslot, count, T, K, num_keys,
            indices.stride(0), indices.stride(1), R=R, BLOCK=block, HAS_LEN=lens is not None,
            KEY64=num_keys * RK >= 2**31, num_warps=_CFG["pack_warps"])
    return PackedRows(uid, uslot, count, R, hpad)



def unpack(packed: PackedRows, T: int, K: int) -> torch.Tensor:
    """The ``[T, K]`` indices the packing describes (-1 in slots it dropped): its inverse, for tests."""
    uid, uslot, _, R, _ = packed
    G = uid.shape[0]
    out = torch.full((G * R, K), -1, dtype=torch.long, device=uid.device)
    g, j, e = torch.nonzero(uslot >= 0, as_tuple=True)
    out[g * R + j, uslot[g, j, e].long()] = uid[g, e].long()
    return out[:T]
