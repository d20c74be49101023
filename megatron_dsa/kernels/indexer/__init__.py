"""Lightning indexer: scores and top-k.

``reference.py`` (plain PyTorch, the math and the windows), ``triton_impl.py`` (fused score +
exact top-k), ``dispatch.py`` (which one runs, and the public :func:`indexer_topk`).
"""

from __future__ import annotations

from .dispatch import indexer_topk, select_backend
from .reference import (
    causal_window,
    indexer_scores_reference,
    indexer_topk_reference,
    packed_causal_window,
    ratio_causal_window,
    topk_reference,
)

__all__ = [
    "indexer_topk",
    "select_backend",
    "causal_window",
    "ratio_causal_window",
    "packed_causal_window",
    "indexer_scores_reference",
    "indexer_topk_reference",
    "topk_reference",
]

