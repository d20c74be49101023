"""Diagnostic: is a CUDA-graph replay of the DSA core attention (forward + backward) bitwise equal
to eager execution on the same inputs? Prints the max |difference| of the output and of every
gradient, for the core attention alone and for a whole DSA TransformerLayer.

    PYTHONPATH=$PWD python3 benchmarks/graph_vs_eager.py     (needs megatron-core and a GPU)
"""

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))


def main():
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.spec_utils import build_module

    import megatron_dsa.patches as patches
    from helpers import tiny_config
    from megatron_dsa.spec import get_dsa_layer_specs

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29655")
    dist.init_process_group("nccl", rank=0, world_size=1)
    parallel_state.initialize_model_parallel()
    patches.apply()
    model_parallel_cuda_manual_seed(1)
    torch.manual_seed(0)
    cfg = tiny_config(num_layers=1, use_cpu_initialization=False, hidden_size=256, num_attention_heads=8,
                      q_lora_rank=128, kv_lora_rank=128, qk_head_dim=32, v_head_dim=32,
                      qk_pos_emb_head_dim=32, dsa_indexer_n_heads=16, dsa_indexer_head_dim=64,
                      dsa_indexer_topk=64, dsa_indexer_use_sparse_loss=True)
    layer = build_module(get_dsa_layer_specs(cfg)[0], config=cfg, layer_number=1).cuda().train()
    params = [p for p in layer.parameters()]
    x = torch.randn(512, 2, cfg.hidden_size, device="cuda", requires_grad=True)
    dy = torch.randn(512, 2, cfg.hidden_size, device="cuda")

    def step():
        out, _ = layer(x, None)
        grads = torch.autograd.grad((out * dy).sum(), [x] + params, allow_unused=True)
        return out, grads

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        gout, ggrads = step()
    g.replay()
    torch.cuda.synchronize()
    eout, egrads = step()
    names = ["x"] + [n for n, _ in layer.named_parameters()]
    print(f"output max|graph-eager| = {(gout - eout).abs().max().item():.3e}")
    worst = 0.0
    for n, a, b in zip(names, ggrads, egrads):
        if a is None or b is None:
            continue
        d = (a - b).abs().max().item()
        worst = max(worst, d)
        if d > 0:
            print(f"  grad {n}: max|graph-eager| = {d:.3e} (max|eager| {b.abs().max().item():.3e})")
    print(f"worst grad difference {worst:.3e}; bitwise equal: {worst == 0 and (gout == eout).all().item()}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
