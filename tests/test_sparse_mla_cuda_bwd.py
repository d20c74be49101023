"""The sm_90a CUDA sparse MLA backward.

CPU: routing (the deterministic mode takes the kernel's persistent per-SM-lane mode), the effective row lengths'
reference, the dkv workspace's column permutation (against the mapping written out channel by
channel), and, where ``nvcc`` is installed, that the kernel compiles for sm_90a without spills
or serialized wgmma and fits shared memory.
GPU (Hopper only): dq, dkv, d_sink and the indexer-loss target against float64 autograd through
the plain-PyTorch reference, fresh random inputs each run, outputs poisoned with NaN; masked head
tiles, -1 holes inside rows, topk_length, empty rows; the row-packed variant (<= 32 heads) on the
same cases plus duplicate ids, rows sharing keys and a partial last group; the deterministic
mode (unpacked and packed) against the reference and bit-identical over repeated runs; CUDA-graph
capture/replay; the one-launch row-length kernel against the PyTorch expression it replaces.
"""

from __future__ import annotations

import pytest
import torch

from megatron_dsa.kernels import cuda_build
from megatron_dsa.kernels.sparse_mla import cuda_impl as ci
from megatron_dsa.kernels.sparse_mla import select_backend, sparse_mla
from megatron_dsa.kernels.sparse_mla.reference import slot_validity, sparse_mla_reference

from helpers import assert_compiles_without_spills, cuda_fwd_case, poisoned_empty, rel

HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


NO_NVCC = pytest.mark.skipif(cuda_build.find_nvcc() is None, reason="no nvcc")


def need_library():
    why = ci.library_error()
    if why is not None:
        pytest.skip(f"CUDA kernels unavailable: {why}")


def test_deterministic_takes_the_cuda_deterministic_backward(monkeypatch):
    # where the forward takes the CUDA kernel, the deterministic mode takes the CUDA kernel's
    # persistent per-SM-lane mode (packed at <= 32 heads, as the default)
    monkeypatch.setattr(ci, "unsupported_reason", lambda *a, **k: None)
    gpu = torch.device("cuda", 0)
    assert select_backend("auto", gpu, torch.bfloat16, 64, 576, 512).backward == "cuda"
    assert select_backend("auto", gpu, torch.bfloat16, 64, 576, 512, True).backward == "cuda-deterministic"
    assert select_backend("auto", gpu, torch.bfloat16, 16, 576, 512, True).backward == "cuda-packed-deterministic"
    assert select_backend("cuda", gpu, torch.bfloat16, 128, 576, 512, True).backward == "cuda-deterministic"
    assert select_backend("cuda", gpu, torch.bfloat16, 32, 576, 512, True,
                          row_packing=False).backward == "cuda-deterministic"
    assert select_backend("triton", gpu, torch.bfloat16, 64, 576, 512).backward == "triton"
    assert select_backend("triton", gpu, torch.bfloat16, 64, 576, 512, True).backward == "triton-deterministic"


def test_deterministic_lanes_follow_sms_and_the_workspace_share(monkeypatch):
    """One lane per SM while the lanes' fp32 [Tk, 576] workspaces fit the memory share, fewer
    beyond, at least one: a function of the device model and Tk only."""
    import types

    props = types.SimpleNamespace(multi_processor_count=132, total_memory=80 * 10**9)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)
    dev = torch.device("cuda", 0)
    per_lane = 576 * 4
    budget = int(ci.DET_WORKSPACE_SHARE * props.total_memory)
    assert ci.det_lanes(dev, 16384) == 132 and ci.det_lanes(dev, 1) == 132
    assert ci.det_lanes(dev, 131072) == budget // (131072 * per_lane) < 132
    assert ci.det_lanes(dev, 131072) * 131072 * per_lane <= budget
    assert ci.det_lanes(dev, 10**9) == 1


def test_row_packing_routes_the_cuda_backward_at_up_to_32_heads(monkeypatch):
    monkeypatch.setattr(ci, "unsupported_reason", lambda *a, **k: None)
    monkeypatch.setattr(ci, "l2_order", lambda *a, **k: False)   # (no device to ask for its L2)
    monkeypatch.setattr(ci, "l2_hints", lambda *a, **k: False)
    gpu = torch.device("cuda", 0)
    for heads in (1, 16, 17, 32):
        # auto (the default): the backward, measured faster; the forward too where the keys are
        # known and at most fwd_pack_max_keys (measured faster there: 16K keys at <= 16 heads, 32K at <= 32)
        most = ci.fwd_pack_max_keys(heads)
        assert most == (16384 if heads <= 16 else 32768)
        for c in (select_backend("auto", gpu, torch.bfloat16, heads, 576, 512),
                  select_backend("auto", gpu, torch.bfloat16, heads, 576, 512, row_packing=None),
                  select_backend("auto", gpu, torch.bfloat16, heads, 576, 512, num_keys=most + 1)):
            assert (c.forward, c.backward) == ("cuda", "cuda-packed") and "row packing (auto" in c.reason
        for keys in (1, 16384, most):
            c = select_backend("auto", gpu, torch.bfloat16, heads, 576, 512, num_keys=keys)
            assert (c.forward, c.backward) == ("cuda-packed", "cuda-packed") and "the forward and backward" in c.reason
        # on: the forward too, at any length
        for keys in (None, 1, 10 * most):
            c = select_backend("auto", gpu, torch.bfloat16, heads, 576, 512, row_packing=True, num_keys=keys)
            assert (c.forward, c.backward) == ("cuda-packed", "cuda-packed") and "row packing" in c.reason
        c = select_backend("auto", gpu, torch.bfloat16, heads, 576, 512, row_packing=False)
        assert (c.forward, c.backward) == ("cuda", "cuda")
    assert select_backend("auto", gpu, torch.bfloat16, 33, 576, 512).backward == "cuda"
    c = select_backend("auto", gpu, torch.bfloat16, 64, 576, 512, row_packing=True)
    assert c.backward == "cuda" and "no row packing on 64 heads" in c.reason
    c = select_backend("auto", gpu, torch.bfloat16, 16, 576, 512, True, row_packing=True)
    assert c.backward == "cuda-packed-deterministic" and "row packing" in c.reason
    c = select_backend("triton", gpu, torch.bfloat16, 16, 576, 512, True, row_packing=True)
    assert c.backward == "triton-deterministic" and "no row packing" in c.reason
    c = select_backend("triton", gpu, torch.bfloat16, 16, 576, 512, row_packing=True)
    assert (c.forward, c.backward) == ("triton", "triton-packed")
    assert select_backend("triton", gpu, torch.bfloat16, 16, 576, 512).backward == "triton"  # auto: CUDA only
    assert select_backend("triton", gpu, torch.bfloat16, 33, 576, 512, row_packing=True).backward == "triton"
    assert select_backend("cuda", gpu, torch.bfloat16, 16, 576, 512, row_packing=True).backward == "cuda-packed"
    cpu = torch.device("cpu")
    assert select_backend("auto", cpu, torch.float32, 16, 576, 512, row_packing=True).backward == "reference"


def test_row_packing_argument_errors():
    from megatron_dsa.config import DSAPluginConfig

    q, kv, idx = torch.randn(4, 2, 8), torch.randn(6, 8), torch.zeros(4, 3, dtype=torch.int32)
    with pytest.raises(TypeError, match="row_packing"):
        sparse_mla(q, kv, idx, 0.1, d_v=4, row_packing="yes")
    with pytest.raises(TypeError, match="attention_row_packing"):
        DSAPluginConfig(attention_row_packing=1)
    assert DSAPluginConfig().attention_row_packing is None  # auto
    out, _ = sparse_mla(q, kv, idx, 0.1, d_v=4, row_packing=True)  # the CPU reference: nothing to pack
    assert out.shape == (4, 2, 4)


def test_effective_lengths_match_a_loop():
    g = torch.Generator().manual_seed(0)
    T, K = 37, 48
    idx = torch.randint(0, 100, (T, K), generator=g, dtype=torch.int32)
    idx[torch.rand(T, K, generator=g) < 0.3] = -1        # holes
    idx[5] = -1                                           # empty row
    idx[7, 20:] = -1                                      # trailing padding
    topk = torch.randint(0, K + 3, (T,), generator=g, dtype=torch.int32)
    for tk in (None, topk):
        got = ci.effective_lengths_torch(idx, tk)
        assert got.dtype == torch.int32
        for t in range(T):
            valid = [s for s in range(K) if idx[t, s] >= 0]
            want = valid[-1] + 1 if valid else 0
            if tk is not None:
                want = min(want, max(0, min(int(tk[t]), K)))
            assert int(got[t]) == want, (t, int(got[t]), want)
    # a valid count per row, not one for all rows (the kernel would read past a short tensor)
    q, kv = torch.zeros(T, 1, 16), torch.zeros(100, 16)
    with pytest.raises(ValueError, match="topk_length"):
        sparse_mla(q, kv, idx, 0.1, d_v=8, topk_length=topk[:1])
    with pytest.raises(ValueError, match="indices"):
        sparse_mla(q, kv, idx[0], 0.1, d_v=8)


def _sort_case(T, K, Tk, seed, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(-5, Tk + 6, (T, K), generator=g, dtype=torch.int32)
    idx[3, 1:4] = idx[3, 0]                               # one id in four slots
    idx[6] = -1                                           # an empty row
    topk = torch.randint(0, K + 3, (T,), generator=g, dtype=torch.int32)
    return idx.to(device), topk.to(device)


def test_sort_row_ids_sorts_the_valid_ids_and_keeps_their_slots(monkeypatch):
    """The long-sequence backward's id order (cuda_impl.l2_order), its PyTorch reference: each
    row's valid ids ascending, then -1; ids outside [0, num_keys), -1 holes and slots past
    topk_length are not valid; a repeated id stays repeated (in slot order); perm names the
    input slot of each sorted one (the target goes back through it); lengths counts the valid
    ids. Rows in chunks (SORT_CHUNK_ROWS), the last partial."""
    monkeypatch.setattr(ci, "SORT_CHUNK_ROWS", 8)
    T, K, Tk = 21, 40, 90
    idx, topk = _sort_case(T, K, Tk, 1)
    for tk in (None, topk):
        got, perm, lengths = ci.sort_row_ids_torch(idx, tk, Tk, with_perm=True)
        assert got.dtype == perm.dtype == lengths.dtype == torch.int32 and got.shape == perm.shape == (T, K)
        for t in range(T):
            n_slots = K if tk is None else min(int(tk[t]), K)
            want = sorted((int(v), s) for s, v in enumerate(idx[t].tolist()) if s < n_slots and 0 <= v < Tk)
            n = len(want)
            assert got[t].tolist() == [v for v, _ in want] + [-1] * (K - n), t
            assert perm[t, :n].tolist() == [s for _, s in want], t    # equal ids in slot order
            assert sorted(perm[t].tolist()) == list(range(K)), t      # a permutation of the slots
            assert perm[t, n:].tolist() == sorted(perm[t, n:].tolist()), t
            assert int(lengths[t]) == n, t
        assert ci.sort_row_ids_torch(idx, tk, Tk)[1] is None


def test_l2_order_launches_shrink_with_the_keys():
    """Launch sizes of the L2 order: the base up to 32K keys, in proportion beyond, at least 256."""
    for packed, base in ((False, ci.L2_ORDER_CTAS), (True, ci.L2_ORDER_PACKED_CTAS)):
        assert ci.l2_order_launch_ctas(16384, packed) == ci.l2_order_launch_ctas(32768, packed) == base
        assert ci.l2_order_launch_ctas(65536, packed) == base // 2
        assert ci.l2_order_launch_ctas(131072, packed) == base // 4
        assert ci.l2_order_launch_ctas(1 << 22, packed) == 256


def _stored_column(c: int) -> int:
    """Where the kernel adds dkv channel c in its workspace (the layout described at the top of
    cuda/sparse_mla_bwd_sm90.cu), written out from the accumulator fragment it comes from."""
    if c < 512:  # tile pair pp, tile a of the pair, warp w, fragment row half i, lane // 4 = r
        pp, a, w, i, r = c // 128, (c // 64) % 2, (c // 16) % 4, (c // 8) % 2, c % 8
        return 128 * pp + 32 * w + 4 * r + 2 * a + i  # lanes r = 0..7 of a key: one 128-byte line
    w, i, r = (c - 512) // 16, ((c - 512) // 8) % 2, c % 8
    return 512 + 16 * w + 2 * r + i


def test_unpermute_dkv_inverts_the_kernels_layout():
    cols = [_stored_column(c) for c in range(576)]
    assert sorted(cols) == list(range(576))  # a permutation
    for pp in range(4):
        for w in range(4):  # one warp's values of a key: one 128-byte-aligned line, 16 B per lane
            line = []
            for r in range(8):
                lane = sorted(cols[128 * pp + 64 * a + 16 * w + 8 * i + r] for a in (0, 1) for i in (0, 1))
                assert lane == list(range(lane[0], lane[0] + 4)) and lane[0] % 4 == 0
                line += lane
            assert sorted(line) == list(range(128 * pp + 32 * w, 128 * pp + 32 * w + 32))
    want = torch.randn(3, 576, dtype=torch.float64).float()
    ws = torch.empty_like(want)
    ws[:, cols] = want  # the kernel adds channel c at column cols[c]
    for dt in (torch.float32, torch.bfloat16):
        got = ci.unpermute_dkv(ws, dt)
        assert got.dtype == dt and got.is_contiguous()
        assert torch.equal(got, want.to(dt))
    for bad in (ws[:, :512], ws.double(), ws.t()):
        with pytest.raises(ValueError, match="576"):
            ci.unpermute_dkv(bad)


def _stored_column64(c):
    """Where the 64-key kernel adds dkv channel c ("dkv64 workspace"): within each 32-channel
    line, channel 16 s + 8 jl + 2 c2 + bb at 16 s + 4 c2 + 2 jl + bb."""
    line, x = divmod(c, 32)
    s, jl, c2, bb = x // 16, (x // 8) % 2, (x // 2) % 4, x % 2
    return 32 * line + 16 * s + 4 * c2 + 2 * jl + bb


def test_unpermute_dkv64_inverts_the_kernels_layout():
    cols = [_stored_column64(c) for c in range(576)]
    assert sorted(cols) == list(range(576))  # a permutation
    for line in range(18):  # a warp instruction's line: 8 lanes (quads of keys q, q ^ 1), 16 B each
        got = []
        for s in (0, 1):
            for c2 in range(4):  # lane l = 4 q + c2 of side s: channels 8 j + 2 c2 + {0, 1}, j in {2 s, 2 s + 1}
                lane = sorted(cols[32 * line + 8 * j + 2 * c2 + bb] for j in (2 * s, 2 * s + 1) for bb in (0, 1))
                assert lane == list(range(lane[0], lane[0] + 4)) and lane[0] % 4 == 0
                got += lane
        assert sorted(got) == list(range(32 * line, 32 * line + 32))
    want = torch.randn(3, 576, dtype=torch.float64).float()
    ws = torch.empty_like(want)
    ws[:, cols] = want
    for dt in (torch.float32, torch.bfloat16):
        got = ci.unpermute_dkv64(ws, dt)
        assert got.dtype == dt and got.is_contiguous()
        assert torch.equal(got, want.to(dt))
    for bad in (ws[:, :512], ws.double(), ws.t()):
        with pytest.raises(ValueError, match="576"):
            ci.unpermute_dkv64(bad)


def test_block_keys_in_both_modes_and_refusals():
    assert ci.bwd_block_keys(False) == 64
    assert ci.bwd_block_keys(True) == 64
    assert ci.det_block_keys(None) == 64 and ci.det_block_keys(ci.DET_MAX_KEYS) == 64
    assert ci.det_block_keys(ci.DET_MAX_KEYS + 1) == 32  # the lanes: ids beyond the integer adds' reach
    q = torch.zeros(4, 64, 576, dtype=torch.bfloat16)
    kv = torch.zeros(8, 576, dtype=torch.bfloat16)
    idx = torch.zeros(4, 16, dtype=torch.int32)
    args = (q, kv, idx, 576 ** -0.5, None, None, None, None, None)
    with pytest.raises(ValueError, match="block_keys must be 32 or 64"):
        ci.sparse_mla_bwd_cuda(*args, block_keys=128)
    big = torch.zeros(ci.DET_MAX_KEYS + 1, 576, dtype=torch.bfloat16, device="meta")
    with pytest.raises(ValueError, match="block_keys=64 takes at most 8388608 keys"):
        ci.sparse_mla_bwd_cuda(q, big, idx, 576 ** -0.5, None, None, None, None, None, deterministic=True,
                               block_keys=64)


@NO_NVCC
def test_bwd_kernel_compiles_for_sm90a_without_spills(tmp_path):
    # (every entry point of the file: the 32-key kernel's four modes, the 64-key kernel's six)
    assert_compiles_without_spills(ci.SOURCES[1], tmp_path, ("sparse_mla_bwd_sm90_kernel", "sparse_mla_bwd64_sm90_kernel"))


# (the backward kernels' shared memory: test_sparse_mla_cuda.py's library build test)


gpu = pytest.mark.skipif(not HOPPER, reason="needs an sm_90 GPU")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("K,stride_pad,cap_dtype", [(2048, 0, None), (48, 0, torch.int32), (50, 0, torch.int64),
                                                     (64, 3, torch.int32), (1, 0, None)])
def test_gpu_row_length_kernel_matches_torch(K, stride_pad, cap_dtype):
    """The one-launch kernel (cuda/row_lengths.cu) against the PyTorch expression: 16-byte and
    scalar row reads (K % 4, a padded row stride), holes, empty and full rows, trailing padding,
    caps below 0 and above K, a row count that is not a multiple of the warps per CTA."""
    seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
    g = torch.Generator(device="cuda").manual_seed(seed)
    T = 1003
    wide = torch.randint(0, 5000, (T, K + stride_pad), device="cuda", generator=g, dtype=torch.int32)
    idx = wide[:, :K]
    idx[torch.rand(T, K, device="cuda", generator=g) < 0.3] = -1
    idx[5] = -1
    idx[7, K // 2:] = -1
    idx[9, :] = 3
    cap = None
    if cap_dtype is not None:
        cap = torch.randint(-3, K + 4, (T,), device="cuda", generator=g).to(cap_dtype)
    need_library()
    want = ci.effective_lengths_torch(idx, cap)
    with poisoned_empty():  # an unwritten row reads -2^30
        got = ci.effective_lengths(idx, cap)
    assert got.dtype == torch.int32 and got.shape == (T,)
    assert torch.equal(got, want), (seed, (got != want).nonzero()[:5].tolist())


def _case(T, H, K, sink, topk, holes, seed, shared=False):
    """The forward tests' inputs (with empty rows), plus -1 holes inside rows and dout.
    ``shared``: odd rows copy half their keys from the row before and a few rows hold an id in
    several slots (what row packing has to merge and keep apart)."""
    q, kv, idx, tk, sk = cuda_fwd_case(T, H, K, sink, topk, empty_rows=True, seed=seed)
    g = torch.Generator(device="cuda").manual_seed(seed + 1)
    if shared:
        idx[1::2, : K // 2] = torch.minimum(idx[0:T - 1:2, : K // 2], torch.arange(1, T, 2, device="cuda")[:, None])
        idx[T // 2, :3] = T // 3                              # one id in three slots
    if holes:
        idx = torch.where(torch.rand(idx.shape, device="cuda", generator=g) < 0.2, -1, idx)
    dout = torch.randn(T, H, 512, device="cuda", generator=g).bfloat16()
    return q, kv, idx, tk, sk, dout


def _check_against_reference(T, H, K, sink, topk, holes, target, packed=False, shared=False,
                             deterministic=False, repeats=0, block_keys=None):
    """``repeats``: run the backward that many more times; each must give the same bits.
    ``block_keys``: as ``sparse_mla_bwd_cuda``'s (None: auto, the 64-key kernel in the default
    mode)."""
    seed = int(torch.randint(0, 2**31 - 1, (1,)).item())  # fresh inputs every run
    q, kv, idx, tk, sk, dout = _case(T, H, K, sink, topk, holes, seed, shared)
    scale = 576 ** -0.5
    out, lse = ci.sparse_mla_fwd_cuda(q, kv, idx, scale, tk, sk)

    def run():
        tgt = torch.zeros(idx.shape, dtype=torch.float32, device="cuda") if target else None
        with poisoned_empty():
            dq, dkv, dsink = ci.sparse_mla_bwd_cuda(q, kv, idx, scale, tk, sk, out, lse, dout, target_out=tgt,
                                                    packed=packed, deterministic=deterministic,
                                                    block_keys=block_keys)
        return dq, dkv, dsink, tgt

    dq, dkv, dsink, tgt = run()
    for _ in range(repeats):
        again = run()
        for name, a, b in zip(("dq", "dkv", "dsink", "target"), (dq, dkv, dsink, tgt), again):
            assert (a is None) == (b is None) and (a is None or torch.equal(a, b)), (name, seed)
    qr = q.double().requires_grad_()
    kvr = kv.double().requires_grad_()
    skr = sk.double().requires_grad_() if sink else None
    ro, _ = sparse_mla_reference(qr, kvr, idx, scale, 512, tk, skr)
    ro.backward(dout.double())
    assert not torch.isnan(dq).any() and not torch.isnan(dkv).any()
    errs = {}
    for name, got, want in (("dq", dq, qr.grad), ("dkv", dkv, kvr.grad)):
        err = rel(got.double(), want)
        floor = rel(want.to(torch.bfloat16).double(), want)  # what bf16 rounding alone costs
        errs[name] = err
        assert err < max(5 * floor, 1e-2), (name, seed, err, floor)
    if sink:
        errs["dsink"] = rel(dsink.double(), skr.grad)
        assert errs["dsink"] < 1e-2, (seed, errs)
    if target:
        valid = slot_validity(idx, T, tk)
        kg = kv.double()[idx.clamp_min(0).long()]
        s = torch.einsum("thd,tkd->thk", q.double(), kg) * scale
        p = torch.exp(s - lse.double()[:, :, None]).masked_fill(~valid[:, None, :], 0.0)
        p = torch.where(torch.isfinite(lse.double())[:, :, None], p, 0.0)
        errs["target"] = rel(tgt.double(), p.sum(1))
        assert errs["target"] < 1e-3, (seed, errs)
    print(f"T={T} H={H} K={K} packed={packed} seed={seed}: " + ", ".join(f"{k} {v:.2e}" for k, v in errs.items()))


@pytest.mark.gpu
@gpu
def test_gpu_l2_hints_where_kv_and_the_workspace_leave_the_l2():
    """On between ``Tk x 3456 B`` (kv and the fp32 workspace) and ``Tk x 2304 B`` (the workspace
    alone, where the L2 order takes over) exceeding the L2; the reason says which kernel and hints."""
    need_library()
    dev = torch.device("cuda")
    l2 = torch.cuda.get_device_properties(dev).L2_cache_size
    lo, hi = l2 // 3456, l2 // 2304
    assert not ci.l2_hints(dev, lo) and ci.l2_hints(dev, lo + 1) and ci.l2_hints(dev, hi) and not ci.l2_hints(dev, hi + 1)

    def reason(heads, num_keys, **kw):
        return select_backend("auto", dev, torch.bfloat16, heads, 576, 512, num_keys=num_keys, **kw).reason

    assert "64-key blocks" in reason(64, lo) and "L2 cache hints" not in reason(64, lo)
    assert "64-key blocks with L2 cache hints" in reason(128, lo + 1)
    assert "64-key blocks with L2 cache hints" in reason(16, lo + 1)  # row-packed: the 64-key kernel too
    assert "64-key" in reason(16, lo + 1, row_packing=False)
    assert "64-key blocks" in reason(64, lo, deterministic=True)  # the integer adds
    assert "64-key" not in reason(64, ci.DET_MAX_KEYS + 1, deterministic=True)  # the lanes


@pytest.mark.gpu
@pytest.mark.row_packing
@gpu
@pytest.mark.parametrize("T,H,K,sink,topk,holes,target,shared", [
    (1024, 16, 512, True, True, True, True, False),    # 4 rows per tile
    (1023, 16, 300, False, False, False, True, True),  # last group partial; shared keys, duplicates
    (777, 7, 256, True, True, True, True, True),       # 7 of 16 heads per row
    (701, 32, 300, True, False, True, True, True),     # 2 rows per tile, last group partial
    (600, 20, 200, False, True, False, False, True),   # 20 of 32 heads
    (600, 1, 200, False, False, False, True, False),   # one head
])
@pytest.mark.parametrize("block_keys", [32, 64])
def test_gpu_packed_bwd_matches_float64_reference(T, H, K, sink, topk, holes, target, shared, block_keys):
    """Both kernels on packed rows (``block_keys``: 32, the 32-key kernel; 64, the 64-key one)."""
    need_library()
    _check_against_reference(T, H, K, sink, topk, holes, target, packed=True, shared=shared, block_keys=block_keys)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("T,H,K,sink,topk,holes,target,packed", [
    (2048, 128, 2048, False, False, False, False, False),
    (1536, 100, 1024, True, True, True, True, False),   # two head tiles: a slot's two target adds
    (777, 48, 300, False, True, True, True, False),
    (1024, 16, 512, True, True, True, True, True),       # packed, 4 rows per tile
    (701, 32, 300, True, False, True, True, True),       # packed, 2 rows per tile, last group partial
])
@pytest.mark.parametrize("block_keys", [32, 64])
def test_gpu_deterministic_bwd_matches_reference_and_repeats_bit_identical(T, H, K, sink, topk, holes, target,
                                                                           packed, block_keys):
    """The deterministic mode (``block_keys``: 64, the bound pass and integer adds; 32, the 32-key
    kernel's fp32 lanes): the reference's gradients, and dq, dkv, d_sink and the target the same
    bits over three more runs (rows with distinct ids: what the indexer's top-k gives)."""
    need_library()
    _check_against_reference(T, H, K, sink, topk, holes, target, packed=packed, deterministic=True, repeats=3,
                             block_keys=block_keys)


@pytest.mark.gpu
@pytest.mark.row_packing
@gpu
@pytest.mark.parametrize("H,det", [(16, False), (32, False), (16, True), (32, True)])
def test_gpu_packed_bwd_in_row_chunks_equals_one_launch(H, det, monkeypatch):
    """The row-packed backward packed and run in row chunks (a small PACK_CHUNK_BYTES) gives the
    one-launch result: dq and d_sink the same bits (the groups, hence each CTA's work, are the
    same), dkv within one bf16 step and the target within fp32 add-order noise; the deterministic
    mode repeats its bits."""
    need_library()
    T, K = 1023, 300  # 16 heads: 256 groups of 4 rows (the last partial); 32 heads: 512 of 2
    q, kv, idx, tk, sk, dout = _case(T, H, K, True, True, True, seed=11)
    scale = 576 ** -0.5
    out, lse = ci.sparse_mla_fwd_cuda(q, kv, idx, scale, tk, sk)

    def run():
        tgt = torch.zeros(idx.shape, dtype=torch.float32, device="cuda")
        with poisoned_empty():
            res = ci.sparse_mla_bwd_cuda(q, kv, idx, scale, tk, sk, out, lse, dout, target_out=tgt, packed=True,
                                         deterministic=det)
        return (*res, tgt)

    one = run()
    R = 64 // (16 if H <= 16 else 32)
    monkeypatch.setattr(ci, "PACK_CHUNK_BYTES", 100 * R * K * (4 + 2 * R) + 7)  # 100 groups a launch
    rows = ci.packed_chunk_rows(T, K, H)
    assert rows == 100 * R and T > 2 * rows, rows  # three launches, the last partial
    chunked = run()
    assert torch.equal(chunked[0], one[0]) and torch.equal(chunked[2], one[2])  # dq, d_sink
    # dkv: bf16 roundings of fp32 sums added in another order, so at most one bf16 step apart
    a, b = chunked[1].double(), one[1].double()
    assert ((a - b).abs() <= 2.0 ** -7 * a.abs().maximum(b.abs()) + 1e-5 * b.abs().max()).all()
    assert rel(a, b) < 1e-3
    assert rel(chunked[3].double(), one[3].double()) < 1e-6  # target
    if det:
        again = run()
        assert all(torch.equal(a, b) for a, b in zip(chunked, again))


@pytest.mark.gpu
@pytest.mark.row_packing
@gpu
@pytest.mark.parametrize("H", [16, 32])
def test_gpu_packed_fwd_in_row_chunks_equals_one_launch(H, monkeypatch):
    """The row-packed forward packed and run in row chunks (a small PACK_CHUNK_BYTES, as the
    packed backward) gives the one-launch output and lse bit for bit (the groups, hence each
    CTA's work, are the same)."""
    need_library()
    T, K = 1023, 300
    q, kv, idx, tk, sk, _ = _case(T, H, K, True, True, True, seed=12)
    scale = 576 ** -0.5
    with poisoned_empty():
        one = ci.sparse_mla_fwd_cuda(q, kv, idx, scale, tk, sk, packed=True)
    R = 64 // (16 if H <= 16 else 32)
    monkeypatch.setattr(ci, "PACK_CHUNK_BYTES", 100 * R * K * (4 + 2 * R) + 7)  # 100 groups a launch
    assert ci.packed_chunk_rows(T, K, H) == 100 * R
    with poisoned_empty():
        chunked = ci.sparse_mla_fwd_cuda(q, kv, idx, scale, tk, sk, packed=True)
    assert torch.equal(chunked[0], one[0]) and torch.equal(chunked[1], one[1])
    unpacked = ci.sparse_mla_fwd_cuda(q, kv, idx, scale, tk, sk)
    assert rel(one[0].double(), unpacked[0].double()) < 5e-3
    fin = torch.isfinite(unpacked[1])
    assert torch.equal(fin, torch.isfinite(one[1])) and (one[1][fin] - unpacked[1][fin]).abs().max() < 1e-4


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("T,H,K,sink,topk,holes,target,packed", [
    (1536, 64, 1024, True, True, True, True, False),    # 4 launches of 500 rows (the last 36)
    (1024, 100, 512, False, False, True, True, False),  # 2 head tiles: 250 rows a launch
    (777, 48, 300, True, True, True, False, False),
    pytest.param(1023, 16, 300, True, True, True, True, True, marks=pytest.mark.row_packing),  # 100 groups a launch
])
def test_gpu_bwd_in_l2_order_matches_float64_reference(T, H, K, sink, topk, holes, target, packed, monkeypatch):
    """The long-sequence order (cuda_impl.l2_order) forced at small shapes: ids sorted per row
    (the target moved back to the input's slots), rows in launches of a few hundred CTAs, the
    sort in chunks; against float64 as the default order is."""
    need_library()
    monkeypatch.setattr(ci, "l2_order", lambda device, num_keys, key_bytes=0: True)
    monkeypatch.setattr(ci, "L2_ORDER_CTAS", 500)
    monkeypatch.setattr(ci, "L2_ORDER_PACKED_CTAS", 100)
    monkeypatch.setattr(ci, "SORT_CHUNK_ROWS", 700)
    _check_against_reference(T, H, K, sink, topk, holes, target, packed=packed)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("T,K,Tk", [(21, 40, 90), (300, 2048, 32768), (64, 4096, 5000), (50, 600, 3), (9, 4100, 70000)])
def test_gpu_row_sort_kernel_matches_torch(T, K, Tk):
    """cuda/sort_rows.cu against its reference, bit for bit (ids, perm, lengths): rows of 40
    (128 threads), 2048 (256) and 4096 (512) slots, ids past Tk, holes, repeats, topk_length; a
    row longer than the kernel's 4096 takes the reference."""
    need_library()
    idx, topk = _sort_case(T, K, Tk, T, "cuda")
    for tk in (None, topk):
        for with_perm in (True, False):
            got = ci.sort_row_ids(idx, tk, Tk, with_perm)
            want = ci.sort_row_ids_torch(idx, tk, Tk, with_perm)
            for a, b in zip(got, want):
                assert (a is None) == (b is None) and (a is None or torch.equal(a, b))


@pytest.mark.gpu
@gpu
def test_gpu_l2_order_starts_where_the_dkv_workspace_leaves_the_l2():
    need_library()
    dev = torch.device("cuda")
    l2 = torch.cuda.get_device_properties(dev).L2_cache_size
    n = l2 // (576 * 4)
    assert not ci.l2_order(dev, n) and ci.l2_order(dev, n + 1)
    def reason(num_keys):
        return select_backend("auto", dev, torch.bfloat16, 64, 576, 512, num_keys=num_keys).reason

    assert "L2 order" in reason(n + 1) and "L2 order" not in reason(n)


@pytest.mark.gpu
@gpu
def test_gpu_autograd_takes_the_cuda_backward(monkeypatch):
    need_library()
    from megatron_dsa.kernels.sparse_mla import ops

    calls = []
    real = ops.sparse_mla_bwd_cuda

    def spy(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(ops, "sparse_mla_bwd_cuda", spy)
    q, kv, idx, tk, sk, dout = _case(512, 128, 256, True, True, False, seed=3)
    qg, kvg, skg = q.clone().requires_grad_(), kv.clone().requires_grad_(), sk.clone().requires_grad_()
    out, _ = sparse_mla(qg, kvg, idx, 0.05, 512, tk, skg, deterministic=False)
    out.backward(dout)
    assert calls == [1]
    qr, kvr, skr = q.double().requires_grad_(), kv.double().requires_grad_(), sk.double().requires_grad_()
    ro, _ = sparse_mla_reference(qr, kvr, idx, 0.05, 512, tk, skr)
    ro.backward(dout.double())
    assert rel(qg.grad.double(), qr.grad) < 1e-2
    assert rel(kvg.grad.double(), kvr.grad) < 1e-2
    assert rel(skg.grad.double(), skr.grad) < 1e-2


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("H,packed,det", [(128, False, False), pytest.param(16, True, False, marks=pytest.mark.row_packing),
                                         (128, False, True), (16, True, True)],
                         ids=["128", "16-packed", "128-deterministic", "16-packed-deterministic"])
def test_gpu_bwd_graph_capture_replay(H, packed, det):
    need_library()
    q, kv, idx, tk, sk, dout = _case(512, H, 256, True, True, True, seed=1)
    out, lse = ci.sparse_mla_fwd_cuda(q, kv, idx, 0.05, tk, sk)
    args = (q, kv, idx, 0.05, tk, sk, out, lse, dout)
    ci.sparse_mla_bwd_cuda(*args, packed=packed, deterministic=det)  # warm-up (builds, compiles, attributes)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        g_dq, g_dkv, g_dsink = ci.sparse_mla_bwd_cuda(*args, packed=packed, deterministic=det)
    dout.copy_(torch.randn_like(dout))
    graph.replay()
    torch.cuda.synchronize()
    dq, dkv, dsink = ci.sparse_mla_bwd_cuda(*args, packed=packed, deterministic=det)
    assert torch.equal(g_dq, dq)  # dq has no atomics: bit-identical
    if det:
        assert torch.equal(g_dkv, dkv) and torch.equal(g_dsink, dsink)
    else:
        assert rel(g_dkv.double(), dkv.double()) < 1e-3  # fp32 atomics: order differs
        assert rel(g_dsink.double(), dsink.double()) < 1e-5


def test_wheel_ships_every_kernel_source():
    """Every file the library build reads (sources and headers) matches the package data, so an
    installed wheel can build it."""
    import fnmatch
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    data = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    globs = data["megatron_dsa.kernels.sparse_mla"]
    pkg = Path(ci.__file__).parent
    for f in (*ci.SOURCES, *ci.HEADERS):
        rel_path = f.relative_to(pkg).as_posix()
        assert any(fnmatch.fnmatch(rel_path, g) for g in globs), (rel_path, globs)
