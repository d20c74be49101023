"""Hopper (sm_90a) CUDA forward and backward for sparse MLA: build, load and launch.

The forward (``cuda/sparse_mla_fwd_sm90.cu``) covers the DeepSeek-V3.2 fast path: bf16, Dqk = 576,
d_v = 512, 64 heads per CTA (H > 16; the last head tile is masked), warp-specialized (an S /
softmax warpgroup holding the query in registers, two P V / gather warpgroups). Up to 16 heads
(tensor-parallel shards) run ``cuda/sparse_mla_fwd16_sm90.cu``: the transposed problem (keys as
wgmma's M), one persistent CTA per SM whose warpgroups gather into a 10-slot ring, issue S^T,
run the softmax and accumulate O^T. It is built
with ``nvcc`` on first use into a per-user cache (keyed by the source hash and the compiler), as
a plain shared library with a C entry point, and launched through ``ctypes`` on the current
stream: no PyTorch headers to compile, no host synchronization, graph-capturable.

Where the kernel cannot be used (no ``nvcc``, not an sm_90 device, other shapes or dtypes, or
``MEGATRON_DSA_CUDA_FWD=0``) :func:`cuda_fwd_eligible` says no and the Triton forward runs.
A failed build is reported once as a warning and then treated as unavailable.

The backward (``cuda/sparse_mla_bwd_sm90.cu``, same library) covers the same shapes, any head
count, when the backward is not deterministic: one CTA per (row, 64 heads) keeps the row's Q and dO in shared
memory, writes dq once (no dq workspace) and adds dkv into an fp32 workspace whose columns are
stored permuted (so each warp's adds cover whole 128-byte lines; :func:`unpermute_dkv`). Its per-head
statistics (logZ, Delta, d_sink) come from the Triton stats kernel. ``MEGATRON_DSA_CUDA_BWD=0``
keeps the Triton backward.

Both stop each row at its effective length (:func:`effective_lengths`), computed on the device
by one launch of ``cuda/row_lengths.cu`` (same library).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path
from typing import Optional, Tuple

import torch

__all__ = ["cuda_fwd_available", "cuda_fwd_eligible", "sparse_mla_fwd_cuda", "cuda_bwd_eligible",
           "sparse_mla_bwd_cuda", "unpermute_dkv", "build_library"]

_DIR = Path(__file__).with_name("cuda")
_SRC = _DIR / "sparse_mla_fwd_sm90.cu"
_SRC_BWD = _DIR / "sparse_mla_bwd_sm90.cu"
_SRC_LEN = _DIR / "row_lengths.cu"
_SRC16 = _DIR / "sparse_mla_fwd16_sm90.cu"
_SOURCES = (_SRC, _SRC_BWD, _SRC_LEN, _SRC16)
_HEADERS = (_DIR / "sm90_common.cuh",)
_LIB = None
_LIB_ERROR: Optional[str] = None
LOG2E = 1.4426950408889634
# 2-CTA cluster variant for 64 < H <= 128 (the two head blocks of a token share their kv
# gathers, halving the L2 traffic). Correct on an H100 but measured slower (37.9 vs 21.5 ms at
# S=16K, 128 heads): off unless MEGATRON_DSA_CUDA_FWD_CLUSTER=1.
CLUSTER = os.environ.get("MEGATRON_DSA_CUDA_FWD_CLUSTER", "0") not in ("", "0", "false", "False")
# The largest head count routed to the 16-head forward; more heads run the 64-head forward (the
# last tile masked). Measured on an H100 at S = 16K, k = 2048 against the Triton kernels this
# replaced below 33 heads: forward 9.30 vs 10.33 ms at 32 heads, 9.32 vs 10.12 at 24; the
# 64-head CUDA backward 30.2-30.8 ms at 1-32 heads against Triton's 34.5-43.0.
MAX_HEADS16 = 16


def _nvcc() -> Optional[str]:
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if home and (Path(home) / "bin" / "nvcc").exists():
            return str(Path(home) / "bin" / "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    try:
        from torch.utils.cpp_extension import CUDA_HOME
    except Exception:  # pragma: no cover - torch without cpp_extension
        CUDA_HOME = None
    if CUDA_HOME and (Path(CUDA_HOME) / "bin" / "nvcc").exists():
        return str(Path(CUDA_HOME) / "bin" / "nvcc")
    return None


def _cache_dir() -> Path:
    root = os.environ.get("MEGATRON_DSA_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "megatron_dsa")
    return Path(root)


def build_library(force: bool = False, defines: Tuple[str, ...] = (), extra_flags: Tuple[str, ...] = ()) -> Path:
    """Compile the kernel library (or return the cached one). Raises on failure.

    ``defines`` (``-D`` flags) and ``extra_flags`` (e.g. ``-lineinfo`` for a profiler) are for
    experiments in benchmarks only."""
    nvcc = _nvcc()
    if nvcc is None:
        raise RuntimeError("nvcc not found (set CUDA_HOME or put nvcc on PATH)")
    src = b"".join(f.read_bytes() for f in (*_SOURCES, *_HEADERS))
    flags = ["-O3", "-shared", "-Xcompiler", "-fPIC", "-std=c++17",
             "-gencode=arch=compute_90a,code=sm_90a", *[f"-D{d}" for d in defines], *extra_flags]
    key = hashlib.sha256(src + nvcc.encode() + " ".join(flags).encode()).hexdigest()[:16]
    out = _cache_dir() / f"sparse_mla_sm90-{key}.so"
    if out.exists() and not force:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    # build into a temporary name and rename: several ranks may build at once
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        proc = subprocess.run([nvcc, *flags, "-o", tmp, *map(str, _SOURCES)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"nvcc failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def load_library(path: Path):
    lib = ctypes.CDLL(str(path))
    fn = lib.dsa_sparse_mla_fwd_sm90
    fn.restype = ctypes.c_int
    ll, i32, vp = ctypes.c_longlong, ctypes.c_int, ctypes.c_void_p
    fn.argtypes = [vp] * 7 + [ll] * 6 + [i32] * 4 + [ctypes.c_float, i32, vp]
    bwd = lib.dsa_sparse_mla_bwd_sm90
    bwd.restype = ctypes.c_int
    bwd.argtypes = [vp] * 10 + [ll] * 8 + [i32] * 5 + [ctypes.c_float, vp]
    lib.dsa_sparse_mla_bwd_smem_bytes.argtypes = []
    f16 = lib.dsa_sparse_mla_fwd16_sm90
    f16.restype = ctypes.c_int
    f16.argtypes = [vp] * 7 + [ll] * 6 + [i32] * 4 + [ctypes.c_float, vp]
    lens = lib.dsa_row_lengths
    lens.restype = ctypes.c_int
    lens.argtypes = [vp, ll, vp, i32, i32, vp, vp]
    return lib


def _load():
    global _LIB, _LIB_ERROR
    if _LIB is not None or _LIB_ERROR is not None:
        return _LIB
    try:
        _LIB = load_library(build_library())
    except Exception as exc:  # build or load failure: fall back to Triton, say so once
        _LIB_ERROR = str(exc)
        warnings.warn(f"megatron_dsa: CUDA sparse MLA forward unavailable, using Triton: {exc}")
    return _LIB


def _env_off(name: str) -> bool:
    return os.environ.get(name, "1") in ("0", "false", "False")


def cuda_fwd_available(device: Optional[torch.device] = None) -> bool:
    """True when the library builds/loads and ``device`` is an sm_90 GPU."""
    if _env_off("MEGATRON_DSA_CUDA_FWD"):
        return False
    if not torch.cuda.is_available():
        return False
    dev = device if device is not None else torch.device("cuda", torch.cuda.current_device())
    if torch.cuda.get_device_capability(dev) != (9, 0):
        return False
    return _load() is not None


def cuda_fwd_eligible(q: torch.Tensor, kv: torch.Tensor, d_v: int) -> bool:
    """Whether a CUDA forward handles these inputs (else the Triton forward runs): the 16-head
    kernel for H <= ``MAX_HEADS16``, the 64-head one above."""
    return (
        q.is_cuda and q.dtype == torch.bfloat16 and kv.dtype == torch.bfloat16
        and q.shape[-1] == 576 and d_v == 512 and q.shape[1] >= 1
        and cuda_fwd_available(q.device)
    )


def _rows16(t: torch.Tensor) -> torch.Tensor:
    """``t`` with unit channel stride and 16-byte aligned rows (the kernels' 16-byte loads)."""
    if t.stride(-1) != 1 or any(st % 8 for st in t.stride()[:-1]) or t.data_ptr() % 16:
        return t.contiguous()
    return t


def _check_inputs(q: torch.Tensor, kv: torch.Tensor, what: str) -> None:
    if q.shape[-1] != 576 or q.dtype != torch.bfloat16 or kv.dtype != torch.bfloat16:
        raise ValueError(f"CUDA sparse MLA {what} needs bf16 q/kv with 576 channels")


def sparse_mla_fwd_cuda(
    q: torch.Tensor,
    kv: torch.Tensor,
    indices: torch.Tensor,
    softmax_scale: float,
    topk_length: Optional[torch.Tensor] = None,
    sink: Optional[torch.Tensor] = None,
    lib=None,
    cluster: Optional[bool] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Forward only: ``(out [T, H, 512] bf16, lse [T, H] fp32)``; same contract as the Triton one.

    H <= ``MAX_HEADS16`` runs the 16-head kernel, any other H the 64-head one.
    ``lib`` (benchmarks only): a library from :func:`load_library` to launch instead.
    ``cluster``: use the 2-CTA cluster variant when 64 < H <= 128 (default: ``CLUSTER``)."""
    lib = lib if lib is not None else _load()
    if lib is None:
        raise RuntimeError(f"CUDA sparse MLA forward unavailable: {_LIB_ERROR}")
    T, H, Dqk = q.shape
    _check_inputs(q, kv, "forward")
    q, kv = _rows16(q), _rows16(kv)
    indices = indices.to(torch.int32).contiguous()
    # the kernel stops at this length: trailing -1 padding (causal rows t < k) is not computed
    kv_len = effective_lengths(indices, topk_length, lib)
    if sink is not None:
        sink = sink.float().contiguous()
    out = torch.empty(T, H, 512, dtype=q.dtype, device=q.device)
    lse = torch.empty(T, H, dtype=torch.float32, device=q.device)
    if T == 0:
        return out, lse
    args = (q.data_ptr(), kv.data_ptr(), indices.data_ptr(),
            kv_len.data_ptr(), sink.data_ptr() if sink is not None else None,
            out.data_ptr(), lse.data_ptr(),
            q.stride(0), q.stride(1), kv.stride(0), indices.stride(0), out.stride(0), out.stride(1),
            T, H, kv.shape[0], indices.shape[1], float(softmax_scale) * LOG2E)
    with torch.cuda.device(q.device):
        stream = torch.cuda.current_stream(q.device).cuda_stream
        if H <= MAX_HEADS16:
            err = lib.dsa_sparse_mla_fwd16_sm90(*args, stream)
        else:
            err = lib.dsa_sparse_mla_fwd_sm90(*args, int(CLUSTER if cluster is None else cluster), stream)
    if err != 0:
        raise RuntimeError(f"CUDA sparse MLA forward launch failed: cudaError {err}")
    return out, lse


def cuda_bwd_eligible(q: torch.Tensor, kv: torch.Tensor, d_v: int, deterministic: bool) -> bool:
    """Whether the CUDA backward handles these inputs (else the Triton backward runs)."""
    # any head count (64-head tiles, the last one masked)
    return not deterministic and not _env_off("MEGATRON_DSA_CUDA_BWD") and cuda_fwd_eligible(q, kv, d_v)


def effective_lengths(indices: torch.Tensor, topk_length: Optional[torch.Tensor], lib=None) -> torch.Tensor:
    """Per row, one past the last slot holding an id >= 0 (capped by ``topk_length``): int32 [T].

    Device-side (no host sync). Causal rows t < k end in -1 padding; the kernels skip the
    blocks past this length instead of computing them masked. On a GPU with the library loaded
    (``lib``, default: this module's) one kernel launch (``cuda/row_lengths.cu``); otherwise the
    PyTorch expression :func:`_effective_lengths_torch`."""
    if indices.dim() != 2:
        raise ValueError(f"indices must be [T, K], got shape {tuple(indices.shape)}")
    if topk_length is not None and tuple(topk_length.shape) != (indices.shape[0],):
        raise ValueError(f"topk_length must be [T] = [{indices.shape[0]}], got shape {tuple(topk_length.shape)}")
    if indices.is_cuda:
        lib = lib if lib is not None else (_load() if cuda_fwd_available(indices.device) else None)
    else:
        lib = None
    if lib is None:
        return _effective_lengths_torch(indices, topk_length)
    T, K = indices.shape
    idx = indices if indices.dtype == torch.int32 and indices.stride(-1) == 1 else indices.to(torch.int32).contiguous()
    cap = topk_length.to(torch.int32).contiguous() if topk_length is not None else None
    out = torch.empty(T, dtype=torch.int32, device=indices.device)
    with torch.cuda.device(indices.device):
        err = lib.dsa_row_lengths(idx.data_ptr(), idx.stride(0), cap.data_ptr() if cap is not None else None,
                                  T, K, out.data_ptr(), torch.cuda.current_stream(indices.device).cuda_stream)
    if err != 0:
        raise RuntimeError(f"row length kernel launch failed: cudaError {err}")
    return out


def _effective_lengths_torch(indices: torch.Tensor, topk_length: Optional[torch.Tensor]) -> torch.Tensor:
    """:func:`effective_lengths` in plain PyTorch (the CPU path and the kernel's reference)."""
    K = indices.shape[1]
    pos = torch.arange(1, K + 1, device=indices.device, dtype=torch.int32)
    last = torch.where(indices >= 0, pos, 0).amax(1) if K > 0 else torch.zeros(
        indices.shape[0], dtype=torch.int32, device=indices.device)
    if topk_length is not None:
        last = torch.minimum(last, topk_length.to(torch.int32).clamp(0, K))
    return last.to(torch.int32).contiguous()


def sparse_mla_bwd_cuda(
    q: torch.Tensor,
    kv: torch.Tensor,
    indices: torch.Tensor,
    softmax_scale: float,
    topk_length: Optional[torch.Tensor],
    sink: Optional[torch.Tensor],
    lse: torch.Tensor,
    dout: torch.Tensor,
    stats: torch.Tensor,
    target_out: Optional[torch.Tensor] = None,
    lib=None,
    dkv_dtype: torch.dtype = torch.float32,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(dq bf16 [T, H, 576], dkv [Tk, 576] in dkv_dtype)`` from the saved ``stats``
    (``[2, T, H]`` fp32: log2-domain logZ, Delta; the Triton stats kernel writes them).
    ``target_out`` (fp32 ``[T, K]``, zero-filled): += the head-summed P per slot (the indexer
    loss's target)."""
    lib = lib if lib is not None else _load()
    if lib is None:
        raise RuntimeError(f"CUDA sparse MLA backward unavailable: {_LIB_ERROR}")
    T, H, Dqk = q.shape
    _check_inputs(q, kv, "backward")
    if tuple(dout.shape) != (T, H, 512) or dout.dtype != torch.bfloat16:
        raise ValueError(f"dout must be bf16 {(T, H, 512)}, got {dout.dtype} {tuple(dout.shape)}")
    if kv.shape[0] * 576 >= 2**31:
        raise ValueError(f"CUDA sparse MLA backward needs Tk * 576 < 2^31 (int32 offsets), got Tk={kv.shape[0]}")
    if target_out is not None and (not target_out.is_contiguous() or target_out.dtype != torch.float32
                                   or tuple(target_out.shape) != tuple(indices.shape)):
        raise ValueError("target_out must be a contiguous fp32 tensor shaped like the indices")
    q, kv, dout = _rows16(q), _rows16(kv), _rows16(dout)
    indices = indices.to(torch.int32).contiguous()
    kv_len = effective_lengths(indices, topk_length, lib)
    stats = stats.contiguous()
    lse = lse.contiguous()
    dq = torch.empty(T, H, Dqk, dtype=q.dtype, device=q.device)
    dkv = torch.zeros(kv.shape[0], Dqk, dtype=torch.float32, device=q.device)  # permuted columns
    if T == 0:
        return dq, dkv.to(dkv_dtype)
    with torch.cuda.device(q.device):
        err = lib.dsa_sparse_mla_bwd_sm90(
            q.data_ptr(), kv.data_ptr(), indices.data_ptr(), kv_len.data_ptr(), dout.data_ptr(),
            stats.data_ptr(), lse.data_ptr(), dq.data_ptr(), dkv.data_ptr(),
            target_out.data_ptr() if target_out is not None else None,
            q.stride(0), q.stride(1), kv.stride(0), indices.stride(0), dout.stride(0), dout.stride(1),
            dq.stride(0), dq.stride(1), T, H, kv.shape[0], indices.shape[1], int(sink is not None),
            float(softmax_scale), torch.cuda.current_stream(q.device).cuda_stream,
        )
    if err != 0:
        raise RuntimeError(f"CUDA sparse MLA backward launch failed: cudaError {err}")
    return dq, unpermute_dkv(dkv, dkv_dtype)


def unpermute_dkv(ws: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The backward kernel's fp32 dkv workspace ``[Tk, 576]`` (columns permuted, see
    ``cuda/sparse_mla_bwd_sm90.cu``, "dkv workspace") in channel order, cast to ``dtype``.

    Value channels ``128 pp + 64 a + 16 w + 8 i + r`` are stored at ``128 pp + 32 w + 4 r + 2 a + i``;
    rope channels ``512 + 16 w + 8 i + r`` at ``512 + 16 w + 2 r + i``. One strided copy per part."""
    if ws.dim() != 2 or ws.shape[1] != 576 or ws.dtype != torch.float32 or not ws.is_contiguous():
        raise ValueError(f"expected the contiguous fp32 [Tk, 576] workspace, got {ws.dtype} {tuple(ws.shape)}")
    Tk = ws.shape[0]
    out = torch.empty(Tk, 576, dtype=dtype, device=ws.device)
    # stored (pp, w, r, a, i) -> channel order (pp, a, w, i, r)
    out[:, :512].view(Tk, 4, 2, 4, 2, 8).copy_(ws[:, :512].view(Tk, 4, 4, 8, 2, 2).permute(0, 1, 4, 2, 5, 3))
    # stored (w, r, i) -> (w, i, r)
    out[:, 512:].view(Tk, 4, 2, 8).copy_(ws[:, 512:].view(Tk, 4, 8, 2).permute(0, 1, 3, 2))
    return out
