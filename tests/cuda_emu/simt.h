// A CPU stand-in for the CUDA features the library's SIMT kernels use (not the tensor-core
// ones): one std::thread per CUDA thread of a block, __syncthreads as a block barrier, warp
// ballots and shuffles through a per-warp exchange between two warp barriers, shared-memory
// atomics as atomic read-modify-writes (add, or). Blocks run one after another. For tests only: it checks a kernel's
// logic (indexing, synchronization, ballot arithmetic) on any machine, not its speed.
#pragma once

#include <atomic>
#include <barrier>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
};

struct float4 {
  float x, y, z, w;
};

struct alignas(16) int4 {
  int x, y, z, w;
};
inline int4 make_int4(int x, int y, int z, int w) { return int4{x, y, z, w}; }

inline thread_local dim3 threadIdx, blockIdx, gridDim;

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__
#define __align__(n)
#define __restrict__

namespace simt {

struct Block {
  std::unique_ptr<std::barrier<>> all;
  std::vector<std::unique_ptr<std::barrier<>>> warps;
  std::vector<uint64_t> exchange;  // one slot per thread
};

inline Block* current = nullptr;

// Write v, wait for the warp, return the warp's values (by lane) through f, wait again.
template <class F>
inline auto warp_exchange(uint64_t v, F f) {
  const unsigned tid = threadIdx.x, warp = tid / 32;
  current->exchange[tid] = v;
  current->warps[warp]->arrive_and_wait();
  auto r = f(&current->exchange[warp * 32]);
  current->warps[warp]->arrive_and_wait();
  return r;
}

// Run kernel(args...) over grid (gx, gy) with nt threads per block.
template <class K, class... A>
inline void launch(unsigned gx, unsigned gy, unsigned nt, K kernel, A... args) {
  for (unsigned by = 0; by < gy; ++by)
    for (unsigned bx = 0; bx < gx; ++bx) {
      Block blk;
      blk.all = std::make_unique<std::barrier<>>(static_cast<std::ptrdiff_t>(nt));
      for (unsigned w = 0; w < (nt + 31) / 32; ++w) blk.warps.push_back(std::make_unique<std::barrier<>>(32));
      blk.exchange.assign(nt, 0);
      current = &blk;
      std::vector<std::thread> th;
      th.reserve(nt);
      for (unsigned t = 0; t < nt; ++t)
        th.emplace_back([=] {
          threadIdx = dim3{t, 1, 1};
          blockIdx = dim3{bx, by, 1};
          gridDim = dim3{gx, gy, 1};
          kernel(args...);
        });
      for (auto& x : th) x.join();
      current = nullptr;
    }
}

}  // namespace simt

inline void __syncthreads() { simt::current->all->arrive_and_wait(); }

inline unsigned __ballot_sync(unsigned mask, bool pred) {
  (void)mask;  // the kernels ballot over full warps
  return simt::warp_exchange(pred ? 1u : 0u, [](const uint64_t* lanes) {
    unsigned b = 0;
    for (int l = 0; l < 32; ++l) b |= static_cast<unsigned>(lanes[l] != 0) << l;
    return b;
  });
}

inline unsigned __shfl_up_sync(unsigned mask, unsigned v, unsigned delta) {
  (void)mask;
  const unsigned lane = threadIdx.x & 31;
  return simt::warp_exchange(v, [=](const uint64_t* lanes) {
    return static_cast<unsigned>(lane >= delta ? lanes[lane - delta] : lanes[lane]);
  });
}

inline unsigned __shfl_sync(unsigned mask, unsigned v, int src_lane) {
  (void)mask;
  return simt::warp_exchange(v, [=](const uint64_t* lanes) { return static_cast<unsigned>(lanes[src_lane & 31]); });
}

inline unsigned __shfl_xor_sync(unsigned mask, unsigned v, int lane_mask) {
  (void)mask;
  const unsigned lane = threadIdx.x & 31;
  return simt::warp_exchange(v, [=](const uint64_t* lanes) { return static_cast<unsigned>(lanes[lane ^ lane_mask]); });
}

inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }

inline unsigned atomicOr(unsigned* p, unsigned v) { return __atomic_fetch_or(p, v, __ATOMIC_RELAXED); }

inline unsigned atomicAdd(unsigned* p, unsigned v) { return __atomic_fetch_add(p, v, __ATOMIC_RELAXED); }

template <class T>
inline T __ldg(const T* p) { return *p; }

inline unsigned __float_as_uint(float x) {
  unsigned u;
  std::memcpy(&u, &x, 4);
  return u;
}
inline float __uint_as_float(unsigned u) {
  float x;
  std::memcpy(&x, &u, 4);
  return x;
}
inline float __int_as_float(int i) {
  float x;
  std::memcpy(&x, &i, 4);
  return x;
}

inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
