"""Worker: compile the shipped Triton kernels for sm_90a ahead of time, on any machine.

The CPU tests run the kernels through Triton's interpreter, which never compiles them; this
worker runs ``triton.compile`` for a Hopper target (no GPU needed: Triton's bundled ``ptxas``),
with the arguments specialised the way a launch would (ints as i32, a value of 1 as a constant,
multiples of 16 and pointers marked divisible by 16) at real sizes, and reads each cubin's
resources and instruction mix with Triton's bundled ``cuobjdump``. Prints one JSON object:
``{kernel label: {"regs", "stack", "smem", "HGMMA", ..., "STL", "F2FP.SATFINITE.E4M3"}}`` or
``{"error": ...}`` for a kernel that failed to compile.

Run without ``TRITON_INTERPRET`` (the interpreter replaces ``@triton.jit`` functions).
"""

import json
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import triton  # noqa: E402
import triton.backends.nvidia  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
CUOBJDUMP = os.path.join(os.path.dirname(triton.backends.nvidia.__file__), "bin", "cuobjdump")
OPS = ("HGMMA", "QGMMA", "HMMA", "LDL", "STL", "F2FP.SATFINITE.E4M3", "UTMALDG")


def compile_sm90(fn, args, consts, num_warps, num_stages=1, maxnreg=None):
    """Resources of ``fn`` compiled for sm_90a. ``args``: every non-constexpr argument, a
    pointer as its Triton type string (``"*bf16"``), a TMA descriptor as its type string
    (``"tensordesc<bf16[64, 128]>"``), else its Python value; ``maxnreg``: the launcher's
    register cap, if any."""
    signature, constexprs, attrs = {}, dict(consts), {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            signature[name] = "constexpr"
            continue
        v = args[name]
        if isinstance(v, str):
            signature[name] = v
            if not v.startswith("tensordesc"):  # (a pointer: 16-byte aligned, as at run time)
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, float):
            signature[name] = "fp32"
        elif v == 1:
            signature[name] = "constexpr"
            constexprs[name] = 1
        else:
            signature[name] = "i32" if -2**31 <= v < 2**31 else "i64"
            if v % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    options = dict(num_warps=num_warps, num_stages=num_stages, **({"maxnreg": maxnreg} if maxnreg else {}))
    k = triton.compile(src, target=TARGET, options=options)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(k.asm["cubin"])
        usage = subprocess.run([CUOBJDUMP, "--dump-resource-usage", path], capture_output=True, text=True,
                               check=True).stdout
        sass = subprocess.run([CUOBJDUMP, "-sass", path], capture_output=True, text=True, check=True).stdout
    regs = int(re.search(r"REG:(\d+)", usage).group(1))
    stack = int(re.search(r"STACK:(\d+)", usage).group(1))
    return dict(regs=regs, stack=stack, smem=int(k.metadata.shared), **{op: sass.count(op) for op in OPS})


def cases():
    """(label, kernel, args, constexprs, warps, stages[, maxnreg]) at the launchers' configurations."""
    from megatron_dsa.kernels.indexer import triton_impl as idx
    from megatron_dsa.kernels.indexer_loss import triton_impl as il

    T = S = 16384
    out = []
    for fp8 in (False, True):  # the shipped score tiles
        cfg = idx.ScoreCfg(*idx._SCORE_CFG_GPU["fp8" if fp8 else "bf16"])
        dt = "*fp8e4nv" if fp8 else "*bf16"
        args = dict(q_desc=f"tensordesc<{dt[1:]}[{cfg.block_t}, 128]>", q_ptr=dt, k_ptr=dt, w_ptr="*fp32", st_ptr="*i32", en_ptr="*i32", out_ptr="*fp32",
                    ks_ptr="*fp32", row0=0, n_rows=8192, T=T, S=S, sq_b=T * 64 * 128, sq_t=64 * 128, sq_h=128,
                    sk_b=S * 128, sk_s=128, sw_b=T * 64, sw_t=64, sw_h=1, sse_b=T, sse_t=1, so_b=8192 * S,
                    so_r=S, sks_b=S)
        c = dict(H=64, D=128, BLOCK_T=cfg.block_t, BLOCK_S=cfg.block_s, CAUSAL=True, USE_RELU=True, UPCAST=False,
                 IEEE=False, KEY_SCALE=fp8, Q_TMA=True)
        out.append((f"indexer score {'e4m3' if fp8 else 'bf16'}", idx._score_kernel, args, c, cfg.warps,
                    cfg.stages, *([cfg.maxnreg] if cfg.maxnreg else [])))

    from megatron_dsa.kernels.indexer import fp8 as f8

    for hw, tag in ((True, ""), (False, " integer path")):  # (the GPU's conversion; before sm_89)
        out.append((f"indexer e4m3 quantize{tag}", f8._quantize_e4m3_kernel,
                    dict(x_ptr="*bf16", y_ptr="*u8", s_ptr="*fp32", n_rows=T * 64, stride_r=128),
                    dict(D=128, BLOCK_R=64, BLOCK_D=128, HW_CVT=hw), 4, 1))
    blk, nw_sel = idx._select_cfg(S)
    out.append(("indexer select", idx._select_kernel,
                dict(buf_ptr="*fp32", scr_ptr="*i32", st_ptr="*i32", en_ptr="*i32", idx_ptr="*i32", val_ptr="*fp32",
                     row0=0, T=T, S=S, K=2048, CAP=8192, sse_b=T, sse_t=1, sb_b=8192 * S, sb_r=S, so_b=T * 2048,
                     so_t=2048, sc_b=8192 * 8192, sc_r=8192),
                dict(CAUSAL=True, GLOBAL_IDS=False, BLOCK=blk, STRIDE=idx.SAMPLE_STRIDE), nw_sel, 1))
    out += _sparse_mla_cases(T)
    out += _pack_cases(T)

    cfg = il._CFG
    geo = il._att_geometry(576)
    for dense, Hq in ((False, 128), (True, 128), (True, 16)):
        BH = min(cfg["att_bh"], triton.next_power_of_2(max(16, Hq)))
        RB = max(1, cfg["att_dense_m"] // BH) if dense else 1
        K = S if dense else 2048
        args = dict(QRY="*bf16", KEY="*bf16", IDX="*i32", ST="*i32", EN="*i32", LSE="*fp32", ATT="*fp32",
                    sq_r=Hq * 576, sq_h=576, s_key=576, T=T, S=S, Hq=Hq, K=K, T0=8192 if dense else 0,
                    RT=8192 if dense else T, scale_log2=0.06)
        for mode in (0, 1):
            c = dict(MODE=mode, BH=BH, BN=cfg["att_bn"], ATOMIC=False, DENSE=dense, RB=RB, UPCAST=False,
                     PREC="tf32", **geo)
            out.append((f"loss target {'dense' if dense else 'sparse'} {Hq} heads, pass {mode}", il._att_kernel,
                        args, c, cfg["att_warps"], cfg["att_stages"]))
    for dense in (False, True):
        name = "dense" if dense else "sparse"
        K = S if dense else 2048
        rows = dict(T0=8192, RT=8192) if dense else dict(T0=0, RT=T)
        base = dict(Q="*bf16", KI="*bf16", W="*fp32", IDX="*i32", ST="*i32", EN="*i32", sq_r=64 * 128, sq_h=128,
                    sk=128, sw_r=64, T=T, S=S, H=64, D=128, K=K, **rows)
        c = dict(BHI=64, BD=128, RELU=True, UPCAST=False, PREC="tf32", DENSE=dense)
        out.append((f"loss index scores {name}", il._index_kernel, dict(base, ISC="*fp32"), dict(c, BN=cfg["idx_bn"]),
                    cfg["idx_warps"], cfg["idx_stages"]))
        out.append((f"loss dq/dw {name}", il._index_bwd_kernel,
                    dict(base, DI="*fp32", G="*fp32", DQ="*bf16", DK="*fp32", DW="*fp32"),
                    dict(c, BN=cfg["bwd_bn"]), cfg["bwd_warps"], cfg["bwd_stages"]))
        out.append((f"loss KL {name}", il._kl_kernel,
                    dict(ISC="*fp32", ATT="*fp32", IDX="*i32", ST="*i32", EN="*i32", RV="*fp32", KL="*fp32",
                         DI="*fp32", T=T, S=S, K=K, **rows),
                    dict(BK=min(K, cfg["kl_bk"]), HAS_RV=True, DENSE=dense), cfg["kl_warps"], 1))
    out.append(("loss dk dense", il._dense_dk_kernel,
                dict(Q="*bf16", KI="*bf16", W="*fp32", ST="*i32", EN="*i32", DI="*fp32", PART="*fp32",
                     sq_r=64 * 128, sq_h=128, sk=128, sw_r=64, T=T, S=S, H=64, D=128, K=S, T0=8192, RT=8192, B=2,
                     RPS=cfg["dk_rows"]),
                dict(BHI=64, BD=128, BS=cfg["dk_bs"], RELU=True, UPCAST=False, PREC="tf32"), cfg["dk_warps"], 1))
    return out


def _pack_cases(T):
    """Row packing's kernel at 16 and 32 heads (4 and 2 rows per group), k = 2048."""
    from megatron_dsa.kernels.sparse_mla import packing

    out = []
    c = packing._CFG
    for heads, R in ((16, 4), (32, 2)):
        args = dict(idx_ptr="*i32", len_ptr="*i32", bits_ptr="*i32", pre_ptr="*i32", first_ptr="*i8",
                    uid_ptr="*i32", uslot_ptr="*i16", count_ptr="*i32", T=T, K=2048, Tk=T, W=T // 32, G=T // R,
                    NPROG=264, stride_t=2048, stride_k=1)
        out.append((f"sparse_mla pack rows {heads} heads", packing._pack_rows_kernel, args,
                    dict(R=R, BLOCK=c["pack_block"], WB=c["pack_wb"], HAS_LEN=False), c["pack_warps"], 1))
    return out


def _sparse_mla_cases(T):
    """The Triton sparse MLA kernels (the path without the CUDA library, and the deterministic
    backward) at 16 and 128 heads, d_qk = 576, d_v = 512, k = 2048."""
    import triton as tr

    from megatron_dsa.kernels.sparse_mla import triton_impl as sm
    from megatron_dsa.kernels.triton_common import pow2_at_least

    out, K, Dqk, dv = [], 2048, 576, 512
    geo = sm._geometry(Dqk, dv)
    prec = dict(UPCAST=False, PREC="tf32")
    for H in (16, 128):
        BH = sm._block_h(H)
        big = BH >= 64
        strides = dict(sq_t=H * Dqk, sq_h=Dqk, s_kv=Dqk, s_it=K, so_t=H * dv, so_h=dv)
        out.append((f"sparse_mla fwd {H} heads", sm._sparse_mla_fwd_kernel,
                    dict(Q="*bf16", KV="*bf16", IDX="*i32", TOPK="*i32", SINK="*fp32", OUT="*bf16", LSE="*fp32",
                         **strides, H=H, Tk=T, K=K, scale_log2=0.06),
                    dict(BH=BH, BN=sm._FWD["block_n"], HAS_TOPK=False, HAS_SINK=False, **geo, **prec),
                    sm._FWD["warps_64"] if big else sm._FWD["warps_small"],
                    sm._FWD["stages_64"] if big else sm._FWD["stages_small"]))
        HP = pow2_at_least(H)
        rc = sm._BWD_ROWS
        rows_args = dict(Q="*bf16", KV="*bf16", IDX="*i32", TOPK="*i32", DO="*bf16", STATS="*fp32", DKV="*fp32",
                         DQW="*fp32", LSE="*fp32", TGT="*fp32", US="*i16", sq_t=H * Dqk, sq_h=Dqk, s_kv=Dqk,
                         s_it=K, sdo_t=H * dv, sdo_h=dv, T=T, H=H, Tk=T, K=K, KT=K, NB=K // rc["block_n"],
                         stats_off=T * H, scale=0.04, scale_log2=0.06)
        rows_c = dict(D_V=dv, D_QK=Dqk, HP=HP, BN=rc["block_n"], BC=rc["block_c"], HAS_TOPK=False, MASK_V=False,
                      MASK_T=False, EMIT_T=True, SINK_T=False, **prec, PACK=False, R=1, HPAD=1)
        out.append((f"sparse_mla bwd all heads {H}", sm._sparse_mla_bwd_dkv_rows_kernel, rows_args, rows_c,
                    rc["warps"] if HP > 32 else rc["warps_small"], rc["stages"]))
        if H <= 32:  # row packing: 64 tile rows over the group's union (count per group, R K slots)
            out.append((f"sparse_mla bwd all heads {H} packed", sm._sparse_mla_bwd_dkv_rows_kernel,
                        dict(rows_args, s_it=4 * K, K=4 * K, NB=4 * K // rc["block_n"]),
                        dict(rows_c, HP=64, HAS_TOPK=True, PACK=True, R=4, HPAD=16), rc["warps"], rc["stages"]))
        hc = sm._BWD_HEADS
        BHb = sm._block_h(H, hc["block_h"])
        bigb = BHb >= 64
        for det in (False, True):
            out.append((f"sparse_mla bwd per head block {H}{' deterministic' if det else ''}",
                        sm._sparse_mla_bwd_kernel,
                        dict(Q="*bf16", KV="*bf16", IDX="*i32", TOPK="*i32", SINK="*fp32", O="*bf16", DO="*bf16",
                             LSE="*fp32", DLSE="*fp32", DQ="*bf16", DKV="*fp32", DSINK_T="*fp32", WS="*fp32",
                             **strides, sdo_t=H * dv, sdo_h=dv, sdq_t=H * Dqk, sdq_h=Dqk, H=H, Tk=T, K=K, T0=0,
                             scale=0.04, scale_log2=0.06),
                        dict(BH=BHb, BN=hc["block_n_64"] if bigb else hc["block_n_small"], HAS_TOPK=False,
                             HAS_SINK=False, HAS_DLSE=False, **geo, **prec, DETERMINISTIC=det,
                             DO_DQ=not bigb, DO_DKV=True),
                        hc["warps_64"] if bigb else hc["warps_small"], hc["stages"]))
    out.append(("sparse_mla bwd stats", sm._sparse_mla_bwd_stats_kernel,
                dict(O="*bf16", DO="*bf16", LSE="*fp32", DLSE="*fp32", SINK="*fp32", STATS="*fp32", DSINK_T="*fp32",
                     so_t=128 * dv, so_h=dv, sdo_t=128 * dv, sdo_h=dv, H=128, stats_off=T * 128),
                dict(D_V=dv, BH=32, BC=128, HAS_SINK=False, HAS_DLSE=False), 4, 1))
    out.append(("sparse_mla deterministic segment reduce", sm._segment_reduce_kernel,
                dict(WS="*fp32", PERM="*i64", STARTS="*i64", DKV="*fp32", D_QK=Dqk), dict(BD=64, RB=16), 4, 1))
    del tr
    return out


def main():
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        sys.exit("run without TRITON_INTERPRET=1")
    only = sys.argv[1:]
    res = {}
    for label, fn, args, consts, warps, stages, *cap in cases():
        if only and not any(o in label for o in only):
            continue
        try:
            res[label] = compile_sm90(fn, args, consts, warps, stages, *cap)
        except Exception as e:  # noqa: BLE001 - reported per kernel
            res[label] = {"error": f"{type(e).__name__}: {str(e)[-2000:]}"}
    print(json.dumps(res))


if __name__ == "__main__":
    main()
