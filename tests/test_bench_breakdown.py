"""The benchmarks' per-kernel-group breakdown (``common.kernel_groups``, the receipt's table) on
the CPU, with kernel names as the profiler reports them on the GPU; the indexer benchmark's
variant rows (each timed with the library's tuning globals replaced, then restored)."""

import os
import sys
from types import SimpleNamespace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import bench_indexer  # noqa: E402
from bench_indexer import KERNEL_GROUPS  # noqa: E402
from common import kernel_groups, write_receipt  # noqa: E402

sys.path.pop(0)


def test_kernel_groups_sum_by_name_fragment():
    kt = {"_score_kernel": [8, 13.25], "(anonymous namespace)::select_kernel(float const*, long long)": [8, 3.0],
          "_quantize_e4m3_kernel": [2, 0.5], "_quantize_qk_kernel": [1, 0.25],
          "void at::native::vectorized_elementwise_kernel<4, at::native::MulFunctor<float>>": [1, 0.02],
          "_select_kernel": [1, 1.0]}
    got = kernel_groups(kt, KERNEL_GROUPS)
    assert got == {"score": 13.25, "select": 4.0, "quantize": 0.75, "other": 0.02}
    assert kernel_groups({}, KERNEL_GROUPS) == {"score": 0.0, "select": 0.0, "quantize": 0.0, "other": 0.0}


def test_receipt_renders_the_breakdown_table(tmp_path):
    rows = [{"impl": "ours", "case": {"S": 32768}, "ms": 16.4, "tflops": 535.0, "peak_gib": 1.0, "status": "ok",
             "breakdown_ms": {"score": 13.2, "select": 3.0, "quantize": 0.0, "other": 0.1, "span": 16.5}},
            {"impl": "peer", "case": {"S": 32768}, "ms": 20.8, "tflops": 422.0, "peak_gib": 12.5, "status": "ok"}]
    md = open(write_receipt("bdtest", rows, str(tmp_path))["md"]).read().splitlines()
    at = md.index("Device time of one call by kernel group (ms, `torch.profiler`):")
    assert md[at + 2] == "| impl | S | score | select | quantize | other | span |"
    assert md[at + 4] == "| ours | 32768 | 13.200 | 3.000 | 0.000 | 0.100 | 16.500 |"
    assert not any(ln.startswith("| peer") for ln in md[at:])  # rows without a breakdown are left out


def test_variant_rows_patch_and_restore_the_tuning_globals(monkeypatch):
    """``--score-cfgs`` rows: each call sees its variant's score config (its precision's only),
    every row gets its label, and the shipped values are back afterwards (also when a call
    fails)."""
    from megatron_dsa.kernels.indexer import triton_impl as ti

    shipped_cfg, seen = dict(ti._SCORE_CFG_GPU), []

    def bench_impl(name, S, args):
        seen.append((name, tuple(ti._SCORE_CFG_GPU["fp8"]), tuple(ti._SCORE_CFG_GPU["bf16"])))
        return {"ms": 1.0}

    monkeypatch.setattr(bench_indexer, "bench_impl", bench_impl)
    args = SimpleNamespace(H=64, D=128, k=2048, score_cfgs="64,128,4,4,168;32,64,4,2")
    fp8, bf16 = tuple(shipped_cfg["fp8"]), tuple(shipped_cfg["bf16"])
    rows = bench_indexer.score_cfg_sweep("ours", 4096, args)
    assert [r["impl"] for r in rows] == ["megatron_dsa[bf16 64x128 w4 s4 r168]", "megatron_dsa[bf16 32x64 w4 s2]"]
    assert seen == [("ours", fp8, (64, 128, 4, 4, 168)), ("ours", fp8, (32, 64, 4, 2, 0))]
    assert ti._SCORE_CFG_GPU == shipped_cfg
    seen.clear()
    rows = bench_indexer.score_cfg_sweep("ours_fp8", 4096, args)
    assert [r["impl"] for r in rows] == ["megatron_dsa[fp8 64x128 w4 s4 r168]", "megatron_dsa[fp8 32x64 w4 s2]"]
    assert seen == [("ours_fp8", (64, 128, 4, 4, 168), bf16), ("ours_fp8", (32, 64, 4, 2, 0), bf16)]
    assert ti._SCORE_CFG_GPU == shipped_cfg

    def failing(name, S, args):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(bench_indexer, "bench_impl", failing)
    try:
        bench_indexer.score_cfg_sweep("ours", 4096, args)
    except RuntimeError:
        pass
    assert ti._SCORE_CFG_GPU == shipped_cfg
