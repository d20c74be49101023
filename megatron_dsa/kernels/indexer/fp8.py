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
# quantize_e4m3 works through this many elements at a time (fp32 temporaries: 4 bytes each)
_CHUNK_ELEMS = 1 << 24


def quantize_e4m3(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(x8 float8_e4m3fn, scale fp32)`` with ``x ~= x8 * scale``, one scale per row of the last
    dim (kept as a size-1 dim). All-zero rows get scale 1. Rows are quantized in chunks of
    ``_CHUNK_ELEMS`` elements, so the fp32 temporaries stay bounded (64 MB) whatever the length:
    the whole tensor at once held about 8 bytes per element (8 GiB for 64 x 128 query heads at
    S = 128K, more than the bf16 selection's whole peak). No host synchronization."""
    xd = x.detach()
    D = xd.shape[-1]
    rows = xd.reshape(-1, D)
    n = rows.shape[0]
    x8 = torch.empty(rows.shape, dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty(n, 1, dtype=torch.float32, device=x.device)
    step = max(1, _CHUNK_ELEMS // max(D, 1))
    for r0 in range(0, n, step):
        part = rows[r0:r0 + step]
        amax = part.abs().amax(dim=-1, keepdim=True).float()
        s = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
        x8[r0:r0 + step] = (part.float() / s).clamp_(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
        scale[r0:r0 + step] = s
    return x8.view(xd.shape), scale.view(*xd.shape[:-1], 1)


def fp8_selection_inputs(q: torch.Tensor, k: torch.Tensor, w: torch.Tensor):
    """fp32 indexer inputs (q ``[B, T, H, D]``, k ``[B, S, D]``, w ``[B, T, H]``) whose top-k is
    the e4m3 selection (see the module docstring)."""
    q8, sq = quantize_e4m3(q)
    k8, sk = quantize_e4m3(k)
    return q8.float(), k8.float() * sk, w.detach().float() * sq.squeeze(-1)
