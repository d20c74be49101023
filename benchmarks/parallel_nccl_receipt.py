"""Receipt: tensor (with sequence), context and pipeline parallelism over NCCL, against one GPU.

Runs ``tests/pp_worker.py`` (a DSA GPT; ``--size real``: hidden 4096, 32 heads, MLA widths of
DeepSeek-V3.2, indexer 64 x 128, k = 2048, bf16, the fused kernels) under ``torchrun`` once per
case, and compares every two-GPU case with the one-GPU run of the same model (weights seeded per
global parameter name) and the same batches:

* ``tp2_sp``      TP = 2 with sequence parallelism; top-k ids checked bit-identical across ranks
* ``cp2``         CP = 2 (Megatron's load-balanced split)
* ``cp2_packed``  CP = 2 on packed THD batches (per-document split), against one GPU packed
* ``pp2``         PP = 2 (1F1B, full recompute), one anchor in four (``dsa_indexer_topk_freq=4``),
                  against one GPU with the pattern the pipeline resolves to
* ``cp2_long``    CP = 2 at each of ``--long-seqs`` (full recompute), beside one GPU where it fits:
                  step time and peak memory only

Per case: LM losses (largest relative difference), every parameter gradient (largest and median
relative difference), step time (median of ``--timed-steps`` forward-backward steps of the
same batches, no optimizer, the slowest rank) and peak memory (the largest rank). Writes the
``parallel_nccl`` receipt (JSON + markdown + PNG) with ``world_size`` and ``backend``.

    python benchmarks/parallel_nccl_receipt.py --out docs/receipts              # 2 GPUs, NCCL
    python benchmarks/parallel_nccl_receipt.py --device cpu --size tiny --out /tmp/r   # gloo dry run
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "pp_worker.py")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from common import write_receipt  # noqa: E402

sys.path.insert(0, os.path.dirname(WORKER))
from helpers import merge_rank_outputs  # noqa: E402  (the tests' merge of the worker's rank files)

# the pattern one stage resolves for 4 layers with dsa_indexer_topk_freq=4 split over PP = 2:
# the second stage's first layer cannot reach layer 1 and is promoted to an anchor
PP2_PATTERN = "FSFS"


def run_case(tmp, name, nproc, args, timeout):
    """Run the worker; returns the merged per-rank outputs, or {"error": ...}."""
    out = os.path.join(tmp, name)
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_port",
           str(29500 + (hash(name) % 400)), WORKER, "--out", out] + args
    print("+", " ".join(cmd[3:]), flush=True)
    try:
        proc = subprocess.run(cmd, cwd=os.path.dirname(WORKER), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout} s"}
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-12:]
        oom = any("OutOfMemoryError" in ln or "out of memory" in ln for ln in tail)
        return {"error": "oom" if oom else "error: " + " / ".join(tail)[-600:]}
    merged = merge_rank_outputs(out, nproc)
    for r in range(nproc):  # real-size gradients: GBs per rank
        os.remove(f"{out}.rank{r}.pt")
    return merged


def compare(ref, got):
    """Largest relative LM loss difference over the microbatches, largest and median relative
    gradient difference over the parameters."""
    rels = []
    for n, g1 in ref["grads"].items():
        g2 = got["grads"].get(n)
        if g2 is None:
            raise KeyError(f"gradient of {n} missing")
        g1, g2 = g1.double(), g2.double()
        rels.append(float((g1 - g2).norm() / g1.norm().clamp_min(1e-30)))
    loss = max(abs(x - y) / max(abs(x), 1e-30) for x, y in zip(ref["losses"], got["losses"])) \
        if ref["losses"] else None
    return {"rel_loss_vs_1gpu": loss, "rel_grad_worst_vs_1gpu": max(rels),
            "rel_grad_median_vs_1gpu": statistics.median(rels)}


def row(name, world, seq, res, ref=None, extra_case=None):
    case = {"parallel": name, "world_size": world, "S": seq, **(extra_case or {})}
    if "error" in res:
        status = res["error"]
        return {"impl": "megatron_dsa", "case": case, "ms": None, "tflops": None, "peak_gib": None, "status": status}
    timing = res["timing"]
    ms = [t["step_ms"] for t in timing if t.get("step_ms") is not None]
    pk = [t["peak_gib"] for t in timing if t.get("peak_gib") is not None]
    out = {"impl": "megatron_dsa", "case": case, "ms": round(max(ms), 2) if ms else None, "tflops": None,
           "peak_gib": round(max(pk), 2) if pk else None, "status": "ok",
           "step_ms_per_rank": [round(x, 2) for x in ms], "peak_gib_per_rank": [round(x, 2) for x in pk]}
    if res["topk_checked"]:
        case["topk_identical_checks"] = res["topk_checked"]
    if ref is not None and "error" not in ref:
        out.update({k: (None if v is None else float(f"{v:.3g}")) for k, v in compare(ref, res).items()})
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--size", choices=["real", "tiny"], default="real")
    ap.add_argument("--seq", type=int, default=16384)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--microbatches", type=int, default=2)
    ap.add_argument("--timed-steps", type=int, default=3)
    ap.add_argument("--long-seqs", default="131072,262144", help="CP = 2 long-context cases ('' for none)")
    ap.add_argument("--cases", default="tp2_sp,cp2,cp2_packed,pp2,cp2_long")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per torchrun")
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "receipts"))
    a = ap.parse_args()
    if a.device == "cuda" and torch.cuda.device_count() < 2:
        print("parallel_nccl_receipt: needs 2 GPUs (use --device cpu --size tiny for a gloo dry run)")
        return 1
    wanted = set(a.cases.split(","))
    common = ["--device", a.device, "--size", a.size, "--layers", str(a.layers), "--timed-steps", str(a.timed_steps)]
    seq = a.seq if a.size == "real" else 32
    mb = ["--microbatches", str(a.microbatches)]
    if a.size == "real":
        common += ["--seq", str(a.seq)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ref = run_case(tmp, "1gpu", 1, common + mb, a.timeout)
        rows.append(row("1gpu", 1, seq, ref))
        if "tp2_sp" in wanted:
            rows.append(row("tp2_sp", 2, seq, run_case(tmp, "tp2", 2, common + mb + ["--tp", "2"], a.timeout), ref))
        if "cp2" in wanted:
            rows.append(row("cp2", 2, seq, run_case(tmp, "cp2", 2, common + mb + ["--cp", "2"], a.timeout), ref))
        del ref
        if "cp2_packed" in wanted:
            pref = run_case(tmp, "1gpu_packed", 1, common + mb + ["--packed"], a.timeout)
            rows.append(row("1gpu_packed", 1, seq if a.size == "real" else 64, pref))
            got = run_case(tmp, "cp2_packed", 2, common + mb + ["--cp", "2", "--packed"], a.timeout)
            rows.append(row("cp2_packed", 2, seq if a.size == "real" else 64, got, pref))
            del pref, got
        if "pp2" in wanted:
            mb4 = ["--microbatches", str(max(4, a.microbatches))]
            pref = run_case(tmp, "1gpu_pattern", 1, common + mb4 + ["--pattern", PP2_PATTERN], a.timeout)
            rows.append(row("1gpu_pattern", 1, seq, pref, extra_case={"index_pattern": PP2_PATTERN}))
            got = run_case(tmp, "pp2", 2, common + mb4 + ["--pp", "2", "--freq", "4", "--recompute", "full"],
                           a.timeout)
            rows.append(row("pp2", 2, seq, got, pref, extra_case={"topk_freq": 4, "recompute": "full"}))
            del pref, got
        if "cp2_long" in wanted and a.size == "real":
            for s in [int(x) for x in a.long_seqs.split(",") if x]:
                long_args = [x if x != str(a.seq) else str(s) for x in common] + [
                    "--microbatches", "1", "--recompute", "full"]
                for name, nproc, extra in (("1gpu_long", 1, []), ("cp2_long", 2, ["--cp", "2"])):
                    res = run_case(tmp, f"{name}_{s}", nproc, long_args + extra, a.timeout)
                    res["grads"] = {}
                    rows.append(row(name, nproc, s, res, extra_case={"recompute": "full"}))
    extra = {"world_size": 2, "backend": "nccl" if a.device == "cuda" else "gloo", "size": a.size,
             "notes": "step = one forward-backward of all microbatches (no optimizer), median of the timed "
                      "steps, slowest rank; peak = the largest rank's max allocated over the timed steps; "
                      "rel_grad_* = ||g - g_1gpu|| / ||g_1gpu|| per parameter (worst, median)"}
    if a.device == "cuda":
        extra["device"] = f"2x {torch.cuda.get_device_name()}"
    else:
        extra["device"] = "cpu"
    paths = write_receipt("parallel_nccl", rows, a.out, extra=extra)
    for r in rows:
        c = r["case"]
        print(f"{c['parallel']:>13} S={c['S']:>6}  ms={r['ms']}  peak={r['peak_gib']}  {r['status'][:60]}  "
              f"loss={r.get('rel_loss_vs_1gpu')}  grad worst={r.get('rel_grad_worst_vs_1gpu')}  "
              f"median={r.get('rel_grad_median_vs_1gpu')}")
    print(paths)
    return 0


if __name__ == "__main__":
    sys.exit(main())
