"""The benchmarks' per-kernel-group breakdown (``common.kernel_groups``, the receipt's table) on
the CPU, with kernel names as the profiler reports them on the GPU."""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
from bench_indexer import KERNEL_GROUPS  # noqa: E402
from common import kernel_groups, write_receipt  # noqa: E402

sys.path.pop(0)


def test_kernel_groups_sum_by_name_fragment():
    kt = {"_score_kernel": [8, 13.25], "(anonymous namespace)::select_kernel(float const*, long long)": [8, 3.0],
          "_quantize_e4m3_kernel": [2, 0.5],
          "void at::native::vectorized_elementwise_kernel<4, at::native::MulFunctor<float>>": [1, 0.02],
          "_select_kernel": [1, 1.0]}
    got = kernel_groups(kt, KERNEL_GROUPS)
    assert got == {"score": 13.25, "select": 4.0, "quantize": 0.5, "other": 0.02}
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
