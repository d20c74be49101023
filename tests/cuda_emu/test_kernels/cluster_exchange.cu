// A kernel for the emulator's cluster support, for tests only (tests/test_cuda_emu_features.py;
// it also compiles with nvcc for sm_90a): clusters of two CTAs of 128 threads trade one value
// per thread through distributed shared memory for `rounds` rounds. Thread i writes its value
// into slot i of the other CTA (mapa + st.shared::cluster) and arrives on that CTA's "full"
// mbarrier; it waits on its own "full" barrier, reads its slot and arrives on the other CTA's
// "empty" barrier, which the writer waits on before the next round's store: the hand-over of
// partial results a kernel that splits a row across a cluster needs. MODE 0 is the protocol;
// MODE 1 never arrives on the other CTA's "full" barrier (its waits never end); MODE 2 maps the
// slot in its own CTA instead of the other one (each CTA reads its own values); MODE 3 skips the
// wait on its "empty" barrier (the next store may overwrite a value not yet read).
#include <cstdint>

#include "sm90_common.cuh"

namespace cluster_test {
using namespace dsa_sm90;  // (mbarriers, smem_u32)

// this CTA's rank, another CTA's shared-memory address (mapa), arrivals on its mbarriers (release
// at cluster scope; waits acquire), a barrier of every thread of the cluster
__device__ __forceinline__ uint32_t cluster_rank() {
  uint32_t r;
  asm volatile("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(r));
  return r;
}
__device__ __forceinline__ uint32_t mapa(uint32_t addr, uint32_t rank) {
  uint32_t d;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(d) : "r"(addr), "r"(rank));
  return d;
}
__device__ __forceinline__ void mbar_arrive_cluster(uint32_t addr) {
  asm volatile("mbarrier.arrive.release.cluster.shared::cluster.b64 _, [%0];\n" ::"r"(addr) : "memory");
}
__device__ __forceinline__ void mbar_wait_cluster(uint32_t addr, int parity) {
  asm volatile(
      "{\n.reg .pred P1;\nLAB_WAIT:\n"
      "mbarrier.try_wait.parity.acquire.cluster.shared::cta.b64 P1, [%0], %1;\n"
      "@!P1 bra LAB_WAIT;\n}\n" ::"r"(addr), "r"(parity) : "memory");
}
__device__ __forceinline__ void cluster_sync() {
  asm volatile("barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;\n" ::: "memory");
}

__device__ __forceinline__ void st_cluster_f32(uint32_t addr, float v) {
  asm volatile("st.shared::cluster.f32 [%0], %1;\n" ::"r"(addr), "f"(v) : "memory");
}
__device__ __forceinline__ float ld_shared_f32(uint32_t addr) {
  float v;
  asm volatile("ld.shared.f32 %0, [%1];\n" : "=f"(v) : "r"(addr) : "memory");
  return v;
}
__device__ __forceinline__ float value(int r, uint32_t rank, int tid) {
  return static_cast<float>(1000 * r + 200 * static_cast<int>(rank) + tid);
}

template <int MODE>
__global__ void __launch_bounds__(128, 1) exchange_kernel(float* out, int rounds) {
  extern __shared__ uint8_t smem_raw[];
  const uint32_t base = (smem_u32(smem_raw) + 15u) & ~15u;
  const uint32_t full = base, empty = base + 8, slot = base + 16 + 4 * threadIdx.x;
  const int tid = static_cast<int>(threadIdx.x);
  const uint32_t rank = cluster_rank(), other = rank ^ 1u;
  if (tid == 0) {
    mbar_init(full, 128);
    mbar_init(empty, 128);
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  cluster_sync();  // both CTAs' barriers exist before any remote arrival
  const uint32_t dst = mapa(slot, MODE == 2 ? rank : other);
  const uint32_t other_full = mapa(full, other), other_empty = mapa(empty, other);
  float sum = 0.f;
  for (int r = 0; r < rounds; ++r) {
    if (r > 0 && MODE != 3) mbar_wait_cluster(empty, (r - 1) & 1);  // the other CTA read the previous value
    st_cluster_f32(dst, value(r, rank, tid));
    if (MODE != 1) mbar_arrive_cluster(other_full);
    mbar_wait_cluster(full, r & 1);
    sum += static_cast<float>(r + 1) * ld_shared_f32(slot);
    mbar_arrive_cluster(other_empty);
  }
  cluster_sync();  // no CTA exits while the other may still reach its shared memory
  out[blockIdx.x * 128 + tid] = sum + 0.5f * static_cast<float>(rank);
}

}  // namespace cluster_test

extern "C" int cluster_exchange(float* out, int clusters, int rounds, int mode) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(2 * clusters);
  cfg.blockDim = dim3(128);
  cfg.dynamicSmemBytes = 1024;
  cfg.stream = nullptr;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = 2;
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  if (mode == 1) return static_cast<int>(cudaLaunchKernelEx(&cfg, cluster_test::exchange_kernel<1>, out, rounds));
  if (mode == 2) return static_cast<int>(cudaLaunchKernelEx(&cfg, cluster_test::exchange_kernel<2>, out, rounds));
  if (mode == 3) return static_cast<int>(cudaLaunchKernelEx(&cfg, cluster_test::exchange_kernel<3>, out, rounds));
  return static_cast<int>(cudaLaunchKernelEx(&cfg, cluster_test::exchange_kernel<0>, out, rounds));
}
