"""Fused Triton sparse MLA attention (absorbed layout), forward and backward launchers.

Layout (see ``reference.py`` for the math):
  q [T, H, Dqk], kv [Tk, Dqk] (V = kv[:, :d_v]), indices [T, K] (-1 = empty slot),
  topk_length [T] optional, sink [H] fp32 optional.
  Returns out [T, H, d_v] (q's dtype) and lse fp32 [T, H] (natural log, sink not included).
The launchers take inputs with unit channel stride (the dispatch makes them so) and have no
autograd; ``ops.py`` wraps them (and the CUDA ones) in ``torch.library`` custom ops.

Forward
-------
One program per (query row t, block of BH heads). The query tile ``[BH, Dqk]`` is loaded once;
the program walks the row's selected ids in blocks of BN=64 slots, gathers the kv rows
``[BN, Dqk]`` (each gathered row serves every head of the block: that is the reuse) and does
``S = Q K^T`` -> online softmax (exp2 domain) -> ``acc += P V``. The channel dimension is split
into four equal "value" chunks (``DC = d_v / 4``, 128 on the 576/512 fast path) plus a "tail"
chunk (the rope channels, ``Dqk - d_v``, 64 on the fast path), so every dot has power-of-two
shapes and the accumulators stay in separate register tiles.

Padding rules (no host copies, no host syncs): any H (heads padded to the tile by masks), any
K (the last block of slots masked; slots at or past ``topk_length[t]`` skipped), ids outside
``[0, Tk)`` are empty slots, duplicate ids count once per slot, any ``0 < d_v <= Dqk``.

Backward
--------
Default (H <= ``ALL_HEADS_MAX``, not deterministic): a stats kernel saves the log2-domain
logZ and ``Delta = rowsum(dO * O)`` (dlse folded in) per (row, head) and the d_sink terms; then
one program per (query row, block of 128 slots) covers ALL heads: S and dP as ``[HP, BN]``
tiles with the channels streamed in 64-wide chunks, ``dkv += dS^T Q + P^T dO`` and
``dq += dS K`` by fp32 atomics. Each (row, slot, channel) is added to dkv once and no FLOP is
recomputed. This pass can also emit the head-summed P per slot (the indexer loss's target).

More heads: one program per (row, block of BH=64 heads) recomputes ``P`` from the saved lse,
``dS = P (dP - Delta)``, keeps its dq rows in registers and scatters dkv with fp32 atomics
(a dq pass and a dkv pass, fewer registers each).

Deterministic (``deterministic=True``): no atomics. Query rows are processed in chunks; each
program writes its per-(row, head block, slot) dkv contribution into an fp32 workspace, the
chunk's ids are stably sorted, and a reduction kernel (one program per kv row) sums them in
sorted (= row, head block, slot) order. Bit-identical between runs; slower.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..triton_common import (LOG2E, atomic_add_tile, dot_precision, dot_split, ld, ld_cols, ld_split, mm, pow2_at_least,
                             st)
from .packing import MAX_PACK_HEADS, pack_rows

__all__ = ["sparse_mla_fwd_triton", "sparse_mla_bwd_triton", "bwd_stats", "ALL_HEADS_MAX"]

# The all-heads backward (and so the indexer-loss target) covers up to this many heads.
ALL_HEADS_MAX = 128
# Deterministic backward: bytes of fp32 contribution workspace per query chunk.
DETERMINISTIC_WS_BYTES = 1 << 30
# Launch configuration (H100-measured; see docs/kernels_sparse_mla.md).
_FWD = dict(block_n=64, warps_64=8, warps_small=4, stages_64=1, stages_small=2)
_BWD_HEADS = dict(block_h=64, block_n_64=64, block_n_small=32, warps_64=8, warps_small=8, stages=1)
_BWD_ROWS = dict(block_n=128, block_c=64, warps=8, warps_small=4, stages=2)


# --------------------------------------------------------------------------------------------
# kernels
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
    q0, q1, q2, q3, qt = ld_split(qb, offs_h, hmask, sq_h, DC, DT, D_V, D_QK, HAS_TAIL, MASK_V, MASK_T)

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
        k0, k1, k2, k3, kt = ld_split(KV, rows, valid, s_kv, DC, DT, D_V, D_QK, HAS_TAIL, MASK_V, MASK_T)
        s = dot_split(q0, q1, q2, q3, qt, k0, k1, k2, k3, kt, tl.zeros([BH, BN], tl.float32), HAS_TAIL, UPCAST,
                      PREC)
        s = tl.where(valid[None, :], s * scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        pc = p.to(k0.dtype)
        acc0 = mm(pc, k0, acc0 * alpha[:, None], UPCAST, PREC)
        acc1 = mm(pc, k1, acc1 * alpha[:, None], UPCAST, PREC)
        acc2 = mm(pc, k2, acc2 * alpha[:, None], UPCAST, PREC)
        acc3 = mm(pc, k3, acc3 * alpha[:, None], UPCAST, PREC)
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
    st(ob, offs_h, hmask, so_h, 0 * DC, DC, D_V, MASK_V, (acc0 * o_scale[:, None]).to(OUT.dtype.element_ty))
    st(ob, offs_h, hmask, so_h, 1 * DC, DC, D_V, MASK_V, (acc1 * o_scale[:, None]).to(OUT.dtype.element_ty))
    st(ob, offs_h, hmask, so_h, 2 * DC, DC, D_V, MASK_V, (acc2 * o_scale[:, None]).to(OUT.dtype.element_ty))
    st(ob, offs_h, hmask, so_h, 3 * DC, DC, D_V, MASK_V, (acc3 * o_scale[:, None]).to(OUT.dtype.element_ty))
    tl.store(LSE + t * H + offs_h, lse2 * 0.6931471805599453, mask=hmask)


# --------------------------------------------------------------------------------------------
# backward
# --------------------------------------------------------------------------------------------


@triton.jit
def _sparse_mla_bwd_kernel(
    Q, KV, IDX, TOPK, SINK, O, DO, LSE, DLSE, DQ, DKV, DSINK_T, WS,
    sq_t, sq_h, s_kv, s_it, so_t, so_h, sdo_t, sdo_h, sdq_t, sdq_h,
    H, Tk, K, T0, scale, scale_log2,
    D_V: tl.constexpr, D_QK: tl.constexpr, DC: tl.constexpr, DT: tl.constexpr,
    BH: tl.constexpr, BN: tl.constexpr,
    HAS_TOPK: tl.constexpr, HAS_SINK: tl.constexpr, HAS_TAIL: tl.constexpr, HAS_DLSE: tl.constexpr,
    MASK_V: tl.constexpr, MASK_T: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
    DETERMINISTIC: tl.constexpr, DO_DQ: tl.constexpr, DO_DKV: tl.constexpr,
):
    pid_t = tl.program_id(0)
    t = (pid_t + T0).to(tl.int64)
    hb = tl.program_id(1)
    nhb = tl.num_programs(1)
    offs_h = hb * BH + tl.arange(0, BH)
    hmask = offs_h < H

    qb = Q + t * sq_t
    q0, q1, q2, q3, qt = ld_split(qb, offs_h, hmask, sq_h, DC, DT, D_V, D_QK, HAS_TAIL, MASK_V, MASK_T)
    dob = DO + t * sdo_t
    do0, do1, do2, do3, _ = ld_split(dob, offs_h, hmask, sdo_h, DC, DT, D_V, D_QK, False, MASK_V, MASK_T)
    ob = O + t * so_t
    delta = tl.sum(do0.to(tl.float32) * ld(ob, offs_h, hmask, so_h, 0 * DC, DC, D_V, MASK_V).to(tl.float32), 1)
    delta += tl.sum(do1.to(tl.float32) * ld(ob, offs_h, hmask, so_h, 1 * DC, DC, D_V, MASK_V).to(tl.float32), 1)
    delta += tl.sum(do2.to(tl.float32) * ld(ob, offs_h, hmask, so_h, 2 * DC, DC, D_V, MASK_V).to(tl.float32), 1)
    delta += tl.sum(do3.to(tl.float32) * ld(ob, offs_h, hmask, so_h, 3 * DC, DC, D_V, MASK_V).to(tl.float32), 1)

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
        k0, k1, k2, k3, kt = ld_split(KV, rows, valid, s_kv, DC, DT, D_V, D_QK, HAS_TAIL, MASK_V, MASK_T)
        s = dot_split(q0, q1, q2, q3, qt, k0, k1, k2, k3, kt, tl.zeros([BH, BN], tl.float32), HAS_TAIL, UPCAST,
                      PREC)
        dp = dot_split(do0, do1, do2, do3, do0, k0, k1, k2, k3, kt, tl.zeros([BH, BN], tl.float32), False, UPCAST,
                       PREC)
        live = valid[None, :] & hmask[:, None]
        p = tl.where(live, tl.exp2(s * scale_log2 - z2[:, None]), 0.0)
        ds = p * (dp - delta[:, None]) * scale
        dsc = ds.to(k0.dtype)
        if DO_DQ:
            dq0 = mm(dsc, k0, dq0, UPCAST, PREC)
            dq1 = mm(dsc, k1, dq1, UPCAST, PREC)
            dq2 = mm(dsc, k2, dq2, UPCAST, PREC)
            dq3 = mm(dsc, k3, dq3, UPCAST, PREC)
            if HAS_TAIL:
                dqt = mm(dsc, kt, dqt, UPCAST, PREC)
        if DO_DKV:
            pc = p.to(k0.dtype)
            dsT = tl.trans(dsc)
            pT = tl.trans(pc)
            g0 = mm(pT, do0, mm(dsT, q0, tl.zeros([BN, DC], tl.float32), UPCAST, PREC), UPCAST, PREC)
            g1 = mm(pT, do1, mm(dsT, q1, tl.zeros([BN, DC], tl.float32), UPCAST, PREC), UPCAST, PREC)
            g2 = mm(pT, do2, mm(dsT, q2, tl.zeros([BN, DC], tl.float32), UPCAST, PREC), UPCAST, PREC)
            g3 = mm(pT, do3, mm(dsT, q3, tl.zeros([BN, DC], tl.float32), UPCAST, PREC), UPCAST, PREC)
            if HAS_TAIL:
                gt = mm(dsT, qt, tl.zeros([BN, DT], tl.float32), UPCAST, PREC)
            if DETERMINISTIC:
                # contribution rows: ((pid_t * nhb + hb) * K + slot); every slot < kend is written
                wrow = (pid_t.to(tl.int64) * nhb + hb) * K + offs_n
                wm = offs_n < kend
                st(WS, wrow, wm, D_QK, 0 * DC, DC, D_V, MASK_V, g0)
                st(WS, wrow, wm, D_QK, 1 * DC, DC, D_V, MASK_V, g1)
                st(WS, wrow, wm, D_QK, 2 * DC, DC, D_V, MASK_V, g2)
                st(WS, wrow, wm, D_QK, 3 * DC, DC, D_V, MASK_V, g3)
                if HAS_TAIL:
                    st(WS, wrow, wm, D_QK, D_V, DT, D_QK, MASK_T, gt)
            else:
                atomic_add_tile(DKV, rows, valid, D_QK, 0 * DC, DC, D_V, MASK_V, g0)
                atomic_add_tile(DKV, rows, valid, D_QK, 1 * DC, DC, D_V, MASK_V, g1)
                atomic_add_tile(DKV, rows, valid, D_QK, 2 * DC, DC, D_V, MASK_V, g2)
                atomic_add_tile(DKV, rows, valid, D_QK, 3 * DC, DC, D_V, MASK_V, g3)
                if HAS_TAIL:
                    atomic_add_tile(DKV, rows, valid, D_QK, D_V, DT, D_QK, MASK_T, gt)

    if DO_DQ:
        dqb = DQ + t * sdq_t
        st(dqb, offs_h, hmask, sdq_h, 0 * DC, DC, D_V, MASK_V, dq0.to(DQ.dtype.element_ty))
        st(dqb, offs_h, hmask, sdq_h, 1 * DC, DC, D_V, MASK_V, dq1.to(DQ.dtype.element_ty))
        st(dqb, offs_h, hmask, sdq_h, 2 * DC, DC, D_V, MASK_V, dq2.to(DQ.dtype.element_ty))
        st(dqb, offs_h, hmask, sdq_h, 3 * DC, DC, D_V, MASK_V, dq3.to(DQ.dtype.element_ty))
        if HAS_TAIL:
            st(dqb, offs_h, hmask, sdq_h, D_V, DT, D_QK, MASK_T, dqt.to(DQ.dtype.element_ty))


@triton.jit
def _sparse_mla_bwd_dkv_rows_kernel(
    Q, KV, IDX, TOPK, DO, STATS, DKV, DQW, LSE, TGT, US,
    sq_t, sq_h, s_kv, s_it, sdo_t, sdo_h,
    T, H, Tk, K, KT, NB, stats_off, scale, scale_log2,
    D_V: tl.constexpr, D_QK: tl.constexpr, HP: tl.constexpr, BN: tl.constexpr, BC: tl.constexpr,
    HAS_TOPK: tl.constexpr, MASK_V: tl.constexpr, MASK_T: tl.constexpr,
    UPCAST: tl.constexpr, PREC: tl.constexpr, EMIT_T: tl.constexpr, SINK_T: tl.constexpr,
    PACK: tl.constexpr, R: tl.constexpr, HPAD: tl.constexpr,
):
    """dkv and dq over ALL heads of one query row and one block of BN slots.

    PACK (row packing, ``packing.py``): one group of R rows instead of one row, tile row m being
    row ``g R + m // HPAD``, head ``m % HPAD`` (HP = R HPAD); the slots are the group's union
    (``IDX`` = uid, ``TOPK`` = count, ``K`` = its capacity) and row j takes entry e where
    ``US[g, j, e] >= 0``, which is also where its target goes (``KT``: the target's row stride).

    Phase 1: S = Q K^T and dP = dO V^T for the [HP, BN] tile, channels walked in BC-wide chunks
    (Q / dO / the gathered kv chunk are streamed; nothing [*, Dqk]-sized stays live).
    P and dS come from the logZ / Delta saved by the stats kernel.
    EMIT_T: also store ``sum_h exp(s - lse_h)`` per slot into ``TGT [T, K]`` (the indexer loss's
    unnormalised target; lse excludes the sink, so with a sink P is rescaled by exp(logZ - lse)).
    Phase 2: per BC-wide channel chunk, g = dS^T Q (+ P^T dO on value channels), [BN, BC] fp32,
    added once per (slot, channel) to the fp32 workspace.
    Programs of one row are adjacent in the 1-D grid, so the row's Q / dO stay in L2.
    """
    pid = tl.program_id(0)
    t = (pid // NB).to(tl.int64)  # the query row; packed: the group
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
        # q / dO tile rows as (base, row offsets, stride); stats and lse by srow
        if PACK:  # tile row -> (query row, head): element offsets of its q / dO rows
            tr = t * R + offs_h // HPAD
            hh = offs_h % HPAD
            hmask = (hh < H) & (tr < T)
            srow = tr * H + hh
            qb, qr, qs = Q, tr * sq_t + hh * sq_h, 1
            dob, dor, dos = DO, tr * sdo_t + hh * sdo_h, 1
        else:
            hmask = offs_h < H
            srow = t * H + offs_h
            qb, qr, qs = Q + t * sq_t, offs_h, sq_h
            dob, dor, dos = DO + t * sdo_t, offs_h, sdo_h
        s = tl.zeros([HP, BN], tl.float32)
        dp = tl.zeros([HP, BN], tl.float32)
        for c0 in range(0, D_V, BC):
            cols = c0 + tl.arange(0, BC)
            cm = cols < D_V
            qc = ld_cols(qb, qr, hmask, qs, cols, cm, MASK_V)
            doc = ld_cols(dob, dor, hmask, dos, cols, cm, MASK_V)
            kc = ld_cols(KV, rows, valid, s_kv, cols, cm, MASK_V)
            kcT = tl.trans(kc)
            s = mm(qc, kcT, s, UPCAST, PREC)
            dp = mm(doc, kcT, dp, UPCAST, PREC)
        for c0 in range(D_V, D_QK, BC):
            cols = c0 + tl.arange(0, BC)
            cm = cols < D_QK
            qc = ld_cols(qb, qr, hmask, qs, cols, cm, MASK_T)
            kc = ld_cols(KV, rows, valid, s_kv, cols, cm, MASK_T)
            s = mm(qc, tl.trans(kc), s, UPCAST, PREC)
        z2 = tl.load(STATS + srow, mask=hmask, other=0.0)
        delta = tl.load(STATS + stats_off + srow, mask=hmask, other=0.0)
        live = valid[None, :] & hmask[:, None]
        if PACK:  # each tile row's query row took only some of the union's entries
            us = tl.load(US + (t * R + offs_h // HPAD)[:, None] * K + offs_n[None, :],
                         mask=(offs_n < kend)[None, :], other=-1)
            live = live & (us >= 0)
        p = tl.where(live, tl.exp2(s * scale_log2 - z2[:, None]), 0.0)
        ds = p * (dp - delta[:, None]) * scale
        if EMIT_T:
            pf = p
            if SINK_T:
                l2 = tl.load(LSE + srow, mask=hmask, other=float("-inf")) * 1.4426950408889634
                lf = l2 > float("-inf")
                fh = tl.where(lf, tl.exp2(z2 - tl.where(lf, l2, 0.0)), 0.0)
                pf = p * fh[:, None]
            if PACK:  # per query row of the group, at that row's own slot of each entry
                for j in tl.static_range(R):
                    tsum = tl.sum(tl.where((offs_h // HPAD == j)[:, None], pf, 0.0), 0)
                    us_j = tl.load(US + (t * R + j) * K + offs_n, mask=offs_n < kend, other=-1)
                    tl.store(TGT + (t * R + j) * KT + us_j, tsum, mask=(us_j >= 0) & (t * R + j < T))
            else:
                tl.store(TGT + t * K + offs_n, tl.sum(pf, 0), mask=offs_n < K)  # (KT = K unpacked)
        pT = tl.trans(p.to(Q.dtype.element_ty))
        dsc = ds.to(Q.dtype.element_ty)
        dsT = tl.trans(dsc)
        for c0 in range(0, D_V, BC):
            cols = c0 + tl.arange(0, BC)
            cm = cols < D_V
            qc = ld_cols(qb, qr, hmask, qs, cols, cm, MASK_V)
            doc = ld_cols(dob, dor, hmask, dos, cols, cm, MASK_V)
            g = mm(dsT, qc, tl.zeros([BN, BC], tl.float32), UPCAST, PREC)
            g = mm(pT, doc, g, UPCAST, PREC)
            atomic_add_tile(DKV, rows, valid, D_QK, c0, BC, D_V, MASK_V, g)
        for c0 in range(D_V, D_QK, BC):
            cols = c0 + tl.arange(0, BC)
            cm = cols < D_QK
            qc = ld_cols(qb, qr, hmask, qs, cols, cm, MASK_T)
            g = mm(dsT, qc, tl.zeros([BN, BC], tl.float32), UPCAST, PREC)
            atomic_add_tile(DKV, rows, valid, D_QK, c0, BC, D_QK, MASK_T, g)
        # Phase 3: dq[t] += dS K, fp32 atomics into a [T, H, D_QK] workspace
        if PACK:
            dqb, dqr = DQW, srow
        else:
            dqb, dqr = DQW + t * H * D_QK, offs_h
        for c0 in range(0, D_QK, BC):
            cols = c0 + tl.arange(0, BC)
            cm = cols < D_QK
            kc = ld_cols(KV, rows, valid, s_kv, cols, cm, MASK_V or MASK_T)
            gq = mm(dsc, kc, tl.zeros([HP, BC], tl.float32), UPCAST, PREC)
            atomic_add_tile(dqb, dqr, hmask, D_QK, c0, BC, D_QK, MASK_V or MASK_T, gq)


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
        o = ld_cols(O + t * so_t, offs_h, hmask, so_h, cols, cm, True).to(tl.float32)
        do = ld_cols(DO + t * sdo_t, offs_h, hmask, sdo_h, cols, cm, True).to(tl.float32)
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


def _geometry(Dqk: int, d_v: int):
    DC = pow2_at_least(-(-d_v // 4))
    tail = Dqk - d_v
    DT = pow2_at_least(tail)
    return dict(
        D_V=d_v, D_QK=Dqk, DC=DC, DT=DT,
        HAS_TAIL=tail > 0, MASK_V=(4 * DC != d_v), MASK_T=(DT != tail),
    )


def _block_h(H: int, cap: int = 64) -> int:
    return min(cap, pow2_at_least(H))


def sparse_mla_fwd_triton(q, kv, indices, softmax_scale, d_v, topk_length=None, sink=None):
    """Forward only (no autograd): returns ``(out, lse)``."""
    T, H, Dqk = q.shape
    Tk = kv.shape[0]
    K = indices.shape[1]
    out = torch.empty(T, H, d_v, dtype=q.dtype, device=q.device)
    lse = torch.empty(T, H, dtype=torch.float32, device=q.device)
    if T == 0:
        return out, lse
    BH = _block_h(H)
    big = BH >= 64
    _sparse_mla_fwd_kernel[(T, triton.cdiv(H, BH))](
        q, kv, indices,
        topk_length if topk_length is not None else indices,
        sink if sink is not None else lse,
        out, lse,
        q.stride(0), q.stride(1), kv.stride(0), indices.stride(0), out.stride(0), out.stride(1),
        H, Tk, K, float(softmax_scale) * LOG2E,
        BH=BH, BN=_FWD["block_n"],
        HAS_TOPK=topk_length is not None, HAS_SINK=sink is not None,
        **_geometry(Dqk, d_v), **dot_precision(q.dtype),
        num_warps=_FWD["warps_64"] if big else _FWD["warps_small"],
        num_stages=_FWD["stages_64"] if big else _FWD["stages_small"],
    )
    return out, lse


def bwd_stats(stats, dsink_t, out, dout, lse, dlse, sink, d_v):
    """Per (row, head) log2-domain logZ and Delta into ``stats`` ([2 * T * H] fp32), and the
    per-row d_sink terms into ``dsink_t`` ([T, H], with a sink). Also used by the CUDA backward."""
    T, H = lse.shape
    BHs = min(32, pow2_at_least(H))
    _sparse_mla_bwd_stats_kernel[(T, triton.cdiv(H, BHs))](
        out, dout, lse, dlse if dlse is not None else lse, sink if sink is not None else lse,
        stats, dsink_t if dsink_t is not None else lse,
        out.stride(0), out.stride(1), dout.stride(0), dout.stride(1), H, T * H,
        D_V=d_v, BH=BHs, BC=pow2_at_least(min(d_v, 128)),
        HAS_SINK=sink is not None, HAS_DLSE=dlse is not None, num_warps=4,
    )


def sparse_mla_bwd_triton(
    q, kv, indices, softmax_scale, d_v, topk_length, sink, out, lse, dout, dlse=None,
    deterministic: bool = False, target_out=None, packed: bool = False,
):
    """Backward: returns ``(dq, dkv, d_sink or None)``.

    ``packed``: row packing (``H <= 32``, not deterministic; ``packing.py``): the all-heads pass
    over groups of 64 / 16 or 64 / 32 rows and the union of their keys.

    ``target_out`` (optional, fp32 ``[T, K]``, zero-filled by the caller): receives
    ``sum_h exp(softmax_scale * q_h . kv_id - lse_h)`` per slot (0 on empty slots), the indexer
    loss's unnormalised target, computed from the P this pass forms anyway. Only the all-heads
    pass emits it (H <= ``ALL_HEADS_MAX``, not deterministic); the dispatch checks that.
    """
    T, H, Dqk = q.shape
    Tk = kv.shape[0]
    K = indices.shape[1]
    dev = q.device
    dout = dout.contiguous()
    if dlse is not None:
        dlse = dlse.contiguous()
    dq = torch.empty_like(q)
    dkv_acc = torch.zeros(Tk, Dqk, dtype=torch.float32, device=dev)
    dsink_t = torch.empty(T, H, dtype=torch.float32, device=dev) if sink is not None else None
    scale = float(softmax_scale)
    all_heads = not deterministic and H <= ALL_HEADS_MAX
    if packed and (deterministic or not 1 <= H <= MAX_PACK_HEADS):
        raise ValueError(f"row packing takes 1..{MAX_PACK_HEADS} heads and a backward that is not "
                         f"deterministic; got H={H}, deterministic={deterministic}")
    if target_out is not None and not all_heads:
        raise ValueError(f"the sparse MLA backward emits the indexer-loss target only on its all-heads pass "
                         f"(H <= {ALL_HEADS_MAX}, not deterministic); got H={H}, deterministic={deterministic}")
    if T > 0 and all_heads:
        stats = torch.empty(2 * T * H, dtype=torch.float32, device=dev)
        dq_acc = torch.zeros(T, H, Dqk, dtype=torch.float32, device=dev)
        bwd_stats(stats, dsink_t, out, dout, lse, dlse, sink, d_v)
        BN, BC = _BWD_ROWS["block_n"], _BWD_ROWS["block_c"]
        if packed:  # the slot lists are the groups' unions
            pk = pack_rows(indices, Tk, H, topk_length)
            ids, lens, us, slots, HP, R, HPAD = pk.uid, pk.count, pk.uslot, pk.uid.shape[1], 64, pk.rows, pk.hpad
        else:
            ids, lens, us, slots, HP, R, HPAD = indices, topk_length, lse, K, pow2_at_least(H), 1, 1
        NB = triton.cdiv(slots, BN)
        if NB > 0 and Tk > 0:
            _sparse_mla_bwd_dkv_rows_kernel[(ids.shape[0] * NB,)](
                q, kv, ids, lens if lens is not None else ids, dout, stats, dkv_acc,
                dq_acc, lse, target_out if target_out is not None else lse, us,
                q.stride(0), q.stride(1), kv.stride(0), ids.stride(0), dout.stride(0), dout.stride(1),
                T, H, Tk, slots, K, NB, T * H, scale, scale * LOG2E,
                D_V=d_v, D_QK=Dqk, HP=HP, BN=BN, BC=BC, HAS_TOPK=lens is not None,
                MASK_V=(d_v % BC != 0), MASK_T=((Dqk - d_v) % BC != 0), **dot_precision(q.dtype),
                EMIT_T=target_out is not None, SINK_T=sink is not None, PACK=packed, R=R, HPAD=HPAD,
                num_warps=_BWD_ROWS["warps"] if HP > 32 else _BWD_ROWS["warps_small"],
                num_stages=_BWD_ROWS["stages"],
            )
        dq.copy_(dq_acc)
    elif T > 0:
        _bwd_per_head_block(q, kv, indices, scale, d_v, topk_length, sink, out, lse, dout, dlse,
                            deterministic, dq, dkv_acc, dsink_t)
    dkv = dkv_acc.to(kv.dtype)
    d_sink = dsink_t.sum(0).to(sink.dtype) if sink is not None else None
    return dq, dkv, d_sink


def _bwd_per_head_block(q, kv, indices, scale, d_v, topk_length, sink, out, lse, dout, dlse,
                        deterministic, dq, dkv_acc, dsink_t):
    """The per-(row, head block) backward: H > ``ALL_HEADS_MAX`` or deterministic."""
    T, H, Dqk = q.shape
    Tk = kv.shape[0]
    K = indices.shape[1]
    BH = _block_h(H, _BWD_HEADS["block_h"])
    NHB = triton.cdiv(H, BH)
    big = BH >= 64
    common = dict(
        BH=BH, BN=_BWD_HEADS["block_n_64"] if big else _BWD_HEADS["block_n_small"],
        HAS_TOPK=topk_length is not None, HAS_SINK=sink is not None, HAS_DLSE=dlse is not None,
        **_geometry(Dqk, d_v), **dot_precision(q.dtype), num_stages=_BWD_HEADS["stages"],
        num_warps=_BWD_HEADS["warps_64"] if big else _BWD_HEADS["warps_small"],
    )
    args_head = (
        q, kv, indices, topk_length if topk_length is not None else indices,
        sink if sink is not None else lse, out, dout, lse, dlse if dlse is not None else lse,
        dq, dkv_acc, dsink_t if dsink_t is not None else lse,
    )
    strides = (q.stride(0), q.stride(1), kv.stride(0), indices.stride(0), out.stride(0), out.stride(1),
               dout.stride(0), dout.stride(1), dq.stride(0), dq.stride(1))
    # BH = 64: a dq pass and a dkv pass (fewer registers each); smaller tiles: one fused pass
    passes = [(True, False), (False, True)] if big else [(True, True)]
    if not deterministic:
        for do_dq, do_dkv in passes:
            _sparse_mla_bwd_kernel[(T, NHB)](
                *args_head, dkv_acc, *strides, H, Tk, K, 0, scale, scale * LOG2E,
                DETERMINISTIC=False, DO_DQ=do_dq, DO_DKV=do_dkv, **common)
        return
    from .reference import slot_validity

    C = max(1, min(T, DETERMINISTIC_WS_BYTES // max(NHB * K * Dqk * 4, 1)))
    ws = torch.empty(C * NHB * K, Dqk, dtype=torch.float32, device=q.device)
    valid = slot_validity(indices, Tk, topk_length)
    keys = torch.arange(Tk + 1, device=q.device, dtype=torch.int64)
    if big:  # the dq pass needs no workspace: all rows at once
        _sparse_mla_bwd_kernel[(T, NHB)](
            *args_head, ws, *strides, H, Tk, K, 0, scale, scale * LOG2E,
            DETERMINISTIC=True, DO_DQ=True, DO_DKV=False, **common)
    for t0 in range(0, T if Tk > 0 else 0, C):
        n = min(C, T - t0)
        _sparse_mla_bwd_kernel[(n, NHB)](
            *args_head, ws, *strides, H, Tk, K, t0, scale, scale * LOG2E,
            DETERMINISTIC=True, DO_DQ=not big, DO_DKV=True, **common)
        ids = torch.where(valid[t0:t0 + n], indices[t0:t0 + n].long(), Tk)
        ids = ids[:, None, :].expand(n, NHB, K).reshape(-1)
        sorted_ids, perm = torch.sort(ids, stable=True)
        starts = torch.searchsorted(sorted_ids, keys)
        _segment_reduce_kernel[(Tk, triton.cdiv(Dqk, 64))](ws, perm, starts, dkv_acc, Dqk, BD=64, RB=16, num_warps=4)
