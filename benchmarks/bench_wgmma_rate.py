"""SM cycles per wgmma.m64nNk16 (bf16, operands in shared memory) by N, chain length and
warpgroups per SM, and per mma.sync.m16n8k16 by warps and independent accumulators (benchmarks/wgmma_rate_sm90.cu; Hopper). For the 16-head forward: a
transposed S^T = K Q^T runs m64n16k16 (N = heads), 36 chained k-steps per 64 keys.

    PYTHONPATH=$PWD python3 benchmarks/bench_wgmma_rate.py
"""
import ctypes
import os
import statistics
import subprocess
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from megatron_dsa.kernels.sparse_mla import cuda_impl as ci  # noqa: E402


def main():
    src = os.path.join(os.path.dirname(os.path.abspath(__file__)), "wgmma_rate_sm90.cu")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    iters = 2000
    sink = torch.zeros(1024, device="cuda")
    cycles = torch.zeros(sms, dtype=torch.int64, device="cuda")
    print(f"{'WGs/SM':>6s} {'N':>4s} {'chain':>5s} {'cycles/wgmma/SM':>16s} {'FLOP/cycle/SM':>14s}")
    for wgs in (1, 2, 3):
        so = os.path.join(tempfile.mkdtemp(), f"wgmma_rate_{wgs}.so")
        subprocess.run([ci._nvcc(), "-O3", "-shared", "-Xcompiler", "-fPIC", "-gencode=arch=compute_90a,code=sm_90a",
                        f"-DWGS={wgs}", "-o", so, src], check=True)
        lib = ctypes.CDLL(so)
        lib.wgmma_rate.argtypes = [ctypes.c_int] * 4 + [ctypes.c_void_p] * 2
        def median_cycles(launch):
            """Median over 3 launches of the median CTA's clock64 cycles."""
            res = []
            for _ in range(3):
                err = launch()
                assert err == 0, err
                torch.cuda.synchronize()
                res.append(statistics.median(cycles.tolist()))
            return statistics.median(res)

        for n, chain in ((16, 36), (16, 8), (32, 36), (64, 36)):
            cyc = median_cycles(lambda: lib.wgmma_rate(n, chain, iters, sms, sink.data_ptr(), cycles.data_ptr())) / (
                iters * chain * wgs)
            print(f"{wgs:6d} {n:4d} {chain:5d} {cyc:16.2f} {2 * 64 * n * 16 / cyc:14.0f}", flush=True)
        lib.mma_sync_rate.argtypes = [ctypes.c_int] * 3 + [ctypes.c_void_p] * 2
        for acc in (1, 2, 4):
            # per SM: 4 * wgs warps, each iters * 8 * acc MMAs of 2 * 16 * 8 * 16 FLOP
            n_mma = 4 * wgs * iters * 8 * acc
            cyc = median_cycles(lambda: lib.mma_sync_rate(acc, iters, sms, sink.data_ptr(), cycles.data_ptr())) / n_mma
            print(f"{4 * wgs:3d} warps mma.sync m16n8k16, {acc} independent accumulators per warp: "
                  f"{cyc:6.2f} cycles/mma/SM, {4096 / cyc:5.0f} FLOP/cycle/SM", flush=True)
    print("(dense bf16 peak: 4096 FLOP/cycle/SM)")


if __name__ == "__main__":
    main()
