"""Fused Triton sparse MLA attention (absorbed layout), forward and backward.

Layout (see ``reference.py`` for the math):
  q [T, H, Dqk], kv [Tk, Dqk] (V = kv[:, :d_v]), indices [T, K] (-1 = empty slot),
  topk_length [T] optional, sink [H] fp32 optional.
  Returns out [T, H, d_v] (q's dtype) and lse fp32 [T, H] (natural log, sink not included).

Kernel shape
------------
One program per (query row t, block of BH heads). The query tile ``[BH, Dqk]`` is loaded once;
the program walks the row's selected ids in blocks of BN=64 slots, gathers the kv rows
``[BN, Dqk]`` (each gathered row serves every head of the block: that is the reuse) and does
``S = Q K^T`` -> online softmax (exp2 domain) -> ``acc += P V``. The channel dimension is split
into four equal "value" chunks (``DC = d_v / 4``, 128 on the 576/512 fast path) plus a "tail"
chunk (the rope channels, ``Dqk - d_v``, 64 on the fast path), so every dot has power-of-two
shapes and the accumulators stay in separate register tiles.

Padding rules (no host copies, no host syncs)
---------------------------------------------
* Heads: any H >= 1. Heads are padded to the tile (BH in {16, 32, 64}) by masking inside the
  kernel; padded heads load zeros and are never stored.
* K (slots): any K. The last block of slots is masked (``slot < K``) which is exactly the same
  as padding the row with ``-1`` up to the next multiple of 64. Slots at or beyond
  ``topk_length[t]`` are skipped (the loop stops at ``min(K, topk_length[t])``).
* Ids outside ``[0, Tk)`` (``-1`` padding, or garbage) are empty slots, as in the reference.
  Duplicate ids in one row count once per slot (same rule as the reference).
* Channels: any ``0 < d_v <= Dqk``; chunks are padded to powers of two (>= 16) with masks.

Backward
--------
Same program grid. The program recomputes ``P = exp(S - logZ)`` from the saved lse (and the
sink), ``dP = dO V^T``, ``dS = P (dP - Delta)`` with ``Delta = rowsum(dO * O)`` computed in the
kernel, accumulates ``dq = scale * dS K`` in registers (each program owns its dq rows, no
atomics) and scatters ``dkv[id] += scale * dS^T Q + P^T dO`` (the latter on the first d_v
channels) with fp32 atomics into an fp32 workspace that is cast to kv's dtype at the end.
``d_sink[h] = -sum_t exp(sink_h - logZ_th) * Delta_th`` is written per row and summed.
A gradient for ``lse`` (rarely used) is folded into Delta.

Default non-deterministic path (``CONFIG["bwd_rows"]``, H <= 128): a small kernel saves logZ and
Delta per (row, head) (and the d_sink terms); then one program per (query row, block of BN=128
slots) covers ALL heads: S and dP as [HP, BN] tiles with the channels streamed in 64-wide
chunks, then per 64-channel chunk ``dkv += dS^T Q + P^T dO`` and ``dq += dS K`` by fp32 atomics
(dq into a [T, H, Dqk] fp32 workspace). Each (row, slot, channel) is added to dkv once and no
FLOP is recomputed. The per-head-block kernel above is kept for H > 128, for
``bwd_rows = 0`` and for the deterministic mode.

Deterministic mode (``deterministic=True``, or env ``MEGATRON_DSA_DETERMINISTIC=1``, or
``torch.are_deterministic_algorithms_enabled()``): no atomics. Query rows are processed in
fixed-size chunks; each program writes its per-(row, head block, slot) dkv contribution into an
fp32 workspace, the chunk's ids are stably sorted, and a reduction kernel (one program per kv
row) sums its contributions in sorted (= row, head block, slot) order and adds them to the fp32
accumulator. Results are bit-identical between runs; it is slower (extra workspace traffic).
"""

from __future__ import annotations

import math
import os
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .cuda_impl import cuda_bwd_eligible, cuda_fwd_eligible, sparse_mla_bwd_cuda, sparse_mla_fwd_cuda

__all__ = ["sparse_mla_triton", "sparse_mla_fwd", "sparse_mla_fwd_triton", "sparse_mla_bwd", "sparse_mla_bwd_triton"]

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
BLOCK_N = 64
# Deterministic backward: bytes of fp32 contribution workspace per query chunk.
DETERMINISTIC_WS_BYTES = 1 << 30

# Launch configuration; the benchmark may override entries (tuning only).
CONFIG = {
    # forward: BH=64 tile (H > 32) / small tiles (BH = 16 or 32)
    "fwd_warps_64": 8,
    "fwd_warps_small": 4,
    "fwd_stages_64": 1,
    "fwd_stages_small": 2,
    "fwd_block_n": BLOCK_N,
    # backward
    "bwd_block_h": 64,
    "bwd_warps_64": 8,       # dkv pass (or the fused pass when bwd_split_64 = 0)
    "bwd_dq_warps_64": 8,    # dq pass when split
    "bwd_warps_small": 8,
    "bwd_stages": 1,
    "bwd_block_n_64": BLOCK_N,
    "bwd_block_n_small": 32,
    "bwd_split_64": 1,       # BH=64: separate dq and dkv passes (fewer registers, no spills)
    "bwd_skip_dkv": 0,  # diagnostic only: drop the dkv scatter (wrong dkv!) to time its cost
    # all-heads pass (non-deterministic): one program per (query row, block of slots) covering
    # every head, so each (row, slot, channel) is added to the fp32 dkv workspace once. Used when
    # bwd_rows_min_h <= H <= 128 (bwd_rows = 0 disables it). H100, S=16K, k=2048 (bwd ms):
    # H=128 287 -> 93, H=64 145 -> 70, H=32 64 -> 43, H=16 51 -> 37 (with bwd_rows_dq = 1).
    "bwd_rows": 1,
    "bwd_rows_min_h": 1,
    "bwd_rows_block_n": 128,
    "bwd_rows_block_c": 64,
    "bwd_rows_warps": 8,
    "bwd_rows_warps_small": 4,  # HP <= 32
    "bwd_rows_stages": 2,
    # 1: no dq pass; the all-heads pass also adds dq = dS K by fp32 atomics into a [T, H, Dqk]
    # fp32 workspace (a small kernel computes logZ / Delta / d_sink first). 0: a dq pass (the old
    # BH-head kernel, no atomics) also writes logZ / Delta; H=128: 128 ms instead of 93.
    "bwd_rows_dq": 1,
}
# The last compiled kernel of each kind (for the benchmark's resource report).
LAST_KERNELS = {}


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


@triton.jit
def _ld(base, rows, row_mask, row_stride, col0, NCOL: tl.constexpr, COL_LIM, MASK_COLS: tl.constexpr):
    cols = col0 + tl.arange(0, NCOL)
    ptrs = base + rows[:, None] * row_stride + cols[None, :]
    if MASK_COLS:
        m = row_mask[:, None] & (cols[None, :] < COL_LIM)
    else:
        m = row_mask[:, None]
    return tl.load(ptrs, mask=m, other=0.0)


@triton.jit
def _st(base, rows, row_mask, row_stride, col0, NCOL: tl.constexpr, COL_LIM, MASK_COLS: tl.constexpr, val):
    cols = col0 + tl.arange(0, NCOL)
    ptrs = base + rows[:, None] * row_stride + cols[None, :]
    if MASK_COLS:
        m = row_mask[:, None] & (cols[None, :] < COL_LIM)
    else:
        m = row_mask[:, None]
    tl.store(ptrs, val, mask=m)


@triton.jit
def _atomic(base, rows, row_mask, row_stride, col0, NCOL: tl.constexpr, COL_LIM, MASK_COLS: tl.constexpr, val):
    cols = col0 + tl.arange(0, NCOL)
    ptrs = base + rows[:, None] * row_stride + cols[None, :]
    if MASK_COLS:
        m = row_mask[:, None] & (cols[None, :] < COL_LIM)
    else:
        m = row_mask[:, None]
    tl.atomic_add(ptrs, val, mask=m, sem="relaxed")


@triton.jit
def _mm(a, b, acc, UPCAST: tl.constexpr, PREC: tl.constexpr):
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PREC)


# --------------------------------------------------------------------------------------------
# forward
# --------------------------------------------------------------------------------------------


@triton.jit
def _sparse_mla_fwd_kernel(
    Q, KV, IDX, TOPK, SINK, OUT, LSE,
    sq_t, sq_h, s_kv, s_it, so_t, so_h,
    H, Tk, K, scale_log2,
    D_V: tl.constexpr, D_QK: tl.constexpr, DC: tl.constexpr, DT: tl.constexpr,
    BH: tl.constexpr, BN: tl.constexpr,
    HAS_TOPK: tl.constexpr, HAS_SINK: tl.constexpr, HAS_TAIL: tl.constexpr,
    MASK_V: tl.constexpr, MASK_T: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    hb = tl.program_id(1)
    offs_h = hb * BH + tl.arange(0, BH)
    hmask = offs_h < H
    qb = Q + t * sq_t
    q0 = _ld(qb, offs_h, hmask, sq_h, 0 * DC, DC, D_V, MASK_V)
    q1 = _ld(qb, offs_h, hmask, sq_h, 1 * DC, DC, D_V, MASK_V)
    q2 = _ld(qb, offs_h, hmask, sq_h, 2 * DC, DC, D_V, MASK_V)
    q3 = _ld(qb, offs_h, hmask, sq_h, 3 * DC, DC, D_V, MASK_V)
    if HAS_TAIL:
        qt = _ld(qb, offs_h, hmask, sq_h, D_V, DT, D_QK, MASK_T)

    kend = K
    if HAS_TOPK:
        kend = tl.minimum(tl.maximum(tl.load(TOPK + t).to(tl.int32), 0), K)

    m_i = tl.full([BH], float("-inf"), tl.float32)
    l_i = tl.zeros([BH], tl.float32)
    acc0 = tl.zeros([BH, DC], tl.float32)
    acc1 = tl.zeros([BH, DC], tl.float32)
    acc2 = tl.zeros([BH, DC], tl.float32)
    acc3 = tl.zeros([BH, DC], tl.float32)
    ib = IDX + t * s_it
    for n0 in range(0, kend, BN):
        offs_n = n0 + tl.arange(0, BN)
        ids = tl.load(ib + offs_n, mask=offs_n < kend, other=-1)
        valid = (ids >= 0) & (ids < Tk)
        rows = tl.where(valid, ids, 0).to(tl.int64)
        k0 = _ld(KV, rows, valid, s_kv, 0 * DC, DC, D_V, MASK_V)
        k1 = _ld(KV, rows, valid, s_kv, 1 * DC, DC, D_V, MASK_V)
        k2 = _ld(KV, rows, valid, s_kv, 2 * DC, DC, D_V, MASK_V)
        k3 = _ld(KV, rows, valid, s_kv, 3 * DC, DC, D_V, MASK_V)
        s = tl.zeros([BH, BN], tl.float32)
        s = _mm(q0, tl.trans(k0), s, UPCAST, PREC)
        s = _mm(q1, tl.trans(k1), s, UPCAST, PREC)
        s = _mm(q2, tl.trans(k2), s, UPCAST, PREC)
        s = _mm(q3, tl.trans(k3), s, UPCAST, PREC)
        if HAS_TAIL:
            kt = _ld(KV, rows, valid, s_kv, D_V, DT, D_QK, MASK_T)
            s = _mm(qt, tl.trans(kt), s, UPCAST, PREC)
        s = tl.where(valid[None, :], s * scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        pc = p.to(k0.dtype)
        acc0 = _mm(pc, k0, acc0 * alpha[:, None], UPCAST, PREC)
        acc1 = _mm(pc, k1, acc1 * alpha[:, None], UPCAST, PREC)
        acc2 = _mm(pc, k2, acc2 * alpha[:, None], UPCAST, PREC)
        acc3 = _mm(pc, k3, acc3 * alpha[:, None], UPCAST, PREC)
        m_i = m_new

    nonempty = l_i > 0.0
    lse2 = tl.where(nonempty, m_i + tl.log2(tl.where(nonempty, l_i, 1.0)), float("-inf"))
    z2 = lse2
    if HAS_SINK:
        sk2 = tl.load(SINK + offs_h, mask=hmask, other=0.0).to(tl.float32) * 1.4426950408889634
        mx = tl.maximum(lse2, sk2)
        mx = tl.where(mx == float("-inf"), 0.0, mx)
        z2 = mx + tl.log2(tl.exp2(lse2 - mx) + tl.exp2(sk2 - mx))
    # out = acc * 2^(m - z2) / 1   (acc already holds sum 2^(s - m) v)
    o_scale = tl.where(nonempty, tl.exp2(tl.where(nonempty, m_i - z2, 0.0)), 0.0)
    ob = OUT + t * so_t
    _st(ob, offs_h, hmask, so_h, 0 * DC, DC, D_V, MASK_V, (acc0 * o_scale[:, None]).to(OUT.dtype.element_ty))
    _st(ob, offs_h, hmask, so_h, 1 * DC, DC, D_V, MASK_V, (acc1 * o_scale[:, None]).to(OUT.dtype.element_ty))
    _st(ob, offs_h, hmask, so_h, 2 * DC, DC, D_V, MASK_V, (acc2 * o_scale[:, None]).to(OUT.dtype.element_ty))
    _st(ob, offs_h, hmask, so_h, 3 * DC, DC, D_V, MASK_V, (acc3 * o_scale[:, None]).to(OUT.dtype.element_ty))
    tl.store(LSE + t * H + offs_h, lse2 * 0.6931471805599453, mask=hmask)


# --------------------------------------------------------------------------------------------
# backward
# --------------------------------------------------------------------------------------------


@triton.jit
def _sparse_mla_bwd_kernel(
    Q, KV, IDX, TOPK, SINK, O, DO, LSE, DLSE, DQ, DKV, DSINK_T, WS, STATS,
    sq_t, sq_h, s_kv, s_it, so_t, so_h, sdo_t, sdo_h, sdq_t, sdq_h,
    H, Tk, K, T0, stats_off, scale, scale_log2,
    D_V: tl.constexpr, D_QK: tl.constexpr, DC: tl.constexpr, DT: tl.constexpr,
    BH: tl.constexpr, BN: tl.constexpr,
    HAS_TOPK: tl.constexpr, HAS_SINK: tl.constexpr, HAS_TAIL: tl.constexpr, HAS_DLSE: tl.constexpr,
    MASK_V: tl.constexpr, MASK_T: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
    DETERMINISTIC: tl.constexpr, SKIP_DKV: tl.constexpr, DO_DQ: tl.constexpr, DO_DKV: tl.constexpr,
    WRITE_STATS: tl.constexpr,
):
    pid_t = tl.program_id(0)
    t = (pid_t + T0).to(tl.int64)
    hb = tl.program_id(1)
    nhb = tl.num_programs(1)
    offs_h = hb * BH + tl.arange(0, BH)
    hmask = offs_h < H

    qb = Q + t * sq_t
    q0 = _ld(qb, offs_h, hmask, sq_h, 0 * DC, DC, D_V, MASK_V)
    q1 = _ld(qb, offs_h, hmask, sq_h, 1 * DC, DC, D_V, MASK_V)
    q2 = _ld(qb, offs_h, hmask, sq_h, 2 * DC, DC, D_V, MASK_V)
    q3 = _ld(qb, offs_h, hmask, sq_h, 3 * DC, DC, D_V, MASK_V)
    if HAS_TAIL:
        qt = _ld(qb, offs_h, hmask, sq_h, D_V, DT, D_QK, MASK_T)
    dob = DO + t * sdo_t
    do0 = _ld(dob, offs_h, hmask, sdo_h, 0 * DC, DC, D_V, MASK_V)
    do1 = _ld(dob, offs_h, hmask, sdo_h, 1 * DC, DC, D_V, MASK_V)
    do2 = _ld(dob, offs_h, hmask, sdo_h, 2 * DC, DC, D_V, MASK_V)
    do3 = _ld(dob, offs_h, hmask, sdo_h, 3 * DC, DC, D_V, MASK_V)
    ob = O + t * so_t
    delta = tl.sum(do0.to(tl.float32) * _ld(ob, offs_h, hmask, so_h, 0 * DC, DC, D_V, MASK_V).to(tl.float32), 1)
    delta += tl.sum(do1.to(tl.float32) * _ld(ob, offs_h, hmask, so_h, 1 * DC, DC, D_V, MASK_V).to(tl.float32), 1)
    delta += tl.sum(do2.to(tl.float32) * _ld(ob, offs_h, hmask, so_h, 2 * DC, DC, D_V, MASK_V).to(tl.float32), 1)
    delta += tl.sum(do3.to(tl.float32) * _ld(ob, offs_h, hmask, so_h, 3 * DC, DC, D_V, MASK_V).to(tl.float32), 1)

    lse2 = tl.load(LSE + t * H + offs_h, mask=hmask, other=float("-inf")) * 1.4426950408889634
    z2 = lse2
    if HAS_SINK:
        sk2 = tl.load(SINK + offs_h, mask=hmask, other=0.0).to(tl.float32) * 1.4426950408889634
        mx = tl.maximum(lse2, sk2)
        mx = tl.where(mx == float("-inf"), 0.0, mx)
        z2 = mx + tl.log2(tl.exp2(lse2 - mx) + tl.exp2(sk2 - mx))
        zfin = z2 > float("-inf")
        dsink = tl.where(zfin & hmask, -tl.exp2(sk2 - tl.where(zfin, z2, 0.0)) * delta, 0.0)
        if DO_DQ:
            tl.store(DSINK_T + t * H + offs_h, dsink, mask=hmask)
    lfin = lse2 > float("-inf")
    z2 = tl.where(lfin, z2, 0.0)
    if HAS_DLSE:
        dl = tl.load(DLSE + t * H + offs_h, mask=hmask, other=0.0).to(tl.float32)
        # d lse / d s_i = exp(s_i - lse) = p_i * exp(logZ - lse)
        delta = delta - tl.where(lfin, dl * tl.exp2(z2 - tl.where(lfin, lse2, 0.0)), 0.0)
    delta = tl.where(hmask, delta, 0.0)
    if WRITE_STATS:
        # for the all-heads dkv pass: log2-domain logZ (0 on empty rows) and the final Delta
        tl.store(STATS + t * H + offs_h, z2, mask=hmask)
        tl.store(STATS + stats_off + t * H + offs_h, delta, mask=hmask)

    kend = K
    if HAS_TOPK:
        kend = tl.minimum(tl.maximum(tl.load(TOPK + t).to(tl.int32), 0), K)

    dq0 = tl.zeros([BH, DC], tl.float32)
    dq1 = tl.zeros([BH, DC], tl.float32)
    dq2 = tl.zeros([BH, DC], tl.float32)
    dq3 = tl.zeros([BH, DC], tl.float32)
    dqt = tl.zeros([BH, DT], tl.float32)
    ib = IDX + t * s_it
    for n0 in range(0, kend, BN):
        offs_n = n0 + tl.arange(0, BN)
        ids = tl.load(ib + offs_n, mask=offs_n < kend, other=-1)
        valid = (ids >= 0) & (ids < Tk)
        rows = tl.where(valid, ids, 0).to(tl.int64)
        k0 = _ld(KV, rows, valid, s_kv, 0 * DC, DC, D_V, MASK_V)
        k1 = _ld(KV, rows, valid, s_kv, 1 * DC, DC, D_V, MASK_V)
        k2 = _ld(KV, rows, valid, s_kv, 2 * DC, DC, D_V, MASK_V)
        k3 = _ld(KV, rows, valid, s_kv, 3 * DC, DC, D_V, MASK_V)
        s = tl.zeros([BH, BN], tl.float32)
        s = _mm(q0, tl.trans(k0), s, UPCAST, PREC)
        s = _mm(q1, tl.trans(k1), s, UPCAST, PREC)
        s = _mm(q2, tl.trans(k2), s, UPCAST, PREC)
        s = _mm(q3, tl.trans(k3), s, UPCAST, PREC)
        if HAS_TAIL:
            kt = _ld(KV, rows, valid, s_kv, D_V, DT, D_QK, MASK_T)
            s = _mm(qt, tl.trans(kt), s, UPCAST, PREC)
        dp = tl.zeros([BH, BN], tl.float32)
        dp = _mm(do0, tl.trans(k0), dp, UPCAST, PREC)
        dp = _mm(do1, tl.trans(k1), dp, UPCAST, PREC)
        dp = _mm(do2, tl.trans(k2), dp, UPCAST, PREC)
        dp = _mm(do3, tl.trans(k3), dp, UPCAST, PREC)
        live = valid[None, :] & hmask[:, None]
        p = tl.where(live, tl.exp2(s * scale_log2 - z2[:, None]), 0.0)
        ds = p * (dp - delta[:, None]) * scale
        dsc = ds.to(k0.dtype)
        if DO_DQ:
            dq0 = _mm(dsc, k0, dq0, UPCAST, PREC)
            dq1 = _mm(dsc, k1, dq1, UPCAST, PREC)
            dq2 = _mm(dsc, k2, dq2, UPCAST, PREC)
            dq3 = _mm(dsc, k3, dq3, UPCAST, PREC)
            if HAS_TAIL:
                dqt = _mm(dsc, kt, dqt, UPCAST, PREC)
        if DO_DKV:
            pc = p.to(k0.dtype)
            dsT = tl.trans(dsc)
            pT = tl.trans(pc)
            g0 = _mm(pT, do0, _mm(dsT, q0, tl.zeros([BN, DC], tl.float32), UPCAST, PREC), UPCAST, PREC)
            g1 = _mm(pT, do1, _mm(dsT, q1, tl.zeros([BN, DC], tl.float32), UPCAST, PREC), UPCAST, PREC)
            g2 = _mm(pT, do2, _mm(dsT, q2, tl.zeros([BN, DC], tl.float32), UPCAST, PREC), UPCAST, PREC)
            g3 = _mm(pT, do3, _mm(dsT, q3, tl.zeros([BN, DC], tl.float32), UPCAST, PREC), UPCAST, PREC)
            if HAS_TAIL:
                gt = _mm(dsT, qt, tl.zeros([BN, DT], tl.float32), UPCAST, PREC)
            if DETERMINISTIC:
                # contribution rows: ((pid_t * nhb + hb) * K + slot); every slot < kend is written
                wrow = (pid_t.to(tl.int64) * nhb + hb) * K + offs_n
                wm = offs_n < kend
                _st(WS, wrow, wm, D_QK, 0 * DC, DC, D_V, MASK_V, g0)
                _st(WS, wrow, wm, D_QK, 1 * DC, DC, D_V, MASK_V, g1)
                _st(WS, wrow, wm, D_QK, 2 * DC, DC, D_V, MASK_V, g2)
                _st(WS, wrow, wm, D_QK, 3 * DC, DC, D_V, MASK_V, g3)
                if HAS_TAIL:
                    _st(WS, wrow, wm, D_QK, D_V, DT, D_QK, MASK_T, gt)
            elif not SKIP_DKV:
                _atomic(DKV, rows, valid, D_QK, 0 * DC, DC, D_V, MASK_V, g0)
                _atomic(DKV, rows, valid, D_QK, 1 * DC, DC, D_V, MASK_V, g1)
                _atomic(DKV, rows, valid, D_QK, 2 * DC, DC, D_V, MASK_V, g2)
                _atomic(DKV, rows, valid, D_QK, 3 * DC, DC, D_V, MASK_V, g3)
                if HAS_TAIL:
                    _atomic(DKV, rows, valid, D_QK, D_V, DT, D_QK, MASK_T, gt)

    if DO_DQ:
        dqb = DQ + t * sdq_t
        _st(dqb, offs_h, hmask, sdq_h, 0 * DC, DC, D_V, MASK_V, dq0.to(DQ.dtype.element_ty))
        _st(dqb, offs_h, hmask, sdq_h, 1 * DC, DC, D_V, MASK_V, dq1.to(DQ.dtype.element_ty))
        _st(dqb, offs_h, hmask, sdq_h, 2 * DC, DC, D_V, MASK_V, dq2.to(DQ.dtype.element_ty))
        _st(dqb, offs_h, hmask, sdq_h, 3 * DC, DC, D_V, MASK_V, dq3.to(DQ.dtype.element_ty))
        if HAS_TAIL:
            _st(dqb, offs_h, hmask, sdq_h, D_V, DT, D_QK, MASK_T, dqt.to(DQ.dtype.element_ty))


@triton.jit
def _ld_chunk(base, rows, row_mask, row_stride, cols, col_mask, MASK_COLS: tl.constexpr):
    ptrs = base + rows[:, None] * row_stride + cols[None, :]
    if MASK_COLS:
        m = row_mask[:, None] & col_mask[None, :]
    else:
        m = row_mask[:, None]
    return tl.load(ptrs, mask=m, other=0.0)


@triton.jit
def _sparse_mla_bwd_dkv_rows_kernel(
    Q, KV, IDX, TOPK, DO, STATS, DKV, DQW, LSE, TGT,
    sq_t, sq_h, s_kv, s_it, sdo_t, sdo_h,
    H, Tk, K, NB, stats_off, scale, scale_log2,
    D_V: tl.constexpr, D_QK: tl.constexpr, HP: tl.constexpr, BN: tl.constexpr, BC: tl.constexpr,
    HAS_TOPK: tl.constexpr, MASK_V: tl.constexpr, MASK_T: tl.constexpr,
    UPCAST: tl.constexpr, PREC: tl.constexpr, DO_DQ: tl.constexpr,
    EMIT_T: tl.constexpr, SINK_T: tl.constexpr,
):
    """dkv pass over ALL heads of one query row and one block of BN slots.

    Phase 1: S = Q K^T and dP = dO V^T for the [HP, BN] tile, channels walked in BC-wide chunks
    (Q / dO / the gathered kv chunk are streamed; nothing [*, Dqk]-sized stays live).
    P and dS come from the logZ / Delta saved by the dq pass.
    EMIT_T: also store ``sum_h exp(s - lse_h)`` per slot into ``TGT [T, K]`` (the indexer loss's
    unnormalised target; lse excludes the sink, so with a sink P is rescaled by exp(logZ - lse)).
    Phase 2: per BC-wide channel chunk, g = dS^T Q (+ P^T dO on value channels), [BN, BC] fp32,
    added once per (slot, channel) to the fp32 workspace.
    Programs of one row are adjacent in the 1-D grid, so the row's Q / dO stay in L2.
    """
    pid = tl.program_id(0)
    t = (pid // NB).to(tl.int64)
    n0 = (pid % NB) * BN
    kend = K
    if HAS_TOPK:
        kend = tl.minimum(tl.maximum(tl.load(TOPK + t).to(tl.int32), 0), K)
    offs_n = n0 + tl.arange(0, BN)
    ids = tl.load(IDX + t * s_it + offs_n, mask=offs_n < kend, other=-1)
    valid = (ids >= 0) & (ids < Tk)
    nvalid = tl.sum(valid.to(tl.int32), 0)
    if nvalid > 0:
        rows = tl.where(valid, ids, 0).to(tl.int64)
        offs_h = tl.arange(0, HP)
        hmask = offs_h < H
        qb = Q + t * sq_t
        dob = DO + t * sdo_t
        s = tl.zeros([HP, BN], tl.float32)
        dp = tl.zeros([HP, BN], tl.float32)
        for c0 in range(0, D_V, BC):
            cols = c0 + tl.arange(0, BC)
            cm = cols < D_V
            qc = _ld_chunk(qb, offs_h, hmask, sq_h, cols, cm, MASK_V)
            doc = _ld_chunk(dob, offs_h, hmask, sdo_h, cols, cm, MASK_V)
            kc = _ld_chunk(KV, rows, valid, s_kv, cols, cm, MASK_V)
            kcT = tl.trans(kc)
            s = _mm(qc, kcT, s, UPCAST, PREC)
            dp = _mm(doc, kcT, dp, UPCAST, PREC)
        for c0 in range(D_V, D_QK, BC):
            cols = c0 + tl.arange(0, BC)
            cm = cols < D_QK
            qc = _ld_chunk(qb, offs_h, hmask, sq_h, cols, cm, MASK_T)
            kc = _ld_chunk(KV, rows, valid, s_kv, cols, cm, MASK_T)
            s = _mm(qc, tl.trans(kc), s, UPCAST, PREC)
        z2 = tl.load(STATS + t * H + offs_h, mask=hmask, other=0.0)
        delta = tl.load(STATS + stats_off + t * H + offs_h, mask=hmask, other=0.0)
        live = valid[None, :] & hmask[:, None]
        p = tl.where(live, tl.exp2(s * scale_log2 - z2[:, None]), 0.0)
        ds = p * (dp - delta[:, None]) * scale
        if EMIT_T:
            if SINK_T:
                l2 = tl.load(LSE + t * H + offs_h, mask=hmask, other=float("-inf")) * 1.4426950408889634
                lf = l2 > float("-inf")
                fh = tl.where(lf, tl.exp2(z2 - tl.where(lf, l2, 0.0)), 0.0)
                tsum = tl.sum(p * fh[:, None], 0)
            else:
                tsum = tl.sum(p, 0)
            tl.store(TGT + t * K + offs_n, tsum, mask=offs_n < K)
        pT = tl.trans(p.to(Q.dtype.element_ty))
        dsc = ds.to(Q.dtype.element_ty)
        dsT = tl.trans(dsc)
        for c0 in range(0, D_V, BC):
            cols = c0 + tl.arange(0, BC)
            cm = cols < D_V
            qc = _ld_chunk(qb, offs_h, hmask, sq_h, cols, cm, MASK_V)
            doc = _ld_chunk(dob, offs_h, hmask, sdo_h, cols, cm, MASK_V)
            g = _mm(dsT, qc, tl.zeros([BN, BC], tl.float32), UPCAST, PREC)
            g = _mm(pT, doc, g, UPCAST, PREC)
            _atomic(DKV, rows, valid, D_QK, c0, BC, D_V, MASK_V, g)
        for c0 in range(D_V, D_QK, BC):
            cols = c0 + tl.arange(0, BC)
            cm = cols < D_QK
            qc = _ld_chunk(qb, offs_h, hmask, sq_h, cols, cm, MASK_T)
            g = _mm(dsT, qc, tl.zeros([BN, BC], tl.float32), UPCAST, PREC)
            _atomic(DKV, rows, valid, D_QK, c0, BC, D_QK, MASK_T, g)
        if DO_DQ:
            # Phase 3 (optional): dq[t] += dS K, fp32 atomics into a [T, H, D_QK] workspace
            dqb = DQW + t * H * D_QK
            for c0 in range(0, D_QK, BC):
                cols = c0 + tl.arange(0, BC)
                cm = cols < D_QK
                kc = _ld_chunk(KV, rows, valid, s_kv, cols, cm, MASK_V or MASK_T)
                gq = _mm(dsc, kc, tl.zeros([HP, BC], tl.float32), UPCAST, PREC)
                _atomic(dqb, offs_h, hmask, D_QK, c0, BC, D_QK, MASK_V or MASK_T, gq)


@triton.jit
def _sparse_mla_bwd_stats_kernel(
    O, DO, LSE, DLSE, SINK, STATS, DSINK_T,
    so_t, so_h, sdo_t, sdo_h, H, stats_off,
    D_V: tl.constexpr, BH: tl.constexpr, BC: tl.constexpr,
    HAS_SINK: tl.constexpr, HAS_DLSE: tl.constexpr,
):
    """Per (row, head): log2-domain logZ, Delta = rowsum(dO * O) (dlse folded in), d_sink terms."""
    t = tl.program_id(0).to(tl.int64)
    offs_h = tl.program_id(1) * BH + tl.arange(0, BH)
    hmask = offs_h < H
    delta = tl.zeros([BH], tl.float32)
    for c0 in range(0, D_V, BC):
        cols = c0 + tl.arange(0, BC)
        cm = cols < D_V
        o = _ld_chunk(O + t * so_t, offs_h, hmask, so_h, cols, cm, True).to(tl.float32)
        do = _ld_chunk(DO + t * sdo_t, offs_h, hmask, sdo_h, cols, cm, True).to(tl.float32)
        delta += tl.sum(o * do, 1)
    lse2 = tl.load(LSE + t * H + offs_h, mask=hmask, other=float("-inf")) * 1.4426950408889634
    z2 = lse2
    if HAS_SINK:
        sk2 = tl.load(SINK + offs_h, mask=hmask, other=0.0).to(tl.float32) * 1.4426950408889634
        mx = tl.maximum(lse2, sk2)
        mx = tl.where(mx == float("-inf"), 0.0, mx)
        z2 = mx + tl.log2(tl.exp2(lse2 - mx) + tl.exp2(sk2 - mx))
        zfin = z2 > float("-inf")
        dsink = tl.where(zfin & hmask, -tl.exp2(sk2 - tl.where(zfin, z2, 0.0)) * delta, 0.0)
        tl.store(DSINK_T + t * H + offs_h, dsink, mask=hmask)
    lfin = lse2 > float("-inf")
    z2 = tl.where(lfin, z2, 0.0)
    if HAS_DLSE:
        dl = tl.load(DLSE + t * H + offs_h, mask=hmask, other=0.0).to(tl.float32)
        delta = delta - tl.where(lfin, dl * tl.exp2(z2 - tl.where(lfin, lse2, 0.0)), 0.0)
    delta = tl.where(hmask, delta, 0.0)
    tl.store(STATS + t * H + offs_h, z2, mask=hmask)
    tl.store(STATS + stats_off + t * H + offs_h, delta, mask=hmask)


@triton.jit
def _segment_reduce_kernel(WS, PERM, STARTS, DKV, D_QK, BD: tl.constexpr, RB: tl.constexpr):
    """dkv[j] += sum of WS[perm[i]] for i in [starts[j], starts[j+1]) in a fixed order."""
    j = tl.program_id(0).to(tl.int64)
    cb = tl.program_id(1)
    cols = cb * BD + tl.arange(0, BD)
    cm = cols < D_QK
    st = tl.load(STARTS + j)
    en = tl.load(STARTS + j + 1)
    acc = tl.zeros([BD], tl.float32)
    for i0 in range(st, en, RB):
        offs = i0 + tl.arange(0, RB)
        om = offs < en
        src = tl.load(PERM + offs, mask=om, other=0).to(tl.int64)
        vals = tl.load(WS + src[:, None] * D_QK + cols[None, :], mask=om[:, None] & cm[None, :], other=0.0)
        acc += tl.sum(vals, 0)
    cur = tl.load(DKV + j * D_QK + cols, mask=cm, other=0.0)
    tl.store(DKV + j * D_QK + cols, cur + acc, mask=cm)


# --------------------------------------------------------------------------------------------
# host side
# --------------------------------------------------------------------------------------------


def _pow2_at_least(x: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(max(1, x)))


def _geometry(Dqk: int, d_v: int):
    DC = _pow2_at_least(-(-d_v // 4))
    tail = Dqk - d_v
    DT = _pow2_at_least(tail)
    return dict(
        D_V=d_v, D_QK=Dqk, DC=DC, DT=DT,
        HAS_TAIL=tail > 0, MASK_V=(4 * DC != d_v), MASK_T=(DT != tail),
    )


def _block_h(H: int, cap: int = 64) -> int:
    return min(cap, _pow2_at_least(H))


def _prec(dtype: torch.dtype) -> dict:
    upcast = _interpreting()
    ieee = upcast or dtype in (torch.float32, torch.float64)
    return dict(UPCAST=upcast, PREC="ieee" if ieee else "tf32")


def sparse_mla_fwd_triton(q, kv, indices, softmax_scale, d_v, topk_length=None, sink=None):
    """Forward only (no autograd): returns ``(out, lse)``."""
    T, H, Dqk = q.shape
    Tk = kv.shape[0]
    K = indices.shape[1]
    q = q.contiguous()
    kv = kv.contiguous()
    indices = indices.contiguous()
    out = torch.empty(T, H, d_v, dtype=q.dtype, device=q.device)
    lse = torch.empty(T, H, dtype=torch.float32, device=q.device)
    if T == 0:
        return out, lse
    BH = _block_h(H)
    geo = _geometry(Dqk, d_v)
    warps = CONFIG["fwd_warps_64"] if BH >= 64 else CONFIG["fwd_warps_small"]
    grid = (T, triton.cdiv(H, BH))
    LAST_KERNELS["fwd"] = _sparse_mla_fwd_kernel[grid](
        q, kv, indices,
        topk_length if topk_length is not None else indices,
        sink if sink is not None else lse,
        out, lse,
        q.stride(0), q.stride(1), kv.stride(0), indices.stride(0), out.stride(0), out.stride(1),
        H, Tk, K, float(softmax_scale) * LOG2E,
        BH=BH, BN=CONFIG["fwd_block_n"],
        HAS_TOPK=topk_length is not None, HAS_SINK=sink is not None,
        **geo, **_prec(q.dtype),
        num_warps=warps, num_stages=CONFIG["fwd_stages_64"] if BH >= 64 else CONFIG["fwd_stages_small"],
    )
    return out, lse


def sparse_mla_fwd(q, kv, indices, softmax_scale, d_v, topk_length=None, sink=None):
    """Forward only (no autograd): an sm_90a CUDA kernel where one applies (bf16, 576/512,
    Hopper, nvcc available), else the Triton kernel. Same contract either way."""
    if cuda_fwd_eligible(q, kv, d_v):
        return sparse_mla_fwd_cuda(q, kv, indices, softmax_scale, topk_length, sink)
    # (the Triton path keeps the caller's topk_length: passing the effective lengths measured
    # slower at 16 heads, S=16K: 7.55 vs 7.13 ms)
    return sparse_mla_fwd_triton(q, kv, indices, softmax_scale, d_v, topk_length, sink)


def _det_default() -> bool:
    env = os.environ.get("MEGATRON_DSA_DETERMINISTIC")
    if env is not None:
        return env not in ("", "0", "false", "False")
    return torch.are_deterministic_algorithms_enabled()


def loss_target_supported(H: int, deterministic: Optional[bool] = None) -> bool:
    """Whether the backward can emit the indexer loss target (the all-heads pass runs);
    ``deterministic=None`` means the process default, as in ``sparse_mla_triton``."""
    if deterministic is None:
        deterministic = _det_default()
    return (not deterministic) and bool(CONFIG["bwd_rows"]) and CONFIG["bwd_rows_min_h"] <= H <= 128


def _bwd_stats_into(stats, dsink_t, out, dout, lse, dlse, sink, d_v):
    """Per (row, head) log2-domain logZ and Delta into ``stats`` ([2 * T * H] fp32), and the
    per-row d_sink terms into ``dsink_t`` ([T, H], with a sink)."""
    T, H = lse.shape
    BHs = min(32, _pow2_at_least(H))
    LAST_KERNELS["bwd_stats"] = _sparse_mla_bwd_stats_kernel[(T, triton.cdiv(H, BHs))](
        out, dout, lse, dlse if dlse is not None else lse, sink if sink is not None else lse,
        stats, dsink_t if dsink_t is not None else lse,
        out.stride(0), out.stride(1), dout.stride(0), dout.stride(1), H, T * H,
        D_V=d_v, BH=BHs, BC=_pow2_at_least(min(d_v, 128)),
        HAS_SINK=sink is not None, HAS_DLSE=dlse is not None, num_warps=4,
    )


def sparse_mla_bwd(
    q, kv, indices, softmax_scale, d_v, topk_length, sink, out, lse, dout, dlse=None,
    deterministic: bool = False, target_out=None,
):
    """Backward dispatch: the sm_90a CUDA kernel where it applies (bf16, Dqk = 576, d_v = 512,
    not deterministic; ``cuda_bwd_eligible``), else the Triton kernels.
    Same contract as :func:`sparse_mla_bwd_triton`."""
    if not cuda_bwd_eligible(q, kv, d_v, deterministic):
        return sparse_mla_bwd_triton(q, kv, indices, softmax_scale, d_v, topk_length, sink, out, lse,
                                     dout, dlse, deterministic=deterministic, target_out=target_out)
    T, H, _ = q.shape
    dout = dout.contiguous()
    if dlse is not None:
        dlse = dlse.contiguous()
    stats = torch.empty(2 * T * H, dtype=torch.float32, device=q.device)
    dsink_t = torch.empty(T, H, dtype=torch.float32, device=q.device) if sink is not None else None
    if T > 0:
        _bwd_stats_into(stats, dsink_t, out, dout, lse, dlse, sink, d_v)
    dq, dkv = sparse_mla_bwd_cuda(q, kv, indices, softmax_scale, topk_length, sink, lse, dout,
                                  stats, target_out, dkv_dtype=kv.dtype)
    d_sink = dsink_t.sum(0).to(sink.dtype) if sink is not None else None
    return dq, dkv, d_sink


def sparse_mla_bwd_triton(
    q, kv, indices, softmax_scale, d_v, topk_length, sink, out, lse, dout, dlse=None,
    deterministic: bool = False, target_out=None,
):
    """Backward: returns ``(dq, dkv, d_sink or None)``.

    ``target_out`` (optional, fp32 ``[T, K]``, zero-filled by the caller): receives
    ``sum_h exp(softmax_scale * q_h . kv_id - lse_h)`` per slot (0 on empty slots), the indexer
    loss's unnormalised target, computed from the P this pass forms anyway. Needs
    ``loss_target_supported(H, deterministic)``.
    """
    T, H, Dqk = q.shape
    Tk = kv.shape[0]
    K = indices.shape[1]
    dev = q.device
    dout = dout.contiguous()
    dq = torch.empty_like(q)
    dkv_acc = torch.zeros(Tk, Dqk, dtype=torch.float32, device=dev)
    dsink_t = torch.empty(T, H, dtype=torch.float32, device=dev) if sink is not None else None
    if T > 0:
        BH = _block_h(H, CONFIG["bwd_block_h"])
        NHB = triton.cdiv(H, BH)
        geo = _geometry(Dqk, d_v)
        big = BH >= 64
        split = big and bool(CONFIG["bwd_split_64"])
        if dlse is not None:
            dlse = dlse.contiguous()
        common = dict(
            BH=BH, BN=CONFIG["bwd_block_n_64"] if big else CONFIG["bwd_block_n_small"],
            SKIP_DKV=bool(CONFIG["bwd_skip_dkv"]),
            HAS_TOPK=topk_length is not None, HAS_SINK=sink is not None,
            HAS_DLSE=dlse is not None, **geo, **_prec(q.dtype), num_stages=CONFIG["bwd_stages"],
        )
        warps = CONFIG["bwd_warps_64"] if big else CONFIG["bwd_warps_small"]
        # (DO_DQ, DO_DKV, num_warps) per pass: one fused pass, or a dq pass and a dkv pass
        passes = [(True, False, CONFIG["bwd_dq_warps_64"]), (False, True, warps)] if split else [(True, True, warps)]
        args_head = (
            q, kv, indices,
            topk_length if topk_length is not None else indices,
            sink if sink is not None else lse,
            out, dout, lse,
            dlse if dlse is not None else lse,
            dq, dkv_acc,
            dsink_t if dsink_t is not None else lse,
        )
        strides = (
            q.stride(0), q.stride(1), kv.stride(0), indices.stride(0), out.stride(0), out.stride(1),
            dout.stride(0), dout.stride(1), dq.stride(0), dq.stride(1),
        )
        scale = float(softmax_scale)
        use_rows = loss_target_supported(H, deterministic)
        if target_out is not None and not use_rows:
            raise RuntimeError(
                f"the sparse MLA backward emits the indexer-loss target only on its all-heads pass "
                f"(H <= 128, not deterministic); got H={H}, deterministic={deterministic}"
            )
        if use_rows:
            # dq pass (also saves logZ and Delta), then the all-heads dkv pass
            stats = torch.empty(2 * T * H, dtype=torch.float32, device=dev)
            fuse_dq = bool(CONFIG["bwd_rows_dq"])
            if fuse_dq:
                # stats only; dq comes from the all-heads pass by fp32 atomics
                dq_acc = torch.zeros(T, H, Dqk, dtype=torch.float32, device=dev)
                _bwd_stats_into(stats, dsink_t, out, dout, lse, dlse, sink, d_v)
            else:
                dq_acc = lse  # unused
                nw = CONFIG["bwd_dq_warps_64"] if big else CONFIG["bwd_warps_small"]
                LAST_KERNELS["bwd_dq"] = _sparse_mla_bwd_kernel[(T, NHB)](
                    *args_head, dkv_acc, stats, *strides, H, Tk, K, 0, T * H, scale, scale * LOG2E,
                    DETERMINISTIC=False, DO_DQ=True, DO_DKV=False, WRITE_STATS=True, num_warps=nw,
                    **common,
                )
            BNr = CONFIG["bwd_rows_block_n"]
            BC = CONFIG["bwd_rows_block_c"]
            HP = _pow2_at_least(H)
            NB = triton.cdiv(K, BNr)
            if NB > 0 and Tk > 0:
                LAST_KERNELS["bwd"] = _sparse_mla_bwd_dkv_rows_kernel[(T * NB,)](
                    q, kv, indices, topk_length if topk_length is not None else indices, dout, stats, dkv_acc,
                    dq_acc, lse, target_out if target_out is not None else lse,
                    q.stride(0), q.stride(1), kv.stride(0), indices.stride(0), dout.stride(0), dout.stride(1),
                    H, Tk, K, NB, T * H, scale, scale * LOG2E,
                    D_V=d_v, D_QK=Dqk, HP=HP, BN=BNr, BC=BC,
                    HAS_TOPK=topk_length is not None,
                    MASK_V=(d_v % BC != 0), MASK_T=((Dqk - d_v) % BC != 0), **_prec(q.dtype),
                    DO_DQ=fuse_dq, EMIT_T=target_out is not None, SINK_T=sink is not None,
                    num_warps=CONFIG["bwd_rows_warps"] if HP > 32 else CONFIG["bwd_rows_warps_small"],
                    num_stages=CONFIG["bwd_rows_stages"],
                )
            if fuse_dq:
                dq.copy_(dq_acc)
        elif not deterministic:
            for do_dq, do_dkv, nw in passes:
                LAST_KERNELS["bwd" if do_dkv else "bwd_dq"] = _sparse_mla_bwd_kernel[(T, NHB)](
                    *args_head, dkv_acc, dkv_acc, *strides, H, Tk, K, 0, 0, scale, scale * LOG2E,
                    DETERMINISTIC=False, DO_DQ=do_dq, DO_DKV=do_dkv, WRITE_STATS=False, num_warps=nw,
                    **common,
                )
        else:
            from .reference import slot_validity

            per_row = NHB * K * Dqk * 4
            C = max(1, min(T, DETERMINISTIC_WS_BYTES // max(per_row, 1)))
            ws = torch.empty(C * NHB * K, Dqk, dtype=torch.float32, device=dev)
            valid = slot_validity(indices, Tk, topk_length)
            keys = torch.arange(Tk + 1, device=dev, dtype=torch.int64)
            BD = 64
            for do_dq, do_dkv, nw in passes:
                if not do_dkv:  # the dq pass needs no workspace: run it over all rows at once
                    _sparse_mla_bwd_kernel[(T, NHB)](
                        *args_head, ws, ws, *strides, H, Tk, K, 0, 0, scale, scale * LOG2E,
                        DETERMINISTIC=True, DO_DQ=True, DO_DKV=False, WRITE_STATS=False, num_warps=nw,
                        **common,
                    )
            do_dq, _, nw = passes[-1]
            for t0 in range(0, T if Tk > 0 else 0, C):
                n = min(C, T - t0)
                _sparse_mla_bwd_kernel[(n, NHB)](
                    *args_head, ws, ws, *strides, H, Tk, K, t0, 0, scale, scale * LOG2E,
                    DETERMINISTIC=True, DO_DQ=do_dq, DO_DKV=True, WRITE_STATS=False, num_warps=nw,
                    **common,
                )
                ids = torch.where(valid[t0:t0 + n], indices[t0:t0 + n].long(), Tk)
                ids = ids[:, None, :].expand(n, NHB, K).reshape(-1)
                sorted_ids, perm = torch.sort(ids, stable=True)
                starts = torch.searchsorted(sorted_ids, keys)
                _segment_reduce_kernel[(Tk, triton.cdiv(Dqk, BD))](
                    ws, perm, starts, dkv_acc, Dqk, BD=BD, RB=16, num_warps=4,
                )
    dkv = dkv_acc.to(kv.dtype)
    d_sink = dsink_t.sum(0).to(sink.dtype) if sink is not None else None
    return dq, dkv, d_sink


def sparse_mla_triton(
    q: torch.Tensor,
    kv: torch.Tensor,
    indices: torch.Tensor,
    softmax_scale: float,
    d_v: int = 512,
    topk_length: Optional[torch.Tensor] = None,
    sink: Optional[torch.Tensor] = None,
    deterministic: Optional[bool] = None,
    loss_target: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Fused sparse MLA attention; differentiable in q, kv and sink. See module docstring.

    ``loss_target``: the slot tensor from ``indexer_loss_from_attention`` (fp32 ``[T, K]``,
    requires grad). The backward returns, as its gradient, the head-summed attention
    probabilities per slot (the sparse indexer loss's target), so the loss needs no pass of its
    own over the attention heads.
    """
    if deterministic is None:
        deterministic = _det_default()
    indices = indices.contiguous()
    if topk_length is not None:
        topk_length = topk_length.contiguous()
    if sink is not None:
        sink = sink.contiguous()
    if loss_target is not None:
        if tuple(loss_target.shape) != tuple(indices.shape) or loss_target.dtype != torch.float32:
            raise ValueError(
                f"loss_target must be fp32 {tuple(indices.shape)} (the indices' shape), got "
                f"{loss_target.dtype} {tuple(loss_target.shape)}"
            )
        if not loss_target_supported(q.shape[1], bool(deterministic)):
            raise ValueError(
                "loss_target needs the all-heads backward (H <= 128, not deterministic); use "
                "indexer_loss(..., attn_lse=lse) instead"
            )
    from .ops import sparse_mla_op  # the custom op (fake impl + autograd) wraps the launchers here

    return sparse_mla_op(
        q, kv, indices, float(softmax_scale), int(d_v), topk_length, sink, bool(deterministic),
        loss_target,
    )
