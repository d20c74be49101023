"""The two-GPU receipt script (``benchmarks/parallel_nccl_receipt.py``) end to end, as a gloo dry
run on the CPU at the tiny size: it launches the workers, compares them with the one-process run
and writes the ``parallel_nccl`` receipt."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_parallel_receipt_dry_run_over_gloo(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "parallel_nccl_receipt.py"),
                           "--device", "cpu", "--size", "tiny", "--cases", "tp2_sp", "--timed-steps", "1",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = sorted(os.listdir(tmp_path))
    assert {f.rsplit(".", 1)[1] for f in files} == {"json", "md", "png"}, files
    doc = json.load(open(tmp_path / next(f for f in files if f.endswith(".json"))))
    assert doc["topic"] == "parallel_nccl" and doc["world_size"] == 2 and doc["backend"] == "gloo"
    rows = {r["case"]["parallel"]: r for r in doc["rows"]}
    assert set(rows) == {"1gpu", "tp2_sp"} and all(r["status"] == "ok" for r in rows.values())
    tp = rows["tp2_sp"]
    assert tp["case"]["topk_identical_checks"] > 0 and tp["ms"] > 0
    assert tp["rel_grad_worst_vs_1gpu"] < 1e-4 and tp["rel_loss_vs_1gpu"] < 1e-5
