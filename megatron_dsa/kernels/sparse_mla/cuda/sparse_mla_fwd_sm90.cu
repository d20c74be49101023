// Sparse MLA forward (absorbed layout) for Hopper (sm_90a): warp-specialized, wgmma.
//
// Fast path: Dqk = 576, d_v = 512, bf16, int32 indices. One CTA of 384 threads (three
// warpgroups) per (query row t, block of 64 heads); the row's selected keys are walked in
// blocks of 32 through a 5-slot ring of gathered kv tiles in shared memory.
//
//   WG0   computes S = Q K^T for a 32-key block and nothing else: the query's first 448
//         channels sit in its registers as wgmma A fragments (m64n32k16, register A for 28
//         k-steps), channels 448-575 in shared memory (shared A for the last 8 k-steps).
//         It stores the fp32 accumulators to one of two S buffers in its own fragment layout
//         (thread i's 16 values at float4 index [k][i]) and moves on to the next block.
//   WG1/2 each load the S block into the same fragment layout (thread i of WG1 / WG2 holds
//         the rows and columns thread i of WG0 held), run the online softmax on it (both do
//         the same softmax, so neither waits for the other and no row statistics are
//         exchanged), rescale their O, and issue O += P V with P as the register A operand
//         (the fp32 accumulator layout of m64n32 is the bf16 A layout of two k-steps) and V
//         read MN-major from the kv tile: m64n256k16, WG1 channels 0-255, WG2 256-511. They
//         also gather the kv tiles with cp.async; each writes only the channel chunks that
//         it (and WG0's S) reads (WG1: 0-3 and the rope chunk 8, WG2: 4-7, plus the slot
//         ids), so a slot is refilled as soon as its own P V is done, without a
//         cross-warpgroup barrier. Landing is an mbarrier per slot
//         (cp.async.mbarrier.arrive.noinc).
//   WG0 is the critical path of the older layout (S, the softmax and the P hand-off on one
//   warpgroup); here the softmax runs on the two warpgroups that consume it.
//   Registers: setmaxnreg gives WG0 152 (query fragments, one accumulator) and WG1/2 176
//   (O is 128 fp32 each); 152 + 2 x 176 = 3 x 168, the CTA's allocation.
//   Shared-memory tiles are 64-channel column chunks [rows, 128 B] in the 128-byte swizzled
//   layout wgmma reads (16-byte granule g of row r stored at granule g ^ (r % 8)). Invalid
//   slots are zero-filled and masked to -inf, so no NaN can come out of stale shared memory;
//   heads >= H in the last tile are zero and not stored. No host synchronization, no
//   workspace.
#include "sm90_common.cuh"

namespace {

using namespace dsa_sm90;

constexpr int D_QK = 576;
constexpr int BM = 64;                       // heads per CTA (wgmma M)
constexpr int NCH = D_QK / 64;               // 9 column chunks of 64 channels (128 B)
constexpr int CHUNK = 64 * 128;              // a [64 rows, 128 B] chunk (query)
constexpr int BN = 32;                       // keys per block
constexpr int NST = 5;                       // kv ring slots
constexpr int CH = BN * 128;                 // one 64-channel chunk of a slot: 32 rows x 128 B
constexpr int STAGE = NCH * CH;              // 36 KB per slot
constexpr int THREADS = 384;
constexpr int NQS = 4;                       // query chunks in shared memory (the last four)
constexpr int NSB = 1;                       // S buffers (WG1/2 copy S out as soon as it lands)
constexpr int SBUF = 128 * 16 * 4;           // one S block: 128 threads x 16 fp32
constexpr int OFF_KV = 0;
constexpr int OFF_S = OFF_KV + NST * STAGE;  // NSB x S block
constexpr int OFF_Q = OFF_S + NSB * SBUF;    // NQS x [64 heads, 64] bf16: query channels 448-575
constexpr int OFF_IDS = OFF_Q + NQS * CHUNK;     // [NST][BN] int32: the ids of each slot's keys
constexpr int OFF_BAR = OFF_IDS + NST * BN * 4;  // NST mbarriers: slot full (landed)
constexpr int OFF_EMPTY = OFF_BAR + NST * 8;     // NST mbarriers: slot empty (P V done)
constexpr int SMEM_USED = OFF_EMPTY + NST * 8;
constexpr int SMEM_BYTES = SMEM_USED + 1024;     // slack to align the base to 1024 B
// named barriers: S_FREE / S_FULL of S buffer b are ids 1 + 4 b / 2 + 4 b; 3 = WG0 alone
constexpr int BAR_S_FREE = 1, BAR_S_FULL = 2, BAR_WG0 = 3;

// Timing experiments only (never in a shipped build): 1 = no gathers after the first ring
// fill, 2 = no S MMAs, 4 = no P V MMAs. Results are wrong with any of them set.
#ifndef SPARSE_MLA_DBG
#define SPARSE_MLA_DBG 0
#endif

struct Params {
  const __nv_bfloat16* q;     // [T, H, 576], channel stride 1
  const __nv_bfloat16* kv;    // [Tk, 576], channel stride 1
  const int32_t* idx;         // [T, K]
  const int32_t* topk_len;    // [T] or null
  const float* sink;          // [H] or null
  __nv_bfloat16* out;         // [T, H, 512]
  float* lse;                 // [T, H]
  long long q_st, q_sh, kv_s, idx_s, out_st, out_sh;
  int T, H, Tk, K, n_hblk;    // T: rows (informational; the grid encodes it)
  float scale_log2;           // softmax_scale * log2(e)
};

__device__ __forceinline__ uint32_t pack_bf16(float a, float b) {
  __nv_bfloat162 v = __floats2bfloat162_rn(a, b);
  return *reinterpret_cast<uint32_t*>(&v);
}

__global__ void __launch_bounds__(THREADS, 1) sparse_mla_fwd_sm90_kernel(const Params p) {
  extern __shared__ uint8_t smem_raw[];
  uint8_t* smem = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  const uint32_t sbase = smem_u32(smem);
  const uint32_t bar0 = sbase + OFF_BAR;
  float4* s_buf = reinterpret_cast<float4*>(smem + OFF_S);

  const int tid = threadIdx.x;
  const int wg = tid >> 7;
  const int wt = tid & 127;
  const int warp = wt >> 5, lane = tid & 31;
  const int row0 = warp * 16 + (lane >> 2);  // accumulator rows of this thread: row0, row0 + 8
  const int colq = 2 * (lane & 3);
  const int t = blockIdx.x / p.n_hblk;
  const int h0 = (blockIdx.x % p.n_hblk) * BM;

  int kv_len = p.K;
  if (p.topk_len != nullptr) kv_len = min(kv_len, max(0, __ldg(p.topk_len + t)));
  const int nblk = (kv_len + BN - 1) / BN;
  const int32_t* idx_row = p.idx + (long long)t * p.idx_s;

  if (tid == 0) {
#pragma unroll
    for (int s = 0; s < NST; ++s) {
      mbar_init(bar0 + 8 * s, 128);                   // WG0's cp.async arrivals
      mbar_init(sbase + OFF_EMPTY + 8 * s, 8);        // one per warp of WG1/2
    }
  }
  __syncthreads();

  if (wg == 0) {
    // ---------------- S ----------------
    asm volatile("setmaxnreg.dec.sync.aligned.u32 152;\n" ::: "memory");
    constexpr int KQ = (NCH - NQS) * 4;  // k-steps from registers
    uint32_t qf[KQ][4];
    {
      const __nv_bfloat16* qrow = p.q + (long long)t * p.q_st;
#pragma unroll
      for (int i = 0; i < 4 * NQS; ++i) {
        const int f = wt + 128 * i, cq = f >> 9, r = (f >> 3) & 63, g = f & 7;
        uint4 v = make_uint4(0u, 0u, 0u, 0u);
        if (h0 + r < p.H) v = __ldg(reinterpret_cast<const uint4*>(qrow + (long long)(h0 + r) * p.q_sh + (NCH - NQS + cq) * 64 + g * 8));
        *reinterpret_cast<uint4*>(smem + OFF_Q + cq * CHUNK + r * 128 + ((g ^ (r & 7)) << 4)) = v;
      }
      fence_async_smem();
      const int hr0 = h0 + row0, hr1 = hr0 + 8;
      const uint32_t* q0 = reinterpret_cast<const uint32_t*>(qrow + (long long)min(hr0, p.H - 1) * p.q_sh);
      const uint32_t* q1 = reinterpret_cast<const uint32_t*>(qrow + (long long)min(hr1, p.H - 1) * p.q_sh);
#pragma unroll
      for (int kk = 0; kk < KQ; ++kk) {
        const int c = (kk * 16 + colq) >> 1;  // in bf16 pairs
        qf[kk][0] = hr0 < p.H ? __ldg(q0 + c) : 0u;
        qf[kk][1] = hr1 < p.H ? __ldg(q1 + c) : 0u;
        qf[kk][2] = hr0 < p.H ? __ldg(q0 + c + 4) : 0u;
        qf[kk][3] = hr1 < p.H ? __ldg(q1 + c + 4) : 0u;
      }
      bar_sync(BAR_WG0, 128);  // WG0's query chunks are written
    }
    // gather mapping: 4 threads per kv row, all 32 rows of a block
    const int g_row = wt >> 2, g_sub = wt & 3;
    auto load_row_id = [&](int j) -> int {
      const int slot = j * BN + g_row;
      return (j < nblk && slot < kv_len) ? __ldg(idx_row + slot) : -1;
    };
    auto gather = [&](int j, int id) {
      const bool ok = id >= 0 && id < p.Tk;
      const __nv_bfloat16* src = p.kv + (long long)(ok ? id : 0) * p.kv_s + g_sub * 8;
      const uint32_t dst = sbase + OFF_KV + (j % NST) * STAGE + g_row * 128;
#pragma unroll
      for (int i = 0; i < 2 * NCH; ++i) {
        const int cc = i >> 1;
        const int gi = g_sub + 4 * (i & 1);  // granule inside the chunk
        cp_async16(dst + cc * CH + ((gi ^ (g_row & 7)) << 4), src + cc * 64 + 32 * (i & 1), ok);
      }
      if (wt < BN) {  // the slot's ids for the validity test (4-byte copies)
        const int slot = j * BN + wt;
        const uint32_t dst_id = sbase + OFF_IDS + ((j % NST) * BN + wt) * 4;
        asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst_id),
                     "l"(idx_row + (slot < kv_len ? slot : 0)), "r"(slot < kv_len ? 4 : 0) : "memory");
      }
      cp_async_arrive_noinc(bar0 + 8 * (j % NST));
    };
    for (int j = 0; j < NST && j < nblk; ++j) gather(j, load_row_id(j));
    int gid = load_row_id(NST);  // the next gather's id, loaded a block ahead
    const uint64_t qdesc0 = desc(sbase + OFF_Q, 16, 1024);
    const uint64_t kdesc0 = desc(sbase + OFF_KV, 16, 1024);
    float acc[16];
    for (int j = 0; j < nblk; ++j) {
      const int st = j % NST;
      mbar_wait(bar0 + 8 * st, (j / NST) & 1);
      fence_async_smem();
      const uint64_t db0 = kdesc0 + ((st * STAGE) >> 4);
      wgmma_fence();
#pragma unroll
      for (int c = 0; c < NCH; ++c)
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          // descriptors are linear in the address (bits 0-13 = address / 16): constant offsets
          const uint64_t db = db0 + ((c * CH + k * 32) >> 4);
          if (SPARSE_MLA_DBG & 2) continue;
          if (c < NCH - NQS) wgmma_m64n32k16_rs<0>(acc, qf[c * 4 + k], db, (c | k) != 0);
          else wgmma_m64n32k16_ss<0, 0>(acc, qdesc0 + (((c - (NCH - NQS)) * CHUNK + k * 32) >> 4), db, 1);
        }
      wgmma_commit();
      // while S runs: refill the slot of block j - 2 (WG1/2 finished its P V once they had S
      // of block j - 1, which is already out) with block j - 2 + NST
      const int b = j - 2 + NST;
      if (j >= 2 && b < nblk) {
        mbar_wait(sbase + OFF_EMPTY + 8 * ((j - 2) % NST), ((j - 2) / NST) & 1);
        if (SPARSE_MLA_DBG & 1) cp_async_arrive_noinc(bar0 + 8 * (b % NST));
        else gather(b, gid);
        gid = load_row_id(b + 1);
      }
      wgmma_wait0();
      const int sb = j % NSB;
      // WG1/2 have copied S of block j - NSB out of this buffer
      if (j >= NSB) bar_sync(BAR_S_FREE + 4 * sb, THREADS);
#pragma unroll
      for (int k = 0; k < 4; ++k)
        s_buf[sb * (SBUF / 16) + k * 128 + wt] = make_float4(acc[4 * k], acc[4 * k + 1], acc[4 * k + 2], acc[4 * k + 3]);
      bar_arrive(BAR_S_FULL + 4 * sb, THREADS);
    }
    // WG1/2 release every S buffer; take the releases of the last NSB blocks
    for (int j = max(nblk, NSB) - NSB; j < nblk; ++j) bar_sync(BAR_S_FREE + 4 * (j % NSB), THREADS);
    cp_async_wait_all();
  } else {
    // ---------------- softmax + P V + gathers ----------------
    const int w = wg - 1;  // output channels [256 w, 256 w + 256)
    asm volatile("setmaxnreg.inc.sync.aligned.u32 176;\n" ::: "memory");

    const int* ids_s = reinterpret_cast<const int*>(smem + OFF_IDS);
    float o[128];
#pragma unroll
    for (int i = 0; i < 128; ++i) o[i] = 0.f;
    float m_run[2] = {-INFINITY, -INFINITY};
    float l_run[2] = {0.f, 0.f};
    const uint64_t vdesc0 = desc(sbase + OFF_KV + w * 4 * CH, CH, 1024);
    for (int j = 0; j < nblk; ++j) {
      const int st = j % NST, sb = j % NSB;
      float s[16];
      bar_sync(BAR_S_FULL + 4 * sb, THREADS);
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const float4 v = s_buf[sb * (SBUF / 16) + k * 128 + wt];
        s[4 * k] = v.x;
        s[4 * k + 1] = v.y;
        s[4 * k + 2] = v.z;
        s[4 * k + 3] = v.w;
      }
      bar_arrive(BAR_S_FREE + 4 * sb, THREADS);
      // the online softmax (exp2 domain); thread quads hold whole rows
      bool valid[8];
#pragma unroll
      for (int jj = 0; jj < 4; ++jj) {
        const int2 id2 = *reinterpret_cast<const int2*>(ids_s + st * BN + 8 * jj + colq);
        const int slot = j * BN + 8 * jj + colq;
        valid[2 * jj] = slot < kv_len && id2.x >= 0 && id2.x < p.Tk;
        valid[2 * jj + 1] = slot + 1 < kv_len && id2.y >= 0 && id2.y < p.Tk;
      }
      float alpha[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        float mx = -INFINITY;
#pragma unroll
        for (int jj = 0; jj < 4; ++jj)
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
        for (int jj = 0; jj < 4; ++jj)
#pragma unroll
          for (int b = 0; b < 2; ++b) {
            const float e = exp2f(s[4 * jj + 2 * i + b] - m_use);
            s[4 * jj + 2 * i + b] = e;
            sum += e;
          }
        l_run[i] = l_run[i] * alpha[i] + sum;
      }
      // P V of block j - 1 is done: O may be rescaled, pa rewritten, and its slot refilled
      wgmma_wait0();
      if (j >= 1 && lane == 0) mbar_arrive(sbase + OFF_EMPTY + 8 * ((j - 1) % NST));
      if (__any_sync(0xffffffffu, alpha[0] != 1.f || alpha[1] != 1.f)) {
#pragma unroll
        for (int jj = 0; jj < 32; ++jj) {
          o[4 * jj + 0] *= alpha[0];
          o[4 * jj + 1] *= alpha[0];
          o[4 * jj + 2] *= alpha[1];
          o[4 * jj + 3] *= alpha[1];
        }
      }
      // P as the A operand: k-step kk (keys 16 kk .. 16 kk + 15) is accumulator column
      // groups 2 kk and 2 kk + 1
      uint32_t pa[2][4];
#pragma unroll
      for (int kk = 0; kk < 2; ++kk) {
        pa[kk][0] = pack_bf16(s[8 * kk + 0], s[8 * kk + 1]);
        pa[kk][1] = pack_bf16(s[8 * kk + 2], s[8 * kk + 3]);
        pa[kk][2] = pack_bf16(s[8 * kk + 4], s[8 * kk + 5]);
        pa[kk][3] = pack_bf16(s[8 * kk + 6], s[8 * kk + 7]);
      }
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < 2; ++kk) {
        const uint64_t db = vdesc0 + ((st * STAGE + kk * 16 * 128) >> 4);
        if (!(SPARSE_MLA_DBG & 4)) wgmma_m64n256k16_rs<1>(o, pa[kk], db, 1);
      }
      wgmma_commit();  // waited for in the next block, after its softmax
    }
    wgmma_wait0();
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      float l = l_run[i];
      l += __shfl_xor_sync(0xffffffffu, l, 1);
      l += __shfl_xor_sync(0xffffffffu, l, 2);
      const int r = row0 + 8 * i;
      const int h = h0 + r;
      if (h >= p.H) continue;
      const float m_use = m_run[i] == -INFINITY ? 0.f : m_run[i];
      if (w == 0 && (lane & 3) == 0)
        p.lse[(long long)t * p.H + h] = l > 0.f ? (m_use + log2f(l)) * 0.6931471805599453f : -INFINITY;
      float denom = l;
      if (p.sink != nullptr) denom += exp2f(__ldg(p.sink + h) * 1.4426950408889634f - m_use);
      const float inv = denom > 0.f ? 1.f / denom : 0.f;
      __nv_bfloat16* orow = p.out + (long long)t * p.out_st + (long long)h * p.out_sh + w * 256 + colq;
#pragma unroll
      for (int jj = 0; jj < 32; ++jj)
        *reinterpret_cast<__nv_bfloat162*>(orow + 8 * jj) =
            __floats2bfloat162_rn(o[4 * jj + 2 * i] * inv, o[4 * jj + 2 * i + 1] * inv);
    }
  }
}

}  // namespace

extern "C" {

int dsa_sparse_mla_fwd_smem_bytes() { return SMEM_BYTES; }

// Launches on `stream`; returns a cudaError_t (0 = launched). No host synchronization.
int dsa_sparse_mla_fwd_sm90(const void* q, const void* kv, const void* idx, const void* topk_len,
                            const void* sink, void* out, void* lse, long long q_st, long long q_sh,
                            long long kv_s, long long idx_s, long long out_st, long long out_sh,
                            int T, int H, int Tk, int K, float scale_log2, void* stream) {
  static bool attr_set[64] = {};  // per device: raise the dynamic shared-memory limit once
  const cudaError_t e = set_smem_once(attr_set, sparse_mla_fwd_sm90_kernel, SMEM_BYTES);
  if (e != cudaSuccess) return static_cast<int>(e);
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
  const long long grid = static_cast<long long>(T) * p.n_hblk;
  if (grid > 0x7fffffffLL) return static_cast<int>(cudaErrorInvalidValue);
  sparse_mla_fwd_sm90_kernel<<<static_cast<unsigned>(grid), THREADS, SMEM_BYTES, static_cast<cudaStream_t>(stream)>>>(p);
  return static_cast<int>(cudaGetLastError());
}

}  // extern "C"
