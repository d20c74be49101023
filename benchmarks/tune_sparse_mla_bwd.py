"""Device check + timing of the sparse MLA backward variants (old split/fused vs all-heads dkv).

PYTHONPATH=$PWD python3 benchmarks/tune_sparse_mla_bwd.py [--quick]
Prints one line per measurement and a table at the end.
"""
import json
import os
import sys
import time

import torch

from megatron_dsa.kernels.sparse_mla import triton_impl as ti
from megatron_dsa.kernels.sparse_mla.reference import sparse_mla_reference

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_sparse_mla import causal_indices  # noqa: E402

DQK, DV, K = 576, 512, 2048
BASE = dict(ti.CONFIG)


def setcfg(**kw):
    ti.CONFIG.clear()
    ti.CONFIG.update(BASE)
    ti.CONFIG.update(kw)


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def check(T, H, with_topk, with_sink, variants):
    dev = "cuda"
    q = torch.randn(T, H, DQK, device=dev, dtype=torch.bfloat16)
    kv = torch.randn(T, DQK, device=dev, dtype=torch.bfloat16)
    idx = causal_indices(T, K, dev)
    tk = torch.randint(K // 2, K + 1, (T,), device=dev, dtype=torch.int32) if with_topk else None
    sk = torch.randn(H, device=dev) if with_sink else None
    dout = torch.randn(T, H, DV, device=dev, dtype=torch.bfloat16)
    scale = DQK ** -0.5
    qr, kvr = q.float().requires_grad_(), kv.float().requires_grad_()
    sr = sk.clone().requires_grad_() if sk is not None else None
    ro, _ = sparse_mla_reference(qr, kvr, idx, scale, DV, tk, sr)
    ro.backward(dout.float())
    out, lse = ti.sparse_mla_fwd_triton(q, kv, idx, scale, DV, tk, sk)
    res = []
    for name, cfg in variants:
        setcfg(**cfg)
        dq, dkv, ds = ti.sparse_mla_bwd_triton(q, kv, idx, scale, DV, tk, sk, out, lse, dout)
        e = (rel(dq, qr.grad), rel(dkv, kvr.grad), rel(ds, sr.grad) if sk is not None else 0.0,
             bool(torch.isfinite(dq).all() and torch.isfinite(dkv).all()))
        res.append((f"check T={T} H={H} topk={with_topk} sink={with_sink} {name}", e))
        print(res[-1], flush=True)
    setcfg()
    return res


def time_bwd(S, H, variants, reps=3):
    dev = "cuda"
    q = torch.randn(S, H, DQK, device=dev, dtype=torch.bfloat16)
    kv = torch.randn(S, DQK, device=dev, dtype=torch.bfloat16)
    idx = causal_indices(S, K, dev)
    dout = torch.randn(S, H, DV, device=dev, dtype=torch.bfloat16)
    scale = DQK ** -0.5
    setcfg()
    out, lse = ti.sparse_mla_fwd_triton(q, kv, idx, scale, DV)
    fl = 2 * S * H * K * (2 * DV + 3 * DQK)
    rows = []
    first = None
    for name, cfg in variants:
        setcfg(**cfg)
        fn = lambda: ti.sparse_mla_bwd_triton(q, kv, idx, scale, DV, None, None, out, lse, dout)
        try:
            t0 = time.time()
            fn()
            torch.cuda.synchronize()
            tc = time.time() - t0
            ts = []
            for _ in range(reps):
                a, b = torch.cuda.Event(True), torch.cuda.Event(True)
                a.record()
                fn()
                b.record()
                torch.cuda.synchronize()
                ts.append(a.elapsed_time(b))
            ts.sort()
            ms = ts[len(ts) // 2]
            rep = {}
            for kn, k in ti.LAST_KERNELS.items():
                rep[kn] = (getattr(k, "n_regs", None), getattr(k, "n_spills", None), k.metadata.shared)
            dq, dkv, _ = fn()
            if first is None:
                first = (dq, dkv)
                agree = ""
            else:  # agreement with the first variant (bf16 outputs, different summation orders)
                agree = f" vs first: dq {rel(dq, first[0]):.1e} dkv {rel(dkv, first[1]):.1e}"
            del dq, dkv
            r = (f"S={S} H={H} {name}", round(ms, 2), round(fl / ms / 1e9, 1),
                 f"[{min(ts):.2f}..{max(ts):.2f}] first {tc:.1f}s{agree}", rep)
        except Exception as e:  # noqa: BLE001
            r = (f"S={S} H={H} {name}", None, None, str(e).splitlines()[0][:200], {})
        rows.append(r)
        print(r, flush=True)
    # per-kernel split of the default
    setcfg()
    try:
        from torch.profiler import profile, ProfilerActivity
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            ti.sparse_mla_bwd_triton(q, kv, idx, scale, DV, None, None, out, lse, dout)
            torch.cuda.synchronize()
        split = {}
        for ev in prof.key_averages():
            if ev.device_type.name == "CUDA" or "kernel" in ev.key:
                split[ev.key[:60]] = round(getattr(ev, "device_time_total", getattr(ev, "cuda_time_total", 0)) / 1e3, 2)
        print(f"S={S} H={H} default per-kernel ms:", json.dumps(split), flush=True)
        rows.append((f"S={S} H={H} split", split))
    except Exception as e:  # noqa: BLE001
        print("profile failed", e)
    setcfg()
    del q, kv, idx, dout, out, lse, first
    torch.cuda.empty_cache()
    return rows


if __name__ == "__main__":
    quick = "--quick" in sys.argv
    allres = []
    OLD = ("old", dict(bwd_rows=0))  # per-head-block dq and dkv kernels
    NEW = ("rows", {})  # default: all-heads pass
    if "--check" in sys.argv:  # correctness is covered by pytest -m gpu; this compares paths
        allres += check(2048, 128, False, False, [OLD, NEW])
        allres += check(2048, 16, False, True, [OLD, NEW])
    plan = {128: [OLD, NEW], 64: [OLD, NEW], 16: [OLD, NEW]}
    if os.environ.get("TUNE_JSON"):  # {"H": [[name, cfg], ...], ...}
        plan = {int(h): [tuple(v) for v in vs] for h, vs in json.loads(os.environ["TUNE_JSON"]).items()}
    S = int(os.environ.get("TUNE_S", "16384"))
    for H, vs in plan.items():
        allres += time_bwd(S, H, vs if not quick else [OLD, NEW])
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "tune_bwd.json"), "w") as f:
            json.dump(allres, f, indent=1, default=str)
    print("\n==== summary ====")
    for r in allres:
        print(r[:4] if len(r) > 2 else r)
