"""Where the 16-head CUDA forward (``cuda/sparse_mla_fwd16_sm90.cu``) spends its time, on a GPU.

Times the shipped build against timing-only builds that leave a stage out (``FWD16_DBG``: 1 = no
gathers after the first ring fill, 2 = no S^T wgmmas, 4 = no O^T wgmmas; their outputs are wrong)
and the Triton forward, interleaved in rounds; then, with ``--phases``, one call of a
``FWD16_PROF`` build whose warpgroups add up clock64 cycles per phase (all CTAs), printed per
64-key block. S = 16K, 16 heads, k = 2048, causal ids by default.

    PYTHONPATH=$PWD python3 benchmarks/profile_fwd16.py [--S 16384] [--variants 1,2,4] [--phases]
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench_sparse_mla import flops, make_case  # noqa: E402
from common import time_cuda  # noqa: E402

from megatron_dsa.kernels.sparse_mla import cuda_impl as ci  # noqa: E402
from megatron_dsa.kernels.sparse_mla import triton_impl as ti  # noqa: E402

# the phases FWD16_PROF adds up (indices 0-8; 9 counts the blocks)
PHASES = ("S^T: issue (wait for slots, wgmma)", "S^T: wait for the softmax to read S", "S^T: hand-off, row end",
          "softmax: wait for S^T", "softmax: P^T, vote, hand-off, row end",
          "PV: wait for P^T", "PV: rescale, slot waits", "PV: O^T wgmma issue + wait", "PV: release, row end")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--S", type=int, default=16384)
    ap.add_argument("--k", type=int, default=2048)
    ap.add_argument("--variants", default="1,2,4", help="FWD16_DBG values to time beside the shipped build")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--phases", action="store_true", help="also print the per-phase cycle profile")
    a = ap.parse_args()

    q, kv, idx, _ = make_case(a.S, 16, a.k)
    scale = 576 ** -0.5
    libs = {"shipped": ci.load_library(ci.build_library())}
    for v in filter(None, a.variants.split(",")):
        libs[f"DBG={v}"] = ci.load_library(ci.build_library(defines=(f"FWD16_DBG={v}",)))
    fns = {n: (lambda lib=lib: ci.sparse_mla_fwd_cuda(q, kv, idx, scale, lib=lib)) for n, lib in libs.items()}
    fns["triton"] = lambda: ti.sparse_mla_fwd_triton(q, kv, idx, scale, 512)
    ref = fns["triton"]()[0].float()
    print(f"shipped vs triton: max abs diff {(fns['shipped']()[0].float() - ref).abs().max().item():.2e}")
    res = {n: [] for n in fns}
    for _ in range(a.rounds):
        for n, f in fns.items():
            res[n].append(time_cuda(f, warmup=1, reps=5))
    fl = flops(a.S, 16, a.k, "fwd")
    for n, ts in res.items():
        m = statistics.median(ts)
        print(f"S={a.S} H=16 {n:10s} {m:7.3f} ms {fl / m / 1e9:6.1f} TFLOP/s  rounds {['%.2f' % t for t in ts]}")

    if a.phases:
        lib = ctypes.CDLL(str(ci.build_library(defines=("FWD16_PROF",))))
        rd = lib.dsa_fwd16_prof_read
        rd.argtypes = [ctypes.c_void_p, ctypes.c_int]
        fn = lib.dsa_sparse_mla_fwd16_sm90
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.c_void_p] * 7 + [ctypes.c_longlong] * 6 + [ctypes.c_int] * 4 + [ctypes.c_float, ctypes.c_void_p]
        buf = (ctypes.c_ulonglong * 10)()
        kv_len = ci.effective_lengths(idx, None)
        out = torch.empty(a.S, 16, 512, device="cuda", dtype=torch.bfloat16)
        lse = torch.empty(a.S, 16, device="cuda")

        def call():
            err = fn(q.data_ptr(), kv.data_ptr(), idx.data_ptr(), kv_len.data_ptr(), None, out.data_ptr(),
                     lse.data_ptr(), q.stride(0), q.stride(1), kv.stride(0), idx.stride(0), out.stride(0),
                     out.stride(1), a.S, 16, a.S, a.k, scale * ti.LOG2E, torch.cuda.current_stream().cuda_stream)
            assert err == 0, err

        for _ in range(3):
            call()
        torch.cuda.synchronize()
        rd(buf, 1)
        call()
        torch.cuda.synchronize()
        rd(buf, 1)
        v = list(buf)
        print(f"per 64-key block, SM cycles summed over the CTAs / {v[9]} blocks (one call of the PROF build):")
        for name, cyc in zip(PHASES, v[:9]):
            print(f"  {name:42s} {cyc / v[9]:7.0f}")


if __name__ == "__main__":
    main()
