"""Graph safety: no host syncs in the DSA layer, shape classes, the graph-dispatch cache."""

import pytest
import torch

import megatron_dsa.graph as graph
from helpers import rel as _rel
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


def test_layer_passes_row_packing_to_the_attention(mcore, monkeypatch):
    """DSAPluginConfig.attention_row_packing reaches sparse_mla (eager) and the kernel choice the
    loss-target decision asks for."""
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.spec_utils import build_module

    import megatron_dsa.attention as attention
    from megatron_dsa.config import set_plugin_config
    from megatron_dsa.spec import get_dsa_layer_specs

    seen = []
    real_mla, real_choice = attention.sparse_mla, attention.sparse_mla_backend

    def mla(*a, **k):
        seen.append(("sparse_mla", k.get("row_packing")))
        return real_mla(*a, **k)

    def choice(*a, **k):
        seen.append(("select", k.get("row_packing")))
        return real_choice(*a, **k)

    monkeypatch.setattr(attention, "sparse_mla", mla)
    monkeypatch.setattr(attention, "sparse_mla_backend", choice)
    for packing in (True, False, None):
        seen.clear()
        cfg = set_plugin_config(tiny_config(num_layers=1, dsa_indexer_use_sparse_loss=True),
                                attention_row_packing=packing)
        layer = build_module(get_dsa_layer_specs(cfg)[0], config=cfg, layer_number=1)
        core = layer.self_attention.core_attention.train()
        core(**_core_inputs(cfg), attn_mask_type=AttnMaskType.causal).sum().backward()
        assert ("sparse_mla", packing) in seen and all(v is packing for _, v in seen), seen


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


def test_cache_false_forces_fresh_capture():
    """``cache=False`` (``DSAPluginConfig.graph_cache=False`` in the layer) replaces the old
    module constant: a fresh instance per call, same results."""
    reg = ShapeClassRegistry([ShapeClass("T16", 16)])
    disp = GraphDispatch(_step, reg)
    fresh = GraphDispatch(_step, reg, cache=False)
    for T in (10, 12, 10):
        xs = _step_inputs(T)
        for a, b in zip(disp(*xs), fresh(*xs)):
            assert torch.equal(a, b)
    assert disp.captures == 1 and fresh.captures == 3
    assert not hasattr(graph, "_NO_GRAPH_CACHE")
    with pytest.raises(TypeError, match="cache must be True or False"):
        GraphDispatch(_step, reg, cache="no")


def test_dispatch_training_pads_and_guards_pending_backwards():
    """Grad path on static padded buffers (run eagerly here, replayed on a GPU): outputs and input
    gradients equal the unpadded computation; a second forward while the first one's backward
    is pending runs eagerly (counted), never on the buffers that backward still needs."""
    from megatron_dsa.kernels.sparse_mla import sparse_mla

    def attend(q, kv, idx):
        return sparse_mla(q, kv, idx, 0.3, d_v=16, backend="reference")

    reg = ShapeClassRegistry([ShapeClass("T32", 32)])
    stats = graph.GraphStats()
    disp = GraphDispatch(attend, reg, pad_values=(0, 0, -1), grad_inputs=(0, 1), stats=stats)

    def inputs(T):
        q = torch.randn(T, 3, 24, requires_grad=True)
        kv = torch.randn(T, 24, requires_grad=True)
        idx = torch.randint(-1, T, (T, 6), dtype=torch.int32)
        idx = torch.where(idx <= torch.arange(T).view(T, 1), idx, -1)
        return q, kv, idx

    def check(T):
        q, kv, idx = inputs(T)
        out, lse = disp(q, kv, idx)
        dy = torch.randn_like(out)
        gq, gkv = torch.autograd.grad((out * dy).sum(), (q, kv))
        q2, kv2 = q.detach().requires_grad_(), kv.detach().requires_grad_()
        out2, lse2 = attend(q2, kv2, idx)
        gq2, gkv2 = torch.autograd.grad((out2 * dy).sum(), (q2, kv2))
        torch.testing.assert_close(out, out2, rtol=0, atol=1e-6)
        torch.testing.assert_close(lse, lse2, rtol=0, atol=1e-6)
        torch.testing.assert_close(gq, gq2, rtol=0, atol=1e-6)
        torch.testing.assert_close(gkv, gkv2, rtol=0, atol=1e-6)

    for T in (20, 32, 7):
        check(T)
    assert disp.captures == 1 and stats.hits == {"T32": 3}
    # two forwards before their backwards: the second runs eagerly, both backwards are right
    (q1, kv1, i1), (q2, kv2, i2) = inputs(20), inputs(25)
    o1, _ = disp(q1, kv1, i1)
    o2, _ = disp(q2, kv2, i2)
    assert stats.eager["inflight"] == 1 and disp.captures == 1
    g2 = torch.autograd.grad(o2.sum(), q2)[0]
    g1 = torch.autograd.grad(o1.sum(), q1, retain_graph=True)[0]
    for (q, kv, i), g in (((q1, kv1, i1), g1), ((q2, kv2, i2), g2)):
        qq = q.detach().requires_grad_()
        torch.testing.assert_close(torch.autograd.grad(attend(qq, kv.detach(), i)[0].sum(), qq)[0], g,
                                   rtol=0, atol=1e-6)
    # a second backward through buffers that a later forward reused: an error, not a wrong grad
    disp(*inputs(9))[0].sum().backward()
    with pytest.raises(RuntimeError, match="reused by a later forward"):
        torch.autograd.grad(o1.sum(), q1)
    # an output dropped without a backward frees its buffers
    disp(*inputs(11))
    disp(*inputs(12))[0].sum().backward()
    assert stats.eager["inflight"] == 1 and disp.captures == 1


# ----------------------------------------------------------------------------- layer runtime
def _packed_layers(device="cpu", sparse=True, **plugin):
    """Two DSA layers (anchor + shared top-k), graph settings from ``plugin``."""
    from megatron.core.transformer.spec_utils import build_module

    from megatron_dsa.config import set_plugin_config
    from megatron_dsa.spec import get_dsa_layer_specs

    cfg = tiny_config(num_layers=2, dsa_indexer_topk_freq=2, dsa_indexer_use_sparse_loss=sparse,
                      use_cpu_initialization=device == "cpu")
    set_plugin_config(cfg, **plugin)
    layers = [build_module(s, config=cfg, layer_number=i + 1).to(device).train()
              for i, s in enumerate(get_dsa_layer_specs(cfg))]
    return cfg, layers


def _packed_step(layers, lens, seed, recompute=False, device="cpu"):
    """One packed (THD) batch of documents ``lens`` through both layers, forward and backward:
    output, indexer losses, input gradient and parameter gradients."""
    from megatron.core import tensor_parallel
    from megatron.core.packed_seq_params import PackedSeqParams

    from helpers import clear_indexer_tracker, indexer_tracker_values

    cu = torch.tensor([0] + list(lens), dtype=torch.int32).cumsum(0).to(torch.int32).to(device)
    psp = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                          max_seqlen_q=max(lens), max_seqlen_kv=max(lens))
    g = torch.Generator().manual_seed(seed)
    h = layers[0].config.hidden_size
    x = torch.randn(sum(lens), 1, h, generator=g).to(device).requires_grad_()
    dy = torch.randn(sum(lens), 1, h, generator=g).to(device)

    def run(x):
        for layer in layers:
            x = layer(x, None, packed_seq_params=psp)[0]
        return x

    clear_indexer_tracker()
    for layer in layers:
        layer.zero_grad(set_to_none=True)
    out = tensor_parallel.checkpoint(run, False, x) if recompute else run(x)
    (out * dy).sum().backward()
    grads = {f"{i}.{n}": p.grad.clone() for i, l in enumerate(layers) for n, p in l.named_parameters()
             if p.grad is not None}
    return out.detach(), indexer_tracker_values(), x.grad, grads


def _set_classes(cfg, classes, **kw):
    from megatron_dsa.config import set_plugin_config

    set_plugin_config(cfg, graph_shape_classes=classes, **kw)


def _assert_same(a, b, tol=0.0):
    (o1, l1, gx1, g1), (o2, l2, gx2, g2) = a, b
    close = (lambda u, v: torch.testing.assert_close(u, v, rtol=tol, atol=tol)) if tol else \
        (lambda u, v: torch.testing.assert_close(u, v, rtol=1e-6, atol=1e-7))
    close(o1, o2)
    close(l1, l2)
    close(gx1, gx2)
    assert g1.keys() == g2.keys()
    for n in g1:
        close(g1[n], g2[n])


@pytest.mark.parametrize("recompute", [False, True])
def test_padded_class_path_equals_eager_in_the_layer(mcore, recompute):
    """CPU: the layer's padded class path (the same static buffers as the GPU's graphs, run
    without capture) equals the unpadded eager layer: batches of different lengths in one class,
    another class, a miss (eager, counted); index sharing, the sparse indexer loss and (param)
    Megatron's checkpoint recompute included."""
    cfg, layers = _packed_layers()
    batches = [(7, 13), (20,), (5, 9, 11), (30, 14), (50, 21)]  # T32 x3, T64, then a miss (71)
    want = []
    for i, lens in enumerate(batches):
        _set_classes(cfg, None)
        want.append(_packed_step(layers, lens, seed=i, recompute=recompute))
    graph.STATS.reset()
    _set_classes(cfg, (32, 64))
    for i, lens in enumerate(batches):
        got = _packed_step(layers, lens, seed=i, recompute=recompute)
        _assert_same(got, want[i])
    calls = 2 * (2 if recompute else 1)  # layer calls per batch
    from megatron_dsa import index_cache as ic

    assert ic.STATS.hits > 0  # the shared layer reused the anchor's (graph-selected) indices
    assert (ic.STATS.recompute_reuses > 0) == recompute
    assert graph.STATS.hits == {"T32": 3 * calls, "T64": calls}
    assert graph.STATS.misses == calls and graph.STATS.eager == {"miss": calls}
    assert graph.STATS.captures == 0  # CPU: no graphs, the padded buffers run eagerly
    core = layers[0].self_attention.core_attention
    assert core._dsa_graphs.registry.policy == "eager"


def test_strict_policy_and_eager_reasons(mcore):
    from megatron_dsa.graph import ShapeClassMiss as Miss

    cfg, layers = _packed_layers()
    _set_classes(cfg, (16,), graph_miss_policy="strict")
    _packed_step(layers, (6, 10), seed=0)
    with pytest.raises(Miss, match=r"17 tokens fit no declared shape class.*graph_miss_policy='strict'"):
        _packed_step(layers, (6, 11), seed=0)
    # not packed: eager, counted by reason
    graph.STATS.reset()
    core = layers[0].self_attention.core_attention
    from megatron.core.transformer.enums import AttnMaskType

    inp = _core_inputs(cfg, s=10, b=2)
    core(**inp, attn_mask_type=AttnMaskType.causal)
    assert graph.STATS.eager == {"not_thd": 1} and not graph.STATS.hits


def test_graph_config_errors_name_the_field():
    from megatron_dsa.config import DSAPluginConfig

    assert DSAPluginConfig(graph_shape_classes=[512, 128]).graph_shape_classes == (128, 512)
    cases = [
        (dict(graph_shape_classes=[128, 0]), ValueError, r"graph_shape_classes: entry 2 is 0"),
        (dict(graph_shape_classes=[True]), ValueError, r"graph_shape_classes: entry 1 is True"),
        (dict(graph_shape_classes="1024"), TypeError, r"graph_shape_classes must be None or a list"),
        (dict(graph_shape_classes=[]), ValueError, r"graph_shape_classes must not be empty"),
        (dict(graph_shape_classes=[64, 64]), ValueError, r"graph_shape_classes has duplicate"),
        (dict(graph_miss_policy="retry"), ValueError, r"graph_miss_policy must be one of"),
        (dict(graph_cache=0), TypeError, r"graph_cache must be True or False"),
        (dict(graph_max_inflight=0), ValueError, r"graph_max_inflight must be a positive int"),
    ]
    for kw, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            DSAPluginConfig(**kw)


# ----------------------------------------------------------------------------- GPU
@pytest.mark.gpu
def test_cached_replay_equals_fresh_capture_equals_eager_on_gpu():
    """Workloads that share a class but differ in data (and kv contents): bit for bit. Triton
    kernels (the CUDA ones would need an nvcc build first)."""
    def fn(*xs):
        return graph.dsa_sparse_forward(*xs, topk=64, softmax_scale=0.1, d_v=512, backend="triton")

    reg = ShapeClassRegistry([ShapeClass("T256", 256), ShapeClass("T1024", 1024)])
    disp = GraphDispatch(fn, reg)
    fresh = GraphDispatch(fn, reg, cache=False)
    for T in (200, 256, 130, 900, 1000, 256):
        xs = _step_inputs(T, H=64, D=128, Hq=16, Dqk=576, dtype=torch.bfloat16, device="cuda")
        cached = disp(*xs)
        fresh_out = fresh(*xs)
        cls = reg.resolve(T)
        padded = [torch.cat([x, x.new_zeros((cls.max_tokens - T,) + x.shape[1:])]) for x in xs]
        eager = [o[:T] for o in fn(*padded)]
        for a, b, c in zip(cached, fresh_out, eager):
            assert torch.equal(a, b) and torch.equal(a, c)
    assert disp.captures == 2 and fresh.captures == 6


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


@pytest.mark.gpu
@pytest.mark.parametrize("recompute", [False, True])
def test_graphed_packed_layers_equal_eager_on_gpu(mcore, recompute):
    """Packed batches of different lengths in one class (and another class, and a miss): the
    replayed graphs (top-k selection, sparse attention forward and backward; index sharing, the
    sparse indexer loss, Megatron's checkpoint recompute) give eager's outputs, indexer losses and
    gradients; a fresh capture per call (graph_cache=False) gives the cached replay's; one
    capture per class, layer, op and grad mode, none on later batches."""
    cfg, layers = _packed_layers(device="cuda")
    batches = [(100, 156), (256,), (30, 60, 40, 70), (300, 150), (600,)]  # T256 x3, T512, miss
    runs = {}
    # the graphed path takes the sparse loss's target from a recomputation (loss_target 'auto'
    # cannot hand it over from a replayed backward): compare with eager on the same target, and
    # report eager's default ('auto': from the attention backward) as well
    for name, kw in (("eager_auto", dict(classes=None, loss_target="auto")),
                     ("eager", dict(classes=None, loss_target="recompute")),
                     ("fresh", dict(classes=(256, 512), graph_cache=False, loss_target="auto")),
                     # (settings merge into the config's plugin settings: say graph_cache=True)
                     ("cached", dict(classes=(256, 512), graph_cache=True, loss_target="auto"))):
        _set_classes(cfg, kw.pop("classes"), **kw)
        graph.STATS.reset()
        runs[name] = [_packed_step(layers, lens, seed=i, recompute=recompute, device="cuda")
                      for i, lens in enumerate(batches)]
        runs[name + "_stats"] = graph.STATS.as_dict()
    print({k: v for k, v in runs.items() if k.endswith("_stats")})
    worst = {}
    for i in range(len(batches)):
        c = runs["cached"][i]
        assert torch.equal(c[0], runs["fresh"][i][0])  # forward: cached replay == fresh capture, bit for bit
        for other in ("eager", "fresh", "eager_auto"):
            # the miss (last batch) runs eagerly in every run, with eager's default loss target
            ref = runs["eager_auto" if other == "eager" and i == len(batches) - 1 else other][i]
            (o1, l1, gx1, g1), (o2, l2, gx2, g2) = c, ref
            assert g1.keys() == g2.keys()
            for part, err in (("out", _rel(o1, o2)), ("indexer_loss", _rel(l1, l2)), ("dx", _rel(gx1, gx2)),
                              ("dparams", max(_rel(g1[n], g2[n]) for n in g1))):
                key = f"cached-{other}:{part}"
                worst[key] = max(worst.get(key, 0.0), err)
    print("worst relative error", {k: f"{v:.2e}" for k, v in worst.items()})
    for k, v in worst.items():
        if "eager_auto" not in k:
            assert v < (1e-5 if k.endswith(":out") else 1e-4), (k, v)
    st = runs["cached_stats"]
    assert st["misses"] == 2 * (2 if recompute else 1) and st["eager"] == {"miss": st["misses"]}
    assert st["captures"] > 0 and st["backward_replays"] > 0
    # later batches of known classes replay: no new capture
    _set_classes(cfg, (256, 512))
    before = graph.STATS.captures
    again = _packed_step(layers, (80, 90, 40), seed=9, recompute=recompute, device="cuda")
    assert graph.STATS.captures == before
    _set_classes(cfg, None)
    ref = _packed_step(layers, (80, 90, 40), seed=9, recompute=recompute, device="cuda")
    assert _rel(again[0], ref[0]) < 1e-5 and _rel(again[2], ref[2]) < 1e-4

