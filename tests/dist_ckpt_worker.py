"""Worker for the multi-rank distributed-checkpoint test (torchrun, gloo, CPU).

Builds a tiny DSA GPT with index sharing on ``--pp`` pipeline stages, saves it with Megatron's
``dist_checkpointing`` under the metadata Megatron training passes, loads the checkpoint into a
freshly initialised model of the same split and checks that every parameter is identical.
Writes, per rank, ``{global parameter name: tensor}`` of the saved model to ``--out``.
"""

import argparse
import os
import re

import torch


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--pp", type=int, default=2)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--freq", type=int, default=2)
    p.add_argument("--ckpt", required=True)
    p.add_argument("--out", required=True)
    a = p.parse_args()

    import torch.distributed as dist
    from megatron.core import dist_checkpointing, parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer.transformer_config import MLATransformerConfig
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    import megatron_dsa.patches as patches
    from megatron_dsa.dist_checkpoint import check_index_schedule
    from megatron_dsa.spec import get_dsa_gpt_block_spec

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    parallel_state.initialize_model_parallel(pipeline_model_parallel_size=a.pp)
    patches.apply()
    cfg = MLATransformerConfig(
        num_layers=a.layers, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128,
        q_lora_rank=32, kv_lora_rank=32, qk_head_dim=16, qk_pos_emb_head_dim=8, v_head_dim=16,
        rope_type="rope", experimental_attention_variant="dsa", dsa_indexer_n_heads=32,
        dsa_indexer_head_dim=16, dsa_indexer_topk=8, dsa_indexer_loss_coeff=0.1,
        dsa_indexer_topk_freq=a.freq, add_bias_linear=False, use_cpu_initialization=True,
        params_dtype=torch.float32, transformer_impl="local", hidden_dropout=0.0,
        attention_dropout=0.0, pipeline_model_parallel_size=a.pp, pipeline_dtype=torch.float32,
    )
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()

    def build(seed):
        torch.manual_seed(seed)
        return GPTModel(
            config=cfg, transformer_layer_spec=get_dsa_gpt_block_spec(cfg), vocab_size=97,
            max_sequence_length=32, position_embedding_type="none",
            pre_process=pp_rank == 0, post_process=pp_rank == a.pp - 1,
        )

    # Megatron training's metadata (megatron.training.checkpointing._build_sharded_state_dict_metadata)
    metadata = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True,
                "dp_cp_group": parallel_state.get_data_parallel_group(with_context_parallel=True)}
    src = build(1 + rank)
    dist_checkpointing.save(src.sharded_state_dict(metadata=metadata), a.ckpt)
    dist.barrier()

    dst = build(100 + rank)
    check_index_schedule(dst, a.ckpt)
    state = dist_checkpointing.load(dst.sharded_state_dict(metadata=metadata), a.ckpt)
    dst.load_state_dict(state, strict=True)
    for (name, x), (_, y) in zip(src.state_dict().items(), dst.state_dict().items()):
        if isinstance(x, torch.Tensor):
            assert torch.equal(x, y), name

    offset = get_transformer_layer_offset(cfg)
    glob = {}
    for name, x in src.state_dict().items():
        if isinstance(x, torch.Tensor) and name.startswith("decoder.layers."):
            name = re.sub(r"^decoder\.layers\.(\d+)\.", lambda m: f"decoder.layers.{int(m.group(1)) + offset}.", name)
            glob[name] = x.clone()
    torch.save(glob, os.path.join(a.out, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
