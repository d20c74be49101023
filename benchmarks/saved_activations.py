"""What one DSA transformer layer keeps for its backward, per token, grouped by the module
that saved it (saved-tensor hooks; storages counted once; parameters excluded).

    python benchmarks/saved_activations.py --S 2048 [--impl ours mcore] [--device cpu]

The model is the training receipt's (hidden 2048, 16 heads, q_lora 1536, kv_lora 512, indexer
64 x 128, k = 2048, RMSNorm, SwiGLU 5632, bf16, local modules). On the CPU the kernels are the
PyTorch references, whose own saved tensors differ from the GPU kernels'; the layer-level
tensors (projections, norms, MLP, the core attention's inputs and outputs) are the same.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def measure(impl: str, S: int, device: str):
    from megatron.core.transformer.spec_utils import build_module
    from megatron.core.transformer.transformer_config import MLATransformerConfig

    from megatron_dsa.config import set_plugin_config
    from megatron_dsa.integration import to_megatron_core_modules
    from megatron_dsa.spec import get_dsa_layer_specs

    cfg = MLATransformerConfig(
        num_layers=1, hidden_size=2048, num_attention_heads=16, ffn_hidden_size=5632, q_lora_rank=1536,
        kv_lora_rank=512, qk_head_dim=128, qk_pos_emb_head_dim=64, v_head_dim=128, rope_type="rope",
        experimental_attention_variant="dsa", dsa_indexer_n_heads=64, dsa_indexer_head_dim=128,
        dsa_indexer_topk=2048, dsa_indexer_loss_coeff=0.01, dsa_indexer_use_sparse_loss=True,
        add_bias_linear=False, normalization="RMSNorm", gated_linear_unit=True, transformer_impl="local",
        hidden_dropout=0.0, attention_dropout=0.0, params_dtype=torch.bfloat16, bf16=True,
        use_cpu_initialization=device == "cpu",
    )
    set_plugin_config(cfg, loss_target="recompute")
    spec = get_dsa_layer_specs(cfg)[0]
    if impl == "mcore":
        spec = to_megatron_core_modules(spec)
    layer = build_module(spec, config=cfg, layer_number=1).to(device=device, dtype=torch.bfloat16)
    names = {m: n or "(layer)" for n, m in layer.named_modules()}
    stack = []

    def enter(mod, args):
        stack.append(names[mod])

    def leave(mod, args, out):
        stack.pop()

    for m in layer.modules():
        m.register_forward_pre_hook(enter)
        m.register_forward_hook(leave)
    params = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    seen, by_module = set(), collections.Counter()

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in seen and ptr not in params:
            seen.add(ptr)
            by_module[stack[-1] if stack else "(outside)"] += t.untyped_storage().nbytes()
        return t

    x = torch.randn(S, 1, cfg.hidden_size, dtype=torch.bfloat16, device=device, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x, None)
    return by_module


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--S", type=int, default=2048)
    p.add_argument("--impl", nargs="+", default=["ours"], choices=["ours", "mcore"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args()
    import torch.distributed as dist
    from megatron.core import parallel_state

    import megatron_dsa.patches as patches

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29879")
    dist.init_process_group("gloo" if a.device == "cpu" else "nccl", rank=0, world_size=1)
    parallel_state.initialize_model_parallel()
    patches.apply()
    for impl in a.impl:
        by = measure(impl, a.S, a.device)
        print(f"{impl}: {sum(by.values()) / a.S / 1024:.1f} KiB per token saved for backward (S = {a.S})")
        for name, nbytes in by.most_common(12):
            print(f"  {nbytes / a.S / 1024:8.1f} KiB  {name}")


if __name__ == "__main__":
    main()
