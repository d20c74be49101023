// Row-packed sparse MLA forward (absorbed layout) for Hopper (sm_90a), <= 32 heads: warp-
// specialized, wgmma. Routed only with row packing on (packing.py; sparse_mla_fwd_cuda(...,
// packed=True)); the unpacked forward is sparse_mla_fwd_pp_sm90.cu (H > 16) and
// sparse_mla_fwd16_sm90.cu (H <= 16).
//
// Fast path: Dqk = 576, d_v = 512, bf16, int32 indices. One CTA of 384 threads (three
// warpgroups) per group of 64 / 16 or 64 / 32 query rows (16 or 32 heads each, heads >= H
// masked): tile row r holds row t + (r >> hshift), head r & (2^hshift - 1). The group's union of
// selected keys (pack_rows) is walked in blocks of 32 through a 5-slot ring of gathered kv tiles
// in shared memory; each tile row masks the union entries its own row did not select (uslot).
//
//   WG0   holds the query's first 512 channels in registers as wgmma A fragments (its 64 rope
//         channels sit in shared memory) and computes S = Q K^T for a 32-key block
//         (m64n32k16: register A for 32 k-steps, shared A for the 4 rope k-steps), the online
//         softmax (exp2 domain, whole rows per thread quad, so no cross-warpgroup max
//         exchange), and hands P [64 rows, 32 keys] (bf16) plus each row's rescale factor
//         to WG1/2 through shared memory. S of block j + 1 is issued before block j is handed
//         off, so it runs while the hand-off waits.
//   WG1/2 own output channels [256 w, 256 w + 256): rescale O, O += P V (m64n256k16, V read
//         MN-major from the same kv tile), and gather the next kv tiles with cp.async. Each
//         of the two writes only the channel chunks that it (and WG0's S) reads (WG1: 0-3
//         and the rope chunk 8, WG2: 4-7, plus the slot rows of uslot), so a slot is refilled
//         as soon as its own P V is done, without a cross-warpgroup barrier. Landing is
//         signalled on one mbarrier per slot (cp.async.mbarrier.arrive.noinc).
//   Registers: setmaxnreg moves 2 x 128 x 8 registers from WG1/2 (O is 128 fp32 each) to
//   WG0 (query fragments); the CTA's 384 x 168 allocation is never exceeded.
//   Shared-memory tiles are 64-channel column chunks [rows, 128 B] in the 128-byte swizzled
//   layout wgmma reads (16-byte granule g of row r stored at granule g ^ (r % 8)). Invalid
//   slots are zero-filled, so no NaN can come out of stale shared memory; masked heads and rows
//   past T are zero and not stored. No host synchronization, no workspace.
//   (This was the unpacked 64-head forward's design too, before the ping-pong kernel replaced
//   it; the unpacked instantiation is in git history.)
#include "sm90_common.cuh"

namespace {

using namespace dsa_sm90;

constexpr int D_QK = 576;
constexpr int BM = 64;                       // heads per CTA (wgmma M)
constexpr int NCH = D_QK / 64;               // 9 column chunks of 64 channels (128 B)
constexpr int CHUNK = 64 * 128;              // a [64 rows, 128 B] chunk (query rope, P)
constexpr int BN = 32;                       // keys per block
constexpr int NST = 5;                       // kv ring slots
constexpr int CH = BN * 128;                 // one 64-channel chunk of a slot: 32 rows x 128 B
constexpr int STAGE = NCH * CH;              // 36 KB per slot
constexpr int THREADS = 384;
constexpr int NP = 2;                        // P / alpha buffers: WG0 may run a block ahead
                                             // (measured equal to 1 at S=16K; kept)
constexpr int OFF_KV = 0;
constexpr int OFF_P = OFF_KV + NST * STAGE;  // NP x [64 heads, 32 keys] bf16 in 128-byte rows
constexpr int OFF_QR = OFF_P + NP * CHUNK;   // [64 heads, 64] bf16: the query's rope channels
constexpr int OFF_ALPHA = OFF_QR + CHUNK;    // NP x [64] fp32 rescale factors
constexpr int OFF_L = OFF_ALPHA + NP * 64 * 4;  // [64] fp32 final row sums
constexpr int OFF_M = OFF_L + 64 * 4;        // [64] fp32 final row maxima (log2 domain)
constexpr int OFF_IDS = OFF_M + 64 * 4;      // [NST][BN] int32 (unused since the unpacked kernel
                                             // went; kept: the layout, hence the SASS, as measured)
constexpr int OFF_BAR = OFF_IDS + NST * BN * 4;  // NST mbarriers: slot full
constexpr int OFF_US = OFF_BAR + NST * 8;        // packed: [NST][4 rows][BN] int16, each row's slots
constexpr int SMEM_USED = OFF_US + NST * 4 * BN * 2;
constexpr int SMEM_BYTES = SMEM_USED + 1024;     // slack to align the base to 1024 B
static_assert(SMEM_BYTES <= 232448, "shared memory");
// named barriers: P_FREE / P_FULL of P buffer b are ids 1 + 4 b / 2 + 4 b; 3 = done; 4 = WG0;
// 7 / 8 = WG1 / WG2 staged their output
constexpr int BAR_P_FREE = 1, BAR_P_FULL = 2, BAR_DONE = 3, BAR_WG0 = 4;
constexpr int BAR_STORE = 7;  // + w: warpgroup 1 + w has staged its O tile (ids 7, 8)

// the forward's parameters plus row packing's (packing.py): idx = the groups' unions [G, idx_s],
// topk_len = their lengths [G], K = idx_s, uslot [G, rows, idx_s]
struct PackedParams : FwdParams {
  const int16_t* uslot;
  int hshift, rows;
};

// The CTA serves a group of p.rows query rows, tile row r holding row t + (r >> hshift), head
// r & (2^hshift - 1); the key list is the group's union and row j takes entry e where
// uslot[L, j, e] >= 0 (copied per slot). A thread's rows row0, row0 + 8 lie in one 16-row warp
// slice, so in one query row.
__global__ void __launch_bounds__(THREADS, 1) sparse_mla_fwd_packed_sm90_kernel(const PackedParams p) {
  extern __shared__ uint8_t smem_raw[];
  // (aligned by offsetting the __shared__ array itself: its accesses stay shared-space, LDS / STS)
  uint8_t* smem = smem_raw + ((1024u - (smem_u32(smem_raw) & 1023u)) & 1023u);
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
  // the key list's row: the group (one CTA per group)
  const int L = static_cast<int>(blockIdx.x);
  const int t = L * p.rows;  // the group's first query row
  // tile row r -> (query row, head)
  auto tile_row = [&](int r, int& tr, int& h) {
    tr = t + (r >> p.hshift);
    h = r & ((1 << p.hshift) - 1);
  };

  int kv_len = p.K;
  if (p.topk_len != nullptr) kv_len = min(kv_len, max(0, __ldg(p.topk_len + L)));
  const int nblk = (kv_len + BN - 1) / BN;
  const int32_t* idx_row = p.idx + (long long)L * p.idx_s;

  if (tid == 0) {
#pragma unroll
    for (int s = 0; s < NST; ++s) mbar_init(bar0 + 8 * s, 256);  // slot full: all 256 gatherers
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
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int f = wt + 128 * i, r = f >> 3, g = f & 7;
      int tr, h;
      tile_row(r, tr, h);
      uint4 v = make_uint4(0u, 0u, 0u, 0u);
      if (h < p.H && tr < p.T)
        v = __ldg(reinterpret_cast<const uint4*>(p.q + (long long)tr * p.q_st + (long long)h * p.q_sh + (NCH - 1) * 64 + g * 8));
      *reinterpret_cast<uint4*>(smem + OFF_QR + r * 128 + ((g ^ (r & 7)) << 4)) = v;
    }
    fence_async_smem();
    int tq, ha, hb;
    tile_row(row0, tq, ha);
    tile_row(row0 + 8, tq, hb);
    const bool oka = ha < p.H && tq < p.T, okb = hb < p.H && tq < p.T;
    const __nv_bfloat16* qrow = p.q + (long long)min(tq, p.T - 1) * p.q_st;
    const uint32_t* q0 = reinterpret_cast<const uint32_t*>(qrow + (long long)min(ha, p.H - 1) * p.q_sh);
    const uint32_t* q1 = reinterpret_cast<const uint32_t*>(qrow + (long long)min(hb, p.H - 1) * p.q_sh);
#pragma unroll
    for (int kk = 0; kk < KQ; ++kk) {
      const int c = (kk * 16 + colq) >> 1;  // in bf16 pairs
      qf[kk][0] = oka ? __ldg(q0 + c) : 0u;
      qf[kk][1] = okb ? __ldg(q1 + c) : 0u;
      qf[kk][2] = oka ? __ldg(q0 + c + 4) : 0u;
      qf[kk][3] = okb ? __ldg(q1 + c + 4) : 0u;
    }
    bar_sync(BAR_WG0, 128);  // WG0's rope tile is written
    const uint64_t qrdesc0 = desc(sbase + OFF_QR, 16, 1024);
    float m_run[2] = {-INFINITY, -INFINITY};
    float l_run[2] = {0.f, 0.f};
    const uint64_t kdesc0 = desc(sbase + OFF_KV, 16, 1024);
    // j >= nblk issues a dummy S on whatever a stage holds (result unused): the wgmma issue and
    // wait sequence stays the same on every path, which keeps ptxas from serializing it.
    auto issue_s = [&](int j, float (&acc)[16]) {
      const int st = j % NST;
      if (j < nblk) {
        mbar_wait(bar0 + 8 * st, (j / NST) & 1);
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
          if (c < NCH - 1) wgmma_m64n32k16_rs<0>(acc, qf[c * 4 + k], db, (c | k) != 0);
          else wgmma_m64n32k16_ss<0, 0>(acc, qrdesc0 + ((k * 32) >> 4), db, 1);
        }
      wgmma_commit();
    };
    // softmax of block j in registers: acc becomes P (fp32), alpha the rescale of earlier rows
    float alpha[2];
    auto softmax = [&](int j, float (&acc)[16]) {
      const int st = j % NST;
      bool valid[8];
#pragma unroll
      for (int jj = 0; jj < 4; ++jj) {
        const int slot = j * BN + 8 * jj + colq;
        // this row's slots of the two entries (int16 pair), -1: not taken
        const uint32_t u = *reinterpret_cast<const uint32_t*>(
            smem + OFF_US + ((st * 4 + (row0 >> p.hshift)) * BN + 8 * jj + colq) * 2);
        valid[2 * jj] = slot < kv_len && !(u & 0x8000u);
        valid[2 * jj + 1] = slot + 1 < kv_len && !(u & 0x80000000u);
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
    // hand P (packed bf16 pairs) and alpha of block j to WG1/2
    auto handoff = [&](int j, const uint32_t (&pk)[8]) {
      const int pb = j % NP;
      // WG1/2 are done reading P and alpha of block j - NP (the buffer this block reuses)
      if (j >= NP) bar_sync(BAR_P_FREE + 4 * pb, THREADS);
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
    // one S accumulator (registers are scarce next to the query fragments): block j's P is
    // packed to bf16, then S of block j + 1 is issued and runs while block j is handed off.
    // Nothing is in flight across the loop's back edge (ptxas would serialize the wgmma).
    float acc[16];
    issue_s(0, acc);
    wgmma_wait0();
    for (int j = 0; j < nblk; ++j) {
      softmax(j, acc);
      uint32_t pk[8];
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int jj = 0; jj < 4; ++jj) {
          __nv_bfloat162 v = __floats2bfloat162_rn(acc[4 * jj + 2 * i], acc[4 * jj + 2 * i + 1]);
          pk[4 * i + jj] = *reinterpret_cast<uint32_t*>(&v);
        }
      issue_s(j + 1, acc);
      handoff(j, pk);
      wgmma_wait0();
    }
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      float l = l_run[i];
      l += __shfl_xor_sync(0xffffffffu, l, 1);
      l += __shfl_xor_sync(0xffffffffu, l, 2);
      const int r = row0 + 8 * i;
      if ((lane & 3) == 0) {
        l_s[r] = l;
        m_s[r] = m_run[i];
        int tr, h;
        tile_row(r, tr, h);
        if (h < p.H && tr < p.T) {
          const float m_use = m_run[i] == -INFINITY ? 0.f : m_run[i];
          p.lse[(long long)tr * p.H + h] = l > 0.f ? (m_use + log2f(l)) * 0.6931471805599453f : -INFINITY;
        }
      }
    }
    bar_sync(BAR_DONE, THREADS);  // l and m are in shared memory
  } else {
    // ---------------- gathers + P V ----------------
    const int w = wg - 1;  // output channels [256 w, 256 w + 256)
    asm volatile("setmaxnreg.dec.sync.aligned.u32 160;\n" ::: "memory");
    // gather mapping: 4 threads per row, all 32 rows of a block
    constexpr int TPR = 4;
    const int g_row = wt / TPR, g_sub = wt % TPR;
    auto load_row_id = [&](int j) -> int {
      const int slot = j * BN + g_row;
      return (j < nblk && slot < kv_len) ? __ldg(idx_row + slot) : -1;
    };
    auto gather = [&](int j, int id) {
      const bool ok = id >= 0 && id < p.Tk;
      const __nv_bfloat16* src = p.kv + (long long)(ok ? id : 0) * p.kv_s + g_sub * 8;
      const uint32_t dst = sbase + OFF_KV + (j % NST) * STAGE + g_row * 128;
      const int nchunk = w == 0 ? 5 : 4;
      constexpr int PER_CHUNK = 8 / TPR;  // granules per thread per chunk
#pragma unroll
      for (int i = 0; i < 5 * PER_CHUNK; ++i) {
        const int ci = i / PER_CHUNK;
        if (ci < nchunk) {
          const int c = w == 0 ? (ci < 4 ? ci : 8) : 4 + ci;
          const int gi = g_sub + TPR * (i % PER_CHUNK);  // granule inside the chunk
          cp_async16(dst + c * CH + ((gi ^ (g_row & 7)) << 4), src + c * 64 + TPR * 8 * (i % PER_CHUNK), ok);
        }
      }
      // each row's slots of the block's entries, for WG0's validity test
      if (w == 1 && wt < 16 * p.rows) {  // 4-byte copies: row wt / 16, entries 2 (wt % 16) + {0, 1}
        const int jr = wt >> 4, e = j * BN + 2 * (wt & 15);
        const uint32_t dst = sbase + OFF_US + (((j % NST) * 4 + jr) * BN + 2 * (wt & 15)) * 2;
        const int16_t* src = p.uslot + ((long long)L * p.rows + jr) * p.idx_s + (e < kv_len ? e : 0);
        asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(src),
                     "r"(e < kv_len ? 4 : 0) : "memory");
      }
      cp_async_arrive_noinc(bar0 + 8 * (j % NST));
    };
    // the first NST blocks fill the ring
    constexpr int PRE = NST;
    for (int j = 0; j < PRE && j < nblk; ++j) gather(j, load_row_id(j));
    int gid = load_row_id(PRE);  // the next gather's id, loaded an iteration ahead

    float o[128];
#pragma unroll
    for (int i = 0; i < 128; ++i) o[i] = 0.f;
    const uint64_t pdesc0 = desc(sbase + OFF_P, 16, 1024);
    const uint64_t vdesc0 = desc(sbase + OFF_KV + w * 4 * CH, CH, 1024);
    for (int j = 0; j < nblk; ++j) {
      const int pb = j % NP;
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
        const uint64_t db = vdesc0 + (((j % NST) * STAGE + k * 16 * 128) >> 4);
        wgmma_m64n256k16_ss<0, 1>(o, da, db, 1);
      }
      wgmma_commit();
      wgmma_wait0();
      if (j + NP < nblk) bar_arrive(BAR_P_FREE + 4 * pb, THREADS);
      const int b = j + PRE;  // the block this iteration gathers (into the slot of block b - NST)
      if (b < nblk) {
        gather(b, gid);
        gid = load_row_id(b + 1);
      }
    }
    cp_async_wait_all();
    bar_sync(BAR_DONE, THREADS);  // WG0 has written l and m (and every S, dummy included, is done)
    // O = o / denominator, staged through this warpgroup's own channel chunks of slots 0 and 1
    // (only it reads them as V, WG0's S reads are over, its gathers have landed) and written as 16-byte stores of whole 512-byte rows. O row r (this warpgroup's 256
    // channels, 512 B) sits at chunk r / 8 of its 8, 512 B apart, 16-byte granule k at k ^ (r % 8).
    auto stage_row = [&](int r) -> uint8_t* {
      const int ci = r >> 3;  // 0..7: slot ci / 4, own chunk ci % 4
      return smem + OFF_KV + (ci >> 2) * STAGE + ((w == 0 ? 0 : 4) + (ci & 3)) * CH + (r & 7) * 512;
    };
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int r = row0 + 8 * i;
      int tr, h;
      tile_row(r, tr, h);
      const float m = m_s[r];
      const float m_use = m == -INFINITY ? 0.f : m;
      float denom = l_s[r];
      if (p.sink != nullptr && h < p.H) denom += exp2f(__ldg(p.sink + h) * 1.4426950408889634f - m_use);
      const float inv = denom > 0.f ? 1.f / denom : 0.f;
      uint8_t* srow = stage_row(r);
#pragma unroll
      for (int jj = 0; jj < 32; ++jj)
        *reinterpret_cast<__nv_bfloat162*>(srow + ((jj ^ (r & 7)) << 4) + colq * 2) =
            __floats2bfloat162_rn(o[4 * jj + 2 * i] * inv, o[4 * jj + 2 * i + 1] * inv);
    }
    bar_sync(BAR_STORE + w, 128);  // this warpgroup's O tile is staged
    const int k = wt & 31;
#pragma unroll 4
    for (int r = wt >> 5; r < BM; r += 4) {
      int tr, h;
      tile_row(r, tr, h);
      if (h >= p.H || tr >= p.T) continue;
      const uint4 v = *reinterpret_cast<const uint4*>(stage_row(r) + ((k ^ (r & 7)) << 4));
      *reinterpret_cast<uint4*>(p.out + (long long)tr * p.out_st + (long long)h * p.out_sh + w * 256 + 8 * k) = v;
    }
  }
}

int launch_fwd(const PackedParams& p, unsigned grid, void* stream) {
  static bool attr_set[64] = {};  // per device: raise the dynamic shared-memory limit once
  const cudaError_t e = set_smem_once(attr_set, sparse_mla_fwd_packed_sm90_kernel, SMEM_BYTES);
  if (e != cudaSuccess) return static_cast<int>(e);
  if (grid == 0) return 0;
  sparse_mla_fwd_packed_sm90_kernel<<<grid, THREADS, SMEM_BYTES, static_cast<cudaStream_t>(stream)>>>(p);
  return static_cast<int>(cudaGetLastError());
}

bool out_aligned(const void* out, long long out_st, long long out_sh) {
  return (reinterpret_cast<uintptr_t>(out) & 15) == 0 && out_st % 8 == 0 && out_sh % 8 == 0;
}

}  // namespace

extern "C" {

int dsa_sparse_mla_fwd_packed_smem_bytes() { return SMEM_BYTES; }

// Launches on `stream`; returns a cudaError_t (0 = launched). No host synchronization.
// Row packing (H <= 32; packing.py): uid [G, ucap] int32 with count [G], uslot [G, rows, ucap]
// int16; hshift = log2 of the heads per row in the tile (4: 16, rows = 4; 5: 32, rows = 2).
// One CTA per group. out: 16-byte aligned rows (base, out_st and out_sh multiples of 8
// elements; else cudaErrorInvalidValue): the output is written in 16-byte pieces.
int dsa_sparse_mla_fwd_packed_sm90(const void* q, const void* kv, const void* uid, const void* count,
                                   const void* uslot, const void* sink, void* out, void* lse, long long q_st,
                                   long long q_sh, long long kv_s, long long ucap, long long out_st,
                                   long long out_sh, int T, int H, int Tk, int G, int hshift, float scale_log2,
                                   void* stream) {
  if (H < 1 || (hshift != 4 && hshift != 5) || H > (1 << hshift) || ucap % 2 != 0 || ucap >= (1LL << 31))
    return static_cast<int>(cudaErrorInvalidValue);
  if (!out_aligned(out, out_st, out_sh) && T > 0) return static_cast<int>(cudaErrorInvalidValue);
  PackedParams p;
  static_cast<FwdParams&>(p) = fwd_params(q, kv, uid, count, sink, out, lse, q_st, q_sh, kv_s, ucap, out_st,
                                          out_sh, T, H, Tk, static_cast<int>(ucap), scale_log2);
  p.n_hblk = 1;
  p.uslot = static_cast<const int16_t*>(uslot);
  p.hshift = hshift;
  p.rows = BM >> hshift;
  return launch_fwd(p, T == 0 ? 0u : static_cast<unsigned>(G), stream);
}

}  // extern "C"
