"""Sparse MLA attention in the absorbed layout (public function, reference, fused kernel)."""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .._validate import INDEX_DTYPES, check_dim, check_same_device, check_tensor, resolve_backend
from .reference import slot_validity, sparse_mla_reference

__all__ = ["sparse_mla", "sparse_mla_reference", "slot_validity"]


def sparse_mla(
    q: torch.Tensor,
    kv: torch.Tensor,
    indices: torch.Tensor,
    softmax_scale: float,
    d_v: int = 512,
    topk_length: Optional[torch.Tensor] = None,
    sink: Optional[torch.Tensor] = None,
    backend: str = "auto",
    loss_target: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Differentiable sparse attention: ``(out [T, H, d_v], lse fp32 [T, H])``.

    q ``[T, H, Dqk]``, kv ``[Tk, Dqk]`` (V = first ``d_v`` channels), indices ``[T, K]`` int32
    with ``-1`` padding, topk_length ``[T]`` optional, sink ``[H]`` optional.
    ``loss_target`` (fused backend only): the slot tensor returned by
    :func:`megatron_dsa.kernels.indexer_loss.indexer_loss_from_attention`; the backward hands it
    the head-summed attention probabilities per slot as its gradient.
    """
    check_tensor("q", q, 3)
    check_tensor("kv", kv, 2)
    check_tensor("indices", indices, 2, INDEX_DTYPES)
    T, H, Dqk = q.shape
    check_dim("kv", kv, 1, Dqk, "q's head dim")
    check_dim("indices", indices, 0, T, "q's rows")
    if not 0 < d_v <= Dqk:
        raise ValueError(f"d_v must be in (0, {Dqk}], got {d_v}")
    if topk_length is not None:
        check_tensor("topk_length", topk_length, 1, INDEX_DTYPES)
        check_dim("topk_length", topk_length, 0, T, "q's rows")
    if sink is not None:
        check_tensor("sink", sink, 1)
        check_dim("sink", sink, 0, H, "q's heads")
    if kv.dtype != q.dtype:
        raise TypeError(f"kv dtype {kv.dtype} must match q dtype {q.dtype}")
    check_same_device(q=q, kv=kv, indices=indices, topk_length=topk_length, sink=sink)
    impl = resolve_backend(backend, q.device, __name__)
    if impl == "triton":
        from .triton_impl import sparse_mla_triton

        return sparse_mla_triton(q, kv, indices, softmax_scale, d_v, topk_length, sink,
                                 loss_target=loss_target)
    if loss_target is not None:
        raise ValueError(
            "loss_target needs the fused sparse MLA backend (backend='triton'); with the reference "
            "pass attn_lse to indexer_loss instead"
        )
    return sparse_mla_reference(q, kv, indices, softmax_scale, d_v, topk_length, sink)
