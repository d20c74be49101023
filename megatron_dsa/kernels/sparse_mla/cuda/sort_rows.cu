// Each row's valid ids ascending, for the backward's L2 order (cuda_impl.l2_order; the contract
// and the PyTorch reference are cuda_impl.sort_row_ids): one CTA per row sorts the row's K slots
// in shared memory (cub::BlockRadixSort over the id bits only, the slot as the value), so a
// row of 2048 ids costs one read, a few radix passes on chip and one write, where the
// reference's segmented torch.sort takes ~3.9 ms at S = 32K (H100).
//
// Keys: a valid id (in [0, Tk), at a slot below the row's cap) as itself; anything else the
// sentinel 2^bits - 1 > every valid id (bits = bit length of Tk), and so are the pad positions
// past K. The sort is stable, and the slots are loaded in blocked order (slot = thread * ITEMS
// + item), so the invalid slots come after the valid ones in slot order and the pad after
// them: ranks < K are a permutation of the row's slots. Outputs, per row: the sorted ids (-1 for
// the sentinel), optionally the source slot of each rank, and the count of valid ids (the
// kernel's row length). No host synchronization.
#include <cstdint>

#include <cub/block/block_radix_sort.cuh>
#include <cuda_runtime.h>

namespace {

constexpr int MAX_K = 4096;  // the longest row (512 threads x 8 items)

template <int THREADS, int ITEMS>
__global__ void __launch_bounds__(THREADS) sort_rows_kernel(const int32_t* __restrict__ idx, long long idx_s,
                                                            const int32_t* __restrict__ cap, int K, int Tk,
                                                            int bits, int32_t* __restrict__ out,
                                                            int32_t* __restrict__ perm,
                                                            int32_t* __restrict__ count) {
  using Sort = cub::BlockRadixSort<uint32_t, THREADS, ITEMS, int32_t>;
  __shared__ typename Sort::TempStorage tmp;
  const long long row = blockIdx.x;
  const int32_t* r = idx + row * idx_s;
  const int n_slots = cap != nullptr ? min(max(__ldg(cap + row), 0), K) : K;
  const uint32_t sentinel = (1u << bits) - 1u;  // bits <= 31 (Tk < 2^31)
  uint32_t key[ITEMS];
  int32_t val[ITEMS];
#pragma unroll
  for (int i = 0; i < ITEMS; ++i) {
    const int s = threadIdx.x * ITEMS + i;
    const int id = s < K ? __ldg(r + s) : -1;
    const bool ok = s < n_slots && id >= 0 && id < Tk;
    key[i] = ok ? static_cast<uint32_t>(id) : sentinel;
    val[i] = s;
  }
  Sort(tmp).SortBlockedToStriped(key, val, 0, bits);
  // striped: item i of thread x holds rank i * THREADS + x (coalesced stores)
  int32_t* o = out + row * static_cast<long long>(K);
  int32_t* pm = perm != nullptr ? perm + row * static_cast<long long>(K) : nullptr;
  int last = 0;
#pragma unroll
  for (int i = 0; i < ITEMS; ++i) {
    const int rank = i * THREADS + threadIdx.x;
    if (rank < K) {
      const bool ok = key[i] != sentinel;
      o[rank] = ok ? static_cast<int32_t>(key[i]) : -1;
      if (pm != nullptr) pm[rank] = val[i];
      if (ok) last = rank + 1;
    }
  }
  // the valid count: one past the last valid rank (they come first)
  __shared__ int row_len;
  if (threadIdx.x == 0) row_len = 0;
  __syncthreads();
  if (last > 0) atomicMax(&row_len, last);
  __syncthreads();
  if (threadIdx.x == 0) count[row] = row_len;
}

template <int THREADS, int ITEMS>
cudaError_t launch(const void* idx, long long idx_s, const void* cap, int T, int K, int Tk, int bits, void* out,
                   void* perm, void* count, cudaStream_t stream) {
  sort_rows_kernel<THREADS, ITEMS><<<static_cast<unsigned>(T), THREADS, 0, stream>>>(
      static_cast<const int32_t*>(idx), idx_s, static_cast<const int32_t*>(cap), K, Tk, bits,
      static_cast<int32_t*>(out), static_cast<int32_t*>(perm), static_cast<int32_t*>(count));
  return cudaGetLastError();
}

// out[t, perm[t, j]] += src[t, j] for j < K (perm a permutation of each row's slots): the loss
// target, added at the sorted slots, back at the input's. One add per destination, so the
// result is the same bits on every run. One CTA per row.
__global__ void __launch_bounds__(256) unpermute_add_kernel(const float* __restrict__ src,
                                                            const int32_t* __restrict__ perm, int K,
                                                            float* __restrict__ out) {
  const long long base = static_cast<long long>(blockIdx.x) * K;
  for (int j = threadIdx.x; j < K; j += 256) out[base + __ldg(perm + base + j)] += __ldg(src + base + j);
}

}  // namespace

extern "C" {

// src, out: fp32 [T, K] contiguous; perm: int32 [T, K] contiguous, each row a permutation of
// [0, K). Returns a cudaError_t (0 = launched).
int dsa_unpermute_add(const void* src, const void* perm, int T, int K, void* out, void* stream) {
  if (T <= 0 || K <= 0) return 0;
  unpermute_add_kernel<<<static_cast<unsigned>(T), 256, 0, static_cast<cudaStream_t>(stream)>>>(
      static_cast<const float*>(src), static_cast<const int32_t*>(perm), K, static_cast<float*>(out));
  return static_cast<int>(cudaGetLastError());
}

// The largest row (K) dsa_sort_rows takes; longer rows are the caller's (torch.sort).
int dsa_sort_rows_max_k() { return MAX_K; }

// idx: int32 [T, K], row stride idx_s; cap: int32 [T] or null; out: int32 [T, K] contiguous;
// perm: int32 [T, K] contiguous or null; count: int32 [T]. 1 <= Tk < 2^31. Returns a
// cudaError_t (0 = launched; cudaErrorInvalidValue for K outside [0, 4096] or Tk < 1).
int dsa_sort_rows(const void* idx, long long idx_s, const void* cap, int T, int K, int Tk, void* out,
                  void* perm, void* count, void* stream) {
  if (K < 0 || K > MAX_K || Tk < 1) return static_cast<int>(cudaErrorInvalidValue);
  if (T <= 0 || K == 0) {
    if (T > 0) return static_cast<int>(cudaMemsetAsync(count, 0, sizeof(int32_t) * T, static_cast<cudaStream_t>(stream)));
    return 0;
  }
  int bits = 1;
  while ((1ll << bits) <= Tk) ++bits;  // Tk < 2^bits: the sentinel 2^bits - 1 >= Tk
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  cudaError_t e;
  if (K <= 512)
    e = launch<128, 4>(idx, idx_s, cap, T, K, Tk, bits, out, perm, count, s);
  else if (K <= 2048)
    e = launch<256, 8>(idx, idx_s, cap, T, K, Tk, bits, out, perm, count, s);
  else
    e = launch<512, 8>(idx, idx_s, cap, T, K, Tk, bits, out, perm, count, s);
  return static_cast<int>(e);
}

}  // extern "C"
