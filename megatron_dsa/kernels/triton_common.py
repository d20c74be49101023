"""Helpers shared by the Triton kernels of every op (one copy; kernels import them from here).

* :func:`interpreting` — whether Triton runs its CPU interpreter (``TRITON_INTERPRET=1``,
  Triton's own flag; the interpreter computes garbage for bf16 ``tl.dot``, so kernels upcast
  their dot operands to fp32 there).
* :func:`dot_precision` — the ``UPCAST`` / ``PREC`` constexprs every kernel's dots take.
* ``tile_ptrs`` and ``ld`` / ``st`` / ``atomic_add_tile`` / ``ld_cols`` — masked 2-D tile access
  ``base[rows, cols]`` with a row mask and an optional column limit; ``mm`` — ``tl.dot``
  honouring ``UPCAST`` / ``PREC``.
* ``ld_split`` / ``dot_split`` — the absorbed-MLA channel split shared by the sparse attention
  and the indexer loss: rows of ``D_QK`` channels as four value chunks of ``DC`` (the first
  ``D_V``) plus a rope tail of ``DT``, so every dot has power-of-two shapes.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

__all__ = ["LOG2E", "LN2", "interpreting", "dot_precision", "pow2_at_least", "tile_ptrs", "ld", "st",
           "atomic_add_tile", "ld_cols", "mm", "ld_split", "dot_split"]

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


def interpreting() -> bool:
    """Whether Triton's CPU interpreter is on (Triton's own ``TRITON_INTERPRET`` flag)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def dot_precision(dtype: torch.dtype) -> dict:
    """``UPCAST`` (fp32 dot operands: the interpreter) and ``PREC`` (``ieee`` for fp32/fp64
    inputs, else ``tf32``, which bf16/fp16 products fit exactly)."""
    upcast = interpreting()
    ieee = upcast or dtype in (torch.float32, torch.float64)
    return dict(UPCAST=upcast, PREC="ieee" if ieee else "tf32")


def pow2_at_least(x: int, lo: int = 16) -> int:
    """The next power of two >= ``x`` and >= ``lo`` (tile sizes; ``tl.dot`` needs >= 16)."""
    return max(lo, triton.next_power_of_2(max(1, x)))


@triton.jit
def tile_ptrs(base, rows, row_mask, row_stride, col0, NCOL: tl.constexpr, COL_LIM, MASK_COLS: tl.constexpr):
    """Pointers to ``base[rows, col0:col0 + NCOL]`` and their mask (the row mask; columns
    >= COL_LIM masked too when ``MASK_COLS``)."""
    cols = col0 + tl.arange(0, NCOL)
    ptrs = base + rows[:, None] * row_stride + cols[None, :]
    if MASK_COLS:
        m = row_mask[:, None] & (cols[None, :] < COL_LIM)
    else:
        m = row_mask[:, None]
    return ptrs, m


@triton.jit
def ld(base, rows, row_mask, row_stride, col0, NCOL: tl.constexpr, COL_LIM, MASK_COLS: tl.constexpr):
    """``base[rows, col0:col0 + NCOL]`` (zeros where masked)."""
    ptrs, m = tile_ptrs(base, rows, row_mask, row_stride, col0, NCOL, COL_LIM, MASK_COLS)
    return tl.load(ptrs, mask=m, other=0.0)


@triton.jit
def st(base, rows, row_mask, row_stride, col0, NCOL: tl.constexpr, COL_LIM, MASK_COLS: tl.constexpr, val):
    """Store ``val`` into ``base[rows, col0:col0 + NCOL]`` under the same masks as :func:`ld`."""
    ptrs, m = tile_ptrs(base, rows, row_mask, row_stride, col0, NCOL, COL_LIM, MASK_COLS)
    tl.store(ptrs, val, mask=m)


@triton.jit
def atomic_add_tile(base, rows, row_mask, row_stride, col0, NCOL: tl.constexpr, COL_LIM,
                    MASK_COLS: tl.constexpr, val):
    """Relaxed fp32 ``atomic_add`` of ``val`` into ``base[rows, col0:col0 + NCOL]``."""
    ptrs, m = tile_ptrs(base, rows, row_mask, row_stride, col0, NCOL, COL_LIM, MASK_COLS)
    tl.atomic_add(ptrs, val, mask=m, sem="relaxed")


@triton.jit
def ld_cols(base, rows, row_mask, row_stride, cols, col_mask, MASK_COLS: tl.constexpr):
    """``base[rows, cols]`` for a precomputed column vector (zeros where masked)."""
    ptrs = base + rows[:, None] * row_stride + cols[None, :]
    if MASK_COLS:
        m = row_mask[:, None] & col_mask[None, :]
    else:
        m = row_mask[:, None]
    return tl.load(ptrs, mask=m, other=0.0)


@triton.jit
def mm(a, b, acc, UPCAST: tl.constexpr, PREC: tl.constexpr):
    """``acc + a @ b`` (fp32 operands under the interpreter)."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PREC)


@triton.jit
def ld_split(base, rows, row_mask, row_stride, DC: tl.constexpr, DT: tl.constexpr, D_V, D_QK,
             HAS_TAIL: tl.constexpr, MASK_V: tl.constexpr, MASK_T: tl.constexpr):
    """``base[rows]`` as four value chunks ``[rows, DC]`` and the tail ``[rows, DT]`` (without a
    tail, the first chunk stands in for it and is never used)."""
    c0 = ld(base, rows, row_mask, row_stride, 0 * DC, DC, D_V, MASK_V)
    c1 = ld(base, rows, row_mask, row_stride, 1 * DC, DC, D_V, MASK_V)
    c2 = ld(base, rows, row_mask, row_stride, 2 * DC, DC, D_V, MASK_V)
    c3 = ld(base, rows, row_mask, row_stride, 3 * DC, DC, D_V, MASK_V)
    if HAS_TAIL:
        ct = ld(base, rows, row_mask, row_stride, D_V, DT, D_QK, MASK_T)
    else:
        ct = c0
    return c0, c1, c2, c3, ct


@triton.jit
def dot_split(a0, a1, a2, a3, at, b0, b1, b2, b3, bt, acc, HAS_TAIL: tl.constexpr, UPCAST: tl.constexpr,
              PREC: tl.constexpr):
    """``acc + A B^T`` for A and B split by :func:`ld_split` (the tail only with ``HAS_TAIL``)."""
    acc = mm(a0, tl.trans(b0), acc, UPCAST, PREC)
    acc = mm(a1, tl.trans(b1), acc, UPCAST, PREC)
    acc = mm(a2, tl.trans(b2), acc, UPCAST, PREC)
    acc = mm(a3, tl.trans(b3), acc, UPCAST, PREC)
    if HAS_TAIL:
        acc = mm(at, tl.trans(bt), acc, UPCAST, PREC)
    return acc
