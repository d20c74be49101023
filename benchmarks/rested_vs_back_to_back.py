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
from common import ClockLog  # noqa: E402

from megatron_dsa.kernels.sparse_mla import triton_impl as ti  # noqa: E402


def series(fn, a):
    """N calls back to back from a rested GPU: per call its CUDA-event ms and the SM clock and
    power nvidia-smi saw meanwhile (the power cap shows as reason 0x4)."""
    clog = ClockLog(period_ms=50)
    time.sleep(3.0)
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(a.series)]
    for e0, e1 in ev:
        e0.record()
        fn()
        e1.record()
    # the calls ran back to back on the GPU and ended at the synchronize: each call's wall-clock
    # span is reconstructed backwards from then with the events' durations
    torch.cuda.synchronize()
    t_end = time.time()
    ms = [e0.elapsed_time(e1) for e0, e1 in ev]
    t = t_end - sum(ms) / 1e3
    samples = clog.samples()
    print(f"S={a.S} H={a.H} {a.pas} ({a.impl}): {a.series} calls back to back after a 3 s rest")
    print(f"{'call':>4s} {'ms':>8s} {'SM MHz':>10s} {'W max':>6s} reasons")
    for i, m in enumerate(ms):
        c = clog.during(t, t + m / 1e3, samples=samples) or {}
        t += m / 1e3
        mhz = "-".join(str(int(x)) for x in c.get("sm_mhz", []))
        print(f"{i:4d} {m:8.2f} {mhz:>10s} {c.get('power_w_max', float('nan')):6.0f} {c.get('clock_reasons', '')}")
    clog.close()
    print(f"first 3 median {statistics.median(ms[:3]):.2f} ms, last 5 median {statistics.median(ms[-5:]):.2f} ms")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--S", type=int, default=16384)
    ap.add_argument("--H", type=int, default=128)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--pass", dest="pas", choices=("fwd", "fwd+bwd"), default="fwd")
    ap.add_argument("--impl", choices=("ours", "peers"), default="ours",
                    help="peers (fwd+bwd only): Megatron-Core's TileLang forward then cuDNN-frontend's backward")
    ap.add_argument("--series", type=int, default=0,
                    help="instead: N calls back to back after a 3 s rest, each call's ms and SM clock")
    a = ap.parse_args()
    q, kv, idx, dout = make_case(a.S, a.H, 2048)
    if a.impl == "peers":
        from bench_sparse_mla import impl_cudnn, impl_tilelang

        if a.pas != "fwd+bwd":
            raise SystemExit("--impl peers times fwd+bwd only")
        tl_fwd = impl_tilelang(q, kv, idx, dout, 576 ** -0.5)["fwd"]
        cudnn_bwd = impl_cudnn(q, kv, idx, dout, 576 ** -0.5)["bwd"]

        def fwd():
            tl_fwd()
            cudnn_bwd()
    elif a.pas == "fwd":
        fwd = lambda: ti.sparse_mla_fwd(q, kv, idx, 576 ** -0.5, 512)  # noqa: E731
    else:
        qg, kvg = q.clone().requires_grad_(), kv.clone().requires_grad_()

        def fwd():
            qg.grad = kvg.grad = None
            o, _ = ti.sparse_mla_triton(qg, kvg, idx, 576 ** -0.5, 512, deterministic=False)
            o.backward(dout)
    fwd()
    torch.cuda.synchronize()
    if a.series:
        series(fwd, a)
        return

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
