"""Per-step index-cache counters and the optional indexer timer, and their Megatron logging."""

from __future__ import annotations

import collections
import time
from typing import Dict

import torch

__all__ = ["IndexCacheStats", "STATS", "Timer", "track_index_cache_metrics"]


class IndexCacheStats:
    """Per-step counters (process-local; read and reset by the training loop).

    hits: shared layers served from the cache; computes: anchor top-k computations;
    promotions: shared layers that computed their own top-k, by reason; indexer_s / attention_s:
    time in the indexer (projection + top-k) and in the whole core attention, measured only when
    ``DSAPluginConfig.time_indexer`` is on (it synchronises the device); recompute_mismatches:
    GPU recomputations whose input differed from their original forward's (a device counter,
    read by :meth:`snapshot`; see ``ledger.check_recompute``).
    """

    def __init__(self):
        self.reset()

    def reset(self):
        self.hits = 0
        self.computes = 0
        self.promotions: Dict[str, int] = collections.Counter()
        self.recompute_reuses = 0
        self.mismatches: Dict[torch.device, torch.Tensor] = {}
        self.indexer_s = 0.0
        self.attention_s = 0.0

    def count_mismatch(self, mismatch: torch.Tensor) -> None:
        """Add a device bool to the mismatch counter of its device (no host sync)."""
        counter = self.mismatches.get(mismatch.device)
        if counter is None:
            counter = self.mismatches[mismatch.device] = torch.zeros((), dtype=torch.int64, device=mismatch.device)
        counter.add_(mismatch.to(torch.int64))

    def snapshot(self, reset: bool = True) -> dict:
        """The counters as plain numbers (reads the device counters: call it at logging time)."""
        snap = {
            "cache_hits": self.hits,
            "anchor_computes": self.computes,
            "promotions": dict(self.promotions),
            "recompute_reuses": self.recompute_reuses,
            "recompute_mismatches": int(sum(int(c.item()) for c in self.mismatches.values())),
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
