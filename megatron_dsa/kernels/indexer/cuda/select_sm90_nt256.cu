// The select with 256 threads per CTA (select_sm90.cuh): 10,240 registers, so that one CTA fits
// on an SM beside two bf16 score programs (51,200) when the pipeline overlaps a chunk's select
// with the next chunk's scores (triton_impl, SELECT_OVERLAP).
#define DSA_SELECT_NT 256
#include "select_sm90.cu"

extern "C" {

// dsa_indexer_select's contract, 256 threads per CTA.
int dsa_indexer_select_nt256(const void* buf, long long sb_b, long long sb_r, const void* starts, const void* ends,
                             long long sse_b, long long sse_t, int causal, int global_ids, int row0, int n_rows, int B,
                             int S, int K, void* idx, void* vals, long long so_b, long long so_t, void* stream) {
  return launch_select(buf, sb_b, sb_r, starts, ends, sse_b, sse_t, causal, global_ids, row0, n_rows, B, S, K, idx,
                       vals, so_b, so_t, stream);
}

}  // extern "C"
