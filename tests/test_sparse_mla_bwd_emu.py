"""The sparse MLA backward (``kernels/sparse_mla/cuda/sparse_mla_bwd_sm90.cu``) on the CPU.

As ``test_sparse_mla_fwd_pp_emu.py`` does for the forward: the kernel's own source and its
``sm90_common.cuh`` are compiled by the host compiler against ``cuda_emu/sm90_emu.h`` after
``cuda_emu/ptx_source.py`` turned each inline-PTX statement into a call of the emulator's PTX
interpreter and the launch into ``emu::launch``; the library's entry points
``dsa_sparse_mla_bwd_sm90`` and ``dsa_sparse_mla_bwd_packed_sm90`` are called through ctypes.
384 OS threads per CTA, real blocking mbarriers, wgmma m64n{32,64,256}k16 with register and
shared (K- and MN-major) operands, fp32 ``red.global.add`` into the dkv workspace, setmaxnreg
register accounting, and the emulator's hazard checks (cp.async landing / visibility / proxy
fences, st.shared -> wgmma fences, write-after-read of wgmma and ld.shared operands).

What the library's launcher does around the kernel is done here in torch: the stats (the Triton
``bwd_stats`` kernel's per-(row, head) log2-domain logZ with the sink, Delta = rowsum(dO * O),
the d_sink terms; :func:`_stats` ports it), ``effective_lengths_torch``, the packing
(``pack_rows_reference``) and ``cuda_impl.unpermute_dkv`` on the workspace. ``out`` / ``lse`` are
the float64 reference's, rounded as the forward returns them (bf16 / fp32).

Checked against float64 autograd of ``reference.py``: dq, dkv (unpermuted) and d_sink, the
indexer-loss target (head sum of P per slot), the row-packed kernel, the 64-key kernel
(``dsa_sparse_mla_bwd64_sm90``, with and without its L2 cache hints), no hazard, dq bit-identical
under random warpgroup slowdowns, and that the emulator catches broken synchronization in
modified copies of the kernel's source.

Tolerances (bf16 inputs, P and dS rounded to bf16 as on the GPU, fp32 accumulation, bf16 dq):
relative Frobenius error <= 1e-2 for dq and dkv (the H100 gets ~2.5e-3 / ~1.7e-3 on its
benchmark shapes; measured here 2.3e-3 - 2.7e-3 / 1.7e-3 - 1.8e-3), max |err| <= 3e-2 max |ref|;
the target (fp32 sums of fp32 P, measured ~1e-7) relative <= 1e-5; d_sink relative <= 1e-2
(measured 1.7e-3 - 3.1e-3: Delta from the bf16 out; d_sink comes from the torch stats, not the
kernel, and checks the port of the stats kernel only).
"""

import ctypes
import os
import sys

import pytest
import torch

from megatron_dsa.kernels.sparse_mla.cuda_impl import (DET_QUANTUM_BITS, det_bound_scale, det_finish, det_head_max,
                                                       det_quanta, det_target, effective_lengths_torch, unpermute_dkv,
                                                       unpermute_dkv64)
from megatron_dsa.kernels.sparse_mla.packing import pack_rows_reference
from megatron_dsa.kernels.sparse_mla.reference import slot_validity, sparse_mla_reference

HERE = os.path.dirname(os.path.abspath(__file__))
EMU_DIR = os.path.join(HERE, "cuda_emu")
KERNEL, COMMON = "sparse_mla_bwd_sm90.cu", "sm90_common.cuh"
LOG2E = 1.4426950408889634
D_QK, D_V = 576, 512
SCALE = D_QK ** -0.5

sys.path.insert(0, EMU_DIR)
from emu_lib import assert_rewrite_complete, build_emulated, messages, read_kernel  # noqa: E402

sys.path.pop(0)


def _build(tmp_path_factory, tag, kernel_text=None):
    """The emulated library of the kernel (kernel_text: a modified copy in place of the shipped text)."""
    lib = build_emulated(tmp_path_factory, tag, "bwd_emu.cpp", KERNEL, kernel_text=kernel_text)
    vp, ll, i32, f32 = ctypes.c_void_p, ctypes.c_longlong, ctypes.c_int, ctypes.c_float
    lib.dsa_sparse_mla_bwd_sm90.restype = i32
    lib.dsa_sparse_mla_bwd_sm90.argtypes = [vp] * 10 + [ll] * 8 + [i32] * 7 + [f32, vp]
    lib.dsa_sparse_mla_bwd_packed_sm90.restype = i32
    lib.dsa_sparse_mla_bwd_packed_sm90.argtypes = [vp] * 11 + [ll] * 8 + [i32] * 9 + [f32, vp]
    lib.dsa_sparse_mla_bwd64_sm90.restype = i32
    lib.dsa_sparse_mla_bwd64_sm90.argtypes = [vp] * 10 + [ll] * 8 + [i32] * 7 + [f32, vp]
    lib.dsa_sparse_mla_bwd64_packed_sm90.restype = i32
    lib.dsa_sparse_mla_bwd64_packed_sm90.argtypes = [vp] * 11 + [ll] * 8 + [i32] * 9 + [f32, vp]
    lib.dsa_sparse_mla_bwd64_det_sm90.restype = i32
    lib.dsa_sparse_mla_bwd64_det_sm90.argtypes = [vp] * 10 + [ll] * 8 + [i32] * 7 + [f32] + [vp] * 6
    lib.dsa_sparse_mla_bwd64_det_packed_sm90.restype = i32
    lib.dsa_sparse_mla_bwd64_det_packed_sm90.argtypes = [vp] * 11 + [ll] * 8 + [i32] * 9 + [f32] + [vp] * 6
    return lib


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    return _build(tmp_path_factory, "shipped")


class Problem:
    """Inputs, the forward's out / lse (float64 reference, rounded as the forward returns them) and
    the float64 autograd gradients."""

    def __init__(self, q, kv, idx, topk_len, sink, dout):
        self.q, self.kv, self.idx, self.topk_len, self.sink, self.dout = q, kv, idx, topk_len, sink, dout
        q64 = q.double().requires_grad_()
        kv64 = kv.double().requires_grad_()
        s64 = sink.double().requires_grad_() if sink is not None else None
        out, lse = sparse_mla_reference(q64, kv64, idx, SCALE, topk_length=topk_len, sink=s64)
        (out * dout.double()).sum().backward()
        self.out, self.lse = out.detach().bfloat16(), lse.detach().float()
        self.dq_ref, self.dkv_ref = q64.grad, kv64.grad
        self.dsink_ref = s64.grad if s64 is not None else None
        # the indexer-loss target: sum_h exp(scale q_h . kv_id - lse_h) per valid slot
        valid = slot_validity(idx, kv.shape[0], topk_len)
        sel = kv.double()[torch.where(valid, idx.long(), 0)]
        logits = torch.einsum("thd,tkd->thk", q.double(), sel) * SCALE
        lse_d = lse.detach().double()
        p = torch.exp(logits - torch.where(torch.isfinite(lse_d), lse_d, 0)[..., None])
        self.target_ref = torch.where(valid, p.sum(1), 0.0)


def _problem(T, H, K, Tk=200, sink=False, seed=0, shared_pool=None, empty_last_row=False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(T, H, D_QK, generator=g).bfloat16()
    kv = torch.randn(Tk, D_QK, generator=g).bfloat16()
    if shared_pool is None:
        idx = torch.randint(0, Tk, (T, K), generator=g, dtype=torch.int32)
    else:  # rows drawing from one pool of keys: the packed groups' unions are shared
        pool = torch.randperm(Tk, generator=g)[:shared_pool]
        idx = torch.stack([pool[torch.randperm(shared_pool, generator=g)[:K]] for _ in range(T)]).to(torch.int32)
    idx[0, K - 7:] = -1                       # causal-style -1 padding at the end of a row
    idx[0, 3] = -1                            # an empty slot inside a block
    idx[0, 11] = Tk + 5                       # an id past the keys: masked
    topk_len = torch.full((T,), K, dtype=torch.int32)
    if T > 1:
        topk_len[1] = K - 37                  # a row cut by topk_length (a partial last block)
    if T > 2:
        idx[2, 5] = idx[2, 6]                 # an id twice in a row: counted per slot
    if empty_last_row:
        idx[T - 1] = -1                       # no valid slot: no block runs, dq = 0
    sink_t = torch.randn(H, generator=g) if sink else None
    dout = torch.randn(T, H, D_V, generator=g).bfloat16()
    return Problem(q, kv, idx, topk_len, sink_t, dout)


def _stats(prob):
    """``triton_impl.bwd_stats`` in torch (fp32): stats [2, T, H] = (log2-domain logZ with the sink,
    0 on empty rows; Delta = rowsum(dO * O)) and the d_sink terms [T, H]."""
    delta = (prob.out.float() * prob.dout.float()).sum(-1)
    lse2 = prob.lse * LOG2E
    z2 = lse2
    dsink_t = None
    if prob.sink is not None:
        sk2 = prob.sink.float()[None, :] * LOG2E
        mx = torch.maximum(lse2, sk2)
        mx = torch.where(mx == float("-inf"), 0.0, mx)
        z2 = mx + torch.log2(torch.exp2(lse2 - mx) + torch.exp2(sk2 - mx))
        zfin = z2 > float("-inf")
        dsink_t = torch.where(zfin, -torch.exp2(sk2 - torch.where(zfin, z2, 0.0)) * delta, 0.0)
    z2 = torch.where(lse2 > float("-inf"), z2, 0.0)
    return torch.stack([z2, delta]).contiguous(), dsink_t


def _launch_inputs(prob):
    """``(T, H, Tk, K, stats, d_sink terms, lse, dq)``: the sizes, the stats kernel's outputs (in
    torch), lse contiguous and a NaN-filled dq for the kernel to write."""
    T, H, _ = prob.q.shape
    stats, dsink_t = _stats(prob)
    dq = torch.full((T, H, D_QK), float("nan"), dtype=torch.bfloat16)
    return T, H, prob.kv.shape[0], prob.idx.shape[1], stats, dsink_t, prob.lse.contiguous(), dq


def _launch(entry, prob, packed, dq, common, tail):
    """One call of a backward entry point on the problem's rows (``packed``: packed by
    ``pack_rows_reference``): its q / kv / ids pointers, ``common`` (dout .. the target), the
    strides and sizes, then ``tail`` (the entry's mode arguments and the stream)."""
    q, kv, idx, dout = prob.q, prob.kv, prob.idx, prob.dout
    T, H, _ = q.shape
    Tk, K = kv.shape[0], idx.shape[1]
    if packed:
        pk = pack_rows_reference(idx, Tk, H, prob.topk_len)
        assert pk.rows == 64 // pk.hpad
        uid, count, uslot = pk.uid.contiguous(), pk.count.contiguous(), pk.uslot.contiguous()
        return entry(
            q.data_ptr(), kv.data_ptr(), uid.data_ptr(), count.data_ptr(), uslot.data_ptr(), *common,
            q.stride(0), q.stride(1), kv.stride(0), uid.shape[1], dout.stride(0), dout.stride(1),
            dq.stride(0), dq.stride(1), T, H, Tk, K, uid.shape[0], 4 if pk.hpad == 16 else 5,
            int(prob.sink is not None), *tail)
    kv_len = effective_lengths_torch(idx, prob.topk_len)
    return entry(
        q.data_ptr(), kv.data_ptr(), idx.data_ptr(), kv_len.data_ptr(), *common,
        q.stride(0), q.stride(1), kv.stride(0), idx.stride(0), dout.stride(0), dout.stride(1),
        dq.stride(0), dq.stride(1), T, H, Tk, K, int(prob.sink is not None), *tail)


def _run(lib, prob, seed=0, target=False, packed=False, wait_limit_s=60.0, lanes=0, launch_ctas=0, keys64=False,
         l2_hints=0):
    """The launcher's steps around the kernel (cuda_impl.sparse_mla_bwd_cuda) with the emulated
    kernel: (rc, dq, dkv unpermuted fp32, d_sink, target, hazards, aborted, messages).
    ``lanes`` > 0: the deterministic mode, a persistent grid of ``lanes`` CTAs each adding into
    its own dkv lane, the lanes summed in order. ``launch_ctas`` > 0: the rows in launches of at
    most that many CTAs. ``keys64``: the 64-key kernel (``dsa_sparse_mla_bwd64_sm90``, or with
    ``packed`` ``dsa_sparse_mla_bwd64_packed_sm90``: its own workspace layout; ``l2_hints`` in
    place of ``lanes``)."""
    T, H, Tk, K, stats, dsink_t, lse, dq = _launch_inputs(prob)
    ws = torch.zeros(max(lanes, 1), Tk, D_QK)                   # permuted columns
    tgt = torch.zeros(T, K) if target else None
    lib.emu_reset(seed, wait_limit_s)
    common = (prob.dout.data_ptr(), stats.data_ptr(), lse.data_ptr(), dq.data_ptr(), ws.data_ptr(),
              tgt.data_ptr() if tgt is not None else None)
    if packed:
        entry = lib.dsa_sparse_mla_bwd64_packed_sm90 if keys64 else lib.dsa_sparse_mla_bwd_packed_sm90
    else:
        entry = lib.dsa_sparse_mla_bwd64_sm90 if keys64 else lib.dsa_sparse_mla_bwd_sm90
    rc = _launch(entry, prob, packed, dq, common, (l2_hints if keys64 else lanes, launch_ctas, SCALE, None))
    d_sink = dsink_t.sum(0) if dsink_t is not None else None
    dkv = unpermute_dkv64(ws.sum(0)) if keys64 else unpermute_dkv(ws.sum(0))
    return (rc, dq, dkv, d_sink, tgt, lib.emu_hazards(), bool(lib.emu_aborted()), messages(lib))


def _run_det64(lib, prob, seed=0, target=False, packed=False, launch_ctas=0, wait_limit_s=60.0):
    """The deterministic 64-key backward as cuda_impl.sparse_mla_bwd_cuda runs it (the bound
    pass, the keys' quanta, the integer pass, the finish) with the emulated kernel: (rc, dq,
    dkv (fp32, unpermuted), d_sink, target, hazards, aborted, messages, extras) with extras the
    bound pass's per-key bounds (float64), the integer workspace and the quanta."""
    T, H, Tk, K, stats, dsink_t, lse, dq = _launch_inputs(prob)
    ws = torch.zeros(Tk, D_QK, dtype=torch.int32)
    tfx = torch.zeros(T, K, dtype=torch.int64) if target else None
    hq, hdo = det_head_max(prob.q), det_head_max(prob.dout)
    bscale, bad = det_bound_scale(prob.kv, prob.dout, hq, hdo, SCALE)
    bound = torch.zeros(Tk, dtype=torch.int64)
    lib.emu_reset(seed, wait_limit_s)
    inv_q = qs = None
    rc = 0
    for stage in (1, 2):
        if stage == 2:
            inv_q, qs = det_quanta(bound, bscale)
        common = (prob.dout.data_ptr(), stats.data_ptr(), lse.data_ptr(), dq.data_ptr(), ws.data_ptr(),
                  tfx.data_ptr() if tfx is not None else None)
        tail = (stage, launch_ctas, SCALE, hq.data_ptr(), hdo.data_ptr(), bound.data_ptr(), bscale.data_ptr(),
                inv_q.data_ptr() if inv_q is not None else None, None)
        entry = lib.dsa_sparse_mla_bwd64_det_packed_sm90 if packed else lib.dsa_sparse_mla_bwd64_det_sm90
        rc = rc or _launch(entry, prob, packed, dq, common, tail)
    d_sink = dsink_t.sum(0) if dsink_t is not None else None
    dkv = det_finish(ws, qs, bad, torch.float32)
    tgt = det_target(tfx) if tfx is not None else None
    extras = dict(bound=bound.double() / bscale.double(), ws=ws, q=qs, bad=bad)
    return (rc, dq, dkv, d_sink, tgt, lib.emu_hazards(), bool(lib.emu_aborted()), messages(lib), extras)


def _rel(x, ref):
    return ((x.double() - ref).norm() / ref.norm()).item()


def _check(prob, dq, dkv, d_sink, tgt=None):
    """Against float64 autograd of the reference; returns the relative errors."""
    assert not dq.isnan().any() and not dkv.isnan().any()
    errs = {"dq": _rel(dq, prob.dq_ref), "dkv": _rel(dkv, prob.dkv_ref)}
    for name, x, ref in (("dq", dq, prob.dq_ref), ("dkv", dkv, prob.dkv_ref)):
        assert errs[name] <= 1e-2, (name, errs)
        assert (x.double() - ref).abs().max() <= 3e-2 * ref.abs().max(), name
    # keys no valid slot selects get exactly nothing
    untouched = prob.dkv_ref.abs().amax(1) == 0
    assert untouched.any() and (dkv[untouched] == 0).all()
    if prob.sink is not None:
        errs["d_sink"] = _rel(d_sink, prob.dsink_ref)
        assert errs["d_sink"] <= 1e-2, errs
    if tgt is not None:
        errs["target"] = _rel(tgt, prob.target_ref)
        assert errs["target"] <= 1e-5, errs
        assert (tgt[prob.target_ref == 0] == 0).all()  # empty / cut / masked slots stay 0
    return errs


CASES = {
    # T, H, K: blocks of 32 keys per row (the last ones partial; row 1 cut by topk_length)
    "h64_k100_target": dict(T=3, H=64, K=100, target=True),              # 4 / 2 / 4 blocks
    "h100_k70_sink_target": dict(T=2, H=100, K=70, sink=True, target=True),  # 2 head tiles, the last masked
    "h17_k40_sink_empty_row": dict(T=4, H=17, K=40, sink=True, empty_last_row=True),  # 47 rows masked
}


@pytest.mark.parametrize("case", list(CASES))
def test_emulated_bwd_matches_reference_without_hazards(lib, case):
    kw = dict(CASES[case])
    target = kw.pop("target", False)
    prob = _problem(**kw)
    rc, dq, dkv, d_sink, tgt, hazards, aborted, msgs = _run(lib, prob, target=target)
    assert rc == 0
    assert not aborted and hazards == 0, msgs
    errs = _check(prob, dq, dkv, d_sink, tgt)
    if kw.get("empty_last_row"):
        assert torch.equal(dq[-1].float(), torch.zeros(kw["H"], D_QK))
    print(case, errs)


CASES64 = {
    # T, H, K: blocks of 64 keys per row (the last ones partial; row 1 cut by topk_length);
    # (l2_hints, launch_ctas): the L2 cache policies on the adds and gathers, rows in launches
    "h64_k150_target": (dict(T=3, H=64, K=150, target=True), 0, 0),                 # 3 / 2 / 3 blocks
    "h100_k70_sink_target_hints_launches": (dict(T=3, H=100, K=70, sink=True, target=True), 1, 3),  # 2 head tiles
    "h17_k40_sink_empty_row": (dict(T=4, H=17, K=40, sink=True, empty_last_row=True), 0, 0),
}


@pytest.mark.parametrize("case", list(CASES64))
def test_emulated_bwd64_matches_reference_without_hazards(lib, case):
    """The 64-key kernel: the reference's gradients and target, no hazard, with its L2 hints and in
    launches of rows (3 CTAs: one row of 2 head tiles each); dq the same bits under another
    interleaving of its warpgroups; negative launch sizes refused."""
    kw, hints, launch_ctas = CASES64[case]
    kw = dict(kw)
    target = kw.pop("target", False)
    prob = _problem(**kw)
    rc, dq, dkv, d_sink, tgt, hazards, aborted, msgs = _run(lib, prob, target=target, keys64=True, l2_hints=hints,
                                                            launch_ctas=launch_ctas)
    assert rc == 0
    assert not aborted and hazards == 0, msgs
    errs = _check(prob, dq, dkv, d_sink, tgt)
    if kw.get("empty_last_row"):
        assert torch.equal(dq[-1].float(), torch.zeros(kw["H"], D_QK))
    if case == "h64_k150_target":
        again = _run(lib, prob, seed=11, target=target, keys64=True)
        assert again[0] == 0 and again[5] == 0 and not again[6], again[7]
        assert torch.equal(again[1].view(torch.int16), dq.view(torch.int16))
        assert torch.allclose(again[2], dkv, rtol=1e-5, atol=1e-5 * dkv.abs().max().item())
        assert _run(lib, prob, launch_ctas=-1, keys64=True)[0] == 1  # cudaErrorInvalidValue
    print(case, errs)


PACKED64 = {
    # 16 heads: groups of 4 rows (7 rows: the last group has 3), unions of <= 56 entries; with the
    # L2 hints, in launches of one group
    "h16_7rows_sink_target_launches": (dict(T=7, H=16, K=44, sink=True, shared_pool=56, seed=3), 1, 1),
    # 32 heads (groups of 2 rows, a query row over two warps), 20 heads (12 masked heads per row),
    # unions of up to 2 x 90 entries: several 64-entry blocks, the last partial
    "h32_5rows_target": (dict(T=5, H=32, K=90, shared_pool=150, seed=5), 0, 0),
    "h20_4rows_sink_empty_row": (dict(T=4, H=20, K=70, sink=True, seed=6, empty_last_row=True), 0, 0),
}


@pytest.mark.parametrize("case", list(PACKED64))
def test_emulated_bwd64_packed_matches_reference_without_hazards(lib, case):
    """The 64-key kernel on packed rows: the reference's gradients and target, no hazard, and the
    32-key packed kernel's results up to summation order."""
    kw, hints, launch_ctas = PACKED64[case]
    prob = _problem(**kw)
    rc, dq, dkv, d_sink, tgt, hazards, aborted, msgs = _run(lib, prob, target=True, packed=True, keys64=True,
                                                            l2_hints=hints, launch_ctas=launch_ctas)
    assert rc == 0
    assert not aborted and hazards == 0, msgs
    errs = _check(prob, dq, dkv, d_sink, tgt)
    if kw.get("empty_last_row"):
        assert torch.equal(dq[-1].float(), torch.zeros(kw["H"], D_QK))
    rc, dq32, dkv32, _, tgt32, hazards, aborted, msgs = _run(lib, prob, target=True, packed=True)
    assert rc == 0 and hazards == 0 and not aborted, msgs
    # dq: the same bits (both kernels sum a row's keys in 16-key k-steps, in order)
    assert torch.equal(dq.view(torch.int16), dq32.view(torch.int16))
    assert torch.allclose(dkv, dkv32, rtol=1e-4, atol=1e-5 * dkv32.abs().max().item())
    assert torch.allclose(tgt, tgt32, rtol=1e-5, atol=1e-7)
    print(case, errs)


def test_emulated_bwd_packed_matches_reference_without_hazards(lib):
    """Row packing: 16 heads, 4 rows per CTA over the union of their keys (rows drawing from one
    pool of 56 keys: unions of <= 56 entries against ~130 valid slots per group), 7 rows (the
    last group padded), with the sink and the target."""
    prob = _problem(T=7, H=16, K=44, sink=True, shared_pool=56, seed=3)
    pk = pack_rows_reference(prob.idx, prob.kv.shape[0], 16, prob.topk_len)
    valid = slot_validity(prob.idx, prob.kv.shape[0], prob.topk_len).sum(1)
    # the rows share their keys: each group's union at most the pool, under half its slots (the
    # second group has 3 rows: its fourth tile slice is masked, tr >= T)
    assert (pk.count <= 56).all() and valid[:4].sum() >= 2 * pk.count[0] and valid[4:].sum() >= 2 * pk.count[1]
    rc, dq, dkv, d_sink, tgt, hazards, aborted, msgs = _run(lib, prob, target=True, packed=True)
    assert rc == 0
    assert not aborted and hazards == 0, msgs
    errs = _check(prob, dq, dkv, d_sink, tgt)
    print("packed", errs)


@pytest.mark.parametrize("packed", [False, True], ids=["h100_rows", "packed_groups"])
def test_emulated_bwd_in_launches_of_rows_equals_one_launch(lib, packed):
    """``launch_ctas`` (the long-sequence launches of cuda_impl.l2_order): rows in several launches,
    each CTA finding its row from the launch's first row. The reference's gradients and target,
    no hazard; dq and the target the same bits as one launch, dkv equal up to its add order.
    Unpacked: 3 rows of 2 head tiles, 3 CTAs per launch (one row each: the odd CTA budget rounds
    down to whole rows); packed: 2 groups, one per launch."""
    prob = (_problem(T=7, H=16, K=44, sink=True, shared_pool=56, seed=3) if packed
            else _problem(T=3, H=100, K=70, sink=True, seed=4))
    rc, dq, dkv, d_sink, tgt, hazards, aborted, msgs = _run(lib, prob, target=True, packed=packed,
                                                            launch_ctas=1 if packed else 3)
    assert rc == 0 and not aborted and hazards == 0, msgs
    _check(prob, dq, dkv, d_sink, tgt)
    rc, dq0, dkv0, _, tgt0, hazards, aborted, msgs = _run(lib, prob, target=True, packed=packed)
    assert rc == 0 and hazards == 0 and not aborted, msgs
    assert torch.equal(dq.view(torch.int16), dq0.view(torch.int16))
    assert torch.allclose(dkv, dkv0, rtol=1e-5, atol=1e-5 * dkv0.abs().max().item())
    assert torch.allclose(tgt, tgt0, rtol=1e-6, atol=0)


def test_emulated_bwd_dq_bit_identical_under_random_slowdowns(lib):
    """Randomly slowed warpgroups (other interleavings of producer, WG1 and WG2): dq the same bits
    (no atomics), dkv equal up to the order of its fp32 atomic adds, no hazard."""
    prob = _problem(T=1, H=64, K=200, seed=5)  # 7 blocks: the kv, dS and ids rings all wrap
    results = []
    for seed in (0, 11, 12, 13):  # (producer, WG1, WG2) slowed by (3, 6, 0), (3, 3, 6), (6, 3, 0) / 16
        rc, dq, dkv, d_sink, tgt, hazards, aborted, msgs = _run(lib, prob, seed=seed)
        assert rc == 0 and hazards == 0 and not aborted, (seed, msgs)
        results.append((dq, dkv))
    for dq, dkv in results[1:]:
        assert torch.equal(dq.view(torch.int16), results[0][0].view(torch.int16))
        assert torch.allclose(dkv, results[0][1], rtol=1e-5, atol=1e-5 * results[0][1].abs().max().item())
    _check(prob, *results[0], None)


DET_CASES = {
    # (problem, lanes): the persistent grid walks several items per CTA, its rings continuing
    # across items; rows 0, 2, 4 on CTA 0 and 1, 3 on CTA 1, each with both head tiles (the
    # target's two adds per slot from one CTA in turn), the last row empty
    "h100_5rows_2lanes_sink_target": (dict(T=5, H=100, K=70, sink=True, empty_last_row=True), 2, False),
    # more lanes than rows: one CTA per row
    "h64_3rows_8lanes": (dict(T=3, H=64, K=100), 8, False),
    # packed: 13 rows of 16 heads = 4 groups of 4 rows on 3 CTAs (groups 0 and 3 on CTA 0)
    "packed_h16_13rows_3lanes_sink_target": (dict(T=13, H=16, K=44, sink=True, shared_pool=56, seed=3), 3, True),
}


@pytest.mark.parametrize("case", list(DET_CASES))
def test_emulated_bwd_deterministic_matches_reference_and_default(lib, case):
    """Deterministic mode (lanes > 0): the reference's gradients and target, no hazard, dq and
    the target the same bits as the default mode's, dkv equal up to the order of its fp32 adds."""
    kw, lanes, packed = DET_CASES[case]
    target = kw["T"] > 3 or packed
    prob = _problem(**kw)
    rc, dq, dkv, d_sink, tgt, hazards, aborted, msgs = _run(lib, prob, target=target, packed=packed, lanes=lanes)
    assert rc == 0
    assert not aborted and hazards == 0, msgs
    errs = _check(prob, dq, dkv, d_sink, tgt)
    rc, dq0, dkv0, _, tgt0, hazards, aborted, msgs = _run(lib, prob, target=target, packed=packed)
    assert rc == 0 and hazards == 0 and not aborted, msgs
    assert torch.equal(dq.view(torch.int16), dq0.view(torch.int16))
    assert torch.allclose(dkv, dkv0, rtol=1e-5, atol=1e-5 * dkv0.abs().max().item())
    if target:
        assert torch.allclose(tgt, tgt0, rtol=1e-6, atol=0)
    # the same bits under another interleaving of the warpgroups (random slowdowns; one case:
    # each emulated run takes ~10 s)
    if case == "h100_5rows_2lanes_sink_target":
        again = _run(lib, prob, seed=11, target=target, packed=packed, lanes=lanes)
        assert again[0] == 0 and again[5] == 0 and not again[6], again[7]
        assert torch.equal(again[2], dkv) and torch.equal(again[4], tgt)
    print(case, errs)


def test_emulated_bwd_rejects_negative_lanes_and_launch_sizes(lib):
    prob = _problem(T=2, H=64, K=40)
    assert _run(lib, prob, lanes=-1)[0] == 1  # cudaErrorInvalidValue
    assert _run(lib, prob, launch_ctas=-1)[0] == 1


# The emulator must see the races it exists to find: the kernel's source with its
# synchronization broken (the shipped file is not touched: each mutant is built from a copy of
# its text). ([(old, new), ...], the expected message's words)
MUTANTS = {
    # WG1 hands dS / P (st.shared, generic proxy) to WG2's wgmmas without the proxy fence
    "wg1_no_fence_before_ds_full": (
        [("      fence_async_smem();\n      mbar_arrive(sbase + BAR_DS_FULL + 8 * pb);",
          "      mbar_arrive(sbase + BAR_DS_FULL + 8 * pb);")],
        "without a fence.proxy.async by its writer"),
    # WG2 frees the kv slot before the wait_group that retires its dQ wgmma reading the slot: the
    # producer's gathers of block b + 2 overwrite what that wgmma reads
    "wg2_kv_empty_before_wait": (
        [("      wgmma_wait1();  // dQ's group is done: the kv slot is free\n"
          "      mbar_arrive(sbase + BAR_KV_EMPTY + 8 * st);",
          "      mbar_arrive(sbase + BAR_KV_EMPTY + 8 * st);\n      wgmma_wait1();")],
        "cp.async into shared memory that"),
    # WG2 without its proxy fence after the kv-full wait: the gathered rows are not fenced for the
    # async proxy its wgmmas read through
    "wg2_no_fence_after_kv_full": (
        [("      mbar_wait(sbase + BAR_KV_FULL + 8 * st, (g / NST) & 1);\n      fence_async_smem();\n"
          "      wgmma_fence();\n#pragma unroll\n      for (int k = 0; k < 2; ++k) {\n"
          "        const uint64_t da",
          "      mbar_wait(sbase + BAR_KV_FULL + 8 * st, (g / NST) & 1);\n"
          "      wgmma_fence();\n#pragma unroll\n      for (int k = 0; k < 2; ++k) {\n"
          "        const uint64_t da")],
        "without a fence.proxy.async after the wait"),
    # a register split above the CTA's 3 x 168 (the producer keeps 40, not 32) with the source's
    # static_assert against it removed: the last setmaxnreg.inc waits forever
    "register_split_over_budget": (
        [("#define SPARSE_MLA_BWD_RP 32", "#define SPARSE_MLA_BWD_RP 40"),
         ("static_assert(SPARSE_MLA_BWD_RP + SPARSE_MLA_BWD_R1",
          "static_assert(true || SPARSE_MLA_BWD_RP + SPARSE_MLA_BWD_R1")],
        "deadlock: a thread waited too long on setmaxnreg.inc"),
}


@pytest.mark.parametrize("mutant", list(MUTANTS))
def test_emulator_catches_mutated_sync(tmp_path_factory, mutant):
    edits, expected = MUTANTS[mutant]
    text = read_kernel(KERNEL)
    for old, new in edits:
        assert text.count(old) == 1, f"{old!r} is not in {KERNEL} once: update this mutant"
        text = text.replace(old, new)
    lib = _build(tmp_path_factory, mutant, text)
    prob = _problem(T=1, H=64, K=100, seed=7)  # 4 blocks: both kv slots and dS buffers reused
    deadlock = expected.startswith("deadlock")
    rc, dq, dkv, d_sink, tgt, hazards, aborted, msgs = _run(lib, prob, wait_limit_s=2.0 if deadlock else 60.0)
    assert rc == 0
    assert hazards > 0 and any(expected in m for m in msgs), msgs
    assert aborted == deadlock, msgs


def test_emulator_catches_deterministic_q_reuse_race(tmp_path_factory):
    """Deterministic mode: the producer loads the next item's Q / dO without waiting until both
    math warpgroups are done with this item's: the emulator reports the overwrite."""
    old = "    if (DET) mbar_wait(sbase + BAR_Q_EMPTY, par ^ 1);"
    text = read_kernel(KERNEL)
    assert text.count(old) == 1, f"{old!r} is not in {KERNEL} once: update this mutant"
    lib = _build(tmp_path_factory, "det_no_q_empty_wait", text.replace(old, ""))
    prob = _problem(T=3, H=64, K=100, seed=7)
    # (the early load also throws the Q barrier's phases out of step, so the run ends in a wait
    # that never returns: a short wait limit ends it; the overwrite is reported before that)
    rc, dq, dkv, d_sink, tgt, hazards, aborted, msgs = _run(lib, prob, lanes=1, wait_limit_s=10.0)
    assert rc == 0
    assert hazards > 0 and any("cp.async into shared memory that" in m for m in msgs), msgs


def test_source_rewrite_covers_every_asm_statement():
    """ptx_source leaves no inline PTX and no <<<>>> launch in the sources it rewrites."""
    assert_rewrite_complete(KERNEL, COMMON)


DET64 = {
    # (problem, packed, launch_ctas): the deterministic 64-key backward (the bound pass, then the
    # integer adds), unpacked and on packed rows, with the target
    "h64_k150": (dict(T=3, H=64, K=150), False, 0),
    "h100_k70_sink_launches": (dict(T=3, H=100, K=70, sink=True), False, 3),
    "h17_k40_sink_empty_row": (dict(T=4, H=17, K=40, sink=True, empty_last_row=True), False, 0),
    "h16_packed_7rows_sink_launches": (dict(T=7, H=16, K=44, sink=True, shared_pool=56, seed=3), True, 1),
    "h32_packed_5rows": (dict(T=5, H=32, K=90, shared_pool=150, seed=5), True, 0),
}


@pytest.mark.parametrize("case", list(DET64))
def test_emulated_bwd64_deterministic_matches_reference(lib, case):
    """The deterministic 64-key backward: the reference's gradients and target, no hazard (the
    emulator reports a finite value outside int32 in the integer conversion: a broken bound), each
    key's bound above the float64 |dkv| and its integers within 2^30 (1 + 2^-7); dq the same bits
    as the default mode's, dkv and the target within the default mode's summation noise."""
    kw, packed, launch_ctas = DET64[case]
    prob = _problem(**kw)
    rc, dq, dkv, d_sink, tgt, hazards, aborted, msgs, ex = _run_det64(lib, prob, target=True, packed=packed,
                                                                     launch_ctas=launch_ctas)
    assert rc == 0
    assert not aborted and hazards == 0, msgs
    assert not bool(ex["bad"])
    errs = _check(prob, dq, dkv, d_sink, tgt)
    assert (prob.dkv_ref.abs().amax(1) <= ex["bound"]).all()
    assert ex["bound"].max() > 0 and ex["ws"].abs().max() <= 2 ** DET_QUANTUM_BITS * (1 + 2 ** -7)
    # the quanta are powers of two, at most 2^-30 of the next power of two above the bound
    assert torch.equal(torch.frexp(ex["q"]).mantissa, torch.full_like(ex["q"], 0.5))
    fast = _run(lib, prob, target=True, packed=packed, keys64=True)
    assert fast[0] == 0 and fast[5] == 0 and not fast[6], fast[7]
    assert torch.equal(dq.view(torch.int16), fast[1].view(torch.int16))
    assert torch.allclose(dkv, fast[2], rtol=1e-4, atol=1e-5 * fast[2].abs().max().item())
    assert torch.allclose(tgt, fast[4], rtol=1e-5, atol=1e-7)
    print(case, errs)


@pytest.mark.parametrize("case", ["h100_k70_sink_launches", "h16_packed_7rows_sink_launches"])
def test_emulated_bwd64_deterministic_same_bits(lib, case):
    """The same bits for dq, dkv and the target under other interleavings of the threads (another
    emulator seed) and, unpacked, with the rows in another order (the emulator runs CTAs one at a
    time: the rows' launch order is the order of the different CTAs' adds)."""
    kw, packed, launch_ctas = DET64[case]
    prob = _problem(**kw)
    ref = _run_det64(lib, prob, target=True, packed=packed, launch_ctas=launch_ctas)
    assert ref[0] == 0 and ref[5] == 0 and not ref[6], ref[7]
    runs = [(None, _run_det64(lib, prob, seed=7, target=True, packed=packed, launch_ctas=launch_ctas))]
    if not packed:  # (packed: the row order makes the groups, so it is part of the problem)
        perm = torch.tensor([2, 0, 1])
        prob_p = Problem(prob.q[perm], prob.kv, prob.idx[perm].contiguous(), prob.topk_len[perm], prob.sink,
                         prob.dout[perm])
        runs.append((perm, _run_det64(lib, prob_p, seed=5, target=True, packed=packed, launch_ctas=launch_ctas)))
    for perm, run in runs:
        assert run[0] == 0 and run[5] == 0 and not run[6], run[7]
        dq, tgt = ref[1], ref[4]
        if perm is not None:
            dq, tgt = dq[perm], tgt[perm]
        assert torch.equal(run[1].view(torch.int16), dq.view(torch.int16))
        assert torch.equal(run[2].view(torch.int32), ref[2].view(torch.int32))
        assert torch.equal(run[4].view(torch.int32), tgt.view(torch.int32))
