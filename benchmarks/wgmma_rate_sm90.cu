// wgmma issue rate by N (benchmarks/bench_wgmma_rate.py): how many SM cycles one
// wgmma.m64nNk16 bf16 (both operands in shared memory, 128-byte swizzle) takes when a
// warpgroup issues chains of them on one accumulator, with WGS warpgroups per CTA and one
// CTA per SM. For the 16-head forward: its transposed S^T = K Q^T is m64n16k16.
#include <cstdint>
#include "../megatron_dsa/kernels/sparse_mla/cuda/sm90_common.cuh"

#ifndef WGS
#define WGS 1
#endif

namespace {
using namespace dsa_sm90;

template <int N>
__device__ __forceinline__ void mma(float* d, uint64_t da, uint64_t db);

template <>
__device__ __forceinline__ void mma<16>(float* d, uint64_t da, uint64_t db) {
  asm volatile(
      "wgmma.mma_async.sync.aligned.m64n16k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7}, %8, %9, 1, 1, 1, 0, 0;\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7])
      : "l"(da), "l"(db));
}
template <>
__device__ __forceinline__ void mma<32>(float* d, uint64_t da, uint64_t db) {
  wgmma_m64n32k16_ss<0, 0>(*reinterpret_cast<float(*)[16]>(d), da, db, 1);  // sm90_common's wrapper
}
template <>
__device__ __forceinline__ void mma<64>(float* d, uint64_t da, uint64_t db) {
  asm volatile(
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, "
      "%12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, %32, %33, "
      "1, 1, 1, 0, 0;\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]),
        "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]),
        "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]),
        "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
      : "l"(da), "l"(db));
}

// CHAIN wgmmas on one accumulator (k-steps through a 64-channel chunk pair), committed and
// waited; iters times. Every warpgroup of the CTA does the same on its own accumulator.
template <int N, int CHAIN>
__global__ void __launch_bounds__(128 * WGS, 1) wgmma_rate_kernel(int iters, float* sink, long long* cycles) {
  extern __shared__ __align__(1024) uint8_t smem[];
  const uint32_t base = (smem_u32(smem) + 1023u) & ~1023u;
  for (int i = threadIdx.x; i < 48 * 1024 / 16; i += blockDim.x)
    reinterpret_cast<uint4*>(smem)[i] = make_uint4(0u, 0u, 0u, 0u);
  fence_async_smem();
  __syncthreads();
  float d[N / 2];
#pragma unroll
  for (int i = 0; i < N / 2; ++i) d[i] = 0.f;
  const long long c0 = clock64();
  for (int it = 0; it < iters; ++it) {
    wgmma_fence();
#pragma unroll
    for (int k = 0; k < CHAIN; ++k) {
      // A: [64 rows, 128 B] chunks at base, B: [N rows, 128 B] chunks at base + 16 KB; k-step
      // (k % 4) within a chunk advances 32 bytes
      const uint64_t da = desc(base + (k / 4 % 2) * 8192 + (k % 4) * 32, 16, 1024);
      const uint64_t db = desc(base + 16384 + (k / 4 % 2) * 8192 + (k % 4) * 32, 16, 1024);
      mma<N>(d, da, db);
    }
    wgmma_commit();
    wgmma_wait0();
  }
  const long long c1 = clock64();
  float s = 0.f;
#pragma unroll
  for (int i = 0; i < N / 2; ++i) s += d[i];
  if (s == 12345.f) sink[threadIdx.x] = s;  // keeps the MMAs
  if (threadIdx.x == 0) cycles[blockIdx.x] = c1 - c0;
}

// mma.sync.m16n8k16 (bf16, register operands) for comparison: every warp of the CTA runs ACC
// independent accumulators, CHAIN dependent MMAs each per round; iters rounds.
template <int ACC>
__global__ void __launch_bounds__(128 * WGS, 1) mma_sync_rate_kernel(int iters, float* sink, long long* cycles) {
  uint32_t a[4], b[2];
#pragma unroll
  for (int i = 0; i < 4; ++i) a[i] = threadIdx.x * 0x00010001u * (i + 1);
  b[0] = threadIdx.x;
  b[1] = threadIdx.x + 7;
  float d[ACC][4];
#pragma unroll
  for (int j = 0; j < ACC; ++j) d[j][0] = d[j][1] = d[j][2] = d[j][3] = 0.f;
  __syncthreads();
  const long long c0 = clock64();
  for (int it = 0; it < iters; ++it) {
#pragma unroll
    for (int k = 0; k < 8; ++k)
#pragma unroll
      for (int j = 0; j < ACC; ++j)
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
            "{%0, %1, %2, %3};\n"
            : "+f"(d[j][0]), "+f"(d[j][1]), "+f"(d[j][2]), "+f"(d[j][3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
  const long long c1 = clock64();
  float s = 0.f;
#pragma unroll
  for (int j = 0; j < ACC; ++j) s += d[j][0] + d[j][1] + d[j][2] + d[j][3];
  if (s == 12345.f) sink[threadIdx.x] = s;
  if (threadIdx.x == 0) cycles[blockIdx.x] = c1 - c0;
}

}  // namespace

extern "C" int mma_sync_rate(int acc, int iters, int grid, void* sink, void* cycles) {
#define LAUNCH(A)                                                                                 \
  if (acc == A) {                                                                                 \
    mma_sync_rate_kernel<A><<<grid, 128 * WGS>>>(iters, static_cast<float*>(sink),                \
                                                  static_cast<long long*>(cycles));              \
    return static_cast<int>(cudaGetLastError());                                                  \
  }
  LAUNCH(1)
  LAUNCH(2)
  LAUNCH(4)
#undef LAUNCH
  return -1;
}

extern "C" int wgmma_rate(int n, int chain, int iters, int grid, void* sink, void* cycles) {
  const int smem = 48 * 1024 + 1024;
#define LAUNCH(N, C)                                                                                   \
  if (n == N && chain == C) {                                                                          \
    cudaFuncSetAttribute(wgmma_rate_kernel<N, C>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem); \
    wgmma_rate_kernel<N, C><<<grid, 128 * WGS, smem>>>(iters, static_cast<float*>(sink),               \
                                                        static_cast<long long*>(cycles));             \
    return static_cast<int>(cudaGetLastError());                                                       \
  }
  LAUNCH(16, 36)
  LAUNCH(16, 8)
  LAUNCH(32, 36)
  LAUNCH(64, 36)
#undef LAUNCH
  return -1;
}
