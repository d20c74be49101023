"""Distributed checkpoints (``megatron.core.dist_checkpointing``) of DSA models with index sharing.

The problem. Megatron's ``TransformerBlock.sharded_state_dict`` (default metadata, and the
metadata Megatron training passes) stacks every layer parameter along a leading *layer* axis:
layer ``g`` (0-based) writes slice ``g`` of one global tensor ``decoder.layers.<path>``. With
index sharing a shared layer owns no indexer, so the stacked indexer tensors have holes and
Megatron's save-time validation rejects them ("Invalid access pattern ... indexer...").

The layout written here. When the model's schedule has shared layers, each anchor layer's
indexer tensors (and TE ``_extra_state`` objects, if any) are written *per layer*: the layer
axis is dropped and the global layer number goes into the key,

    decoder.layers.<g>.self_attention.core_attention.indexer.<name>      (g 0-based, global)

which is exactly the key Megatron-Core itself uses for that tensor in its non-homogeneous layer
format (``non_homogeneous_layers`` / ``singleton_local_shards`` / ``hetereogenous_dist_checkpoint``).
Every other parameter keeps Megatron's layout. A per-layer tensor is covered exactly once by
its own layer (tensor-parallel replicas keep Megatron's replica ids), so the checkpoint
validates whatever layers own indexers. ``state_dict()`` keys are unchanged: only the sharded
*storage* keys of anchor indexers differ. Without shared layers nothing changes (Megatron's
stacked layout, as before). Under the non-homogeneous setting there is no layer axis and the
plugin writes Megatron's keys unchanged.

* :func:`indexer_sharded_state_dict` does this for the plugin's ``DSAttention``
  (its ``sharded_state_dict`` calls it).
* :func:`mcore_sharded_state_dict` gives a model built with Megatron-Core's own DSA the same
  layout (so checkpoints move both ways under the default / training metadata).
* :func:`check_index_schedule` compares which layers own indexer tensors in a checkpoint with
  a model and raises :class:`IndexScheduleMismatch` naming the layers; :func:`load` runs it
  before ``dist_checkpointing.load``.
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Dict, Iterable, List, Optional, Set

__all__ = [
    "IndexScheduleMismatch",
    "has_shared_layers",
    "indexer_sharded_state_dict",
    "mcore_sharded_state_dict",
    "checkpoint_indexer_layers",
    "model_indexer_layers",
    "check_index_schedule",
    "check_sharded_state_dict",
    "sharded_state_dict_layers",
    "load",
]

# a layer's own prefix inside the block: "<...>layers.<local index>."
_LAYER_PREFIX = re.compile(r"^(.*\blayers\.\d+\.)(.*)$")
# storage keys of indexer entries: per layer ("decoder.layers.<g>....indexer...") or stacked
_PER_LAYER_KEY = re.compile(r"^decoder\.layers\.(\d+)\.(?:.*\.)?indexer\.")
_STACKED_KEY = re.compile(r"^(decoder\.layers\.)((?!\d)(?:.*\.)?indexer\..*)$")


class IndexScheduleMismatch(RuntimeError):
    """A checkpoint's indexer-owning layers differ from the model's anchor layers."""


def has_shared_layers(config) -> bool:
    """Whether the plugin's resolved schedule has a layer without an indexer of its own."""
    from .index_cache import resolve_schedule

    return any(r.role == "shared" for r in resolve_schedule(config))


def _mcore_has_skip_layers(config) -> bool:
    """Megatron-Core's own rule (``dsa_indexer_topk_freq`` / ``dsa_indexer_skip_topk_offset``)."""
    from megatron.core.transformer.experimental_attention_variant.dsa import is_dsa_skip_topk_layer

    freq = config.dsa_indexer_topk_freq or 1
    offset = config.dsa_indexer_skip_topk_offset or 0
    return freq > 1 and any(is_dsa_skip_topk_layer(n, offset, freq) for n in range(1, config.num_layers + 1))


def _is_layer_axis(sharded_offsets, config, layer_number: int) -> bool:
    """Whether the block stacked this layer along a leading layer axis (Megatron's homogeneous
    layout: ``(0, layer_number - 1, num_layers)``)."""
    if not sharded_offsets:
        return False
    axis, offset, size = sharded_offsets[0]
    return axis == 0 and offset == layer_number - 1 and size == config.num_layers


def indexer_sharded_state_dict(module, prefix: str, sharded_offsets, metadata, default_fn) -> Dict:
    """The sharded state dict of the plugin's ``DSAttention`` ``module``.

    ``default_fn(prefix, sharded_offsets, metadata)`` is Megatron's default (the module's
    ``MegatronModule.sharded_state_dict``). Anchor layers of a model with shared layers write
    their indexer per layer (no layer axis; the global layer index in the storage key); anything
    else is Megatron's default.
    """
    layer = getattr(module, "layer_number", None)
    stacked = layer is not None and _is_layer_axis(sharded_offsets, module.config, layer)
    if not stacked or module.indexer is None or not has_shared_layers(module.config):
        return default_fn(prefix, sharded_offsets, metadata)
    match = _LAYER_PREFIX.match(prefix)
    if match is None:  # not inside a TransformerBlock's layer list: keep Megatron's layout
        return default_fn(prefix, sharded_offsets, metadata)
    inner = tuple((axis - 1, off, size) for axis, off, size in sharded_offsets[1:])
    out = default_fn(prefix, inner, metadata)
    # "<block>layers.<local>.<path>" -> "<block>layers.<local>.<g>.<path>"; the block then swaps
    # its "<block>layers.<local>." for "<block>layers.", leaving "<block>layers.<g>.<path>"
    head = match.group(1)
    for sh in _sharded_bases(out):
        if not sh.key.startswith(head):
            raise ValueError(f"expected sharded key {sh.key!r} to start with {head!r}")
        sh.key = f"{head}{layer - 1}.{sh.key[len(head):]}"
    return out


def _sharded_bases(tree) -> Iterable:
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedBase

    return [v for v in nested_values(tree) if isinstance(v, ShardedBase)]


def _unstack(sh):
    """A stacked indexer entry of Megatron-Core's layout -> its per-layer entry."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor

    m = _STACKED_KEY.match(sh.key)
    if m is None:
        return sh
    if isinstance(sh, ShardedTensor):
        if sh.prepend_axis_num < 1:
            return sh
        g = sh.global_offset[0]
        return replace(
            sh, key=f"{m.group(1)}{g}.{m.group(2)}", global_shape=sh.global_shape[1:],
            global_offset=sh.global_offset[1:], axis_fragmentations=sh.axis_fragmentations[1:],
            prepend_axis_num=sh.prepend_axis_num - 1,
        )
    if isinstance(sh, ShardedObject):
        g = sh.global_offset[0]
        shape, offset = (sh.global_shape[1:], sh.global_offset[1:]) if len(sh.global_shape) > 1 else ((1,), (0,))
        return replace(sh, key=f"{m.group(1)}{g}.{m.group(2)}", global_shape=shape, global_offset=offset)
    raise TypeError(f"cannot move {type(sh).__name__} {sh.key!r} to the per-layer layout")


def mcore_sharded_state_dict(model, prefix: str = "", sharded_offsets=(), metadata: Optional[dict] = None):
    """``model.sharded_state_dict(...)`` of a model built with Megatron-Core's own DSA, in the
    plugin's layout: when Megatron-Core's schedule skips the indexer on some layers, its stacked
    indexer entries become per-layer entries (what the plugin writes). Saves and loads under
    the default and the training metadata; a no-op without skip layers or under the
    non-homogeneous layer setting (Megatron's keys are then per layer already)."""
    from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace

    sd = model.sharded_state_dict(prefix, sharded_offsets, metadata)
    unwrapped = model
    while hasattr(unwrapped, "module") and not hasattr(unwrapped, "config"):
        unwrapped = unwrapped.module
    if _mcore_has_skip_layers(unwrapped.config):
        dict_list_map_inplace(_unstack, sd)
    return sd


# ------------------------------------------------------------------------------------------
# Schedule check
# ------------------------------------------------------------------------------------------


def checkpoint_indexer_layers(checkpoint_dir) -> Set[int]:
    """1-based numbers of the decoder layers that have indexer tensors in a checkpoint (either
    layout). Reads only the checkpoint's metadata."""
    from megatron.core import dist_checkpointing

    layers: Set[int] = set()
    for key, sh in dist_checkpointing.load_tensors_metadata(str(checkpoint_dir)).items():
        key = getattr(sh, "key", key)
        m = _PER_LAYER_KEY.match(key)
        if m is not None:
            layers.add(int(m.group(1)) + 1)
        elif _STACKED_KEY.match(key) is not None:  # stacked: every layer (saves have no holes)
            layers.update(range(1, sh.global_shape[0] + 1))
    return layers


def _dsa_modules(model) -> List:
    """The DSA core attentions (this plugin's or Megatron-Core's) of ``model``. Matched by class
    name and interface: this module must not import :mod:`megatron_dsa.attention`, which calls
    into it."""
    chunks = model if isinstance(model, (list, tuple)) else [model]
    return [m for c in chunks for m in c.modules()
            if type(m).__name__ == "DSAttention" and hasattr(m, "indexer") and hasattr(m, "layer_number")]


def model_indexer_layers(model):
    """``(this rank's DSA layers, those of them that own an indexer)``, 1-based."""
    mods = _dsa_modules(model)
    return {m.layer_number for m in mods}, {m.layer_number for m in mods if m.indexer is not None}


def check_index_schedule(model, checkpoint_dir) -> None:
    """Raise :class:`IndexScheduleMismatch` (on every rank) when the checkpoint's layers with
    indexer tensors differ from the model's anchor layers on this rank's layers: anchors
    without indexer tensors in the checkpoint (missing) and shared layers whose indexer tensors
    the checkpoint has (unexpected) are named, 1-based."""
    local, anchors = model_indexer_layers(model)
    _compare(local, anchors, checkpoint_indexer_layers(checkpoint_dir), checkpoint_dir)


def _compare(local, anchors, saved, checkpoint_dir) -> None:
    """Raise on every rank if any rank's anchors lack saved indexers (missing) or its shared
    layers have them (unexpected)."""
    import torch.distributed as dist

    missing = sorted(anchors - saved)
    unexpected = sorted((saved & local) - anchors)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        problems = [None] * dist.get_world_size()
        dist.all_gather_object(problems, (missing, unexpected))
        missing = sorted({n for p in problems for n in p[0]})
        unexpected = sorted({n for p in problems for n in p[1]})
    if not missing and not unexpected:
        return
    parts = []
    if missing:
        parts.append(f"missing indexer tensors for layers {missing} (anchors in this model, "
                     "shared in the checkpoint)")
    if unexpected:
        parts.append(f"unexpected indexer tensors for layers {unexpected} (shared in this model, "
                     "anchors in the checkpoint)")
    raise IndexScheduleMismatch(
        f"DSA index-sharing schedule of checkpoint {checkpoint_dir} differs from the model's: "
        + "; ".join(parts) + f". The checkpoint has indexers on layers {sorted(saved)}. Build the "
        "model with the schedule it was saved with (dsa_indexer_topk_freq / "
        "dsa_indexer_skip_topk_offset / DSAPluginConfig.index_pattern and the pipeline split)."
    )


_DSA_LAYER_KEY = re.compile(r"^decoder\.layers\.(?:(\d+)\.)?self_attention\.linear_kv_down_proj\.weight$")


def _layer_of(sh, per_layer_index: Optional[str]) -> Optional[int]:
    """1-based global layer of a decoder-layer ShardedTensor: from a per-layer key, or from the
    global offset along a stacked layer axis."""
    if per_layer_index is not None:
        return int(per_layer_index) + 1
    offsets = getattr(sh, "global_offset", None)
    if offsets and getattr(sh, "prepend_axis_num", 0) >= 1:
        return int(offsets[0]) + 1
    return None


def sharded_state_dict_layers(sharded_state_dict):
    """``(MLA attention layers, layers with indexer tensors)`` (1-based, global) that a GPT
    decoder's sharded state dict will load, read from its keys and layer offsets alone."""
    attention, indexers = set(), set()
    for sh in _sharded_bases(sharded_state_dict):
        key = getattr(sh, "key", "")
        m = _PER_LAYER_KEY.match(key)
        if m is not None:
            indexers.add(int(m.group(1)) + 1)
        elif _STACKED_KEY.match(key) is not None:
            layer = _layer_of(sh, None)
            if layer is not None:
                indexers.add(layer)
        m = _DSA_LAYER_KEY.match(key)
        if m is not None:
            layer = _layer_of(sh, m.group(1))
            if layer is not None:
                attention.add(layer)
    return attention, indexers


def check_sharded_state_dict(sharded_state_dict, checkpoint_dir) -> None:
    """:func:`check_index_schedule` for Megatron's own load path, which sees only the sharded
    state dict (``megatron_dsa.enable()`` runs it before ``dist_checkpointing.load``). Nothing
    to check when neither the state dict nor the checkpoint has indexer tensors."""
    local, anchors = sharded_state_dict_layers(sharded_state_dict)
    # every rank takes part (the comparison gathers over ranks, and dist_checkpointing.load is
    # collective): a rank without attention layers compares empty sets
    saved = checkpoint_indexer_layers(checkpoint_dir) if local else set()
    _compare(local, anchors, saved, checkpoint_dir)


def load(model, checkpoint_dir, metadata: Optional[dict] = None, strict: bool = True, **load_kwargs):
    """Check the schedule, then ``dist_checkpointing.load`` the model's sharded state dict and
    ``load_state_dict`` it. ``model``: one module (not a list). Models built with
    Megatron-Core's own DSA use :func:`mcore_sharded_state_dict`."""
    from megatron.core import dist_checkpointing

    check_index_schedule(model, checkpoint_dir)
    ours = any(type(m).__module__ == __name__.rsplit(".", 1)[0] + ".attention" for m in _dsa_modules(model))
    sd = model.sharded_state_dict(metadata=metadata) if ours else mcore_sharded_state_dict(model, metadata=metadata)
    state = dist_checkpointing.load(sd, str(checkpoint_dir), **load_kwargs)
    return model.load_state_dict(state, strict=strict)
