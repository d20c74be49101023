"""Bring-up check of the sm_90a CUDA sparse MLA backward on a GPU: correctness against the
float64 reference (autograd through the plain-PyTorch attention) at small sizes, then the CUDA
backward vs the Triton backward (same inputs, same stats kernel) at S=16K, and forward+backward
through autograd.

    PYTHONPATH=$PWD python3 benchmarks/check_sparse_mla_bwd_cuda.py [--S 16384] [--H 64,128]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench_sparse_mla import causal_indices, flops  # noqa: E402
from check_sparse_mla_cuda import ptxas_report  # noqa: E402
from common import time_cuda  # noqa: E402

from megatron_dsa.kernels.sparse_mla import cuda_impl as ci  # noqa: E402
from megatron_dsa.kernels.sparse_mla import triton_impl as ti  # noqa: E402
from megatron_dsa.kernels.sparse_mla.reference import sparse_mla_reference  # noqa: E402


def rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-12)).item()


def check(T, H, K, sink, topk, holes, seed=0, target=False):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(T, H, 576, device="cuda", generator=g).bfloat16()
    kv = torch.randn(T, 576, device="cuda", generator=g).bfloat16()
    idx = causal_indices(T, K, "cuda")
    idx[min(5, T - 1)] = -1  # one empty row
    if holes:  # -1 inside rows, not only trailing
        idx = torch.where(torch.rand(idx.shape, device="cuda", generator=g) < 0.2, -1, idx)
    tl_ = torch.randint(0, K + 1, (T,), device="cuda", generator=g).int() if topk else None
    sk = torch.randn(H, device="cuda", generator=g) if sink else None
    scale = 576 ** -0.5
    dout = torch.randn(T, H, 512, device="cuda", generator=g).bfloat16()
    # reference in float64
    qr = q.double().requires_grad_()
    kvr = kv.double().requires_grad_()
    skr = sk.double().requires_grad_() if sink else None
    o_ref, l_ref = sparse_mla_reference(qr, kvr, idx, scale, 512, tl_, skr)
    o_ref.backward(dout.double())
    # ours: the forward's out / lse, then the dispatching backward
    out, lse = ti.sparse_mla_fwd(q, kv, idx, scale, 512, tl_, sk)
    tgt = torch.zeros(idx.shape, dtype=torch.float32, device="cuda") if target else None
    assert ci.cuda_bwd_eligible(q, kv, 512, False)
    dq, dkv, dsink = ti.sparse_mla_bwd(q, kv, idx, scale, 512, tl_, sk, out, lse, dout, None,
                                       deterministic=False, target_out=tgt)
    torch.cuda.synchronize()
    r = dict(T=T, H=H, K=K, sink=sink, topk=topk, holes=holes, target=target,
             err_dq=rel(dq, qr.grad), err_dkv=rel(dkv, kvr.grad),
             nan=bool(torch.isnan(dq).any() or torch.isnan(dkv).any()))
    ok = r["err_dq"] < 2e-2 and r["err_dkv"] < 2e-2 and not r["nan"]
    if sink:
        r["err_dsink"] = rel(dsink, skr.grad)
        ok = ok and r["err_dsink"] < 2e-2
    if target:
        # sum_h exp(scale q_h . kv_id - lse_h) per valid slot, lse without the sink
        from megatron_dsa.kernels.sparse_mla.reference import slot_validity
        valid = slot_validity(idx, T, tl_)
        kg = kv.double()[idx.clamp_min(0).long()]  # [T, K, 576]
        s = torch.einsum("thd,tkd->thk", q.double(), kg) * scale
        p = torch.exp(s - lse.double()[:, :, None]).masked_fill(~valid[:, None, :], 0.0)
        p = torch.where(torch.isfinite(lse.double())[:, :, None], p, 0.0)
        r["err_target"] = rel(tgt, p.sum(1))
        ok = ok and r["err_target"] < 2e-2
    r["ok"] = ok
    return r


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--S", type=int, default=16384)
    ap.add_argument("--H", default="128,64")
    ap.add_argument("--k", type=int, default=2048)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--checks-only", action="store_true")
    ap.add_argument("--no-triton", action="store_true", help="skip timing the Triton backward")
    ap.add_argument("--variants", default="",
                    help="builds to time (kernel only) at the first H: N = SPARSE_MLA_BWD_DBG=N (timing "
                         "experiments, wrong results), or defines joined by '+' (e.g. register splits)")
    a = ap.parse_args()
    print(ptxas_report(ci._SRC_BWD), flush=True)
    print("lib:", ci.build_library(), flush=True)
    res = {"checks": [], "timing": []}
    cases = [
        dict(T=256, H=64, K=128, sink=False, topk=False, holes=False),
        dict(T=300, H=128, K=192, sink=True, topk=True, holes=False),
        dict(T=200, H=100, K=64, sink=True, topk=False, holes=True),
        dict(T=130, H=64, K=96, sink=False, topk=True, holes=True, target=True),
        dict(T=160, H=128, K=128, sink=True, topk=False, holes=False, target=True),
        dict(T=64, H=48, K=64, sink=False, topk=False, holes=False),
    ]
    for c in cases:
        r = check(**c)
        res["checks"].append(r)
        print("check", r, flush=True)
    ok = all(r["ok"] for r in res["checks"])
    if ok and not a.checks_only:
        for H in [int(h) for h in a.H.split(",")]:
            S, k = a.S, a.k
            q = torch.randn(S, H, 576, device="cuda").bfloat16()
            kv = torch.randn(S, 576, device="cuda").bfloat16()
            idx = causal_indices(S, k, "cuda")
            dout = torch.randn(S, H, 512, device="cuda").bfloat16()
            scale = 576 ** -0.5
            out, lse = ti.sparse_mla_fwd(q, kv, idx, scale, 512)
            args = (q, kv, idx, scale, 512, None, None, out, lse, dout)
            t_c = time_cuda(lambda: ti.sparse_mla_bwd(*args), reps=a.reps)
            if H == int(a.H.split(",")[0]) and a.variants:
                stats = torch.empty(2 * S * H, dtype=torch.float32, device="cuda")
                ti._bwd_stats_into(stats, None, out, dout, lse, None, None, 512)
                kargs = (q, kv, idx, scale, None, None, lse, dout, stats)
                t_k = time_cuda(lambda: ci.sparse_mla_bwd_cuda(*kargs), reps=a.reps)
                res["timing"].append(dict(S=S, H=H, variant=0, kernel_ms=t_k))
                print(f"kernel only (+ dkv zero-fill, lengths): {t_k:.2f} ms (bwd {t_c:.2f})", flush=True)
                for v in a.variants.split(","):  # N: SPARSE_MLA_BWD_DBG=N; else "A=1+B=2": those defines
                    defs = tuple(v.split("+")) if "=" in v else (f"SPARSE_MLA_BWD_DBG={v}",)
                    lib = ci.load_library(ci.build_library(defines=defs))
                    t_v = time_cuda(lambda: ci.sparse_mla_bwd_cuda(*kargs, lib=lib), reps=a.reps)
                    res["timing"].append(dict(S=S, H=H, variant=v, kernel_ms=t_v))
                    print(f"variant DBG={v}: {t_v:.2f} ms (kernel {t_k:.2f})", flush=True)
            t_t = None if a.no_triton else time_cuda(lambda: ti.sparse_mla_bwd_triton(*args), reps=a.reps)
            qg = q.clone().requires_grad_()
            kvg = kv.clone().requires_grad_()

            def fb():
                o, _ = ti.sparse_mla_triton(qg, kvg, idx, scale, 512, deterministic=False)
                o.backward(dout)

            t_fb = time_cuda(fb, reps=a.reps)
            fb_, ff = flops(S, H, k, "bwd"), flops(S, H, k, "fwd+bwd")
            row = dict(S=S, H=H, k=k, bwd_cuda_ms=t_c, bwd_cuda_tflops=fb_ / t_c / 1e9,
                       bwd_triton_ms=t_t, bwd_triton_tflops=(fb_ / t_t / 1e9) if t_t else None,
                       fwdbwd_ms=t_fb, fwdbwd_tflops=ff / t_fb / 1e9)
            res["timing"].append(row)
            print("time", row, flush=True)
            del q, kv, idx, dout, out, lse, qg, kvg
            torch.cuda.empty_cache()
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "check_sparse_mla_bwd_cuda.json"), "w") as fh:
        json.dump(res, fh, indent=1)
    print("\n| S | H | bwd CUDA ms | TFLOP/s | bwd Triton ms | TFLOP/s | fwd+bwd ms | TFLOP/s |")
    for r in res["timing"]:
        if "variant" in r:
            continue
        tt = f"{r['bwd_triton_ms']:.2f} | {r['bwd_triton_tflops']:.0f}" if r["bwd_triton_ms"] else "- | -"
        print(f"| {r['S']} | {r['H']} | {r['bwd_cuda_ms']:.2f} | {r['bwd_cuda_tflops']:.0f} | {tt} | "
              f"{r['fwdbwd_ms']:.2f} | {r['fwdbwd_tflops']:.0f} |")
    print("all checks ok:", ok)


if __name__ == "__main__":
    main()
