"""Index cache: schedule resolution, fail-closed runtime, recompute and pipeline parallelism."""

import pytest
import torch

from helpers import assert_same_grads, run_worker, tiny_config, to_mcore_spec
from megatron_dsa import index_cache as ic
from megatron_dsa.config import set_plugin_config


# ----------------------------------------------------------------------------- schedule
@pytest.mark.parametrize("freq,offset", [(2, 0), (3, 0), (3, 2), (4, 1)])
def test_freq_schedule_has_megatron_meaning(freq, offset):
    from megatron.core.transformer.experimental_attention_variant.dsa import (
        is_dsa_skip_topk_layer,
        source_dsa_compute_layer,
    )

    cfg = tiny_config(num_layers=9, dsa_indexer_topk_freq=freq, dsa_indexer_skip_topk_offset=offset)
    for r in ic.resolve_schedule(cfg):
        shared = is_dsa_skip_topk_layer(r.layer, offset, freq)
        assert (r.role == "shared") == shared
        assert r.source == (source_dsa_compute_layer(r.layer, offset, freq) if shared else r.layer)


def test_pattern_and_stage_boundaries():
    cfg = tiny_config(num_layers=8, pipeline_model_parallel_size=2, pipeline_dtype=torch.float32)
    set_plugin_config(cfg, index_pattern="FSSSSSSF")
    roles = ic.resolve_schedule(cfg)
    assert [r.role[0] for r in roles] == list("asssassa")
    assert roles[4].reason == "stage boundary" and roles[4].stage == 1
    assert [r.source for r in roles] == [1, 1, 1, 1, 5, 5, 5, 8]
    table = ic.format_schedule(roles)
    assert "stage boundary" in table and table.count("\n") == 9


def test_virtual_pipeline_chunks_start_on_anchors():
    cfg = tiny_config(num_layers=8, pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2,
                      pipeline_dtype=torch.float32, dsa_indexer_topk_freq=4)
    roles = ic.resolve_schedule(cfg)
    chunks = {}
    for r in roles:
        chunks.setdefault((r.stage, r.chunk), []).append(r)
    assert len(chunks) == 4
    for layers in chunks.values():
        assert layers[0].role == "anchor"
        for r in layers[1:]:
            assert r.source in [x.layer for x in layers if x.role == "anchor"]


def test_explicit_sources():
    cfg = tiny_config(num_layers=4)
    set_plugin_config(cfg, index_pattern=["F", "F", 1, 2])
    assert [(r.role, r.source) for r in ic.resolve_schedule(cfg)] == [
        ("anchor", 1), ("anchor", 2), ("shared", 1), ("shared", 2)]


@pytest.mark.parametrize(
    "pattern,match",
    [
        ("FSS", "has 3 entries but the model has 4"),
        ("SFFF", "layer 1 is shared"),
        (["F", "S", 9, "S"], "layer 3 reuses layer 9, which is outside the model"),
        (["F", "S", 2, "S"], "layer 3 reuses layer 2, which is not an anchor"),
        (["F", 3, "F", "S"], "not earlier"),
        (["F", "S", "X", "S"], "layer 3 has unknown entry"),
    ],
)
def test_bad_patterns_name_the_layer(mcore, pattern, match):
    from megatron_dsa.spec import get_dsa_gpt_block_spec

    cfg = tiny_config(num_layers=4)
    with pytest.raises(ValueError, match=match):  # the config itself (unknown entries) or the spec
        set_plugin_config(cfg, index_pattern=pattern)
        get_dsa_gpt_block_spec(cfg)


def test_bad_pattern_letters():
    from megatron_dsa.config import DSAPluginConfig

    with pytest.raises(ValueError, match="unknown letters"):
        DSAPluginConfig(index_pattern="FSQ")


# ----------------------------------------------------------------------------- runtime
def _gpt(cfg, spec):
    from megatron.core.models.gpt import GPTModel

    return GPTModel(config=cfg, transformer_layer_spec=spec, vocab_size=64, max_sequence_length=32,
                    position_embedding_type="none")


def test_shared_layers_match_megatron_index_share(mcore):
    """One forward/backward with dsa_indexer_topk_freq=2: same loss and grads as Megatron's."""
    from megatron_dsa.spec import get_dsa_gpt_block_spec

    torch.manual_seed(0)
    cfg = tiny_config(num_layers=4, dsa_indexer_topk_freq=2, dsa_indexer_use_sparse_loss=True)
    spec = get_dsa_gpt_block_spec(cfg)
    ours = _gpt(cfg, spec)
    ref_cfg = tiny_config(num_layers=4, dsa_indexer_topk_freq=2, dsa_indexer_use_sparse_loss=True)
    ref = _gpt(ref_cfg, to_mcore_spec(spec))
    ours.load_state_dict(ref.state_dict(), strict=True)
    assert ours.decoder.layers[1].self_attention.core_attention.indexer is None
    tokens, labels = torch.randint(0, 64, (2, 24)), torch.randint(0, 64, (2, 24))
    ic.STATS.reset()
    grads = []
    for m in (ours, ref):
        m.train()
        m(tokens, None, None, labels=labels).float().mean().backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
    stats = ic.STATS.snapshot()
    assert stats["cache_hits"] == 2 and stats["anchor_computes"] == 2 and not stats["promotions"]
    assert set(grads[0]) == set(grads[1])
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-4, atol=1e-6, msg=n)


def test_no_stale_indices_across_forwards(mcore):
    """The second microbatch's shared layers use the second microbatch's anchor, never the first's."""
    from megatron_dsa.spec import get_dsa_gpt_block_spec

    cfg = tiny_config(num_layers=4, dsa_indexer_topk_freq=4)
    spec = get_dsa_gpt_block_spec(cfg)
    model = _gpt(cfg, spec).eval()
    fresh = _gpt(cfg, spec).eval()
    fresh.load_state_dict(model.state_dict())
    a, b = torch.randint(0, 64, (2, 24)), torch.randint(0, 64, (2, 24))
    with torch.no_grad():
        model(a, None, None)
        out_b = model(b, None, None)
        want = fresh(b, None, None)
    torch.testing.assert_close(out_b, want, rtol=0, atol=0)


def _layers(cfg):
    from megatron.core.transformer.spec_utils import build_module

    from megatron_dsa.spec import get_dsa_layer_specs

    return [build_module(s, config=cfg, layer_number=i + 1) for i, s in enumerate(get_dsa_layer_specs(cfg))]


def test_promotion_on_missing_or_mismatched_entry(mcore):
    cfg = tiny_config(num_layers=2, dsa_indexer_topk_freq=2, dsa_indexer_loss_coeff=0.0)
    l1, l2 = _layers(cfg)
    core2 = l2.self_attention.core_attention
    assert core2.role.role == "shared" and core2.indexer is None
    ic.STATS.reset()
    with torch.no_grad():
        l2(torch.randn(16, 2, 64), None)  # no anchor ran: no open cache -> promoted
        l1(torch.randn(16, 2, 64), None)  # anchor opens a cache for a 16-row forward
        x = torch.randn(12, 2, 64)
        out, _ = l2(x, None)  # a 12-row consumer: cursor/sequence mismatch -> promoted
    stats = ic.STATS.snapshot()
    assert stats["cache_hits"] == 0
    assert stats["promotions"] == {"no open cache": 1, "sequence length": 1}
    # A promoted layer computes what an anchor with its source's indexer weights computes.
    cfg_a = tiny_config(num_layers=2, dsa_indexer_loss_coeff=0.0)
    a1, a2 = _layers(cfg_a)
    sd = l2.state_dict()
    sd.update({f"self_attention.core_attention.indexer.{k}": v for k, v in
               l1.self_attention.core_attention.indexer.state_dict().items()})
    a2.load_state_dict(sd, strict=True)
    with torch.no_grad():
        want, _ = a2(x, None)
    torch.testing.assert_close(out, want, rtol=0, atol=0)


def test_recompute_scope_put_take():
    scope = ic.RecomputeScope()
    x = torch.randn(8, 2, 16)
    scope.put(3, torch.ones(1, dtype=torch.int32), ic.fingerprint(x))
    idx, digest = scope.take(3)
    assert idx.item() == 1 and bool(ic.digests_match(digest, ic.fingerprint(x.clone())))
    with pytest.raises(RuntimeError, match="without a recorded original forward"):
        scope.take(3)  # taken once


def test_fingerprint_sees_one_row_at_real_size():
    """[8192, 7168] bf16: inputs that differ in one token row (or one element, or only in the
    sign of a zero) get different fingerprints; equal inputs equal ones, whatever their layout."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8192, 7168, generator=g).to(torch.bfloat16)
    fx = ic.fingerprint(x)
    y = x.clone()
    y[4321] = torch.randn(7168, generator=g).to(torch.bfloat16)
    assert not bool(ic.digests_match(fx, ic.fingerprint(y)))
    y = x.clone()
    y[17, 5] = y[17, 5] * 2 + 1
    assert not bool(ic.digests_match(fx, ic.fingerprint(y)))
    z = torch.zeros(4, 4)
    z2 = z.clone()
    z2[1, 1] = -0.0
    assert not bool(ic.digests_match(ic.fingerprint(z), ic.fingerprint(z2)))
    assert bool(ic.digests_match(fx, ic.fingerprint(x.t().contiguous().t())))


def test_ledger_patch_is_idempotent_and_undoable():
    from megatron.core.tensor_parallel import random as mrandom

    from megatron_dsa.index_cache import ledger

    was = ledger.installed()
    ledger.uninstall()
    original = mrandom.CheckpointFunction.forward
    assert ledger.install() and ledger.install()
    patched = mrandom.CheckpointFunction.forward
    assert patched is not original and patched.__megatron_dsa_original__ is original
    ledger.uninstall()
    assert mrandom.CheckpointFunction.forward is original
    if was:
        ledger.install()


def test_mismatched_recompute_fails_once_and_leaves_the_process_usable(mcore):
    """A recomputation whose input differs from its original forward's raises (CPU); the next
    checkpointed step, in the same process, trains normally."""
    from megatron.core import tensor_parallel

    cfg = tiny_config(num_layers=1, dsa_indexer_loss_coeff=0.0)
    (layer,) = _layers(cfg)
    layer.train()
    noise = {"on": False}

    def run(x):
        if noise["on"] and torch.is_grad_enabled():  # the recomputation sees another input
            x = x + 1.0
        return layer(x, None)[0]

    x = torch.randn(12, 1, 64, requires_grad=True)
    noise["on"] = True
    out = tensor_parallel.checkpoint(run, False, x)
    with pytest.raises(RuntimeError, match="does not match its original forward"):
        out.sum().backward()
    noise["on"] = False
    x2 = x.detach().clone().requires_grad_()
    tensor_parallel.checkpoint(run, False, x2).sum().backward()
    x3 = x.detach().clone().requires_grad_()
    layer(x3, None)[0].sum().backward()
    torch.testing.assert_close(x2.grad, x3.grad, rtol=0, atol=0)


@pytest.mark.slow
def test_recompute_uses_original_indices(tmp_path):
    """attention_mask=None, 4 microbatches: gradients with full/selective recompute == without."""
    base = run_worker(tmp_path, "base", freq=2)
    for mode in ("full", "selective"):
        rec = run_worker(tmp_path, f"rec_{mode}", freq=2, recompute=mode)
        assert_same_grads(rec, base)
        assert rec["stats"][0]["recompute_reuses"] > 0
        assert rec["stats"][0]["recompute_mismatches"] == 0


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["full", "selective"])
def test_forward_only_pass_in_train_mode_leaves_nothing_behind(tmp_path, mode):
    """A forward-only pass with the model in train mode (an RL reference-logprob pass) under
    recompute, then a training step: the same gradients as the training step alone."""
    base = run_worker(tmp_path, "base", freq=2)
    rec = run_worker(tmp_path, f"fwd_only_{mode}", freq=2, recompute=mode, forward_only_first=True)
    assert_same_grads(rec, base)


@pytest.mark.slow
def test_checkpoint_flag_left_set_by_an_exception_changes_nothing(tmp_path):
    """Megatron leaves IS_CHECKPOINTING set when a checkpointed function raises; later forwards
    (no recompute, and with recompute) must still train exactly."""
    base = run_worker(tmp_path, "base", freq=2)
    for mode in ("none", "full"):
        rec = run_worker(tmp_path, f"stuck_{mode}", freq=2, recompute=mode, stuck_checkpoint_flag=True)
        assert_same_grads(rec, base)


@pytest.mark.slow
def test_pipeline_two_stages_matches_single_stage(tmp_path):
    """PP=2 over gloo, 1F1B, 4 microbatches, full recompute: same loss and grads as PP=1 of the
    same model. With freq=4, layer 3 opens stage 2 and is promoted to an anchor ("stage
    boundary"); the PP=1 reference states that schedule explicitly (pattern FSFS)."""
    ref = run_worker(tmp_path, "pp1", layers=4, pattern="FSFS")
    pp2 = run_worker(tmp_path, "pp2", nproc=2, pp=2, freq=4, layers=4, recompute="full")
    stage2 = [r for r in pp2["roles"] if r.stage == 1]
    assert stage2[0].layer == 3 and stage2[0].role == "anchor" and stage2[0].reason == "stage boundary"
    assert_same_grads(pp2, ref)
    assert sum(s["cache_hits"] for s in pp2["stats"]) == 8  # layers 2 and 4, 4 microbatches
    assert all(not s["promotions"] for s in pp2["stats"])


@pytest.mark.slow
def test_interleaved_pipeline_matches_single_stage(tmp_path):
    """Interleaved 1F1B (PP=2, 2 virtual chunks): every chunk starts on an anchor."""
    ref = run_worker(tmp_path, "vpp_ref", layers=8, pattern="FSFSFSFS")
    vpp = run_worker(tmp_path, "vpp", nproc=2, pp=2, vpp=2, freq=8, layers=8)
    assert {r.layer for r in vpp["roles"] if r.role == "anchor"} == {1, 3, 5, 7}
    assert_same_grads(vpp, ref)


def test_per_layer_cuda_graphs_turn_sharing_off():
    cfg = tiny_config(num_layers=4, dsa_indexer_topk_freq=2)
    object.__setattr__(cfg, "cuda_graph_impl", "local")
    roles = ic.resolve_schedule(cfg)
    assert all(r.role == "anchor" for r in roles)
    assert [r.reason for r in roles] == ["pattern", "per-layer cuda graphs", "pattern", "per-layer cuda graphs"]


def test_stats_reach_megatron_style_logging():
    class Writer:
        def __init__(self):
            self.scalars = {}

        def add_scalar(self, key, value, step):
            self.scalars[key] = (value, step)

    ic.STATS.reset()
    ic.STATS.hits, ic.STATS.promotions["missing entry"] = 5, 2
    w, totals = Writer(), {}
    snap = ic.track_index_cache_metrics(7, writer=w, total_loss_dict=totals)
    assert snap["cache_hits"] == 5 and w.scalars["index cache promotions"] == (2, 7)
    assert totals["index cache hits"] == 5
    assert ic.STATS.hits == 0  # snapshot resets


def test_shared_layers_keep_the_fused_kernels(mcore):
    """Sharing never switches kernels off: with the Triton backends forced (the interpreter on the
    CPU), a shared layer's attention runs the fused sparse kernel and matches the reference."""
    import megatron_dsa.kernels.sparse_mla.dispatch as fused

    cfg = tiny_config(num_layers=2, dsa_indexer_topk_freq=2, dsa_indexer_loss_coeff=0.0,
                      dsa_indexer_n_heads=4, dsa_indexer_topk=8)
    set_plugin_config(cfg, attention_backend="triton", indexer_backend="triton")
    l1, l2 = _layers(cfg)
    calls = []
    orig = fused.sparse_mla_op

    def spy(*args, **kwargs):
        calls.append(1)
        return orig(*args, **kwargs)

    x1, x2 = torch.randn(12, 1, 64), torch.randn(12, 1, 64)
    ic.STATS.reset()
    try:
        fused.sparse_mla_op = spy
        with torch.no_grad():
            l1(x1, None)
            out, _ = l2(x2, None)
    finally:
        fused.sparse_mla_op = orig
    assert len(calls) == 2 and ic.STATS.snapshot()["cache_hits"] == 1
    # the same layers on the reference backends give the same output
    ref_cfg = tiny_config(num_layers=2, dsa_indexer_topk_freq=2, dsa_indexer_loss_coeff=0.0,
                          dsa_indexer_n_heads=4, dsa_indexer_topk=8)
    r1, r2 = _layers(ref_cfg)
    r1.load_state_dict(l1.state_dict())
    r2.load_state_dict(l2.state_dict())
    with torch.no_grad():
        r1(x1, None)
        want, _ = r2(x2, None)
    torch.testing.assert_close(out, want, rtol=2e-4, atol=2e-5)


def test_checkpointed_recompute_has_no_host_sync(mcore):
    """The recompute ledger (scope, fingerprint, match check) adds no host sync: a checkpointed
    forward and its recomputing backward run clean under the sync audit."""
    from megatron.core import tensor_parallel

    from megatron_dsa.graph import SyncAudit

    cfg = tiny_config(num_layers=2, dsa_indexer_topk_freq=2, dsa_indexer_loss_coeff=0.0)
    l1, l2 = _layers(cfg)

    def run(x):
        return l2(l1(x, None)[0], None)[0]

    x = torch.randn(12, 1, 64, requires_grad=True)
    run(x).sum().backward()  # warm-up (lazy one-time setup outside the audit)
    ic.STATS.reset()
    x = torch.randn(12, 1, 64, requires_grad=True)
    with SyncAudit() as audit:
        tensor_parallel.checkpoint(run, False, x).sum().backward()
    assert not audit.violations, audit.violations
    assert ic.STATS.recompute_reuses == 2
