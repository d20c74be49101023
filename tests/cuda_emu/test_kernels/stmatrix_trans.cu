// A kernel for the emulator's stmatrix .trans, for tests only (tests/test_cuda_emu_features.py; it
// also compiles with nvcc for sm_90a and runs there as the check of the layout both assume): one
// warp stores four 8 x 8 b16 matrices with stmatrix.sync.aligned.m8n8.x4.trans, register j of
// lane l holding the values 64 j + 2 l + {0, 1} (matrix j's elements (l / 4, 2 (l % 4) + {0, 1})
// in the fragment layout), matrix j's row c at byte 128 j + 16 c of a 512-byte buffer; then the
// buffer is copied out (as 32-bit words). The backward's 64-key kernel stores its P / dS tiles this way.
#include <cstdint>

#include "sm90_common.cuh"

namespace stsm_test {
using namespace dsa_sm90;  // (stsm_x4_trans, smem_u32)

__device__ __forceinline__ uint32_t ld_shared_u32(uint32_t addr) {
  uint32_t v;
  asm volatile("ld.shared.u32 %0, [%1];\n" : "=r"(v) : "r"(addr) : "memory");
  return v;
}

__global__ void __launch_bounds__(32, 1) stsm_trans_kernel(uint32_t* out) {
  extern __shared__ uint8_t smem_raw[];
  const uint32_t base = (smem_u32(smem_raw) + 127u) & ~127u;
  const int lane = static_cast<int>(threadIdx.x);
  uint32_t r[4];
#pragma unroll
  for (int j = 0; j < 4; ++j)
    r[j] = static_cast<uint32_t>(64 * j + 2 * lane) | (static_cast<uint32_t>(64 * j + 2 * lane + 1) << 16);
  stsm_x4_trans(base + 128 * (lane / 8) + 16 * (lane % 8), r[0], r[1], r[2], r[3]);
  __syncthreads();
  for (int e = lane; e < 128; e += 32) out[e] = ld_shared_u32(base + 4 * e);
}

}  // namespace stsm_test

extern "C" int stmatrix_trans_store(void* out) {
  using stsm_test::stsm_trans_kernel;  // (an unqualified name: the emulator's launch rewrite takes one)
  stsm_trans_kernel<<<1, 32, 1024>>>(static_cast<uint32_t*>(out));
  return static_cast<int>(cudaGetLastError());
}
