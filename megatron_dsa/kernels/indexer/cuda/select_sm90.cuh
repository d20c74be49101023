// Exact top-k of each row of fp32 indexer scores: radix select with shared-memory histograms.
//
// One CTA of 512 threads per row. Keys are the order-preserving uint32 images of the scores
// (-0.0 folded onto +0.0), cut into three digits: bits [21, 32), [10, 21) and [0, 10). Every
// path ends in a shared-memory candidate list (key, position) in index order, whose remaining
// digits are histogrammed in shared memory before one compaction of the list to the output.
//
// A. Rows of at most CAND_CAP keys are copied into the list whole: one read of the row.
// B. Rows of at least PATH_B_KEYS keys, where 2 k <= CAND_CAP (k = 2048 of 6144): a bound from
//    a sample, then one read of the row. The sample is 256 runs of 8 consecutive keys (one
//    32-byte sector each) spread over the row; two shared-memory levels on it give a bound lb
//    (22 bits) at the sample rank r whose share of the row falls below k only 3 standard
//    deviations out (r - 3 sqrt(r) = k m / L for a sample of m keys: about 2300 keys above lb at
//    L = 8K, 2500 at 16K, 3500 at 128K). One pass in index order then collects the keys >= lb
//    into the list (each thread 8 consecutive keys per tile of 4096, 16-byte loads, one scan per
//    two tiles, each thread's stores a walk over its set bits). The list is the row's top
//    candidates when it holds between k and CAND_CAP keys: every key below lb is below the
//    k-th. Otherwise (a sample unlike its row; many equal keys) the row takes path C; the
//    result is exact either way.
// C. The general path, 2-4 reads of the row (the second mostly from L2 where the rows in flight
//    fit it: below PATH_B_KEYS, where B measured no faster):
//   1. Global levels. A histogram pass over the row (shared-memory atomics) finds the digit
//      bucket holding the k-th largest key; the next level histograms only the keys of that
//      bucket. Levels stop once the bucket holds at most CAND_CAP keys (usually after the
//      first), once it holds exactly the missing count, or at the last digit (the threshold is
//      then one exact key value).
//   2. One collection pass over the row in index order: keys above the bucket go to the
//      output; keys in it go to the candidate list. When the bucket's keys are all taken, or
//      are all equal, the first missing ones in index order go straight to the output instead.
//
// Ties: the lowest index wins, as in the Triton select and the reference. The order of the
// output is deterministic: in paths A and B the list's keys taken, in index order; in C keys
// above the first bucket in index order, then the candidates taken, in index order.
// Compactions in index order use warp ballots and one scan per tile. Rows of at most k keys
// are copied, padded with -1 and -inf. No host synchronization; graph-capturable.
#pragma once

#include <cmath>
#include <cstdint>

namespace {

constexpr int NT = 512;  // threads per CTA
constexpr int MIN_CTAS = 1536 / NT;  // CTAs per SM the register budget allows (40 registers)
constexpr int NW = NT / 32;
constexpr int STEPS = 32 / NW;  // steps of NT keys per compaction tile: 32 (step, warp) counts
constexpr int BINS = 2048;      // the widest digit: 11 bits
constexpr int CAND_CAP = 6144;  // candidates kept in shared memory
constexpr int PATH_B_KEYS = 8192;      // path B's shortest row
constexpr int SAMPLE_RUNS = 256;         // path B's sample: runs of 8 keys, 4 per half-run
constexpr int SAMPLE = 8 * SAMPLE_RUNS;  // 2048 keys
constexpr int SAMPLE_REPS = 2 * SAMPLE_RUNS / NT;  // half-runs per thread
constexpr int CPT = 8;                   // path B's collection: keys per thread per tile
constexpr int TILES_PER_SCAN = 2;        // path B's collection: tiles per scan (16-bit fields)
constexpr int PREFETCH_TILES = 2;        // path B's collection: L2 prefetch distance in tiles
static_assert(TILES_PER_SCAN * 16 <= 32 && CPT * NT < 65536, "a tile's count fits 16 bits of the scan");

struct Smem {
  unsigned hist[BINS];
  float cand_x[CAND_CAP];
  int cand_pos[CAND_CAP];
  unsigned tile[2][33];  // per tile parity: 32 exclusive packed counts + the tile's total
  unsigned wsum[NW];
  unsigned wsum2[2][NW];  // per tile parity: the warps' candidate counts (path B)
  int pick[3];  // bucket, keys above it, keys in it
};

// Digit lvl of a key: bits [shift_of(lvl), shift_of(lvl) + width_of(lvl)).
__device__ __forceinline__ int shift_of(int lvl) { return lvl == 0 ? 21 : (lvl == 1 ? 10 : 0); }
__device__ __forceinline__ int width_of(int lvl) { return lvl == 2 ? 10 : 11; }

__device__ __forceinline__ unsigned ordered_key(float x) {
  const unsigned bits = __float_as_uint(x + 0.0f);  // -0.0 + 0.0 = +0.0 (no flush to zero here)
  return bits ^ (static_cast<unsigned>(static_cast<int>(bits) >> 31) | 0x80000000u);
}

__device__ __forceinline__ unsigned lanemask_lt() { return (1u << (threadIdx.x & 31)) - 1u; }

// Exclusive prefix sum of v over the CTA's threads (in thread order); with total, also the CTA's
// sum. One barrier: wsum (NW entries) must not be written again before a barrier that follows
// these reads (pick_bucket ends with one; collect_at_least alternates two buffers).
__device__ __forceinline__ unsigned block_exclusive_scan(unsigned v, unsigned* wsum, unsigned* total = nullptr) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  unsigned inc = v;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const unsigned y = __shfl_up_sync(0xffffffffu, inc, o);
    if (lane >= o) inc += y;
  }
  if (lane == 31) wsum[warp] = inc;
  __syncthreads();
  // lane w < NW scans the warps' sums; its exclusive sum is warp w's offset
  const unsigned own = lane < NW ? wsum[lane] : 0u;
  unsigned ws = own;
#pragma unroll
  for (int o = 1; o < NW; o <<= 1) {
    const unsigned y = __shfl_up_sync(0xffffffffu, ws, o);
    if (lane >= o) ws += y;
  }
  if (total != nullptr) *total = __shfl_sync(0xffffffffu, ws, NW - 1);
  const unsigned before = __shfl_sync(0xffffffffu, ws - own, warp);
  return before + inc - v;
}

// The bucket of a (1 << width)-bin histogram holding the k_rem-th largest key: sm.pick =
// (bucket, keys in higher buckets, keys in the bucket). The histogram holds >= k_rem keys.
__device__ __forceinline__ void pick_bucket(Smem& sm, int width, unsigned k_rem) {
  const int per = (1 << width) / NT;  // bins per thread, highest bins to thread 0
  const int hi = (1 << width) - 1 - static_cast<int>(threadIdx.x) * per;
  unsigned local = 0;
  for (int i = 0; i < per; ++i) local += sm.hist[hi - i];
  unsigned acc = block_exclusive_scan(local, sm.wsum);
  for (int i = 0; i < per; ++i) {
    const unsigned c = sm.hist[hi - i];
    if (acc < k_rem && acc + c >= k_rem) {
      sm.pick[0] = hi - i;
      sm.pick[1] = static_cast<int>(acc);
      sm.pick[2] = static_cast<int>(c);
    }
    acc += c;
    sm.hist[hi - i] = 0u;  // (only this thread reads these bins: the histogram is clear again)
  }
  __syncthreads();
}

// Zeroes the histogram; needed once per row: pick_bucket leaves it clear (a width-10 histogram
// only fills the bins it reads).
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

// Path B's bound: the first two digits (22 bits) of the sample's r-th largest key, r from
// r - 3 sqrt(r) = K SAMPLE / L. Needs L >= PATH_B_KEYS (r < 860 < SAMPLE).
__device__ __forceinline__ unsigned sample_bound(const float* row, int L, int K, Smem& sm) {
  // half-run h = threadIdx.x + rep NT: keys [4 (h & 1), 4 (h & 1) + 4) of run h >> 1
  auto at = [&](int rep) {
    const int h = static_cast<int>(threadIdx.x) + rep * NT;
    return static_cast<long long>(h >> 1) * (L - 8) / (SAMPLE_RUNS - 1) + 4 * (h & 1);
  };
  // (the sample's keys are read again for the second level, from L1, not kept in registers)
  auto key = [&](int rep, int i) { return ordered_key(__ldg(row + at(rep) + i)); };
#pragma unroll
  for (int rep = 0; rep < SAMPLE_REPS; ++rep)
#pragma unroll
    for (int i = 0; i < 4; ++i) atomicAdd(&sm.hist[key(rep, i) >> 21], 1u);
  __syncthreads();
  const float root = 1.5f + sqrtf(2.25f + static_cast<float>(K) * static_cast<float>(SAMPLE) / static_cast<float>(L));
  const unsigned r = static_cast<unsigned>(ceilf(root * root));
  pick_bucket(sm, 11, r);
  const unsigned b0 = static_cast<unsigned>(sm.pick[0]), r1 = r - static_cast<unsigned>(sm.pick[1]);
#pragma unroll
  for (int rep = 0; rep < SAMPLE_REPS; ++rep)
#pragma unroll
    for (int i = 0; i < 4; ++i)
      if ((key(rep, i) >> 21) == b0) atomicAdd(&sm.hist[(key(rep, i) >> 10) & 2047u], 1u);
  __syncthreads();
  pick_bucket(sm, 11, r1);
  return (b0 << 21) | (static_cast<unsigned>(sm.pick[0]) << 10);
}

// Path B's collection: the row's keys >= lb into the candidate list in index order (the first
// CAND_CAP of them stored); returns how many there are. A tile is CPT NT keys; thread i takes
// keys [8 i, 8 i + 8) of each, counted from the 16-byte boundary at or before the row (a = the
// row's offset from it, in keys), so that whole groups load as two float4; a group that reaches
// outside the row (the first and the last) loads key by key. A step takes TILES_PER_SCAN tiles
// and one scan of the threads' packed counts (one 16-bit field per tile). Each thread then
// stores its candidates by walking the set bits of its masks: a warp issues as many stores as
// its fullest lane has candidates (2-3 at a few percent of the keys), not one branch per key.
// Ends synchronized.
__device__ __forceinline__ unsigned collect_at_least(const float* row, int L, unsigned lb, Smem& sm) {
  const int a = static_cast<int>((reinterpret_cast<uintptr_t>(row) >> 2) & 3u);
  const float* base = row - a;
  const int np = L + a;
  unsigned run = 0u;  // keys >= lb before the step
  int parity = 0;
  // each thread's 32-byte group of the tile PREFETCH_TILES ahead goes to L2 (the rows were
  // written long before: HBM latency otherwise stalls every tile)
  auto prefetch = [&](int v) {
#ifdef __CUDA_ARCH__  // (a cache hint: the CPU emulation of the tests has nothing to model)
    if (v < np) asm volatile("prefetch.global.L2 [%0];" ::"l"(base + v));
#endif
  };
  for (int t = TILES_PER_SCAN; t < PREFETCH_TILES; ++t) prefetch(t * CPT * NT + CPT * static_cast<int>(threadIdx.x));
  for (int t0 = 0; t0 < np; t0 += TILES_PER_SCAN * CPT * NT) {
    unsigned m[TILES_PER_SCAN];  // bit i: key v0 + i is in the row and >= lb
    unsigned packed = 0u;
#pragma unroll
    for (int u = 0; u < TILES_PER_SCAN; ++u) {
      const int v0 = t0 + u * CPT * NT + CPT * static_cast<int>(threadIdx.x);
      prefetch(v0 + PREFETCH_TILES * CPT * NT);
      m[u] = 0u;
      if (v0 >= CPT && v0 + CPT <= np) {
        const float4 p0 = __ldg(reinterpret_cast<const float4*>(base + v0));
        const float4 p1 = __ldg(reinterpret_cast<const float4*>(base + v0) + 1);
        const float x[CPT] = {p0.x, p0.y, p0.z, p0.w, p1.x, p1.y, p1.z, p1.w};
#pragma unroll
        for (int i = 0; i < CPT; ++i) m[u] |= static_cast<unsigned>(ordered_key(x[i]) >= lb) << i;
      } else {
#pragma unroll
        for (int i = 0; i < CPT; ++i) {
          const int j = v0 + i - a;
          m[u] |= static_cast<unsigned>(j >= 0 && j < L && ordered_key(__ldg(row + j)) >= lb) << i;
        }
      }
      packed |= static_cast<unsigned>(__popc(m[u])) << (16 * u);
    }
    unsigned tot;  // (one barrier per step: the next step scans in the other parity's buffer)
    const unsigned ex = block_exclusive_scan(packed, sm.wsum2[parity], &tot);
#pragma unroll
    for (int u = 0; u < TILES_PER_SCAN; ++u) {
      const int v0 = t0 + u * CPT * NT + CPT * static_cast<int>(threadIdx.x);
      unsigned pos = run + ((ex >> (16 * u)) & 0xffffu);
      // (the score read again, from L1: candidates are a few percent of the keys)
      for (unsigned mm = m[u]; mm != 0u; mm &= mm - 1u, ++pos) {
        const int i = __ffs(static_cast<int>(mm)) - 1;
        if (pos < static_cast<unsigned>(CAND_CAP)) {
          sm.cand_x[pos] = __ldg(base + v0 + i);
          sm.cand_pos[pos] = v0 + i - a;
        }
      }
      run += (tot >> (16 * u)) & 0xffffu;
    }
    parity ^= 1;
  }
  __syncthreads();
  return run;
}

// The candidate list's select: its n keys (index order; all match prefix at shift, the digits
// from level lvl0 on undecided) hold the row's k_rem missing keys; digit levels in shared memory
// find them, then one compaction writes them to the output after out_base keys.
__device__ __forceinline__ void select_in_list(Smem& sm, int n, int lvl0, int shift, unsigned prefix, unsigned k_rem,
                                               unsigned out_base, int id0, int32_t* out_i, float* out_v,
                                               int& parity) {
  for (int lvl = lvl0; lvl < 3; ++lvl) {
    const int ds = shift_of(lvl);
    const unsigned mask = (1u << width_of(lvl)) - 1u;
    for (int i = threadIdx.x; i < n; i += NT) {
      const unsigned key = ordered_key(sm.cand_x[i]);
      if (lvl == 0 || (key >> shift) == prefix) atomicAdd(&sm.hist[(key >> ds) & mask], 1u);
    }
    __syncthreads();
    pick_bucket(sm, width_of(lvl), k_rem);
    k_rem -= static_cast<unsigned>(sm.pick[1]);
    const unsigned in_b = static_cast<unsigned>(sm.pick[2]);
    prefix = lvl == 0 ? static_cast<unsigned>(sm.pick[0]) : (prefix << width_of(lvl)) | static_cast<unsigned>(sm.pick[0]);
    shift = ds;
    if (in_b == k_rem) break;
  }
  // keys above the final bucket, then its first k_rem, in index order
  compaction_pass(
      n, shift, prefix, sm, parity, [&](int i) { return sm.cand_x[i]; },
      [&](int i, float x, bool gt, bool eq, unsigned gt_before, unsigned eq_before) {
        if (gt || (eq && eq_before < k_rem)) {
          const unsigned pos = out_base + gt_before + min(eq_before, k_rem);
          out_i[pos] = id0 + sm.cand_pos[i];
          out_v[pos] = x;
        }
      });
}

__global__ void __launch_bounds__(NT, MIN_CTAS) select_kernel(const float* __restrict__ buf, long long sb_b, long long sb_r,
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

  // A / B: the candidate list straight from the row (n: its keys; -1: path C)
  clear_hist(sm);  // (once per row: each pick_bucket leaves the histogram clear)
  int n = -1;
  if (L <= CAND_CAP) {
    for (int j = threadIdx.x; j < L; j += NT) {
      sm.cand_x[j] = __ldg(row + j);
      sm.cand_pos[j] = j;
    }
    __syncthreads();
    n = L;
  } else if (L >= PATH_B_KEYS && 2 * K <= CAND_CAP) {
    const unsigned lb = sample_bound(row, L, K, sm);
    const unsigned c = collect_at_least(row, L, lb, sm);
    if (c >= static_cast<unsigned>(K) && c <= static_cast<unsigned>(CAND_CAP)) n = static_cast<int>(c);
  }
  int parity = 0;
  if (n >= 0) {
    select_in_list(sm, n, 0, 32, 0u, static_cast<unsigned>(K), 0u, id0, out_i, out_v, parity);
    return;
  }

  // C1. global levels: (key >> shift) == prefix marks the bucket
  unsigned prefix = 0u, k_rem = static_cast<unsigned>(K), in_b = 0u;
  int shift = 32;
  for (int lvl = 0; lvl < 3; ++lvl) {
    const int ds = shift_of(lvl);
    const unsigned mask = (1u << width_of(lvl)) - 1u;
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
  // C2. collection pass in index order; take_all: the bucket's first k_rem keys are the rest.
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

  // C3. the candidates' remaining digits (they all match prefix at shift)
  __syncthreads();
  select_in_list(sm, static_cast<int>(in_b), shift == 21 ? 1 : 2, shift, prefix, k_rem, static_cast<unsigned>(K) - k_rem,
                 id0, out_i, out_v, parity);
}

}  // namespace
