"""Receipt: the index cache under pipeline parallelism on GPUs (nccl), against one stage.

Runs ``tests/pp_worker.py`` (a tiny DSA GPT, one forward-backward of 4 microbatches) as
PP=1 with the explicit pattern FSFS and as PP=2 (1F1B, full recompute) with
``dsa_indexer_topk_freq=4``, whose stage-2 boundary promotes layer 3 to an anchor, then
compares losses and every parameter's gradient. Needs 2 GPUs.

    python benchmarks/pp_index_cache_receipt.py --out docs/receipts
"""

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "pp_worker.py")
sys.path.insert(0, os.path.dirname(WORKER))

from helpers import merge_rank_outputs  # noqa: E402  (the tests' merge of the worker's rank files)


def run(tmp, name, nproc, args):
    out = os.path.join(tmp, name)
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           "--master_port", str(29400 + nproc), WORKER, "--device", "cuda", "--out", out] + args
    subprocess.run(cmd, check=True, cwd=os.path.dirname(WORKER))
    return merge_rank_outputs(out, nproc)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=os.path.join(ROOT, "docs", "receipts"))
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ref = run(tmp, "pp1", 1, ["--layers", "4", "--pattern", "FSFS"])
        pp2 = run(tmp, "pp2", 2, ["--pp", "2", "--layers", "4", "--freq", "4", "--recompute", "full"])
    rows = []
    worst = 0.0
    for n in sorted(ref["grads"]):
        g1, g2 = ref["grads"][n].double(), pp2["grads"][n].double()
        rel = float((g1 - g2).norm() / g1.norm().clamp_min(1e-30))
        worst = max(worst, rel)
        rows.append({"param": n, "rel_diff": rel})
    loss_diff = max(abs(x - y) for x, y in zip(ref["losses"], pp2["losses"]))
    dev = torch.cuda.get_device_name()
    date = datetime.date.today().isoformat()
    roles = [{"layer": r.layer, "stage": r.stage, "role": r.role, "source": r.source, "reason": r.reason}
             for r in pp2["roles"]]
    doc = {"topic": "index_cache_pp", "date": date, "device": f"2x {dev}",
           "versions": {"torch": torch.__version__}, "ceilings": {},
           "rows": [{"impl": "megatron_dsa", "case": {"pp": 2, "microbatches": 4, "schedule": "1F1B",
                                                       "recompute": "full", "backend": "nccl"},
                     "max_loss_diff": loss_diff, "max_grad_rel_diff": worst, "status": "ok"}],
           "per_param": rows, "roles_pp2": roles, "losses_pp1": ref["losses"], "losses_pp2": pp2["losses"],
           "cache_stats_pp2": pp2["stats"]}
    os.makedirs(a.out, exist_ok=True)
    stem = os.path.join(a.out, f"index_cache_pp-{dev.replace(' ', '_').lower()}-{date}")
    with open(stem + ".json", "w") as f:
        json.dump(doc, f, indent=1)
    lines = [f"# index cache, PP=2 (nccl, 2x {dev}) vs PP=1 ({date})", "",
             "Tiny DSA GPT, 4 layers, 4 microbatches, one forward-backward; PP=2 runs 1F1B with full",
             "recompute and dsa_indexer_topk_freq=4 (layer 3 opens stage 2 and is promoted); PP=1 runs",
             "the same schedule stated as pattern FSFS.", "",
             f"- max |loss difference| over microbatches: {loss_diff:.3e}",
             f"- max relative gradient difference over {len(rows)} parameters: {worst:.3e}",
             f"- roles (both stages): {roles}", f"- cache stats per rank: {pp2['stats']}"]
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 4))
        ax.bar(range(len(rows)), [max(r["rel_diff"], 1e-12) for r in rows])
        ax.set_yscale("log")
        ax.set_xlabel("parameter")
        ax.set_ylabel("relative grad difference PP=2 vs PP=1")
        ax.set_title(f"index cache PP=2 vs PP=1, 2x {dev}, {date}", fontsize=9)
        fig.tight_layout()
        fig.savefig(stem + ".png", dpi=110)
    except ImportError:
        print("matplotlib missing: no PNG")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
