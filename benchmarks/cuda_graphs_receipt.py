"""Receipt: the example trained eagerly and with Megatron-Core's per-layer CUDA graphs
(``cuda_graph_impl="local"``) on one GPU, same seed and data: loss curves and step times.

    python benchmarks/cuda_graphs_receipt.py --steps 30 --out docs/receipts
"""

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(tmp, name, extra, steps):
    out = os.path.join(tmp, name + ".json")
    cmd = [sys.executable, os.path.join(ROOT, "examples", "train_tiny_gpt.py"), "--device", "cuda",
           "--steps", str(steps), "--json-out", out] + extra
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": (proc.stdout[-1500:] + proc.stderr[-3000:])}
    with open(out) as f:
        return json.load(f)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--out", default=os.path.join(ROOT, "docs", "receipts"))
    p.add_argument("--deterministic", action="store_true", help="both runs with --deterministic")
    a = p.parse_args()
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        # sparse indexer loss from the start in both runs (graphs keep the variant they captured)
        det = ["--dense-warmup-steps", "0"] + (["--deterministic"] if a.deterministic else [])
        runs = {"eager": run(tmp, "eager", det, a.steps),
                "cuda_graphs": run(tmp, "graphs", det + ["--cuda-graphs"], a.steps)}
    dev = torch.cuda.get_device_name()
    date = datetime.date.today().isoformat()
    rows, curves = [], {}
    for name, r in runs.items():
        if "error" in r:
            rows.append({"impl": f"megatron_dsa[{name}]", "case": {"steps": a.steps}, "ms": None,
                         "status": "error: " + r["error"].strip().splitlines()[-1][:300]})
            print(name, "FAILED\n", r["error"])
            continue
        h = r["history"]
        steady = [r["args"]["seq_len"] * r["args"]["micro_batch"] * r["args"]["num_microbatches"] / x["tokens_per_s"] * 1e3
                  for x in h[len(h) // 2:]]
        curves[name] = [x["lm_loss"] for x in h]
        curves[name + ":indexer_loss"] = [x["indexer_loss"] for x in h]
        curves[name + ":indexer_weight_norm"] = [x["indexer_weight_norm"] for x in h]
        rows.append({"impl": f"megatron_dsa[{name}]", "case": {"steps": a.steps, "pass": "fwd+bwd+opt"},
                     "ms": statistics.median(steady), "peak_gib": h[-1]["peak_mib"] / 1024,
                     "final_lm_loss": h[-1]["lm_loss"], "status": "ok"})
    diff = None
    if "eager" in curves and "cuda_graphs" in curves:
        diff = max(abs(x - y) for x, y in zip(curves["eager"], curves["cuda_graphs"]))
    doc = {"topic": "layer_step", "date": date, "device": dev, "versions": {"torch": torch.__version__},
           "ceilings": {}, "rows": rows, "max_loss_diff_graphs_vs_eager": diff, "curves": curves,
           "deterministic": a.deterministic,
           "note": "ms = median step time over the second half of the run (tokens/step / tokens/s)"}
    os.makedirs(a.out, exist_ok=True)
    stem = os.path.join(a.out, f"layer_step-{dev.replace(' ', '_').lower()}-{date}")
    with open(stem + ".json", "w") as f:
        json.dump(doc, f, indent=1)
    lines = [f"# example step, eager vs CUDA graphs ({dev}, {date})", "",
             "| impl | step ms (median, 2nd half) | peak GiB | final LM loss | status |", "|---|---|---|---|---|"]
    for r in rows:
        ms = "-" if r.get("ms") is None else f"{r['ms']:.2f}"
        pk = "-" if r.get("peak_gib") is None else f"{r['peak_gib']:.2f}"
        fl = "-" if r.get("final_lm_loss") is None else f"{r['final_lm_loss']:.4f}"
        lines.append(f"| {r['impl']} | {ms} | {pk} | {fl} | {r['status']} |")
    lines += ["", f"max |LM loss difference| per step, graphs vs eager: {diff} "
              f"(deterministic kernels: {a.deterministic})"]
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        for k in ("eager", "cuda_graphs"):
            if k in curves:
                ax.plot(curves[k], label=k, linestyle="-" if k == "eager" else "--")
        ax.set_xlabel("step")
        ax.set_ylabel("LM loss")
        ax.legend()
        ax.set_title(f"eager vs CUDA graphs, {dev}, {date}", fontsize=9)
        fig.tight_layout()
        fig.savefig(stem + ".png", dpi=110)
    except ImportError:
        pass
    print("\n".join(lines))


if __name__ == "__main__":
    main()
