"""Bring-up check of the sm_90a CUDA sparse MLA forward on a GPU: build, correctness against the
plain-PyTorch reference at small sizes, then ours (CUDA) vs ours (Triton) forward at S=16K, and
optionally timing-only builds that leave a stage out (``--variants``, see SPARSE_MLA_DBG).

    PYTHONPATH=$PWD python3 benchmarks/check_sparse_mla_cuda.py [--S 16384] [--H 64,128]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench_sparse_mla import causal_indices, flops  # noqa: E402
from common import time_cuda  # noqa: E402

from megatron_dsa.kernels.sparse_mla import cuda_impl as ci  # noqa: E402
from megatron_dsa.kernels.sparse_mla import triton_impl as ti  # noqa: E402
from megatron_dsa.kernels.sparse_mla.reference import sparse_mla_reference  # noqa: E402


def ptxas_report(src=None) -> str:
    """ptxas register / spill lines of one kernel source (default: the forward)."""
    proc = subprocess.run(
        [ci._nvcc(), "-O3", "-std=c++17", "-gencode=arch=compute_90a,code=sm_90a", "-Xptxas", "-v",
         "-c", "-o", "/tmp/sparse_mla_check.o", str(src or ci._SRC)], capture_output=True, text=True)
    return "\n".join(l for l in proc.stderr.splitlines() if "registers" in l or "spill" in l
                     or "error" in l or "wgmma" in l.lower())


def check(T, H, K, sink, topk, seed=0, cluster=False):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(T, H, 576, device="cuda", generator=g).bfloat16()
    kv = torch.randn(T, 576, device="cuda", generator=g).bfloat16()
    idx = causal_indices(T, K, "cuda")
    idx[min(5, T - 1)] = -1  # one empty row
    tl_ = torch.randint(0, K + 1, (T,), device="cuda", generator=g).int() if topk else None
    sk = torch.randn(H, device="cuda", generator=g) if sink else None
    scale = 576 ** -0.5
    o_ref, l_ref = sparse_mla_reference(q.float(), kv.float(), idx, scale, 512, tl_, sk)
    o, l = ci.sparse_mla_fwd_cuda(q, kv, idx, scale, tl_, sk, cluster=cluster)
    torch.cuda.synchronize()
    fin = torch.isfinite(l_ref)
    err_o = ((o.float() - o_ref).abs().max() / o_ref.abs().max().clamp_min(1e-6)).item()
    err_l = (l[fin] - l_ref[fin]).abs().max().item() if fin.any() else 0.0
    lse_inf_ok = bool(torch.equal(torch.isneginf(l), torch.isneginf(l_ref)))
    nan = bool(torch.isnan(o).any() or torch.isnan(l).any())
    return dict(T=T, H=H, K=K, sink=sink, topk=topk, cluster=cluster, err_out=err_o,
                err_lse=err_l, lse_inf_ok=lse_inf_ok, nan=nan,
                ok=err_o < 2e-2 and err_l < 2e-2 and lse_inf_ok and not nan)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--S", type=int, default=16384)
    ap.add_argument("--H", default="64,128")
    ap.add_argument("--k", type=int, default=2048)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--cluster", action="store_true",
                    help="also check and time the 2-CTA cluster variant (run under `timeout`: not yet "
                         "run on a GPU, a protocol bug would hang)")
    ap.add_argument("--checks-only", action="store_true")
    ap.add_argument("--variants", default="",
                    help="SPARSE_MLA_DBG builds to time at the last H (timing experiments, wrong results)")
    a = ap.parse_args()
    print(ptxas_report(), flush=True)
    print("lib:", ci.build_library(), flush=True)
    res = {"checks": [], "timing": []}
    cases = [(256, 64, 128, False, False), (300, 128, 192, True, True), (200, 100, 64, True, False),
             (130, 64, 96, False, True), (64, 48, 64, False, False)]
    for cl in ([False, True] if a.cluster else [False]):
        for c in cases:
            r = check(*c, cluster=cl)
            res["checks"].append(r)
            print("check", r, flush=True)
    if a.checks_only:
        print("all checks ok:", all(r["ok"] for r in res["checks"]))
        return
    if all(r["ok"] for r in res["checks"]):
        for H in [int(h) for h in a.H.split(",")]:
            S, k = a.S, a.k
            q = torch.randn(S, H, 576, device="cuda").bfloat16()
            kv = torch.randn(S, 576, device="cuda").bfloat16()
            idx = causal_indices(S, k, "cuda")
            scale = 576 ** -0.5
            t_c = time_cuda(lambda: ci.sparse_mla_fwd_cuda(q, kv, idx, scale), reps=a.reps)
            t_t = time_cuda(lambda: ti.sparse_mla_fwd_triton(q, kv, idx, scale, 512), reps=a.reps)
            t_cl = None
            if a.cluster and 64 < H <= 128:
                t_cl = time_cuda(lambda: ci.sparse_mla_fwd_cuda(q, kv, idx, scale, cluster=True), reps=a.reps)
                print(f"S={S} H={H} cluster {t_cl:.2f} ms, {flops(S, H, k, 'fwd') / t_cl / 1e9:.0f} TFLOP/s "
                      f"(plain {t_c:.2f} ms)", flush=True)
            oc, lc = ci.sparse_mla_fwd_cuda(q, kv, idx, scale)
            ot, lt = ti.sparse_mla_fwd_triton(q, kv, idx, scale, 512)
            diff = ((oc.float() - ot.float()).abs().max()).item()
            f = flops(S, H, k, "fwd")
            row = dict(S=S, H=H, k=k, cuda_ms=t_c, cluster_ms=t_cl, triton_ms=t_t, cuda_tflops=f / t_c / 1e9,
                       triton_tflops=f / t_t / 1e9, max_abs_diff_vs_triton=diff)
            res["timing"].append(row)
            print("time", row, flush=True)
            if H == int(a.H.split(",")[-1]) and a.variants:
                for v in [int(x) for x in a.variants.split(",")]:
                    lib = ci.load_library(ci.build_library(defines=(f"SPARSE_MLA_DBG={v}",)))
                    t_v = time_cuda(lambda: ci.sparse_mla_fwd_cuda(q, kv, idx, scale, lib=lib), reps=a.reps)
                    res["timing"].append(dict(S=S, H=H, k=k, variant=v, cuda_ms=t_v))
                    print(f"variant DBG={v}: {t_v:.2f} ms (default {t_c:.2f})", flush=True)
            del q, kv, idx
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "check_sparse_mla_cuda.json"), "w") as fh:
        json.dump(res, fh, indent=1)
    print("\n| S | H | CUDA ms | TFLOP/s | Triton ms | TFLOP/s |")
    for r in res["timing"]:
        if "variant" in r:
            continue
        print(f"| {r['S']} | {r['H']} | {r['cuda_ms']:.2f} | {r['cuda_tflops']:.0f} | "
              f"{r['triton_ms']:.2f} | {r['triton_tflops']:.0f} |")
    print("all checks ok:", all(r["ok"] for r in res["checks"]))


if __name__ == "__main__":
    main()
