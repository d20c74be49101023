// Sparse MLA backward (absorbed layout) for Hopper (sm_90a): warp-specialized, wgmma.
//
// Two kernels: sparse_mla_bwd_sm90_kernel (32-key blocks, a producer warpgroup; block_keys=32,
// and the deterministic mode's per-SM lanes, unpacked or row-packed), described here, and
// sparse_mla_bwd64_sm90_kernel (64-key blocks, two warpgroups; the default mode, unpacked or
// row-packed, and the deterministic mode's integer stages DET_BOUND / DET_INT, its default),
// described above its own code below.
//
// Dqk = 576, d_v = 512, bf16, int32 indices. One CTA of 384 threads (three warpgroups) per
// (query row t, block of 64 heads); deterministic (DET): a persistent grid, below. The row's
// Q [64, 576] and dO [64, 512] stay in shared memory for the whole row; its selected keys are
// walked in blocks of 32 through a 2-slot ring of gathered kv tiles.
//
//   WG0   producer: loads Q and dO once, then gathers kv tiles (cp.async, zero-filled for
//         invalid slots) and the slot ids into the ring; landing is signalled per slot on an
//         mbarrier (cp.async.mbarrier.arrive.noinc).
//   WG1   S = Q K^T and dP = dO V^T (m64n32k16, both operands from shared memory), then
//         P = exp2(S log2e scale - logZ) and dS = scale P (dP - Delta) in registers (logZ and
//         Delta come from the stats kernel), P and dS (bf16) to shared memory for WG2, and
//         dQ[:, 0:320] += dS K with dS as the register A operand (m64n256k16 + m64n64k16, K
//         read MN-major from the kv tile). Optionally the head sum of P per slot (the indexer
//         loss's target) by shuffles and one fp32 add per (warp, slot).
//   WG2   dQ[:, 320:576] += dS K (dS read MN-major from shared memory, m64n256k16), then
//         dKV^T [576, 32] = Q^T dS + dO^T P in nine 64-channel tiles (m64n32k16, Q / dO read
//         MN-major), computed in pairs, two pairs in flight in turn (a pair's MMAs run while
//         the previous pair's adds issue); each pair is added into the fp32 dkv workspace
//         with red.global.add.v4.f32, one 128-byte line per key and warp ("dkv workspace").
//         The 8 keys' row offsets are read once per block into registers (an ld.shared per
//         add waited behind the adds in the memory-instruction pipe).
//   dQ is complete per CTA (it owns every key of its heads): written once, in bf16, no
//   atomics and no dq workspace. Registers: setmaxnreg gives the producer 32, WG1 240 and
//   WG2 232 (sum 504 = the 3 x 168 the CTA is launched with; WG1 holds 160 dQ accumulators,
//   WG2 128 plus two 32-register tile pairs).
//   Shared-memory tiles are 64-channel column chunks [rows, 128 B] in the 128-byte swizzled
//   layout wgmma reads (16-byte granule g of row r stored at granule g ^ (r % 8)); P and dS
//   are stored [32 keys, 64 heads] in the same layout, which is K-major for dKV^T's B
//   operand and MN-major for dQ's A operand.
//
// dkv workspace: the L2 adds cost per request more than per byte: a warp instruction adding
// 32 B to each of 4 keys costs about what 128 B to each of 4 keys costs (add-only
// microbenchmark, kept in git history: 80 vs 48 ms for the S = 16K, 128-head add
// volume, 4 issuing warps per SM). A dKV^T accumulator gives a warp only 16 channels (64 B)
// of a key per tile, so the tiles go in pairs and the workspace stores its columns permuted:
// for c < 512, logical channel 128 pp + 64 a + 16 w + 8 i + r (pair pp, tile a of the pair,
// warp w, fragment row half i, r = lane / 4) lives at 128 pp + 32 w + 4 r + 2 a + i, so a
// thread's four values of a key form one 16-byte vector and the 8 lanes sharing a key cover
// one 128-byte line. The rope tile (c >= 512, unpaired): 512 + 16 w + 8 i + r lives at
// 512 + 16 w + 2 r + i (v2 adds, 64 B per key). The host undoes the permutation when it
// casts the workspace (cuda_impl.unpermute_dkv).
//
// Deterministic (DET, lanes > 0): grid = lanes persistent CTAs; CTA j walks rows j, j + lanes,
// ... and every head block of each, adding into its own dkv lane [Tk, 576] of the workspace
// [lanes, Tk, 576]; the caller sums the lanes in order. Each WG1 / WG2 thread fences its adds
// (fence.acq_rel.gpu) and arrives on a q-empty barrier before the producer loads the next
// item's Q / dO, so one item's adds precede the next item's. The target's per-warp head sums
// go through shared memory and are added per query row in warp order. The rings continue
// across items (positions modulo 4).
#include "sm90_common.cuh"

// Registers per thread after setmaxnreg: producer, WG1, WG2. The CTA is launched with 168 per
// thread (384 threads, one CTA per SM), so the sum must stay <= 3 x 168 = 504.
#define SPARSE_MLA_BWD_RP 32
#define SPARSE_MLA_BWD_R1 240
#define SPARSE_MLA_BWD_R2 232
#define DSA_STR2(x) #x
#define DSA_STR(x) DSA_STR2(x)
static_assert(SPARSE_MLA_BWD_RP + SPARSE_MLA_BWD_R1 + SPARSE_MLA_BWD_R2 <= 3 * 168, "register split: setmaxnreg.inc would wait forever");

namespace {

using namespace dsa_sm90;

constexpr int D_QK = 576;
constexpr int BM = 64;                        // heads per CTA (wgmma M)
constexpr int BN = 32;                        // keys per block
constexpr int NCH = D_QK / 64;                // 9 chunks of 64 channels (128 B)
constexpr int NCV = 8;                        // chunks of the 512 value channels
constexpr int QCH = BM * 128;                 // one [64 rows, 128 B] chunk of Q / dO
constexpr int CH = BN * 128;                  // one [32 rows, 128 B] chunk of a kv slot / P / dS
constexpr int STAGE = NCH * CH;               // 36 KB per kv slot
constexpr int NST = 2;                        // kv ring slots
constexpr int NDS = 1;                        // {dS, P} buffers (one: 2.6-4.3% faster than two, H100 A/B)
constexpr int NIDS = 4;                       // ids ring: WG2 reads a block's ids after its kv slot is released
constexpr int THREADS = 384;
constexpr int OFF_Q = 0;
constexpr int OFF_DO = OFF_Q + NCH * QCH;
constexpr int OFF_KV = OFF_DO + NCV * QCH;
constexpr int OFF_DS = OFF_KV + NST * STAGE;  // NDS x {dS, P}, each [32 keys, 64 heads] bf16
constexpr int OFF_IDS = OFF_DS + NDS * 2 * CH;
// deterministic, with the target: two buffers of the 4 warps' head sums per block slot, added
// across the warps of a query row in a fixed order
constexpr int OFF_TGT = OFF_IDS + NIDS * BN * 4;
constexpr int TGT_BYTES = 4 * BN * 4;
constexpr int OFF_BAR = OFF_TGT + 2 * TGT_BYTES;
// mbarriers, in this order from OFF_BAR: kv full [NST] (the slot's rows and ids landed), kv
// empty [NST] (WG1 and WG2 are done reading it), ds full [NDS] (WG1 wrote dS and P), ds empty
// [NDS] (WG2 is done reading them), q full (Q and dO landed), q empty (WG1 and WG2 are done with
// the work item's Q and dO)
constexpr int SMEM_USED = OFF_BAR + 8 * (2 * NST + 2 * NDS + 2);
constexpr int SMEM_BYTES = SMEM_USED + 1024;  // slack to align the base to 1024 B
static_assert(SMEM_BYTES <= 232448, "shared memory");

struct BwdParams {
  const __nv_bfloat16* q;     // [T, H, 576], channel stride 1
  const __nv_bfloat16* kv;    // [Tk, 576], channel stride 1
  const int32_t* idx;         // [T, K]; packed: the groups' key unions uid [G, idx_s]
  const int32_t* kv_len;      // [T]: slots >= kv_len[t] are skipped (topk_length / trailing -1); packed: count [G]
  const int16_t* uslot;       // packed only: [G, rows, idx_s], the slot of row j holding entry e, or -1
  const __nv_bfloat16* dout;  // [T, H, 512], channel stride 1
  const float* stats;         // [2, T, H]: log2-domain logZ (0 on empty rows), Delta
  const float* lse;           // [T, H] (natural log; target with a sink only)
  __nv_bfloat16* dq;          // [T, H, 576]
  float* dkv;                 // [Tk, 576] fp32, contiguous, zero-initialised, columns permuted (above)
  float* target;              // [T, K] fp32 or null: += sum_h P (times exp(logZ - lse) with a sink)
  long long q_st, q_sh, kv_s, idx_s, do_st, do_sh, dq_st, dq_sh;
  int T, H, Tk, K, n_hblk, has_sink;
  int n_rows;                 // key-list rows: T, or (packed) the groups G
  int r0;                     // default mode: the first key-list row of this launch (launches of rows)
  int l2_hints;               // 64-key kernel: dkv adds evict_last, kv gathers evict_first (else evict_normal)
  int hshift, rows;           // packed only: log2 of the heads per row in the tile (4 or 5), rows per group
  float scale, scale_log2;
  // the deterministic 64-key kernel's two stages (DET_BOUND, DET_INT; "deterministic" above the
  // 64-key kernel), else null
  const float* hq;            // [T, H]: max_c |q[t, h, c]| (DET_BOUND)
  const float* hdo;           // [T, H]: max_c |dO[t, h, c]| (DET_BOUND)
  unsigned long long* bound;  // [Tk]: += the keys' bounds, in units of 1 / *bound_scale (DET_BOUND)
  const float* bound_scale;   // [1], on the device: fixed-point units per unit of bound (DET_BOUND)
  const float* inv_q;         // [Tk]: 1 / the key's quantum, a power of two (DET_INT)
  unsigned long long* target_fx;  // [T, K] or null: += the target in units of 2^-40 (DET_INT)
};
// the 64-key kernel's modes: the default (fp32 adds), and the deterministic mode's two stages
constexpr int DET_OFF = 0, DET_BOUND = 1, DET_INT = 2;
constexpr float TARGET_FX_UNITS = 1099511627776.f;  // 2^40 units of the DET_INT target per unit

__device__ __forceinline__ void red_add(float* ptr, float v) {
  asm volatile("red.global.add.f32 [%0], %1;\n" ::"l"(ptr), "f"(v) : "memory");
}
__device__ __forceinline__ void st_shared_f32(uint32_t addr, float v) {
  asm volatile("st.shared.f32 [%0], %1;\n" ::"r"(addr), "f"(v) : "memory");
}
__device__ __forceinline__ uint32_t ld_shared_u32(uint32_t addr) {
  uint32_t v;
  asm volatile("ld.shared.u32 %0, [%1];\n" : "=r"(v) : "r"(addr) : "memory");
  return v;
}
__device__ __forceinline__ float ld_shared_f32(uint32_t addr) {
  float v;
  asm volatile("ld.shared.f32 %0, [%1];\n" : "=f"(v) : "r"(addr) : "memory");
  return v;
}
__device__ __forceinline__ void st_shared_u16(uint32_t addr, uint16_t v) {
  asm volatile("st.shared.u16 [%0], %1;\n" ::"r"(addr), "h"(v) : "memory");
}
__device__ __forceinline__ void red_add_v4(float* ptr, float a, float b, float c, float d) {
  asm volatile("red.global.add.v4.f32 [%0], {%1, %2, %3, %4};\n" ::"l"(ptr), "f"(a), "f"(b), "f"(c), "f"(d) : "memory");
}
__device__ __forceinline__ void red_add_v4_pol(float* ptr, float a, float b, float c, float d, uint64_t pol) {
  asm volatile("red.global.add.L2::cache_hint.v4.f32 [%0], {%1, %2, %3, %4}, %5;\n" ::"l"(ptr), "f"(a), "f"(b), "f"(c),
               "f"(d), "l"(pol) : "memory");
}
__device__ __forceinline__ void cp_async16_pol(uint32_t dst, const void* src, bool valid, uint64_t pol) {
  const int n = valid ? 16 : 0;  // 0 source bytes: the 16 destination bytes are zero-filled
  asm volatile("cp.async.cg.shared.global.L2::cache_hint [%0], [%1], 16, %2, %3;\n" ::"r"(dst), "l"(src), "r"(n),
               "l"(pol) : "memory");
}
// L2 cache policies (createpolicy): evict_last / evict_first where `on`, else evict_normal
__device__ __forceinline__ uint64_t policy_last(bool on) {
  uint64_t a, b;
  asm volatile("createpolicy.fractional.L2::evict_last.b64 %0, 1.0;\n" : "=l"(a));
  asm volatile("createpolicy.fractional.L2::evict_normal.b64 %0, 1.0;\n" : "=l"(b));
  return on ? a : b;
}
__device__ __forceinline__ uint64_t policy_first(bool on) {
  uint64_t a, b;
  asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;\n" : "=l"(a));
  asm volatile("createpolicy.fractional.L2::evict_normal.b64 %0, 1.0;\n" : "=l"(b));
  return on ? a : b;
}
__device__ __forceinline__ void red_add_u64(unsigned long long* ptr, unsigned long long v) {
  asm volatile("red.global.add.u64 [%0], %1;\n" ::"l"(ptr), "l"(v) : "memory");
}
__device__ __forceinline__ void red_add_v2(float* ptr, float a, float b) {
  asm volatile("red.global.add.v2.f32 [%0], {%1, %2};\n" ::"l"(ptr), "f"(a), "f"(b) : "memory");
}

// The ids of a thread's 8 slots in a block (accumulator columns 8 jj + colq + bb, at index
// 2 jj + bb) from the block's ids in shared memory; -1 where the slot is past the row's length
// or its id is outside [0, Tk). slot0 = the block's first slot + colq.
__device__ __forceinline__ void slot_ids(uint32_t ids_w, int slot0, int colq, int kv_len, int Tk, int (&id)[8]) {
#pragma unroll
  for (int jj = 0; jj < 4; ++jj) {
    int2 id2;
    asm volatile("ld.shared.v2.b32 {%0, %1}, [%2];\n" : "=r"(id2.x), "=r"(id2.y) : "r"(ids_w + (8 * jj + colq) * 4));
    const int slot = slot0 + 8 * jj;
    id[2 * jj] = (slot < kv_len && id2.x >= 0 && id2.x < Tk) ? id2.x : -1;
    id[2 * jj + 1] = (slot + 1 < kv_len && id2.y >= 0 && id2.y < Tk) ? id2.y : -1;
  }
}

// Shared by both kernels (both keep Q at shared offset 0 and dO after it, in the same layout):
// the Q [64, 576] and dO [64, 512] tiles of query row t, heads h0 .. h0 + 63 (rows past H
// zero-filled), cp.async by the 128 threads wt of one warpgroup (no commit or wait). FIRST: as
// L2 evict_first (read once per CTA: they should not displace the dkv workspace's lines).
static_assert(OFF_Q == 0 && OFF_DO == NCH * QCH, "load_q_do's layout");
template <bool FIRST = false>
__device__ __forceinline__ void cp_async16_qdo(uint32_t dst, const void* src, bool valid, uint64_t pol) {
  if constexpr (FIRST) cp_async16_pol(dst, src, valid, pol);
  else cp_async16(dst, src, valid);
}
template <bool FIRST = false>
__device__ __forceinline__ void load_q_do(uint32_t sbase, const BwdParams& p, int t, int h0, int wt) {
  const uint64_t pol = FIRST ? policy_first(true) : 0;
  const __nv_bfloat16* qrow = p.q + (long long)t * p.q_st;
  const __nv_bfloat16* dorow = p.dout + (long long)t * p.do_st;
#pragma unroll 1
  for (int f = wt; f < BM * NCH * 8; f += 128) {  // Q: 64 rows x 72 granules
    const int r = f / (NCH * 8), gg = f % (NCH * 8), c = gg >> 3, g = gg & 7;
    const bool ok = h0 + r < p.H;
    cp_async16_qdo<FIRST>(sbase + c * QCH + r * 128 + ((g ^ (r & 7)) << 4),
                          qrow + (long long)(ok ? h0 + r : 0) * p.q_sh + gg * 8, ok, pol);
  }
#pragma unroll 1
  for (int f = wt; f < BM * NCV * 8; f += 128) {  // dO: 64 rows x 64 granules
    const int r = f / (NCV * 8), gg = f % (NCV * 8), c = gg >> 3, g = gg & 7;
    const bool ok = h0 + r < p.H;
    cp_async16_qdo<FIRST>(sbase + NCH * QCH + c * QCH + r * 128 + ((g ^ (r & 7)) << 4),
                          dorow + (long long)(ok ? h0 + r : 0) * p.do_sh + gg * 8, ok, pol);
  }
}

// load_q_do for a packed group of rows t, t + 1, ...: tile row r from (query row, head) of
// tile_row (rows past T or heads past H zero-filled).
template <bool FIRST = false>
__device__ __forceinline__ void load_q_do_packed(uint32_t sbase, const BwdParams& p, int t, int wt) {
  const uint64_t pol = FIRST ? policy_first(true) : 0;
#pragma unroll 1
  for (int f = wt; f < BM * NCH * 8; f += 128) {  // Q: 64 rows x 72 granules
    const int r = f / (NCH * 8), gg = f % (NCH * 8), c = gg >> 3, g = gg & 7;
    int tr, h;
    tile_row<true>(p, t, 0, r, tr, h);
    const bool ok = h < p.H && tr < p.T;
    cp_async16_qdo<FIRST>(sbase + OFF_Q + c * QCH + r * 128 + ((g ^ (r & 7)) << 4),
                          p.q + (ok ? (long long)tr * p.q_st + (long long)h * p.q_sh : 0) + gg * 8, ok, pol);
  }
#pragma unroll 1
  for (int f = wt; f < BM * NCV * 8; f += 128) {  // dO: 64 rows x 64 granules
    const int r = f / (NCV * 8), gg = f % (NCV * 8), c = gg >> 3, g = gg & 7;
    int tr, h;
    tile_row<true>(p, t, 0, r, tr, h);
    const bool ok = h < p.H && tr < p.T;
    cp_async16_qdo<FIRST>(sbase + OFF_DO + c * QCH + r * 128 + ((g ^ (r & 7)) << 4),
                          p.dout + (ok ? (long long)tr * p.do_st + (long long)h * p.do_sh : 0) + gg * 8, ok, pol);
  }
}

// P and dS in place of the S and dP accumulators of NJ 8-key column groups (accumulator
// [4 jj + 2 i + bb]: head row0 + 8 i, key 8 jj + colq + bb): P = exp2(S scale log2e - logZ) on
// valid (key, head) pairs, else 0; dS = scale P (dP - Delta).
template <int NJ>
__device__ __forceinline__ void softmax_grad(float (&s)[4 * NJ], float (&dp)[4 * NJ], const bool (&valid)[2 * NJ],
                                             const bool (&hv)[2], const float (&z2)[2], const float (&dlt)[2],
                                             float scale_log2, float scale) {
#pragma unroll
  for (int jj = 0; jj < NJ; ++jj)
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int bb = 0; bb < 2; ++bb) {
        const int e = 4 * jj + 2 * i + bb;
        const float pe = (valid[2 * jj + bb] && hv[i]) ? exp2f(s[e] * scale_log2 - z2[i]) : 0.f;
        s[e] = pe;
        dp[e] = pe * (dp[e] - dlt[i]) * scale;
      }
}

// The sum of v over the 8 lane quads of a warp (its 16 heads: the target's head sum).
__device__ __forceinline__ float quad_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 4);
  v += __shfl_xor_sync(0xffffffffu, v, 8);
  v += __shfl_xor_sync(0xffffffffu, v, 16);
  return v;
}

// NJ 8-column groups of a dQ accumulator (its fragment row half i) as bf16 pairs at dqrow + 8 jj.
template <int NJ>
__device__ __forceinline__ void store_dq(__nv_bfloat16* dqrow, const float (&acc)[4 * NJ], int i) {
#pragma unroll
  for (int jj = 0; jj < NJ; ++jj)
    *reinterpret_cast<__nv_bfloat162*>(dqrow + 8 * jj) = __floats2bfloat162_rn(acc[4 * jj + 2 * i], acc[4 * jj + 2 * i + 1]);
}

// PACK (row packing, <= 32 heads; packing.py): the CTA serves a group of p.rows query rows, tile
// row r holding row tbase + (r >> hshift), head r & (2^hshift - 1); its key list is the group's
// union (p.idx row L, p.kv_len[L] entries) and row j takes entry e where uslot[L, j, e] >= 0. A
// thread's accumulator rows row0, row0 + 8 lie in one 16-row warp slice, so in one query row.
template <bool PACK, bool DET>
__global__ void __launch_bounds__(THREADS, 1) sparse_mla_bwd_sm90_kernel(const BwdParams p) {
  constexpr int ND = NDS;
  constexpr int BAR_KV_FULL = OFF_BAR;
  constexpr int BAR_KV_EMPTY = BAR_KV_FULL + 8 * NST;
  constexpr int BAR_DS_FULL = BAR_KV_EMPTY + 8 * NST;
  constexpr int BAR_DS_EMPTY = BAR_DS_FULL + 8 * ND;
  constexpr int BAR_Q = BAR_DS_EMPTY + 8 * ND;
  constexpr int BAR_Q_EMPTY = BAR_Q + 8;
  extern __shared__ uint8_t smem_raw[];
  // shared memory is addressed by 32-bit shared-window addresses only (no 64-bit generic
  // pointers held across the role split: they cost registers in the 32-register producer)
  const uint32_t sbase = (smem_u32(smem_raw) + 1023u) & ~1023u;

  const int tid = threadIdx.x;
  const int wg = tid >> 7;
  const int wt = tid & 127;
  const int warp = wt >> 5, lane = tid & 31;
  const int row0 = warp * 16 + (lane >> 2);  // accumulator rows of this thread: row0, row0 + 8
  // this thread's accumulator columns are 2 (lane % 4) + {0, 1} (+ 8 j): "colq". WG2 reads its
  // lane id again after its setmaxnreg (holding colq across the role split spilled it)
  auto lane_colq = []() {
    uint32_t l;
    asm volatile("mov.u32 %0, %%laneid;\n" : "=r"(l));
    return static_cast<int>(2 * (l & 3));
  };
  // Work items: (key-list row L, head block hb). L is the query row, or (packed) the group of
  // rows. Default: one item per CTA (blockIdx = L * n_hblk + hb). Deterministic: a persistent
  // grid; CTA j takes rows j, j + gridDim, ... and every head block of each, in this order, so
  // that its adds into its own dkv lane (and into a row's target) come in a fixed order. Each
  // role walks the items itself: fn(item, gb, par) runs an item whose blocks follow ring
  // position gb (the blocks before it, modulo 4 = lcm(NST, ND, NIDS)) and whose Q / dO barrier
  // phase has parity par, and returns its block count. (Each role reads the row's length after
  // its setmaxnreg: values held across the role split spill in the 32-register producer.)
  static_assert(4 % NST == 0 && 4 % ND == 0 && 4 % NIDS == 0, "ring positions modulo 4");
  // key-list row L, its first query row t (packed: of the group), first head h0, length, blocks
  struct Item {
    int L, t, h0, kv_len, nblk;
  };
  auto run = [&](auto&& fn, int L, int hb, int gb, int par) -> int {
    const int kv_len = min(max(__ldg(p.kv_len + L), 0), PACK ? static_cast<int>(p.idx_s) : p.K);
    return fn(Item{L, PACK ? L * p.rows : L, hb * BM, kv_len, (kv_len + BN - 1) / BN}, gb, par);
  };
  auto walk = [&](auto&& fn) {
    if constexpr (DET) {
      // (the item's parity is recomputed from (L, hb), not carried: WG1 has no register to spare)
      const int nh = PACK ? 1 : p.n_hblk;
      int L = static_cast<int>(blockIdx.x), hb = 0, gb = 0;
      while (L < p.n_rows) {
        const int par = (((L - static_cast<int>(blockIdx.x)) / static_cast<int>(gridDim.x)) * nh + hb) & 1;
        gb = (gb + run(fn, L, hb, gb, par)) & 3;
        if (++hb == nh) {
          hb = 0;
          L += static_cast<int>(gridDim.x);
        }
      }
    } else {
      run(fn, p.r0 + static_cast<int>(blockIdx.x) / p.n_hblk, static_cast<int>(blockIdx.x) % p.n_hblk, 0, 0);
    }
  };

  if (tid == 0) {
#pragma unroll
    for (int s = 0; s < NST; ++s) {
      mbar_init(sbase + BAR_KV_FULL + 8 * s, 128);
      mbar_init(sbase + BAR_KV_EMPTY + 8 * s, 256);
    }
#pragma unroll
    for (int s = 0; s < ND; ++s) {
      mbar_init(sbase + BAR_DS_FULL + 8 * s, 128);
      mbar_init(sbase + BAR_DS_EMPTY + 8 * s, 128);
    }
    mbar_init(sbase + BAR_Q, 128);
    mbar_init(sbase + BAR_Q_EMPTY, 256);
  }
  __syncthreads();

  if (wg == 0) {
    // ---------------- producer ----------------
    asm volatile("setmaxnreg.dec.sync.aligned.u32 " DSA_STR(SPARSE_MLA_BWD_RP) ";\n" ::: "memory");
    walk([&](const Item& item, const int gb, const int par) -> int {
    const int L = item.L, t = item.t, h0 = item.h0, kv_len = item.kv_len, nblk = item.nblk;
    // deterministic: the previous item's Q and dO are read (the first wait, parity 1 on a fresh
    // barrier, passes at once)
    if (DET) mbar_wait(sbase + BAR_Q_EMPTY, par ^ 1);
    {
      if constexpr (PACK)
        load_q_do_packed(sbase, p, t, wt);
      else
        load_q_do(sbase, p, t, h0, wt);
      cp_async_arrive_noinc(sbase + BAR_Q);
    }
    // gathers: 8 threads per key row (rows g_row and g_row + 16), granule g_sub of each 128-byte
    // chunk: a warp's cp.async covers whole lines (4 rows x 128 B)
    const int32_t* idx_row = p.idx + (long long)L * p.idx_s;
    const int g_row = wt >> 3, g_sub = wt & 7;
    auto load_row_id = [&](int b, int k) -> int {
      const int slot = b * BN + g_row + 16 * k;
      return (b < nblk && slot < kv_len) ? __ldg(idx_row + slot) : -1;
    };
    int gid0 = load_row_id(0, 0), gid1 = load_row_id(0, 1);
    for (int b = 0; b < nblk; ++b) {
      const int g = gb + b, st = g % NST;
      // (deterministic: g is the ring position modulo 4, so wait always: a slot's first wait,
      // parity 1 on a fresh barrier, passes at once)
      if (DET || g >= NST) mbar_wait(sbase + BAR_KV_EMPTY + 8 * st, ((g / NST) - 1) & 1);
#pragma unroll
      for (int k = 0; k < 2; ++k) {
        const int gid = k ? gid1 : gid0, r = g_row + 16 * k;
        const bool ok = gid >= 0 && gid < p.Tk;
        const __nv_bfloat16* src = p.kv + (long long)(ok ? gid : 0) * p.kv_s + g_sub * 8;
        const uint32_t dst = sbase + OFF_KV + st * STAGE + r * 128 + ((g_sub ^ (r & 7)) << 4);
#pragma unroll
        for (int c = 0; c < NCH; ++c) cp_async16(dst + c * CH, src + c * 64, ok);
      }
      if (wt < BN) {  // the block's ids (4-byte copies; slots past kv_len read as 0, masked by slot)
        const int slot = b * BN + wt;
        const uint32_t dst_id = sbase + OFF_IDS + ((g % NIDS) * BN + wt) * 4;
        asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst_id),
                     "l"(idx_row + (slot < kv_len ? slot : 0)), "r"(slot < kv_len ? 4 : 0) : "memory");
      }
      cp_async_arrive_noinc(sbase + BAR_KV_FULL + 8 * st);
      gid0 = load_row_id(b + 1, 0);
      gid1 = load_row_id(b + 1, 1);
    }
    return nblk;
    });
    cp_async_wait_all();
  } else if (wg == 1) {
    // ---------------- S, dP, softmax gradient, dQ[:, 0:256] ----------------
    asm volatile("setmaxnreg.inc.sync.aligned.u32 " DSA_STR(SPARSE_MLA_BWD_R1) ";\n" ::: "memory");
    const int colq = 2 * (lane & 3);
    walk([&](const Item& item, const int gb, const int par) -> int {
    const int L = item.L, t = item.t, h0 = item.h0, kv_len = item.kv_len, nblk = item.nblk;
    float z2[2], dlt[2], fh[2];
    bool hv[2];
    int trow = t;  // this thread's query row (the same for row0 and row0 + 8)
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      int h;
      tile_row<PACK>(p, t, h0, row0 + 8 * i, trow, h);
      hv[i] = h < p.H && (!PACK || trow < p.T);
      const long long o = (long long)trow * p.H + (hv[i] ? h : 0);
      z2[i] = hv[i] ? __ldg(p.stats + o) : 0.f;
      dlt[i] = hv[i] ? __ldg(p.stats + (long long)p.T * p.H + o) : 0.f;
      fh[i] = hv[i] ? 1.f : 0.f;
      if (p.target != nullptr && p.has_sink && hv[i]) {
        // the target is normalised without the sink: P exp(logZ - lse)
        const float l2 = __ldg(p.lse + o) * 1.4426950408889634f;
        fh[i] = l2 > -INFINITY ? exp2f(z2[i] - l2) : 0.f;
      }
    }
    float dqa[128], dqm[32];  // dQ[:, 0:256] and dQ[:, 256:320]
#pragma unroll
    for (int i = 0; i < 128; ++i) dqa[i] = 0.f;
#pragma unroll
    for (int i = 0; i < 32; ++i) dqm[i] = 0.f;
    const uint64_t qd0 = desc(sbase + OFF_Q, 16, 1024);
    const uint64_t dod0 = desc(sbase + OFF_DO, 16, 1024);
    const uint64_t kd0 = desc(sbase + OFF_KV, 16, 1024);
    const uint64_t kt0 = desc(sbase + OFF_KV, CH, 1024);  // kv as MN-major B [keys, channels]
    // packed: this thread's row of uslot, read as int16 pairs
    // (uslot row L * rows + trow - t = trow: the group's rows are consecutive)
    const uint32_t* us32 = PACK ? reinterpret_cast<const uint32_t*>(p.uslot + (long long)trow * p.idx_s) : nullptr;
    mbar_wait(sbase + BAR_Q, par);
    fence_async_smem();
    for (int b = 0; b < nblk; ++b) {
      const int g = gb + b, st = g % NST, pb = g % ND;
      // packed: this thread's row's slots of its entries 8 jj + colq + {0, 1} (int16 pairs, -1:
      // not taken), loaded before the MMAs so that their latency hides behind them
      uint32_t usl[4];
      if constexpr (PACK) {
#pragma unroll
        for (int jj = 0; jj < 4; ++jj) {
          const int e0 = b * BN + 8 * jj + colq;  // even; uslot rows have an even length
          usl[jj] = e0 < kv_len ? __ldg(us32 + (e0 >> 1)) : 0xffffffffu;
        }
      }
      mbar_wait(sbase + BAR_KV_FULL + 8 * st, (g / NST) & 1);
      fence_async_smem();
      float s[16], dp[16];
      wgmma_fence();
#pragma unroll
      for (int c = 0; c < NCH; ++c)
#pragma unroll
        for (int k = 0; k < 4; ++k)
          wgmma_m64n32k16_ss<0, 0>(s, qd0 + ((c * QCH + k * 32) >> 4), kd0 + ((st * STAGE + c * CH + k * 32) >> 4),
                                   (c | k) != 0);
#pragma unroll
      for (int c = 0; c < NCV; ++c)
#pragma unroll
        for (int k = 0; k < 4; ++k)
          wgmma_m64n32k16_ss<0, 0>(dp, dod0 + ((c * QCH + k * 32) >> 4), kd0 + ((st * STAGE + c * CH + k * 32) >> 4),
                                   (c | k) != 0);
      wgmma_commit();
      wgmma_wait0();
      // P and dS (in place of S and dP)
      bool valid[8];
      if constexpr (PACK) {
#pragma unroll
        for (int jj = 0; jj < 4; ++jj) {
          valid[2 * jj] = !(usl[jj] & 0x8000u);
          valid[2 * jj + 1] = !(usl[jj] & 0x80000000u);
        }
      } else {
        const uint32_t ids_w = sbase + OFF_IDS + (g % NIDS) * BN * 4;
        int idv[8];
        slot_ids(ids_w, b * BN + colq, colq, kv_len, p.Tk, idv);
#pragma unroll
        for (int e = 0; e < 8; ++e) valid[e] = idv[e] >= 0;
      }
      softmax_grad<4>(s, dp, valid, hv, z2, dlt, p.scale_log2, p.scale);
      if (p.target != nullptr) {
#pragma unroll
        for (int jj = 0; jj < 4; ++jj)
#pragma unroll
          for (int bb = 0; bb < 2; ++bb) {
            const float v = quad_sum(s[4 * jj + bb] * fh[0] + s[4 * jj + 2 + bb] * fh[1]);
            if constexpr (DET) {  // staged; summed across the row's warps below
              if (lane < 4)
                st_shared_f32(sbase + OFF_TGT + (g & 1) * TGT_BYTES + (warp * BN + 8 * jj + colq + bb) * 4, v);
            } else if constexpr (PACK) {
              const int slot = static_cast<int16_t>(usl[jj] >> (16 * bb));
              if (lane < 4 && slot >= 0) red_add(p.target + (long long)trow * p.K + slot, v);
            } else {
              const int slot = b * BN + 8 * jj + colq + bb;
              if (lane < 4 && slot < kv_len) red_add(p.target + (long long)t * p.K + slot, v);
            }
          }
        if constexpr (DET) {
          // the warps of one query row (4; packed: 64 >> hshift rows of 2^hshift / 16 warps
          // each) add their sums for a slot one after the other in warp order, in one fp32 add.
          // Two buffers: a block's writes follow the previous block's barrier, after which its
          // readers are done with the buffer written two blocks ago.
          bar_sync(1, 128);
          // (warps per query row: 4; packed, 2^hshift / 16 = 1 or 2)
          const int wpr = PACK ? 1 << (p.hshift - 4) : 4, q = wt / BN, e = wt % BN;
          if (q < 4 / wpr) {
            const uint32_t tw = sbase + OFF_TGT + (g & 1) * TGT_BYTES + (q * wpr * BN + e) * 4;
            float sum = ld_shared_f32(tw);
            if (wpr > 1) sum += ld_shared_f32(tw + BN * 4);
            if (wpr > 2) sum = sum + ld_shared_f32(tw + 2 * BN * 4) + ld_shared_f32(tw + 3 * BN * 4);
            const int entry = b * BN + e;
            if constexpr (PACK) {
              const int tr = t + q;
              const int slot = tr < p.T && entry < kv_len ? __ldg(p.uslot + (long long)tr * p.idx_s + entry) : -1;
              if (slot >= 0) red_add(p.target + (long long)tr * p.K + slot, sum);
            } else {
              if (entry < kv_len) red_add(p.target + (long long)t * p.K + entry, sum);
            }
          }
        }
      }
      uint32_t pk_s[2][4], pk_p[2][4];
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int jj = 0; jj < 4; ++jj) {
          __nv_bfloat162 vs = __floats2bfloat162_rn(dp[4 * jj + 2 * i], dp[4 * jj + 2 * i + 1]);
          __nv_bfloat162 vp = __floats2bfloat162_rn(s[4 * jj + 2 * i], s[4 * jj + 2 * i + 1]);
          pk_s[i][jj] = *reinterpret_cast<uint32_t*>(&vs);
          pk_p[i][jj] = *reinterpret_cast<uint32_t*>(&vp);
        }
      // hand dS and P to WG2 as [key, head] tiles
      if (DET || g >= ND) mbar_wait(sbase + BAR_DS_EMPTY + 8 * pb, ((g / ND) - 1) & 1);  // (as the producer's)
      const uint32_t dsb = sbase + OFF_DS + pb * 2 * CH;
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const int h = row0 + 8 * i;
#pragma unroll
        for (int bb = 0; bb < 2; ++bb) {
          // key 8 jj + colq + bb: colq + bb < 8 is the key's row in its 8-row swizzle group, so
          // one address per (i, bb) and the keys' 1024-byte steps as immediates
          const uint32_t a = dsb + (colq + bb) * 128 + (((h >> 3) ^ (colq + bb)) << 4) + (h & 7) * 2;
#pragma unroll
          for (int jj = 0; jj < 4; ++jj) {
            st_shared_u16(a + jj * 1024, static_cast<uint16_t>(pk_s[i][jj] >> (16 * bb)));
            st_shared_u16(a + CH + jj * 1024, static_cast<uint16_t>(pk_p[i][jj] >> (16 * bb)));
          }
        }
      }
      fence_async_smem();
      mbar_arrive(sbase + BAR_DS_FULL + 8 * pb);
      // dQ[:, 0:256] += dS K (dS from registers: accumulator columns [16 k, 16 k + 16) are
      // the A fragment of k-step k)
      wgmma_fence();
#pragma unroll
      for (int k = 0; k < 2; ++k) {
        const uint32_t a[4] = {pk_s[0][2 * k], pk_s[1][2 * k], pk_s[0][2 * k + 1], pk_s[1][2 * k + 1]};
        wgmma_m64n256k16_rs<1>(dqa, a, kt0 + ((st * STAGE + k * 16 * 128) >> 4), 1);
        wgmma_m64n64k16_rs<1>(dqm, a, kt0 + ((st * STAGE + 4 * CH + k * 16 * 128) >> 4), 1);
      }
      wgmma_commit();
      wgmma_wait0();
      mbar_arrive(sbase + BAR_KV_EMPTY + 8 * st);
    }
    // deterministic: this item's target adds are performed before the next item's (ordered
    // through the q-empty / q-full barriers)
    if (DET) {
      asm volatile("fence.acq_rel.gpu;\n" ::: "memory");
      mbar_arrive(sbase + BAR_Q_EMPTY);
    }
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      if (!hv[i]) continue;
      int tr, h;
      tile_row<PACK>(p, t, h0, row0 + 8 * i, tr, h);
      __nv_bfloat16* dqrow = p.dq + (long long)tr * p.dq_st + (long long)h * p.dq_sh + colq;
      store_dq<32>(dqrow, dqa, i);
      store_dq<8>(dqrow + 256, dqm, i);
    }
    return nblk;
    });
  } else {
    // ---------------- dQ[:, 256:576], dKV ----------------
    asm volatile("setmaxnreg.inc.sync.aligned.u32 " DSA_STR(SPARSE_MLA_BWD_R2) ";\n" ::: "memory");
    const int colq = lane_colq();
    // deterministic: this CTA's own dkv lane
    float* const dkv = p.dkv + (DET ? static_cast<long long>(blockIdx.x) * p.Tk * D_QK : 0ll);
    walk([&](const Item& item, const int gb, const int par) -> int {
    const int L = item.L, t = item.t, h0 = item.h0, kv_len = item.kv_len, nblk = item.nblk;
    float dqb[128];  // dQ[:, 320:576]
#pragma unroll
    for (int i = 0; i < 128; ++i) dqb[i] = 0.f;
    const uint64_t kt0 = desc(sbase + OFF_KV, CH, 1024);       // kv, MN-major B [keys, channels]
    const uint64_t dsa0 = desc(sbase + OFF_DS, CH, 1024);      // dS, MN-major A [heads, keys]
    const uint64_t dsb0 = desc(sbase + OFF_DS, 16, 1024);      // dS / P, K-major B [keys, heads]
    const uint64_t qt0 = desc(sbase + OFF_Q, QCH, 1024);       // Q^T, MN-major A [channels, heads]
    const uint64_t dot0 = desc(sbase + OFF_DO, QCH, 1024);     // dO^T
    mbar_wait(sbase + BAR_Q, par);
    fence_async_smem();
    for (int b = 0; b < nblk; ++b) {
      const int g = gb + b, st = g % NST, pb = g % ND;
      mbar_wait(sbase + BAR_DS_FULL + 8 * pb, (g / ND) & 1);
      mbar_wait(sbase + BAR_KV_FULL + 8 * st, (g / NST) & 1);
      fence_async_smem();
      wgmma_fence();
#pragma unroll
      for (int k = 0; k < 2; ++k) {
        const uint64_t da = dsa0 + ((pb * 2 * CH + k * 16 * 128) >> 4);
        wgmma_m64n256k16_ss<1, 1>(dqb, da, kt0 + ((st * STAGE + 5 * CH + k * 16 * 128) >> 4), 1);
      }
      wgmma_commit();
      // the keys this thread adds: columns 8 jj + colq + bb of the dKV^T tiles
      const uint32_t ids_w = sbase + OFF_IDS + (g % NIDS) * BN * 4;  // 32-bit shared address: fewer registers
      // the row offsets (id * 576, -1: skip) of this thread's 8 keys, read once per block: an
      // ld.shared per add waited behind the adds in the memory-instruction queue
      int ro8[8];
      slot_ids(ids_w, b * BN + colq, colq, kv_len, p.Tk, ro8);
#pragma unroll
      for (int e = 0; e < 8; ++e) ro8[e] = ro8[e] >= 0 ? ro8[e] * D_QK : -1;
      auto row_off = [&](int jj, int bb) -> int { return ro8[2 * jj + bb]; };
      auto mma = [&](int mt, float (&acc)[16]) {  // dKV^T tile mt (channels 64 mt ..) into acc
#pragma unroll
        for (int k = 0; k < 4; ++k)
          wgmma_m64n32k16_ss<1, 0>(acc, qt0 + ((mt * QCH + k * 16 * 128) >> 4), dsb0 + ((pb * 2 * CH + k * 32) >> 4), k != 0);
        if (mt < NCV) {
#pragma unroll
          for (int k = 0; k < 4; ++k)
            wgmma_m64n32k16_ss<1, 0>(acc, dot0 + ((mt * QCH + k * 16 * 128) >> 4), dsb0 + ((pb * 2 * CH + CH + k * 32) >> 4), 1);
        }
      };
      auto issue_pair = [&](int pp, float (&x)[16], float (&y)[16]) {
        wgmma_fence();
        mma(2 * pp, x);
        mma(2 * pp + 1, y);
        wgmma_commit();
      };
      // per key (jj, bb) this thread holds acc[4 jj + bb] (fragment row half i = 0) and
      // acc[4 jj + 2 + bb] (i = 1) of each tile; workspace positions as in "dkv workspace"
      const int pair_off = warp * 32 + (lane >> 2) * 4, rope_off = 8 * 64 + warp * 16 + (lane >> 2) * 2;
      auto add_pair = [&](int pp, const float (&x)[16], const float (&y)[16]) {
#pragma unroll
        for (int jj = 0; jj < 4; ++jj)
#pragma unroll
          for (int bb = 0; bb < 2; ++bb) {
            const int ro = row_off(jj, bb);
            if (ro >= 0)
              red_add_v4(dkv + (ro + pair_off + pp * 128), x[4 * jj + bb], x[4 * jj + 2 + bb], y[4 * jj + bb],
                         y[4 * jj + 2 + bb]);
          }
      };
      // two register sets in turn: a pair's MMAs run while the previous pair's adds issue
      float xa[16], xb[16], ya[16], yb[16];
      issue_pair(0, xa, xb);
      wgmma_wait1();  // dQ's group is done: the kv slot is free
      mbar_arrive(sbase + BAR_KV_EMPTY + 8 * st);
      issue_pair(1, ya, yb);
      wgmma_wait1();
      add_pair(0, xa, xb);
      issue_pair(2, xa, xb);
      wgmma_wait1();
      add_pair(1, ya, yb);
      issue_pair(3, ya, yb);
      wgmma_wait1();
      add_pair(2, xa, xb);
      wgmma_fence();
      mma(NCH - 1, xa);  // the rope tile, unpaired
      wgmma_commit();
      wgmma_wait1();
      add_pair(3, ya, yb);
      wgmma_wait0();
      mbar_arrive(sbase + BAR_DS_EMPTY + 8 * pb);
#pragma unroll
      for (int jj = 0; jj < 4; ++jj)
#pragma unroll
        for (int bb = 0; bb < 2; ++bb) {
          const int ro = row_off(jj, bb);
          if (ro >= 0) red_add_v2(dkv + (ro + rope_off), xa[4 * jj + bb], xa[4 * jj + 2 + bb]);
        }
    }
    // deterministic: this item's dkv adds are performed before the next item's (ordered through
    // the q-empty / q-full barriers)
    if (DET) {
      asm volatile("fence.acq_rel.gpu;\n" ::: "memory");
      mbar_arrive(sbase + BAR_Q_EMPTY);
    }
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      int tr, h;
      tile_row<PACK>(p, t, h0, row0 + 8 * i, tr, h);
      if (h >= p.H || (PACK && tr >= p.T)) continue;
      // (unsigned: tr >= 0, and a zero-extended tr needs no register for its high half)
      __nv_bfloat16* dqrow = p.dq + (long long)(unsigned)tr * p.dq_st + (long long)h * p.dq_sh + colq;
      store_dq<32>(dqrow + 320, dqb, i);
    }
    return nblk;
    });
  }
}


// ---------------------------------------------------------------------------------------------
// 64-key blocks (default mode, unpacked or row-packed): sparse_mla_bwd64_sm90_kernel
//
// MODE (cuda_impl.sparse_mla_bwd_cuda(..., deterministic=True) runs both stages):
// DET_BOUND runs WG1 alone up to P and dS and adds each key's bound on |dkv| (sum over rows and
// heads of |dS| max|q| + P max|dO|, each warp's 16-head sum rounded up to fixed-point units) as
// u64; DET_INT is the default kernel with the dkv adds as integer multiples of each key's quantum,
// two channels per u64 add (dkv64_line_adds_u64), and the target as u64 multiples of 2^-40. Integer adds are
// associative, so both give the same bits in any order.
//
// The kernel above walks 32-key blocks with a producer warpgroup; its S, dP and dKV^T tiles are
// m64n32k16 wgmmas, and its WG2 holds two tile pairs in 232 registers. This one has two
// warpgroups of 255 registers (no producer: 256 threads) and walks 64-key blocks through a single
// kv slot (Q 72 KB + dO 64 KB + kv 72 KB + {dS, P} 16 KB = 224 KB):
//   WG1   Q / dO once; per block: waits until WG2's dQ MMAs of the previous block released the
//         slot, gathers the block's 64 kv rows and ids (cp.async, then waits for them: the
//         gather's latency is on WG1's path, and WG2's dKV work of the previous block overlaps
//         it), S and dP (m64n64k16), P and dS, the target's head sums, P and dS to shared
//         memory (stmatrix .trans: [head, key] fragments into [key, head] tiles), dQ[:, 0:256]
//         += dS K (dS from registers).
//   WG2   per block: dQ[:, 256:576] += dS K (dS from shared memory), then dKV as nine
//         [64 keys, 64 channels] tiles (M = keys: A = dS^T / P^T read K-major from the
//         [key, head] buffers, B = Q / dO read MN-major), two accumulators in turn: a tile's
//         MMAs run while the previous tile's adds issue.
// dkv adds ("dkv64 workspace"): a [64 keys, 64 channels] accumulator gives the 4 lanes of a
// lane quad (lane / 4) 16 channels each of two keys (rows q and q + 8 of the warp's 16). Lanes l
// and l ^ 4 (keys q, q ^ 1) trade halves by shuffles, so that each holds side s = (l / 4) & 1 of
// both keys: channels j in {2 s, 2 s + 1} (mod 4) of the fragment's column groups 8 j + 2 (l % 4)
// + {0, 1}. A warp's red.global.add.v4.f32 then covers one 128-byte line (32 channels) of each of
// 4 keys, 8 lanes per line, with the workspace's columns permuted within each line: channel
// 32 L' + 16 s + 8 jl + 2 c2 + bb (line L', side s, jl, lane c2 = l % 4, bb) is stored at
// 32 L' + 16 s + 4 c2 + 2 jl + bb (cuda_impl.unpermute_dkv64).
namespace b64 {
constexpr int THREADS = 256;
constexpr int BN = 64;                         // keys per block
constexpr int CH = BN * 128;                   // one [64 rows, 128 B] chunk of the kv slot / P / dS
constexpr int STAGE = NCH * CH;                // the kv slot: 72 KB
constexpr int NIDS = 2;                        // ids ring (block b + 1's ids land while WG2 reads block b's)
constexpr int OFF_Q = 0;
constexpr int OFF_DO = OFF_Q + NCH * QCH;
constexpr int OFF_KV = OFF_DO + NCV * QCH;
constexpr int OFF_DS = OFF_KV + STAGE;         // {dS, P}, each [64 keys, 64 heads] bf16
constexpr int OFF_IDS = OFF_DS + 2 * CH;
constexpr int OFF_HEAD = OFF_IDS + NIDS * BN * 4;  // per head: logZ, Delta, the target's factor (fp32)
constexpr int OFF_BAR = OFF_HEAD + 3 * BM * 4;
constexpr int BAR_KV_EMPTY = OFF_BAR, BAR_DS_FULL = OFF_BAR + 8, BAR_DS_EMPTY = OFF_BAR + 16;
constexpr int SMEM_USED = OFF_BAR + 24;
constexpr int SMEM_BYTES = SMEM_USED + 1024;  // slack to align the base to 1024 B
static_assert(SMEM_BYTES <= 232448, "shared memory");
static_assert(OFF_Q == 0 && OFF_DO == NCH * QCH, "load_q_do's layout");
}  // namespace b64

// The 64-key kernels' per-head statistics, staged in shared memory by one thread per head:
// logZ, Delta and the target's factor (1, or exp(logZ - lse) with a sink: the target is
// normalised without it) of (query row tr, head h) at `at`, `at + 4 n` and `at + 8 n` (n heads
// per table); zeros where !ok.
__device__ __forceinline__ void stage_head_stats(uint32_t at, int n, const BwdParams& p, int tr, int h, bool ok) {
  const long long o = (long long)tr * p.H + (ok ? h : 0);  // (read only where ok)
  const float z2 = ok ? __ldg(p.stats + o) : 0.f;
  float fh = ok ? 1.f : 0.f;
  if ((p.target != nullptr || p.target_fx != nullptr) && p.has_sink && ok) {
    const float l2 = __ldg(p.lse + o) * 1.4426950408889634f;
    fh = l2 > -INFINITY ? exp2f(z2 - l2) : 0.f;
  }
  st_shared_f32(at, z2);
  st_shared_f32(at + 4 * n, ok ? __ldg(p.stats + (long long)p.T * p.H + o) : 0.f);
  st_shared_f32(at + 8 * n, fh);
}
// Block b's ids (thread wt < 64 of the loading warpgroup: slot b * 64 + wt) into the ids ring at
// `ring` (2 slots of 64 ids; past kv_len: no bytes read, the slot masked by its position).
__device__ __forceinline__ void stage_block_ids(uint32_t ring, const int32_t* idx_row, int b, int nblk, int kv_len,
                                                int wt) {
  if (wt < 64) {
    const int slot = b * 64 + wt;
    const bool in = b < nblk && slot < kv_len;
    const uint32_t dst_id = ring + ((b % 2) * 64 + wt) * 4;
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst_id), "l"(idx_row + (in ? slot : 0)),
                 "r"(in ? 4 : 0) : "memory");
  }
}

// The 64-key kernel's dkv adds (WG2's):
// the row offsets (id * 576, -1: skip) of a lane's four keys [i][e] of block b (keys key0 + 8 i +
// e of the ids at ids_w), and the full-line adds of an accumulator's lines l2 < nl (column groups
// j = 4 l2 + 0 .. 3) at workspace column col0 + 32 l2, as the dkv64 workspace comment above says.
__device__ __forceinline__ void key_row_offsets(uint32_t ids_w, int key0, int slot0, int kv_len, int Tk,
                                                int (&ro)[2][2]) {
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    int2 id2;
    asm volatile("ld.shared.v2.b32 {%0, %1}, [%2];\n" : "=r"(id2.x), "=r"(id2.y) : "r"(ids_w + (key0 + 8 * i) * 4));
    const int slot = slot0 + key0 + 8 * i;
    ro[i][0] = (slot < kv_len && id2.x >= 0 && id2.x < Tk) ? id2.x * D_QK : -1;
    ro[i][1] = (slot + 1 < kv_len && id2.y >= 0 && id2.y < Tk) ? id2.y * D_QK : -1;
  }
}
// Line l2 of fragment row half i of a [64 keys, 64 channels] accumulator, traded with lane ^ 4
// (the dkv64 workspace comment above): mine / theirs[n], n = 2 jl + bb, are this lane's side of
// its own key and of the pair's other key.
__device__ __forceinline__ void dkv64_line_sides(const float* acc, int i, int l2, bool side, float (&mine)[4],
                                                 float (&theirs)[4]) {
#pragma unroll
  for (int n = 0; n < 4; ++n) {
    const int jl = n >> 1, bb = n & 1;
    const float lo = acc[4 * (4 * l2 + jl) + 2 * i + bb], hi = acc[4 * (4 * l2 + 2 + jl) + 2 * i + bb];
    mine[n] = side ? hi : lo;
    theirs[n] = __shfl_xor_sync(0xffffffffu, side ? lo : hi, 4);
  }
}
template <int NL>
__device__ __forceinline__ void dkv64_line_adds(float* dkv_lane, const int (&ro)[2][2], bool side, int col0,
                                                const float* acc, uint64_t pol) {
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int l2 = 0; l2 < NL; ++l2) {  // line l2 of the tile: j = 4 l2 + {0 .. 3}
      float mine[4], theirs[4];
      dkv64_line_sides(acc, i, l2, side, mine, theirs);
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int r = ro[i][e];
        const bool own = static_cast<int>(side) == e;
        if (r >= 0)
          red_add_v4_pol(dkv_lane + (r + col0 + 32 * l2), own ? mine[0] : theirs[0], own ? mine[1] : theirs[1],
                         own ? mine[2] : theirs[2], own ? mine[3] : theirs[3], pol);
      }
    }
}

// DET_INT: the same lines as integers in units of each key's quantum (rint(v / q_s): 1 / q_s is a
// power of two, so the scaling is exact), two channels per red.global.add.u64 (integer adds have
// no vector form): x_1 2^32 + x_0 in two's complement, whose sum's low word is sum x_0 (within
// 2^31 by the bound) and high word sum x_1, decoded exactly (cuda_impl.det_finish); the
// workspace keeps the dkv64 layout. kq[i][e]: the key's id | the bits of its 1 / q_s (a power of
// two: exponent bits only, above bit 22; ids < 2^23), -1: skip. ws_lane = the int32 workspace +
// this lane's offset in a line (as dkv_lane). Integer adds are associative: the sum, and so the
// bits, do not depend on the order.
constexpr int DET_ID_MASK = 0x7FFFFF, DET_EXP_MASK = 0x7F800000;
template <int NL>
__device__ __forceinline__ void dkv64_line_adds_u64(int* ws_lane, const int (&kq)[2][2], bool side, int col0,
                                                    const float* acc) {
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int l2 = 0; l2 < NL; ++l2) {
      float mine[4], theirs[4];
      dkv64_line_sides(acc, i, l2, side, mine, theirs);
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const bool own = static_cast<int>(side) == e;
        const int k = kq[i][e];
        // (converted for skipped keys too, whose values are zero: converting under the branch
        // below spilled)
        const float iq = __int_as_float(k & DET_EXP_MASK);
        long long x[4];
#pragma unroll
        for (int n = 0; n < 4; ++n) x[n] = __float2int_rn((own ? mine[n] : theirs[n]) * iq);
        if (k >= 0) {
          unsigned long long* w =
              reinterpret_cast<unsigned long long*>(ws_lane + (k & DET_ID_MASK) * D_QK + (col0 + 32 * l2));
          red_add_u64(w, static_cast<unsigned long long>(x[1] * 4294967296LL + x[0]));
          red_add_u64(w + 1, static_cast<unsigned long long>(x[3] * 4294967296LL + x[2]));
        }
      }
    }
}

__device__ __forceinline__ void prefetch_l1(const void* ptr) {
  asm volatile("prefetch.global.L1 [%0];\n" ::"l"(ptr));
}

// Packed, 64-key blocks: a thread's row's slots of block b's entries 8 jj + colq + {0, 1} (int16
// pairs from its uslot row us32; -1: the row does not take the entry, or it is past kv_len).
__device__ __forceinline__ void packed_slots(const uint32_t* us32, int b, int colq, int kv_len, uint32_t (&usl)[8]) {
#pragma unroll
  for (int jj = 0; jj < 8; ++jj) {
    const int e0 = b * 64 + 8 * jj + colq;  // even; uslot rows have an even length
    usl[jj] = e0 < kv_len ? __ldg(us32 + (e0 >> 1)) : 0xffffffffu;
  }
}

// PACK: row packing as in the kernel above (a group of p.rows query rows per CTA over the union
// of their keys; each thread's rows row0, row0 + 8 lie in one query row, trow).
template <bool PACK, int MODE = DET_OFF>
__global__ void __launch_bounds__(b64::THREADS, 1) sparse_mla_bwd64_sm90_kernel(const BwdParams p) {
  // (local names shadow the 32-key kernel's constants)
  constexpr int BN = b64::BN, CH = b64::CH, NIDS = b64::NIDS, OFF_Q = b64::OFF_Q, OFF_DO = b64::OFF_DO,
                OFF_KV = b64::OFF_KV, OFF_DS = b64::OFF_DS, OFF_IDS = b64::OFF_IDS, OFF_HEAD = b64::OFF_HEAD,
                BAR_KV_EMPTY = b64::BAR_KV_EMPTY, BAR_DS_FULL = b64::BAR_DS_FULL, BAR_DS_EMPTY = b64::BAR_DS_EMPTY;
  extern __shared__ uint8_t smem_raw[];
  const uint32_t sbase = (smem_u32(smem_raw) + 1023u) & ~1023u;
  const int tid = threadIdx.x;
  const int wg = tid >> 7;
  const int wt = tid & 127;
  const int warp = wt >> 5, lane = tid & 31;
  const int colq = 2 * (lane & 3);
  const int row0 = warp * 16 + (lane >> 2);  // accumulator rows of this thread: row0, row0 + 8
  // key-list row L (the query row; packed: the group), the item's first query row t, head block h0
  const int L = p.r0 + static_cast<int>(blockIdx.x) / p.n_hblk;
  const int t = PACK ? L * p.rows : L;
  const int h0 = (static_cast<int>(blockIdx.x) % p.n_hblk) * BM;
  const int kv_len = min(max(__ldg(p.kv_len + L), 0), PACK ? static_cast<int>(p.idx_s) : p.K);
  const int nblk = (kv_len + BN - 1) / BN;

  if (tid == 0) {
    mbar_init(sbase + BAR_KV_EMPTY, 128);
    mbar_init(sbase + BAR_DS_FULL, 128);
    mbar_init(sbase + BAR_DS_EMPTY, 128);
  }
  __syncthreads();

  if (wg == 0) {
    // ---------------- loads, gathers, S, dP, softmax gradient, dQ[:, 0:256] ----------------
    if constexpr (PACK)
      load_q_do_packed<true>(sbase, p, t, wt);
    else
      load_q_do<true>(sbase, p, t, h0, wt);
    // the tile rows' logZ, Delta and target factor, staged in shared memory (read per block:
    // held in registers, they spilled); visible after the first block's barrier
    if (wt < BM) {
      int tr, h;
      tile_row<PACK>(p, t, h0, wt, tr, h);
      stage_head_stats(sbase + OFF_HEAD + wt * 4, BM, p, tr, h, h < p.H && (!PACK || tr < p.T));
    }
    bool hv[2];
    int trow = t;  // this thread's query row (the same for row0 and row0 + 8)
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      int h;
      tile_row<PACK>(p, t, h0, row0 + 8 * i, trow, h);
      hv[i] = h < p.H && (!PACK || trow < p.T);
    }
    float dqa[128];  // dQ[:, 0:256]
#pragma unroll
    for (int i = 0; i < 128; ++i) dqa[i] = 0.f;
    // DET_BOUND: max |q| and max |dO| of this thread's rows, and the fixed-point scale
    float mq[2] = {0.f, 0.f}, md[2] = {0.f, 0.f}, bsc = 0.f;
    if constexpr (MODE == DET_BOUND) {
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        int tr, h;
        tile_row<PACK>(p, t, h0, row0 + 8 * i, tr, h);
        if (hv[i]) {
          mq[i] = __ldg(p.hq + (long long)tr * p.H + h);
          md[i] = __ldg(p.hdo + (long long)tr * p.H + h);
        }
      }
      bsc = __ldg(p.bound_scale);
    }
    const uint64_t qd0 = desc(sbase + OFF_Q, 16, 1024);
    const uint64_t dod0 = desc(sbase + OFF_DO, 16, 1024);
    const uint64_t kd0 = desc(sbase + OFF_KV, 16, 1024);
    const uint64_t kt0 = desc(sbase + OFF_KV, CH, 1024);  // kv as MN-major B [keys, channels]
    // gathers: 8 threads per key row (rows g_row + 16 k), granule g_sub of each 128-byte chunk, so
    // that a warp's cp.async covers whole lines (4 rows x 128 B: half the L2 requests of 64-byte
    // pieces). A block's ids reach the ids ring one block ahead (block 0's with Q / dO), and its
    // gathers read them there (block 0: from global memory)
    const int32_t* idx_row = p.idx + (long long)L * p.idx_s;
    // packed: this thread's row of uslot, read as int16 pairs (the group's rows are consecutive)
    const uint32_t* us32 = PACK ? reinterpret_cast<const uint32_t*>(p.uslot + (long long)trow * p.idx_s) : nullptr;
    const int g_row = wt >> 3, g_sub = wt & 7;
    static_assert(BN == 64 && NIDS == 2, "stage_block_ids' ring");
    auto stage_ids = [&](int b) { stage_block_ids(sbase + OFF_IDS, idx_row, b, nblk, kv_len, wt); };
    stage_ids(0);
    const uint64_t kv_pol = policy_first(p.l2_hints != 0);
#pragma unroll 1
    for (int b = 0; b < nblk; ++b) {
      // the slot is free once WG2's dQ MMAs of block b - 1 retired (this warpgroup's own retired
      // in its previous iteration); so is ids slot (b + 1) % 2, which held block b - 1's ids
      if (MODE != DET_BOUND && b > 0) mbar_wait(sbase + BAR_KV_EMPTY, (b - 1) & 1);
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const int r = g_row + 16 * k, slot = b * BN + r;
        int id;
        if (b == 0)
          id = slot < kv_len ? __ldg(idx_row + slot) : -1;
        else
          id = slot < kv_len ? static_cast<int>(ld_shared_u32(sbase + OFF_IDS + ((b % NIDS) * BN + r) * 4)) : -1;
        const bool ok = id >= 0 && id < p.Tk;
        const __nv_bfloat16* src = p.kv + (long long)(ok ? id : 0) * p.kv_s + g_sub * 8;
        const uint32_t dst = sbase + OFF_KV + r * 128 + ((g_sub ^ (r & 7)) << 4);
#pragma unroll
        for (int c = 0; c < NCH; ++c) cp_async16_pol(dst + c * CH, src + c * 64, ok, kv_pol);
      }
      stage_ids(b + 1);
      // packed: the block's entries of this thread's uslot row (64 int16: one 128-byte line when
      // the row length is a multiple of 64, as at k = 2048) into L1 while the gathers and MMAs
      // run (loaded into registers here, they spilled; so did a second prefetch clamped to the
      // row's length)
      if constexpr (PACK) prefetch_l1(us32 + b * (BN / 2));  // (entry b * 64 < kv_len: inside the row)
      cp_async_wait_all();  // (block 0: Q and dO too)
      fence_async_smem();
      bar_sync(1, 128);
      float s[32], dp[32];
      wgmma_fence();
#pragma unroll
      for (int c = 0; c < NCH; ++c)
#pragma unroll
        for (int k = 0; k < 4; ++k)
          wgmma_m64n64k16_ss<0, 0>(s, qd0 + ((c * QCH + k * 32) >> 4), kd0 + ((c * CH + k * 32) >> 4), (c | k) != 0);
#pragma unroll
      for (int c = 0; c < NCV; ++c)
#pragma unroll
        for (int k = 0; k < 4; ++k)
          wgmma_m64n64k16_ss<0, 0>(dp, dod0 + ((c * QCH + k * 32) >> 4), kd0 + ((c * CH + k * 32) >> 4), (c | k) != 0);
      float z2[2], dlt[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        z2[i] = ld_shared_f32(sbase + OFF_HEAD + (row0 + 8 * i) * 4);
        dlt[i] = ld_shared_f32(sbase + OFF_HEAD + (BM + row0 + 8 * i) * 4);
      }
      wgmma_commit();
      wgmma_wait0();
      // P and dS (in place of S and dP); accumulator column 8 jj + colq + bb is key slot
      // b * 64 + 8 jj + colq + bb
      bool valid[16];
      if constexpr (PACK) {
        uint32_t usl[8];
        packed_slots(us32, b, colq, kv_len, usl);
#pragma unroll
        for (int jj = 0; jj < 8; ++jj) {
          valid[2 * jj] = !(usl[jj] & 0x8000u);
          valid[2 * jj + 1] = !(usl[jj] & 0x80000000u);
        }
      } else {
        const uint32_t ids_w = sbase + OFF_IDS + (b % NIDS) * BN * 4;
        int idv[8];
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          slot_ids(ids_w + half * 128, b * BN + 32 * half + colq, colq, kv_len, p.Tk, idv);
#pragma unroll
          for (int e = 0; e < 8; ++e) valid[8 * half + e] = idv[e] >= 0;
        }
      }
      softmax_grad<8>(s, dp, valid, hv, z2, dlt, p.scale_log2, p.scale);
      if constexpr (MODE == DET_BOUND) {
        // each key's bound on |dkv[s, c]|: sum over (row, head) of |dS| max|q| + P max|dO|, the
        // warp's 16 heads summed in a fixed order, added as integers (rounded up): order-free
        const uint32_t ids_w = sbase + OFF_IDS + (b % NIDS) * BN * 4;
#pragma unroll
        for (int jj = 0; jj < 8; ++jj)
#pragma unroll
          for (int bb = 0; bb < 2; ++bb) {
            const int e0 = 4 * jj + bb, e1 = 4 * jj + 2 + bb;
            const float v = quad_sum(fabsf(dp[e0]) * mq[0] + s[e0] * md[0] + fabsf(dp[e1]) * mq[1] + s[e1] * md[1]);
            const int slot = b * BN + 8 * jj + colq + bb;
            if (lane < 4 && slot < kv_len) {
              const int id = static_cast<int>(ld_shared_u32(ids_w + (8 * jj + colq + bb) * 4));
              if (id >= 0 && id < p.Tk) red_add_u64(p.bound + id, __float2ull_ru(v * bsc));
            }
          }
        bar_sync(1, 128);  // (every warp has read this ids slot before the next block restages it)
      } else {  // (not DET_BOUND: dS and P to WG2, dQ, the target)
        uint32_t pk_s[2][8];
#pragma unroll
        for (int i = 0; i < 2; ++i)
#pragma unroll
          for (int jj = 0; jj < 8; ++jj) {
            __nv_bfloat162 vs = __floats2bfloat162_rn(dp[4 * jj + 2 * i], dp[4 * jj + 2 * i + 1]);
            pk_s[i][jj] = *reinterpret_cast<uint32_t*>(&vs);
          }
        // hand dS and P to WG2 as [key, head] tiles (its dKV MMAs of the previous block are done),
        // by stmatrix .trans: the fragment's 8 x 8 block (heads 16 w + 8 i + 0..7, keys 8 jj +
        // 0..7) is stored transposed, key 8 jj + c's row holding those 8 heads in its 16-byte
        // granule 2 w + i (swizzled: ^ c). Instruction q stores blocks (i, jj) = (m % 2, 2 q + m / 2)
        // (matrix m); lane L addresses row c = L % 8 of matrix m = L / 8.
        if (b > 0) mbar_wait(sbase + BAR_DS_EMPTY, (b - 1) & 1);
        {
          const int m = lane >> 3, c = lane & 7;
          const uint32_t a = sbase + OFF_DS + (m >> 1) * 1024 + c * 128 + (((2 * warp + (m & 1)) ^ c) << 4);
#pragma unroll
          for (int q = 0; q < 4; ++q) {
            stsm_x4_trans(a + q * 2048, pk_s[0][2 * q], pk_s[1][2 * q], pk_s[0][2 * q + 1], pk_s[1][2 * q + 1]);
            stsm_x4_trans(a + CH + q * 2048, bf16x2_bits(s[8 * q], s[8 * q + 1]), bf16x2_bits(s[8 * q + 2], s[8 * q + 3]),
                          bf16x2_bits(s[8 * q + 4], s[8 * q + 5]), bf16x2_bits(s[8 * q + 6], s[8 * q + 7]));
          }
        }
        fence_async_smem();
        mbar_arrive(sbase + BAR_DS_FULL);
        // dQ[:, 0:256] += dS K (accumulator columns [16 k, 16 k + 16) are the A fragment of k-step k)
        wgmma_fence();
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          const uint32_t a[4] = {pk_s[0][2 * k], pk_s[1][2 * k], pk_s[0][2 * k + 1], pk_s[1][2 * k + 1]};
          wgmma_m64n256k16_rs<1>(dqa, a, kt0 + ((k * 16 * 128) >> 4), 1);
        }
        wgmma_commit();
        // the target's head sums of P while the dQ MMAs run
        // (DET_INT: as integers in units of 2^-40, order-free)
        if (MODE == DET_INT ? p.target_fx != nullptr : p.target != nullptr) {
          const float fh0 = ld_shared_f32(sbase + OFF_HEAD + (2 * BM + row0) * 4);
          const float fh1 = ld_shared_f32(sbase + OFF_HEAD + (2 * BM + row0 + 8) * 4);
          uint32_t usl[8];  // packed: the row's slots again (L1)
          if constexpr (PACK) packed_slots(us32, b, colq, kv_len, usl);
          auto add_target = [&](long long o, float v) {
            if constexpr (MODE == DET_INT) red_add_u64(p.target_fx + o, __float2ull_rn(v * TARGET_FX_UNITS));
            else red_add(p.target + o, v);
          };
#pragma unroll
          for (int jj = 0; jj < 8; ++jj)
#pragma unroll
            for (int bb = 0; bb < 2; ++bb) {
              const float v = quad_sum(s[4 * jj + bb] * fh0 + s[4 * jj + 2 + bb] * fh1);
              if constexpr (PACK) {  // at the row's own slot of the entry
                const int slot = static_cast<int16_t>(usl[jj] >> (16 * bb));
                if (lane < 4 && slot >= 0) add_target((long long)trow * p.K + slot, v);
              } else {
                const int slot = b * BN + 8 * jj + colq + bb;
                if (lane < 4 && slot < kv_len) add_target((long long)t * p.K + slot, v);
              }
            }
        }
        wgmma_wait0();
      }
    }
    cp_async_wait_all();  // (no block: Q and dO)
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      if (MODE == DET_BOUND || !hv[i]) continue;
      int tr, h;
      tile_row<PACK>(p, t, h0, row0 + 8 * i, tr, h);
      __nv_bfloat16* dqrow = p.dq + (long long)tr * p.dq_st + (long long)h * p.dq_sh + colq;
      store_dq<32>(dqrow, dqa, i);
    }
  } else if constexpr (MODE != DET_BOUND) {
    // ---------------- dQ[:, 256:576], dKV ----------------
    const bool side = (lane >> 2) & 1;  // s: this lane adds channels j = 2 s, 2 s + 1 (mod 4) of both keys of its pair
    float dqb[128], dqr[32];  // dQ[:, 256:512], dQ[:, 512:576]
#pragma unroll
    for (int i = 0; i < 128; ++i) dqb[i] = 0.f;
#pragma unroll
    for (int i = 0; i < 32; ++i) dqr[i] = 0.f;
    const uint64_t kt0 = desc(sbase + OFF_KV, CH, 1024);   // kv, MN-major B [keys, channels]
    const uint64_t dsa0 = desc(sbase + OFF_DS, CH, 1024);  // dS, MN-major A [heads, keys]
    const uint64_t dsk0 = desc(sbase + OFF_DS, 16, 1024);  // dS^T / P^T, K-major A [keys, heads]
    const uint64_t qb0 = desc(sbase + OFF_Q, QCH, 1024);   // Q, MN-major B [heads, channels]
    const uint64_t dob0 = desc(sbase + OFF_DO, QCH, 1024); // dO
    // this lane's keys in a block: rows 16 w + 8 i + (lane / 4 & ~1) + e of the tile (i, e = 0, 1)
    const int key0 = warp * 16 + ((lane >> 2) & ~1);
    float* const dkv_lane = p.dkv + 16 * side + 2 * colq;
    const uint64_t add_pol = policy_last(p.l2_hints != 0);
#pragma unroll 1
    for (int b = 0; b < nblk; ++b) {
      mbar_wait(sbase + BAR_DS_FULL, b & 1);
      fence_async_smem();
      wgmma_fence();
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const uint64_t da = dsa0 + ((k * 16 * 128) >> 4);
        wgmma_m64n256k16_ss<1, 1>(dqb, da, kt0 + ((4 * CH + k * 16 * 128) >> 4), 1);
        wgmma_m64n64k16_ss<1, 1>(dqr, da, kt0 + ((8 * CH + k * 16 * 128) >> 4), 1);
      }
      wgmma_commit();
      // row offsets (id * 576, -1: skip) of the lane's four keys [i][e], read before the kv slot
      // is released (WG1 rewrites this ids slot two blocks later, after the next release)
      int ro[2][2];
      key_row_offsets(sbase + OFF_IDS + (b % NIDS) * BN * 4, key0, b * BN, kv_len, p.Tk, ro);
      if constexpr (MODE == DET_INT) {  // id | the bits of 1 / q_s (dkv64_line_adds_u64)
#pragma unroll
        for (int i = 0; i < 2; ++i)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int id = ro[i][e] / D_QK;
            ro[i][e] = ro[i][e] >= 0 ? id | __ldg(reinterpret_cast<const int*>(p.inv_q) + id) : -1;
          }
      }
      auto mma = [&](int c, float (&acc)[32]) {  // dKV tile c: [64 keys, channels 64 c ..]
#pragma unroll
        for (int k = 0; k < 4; ++k)
          wgmma_m64n64k16_ss<0, 1>(acc, dsk0 + ((k * 32) >> 4), qb0 + ((c * QCH + k * 16 * 128) >> 4), k != 0);
        if (c < NCV) {  // (the rope tile, c = 8: dS^T Q only)
#pragma unroll
          for (int k = 0; k < 4; ++k)
            wgmma_m64n64k16_ss<0, 1>(acc, dsk0 + ((CH + k * 32) >> 4), dob0 + ((c * QCH + k * 16 * 128) >> 4), 1);
        }
      };
      // acc[4 j + 2 i + bb]: key row (lane / 4) + 8 i of the warp's 16, channel 64 c + 8 j + colq + bb
      auto add = [&](int c, const float (&acc)[32]) {
        if constexpr (MODE == DET_INT)
          dkv64_line_adds_u64<2>(reinterpret_cast<int*>(p.dkv) + 16 * side + 2 * colq, ro, side, 64 * c, acc);
        else
          dkv64_line_adds<2>(dkv_lane, ro, side, 64 * c, acc, add_pol);
      };
      // two accumulators in turn: tile c's MMAs are issued before tile c - 1's adds
      float xa[32], xb[32];
#pragma unroll
      for (int c = 0; c < NCH; ++c) {
        wgmma_fence();
        if (c & 1)
          mma(c, xb);
        else
          mma(c, xa);
        wgmma_commit();
        wgmma_wait1();  // the group before: dQ (c = 0: the kv slot is free) or tile c - 1
        if (c == 0)
          mbar_arrive(sbase + BAR_KV_EMPTY);
        else if (c & 1)
          add(c - 1, xa);
        else
          add(c - 1, xb);
      }
      wgmma_wait0();
      mbar_arrive(sbase + BAR_DS_EMPTY);
      add(NCH - 1, xa);
    }
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      int tr, h;
      tile_row<PACK>(p, t, h0, row0 + 8 * i, tr, h);
      if (h >= p.H || (PACK && tr >= p.T)) continue;
      __nv_bfloat16* dqrow = p.dq + (long long)tr * p.dq_st + (long long)h * p.dq_sh + 256 + colq;
      store_dq<32>(dqrow, dqb, i);
      store_dq<8>(dqrow + 256, dqr, i);
    }
  }
}

}  // namespace

namespace {

// lanes > 0: deterministic, a persistent grid of min(lanes, p.n_rows) CTAs, CTA j adding into
// dkv lane j ([lanes, Tk, 576] fp32, zeroed; the caller sums the lanes in order).
// lanes = 0: one CTA per (key-list row, head block), in launches of at most launch_ctas CTAs
// (whole rows; 0: one launch). The CTAs of a short launch start together; walking ascending ids,
// they add and gather within a band of keys that the L2 holds (cuda_impl.l2_order).
// One CTA per (key-list row, head block) in launches of at most launch_ctas CTAs (whole rows;
// 0: one launch), each launch's first row in p.r0.
template <typename Kernel>
int launch_rows(Kernel kernel, int threads, int smem, const BwdParams& p, int launch_ctas, cudaStream_t s) {
  const int step = launch_ctas > 0 ? max(1, launch_ctas / p.n_hblk) : max(p.n_rows, 1);
  for (int r0 = 0; r0 < p.n_rows; r0 += step) {
    BwdParams pl = p;
    pl.r0 = r0;
    const unsigned grid = static_cast<unsigned>(static_cast<long long>(min(step, p.n_rows - r0)) * p.n_hblk);
    kernel<<<grid, threads, smem, s>>>(pl);
    const cudaError_t le = cudaGetLastError();
    if (le != cudaSuccess) return static_cast<int>(le);
  }
  return 0;
}

template <bool PACK>
int launch_bwd(BwdParams p, int lanes, int launch_ctas, void* stream) {
  if (lanes < 0 || launch_ctas < 0) return static_cast<int>(cudaErrorInvalidValue);
  static bool attr_set[2][64] = {};
  const cudaError_t e = lanes > 0 ? set_smem_once(attr_set[1], sparse_mla_bwd_sm90_kernel<PACK, true>, SMEM_BYTES)
                                  : set_smem_once(attr_set[0], sparse_mla_bwd_sm90_kernel<PACK, false>, SMEM_BYTES);
  if (e != cudaSuccess) return static_cast<int>(e);
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (lanes > 0) {
    if (p.n_rows == 0) return 0;
    const unsigned grid = static_cast<unsigned>(min(lanes, p.n_rows));
    sparse_mla_bwd_sm90_kernel<PACK, true><<<grid, THREADS, SMEM_BYTES, s>>>(p);
    return static_cast<int>(cudaGetLastError());
  }
  return launch_rows(sparse_mla_bwd_sm90_kernel<PACK, false>, THREADS, SMEM_BYTES, p, launch_ctas, s);
}

// The 64-key kernel (unpacked or packed rows; MODE: the default or a deterministic stage):
// launched as launch_bwd's default mode.
template <bool PACK, int MODE = DET_OFF>
int launch_bwd64(BwdParams p, int launch_ctas, void* stream) {
  if (launch_ctas < 0) return static_cast<int>(cudaErrorInvalidValue);
  static bool attr_set[64] = {};
  const cudaError_t e = set_smem_once(attr_set, sparse_mla_bwd64_sm90_kernel<PACK, MODE>, b64::SMEM_BYTES);
  if (e != cudaSuccess) return static_cast<int>(e);
  return launch_rows(sparse_mla_bwd64_sm90_kernel<PACK, MODE>, b64::THREADS, b64::SMEM_BYTES, p, launch_ctas,
                     static_cast<cudaStream_t>(stream));
}
// The deterministic mode's stage (1: DET_BOUND, 2: DET_INT) on p with its fields set.
template <bool PACK>
int launch_bwd64_det(BwdParams& p, int stage, const void* hq, const void* hdo, void* bound, const void* bound_scale,
                     const void* inv_q, void* target_fx, int launch_ctas, void* stream) {
  p.target_fx = static_cast<unsigned long long*>(target_fx);
  p.hq = static_cast<const float*>(hq);
  p.hdo = static_cast<const float*>(hdo);
  p.bound = static_cast<unsigned long long*>(bound);
  p.bound_scale = static_cast<const float*>(bound_scale);
  p.inv_q = static_cast<const float*>(inv_q);
  if (stage == DET_BOUND) {
    if (hq == nullptr || hdo == nullptr || bound == nullptr || bound_scale == nullptr)
      return static_cast<int>(cudaErrorInvalidValue);
    return launch_bwd64<PACK, DET_BOUND>(p, launch_ctas, stream);
  }
  if (stage == DET_INT) {  // (ids < 2^23: dkv64_line_adds_u64)
    if (inv_q == nullptr || p.Tk > DET_ID_MASK + 1) return static_cast<int>(cudaErrorInvalidValue);
    return launch_bwd64<PACK, DET_INT>(p, launch_ctas, stream);
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

BwdParams make_params(const void* q, const void* kv, const void* idx, const void* kv_len, const void* dout,
                      const void* stats, const void* lse, void* dq, void* dkv, void* target, long long q_st,
                      long long q_sh, long long kv_s, long long idx_s, long long do_st, long long do_sh,
                      long long dq_st, long long dq_sh, int T, int H, int Tk, int K, int has_sink, float scale) {
  BwdParams p;
  p.q = static_cast<const __nv_bfloat16*>(q);
  p.kv = static_cast<const __nv_bfloat16*>(kv);
  p.idx = static_cast<const int32_t*>(idx);
  p.kv_len = static_cast<const int32_t*>(kv_len);
  p.uslot = nullptr;
  p.dout = static_cast<const __nv_bfloat16*>(dout);
  p.stats = static_cast<const float*>(stats);
  p.lse = static_cast<const float*>(lse);
  p.dq = static_cast<__nv_bfloat16*>(dq);
  p.dkv = static_cast<float*>(dkv);
  p.target = static_cast<float*>(target);
  p.q_st = q_st; p.q_sh = q_sh; p.kv_s = kv_s; p.idx_s = idx_s;
  p.do_st = do_st; p.do_sh = do_sh; p.dq_st = dq_st; p.dq_sh = dq_sh;
  p.T = T; p.H = H; p.Tk = Tk; p.K = K;
  p.n_hblk = (H + BM - 1) / BM;
  p.has_sink = has_sink;
  p.scale = scale;
  p.scale_log2 = scale * 1.4426950408889634f;
  p.hshift = 6;
  p.rows = 1;
  p.n_rows = T;
  p.r0 = 0;
  p.l2_hints = 0;
  p.hq = p.hdo = nullptr;
  p.bound = nullptr;
  p.bound_scale = nullptr;
  p.inv_q = nullptr;
  p.target_fx = nullptr;
  return p;
}

// Row packing's parameters (H <= 32; packing.py): uid [G, ucap] int32 with count [G], uslot
// [G, rows, ucap] int16; hshift = log2 of the heads per row in the tile (4: 16, rows = 4; 5: 32,
// rows = 2). K is the indices' slot count (the target's row stride). False for bad arguments.
bool packed_params(BwdParams& p, const void* q, const void* kv, const void* uid, const void* count, const void* uslot,
                   const void* dout, const void* stats, const void* lse, void* dq, void* dkv, void* target,
                   long long q_st, long long q_sh, long long kv_s, long long ucap, long long do_st, long long do_sh,
                   long long dq_st, long long dq_sh, int T, int H, int Tk, int K, int G, int hshift, int has_sink,
                   float scale) {
  // (uslot rows are read as int16 pairs: an even row length keeps them 4-byte aligned)
  if (H < 1 || (hshift != 4 && hshift != 5) || H > (1 << hshift) || ucap % 2 != 0 || ucap >= (1LL << 31))
    return false;
  p = make_params(q, kv, uid, count, dout, stats, lse, dq, dkv, target, q_st, q_sh, kv_s, ucap, do_st, do_sh, dq_st,
                  dq_sh, T, H, Tk, K, has_sink, scale);
  p.uslot = static_cast<const int16_t*>(uslot);
  p.hshift = hshift;
  p.rows = BM >> hshift;
  p.n_hblk = 1;
  p.n_rows = T == 0 ? 0 : G;
  return true;
}

}  // namespace

extern "C" {

int dsa_sparse_mla_bwd_smem_bytes() { return SMEM_BYTES; }
int dsa_sparse_mla_bwd64_smem_bytes() { return b64::SMEM_BYTES; }

// Launches on `stream`; returns a cudaError_t (0 = launched). No host synchronization.
// dkv: fp32 [Tk, 576], zeroed, columns in the permuted order described at the top; with
// lanes > 0 (deterministic) [lanes, Tk, 576], zeroed, one lane per CTA, summed by the caller.
// launch_ctas (lanes = 0): at most this many CTAs per launch, whole rows (0: one launch).
int dsa_sparse_mla_bwd_sm90(const void* q, const void* kv, const void* idx, const void* kv_len,
                            const void* dout, const void* stats, const void* lse, void* dq, void* dkv,
                            void* target, long long q_st, long long q_sh, long long kv_s, long long idx_s,
                            long long do_st, long long do_sh, long long dq_st, long long dq_sh, int T, int H,
                            int Tk, int K, int has_sink, int lanes, int launch_ctas, float scale, void* stream) {
  if (H == 0) T = 0;
  const BwdParams p = make_params(q, kv, idx, kv_len, dout, stats, lse, dq, dkv, target, q_st, q_sh, kv_s,
                                  idx_s, do_st, do_sh, dq_st, dq_sh, T, H, Tk, K, has_sink, scale);
  return launch_bwd<false>(p, lanes, launch_ctas, stream);
}

// The 64-key kernel (unpacked rows, default mode; H any, one CTA per (row, 64 heads)): the
// arguments of dsa_sparse_mla_bwd_sm90 with l2_hints in place of lanes (no deterministic mode):
// nonzero, the dkv adds go to L2 as evict_last and the kv gathers as evict_first (for a
// workspace that fits the L2 beside which kv does not, cuda_impl.l2_hints); dkv: fp32
// [Tk, 576], zeroed, columns permuted within each 32-channel line ("dkv64 workspace").
int dsa_sparse_mla_bwd64_sm90(const void* q, const void* kv, const void* idx, const void* kv_len,
                              const void* dout, const void* stats, const void* lse, void* dq, void* dkv,
                              void* target, long long q_st, long long q_sh, long long kv_s, long long idx_s,
                              long long do_st, long long do_sh, long long dq_st, long long dq_sh, int T, int H,
                              int Tk, int K, int has_sink, int l2_hints, int launch_ctas, float scale,
                              void* stream) {
  if (H == 0) T = 0;
  BwdParams p = make_params(q, kv, idx, kv_len, dout, stats, lse, dq, dkv, target, q_st, q_sh, kv_s,
                            idx_s, do_st, do_sh, dq_st, dq_sh, T, H, Tk, K, has_sink, scale);
  p.l2_hints = l2_hints;
  return launch_bwd64<false>(p, launch_ctas, stream);
}

// The 64-key kernel's deterministic mode, one stage per call (cuda_impl.sparse_mla_bwd_cuda runs
// them): the arguments of dsa_sparse_mla_bwd64_sm90 with `stage` in place of l2_hints, then
//   stage 1 (bound): hq, hdo fp32 [T, H] (max |q|, max |dO| per row and head), bound u64 [Tk]
//     zeroed, bound_scale fp32 [1] on the device; dq, dkv and the target are not written;
//   stage 2 (integer adds): inv_q fp32 [Tk] (powers of two); dkv int32 [Tk, 576] zeroed (the
//     dkv64 workspace layout), += rint(value * inv_q[key]); target (u64 [T, K] or null) += rint(
//     value * 2^40); dq written.
int dsa_sparse_mla_bwd64_det_sm90(const void* q, const void* kv, const void* idx, const void* kv_len,
                                  const void* dout, const void* stats, const void* lse, void* dq, void* dkv,
                                  void* target, long long q_st, long long q_sh, long long kv_s, long long idx_s,
                                  long long do_st, long long do_sh, long long dq_st, long long dq_sh, int T, int H,
                                  int Tk, int K, int has_sink, int stage, int launch_ctas, float scale,
                                  const void* hq, const void* hdo, void* bound, const void* bound_scale,
                                  const void* inv_q, void* stream) {
  if (H == 0) T = 0;
  BwdParams p = make_params(q, kv, idx, kv_len, dout, stats, lse, dq, dkv, nullptr, q_st, q_sh, kv_s,
                            idx_s, do_st, do_sh, dq_st, dq_sh, T, H, Tk, K, has_sink, scale);
  return launch_bwd64_det<false>(p, stage, hq, hdo, bound, bound_scale, inv_q, target, launch_ctas, stream);
}

// Row packing (packed_params): one CTA per group (launch_ctas: as above).
int dsa_sparse_mla_bwd_packed_sm90(const void* q, const void* kv, const void* uid, const void* count,
                                   const void* uslot, const void* dout, const void* stats, const void* lse,
                                   void* dq, void* dkv, void* target, long long q_st, long long q_sh,
                                   long long kv_s, long long ucap, long long do_st, long long do_sh,
                                   long long dq_st, long long dq_sh, int T, int H, int Tk, int K, int G,
                                   int hshift, int has_sink, int lanes, int launch_ctas, float scale,
                                   void* stream) {
  BwdParams p;
  if (!packed_params(p, q, kv, uid, count, uslot, dout, stats, lse, dq, dkv, target, q_st, q_sh, kv_s, ucap,
                     do_st, do_sh, dq_st, dq_sh, T, H, Tk, K, G, hshift, has_sink, scale))
    return static_cast<int>(cudaErrorInvalidValue);
  return launch_bwd<true>(p, lanes, launch_ctas, stream);
}

// The 64-key kernel on packed rows: the arguments of dsa_sparse_mla_bwd_packed_sm90 with l2_hints
// in place of lanes (no deterministic mode); dkv in the dkv64 workspace layout.
int dsa_sparse_mla_bwd64_packed_sm90(const void* q, const void* kv, const void* uid, const void* count,
                                     const void* uslot, const void* dout, const void* stats, const void* lse,
                                     void* dq, void* dkv, void* target, long long q_st, long long q_sh,
                                     long long kv_s, long long ucap, long long do_st, long long do_sh,
                                     long long dq_st, long long dq_sh, int T, int H, int Tk, int K, int G,
                                     int hshift, int has_sink, int l2_hints, int launch_ctas, float scale,
                                     void* stream) {
  BwdParams p;
  if (!packed_params(p, q, kv, uid, count, uslot, dout, stats, lse, dq, dkv, target, q_st, q_sh, kv_s, ucap,
                     do_st, do_sh, dq_st, dq_sh, T, H, Tk, K, G, hshift, has_sink, scale))
    return static_cast<int>(cudaErrorInvalidValue);
  p.l2_hints = l2_hints;
  return launch_bwd64<true>(p, launch_ctas, stream);
}

// The deterministic mode on packed rows: the arguments of dsa_sparse_mla_bwd64_packed_sm90 with
// `stage` in place of l2_hints and the stage's buffers as dsa_sparse_mla_bwd64_det_sm90 takes them.
int dsa_sparse_mla_bwd64_det_packed_sm90(const void* q, const void* kv, const void* uid, const void* count,
                                         const void* uslot, const void* dout, const void* stats, const void* lse,
                                         void* dq, void* dkv, void* target, long long q_st, long long q_sh,
                                         long long kv_s, long long ucap, long long do_st, long long do_sh,
                                         long long dq_st, long long dq_sh, int T, int H, int Tk, int K, int G,
                                         int hshift, int has_sink, int stage, int launch_ctas, float scale,
                                         const void* hq, const void* hdo, void* bound, const void* bound_scale,
                                         const void* inv_q, void* stream) {
  BwdParams p;
  if (!packed_params(p, q, kv, uid, count, uslot, dout, stats, lse, dq, dkv, nullptr, q_st, q_sh, kv_s, ucap,
                     do_st, do_sh, dq_st, dq_sh, T, H, Tk, K, G, hshift, has_sink, scale))
    return static_cast<int>(cudaErrorInvalidValue);
  return launch_bwd64_det<true>(p, stage, hq, hdo, bound, bound_scale, inv_q, target, launch_ctas, stream);
}

}  // extern "C"
