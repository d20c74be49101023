"""Build-time links: which indexer module each anchor layer built, so that a shared layer can
hold its source's indexer for promotions (no parameters of its own, none shared)."""

from __future__ import annotations

import weakref
from typing import Optional

import torch

__all__ = ["register_indexer", "built_indexer"]

# (id(config), layer) -> the anchor's indexer module, filled while a model is being built so that
# a shared layer can hold its source's indexer for promotions. Weak values: nothing outlives the
# model.
_BUILT_INDEXERS: "weakref.WeakValueDictionary" = weakref.WeakValueDictionary()


def register_indexer(config, layer: int, indexer: torch.nn.Module) -> None:
    _BUILT_INDEXERS[(id(config), layer)] = indexer


def built_indexer(config, layer: int) -> Optional[torch.nn.Module]:
    return _BUILT_INDEXERS.get((id(config), layer))
