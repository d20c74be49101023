// Gather-rate microbenchmark (Hopper): how fast can one kernel move the selected kv rows of
// every query row from global memory (L2-resident) into shared memory, with no math at all?
// This is the floor of any sparse MLA forward that gathers each selected row once per query
// row (the 16-head case, where the gathers are the whole cost). Two ways:
//   mode 0: cp.async 16-byte granules, the rows of a block spread over all threads (the way
//           our kernels gather), landing on an mbarrier per stage (cp.async.mbarrier.arrive);
//   mode 1: one bulk copy (cp.async.bulk, 1152 B) per row, issued by one warp, landing on an
//           mbarrier per stage by byte count.
// One CTA per query row; the row's k ids walk through NS stages of R rows.
#include <cuda_runtime.h>
#include <stdint.h>

namespace {

constexpr int ROW = 1152;  // 576 bf16
constexpr int R = 16;      // rows per stage
#ifndef GATHER_STAGES
#define GATHER_STAGES 4
#endif
constexpr int NS = GATHER_STAGES;  // stages (build with -DGATHER_STAGES=n)

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void mbar_init(uint32_t a, int n) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(a), "r"(n) : "memory");
}
__device__ __forceinline__ void mbar_wait(uint32_t a, int parity) {
  asm volatile(
      "{\n.reg .pred P1;\nW:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 P1, [%0], %1;\n"
      "@!P1 bra W;\n}\n" ::"r"(a), "r"(parity) : "memory");
}

template <int MODE>
__global__ void __launch_bounds__(128) gather_kernel(const uint8_t* __restrict__ kv, const int32_t* __restrict__ idx,
                                                     int K, int Tk, unsigned long long* sink) {
  extern __shared__ __align__(128) uint8_t smem[];
  uint64_t* bars = reinterpret_cast<uint64_t*>(smem + NS * R * ROW);
  const int tid = threadIdx.x;
  const int32_t* row_ids = idx + (long long)blockIdx.x * K;
  if (tid == 0)
    for (int s = 0; s < NS; ++s) mbar_init(smem_u32(bars + s), MODE == 0 ? 128 : 1);
  __syncthreads();
  const int nblk = K / R;
  for (int b = 0; b < nblk; ++b) {
    const int s = b % NS;
    const uint32_t bar = smem_u32(bars + s);
    if (b >= NS) mbar_wait(bar, ((b / NS) - 1) & 1);  // the stage's previous block landed
    __syncthreads();  // everyone saw it before it is overwritten
    const uint32_t dst = smem_u32(smem + s * R * ROW);
    if (MODE == 0) {
      // 8 threads per row (one id load each), 9 granules per thread
      const int r = tid >> 3, sub = tid & 7;
      int id = __ldg(row_ids + b * R + r);
      id = id < 0 ? 0 : (id >= Tk ? Tk - 1 : id);
#pragma unroll
      for (int i = 0; i < ROW / 16 / 8; ++i)
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst + r * ROW + (sub + 8 * i) * 16),
                     "l"(kv + (long long)id * ROW + (sub + 8 * i) * 16) : "memory");
      asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(bar) : "memory");
    } else {
      if (tid < 32) {
        if (tid == 0)
          asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(R * ROW) : "memory");
        __syncwarp();
        if (tid < R) {
          int id = __ldg(row_ids + b * R + tid);
          id = id < 0 ? 0 : (id >= Tk ? Tk - 1 : id);
          asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n"
                       ::"r"(dst + tid * ROW), "l"(kv + (long long)id * ROW), "r"(ROW), "r"(bar) : "memory");
        }
      }
    }
  }
  // wait for the last NS blocks
  for (int b = nblk > NS ? nblk - NS : 0; b < nblk; ++b) mbar_wait(smem_u32(bars + b % NS), (b / NS) & 1);
  if (tid == 0 && blockIdx.x == 0) *sink = *reinterpret_cast<const unsigned long long*>(smem);
}

}  // namespace

constexpr int SMEM = NS * R * ROW + NS * 8;
using GatherKernel = void (*)(const uint8_t*, const int32_t*, int, int, unsigned long long*);

// the kernel of `mode`, with its dynamic shared-memory limit raised
static GatherKernel kernel_for(int mode) {
  const GatherKernel k = mode == 0 ? gather_kernel<0> : gather_kernel<1>;
  cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, SMEM);
  return k;
}

// CTAs of `mode` that fit on one SM (shared memory decides), and the rows a CTA has requested
// at most at once (NS stages of R rows: a stage is reissued once its previous rows landed)
extern "C" int gather_rate_ctas_per_sm(int mode) {
  int n = 0;
  cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel_for(mode), 128, SMEM);
  return n;
}
extern "C" int gather_rate_rows_per_cta() { return NS * R; }

extern "C" int gather_rate(int mode, const void* kv, const void* idx, int T, int K, int Tk, void* sink, void* stream) {
  kernel_for(mode)<<<T, 128, SMEM, static_cast<cudaStream_t>(stream)>>>(
      static_cast<const uint8_t*>(kv), static_cast<const int32_t*>(idx), K, Tk, static_cast<unsigned long long*>(sink));
  return static_cast<int>(cudaGetLastError());
}
