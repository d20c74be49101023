"""Indexer KL loss, forward and backward, with bounded memory (row-chunked, batched PyTorch).

The path for fp64 inputs (both variants on fp32/bf16/fp16 run the fused Triton kernels of
``triton_impl.py``; ``dispatch.py`` decides). See
``docs/kernels_indexer.md``. Math and argument meaning: ``reference.py`` (Megatron-Core 0.19.2
semantics).

Memory: a chunk of ``R`` query rows is processed at a time, with ``R`` chosen so that the
chunk's fp32 temporaries stay near ``chunk_bytes`` (default 1 GiB):

* dense variant: ``R x S`` index scores and attention target per chunk (all heads of the
  indexer batched, the attention heads in groups); the key range of a chunk is cut to the
  causal prefix when the window is the default causal one (static shapes, no host sync);
* sparse variant: the ``topk`` selected keys of each row are gathered (``R x k`` per chunk);
  the forward caches the attention target ``[B, T, k]`` (O(T*k), the size of the top-k
  output) so the backward does not recompute the attention logits.

Matmuls on bf16/fp16 inputs run on fp32 copies with TF32 allowed: bf16 and fp16 values are
exact in TF32, so the products are exact and the accumulation is fp32.

Under tensor parallelism (``tp_group`` with world size > 1), the head-summed attention target
is all-reduced over ``tp_group`` before normalisation (same as the reference).
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch

from .reference import _EPS, masked_bmm, masked_log_softmax, masked_softmax, row_scale, tp_all_reduce

__all__ = ["indexer_loss_chunked", "IndexerLossChunked"]

DEFAULT_CHUNK_BYTES = 1 << 30


@contextlib.contextmanager
def _tf32_if_exact(dtype):
    """Allow TF32 for fp32 matmuls when the operands came from bf16/fp16 (exact in TF32)."""
    if dtype not in (torch.bfloat16, torch.float16):
        yield
        return
    prev = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(prev)


def _cdt(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


class _Ctx:
    pass


def _rows_per_chunk(per_row_bytes, T, chunk_bytes):
    return int(max(1, min(T, chunk_bytes // max(1, per_row_bytes))))


# --------------------------------------------------------------------------------------------
# dense variant: all keys of the window
# --------------------------------------------------------------------------------------------


def _dense_chunk(c, t0, t1, need_grad_terms):
    """Index scores (+ activations), support and normalised target for rows [t0, t1)."""
    B, _, H, D = c.q.shape
    S = c.k.shape[1]
    R = t1 - t0
    Sc = min(S, t1) if c.causal else S  # keys past the last row's causal end are masked anyway
    cdt = c.cdt
    kf = c.kf[:, :Sc]
    qf = c.q[:, t0:t1].to(cdt).reshape(B, R * H, D)
    raw = torch.bmm(qf, kf.transpose(1, 2)).view(B, R, H, Sc)
    act = torch.relu(raw) if c.use_relu else raw
    wf = c.w[:, t0:t1].to(cdt)
    scores = torch.einsum("brhs,brh->brs", act, wf)
    s_idx = torch.arange(Sc, device=c.q.device)
    st = c.starts[:, t0:t1].to(torch.int64).unsqueeze(-1)
    en = c.ends[:, t0:t1].to(torch.int64).unsqueeze(-1)
    valid = (s_idx >= st) & (s_idx < en)
    att = torch.zeros(B, R, Sc, dtype=cdt, device=c.q.device)
    Hq, Dq = c.query.shape[2], c.query.shape[3]
    hg = c.head_group
    for h0 in range(0, Hq, hg):
        h1 = min(Hq, h0 + hg)
        qq = c.query[:, t0:t1, h0:h1].to(cdt).reshape(B, R * (h1 - h0), Dq)
        logits = torch.bmm(qq, c.keyf[:, :Sc].transpose(1, 2)).view(B, R, h1 - h0, Sc)
        logits = logits * c.scale
        logits = logits.masked_fill(~valid.unsqueeze(2), float("-inf"))
        m = logits.amax(-1, keepdim=True)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        e = torch.exp(logits - m)
        att += (e / e.sum(-1, keepdim=True).clamp_min(_EPS)).sum(2)
        del logits, e
    att = tp_all_reduce(att, c.tp_group)
    target = att / att.sum(-1, keepdim=True).clamp_min(_EPS)
    if not need_grad_terms:
        raw = act = None
    return scores, valid, target, raw, act, Sc


# --------------------------------------------------------------------------------------------
# sparse variant: the selected ids only
# --------------------------------------------------------------------------------------------


def _sparse_support(c, t0, t1):
    ids = c.topk[:, t0:t1].to(torch.int64)
    st = c.starts[:, t0:t1].to(torch.int64).unsqueeze(-1)
    en = c.ends[:, t0:t1].to(torch.int64).unsqueeze(-1)
    valid = (ids >= 0) & (ids >= st) & (ids < en)
    safe = torch.where(valid, ids, torch.zeros_like(ids))
    return safe, valid


def _gather_rows(x, safe):
    """x [B, S, F], safe [B, R, K] -> [B, R, K, F]."""
    B, R, K = safe.shape
    F = x.shape[-1]
    flat = torch.gather(x, 1, safe.reshape(B, R * K, 1).expand(B, R * K, F))
    return flat.view(B, R, K, F)


def _sparse_index_terms(c, t0, t1, safe, valid):
    B, _, H, D = c.q.shape
    R, K = t1 - t0, safe.shape[-1]
    # empty slots gathered key 0: zero them so nothing of it (a NaN, an Inf) can leak
    kg = _gather_rows(c.k, safe).to(c.cdt).masked_fill(~valid.unsqueeze(-1), 0.0)  # [B, R, K, D]
    qf = c.q[:, t0:t1].to(c.cdt)  # [B, R, H, D]
    raw = torch.matmul(qf.reshape(B * R, H, D), kg.reshape(B * R, K, D).transpose(1, 2))
    raw = raw.view(B, R, H, K)
    act = torch.relu(raw) if c.use_relu else raw
    scores = torch.einsum("brhk,brh->brk", act, c.w[:, t0:t1].to(c.cdt))
    return scores, raw, act, kg, qf


def _sparse_target(c, t0, t1, safe, valid):
    B = safe.shape[0]
    R, K = t1 - t0, safe.shape[-1]
    Hq, Dq = c.query.shape[2], c.query.shape[3]
    keyg = _gather_rows(c.key, safe).to(c.cdt).reshape(B * R, K, Dq)
    att = torch.zeros(B, R, K, dtype=c.cdt, device=safe.device)
    hg = c.head_group
    for h0 in range(0, Hq, hg):
        h1 = min(Hq, h0 + hg)
        qq = c.query[:, t0:t1, h0:h1].to(c.cdt).reshape(B * R, h1 - h0, Dq)
        logits = torch.bmm(qq, keyg.transpose(1, 2)).view(B, R, h1 - h0, K) * c.scale
        att += masked_softmax(logits, valid.unsqueeze(2)).sum(2)
        del logits
    att = tp_all_reduce(att, c.tp_group)
    return att / att.sum(-1, keepdim=True).clamp_min(_EPS)


# --------------------------------------------------------------------------------------------
# autograd
# --------------------------------------------------------------------------------------------


class IndexerLossChunked(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, w, query, key, topk, starts, ends, scale, loss_coeff, sparse,
                use_relu, row_valid, per_token, tp_group, causal, chunk_bytes):
        c = _Ctx()
        c.q, c.k, c.w, c.query, c.key = q.detach(), k.detach(), w.detach(), query.detach(), key.detach()
        c.topk, c.starts, c.ends, c.scale = topk, starts, ends, scale
        c.use_relu, c.tp_group, c.causal = use_relu, tp_group, causal
        c.cdt = _cdt(q)
        B, T, H, D = q.shape
        S = k.shape[1]
        Hq, Dq = query.shape[2], query.shape[3]
        esz = 8 if c.cdt == torch.float64 else 4
        if sparse:
            K = topk.shape[-1]
            c.head_group = max(1, min(Hq, 32))
            per_row = K * esz * (D + Dq + 3 * H + 3 * c.head_group + 8)
        else:
            c.head_group = max(1, min(Hq, 8))
            c.kf = c.k.to(c.cdt)
            per_row = S * esz * (3 * H + 3 * c.head_group + 8)
        c.keyf = None if sparse else c.key.to(c.cdt)
        R = _rows_per_chunk(per_row, T, chunk_bytes)
        total = torch.zeros((), dtype=torch.float64, device=q.device)
        targets = []
        with _tf32_if_exact(q.dtype), torch.no_grad():
            for t0 in range(0, T, R):
                t1 = min(T, t0 + R)
                if sparse:
                    safe, valid = _sparse_support(c, t0, t1)
                    scores = _sparse_index_terms(c, t0, t1, safe, valid)[0]
                    target = _sparse_target(c, t0, t1, safe, valid)
                    targets.append(target)
                else:
                    scores, valid, target, _, _, _ = _dense_chunk(c, t0, t1, False)
                logp = masked_log_softmax(scores, valid)
                kl = (target * (torch.log(target.clamp_min(_EPS)) - logp)).sum(-1)
                if row_valid is not None:
                    kl = kl * row_valid[:, t0:t1].to(kl.dtype)
                total = total + kl.sum().to(torch.float64)
        scale_rows = row_scale(row_valid, B * T, per_token, q.device)
        c.keyf = None
        c.kf = None
        c.R, c.sparse, c.row_valid, c.row_scale, c.loss_coeff = R, sparse, row_valid, scale_rows, loss_coeff
        c.targets = targets if sparse else None
        ctx.c = c
        out_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        return (total * scale_rows * loss_coeff).to(out_dtype)

    @staticmethod
    def backward(ctx, grad):
        c = ctx.c
        q, k, w = c.q, c.k, c.w
        B, T, H, D = q.shape
        S = k.shape[1]
        cdt = c.cdt
        dq = torch.zeros(q.shape, dtype=cdt, device=q.device)
        dk = torch.zeros(k.shape, dtype=cdt, device=q.device)
        dw = torch.zeros(w.shape, dtype=cdt, device=q.device)
        g = grad.to(cdt) * c.loss_coeff * c.row_scale.to(cdt)
        if not c.sparse:
            c.kf = k.to(cdt)
            c.keyf = c.key.to(cdt)
        with _tf32_if_exact(q.dtype), torch.no_grad():
            for i, t0 in enumerate(range(0, T, c.R)):
                t1 = min(T, t0 + c.R)
                R = t1 - t0
                if c.sparse:
                    safe, valid = _sparse_support(c, t0, t1)
                    scores, raw, act, kg, qf = _sparse_index_terms(c, t0, t1, safe, valid)
                    target = c.targets[i]
                else:
                    scores, valid, target, raw, act, Sc = _dense_chunk(c, t0, t1, True)
                d_s = (torch.exp(masked_log_softmax(scores, valid)) - target) * g
                d_s = d_s.masked_fill(~valid, 0.0)
                if c.row_valid is not None:
                    d_s = d_s * c.row_valid[:, t0:t1].to(cdt).unsqueeze(-1)
                # dI -> dw, d(raw); masked to the support first (no 0 * NaN from outside it)
                support = valid.unsqueeze(2)
                dw[:, t0:t1] = torch.einsum("brhs,brs->brh", act.masked_fill(~support, 0.0), d_s)
                d_raw = d_s.unsqueeze(2) * w[:, t0:t1].to(cdt).unsqueeze(-1)
                if c.use_relu:
                    d_raw = d_raw * (raw > 0).to(cdt)
                d_raw = d_raw.masked_fill(~support, 0.0)
                del act, raw
                if c.sparse:
                    Kk = safe.shape[-1]
                    d_raw = d_raw.reshape(B * R, H, Kk)
                    dq[:, t0:t1] = torch.bmm(d_raw, kg.reshape(B * R, Kk, D)).view(B, R, H, D)
                    dkg = torch.bmm(d_raw.transpose(1, 2), qf.reshape(B * R, H, D))  # [BR, K, D]
                    flat = (safe + (torch.arange(B, device=q.device) * S).view(B, 1, 1)).reshape(-1)
                    dkg = dkg.reshape(B * R * Kk, D).masked_fill(~valid.reshape(-1, 1), 0.0)
                    dk.view(B * S, D).index_add_(0, flat, dkg)
                else:
                    d_raw = d_raw.reshape(B, R * H, Sc)
                    qf = q[:, t0:t1].to(cdt).reshape(B, R * H, D)
                    rows = support.expand(B, R, H, Sc).reshape(B, R * H, Sc)
                    dq[:, t0:t1] = masked_bmm(d_raw, c.kf[:, :Sc], rows).view(B, R, H, D)
                    dk[:, :Sc] += masked_bmm(d_raw.transpose(1, 2), qf, rows.transpose(1, 2))
                del d_raw
        c.kf = c.keyf = None
        ctx.c = None
        return (dq.to(q.dtype), dk.to(k.dtype), dw.to(w.dtype)) + (None,) * 14


def indexer_loss_chunked(
    q: torch.Tensor,
    k: torch.Tensor,
    w: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    softmax_scale: float,
    loss_coeff: float,
    topk_indices: Optional[torch.Tensor],
    sparse: bool,
    starts: torch.Tensor,
    ends: torch.Tensor,
    causal: bool,
    use_relu: bool = True,
    query_valid_rows: Optional[torch.Tensor] = None,
    calculate_per_token_loss: bool = False,
    tp_group=None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> torch.Tensor:
    """Scalar indexer KL loss (same contract as ``indexer_loss_reference``), row-chunked.

    ``starts`` / ``ends`` ``[B, T]`` are the windows (``causal``: they are the default causal
    ones, so a chunk's key range stops at its last row); ``query_valid_rows`` bool ``[B, T]``.
    """
    return IndexerLossChunked.apply(
        q, k, w, query, key, topk_indices, starts, ends, float(softmax_scale), float(loss_coeff),
        bool(sparse), bool(use_relu), query_valid_rows, bool(calculate_per_token_loss), tp_group,
        causal, int(chunk_bytes),
    )
