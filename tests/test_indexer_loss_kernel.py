"""Fused Triton indexer KL loss (``indexer_loss/triton_impl.py``: sparse, dense warm-up, and the
target from the attention backward) vs the reference.

CPU: Triton's interpreter at small shapes on fp32 inputs against the fp64 reference (the
interpreter mis-computes bf16 dots). GPU (``-m gpu``): real shapes in bf16 vs the fp32
reference. Inputs are fresh random draws every run (conftest seeds randomly).
"""

import functools

import pytest
import torch

from megatron_dsa.kernels.indexer.reference import causal_window, packed_causal_window
from megatron_dsa.kernels.indexer_loss import indexer_loss
from megatron_dsa.kernels.indexer_loss.reference import indexer_loss_reference

fused_loss = functools.partial(indexer_loss, backend="triton")

HAS_CUDA = torch.cuda.is_available()
DEV = "cuda" if HAS_CUDA else "cpu"


def _rand_ids(B, T, S, K, starts, ends, pad_frac=0.2, device=DEV):
    """Duplicate-free ids per row: random keys of the window, some out of window, -1 padding."""
    ids = torch.full((B, T, K), -1, dtype=torch.int32)
    for b in range(B):
        for t in range(T):
            perm = torch.randperm(S)[:K]
            n = int(K * (1 - pad_frac * torch.rand(()).item()))
            ids[b, t, :n] = perm[:n].to(torch.int32)
            ids[b, t] = ids[b, t][torch.randperm(K)]
    return ids.to(device)


def _window(kind, B, T, S):
    if kind == "causal":
        return causal_window(B, T, S, device=DEV)
    cuts = sorted({0, T} | {int(x) for x in torch.randint(1, T, (3,))})
    st, en = packed_causal_window(torch.tensor(cuts, device=DEV))
    return st.reshape(1, T).expand(B, T).contiguous(), en.reshape(1, T).expand(B, T).contiguous()


def _run(fn, q, k, w, query, key, scale, coeff, idx, st, en, relu, rv, per_token, **kw):
    qq, kk, ww = (x.detach().clone().requires_grad_() for x in (q, k, w))
    loss = fn(qq, kk, ww, query, key, scale, coeff, idx, True, st, en, relu, rv, per_token,
              None, **kw)
    loss.backward()
    return [loss.detach().double(), qq.grad.double(), kk.grad.double(), ww.grad.double()]


def _check(a, b, tol):
    for name, x, y in zip(("loss", "dq", "dk", "dw"), a, b):
        assert torch.isfinite(x).all(), name
        rel = ((x - y).norm() / y.norm().clamp_min(1e-30)).item()
        assert rel < tol, (name, rel)


@pytest.mark.parametrize("kind", ["causal", "packed"])
@pytest.mark.parametrize("relu,per_token,with_rv", [(True, False, True), (False, True, False)])
@pytest.mark.parametrize("use_lse", [False, True])
def test_fused_sparse_loss_matches_reference(kind, relu, per_token, with_rv, use_lse):
    B, T, H, D, Hq, Dq, K = 2, 23, 4, 16, 3, 40, 12
    q = torch.randn(B, T, H, D, device=DEV)
    k = torch.randn(B, T, D, device=DEV)
    w = torch.randn(B, T, H, device=DEV)
    query = torch.randn(B, T, Hq, Dq, device=DEV)
    key = torch.randn(B, T, Dq, device=DEV)
    st, en = _window(kind, B, T, T)
    idx = _rand_ids(B, T, T, K, st, en)
    rv = (torch.rand(B, T, device=DEV) > 0.2) if with_rv else None
    ref = _run(indexer_loss_reference, *(x.double() for x in (q, k, w, query, key)), 0.3, 0.7,
               idx, st, en, relu, rv, per_token)
    kw = {}
    if use_lse:  # the attention's log-sum-exp over the same support (as sparse_mla returns it)
        lg = torch.einsum("bthd,bsd->bths", query.double(), key.double()) * 0.3
        sel = idx.long().clamp_min(0)
        ok = (idx >= 0) & (idx >= st.unsqueeze(-1)) & (idx < en.unsqueeze(-1))
        g = torch.gather(lg, 3, sel.unsqueeze(2).expand(B, T, Hq, K))
        g = g.masked_fill(~ok.unsqueeze(2), float("-inf"))
        kw["attn_lse"] = torch.logsumexp(g, -1).float()
    ours = _run(fused_loss, q, k, w, query, key, 0.3, 0.7, idx, st, en, relu, rv,
                per_token, **kw)
    _check(ours, ref, 1e-4)


@pytest.mark.parametrize("att_bh", [128, 16])
def test_fused_sparse_loss_empty_rows_and_odd_dims(monkeypatch, att_bh):
    """Rows with no valid slot, odd head counts / dims (masked tiles), K not a power of two;
    att_bh=16 splits the 20 attention heads over two programs (atomic head-sum path)."""
    from megatron_dsa.kernels.indexer_loss import triton_impl

    monkeypatch.setitem(triton_impl._CFG, "att_bh", att_bh)
    B, T, H, D, Hq, Dq, K = 1, 19, 3, 20, 20, 70, 7
    q = torch.randn(B, T, H, D, device=DEV)
    k = torch.randn(B, T, D, device=DEV)
    w = torch.randn(B, T, H, device=DEV)
    query = torch.randn(B, T, Hq, Dq, device=DEV)
    key = torch.randn(B, T, Dq, device=DEV)
    st, en = causal_window(B, T, T, device=DEV)
    idx = _rand_ids(B, T, T, K, st, en)
    idx[0, 3] = -1
    idx[0, 7, :] = T - 1  # only out-of-window ids (row 7 sees keys [0, 8))
    idx[0, 7, 1:] = -1
    ref = _run(indexer_loss_reference, *(x.double() for x in (q, k, w, query, key)), 0.5, 1.0,
               idx, st, en, True, None, False)
    ours = _run(fused_loss, q, k, w, query, key, 0.5, 1.0, idx, st, en, True, None,
                False)
    _check(ours, ref, 1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("S,Hq,use_lse", [(2048, 128, False), (4096, 128, True), (3000, 16, False)])
def test_gpu_fused_sparse_loss_bf16_real_shapes(S, Hq, use_lse):
    from megatron_dsa.kernels.indexer.triton_impl import indexer_topk_triton
    from megatron_dsa.kernels.sparse_mla.triton_impl import sparse_mla_fwd_triton

    B, H, D, Dq, K = 1, 64, 128, 576, 2048
    q = torch.randn(B, S, H, D, device="cuda").bfloat16()
    k = torch.randn(B, S, D, device="cuda").bfloat16()
    w = torch.randn(B, S, H, device="cuda")
    query = torch.randn(B, S, Hq, Dq, device="cuda").bfloat16()
    key = torch.randn(B, S, Dq, device="cuda").bfloat16()
    idx, _ = indexer_topk_triton(q, k, w, K)
    kw = {}
    if use_lse:
        _, lse = sparse_mla_fwd_triton(query[0], key[0], idx[0], Dq**-0.5, 512)
        kw["attn_lse"] = lse.view(B, S, Hq)
    ours = _run(fused_loss, q, k, w, query, key, Dq**-0.5, 1.0, idx, None, None, True,
                None, False, **kw)
    ref = _run(indexer_loss_reference, q.float(), k.float(), w, query.float(), key.float(),
               Dq**-0.5, 1.0, idx, None, None, True, None, False)
    _check(ours, ref, 2e-2)


# ---------------------------------------------------------------------------------------------
# dense warm-up loss (every key of the window), fused and row-chunked
# ---------------------------------------------------------------------------------------------


def _dense(fn, q, k, w, query, key, scale, coeff, st, en, relu, rv, per_token, **kw):
    qq, kk, ww = (x.detach().clone().requires_grad_() for x in (q, k, w))
    loss = fn(qq, kk, ww, query, key, scale, coeff, None, False, st, en, relu, rv, per_token, None, **kw)
    loss.backward()
    return [loss.detach().double(), qq.grad.double(), kk.grad.double(), ww.grad.double()]


def _loss_inputs(B, T, S, H, D, Hq, Dq, device=DEV):
    """Random q [B, T, H, D], k [B, S, D], w [B, T, H], query [B, T, Hq, Dq], key [B, S, Dq]."""
    return (torch.randn(B, T, H, D, device=device), torch.randn(B, S, D, device=device),
            torch.randn(B, T, H, device=device), torch.randn(B, T, Hq, Dq, device=device),
            torch.randn(B, S, Dq, device=device))


@pytest.mark.parametrize("kind", ["default", "packed", "offset"])
@pytest.mark.parametrize("relu,per_token,with_rv", [(True, False, True), (False, True, False)])
@pytest.mark.parametrize("small", [False, True])
def test_fused_dense_loss_matches_reference(monkeypatch, kind, relu, per_token, with_rv, small):
    """Default causal windows (keys cut per chunk), packed documents, and query rows at an offset
    into a longer key sequence (as a CP rank's); one chunk with four rows per target program, or
    (``small``) chunks of a few rows, one row per target program, dk's rows split over several
    programs."""
    from megatron_dsa.kernels.indexer_loss import dispatch, triton_impl

    if small:
        monkeypatch.setattr(dispatch, "DENSE_CHUNK_BYTES", 2000)
        monkeypatch.setitem(triton_impl._CFG, "dk_rows", 2)
        monkeypatch.setitem(triton_impl._CFG, "att_dense_m", 16)  # one row per target program
    B, T, H, D, Hq, Dq = 2, 29, 4, 16, 3, 40
    S = T + 11 if kind == "offset" else T
    q, k, w, query, key = _loss_inputs(B, T, S, H, D, Hq, Dq)
    if kind == "default":
        st = en = None
    elif kind == "packed":
        st, en = _window("packed", B, T, T)
    else:  # rows are positions 11 .. 11 + T of the keys, causal
        en = (torch.arange(T, device=DEV) + 12).expand(B, T).contiguous()
        st = torch.zeros_like(en)
    rv = (torch.rand(B, T, device=DEV) > 0.2) if with_rv else None
    ref = _dense(indexer_loss_reference, *(x.double() for x in (q, k, w, query, key)), 0.3, 0.7, st, en, relu,
                 rv, per_token)
    ours = _dense(fused_loss, q, k, w, query, key, 0.3, 0.7, st, en, relu, rv, per_token)
    _check(ours, ref, 1e-4)


@pytest.mark.parametrize("att_bh", [128, 16])
def test_fused_dense_loss_empty_rows_odd_dims_and_no_grad(monkeypatch, att_bh):
    """Rows with an empty window, odd head counts / dims, 20 attention heads over two programs
    (att_bh=16: the atomic head sum); without an input that needs a gradient the value is the
    same and nothing is kept for a backward."""
    from megatron_dsa.kernels.indexer_loss import triton_impl

    monkeypatch.setitem(triton_impl._CFG, "att_bh", att_bh)
    B, T, H, D, Hq, Dq = 1, 21, 3, 20, 20, 70
    q, k, w, query, key = _loss_inputs(B, T, T, H, D, Hq, Dq)
    st, en = causal_window(B, T, T, device=DEV)
    st, en = st.clone(), en.clone()
    en[0, 4] = st[0, 4] = 0  # empty
    st[0, 9] = 9  # only itself
    ref = _dense(indexer_loss_reference, *(x.double() for x in (q, k, w, query, key)), 0.5, 1.0, st, en, True,
                 None, False)
    ours = _dense(fused_loss, q, k, w, query, key, 0.5, 1.0, st, en, True, None, False)
    _check(ours, ref, 1e-4)
    assert ours[1][0, 4].abs().max() == 0 and ours[3][0, 4].abs().max() == 0
    value = fused_loss(q, k, w, query, key, 0.5, 1.0, None, False, st, en)
    assert not value.requires_grad
    assert abs(value.item() - ours[0].item()) <= 1e-6 * abs(ours[0].item())


@pytest.mark.gpu
@pytest.mark.parametrize("S,Hq", [(2048, 128), (3000, 16)])
def test_gpu_fused_dense_loss_bf16_real_shapes(monkeypatch, S, Hq):
    """bf16 at real widths (64 x 128 indexer, 576-wide MLA rows) against the fp32 reference,
    with chunks of 1000 rows (the causal key cut per chunk)."""
    from megatron_dsa.kernels.indexer_loss import dispatch

    monkeypatch.setattr(dispatch, "DENSE_CHUNK_BYTES", 1000 * 8 * S)
    q, k, w, query, key = _loss_inputs(1, S, S, 64, 128, Hq, 576, "cuda")
    q, k, query, key = (x.bfloat16() for x in (q, k, query, key))
    Dq = 576
    ours = _dense(fused_loss, q, k, w, query, key, Dq**-0.5, 1.0, None, None, True, None, False)
    ref = _dense(indexer_loss_reference, q.float(), k.float(), w, query.float(), key.float(), Dq**-0.5, 1.0,
                 None, None, True, None, False)
    _check(ours, ref, 2e-2)


# ---------------------------------------------------------------------------------------------
# target from the attention backward (indexer_loss_from_attention + sparse_mla(loss_target=))
# ---------------------------------------------------------------------------------------------


def _from_attention(q, k, w, query, key, scale, coeff, idx, st, en, relu, rv, per_token, d_v,
                    sink=None, give_slot=True):
    """Ours: loss value (from on_value), dq, dk, dw, and the attention's dq / dkv."""
    from megatron_dsa.kernels.indexer_loss import indexer_loss_from_attention
    from megatron_dsa.kernels.sparse_mla import sparse_mla

    B, T, Hq, Dq = query.shape
    K = idx.shape[-1]
    qq, kk, ww = (x.detach().clone().requires_grad_() for x in (q, k, w))
    values = []
    loss, slot = indexer_loss_from_attention(qq, kk, ww, idx, coeff, st, en, relu, rv, per_token,
                                             on_value=values.append)
    qa = query.reshape(B * T, Hq, Dq).detach().clone().requires_grad_()
    kva = key.reshape(B * T, Dq).detach().clone().requires_grad_()
    offs = (torch.arange(B, device=idx.device, dtype=idx.dtype) * T).view(B, 1, 1)
    gid = torch.where(idx >= 0, idx + offs, idx).reshape(B * T, K)
    out, _ = sparse_mla(qa, kva, gid, scale, d_v=d_v, sink=sink, backend="triton",
                        loss_target=slot if give_slot else None)
    (out.float().square().sum() + loss).backward()
    assert len(values) == 1
    return [values[0].double(), qq.grad.double(), kk.grad.double(), ww.grad.double()], (qa.grad, kva.grad)


@pytest.mark.parametrize("kind", ["causal", "packed"])
@pytest.mark.parametrize("relu,per_token,with_rv,with_sink", [(True, False, True, False), (False, True, False, True)])
def test_loss_target_from_attention_backward(kind, relu, per_token, with_rv, with_sink):
    """The attention backward's head-summed P is the target: loss value and dq/dk/dw equal the
    fp64 reference; the attention's own gradients are unchanged by emitting it."""
    from megatron_dsa.kernels.sparse_mla import sparse_mla

    B, T, H, D, Hq, Dq, dv, K = 2, 23, 4, 16, 3, 80, 64, 12
    q = torch.randn(B, T, H, D, device=DEV)
    k = torch.randn(B, T, D, device=DEV)
    w = torch.randn(B, T, H, device=DEV)
    query = torch.randn(B, T, Hq, Dq, device=DEV)
    key = torch.randn(B, T, Dq, device=DEV)
    st, en = _window(kind, B, T, T)
    idx = _rand_ids(B, T, T, K, st, en)
    # the indexer only emits in-window ids: attention and loss then see the same support
    ok = (idx >= st.unsqueeze(-1)) & (idx < en.unsqueeze(-1))
    idx = torch.where(ok, idx, -1)
    idx[0, 5] = -1  # an empty row
    rv = (torch.rand(B, T, device=DEV) > 0.2) if with_rv else None
    sink = torch.randn(Hq, device=DEV) if with_sink else None
    ref = _run(indexer_loss_reference, *(x.double() for x in (q, k, w, query, key)), 0.3, 0.7,
               idx, st, en, relu, rv, per_token)
    ours, att_grads = _from_attention(q, k, w, query, key, 0.3, 0.7, idx, st, en, relu, rv,
                                      per_token, dv, sink)
    _check(ours, ref, 1e-4)
    # the same attention without the slot: identical attention gradients
    qa = query.reshape(B * T, Hq, Dq).detach().clone().requires_grad_()
    kva = key.reshape(B * T, Dq).detach().clone().requires_grad_()
    offs = (torch.arange(B, device=DEV, dtype=idx.dtype) * T).view(B, 1, 1)
    gid = torch.where(idx >= 0, idx + offs, idx).reshape(B * T, K)
    out, _ = sparse_mla(qa, kva, gid, 0.3, d_v=dv, sink=sink, backend="triton")
    out.float().square().sum().backward()
    assert torch.equal(att_grads[0], qa.grad) and torch.equal(att_grads[1], kva.grad)


def test_loss_target_missing_fails_closed():
    from megatron_dsa.kernels.indexer_loss import indexer_loss_from_attention
    from megatron_dsa.kernels.sparse_mla import sparse_mla

    B, T, H, D, K = 1, 9, 2, 16, 4
    q, k, w = (torch.randn(*s, device=DEV, requires_grad=True) for s in ((B, T, H, D), (B, T, D), (B, T, H)))
    idx = torch.zeros(B, T, K, dtype=torch.int32, device=DEV)
    loss, slot = indexer_loss_from_attention(q, k, w, idx, 1.0)
    with pytest.raises(RuntimeError, match="no target reached the loss"):
        loss.backward()
    # the reference attention cannot produce it: clear error up front
    qa, kva = torch.randn(T, 2, 80), torch.randn(T, 80)
    with pytest.raises(ValueError, match="loss_target cannot be served: the reference backward"):
        sparse_mla(qa, kva, idx[0], 0.1, d_v=64, backend="reference", loss_target=slot)


@pytest.mark.gpu
@pytest.mark.parametrize("S,Hq,with_sink", [(4096, 128, False), (3000, 16, True)])
def test_gpu_loss_target_from_attention_bf16(S, Hq, with_sink):
    from megatron_dsa.kernels.indexer.triton_impl import indexer_topk_triton

    B, H, D, Dq, K = 1, 64, 128, 576, 2048
    q = torch.randn(B, S, H, D, device="cuda").bfloat16()
    k = torch.randn(B, S, D, device="cuda").bfloat16()
    w = torch.randn(B, S, H, device="cuda")
    query = torch.randn(B, S, Hq, Dq, device="cuda").bfloat16()
    key = torch.randn(B, S, Dq, device="cuda").bfloat16()
    sink = torch.randn(Hq, device="cuda") if with_sink else None
    idx, _ = indexer_topk_triton(q, k, w, K)
    st, en = causal_window(B, S, S, device="cuda")
    ours, _ = _from_attention(q, k, w, query, key, Dq**-0.5, 1.0, idx, st, en, True, None,
                              False, 512, sink)
    ref = _run(indexer_loss_reference, q.float(), k.float(), w, query.float(), key.float(),
               Dq**-0.5, 1.0, idx, None, None, True, None, False)
    _check(ours, ref, 2e-2)
