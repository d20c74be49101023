"""The plain-PyTorch references against direct dense formulas (fp64, small shapes)."""

import math

import pytest
import torch

from megatron_dsa.kernels.indexer import indexer_topk
from megatron_dsa.kernels.indexer_loss import indexer_loss
from megatron_dsa.kernels.sparse_mla import sparse_mla
from megatron_dsa.kernels.hadamard import hadamard_reference, rotate_activation
from megatron_dsa.kernels.indexer import (
    causal_window,
    indexer_scores_reference,
    packed_causal_window,
    ratio_causal_window,
    topk_reference,
)
from megatron_dsa.kernels.indexer.reference import window_mask

f64 = torch.float64


def dense_scores(q, k, w, valid, relu=True):
    s = torch.einsum("bthd,bsd->bths", q, k)
    if relu:
        s = s.relu()
    s = (s * w.unsqueeze(-1)).sum(2)
    return s.masked_fill(~valid, float("-inf"))


@pytest.mark.parametrize("relu", [True, False])
def test_indexer_scores_match_dense(relu):
    B, T, S, H, D = 2, 19, 23, 3, 8
    q, k, w = torch.randn(B, T, H, D, dtype=f64), torch.randn(B, S, D, dtype=f64), torch.randn(B, T, H, dtype=f64)
    st, en = ratio_causal_window(B, T, S)
    got = indexer_scores_reference(q, k, w, st, en, use_relu=relu, row_block=4)
    want = dense_scores(q, k, w, window_mask(st, en, S), relu)
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    torch.testing.assert_close(got.nan_to_num(neginf=0), want.nan_to_num(neginf=0))


def test_windows():
    st, en = causal_window(1, 5, 3)
    assert en.tolist() == [[1, 2, 3, 3, 3]] and st.abs().sum() == 0
    # cuDNN's ratio-causal rule: key j visible iff j < (sk*ratio - sq + t + 1) // ratio
    sq, sk, r = 8, 3, 4
    _, en = ratio_causal_window(1, sq, sk, r)
    assert en[0].tolist() == [max(0, min(sk, (sk * r - sq + t + 1) // r)) for t in range(sq)]
    st, en = packed_causal_window(torch.tensor([0, 3, 7]))
    assert st.tolist() == [[0, 0, 0, 3, 3, 3, 3]] and en.tolist() == [[1, 2, 3, 4, 5, 6, 7]]


def test_topk_tie_rule_and_padding():
    s = torch.tensor([[1.0, 3.0, 3.0, float("-inf"), 2.0, 3.0]])
    idx, val = topk_reference(s, 4)
    assert idx.tolist() == [[1, 2, 5, 4]]  # equal scores: lower key index first
    idx, val = topk_reference(s, 8)  # more than the columns: -1 / -inf padding
    assert idx.tolist() == [[1, 2, 5, 4, 0, -1, -1, -1]]
    assert torch.isneginf(val[0, 5:]).all()


def test_indexer_topk_selects_best_valid_keys():
    B, T, H, D, K = 2, 30, 4, 8, 6
    q, k, w = torch.randn(B, T, H, D), torch.randn(B, T, D), torch.randn(B, T, H)
    idx, val = indexer_topk(q, k, w, K)
    full = dense_scores(q.double(), k.double(), w.double(), window_mask(*causal_window(B, T), T))
    best = full.sort(-1, descending=True).values[..., :K]
    torch.testing.assert_close(val.double().nan_to_num(neginf=-1e30), best.nan_to_num(neginf=-1e30), rtol=1e-5, atol=1e-5)
    for b in range(B):
        for t in range(T):
            row = idx[b, t]
            real = row[row >= 0]
            assert real.numel() == min(K, t + 1)  # -1 exactly where the row runs out of keys
            assert (real <= t).all() and real.unique().numel() == real.numel()
    gidx, _ = indexer_topk(q, k, w, K, global_ids=True)
    assert torch.equal(gidx[1][idx[1] >= 0], idx[1][idx[1] >= 0] + T)


def dense_sparse_attention(q, kv, idx, scale, d_v, sink=None, topk_length=None):
    T, H, _ = q.shape
    mask = torch.zeros(T, kv.shape[0], dtype=torch.bool)
    for t in range(T):
        n = idx.shape[1] if topk_length is None else int(topk_length[t])
        for j in idx[t, :n].tolist():
            if j >= 0:
                mask[t, j] = True
    logits = torch.einsum("thd,sd->ths", q, kv) * scale
    logits = logits.masked_fill(~mask.unsqueeze(1), float("-inf"))
    lse = torch.logsumexp(logits, -1)
    denom = lse if sink is None else torch.logaddexp(lse, sink.unsqueeze(0))
    p = torch.exp(logits - denom.unsqueeze(-1)).nan_to_num(0.0)
    return torch.einsum("ths,sd->thd", p, kv[:, :d_v]), lse


@pytest.mark.parametrize("with_sink", [False, True])
def test_sparse_mla_reference_matches_dense(with_sink):
    T, H, D, dv, K, Tk = 21, 3, 20, 12, 7, 25
    q = torch.randn(T, H, D, dtype=f64, requires_grad=True)
    kv = torch.randn(Tk, D, dtype=f64, requires_grad=True)
    sink = torch.randn(H, dtype=f64, requires_grad=True) if with_sink else None
    idx = torch.stack([torch.randperm(Tk)[:K] for _ in range(T)]).int()
    idx[torch.rand(T, K) < 0.3] = -1
    idx[0] = -1  # an empty row
    length = torch.randint(0, K + 1, (T,))
    out, lse = sparse_mla(q, kv, idx, 0.4, d_v=dv, topk_length=length, sink=sink)
    ref_out, ref_lse = dense_sparse_attention(q, kv, idx, 0.4, dv, sink, length)
    torch.testing.assert_close(out, ref_out)
    assert torch.isneginf(lse[0]).all() and (out[0] == 0).all()
    torch.testing.assert_close(lse.nan_to_num(neginf=0), ref_lse.nan_to_num(neginf=0))
    g = torch.randn_like(out)
    inputs = [q, kv] + ([sink] if with_sink else [])
    got = torch.autograd.grad((out * g).sum(), inputs)
    want = torch.autograd.grad((ref_out * g).sum(), inputs)
    for a, b in zip(got, want):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b)


def dense_indexer_kl(q, k, w, query, key, scale, coeff, valid, relu=True):
    """Direct (dense tensors everywhere) form of the indexer KL loss."""
    scores = dense_scores(q, k, w, valid, relu)
    logp = torch.log_softmax(scores.masked_fill(~valid, -1e30), -1).masked_fill(~valid, 0)
    att = torch.einsum("bthd,bsd->bths", query, key) * scale
    att = torch.softmax(att.masked_fill(~valid.unsqueeze(2), float("-inf")), -1).nan_to_num(0).sum(2)
    target = att / att.sum(-1, keepdim=True).clamp_min(1e-10)
    kl = (target * (torch.log(target.clamp_min(1e-10)) - logp)).sum(-1)
    return kl.mean() * coeff


@pytest.mark.parametrize("sparse", [False, True])
def test_indexer_loss_reference_matches_dense(sparse):
    B, T, H, D, Hq, Dq, K = 2, 13, 3, 8, 2, 10, 4
    q = torch.randn(B, T, H, D, dtype=f64, requires_grad=True)
    k = torch.randn(B, T, D, dtype=f64, requires_grad=True)
    w = torch.randn(B, T, H, dtype=f64, requires_grad=True)
    query, key = torch.randn(B, T, Hq, Dq, dtype=f64), torch.randn(B, T, Dq, dtype=f64)
    idx, _ = indexer_topk(q.detach(), k.detach(), w.detach(), K)
    valid = window_mask(*causal_window(B, T), T)
    if sparse:
        sel = torch.zeros_like(valid)
        for b in range(B):
            for t in range(T):
                for j in idx[b, t].tolist():
                    if j >= 0:
                        sel[b, t, j] = True
        valid = valid & sel
    got = indexer_loss(q, k, w, query, key, 0.3, 0.5, topk_indices=idx, sparse=sparse)
    want = dense_indexer_kl(q, k, w, query, key, 0.3, 0.5, valid)
    torch.testing.assert_close(got, want)
    g1 = torch.autograd.grad(got, (q, k, w))
    g2 = torch.autograd.grad(want, (q, k, w))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)


def test_hadamard_matches_matrix():
    n = 32
    H = torch.ones(1, 1, dtype=f64)
    while H.shape[0] < n:
        H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)], 0)
    x = torch.randn(3, 5, n, dtype=f64)
    torch.testing.assert_close(hadamard_reference(x, 0.5), x @ H.T * 0.5)
    torch.testing.assert_close(rotate_activation(x), x @ H.T / math.sqrt(n))
    with pytest.raises(ValueError, match="power-of-two"):
        hadamard_reference(torch.randn(4, 12))


def test_public_functions_reject_bad_input():
    q, k, w = torch.randn(1, 4, 2, 8), torch.randn(1, 4, 8), torch.randn(1, 4, 2)
    with pytest.raises(ValueError, match="topk"):
        indexer_topk(q, k, w, 0)
    with pytest.raises(ValueError, match="topk"):
        indexer_topk(q, k, w, -3)
    with pytest.raises(TypeError, match="q has dtype"):
        indexer_topk(q.int(), k, w, 2)
    with pytest.raises(ValueError, match="k dim 2"):
        indexer_topk(q, torch.randn(1, 4, 7), w, 2)
    with pytest.raises(ValueError, match="w must have 3 dims"):
        indexer_topk(q, k, w[0], 2)
    qa, kv = torch.randn(4, 2, 10), torch.randn(6, 10)
    with pytest.raises(TypeError, match="indices has dtype"):
        sparse_mla(qa, kv, torch.zeros(4, 3), 1.0, d_v=8)
    with pytest.raises(ValueError, match="kv dim 1"):
        sparse_mla(qa, torch.randn(6, 9), torch.zeros(4, 3, dtype=torch.int32), 1.0, d_v=8)
    with pytest.raises(ValueError, match="d_v"):
        sparse_mla(qa, kv, torch.zeros(4, 3, dtype=torch.int32), 1.0, d_v=11)
    with pytest.raises(ValueError, match="backend"):
        indexer_topk(q, k, w, 2, backend="cuda")
    # topk larger than the number of keys is allowed: -1 padding
    idx, _ = indexer_topk(q, k, w, 9)
    assert idx.shape == (1, 4, 9) and (idx[0, -1, 4:] == -1).all()
