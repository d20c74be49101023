"""How fast can a kernel gather the selected kv rows of every query row into shared memory,
with no math? (benchmarks/gather_rate_sm90.cu; Hopper.) The floor of a sparse MLA forward
that gathers each selected row once per query row: at 16 heads the gathers are nearly all of it.

    PYTHONPATH=$PWD python3 benchmarks/bench_gather_rate.py [--S 16384] [--k 2048]

Prints, for 16-byte cp.async gathers and for one bulk copy per row: ms, TB/s moved into shared
memory, and the time the 16-head forward target (185 TFLOP/s) allows at that S.
"""
import argparse
import ctypes
import os
import subprocess
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import time_cuda  # noqa: E402

from megatron_dsa.kernels.sparse_mla import cuda_impl as ci  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--S", type=int, default=16384)
    ap.add_argument("--k", type=int, default=2048)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--stages", default="2,4,5,8", help="ring stages of 16 rows per CTA (one build each)")
    a = ap.parse_args()
    src = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gather_rate_sm90.cu")
    libs = {}
    for ns in [int(x) for x in a.stages.split(",")]:
        so = os.path.join(tempfile.mkdtemp(), f"gather_rate_{ns}.so")
        subprocess.run([ci._nvcc(), "-O3", "-shared", "-Xcompiler", "-fPIC", "-gencode=arch=compute_90a,code=sm_90a",
                        f"-DGATHER_STAGES={ns}", "-o", so, src], check=True)
        lib = ctypes.CDLL(so)
        lib.gather_rate.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int,
                                    ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
        lib.gather_rate_ctas_per_sm.argtypes = [ctypes.c_int]
        libs[ns] = lib
    S, k = a.S, a.k
    kv = torch.randn(S, 576, device="cuda").bfloat16()
    idx = torch.randint(0, S, (S, k), device="cuda", dtype=torch.int32)  # every slot valid
    sink = torch.zeros(1, dtype=torch.int64, device="cuda")
    gbytes = S * k * 1152 / 1e9
    target_ms = 2 * S * 16 * k * (576 + 512) / 185e12 * 1e3
    print(f"S={S} k={k}: {gbytes:.1f} GB gathered; the 16-head target (185 TFLOP/s) allows {target_ms:.2f} ms")
    print("| stages | mode | CTAs/SM | rows in flight per SM (at most) | ms | TB/s |")
    for ns, lib in libs.items():
        for mode, name in ((0, "cp.async 16 B"), (1, "bulk copy per row")):
            def run():
                err = lib.gather_rate(mode, kv.data_ptr(), idx.data_ptr(), S, k, S, sink.data_ptr(),
                                      torch.cuda.current_stream().cuda_stream)
                assert err == 0, err
            ts = sorted(time_cuda(run, warmup=2, reps=a.reps) for _ in range(3))
            ctas = lib.gather_rate_ctas_per_sm(mode)
            rows = ctas * lib.gather_rate_rows_per_cta()
            print(f"| {ns} | {name} | {ctas} | {rows} | {ts[1]:.3f} | {gbytes / ts[1]:.2f} |", flush=True)


if __name__ == "__main__":
    main()
