"""Indexer KL loss (dense warm-up and sparse), forward and backward.

``reference.py`` (plain PyTorch, the math), ``chunked.py`` (row-chunked PyTorch with bounded
memory: fp64), ``triton_impl.py`` (fused Triton kernels of the sparse loss, including the
variant whose target comes from the attention backward, and of the dense loss), ``dispatch.py``
(which one runs, and the public functions).
"""

from .dispatch import indexer_loss, indexer_loss_from_attention, select_backend
from .reference import indexer_loss_reference

__all__ = ["indexer_loss", "indexer_loss_from_attention", "select_backend", "indexer_loss_reference"]
