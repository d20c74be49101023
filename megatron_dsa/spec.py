"""Spec helpers: what a Megatron user imports to get DSA layers.

    from megatron_dsa.spec import get_dsa_gpt_block_spec
    block_spec = get_dsa_gpt_block_spec(config, vp_stage=vp_stage)
    model = GPTModel(config=config, transformer_layer_spec=block_spec, ...)

The specs are Megatron-Core's own (``get_dsa_module_spec_for_backend`` and
``get_transformer_layer_with_experimental_attention_variant_spec``) with the core attention and
the indexer swapped for ours. Backend: Transformer Engine's modules when TE is importable and
``config.transformer_impl == "transformer_engine"``, Megatron-Core's local modules otherwise
(CPU included).
"""

from __future__ import annotations

import copy
from typing import List, Optional

import torch
from megatron.core.models.backends import BackendSpecProvider, LocalSpecProvider
from megatron.core.models.gpt import experimental_attention_variant_module_specs as mcore_specs
from megatron.core.tensor_parallel.layers import ColumnParallelLinear
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

from .attention import DSAIndexer, DSAttention
from .config import validate_dsa_config
from .index_cache.schedule import chunk_layers

__all__ = [
    "DuplicatedLinear",
    "DSALocalSpecProvider",
    "get_backend_spec_provider",
    "get_dsa_attention_spec",
    "get_dsa_layer_spec",
    "get_dsa_layer_specs",
    "get_dsa_gpt_block_spec",
]


class DuplicatedLinear(torch.nn.Module):
    """A linear layer whose full weight lives on every tensor-parallel rank.

    The local-module counterpart of ``TELinear(parallel_mode="duplicated")``: same ``weight``
    state-dict key, same ``(output, bias)`` return convention.
    """

    def __init__(self, input_size, output_size, *, config, init_method, bias=False,
                 skip_bias_add=False, skip_weight_param_allocation=False, parallel_mode=None,
                 **unused):
        super().__init__()
        if parallel_mode not in (None, "duplicated"):
            raise ValueError(f"DuplicatedLinear supports parallel_mode='duplicated', got {parallel_mode!r}")
        if skip_weight_param_allocation:
            raise ValueError("DuplicatedLinear always allocates its weight")
        device = "cpu" if config.use_cpu_initialization or not torch.cuda.is_available() else torch.cuda.current_device()
        self.weight = torch.nn.Parameter(
            torch.empty(output_size, input_size, dtype=config.params_dtype, device=device)
        )
        if config.perform_initialization:
            init_method(self.weight)
        self.bias = None
        if bias:
            self.bias = torch.nn.Parameter(torch.zeros(output_size, dtype=config.params_dtype, device=device))
        self.skip_bias_add = skip_bias_add

    def forward(self, x):
        if self.skip_bias_add:
            return torch.nn.functional.linear(x, self.weight), self.bias
        return torch.nn.functional.linear(x, self.weight, self.bias), None


class SequenceParallelTorchNorm:
    """PyTorch's ``LayerNorm`` / ``RMSNorm`` for Megatron's local modules, with sequence
    parallelism (Megatron-Core's ``WrappedTorchNorm`` refuses it): under SP a norm sees only its
    rank's rows, so its parameters are marked ``sequence_parallel`` and Megatron's gradient
    finalisation sums their gradients over the tensor-parallel group."""

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, persist_layer_norm: bool = False,
                zero_centered_gamma: bool = False, normalization: str = "LayerNorm"):
        for flag in ("layernorm_zero_centered_gamma", "persist_layer_norm", "memory_efficient_layer_norm"):
            if getattr(config, flag, False):
                raise ValueError(f"{flag}=True is not supported by the local (PyTorch) norms; use "
                                 "Transformer Engine's")
        kinds = {"LayerNorm": torch.nn.LayerNorm, "RMSNorm": torch.nn.RMSNorm}
        if config.normalization not in kinds:
            raise ValueError(f"normalization must be LayerNorm or RMSNorm for the local norms, got "
                             f"{config.normalization!r}")
        norm = kinds[config.normalization](normalized_shape=hidden_size, eps=eps)
        for param in norm.parameters():
            setattr(param, "sequence_parallel", bool(config.sequence_parallel))
        return norm


class DSALocalSpecProvider(LocalSpecProvider):
    """Megatron-Core's local spec provider plus the duplicated linear DSA's indexer needs and
    norms that accept sequence parallelism."""

    def linear(self) -> type:
        return DuplicatedLinear

    def layer_norm(self, rms_norm: bool = False, for_qk: bool = False, has_residual: bool = False) -> type:
        from megatron.core.transformer.torch_norm import WrappedTorchNorm

        chosen = super().layer_norm(rms_norm=rms_norm, for_qk=for_qk, has_residual=has_residual)
        return SequenceParallelTorchNorm if chosen is WrappedTorchNorm else chosen


def _has_te() -> bool:
    try:
        import transformer_engine  # noqa: F401
        from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider  # noqa: F401
    except Exception:
        return False
    return True


def get_backend_spec_provider(config) -> BackendSpecProvider:
    """TE's provider when importable and asked for by ``transformer_impl``, else local modules."""
    if getattr(config, "transformer_impl", "transformer_engine") == "transformer_engine" and _has_te():
        from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider

        return TESpecProvider()
    return DSALocalSpecProvider()


def get_dsa_attention_spec(config, backend: Optional[BackendSpecProvider] = None) -> ModuleSpec:
    """``AbsorbedMLASelfAttention`` spec whose core attention is megatron-dsa's ``DSAttention``."""
    validate_dsa_config(config)
    backend = backend or get_backend_spec_provider(config)
    spec = copy.deepcopy(mcore_specs.get_dsa_module_spec_for_backend(config, backend=backend))
    core = spec.submodules.core_attention
    core.module = DSAttention
    core.submodules.indexer.module = DSAIndexer
    if isinstance(backend, DSALocalSpecProvider):
        # Megatron's absorbed MLA accepts only its own linear classes for the down projections.
        spec.submodules.linear_q_down_proj = ColumnParallelLinear
        spec.submodules.linear_kv_down_proj = ColumnParallelLinear
        # with these, the RoPE key channels reach the core attention through a tensor-parallel
        # all-gather whose backward keeps one rank's heads' gradient: the core attention sums it
        core.params = dict(core.params or {}, reduce_rope_key_grad=True)
    return spec


def _swap_attention(layer_spec: ModuleSpec, attention: ModuleSpec) -> ModuleSpec:
    layer_spec = copy.copy(layer_spec)
    layer_spec.submodules = copy.copy(layer_spec.submodules)
    layer_spec.submodules.self_attention = attention
    return layer_spec


def get_dsa_layer_specs(config, backend: Optional[BackendSpecProvider] = None) -> List[ModuleSpec]:
    """One ``TransformerLayer`` spec per layer of the whole model (all DSA attention)."""
    validate_dsa_config(config)
    backend = backend or get_backend_spec_provider(config)
    attention = get_dsa_attention_spec(config, backend)
    layers = mcore_specs.get_transformer_layer_with_experimental_attention_variant_spec(config, backend)
    return [_swap_attention(layer, attention) for layer in layers]


def get_dsa_layer_spec(config, backend: Optional[BackendSpecProvider] = None) -> ModuleSpec:
    """A single DSA ``TransformerLayer`` spec (the first layer's, e.g. for a custom block)."""
    return get_dsa_layer_specs(config, backend)[0]


def get_dsa_gpt_block_spec(
    config, vp_stage: Optional[int] = None, pp_rank: Optional[int] = None,
    backend: Optional[BackendSpecProvider] = None,
) -> TransformerBlockSubmodules:
    """The decoder block spec of this pipeline stage / virtual-pipeline chunk for ``GPTModel``."""
    backend = backend or get_backend_spec_provider(config)
    specs = get_dsa_layer_specs(config, backend)
    ids = chunk_layers(config, vp_stage=vp_stage, pp_rank=pp_rank)
    rms = config.normalization == "RMSNorm"
    return TransformerBlockSubmodules(
        layer_specs=[specs[i] for i in ids], layer_norm=backend.layer_norm(rms_norm=rms, for_qk=False)
    )
