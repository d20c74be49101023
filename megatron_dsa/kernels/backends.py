"""Backend names and the record of a kernel choice, shared by every op's ``dispatch`` module.

Every public kernel function takes ``backend``:

* ``"auto"``: the fastest implementation that can run these inputs on this machine; when it
  cannot use the op's best kernel for the device (e.g. the CUDA build failed) it falls back and
  warns once per reason;
* ``"cuda"`` (sparse MLA; the indexer's select), ``"triton"``, ``"reference"``: exactly that implementation, or a
  ``ValueError`` / ``RuntimeError`` that says why it cannot run.

Each op's ``dispatch.select_backend`` returns a :class:`KernelChoice`;
:func:`megatron_dsa.kernels.status` asks every op what it would run on this machine and why.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from .triton_common import interpreting

__all__ = ["BACKENDS", "KernelChoice", "check_backend", "cuda_capability", "triton_reason", "warn_once"]

BACKENDS = ("auto", "cuda", "triton", "reference")


@dataclass(frozen=True)
class KernelChoice:
    """Which implementation runs one op, and why.

    ``forward`` / ``backward``: ``"cuda"``, ``"triton"`` or ``"reference"``, with ``-packed``
    (row packing) and ``-deterministic`` variants where an op has them (``backward`` is ``None``
    for ops without one).
    """

    op: str
    requested: str
    forward: str
    backward: Optional[str]
    reason: str


def check_backend(op: str, backend: str, choices=BACKENDS) -> None:
    if not isinstance(backend, str) or backend not in choices:
        raise ValueError(f"{op}: backend must be one of {tuple(choices)}, got {backend!r}")


_CAPABILITY = {}


def cuda_capability(device: torch.device) -> Tuple[int, int]:
    """``torch.cuda.get_device_capability(device)``, remembered per device: the kernels' launch
    paths ask on every call, and the query cost tens of microseconds of host time there (before
    the first kernel of a call is queued)."""
    cap = _CAPABILITY.get(device)
    if cap is None:
        cap = _CAPABILITY[device] = tuple(torch.cuda.get_device_capability(device))
    return cap


def triton_reason(device: torch.device) -> Optional[str]:
    """Why the Triton kernels cannot run on ``device`` (``None`` when they can). Triton is a
    dependency (the kernel modules import it), so only the device decides."""
    if device.type == "cuda":
        return None
    if interpreting():
        return None  # Triton's CPU interpreter (tests)
    return f"the Triton kernels need CUDA tensors (the inputs are on {device.type})"


_SAID = set()


def warn_once(op: str, message: str) -> None:
    """Say once per process why ``"auto"`` did not pick the op's best kernel."""
    key = (op, message)
    if key not in _SAID:
        _SAID.add(key)
        warnings.warn(f"megatron_dsa: {op}: {message}", RuntimeWarning, stacklevel=3)
