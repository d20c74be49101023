"""Kernel dispatch: backend names, explicit backends that cannot run, auto's fallback warning,
the status report and the plugin config's backend fields."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

from megatron_dsa.kernels import backends, status
from megatron_dsa.kernels.indexer import indexer_topk
from megatron_dsa.kernels.indexer import select_backend as indexer_choice
from megatron_dsa.kernels.indexer_loss import indexer_loss
from megatron_dsa.kernels.indexer_loss import select_backend as loss_choice
from megatron_dsa.kernels.sparse_mla import cuda_impl, loss_target_reason, sparse_mla
from megatron_dsa.kernels.sparse_mla import select_backend as mla_choice

CPU = torch.device("cpu")
GPU = pytest.mark.gpu


def mla_inputs(device="cpu", dtype=torch.float32, T=6, H=2, D=24, dv=16, K=4):
    q = torch.randn(T, H, D, dtype=dtype, device=device)
    kv = torch.randn(T, D, dtype=dtype, device=device)
    idx = torch.randint(-1, T, (T, K), dtype=torch.int32, device=device)
    return q, kv, idx, dv


@pytest.mark.parametrize("backend", ["fast", "", None, "CUDA"])
def test_unknown_backend_names_the_argument(backend):
    q, kv, idx, dv = mla_inputs()
    with pytest.raises(ValueError, match="backend must be one of"):
        sparse_mla(q, kv, idx, 0.1, d_v=dv, backend=backend)


def test_explicit_cuda_on_cpu_says_why():
    q, kv, idx, dv = mla_inputs()
    with pytest.raises(RuntimeError, match="backend='cuda' cannot run: .*sm_90 GPU.*cpu"):
        sparse_mla(q, kv, idx, 0.1, d_v=dv, backend="cuda")


def test_loss_has_no_cuda_kernel():
    with pytest.raises(ValueError, match="no CUDA-C kernel"):
        loss_choice("cuda", CPU, torch.float32, sparse=True)


def test_indexer_cuda_on_cpu_says_why():
    """The indexer's ``cuda`` backend (Triton score, CUDA select) needs an sm_90 GPU."""
    with pytest.raises(ValueError, match="backend='cuda' cannot run: the CUDA select needs an sm_90 GPU"):
        indexer_choice("cuda", CPU, torch.float32, head_dim=16)


def test_explicit_triton_on_cpu_without_interpreter_says_why(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, kv, idx, dv = mla_inputs()
    with pytest.raises(ValueError, match="backend='triton' cannot run: the Triton kernels need CUDA tensors"):
        sparse_mla(q, kv, idx, 0.1, d_v=dv, backend="triton")
    with pytest.raises(ValueError, match="backend='triton' cannot run"):
        indexer_topk(torch.randn(1, 4, 2, 16), torch.randn(1, 4, 16), torch.randn(1, 4, 2), 2, backend="triton")


def test_auto_on_cpu_runs_the_reference():
    for choice in (mla_choice("auto", CPU, torch.bfloat16, 16, 576, 512),
                   indexer_choice("auto", CPU, torch.bfloat16, 128),
                   loss_choice("auto", CPU, torch.bfloat16, sparse=True)):
        assert choice.forward == "reference" and "cpu" in choice.reason


def test_reference_and_auto_agree_on_cpu():
    q, kv, idx, dv = mla_inputs()
    a = sparse_mla(q, kv, idx, 0.1, d_v=dv, backend="auto")
    b = sparse_mla(q, kv, idx, 0.1, d_v=dv, backend="reference")
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_auto_warns_once_per_reason_when_the_cuda_kernels_cannot_run(monkeypatch):
    """CUDA tensors of the CUDA kernels' shapes that still run Triton: one warning naming why."""
    monkeypatch.setattr(cuda_impl, "unsupported_reason", lambda *a, **k: "nvcc not found (test)")
    monkeypatch.setattr(backends, "_SAID", set())
    gpu = torch.device("cuda", 0)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for _ in range(3):
            choice = mla_choice("auto", gpu, torch.bfloat16, 128, 576, 512)
        mla_choice("auto", gpu, torch.float32, 128, 576, 512)  # not the CUDA kernels' dtype: no warning
    assert choice.forward == "triton" and choice.backward == "triton"
    assert choice.reason == "nvcc not found (test)"
    msgs = [str(w.message) for w in seen if "megatron_dsa" in str(w.message)]
    assert msgs == ["megatron_dsa: sparse_mla: running Triton instead of the CUDA kernels: nvcc not found (test)"]
    with pytest.raises(RuntimeError, match="backend='cuda' cannot run: nvcc not found"):
        mla_choice("cuda", gpu, torch.bfloat16, 128, 576, 512)


def test_deterministic_backward_choice(monkeypatch):
    monkeypatch.setattr(cuda_impl, "unsupported_reason", lambda *a, **k: None)
    gpu = torch.device("cuda", 0)
    auto = mla_choice("auto", gpu, torch.bfloat16, 128, 576, 512, deterministic=True)
    assert (auto.forward, auto.backward) == ("cuda", "cuda-deterministic")
    # the integer adds (64-key blocks) by default; the lanes where the deterministic mode takes
    # 32-key blocks (bench --bwd-block-keys 32) and beyond DET_MAX_KEYS keys
    assert "integer dkv adds" in auto.reason and "64-key blocks" in auto.reason and "lane" not in auto.reason
    big = mla_choice("auto", gpu, torch.bfloat16, 128, 576, 512, deterministic=True,
                     num_keys=cuda_impl.DET_MAX_KEYS + 1).reason
    assert "one dkv lane per SM" in big and "64-key" not in big
    monkeypatch.setattr(cuda_impl, "bwd_block_keys", lambda deterministic: 32 if deterministic else 64)
    lanes = mla_choice("auto", gpu, torch.bfloat16, 128, 576, 512, deterministic=True).reason
    assert "deterministic backward: one dkv lane per SM" in lanes and "64-key" not in lanes
    assert mla_choice("cuda", gpu, torch.bfloat16, 128, 576, 512, deterministic=True).backward == "cuda-deterministic"
    tri_det = mla_choice("triton", gpu, torch.bfloat16, 8, 576, 512, deterministic=True)
    assert tri_det.backward == "triton-deterministic"
    # the indexer loss's target comes only from a backward that forms P per slot (every CUDA one)
    assert loss_target_reason(auto, 128) is None
    assert loss_target_reason(tri_det, 8) is not None
    assert loss_target_reason(mla_choice("auto", gpu, torch.bfloat16, 256, 576, 512), 256) is None  # CUDA
    tri = mla_choice("triton", gpu, torch.bfloat16, 256, 576, 512)
    assert "all-heads" in loss_target_reason(tri, 256)
    assert loss_target_reason(mla_choice("triton", gpu, torch.bfloat16, 128, 576, 512), 128) is None


def test_deterministic_follows_torch_flag(monkeypatch):
    """``deterministic=None`` reads torch's deterministic-algorithms flag (no environment)."""
    import megatron_dsa.kernels.sparse_mla.dispatch as dispatch

    seen = []
    orig = dispatch.select_backend

    def spy(*args, **kw):
        choice = orig(*args, **kw)
        seen.append(choice.backward)
        return choice

    monkeypatch.setattr(dispatch, "select_backend", spy)
    q, kv, idx, dv = mla_inputs()
    sparse_mla(q, kv, idx, 0.1, d_v=dv, backend="triton")
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        sparse_mla(q, kv, idx, 0.1, d_v=dv, backend="triton")
        sparse_mla(q, kv, idx, 0.1, d_v=dv, backend="triton", deterministic=False)
    finally:
        torch.use_deterministic_algorithms(prev)
    assert seen == ["triton", "triton-deterministic", "triton"]


def test_loss_backend_choice():
    gpu = torch.device("cuda", 0)
    assert loss_choice("auto", gpu, torch.bfloat16, sparse=True).forward == "triton"
    assert loss_choice("auto", gpu, torch.bfloat16, sparse=False).forward == "triton"
    assert loss_choice("auto", gpu, torch.float64, sparse=True).forward == "chunked"


def test_status_reports_every_op():
    rows = status(CPU)
    ops = {choice.op for choice in rows.values()}
    assert ops == {"indexer_topk", "sparse_mla", "indexer_loss"}
    assert all(choice.reason for choice in rows.values())
    from megatron_dsa.kernels import format_status

    text = format_status(rows)
    assert "sparse_mla (bf16, 128 heads" in text and "CUDA build cache:" in text
    assert "no row packing on the reference backward" in text


def test_build_cli_status_runs():
    proc = subprocess.run([sys.executable, "-m", "megatron_dsa.build", "--status"], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "indexer_topk" in proc.stdout and "sparse_mla" in proc.stdout and "indexer_loss" in proc.stdout


def test_library_error_without_nvcc(tmp_path):
    """No compiler anywhere: the library reports why, and the build CLI exits non-zero."""
    code = textwrap.dedent("""
        from megatron_dsa.kernels.sparse_mla import cuda_impl
        print(cuda_impl.library_error())
    """)
    env = {"PATH": "/usr/bin:/bin", "CUDA_HOME": str(tmp_path / "none"), "MEGATRON_DSA_CACHE": str(tmp_path),
           "HOME": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "nvcc not found" in proc.stdout
    cli = subprocess.run([sys.executable, "-m", "megatron_dsa.build"], capture_output=True, text=True,
                         timeout=300, env=env)
    assert cli.returncode == 1 and "nvcc not found" in cli.stderr


@pytest.mark.parametrize("field,value,match", [
    ("indexer_backend", "fast", "indexer_backend must be one of"),
    ("loss_backend", "cuda", "loss_backend must be one of"),
    ("attention_backend", "fast", "attention_backend must be one of"),
])
def test_plugin_config_backends(field, value, match):
    from megatron_dsa.config import DSAPluginConfig

    with pytest.raises(ValueError, match=match):
        DSAPluginConfig(**{field: value})
    assert DSAPluginConfig(attention_backend="cuda").attention_backend == "cuda"
    assert DSAPluginConfig(indexer_backend="cuda").indexer_backend == "cuda"


def test_plugin_config_deterministic_type():
    from megatron_dsa.config import DSAPluginConfig

    with pytest.raises(TypeError, match="deterministic"):
        DSAPluginConfig(deterministic="yes")


# ----------------------------------------------------------------------------- GPU
@GPU
def test_gpu_auto_runs_cuda_on_hopper_and_explicit_cuda_refuses_other_inputs():
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("needs an sm_90 GPU")
    rows = status()
    assert rows["sparse_mla (bf16, 128 heads, d_qk 576, d_v 512)"].forward == "cuda"
    assert rows["sparse_mla (bf16, 16 heads, d_qk 576, d_v 512)"].backward == "cuda-packed"  # auto
    assert rows["sparse_mla (deterministic backward)"].backward == "cuda-deterministic"
    assert rows["sparse_mla (16 heads, attention_row_packing=False)"].backward == "cuda"
    assert rows["sparse_mla (32 heads, attention_row_packing=True)"].forward == "cuda-packed"
    assert rows["indexer_topk (bf16, head dim 128)"].forward == "cuda"  # the CUDA select (Triton score)
    q, kv, idx, dv = mla_inputs("cuda", torch.float32)
    with pytest.raises(RuntimeError, match="cover bf16 with d_qk = 576"):
        sparse_mla(q, kv, idx, 0.1, d_v=dv, backend="cuda")


def test_indexer_cuda_refuses_topk_beyond_its_list(monkeypatch):
    """The CUDA select keeps at most MAX_TOPK candidates per row: a larger topk is refused by
    name before anything runs (the device check is bypassed to reach it on the CPU)."""
    from megatron_dsa.kernels.indexer import cuda_impl, dispatch

    monkeypatch.setattr(dispatch, "cuda_select_reason", lambda device: None)
    q, k, w = torch.randn(1, 4, 2, 16), torch.randn(1, 4, 16), torch.randn(1, 4, 2)
    with pytest.raises(ValueError, match=f"at most {cuda_impl.MAX_TOPK} keys per row, got topk=6145"):
        dispatch.indexer_topk(q, k, w, cuda_impl.MAX_TOPK + 1, backend="cuda")
