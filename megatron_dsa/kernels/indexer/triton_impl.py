"""Fused Triton lightning indexer: index scores + exact top-k with bounded memory.

Two kernels per chunk of query rows (see ``docs/kernels_indexer.md``):

1. ``_score_kernel``: a program owns ``BLOCK_T`` query rows x ``BLOCK_S`` keys and loops over the
   heads, ``acc += w[:, h] * relu(q_h @ k^T)`` (fp32 accumulation), then writes the masked fp32
   scores of the tile into a chunk buffer ``[B, R, S]``. Key tiles outside every row's window
   are skipped (causal: only ``s <= t``). A contiguous q is read by TMA (a tensor descriptor,
   one copy per head tile on Hopper); any other q by pointer loads.
2. ``_select_kernel``: one program per query row. A threshold from a strided
   sample of the row admits a short candidate list (int32 scratch); an exact radix select
   (256-bin histograms of 8-bit digits of the order-preserving uint32 image of the fp32
   score, in-place compaction of the boundary bucket) then picks the top-k among them. If
   the sample under-shoots, the whole row is the candidate list, so the result is exact.
   Ties: among equal scores the lower key index wins. Only ``[start, end)`` of a row is read.

Extra memory is the chunk buffer (+ the Triton select's scratch), ``R * (S + cap) * 4 * B``
bytes with ``R`` chosen so that it stays under ``chunk_bytes`` (512 MiB by default), whatever
``T`` is. The select may instead be the CUDA one (``cuda_impl.select_cuda``, ``select_kernel``),
which reads the same buffer and needs no scratch. No host
synchronisation: the grids depend on shapes only, so the call can be captured in a CUDA graph.

Output order: the selected ids of a row are NOT sorted by score; rows with fewer than ``topk`` valid keys list all of them and pad with ``-1`` / ``-inf``.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl

try:  # host-side TMA descriptors (Triton >= 3.3)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older Triton: q by pointer loads
    TensorDescriptor = None

from ..backends import cuda_capability
from ..triton_common import interpreting

__all__ = ["indexer_topk_triton", "indexer_scores_triton", "DEFAULT_CHUNK_BYTES"]

# The score buffer's budget. Halving it from 1 GiB cost 1-3% of the time on H100 (S = 16K-64K)
# and cut the peak at S = 16K from 1.25 to 0.75 GiB.
DEFAULT_CHUNK_BYTES = 512 << 20


# --------------------------------------------------------------------------------------------
# score kernel
# --------------------------------------------------------------------------------------------


@triton.jit
def _score_kernel(
    q_desc, q_ptr, k_ptr, w_ptr, st_ptr, en_ptr, out_ptr, ks_ptr,
    row0, n_rows, T, S,
    sq_b, sq_t, sq_h,
    sk_b, sk_s,
    sw_b, sw_t, sw_h,
    sse_b, sse_t,
    so_b, so_r,
    sks_b,
    H: tl.constexpr, D: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr,
    CAUSAL: tl.constexpr, USE_RELU: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    KEY_SCALE: tl.constexpr, Q_TMA: tl.constexpr,
):
    pid_s = tl.program_id(0)
    pid_t = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    r = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    t = row0 + r
    rmask = (r < n_rows) & (t < T)
    s_lo = pid_s * BLOCK_S
    if CAUSAL:
        st = tl.zeros([BLOCK_T], dtype=tl.int32)
        en = tl.minimum(t + 1, S)
        en = tl.where(rmask, en, 0)
    else:
        st = tl.load(st_ptr + b * sse_b + t * sse_t, mask=rmask, other=0).to(tl.int32)
        en = tl.load(en_ptr + b * sse_b + t * sse_t, mask=rmask, other=0).to(tl.int32)
        st = tl.maximum(st, 0)
        en = tl.minimum(en, S)
        en = tl.where(rmask & (en > st), en, 0)
        st = tl.where(rmask & (en > st), st, S)
    lo = tl.min(st, 0)
    hi = tl.max(en, 0)
    if (hi > s_lo) & (lo < s_lo + BLOCK_S):
        s = s_lo + tl.arange(0, BLOCK_S)
        smask = s < S
        d = tl.arange(0, D)
        kt = tl.load(k_ptr + b * sk_b + s[:, None] * sk_s + d[None, :], mask=smask[:, None], other=0.0)
        if UPCAST:
            kt = kt.to(tl.float32)
        kt = tl.trans(kt)
        q_row = q_ptr + b * sq_b + t[:, None].to(tl.int64) * sq_t + d[None, :]
        w_row = w_ptr + b * sw_b + t.to(tl.int64) * sw_t
        acc = tl.zeros([BLOCK_T, BLOCK_S], dtype=tl.float32)
        # (Issuing head h+1's MMA before head h's epilogue, by hand, measured slower on H100:
        # score alone at S=32K 15.3 vs 13.1 ms; the keys as the MMA's M, acc[s, t], half the q
        # bytes per score, slower still: docs/kernels_indexer.md section 4.)
        # q_desc: q as [B T, H D]; rows past the chunk's (past T: the next batch's, or zeros)
        # are read but never stored. By TMA the head loop issues one copy per q tile instead of
        # each thread's cp.async and their addresses: 1.05-1.09x on H100 (section 4).
        q_tile_row = (b * T + row0 + pid_t * BLOCK_T).to(tl.int32)
        for h in range(H):
            if Q_TMA:
                qh = q_desc.load([q_tile_row, h * D])
            else:
                qh = tl.load(q_row + h * sq_h, mask=rmask[:, None], other=0.0)
            wh = tl.load(w_row + h * sw_h, mask=rmask, other=0.0).to(tl.float32)
            if UPCAST:
                qh = qh.to(tl.float32)
            if IEEE:
                x = tl.dot(qh, kt, input_precision="ieee")
            else:
                x = tl.dot(qh, kt)
            if USE_RELU:
                x = tl.maximum(x, 0.0, propagate_nan=tl.PropagateNan.ALL)  # as torch.relu: NaN stays
            acc += x * wh[:, None]
        if KEY_SCALE:  # e4m3 keys: the per-key scale (> 0) commutes with ReLU and the head sum
            ks = tl.load(ks_ptr + b * sks_b + s, mask=smask, other=0.0).to(tl.float32)
            acc = acc * ks[None, :]
        valid = (s[None, :] >= st[:, None]) & (s[None, :] < en[:, None])
        acc = tl.where(valid, acc, float("-inf"))
        o = out_ptr + b * so_b + r[:, None].to(tl.int64) * so_r + s[None, :]
        tl.store(o, acc, mask=rmask[:, None] & smask[None, :])


# --------------------------------------------------------------------------------------------
# select kernel (radix select on the fp32 bit pattern)
# --------------------------------------------------------------------------------------------


@triton.jit
def _ordered_key(x):
    """Order-preserving uint32 image of fp32 (``-0.0`` folded onto ``+0.0``)."""
    bits = x.to(tl.int32, bitcast=True)
    bits = tl.where(x == 0.0, 0, bits)
    flip = (bits >> 31) | (-2147483647 - 1)
    return (bits ^ flip).to(tl.uint32, bitcast=True)


@triton.jit
def _radix_level(row_ptr, L, prefix, pshift, k_rem,
                 SHIFT: tl.constexpr, NB: tl.constexpr, FIRST: tl.constexpr,
                 BLOCK: tl.constexpr):
    """Histogram of bits [SHIFT, SHIFT+log2(NB)) among keys whose bits above match ``prefix``.

    Returns (bucket holding the k_rem-th largest, count above that bucket, count in it).
    """
    hist = tl.zeros([NB], dtype=tl.int32)
    for off in range(0, L, BLOCK):
        j = off + tl.arange(0, BLOCK)
        m = j < L
        x = tl.load(row_ptr + j, mask=m, other=0.0)
        key = _ordered_key(x)
        if FIRST:
            match = m
        else:
            match = m & ((key >> pshift) == prefix)
        bins = ((key >> SHIFT) & (NB - 1)).to(tl.int32)
        hist += tl.histogram(bins, NB, mask=match)
    return _pick_bucket(hist, k_rem, NB)


@triton.jit
def _radix_select_full(row_ptr, L, idx_row, val_row, id0, K, BLOCK: tl.constexpr):
    """Exact top-K of the whole row (ties: lowest index) without scratch: up to four 8-bit
    histogram passes, then one compaction pass in key order."""
    # radix select on 8-bit digits (256-bin histograms are cheap in Triton: the cost of
    # tl.histogram grows with bins / 32 per warp); stop once the boundary bucket holds
    # exactly the missing count
    k_rem = K
    b0, above, in_b = _radix_level(row_ptr, L, 0, 0, k_rem, 24, 256, True, BLOCK)
    prefix = b0.to(tl.uint32)
    shift = 24
    k_rem -= above
    if in_b != k_rem:
        b1, above, in_b = _radix_level(row_ptr, L, prefix, 24, k_rem, 16, 256, False, BLOCK)
        prefix = (prefix << 8) | b1.to(tl.uint32)
        shift = 16
        k_rem -= above
        if in_b != k_rem:
            b2, above, in_b = _radix_level(row_ptr, L, prefix, 16, k_rem, 8, 256, False,
                                           BLOCK)
            prefix = (prefix << 8) | b2.to(tl.uint32)
            shift = 8
            k_rem -= above
            if in_b != k_rem:
                b3, above, in_b = _radix_level(row_ptr, L, prefix, 8, k_rem, 0, 256, False,
                                               BLOCK)
                prefix = (prefix << 8) | b3.to(tl.uint32)
                shift = 0
                k_rem -= above
    # compaction in key order: keys above the threshold + the first k_rem equal to it
    cnt = 0
    eqc = 0
    for off in range(0, L, BLOCK):
        j = off + tl.arange(0, BLOCK)
        m = j < L
        x = tl.load(row_ptr + j, mask=m, other=0.0)
        kp = _ordered_key(x) >> shift
        gt = m & (kp > prefix)
        eq = m & (kp == prefix)
        eq_i = eq.to(tl.int32)
        eq_rank = eqc + tl.cumsum(eq_i, 0) - eq_i
        sel = gt | (eq & (eq_rank < k_rem))
        s_i = sel.to(tl.int32)
        pos = cnt + tl.cumsum(s_i, 0) - s_i
        tl.store(idx_row + pos, id0 + j, mask=sel)
        tl.store(val_row + pos, x, mask=sel)
        cnt += tl.sum(s_i, 0)
        eqc += tl.sum(eq_i, 0)


@triton.jit
def _pick_bucket(hist, k_rem, NB: tl.constexpr):
    """Bucket holding the k_rem-th largest key, the count above it and the count in it."""
    total = tl.sum(hist, 0)
    ge = total - tl.cumsum(hist, 0) + hist  # keys in buckets >= b
    bsel = tl.sum((ge >= k_rem).to(tl.int32), 0) - 1
    ar = tl.arange(0, NB)
    in_b = tl.sum(tl.where(ar == bsel, hist, 0), 0)
    ge_b = tl.sum(tl.where(ar == bsel, ge, 0), 0)
    return bsel, ge_b - in_b, in_b


@triton.jit
def _compact_pass(row_ptr, scr_ptr, n, idx_row, val_row, id0, cnt, bsel, k_rem, final,
                  FROM_SCRATCH: tl.constexpr, SHIFT: tl.constexpr, NEXT_SHIFT: tl.constexpr,
                  LAST: tl.constexpr, BLOCK: tl.constexpr):
    """One pass over the current candidates (the whole row, or the index list in scratch).

    Keys whose digit at SHIFT is above ``bsel`` go to the output; keys in the bucket go to the
    output too when the bucket is final (first ``k_rem`` in key order), else to the scratch
    list (stable, in place) while the next digit's histogram is accumulated.
    """
    hist = tl.zeros([256], dtype=tl.int32)
    eqc = 0
    nc = 0
    for off in range(0, n, BLOCK):
        c = off + tl.arange(0, BLOCK)
        m = c < n
        if FROM_SCRATCH:
            j = tl.load(scr_ptr + c, mask=m, other=0)
        else:
            j = c
        x = tl.load(row_ptr + j, mask=m, other=0.0)
        key = _ordered_key(x)
        dig = ((key >> SHIFT) & 255).to(tl.int32)
        gt = m & (dig > bsel)
        eq = m & (dig == bsel)
        eq_i = eq.to(tl.int32)
        eq_rank = eqc + tl.cumsum(eq_i, 0) - eq_i
        if LAST:
            take_eq = eq & (eq_rank < k_rem)
        else:
            take_eq = eq & (final != 0)
        sel = gt | take_eq
        s_i = sel.to(tl.int32)
        pos = cnt + tl.cumsum(s_i, 0) - s_i
        tl.store(idx_row + pos, id0 + j, mask=sel)
        tl.store(val_row + pos, x, mask=sel)
        cnt += tl.sum(s_i, 0)
        eqc += tl.sum(eq_i, 0)
        if not LAST:
            cand = eq & (final == 0)
            c_i = cand.to(tl.int32)
            cpos = nc + tl.cumsum(c_i, 0) - c_i
            tl.store(scr_ptr + cpos, j, mask=cand)
            nc += tl.sum(c_i, 0)
            hist += tl.histogram(((key >> NEXT_SHIFT) & 255).to(tl.int32), 256, mask=cand)
    return cnt, hist


@triton.jit
def _sample_level(row_ptr, Ls, prefix, k_rem, STRIDE: tl.constexpr, SHIFT: tl.constexpr,
                  FIRST: tl.constexpr, BLOCK: tl.constexpr):
    """256-bin histogram of one key digit over the strided sample row_ptr[0::STRIDE]."""
    hist = tl.zeros([256], dtype=tl.int32)
    for off in range(0, Ls, BLOCK):
        j = off + tl.arange(0, BLOCK)
        m = j < Ls
        key = _ordered_key(tl.load(row_ptr + j * STRIDE, mask=m, other=0.0))
        if FIRST:
            match = m
        else:
            match = m & ((key >> (SHIFT + 8)) == prefix)
        hist += tl.histogram(((key >> SHIFT) & 255).to(tl.int32), 256, mask=match)
    return _pick_bucket(hist, k_rem, 256)


@triton.jit
def _exact_from_list(row_ptr, scr_row, n0, idx_row, val_row, id0, K, BLOCK: tl.constexpr):
    """Exact top-K (ties: lowest index) among the ``n0 >= K`` ids listed in scratch (in key
    order), by 8-bit radix levels with in-place compaction of the boundary bucket."""
    hist = tl.zeros([256], dtype=tl.int32)
    for off in range(0, n0, BLOCK):
        c = off + tl.arange(0, BLOCK)
        m = c < n0
        j = tl.load(scr_row + c, mask=m, other=0)
        key = _ordered_key(tl.load(row_ptr + j, mask=m, other=0.0))
        hist += tl.histogram(((key >> 24) & 255).to(tl.int32), 256, mask=m)
    bsel, above, in_b = _pick_bucket(hist, K, 256)
    k_rem = K - above
    final = (in_b == k_rem).to(tl.int32)
    cnt = tl.zeros([], dtype=tl.int32)
    cnt, hist = _compact_pass(row_ptr, scr_row, n0, idx_row, val_row, id0, cnt, bsel, k_rem,
                              final, True, 24, 16, False, BLOCK)
    if final == 0:
        n = in_b
        bsel, above, in_b = _pick_bucket(hist, k_rem, 256)
        k_rem -= above
        final = (in_b == k_rem).to(tl.int32)
        cnt, hist = _compact_pass(row_ptr, scr_row, n, idx_row, val_row, id0, cnt, bsel,
                                  k_rem, final, True, 16, 8, False, BLOCK)
        if final == 0:
            n = in_b
            bsel, above, in_b = _pick_bucket(hist, k_rem, 256)
            k_rem -= above
            final = (in_b == k_rem).to(tl.int32)
            cnt, hist = _compact_pass(row_ptr, scr_row, n, idx_row, val_row, id0, cnt,
                                      bsel, k_rem, final, True, 8, 0, False, BLOCK)
            if final == 0:
                n = in_b
                bsel, above, in_b = _pick_bucket(hist, k_rem, 256)
                k_rem -= above
                cnt, hist = _compact_pass(row_ptr, scr_row, n, idx_row, val_row, id0, cnt,
                                          bsel, k_rem, 1, True, 0, 0, True, BLOCK)


@triton.jit
def _select_kernel(
    buf_ptr, scr_ptr, st_ptr, en_ptr, idx_ptr, val_ptr,
    row0, T, S, K, CAP,
    sse_b, sse_t,
    sb_b, sb_r,
    so_b, so_t,
    sc_b, sc_r,
    CAUSAL: tl.constexpr, GLOBAL_IDS: tl.constexpr, BLOCK: tl.constexpr, STRIDE: tl.constexpr,
):
    """Sampled pre-filter + exact radix select.

    1. On the strided sample row[0::STRIDE], find (16-bit key resolution) a value ``tau`` with
       at least ``K/STRIDE + 4 sqrt(K/STRIDE) + 16`` sample keys at or above it.
    2. One pass over the row lists the ids with key >= tau (in key order) in scratch (room for
       CAP ids per row, CAP >= K).
    3. If K..CAP ids were listed, the exact top-K lies among them: radix select on the list.
       Otherwise (an unlucky sample, or more than CAP keys tied around tau) an exact radix
       select over the whole row (no scratch) decides.
    Selected ids are not sorted.
    """
    r = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    t = row0 + r
    if CAUSAL:
        st = 0
        en = tl.minimum(t + 1, S)
    else:
        st = tl.load(st_ptr + b * sse_b + t * sse_t).to(tl.int32)
        en = tl.load(en_ptr + b * sse_b + t * sse_t).to(tl.int32)
        st = tl.maximum(st, 0)
        en = tl.minimum(en, S)
    L = tl.maximum(en - st, 0)
    row_ptr = buf_ptr + b * sb_b + r.to(tl.int64) * sb_r + st
    scr_row = scr_ptr + b * sc_b + r.to(tl.int64) * sc_r
    idx_row = idx_ptr + b * so_b + t.to(tl.int64) * so_t
    val_row = val_ptr + b * so_b + t.to(tl.int64) * so_t
    if GLOBAL_IDS:
        id0 = st + b.to(tl.int32) * S
    else:
        id0 = st
    if L <= K:
        for off in range(0, K, BLOCK):
            j = off + tl.arange(0, BLOCK)
            m = j < K
            v = j < L
            x = tl.load(row_ptr + j, mask=v, other=float("-inf"))
            tl.store(idx_row + j, tl.where(v, id0 + j, -1), mask=m)
            tl.store(val_row + j, x, mask=m)
    else:
        ks0 = K // STRIDE
        ks0 = ks0 + 4 * tl.sqrt(ks0.to(tl.float32)).to(tl.int32) + 16
        Ls = (L + STRIDE - 1) // STRIDE  # strided reads of the row
        ks = tl.minimum(ks0, Ls)
        b0, above, in_b = _sample_level(row_ptr, Ls, 0, ks, STRIDE, 24, True, BLOCK)
        b1, above1, in_b1 = _sample_level(row_ptr, Ls, b0.to(tl.uint32), ks - above, STRIDE,
                                          16, False, BLOCK)
        tau = ((b0.to(tl.uint32) << 8) | b1.to(tl.uint32)) << 16
        n0 = 0
        for off in range(0, L, BLOCK):
            j = off + tl.arange(0, BLOCK)
            m = j < L
            key = _ordered_key(tl.load(row_ptr + j, mask=m, other=0.0))
            cand = m & (key >= tau)
            c_i = cand.to(tl.int32)
            pos = n0 + tl.cumsum(c_i, 0) - c_i
            tl.store(scr_row + pos, j, mask=cand & (pos < CAP))
            n0 += tl.sum(c_i, 0)
        if (n0 < K) | (n0 > CAP):
            _radix_select_full(row_ptr, L, idx_row, val_row, id0, K, BLOCK)
        else:
            _exact_from_list(row_ptr, scr_row, n0, idx_row, val_row, id0, K, BLOCK)


# --------------------------------------------------------------------------------------------
# host side
# --------------------------------------------------------------------------------------------

# (BLOCK_T, BLOCK_S, num_warps, num_stages[, maxnreg or 0]) for the score kernel, per operand
# precision ("fp8": e4m3 q / k, half the shared memory per stage; capped at 168 registers, two
# programs per SM: 15.3 against 16.3 ms uncapped at S = 32K on H100, where 64x256 and 128x128
# tiles with 8 warps took 18.0 / 18.2 ms); select (BLOCK, num_warps); the select's threshold
# sample reads every SAMPLE_STRIDE-th score. Measured on H100.
_SCORE_CFG_GPU = {"bf16": (64, 128, 4, 3), "fp8": (64, 128, 4, 3, 168)}
_SELECT_CFG_GPU = (512, 4)  # (1024, 4) above S = 64K
_SCORE_CFG_INTERP = (16, 32, 4, 1)
_SELECT_CFG_INTERP = (128, 4)
SAMPLE_STRIDE = 8


class ScoreCfg(NamedTuple):
    """A score-kernel config: the tuples above (and a sweep's), fields named; ``maxnreg`` 0: no
    register cap."""

    block_t: int
    block_s: int
    warps: int
    stages: int
    maxnreg: int = 0


def _score_cfg(fp8: bool = False) -> ScoreCfg:
    return ScoreCfg(*(_SCORE_CFG_INTERP if interpreting() else _SCORE_CFG_GPU["fp8" if fp8 else "bf16"]))


def _select_cfg(S: int):
    if interpreting():
        return _SELECT_CFG_INTERP
    return (1024, 4) if S > 65536 else _SELECT_CFG_GPU


_NO_WINDOWS: dict = {}  # device -> int32 [1, 1]: the window arguments of a causal call (never read)


def _prep(q, k, w, starts, ends):
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1:
        k = k.contiguous()
    causal = starts is None or ends is None
    if causal:  # (one tensor per device, not an allocation and a fill per call)
        starts = ends = _NO_WINDOWS.get(q.device)
        if starts is None:
            starts = ends = _NO_WINDOWS[q.device] = torch.zeros(1, 1, dtype=torch.int32, device=q.device)
    return q, k, w, starts, ends, causal


def _chunk_rows(B, T, row_bytes, block_t, chunk_bytes):
    rows = max(block_t, (chunk_bytes // max(1, B * row_bytes)) // block_t * block_t)
    return min(rows, triton.cdiv(T, block_t) * block_t)


_SCRATCH_PER_TOPK = 4
_SCRATCH_MIN = 1024


def _plan(B, T, S, topk, block_t, chunk_bytes, scratch=True):
    """(rows per chunk, scratch ids per row): the fp32 score rows and the int32 candidate list
    (expected ~1.3 topk candidates, room for 4 topk; more fall back to a scratch-free select)
    within chunk_bytes. ``scratch=False``: the CUDA select, which needs no candidate list."""
    cap = scratch_cap(S, topk) if scratch else 0
    return _chunk_rows(B, T, 4 * (S + cap), block_t, chunk_bytes), cap


def scratch_cap(S, topk):
    """Candidate ids per row the select's scratch holds."""
    return min(S, max(_SCRATCH_PER_TOPK * topk, _SCRATCH_MIN))


def _launch_scores(q, k, w, starts, ends, causal, use_relu, buf, row0, n_rows, cfg, k_scale=None):
    """Masked scores of rows [row0, row0 + n_rows) into ``buf`` (``k_scale [B, S]``: per-key
    scales of e4m3 keys, applied after the head sum)."""
    B, T, H, D = q.shape
    S = k.shape[1]
    c = ScoreCfg(*cfg)
    limits = {"maxnreg": c.maxnreg} if c.maxnreg else {}  # a register cap, for more programs per SM
    n_s = triton.cdiv(min(S, row0 + n_rows) if causal else S, c.block_s)
    grid = (n_s, triton.cdiv(n_rows, c.block_t), B)
    ks = k_scale if k_scale is not None else buf
    desc = _q_descriptor(q, c.block_t)
    _score_kernel[grid](
        q if desc is None else desc, q, k, w, starts, ends, buf, ks,
        row0, n_rows, T, S,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1),
        w.stride(0), w.stride(1), w.stride(2),
        starts.stride(0), starts.stride(1),
        buf.stride(0), buf.stride(1),
        ks.stride(0),
        H=H, D=D, BLOCK_T=c.block_t, BLOCK_S=c.block_s, CAUSAL=causal, USE_RELU=use_relu,
        UPCAST=interpreting() or q.dtype == torch.float64, IEEE=(q.dtype in (torch.float32, torch.float64)),
        KEY_SCALE=k_scale is not None, Q_TMA=desc is not None, num_warps=c.warps, num_stages=c.stages, **limits,
    )


def _q_descriptor(q, block_t):
    """A TMA descriptor of ``q [B, T, H, D]`` as ``[B T, H D]`` with ``[block_t, D]`` boxes, or
    ``None`` (q by pointer loads): q must be contiguous, 16-byte aligned, on a Hopper or newer GPU
    (the interpreter emulates the descriptor, so the CPU tests run this path too)."""
    if TensorDescriptor is None or not q.is_contiguous() or q.data_ptr() % 16:
        return None
    if not interpreting() and not (q.is_cuda and cuda_capability(q.device)[0] >= 9):
        return None
    B, T, H, D = q.shape
    if (H * D * q.element_size()) % 16 or D * q.element_size() < 16 or B * T >= 2**31:
        return None
    return TensorDescriptor(q, [B * T, H * D], [H * D, 1], [block_t, D])


def indexer_scores_triton(q, k, w, starts=None, ends=None, use_relu=True, k_scale=None):
    """Dense masked scores ``[B, T, S]`` fp32 (testing/diagnostics only: O(T*S) memory).
    ``k_scale``: as in :func:`indexer_topk_triton`."""
    q, k, w, starts, ends, causal = _prep(q, k, w, starts, ends)
    B, T, H, D = q.shape
    S = k.shape[1]
    buf = torch.full((B, T, S), float("-inf"), dtype=torch.float32, device=q.device)
    _launch_scores(q, k, w, starts, ends, causal, use_relu, buf, 0, T, _score_cfg(k_scale is not None), k_scale)
    return buf


def indexer_topk_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    w: torch.Tensor,
    topk: int,
    starts: Optional[torch.Tensor] = None,
    ends: Optional[torch.Tensor] = None,
    use_relu: bool = True,
    global_ids: bool = False,
    chunk_bytes: Optional[int] = None,
    out: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
    k_scale: Optional[torch.Tensor] = None,
    select_kernel: str = "triton",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Top-k key ids ``int32 [B, T, topk]`` (unsorted, ``-1`` padded) and their fp32 scores.

    ``chunk_bytes`` bounds the fp32 score buffer (default ``DEFAULT_CHUNK_BYTES``); ``out`` optionally gives the two output
    tensors (contiguous int32 / fp32 ``[B, T, topk]``), every element of which is written.
    ``k_scale`` (fp32 ``[B, S]``, positive): q and k are e4m3 and the scores are multiplied by
    the per-key scale (the per-query scales come folded into ``w``; see ``fp8.py``).
    ``select_kernel``: ``"triton"`` or ``"cuda"`` (``cuda_impl.select_cuda``: sm_90, topk <=
    ``cuda_impl.MAX_TOPK``); both give the same sets.
    """
    if select_kernel not in ("triton", "cuda"):
        raise ValueError(f"select_kernel must be 'triton' or 'cuda', got {select_kernel!r}")
    q, k, w, starts, ends, causal = _prep(q, k, w, starts, ends)
    B, T, H, D = q.shape
    S = k.shape[1]
    if D & (D - 1) or D < 16:
        raise ValueError(f"indexer_topk_triton needs a power-of-two head dim >= 16, got {D}")
    scfg = _score_cfg(k_scale is not None)
    blk, nw_sel = _select_cfg(S)
    if out is None:
        idx = torch.empty(B, T, topk, dtype=torch.int32, device=q.device)
        vals = torch.empty(B, T, topk, dtype=torch.float32, device=q.device)
    else:
        idx, vals = out
        if idx.shape != (B, T, topk) or vals.shape != (B, T, topk) or not (
                idx.is_contiguous() and vals.is_contiguous()):
            raise ValueError("out must be two contiguous [B, T, topk] tensors")
    if T == 0 or B == 0:
        return idx, vals
    S_alloc = max(S, 1)
    chunk_bytes = DEFAULT_CHUNK_BYTES if chunk_bytes is None else chunk_bytes
    if select_kernel == "cuda":  # the CUDA select's int32 windows, once for every chunk
        from .cuda_impl import int32_windows

        starts, ends = int32_windows(starts, ends)
    # (Serial chunks: overlapping a chunk's select with the next chunk's scores was measured no
    # faster, docs/kernels_indexer.md section 2.2b.)
    rows, cap = _plan(B, T, S_alloc, topk, scfg.block_t, chunk_bytes, scratch=select_kernel == "triton")
    buf = torch.empty(B, rows, S_alloc, dtype=torch.float32, device=q.device)
    # (the CUDA select keeps its candidates in shared memory: no scratch)
    scr = None if select_kernel == "cuda" else torch.empty(B, rows, cap, dtype=torch.int32, device=q.device)
    for row0 in range(0, T, rows):
        n = min(rows, T - row0)
        if S > 0:
            _launch_scores(q, k, w, starts, ends, causal, use_relu, buf, row0, n, scfg, k_scale)
        launch_select(buf, scr, starts, ends, idx, vals, row0, n, S, causal, global_ids, (blk, nw_sel),
                      kernel=select_kernel)
    return idx, vals


def launch_select(buf, scr, starts, ends, idx, vals, row0, n_rows, S, causal, global_ids, cfg,
                  stride=SAMPLE_STRIDE, kernel="triton"):
    """Top-k of rows ``[row0, row0 + n_rows)`` over ``S`` keys from their scores in
    ``buf [B, >= n_rows, >= S]`` into ``idx`` / ``vals [B, T, topk]`` (``scr [B, >= n_rows, cap]``:
    candidate scratch).
    ``cfg``: (BLOCK, num_warps); ``stride``: the threshold sample's stride; ``kernel="cuda"``:
    the CUDA select instead (``cuda_impl.select_cuda``), which takes neither, nor the scratch."""
    if kernel == "cuda":
        from .cuda_impl import select_cuda

        select_cuda(buf, starts, ends, idx, vals, row0, n_rows, S, causal, global_ids)
        return
    B, T, topk = idx.shape
    _select_kernel[(n_rows, B)](
        buf, scr, starts, ends, idx, vals, row0, T, S, topk, scr.shape[-1],
        starts.stride(0), starts.stride(1),
        buf.stride(0), buf.stride(1),
        idx.stride(0), idx.stride(1),
        scr.stride(0), scr.stride(1),
        CAUSAL=causal, GLOBAL_IDS=global_ids, BLOCK=cfg[0], STRIDE=stride, num_warps=cfg[1],
    )
