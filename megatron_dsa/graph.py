"""CUDA-graph runtime for DSA: a host-sync audit, shape classes and a graph-dispatch cache.

* :class:`SyncAudit` — a dispatch mode that records every op that forces the host to learn a
  device value (``.item()``, ``nonzero``, ``unique``, boolean-mask indexing that shrinks a
  tensor, ``torch.equal``, Python ``if`` on a tensor, ...). Tests run the DSA layer's forward
  and backward under it, on the CPU, and require an empty record.
* :class:`ShapeClass` / :class:`ShapeClassRegistry` — a small declared set of token-count
  buckets, each with its maximum active tokens and the fixed buffer sizes that follow. A
  runtime size that fits no class follows the declared policy: ``"eager"`` (run uncaptured and
  count the miss) or ``"strict"`` (raise :class:`ShapeClassMiss`); never an unbounded capture.
* :class:`GraphDispatch` — captures a function once per shape class on static, padded input
  buffers and replays it with new inputs copied in. Set the module constant
  :data:`_NO_GRAPH_CACHE` to ``True`` to force a fresh capture on every call (a debugging
  switch that lives in the source, so it reaches workers that environment variables do not).

Padding contract: inputs are padded along their token dim to the class's ``max_tokens`` with
zeros, and the dispatched function must be row-independent for the real rows (DSA is: causal
windows never reach padded keys, padded rows only see padded or earlier keys). Outputs are
sliced back to the real rows and copied out of the static buffers.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = [
    "_NO_GRAPH_CACHE",
    "SyncAudit",
    "ShapeClass",
    "ShapeClassMiss",
    "ShapeClassRegistry",
    "GraphDispatch",
    "dsa_sparse_forward",
]

# Toggle to True to disable graph caching (fresh capture every call, for debugging).
_NO_GRAPH_CACHE = False


# ----------------------------------------------------------------------------- sync audit
_SYNC_OPS = {
    "aten::_local_scalar_dense": "tensor -> Python scalar (.item(), float(t), if t:, tolist)",
    "aten::nonzero": "nonzero (data-dependent shape)",
    "aten::nonzero_static": None,  # fixed size: allowed
    "aten::unique_dim": "unique",
    "aten::_unique": "unique",
    "aten::_unique2": "unique",
    "aten::unique_consecutive": "unique_consecutive",
    "aten::masked_select": "masked_select (data-dependent shape)",
    "aten::equal": "torch.equal (host bool)",
    "aten::is_nonzero": "bool(tensor)",
    "aten::repeat_interleave": "repeat_interleave without output_size",
    "aten::bincount": "bincount (data-dependent shape)",
    "aten::histc": None,
}


class SyncAudit(TorchDispatchMode):
    """Records ops that would force a device->host synchronisation (or a data-dependent shape).

    ``audit.violations`` lists ``(op, why)``. Boolean-mask indexing shows up as
    ``aten::index`` with a bool index, which is recorded too.
    """

    def __init__(self):
        super().__init__()
        self.violations: List[Tuple[str, str]] = []
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name
        self.ops[name] += 1
        why = _SYNC_OPS.get(name)
        if why:
            self.violations.append((name, why))
        elif name in ("aten::index", "aten::index_put", "aten::index_put_", "aten::_index_put_impl_"):
            indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or ()):
                self.violations.append((name, "boolean-mask indexing (data-dependent shape)"))
        return func(*args, **kwargs)


# ----------------------------------------------------------------------------- shape classes
@dataclass(frozen=True)
class ShapeClass:
    """A token-count bucket: every input with at most ``max_tokens`` rows runs padded to it."""

    name: str
    max_tokens: int
    buffers: Dict[str, Tuple[int, ...]] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self):
        if self.max_tokens <= 0:
            raise ValueError(f"shape class {self.name!r}: max_tokens must be positive")


class ShapeClassMiss(RuntimeError):
    pass


class ShapeClassRegistry:
    """The declared classes (smallest fitting class wins) and the miss policy."""

    POLICIES = ("eager", "strict")

    def __init__(self, classes: Sequence[ShapeClass], policy: str = "eager"):
        if policy not in self.POLICIES:
            raise ValueError(f"miss policy must be one of {self.POLICIES}, got {policy!r}")
        if not classes:
            raise ValueError("declare at least one shape class")
        names = [c.name for c in classes]
        if len(set(names)) != len(names):
            raise ValueError(f"shape class names must be unique, got {names}")
        self.classes = sorted(classes, key=lambda c: c.max_tokens)
        if len({c.max_tokens for c in self.classes}) != len(self.classes):
            raise ValueError("two shape classes have the same max_tokens")
        self.policy = policy
        self.hits = collections.Counter()
        self.misses = 0

    @classmethod
    def powers_of_two(cls, smallest: int, largest: int, policy: str = "eager", **buffers_per_token):
        """Classes ``smallest, 2*smallest, ..., largest`` (a bounded set)."""
        out, n = [], smallest
        while n <= largest:
            out.append(ShapeClass(f"T{n}", n, {k: (n,) + tuple(v) for k, v in buffers_per_token.items()}))
            n *= 2
        return cls(out, policy)

    def resolve(self, tokens: int) -> Optional[ShapeClass]:
        for c in self.classes:
            if tokens <= c.max_tokens:
                self.hits[c.name] += 1
                return c
        self.misses += 1
        if self.policy == "strict":
            raise ShapeClassMiss(
                f"{tokens} tokens fit no declared shape class (largest: "
                f"{self.classes[-1].max_tokens}); policy is strict"
            )
        return None


# ----------------------------------------------------------------------------- dispatch
class _Captured:
    def __init__(self, fn, cls: ShapeClass, inputs: Sequence[torch.Tensor], use_graph: bool, signature):
        self.cls = cls
        self.signature = signature
        self.static_in = [torch.zeros((cls.max_tokens,) + tuple(t.shape[1:]), dtype=t.dtype, device=t.device)
                          for t in inputs]
        self.use_graph = use_graph
        self.fn = fn
        if use_graph:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # warm-up outside capture (compiles kernels)
                fn(*self.static_in)
            torch.cuda.current_stream().wait_stream(stream)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.static_out = fn(*self.static_in)
        else:
            self.graph = None
            self.static_out = None

    def load(self, inputs: Sequence[torch.Tensor]) -> None:
        for buf, t in zip(self.static_in, inputs):
            n = t.shape[0]
            buf[:n].copy_(t)
            buf[n:].zero_()

    def run(self):
        if self.graph is not None:
            self.graph.replay()
            return self.static_out
        return self.fn(*self.static_in)


class GraphDispatch:
    """Graph-dispatch cache keyed by shape class.

    ``fn(*inputs)`` takes tensors whose dim 0 is the token dim and returns a tuple of tensors
    whose dim 0 is the token dim. ``dispatch(*inputs)`` pads to the input's class, replays that
    class's graph (captured on first use) and returns the outputs' real rows. Without CUDA the
    same static-buffer path runs eagerly (no capture).
    """

    def __init__(self, fn: Callable, registry: ShapeClassRegistry):
        self.fn = fn
        self.registry = registry
        self._state: Dict[str, _Captured] = {}
        self.captures = 0
        self.eager_fallbacks = 0

    def __call__(self, *inputs: torch.Tensor):
        tokens = inputs[0].shape[0]
        if any(t.shape[0] != tokens for t in inputs):
            raise ValueError("all dispatched inputs must share their token dim (dim 0)")
        cls = self.registry.resolve(tokens)
        if cls is None:  # declared miss policy: eager, counted
            self.eager_fallbacks += 1
            return tuple(o.clone() for o in self.fn(*inputs))
        if _NO_GRAPH_CACHE:
            self._state.pop(cls.name, None)  # evict before lookup: fresh capture every call
        st = self._state.get(cls.name)
        signature = tuple((tuple(t.shape[1:]), t.dtype, t.device) for t in inputs)
        if st is not None and st.signature != signature:
            raise ValueError(
                f"shape class {cls.name}: inputs changed beyond the token dim "
                f"({st.signature} -> {signature}); declare another dispatcher"
            )
        if st is None:
            st = _Captured(self.fn, cls, inputs, use_graph=inputs[0].is_cuda, signature=signature)
            self._state[cls.name] = st
            self.captures += 1
        st.load(inputs)
        outs = st.run()
        return tuple(o[:tokens].clone() for o in outs)


# ----------------------------------------------------------------------------- DSA step
def dsa_sparse_forward(q_i, k_i, w_i, q, kv, *, topk: int, softmax_scale: float, d_v: int,
                       backend: str = "auto"):
    """One causal sequence, forward only: top-k selection then sparse MLA attention.

    q_i ``[T, H, D]``, k_i ``[T, D]``, w_i ``[T, H]``, q ``[T, Hq, Dqk]``, kv ``[T, Dqk]`` ->
    ``(indices [T, topk], out [T, Hq, d_v], lse [T, Hq])``. Fixed shapes, no host sync: the
    function a :class:`GraphDispatch` captures per shape class.
    """
    from .kernels.indexer import indexer_topk
    from .kernels.sparse_mla import sparse_mla

    idx, _ = indexer_topk(q_i.unsqueeze(0), k_i.unsqueeze(0), w_i.unsqueeze(0), topk, backend=backend)
    idx = idx[0]
    out, lse = sparse_mla(q, kv, idx, softmax_scale, d_v=d_v, backend=backend)
    return idx, out, lse
