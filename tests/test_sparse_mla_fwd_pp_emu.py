"""The ping-pong sparse MLA forward (``kernels/sparse_mla/cuda/sparse_mla_fwd_pp_sm90.cu``) on the CPU.

The kernel's own source and its ``sm90_common.cuh`` are compiled by the host compiler against
``cuda_emu/sm90_emu.h``: ``cuda_emu/ptx_source.py`` turns each inline-PTX statement into a call of
the emulator's PTX interpreter (with the statement's own PTX text) and the launch into
``emu::launch``; the library's entry point ``dsa_sparse_mla_fwd_pp_sm90`` is called through ctypes.
384 OS threads per CTA, real blocking mbarriers and named barriers; cp.async copies land as late
as the PTX ISA allows and a read of one that has not landed, or whose landing is not ordered
before the read, is a reported hazard (see sm90_emu.h).

Checked: out / lse against the float64 reference (``reference.py``), no hazard, bit-identical
results under random warpgroup slowdowns, and that the emulator catches the race this kernel
had: with ``cp_async_wait_all`` emitting ``cp.async.wait_group 0`` (no commit_group before it:
the Q copies are in no group, so nothing is waited for) the Q reads are reported.

Tolerances (bf16 inputs, P rounded to bf16 as on the GPU, fp32 accumulation, bf16 output):
max |out - ref| <= 1e-2 * max |ref| and mean |out - ref| <= 4e-3 * mean |ref| (the H100 gets
~2e-3 relative); |lse - ref| <= 1e-4.
"""

import ctypes
import os
import sys

import pytest
import torch

from megatron_dsa.kernels.sparse_mla.cuda_impl import effective_lengths_torch
from megatron_dsa.kernels.sparse_mla.reference import sparse_mla_reference

HERE = os.path.dirname(os.path.abspath(__file__))
EMU_DIR = os.path.join(HERE, "cuda_emu")
KERNEL, COMMON = "sparse_mla_fwd_pp_sm90.cu", "sm90_common.cuh"
LOG2E = 1.4426950408889634
D_QK, D_V = 576, 512

sys.path.insert(0, EMU_DIR)
from emu_lib import assert_rewrite_complete, build_emulated, messages, read_kernel  # noqa: E402

sys.path.pop(0)


def _build(tmp_path_factory, tag, common_text=None):
    """The emulated library of the kernel (common_text: a modified copy in place of the shipped text)."""
    lib = build_emulated(tmp_path_factory, tag, "fwd_pp_emu.cpp", KERNEL, common_text=common_text)
    vp, ll, i32, f32 = ctypes.c_void_p, ctypes.c_longlong, ctypes.c_int, ctypes.c_float
    lib.dsa_sparse_mla_fwd_pp_sm90.restype = i32
    lib.dsa_sparse_mla_fwd_pp_sm90.argtypes = [vp] * 7 + [ll] * 6 + [i32] * 4 + [f32, vp]
    return lib


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    return _build(tmp_path_factory, "shipped")


def _problem(T, H, K, Tk=300, sink=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(T, H, D_QK, generator=g).bfloat16()
    kv = torch.randn(Tk, D_QK, generator=g).bfloat16()
    idx = torch.randint(0, Tk, (T, K), generator=g, dtype=torch.int32)
    idx[0, K - 7:] = -1                       # causal-style -1 padding at the end of a row
    idx[0, 3] = -1                            # an empty slot inside a block
    if K > 20:
        idx[0, 11] = Tk + 5                   # an id past the keys: masked
    topk_len = torch.full((T,), K, dtype=torch.int32)
    if T > 1:
        topk_len[1] = K - 37                  # a partial last block
    sink_t = torch.randn(H, generator=g) if sink else None
    return q, kv, idx, topk_len, sink_t


def _run(lib, prob, seed=0):
    q, kv, idx, topk_len, sink = prob
    T, H, _ = q.shape
    kv_len = effective_lengths_torch(idx, topk_len)  # what the library's launcher passes
    out = torch.full((T, H, D_V), float("nan"), dtype=torch.bfloat16)
    lse = torch.full((T, H), float("nan"))
    scale = D_QK ** -0.5
    lib.emu_reset(seed, 60.0)
    rc = lib.dsa_sparse_mla_fwd_pp_sm90(
        q.data_ptr(), kv.data_ptr(), idx.data_ptr(), kv_len.data_ptr(),
        sink.data_ptr() if sink is not None else None, out.data_ptr(), lse.data_ptr(),
        q.stride(0), q.stride(1), kv.stride(0), idx.stride(0), out.stride(0), out.stride(1),
        T, H, kv.shape[0], idx.shape[1], scale * LOG2E, None)
    return rc, out, lse, lib.emu_hazards(), bool(lib.emu_aborted()), messages(lib)


def _check_against_reference(prob, out, lse):
    q, kv, idx, topk_len, sink = prob
    ref_out, ref_lse = sparse_mla_reference(q.double(), kv.double(), idx, D_QK ** -0.5, topk_length=topk_len,
                                            sink=sink.double() if sink is not None else None)
    assert not out.isnan().any() and not lse.isnan().any()
    err = (out.double() - ref_out).abs()
    assert err.max() <= 1e-2 * ref_out.abs().max(), err.max()
    assert err.mean() <= 4e-3 * ref_out.abs().mean(), err.mean()
    finite = torch.isfinite(ref_lse)
    assert torch.equal(finite, torch.isfinite(lse))
    assert (lse.double()[finite] - ref_lse[finite]).abs().max() <= 1e-4


CASES = {
    # T, H, K: blocks of 64 keys per row (odd counts leave B a block with no valid key)
    "h64_k200": dict(T=3, H=64, K=200),             # 4 / 3 / 4 blocks, partial last ones
    "h100_k130_sink": dict(T=3, H=100, K=130, sink=True),  # 2 head tiles, the last masked; 3 blocks
    "h17_k64": dict(T=2, H=17, K=64),                # one block: B's buffer all masked
}


@pytest.mark.parametrize("case", list(CASES))
def test_emulated_fwd_pp_matches_reference_without_hazards(lib, case):
    prob = _problem(**CASES[case])
    rc, out, lse, hazards, aborted, msgs = _run(lib, prob)
    assert rc == 0
    assert not aborted and hazards == 0, msgs
    _check_against_reference(prob, out, lse)


def test_emulated_fwd_pp_empty_row(lib):
    """A row with no valid slot: out = 0, lse = -inf (no block runs)."""
    prob = _problem(T=2, H=64, K=64)
    prob[2][1] = -1
    rc, out, lse, hazards, aborted, msgs = _run(lib, prob)
    assert rc == 0 and hazards == 0 and not aborted, msgs
    assert torch.equal(out[1].float(), torch.zeros(64, D_V)) and torch.isneginf(lse[1]).all()
    _check_against_reference(prob, out, lse)


def test_emulated_fwd_pp_bit_identical_under_random_slowdowns(lib):
    """Randomly slowed warpgroups (other interleavings of producer, A and B): same bits, no hazard."""
    prob = _problem(T=2, H=100, K=200, sink=True)
    results = []
    for seed in (0, 11, 12):
        rc, out, lse, hazards, aborted, msgs = _run(lib, prob, seed=seed)
        assert rc == 0 and hazards == 0 and not aborted, (seed, msgs)
        results.append((out, lse))
    for out, lse in results[1:]:
        assert torch.equal(out.view(torch.int16), results[0][0].view(torch.int16))
        assert torch.equal(lse, results[0][1])
    _check_against_reference(prob, *results[0])


# The emulator must see the races it exists to find: sm90_common.cuh with one PTX instruction
# changed (the shipped source is not touched: the mutant is built from a copy of its text).
MUTANTS = {
    # the race this kernel shipped with: wait_group counts committed groups only, and the Q load
    # commits none, so nothing is waited for and the math warpgroups read Q before it lands
    "wait_all_as_wait_group0": ('"cp.async.wait_all;', '"cp.async.wait_group 0;',
                                "wgmma reads shared memory whose cp.async has not landed"),
    # no proxy fence: the copies have landed and are ordered, but not for the async proxy
    "no_fence_proxy_async": ('"fence.proxy.async.shared::cta;', '"',
                             "without a fence.proxy.async"),
}


@pytest.mark.parametrize("mutant", list(MUTANTS))
def test_emulator_catches_mutated_sync(tmp_path_factory, mutant):
    old, new, expected = MUTANTS[mutant]
    text = read_kernel(COMMON)
    assert text.count(old) == 1, f"{old!r} is not in {COMMON} once: update this mutant"
    lib = _build(tmp_path_factory, mutant, text.replace(old, new))
    prob = _problem(T=2, H=64, K=130)
    rc, out, lse, hazards, aborted, msgs = _run(lib, prob)
    assert rc == 0
    assert hazards > 0 and any(expected in m for m in msgs), msgs
    if mutant == "wait_all_as_wait_group0":  # unlanded Q reads the poison: wrong numbers as well
        assert out.isnan().any()


def test_source_rewrite_covers_every_asm_statement():
    """ptx_source leaves no inline PTX and no <<<>>> launch in the sources it rewrites."""
    assert_rewrite_complete(KERNEL, COMMON)
