"""Fused Triton lightning indexer (score + top-k) and the chunked indexer loss vs the references.

CPU: Triton's interpreter at small shapes, fp32/fp64 inputs (the interpreter mis-computes bf16
dots). GPU (``-m gpu``): real shapes (H=64, D=128, k=2048) in bf16 vs the fp32 reference.
Inputs are fresh random draws every run (conftest seeds randomly).
"""

import pytest
import torch

from megatron_dsa.kernels.indexer import indexer_topk
from megatron_dsa.kernels.indexer.reference import (
    causal_window,
    indexer_scores_reference,
    indexer_topk_reference,
    packed_causal_window,
    ratio_causal_window,
)
from megatron_dsa.kernels.indexer.triton_impl import indexer_topk_triton
from megatron_dsa.kernels.indexer_loss import indexer_loss
from megatron_dsa.kernels.indexer_loss.chunked import indexer_loss_chunked
from megatron_dsa.kernels.indexer_loss.reference import indexer_loss_reference

HAS_CUDA = torch.cuda.is_available()
DEV = "cuda" if HAS_CUDA else "cpu"


def _inputs(B, T, S, H, D, dtype=torch.float32, device=DEV, w_sign=True):
    q = torch.randn(B, T, H, D, device=device).to(dtype)
    k = torch.randn(B, S, D, device=device).to(dtype)
    w = torch.randn(B, T, H, device=device) if w_sign else torch.rand(B, T, H, device=device)
    return q, k, w.to(torch.float32)


def _window(kind, B, T, S, device=DEV):
    if kind == "causal":
        return None, None
    if kind == "packed":
        assert S == T
        cuts = sorted({0, T} | {int(x) for x in torch.randint(1, max(T, 2), (3,))})
        st, en = packed_causal_window(torch.tensor(cuts, device=device))
        return st.expand(B, T).contiguous(), en.expand(B, T).contiguous()
    if kind == "ratio":
        return ratio_causal_window(B, T, S, ratio=2, device=device)
    if kind == "random":
        a = torch.randint(0, S + 1, (B, T), device=device)
        b = torch.randint(0, S + 1, (B, T), device=device)
        return torch.minimum(a, b).to(torch.int32), torch.maximum(a, b).to(torch.int64)
    raise ValueError(kind)


def _check_topk(q, k, w, K, st, en, idx, val, global_ids=False, atol=1e-4, rtol=1e-4):
    """Sorted scores vs the reference; ids unique, in window, consistent with their scores."""
    B, T = q.shape[:2]
    S = k.shape[1]
    qf, kf = q.float(), k.float()
    ri, rv = indexer_topk_reference(qf, kf, w, K, st, en)
    dense = indexer_scores_reference(qf, kf, w, st, en)
    if st is None:
        st, en = causal_window(B, T, S, device=q.device)
    assert idx.shape == (B, T, K) and idx.dtype == torch.int32
    assert val.shape == (B, T, K) and val.dtype == torch.float32
    assert not torch.isnan(val).any(), "unwritten (NaN-poisoned) scores"
    # padding: same count as the reference, ids -1 <=> score -inf
    assert torch.equal((idx < 0).sum(-1), (ri < 0).sum(-1))
    assert torch.equal(idx < 0, torch.isneginf(val))
    off = (torch.arange(B, device=q.device) * S).view(B, 1, 1) if global_ids else 0
    loc = torch.where(idx >= 0, idx.long() - off, torch.full_like(idx, -1, dtype=torch.long))
    ok = idx >= 0
    stc = st.long().clamp_min(0).unsqueeze(-1)
    enc = en.long().clamp_max(S).unsqueeze(-1)
    assert bool(((loc >= stc) & (loc < enc) | ~ok).all()), "id outside its window"
    # no duplicates among the selected ids of a row
    srt = loc.sort(-1).values
    dup = (srt[..., 1:] == srt[..., :-1]) & (srt[..., 1:] >= 0)
    assert not dup.any(), "duplicate ids"
    # each reported score is the row's score at that id
    got = torch.gather(dense, -1, loc.clamp_min(0))
    torch.testing.assert_close(torch.where(ok, val, 0.0), torch.where(ok, got.float(), 0.0),
                               atol=atol, rtol=rtol)
    # the selected set: sorted scores equal the reference's
    sv = val.sort(-1, descending=True).values
    fin = torch.isfinite(rv)
    assert torch.equal(torch.isfinite(sv), fin)
    torch.testing.assert_close(sv[fin], rv[fin].float(), atol=atol, rtol=rtol)


# ------------------------------------------------------------------------------------------
# CPU (interpreter) / any device: small shapes
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("T,K", [(1, 8), (37, 8), (37, 64), (60, 20), (130, 200)])
def test_topk_causal(T, K):
    B, H, D = 2, 4, 32
    q, k, w = _inputs(B, T, T, H, D)
    idx = torch.full((B, T, K), -7, dtype=torch.int32, device=DEV)
    val = torch.full((B, T, K), float("nan"), device=DEV)
    indexer_topk_triton(q, k, w, K, out=(idx, val))
    _check_topk(q, k, w, K, None, None, idx, val)


@pytest.mark.parametrize("kind,global_ids", [("packed", False), ("packed", True), ("ratio", True),
                                             ("random", False)])
def test_topk_windows(kind, global_ids):
    B, T, H, D, K = 2, 29, 4, 32, 8
    S = T if kind == "packed" else 41
    q, k, w = _inputs(B, T, S, H, D)
    st, en = _window(kind, B, T, S)
    idx, val = indexer_topk_triton(q, k, w, K, st, en, global_ids=global_ids)
    _check_topk(q, k, w, K, st, en, idx, val, global_ids=global_ids)


def test_topk_first_rows_masked_no_relu_chunks():
    """Fully masked rows (empty window), negative scores (no ReLU) and many small chunks."""
    B, T, S, H, D, K = 2, 45, 45, 4, 32, 16
    q, k, w = _inputs(B, T, S, H, D)
    st, en = causal_window(B, T, S, device=DEV)
    st = st.clone()
    st[:, :5] = en[:, :5]  # empty windows
    st[1, 20:] = 7
    idx = torch.full((B, T, K), 12345, dtype=torch.int32, device=DEV)
    val = torch.full((B, T, K), float("nan"), device=DEV)
    indexer_topk_triton(q, k, w, K, st, en, use_relu=False, chunk_bytes=B * S * 4 * 16,
                        out=(idx, val))
    assert bool((idx[:, :5] == -1).all())
    ri, rv = indexer_topk_reference(q, k, w, K, st, en, use_relu=False)
    assert torch.equal((idx < 0).sum(-1), (ri < 0).sum(-1))
    torch.testing.assert_close(val.sort(-1, descending=True).values.nan_to_num(neginf=-1e30),
                               rv.nan_to_num(neginf=-1e30), atol=1e-4, rtol=1e-4)


def test_topk_exact_ties_lowest_index_wins():
    """Keys drawn from 3 distinct vectors: whole tie groups straddle the k-th place.

    Small integers keep every score exact, so ties are exact in both implementations."""
    B, T, H, D, K = 1, 40, 4, 32, 12
    q = torch.randint(-2, 3, (B, T, H, D), device=DEV).float()
    w = torch.randint(1, 3, (B, T, H), device=DEV).float()
    base = torch.randint(-2, 3, (3, D), device=DEV).float()
    k = base[torch.randint(0, 3, (T,), device=DEV)].unsqueeze(0).contiguous()
    idx, val = indexer_topk_triton(q, k, w, K)
    ri, _ = indexer_topk_reference(q, k, w, K)
    for t in range(T):
        a = sorted(x for x in idx[0, t].tolist() if x >= 0)
        b = sorted(x for x in ri[0, t].tolist() if x >= 0)
        assert a == b, f"row {t}: {a} vs {b}"


def test_topk_select_with_ties():
    """Integer scores make many exact ties at every radix level."""
    B, T, H, D, K = 1, 48, 4, 16, 10
    q = torch.randint(-1, 2, (B, T, H, D), device=DEV).float()
    k = torch.randint(-1, 2, (B, T, D), device=DEV).float()
    w = torch.randint(-2, 3, (B, T, H), device=DEV).float()
    idx, val = indexer_topk_triton(q, k, w, K, use_relu=False)
    ri, _ = indexer_topk_reference(q, k, w, K, use_relu=False)
    assert torch.equal(idx.sort(-1).values, ri.sort(-1).values)


def test_topk_sampled_prefilter_fallback():
    """Strided-sample positions hold the largest scores: the sampled threshold admits fewer
    than k candidates, so the select must fall back to the whole row."""
    B, T, S, H, D, K = 1, 4, 400, 2, 16, 40
    q = torch.zeros(B, T, H, D, device=DEV)
    q[..., 0] = 1.0
    k = torch.randn(B, S, D, device=DEV)
    k[0, ::8, 0] += 100.0
    w = torch.ones(B, T, H, device=DEV)
    st = torch.zeros(B, T, dtype=torch.int32, device=DEV)
    en = torch.full((B, T), S, dtype=torch.int32, device=DEV)
    en[0, 1] = 333
    idx, val = indexer_topk_triton(q, k, w, K, st, en, use_relu=False)
    _check_topk(q, k, w, K, st, en, idx, val)


def test_topk_scratch_overflow_falls_back(monkeypatch):
    """Heavy ties at the sampled threshold list more candidates than the per-row scratch holds
    (capacity forced down to 48 ids): the select falls back to the scratch-free radix select
    and stays exact, ties going to the lowest index."""
    from megatron_dsa.kernels.indexer import triton_impl as ti

    monkeypatch.setattr(ti, "_SCRATCH_PER_TOPK", 2)
    monkeypatch.setattr(ti, "_SCRATCH_MIN", 16)
    B, T, S, H, D, K = 1, 5, 300, 2, 16, 24
    q = torch.zeros(B, T, H, D, device=DEV)
    q[..., 0] = 1.0
    k = torch.zeros(B, S, D, device=DEV)
    k[0, :, 0] = torch.randint(0, 3, (S,)).float()  # three score values: ties everywhere
    k[0, 7, 0] = 5.0
    w = torch.ones(B, T, H, device=DEV)
    st = torch.zeros(B, T, dtype=torch.int32, device=DEV)
    en = torch.full((B, T), S, dtype=torch.int32, device=DEV)
    en[0, 2] = 211
    assert ti._plan(B, T, S, K, 16, 1 << 20)[1] == 48
    idx, val = indexer_topk_triton(q, k, w, K, st, en, use_relu=False)
    _check_topk(q, k, w, K, st, en, idx, val)
    ref, _ = indexer_topk_reference(q, k, w, K, st, en, use_relu=False)
    assert torch.equal(idx.sort(-1).values, ref.sort(-1).values)  # the tie rule, exactly


def test_public_dispatch_triton():
    B, T, H, D, K = 1, 20, 4, 16, 5
    q, k, w = _inputs(B, T, T, H, D)
    idx, val = indexer_topk(q, k, w, K, backend="triton")
    _check_topk(q, k, w, K, None, None, idx, val)


@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("kind", ["causal", "packed"])
def test_loss_matches_reference(sparse, kind):
    B, T, H, D, Hq, Dq, K = 2, 37, 4, 16, 3, 24, 8
    dt = torch.float64
    q, k, w = (x.to(dt) for x in _inputs(B, T, T, H, D))
    query = torch.randn(B, T, Hq, Dq, dtype=dt, device=DEV)
    key = torch.randn(B, T, Dq, dtype=dt, device=DEV)
    st, en = _window(kind, B, T, T)
    idx, _ = indexer_topk_reference(q, k, w, K, st, en)
    row_valid = torch.rand(B, T, device=DEV) > 0.2
    res = []
    def chunked(*args):  # the row-chunked path in many small chunks
        st, en = args[9:11]
        if st is None:
            st, en = causal_window(B, T, T, device=DEV)
        return indexer_loss_chunked(*args[:9], st, en, kind == "causal", *args[11:], chunk_bytes=30000)

    for fn in (indexer_loss_reference, chunked):
        qq, kk, ww = (x.clone().requires_grad_() for x in (q, k, w))
        loss = fn(qq, kk, ww, query, key, 0.3, 0.7, idx, sparse, st, en, True, row_valid, False, None)
        loss.backward()
        res.append((loss.detach(), qq.grad, kk.grad, ww.grad))
    for a, b in zip(res[1], res[0]):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("sparse", [False, True])
def test_loss_per_token_no_relu_fp32(sparse):
    B, T, H, D, Hq, Dq, K = 1, 30, 2, 16, 2, 16, 6
    q, k, w = _inputs(B, T, T, H, D)
    query = torch.randn(B, T, Hq, Dq, device=DEV)
    key = torch.randn(B, T, Dq, device=DEV)
    idx, _ = indexer_topk_reference(q, k, w, K, use_relu=False)
    res = []
    for backend in ("reference", "triton"):
        qq, kk, ww = (x.clone().requires_grad_() for x in (q, k, w))
        loss = indexer_loss(qq, kk, ww, query, key, 0.25, 1.5, idx, sparse, None, None, False, None, True,
                            backend=backend)
        loss.backward()
        res.append((loss.detach(), qq.grad, kk.grad, ww.grad))
    for a, b in zip(res[1], res[0]):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-4)


# ------------------------------------------------------------------------------------------
# GPU: real shapes, bf16
# ------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("S", [2048, 5000, 8192])
def test_gpu_topk_bf16_real_shapes(S):
    B, H, D, K = 1, 64, 128, 2048
    q, k, w = _inputs(B, S, S, H, D, dtype=torch.bfloat16)
    idx = torch.full((B, S, K), -7, dtype=torch.int32, device="cuda")
    val = torch.full((B, S, K), float("nan"), device="cuda")
    indexer_topk_triton(q, k, w, K, out=(idx, val))
    rows = torch.cat([torch.arange(0, 64), torch.arange(S - 512, S)]).cuda()
    st, en = causal_window(B, S, S, device="cuda")
    st, en = st[:, rows], en[:, rows]
    ri, rv = indexer_topk_reference(q[:, rows].float(), k.float(), w[:, rows], K, st, en)
    oi, ov = idx[:, rows], val[:, rows]
    assert not torch.isnan(val).any() and not (idx == -7).any()
    assert torch.equal((oi < 0).sum(-1), (ri < 0).sum(-1))
    sv = ov.sort(-1, descending=True).values
    fin = torch.isfinite(rv)
    assert torch.equal(torch.isfinite(sv), fin)
    rel = ((sv - rv)[fin].norm() / rv[fin].norm()).item()
    assert rel < 1e-2, rel
    overlap = []
    for r in range(rows.numel()):
        a = set(oi[0, r][oi[0, r] >= 0].tolist())
        b = set(ri[0, r][ri[0, r] >= 0].tolist())
        assert len(a) == int((oi[0, r] >= 0).sum()), "duplicates"
        overlap.append(len(a & b) / max(1, len(b)))
    assert min(overlap) > 0.99, min(overlap)


@pytest.mark.gpu
def test_gpu_topk_cuda_graph_and_packed():
    B, S, H, D, K = 1, 4096, 64, 128, 2048
    q, k, w = _inputs(B, S, S, H, D, dtype=torch.bfloat16)
    st, en = _window("packed", B, S, S, device="cuda")
    idx, val = indexer_topk_triton(q, k, w, K, st, en, global_ids=True)  # warm-up/compile
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        gi, gv = indexer_topk_triton(q, k, w, K, st, en, global_ids=True)
    q.copy_(torch.randn_like(q))
    g.replay()
    idx, val = indexer_topk_triton(q, k, w, K, st, en, global_ids=True)
    torch.cuda.synchronize()
    assert torch.equal(gi.sort(-1).values, idx.sort(-1).values)
    assert torch.equal(gv.sort(-1).values, val.sort(-1).values)


@pytest.mark.gpu
@pytest.mark.parametrize("sparse", [False, True])
def test_gpu_loss_bf16(sparse):
    B, S, H, D, Hq, Dq, K = 1, 1024, 64, 128, 16, 576, 256
    q, k, w = _inputs(B, S, S, H, D, dtype=torch.bfloat16)
    query = torch.randn(B, S, Hq, Dq, device="cuda").bfloat16()
    key = torch.randn(B, S, Dq, device="cuda").bfloat16()
    idx, _ = indexer_topk_triton(q, k, w, K)
    res = []
    for backend, cast in (("reference", torch.float32), ("triton", None)):
        xs = [x.detach().clone() if cast is None else x.detach().to(cast).clone() for x in (q, k, w)]
        xs = [x.requires_grad_() for x in xs]
        qy = query if cast is None else query.to(cast)
        ky = key if cast is None else key.to(cast)
        loss = indexer_loss(xs[0], xs[1], xs[2], qy, ky, Dq**-0.5, 1.0, idx, sparse, backend=backend)
        loss.backward()
        res.append([loss.detach().float()] + [x.grad.float() for x in xs])
    for name, a, b in zip(("loss", "dq", "dk", "dw"), res[1], res[0]):
        rel = ((a - b).norm() / b.norm().clamp_min(1e-30)).item()
        assert rel < 2e-2, (name, rel)


@pytest.mark.parametrize("kind", ["causal", "random", "packed"])
def test_score_kernel_writes_masked_reference(monkeypatch, kind):
    """The score kernel, on a tile config whose blocks straddle rows and keys, writes the
    reference's masked scores, with and without per-key scales."""
    import megatron_dsa.kernels.indexer.triton_impl as ti

    if not ti.interpreting():
        pytest.skip("the interpreter's tile config is the one patched here")
    monkeypatch.setattr(ti, "_SCORE_CFG_INTERP", (16, 32, 4, 1))
    B, T, S, H, D = 2, 37, 37, 3, 32
    q, k, w = _inputs(B, T, S, H, D)
    st, en = _window(kind, B, T, S)
    ks = torch.rand(B, S, device=DEV) + 0.5
    # q contiguous: read by TMA (the interpreter emulates the descriptor); q strided (heads
    # outermost in memory): by pointer loads. Rows past T, the tile's tail, read the next batch's.
    q_strided = q.transpose(1, 2).contiguous().transpose(1, 2)
    assert ti._q_descriptor(q, 16) is not None and ti._q_descriptor(q_strided, 16) is None
    for scale in (None, ks):
        got = ti.indexer_scores_triton(q, k, w, st, en, k_scale=scale)
        ref = indexer_scores_reference(q, k * (1.0 if scale is None else scale[..., None]), w, st, en)
        fin = torch.isfinite(ref)
        assert torch.equal(torch.isfinite(got), fin)
        torch.testing.assert_close(got[fin], ref[fin].float(), atol=1e-4, rtol=1e-4)
        assert torch.equal(ti.indexer_scores_triton(q_strided, k, w, st, en, k_scale=scale), got)
