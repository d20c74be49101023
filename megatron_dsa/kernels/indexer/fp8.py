"""FP8 (e4m3) indexer inputs, the format DeepSeek-V3.2 selects keys with at inference.

Queries are quantized per (token, head) and keys per token, each row to its own scale
``amax / 448`` (e4m3's largest finite value). With positive scales the score factors:

    w[t,h] * ReLU(q[t,h] . k[s])  ~=  (w[t,h] * sq[t,h]) * ReLU(q8[t,h] . (k8[s] * sk[s]))

* ``indexer_topk(..., precision="fp8")`` — the e4m3 selection: on the Triton backend the score kernel reads
  the e4m3 queries and keys themselves (fp8 tensor-core dot products, fp32 accumulation), takes
  the query scales folded into the head weights and multiplies each key's score by its scale;
  elsewhere the reference scores the same values in fp32.
* :func:`fp8_selection_inputs` — fp32 inputs whose ordinary top-k is that selection (the e4m3
  query values, the folded weights, ``k8 * sk``), for paths that take plain tensors (the graphed
  top-k of packed batches).
"""

from __future__ import annotations

from typing import Tuple

import torch

__all__ = ["E4M3_MAX", "quantize_e4m3", "fp8_selection_inputs"]

E4M3_MAX = 448.0


def quantize_e4m3(x: torch.Tensor, dim: int = -1) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(x8 float8_e4m3fn, scale fp32)`` with ``x ~= x8 * scale``, one scale per row along
    ``dim`` (kept as a size-1 dim). All-zero rows get scale 1."""
    amax = x.detach().abs().amax(dim=dim, keepdim=True).float()
    scale = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
    x8 = (x.detach().float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return x8, scale


def fp8_selection_inputs(q: torch.Tensor, k: torch.Tensor, w: torch.Tensor):
    """fp32 indexer inputs (q ``[B, T, H, D]``, k ``[B, S, D]``, w ``[B, T, H]``) whose top-k is
    the e4m3 selection (see the module docstring)."""
    q8, sq = quantize_e4m3(q)
    k8, sk = quantize_e4m3(k)
    return q8.float(), k8.float() * sk, w.detach().float() * sq.squeeze(-1)
