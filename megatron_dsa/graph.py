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
  buffers and replays it with new inputs copied in; with ``grad_inputs`` it captures the
  backward too and returns outputs that autograd differentiates by replaying that graph.
  ``cache=False`` (``DSAPluginConfig.graph_cache=False`` in the layer) forces a fresh capture
  on every call, to take the cache out of the question while debugging.
* :class:`LayerGraphs` / :func:`layer_step` — the DSA core attention's runtime: with
  ``DSAPluginConfig.graph_shape_classes`` set, a packed (THD) batch's top-k selection and
  sparse attention (forward and backward) run padded to the batch's class and replayed.
* :data:`STATS` (:class:`GraphStats`) — hits, misses, captures, replays and eager fallbacks.

Padding contract: inputs are padded along their token dim to the class's ``max_tokens`` (with
zeros, or each input's declared pad value), and the dispatched function must be row-independent
for the real rows (DSA is: the padded rows get empty windows, so they select nothing, and no
real row's window reaches a padded key). Outputs are sliced back to the real rows and copied
out of the static buffers; gradients likewise.
"""

from __future__ import annotations

import collections
import weakref
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = [
    "STATS",
    "GraphStats",
    "SyncAudit",
    "ShapeClass",
    "ShapeClassMiss",
    "ShapeClassRegistry",
    "GraphDispatch",
    "LayerGraphs",
    "layer_step",
    "dsa_sparse_forward",
]

# ----------------------------------------------------------------------------- statistics
@dataclass
class GraphStats:
    """Counters of the graph runtime, readable as ``megatron_dsa.graph.STATS``.

    * ``hits``: layer calls (or standalone dispatches) per shape class that ran padded to it.
    * ``misses``: token counts that fit no declared class (policy ``eager``; ``strict`` raises).
    * ``captures``: graphs built (one per class, layer, op and grad mode; more with
      ``graph_cache=False`` or pipelined micro-batches in flight).
    * ``replays``: forward replays; ``backward_replays``: backward replays.
    * ``eager``: why a call (or one op of it) ran uncaptured, by reason: ``miss``, ``inflight``
      (every graph of the class awaits its backward), ``not_thd``, ``context_parallel``,
      ``time_indexer``, ``outer_capture``, ``loss_target_attention``.
    """

    hits: collections.Counter = field(default_factory=collections.Counter)
    misses: int = 0
    captures: int = 0
    replays: int = 0
    backward_replays: int = 0
    eager: collections.Counter = field(default_factory=collections.Counter)

    def reset(self) -> None:
        self.hits.clear()
        self.eager.clear()
        self.misses = self.captures = self.replays = self.backward_replays = 0

    def as_dict(self) -> dict:
        return dict(hits=dict(self.hits), misses=self.misses, captures=self.captures, replays=self.replays,
                    backward_replays=self.backward_replays, eager=dict(self.eager))


STATS = GraphStats()


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
def _pad(t: torch.Tensor, rows: int, value) -> torch.Tensor:
    """``t`` padded along dim 0 to ``rows`` with ``value`` (differentiable)."""
    extra = rows - t.shape[0]
    if extra == 0:
        return t
    return torch.cat([t, t.new_full((extra,) + tuple(t.shape[1:]), value)])


class _Lease:
    """A training forward's claim on an instance's static buffers until its backward ran (or
    its autograd graph was freed without one)."""

    def __init__(self, inst: "_Instance"):
        self.inst = inst
        self.generation = inst.generation
        inst.busy = True
        self.open = True

    def check(self) -> "_Instance":
        if not self.open or self.inst.generation != self.generation:
            raise RuntimeError(
                "graphed DSA op: this backward's saved buffers were reused by a later forward "
                "(a second backward through the same graph, retain_graph=True, is not supported)"
            )
        return self.inst

    def release(self) -> None:
        if self.open:
            self.open = False
            self.inst.busy = False

    def __del__(self):  # the autograd graph was freed without a backward
        self.release()


class _Instance:
    """Static padded buffers of one shape class (and grad mode) and the function run on them:
    captured as CUDA graphs (forward; with grad inputs also backward) or, with
    ``use_graph=False``, the same buffers run eagerly (so CPU tests exercise the padding)."""

    def __init__(self, fn, cls: ShapeClass, inputs: Sequence[torch.Tensor], pads, needs_grad: Tuple[bool, ...],
                 use_graph: bool, signature, warmup: int = 2):
        self.cls = cls
        self.signature = signature
        self.fn = fn
        self.pads = pads
        self.needs_grad = needs_grad
        self.train = any(needs_grad)
        self.use_graph = use_graph
        self.generation = 0
        self.busy = False
        C = cls.max_tokens
        self.static_in = [torch.full((C,) + tuple(t.shape[1:]), p, dtype=t.dtype, device=t.device)
                          for t, p in zip(inputs, pads)]
        for buf, g in zip(self.static_in, needs_grad):
            buf.requires_grad_(g)
        self.static_out = self.static_gout = self.static_gin = None
        self.diff_out: List[int] = []
        self.graph = self.bwd_graph = None
        if not use_graph:
            return
        # warm-up outside capture on a side stream (compiles kernels, settles the allocator)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(warmup):
                with torch.set_grad_enabled(self.train):
                    outs = tuple(fn(*self.static_in))
                if self.train:
                    diff = [o for o in outs if o.requires_grad]
                    torch.autograd.grad(diff, self._grad_leaves(), [torch.zeros_like(o) for o in diff],
                                        allow_unused=True)
                del outs
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            with torch.set_grad_enabled(self.train):
                self.static_out = tuple(fn(*self.static_in))
        if self.train:
            self.diff_out = [i for i, o in enumerate(self.static_out) if o.requires_grad]
            self.static_gout = [torch.zeros_like(self.static_out[i]) for i in self.diff_out]
            self.bwd_graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.bwd_graph, pool=self.graph.pool()):
                # retain_graph: the saved activations stay allocated for every later replay
                self.static_gin = torch.autograd.grad(
                    [self.static_out[i] for i in self.diff_out], self._grad_leaves(), self.static_gout,
                    retain_graph=True, allow_unused=True,
                )

    def _grad_leaves(self):
        return [b for b, g in zip(self.static_in, self.needs_grad) if g]

    def load(self, inputs: Sequence[torch.Tensor]) -> None:
        with torch.no_grad():
            for buf, t, p in zip(self.static_in, inputs, self.pads):
                n = t.shape[0]
                buf[:n].copy_(t)
                buf[n:].fill_(p)

    def forward(self) -> Tuple[torch.Tensor, ...]:
        self.generation += 1
        if self.graph is not None:
            self.graph.replay()
            return self.static_out
        with torch.set_grad_enabled(self.train):
            self.static_out = tuple(self.fn(*self.static_in))
        self.diff_out = [i for i, o in enumerate(self.static_out) if o.requires_grad]
        return self.static_out

    def backward(self, grads: Sequence[Optional[torch.Tensor]], n: int):
        """Gradients for the grad inputs (padded, static or fresh) from the outputs' ``grads``."""
        gout = []
        for k, i in enumerate(self.diff_out):
            buf = self.static_gout[k] if self.graph is not None else torch.zeros_like(self.static_out[i])
            g = grads[i]
            with torch.no_grad():
                if g is None:
                    buf.zero_()
                else:
                    buf[:n].copy_(g)
                    buf[n:].zero_()
            gout.append(buf)
        if self.bwd_graph is not None:
            self.bwd_graph.replay()
            return self.static_gin
        with torch.enable_grad():
            return torch.autograd.grad([self.static_out[i] for i in self.diff_out], self._grad_leaves(), gout,
                                       allow_unused=True)


class _Replay(torch.autograd.Function):
    """Autograd node of a training replay: forward copies in and replays, backward copies the
    output gradients in and replays the backward graph."""

    @staticmethod
    def forward(ctx, inst: _Instance, n: int, stats, *inputs):
        inst.load(inputs)
        static_out = inst.forward()
        ctx.lease = _Lease(inst)
        ctx.n, ctx.stats = n, stats
        outs = tuple(o[:n].detach().clone() for o in static_out)
        ctx.mark_non_differentiable(*[o for o, s in zip(outs, static_out) if not s.requires_grad])
        return outs

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads):
        inst = ctx.lease.check()
        gin = inst.backward(grads, ctx.n)
        if inst.graph is not None and ctx.stats is not None:
            ctx.stats.backward_replays += 1
        it = iter(gin)
        out = []
        for g in inst.needs_grad:
            d = next(it) if g else None
            out.append(None if d is None else d[: ctx.n].clone())
        ctx.lease.release()
        return (None, None, None, *out)


class GraphDispatch:
    """Graph-dispatch cache keyed by shape class.

    ``fn(*inputs)`` takes tensors whose dim 0 is the token dim and returns a tuple of tensors
    whose dim 0 is the token dim. ``dispatch(*inputs)`` pads to the input's class, replays that
    class's graph (captured on first use) and returns the outputs' real rows.

    Args:
        fn: the function to capture (row-independent for the real rows, no host syncs).
        registry: the shape classes and the miss policy.
        cache: ``False`` captures afresh on every call (debugging: takes the cache out of the
            question); the default keeps one graph per class and grad mode.
        use_graph: ``None`` captures for CUDA inputs and runs the same static buffers eagerly
            otherwise; ``False`` never captures (the padded path, eagerly, e.g. for tests).
        pad_values: per input, the value of its padded rows (default 0).
        grad_inputs: positions of the inputs that may require grad. When grad is enabled and one
            of them requires it, the backward is captured as well and the outputs are
            differentiable (the backward replays the backward graph).
        max_instances: graphs per class and grad mode whose backward may be pending at once
            (pipelined micro-batches in flight); one more forward runs eagerly (counted as
            ``inflight``), never on buffers a pending backward still needs.
        stats: a :class:`GraphStats` to count into besides this object's own counters.
    """

    def __init__(self, fn: Callable, registry: ShapeClassRegistry, *, cache: bool = True,
                 use_graph: Optional[bool] = None, pad_values: Optional[Sequence] = None,
                 grad_inputs: Sequence[int] = (), max_instances: int = 1, stats: Optional[GraphStats] = STATS):
        if not isinstance(cache, bool):
            raise TypeError(f"GraphDispatch cache must be True or False, got {cache!r}")
        if isinstance(max_instances, bool) or not isinstance(max_instances, int) or max_instances < 1:
            raise ValueError(f"GraphDispatch max_instances must be a positive int, got {max_instances!r}")
        self.fn = fn
        self.registry = registry
        self.cache = cache
        self.use_graph = use_graph
        self.pad_values = tuple(pad_values) if pad_values is not None else None
        self.grad_inputs = tuple(grad_inputs)
        self.max_instances = max_instances
        self.stats = stats
        self._state: Dict[tuple, List[_Instance]] = {}
        self._signature: Dict[str, tuple] = {}
        self.captures = 0
        self.replays = 0
        self.eager_fallbacks = 0

    def _eager(self, inputs, reason: str):
        self.eager_fallbacks += 1
        if self.stats is not None:
            self.stats.eager[reason] += 1
        outs = tuple(self.fn(*inputs))
        return outs if torch.is_grad_enabled() else tuple(o.clone() for o in outs)

    def __call__(self, *inputs: torch.Tensor):
        tokens = inputs[0].shape[0]
        cls = self.registry.resolve(tokens)
        if self.stats is not None:
            if cls is None:
                self.stats.misses += 1
            else:
                self.stats.hits[cls.name] += 1
        return self.run(cls, *inputs)

    def run(self, cls: Optional[ShapeClass], *inputs: torch.Tensor):
        """Dispatch into ``cls`` (already resolved); ``None``: the declared miss policy's eager run."""
        tokens = inputs[0].shape[0]
        if any(t.shape[0] != tokens for t in inputs):
            raise ValueError("all dispatched inputs must share their token dim (dim 0)")
        if cls is None:  # declared miss policy: eager, counted
            return self._eager(inputs, "miss")
        if tokens > cls.max_tokens:
            raise ValueError(f"{tokens} tokens do not fit shape class {cls.name} ({cls.max_tokens})")
        pads = self.pad_values if self.pad_values is not None else (0,) * len(inputs)
        if len(pads) != len(inputs):
            raise ValueError(f"{len(inputs)} inputs but {len(pads)} pad values")
        grad = torch.is_grad_enabled()
        needs_grad = tuple(grad and i in self.grad_inputs and t.requires_grad for i, t in enumerate(inputs))
        signature = tuple((tuple(t.shape[1:]), t.dtype, t.device) for t in inputs)
        known = self._signature.setdefault(cls.name, signature)
        if known != signature:
            raise ValueError(
                f"shape class {cls.name}: inputs changed beyond the token dim "
                f"({known} -> {signature}); declare another dispatcher"
            )
        key = (cls.name, needs_grad)
        pool = self._state.setdefault(key, [])
        if not self.cache:
            pool[:] = [inst for inst in pool if inst.busy]  # evict: a fresh capture every call
        inst = next((i for i in pool if not i.busy), None)
        if inst is None:
            if len(pool) >= self.max_instances:
                return self._eager(inputs, "inflight")
            use_graph = inputs[0].is_cuda if self.use_graph is None else self.use_graph
            inst = _Instance(self.fn, cls, inputs, pads, needs_grad, use_graph, signature)
            pool.append(inst)
            self.captures += 1
            if self.stats is not None and use_graph:
                self.stats.captures += 1
        if inst.graph is not None:
            self.replays += 1
            if self.stats is not None:
                self.stats.replays += 1
        if any(needs_grad):
            return _Replay.apply(inst, tokens, self.stats, *inputs)
        inst.load(inputs)
        return tuple(o[:tokens].clone() for o in inst.forward())


# ----------------------------------------------------------------------------- DSA layer runtime
class LayerGraphs:
    """One DSA core attention's graph runtime: the declared shape classes (from
    ``DSAPluginConfig``) and two dispatchers, top-k selection (forward only) and sparse
    attention (forward and backward), so that index sharing and recompute reuse the graphed
    attention with indices from elsewhere."""

    def __init__(self, layer, plugin, deterministic: bool):
        from .kernels.indexer import indexer_topk
        from .kernels.sparse_mla import sparse_mla

        self.plugin = plugin
        self.deterministic = deterministic
        self.registry = ShapeClassRegistry(
            [ShapeClass(f"T{n}", n) for n in plugin.graph_shape_classes], policy=plugin.graph_miss_policy
        )
        topk, relu, ibackend = layer.index_topk, bool(layer.config.dsa_indexer_scoring_relu), plugin.indexer_backend
        scale, d_v, abackend = layer.softmax_scale, layer.latent_dim, plugin.attention_backend
        packing = plugin.attention_row_packing

        def select(q_i, k_i, w_i, starts, ends):
            idx, _ = indexer_topk(q_i.unsqueeze(0), k_i.unsqueeze(0), w_i.unsqueeze(0), topk,
                                  starts.unsqueeze(0), ends.unsqueeze(0), use_relu=relu, backend=ibackend)
            return (idx[0],)

        def attend(q, kv, idx):
            return sparse_mla(q, kv, idx, scale, d_v=d_v, backend=abackend, deterministic=deterministic,
                              row_packing=packing)

        common = dict(cache=plugin.graph_cache, max_instances=plugin.graph_max_inflight)
        # padded rows: empty windows [0, 0) select nothing; their ids are -1 (no key)
        self.topk = GraphDispatch(select, self.registry, pad_values=(0, 0, 0, 0, 0), **common)
        self.attention = GraphDispatch(attend, self.registry, pad_values=(0, 0, -1), grad_inputs=(0, 1), **common)


class _LayerStep:
    """One forward call's class: the layer's ``select_topk`` / ``sparse_attention`` hooks."""

    def __init__(self, graphs: LayerGraphs, cls: ShapeClass):
        self.graphs, self.cls = graphs, cls

    def topk(self, q_i, k_i, w_i, starts, ends):
        """Batch-first ``[1, T, ...]`` indexer tensors and windows -> ids ``int32 [1, T, topk]``."""
        (idx,) = self.graphs.topk.run(self.cls, q_i[0].detach(), k_i[0].detach(), w_i[0].detach(),
                                      starts[0], ends[0])
        return idx.unsqueeze(0)

    def attention(self, q, kv, idx):
        """``q [T, H, D]``, ``kv [T, D]``, ``idx [T, K]`` -> ``(out, lse)``."""
        return self.graphs.attention.run(self.cls, q, kv, idx)


def _capturing(device) -> bool:
    return torch.device(device).type == "cuda" and torch.cuda.is_current_stream_capturing()


def layer_step(layer, query, key, thd: bool, plugin) -> Optional[_LayerStep]:
    """The graph step for one call of a DSA core attention, or ``None`` (eager, with the reason
    counted in :data:`STATS` unless no classes are declared). Strict policy: a miss raises."""
    classes = plugin.graph_shape_classes
    if classes is None:
        return None
    sq = query.shape[0]  # packed: query [t, np, d], key [t, 1, d] (no batch dim)
    reason = None
    if not thd:
        reason = "not_thd"
    elif getattr(layer, "cp_group", None) is not None:
        reason = "context_parallel"
    elif plugin.time_indexer:
        reason = "time_indexer"
    elif _capturing(query.device):
        reason = "outer_capture"
    elif key.shape[0] != sq:
        reason = "not_thd"
    if reason is not None:
        STATS.eager[reason] += 1
        return None
    det = torch.are_deterministic_algorithms_enabled() if plugin.deterministic is None else plugin.deterministic
    graphs = getattr(layer, "_dsa_graphs", None)
    if graphs is None or graphs.plugin != plugin or graphs.deterministic != det:
        graphs = LayerGraphs(layer, plugin, det)
        layer._dsa_graphs = graphs
    try:
        cls = graphs.registry.resolve(sq)
    except ShapeClassMiss as e:
        STATS.misses += 1
        raise ShapeClassMiss(
            f"{e} (DSAPluginConfig.graph_shape_classes={tuple(classes)}, graph_miss_policy='strict')"
        ) from None
    if cls is None:
        STATS.misses += 1
        STATS.eager["miss"] += 1
        return None
    STATS.hits[cls.name] += 1
    return _LayerStep(graphs, cls)


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
