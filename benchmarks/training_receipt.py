"""End-to-end receipt: Megatron's own training loop (``examples/pretrain_dsa.py`` ->
``megatron.training.pretrain``) with this plugin's DSA layers against Megatron-Core's own DSA,
on one GPU. Each case is a separate training process; the script reads Megatron's own log.

    python benchmarks/training_receipt.py --cases megatron_dsa:16384:8,mcore_tilelang:16384:8 --out DIR
    python benchmarks/training_receipt.py --merge DIR/a.json DIR/b.json --out docs/receipts

A case is ``impl:S:steps``. ``impl``: ``megatron_dsa`` (the defaults), ``megatron_dsa[anchor 1/4]``
(``--dsa-indexer-topk-freq 4``), ``megatron_dsa[recompute]`` (full activation recompute,
synthetic data), ``megatron_dsa[no row packing]`` (``--dsa-attention-row-packing off``: the
model's 16 heads run the unpacked sparse attention backward, which the default packs), ``mcore_tilelang`` / ``mcore_cudnn`` (``--dsa-impl megatron-core`` with
Megatron-Core's ``--dsa-kernel-backend``). Rows (receipt topic ``training``): ``case.S``,
``tokens_per_s``, ``step_ms`` (median step after two warm-up steps), ``peak_gib`` (the
process's peak allocated GPU memory), the per-step ``lm_loss``; ratios against
``mcore_tilelang`` at the same S in the markdown.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

# The model the issue measured (4 layers, hidden 2048, 16 heads, q_lora 1536, kv_lora 512,
# rope 64, indexer 64 x 128, k = 2048, bf16, local modules, B = 1).
MODEL = (
    "--num-layers 4 --hidden-size 2048 --num-attention-heads 16 --ffn-hidden-size 5632 "
    "--multi-latent-attention --q-lora-rank 1536 --kv-lora-rank 512 --qk-head-dim 128 "
    "--qk-pos-emb-head-dim 64 --v-head-dim 128 --position-embedding-type rope "
    "--experimental-attention-variant dsa --dsa-indexer-n-heads 64 --dsa-indexer-head-dim 128 "
    "--dsa-indexer-topk 2048 --dsa-indexer-loss-coeff 0.01 --dsa-indexer-use-sparse-loss --normalization RMSNorm --swiglu "
    "--disable-bias-linear --attention-dropout 0 --hidden-dropout 0 --bf16 --transformer-impl local "
    "--no-gradient-accumulation-fusion --no-persist-layer-norm --no-rope-fusion --no-masked-softmax-fusion "
    "--micro-batch-size 1 --global-batch-size 1 --lr 3e-4 --min-lr 3e-5 --lr-decay-style cosine "
    "--lr-warmup-iters 2 --clip-grad 1.0 --weight-decay 0.01 --seed 1234 "
    "--tokenizer-type NullTokenizer --vocab-size 32000 --eval-iters 0 --eval-interval 100000 "
    "--log-interval 1 --timing-log-level 1 --rerun-mode disabled --distributed-backend nccl"
).split()

_ITER = re.compile(r"iteration\s+(\d+)/\s*\d+ \|.*?elapsed time per iteration \(ms\): ([0-9.]+).*?lm loss: ([0-9.E+-]+)")
_PEAK = re.compile(r"peak GPU memory allocated: ([0-9.]+) GiB")


def case_args(impl: str, S: int, steps: int):
    args = MODEL + ["--seq-length", str(S), "--max-position-embeddings", str(S), "--train-iters", str(steps)]
    variant = impl.split("[", 1)[1].rstrip("]") if "[" in impl else ""
    base = impl.split("[", 1)[0]
    if base == "megatron_dsa":
        args += ["--dsa-impl", "megatron-dsa"]
    elif base in ("mcore_tilelang", "mcore_cudnn"):
        args += ["--dsa-impl", "megatron-core", "--dsa-kernel-backend", base.split("_", 1)[1]]
    else:
        raise ValueError(f"unknown impl {impl!r}")
    if variant == "anchor 1/4":
        args += ["--dsa-indexer-topk-freq", "4"]
    if variant == "no row packing":
        args += ["--dsa-attention-row-packing", "off"]
    if variant == "recompute" or S > 65536:
        args += ["--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "1"]
    # Megatron's mock dataset gets its data-loader workers killed on the host from S = 64K up
    # (measured on the H200 machine): long sequences read synthetic tokens
    args += ["--synthetic-data"] if (variant == "recompute" or S >= 65536) else ["--mock-data"]
    return args


def run_case(impl: str, S: int, steps: int, timeout: float, log_dir: str) -> dict:
    cmd = [sys.executable, os.path.join(ROOT, "examples", "pretrain_dsa.py")] + case_args(impl, S, steps)
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT="29511", WORLD_SIZE="1", RANK="0",
               LOCAL_RANK="0", CUDA_DEVICE_MAX_CONNECTIONS="1", PYTHONUNBUFFERED="1")
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=log_dir)
        out, rc = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:
        out, rc = (e.stdout or b"").decode() + (e.stderr or b"").decode() if isinstance(e.stdout, bytes) else \
            (e.stdout or "") + (e.stderr or ""), "timeout"
    wall = time.time() - t0
    slug = re.sub(r"[^A-Za-z0-9]+", "_", f"{impl}_{S}").strip("_")
    with open(os.path.join(log_dir, f"log_{slug}.txt"), "w") as f:
        f.write(out[-200000:])
    iters = [(int(i), float(ms), float(loss)) for i, ms, loss in _ITER.findall(out)]
    peak = _PEAK.findall(out)
    row = {"impl": impl, "case": {"S": S, "B": 1, "steps": steps}, "wall_s": round(wall, 1),
           "lm_loss": [x[2] for x in iters]}
    if rc != 0 or len(iters) < min(steps, 3):
        tail = [ln for ln in out.splitlines() if ln.strip()][-6:]
        why = next((ln for ln in reversed(tail) if "Error" in ln or "error" in ln), tail[-1] if tail else "no output")
        status = "oom" if "out of memory" in out.lower() else f"error: {why.strip()[:300]}"
        row.update(status=status, tokens_per_s=None, step_ms=None, ms=None, peak_gib=None)
        return row
    times = [ms for i, ms, _ in iters if i > 2] or [iters[-1][1]]
    step = statistics.median(times)
    row.update(status="ok", step_ms=round(step, 1), ms=round(step, 1), tokens_per_s=round(S / (step / 1e3), 1),
               peak_gib=float(peak[-1]) if peak else None)
    return row


def _ratio_lines(rows):
    # each row against Megatron-Core + TileLang at the same S and the same indexer-loss stage
    stage = lambda r: "dense" in r["impl"]  # noqa: E731
    base = {(r["case"]["S"], stage(r)): r for r in rows
            if r["impl"].split("[", 1)[0] == "mcore_tilelang" and r["status"] == "ok"
            and r["impl"] in ("mcore_tilelang", "mcore_tilelang[dense warm-up loss]")}
    lines = ["| impl | S | steps | tokens/s | step ms | peak GiB | vs mcore_tilelang, same loss stage (tokens/s) | "
             "peak vs mcore_tilelang | status |", "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["case"]["S"], r["impl"])):
        b = base.get((r["case"]["S"], stage(r)))
        ok = r["status"] == "ok" and b is not None and b is not r
        sp = f"{r['tokens_per_s'] / b['tokens_per_s']:.2f}x" if ok else "-"
        mem = f"{r['peak_gib'] / b['peak_gib']:.2f}x" if ok and r.get("peak_gib") and b.get("peak_gib") else "-"
        f = lambda v: "-" if v is None else (f"{v:.1f}" if isinstance(v, float) else str(v))  # noqa: E731
        lines.append(f"| {r['impl']} | {r['case']['S']} | {r['case']['steps']} | {f(r.get('tokens_per_s'))} | "
                     f"{f(r.get('step_ms'))} | {f(r.get('peak_gib'))} | {sp} | {mem} | {r['status']} |")
    return lines


def _loss_lines(rows):
    curves = [r for r in rows if len(r.get("lm_loss") or []) >= 20]
    out = []
    for S in sorted({r["case"]["S"] for r in curves}):
        cs = [r for r in curves if r["case"]["S"] == S]
        ref = next((r for r in cs if r["impl"] == "mcore_tilelang"), None)
        for r in cs:
            if ref is None or r is ref or "[" in r["impl"]:
                continue
            n = min(len(r["lm_loss"]), len(ref["lm_loss"]))
            d = [abs(a - b) for a, b in zip(r["lm_loss"][:n], ref["lm_loss"][:n])]
            out.append(f"- S={S}, {n} steps: {r['impl']} vs mcore_tilelang LM loss: first {r['lm_loss'][0]:.4f} vs "
                       f"{ref['lm_loss'][0]:.4f}, last {r['lm_loss'][n - 1]:.4f} vs {ref['lm_loss'][n - 1]:.4f}, "
                       f"largest step difference {max(d):.4f}")
    return out


def _plot(path, rows, title):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:  # noqa: BLE001
        return False
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.4))
    for r in rows:
        if len(r.get("lm_loss") or []) >= 20:
            axes[0].plot(range(1, len(r["lm_loss"]) + 1), r["lm_loss"], label=f"{r['impl']} S={r['case']['S']}")
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("LM loss")
    axes[0].grid(alpha=0.3)
    if axes[0].lines:
        axes[0].legend(fontsize=7)
    impls = sorted({r["impl"] for r in rows})
    for impl in impls:
        pts = sorted((r["case"]["S"], r["tokens_per_s"]) for r in rows
                     if r["impl"] == impl and r["status"] == "ok" and r.get("tokens_per_s"))
        if pts:
            axes[1].plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=impl)
    axes[1].set_xscale("log", base=2)
    axes[1].set_xlabel("S (tokens per step, B = 1)")
    axes[1].set_ylabel("tokens/s")
    axes[1].grid(alpha=0.3, which="both")
    if axes[1].lines:
        axes[1].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write(doc, out_dir):
    import common

    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, f"training-{common._slug(doc['device'])}-{doc['date']}")
    with open(stem + ".json", "w") as f:
        json.dump(doc, f, indent=1)
    lines = [f"# training on {doc['device']} ({doc['date']})", "",
             "Megatron's own training loop (`examples/pretrain_dsa.py` -> `megatron.training.pretrain`), one GPU, "
             "B = 1; model: " + " ".join(MODEL[:40]) + " ...", "",
             f"versions: `{json.dumps(doc['versions'])}`", ""] + _ratio_lines(doc["rows"]) + [""] + _loss_lines(doc["rows"])
    for note in doc.get("notes", []):
        lines.append(f"- {note}")
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    _plot(stem + ".png", doc["rows"], f"training on {doc['device']} ({doc['date']})")
    return stem


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--cases", default="")
    p.add_argument("--merge", nargs="*", default=None)
    p.add_argument("--timeout", type=float, default=420)
    p.add_argument("--note", action="append", default=[])
    p.add_argument("--out", required=True)
    a = p.parse_args()
    if a.merge:
        docs = [json.load(open(x)) for x in a.merge]
        doc = dict(docs[0])
        doc["rows"] = [r for d in docs for r in d["rows"]]
        doc["notes"] = [n for d in docs for n in d.get("notes", [])] + a.note
        print(write(doc, a.out))
        return
    import common

    os.makedirs(a.out, exist_ok=True)
    rows = []
    for spec in [c for c in a.cases.split(",") if c]:
        impl, S, steps = spec.rsplit(":", 2)
        row = run_case(impl, int(S), int(steps), a.timeout, a.out)
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "lm_loss"}), flush=True)
    import datetime

    doc = {"topic": "training", "date": datetime.date.today().isoformat(), "device": common.device_name(),
           "versions": common.versions(), "rows": rows, "notes": a.note}
    stem = write(doc, a.out)
    print("\n".join(_ratio_lines(rows)))
    print(stem)


if __name__ == "__main__":
    main()
