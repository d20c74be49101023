// The indexer's CUDA select kernel (megatron_dsa/kernels/indexer/cuda/select_sm90.cuh) run on
// the CPU through simt.h, with the entry point's arguments: see test_indexer_cuda.py.
// dsa_indexer_select: the same under the library's own name and signature (the stream is
// ignored), so that cuda_impl's launcher can be pointed at it.
#include <cstring>

#include "simt.h"

namespace {
alignas(16) unsigned char smem_raw[1 << 17];
}

#include "select_sm90.cuh"

extern "C" int emu_indexer_select(const void* buf, long long sb_b, long long sb_r, const void* starts,
                                  const void* ends, long long sse_b, long long sse_t, int causal, int global_ids,
                                  int row0, int n_rows, int B, int S, int K, void* idx, void* vals, long long so_b,
                                  long long so_t) {
  if (K <= 0 || K > CAND_CAP) return 1;
  if (sizeof(Smem) > sizeof(smem_raw)) return 2;
  std::memset(smem_raw, 0xA5, sizeof(smem_raw));  // (shared memory starts as garbage, as on the GPU)
  simt::launch(static_cast<unsigned>(n_rows), static_cast<unsigned>(B), NT, select_kernel,
               static_cast<const float*>(buf), sb_b, sb_r, static_cast<const int32_t*>(starts),
               static_cast<const int32_t*>(ends), sse_b, sse_t, causal, global_ids, row0, S, K,
               static_cast<int32_t*>(idx), static_cast<float*>(vals), so_b, so_t);
  return 0;
}

extern "C" int dsa_indexer_select(const void* buf, long long sb_b, long long sb_r, const void* starts,
                                  const void* ends, long long sse_b, long long sse_t, int causal, int global_ids,
                                  int row0, int n_rows, int B, int S, int K, void* idx, void* vals, long long so_b,
                                  long long so_t, void* stream) {
  (void)stream;
  if (n_rows <= 0 || B <= 0) return 0;
  return emu_indexer_select(buf, sb_b, sb_r, starts, ends, sse_b, sse_t, causal, global_ids, row0, n_rows, B, S, K,
                            idx, vals, so_b, so_t);
}
