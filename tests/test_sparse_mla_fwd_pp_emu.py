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

import os
import sys

import pytest
import torch


HERE = os.path.dirname(os.path.abspath(__file__))
EMU_DIR = os.path.join(HERE, "cuda_emu")
KERNEL, COMMON = "sparse_mla_fwd_pp_sm90.cu", "sm90_common.cuh"

sys.path.insert(0, EMU_DIR)
from emu_fwd import D_QK, D_V, check_fwd_against_reference, declare_fwd, fwd_problem, run_fwd  # noqa: E402
from emu_lib import assert_rewrite_complete, build_emulated, messages, read_kernel  # noqa: E402

sys.path.pop(0)


def _build(tmp_path_factory, tag, common_text=None):
    """The emulated library of the kernel (common_text: a modified copy in place of the shipped text)."""
    lib = build_emulated(tmp_path_factory, tag, "fwd_pp_emu.cpp", KERNEL, common_text=common_text)
    return declare_fwd(lib, "dsa_sparse_mla_fwd_pp_sm90")


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    return _build(tmp_path_factory, "shipped")


def _run(lib, prob, seed=0):
    return run_fwd(lib, "dsa_sparse_mla_fwd_pp_sm90", prob, seed)


CASES = {
    # T, H, K: blocks of 64 keys per row (odd counts leave B a block with no valid key)
    "h64_k200": dict(T=3, H=64, K=200),             # 4 / 3 / 4 blocks, partial last ones
    "h100_k130_sink": dict(T=3, H=100, K=130, sink=True),  # 2 head tiles, the last masked; 3 blocks
    "h17_k64": dict(T=2, H=17, K=64),                # one block: B's buffer all masked
}


@pytest.mark.parametrize("case", list(CASES))
def test_emulated_fwd_pp_matches_reference_without_hazards(lib, case):
    prob = fwd_problem(**CASES[case])
    rc, out, lse, hazards, aborted, msgs = _run(lib, prob)
    assert rc == 0
    assert not aborted and hazards == 0, msgs
    check_fwd_against_reference(prob, out, lse)


def test_emulated_fwd_pp_empty_row(lib):
    """A row with no valid slot: out = 0, lse = -inf (no block runs)."""
    prob = fwd_problem(T=2, H=64, K=64)
    prob[2][1] = -1
    rc, out, lse, hazards, aborted, msgs = _run(lib, prob)
    assert rc == 0 and hazards == 0 and not aborted, msgs
    assert torch.equal(out[1].float(), torch.zeros(64, D_V)) and torch.isneginf(lse[1]).all()
    check_fwd_against_reference(prob, out, lse)


def test_emulated_fwd_pp_bit_identical_under_random_slowdowns(lib):
    """Randomly slowed warpgroups (other interleavings of producer, A and B): same bits, no hazard."""
    prob = fwd_problem(T=2, H=100, K=200, sink=True)
    results = []
    for seed in (0, 11, 12):
        rc, out, lse, hazards, aborted, msgs = _run(lib, prob, seed=seed)
        assert rc == 0 and hazards == 0 and not aborted, (seed, msgs)
        results.append((out, lse))
    for out, lse in results[1:]:
        assert torch.equal(out.view(torch.int16), results[0][0].view(torch.int16))
        assert torch.equal(lse, results[0][1])
    check_fwd_against_reference(prob, *results[0])


PACKED_CASES = {
    # T, H, K: groups of 64 / hpad rows over the union of their ids (rows of a group share keys)
    "h16_t7_k90_sink": dict(T=7, H=16, K=90, sink=True),  # 4 rows per group, the last group partial
    "h13_t5_k40": dict(T=5, H=13, K=40),                   # heads past H masked, 4 rows per group
    "h32_t3_k70": dict(T=3, H=32, K=70, Tk=120),           # 2 rows per group, the last one partial
}


def _run_packed(lib, prob, seed=0):
    """The ping-pong kernel's row-packed instantiation, as the launcher would call it: the packing
    of ``packing.pack_rows_reference`` (rows 2 j + 1 sharing half their ids with rows 2 j)."""
    import ctypes

    from megatron_dsa.kernels.sparse_mla.packing import pack_rows_reference

    q, kv, idx, topk_len, sink = prob
    T, H, _ = q.shape
    pk = pack_rows_reference(idx, kv.shape[0], H, topk_len)
    fn = lib.dsa_sparse_mla_fwd_pp_packed_sm90
    vp, ll, i32 = ctypes.c_void_p, ctypes.c_longlong, ctypes.c_int
    fn.restype = i32
    fn.argtypes = [vp] * 8 + [ll] * 6 + [i32] * 5 + [ctypes.c_float, vp]
    out = torch.full((T, H, D_V), float("nan"), dtype=torch.bfloat16)
    lse = torch.full((T, H), float("nan"))
    lib.emu_reset(seed, 60.0)
    rc = fn(q.data_ptr(), kv.data_ptr(), pk.uid.data_ptr(), pk.count.data_ptr(), pk.uslot.data_ptr(),
            sink.data_ptr() if sink is not None else None, out.data_ptr(), lse.data_ptr(), q.stride(0), q.stride(1),
            kv.stride(0), pk.uid.shape[1], out.stride(0), out.stride(1), T, H, kv.shape[0], pk.uid.shape[0],
            pk.hshift, D_QK ** -0.5 * 1.4426950408889634, None)
    return rc, out, lse, lib.emu_hazards(), bool(lib.emu_aborted()), messages(lib)


@pytest.mark.parametrize("case", list(PACKED_CASES))
def test_emulated_fwd_pp_packed_matches_reference_without_hazards(lib, case):
    """Row packing in the ping-pong kernel: tile rows are (query row, head) of a group, the keys
    the group's union, each row masked to the entries it selected (uslot); empty and padded
    slots, a partial last block, an id past the keys, a row without keys, a partial last group."""
    c = dict(PACKED_CASES[case])
    prob = fwd_problem(c["T"], c["H"], c["K"], Tk=c.get("Tk", 300), sink=c.get("sink", False), empty_rows=(4,)
                       if c["T"] > 4 else ())
    idx = prob[2]
    idx[1::2, : c["K"] // 2] = idx[0:c["T"] - 1:2, : c["K"] // 2]   # neighbouring rows share keys
    rc, out, lse, hazards, aborted, msgs = _run_packed(lib, prob)
    assert rc == 0
    assert not aborted and hazards == 0, msgs
    check_fwd_against_reference(prob, out, lse)


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
    prob = fwd_problem(T=2, H=64, K=130)
    rc, out, lse, hazards, aborted, msgs = _run(lib, prob)
    assert rc == 0
    assert hazards > 0 and any(expected in m for m in msgs), msgs
    if mutant == "wait_all_as_wait_group0":  # unlanded Q reads the poison: wrong numbers as well
        assert out.isnan().any()


# The kernel's own P stores by stmatrix, mutated: A's P tile without the proxy fence that orders
# it before B's wgmma reads it (A's next fence comes only after its hand-off arrive); and B's
# blocks handed to stmatrix in the wrong order (no hazard, wrong numbers).
_STORE_P = "for (int c = 0; c < 4; ++c) stsm_acc16(prow, c, s + 8 * c, f0, f1);"
_STORE_PF = "for (int c = 0; c < 4; ++c) stsm_x4(p_addr(c), pf[c][0], pf[c][1], pf[c][2], pf[c][3]);"
KERNEL_MUTANTS = {
    "p_store_without_proxy_fence": (_STORE_P + "\n    fence_async_smem();", _STORE_P, "fence.proxy.async"),
    "p_store_blocks_swapped": (_STORE_PF, _STORE_PF.replace("pf[c][1], pf[c][2]", "pf[c][2], pf[c][1]"), None),
}


@pytest.mark.parametrize("mutant", list(KERNEL_MUTANTS))
def test_emulator_catches_mutated_p_store(tmp_path_factory, mutant):
    old, new, expected = KERNEL_MUTANTS[mutant]
    text = read_kernel(KERNEL)
    assert text.count(old) == 1, f"{old!r} is not in {KERNEL} once: update this mutant"
    lib = declare_fwd(build_emulated(tmp_path_factory, mutant, "fwd_pp_emu.cpp", KERNEL,
                                     kernel_text=text.replace(old, new)), "dsa_sparse_mla_fwd_pp_sm90")
    prob = fwd_problem(T=2, H=64, K=130)
    rc, out, lse, hazards, aborted, msgs = _run(lib, prob)
    assert rc == 0
    if expected is not None:
        assert hazards > 0 and any(expected in m for m in msgs), msgs
    else:
        assert hazards == 0 and not aborted, msgs
        with pytest.raises(AssertionError):
            check_fwd_against_reference(prob, out, lse)


def test_source_rewrite_covers_every_asm_statement():
    """ptx_source leaves no inline PTX and no <<<>>> launch in the sources it rewrites."""
    assert_rewrite_complete(KERNEL, COMMON)
