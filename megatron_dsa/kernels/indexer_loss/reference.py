"""Plain-PyTorch reference for the DSA indexer KL loss (Megatron-Core 0.19.2 semantics).

Per query row t (batch-first, window ``[starts, ends)``; in the sparse variant the row's
support is further restricted to its top-k ids):

  p_idx[t, :]  = softmax over the support of the index scores I[t, :]
  a_h[t, :]    = softmax over the support of scale * query[t, h] . key[:]      (each head)
  target[t, :] = sum_h a_h[t, :] / max(sum_s sum_h a_h[t, s], 1e-10)          (L1-normalised;
                 under tensor parallelism the head sum is all-reduced first)
  KL[t]        = sum_s target * (log(max(target, 1e-10)) - log p_idx)
  loss         = loss_coeff * sum_t KL[t] * valid_row[t] / max(#valid rows, 1)
                 (``calculate_per_token_loss``: no division)

The target is a constant (no gradient flows into the attention query/key); gradients flow to
the indexer's q, k and weights: dI[t, s] = (p_idx - target) * d(row) on the support.

Memory: both passes walk blocks of query rows and, inside a block, one head at a time, so the
peak is O(row_block * S) rather than O(T * H * S). The backward recomputes the block.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..indexer.reference import causal_window, window_mask

__all__ = ["indexer_loss_reference", "IndexerLossReference", "masked_softmax", "masked_log_softmax", "row_scale",
           "tp_all_reduce", "masked_bmm"]

_EPS = 1e-10


def _support(starts, ends, topk, S, sparse: bool):
    valid = window_mask(starts, ends, S)
    if sparse:
        idx = topk.long()
        real = (idx >= 0) & (idx < S)  # ids outside [0, S) are empty slots, as on every path
        # amax-scatter so that empty slots (sent to key 0) never clear a real hit on key 0.
        hits = torch.zeros(valid.shape, dtype=torch.int8, device=valid.device)
        if S > 0:
            hits.scatter_reduce_(-1, torch.where(real, idx, 0), real.to(torch.int8), reduce="amax")
        valid = valid & hits.bool()
    return valid


def masked_bmm(a: torch.Tensor, b: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``a @ b`` for ``a`` [B, R, S] that is zero outside ``valid`` and ``b`` [B, S, D], without
    ``0 * NaN``: a non-finite row of ``b`` reaches only the output rows whose valid entries
    select it (those become NaN), never the others."""
    finite = torch.isfinite(b).all(-1)  # [B, S]
    out = torch.bmm(a, b.masked_fill(~finite.unsqueeze(-1), 0.0))
    hit = (valid & ~finite.unsqueeze(1)).any(-1)  # [B, R]
    return out.masked_fill(hit.unsqueeze(-1), float("nan"))


def tp_all_reduce(att, tp_group):
    """Sum the head-summed attention target over the tensor-parallel group (heads are split)."""
    if tp_group is not None and torch.distributed.get_world_size(tp_group) > 1:
        torch.distributed.all_reduce(att, group=tp_group)
    return att


def masked_softmax(x, valid):
    x = x.masked_fill(~valid, float("-inf"))
    m = x.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(x - m).masked_fill(~valid, 0.0)
    return e / e.sum(-1, keepdim=True).clamp_min(_EPS)


def masked_log_softmax(x, valid):
    x = x.masked_fill(~valid, float("-inf"))
    m = x.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    lse = torch.log(torch.exp(x - m).sum(-1, keepdim=True)) + m
    return (x - lse).masked_fill(~valid, 0.0)


def _block_terms(ctx, t0, t1):
    """Index scores, support and target for rows [t0, t1)."""
    q, k, w, query, key = ctx.q, ctx.k, ctx.w, ctx.query, ctx.key
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    B, _, H, _ = q.shape
    S = k.shape[1]
    valid = _support(
        ctx.starts[:, t0:t1], ctx.ends[:, t0:t1],
        None if ctx.topk is None else ctx.topk[:, t0:t1], S, ctx.sparse,
    )
    kf = k.to(cdt)
    scores = torch.zeros(B, t1 - t0, S, dtype=cdt, device=q.device)
    for h in range(H):
        raw = torch.bmm(q[:, t0:t1, h].to(cdt), kf.transpose(1, 2))
        if ctx.use_relu:
            raw = torch.relu(raw)
        scores += raw * w[:, t0:t1, h].to(cdt).unsqueeze(-1)
    keyf = key.to(cdt)
    att = torch.zeros(B, t1 - t0, S, dtype=cdt, device=q.device)
    for h in range(query.shape[2]):
        logits = torch.bmm(query[:, t0:t1, h].to(cdt), keyf.transpose(1, 2)) * ctx.scale
        att += masked_softmax(logits, valid)
    att = tp_all_reduce(att, ctx.tp_group)
    target = att / att.sum(-1, keepdim=True).clamp_min(_EPS)
    return scores, valid, target


class IndexerLossReference(torch.autograd.Function):
    """Autograd wrapper: forward returns the scalar loss, backward recomputes block by block."""

    @staticmethod
    def forward(ctx, q, k, w, query, key, topk, starts, ends, scale, loss_coeff, sparse,
                use_relu, row_valid, per_token, tp_group, row_block):
        ctx.q, ctx.k, ctx.w = q.detach(), k.detach(), w.detach()
        ctx.query, ctx.key = query.detach(), key.detach()
        ctx.topk, ctx.starts, ctx.ends = topk, starts, ends
        ctx.scale, ctx.loss_coeff, ctx.sparse, ctx.use_relu = scale, loss_coeff, sparse, use_relu
        ctx.row_valid, ctx.per_token, ctx.tp_group, ctx.row_block = (
            row_valid, per_token, tp_group, row_block)
        B, T = q.shape[:2]
        total = torch.zeros((), dtype=torch.float64, device=q.device)
        for t0 in range(0, T, row_block):
            t1 = min(T, t0 + row_block)
            scores, valid, target = _block_terms(ctx, t0, t1)
            logp = masked_log_softmax(scores, valid)
            kl = (target * (torch.log(target.clamp_min(_EPS)) - logp)).sum(-1)
            if row_valid is not None:
                kl = kl * row_valid[:, t0:t1].to(kl.dtype)
            total = total + kl.sum().to(torch.float64)
        ctx.row_scale = row_scale(row_valid, B * T, per_token, q.device)
        out_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        return (total * ctx.row_scale * loss_coeff).to(out_dtype)

    @staticmethod
    def backward(ctx, grad):
        q, k, w = ctx.q, ctx.k, ctx.w
        cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
        B, T, H, D = q.shape
        dq = torch.zeros(q.shape, dtype=cdt, device=q.device)
        dk = torch.zeros(k.shape, dtype=cdt, device=q.device)
        dw = torch.zeros(w.shape, dtype=cdt, device=q.device)
        g = grad.to(cdt) * ctx.loss_coeff * ctx.row_scale.to(cdt)
        kf = k.to(cdt)
        for t0 in range(0, T, ctx.row_block):
            t1 = min(T, t0 + ctx.row_block)
            scores, valid, target = _block_terms(ctx, t0, t1)
            d_scores = (masked_softmax(scores, valid) - target) * g
            d_scores = d_scores.masked_fill(~valid, 0.0)
            if ctx.row_valid is not None:
                d_scores = d_scores * ctx.row_valid[:, t0:t1].to(cdt).unsqueeze(-1)
            # every product below is masked to the support first: a NaN / Inf outside a row's
            # support (another row's key, a padded slot) must not reach that row's gradients
            for h in range(H):
                qh = q[:, t0:t1, h].to(cdt)
                raw = torch.bmm(qh, kf.transpose(1, 2))
                act = (torch.relu(raw) if ctx.use_relu else raw).masked_fill(~valid, 0.0)
                dw[:, t0:t1, h] = (d_scores * act).sum(-1)
                d_raw = d_scores * w[:, t0:t1, h].to(cdt).unsqueeze(-1)
                if ctx.use_relu:
                    d_raw = d_raw * (raw > 0).to(cdt)
                d_raw = d_raw.masked_fill(~valid, 0.0)
                dq[:, t0:t1, h] = masked_bmm(d_raw, kf, valid)
                dk += masked_bmm(d_raw.transpose(1, 2), qh, valid.transpose(1, 2))
        return (dq.to(q.dtype), dk.to(k.dtype), dw.to(w.dtype)) + (None,) * 13


def row_scale(row_valid, n_rows, per_token, device):
    """The loss's fp64 row normaliser: 1 (per-token loss), 1 / valid rows, or 1 / rows."""
    if per_token:
        return torch.ones((), dtype=torch.float64, device=device)
    if row_valid is not None:
        n = row_valid.to(torch.float64).sum().clamp_min(1.0)
    else:
        n = torch.full((), float(max(n_rows, 1)), dtype=torch.float64, device=device)
    return 1.0 / n


def indexer_loss_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    w: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    softmax_scale: float,
    loss_coeff: float,
    topk_indices: Optional[torch.Tensor] = None,
    sparse: bool = False,
    starts: Optional[torch.Tensor] = None,
    ends: Optional[torch.Tensor] = None,
    use_relu: bool = True,
    query_valid_rows: Optional[torch.Tensor] = None,
    calculate_per_token_loss: bool = False,
    tp_group=None,
    row_block: int = 128,
) -> torch.Tensor:
    """Indexer KL loss.

    Args:
      q [B, T, H, D], k [B, S, D], w [B, T, H]: indexer tensors (gradients flow to these).
      query [B, T, Hq, Dqk], key [B, S, Dqk]: attention query and (MQA) key, treated as constants.
      topk_indices [B, T, K] int: required when ``sparse`` (per-sequence key ids, -1 padded).
    """
    B, T = q.shape[:2]
    S = k.shape[1]
    if sparse and topk_indices is None:
        raise ValueError("sparse indexer loss needs topk_indices")
    if starts is None or ends is None:
        starts, ends = causal_window(B, T, S, device=q.device)
    if query_valid_rows is not None:
        query_valid_rows = query_valid_rows.to(torch.bool).expand(B, T)
    return IndexerLossReference.apply(
        q, k, w, query, key, topk_indices, starts, ends, float(softmax_scale), float(loss_coeff),
        bool(sparse), bool(use_relu), query_valid_rows, bool(calculate_per_token_loss), tp_group,
        int(row_block),
    )
