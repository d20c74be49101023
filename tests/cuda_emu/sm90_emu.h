// CPU stand-ins for the sm_90 PTX helpers the indexer's score kernel calls (namespace dsa_sm90:
// sm90_common.cuh's and score_sm90.cu's), on top of simt.h. For tests only.
//
// * Shared memory is one 1024-byte aligned array; a "shared address" is an offset into it.
// * A wgmma's result is the accumulator fragment of the thread (m64nNk*, fp32, row
//   16 warp + lane / 4 (+8), columns 8 j + 2 (lane % 4) (+1)) from the operands its
//   shared-memory descriptors address (K-major, 128-byte swizzle: 16-byte chunk bits 4-6 of an
//   address XOR its bits 7-9; 8-row groups SBO apart).
//
// Asynchrony is modelled at its worst, and every hazard it exposes is reported (emu::first_error):
// * cp.async reads its source at issue and lands in shared memory only at the cp.async.wait_group
//   that retires its group; the bytes then need the copying thread's fence.proxy.async and a
//   barrier it takes part in (__syncthreads, bar.sync) before a wgmma may read them.
// * A wgmma reads its operands at issue (they must be landed, fenced and published) and
//   writes its accumulators only at the wgmma.wait_group that retires it; until then they read
//   as NaN. Chained wgmmas on one accumulator see each other's results, as on the hardware.
// * A wgmma's operands stay in use until every thread of its warpgroup has retired it and then
//   taken part in one barrier together: a cp.async into them before that is reported. (The
//   PTX ISA promises a wait only for the waiting thread's own groups; CUTLASS releases a stage
//   after one thread's wait. This rule is the stricter reading.)
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <deque>
#include <map>
#include <mutex>
#include <string>
#include <vector>

#include "simt.h"

namespace {
alignas(1024) uint8_t smem_raw[240 * 1024];
}

namespace dsa_sm90 {

inline uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(static_cast<const uint8_t*>(p) - smem_raw);
}

// ---- hazard bookkeeping (one block at a time; per-thread queues are thread_local, and each
// block's threads are new threads)
namespace emu {
enum : uint8_t { READY = 0, IN_FLIGHT = 1, LANDED = 2, FENCED = 3 };
inline std::mutex m;
inline std::vector<uint8_t> state(sizeof(smem_raw));    // per byte
inline std::vector<uint16_t> reads(sizeof(smem_raw));   // per byte: wgmmas whose operands it is
inline std::string first_error;
struct Copy {
  uint32_t dst;
  uint8_t data[16];
};
struct Pending {
  float* d;
  float r[64];
  long seq;
};
inline std::map<std::pair<int, long>, std::vector<uint32_t>> read_sets;  // (warpgroup, seq): operand bytes in use
inline long retired[1024];                                  // per thread: its last retired wgmma's seq
thread_local std::vector<Copy> open_copies;
thread_local std::deque<std::vector<Copy>> copy_groups;
thread_local std::vector<uint32_t> landed;  // 16-byte granules this thread copied, landed, not fenced
inline std::vector<uint32_t> fenced[1024];  // per thread: fenced, not yet published by a barrier
thread_local std::vector<Pending> open_mmas;
thread_local std::deque<std::vector<Pending>> mma_groups;
thread_local long next_seq = 0;

inline void report(const std::string& what) {  // call with m held
  if (first_error.empty()) {
    first_error = what;
    std::fprintf(stderr, "sm90_emu: %s (thread %u, block %u,%u,%u)\n", what.c_str(), threadIdx.x, blockIdx.x,
                 blockIdx.y, blockIdx.z);
  }
}

inline void on_block() {
  std::fill(state.begin(), state.end(), READY);
  std::fill(reads.begin(), reads.end(), 0);
  read_sets.clear();
  std::fill(std::begin(retired), std::end(retired), -1L);
  for (auto& f : fenced) f.clear();
}

// A barrier phase: the fenced copies of its threads become visible to wgmma; the operands of
// wgmmas that all threads of a warpgroup retired before arriving are free again.
inline void on_barrier(const std::vector<int>& tids) {
  std::lock_guard<std::mutex> lock(m);
  for (int t : tids) {
    for (uint32_t g : fenced[t])
      for (uint32_t x = g; x < g + 16; ++x)
        if (state[x] == FENCED) state[x] = READY;
    fenced[t].clear();
  }
  std::map<int, int> per_wg;
  for (int t : tids) per_wg[t / 128] += 1;
  for (auto& [wg, n] : per_wg) {
    if (n != 128) continue;
    long lo = retired[wg * 128];
    for (int t = wg * 128; t < wg * 128 + 128; ++t) lo = std::min(lo, retired[t]);
    for (auto it = read_sets.begin(); it != read_sets.end();)
      if (it->first.first == wg && it->first.second <= lo) {
        for (uint32_t x : it->second) reads[x] -= 1;
        it = read_sets.erase(it);
      } else {
        ++it;
      }
  }
}
// Install the hooks into simt.h; after the launch, first_error is empty or names the hazard.
inline void begin() {
  first_error.clear();
  simt::block_hook = on_block;
  simt::barrier_hook = on_barrier;
}
}  // namespace emu

inline void cp_async16(uint32_t dst, const void* src, bool valid) {
  emu::Copy c;
  c.dst = dst;
  if (valid) std::memcpy(c.data, src, 16);
  else std::memset(c.data, 0, 16);
  std::lock_guard<std::mutex> lock(emu::m);
  for (uint32_t x = dst; x < dst + 16; ++x) {
    if (emu::reads[x] != 0) emu::report("cp.async into shared memory that a wgmma may still read");
    if (emu::state[x] == emu::IN_FLIGHT) emu::report("two cp.async in flight to the same bytes");
    emu::state[x] = emu::IN_FLIGHT;
  }
  emu::open_copies.push_back(c);
}
inline void cp_async_commit() {
  emu::copy_groups.push_back(std::move(emu::open_copies));
  emu::open_copies.clear();
}
template <int N>
inline void cp_async_wait() {
  std::lock_guard<std::mutex> lock(emu::m);
  while (emu::copy_groups.size() > static_cast<size_t>(N)) {
    for (const emu::Copy& c : emu::copy_groups.front()) {
      std::memcpy(smem_raw + c.dst, c.data, 16);
      for (uint32_t x = c.dst; x < c.dst + 16; ++x) emu::state[x] = emu::LANDED;
      emu::landed.push_back(c.dst);
    }
    emu::copy_groups.pop_front();
  }
}
inline void fence_async_smem() {
  std::lock_guard<std::mutex> lock(emu::m);
  for (uint32_t g : emu::landed) {
    for (uint32_t x = g; x < g + 16; ++x)
      if (emu::state[x] == emu::LANDED) emu::state[x] = emu::FENCED;
    emu::fenced[threadIdx.x].push_back(g);
  }
  emu::landed.clear();
}
inline void wgmma_fence() {}
inline void wgmma_commit() {
  emu::mma_groups.push_back(std::move(emu::open_mmas));
  emu::open_mmas.clear();
}
inline void wgmma_wait(size_t n) {
  std::lock_guard<std::mutex> lock(emu::m);
  while (emu::mma_groups.size() > n) {
    for (const emu::Pending& p : emu::mma_groups.front()) {
      std::memcpy(p.d, p.r, sizeof(p.r));
      emu::retired[threadIdx.x] = p.seq;
    }
    emu::mma_groups.pop_front();
  }
}
inline void wgmma_wait0() { wgmma_wait(0); }
inline void wgmma_wait1() { wgmma_wait(1); }
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

inline uint32_t operand_offset(uint64_t d, int row, int kbyte) {
  return static_cast<uint32_t>(operand_byte(d, row, kbyte) - smem_raw);
}

template <int ELT>
inline void wgmma_m64n128(float (&d)[64], uint64_t da, uint64_t db, int accumulate) {
  const int t = threadIdx.x & 127, wg = threadIdx.x / 128, warp = t / 32, lane = t & 31;
  const long seq = emu::next_seq++;
  float in[64];
  std::memcpy(in, d, sizeof(in));
  {
    std::lock_guard<std::mutex> lock(emu::m);
    std::vector<uint32_t> bytes;
    for (int row = 0; row < 128; ++row)
      for (int kb = 0; kb < 32; ++kb) {
        if (row < 64) bytes.push_back(operand_offset(da, row, kb));
        bytes.push_back(operand_offset(db, row, kb));
      }
    for (uint32_t x : bytes)
      if (emu::state[x] != emu::READY) {
        emu::report(emu::state[x] == emu::IN_FLIGHT ? "wgmma reads shared memory whose cp.async has not landed"
                    : emu::state[x] == emu::LANDED  ? "wgmma reads cp.async data without fence.proxy.async"
                                                    : "wgmma reads cp.async data no barrier has published");
        break;
      }
    // the warpgroup's first thread to issue this wgmma marks its operands in use (a released
    // set cannot come back: every thread of the warpgroup had issued and retired it)
    if (emu::read_sets.find({wg, seq}) == emu::read_sets.end()) {
      for (uint32_t x : bytes) emu::reads[x] += 1;
      emu::read_sets[{wg, seq}] = std::move(bytes);
    }
    // chained on an accumulator still in flight: start from that wgmma's result
    for (const auto& g : emu::mma_groups)
      for (const emu::Pending& p : g)
        if (p.d == d) std::memcpy(in, p.r, sizeof(in));
    for (const emu::Pending& p : emu::open_mmas)
      if (p.d == d) std::memcpy(in, p.r, sizeof(in));
  }
  emu::Pending p;
  p.d = d;
  p.seq = seq;
  for (int j = 0; j < 16; ++j)
    for (int i = 0; i < 2; ++i)
      for (int e = 0; e < 2; ++e) {
        const int m = 16 * warp + lane / 4 + 8 * i, n = 8 * j + 2 * (lane % 4) + e;
        float acc = accumulate ? in[4 * j + 2 * i + e] : 0.f;
        for (int kb = 0; kb < 32; kb += ELT) {
          const uint8_t* a = operand_byte(da, m, kb);
          const uint8_t* b = operand_byte(db, n, kb);
          acc += ELT == 1 ? e4m3_value(*a) * e4m3_value(*b) : bf16_value(a) * bf16_value(b);
        }
        p.r[4 * j + 2 * i + e] = acc;
      }
  emu::open_mmas.push_back(p);
  for (float& x : d) x = NAN;  // in flight: the registers are not the result yet
}

inline void wgmma_m64n128k32_e4m3(float (&d)[64], uint64_t da, uint64_t db, int accumulate) {
  wgmma_m64n128<1>(d, da, db, accumulate);
}
inline void wgmma_m64n128k16_bf16(float (&d)[64], uint64_t da, uint64_t db, int accumulate) {
  wgmma_m64n128<2>(d, da, db, accumulate);
}

}  // namespace dsa_sm90
