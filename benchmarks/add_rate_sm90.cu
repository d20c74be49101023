// Experiment (kept in git history, not in the tree): nvcc -gencode arch=compute_90a,code=sm_90a -O3 -std=c++17 -o add_rate add_rate_sm90.cu && ./add_rate 16384
// Add-only microbenchmark: the sparse MLA backward's dkv adds (T rows x 2048 slots x 576 fp32)
// as red.global.add.v4.f32 (the shipped pattern: 4 warps, 8 lanes per 128-byte line, 4 keys
// per instruction) against cp.reduce.async.bulk (TMA bulk add from a shared-memory staging tile).
#include <cstdio>
#include <cstdint>
#include <vector>
#include <algorithm>
#include <cuda_runtime.h>

#define CK(x) do { cudaError_t e = (x); if (e != cudaSuccess) { printf("%s:%d %s\n", __FILE__, __LINE__, cudaGetErrorString(e)); exit(1);} } while (0)

constexpr int K = 2048, C = 576, BN = 32;

__global__ void make_ids(int* ids, int T, int Tk, int sorted_unused) {
  int t = blockIdx.x;
  for (int j = threadIdx.x; j < K; j += blockDim.x) {
    int v;
    if (t + 1 <= K) v = j <= t ? j : -1;
    else {
      uint32_t h = (uint32_t)t * 2654435761u ^ (uint32_t)j * 40503u;
      h ^= h >> 13; h *= 0x5bd1e995u; h ^= h >> 15;
      v = (int)(h % (uint32_t)(t + 1));
    }
    ids[(size_t)t * K + j] = v;
  }
}

__device__ __forceinline__ void red4(float* p, float a, float b, float c, float d) {
  asm volatile("red.global.add.v4.f32 [%0], {%1, %2, %3, %4};\n" ::"l"(p), "f"(a), "f"(b), "f"(c), "f"(d) : "memory");
}

// variant 0: ids only; 1: red.v4; 2: bulk per key (2304 B); 3: bulk 256 B ops; 4: bulk per key, 4 issuing lanes
template <int V, int NW = 4>
__global__ void __launch_bounds__(NW * 32, 1) adds(const int* __restrict__ ids, float* ws, float val, int* sink) {
  extern __shared__ __align__(128) unsigned char smem[];
  const int t = blockIdx.x, tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int* row = ids + (size_t)t * K;
  int acc = 0;
  uint32_t sbase = (uint32_t)__cvta_generic_to_shared(smem);
  int buf = 0;
  for (int b0 = 0; b0 < K; b0 += BN) {
    if (V == 0) {
      acc += row[b0 + tid % BN];
    } else if (V == 1) {
      // 32 keys x 18 lines; a warp instruction: 4 keys (lane / 8), 16 B each of 8 lanes
#pragma unroll 4
      for (int it = 0; it < 144 / NW; ++it) {
        int L = (it * NW + warp) * 4 + lane / 8;  // 0..575 line-slots
        int key = L % BN, line = L / BN;         // 18 lines of a key
        int id = row[b0 + key];
        if (id >= 0) red4(ws + (size_t)id * C + line * 32 + (lane % 8) * 4, val, val, val, val);
      }
    } else {
      // stage the block's 32 keys x 2304 B into buffer `buf`, then bulk-add
      const uint32_t sb = sbase + buf * (BN * C * 4);
      if (tid == 0) asm volatile("cp.async.bulk.wait_group.read 1;\n" ::: "memory");
      asm volatile("bar.sync 1, 128;\n" ::: "memory");
#pragma unroll 4
      for (int it = 0; it < 36; ++it) {
        int g = it * 128 + tid;  // 16-byte granule of the tile
        asm volatile("st.shared.v4.f32 [%0], {%1, %2, %3, %4};\n" ::"r"(sb + g * 16), "f"(val), "f"(val), "f"(val), "f"(val) : "memory");
      }
      asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
      asm volatile("bar.sync 1, 128;\n" ::: "memory");
      if (V == 2 && warp == 0) {
        int id = row[b0 + lane];
        if (id >= 0)
          asm volatile("cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32 [%0], [%1], %2;\n" ::"l"(ws + (size_t)id * C), "r"(sb + lane * C * 4), "r"(C * 4) : "memory");
        if (lane == 0) asm volatile("cp.async.bulk.commit_group;\n" ::: "memory");
      } else if (V == 3) {
        // 32 keys x 9 ops of 256 B, spread over the 4 warps' lanes
        for (int o = tid; o < BN * 9; o += 128) {
          int key = o / 9, part = o % 9;
          int id = row[b0 + key];
          if (id >= 0)
            asm volatile("cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32 [%0], [%1], %2;\n" ::"l"(ws + (size_t)id * C + part * 64), "r"(sb + (key * C + part * 64) * 4), "r"(256) : "memory");
        }
        asm volatile("cp.async.bulk.commit_group;\n" ::: "memory");
      } else if (V == 4 && warp == 0 && lane < 4) {
        for (int key = lane; key < BN; key += 4) {
          int id = row[b0 + key];
          if (id >= 0)
            asm volatile("cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32 [%0], [%1], %2;\n" ::"l"(ws + (size_t)id * C), "r"(sb + key * C * 4), "r"(C * 4) : "memory");
        }
        asm volatile("cp.async.bulk.commit_group;\n" ::: "memory");
      }
      buf ^= 1;
    }
  }
  if (V >= 2) asm volatile("cp.async.bulk.wait_group 0;\n" ::: "memory");
  if (V == 0 && acc == 12345) sink[0] = acc;
}

template <int V, int NW = 4>
float run(const int* ids, float* ws, int T, int Tk, int* sink, int reps, const char* name, std::vector<float>* out) {
  size_t smem = 2 * BN * C * 4 + 1024;
  CK(cudaFuncSetAttribute((adds<V, NW>), cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
  cudaEvent_t a, b; cudaEventCreate(&a); cudaEventCreate(&b);
  std::vector<float> ms;
  for (int r = 0; r < reps; ++r) {
    CK(cudaMemset(ws, 0, (size_t)Tk * C * 4));
    cudaEventRecord(a);
    adds<V, NW><<<T, NW * 32, smem>>>(ids, ws, 1.0f, sink);
    cudaEventRecord(b);
    CK(cudaEventSynchronize(b));
    float m; cudaEventElapsedTime(&m, a, b); ms.push_back(m);
  }
  CK(cudaGetLastError());
  std::sort(ms.begin(), ms.end());
  if (out) { out->resize((size_t)Tk * C); CK(cudaMemcpy(out->data(), ws, (size_t)Tk * C * 4, cudaMemcpyDeviceToHost)); }
  printf("%-28s T=%6d  median %8.3f ms  min %8.3f\n", name, T, ms[reps / 2], ms[0]);
  return ms[reps / 2];
}

int main(int argc, char** argv) {
  int T = argc > 1 ? atoi(argv[1]) : 16384;
  int Tk = T;
  int *ids, *sink; float* ws;
  CK(cudaMalloc(&ids, (size_t)T * K * 4)); CK(cudaMalloc(&ws, (size_t)Tk * C * 4)); CK(cudaMalloc(&sink, 4));
  make_ids<<<T, 256>>>(ids, T, Tk, 0);
  CK(cudaDeviceSynchronize());
  std::vector<float> r1, r2, r3, r4;
  run<0>(ids, ws, T, Tk, sink, 5, "ids only", nullptr);
  run<1>(ids, ws, T, Tk, sink, 5, "red.v4 (shipped pattern)", &r1);
  run<1, 8>(ids, ws, T, Tk, sink, 5, "red.v4, 8 warps", nullptr);
  run<1, 12>(ids, ws, T, Tk, sink, 5, "red.v4, 12 warps", nullptr);
  run<1, 16>(ids, ws, T, Tk, sink, 5, "red.v4, 16 warps", nullptr);
  run<2>(ids, ws, T, Tk, sink, 5, "bulk 2304 B / key, 32 lanes", &r2);
  run<3>(ids, ws, T, Tk, sink, 5, "bulk 256 B ops", &r3);
  run<4>(ids, ws, T, Tk, sink, 5, "bulk 2304 B / key, 4 lanes", &r4);
  size_t bad2 = 0, bad3 = 0, bad4 = 0;
  for (size_t i = 0; i < r1.size(); ++i) { bad2 += r1[i] != r2[i]; bad3 += r1[i] != r3[i]; bad4 += r1[i] != r4[i]; }
  printf("mismatches vs red.v4: bulk/key %zu, bulk 256 %zu, bulk 4 lanes %zu (of %zu)\n", bad2, bad3, bad4, r1.size());
  return 0;
}
