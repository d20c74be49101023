"""What ``backend="auto"`` runs on this machine, for every op, and why."""

from __future__ import annotations

from typing import Dict, Optional

import torch

from .backends import KernelChoice
from .cuda_build import cache_dir, find_nvcc
from .indexer.dispatch import select_backend as indexer_choice
from .indexer_loss.dispatch import select_backend as loss_choice
from .sparse_mla.dispatch import select_backend as mla_choice

__all__ = ["status", "format_status"]


def status(device: Optional[torch.device] = None) -> Dict[str, KernelChoice]:
    """What ``backend="auto"`` runs on ``device`` (default: the current CUDA device, else the
    CPU) for DeepSeek-V3.2's shapes, and why: ``{case: KernelChoice}``. On a Hopper GPU this
    builds (or loads) the CUDA library, so a failed build shows up here with its log."""
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    bf16 = torch.bfloat16
    rows = {"indexer_topk (bf16, head dim 128)": indexer_choice("auto", device, bf16, head_dim=128, warn=False)}
    for heads in (128, 16):
        rows[f"sparse_mla (bf16, {heads} heads, d_qk 576, d_v 512)"] = mla_choice(
            "auto", device, bf16, heads=heads, d_qk=576, d_v=512, warn=False)
    for heads, packing in ((32, True), (16, False)):
        rows[f"sparse_mla ({heads} heads, attention_row_packing={packing})"] = mla_choice(
            "auto", device, bf16, heads=heads, d_qk=576, d_v=512, warn=False, row_packing=packing)
    rows["sparse_mla (deterministic backward)"] = mla_choice(
        "auto", device, bf16, heads=128, d_qk=576, d_v=512, deterministic=True, warn=False)
    rows["indexer_loss (sparse, bf16)"] = loss_choice("auto", device, bf16, sparse=True, warn=False)
    rows["indexer_loss (dense warm-up, bf16)"] = loss_choice("auto", device, bf16, sparse=False, warn=False)
    return rows


def format_status(rows: Optional[Dict[str, KernelChoice]] = None) -> str:
    """:func:`status` as a table, with the CUDA library's cache location."""
    rows = status() if rows is None else rows
    lines = ["case | forward | backward | why", "---|---|---|---"]
    for case, r in rows.items():
        lines.append(f"{case} | {r.forward} | {r.backward or '-'} | {r.reason}")
    lines.append(f"(CUDA build cache: {cache_dir()}; nvcc: {find_nvcc() or 'not found'})")
    return "\n".join(lines)
