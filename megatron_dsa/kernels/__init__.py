"""DSA kernels. Each op lives in its own folder with a plain-PyTorch ``reference.py`` beside the
fused implementation; the folder's ``__init__`` holds the public, input-validating function.

``backend``: ``"auto"`` picks the fused Triton kernel for CUDA tensors and the reference
otherwise; ``"reference"`` / ``"triton"`` force one.
"""

from .indexer import indexer_topk
from .indexer_loss import indexer_loss
from .sparse_mla import sparse_mla

__all__ = ["indexer_topk", "indexer_loss", "sparse_mla"]
