"""Row packing for the <= 32-head backward (``megatron_dsa/kernels/sparse_mla/packing.py``).

CPU: the packing is a lossless re-indexing (every valid (row, slot) is exactly one (entry, row)
pair, duplicates and empty slots included), its entries are each group's sorted union, it has
no host synchronization, and the backward computed the way the packed kernel computes it (per
group over the union, rows masked by their slots) equals float64 autograd through the reference:
dq, dkv and the indexer-loss target, sink included.
"""

from __future__ import annotations

import pytest
import torch

from megatron_dsa.graph import SyncAudit
from megatron_dsa.kernels.sparse_mla.packing import (heads_padded, pack_rows, pack_rows_reference,
                                                     pack_rows_triton, unpack)
from megatron_dsa.kernels.sparse_mla.reference import slot_validity, sparse_mla_reference

from helpers import assert_compiles_without_spills, poisoned_empty, rel


def _ids(T, K, Tk, seed, holes=0.2, dups=True, int64=False):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, Tk, (T, K), generator=g)
    # adjacent rows share keys, as real selections do
    idx[1::2, : K // 2] = idx[0:T - 1:2, : K // 2]
    idx[torch.rand(T, K, generator=g) < holes] = -1
    idx[torch.rand(T, K, generator=g) < 0.02] = Tk + 3       # out of range: empty
    if dups and T > 3 and K > 3:
        idx[3, 1] = idx[3, 0] = 5                             # a duplicate id in one row
        idx[2, 2] = 5
        idx[3, 2] = 5                                         # three copies
    if T > 5:
        idx[5] = -1                                           # an empty row
    return idx if int64 else idx.int()


@pytest.mark.parametrize("H", [1, 7, 16, 17, 32])
@pytest.mark.parametrize("T,K", [(1, 5), (37, 16), (64, 33)])
@pytest.mark.parametrize("with_len", [False, True])
def test_packing_is_a_lossless_reindexing(H, T, K, with_len):
    Tk = 50
    idx = _ids(T, K, Tk, seed=T * 100 + K + H, int64=H == 7)
    tk = torch.randint(0, K + 2, (T,), generator=torch.Generator().manual_seed(H)) if with_len else None
    p = pack_rows_reference(idx, Tk, H, tk)
    R = 64 // heads_padded(H)
    G = (T + R - 1) // R
    assert p.rows == R and p.uid.shape == (G, R * K) and p.uslot.shape == (G, R, R * K)
    assert p.uid.dtype == torch.int32 and p.uslot.dtype == torch.int16 and p.count.dtype == torch.int32
    valid = slot_validity(idx, Tk, tk)
    want = torch.where(valid, idx.long(), -1)
    assert torch.equal(unpack(p, T, K), want)
    # every valid (row, slot) is claimed by exactly one (entry, row)
    hits = torch.zeros(G * R, K, dtype=torch.long)
    g, j, e = torch.nonzero(p.uslot >= 0, as_tuple=True)
    hits.index_put_((g * R + j, p.uslot[g, j, e].long()), torch.ones_like(g), accumulate=True)
    assert torch.equal(hits[:T], valid.long()) and hits[T:].sum() == 0
    for gg in range(G):
        n = int(p.count[gg])
        # entries: the union (one per distinct id, in id order), then one per repeated occurrence
        # within a row, in slot order
        repeats = []
        firsts = set()
        for r in range(gg * R, min(T, gg * R + R)):
            seen = set()
            for s in range(K):
                if valid[r, s]:
                    x = int(idx[r, s])
                    if x in seen:
                        repeats.append(x)
                    seen.add(x)
            firsts |= seen
        assert n == len(firsts) + len(repeats)
        assert p.uid[gg, :n].tolist() == sorted(firsts) + repeats
        assert (p.uid[gg, n:] == -1).all() and (p.uslot[gg, :, n:] == -1).all()
        assert ((p.uslot[gg, :, :n] >= 0).sum(0) >= 1).all()  # no entry without a row


@pytest.mark.parametrize("H,T,K,Tk,with_len,strided", [(7, 37, 16, 50, True, False), (32, 64, 33, 70, True, True),
                                                       (17, 5, 20, 33, False, False), (16, 64, 33, 64, False, True)])
def test_triton_packing_equals_the_reference(H, T, K, Tk, with_len, strided):
    """The bitmap kernel (here through Triton's interpreter) against the torch ops: without
    repeated ids the same tensors, element for element; with them the same union, the same
    count and the same (row, slot) -> id map (which repeated slot shares the union entry may
    differ)."""
    for dups in (False, True):
        idx = _ids(T, K, Tk, seed=T + K + H, int64=H == 17, dups=dups)
        if not dups:  # no id twice in a row
            idx = torch.stack([torch.where(_first_in_row(r), r, -1) for r in idx])
        if strided:
            idx = torch.cat([idx, idx], 1)[:, ::2]   # column stride 2
        tk = torch.randint(0, K + 2, (T,), generator=torch.Generator().manual_seed(H)) if with_len else None
        a, b = pack_rows_triton(idx, Tk, H, tk), pack_rows_reference(idx, Tk, H, tk)
        _assert_same_packing(a, b, T, K, exact=not dups)


def _assert_same_packing(a, b, T, K, exact):
    """``a`` and ``b`` pack the same slots: element for element when ``exact``; else the same
    count, the same (row, slot) -> id map and the same entries up to which repeated slot of a row
    shares the union entry."""
    assert (a.rows, a.hpad) == (b.rows, b.hpad)
    for name in ("uid", "uslot", "count"):
        assert getattr(a, name).dtype == getattr(b, name).dtype
    assert torch.equal(a.count, b.count)
    assert torch.equal(unpack(a, T, K), unpack(b, T, K))
    if exact:
        for name in ("uid", "uslot"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name
    else:
        ua, ub = a.uid.sort(1).values, b.uid.sort(1).values
        assert torch.equal(ua, ub)


def _first_in_row(r):
    """True at each id's first slot in the row (later copies False)."""
    seen, keep = set(), []
    for x in r.tolist():
        keep.append(x not in seen or x < 0)
        seen.add(x)
    return torch.tensor(keep)


@pytest.fixture(scope="module")
def pack_emu(tmp_path_factory):
    """The CUDA packing kernel's own source (``cuda/pack_rows.cuh``) built for the CPU through
    ``cuda_emu/simt.h``: ``emu_pack_rows(..., stage)`` runs either variant."""
    import ctypes
    import os
    import sys

    emu_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cuda_emu")
    sys.path.insert(0, emu_dir)
    try:
        from emu_lib import KERNEL_DIR, build_simt
    finally:
        sys.path.pop(0)
    fn = build_simt(tmp_path_factory, "pack_emu.so", ["pack_emu.cpp"], KERNEL_DIR, opt="-O1").emu_pack_rows
    vp, ll, i32 = ctypes.c_void_p, ctypes.c_longlong, ctypes.c_int
    fn.argtypes = [vp, ll, vp, i32, i32, i32, i32, vp, vp, vp, i32]
    fn.restype = ctypes.c_int
    return fn


def _emu_pack(fn, idx, Tk, H, lens, stage):
    """``packing.pack_rows`` by the emulated CUDA kernel (outputs poisoned first: each element
    must be written)."""
    from megatron_dsa.kernels.sparse_mla.packing import PackedRows

    T, K = idx.shape
    hpad = heads_padded(H)
    R = 64 // hpad
    G = (T + R - 1) // R
    uid = torch.full((G, R * K), -7, dtype=torch.int32)
    uslot = torch.full((G, R, R * K), -7, dtype=torch.int16)
    count = torch.full((G,), -7, dtype=torch.int32)
    ln = lens.int().contiguous() if lens is not None else None
    assert idx.dtype == torch.int32 and idx.stride(1) == 1
    err = fn(idx.data_ptr(), idx.stride(0), ln.data_ptr() if ln is not None else None, T, K, Tk, R,
             uid.data_ptr(), uslot.data_ptr(), count.data_ptr(), int(stage))
    assert err == 0, err
    return PackedRows(uid, uslot, count, R, hpad)


@pytest.mark.parametrize("stage", [True, False])
@pytest.mark.parametrize("H,T,K,Tk,with_len,wide", [(16, 13, 24, 50, True, False), (32, 9, 33, 70, False, True),
                                                    (7, 16, 40, 1000, True, False)])
def test_cuda_packing_kernel_on_the_cpu_equals_the_reference(pack_emu, stage, H, T, K, Tk, with_len, wide):
    """The CUDA packing kernel (both variants: uid / uslot staged in shared memory and written out
    once, or scattered in place) run by the SIMT stand-in: without repeated ids the reference's
    tensors element for element, with them the same union, count and (row, slot) -> id map; a
    partial last group, an empty row, ids past the keys, lengths, a row stride past K."""
    for dups in (False, True):
        idx = _ids(T, K, Tk, seed=T + K + H, dups=dups)
        if not dups:
            idx = torch.stack([torch.where(_first_in_row(r), r, -1) for r in idx])
        if wide:
            idx = torch.cat([idx, idx], 1)[:, :K]    # row stride 2 K
        tk = torch.randint(0, K + 2, (T,), generator=torch.Generator().manual_seed(H)) if with_len else None
        got = _emu_pack(pack_emu, idx, Tk, H, tk, stage)
        _assert_same_packing(got, pack_rows_reference(idx, Tk, H, tk), T, K, exact=not dups)


def test_pack_rows_takes_the_kernel_under_triton(monkeypatch):
    import megatron_dsa.kernels.sparse_mla.packing as packing
    import megatron_dsa.kernels.triton_common as tc

    calls = []
    monkeypatch.setattr(packing, "pack_rows_triton", lambda *a, **k: calls.append("triton"))
    monkeypatch.setattr(packing, "pack_rows_reference", lambda *a, **k: calls.append("reference"))
    idx = torch.zeros(8, 4096, dtype=torch.int32)
    packing.pack_rows(idx, 10, 16)                      # Triton's interpreter (the tests) or CUDA
    monkeypatch.setattr(tc, "interpreting", lambda: False)
    packing.pack_rows(idx, 10, 16)                      # CPU tensors without the interpreter
    assert calls == ["triton", "reference"]


def test_union_is_smaller_when_rows_share_keys():
    T, K, Tk = 64, 32, 1000
    same = torch.arange(K).repeat(T, 1)
    assert pack_rows_reference(same, Tk, 16).count.tolist() == [K] * 16
    disjoint = torch.arange(T * K).view(T, K) % Tk
    assert pack_rows_reference(disjoint, Tk, 16).count.tolist() == [4 * K] * 16
    assert pack_rows_reference(disjoint, Tk, 32).count.tolist() == [2 * K] * 32


def test_packing_errors_name_the_argument():
    idx = torch.zeros(4, 8, dtype=torch.int32)
    with pytest.raises(ValueError, match="heads"):
        pack_rows(idx, 10, 33)
    with pytest.raises(ValueError, match="heads"):
        pack_rows(idx, 10, 0)
    with pytest.raises(ValueError, match="indices"):
        pack_rows(idx[0], 10, 16)


def test_packing_has_no_host_sync():
    idx = _ids(40, 24, 60, seed=3)
    tk = torch.full((40,), 20)
    for fn in (pack_rows_reference, pack_rows_triton):
        with SyncAudit() as audit:
            fn(idx, 60, 16, tk)
        assert audit.violations == [], (fn.__name__, audit.violations)


def _packed_backward(q, kv, packed, scale, lse, sink, out, dout):
    """The backward as the packed CUDA kernel computes it, in float64: per group, the union's
    entries in blocks, the group's rows x heads as one tile, a row masked where its uslot is -1;
    stats (logZ with the sink, Delta) as the stats kernel forms them."""
    T, H, D = q.shape
    uid, uslot, count, R, hpad = packed
    logz = lse if sink is None else torch.logaddexp(lse, sink[None, :])
    delta = (dout * out).sum(-1)
    fh = torch.exp(logz - lse) if sink is not None else torch.ones_like(lse)  # target without the sink
    dq = torch.zeros_like(q)
    dkv = torch.zeros_like(kv)
    target = torch.zeros(T, uslot.shape[2] // R, dtype=q.dtype)
    for g in range(uid.shape[0]):
        rows = [g * R + j for j in range(R) if g * R + j < T]
        n = int(count[g])
        for e0 in range(0, n, 32):                       # blocks of 32 entries, as the kernel
            e1 = min(n, e0 + 32)
            keys = kv[uid[g, e0:e1].long()]              # [E, D]
            for j, t in enumerate(rows):
                sl = uslot[g, j, e0:e1].long()
                m = (sl >= 0).to(q.dtype)                # this row's mask over the block
                if not torch.isfinite(logz[t]).all():
                    continue
                s = q[t] @ keys.T * scale                # [H, E]
                p = torch.exp(s - logz[t][:, None]) * m[None, :]
                dp = dout[t] @ keys[:, :512].T
                ds = p * (dp - delta[t][:, None]) * scale
                dq[t] += ds @ keys
                contrib = ds.T @ q[t]                    # [E, D]
                contrib[:, :512] += p.T @ dout[t]
                dkv.index_add_(0, uid[g, e0:e1].long(), contrib)
                hs = (p * fh[t][:, None]).sum(0)
                ok = sl >= 0
                target[t, sl[ok]] += hs[ok]
    return dq, dkv, target


@pytest.mark.parametrize("H,sink,with_len", [(16, False, False), (7, True, True), (32, True, False), (20, False, True)])
def test_packed_backward_equals_float64_autograd(H, sink, with_len):
    T, K, Tk = 13, 24, 40
    g = torch.Generator().manual_seed(H)
    q = torch.randn(T, H, 576, generator=g, dtype=torch.float64)
    kv = torch.randn(Tk, 576, generator=g, dtype=torch.float64)
    idx = _ids(T, K, Tk, seed=H)
    tk = torch.randint(0, K + 1, (T,), generator=g) if with_len else None
    sk = torch.randn(H, generator=g, dtype=torch.float64) if sink else None
    dout = torch.randn(T, H, 512, generator=g, dtype=torch.float64)
    scale = 576 ** -0.5
    qr, kvr = q.clone().requires_grad_(), kv.clone().requires_grad_()
    out, lse = sparse_mla_reference(qr, kvr, idx, scale, 512, tk, sk)
    out.backward(dout)
    packed = pack_rows_reference(idx, Tk, H, tk)
    dq, dkv, target = _packed_backward(q, kv, packed, scale, lse.detach(), sk, out.detach(), dout)
    assert rel(dq, qr.grad) < 1e-12 and rel(dkv, kvr.grad) < 1e-12
    valid = slot_validity(idx, Tk, tk)
    s = torch.einsum("thd,tkd->thk", q, kv[idx.clamp(0, Tk - 1).long()]) * scale
    p = torch.exp(s - lse.detach()[:, :, None]).masked_fill(~valid[:, None, :], 0.0)
    p = torch.where(torch.isfinite(lse.detach())[:, :, None], p, 0.0)
    assert rel(target, p.sum(1)) < 1e-12


@pytest.mark.parametrize("H,T,K,sink,with_len", [(16, 13, 24, True, True), (7, 9, 40, False, False),
                                                   (20, 7, 24, True, False), (32, 6, 16, False, True)])
def test_triton_packed_backward_equals_float64(H, T, K, sink, with_len):
    """The row-packed Triton backward (through Triton's interpreter), taken by
    ``sparse_mla(backend="triton", row_packing=True)``: dq, dkv and d_sink against float64
    autograd, and its indexer-loss target against the unpacked pass's; rows share keys, one row
    repeats an id, the last group is partial."""
    from megatron_dsa.kernels.sparse_mla import select_backend, sparse_mla
    from megatron_dsa.kernels.sparse_mla.triton_impl import sparse_mla_bwd_triton, sparse_mla_fwd_triton

    Dqk, d_v, Tk = 80, 64, 30
    g = torch.Generator().manual_seed(H * 100 + T)
    q = torch.randn(T, H, Dqk, generator=g)
    kv = torch.randn(Tk, Dqk, generator=g)
    idx = _ids(T, K, Tk, seed=H + T)
    tk = torch.randint(0, K + 1, (T,), generator=g) if with_len else None
    sk = torch.randn(H, generator=g) if sink else None
    dout = torch.randn(T, H, d_v, generator=g)
    assert select_backend("triton", q.device, q.dtype, H, Dqk, d_v, row_packing=True).backward == "triton-packed"
    qa, kva = q.clone().requires_grad_(), kv.clone().requires_grad_()
    sa = sk.clone().requires_grad_() if sink else None
    with poisoned_empty():
        out, _ = sparse_mla(qa, kva, idx, 0.1, d_v, tk, sa, backend="triton", row_packing=True)
        out.backward(dout)
    qr, kvr = q.double().requires_grad_(), kv.double().requires_grad_()
    sr = sk.double().requires_grad_() if sink else None
    ro, _ = sparse_mla_reference(qr, kvr, idx, 0.1, d_v, tk, sr)
    ro.backward(dout.double())
    assert rel(qa.grad.double(), qr.grad) < 1e-5 and rel(kva.grad.double(), kvr.grad) < 1e-5
    if sink:
        assert rel(sa.grad.double(), sr.grad) < 1e-5
    o, lse = sparse_mla_fwd_triton(q, kv, idx, 0.1, d_v, tk, sk)
    t_packed = torch.zeros(idx.shape)
    t_plain = torch.zeros(idx.shape)
    sparse_mla_bwd_triton(q, kv, idx, 0.1, d_v, tk, sk, o, lse, dout, target_out=t_packed, packed=True)
    sparse_mla_bwd_triton(q, kv, idx, 0.1, d_v, tk, sk, o, lse, dout, target_out=t_plain)
    assert rel(t_packed.double(), t_plain.double()) < 1e-5 and t_plain.abs().sum() > 0


@pytest.mark.gpu
@pytest.mark.row_packing
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("H", [16, 32])
def test_gpu_triton_packing_equals_the_reference(H):
    """The compiled packing kernel at the real k (8192 / 4096 slots per group) on causal ids."""
    from helpers import causal_indices

    T, K = 4096, 2048
    idx = causal_indices(T, K, "cuda")
    tk = torch.randint(0, K + 1, (T,), device="cuda")
    for lens in (None, tk):
        _assert_same_packing(pack_rows_triton(idx, T, H, lens), pack_rows_reference(idx, T, H, lens), T, K, True)
    idx[1::2, :512] = idx[0::2, :512]               # rows sharing keys (and a few repeated ids)
    _assert_same_packing(pack_rows_triton(idx, T, H, tk), pack_rows_reference(idx, T, H, tk), T, K, False)
    assert torch.equal(pack_rows(idx, T, H).count, pack_rows_reference(idx, T, H).count)


def test_cuda_packing_kernel_compiles_for_sm90a_without_spills(tmp_path):
    from megatron_dsa.kernels.cuda_build import find_nvcc
    from megatron_dsa.kernels.sparse_mla import cuda_impl

    if find_nvcc() is None:
        pytest.skip("needs nvcc")
    src = next(s for s in cuda_impl.SOURCES if s.name == "pack_rows.cu")
    assert_compiles_without_spills(src, tmp_path, "pack_rows_kernel")


@pytest.mark.gpu
@pytest.mark.row_packing
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("H", [7, 16, 32])
def test_gpu_cuda_packing_equals_the_reference(H):
    """The CUDA packing kernel (bitmaps in shared memory), the one the CUDA kernels use: causal
    ids at the real k, lengths, a partial last group, rows sharing keys with repeated ids, a
    strided view, ids past the keys, and the fallback to Triton past its shared memory."""
    from helpers import causal_indices
    from megatron_dsa.kernels.sparse_mla import cuda_impl

    if cuda_impl.library_error() is not None:
        pytest.skip(cuda_impl.library_error())
    T, K = 4096 + 3, 2048
    idx = causal_indices(T, K, "cuda")
    tk = torch.randint(0, K + 1, (T,), device="cuda")
    for lens in (None, tk):
        _assert_same_packing(cuda_impl.pack_rows_cuda(idx, T, H, lens), pack_rows_reference(idx, T, H, lens), T, K,
                             True)
    wide = torch.cat([idx, idx], 1)[:, :K]           # row stride 2 K
    wide[::7, 5] = T + 11                            # out of range: empty
    _assert_same_packing(cuda_impl.pack_rows_cuda(wide, T, H), pack_rows_reference(wide, T, H), T, K, True)
    idx[1::2, :512] = idx[0:T - 1:2, :512]           # rows sharing keys
    idx[::5, 7] = idx[::5, 3]                        # repeated ids (or both -1)
    _assert_same_packing(cuda_impl.pack_rows_cuda(idx, T, H, tk), pack_rows_reference(idx, T, H, tk), T, K, False)
    # 100K keys: bitmaps past 48 KB (dynamic shared memory opted in; S = 128K at <= 32 heads needs
    # this), uid / uslot still staged beside them
    many = 100_000
    far = torch.rand(64, 64, device="cuda").argsort(1).int() + (many - 64)  # distinct ids near the end
    _assert_same_packing(cuda_impl.pack_rows_cuda(far, many, H), pack_rows_reference(far, many, H), 64, 64, True)
    # 200K keys at the real k: at <= 16 heads (R = 4) bitmaps and staged outputs together exceed
    # shared memory, so the kernel writes uid / uslot in place (at 32 heads, R = 2, they fit)
    wide_keys = 200_000
    far = torch.rand(64, wide_keys - K, device="cuda").argsort(1)[:, :K].int() + K
    _assert_same_packing(cuda_impl.pack_rows_cuda(far, wide_keys, H), pack_rows_reference(far, wide_keys, H), 64, K,
                         True)
    huge = 1 << 22                                   # bitmaps past shared memory: the Triton kernel
    small = causal_indices(64, 16, "cuda")
    _assert_same_packing(cuda_impl.pack_rows_cuda(small, huge, H), pack_rows_reference(small, huge, H), 64, 16, True)


def test_layer_with_row_packing_on_triton_equals_unpacked(mcore, monkeypatch):
    """A DSA layer (sparse indexer loss on, its target from the attention backward) on the Triton
    backend: attention_row_packing=True gives the unpacked layer's output and gradients."""
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.spec_utils import build_module

    from helpers import tiny_config
    from megatron_dsa.config import set_plugin_config
    from megatron_dsa.kernels.sparse_mla import ops
    from megatron_dsa.spec import get_dsa_layer_specs

    calls = []
    real = ops.sparse_mla_bwd_triton
    monkeypatch.setattr(ops, "sparse_mla_bwd_triton",
                        lambda *a, **k: (calls.append((k.get("packed"), k.get("target_out") is not None)),
                                         real(*a, **k))[1])
    results = []
    for packing in (False, True):
        torch.manual_seed(0)
        cfg = set_plugin_config(tiny_config(num_layers=1, dsa_indexer_use_sparse_loss=True),
                                attention_backend="triton", loss_backend="triton", attention_row_packing=packing)
        layer = build_module(get_dsa_layer_specs(cfg)[0], config=cfg, layer_number=1)
        core = layer.self_attention.core_attention.train()
        torch.manual_seed(1)
        s, b, d = 20, 2, cfg.kv_lora_rank + cfg.qk_pos_emb_head_dim
        inp = dict(query=torch.randn(s, b, cfg.num_attention_heads, d, requires_grad=True),
                   key=torch.randn(s, b, 1, d, requires_grad=True), value=None, attention_mask=None,
                   x=torch.randn(s, b, cfg.hidden_size), qr=torch.randn(s, b, cfg.q_lora_rank),
                   up_v_weight=torch.randn(cfg.num_attention_heads, cfg.v_head_dim, cfg.kv_lora_rank))
        out = core(**inp, attn_mask_type=AttnMaskType.causal)
        out.square().sum().backward()
        results.append((out.detach(), inp["query"].grad, inp["key"].grad, core.indexer.linear_wq_b.weight.grad))
    assert calls == [(False, True), (True, True)]  # the target came from the attention backward both times
    for a, b in zip(*results):
        assert rel(a.double(), b.double()) < 1e-5


@pytest.mark.parametrize("T,K,heads", [(131072, 2048, 16), (131072, 2048, 32), (262144, 2048, 7), (16384, 2048, 16),
                                       (5, 3000, 1), (1 << 20, 8192, 32)])
def test_packed_backward_chunks_are_whole_groups_within_the_budget(T, K, heads):
    """The row-packed backward's launches: whole groups of R rows whose packing fits
    PACK_CHUNK_BYTES (at least one group), or all T rows at once when they fit."""
    from megatron_dsa.kernels.sparse_mla.cuda_impl import PACK_CHUNK_BYTES, packed_chunk_rows

    R = 64 // heads_padded(heads)
    rows = packed_chunk_rows(T, K, heads)
    per_row = K * (4 + 2 * R)
    if T * per_row <= PACK_CHUNK_BYTES:
        assert rows == T
    else:
        assert rows % R == 0 and rows < T
        assert rows * per_row <= PACK_CHUNK_BYTES or rows == R
        assert (rows + R) * per_row > PACK_CHUNK_BYTES  # as many groups as fit
    assert packed_chunk_rows(T, K, heads, budget=1) == min(T, R)
