"""Worker for the pipeline-parallel hybrid test: one training step (1F1B, gloo, CPU) of a tiny
HybridModel with megatron-dsa's DSA layers.

Run under torchrun (or plain python for PP=1). Weights come from a generator seeded by each
parameter's *global* name (the layer's hybrid layer number), so every pipeline split has the same
model. Writes, per rank, ``{global param name: grad}``, the losses, this rank's roles and the
index-cache stats.
"""

import argparse
import hashlib
import os
import sys

import torch


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--hybrid", required=True, help="hybrid_layer_pattern, e.g. 'D-D-|D-D-'")
    p.add_argument("--freq", type=int, default=1)
    p.add_argument("--pattern", default=None, help="index_pattern over the DSA layers")
    p.add_argument("--microbatches", type=int, default=4)
    p.add_argument("--out", required=True)
    a = p.parse_args()

    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.models.hybrid.hybrid_model import HybridModel
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.transformer.transformer_config import MLATransformerConfig

    import megatron_dsa.patches as patches
    from megatron_dsa import index_cache as ic
    from megatron_dsa.config import set_plugin_config
    from megatron_dsa.hybrid import get_dsa_hybrid_stack_spec

    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29578")
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    parallel_state.initialize_model_parallel(pipeline_model_parallel_size=a.pp)
    patches.apply()
    layers = len(a.hybrid.replace("|", ""))
    cfg = MLATransformerConfig(
        num_layers=layers, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128,
        q_lora_rank=32, kv_lora_rank=32, qk_head_dim=16, qk_pos_emb_head_dim=8, v_head_dim=16,
        rope_type="rope", experimental_attention_variant="dsa", dsa_indexer_n_heads=32,
        dsa_indexer_head_dim=16, dsa_indexer_topk=8, dsa_indexer_loss_coeff=0.1,
        dsa_indexer_use_sparse_loss=True, dsa_indexer_topk_freq=a.freq,
        add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0, transformer_impl="local",
        use_cpu_initialization=True, params_dtype=torch.float32, pipeline_dtype=torch.float32,
        pipeline_model_parallel_size=a.pp, batch_p2p_comm=False,
    )
    if a.pattern:
        set_plugin_config(cfg, index_pattern=a.pattern)
    # with PP the stack sees only its own segment: hand the whole pattern over
    spec = get_dsa_hybrid_stack_spec(cfg, hybrid_layer_pattern=a.hybrid if a.pp > 1 else None)
    model = HybridModel(
        config=cfg, hybrid_stack_spec=spec, vocab_size=64, max_sequence_length=64,
        hybrid_layer_pattern=a.hybrid, position_embedding_type="none",
        pre_process=parallel_state.is_pipeline_first_stage(), post_process=parallel_state.is_pipeline_last_stage(),
    )
    names = {}
    for n, prm in model.named_parameters():
        parts = n.split(".")
        if parts[:2] == ["decoder", "layers"]:
            parts[2] = str(model.decoder.layers[int(parts[2])].layer_number - 1)
        g = ".".join(parts)
        gen = torch.Generator().manual_seed(int(hashlib.sha256(g.encode()).hexdigest()[:8], 16))
        with torch.no_grad():
            if n.endswith("norm.weight"):
                prm.fill_(1.0)
            elif n.endswith("bias"):
                prm.zero_()
            else:
                prm.copy_(torch.randn(prm.shape, generator=gen) * 0.2)
        names[prm] = g

    mbs, seq = 2, 32
    gen = torch.Generator().manual_seed(7)
    batches = [torch.randint(0, 64, (mbs, seq + 1), generator=gen) for _ in range(a.microbatches)]
    it = iter([{"tokens": b[:, :-1], "labels": b[:, 1:]} for b in batches])

    def step(data, m):
        batch = next(data)
        out = m(batch["tokens"], None, None, labels=batch["labels"])

        def loss_fn(t):
            loss = t.float().mean()
            return loss, {"lm loss": loss.detach().clone()}

        return out, loss_fn

    model.train()
    ic.STATS.reset()
    losses = get_forward_backward_func()(
        forward_step_func=step, data_iterator=it, model=model, num_microbatches=a.microbatches,
        seq_length=seq, micro_batch_size=mbs, forward_only=False,
    )
    stage = parallel_state.get_pipeline_model_parallel_rank()
    roles = [r for r in ic.resolve_schedule(cfg) if r.stage == stage]
    grads = {names[q]: q.grad.detach().clone() for q in model.parameters() if q.grad is not None}
    torch.save({"grads": grads, "losses": [float(x["lm loss"]) for x in losses or []], "roles": roles,
                "stats": ic.STATS.snapshot()}, f"{a.out}.rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
