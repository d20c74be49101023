// Row packing for the <= 32-head kernels of this library (the contract is packing.py's): one CTA
// per group of R query rows builds the union of the rows' selected keys, with the bitmaps over
// the keys in shared memory.
//
// Per group, in four phases separated by CTA barriers:
//   0. zero the R row bitmaps, the union bitmap and the first-occurrence bits (shared memory);
//      fill the group's uid / uslot rows with -1 (16-byte stores where aligned);
//   1. mark: each valid (row, id) sets its bit in the row's bitmap by atomicOr; the one slot that
//      found it clear is the row's first occurrence, sets the id's bit in the union bitmap and its
//      own first-occurrence bit;
//   2. prefix: the exclusive popcount prefix of the union's words (block scan), so an id's union
//      entry is prefix[id / 32] + popc(word & lower bits): the union in id order;
//   3. scatter: a first occurrence writes its id and slot at its union entry; a repeat (an id a
//      second time in one row; the indexer never emits one) takes the next entry after the union,
//      numbered in slot order by a ballot scan, which runs only when the group has repeats.
// The Triton kernel in packing.py does the same with the bitmaps in global scratch (its atomics
// go to L2); this one keeps them on chip. Without repeats both give the reference's tensors.
// No host synchronization: capturable in a CUDA graph.
#include <cstdint>

#include <cuda_runtime.h>

#include "sm90_common.cuh"

namespace {

constexpr int THREADS = 512;
constexpr int WARPS = THREADS / 32;

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

__global__ void __launch_bounds__(THREADS) pack_rows_kernel(const int32_t* __restrict__ idx, long long idx_st,
                                                            const int32_t* __restrict__ len, int T, int K, int Tk,
                                                            int R, int W, int32_t* __restrict__ uid,
                                                            int16_t* __restrict__ uslot,
                                                            int32_t* __restrict__ count) {
  extern __shared__ uint32_t smem[];
  uint32_t* rowbits = smem;           // [R, W]
  uint32_t* ubits = smem + R * W;     // [W]
  uint32_t* pre = ubits + W;          // [W]
  uint32_t* firstbits = pre + W;      // [ceil(R K / 32)]
  __shared__ int warp_sum[WARPS];
  __shared__ int s_union, s_valid, s_first;

  const int g = blockIdx.x;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int RK = R * K;
  const long long ucap = RK;
  int32_t* uid_g = uid + g * ucap;
  int16_t* uslot_g = uslot + g * static_cast<long long>(R) * ucap;

  // 0. zero the bitmaps, fill the outputs with -1
  const int nfw = (RK + 31) / 32;
  for (int i = tid; i < (R + 2) * W + nfw; i += THREADS) smem[i] = 0u;
  if (tid == 0) s_valid = s_first = 0;
  if ((ucap & 3) == 0 && (reinterpret_cast<uintptr_t>(uid_g) & 15) == 0) {
    int4* u4 = reinterpret_cast<int4*>(uid_g);
    for (long long i = tid; i < ucap / 4; i += THREADS) u4[i] = make_int4(-1, -1, -1, -1);
  } else {
    for (long long i = tid; i < ucap; i += THREADS) uid_g[i] = -1;
  }
  if (((R * ucap) & 7) == 0 && (reinterpret_cast<uintptr_t>(uslot_g) & 15) == 0) {
    int4* s4 = reinterpret_cast<int4*>(uslot_g);
    for (long long i = tid; i < R * ucap / 8; i += THREADS) s4[i] = make_int4(-1, -1, -1, -1);
  } else {
    for (long long i = tid; i < R * ucap; i += THREADS) uslot_g[i] = -1;
  }
  __syncthreads();

  // 1. mark
  int n_valid = 0, n_first = 0;
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
    atomicAdd(&s_valid, n_valid);
    atomicAdd(&s_first, n_first);
  }
  __syncthreads();

  // 2. exclusive prefix of the union's popcounts: each thread a run of consecutive words
  const int per = (W + THREADS - 1) / THREADS;
  const int w0 = min(tid * per, W), w1 = min(w0 + per, W);
  int local = 0;
  for (int w = w0; w < w1; ++w) local += __popc(ubits[w]);
  int incl = local;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int v = __shfl_up_sync(0xffffffffu, incl, o);
    if (lane >= o) incl += v;
  }
  if (lane == 31) warp_sum[warp] = incl;
  __syncthreads();
  if (warp == 0) {
    const int v = lane < WARPS ? warp_sum[lane] : 0;
    int inc = v;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int u = __shfl_up_sync(0xffffffffu, inc, o);
      if (lane >= o) inc += u;
    }
    if (lane < WARPS) warp_sum[lane] = inc - v;
    if (lane == 31) s_union = inc;
  }
  __syncthreads();
  int run = warp_sum[warp] + incl - local;
  for (int w = w0; w < w1; ++w) {
    pre[w] = static_cast<uint32_t>(run);
    run += __popc(ubits[w]);
  }
  __syncthreads();
  const int n_union = s_union;
  const bool repeats = s_valid != s_first;  // uniform over the CTA

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
        const int c = warp_sum[w];
        before += w < warp ? c : 0;
        total += c;
      }
      if (again) ent = n_union + before + __popc(b & ((1u << lane) - 1u));
      n_again += total;
    }
    if (s.valid) {
      uid_g[ent] = s.id;
      uslot_g[s.j * ucap + ent] = static_cast<int16_t>(s.slot);
    }
  }
  if (tid == 0) count[g] = n_union + n_again;
}

}  // namespace

extern "C" {

// The kernel's static shared memory (its warp sums), which shares the opt-in limit with the
// dynamic part; asked of the runtime once (it is the same on every device of the build)
static long long static_smem() {
  static long long bytes = -1;
  if (bytes < 0) {
    cudaFuncAttributes fa;
    if (cudaFuncGetAttributes(&fa, pack_rows_kernel) != cudaSuccess) return 0;
    bytes = static_cast<long long>(fa.sharedSizeBytes);
  }
  return bytes;
}
static long long dynamic_smem(int R, int K, int Tk) {
  const long long W = (static_cast<long long>(Tk) + 31) / 32;
  return 4 * ((R + 2) * W + (static_cast<long long>(R) * K + 31) / 32);
}

// Shared memory one CTA needs for R rows of K slots over Tk keys (bytes, static part included).
long long dsa_pack_rows_smem(int R, int K, int Tk) { return dynamic_smem(R, K, Tk) + static_smem(); }

// idx: int32 [T, K], row stride idx_st (elements), unit column stride; len: int32 [T] or null;
// uid: int32 [G, R K]; uslot: int16 [G, R, R K]; count: int32 [G]; G = ceil(T / R), R = 2 or 4.
// Every element of uid / uslot / count is written. Returns a cudaError_t (0 = launched).
int dsa_pack_rows(const void* idx, long long idx_st, const void* len, int T, int K, int Tk, int R, void* uid,
                  void* uslot, void* count, void* stream) {
  if ((R != 2 && R != 4) || K < 1 || K > 32767 || Tk < 1 || T < 0) return static_cast<int>(cudaErrorInvalidValue);
  if (T == 0) return 0;
  const long long bytes = dynamic_smem(R, K, Tk), fixed = static_smem();
  int dev = 0, optin = 0;
  cudaError_t e = cudaGetDevice(&dev);
  if (e == cudaSuccess) e = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  if (e != cudaSuccess) return static_cast<int>(e);
  if (bytes + fixed > optin) return static_cast<int>(cudaErrorInvalidValue);
  static bool smem_set[64] = {};
  if (bytes > 48 * 1024) {  // (the dynamic part may take what the static part leaves of the opt-in limit)
    e = dsa_sm90::set_smem_once(smem_set, pack_rows_kernel, static_cast<int>(optin - fixed));
    if (e != cudaSuccess) return static_cast<int>(e);
  }
  const int G = (T + R - 1) / R;
  const int W = (Tk + 31) / 32;
  pack_rows_kernel<<<G, THREADS, static_cast<size_t>(bytes), static_cast<cudaStream_t>(stream)>>>(
      static_cast<const int32_t*>(idx), idx_st, static_cast<const int32_t*>(len), T, K, Tk, R, W,
      static_cast<int32_t*>(uid), static_cast<int16_t*>(uslot), static_cast<int32_t*>(count));
  return static_cast<int>(cudaGetLastError());
}

}  // extern "C"
