"""One call turns megatron-dsa on wherever Megatron builds DSA layers.

    import megatron_dsa
    megatron_dsa.enable()      # Megatron's own DSA builders now build megatron-dsa's layers
    megatron_dsa.disable()     # and back

:func:`enable` redirects the builders Megatron-Core 0.19 uses for
``experimental_attention_variant="dsa"`` to this plugin's specs, and adds the plugin's flags to
Megatron training's argument parser:

=========================================================================  ===================
symbol (module: name)                                                      becomes
=========================================================================  ===================
``megatron.core.models.gpt.experimental_attention_variant_module_specs:``  a builder that
``get_transformer_block_with_experimental_attention_variant_spec``         returns
``megatron.training.models.gpt:`` (the same function, bound at import)     ``get_dsa_gpt_block_spec``
                                                                           for DSA configs
``megatron.core.models.hybrid.hybrid_layer_specs: hybrid_stack_spec``      the hybrid stack
``megatron.training.models.hybrid: default_hybrid_stack_spec``             with this plugin's
                                                                           ``dsa_layer``
``megatron.training.arguments: _add_experimental_attention_variant_args``  also adds
                                                                           :func:`add_dsa_args`
``megatron.core.dist_checkpointing(.serialization): load``                 first checks the
                                                                           index-sharing
                                                                           schedule (names
                                                                           the layers)
=========================================================================  ===================

Every change keeps the original object and :func:`disable` restores it; :func:`enable` is
idempotent and refuses Megatron-Core versions outside the tested range. Parameters and
state-dict keys are Megatron-Core's, so configs and checkpoints keep working.

The ``--dsa-impl`` flag (``megatron-dsa``, the default once enabled, or ``megatron-core``)
chooses per run; the other flags become the run's :class:`~megatron_dsa.config.DSAPluginConfig`
(:func:`plugin_settings_from_args`). Data flows one way: the parsed arguments are read when a
layer spec is built, attached to the model config, and the layers read them from there.
"""

from __future__ import annotations

import argparse
import importlib
import logging
from typing import Any, Callable, Dict, List, Optional, Tuple

__all__ = ["enable", "disable", "is_enabled", "changed", "add_dsa_args", "plugin_settings_from_args",
           "to_megatron_core_modules", "IMPLS"]

logger = logging.getLogger("megatron_dsa")

IMPLS = ("megatron-dsa", "megatron-core")

_GPT_BUILDER = "get_transformer_block_with_experimental_attention_variant_spec"
_GPT_HOMES = (
    "megatron.core.models.gpt.experimental_attention_variant_module_specs",
    "megatron.training.models.gpt",
)
_HYBRID_HOMES = (
    ("megatron.core.models.hybrid.hybrid_layer_specs", "hybrid_stack_spec"),
    ("megatron.training.models.hybrid", "default_hybrid_stack_spec"),
)
_ARGS_HOME = ("megatron.training.arguments", "_add_experimental_attention_variant_args")
_LOAD_HOMES = ("megatron.core.dist_checkpointing", "megatron.core.dist_checkpointing.serialization")

# (owner module, attribute, original) of every change enable() made
_SAVED: List[Tuple[Any, str, Any]] = []


# ----------------------------------------------------------------------------- arguments
def add_dsa_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Megatron training's ``extra_args_provider``: the plugin's flags (idempotent).

    ``--dsa-impl`` picks the implementation; the others are :class:`DSAPluginConfig` fields.
    Megatron's own ``--dsa-*`` flags (the model's DSA hyper-parameters, ``--dsa-kernel-backend``
    for Megatron-Core's own kernels) are unchanged.
    """
    from .config import _BACKENDS, _INDEXER_PRECISIONS, _LOSS_TARGETS

    if "--dsa-impl" in parser._option_string_actions:
        return parser
    group = parser.add_argument_group(title="megatron-dsa")
    group.add_argument("--dsa-impl", choices=IMPLS, default="megatron-dsa",
                       help="which DSA implementation builds the DSA layers (default megatron-dsa once "
                            "megatron_dsa.enable() ran)")
    for field, choices in _BACKENDS.items():
        group.add_argument(f"--dsa-{field.replace('_', '-')}", choices=choices, default="auto",
                           help=f"megatron-dsa: DSAPluginConfig.{field}")
    group.add_argument("--dsa-loss-target", choices=_LOSS_TARGETS, default="auto",
                       help="megatron-dsa: where the sparse indexer loss takes its target")
    group.add_argument("--dsa-index-pattern", default=None,
                       help="megatron-dsa: anchor/shared pattern over the DSA layers, e.g. FSSSFSSS, or a "
                            "comma list of F, S and 1-based anchor numbers (default: from "
                            "--dsa-indexer-topk-freq)")
    group.add_argument("--dsa-indexer-precision", choices=_INDEXER_PRECISIONS, default="bf16",
                       help="megatron-dsa: numerics of the top-k selection (fp8: e4m3 queries and keys "
                            "with per-token scales, as DeepSeek-V3.2 selects at inference)")
    group.add_argument("--dsa-attention-row-packing", choices=("auto", "on", "off"), default="auto",
                       help="megatron-dsa: row packing in the sparse attention at <= 32 heads per rank "
                            "(DSAPluginConfig.attention_row_packing: auto = the CUDA backward, on = also the "
                            "17-32-head forward and the Triton backward, off)")
    group.add_argument("--dsa-time-indexer", action="store_true",
                       help="megatron-dsa: measure the indexer's share of attention time (synchronises)")
    return parser


def _parse_pattern(text: Optional[str]):
    if text is None:
        return None
    if "," not in text:
        return text
    items = []
    for item in (x.strip() for x in text.split(",")):
        items.append(int(item) if item.isdigit() else item)
    return items


def plugin_settings_from_args(args) -> Dict[str, Any]:
    """:class:`DSAPluginConfig` fields from parsed arguments (only the flags that are present)."""
    from .config import _BACKENDS

    out = {}
    for field in (*_BACKENDS, "loss_target", "time_indexer", "indexer_precision",
                  "attention_row_packing"):  # add_dsa_args' flags
        name = f"dsa_{field}"
        if hasattr(args, name):
            out[field] = getattr(args, name)
    if "attention_row_packing" in out:
        out["attention_row_packing"] = {"auto": None, "on": True, "off": False}[out["attention_row_packing"]]
    if getattr(args, "dsa_index_pattern", None) is not None:
        out["index_pattern"] = _parse_pattern(args.dsa_index_pattern)
    return out


def _training_args():
    """Megatron training's parsed arguments, or None outside a Megatron training run."""
    try:
        from megatron.training import global_vars
    except Exception:
        return None
    return getattr(global_vars, "_GLOBAL_ARGS", None)


def _impl(args) -> str:
    return getattr(args, "dsa_impl", None) or "megatron-dsa"


def _configure(config, args) -> None:
    """Attach the run's plugin settings to ``config`` (the data flows config -> spec -> layer)."""
    from .config import set_plugin_config

    if args is not None:
        settings = plugin_settings_from_args(args)
        if settings:
            set_plugin_config(config, **settings)


# ----------------------------------------------------------------------------- builders
def to_megatron_core_modules(spec):
    """A copy of a megatron-dsa spec (block, layer, attention or hybrid stack) with
    Megatron-Core's own ``DSAttention`` / ``DSAIndexer`` in place of this plugin's (and this
    plugin's own spec parameters dropped): Megatron-Core's DSA on the same layers."""
    from .hybrid import swap_to_megatron_core

    return swap_to_megatron_core(spec)


_REPORTED = set()


def _report(impl: str, config) -> None:
    from .config import get_plugin_config

    key = (impl, id(config))
    if key in _REPORTED:
        return
    _REPORTED.add(key)
    if impl == "megatron-dsa":
        p = get_plugin_config(config)
        what = (f"megatron_dsa.attention.DSAttention (attention={p.attention_backend}, "
                f"indexer={p.indexer_backend}, loss={p.loss_backend}, index_pattern={p.index_pattern})")
    else:
        what = "megatron.core DSAttention (Megatron-Core's own DSA)"
    logger.warning("megatron-dsa: DSA layers built by --dsa-impl %s: %s", impl, what)


def _gpt_block_builder(original: Callable) -> Callable:
    def get_transformer_block_with_experimental_attention_variant_spec(config, vp_stage=None, pp_rank=None):
        args = _training_args()
        impl = _impl(args)
        if getattr(config, "experimental_attention_variant", None) != "dsa":
            return original(config=config, vp_stage=vp_stage, pp_rank=pp_rank)
        _report(impl, config)
        if impl == "megatron-core":
            if getattr(config, "transformer_impl", None) == "transformer_engine":
                return original(config=config, vp_stage=vp_stage, pp_rank=pp_rank)
            # Megatron-Core's builder asserts Transformer Engine: its own DSA modules on the
            # local layers this plugin's local spec uses
            from .spec import get_dsa_gpt_block_spec

            return to_megatron_core_modules(get_dsa_gpt_block_spec(config, vp_stage=vp_stage, pp_rank=pp_rank))
        from .spec import get_dsa_gpt_block_spec

        _configure(config, args)
        return get_dsa_gpt_block_spec(config, vp_stage=vp_stage, pp_rank=pp_rank)

    get_transformer_block_with_experimental_attention_variant_spec.__wrapped__ = original
    get_transformer_block_with_experimental_attention_variant_spec._megatron_dsa = True
    return get_transformer_block_with_experimental_attention_variant_spec


def _checked_load(original: Callable) -> Callable:
    def load(sharded_state_dict, checkpoint_dir, *args, **kwargs):
        from .dist_checkpoint import check_sharded_state_dict

        check_sharded_state_dict(sharded_state_dict, checkpoint_dir)
        return original(sharded_state_dict, checkpoint_dir, *args, **kwargs)

    load.__wrapped__ = original
    load._megatron_dsa = True
    return load


def _args_adder(original: Callable) -> Callable:
    def _add_experimental_attention_variant_args(parser):
        return add_dsa_args(original(parser))

    _add_experimental_attention_variant_args.__wrapped__ = original
    _add_experimental_attention_variant_args._megatron_dsa = True
    return _add_experimental_attention_variant_args


def _import(path: str):
    try:
        return importlib.import_module(path)
    except ImportError:
        return None


def _set(mod, attr: str, value) -> None:
    _SAVED.append((mod, attr, getattr(mod, attr)))
    setattr(mod, attr, value)


def _hybrid_stack_spec():
    """This plugin's hybrid stack spec (None where Megatron's hybrid stack cannot be imported)."""
    try:
        from .hybrid import get_dsa_hybrid_stack_spec
    except ImportError:
        return None
    return get_dsa_hybrid_stack_spec()


def enable(log: bool = True) -> List[str]:
    """Make Megatron's DSA builders build megatron-dsa's layers. Idempotent; returns the symbols
    changed (``module:name``)."""
    from .patches import _check_version

    _check_version()
    if _SAVED:
        return changed()
    # import every home first: a module imported after a patch would bind the patched object
    for path in _GPT_HOMES + tuple(p for p, _ in _HYBRID_HOMES) + (_ARGS_HOME[0],) + _LOAD_HOMES:
        _import(path)
    gpt_core = importlib.import_module(_GPT_HOMES[0])
    if not hasattr(gpt_core, _GPT_BUILDER):
        raise RuntimeError(f"megatron_dsa.enable: {_GPT_HOMES[0]}.{_GPT_BUILDER} not found (moved?)")
    original = getattr(gpt_core, _GPT_BUILDER)
    wrapped = _gpt_block_builder(original)
    for path in _GPT_HOMES:
        mod = _import(path)
        if mod is not None and getattr(mod, _GPT_BUILDER, None) is original:
            _set(mod, _GPT_BUILDER, wrapped)
    hybrid = None
    for path, attr in _HYBRID_HOMES:
        mod = _import(path)
        if mod is None or not hasattr(mod, attr):
            continue
        hybrid = hybrid if hybrid is not None else _hybrid_stack_spec()
        if hybrid is not None:
            _set(mod, attr, hybrid)
    load_original = getattr(importlib.import_module(_LOAD_HOMES[1]), "load", None)
    if load_original is None:
        raise RuntimeError(f"megatron_dsa.enable: {_LOAD_HOMES[1]}.load not found (moved?)")
    checked = _checked_load(load_original)
    for path in _LOAD_HOMES:
        mod = importlib.import_module(path)
        if getattr(mod, "load", None) is load_original:
            _set(mod, "load", checked)
    args_mod = _import(_ARGS_HOME[0])
    if args_mod is not None:
        if not hasattr(args_mod, _ARGS_HOME[1]):
            raise RuntimeError(f"megatron_dsa.enable: {_ARGS_HOME[0]}.{_ARGS_HOME[1]} not found (moved?)")
        _set(args_mod, _ARGS_HOME[1], _args_adder(getattr(args_mod, _ARGS_HOME[1])))
    names = changed()
    if log:
        logger.info("megatron_dsa.enable(): %s", ", ".join(names))
    return names


def disable() -> None:
    """Restore every symbol :func:`enable` changed."""
    while _SAVED:
        mod, attr, original = _SAVED.pop()
        setattr(mod, attr, original)


def is_enabled() -> bool:
    return bool(_SAVED)


def original_hybrid_stack_spec():
    """Megatron-Core's own hybrid stack spec (what ``--dsa-impl megatron-core`` builds), whether
    or not :func:`enable` replaced it."""
    for mod, attr, original in _SAVED:
        if (mod.__name__, attr) == _HYBRID_HOMES[0]:
            return original
    return getattr(importlib.import_module(_HYBRID_HOMES[0][0]), _HYBRID_HOMES[0][1])


def changed() -> List[str]:
    return [f"{mod.__name__}:{attr}" for mod, attr, _ in _SAVED]
