"""Sparse MLA attention (absorbed layout) benchmark: ours vs Megatron-Core's TileLang and native
paths and cuDNN-frontend's backward, side by side in one process.

  python benchmarks/bench_sparse_mla.py                       # all impls, receipt in docs/receipts/
  python benchmarks/bench_sparse_mla.py --impls ours --H 128 --S 16384 --no-receipt
  python benchmarks/bench_sparse_mla.py --impls ours --configs '[{}, {"fwd_stages": 2}]'
  python benchmarks/bench_sparse_mla.py --report            # registers / spills / smem / wgmma

Cases: d_qk=576, d_v=512, bf16, k=2048 (default); indices: row t takes k random keys in [0, t]
(rows t < k padded with -1). FLOPs: fwd 2*S*H*k*(576+512), bwd 2*S*H*k*(2*512+3*576).
Each peer is run only if importable (else ``unsupported``); OOM -> ``oom``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import (device_name, measure_ceilings, peak_gib, run_guarded, time_cuda,  # noqa: F401,E402
                    versions, write_receipt)

DQK, DV = 576, 512


def flops(S, H, k, p):
    f = 2 * S * H * k * (DQK + DV)
    b = 2 * S * H * k * (2 * DV + 3 * DQK)
    return {"fwd": f, "bwd": b, "fwd+bwd": f + b}[p]


def causal_indices(S, K, device):
    out = torch.empty(S, K, dtype=torch.int32, device=device)
    keys = torch.arange(S, device=device)[None, :]
    for r0 in range(0, S, 1024):
        r1 = min(S, r0 + 1024)
        t = torch.arange(r0, r1, device=device)[:, None]
        score = torch.where(keys <= t, torch.rand(r1 - r0, S, device=device), -1.0)
        val, ix = score.topk(K, dim=1)
        out[r0:r1] = torch.where(val >= 0, ix, -1).int()
    return out


def make_case(S, H, k):
    dev = "cuda"
    q = torch.randn(S, H, DQK, device=dev, dtype=torch.bfloat16)
    kv = torch.randn(S, DQK, device=dev, dtype=torch.bfloat16)
    idx = causal_indices(S, k, dev)
    dout = torch.randn(S, H, DV, device=dev, dtype=torch.bfloat16)
    return q, kv, idx, dout


# ------------------------------------------------------------------------------------------
# implementations: each returns {"fwd": fn, "bwd": fn, "fwd+bwd": fn} (missing = unsupported)
# ------------------------------------------------------------------------------------------


def impl_ours(q, kv, idx, dout, scale, deterministic=False):
    from megatron_dsa.kernels.sparse_mla import triton_impl as ti

    fns = {"fwd": lambda: ti.sparse_mla_fwd(q, kv, idx, scale, DV)}
    out, lse = ti.sparse_mla_fwd(q, kv, idx, scale, DV)
    # the backward the autograd Function runs (CUDA sm_90a where eligible, else Triton)
    fns["bwd"] = lambda: ti.sparse_mla_bwd(q, kv, idx, scale, DV, None, None, out, lse, dout,
                                           deterministic=deterministic)

    def fb():
        qa, kva = q.detach().requires_grad_(), kv.detach().requires_grad_()
        o, _ = ti.sparse_mla_triton(qa, kva, idx, scale, DV, deterministic=deterministic)
        o.backward(dout)
        return qa.grad, kva.grad

    fns["fwd+bwd"] = fb
    return fns


def impl_tilelang(q, kv, idx, dout, scale):
    from megatron.core.transformer.experimental_attention_variant.ops import tilelang_dsa as td

    S, H, D = q.shape
    q4 = q.view(S, 1, H, D)
    k4 = kv.view(S, 1, 1, D)
    i3 = idx.view(1, S, -1)
    probe = td.fused_sparse_mla_absorbed(q4, k4, i3, scale, DV)
    if probe is None:
        raise RuntimeError("unsupported: fused_sparse_mla_absorbed returned None")
    del probe

    def fb():
        qa, ka = q4.detach().requires_grad_(), k4.detach().requires_grad_()
        o = td.fused_sparse_mla_absorbed(qa, ka, i3, scale, DV)
        o.backward(dout.view_as(o))
        return qa.grad, ka.grad

    return {"fwd": lambda: td.fused_sparse_mla_absorbed(q4, k4, i3, scale, DV), "fwd+bwd": fb}


def impl_native(q, kv, idx, dout, scale):
    from megatron.core.transformer.experimental_attention_variant import dsa as md

    S, H, D = q.shape
    q4 = q.view(S, 1, H, D)
    k4 = kv.view(S, 1, 1, D)
    i3 = idx.view(1, S, -1).long()

    def fb():
        qa, ka = q4.detach().requires_grad_(), k4.detach().requires_grad_()
        o = md._unfused_absorbed_dsa_fn(qa, ka, i3, scale, DV)
        o.backward(dout.view_as(o))
        return qa.grad, ka.grad

    return {"fwd": lambda: md._unfused_absorbed_dsa_fn(q4, k4, i3, scale, DV), "fwd+bwd": fb}


def impl_cudnn(q, kv, idx, dout, scale):
    from cudnn import DSA  # noqa: F401

    from megatron_dsa.kernels.sparse_mla import triton_impl as ti

    S, H, _ = q.shape
    out, lse = ti.sparse_mla_fwd(q, kv, idx, scale, DV)
    sink = torch.full((H,), float("-inf"), device=q.device, dtype=torch.float32)
    idx_c = idx.clamp_min(0).contiguous()
    tk = (idx >= 0).sum(1).int()  # causal_indices puts valid ids first (topk is sorted)
    return {"bwd": lambda: DSA.sparse_attention_backward_wrapper(
        q, kv, out, dout, lse, sink, idx_c, softmax_scale=scale, topk_length=tk)}


IMPLS = {"ours": ("megatron_dsa", impl_ours), "tilelang": ("mcore_tilelang", impl_tilelang),
         "native": ("mcore_native", impl_native), "cudnn": ("cudnn", impl_cudnn)}


def _grads(res):
    """(dq, dkv) from what a backward / fwd+bwd callable returns (tuple or cuDNN's dict)."""
    if hasattr(res, "keys"):
        return res["dq"], res["dkv"]
    return res[0], res[1]


def _rel(a, b, chunk=1 << 24):
    """||a - b|| / ||b|| over all elements, in chunks (no full-size float64 copies)."""
    a, b = a.reshape(-1), b.reshape(-1)
    num = den = 0.0
    for i in range(0, b.numel(), chunk):
        x, y = a[i:i + chunk].double(), b[i:i + chunk].double()
        num += float(((x - y) ** 2).sum())
        den += float((y ** 2).sum())
    return (num / den) ** 0.5 if den > 0 else float("nan")


def kernel_report():
    """Compiler resource report of the last-launched fused kernels."""
    from megatron_dsa.kernels.sparse_mla import triton_impl as ti

    rep = {}
    for name, k in ti.LAST_KERNELS.items():
        r = {}
        for attr in ("n_regs", "n_spills"):
            r[attr] = getattr(k, attr, None)
        md = getattr(k, "metadata", None)
        r["shared"] = getattr(md, "shared", None)
        r["num_warps"] = getattr(md, "num_warps", None)
        r["num_stages"] = getattr(md, "num_stages", None)
        ptx = k.asm.get("ptx", "")
        r["ptx_wgmma"] = ptx.count("wgmma.mma_async")
        r["ptx_mma_sync"] = ptx.count("mma.sync")
        r["ptx_atom_red"] = ptx.count("red.global") + ptx.count("atom.global")
        r["ptx_cp_async"] = ptx.count("cp.async")
        r["ptx_ld_local"] = ptx.count("ld.local")
        red = [ln.strip() for ln in ptx.splitlines() if "red.global" in ln or "atom.global" in ln]
        r["ptx_red_sample"] = red[0][:80] if red else None
        rep[name] = r
    return rep


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--impls", default="ours,tilelang,native,cudnn")
    ap.add_argument("--H", default="16,64,128")
    ap.add_argument("--S", default="4096,8192,16384")
    ap.add_argument("--k", type=int, default=2048)
    ap.add_argument("--passes", default="fwd,bwd,fwd+bwd")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--configs", default=None, help="JSON list of triton_impl.CONFIG overrides")
    ap.add_argument("--deterministic", action="store_true", help="also time ours in deterministic mode")
    ap.add_argument("--native-max-heads", type=int, default=16)
    ap.add_argument("--report", action="store_true")
    ap.add_argument("--out", default="docs/receipts/")
    ap.add_argument("--no-receipt", action="store_true")
    ap.add_argument("--no-ceilings", action="store_true")
    args = ap.parse_args()

    from megatron_dsa.kernels.sparse_mla import triton_impl as ti

    base_cfg = dict(ti.CONFIG)
    cfgs = json.loads(args.configs) if args.configs else [{}]
    impls = [s for s in args.impls.split(",") if s]
    passes = args.passes.split(",")
    rows, reports = [], {}
    ceilings = {} if args.no_ceilings else measure_ceilings()
    for S in [int(x) for x in args.S.split(",")]:
        for H in [int(x) for x in args.H.split(",")]:
            torch.cuda.empty_cache()
            q, kv, idx, dout = make_case(S, H, args.k)
            scale = DQK ** -0.5
            variants = []
            for key in impls:
                name, make = IMPLS[key]
                if key == "ours":
                    for ci, cfg in enumerate(cfgs):
                        label = name if len(cfgs) == 1 and not cfg else f"{name}[{json.dumps(cfg, sort_keys=True)}]"
                        variants.append((label, make, cfg, {}))
                    if args.deterministic:
                        variants.append((f"{name}[deterministic]", make, {}, {"deterministic": True}))
                elif key == "native" and H > args.native_max_heads:
                    continue
                else:
                    variants.append((name, make, None, {}))
            # gradients every backward is compared with: ours (tested against float64 autograd at
            # smaller sizes); a peer that disagrees computes something else
            ref_grads = None
            if "ours" in impls and any(p in passes for p in ("bwd", "fwd+bwd")):
                try:
                    ref_grads = _grads(impl_ours(q, kv, idx, dout, scale)["bwd"]())
                except Exception as e:  # noqa: BLE001
                    print(f"no reference gradients: {e}", flush=True)
            for label, make, cfg, kw in variants:
                if cfg is not None:
                    ti.CONFIG.clear()
                    ti.CONFIG.update(base_cfg)
                    ti.CONFIG.update(cfg)
                ti.LAST_KERNELS.clear()  # the report must only show this variant's kernels
                try:
                    fns = make(q, kv, idx, dout, scale, **kw)
                    err = None
                except ImportError as e:
                    fns, err = {}, f"unsupported ({type(e).__name__})"
                except torch.cuda.OutOfMemoryError:
                    fns, err = {}, "oom"
                except Exception as e:  # noqa: BLE001
                    msg = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
                    fns, err = {}, ("unsupported" if msg.startswith("unsupported") else f"error: {msg}")
                for p in passes:
                    case = {"S": S, "H": H, "D": DQK, "d_v": DV, "k": args.k, "pass": p}
                    if p not in fns:
                        rows.append({"impl": label, "case": case, "ms": None, "tflops": None,
                                     "peak_gib": None, "status": err or "unsupported"})
                        continue
                    fn = fns[p]

                    def measure(fn=fn, p=p):
                        fn()  # warm-up: the allocations the caching allocator then keeps
                        torch.cuda.synchronize()
                        st0 = torch.cuda.memory_stats()
                        ms = time_cuda(fn, warmup=0, reps=args.reps)
                        st1 = torch.cuda.memory_stats()
                        pk = peak_gib(fn)
                        res = {"ms": round(ms, 3), "tflops": round(flops(S, H, args.k, p) / ms / 1e9, 1),
                               "peak_gib": round(pk, 3)}
                        # cudaMalloc calls and allocator retries (cache flushes: cudaFree, a device
                        # sync) inside the timed calls, recorded when the timing includes them
                        for key, stat in (("cuda_mallocs_timed", "segment.all.allocated"),
                                          ("alloc_retries_timed", "num_alloc_retries")):
                            if st1.get(stat, 0) != st0.get(stat, 0):
                                res[key] = st1.get(stat, 0) - st0.get(stat, 0)
                        return res

                    r = run_guarded(measure)
                    rows.append({"impl": label, "case": case, "ms": r.get("ms"), "tflops": r.get("tflops"),
                                 "peak_gib": r.get("peak_gib"), "status": r["status"],
                                 **{k: r[k] for k in ("cuda_mallocs_timed", "alloc_retries_timed") if k in r}})
                    if ref_grads is not None and p in ("bwd", "fwd+bwd") and r["status"] == "ok":
                        try:
                            dq, dkv = _grads(fn())
                            rows[-1]["rel_dq_vs_ours"] = round(_rel(dq, ref_grads[0]), 5)
                            rows[-1]["rel_dkv_vs_ours"] = round(_rel(dkv, ref_grads[1]), 5)
                            del dq, dkv
                        except Exception as e:  # noqa: BLE001
                            rows[-1]["agreement_error"] = str(e)[:120]
                    print(json.dumps(rows[-1]), flush=True)
                if args.report and label.startswith("megatron_dsa"):
                    reports[f"{label} S={S} H={H}"] = kernel_report()
                del fns
                torch.cuda.empty_cache()
            del q, kv, idx, dout
        if not args.no_receipt and S != int(args.S.split(",")[-1]):
            # rewritten after every sequence length: a run cut short by a time limit keeps a
            # receipt of what it measured
            write_receipt("sparse_mla", rows, args.out, ceilings=ceilings)
    ti.CONFIG.clear()
    ti.CONFIG.update(base_cfg)
    if reports:
        print(json.dumps(reports, indent=1))
    if not args.no_receipt:
        paths = write_receipt("sparse_mla", rows, args.out, extra={"kernel_report": reports} if reports else None,
                              ceilings=ceilings)
        print("receipt:", paths)
    print(f"\nceilings: {ceilings}")
    print(f"{'impl':58s} {'S':>6s} {'H':>4s} {'pass':8s} {'ms':>9s} {'TFLOP/s':>8s} {'GiB':>7s} status")
    for r in rows:
        c = r["case"]
        print(f"{r['impl'][:58]:58s} {c['S']:6d} {c['H']:4d} {c['pass']:8s} "
              f"{(r['ms'] if r['ms'] is not None else float('nan')):9.3f} "
              f"{(r['tflops'] if r['tflops'] is not None else float('nan')):8.1f} "
              f"{(r['peak_gib'] if r['peak_gib'] is not None else float('nan')):7.3f} {r['status']}")


if __name__ == "__main__":
    main()
