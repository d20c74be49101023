"""Inputs, launch and float64 check shared by the emulated sparse MLA forwards (the ping-pong
and the 16-head kernel take the same C arguments: ``cuda_impl.sparse_mla_fwd_cuda``)."""

import ctypes

import torch

from emu_lib import messages

from megatron_dsa.kernels.sparse_mla.cuda_impl import effective_lengths_torch
from megatron_dsa.kernels.sparse_mla.reference import sparse_mla_reference

LOG2E = 1.4426950408889634
D_QK, D_V = 576, 512
_vp, _ll, _i32, _f32 = ctypes.c_void_p, ctypes.c_longlong, ctypes.c_int, ctypes.c_float
FWD_ARGTYPES = [_vp] * 7 + [_ll] * 6 + [_i32] * 4 + [_f32, _vp]


def declare_fwd(lib, entry):
    """Give ``lib.<entry>`` the forward's C signature."""
    fn = getattr(lib, entry)
    fn.restype = _i32
    fn.argtypes = FWD_ARGTYPES
    return lib


def fwd_problem(T, H, K, Tk=300, sink=False, seed=0, empty_rows=()):
    """(q, kv, idx, topk_len, sink): -1 padding and a hole in row 0, an id past the keys, a
    partial last block in row 1 (topk_len), rows of ``empty_rows`` without a valid key."""
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
    for r in empty_rows:
        idx[r] = -1                           # no valid key: out = 0, lse = -inf
    sink_t = torch.randn(H, generator=g) if sink else None
    return q, kv, idx, topk_len, sink_t


def run_fwd(lib, entry, prob, seed=0):
    """The launcher's call of ``entry`` on NaN-poisoned outputs, with slowdown ``seed``:
    (rc, out, lse, hazards, aborted, messages)."""
    q, kv, idx, topk_len, sink = prob
    T, H, _ = q.shape
    kv_len = effective_lengths_torch(idx, topk_len)  # what the library's launcher passes
    out = torch.full((T, H, D_V), float("nan"), dtype=torch.bfloat16)
    lse = torch.full((T, H), float("nan"))
    lib.emu_reset(seed, 60.0)
    rc = getattr(lib, entry)(
        q.data_ptr(), kv.data_ptr(), idx.data_ptr(), kv_len.data_ptr(),
        sink.data_ptr() if sink is not None else None, out.data_ptr(), lse.data_ptr(),
        q.stride(0), q.stride(1), kv.stride(0), idx.stride(0), out.stride(0), out.stride(1),
        T, H, kv.shape[0], idx.shape[1], D_QK ** -0.5 * LOG2E, None)
    return rc, out, lse, lib.emu_hazards(), bool(lib.emu_aborted()), messages(lib)


def check_fwd_against_reference(prob, out, lse):
    """out / lse against float64: max |err| <= 1e-2 max |ref|, mean <= 4e-3 mean |ref|,
    |d lse| <= 1e-4, the same rows infinite."""
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
