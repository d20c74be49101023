"""FP8 (e4m3) selection against the bf16 selection, on the example model's real activations.

1. Trains ``examples/train_tiny_gpt.py`` (bf16 selection) and records, at every anchor layer of
   the last step, the indexer inputs; on them it compares the top-k sets of the bf16 and the
   e4m3 selection (``DSAPluginConfig.indexer_precision="fp8"``): recall of the bf16 set, over
   rows with more candidate keys than k.
2. Trains the same model with the e4m3 selection (same seed and data) and compares the LM and
   indexer loss curves.

    python benchmarks/fp8_indexer_agreement.py --steps 100 [--device cpu] [--out DIR]

Prints one table; with ``--out``, writes ``fp8_indexer-<device>-<date>.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "examples"))


def run(steps, device, precision, record=None):
    import train_tiny_gpt

    from megatron_dsa.attention import DSAttention

    original = DSAttention.select_topk

    def recording(self, q, k, w, starts, ends, backend="auto"):
        idx = original(self, q, k, w, starts, ends, backend)
        if record is not None and self.role.role == "anchor":
            record[self.layer_number] = (q.detach().clone(), k.detach().clone(), w.detach().clone(),
                                         starts, ends, self.index_topk, self.config.dsa_indexer_scoring_relu)
        return idx

    from megatron.core import parallel_state

    DSAttention.select_topk = recording
    try:
        return train_tiny_gpt.main(["--steps", str(steps), "--device", device, "--indexer-precision", precision])
    finally:
        DSAttention.select_topk = original
        parallel_state.destroy_model_parallel()


def recall(inputs):
    from megatron_dsa.kernels.indexer import indexer_topk
    from megatron_dsa.kernels.indexer.fp8 import fp8_selection_inputs

    q, k, w, starts, ends, topk, relu = inputs
    a, _ = indexer_topk(q, k, w, topk, starts, ends, use_relu=relu)
    b, _ = indexer_topk(*fp8_selection_inputs(q, k, w), topk, starts, ends, use_relu=relu)
    T = q.shape[1]
    rows = torch.arange(T, device=q.device)
    window = (ends.long() - starts.long()) if ends is not None else (rows + 1).expand(q.shape[0], T)
    hit, total, exact = 0, 0, 0
    for bi in range(q.shape[0]):
        for t in range(T):
            if window[bi, t] <= topk:
                continue  # every candidate selected either way
            sa, sb = set(a[bi, t].tolist()), set(b[bi, t].tolist())
            hit += len(sa & sb)
            total += topk
            exact += sa == sb
    rows_counted = total // topk if topk else 0
    return hit / max(total, 1), exact / max(rows_counted, 1), rows_counted


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    record = {}
    bf16 = run(a.steps, a.device, "bf16", record)
    layers = {}
    for layer, inputs in sorted(record.items()):
        r, exact, n = recall(inputs)
        layers[layer] = {"recall": r, "rows_identical": exact, "rows": n}
    os.environ["MASTER_PORT"] = str(int(os.environ.get("MASTER_PORT", "29533")) + 1)
    fp8 = run(a.steps, a.device, "fp8")
    k = max(1, min(10, a.steps // 5))
    mean = lambda h, key, sl: sum(r[key] for r in h[sl]) / len(h[sl])  # noqa: E731
    curves = {name: {"lm_first": mean(h, "lm_loss", slice(0, k)), "lm_last": mean(h, "lm_loss", slice(-k, None)),
                     "indexer_last": mean(h, "indexer_loss", slice(-k, None))}
              for name, h in (("bf16", bf16), ("fp8", fp8))}
    lm_diff = max(abs(x["lm_loss"] - y["lm_loss"]) for x, y in zip(bf16, fp8))
    print("| anchor layer | rows (> k candidates) | recall of the bf16 top-k | rows with identical sets |")
    print("|---|---|---|---|")
    for layer, v in layers.items():
        print(f"| {layer} | {v['rows']} | {v['recall']:.4f} | {v['rows_identical']:.3f} |")
    print()
    print("| selection | LM loss, first -> last (mean of %d steps) | indexer loss, last |" % k)
    print("|---|---|---|")
    for name, c in curves.items():
        print(f"| {name} | {c['lm_first']:.4f} -> {c['lm_last']:.4f} | {c["indexer_last"]:.4e} |")
    print(f"\nlargest per-step LM loss difference: {lm_diff:.4f}")
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        path = os.path.join(a.out, f"fp8_indexer-{a.device}-{datetime.date.today().isoformat()}.json")
        with open(path, "w") as f:
            json.dump({"topic": "fp8_indexer", "device": a.device, "steps": a.steps, "layers": layers,
                       "curves": curves, "lm_loss_max_step_diff": lm_diff,
                       "torch": torch.__version__}, f, indent=1)
        print(path)


if __name__ == "__main__":
    main()
