"""Test setup: Triton's interpreter on machines without CUDA, and a `gpu` marker that skips."""

import os

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


@pytest.fixture(autouse=True)
def _fresh_seed():
    """Fresh random inputs every run (the seed is printed on failure)."""
    seed = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    yield seed


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def mcore():
    """A one-process gloo world with Megatron-Core's parallel state and our CPU patches."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    import megatron_dsa.patches as patches

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ["MASTER_PORT"] = str(_free_port())
        dist.init_process_group("gloo", rank=0, world_size=1)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel()
    patches.apply()
    if HAS_CUDA:
        from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(1234)
    yield parallel_state


@pytest.fixture(autouse=True)
def _fresh_indexer_tracker():
    """Megatron-Core's indexer-loss tracker is sized by the first model's layer count: reset it."""
    import sys

    mod = sys.modules.get("megatron.core.transformer.experimental_attention_variant.dsa")
    if mod is not None:
        mod.DSAIndexerLossLoggingHelper.tracker.clear()
    yield
