"""The same sparse MLA forward timed back to back and after the GPU rested: a sleep kernel
queued before it, or a pause on the host between calls. On H100s (sixth session) the 128-head
forward at S=16K took 20.9-21.4 ms back to back and 19.6 ms after a 0.1 s sleep, with
0.13-0.26 ms of host launch time per call: the spread between benchmark runs of one kernel
follows from this.

    PYTHONPATH=$PWD python3 benchmarks/rested_vs_back_to_back.py [--S 16384] [--H 128]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench_sparse_mla import make_case  # noqa: E402

from megatron_dsa.kernels.sparse_mla import triton_impl as ti  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--S", type=int, default=16384)
    ap.add_argument("--H", type=int, default=128)
    ap.add_argument("--reps", type=int, default=7)
    a = ap.parse_args()
    q, kv, idx, _ = make_case(a.S, a.H, 2048)
    fwd = lambda: ti.sparse_mla_fwd(q, kv, idx, 576 ** -0.5, 512)  # noqa: E731
    fwd()
    torch.cuda.synchronize()

    def run(sleep_cycles=0, host_pause_s=0.0):
        ts = []
        for _ in range(a.reps):
            if host_pause_s:
                time.sleep(host_pause_s)
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            if sleep_cycles:
                torch.cuda._sleep(sleep_cycles)
            e0.record()
            fwd()
            e1.record()
            torch.cuda.synchronize()
            ts.append(e0.elapsed_time(e1))
        return statistics.median(ts)

    t0 = time.perf_counter()
    for _ in range(5):
        fwd()
    host_us = (time.perf_counter() - t0) / 5 * 1e6
    torch.cuda.synchronize()
    print(f"S={a.S} H={a.H} forward, median of {a.reps} (ms); host launch {host_us:.0f} us per call")
    print(f"  back to back                 {run():8.2f}")
    for cycles, label in ((int(2e6), "~1 ms"), (int(2e7), "~10 ms"), (int(2e8), "~0.1 s")):
        print(f"  after a {label:6s} GPU sleep      {run(cycles):8.2f}")
    print(f"  after a 50 ms host pause     {run(0, 0.05):8.2f}")


if __name__ == "__main__":
    main()
