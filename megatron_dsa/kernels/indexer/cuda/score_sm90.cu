// EXPERIMENT (not shipped; measured slower than the Triton score kernel, docs/kernels_indexer.md
// section 4): lightning indexer scores for Hopper (sm_90a): out[t, s] = sum_h w[t, h] * ReLU(q[t, h] . k[s]),
// bf16 or e4m3 operands, fp32 accumulation, D = 128, H even (docs/kernels_indexer.md, section 2.1b).
//
// A tile is 64 query rows x 256 keys. One persistent CTA of 384 threads per SM walks the tiles
// blockIdx.x, + gridDim.x, ... (batch, row tile, key tile; key tiles innermost), skipping those
// outside every row's window:
//
//   WG0   producer (24 registers): per tile the k tile [256 keys, 128] into one of two buffers
//         (after that buffer's empty barrier), then per head h the q tile [64 rows, 128] of
//         head h and the rows' weights w[:, h] into a ring of NST stages; cp.async, 8 threads per
//         128-byte line, rows past the sequence zero-filled.
//   WG1   keys 0-127 of the tile; WG2 keys 128-255. Both read the same q stage (one q load per
//   WG2   head feeds 64 x 256 scores: half the q bytes per score of a 64 x 128 tile). Per head:
//         X = q_h k^T as m64n128 wgmmas (k16 bf16 / k32 e4m3, both operands K-major), two
//         accumulators so that head h + 1's MMAs run while head h's epilogue
//         acc += w[t, h] * ReLU(X) (max.NaN + fma: NaN stays NaN, as torch.relu) issues; a stage
//         is freed once both warpgroups' MMAs of it retired and they read its weights.
//   After the last head: the per-key scale (e4m3 keys), the window mask (-inf outside
//   [start, end), causal: s <= t), float2 stores of the rows of the launch.
// Registers: setmaxnreg 24 + 2 x 240 = 504 = the CTA's 3 x 168 (232 for the math spilled 32 bytes).
// Shared memory: two k buffers + NST q stages + the stages' weights + barriers
// (bf16: 128 + 80 + 1.25 KB; e4m3: 64 + 64 + 2 KB).
#include <cuda_runtime.h>
#include <stdint.h>

#include "../../sparse_mla/cuda/sm90_common.cuh"

using namespace dsa_sm90;

namespace score {

constexpr int D = 128;
constexpr int BT = 64;   // query rows per tile (wgmma M)
constexpr int BS = 256;  // keys per tile (128 per math warpgroup: wgmma N)
constexpr int THREADS = 384;

template <bool FP8>
struct Cfg {
  static constexpr int NST = FP8 ? 8 : 5;           // q stages
  static constexpr int ROWB = FP8 ? D : 2 * D;      // bytes per q / k row
  static constexpr int NCHK = ROWB / 128;           // 128-byte column chunks of a row
  static constexpr int KSTEP = 4 * NCHK;            // wgmmas per head (32 bytes of K each)
  static constexpr int KCH = BS * 128;              // one chunk of a k tile
  static constexpr int KTILE = NCHK * KCH;
  static constexpr int QCH = BT * 128;              // one chunk of a q tile
  static constexpr int QTILE = NCHK * QCH;
  static constexpr int OFF_K = 0;                   // two k buffers
  static constexpr int OFF_Q = 2 * KTILE;           // NST q stages (1024-byte aligned: the swizzle)
  static constexpr int OFF_W = OFF_Q + NST * QTILE; // NST x [64] fp32 weights
  static constexpr int OFF_BAR = OFF_W + NST * BT * 4;
  // k_full[2], k_empty[2], q_full[NST], q_empty[NST]
  static constexpr int SMEM_USED = OFF_BAR + (4 + 2 * NST) * 8;
  static constexpr int SMEM_BYTES = SMEM_USED + 1024;
  static_assert(SMEM_BYTES <= 232448, "shared memory");
  static_assert(QTILE % 1024 == 0 && KTILE % 1024 == 0, "swizzle atoms");
};

struct Params {
  const uint8_t* q;        // [B, T, H, 128] bf16 / e4m3
  const uint8_t* k;        // [B, S, 128]
  const float* w;          // [B, T, H] fp32
  const int32_t* starts;   // [B, T] windows (null: causal)
  const int32_t* ends;
  const int32_t* tile_lo;  // [B, n_rt]: the key range any row of a row tile may need (windows only)
  const int32_t* tile_hi;
  const float* k_scale;    // [B, S] or null
  float* out;              // [B, >= n_rows, >= S]: row r of the launch is query row0 + r
  long long sq_b, sq_t, sq_h, sk_b, sk_s;  // bytes
  long long sw_b, sw_t, sw_h;              // elements
  long long sse_b, sse_t, sks_b, so_b, so_r;
  int row0, n_rows, T, S, H, n_rt, n_kt, n_tiles;
  int causal;
  float relu_floor;        // 0 (ReLU) or -inf (none)
};

// Tile g's batch, row tile, key tile; false when no row of it has a key in it.
__device__ __forceinline__ bool tile_of(const Params& p, int g, int& b, int& i, int& jk) {
  const int per_b = p.n_rt * p.n_kt;
  b = g / per_b;
  const int rem = g - b * per_b;
  i = rem / p.n_kt;
  jk = rem - i * p.n_kt;
  int lo = 0, hi;
  if (p.causal) {
    hi = min(p.S, p.row0 + min(i * BT + BT, p.n_rows));  // the tile's last row + 1
  } else {
    lo = __ldg(p.tile_lo + b * p.n_rt + i);
    hi = __ldg(p.tile_hi + b * p.n_rt + i);
  }
  return jk * BS < hi && jk * BS + BS > lo;
}

template <bool FP8>
__device__ __forceinline__ uint32_t bar_k_full(uint32_t sb, int kb) { return sb + Cfg<FP8>::OFF_BAR + 8 * kb; }
template <bool FP8>
__device__ __forceinline__ uint32_t bar_k_empty(uint32_t sb, int kb) { return sb + Cfg<FP8>::OFF_BAR + 16 + 8 * kb; }
template <bool FP8>
__device__ __forceinline__ uint32_t bar_q_full(uint32_t sb, int st) { return sb + Cfg<FP8>::OFF_BAR + 32 + 8 * st; }
template <bool FP8>
__device__ __forceinline__ uint32_t bar_q_empty(uint32_t sb, int st) {
  return sb + Cfg<FP8>::OFF_BAR + 32 + 8 * Cfg<FP8>::NST + 8 * st;
}

template <bool FP8>
__device__ __forceinline__ void producer(const Params& p, uint32_t sb) {
  using C = Cfg<FP8>;
  const int wt = threadIdx.x & 127, gq = wt & 7, r0 = wt >> 3;
  int n = 0, qc = 0;
  for (int g = blockIdx.x; g < p.n_tiles; g += gridDim.x) {
    int b, i, jk;
    if (!tile_of(p, g, b, i, jk)) continue;
    const int kb = n & 1;
    mbar_wait(bar_k_empty<FP8>(sb, kb), ((n >> 1) & 1) ^ 1);
    const uint8_t* kbase = p.k + b * p.sk_b + gq * 16;
#pragma unroll 4
    for (int m = 0; m < BS / 16; ++m) {
      const int r = r0 + 16 * m, s = jk * BS + r;
      const bool ok = s < p.S;
      const uint8_t* src = kbase + static_cast<long long>(ok ? s : 0) * p.sk_s;
      const uint32_t dst = sb + C::OFF_K + kb * C::KTILE + r * 128 + ((gq ^ (r & 7)) << 4);
#pragma unroll
      for (int c = 0; c < C::NCHK; ++c) cp_async16(dst + c * C::KCH, src + c * 128, ok);
    }
    cp_async_arrive_noinc(bar_k_full<FP8>(sb, kb));
    const int rl0 = i * BT;  // the tile's first row in the launch
    for (int h = 0; h < p.H; ++h, ++qc) {
      const int st = qc % C::NST;
      mbar_wait(bar_q_empty<FP8>(sb, st), ((qc / C::NST) & 1) ^ 1);
#pragma unroll
      for (int m = 0; m < BT / 16; ++m) {
        const int r = r0 + 16 * m;
        const bool ok = rl0 + r < p.n_rows;
        const uint8_t* src = p.q + b * p.sq_b + static_cast<long long>(ok ? p.row0 + rl0 + r : 0) * p.sq_t +
                             h * p.sq_h + gq * 16;
        const uint32_t dst = sb + C::OFF_Q + st * C::QTILE + r * 128 + ((gq ^ (r & 7)) << 4);
#pragma unroll
        for (int c = 0; c < C::NCHK; ++c) cp_async16(dst + c * C::QCH, src + c * 128, ok);
      }
      if (wt < BT) {
        const bool ok = rl0 + wt < p.n_rows;
        const float* src = p.w + b * p.sw_b + static_cast<long long>(ok ? p.row0 + rl0 + wt : 0) * p.sw_t + h * p.sw_h;
        asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(sb + C::OFF_W + (st * BT + wt) * 4),
                     "l"(src), "r"(ok ? 4 : 0) : "memory");
      }
      cp_async_arrive_noinc(bar_q_full<FP8>(sb, st));
    }
    ++n;
  }
  cp_async_wait_all();
}

__device__ __forceinline__ float relu_nan(float x, float floor) {  // max with NaN propagation
  float y;
  asm("max.NaN.f32 %0, %1, %2;" : "=f"(y) : "f"(x), "f"(floor));
  return y;
}

// A math warpgroup: X = 0 (keys 0-127 of the tile) or 1 (128-255); a template, so that the
// wgmmas are not under a branch on the warpgroup index.
template <bool FP8, int X>
__device__ __forceinline__ void math_wg(const Params& p, uint8_t* smem, uint32_t sb) {
  using C = Cfg<FP8>;
  const float* w_s = reinterpret_cast<const float*>(smem + C::OFF_W);
  const int wt = threadIdx.x & 127, warp = wt >> 5, lane = threadIdx.x & 31;
  const int rw = warp * 16 + (lane >> 2);  // this thread's rows rw, rw + 8 of the tile
  float res[64], acc_a[64], acc_b[64];
  int n = 0, qc = 0;
  for (int g = blockIdx.x; g < p.n_tiles; g += gridDim.x) {
    int b, i, jk;
    if (!tile_of(p, g, b, i, jk)) continue;
    const int kb = n & 1;
    mbar_wait(bar_k_full<FP8>(sb, kb), (n >> 1) & 1);
    const uint32_t kdesc_base = sb + C::OFF_K + kb * C::KTILE + X * 128 * 128;
    auto issue = [&](float (&acc)[64], int qci) {
      const int st = qci % C::NST;
      mbar_wait(bar_q_full<FP8>(sb, st), (qci / C::NST) & 1);
      fence_async_smem();
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < C::KSTEP; ++kk) {
        const int c = kk >> 2, off = (kk & 3) * 32;
        const uint64_t da = desc(sb + C::OFF_Q + st * C::QTILE + c * C::QCH + off, 16, 1024);
        const uint64_t db = desc(kdesc_base + c * C::KCH + off, 16, 1024);
        if constexpr (FP8)
          wgmma_m64n128k32_e4m3_ss(acc, da, db, kk > 0);
        else
          wgmma_m64n128k16_ss<0, 0>(acc, da, db, kk > 0);
      }
      wgmma_commit();
    };
    // head qci's epilogue (its MMAs retired): the weights, the stage freed, res += w ReLU(acc)
    auto epilogue = [&](const float (&acc)[64], int qci) {
      const int st = qci % C::NST;
      const float w0 = w_s[st * BT + rw], w1 = w_s[st * BT + rw + 8];
      mbar_arrive(bar_q_empty<FP8>(sb, st));
#pragma unroll
      for (int j = 0; j < 16; ++j)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          res[4 * j + e] = fmaf(relu_nan(acc[4 * j + e], p.relu_floor), w0, res[4 * j + e]);
          res[4 * j + 2 + e] = fmaf(relu_nan(acc[4 * j + 2 + e], p.relu_floor), w1, res[4 * j + 2 + e]);
        }
    };
#pragma unroll
    for (int x = 0; x < 64; ++x) res[x] = 0.f;
    int h = 0;
    for (; h + 4 <= p.H; h += 4) {
      issue(acc_a, qc);
      issue(acc_b, qc + 1);
      wgmma_wait1();
      epilogue(acc_a, qc);
      issue(acc_a, qc + 2);
      wgmma_wait1();
      epilogue(acc_b, qc + 1);
      issue(acc_b, qc + 3);
      wgmma_wait1();
      epilogue(acc_a, qc + 2);
      wgmma_wait0();
      epilogue(acc_b, qc + 3);
      qc += 4;
    }
    if (h < p.H) {
      issue(acc_a, qc);
      issue(acc_b, qc + 1);
      wgmma_wait1();
      epilogue(acc_a, qc);
      wgmma_wait0();
      epilogue(acc_b, qc + 1);
      qc += 2;
    }
    mbar_arrive(bar_k_empty<FP8>(sb, kb));  // every MMA of the tile retired
    ++n;

    // the key scale, the window mask, the stores
    int lo[2], hi[2];
    bool row_ok[2];
#pragma unroll
    for (int ii = 0; ii < 2; ++ii) {
      const int rl = i * BT + rw + 8 * ii, t = p.row0 + rl;
      row_ok[ii] = rl < p.n_rows;
      if (p.causal) {
        lo[ii] = 0;
        hi[ii] = min(t + 1, p.S);
      } else if (row_ok[ii]) {
        lo[ii] = max(__ldg(p.starts + b * p.sse_b + static_cast<long long>(t) * p.sse_t), 0);
        hi[ii] = min(__ldg(p.ends + b * p.sse_b + static_cast<long long>(t) * p.sse_t), p.S);
      } else {
        lo[ii] = p.S;
        hi[ii] = 0;
      }
    }
    float* obase = p.out + b * p.so_b;
#pragma unroll
    for (int j = 0; j < 16; ++j) {
      const int s0 = jk * BS + X * 128 + 8 * j + 2 * (lane & 3);
      if (s0 >= p.S) continue;
      const bool pair = s0 + 1 < p.S;
      float ks0 = 1.f, ks1 = 1.f;
      if (p.k_scale != nullptr) {
        ks0 = __ldg(p.k_scale + b * p.sks_b + s0);
        if (pair) ks1 = __ldg(p.k_scale + b * p.sks_b + s0 + 1);
      }
#pragma unroll
      for (int ii = 0; ii < 2; ++ii) {
        if (!row_ok[ii]) continue;
        const float v0 = s0 >= lo[ii] && s0 < hi[ii] ? res[4 * j + 2 * ii] * ks0 : -INFINITY;
        const float v1 = s0 + 1 >= lo[ii] && s0 + 1 < hi[ii] ? res[4 * j + 2 * ii + 1] * ks1 : -INFINITY;
        float* o = obase + static_cast<long long>(i * BT + rw + 8 * ii) * p.so_r + s0;
        if (pair)
          *reinterpret_cast<float2*>(o) = make_float2(v0, v1);
        else
          *o = v0;
      }
    }
  }
}

template <bool FP8>
__global__ void __launch_bounds__(THREADS, 1) indexer_score_sm90_kernel(const Params p) {
  extern __shared__ uint8_t smem_raw[];
  uint8_t* smem = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  const uint32_t sb = smem_u32(smem);
  const int wg = threadIdx.x >> 7;
  if (threadIdx.x == 0) {
    for (int kb = 0; kb < 2; ++kb) {
      mbar_init(bar_k_full<FP8>(sb, kb), 128);   // the producer's threads (cp.async, noinc)
      mbar_init(bar_k_empty<FP8>(sb, kb), 256);  // both math warpgroups
    }
    for (int st = 0; st < Cfg<FP8>::NST; ++st) {
      mbar_init(bar_q_full<FP8>(sb, st), 128);
      mbar_init(bar_q_empty<FP8>(sb, st), 256);
    }
  }
  __syncthreads();  // the barriers are initialized
  if (wg == 0) {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 24;\n" ::: "memory");
    producer<FP8>(p, sb);
    return;
  }
  asm volatile("setmaxnreg.inc.sync.aligned.u32 240;\n" ::: "memory");
  if (wg == 1)
    math_wg<FP8, 0>(p, smem, sb);
  else
    math_wg<FP8, 1>(p, smem, sb);
}

template <bool FP8>
int launch(const Params& p, int grid, cudaStream_t stream) {
  static bool attr_set[64] = {};  // per device: raise the dynamic shared-memory limit once
  const cudaError_t e = set_smem_once(attr_set, indexer_score_sm90_kernel<FP8>, Cfg<FP8>::SMEM_BYTES);
  if (e != cudaSuccess) return static_cast<int>(e);
  indexer_score_sm90_kernel<FP8><<<static_cast<unsigned>(grid), THREADS, Cfg<FP8>::SMEM_BYTES, stream>>>(p);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace score

extern "C" {

// Scores of rows [row0, row0 + n_rows) of B batches (H even) into out (fp32; row r of the launch at
// out + b * so_b + r * so_r, keys unit stride; tiles that no row's window reaches are not
// written). q / k: bf16 (fp8 = 0) or e4m3 (fp8 = 1), head dim 128 with unit stride, byte strides
// multiples of 16 and 16-byte aligned bases; w: fp32 (element strides); starts / ends: int32
// windows [start, end) (element strides), null when causal (row t: keys [0, t + 1)); tile_lo /
// tile_hi: int32 [B, n_rt = ceil(n_rows / 64)], the union of a row tile's windows (windows
// only); k_scale: fp32 [B, S] per-key scales or null; use_relu: 0 sums the raw dot products.
// grid: the persistent CTAs (at most one per SM). out must be 8-byte aligned with even strides.
// Returns a cudaError_t (0 = launched).
int dsa_indexer_score_sm90(const void* q, const void* k, const void* w, const void* starts, const void* ends,
                           const void* tile_lo, const void* tile_hi, const void* k_scale, void* out, long long sq_b,
                           long long sq_t, long long sq_h, long long sk_b, long long sk_s, long long sw_b,
                           long long sw_t, long long sw_h, long long sse_b, long long sse_t, long long sks_b,
                           long long so_b, long long so_r, int row0, int n_rows, int B, int T, int S, int H, int fp8,
                           int causal, int use_relu, int grid, void* stream) {
  if (n_rows <= 0 || B <= 0 || S <= 0) return 0;
  const auto a16 = [](const void* ptr, long long s) { return (reinterpret_cast<uintptr_t>(ptr) & 15) == 0 && s % 16 == 0; };
  if (H <= 0 || H % 2 != 0 || grid <= 0 || row0 < 0 || row0 + n_rows > T || !a16(q, sq_b) || !a16(q, sq_t) || !a16(q, sq_h) ||
      !a16(k, sk_b) || !a16(k, sk_s) || (reinterpret_cast<uintptr_t>(out) & 7) != 0 || so_b % 2 != 0 ||
      so_r % 2 != 0 || (!causal && (starts == nullptr || ends == nullptr || tile_lo == nullptr || tile_hi == nullptr)))
    return static_cast<int>(cudaErrorInvalidValue);
  score::Params p;
  p.q = static_cast<const uint8_t*>(q);
  p.k = static_cast<const uint8_t*>(k);
  p.w = static_cast<const float*>(w);
  p.starts = static_cast<const int32_t*>(starts);
  p.ends = static_cast<const int32_t*>(ends);
  p.tile_lo = static_cast<const int32_t*>(tile_lo);
  p.tile_hi = static_cast<const int32_t*>(tile_hi);
  p.k_scale = static_cast<const float*>(k_scale);
  p.out = static_cast<float*>(out);
  p.sq_b = sq_b; p.sq_t = sq_t; p.sq_h = sq_h; p.sk_b = sk_b; p.sk_s = sk_s;
  p.sw_b = sw_b; p.sw_t = sw_t; p.sw_h = sw_h;
  p.sse_b = sse_b; p.sse_t = sse_t; p.sks_b = sks_b; p.so_b = so_b; p.so_r = so_r;
  p.row0 = row0; p.n_rows = n_rows; p.T = T; p.S = S; p.H = H;
  p.n_rt = (n_rows + score::BT - 1) / score::BT;
  // causal: no key past the launch's last row
  p.n_kt = ((causal ? (row0 + n_rows < S ? row0 + n_rows : S) : S) + score::BS - 1) / score::BS;
  p.n_tiles = B * p.n_rt * p.n_kt;
  p.causal = causal;
  p.relu_floor = use_relu ? 0.f : -INFINITY;
  const int g = grid < p.n_tiles ? grid : p.n_tiles;
  return fp8 ? score::launch<true>(p, g, static_cast<cudaStream_t>(stream))
             : score::launch<false>(p, g, static_cast<cudaStream_t>(stream));
}

int dsa_indexer_score_smem_bytes(int fp8) { return fp8 ? score::Cfg<true>::SMEM_BYTES : score::Cfg<false>::SMEM_BYTES; }

}  // extern "C"
