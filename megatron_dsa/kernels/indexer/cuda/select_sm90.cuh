// Exact top-k of each row of fp32 indexer scores: radix select with shared-memory histograms.
//
// One CTA of 512 threads per row. Keys are the order-preserving uint32 images of the scores
// (-0.0 folded onto +0.0), cut into three digits: bits [21, 32), [10, 21) and [0, 10).
//
// 1. Global levels. A histogram pass over the row (shared-memory atomics) finds the digit
//    bucket holding the k-th largest key; the next level histograms only the keys of that
//    bucket. Levels stop once the bucket holds at most CAND_CAP keys (usually after the first),
//    once it holds exactly the missing count, or at the last digit (the threshold is then one
//    exact key value).
// 2. One collection pass over the row in index order: keys above the bucket go to the output;
//    keys in it go to a shared-memory candidate list (key, position), also in index order.
//    When the bucket's keys are all taken, or are all equal, the first missing ones in index
//    order go straight to the output instead.
// 3. Shared-memory levels on the candidates for the remaining digits, then one compaction of
//    the list.
//
// Ties: the lowest index wins, as in the Triton select and the reference. The order of the
// output is deterministic: keys above the first bucket in index order, then the candidates
// taken, in index order. Compactions in index order use warp ballots and one scan per tile of
// 1024 keys over the 32 (step, warp) counts. Rows of at most k keys are copied, padded with -1
// and -inf. No host synchronization; graph-capturable.
#pragma once

#include <cstdint>

namespace {

constexpr int NT = 512;  // threads per CTA
constexpr int NW = NT / 32;
constexpr int STEPS = 32 / NW;  // steps of NT keys per compaction tile: 32 (step, warp) counts
constexpr int BINS = 2048;      // the widest digit: 11 bits
constexpr int CAND_CAP = 6144;  // candidates kept in shared memory

struct Smem {
  unsigned hist[BINS];
  float cand_x[CAND_CAP];
  int cand_pos[CAND_CAP];
  unsigned tile[2][33];  // per tile parity: 32 exclusive packed counts + the tile's total
  unsigned wsum[NW];
  int pick[3];  // bucket, keys above it, keys in it
};

// Digit lvl of a key: bits [shift_of(lvl), shift_of(lvl) + width_of(lvl)).
__device__ __forceinline__ int shift_of(int lvl) { return lvl == 0 ? 21 : (lvl == 1 ? 10 : 0); }
__device__ __forceinline__ int width_of(int lvl) { return lvl == 2 ? 10 : 11; }

__device__ __forceinline__ unsigned ordered_key(float x) {
  unsigned bits = __float_as_uint(x);
  if (x == 0.0f) bits = 0u;
  return bits ^ ((bits >> 31) ? 0xffffffffu : 0x80000000u);
}

__device__ __forceinline__ unsigned lanemask_lt() { return (1u << (threadIdx.x & 31)) - 1u; }

// Exclusive prefix sum of v over the CTA's threads (in thread order); ends synchronized.
__device__ __forceinline__ unsigned block_exclusive_scan(unsigned v, Smem& sm) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  unsigned inc = v;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const unsigned y = __shfl_up_sync(0xffffffffu, inc, o);
    if (lane >= o) inc += y;
  }
  if (lane == 31) sm.wsum[warp] = inc;
  __syncthreads();
  unsigned before = 0;
  for (int w = 0; w < warp; ++w) before += sm.wsum[w];
  __syncthreads();
  return before + inc - v;
}

// The bucket of a (1 << width)-bin histogram holding the k_rem-th largest key: sm.pick =
// (bucket, keys in higher buckets, keys in the bucket). The histogram holds >= k_rem keys.
__device__ __forceinline__ void pick_bucket(Smem& sm, int width, unsigned k_rem) {
  const int per = (1 << width) / NT;  // bins per thread, highest bins to thread 0
  const int hi = (1 << width) - 1 - static_cast<int>(threadIdx.x) * per;
  unsigned local = 0;
  for (int i = 0; i < per; ++i) local += sm.hist[hi - i];
  unsigned acc = block_exclusive_scan(local, sm);
  for (int i = 0; i < per; ++i) {
    const unsigned c = sm.hist[hi - i];
    if (acc < k_rem && acc + c >= k_rem) {
      sm.pick[0] = hi - i;
      sm.pick[1] = static_cast<int>(acc);
      sm.pick[2] = static_cast<int>(c);
    }
    acc += c;
  }
  __syncthreads();
}

__device__ __forceinline__ void clear_hist(Smem& sm) {
  for (int i = threadIdx.x; i < BINS; i += NT) sm.hist[i] = 0u;
  __syncthreads();
}

// One tile of an index-order compaction: every thread classifies STEPS keys (gt: above the
// bucket, eq: in it); returns through gt_before / eq_before the counts of gt / eq keys before
// each of its keys within the row (run_gt / run_eq: the counts before the tile, advanced).
struct TileCounts {
  unsigned gt_before[STEPS];
  unsigned eq_before[STEPS];
};

__device__ __forceinline__ TileCounts tile_counts(const bool (&gt)[STEPS], const bool (&eq)[STEPS], Smem& sm,
                                                  int parity, unsigned& run_gt, unsigned& run_eq) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const unsigned lt = lanemask_lt();
  unsigned bg[STEPS], be[STEPS];
#pragma unroll
  for (int s = 0; s < STEPS; ++s) {
    bg[s] = __ballot_sync(0xffffffffu, gt[s]);
    be[s] = __ballot_sync(0xffffffffu, eq[s]);
    if (lane == 0) sm.tile[parity][s * NW + warp] = __popc(bg[s]) | (__popc(be[s]) << 16);
  }
  __syncthreads();
  if (warp == 0) {  // exclusive scan of the 32 (step, warp) counts, in key order
    const unsigned v = sm.tile[parity][lane];
    unsigned inc = v;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const unsigned y = __shfl_up_sync(0xffffffffu, inc, o);
      if (lane >= o) inc += y;
    }
    sm.tile[parity][lane] = inc - v;
    if (lane == 31) sm.tile[parity][32] = inc;
  }
  __syncthreads();
  TileCounts r;
#pragma unroll
  for (int s = 0; s < STEPS; ++s) {
    const unsigned ex = sm.tile[parity][s * NW + warp];
    r.gt_before[s] = run_gt + (ex & 0xffffu) + __popc(bg[s] & lt);
    r.eq_before[s] = run_eq + (ex >> 16) + __popc(be[s] & lt);
  }
  const unsigned tot = sm.tile[parity][32];
  run_gt += tot & 0xffffu;
  run_eq += tot >> 16;
  return r;
}

// One pass over n keys in index order (load(i): the i-th score). Each key gets its class (gt:
// (key >> shift) > prefix, above the bucket; eq: in it) and the counts of each class before it,
// and emit(i, x, gt, eq, gt_before, eq_before) places it.
template <class Load, class Emit>
__device__ __forceinline__ void compaction_pass(int n, int shift, unsigned prefix, Smem& sm, int& parity, Load load,
                                                Emit emit) {
  unsigned run_gt = 0u, run_eq = 0u;
  for (int base = 0; base < n; base += STEPS * NT) {
    bool gt[STEPS], eq[STEPS];
    float x[STEPS];
#pragma unroll
    for (int s = 0; s < STEPS; ++s) {
      const int i = base + s * NT + static_cast<int>(threadIdx.x);
      x[s] = i < n ? load(i) : 0.0f;
      const unsigned kp = ordered_key(x[s]) >> shift;
      gt[s] = i < n && kp > prefix;
      eq[s] = i < n && kp == prefix;
    }
    const TileCounts c = tile_counts(gt, eq, sm, parity, run_gt, run_eq);
#pragma unroll
    for (int s = 0; s < STEPS; ++s)
      emit(base + s * NT + static_cast<int>(threadIdx.x), x[s], gt[s], eq[s], c.gt_before[s], c.eq_before[s]);
    parity ^= 1;
  }
}

__global__ void __launch_bounds__(NT) select_kernel(const float* __restrict__ buf, long long sb_b, long long sb_r,
                                                    const int32_t* __restrict__ starts,
                                                    const int32_t* __restrict__ ends, long long sse_b,
                                                    long long sse_t, int causal, int global_ids, int row0, int S,
                                                    int K, int32_t* __restrict__ idx, float* __restrict__ vals,
                                                    long long so_b, long long so_t) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  Smem& sm = *reinterpret_cast<Smem*>(smem_raw);
  const int r = gridDim.x - 1 - blockIdx.x;  // causal rows: the longest first
  const long long b = blockIdx.y;
  const int t = row0 + r;
  int st, en;
  if (causal) {
    st = 0;
    en = min(t + 1, S);
  } else {
    st = max(starts[b * sse_b + t * sse_t], 0);
    en = min(ends[b * sse_b + t * sse_t], S);
  }
  const int L = max(en - st, 0);
  const float* row = buf + b * sb_b + static_cast<long long>(r) * sb_r + st;
  int32_t* out_i = idx + b * so_b + static_cast<long long>(t) * so_t;
  float* out_v = vals + b * so_b + static_cast<long long>(t) * so_t;
  const int id0 = global_ids ? st + static_cast<int>(b) * S : st;

  if (L <= K) {
    for (int j = threadIdx.x; j < K; j += NT) {
      const bool v = j < L;
      out_i[j] = v ? id0 + j : -1;
      out_v[j] = v ? row[j] : -__int_as_float(0x7f800000);
    }
    return;
  }

  // 1. global levels: (key >> shift) == prefix marks the bucket
  unsigned prefix = 0u, k_rem = static_cast<unsigned>(K), in_b = 0u;
  int shift = 32;
  for (int lvl = 0; lvl < 3; ++lvl) {
    const int ds = shift_of(lvl);
    const unsigned mask = (1u << width_of(lvl)) - 1u;
    clear_hist(sm);
    auto count = [&](float x) {
      const unsigned key = ordered_key(x);
      if (lvl == 0 || (key >> shift) == prefix) atomicAdd(&sm.hist[(key >> ds) & mask], 1u);
    };
    int j0 = 0;
    if ((reinterpret_cast<uintptr_t>(row) & 15) == 0) {  // 16-byte loads, then the tail
      const float4* row4 = reinterpret_cast<const float4*>(row);
#pragma unroll 2
      for (int j = threadIdx.x; j < L / 4; j += NT) {
        const float4 v = __ldg(row4 + j);
        count(v.x);
        count(v.y);
        count(v.z);
        count(v.w);
      }
      j0 = L / 4 * 4;
    }
#pragma unroll 4
    for (int j = j0 + threadIdx.x; j < L; j += NT) count(__ldg(row + j));
    __syncthreads();
    pick_bucket(sm, width_of(lvl), k_rem);
    const unsigned bucket = static_cast<unsigned>(sm.pick[0]);
    k_rem -= static_cast<unsigned>(sm.pick[1]);
    in_b = static_cast<unsigned>(sm.pick[2]);
    prefix = lvl == 0 ? bucket : (prefix << width_of(lvl)) | bucket;
    shift = ds;
    if (in_b == k_rem || in_b <= CAND_CAP) break;
  }
  // 2. collection pass in index order; take_all: the bucket's first k_rem keys are the rest.
  // take(out0, id, ...): a key above the bucket, or among its first k_rem, goes to the output
  // after out0 keys of earlier passes.
  const bool take_all = in_b == k_rem || shift == 0;
  auto take = [&](unsigned out0, int id, float x, bool gt, bool eq, unsigned gt_before, unsigned eq_before) {
    if (gt || (eq && eq_before < k_rem)) {
      const unsigned pos = out0 + gt_before + min(eq_before, k_rem);
      out_i[pos] = id0 + id;
      out_v[pos] = x;
    }
  };
  int parity = 0;
  compaction_pass(
      L, shift, prefix, sm, parity, [&](int j) { return __ldg(row + j); },
      [&](int j, float x, bool gt, bool eq, unsigned gt_before, unsigned eq_before) {
        if (take_all) {
          take(0u, j, x, gt, eq, gt_before, eq_before);
        } else if (gt) {
          out_i[gt_before] = id0 + j;
          out_v[gt_before] = x;
        } else if (eq) {
          sm.cand_x[eq_before] = x;
          sm.cand_pos[eq_before] = j;
        }
      });
  if (take_all) return;

  // 3. shared-memory levels on the n candidates (all match prefix at shift)
  const unsigned out_base = static_cast<unsigned>(K) - k_rem;
  const int n = static_cast<int>(in_b);
  __syncthreads();
  for (int lvl = shift == 21 ? 1 : 2; lvl < 3; ++lvl) {
    const int ds = shift_of(lvl);
    const unsigned mask = (1u << width_of(lvl)) - 1u;
    clear_hist(sm);
    for (int i = threadIdx.x; i < n; i += NT) {
      const unsigned key = ordered_key(sm.cand_x[i]);
      if ((key >> shift) == prefix) atomicAdd(&sm.hist[(key >> ds) & mask], 1u);
    }
    __syncthreads();
    pick_bucket(sm, width_of(lvl), k_rem);
    k_rem -= static_cast<unsigned>(sm.pick[1]);
    in_b = static_cast<unsigned>(sm.pick[2]);
    prefix = (prefix << width_of(lvl)) | static_cast<unsigned>(sm.pick[0]);
    shift = ds;
    if (in_b == k_rem) break;
  }
  // compaction of the list: keys above the final bucket, then its first k_rem, in index order
  compaction_pass(
      n, shift, prefix, sm, parity, [&](int i) { return sm.cand_x[i]; },
      [&](int i, float x, bool gt, bool eq, unsigned gt_before, unsigned eq_before) {
        take(out_base, i < n ? sm.cand_pos[i] : 0, x, gt, eq, gt_before, eq_before);
      });
}

}  // namespace
