"""Small, version-guarded, idempotent and undoable patches into Megatron-Core.

Megatron-Core 0.19.2 assumes CUDA in a few places that a CPU run of a DSA model reaches. Each
patch below names the symbol it touches, is applied only where it is needed, keeps the
original object, and is undone by :func:`undo`. Nothing here changes behaviour on a machine
with CUDA except the Hadamard fallback, which only fills in a missing optional package.

=====================  =================================================================
patch                  what and why
=====================  =================================================================
``cpu_device``         (CUDA absent) In the modules listed in ``_CPU_MODULES`` the module
                       global ``torch`` is replaced by a thin proxy whose
                       ``torch.cuda.current_device()`` is ``"cpu"``, whose
                       ``torch.cuda.synchronize()`` is a no-op, and whose tensor factories
                       map ``device="cuda"`` to the CPU. This covers RoPE's device
                       (``RotaryEmbedding`` / ``YarnRotaryEmbedding``), the
                       ``device="cuda"`` literals and ``torch.cuda.current_device()`` in the
                       pipeline schedules and p2p communication, the indexer-loss tracker
                       of ``dsa.DSAIndexerLossLoggingHelper``, the device and the current
                       stream (a no-op stand-in) of the distributed-data-parallel grad
                       buffers (their gradient sync over context-parallel ranks), and the
                       optimizer's bookkeeping tensors.
``cpu_rng``            (CUDA absent) ``tensor_parallel.random._get_cuda_rng_state`` /
                       ``_set_cuda_rng_state`` (used by activation checkpointing to save and
                       restore RNG state) become no-ops: the CPU generator's state, which
                       Megatron saves and restores beside them, is the only one there is.
``cpu_cp_rope``        (CUDA absent) ``rope_utils.get_pos_emb_on_this_cp_rank`` (and the
                       names bound to it in the RoPE modules) builds its chunk index in
                       pinned memory and moves it to CUDA; the replacement selects the same
                       two chunks of the position embedding on its own device (context
                       parallelism on the CPU).
``cpu_checkpoint``     (CUDA absent) ``megatron.core.dist_checkpointing``'s save / load
                       strategies get the same CPU proxy (``torch.cuda.synchronize()`` and
                       the current device): see :mod:`megatron_dsa.patches.checkpoint`.
``rotate_activation``  (``fast_hadamard_transform`` missing) ``dsa.rotate_activation``
                       becomes the PyTorch Hadamard rotation of
                       :mod:`megatron_dsa.kernels.hadamard`, for every dtype.
=====================  =================================================================

Usage::

    import megatron_dsa.patches as patches
    patches.apply()        # idempotent; returns the names of the patches now active
    patches.undo()         # restores every original object
"""

from __future__ import annotations

import importlib
import types
from typing import Dict, List, Tuple

import torch

SUPPORTED_MCORE = ((0, 17), (0, 19))  # inclusive (major, minor) range we test against

# Module path -> reason; each gets the CPU torch proxy as its ``torch`` global.
_CPU_MODULES = {
    "megatron.core.models.common.embeddings.rotary_pos_embedding": "RoPE inv_freq device",
    "megatron.core.models.common.embeddings.yarn_rotary_pos_embedding": "YaRN RoPE device",
    "megatron.core.pipeline_parallel.schedules": 'device="cuda" token counters',
    "megatron.core.pipeline_parallel.p2p_communication": "p2p shape/buffer device",
    "megatron.core.tensor_parallel.mappings": "tensor/sequence-parallel gather buffers",
    "megatron.core.tensor_parallel.random": "the model-parallel RNG tracker's states (SP dropout forks)",
    "megatron.core.tensor_parallel.layers": "sequence-parallel all-gather buffers of the linear layers",
    "megatron.core.transformer.experimental_attention_variant.dsa": "indexer-loss tracker",
    "megatron.core.distributed.param_and_grad_buffer": "DDP grad-buffer device",
    "megatron.core.distributed.distributed_data_parallel": "DDP device / synchronize",
    "megatron.core.optimizer.optimizer": "optimizer found-inf / flag tensors",
    "megatron.core.optimizer.clip_grads": "grad-norm tensors",
    "megatron.core.utils": "local multi-tensor L2 norm without Apex/TE",
}

# name -> list of (owner object, attribute, original value)
_APPLIED: Dict[str, List[Tuple[object, str, object]]] = {}


def mcore_version() -> Tuple[int, int, int]:
    import megatron.core

    parts = (megatron.core.__version__.split("rc")[0].split(".") + ["0", "0"])[:3]
    return tuple(int("".join(c for c in p if c.isdigit()) or 0) for p in parts)


def _check_version(v=None) -> None:
    v = mcore_version() if v is None else tuple(v)
    lo, hi = SUPPORTED_MCORE
    if not (lo <= v[:2] <= hi):
        raise RuntimeError(
            f"megatron_dsa.patches supports megatron-core {lo[0]}.{lo[1]} to {hi[0]}.{hi[1]}, "
            f"found {'.'.join(map(str, v))}; pin megatron-core==0.19.2"
        )


def _resolve(path: str, attr: str):
    try:
        mod = importlib.import_module(path)
    except ImportError as exc:  # pragma: no cover - only on a moved symbol
        raise RuntimeError(f"megatron_dsa.patches: cannot import {path} (moved?)") from exc
    if not hasattr(mod, attr):
        raise RuntimeError(f"megatron_dsa.patches: {path}.{attr} not found (moved?)")
    return mod


def _to_cpu(device):
    if device is None:
        return None
    if isinstance(device, int):
        return "cpu"
    if isinstance(device, str) and device.startswith("cuda"):
        return "cpu"
    if isinstance(device, torch.device) and device.type == "cuda":
        return torch.device("cpu")
    return device


class _NoStream:
    """The current "stream" on a CPU-only machine: work is synchronous, so waits are no-ops."""

    def wait_event(self, *args, **kwargs):
        return None

    def wait_stream(self, *args, **kwargs):
        return None

    def synchronize(self):
        return None

    def record_event(self, *args, **kwargs):
        return _NoEvent()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _NoEvent:
    """A CUDA event on a CPU-only machine: already complete."""

    def record(self, *args, **kwargs):
        return None

    def wait(self, *args, **kwargs):
        return None

    def synchronize(self):
        return None

    def query(self):
        return True


class _CpuCuda:
    """``torch.cuda`` as seen by patched modules on a CPU-only machine."""

    def __init__(self, real):
        self._real = real

    def current_stream(self, *args, **kwargs):
        return _NoStream()

    def current_device(self):
        return "cpu"

    def synchronize(self, *args, **kwargs):
        return None

    def is_available(self):
        return False

    def Stream(self, *args, **kwargs):  # noqa: N802 - torch.cuda.Stream
        return _NoStream()

    def Event(self, *args, **kwargs):  # noqa: N802 - torch.cuda.Event
        return _NoEvent()

    def stream(self, *args, **kwargs):
        return _NoStream()

    def device_count(self):
        return 0

    def set_device(self, *args, **kwargs):
        return None

    def memory_allocated(self, *args, **kwargs):
        return 0

    max_memory_allocated = memory_reserved = max_memory_reserved = memory_allocated

    def reset_peak_memory_stats(self, *args, **kwargs):
        return None

    empty_cache = reset_peak_memory_stats

    def get_rng_state(self, *args, **kwargs):
        return torch.get_rng_state()

    def set_rng_state(self, state, *args, **kwargs):
        torch.set_rng_state(state)

    def __getattr__(self, name):
        return getattr(self._real, name)


class _CpuTorch(types.ModuleType):
    """``torch`` as seen by patched modules: CUDA device requests land on the CPU."""

    _FACTORIES = ("zeros", "ones", "empty", "full", "tensor", "arange", "randn", "rand")

    def __init__(self, real):
        super().__init__("torch")
        self._real = real
        self.cuda = _CpuCuda(real.cuda)
        for name in self._FACTORIES:
            setattr(self, name, self._wrap_factory(getattr(real, name)))

    @staticmethod
    def _wrap_factory(fn):
        def factory(*args, **kwargs):
            if "device" in kwargs:
                kwargs["device"] = _to_cpu(kwargs["device"])
            return fn(*args, **kwargs)

        factory.__wrapped__ = fn
        return factory

    def __getattr__(self, name):
        return getattr(self._real, name)


def proxy_torch(paths) -> List[Tuple[object, str, object]]:
    """Give each module of ``paths`` the CPU ``torch`` proxy (all found, or nothing patched);
    returns the ``(module, "torch", original)`` triples that undo restores."""
    mods = [_resolve(path, "torch") for path in paths]
    proxy = _CpuTorch(torch)
    saved = []
    for mod in mods:
        saved.append((mod, "torch", mod.torch))
        mod.torch = proxy
    return saved


def _apply_cpu_device() -> List[Tuple[object, str, object]]:
    return proxy_torch(_CPU_MODULES)


def _no_cuda_rng_state(*args, **kwargs):
    return torch.empty(0, dtype=torch.uint8)


def _set_no_cuda_rng_state(new_state, *args, **kwargs):
    return None


def _apply_cpu_rng() -> List[Tuple[object, str, object]]:
    path = "megatron.core.tensor_parallel.random"
    mod = _resolve(path, "_get_cuda_rng_state")
    _resolve(path, "_set_cuda_rng_state")
    saved = [(mod, "_get_cuda_rng_state", mod._get_cuda_rng_state),
             (mod, "_set_cuda_rng_state", mod._set_cuda_rng_state)]
    mod._get_cuda_rng_state = _no_cuda_rng_state
    mod._set_cuda_rng_state = _set_no_cuda_rng_state
    return saved


def _pos_emb_on_this_cp_rank(pos_emb, seq_dim, cp_group):
    """Megatron's ``get_pos_emb_on_this_cp_rank`` without pinned memory or CUDA: chunks ``r`` and
    ``2 cp - 1 - r`` of ``2 cp`` along ``seq_dim``."""
    if cp_group is None:
        raise ValueError("cp_group must be provided to get positional embedding per CP rank")
    cp_size, cp_rank = cp_group.size(), cp_group.rank()
    idx = torch.tensor([cp_rank, 2 * cp_size - cp_rank - 1], device=pos_emb.device)
    pos_emb = pos_emb.view(*pos_emb.shape[:seq_dim], 2 * cp_size, -1, *pos_emb.shape[seq_dim + 1:])
    pos_emb = pos_emb.index_select(seq_dim, idx)
    return pos_emb.view(*pos_emb.shape[:seq_dim], -1, *pos_emb.shape[seq_dim + 2:])


_CP_ROPE_MODULES = (
    "megatron.core.models.common.embeddings.rope_utils",
    "megatron.core.models.common.embeddings.rotary_pos_embedding",
    "megatron.core.models.common.embeddings.yarn_rotary_pos_embedding",
)


def _apply_cpu_cp_rope() -> List[Tuple[object, str, object]]:
    saved = []
    for path in _CP_ROPE_MODULES:
        mod = importlib.import_module(path)
        if hasattr(mod, "get_pos_emb_on_this_cp_rank"):
            saved.append((mod, "get_pos_emb_on_this_cp_rank", mod.get_pos_emb_on_this_cp_rank))
            mod.get_pos_emb_on_this_cp_rank = _pos_emb_on_this_cp_rank
    if not saved:
        raise RuntimeError("megatron_dsa.patches: get_pos_emb_on_this_cp_rank not found (moved?)")
    return saved


def _apply_rotate_activation() -> List[Tuple[object, str, object]]:
    from megatron_dsa.kernels.hadamard import rotate_activation

    mod = _resolve("megatron.core.transformer.experimental_attention_variant.dsa", "rotate_activation")
    saved = [(mod, "rotate_activation", mod.rotate_activation)]
    mod.rotate_activation = rotate_activation
    return saved


def needed() -> List[str]:
    """The patches this machine needs."""
    names = []
    if not torch.cuda.is_available():
        names += ["cpu_device", "cpu_rng", "cpu_cp_rope", "cpu_checkpoint"]
    dsa = importlib.import_module("megatron.core.transformer.experimental_attention_variant.dsa")
    if getattr(dsa, "hadamard_transform", None) is None:
        names.append("rotate_activation")
    return names


_APPLIERS = {
    "cpu_device": _apply_cpu_device,
    "cpu_rng": _apply_cpu_rng,
    "cpu_cp_rope": _apply_cpu_cp_rope,
    "rotate_activation": _apply_rotate_activation,
    "cpu_checkpoint": lambda: importlib.import_module(f"{__name__}.checkpoint").apply_cpu_checkpoint(),
}


def apply(names=None) -> List[str]:
    """Apply the needed patches (or exactly ``names``). Idempotent. Returns active names."""
    _check_version()
    for name in needed() if names is None else names:
        if name not in _APPLIERS:
            raise ValueError(f"unknown patch {name!r}; known: {sorted(_APPLIERS)}")
        if name not in _APPLIED:
            _APPLIED[name] = _APPLIERS[name]()
    return sorted(_APPLIED)


def undo(names=None) -> None:
    """Restore the original objects of the given (default: all) applied patches."""
    for name in list(_APPLIED) if names is None else names:
        for owner, attr, original in reversed(_APPLIED.pop(name, [])):
            setattr(owner, attr, original)


def active() -> List[str]:
    return sorted(_APPLIED)
