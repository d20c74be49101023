"""Where the time of one sparse MLA forward+backward goes (autograd, as the benchmark's
``fwd+bwd`` row runs it): every CUDA kernel the step launches with its device time, and the
step's wall time, so the gap between the sum of the big kernels and the measured step is
visible. The step is ``sparse_mla(..., backend=--backend)`` (default auto: the sm_90a CUDA
kernels on Hopper, else Triton); the output records which kernels ran (``kernel``). Writes
``profile_sparse_mla_fwdbwd_H<H>.json`` and a Chrome trace under ``--out`` (default ``$OUT`` or .).

    python3 benchmarks/profile_sparse_mla_fwdbwd.py [--S 16384] [--H 128] [--backend triton]
        [--deterministic [--bwd-block-keys 64]]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench_sparse_mla import DV, choice_str, make_case  # noqa: E402
from common import kernel_times, time_cuda  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--S", type=int, default=16384)
    ap.add_argument("--H", type=int, default=128)
    ap.add_argument("--k", type=int, default=2048)
    ap.add_argument("--backend", default="auto", choices=("auto", "cuda", "triton"))
    ap.add_argument("--deterministic", action="store_true", help="the deterministic backward")
    ap.add_argument("--bwd-block-keys", type=int, choices=(32, 64), default=None,
                    help="the CUDA backward's kernel in both modes (as bench_sparse_mla.py's; deterministic "
                         "64: the integer adds)")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    a = ap.parse_args()
    if not torch.cuda.is_available():
        print("profile_sparse_mla_fwdbwd: needs a CUDA device")
        return 1
    from megatron_dsa.kernels.sparse_mla import cuda_impl, select_backend, sparse_mla

    if a.bwd_block_keys is not None:
        cuda_impl.bwd_block_keys = lambda deterministic: a.bwd_block_keys
    S, H = a.S, a.H
    q, kv, idx, dout = make_case(S, H, a.k)
    scale = 576 ** -0.5
    qg, kvg = q.clone().requires_grad_(), kv.clone().requires_grad_()
    choice = select_backend(a.backend, q.device, q.dtype, H, q.shape[2], DV, a.deterministic, kv.shape[0])

    def fb():
        qg.grad = kvg.grad = None
        o, _ = sparse_mla(qg, kvg, idx, scale, DV, backend=a.backend, deterministic=a.deterministic)
        o.backward(dout)

    ms = time_cuda(fb, reps=5)
    # host time to launch one step, on the CPU clock while the GPU is held busy by a sleep
    # (so no launch waits on the GPU). Device time is not taken this way: a GPU that slept first
    # runs rested, measurably faster than back to back (the power cap averages over time).
    host = []
    for _ in range(3):
        torch.cuda._sleep(int(2e9))  # ~1 s of GPU clock cycles
        t0 = time.perf_counter()
        fb()
        host.append((time.perf_counter() - t0) * 1e3)
        torch.cuda.synchronize()
    host_ms = sorted(host)[1]
    from torch.profiler import ProfilerActivity, profile

    fb()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        fb()
        torch.cuda.synchronize()
    kern, span = kernel_times(prof)
    rows = sorted(({"kernel": k[:90], "calls": v[0], "ms": round(v[1], 3)} for k, v in kern.items()),
                  key=lambda r: -r["ms"])
    os.makedirs(a.out, exist_ok=True)
    prof.export_chrome_trace(os.path.join(a.out, f"trace_sparse_mla_fwdbwd_H{H}.json"))
    res = {"S": S, "H": H, "k": a.k, "kernel": choice_str(choice), "deterministic": a.deterministic,
           "step_ms": round(ms, 3), "host_launch_ms": round(host_ms, 3),
           "kernel_sum_ms": round(sum(r["ms"] for r in rows), 3),
           "first_to_last_kernel_ms": round(span[1] - span[0], 3) if span is not None else None, "kernels": rows}
    with open(os.path.join(a.out, f"profile_sparse_mla_fwdbwd_H{H}.json"), "w") as fh:
        json.dump(res, fh, indent=1)
    print(f"S={S} H={H} [{res['kernel']}]: step {ms:.2f} ms, kernels {res['kernel_sum_ms']:.2f} ms, "
          f"first..last kernel {res['first_to_last_kernel_ms']} ms; host launch {host_ms:.2f} ms")
    for r in rows:
        print(f"  {r['ms']:9.3f} ms  x{r['calls']}  {r['kernel']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
