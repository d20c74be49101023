"""Hadamard rotation used by the indexer (``dsa_indexer_rotate_activation``)."""

from .reference import hadamard_reference

try:  # the CUDA package, when the user has it
    from fast_hadamard_transform import hadamard_transform as _fast_hadamard
except ImportError:  # pragma: no cover - depends on the environment
    _fast_hadamard = None

__all__ = ["rotate_activation", "hadamard_reference"]


def rotate_activation(x):
    """``H x / sqrt(n)`` on the last dim: the fast CUDA package for bf16 on the GPU, else PyTorch."""
    scale = x.shape[-1] ** -0.5
    if _fast_hadamard is not None and x.is_cuda and x.dtype == __import__("torch").bfloat16:
        return _fast_hadamard(x, scale=scale)
    return hadamard_reference(x, scale)
