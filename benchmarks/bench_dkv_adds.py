"""Add-only microbenchmark: how fast can fp32 adds into a [Tk, 576] workspace at random rows go?

The CUDA sparse MLA backward spends ~52 of its 85 ms (S=16K, 128 heads) on its dkv adds; this
measures the add rate by itself, for the access patterns a kernel could issue, with the same
row ids as the benchmark (causal top-k, k = 2048) and with uniform random ids (no hot rows).
Each pattern adds `rows x k x 576 x hblk` values; `KxB` = keys per warp instruction x contiguous
bytes per key (scalar `red.global.add.f32`, or `.v2` / `.v4`). "frag 4x32B" is the kernel's
order today; "v4x64 8x64B" is what a v4 add straight from an accumulator fragment gives when
the workspace's columns are stored permuted (each thread's 4 values made contiguous, undone by
the final cast). Issuers: one CTA of 8 warps per row (the GPU full of add warps), or n x SMs
CTAs of 4 warps (the kernel: one warpgroup per SM issues the adds).

    PYTHONPATH=$PWD python3 benchmarks/bench_dkv_adds.py [--S 16384] [--hblk 2] [--persist 0,1,2] [--ids causal,uniform]
"""

from __future__ import annotations

import argparse
import ctypes
import os
import subprocess
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench_sparse_mla import causal_indices  # noqa: E402
from common import time_cuda  # noqa: E402

from megatron_dsa.kernels.sparse_mla import cuda_impl as ci  # noqa: E402

SRC = r"""
#include <cuda_runtime.h>
#include <stdint.h>
// One warp instruction adds VEC floats per lane to KPI keys (32 / KPI lanes per key, so
// 32 / KPI * VEC * 4 contiguous bytes per key). Each (row, repeat) adds k x 576 values.
// Grid: PERSIST == 0: one CTA of 256 threads per (row, repeat), many CTAs per SM;
//       PERSIST == 1: `gridDim.x` CTAs of 128 threads (4 warps, as the kernel's add warpgroup)
//       striding over (row, repeat).
template <int KPI, int VEC>
__device__ __forceinline__ void add_row(float* dkv, const int* ids, int K, int warp, int nwarps, int lane) {
  constexpr int LPK = 32 / KPI;         // lanes per key
  constexpr int STEP = LPK * VEC;       // channels per key per instruction
  const float v = 1e-3f;
  for (int k0 = warp * KPI; k0 < K; k0 += nwarps * KPI) {
    const int id = ids[k0 + lane / LPK];
    if (id < 0) continue;
    float* row = dkv + (long long)id * 576 + (lane % LPK) * VEC;
#pragma unroll 4
    for (int c = 0; c < 576; c += STEP) {
      if (STEP > 64 && c + (lane % LPK) * VEC >= 576) continue;
      if (VEC == 1) asm volatile("red.global.add.f32 [%0], %1;" ::"l"(row + c), "f"(v) : "memory");
      else if (VEC == 2) asm volatile("red.global.add.v2.f32 [%0], {%1, %1};" ::"l"(row + c), "f"(v) : "memory");
      else asm volatile("red.global.add.v4.f32 [%0], {%1, %1, %1, %1};" ::"l"(row + c), "f"(v) : "memory");
    }
  }
}
template <int KPI, int VEC, int PERSIST>
__global__ void adds(float* dkv, const int* idx, int T, int K, int reps) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  if (PERSIST == 0) {
    const int t = blockIdx.x / reps;
    add_row<KPI, VEC>(dkv, idx + (long long)t * K, K, warp, nwarps, lane);
  } else {
    for (int w = blockIdx.x; w < T * reps; w += gridDim.x)
      add_row<KPI, VEC>(dkv, idx + (long long)(w / reps) * K, K, warp, nwarps, lane);
  }
}
#define CASE(i, KPI, VEC)                                                                      \
  if (mode == i) {                                                                              \
    if (persist) adds<KPI, VEC, 1><<<persist, 128, 0, s>>>(d, ix, T, K, reps);                  \
    else adds<KPI, VEC, 0><<<T * reps, 256, 0, s>>>(d, ix, T, K, reps);                         \
  }
extern "C" int launch(int mode, int persist, void* dkv, const void* idx, int T, int K, int reps, void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  float* d = static_cast<float*>(dkv);
  const int* ix = static_cast<const int*>(idx);
  CASE(0, 4, 1)   // frag:    4 keys x 32 B, scalar (the kernel today)
  CASE(1, 1, 1)   // line:    1 key x 128 B, scalar
  CASE(2, 1, 4)   // v4line:  1 key x 512 B
  CASE(3, 16, 4)  // v4frag:  16 keys x 32 B
  CASE(4, 8, 4)   // v4x64:   8 keys x 64 B (fragment order with permuted dkv columns)
  CASE(5, 4, 4)   // v4x128:  4 keys x 128 B
  CASE(6, 8, 2)   // v2x32:   8 keys x 32 B
  CASE(7, 4, 2)   // v2x64:   4 keys x 64 B
  return static_cast<int>(cudaGetLastError());
}
"""

MODES = ["frag 4x32B s", "line 1x128B s", "v4line 1x512B", "v4frag 16x32B", "v4x64 8x64B", "v4x128 4x128B",
         "v2x32 8x32B", "v2x64 4x64B"]


def build() -> ctypes.CDLL:
    d = tempfile.mkdtemp()
    src, lib = os.path.join(d, "adds.cu"), os.path.join(d, "adds.so")
    with open(src, "w") as f:
        f.write(SRC)
    subprocess.run([ci._nvcc(), "-O3", "-shared", "-Xcompiler", "-fPIC", "-gencode=arch=compute_90a,code=sm_90a",
                    "-o", lib, src], check=True)
    so = ctypes.CDLL(lib)
    so.launch.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_void_p]
    return so


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--S", type=int, default=16384)
    ap.add_argument("--k", type=int, default=2048)
    ap.add_argument("--hblk", type=int, default=2, help="adds per (row, key, channel): head blocks")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--modes", default=",".join(str(i) for i in range(len(MODES))))
    ap.add_argument("--persist", default="0,1,2", help="0: one CTA per row; n: n x SMs CTAs of 4 warps")
    ap.add_argument("--ids", default="causal,uniform")
    a = ap.parse_args()
    so = build()
    nsm = torch.cuda.get_device_properties(0).multi_processor_count
    stream = torch.cuda.current_stream().cuda_stream
    dkv = torch.zeros(a.S, 576, device="cuda")
    print("| ids | issuers | pattern | ms | G adds/s | GB/s |")
    print("|---|---|---|---|---|---|")
    for ids in a.ids.split(","):
        if ids == "causal":
            idx = causal_indices(a.S, a.k, "cuda")
        else:  # every row k distinct uniform ids over all keys: no hot rows
            idx = torch.rand(a.S, a.S, device="cuda").topk(a.k, dim=1).indices.int() if a.S <= 16384 else None
        n_adds = int((idx >= 0).sum().item()) * 576 * a.hblk
        for p in (int(x) for x in a.persist.split(",")):
            grid = p * nsm
            for m in (int(x) for x in a.modes.split(",")):
                def run():
                    err = so.launch(m, grid, dkv.data_ptr(), idx.data_ptr(), a.S, a.k, a.hblk, stream)
                    assert err == 0, err
                dkv.zero_()
                run()
                got = dkv.double().sum().item()
                assert abs(got - n_adds * 1e-3) < 1e-3 * n_adds * 1e-3, (MODES[m], got, n_adds * 1e-3)
                ms = time_cuda(run, reps=a.reps)
                who = "1 CTA/row, 8 warps" if p == 0 else f"{p}x{nsm} CTAs, 4 warps"
                print(f"| {ids} | {who} | {MODES[m]} | {ms:.2f} | {n_adds / ms / 1e6:.0f} | {n_adds * 4 / ms / 1e6:.0f} |",
                      flush=True)


if __name__ == "__main__":
    main()
