"""Hopper (sm_90a) CUDA forward for sparse MLA: build, load and launch.

The kernel (``cuda/sparse_mla_fwd_sm90.cu``) covers the DeepSeek-V3.2 fast path: bf16, Dqk = 576,
d_v = 512, 64 heads per CTA (any H; the last head tile is masked), warp-specialized (an S /
softmax warpgroup holding the query in registers, two P V / gather warpgroups). It is built
with ``nvcc`` on first use into a per-user cache (keyed by the source hash and the compiler), as
a plain shared library with a C entry point, and launched through ``ctypes`` on the current
stream: no PyTorch headers to compile, no host synchronization, graph-capturable.

Where the kernel cannot be used (no ``nvcc``, not an sm_90 device, other shapes or dtypes, or
``MEGATRON_DSA_CUDA_FWD=0``) :func:`cuda_fwd_eligible` says no and the Triton forward runs.
A failed build is reported once as a warning and then treated as unavailable.
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

__all__ = ["cuda_fwd_available", "cuda_fwd_eligible", "sparse_mla_fwd_cuda", "build_library"]

_SRC = Path(__file__).with_name("cuda") / "sparse_mla_fwd_sm90.cu"
_LIB = None
_LIB_ERROR: Optional[str] = None
LOG2E = 1.4426950408889634
# 2-CTA cluster variant for 64 < H <= 128 (the two head blocks of a token share their kv
# gathers, halving the L2 traffic). Compiled and checked by ptxas, NOT yet run on a GPU: off
# unless MEGATRON_DSA_CUDA_FWD_CLUSTER=1 (benchmarks/check_sparse_mla_cuda.py --cluster).
CLUSTER = os.environ.get("MEGATRON_DSA_CUDA_FWD_CLUSTER", "0") not in ("", "0", "false", "False")
# Smallest head count routed to this kernel (its tile is 64 heads; below this Triton's
# 16/32-head tiles waste less).
MIN_HEADS = 33


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


def build_library(force: bool = False, defines: Tuple[str, ...] = ()) -> Path:
    """Compile the kernel library (or return the cached one). Raises on failure.

    ``defines`` (``-D`` flags) are for timing experiments in benchmarks only."""
    nvcc = _nvcc()
    if nvcc is None:
        raise RuntimeError("nvcc not found (set CUDA_HOME or put nvcc on PATH)")
    src = _SRC.read_bytes()
    flags = ["-O3", "-shared", "-Xcompiler", "-fPIC", "-std=c++17",
             "-gencode=arch=compute_90a,code=sm_90a", *[f"-D{d}" for d in defines]]
    key = hashlib.sha256(src + nvcc.encode() + " ".join(flags).encode()).hexdigest()[:16]
    out = _cache_dir() / f"sparse_mla_fwd_sm90-{key}.so"
    if out.exists() and not force:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    # build into a temporary name and rename: several ranks may build at once
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        proc = subprocess.run([nvcc, *flags, "-o", tmp, str(_SRC)], capture_output=True, text=True)
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


def cuda_fwd_available(device: Optional[torch.device] = None) -> bool:
    """True when the library builds/loads and ``device`` is an sm_90 GPU."""
    if os.environ.get("MEGATRON_DSA_CUDA_FWD", "1") in ("0", "false", "False"):
        return False
    if not torch.cuda.is_available():
        return False
    dev = device if device is not None else torch.device("cuda", torch.cuda.current_device())
    if torch.cuda.get_device_capability(dev) != (9, 0):
        return False
    return _load() is not None


def cuda_fwd_eligible(q: torch.Tensor, kv: torch.Tensor, d_v: int) -> bool:
    """Whether the CUDA forward handles these inputs (else the Triton forward runs)."""
    return (
        q.is_cuda and q.dtype == torch.bfloat16 and kv.dtype == torch.bfloat16
        and q.shape[-1] == 576 and d_v == 512 and q.shape[1] >= MIN_HEADS
        and cuda_fwd_available(q.device)
    )


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

    ``lib`` (benchmarks only): a library from :func:`load_library` to launch instead.
    ``cluster``: use the 2-CTA cluster variant when 64 < H <= 128 (default: ``CLUSTER``)."""
    lib = lib if lib is not None else _load()
    if lib is None:
        raise RuntimeError(f"CUDA sparse MLA forward unavailable: {_LIB_ERROR}")
    T, H, Dqk = q.shape
    if Dqk != 576 or q.dtype != torch.bfloat16 or kv.dtype != torch.bfloat16:
        raise ValueError("CUDA sparse MLA forward needs bf16 q/kv with 576 channels")
    if q.stride(2) != 1 or q.stride(1) % 8 or q.stride(0) % 8 or q.data_ptr() % 16:
        q = q.contiguous()
    if kv.stride(1) != 1 or kv.stride(0) % 8 or kv.data_ptr() % 16:
        kv = kv.contiguous()
    indices = indices.to(torch.int32).contiguous()
    if topk_length is not None:
        topk_length = topk_length.to(torch.int32).contiguous()
    if sink is not None:
        sink = sink.float().contiguous()
    out = torch.empty(T, H, 512, dtype=q.dtype, device=q.device)
    lse = torch.empty(T, H, dtype=torch.float32, device=q.device)
    if T == 0:
        return out, lse
    with torch.cuda.device(q.device):
        err = lib.dsa_sparse_mla_fwd_sm90(
            q.data_ptr(), kv.data_ptr(), indices.data_ptr(),
            topk_length.data_ptr() if topk_length is not None else None,
            sink.data_ptr() if sink is not None else None,
            out.data_ptr(), lse.data_ptr(),
            q.stride(0), q.stride(1), kv.stride(0), indices.stride(0), out.stride(0), out.stride(1),
            T, H, kv.shape[0], indices.shape[1], float(softmax_scale) * LOG2E,
            int(CLUSTER if cluster is None else cluster), torch.cuda.current_stream(q.device).cuda_stream,
        )
    if err != 0:
        raise RuntimeError(f"CUDA sparse MLA forward launch failed: cudaError {err}")
    return out, lse
