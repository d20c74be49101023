"""The 16-head sparse MLA forward (``kernels/sparse_mla/cuda/sparse_mla_fwd16_sm90.cu``) on the CPU.

As ``test_sparse_mla_fwd_pp_emu.py`` does for the ping-pong forward: the kernel's own source and
its ``sm90_common.cuh`` are rewritten by ``cuda_emu/ptx_source.py`` (inline PTX -> the emulator's
PTX interpreter, ``<<<>>>`` -> ``emu::launch``) and compiled against ``cuda_emu/sm90_emu.h``; the
library's entry point ``dsa_sparse_mla_fwd16_sm90`` is called through ctypes. 512 OS threads per
CTA (producer, S^T, softmax and PV warpgroups), real blocking mbarriers and named barriers
(bar.red.or too), ldmatrix / movmatrix as warp exchanges, cp.async landing as late as allowed.

The kernel is persistent: the launcher asks cudaDeviceGetAttribute for the SM count, which the
emulator answers with 2, so grid = min(T, 2) CTAs and with T > 2 every CTA walks several rows
(the producer's ring runs across rows, the query is double-buffered across rows).

Checked: out / lse against the float64 reference with the ping-pong test's tolerances (H = 16
and H = 7, K not a multiple of 64 with -1 padding and an id past the keys, one block per row,
rows without keys, the sink on and off), no hazard, bit-identical results under random
warpgroup slowdowns, and that the emulator catches mutants of the kernel text (the shipped file
is not touched): S^T's query wait (``cp.async.wait_group 1``) waiting for nothing, and PV's
``fence.proxy.async`` after its full-barrier waits dropped.
"""

import os
import sys

import pytest
import torch


HERE = os.path.dirname(os.path.abspath(__file__))
EMU_DIR = os.path.join(HERE, "cuda_emu")
KERNEL, COMMON = "sparse_mla_fwd16_sm90.cu", "sm90_common.cuh"
EMU_SMS = 2  # sm90_emu.h's answer to cudaDevAttrMultiProcessorCount

sys.path.insert(0, EMU_DIR)
from emu_fwd import D_V, check_fwd_against_reference, declare_fwd, fwd_problem, run_fwd  # noqa: E402
from emu_lib import assert_rewrite_complete, build_emulated, read_kernel  # noqa: E402

sys.path.pop(0)


def _build(tmp_path_factory, tag, kernel_text=None):
    """The emulated library of the kernel (kernel_text: a modified copy in place of the shipped text)."""
    lib = build_emulated(tmp_path_factory, tag, "fwd16_emu.cpp", KERNEL, kernel_text=kernel_text)
    return declare_fwd(lib, "dsa_sparse_mla_fwd16_sm90")


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    return _build(tmp_path_factory, "shipped")


def _run(lib, prob, seed=0):
    return run_fwd(lib, "dsa_sparse_mla_fwd16_sm90", prob, seed)


CASES = {
    # T > EMU_SMS: each of the 2 persistent CTAs takes several rows
    "h16_k200_sink_t5": dict(T=5, H=16, K=200, sink=True),           # 4 / 3 / 4 ... blocks, partial last ones
    # one block per row: every block ends a row (S^T's query buffers turn over each block)
    "h16_k64_t4": dict(T=4, H=16, K=64),
    # heads 7-15 zero rows of Q, not stored; rows without keys: CTA 1's first row (1), one in the
    # middle of CTA 0's walk (0, 2, 4)
    "h7_k130_t5_empty_rows": dict(T=5, H=7, K=130, empty_rows=(1, 2)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_emulated_fwd16_matches_reference_without_hazards(lib, case):
    prob = fwd_problem(**CASES[case])
    T, H = prob[0].shape[:2]
    assert T > EMU_SMS
    rc, out, lse, hazards, aborted, msgs = _run(lib, prob)
    assert rc == 0
    assert not aborted and hazards == 0, msgs
    check_fwd_against_reference(prob, out, lse)
    for er in CASES[case].get("empty_rows", ()):
        assert torch.equal(out[er].float(), torch.zeros(H, D_V)) and torch.isneginf(lse[er]).all()


def test_emulated_fwd16_bit_identical_under_random_slowdowns(lib):
    """Randomly slowed warpgroups (other interleavings of producer, S^T, softmax and PV): same bits."""
    prob = fwd_problem(T=3, H=16, K=130, sink=True, seed=1)
    results = []
    for seed in (11, 12):
        rc, out, lse, hazards, aborted, msgs = _run(lib, prob, seed=seed)
        assert rc == 0 and hazards == 0 and not aborted, (seed, msgs)
        results.append((out, lse))
    for out, lse in results[1:]:
        assert torch.equal(out.view(torch.int16), results[0][0].view(torch.int16))
        assert torch.equal(lse, results[0][1])
    check_fwd_against_reference(prob, *results[0])


# The emulator must see the races it exists to find: the kernel's text with one synchronization
# changed (a modified copy; the shipped source is not touched).
MUTANTS = {
    # cp_async_wait1 waiting for nothing: S^T's wgmmas read the query before its cp.async lands
    "wait1_waits_for_nothing": ('asm volatile("cp.async.wait_group 1;\\n" ::: "memory");',
                                'asm volatile("cp.async.wait_group 8;\\n" ::: "memory");',
                                "wgmma reads shared memory whose cp.async has not landed"),
    # PV without the proxy fence after its full-barrier waits: the gathered keys have landed and
    # are ordered before the wgmma, but not for the async proxy
    "pv_no_fence_after_full": ("((seq0 + i) / NS16) & 1);\n        fence_async_smem();",
                               "((seq0 + i) / NS16) & 1);\n",
                               "without a fence.proxy.async after the wait"),
}


@pytest.mark.parametrize("mutant", list(MUTANTS))
def test_emulator_catches_mutated_sync(tmp_path_factory, mutant):
    old, new, expected = MUTANTS[mutant]
    text = read_kernel(KERNEL)
    assert text.count(old) == 1, f"{old!r} is not in {KERNEL} once: update this mutant"
    lib = _build(tmp_path_factory, mutant, text.replace(old, new))
    prob = fwd_problem(T=3, H=16, K=64)
    rc, out, lse, hazards, aborted, msgs = _run(lib, prob)
    assert rc == 0
    assert hazards > 0 and any(expected in m for m in msgs), msgs
    if mutant == "wait1_waits_for_nothing":  # unlanded queries read the poison: wrong numbers as well
        assert out.isnan().any()


def test_source_rewrite_covers_every_asm_statement():
    """ptx_source leaves no inline PTX and no <<<>>> launch in the sources it rewrites."""
    assert_rewrite_complete(KERNEL, COMMON)
