"""The sm_90a CUDA sparse MLA forward.

CPU: routing (CPU tensors never take the CUDA path, the env switch turns it off) and, where an
``nvcc`` is installed, that the kernel source compiles for sm_90a without register spills.
GPU (Hopper only): against the float64 reference at real sizes with fresh random inputs, outputs
poisoned with NaN before each run; masked head tiles, sink, topk_length, empty rows, and a
CUDA-graph capture/replay.
"""

from __future__ import annotations

import subprocess
import warnings

import pytest
import torch

from megatron_dsa.kernels.sparse_mla import cuda_impl as ci
from megatron_dsa.kernels.sparse_mla.reference import sparse_mla_reference

from test_sparse_mla_kernel import causal_indices, poisoned_empty, rel

HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


def test_cpu_tensors_never_take_the_cuda_path():
    q = torch.zeros(4, 64, 576, dtype=torch.bfloat16)
    kv = torch.zeros(4, 576, dtype=torch.bfloat16)
    assert not ci.cuda_fwd_eligible(q, kv, 512)


def test_env_switch_disables(monkeypatch):
    monkeypatch.setenv("MEGATRON_DSA_CUDA_FWD", "0")
    assert not ci.cuda_fwd_available()


def assert_compiles_without_spills(src, tmp_path, kernel):
    """``src`` compiles for sm_90a, ``kernel`` among its entry points, every entry point without
    spills, serialized wgmma (C7510-C7518: ptxas inserts waits when accumulators are touched
    mid-flight or registers run short) or an ignored setmaxnreg (C7507)."""
    proc = subprocess.run(
        [ci._nvcc(), "-O3", "-std=c++17", "-gencode=arch=compute_90a,code=sm_90a", "-Xptxas", "-v",
         "-c", "-o", str(tmp_path / "k.o"), str(src)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = proc.stderr
    assert kernel in report, report[-3000:]
    spill_lines = [ln for ln in report.splitlines() if "spill" in ln]
    assert spill_lines and all("0 bytes spill stores, 0 bytes spill loads" in ln for ln in spill_lines), report[-3000:]
    for code in ("C7507", "C7510", "C7512", "C7514", "C7518"):
        assert code not in report, report[-3000:]


@pytest.mark.skipif(ci._nvcc() is None, reason="no nvcc")
def test_kernel_compiles_for_sm90a_without_spills(tmp_path):
    assert_compiles_without_spills(ci._SRC, tmp_path, "sparse_mla_fwd_sm90_kernel")


@pytest.mark.skipif(ci._nvcc() is None, reason="no nvcc")
def test_16_head_kernel_compiles_for_sm90a_without_spills(tmp_path):
    assert_compiles_without_spills(ci._SRC16, tmp_path, "sparse_mla_fwd16_sm90_kernel")


def test_cpu_tensors_take_no_cuda_kernel_at_any_head_count():
    kv = torch.zeros(4, 576, dtype=torch.bfloat16)
    for H in (1, 16, 17, 128):
        q = torch.zeros(4, H, 576, dtype=torch.bfloat16)
        assert not ci.cuda_fwd_eligible(q, kv, 512)
        assert not ci.cuda_bwd_eligible(q, kv, 512, False)


@pytest.mark.skipif(ci._nvcc() is None, reason="no nvcc")
def test_library_builds_loads_and_fits_shared_memory(tmp_path, monkeypatch):
    monkeypatch.setenv("MEGATRON_DSA_CACHE", str(tmp_path))
    path = ci.build_library()
    assert path.parent == tmp_path and path.exists()
    assert ci.build_library() == path  # cached: same key, no rebuild
    lib = ci.load_library(path)
    smem = lib.dsa_sparse_mla_fwd_smem_bytes()
    assert 200 * 1024 < smem <= 232448  # Hopper's per-block opt-in limit (227 KB)


def test_failed_build_falls_back_with_one_warning(tmp_path, monkeypatch):
    fake = tmp_path / "nvcc"
    fake.write_text("#!/bin/sh\necho 'fake nvcc: no' >&2\nexit 3\n")
    fake.chmod(0o755)
    monkeypatch.setenv("MEGATRON_DSA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(ci, "_nvcc", lambda: str(fake))
    monkeypatch.setattr(ci, "_LIB", None)
    monkeypatch.setattr(ci, "_LIB_ERROR", None)
    with pytest.warns(UserWarning, match="using Triton"):
        assert ci._load() is None
    assert "fake nvcc: no" in ci._LIB_ERROR
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert ci._load() is None  # remembered: no second build, no second warning
    assert not seen
    with pytest.raises(RuntimeError, match="unavailable"):
        ci.sparse_mla_fwd_cuda(torch.zeros(1, 64, 576, dtype=torch.bfloat16),
                               torch.zeros(1, 576, dtype=torch.bfloat16),
                               torch.zeros(1, 64, dtype=torch.int32), 0.1)


gpu = pytest.mark.skipif(not HOPPER, reason="needs an sm_90 GPU")


@pytest.mark.gpu
@gpu
def test_gpu_head_count_routing(monkeypatch):
    """Every head count takes a CUDA kernel: <= 16 heads the 16-head forward, more the 64-head
    one; the backward too unless deterministic."""
    if not ci.cuda_fwd_available():
        pytest.skip(f"CUDA forward unavailable: {ci._LIB_ERROR}")
    kv = torch.zeros(4, 576, dtype=torch.bfloat16, device="cuda")
    launched = []
    lib = ci._load()
    for name in ("dsa_sparse_mla_fwd16_sm90", "dsa_sparse_mla_fwd_sm90"):
        real = getattr(lib, name)
        monkeypatch.setattr(lib, name, lambda *a, _n=name, _r=real: (launched.append(_n), _r(*a))[1])
    for H, kernel in ((1, "dsa_sparse_mla_fwd16_sm90"), (16, "dsa_sparse_mla_fwd16_sm90"),
                      (17, "dsa_sparse_mla_fwd_sm90"), (32, "dsa_sparse_mla_fwd_sm90"),
                      (128, "dsa_sparse_mla_fwd_sm90")):
        q = torch.zeros(4, H, 576, dtype=torch.bfloat16, device="cuda")
        assert ci.cuda_fwd_eligible(q, kv, 512) and ci.cuda_bwd_eligible(q, kv, 512, False), H
        assert not ci.cuda_bwd_eligible(q, kv, 512, True), H
        launched.clear()
        ci.sparse_mla_fwd_cuda(q, kv, torch.zeros(4, 64, dtype=torch.int32, device="cuda"), 0.1)
        assert launched == [kernel], (H, launched)


def _case(T, H, K, sink, topk, empty_rows, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(T, H, 576, device="cuda", generator=g).bfloat16()
    kv = torch.randn(T, 576, device="cuda", generator=g).bfloat16()
    idx = causal_indices(T, K, "cuda")
    if empty_rows:
        idx[torch.randint(0, T, (8,), device="cuda", generator=g)] = -1
    tk = torch.randint(0, K + 1, (T,), device="cuda", generator=g).int() if topk else None
    sk = torch.randn(H, device="cuda", generator=g) if sink else None
    return q, kv, idx, tk, sk


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("T,H,K,sink,topk", [
    (2048, 128, 2048, False, False),
    (1536, 64, 1024, True, True),
    (1024, 100, 512, True, False),   # last head tile masked (100 = 64 + 36)
    (777, 48, 300, False, True),     # one partial head tile; K not a multiple of 64
    (2100, 16, 2048, True, True),    # the 16-head kernel; rows with 0 to 2048 keys
    (5000, 16, 2048, False, False),  # the 16-head kernel, many rows per CTA
    (600, 7, 512, True, True),       # the 16-head kernel, 7 heads (zero rows of Q, not stored)
    (257, 1, 200, False, True),      # the 16-head kernel, one head; K not a multiple of 64
    (1024, 32, 512, True, True),     # the 64-head kernel, one half-empty head tile
    (600, 17, 300, False, False),    # the 64-head kernel, 17 heads
])
def test_gpu_matches_float64_reference(T, H, K, sink, topk):
    if not ci.cuda_fwd_available():
        pytest.skip(f"CUDA forward unavailable: {ci._LIB_ERROR}")
    seed = int(torch.randint(0, 2**31 - 1, (1,)).item())  # fresh inputs every run
    q, kv, idx, tk, sk = _case(T, H, K, sink, topk, empty_rows=True, seed=seed)
    scale = 576 ** -0.5
    with poisoned_empty():
        out, lse = ci.sparse_mla_fwd_cuda(q, kv, idx, scale, tk, sk)
    ro, rl = sparse_mla_reference(q.double(), kv.double(), idx, scale, 512, tk,
                                  sk.double() if sk is not None else None)
    fin = torch.isfinite(rl)
    assert torch.equal(fin, torch.isfinite(lse)), "empty rows must give lse = -inf exactly"
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert (lse[fin].double() - rl[fin]).abs().max().item() < 1e-2
    # bf16 output: tolerance relative to what plain PyTorch gets at bf16 (rounding the fp64 result)
    err = rel(out.double(), ro)
    floor = rel(ro.to(torch.bfloat16).double(), ro)
    print(f"T={T} H={H} K={K} seed={seed}: out rel err {err:.2e} (bf16 rounding {floor:.2e})")
    assert err < max(4 * floor, 5e-3), (seed, err, floor)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("H", [64, 16])
def test_gpu_odd_k_and_strided_q(H):
    if not ci.cuda_fwd_available():
        pytest.skip(f"CUDA forward unavailable: {ci._LIB_ERROR}")
    T, K = 600, 200  # K not a multiple of the 64-key block
    q_big = torch.randn(T, H + 8, 576, device="cuda").bfloat16()
    q = q_big[:, 4:H + 4]  # strided heads
    kv = torch.randn(T, 576, device="cuda").bfloat16()
    idx = causal_indices(T, K, "cuda").long()  # int64 accepted
    with poisoned_empty():
        out, lse = ci.sparse_mla_fwd_cuda(q, kv, idx, 0.05)
    ro, rl = sparse_mla_reference(q.double(), kv.double(), idx, 0.05, 512)
    assert rel(out.double(), ro) < 1e-2
    fin = torch.isfinite(rl)
    assert (lse[fin].double() - rl[fin]).abs().max().item() < 1e-2


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("H", [128, 16])
def test_gpu_graph_capture_replay(H):
    if not ci.cuda_fwd_available():
        pytest.skip(f"CUDA forward unavailable: {ci._LIB_ERROR}")
    q, kv, idx, tk, sk = _case(512, H, 256, True, True, False, seed=1)
    out, lse = ci.sparse_mla_fwd_cuda(q, kv, idx, 0.05, tk, sk)  # warm-up (build, attributes)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        g_out, g_lse = ci.sparse_mla_fwd_cuda(q, kv, idx, 0.05, tk, sk)
    q.copy_(torch.randn_like(q))
    graph.replay()
    torch.cuda.synchronize()
    ref_out, ref_lse = ci.sparse_mla_fwd_cuda(q, kv, idx, 0.05, tk, sk)
    assert torch.equal(g_out, ref_out) and torch.equal(g_lse, ref_lse)


_CLUSTER_CHILD = r"""
import sys, torch
sys.path.insert(0, sys.argv[1])
from test_sparse_mla_kernel import causal_indices, poisoned_empty, rel
from megatron_dsa.kernels.sparse_mla import cuda_impl as ci
from megatron_dsa.kernels.sparse_mla.reference import sparse_mla_reference
for T, H, K, topk in ((1024, 128, 1024, True), (700, 100, 300, False), (2100, 128, 2048, False)):
    q = torch.randn(T, H, 576, device="cuda").bfloat16()
    kv = torch.randn(T, 576, device="cuda").bfloat16()
    idx = causal_indices(T, K, "cuda")
    idx[3] = -1
    tk = torch.randint(0, K + 1, (T,), device="cuda").int() if topk else None
    sk = torch.randn(H, device="cuda")
    with poisoned_empty():
        out, lse = ci.sparse_mla_fwd_cuda(q, kv, idx, 0.04, tk, sk, cluster=True)
    ro, rl = sparse_mla_reference(q.double(), kv.double(), idx, 0.04, 512, tk, sk.double())
    fin = torch.isfinite(rl)
    assert torch.equal(fin, torch.isfinite(lse)) and not torch.isnan(out).any()
    assert (lse[fin].double() - rl[fin]).abs().max().item() < 1e-2
    err = rel(out.double(), ro)
    assert err < 5e-3, (T, H, K, err)
    print(f"cluster T={T} H={H} K={K}: out rel err {err:.2e}")
"""


@pytest.mark.gpu
@gpu
def test_gpu_cluster_variant_matches_reference(tmp_path):
    """The 2-CTA cluster variant (opt-in) against the float64 reference, in a child process
    with a time limit: a hand-off bug between the two CTAs would hang rather than fail."""
    if not ci.cuda_fwd_available():
        pytest.skip(f"CUDA forward unavailable: {ci._LIB_ERROR}")
    from helpers import run_gpu_child

    run_gpu_child(_CLUSTER_CHILD, 180, "cluster variant")
