"""Plain-PyTorch reference for sparse MLA attention in the absorbed layout.

  q        [T, H, Dqk]   absorbed queries (Dqk = kv_lora_rank + rope dim, 576 in DeepSeek-V3.2)
  kv       [Tk, Dqk]     one latent KV row per key, shared by every head; V = kv[:, :d_v]
  indices  [T, K] int    selected kv rows per query, ``-1`` = empty slot
  topk_length [T] int    optional: only the first ``topk_length[t]`` slots of row t are used
  sink     [H] fp32      optional per-head attention sink (a logit with no value)

  s[t,h,i]   = scale * q[t,h] . kv[indices[t,i]]           for valid slots
  lse[t,h]   = log sum_i exp(s[t,h,i])                      (natural log, sink NOT included)
  out[t,h]   = sum_i exp(s[t,h,i]) * V[indices[t,i]] / (exp(lse[t,h]) + exp(sink[h]))

A row without a valid slot returns ``out = 0`` and ``lse = -inf`` (never NaN). Duplicate ids
in one row count once per slot (they are not deduplicated). An empty slot reads zeros, never
another row: a NaN or Inf in a kv row reaches only the rows that select it.

Memory: the selected rows are gathered one block of query rows at a time and every block is
recomputed in the backward pass (activation checkpointing), so nothing dense in ``Tk`` is ever
built and the saved state is the inputs plus ``out``/``lse``. Gradients come from autograd on
the same plain ops, which makes this the reference for dq, dkv and d_sink as well.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch.utils.checkpoint import checkpoint

__all__ = ["sparse_mla_reference", "slot_validity"]


def slot_validity(
    indices: torch.Tensor, num_keys: int, topk_length: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Boolean ``[T, K]``: slot holds an id in ``[0, num_keys)`` and lies below topk_length."""
    valid = (indices >= 0) & (indices < num_keys)
    if topk_length is not None:
        slot = torch.arange(indices.shape[-1], device=indices.device)
        valid = valid & (slot.unsqueeze(0) < topk_length.to(slot.dtype).unsqueeze(-1))
    return valid


def _block(q, kv, indices, valid, sink, scale: float, d_v: int):
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    if kv.shape[0] == 0:  # no keys: every slot is empty (kv stays in the graph: zero gradient)
        sel = q.new_zeros(indices.shape + (kv.shape[1],), dtype=cdt) + kv.sum().to(cdt)
    else:
        safe = torch.where(valid, indices.long(), torch.zeros_like(indices, dtype=torch.long))
        # empty slots gathered row 0: zero them so nothing of it (a NaN, an Inf) can leak
        sel = kv[safe].to(cdt).masked_fill(~valid.unsqueeze(-1), 0.0)  # [t, K, Dqk]
    logits = torch.einsum("thd,tkd->thk", q.to(cdt), sel) * scale
    logits = logits.masked_fill(~valid.unsqueeze(1), float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)  # -inf on empty rows
    denom = lse if sink is None else torch.logaddexp(lse, sink.to(cdt).unsqueeze(0))
    finite = torch.isfinite(denom)
    denom_safe = torch.where(finite, denom, torch.zeros_like(denom))
    p = torch.exp(logits - denom_safe.unsqueeze(-1))  # exp(-inf) = 0 on empty slots
    out = torch.einsum("thk,tkd->thd", p, sel[..., :d_v])
    return out.to(q.dtype), lse


def sparse_mla_reference(
    q: torch.Tensor,
    kv: torch.Tensor,
    indices: torch.Tensor,
    softmax_scale: float,
    d_v: int = 512,
    topk_length: Optional[torch.Tensor] = None,
    sink: Optional[torch.Tensor] = None,
    row_block: int = 256,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(out [T, H, d_v] in q's dtype, lse [T, H] fp32 (fp64 for fp64 inputs))``."""
    T = q.shape[0]
    valid = slot_validity(indices, kv.shape[0], topk_length)
    outs, lses = [], []
    need_ckpt = torch.is_grad_enabled() and (
        q.requires_grad or kv.requires_grad or (sink is not None and sink.requires_grad)
    )
    for t0 in range(0, T, row_block) if T > 0 else (0,):  # T = 0: one empty block (keeps the graph)
        t1 = min(T, t0 + row_block)
        args = (q[t0:t1], kv, indices[t0:t1], valid[t0:t1], sink, softmax_scale, d_v)
        if need_ckpt:
            o, l = checkpoint(_block, *args, use_reentrant=False)
        else:
            o, l = _block(*args)
        outs.append(o)
        lses.append(l)
    out, lse = torch.cat(outs, 0), torch.cat(lses, 0)
    if lse.dtype != torch.float64:
        lse = lse.float()
    return out, lse
