"""Test setup: Triton's interpreter on machines without CUDA, a `gpu` marker that skips, and a
seed per test that a failure report prints with the command that reruns the test with it."""

import os
import random

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    # Must be set before the first `import triton` so kernels run through the interpreter.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# ------------------------------------------------------------------------------------------
# Seeds: random per test by default, fixed with `--seed N` or DSA_TEST_SEED=N (the option wins).
# A failed setup or call reports its seed and the command that reruns that one test with it.
# ------------------------------------------------------------------------------------------

SEED_ENV = "DSA_TEST_SEED"
_SEED_KEY = pytest.StashKey[int]()


def pytest_addoption(parser):
    parser.addoption(
        "--seed", type=int, default=None, metavar="N",
        help=f"seed every test's torch and `random` RNGs with N (default: ${SEED_ENV}, else a "
             "fresh random seed per test, reported when the test fails)")


def _fixed_seed(config):
    """The seed from `--seed`, else from $DSA_TEST_SEED, else None (a random seed per test)."""
    seed = config.getoption("seed")
    if seed is not None:
        return seed
    env = os.environ.get(SEED_ENV, "").strip()
    if not env:
        return None
    try:
        return int(env)
    except ValueError:
        raise pytest.UsageError(f"{SEED_ENV}={env!r} is not an integer") from None


def pytest_configure(config):
    _fixed_seed(config)  # a malformed $DSA_TEST_SEED is a usage error before anything runs


def pytest_report_header(config):
    seed = _fixed_seed(config)
    if seed is None:
        return "megatron-dsa seed: random per test (a failure prints it; rerun with --seed N)"
    return f"megatron-dsa seed: {seed} for every test"


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    # Drawn before any fixture runs, so a failing fixture reports the seed too.
    seed = _fixed_seed(item.config)
    if seed is None:
        seed = int.from_bytes(os.urandom(4), "little")
    item.stash[_SEED_KEY] = seed


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """Seed torch (every device) and `random` with this test's seed; yields the seed."""
    seed = request.node.stash.get(_SEED_KEY, None)
    if seed is None:  # not set up through pytest_runtest_setup (e.g. a plugin calling fixtures)
        seed = _fixed_seed(request.config)
        if seed is None:
            seed = int.from_bytes(os.urandom(4), "little")
        request.node.stash[_SEED_KEY] = seed
    torch.manual_seed(seed)
    random.seed(seed)
    yield seed


def _shell_quote(s: str) -> str:
    return "'" + s.replace("'", "'\"'\"'") + "'"


def rerun_command(item, seed: int) -> str:
    """`pytest '<test id>' --seed N`, with the test file's path relative to where pytest ran."""
    nodeid = item.nodeid
    try:
        rel = os.path.relpath(item.path, item.config.invocation_params.dir)
        rest = nodeid.split("::", 1)[1] if "::" in nodeid else ""
        nodeid = rel + ("::" + rest if rest else "")
    except (AttributeError, ValueError):  # no file path, or another drive on Windows
        pass
    return f"pytest {_shell_quote(nodeid)} --seed {seed}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.failed and rep.when in ("setup", "call"):
        seed = item.stash.get(_SEED_KEY, None)
        if seed is not None:
            rep.sections.append(
                ("megatron-dsa seed", f"seed: {seed}\nrerun: {rerun_command(item, seed)}\n"))


@pytest.fixture(scope="session")
def mcore():
    """A one-process gloo world with Megatron-Core's parallel state and our CPU patches."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    import megatron_dsa.patches as patches

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        from helpers import free_port

        os.environ["MASTER_PORT"] = free_port()
        dist.init_process_group("gloo", rank=0, world_size=1)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel()
    patches.apply()
    if HAS_CUDA:
        from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(1234)
    yield parallel_state


@pytest.fixture(autouse=True)
def _fresh_plugin_stats():
    """The index cache's and the graph classes' process-wide counters start at zero in every
    test: which tests ran before one in the same process depends on the run (pytest-xdist)."""
    import sys

    for name in ("megatron_dsa.index_cache", "megatron_dsa.graph"):
        mod = sys.modules.get(name)
        if mod is not None:
            mod.STATS.reset()
    yield


@pytest.fixture(autouse=True)
def _fresh_indexer_tracker():
    """Megatron-Core's indexer-loss tracker is sized by the first model's layer count: reset it."""
    import sys

    mod = sys.modules.get("megatron.core.transformer.experimental_attention_variant.dsa")
    if mod is not None:
        mod.DSAIndexerLossLoggingHelper.tracker.clear()
    yield
