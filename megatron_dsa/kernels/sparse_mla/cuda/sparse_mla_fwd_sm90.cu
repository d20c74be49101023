// Sparse MLA forward (absorbed layout) for Hopper (sm_90a): wgmma from shared memory,
// cp.async gathers double-buffered against the MMAs.
//
// Fast path only: Dqk = 576, d_v = 512, bf16, int32 indices. One CTA of 256 threads (two
// warpgroups) per (query row t, block of 64 heads):
//   * the query tile [64 heads, 576] and each gathered kv block [64 keys, 576] live in shared
//     memory as nine 64-channel column chunks, each [64 rows, 128 B] in the 128-byte swizzled
//     layout wgmma reads (16-byte granule g of row r stored at granule g ^ (r % 8));
//   * warpgroup w computes S_w = Q K_w^T for its 32 keys of the block (m64n32k16, K-major B)
//     and owns output channels [256 w, 256 w + 256) (m64n256k16 with V read MN-major from the
//     same kv tile); the two halves of P meet in shared memory, the row maxima are exchanged
//     there too, so both warpgroups rescale identically;
//   * while block i is multiplied, every thread has the cp.async gathers of block i+1 in
//     flight (invalid slots zero-filled, so no NaN can come out of unused shared memory).
// No host synchronization; no workspace. Heads >= H in the last tile are zero and not stored.
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <stdint.h>

// Timing experiments only (never in a shipped build): 1 = no gathers after block 0,
// 2 = no S MMAs, 4 = no PV MMAs. Results are wrong with any of them set.
#ifndef SPARSE_MLA_DBG
#define SPARSE_MLA_DBG 0
#endif

namespace {

constexpr int D_QK = 576;
constexpr int BM = 64;                       // heads per CTA (wgmma M)
constexpr int BN = 64;                       // keys per block
constexpr int NCH = D_QK / 64;               // 9 column chunks of 64 channels (128 B)
constexpr int CHUNK = 64 * 128;              // one chunk: 64 rows x 128 B
constexpr int TILE = NCH * CHUNK;            // 72 KB: a [64, 576] bf16 tile
constexpr int GRAN = D_QK / 8;               // 72 16-byte granules per row
constexpr int THREADS = 256;
constexpr int OFF_Q = 0;
constexpr int OFF_KV = TILE;                 // two stages
constexpr int OFF_P = 3 * TILE;              // [64 heads, 64 keys] bf16, one chunk
constexpr int OFF_RED = OFF_P + CHUNK;       // [2][64] fp32 row maxima, [2][64] row sums
constexpr int SMEM_USED = OFF_RED + 2 * 2 * 64 * 4;
constexpr int SMEM_BYTES = SMEM_USED + 1024; // slack to align the base to 1024 B

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// byte offset of (row, 16-byte granule g in 0..71) inside a swizzled [64, 576] tile
__device__ __forceinline__ uint32_t tile_off(int row, int g) {
  return (g >> 3) * CHUNK + row * 128 + ((((g & 7) ^ (row & 7))) << 4);
}

__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, bool valid) {
  int n = valid ? 16 : 0;  // 0 source bytes: the 16 destination bytes are zero-filled
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(n) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::: "memory"); }
__device__ __forceinline__ void fence_async_smem() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_wait0() { asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory"); }

// wgmma shared-memory matrix descriptor, 128-byte swizzle
__device__ __forceinline__ uint64_t desc(uint32_t addr, uint32_t lbo, uint32_t sbo) {
  uint64_t d = 0;
  d |= static_cast<uint64_t>((addr & 0x3FFFF) >> 4);
  d |= static_cast<uint64_t>((lbo >> 4) & 0x3FFF) << 16;
  d |= static_cast<uint64_t>((sbo >> 4) & 0x3FFF) << 32;
  d |= static_cast<uint64_t>(1) << 62;
  return d;
}

// Generated wrappers for the two wgmma shapes the forward kernel uses (see sparse_mla_fwd_sm90.cu).
__device__ __forceinline__ void wgmma_m64n32k16_ss(float (&d)[16], uint64_t da, uint64_t db, int accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %18, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n32k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}, %16, %17, p, 1, 1, 0, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15])
      : "l"(da), "l"(db), "r"(accumulate));
}
__device__ __forceinline__ void wgmma_m64n256k16_ss_tb(float (&d)[128], uint64_t da, uint64_t db, int accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %130, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}, %128, %129, p, 1, 1, 0, 1;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]), "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]), "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]), "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]), "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]), "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])
      : "l"(da), "l"(db), "r"(accumulate));
}

struct Params {
  const __nv_bfloat16* q;     // [T, H, 576], channel stride 1
  const __nv_bfloat16* kv;    // [Tk, 576], channel stride 1
  const int32_t* idx;         // [T, K]
  const int32_t* topk_len;    // [T] or null
  const float* sink;          // [H] or null
  __nv_bfloat16* out;         // [T, H, 512]
  float* lse;                 // [T, H]
  long long q_st, q_sh, kv_s, idx_s, out_st, out_sh;
  int T, H, Tk, K, n_hblk;
  float scale_log2;           // softmax_scale * log2(e)
  uint32_t v_lbo, v_sbo;      // descriptor strides of the MN-major V operand
};

__global__ void __launch_bounds__(THREADS, 1) sparse_mla_fwd_sm90_kernel(const Params p) {
  extern __shared__ uint8_t smem_raw[];
  uint8_t* smem = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  const uint32_t sbase = smem_u32(smem);
  float* red_max = reinterpret_cast<float*>(smem + OFF_RED);  // [2][64]
  float* red_sum = red_max + 2 * 64;                           // [2][64]

  const int tid = threadIdx.x;
  const int wg = tid >> 7;          // warpgroup: key half for S, channel half for O
  const int wt = tid & 127;
  const int warp = wt >> 5, lane = tid & 31;
  const int t = blockIdx.x / p.n_hblk;
  const int h0 = (blockIdx.x % p.n_hblk) * BM;

  int kv_len = p.K;
  if (p.topk_len != nullptr) kv_len = min(kv_len, max(0, __ldg(p.topk_len + t)));
  const int nblk = (kv_len + BN - 1) / BN;
  const int32_t* idx_row = p.idx + (long long)t * p.idx_s;

  // query tile (heads past H are zero-filled)
  {
    const __nv_bfloat16* qrow = p.q + (long long)t * p.q_st;
    for (int f = tid; f < BM * GRAN; f += THREADS) {
      const int r = f / GRAN, g = f - r * GRAN;
      const bool ok = h0 + r < p.H;
      const __nv_bfloat16* src = qrow + (long long)(ok ? h0 + r : 0) * p.q_sh + g * 8;
      cp_async16(sbase + OFF_Q + tile_off(r, g), src, ok);
    }
  }
  // gather: thread owns kv row (tid / 4) of a block and its granules (tid % 4) + 4 i, i < 18,
  // so it needs one index per block (prefetched a block ahead); a warp covers 8 rows x 64 B.
  const int g_row = tid >> 2, g_sub = tid & 3;
  auto load_id = [&](int blk) -> int {
    const int slot = blk * BN + g_row;
    const int id = (blk < nblk && slot < kv_len) ? __ldg(idx_row + slot) : -1;
    return (id >= 0 && id < p.Tk) ? id : -1;
  };
  auto gather = [&](int id, int stage) {
    const uint32_t dst = sbase + OFF_KV + stage * TILE + g_row * 128;
    const __nv_bfloat16* src = p.kv + (long long)(id >= 0 ? id : 0) * p.kv_s + g_sub * 8;
#pragma unroll
    for (int i = 0; i < GRAN / 4; ++i) {
      const int g = (i >> 1) * 8 + g_sub + 4 * (i & 1);
      cp_async16(dst + (i >> 1) * CHUNK + ((((g & 7) ^ (g_row & 7))) << 4), src + 32 * i, id >= 0);
    }
  };
  if (nblk > 0) gather(load_id(0), 0);
  cp_async_commit();

  float o[128];
#pragma unroll
  for (int i = 0; i < 128; ++i) o[i] = 0.f;
  float m_run[2] = {-INFINITY, -INFINITY};
  float l_run[2] = {0.f, 0.f};
  const int row0 = warp * 16 + (lane >> 2);  // this thread's rows: row0, row0 + 8
  const int colq = 2 * (lane & 3);

  for (int blk = 0; blk < nblk; ++blk) {
    const int stage = blk & 1;
    const int id_next = load_id(blk + 1);
    // slot validity of this thread's 8 key columns (loads in flight during the MMAs)
    bool valid[8];
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int b = 0; b < 2; ++b) {
        const int slot = blk * BN + wg * 32 + 8 * j + colq + b;
        const int id = slot < kv_len ? __ldg(idx_row + slot) : -1;
        valid[2 * j + b] = id >= 0 && id < p.Tk;
      }
    cp_async_wait_all();
    fence_async_smem();
    __syncthreads();  // block blk landed for all threads; everyone is done with block blk - 1

    // S_w = Q K_w^T : [64 heads, 32 keys], 36 k-steps of 16 channels
    float s[16];
    const uint32_t kv_base = sbase + OFF_KV + stage * TILE + wg * 32 * 128;
    wgmma_fence();
#pragma unroll
    for (int c = 0; c < NCH; ++c)
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const uint64_t da = desc(sbase + OFF_Q + c * CHUNK + k * 32, 16, 1024);
        const uint64_t db = desc(kv_base + c * CHUNK + k * 32, 16, 1024);
        if (!(SPARSE_MLA_DBG & 2)) wgmma_m64n32k16_ss(s, da, db, (c | k) != 0);
      }
    wgmma_commit();
    // next block's gather into the other stage (its last reader, PV of blk - 1, has finished)
    if (!(SPARSE_MLA_DBG & 1) || blk == 0) {
      if (blk + 1 < nblk) gather(id_next, stage ^ 1);
    }
    cp_async_commit();
    wgmma_wait0();

    // online softmax in the log2 domain; row maxima shared between the warpgroups
    float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int b = 0; b < 2; ++b) {
          float v = valid[2 * j + b] ? s[4 * j + 2 * i + b] * p.scale_log2 : -INFINITY;
          s[4 * j + 2 * i + b] = v;
          mx[i] = fmaxf(mx[i], v);
        }
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 1));
      mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 2));
    }
    if ((lane & 3) == 0) {
      red_max[wg * 64 + row0] = mx[0];
      red_max[wg * 64 + row0 + 8] = mx[1];
    }
    __syncthreads();
    float alpha[2];
    bool grow = false;
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const float other = red_max[(wg ^ 1) * 64 + row0 + 8 * i];
      const float m_new = fmaxf(m_run[i], fmaxf(mx[i], other));
      grow |= m_new > m_run[i];
      const float m_use = m_new == -INFINITY ? 0.f : m_new;
      alpha[i] = exp2f(m_run[i] - m_use);  // m_run = -inf -> 0 (o and l are 0 then anyway)
      m_run[i] = m_new;
      float sum = 0.f;
#pragma unroll
      for (int j = 0; j < 4; ++j)
#pragma unroll
        for (int b = 0; b < 2; ++b) {
          const float e = exp2f(s[4 * j + 2 * i + b] - m_use);
          s[4 * j + 2 * i + b] = e;
          sum += e;
        }
      l_run[i] = l_run[i] * alpha[i] + sum;
    }
    if (__any_sync(0xffffffffu, grow)) {
#pragma unroll
      for (int j = 0; j < 32; ++j) {
        o[4 * j + 0] *= alpha[0];
        o[4 * j + 1] *= alpha[0];
        o[4 * j + 2] *= alpha[1];
        o[4 * j + 3] *= alpha[1];
      }
    }
    // P (bf16) into the shared [64 heads, 64 keys] tile, swizzled like the other tiles
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int r = row0 + 8 * i;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int g = wg * 4 + j;
        __nv_bfloat162 v = __floats2bfloat162_rn(s[4 * j + 2 * i], s[4 * j + 2 * i + 1]);
        *reinterpret_cast<__nv_bfloat162*>(smem + OFF_P + r * 128 + ((g ^ (r & 7)) << 4) + colq * 2) = v;
      }
    }
    fence_async_smem();
    __syncthreads();

    // O_w += P V_w : V_w = kv[:, 256 w : 256 w + 256] read MN-major from the kv tile
    wgmma_fence();
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const uint64_t da = desc(sbase + OFF_P + k * 32, 16, 1024);
      const uint64_t db = desc(sbase + OFF_KV + stage * TILE + wg * 4 * CHUNK + k * 16 * 128, p.v_lbo, p.v_sbo);
      if (!(SPARSE_MLA_DBG & 4)) wgmma_m64n256k16_ss_tb(o, da, db, 1);
    }
    wgmma_commit();
    wgmma_wait0();
  }
  cp_async_wait_all();

  // finish: row sums across the quad and the two warpgroups, sink, lse, store
  float l_tot[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    float l = l_run[i];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    l_run[i] = l;
  }
  if ((lane & 3) == 0) {
    red_sum[wg * 64 + row0] = l_run[0];
    red_sum[wg * 64 + row0 + 8] = l_run[1];
  }
  __syncthreads();
#pragma unroll
  for (int i = 0; i < 2; ++i) l_tot[i] = l_run[i] + red_sum[(wg ^ 1) * 64 + row0 + 8 * i];

  constexpr float LN2 = 0.6931471805599453f;
  constexpr float LOG2E = 1.4426950408889634f;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int h = h0 + row0 + 8 * i;
    const float m_use = m_run[i] == -INFINITY ? 0.f : m_run[i];
    float denom = l_tot[i];
    if (p.sink != nullptr && h < p.H) denom += exp2f(__ldg(p.sink + h) * LOG2E - m_use);
    const float inv = denom > 0.f ? 1.f / denom : 0.f;
    if (h < p.H) {
      if (wg == 0 && (lane & 3) == 0)
        p.lse[(long long)t * p.H + h] = l_tot[i] > 0.f ? (m_use + log2f(l_tot[i])) * LN2 : -INFINITY;
      __nv_bfloat16* orow = p.out + (long long)t * p.out_st + (long long)h * p.out_sh + wg * 256 + colq;
#pragma unroll
      for (int j = 0; j < 32; ++j) {
        *reinterpret_cast<__nv_bfloat162*>(orow + 8 * j) =
            __floats2bfloat162_rn(o[4 * j + 2 * i] * inv, o[4 * j + 2 * i + 1] * inv);
      }
    }
  }
}

}  // namespace

extern "C" {

int dsa_sparse_mla_fwd_smem_bytes() { return SMEM_BYTES; }

// Returns a cudaError_t (0 = launched).
int dsa_sparse_mla_fwd_sm90(const void* q, const void* kv, const void* idx, const void* topk_len,
                            const void* sink, void* out, void* lse, long long q_st, long long q_sh,
                            long long kv_s, long long idx_s, long long out_st, long long out_sh,
                            int T, int H, int Tk, int K, float scale_log2, unsigned v_lbo,
                            unsigned v_sbo, void* stream) {
  static bool attr_set[64] = {};  // per device: raise the dynamic shared-memory limit once
  int dev = 0;
  cudaError_t e = cudaGetDevice(&dev);
  if (e != cudaSuccess) return static_cast<int>(e);
  if (dev < 0 || dev >= 64 || !attr_set[dev]) {
    e = cudaFuncSetAttribute(sparse_mla_fwd_sm90_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             SMEM_BYTES);
    if (e != cudaSuccess) return static_cast<int>(e);
    if (dev >= 0 && dev < 64) attr_set[dev] = true;
  }
  if (T == 0 || H == 0) return 0;
  Params p;
  p.q = static_cast<const __nv_bfloat16*>(q);
  p.kv = static_cast<const __nv_bfloat16*>(kv);
  p.idx = static_cast<const int32_t*>(idx);
  p.topk_len = static_cast<const int32_t*>(topk_len);
  p.sink = static_cast<const float*>(sink);
  p.out = static_cast<__nv_bfloat16*>(out);
  p.lse = static_cast<float*>(lse);
  p.q_st = q_st; p.q_sh = q_sh; p.kv_s = kv_s; p.idx_s = idx_s; p.out_st = out_st; p.out_sh = out_sh;
  p.T = T; p.H = H; p.Tk = Tk; p.K = K;
  p.n_hblk = (H + BM - 1) / BM;
  p.scale_log2 = scale_log2;
  p.v_lbo = v_lbo; p.v_sbo = v_sbo;
  const long long grid = static_cast<long long>(T) * p.n_hblk;
  sparse_mla_fwd_sm90_kernel<<<static_cast<unsigned>(grid), THREADS, SMEM_BYTES,
                               static_cast<cudaStream_t>(stream)>>>(p);
  return static_cast<int>(cudaGetLastError());
}

}  // extern "C"
