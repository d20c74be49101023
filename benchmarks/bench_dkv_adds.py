"""Add-only microbenchmark: how fast can fp32 adds into a [Tk, 576] workspace at random rows go?

The CUDA sparse MLA backward spends ~52 of its 85 ms (S=16K, 128 heads) on its dkv adds; this
measures the add rate by itself, for the access patterns a kernel could issue, with the same
row ids as the benchmark (causal top-k, k = 2048). Each pattern adds `rows x k x 576` values:

  frag     one scalar red per thread, a warp covering 4 keys x 8 channels (the kernel's
           accumulator-fragment order: 4 separate 32-byte sectors per instruction)
  line     one scalar red per thread, a warp covering 32 consecutive channels of one key
           (one full 128-byte line per instruction)
  v4line   red.global.add.v4.f32, a warp covering 128 consecutive channels of one key
  v4frag   red.global.add.v4.f32, a warp covering 16 keys x 8 channels

    PYTHONPATH=$PWD python3 benchmarks/bench_dkv_adds.py [--S 16384] [--hblk 2]
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
// grid: one CTA per (row, repeat); 256 threads; each CTA adds k x 576 values (value = 1e-3)
template <int MODE>
__global__ void adds(float* dkv, const int* idx, int K, int reps) {
  const int t = blockIdx.x / reps;
  const int* ids = idx + (long long)t * K;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;  // 8 warps
  const float v = 1e-3f;
  if (MODE == 0) {  // frag: warp = 4 keys (lane & 3) x 8 channels (lane >> 2)
    for (int k0 = warp * 4; k0 < K; k0 += 32) {
      const int id = ids[k0 + (lane & 3)];
      if (id < 0) continue;
      float* row = dkv + (long long)id * 576 + (lane >> 2);
#pragma unroll 4
      for (int c = 0; c < 576; c += 8) asm volatile("red.global.add.f32 [%0], %1;" ::"l"(row + c), "f"(v) : "memory");
    }
  } else if (MODE == 1) {  // line: warp = 32 consecutive channels of one key
    for (int k = warp; k < K; k += 8) {
      const int id = ids[k];
      if (id < 0) continue;
      float* row = dkv + (long long)id * 576 + lane;
#pragma unroll 6
      for (int c = 0; c < 576; c += 32) asm volatile("red.global.add.f32 [%0], %1;" ::"l"(row + c), "f"(v) : "memory");
    }
  } else if (MODE == 2) {  // v4line: warp = 128 consecutive channels of one key
    for (int k = warp; k < K; k += 8) {
      const int id = ids[k];
      if (id < 0) continue;
      float* row = dkv + (long long)id * 576 + lane * 4;
      for (int c = 0; c < 576; c += 128)
        if (c + lane * 4 < 576)
          asm volatile("red.global.add.v4.f32 [%0], {%1, %1, %1, %1};" ::"l"(row + c), "f"(v) : "memory");
    }
  } else {  // v4frag: warp = 16 keys (lane & 15) x 8 channels (2 x v4, lane >> 4)
    for (int k0 = warp * 16; k0 < K; k0 += 128) {
      const int id = ids[k0 + (lane & 15)];
      if (id < 0) continue;
      float* row = dkv + (long long)id * 576 + (lane >> 4) * 4;
#pragma unroll 4
      for (int c = 0; c < 576; c += 8)
        asm volatile("red.global.add.v4.f32 [%0], {%1, %1, %1, %1};" ::"l"(row + c), "f"(v) : "memory");
    }
  }
}
extern "C" int launch(int mode, void* dkv, const void* idx, int T, int K, int reps, void* stream) {
  dim3 grid(T * reps), block(256);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  float* d = static_cast<float*>(dkv);
  const int* i = static_cast<const int*>(idx);
  if (mode == 0) adds<0><<<grid, block, 0, s>>>(d, i, K, reps);
  else if (mode == 1) adds<1><<<grid, block, 0, s>>>(d, i, K, reps);
  else if (mode == 2) adds<2><<<grid, block, 0, s>>>(d, i, K, reps);
  else adds<3><<<grid, block, 0, s>>>(d, i, K, reps);
  return static_cast<int>(cudaGetLastError());
}
"""

MODES = ["frag", "line", "v4line", "v4frag"]


def build() -> ctypes.CDLL:
    d = tempfile.mkdtemp()
    src, lib = os.path.join(d, "adds.cu"), os.path.join(d, "adds.so")
    with open(src, "w") as f:
        f.write(SRC)
    subprocess.run([ci._nvcc(), "-O3", "-shared", "-Xcompiler", "-fPIC", "-gencode=arch=compute_90a,code=sm_90a",
                    "-o", lib, src], check=True)
    so = ctypes.CDLL(lib)
    so.launch.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                          ctypes.c_void_p]
    return so


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--S", type=int, default=16384)
    ap.add_argument("--k", type=int, default=2048)
    ap.add_argument("--hblk", type=int, default=2, help="adds per (row, key, channel): head blocks")
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args()
    so = build()
    idx = causal_indices(a.S, a.k, "cuda")
    n_adds = int((idx >= 0).sum().item()) * 576 * a.hblk
    dkv = torch.zeros(a.S, 576, device="cuda")
    stream = torch.cuda.current_stream().cuda_stream
    print(f"S={a.S} k={a.k} head blocks={a.hblk}: {n_adds / 1e9:.1f}e9 adds ({n_adds * 4 / 1e9:.0f} GB)")
    print("| pattern | ms | adds | GB/s |")
    for m, name in enumerate(MODES):
        def run():
            err = so.launch(m, dkv.data_ptr(), idx.data_ptr(), a.S, a.k, a.hblk, stream)
            assert err == 0, err
        ms = time_cuda(run, reps=a.reps)
        print(f"| {name} | {ms:.2f} | {n_adds / ms / 1e6:.0f} G/s | {n_adds * 4 / ms / 1e6:.0f} |", flush=True)


if __name__ == "__main__":
    main()
