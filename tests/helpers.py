"""Helpers shared by the tests (test files import from here, never from each other): tiny DSA
configs, Megatron-Core's own DSA as the reference, sparse MLA inputs and error measures, the
sm_90a compile check, a free port for a child's process group, the index cache's pp_worker runs
(one-rank references cached per session, parametrized groups in one launch), and a
child-process runner for GPU code that could hang."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import random
import re
import socket
import subprocess
import sys

import pytest
import torch


def _ephemeral_low() -> int:
    """The lowest port the kernel hands out to sockets bound to port 0 (Linux's default 32768)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> str:
    """A TCP port free on this machine now, as a string (MASTER_PORT / ``--master_port``).

    Drawn below the ephemeral range, from a band of its own per pytest-xdist worker: a port the
    kernel handed out (bind to 0) and that was closed again can be taken by any connection of a
    process group running beside this test (gloo's pairs bind ephemeral ports) before the child
    listens on it, which failed a CI run with EADDRINUSE."""
    lo, hi = 20000, min(32000, _ephemeral_low() - 1)
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    n = int("".join(c for c in worker if c.isdigit()) or 0) % 8
    span = max(1, (hi - lo) // 8)
    rng = random.Random()  # (its own state: the tests' seed plugin seeds the global one)
    for _ in range(256):
        port = lo + n * span + rng.randrange(span)
        with socket.socket() as s:
            try:
                s.bind(("", port))
            except OSError:
                continue
        return str(port)
    with socket.socket() as s:  # (the band is full: any port the kernel gives)
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def tiny_config(**overrides):
    from megatron.core.transformer.transformer_config import MLATransformerConfig

    kw = dict(
        num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128,
        q_lora_rank=32, kv_lora_rank=32, qk_head_dim=16, qk_pos_emb_head_dim=8, v_head_dim=16,
        experimental_attention_variant="dsa", dsa_indexer_n_heads=32, dsa_indexer_head_dim=16,
        dsa_indexer_topk=8, dsa_indexer_loss_coeff=1.0, add_bias_linear=False,
        use_cpu_initialization=True, rope_type="rope", params_dtype=torch.float32,
        transformer_impl="local", hidden_dropout=0.0, attention_dropout=0.0,
    )
    kw.update(overrides)
    return MLATransformerConfig(**kw)


def to_mcore_spec(spec):
    """A copy of one of our specs with Megatron-Core's DSAttention / DSAIndexer swapped in."""
    from megatron_dsa.hybrid import swap_to_megatron_core

    return swap_to_megatron_core(spec)


def indexer_tracker_values():
    from megatron.core.transformer.experimental_attention_variant.dsa import (
        DSAIndexerLossLoggingHelper,
    )

    values = DSAIndexerLossLoggingHelper.tracker.get("values")
    return None if values is None else values.clone()


def clear_indexer_tracker():
    from megatron.core.transformer.experimental_attention_variant.dsa import (
        DSAIndexerLossLoggingHelper,
    )

    DSAIndexerLossLoggingHelper.tracker.clear()


def run_gpu_child(code: str, timeout: float, what: str) -> None:
    """Run ``code`` in a fresh Python with the repo and tests/ importable (``sys.argv[1]`` is the
    tests folder); fail on a non-zero exit or on ``timeout`` seconds (a kernel hand-off bug would
    hang rather than fail)."""
    import os
    import subprocess
    import sys

    import pytest

    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(here), here, os.environ.get("PYTHONPATH", "")]))
    try:
        proc = subprocess.run([sys.executable, "-c", code, here], capture_output=True, text=True,
                              timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{what} did not finish within {timeout:.0f} s (deadlock?)")
    print(proc.stdout)
    assert proc.returncode == 0, proc.stderr[-3000:]


# ------------------------------------------------------------------------------------------
# Sparse MLA: errors, poisoned outputs, inputs
# ------------------------------------------------------------------------------------------


def rel(a, b):
    """Relative error ||a - b|| / ||b|| in float64 (absolute when b is zero)."""
    a = a.double()
    b = b.double()
    n = b.norm()
    return ((a - b).norm() / (n if n > 0 else 1.0)).item()


@contextlib.contextmanager
def poisoned_empty():
    """Every torch.empty / empty_like the kernel host code makes starts as NaN (integers as
    -2^30), so an output the kernel forgets to write shows up."""
    orig_empty, orig_like = torch.empty, torch.empty_like

    def fill(t):
        if t.is_floating_point():
            t.fill_(float("nan"))
        elif t.dtype in (torch.int32, torch.int64):
            t.fill_(-(2**30))
        return t

    def empty(*a, **k):
        return fill(orig_empty(*a, **k))

    def empty_like(*a, **k):
        return fill(orig_like(*a, **k))

    torch.empty, torch.empty_like = empty, empty_like
    try:
        yield
    finally:
        torch.empty, torch.empty_like = orig_empty, orig_like


def causal_indices(S, K, device):
    """Row t takes K distinct random keys in [0, t]; rows t < K are padded with -1."""
    out = torch.empty(S, K, dtype=torch.int32, device=device)
    for r0 in range(0, S, 1024):
        r1 = min(S, r0 + 1024)
        t = torch.arange(r0, r1, device=device)[:, None]
        keys = torch.arange(S, device=device)[None, :]
        score = torch.rand(r1 - r0, S, device=device)
        score = torch.where(keys <= t, score, -1.0)
        val, ix = score.topk(K, dim=1)
        out[r0:r1] = torch.where(val >= 0, ix, -1).int()
    return out


def cuda_fwd_case(T, H, K, sink, topk, empty_rows, seed):
    """Inputs for the CUDA sparse MLA forward at the real head dims (576 / d_v 512), on the GPU,
    drawn from ``seed``: q [T, H, 576], kv [T, 576] in bf16, causal indices [T, K] (8 random rows
    emptied when ``empty_rows``), per-row topk lengths when ``topk``, a per-head sink when
    ``sink``."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(T, H, 576, device="cuda", generator=g).bfloat16()
    kv = torch.randn(T, 576, device="cuda", generator=g).bfloat16()
    idx = causal_indices(T, K, "cuda")
    if empty_rows:
        idx[torch.randint(0, T, (8,), device="cuda", generator=g)] = -1
    tk = torch.randint(0, K + 1, (T,), device="cuda", generator=g).int() if topk else None
    sk = torch.randn(H, device="cuda", generator=g) if sink else None
    return q, kv, idx, tk, sk


def assert_compiles_without_spills(src, tmp_path, kernel):
    """``src`` compiles for sm_90a, ``kernel`` (a name or a tuple of names) among its entry points, every entry point without
    spills, serialized wgmma (C7510-C7518: ptxas inserts waits when accumulators are touched
    mid-flight or registers run short) or an ignored setmaxnreg (C7507)."""
    import subprocess

    from megatron_dsa.kernels.cuda_build import find_nvcc

    proc = subprocess.run(
        [find_nvcc(), "-O3", "-std=c++17", "-gencode=arch=compute_90a,code=sm_90a", "-Xptxas", "-v",
         "-c", "-o", str(tmp_path / "k.o"), str(src)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = proc.stderr
    for name in (kernel,) if isinstance(kernel, str) else kernel:
        assert name in report, report[-3000:]
    spills, entry = [], None
    for ln in report.splitlines():
        if "Function properties for " in ln:
            entry = ln.split("Function properties for ", 1)[1].strip()
        elif "spill" in ln:
            m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", ln)
            spills.append((entry, int(m.group(1)) == 0 and int(m.group(2)) == 0))
    assert spills and all(ok for _, ok in spills), ([e for e, ok in spills if not ok], report[-3000:])
    for code in ("C7507", "C7510", "C7512", "C7514", "C7518"):
        assert code not in report, report[-3000:]


def merge_rank_outputs(out: str, nproc: int) -> dict:
    """The per-rank files ``<out>.rank<r>.pt`` a test worker (pp_worker.py, hybrid_worker.py)
    wrote, merged: every rank's gradients by global name, losses, roles, cache stats and timing
    (pp_worker.py --timed-steps; also read by the benchmarks' receipts)."""
    import torch

    merged = {"grads": {}, "losses": [], "roles": [], "stats": [], "topk_checked": 0, "timing": []}
    for r in range(nproc):
        d = torch.load(f"{out}.rank{r}.pt", weights_only=False)
        merged["grads"].update(d["grads"])
        merged["losses"] += d["losses"]
        merged["roles"] += d["roles"]
        merged["stats"].append(d["stats"])
        merged["topk_checked"] += d.get("topk_checked", 0)
        merged["timing"].append(d.get("timing") or {})
    return merged


# ----------------------------------------------------------------------------- pp_worker runs
# The index cache's multi-process tests (test_index_cache*.py) run tests/pp_worker.py.

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pp_worker.py")

# Single-rank references, by their arguments: several tests compare against the same one-rank
# run (each is a full training of the tiny model in a fresh process), so it runs once per session.
_ONE_RANK_RUNS = {}


def worker_args(kw):
    """The worker's command line for ``run_worker``'s keyword arguments (``True``: a bare flag)."""
    args = []
    for k, v in kw.items():
        args += [f"--{k.replace('_', '-')}"] if v is True else [f"--{k}", str(v)]
    return args


def launch_worker(name, nproc, args, timeout=600):
    """Run the worker with ``args`` in ``nproc`` processes (torchrun unless one); returns None, or
    what went wrong with the tail of the output."""
    if nproc == 1:
        cmd = [sys.executable, WORKER]
        env = dict(os.environ, MASTER_PORT=free_port())
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               "--master_port", free_port(), WORKER]
        env = dict(os.environ)
    try:
        proc = subprocess.run(cmd + args, capture_output=True, text=True, timeout=timeout, env=env,
                              cwd=os.path.dirname(WORKER))
    except subprocess.TimeoutExpired as e:
        out = [x.decode(errors="replace") if isinstance(x, bytes) else x or "" for x in (e.stdout, e.stderr)]
        return f"timed out after {e.timeout:.0f} s\n" + out[0][-2000:] + out[1][-4000:]
    if proc.returncode != 0:
        return f"exit code {proc.returncode}\n" + proc.stdout[-2000:] + proc.stderr[-4000:]
    return None


def run_worker(tmp_path, name, nproc=1, **kw):
    args = worker_args(kw)
    if nproc == 1 and tuple(args) in _ONE_RANK_RUNS:
        return copy.deepcopy(_ONE_RANK_RUNS[tuple(args)])
    out = str(tmp_path / name)
    error = launch_worker(name, nproc, args + ["--out", out])
    assert error is None, error
    result = merge_rank_outputs(out, nproc)
    if nproc == 1:
        _ONE_RANK_RUNS[tuple(args)] = copy.deepcopy(result)
    return result


def run_batch(out_dir, name, nproc, arg_lists):
    """Run the configs ``arg_lists`` one after another in one launch of ``nproc`` processes
    (``pp_worker.py --batch``); returns their merged results in order, or the failure's text."""
    outs = [str(out_dir / f"{name}{i}") for i in range(len(arg_lists))]
    with open(out_dir / f"{name}.json", "w") as f:
        json.dump([list(args) + ["--out", out] for args, out in zip(arg_lists, outs)], f)
    error = launch_worker(name, nproc, ["--batch", str(out_dir / f"{name}.json")], timeout=600 * len(arg_lists))
    return error if error is not None else [merge_rank_outputs(out, nproc) for out in outs]


# Parametrized multi-rank groups, by name: every case of a group runs on the same number of
# processes, so the group's first case runs all of the group's configs in one launch (and the
# one-rank references not yet run in one plain-python process): each process's start-up,
# importing torch and Megatron, takes longer than a tiny config. The others reuse the results.
# The worker resets everything global between configs, so a result is bit-identical to its own
# launch. A failed batch fails every case of its group, with the process output.
_GROUP_RUNS = {}


def group_case(tmp_path_factory, group, nproc, pairs, case):
    """``(one-rank reference, nproc-rank run)`` of case ``case`` of a group whose cases are
    ``pairs``: per case, the ``run_worker`` keyword arguments of the reference and of the run."""
    if group not in _GROUP_RUNS:
        out_dir = tmp_path_factory.mktemp(group)
        refs = list(dict.fromkeys(tuple(worker_args(ref)) for ref, _ in pairs))
        refs = [r for r in refs if r not in _ONE_RANK_RUNS]
        got = run_batch(out_dir, f"{group}_ref", 1, refs) if refs else []
        if not isinstance(got, str):
            _ONE_RANK_RUNS.update(zip(refs, got))
            got = run_batch(out_dir, f"{group}_run", nproc, [worker_args(run) for _, run in pairs])
        _GROUP_RUNS[group] = got
    got = _GROUP_RUNS[group]
    if isinstance(got, str):
        pytest.fail(f"the {group} batch (every case of the group in one launch) failed; this case: "
                    f"{pairs[case]}\n{got}", pytrace=False)
    return copy.deepcopy(_ONE_RANK_RUNS[tuple(worker_args(pairs[case][0]))]), copy.deepcopy(got[case])


def assert_same_grads(a, b, rtol=1e-5, atol=1e-7):
    assert set(a["grads"]) == set(b["grads"])
    for n in a["grads"]:
        torch.testing.assert_close(a["grads"][n], b["grads"][n], rtol=rtol, atol=atol, msg=n)
    assert a["losses"] == pytest.approx(b["losses"], rel=1e-5)
