"""One input contract for every public kernel function, the same on every backend: any strides
(forward and backward), padded slots and unselected rows never leak a value into other rows,
ids outside ``[0, num_keys)`` are empty slots, zero-size inputs give empty results, bad input
gives the same clear error.

CPU: the reference and Triton's interpreter (fp32). GPU (``-m gpu``): the CUDA kernels at their
shapes (bf16, 576 / 512) and Triton."""

from __future__ import annotations

import pytest
import torch

from megatron_dsa.kernels.indexer import indexer_topk
from megatron_dsa.kernels.indexer.reference import causal_window
from megatron_dsa.kernels.indexer_loss import indexer_loss
from megatron_dsa.kernels.sparse_mla import sparse_mla

from helpers import rel

HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)
CPU_BACKENDS = ["reference", "triton"]


# ----------------------------------------------------------------------------- sparse MLA
def mla_case(T=9, H=3, D=80, dv=64, Tk=12, K=8, device="cpu", dtype=torch.float32):
    q = torch.randn(T, H, D, device=device, dtype=dtype)
    kv = torch.randn(Tk, D, device=device, dtype=dtype)
    idx = torch.stack([torch.randperm(Tk, device=device)[:K] for _ in range(T)]).int()
    idx[torch.rand(T, K, device=device) < 0.25] = -1
    return q, kv, idx, dv


def layout(t: torch.Tensor, how: str) -> torch.Tensor:
    """The same values as ``t`` in another memory layout."""
    if how == "contiguous":
        return t.clone()
    if how == "permuted":  # dims stored in reverse order: channel stride != 1
        return t.permute(*reversed(range(t.dim()))).contiguous().permute(*reversed(range(t.dim())))
    if how == "sliced":  # every other element of a bigger buffer along the last dim
        big = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
        big[..., ::2] = t
        return big[..., ::2]
    raise ValueError(how)


def run_mla(q, kv, idx, dv, backend, sink=None, **kw):
    """out, lse and the gradients of a fixed loss, with leaves ``q`` / ``kv`` (any layout)."""
    qa, kva = q.detach().requires_grad_(), kv.detach().requires_grad_()
    out, lse = sparse_mla(qa, kva, idx, 0.1, d_v=dv, sink=sink, backend=backend, **kw)
    g = torch.linspace(-1, 1, out.numel(), device=out.device).view(out.shape)
    ((out.float() * g).sum() + torch.where(torch.isfinite(lse), lse, 0.0).sum()).backward()
    return out.detach(), lse.detach(), qa.grad, kva.grad


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("how", ["permuted", "sliced"])
def test_sparse_mla_any_strides(backend, how):
    q, kv, idx, dv = mla_case()
    want = run_mla(q.double(), kv.double(), idx, dv, "reference")
    got = run_mla(layout(q, how), layout(kv, how), layout(idx, how), dv, backend)
    for name, a, b in zip(("out", "lse", "dq", "dkv"), got, want):
        fin = torch.isfinite(b)
        assert torch.equal(fin, torch.isfinite(a)), name
        assert rel(a[fin].double(), b[fin]) < 1e-5, (name, how, backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_sparse_mla_expanded_inputs(backend):
    """Broadcast (stride-0) q and kv: the kernels read real memory, autograd sums the grads."""
    T, H, D, dv, Tk, K = 6, 4, 80, 64, 7, 5
    q1, kv1 = torch.randn(T, 1, D), torch.randn(1, D)
    idx = torch.stack([torch.randperm(Tk)[:K] for _ in range(T)]).int()
    res = []
    for dt, be in ((torch.float64, "reference"), (torch.float32, backend)):
        qa, kva = q1.to(dt).requires_grad_(), kv1.to(dt).requires_grad_()
        out, lse = sparse_mla(qa.expand(T, H, D), kva.expand(Tk, D), idx, 0.1, d_v=dv, backend=be)
        (out.sum() + lse.sum()).backward()
        res.append((out, qa.grad, kva.grad))
    for a, b in zip(res[1], res[0]):
        assert torch.isfinite(a).all() and rel(a.double(), b) < 1e-5


def nan_case(T=10, H=2, D=80, dv=64, K=6, device="cpu", dtype=torch.float32):
    """kv row 0 and the unselected rows 12.. hold NaN / Inf; rows 0..4 select only finite rows
    (padded with -1), rows 5.. also select row 0."""
    q, kv, idx, _ = mla_case(T, H, D, dv, 16, K, device, dtype)
    idx = torch.stack([torch.randperm(11, device=device)[:K] + 1 for _ in range(T)]).int()  # rows 1..11
    idx[:5, -2:] = -1
    idx[5:, 0] = 0
    kv = kv.clone()
    kv[0] = float("nan")
    kv[12:14] = float("inf")
    kv[14:] = float("nan")
    return q, kv, idx, dv


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_sparse_mla_padded_slots_never_leak(backend):
    q, kv, idx, dv = nan_case()
    out, lse, dq, dkv = run_mla(q, kv, idx, dv, backend)
    clean = slice(0, 5)
    assert torch.isfinite(out[clean]).all() and torch.isfinite(lse[clean]).all()
    assert torch.isfinite(dq[clean]).all()
    assert torch.all(dkv[12:] == 0)  # never selected: no gradient, not NaN
    # the rows that do select the NaN row see it (nothing is hidden either)
    assert torch.isnan(out[5:]).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_sparse_mla_out_of_range_ids_are_empty_slots(backend):
    q, kv, idx, dv = mla_case()
    wide = idx.long()
    wide[0, 0] = 2**32 + 1  # would be key 1 if cast to int32
    wide[1, 1] = kv.shape[0]  # one past the end
    wide[2, 2] = -5
    empty = wide.clone()
    empty[0, 0] = empty[1, 1] = empty[2, 2] = -1
    a = sparse_mla(q, kv, wide, 0.1, d_v=dv, backend=backend)
    b = sparse_mla(q.double(), kv.double(), empty, 0.1, d_v=dv, backend="reference")
    assert rel(a[0].double(), b[0]) < 1e-5


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("T,H,Tk,K", [(0, 3, 12, 8), (9, 3, 0, 8), (9, 3, 12, 0)])
def test_sparse_mla_zero_size(backend, T, H, Tk, K):
    q, kv, idx, dv = mla_case(H=H)
    q, kv, idx = q[:T].contiguous(), kv[:Tk].contiguous(), idx[:T, :K].contiguous()
    out, lse, dq, dkv = run_mla(q, kv, idx, dv, backend)
    assert out.shape == (T, H, dv) and lse.shape == (T, H)
    assert dq.shape == q.shape and dkv.shape == kv.shape
    assert torch.all(out == 0) and torch.all(torch.isneginf(lse))  # no key: out 0, lse -inf
    assert torch.all(dq == 0) and torch.all(dkv == 0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_sparse_mla_same_errors(backend):
    q, kv, idx, dv = mla_case()
    for kwargs, match in (({"d_v": 32.0}, "d_v must be an int"), ({"d_v": 0}, "d_v must be an int"),
                          ({"topk_length": torch.ones(3, dtype=torch.int32)}, "topk_length dim 0")):
        args = dict(d_v=dv, backend=backend)
        args.update(kwargs)
        with pytest.raises(ValueError, match=match):
            sparse_mla(q, kv, idx, 0.1, **args)
    with pytest.raises(ValueError, match="indices dim 0"):
        sparse_mla(q, kv, idx[:-1], 0.1, d_v=dv, backend=backend)
    with pytest.raises(TypeError, match="indices has dtype"):
        sparse_mla(q, kv, idx.float(), 0.1, d_v=dv, backend=backend)
    for scale in (0.0, -0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="softmax_scale must be a finite number > 0"):
            sparse_mla(q, kv, idx, scale, d_v=dv, backend=backend)
    with pytest.raises(TypeError, match="softmax_scale must be a number"):
        sparse_mla(q, kv, idx, "0.1", d_v=dv, backend=backend)


# ----------------------------------------------------------------------------- indexer
def indexer_case(B=2, T=20, S=20, H=4, D=16, device="cpu"):
    return (torch.randn(B, T, H, D, device=device), torch.randn(B, S, D, device=device),
            torch.randn(B, T, H, device=device))


def same_sets(a, b):
    return torch.equal(a.sort(-1).values, b.sort(-1).values)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("how", ["permuted", "sliced"])
def test_indexer_topk_any_strides(backend, how):
    q, k, w = indexer_case()
    want, _ = indexer_topk(q, k, w, 5, backend="reference")
    got, _ = indexer_topk(layout(q, how), layout(k, how), layout(w, how), 5, backend=backend)
    assert same_sets(got, want)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_indexer_nan_outside_the_window_changes_nothing(backend):
    q, k, w = indexer_case()
    want, _ = indexer_topk(q, k, w, 5, backend="reference")
    k2 = k.clone()
    k2[:, -1] = float("nan")  # the last key: only the last row's window holds it
    got, _ = indexer_topk(q, k2, w, 5, backend=backend)
    assert same_sets(got[:, :-1], want[:, :-1])


@pytest.mark.parametrize("use_relu", [True, False])
def test_indexer_nan_query_same_on_every_backend(use_relu):
    """A NaN in one query head: NaN scores for that row on every path (ReLU keeps NaN, as
    torch.relu does), ranked as the largest (torch's order), ties to the lower key."""
    q, k, w = indexer_case()
    q[0, 7, 1, 3] = float("nan")
    a, _ = indexer_topk(q, k, w, 5, use_relu=use_relu, backend="reference")
    b, _ = indexer_topk(q, k, w, 5, use_relu=use_relu, backend="triton")
    assert same_sets(a, b)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("B,T,S", [(2, 0, 20), (2, 20, 0), (0, 20, 20)])
def test_indexer_zero_size(backend, B, T, S):
    q, k, w = indexer_case(B, T, S)
    idx, val = indexer_topk(q, k, w, 5, backend=backend, starts=None, ends=None)
    assert idx.shape == (B, T, 5) and val.shape == (B, T, 5)
    assert torch.all(idx == -1)


def test_indexer_head_dim_rule():
    """Head dims the Triton kernel does not take: an explicit backend says why; auto on a GPU
    falls back to the reference (and says so once); the reference takes any."""
    q, k, w = indexer_case(D=24)
    with pytest.raises(ValueError, match="power-of-two head dim >= 16, got 24"):
        indexer_topk(q, k, w, 5, backend="triton")
    assert indexer_topk(q, k, w, 5, backend="reference")[0].shape == (2, 20, 5)


# ----------------------------------------------------------------------------- indexer loss
LOSS_PATHS = [("reference", True), ("triton", True), ("reference", False), ("triton", False)]


def loss_case(B=2, T=14, H=3, D=16, Hq=2, Dq=24, K=5, device="cpu"):
    q, k, w = indexer_case(B, T, T, H, D, device)
    query, key = torch.randn(B, T, Hq, Dq, device=device), torch.randn(B, T, Dq, device=device)
    st, en = causal_window(B, T, T, device=device)
    idx, _ = indexer_topk(q, k, w, K, backend="reference")
    return q, k, w, query, key, idx


def run_loss(q, k, w, query, key, idx, sparse, backend):
    qa, ka, wa = (x.detach().requires_grad_() for x in (q, k, w))
    loss = indexer_loss(qa, ka, wa, query, key, 0.3, 1.0, idx, sparse, backend=backend)
    loss.backward()
    return loss.detach(), qa.grad, ka.grad, wa.grad


@pytest.mark.parametrize("backend,sparse", LOSS_PATHS)
@pytest.mark.parametrize("how", ["permuted", "sliced"])
def test_indexer_loss_any_strides(backend, sparse, how):
    case = loss_case()
    want = run_loss(*(x.double() if x.is_floating_point() else x for x in case), sparse, "reference")
    got = run_loss(*(layout(x, how) for x in case), sparse, backend)
    for a, b in zip(got, want):
        assert rel(a.double(), b) < 1e-4


@pytest.mark.parametrize("backend,sparse", LOSS_PATHS)
def test_indexer_loss_nan_in_unselected_keys_never_leaks(backend, sparse):
    """A NaN key row outside every row's support (a future key of the causal window) and a NaN
    in an unselected, in-window key: the loss and every gradient stay finite."""
    q, k, w, query, key, idx = loss_case()
    T = q.shape[1]
    k, key = k.clone(), key.clone()
    k[:, T - 1] = float("nan")
    key[:, T - 1] = float("nan")
    keep = idx[:, : T - 1]
    keep = torch.where(keep == T - 1, -1, keep)  # nobody but the last row selects the last key
    rows = slice(0, T - 1)
    got = run_loss(q[:, rows], k, w[:, rows], query[:, rows], key, keep, sparse, backend)
    for x in got:
        assert torch.isfinite(x).all()


@pytest.mark.parametrize("backend,sparse", LOSS_PATHS)
def test_indexer_loss_out_of_range_ids_are_empty(backend, sparse):
    q, k, w, query, key, idx = loss_case()
    wide = idx.long().clone()
    wide[0, 5, 0] = q.shape[1] + 3
    wide[1, 6, 1] = 2**33
    empty = wide.clone()
    empty[0, 5, 0] = empty[1, 6, 1] = -1
    a = run_loss(q, k, w, query, key, wide, True, backend)
    b = run_loss(q, k, w, query, key, empty, True, "reference")
    for x, y in zip(a, b):
        assert rel(x.double(), y.double()) < 1e-4


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_indexer_loss_same_errors(backend):
    q, k, w, query, key, idx = loss_case()
    cases = (
        (dict(topk_indices=idx[:, :-1]), ValueError, "topk_indices must be"),
        (dict(w=torch.randn(2, 14, 4)), ValueError, "w dim 2"),
        (dict(topk_indices=None), ValueError, "topk_indices is required"),
        (dict(starts=torch.zeros(2, 14, dtype=torch.int32)), ValueError, "starts and ends"),
    )
    for change, err, match in cases:
        args = dict(q=q, k=k, w=w, query=query, key=key, softmax_scale=0.3, loss_coeff=1.0,
                    topk_indices=idx, sparse=True, backend=backend)
        args.update(change)
        with pytest.raises(err, match=match):
            indexer_loss(**args)


@pytest.mark.parametrize("backend,sparse", LOSS_PATHS)
def test_indexer_loss_zero_rows(backend, sparse):
    q, k, w, query, key, idx = loss_case()
    z = slice(0, 0)
    loss, dq, dk, dw = run_loss(q[:, z], k, w[:, z], query[:, z], key, idx[:, z], sparse, backend)
    assert float(loss) == 0.0 and dq.shape == (2, 0, 3, 16) and torch.all(dk == 0)


# ----------------------------------------------------------------------------- GPU
gpu = pytest.mark.skipif(not HOPPER, reason="needs an sm_90 GPU")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("how", ["permuted", "sliced"])
def test_gpu_sparse_mla_any_strides(backend, how):
    q, kv, idx, _ = mla_case(T=300, H=16, D=576, dv=512, Tk=320, K=128, device="cuda", dtype=torch.bfloat16)
    want = run_mla(q, kv, idx, 512, backend)
    got = run_mla(layout(q, how), layout(kv, how), layout(idx, how), 512, backend)
    for name, a, b in zip(("out", "lse", "dq", "dkv"), got, want):
        fin = torch.isfinite(b)
        assert torch.equal(fin, torch.isfinite(a)), name
        assert rel(a[fin].double(), b[fin].double()) < 2e-3, (name, how, backend)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("backend,row_packing", [("cuda", False), ("cuda", None), ("triton", None)])
def test_gpu_sparse_mla_padded_slots_never_leak(backend, row_packing):
    """Rows 0..4 select finite kv rows only (padded with -1), rows 5.. also the NaN row 0.
    Unpacked, neither a padded slot nor an unselected row reaches rows 0..4. Row-packed (auto: the
    CUDA backward at <= 32 heads, and the forward at <= 16K keys; 4 rows per group at 16 heads) a
    non-finite kv row selected by one row of a group reaches the dq and the output of the group's
    other rows (0 x NaN in the MMAs; finite rows add exact zeros): rows 0..3, a group of finite
    selections, stay finite; row 4 shares its group with rows 5..7 (docs/kernels_sparse_mla.md,
    section 6). The lse is the row's own in every case."""
    q, kv, idx, dv = nan_case(T=200, H=16, D=576, dv=512, K=8, device="cuda", dtype=torch.bfloat16)
    out, lse, dq, dkv = run_mla(q, kv, idx, dv, backend, row_packing=row_packing)
    clean = 4 if backend == "cuda" and row_packing is None else 5
    assert torch.isfinite(out[:clean]).all() and torch.isfinite(lse[:5]).all() and torch.isfinite(dq[:clean]).all()
    assert torch.all(dkv[12:] == 0)  # never selected: no gradient, not NaN


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("T,Tk,K", [(0, 64, 32), (64, 0, 32), (64, 64, 0)])
def test_gpu_sparse_mla_zero_size(T, Tk, K):
    q, kv, idx, _ = mla_case(T=64, H=16, D=576, dv=512, Tk=64, K=32, device="cuda", dtype=torch.bfloat16)
    q, kv, idx = q[:T].contiguous(), kv[:Tk].contiguous(), idx[:T, :K].contiguous()
    out, lse, dq, dkv = run_mla(q, kv, idx, 512, "cuda")
    assert out.shape == (T, 16, 512) and torch.all(out == 0) and torch.all(torch.isneginf(lse))
    assert dq.shape == q.shape and dkv.shape == kv.shape and torch.all(dq == 0) and torch.all(dkv == 0)


@pytest.mark.parametrize("backend,dtype", [("reference", torch.float32), ("triton", torch.float32),
                                           ("triton", torch.float64)])  # fp64: the row-chunked path
def test_indexer_loss_padded_slots_never_leak(backend, dtype):
    """Key 0 (where padded slots point) and the last key hold NaN and no row selects them: the
    sparse loss and every gradient stay finite on the reference, fused and chunked paths."""
    q, k, w, query, key, idx = (x.to(dtype) if x.is_floating_point() else x for x in loss_case())
    T = q.shape[1]
    k, key = k.clone(), key.clone()
    for j in (0, T - 1):
        k[:, j] = float("nan")
        key[:, j] = float("nan")
    idx = torch.where((idx == 0) | (idx == T - 1), -1, idx)
    for x in run_loss(q, k, w, query, key, idx, True, backend):
        assert torch.isfinite(x).all()


def test_layer_with_zero_tokens(mcore):
    """A DSA layer given a microbatch of zero tokens returns an empty output and gradient."""
    from megatron.core.transformer.spec_utils import build_module

    from megatron_dsa.spec import get_dsa_layer_specs

    from helpers import tiny_config

    cfg = tiny_config(num_layers=1)
    layer = build_module(get_dsa_layer_specs(cfg)[0], config=cfg, layer_number=1).train()
    x = torch.randn(0, 1, cfg.hidden_size, requires_grad=True)
    out, _ = layer(x, None)
    out.sum().backward()
    assert out.shape == (0, 1, cfg.hidden_size) and x.grad.shape == x.shape
