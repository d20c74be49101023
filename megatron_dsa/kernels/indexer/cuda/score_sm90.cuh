// Lightning-indexer scores for Hopper (sm_90a): wgmma with the ReLU / head-weight epilogue of
// one head overlapped with the next head's MMA.
//
// out[b, r, s] = ks[s] * sum_h w[t, h] * ReLU(q[t, h] . k[s])   (t = row0 + r; ks: the e4m3 keys'
// per-key scales, 1 for bf16), -inf outside the row's window [start, end); the same contract
// as the Triton score kernel (triton_impl._score_kernel), D = 128.
//
// One CTA of two warpgroups per (128 rows, 128 keys): the key tile is loaded once; each
// warpgroup owns 64 rows and walks the heads in pairs with its own cp.async ring of query
// tiles. Two accumulator sets per warpgroup: the pair's two wgmmas are issued together, so
// head h + 1's MMA runs during head h's epilogue (ReLU, times the head weight, added into the
// fp32 sum); the other warpgroup's MMAs fill the rest.
//
// Why: in the Triton kernel each head's epilogue (~204 instructions per thread for 64 scores:
// 64 FMNMX + 64 FFMA + addressing) runs after its wgmma has finished; with e4m3 operands that
// wgmma takes ~256 tensor clocks per CTA, so the two in sequence cap e4m3 at ~1.6x bf16.
//
// Shared-memory tiles are [rows, 128 B] column chunks in the 128-byte swizzled layout wgmma
// reads (16-byte granule g of row r at granule g ^ (r % 8)); rows past T / S are zero-filled.
//
// This header holds the kernel; the including file provides the PTX helpers it calls, in
// namespace dsa_sm90: sm90_common.cuh's and the ones score_sm90.cu defines (the two wgmma
// shapes, relu_nan, cp_async_wait / cp_async_commit). tests/cuda_emu provides CPU stand-ins.
#pragma once

#include <stdint.h>

namespace {

using namespace dsa_sm90;

constexpr int D = 128;
constexpr int BN = 128;       // keys per CTA (wgmma N)
constexpr int BMW = 64;       // rows per warpgroup (wgmma M)
constexpr int THREADS = 256;  // two warpgroups
constexpr int MAX_H = 128;

template <bool FP8>
struct Cfg {
  static constexpr int ELT = FP8 ? 1 : 2;              // bytes per element
  static constexpr int GPR = D * ELT / 16;             // 16-byte granules per row (8 / 16)
  static constexpr int KSTEPS = FP8 ? 4 : 8;           // wgmma k-steps of 32 bytes
  static constexpr int QCHUNK = BMW * 128;             // a [64 rows, 128 B] chunk
  static constexpr int KCHUNK = BN * 128;              // a [128 rows, 128 B] chunk
  static constexpr int QTILE = QCHUNK * ELT;           // one head's query tile
  static constexpr int KTILE = KCHUNK * ELT;
  static constexpr int NST = FP8 ? 4 : 3;              // query ring slots per warpgroup
  static constexpr int OFF_K = 0;
  static constexpr int OFF_Q = OFF_K + KTILE;          // [2 warpgroups][NST] query tiles
  static constexpr int OFF_KS = OFF_Q + 2 * NST * QTILE;  // [BN] fp32 key scales
  static constexpr int OFF_W = OFF_KS + BN * 4;        // [2][64 rows][H] fp32 head weights
  static constexpr int smem_bytes(int H) { return OFF_W + 2 * BMW * H * 4 + 1024; }  // + alignment slack
  static_assert(OFF_W + 2 * BMW * MAX_H * 4 + 1024 <= 232448, "shared memory");
};

struct ScoreParams {
  const uint8_t* q;  // [B, T, H, D], element strides sq_b, sq_t, sq_h, unit channel stride
  const uint8_t* k;  // [B, S, D], strides sk_b, sk_s
  const float* w;    // [B, T, H] fp32, strides sw_b, sw_t, sw_h
  const int32_t* st; // [B, T] int32 windows (strides sse_b, sse_t) unless causal
  const int32_t* en;
  const float* ks;   // [B, S] fp32 key scales (stride sks_b), or null
  float* out;        // rows [row0, row0 + n_rows): out + b so_b + (t - row0) so_r + s
  long long sq_b, sq_t, sq_h, sk_b, sk_s, sw_b, sw_t, sw_h, sse_b, sse_t, so_b, so_r, sks_b;
  int row0, n_rows, T, S, H, causal;
};

__device__ __forceinline__ void window(const ScoreParams& p, long long b, int t, int& st, int& en) {
  if (p.causal) {
    st = 0;
    en = min(t + 1, p.S);
  } else {
    st = max(p.st[b * p.sse_b + t * p.sse_t], 0);
    en = min(p.en[b * p.sse_b + t * p.sse_t], p.S);
  }
}

template <bool FP8, bool RELU>
__global__ void __launch_bounds__(THREADS, 1) score_kernel(const ScoreParams p) {
  using C = Cfg<FP8>;
  extern __shared__ uint8_t smem_raw[];
  uint8_t* smem = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  const uint32_t sbase = smem_u32(smem);
  const int tid = threadIdx.x, wg = tid >> 7, wtid = tid & 127, warp = wtid >> 5, lane = tid & 31;
  const int s_lo = blockIdx.x * BN;
  const int r_cta = blockIdx.y * 2 * BMW;  // chunk-relative row of the CTA's first row
  const long long b = blockIdx.z;
  const int H = p.H;

  // skip a tile no row of the CTA can see (every row's window misses its keys)
  bool hit = false;
  if (tid < 2 * BMW) {
    const int r = r_cta + tid, t = p.row0 + r;
    if (r < p.n_rows && t < p.T) {
      int st, en;
      window(p, b, t, st, en);
      hit = en > st && en > s_lo && st < s_lo + BN;
    }
  }
  if (!__syncthreads_or(hit)) return;

  // key tile (all threads), then each warpgroup's query ring
  for (int i = tid; i < BN * C::GPR; i += THREADS) {
    const int row = i / C::GPR, g = i % C::GPR, s = s_lo + row;
    const bool ok = s < p.S;
    const uint8_t* src = p.k + (b * p.sk_b + static_cast<long long>(ok ? s : 0) * p.sk_s) * C::ELT + g * 16;
    cp_async16(sbase + C::OFF_K + (g >> 3) * C::KCHUNK + row * 128 + (((g & 7) ^ (row & 7)) << 4), src, ok);
  }
  cp_async_commit();
  const int r_wg = r_cta + wg * BMW;  // chunk-relative row of this warpgroup's first row
  auto load_q = [&](int h) {
    if (h < H) {
      const uint32_t dst0 = sbase + C::OFF_Q + (wg * C::NST + h % C::NST) * C::QTILE;
      for (int i = wtid; i < BMW * C::GPR; i += 128) {
        const int row = i / C::GPR, g = i % C::GPR, r = r_wg + row, t = p.row0 + r;
        const bool ok = r < p.n_rows && t < p.T;
        const uint8_t* src =
            p.q + (b * p.sq_b + static_cast<long long>(ok ? t : 0) * p.sq_t + h * p.sq_h) * C::ELT + g * 16;
        cp_async16(dst0 + (g >> 3) * C::QCHUNK + row * 128 + (((g & 7) ^ (row & 7)) << 4), src, ok);
      }
    }
    cp_async_commit();  // (an empty group past the last head keeps the group count uniform)
  };
#pragma unroll 1
  for (int h = 0; h < C::NST; ++h) load_q(h);
  float* ws = reinterpret_cast<float*>(smem + C::OFF_W) + wg * BMW * H;
  for (int i = wtid; i < BMW * H; i += 128) {
    const int row = i / H, h = i % H, r = r_wg + row, t = p.row0 + r;
    ws[i] = (r < p.n_rows && t < p.T) ? p.w[b * p.sw_b + static_cast<long long>(t) * p.sw_t + h * p.sw_h] : 0.f;
  }
  float* kss = reinterpret_cast<float*>(smem + C::OFF_KS);
  if (tid < BN) kss[tid] = (p.ks != nullptr && s_lo + tid < p.S) ? p.ks[b * p.sks_b + s_lo + tid] : 1.f;

  // the key tile has landed, for both warpgroups (the queries: ready() below)
  cp_async_wait<C::NST>();
  fence_async_smem();
  __syncthreads();

  const int bar = 1 + wg;
  auto issue = [&](float(&x)[64], int h) {
    const uint32_t qa = sbase + C::OFF_Q + (wg * C::NST + h % C::NST) * C::QTILE;
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < C::KSTEPS; ++kk) {
      const int c = (kk * 32) / 128, off = (kk * 32) % 128;
      const uint64_t da = desc(qa + c * C::QCHUNK + off, 16, 1024);
      const uint64_t db = desc(sbase + C::OFF_K + c * C::KCHUNK + off, 16, 1024);
      if constexpr (FP8) wgmma_m64n128k32_e4m3(x, da, db, kk != 0);
      else wgmma_m64n128k16_bf16(x, da, db, kk != 0);
    }
    wgmma_commit();
  };
  // queries h and h + 1 have landed (every thread of the warpgroup): at the top of pair h,
  // queries up to h + NST - 1 were requested
  auto ready = [&]() {
    cp_async_wait<C::NST - 2>();
    fence_async_smem();
    bar_sync(bar, 128);
  };
  const int ra = 16 * warp + (lane >> 2), rb = ra + 8;  // this thread's two rows in the warpgroup
  float acc[64];
#pragma unroll
  for (int i = 0; i < 64; ++i) acc[i] = 0.f;
  auto epilogue = [&](const float(&x)[64], int h) {
    const float wa = ws[ra * H + h], wb = ws[rb * H + h];
#pragma unroll
    for (int j = 0; j < 16; ++j) {
      acc[4 * j] += wa * (RELU ? relu_nan(x[4 * j]) : x[4 * j]);
      acc[4 * j + 1] += wa * (RELU ? relu_nan(x[4 * j + 1]) : x[4 * j + 1]);
      acc[4 * j + 2] += wb * (RELU ? relu_nan(x[4 * j + 2]) : x[4 * j + 2]);
      acc[4 * j + 3] += wb * (RELU ? relu_nan(x[4 * j + 3]) : x[4 * j + 3]);
    }
  };

  // heads in pairs: both wgmmas issued back to back, head h's epilogue runs while head h + 1's
  // MMA does. (Keeping a wgmma in flight across the loop's back edge, for a deeper overlap,
  // makes ptxas serialize every wgmma, C7514; unrolling all heads instead spills.) An odd
  // last head pairs with a dummy wgmma on a stale slot, result unused.
  float xa[64], xb[64];
#pragma unroll 1
  for (int h = 0; h < H; h += 2) {
    ready();  // heads h and h + 1 have landed
    issue(xa, h);
    issue(xb, h + 1);
    // a slot is refilled once every thread of the warpgroup has retired the wgmma reading it
    // (the PTX ISA promises a wait only for the waiting thread's own groups), hence the barriers
    wgmma_wait1();
    bar_sync(bar, 128);
    load_q(h + C::NST);
    epilogue(xa, h);
    wgmma_wait0();
    bar_sync(bar, 128);
    load_q(h + 1 + C::NST);
    if (h + 1 < H) epilogue(xb, h + 1);
  }
  wgmma_wait0();
  cp_async_wait<0>();

  // scale, mask, store (a quad of lanes writes 8 consecutive scores of a row: 8-byte stores
  // where the buffer allows, so each row's 32 bytes fill a sector)
  const bool vec2 = ((p.so_b | p.so_r) & 1) == 0 && (reinterpret_cast<uintptr_t>(p.out) & 7) == 0;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int r = r_wg + (half ? rb : ra), t = p.row0 + r;
    if (r >= p.n_rows || t >= p.T) continue;
    int st, en;
    window(p, b, t, st, en);
    float* orow = p.out + b * p.so_b + static_cast<long long>(r) * p.so_r;
#pragma unroll
    for (int j = 0; j < 16; ++j) {
      const int col = 8 * j + 2 * (lane & 3), s = s_lo + col;
      float v[2];
#pragma unroll
      for (int e = 0; e < 2; ++e)
        v[e] = (s + e >= st && s + e < en) ? acc[4 * j + 2 * half + e] * kss[col + e] : -__int_as_float(0x7f800000);
      if (vec2 && s + 1 < p.S) {
        *reinterpret_cast<float2*>(orow + s) = make_float2(v[0], v[1]);
      } else {
        if (s < p.S) orow[s] = v[0];
        if (s + 1 < p.S) orow[s + 1] = v[1];
      }
    }
  }
}

}  // namespace
