#!/usr/bin/env python3
"""Lightning indexer score + top-k benchmark: ours and the peers side by side (one process).

Peers (each only if importable; else status "unsupported"):
  mcore_native    megatron.core ... dsa.fused_qk_topk_naive
  mcore_tilelang  megatron.core ... ops.tilelang_dsa.fused_qk_topk_lighting (block 8192)
  cudnn           cudnn.DSA.indexer_forward_wrapper + DSA.indexer_top_k_wrapper

Usage (GPU):
  PYTHONPATH=$PWD python3 benchmarks/bench_indexer.py --S 4096,8192,16384,32768 --out docs/receipts
  ... --impls ours            # ours only
  ... --impls ours,ours_fp8   # the bf16 and the e4m3 selection
  ... --select-cfgs "512,4,8;cuda"  # our select kernel alone: Triton per (BLOCK, warps, sample
                              #   stride), or the CUDA select
  ... --backend triton        # ours with the Triton select (auto: the CUDA select on sm_90)
  ... --chunk-mib 1024        # our score buffer's budget (the library's default: 512)
  ... --score-only            # also our score kernel alone (no selection); with ours_fp8 the
                              #   e4m3 score kernel alone and the quantization alone
  ... --breakdown             # ours: one profiled call, device ms per kernel group (score,
                              #   select, quantize, other) in the row and the receipt
  ... --impls ours,ours_fp8 --score-cfgs "64,128,4,3;64,256,16,3,0,1"   # score tile sweep (per
                              #   precision; the last field 1: the keys as the MMA's M)
  ... --loss-S 32768          # also the indexer loss fwd+bwd (ours): sparse, attn (target from
                              #   the attention backward), dense
  ... --check 32768           # correctness spot check of ours vs the fp32 reference first
  ... --loss-peers-S 4096,8192  # top-k + loss fwd+bwd (dense and sparse), ours vs Megatron-Core's
                                #   FusedDSAIndexerLoss, gradients compared
Causal (top-left), B=1, H=64, D=128, k=2048, random bf16 q/k, fp32 weights.
FLOPs counted: S^2 * H * D (the causal half of 2 * S^2 * H * D).
Ours is the public ``indexer_topk`` / ``indexer_loss`` / ``indexer_loss_from_attention`` with
``--backend`` (default auto); each row of ours records the kernel that ran (``kernel``), the
receipt the ``format_status()`` table and the registers / spills / shared memory of every Triton
kernel the run compiled (``notes.compile_report``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import (  # noqa: E402
    kernel_resources, measure_ceilings, peak_gib, profile_groups, run_guarded, time_cuda, triton_kernels,
    write_receipt,
)

BACKEND = "auto"  # --backend: what ours runs (the public functions' backend argument)


# ---------------------------------------------------------------------------------------------
# implementations: each factory returns fn() or raises ImportError -> "unsupported"
# ---------------------------------------------------------------------------------------------


def make_ours(q, k, w, topk):
    from megatron_dsa.kernels.indexer import indexer_topk

    return lambda: indexer_topk(q, k, w, topk, backend=BACKEND)


def make_ours_fp8(q, k, w, topk):
    """The e4m3 selection (``DSAPluginConfig.indexer_precision="fp8"``), quantization included."""
    from megatron_dsa.kernels.indexer import indexer_topk

    return lambda: indexer_topk(q, k, w, topk, backend=BACKEND, precision="fp8")


def ours_kernel(q):
    """What the public ``indexer_topk`` runs for ``q`` (its KernelChoice, as text)."""
    from megatron_dsa.kernels.indexer import select_backend

    c = select_backend(BACKEND, q.device, q.dtype, q.shape[-1], warn=False)
    return f"{c.requested}: {c.forward} ({c.reason})"


def make_mcore_native(q, k, w, topk):
    from megatron.core.transformer.experimental_attention_variant.dsa import fused_qk_topk_naive

    S = k.shape[1]
    qs, ks, ws = q[0].unsqueeze(1), k[0].unsqueeze(1), w[0].unsqueeze(1)  # [s, b, ...]
    mask = torch.full((S, S), float("-inf"), device=q.device).triu_(1)
    return lambda: fused_qk_topk_naive(qs, ks, ws, topk, mask=mask)


def make_mcore_tilelang(q, k, w, topk):
    from megatron.core.transformer.experimental_attention_variant.ops import tilelang_dsa

    if tilelang_dsa.lighting_indexer_indices is None:
        raise ImportError("tilelang indexer not importable")
    S = k.shape[1]
    qs, ks, ws = q[0].unsqueeze(1), k[0].unsqueeze(1), w[0].unsqueeze(1)
    starts = torch.zeros(S, dtype=torch.int32, device=q.device)
    ends = torch.arange(1, S + 1, dtype=torch.int32, device=q.device)
    return lambda: tilelang_dsa.fused_qk_topk_lighting(qs, ks, ws, topk, starts, ends,
                                                       block_size=8192)


def make_cudnn(q, k, w, topk):
    from cudnn import DSA  # noqa: F401

    B, S = k.shape[:2]
    seq_lens = torch.arange(1, S + 1, dtype=torch.int32, device=q.device).repeat(B)
    kk = k.unsqueeze(2)
    wb = w.to(torch.bfloat16)  # cuDNN takes bf16 head weights

    def fn():
        sc = DSA.indexer_forward_wrapper(q, kk, wb, ratio=1, sm_scale=1.0)["scores"]
        return DSA.indexer_top_k_wrapper(sc.view(B * q.shape[1], S), seq_lens, top_k=topk,
                                         next_n=1, return_val=True)

    return fn


IMPLS = {
    "ours": ("megatron_dsa", make_ours),
    "ours_fp8": ("megatron_dsa[fp8]", make_ours_fp8),
    "mcore_native": ("mcore_native", make_mcore_native),
    "mcore_tilelang": ("mcore_tilelang", make_mcore_tilelang),
    "cudnn": ("cudnn", make_cudnn),
}


def inputs(S, H, D, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(1, S, H, D, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(1, S, D, device="cuda", dtype=torch.bfloat16, generator=g)
    w = torch.randn(1, S, H, device="cuda", dtype=torch.float32, generator=g) * H**-0.5
    return q, k, w


# --breakdown: our pipeline's kernels by group (name fragments; the rest is "other")
KERNEL_GROUPS = {"score": ("_score_kernel",), "select": ("select_kernel",), "quantize": ("_quantize_e4m3", "_quantize_qk")}


def bench_one(make, S, H, D, topk, reps, breakdown=False):
    def body():
        q, k, w = inputs(S, H, D)
        fn = make(q, k, w, topk)
        ms = time_cuda(fn, warmup=1, reps=reps)
        pk = peak_gib(fn)
        flops = S * S * H * D
        out = {"ms": round(ms, 4), "tflops": round(flops / (ms * 1e-3) / 1e12, 1), "peak_gib": round(pk, 4)}
        if breakdown:
            out["breakdown_ms"] = profile_groups(fn, KERNEL_GROUPS)
        return out

    try:
        return run_guarded(body)
    except ImportError:
        return {"status": "unsupported"}


def compile_report():
    """Registers / spills / shared memory of every indexer and indexer-loss Triton kernel the run
    compiled (read from Triton's JIT cache; best effort)."""
    from megatron_dsa.kernels.indexer import triton_impl as ix
    from megatron_dsa.kernels.indexer_loss import triton_impl as il

    try:
        return [kernel_resources(k) for k in triton_kernels(ix, il)]
    except Exception as e:  # noqa: BLE001
        return f"unavailable: {type(e).__name__}: {e}"


def bench_impl(name, S, args):
    label, make = IMPLS[name]
    try:
        q, k, w = inputs(64, args.H, args.D)
        make(q, k, w, args.k)  # import / construction probe at a tiny size
    except ImportError as e:
        return {"impl": label, "status": "unsupported", "note": str(e)[:200]}
    except Exception:  # noqa: BLE001 - the real run records errors
        pass
    res = bench_one(make, S, args.H, args.D, args.k, args.reps,
                    breakdown=args.breakdown and name in ("ours", "ours_fp8"))
    if name == "ours":
        res["kernel"] = ours_kernel(q)
    return {"impl": label, **res}


def score_only(S, args, fp8=False):
    """Our score kernel alone over the same row chunks (no selection). ``fp8``: the e4m3 score
    kernel on pre-quantized inputs, plus the quantization alone (``quant_ms``)."""
    from megatron_dsa.kernels.indexer import triton_impl as ti
    from megatron_dsa.kernels.indexer.fp8 import fp8_kernel_inputs

    q, k, w = inputs(S, args.H, args.D)
    cfg = ti._score_cfg(fp8)
    rows, _ = ti._plan(1, S, S, args.k, cfg.block_t, ti.DEFAULT_CHUNK_BYTES)
    buf = torch.empty(1, rows, S, dtype=torch.float32, device="cuda")
    extra, ks = {}, None
    if fp8:
        extra["quant_ms"] = round(time_cuda(lambda: fp8_kernel_inputs(q, k, w), warmup=1, reps=args.reps), 4)
        q, k, w, ks = fp8_kernel_inputs(q, k, w)
    q, k, w, st, en, causal = ti._prep(q, k, w, None, None)

    def fn():
        for row0 in range(0, S, rows):
            ti._launch_scores(q, k, w, st, en, causal, True, buf, row0, min(rows, S - row0), cfg, ks)

    ms = time_cuda(fn, warmup=1, reps=args.reps)
    return {"ms": round(ms, 4), "tflops": round(S * S * args.H * args.D / (ms * 1e-3) / 1e12, 1), **extra}


def select_sweep(S, args):
    """Our select kernel alone, per (BLOCK, num_warps, sample stride) of ``--select-cfgs`` or
    ``cuda`` (the CUDA select): the scores of all S rows are computed once into one [S, S]
    buffer, then each configuration selects from it in one launch. Each configuration's sets are checked against the first's
    (every configuration is exact, so the sets must be equal row by row)."""
    from megatron_dsa.kernels.indexer import triton_impl as ti

    q, k, w = inputs(S, args.H, args.D)
    q, k, w, st, en, causal = ti._prep(q, k, w, None, None)
    buf = torch.empty(1, S, S, dtype=torch.float32, device="cuda")
    ti._launch_scores(q, k, w, st, en, causal, True, buf, 0, S, ti._score_cfg())
    scr = torch.empty(1, S, ti.scratch_cap(S, args.k), dtype=torch.int32, device="cuda")
    out, first = [], None
    for spec in args.select_cfgs.split(";"):
        kernel = "cuda" if spec == "cuda" else "triton"
        blk, nw, stride = (0, 0, 0) if kernel == "cuda" else (int(x) for x in spec.split(","))
        idx = torch.empty(1, S, args.k, dtype=torch.int32, device="cuda")
        vals = torch.empty(1, S, args.k, dtype=torch.float32, device="cuda")

        ms = time_cuda(lambda: ti.launch_select(buf, scr, st, en, idx, vals, 0, S, S, causal, False, (blk, nw), stride,
                                                kernel=kernel), warmup=1, reps=args.reps)
        sets = idx[0].sort(dim=1).values
        if first is None:
            first = sets
        label = "cuda" if kernel == "cuda" else f"{blk} w{nw} stride {stride}"
        r = {"impl": f"megatron_dsa[select {label}]", "ms": round(ms, 4), "status": "ok",
             "same_sets_as_first": bool(torch.equal(sets, first)),
             "case": {"S": S, "H": args.H, "D": args.D, "k": args.k, "pass": "select"}}
        out.append(r)
        print(json.dumps(r), flush=True)
    del buf, scr
    torch.cuda.empty_cache()
    return out


def check_ours(S, H, D, topk):
    """Ours (bf16) vs the fp32 reference on the first rows: k-th score and id overlap."""
    from megatron_dsa.kernels.indexer import indexer_topk, indexer_topk_reference

    q, k, w = inputs(S, H, D, seed=1)
    idx, val = indexer_topk(q, k, w, topk, backend=BACKEND)
    rows = list(range(0, 64)) + list(range(S - 256, S))
    sel = torch.tensor(rows, device="cuda")
    ri, rv = indexer_topk_reference(q[:, sel].float(), k.float(), w[:, sel], topk,
                                    torch.zeros(1, len(rows), dtype=torch.int32, device="cuda"),
                                    (sel + 1).view(1, -1).to(torch.int32))
    ours_i, ours_v = idx[:, sel], val[:, sel]
    ov = []
    for r in range(len(rows)):
        a = set(ours_i[0, r][ours_i[0, r] >= 0].tolist())
        b = set(ri[0, r][ri[0, r] >= 0].tolist())
        ov.append(len(a & b) / max(1, len(b)))
    sv = ours_v.sort(-1, descending=True).values
    fin = torch.isfinite(rv)
    rel = ((sv - rv)[fin].norm() / rv[fin].norm()).item()
    pad_ok = bool(((ours_i < 0).sum(-1) == (ri < 0).sum(-1)).all())
    return {"S": S, "min_overlap": min(ov), "mean_overlap": sum(ov) / len(ov),
            "sorted_score_rel_err": rel, "pad_ok": pad_ok}


def bench_loss(S, args, sparse):
    from megatron_dsa.kernels.indexer import indexer_topk
    from megatron_dsa.kernels.indexer_loss import indexer_loss, select_backend

    def body():
        q, k, w = inputs(S, args.H, args.D)
        g = torch.Generator(device="cuda").manual_seed(2)
        query = torch.randn(1, S, args.loss_heads, 576, device="cuda", dtype=torch.bfloat16,
                            generator=g)
        key = torch.randn(1, S, 576, device="cuda", dtype=torch.bfloat16, generator=g)
        idx, _ = indexer_topk(q, k, w, args.k, backend=BACKEND)
        q.requires_grad_(True)
        k.requires_grad_(True)
        w.requires_grad_(True)

        def fn():
            loss = indexer_loss(q, k, w, query, key, 576**-0.5, 1.0, topk_indices=idx, sparse=sparse,
                                backend=BACKEND)
            loss.backward()
            return loss

        ms = time_cuda(fn, warmup=1, reps=max(1, min(args.reps, 3)))
        pk = peak_gib(fn)
        c = select_backend(BACKEND, q.device, q.dtype, sparse, warn=False)
        return {"ms": round(ms, 3), "peak_gib": round(pk, 4),
                "kernel": f"{c.requested}: {c.forward} ({c.reason})"}

    res = run_guarded(body)
    return {"impl": "megatron_dsa", "case": {"S": S, "H": args.H, "D": args.D, "k": args.k,
                                             "Hq": args.loss_heads, "Dqk": 576,
                                             "pass": "loss fwd+bwd " + ("sparse" if sparse else "dense")},
            "tflops": None, **res}


def topk_and_loss_ours(q, k, w, query, key, topk, sparse):
    """Ours: ``indexer_topk`` then ``indexer_loss`` forward + backward (the scope of Megatron-Core's
    fused indexer loss, which selects the top-k in the same call). Inputs [B, S, ...]."""
    from megatron_dsa.kernels.indexer import indexer_topk
    from megatron_dsa.kernels.indexer_loss import indexer_loss

    def fn():
        qa, ka, wa = (x.detach().requires_grad_() for x in (q, k, w))
        with torch.no_grad():
            idx, _ = indexer_topk(qa, ka, wa, topk, backend=BACKEND)
        loss = indexer_loss(qa, ka, wa, query, key, key.shape[-1] ** -0.5, 1.0, topk_indices=idx, sparse=sparse,
                            backend=BACKEND)
        loss.backward()
        return loss, qa.grad, ka.grad, wa.grad

    return fn


def topk_and_loss_mcore(q, k, w, query, key, topk, sparse):
    """Megatron-Core 0.19.2's ``FusedDSAIndexerLoss`` (the indexer loss its DSA layer runs
    without fused kernels: top-k and loss in one call) forward + backward, its tensors in its
    [s, b, ...] layout, a causal mask, one tensor-parallel rank."""
    import torch.distributed as dist
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.experimental_attention_variant.dsa import FusedDSAIndexerLoss

    if not dist.is_initialized():
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    pgs = ProcessGroupCollection(tp=dist.new_group([0]))
    S = k.shape[1]
    mask = torch.full((S, S), float("-inf"), device=q.device).triu_(1)
    qs, ks, ws = (x.transpose(0, 1).contiguous() for x in (q, k, w))
    qy, ky = query.transpose(0, 1).contiguous(), key.transpose(0, 1).unsqueeze(2).contiguous()
    ky = ky.expand(-1, -1, qy.shape[2], -1)

    def fn():
        qa, ka, wa = (x.detach().requires_grad_() for x in (qs, ks, ws))
        _, loss = FusedDSAIndexerLoss.apply(qa, wa, ka, qy, ky, key.shape[-1] ** -0.5, topk, 1.0, mask, sparse,
                                            pgs)
        loss.backward()
        return loss, qa.grad.transpose(0, 1), ka.grad.transpose(0, 1), wa.grad.transpose(0, 1)

    return fn


LOSS_PEERS = {"ours": ("megatron_dsa", topk_and_loss_ours), "mcore": ("mcore_native", topk_and_loss_mcore)}


def bench_loss_side_by_side(S, args, sparse):
    """Top-k + indexer loss forward + backward, ours and Megatron-Core's, on the same inputs;
    Megatron-Core's loss value and gradients compared with ours (``rel_*_vs_ours``)."""
    rows = []
    q, k, w = inputs(S, args.H, args.D)
    g = torch.Generator(device="cuda").manual_seed(2)
    query = torch.randn(1, S, args.loss_heads, 576, device="cuda", dtype=torch.bfloat16, generator=g)
    key = torch.randn(1, S, 576, device="cuda", dtype=torch.bfloat16, generator=g)
    ref = None
    for name in args.loss_peers.split(","):
        label, make = LOSS_PEERS[name]

        def body():
            fn = make(q, k, w, query, key, args.k, sparse)
            out = fn()
            ms = time_cuda(fn, warmup=0, reps=max(1, min(args.reps, 3)))
            pk = peak_gib(fn)
            return {"ms": round(ms, 3), "peak_gib": round(pk, 4), "out": [x.detach().float() for x in out]}

        try:
            res = run_guarded(body)
        except ImportError as e:
            res = {"status": f"unsupported ({e})"}
        out = res.pop("out", None)
        if out is not None and ref is None and name == "ours":
            ref = out
        elif out is not None and ref is not None:
            for n, a, b in zip(("loss", "dq", "dk", "dw"), out, ref):
                res[f"rel_{n}_vs_ours"] = float(((a - b).norm() / b.norm().clamp_min(1e-30)).item())
        rows.append({"impl": label, "case": {"S": S, "H": args.H, "D": args.D, "k": args.k, "Hq": args.loss_heads,
                                             "Dqk": 576, "pass": "top-k + loss fwd+bwd " + ("sparse" if sparse else "dense")},
                     "tflops": None, **res})
        torch.cuda.empty_cache()
    return rows


def bench_loss_from_attention(S, args):
    """The sparse loss with its target from the attention backward: the loss's own fwd+bwd
    (forward, then backward with the target delivered as the slot's gradient), and what emitting
    the target adds to the attention backward (timed interleaved, with and without). The
    attention runs the launchers ``sparse_mla(..., backend=--attn-backend)`` runs (``attn_kernel``)."""
    import statistics

    from bench_sparse_mla import choice_str, ours_launchers

    from megatron_dsa.kernels.indexer import indexer_topk
    from megatron_dsa.kernels.indexer_loss import indexer_loss_from_attention

    def body():
        q, k, w = inputs(S, args.H, args.D)
        g = torch.Generator(device="cuda").manual_seed(2)
        query = torch.randn(S, args.loss_heads, 576, device="cuda", dtype=torch.bfloat16, generator=g)
        key = torch.randn(S, 576, device="cuda", dtype=torch.bfloat16, generator=g)
        idx, _ = indexer_topk(q, k, w, args.k, backend=BACKEND)
        scale = 576**-0.5
        choice, attn_fwd, attn_bwd_fn = ours_launchers(query, key, args.attn_backend)
        if attn_bwd_fn is None:
            raise RuntimeError(f"unsupported: the {choice.backward} attention backward emits no loss target")
        ids = idx[0].contiguous()
        out, lse = attn_fwd(query, key, ids, scale)
        dout = torch.randn_like(out)
        target = torch.zeros(S, args.k, device="cuda")

        def attn_bwd(emit):
            return lambda: attn_bwd_fn(query, key, ids, scale, out, lse, dout,
                                       target_out=target.zero_() if emit else None)

        attn_bwd(True)()
        tgt = target.clone()  # the real target of this attention
        plain, emit = [], []
        for _ in range(max(1, min(args.reps, 5))):
            plain.append(time_cuda(attn_bwd(False), warmup=0, reps=1))
            emit.append(time_cuda(attn_bwd(True), warmup=0, reps=1))
        del dout, out
        torch.cuda.empty_cache()
        q.requires_grad_(True)
        k.requires_grad_(True)
        w.requires_grad_(True)
        one = torch.ones((), device="cuda")
        values = []

        def fn():
            loss, slot = indexer_loss_from_attention(q, k, w, idx, 1.0, on_value=values.append)
            torch.autograd.backward([loss, slot], [one, tgt])
            return loss

        ms = time_cuda(fn, warmup=1, reps=max(1, min(args.reps, 5)))
        pk = peak_gib(fn)
        a0, a1 = statistics.median(plain), statistics.median(emit)
        return {"ms": round(ms, 3), "peak_gib": round(pk, 4),
                "attn_bwd_ms": round(a0, 2), "attn_bwd_emit_ms": round(a1, 2),
                "attn_bwd_added_ms": round(a1 - a0, 2), "total_ms": round(ms + a1 - a0, 3),
                "attn_bwd_ms_all": [round(x, 2) for x in plain],
                "attn_bwd_emit_ms_all": [round(x, 2) for x in emit],
                "loss_value": float(values[-1]), "attn_kernel": choice_str(choice),
                "kernel": "triton (indexer_loss_from_attention: fused Triton kernels)"}

    res = run_guarded(body)
    return {"impl": "megatron_dsa", "case": {"S": S, "H": args.H, "D": args.D, "k": args.k,
                                             "Hq": args.loss_heads, "Dqk": 576,
                                             "pass": "loss fwd+bwd sparse, target from attention bwd"},
            "tflops": None, **res}


def _row_with(name, S, args, impl, **patch):
    """``name`` (ours / ours_fp8) timed with these ``triton_impl`` globals replaced (restored
    after), printed and returned as row ``impl``."""
    from megatron_dsa.kernels.indexer import triton_impl as ti

    saved = {a: getattr(ti, a) for a in patch}
    for a, v in patch.items():
        setattr(ti, a, v)
    try:
        r = bench_impl(name, S, args)
    finally:
        for a, v in saved.items():
            setattr(ti, a, v)
    r["impl"] = impl
    r["case"] = {"S": S, "H": args.H, "D": args.D, "k": args.k, "pass": "fwd"}
    print(json.dumps(r), flush=True)
    torch.cuda.empty_cache()
    return r


def score_cfg_sweep(name, S, args):
    """``name`` (ours / ours_fp8) again with each of ``--score-cfgs`` as its precision's score-kernel
    config (``triton_impl._SCORE_CFG_GPU``)."""
    from megatron_dsa.kernels.indexer import triton_impl as ti

    prec, out = "fp8" if name == "ours_fp8" else "bf16", []
    for spec in args.score_cfgs.split(";"):
        cfg = ti.ScoreCfg(*(int(x) for x in spec.split(",")))
        extra = f" r{cfg.maxnreg}" if cfg.maxnreg else ""
        impl = f"megatron_dsa[{prec} {cfg.block_t}x{cfg.block_s} w{cfg.warps} s{cfg.stages}{extra}]"
        out.append(_row_with(name, S, args, impl, _SCORE_CFG_GPU={**ti._SCORE_CFG_GPU, prec: cfg}))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--S", default="4096,8192,16384,32768",
                    help="comma list of sequence lengths (e.g. up to 131072)")
    ap.add_argument("--impls", default="ours,mcore_native,mcore_tilelang,cudnn")
    ap.add_argument("--H", type=int, default=64)
    ap.add_argument("--D", type=int, default=128)
    ap.add_argument("--k", type=int, default=2048)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default="docs/receipts/")
    ap.add_argument("--topic", default="indexer",
                    help="the receipt's topic (its file name's first part), e.g. indexer_e4m3 for an e4m3-only run")
    ap.add_argument("--loss-S", default="", help="comma list of S for the loss fwd+bwd (ours)")
    ap.add_argument("--loss-dense-S", default="", help="extra S list for the dense loss only")
    ap.add_argument("--loss-heads", type=int, default=128)
    ap.add_argument("--loss-variants", default="sparse,attn,dense",
                    help="sparse (target recomputed), attn (target from the attention bwd), dense")
    ap.add_argument("--loss-peers-S", default="",
                    help="comma list of S for top-k + loss fwd+bwd side by side (--loss-peers), dense and sparse")
    ap.add_argument("--loss-peers", default="ours,mcore", help="ours, mcore (Megatron-Core's FusedDSAIndexerLoss)")
    ap.add_argument("--check", default="", help="comma list of S for a correctness check")
    ap.add_argument("--score-only", action="store_true", help="also time our score kernel alone")
    ap.add_argument("--breakdown", action="store_true",
                    help="ours: also one profiled call, device ms per kernel group (score, select, quantize, other)")
    ap.add_argument("--select-cfgs", default="",
                    help='our select kernel alone per "BLOCK,num_warps,sample_stride;..." (the Triton '
                         'select\'s is "512,4,8") or "cuda", from one [S, S] score buffer (S <= 64K)')
    ap.add_argument("--chunk-mib", type=int, default=0,
                    help="our score buffer's budget in MiB (default: the library's, 512)")
    ap.add_argument("--score-cfgs", default="",
                    help="ours / ours_fp8 once more per score-kernel config 'BT,BS,warps,stages[,maxnreg];...' "
                         "(maxnreg 0: none) for that precision (the tuning sweep; "
                         "rows megatron_dsa[bf16|fp8 BTxBS wW sS ...])")
    ap.add_argument("--backend", default="auto", choices=("auto", "cuda", "triton", "reference"),
                    help="backend of ours (indexer_topk / indexer_loss)")
    ap.add_argument("--attn-backend", default="auto", choices=("auto", "cuda", "triton"),
                    help="sparse MLA backend of the attention in the 'attn' loss variant")
    ap.add_argument("--no-ceilings", action="store_true")
    ap.add_argument("--no-receipt", action="store_true")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_indexer: needs a CUDA device")
        return 1
    global BACKEND
    BACKEND = args.backend
    if args.chunk_mib:
        from megatron_dsa.kernels.indexer import triton_impl as ti

        ti.DEFAULT_CHUNK_BYTES = args.chunk_mib << 20
    sizes = [int(s) for s in args.S.split(",") if s]
    rows, notes = [], {}
    # what backend="auto" runs on this machine, and why (the receipt keeps it)
    try:
        from megatron_dsa.kernels import format_status

        kernel_status = format_status()
    except Exception as e:  # noqa: BLE001 - the benchmark still runs; the rows say what ran
        kernel_status = f"unavailable: {type(e).__name__}: {e}"
    print(kernel_status, flush=True)
    ceil = {} if args.no_ceilings else measure_ceilings()
    print("ceilings", ceil, flush=True)
    for S in [int(s) for s in args.check.split(",") if s]:
        c = check_ours(S, args.H, args.D, args.k)
        notes.setdefault("checks", []).append(c)
        print("check", json.dumps(c), flush=True)
    impls = [s for s in args.impls.split(",") if s]
    for S in sizes:
        for name in impls:
            t0 = time.time()
            r = bench_impl(name, S, args)
            r["case"] = {"S": S, "H": args.H, "D": args.D, "k": args.k, "pass": "fwd"}
            rows.append(r)
            print(json.dumps(r), f"({time.time() - t0:.1f}s)", flush=True)
            torch.cuda.empty_cache()
            if name in ("ours", "ours_fp8") and args.score_cfgs:
                rows += score_cfg_sweep(name, S, args)
            if name == "ours" and args.select_cfgs:
                rows += select_sweep(S, args)
            if name in ("ours", "ours_fp8") and args.score_only:
                fp8 = name == "ours_fp8"
                r = run_guarded(lambda: score_only(S, args, fp8))
                r["impl"] = "megatron_dsa[fp8 score_only]" if fp8 else "megatron_dsa[score_only]"
                r["case"] = {"S": S, "H": args.H, "D": args.D, "k": args.k, "pass": "score"}
                rows.append(r)
                print(json.dumps(r), flush=True)
    loss_cases = [(int(s), v) for s in args.loss_S.split(",") if s
                  for v in args.loss_variants.split(",")]
    loss_cases += [(int(s), "dense") for s in args.loss_dense_S.split(",") if s]
    for S, var in loss_cases:
        r = bench_loss_from_attention(S, args) if var == "attn" else bench_loss(S, args, var == "sparse")
        rows.append(r)
        print(json.dumps(r), flush=True)
        torch.cuda.empty_cache()
    for S in [int(x) for x in args.loss_peers_S.split(",") if x]:
        for sparse in (False, True):
            for r in bench_loss_side_by_side(S, args, sparse):
                rows.append(r)
                print(json.dumps(r), flush=True)
    if "ours" in impls or loss_cases:
        notes["compile_report"] = compile_report()
        print("compile_report", json.dumps(notes["compile_report"]), flush=True)
    if not args.no_receipt:
        paths = write_receipt(args.topic, rows, args.out, extra={"notes": notes, "kernel_status": kernel_status},
                              ceilings=ceil)
        print("receipt:", paths)
    print(f"\n{'impl':44s} {'S':>7s} {'pass':>22s} {'ms':>9s} {'TFLOP/s':>8s} {'peak GiB':>9s} status")
    for r in rows:
        c = r.get("case", {})
        print(f"{r['impl']:44s} {c.get('S', ''):>7} {c.get('pass', ''):>22s} "
              f"{r.get('ms') if r.get('ms') is not None else '-':>9} "
              f"{r.get('tflops') if r.get('tflops') is not None else '-':>8} "
              f"{r.get('peak_gib') if r.get('peak_gib') is not None else '-':>9} {r.get('status')}"
              + (f"  [{r['kernel']}]" if r.get("kernel") else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
