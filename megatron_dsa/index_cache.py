"""Cross-layer index reuse: anchors compute top-k, shared layers reuse it, and fail closed.

Schedule (resolved when the model is built)
-------------------------------------------
The base pattern over the model's DSA layers comes from ``DSAPluginConfig.index_pattern``
(``"FSSSFSSS"``: ``F`` anchor, ``S`` shared with the nearest earlier ``F``; or a list whose items
are ``"F"``, ``"S"`` or the 1-based number of an earlier anchor to reuse), or else from
Megatron-Core's ``dsa_indexer_topk_freq`` / ``dsa_indexer_skip_topk_offset`` with Megatron's
own meaning (its ``is_dsa_skip_topk_layer`` / ``source_dsa_compute_layer``). Then, per pipeline
stage and virtual-pipeline chunk, the first DSA layer is an anchor (promoted with reason
``"stage boundary"`` if the pattern said shared) and every shared layer's source is the pattern's
source if it lies earlier in the same chunk, else the nearest earlier anchor of the chunk
(reason ``"source in another chunk"``). :func:`format_schedule` prints the table.

Runtime contract
----------------
* The cache of one forward of one chunk is an :class:`IndexCache` object opened by the chunk's
  first DSA layer and closed by its last; it is reachable (through a context variable, keyed by
  chunk) only between those two calls. Megatron-Core's block and layer forwards pass a fixed
  argument list, so the object cannot ride in the arguments; it is never stored on the config, a
  module or anything that outlives the forward.
* A shared layer uses an entry only if it was written in the open scope of its own chunk by its
  own source layer, the layers ran in order (the scope's cursor is the shared layer's previous
  DSA layer), and batch, sequence lengths, device and packed-sequence boundaries match. Anything
  else is a *promotion*: the layer computes its own top-k with its source anchor's indexer
  weights (no extra parameters; one indexer forward of memory and time; no indexer loss), and
  :data:`STATS` counts the promotion and its reason.
* Activation recompute: inside Megatron's checkpoint, the original (no-grad) forward of every
  DSA layer pushes the indices it used onto its :class:`RecomputeLedger` with a fingerprint of
  its inputs; the recomputed forward pops them and asserts, on the device and without a host
  sync, that the fingerprint matches. Megatron-Core's schedules (no pipelining, 1F1B,
  interleaved) run each chunk's backwards in the order of its forwards, so the ledger is FIFO;
  a mismatch stops the run instead of serving another microbatch's indices.
* Indexer loss: anchors (including stage-boundary promotions) attach the KL loss as usual;
  shared layers contribute none, as in Megatron-Core: their selection is the anchor's, and the
  anchor's loss already trains that selection against the anchor's attention.
"""

from __future__ import annotations

import collections
import contextvars
import itertools
import time
import weakref
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

__all__ = [
    "LayerRole",
    "base_pattern",
    "resolve_schedule",
    "layer_role",
    "format_schedule",
    "print_schedule",
    "IndexCache",
    "IndexCacheStats",
    "STATS",
    "RecomputeLedger",
    "track_index_cache_metrics",
]


# ----------------------------------------------------------------------------- schedule
@dataclass(frozen=True)
class LayerRole:
    layer: int  # 1-based global layer number
    stage: int  # pipeline rank
    chunk: Optional[int]  # virtual-pipeline chunk (None without VPP)
    role: str  # "anchor" | "shared"
    source: int  # layer whose top-k this layer uses (itself for anchors)
    reason: str  # why this role


def base_pattern(config) -> List[Tuple[str, int]]:
    """Per layer ``("F", layer)`` or ``("S", source)`` before pipeline splitting (1-based)."""
    from .config import get_plugin_config

    n = config.num_layers
    pattern = get_plugin_config(config).index_pattern
    if pattern is None:
        from megatron.core.transformer.experimental_attention_variant.dsa import (
            is_dsa_skip_topk_layer,
            source_dsa_compute_layer,
        )

        freq = config.dsa_indexer_topk_freq or 1
        offset = config.dsa_indexer_skip_topk_offset or 0
        out = []
        for layer in range(1, n + 1):
            if freq > 1 and is_dsa_skip_topk_layer(layer, offset, freq):
                out.append(("S", source_dsa_compute_layer(layer, offset, freq)))
            else:
                out.append(("F", layer))
        return out

    items = list(pattern) if isinstance(pattern, str) else list(pattern)
    if len(items) != n:
        raise ValueError(
            f"index_pattern has {len(items)} entries but the model has {n} DSA layers"
        )
    out, last_anchor = [], None
    for layer, item in enumerate(items, start=1):
        if item == "F":
            out.append(("F", layer))
            last_anchor = layer
        elif item == "S":
            if last_anchor is None:
                raise ValueError(
                    f"index_pattern: layer {layer} is shared (S) but no anchor (F) precedes it; "
                    "the pattern must start with F"
                )
            out.append(("S", last_anchor))
        elif isinstance(item, int) and not isinstance(item, bool):
            if not 1 <= item <= n:
                raise ValueError(
                    f"index_pattern: layer {layer} reuses layer {item}, which is outside the "
                    f"model (layers 1..{n})"
                )
            if item >= layer:
                raise ValueError(
                    f"index_pattern: layer {layer} reuses layer {item}, which is not earlier"
                )
            if items[item - 1] != "F":
                raise ValueError(
                    f"index_pattern: layer {layer} reuses layer {item}, which is not an anchor"
                )
            out.append(("S", item))
        else:
            raise ValueError(
                f"index_pattern: layer {layer} has unknown entry {item!r}; use 'F', 'S' or the "
                "number of an earlier anchor layer"
            )
    return out


def _chunks(config) -> List[Tuple[int, Optional[int], List[int]]]:
    """``(stage, chunk, [1-based layers])`` for every pipeline stage / virtual chunk."""
    from megatron.core.transformer.enums import LayerType
    from megatron.core.transformer.transformer_block import get_num_layers_to_build
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    pp = config.pipeline_model_parallel_size or 1
    vpp = config.virtual_pipeline_model_parallel_size
    out = []
    for stage in range(pp):
        for chunk in range(vpp or 1):
            vp = chunk if vpp else None
            layout = getattr(config, "pipeline_model_parallel_layout", None)
            if layout is not None:
                ids = layout.get_layer_id_list(layer_type=LayerType.decoder, vp_stage=vp, pp_rank=stage)
            else:
                off = get_transformer_layer_offset(config, vp_stage=vp, pp_rank=stage)
                ids = range(off, off + get_num_layers_to_build(config, vp_stage=vp, pp_rank=stage))
            out.append((stage, vp, [i + 1 for i in ids]))
    return out


PER_LAYER_GRAPHS = ("local", "transformer_engine")


def resolve_schedule(config) -> List[LayerRole]:
    """The role of every DSA layer of the model, in layer order.

    Per-layer CUDA graphs (``cuda_graph_impl`` ``"local"`` / ``"transformer_engine"``) make
    every layer an anchor (reason ``"per-layer cuda graphs"``): a replayed graph cannot prove
    that another graph's private memory still holds its source's indices.
    """
    pattern = base_pattern(config)
    per_layer_graphs = getattr(config, "cuda_graph_impl", "none") in PER_LAYER_GRAPHS
    roles = []
    for stage, chunk, layers in _chunks(config):
        anchors_here: List[int] = []
        for pos, layer in enumerate(layers):
            kind, src = pattern[layer - 1]
            if per_layer_graphs:
                reason = "pattern" if kind == "F" else "per-layer cuda graphs"
                roles.append(LayerRole(layer, stage, chunk, "anchor", layer, reason))
                continue
            if pos == 0:
                reason = "pattern" if kind == "F" else "stage boundary"
                roles.append(LayerRole(layer, stage, chunk, "anchor", layer, reason))
                anchors_here.append(layer)
            elif kind == "F":
                roles.append(LayerRole(layer, stage, chunk, "anchor", layer, "pattern"))
                anchors_here.append(layer)
            elif src in anchors_here:
                roles.append(LayerRole(layer, stage, chunk, "shared", src, "pattern"))
            else:
                roles.append(
                    LayerRole(layer, stage, chunk, "shared", anchors_here[-1], "source in another chunk")
                )
    return sorted(roles, key=lambda r: r.layer)


def layer_role(config, layer_number: int, roles: Optional[Sequence[LayerRole]] = None) -> LayerRole:
    """The resolved role of one layer (``roles``: an already resolved schedule to search)."""
    for role in resolve_schedule(config) if roles is None else roles:
        if role.layer == layer_number:
            return role
    raise ValueError(f"layer {layer_number} is outside the model (1..{config.num_layers})")


def format_schedule(roles: Sequence[LayerRole]) -> str:
    lines = ["layer | stage/chunk | role   | source | reason", "------|-------------|--------|--------|-------"]
    for r in roles:
        where = f"{r.stage}/{'-' if r.chunk is None else r.chunk}"
        lines.append(f"{r.layer:5d} | {where:>11} | {r.role:6} | {r.source:6d} | {r.reason}")
    return "\n".join(lines)


def print_schedule(config) -> List[LayerRole]:
    """Print and return the resolved anchor/shared table of ``config``'s model."""
    roles = resolve_schedule(config)
    print(format_schedule(roles))
    return roles


# ----------------------------------------------------------------------------- statistics
class IndexCacheStats:
    """Per-step counters (process-local; read and reset by the training loop).

    hits: shared layers served from the cache; computes: anchor top-k computations;
    promotions: shared layers that computed their own top-k, by reason; indexer_s / attention_s:
    time in the indexer (projection + top-k) and in the whole core attention, measured only when
    ``DSAPluginConfig.time_indexer`` is on (it synchronises the device).
    """

    def __init__(self):
        self.reset()

    def reset(self):
        self.hits = 0
        self.computes = 0
        self.promotions: Dict[str, int] = collections.Counter()
        self.recompute_reuses = 0
        self.indexer_s = 0.0
        self.attention_s = 0.0

    def snapshot(self, reset: bool = True) -> dict:
        snap = {
            "cache_hits": self.hits,
            "anchor_computes": self.computes,
            "promotions": dict(self.promotions),
            "recompute_reuses": self.recompute_reuses,
            "indexer_share": (self.indexer_s / self.attention_s) if self.attention_s > 0 else None,
        }
        if reset:
            self.reset()
        return snap


STATS = IndexCacheStats()


class Timer:
    """Wall time of a region, synchronising CUDA first when asked (off by default)."""

    def __init__(self, enabled: bool, device: torch.device):
        self.enabled, self.cuda = enabled, device.type == "cuda"

    def __enter__(self):
        if self.enabled:
            if self.cuda:
                torch.cuda.synchronize()
            self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.enabled:
            if self.cuda:
                torch.cuda.synchronize()
            self.elapsed = time.perf_counter() - self.t0
        else:
            self.elapsed = 0.0


# ----------------------------------------------------------------------------- the cache
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


# ----------------------------------------------------------------------------- recompute
def checkpoint_phase() -> Optional[str]:
    """``"original"`` inside Megatron's checkpointed (no-grad) forward, ``"recompute"`` inside
    its backward recomputation, ``None`` outside any checkpoint."""
    from megatron.core.tensor_parallel.random import is_checkpointing

    if not is_checkpointing():
        return None
    return "recompute" if torch.is_grad_enabled() else "original"


def fingerprint(*tensors: torch.Tensor) -> torch.Tensor:
    """A cheap device-side digest of the inputs (no host sync)."""
    parts = []
    for t in tensors:
        f = t.detach().float().flatten()
        ramp = torch.linspace(-1.0, 1.0, f.numel(), device=f.device, dtype=torch.float32)
        parts.append(torch.stack((f.sum(), (f * ramp).sum(), f.abs().sum())))
    return torch.cat(parts)


def digests_match(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-5) -> torch.Tensor:
    """Device bool: two fingerprints agree up to reduction-order rounding.

    Each tensor's (sum, ramp-weighted sum, abs-sum) may differ by ``rtol`` times its abs-sum:
    far below what another microbatch's data changes, above what a re-run of the same
    computation in another reduction order changes.
    """
    a, b = a.view(-1, 3), b.view(-1, 3)
    tol = rtol * (a[:, 2:3].abs() + 1e-12)
    return ((a - b).abs() <= tol).all()


class RecomputeLedger:
    """FIFO of the indices a layer used in checkpointed forwards, consumed by recomputation."""

    MAX = 1024  # far above any number of microbatches in flight; guards against leaks

    def __init__(self, layer: int):
        self.layer = layer
        self.queue: collections.deque = collections.deque()

    def push(self, indices: torch.Tensor, digest: torch.Tensor) -> None:
        if len(self.queue) >= self.MAX:
            raise RuntimeError(
                f"DSA layer {self.layer}: {self.MAX} checkpointed forwards without a backward; "
                "the recompute ledger refuses to grow further"
            )
        self.queue.append((indices, digest))

    def pop(self, digest: torch.Tensor) -> torch.Tensor:
        if not self.queue:
            raise RuntimeError(
                f"DSA layer {self.layer}: recomputed forward without a recorded original forward"
            )
        indices, saved = self.queue.popleft()
        msg = (
            f"DSA layer {self.layer}: recomputed forward does not match the oldest checkpointed "
            "forward; refusing to reuse its top-k indices"
        )
        # Device-side assert: no host sync; on a mismatch the run stops (on the CPU it raises).
        torch._assert_async(digests_match(saved, digest), msg)
        return indices

    def clear(self) -> None:
        self.queue.clear()


# ----------------------------------------------------------------------------- build links
# (id(config), layer) -> the anchor's indexer module, filled while a model is being built so that
# a shared layer can hold its source's indexer for promotions. Weak values: nothing outlives the
# model.
_BUILT_INDEXERS: "weakref.WeakValueDictionary" = weakref.WeakValueDictionary()


def register_indexer(config, layer: int, indexer: torch.nn.Module) -> None:
    _BUILT_INDEXERS[(id(config), layer)] = indexer


def built_indexer(config, layer: int) -> Optional[torch.nn.Module]:
    return _BUILT_INDEXERS.get((id(config), layer))


def track_index_cache_metrics(iteration: int, writer=None, wandb_writer=None, total_loss_dict=None) -> dict:
    """Snapshot (and reset) :data:`STATS` into Megatron's logging objects; returns the snapshot."""
    snap = STATS.snapshot()
    scalars = {"index cache hits": snap["cache_hits"],
               "index cache promotions": sum(snap["promotions"].values())}
    if snap["indexer_share"] is not None:
        scalars["indexer share of attention time"] = snap["indexer_share"]
    for key, value in scalars.items():
        if writer is not None:
            writer.add_scalar(key, value, iteration)
        if total_loss_dict is not None:
            total_loss_dict[key] = value
    if wandb_writer is not None:
        wandb_writer.log(scalars, iteration)
    return snap
