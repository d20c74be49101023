// A kernel for the emulator's 64-byte-swizzled wgmma operands, for tests only
// (tests/test_cuda_emu_features.py; it also compiles with nvcc for sm_90a and runs there as the
// check of the layout both assume): D[64, 32] = A[64, 32] B[32, 32]^T by two m64n32k16 wgmmas,
// A K-major or MN-major, B K-major or MN-major, each operand in 64-byte-swizzled rows: 8-row
// atoms of 512 bytes (SBO), the 16-byte unit within a row XORed with address bits 7-8;
// MN-major operands are 32 elements (one 64-byte row) wide, atoms of 8 k-rows.
#include <cstdint>

#include "sm90_common.cuh"

namespace swizzle_test {
using namespace dsa_sm90;  // (desc, the wgmma wrappers)

// wgmma shared-memory matrix descriptor, 64-byte swizzle (rows of 64 bytes, 8-row atoms of 512 B)
__device__ __forceinline__ uint64_t desc64(uint32_t addr, uint32_t lbo, uint32_t sbo) {
  return (desc(addr, lbo, sbo) & ~(3ull << 62)) | (2ull << 62);
}

// byte of element (mn, k) of a 32-wide operand: K-major rows are mn, MN-major rows are k
__device__ __forceinline__ uint32_t swz64(int row, int col) {
  const uint32_t lin = static_cast<uint32_t>((row / 8) * 512 + (row % 8) * 64 + 2 * col);
  return lin ^ (((lin >> 7) & 3u) << 4);
}
__device__ __forceinline__ void st_u16(uint32_t addr, uint16_t v) {
  asm volatile("st.shared.u16 [%0], %1;\n" ::"r"(addr), "h"(v) : "memory");
}

// a: [64, 32] (m, k), b: [32, 32] (n, k), row-major bf16; d: [64, 32] fp32
template <int TA, int TB>
__global__ void __launch_bounds__(128, 1) swz64_kernel(const uint16_t* a, const uint16_t* b, float* d) {
  extern __shared__ uint8_t smem_raw[];
  const uint32_t base = (smem_u32(smem_raw) + 1023u) & ~1023u;
  const uint32_t sa = base, sb = base + 4096;
  const int tid = static_cast<int>(threadIdx.x);
  for (int e = tid; e < 64 * 32; e += 128) {
    const int m = e / 32, k = e % 32;
    st_u16(sa + (TA ? swz64(k, m % 32) + (m / 32) * 2048 : swz64(m, k)), a[e]);
  }
  for (int e = tid; e < 32 * 32; e += 128) {
    const int n = e / 32, k = e % 32;
    st_u16(sb + (TB ? swz64(k, n) : swz64(n, k)), b[e]);
  }
  fence_async_smem();
  __syncthreads();
  float acc[16];
#pragma unroll
  for (int i = 0; i < 16; ++i) acc[i] = 0.f;
  wgmma_fence();
#pragma unroll
  for (int s = 0; s < 2; ++s) {  // k-step s: k = 16 s ..
    const uint64_t da = TA ? desc64(sa + s * 1024, 2048, 512) : desc64(sa + s * 32, 16, 512);
    const uint64_t db = TB ? desc64(sb + s * 1024, 2048, 512) : desc64(sb + s * 32, 16, 512);
    wgmma_m64n32k16_ss<TA, TB>(acc, da, db, 1);
  }
  wgmma_commit();
  wgmma_wait0();
  const int warp = tid / 32, lane = tid % 32;
#pragma unroll
  for (int j = 0; j < 4; ++j)
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int bb = 0; bb < 2; ++bb)
        d[(warp * 16 + lane / 4 + 8 * i) * 32 + 8 * j + 2 * (lane % 4) + bb] = acc[4 * j + 2 * i + bb];
}

}  // namespace swizzle_test

extern "C" int swizzle64_mma(const void* a, const void* b, float* d, int ta, int tb) {
  const auto* pa = static_cast<const uint16_t*>(a);
  const auto* pb = static_cast<const uint16_t*>(b);
  using swizzle_test::swz64_kernel;  // (an unqualified name: the emulator's launch rewrite takes one)
  if (ta == 0 && tb == 0) swz64_kernel<0, 0><<<1, 128, 8192>>>(pa, pb, d);
  else if (ta == 0 && tb == 1) swz64_kernel<0, 1><<<1, 128, 8192>>>(pa, pb, d);
  else if (ta == 1 && tb == 0) swz64_kernel<1, 0><<<1, 128, 8192>>>(pa, pb, d);
  else return 1;
  return static_cast<int>(cudaGetLastError());
}
