"""Row packing for the <= 32-head backward: groups of query rows walk the union of their keys.

At <= 32 heads per rank (a TP shard of a 128-head model) the backward's 64-row wgmma tile holds
``R = 64 / hpad`` query rows (``hpad`` = 16 or 32 heads, the last ones masked), and the group
walks the *union* of its rows' selected keys once: each union entry is gathered once, its MMAs
serve every row of the group (a row that did not select it is masked), and its dkv is added to
the fp32 workspace once instead of once per row. The dkv adds are what bounds this backward
(``docs/kernels_sparse_mla.md`` sections 4 and 6), so the cost follows the union's size: about
``R k`` entries when the rows share nothing (random ids: the unpacked cost), less as adjacent
rows share keys.

:func:`pack_rows` builds the union per group, device-side with fixed shapes (no host
synchronization, so it can be captured in a CUDA graph):

* ``uid [G, R K]`` int32: the group's entries, ``count[g]`` of them, then -1: first the union
  (one entry per distinct id, in id order), then one entry per repeated occurrence;
* ``uslot [G, R, R K]`` int16: for each row of the group and entry, the slot of that row which
  selected it, or -1 (row-major per row: the kernel reads two adjacent entries in one load);
* ``count [G]`` int32.

An id's first occurrence in each row of the group shares its union entry. A row that holds the
same id in further slots (the indexer never does; the contract counts each slot) gets an entry
of its own for each further occurrence. So every valid (row, slot) is exactly one (entry, row)
pair, and the packed sums equal the unpacked ones term for term (:func:`unpack`, tested). Slots
that are empty (-1, an id outside ``[0, Tk)``, or past ``topk_length``) are dropped.

:func:`pack_rows_triton` marks the ids in bitmaps over the keys and ranks them by popcount
prefixes (no sort; its docstring); :func:`pack_rows_reference` does the same in torch ops with
one stable sort per group.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from .reference import slot_validity

__all__ = ["PackedRows", "pack_rows", "pack_rows_reference", "pack_rows_triton", "unpack", "heads_padded", "packed_shape",
           "MAX_PACK_HEADS", "MAX_PACK_SLOTS"]

# Packing applies at <= 32 heads (two or more rows per 64-row tile).
MAX_PACK_HEADS = 32
# uslot stores slot numbers as int16.
MAX_PACK_SLOTS = 32767
# The packing kernel's launch: persistent programs per SM, slots per chunk, bitmap words per chunk.
_CFG = {"pack_warps": 8, "pack_block": 2048, "pack_wb": 2048, "pack_programs_per_sm": 2}


class PackedRows(NamedTuple):
    uid: torch.Tensor     # [G, R K] int32
    uslot: torch.Tensor   # [G, R, R K] int16
    count: torch.Tensor   # [G] int32
    rows: int             # R, query rows per group
    hpad: int             # heads per row in the 64-row tile (16 or 32)

    @property
    def hshift(self) -> int:
        """log2 of ``hpad``: what the CUDA kernels take to map a tile row to (row, head)."""
        return self.hpad.bit_length() - 1


def heads_padded(heads: int) -> int:
    """The per-row head slice of the 64-row tile: 16 for <= 16 heads, 32 for 17-32."""
    if not 1 <= heads <= MAX_PACK_HEADS:
        raise ValueError(f"row packing takes 1..{MAX_PACK_HEADS} heads, got {heads}")
    return 16 if heads <= 16 else 32


def packed_shape(indices: torch.Tensor, heads: int):
    """``(T, K, hpad, R, G)`` of a packing of ``indices [T, K]`` at ``heads`` heads (checked)."""
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
    (and Triton's interpreter) run the Triton kernel; otherwise :func:`pack_rows_reference`."""
    from ..triton_common import interpreting

    if indices.is_cuda or interpreting():
        return pack_rows_triton(indices, num_keys, heads, topk_length)
    return pack_rows_reference(indices, num_keys, heads, topk_length)


def pack_rows_reference(indices: torch.Tensor, num_keys: int, heads: int,
                        topk_length: Optional[torch.Tensor] = None) -> PackedRows:
    """:func:`pack_rows` in plain PyTorch ops (one sort per group, scans and scatters)."""
    T, K, hpad, R, G = packed_shape(indices, heads)
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
    # the union: one entry per distinct id, in id order, shared by each row's first occurrence
    new_id = ok & (id_start == pos)
    n_union = new_id.sum(1)
    rank = (new_id.long().cumsum(1) - 1).gather(1, id_start)
    # a repeated occurrence: an entry of its own after the union, numbered in slot order
    again = ok & (occ > 0)
    again_o = torch.zeros_like(again).scatter_(1, perm, again)   # (in the rows' own order)
    nth = (again_o.long().cumsum(1) - 1).gather(1, perm)
    ent = torch.where(again, n_union[:, None] + nth, rank)
    count = (n_union + again.sum(1)).to(torch.int32)
    # scatter; empty slots go to a spare column that is cut off
    ent_w = torch.where(ok, ent, RK)
    uid = torch.full((G, RK + 1), -1, dtype=torch.int32, device=dev)
    uid.scatter_(1, ent_w, torch.where(ok, ids_s, -1).to(torch.int32))
    uslot = torch.full((G, R, RK + 1), -1, dtype=torch.int16, device=dev)
    uslot.view(G, R * (RK + 1)).scatter_(1, j_s * (RK + 1) + ent_w, torch.where(ok, slot_s, -1).to(torch.int16))
    return PackedRows(uid[:, :RK].contiguous(), uslot[:, :, :RK].contiguous(), count, R, hpad)


@triton.jit
def _popc(x):
    """Set bits of each int32 (SWAR)."""
    x = x.to(tl.uint32, bitcast=True)
    x = x - ((x >> 1) & 0x55555555)
    x = (x & 0x33333333) + ((x >> 2) & 0x33333333)
    x = (x + (x >> 4)) & 0x0F0F0F0F
    return ((x * 0x01010101) >> 24).to(tl.int32)


@triton.jit
def _group_slots(idx_ptr, len_ptr, g, c0, T, K, Tk, stride_t, stride_k,
                 R: tl.constexpr, BLOCK: tl.constexpr, HAS_LEN: tl.constexpr):
    """Slots ``c0 .. c0 + BLOCK`` of group ``g`` (row-major over its R rows): position, row in the
    group, slot, validity (an id in ``[0, Tk)`` below the row's length) and the id (0 if not)."""
    pos = c0 + tl.arange(0, BLOCK)
    j = pos // K
    slot = pos - j * K
    row = g * R + j
    inb = (pos < R * K) & (row < T)
    ids = tl.load(idx_ptr + row.to(tl.int64) * stride_t + slot * stride_k, mask=inb, other=-1)
    valid = inb & (ids >= 0) & (ids < Tk)
    if HAS_LEN:
        valid = valid & (slot < tl.load(len_ptr + row, mask=inb, other=0))
    return pos, j, slot, valid, tl.where(valid, ids, 0).to(tl.int32)


@triton.jit
def _pack_rows_kernel(idx_ptr, len_ptr, bits_ptr, pre_ptr, first_ptr, uid_ptr, uslot_ptr, count_ptr,
                      T, K, Tk, W, G, NPROG, stride_t, stride_k,
                      R: tl.constexpr, BLOCK: tl.constexpr, WB: tl.constexpr, HAS_LEN: tl.constexpr):
    """Persistent: program p packs groups p, p + NPROG, ... with its own scratch (R row bitmaps
    and the union bitmap over the keys, W words each; the union's prefix popcounts; a flag per
    slot), in three phases separated by CTA barriers:

    1. mark: each valid (row, id) sets its bit in the row's bitmap; the one slot that found it
       clear is the row's first occurrence (any one of a repeated id; the sums do not depend on
       which) and sets the id's bit in the union bitmap;
    2. prefix: exclusive popcount prefix of the union's words: an id's union index is
       ``prefix[id / 32] + popc(word & lower bits)``, so the union comes out in id order;
    3. scatter: a first occurrence takes its id's union entry, a repeat the next entry after
       the union (numbered in slot order); uid and uslot are written there.
    """
    pid = tl.program_id(0)
    RK = R * K
    ucap = RK.to(tl.int64)
    rowbits = bits_ptr + pid.to(tl.int64) * (R + 1) * W
    ubits = rowbits + R * W
    pre = pre_ptr + pid.to(tl.int64) * W
    first_s = first_ptr + pid.to(tl.int64) * RK
    for g in range(pid, G, NPROG):
        for w0 in range(0, (R + 1) * W, WB):
            offs = w0 + tl.arange(0, WB)
            tl.store(rowbits + offs, tl.zeros([WB], tl.int32), mask=offs < (R + 1) * W)
        tl.debug_barrier()
        for c0 in range(0, RK, BLOCK):
            pos, j, slot, valid, idw = _group_slots(idx_ptr, len_ptr, g, c0, T, K, Tk, stride_t, stride_k,
                                                    R, BLOCK, HAS_LEN)
            bit = (1 << (idw & 31)).to(tl.int32)
            old = tl.atomic_or(rowbits + j * W + (idw >> 5), bit, mask=valid)
            first = valid & ((old & bit) == 0)
            tl.atomic_or(ubits + (idw >> 5), bit, mask=first)
            tl.store(first_s + pos, first.to(tl.int8), mask=pos < RK)
        tl.debug_barrier()
        n_union = 0
        for w0 in range(0, W, WB):
            offs = w0 + tl.arange(0, WB)
            pc = _popc(tl.load(ubits + offs, mask=offs < W, other=0, cache_modifier=".cg"))
            tl.store(pre + offs, n_union + tl.cumsum(pc, 0) - pc, mask=offs < W)
            n_union += tl.sum(pc, 0)
        tl.debug_barrier()
        n_again = 0
        for c0 in range(0, RK, BLOCK):
            pos, j, slot, valid, idw = _group_slots(idx_ptr, len_ptr, g, c0, T, K, Tk, stride_t, stride_k,
                                                    R, BLOCK, HAS_LEN)
            first = tl.load(first_s + pos, mask=valid, other=0, cache_modifier=".cg") != 0
            word = tl.load(ubits + (idw >> 5), mask=valid, other=0, cache_modifier=".cg")
            below = word & ((1 << (idw & 31)) - 1).to(tl.int32)
            rank = tl.load(pre + (idw >> 5), mask=valid, other=0, cache_modifier=".cg") + _popc(below)
            again = valid & (first == 0)
            nth = n_again + tl.cumsum(again.to(tl.int32), 0) - 1
            n_again += tl.sum(again.to(tl.int32), 0)
            ent = tl.where(again, n_union + nth, rank)
            tl.store(uid_ptr + g * ucap + ent, idw, mask=valid)
            tl.store(uslot_ptr + (g * R + j) * ucap + ent, slot.to(tl.int16), mask=valid)
        tl.store(count_ptr + g, n_union + n_again)
        tl.debug_barrier()


def pack_rows_triton(indices: torch.Tensor, num_keys: int, heads: int,
                     topk_length: Optional[torch.Tensor] = None) -> PackedRows:
    """:func:`pack_rows` as one persistent Triton kernel over the groups (bitmaps over the keys,
    no sort: module docstring). Without repeated ids, the same tensors as the reference; with
    them, which of a row's repeated slots shares the union entry may differ (the sums do not)."""
    T, K, hpad, R, G = packed_shape(indices, heads)
    dev = indices.device
    RK = R * K
    uid = torch.full((G, RK), -1, dtype=torch.int32, device=dev)
    uslot = torch.full((G, R, RK), -1, dtype=torch.int16, device=dev)
    count = torch.zeros(G, dtype=torch.int32, device=dev)
    if G > 0 and K > 0:
        W = max(1, triton.cdiv(num_keys, 32))
        if dev.type == "cuda":
            nprog = min(G, _CFG["pack_programs_per_sm"] * torch.cuda.get_device_properties(dev).multi_processor_count)
        else:
            nprog = min(G, 4)
        bits = torch.empty(nprog * (R + 1) * W, dtype=torch.int32, device=dev)
        pre = torch.empty(nprog * W, dtype=torch.int32, device=dev)
        first = torch.empty(nprog * RK, dtype=torch.int8, device=dev)
        lens = topk_length.to(torch.int32).contiguous() if topk_length is not None else None
        _pack_rows_kernel[(nprog,)](
            indices, lens if lens is not None else count, bits, pre, first, uid, uslot, count, T, K, num_keys, W,
            G, nprog, indices.stride(0), indices.stride(1), R=R, BLOCK=_CFG["pack_block"], WB=_CFG["pack_wb"],
            HAS_LEN=lens is not None, num_warps=_CFG["pack_warps"])
    return PackedRows(uid, uslot, count, R, hpad)


def unpack(packed: PackedRows, T: int, K: int) -> torch.Tensor:
    """The ``[T, K]`` indices the packing describes (-1 in slots it dropped): its inverse, for tests."""
    uid, uslot, _, R, _ = packed
    G = uid.shape[0]
    out = torch.full((G * R, K), -1, dtype=torch.long, device=uid.device)
    g, j, e = torch.nonzero(uslot >= 0, as_tuple=True)
    out[g * R + j, uslot[g, j, e].long()] = uid[g, e].long()
    return out[:T]
