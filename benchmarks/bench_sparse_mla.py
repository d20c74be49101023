"""Sparse MLA attention (absorbed layout) benchmark: ours vs Megatron-Core's TileLang and native
paths, cuDNN-frontend's backward and FlashMLA's forward (a wheel built from source by
``benchmarks/peers/build_flash_mla.sh``; its rows record its output and LSE against ours), side
by side in one process.

  python benchmarks/bench_sparse_mla.py                       # all impls, receipt in docs/receipts/
  python benchmarks/bench_sparse_mla.py --impls ours --H 128 --S 16384 --no-receipt
  python benchmarks/bench_sparse_mla.py --impls ours --ours-backends auto,triton   # CUDA vs Triton
  python benchmarks/bench_sparse_mla.py --report            # + registers / spills / smem of the Triton kernels

Cases: d_qk=576, d_v=512, bf16, k=2048 (default); indices: row t takes k random keys in [0, t]
(rows t < k padded with -1); with ``--ids-shared W`` the keys' random scores are a mix, weight W,
of a score shared by each block of 64 consecutive rows, so adjacent rows share keys as real
selections do (``W = 0``: independent rows). Ours runs ``row_packing`` auto (the CUDA backward
packs at <= 32 heads, the forward too up to ``cuda_impl.fwd_pack_max_keys(H)`` keys);
``--row-packing`` adds ``[row packing off]`` and ``[row packing on]`` at <= 32 heads; those
rows record ``union_frac``, the packed entries per valid (row,
slot) (1: nothing shared; 1/4 at 16 heads: four rows with the same keys), and the packing alone:
``pack_rows_ms`` (the CUDA kernel the CUDA passes use), ``pack_rows_triton_ms``, ``pack_rows_torch_ms``. FLOPs: fwd 2*S*H*k*(576+512), bwd 2*S*H*k*(2*512+3*576).
"ours" runs what ``sparse_mla(..., backend=B)`` runs for B in ``--ours-backends`` (default
``auto``: the sm_90a CUDA kernels on Hopper, else Triton): the fwd and bwd rows call the same
launchers directly (no autograd), the fwd+bwd row the public function; every row of ours records
its ``KernelChoice`` (``kernel``) and the receipt the ``format_status()`` table.
Each peer is run only if importable (else ``unsupported``); OOM -> ``oom``. Every row records
the SM clock range, peak power and clock-event reasons of its timed calls (``clock``): at 128
heads our kernels reach the H100's power cap, so ``--rest`` (the GPU idles before every row)
gives every implementation the same start (side_by_side.sh uses 1.5 s).
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

from common import (ClockLog, device_name, kernel_resources, kernel_times, measure_ceilings,  # noqa: F401,E402
                    peak_gib, run_guarded, time_cuda, triton_kernels, versions, write_receipt)

DQK, DV = 576, 512


def flops(S, H, k, p):
    f = 2 * S * H * k * (DQK + DV)
    b = 2 * S * H * k * (2 * DV + 3 * DQK)
    return {"fwd": f, "bwd": b, "fwd+bwd": f + b}[p]


def causal_indices(S, K, device, shared=0.0, block=64):
    out = torch.empty(S, K, dtype=torch.int32, device=device)
    keys = torch.arange(S, device=device)[None, :]
    for r0 in range(0, S, 1024):  # (1024 is a multiple of block)
        r1 = min(S, r0 + 1024)
        t = torch.arange(r0, r1, device=device)[:, None]
        u = torch.rand(r1 - r0, S, device=device)
        if shared:
            z = torch.rand((r1 - r0 + block - 1) // block, S, device=device)
            u = (1 - shared) * u + shared * z.repeat_interleave(block, 0)[: r1 - r0]
        score = torch.where(keys <= t, u, -1.0)
        val, ix = score.topk(K, dim=1)
        out[r0:r1] = torch.where(val >= 0, ix, -1).int()
    return out


def make_case(S, H, k, shared=0.0):
    dev = "cuda"
    q = torch.randn(S, H, DQK, device=dev, dtype=torch.bfloat16)
    kv = torch.randn(S, DQK, device=dev, dtype=torch.bfloat16)
    idx = causal_indices(S, k, dev, shared)
    dout = torch.randn(S, H, DV, device=dev, dtype=torch.bfloat16)
    return q, kv, idx, dout


# ------------------------------------------------------------------------------------------
# implementations: each returns {"fwd": fn, "bwd": fn, "fwd+bwd": fn} (missing = unsupported)
# ------------------------------------------------------------------------------------------


def union_frac(idx, heads):
    """Row packing's entries per valid (row, slot) for these ids at ``heads`` heads."""
    from megatron_dsa.kernels.sparse_mla.packing import pack_rows

    p = pack_rows(idx, idx.shape[0], heads)
    return round(p.count.sum().item() / max(int((idx >= 0).sum()), 1), 4)


def ours_launchers(q, kv, backend="auto", deterministic=False, row_packing=None):
    """``(choice, fwd, bwd)``: the :class:`KernelChoice` of ``sparse_mla(..., backend=backend)``
    for these inputs and the launchers (no autograd) it runs, called as
    ``fwd(q, kv, idx, scale) -> (out, lse)`` and
    ``bwd(q, kv, idx, scale, out, lse, dout, target_out=None) -> (dq, dkv, d_sink)``
    (``bwd`` is None for the reference backend, whose backward is autograd)."""
    from megatron_dsa.kernels.sparse_mla import select_backend, sparse_mla_reference
    from megatron_dsa.kernels.sparse_mla.cuda_impl import sparse_mla_bwd_cuda, sparse_mla_fwd_cuda
    from megatron_dsa.kernels.sparse_mla.triton_impl import sparse_mla_bwd_triton, sparse_mla_fwd_triton

    H, d_qk = q.shape[1], q.shape[2]
    choice = select_backend(backend, q.device, q.dtype, H, d_qk, DV, deterministic, kv.shape[0],
                            row_packing=row_packing)
    if choice.forward in ("cuda", "cuda-packed"):
        def fwd(q, kv, idx, scale):
            return sparse_mla_fwd_cuda(q, kv, idx, scale, packed=choice.forward == "cuda-packed")
    elif choice.forward == "triton":
        def fwd(q, kv, idx, scale):
            return sparse_mla_fwd_triton(q, kv, idx, scale, DV)
    else:
        def fwd(q, kv, idx, scale):
            return sparse_mla_reference(q, kv, idx, scale, DV)
    if choice.backward.startswith("cuda"):
        def bwd(q, kv, idx, scale, out, lse, dout, target_out=None):
            return sparse_mla_bwd_cuda(q, kv, idx, scale, None, None, out, lse, dout, target_out=target_out,
                                       packed="-packed" in choice.backward,
                                       deterministic=choice.backward.endswith("-deterministic"))
    elif choice.backward in ("triton", "triton-deterministic", "triton-packed"):
        def bwd(q, kv, idx, scale, out, lse, dout, target_out=None):
            return sparse_mla_bwd_triton(q, kv, idx, scale, DV, None, None, out, lse, dout,
                                         deterministic=choice.backward == "triton-deterministic",
                                         target_out=target_out, packed=choice.backward == "triton-packed")
    else:
        bwd = None
    return choice, fwd, bwd


def choice_str(choice) -> str:
    return f"{choice.requested}: fwd={choice.forward} bwd={choice.backward} ({choice.reason})"


def impl_ours(q, kv, idx, dout, scale, backend="auto", deterministic=False, row_packing=None):
    from megatron_dsa.kernels.sparse_mla import sparse_mla

    choice, fwd, bwd = ours_launchers(q, kv, backend, deterministic, row_packing)
    fns = {"fwd": lambda: fwd(q, kv, idx, scale)}
    if bwd is not None:
        with torch.no_grad():
            out, lse = fwd(q, kv, idx, scale)
        fns["bwd"] = lambda: bwd(q, kv, idx, scale, out, lse, dout)

    def fb():
        qa, kva = q.detach().requires_grad_(), kv.detach().requires_grad_()
        o, _ = sparse_mla(qa, kva, idx, scale, DV, backend=backend, deterministic=deterministic,
                          row_packing=row_packing)
        o.backward(dout)
        return qa.grad, kva.grad

    fns["fwd+bwd"] = fb
    fns["kernel"] = choice_str(choice)
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

    from megatron_dsa.kernels.sparse_mla import sparse_mla

    S, H, _ = q.shape
    with torch.no_grad():
        out, lse = sparse_mla(q, kv, idx, scale, DV)
    sink = torch.full((H,), float("-inf"), device=q.device, dtype=torch.float32)
    idx_c = idx.clamp_min(0).contiguous()
    tk = (idx >= 0).sum(1).int()  # causal_indices puts valid ids first (topk is sorted)
    return {"bwd": lambda: DSA.sparse_attention_backward_wrapper(
        q, kv, out, dout, lse, sink, idx_c, softmax_scale=scale, topk_length=tk)}


def impl_flashmla(q, kv, idx, dout, scale):
    """FlashMLA's sparse forward (``flash_mla_sparse_fwd``, the forward Megatron-Core's ``cudnn``
    backend calls), built from source by ``benchmarks/peers/build_flash_mla.sh``. Its sm90
    kernel takes 64 or 128 heads. The row's ``check`` is its output and LSE against ours."""
    from flash_mla import flash_mla_sparse_fwd

    from megatron_dsa.kernels.sparse_mla import sparse_mla

    S, H, _ = q.shape
    if H not in (64, 128):
        raise RuntimeError(f"unsupported: FlashMLA's sm90 sparse forward takes 64 or 128 heads, not {H}")
    kv3, idx3 = kv.unsqueeze(1), idx.unsqueeze(1).contiguous()

    def fwd():
        return flash_mla_sparse_fwd(q, kv3, idx3, scale, d_v=DV)

    with torch.no_grad():
        res = fwd()
        out, lse = sparse_mla(q, kv, idx, scale, DV)
    theirs_lse = res[2]
    fin = torch.isfinite(lse)
    check = {"rel_out_vs_ours": round(_rel(res[0], out), 5),
             "rel_lse_vs_ours": round(_rel(theirs_lse[fin], lse[fin]), 6),
             "empty_rows_agree": bool(torch.equal(torch.isfinite(theirs_lse), fin))}
    del res, out, lse
    return {"fwd": fwd, "check": check}


IMPLS = {"ours": ("megatron_dsa", impl_ours), "tilelang": ("mcore_tilelang", impl_tilelang),
         "native": ("mcore_native", impl_native), "cudnn": ("cudnn", impl_cudnn),
         "flashmla": ("flashmla", impl_flashmla)}


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
    """Registers / spills / shared memory of every sparse MLA Triton kernel compiled so far (read
    from Triton's JIT cache; the CUDA kernels: ``kernel_report.py``)."""
    from megatron_dsa.kernels.sparse_mla import triton_impl as ti

    return [kernel_resources(k) for k in triton_kernels(ti)]


def profile_step(fn, out_dir, tag):
    """One call of ``fn`` under the torch profiler: its wall time on CUDA events, the sum of the
    device times of the kernels it launched and the five longest kernels; the table of every
    kernel goes to ``out_dir``. A step much longer than its kernel sum waits on something else
    (allocator, host), a kernel longer than when timed alone ran slower in this process."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
    top = sorted(kernel_times(prof)[0].items(), key=lambda kv: -kv[1][1])
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"profile_fwdbwd_{tag}.txt"), "w") as f:
        for k, (n, ms) in top:
            f.write(f"{ms:10.3f} ms {n:4d}x {k[:120]}\n")
        f.write(prof.key_averages().table(sort_by="cpu_time_total", row_limit=25))
    return {"step_ms": round(a.elapsed_time(b), 3), "kernel_sum_ms": round(sum(v[1] for _, v in top), 3),
            "top": [[k[:60], round(v[1], 3)] for k, v in top[:5]]}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--impls", default="ours,tilelang,native,cudnn,flashmla")
    ap.add_argument("--H", default="16,64,128")
    ap.add_argument("--S", default="4096,8192,16384")
    ap.add_argument("--k", type=int, default=2048)
    ap.add_argument("--passes", default="fwd,bwd,fwd+bwd")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--ours-backends", default="auto",
                    help="comma list of sparse_mla backends timed as ours (auto, cuda, triton, reference); "
                         "auto is 'megatron_dsa', the others 'megatron_dsa[B]'")
    ap.add_argument("--deterministic", action="store_true",
                    help="also time ours (backend auto) with the deterministic backward")
    ap.add_argument("--native-max-heads", type=int, default=16)
    ap.add_argument("--row-packing", action="store_true",
                    help="also run ours with row_packing=False and =True (<= 32 heads)")
    ap.add_argument("--ids-shared", type=float, default=0.0,
                    help="weight of the score shared by 64 consecutive rows (0: independent rows)")
    ap.add_argument("--report", action="store_true",
                    help="registers / spills / shared memory of the Triton kernels compiled by the run")
    ap.add_argument("--out", default="docs/receipts/")
    ap.add_argument("--no-receipt", action="store_true")
    ap.add_argument("--no-ceilings", action="store_true")
    ap.add_argument("--rest", type=float, default=0.0,
                    help="seconds the GPU idles before each timed row (same start for every impl)")
    ap.add_argument("--profile-dir", default=None,
                    help="profile one call of ours' fwd+bwd per case: kernel times vs the step")
    ap.add_argument("--pack-chunk-mib", type=int, default=None,
                    help="the row-packed backward's packing per launch (cuda_impl.PACK_CHUNK_BYTES, MiB)")
    ap.add_argument("--no-l2-order", action="store_true",
                    help="ours' backward in the ids' own order and one launch at every S (cuda_impl.l2_order "
                         "off): the other side of the L2 order's A/B")
    ap.add_argument("--bwd-block-keys", type=int, choices=(32, 64), default=None,
                    help="ours' backward (unpacked and row-packed, both modes; deterministic on 32: the "
                         "32-key kernel's fp32 lanes; on 64: the integer adds) on the 32- or 64-key kernel "
                         "(default: cuda_impl.bwd_block_keys, 64 in both modes): the A/B of the kernels "
                         "and of the deterministic modes")
    ap.add_argument("--no-l2-hints", action="store_true",
                    help="the 64-key backward without its L2 cache hints (cuda_impl.l2_hints off)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_sparse_mla: needs a CUDA device")
        return 1
    if args.pack_chunk_mib is not None:
        if args.pack_chunk_mib < 1:
            raise SystemExit(f"--pack-chunk-mib must be >= 1, got {args.pack_chunk_mib}")
        from megatron_dsa.kernels.sparse_mla import cuda_impl

        cuda_impl.PACK_CHUNK_BYTES = args.pack_chunk_mib << 20
    if args.no_l2_order:
        from megatron_dsa.kernels.sparse_mla import cuda_impl

        cuda_impl.l2_order = lambda device, num_keys, key_bytes=0: False
    if args.bwd_block_keys is not None:
        from megatron_dsa.kernels.sparse_mla import cuda_impl

        keys = args.bwd_block_keys
        cuda_impl.bwd_block_keys = lambda deterministic: keys
    if args.no_l2_hints:
        from megatron_dsa.kernels.sparse_mla import cuda_impl

        cuda_impl.l2_hints = lambda device, num_keys: False

    impls = [s for s in args.impls.split(",") if s]
    backends = [b for b in args.ours_backends.split(",") if b]
    passes = args.passes.split(",")
    rows, reports = [], {}
    # what backend="auto" runs on this machine, and why (the receipt keeps it)
    try:
        from megatron_dsa.kernels import format_status

        kernel_status = format_status()
    except Exception as e:  # noqa: BLE001 - the benchmark still runs; the rows say what ran
        kernel_status = f"unavailable: {type(e).__name__}: {e}"
    print(kernel_status, flush=True)
    ceilings = {} if args.no_ceilings else measure_ceilings()
    clog = ClockLog()

    def annotate():
        # the SM clock / power / clock-event reasons seen during each row's timed calls (the log
        # read once per call)
        samples = clog.samples()
        for r in rows:
            if "timed_span" in r and "clock" not in r:
                c = clog.during(*r["timed_span"], samples=samples)
                if c is not None:
                    r["clock"] = c
    for S in [int(x) for x in args.S.split(",")]:
        for H in [int(x) for x in args.H.split(",")]:
            torch.cuda.empty_cache()
            q, kv, idx, dout = make_case(S, H, args.k, args.ids_shared)
            ufrac = union_frac(idx, H) if H <= 32 else None
            pack_ms = None
            if args.row_packing and H <= 32:  # the packing alone (part of every packed pass): the
                # CUDA kernel the CUDA kernels use, the Triton one, and the torch-ops reference
                from megatron_dsa.kernels.sparse_mla import cuda_impl
                from megatron_dsa.kernels.sparse_mla.packing import pack_rows_reference, pack_rows_triton

                packers = (cuda_impl.pack_rows_cuda if cuda_impl.library_error() is None else None,
                           pack_rows_triton, pack_rows_reference)
                pack_ms = [round(time_cuda(lambda f=f: f(idx, S, H), warmup=1, reps=args.reps), 3) if f else None
                           for f in packers]
            scale = DQK ** -0.5
            variants = []
            for key in impls:
                name, make = IMPLS[key]
                if key == "ours":
                    for b in backends:
                        variants.append((name if b == "auto" else f"{name}[{b}]", make, {"backend": b}))
                    if args.deterministic:
                        variants.append((f"{name}[deterministic]", make, {"deterministic": True}))
                    if args.row_packing and H <= 32:
                        variants.append((f"{name}[row packing off]", make, {"row_packing": False}))
                        variants.append((f"{name}[row packing on]", make, {"row_packing": True}))
                elif key == "native" and H > args.native_max_heads:
                    continue
                else:
                    variants.append((name, make, {}))
            # gradients every backward is compared with: ours (tested against float64 autograd at
            # smaller sizes); a peer that disagrees computes something else
            ref_grads = None
            if "ours" in impls and any(p in passes for p in ("bwd", "fwd+bwd")):
                try:
                    ref_grads = _grads(impl_ours(q, kv, idx, dout, scale)["bwd"]())
                except Exception as e:  # noqa: BLE001
                    print(f"no reference gradients: {e}", flush=True)
            for label, make, kw in variants:
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
                kernel = fns.pop("kernel", None)  # ours: the KernelChoice it runs
                check = fns.pop("check", None)  # a peer's output compared with ours
                for p in passes:
                    case = {"S": S, "H": H, "D": DQK, "d_v": DV, "k": args.k, "pass": p}
                    if args.ids_shared:
                        case["ids_shared"] = args.ids_shared
                    if ufrac is not None:
                        case["union_frac"] = ufrac
                    if pack_ms is not None:
                        case["pack_rows_ms"], case["pack_rows_triton_ms"], case["pack_rows_torch_ms"] = pack_ms
                    if p not in fns:
                        rows.append({"impl": label, "case": case, "ms": None, "tflops": None,
                                     "peak_gib": None, "status": err or "unsupported",
                                     **({"kernel": kernel} if kernel else {})})
                        continue
                    fn = fns[p]

                    def measure(fn=fn, p=p):
                        if args.rest:
                            # every row starts from the same idle GPU: the power cap averages over
                            # time, so a row timed right after heavy rows can run at a lower clock
                            torch.cuda.synchronize()
                            time.sleep(args.rest)
                        fn()  # warm-up: the allocations the caching allocator then keeps
                        torch.cuda.synchronize()
                        st0 = torch.cuda.memory_stats()
                        free0 = torch.cuda.mem_get_info()[0]
                        t0 = time.time()
                        ms = time_cuda(fn, warmup=0, reps=args.reps)
                        t1 = time.time()
                        st1 = torch.cuda.memory_stats()
                        pk = peak_gib(fn)
                        # wall-clock span of the timed calls (annotate() looks up the SM clock and
                        # power the ClockLog saw in it) and the device's free memory
                        res = {"ms": round(ms, 3), "tflops": round(flops(S, H, args.k, p) / ms / 1e9, 1),
                               "peak_gib": round(pk, 3), "timed_span": [round(t0, 2), round(t1, 2)],
                               "free_gib": round(free0 / 2**30, 2)}
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
                                 **{k: r[k] for k in ("cuda_mallocs_timed", "alloc_retries_timed",
                                                      "timed_span", "free_gib") if k in r},
                                 **({"kernel": kernel} if kernel else {}), **(check or {})})
                    if args.profile_dir and label == "megatron_dsa" and p == "fwd+bwd" and r["status"] == "ok":
                        try:
                            rows[-1]["profile"] = profile_step(fn, args.profile_dir, f"S{S}_H{H}")
                        except Exception as e:  # noqa: BLE001 - a diagnostic must not end the run
                            rows[-1]["profile"] = f"error: {str(e)[:120]}"
                    if ref_grads is not None and p in ("bwd", "fwd+bwd") and r["status"] == "ok":
                        try:
                            dq, dkv = _grads(fn())
                            rows[-1]["rel_dq_vs_ours"] = round(_rel(dq, ref_grads[0]), 5)
                            rows[-1]["rel_dkv_vs_ours"] = round(_rel(dkv, ref_grads[1]), 5)
                            del dq, dkv
                        except Exception as e:  # noqa: BLE001
                            rows[-1]["agreement_error"] = str(e)[:120]
                    print(json.dumps(rows[-1]), flush=True)
                del fns
                torch.cuda.empty_cache()
            del q, kv, idx, dout
        if not args.no_receipt and S != int(args.S.split(",")[-1]):
            # rewritten after every sequence length: a run cut short by a time limit keeps a
            # receipt of what it measured
            annotate()
            write_receipt("sparse_mla", rows, args.out, extra={"kernel_status": kernel_status}, ceilings=ceilings)
    if args.report:
        try:
            reports = kernel_report()
        except Exception as e:  # noqa: BLE001 - a diagnostic must not lose the receipt
            reports = f"unavailable: {type(e).__name__}: {e}"
        print(json.dumps(reports, indent=1))
    annotate()
    clog.close()
    if not args.no_receipt:
        extra = {"kernel_status": kernel_status}
        if reports:
            extra["kernel_report"] = reports
        paths = write_receipt("sparse_mla", rows, args.out, extra=extra, ceilings=ceilings)
        print("receipt:", paths)
    print(f"\nceilings: {ceilings}")
    print(f"{'impl':40s} {'S':>6s} {'H':>4s} {'pass':8s} {'ms':>9s} {'TFLOP/s':>8s} {'GiB':>7s} "
          f"{'SM MHz':>10s} {'W max':>5s} status")
    for r in rows:
        c = r["case"]
        ck = r.get("clock") or {}
        mhz = "-".join(str(int(x)) for x in ck["sm_mhz"]) if ck else ""
        print(f"{r['impl'][:40]:40s} {c['S']:6d} {c['H']:4d} {c['pass']:8s} "
              f"{(r['ms'] if r['ms'] is not None else float('nan')):9.3f} "
              f"{(r['tflops'] if r['tflops'] is not None else float('nan')):8.1f} "
              f"{(r['peak_gib'] if r['peak_gib'] is not None else float('nan')):7.3f} "
              f"{mhz:>10s} {ck.get('power_w_max', float('nan')):5.0f} {r['status']}"
              + (f"  [{r['kernel']}]" if r.get("kernel") and c["pass"] == "fwd+bwd" else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
