// WIP (branch only, never run): a ping-pong sparse MLA forward for Hopper, 64 heads per CTA.
//
// The shipped 64-head forward (sparse_mla_fwd_sm90.cu) has one warpgroup issue every S = Q K^T
// and run every softmax while two P V warpgroups wait on it. FlashMLA's sparse forward (read,
// docs/kernels_sparse_mla.md section 5) runs 1.4x faster with the same CTA mapping by splitting
// that chain between two symmetric math warpgroups. This kernel follows that schedule:
//
//   WG0        producer: gathers each 64-key block (all 576 channels) into one of two stages
//              with cp.async (zero-filled invalid rows), the block's ids next to it; full /
//              empty mbarriers per stage.
//   WG1, WG2   math, x = 0 / 1: own output channels [256 x, 256 x + 256) for all 64 heads and
//              the blocks j with j % 2 == x. For an own block: S = Q K^T (m64n64k16, Q and K
//              from shared memory), the online softmax (the running row max comes from the
//              other warpgroup's previous block), P to shared memory for the other warpgroup,
//              O = alpha O + P V from registers. For the other's block: O = alpha O + P V with
//              P from shared memory. While one warpgroup runs its softmax the other issues its
//              next S and the previous block's P V.
//   Each warpgroup keeps the row sums of its own blocks (rescaled by every block's alpha); the
//   two are added at the end. Registers 72 + 2 x 216 = 3 x 168.
// Shared memory: Q [64, 576] (72 KB, also the output staging), two kv stages [64, 576] (72 KB
// each), one P buffer [64, 64] bf16 (each writer is the previous buffer's reader, so no free
// barrier), the row max / rescale hand-off, ids, barriers.
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
constexpr int CH = BN * 128;                    // one chunk of a stage (and of Q): 64 rows x 128 B
constexpr int STAGE = NCH * CH;                 // 72 KB
constexpr int NST = 2;
constexpr int THREADS = 384;

constexpr int OFF_Q = 0;
constexpr int OFF_KV = OFF_Q + STAGE;
constexpr int OFF_P = OFF_KV + NST * STAGE;      // [64 heads, 64 keys] bf16, 128-byte rows
constexpr int OFF_M = OFF_P + CH;               // [2][64] fp32: row max after block j (by j % 2)
constexpr int OFF_A = OFF_M + 2 * 64 * 4;        // [2][64] fp32: rescale of block j (by j % 2)
constexpr int OFF_IDS = OFF_A + 2 * 64 * 4;      // [NST][BN] int32
// [2][64] fp32: each warpgroup's row sums, after the loop (over the ids: their last reader, a
// softmax, is done before the other warpgroup leaves the loop, and the producer is done)
constexpr int OFF_L = OFF_IDS;
constexpr int OFF_BAR = OFF_IDS + NST * BN * 4;  // full[NST], empty[NST]
constexpr int SMEM_USED = OFF_BAR + 2 * NST * 8;
constexpr int SMEM_BYTES = SMEM_USED + 1024;
static_assert(SMEM_BYTES <= 232448, "shared memory");
// named barriers: 1 + x = warpgroup x handed off an own block; 3 = both math warpgroups
constexpr int BAR_FULL_P = 1, BAR_MATH = 3;

template <int TA, int TB>
__device__ __forceinline__ void wgmma_m64n64k16_ss(float (&d)[32], uint64_t da, uint64_t db, int accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, "
      "%22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, %32, %33, p, 1, 1, %35, %36;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
      : "l"(da), "l"(db), "r"(accumulate), "n"(TA), "n"(TB));
}

// A math warpgroup (X = 0: WG1, the even blocks and channels 0-255; X = 1: WG2). A template, so
// that which blocks are its own is known at compile time: a branch on the warpgroup index around
// the wgmma makes ptxas serialize them.
template <int X>
__device__ __forceinline__ void math_wg(const FwdParams& p, uint8_t* smem, uint32_t sbase, int t, int h0, int kv_len,
                                        int nblk) {
  constexpr int x = X;
  float* m_s = reinterpret_cast<float*>(smem + OFF_M);
  float* a_s = reinterpret_cast<float*>(smem + OFF_A);
  float* l_s = reinterpret_cast<float*>(smem + OFF_L);
  const int* ids_s = reinterpret_cast<const int*>(smem + OFF_IDS);
  const uint32_t full0 = sbase + OFF_BAR, empty0 = full0 + 8 * NST;
  const int wt = threadIdx.x & 127, warp = wt >> 5, lane = threadIdx.x & 31;
  const int row0 = warp * 16 + (lane >> 2);
  const int colq = 2 * (lane & 3);
  float o[128];
#pragma unroll
  for (int i = 0; i < 128; ++i) o[i] = 0.f;
  float s[32];
  float m_run[2] = {-INFINITY, -INFINITY};
  float l_run[2] = {0.f, 0.f};
  const uint64_t qdesc0 = desc(sbase + OFF_Q, 16, 1024);
  const uint64_t kdesc0 = desc(sbase + OFF_KV, 16, 1024);
  const uint64_t vdesc0 = desc(sbase + OFF_KV + x * 4 * CH, CH, 1024);
  const uint64_t pdesc0 = desc(sbase + OFF_P, 16, 1024);

  auto issue_s = [&](int j) {  // S of block j (waits for its stage)
    const int st = j % NST;
    mbar_wait(full0 + 8 * st, (j / NST) & 1);
    fence_async_smem();
    wgmma_fence();
#pragma unroll
    for (int c = 0; c < NCH; ++c)
#pragma unroll
      for (int k = 0; k < 4; ++k)
        wgmma_m64n64k16_ss<0, 0>(s, qdesc0 + ((c * CH + k * 32) >> 4),
                                 kdesc0 + ((st * STAGE + c * CH + k * 32) >> 4), (c | k) != 0);
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

  if (x == 0 && nblk > 0) issue_s(0);
  for (int j = 0; j < nblk; ++j) {
    const int st = j % NST;
    if ((j & 1) == x) {
      // ---- own block: softmax, hand-off, P V from registers ----
      wgmma_wait0();  // S_j (and every earlier P V)
      bool valid[16];
#pragma unroll
      for (int jj = 0; jj < 8; ++jj) {
        const int col = 8 * jj + colq;
        const int2 id2 = *reinterpret_cast<const int2*>(ids_s + st * BN + col);
        valid[2 * jj] = j * BN + col < kv_len && id2.x >= 0 && id2.x < p.Tk;
        valid[2 * jj + 1] = j * BN + col + 1 < kv_len && id2.y >= 0 && id2.y < p.Tk;
      }
      float alpha[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        float mx = -INFINITY;
#pragma unroll
        for (int jj = 0; jj < 8; ++jj)
#pragma unroll
          for (int b = 0; b < 2; ++b) {
            const float v = valid[2 * jj + b] ? s[4 * jj + 2 * i + b] * p.scale_log2 : -INFINITY;
            s[4 * jj + 2 * i + b] = v;
            mx = fmaxf(mx, v);
          }
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float m_new = fmaxf(m_run[i], mx);
        const float m_use = m_new == -INFINITY ? 0.f : m_new;
        alpha[i] = m_new > m_run[i] ? exp2f(m_run[i] - m_use) : 1.f;
        m_run[i] = m_new;
        float sum = 0.f;
#pragma unroll
        for (int jj = 0; jj < 8; ++jj)
#pragma unroll
          for (int b = 0; b < 2; ++b) {
            const float e = exp2f(s[4 * jj + 2 * i + b] - m_use);
            s[4 * jj + 2 * i + b] = e;
            sum += e;
          }
        l_run[i] = l_run[i] * alpha[i] + sum;
      }
      // P as bf16 pairs: pf[kk] is the A fragment of keys [16 kk, 16 kk + 16)
      uint32_t pf[4][4];
#pragma unroll
      for (int kk = 0; kk < 4; ++kk)
#pragma unroll
        for (int h = 0; h < 2; ++h)
#pragma unroll
          for (int i = 0; i < 2; ++i) {
            const int jj = 2 * kk + h;
            __nv_bfloat162 v = __floats2bfloat162_rn(s[4 * jj + 2 * i], s[4 * jj + 2 * i + 1]);
            pf[kk][2 * h + i] = *reinterpret_cast<uint32_t*>(&v);
          }
      // hand P, the row max and alpha to the other warpgroup (its P V of block j - 1, which read
      // this buffer, finished before it handed off that block... the buffer's previous reader
      // was this warpgroup's own P V of block j - 1, done at the wait above)
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const int r = row0 + 8 * i;
#pragma unroll
        for (int kk = 0; kk < 4; ++kk)
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const int jj = 2 * kk + h;  // granule jj of row r: keys [8 jj, 8 jj + 8)
            *reinterpret_cast<uint32_t*>(smem + OFF_P + r * 128 + ((jj ^ (r & 7)) << 4) + colq * 2) = pf[kk][2 * h + i];
          }
        if ((lane & 3) == 0) {
          m_s[(j & 1) * 64 + r] = m_run[i];
          a_s[(j & 1) * 64 + r] = alpha[i];
        }
      }
      fence_async_smem();
      bar_arrive(BAR_FULL_P + x, 256);
      rescale(alpha[0], alpha[1]);
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < 4; ++kk)
        wgmma_m64n256k16_rs<1>(o, pf[kk], vdesc0 + ((st * STAGE + kk * 16 * 128) >> 4), 1);
      wgmma_commit();
      wgmma_wait0();
      mbar_arrive(empty0 + 8 * st);
    } else {
      // ---- the other's block: issue my next S, take its P, P V from shared memory ----
      if (j + 1 < nblk) issue_s(j + 1);
      bar_sync(BAR_FULL_P + (1 - x), 256);
      // this warpgroup did not wait on the stage's full barrier itself (the owner did, before its
      // S): order the gathered rows before its own async-proxy (wgmma) reads
      fence_async_smem();
      const float a0 = a_s[(j & 1) * 64 + row0], a1 = a_s[(j & 1) * 64 + row0 + 8];
      m_run[0] = m_s[(j & 1) * 64 + row0];
      m_run[1] = m_s[(j & 1) * 64 + row0 + 8];
      l_run[0] *= a0;
      l_run[1] *= a1;
      rescale(a0, a1);
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < 4; ++kk)
        wgmma_m64n256k16_ss<0, 1>(o, pdesc0 + ((kk * 32) >> 4), vdesc0 + ((st * STAGE + kk * 16 * 128) >> 4), 1);
      wgmma_commit();
      wgmma_wait0();  // this P V (the buffer is free for my next hand-off) and my next S
      mbar_arrive(empty0 + 8 * st);
    }
  }

  // ---- epilogue: total row sums, O / l, staged in Q's space, 16-byte stores ----
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    float l = l_run[i];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    if ((lane & 3) == 0) l_s[x * 64 + row0 + 8 * i] = l;
  }
  bar_sync(BAR_MATH, 256);  // both warpgroups are done with Q, the stages and P; l is written
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int r = row0 + 8 * i, h = h0 + r;
    const float m = m_run[i];
    const float m_use = m == -INFINITY ? 0.f : m;
    float denom = l_s[r] + l_s[64 + r];
    if (x == 0 && (lane & 3) == 0 && h < p.H)  // (the lse of the selected keys: the sink is not in it)
      p.lse[static_cast<long long>(t) * p.H + h] = denom > 0.f ? (m_use + log2f(denom)) * 0.6931471805599453f : -INFINITY;
    if (p.sink != nullptr && h < p.H) denom += exp2f(__ldg(p.sink + h) * 1.4426950408889634f - m_use);
    const float inv = denom > 0.f ? 1.f / denom : 0.f;
    // row r of this warpgroup's [64, 256] tile: 512 B at Q + x * 32 KB + r * 512, granule k at k ^ (r % 8)
    uint8_t* srow = smem + OFF_Q + x * 32768 + r * 512;
#pragma unroll
    for (int jj = 0; jj < 32; ++jj)
      *reinterpret_cast<__nv_bfloat162*>(srow + ((jj ^ (r & 7)) << 4) + colq * 2) =
          __floats2bfloat162_rn(o[4 * jj + 2 * i] * inv, o[4 * jj + 2 * i + 1] * inv);
  }
  bar_sync(BAR_MATH + 1 + x, 128);  // this warpgroup's tile is staged
  const int k = wt & 31;
#pragma unroll 4
  for (int r = wt >> 5; r < BM; r += 4) {
    if (h0 + r >= p.H) continue;
    const uint4 v = *reinterpret_cast<const uint4*>(smem + OFF_Q + x * 32768 + r * 512 + ((k ^ (r & 7)) << 4));
    *reinterpret_cast<uint4*>(p.out + static_cast<long long>(t) * p.out_st + static_cast<long long>(h0 + r) * p.out_sh +
                              x * 256 + 8 * k) = v;
  }
}

__global__ void __launch_bounds__(THREADS, 1) sparse_mla_fwd_pp_sm90_kernel(const FwdParams p) {
  extern __shared__ uint8_t smem_raw[];
  uint8_t* smem = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  const uint32_t sbase = smem_u32(smem);
  const uint32_t full0 = sbase + OFF_BAR, empty0 = full0 + 8 * NST;

  const int tid = threadIdx.x, wg = tid >> 7, wt = tid & 127;
  const int t = static_cast<int>(blockIdx.x / p.n_hblk);
  const int h0 = static_cast<int>(blockIdx.x % p.n_hblk) * BM;
  int kv_len = p.K;
  if (p.topk_len != nullptr) kv_len = min(kv_len, max(0, __ldg(p.topk_len + t)));
  const int nblk = (kv_len + BN - 1) / BN;
  const int32_t* idx_row = p.idx + static_cast<long long>(t) * p.idx_s;

  if (tid == 0) {
    for (int s = 0; s < NST; ++s) {
      mbar_init(full0 + 8 * s, 128);   // the producer's 128 threads (cp.async, noinc)
      mbar_init(empty0 + 8 * s, 256);  // both math warpgroups are done with the stage
    }
  }
  // Q -> shared memory, 128-byte swizzle, rows >= H zero (every thread; 64 x 72 granules)
  {
    const __nv_bfloat16* qrow = p.q + static_cast<long long>(t) * p.q_st;
    for (int f = tid; f < BM * NCH * 8; f += THREADS) {
      const int r = f / (NCH * 8), rem = f % (NCH * 8), c = rem >> 3, g = rem & 7;
      const bool ok = h0 + r < p.H;
      cp_async16(sbase + OFF_Q + c * CH + r * 128 + ((g ^ (r & 7)) << 4),
                 qrow + static_cast<long long>(ok ? h0 + r : 0) * p.q_sh + c * 64 + g * 8, ok);
    }
    cp_async_wait_all();
    fence_async_smem();
  }
  __syncthreads();

  if (wg == 0) {
    // ---------------- producer ----------------
    asm volatile("setmaxnreg.dec.sync.aligned.u32 72;\n" ::: "memory");
    const int g_row = wt >> 1, g_sub = wt & 1;  // two threads per key row, 36 granules each
    for (int j = 0; j < nblk; ++j) {
      const int st = j % NST;
      if (j >= NST) mbar_wait(empty0 + 8 * st, ((j / NST) - 1) & 1);
      const int slot = j * BN + g_row;
      const int id = slot < kv_len ? __ldg(idx_row + slot) : -1;
      const bool ok = id >= 0 && id < p.Tk;
      const __nv_bfloat16* src = p.kv + static_cast<long long>(ok ? id : 0) * p.kv_s;
      const uint32_t dst = sbase + OFF_KV + st * STAGE + g_row * 128;
#pragma unroll
      for (int i = 0; i < NCH * 4; ++i) {
        const int c = i >> 2, g = 2 * (i & 3) + g_sub;
        cp_async16(dst + c * CH + ((g ^ (g_row & 7)) << 4), src + c * 64 + g * 8, ok);
      }
      if (g_sub == 0)  // the slot's id for the softmax's validity test
        asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(sbase + OFF_IDS + (st * BN + g_row) * 4),
                     "l"(idx_row + (slot < kv_len ? slot : 0)), "r"(slot < kv_len ? 4 : 0) : "memory");
      cp_async_arrive_noinc(full0 + 8 * st);
    }
    cp_async_wait_all();
    return;
  }

  // ---------------- math warpgroups ----------------
  asm volatile("setmaxnreg.inc.sync.aligned.u32 216;\n" ::: "memory");
  if (wg == 1)
    math_wg<0>(p, smem, sbase, t, h0, kv_len, nblk);
  else
    math_wg<1>(p, smem, sbase, t, h0, kv_len, nblk);
}

}  // namespace

extern "C" {

// The shipped forward's C interface (dsa_sparse_mla_fwd_sm90), this kernel. Returns a cudaError_t.
int dsa_sparse_mla_fwd_pp_sm90(const void* q, const void* kv, const void* idx, const void* topk_len,
                               const void* sink, void* out, void* lse, long long q_st, long long q_sh,
                               long long kv_s, long long idx_s, long long out_st, long long out_sh, int T, int H,
                               int Tk, int K, float scale_log2, void* stream) {
  if ((reinterpret_cast<uintptr_t>(out) & 15) != 0 || out_st % 8 != 0 || out_sh % 8 != 0)
    return static_cast<int>(cudaErrorInvalidValue);
  static bool attr_set[64] = {};
  const cudaError_t e = set_smem_once(attr_set, sparse_mla_fwd_pp_sm90_kernel, SMEM_BYTES);
  if (e != cudaSuccess) return static_cast<int>(e);
  FwdParams p = fwd_params(q, kv, idx, topk_len, sink, out, lse, q_st, q_sh, kv_s, idx_s, out_st, out_sh, T, H, Tk,
                           K, scale_log2);
  p.n_hblk = (H + BM - 1) / BM;
  if (T == 0 || H == 0) return 0;
  sparse_mla_fwd_pp_sm90_kernel<<<static_cast<unsigned>(static_cast<long long>(T) * p.n_hblk), THREADS, SMEM_BYTES,
                                  static_cast<cudaStream_t>(stream)>>>(p);
  return static_cast<int>(cudaGetLastError());
}

}  // extern "C"
