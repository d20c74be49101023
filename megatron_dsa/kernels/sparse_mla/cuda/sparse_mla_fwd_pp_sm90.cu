// Sparse MLA forward (absorbed layout) for Hopper (sm_90a), H > 16: a ping-pong of two math
// warpgroups over 64-key blocks, after FlashMLA's sparse forward (docs/kernels_sparse_mla.md,
// section 3.1).
//
// Fast path: Dqk = 576, d_v = 512, bf16, int32 indices. One CTA of 384 threads (three
// warpgroups) per (query row t, block of 64 heads; heads >= H of the last block are zero rows
// of Q and are not stored). The row's first kv_len slots (kv_len = topk_len[t], the effective
// length the launcher passes, capped by K) go in pairs of 64-key blocks: block 2i to kv buffer
// 0, block 2i + 1 to buffer 1. Each buffer is two halves with their own ready / free mbarriers:
// L = channel chunks 0-3, R = 4-8.
// Row-packed instantiation (PACK, H <= 32; packing.py): one CTA per group of 64 / 2^hshift
// query rows, tile row r = (row r >> hshift, head r & (2^hshift - 1)); the key list is the
// group's union (uid, length count), and each thread masks by its own row's uslot entries,
// which the producer copies beside each block (in place of the ids). Everything else is the same.
//
//   WG0        producer (72 registers): 8 threads per 128-byte row of a chunk (whole lines),
//              cp.async with an L2 256-byte prefetch and evict_last; per pair it fills
//              0.L, 1.R, 0.R, 1.L, each after its free barrier, the order the math reads them.
//              Slots past kv_len and ids outside [0, Tk) (-1 padding) are zero-filled.
//   WG1 (A)    block 2i and output channels 0-255: S from buffer 0, softmax with the running
//              max, hands its max to B, P_A V(0.L) from registers (then frees 0.L); takes B's new
//              max, rescales P_A and O by it, stores P_A (into buffer 0's rope chunk, which S no
//              longer needs) for B; P_B V(1.L) from shared memory (then frees 1.L); S of the next
//              even block.
//   WG2 (B)    block 2i + 1 and channels 256-511: S from buffer 1 (R half first), softmax with
//              A's max, hands its max to A, stores P_B for A, P_B V(1.R) from registers (frees
//              1.R), P_A V(0.R) from shared memory (frees 0.R).
//   The two softmaxes of a pair run one after the other (B needs A's max), but each warpgroup's
//   S, its P V and the loads of the other buffer overlap them, and what the other waits on is
//   the row max alone (published before the exponentials). Row sums: each warpgroup keeps
//   those of its own blocks; added at the end. The softmax masks (-inf) every slot past kv_len
//   or with an id outside [0, Tk); a row with no valid slot gives out = 0, lse = -inf.
//   A half is freed by the one warpgroup that reads it last, through an mbarrier that counts
//   all 128 of its threads, each arriving after its own wgmma wait (and, for what the other
//   warpgroup read of it, after a named barrier that follows that warpgroup's waits).
// Epilogue: O / (row sum + the sink's exp, if any), staged bf16 in Q's space, 16-byte stores of
// whole 512-byte rows; lse = the log-sum-exp of the selected keys (the sink not in it).
// Registers: setmaxnreg 72 + 2 x 216 = 504 = the CTA's 3 x 168.
// Shared memory: Q [64, 576] (72 KB, reused to stage O), two kv buffers [64, 576] (72 KB each),
// P_B [64, 64] bf16, the max hand-off, row sums, the blocks' ids, barriers: 225 KB.
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "sm90_common.cuh"

using namespace dsa_sm90;

namespace {

constexpr int D_QK = 576;
constexpr int BM = 64;                          // heads per CTA
constexpr int NCH = D_QK / 64;                  // 9 chunks of 64 channels (128 B per row)
constexpr int BN = 64;                          // keys per block
constexpr int CH = BN * 128;                    // one chunk of a buffer (and of Q): 64 rows x 128 B
constexpr int STAGE = NCH * CH;                 // 72 KB
constexpr int THREADS = 384;

constexpr int OFF_Q = 0;
constexpr int OFF_KV = OFF_Q + STAGE;           // buffers 0, 1
constexpr int OFF_PA = OFF_KV + 8 * CH;         // P_A: buffer 0's rope chunk
constexpr int OFF_PB = OFF_KV + 2 * STAGE;      // P_B [64 heads, 64 keys] bf16, 128-byte rows
constexpr int OFF_M = OFF_PB + CH;              // [64] fp32: the running row max hand-off
constexpr int OFF_L = OFF_M + 64 * 4;           // [2][64] fp32: row sums (epilogue)
constexpr int OFF_IDS = OFF_L + 2 * 64 * 4;     // [2][BN] int32: the buffers' ids (unpacked)
constexpr int OFF_US = OFF_IDS;                 // [2][4][BN] int16: the buffers' uslot rows (packed)
constexpr int US_BUF = 4 * BN * 2;              // one buffer's uslot rows (bytes)
constexpr int OFF_BAR = OFF_US + 2 * US_BUF;    // ready[b][h], free[b][h] (b buffer, h = L / R)
constexpr int SMEM_USED = OFF_BAR + 8 * 8;
constexpr int SMEM_BYTES = SMEM_USED + 1024;
static_assert(SMEM_BYTES <= 232448, "shared memory");
// named barriers: A's max is out; B's max is out; P_A stored; P_B stored; both math warpgroups
constexpr int BAR_A = 1, BAR_B = 2, BAR_PA = 3, BAR_PB = 4, BAR_MATH = 5;

// The forward's parameters plus row packing's (PACK; packing.py): idx = the groups' unions
// [G, idx_s], topk_len = their lengths [G], uslot [G, rows, idx_s]; tile row r holds query row
// t + (r >> hshift), head r & (2^hshift - 1) (hshift 4: 16 heads x 4 rows; 5: 32 x 2).
struct PpParams : FwdParams {
  const int16_t* uslot;
  int hshift, rows;
};

__device__ __forceinline__ uint32_t bar_ready(uint32_t sbase, int b, int h) { return sbase + OFF_BAR + 8 * (2 * b + h); }
__device__ __forceinline__ uint32_t bar_free(uint32_t sbase, int b, int h) { return sbase + OFF_BAR + 32 + 8 * (2 * b + h); }

// a 16-byte gather with an L2 cache policy (evict_last) and a 256-byte L2 prefetch
__device__ __forceinline__ void gather16(uint32_t dst, const void* src, bool valid, uint64_t policy) {
  const int n = valid ? 16 : 0;  // 0 source bytes: zero-filled
  asm volatile("cp.async.cg.shared.global.L2::cache_hint.L2::256B [%0], [%1], 16, %2, %3;\n" ::"r"(dst), "l"(src),
               "r"(n), "l"(policy) : "memory");
}

// A math warpgroup: X = 0 (A: even blocks, buffer 0, channels 0-255) or 1 (B). A template, so
// that which warpgroup runs is known at compile time (a branch on the warpgroup index around the
// wgmma makes ptxas serialize them).
template <int X, bool PACK>
__device__ __forceinline__ void math_wg(const PpParams& p, uint8_t* smem, uint32_t sbase, int t, int h0, int kv_len,
                                        int npair) {
  float* m_s = reinterpret_cast<float*>(smem + OFF_M);
  float* l_s = reinterpret_cast<float*>(smem + OFF_L);
  const int* ids_s = reinterpret_cast<const int*>(smem + OFF_IDS) + X * BN;
  const int wt = threadIdx.x & 127, warp = wt >> 5, lane = threadIdx.x & 31;
  const int row0 = warp * 16 + (lane >> 2);
  const int colq = 2 * (lane & 3);
  // (PACK) the uslot entries of this thread's query row for its buffer's block (rows row0 and
  // row0 + 8 lie in one query row: 16 or 32 heads per row), two int16 per word
  const uint32_t* us_s =
      reinterpret_cast<const uint32_t*>(smem + OFF_US + X * US_BUF) + (PACK ? (row0 >> p.hshift) * (BN / 2) : 0);
  float o[128];
#pragma unroll
  for (int i = 0; i < 128; ++i) o[i] = 0.f;
  float s[32];
  float m_run[2] = {-INFINITY, -INFINITY};
  float l_run[2] = {0.f, 0.f};
  // (descriptors are formed where used: kept live across the loop, they cost ptxas a spill)
  // Q and this warpgroup's buffer, K-major; V of this warpgroup's channels [256 X, 256 X + 256)
  // (chunks 4X..4X+3 of a buffer, MN-major); the other warpgroup's P
#define QDESC desc(sbase + OFF_Q, 16, 1024)
#define KDESC desc(sbase + OFF_KV + X * STAGE, 16, 1024)
#define VOWN desc(sbase + OFF_KV + X * STAGE + X * 4 * CH, CH, 1024)
#define VOTH desc(sbase + OFF_KV + (1 - X) * STAGE + X * 4 * CH, CH, 1024)
#define POTH desc(sbase + (X == 0 ? OFF_PB : OFF_PA), 16, 1024)
  uint8_t* pown = smem + (X == 0 ? OFF_PA : OFF_PB);

  // S of this warpgroup's block of pair i: chunks [c0, c1) after half h's ready barrier
  auto s_half = [&](int i, int h) {
    mbar_wait(bar_ready(sbase, X, h), i & 1);
    fence_async_smem();
    wgmma_fence();
    const int c0 = h == 0 ? 0 : 4, c1 = h == 0 ? 4 : NCH;
    const bool first = (X == 0) == (h == 0);  // A starts with L, B with R
#pragma unroll
    for (int c = c0; c < c1; ++c)
#pragma unroll
      for (int k = 0; k < 4; ++k)
        wgmma_m64n64k16_ss<0, 0>(s, QDESC + ((c * CH + k * 32) >> 4), KDESC + ((c * CH + k * 32) >> 4),
                                 !(first && c == c0 && k == 0));
    wgmma_commit();
  };
  auto rescale = [&](float a0, float a1) {
    if (__any_sync(0xffffffffu, a0 != 1.f || a1 != 1.f)) {
#pragma unroll
      for (int jj = 0; jj < 32; ++jj) {
        o[4 * jj + 0] *= a0;
        o[4 * jj + 1] *= a0;
        o[4 * jj + 2] *= a1;
        o[4 * jj + 3] *= a1;
      }
    }
  };
  // P (bf16) to this warpgroup's shared P buffer: row r, keys [8 jj, 8 jj + 8) at granule
  // jj ^ (r % 8), by stmatrix: keys [16 c, 16 c + 16) of the warp's 16 rows per instruction
  // (stsm_acc16: four 8 x 8 blocks m = rows + 8 (m % 2), keys 8 (2 c + m / 2); lane L addresses
  // row L % 8 of block L / 8)
  const uint32_t prow = stsm_row(smem_u32(pown), warp * 16, 128);
  auto p_addr = [&](int c) { return prow + (((2 * c + (lane >> 4)) ^ (lane & 7)) << 4); };  // (stsm_acc16's)
  auto store_p = [&](float f0, float f1) {  // A: its P, times f per row
#pragma unroll
    for (int c = 0; c < 4; ++c) stsm_acc16(prow, c, s + 8 * c, f0, f1);
    fence_async_smem();
  };

  // The online softmax of block j in s (exp2 domain), in two parts so that the other warpgroup
  // waits on the row max only. The scale (> 0: the launcher's contract) is applied to the row
  // max and folded into the exponent's FMA, not multiplied into every score: max(scale s) =
  // scale max(s).
  // raw_max: masks the slots past the row's length or with an invalid id (in place; one unsigned
  // compare per id, Tk >= 0, and the length only in a row's last block) and returns the row
  // maxima of the unscaled scores.
  auto raw_max = [&](int j, float (&mx)[2]) {
    const int left = kv_len - j * BN - colq;   // slot 8 jj + colq (+ 1) of the block is in the row if < left
    const bool whole = (j + 1) * BN <= kv_len;  // (uniform: the whole block is)
#pragma unroll
    for (int jj = 0; jj < 8; ++jj) {
      const int col = 8 * jj + colq;
      bool v0, v1;
      if (PACK) {  // the row selected the entry: its uslot (int16) >= 0, a clear sign bit
        const uint32_t w = us_s[col >> 1];
        v0 = (w & 0x8000u) == 0u && (whole || 8 * jj < left);
        v1 = (w & 0x80000000u) == 0u && (whole || 8 * jj + 1 < left);
      } else {
        const int2 id2 = *reinterpret_cast<const int2*>(ids_s + col);
        v0 = static_cast<unsigned>(id2.x) < static_cast<unsigned>(p.Tk) && (whole || 8 * jj < left);
        v1 = static_cast<unsigned>(id2.y) < static_cast<unsigned>(p.Tk) && (whole || 8 * jj + 1 < left);
      }
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        s[4 * jj + 2 * r] = v0 ? s[4 * jj + 2 * r] : -INFINITY;
        s[4 * jj + 2 * r + 1] = v1 ? s[4 * jj + 2 * r + 1] : -INFINITY;
      }
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float m = -INFINITY;
#pragma unroll
      for (int jj = 0; jj < 8; ++jj) m = fmaxf(m, fmaxf(s[4 * jj + 2 * r], s[4 * jj + 2 * r + 1]));
      m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 1));
      mx[r] = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 2));
    }
  };
  // finish: the new running max from the raw maxima and m_in (A: its own running max; B: A's
  // after block j - 1) goes to the hand-off, then `bar` is arrived on (the other warpgroup may
  // go on), then the exponentials, the row sums and O's rescale from m_run.
  auto finish = [&](const float (&mx_raw)[2], const float (&m_in)[2], int bar) {
    float mx[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) mx[r] = fmaxf(m_in[r], mx_raw[r] * p.scale_log2);
    if ((lane & 3) == 0) {
      m_s[row0] = mx[0];
      m_s[row0 + 8] = mx[1];
    }
    bar_arrive(bar, 256);
    float alpha[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float m_use = mx[r] == -INFINITY ? 0.f : mx[r];
      alpha[r] = mx[r] == -INFINITY ? 1.f : exp2f(m_run[r] - mx[r]);
      float sum = 0.f;
#pragma unroll
      for (int jj = 0; jj < 8; ++jj)
#pragma unroll
        for (int b = 0; b < 2; ++b) {
          const float e = exp2f(fmaf(s[4 * jj + 2 * r + b], p.scale_log2, -m_use));
          s[4 * jj + 2 * r + b] = e;
          sum += e;
        }
      l_run[r] = l_run[r] * alpha[r] + sum;
      m_run[r] = mx[r];
    }
    rescale(alpha[0], alpha[1]);
  };
  // P as bf16 A fragments: pf[kk] holds keys [16 kk, 16 kk + 16)
  auto make_pf = [&](uint32_t (&pf)[4][4]) {
#pragma unroll
    for (int kk = 0; kk < 4; ++kk)
#pragma unroll
      for (int h = 0; h < 2; ++h)
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const int jj = 2 * kk + h;
          pf[kk][2 * h + r] = bf16x2_bits(s[4 * jj + 2 * r], s[4 * jj + 2 * r + 1]);
        }
  };
  auto pv_own = [&](const uint32_t (&pf)[4][4]) {  // O += P_own V(own buffer, own channels), P from registers
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) wgmma_m64n256k16_rs<1>(o, pf[kk], VOWN + ((kk * 16 * 128) >> 4), 1);
    wgmma_commit();
  };
  auto pv_other = [&]() {  // O += P_other V(other buffer, own channels), P from shared memory
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < 4; ++kk)
      wgmma_m64n256k16_ss<0, 1>(o, POTH + ((kk * 32) >> 4), VOTH + ((kk * 16 * 128) >> 4), 1);
    wgmma_commit();
  };

  // B's P as is: the bf16 fragments themselves (s is dead once they are made); pf[c] holds
  // stmatrix's four blocks of keys [16 c, 16 c + 16) in its order. (No proxy fence here: B's
  // fence after BAR_PA, before the BAR_PB arrive that A waits on, orders these stores too.)
  auto store_pf = [&](const uint32_t (&pf)[4][4]) {
#pragma unroll
    for (int c = 0; c < 4; ++c) stsm_x4(p_addr(c), pf[c][0], pf[c][1], pf[c][2], pf[c][3]);
  };

  if constexpr (X == 0) {
    for (int i = 0; i < npair; ++i) {
      if (i == 0) {  // (the first S inside the loop: outside it, ptxas spills)
        s_half(0, 0);
        s_half(0, 1);
        wgmma_wait0();
      }
      float mx[2];
      raw_max(2 * i, mx);
      const float m_in[2] = {m_run[0], m_run[1]};
      finish(mx, m_in, BAR_A);  // (A's max is out before its exponentials)
      uint32_t pf[4][4];
      make_pf(pf);
      pv_own(pf);
      wgmma_wait0();
      mbar_arrive(bar_free(sbase, 0, 0));
      bar_sync(BAR_B, 256);  // B's max (at least A's)
      float f[2];
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const float mb = m_s[row0 + 8 * r];
        f[r] = mb == -INFINITY ? 1.f : exp2f(m_run[r] - mb);
        m_run[r] = mb;
        l_run[r] *= f[r];
      }
      store_p(f[0], f[1]);  // into buffer 0's rope chunk: this warpgroup's S read it, and is done
      bar_arrive(BAR_PA, 256);
      bar_sync(BAR_PB, 256);
      // buffer 1 was waited on by B only: order its gathered rows before this warpgroup's
      // async-proxy (wgmma) reads
      fence_async_smem();
      rescale(f[0], f[1]);
      pv_other();
      if (i + 1 < npair) {
        s_half(i + 1, 0);
        wgmma_wait1();  // P_B V(1.L)
        mbar_arrive(bar_free(sbase, 1, 0));
        s_half(i + 1, 1);
        wgmma_wait0();
      } else {
        wgmma_wait0();
        mbar_arrive(bar_free(sbase, 1, 0));
      }
    }
  } else {
    for (int i = 0; i < npair; ++i) {
      s_half(i, 1);
      s_half(i, 0);
      wgmma_wait0();
      float mx[2];
      raw_max(2 * i + 1, mx);  // (before A's max is waited on)
      bar_sync(BAR_A, 256);    // A's max after block 2 i
      const float m_in[2] = {m_s[row0], m_s[row0 + 8]};
      finish(mx, m_in, BAR_B);  // (A's max is at least B's previous one)
      uint32_t pf[4][4];
      make_pf(pf);
      pv_own(pf);
      store_pf(pf);
      bar_sync(BAR_PA, 256);
      fence_async_smem();  // (buffer 0 was waited on by A only; also orders P_B's stores for A)
      pv_other();
      bar_arrive(BAR_PB, 256);
      wgmma_wait1();  // P_B V(1.R)
      mbar_arrive(bar_free(sbase, 1, 1));
      wgmma_wait0();  // P_A V(0.R)
      mbar_arrive(bar_free(sbase, 0, 1));
    }
  }

#undef QDESC
#undef KDESC
#undef VOWN
#undef VOTH
#undef POTH

  // ---- epilogue: total row sums, O / l, staged in Q's space, 16-byte stores ----
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float l = l_run[r];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    if ((lane & 3) == 0) l_s[X * 64 + row0 + 8 * r] = l;
  }
  bar_sync(BAR_MATH, 256);  // both warpgroups are done with Q, the buffers and P; l is written
  float inv[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int rr = row0 + 8 * r;
    int tr, h;
    tile_row<PACK>(p, t, h0, rr, tr, h);
    const bool stored = h < p.H && (!PACK || tr < p.T);
    const float m_use = m_run[r] == -INFINITY ? 0.f : m_run[r];
    float denom = l_s[rr] + l_s[64 + rr];
    if (X == 0 && (lane & 3) == 0 && stored)  // (the lse of the selected keys: the sink is not in it)
      p.lse[static_cast<long long>(tr) * p.H + h] = denom > 0.f ? (m_use + log2f(denom)) * 0.6931471805599453f : -INFINITY;
    if (p.sink != nullptr && stored) denom += exp2f(__ldg(p.sink + h) * 1.4426950408889634f - m_use);
    inv[r] = denom > 0.f ? 1.f / denom : 0.f;
  }
  // row rr of this warpgroup's [64, 256] tile: 512 B at Q + X * 32 KB + rr * 512, granule k at
  // k ^ (rr % 8); stored by stmatrix as P is (channels [16 c, 16 c + 16) per instruction)
  const uint32_t orow = stsm_row(sbase + OFF_Q + X * 32768, warp * 16, 512);
#pragma unroll
  for (int c = 0; c < 16; ++c) stsm_acc16(orow, c, o + 8 * c, inv[0], inv[1]);
  bar_sync(BAR_MATH + 1 + X, 128);  // this warpgroup's tile is staged
  const int k = wt & 31;
#pragma unroll 4
  for (int r = wt >> 5; r < BM; r += 4) {
    int tr, h;
    tile_row<PACK>(p, t, h0, r, tr, h);
    if (h >= p.H || (PACK && tr >= p.T)) continue;
    const uint4 v = *reinterpret_cast<const uint4*>(smem + OFF_Q + X * 32768 + r * 512 + ((k ^ (r & 7)) << 4));
    *reinterpret_cast<uint4*>(p.out + static_cast<long long>(tr) * p.out_st + static_cast<long long>(h) * p.out_sh +
                              X * 256 + 8 * k) = v;
  }
}

template <bool PACK>
__global__ void __launch_bounds__(THREADS, 1) sparse_mla_fwd_pp_sm90_kernel(const PpParams p) {
  extern __shared__ uint8_t smem_raw[];
  // (aligned by offsetting the __shared__ array itself: its accesses stay shared-space, LDS / STS)
  uint8_t* smem = smem_raw + ((1024u - (smem_u32(smem_raw) & 1023u)) & 1023u);
  const uint32_t sbase = smem_u32(smem);

  const int tid = threadIdx.x, wg = tid >> 7, wt = tid & 127;
  // unpacked: (query row t, heads from h0); PACK: group L of p.rows query rows from t, its union
  // as the key list (idx row L, length topk_len[L])
  const int L = static_cast<int>(blockIdx.x / p.n_hblk);
  const int t = PACK ? L * p.rows : L;
  const int h0 = static_cast<int>(blockIdx.x % p.n_hblk) * BM;
  int kv_len = p.K;
  if (p.topk_len != nullptr) kv_len = min(kv_len, max(0, __ldg(p.topk_len + L)));
  const int nblk = (kv_len + BN - 1) / BN;
  const int npair = (nblk + 1) / 2;  // (an odd count leaves B one block with no valid key)
  const int32_t* idx_row = p.idx + static_cast<long long>(L) * p.idx_s;

  if (tid == 0) {
    for (int b = 0; b < 2; ++b)
      for (int h = 0; h < 2; ++h) {
        mbar_init(bar_ready(sbase, b, h), 128);  // the producer's 128 threads (cp.async, noinc)
        mbar_init(bar_free(sbase, b, h), 128);   // the one math warpgroup that reads the half last
      }
  }
  __syncthreads();  // the barriers are initialized

  if (wg == 0) {
    // ---------------- producer ----------------
    asm volatile("setmaxnreg.dec.sync.aligned.u32 72;\n" ::: "memory");
    uint64_t policy;
    asm volatile("createpolicy.fractional.L2::evict_last.b64 %0, 1.0;\n" : "=l"(policy));
    // 8 threads per 128-byte row of a chunk: a warp covers 4 whole rows per cp.async
    const int grp = wt >> 3, sub = wt & 7;
    for (int i = 0; i < npair; ++i) {
      int id[2][4];
#pragma unroll
      for (int b = 0; b < 2; ++b)
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          const int slot = (2 * i + b) * BN + grp + 16 * k;
          id[b][k] = slot < kv_len ? __ldg(idx_row + slot) : -1;
        }
      // fill (buffer b, chunks [c0, c1)) with block 2 i + b; the first half of a buffer also
      // brings the block's ids (PACK: the group's rows' uslot entries of the block, 4 bytes per
      // thread, zero past kv_len, which the math masks)
      auto fill = [&](int b, int h) {
        mbar_wait(bar_free(sbase, b, h), (i & 1) ^ 1);
        const int c0 = h == 0 ? 0 : 4, c1 = h == 0 ? 4 : NCH;
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          const int r = grp + 16 * k;
          const bool ok = id[b][k] >= 0 && id[b][k] < p.Tk;
          const __nv_bfloat16* src = p.kv + static_cast<long long>(ok ? id[b][k] : 0) * p.kv_s + sub * 8;
          const uint32_t dst = sbase + OFF_KV + b * STAGE + r * 128 + ((sub ^ (r & 7)) << 4);
#pragma unroll
          for (int c = c0; c < c1; ++c) gather16(dst + c * CH, src + c * 64, ok, policy);
        }
        if (PACK && (b == 0) == (h == 0) && wt < 32 * p.rows) {
          const int jr = wt >> 5, e = (2 * i + b) * BN + 2 * (wt & 31);
          const int16_t* src = p.uslot + (static_cast<long long>(L) * p.rows + jr) * p.idx_s + (e < kv_len ? e : 0);
          asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(sbase + OFF_US + b * US_BUF + jr * (2 * BN) +
                                                                              4 * (wt & 31)),
                       "l"(src), "r"(e < kv_len ? 4 : 0) : "memory");
        }
        if (!PACK && (b == 0) == (h == 0) && sub == 0) {
#pragma unroll
          for (int k = 0; k < 4; ++k) {
            const int slot = (2 * i + b) * BN + grp + 16 * k;
            asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(sbase + OFF_IDS + (b * BN + grp + 16 * k) * 4),
                         "l"(idx_row + (slot < kv_len ? slot : 0)), "r"(slot < kv_len ? 4 : 0) : "memory");
          }
        }
        cp_async_arrive_noinc(bar_ready(sbase, b, h));
      };
      fill(0, 0);
      fill(1, 1);
      fill(0, 1);
      fill(1, 0);
    }
    cp_async_wait_all();
    return;
  }

  // ---------------- math warpgroups ----------------
  // Q -> shared memory (128-byte swizzle, rows >= H zero; 64 x 72 granules) by the two math
  // warpgroups while the producer already gathers the first pair's rows
  {
    for (int f = tid - 128; f < BM * NCH * 8; f += THREADS - 128) {
      const int r = f / (NCH * 8), rem = f % (NCH * 8), c = rem >> 3, g = rem & 7;
      int tr, h;
      tile_row<PACK>(p, t, h0, r, tr, h);
      const bool ok = h < p.H && (!PACK || tr < p.T);
      cp_async16(sbase + OFF_Q + c * CH + r * 128 + ((g ^ (r & 7)) << 4),
                 p.q + (ok ? static_cast<long long>(tr) * p.q_st + static_cast<long long>(h) * p.q_sh : 0) + c * 64 + g * 8,
                 ok);
    }
    cp_async_wait_all();
    fence_async_smem();
    bar_sync(BAR_MATH, 256);  // both math warpgroups' parts of Q have landed
  }
  asm volatile("setmaxnreg.inc.sync.aligned.u32 216;\n" ::: "memory");
  if (wg == 1)
    math_wg<0, PACK>(p, smem, sbase, t, h0, kv_len, npair);
  else
    math_wg<1, PACK>(p, smem, sbase, t, h0, kv_len, npair);
}

// Raise the kernel's shared-memory limit (once per device and instantiation) and launch `ctas`
template <bool PACK>
int launch_pp(const PpParams& p, unsigned ctas, void* stream) {
  static bool attr_set[64] = {};
  const cudaError_t e = set_smem_once(attr_set, sparse_mla_fwd_pp_sm90_kernel<PACK>, SMEM_BYTES);
  if (e != cudaSuccess) return static_cast<int>(e);
  if (ctas == 0) return 0;
  sparse_mla_fwd_pp_sm90_kernel<PACK><<<ctas, THREADS, SMEM_BYTES, static_cast<cudaStream_t>(stream)>>>(p);
  return static_cast<int>(cudaGetLastError());
}

bool out_aligned(const void* out, long long out_st, long long out_sh) {
  return (reinterpret_cast<uintptr_t>(out) & 15) == 0 && out_st % 8 == 0 && out_sh % 8 == 0;
}

}  // namespace

extern "C" {

// Launches on `stream`; returns a cudaError_t (0 = launched). No host synchronization.
// topk_len: the rows' effective lengths (int32 [T]) or null; out: 16-byte aligned rows (base,
// out_st and out_sh multiples of 8 elements, as a contiguous torch.empty gives; else
// cudaErrorInvalidValue): the output is written in 16-byte pieces.
int dsa_sparse_mla_fwd_pp_sm90(const void* q, const void* kv, const void* idx, const void* topk_len,
                               const void* sink, void* out, void* lse, long long q_st, long long q_sh,
                               long long kv_s, long long idx_s, long long out_st, long long out_sh, int T, int H,
                               int Tk, int K, float scale_log2, void* stream) {
  if (!out_aligned(out, out_st, out_sh) && T > 0 && H > 0) return static_cast<int>(cudaErrorInvalidValue);
  PpParams p;
  static_cast<FwdParams&>(p) = fwd_params(q, kv, idx, topk_len, sink, out, lse, q_st, q_sh, kv_s, idx_s, out_st,
                                          out_sh, T, H, Tk, K, scale_log2);
  p.n_hblk = (H + BM - 1) / BM;
  p.uslot = nullptr;
  p.hshift = p.rows = 0;
  return launch_pp<false>(p, T == 0 || H == 0 ? 0u : static_cast<unsigned>(static_cast<long long>(T) * p.n_hblk),
                          stream);
}

// Row packing (H <= 32; packing.py): the same kernel over groups of rows and the union of their
// keys. uid [G, ucap] int32 with count [G], uslot [G, rows, ucap] int16; hshift = log2 of the
// heads per row in the tile (4: 16 heads, rows = 4; 5: 32, rows = 2). One CTA per group; the
// arguments the packed forward of the design before took (in git history).
int dsa_sparse_mla_fwd_pp_packed_sm90(const void* q, const void* kv, const void* uid, const void* count,
                                      const void* uslot, const void* sink, void* out, void* lse, long long q_st,
                                      long long q_sh, long long kv_s, long long ucap, long long out_st,
                                      long long out_sh, int T, int H, int Tk, int G, int hshift, float scale_log2,
                                      void* stream) {
  if (H < 1 || (hshift != 4 && hshift != 5) || H > (1 << hshift) || ucap % 2 != 0 || ucap >= (1LL << 31))
    return static_cast<int>(cudaErrorInvalidValue);
  if (!out_aligned(out, out_st, out_sh) && T > 0) return static_cast<int>(cudaErrorInvalidValue);
  PpParams p;
  static_cast<FwdParams&>(p) = fwd_params(q, kv, uid, count, sink, out, lse, q_st, q_sh, kv_s, ucap, out_st, out_sh,
                                          T, H, Tk, static_cast<int>(ucap), scale_log2);
  p.n_hblk = 1;
  p.uslot = static_cast<const int16_t*>(uslot);
  p.hshift = hshift;
  p.rows = BM >> hshift;
  return launch_pp<true>(p, T == 0 ? 0u : static_cast<unsigned>(G), stream);
}

int dsa_sparse_mla_fwd_pp_smem_bytes() { return SMEM_BYTES; }

}  // extern "C"
