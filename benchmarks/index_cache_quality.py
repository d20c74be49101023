"""Quality receipt for the index cache: the example model trained without sharing and with one
anchor in four (same seed, data and steps). Writes
``docs/receipts/index_cache-<device>-<date>.{json,md,png}`` (loss curves).

    python benchmarks/index_cache_quality.py [--steps 100] [--device cpu] [--out docs/receipts]
"""

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))


def run(freq, steps, device, tmp):
    out = os.path.join(tmp, f"freq{freq}.json")
    cmd = [sys.executable, os.path.join(ROOT, "examples", "train_tiny_gpt.py"), "--steps", str(steps),
           "--index-freq", str(freq), "--device", device, "--json-out", out, "--time-indexer"]
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    with open(out) as f:
        return json.load(f)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=os.path.join(ROOT, "docs", "receipts"))
    a = p.parse_args()
    from common import versions

    import torch

    with tempfile.TemporaryDirectory() as tmp:
        runs = {f: run(f, a.steps, a.device, tmp) for f in (1, 4)}
    dev = torch.cuda.get_device_name() if a.device == "cuda" else "cpu"
    date = datetime.date.today().isoformat()
    k = 10
    rows = []
    for f, r in runs.items():
        h = r["history"]
        rows.append({
            "impl": "megatron_dsa" if f == 1 else "megatron_dsa[index_cache 1-in-4]",
            "case": {"index_freq": f, "steps": a.steps, "layers": r["args"]["layers"]},
            "final_lm_loss": sum(x["lm_loss"] for x in h[-k:]) / k,
            "first_lm_loss": sum(x["lm_loss"] for x in h[:k]) / k,
            "mean_tokens_per_s": sum(x["tokens_per_s"] for x in h[1:]) / (len(h) - 1),
            "indexer_share": [x["index_cache"]["indexer_share"] for x in h][-1],
            "cache_hits_per_step": h[-1]["index_cache"]["cache_hits"],
            "promotions": h[-1]["index_cache"]["promotions"],
            "status": "ok",
        })
    diff = rows[1]["final_lm_loss"] - rows[0]["final_lm_loss"]
    doc = {"topic": "index_cache", "date": date, "device": dev, "versions": versions(),
           "ceilings": {}, "rows": rows, "final_loss_difference": diff,
           "curves": {str(f): [x["lm_loss"] for x in r["history"]] for f, r in runs.items()},
           "note": f"final_lm_loss = mean of the last {k} steps; same seed, data and steps"}
    os.makedirs(a.out, exist_ok=True)
    stem = os.path.join(a.out, f"index_cache-{dev.replace(' ', '_').lower()}-{date}")
    with open(stem + ".json", "w") as f:
        json.dump(doc, f, indent=1)
    lines = [f"# index_cache quality on {dev} ({date})", "",
             f"versions: `{json.dumps(doc['versions'])}`", "",
             "| impl | index_freq | first LM loss | final LM loss | tokens/s | indexer share of attn | hits/step | promotions |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        share = r["indexer_share"]
        lines.append(f"| {r['impl']} | {r['case']['index_freq']} | {r['first_lm_loss']:.4f} | "
                     f"{r['final_lm_loss']:.4f} | {r['mean_tokens_per_s']:.0f} | "
                     f"{'-' if share is None else f'{100 * share:.0f}%'} | {r['cache_hits_per_step']} | "
                     f"{r['promotions'] or 0} |")
    lines += ["", f"Final LM loss difference (1-in-4 minus no sharing): {diff:+.4f} "
              f"(mean of the last {k} of {a.steps} steps)."]
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for f, r in runs.items():
        ax.plot([x["lm_loss"] for x in r["history"]], label=f"index freq {f}" + (" (no sharing)" if f == 1 else " (1 anchor in 4)"))
    ax.set_xlabel("step")
    ax.set_ylabel("LM loss")
    ax.set_title(f"index cache quality, {dev}, {date}", fontsize=9)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(stem + ".png", dpi=110)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
