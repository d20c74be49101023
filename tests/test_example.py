"""The main job: the example trains (loss falls), pipelines, and rejects bad arguments clearly."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "examples", "train_tiny_gpt.py")
SMALL = ["--layers", "2", "--hidden", "64", "--seq-len", "64", "--micro-batch", "4",
         "--indexer-heads", "8", "--indexer-dim", "16", "--topk", "16", "--dense-warmup-steps", "4"]


def _run(args, tmp_path, nproc=1, timeout=400):
    out = tmp_path / "log.json"
    cmd = [sys.executable, SCRIPT] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
        "--master_port", str(29600 + os.getpid() % 300), SCRIPT]
    env = dict(os.environ, MASTER_PORT=str(29000 + os.getpid() % 500))
    proc = subprocess.run(cmd + args + ["--json-out", str(out)], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())["history"], proc.stdout


def test_example_trains_and_loss_falls(tmp_path):
    hist, stdout = _run(SMALL + ["--steps", "30"], tmp_path)
    assert len(hist) == 30 and "summary:" in stdout
    lm = [h["lm_loss"] for h in hist]
    assert all(x == x for x in lm)  # no NaN
    assert sum(lm[-5:]) / 5 < sum(lm[:5]) / 5 - 0.5
    assert all(h["indexer_loss"] >= 0 for h in hist)
    assert hist[-1]["indexer_loss"] > 0  # the indexer loss is attached and reported
    assert stdout.count("step ") >= 30


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], ["--vpp", "2"]])
def test_example_pipeline_parallel_two_processes(tmp_path, extra):
    layers = ["--layers", "4"]
    hist, _ = _run(SMALL[2:] + layers + ["--pp", "2", "--num-microbatches", "4", "--steps", "4"] + extra,
                   tmp_path, nproc=2)
    assert len(hist) == 4 and all(h["lm_loss"] == h["lm_loss"] for h in hist)


@pytest.mark.parametrize(
    "args,msg",
    [
        (["--steps", "0"], "--steps must be positive"),
        (["--topk", "-1"], "--topk must be positive"),
        (["--hidden", "65"], "divisible by --heads"),
        (["--indexer-dim", "24"], "power of two"),
        (["--layers", "3", "--pp", "2"], "divisible by pp"),
        (["--lr", "0"], "--lr must be positive"),
        (["--cuda-graphs", "--dense-warmup-steps", "3"], "--cuda-graphs needs --dense-warmup-steps 0"),
    ],
)
def test_example_bad_arguments(args, msg):
    proc = subprocess.run([sys.executable, SCRIPT] + args, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and msg in proc.stderr, proc.stderr[-2000:]
