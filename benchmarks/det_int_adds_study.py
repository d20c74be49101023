"""Order-free integer dkv adds for a deterministic sparse-MLA backward: their rounding error,
simulated in float64 on the CPU (an experiment; no kernel).

Integer adds are associative (two's complement wraps, so only the final sum must fit), so int32
fixed-point adds into the one L2-resident dkv workspace give the same bits in any order, at the
fp32 adds' line requests per value. Each key s gets a power-of-two quantum
``q_s = 2^(ceil(log2 B_s) - 30)`` from a bound ``B_s`` on the sum of its contributions' magnitudes,
so every value and the final sum fit in 31 bits. Bounds compared (each order-free to compute):

* ``dS pass``: a first pass with S, dP and dS (the backward's first half, no dKV):
  ``sum_t [ sum_h |dS| max_c |q| + P max_c |dO| ]`` (the fp32-quantum study's bound, commit ad335c8);
* ``fwd max x count``: S and P only (the forward's work): the key's count times its largest
  head-summed P, times ``||v_s|| A + B`` with A, B global maxima of the backward's row statistics
  (``|dP| <= ||dO|| ||v||``);
* ``fwd sum of P``: the same with the key's sum over rows of the head-summed P;
* ``fwd P x row stats``: that sum weighted per row by the row's own statistics (needs the head-summed
  P per slot kept from the first pass);

against plain fp32 adds (one order; not reproducible) and the earlier fp32-quantum variant (24 bits).

    python benchmarks/det_int_adds_study.py [--T 2048] [--H 16] [--k 256] [--temp 1 3]
"""

from __future__ import annotations

import argparse
import math

import torch

D_QK, D_V = 576, 512


def causal_ids(T, k, gen):
    """[T, k] int64: row t selects min(t + 1, k) distinct keys of [0, t], -1 pads."""
    ids = torch.full((T, k), -1, dtype=torch.int64)
    for t in range(T):
        n = min(t + 1, k)
        ids[t, :n] = torch.randperm(t + 1, generator=gen)[:n]
    return ids


def contributions(q, kv, dO, lse, delta, ids, scale, r0, r1):
    """Per (row, slot) of rows [r0, r1): the fp32 contribution [R, k, 576] to dkv, the first-pass
    bounds (dS pass, P pass) [R, k], and the keys [R, k]."""
    idx = ids[r0:r1]
    valid = idx >= 0
    kv_g = kv[idx.clamp_min(0)]  # [R, k, 576]
    qr, dOr = q[r0:r1], dO[r0:r1]  # [R, H, 576], [R, H, 512]
    s = torch.einsum("rhd,rkd->rhk", qr, kv_g) * scale
    p = torch.exp(s - lse[r0:r1, :, None]) * valid[:, None, :]
    dp = torch.einsum("rhd,rkd->rhk", dOr, kv_g[..., :D_V])
    ds = p * (dp - delta[r0:r1, :, None]) * scale
    # the kernel's operands: dS and P in bf16, q / dO bf16 already; fp32 accumulation (one rounding)
    ds_b = ds.to(torch.bfloat16).double()
    p_b = p.to(torch.bfloat16).double()
    c = torch.einsum("rhk,rhd->rkd", ds_b, qr)
    c[..., :D_V] += torch.einsum("rhk,rhd->rkd", p_b, dOr)
    c = c.float().double()
    c_true = torch.einsum("rhk,rhd->rkd", ds, qr)  # the same without the operands' bf16 rounding
    c_true[..., :D_V] += torch.einsum("rhk,rhd->rkd", p, dOr)
    qmax = qr.abs().amax(-1)  # [R, H]
    dmax = dOr.abs().amax(-1)
    b_ds = torch.einsum("rhk,rh->rk", ds.abs(), qmax) + torch.einsum("rhk,rh->rk", p, dmax)
    dp_bound = dOr.norm(dim=-1)[:, :, None] * kv_g[..., :D_V].norm(dim=-1)[:, None, :]  # >= |dP|
    b_p = torch.einsum("rhk,rhk->rk", p, (dp_bound + delta[r0:r1, :, None].abs()) * scale * qmax[:, :, None]) + \
        torch.einsum("rhk,rh->rk", p, dmax)
    tight = c.abs().amax(-1)
    return c, {"tight": tight, "dS pass": b_ds, "P pass": b_p}, idx, valid, c_true



def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--T", type=int, default=2048); ap.add_argument("--H", type=int, default=16)
    ap.add_argument("--k", type=int, default=256); ap.add_argument("--temp", type=float, nargs="+", default=[1.0, 3.0])
    ap.add_argument("--chunk", type=int, default=64); ap.add_argument("--seed", type=int, default=0); ap.add_argument("--skip-f32q", action="store_true")
    a = ap.parse_args()
    gen = torch.Generator().manual_seed(a.seed)
    T, H, k = a.T, a.H, a.k
    ids = causal_ids(T, k, gen)
    scale = 1 / math.sqrt(D_QK)
    print(f"T = {T}, H = {H}, k = {k}")
    print("| temp | variant | rel. error (Frobenius) | max error / key's max | bf16 flips | bound / key's max (log2, median) |")
    print("|---|---|---|---|---|---|")
    for temp in a.temp:
        bf = lambda *s: torch.randn(*s, generator=gen).to(torch.bfloat16).double()
        q = (bf(T, H, D_QK) * temp).to(torch.bfloat16).double(); kv = bf(T, D_QK); dO = bf(T, H, D_V)
        lse = torch.empty(T, H, dtype=torch.float64); delta = torch.empty(T, H, dtype=torch.float64)
        phs = []
        maxP = torch.zeros(T, dtype=torch.float64); count = torch.zeros(T, dtype=torch.float64)
        for r0 in range(0, T, a.chunk):
            r1 = min(T, r0 + a.chunk); idx = ids[r0:r1]; valid = idx >= 0; kv_g = kv[idx.clamp_min(0)]
            s = torch.einsum("rhd,rkd->rhk", q[r0:r1], kv_g) * scale
            s = s.masked_fill(~valid[:, None, :], float("-inf"))
            lse[r0:r1] = torch.logsumexp(s, -1)
            p = torch.softmax(s, -1)
            o = torch.einsum("rhk,rkd->rhd", p, kv_g[..., :D_V])
            delta[r0:r1] = (dO[r0:r1] * o).sum(-1)
            # the forward's per-key max over rows of the head-summed P (an order-free atomic max)
            ph = p.sum(1)  # [R, k]
            key = idx[valid]
            maxP.scatter_reduce_(0, key, ph[valid], reduce="amax")
            phs.append((r0, r1, ph))
            count.index_add_(0, key, torch.ones_like(key, dtype=torch.float64))
        # the backward's global row statistics (order-free max reductions)
        qmax = q.abs().amax(-1); dmax = dO.abs().amax(-1)
        A = (scale * dO.norm(dim=-1) * qmax).max()
        B = (scale * delta.abs() * qmax + dmax).max()
        vnorm = kv[:, :D_V].norm(dim=-1)
        bnd_fwd = count * maxP * (vnorm * A + B)
        At = (scale * dO.norm(dim=-1) * qmax).amax(-1); Bt = (scale * delta.abs() * qmax + dmax).amax(-1)
        sumP = torch.zeros(T, dtype=torch.float64); sumPA = torch.zeros(T, dtype=torch.float64); sumPB = torch.zeros(T, dtype=torch.float64)
        for r0, r1, ph in phs:
            idx = ids[r0:r1]; valid = idx >= 0; key = idx[valid]
            sumP.index_add_(0, key, ph[valid])
            sumPA.index_add_(0, key, (ph * At[r0:r1, None])[valid]); sumPB.index_add_(0, key, (ph * Bt[r0:r1, None])[valid])
        bnd_sum = sumP * (vnorm * A + B)
        bnd_row = vnorm * sumPA + sumPB
        # pass 2: the exact sum, plain fp32 adds (one order) and the dS pass's bound
        exact = torch.zeros(T, D_QK, dtype=torch.float64); f32 = torch.zeros(T, D_QK, dtype=torch.float32)
        bounds = {"dS pass": torch.zeros(T, dtype=torch.float64), "fwd max x count": bnd_fwd, "fwd sum of P": bnd_sum, "fwd P x row stats": bnd_row}
        for r0 in range(0, T, a.chunk):
            c, b, idx, valid, _ = contributions(q, kv, dO, lse, delta, ids, scale, r0, min(T, r0 + a.chunk))
            key = idx[valid]; cv = c[valid]
            exact.index_add_(0, key, cv); f32.index_add_(0, key, cv.float())
            bounds["dS pass"].index_add_(0, key, b["dS pass"][valid])
        for n in ("fwd max x count", "fwd sum of P", "fwd P x row stats"):  # each bounds the dS pass's sums
            assert bool((bounds[n] >= bounds["dS pass"] * (1 - 1e-9)).all()), f"{n} bound below the dS-pass bound"
        def chunks():
            for r0 in range(0, T, a.chunk):
                c, _, idx, valid, _ = contributions(q, kv, dO, lse, delta, ids, scale, r0, min(T, r0 + a.chunk))
                yield idx[valid], c[valid]
        variants = {"fp32 adds (not order-free)": None}
        for n in bounds:
            variants[f"int32, {n} bound"] = ("int", n, 30)
        if not a.skip_f32q: variants["fp32 quantum (24 bits), dS pass bound"] = ("f32q", "dS pass", 23)
        keymax = exact.abs().amax(-1, keepdim=True).clamp_min(1e-300)
        ref_b = exact.to(torch.bfloat16); norm = exact.norm()
        for name, v in variants.items():
            if v is None:
                x = f32.double(); lost = float("nan")
            else:
                kind, bn, sh = v
                qs = torch.exp2(torch.ceil(torch.log2(bounds[bn].clamp_min(1e-300))) - sh)
                if kind == "int":
                    acc = torch.zeros(T, D_QK, dtype=torch.int64)
                    for key, cv in chunks():
                        iv = torch.round(cv / qs[key][:, None]).to(torch.int64)
                        assert int(iv.abs().max()) < 2**31, "a value outside int32"
                        acc.index_add_(0, key, iv)
                    assert int(acc.abs().max()) < 2**31, "int32 range exceeded"
                    x = acc.double() * qs[:, None]
                else:
                    acc = torch.zeros(T, D_QK, dtype=torch.float32)
                    for key, cv in chunks():
                        qk = qs[key][:, None]; acc.index_add_(0, key, (torch.round(cv / qk) * qk).float())
                    x = acc.double()
                lost = float(torch.log2(bounds[bn] / exact.abs().amax(-1).clamp_min(1e-300)).median())
            err = x - exact
            print(f"| {temp} | {name} | {float(err.norm()/norm):.2e} | {float((err.abs()/keymax).max()):.2e} | "
                  f"{float((x.to(torch.bfloat16) != ref_b).double().mean()):.2e} | {lost:.1f} |")
        print(f"| {temp} | (adds per key: median {float(count.median()):.0f}) | | | | |")


if __name__ == "__main__":
    main()
