"""Worker for the pipeline / recompute tests: one forward-backward of a tiny DSA GPT.

Run under torchrun (or plain python for PP=1). Weights are set from a generator seeded by each
parameter's *global* name, so every pipeline split has the same model. Writes, per rank,
``{global param name: grad}``, the losses, this rank's resolved roles and the cache stats.

``--batch FILE`` (a JSON list of argument lists, each one config with its own ``--out``) runs
several configs one after another in the same processes: the tests' parametrized cases of one
parallel layout share one launch, whose start-up (importing torch and Megatron in every process)
costs more than a tiny config. Between configs everything global is torn down and rebuilt, so
each config's files are bit-identical to its own launch.
"""

import argparse
import gc
import hashlib
import json
import os
import sys
import time

import torch


def _parser():
    p = argparse.ArgumentParser()
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--cp", type=int, default=1)
    p.add_argument("--tp", type=int, default=1, help="tensor parallel size (with sequence parallelism)")
    p.add_argument("--per-token-loss", action="store_true")
    p.add_argument("--packed", action="store_true",
                   help="packed THD microbatches (one row of several documents); CP splits them per document")
    p.add_argument("--seed", type=int, default=7, help="seed of the token batches")
    p.add_argument("--vpp", type=int, default=None)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--microbatches", type=int, default=4)
    p.add_argument("--recompute", choices=["none", "full", "selective"], default="none")
    p.add_argument("--freq", type=int, default=1)
    p.add_argument("--pattern", default=None)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--forward-only-first", action="store_true",
                   help="run a forward-only pass (train mode) before the training step")
    p.add_argument("--stuck-checkpoint-flag", action="store_true",
                   help="first raise inside a Megatron checkpoint, leaving its IS_CHECKPOINTING set")
    p.add_argument("--size", choices=["tiny", "real"], default="tiny",
                   help="real: hidden 4096, 32 heads, indexer 64 x 128, k = 2048, bf16 (the NCCL receipt)")
    p.add_argument("--seq", type=int, default=16384, help="sequence length of --size real")
    p.add_argument("--timed-steps", type=int, default=0,
                   help="after the compared step, time this many more (step ms and peak memory saved)")
    p.add_argument("--out", help="prefix of this config's per-rank output files (required without --batch)")
    p.add_argument("--batch", help="a JSON list of argument lists: run those configs one after another "
                                   "in these processes (no other argument)")
    return p


def parse_args(argv):
    """The configs of a command line: its own, or the list in ``--batch FILE``."""
    p = _parser()
    a = p.parse_args(argv)
    if a.batch is None:
        if a.out is None:
            p.error("--out is required (or --batch)")
        a.argv = list(argv)
        return [a]
    others = [k for k, v in vars(a).items() if k != "batch" and v != p.get_default(k)]
    if others:
        p.error(f"--batch takes no other argument (each config has its own): got {others}")
    with open(a.batch) as f:
        configs = []
        for argv_i in json.load(f):
            c = p.parse_args(argv_i)
            if c.batch is not None or c.out is None:
                p.error(f"a --batch config needs its own --out and no --batch: {argv_i}")
            c.argv = list(argv_i)
            configs.append(c)
    if len({c.device for c in configs}) > 1:
        p.error("the configs of one --batch share one process group: one --device")
    return configs


def main(argv=None):
    configs = parse_args(sys.argv[1:] if argv is None else argv)

    import torch.distributed as dist
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core import utils as mcore_utils
    from megatron.core.transformer.experimental_attention_variant.dsa import DSAIndexerLossLoggingHelper

    from megatron_dsa import index_cache as ic
    from megatron_dsa.attention import DSAttention

    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29577")
    cuda = configs[0].device == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    # what a config may change in the process, as a fresh process has it
    rng, tex, select_topk = torch.get_rng_state(), mcore_utils.tex, DSAttention.select_topk
    for i, a in enumerate(configs):
        if len(configs) > 1 and rank == 0:  # the output's tail names the config a failure stopped in
            print(f"pp_worker: config {i + 1}/{len(configs)}: {' '.join(a.argv)}", flush=True)
        torch.set_rng_state(rng)
        try:
            run(a, rank)
        finally:  # undo what the config left behind (the next one starts as in a fresh process)
            parallel_state.destroy_model_parallel()
            mcore_utils.tex = tex  # the packed-CP stand-in
            DSAttention.select_topk = select_topk  # the TP top-k recorder
            tensor_parallel.random._unset_checkpointing()  # --stuck-checkpoint-flag leaves it set
            DSAIndexerLossLoggingHelper.tracker.clear()  # sized by the first model's layers
            ic.STATS.reset()
            gc.collect()  # the model's weakly linked indexers (index_cache.links) go with it
    dist.destroy_process_group()


def run(a, rank):
    """One config: build the model, one forward-backward, save this rank's results."""
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.transformer.transformer_config import MLATransformerConfig
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    import megatron_dsa.patches as patches
    from megatron_dsa import index_cache as ic
    from megatron_dsa.config import set_plugin_config
    from megatron_dsa.spec import get_dsa_gpt_block_spec

    cuda = a.device == "cuda"
    parallel_state.initialize_model_parallel(pipeline_model_parallel_size=a.pp,
                                             virtual_pipeline_model_parallel_size=a.vpp,
                                             context_parallel_size=a.cp, tensor_model_parallel_size=a.tp)
    patches.apply()
    if cuda or a.tp > 1:  # the model-parallel RNG states (SP forks them; on the CPU the patched no-ops)
        from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(1234)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    recompute = dict(recompute_granularity=None)
    if a.recompute == "full":
        recompute = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    elif a.recompute == "selective":
        recompute = dict(recompute_granularity="selective", recompute_modules=["core_attn"])
    real = a.size == "real"
    if real:  # the issue's real sizes (DeepSeek-V3.2's MLA widths and indexer), bf16
        dims = dict(hidden_size=4096, num_attention_heads=32, ffn_hidden_size=11264, q_lora_rank=1536,
                    kv_lora_rank=512, qk_head_dim=128, qk_pos_emb_head_dim=64, v_head_dim=128,
                    dsa_indexer_n_heads=64, dsa_indexer_head_dim=128, dsa_indexer_topk=2048, bf16=True)
        dtype, vocab, init_std = torch.bfloat16, 32768, 0.02
    else:
        dims = dict(hidden_size=64, num_attention_heads=4, ffn_hidden_size=128, q_lora_rank=32, kv_lora_rank=32,
                    qk_head_dim=16, qk_pos_emb_head_dim=8, v_head_dim=16, dsa_indexer_n_heads=32,
                    dsa_indexer_head_dim=16, dsa_indexer_topk=8)
        dtype, vocab, init_std = torch.float32, 64, 0.2
    cfg = MLATransformerConfig(
        num_layers=a.layers, **dims,
        rope_type="rope", experimental_attention_variant="dsa", dsa_indexer_loss_coeff=0.1,
        dsa_indexer_use_sparse_loss=True, dsa_indexer_topk_freq=a.freq,
        add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0, transformer_impl="local",
        use_cpu_initialization=True, params_dtype=dtype, pipeline_dtype=dtype,
        pipeline_model_parallel_size=a.pp, virtual_pipeline_model_parallel_size=a.vpp, **recompute,
        context_parallel_size=a.cp, calculate_per_token_loss=a.per_token_loss,
        cp_comm_type="allgather" if a.cp > 1 else None,
        tensor_model_parallel_size=a.tp, sequence_parallel=a.tp > 1,
        batch_p2p_comm=cuda,  # batched p2p over gloo mis-orders interleaved sends (measured)
    )
    if a.pattern:
        set_plugin_config(cfg, index_pattern=a.pattern)
    def tp_dim(prm):
        """The dim a tensor-parallel parameter is split along (None: replicated)."""
        return prm.partition_dim if a.tp > 1 and getattr(prm, "tensor_model_parallel", False) else None

    models, names = [], {}
    for vp in range(a.vpp or 1):
        vp_stage = vp if a.vpp else None
        m = GPTModel(
            config=cfg, transformer_layer_spec=get_dsa_gpt_block_spec(cfg, vp_stage=vp_stage),
            vocab_size=vocab, max_sequence_length=a.seq if real else 64, position_embedding_type="none",
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
            share_embeddings_and_output_weights=False, vp_stage=vp_stage,
        )
        off = get_transformer_layer_offset(cfg, vp_stage=vp_stage)
        for n, prm in m.named_parameters():
            parts = n.split(".")
            if parts[:2] == ["decoder", "layers"]:
                parts[2] = str(int(parts[2]) + off)
            g = ".".join(parts)
            seed = int(hashlib.sha256(g.encode()).hexdigest()[:8], 16)
            gen = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                if n.endswith("layer_norm_weight") or n.endswith("norm.weight"):
                    prm.fill_(1.0)
                elif n.endswith("bias"):
                    prm.zero_()
                else:  # the whole (TP = 1) tensor, then this rank's shard of it
                    dim = tp_dim(prm)
                    shape = list(prm.shape)
                    if dim is not None:
                        shape[dim] *= a.tp
                    full = torch.randn(shape, generator=gen) * init_std
                    if dim is not None:
                        full = full.chunk(a.tp, dim)[parallel_state.get_tensor_model_parallel_rank()]
                    prm.copy_(full)
            names[prm] = g
        models.append(m.cuda() if cuda else m)

    if real:
        mbs, seq = 1, a.seq
    else:
        mbs, seq = (1, 64) if a.packed else (2, 32)
    gen = torch.Generator().manual_seed(a.seed)
    batches = [torch.randint(0, vocab, (mbs, seq + 1), generator=gen).to(a.device) for _ in range(a.microbatches)]
    # packed: documents of different lengths (multiples of 2 * CP), a different split per microbatch
    doc_lens = [[12, 20, 16, 16], [28, 4, 32], [64], [8, 8, 24, 24]]
    if real:  # the same splits, scaled to the sequence (still multiples of 2 * CP)
        doc_lens = [[d * (seq // 64) for d in ds] for ds in doc_lens]
    cu_seqlens = [torch.tensor([0] + torch.tensor(d).cumsum(0).tolist(), dtype=torch.int32, device=a.device)
                  for d in doc_lens]

    def make_iter():
        from megatron.core.packed_seq_params import PackedSeqParams

        out = []
        for i, b in enumerate(batches):
            d = {"tokens": b[:, :-1], "labels": b[:, 1:], "cu_seqlens": None}
            if a.packed:
                cu = cu_seqlens[i % len(cu_seqlens)]
                mx = int((cu[1:] - cu[:-1]).max())
                d.update(cu_seqlens=cu[None], cu_seqlens_padded=cu[None], packed_seq_params=PackedSeqParams(
                    qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, cu_seqlens_q_padded=cu,
                    cu_seqlens_kv_padded=cu, max_seqlen_q=mx, max_seqlen_kv=mx))
            out.append(d)
        if a.cp > 1:  # Megatron's own load-balanced CP split (per document when packed)
            from megatron.core import utils as mcore_utils

            if a.packed and mcore_utils.tex is None:
                # Megatron calls Transformer Engine's thd_get_partitioned_indices, absent on the
                # CPU: the plugin's own per-document zigzag positions stand in for it
                import types

                from megatron_dsa.context_parallel import cp_packed_positions

                mcore_utils.tex = types.SimpleNamespace(thd_get_partitioned_indices=(
                    lambda cu, total, cp, r: cp_packed_positions(cu, cp, r, total // cp)))
            cp_group = parallel_state.get_context_parallel_group()
            out = [mcore_utils.get_batch_on_this_cp_rank(d, is_hybrid_cp=False, cp_group=cp_group) for d in out]
        return iter(out)

    iters = [make_iter() for _ in models]

    def step(it, model):
        batch = next(it)
        out = model(batch["tokens"], None, None, labels=batch["labels"],
                    packed_seq_params=batch.get("packed_seq_params"))

        def loss_fn(t):
            if a.per_token_loss:  # a sum and its token count; the gradients are divided at the end
                total = t.float().sum()
                return total, torch.tensor(t.numel()), {"lm loss": total.detach() / (t.numel() * a.cp)}
            # the mean over the whole sequence: with CP each rank adds its rows' share (Megatron's
            # schedule multiplies by the CP size and the gradients are averaged over CP below)
            loss = t.float().sum() / (t.numel() * a.cp)
            return loss, {"lm loss": loss.detach().clone()}

        return out, loss_fn

    selected = []
    if a.tp > 1:  # record every top-k selection: TP ranks must select bit-identical ids
        from megatron_dsa.attention import DSAttention

        original_select = DSAttention.select_topk

        def recording_select(self, *args, **kwargs):
            idx = original_select(self, *args, **kwargs)
            selected.append(idx.detach().clone())
            return idx

        DSAttention.select_topk = recording_select
    for m in models:
        m.train()
    if a.stuck_checkpoint_flag:
        from megatron.core import tensor_parallel

        def boom(t):
            raise ValueError("planted failure inside a checkpoint")

        try:
            tensor_parallel.checkpoint(boom, False, torch.zeros(1, requires_grad=True))
        except ValueError:
            pass
        assert tensor_parallel.random.is_checkpointing()  # what an exception leaves behind
    if a.forward_only_first:  # e.g. an RL reference-logprob pass: train mode, no backward, other data
        other = [{"tokens": (b[:, :-1] + 1) % 64, "labels": b[:, 1:]} for b in batches]
        get_forward_backward_func()(
            forward_step_func=step, data_iterator=[iter(other) for _ in models] if len(models) > 1 else iter(other),
            model=models if len(models) > 1 else models[0], num_microbatches=a.microbatches,
            seq_length=seq, micro_batch_size=mbs, forward_only=True,
        )
    ic.STATS.reset()
    losses = get_forward_backward_func()(
        forward_step_func=step, data_iterator=iters if len(models) > 1 else iters[0],
        model=models if len(models) > 1 else models[0], num_microbatches=a.microbatches,
        seq_length=seq, micro_batch_size=mbs, forward_only=False,
    )
    roles = [r for r in ic.resolve_schedule(cfg) if r.stage == parallel_state.get_pipeline_model_parallel_rank()]
    # what Megatron's DDP and finalize_model_grads do over the CP ranks: average the gradients
    # (per-token loss: sum them and divide by the tokens of the step); sum the loss shares
    tokens = a.microbatches * mbs * seq
    cp_group = parallel_state.get_context_parallel_group() if a.cp > 1 else None
    for m in models:
        for p_ in m.parameters():
            if p_.grad is None:
                continue
            if cp_group is not None:
                dist.all_reduce(p_.grad, group=cp_group)
            p_.grad /= tokens if a.per_token_loss else a.cp
    if cp_group is not None:
        for x in losses or []:
            dist.all_reduce(x["lm loss"], group=cp_group)
    topk_checked = 0
    if a.tp > 1:
        tp_group = parallel_state.get_tensor_model_parallel_group()
        for idx in selected:
            peers = [torch.empty_like(idx) for _ in range(a.tp)]
            dist.all_gather(peers, idx.contiguous(), group=tp_group)
            assert all(torch.equal(peer, idx) for peer in peers), "TP ranks selected different top-k ids"
            topk_checked += 1
    whole = {}  # TP: Megatron's finalize_model_grads over TP, then the whole gradient of split params
    if a.tp > 1:
        tp_group = parallel_state.get_tensor_model_parallel_group()
        for m in models:
            for p_ in m.parameters():
                if p_.grad is None:
                    continue
                dim = tp_dim(p_)
                if dim is not None:
                    parts = [torch.empty_like(p_.grad) for _ in range(a.tp)]
                    dist.all_gather(parts, p_.grad.contiguous(), group=tp_group)
                    whole[p_] = torch.cat(parts, dim)
                elif getattr(p_, "average_gradients_across_tp_domain", False):
                    dist.all_reduce(p_.grad, group=tp_group)
                    p_.grad /= a.tp
                elif getattr(p_, "sequence_parallel", False):
                    dist.all_reduce(p_.grad, group=tp_group)
    grads = {names[p_]: whole.get(p_, p_.grad).detach().cpu().clone() for m in models for p_ in m.parameters()
             if p_.grad is not None}
    timing = {}
    if a.timed_steps:  # more steps of the same batches, timed (the gradients above are saved)
        if a.tp > 1:
            DSAttention.select_topk = original_select
        for m in models:
            m.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(a.timed_steps):
            its = [make_iter() for _ in models]
            dist.barrier()
            t0 = time.perf_counter()
            get_forward_backward_func()(
                forward_step_func=step, data_iterator=its if len(models) > 1 else its[0],
                model=models if len(models) > 1 else models[0], num_microbatches=a.microbatches,
                seq_length=seq, micro_batch_size=mbs, forward_only=False,
            )
            if cuda:
                torch.cuda.synchronize()
            times.append((time.perf_counter() - t0) * 1e3)
            for m in models:
                m.zero_grad(set_to_none=True)
        timing = {"step_ms": sorted(times)[len(times) // 2], "step_ms_all": times,
                  "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None}
    first_cp = parallel_state.get_context_parallel_rank() == 0 and parallel_state.get_tensor_model_parallel_rank() == 0
    torch.save({"grads": grads, "losses": [float(x["lm loss"]) for x in losses] if losses and first_cp else [],
                "roles": roles, "stats": ic.STATS.snapshot(), "topk_checked": topk_checked, "timing": timing},
               f"{a.out}.rank{rank}.pt")


if __name__ == "__main__":
    sys.exit(main())
