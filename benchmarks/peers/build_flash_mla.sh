#!/usr/bin/env bash
# Build ONLY FlashMLA's sparse-prefill forward (flash_mla_sparse_fwd) for Hopper
# (sm_90a) as a Python wheel, against torch 2.11.0+cu130 (CUDA 13 nvcc).
# Works on a CPU-only machine (compile only; no GPU needed).
#
# Usage: benchmarks/peers/build_flash_mla.sh OUT_DIR
#
# Result: OUT_DIR/flash_mla-1.0.0+<sha>-cp312-cp312-linux_x86_64.whl
#   (contains the unmodified flash_mla/ python package + flash_mla/cuda*.so that
#    exports only `sparse_prefill_fwd`; other flash_mla entry points import fine
#    but fail when called).
#   Install on the GPU machine:
#     pip install --no-deps --target /tmp/flashmla_site OUT_DIR/flash_mla-*.whl
#     PYTHONPATH=/tmp/flashmla_site python -c 'import flash_mla; print(flash_mla.flash_mla_sparse_fwd)'
#
# Environment knobs:
#   PYTHON            python that has torch==2.11.0 (+cu130) importable (default: python3).
#                     If torch is missing and MAKE_VENV=1, a venv is created in WORK/venv
#                     and torch==2.11.0 is pip-installed from PyPI (PyPI's 2.11.0 IS +cu130).
#   WORK              scratch dir (default: OUT_DIR/_work)
#   FLASHMLA_SRC      existing FlashMLA source tree WITH csrc/cutlass populated (skips fetching)
#   FLASHMLA_GITDIR   bare git dir of deepseek-ai/FlashMLA (e.g. a mirror); else git clone from GitHub
#   CUTLASS_GITDIR    bare git dir of NVIDIA/cutlass;              else git clone from GitHub
#   FLASHMLA_COMMIT   default b7643bd54521f563b839b98289b5cd048c062ba2 = branch nv_dev (2026-04-30).
#                     nv_dev is needed by Megatron-Core 0.19.2's cudnn DSA backend, which calls
#                     flash_mla_sparse_fwd(..., indexer_topk=0); main (9241ae3) lacks that kwarg.
#   CUTLASS_COMMIT    default: the submodule pin of FLASHMLA_COMMIT (147f5673d0c1c3dcf66f78d677fd647e4a020219)
#   CUDA_HOME         default /usr/local/cuda (needs nvcc >= 12.3; tested with 13.0.88)
#   MAX_JOBS          parallel nvcc jobs (default 2; each needs ~4-6 GB RAM)
set -euo pipefail

OUT_DIR=${1:?usage: $0 OUT_DIR}
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
WORK=${WORK:-$OUT_DIR/_work}
mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)
FLASHMLA_COMMIT=${FLASHMLA_COMMIT:-b7643bd54521f563b839b98289b5cd048c062ba2}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export PATH="$CUDA_HOME/bin:$PATH"
export MAX_JOBS=${MAX_JOBS:-2}
PYTHON=${PYTHON:-python3}
T0=$(date +%s)

# ---------------------------------------------------------------- python / torch
if ! "$PYTHON" -c 'import torch' 2>/dev/null; then
    if [[ "${MAKE_VENV:-0}" == 1 ]]; then
        "$PYTHON" -m venv "$WORK/venv"
        PYTHON="$WORK/venv/bin/python"
        "$PYTHON" -m pip install -q torch==2.11.0 ninja "setuptools<82" wheel
    else
        echo "torch not importable from $PYTHON (set PYTHON=... or MAKE_VENV=1)" >&2; exit 1
    fi
fi
"$PYTHON" -m pip install -q ninja wheel 2>/dev/null || true
"$PYTHON" - <<'EOF'
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "cxx11abi", torch._C._GLIBCXX_USE_CXX11_ABI)
assert torch.__version__.startswith("2.11.0"), torch.__version__
assert (torch.version.cuda or "").startswith("13"), torch.version.cuda
EOF
"$CUDA_HOME/bin/nvcc" --version | tail -2

# ---------------------------------------------------------------- sources
SRC="$WORK/FlashMLA"
if [[ -n "${FLASHMLA_SRC:-}" ]]; then
    rm -rf "$SRC"; cp -a "$FLASHMLA_SRC" "$SRC"
else
    if [[ -z "${FLASHMLA_GITDIR:-}" ]]; then
        [[ -d "$WORK/FlashMLA.git" ]] || git clone --bare -q https://github.com/deepseek-ai/FlashMLA "$WORK/FlashMLA.git"
        FLASHMLA_GITDIR="$WORK/FlashMLA.git"
    fi
    CUTLASS_COMMIT=${CUTLASS_COMMIT:-$(git --git-dir="$FLASHMLA_GITDIR" ls-tree "$FLASHMLA_COMMIT" csrc/cutlass | awk '{print $3}')}
    if [[ -z "${CUTLASS_GITDIR:-}" ]]; then
        [[ -d "$WORK/cutlass.git" ]] || git clone --bare -q --filter=blob:none https://github.com/NVIDIA/cutlass "$WORK/cutlass.git"
        CUTLASS_GITDIR="$WORK/cutlass.git"
    fi
    echo "FlashMLA $FLASHMLA_COMMIT  CUTLASS $CUTLASS_COMMIT"
    rm -rf "$SRC"; mkdir -p "$SRC/csrc/cutlass"
    git --git-dir="$FLASHMLA_GITDIR" archive "$FLASHMLA_COMMIT" | tar -x -C "$SRC"
    # only the header trees are needed (a missing media blob in some mirrors is harmless)
    git --git-dir="$CUTLASS_GITDIR" archive "$CUTLASS_COMMIT" include tools/util/include | tar -x -C "$SRC/csrc/cutlass"
fi
test -f "$SRC/csrc/cutlass/include/cute/tensor.hpp"
test -f "$SRC/csrc/sm90/prefill/sparse/phase1.cuh"

# ---------------------------------------------------------------- sm90-only API shim
# csrc/api/api.cpp binds every kernel (sm100, decode, dense); csrc/api/sparse_fwd.h
# references sm100 template instantiations. We generate a copy of sparse_fwd.h with
# the sm100 implementations removed and bind only sparse_prefill_fwd.
"$PYTHON" - "$SRC" <<'EOF'
import sys, re, pathlib
src = pathlib.Path(sys.argv[1])
h = (src / "csrc/api/sparse_fwd.h").read_text()
# 1. drop sm100 header includes
h, n = re.subn(r'#include "sm100/[^"]*"\n', "", h); assert n >= 1, n
# 2. drop the sm100 Impl classes (everything between the first sm100 class and the interface fn)
a = h.index("class Fwd_Sm100_Head64_Impl")
b = h.index("static std::vector<at::Tensor> sparse_attn_prefill_interface")
h = h[:a] + h[b:]
# 3. replace the sm100 dispatch branch
a = h.index("} else if (is_sm100f) {")
b = h.index('TORCH_CHECK(false, "Unsupported architecture");')
h = h[:a] + "} else {\n        " + 'TORCH_CHECK(false, "This FlashMLA build only contains the sm_90a sparse prefill kernels");' + h[b + len('TORCH_CHECK(false, "Unsupported architecture");'):]
assert "sm100" not in h.replace("is_sm100f", ""), "sm100 reference left"
(src / "csrc/api/sparse_fwd_sm90_only.h").write_text(h)
# 4. api.cpp -> keep only the sparse_prefill_fwd binding (its arg names/defaults differ by branch)
api = (src / "csrc/api/api.cpp").read_text()
api, n = re.subn(r'#include "(sparse_decode|dense_decode|dense_fwd)\.h"\n', "", api); assert n == 3, n
api = api.replace('#include "sparse_fwd.h"', '#include "sparse_fwd_sm90_only.h"')
def keep(m):
    return m.group(0) if m.group(1) == "sparse_prefill_fwd" else ""
api, n = re.subn(r'[ \t]*m\.def\(\s*"(\w+)".*?\);\n', keep, api, flags=re.S); assert n == 5, n
assert "sparse_prefill_fwd" in api
(src / "csrc/api/api_sm90_sparse_fwd.cpp").write_text(api)
print("generated csrc/api/sparse_fwd_sm90_only.h, csrc/api/api_sm90_sparse_fwd.cpp")
EOF

# ---------------------------------------------------------------- missing CUDA headers
# torch's ATen/cuda headers include cusparse.h, cublas_v2.h, cusolverDn.h, ... A minimal
# CUDA toolkit (nvcc + cudart only) lacks them; torch's pip deps (nvidia/cu13/include) have
# them. Symlink ONLY the headers that CUDA_HOME/include lacks, so the toolkit's own cudart
# headers still take precedence.
EXTRA_INC="$WORK/extra_cuda_include"
rm -rf "$EXTRA_INC"; mkdir -p "$EXTRA_INC"
"$PYTHON" - "$CUDA_HOME/include" "$EXTRA_INC" <<'PYEOF'
import sys, os, glob, sysconfig
cuda_inc, extra = sys.argv[1:3]
n = 0
for d in sorted(glob.glob(os.path.join(sysconfig.get_paths()["purelib"], "nvidia", "*", "include"))):
    for name in os.listdir(d):
        if not os.path.exists(os.path.join(cuda_inc, name)) and not os.path.exists(os.path.join(extra, name)):
            os.symlink(os.path.join(d, name), os.path.join(extra, name)); n += 1
print(f"linked {n} headers missing from {cuda_inc} into {extra}")
PYEOF

# ---------------------------------------------------------------- minimal setup.py
cat > "$SRC/setup_sm90_sparse_fwd.py" <<EOF
import os
from pathlib import Path
from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CUDAExtension

this_dir = Path(__file__).resolve().parent
cxx_args = ["-O3", "-std=c++20", "-DNDEBUG", "-Wno-deprecated-declarations"]
nvcc_args = [
    "-O3", "-std=c++20", "-DNDEBUG", "-D_USE_MATH_DEFINES", "-Wno-deprecated-declarations",
    "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
    "-U__CUDA_NO_HALF2_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "--expt-relaxed-constexpr", "--expt-extended-lambda", "--use_fast_math",
    "--ptxas-options=-v,--register-usage-level=10,--warn-on-spills,--warn-on-local-memory-usage",
    "-lineinfo",
    "-gencode", "arch=compute_90a,code=sm_90a",
    "--threads", "1",
]
setup(
    name="flash_mla",
    version="1.0.0+${FLASHMLA_COMMIT:0:7}.sm90sparsefwd",
    packages=["flash_mla"],
    ext_modules=[CUDAExtension(
        name="flash_mla.cuda",
        sources=[
            "csrc/api/api_sm90_sparse_fwd.cpp",
            "csrc/sm90/prefill/sparse/instantiations/phase1_k512.cu",
            "csrc/sm90/prefill/sparse/instantiations/phase1_k512_topklen.cu",
            "csrc/sm90/prefill/sparse/instantiations/phase1_k576.cu",
            "csrc/sm90/prefill/sparse/instantiations/phase1_k576_topklen.cu",
        ],
        extra_compile_args={"cxx": cxx_args, "nvcc": nvcc_args},
        include_dirs=[
            this_dir / "csrc",
            this_dir / "csrc" / "kerutils" / "include",
            this_dir / "csrc" / "sm90",
            this_dir / "csrc" / "cutlass" / "include",
            this_dir / "csrc" / "cutlass" / "tools" / "util" / "include",
            "$EXTRA_INC",
        ],
    )],
    cmdclass={"build_ext": BuildExtension},
)
EOF

# ---------------------------------------------------------------- build
cd "$SRC"
# TORCH_CUDA_ARCH_LIST only affects torch's default flags; our -gencode is explicit.
export TORCH_CUDA_ARCH_LIST="9.0a"
echo "building (log: $OUT_DIR/build.log) ..."
if ! "$PYTHON" setup_sm90_sparse_fwd.py bdist_wheel -d "$OUT_DIR" > "$OUT_DIR/build.log" 2>&1; then
    grep -E "error" "$OUT_DIR/build.log" | head -40; tail -40 "$OUT_DIR/build.log"; exit 1
fi
grep -E "ptxas info *: Used|spill stores" "$OUT_DIR/build.log" | sort | uniq -c | head -20 || true
WHL=$(ls -t "$OUT_DIR"/flash_mla-*.whl | head -1)
echo "wheel: $WHL ($(du -h "$WHL" | cut -f1))"

# ---------------------------------------------------------------- checks (no GPU needed)
SO=$(ls "$SRC"/build/lib*/flash_mla/cuda*.so | head -1)
ls -l "$SO"
if ! nm -D --undefined-only "$SO" | c++filt | grep -E "sm100|sm90::fwd::run_fwd_phase1_kernel"; then
    echo "OK: no unresolved FlashMLA kernel symbols"
else
    echo "ERROR: unresolved kernel symbols above" >&2; exit 1
fi
# (a minimal toolkit has no cuobjdump; `pip install nvidia-cuda-cuobjdump` gives one in nvidia/cu13/bin)
if command -v cuobjdump >/dev/null || [[ -x "$CUDA_HOME/bin/cuobjdump" ]]; then
    PATH="$CUDA_HOME/bin:$PATH" cuobjdump --list-elf "$SO" || true
fi
# import smoke test (CPU is enough: loads the .so against this torch, resolves all symbols)
cd "$WORK"   # not $SRC: its flash_mla/ source dir would shadow the installed package
rm -rf "$WORK/site"
"$PYTHON" -m pip install -q --no-deps --target "$WORK/site" "$WHL"
PYTHONPATH="$WORK/site" "$PYTHON" -W ignore - <<'EOF2'
import inspect, torch, flash_mla, flash_mla.cuda as c
from flash_mla import flash_mla_sparse_fwd
print("import OK:", flash_mla.__file__)
print("flash_mla.cuda exports:", [n for n in dir(c) if not n.startswith("_")])
print("flash_mla_sparse_fwd", inspect.signature(flash_mla_sparse_fwd))
EOF2
echo "build wall time: $(( $(date +%s) - T0 )) s"
