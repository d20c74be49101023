"""One launch of the CUDA sparse MLA forward, for Nsight Compute:

    ncu --clock-control none --kernel-name regex:sparse_mla_fwd --launch-skip 1 --launch-count 1 \
        --section SpeedOfLight --section WarpStateStats python3 benchmarks/ncu_sparse_mla_cuda.py
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
for _ in range(2):
    ci.sparse_mla_fwd_cuda(q, kv, idx, 576 ** -0.5)
torch.cuda.synchronize()
