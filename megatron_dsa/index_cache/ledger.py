"""The recompute ledger: activation recompute reuses exactly the indices of the original forward.

Inside Megatron's checkpoint, the original (no-grad) forward of every DSA layer pushes the
indices it used onto its :class:`RecomputeLedger` with a fingerprint of its inputs; the
recomputed forward pops them and asserts, on the device and without a host sync, that the
fingerprint matches. Megatron-Core's schedules (no pipelining, 1F1B, interleaved) run each
chunk's backwards in the order of its forwards, so the ledger is FIFO; a mismatch stops the run
instead of serving another microbatch's indices.
"""

from __future__ import annotations

import collections
from typing import Optional

import torch

__all__ = ["checkpoint_phase", "fingerprint", "digests_match", "RecomputeLedger"]


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
