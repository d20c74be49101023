// Per-row effective length of a top-k index list, for the sparse MLA kernels of this library:
// one past the last slot holding an id >= 0, capped by the optional per-row valid count
// (topk_length, clamped to [0, K]). The forward and backward stop each row there, so causal
// rows t < k, whose lists end in -1 padding, do not compute masked blocks.
//
// One warp per row reads the row once (16-byte loads where the row allows them) and reduces
// the lane maxima with shuffles: one launch in place of the five element-wise / reduction
// launches of the PyTorch expression (cuda_impl._effective_lengths_torch, the reference the
// GPU test compares with). No host synchronization.
#include <cstdint>

#include <cuda_runtime.h>

namespace {

constexpr int WARPS = 8;

__global__ void __launch_bounds__(WARPS * 32) row_lengths_kernel(const int32_t* __restrict__ idx, long long idx_s,
                                                                  const int32_t* __restrict__ cap, int T, int K,
                                                                  int vec4, int32_t* __restrict__ out) {
  const int lane = threadIdx.x & 31;
  const long long row = static_cast<long long>(blockIdx.x) * WARPS + (threadIdx.x >> 5);
  if (row >= T) return;
  const int32_t* r = idx + row * idx_s;
  int last = 0;  // one past the last valid slot this lane saw
  if (vec4) {    // K % 4 == 0 and 16-byte aligned rows (checked by the host)
    const int4* r4 = reinterpret_cast<const int4*>(r);
    for (int j = lane; j < K / 4; j += 32) {
      const int4 v = __ldg(r4 + j);
      if (v.x >= 0) last = 4 * j + 1;
      if (v.y >= 0) last = 4 * j + 2;
      if (v.z >= 0) last = 4 * j + 3;
      if (v.w >= 0) last = 4 * j + 4;
    }
  } else {
    for (int j = lane; j < K; j += 32)
      if (__ldg(r + j) >= 0) last = j + 1;
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) last = max(last, __shfl_xor_sync(0xffffffffu, last, o));
  if (lane == 0) {
    if (cap != nullptr) last = min(last, min(max(__ldg(cap + row), 0), K));
    out[row] = last;
  }
}

}  // namespace

extern "C" {

// idx: int32 [T, K] with row stride idx_s (elements); cap: int32 [T] or null; out: int32 [T].
// Returns a cudaError_t (0 = launched).
int dsa_row_lengths(const void* idx, long long idx_s, const void* cap, int T, int K, void* out, void* stream) {
  if (T <= 0) return 0;
  const bool vec4 = K % 4 == 0 && idx_s % 4 == 0 && (reinterpret_cast<uintptr_t>(idx) & 15) == 0;
  const unsigned grid = static_cast<unsigned>((static_cast<long long>(T) + WARPS - 1) / WARPS);
  row_lengths_kernel<<<grid, WARPS * 32, 0, static_cast<cudaStream_t>(stream)>>>(
      static_cast<const int32_t*>(idx), idx_s, static_cast<const int32_t*>(cap), T, K, vec4 ? 1 : 0,
      static_cast<int32_t*>(out));
  return static_cast<int>(cudaGetLastError());
}

}  // extern "C"
