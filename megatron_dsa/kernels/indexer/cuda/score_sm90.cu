// C entry point and PTX helpers of the indexer's CUDA score kernel (score_sm90.cuh, where the
// algorithm is described).
#include <cuda_runtime.h>
#include <stdint.h>

#include "../../sparse_mla/cuda/sm90_common.cuh"

namespace dsa_sm90 {

// d[64] (+)= A [64 x 32] . B [128 x 32]^T, e4m3 operands in shared memory, both K-major.
__device__ __forceinline__ void wgmma_m64n128k32_e4m3(float (&d)[64], uint64_t da, uint64_t db, int accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, %64, %65, p, 1, 1;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
      : "l"(da), "l"(db), "r"(accumulate));
}

// d[64] (+)= A [64 x 16] . B [128 x 16]^T, bf16 operands in shared memory, both K-major.
__device__ __forceinline__ void wgmma_m64n128k16_bf16(float (&d)[64], uint64_t da, uint64_t db, int accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, %64, %65, p, 1, 1, 0, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
      : "l"(da), "l"(db), "r"(accumulate));
}

// ReLU that keeps NaN (as torch.relu and the Triton kernel)
__device__ __forceinline__ float relu_nan(float x) {
  float y;
  asm("max.NaN.f32 %0, %1, 0f00000000;" : "=f"(y) : "f"(x));
  return y;
}

template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

}  // namespace dsa_sm90

#include "score_sm90.cuh"

namespace {

template <bool FP8, bool RELU>
int launch(const ScoreParams& p, int B, cudaStream_t stream) {
  static bool done[64] = {};
  const int bytes = Cfg<FP8>::smem_bytes(p.H);
  // the limit for the most heads, set once per device (a later call may have more heads)
  cudaError_t e = set_smem_once(done, score_kernel<FP8, RELU>, Cfg<FP8>::smem_bytes(MAX_H));
  if (e != cudaSuccess) return static_cast<int>(e);
  const int keys = p.causal ? min(p.S, p.row0 + p.n_rows) : p.S;
  const dim3 grid((keys + BN - 1) / BN, (p.n_rows + 2 * BMW - 1) / (2 * BMW), B);
  score_kernel<FP8, RELU><<<grid, THREADS, bytes, stream>>>(p);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

extern "C" {

// Scores of rows [row0, row0 + n_rows) (see the header comment). fp8: q / k are e4m3 (else
// bf16); ks: fp32 [B, S] per-key scales or null; starts / ends: int32 [B, T] unless causal.
// Strides in elements. D = 128, 1 <= H <= 128, 16-byte aligned q / k rows. Returns a
// cudaError_t (0 = launched).
int dsa_indexer_score_sm90(int fp8, int relu, const void* q, const void* k, const void* w, const void* starts,
                           const void* ends, const void* ks, void* out, long long sq_b, long long sq_t,
                           long long sq_h, long long sk_b, long long sk_s, long long sw_b, long long sw_t,
                           long long sw_h, long long sse_b, long long sse_t, long long so_b, long long so_r,
                           long long sks_b, int row0, int n_rows, int T, int S, int H, int causal, int B,
                           void* stream) {
  if (n_rows <= 0 || B <= 0 || S <= 0) return 0;
  if (H < 1 || H > MAX_H) return static_cast<int>(cudaErrorInvalidValue);
  ScoreParams p{static_cast<const uint8_t*>(q), static_cast<const uint8_t*>(k), static_cast<const float*>(w),
                static_cast<const int32_t*>(starts), static_cast<const int32_t*>(ends),
                static_cast<const float*>(ks), static_cast<float*>(out), sq_b, sq_t, sq_h, sk_b, sk_s, sw_b, sw_t,
                sw_h, sse_b, sse_t, so_b, so_r, sks_b, row0, n_rows, T, S, H, causal};
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  if (fp8) return relu ? launch<true, true>(p, B, st) : launch<true, false>(p, B, st);
  return relu ? launch<false, true>(p, B, st) : launch<false, false>(p, B, st);
}

}  // extern "C"
