"""The indexer's CUDA select: library and launcher.

The select (``cuda/select_sm90.cuh``) takes the top-k of each row of fp32 scores by a radix
select with shared-memory histograms, one CTA per row. It reads the Triton score kernel's
buffer and fills the same outputs as the Triton select (``triton_impl``), with the same sets
(ties: the lowest index), in a third to a half of its time.

Built by :mod:`megatron_dsa.kernels.cuda_build` for sm_90a; launched through ``ctypes`` on the
current stream, without host synchronization. The algorithms are described in the sources.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from ..backends import cuda_capability
from ..cuda_build import CudaLibrary

__all__ = ["LIBRARY", "MAX_TOPK", "cuda_select_reason", "select_cuda"]

_DIR = Path(__file__).with_name("cuda")
_COMMON = Path(__file__).parents[1] / "sparse_mla" / "cuda" / "sm90_common.cuh"  # set_smem_once
# The most keys per row the kernel selects (its shared-memory candidate list).
MAX_TOPK = 6144


def _declare(lib) -> None:
    """The C signature of the entry point (``select_sm90.cu``'s ``dsa_indexer_select``)."""
    vp, ll, i32 = ctypes.c_void_p, ctypes.c_longlong, ctypes.c_int
    fn = lib.dsa_indexer_select
    fn.restype = i32
    fn.argtypes = [vp, ll, ll, vp, vp, ll, ll, i32, i32, i32, i32, i32, i32, i32, vp, vp, ll, ll, vp]


LIBRARY = CudaLibrary("indexer", (_DIR / "select_sm90.cu",), (_DIR / "select_sm90.cuh", _COMMON), "sm_90a",
                      _declare)


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
    major, minor = cuda_capability(device)
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
