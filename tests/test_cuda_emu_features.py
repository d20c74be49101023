"""Emulator features checked on test-only kernels under ``tests/cuda_emu/test_kernels`` that also
compile with nvcc (``tests/cuda_emu/sm90_emu.h``; the first two no shipped kernel uses now).

* Thread-block clusters (``cluster_exchange.cu``): two CTAs per cluster run together, each in
  its own shared memory; ``mapa`` + ``st.shared::cluster`` reach the other CTA's, remote mbarrier
  arrivals pace the rounds, ``barrier.cluster`` brackets them, ``cudaLaunchKernelEx`` carries
  the cluster size; the CTAs share one vector-clock space, so the protocol runs without
  hazards. A missing arrival is reported as a deadlock; a store into the wrong CTA gives the
  wrong sums; a store that does not wait for the reader's release is reported (or, where it
  overtook the read, gives the wrong sums).
* 64-byte-swizzled wgmma operands (``swizzle64.cu``): ``A B^T`` with either operand K-major
  or MN-major equals the float64 product; read as 128-byte-swizzled, it does not.
* ``stmatrix ... .trans`` (``stmatrix_trans.cu``; the backward's 64-key kernel stores its P / dS
  tiles with it): each 8 x 8 fragment lands transposed, element (r, c) at row c, column r.

The kernels also build with nvcc for sm_90a (checked wherever nvcc is found) and, on an sm_90
GPU (``-m gpu``), give there the results the emulator is held to."""

import ctypes
import os
import sys

import numpy as np
import pytest
import torch

EMU_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cuda_emu")
sys.path.insert(0, EMU_DIR)
from emu_lib import KERNEL_DIR, build_emulated, messages  # noqa: E402

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


def own_sums(rounds):
    """One cluster's outputs when each CTA stores into its own shared memory (mode 2)."""
    e = expected(1, rounds)
    return np.concatenate([e[128:] - 0.5, e[:128] + 0.5])


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


@pytest.mark.parametrize("seed", [0, 7])
def test_a_store_before_the_reader_released_the_slot_is_caught(lib, seed):
    err, out = run(lib, clusters=2, rounds=6, mode=3, seed=seed, wait_limit=3.0)
    caught = lib.emu_hazards() > 0 or lib.emu_aborted() == 1 or not np.array_equal(out, expected(2, 6).astype(np.float32))
    assert caught, messages(lib)


def test_a_store_into_its_own_cta_gives_other_sums(lib):
    err, out = run(lib, clusters=1, rounds=3, mode=2, seed=0)
    assert err == 0 and lib.emu_aborted() == 0
    np.testing.assert_array_equal(out, own_sums(3).astype(np.float32))  # each CTA's own values
    assert not np.array_equal(out, expected(1, 3).astype(np.float32))


@pytest.fixture(scope="module")
def swz(tmp_path_factory):
    with open(os.path.join(EMU_DIR, "test_kernels", "swizzle64.cu")) as f:
        text = f.read()
    lib = build_emulated(tmp_path_factory, "swizzle", "swizzle_emu.cpp", "swizzle64.cu", kernel_text=text)
    lib.swizzle64_mma.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
    lib.swizzle64_mma.restype = ctypes.c_int
    return lib, text


def bf16_bits(x):
    """float32 values exactly representable in bf16 -> their bf16 bits (uint16)."""
    return (np.ascontiguousarray(x, dtype=np.float32).view(np.uint32) >> 16).astype(np.uint16)


def swizzle_case(seed=0):
    rng = np.random.default_rng(seed)
    a = rng.integers(-8, 9, size=(64, 32)).astype(np.float32) / 4  # exact in bf16; sums exact in fp32
    b = rng.integers(-8, 9, size=(32, 32)).astype(np.float32) / 4
    return a, b, a.astype(np.float64) @ b.astype(np.float64).T


@pytest.mark.parametrize("ta,tb", [(0, 0), (0, 1), (1, 0)])
def test_64_byte_swizzled_operands_multiply_as_laid_out(swz, ta, tb):
    lib, _ = swz
    a, b, want = swizzle_case(ta + 2 * tb)
    ab, bb = bf16_bits(a), bf16_bits(b)
    d = np.full((64, 32), np.nan, dtype=np.float32)
    lib.emu_reset(5, 30.0)
    assert lib.swizzle64_mma(ab.ctypes.data, bb.ctypes.data, d.ctypes.data, ta, tb) == 0
    assert lib.emu_hazards() == 0, messages(lib)
    np.testing.assert_array_equal(d, want.astype(np.float32))


def test_a_64_byte_layout_read_with_the_128_byte_swizzle_is_wrong(swz, tmp_path_factory):
    _, text = swz
    # the same layout, read with the 128-byte swizzle (desc64's layout type 2 -> desc's 1)
    mutant = text.replace("| (2ull << 62);", "| (1ull << 62);")
    assert text.count("| (2ull << 62);") == 1 and mutant != text
    lib = build_emulated(tmp_path_factory, "swizzle_mut", "swizzle_emu.cpp", "swizzle64.cu", kernel_text=mutant)
    lib.swizzle64_mma.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
    a, b, want = swizzle_case(0)
    d = np.full((64, 32), np.nan, dtype=np.float32)
    lib.emu_reset(0, 30.0)
    lib.swizzle64_mma(bf16_bits(a).ctypes.data, bf16_bits(b).ctypes.data, d.ctypes.data, 0, 0)
    assert not np.array_equal(d, want.astype(np.float32))


# ---- the same kernels on the hardware: what the emulator is held to is what an H100 / H200 does ----

HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


def _nvcc_build(tmp_path, name):
    """``test_kernels/name.cu`` built by nvcc for sm_90a into a shared library (skips without nvcc)."""
    import subprocess

    from megatron_dsa.kernels.cuda_build import find_nvcc

    nvcc = find_nvcc()
    if nvcc is None:
        pytest.skip("no nvcc")
    so = tmp_path / f"{name}.so"
    proc = subprocess.run([nvcc, "-gencode", "arch=compute_90a,code=sm_90a", "-std=c++17", "-O3", "-shared",
                           "-Xcompiler", "-fPIC", "-I", KERNEL_DIR,
                           os.path.join(EMU_DIR, "test_kernels", f"{name}.cu"), "-o", str(so)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return so


@pytest.mark.parametrize("name", ["cluster_exchange", "swizzle64", "stmatrix_trans"])
def test_the_test_kernels_build_for_sm90a(tmp_path, name):
    assert _nvcc_build(tmp_path, name).exists()


@pytest.mark.gpu
@pytest.mark.skipif(not HOPPER, reason="needs an sm_90 GPU")
def test_cluster_exchange_on_the_gpu_gives_the_emulators_sums(tmp_path):
    lib = ctypes.CDLL(str(_nvcc_build(tmp_path, "cluster_exchange")))
    lib.cluster_exchange.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int]
    for clusters, rounds, mode, want in [(2, 5, 0, expected(2, 5)), (64, 9, 0, expected(64, 9)), (1, 3, 2, own_sums(3))]:
        out = torch.full((2 * clusters * 128,), float("nan"), device="cuda")
        assert lib.cluster_exchange(out.data_ptr(), clusters, rounds, mode) == 0
        torch.cuda.synchronize()
        np.testing.assert_array_equal(out.cpu().numpy(), want.astype(np.float32), err_msg=f"mode {mode}")


@pytest.mark.gpu
@pytest.mark.skipif(not HOPPER, reason="needs an sm_90 GPU")
@pytest.mark.parametrize("ta,tb", [(0, 0), (0, 1), (1, 0)])
def test_64_byte_swizzled_operands_on_the_gpu_multiply_as_laid_out(tmp_path, ta, tb):
    lib = ctypes.CDLL(str(_nvcc_build(tmp_path, "swizzle64")))
    lib.swizzle64_mma.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
    a, b, want = swizzle_case(ta + 2 * tb)
    ab = torch.from_numpy(bf16_bits(a).view(np.int16)).cuda()
    bb = torch.from_numpy(bf16_bits(b).view(np.int16)).cuda()
    d = torch.full((64, 32), float("nan"), device="cuda")
    assert lib.swizzle64_mma(ab.data_ptr(), bb.data_ptr(), d.data_ptr(), ta, tb) == 0
    torch.cuda.synchronize()
    np.testing.assert_array_equal(d.cpu().numpy(), want.astype(np.float32))


# ---- stmatrix .trans ----

def stsm_trans_expected():
    """Matrix j's row c, column r (uint16 at 64 j + 8 c + r): fragment element (r, c) of matrix j,
    held by lane 4 r + c // 2 as half c % 2 of its register j: 64 j + 2 (4 r + c // 2) + c % 2."""
    j, c, r = np.meshgrid(np.arange(4), np.arange(8), np.arange(8), indexing="ij")
    return (64 * j + 2 * (4 * r + c // 2) + c % 2).astype(np.uint16).reshape(-1)


def test_stmatrix_trans_stores_each_fragment_transposed(tmp_path_factory):
    with open(os.path.join(EMU_DIR, "test_kernels", "stmatrix_trans.cu")) as f:
        text = f.read()
    lib = build_emulated(tmp_path_factory, "stsm", "stsm_emu.cpp", "stmatrix_trans.cu", kernel_text=text)
    lib.stmatrix_trans_store.argtypes = [ctypes.c_void_p]
    out = np.zeros(128, dtype=np.uint32)
    lib.emu_reset(0, 30.0)
    assert lib.stmatrix_trans_store(out.ctypes.data) == 0
    assert lib.emu_hazards() == 0, messages(lib)
    np.testing.assert_array_equal(out.view(np.uint16), stsm_trans_expected())


@pytest.mark.gpu
@pytest.mark.skipif(not HOPPER, reason="needs an sm_90 GPU")
def test_stmatrix_trans_on_the_gpu_stores_as_the_emulator(tmp_path):
    lib = ctypes.CDLL(str(_nvcc_build(tmp_path, "stmatrix_trans")))
    lib.stmatrix_trans_store.argtypes = [ctypes.c_void_p]
    out = torch.zeros(128, dtype=torch.int32, device="cuda")
    assert lib.stmatrix_trans_store(out.data_ptr()) == 0
    torch.cuda.synchronize()
    np.testing.assert_array_equal(out.cpu().numpy().view(np.uint16), stsm_trans_expected())
