"""``cpu_checkpoint``: Megatron-Core's distributed checkpointing (``torch_dist``) on a CPU-only machine.

Registered in :mod:`megatron_dsa.patches` (applied by ``patches.apply()`` when CUDA is absent,
undone by ``patches.undo()``; version-guarded and idempotent like every patch there).

What and why. Saving and loading with ``megatron.core.dist_checkpointing`` reaches CUDA in a
few module-level calls although every tensor is on the CPU:

=================================================  ==========================================
module (its ``torch`` global is replaced)          CUDA use
=================================================  ==========================================
``dist_checkpointing.strategies.filesystem_async``  ``torch.cuda.synchronize()`` after the
                                                    tensors are staged for writing
``dist_checkpointing.strategies.state_dict_saver``  the save's failure flag (and the metadata
                                                    reuse vote) on ``torch.cuda.current_device()``
                                                    / ``device="cuda"``
``dist_checkpointing.strategies.async_utils``       ``torch.cuda.synchronize()``, the async
                                                    caller's flags on the current device
``dist_checkpointing.strategies.fully_parallel``    ``torch.cuda.synchronize()`` around the
                                                    fully parallel save / load exchange
=================================================  ==========================================

Each module's ``torch`` becomes the package's CPU proxy (``torch.cuda.synchronize()`` a no-op,
``torch.cuda.current_device()`` the CPU, ``device="cuda"`` in tensor factories the CPU); the
originals are restored by ``undo``. Not covered: ``exchange_utils`` (the fully parallel *load*
exchange calls ``Tensor.cuda()``) and ``tensor_aware_state_dict`` (local checkpoints).
"""

from __future__ import annotations

from typing import List, Tuple

CHECKPOINT_MODULES = (
    "megatron.core.dist_checkpointing.strategies.filesystem_async",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
    "megatron.core.dist_checkpointing.strategies.async_utils",
    "megatron.core.dist_checkpointing.strategies.fully_parallel",
)


def apply_cpu_checkpoint() -> List[Tuple[object, str, object]]:
    """Give each module of :data:`CHECKPOINT_MODULES` the CPU ``torch`` proxy; returns the
    ``(module, "torch", original)`` triples that ``patches.undo`` restores."""
    from . import proxy_torch

    return proxy_torch(CHECKPOINT_MODULES)
