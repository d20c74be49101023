"""DSA kernels. Each op lives in its own folder: a plain-PyTorch ``reference.py``, the fused
implementation(s), and ``dispatch.py``, which owns the choice of implementation and the public,
input-validating function:

    from megatron_dsa.kernels.indexer import indexer_topk
    from megatron_dsa.kernels.sparse_mla import sparse_mla
    from megatron_dsa.kernels.indexer_loss import indexer_loss, indexer_loss_from_attention

(The functions are not re-exported here: ``sparse_mla`` and ``indexer_loss`` are also the
sub-package names, and a re-export would shadow the sub-packages.)

``backend``: ``"auto" | "cuda" | "triton" | "reference"`` (see :mod:`.backends`);
:func:`status` reports what ``"auto"`` runs on this machine and why.
"""

from .backends import KernelChoice

__all__ = ["status", "format_status", "KernelChoice"]


def status(device=None):
    """``{case: KernelChoice}``: what ``backend="auto"`` runs on ``device`` (default: the current
    CUDA device, else the CPU) for DeepSeek-V3.2's shapes, and why (see :mod:`.report`)."""
    from .report import status as _status

    return _status(device)


def format_status(rows=None) -> str:
    """:func:`status` as a table (what ``python -m megatron_dsa.build --status`` prints)."""
    from .report import format_status as _format

    return _format(rows)
