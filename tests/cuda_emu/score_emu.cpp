// The indexer's CUDA score kernel (megatron_dsa/kernels/indexer/cuda/score_sm90.cuh) run on the
// CPU through simt.h and sm90_emu.h, with the C entry point's arguments (no stream): see
// test_indexer_cuda.py. Returns 3 when sm90_emu.h saw an asynchrony hazard (printed to stderr).
// dsa_indexer_score_sm90: the same under the library's own name and signature (the stream is
// ignored), so that cuda_impl's launcher can be pointed at it.
#include "sm90_emu.h"

#include "score_sm90.cuh"

extern "C" int emu_indexer_score(int fp8, int relu, const void* q, const void* k, const void* w, const void* starts,
                                 const void* ends, const void* ks, void* out, long long sq_b, long long sq_t,
                                 long long sq_h, long long sk_b, long long sk_s, long long sw_b, long long sw_t,
                                 long long sw_h, long long sse_b, long long sse_t, long long so_b, long long so_r,
                                 long long sks_b, int row0, int n_rows, int T, int S, int H, int causal, int B) {
  if (n_rows <= 0 || B <= 0 || S <= 0) return 0;
  if (H < 1 || H > MAX_H) return 1;
  ScoreParams p{static_cast<const uint8_t*>(q), static_cast<const uint8_t*>(k), static_cast<const float*>(w),
                static_cast<const int32_t*>(starts), static_cast<const int32_t*>(ends),
                static_cast<const float*>(ks), static_cast<float*>(out), sq_b, sq_t, sq_h, sk_b, sk_s, sw_b, sw_t,
                sw_h, sse_b, sse_t, so_b, so_r, sks_b, row0, n_rows, T, S, H, causal};
  if ((fp8 ? Cfg<true>::smem_bytes(H) : Cfg<false>::smem_bytes(H)) > static_cast<int>(sizeof(smem_raw))) return 2;
  const int keys = causal ? std::min(S, row0 + n_rows) : S;
  dsa_sm90::emu::begin();
  const unsigned gx = (keys + BN - 1) / BN, gy = (n_rows + 2 * BMW - 1) / (2 * BMW), gz = B;
  if (fp8) {
    if (relu) simt::launch3(gx, gy, gz, THREADS, score_kernel<true, true>, p);
    else simt::launch3(gx, gy, gz, THREADS, score_kernel<true, false>, p);
  } else {
    if (relu) simt::launch3(gx, gy, gz, THREADS, score_kernel<false, true>, p);
    else simt::launch3(gx, gy, gz, THREADS, score_kernel<false, false>, p);
  }
  return dsa_sm90::emu::first_error.empty() ? 0 : 3;  // a hazard, printed to stderr
}

extern "C" int dsa_indexer_score_sm90(int fp8, int relu, const void* q, const void* k, const void* w,
                                      const void* starts, const void* ends, const void* ks, void* out, long long sq_b,
                                      long long sq_t, long long sq_h, long long sk_b, long long sk_s, long long sw_b,
                                      long long sw_t, long long sw_h, long long sse_b, long long sse_t,
                                      long long so_b, long long so_r, long long sks_b, int row0, int n_rows, int T,
                                      int S, int H, int causal, int B, void* stream) {
  (void)stream;
  return emu_indexer_score(fp8, relu, q, k, w, starts, ends, ks, out, sq_b, sq_t, sq_h, sk_b, sk_s, sw_b, sw_t, sw_h,
                           sse_b, sse_t, so_b, so_r, sks_b, row0, n_rows, T, S, H, causal, B);
}
