"""One context-parallel rank's share of a DSA layer's kernels, on one GPU (receipt topic ``cp_share``).

Under CP with Megatron's load-balanced causal layout a rank holds chunks ``r`` and
``2 cp - 1 - r`` of ``2 cp`` (``megatron_dsa.context_parallel.cp_positions``), scores its rows
against all keys and attends over the all-gathered latent KV with global ids. Here the
all-gather is a local copy: every tensor of the whole sequence lives on this GPU and the rank's
share runs on it, for CP in {1, 2, 4, 8}:

* ``indexer``: score + top-k of the rank's rows against all S keys (64 heads x 128, k = 2048);
* ``attention``: sparse MLA forward + backward of the rank's rows (d_qk 576, d_v 512, H heads)
  over the whole KV, with the indexer's ids.

Each row is the rank with the most sparse-attention work (``cp_work``); ``projected_step_ms``
(on the ``total`` rows) is indexer + attention: the rank's kernel time per layer and
microbatch, communication not included. Peak memory is what the share allocates beyond the
inputs. CP 1 is the single-GPU run of the whole layer (where it fits).

    python benchmarks/bench_cp_share.py --S 131072,262144 --cp 1,2,4,8 --H 128 --out docs/receipts
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import run_guarded, time_cuda, write_receipt  # noqa: E402


def share(S: int, cp: int, H: int, k: int, reps: int) -> list:
    from megatron_dsa.context_parallel import cp_causal_window, cp_positions, cp_work
    from megatron_dsa.kernels.indexer import indexer_topk
    from megatron_dsa.kernels.sparse_mla import sparse_mla

    work = cp_work(S, cp, k)
    rank = max(work, key=lambda w: w["attention"])["rank"]
    pos = cp_positions(S, cp, rank, device="cuda")
    T = pos.numel()
    case = {"S": S, "cp": cp, "rank": rank, "rows": T, "H": H, "k": k}
    rows = []
    g = torch.Generator(device="cuda").manual_seed(S + cp)
    ki = torch.randn(1, S, 128, device="cuda", generator=g, dtype=torch.bfloat16)
    qi = torch.randn(1, T, 64, 128, device="cuda", generator=g, dtype=torch.bfloat16)
    wi = torch.randn(1, T, 64, device="cuda", generator=g)
    st, en = cp_causal_window(pos)

    def indexer():
        return indexer_topk(qi, ki, wi, k, st, en)[0]

    res = {}

    def timed(fn, keep=None):
        """One warm-up call (its result kept under ``keep``), then the median time and the peak
        memory of the timed calls beyond what was allocated before them."""
        out = fn()
        if keep:
            res[keep] = out
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        ms = time_cuda(fn, warmup=0, reps=reps)
        return {"ms": ms, "peak_gib": (torch.cuda.max_memory_allocated() - before) / 2**30}

    r_idx = run_guarded(lambda: timed(indexer, keep="idx"))
    rows.append({"impl": "megatron_dsa", "case": dict(case, part="indexer", **{"pass": "fwd"}), **r_idx})
    del qi, wi
    if "idx" not in res:
        return rows
    idx = res.pop("idx")[0]
    q = torch.randn(T, H, 576, device="cuda", generator=g, dtype=torch.bfloat16).requires_grad_()
    kv = torch.randn(S, 576, device="cuda", generator=g, dtype=torch.bfloat16).requires_grad_()

    def attention():
        out, _ = sparse_mla(q, kv, idx, 576 ** -0.5)
        out.backward(torch.ones_like(out))
        q.grad = kv.grad = None

    r_att = run_guarded(lambda: timed(attention))
    rows.append({"impl": "megatron_dsa", "case": dict(case, part="attention", **{"pass": "fwd+bwd"}), **r_att})
    if r_idx.get("status") == "ok" and r_att.get("status") == "ok":
        rows.append({"impl": "megatron_dsa", "case": dict(case, part="total", **{"pass": "fwd+bwd"}),
                     "ms": r_idx["ms"] + r_att["ms"], "projected_step_ms": r_idx["ms"] + r_att["ms"],
                     "peak_gib": max(r_idx["peak_gib"], r_att["peak_gib"]), "status": "ok"})
    del q, kv, idx
    torch.cuda.empty_cache()
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--S", default="131072,262144", help="comma list of sequence lengths")
    ap.add_argument("--cp", default="1,2,4,8", help="comma list of CP sizes")
    ap.add_argument("--H", type=int, default=128, help="attention heads on the rank (128 = TP 1)")
    ap.add_argument("--k", type=int, default=2048)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=None, help="folder for the receipt (none: print only)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        ap.error("needs a CUDA GPU")
    rows = []
    for S in (int(x) for x in args.S.split(",")):
        for cp in (int(x) for x in args.cp.split(",")):
            for r in share(S, cp, args.H, args.k, args.reps):
                rows.append(r)
                c = r["case"]
                print(f"S={c['S']:7d} cp={c['cp']} rank={c['rank']} rows={c['rows']:7d} {c['part']:9s} "
                      f"{r.get('ms', float('nan')):9.2f} ms  peak {r.get('peak_gib', float('nan')):6.2f} GiB  "
                      f"{r['status']}", flush=True)
    if args.out:
        from megatron_dsa.kernels import format_status

        print(write_receipt("cp_share", rows, args.out, extra={"kernel_status": format_status()}))


if __name__ == "__main__":
    main()
