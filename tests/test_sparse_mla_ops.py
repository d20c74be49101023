"""The sparse MLA custom ops (``megatron_dsa::sparse_mla`` / ``sparse_mla_backward``) compose with
``torch.compile``: fake implementations, registered autograd, no graph breaks.

CPU through Triton's interpreter at small sizes (fp32, Dqk = 80, d_v = 64).
"""

import pytest
import torch

from megatron_dsa.kernels.sparse_mla import sparse_mla, sparse_mla_reference
from megatron_dsa.kernels.sparse_mla.ops import sparse_mla_backward_op, sparse_mla_op


def _inputs(T=24, H=4, Dqk=80, K=16, sink=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(T, H, Dqk, generator=g)
    kv = torch.randn(T, Dqk, generator=g)
    idx = torch.stack([torch.randperm(T, generator=g)[:K] for _ in range(T)]).int()
    idx[torch.rand(T, K, generator=g) < 0.25] = -1
    idx[3] = -1
    sk = torch.randn(H, generator=g) if sink else None
    return q, kv, idx, sk


def test_ops_are_registered_with_schemas():
    assert torch.ops.megatron_dsa.sparse_mla.default._schema.name == "megatron_dsa::sparse_mla"
    assert torch.ops.megatron_dsa.sparse_mla_backward.default is not None


def test_opcheck_forward_op():
    q, kv, idx, sk = _inputs()
    q.requires_grad_()
    kv.requires_grad_()
    torch.library.opcheck(sparse_mla_op, (q, kv, idx, 0.1, 64, None, sk, "triton", "triton", None),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_opcheck_backward_op():
    q, kv, idx, sk = _inputs()
    out, lse = sparse_mla_op(q, kv, idx, 0.1, 64, None, sk, "triton", "triton", None)
    dout = torch.randn_like(out)
    torch.library.opcheck(sparse_mla_backward_op,
                          (q, kv, idx, 0.1, 64, None, sk, out, lse, dout, None, "triton", True),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("sink", [False, True])
def test_torch_compile_fullgraph_matches_eager_and_reference(sink):
    q, kv, idx, sk = _inputs(sink=sink)

    def f(q, kv, sk):
        out, lse = sparse_mla(q, kv, idx, 0.1, 64, sink=sk, backend="triton", deterministic=True)
        return (out * out).sum() + torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse)).sum()

    leaves = [q.clone().requires_grad_(), kv.clone().requires_grad_()]
    leaves.append(sk.clone().requires_grad_() if sink else None)
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    loss_c = compiled(*leaves)
    loss_c.backward()
    ref = [q.double().requires_grad_(), kv.double().requires_grad_()]
    ref.append(sk.double().requires_grad_() if sink else None)
    out_r, lse_r = sparse_mla_reference(ref[0], ref[1], idx, 0.1, 64, None, ref[2])
    lse_r = torch.where(torch.isfinite(lse_r), lse_r, torch.zeros_like(lse_r))
    loss_r = (out_r * out_r).sum() + lse_r.sum()
    loss_r.backward()
    assert torch.allclose(loss_c.double(), loss_r, rtol=1e-4, atol=1e-3)
    for got, want in zip(leaves, ref):
        if got is None:
            continue
        assert torch.allclose(got.grad.double(), want.grad, rtol=1e-3, atol=1e-3), (got.grad - want.grad).abs().max()


def test_compiled_loss_target_gradient():
    """The loss-target input's gradient (head-summed P per slot) survives compilation."""
    q, kv, idx, _ = _inputs(sink=False)
    slot = torch.zeros(idx.shape, dtype=torch.float32, requires_grad=True)

    def f(q, slot):
        out, _ = sparse_mla(q, kv, idx, 0.1, 64, backend="triton", deterministic=False, loss_target=slot)
        return out.sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    qc = q.clone().requires_grad_()
    compiled(qc, slot).backward()
    got = slot.grad
    # reference: sum_h exp(scale q_h . kv_id - lse_h) on valid slots
    _, lse = sparse_mla_reference(q.double(), kv.double(), idx, 0.1, 64)
    s = torch.einsum("thd,tkd->thk", q.double(), kv.double()[idx.clamp_min(0).long()]) * 0.1
    p = torch.exp(s - lse[:, :, None]).masked_fill((idx < 0)[:, None, :], 0.0)
    p = torch.where(torch.isfinite(lse)[:, :, None], p, torch.zeros_like(p))
    assert torch.allclose(got.double(), p.sum(1), rtol=1e-4, atol=1e-5)
