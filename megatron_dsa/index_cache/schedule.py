"""The anchor / shared schedule: which DSA layer computes top-k and which reuses whose.

The base pattern over the model's DSA layers is :func:`megatron_dsa.config.base_pattern`
(``DSAPluginConfig.index_pattern``, else Megatron-Core's ``dsa_indexer_topk_freq`` /
``dsa_indexer_skip_topk_offset``). Then, per pipeline stage and virtual-pipeline chunk, the
first DSA layer is an anchor (promoted with reason ``"stage boundary"`` if the pattern said
shared) and every shared layer's source is the pattern's source if it lies earlier in the same
chunk, else the nearest earlier anchor of the chunk (reason ``"source in another chunk"``).
:func:`format_schedule` prints the table.

Hybrid models (``DSAPluginConfig.hybrid_layer_pattern`` set): the pattern counts the ``D`` layers
only, roles carry the hybrid layer numbers (the ``layer_number`` Megatron's ``HybridStack`` gives
the layers), and the chunks are the pattern's pipeline segments (:func:`hybrid_segments`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

from ..config import HYBRID_DSA, base_pattern, dsa_layer_numbers, hybrid_main_pattern

__all__ = ["LayerRole", "chunk_layers", "hybrid_segments", "resolve_schedule", "layer_role", "format_schedule",
           "print_schedule", "PER_LAYER_GRAPHS"]


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


def hybrid_segments(config) -> List[Tuple[int, Optional[int], int, str]]:
    """``(stage, chunk, layer offset, symbols)`` of every pipeline segment of the attached hybrid
    pattern, by the rules Megatron-Core's ``HybridModel`` selects a segment with: ``|`` splits the
    pattern, segment ``i`` belongs to stage ``i % pp`` and virtual chunk ``i // pp`` (``None``
    with one segment per stage); without ``|`` and with ``pp > 1`` the layers are split evenly,
    or with ``num_layers_in_first/last_pipeline_stage``."""
    main = hybrid_main_pattern(config)
    if main is None:
        raise ValueError("hybrid_segments needs DSAPluginConfig.hybrid_layer_pattern")
    pp = config.pipeline_model_parallel_size or 1
    segments = main.split("|")
    out = []
    if len(segments) > 1:
        if len(segments) % pp:
            raise ValueError(f"hybrid_layer_pattern {main!r}: {len(segments)} segments do not divide over "
                             f"{pp} pipeline stages")
        virtual = len(segments) > pp
        offset = 0
        for i, seg in enumerate(segments):
            out.append((i % pp, i // pp if virtual else None, offset, seg))
            offset += len(seg)
        return out
    n = len(main)
    first = config.num_layers_in_first_pipeline_stage
    last = config.num_layers_in_last_pipeline_stage
    counts = [None] * pp
    if pp > 1 and first is not None:
        counts[0] = first
    if pp > 1 and last is not None:
        counts[-1] = last
    rest = [i for i, c in enumerate(counts) if c is None]
    left = n - sum(c for c in counts if c is not None)
    if rest and left % len(rest):
        raise ValueError(f"hybrid_layer_pattern {main!r}: {left} layers do not divide over {len(rest)} stages")
    for i in rest:
        counts[i] = left // len(rest)
    offset = 0
    for stage, count in enumerate(counts):
        out.append((stage, None, offset, main[offset:offset + count]))
        offset += count
    return out


def _chunks(config) -> List[Tuple[int, Optional[int], List[int]]]:
    """``(stage, chunk, [1-based DSA layer numbers])`` for every pipeline stage / virtual chunk."""
    if hybrid_main_pattern(config) is not None:
        return [
            (stage, chunk, [offset + i + 1 for i, sym in enumerate(seg) if sym == HYBRID_DSA])
            for stage, chunk, offset, seg in sorted(hybrid_segments(config), key=lambda s: (s[0], s[1] or 0))
        ]
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
    pattern = base_pattern(config)  # over DSA layers: the n-th entry is the n-th DSA layer's
    numbers = dsa_layer_numbers(config)
    nth = {layer: i for i, layer in enumerate(numbers)}
    per_layer_graphs = getattr(config, "cuda_graph_impl", "none") in PER_LAYER_GRAPHS
    roles = []
    for stage, chunk, layers in _chunks(config):
        anchors_here: List[int] = []
        for pos, layer in enumerate(layers):
            kind, src = pattern[nth[layer]]
            src = numbers[src - 1]
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
