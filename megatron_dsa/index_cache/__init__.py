"""Cross-layer index reuse: anchors compute top-k, shared layers reuse it, and fail closed.

* :mod:`.schedule` — the anchor / shared role of every DSA layer, per pipeline stage and
  virtual chunk (resolved when the model is built; stages and chunks start on an anchor).
* :mod:`.cache` — the per-forward cache of one chunk: proven hits only, otherwise a
  *promotion* (the shared layer computes its own top-k with its source anchor's indexer weights:
  no extra parameters, one indexer forward of memory and time, no indexer loss).
* :mod:`.ledger` — activation recompute reuses exactly the original forward's indices (one
  scope per call of Megatron's checkpoint, freed with its autograd graph).
* :mod:`.stats` — per-step counters (hits, anchor computes, promotions by reason) and the
  optional indexer timer, with a hook for Megatron's logging.
* :mod:`.links` — the build-time map from an anchor layer to its indexer module.

Indexer loss: anchors (including stage-boundary promotions) attach the KL loss as usual;
shared layers contribute none, as in Megatron-Core: their selection is the anchor's, and the
anchor's loss already trains that selection against the anchor's attention.
See ``docs/index_cache.md``.
"""

from . import ledger
from .cache import IndexCache, signature
from .ledger import RecomputeScope, check_recompute, digests_match, fingerprint, recompute_scope
from .links import built_indexer, register_indexer
from .schedule import LayerRole, chunk_layers, format_schedule, layer_role, print_schedule, resolve_schedule
from .stats import STATS, IndexCacheStats, Timer, track_index_cache_metrics

__all__ = [
    "ledger", "LayerRole", "chunk_layers", "resolve_schedule", "layer_role", "format_schedule", "print_schedule",
    "IndexCache", "signature", "RecomputeScope", "recompute_scope", "check_recompute", "fingerprint",
    "digests_match",
    "register_indexer", "built_indexer", "IndexCacheStats", "STATS", "Timer", "track_index_cache_metrics",
]
