"""The main job: the example trains (loss falls), pipelines, and rejects bad arguments clearly."""

import json
import os
import subprocess
import sys

import pytest

from helpers import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "examples", "train_tiny_gpt.py")
SMALL = ["--layers", "2", "--hidden", "64", "--seq-len", "64", "--micro-batch", "4",
         "--indexer-heads", "8", "--indexer-dim", "16", "--topk", "16", "--dense-warmup-steps", "4"]


def _run(args, tmp_path, nproc=1, timeout=400):
    out = tmp_path / "log.json"
    cmd = [sys.executable, SCRIPT] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
        "--master_port", free_port(), SCRIPT]
    env = dict(os.environ, MASTER_PORT=free_port())
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
        (["--lr", "0"], "--lr must be a finite number > 0, got 0.0"),
        (["--cuda-graphs", "--dense-warmup-steps", "3"], "--cuda-graphs needs --dense-warmup-steps 0"),
    ],
)
def test_example_bad_arguments(args, msg):
    proc = subprocess.run([sys.executable, SCRIPT] + args, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and msg in proc.stderr, proc.stderr[-2000:]


def _run_raw(args, timeout=120):
    env = dict(os.environ, MASTER_PORT=free_port())
    return subprocess.run([sys.executable, SCRIPT] + args, capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=ROOT)


def _rejected_up_front(proc, *needles):
    """exit 2 (argparse), every needle in the message, no traceback, and nothing built or trained."""
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    for needle in needles:
        assert needle in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "tiny GPT" not in proc.stdout and "step " not in proc.stdout, proc.stdout[-2000:]


@pytest.mark.parametrize(
    "args,msg",
    [
        (["--lr", "inf"], "--lr must be a finite number > 0, got inf"),
        (["--lr", "nan"], "--lr must be a finite number > 0, got nan"),
        (["--indexer-loss-coeff", "inf"], "--indexer-loss-coeff must be a finite number >= 0, got inf"),
        (["--indexer-loss-coeff", "nan"], "--indexer-loss-coeff must be a finite number >= 0, got nan"),
        (["--seed", str(2**70)], "--seed must be in [0, 4294967295]"),
        (["--seed", "-1"], "--seed must be in [0, 4294967295]"),
        (["--topk", str(2**40)], "--topk must be <= 2147483647"),
    ],
)
def test_example_numeric_flags_checked_up_front(args, msg):
    """--lr inf / --indexer-loss-coeff inf used to train to NaN and exit 0."""
    _rejected_up_front(_run_raw(SMALL + args), msg)


def test_example_json_out_folder_checked_up_front(tmp_path):
    """--json-out into a missing folder used to fail only after training (with a traceback)."""
    _rejected_up_front(_run_raw(SMALL + ["--steps", "2", "--json-out", str(tmp_path / "missing" / "log.json")]),
                       "--json-out", str(tmp_path / "missing"))
    _rejected_up_front(_run_raw(SMALL + ["--steps", "2", "--json-out", str(tmp_path)]), "--json-out")


@pytest.mark.parametrize(
    "pattern,msg",
    [
        ("FSXS", "unknown letters ['X']"),
        ("SFFF", "layer 1 is shared"),
        ("FS", "one letter per layer"),
    ],
)
def test_example_bad_index_pattern_is_an_argparse_error(pattern, msg):
    """A bad --index-pattern letter used to end in a traceback after the process group started."""
    _rejected_up_front(_run_raw(SMALL[2:] + ["--layers", "4", "--index-pattern", pattern]), "--index-pattern", msg)


def test_example_index_pattern_conflicts_with_index_freq():
    """--index-pattern used to override --index-freq silently."""
    _rejected_up_front(_run_raw(SMALL[2:] + ["--layers", "4", "--index-pattern", "FSFS", "--index-freq", "2"]),
                       "--index-pattern", "--index-freq")


def test_example_indexer_loss_off_is_shown_as_off(tmp_path):
    """--indexer-loss-coeff 0 used to print 'indexer loss nan' on every line."""
    hist, stdout = _run(SMALL + ["--steps", "2", "--indexer-loss-coeff", "0"], tmp_path)
    assert "nan" not in stdout.lower(), stdout
    lines = [ln for ln in stdout.splitlines() if ln.startswith("step ") or ln.startswith("summary:")]
    assert len(lines) == 3 and all("indexer loss off" in ln for ln in lines), stdout
    assert all(h["indexer_loss"] is None for h in hist)


def test_example_stops_on_non_finite_loss(tmp_path):
    """A diverging run (lr 1e6: the loss is NaN from step 2) used to keep going and exit 0."""
    out = tmp_path / "log.json"
    proc = _run_raw(SMALL + ["--steps", "8", "--lr", "1e6", "--json-out", str(out)], timeout=300)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "non-finite" in proc.stderr and "lm loss" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    steps = [ln for ln in proc.stdout.splitlines() if ln.startswith("step ")]
    assert 1 <= len(steps) < 8 and "summary:" not in proc.stdout, proc.stdout
    log = json.loads(out.read_text())  # the steps up to the failure are kept for diagnosis
    assert len(log["history"]) == len(steps) and "non-finite" in log["error"]


@pytest.mark.slow
@pytest.mark.parametrize("parallel", [["--cp", "2"], ["--tp", "2", "--sequence-parallel"]])
def test_example_parallel_trains_like_one_rank(tmp_path, parallel):
    """``--cp 2`` / ``--tp 2 --sequence-parallel`` (two processes over gloo): the same LM and
    indexer losses, step by step, as one process, through the optimizer (the dense indexer
    loss, then the sparse one)."""
    args = SMALL + ["--steps", "6"]
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    one, _ = _run(args, tmp_path / "one")
    two, stdout = _run(args + parallel, tmp_path / "two", nproc=2)
    assert f"{parallel[0][2:]}=2" in stdout
    for a, b in zip(two, one):
        assert a["lm_loss"] == pytest.approx(b["lm_loss"], rel=1e-4), (a["step"], a["lm_loss"], b["lm_loss"])
        assert a["indexer_loss"] == pytest.approx(b["indexer_loss"], rel=1e-2), a["step"]  # ~1e-8: fp32 noise
