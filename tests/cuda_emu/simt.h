// A CPU stand-in for the CUDA features the library's SIMT kernels use (not the tensor-core
// ones): one std::thread per CUDA thread of a block, __syncthreads as a block barrier, warp
// ballots and shuffles through a per-warp exchange between two warp barriers, shared-memory
// atomics as atomic adds. Blocks run one after another. For tests only: it checks a kernel's
// logic (indexing, synchronization, ballot arithmetic) on any machine, not its speed.
//
// Hooks for a stand-in of asynchronous hardware (sm90_emu.h): block_hook runs before each
// block's threads start; barrier_hook runs once per phase of a block-level barrier
// (__syncthreads, a warpgroup's, bar.sync), with the ids of the threads that arrived, after
// the last of them arrived and before any leaves.
#pragma once

#include <atomic>
#include <barrier>
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
};

struct float4 {
  float x, y, z, w;
};
struct float2 {
  float x, y;
};
inline float2 make_float2(float x, float y) { return float2{x, y}; }

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

inline void (*block_hook)() = nullptr;
inline void (*barrier_hook)(const std::vector<int>& tids) = nullptr;

// One phase's arrivals, handed to barrier_hook by the barrier's completion step.
struct Arrivals {
  std::mutex m;
  std::vector<int> tids;
  void operator()() noexcept {
    if (barrier_hook != nullptr) barrier_hook(tids);
    tids.clear();
  }
};

// A block-level barrier that reports each phase's arrivals.
class Barrier {
 public:
  explicit Barrier(std::ptrdiff_t n) : arrivals_(std::make_unique<Arrivals>()), b_(n, Completion{arrivals_.get()}) {}
  void arrive_and_wait();

 private:
  struct Completion {
    Arrivals* a;
    void operator()() noexcept { (*a)(); }
  };
  std::unique_ptr<Arrivals> arrivals_;
  std::barrier<Completion> b_;
};

struct Block {
  std::unique_ptr<Barrier> all;
  std::vector<std::unique_ptr<std::barrier<>>> warps;
  std::vector<std::unique_ptr<Barrier>> warpgroups;  // 128 threads each
  std::map<int, std::unique_ptr<Barrier>> named;     // bar.sync ids, made at first use
  std::mutex named_mutex;
  std::vector<uint64_t> exchange;  // one slot per thread
  std::atomic<int> vote{0};
};

inline Block* current = nullptr;

inline void Barrier::arrive_and_wait() {
  {
    std::lock_guard<std::mutex> lock(arrivals_->m);
    arrivals_->tids.push_back(static_cast<int>(threadIdx.x));
  }
  b_.arrive_and_wait();
}

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

// Run kernel(args...) over grid (gx, gy, gz) with nt threads per block.
template <class K, class... A>
inline void launch3(unsigned gx, unsigned gy, unsigned gz, unsigned nt, K kernel, A... args) {
  for (unsigned bz = 0; bz < gz; ++bz)
    for (unsigned by = 0; by < gy; ++by)
      for (unsigned bx = 0; bx < gx; ++bx) {
        Block blk;
        blk.all = std::make_unique<Barrier>(static_cast<std::ptrdiff_t>(nt));
        for (unsigned w = 0; w < (nt + 31) / 32; ++w) blk.warps.push_back(std::make_unique<std::barrier<>>(32));
        for (unsigned g = 0; g < nt / 128; ++g) blk.warpgroups.push_back(std::make_unique<Barrier>(128));
        blk.exchange.assign(nt, 0);
        current = &blk;
        if (block_hook != nullptr) block_hook();
        std::vector<std::thread> th;
        th.reserve(nt);
        for (unsigned t = 0; t < nt; ++t)
          th.emplace_back([=] {
            threadIdx = dim3{t, 1, 1};
            blockIdx = dim3{bx, by, bz};
            gridDim = dim3{gx, gy, gz};
            kernel(args...);
          });
        for (auto& x : th) x.join();
        current = nullptr;
      }
}

template <class K, class... A>
inline void launch(unsigned gx, unsigned gy, unsigned nt, K kernel, A... args) {
  launch3(gx, gy, 1, nt, kernel, args...);
}

// The calling thread's warpgroup waits for its 128 threads.
inline void warpgroup_sync() { current->warpgroups[threadIdx.x / 128]->arrive_and_wait(); }

// bar.sync id, n: the barrier is made by the first thread to reach it.
inline void named_sync(int id, int n) {
  Barrier* b;
  {
    std::lock_guard<std::mutex> lock(current->named_mutex);
    auto& slot = current->named[id];
    if (!slot) slot = std::make_unique<Barrier>(n);
    b = slot.get();
  }
  b->arrive_and_wait();
}

}  // namespace simt

inline void __syncthreads() { simt::current->all->arrive_and_wait(); }

inline int __syncthreads_or(int pred) {
  __syncthreads();  // the previous vote has been read by everyone
  if (threadIdx.x == 0) simt::current->vote = 0;
  __syncthreads();
  if (pred) simt::current->vote = 1;
  __syncthreads();
  return simt::current->vote.load();
}

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

inline int __popc(unsigned x) { return __builtin_popcount(x); }

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
