"""Shared input checks for the public kernel functions (clear errors naming the argument)."""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)


def check_tensor(name: str, t, ndim: int, dtypes=FLOAT_DTYPES) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(t.shape)}")
    if t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} has dtype {t.dtype}; expected one of {names}")


def check_positive_scale(name: str, value) -> float:
    """A softmax scale: a finite number > 0 (the kernels take the row max of the unscaled scores
    and scale it, which needs scale > 0). Returns it as a float."""
    try:
        if isinstance(value, (str, bytes, bool)):
            raise TypeError
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}") from None
    if not v > 0 or v == float("inf"):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return v


def check_dim(name: str, t: torch.Tensor, dim: int, expected: int, what: str) -> None:
    if t.shape[dim] != expected:
        raise ValueError(
            f"{name} dim {dim} is {t.shape[dim]} but must equal {what} ({expected}); "
            f"got shape {tuple(t.shape)}"
        )


def check_same_device(**tensors) -> None:
    devs = {n: t.device for n, t in tensors.items() if t is not None}
    if len(set(devs.values())) > 1:
        raise ValueError(f"all inputs must be on one device, got {devs}")


def check_windows(starts, ends, B: int, T: int) -> None:
    """Optional per-row key windows ``[starts, ends)``: both or neither, int ``[B, T]``."""
    if (starts is None) != (ends is None):
        raise ValueError("starts and ends must be given together")
    if starts is not None:
        check_tensor("starts", starts, 2, INDEX_DTYPES)
        check_tensor("ends", ends, 2, INDEX_DTYPES)
        if tuple(starts.shape) != (B, T) or tuple(ends.shape) != (B, T):
            raise ValueError(f"starts/ends must be [B, T] = {(B, T)}, got {tuple(starts.shape)} and {tuple(ends.shape)}")


def check_indexer_tensors(q, k, w):
    """The indexer's q ``[B, T, H, D]``, k ``[B, S, D]``, w ``[B, T, H]``: returns ``(B, T, H, D, S)``."""
    check_tensor("q", q, 4)
    check_tensor("k", k, 3)
    check_tensor("w", w, 3)
    B, T, H, D = q.shape
    check_dim("k", k, 0, B, "q's batch")
    check_dim("k", k, 2, D, "q's head dim")
    check_dim("w", w, 0, B, "q's batch")
    check_dim("w", w, 1, T, "q's rows")
    check_dim("w", w, 2, H, "q's heads")
    return B, T, H, D, k.shape[1]
