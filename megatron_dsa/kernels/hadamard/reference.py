"""Hadamard rotation of the last dimension in plain PyTorch.

``hadamard_reference(x, scale)`` equals ``fast_hadamard_transform.hadamard_transform(x, scale)``
(Sylvester ordering, un-normalised transform times ``scale``) for any floating dtype and any
last-dimension size that is a power of two. It computes in fp32 (fp64 stays fp64) and returns
x's dtype. Cost: log2(n) butterfly passes, O(n log n) per row, no n x n matrix.
"""

from __future__ import annotations

import torch

__all__ = ["hadamard_reference"]


def hadamard_reference(x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    n = x.shape[-1]
    if n == 0 or n & (n - 1):
        raise ValueError(f"Hadamard rotation needs a power-of-two last dimension, got {n}")
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    y = x.to(cdt).reshape(-1, n)
    h = 1
    while h < n:
        y = y.view(-1, n // (2 * h), 2, h)
        a, b = y[:, :, 0, :], y[:, :, 1, :]
        y = torch.stack((a + b, a - b), dim=2)
        h *= 2
    return (y.reshape(x.shape) * scale).to(x.dtype)
