"""Resource report of our compiled kernels at their real configurations (GPU).

    python3 benchmarks/kernel_report.py [--out kernel_report.json] [--no-sass] [--no-cuda]

Runs each op once at a small real-layout shape (sparse MLA: d_qk = 576, d_v = 512, 16 and 128
heads; indexer: 64 heads, head dim 128; the sparse indexer loss), through the Triton launchers
and the public functions with ``backend="triton"``, then reads every kernel Triton compiled from
its own JIT cache (``JITFunction.device_caches``; ``common.triton_kernels``) and reports per
kernel: name, registers per thread, spilled registers, shared memory, warps, stages, its
``tl.constexpr`` arguments, and (unless ``--no-sass``) the SASS instruction mix that says which
path it is on (Triton's bundled cuobjdump): HGMMA (wgmma) vs HMMA (mma.sync), LDGSTS (cp.async)
vs LDG, LDL/STL (spills), RED/ATOM. A kernel is listed under the first op that compiled it; the
constexprs that differ between specializations of one kernel are printed with each (two lines
that look alike differ in Triton's argument specialization, e.g. the alignment of an offset).

With ``--no-cuda`` left out it also lists the sm_90a CUDA library's kernels (registers, static
shared memory, stack / local memory per thread from ``cuobjdump --dump-resource-usage``) where the
library builds (Hopper, nvcc).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shutil
import subprocess
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import kernel_resources, triton_kernels  # noqa: E402

OPS = ("HGMMA", "HMMA", "LDGSTS", "LDG", "STG", "LDS", "STS", "LDSM", "LDL", "STL", "RED", "ATOM",
       "ATOMS", "MUFU", "BAR", "SHFL", "FFMA", "FMUL", "FADD", "WARPSYNC", "DEPBAR", "SYNCS")


def sass_mix(kernel):
    from triton.tools.disasm import get_sass

    sass = get_sass(kernel.asm["cubin"])
    mix = collections.Counter()
    for line in sass.splitlines():
        # "ctrl<TAB>[@pred ]OPCODE.modifiers operands;" (Triton's get_sass) or cuobjdump's
        # "/*addr*/ [@pred ]OPCODE ..." form
        m = re.match(r"(?:\S+\t|\s*/\*[0-9a-f]+\*/\s+)(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9]*)", line)
        if m:
            mix[m.group(1)] += 1
    return {op: mix.get(op, 0) for op in OPS} | {"total": sum(mix.values())}


def cuda_report():
    """The sm_90a CUDA library's kernels: ``cuobjdump --dump-resource-usage`` per function."""
    from megatron_dsa.kernels.sparse_mla import cuda_impl

    why = cuda_impl.unsupported_reason(torch.device("cuda", torch.cuda.current_device()), torch.bfloat16, 576, 512)
    if why is not None:
        return f"unavailable: {why}"
    lib = cuda_impl.build()
    tool = shutil.which("cuobjdump")
    if tool is None:  # the copy Triton ships
        import triton.backends.nvidia as nv

        cand = os.path.join(os.path.dirname(nv.__file__), "bin", "cuobjdump")
        tool = cand if os.path.exists(cand) else None
    if tool is None:
        return f"unavailable: no cuobjdump (library: {lib})"
    text = subprocess.run([tool, "--dump-resource-usage", str(lib)], capture_output=True, text=True).stdout
    names = [m.group(1) for m in re.finditer(r"Function (\S+):", text)]
    demangled = dict(zip(names, names))
    if names and shutil.which("c++filt"):
        out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True).stdout.split("\n")
        demangled.update({n: d for n, d in zip(names, out) if d})
    rows = []
    for m in re.finditer(r"Function (\S+):\s*(.*)", text):
        fields = dict(re.findall(r"([A-Z_]+(?:\[\d+\])?):(\d+)", m.group(2)))
        rows.append({"kernel": demangled.get(m.group(1), m.group(1)), "regs": int(fields.get("REG", -1)),
                     "static_shared": int(fields.get("SHARED", -1)), "stack": int(fields.get("STACK", -1)),
                     "local": int(fields.get("LOCAL", -1))})
    return {"library": str(lib), "kernels": rows}


def run_ops():
    """Each op once; yields the op's name after it ran (its kernels are then in Triton's cache)."""
    from megatron_dsa.kernels.indexer import triton_impl as ix
    from megatron_dsa.kernels.indexer_loss import indexer_loss, indexer_loss_from_attention
    from megatron_dsa.kernels.sparse_mla import triton_impl as sm

    dev = "cuda"
    T, K = 2048, 2048
    scale = 576 ** -0.5
    kv = torch.randn(T, 576, device=dev).bfloat16()
    idx = torch.stack([torch.randperm(T, device=dev)[:K] for _ in range(4)]).int()
    idx = idx.repeat(T // 4, 1)
    for H in (16, 128):
        q = torch.randn(T, H, 576, device=dev).bfloat16()
        out, lse = sm.sparse_mla_fwd_triton(q, kv, idx, scale, 512)
        yield f"sparse_mla_fwd_H{H}"
        dout = torch.randn_like(out)
        sm.sparse_mla_bwd_triton(q, kv, idx, scale, 512, None, None, out, lse, dout)
        yield f"sparse_mla_bwd_H{H}"
        sm.sparse_mla_bwd_triton(q, kv, idx, scale, 512, None, None, out, lse, dout,
                                 target_out=torch.zeros(T, K, device=dev))
        yield f"sparse_mla_bwd_H{H}_emit_target"
        sm.sparse_mla_bwd_triton(q, kv, idx, scale, 512, None, None, out, lse, dout, deterministic=True)
        yield f"sparse_mla_bwd_H{H}_deterministic"
    qi = torch.randn(1, T, 64, 128, device=dev).bfloat16()
    ki = torch.randn(1, T, 128, device=dev).bfloat16()
    wi = torch.randn(1, T, 64, device=dev) * 64 ** -0.5
    ids, _ = ix.indexer_topk_triton(qi, ki, wi, K)
    yield "indexer_topk"
    query = torch.randn(1, T, 16, 576, device=dev).bfloat16()
    key = torch.randn(1, T, 576, device=dev).bfloat16()
    qg, kg, wg = (x.clone().requires_grad_() for x in (qi, ki, wi))
    indexer_loss(qg, kg, wg, query, key, scale, 1.0, topk_indices=ids, sparse=True, backend="triton").backward()
    yield "indexer_loss_sparse"
    _, lse_a = sm.sparse_mla_fwd_triton(query[0], key[0], ids[0].contiguous(), scale, 512)
    indexer_loss(qg, kg, wg, query, key, scale, 1.0, topk_indices=ids, sparse=True, backend="triton",
                 attn_lse=lse_a.view(1, T, 16)).backward()
    yield "indexer_loss_sparse_attn_lse"
    loss, slot = indexer_loss_from_attention(qg, kg, wg, ids, 1.0)
    torch.autograd.backward([loss, slot], [torch.ones((), device=dev), torch.rand_like(slot)])
    yield "indexer_loss_from_attention"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="", help="write the report as JSON here")
    ap.add_argument("--no-sass", action="store_true", help="skip the SASS instruction mix")
    ap.add_argument("--no-cuda", action="store_true", help="skip the CUDA library's resource usage")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        print("kernel_report: needs a CUDA device")
        return 1
    from megatron_dsa.kernels.indexer import triton_impl as ix
    from megatron_dsa.kernels.indexer_loss import triton_impl as il
    from megatron_dsa.kernels.sparse_mla import triton_impl as sm

    mods = (sm, ix, il)
    seen = {id(k) for k in triton_kernels(*mods)}  # compiled before this report: not attributed
    rep = {"triton": {}}
    for op in run_ops():
        torch.cuda.synchronize()
        new = [k for k in triton_kernels(*mods) if id(k) not in seen]
        seen.update(id(k) for k in new)
        rows = []
        for k in new:
            d = kernel_resources(k)
            if not a.no_sass:
                try:
                    d["sass"] = sass_mix(k)
                except Exception as e:  # noqa: BLE001
                    d["sass"] = f"unavailable: {e}"[:200]
            rows.append(d)
        rep["triton"][op] = rows
    if not a.no_cuda:
        try:
            rep["cuda"] = cuda_report()
        except Exception as e:  # noqa: BLE001 - the Triton part stands on its own
            rep["cuda"] = f"unavailable: {type(e).__name__}: {e}"[:300]

    def num(x, w):
        return f"{x:{w}d}" if isinstance(x, int) else f"{'?':>{w}s}"

    # the constexprs that tell apart the specializations of one kernel (printed with each)
    by_name = collections.defaultdict(list)
    for rows in rep["triton"].values():
        for d in rows:
            by_name[d["kernel"]].append(d["constexprs"])
    varying = {name: sorted({k for c in cs for k in c if len({json.dumps(x.get(k)) for x in cs}) > 1})
               for name, cs in by_name.items()}
    for op, rows in rep["triton"].items():
        print(f"{op}:" + ("" if rows else " (no new kernels: it ran those listed above)"))
        for d in rows:
            s = d.get("sass") if isinstance(d.get("sass"), dict) else {}
            smem = d["shared"] // 1024 if isinstance(d["shared"], int) else "?"
            spec = ",".join(f"{k}={d['constexprs'].get(k)}" for k in varying[d["kernel"]])
            mix = " ".join(f"{k}={s[k]}" for k in ("HGMMA", "HMMA", "LDGSTS", "LDG", "LDL", "STL", "RED", "MUFU",
                                                    "total") if k in s)
            print(f"  {d['kernel'][:36]:36s} regs {num(d['regs'], 3)} spills {num(d['spills'], 4)} "
                  f"smem {smem:>3}K warps {d['warps']} stages {d['stages']}"
                  + (f" | {mix}" if mix else "") + (f" | {spec}" if spec else ""))
    cu = rep.get("cuda")
    if isinstance(cu, dict):
        print(f"CUDA library {cu['library']}:")
        for d in cu["kernels"]:
            print(f"  {d['kernel'][:60]:60s} regs {d['regs']:3d} static smem {d['static_shared']:6d} "
                  f"stack {d['stack']:4d} local {d['local']:4d}")
    elif cu is not None:
        print("CUDA library:", cu)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(rep, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
