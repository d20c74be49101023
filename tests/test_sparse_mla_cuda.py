"""The sm_90a CUDA sparse MLA forward: the 16-head kernel (H <= 16), the ping-pong 64-head
kernel (H > 16) and the row-packed 64-head kernel (``packed=True``).

CPU: routing (CPU tensors never take the CUDA path), a failed build, and, where an ``nvcc`` is
installed, that the kernel sources compile for sm_90a without register spills and the library
builds and loads.
GPU (Hopper only): against the float64 reference at real sizes with fresh random inputs, outputs
poisoned with NaN before each run; masked head tiles, odd 64-key block counts, sink,
topk_length, empty rows, and a CUDA-graph capture/replay.
"""

from __future__ import annotations

import pytest
import torch

from megatron_dsa.kernels import cuda_build
from megatron_dsa.kernels.sparse_mla import cuda_impl as ci
from megatron_dsa.kernels.sparse_mla import select_backend, sparse_mla
from megatron_dsa.kernels.sparse_mla.reference import sparse_mla_reference

from helpers import assert_compiles_without_spills, causal_indices, cuda_fwd_case, poisoned_empty, rel

HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


NO_NVCC = pytest.mark.skipif(cuda_build.find_nvcc() is None, reason="no nvcc")
FWD_SRC, BWD_SRC, _, FWD16_SRC, _, _ = ci.SOURCES


def need_library():
    why = ci.library_error()
    if why is not None:
        pytest.skip(f"CUDA kernels unavailable: {why}")


def test_cpu_tensors_never_take_the_cuda_path():
    assert "cpu" in ci.unsupported_reason(torch.device("cpu"), torch.bfloat16, 576, 512)
    for H in (1, 16, 17, 128):
        choice = select_backend("auto", torch.device("cpu"), torch.bfloat16, H, 576, 512)
        assert (choice.forward, choice.backward) == ("reference", "reference"), H


def test_launchers_refuse_int64_indices():
    """The launchers read int32 ids; the public function converts (ids outside [0, Tk) -> -1)."""
    with pytest.raises(ValueError, match="int32"):
        ci.sparse_mla_fwd_cuda(torch.zeros(1, 1, 576, dtype=torch.bfloat16), torch.zeros(1, 576, dtype=torch.bfloat16),
                               torch.zeros(1, 4, dtype=torch.int64), 0.1)


@NO_NVCC
def test_kernel_compiles_for_sm90a_without_spills(tmp_path):
    """The ping-pong 64-head forward, unpacked and row-packed (two instantiations): no spills,
    no serialized wgmma, setmaxnreg honoured."""
    assert_compiles_without_spills(FWD_SRC, tmp_path, ("sparse_mla_fwd_pp_sm90_kernelILb0E", "sparse_mla_fwd_pp_sm90_kernelILb1E"))


@NO_NVCC
def test_16_head_kernel_compiles_for_sm90a_without_spills(tmp_path):
    assert_compiles_without_spills(FWD16_SRC, tmp_path, "sparse_mla_fwd16_sm90_kernel")


@NO_NVCC
def test_library_builds_loads_and_fits_shared_memory(tmp_path, monkeypatch):
    monkeypatch.setenv("MEGATRON_DSA_CACHE", str(tmp_path))
    path = ci.build()
    assert path.parent == tmp_path and path.exists()
    assert ci.build() == path  # cached: same key, no rebuild
    lib = ci._load(path)
    for smem in (lib.dsa_sparse_mla_fwd_pp_smem_bytes(), lib.dsa_sparse_mla_bwd_smem_bytes(),
                 lib.dsa_sparse_mla_bwd64_smem_bytes()):
        assert 200 * 1024 < smem <= 232448  # Hopper's per-block opt-in limit (227 KB)


def test_failed_build_is_reported_once_with_its_log(tmp_path, monkeypatch):
    count = tmp_path / "builds"
    fake = tmp_path / "nvcc"
    fake.write_text(f"#!/bin/sh\nif [ \"$1\" = --version ]; then echo fake; exit 0; fi\n"
                    f"echo x >> {count}\necho 'fake nvcc: no' >&2\nexit 3\n")
    fake.chmod(0o755)
    monkeypatch.setenv("MEGATRON_DSA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(cuda_build, "find_nvcc", lambda: str(fake))
    monkeypatch.setattr(ci, "_LIB", None)
    monkeypatch.setattr(ci, "_LIB_ERROR", None)
    why = ci.library_error()
    assert "exit code 3" in why and "build log:" in why
    log = ci._LIB_ERROR.log_path
    assert "fake nvcc: no" in log.read_text()
    assert ci.library_error() == why  # remembered: no second build
    assert count.read_text().count("x") == 1
    with pytest.raises(cuda_build.CudaBuildError, match="exit code 3"):
        ci.library()


gpu = pytest.mark.skipif(not HOPPER, reason="needs an sm_90 GPU")


@pytest.mark.gpu
@gpu
def test_gpu_head_count_routing(monkeypatch):
    """Every head count takes a CUDA kernel: <= 16 heads the 16-head forward, more the ping-pong
    64-head one; the backward too unless deterministic."""
    need_library()
    kv = torch.zeros(4, 576, dtype=torch.bfloat16, device="cuda")
    launched = []
    lib = ci.library()
    for name in ("dsa_sparse_mla_fwd16_sm90", "dsa_sparse_mla_fwd_pp_sm90"):
        real = getattr(lib, name)
        monkeypatch.setattr(lib, name, lambda *a, _n=name, _r=real: (launched.append(_n), _r(*a))[1])
    for H, kernel in ((1, "dsa_sparse_mla_fwd16_sm90"), (16, "dsa_sparse_mla_fwd16_sm90"),
                      (17, "dsa_sparse_mla_fwd_pp_sm90"), (32, "dsa_sparse_mla_fwd_pp_sm90"),
                      (128, "dsa_sparse_mla_fwd_pp_sm90"), (200, "dsa_sparse_mla_fwd_pp_sm90")):
        q = torch.zeros(4, H, 576, dtype=torch.bfloat16, device="cuda")
        auto = select_backend("auto", q.device, q.dtype, H, 576, 512)
        # (row packing, auto: the backward at <= 32 heads; the forward too where the keys are known
        # and at most fwd_pack_max_keys)
        assert (auto.forward, auto.backward) == ("cuda", "cuda-packed" if H <= 32 else "cuda"), (H, auto)
        most = ci.fwd_pack_max_keys(H) if H <= 32 else 1
        for keys, packs in ((4, H <= 32), (most, H <= 32), (most + 1, False)):
            c = select_backend("auto", q.device, q.dtype, H, 576, 512, num_keys=keys)
            assert c.forward == ("cuda-packed" if packs else "cuda"), (H, keys, c)
        det = select_backend("auto", q.device, q.dtype, H, 576, 512, deterministic=True)
        assert (det.forward, det.backward) == ("cuda", "cuda-packed-deterministic" if H <= 32 else "cuda-deterministic"), \
            (H, det)
        launched.clear()
        ci.sparse_mla_fwd_cuda(q, kv, torch.zeros(4, 64, dtype=torch.int32, device="cuda"), 0.1)
        assert launched == [kernel], (H, launched)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("T,H,K,sink,topk", [
    (2048, 128, 2048, False, False),  # the ping-pong 64-head kernel from here to the 16-head rows
    (1536, 64, 1024, True, True),
    (1024, 100, 512, True, False),   # last head tile masked (100 = 64 + 36)
    (777, 48, 300, False, True),     # one partial head tile; K not a multiple of 64, odd block counts
    (600, 17, 64, True, True),       # one 64-key block per row at most (B's block of the pair empty)
    (300, 64, 1, False, False),      # a single slot
    (2100, 16, 2048, True, True),    # the 16-head kernel; rows with 0 to 2048 keys
    (5000, 16, 2048, False, False),  # the 16-head kernel, many rows per CTA
    (600, 7, 512, True, True),       # the 16-head kernel, 7 heads (zero rows of Q, not stored)
    (257, 1, 200, False, True),      # the 16-head kernel, one head; K not a multiple of 64
    (1024, 32, 512, True, True),     # the 64-head kernel, one half-empty head tile
    (600, 17, 300, False, False),    # the 64-head kernel, 17 heads
    (300, 130, 300, True, True),     # the 64-head kernel, three head tiles, the last with 2 heads
])
def test_gpu_matches_float64_reference(T, H, K, sink, topk):
    _fwd_against_float64(T, H, K, sink, topk)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("T,H,K,sink,topk", [
    (1536, 64, 1024, True, True),    # the ping-pong kernel
    (2100, 16, 2048, True, True),    # the 16-head kernel
    (777, 48, 300, False, True),
])
def test_gpu_forward_in_l2_order_matches_float64_reference(T, H, K, sink, topk, monkeypatch):
    """The long-sequence order (cuda_impl.l2_order) forced at small shapes: each row's ids sorted
    (cuda/sort_rows.cu) before the kernel, its lengths from the sort."""
    monkeypatch.setattr(ci, "l2_order", lambda device, num_keys, key_bytes=0: True)
    _fwd_against_float64(T, H, K, sink, topk)


def _fwd_against_float64(T, H, K, sink, topk):
    need_library()
    seed = int(torch.randint(0, 2**31 - 1, (1,)).item())  # fresh inputs every run
    q, kv, idx, tk, sk = cuda_fwd_case(T, H, K, sink, topk, empty_rows=True, seed=seed)
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
@pytest.mark.row_packing
@gpu
@pytest.mark.parametrize("T,H,K,sink,topk,shared", [
    (1024, 16, 512, True, True, False),     # 4 rows per tile
    (1023, 16, 300, False, False, True),    # last group partial; rows sharing keys, repeated ids
    (777, 7, 256, True, True, True),        # 7 of 16 heads per row
    (701, 32, 300, True, False, True),      # 2 rows per tile, last group partial
    (600, 20, 200, False, True, True),      # 20 of 32 heads
])
def test_gpu_packed_forward_matches_float64_reference(T, H, K, sink, topk, shared):
    """The row-packed 64-head forward (out and lse) against float64, and against the unpacked
    CUDA forward on the same inputs (the 16-head kernel at <= 16 heads, else the ping-pong one)."""
    need_library()
    seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
    q, kv, idx, tk, sk = cuda_fwd_case(T, H, K, sink, topk, empty_rows=True, seed=seed)
    if shared:
        idx[1::2, : K // 2] = idx[0:T - 1:2, : K // 2]
        idx[T // 2, :3] = T // 3
    scale = 576 ** -0.5
    with poisoned_empty():
        out, lse = ci.sparse_mla_fwd_cuda(q, kv, idx, scale, tk, sk, packed=True)
    ro, rl = sparse_mla_reference(q.double(), kv.double(), idx, scale, 512, tk,
                                  sk.double() if sink else None)
    assert not torch.isnan(out).any()
    floor = rel(ro.to(torch.bfloat16).double(), ro)
    err = rel(out.double(), ro)
    assert err < max(5 * floor, 1e-2), (seed, err, floor)
    fin = torch.isfinite(rl)
    assert torch.equal(torch.isfinite(lse), fin), seed
    assert (lse[fin].double() - rl[fin]).abs().max() < 1e-3, seed
    uo, ul = ci.sparse_mla_fwd_cuda(q, kv, idx, scale, tk, sk)
    assert rel(out.double(), uo.double()) < 2 * max(floor, 1e-3), seed
    print(f"T={T} H={H} K={K} seed={seed}: out {err:.2e} (floor {floor:.2e})")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("H", [64, 16])
def test_gpu_odd_k_and_strided_q(H):
    need_library()
    T, K = 600, 200  # K not a multiple of the 64-key block
    q_big = torch.randn(T, H + 8, 576, device="cuda").bfloat16()
    q = q_big[:, 4:H + 4]  # strided heads
    kv = torch.randn(T, 576, device="cuda").bfloat16()
    idx = causal_indices(T, K, "cuda").long()  # int64 accepted by the public function
    idx[5, 0] = 2**32 + 1  # out of range: an empty slot, never key 1
    with poisoned_empty():
        out, lse = sparse_mla(q, kv, idx, 0.05, backend="cuda")
    ro, rl = sparse_mla_reference(q.double(), kv.double(), idx, 0.05, 512)
    assert rel(out.double(), ro) < 1e-2
    fin = torch.isfinite(rl)
    assert (lse[fin].double() - rl[fin]).abs().max().item() < 1e-2


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("H,packed", [(128, False), (100, False), (64, False), (16, False), (7, False),
                                      pytest.param(32, True, marks=pytest.mark.row_packing)],
                         ids=["128", "100", "64", "16", "7", "32-packed"])
def test_gpu_forward_is_bitwise_deterministic(H, packed):
    """Eight launches on the same inputs give the same bits. The forward has no atomics and a
    fixed reduction order, so any difference is a race between its warpgroups; tolerance tests
    against float64 can miss one that corrupts a row now and then (a ping-pong forward that
    passed them differed in about one row in 512 per launch)."""
    need_library()
    for sink, topk in ((True, True), (False, False)):
        q, kv, idx, tk, sk = cuda_fwd_case(1024, H, 512, sink, topk, False, seed=2)
        out0, lse0 = ci.sparse_mla_fwd_cuda(q, kv, idx, 0.05, tk, sk, packed=packed)
        for _ in range(7):
            out, lse = ci.sparse_mla_fwd_cuda(q, kv, idx, 0.05, tk, sk, packed=packed)
            torch.cuda.synchronize()
            bad = (out != out0).flatten(1).any(1) | (lse != lse0).any(1)
            assert not bad.any(), f"rows differing between launches: {bad.nonzero().flatten()[:8].tolist()}"


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("H,packed", [(128, False), (16, False), pytest.param(32, True, marks=pytest.mark.row_packing)],
                         ids=["128", "16", "32-packed"])
def test_gpu_graph_capture_replay(H, packed):
    need_library()
    q, kv, idx, tk, sk = cuda_fwd_case(512, H, 256, True, True, False, seed=1)
    out, lse = ci.sparse_mla_fwd_cuda(q, kv, idx, 0.05, tk, sk, packed=packed)  # warm-up (build, attributes)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        g_out, g_lse = ci.sparse_mla_fwd_cuda(q, kv, idx, 0.05, tk, sk, packed=packed)
    q.copy_(torch.randn_like(q))
    graph.replay()
    torch.cuda.synchronize()
    ref_out, ref_lse = ci.sparse_mla_fwd_cuda(q, kv, idx, 0.05, tk, sk, packed=packed)
    assert torch.equal(g_out, ref_out) and torch.equal(g_lse, ref_lse)
