"""The DSA core attention that plugs into Megatron-Core's absorbed MLA self-attention.

Data flow (one direction): config -> spec -> this layer -> kernels.

* :class:`DSAIndexer` subclasses Megatron-Core's ``DSAIndexer`` so that its parameters,
  buffers and state-dict keys are Megatron's own (checkpoints move both ways); it replaces
  only the projection step, whose Hadamard rotation runs in PyTorch when
  ``fast_hadamard_transform`` is missing and in any dtype.
* :class:`DSAttention` is built by ``AbsorbedMLASelfAttention`` as its ``core_attention``
  with the same constructor and ``forward`` signature as Megatron-Core's ``DSAttention``.
  It selects top-k keys with :func:`megatron_dsa.kernels.indexer_topk`, attends with
  :func:`megatron_dsa.kernels.sparse_mla` and, in training, attaches the indexer KL loss from
  :func:`megatron_dsa.kernels.indexer_loss` through Megatron's ``DSAIndexerLossAutoScaler``
  (so Megatron's schedules scale it and its logging helper reports it).
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.experimental_attention_variant import dsa as mcore_dsa
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import build_module
from megatron.core.process_groups_config import ProcessGroupCollection

from . import graph as dsa_graph
from . import index_cache as ic
from .config import get_plugin_config, validate_dsa_config
from .context_parallel import cp_causal_window, cp_gather, cp_layout, cp_packed_causal_window, cp_packed_check
from .kernels.hadamard import rotate_activation
from .kernels.indexer import causal_window, indexer_topk, packed_causal_window
from .kernels.indexer.fp8 import fp8_selection_inputs
from .kernels.indexer_loss import indexer_loss, indexer_loss_from_attention
from .kernels.indexer_loss import select_backend as indexer_loss_backend
from .kernels.sparse_mla import loss_target_reason, sparse_mla
from .kernels.sparse_mla import select_backend as sparse_mla_backend

__all__ = ["DSAIndexer", "DSAttention", "DSAttentionSubmodules", "DSAIndexerSubmodules"]

# Megatron's submodule dataclasses are plain containers; reusing them keeps specs compatible.
DSAttentionSubmodules = mcore_dsa.DSAttentionSubmodules
DSAIndexerSubmodules = mcore_dsa.DSAIndexerSubmodules


class DSAIndexer(mcore_dsa.DSAIndexer):
    """Megatron-Core's indexer parameters with a projection step that runs anywhere."""

    def forward_before_topk(self, x, qr, packed_seq_params=None):
        """Indexer queries ``[s, b, H, D]``, keys ``[s, b, D]`` and head weights ``[s, b, H]``."""
        packed = _is_thd(packed_seq_params)
        seq_len = self.rotary_pos_emb.get_rotary_seq_len(None, None, x, self.config, packed_seq_params)
        if self.config.rope_type == "rope":
            freqs, mscale = self.rotary_pos_emb(seq_len, packed_seq=packed), 1.0
        else:
            freqs, mscale = self.rotary_pos_emb(seq_len, packed_seq=packed)
        cu_q = cu_k = None
        if packed:
            cu_q, cu_k = mcore_dsa.dsa_layout.get_packed_qk_cu_seqlens(packed_seq_params)

        tp = self.pg_collection.tp
        if self.config.sequence_parallel and tp.size() > 1:
            x = gather_from_sequence_parallel_region(x, group=tp)
            qr = gather_from_sequence_parallel_region(qr, group=tp)
        s, b, _ = x.shape
        H, D = self.index_n_heads, self.index_head_dim

        q = self.linear_wq_b(qr)[0].reshape(s, b, H, D)
        q = self._apply_rope(q, freqs, mscale, cu_seqlens=cu_q)

        k = self.linear_wk(x)[0]
        k = self.k_norm(k.float()).to(k.dtype) if self.config.dsa_indexer_k_norm_fp32 else self.k_norm(k)
        k = self._apply_rope(k.reshape(s, b, 1, D), freqs, mscale, cu_seqlens=cu_k).reshape(s, b, D)

        if self.config.dsa_indexer_rotate_activation:
            q, k = rotate_activation(q), rotate_activation(k)

        w = self.linear_weights_proj(x)[0] * (H**-0.5 * self.softmax_scale)
        return q, k, w


def _is_thd(packed_seq_params) -> bool:
    return packed_seq_params is not None and packed_seq_params.qkv_format == "thd"


def _capturing(device) -> bool:
    return torch.device(device).type == "cuda" and torch.cuda.is_current_stream_capturing()


class _SumGradOver(torch.autograd.Function):
    """Identity forward; the backward sums the gradient over ``group``."""

    @staticmethod
    def forward(ctx, t, group):
        ctx.group = group
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone(memory_format=torch.contiguous_format)  # one copy, reduced in place
        torch.distributed.all_reduce(grad, group=ctx.group)
        return grad, None


class DSAttention(MegatronModule):
    """Sparse core attention for ``AbsorbedMLASelfAttention`` (drop-in for Megatron's).

    Inputs follow Megatron-Core 0.19.2: ``query [sq, b, np, kv_lora_rank + rope]``,
    ``key [sk, b, 1, same]`` (the latent KV, shared by all heads), ``value=None``,
    ``up_v_weight [np, v_head_dim, kv_lora_rank]``; packed THD inputs drop the batch dim.
    Output ``[sq, b, np * v_head_dim]`` (``[t, np * v_head_dim]`` for THD).
    """

    consumes_absorbed_v_up_projection = True
    requires_dsa_inputs = True
    _graph_step = None  # this call's shape class (megatron_dsa.graph.layer_step) or None: eager
    _cp_now = None  # under CP, this call's (positions, gather order, cu_seqlens or None)

    def __init__(
        self,
        config,
        submodules: DSAttentionSubmodules,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        k_channels: Optional[int] = None,
        v_channels: Optional[int] = None,
        cp_comm_type: str = "p2p",
        pg_collection: Optional[ProcessGroupCollection] = None,
        reduce_rope_key_grad: bool = False,
    ):
        super().__init__(config=config)
        validate_dsa_config(config)
        self.layer_number = layer_number
        self.attn_mask_type = attn_mask_type
        self.index_topk = config.dsa_indexer_topk
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp", "cp"])
        self.pg_collection = pg_collection
        # Anchor / shared role of this layer in its pipeline chunk (see megatron_dsa.index_cache).
        roles = ic.resolve_schedule(config)
        self.role = ic.layer_role(config, layer_number, roles)
        chunk = [r for r in roles if (r.stage, r.chunk) == (self.role.stage, self.role.chunk)]
        pos = [r.layer for r in chunk].index(layer_number)
        self.chunk_key = (id(config), self.role.stage, self.role.chunk)
        self.previous_layer = chunk[pos - 1].layer if pos > 0 else None
        self.opens_scope = pos == 0 and any(r.role == "shared" for r in chunk)
        self.closes_scope = pos == len(chunk) - 1
        self.has_consumers = any(r.source == layer_number and r.role == "shared" for r in chunk)
        ic.ledger.install()  # each Megatron checkpoint call gets its own recompute scope
        if self.role.role == "anchor":
            self.indexer = build_module(submodules.indexer, config=config, pg_collection=pg_collection)
            ic.register_indexer(config, layer_number, self.indexer)
            self._source_indexer = None
        else:
            # Like Megatron-Core's skip layers: no indexer parameters of its own. A promotion
            # runs the source anchor's indexer (held outside the module tree: no shared params).
            self.indexer = None
            source = ic.built_indexer(config, self.role.source)
            if source is None:
                raise RuntimeError(
                    f"DSA layer {layer_number} shares top-k with layer {self.role.source}, which "
                    "was not built before it in this chunk"
                )
            self._source_indexer = (source,)
        if softmax_scale is None:
            softmax_scale = 1.0 / math.sqrt(k_channels if k_channels is not None else config.kv_channels)
        self.softmax_scale = softmax_scale
        self.latent_dim = config.kv_lora_rank
        cp = getattr(pg_collection, "cp", None)
        self.cp_group = cp if cp is not None and cp.size() > 1 else None
        tp = getattr(pg_collection, "tp", None)
        # local modules under TP: the key's RoPE channels come from a tensor-parallel all-gather
        # whose backward keeps only this rank's share, while their gradient is a sum over the
        # heads of every rank (Megatron-LM issue 1699): sum it here (spec.get_dsa_attention_spec)
        self.rope_grad_group = tp if reduce_rope_key_grad and tp is not None and tp.size() > 1 else None

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """Megatron's, except that with index sharing an anchor's indexer is stored per layer
        (no stacked layer axis with holes): see :mod:`megatron_dsa.dist_checkpoint`."""
        from .dist_checkpoint import indexer_sharded_state_dict

        return indexer_sharded_state_dict(self, prefix, sharded_offsets, metadata, super().sharded_state_dict)

    # ------------------------------------------------------------------ helpers
    def _check_inputs(self, query, key, value, up_v_weight):
        d = self.config.kv_lora_rank + self.config.qk_pos_emb_head_dim
        if value is not None:
            raise ValueError(
                "megatron-dsa's DSAttention runs the absorbed MLA layout: value must be None "
                "(build it with AbsorbedMLASelfAttention, e.g. megatron_dsa.spec.get_dsa_layer_spec)"
            )
        if query.ndim != 4 or key.ndim != 4 or key.shape[2] != 1:
            raise ValueError(
                f"expected query [sq, b, np, {d}] and key [sk, b, 1, {d}], got query "
                f"{tuple(query.shape)} and key {tuple(key.shape)}"
            )
        if query.shape[-1] != d or key.shape[-1] != d:
            raise ValueError(
                f"query/key last dim must be kv_lora_rank + qk_pos_emb_head_dim = {d}, got "
                f"{query.shape[-1]} and {key.shape[-1]}"
            )
        if up_v_weight is None or up_v_weight.ndim != 3:
            raise ValueError("up_v_weight [np, v_head_dim, kv_lora_rank] is required")
        if query.shape[1] != key.shape[1]:
            raise ValueError(f"query batch {query.shape[1]} != key batch {key.shape[1]}")

    def _window(self, sq, sk, b, attn_mask_type, packed_seq_params, device):
        """Per-row ``[start, end)`` key window ``[b, sq]`` and the optional valid-row mask. Under
        context parallelism ``sq`` are this rank's rows and the windows cover all ``sk`` keys
        (the gathered sequence) by the rows' global positions (``self._cp_now``)."""
        if attn_mask_type != AttnMaskType.causal:
            raise ValueError(
                f"DSA needs attn_mask_type=AttnMaskType.causal (got {attn_mask_type}); arbitrary "
                "attention masks are not supported"
            )
        row_valid = None
        if self._cp_now is not None:
            positions, _, cu_q = self._cp_now
            if cu_q is None:
                starts, ends = cp_causal_window(positions, b)
                return starts, ends, row_valid
            starts, ends = cp_packed_causal_window(cu_q, positions)
            rv = getattr(packed_seq_params, "real_token_mask_q", None)
            if rv is not None:  # this rank's rows, or the whole packed batch's
                rv = rv.to(device=device, dtype=torch.bool).reshape(-1)
                row_valid = (rv if rv.numel() == sq else rv[positions]).reshape(1, sq)
            return starts, ends, row_valid
        if _is_thd(packed_seq_params):
            cu_q, _ = mcore_dsa.dsa_layout.get_packed_qk_cu_seqlens(packed_seq_params)
            starts, ends = packed_causal_window(cu_q.to(device), total=sq)
            rv = getattr(packed_seq_params, "real_token_mask_q", None)
            if rv is not None:
                row_valid = rv.to(device=device, dtype=torch.bool).reshape(1, sq)
            return starts, ends, row_valid
        starts, ends = causal_window(b, sq, sk, device=device)
        return starts, ends, row_valid

    # ------------------------------------------------------------------ forward
    def forward(self, query, key, value, attention_mask, x, qr, position_ids=None, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None, up_v_weight=None):
        # DSAPluginConfig.graph_shape_classes: a packed batch's top-k selection and sparse
        # attention run padded to its shape class, as that class's replayed CUDA graphs
        # (select_topk / sparse_attention hand over to megatron_dsa.graph); else eager
        self._graph_step = dsa_graph.layer_step(self, query, key, query.ndim == 3, get_plugin_config(self.config))
        try:
            return self._forward(query, key, value, attention_mask, x, qr, position_ids, attn_mask_type,
                                 attention_bias, packed_seq_params, up_v_weight)
        finally:
            self._graph_step = self._cp_now = None

    def _forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: Optional[torch.Tensor],
        attention_mask: Optional[torch.Tensor],
        x: torch.Tensor,
        qr: torch.Tensor,
        position_ids: Optional[torch.Tensor] = None,
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[torch.Tensor] = None,
        packed_seq_params=None,
        up_v_weight: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        thd = query.ndim == 3
        if thd:  # packed [t, np, d] -> [t, 1, np, d]
            query, key = query.unsqueeze(1), key.unsqueeze(1)
        self._check_inputs(query, key, value, up_v_weight)
        if attention_bias is not None:
            raise ValueError("DSA does not take an attention_bias")
        if self.rope_grad_group is not None:
            d = self.config.kv_lora_rank
            key = torch.cat([key[..., :d], _SumGradOver.apply(key[..., d:], self.rope_grad_group)], dim=-1)
        if self.cp_group is not None:  # all of the sequence's latent KV rows, in global order
            self._cp_now = self._cp_layout(packed_seq_params, key.shape[0], key.device)
            key = cp_gather(key, 0, self.cp_group, self._cp_now[1])
        sq, b, heads, _ = query.shape
        sk = key.shape[0]
        plugin = get_plugin_config(self.config)
        starts, ends, row_valid = self._window(
            sq, sk, b, attn_mask_type if attn_mask_type is not None else self.attn_mask_type,
            packed_seq_params, query.device,
        )

        coeff = float(self.config.dsa_indexer_loss_coeff or 0.0)
        if self.cp_group is not None and not self.config.calculate_per_token_loss:
            # each rank averages over its own rows and Megatron's schedule scales this loss by
            # the CP size (then averages the gradients over CP): divide, so that training does
            # not change with the CP size
            coeff /= self.cp_group.size()
        anchor = self.role.role == "anchor"
        with_loss = anchor and self.training and torch.is_grad_enabled() and coeff > 0
        timer_on = plugin.time_indexer
        with ic.Timer(timer_on, query.device) as t_all:
            # inside a Megatron checkpoint: its original (no-grad) forward records the indices,
            # its recomputation (grad mode, during backward) takes them back
            scope = ic.recompute_scope()
            recompute = scope is not None and torch.is_grad_enabled()
            digest = ic.fingerprint(x) if scope is not None else None
            match = None
            sig = ic.signature(b, sq, sk, query.device, packed_seq_params, self.training)
            q_i = k_i = w_i = None
            with ic.Timer(timer_on, query.device) as t_idx:
                if with_loss:  # the loss needs the indexer projections with grad
                    q_i, k_i, w_i = self._indexer_inputs(self.indexer, x, qr, packed_seq_params, True)
                if recompute:
                    topk_idx, original = scope.take(self.layer_number)  # the original forward's indices
                    match = ic.digests_match(original, digest)
                    ic.STATS.recompute_reuses += 1
                else:
                    topk_idx = self._topk_for_forward(
                        x, qr, q_i, k_i, w_i, starts, ends, sig, packed_seq_params, plugin
                    )
                    if scope is not None:
                        scope.put(self.layer_number, topk_idx, digest)
            sparse_loss = bool(self.config.dsa_indexer_use_sparse_loss)
            slot = None
            if with_loss and sparse_loss and self._loss_target_from_attention(query, key, q_i, plugin):
                # the attention backward hands the target over; the value is logged then
                loss, slot = indexer_loss_from_attention(
                    q_i, k_i, w_i, topk_idx, coeff, starts, ends,
                    use_relu=self.config.dsa_indexer_scoring_relu, query_valid_rows=row_valid,
                    calculate_per_token_loss=self.config.calculate_per_token_loss,
                    tp_group=self.pg_collection.tp, on_value=self._record_loss,
                )
            out, lse = self.sparse_attention(query, key, topk_idx, plugin.attention_backend,
                                             loss_target=slot, deterministic=plugin.deterministic,
                                             row_packing=plugin.attention_row_packing)
            if match is not None:
                out = ic.check_recompute(out, match, self.layer_number, ic.STATS)

            if with_loss:
                if slot is None:
                    loss = indexer_loss(
                        q_i, k_i, w_i,
                        query.detach().transpose(0, 1), key.detach()[:, :, 0].transpose(0, 1),
                        self.softmax_scale, coeff,
                        topk_indices=topk_idx, sparse=sparse_loss,
                        starts=starts, ends=ends, use_relu=self.config.dsa_indexer_scoring_relu,
                        query_valid_rows=row_valid,
                        calculate_per_token_loss=self.config.calculate_per_token_loss,
                        tp_group=self.pg_collection.tp, backend=plugin.loss_backend,
                        # the sparse target's per-head normaliser is the attention's own LSE
                        attn_lse=lse.detach() if sparse_loss else None,
                    )
                    self._record_loss(loss)
                out = mcore_dsa.DSAIndexerLossAutoScaler.apply(out, loss)
        ic.STATS.indexer_s += t_idx.elapsed
        ic.STATS.attention_s += t_all.elapsed

        # Latent -> value up-projection, per head: [sq, b, np, c] x [np, v, c] -> [sq, b, np * v]
        up_v = up_v_weight.to(dtype=out.dtype, device=out.device)
        out = torch.einsum("sbhc,hdc->sbhd", out, up_v).reshape(sq, b, heads * up_v.shape[1])
        return out.squeeze(1) if thd else out

    def _cp_layout(self, packed_seq_params, rows, device):
        """This call's CP layout: ``(this rank's global positions, the all-gather order,
        the packed batch's global cu_seqlens or None)`` (``context_parallel.cp_layout``)."""
        cp, rank = self.cp_group.size(), self.cp_group.rank()
        cu_q = None
        if _is_thd(packed_seq_params):
            cu_q, _ = mcore_dsa.dsa_layout.get_packed_qk_cu_seqlens(packed_seq_params)
            cu_q = cu_q.to(device)
            if not _capturing(device):  # a host read: skipped while a CUDA graph is captured
                cp_packed_check(cu_q, cp, rows, "packed_seq_params.cu_seqlens_q(_padded)")
        positions, order = cp_layout(cp, rank, rows, cu_q, device=device)
        return positions, order, cu_q

    def _record_loss(self, loss: torch.Tensor) -> None:
        # under CP each rank's loss is its rows' share of the whole sequence's: the logged value
        # sums the shares over the CP group
        mcore_dsa.DSAIndexerLossLoggingHelper.save_loss_to_tracker(
            loss=loss, layer_number=self.layer_number, num_layers=self.config.num_layers,
            reduce_group=self.cp_group,
        )

    def _loss_target_from_attention(self, query, key, q_i, plugin) -> bool:
        """Whether the sparse loss takes its target from the attention backward (see
        ``DSAPluginConfig.loss_target``)."""
        if plugin.loss_target == "recompute" or (plugin.loss_target == "auto" and self._graph_step is not None):
            return False  # a replayed attention backward cannot hand the target over
        sq, b, heads, d = query.shape
        attention = sparse_mla_backend(plugin.attention_backend, query.device, query.dtype, heads, d,
                                       self.latent_dim, plugin.deterministic, key.shape[0] * b, warn=False,
                                       row_packing=plugin.attention_row_packing)
        why = loss_target_reason(attention, heads)
        if why is not None:
            why = f"the sparse attention's backward cannot hand over the target: {why}"
        else:
            loss = indexer_loss_backend(plugin.loss_backend, q_i.device, q_i.dtype, sparse=True, warn=False)
            if loss.forward != "triton":
                why = f"the indexer loss does not run its fused kernels ({loss.forward}: {loss.reason})"
        if why is not None and plugin.loss_target == "attention":
            raise ValueError(f"DSAPluginConfig.loss_target='attention' cannot run: {why}")
        return why is None

    def _indexer_inputs(self, indexer, x, qr, packed_seq_params, grad: bool):
        """Indexer tensors batch-first: q ``[b, sq, H, D]``, k ``[b, sk, D]``, w ``[b, sq, H]``.

        The indexer sees detached activations: its loss trains only the indexer.
        """
        with torch.set_grad_enabled(grad):
            q_i, k_i, w_i = indexer.forward_before_topk(x.detach(), qr.detach(), packed_seq_params)
            if self._cp_now is not None:  # every query row scores all keys of the sequence
                k_i = cp_gather(k_i, 0, self.cp_group, self._cp_now[1])
        return q_i.transpose(0, 1), k_i.transpose(0, 1), w_i.transpose(0, 1)

    def _topk_for_forward(self, x, qr, q_i, k_i, w_i, starts, ends, sig, packed_seq_params, plugin):
        """Anchor: compute (and publish); shared: reuse a proven entry or promote."""
        cache = None
        try:
            if self.role.role == "anchor":
                if self.opens_scope:
                    cache = ic.IndexCache.open(self.chunk_key)
                elif self.has_consumers or self.closes_scope:
                    cache = ic.IndexCache.current(self.chunk_key)
                if q_i is None:
                    q_i, k_i, w_i = self._indexer_inputs(self.indexer, x, qr, packed_seq_params, False)
                topk_idx = self.select_topk(q_i, k_i, w_i, starts, ends, plugin.indexer_backend)
                ic.STATS.computes += 1
                if cache is not None and self.has_consumers:
                    cache.put(self.layer_number, topk_idx, sig)
            else:
                cache = ic.IndexCache.current(self.chunk_key)
                topk_idx, reason = (None, "no open cache") if cache is None else cache.lookup(
                    self.role.source, self.previous_layer, sig
                )
                if topk_idx is None:
                    ic.STATS.promotions[reason] += 1
                    q_s, k_s, w_s = self._indexer_inputs(self._source_indexer[0], x, qr, packed_seq_params, False)
                    topk_idx = self.select_topk(q_s, k_s, w_s, starts, ends, plugin.indexer_backend)
                else:
                    ic.STATS.hits += 1
        except BaseException:
            if cache is not None:
                cache.close()
            raise
        if cache is not None:
            cache.cursor = self.layer_number
            if self.closes_scope:
                cache.close()
        return topk_idx

    def select_topk(self, q_i, k_i, w_i, starts, ends, backend="auto") -> torch.Tensor:
        """Top-k key ids ``int32 [b, sq, topk]`` (``-1`` padded) for this layer."""
        fp8 = get_plugin_config(self.config).indexer_precision == "fp8"  # e4m3 selection numerics
        if self._graph_step is not None:  # padded to the call's shape class, replayed
            if fp8:
                q_i, k_i, w_i = fp8_selection_inputs(q_i.detach(), k_i.detach(), w_i.detach())
            return self._graph_step.topk(q_i, k_i, w_i, starts, ends)
        idx, _ = indexer_topk(
            q_i.detach(), k_i.detach(), w_i.detach(), self.index_topk, starts, ends,
            use_relu=self.config.dsa_indexer_scoring_relu, backend=backend, precision="fp8" if fp8 else "bf16",
        )
        return idx

    def sparse_attention(self, query, key, topk_idx, backend="auto", loss_target=None, deterministic=None,
                         row_packing=None):
        """Latent attention output ``[sq, b, np, kv_lora_rank]`` over the selected keys, and the
        per-head natural-log LSE ``[b, sq, np]``."""
        sq, b, heads, d = query.shape
        sk = key.shape[0]
        # Run the whole batch in one call: flatten (batch, row) and use global key ids b*sk + j.
        q_flat = query.transpose(0, 1).reshape(b * sq, heads, d)
        kv_flat = key[:, :, 0].transpose(0, 1).reshape(b * sk, d)
        offs = (torch.arange(b, device=topk_idx.device, dtype=topk_idx.dtype) * sk).view(b, 1, 1)
        gidx = torch.where(topk_idx >= 0, topk_idx + offs, topk_idx).reshape(b * sq, topk_idx.shape[-1])
        if self._graph_step is not None and loss_target is None:  # padded to the class, replayed
            out, lse = self._graph_step.attention(q_flat, kv_flat, gidx)
        else:
            if self._graph_step is not None:  # loss_target='attention': the slot needs the eager backward
                dsa_graph.STATS.eager["loss_target_attention"] += 1
            out, lse = sparse_mla(q_flat, kv_flat, gidx, self.softmax_scale, d_v=self.latent_dim,
                                  backend=backend, loss_target=loss_target, deterministic=deterministic,
                                  row_packing=row_packing)
        return out.reshape(b, sq, heads, self.latent_dim).transpose(0, 1), lse.view(b, sq, heads)
