"""Score + top-k at one S for several chunk plans (GPU; tuning aid, not a receipt).

PYTHONPATH=$PWD python3 benchmarks/tune_indexer_plan.py --S 32768 --plans "4:1;0:1;4:1.5;2:1"
A plan is ``scratch_per_topk:chunk_GiB`` (scratch_per_topk 0 = scratch of a whole row, the
old plan). Prints full fwd ms, the score kernel alone over the same chunks, and their
difference (the select), plus the peak extra memory.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import peak_gib, time_cuda  # noqa: E402
from megatron_dsa.kernels.indexer import triton_impl as ti  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--S", type=int, default=32768)
    ap.add_argument("--plans", default="4:1;0:1")
    ap.add_argument("--reps", type=int, default=7)
    a = ap.parse_args()
    S, H, D, K = a.S, 64, 128, 2048
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, S, H, D, device="cuda", generator=g).bfloat16()
    k = torch.randn(1, S, D, device="cuda", generator=g).bfloat16()
    w = torch.randn(1, S, H, device="cuda", generator=g).bfloat16().float()
    base = ti._SCRATCH_PER_TOPK
    for plan in a.plans.split(";"):
        f, gib = plan.split(":")
        ti._SCRATCH_PER_TOPK = int(f) if int(f) > 0 else 10**9
        cb = int(float(gib) * 2**30)
        cfg = ti._score_cfg()
        rows, cap = ti._plan(1, S, S, K, cfg[0], cb, 3)
        buf = torch.empty(1, rows, S, device="cuda")
        qq, kk, ww, st, en, causal = ti._prep(q, k, w, None, None)

        def score():
            for r0 in range(0, S, rows):
                ti._launch_scores(qq, kk, ww, st, en, causal, True, buf, r0, min(rows, S - r0), cfg)

        full = lambda: ti.indexer_topk_triton(q, k, w, K, chunk_bytes=cb)  # noqa: E731
        t_full = time_cuda(full, warmup=1, reps=a.reps)
        t_score = time_cuda(score, warmup=1, reps=a.reps)
        del buf
        torch.cuda.empty_cache()
        pk = peak_gib(full)
        print(json.dumps({"plan": plan, "rows": rows, "cap": cap, "full_ms": round(t_full, 3),
                          "score_ms": round(t_score, 3), "select_ms": round(t_full - t_score, 3),
                          "peak_gib": round(pk, 3)}), flush=True)
    ti._SCRATCH_PER_TOPK = base


if __name__ == "__main__":
    main()
