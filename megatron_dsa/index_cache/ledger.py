"""The recompute ledger: activation recompute reuses exactly the indices of its original forward.

Scope
-----
Every call of Megatron's activation checkpoint (``tensor_parallel.checkpoint``, i.e.
``CheckpointFunction``: full recompute and selective ``core_attn`` recompute) gets its own
:class:`RecomputeScope`. :func:`install` wraps the ``run_function`` that Megatron hands to
``CheckpointFunction.forward`` so that it runs inside that scope, both in the original (no-grad)
forward and in the recomputation during backward, which calls the same function object. The
original forward of a DSA layer *puts* its top-k indices and a fingerprint of its input into the
scope; the recomputation *takes* them back. The scope lives only in that checkpoint's autograd
context, so it is freed with it:

* after the checkpoint's backward (one step's forward-backward of one microbatch);
* when a forward-only pass (``forward_backward_func(forward_only=True)``, train or eval mode)
  or an aborted step drops the graph without a backward: nothing is left behind;
* a retry after an exception, or a model rebuilt in the same process, starts from nothing.

No global state is read: not Megatron's ``IS_CHECKPOINTING`` flag (which an exception can leave
set), not an order of microbatches (any schedule, any number in flight). A DSA layer outside any
checkpoint scope computes top-k as usual.

Fingerprint
-----------
:func:`fingerprint` is an exact hash of the input's bit pattern (64-bit wrap-around sum of the
words times fixed odd multipliers, per chunk, chained): two inputs that differ in one bit differ
in it (up to a 2^-64 collision), with no tolerance and no host sync. A recomputation whose input
does not match its original's is a bug (a non-reproducible forward); :func:`check_recompute`
makes it fail loudly once, leaving nothing behind: on the CPU it raises, on a GPU (where raising
needs a host sync) the layer's recomputed output becomes NaN, so the step's loss and gradients
are NaN and Megatron's NaN check stops the step, and ``STATS.snapshot()["recompute_mismatches"]``
counts it.
"""

from __future__ import annotations

import contextvars
import functools
from typing import Dict, Optional, Tuple

import torch

__all__ = ["RecomputeScope", "recompute_scope", "install", "uninstall", "installed", "fingerprint",
           "digests_match", "check_recompute"]

_SCOPE: contextvars.ContextVar[Optional["RecomputeScope"]] = contextvars.ContextVar(
    "megatron_dsa_recompute_scope", default=None)


class RecomputeScope:
    """The indices the DSA layers used in one checkpointed forward, for its recomputation."""

    __slots__ = ("entries",)

    def __init__(self):
        self.entries: Dict[int, Tuple[torch.Tensor, torch.Tensor]] = {}

    def put(self, layer: int, indices: torch.Tensor, digest: torch.Tensor) -> None:
        self.entries[layer] = (indices, digest)

    def take(self, layer: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(indices, digest)`` of the original forward of ``layer`` in this checkpoint."""
        entry = self.entries.pop(layer, None)
        if entry is None:
            raise RuntimeError(
                f"DSA layer {layer}: recomputed forward without a recorded original forward in this "
                "checkpoint (the original forward did not run this layer)"
            )
        return entry


def recompute_scope() -> Optional[RecomputeScope]:
    """The scope of the Megatron checkpoint this code runs in (``None`` outside any)."""
    return _SCOPE.get()


def _scoped(run_function, scope: RecomputeScope):
    @functools.wraps(run_function)
    def run(*args, **kwargs):
        token = _SCOPE.set(scope)
        try:
            return run_function(*args, **kwargs)
        finally:
            _SCOPE.reset(token)

    run.__megatron_dsa_scope__ = scope
    return run


_ORIGINAL = {}


def install() -> bool:
    """Wrap ``CheckpointFunction.forward`` so each checkpoint call runs in its own scope.

    Megatron-Core has no hook that tells a module which checkpoint call it runs in, so this is a
    small patch: idempotent, version-guarded by the symbol it needs, undone by
    :func:`uninstall`. Returns whether it is installed."""
    from megatron.core.tensor_parallel import random as mrandom

    fn_cls = getattr(mrandom, "CheckpointFunction", None)
    if fn_cls is None or not hasattr(fn_cls, "forward"):
        raise RuntimeError("megatron.core.tensor_parallel.random.CheckpointFunction.forward not found: this "
                           "Megatron-Core version is not supported by megatron-dsa's recompute ledger")
    if "forward" in _ORIGINAL:
        return True
    original = fn_cls.forward

    def forward(ctx, run_function, distribute_saved_activations, *args):
        return original(ctx, _scoped(run_function, RecomputeScope()), distribute_saved_activations, *args)

    forward.__megatron_dsa_original__ = original
    fn_cls.forward = staticmethod(forward)
    _ORIGINAL["forward"] = (fn_cls, original)
    return True


def uninstall() -> None:
    """Restore Megatron-Core's ``CheckpointFunction.forward``."""
    entry = _ORIGINAL.pop("forward", None)
    if entry is not None:
        fn_cls, original = entry
        fn_cls.forward = staticmethod(original)


def installed() -> bool:
    return "forward" in _ORIGINAL


_HASH_CHUNK = 1 << 22  # words per chunk: bounds the int64 temporaries (32 MiB)
_WORD = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_MULTIPLIERS: Dict[torch.device, torch.Tensor] = {}


def _multipliers(device: torch.device) -> torch.Tensor:
    m = _MULTIPLIERS.get(device)
    if m is None:
        g = torch.Generator().manual_seed(0x5EED_D5A)
        m = torch.randint(-(2**62), 2**62, (_HASH_CHUNK,), generator=g, dtype=torch.int64) * 2 + 1  # odd
        m = _MULTIPLIERS[device] = m.to(device)
    return m


def fingerprint(t: torch.Tensor) -> torch.Tensor:
    """Exact 64-bit hash (0-dim int64, on ``t``'s device) of ``t``'s values' bit patterns.

    Changing any single element changes it (the multipliers are odd, so a nonzero difference
    times a multiplier is nonzero modulo 2^64). Device ops only, no host sync; fixed shapes."""
    flat = t.detach().contiguous().reshape(-1)
    words = flat.view(_WORD[flat.element_size()])
    mult = _multipliers(flat.device)
    h = torch.zeros((), dtype=torch.int64, device=flat.device)
    for start in range(0, words.numel(), _HASH_CHUNK):
        chunk = words[start:start + _HASH_CHUNK].to(torch.int64)
        h = h * 1000003 + (chunk * mult[: chunk.numel()]).sum()
    return h


def digests_match(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Device bool: the two fingerprints are equal."""
    return a == b


def check_recompute(out: torch.Tensor, match: torch.Tensor, layer: int, stats) -> torch.Tensor:
    """Fail a recomputation whose input did not match its original forward's (see the module
    docstring): raise on the CPU; on a GPU return NaN outputs and count the mismatch."""
    if out.device.type != "cuda":
        torch._assert_async(match, f"DSA layer {layer}: recomputed forward does not match its original "
                                   "forward (input fingerprint differs); refusing to reuse its top-k indices")
        return out
    stats.count_mismatch(~match)
    return torch.where(match, out, torch.full_like(out, float("nan")))
