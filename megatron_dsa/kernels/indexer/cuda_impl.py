"""The indexer's CUDA kernels: library and launchers.

* The score kernel (``cuda/score_sm90.cu``) writes the masked fp32 scores of a chunk of query
  rows into the score buffer, as the Triton score kernel does: persistent CTAs over 64 x 256
  tiles, a producer warpgroup and two wgmma warpgroups, bf16 or e4m3 operands, head dim 128,
  an even head count (``cuda_score_reason`` says why not otherwise).
* The select (``cuda/select_sm90.cuh``) takes the top-k of each row of fp32 scores by a radix
  select with shared-memory histograms, one CTA per row. It reads the score buffer and fills
  the same outputs as the Triton select (``triton_impl``), with the same sets (ties: the lowest
  index), in a third to a half of its time.

Built by :mod:`megatron_dsa.kernels.cuda_build` for sm_90a; launched through ``ctypes`` on the
current stream, without host synchronization. The algorithms are described in the sources.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from ..cuda_build import CudaLibrary

__all__ = ["LIBRARY", "MAX_TOPK", "cuda_select_reason", "cuda_score_reason", "select_cuda", "score_cuda"]

_DIR = Path(__file__).with_name("cuda")
_COMMON = Path(__file__).parents[1] / "sparse_mla" / "cuda" / "sm90_common.cuh"  # set_smem_once
# The most keys per row the kernel selects (its shared-memory candidate list).
MAX_TOPK = 6144


def _declare(lib) -> None:
    vp, ll, i32 = ctypes.c_void_p, ctypes.c_longlong, ctypes.c_int
    fn = lib.dsa_indexer_select
    fn.restype = i32
    fn.argtypes = [vp, ll, ll, vp, vp, ll, ll, i32, i32, i32, i32, i32, i32, i32, vp, vp, ll, ll, vp]
    fn = lib.dsa_indexer_score_sm90
    fn.restype = i32
    fn.argtypes = [vp] * 9 + [ll] * 13 + [i32] * 10 + [vp]
    lib.dsa_indexer_score_smem_bytes.restype = i32
    lib.dsa_indexer_score_smem_bytes.argtypes = [i32]


LIBRARY = CudaLibrary("indexer", (_DIR / "select_sm90.cu", _DIR / "score_sm90.cu"), (_DIR / "select_sm90.cuh", _COMMON),
                      "sm_90a", _declare)
# The score kernel's head dim, and its tile (rows, keys).
SCORE_D = 128
SCORE_TILE = (64, 256)


def int32_windows(starts, ends):
    """The windows as the kernel reads them: int32 with one pair of strides (a no-op when they
    are already; ``triton_impl.indexer_topk_triton`` converts once per call, not per chunk)."""
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
    starts, ends = int32_windows(starts, ends)
    err = LIBRARY.get().dsa_indexer_select(
        buf.data_ptr(), buf.stride(0), buf.stride(1), starts.data_ptr(), ends.data_ptr(), starts.stride(0),
        starts.stride(1), int(causal), int(global_ids), row0, n_rows, B, S, topk, idx.data_ptr(), vals.data_ptr(),
        idx.stride(0), idx.stride(1), _stream(buf.device))
    if err != 0:
        raise RuntimeError(f"dsa_indexer_select failed to launch: CUDA error {err}")


def cuda_score_reason(device: torch.device, head_dim: int, heads: int):
    """Why the CUDA score kernel cannot run (``None`` when it can): an sm_90 GPU with the library
    built, head dim 128 and an even head count."""
    if head_dim != SCORE_D:
        return f"the CUDA score kernel takes head dim {SCORE_D}, got {head_dim}"
    if heads % 2:
        return f"the CUDA score kernel takes an even head count, got {heads}"
    return cuda_select_reason(device)


_SMS = {}


def _sm_count(device: torch.device) -> int:
    i = device.index if device.index is not None else torch.cuda.current_device()
    if i not in _SMS:
        _SMS[i] = torch.cuda.get_device_properties(i).multi_processor_count
    return _SMS[i]


def _tile_windows(starts, ends, row0, n_rows, S, rows_per_tile):
    """Per (batch, row tile of the launch): the union ``[lo, hi)`` of its rows' clamped windows
    (``lo = S, hi = 0`` when every row is empty), int32 ``[B, n_rt]``: which key tiles the kernel
    computes. Torch ops on the device, no synchronization."""
    st = starts[:, row0:row0 + n_rows].to(torch.int32).clamp(min=0)
    en = ends[:, row0:row0 + n_rows].to(torch.int32).clamp(max=S)
    empty = en <= st
    st = st.masked_fill(empty, S)
    en = en.masked_fill(empty, 0)
    pad = (-n_rows) % rows_per_tile
    if pad:
        st = torch.nn.functional.pad(st, (0, pad), value=S)
        en = torch.nn.functional.pad(en, (0, pad), value=0)
    B = st.shape[0]
    lo = st.reshape(B, -1, rows_per_tile).amin(-1).to(torch.int32).contiguous()
    hi = en.reshape(B, -1, rows_per_tile).amax(-1).to(torch.int32).contiguous()
    return lo, hi


def score_cuda(q, k, w, starts, ends, causal, use_relu, buf, row0, n_rows, k_scale=None, grid=None) -> None:
    """``triton_impl._launch_scores``' contract on the CUDA score kernel: the masked scores of rows
    ``[row0, row0 + n_rows)`` into ``buf [B, >= n_rows, >= S]`` (8-byte aligned, even strides).
    q ``[B, T, H, 128]`` and k ``[B, S, 128]`` bf16, or e4m3 with ``k_scale [B, S]`` fp32;
    w ``[B, T, H]`` (any float dtype: read as fp32). ``grid``: persistent CTAs (default: one per
    SM)."""
    B, T, H, D = q.shape
    S = k.shape[1]
    fp8 = q.dtype == torch.float8_e4m3fn
    if D != SCORE_D or H % 2 or q.dtype != k.dtype or q.dtype not in (torch.bfloat16, torch.float8_e4m3fn) or (
            fp8 != (k_scale is not None)):
        raise ValueError(f"the CUDA score kernel takes bf16 (or e4m3 with k_scale) q / k with head dim {SCORE_D} and "
                         f"an even head count, got q {q.dtype} {tuple(q.shape)}, k {k.dtype}, k_scale "
                         f"{'given' if k_scale is not None else 'none'}")
    es = q.element_size()
    if q.stride(-1) != 1 or any((x * es) % 16 for x in q.stride()[:3]) or q.data_ptr() % 16:
        q = q.contiguous()
    if k.stride(-1) != 1 or any((x * es) % 16 for x in k.stride()[:2]) or k.data_ptr() % 16:
        k = k.contiguous()
    if w.dtype != torch.float32:
        w = w.float()
    if buf.stride(-1) != 1 or buf.stride(0) % 2 or buf.stride(1) % 2 or buf.data_ptr() % 8:
        raise ValueError("the CUDA score kernel needs a unit-stride, 8-byte aligned score buffer with even strides")
    if causal:
        lo = hi = None
        sse = (0, 0)
    else:
        starts, ends = int32_windows(starts, ends)
        lo, hi = _tile_windows(starts, ends, row0, n_rows, S, SCORE_TILE[0])
        sse = (starts.stride(0), starts.stride(1))
    ks = k_scale.float() if k_scale is not None else None
    if ks is not None and ks.stride(-1) != 1:
        ks = ks.contiguous()
    ptr = lambda x: None if x is None else x.data_ptr()  # noqa: E731
    err = LIBRARY.get().dsa_indexer_score_sm90(
        q.data_ptr(), k.data_ptr(), w.data_ptr(), None if causal else starts.data_ptr(),
        None if causal else ends.data_ptr(), ptr(lo), ptr(hi), ptr(ks), buf.data_ptr(),
        q.stride(0) * es, q.stride(1) * es, q.stride(2) * es, k.stride(0) * es, k.stride(1) * es,
        w.stride(0), w.stride(1), w.stride(2), sse[0], sse[1], ks.stride(0) if ks is not None else 0,
        buf.stride(0), buf.stride(1), row0, n_rows, B, T, S, H, int(fp8), int(causal), int(use_relu),
        grid if grid is not None else _sm_count(q.device), _stream(q.device))
    if err != 0:
        raise RuntimeError(f"dsa_indexer_score_sm90 failed to launch: CUDA error {err}")
