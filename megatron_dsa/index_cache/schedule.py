"""The anchor / shared schedule: which DSA layer computes top-k and which reuses whose.

The base pattern over the model's DSA layers is :func:`megatron_dsa.config.base_pattern`
(``DSAPluginConfig.index_pattern``, else Megatron-Core's ``dsa_indexer_topk_freq`` /
``dsa_indexer_skip_topk_offset``). Then, per pipeline stage and virtual-pipeline chunk, the
first DSA layer is an anchor (promoted with reason ``"stage boundary"`` if the pattern said
shared) and every shared layer's source is the pattern's source if it lies earlier in the same
chunk, else the nearest earlier anchor of the chunk (reason ``"source in another chunk"``).
:func:`format_schedule` prints the table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

from ..config import base_pattern

__all__ = ["LayerRole", "chunk_layers", "resolve_schedule", "layer_role", "format_schedule", "print_schedule",
           "PER_LAYER_GRAPHS"]


@dataclass(frozen=True)
class LayerRole:
    layer: int  # 1-based global layer number
    stage: int  # pipeline rank
    chunk: Optional[int]  # virtual-pipeline chunk (None without VPP)
    role: str  # "anchor" | "shared"
    source: int  # layer whose top-k this layer uses (itself for anchors)
    reason: str  # why this role


def chunk_layers(config, vp_stage: Optional[int] = None, pp_rank: Optional[int] = None) -> List[int]:
    """The 0-based layer ids that pipeline stage ``pp_rank`` (default: this rank) builds for
    virtual chunk ``vp_stage``, by Megatron-Core's own rules (``pipeline_model_parallel_layout``
    if set, else its layer offset and count). ``spec.py`` builds exactly these layers."""
    from megatron.core.transformer.enums import LayerType
    from megatron.core.transformer.transformer_block import get_num_layers_to_build
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    layout = getattr(config, "pipeline_model_parallel_layout", None)
    if layout is not None:
        return list(layout.get_layer_id_list(layer_type=LayerType.decoder, vp_stage=vp_stage, pp_rank=pp_rank))
    off = get_transformer_layer_offset(config, vp_stage=vp_stage, pp_rank=pp_rank)
    return list(range(off, off + get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)))


def _chunks(config) -> List[Tuple[int, Optional[int], List[int]]]:
    """``(stage, chunk, [1-based layers])`` for every pipeline stage / virtual chunk."""
    vpp = config.virtual_pipeline_model_parallel_size
    out = []
    for stage in range(config.pipeline_model_parallel_size or 1):
        for chunk in range(vpp or 1):
            vp = chunk if vpp else None
            out.append((stage, vp, [i + 1 for i in chunk_layers(config, vp_stage=vp, pp_rank=stage)]))
    return out


PER_LAYER_GRAPHS = ("local", "transformer_engine")


def resolve_schedule(config) -> List[LayerRole]:
    """The role of every DSA layer of the model, in layer order.

    Per-layer CUDA graphs (``cuda_graph_impl`` ``"local"`` / ``"transformer_engine"``) make
    every layer an anchor (reason ``"per-layer cuda graphs"``): a replayed graph cannot prove
    that another graph's private memory still holds its source's indices.
    """
    pattern = base_pattern(config)
    per_layer_graphs = getattr(config, "cuda_graph_impl", "none") in PER_LAYER_GRAPHS
    roles = []
    for stage, chunk, layers in _chunks(config):
        anchors_here: List[int] = []
        for pos, layer in enumerate(layers):
            kind, src = pattern[layer - 1]
            if per_layer_graphs:
                reason = "pattern" if kind == "F" else "per-layer cuda graphs"
                roles.append(LayerRole(layer, stage, chunk, "anchor", layer, reason))
                continue
            if pos == 0:
                reason = "pattern" if kind == "F" else "stage boundary"
                roles.append(LayerRole(layer, stage, chunk, "anchor", layer, reason))
                anchors_here.append(layer)
            elif kind == "F":
                roles.append(LayerRole(layer, stage, chunk, "anchor", layer, "pattern"))
                anchors_here.append(layer)
            elif src in anchors_here:
                roles.append(LayerRole(layer, stage, chunk, "shared", src, "pattern"))
            else:
                roles.append(
                    LayerRole(layer, stage, chunk, "shared", anchors_here[-1], "source in another chunk")
                )
    return sorted(roles, key=lambda r: r.layer)


def layer_role(config, layer_number: int, roles: Optional[Sequence[LayerRole]] = None) -> LayerRole:
    """The resolved role of one layer (``roles``: an already resolved schedule to search)."""
    for role in resolve_schedule(config) if roles is None else roles:
        if role.layer == layer_number:
            return role
    raise ValueError(f"layer {layer_number} is outside the model (1..{config.num_layers})")


def format_schedule(roles: Sequence[LayerRole]) -> str:
    lines = ["layer | stage/chunk | role   | source | reason", "------|-------------|--------|--------|-------"]
    for r in roles:
        where = f"{r.stage}/{'-' if r.chunk is None else r.chunk}"
        lines.append(f"{r.layer:5d} | {where:>11} | {r.role:6} | {r.source:6d} | {r.reason}")
    return "\n".join(lines)


def print_schedule(config) -> List[LayerRole]:
    """Print and return the resolved anchor/shared table of ``config``'s model."""
    roles = resolve_schedule(config)
    print(format_schedule(roles))
    return roles
