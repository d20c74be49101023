"""Compiler report + SASS instruction mix of our kernels at their real configurations (GPU).

PYTHONPATH=$PWD python3 benchmarks/kernel_report.py --out docs/receipts/logs/kernel_report.json
Launches each kernel once at a small real-layout shape (Dqk=576, d_v=512 / H_I=64, D_I=128),
then reads registers, spills and shared memory from the compiled kernel and disassembles its
cubin (Triton's bundled cuobjdump) to count the instructions that say which path it is on:
HGMMA (wgmma) vs HMMA (mma.sync), LDGSTS (cp.async) vs LDG, LDL/STL (spills), RED/ATOM.
"""

from __future__ import annotations

import argparse
import collections
import json
import re

import torch

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


def describe(name, kernel):
    d = {"regs": kernel.n_regs, "spills": kernel.n_spills, "shared": kernel.metadata.shared,
         "warps": kernel.metadata.num_warps, "stages": getattr(kernel.metadata, "num_stages", None)}
    try:
        d["sass"] = sass_mix(kernel)
    except Exception as e:  # noqa: BLE001
        d["sass"] = f"unavailable: {e}"[:200]
    return d


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    from megatron_dsa.kernels.indexer import triton_impl as ix
    from megatron_dsa.kernels.indexer_loss import sparse_triton as sl
    from megatron_dsa.kernels.sparse_mla import triton_impl as sm

    rep = {}
    dev = "cuda"
    T, K = 2048, 2048
    kv = torch.randn(T, 576, device=dev).bfloat16()
    idx = torch.stack([torch.randperm(T, device=dev)[:K] for _ in range(4)]).int()
    idx = idx.repeat(T // 4, 1)
    for H in (16, 128):
        q = torch.randn(T, H, 576, device=dev).bfloat16()
        out, lse = sm.sparse_mla_fwd_triton(q, kv, idx, 576**-0.5, 512)
        rep[f"sparse_mla_fwd_H{H}"] = describe("fwd", sm.LAST_KERNELS["fwd"])
        tgt = torch.zeros(T, K, device=dev)
        for emit in (False, True):
            sm.sparse_mla_bwd_triton(q, kv, idx, 576**-0.5, 512, None, None, out, lse,
                                     torch.randn_like(out), target_out=tgt if emit else None)
            for kname in ("bwd_stats", "bwd"):
                if kname in sm.LAST_KERNELS:
                    rep[f"sparse_mla_{kname}_H{H}" + ("_emit_target" if emit else "")] = describe(
                        kname, sm.LAST_KERNELS[kname])
    qi = torch.randn(1, T, 64, 128, device=dev).bfloat16()
    ki = torch.randn(1, T, 128, device=dev).bfloat16()
    wi = torch.randn(1, T, 64, device=dev)
    cfg = ix._score_cfg()
    buf = torch.empty(1, T, T, device=dev)
    qq, kk, ww, st, en, causal = ix._prep(qi, ki, wi, None, None)
    rep["indexer_score"] = describe("score", ix._launch_scores(qq, kk, ww, st, en, causal, True,
                                                               buf, 0, T, cfg))
    ids = ix.indexer_topk_triton(qi, ki, wi, K)[0].reshape(T, K).contiguous()
    s0 = torch.zeros(T, dtype=torch.int32, device=dev)
    e0 = torch.arange(1, T + 1, dtype=torch.int32, device=dev)
    sl.index_scores(qi, ki, wi, ids, s0, e0, True)
    rep["indexer_loss_index"] = describe("index", sl.LAST_KERNELS["index"])
    di = torch.randn(T, K, device=dev)
    sl.sparse_loss_backward(qi, ki, wi, ids, s0, e0, di, torch.ones(1, device=dev), True)
    rep["indexer_loss_bwd"] = describe("bwd", sl.LAST_KERNELS["bwd"])
    for n, d in rep.items():
        s = d["sass"] if isinstance(d["sass"], dict) else {}
        print(f"{n:38s} regs {d['regs']:3d} spills {d['spills']:4d} smem {d['shared']//1024:3d}K "
              f"warps {d['warps']} | " + " ".join(f"{k}={s[k]}" for k in
              ("HGMMA", "HMMA", "LDGSTS", "LDG", "LDL", "STL", "RED", "MUFU", "total") if k in s))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(rep, f, indent=1)


if __name__ == "__main__":
    main()
