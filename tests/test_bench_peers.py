"""The benchmarks' peer wrappers compute what ours computes (run on the CPU at small sizes), so a
side-by-side row on a GPU compares like with like."""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))


@pytest.mark.parametrize("sparse", [False, True])
def test_indexer_loss_peer_matches_ours(mcore, sparse):
    """Megatron-Core's FusedDSAIndexerLoss as bench_indexer.py calls it (its [s, b, ...] layout,
    causal mask, one TP rank) gives ours' loss and gradients."""
    import bench_indexer as bi

    S, H, D, Hq = 80, 4, 16, 3
    q, k = torch.randn(1, S, H, D), torch.randn(1, S, D)
    w = torch.randn(1, S, H) * H**-0.5
    query, key = torch.randn(1, S, Hq, 576) * 0.1, torch.randn(1, S, 576) * 0.1
    ours = bi.topk_and_loss_ours(q, k, w, query, key, 16, sparse)()
    theirs = bi.topk_and_loss_mcore(q, k, w, query, key, 16, sparse)()
    assert ours[0].item() > 1e-3
    for name, a, b in zip(("loss", "dq", "dk", "dw"), theirs, ours):
        rel = ((a.double() - b.double()).norm() / b.double().norm()).item()
        assert rel < 1e-3, (name, rel)
