// The row-packing kernel (megatron_dsa/kernels/sparse_mla/cuda/pack_rows.cuh) run on the CPU
// through simt.h, with the launcher's arguments and a choice of variant: see
// test_sparse_mla_packing.py.
#include <cstdint>

#include "simt.h"

namespace dsa_pack {
alignas(16) unsigned char smem_raw[1 << 18];
}

#include "pack_rows.cuh"

// stage: 1 builds uid / uslot in shared memory (the variant the launcher picks where it fits), 0
// writes them in place. Returns 0, or 1 for arguments the launcher refuses, 2 for a group whose
// shared memory exceeds the stand-in's.
extern "C" int emu_pack_rows(const void* idx, long long idx_st, const void* len, int T, int K, int Tk, int R, void* uid,
                             void* uslot, void* count, int stage) {
  if ((R != 2 && R != 4) || K < 1 || K > 32767 || Tk < 1 || T < 0) return 1;
  if (T == 0) return 0;
  const int W = static_cast<int>((static_cast<long long>(Tk) + 31) / 32);
  if (dsa_pack::smem_bytes(R, K, W, stage != 0) > static_cast<long long>(sizeof(dsa_pack::smem_raw))) return 2;
  const unsigned G = static_cast<unsigned>((T + R - 1) / R);
  auto kernel = stage ? dsa_pack::pack_rows_kernel<true> : dsa_pack::pack_rows_kernel<false>;
  simt::launch(G, 1u, static_cast<unsigned>(dsa_pack::THREADS), kernel, static_cast<const int32_t*>(idx), idx_st,
               static_cast<const int32_t*>(len), T, K, Tk, R, W, static_cast<int32_t*>(uid),
               static_cast<int16_t*>(uslot), static_cast<int32_t*>(count));
  return 0;
}
