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
from dataclasses import dataclass
from typing import Optional, Sequence, Union

__all__ = ["DSAPluginConfig", "get_plugin_config", "set_plugin_config", "validate_dsa_config"]

_BACKENDS = ("auto", "reference", "triton")
_LOSS_TARGETS = ("auto", "attention", "recompute")


@dataclass(frozen=True)
class DSAPluginConfig:
    """Plugin-only settings.

    Attributes:
        indexer_backend: top-k selection. ``auto``: fused Triton on CUDA, reference on CPU.
        attention_backend: sparse MLA attention, same choices.
        loss_backend: indexer KL loss, same choices.
        loss_target: where the sparse indexer loss gets its target (the head-summed attention
            probabilities over the selected keys). ``auto``: from the attention backward when
            the fused attention and loss run and the attention's all-heads backward applies
            (<= 128 heads per rank, not deterministic), else ``recompute``. ``attention``: the
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
    """

    indexer_backend: str = "auto"
    attention_backend: str = "auto"
    loss_backend: str = "auto"
    loss_target: str = "auto"
    index_pattern: Optional[Union[str, Sequence[Union[str, int]]]] = None
    time_indexer: bool = False

    def __post_init__(self):
        for name in ("indexer_backend", "attention_backend", "loss_backend"):
            value = getattr(self, name)
            if value not in _BACKENDS:
                raise ValueError(f"DSAPluginConfig.{name} must be one of {_BACKENDS}, got {value!r}")
        if self.loss_target not in _LOSS_TARGETS:
            raise ValueError(
                f"DSAPluginConfig.loss_target must be one of {_LOSS_TARGETS}, got {self.loss_target!r}"
            )
        if self.index_pattern is not None:
            pattern = self.index_pattern
            if isinstance(pattern, str):
                bad = sorted(set(pattern) - {"F", "S"})
                if bad:
                    raise ValueError(
                        f"DSAPluginConfig.index_pattern has unknown letters {bad}; use F (anchor) "
                        "and S (shared)"
                    )
            else:
                object.__setattr__(self, "index_pattern", tuple(pattern))
            if not self.index_pattern:
                raise ValueError("DSAPluginConfig.index_pattern must not be empty")

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
        value = getattr(config, name, None)
        if value is None:
            raise ValueError(f"{name} must be set for experimental_attention_variant='dsa'")
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    for name in ("kv_lora_rank", "qk_pos_emb_head_dim"):
        value = getattr(config, name, None)
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive int for DSA, got {value!r}")
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
    coeff = getattr(config, "dsa_indexer_loss_coeff", None)
    if coeff is not None and coeff < 0:
        raise ValueError(f"dsa_indexer_loss_coeff must be >= 0, got {coeff}")
    if getattr(config, "context_parallel_size", 1) > 1:
        raise ValueError(
            "context_parallel_size > 1 is not supported by megatron-dsa yet "
            f"(got {config.context_parallel_size})"
        )
    if getattr(config, "tensor_model_parallel_size", 1) > 1:
        # Megatron-Core's absorbed MLA needs sequence parallelism with TP, and its local norms
        # reject sequence parallelism, so TP can only run with Transformer Engine, which we
        # cannot test yet: refuse rather than run an unverified path.
        raise ValueError(
            "tensor_model_parallel_size > 1 is not supported by megatron-dsa yet "
            f"(got {config.tensor_model_parallel_size}); it needs sequence parallelism and "
            "Transformer Engine modules, a combination not yet verified"
        )
    get_plugin_config(config)  # type-checks an attached plugin config
    from .index_cache import base_pattern

    base_pattern(config)  # pattern length, first letter, sources: errors name the layer
