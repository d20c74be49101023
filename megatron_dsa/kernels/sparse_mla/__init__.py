"""Sparse MLA attention in the absorbed layout.

``reference.py`` (plain PyTorch, the math), ``triton_impl.py`` (Triton kernels),
``cuda_impl.py`` + ``cuda/`` (sm_90a CUDA kernels), ``ops.py`` (the ``torch.library`` custom ops
over both), ``dispatch.py`` (which one runs, and the public :func:`sparse_mla`).
"""

from .dispatch import loss_target_reason, select_backend, sparse_mla
from .reference import slot_validity, sparse_mla_reference

__all__ = ["sparse_mla", "select_backend", "loss_target_reason", "sparse_mla_reference", "slot_validity"]
