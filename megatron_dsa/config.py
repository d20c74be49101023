"""Configuration: Megatron-Core's own DSA fields plus the plugin's settings, in one place.

Model shape and DSA hyper-parameters come from Megatron-Core's ``MLATransformerConfig``
exactly as Megatron users already write them::

    experimental_attention_variant="dsa"
    dsa_indexer_n_heads, dsa_indexer_head_dim, dsa_indexer_topk          (required)
    dsa_indexer_loss_coeff, dsa_indexer_use_sparse_loss                  (indexer KL loss)
    dsa_indexer_topk_freq, dsa_indexer_skip_topk_offset                  (index sharing)
    dsa_indexer_rotate_activation, dsa_indexer_scoring_relu, ...         (indexer details)

Settings that only this plugin has live in :class:`DSAPluginConfig`; attach one to a config
with :func:`set_plugin_config` (or leave the defaults). They are never read from environment
variables, so every rank sees the same values.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

__all__ = ["DSAPluginConfig", "get_plugin_config", "set_plugin_config", "validate_dsa_config", "base_pattern",
           "dsa_layer_numbers", "hybrid_main_pattern", "INT32_MAX"]

# Token ids and top-k indices are int32 on every backend, so no size may pass this.
INT32_MAX = 2**31 - 1

# Which implementations each op has (megatron_dsa.kernels.backends; "auto" picks per machine).
_BACKENDS = {
    "indexer_backend": ("auto", "cuda", "triton", "reference"),
    "attention_backend": ("auto", "cuda", "triton", "reference"),
    "loss_backend": ("auto", "triton", "reference"),
}
_LOSS_TARGETS = ("auto", "attention", "recompute")
_INDEXER_PRECISIONS = ("bf16", "fp8")
_GRAPH_MISS_POLICIES = ("eager", "strict")


@dataclass(frozen=True)
class DSAPluginConfig:
    """Plugin-only settings.

    Attributes:
        indexer_backend: top-k selection: ``auto`` (the Triton score kernel with the CUDA
            select on sm_90, with the Triton select on other GPUs; the PyTorch reference for
            CPU tensors), ``cuda`` (the CUDA select, sm_90), ``triton`` or ``reference``.
        attention_backend: sparse MLA attention: ``auto`` (the sm_90a CUDA kernels where they
            apply, else Triton; the reference on the CPU), ``cuda``, ``triton`` or
            ``reference``. An explicit choice that cannot run raises, saying why.
        loss_backend: indexer KL loss: ``auto``, ``triton`` (the fused path) or ``reference``.
        deterministic: a bit-reproducible sparse-attention backward (on sm_90 the CUDA kernel
            twice: a bound pass, then dkv added as integers in per-key power-of-two quanta, the
            same bits on every run, schedule and sm_90 GPU; elsewhere Triton's sort-and-reduce
            pass). ``None`` follows ``torch.are_deterministic_algorithms_enabled()`` (Megatron's
            ``--deterministic-mode``).
        loss_target: where the sparse indexer loss gets its target (the head-summed attention
            probabilities over the selected keys). ``auto``: from the attention backward when
            the fused attention and loss run and the attention's all-heads backward applies
            (every CUDA backward; Triton's at <= 128 heads per rank, not deterministic), else
            ``recompute``. ``attention``: the
            attention backward hands it over (no pass of the loss's own over the attention heads;
            the loss *value* is then recorded in Megatron's tracker during the backward); an
            error where that cannot run. ``recompute``: the loss recomputes it in the forward
            from the attention's LSE.
        index_pattern: explicit anchor/shared pattern over the DSA layers, e.g. ``"FSSSFSSS"``
            (``F`` computes top-k, ``S`` reuses the nearest earlier ``F``), or a list whose
            items are ``"F"``, ``"S"`` or the 1-based number of an earlier anchor to reuse.
            ``None`` derives it from ``dsa_indexer_topk_freq`` / ``dsa_indexer_skip_topk_offset``
            with Megatron-Core's meaning. Pipeline stages and virtual chunks start on an anchor
            whatever the pattern says (see ``megatron_dsa.index_cache``).
        time_indexer: measure the indexer's share of attention time (synchronises the device
            around the indexer; for diagnostics, not for production steps).
        hybrid_layer_pattern: for a ``HybridModel``: its ``hybrid_layer_pattern`` (e.g.
            ``"D-D-|D-D-"``), whose ``D`` layers are the DSA layers that ``index_pattern`` and
            ``dsa_indexer_topk_freq`` count. ``megatron_dsa.hybrid.DSAHybridStack`` fills it in
            when it can (one pipeline stage, or Megatron training's ``--hybrid-layer-pattern``);
            ``None`` for ``GPTModel`` (every layer is a DSA layer).
        graph_shape_classes: token-count classes for packed (THD) batches, e.g. ``(1024, 2048,
            4096)``: a batch of ``t`` rows runs padded to the smallest class ``>= t``, and the DSA
            core attention replays that class's CUDA graphs of top-k selection and sparse
            attention (forward and backward; one capture per class and layer). ``None`` (default):
            no graphs. On CPU tensors the same padded path runs without capture. See
            ``docs/graphs.md``.
        graph_miss_policy: a batch larger than every class: ``eager`` (run uncaptured, counted in
            ``megatron_dsa.graph.STATS``) or ``strict`` (raise ``ShapeClassMiss``).
        graph_cache: ``False`` captures afresh on every call instead of replaying the class's
            graph (debugging: takes the cache out of the question; slow).
        graph_max_inflight: graphs per class and layer whose backward may be pending at once
            (pipeline micro-batches in flight); a forward beyond runs eagerly (counted).
        indexer_precision: the numerics the top-k *selection* uses: ``bf16`` (default: the
            indexer projections as they are) or ``fp8`` (queries and keys quantized to e4m3 with
            per-token scales, the format DeepSeek-V3.2 selects with at inference; see
            ``megatron_dsa.kernels.indexer.fp8``). The indexer loss trains on the unquantized
            projections either way. On the Triton backend the score kernel reads the e4m3
            operands (fp8 tensor-core dot products); elsewhere the reference scores them in fp32.
        attention_row_packing: row packing in the sparse attention at <= 32 heads per rank: 64 / 16
            or 64 / 32 query rows share the 64-row tile and walk the union of their selected keys
            (dkv added once per union key instead of once per row and slot; see
            ``docs/kernels_sparse_mla.md``). ``None`` (auto, default): the sm_90a CUDA backward
            packs, and the CUDA forward up to ``fwd_pack_max_keys`` keys (16K at <= 16 heads, 32K
            at <= 32; both measured faster); ``True``: also the forward beyond and the Triton
            backward; ``False``: never. Reported in the kernel choice (``cuda-packed``).
    """

    indexer_backend: str = "auto"
    attention_backend: str = "auto"
    loss_backend: str = "auto"
    deterministic: Optional[bool] = None
    loss_target: str = "auto"
    index_pattern: Optional[Union[str, Sequence[Union[str, int]]]] = None
    time_indexer: bool = False
    hybrid_layer_pattern: Optional[str] = None
    graph_shape_classes: Optional[Sequence[int]] = None
    graph_miss_policy: str = "eager"
    graph_cache: bool = True
    graph_max_inflight: int = 1
    indexer_precision: str = "bf16"
    attention_row_packing: Optional[bool] = None

    def __post_init__(self):
        _check_graph_fields(self)
        _check_choice("indexer_precision", self.indexer_precision, _INDEXER_PRECISIONS)
        for name, choices in _BACKENDS.items():
            _check_choice(name, getattr(self, name), choices)
        _check_choice("loss_target", self.loss_target, _LOSS_TARGETS)
        if self.deterministic is not None and not isinstance(self.deterministic, bool):
            raise TypeError(f"DSAPluginConfig.deterministic must be None, True or False, got {self.deterministic!r}")
        if self.attention_row_packing is not None and not isinstance(self.attention_row_packing, bool):
            raise TypeError(f"DSAPluginConfig.attention_row_packing must be None (auto), True or False, got "
                            f"{self.attention_row_packing!r}")
        if not isinstance(self.time_indexer, bool):
            raise TypeError(f"DSAPluginConfig.time_indexer must be True or False, got {self.time_indexer!r}")
        if self.index_pattern is not None:
            pattern = self.index_pattern
            if isinstance(pattern, str):
                bad = sorted(set(pattern) - {"F", "S"})
                if bad:
                    raise ValueError(
                        f"DSAPluginConfig.index_pattern has unknown letters {bad}; use F (anchor) "
                        "and S (shared)"
                    )
            elif isinstance(pattern, (list, tuple)):
                for pos, item in enumerate(pattern, start=1):
                    if (isinstance(item, str) and item in ("F", "S")) or (_is_int(item) and item >= 1):
                        continue
                    raise ValueError(
                        f"DSAPluginConfig.index_pattern: layer {pos} has unknown entry {item!r}; each "
                        "entry must be 'F' (anchor), 'S' (shared) or the 1-based number (a positive "
                        "int) of an earlier anchor layer to reuse"
                    )
                object.__setattr__(self, "index_pattern", tuple(pattern))
            else:
                raise TypeError(
                    "DSAPluginConfig.index_pattern must be a string of F/S letters or a list of 'F', 'S' "
                    f"and anchor layer numbers, got {pattern!r} ({type(pattern).__name__})"
                )
            if not self.index_pattern:
                raise ValueError("DSAPluginConfig.index_pattern must not be empty")
        if self.hybrid_layer_pattern is not None:
            _check_hybrid_pattern(self.hybrid_layer_pattern)


# Megatron-Core 0.19's hybrid layer symbols (hybrid_layer_allocation.Symbols), "|" between
# pipeline segments, "/" before the multi-token-prediction patterns.
HYBRID_DSA = "D"
_HYBRID_LAYERS = frozenset("MG*D+-E")


def _check_hybrid_pattern(pattern) -> None:
    where = "DSAPluginConfig.hybrid_layer_pattern"
    if not isinstance(pattern, str):
        raise TypeError(f"{where} must be a string such as 'D-D-', got {pattern!r} ({type(pattern).__name__})")
    main, _, mtp = pattern.partition("/")
    bad = sorted(set(main) - _HYBRID_LAYERS - {"|"}) + sorted(set(mtp) - _HYBRID_LAYERS - {"/"})
    if bad:
        raise ValueError(f"{where} {pattern!r} has unknown symbols {bad}")
    if HYBRID_DSA not in main:
        raise ValueError(f"{where} {pattern!r} has no DSA layer ({HYBRID_DSA!r}) before any '/'")
    if HYBRID_DSA in mtp:
        raise ValueError(
            f"{where} {pattern!r}: DSA layers in the multi-token-prediction patterns (after '/') are not "
            "supported (their layer numbers restart at 1 and would collide with the decoder's schedule)"
        )


def hybrid_main_pattern(config) -> Optional[str]:
    """The decoder part of the attached ``hybrid_layer_pattern`` (with its ``|``), or None."""
    pattern = get_plugin_config(config).hybrid_layer_pattern
    return None if pattern is None else pattern.partition("/")[0]


def dsa_layer_numbers(config) -> List[int]:
    """1-based numbers of the model's DSA layers, in order: every layer of a ``GPTModel``; the
    ``D`` positions of a hybrid model's pattern (``DSAPluginConfig.hybrid_layer_pattern``)."""
    main = hybrid_main_pattern(config)
    if main is None:
        return list(range(1, config.num_layers + 1))
    return [i + 1 for i, sym in enumerate(main.replace("|", "")) if sym == HYBRID_DSA]
def _check_graph_fields(self):
    """The ``graph_*`` fields of a DSAPluginConfig (errors name the field)."""
    _check_choice("graph_miss_policy", self.graph_miss_policy, _GRAPH_MISS_POLICIES)
    if not isinstance(self.graph_cache, bool):
        raise TypeError(f"DSAPluginConfig.graph_cache must be True or False, got {self.graph_cache!r}")
    if not _is_int(self.graph_max_inflight) or self.graph_max_inflight < 1:
        raise ValueError(
            f"DSAPluginConfig.graph_max_inflight must be a positive int, got {self.graph_max_inflight!r}"
        )
    classes = self.graph_shape_classes
    if classes is None:
        return
    if isinstance(classes, (str, bytes)) or not isinstance(classes, (list, tuple)):
        raise TypeError(
            "DSAPluginConfig.graph_shape_classes must be None or a list of token counts (positive "
            f"ints), got {classes!r} ({type(classes).__name__})"
        )
    if not classes:
        raise ValueError("DSAPluginConfig.graph_shape_classes must not be empty (use None for no graphs)")
    for pos, n in enumerate(classes, start=1):
        if not _is_int(n) or not 1 <= n <= INT32_MAX:
            raise ValueError(
                f"DSAPluginConfig.graph_shape_classes: entry {pos} is {n!r}; each class is a "
                f"token count, a positive int <= {INT32_MAX}"
            )
    if len(set(classes)) != len(classes):
        raise ValueError(f"DSAPluginConfig.graph_shape_classes has duplicate token counts: {list(classes)}")
    object.__setattr__(self, "graph_shape_classes", tuple(sorted(int(n) for n in classes)))


def _check_choice(name, value, choices):
    if not isinstance(value, str):
        raise TypeError(
            f"DSAPluginConfig.{name} must be a string, one of {choices}, got {value!r} ({type(value).__name__})"
        )
    if value not in choices:
        raise ValueError(f"DSAPluginConfig.{name} must be one of {choices}, got {value!r}")


def _is_int(value) -> bool:
    """An int that is not a bool (``True`` is an ``int`` in Python)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
    """A real number that is not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _int_field(config, name, minimum, maximum=None, what="a positive int", required=False):
    """``config.<name>`` as an int in [minimum, maximum]; errors name the field and the value."""
    value = getattr(config, name, None)
    if value is None:
        if required:
            raise ValueError(f"{name} must be set for experimental_attention_variant='dsa'")
        return None
    bound = f"{what} <= {maximum}" if maximum is not None else what
    if not _is_int(value):
        raise TypeError(f"{name} must be {bound}, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name} must be {what}, got {value!r}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be {bound}, got {value!r}")
    return value


_ATTR = "megatron_dsa"


def get_plugin_config(config) -> DSAPluginConfig:
    """The plugin settings attached to a Megatron ``TransformerConfig`` (defaults if none)."""
    value = getattr(config, _ATTR, None)
    if value is None:
        return DSAPluginConfig()
    if not isinstance(value, DSAPluginConfig):
        raise TypeError(f"config.{_ATTR} must be a DSAPluginConfig, got {type(value).__name__}")
    return value


def set_plugin_config(config, plugin: Optional[DSAPluginConfig] = None, **overrides):
    """Attach plugin settings to ``config`` (returns ``config``)."""
    plugin = plugin or get_plugin_config(config)
    if overrides:
        plugin = dataclasses.replace(plugin, **overrides)
    object.__setattr__(config, _ATTR, plugin)
    return config


def validate_dsa_config(config) -> None:
    """Clear errors, naming the field, for configs our DSA layer cannot run."""
    variant = getattr(config, "experimental_attention_variant", None)
    if variant != "dsa":
        raise ValueError(
            f"experimental_attention_variant must be 'dsa' for a DSA layer, got {variant!r}"
        )
    if not getattr(config, "multi_latent_attention", False):
        raise ValueError(
            "DSA needs multi-latent attention: use MLATransformerConfig "
            "(multi_latent_attention=True); got a non-MLA config"
        )
    for name in ("dsa_indexer_n_heads", "dsa_indexer_head_dim", "dsa_indexer_topk"):
        _int_field(config, name, 1, INT32_MAX, required=True)
    for name in ("kv_lora_rank", "qk_pos_emb_head_dim"):
        value = getattr(config, name, None)
        if not _is_int(value) or value <= 0:
            raise ValueError(f"{name} must be a positive int for DSA, got {value!r}")
    # index sharing (Megatron-Core's __post_init__ checks these, but not a config changed later)
    _int_field(config, "dsa_indexer_topk_freq", 1)
    _int_field(config, "dsa_indexer_skip_topk_offset", 0, what="a non-negative int")
    for name in ("dsa_indexer_use_sparse_loss", "dsa_indexer_rotate_activation",
                 "dsa_indexer_scoring_relu", "dsa_indexer_k_norm_fp32"):
        value = getattr(config, name, False)
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be True or False, got {value!r} ({type(value).__name__})")
    coeff = getattr(config, "dsa_indexer_loss_coeff", None)
    if coeff is not None:  # None: no indexer loss (Megatron-Core's default)
        msg = f"dsa_indexer_loss_coeff must be a finite number >= 0, got {coeff!r}"
        if not _is_real(coeff):
            raise TypeError(f"{msg} ({type(coeff).__name__})")
        if not (math.isfinite(coeff) and coeff >= 0):  # NaN would switch the loss off silently
            raise ValueError(msg)
    eps = getattr(config, "dsa_indexer_k_norm_epsilon", None)
    if eps is not None:
        msg = f"dsa_indexer_k_norm_epsilon must be None or a finite number > 0, got {eps!r}"
        if not _is_real(eps):
            raise TypeError(f"{msg} ({type(eps).__name__})")
        if not (math.isfinite(eps) and eps > 0):
            raise ValueError(msg)
    if config.dsa_indexer_head_dim < config.qk_pos_emb_head_dim:
        raise ValueError(
            f"dsa_indexer_head_dim ({config.dsa_indexer_head_dim}) must be >= "
            f"qk_pos_emb_head_dim ({config.qk_pos_emb_head_dim}): the indexer applies RoPE to "
            "its first qk_pos_emb_head_dim channels"
        )
    d = config.dsa_indexer_head_dim
    if getattr(config, "dsa_indexer_rotate_activation", False) and d & (d - 1):
        raise ValueError(
            f"dsa_indexer_head_dim ({d}) must be a power of two when "
            "dsa_indexer_rotate_activation=True (Hadamard rotation)"
        )
    if (getattr(config, "context_parallel_size", 1) or 1) > 1:
        comm = getattr(config, "cp_comm_type", None)
        comms = comm if isinstance(comm, (list, tuple)) else [comm]
        if any(c not in (None, "allgather", "all_gather") for c in comms):
            raise ValueError(
                f"cp_comm_type must be 'allgather' for DSA layers with context_parallel_size > 1 (the "
                f"layer all-gathers the latent KV and the indexer keys), got {comm!r}"
            )
    if getattr(config, "tensor_model_parallel_size", 1) > 1 and not getattr(config, "sequence_parallel", False):
        raise ValueError(
            f"tensor_model_parallel_size > 1 (got {config.tensor_model_parallel_size}) needs "
            "sequence_parallel=True for DSA layers (Megatron-Core's absorbed MLA requires it)"
        )
    get_plugin_config(config)  # type-checks an attached plugin config
    main = hybrid_main_pattern(config)
    if main is not None and len(main.replace("|", "")) != config.num_layers:
        raise ValueError(
            f"DSAPluginConfig.hybrid_layer_pattern {main!r} has {len(main.replace('|', ''))} layers but "
            f"num_layers is {config.num_layers}"
        )
    base_pattern(config)  # pattern length, first letter, sources: errors name the layer


def base_pattern(config) -> List[Tuple[str, int]]:
    """Per DSA layer ``("F", layer)`` (anchor) or ``("S", source)`` (reuses ``source``'s top-k),
    1-based, before pipeline splitting: from ``DSAPluginConfig.index_pattern`` if set, else from
    ``dsa_indexer_topk_freq`` / ``dsa_indexer_skip_topk_offset`` with Megatron-Core's meaning.
    Errors name the layer. Layers and sources count DSA layers only (in a hybrid model the n-th
    ``D`` of the pattern; :func:`dsa_layer_numbers` maps them to layer numbers)."""
    n = len(dsa_layer_numbers(config))
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
