"""``torch.library`` custom ops for the fused sparse MLA (forward, backward, autograd).

``megatron_dsa::sparse_mla`` (forward) and ``megatron_dsa::sparse_mla_backward`` run the
launcher the dispatch chose (``forward_impl`` ``"cuda"`` / ``"cuda-packed"`` / ``"triton"``;
``backward_impl`` ``"cuda"`` / ``"cuda-packed"`` / ``"cuda-deterministic"`` /
``"cuda-packed-deterministic"`` / ``"triton"`` / ``"triton-packed"`` / ``"triton-deterministic"``) and have fake (meta) implementations, so ``torch.compile`` traces
them as opaque ops without graph breaks and without running the kernels; the autograd formula
is registered on the op. Explicit schemas (no annotation inference) keep this working across
torch >= 2.6.

``loss_target`` is a forward input only to reach the backward: the backward returns the
head-summed attention probabilities per slot as its gradient (the sparse indexer loss's
target; see ``megatron_dsa.kernels.indexer_loss.indexer_loss_from_attention``).
"""

import torch

from .cuda_impl import sparse_mla_bwd_cuda, sparse_mla_fwd_cuda
from .triton_impl import sparse_mla_bwd_triton, sparse_mla_fwd_triton

__all__ = ["sparse_mla_op", "sparse_mla_backward_op"]

_FWD_SCHEMA = (
    "(Tensor q, Tensor kv, Tensor indices, float softmax_scale, int d_v, Tensor? topk_length, "
    "Tensor? sink, str forward_impl, str backward_impl, Tensor? loss_target) -> (Tensor, Tensor)"
)
_BWD_SCHEMA = (
    "(Tensor q, Tensor kv, Tensor indices, float softmax_scale, int d_v, Tensor? topk_length, "
    "Tensor? sink, Tensor out, Tensor lse, Tensor dout, Tensor? dlse, str backward_impl, "
    "bool want_target) -> (Tensor, Tensor, Tensor, Tensor)"
)


def _fwd(q, kv, indices, softmax_scale, d_v, topk_length, sink, forward_impl, backward_impl, loss_target):
    if forward_impl in ("cuda", "cuda-packed"):
        return sparse_mla_fwd_cuda(q, kv, indices, softmax_scale, topk_length, sink,
                                   packed=forward_impl == "cuda-packed")
    return sparse_mla_fwd_triton(q, kv, indices, softmax_scale, d_v, topk_length, sink)


def _bwd(q, kv, indices, softmax_scale, d_v, topk_length, sink, out, lse, dout, dlse, backward_impl,
         want_target):
    target = torch.zeros(indices.shape, dtype=torch.float32, device=q.device) if want_target else None
    dout = dout.to(q.dtype)
    if backward_impl.startswith("cuda"):
        dq, dkv, d_sink = sparse_mla_bwd_cuda(q, kv, indices, softmax_scale, topk_length, sink, out, lse, dout,
                                              dlse, target_out=target, packed="-packed" in backward_impl,
                                              deterministic=backward_impl.endswith("-deterministic"))
    else:
        dq, dkv, d_sink = sparse_mla_bwd_triton(
            q, kv, indices, softmax_scale, d_v, topk_length, sink, out, lse, dout, dlse,
            deterministic=backward_impl == "triton-deterministic", target_out=target,
            packed=backward_impl == "triton-packed")
    # custom ops return tensors only: empty stand-ins for "no d_sink" / "no target"
    if d_sink is None:
        d_sink = q.new_empty(0, dtype=torch.float32)
    if target is None:
        target = q.new_empty(0, dtype=torch.float32)
    return dq, dkv, d_sink, target


sparse_mla_op = torch.library.custom_op("megatron_dsa::sparse_mla", _fwd, mutates_args=(), schema=_FWD_SCHEMA)
sparse_mla_backward_op = torch.library.custom_op("megatron_dsa::sparse_mla_backward", _bwd, mutates_args=(),
                                                 schema=_BWD_SCHEMA)


@sparse_mla_op.register_fake
def _fwd_fake(q, kv, indices, softmax_scale, d_v, topk_length, sink, forward_impl, backward_impl, loss_target):
    T, H, _ = q.shape
    return q.new_empty((T, H, d_v)), q.new_empty((T, H), dtype=torch.float32)


@sparse_mla_backward_op.register_fake
def _bwd_fake(q, kv, indices, softmax_scale, d_v, topk_length, sink, out, lse, dout, dlse, backward_impl,
              want_target):
    d_sink = q.new_empty(tuple(sink.shape) if sink is not None else (0,),
                         dtype=sink.dtype if sink is not None else torch.float32)
    target = q.new_empty(tuple(indices.shape) if want_target else (0,), dtype=torch.float32)
    return torch.empty_like(q), torch.empty_like(kv), d_sink, target


def _setup_context(ctx, inputs, output):
    q, kv, indices, softmax_scale, d_v, topk_length, sink, forward_impl, backward_impl, loss_target = inputs
    out, lse = output
    ctx.save_for_backward(q, kv, indices, topk_length, sink, out, lse)
    ctx.softmax_scale = softmax_scale
    ctx.d_v = d_v
    ctx.backward_impl = backward_impl


def _backward(ctx, dout, dlse):
    q, kv, indices, topk_length, sink, out, lse = ctx.saved_tensors
    if dout is None:  # only lse was used
        dout = torch.zeros_like(out)
    # needs_input_grad is False for inputs passed as None (no sink, no loss target)
    want_target = ctx.needs_input_grad[9]
    dq, dkv, d_sink, target = sparse_mla_backward_op(
        q, kv, indices, ctx.softmax_scale, ctx.d_v, topk_length, sink, out, lse, dout, dlse,
        ctx.backward_impl, want_target)
    return (dq, dkv, None, None, None, None, d_sink if ctx.needs_input_grad[6] else None, None, None,
            target if want_target else None)


sparse_mla_op.register_autograd(_backward, setup_context=_setup_context)
