"""The emulator's thread-block clusters (``tests/cuda_emu/sm90_emu.h``) on a test kernel
(``tests/cuda_emu/test_kernels/cluster_exchange.cu``): two CTAs per cluster run together, each in its own
shared memory; ``mapa`` + ``st.shared::cluster`` reach the other CTA's, remote mbarrier
arrivals pace the rounds, ``barrier.cluster`` brackets them, ``cudaLaunchKernelEx`` carries the
cluster size. A missing arrival is reported as a deadlock; a store into the wrong CTA gives
the wrong sums."""

import ctypes
import os
import sys

import numpy as np
import pytest

EMU_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cuda_emu")
sys.path.insert(0, EMU_DIR)
from emu_lib import build_emulated, messages  # noqa: E402

sys.path.pop(0)


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    with open(os.path.join(EMU_DIR, "test_kernels", "cluster_exchange.cu")) as f:
        text = f.read()
    lib = build_emulated(tmp_path_factory, "cluster", "cluster_emu.cpp", "cluster_exchange.cu", kernel_text=text)
    lib.cluster_exchange.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int]
    lib.cluster_exchange.restype = ctypes.c_int
    return lib


def expected(clusters, rounds):
    tid = np.arange(128, dtype=np.float64)
    out = []
    for _ in range(clusters):
        for rank in (0, 1):
            other = rank ^ 1
            out.append(sum((r + 1) * (1000 * r + 200 * other + tid) for r in range(rounds)) + 0.5 * rank)
    return np.concatenate(out)


def run(lib, clusters, rounds, mode, seed, wait_limit=30.0):
    lib.emu_reset(seed, wait_limit)
    out = np.full(2 * clusters * 128, np.nan, dtype=np.float32)
    err = lib.cluster_exchange(out.ctypes.data, clusters, rounds, mode)
    return err, out


@pytest.mark.parametrize("seed", [0, 3, 11])
def test_cluster_ctas_trade_values_through_distributed_shared_memory(lib, seed):
    err, out = run(lib, clusters=2, rounds=5, mode=0, seed=seed)
    assert err == 0
    assert lib.emu_hazards() == 0, messages(lib)
    assert lib.emu_aborted() == 0
    np.testing.assert_array_equal(out, expected(2, 5).astype(np.float32))


def test_a_missing_remote_arrival_is_reported_as_a_deadlock(lib):
    err, out = run(lib, clusters=1, rounds=2, mode=1, seed=0, wait_limit=2.0)
    assert lib.emu_aborted() == 1
    assert any("deadlock" in m for m in messages(lib)), messages(lib)


def test_a_store_into_its_own_cta_gives_other_sums(lib):
    err, out = run(lib, clusters=1, rounds=3, mode=2, seed=0)
    assert err == 0 and lib.emu_aborted() == 0
    own = np.concatenate([expected(1, 3)[128:] - 0.5, expected(1, 3)[:128] + 0.5])  # each CTA's own values
    np.testing.assert_array_equal(out, own.astype(np.float32))
    assert not np.array_equal(out, expected(1, 3).astype(np.float32))
