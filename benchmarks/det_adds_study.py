"""Order-free dkv adds for a deterministic sparse-MLA backward: how much error does the rounding cost?

An experiment on the CPU (float64 math, no kernel). The deterministic backward today gives each
SM its own fp32 dkv lane (`docs/kernels_sparse_mla.md` section 3.3), which misses the L2. The
alternative section 6 names: round every value the kernel adds into dkv to a power-of-two
quantum ``q_s`` per key ``s`` before the fp32 add. Multiples of ``q_s`` whose partial sums stay
below ``2^24 q_s`` add exactly in fp32, so the sum is the same in any order and the adds can go
to the one L2-resident workspace with atomics. ``q_s`` comes from a bound on the key's sum of
``|value|``, which needs a first pass; this script measures the error of three bounds:

* ``tight``: the per-key sum of each contribution's largest channel (what the adds themselves
  would give; not computable before them, the limit of the method);
* ``dS pass``: from a first pass that recomputes P, dP and dS (the backward's first half, no dKV):
  ``sum_h |dS| max_c |q| + P max_c |dO|`` per (row, slot);
* ``P pass``: from a first pass that recomputes only S and P, with ``|dP|`` bounded by
  ``||dO|| ||v||`` (Cauchy-Schwarz): half the first pass's MMAs.

A contribution is what one CTA adds for one (row, head tile, slot): ``scale dS^T q + P^T dO``
over the tile's heads, from bf16 dS / P / q / dO with fp32 accumulation, as the kernels do.
Each variant's dkv is summed in fp32 in two row orders (the two must agree bit for bit for the
quantized variants; they differ for plain fp32 adds, the nondeterminism); errors are against the
float64 sum of the same contributions, and "bf16 flips" counts elements whose bf16 rounding
differs from the exact sum's (dkv is returned in bf16).

    python benchmarks/det_adds_study.py [--T 2048] [--H 16] [--k 256] [--temp 1 3]
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


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--T", type=int, default=2048)
    ap.add_argument("--H", type=int, default=16)
    ap.add_argument("--k", type=int, default=256)
    ap.add_argument("--temp", type=float, nargs="+", default=[1.0, 3.0],
                    help="score temperatures: q is scaled by this (larger: more peaked attention)")
    ap.add_argument("--chunk", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    gen = torch.Generator().manual_seed(a.seed)
    T, H, k = a.T, a.H, a.k
    ids = causal_ids(T, k, gen)
    scale = 1 / math.sqrt(D_QK)
    rows = []
    for temp in a.temp:
        bf = lambda *s: torch.randn(*s, generator=gen).to(torch.bfloat16).double()  # noqa: E731
        q = (bf(T, H, D_QK) * temp).to(torch.bfloat16).double()
        kv = bf(T, D_QK)
        dO = bf(T, H, D_V)
        # forward statistics in float64: lse and Delta = rowsum(dO * O)
        lse = torch.empty(T, H, dtype=torch.float64)
        delta = torch.empty(T, H, dtype=torch.float64)
        for r0 in range(0, T, a.chunk):
            r1 = min(T, r0 + a.chunk)
            idx = ids[r0:r1]
            kv_g = kv[idx.clamp_min(0)]
            s = torch.einsum("rhd,rkd->rhk", q[r0:r1], kv_g) * scale
            s = s.masked_fill(~(idx >= 0)[:, None, :], float("-inf"))
            lse[r0:r1] = torch.logsumexp(s, -1)
            o = torch.einsum("rhk,rkd->rhd", torch.softmax(s, -1), kv_g[..., :D_V])
            delta[r0:r1] = (dO[r0:r1] * o).sum(-1)
        # pass 1: the exact sum and the bounds (float64); the quanta per key
        exact = torch.zeros(T, D_QK, dtype=torch.float64)
        truth = torch.zeros(T, D_QK, dtype=torch.float64)
        bounds = {n: torch.zeros(T, dtype=torch.float64) for n in ("tight", "dS pass", "P pass")}
        n_adds = torch.zeros(T, dtype=torch.float64)
        for r0 in range(0, T, a.chunk):
            c, b, idx, valid, c_true = contributions(q, kv, dO, lse, delta, ids, scale, r0, min(T, r0 + a.chunk))
            key = idx[valid]
            exact.index_add_(0, key, c[valid])
            truth.index_add_(0, key, c_true[valid])
            n_adds.index_add_(0, key, torch.ones_like(key, dtype=torch.float64))
            for n in bounds:
                bounds[n].index_add_(0, key, b[n][valid])
        assert bool((bounds["dS pass"] >= bounds["tight"] * (1 - 1e-9)).all()), "dS-pass bound below the sums"
        assert bool((bounds["P pass"] >= bounds["dS pass"] * (1 - 1e-9)).all()), "P-pass bound below the dS one"
        quanta = {n: torch.exp2(torch.ceil(torch.log2(b.clamp_min(1e-300))) - 23) for n, b in bounds.items()}
        # pass 2, twice (two row orders): fp32 sums of each variant
        variants = ["fp32"] + list(quanta)
        sums = {}
        for order in (0, 1):
            perm = torch.randperm(T, generator=gen) if order else torch.arange(T)
            acc = {v: torch.zeros(T, D_QK, dtype=torch.float32) for v in variants}
            for r0 in range(0, T, a.chunk):
                rr = perm[r0:r0 + a.chunk]
                for r in rr.tolist():  # one row at a time, in this order
                    c, _, idx, valid, _ = contributions(q, kv, dO, lse, delta, ids, scale, r, r + 1)
                    key = idx[valid]
                    cv = c[valid]
                    acc["fp32"].index_add_(0, key, cv.float())
                    for n, qs in quanta.items():
                        qk = qs[key][:, None]
                        acc[n].index_add_(0, key, (torch.round(cv / qk) * qk).float())
            sums[order] = acc
        ref_b = exact.to(torch.bfloat16)
        norm = exact.norm()
        for v in variants:
            x0, x1 = sums[0][v], sums[1][v]
            err = x0.double() - exact
            keymax = exact.abs().amax(-1, keepdim=True).clamp_min(1e-300)
            rows.append(dict(
                temp=temp, variant=v,
                same_bits=bool(torch.equal(x0, x1)),
                rel_fro=float(err.norm() / norm),
                max_rel_to_key_max=float((err.abs() / keymax).max()),
                bf16_flips=float((x0.to(torch.bfloat16) != ref_b).double().mean()),
                bits_lost=float(torch.log2(bounds[v] / exact.abs().amax(-1).clamp_min(1e-300)).median()) if v in bounds else 0.0,
            ))
        rows.append(dict(temp=temp, variant="(the kernel's bf16 dS / P operands, exact sum, vs float64 math)",
                         same_bits=True, rel_fro=float((exact - truth).norm() / truth.norm()),
                         max_rel_to_key_max=float(((exact - truth).abs() / truth.abs().amax(-1, keepdim=True).clamp_min(1e-300)).max()),
                         bf16_flips=float((ref_b != truth.to(torch.bfloat16)).double().mean()), bits_lost=0.0))
        rows.append(dict(temp=temp, variant="(adds per key: median / max)", same_bits=None,
                         rel_fro=float(n_adds.median()), max_rel_to_key_max=float(n_adds.max()),
                         bf16_flips=float("nan"), bits_lost=float("nan")))
    print(f"T = {T}, H = {H}, k = {k}, d_qk = {D_QK}; errors against the float64 sum of the same fp32 contributions")
    print("| temp | adds | same bits in two orders | rel. error (Frobenius) | max error / key's max | bf16 flips | bound / key's max (log2, median) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if r["same_bits"] is None:
            print(f"| {r['temp']} | {r['variant']} | {r['rel_fro']:.0f} / {r['max_rel_to_key_max']:.0f} | | | | |")
            continue
        print(f"| {r['temp']} | {r['variant']} | {r['same_bits']} | {r['rel_fro']:.2e} | {r['max_rel_to_key_max']:.2e} | "
              f"{r['bf16_flips']:.2e} | {r['bits_lost']:.1f} |")


if __name__ == "__main__":
    main()
