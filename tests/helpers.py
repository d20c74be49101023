"""Builders shared by the tests: tiny DSA configs and Megatron-Core's own DSA as the reference."""

from __future__ import annotations

import copy

import torch


def tiny_config(**overrides):
    from megatron.core.transformer.transformer_config import MLATransformerConfig

    kw = dict(
        num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128,
        q_lora_rank=32, kv_lora_rank=32, qk_head_dim=16, qk_pos_emb_head_dim=8, v_head_dim=16,
        experimental_attention_variant="dsa", dsa_indexer_n_heads=32, dsa_indexer_head_dim=16,
        dsa_indexer_topk=8, dsa_indexer_loss_coeff=1.0, add_bias_linear=False,
        use_cpu_initialization=True, rope_type="rope", params_dtype=torch.float32,
        transformer_impl="local", hidden_dropout=0.0, attention_dropout=0.0,
    )
    kw.update(overrides)
    return MLATransformerConfig(**kw)


def to_mcore_spec(spec):
    """Deep copy of one of our specs with Megatron-Core's DSAttention / DSAIndexer swapped in."""
    from megatron.core.transformer.experimental_attention_variant import dsa as md

    import megatron_dsa.attention as ours

    spec = copy.deepcopy(spec)

    def walk(node):
        sub = getattr(node, "submodules", None)
        if getattr(node, "module", None) is ours.DSAttention:
            node.module = md.DSAttention
        if getattr(node, "module", None) is ours.DSAIndexer:
            node.module = md.DSAIndexer
        if sub is None:
            return
        if isinstance(sub, list):
            for s in sub:
                walk(s)
            return
        for name in vars(sub):
            child = getattr(sub, name)
            if isinstance(child, list):
                for c in child:
                    walk(c)
            elif hasattr(child, "module") or hasattr(child, "submodules"):
                walk(child)

    if hasattr(spec, "layer_specs"):
        for layer in spec.layer_specs:
            walk(layer)
    else:
        walk(spec)
    return spec


def indexer_tracker_values():
    from megatron.core.transformer.experimental_attention_variant.dsa import (
        DSAIndexerLossLoggingHelper,
    )

    values = DSAIndexerLossLoggingHelper.tracker.get("values")
    return None if values is None else values.clone()


def clear_indexer_tracker():
    from megatron.core.transformer.experimental_attention_variant.dsa import (
        DSAIndexerLossLoggingHelper,
    )

    DSAIndexerLossLoggingHelper.tracker.clear()


def run_gpu_child(code: str, timeout: float, what: str) -> None:
    """Run ``code`` in a fresh Python with the repo and tests/ importable (``sys.argv[1]`` is the
    tests folder); fail on a non-zero exit or on ``timeout`` seconds (a kernel hand-off bug would
    hang rather than fail)."""
    import os
    import subprocess
    import sys

    import pytest

    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(here), here, os.environ.get("PYTHONPATH", "")]))
    try:
        proc = subprocess.run([sys.executable, "-c", code, here], capture_output=True, text=True,
                              timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{what} did not finish within {timeout:.0f} s (deadlock?)")
    print(proc.stdout)
    assert proc.returncode == 0, proc.stderr[-3000:]
