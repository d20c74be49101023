// CPU stand-ins for the sm_90 PTX helpers the indexer's score kernel calls (namespace dsa_sm90:
// sm90_common.cuh's and score_sm90.cu's), on top of simt.h. For tests only.
//
// * Shared memory is one 1024-byte aligned array; a "shared address" is an offset into it.
// * cp.async copies at once (or zero-fills); commit / wait groups and proxy fences do nothing.
// * A wgmma is a warpgroup collective computed at issue: each thread sums its own accumulator
//   fragment (m64nNk*, fp32, row 16 warp + lane / 4 (+8), columns 8 j + 2 (lane % 4) (+1)) from
//   the operands its shared-memory descriptors address (K-major, 128-byte swizzle: 16-byte
//   chunk bits 4-6 of an address XOR its bits 7-9; 8-row groups SBO apart), between two
//   warpgroup barriers, so no thread refills a slot that another thread is still reading.
//   Commit / wait do nothing. Reading a slot after it was refilled but before the wait would
//   be a kernel bug that this stand-in does not see.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "simt.h"

namespace {
alignas(1024) uint8_t smem_raw[240 * 1024];
}

namespace dsa_sm90 {

inline uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(static_cast<const uint8_t*>(p) - smem_raw);
}

inline void cp_async16(uint32_t dst, const void* src, bool valid) {
  if (valid) std::memcpy(smem_raw + dst, src, 16);
  else std::memset(smem_raw + dst, 0, 16);
}
template <int N>
inline void cp_async_wait() {}
inline void cp_async_commit() {}
inline void fence_async_smem() {}
inline void wgmma_fence() {}
inline void wgmma_commit() {}
inline void wgmma_wait0() {}
inline void wgmma_wait1() {}
inline void bar_sync(int id, int n) { simt::named_sync(id, n); }

inline uint64_t desc(uint32_t addr, uint32_t lbo, uint32_t sbo) {
  uint64_t d = 0;
  d |= static_cast<uint64_t>((addr & 0x3FFFF) >> 4);
  d |= static_cast<uint64_t>((lbo >> 4) & 0x3FFF) << 16;
  d |= static_cast<uint64_t>((sbo >> 4) & 0x3FFF) << 32;
  d |= static_cast<uint64_t>(1) << 62;
  return d;
}

inline float relu_nan(float x) { return std::isnan(x) ? x : (x > 0.f ? x : 0.f); }

inline float e4m3_value(uint8_t v) {
  const int e = (v >> 3) & 15, m = v & 7;
  float r;
  if (e == 15 && m == 7) r = NAN;
  else if (e == 0) r = std::ldexp(m / 8.f, -6);
  else r = std::ldexp(1.f + m / 8.f, e - 7);
  return (v & 0x80) ? -r : r;
}

inline float bf16_value(const uint8_t* p) {
  uint32_t u = static_cast<uint32_t>(p[0] | (p[1] << 8)) << 16;
  float x;
  std::memcpy(&x, &u, 4);
  return x;
}

// The byte of element (row, k byte) of a K-major, 128-byte swizzled operand.
inline const uint8_t* operand_byte(uint64_t d, int row, int kbyte) {
  const uint32_t start = static_cast<uint32_t>(d & 0x3FFF) << 4;
  const uint32_t sbo = static_cast<uint32_t>((d >> 32) & 0x3FFF) << 4;
  const uint32_t lin = start + (row / 8) * sbo + (row % 8) * 128 + kbyte;
  return smem_raw + (lin ^ (((lin >> 7) & 7) << 4));
}

template <int ELT>
inline void wgmma_m64n128(float (&d)[64], uint64_t da, uint64_t db, int accumulate) {
  simt::warpgroup_sync();  // the operands are in place for every thread of the warpgroup
  const int t = threadIdx.x & 127, warp = t / 32, lane = t & 31;
  for (int j = 0; j < 16; ++j)
    for (int i = 0; i < 2; ++i)
      for (int e = 0; e < 2; ++e) {
        const int m = 16 * warp + lane / 4 + 8 * i, n = 8 * j + 2 * (lane % 4) + e;
        float acc = accumulate ? d[4 * j + 2 * i + e] : 0.f;
        for (int kb = 0; kb < 32; kb += ELT) {
          const uint8_t* a = operand_byte(da, m, kb);
          const uint8_t* b = operand_byte(db, n, kb);
          acc += ELT == 1 ? e4m3_value(*a) * e4m3_value(*b) : bf16_value(a) * bf16_value(b);
        }
        d[4 * j + 2 * i + e] = acc;
      }
  simt::warpgroup_sync();  // done reading: the slot may be refilled after the wait
}

inline void wgmma_m64n128k32_e4m3(float (&d)[64], uint64_t da, uint64_t db, int accumulate) {
  wgmma_m64n128<1>(d, da, db, accumulate);
}
inline void wgmma_m64n128k16_bf16(float (&d)[64], uint64_t da, uint64_t db, int accumulate) {
  wgmma_m64n128<2>(d, da, db, accumulate);
}

}  // namespace dsa_sm90
