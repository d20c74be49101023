// Sparse MLA forward for up to 16 heads (tensor-parallel shards), sm_90a: kv rows straight from
// L2 into registers, no shared-memory staging of kv.
//
// At 16 heads a query row's selected kv rows (k x 1152 B) are read for only 16 x k x 1088 x 2
// FLOPs, so the forward is a gather. Staging the rows in shared memory costs shared-memory
// bandwidth the gather itself needs; here each warp loads the slice of every key it uses with
// 16-byte loads directly into mma.sync operand registers:
//
//   One CTA of 4 warps per query row; keys in blocks of 16. Warp w owns channels
//   [128 w, 128 w + 128) of the latent and rope channels [512 + 16 w, 512 + 16 w + 16).
//   * S: warp w computes the partial S over its 144 channels (m16n8k16, A = the query's
//     fragments, B = the loaded key slice; the k positions of a 16-channel step are a fixed
//     permutation of the channels, the same for the query and the keys, so a thread's 16-byte
//     load is four B registers). The four partials are summed through shared memory (8 floats
//     per thread, one barrier per block, two buffers).
//   * softmax: every warp runs the same online softmax on the summed S (same inputs, same
//     order: the four warps agree bit for bit).
//   * O += P V: P is the A operand straight from the S accumulators; V is the same registers
//     as the key slice (V = the first 512 channels), transposed 8 x 8 at a time with
//     movmatrix so keys run along k. Warp w accumulates O[:, 128 w : 128 w + 128) (16 n-tiles).
//   The next block's kv registers are loaded while the current block is computed (two
//   register sets, the loop unrolled by two), its ids a block earlier still.
//
// Channel map of a 32-channel group s of warp w, thread lane = 4 g + c: the thread loads
// channels 128 w + 32 s + 8 c + [0, 8) of key g of an 8-key tile as four 32-bit registers r_i
// (channels + 2 i, + 2 i + 1). As B operands of S, k-step 2 s takes r_0 / r_1 (k positions
// 2 c, 2 c + 1 / 2 c + 8, 2 c + 9) and k-step 2 s + 1 takes r_2 / r_3; the query's A
// fragments use the same map. For P V, the 8 x 8 matrix of register r_i over the tile's 8 keys
// (rows) and 4 threads (column pairs) is transposed: thread (g', c') then holds keys 2 c',
// 2 c' + 1 of channel 128 w + 32 s + 8 (g' / 2) + 2 i + g' % 2, so n-tile (s, i) of O holds
// channels 128 w + 32 s + 8 c + 2 i + {0, 1} at thread (g, c): 16 contiguous bytes per thread
// and row over i.
#include "sm90_common.cuh"

namespace {

#ifndef FWD16_NS
#define FWD16_NS 5  // ring stages (blocks in flight per warp)
#endif
#ifndef FWD16_CTAS
#define FWD16_CTAS 2  // CTAs per SM the launch bounds ask for
#endif
constexpr int BN16 = 16;        // keys per block
constexpr int NS16 = FWD16_NS;
// Each warp gathers and reads only its own slice of every key (128 latent channels + 16 rope
// channels = 288 B), so a ring slot is free again as soon as its warp has moved it into
// registers: no barrier between the warps guards the ring, and all NS16 blocks are in flight.
constexpr int SLICE = 288;
constexpr int SLICE_STRIDE = 320;  // keys g, g + 1 16 banks apart: conflict-free 16-byte reads
constexpr int WSTAGE = BN16 * SLICE_STRIDE;               // one warp's part of a stage
constexpr int STAGE16 = 4 * WSTAGE;
constexpr int OFF_IDS16 = NS16 * STAGE16;                 // [NS16][4 warps][BN16] int32 ids
constexpr int OFF_PART16 = OFF_IDS16 + NS16 * 4 * BN16 * 4;   // [2][4 warps][2][32] float4 partial S
constexpr int SMEM16 = OFF_PART16 + 2 * 4 * 2 * 32 * 16;

struct Params16 {
  const __nv_bfloat16* q;     // [T, H, 576], channel stride 1
  const __nv_bfloat16* kv;    // [Tk, 576], channel stride 1, rows 16-byte aligned
  const int32_t* idx;         // [T, K]
  const int32_t* topk_len;    // [T]: effective row lengths (<= K)
  const float* sink;          // [H] or null
  __nv_bfloat16* out;         // [T, H, 512]
  float* lse;                 // [T, H]
  long long q_st, q_sh, kv_s, idx_s, out_st, out_sh;
  int H, Tk, K;
  float scale_log2;
};

__device__ __forceinline__ void mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
__device__ __forceinline__ uint32_t movtrans(uint32_t a) {
  uint32_t d;
  asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;\n" : "=r"(d) : "r"(a));
  return d;
}
__device__ __forceinline__ uint32_t pack2(float a, float b) {
  __nv_bfloat162 v = __floats2bfloat162_rn(a, b);
  return *reinterpret_cast<uint32_t*>(&v);
}
__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory"); }

// one block's operands for one thread: per 8-key tile j, 16 latent registers (group s,
// register i at 4 s + i) and 2 rope registers; whether columns 2 c, 2 c + 1 of tile j are valid
struct KvRegs {
  uint32_t r[2][18];
  bool valid[2][2];
};

__global__ void __launch_bounds__(128, FWD16_CTAS) sparse_mla_fwd16_sm90_kernel(const Params16 p) {
  extern __shared__ __align__(128) uint8_t smem[];
  float4* s_part = reinterpret_cast<float4*>(smem + OFF_PART16);
  int* ids_s = reinterpret_cast<int*>(smem + OFF_IDS16);
  const int t = blockIdx.x;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int g = lane >> 2, c = lane & 3;
  const int kv_len = min(p.K, max(0, __ldg(p.topk_len + t)));
  const int nblk = (kv_len + BN16 - 1) / BN16;
  const int32_t* idx_row = p.idx + (long long)t * p.idx_s;
  const int ch0 = 128 * warp + 8 * c;        // + 32 s: this thread's 16-byte channel chunk
  const int rope0 = 512 + 16 * warp + 4 * c;  // this thread's 8-byte rope chunk

  // the query's A fragments: k-step 2 s + u (u = 0, 1) of the latent slice, k-step 8 = rope
  uint32_t qa[9][4];
  {
    const __nv_bfloat16* qrow = p.q + (long long)t * p.q_st;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int h = g + 8 * half;
      const bool ok = h < p.H;
      const __nv_bfloat16* qh = qrow + (long long)min(h, p.H - 1) * p.q_sh;
#pragma unroll
      for (int s = 0; s < 4; ++s) {
        uint4 v = ok ? __ldg(reinterpret_cast<const uint4*>(qh + ch0 + 32 * s)) : make_uint4(0u, 0u, 0u, 0u);
        qa[2 * s][half] = v.x;
        qa[2 * s][2 + half] = v.y;
        qa[2 * s + 1][half] = v.z;
        qa[2 * s + 1][2 + half] = v.w;
      }
      uint2 r = ok ? __ldg(reinterpret_cast<const uint2*>(qh + rope0)) : make_uint2(0u, 0u);
      qa[8][half] = r.x;
      qa[8][2 + half] = r.y;
    }
  }

  // copies: each warp gathers its own slice of the block's 16 keys (18 chunks of 16 bytes per
  // key, 9 per lane); lanes 0..15 hold the block's ids (key = lane), loaded a step ahead
  auto copy_id = [&](int b) -> int {
    const int slot = b * BN16 + lane;
    return (lane < BN16 && b < nblk && slot < kv_len) ? __ldg(idx_row + slot) : -1;
  };
  auto copy = [&](int b, int myid) {
    if (b < nblk) {  // warp-uniform
      const int st = b % NS16;
      uint8_t* wst = smem + st * STAGE16 + warp * WSTAGE;
      if (lane < BN16) ids_s[(st * 4 + warp) * BN16 + lane] = (myid >= 0 && myid < p.Tk) ? myid : -1;
#pragma unroll
      for (int j = 0; j < 9; ++j) {
        const int i = lane + 32 * j;  // chunk i: key i / 18, part i % 18 (16 latent, 2 rope)
        const int key = i / 18, part = i - 18 * key;
        const int id = __shfl_sync(0xffffffffu, myid, key);
        const bool ok = id >= 0 && id < p.Tk;
        const int chan = part < 16 ? 128 * warp + 8 * part : 512 + 16 * warp + 8 * (part - 16);
        const __nv_bfloat16* src = p.kv + (long long)(ok ? id : 0) * p.kv_s + chan;
        const uint32_t dst = static_cast<uint32_t>(__cvta_generic_to_shared(wst + key * SLICE_STRIDE + 16 * part));
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(ok ? 16 : 0)
                     : "memory");
      }
    }
    cp_commit();  // one group per block on every thread, even past the end
  };
  // a block's operands from this warp's slice of its stage (landed; the warp has synchronized)
  auto load_regs = [&](int b, KvRegs& kr) {
    const uint8_t* st = smem + (b % NS16) * STAGE16 + warp * WSTAGE;
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const uint8_t* row = st + (8 * j + g) * SLICE_STRIDE;
#pragma unroll
      for (int s = 0; s < 4; ++s) {
        const uint4 v = *reinterpret_cast<const uint4*>(row + 64 * s + 16 * c);
        kr.r[j][4 * s] = v.x;
        kr.r[j][4 * s + 1] = v.y;
        kr.r[j][4 * s + 2] = v.z;
        kr.r[j][4 * s + 3] = v.w;
      }
      const uint2 r = *reinterpret_cast<const uint2*>(row + 256 + 8 * c);
      kr.r[j][16] = r.x;
      kr.r[j][17] = r.y;
      const int2 id2 = *reinterpret_cast<const int2*>(ids_s + ((b % NS16) * 4 + warp) * BN16 + 8 * j + 2 * c);
      kr.valid[j][0] = id2.x >= 0;
      kr.valid[j][1] = id2.y >= 0;
    }
  };
  // block b + 1 into registers, then its slot refilled with block b + 1 + NS16 (groups committed
  // so far: blocks 0 .. b + NS16, so NS16 - 1 may stay pending)
  int cid = 0;
  auto advance = [&](int b, KvRegs& nxt) {
    cp_wait<NS16 - 1>();
    __syncwarp();
    if (b + 1 < nblk) load_regs(b + 1, nxt);
    __syncwarp();  // the slot's reads are done before its refill lands
    copy(b + 1 + NS16, cid);
    cid = copy_id(b + 2 + NS16);
  };

  float o[16][4];
#pragma unroll
  for (int n = 0; n < 16; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
  float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.f, 0.f};
  // one block b with operands cur; leaves block b + 1's operands in nxt
  auto step = [&](int b, KvRegs& cur, KvRegs& nxt) {
    // partial S over this warp's 144 channels: tile j -> acc[j]
    float acc[2][4];
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
#pragma unroll
      for (int s = 0; s < 4; ++s) {
        mma16816(acc[j], qa[2 * s], cur.r[j][4 * s], cur.r[j][4 * s + 1]);
        mma16816(acc[j], qa[2 * s + 1], cur.r[j][4 * s + 2], cur.r[j][4 * s + 3]);
      }
      mma16816(acc[j], qa[8], cur.r[j][16], cur.r[j][17]);
    }
    const int buf = b & 1;
    s_part[(buf * 4 + warp) * 64 + lane] = make_float4(acc[0][0], acc[0][1], acc[0][2], acc[0][3]);
    s_part[(buf * 4 + warp) * 64 + 32 + lane] = make_float4(acc[1][0], acc[1][1], acc[1][2], acc[1][3]);
    __syncthreads();  // everyone's partials
    float sv[2][4];
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      float4 v = s_part[(buf * 4) * 64 + 32 * j + lane];
      sv[j][0] = v.x; sv[j][1] = v.y; sv[j][2] = v.z; sv[j][3] = v.w;
#pragma unroll
      for (int w2 = 1; w2 < 4; ++w2) {
        v = s_part[(buf * 4 + w2) * 64 + 32 * j + lane];
        sv[j][0] += v.x; sv[j][1] += v.y; sv[j][2] += v.z; sv[j][3] += v.w;
      }
    }
    advance(b, nxt);
    float alpha[2];
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      float mx = -INFINITY;
#pragma unroll
      for (int j = 0; j < 2; ++j)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const float v = cur.valid[j][e] ? sv[j][2 * half + e] * p.scale_log2 : -INFINITY;
          sv[j][2 * half + e] = v;
          mx = fmaxf(mx, v);
        }
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float m_new = fmaxf(m_run[half], mx);
      const float m_use = m_new == -INFINITY ? 0.f : m_new;
      alpha[half] = m_new > m_run[half] ? exp2f(m_run[half] - m_use) : 1.f;
      m_run[half] = m_new;
      float sum = 0.f;
#pragma unroll
      for (int j = 0; j < 2; ++j)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const float v = exp2f(sv[j][2 * half + e] - m_use);
          sv[j][2 * half + e] = v;
          sum += v;
        }
      l_run[half] = l_run[half] * alpha[half] + sum;
    }
#pragma unroll
    for (int n = 0; n < 16; ++n) {
      o[n][0] *= alpha[0];
      o[n][1] *= alpha[0];
      o[n][2] *= alpha[1];
      o[n][3] *= alpha[1];
    }
    // P as the A operand (k position = key within the block)
    const uint32_t pa[4] = {pack2(sv[0][0], sv[0][1]), pack2(sv[0][2], sv[0][3]), pack2(sv[1][0], sv[1][1]),
                            pack2(sv[1][2], sv[1][3])};
#pragma unroll
    for (int s = 0; s < 4; ++s)
#pragma unroll
      for (int i = 0; i < 4; ++i)
        mma16816(o[4 * s + i], pa, movtrans(cur.r[0][4 * s + i]), movtrans(cur.r[1][4 * s + i]));
  };

  // prologue: blocks 0 .. NS16 - 1 in flight, then block 0 into registers and its slot refilled
#pragma unroll
  for (int b = 0; b < NS16; ++b) copy(b, copy_id(b));
  KvRegs ka, kb;
  cid = copy_id(NS16);
  advance(-1, ka);
  for (int b = 0; b < nblk; b += 2) {
    step(b, ka, kb);
    if (b + 1 >= nblk) break;
    step(b + 1, kb, ka);
  }
  cp_wait<0>();

#pragma unroll
  for (int half = 0; half < 2; ++half) {
    float l = l_run[half];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    const int h = g + 8 * half;
    if (h >= p.H) continue;
    const float m_use = m_run[half] == -INFINITY ? 0.f : m_run[half];
    if (warp == 0 && c == 0)
      p.lse[(long long)t * p.H + h] = l > 0.f ? (m_use + log2f(l)) * 0.6931471805599453f : -INFINITY;
    float denom = l;
    if (p.sink != nullptr) denom += exp2f(__ldg(p.sink + h) * 1.4426950408889634f - m_use);
    const float inv = denom > 0.f ? 1.f / denom : 0.f;
    __nv_bfloat16* orow = p.out + (long long)t * p.out_st + (long long)h * p.out_sh + ch0;
#pragma unroll
    for (int s = 0; s < 4; ++s) {
      uint4 v;
      v.x = pack2(o[4 * s + 0][2 * half] * inv, o[4 * s + 0][2 * half + 1] * inv);
      v.y = pack2(o[4 * s + 1][2 * half] * inv, o[4 * s + 1][2 * half + 1] * inv);
      v.z = pack2(o[4 * s + 2][2 * half] * inv, o[4 * s + 2][2 * half + 1] * inv);
      v.w = pack2(o[4 * s + 3][2 * half] * inv, o[4 * s + 3][2 * half + 1] * inv);
      *reinterpret_cast<uint4*>(orow + 32 * s) = v;
    }
  }
}

}  // namespace

extern "C" {

// Launches on `stream`; returns a cudaError_t (0 = launched). H <= 16; topk_len = the effective
// row lengths (required); q / out rows need a 16-byte aligned channel start and out a 16-byte
// aligned head stride. No host synchronization, no workspace.
int dsa_sparse_mla_fwd16_sm90(const void* q, const void* kv, const void* idx, const void* topk_len,
                              const void* sink, void* out, void* lse, long long q_st, long long q_sh,
                              long long kv_s, long long idx_s, long long out_st, long long out_sh,
                              int T, int H, int Tk, int K, float scale_log2, void* stream) {
  if (T == 0 || H == 0) return 0;
  if (H > 16 || topk_len == nullptr) return static_cast<int>(cudaErrorInvalidValue);
  Params16 p;
  p.q = static_cast<const __nv_bfloat16*>(q);
  p.kv = static_cast<const __nv_bfloat16*>(kv);
  p.idx = static_cast<const int32_t*>(idx);
  p.topk_len = static_cast<const int32_t*>(topk_len);
  p.sink = static_cast<const float*>(sink);
  p.out = static_cast<__nv_bfloat16*>(out);
  p.lse = static_cast<float*>(lse);
  p.q_st = q_st; p.q_sh = q_sh; p.kv_s = kv_s; p.idx_s = idx_s; p.out_st = out_st; p.out_sh = out_sh;
  p.H = H; p.Tk = Tk; p.K = K;
  p.scale_log2 = scale_log2;
  static bool attr_set[64] = {};  // per device: raise the dynamic shared-memory limit once
  const cudaError_t e = dsa_sm90::set_smem_once(attr_set, sparse_mla_fwd16_sm90_kernel, SMEM16);
  if (e != cudaSuccess) return static_cast<int>(e);
  sparse_mla_fwd16_sm90_kernel<<<T, 128, SMEM16, static_cast<cudaStream_t>(stream)>>>(p);
  return static_cast<int>(cudaGetLastError());
}

}  // extern "C"
