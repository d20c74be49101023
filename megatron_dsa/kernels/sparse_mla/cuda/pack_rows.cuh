// Row packing for the <= 32-head kernels of this library (the contract is packing.py's): one CTA
// per group of R query rows builds the union of the rows' selected keys, with the bitmaps over
// the keys in shared memory. The kernel alone, so that the CPU tests can run this source through
// tests/cuda_emu/simt.h; the launcher is pack_rows.cu.
//
// Per group, in phases separated by CTA barriers:
//   0. zero the R row bitmaps, the union bitmap and the first-occurrence bits (shared memory);
//      fill the group's uid / uslot rows with -1;
//   1. mark: each valid (row, id) sets its bit in the row's bitmap by atomicOr; the one slot that
//      found it clear is the row's first occurrence, sets the id's bit in the union bitmap and its
//      own first-occurrence bit;
//   2. prefix: the exclusive popcount prefix of the union's words (block scan), so an id's union
//      entry is prefix[id / 32] + popc(word & lower bits): the union in id order;
//   3. scatter: a first occurrence writes its id and slot at its union entry; a repeat (an id a
//      second time in one row; the indexer never emits one) takes the next entry after the union,
//      numbered in slot order by a ballot scan, which runs only when the group has repeats;
//   4. (STAGE) copy the group's uid / uslot rows out.
// STAGE: uid / uslot are built in shared memory (filled, scattered) and written out once in
// 16-byte pieces; without it (where they do not fit beside the bitmaps) the fill and the
// scattered 2- and 4-byte stores go to global memory, each its own L2 request.
// The Triton kernel in packing.py does the same with the bitmaps in global scratch (its atomics
// go to L2); this one keeps them on chip. Without repeats both give the reference's tensors.
// No host synchronization: capturable in a CUDA graph.
#pragma once

#include <cstdint>

namespace dsa_pack {

constexpr int THREADS = 512;
constexpr int WARPS = THREADS / 32;
constexpr int HDR = WARPS + 4;  // words: the warp sums, the union / valid / first counts, padding

// Shared-memory words before the staged outputs, and the staged outputs' offset in bytes
__host__ __device__ inline long long bitmap_words(int R, int K, int W) {
  return HDR + static_cast<long long>(R + 2) * W + (static_cast<long long>(R) * K + 31) / 32;
}
__host__ __device__ inline long long stage_offset(int R, int K, int W) { return (4 * bitmap_words(R, K, W) + 15) / 16 * 16; }
// Dynamic shared memory of one CTA (bytes)
__host__ __device__ inline long long smem_bytes(int R, int K, int W, bool stage) {
  const long long RK = static_cast<long long>(R) * K;
  return stage ? stage_offset(R, K, W) + 4 * RK + 2 * R * RK : 4 * bitmap_words(R, K, W);
}

struct Slot {
  int j, slot, id;
  bool valid;
};

// Position pos (row-major over the group's R rows of K slots): its row in the group, slot, id and
// validity (an id in [0, Tk) at a slot below the row's length).
__device__ __forceinline__ Slot load_slot(const int32_t* __restrict__ idx, long long idx_st,
                                          const int32_t* __restrict__ len, int g, int R, int T, int K, int Tk,
                                          int pos) {
  Slot s;
  s.j = pos / K;
  s.slot = pos - s.j * K;
  const long long row = static_cast<long long>(g) * R + s.j;
  s.id = -1;
  s.valid = false;
  if (pos < R * K && row < T) {
    s.id = __ldg(idx + row * idx_st + s.slot);
    s.valid = s.id >= 0 && s.id < Tk && (len == nullptr || s.slot < __ldg(len + row));
  }
  return s;
}

// n 4-byte words from src to dst (16-byte pieces where both are 16-byte aligned and n % 4 == 0)
__device__ __forceinline__ void copy_words(uint32_t* dst, const uint32_t* src, long long n, int tid) {
  if ((n & 3) == 0 && (reinterpret_cast<uintptr_t>(dst) & 15) == 0 && (reinterpret_cast<uintptr_t>(src) & 15) == 0) {
    int4* d4 = reinterpret_cast<int4*>(dst);
    const int4* s4 = reinterpret_cast<const int4*>(src);
    for (long long i = tid; i < n / 4; i += THREADS) d4[i] = s4[i];
  } else {
    for (long long i = tid; i < n; i += THREADS) dst[i] = src[i];
  }
}
// n 4-byte words of all ones (-1) at dst (16-byte pieces where aligned)
__device__ __forceinline__ void fill_ones(uint32_t* dst, long long n, int tid) {
  if ((n & 3) == 0 && (reinterpret_cast<uintptr_t>(dst) & 15) == 0) {
    int4* d4 = reinterpret_cast<int4*>(dst);
    for (long long i = tid; i < n / 4; i += THREADS) d4[i] = make_int4(-1, -1, -1, -1);
  } else {
    for (long long i = tid; i < n; i += THREADS) dst[i] = 0xffffffffu;
  }
}

// uid: int32 [G, R K]; uslot: int16 [G, R, R K] (R K even: R is 2 or 4); count: int32 [G]; W =
// ceil(Tk / 32); shared memory: smem_bytes(R, K, W, STAGE).
template <bool STAGE>
__global__ void __launch_bounds__(THREADS, 2) pack_rows_kernel(const int32_t* __restrict__ idx, long long idx_st,
                                                            const int32_t* __restrict__ len, int T, int K, int Tk,
                                                            int R, int W, int32_t* __restrict__ uid,
                                                            int16_t* __restrict__ uslot,
                                                            int32_t* __restrict__ count) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  uint32_t* smem = reinterpret_cast<uint32_t*>(smem_raw);
  uint32_t* warp_sum = smem;          // [WARPS]
  uint32_t* counts = smem + WARPS;    // union, valid, first
  uint32_t* rowbits = smem + HDR;     // [R, W]
  uint32_t* ubits = rowbits + R * W;  // [W]
  uint32_t* pre = ubits + W;          // [W]
  uint32_t* firstbits = pre + W;      // [ceil(R K / 32)]

  const int g = blockIdx.x;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int RK = R * K;
  const long long ucap = RK;
  int32_t* uid_g = uid + g * ucap;
  int16_t* uslot_g = uslot + g * static_cast<long long>(R) * ucap;
  // where phases 0 and 3 write: the group's rows, or their shared-memory stage (derived from
  // smem_raw in one expression, so that its accesses compile to shared-memory ones)
  int32_t* const uid_w = STAGE ? reinterpret_cast<int32_t*>(smem_raw + stage_offset(R, K, W)) : uid_g;
  int16_t* const uslot_w = STAGE ? reinterpret_cast<int16_t*>(smem_raw + stage_offset(R, K, W) + 4 * ucap) : uslot_g;

  // 0. zero the bitmaps and counts, fill the outputs (or their stage) with -1
  const int nfw = (RK + 31) / 32;
  for (int i = tid; i < (R + 2) * W + nfw; i += THREADS) rowbits[i] = 0u;
  if (tid < 3) counts[tid] = 0u;
  fill_ones(reinterpret_cast<uint32_t*>(uid_w), ucap, tid);
  fill_ones(reinterpret_cast<uint32_t*>(uslot_w), R * ucap / 2, tid);
  __syncthreads();

  // 1. mark
  unsigned n_valid = 0, n_first = 0;
  for (int pos = tid; pos < RK; pos += THREADS) {
    const Slot s = load_slot(idx, idx_st, len, g, R, T, K, Tk, pos);
    if (!s.valid) continue;
    const uint32_t bit = 1u << (s.id & 31);
    ++n_valid;
    if ((atomicOr(&rowbits[s.j * W + (s.id >> 5)], bit) & bit) == 0u) {
      atomicOr(&ubits[s.id >> 5], bit);
      atomicOr(&firstbits[pos >> 5], 1u << (pos & 31));
      ++n_first;
    }
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    n_valid += __shfl_xor_sync(0xffffffffu, n_valid, o);
    n_first += __shfl_xor_sync(0xffffffffu, n_first, o);
  }
  if (lane == 0) {
    atomicAdd(&counts[1], n_valid);
    atomicAdd(&counts[2], n_first);
  }
  __syncthreads();

  // 2. exclusive prefix of the union's popcounts: each thread a run of consecutive words
  const int per = (W + THREADS - 1) / THREADS;
  const int w0 = min(tid * per, W), w1 = min(w0 + per, W);
  unsigned local = 0;
  for (int w = w0; w < w1; ++w) local += __popc(ubits[w]);
  unsigned incl = local;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const unsigned v = __shfl_up_sync(0xffffffffu, incl, o);
    if (lane >= o) incl += v;
  }
  if (lane == 31) warp_sum[warp] = incl;
  __syncthreads();
  if (warp == 0) {
    const unsigned v = lane < WARPS ? warp_sum[lane] : 0u;
    unsigned inc = v;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const unsigned u = __shfl_up_sync(0xffffffffu, inc, o);
      if (lane >= o) inc += u;
    }
    if (lane < WARPS) warp_sum[lane] = inc - v;
    if (lane == 31) counts[0] = inc;
  }
  __syncthreads();
  unsigned run = warp_sum[warp] + incl - local;
  for (int w = w0; w < w1; ++w) {
    pre[w] = run;
    run += __popc(ubits[w]);
  }
  __syncthreads();
  const int n_union = static_cast<int>(counts[0]);
  const bool repeats = counts[1] != counts[2];  // uniform over the CTA

  // 3. scatter
  int n_again = 0;  // repeats numbered so far (uniform)
  for (int c0 = 0; c0 < RK; c0 += THREADS) {
    const int pos = c0 + tid;
    const Slot s = load_slot(idx, idx_st, len, g, R, T, K, Tk, pos);
    const bool first = s.valid && ((firstbits[pos >> 5] >> (pos & 31)) & 1u);
    int ent = 0;
    if (first) {
      const uint32_t word = ubits[s.id >> 5];
      ent = static_cast<int>(pre[s.id >> 5]) + __popc(word & ((1u << (s.id & 31)) - 1u));
    }
    if (repeats) {
      const bool again = s.valid && !first;
      const unsigned b = __ballot_sync(0xffffffffu, again);
      __syncthreads();  // warp_sum's previous use is done
      if (lane == 0) warp_sum[warp] = __popc(b);
      __syncthreads();
      int before = n_again, total = 0;
#pragma unroll
      for (int w = 0; w < WARPS; ++w) {
        const int c = static_cast<int>(warp_sum[w]);
        before += w < warp ? c : 0;
        total += c;
      }
      if (again) ent = n_union + before + __popc(b & ((1u << lane) - 1u));
      n_again += total;
    }
    if (s.valid) {
      uid_w[ent] = s.id;
      uslot_w[s.j * ucap + ent] = static_cast<int16_t>(s.slot);
    }
  }
  if (tid == 0) count[g] = n_union + n_again;

  // 4. the staged rows out
  if (STAGE) {
    __syncthreads();
    copy_words(reinterpret_cast<uint32_t*>(uid_g), reinterpret_cast<const uint32_t*>(uid_w), ucap, tid);
    copy_words(reinterpret_cast<uint32_t*>(uslot_g), reinterpret_cast<const uint32_t*>(uslot_w), R * ucap / 2, tid);
  }
}

}  // namespace dsa_pack
