"""Graph safety: no host syncs in the DSA layer, shape classes, the graph-dispatch cache."""

import pytest
import torch

import megatron_dsa.graph as graph
from helpers import tiny_config
from megatron_dsa.graph import GraphDispatch, ShapeClass, ShapeClassMiss, ShapeClassRegistry, SyncAudit


def test_audit_catches_sync_ops():
    x = torch.randn(8)
    with SyncAudit() as audit:
        x.sum().item()
        torch.nonzero(x > 0)
        x[x > 0]
        torch.unique(x)
        if (x > 100).any():
            pass
        torch.equal(x, x)
    whys = " ".join(w for _, w in audit.violations)
    for needle in (".item()", "nonzero", "boolean-mask", "unique", "torch.equal"):
        assert needle in whys, needle
    with SyncAudit() as clean:
        torch.where(x > 0, x, torch.zeros_like(x)).topk(3)
        x.masked_fill(x > 0, 0.0)
    assert clean.violations == []


def _core_inputs(cfg, s=20, b=2):
    d = cfg.kv_lora_rank + cfg.qk_pos_emb_head_dim
    return dict(
        query=torch.randn(s, b, cfg.num_attention_heads, d, requires_grad=True),
        key=torch.randn(s, b, 1, d, requires_grad=True),
        value=None, attention_mask=None,
        x=torch.randn(s, b, cfg.hidden_size), qr=torch.randn(s, b, cfg.q_lora_rank),
        up_v_weight=torch.randn(cfg.num_attention_heads, cfg.v_head_dim, cfg.kv_lora_rank),
    )


@pytest.mark.parametrize("sparse", [False, True])
def test_dsa_layer_forward_backward_has_no_host_sync(mcore, sparse):
    """Anchor (indexer loss on), cache hit and promotion: forward and backward, audited."""
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.spec_utils import build_module

    from megatron_dsa.spec import get_dsa_layer_specs

    cfg = tiny_config(num_layers=2, dsa_indexer_topk_freq=2, dsa_indexer_use_sparse_loss=sparse)
    layers = [build_module(s, config=cfg, layer_number=i + 1) for i, s in enumerate(get_dsa_layer_specs(cfg))]
    cores = [l.self_attention.core_attention.train() for l in layers]
    inp = _core_inputs(cfg)
    with SyncAudit() as audit:
        o1 = cores[0](**inp, attn_mask_type=AttnMaskType.causal)
        o2 = cores[1](**inp, attn_mask_type=AttnMaskType.causal)  # cache hit
        o3 = cores[1](**inp, attn_mask_type=AttnMaskType.causal)  # no open cache: promotion
        (o1.sum() + o2.sum() + o3.sum()).backward()
    assert audit.violations == [], audit.violations
    assert audit.ops["aten::bmm"] > 0  # the audit really saw the layer's work
    assert cores[0].indexer.linear_wq_b.weight.grad is not None


def test_branchless_index_mask_matches_loop():
    """-1 slots go through a fixed-topology scatter (clamped onto key 0, value 0) plus the window
    fixup: same support as a Python loop over the valid slots, with no branch on their presence."""
    from megatron_dsa.kernels.indexer import causal_window
    from megatron_dsa.kernels.indexer_loss.reference import _support

    B, T, K = 2, 11, 4
    idx = torch.randint(0, T, (B, T, K))
    idx = torch.minimum(idx, torch.arange(T).view(1, T, 1))
    idx[torch.rand(B, T, K) < 0.4] = -1
    idx[0, 3] = -1  # a row with no valid slot
    starts, ends = causal_window(B, T)
    with SyncAudit() as audit:
        got = _support(starts, ends, idx, T, sparse=True)
    assert audit.violations == []
    want = torch.zeros(B, T, T, dtype=torch.bool)
    for b in range(B):
        for t in range(T):
            for j in idx[b, t].tolist():
                if j >= 0:
                    want[b, t, j] = True
    assert torch.equal(got, want)


# ----------------------------------------------------------------------------- shape classes
def test_registry_resolution_and_miss_policies():
    reg = ShapeClassRegistry([ShapeClass("small", 64), ShapeClass("big", 256)])
    assert reg.resolve(1).name == "small" and reg.resolve(64).name == "small"
    assert reg.resolve(65).name == "big"
    assert reg.resolve(257) is None and reg.misses == 1
    strict = ShapeClassRegistry([ShapeClass("only", 16)], policy="strict")
    with pytest.raises(ShapeClassMiss, match="17 tokens fit no declared shape class"):
        strict.resolve(17)
    with pytest.raises(ValueError, match="miss policy"):
        ShapeClassRegistry([ShapeClass("a", 4)], policy="retry")
    with pytest.raises(ValueError, match="unique"):
        ShapeClassRegistry([ShapeClass("a", 4), ShapeClass("a", 8)])
    p2 = ShapeClassRegistry.powers_of_two(16, 128, indices=(8,))
    assert [c.max_tokens for c in p2.classes] == [16, 32, 64, 128]
    assert p2.classes[0].buffers["indices"] == (16, 8)


def _step_inputs(T, H=4, D=16, Hq=3, Dqk=24, dtype=torch.float32, device="cpu"):
    g = lambda *s: torch.randn(*s, dtype=dtype, device=device)  # noqa: E731
    return g(T, H, D), g(T, D), g(T, H), g(T, Hq, Dqk), g(T, Dqk)


def _step(*xs):
    return graph.dsa_sparse_forward(*xs, topk=8, softmax_scale=0.2, d_v=16, backend="reference")


def test_dispatch_pads_to_class_and_falls_back_eagerly():
    reg = ShapeClassRegistry([ShapeClass("T32", 32), ShapeClass("T64", 64)])
    disp = GraphDispatch(_step, reg)
    for T in (5, 32, 40, 17):
        xs = _step_inputs(T)
        got = disp(*xs)
        # eager on the same padded inputs, sliced: bit for bit
        cls = reg.classes[0] if T <= 32 else reg.classes[1]
        padded = [torch.cat([x, x.new_zeros((cls.max_tokens - T,) + x.shape[1:])]) for x in xs]
        want = [o[:T] for o in _step(*padded)]
        for a, b in zip(got, want):
            assert torch.equal(a, b)
        # and the real rows agree with the unpadded computation
        direct = _step(*xs)
        assert torch.equal(got[0], direct[0])
        torch.testing.assert_close(got[1], direct[1])
    assert disp.captures == 2 and reg.hits == {"T32": 3, "T64": 1}
    out = disp(*_step_inputs(80))  # fits no class: eager, counted
    assert disp.eager_fallbacks == 1 and out[1].shape[0] == 80


def test_no_graph_cache_switch_forces_fresh_capture(monkeypatch):
    reg = ShapeClassRegistry([ShapeClass("T16", 16)])
    disp = GraphDispatch(_step, reg)
    disp(*_step_inputs(10))
    disp(*_step_inputs(12))
    assert disp.captures == 1
    monkeypatch.setattr(graph, "_NO_GRAPH_CACHE", True)
    disp(*_step_inputs(10))
    disp(*_step_inputs(12))
    assert disp.captures == 3


# ----------------------------------------------------------------------------- GPU
@pytest.mark.gpu
def test_cached_replay_equals_fresh_capture_equals_eager_on_gpu(monkeypatch):
    """Workloads that share a class but differ in data (and kv contents): bit for bit."""
    reg = ShapeClassRegistry([ShapeClass("T256", 256), ShapeClass("T1024", 1024)])
    disp = GraphDispatch(lambda *xs: graph.dsa_sparse_forward(*xs, topk=64, softmax_scale=0.1, d_v=512), reg)
    fresh = GraphDispatch(lambda *xs: graph.dsa_sparse_forward(*xs, topk=64, softmax_scale=0.1, d_v=512), reg)
    for T in (200, 256, 130, 900, 1000, 256):
        xs = _step_inputs(T, H=64, D=128, Hq=16, Dqk=576, dtype=torch.bfloat16, device="cuda")
        cached = disp(*xs)
        monkeypatch.setattr(graph, "_NO_GRAPH_CACHE", True)
        fresh_out = fresh(*xs)
        monkeypatch.setattr(graph, "_NO_GRAPH_CACHE", False)
        cls = reg.resolve(T)
        padded = [torch.cat([x, x.new_zeros((cls.max_tokens - T,) + x.shape[1:])]) for x in xs]
        eager = [o[:T] for o in graph.dsa_sparse_forward(*padded, topk=64, softmax_scale=0.1, d_v=512)]
        for a, b, c in zip(cached, fresh_out, eager):
            assert torch.equal(a, b) and torch.equal(a, c)
    assert disp.captures == 2


@pytest.mark.gpu
@pytest.mark.parametrize("sparse", [False, True])
def test_layer_forward_backward_captures_with_sync_debug_error(mcore, sparse):
    """sparse=True: the sparse indexer loss with its target from the attention backward (the
    CUDA default), value recorded in the tracker during the captured backward."""
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.spec_utils import build_module

    from megatron_dsa.spec import get_dsa_attention_spec

    cfg = tiny_config(num_layers=1, use_cpu_initialization=False, dsa_indexer_use_sparse_loss=sparse)
    attn = build_module(get_dsa_attention_spec(cfg), config=cfg, layer_number=1).cuda()
    core = attn.self_attention.core_attention if hasattr(attn, "self_attention") else attn.core_attention
    inp = {k: (v.cuda().detach().requires_grad_(v.requires_grad) if isinstance(v, torch.Tensor) else v)
           for k, v in _core_inputs(cfg, s=256, b=1).items()}
    params = [p for p in core.parameters()]
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            core(**inp, attn_mask_type=AttnMaskType.causal).sum().backward()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.cuda.graph(g):
            out = core(**inp, attn_mask_type=AttnMaskType.causal)
            grads = torch.autograd.grad(out.sum(), [inp["query"], inp["key"]] + params, allow_unused=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    g.replay()
    torch.cuda.synchronize()
    ref = core(**inp, attn_mask_type=AttnMaskType.causal)
    assert torch.isfinite(out).all() and torch.allclose(out, ref, rtol=1e-3, atol=1e-3)
    assert grads[0] is not None and torch.isfinite(grads[0]).all()
