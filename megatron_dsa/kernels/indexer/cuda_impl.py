"""The indexer's CUDA kernels: library and launchers.

* Select (``cuda/select_sm90.cuh``): the top-k of each row of fp32 scores by a radix select
  with shared-memory histograms, one CTA per row. It reads the score buffer and fills the same
  outputs as the Triton select (``triton_impl``), with the same sets (ties: the lowest index).
* Score (``cuda/score_sm90.cu``): the same scores as the Triton score kernel for D = 128 and
  up to 128 heads, bf16 or e4m3, with each head's ReLU / weight epilogue overlapping the next
  head's wgmma.

Built by :mod:`megatron_dsa.kernels.cuda_build` for sm_90a; launched through ``ctypes`` on the
current stream, without host synchronization. The algorithms are described in the sources.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from ..cuda_build import CudaLibrary

__all__ = ["LIBRARY", "MAX_TOPK", "cuda_select_reason", "select_cuda", "score_cuda_reason", "score_cuda"]

_DIR = Path(__file__).with_name("cuda")
_COMMON = Path(__file__).parents[1] / "sparse_mla" / "cuda" / "sm90_common.cuh"
# The most keys per row the kernel selects (its shared-memory candidate list).
MAX_TOPK = 6144


def _declare(lib) -> None:
    vp, ll, i32 = ctypes.c_void_p, ctypes.c_longlong, ctypes.c_int
    fn = lib.dsa_indexer_select
    fn.restype = i32
    fn.argtypes = [vp, ll, ll, vp, vp, ll, ll, i32, i32, i32, i32, i32, i32, i32, vp, vp, ll, ll, vp]
    fn = lib.dsa_indexer_score_sm90
    fn.restype = i32
    fn.argtypes = [i32, i32] + [vp] * 7 + [ll] * 13 + [i32] * 7 + [vp]


LIBRARY = CudaLibrary("indexer", (_DIR / "select_sm90.cu", _DIR / "score_sm90.cu"),
                      (_DIR / "select_sm90.cuh", _DIR / "score_sm90.cuh", _COMMON), "sm_90a", _declare)
# The score kernel's shapes: head dim, most heads, and its CTA's rows (the chunk plan's unit).
SCORE_D, SCORE_MAX_H, SCORE_ROWS = 128, 128, 128


def _int32_windows(starts, ends):
    """The kernels read int32 windows with one pair of strides (a no-op for the int32 windows
    ``triton_impl._prep`` makes for causal rows)."""
    starts, ends = starts.to(torch.int32), ends.to(torch.int32)
    if starts.stride() != ends.stride():
        starts, ends = starts.contiguous(), ends.contiguous()
    return starts, ends


def _stream(device: torch.device) -> int:
    """The handle of the current CUDA stream on ``device`` (the kernels launch on it)."""
    return torch.cuda.current_stream(device).cuda_stream


def cuda_select_reason(device: torch.device):
    """Why the CUDA select cannot run on ``device`` (``None`` when it can); builds the library
    only when the device fits."""
    if device.type != "cuda":
        return f"the CUDA select needs an sm_90 GPU (the inputs are on {device.type})"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) != (9, 0):
        return f"the CUDA select is built for sm_90a (Hopper); this GPU is sm_{major}{minor}"
    return LIBRARY.error()


def select_cuda(buf, starts, ends, idx, vals, row0, n_rows, S, causal, global_ids) -> None:
    """``triton_impl.launch_select``'s contract on the CUDA kernel: the top-k of rows
    ``[row0, row0 + n_rows)`` from ``buf [B, >= n_rows, >= S]`` (unit stride along keys) into
    ``idx`` / ``vals [B, T, topk]`` (unit stride along slots)."""
    B, T, topk = idx.shape
    if topk > MAX_TOPK:
        raise ValueError(f"the CUDA select takes topk <= {MAX_TOPK}, got topk={topk}")
    if buf.stride(-1) != 1 or idx.stride(-1) != 1 or vals.stride(-1) != 1 or idx.stride() != vals.stride():
        raise ValueError("the CUDA select needs unit-stride score rows and equal-stride outputs")
    starts, ends = _int32_windows(starts, ends)
    err = LIBRARY.get().dsa_indexer_select(
        buf.data_ptr(), buf.stride(0), buf.stride(1), starts.data_ptr(), ends.data_ptr(), starts.stride(0),
        starts.stride(1), int(causal), int(global_ids), row0, n_rows, B, S, topk, idx.data_ptr(), vals.data_ptr(),
        idx.stride(0), idx.stride(1), _stream(buf.device))
    if err != 0:
        raise RuntimeError(f"dsa_indexer_select failed to launch: CUDA error {err}")


def score_cuda_reason(q: torch.Tensor, k: torch.Tensor):
    """Why the CUDA score kernel cannot take these operands (``None`` when it can): bf16 or
    e4m3 q ``[B, T, H, 128]`` / k ``[B, S, 128]`` with H <= 128, unit channel stride and
    16-byte aligned rows, on an sm_90 GPU with the library built."""
    why = cuda_select_reason(q.device)
    if why is not None:
        return why
    D, H = q.shape[-1], q.shape[-2]
    if D != SCORE_D or not 1 <= H <= SCORE_MAX_H:
        return f"the CUDA score kernel takes head dim {SCORE_D} and 1..{SCORE_MAX_H} heads, got {D} / {H}"
    if q.dtype != k.dtype or q.dtype not in (torch.bfloat16, torch.float8_e4m3fn):
        return f"the CUDA score kernel takes bf16 or e4m3 q and k, got {q.dtype} / {k.dtype}"
    for name, t in (("q", q), ("k", k)):
        e = t.element_size()
        if t.stride(-1) != 1 or t.data_ptr() % 16 or any(st * e % 16 for st in t.stride()[:-1]):
            return f"the CUDA score kernel needs {name} with unit channel stride and 16-byte aligned rows"
    return None


def score_cuda(q, k, w, starts, ends, causal, use_relu, buf, row0, n_rows, k_scale=None) -> None:
    """``triton_impl._launch_scores``'s contract on the CUDA kernel (operands that
    :func:`score_cuda_reason` accepts): the masked scores of rows ``[row0, row0 + n_rows)``
    into ``buf [B, >= n_rows, >= S]`` fp32 (unit stride along keys)."""
    B, T, H, _ = q.shape
    S = k.shape[1]
    if buf.stride(-1) != 1 or w.dtype != torch.float32:
        raise ValueError("the CUDA score kernel needs a unit-stride fp32 buffer and fp32 head weights")
    starts, ends = _int32_windows(starts, ends)
    ks = k_scale.float().contiguous() if k_scale is not None else None
    err = LIBRARY.get().dsa_indexer_score_sm90(
        int(q.dtype == torch.float8_e4m3fn), int(use_relu), q.data_ptr(), k.data_ptr(), w.data_ptr(),
        starts.data_ptr(), ends.data_ptr(), ks.data_ptr() if ks is not None else None, buf.data_ptr(),
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), w.stride(0), w.stride(1), w.stride(2),
        starts.stride(0), starts.stride(1), buf.stride(0), buf.stride(1), ks.stride(0) if ks is not None else 0,
        row0, n_rows, T, S, H, int(causal), B, _stream(q.device))
    if err != 0:
        raise RuntimeError(f"dsa_indexer_score_sm90 failed to launch: CUDA error {err}")
