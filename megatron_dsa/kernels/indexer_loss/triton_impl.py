"""Fused Triton kernels for the indexer KL loss, sparse (the selected keys) and dense (every key
of the window: the warm-up stage).

Rows are flattened to ``r = b * T + t``; the top-k ids are per sequence (key row ``b*S + id``).
A slot is valid when ``0 <= id < S`` and ``starts[r] <= id < ends[r]``. Duplicate ids in a row
count once per slot (the indexer never emits duplicates; the reference takes the set). With
``DENSE`` the slot is the key itself (``id = j`` for ``j < K``, the launch's key count) and a
row walks only the key blocks of its window. Every per-row kernel serves rows ``T0 .. T0 + RT``
of each batch and indexes its ``[B * RT, K]`` buffers by the launch-local row (``_row``): the
sparse loss launches all rows at once, the dense loss a chunk of rows at a time.

Sparse forward (no autograd inside; ``IndexerLossSparseFused`` wraps it):

1. ``_att_kernel`` MODE=0 (only when the attention log-sum-exp is not given): one program per
   (row, block of BH attention heads); gathers the row's ``key`` rows BN at a time, does
   ``s = scale * Q K^T`` and an online log-sum-exp per head -> ``lse [R, Hq]`` (natural log).
2. ``_att_kernel`` MODE=1: same walk; ``p = exp(s - lse)`` summed over the head block and added
   (fp32 atomics over head blocks) into ``att [R, K]`` = the unnormalised head-summed target.
   (Under tensor parallelism ``att`` is all-reduced over ``tp_group`` in torch here.)
3. ``_index_kernel``: one program per row; gathers the ``k`` rows of the selected ids, ``raw =
   q_I[r] (H x D) k^T``, ``I = sum_h w_h ReLU(raw)`` -> ``isc [R, K]`` (fp32 scratch).
4. ``_kl_kernel``: one program per row, two passes over its slots in blocks: log-softmax of
   ``I``, L1-normalised target, ``KL[r]`` (times row validity) and ``dI = (p - target) * rv``
   written over ``isc`` (the only [R, K] buffer kept for the backward).

Sparse backward: ``_index_bwd_kernel``, one program per row: recompute ``raw`` per slot block,
``dI * g`` (``g`` = incoming grad * coeff * row scale, read from device memory: no host sync),
``dw`` and ``dq`` in registers, ``dk[b*S + id] += draw^T q`` with fp32 atomics.

Dense (``dense_loss_forward``, ``IndexerLossDenseFused``): per chunk of query rows the same
four steps with ``DENSE``, then the gradients of the KL sum right away (``_index_bwd_kernel``
for dq / dw, ``_dense_dk_kernel`` key-major for dk); the backward only scales them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..triton_common import LOG2E, dot_precision, dot_split, ld, ld_split, mm, pow2_at_least
from .reference import row_scale, tp_all_reduce

__all__ = ["IndexerLossSparseFused", "IndexerLossFromAttention", "IndexerLossDenseFused", "sparse_loss_forward",
           "sparse_loss_backward", "dense_loss_forward", "index_scores", "kl_and_grad"]

DENSE_CHUNK_BYTES = 1 << 30  # the dense loss's two fp32 [rows, keys] buffers per chunk

# Launch configuration (H100-measured, sparse; the dense loss reuses it).
_CFG = {
    "att_bh": 128,  # all 128 heads per program: each gathered key row is loaded once per row
    "att_bn": 64,
    "att_dense_m": 128,  # dense loss: query rows x heads per program at least (rows share key blocks)
    "att_warps": 8,
    "att_stages": 1,
    "idx_bn": 64,
    "idx_warps": 8,
    "idx_stages": 2,
    "bwd_bn": 64,
    "bwd_warps": 4,
    "bwd_stages": 1,
    "kl_warps": 8,
    "kl_bk": 4096,  # slots per block of the KL kernel (the sparse row's k = 2048 is one block)
    "dk_bs": 64,  # keys per program of the dense dk kernel
    "dk_warps": 4,
    "dk_rows": 256,  # rows per program of the dense dk kernel (at least; the grid's second axis)
    "dk_ws_bytes": 1 << 28,  # its partial-sum workspace
}


@triton.jit
def _row(T, T0, RT):
    """``(rl, r)``: this program's row in the launch's ``[B * RT, ...]`` buffers and its global
    flattened row ``b * T + t`` (rows ``T0 .. T0 + RT`` of each batch; sparse: ``T0 = 0, RT = T``)."""
    rl = tl.program_id(0).to(tl.int64)
    return rl, (rl // RT) * T + T0 + rl % RT


@triton.jit
def _span(ST, EN, r, K, BN: tl.constexpr, DENSE: tl.constexpr):
    """Slot range a row walks: all ``K`` slots (sparse) or the key blocks of its window (dense:
    slot = key id, the launch covers keys ``[0, K)``)."""
    lo = 0
    hi = K
    if DENSE:
        lo = (tl.load(ST + r) // BN) * BN
        hi = tl.minimum(tl.load(EN + r), K)
    return lo, hi


@triton.jit
def _slots(IDX, ST, EN, r, rl, n0, K, S, BN: tl.constexpr, DENSE: tl.constexpr):
    offs_n = n0 + tl.arange(0, BN)
    nmask = offs_n < K
    if DENSE:
        ids = offs_n
    else:
        ids = tl.load(IDX + rl * K + offs_n, mask=nmask, other=-1)
    st = tl.load(ST + r)
    en = tl.load(EN + r)
    valid = nmask & (ids >= 0) & (ids < S) & (ids >= st) & (ids < en)
    rows = tl.where(valid, ids, 0).to(tl.int64)
    return offs_n, nmask, valid, rows


# --------------------------------------------------------------------------------------------
# attention target (head-summed softmax over the selected keys)
# --------------------------------------------------------------------------------------------


@triton.jit
def _att_kernel(
    QRY, KEY, IDX, ST, EN, LSE, ATT,
    sq_r, sq_h, s_key, T, S, Hq, K, T0, RT, scale_log2,
    MODE: tl.constexpr, D_V: tl.constexpr, D_QK: tl.constexpr, DC: tl.constexpr, DT: tl.constexpr,
    BH: tl.constexpr, BN: tl.constexpr, HAS_TAIL: tl.constexpr, MASK_V: tl.constexpr,
    MASK_T: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr, ATOMIC: tl.constexpr,
    DENSE: tl.constexpr, RB: tl.constexpr,
):
    """One program per (RB consecutive rows of one batch, block of BH heads): the MMA M
    dimension is RB x BH (query row-major). Sparse: RB = 1 (each row has its own ids). Dense:
    the RB rows share each key block (their windows' union is walked, each row masked to its
    own), so few heads per rank still fill a 128-row MMA and keys are read once per RB rows."""
    pid = tl.program_id(0)
    nrb = tl.cdiv(RT, RB)
    b = (pid // nrb).to(tl.int64)
    i0 = (pid % nrb) * RB  # first row of the program within the launch's rows of batch b
    hb = tl.program_id(1)
    offs_m = tl.arange(0, RB * BH)
    i_m = i0 + offs_m // BH
    h_m = hb * BH + offs_m % BH
    row_ok = i_m < RT
    hmask = (h_m < Hq) & row_ok
    r_m = b * T + T0 + i_m  # global rows
    rl_m = b * RT + i_m  # launch-local rows
    q0, q1, q2, q3, qt = ld_split(QRY, r_m * sq_r + h_m * sq_h, hmask, 1, DC, DT, D_V, D_QK, HAS_TAIL, MASK_V,
                                  MASK_T)
    kbase = KEY + b * S * s_key
    r0 = b * T + T0 + i0
    rl0 = b * RT + i0
    if MODE == 0:
        m_i = tl.full([RB * BH], float("-inf"), tl.float32)
        l_i = tl.zeros([RB * BH], tl.float32)
    else:
        lse2 = tl.load(LSE + rl_m * Hq + h_m, mask=hmask, other=float("-inf")) * 1.4426950408889634
        lfin = lse2 > float("-inf")
        lse2 = tl.where(lfin, lse2, 0.0)
    if DENSE:  # the union of the rows' windows
        st_m = tl.load(ST + r_m, mask=row_ok, other=2147483647)
        en_m = tl.load(EN + r_m, mask=row_ok, other=0)
        lo = (tl.min(st_m, 0) // BN) * BN
        hi = tl.minimum(tl.max(en_m, 0), K)
    else:
        lo, hi = _span(ST, EN, r0, K, BN, DENSE)
    for n0 in range(lo, hi, BN):
        if DENSE:
            offs_n = n0 + tl.arange(0, BN)
            nmask = offs_n < K
            kval = offs_n < hi
            rows = tl.where(kval, offs_n, 0).to(tl.int64)
            valid = kval[None, :] & (offs_n[None, :] >= st_m[:, None]) & (offs_n[None, :] < en_m[:, None])
        else:
            offs_n, nmask, kval, rows = _slots(IDX, ST, EN, r0, rl0, n0, K, S, BN, DENSE)
            valid = kval[None, :]
        k0, k1, k2, k3, kt = ld_split(kbase, rows, kval, s_key, DC, DT, D_V, D_QK, HAS_TAIL, MASK_V, MASK_T)
        s = dot_split(q0, q1, q2, q3, qt, k0, k1, k2, k3, kt, tl.zeros([RB * BH, BN], tl.float32), HAS_TAIL,
                      UPCAST, PREC)
        if MODE == 0:
            s = tl.where(valid, s * scale_log2, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            l_i = l_i * tl.exp2(m_i - m_use) + tl.sum(tl.exp2(s - m_use[:, None]), 1)
            m_i = m_new
        else:
            live = valid & (hmask & lfin)[:, None]
            p = tl.where(live, tl.exp2(s * scale_log2 - lse2[:, None]), 0.0)
            if RB == 1:
                ptrs = ATT + rl0 * K + offs_n
                amask = nmask
                psum = tl.sum(p, 0)
            else:  # per row: the sum over its BH heads
                offs_r = tl.arange(0, RB)
                ptrs = ATT + (rl0 + offs_r)[:, None] * K + offs_n[None, :]
                amask = ((i0 + offs_r) < RT)[:, None] & nmask[None, :]
                psum = tl.sum(tl.reshape(p, [RB, BH, BN]), 1)
            if ATOMIC:
                tl.atomic_add(ptrs, psum, mask=amask, sem="relaxed")
            else:  # one head block covers all heads: this program owns its rows
                tl.store(ptrs, psum, mask=amask)
    if MODE == 0:
        ne = l_i > 0.0
        lse = tl.where(ne, (m_i + tl.log2(tl.where(ne, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
        tl.store(LSE + rl_m * Hq + h_m, lse, mask=hmask)


# --------------------------------------------------------------------------------------------
# index scores, KL and dI
# --------------------------------------------------------------------------------------------


@triton.jit
def _index_kernel(
    Q, KI, W, IDX, ST, EN, ISC,
    sq_r, sq_h, sk, sw_r, T, S, H, D, K, T0, RT,
    BHI: tl.constexpr, BD: tl.constexpr, BN: tl.constexpr, RELU: tl.constexpr,
    UPCAST: tl.constexpr, PREC: tl.constexpr, DENSE: tl.constexpr,
):
    rl, r = _row(T, T0, RT)
    b = r // T
    offs_h = tl.arange(0, BHI)
    hmask = offs_h < H
    q = ld(Q + r * sq_r, offs_h, hmask, sq_h, 0, BD, D, True)
    w = tl.load(W + r * sw_r + offs_h, mask=hmask, other=0.0).to(tl.float32)
    kbase = KI + b * S * sk
    lo, hi = _span(ST, EN, r, K, BN, DENSE)
    for n0 in range(lo, hi, BN):
        offs_n, nmask, valid, rows = _slots(IDX, ST, EN, r, rl, n0, K, S, BN, DENSE)
        kk = ld(kbase, rows, valid, sk, 0, BD, D, True)
        raw = mm(q, tl.trans(kk), tl.zeros([BHI, BN], tl.float32), UPCAST, PREC)
        if RELU:
            raw = tl.maximum(raw, 0.0, propagate_nan=tl.PropagateNan.ALL)
        isc = tl.sum(raw * w[:, None], 0)
        tl.store(ISC + rl * K + offs_n, isc, mask=nmask)


@triton.jit
def _kl_kernel(
    ISC, ATT, IDX, ST, EN, RV, KL, DI, T, S, K, T0, RT,
    BK: tl.constexpr, HAS_RV: tl.constexpr, DENSE: tl.constexpr,
):
    """Two passes over the row's slots in blocks of BK (one block when BK >= K): per-lane
    running max / sum of exp of ``I`` and the target's sum, then KL and ``dI`` (over ``I``)."""
    rl, r = _row(T, T0, RT)
    lo, hi = _span(ST, EN, r, K, BK, DENSE)
    m_v = tl.full([BK], float("-inf"), tl.float32)
    z_v = tl.zeros([BK], tl.float32)
    a_v = tl.zeros([BK], tl.float32)
    for n0 in range(lo, hi, BK):
        offs_n, nmask, valid, rows = _slots(IDX, ST, EN, r, rl, n0, K, S, BK, DENSE)
        x = tl.where(valid, tl.load(ISC + rl * K + offs_n, mask=nmask, other=0.0), float("-inf"))
        a_v += tl.where(valid, tl.load(ATT + rl * K + offs_n, mask=nmask, other=0.0), 0.0)
        m_new = tl.maximum(m_v, x)
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        z_v = z_v * tl.exp(m_v - m_use) + tl.where(valid, tl.exp(x - m_use), 0.0)
        m_v = m_new
    m = tl.max(m_v, 0)
    m = tl.where(m == float("-inf"), 0.0, m)
    z = tl.sum(z_v * tl.exp(m_v - m), 0)
    logz = tl.log(tl.maximum(z, 1e-30))
    inv_z = 1.0 / tl.maximum(z, 1e-10)
    inv_a = 1.0 / tl.maximum(tl.sum(a_v, 0), 1e-10)
    rv = 1.0
    if HAS_RV:
        rv = tl.load(RV + r).to(tl.float32)
    kl_v = tl.zeros([BK], tl.float32)
    for n0 in range(lo, hi, BK):
        offs_n, nmask, valid, rows = _slots(IDX, ST, EN, r, rl, n0, K, S, BK, DENSE)
        x = tl.load(ISC + rl * K + offs_n, mask=nmask, other=0.0)
        tgt = tl.where(valid, tl.load(ATT + rl * K + offs_n, mask=nmask, other=0.0), 0.0) * inv_a
        logp = x - m - logz
        kl_v += tl.where(valid, tgt * (tl.log(tl.maximum(tgt, 1e-10)) - logp), 0.0)
        di = tl.where(valid, tl.exp(x - m) * inv_z - tgt, 0.0)
        tl.store(DI + rl * K + offs_n, di * rv, mask=nmask)
    tl.store(KL + rl, tl.sum(kl_v, 0) * rv)


@triton.jit
def _index_bwd_kernel(
    Q, KI, W, IDX, ST, EN, DI, G, DQ, DK, DW,
    sq_r, sq_h, sk, sw_r, T, S, H, D, K, T0, RT,
    BHI: tl.constexpr, BD: tl.constexpr, BN: tl.constexpr, RELU: tl.constexpr,
    UPCAST: tl.constexpr, PREC: tl.constexpr, DENSE: tl.constexpr,
):
    """dq, dw of a row (and, sparse only, dk by fp32 atomics; the dense dk is
    ``_dense_dk_kernel``'s, key-major without atomics)."""
    rl, r = _row(T, T0, RT)
    b = r // T
    offs_h = tl.arange(0, BHI)
    hmask = offs_h < H
    q = ld(Q + r * sq_r, offs_h, hmask, sq_h, 0, BD, D, True)
    w = tl.load(W + r * sw_r + offs_h, mask=hmask, other=0.0).to(tl.float32)
    g = tl.load(G).to(tl.float32)
    kbase = KI + b * S * sk
    dkbase = DK + b * S * BD
    dq = tl.zeros([BHI, BD], tl.float32)
    dw = tl.zeros([BHI], tl.float32)
    cols = tl.arange(0, BD)
    lo, hi = _span(ST, EN, r, K, BN, DENSE)
    for n0 in range(lo, hi, BN):
        offs_n, nmask, valid, rows = _slots(IDX, ST, EN, r, rl, n0, K, S, BN, DENSE)
        di = tl.load(DI + rl * K + offs_n, mask=valid, other=0.0) * g
        kk = ld(kbase, rows, valid, sk, 0, BD, D, True)
        raw = mm(q, tl.trans(kk), tl.zeros([BHI, BN], tl.float32), UPCAST, PREC)
        if RELU:
            act = tl.maximum(raw, 0.0, propagate_nan=tl.PropagateNan.ALL)
            draw = tl.where(raw > 0.0, di[None, :] * w[:, None], 0.0)
        else:
            act = raw
            draw = di[None, :] * w[:, None]
        dw += tl.sum(act * di[None, :], 1)
        drc = draw.to(kk.dtype)
        dq = mm(drc, kk, dq, UPCAST, PREC)
        if not DENSE:
            dkg = mm(tl.trans(drc), q, tl.zeros([BN, BD], tl.float32), UPCAST, PREC)
            tl.atomic_add(dkbase + rows[:, None] * BD + cols[None, :], dkg,
                          mask=valid[:, None] & (cols[None, :] < D), sem="relaxed")
    tl.store(DQ + r * H * D + offs_h[:, None] * D + cols[None, :], dq.to(DQ.dtype.element_ty),
             mask=hmask[:, None] & (cols[None, :] < D))
    tl.store(DW + r * H + offs_h, dw, mask=hmask)


@triton.jit
def _dense_dk_kernel(
    Q, KI, W, ST, EN, DI, PART,
    sq_r, sq_h, sk, sw_r, T, S, H, D, K, T0, RT, B, RPS,
    BHI: tl.constexpr, BD: tl.constexpr, BS: tl.constexpr, RELU: tl.constexpr,
    UPCAST: tl.constexpr, PREC: tl.constexpr,
):
    """Dense ``dk`` of one block of BS keys of batch ``b`` over one split of the launch's rows
    (rows ``RPS * split ..``; ``program_id(1) = split * B + b``): ``sum_t sum_h dI[t, s] w[t, h]
    1[raw > 0] q[t, h]``, stored to ``PART [splits, B, K, BD]`` fp32 (summed over splits by the
    host in a fixed order: no atomics). Rows whose window misses the block are skipped."""
    kb = tl.program_id(0)
    sp = tl.program_id(1) // B
    b = (tl.program_id(1) % B).to(tl.int64)
    s_lo = kb * BS
    s_hi = tl.minimum(s_lo + BS, K)
    offs_s = s_lo + tl.arange(0, BS)
    smask = offs_s < K
    kk = ld(KI + b * S * sk, offs_s, smask, sk, 0, BD, D, True)
    offs_h = tl.arange(0, BHI)
    hmask = offs_h < H
    cols = tl.arange(0, BD)
    dk = tl.zeros([BS, BD], tl.float32)
    for i in range(sp * RPS, tl.minimum(sp * RPS + RPS, RT)):
        r = b * T + T0 + i
        rl = b * RT + i
        st = tl.load(ST + r)
        en = tl.load(EN + r)
        if (st < s_hi) & (en > s_lo):
            valid = smask & (offs_s >= st) & (offs_s < en)
            di = tl.load(DI + rl * K + offs_s, mask=valid, other=0.0)
            q = ld(Q + r * sq_r, offs_h, hmask, sq_h, 0, BD, D, True)
            w = tl.load(W + r * sw_r + offs_h, mask=hmask, other=0.0).to(tl.float32)
            raw_t = mm(kk, tl.trans(q), tl.zeros([BS, BHI], tl.float32), UPCAST, PREC)
            if RELU:
                draw_t = tl.where(raw_t > 0.0, di[:, None] * w[None, :], 0.0)
            else:
                draw_t = di[:, None] * w[None, :]
            dk = mm(draw_t.to(q.dtype), q, dk, UPCAST, PREC)
    tl.store(PART + ((sp * B + b) * K + offs_s)[:, None] * BD + cols[None, :], dk, mask=smask[:, None])


# --------------------------------------------------------------------------------------------
# host side
# --------------------------------------------------------------------------------------------


def _att_geometry(Dqk: int):
    DC = 16
    while DC * 2 * 4 <= Dqk:
        DC *= 2
    d_v = min(Dqk, 4 * DC)
    tail = Dqk - d_v
    DT = pow2_at_least(tail)
    return dict(D_V=d_v, D_QK=Dqk, DC=DC, DT=DT, HAS_TAIL=tail > 0,
                MASK_V=(4 * DC != d_v), MASK_T=(DT != tail))


def sparse_loss_forward(q, k, w, query, key, ids, starts, ends, scale, use_relu, row_valid,
                        tp_group, attn_lse=None):
    """Returns (kl_rows [R] fp32, dI [R, K] fp32). Inputs contiguous; rows flattened."""
    B, T = q.shape[:2]
    S = k.shape[1]
    Hq, Dqk = query.shape[2], query.shape[3]
    K = ids.shape[-1]
    R = B * T
    dev = q.device
    if key.dtype != query.dtype:
        key = key.to(query.dtype)
    if k.dtype != q.dtype:
        k = k.to(q.dtype)
    qy = query.reshape(R, Hq, Dqk)
    geo = _att_geometry(Dqk)
    BH = min(_CFG["att_bh"], pow2_at_least(Hq))
    grid = (R, triton.cdiv(Hq, BH))
    atomic = grid[1] > 1
    att = (torch.zeros if atomic else torch.empty)(R, K, dtype=torch.float32, device=dev)
    if R == 0 or K == 0:
        return torch.zeros(R, dtype=torch.float32, device=dev), att.zero_()
    common = dict(BH=BH, BN=_CFG["att_bn"], ATOMIC=atomic, **geo, **dot_precision(query.dtype),
                  num_warps=_CFG["att_warps"], num_stages=_CFG["att_stages"])
    args = (qy.stride(0), qy.stride(1), key.stride(1), T, S, Hq, K, 0, T, float(scale) * LOG2E)
    if attn_lse is None:
        lse = torch.empty(R, Hq, dtype=torch.float32, device=dev)
        _att_kernel[grid](qy, key, ids, starts, ends, lse, att, *args, MODE=0, DENSE=False, RB=1, **common)
    else:
        lse = attn_lse.reshape(R, Hq).to(torch.float32).contiguous()
    _att_kernel[grid](qy, key, ids, starts, ends, lse, att, *args, MODE=1, DENSE=False, RB=1, **common)
    att = tp_all_reduce(att, tp_group)
    isc = index_scores(q, k, w, ids, starts, ends, use_relu)
    rv = row_valid.reshape(R) if row_valid is not None else None
    return kl_and_grad(isc, att, ids, starts, ends, rv, T, S)


def index_scores(q, k, w, ids, starts, ends, use_relu):
    """``I [R, K]`` fp32 at the selected slots (0 where a slot is empty is NOT guaranteed:
    empty slots are masked by the KL kernel)."""
    B, T, H, D = q.shape
    S = k.shape[1]
    K = ids.shape[-1]
    R = B * T
    isc = torch.empty(R, K, dtype=torch.float32, device=q.device)
    if R > 0 and K > 0:
        if k.dtype != q.dtype:
            k = k.to(q.dtype)
        qr = q.reshape(R, H, D)
        _index_kernel[(R,)](
            qr, k, w, ids, starts, ends, isc, qr.stride(0), qr.stride(1), k.stride(1), w.stride(1),
            T, S, H, D, K, 0, T, BHI=pow2_at_least(H), BD=pow2_at_least(D), BN=_CFG["idx_bn"], RELU=bool(use_relu),
            DENSE=False, **dot_precision(q.dtype), num_warps=_CFG["idx_warps"], num_stages=_CFG["idx_stages"],
        )
    return isc


def kl_and_grad(isc, att, ids, starts, ends, row_valid, T, S):
    """Per-row KL ``[R]`` and ``dI`` ``[R, K]`` (written over ``isc``) from the index scores
    and the unnormalised head-summed target ``att``."""
    R, K = isc.shape
    kl = torch.empty(R, dtype=torch.float32, device=isc.device)
    if R > 0 and K > 0:
        rv = row_valid if row_valid is not None else kl
        _kl_kernel[(R,)](isc, att, ids, starts, ends, rv, kl, isc, T, S, K, 0, T,
                         BK=min(pow2_at_least(K), _CFG["kl_bk"]), HAS_RV=row_valid is not None, DENSE=False,
                         num_warps=_CFG["kl_warps"])
    else:
        kl.zero_()
    return kl, isc


def sparse_loss_backward(q, k, w, ids, starts, ends, di, g, use_relu):
    """dq [B,T,H,D] (q dtype), dk [B,S,D] (k dtype), dw [B,T,H] (w dtype); g: 0-dim fp32."""
    B, T, H, D = q.shape
    S = k.shape[1]
    K = ids.shape[-1]
    R = B * T
    dev = q.device
    kc = k if k.dtype == q.dtype else k.to(q.dtype)
    BHI, BD = pow2_at_least(H), pow2_at_least(D)
    dq = torch.empty(B, T, H, D, dtype=q.dtype, device=dev)
    dk = torch.zeros(B, S, BD, dtype=torch.float32, device=dev)
    dw = torch.empty(B, T, H, dtype=torch.float32, device=dev)
    if R > 0 and K > 0:
        qr = q.reshape(R, H, D)
        _index_bwd_kernel[(R,)](
            qr, kc, w, ids, starts, ends, di, g, dq, dk, dw,
            qr.stride(0), qr.stride(1), kc.stride(1), w.stride(1), T, S, H, D, K, 0, T,
            BHI=BHI, BD=BD, BN=_CFG["bwd_bn"], RELU=bool(use_relu), DENSE=False, **dot_precision(q.dtype),
            num_warps=_CFG["bwd_warps"], num_stages=_CFG["bwd_stages"],
        )
    else:
        dq.zero_()
        dw.zero_()
    return dq, dk[..., :D].to(k.dtype), dw.to(w.dtype)


def dense_loss_forward(q, k, w, query, key, starts, ends, scale, use_relu, row_valid, tp_group, causal,
                       need_grads, chunk_bytes=DENSE_CHUNK_BYTES):
    """The dense loss (every key of each row's window), in chunks of query rows.

    Returns ``(kl_sum, grads)``: the fp64 sum of the rows' KL (times row validity) and, with
    ``need_grads``, ``(dq [B, T, H, D] q's dtype, dk [B, S, D] fp32, dw [B, T, H] fp32)``, the
    gradients of that sum (unit upstream gradient; ``None`` otherwise). Per chunk of ``rt`` rows
    (all batches), keys cut to ``[0, t1)`` when ``causal``: attention LSE and head-summed target
    ``[B * rt, Kc]`` (all-reduced over ``tp_group``), index scores, KL and ``dI`` (over the
    scores), then dq / dw (query-major) and dk (key-major); only the two ``[B * rt, Kc]`` fp32
    buffers scale with the keys, ``rt`` is chosen so they stay near ``chunk_bytes``.
    Inputs contiguous; ``starts`` / ``ends`` / ``row_valid`` flattened ``[B * T]``."""
    B, T, H, D = q.shape
    S = k.shape[1]
    Hq, Dqk = query.shape[2], query.shape[3]
    dev = q.device
    if key.dtype != query.dtype:
        key = key.to(query.dtype)
    if k.dtype != q.dtype:
        k = k.to(q.dtype)
    total = torch.zeros((), dtype=torch.float64, device=dev)
    BHI, BD = pow2_at_least(H), pow2_at_least(D)
    grads = None
    if need_grads:
        grads = (torch.zeros(B, T, H, D, dtype=q.dtype, device=dev),
                 torch.zeros(B, S, BD, dtype=torch.float32, device=dev),
                 torch.zeros(B, T, H, dtype=torch.float32, device=dev))
    if B * T == 0 or S == 0:
        return total, None if grads is None else (grads[0], grads[1][..., :D], grads[2])
    qy = query.reshape(B * T, Hq, Dqk)
    qr = q.reshape(B * T, H, D)
    geo = _att_geometry(Dqk)
    BH = min(_CFG["att_bh"], pow2_at_least(Hq))
    n_hb = triton.cdiv(Hq, BH)
    prec = dot_precision(q.dtype)
    RB = max(1, _CFG["att_dense_m"] // BH)  # rows per program: the MMA M of 128 heads with few heads
    att_cfg = dict(BH=BH, BN=_CFG["att_bn"], ATOMIC=n_hb > 1, DENSE=True, RB=RB, **geo,
                   **dot_precision(query.dtype), num_warps=_CFG["att_warps"], num_stages=_CFG["att_stages"])
    idx_args = (qr.stride(0), qr.stride(1), k.stride(1), w.stride(1), T, S, H, D)
    one = torch.ones(1, dtype=torch.float32, device=dev)
    rt_max = int(max(1, min(T, chunk_bytes // max(1, 8 * S * B))))
    for t0 in range(0, T, rt_max):
        rt = min(T, t0 + rt_max) - t0
        Kc = min(S, t0 + rt) if causal else S  # keys past the chunk's last causal end: none seen
        n = B * rt
        att = (torch.zeros if n_hb > 1 else torch.empty)(n, Kc, dtype=torch.float32, device=dev)
        lse = torch.empty(n, Hq, dtype=torch.float32, device=dev)
        isc = torch.empty(n, Kc, dtype=torch.float32, device=dev)
        kl = torch.empty(n, dtype=torch.float32, device=dev)
        att_args = (qy.stride(0), qy.stride(1), key.stride(1), T, S, Hq, Kc, t0, rt, float(scale) * LOG2E)
        att_grid = (B * triton.cdiv(rt, RB), n_hb)
        _att_kernel[att_grid](qy, key, isc, starts, ends, lse, att, *att_args, MODE=0, **att_cfg)
        _att_kernel[att_grid](qy, key, isc, starts, ends, lse, att, *att_args, MODE=1, **att_cfg)
        att = tp_all_reduce(att, tp_group)
        _index_kernel[(n,)](qr, k, w, isc, starts, ends, isc, *idx_args, Kc, t0, rt, BHI=BHI, BD=BD,
                            BN=_CFG["idx_bn"], RELU=bool(use_relu), DENSE=True, **prec,
                            num_warps=_CFG["idx_warps"], num_stages=_CFG["idx_stages"])
        rv = row_valid if row_valid is not None else kl
        _kl_kernel[(n,)](isc, att, isc, starts, ends, rv, kl, isc, T, S, Kc, t0, rt,
                         BK=min(pow2_at_least(Kc), _CFG["kl_bk"]), HAS_RV=row_valid is not None, DENSE=True,
                         num_warps=_CFG["kl_warps"])
        total += kl.to(torch.float64).sum()
        del att
        if need_grads:
            dq, dk, dw = grads
            _index_bwd_kernel[(n,)](qr, k, w, isc, starts, ends, isc, one, dq, dk, dw, *idx_args, Kc, t0, rt,
                                    BHI=BHI, BD=BD, BN=_CFG["bwd_bn"], RELU=bool(use_relu), DENSE=True, **prec,
                                    num_warps=_CFG["bwd_warps"], num_stages=_CFG["bwd_stages"])
            # rows split over programs (occupancy); partial sums in a bounded workspace
            splits = max(1, min(triton.cdiv(rt, _CFG["dk_rows"]), _CFG["dk_ws_bytes"] // (B * Kc * BD * 4)))
            rps = triton.cdiv(rt, splits)
            part = torch.empty(splits, B, Kc, BD, dtype=torch.float32, device=dev)
            _dense_dk_kernel[(triton.cdiv(Kc, _CFG["dk_bs"]), splits * B)](
                qr, k, w, starts, ends, isc, part, *idx_args, Kc, t0, rt, B, rps, BHI=BHI, BD=BD,
                BS=_CFG["dk_bs"], RELU=bool(use_relu), **prec, num_warps=_CFG["dk_warps"])
            dk[:, :Kc] += part.sum(0)
            del part
    if grads is not None:
        grads = (grads[0], grads[1][..., :D], grads[2])
    return total, grads


class IndexerLossSparseFused(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, w, query, key, ids, starts, ends, scale, loss_coeff, use_relu,
                row_valid, per_token, tp_group, attn_lse):
        B, T = q.shape[:2]
        qc, kc, wc = q.detach().contiguous(), k.detach().contiguous(), w.detach().contiguous()
        ids = ids.reshape(B * T, ids.shape[-1]).contiguous()
        st = starts.reshape(B * T).to(torch.int32).contiguous()
        en = ends.reshape(B * T).to(torch.int32).contiguous()
        rv = row_valid.reshape(B * T).contiguous() if row_valid is not None else None
        with torch.no_grad():
            kl, di = sparse_loss_forward(qc, kc, wc, query.detach().contiguous(),
                                         key.detach().contiguous(), ids, st, en, scale, use_relu,
                                         rv, tp_group, attn_lse)
            scale_rows = row_scale(rv, B * T, per_token, q.device)
            total = kl.to(torch.float64).sum()
        ctx.save_for_backward(qc, kc, wc, ids, st, en, di, scale_rows)
        ctx.loss_coeff, ctx.use_relu = loss_coeff, use_relu
        out_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        return (total * scale_rows * loss_coeff).to(out_dtype)

    @staticmethod
    def backward(ctx, grad):
        q, k, w, ids, st, en, di, scale_rows = ctx.saved_tensors
        g = (grad.to(torch.float64) * scale_rows * ctx.loss_coeff).to(torch.float32).reshape(1)
        dq, dk, dw = sparse_loss_backward(q, k, w, ids, st, en, di, g, ctx.use_relu)
        return (dq, dk, dw) + (None,) * 12


class IndexerLossFromAttention(torch.autograd.Function):
    """Sparse indexer KL loss whose target comes from the attention backward.

    Forward: the index scores at the selected slots (``_index_kernel``) only. Outputs a zero
    placeholder loss and a zero fp32 ``[R, K]`` *slot* tensor (a stride-0 view: no memory) that
    the caller passes to ``sparse_mla(..., loss_target=slot)``. Autograd then runs this node's
    backward only after the attention backward, which hands over the head-summed probabilities
    ``sum_h exp(s_h - lse_h)`` per slot as the slot's gradient (the P it forms anyway).
    Backward: (TP all-reduce of the target), KL + ``dI`` (``_kl_kernel``), the loss value passed
    to ``on_value`` (it does not exist before the backward), then ``_index_bwd_kernel``.
    Missing target (the attention backward did not run with ``loss_target``) raises.
    """

    @staticmethod
    def forward(ctx, q, k, w, ids, starts, ends, loss_coeff, use_relu, row_valid, per_token,
                tp_group, on_value):
        B, T = q.shape[:2]
        R = B * T
        qc, kc, wc = q.detach().contiguous(), k.detach().contiguous(), w.detach().contiguous()
        ids = ids.reshape(R, ids.shape[-1]).contiguous()
        st = starts.reshape(R).to(torch.int32).contiguous()
        en = ends.reshape(R).to(torch.int32).contiguous()
        rv = row_valid.reshape(R).contiguous() if row_valid is not None else None
        with torch.no_grad():
            isc = index_scores(qc, kc, wc, ids, st, en, use_relu)
            scale_rows = row_scale(rv, R, per_token, q.device)
        ctx.save_for_backward(qc, kc, wc, ids, st, en, isc, scale_rows, rv)
        ctx.loss_coeff, ctx.use_relu, ctx.tp_group, ctx.on_value = loss_coeff, use_relu, tp_group, on_value
        ctx.T, ctx.S = T, k.shape[1]
        ctx.set_materialize_grads(False)
        out_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        loss = torch.zeros((), dtype=out_dtype, device=q.device)
        slot = torch.zeros((), dtype=torch.float32, device=q.device).expand(R, ids.shape[1])
        return loss, slot

    @staticmethod
    def backward(ctx, grad, target):
        if target is None:
            raise RuntimeError(
                "indexer_loss_from_attention: no target reached the loss. Pass its slot tensor "
                "to sparse_mla(..., loss_target=slot) and backpropagate through the attention "
                "output"
            )
        q, k, w, ids, st, en, isc, scale_rows, rv = ctx.saved_tensors
        att = tp_all_reduce(target.contiguous(), ctx.tp_group)
        kl, di = kl_and_grad(isc, att, ids, st, en, rv, ctx.T, ctx.S)
        if ctx.on_value is not None:
            ctx.on_value((kl.to(torch.float64).sum() * scale_rows * ctx.loss_coeff).to(torch.float32))
        if grad is None:
            return (None,) * 12
        g = (grad.to(torch.float64) * scale_rows * ctx.loss_coeff).to(torch.float32).reshape(1)
        dq, dk, dw = sparse_loss_backward(q, k, w, ids, st, en, di, g, ctx.use_relu)
        return (dq, dk, dw) + (None,) * 9


class IndexerLossDenseFused(torch.autograd.Function):
    """The dense loss. Its gradient is linear in the upstream scalar, so the forward computes
    the gradients of the KL sum (when an input needs them) and the backward only scales them:
    the attention target, the costliest part, is formed once, and nothing of size T x S is
    kept (the saved gradients are the size of q, k and w, which need not be saved instead)."""

    @staticmethod
    def forward(ctx, q, k, w, query, key, starts, ends, scale, loss_coeff, use_relu, row_valid,
                per_token, tp_group, causal, chunk_bytes):
        B, T = q.shape[:2]
        R = B * T
        need = any(ctx.needs_input_grad[:3])
        st = starts.reshape(R).to(torch.int32).contiguous()
        en = ends.reshape(R).to(torch.int32).contiguous()
        rv = row_valid.reshape(R).contiguous() if row_valid is not None else None
        with torch.no_grad():
            total, grads = dense_loss_forward(
                q.detach().contiguous(), k.detach().contiguous(), w.detach().contiguous(),
                query.detach().contiguous(), key.detach().contiguous(), st, en, scale, use_relu, rv,
                tp_group, causal, need, chunk_bytes)
            scale_rows = row_scale(rv, R, per_token, q.device)
        if need:
            ctx.save_for_backward(*grads, scale_rows)
        ctx.loss_coeff, ctx.dtypes = loss_coeff, (q.dtype, k.dtype, w.dtype)
        out_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        return (total * scale_rows * loss_coeff).to(out_dtype)

    @staticmethod
    def backward(ctx, grad):
        dq, dk, dw, scale_rows = ctx.saved_tensors
        g = (grad.to(torch.float64) * scale_rows * ctx.loss_coeff).to(torch.float32)
        out = tuple((x * g).to(dt) for x, dt in zip((dq, dk, dw), ctx.dtypes))
        return out + (None,) * 12
