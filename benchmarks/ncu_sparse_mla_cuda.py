"""One launch of the CUDA sparse MLA forward (or, with PASS=bwd, backward), for Nsight Compute:

    ncu --clock-control none --kernel-name regex:sparse_mla_fwd --launch-skip 1 --launch-count 1 \
        --section SpeedOfLight --section WarpStateStats python3 benchmarks/ncu_sparse_mla_cuda.py
    PASS=bwd ncu --clock-control none --kernel-name regex:sparse_mla_bwd --launch-skip 1 \
        --launch-count 1 --section WarpStateStats --section SourceCounters --import-source yes \
        -o bwd python3 benchmarks/ncu_sparse_mla_cuda.py

The library is built with ``-lineinfo`` (its own cache entry) so the source page maps SASS to
lines.
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench_sparse_mla import causal_indices  # noqa: E402

from megatron_dsa.kernels.sparse_mla import cuda_impl as ci  # noqa: E402

S, H = int(os.environ.get("S", 8192)), int(os.environ.get("H", 128))
q = torch.randn(S, H, 576, device="cuda").bfloat16()
kv = torch.randn(S, 576, device="cuda").bfloat16()
idx = causal_indices(S, 2048, "cuda")
lib = ci.load_library(ci.build_library(extra_flags=("-lineinfo",)))
if os.environ.get("PASS", "fwd") == "bwd":
    from megatron_dsa.kernels.sparse_mla import triton_impl as ti

    out, lse = ci.sparse_mla_fwd_cuda(q, kv, idx, 576 ** -0.5, lib=lib)
    dout = torch.randn(S, H, 512, device="cuda").bfloat16()
    stats = torch.empty(2 * S * H, dtype=torch.float32, device="cuda")
    ti._bwd_stats_into(stats, None, out, dout, lse, None, None, 512)
    for _ in range(2):
        ci.sparse_mla_bwd_cuda(q, kv, idx, 576 ** -0.5, None, None, lse, dout, stats, lib=lib)
else:
    for _ in range(2):
        ci.sparse_mla_fwd_cuda(q, kv, idx, 576 ** -0.5, lib=lib)
torch.cuda.synchronize()
