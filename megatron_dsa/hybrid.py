"""DSA layers in Megatron-Core's ``HybridModel`` (layer pattern symbol ``D``).

    from megatron.core.models.hybrid.hybrid_model import HybridModel
    from megatron_dsa.hybrid import get_dsa_hybrid_stack_spec

    model = HybridModel(config=config, hybrid_stack_spec=get_dsa_hybrid_stack_spec(config),
                        hybrid_layer_pattern="D-D-D-D-", vocab_size=..., max_sequence_length=...,
                        position_embedding_type="none")

or, in a Megatron training run, ``--spec megatron_dsa.hybrid dsa_hybrid_stack_spec`` (Megatron's
``hybrid_config_from_args`` imports that object as the ``HybridModel``'s stack spec).

The stack spec is Megatron-Core's own (``hybrid_layer_specs.hybrid_stack_spec``) with
:func:`swap_dsa_modules` applied: its ``dsa_layer`` builds this plugin's ``DSAttention`` and
``DSAIndexer`` (same parameters and state-dict keys as Megatron-Core's). Its module is
:class:`DSAHybridStack`, Megatron's ``HybridStack`` that also

* records the model's hybrid layer pattern on the config
  (``DSAPluginConfig.hybrid_layer_pattern``) before it builds its layers, so that the index-cache
  schedule counts ``D`` layers only (see ``docs/index_cache.md``);
* with Megatron-Core's local modules (``transformer_impl="local"`` or no Transformer Engine):
  builds the ``D``, ``-`` (MLP) and ``E`` (MoE) layers and the final norm from local modules
  (Megatron's hybrid specs are Transformer-Engine only). Other symbols keep Megatron's TE specs.

Like Megatron-Core's hybrid ``dsa_layer``, the ``D`` layer has no q/kv latent norms
(``q_layernorm`` / ``kv_layernorm`` are identities whatever ``qk_layernorm`` says), so hybrid
checkpoints move both ways. DSA layers in the multi-token-prediction part of a pattern (after
``/``) are refused.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from typing import Any, Optional

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.backends import BackendSpecProvider, LocalSpecProvider
from megatron.core.models.gpt import experimental_attention_variant_module_specs as mcore_specs
from megatron.core.models.gpt.gpt_layer_specs import get_mlp_module_spec_for_backend
from megatron.core.models.hybrid import hybrid_layer_specs as mcore_hybrid_specs
from megatron.core.models.hybrid.hybrid_block import HybridStack, HybridStackSubmodules
from megatron.core.ssm.mlp_layer import MLPLayer
from megatron.core.tensor_parallel.layers import ColumnParallelLinear
from megatron.core.transformer.experimental_attention_variant import dsa as mcore_dsa
from megatron.core.transformer.experimental_attention_variant.absorbed_mla import AbsorbedMLASelfAttention
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_layer import (
    MoETransformerLayer,
    TransformerLayer,
    TransformerLayerSubmodules,
)

from .attention import DSAIndexer, DSAttention
from .config import HYBRID_DSA, get_plugin_config, set_plugin_config
from .index_cache.schedule import hybrid_segments
from .spec import get_backend_spec_provider

__all__ = [
    "DSAHybridStack",
    "dsa_hybrid_stack_spec",
    "get_dsa_hybrid_stack_spec",
    "swap_dsa_modules",
    "swap_to_megatron_core",
    "set_hybrid_layer_pattern",
]

_SWAPS = {mcore_dsa.DSAttention: DSAttention, mcore_dsa.DSAIndexer: DSAIndexer}
_REVERSE = {ours: theirs for theirs, ours in _SWAPS.items()}


def _column_parallel_types():
    types_ = [ColumnParallelLinear]
    try:
        from megatron.core.extensions.transformer_engine import TEColumnParallelLinear

        types_.append(TEColumnParallelLinear)
    except Exception:  # pragma: no cover - the extension module imports without TE in 0.19
        pass
    return tuple(types_)


def swap_dsa_modules(spec: Any) -> Any:
    """A copy of ``spec`` (a ``ModuleSpec``, a submodules dataclass such as
    ``HybridStackSubmodules`` / ``TransformerBlockSubmodules``, a list of layer specs, a
    ``functools.partial`` spec, ...) in which Megatron-Core's ``DSAttention`` / ``DSAIndexer``
    are megatron-dsa's. The input is never changed; everything else (other modules,
    ``ModuleSpec.params``, ``metainfo``, shared sub-specs) is kept.

    Where the attention's latent KV down projection is column-parallel (Megatron's local
    ``ColumnParallelLinear`` or TE's ``TEColumnParallelLinear``), the core attention gets the
    spec parameter ``reduce_rope_key_grad=True`` (as ``megatron_dsa.spec`` does: the RoPE key
    channels then reach it through a tensor-parallel all-gather). Our ``DSAttention`` runs the
    absorbed MLA layout only: a DSA core attention under anything but
    ``AbsorbedMLASelfAttention`` raises ``ValueError`` (e.g. Megatron's hybrid inference spec).
    """
    return _copy(spec, {}, None, "spec", _SWAPS)


def swap_to_megatron_core(spec: Any) -> Any:
    """The reverse of :func:`swap_dsa_modules`: a copy of a megatron-dsa spec (GPT block, layer,
    attention or hybrid stack) with Megatron-Core's own ``DSAttention`` / ``DSAIndexer``, this
    plugin's own spec parameters dropped: Megatron-Core's DSA on the same layers."""
    return _copy(spec, {}, None, "spec", _REVERSE)


def _swap_leaf(value, swaps):
    if isinstance(value, type) and value in swaps:
        return swaps[value]
    return value


def _copy(node, memo, parent, path, swaps):
    """A copy of ``node``'s containers (ModuleSpecs, dataclass instances, lists, tuples, dicts,
    partials) with the DSA classes swapped; other leaves are shared. ``parent``: the enclosing
    ModuleSpec. Objects referenced twice stay shared in the copy."""
    if isinstance(node, type):
        return _swap_leaf(node, swaps)
    key = id(node)
    if key in memo:
        return memo[key]
    if isinstance(node, ModuleSpec):
        new = copy.copy(node)
        memo[key] = new
        new.module = _swap_leaf(node.module, swaps)
        params = dict(node.params or {})
        if new.module is mcore_dsa.DSAttention and node.module is DSAttention:
            params.pop("reduce_rope_key_grad", None)  # this plugin's own spec parameter
        if new.module is DSAttention:
            _check_dsa_parent(parent, path)
            down = getattr(getattr(parent, "submodules", None), "linear_kv_down_proj", None)
            if isinstance(down, type) and issubclass(down, _column_parallel_types()):
                params["reduce_rope_key_grad"] = True
        if node.params is not None or params:
            new.params = {k: _copy(v, memo, node, f"{path}.params[{k!r}]", swaps) for k, v in params.items()}
        new.submodules = _copy(node.submodules, memo, node, f"{path}.submodules", swaps)
        return new
    if isinstance(node, list):
        new = []
        memo[key] = new
        new.extend(_copy(v, memo, parent, f"{path}[{i}]", swaps) for i, v in enumerate(node))
        return new
    if isinstance(node, tuple) and not hasattr(node, "_fields"):
        new = tuple(_copy(v, memo, parent, f"{path}[{i}]", swaps) for i, v in enumerate(node))
        memo[key] = new
        return new
    if isinstance(node, dict):
        new = {}
        memo[key] = new
        new.update((k, _copy(v, memo, parent, f"{path}[{k!r}]", swaps)) for k, v in node.items())
        return new
    if isinstance(node, functools.partial):
        new = functools.partial(
            _swap_leaf(node.func, swaps), *(_copy(a, memo, parent, f"{path}.args[{i}]", swaps) for i, a in enumerate(node.args)),
            **{k: _copy(v, memo, parent, f"{path}.{k}", swaps) for k, v in node.keywords.items()},
        )
        memo[key] = new
        return new
    if dataclasses.is_dataclass(node):
        new = copy.copy(node)
        memo[key] = new
        for field in dataclasses.fields(node):
            value = getattr(node, field.name)
            object.__setattr__(new, field.name, _copy(value, memo, parent, f"{path}.{field.name}", swaps))
        return new
    return node


def _check_dsa_parent(parent, path):
    module = getattr(parent, "module", None)
    if isinstance(module, type) and not issubclass(module, AbsorbedMLASelfAttention):
        raise ValueError(
            f"{path}: megatron-dsa's DSAttention runs under AbsorbedMLASelfAttention only, found it under "
            f"{module.__name__} (Megatron-Core's hybrid inference spec uses MLASelfAttention: keep "
            "Megatron-Core's DSA there)"
        )


# ------------------------------------------------------------------------------------ specs
# Megatron-Core's own stack spec, taken when this module is first imported (before
# megatron_dsa.enable() can replace the module attribute).
_MCORE_HYBRID_STACK_SPEC = mcore_hybrid_specs.hybrid_stack_spec


def _mcore_submodules() -> HybridStackSubmodules:
    """Megatron-Core's TE hybrid submodules with our DSA classes."""
    return swap_dsa_modules(_MCORE_HYBRID_STACK_SPEC.submodules)


def _is_local(backend: BackendSpecProvider) -> bool:
    return isinstance(backend, LocalSpecProvider)


def _local_dsa_attention(config, backend) -> ModuleSpec:
    """Megatron's hybrid ``dsa_layer`` attention from local modules, with our DSA (the same
    modules as ``megatron_dsa.spec.get_dsa_attention_spec``; validation happens when the layer
    is built, once the hybrid pattern is known)."""
    attention = copy.deepcopy(mcore_specs.get_dsa_module_spec_for_backend(config, backend=backend))
    sub = attention.submodules
    # Megatron's absorbed MLA accepts only its own linear classes for the down projections
    sub.linear_q_down_proj = ColumnParallelLinear
    sub.linear_kv_down_proj = ColumnParallelLinear
    # as Megatron-Core's hybrid dsa_layer: no q/kv latent norms
    sub.q_layernorm = IdentityOp
    sub.kv_layernorm = IdentityOp
    return swap_dsa_modules(attention)  # + reduce_rope_key_grad for the column-parallel down proj


def _local_submodules(config, backend, base: HybridStackSubmodules) -> HybridStackSubmodules:
    """``base`` with its D, MLP and MoE layers from local modules."""
    norm = backend.layer_norm(rms_norm=config.normalization == "RMSNorm", for_qk=False)
    dsa_layer = ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=norm, self_attention=_local_dsa_attention(config, backend),
            self_attn_bda=get_bias_dropout_add,
        ),
    )
    mlp_layer = ModuleSpec(
        module=MLPLayer,
        submodules=TransformerLayerSubmodules(
            pre_mlp_layernorm=norm, mlp=get_mlp_module_spec_for_backend(backend), mlp_bda=get_bias_dropout_add,
            # Megatron's TE MLP layer fuses this norm into linear_fc1: same distributed checkpoint keys
            sharded_state_dict_keys_map={"pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_"},
        ),
    )
    moe_layer = ModuleSpec(
        module=MoETransformerLayer,
        submodules=TransformerLayerSubmodules(
            pre_mlp_layernorm=norm,
            mlp=get_mlp_module_spec_for_backend(backend, num_experts=config.num_moe_experts or 8,
                                                moe_grouped_gemm=bool(config.moe_grouped_gemm)),
            mlp_bda=get_bias_dropout_add,
        ),
    )
    return dataclasses.replace(base, dsa_layer=dsa_layer, mlp_layer=mlp_layer, moe_layer=moe_layer)


def get_dsa_hybrid_stack_spec(
    config=None, backend: Optional[BackendSpecProvider] = None, hybrid_layer_pattern: Optional[str] = None,
) -> ModuleSpec:
    """The ``hybrid_stack_spec`` for ``HybridModel`` with megatron-dsa's DSA layers.

    ``config``: the model's ``MLATransformerConfig``; picks the backend (Transformer Engine when
    importable and ``transformer_impl == "transformer_engine"``, else Megatron-Core's local
    modules). Without ``config`` and ``backend`` the spec is resolved when the stack is built
    (what :data:`dsa_hybrid_stack_spec` and ``megatron_dsa.enable()`` use).
    ``hybrid_layer_pattern``: the pattern the model is built with; attached to ``config``
    (``DSAPluginConfig.hybrid_layer_pattern``). Needed only when the stack cannot find it
    itself: pipeline parallelism outside Megatron training's ``--hybrid-layer-pattern``.
    """
    if hybrid_layer_pattern is not None:
        if config is None:
            raise ValueError("get_dsa_hybrid_stack_spec: hybrid_layer_pattern needs the config to attach it to")
        set_hybrid_layer_pattern(config, hybrid_layer_pattern)
    base = _mcore_submodules()
    if config is None:
        params = {"resolve_backend": True}
        if backend is not None:
            params["backend"] = backend
        return ModuleSpec(module=DSAHybridStack, submodules=base, params=params)
    backend = backend or get_backend_spec_provider(config)
    if not _is_local(backend):
        return ModuleSpec(module=DSAHybridStack, submodules=base)
    return ModuleSpec(
        module=DSAHybridStack, submodules=_local_submodules(config, backend, base),
        params={"final_norm": backend.layer_norm(rms_norm=config.normalization == "RMSNorm", for_qk=False)},
    )


def set_hybrid_layer_pattern(config, pattern: str):
    """Attach the ``HybridModel``'s ``hybrid_layer_pattern`` to ``config`` (returns ``config``)."""
    current = get_plugin_config(config).hybrid_layer_pattern
    if current is not None and current != pattern:
        raise ValueError(
            f"this config already belongs to a hybrid model with pattern {current!r}, not {pattern!r}: "
            "give each HybridModel its own config"
        )
    return set_plugin_config(config, hybrid_layer_pattern=pattern)


def _training_pattern() -> Optional[str]:
    """Megatron training's ``--hybrid-layer-pattern`` (None outside a training run)."""
    try:
        from megatron.training import global_vars
    except Exception:
        return None
    args = getattr(global_vars, "_GLOBAL_ARGS", None)
    return getattr(args, "hybrid_layer_pattern", None) if args is not None else None


def _attach_layout(config, layer_type_list, pp_layer_offset, pg_collection, is_mtp_layer):
    """Make sure ``config`` carries the whole model's pattern and that this stack is one of its
    pipeline segments (the index-cache schedule is resolved from it)."""
    segment = "".join(layer_type_list)
    if is_mtp_layer:
        raise ValueError(
            f"DSA layers in a multi-token-prediction pattern ({segment!r}) are not supported by megatron-dsa"
        )
    if get_plugin_config(config).hybrid_layer_pattern is None:
        pattern = _training_pattern()
        pp = getattr(pg_collection, "pp", None)
        pp_size = pp.size() if pp is not None else 1
        if pattern is None and pp_size == 1 and pp_layer_offset == 0:
            pattern = segment  # one stage: this stack is the whole decoder
        if pattern is None:
            raise ValueError(
                "a pipeline-parallel hybrid model with DSA layers needs its whole hybrid_layer_pattern to "
                "resolve the index-cache schedule: pass get_dsa_hybrid_stack_spec(config, "
                "hybrid_layer_pattern=...) or megatron_dsa.hybrid.set_hybrid_layer_pattern(config, ...)"
            )
        set_hybrid_layer_pattern(config, pattern)
    segments = hybrid_segments(config)
    if not any(off == pp_layer_offset and seg == segment for _, _, off, seg in segments):
        raise ValueError(
            f"this hybrid stack builds layers {segment!r} from layer {pp_layer_offset + 1}, which is not a "
            f"pipeline segment of DSAPluginConfig.hybrid_layer_pattern "
            f"{get_plugin_config(config).hybrid_layer_pattern!r} (segments: "
            f"{[(off + 1, seg) for _, _, off, seg in segments]})"
        )


class DSAHybridStack(HybridStack):
    """Megatron-Core's ``HybridStack`` that records the hybrid pattern for the DSA schedule and
    builds local modules when the config asks for them.

    Spec parameters: ``final_norm`` (the final norm's class; default Megatron's ``TENorm``),
    ``resolve_backend`` (pick the backend from the config at build time; ``submodules`` are then
    Megatron's TE ones with our DSA, replaced by local ones for the local backend) and
    ``backend`` (the ``BackendSpecProvider`` to resolve with; default from the config).
    """

    def __init__(self, config, submodules: Optional[HybridStackSubmodules] = None, pre_process: bool = True,
                 layer_type_list=None, pp_layer_offset: int = 0, post_layer_norm: bool = True,
                 post_process: bool = True, device=None, dtype=None, pg_collection=None,
                 is_mtp_layer: bool = False, name: Optional[str] = None, *, final_norm=None,
                 resolve_backend: bool = False, backend: Optional[BackendSpecProvider] = None):
        if layer_type_list is not None and HYBRID_DSA in layer_type_list:
            _attach_layout(config, layer_type_list, pp_layer_offset, pg_collection, is_mtp_layer)
        if submodules is None or resolve_backend:
            backend = backend or get_backend_spec_provider(config)
            base = submodules if submodules is not None else _mcore_submodules()
            if _is_local(backend):
                submodules = _local_submodules(config, backend, base)
                if final_norm is None:
                    final_norm = backend.layer_norm(rms_norm=config.normalization == "RMSNorm", for_qk=False)
            else:
                submodules = base
        super().__init__(
            config, submodules, pre_process=pre_process, layer_type_list=layer_type_list,
            pp_layer_offset=pp_layer_offset, post_layer_norm=post_layer_norm and final_norm is None,
            post_process=post_process, device=device, dtype=dtype, pg_collection=pg_collection,
            is_mtp_layer=is_mtp_layer, name=name,
        )
        if final_norm is not None and post_process and post_layer_norm:
            self.post_layer_norm = True
            self.final_norm = build_module(final_norm, config=config, hidden_size=config.hidden_size,
                                           eps=config.layernorm_epsilon)


#: For Megatron training: ``--spec megatron_dsa.hybrid dsa_hybrid_stack_spec``.
dsa_hybrid_stack_spec = get_dsa_hybrid_stack_spec()
