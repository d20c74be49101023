"""The shipped Triton kernels compile for Hopper (sm_90a) at their launch configurations.

The other CPU tests run the kernels through Triton's interpreter, which checks their numerics
but never compiles them; a kernel that does not compile (or falls off wgmma, or spills) would
only show on a GPU. ``sm90_compile_worker.py`` compiles them ahead of time with Triton's bundled
``ptxas`` (no GPU needed) and reads each cubin with its bundled ``cuobjdump``.
"""

import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))

# Kernels that spill at their launch configuration, with the largest stack frame (bytes) seen
# with Triton 3.6 and 3.8: the 128-head Triton sparse MLA kernels (the fallback and
# deterministic paths; docs/kernels_sparse_mla.md), the sparse loss's dq/dw, the select kernel
# (3.8 only), the packed all-heads Triton backward (64 tile rows with the per-row slot tile and
# the per-row target sums: 48 B). A kernel not listed must not spill; a listed one must not
# spill more.
KNOWN_SPILLS = {"loss dq/dw sparse": 32, "indexer select": 8, "sparse_mla fwd 128 heads": 64,
                "sparse_mla bwd all heads 16 packed": 48,
                "sparse_mla bwd all heads 128": 64, "sparse_mla bwd per head block 128": 1184,
                "sparse_mla bwd per head block 128 deterministic": 856}
# no matrix products
NO_DOTS = ("KL", "select", "stats", "segment reduce", "pack rows", "quantize")

@pytest.fixture(scope="module")
def compiled():
    triton = pytest.importorskip("triton")
    import triton.backends.nvidia

    tool = os.path.join(os.path.dirname(triton.backends.nvidia.__file__), "bin", "cuobjdump")
    if not os.path.exists(tool):
        pytest.skip(f"this Triton has no bundled cuobjdump ({tool})")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, os.path.join(HERE, "sm90_compile_worker.py")], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_every_kernel_compiles_for_sm90(compiled):
    assert len(compiled) >= 28
    failed = {k: v["error"] for k, v in compiled.items() if "error" in v}
    assert not failed, failed


def test_kernels_run_on_tensor_cores(compiled):
    """wgmma wherever a tile has >= 64 rows (fp8 wgmma for e4m3); the 16-head sparse MLA
    kernels' 16-row tiles run mma.sync (the row-packed one has 64 rows)."""
    for label, r in compiled.items():
        if any(x in label for x in NO_DOTS):
            continue
        if label.startswith("sparse_mla") and " 16" in label and "packed" not in label:
            assert r["HMMA"] > 0, (label, r)  # (packed: 64 tile rows, wgmma)
        else:
            assert r["HGMMA"] + r["QGMMA"] > 0, (label, r)
    assert compiled["indexer score e4m3"]["QGMMA"] > 0 and compiled["indexer score e4m3"]["HGMMA"] == 0
    assert compiled["indexer score bf16"]["HGMMA"] > 0
    # q tiles by TMA (a contiguous q, the launcher's default)
    assert compiled["indexer score bf16"]["UTMALDG"] > 0 and compiled["indexer score e4m3"]["UTMALDG"] > 0


def test_no_new_spills_and_shared_memory_fits(compiled):
    spilling = {k: v["stack"] for k, v in compiled.items() if v["stack"] > KNOWN_SPILLS.get(k, 0)}
    assert not spilling, spilling
    for label, r in compiled.items():
        assert r["smem"] <= 227 * 1024, (label, r["smem"])


def test_e4m3_quantization_converts_in_hardware(compiled):
    """On sm_89+ the quantization forms its e4m3 bytes with the GPU's conversion (two values per
    instruction); the integer path (Triton's interpreter, older GPUs) has none."""
    assert compiled["indexer e4m3 quantize"]["F2FP.SATFINITE.E4M3"] > 0
    assert compiled["indexer e4m3 quantize integer path"]["F2FP.SATFINITE.E4M3"] == 0
