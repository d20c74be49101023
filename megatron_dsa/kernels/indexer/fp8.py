"""FP8 (e4m3) indexer inputs, the format DeepSeek-V3.2 selects keys with at inference.

Queries are quantized per (token, head) and keys per token, each row to its own scale
``amax / 448`` (e4m3's largest finite value). With positive scales the score factors:

    w[t,h] * ReLU(q[t,h] . k[s])  ~=  (w[t,h] * sq[t,h]) * ReLU(q8[t,h] . (k8[s] * sk[s]))

* ``indexer_topk(..., precision="fp8")`` — the e4m3 selection: on the Triton backend the score kernel reads
  the e4m3 queries and keys themselves (fp8 tensor-core dot products, fp32 accumulation), takes
  the query scales folded into the head weights and multiplies each key's score by its scale;
  elsewhere the reference scores the same values in fp32.
* :func:`quantize_e4m3` — the quantization in torch ops (the reference, and the CPU path);
  :func:`quantize_e4m3_triton` — the same bits from one Triton pass (what the Triton backend
  runs: no fp32 temporaries). On sm_89 and later the GPU's own conversion forms the e4m3 bits
  (`cvt.rn.satfinite`: round to nearest even, saturating); elsewhere, Triton's interpreter
  included (its fp8 cast does not round to nearest), integer operations on the fp32 bit pattern
  form the same bits.
* :func:`fp8_selection_inputs` — fp32 inputs whose ordinary top-k is that selection (the e4m3
  query values, the folded weights, ``k8 * sk``), for paths that take plain tensors (the graphed
  top-k of packed batches).
"""

from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl

from ..backends import cuda_capability
from ..triton_common import interpreting

__all__ = ["E4M3_MAX", "quantize_e4m3", "quantize_e4m3_triton", "fp8_selection_inputs"]

E4M3_MAX = 448.0
# quantize_e4m3 works through this many elements at a time (fp32 temporaries: 4 bytes each)
_CHUNK_ELEMS = 1 << 24


def _rows_and_outputs(x: torch.Tensor):
    """``x``'s rows of the last dim as ``[n, D]`` (detached) and the empty e4m3 ``[n, D]`` and
    scale ``[n, 1]`` outputs the quantizations fill."""
    rows = x.detach().reshape(-1, x.shape[-1])
    return (rows, torch.empty(rows.shape, dtype=torch.float8_e4m3fn, device=x.device),
            torch.empty(rows.shape[0], 1, dtype=torch.float32, device=x.device))


def quantize_e4m3(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(x8 float8_e4m3fn, scale fp32)`` with ``x ~= x8 * scale``, one scale per row of the last
    dim (kept as a size-1 dim). All-zero rows get scale 1. Rows are quantized in chunks of
    ``_CHUNK_ELEMS`` elements, so the fp32 temporaries stay bounded (64 MB) whatever the length:
    the whole tensor at once held about 8 bytes per element (8 GiB for 64 x 128 query heads at
    S = 128K, more than the bf16 selection's whole peak). No host synchronization."""
    rows, x8, scale = _rows_and_outputs(x)
    n, D = rows.shape
    step = max(1, _CHUNK_ELEMS // max(D, 1))
    for r0 in range(0, n, step):
        part = rows[r0:r0 + step]
        amax = part.abs().amax(dim=-1, keepdim=True).float()
        s = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
        x8[r0:r0 + step] = (part.float() / s).clamp_(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
        scale[r0:r0 + step] = s
    return x8.view(x.shape), scale.view(*x.shape[:-1], 1)


@triton.jit
def _e4m3_bits(y):
    """e4m3fn bits (int32, 0..255) of fp32 ``y`` with ``|y| <= 448``: round to nearest even, as
    torch's cast. Normal results round the fp32 mantissa to 3 bits (a carry moves the exponent);
    results below 2^-6 are subnormal multiples of 2^-9, rounded by the 2^23 trick."""
    bits = y.to(tl.int32, bitcast=True)
    sign = (bits >> 24) & 0x80
    mag = bits & 0x7FFFFFFF
    a = tl.abs(y)
    normal = ((mag + 0x7FFFF + ((mag >> 20) & 1)) >> 20) - (120 << 3)
    sub = ((a * 512.0 + 8388608.0) - 8388608.0).to(tl.int32)
    out = tl.where(a < 0.015625, sub, normal) | sign
    return tl.where(y != y, 0x7F | sign, out)  # NaN keeps its sign bit, as torch


@triton.jit
def _quantize_rows(x_ptr, y_ptr, s_ptr, w_ptr, ws_ptr, pid, n_rows, stride_r, D: tl.constexpr,
                   BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, HW_CVT: tl.constexpr, FOLD_W: tl.constexpr):
    """Rows ``[pid BLOCK_R, (pid + 1) BLOCK_R)`` of ``x``: their e4m3 bytes and scales; with
    ``FOLD_W``, also ``ws[r] = w[r] * scale[r]`` (fp32; ``w`` one value per row)."""
    r = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    d = tl.arange(0, BLOCK_D)
    rmask = r < n_rows
    m = rmask[:, None] & (d < D)[None, :]
    x = tl.load(x_ptr + r[:, None].to(tl.int64) * stride_r + d[None, :], mask=m, other=0.0).to(tl.float32)
    amax = tl.max(tl.abs(x), axis=1)
    # as torch: a NaN makes the row's amax NaN, which takes the scale-1 branch
    nan_row = tl.max((x != x).to(tl.int32), axis=1) > 0
    scale = tl.where((amax > 0) & ~nan_row, tl.math.div_rn(amax, 448.0), 1.0)
    y = tl.math.div_rn(x, scale[:, None])
    if HW_CVT:
        # cvt.rn.satfinite.e4m3x2.f32 (sm_89+): round to nearest even and the clamp to +-448 in
        # one instruction per two values (a NaN stays NaN)
        bits = y.to(tl.float8e4nv).to(tl.uint8, bitcast=True)
    else:
        y = tl.maximum(y, -448.0, propagate_nan=tl.PropagateNan.ALL)
        y = tl.minimum(y, 448.0, propagate_nan=tl.PropagateNan.ALL)
        bits = _e4m3_bits(y)
    tl.store(y_ptr + r[:, None].to(tl.int64) * D + d[None, :], bits.to(tl.uint8), mask=m)
    tl.store(s_ptr + r, scale, mask=rmask)
    if FOLD_W:
        wv = tl.load(w_ptr + r, mask=rmask, other=0.0).to(tl.float32)
        tl.store(ws_ptr + r, wv * scale, mask=rmask)


@triton.jit
def _quantize_e4m3_kernel(x_ptr, y_ptr, s_ptr, n_rows, stride_r, D: tl.constexpr, BLOCK_R: tl.constexpr,
                          BLOCK_D: tl.constexpr, HW_CVT: tl.constexpr):
    _quantize_rows(x_ptr, y_ptr, s_ptr, s_ptr, s_ptr, tl.program_id(0), n_rows, stride_r, D, BLOCK_R, BLOCK_D,
                   HW_CVT, False)


@triton.jit
def _quantize_qk_kernel(q_ptr, q8_ptr, sq_ptr, w_ptr, ws_ptr, nq, stride_q, k_ptr, k8_ptr, sk_ptr, nk, stride_k,
                        nq_prog, D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
                        HW_CVT: tl.constexpr):
    """The queries' rows (and the head weights folded with their scales) in the first
    ``nq_prog`` programs, the keys' rows in the rest: one launch for both."""
    pid = tl.program_id(0)
    if pid < nq_prog:
        _quantize_rows(q_ptr, q8_ptr, sq_ptr, w_ptr, ws_ptr, pid, nq, stride_q, D, BLOCK_R, BLOCK_D, HW_CVT, True)
    else:
        _quantize_rows(k_ptr, k8_ptr, sk_ptr, w_ptr, ws_ptr, pid - nq_prog, nk, stride_k, D, BLOCK_R, BLOCK_D,
                       HW_CVT, False)


def _hardware_e4m3(device: torch.device) -> bool:
    """Whether the GPU converts fp32 to e4m3 itself (sm_89 and later); Triton's interpreter's
    fp8 cast does not round to nearest, so it takes the integer path."""
    return device.type == "cuda" and not interpreting() and cuda_capability(device) >= (8, 9)


def _unit_stride(rows: torch.Tensor) -> torch.Tensor:
    """``rows`` with unit stride along the last dim (the kernels' addressing)."""
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def _row_block(D: int) -> Tuple[int, int]:
    """(rows, padded columns) per program of the quantization kernels."""
    block_d = triton.next_power_of_2(D)
    return max(1, min(64, 8192 // block_d)), block_d


def quantize_e4m3_triton(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`quantize_e4m3` in one Triton pass (bit for bit the same e4m3 values and scales; a
    NaN's sign bit may differ): each row of the last dim read once, its e4m3 bytes and scale
    written. CUDA tensors or Triton's interpreter."""
    rows, x8, scale = _rows_and_outputs(x)
    rows = _unit_stride(rows)
    n, D = rows.shape
    if n > 0 and D > 0:
        block_r, block_d = _row_block(D)
        _quantize_e4m3_kernel[(triton.cdiv(n, block_r),)](rows, x8.view(torch.uint8), scale, n, rows.stride(0), D=D,
                                                          BLOCK_R=block_r, BLOCK_D=block_d,
                                                          HW_CVT=_hardware_e4m3(x.device), num_warps=4)
    return x8.view(x.shape), scale.view(*x.shape[:-1], 1)


def fp8_kernel_inputs(q: torch.Tensor, k: torch.Tensor, w: torch.Tensor):
    """What the Triton score kernel takes for the e4m3 selection: ``(q8, k8, w * sq, k_scale)``,
    the e4m3 queries and keys of :func:`quantize_e4m3_triton` (the same bytes), the query scales
    folded into the head weights (fp32 ``[B, T, H]``, ``w.float() * sq`` exactly), the per-key
    scales (fp32 ``[B, S]``). One launch quantizes both and folds the weights (a launch per
    tensor and a multiply cost the host more than the GPU work at S <= 8K)."""
    (qr, q8, sq), (kr, k8, sk) = _rows_and_outputs(q), _rows_and_outputs(k)
    qr, kr = _unit_stride(qr), _unit_stride(kr)
    wr = _unit_stride(w.detach().reshape(-1))
    ws = torch.empty(wr.shape, dtype=torch.float32, device=q.device)
    (nq, D), nk = qr.shape, kr.shape[0]
    if D > 0 and nq + nk > 0:
        block_r, block_d = _row_block(D)
        nq_prog = triton.cdiv(nq, block_r)
        _quantize_qk_kernel[(nq_prog + triton.cdiv(nk, block_r),)](
            qr, q8.view(torch.uint8), sq, wr, ws, nq, qr.stride(0), kr, k8.view(torch.uint8), sk, nk, kr.stride(0),
            nq_prog, D=D, BLOCK_R=block_r, BLOCK_D=block_d, HW_CVT=_hardware_e4m3(q.device), num_warps=4)
    return q8.view(q.shape), k8.view(k.shape), ws.view(w.shape), sk.view(k.shape[:-1])


def fp8_selection_inputs(q: torch.Tensor, k: torch.Tensor, w: torch.Tensor):
    """fp32 indexer inputs (q ``[B, T, H, D]``, k ``[B, S, D]``, w ``[B, T, H]``) whose top-k is
    the e4m3 selection (see the module docstring)."""
    q8, sq = quantize_e4m3(q)
    k8, sk = quantize_e4m3(k)
    return q8.float(), k8.float() * sk, w.detach().float() * sq.squeeze(-1)
