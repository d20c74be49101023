// Row packing for the <= 32-head kernels (the kernel and its phases: pack_rows.cuh): the launcher.
#include <cstdint>

#include <cuda_runtime.h>

#include "pack_rows.cuh"
#include "sm90_common.cuh"

using dsa_pack::pack_rows_kernel;

extern "C" {

// Shared memory one CTA needs for R rows of K slots over Tk keys (bytes): the least, the bitmaps'
// (the kernel stages its outputs too where they fit beside them).
long long dsa_pack_rows_smem(int R, int K, int Tk) {
  return dsa_pack::smem_bytes(R, K, static_cast<int>((static_cast<long long>(Tk) + 31) / 32), false);
}

// idx: int32 [T, K], row stride idx_st (elements), unit column stride; len: int32 [T] or null;
// uid: int32 [G, R K]; uslot: int16 [G, R, R K] (both 4-byte aligned, else cudaErrorInvalidValue);
// count: int32 [G]; G = ceil(T / R), R = 2 or 4. Every element of uid / uslot / count is written.
// Returns a cudaError_t (0 = launched).
int dsa_pack_rows(const void* idx, long long idx_st, const void* len, int T, int K, int Tk, int R, void* uid,
                  void* uslot, void* count, void* stream) {
  if ((R != 2 && R != 4) || K < 1 || K > 32767 || Tk < 1 || T < 0) return static_cast<int>(cudaErrorInvalidValue);
  if (((reinterpret_cast<uintptr_t>(uid) | reinterpret_cast<uintptr_t>(uslot)) & 3) != 0)
    return static_cast<int>(cudaErrorInvalidValue);
  if (T == 0) return 0;
  const int W = static_cast<int>((static_cast<long long>(Tk) + 31) / 32);
  int dev = 0, optin = 0;
  cudaError_t e = cudaGetDevice(&dev);
  if (e == cudaSuccess) e = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  if (e != cudaSuccess) return static_cast<int>(e);
  const bool stage = dsa_pack::smem_bytes(R, K, W, true) <= optin;
  const long long bytes = dsa_pack::smem_bytes(R, K, W, stage);
  if (bytes > optin) return static_cast<int>(cudaErrorInvalidValue);
  auto kernel = stage ? pack_rows_kernel<true> : pack_rows_kernel<false>;
  static bool smem_set[2][64] = {};
  if (bytes > 48 * 1024) {
    e = dsa_sm90::set_smem_once(smem_set[stage], kernel, optin);
    if (e != cudaSuccess) return static_cast<int>(e);
  }
  const int G = (T + R - 1) / R;
  kernel<<<G, dsa_pack::THREADS, static_cast<size_t>(bytes), static_cast<cudaStream_t>(stream)>>>(
      static_cast<const int32_t*>(idx), idx_st, static_cast<const int32_t*>(len), T, K, Tk, R, W,
      static_cast<int32_t*>(uid), static_cast<int16_t*>(uslot), static_cast<int32_t*>(count));
  return static_cast<int>(cudaGetLastError());
}

}  // extern "C"
