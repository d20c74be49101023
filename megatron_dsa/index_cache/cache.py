"""The per-forward index cache: the top-k of one forward of one chunk, keyed by anchor layer.

Opened by the chunk's first DSA layer and closed by its last; reachable (through a context
variable, keyed by chunk) only between those two calls, never stored on the config, a module or
anything that outlives the forward. A shared layer uses an entry only if it was written in the
open scope of its own chunk by its own source layer, the layers ran in order (the scope's cursor
is the shared layer's previous DSA layer), and the :func:`signature` matches; anything else is a
promotion, whose reason :meth:`IndexCache.lookup` returns.
"""

from __future__ import annotations

import contextvars
import itertools
from dataclasses import dataclass
from typing import Dict, Optional

import torch

__all__ = ["IndexCache", "signature"]


@dataclass
class Entry:
    indices: torch.Tensor
    signature: tuple


_GENERATION = itertools.count(1)
# chunk key -> the open IndexCache of that chunk's forward (only between its first and last layer)
_OPEN: contextvars.ContextVar[Optional[dict]] = contextvars.ContextVar("megatron_dsa_open_caches", default=None)


class IndexCache:
    """The top-k indices of one forward of one chunk, keyed by anchor layer."""

    def __init__(self, chunk_key):
        self.chunk_key = chunk_key
        self.generation = next(_GENERATION)
        self.entries: Dict[int, Entry] = {}
        self.cursor: Optional[int] = None  # last DSA layer that ran in this scope
        self.closed = False

    @classmethod
    def open(cls, chunk_key) -> "IndexCache":
        cache = cls(chunk_key)
        caches = dict(_OPEN.get() or {})
        caches[chunk_key] = cache
        _OPEN.set(caches)
        return cache

    @staticmethod
    def current(chunk_key) -> Optional["IndexCache"]:
        return (_OPEN.get() or {}).get(chunk_key)

    def close(self) -> None:
        self.closed = True
        self.entries.clear()
        caches = dict(_OPEN.get() or {})
        if caches.get(self.chunk_key) is self:
            del caches[self.chunk_key]
            _OPEN.set(caches)

    def put(self, layer: int, indices: torch.Tensor, signature: tuple) -> None:
        self.entries[layer] = Entry(indices, signature)

    def lookup(self, source: int, previous: Optional[int], signature: tuple):
        """``(indices, None)`` on a proven hit, else ``(None, reason)``."""
        if self.closed:
            return None, "stale generation"
        if previous is not None and self.cursor != previous:
            return None, "layers out of order"
        entry = self.entries.get(source)
        if entry is None:
            return None, "missing entry"
        for name, mine, theirs in zip(_SIG_FIELDS, signature, entry.signature):
            if mine != theirs:
                return None, name
        return entry.indices, None


_SIG_FIELDS = ("batch", "sequence length", "key length", "device", "packed boundaries", "mode")


def signature(b: int, sq: int, sk: int, device: torch.device, packed_seq_params, training: bool) -> tuple:
    """What must agree between an anchor's entry and a consumer for the indices to be valid."""
    cu = None
    if packed_seq_params is not None:
        cu = id(getattr(packed_seq_params, "cu_seqlens_q", None))
    return (b, sq, sk, str(device), cu, bool(training))
