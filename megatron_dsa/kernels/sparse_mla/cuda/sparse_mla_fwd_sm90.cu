// Sparse MLA forward (absorbed layout) for Hopper (sm_90a): persistent, warp-specialized, wgmma.
//
// Fast path: Dqk = 576, d_v = 512, bf16, int32 indices. Work tiles are (query row t, block of
// 64 heads); a persistent grid of one 384-thread CTA (three warpgroups) per SM walks its tiles
// (blockIdx.x, + gridDim.x, ...). Inside a CTA the selected keys of all its tiles form one
// stream of 32-key blocks that flows through a 5-slot ring of gathered kv tiles in shared
// memory, so the next tile's first gathers, its query load and the last tile's output stores
// overlap instead of each CTA filling and draining its own pipeline.
//
//   WG0   holds the query's first 512 channels in registers as wgmma A fragments (its 64 rope
//         channels sit in shared memory) and computes S = Q K^T for a 32-key block
//         (m64n32k16: register A for 32 k-steps, shared A for the 4 rope k-steps), the online
//         softmax (exp2 domain, whole rows per thread quad, so no cross-warpgroup max
//         exchange), and hands P [64 heads, 32 keys] (bf16) plus each row's rescale factor
//         to WG1/2 through shared memory. S of the next block is issued before a block is
//         handed off, so it runs while the hand-off waits. At a tile's last block it writes the
//         row statistics (lse to global, l and m to shared memory for WG1/2) and loads the next
//         tile's query before issuing that tile's first S.
//   WG1/2 own output channels [256 w, 256 w + 256): rescale O, O += P V (m64n256k16, V read
//         MN-major from the same kv tile), and gather the stream's next kv tiles with cp.async
//         (a cursor that runs NST blocks ahead, across tile boundaries). Each of the two writes
//         only the channel chunks that it (and WG0's S) reads (WG1: 0-3 and the rope chunk 8,
//         WG2: 4-7, plus the slot ids), so a slot is refilled as soon as its own P V is done,
//         without a cross-warpgroup barrier. Landing is signalled on one mbarrier per slot
//         (cp.async.mbarrier.arrive.noinc). At a tile's end they store O and start from zero.
//   Registers: setmaxnreg moves 2 x 128 x 8 registers from WG1/2 (O is 128 fp32 each) to
//   WG0 (query fragments); the CTA's 384 x 168 allocation is never exceeded.
//   Shared-memory tiles are 64-channel column chunks [rows, 128 B] in the 128-byte swizzled
//   layout wgmma reads (16-byte granule g of row r stored at granule g ^ (r % 8)). Invalid
//   slots are zero-filled, so no NaN can come out of stale shared memory; heads >= H in the
//   last tile are zero and not stored. A tile with no valid key (empty row) is not in the
//   stream: WG0 writes its lse (-inf) and WG1/2 its zero output directly. No host
//   synchronization, no workspace.
#include "sm90_common.cuh"

// Timing experiments only (never in a shipped build): 1 = no gathers after the first ring
// fill, 2 = no S MMAs, 4 = no P V MMAs. Results are wrong with any of them set.
#ifndef SPARSE_MLA_DBG
#define SPARSE_MLA_DBG 0
#endif

namespace {

using namespace dsa_sm90;

constexpr int D_QK = 576;
constexpr int BM = 64;                       // heads per tile (wgmma M)
constexpr int NCH = D_QK / 64;               // 9 column chunks of 64 channels (128 B)
constexpr int CHUNK = 64 * 128;              // a [64 rows, 128 B] chunk (query rope, P)
constexpr int BN = 32;                       // keys per block
constexpr int NST = 5;                       // kv ring slots
constexpr int CH = BN * 128;                 // one 64-channel chunk of a slot: 32 rows x 128 B
constexpr int STAGE = NCH * CH;              // 36 KB per slot
constexpr int THREADS = 384;
constexpr int NP = 2;                        // P / alpha buffers: WG0 may run a block ahead
constexpr int OFF_KV = 0;
constexpr int OFF_P = OFF_KV + NST * STAGE;  // NP x [64 heads, 32 keys] bf16 in 128-byte rows
constexpr int OFF_QR = OFF_P + NP * CHUNK;   // [64 heads, 64] bf16: the query's rope channels
constexpr int OFF_ALPHA = OFF_QR + CHUNK;    // NP x [64] fp32 rescale factors
constexpr int OFF_L = OFF_ALPHA + NP * 64 * 4;  // 2 x [64] fp32 final row sums (by tile parity)
constexpr int OFF_M = OFF_L + 2 * 64 * 4;    // 2 x [64] fp32 final row maxima (log2 domain)
constexpr int OFF_IDS = OFF_M + 2 * 64 * 4;  // [NST][BN] int32: the ids of each slot's keys
constexpr int OFF_BAR = OFF_IDS + NST * BN * 4;  // NST mbarriers: slot full
constexpr int SMEM_USED = OFF_BAR + NST * 8;
constexpr int SMEM_BYTES = SMEM_USED + 1024;     // slack to align the base to 1024 B
// named barriers: P_FREE / P_FULL of P buffer b are ids 1 + 4 b / 2 + 4 b; DONE of tile parity
// c (WG0 wrote that tile's l and m) is 3 + 4 c; 4 = WG0 alone
constexpr int BAR_P_FREE = 1, BAR_P_FULL = 2, BAR_DONE = 3, BAR_WG0 = 4;

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
  int T, H, Tk, K, n_hblk;
  int n_tiles;                // T * n_hblk
  float scale_log2;           // softmax_scale * log2(e)
};

// the number of selected keys of query row t (the fast path stops there)
__device__ __forceinline__ int row_len(const Params& p, int t) {
  return p.topk_len != nullptr ? min(p.K, max(0, __ldg(p.topk_len + t))) : p.K;
}

// the first tile >= x of this CTA's walk (x, x + gridDim.x, ...) with at least one key;
// empty(x') is called for each tile skipped; returns n_tiles when there is none
template <typename F>
__device__ __forceinline__ int next_tile(const Params& p, int x, int& len, F&& empty) {
  for (; x < p.n_tiles; x += gridDim.x) {
    len = row_len(p, x / p.n_hblk);
    if (len > 0) return x;
    empty(x);
  }
  len = 0;
  return p.n_tiles;
}

__global__ void __launch_bounds__(THREADS, 1) sparse_mla_fwd_sm90_kernel(const Params p) {
  extern __shared__ uint8_t smem_raw[];
  uint8_t* smem = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  const uint32_t sbase = smem_u32(smem);
  float* alpha_s = reinterpret_cast<float*>(smem + OFF_ALPHA);
  float* l_s = reinterpret_cast<float*>(smem + OFF_L);
  float* m_s = reinterpret_cast<float*>(smem + OFF_M);
  const uint32_t bar0 = sbase + OFF_BAR;

  const int tid = threadIdx.x;
  const int wg = tid >> 7;
  const int wt = tid & 127;
  const int warp = wt >> 5, lane = tid & 31;
  const int row0 = warp * 16 + (lane >> 2);  // accumulator rows of this thread: row0, row0 + 8
  const int colq = 2 * (lane & 3);
  const auto no_empty = [](int) {};

  if (tid == 0) {
#pragma unroll
    for (int s = 0; s < NST; ++s) mbar_init(bar0 + 8 * s, 256);
  }
  __syncthreads();

  if (wg == 0) {
    // ---------------- S + softmax ----------------
    // register budget: the CTA holds 384 x 168; WG1/2 give back 2 x 128 x 8, WG0 takes
    // 128 x 16 (an inc beyond what was given back would wait forever)
    asm volatile("setmaxnreg.inc.sync.aligned.u32 184;\n" ::: "memory");
    // the query's first 512 channels as wgmma A fragments (k-step kk covers channels
    // [16 kk, 16 kk + 16)); its 64 rope channels go to shared memory (registers are short)
    constexpr int KQ = (NCH - 1) * 4;
    uint32_t qf[KQ][4];
    // load tile x's query (every S MMA of the previous tile has completed), and ask the L2 for
    // the query of the tile after it
    auto load_q = [&](int x) {
      const int t = x / p.n_hblk, h0 = (x % p.n_hblk) * BM;
      const __nv_bfloat16* qrow = p.q + (long long)t * p.q_st;
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int f = wt + 128 * i, r = f >> 3, g = f & 7;
        uint4 v = make_uint4(0u, 0u, 0u, 0u);
        if (h0 + r < p.H) v = __ldg(reinterpret_cast<const uint4*>(qrow + (long long)(h0 + r) * p.q_sh + (NCH - 1) * 64 + g * 8));
        *reinterpret_cast<uint4*>(smem + OFF_QR + r * 128 + ((g ^ (r & 7)) << 4)) = v;
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
      const int xn = x + gridDim.x;
      if (xn < p.n_tiles) {
        // 64 head rows x 1152 B = 576 lines of 128 B
        const int tn = xn / p.n_hblk, hn0 = (xn % p.n_hblk) * BM;
        for (int l = wt; l < BM * 9; l += 128) {
          const int r = l / 9;
          if (hn0 + r < p.H)
            asm volatile("prefetch.global.L2 [%0];\n" ::"l"(p.q + (long long)tn * p.q_st + (long long)(hn0 + r) * p.q_sh + (l % 9) * 64));
        }
      }
      bar_sync(BAR_WG0, 128);  // WG0's rope tile is written
    };
    // an empty row: lse = -inf (WG1/2 write its zero output)
    auto empty_lse = [&](int x) {
      const int t = x / p.n_hblk, h0 = (x % p.n_hblk) * BM;
      if (wt < BM && h0 + wt < p.H) p.lse[(long long)t * p.H + h0 + wt] = -INFINITY;
    };
    const uint64_t qrdesc0 = desc(sbase + OFF_QR, 16, 1024);
    const uint64_t kdesc0 = desc(sbase + OFF_KV, 16, 1024);
    const int* ids_s = reinterpret_cast<const int*>(smem + OFF_IDS);
    float m_run[2] = {-INFINITY, -INFINITY};
    float l_run[2] = {0.f, 0.f};
    // S of stream block g (slot g % NST). real = false issues a dummy S on whatever the slot
    // holds (result unused, after the stream's last block): the wgmma issue and wait sequence
    // stays the same on every path, which keeps ptxas from serializing it.
    auto issue_s = [&](int g, bool real, float (&acc)[16]) {
      const int st = g % NST;
      if (real) {
        mbar_wait(bar0 + 8 * st, (g / NST) & 1);
        fence_async_smem();
      }
      const uint64_t db0 = kdesc0 + ((st * STAGE) >> 4);
      wgmma_fence();
#pragma unroll
      for (int c = 0; c < NCH; ++c)
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          // descriptors are linear in the address (bits 0-13 = address / 16): constant offsets
          const uint64_t db = db0 + ((c * CH + k * 32) >> 4);
          if (SPARSE_MLA_DBG & 2) continue;
          if (c < NCH - 1) wgmma_m64n32k16_rs<0>(acc, qf[c * 4 + k], db, (c | k) != 0);
          else wgmma_m64n32k16_ss<0, 0>(acc, qrdesc0 + ((k * 32) >> 4), db, 1);
        }
      wgmma_commit();
    };
    // softmax of block j of the tile (stream block g) in registers: acc becomes P (fp32),
    // alpha the rescale of earlier rows
    float alpha[2];
    auto softmax = [&](int g, int j, int kv_len, float (&acc)[16]) {
      const int st = g % NST;
      bool valid[8];
#pragma unroll
      for (int jj = 0; jj < 4; ++jj) {
        const int2 id2 = *reinterpret_cast<const int2*>(ids_s + st * BN + 8 * jj + colq);
        const int slot = j * BN + 8 * jj + colq;
        valid[2 * jj] = slot < kv_len && id2.x >= 0 && id2.x < p.Tk;
        valid[2 * jj + 1] = slot + 1 < kv_len && id2.y >= 0 && id2.y < p.Tk;
      }
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        float mx = -INFINITY;
#pragma unroll
        for (int jj = 0; jj < 4; ++jj)
#pragma unroll
          for (int b = 0; b < 2; ++b) {
            const float v = valid[2 * jj + b] ? acc[4 * jj + 2 * i + b] * p.scale_log2 : -INFINITY;
            acc[4 * jj + 2 * i + b] = v;
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
            const float e = exp2f(acc[4 * jj + 2 * i + b] - m_use);
            acc[4 * jj + 2 * i + b] = e;
            sum += e;
          }
        l_run[i] = l_run[i] * alpha[i] + sum;
      }
    };
    // hand P (packed bf16 pairs) and alpha of stream block g to WG1/2
    auto handoff = [&](int g, const uint32_t (&pk)[8]) {
      const int pb = g % NP;
      // WG1/2 are done reading P and alpha of block g - NP (the buffer this block reuses)
      if (g >= NP) bar_sync(BAR_P_FREE + 4 * pb, THREADS);
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const int r = row0 + 8 * i;
#pragma unroll
        for (int jj = 0; jj < 4; ++jj)
          *reinterpret_cast<uint32_t*>(smem + OFF_P + pb * CHUNK + r * 128 + ((jj ^ (r & 7)) << 4) + colq * 2) = pk[4 * i + jj];
        if ((lane & 3) == 0) alpha_s[pb * 64 + r] = alpha[i];
      }
      fence_async_smem();
      bar_arrive(BAR_P_FULL + 4 * pb, THREADS);
    };
    // the tile's statistics: lse to global, l and m (by tile parity c) for WG1/2's epilogue
    auto finish_tile = [&](int x, int c) {
      const int t = x / p.n_hblk, h0 = (x % p.n_hblk) * BM;
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        float l = l_run[i];
        l += __shfl_xor_sync(0xffffffffu, l, 1);
        l += __shfl_xor_sync(0xffffffffu, l, 2);
        const int r = row0 + 8 * i;
        if ((lane & 3) == 0) {
          l_s[c * 64 + r] = l;
          m_s[c * 64 + r] = m_run[i];
          const int h = h0 + r;
          if (h < p.H) {
            const float m_use = m_run[i] == -INFINITY ? 0.f : m_run[i];
            p.lse[(long long)t * p.H + h] = l > 0.f ? (m_use + log2f(l)) * 0.6931471805599453f : -INFINITY;
          }
        }
        m_run[i] = -INFINITY;
        l_run[i] = 0.f;
      }
      bar_arrive(BAR_DONE + 4 * c, THREADS);
    };
    int len = 0;
    int x = next_tile(p, blockIdx.x, len, empty_lse);
    int g = 0;  // stream block
    int c = 0;  // parity of this CTA's tiles with keys
    // one S accumulator (registers are scarce next to the query fragments): a block's P is
    // packed to bf16, then the next S is issued and runs while the block is handed off.
    // Nothing is in flight across a loop's back edge (ptxas would serialize the wgmma).
    float acc[16];
    if (x < p.n_tiles) {
      load_q(x);
      issue_s(0, true, acc);
      wgmma_wait0();
    }
    while (x < p.n_tiles) {
      const int nblk = (len + BN - 1) / BN;
      int xn = x, len_n = len;
      for (int j = 0; j < nblk; ++j, ++g) {
        softmax(g, j, len, acc);
        uint32_t pk[8];
#pragma unroll
        for (int i = 0; i < 2; ++i)
#pragma unroll
          for (int jj = 0; jj < 4; ++jj) {
            __nv_bfloat162 v = __floats2bfloat162_rn(acc[4 * jj + 2 * i], acc[4 * jj + 2 * i + 1]);
            pk[4 * i + jj] = *reinterpret_cast<uint32_t*>(&v);
          }
        const bool last = j + 1 == nblk;
        if (last) {
          handoff(g, pk);
          finish_tile(x, c);
          xn = next_tile(p, x + gridDim.x, len_n, empty_lse);
          if (xn < p.n_tiles) load_q(xn);
        }
        issue_s(g + 1, !last || xn < p.n_tiles, acc);
        if (!last) handoff(g, pk);
        wgmma_wait0();
      }
      x = xn;
      len = len_n;
      c ^= 1;
    }
    // WG1/2 arrive on P_FREE after every block: take the arrivals of the last NP blocks
    for (int b = max(0, g - NP); b < g; ++b) bar_sync(BAR_P_FREE + 4 * (b % NP), THREADS);
  } else {
    // ---------------- gathers + P V ----------------
    const int w = wg - 1;  // output channels [256 w, 256 w + 256)
    asm volatile("setmaxnreg.dec.sync.aligned.u32 160;\n" ::: "memory");
    // an empty row: zero output for our channels
    auto empty_out = [&](int x) {
      const int t = x / p.n_hblk, h0 = (x % p.n_hblk) * BM;
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const int h = h0 + row0 + 8 * i;
        if (h >= p.H) continue;
        __nv_bfloat16* orow = p.out + (long long)t * p.out_st + (long long)h * p.out_sh + w * 256 + colq;
#pragma unroll
        for (int jj = 0; jj < 32; ++jj) *reinterpret_cast<uint32_t*>(orow + 8 * jj) = 0u;
      }
    };
    // the gather cursor: tile gx, its block gj, its row length glen (runs NST blocks ahead of
    // the P V loop, across tile boundaries). 4 threads per kv row, all 32 rows of a block.
    const int g_row = wt >> 2, g_sub = wt & 3;
    int glen = 0;
    int gx = next_tile(p, blockIdx.x, glen, no_empty);
    int gj = 0;
    auto cursor_next = [&]() {
      if (++gj * BN >= glen) {
        gj = 0;
        gx = next_tile(p, gx + gridDim.x, glen, no_empty);
      }
    };
    auto load_row_id = [&]() -> int {
      const int slot = gj * BN + g_row;
      return (gx < p.n_tiles && slot < glen) ? __ldg(p.idx + (long long)(gx / p.n_hblk) * p.idx_s + slot) : -1;
    };
    // gather the cursor's block into the slot of stream block g
    auto gather = [&](int g, int id) {
      const bool ok = id >= 0 && id < p.Tk;
      const __nv_bfloat16* src = p.kv + (long long)(ok ? id : 0) * p.kv_s + g_sub * 8;
      const uint32_t dst = sbase + OFF_KV + (g % NST) * STAGE + g_row * 128;
      const int nchunk = w == 0 ? 5 : 4;
#pragma unroll
      for (int i = 0; i < 10; ++i) {
        const int ci = i >> 1;
        if (ci < nchunk) {
          const int cc = w == 0 ? (ci < 4 ? ci : 8) : 4 + ci;
          const int gi = g_sub + 4 * (i & 1);  // granule inside the chunk
          cp_async16(dst + cc * CH + ((gi ^ (g_row & 7)) << 4), src + cc * 64 + 32 * (i & 1), ok);
        }
      }
      if (w == 1 && wt < BN) {  // the slot's ids for WG0's validity test (4-byte copies)
        const int slot = gj * BN + wt;
        const uint32_t dst_id = sbase + OFF_IDS + ((g % NST) * BN + wt) * 4;
        const int32_t* src_id = p.idx + (long long)(gx / p.n_hblk) * p.idx_s + (slot < glen ? slot : 0);
        asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst_id),
                     "l"(src_id), "r"(slot < glen ? 4 : 0) : "memory");
      }
      cp_async_arrive_noinc(bar0 + 8 * (g % NST));
    };
    int gq = 0;  // stream blocks gathered
    for (; gq < NST && gx < p.n_tiles; ++gq) {
      gather(gq, load_row_id());
      cursor_next();
    }
    int gid = load_row_id();  // the next gather's id, loaded an iteration ahead

    float o[128];
#pragma unroll
    for (int i = 0; i < 128; ++i) o[i] = 0.f;
    const uint64_t pdesc0 = desc(sbase + OFF_P, 16, 1024);
    const uint64_t vdesc0 = desc(sbase + OFF_KV + w * 4 * CH, CH, 1024);
    int len = 0;
    int x = next_tile(p, blockIdx.x, len, empty_out);
    int g = 0, c = 0;
    while (x < p.n_tiles) {
      const int nblk = (len + BN - 1) / BN;
      float inv[2];
      for (int j = 0; j < nblk; ++j, ++g) {
        const int pb = g % NP;
        bar_sync(BAR_P_FULL + 4 * pb, THREADS);
        const float a0 = alpha_s[pb * 64 + row0], a1 = alpha_s[pb * 64 + row0 + 8];
        if (__any_sync(0xffffffffu, a0 != 1.f || a1 != 1.f)) {
#pragma unroll
          for (int jj = 0; jj < 32; ++jj) {
            o[4 * jj + 0] *= a0;
            o[4 * jj + 1] *= a0;
            o[4 * jj + 2] *= a1;
            o[4 * jj + 3] *= a1;
          }
        }
        wgmma_fence();
#pragma unroll
        for (int k = 0; k < 2; ++k) {
          const uint64_t da = pdesc0 + ((pb * CHUNK + k * 32) >> 4);
          const uint64_t db = vdesc0 + (((g % NST) * STAGE + k * 16 * 128) >> 4);
          if (!(SPARSE_MLA_DBG & 4)) wgmma_m64n256k16_ss<0, 1>(o, da, db, 1);
        }
        wgmma_commit();
        wgmma_wait0();
        if (j + 1 == nblk) {
          // read the tile's l and m before releasing this P buffer: WG0 cannot write the l and
          // m of the tile after next (same parity) before that release
          bar_sync(BAR_DONE + 4 * c, THREADS);
          const int h0 = (x % p.n_hblk) * BM;
#pragma unroll
          for (int i = 0; i < 2; ++i) {
            const int r = row0 + 8 * i, h = h0 + r;
            const float m = m_s[c * 64 + r];
            const float m_use = m == -INFINITY ? 0.f : m;
            float denom = l_s[c * 64 + r];
            if (p.sink != nullptr && h < p.H) denom += exp2f(__ldg(p.sink + h) * 1.4426950408889634f - m_use);
            inv[i] = denom > 0.f ? 1.f / denom : 0.f;
          }
        }
        bar_arrive(BAR_P_FREE + 4 * pb, THREADS);
        if (gx < p.n_tiles) {  // the stream block g + NST, into the slot block g just left
          if (SPARSE_MLA_DBG & 1) cp_async_arrive_noinc(bar0 + 8 * (gq % NST));
          else gather(gq, gid);
          ++gq;
          cursor_next();
          gid = load_row_id();
        }
      }
      // store O and start the next tile from zero
      const int t = x / p.n_hblk, h0 = (x % p.n_hblk) * BM;
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const int h = h0 + row0 + 8 * i;
        if (h < p.H) {
          __nv_bfloat16* orow = p.out + (long long)t * p.out_st + (long long)h * p.out_sh + w * 256 + colq;
#pragma unroll
          for (int jj = 0; jj < 32; ++jj)
            *reinterpret_cast<__nv_bfloat162*>(orow + 8 * jj) =
                __floats2bfloat162_rn(o[4 * jj + 2 * i] * inv[i], o[4 * jj + 2 * i + 1] * inv[i]);
        }
      }
#pragma unroll
      for (int i = 0; i < 128; ++i) o[i] = 0.f;
      x = next_tile(p, x + gridDim.x, len, empty_out);
      c ^= 1;
    }
    cp_async_wait_all();
  }
}

}  // namespace

extern "C" {

int dsa_sparse_mla_fwd_smem_bytes() { return SMEM_BYTES; }

// Launches on `stream`; returns a cudaError_t (0 = launched). No host synchronization.
// ctas > 0 caps the persistent grid (ctas >= T * ceil(H / 64): one tile per CTA); 0 = one CTA
// per SM.
int dsa_sparse_mla_fwd_sm90(const void* q, const void* kv, const void* idx, const void* topk_len,
                            const void* sink, void* out, void* lse, long long q_st, long long q_sh,
                            long long kv_s, long long idx_s, long long out_st, long long out_sh,
                            int T, int H, int Tk, int K, float scale_log2, int ctas, void* stream) {
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
  const long long tiles = static_cast<long long>(T) * p.n_hblk;
  if (tiles > 0x7fffffffLL) return static_cast<int>(cudaErrorInvalidValue);
  p.n_tiles = static_cast<int>(tiles);
  p.scale_log2 = scale_log2;
  int grid = ctas > 0 ? ctas : sm_count();
  if (grid <= 0) return static_cast<int>(cudaErrorInvalidValue);
  if (grid > p.n_tiles) grid = p.n_tiles;
  sparse_mla_fwd_sm90_kernel<<<grid, THREADS, SMEM_BYTES, static_cast<cudaStream_t>(stream)>>>(p);
  return static_cast<int>(cudaGetLastError());
}

}  // extern "C"
