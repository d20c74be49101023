// Sparse MLA forward for up to 16 heads (tensor-parallel shards), Hopper (sm_90a): the
// transposed problem on wgmma, a persistent CTA per SM, a deep ring of gathered keys.
//
// At 16 heads a row's selected kv rows (k x 1152 B) carry only 16 x k x 1088 x 2 FLOPs, so the
// forward is mostly a gather from L2 (36 GB for the causal S = 16K case). With the heads
// as wgmma's M (64) three quarters of the tensor work would be padding; here the keys are M:
//
//   S^T [64 keys, 16 heads]  = K [64 keys, 576] . Q^T        (m64n16k16, A = keys from
//                                                             registers, B = Q in smem)
//   O^T [512, 16 heads]     += V^T [512, 64 keys] . P^T      (m64n16k16, A = V read MN-major
//                                                             from the same kv rows, B = P^T)
//
// One persistent CTA of four warpgroups per SM walks rows t = blockIdx.x, + gridDim.x, ...
// (rows without keys are written directly: zeros, lse = -inf) in blocks of 64 keys:
//   WG2 (producer) gathers the selected kv rows, 16 keys per ring slot, into a 10-slot ring
//       (cp.async, completion on one mbarrier per slot) and runs ahead across rows; a slot is
//       refilled once WG1 has released it (a second mbarrier per slot).
//   WG0 (S^T) issues S^T for each block (warp w's 16 keys = one slot, ldmatrix'd into A
//       fragments twelve k-steps at a time; Q double-buffered in shared memory, the next row's
//       loaded while this one runs) and hands the fp32 accumulators to WG3 through shared
//       memory, so its wgmmas are never held up by the softmax.
//   WG3 (softmax) turns S^T into P^T (bf16, movmatrix-transposed) for WG1 through two
//       shared-memory buffers. The softmax is per head (a column), so its maximum spans the
//       4 warps. It is lazy: P is formed against the running maximum m; only when a score
//       exceeds m + 8 (log2 units; P <= 256 otherwise) do the warps exchange their block
//       maxima, raise m and pass the rescale factors to WG1 with the block (one
//       barrier-with-vote per block decides, uniformly). At a row's end it hands WG1 the
//       reciprocal row sums and writes lse.
//   WG1 (PV) accumulates O^T over the block's 4 slots, releases them, and at a row's end
//       scales by the reciprocal row sums and stores the output.
// Shared-memory tiles are 64-channel chunks [rows, 128 B] in the 128-byte swizzle wgmma reads
// (16-byte granule g of row r at g ^ (r % 8)). Invalid keys are zero-filled and masked; heads
// >= H are zero rows of Q and not stored. No host synchronization, no workspace.
#include "sm90_common.cuh"

namespace {

using namespace dsa_sm90;

constexpr int NCH16 = 9;                     // 64-channel chunks of a 576-channel row
constexpr int HT16 = 16;                     // heads (wgmma N)
constexpr int SK16 = 16;                     // keys per ring slot (one warp's rows of S^T)
constexpr int BK16 = 64;                     // keys per block (wgmma M)
constexpr int NS16 = 10;                     // ring slots
constexpr int CHK16 = SK16 * 128;            // one chunk of a slot: 16 rows x 128 B
constexpr int SLOT16 = NCH16 * CHK16;        // 18 KB
constexpr int QCH16 = HT16 * 128;            // one chunk of the query: 16 heads x 128 B
constexpr int QBUF16 = NCH16 * QCH16;        // one query: 18 KB
constexpr int OFF_KV16 = 0;
constexpr int OFF_Q16 = OFF_KV16 + NS16 * SLOT16;  // 2 query buffers
constexpr int OFF_P16 = OFF_Q16 + 2 * QBUF16;      // 2 x P^T [16 heads, 64 keys] bf16, 128 B rows
constexpr int OFF_AL16 = OFF_P16 + 2 * HT16 * 128; // 2 x {rescale flag, 16 alphas} (128 B each)
constexpr int OFF_X16 = OFF_AL16 + 2 * 128;        // [4 warps][16 heads] fp32: WG3's exchange
constexpr int OFF_ROW16 = OFF_X16 + 4 * HT16 * 4;  // [16] fp32: 1 / denominator of a row's heads
constexpr int OFF_S16 = OFF_ROW16 + HT16 * 4;      // S^T [2][128 threads][4] fp32 (WG0 -> WG3)
constexpr int OFF_BAR16 = OFF_S16 + 4096;          // NS16 full + NS16 empty mbarriers
constexpr int SMEM16 = OFF_BAR16 + 2 * NS16 * 8 + 1024;  // + slack to align the base to 1024 B
constexpr int THREADS16 = 512;
constexpr float LAZY16 = 8.f;                // rescale only when a score exceeds m + 8 (log2)
// named barriers: WG3 alone; P full / free of buffer b (WG3 + WG1); a row's sums ready / read
constexpr int BAR_SM16 = 1, BAR_PFULL16 = 2, BAR_PFREE16 = 4, BAR_ROWDONE16 = 6, BAR_ROWFREE16 = 7;
constexpr int BAR_SFULL16 = 8, BAR_SFREE16 = 9, BAR_SI16 = 10;  // S^T WG0 -> WG3; WG0 alone
// registers per thread after setmaxnreg (128 at entry): S^T 208, PV 160, producer 40,
// softmax 104 (sum 512 x 128 threads = the CTA's 65536)
constexpr int KG16 = 12;                     // S^T k-steps per A-register group (of 36)

using Params16 = FwdParams;

// A CTA's walk over its rows with keys (t = blockIdx.x, + gridDim.x, ...), the same in the S^T
// and the softmax warpgroups: the current row and its key count, the next row with keys and
// its count, the count of the row after that (loaded a row early), the row and block counters.
struct RowWalk16 {
  int t, kvl, t_next, kvl_next, pre2, r, j;
};

__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr) : "memory");
}
__device__ __forceinline__ uint32_t movm_trans(uint32_t x) {
  uint32_t y;
  asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;\n" : "=r"(y) : "r"(x));
  return y;
}
__device__ __forceinline__ void sts32(uint32_t addr, uint32_t v) {
  asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(addr), "r"(v) : "memory");
}
__device__ __forceinline__ void sts_f32(uint32_t addr, float v) {
  asm volatile("st.shared.f32 [%0], %1;\n" ::"r"(addr), "f"(v) : "memory");
}
__device__ __forceinline__ void sts_v4(uint32_t addr, float a, float b, float c, float d) {
  asm volatile("st.shared.v4.f32 [%0], {%1, %2, %3, %4};\n" ::"r"(addr), "f"(a), "f"(b), "f"(c), "f"(d) : "memory");
}
__device__ __forceinline__ void lds_v4(uint32_t addr, float& a, float& b, float& c, float& d) {
  asm volatile("ld.shared.v4.f32 {%0, %1, %2, %3}, [%4];\n" : "=f"(a), "=f"(b), "=f"(c), "=f"(d) : "r"(addr) : "memory");
}
__device__ __forceinline__ float lds_f32(uint32_t addr) {
  float v;
  asm volatile("ld.shared.f32 %0, [%1];\n" : "=f"(v) : "r"(addr) : "memory");
  return v;
}
// A fragments stay allocated until this point (the wgmmas reading them are known complete)
template <int N>
__device__ __forceinline__ void keep_live(uint32_t (&a)[N][4]) {
#pragma unroll
  for (int k = 0; k < N; ++k) asm volatile("" : "+r"(a[k][0]), "+r"(a[k][1]), "+r"(a[k][2]), "+r"(a[k][3]));
}
__device__ __forceinline__ float ex2(float x) {  // 2^x; -inf -> 0
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}
__device__ __forceinline__ bool bar_red_or(int id, int n, bool pred) {
  uint32_t r;
  asm volatile(
      "{\n.reg .pred p, q;\nsetp.ne.u32 p, %1, 0;\nbar.red.or.pred q, %2, %3, p;\nselp.u32 %0, 1, 0, q;\n}\n"
      : "=r"(r) : "r"(static_cast<uint32_t>(pred)), "r"(id), "r"(n) : "memory");
  return r != 0;
}
__device__ __forceinline__ void wgmma_m64n16k16_rs(float (&d)[8], const uint32_t (&a)[4], uint64_t db, int accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %13, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n16k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7}, {%8, %9, %10, %11}, %12, p, 1, 1, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(accumulate));
}
// A read MN-major (transposed), B K-major, accumulate
__device__ __forceinline__ void wgmma_m64n16k16_ss_ta(float (&d)[8], uint64_t da, uint64_t db) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n16k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7}, %8, %9, p, 1, 1, 1, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7])
      : "l"(da), "l"(db));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
__device__ __forceinline__ void cp_async_wait1() { asm volatile("cp.async.wait_group 1;\n" ::: "memory"); }

__device__ __forceinline__ int row_len16(const Params16& p, int t) {
  int n = p.K;
  if (p.topk_len != nullptr) n = min(n, max(0, __ldg(p.topk_len + t)));
  return n;
}

// accumulator element v of a m64n16 fragment: row (key or channel) + 8 * kv16(v), local head
// hv16(v) of the thread's heads 2 (lane % 4) + {0, 1, 8, 9}
__device__ __forceinline__ constexpr int hv16(int v) { return (v & 1) + 2 * (v >> 2); }
__device__ __forceinline__ constexpr int kv16(int v) { return (v >> 1) & 1; }

__global__ void __launch_bounds__(THREADS16, 1) sparse_mla_fwd16_sm90_kernel(const Params16 p) {
  extern __shared__ uint8_t smem_raw[];
  uint8_t* smem = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  const uint32_t sbase = smem_u32(smem);
  const uint32_t full0 = sbase + OFF_BAR16, empty0 = full0 + NS16 * 8;
  const int tid = threadIdx.x, wg = tid >> 7, wt = tid & 127;
  const int warp = wt >> 5, lane = tid & 31;
  const int c0 = 2 * (lane & 3);
  const int hd[4] = {c0, c0 + 1, c0 + 8, c0 + 9};  // the heads of this thread's accumulators
  const int stride = gridDim.x;

  if (tid == 0) {
#pragma unroll
    for (int s = 0; s < NS16; ++s) {
      mbar_init(full0 + 8 * s, 128);  // one cp.async arrival per producer thread
      mbar_init(empty0 + 8 * s, 4);   // one arrival per WG1 warp
    }
  }
  __syncthreads();

  if (wg == 2) {
    // ---------------- producer: gathers ----------------
    asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n" ::: "memory");
    const int prow = wt >> 3, psub = wt & 7;  // 8 threads per key row, whole 128-byte lines
    int t = blockIdx.x - stride, kvl = 0, nblk = 0, j = 0;
    auto advance = [&]() {  // the next block in the consumers' order (rows without keys skipped)
      ++j;
      while (j >= nblk) {
        t += stride;
        if (t >= p.T) return;
        kvl = row_len16(p, t);
        nblk = (kvl + BK16 - 1) / BK16;
        j = 0;
      }
    };
    auto load_ids = [&](int (&ids)[4]) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int key = j * BK16 + SK16 * i + prow;
        ids[i] = (t < p.T && key < kvl) ? __ldg(p.idx + (long long)t * p.idx_s + key) : -1;
      }
    };
    advance();
    int ids[4];
    load_ids(ids);
    uint32_t seq = 0;
    const uint32_t dst0 = sbase + OFF_KV16 + prow * 128 + ((psub ^ (prow & 7)) << 4);
    while (t < p.T) {
      advance();
      int nids[4];
      load_ids(nids);  // the next block's ids, a block ahead
#pragma unroll
      for (int i = 0; i < 4; ++i, ++seq) {
        const int s = seq % NS16;
        if (seq >= NS16) mbar_wait(empty0 + 8 * s, ((seq / NS16) - 1) & 1);
        const bool ok = ids[i] >= 0 && ids[i] < p.Tk;
        const __nv_bfloat16* src = p.kv + (long long)(ok ? ids[i] : 0) * p.kv_s + psub * 8;
        const uint32_t dst = dst0 + s * SLOT16;
#pragma unroll
        for (int c = 0; c < NCH16; ++c) cp_async16(dst + c * CHK16, src + c * 64, ok);
        cp_async_arrive_noinc(full0 + 8 * s);
      }
#pragma unroll
      for (int i = 0; i < 4; ++i) ids[i] = nids[i];
    }
    cp_async_wait_all();
    return;
  }

  if (wg == 1) {
    // ---------------- PV: O^T += V^T P^T, output ----------------
    asm volatile("setmaxnreg.inc.sync.aligned.u32 160;\n" ::: "memory");
    const uint64_t pdesc0 = desc(sbase + OFF_P16, 16, 1024);
    const uint64_t vdesc0 = desc(sbase + OFF_KV16, CHK16, 1024);
    float o[8][8];
#pragma unroll
    for (int c = 0; c < 8; ++c)
#pragma unroll
      for (int v = 0; v < 8; ++v) o[c][v] = 0.f;
    uint32_t k = 0;  // flat block counter (= ring position / 4)
    for (int t = blockIdx.x; t < p.T; t += stride) {
      const int nblk = (row_len16(p, t) + BK16 - 1) / BK16;
      __nv_bfloat16* orow = p.out + (long long)t * p.out_st;
      if (nblk == 0) {  // no keys: zeros
        for (int i = wt; i < HT16 * 64; i += 128) {
          const int h = i >> 6, g = i & 63;
          if (h < p.H) *reinterpret_cast<uint4*>(orow + (long long)h * p.out_sh + 8 * g) = make_uint4(0u, 0u, 0u, 0u);
        }
        continue;
      }
      for (int j = 0; j < nblk; ++j, ++k) {
        const int pb = k & 1;
        const uint32_t seq0 = 4 * k;
        bar_sync(BAR_PFULL16 + pb, 256);  // P^T (and the rescale, if any) of block k
        if (lds_f32(sbase + OFF_AL16 + pb * 128) != 0.f) {
          float al[4];
#pragma unroll
          for (int h = 0; h < 4; ++h) al[h] = lds_f32(sbase + OFF_AL16 + pb * 128 + 4 + 4 * hd[h]);
#pragma unroll
          for (int c = 0; c < 8; ++c)
#pragma unroll
            for (int v = 0; v < 8; ++v) o[c][v] *= al[hv16(v)];
        }
#pragma unroll
        for (int i = 0; i < 4; ++i) mbar_wait(full0 + 8 * ((seq0 + i) % NS16), ((seq0 + i) / NS16) & 1);
        fence_async_smem();
        // descriptors are linear in the address (bits 0-13 = address / 16, no carry below 256 KB)
        const uint64_t pdesc = pdesc0 + ((pb * HT16 * 128) >> 4);
        uint64_t vd[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) vd[i] = vdesc0 + ((((seq0 + i) % NS16) * SLOT16) >> 4);
        wgmma_fence();
#pragma unroll
        for (int c = 0; c < 8; ++c)
#pragma unroll
          for (int i = 0; i < 4; ++i)
            wgmma_m64n16k16_ss_ta(o[c], vd[i] + ((c * CHK16) >> 4), pdesc + ((i * 32) >> 4));
        wgmma_commit();
        wgmma_wait0();
        if (lane == 0) {
#pragma unroll
          for (int i = 0; i < 4; ++i) mbar_arrive(empty0 + 8 * ((seq0 + i) % NS16));
        }
        bar_arrive(BAR_PFREE16 + pb, 256);
      }
      // row end: 1 / denominator per head from WG3
      bar_sync(BAR_ROWDONE16, 256);
      float inv[4];
#pragma unroll
      for (int h = 0; h < 4; ++h) inv[h] = lds_f32(sbase + OFF_ROW16 + 4 * hd[h]);
      bar_arrive(BAR_ROWFREE16, 256);
#pragma unroll
      for (int c = 0; c < 8; ++c)
#pragma unroll
        for (int m = 0; m < 4; ++m) {
          // matrix m of chunk c: channels 64 c + 16 warp + 8 (m & 1) + [0, 8), heads 8 (m >> 1) + [0, 8)
          const uint32_t tr = movm_trans(bf16x2_bits(o[c][2 * m] * inv[hv16(2 * m)], o[c][2 * m + 1] * inv[hv16(2 * m + 1)]));
          const int h = (lane >> 2) + 8 * (m >> 1);
          if (h < p.H)
            *reinterpret_cast<uint32_t*>(orow + (long long)h * p.out_sh + 64 * c + 16 * warp + 8 * (m & 1) + 2 * (lane & 3)) = tr;
          o[c][2 * m] = 0.f;
          o[c][2 * m + 1] = 0.f;
        }
    }
    return;
  }

  // the key count of row t, 0 past the end (a load issued early and used a row later hides
  // its latency)
  auto len_of = [&](int t) -> int { return t < p.T ? row_len16(p, t) : 0; };
  // the next row with keys after t and its key count (len); rows without keys are skipped
  // (WG3 writes their lse). pre: len_of(t + stride), loaded beforehand.
  auto next_row = [&](int t, int pre, int& len, bool write_lse) -> int {
    for (t += stride; t < p.T; t += stride) {
      if (pre > 0) break;
      if (write_lse && wt < HT16 && wt < p.H) p.lse[(long long)t * p.H + wt] = -INFINITY;
      pre = len_of(t + stride);
    }
    len = pre;
    return t;
  };
  // the first rows with keys (rw.t >= T: none)
  auto walk_start = [&](bool write_lse) -> RowWalk16 {
    RowWalk16 rw;
    rw.t = blockIdx.x;
    rw.kvl = len_of(rw.t);
    rw.r = rw.j = 0;
    if (rw.t < p.T && rw.kvl == 0) {
      if (write_lse && wt < HT16 && wt < p.H) p.lse[(long long)rw.t * p.H + wt] = -INFINITY;
      rw.t = next_row(rw.t, len_of(rw.t + stride), rw.kvl, write_lse);
    }
    rw.t_next = rw.t < p.T ? next_row(rw.t, len_of(rw.t + stride), rw.kvl_next, write_lse) : p.T;
    rw.pre2 = len_of(rw.t_next + stride);
    return rw;
  };
  // at a row's end: on to the next row with keys
  auto walk_advance = [&](RowWalk16& rw, bool write_lse) {
    int len2;
    const int t2 = next_row(rw.t_next, rw.pre2, len2, write_lse);
    rw.t = rw.t_next;
    rw.kvl = rw.kvl_next;
    rw.t_next = t2;
    rw.kvl_next = len2;
    rw.pre2 = len_of(t2 + stride);
    ++rw.r;
    rw.j = 0;
  };

  if (wg == 0) {
    // ---------------- WG0: S^T ----------------
    asm volatile("setmaxnreg.inc.sync.aligned.u32 208;\n" ::: "memory");
    // ldmatrix: lane L supplies row (L / 8 % 2) * 8 + L % 8 of its warp's slot, granule + L / 16
    const int lrow = ((lane >> 3) & 1) * 8 + (lane & 7), lgr = lane >> 4;
    const uint64_t qdesc0 = desc(sbase + OFF_Q16, 16, 1024);
    auto issue_q = [&](int t, int qb) {
      if (t < p.T) {
        const __nv_bfloat16* qrow = p.q + (long long)t * p.q_st;
#pragma unroll
        for (int i = 0; i < 9; ++i) {
          const int f = wt + 128 * i, h = f / 72, g = f % 72, c = g >> 3, gr = g & 7;
          const bool ok = h < p.H;
          cp_async16(sbase + OFF_Q16 + qb * QBUF16 + c * QCH16 + h * 128 + ((gr ^ (h & 7)) << 4),
                     qrow + (long long)(ok ? h : 0) * p.q_sh + g * 8, ok);
        }
      }
      cp_async_commit();
    };
    // S^T of the block at ring position seq0 into sacc, with the query in buffer qb. dummy: no
    // block left; the same wgmma sequence is issued on whatever the slots hold and its result
    // is not used (keeps ptxas from serializing wgmma). A fragments: two register sets.
    auto issue_s = [&](uint32_t seq0, int qb, float (&sacc)[8], bool dummy) {
      if (!dummy) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int ii = (i + warp) & 3;  // own slot first
          mbar_wait(full0 + 8 * ((seq0 + ii) % NS16), ((seq0 + ii) / NS16) & 1);
        }
      }
      const uint32_t abase = sbase + OFF_KV16 + ((seq0 + warp) % NS16) * SLOT16 + lrow * 128;
      const uint64_t qd = qdesc0 + ((qb * QBUF16) >> 4);
      uint32_t a[2][KG16][4];
#pragma unroll
      for (int g = 0; g < 36 / KG16; ++g) {
        if (g >= 2) {
          wgmma_wait1();  // group g - 2's wgmmas are done
          keep_live(a[g & 1]);
        }
#pragma unroll
        for (int kk = 0; kk < KG16; ++kk) {
          const int c = (KG16 * g + kk) / 4, q = (KG16 * g + kk) % 4;
          ldsm_x4(a[g & 1][kk], abase + c * CHK16 + (((2 * q + lgr) ^ (lane & 7)) << 4));
        }
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < KG16; ++kk) {
          const int c = (KG16 * g + kk) / 4, q = (KG16 * g + kk) % 4;
          wgmma_m64n16k16_rs(sacc, a[g & 1][kk], qd + ((c * QCH16 + q * 32) >> 4), (c | q) != 0);
        }
        wgmma_commit();
      }
      wgmma_wait0();
      keep_live(a[0]);
      keep_live(a[1]);
    };

    RowWalk16 rw = walk_start(false);
    if (rw.t >= p.T) return;
    issue_q(rw.t, 0);
    issue_q(rw.t_next, 1);
    cp_async_wait1();
    fence_async_smem();
    bar_sync(BAR_SI16, 128);  // the first query has landed
    int nblk = (rw.kvl + BK16 - 1) / BK16;
    float sacc[8];
    issue_s(0, 0, sacc, false);
    for (uint32_t k = 0;; ++k) {
      if (k >= 1) bar_sync(BAR_SFREE16, 256);  // WG3 has read block k - 1's S^T
      sts_v4(sbase + OFF_S16 + wt * 16, sacc[0], sacc[1], sacc[2], sacc[3]);
      sts_v4(sbase + OFF_S16 + 2048 + wt * 16, sacc[4], sacc[5], sacc[6], sacc[7]);
      bar_arrive(BAR_SFULL16, 256);
      if (++rw.j == nblk) {  // the row's last block: its query buffer takes the row after next
        walk_advance(rw, false);
        issue_q(rw.t_next, (rw.r - 1) & 1);
        if (rw.t < p.T) {
          nblk = (rw.kvl + BK16 - 1) / BK16;
          cp_async_wait1();  // this row's query (the one after it may still be in flight)
          fence_async_smem();
          bar_sync(BAR_SI16, 128);
        }
      }
      const bool done = rw.t >= p.T;
      issue_s(4 * (k + 1), rw.r & 1, sacc, done);
      if (done) {
        bar_sync(BAR_SFREE16, 256);  // match WG3's arrival on the last block
        break;
      }
    }
    cp_async_wait_all();
    return;
  }

  // ---------------- WG3: softmax, row sums ----------------
  asm volatile("setmaxnreg.dec.sync.aligned.u32 104;\n" ::: "memory");
  const int krow = warp * 16 + (lane >> 2);  // block-relative key row of this thread (+ 8)
  const uint32_t xs = sbase + OFF_X16;
  // the sink's logits per head of this thread (log2 units), read once
  float sink2[4];
#pragma unroll
  for (int h = 0; h < 4; ++h)
    sink2[h] = (p.sink != nullptr && hd[h] < p.H) ? __ldg(p.sink + hd[h]) * 1.4426950408889634f : -INFINITY;
  auto write_pt = [&](int pb, const float (&e)[8]) {
    // the warp's 16 x 16 (keys x heads) tile as four 8 x 8 matrices, transposed to heads x keys
#pragma unroll
    for (int m = 0; m < 4; ++m) {
      const uint32_t tr = movm_trans(bf16x2_bits(e[2 * m], e[2 * m + 1]));
      // m: 0 = keys 0-7 / heads 0-7, 1 = keys 8-15 / heads 0-7, 2 = keys 0-7 / heads 8-15, 3
      const int h = (lane >> 2) + 8 * (m >> 1), gk = 2 * warp + (m & 1);
      sts32(sbase + OFF_P16 + pb * HT16 * 128 + h * 128 + ((gk ^ (h & 7)) << 4) + 4 * (lane & 3), tr);
    }
  };

  RowWalk16 rw = walk_start(true);
  if (rw.t >= p.T) return;
  int nblk = (rw.kvl + BK16 - 1) / BK16;
  long long idx_off = (long long)rw.t * p.idx_s;
  float mu[4] = {-INFINITY, -INFINITY, -INFINITY, -INFINITY};  // running max per head (log2)
  float lp[4] = {0.f, 0.f, 0.f, 0.f};                          // this thread's row-sum parts
  int idn[2];  // ids of this thread's two keys of the next block
  auto load_key_ids = [&]() {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int key = rw.j * BK16 + krow + 8 * i;
      idn[i] = key < rw.kvl ? __ldg(p.idx + idx_off + key) : -1;
    }
  };
  load_key_ids();
  for (uint32_t k = 0;; ++k) {
    const bool vk[2] = {idn[0] >= 0 && idn[0] < p.Tk, idn[1] >= 0 && idn[1] < p.Tk};
    bar_sync(BAR_SFULL16, 256);  // block k's S^T from WG0
    float sacc[8];
    lds_v4(sbase + OFF_S16 + wt * 16, sacc[0], sacc[1], sacc[2], sacc[3]);
    lds_v4(sbase + OFF_S16 + 2048 + wt * 16, sacc[4], sacc[5], sacc[6], sacc[7]);
    bar_arrive(BAR_SFREE16, 256);
    // ---- softmax against the running maximum ----
    float s[8], e[8], sum[4] = {0.f, 0.f, 0.f, 0.f};
    bool over = false;
#pragma unroll
    for (int v = 0; v < 8; ++v) {
      s[v] = vk[kv16(v)] ? sacc[v] * p.scale_log2 : -INFINITY;
      over |= s[v] > mu[hv16(v)] + LAZY16;
    }
#pragma unroll
    for (int v = 0; v < 8; ++v) {
      const float m = mu[hv16(v)];
      e[v] = ex2(s[v] - (m == -INFINITY ? 0.f : m));
      sum[hv16(v)] += e[v];
    }
    const int pb = k & 1;
    if (k >= 2) bar_sync(BAR_PFREE16 + pb, 256);  // WG1 is done with block k - 2's buffers
    write_pt(pb, e);
    fence_async_smem();
    const bool any = bar_red_or(BAR_SM16, 128, over);
    if (any) {
      // exchange the block's per-head maxima, raise m, recompute P, pass the rescale to WG1
      float bm[4];
#pragma unroll
      for (int h = 0; h < 4; ++h) {
        float x = fmaxf(s[(h & 1) + 4 * (h >> 1)], s[(h & 1) + 4 * (h >> 1) + 2]);
        x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 4));
        x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 8));
        x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 16));
        bm[h] = x;
      }
      if (lane < 4) {
#pragma unroll
        for (int h = 0; h < 4; ++h) sts_f32(xs + 4 * (warp * HT16 + hd[h]), bm[h]);
      }
      bar_sync(BAR_SM16, 128);
#pragma unroll
      for (int h = 0; h < 4; ++h) {
        float x = mu[h];
#pragma unroll
        for (int w = 0; w < 4; ++w) x = fmaxf(x, lds_f32(xs + 4 * (w * HT16 + hd[h])));
        const float alpha = x == mu[h] ? 1.f : ex2(mu[h] - x);
        mu[h] = x;
        sum[h] = 0.f;
        lp[h] *= alpha;
        if (warp == 0 && lane < 4) sts_f32(sbase + OFF_AL16 + pb * 128 + 4 + 4 * hd[h], alpha);
      }
      if (wt == 0) sts_f32(sbase + OFF_AL16 + pb * 128, 1.f);
#pragma unroll
      for (int v = 0; v < 8; ++v) {
        const float m = mu[hv16(v)];
        e[v] = ex2(s[v] - (m == -INFINITY ? 0.f : m));
        sum[hv16(v)] += e[v];
      }
      write_pt(pb, e);
      fence_async_smem();
      bar_sync(BAR_SM16, 128);  // P^T rewritten (and every thread has read the maxima)
    } else if (wt == 0) {
      sts_f32(sbase + OFF_AL16 + pb * 128, 0.f);
    }
#pragma unroll
    for (int h = 0; h < 4; ++h) lp[h] += sum[h];
    bar_arrive(BAR_PFULL16 + pb, 256);  // block k's P^T (and rescale) is ready for WG1
    // ---- the row's last block: sums to WG1, lse, the next row ----
    if (++rw.j == nblk) {
#pragma unroll
      for (int h = 0; h < 4; ++h) {
        float x = lp[h];
        x += __shfl_xor_sync(0xffffffffu, x, 4);
        x += __shfl_xor_sync(0xffffffffu, x, 8);
        x += __shfl_xor_sync(0xffffffffu, x, 16);
        lp[h] = x;
      }
      if (lane < 4) {
#pragma unroll
        for (int h = 0; h < 4; ++h) sts_f32(xs + 4 * (warp * HT16 + hd[h]), lp[h]);
      }
      bar_sync(BAR_SM16, 128);
      float inv[4];
#pragma unroll
      for (int h = 0; h < 4; ++h) {
        float l = 0.f;
#pragma unroll
        for (int w = 0; w < 4; ++w) l += lds_f32(xs + 4 * (w * HT16 + hd[h]));
        const float mz = mu[h] == -INFINITY ? 0.f : mu[h];
        const float denom = l + ex2(sink2[h] - mz);  // (+ 0 without a sink)
        inv[h] = denom > 0.f ? 1.f / denom : 0.f;
        if (warp == 0 && lane < 4 && hd[h] < p.H)
          p.lse[(long long)rw.t * p.H + hd[h]] = l > 0.f ? (mz + log2f(l)) * 0.6931471805599453f : -INFINITY;
      }
      if (rw.r > 0) bar_sync(BAR_ROWFREE16, 256);  // WG1 has read the previous row's sums
      if (warp == 0 && lane < 4) {
#pragma unroll
        for (int h = 0; h < 4; ++h) sts_f32(sbase + OFF_ROW16 + 4 * hd[h], inv[h]);
      }
      bar_arrive(BAR_ROWDONE16, 256);
      // every thread has read xs before another block's exchange writes it
      bar_sync(BAR_SM16, 128);
      walk_advance(rw, true);
#pragma unroll
      for (int h = 0; h < 4; ++h) {
        mu[h] = -INFINITY;
        lp[h] = 0.f;
      }
      if (rw.t >= p.T) {
        // match WG1's arrivals on the last two blocks' buffers and on the last row's sums
        if (k >= 1) bar_sync(BAR_PFREE16 + ((k + 1) & 1), 256);
        bar_sync(BAR_PFREE16 + (k & 1), 256);
        bar_sync(BAR_ROWFREE16, 256);
        break;
      }
      nblk = (rw.kvl + BK16 - 1) / BK16;
      idx_off = (long long)rw.t * p.idx_s;
    }
    load_key_ids();
  }
}

}  // namespace

extern "C" {

// Launches on `stream`; returns a cudaError_t (0 = launched). H <= 16; q / kv rows 16-byte
// aligned (channel stride 1, row strides multiples of 8 elements); out rows 16-byte aligned.
// No host synchronization, no workspace.
int dsa_sparse_mla_fwd16_sm90(const void* q, const void* kv, const void* idx, const void* topk_len,
                              const void* sink, void* out, void* lse, long long q_st, long long q_sh,
                              long long kv_s, long long idx_s, long long out_st, long long out_sh,
                              int T, int H, int Tk, int K, float scale_log2, void* stream) {
  if (T == 0 || H == 0) return 0;
  if (H > HT16 || (reinterpret_cast<uintptr_t>(out) & 15) != 0 || out_st % 8 != 0 || out_sh % 8 != 0)
    return static_cast<int>(cudaErrorInvalidValue);
  const Params16 p = dsa_sm90::fwd_params(q, kv, idx, topk_len, sink, out, lse, q_st, q_sh, kv_s, idx_s, out_st,
                                          out_sh, T, H, Tk, K, scale_log2);
  static bool attr_set[64] = {};  // per device: raise the dynamic shared-memory limit once
  static int n_sm[64] = {};
  cudaError_t e = dsa_sm90::set_smem_once(attr_set, sparse_mla_fwd16_sm90_kernel, SMEM16);
  if (e != cudaSuccess) return static_cast<int>(e);
  int dev = 0;
  e = cudaGetDevice(&dev);
  if (e != cudaSuccess) return static_cast<int>(e);
  int sms = (dev >= 0 && dev < 64) ? n_sm[dev] : 0;
  if (sms == 0) {
    e = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
    if (e != cudaSuccess) return static_cast<int>(e);
    if (dev >= 0 && dev < 64) n_sm[dev] = sms;
  }
  const unsigned grid = static_cast<unsigned>(T < sms ? T : sms);
  sparse_mla_fwd16_sm90_kernel<<<grid, THREADS16, SMEM16, static_cast<cudaStream_t>(stream)>>>(p);
  return static_cast<int>(cudaGetLastError());
}

}  // extern "C"
