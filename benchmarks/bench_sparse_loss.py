"""Timing breakdown of the fused sparse indexer loss (GPU only; tuning aid, not a receipt).

PYTHONPATH=$PWD python3 benchmarks/bench_sparse_loss.py --S 8192,32768
Prints per-kernel ms (lse pass, target pass, index, KL, backward), fwd+bwd with and without the
attention lse, and the compiler resource report of each kernel. ``--set key=val`` overrides
``sparse_triton.CONFIG`` entries (comma separated); ``--sweep`` takes ';'-separated sets.
"""

from __future__ import annotations

import argparse
import json

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import time_cuda  # noqa: E402
from megatron_dsa.kernels.indexer_loss import sparse_triton as st  # noqa: E402
from megatron_dsa.kernels.indexer_loss.triton_impl import indexer_loss_triton  # noqa: E402


def _ms(fn, reps=5, warmup=1):
    return time_cuda(fn, warmup=warmup, reps=reps)


def _report(kern):
    try:
        return {"regs": kern.n_regs, "spills": kern.n_spills, "smem": kern.metadata.shared}
    except Exception as e:  # noqa: BLE001
        return str(e)


def run_case(S, Hq, K, H=64, D=128, Dq=576, reps=5):
    from megatron_dsa.kernels.indexer.triton_impl import indexer_topk_triton

    g = torch.Generator(device="cuda").manual_seed(1)
    q = torch.randn(1, S, H, D, device="cuda", generator=g).bfloat16()
    k = torch.randn(1, S, D, device="cuda", generator=g).bfloat16()
    w = torch.randn(1, S, H, device="cuda", generator=g)
    query = torch.randn(1, S, Hq, Dq, device="cuda", generator=g).bfloat16()
    key = torch.randn(1, S, Dq, device="cuda", generator=g).bfloat16()
    idx, _ = indexer_topk_triton(q, k, w, K)
    scale = Dq ** -0.5
    R = S
    ids = idx.reshape(R, K).contiguous()
    s0, e0 = (x.reshape(R).contiguous() for x in __import__(
        "megatron_dsa.kernels.indexer.reference", fromlist=["x"]).causal_window(1, S, S, "cuda"))
    out = {"S": S, "Hq": Hq, "K": K}
    qy = query.reshape(R, Hq, Dq)
    geo = st._att_geometry(Dq)
    BH = min(st.CONFIG["att_bh"], st._p2(Hq))
    grid = (R, -(-Hq // BH))
    common = dict(BH=BH, BN=st.CONFIG["att_bn"], ATOMIC=grid[1] > 1, **geo, **st._prec(query.dtype),
                  num_warps=st.CONFIG["att_warps"], num_stages=st.CONFIG["att_stages"])
    args = (qy.stride(0), qy.stride(1), key.stride(1), S, S, Hq, K, scale * st.LOG2E)
    lse = torch.empty(R, Hq, device="cuda")
    att = torch.zeros(R, K, device="cuda")
    out["lse_ms"] = _ms(lambda: st._att_kernel[grid](qy, key, ids, s0, e0, lse, att, *args,
                                                     MODE=0, **common), reps)
    out["att_ms"] = _ms(lambda: st._att_kernel[grid](qy, key, ids, s0, e0, lse, att, *args,
                                                     MODE=1, **common), reps)
    kl, di = st.sparse_loss_forward(q, k, w, query, key, ids, s0, e0, scale, True, None, None)
    gg = torch.ones(1, device="cuda")
    out["fwd_total_ms"] = _ms(lambda: st.sparse_loss_forward(q, k, w, query, key, ids, s0, e0,
                                                            scale, True, None, None), reps)
    out["fwd_lse_ms"] = _ms(lambda: st.sparse_loss_forward(q, k, w, query, key, ids, s0, e0,
                                                          scale, True, None, None, lse), reps)
    out["bwd_ms"] = _ms(lambda: st.sparse_loss_backward(q, k, w, ids, s0, e0, di, gg, True), reps)
    qg, kg, wg = (x.detach().clone().requires_grad_() for x in (q, k, w))

    def fb(use_lse):
        def f():
            loss = indexer_loss_triton(qg, kg, wg, query, key, scale, 1.0, idx, True,
                                       attn_lse=lse.view(1, S, Hq) if use_lse else None)
            loss.backward()
        return f

    out["fwdbwd_ms"] = _ms(fb(False), reps)
    out["fwdbwd_lse_ms"] = _ms(fb(True), reps)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fb(True)()
    torch.cuda.synchronize()
    out["peak_gib"] = (torch.cuda.max_memory_allocated() - before) / 2**30
    out["flop_att_pass_T"] = 2 * R * Hq * K * Dq / 1e12
    out["att_tflops"] = out["flop_att_pass_T"] / out["att_ms"] * 1e3
    out["kernels"] = {n: _report(kk) for n, kk in st.LAST_KERNELS.items()}
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--S", default="8192,32768")
    ap.add_argument("--Hq", type=int, default=128)
    ap.add_argument("--K", type=int, default=2048)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--sweep", default="", help="';'-separated 'key=val,key=val' config sets")
    a = ap.parse_args()
    base = dict(st.CONFIG)
    sets = a.sweep.split(";") if a.sweep else [""]
    for cfg in sets:
        st.CONFIG.clear()
        st.CONFIG.update(base)
        for kv in filter(None, cfg.split(",")):
            key, val = kv.split("=")
            st.CONFIG[key] = int(val)
        for S in (int(x) for x in a.S.split(",")):
            try:
                r = run_case(S, a.Hq, a.K, reps=a.reps)
            except Exception as e:  # noqa: BLE001  (e.g. a config that needs too much smem)
                r = {"S": S, "error": str(e)[:300]}
            r["cfg"] = cfg
            print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
