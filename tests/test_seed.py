"""The conftest's seeds: a failure reports its seed and a rerun command, and `--seed N` or
DSA_TEST_SEED=N reproduce the draws (a malformed DSA_TEST_SEED is a usage error).

Runs small pytest sessions in child processes, in a temporary folder holding a copy of
tests/conftest.py and a test file that fails on purpose (at call and at setup) after drawing
from torch and `random`.
"""

import os
import re
import shlex
import shutil
import subprocess
import sys

import torch

_INNER = r'''
import random

import pytest
import torch


@pytest.mark.parametrize("p", ["a", "b c"])
def test_draws(p):
    assert False, f"DRAW[{p}] {torch.randn(3).tolist()} {random.random()!r} END"


@pytest.fixture
def broken():
    raise RuntimeError("fixture broke")


def test_setup_fails(broken):
    pass


def test_passes():
    torch.randn(2)
'''

_DRAW = re.compile(r"DRAW\[([^\]]+)\] (\[[^\]]*\]) (\S+) END")
_SEED = re.compile(r"^seed: (\d+)$", re.M)
_RERUN = re.compile(r"^rerun: (.+)$", re.M)
_SECTION = "megatron-dsa seed"


def _inner_dir(tmp_path):
    here = os.path.dirname(os.path.abspath(__file__))
    shutil.copy(os.path.join(here, "conftest.py"), tmp_path / "conftest.py")
    (tmp_path / "pytest.ini").write_text("[pytest]\n")  # keep the parent folders' settings out
    (tmp_path / "test_inner.py").write_text(_INNER)
    env = {k: v for k, v in os.environ.items() if k not in ("DSA_TEST_SEED", "PYTEST_ADDOPTS")}
    return env


def _start(tmp_path, env, args, extra_env=None):
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-W", "ignore", *args]
    return subprocess.Popen(cmd, cwd=tmp_path, env=dict(env, **(extra_env or {})),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc, timeout=60):
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 1, out[-3000:]  # 1: tests failed (not a usage or internal error)
    return out


def _draws(out):
    return {p: (vals, r) for p, vals, r in _DRAW.findall(out)}


def test_failure_reports_seed_and_rerun_and_seed_reproduces(tmp_path):
    env = _inner_dir(tmp_path)
    # Two sessions at once (each pays ~2 s for importing torch): random seeds, $DSA_TEST_SEED;
    # then the rerun command the first printed, as printed (--seed).
    procs = [_start(tmp_path, env, ["test_inner.py"]),
             _start(tmp_path, env, ["test_inner.py"], {"DSA_TEST_SEED": "1234"}),
             _start(tmp_path, env, ["test_inner.py"], {"DSA_TEST_SEED": "twelve"})]
    rand_out, env_out = (_finish(p) for p in procs[:2])
    bad_out, _ = procs[2].communicate(timeout=60)
    assert procs[2].returncode == 4, bad_out[-3000:]  # pytest's usage error
    assert "DSA_TEST_SEED='twelve' is not an integer" in bad_out, bad_out[-3000:]

    for out in (rand_out, env_out):
        assert "2 failed, 1 passed, 1 error" in out, out[-3000:]
        # a section for each failed call or setup, none for the passing test
        assert out.count(f" {_SECTION} ") == 3, out[-3000:]
        assert set(_draws(out)) == {"a", "b c"}, out[-3000:]

    # A fixed seed: every failure reports it with a rerun command for exactly that test, and
    # every test draws from it.
    assert _SEED.findall(env_out) == ["1234"] * 3, env_out[-3000:]
    assert set(_RERUN.findall(env_out)) == {
        "pytest 'test_inner.py::test_draws[a]' --seed 1234",
        "pytest 'test_inner.py::test_draws[b c]' --seed 1234",
        "pytest 'test_inner.py::test_setup_fails' --seed 1234"}, env_out[-3000:]
    assert _draws(env_out)["a"] == _draws(env_out)["b c"]
    torch.manual_seed(1234)
    assert _draws(env_out)["a"][0] == str(torch.randn(3).tolist())

    # Random seeds: one per failure, the reported one the one the test drew with ...
    seeds = _SEED.findall(rand_out)
    assert len(seeds) == 3, rand_out[-3000:]
    rerun = next(r for r in _RERUN.findall(rand_out) if "test_draws[b c]" in r)
    seed = int(re.fullmatch(r"pytest 'test_inner.py::test_draws\[b c\]' --seed (\d+)", rerun).group(1))
    assert str(seed) in seeds
    torch.manual_seed(seed)
    assert _draws(rand_out)["b c"][0] == str(torch.randn(3).tolist())
    # ... and the printed rerun command, run as printed, draws the same torch and `random` values.
    argv = shlex.split(rerun)
    again = _finish(_start(tmp_path, env, argv[1:]))
    assert "1 failed" in again, again[-3000:]
    assert _draws(again) == {"b c": _draws(rand_out)["b c"]}, again[-3000:]
    assert _SEED.findall(again) == [str(seed)], again[-3000:]
