"""DSA kernels. Each op lives in its own folder with a plain-PyTorch ``reference.py`` beside the
fused implementation; the folder's ``__init__`` holds the public, input-validating function:

    from megatron_dsa.kernels.indexer import indexer_topk
    from megatron_dsa.kernels.sparse_mla import sparse_mla
    from megatron_dsa.kernels.indexer_loss import indexer_loss

(The functions are not re-exported here: ``sparse_mla`` and ``indexer_loss`` are also the
sub-package names, and a re-export would shadow the sub-packages.)

``backend``: ``"auto"`` picks the fused Triton kernel for CUDA tensors and the reference
otherwise; ``"reference"`` / ``"triton"`` force one.
"""
