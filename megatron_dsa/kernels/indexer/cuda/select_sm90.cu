// C entry point of the select kernel (select_sm90.cuh, where the algorithm is described).
#include <cuda_runtime.h>

#include "../../sparse_mla/cuda/sm90_common.cuh"
#include "select_sm90.cuh"

namespace {

// Top-k of rows [row0, row0 + n_rows) of B batches. buf: fp32 scores, row r of the launch at
// buf + b * sb_b + r * sb_r (element strides); starts / ends: int32 [B, T] windows (strides
// sse_b, sse_t) unless causal (row t: keys [0, t + 1)); idx / vals: int32 / fp32 [B, T, K]
// (strides so_b, so_t). K <= 6144. Returns a cudaError_t (0 = launched).
int launch_select(const void* buf, long long sb_b, long long sb_r, const void* starts, const void* ends,
                  long long sse_b, long long sse_t, int causal, int global_ids, int row0, int n_rows, int B, int S,
                  int K, void* idx, void* vals, long long so_b, long long so_t, void* stream) {
  if (n_rows <= 0 || B <= 0) return 0;
  if (K <= 0 || K > CAND_CAP) return static_cast<int>(cudaErrorInvalidValue);
  const int smem = static_cast<int>(sizeof(Smem));
  static bool attr_set[64] = {};  // per device: raise the dynamic shared-memory limit once
  const cudaError_t err = dsa_sm90::set_smem_once(attr_set, select_kernel, smem);
  if (err != cudaSuccess) return static_cast<int>(err);
  select_kernel<<<dim3(static_cast<unsigned>(n_rows), static_cast<unsigned>(B)), NT, smem,
                  static_cast<cudaStream_t>(stream)>>>(
      static_cast<const float*>(buf), sb_b, sb_r, static_cast<const int32_t*>(starts),
      static_cast<const int32_t*>(ends), sse_b, sse_t, causal, global_ids, row0, S, K,
      static_cast<int32_t*>(idx), static_cast<float*>(vals), so_b, so_t);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

extern "C" {

int dsa_indexer_select(const void* buf, long long sb_b, long long sb_r, const void* starts, const void* ends,
                       long long sse_b, long long sse_t, int causal, int global_ids, int row0, int n_rows, int B,
                       int S, int K, void* idx, void* vals, long long so_b, long long so_t, void* stream) {
  return launch_select(buf, sb_b, sb_r, starts, ends, sse_b, sse_t, causal, global_ids, row0, n_rows, B, S, K, idx,
                       vals, so_b, so_t, stream);
}

}  // extern "C"
