"""Version-guarded, idempotent, undoable shims for Megatron's training loop (``megatron.training``,
shipped in the megatron-core 0.19 wheel).

=======================  ==============================================================
shim                     what and why
=======================  ==============================================================
``dataset_helpers``      (any machine) ``megatron.core.datasets.utils.compile_helpers``
                         runs ``make`` in the package folder, but the wheel ships no
                         Makefile, only the prebuilt ``helpers_cpp`` extension: when that
                         extension imports, compiling is skipped (otherwise the original
                         runs and fails as before).
``cpu_training``         (CUDA absent) what a one-process CPU run of ``pretrain`` reaches:
                         ``initialize_megatron`` asserts CUDA (it is called with
                         ``allow_no_cuda=True``) and, with no CUDA device, skips the
                         model-parallel initialisation (done here over the CPU process
                         group); ``_warmup_jit_function`` allocates on CUDA (skipped);
                         argument validation asks CUDA for the device architecture under
                         TP or CP (answered 0: the pre-Blackwell rules, which want
                         ``CUDA_DEVICE_MAX_CONNECTIONS=1`` as on Hopper); and
                         the ``torch.cuda`` calls / ``device="cuda"`` literals of the
                         modules in ``_CPU_TRAINING_MODULES`` go through the CPU torch
                         proxy of :mod:`megatron_dsa.patches` (``cpu_device``), which is
                         applied too.
=======================  ==============================================================

Usage (``examples/pretrain_dsa.py``)::

    from megatron_dsa.patches import training
    training.apply_dataset_helpers()
    if not torch.cuda.is_available():
        training.apply()
"""

from __future__ import annotations

import importlib
from typing import Dict, List, Tuple

from . import _check_version, _resolve, proxy_torch
from . import apply as apply_core_patches

__all__ = ["apply", "apply_dataset_helpers", "undo", "active"]

_CPU_TRAINING_MODULES = {
    "megatron.training.training": "start-time tensors, memory reports, cuda synchronize",
    "megatron.training.initialize": "distributed init device",
    "megatron.training.utils.common_utils": "loss averaging / reporting tensors",
    "megatron.training.models.dist_utils": "model placement",
    "megatron.core.timers": "timer synchronisation and reductions",
    "megatron.training.checkpointing": "the RNG states saved with a checkpoint (torch.cuda.get_rng_state)",
}

_APPLIED: Dict[str, List[Tuple[object, str, object]]] = {}


def _helpers_importable() -> bool:
    try:
        importlib.import_module("megatron.core.datasets.helpers_cpp")
    except ImportError:
        return False
    return True


def _apply_dataset_helpers():
    mod = _resolve("megatron.core.datasets.utils", "compile_helpers")
    original = mod.compile_helpers

    def compile_helpers():
        if _helpers_importable():
            return None
        return original()

    compile_helpers.__wrapped__ = original
    saved = [(mod, "compile_helpers", original)]
    mod.compile_helpers = compile_helpers
    # modules that imported the name directly
    for path in ("megatron.training.initialize",):
        m = importlib.import_module(path)
        if getattr(m, "compile_helpers", None) is original:
            saved.append((m, "compile_helpers", original))
            m.compile_helpers = compile_helpers
    return saved


def _apply_cpu_training():
    saved = proxy_torch(_CPU_TRAINING_MODULES)
    init = _resolve("megatron.training.initialize", "initialize_megatron")
    original_init = init.initialize_megatron

    def initialize_megatron(*args, **kwargs):
        kwargs["allow_no_cuda"] = True
        return original_init(*args, **kwargs)

    initialize_megatron.__wrapped__ = original_init
    saved.append((init, "initialize_megatron", original_init))
    init.initialize_megatron = initialize_megatron
    training = importlib.import_module("megatron.training.training")
    if getattr(training, "initialize_megatron", None) is original_init:
        saved.append((training, "initialize_megatron", original_init))
        training.initialize_megatron = initialize_megatron
    original_dist = init._initialize_distributed

    def _initialize_distributed(*args, **kwargs):
        original_dist(*args, **kwargs)
        _cpu_model_parallel_init(kwargs.get("skip_model_parallel_init", False) or
                                 (len(args) > 3 and args[3]))

    _initialize_distributed.__wrapped__ = original_dist
    saved.append((init, "_initialize_distributed", original_dist))
    init._initialize_distributed = _initialize_distributed
    arguments = _resolve("megatron.training.arguments", "get_device_arch_version")
    saved.append((arguments, "get_device_arch_version", arguments.get_device_arch_version))
    arguments.get_device_arch_version = lambda: 0  # no GPU architecture: the pre-Blackwell rules
    saved.append((init, "_warmup_jit_function", init._warmup_jit_function))
    init._warmup_jit_function = lambda *a, **k: None
    return saved


def _cpu_model_parallel_init(skip: bool) -> None:
    """What ``_initialize_distributed`` does when a CUDA device exists: the model-parallel groups
    (over the CPU process group) and the model-parallel RNG states (seeded as Megatron seeds them)."""
    from megatron.core import parallel_state as mpu
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from megatron.training import get_args

    if skip or mpu.model_parallel_is_initialized():
        return
    a = get_args()
    mpu.initialize_model_parallel(
        a.tensor_model_parallel_size, a.pipeline_model_parallel_size, a.virtual_pipeline_model_parallel_size,
        context_parallel_size=a.context_parallel_size,
        expert_model_parallel_size=a.expert_model_parallel_size,
        expert_tensor_parallel_size=a.expert_tensor_parallel_size,
        distributed_timeout_minutes=a.distributed_timeout_minutes,
        order="tp-cp-ep-dp-pp" if not a.use_tp_pp_dp_mapping else "tp-cp-ep-pp-dp",
        create_gloo_process_groups=a.use_gloo_process_groups,
    )
    model_parallel_cuda_manual_seed(a.seed)


_APPLIERS = {"dataset_helpers": _apply_dataset_helpers, "cpu_training": _apply_cpu_training}


def _apply(name):
    _check_version()
    if name not in _APPLIED:
        _APPLIED[name] = _APPLIERS[name]()
    return sorted(_APPLIED)


def apply_dataset_helpers() -> List[str]:
    """Skip ``compile_helpers``' ``make`` where the prebuilt extension imports (any machine)."""
    return _apply("dataset_helpers")


def apply() -> List[str]:
    """The CPU shims (plus the core CPU patches and ``dataset_helpers``). Idempotent."""
    apply_core_patches()
    _apply("dataset_helpers")
    return _apply("cpu_training")


def undo() -> None:
    for name in list(_APPLIED):
        for owner, attr, original in reversed(_APPLIED.pop(name)):
            setattr(owner, attr, original)


def active() -> List[str]:
    return sorted(_APPLIED)
