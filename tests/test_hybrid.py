"""HybridModel support: the stack spec, the module swap, the schedule over DSA layers only, parity
with Megatron-Core's own hybrid DSA layers, and pipeline stage boundaries (fp32, CPU)."""

import os
import subprocess
import sys

import pytest
import torch

from helpers import clear_indexer_tracker, free_port, indexer_tracker_values, merge_rank_outputs, tiny_config, to_mcore_spec
from megatron_dsa import index_cache as ic
from megatron_dsa.config import set_plugin_config

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hybrid_worker.py")


def _hybrid(cfg, spec, pattern, vocab=64):
    from megatron.core.models.hybrid.hybrid_model import HybridModel

    return HybridModel(config=cfg, hybrid_stack_spec=spec, vocab_size=vocab, max_sequence_length=32,
                       hybrid_layer_pattern=pattern, position_embedding_type="none")


def _mcore_stack_spec(spec):
    """``spec`` with Megatron-Core's DSAttention / DSAIndexer in its D layer (helpers.to_mcore_spec
    deep-copies, which Megatron's TE entries of the other layer kinds do not allow)."""
    import copy
    import dataclasses

    ref = copy.copy(spec)
    ref.submodules = dataclasses.replace(spec.submodules, dsa_layer=to_mcore_spec(spec.submodules.dsa_layer))
    return ref


def _classes(model):
    return {type(m) for m in model.modules()}


def _rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _step(model, tokens, labels):
    """LM loss, indexer-loss tracker and parameter gradients of one training forward/backward."""
    clear_indexer_tracker()
    model.train()
    model.zero_grad(set_to_none=True)
    loss = model(tokens, None, None, labels=labels).float().mean()
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), indexer_tracker_values(), grads


def _assert_same_step(a, b):
    (l1, t1, g1), (l2, t2, g2) = a, b
    torch.testing.assert_close(l1, l2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(t1, t2, rtol=1e-5, atol=1e-7)
    assert set(g1) == set(g2) and any("indexer" in n for n in g1)
    for n in g1:  # see test_parity_mcore._grad_tol: LayerNorm bias sums nearly cancel
        assert _rel(g1[n], g2[n]) < (1e-3 if n.endswith("norm.bias") else 1e-4), n


# ----------------------------------------------------------------------------- swap
def test_swap_dsa_modules_copies_and_swaps_every_container():
    import functools

    from megatron.core.models.hybrid import hybrid_layer_specs as hs
    from megatron.core.transformer.experimental_attention_variant import dsa as md
    from megatron.core.transformer.spec_utils import ModuleSpec

    import megatron_dsa.attention as ours
    from megatron_dsa.hybrid import _MCORE_HYBRID_STACK_SPEC, swap_dsa_modules

    mcore_spec = _MCORE_HYBRID_STACK_SPEC
    out = swap_dsa_modules(mcore_spec)
    core = out.submodules.dsa_layer.submodules.self_attention.submodules.core_attention
    assert core.module is ours.DSAttention and core.submodules.indexer.module is ours.DSAIndexer
    assert not core.params  # TE down projections are duplicated linears: no extra parameter
    orig = mcore_spec.submodules.dsa_layer.submodules.self_attention.submodules.core_attention
    assert orig.module is md.DSAttention and orig.submodules.indexer.module is md.DSAIndexer  # untouched
    assert out.submodules.dsa_layer.submodules.self_attention.params == orig_params(mcore_spec)
    assert out.submodules.mamba_layer.module is mcore_spec.submodules.mamba_layer.module
    assert swap_dsa_modules(out).submodules.dsa_layer.submodules.self_attention.submodules.core_attention.module \
        is ours.DSAttention  # idempotent

    # lists of layer specs, dicts, partials and bare classes; params kept; local down projections
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear

    attn = ModuleSpec(module=hs.AbsorbedMLASelfAttention, params={"attn_mask_type": "causal"},
                      submodules=hs.AbsorbedMLASelfAttentionSubmodules(
                          linear_kv_down_proj=ColumnParallelLinear,
                          core_attention=ModuleSpec(module=md.DSAttention, params={"softmax_scale": 0.5},
                                                    submodules=md.DSAttentionSubmodules(indexer=md.DSAIndexer))))
    tree = [attn, {"k": md.DSAIndexer}, functools.partial(dict, spec=attn)]
    new = swap_dsa_modules(tree)
    assert new[0] is not attn and new[0].params == {"attn_mask_type": "causal"}
    new_core = new[0].submodules.core_attention
    assert new_core.module is ours.DSAttention and new_core.submodules.indexer is ours.DSAIndexer
    assert new_core.params == {"softmax_scale": 0.5, "reduce_rope_key_grad": True}
    assert new[1] == {"k": ours.DSAIndexer} and new[2].keywords["spec"] is new[0]  # sharing kept
    assert attn.submodules.core_attention.module is md.DSAttention and attn.submodules.core_attention.params == {
        "softmax_scale": 0.5}

    # our DSAttention runs the absorbed layout only: Megatron's inference spec is refused
    with pytest.raises(ValueError, match="AbsorbedMLASelfAttention only"):
        swap_dsa_modules(hs.hybrid_inference_stack_spec)


def orig_params(spec):
    return spec.submodules.dsa_layer.submodules.self_attention.params


def test_local_stack_spec_uses_the_gpt_attention_modules():
    """The local D layer's attention = get_dsa_attention_spec's modules (our DSA, local linears,
    reduce_rope_key_grad), with Megatron's hybrid identity q/kv norms."""
    from megatron.core.transformer.identity_op import IdentityOp

    from megatron_dsa.hybrid import DSAHybridStack, dsa_hybrid_stack_spec, get_dsa_hybrid_stack_spec
    from megatron_dsa.spec import get_dsa_attention_spec

    cfg = tiny_config(num_layers=4)
    spec = get_dsa_hybrid_stack_spec(cfg)
    assert spec.module is DSAHybridStack and dsa_hybrid_stack_spec.module is DSAHybridStack
    mine = spec.submodules.dsa_layer.submodules.self_attention
    gpt = get_dsa_attention_spec(cfg)
    for field in ("linear_q_proj", "linear_q_down_proj", "linear_q_up_proj", "linear_kv_down_proj",
                  "linear_kv_up_proj", "linear_proj"):
        assert getattr(mine.submodules, field) is getattr(gpt.submodules, field), field
    assert mine.submodules.q_layernorm is IdentityOp and mine.submodules.kv_layernorm is IdentityOp
    core, gcore = mine.submodules.core_attention, gpt.submodules.core_attention
    assert core.module is gcore.module and core.params == gcore.params == {"reduce_rope_key_grad": True}
    assert vars(core.submodules.indexer.submodules) == vars(gcore.submodules.indexer.submodules)


# ----------------------------------------------------------------------------- schedule
def _hybrid_cfg(pattern, index_pattern=None, **kw):
    kw.setdefault("num_layers", len(pattern.partition("/")[0].replace("|", "")))
    cfg = tiny_config(**kw)
    return set_plugin_config(cfg, hybrid_layer_pattern=pattern, index_pattern=index_pattern)


def test_roles_count_dsa_layers_only():
    cfg = _hybrid_cfg("D-D-D-D-", dsa_indexer_topk_freq=2)
    roles = ic.resolve_schedule(cfg)
    assert [(r.layer, r.role, r.source) for r in roles] == [
        (1, "anchor", 1), (3, "shared", 1), (5, "anchor", 5), (7, "shared", 5)]
    # an explicit pattern has one letter per DSA layer
    cfg = _hybrid_cfg("-DD-E-DD", index_pattern="FSSF")
    assert [(r.layer, r.role, r.source) for r in ic.resolve_schedule(cfg)] == [
        (2, "anchor", 2), (3, "shared", 2), (7, "shared", 2), (8, "anchor", 8)]
    cfg = _hybrid_cfg("DD--DD--", index_pattern=["F", "F", 1, 2])
    assert [(r.layer, r.source) for r in ic.resolve_schedule(cfg)] == [(1, 1), (2, 2), (5, 1), (6, 2)]
    with pytest.raises(ValueError, match="has 8 entries but the model has 4 DSA layers"):
        ic.resolve_schedule(_hybrid_cfg("D-D-D-D-", index_pattern="FSSSFSSS"))


def test_hybrid_stage_boundaries_fail_closed():
    # '|' segments over 2 stages: the first DSA layer of stage 1 (layer 5) is promoted
    cfg = _hybrid_cfg("D-D-|D-D-", dsa_indexer_topk_freq=4, pipeline_model_parallel_size=2,
                      pipeline_dtype=torch.float32)
    roles = ic.resolve_schedule(cfg)
    assert [(r.layer, r.stage, r.role, r.source, r.reason) for r in roles] == [
        (1, 0, "anchor", 1, "pattern"), (3, 0, "shared", 1, "pattern"),
        (5, 1, "anchor", 5, "stage boundary"), (7, 1, "shared", 5, "source in another chunk")]
    # virtual chunks (4 segments over 2 stages): every chunk with DSA layers starts on an anchor
    cfg = _hybrid_cfg("D-D|-D|D-|DD", dsa_indexer_topk_freq=8, pipeline_model_parallel_size=2,
                      pipeline_dtype=torch.float32)
    got = [(r.layer, r.stage, r.chunk, r.role) for r in ic.resolve_schedule(cfg)]
    assert got == [(1, 0, 0, "anchor"), (3, 0, 0, "shared"), (5, 1, 0, "anchor"), (6, 0, 1, "anchor"),
                   (8, 1, 1, "anchor"), (9, 1, 1, "shared")]
    # no '|': an even split, or Megatron's first/last stage layer counts
    cfg = _hybrid_cfg("DDD-DD", dsa_indexer_topk_freq=6, pipeline_model_parallel_size=2,
                      pipeline_dtype=torch.float32, num_layers_in_first_pipeline_stage=2)
    assert [(r.layer, r.stage, r.role) for r in ic.resolve_schedule(cfg)] == [
        (1, 0, "anchor"), (2, 0, "shared"), (3, 1, "anchor"), (5, 1, "shared"), (6, 1, "shared")]


def test_bad_hybrid_patterns():
    with pytest.raises(ValueError, match="multi-token-prediction"):
        set_plugin_config(tiny_config(num_layers=4), hybrid_layer_pattern="D-D-/D-")
    with pytest.raises(ValueError, match="no DSA layer"):
        set_plugin_config(tiny_config(num_layers=4), hybrid_layer_pattern="----")
    with pytest.raises(ValueError, match="unknown symbols"):
        set_plugin_config(tiny_config(num_layers=4), hybrid_layer_pattern="DxD-")
    from megatron_dsa.config import validate_dsa_config

    with pytest.raises(ValueError, match="has 4 layers but num_layers is 6"):
        validate_dsa_config(_hybrid_cfg("D-D-", num_layers=6))


# ----------------------------------------------------------------------------- models
@pytest.mark.parametrize("direction", ["mcore_to_ours", "ours_to_mcore"])
def test_hybrid_matches_megatron(mcore, direction):
    """D layers mixed with MLP layers: Megatron-Core's own DSA vs ours in the same hybrid stack,
    the state dict moved either way: same LM loss, indexer losses and gradients."""
    from megatron.core.transformer.experimental_attention_variant import dsa as md

    import megatron_dsa.attention as mine
    from megatron_dsa.hybrid import get_dsa_hybrid_stack_spec

    pattern = "D-D-"
    kw = dict(num_layers=4, dsa_indexer_rotate_activation=True, dsa_indexer_use_sparse_loss=direction == "ours_to_mcore")
    cfg, ref_cfg = tiny_config(**kw), tiny_config(**kw)
    spec = get_dsa_hybrid_stack_spec(cfg)
    ours = _hybrid(cfg, spec, pattern)
    ref = _hybrid(ref_cfg, _mcore_stack_spec(spec), pattern)
    assert mine.DSAttention in _classes(ours) and md.DSAttention not in _classes(ours)
    assert md.DSAttention in _classes(ref) and mine.DSAIndexer not in _classes(ref)
    assert get_plugin_config_pattern(cfg) == pattern  # the stack recorded the pattern
    src, dst = (ref, ours) if direction == "mcore_to_ours" else (ours, ref)
    res = dst.load_state_dict(src.state_dict(), strict=True)
    assert not res.missing_keys and not res.unexpected_keys
    tokens, labels = torch.randint(0, 64, (2, 24)), torch.randint(0, 64, (2, 24))
    a, b = _step(ours, tokens, labels), _step(ref, tokens, labels)
    assert a[1][0] > 0 and a[1][2] > 0 and a[1][1] == 0  # indexer losses of D layers 1 and 3 only
    _assert_same_step(a, b)


def get_plugin_config_pattern(cfg):
    from megatron_dsa.config import get_plugin_config

    return get_plugin_config(cfg).hybrid_layer_pattern


def test_index_sharing_over_dsa_layers(mcore):
    """"D-D-D-D-" with dsa_indexer_topk_freq=2 shares within DSA layers (1 -> 3, 5 -> 7). The same
    sharing stated explicitly: Megatron-Core's own index sharing counts hybrid layer numbers, so
    its freq=4 on this pattern is that schedule; and our index_pattern "FSFS"."""
    from megatron_dsa.hybrid import get_dsa_hybrid_stack_spec

    pattern = "D-D-D-D-"
    kw = dict(num_layers=8, dsa_indexer_use_sparse_loss=True)
    cfg = tiny_config(dsa_indexer_topk_freq=2, **kw)
    ours = _hybrid(cfg, get_dsa_hybrid_stack_spec(cfg), pattern)
    cores = [layer.self_attention.core_attention for layer in ours.decoder.layers[::2]]
    assert [(c.layer_number, c.role.role, c.role.source) for c in cores] == [
        (1, "anchor", 1), (3, "shared", 1), (5, "anchor", 5), (7, "shared", 5)]
    assert cores[1].indexer is None and cores[3].indexer is None
    assert cores[1].previous_layer == 1 and cores[3].previous_layer == 5  # MLP layers are not in the chain

    ref_cfg = tiny_config(dsa_indexer_topk_freq=4, **kw)
    ref = _hybrid(ref_cfg, _mcore_stack_spec(get_dsa_hybrid_stack_spec(ref_cfg)), pattern)
    exp_cfg = tiny_config(**kw)
    set_plugin_config(exp_cfg, index_pattern="FSFS")
    explicit = _hybrid(exp_cfg, get_dsa_hybrid_stack_spec(exp_cfg), pattern)
    ref.load_state_dict(ours.state_dict(), strict=True)
    explicit.load_state_dict(ours.state_dict(), strict=True)

    tokens, labels = torch.randint(0, 64, (2, 24)), torch.randint(0, 64, (2, 24))
    ic.STATS.reset()
    a = _step(ours, tokens, labels)
    stats = ic.STATS.snapshot()
    assert stats["cache_hits"] == 2 and stats["anchor_computes"] == 2 and not stats["promotions"]
    _assert_same_step(a, _step(ref, tokens, labels))
    b = _step(explicit, tokens, labels)
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=0)
    for n in a[2]:
        torch.testing.assert_close(a[2][n], b[2][n], rtol=0, atol=0, msg=n)


def test_pipeline_stack_needs_the_whole_pattern(mcore):
    """A stack that is not the whole decoder cannot infer the pattern: it refuses to build."""
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.spec_utils import build_module

    from megatron_dsa.hybrid import get_dsa_hybrid_stack_spec

    cfg = tiny_config(num_layers=4)
    pgs = ProcessGroupCollection.use_mpu_process_groups()
    with pytest.raises(ValueError, match="needs its whole hybrid_layer_pattern"):
        build_module(get_dsa_hybrid_stack_spec(cfg), cfg, layer_type_list=list("D-"), pp_layer_offset=2,
                     pg_collection=pgs)
    set_plugin_config(cfg, hybrid_layer_pattern="D-D-")
    with pytest.raises(ValueError, match="not a pipeline segment"):
        build_module(get_dsa_hybrid_stack_spec(cfg), cfg, layer_type_list=list("D-"), pp_layer_offset=1,
                     pg_collection=pgs)


# ----------------------------------------------------------------------------- pipeline
def _worker(tmp_path, name, nproc=1, **kw):
    args = []
    for k, v in kw.items():
        args += [f"--{k}", str(v)]
    out = str(tmp_path / name)
    if nproc == 1:
        cmd = [sys.executable, WORKER]
        env = dict(os.environ, MASTER_PORT=free_port())
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_port",
               free_port(), WORKER]
        env = dict(os.environ)
    proc = subprocess.run(cmd + args + ["--out", out], capture_output=True, text=True, timeout=600, env=env,
                          cwd=os.path.dirname(WORKER))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return merge_rank_outputs(out, nproc)


@pytest.mark.slow
def test_hybrid_pipeline_two_stages_matches_single_stage(tmp_path):
    """PP=2 over gloo, 1F1B, 4 microbatches, pattern "D-D-|D-D-" with freq=4: the first DSA layer
    of stage 2 (layer 5) is promoted to an anchor ("stage boundary") and layer 7 reuses it; the
    PP=1 reference states that schedule explicitly (index_pattern FSFS). Same losses and grads."""
    ref = _worker(tmp_path, "pp1", hybrid="D-D-D-D-", pattern="FSFS")
    pp2 = _worker(tmp_path, "pp2", nproc=2, pp=2, hybrid="D-D-|D-D-", freq=4)
    stage2 = [r for r in pp2["roles"] if r.stage == 1]
    assert [(r.layer, r.role, r.reason) for r in stage2] == [
        (5, "anchor", "stage boundary"), (7, "shared", "source in another chunk")]
    assert sum(s["cache_hits"] for s in pp2["stats"]) == 8 and all(not s["promotions"] for s in pp2["stats"])
    assert set(pp2["grads"]) == set(ref["grads"])
    for n in ref["grads"]:
        torch.testing.assert_close(pp2["grads"][n], ref["grads"][n], rtol=1e-5, atol=1e-7, msg=n)
    assert pp2["losses"] == pytest.approx(ref["losses"], rel=1e-5)
