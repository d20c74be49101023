// A CPU emulator of the sm_90 features the sparse MLA kernels (ping-pong and 16-head forward,
// backward) use, for tests only.
//
// The kernel source runs unchanged except for its inline PTX: ptx_source.py rewrites every
// `asm volatile(...)` statement into a call of emu::exec with the statement's own PTX text and
// operands, and every `kernel<<<...>>>(...)` launch into emu::launch. emu::exec interprets the
// PTX (a small interpreter: predicates, labels and branches, cp.async, mbarriers, named
// barriers, proxy fences, wgmma), so the instructions the shipped source emits are the ones
// emulated: `cp.async.wait_group 0` and `cp.async.wait_all` behave differently here, as on the GPU.
//
// Threads: one OS thread per CUDA thread, CTAs one after another. Every blocking primitive
// (mbarrier try_wait, bar.sync, __syncthreads, warp shuffles) really blocks.
//
// Clusters (cudaLaunchKernelEx with a cluster dimension): the CTAs of one cluster run together,
// each in its own shared memory, their threads and mbarriers in one vector-clock space;
// %cluster_ctarank, mapa.shared::cluster, st / ld.shared::cluster (checked as st / ld.shared of
// the target CTA), mbarrier.arrive on another CTA's mbarrier (release; its waiters acquire) and
// barrier.cluster.arrive / wait (a barrier of every thread of the cluster) are emulated; an
// arrival on an mbarrier not yet initialized is reported.
// wgmma operands: 128-byte (descriptor mode 1) or 64-byte (mode 2) swizzle (operand_byte).
//
// Memory model (happens-before by vector clocks: one component per thread, one per mbarrier):
// * cp.async reads its source at issue; its destination holds poison (0xFF bytes: bf16 NaN)
//   until the copy lands. A copy lands as late as the PTX ISA allows: at the
//   cp.async.wait_group / wait_all of its thread that covers it (copies never committed to a
//   group are not covered by wait_group), or when an mbarrier phase that tracks it
//   (cp.async.mbarrier.arrive.noinc: all the thread's prior copies) completes.
// * A copy is visible to a reader if its landing is ordered before the read: the reader's
//   vector clock covers the issuer's wait (propagated by barriers: bar.arrive / mbarrier.arrive
//   release, bar.sync / __syncthreads / a completed try_wait acquire) or the mbarrier phase.
// * wgmma reads shared memory through the async proxy: a copy must be visible as of the
//   reader's last fence.proxy.async, or fenced by its issuer after its own wait and published.
// * A wgmma checks its operands at issue, and reads them and writes its accumulators only at
//   the wgmma.wait_group that retires it (until then its accumulator registers hold NaN); a
//   cp.async into its operands between issue and retirement is a hazard.
// * Generic-proxy stores through PTX (st.shared) read by a wgmma: the writer must have executed
//   a fence.proxy.async after the store, and that fence must be ordered before the wgmma's issue
//   (the reader's vector clock covers it). ld.shared (PTX) of cp.async data is checked like a
//   wgmma read, without the proxy fence (generic proxy).
// * Write-after-read: a wgmma's operand reads are recorded when it retires (wgmma.wait_group; the
//   first lane of each warp stands for the warp), an ld.shared's at the load. A later cp.async
//   or st.shared into the same 16-byte granule must be ordered after every recorded read (the
//   writer's vector clock covers the reader's at the read), else a hazard: e.g. a consumer that
//   releases a buffer before the wait_group that retires the wgmma reading it.
// * ldmatrix / stmatrix (.x1/.x2/.x4, m8n8 b16; stmatrix also .trans) and movmatrix
//   (m8n8.trans.b16) are warp exchanges; each lane's ldmatrix bytes are checked (and recorded as
//   reads) like an ld.shared of that lane, its stmatrix bytes like an st.shared (.trans: two
//   2-byte stores); every row address must be 16-byte aligned.
// * bar.red.or.pred is a named barrier that also ORs the threads' predicates. A wgmma is one
//   operation of its warpgroup (complete only once all four warps issued it): wgmma.wait_group
//   ends with a rendezvous of the warpgroup that orders every thread's retirement before any
//   thread leaves (the 16-head forward releases ring slots from each warp's lane 0 and reuses a
//   query buffer every warp's wgmmas read).
// * cudaDeviceGetAttribute(cudaDevAttrMultiProcessorCount) answers emu::sm_count (2), so a
//   persistent kernel's CTAs each walk several rows.
// * Global fp32 atomics (red.global.add.f32 / .v2.f32 / .v4.f32, the last also with an L2 cache
//   policy) are atomic per element; red.global.add.u64 is atomic and wraps.
//   fence.acq_rel.gpu / fence.sc.gpu order global memory across CTAs: CTAs run one at a time
//   here, so they are no-ops.
// * setmaxnreg: a CTA starts with 64K / threads registers per thread (rounded down to 8, at most
//   255: __launch_bounds__(threads, 1)); .dec gives registers back to the CTA's pool, .inc blocks
//   until the pool holds what it asks for (a split that asks for more waits forever: reported
//   as a deadlock).
// Every violation is a reported hazard (emu::hazards); plain C++ loads and stores of shared
// memory are not intercepted (a load of an unlanded copy reads the poison).
#pragma once

#include <math.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <cmath>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

// ---------------------------------------------------------------- CUDA language stand-ins
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__
#define __restrict__

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct int2 {
  int x, y;
};
struct uint4 {
  unsigned x, y, z, w;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }
struct __nv_bfloat16 {
  uint16_t bits;
};
struct __nv_bfloat162 {
  __nv_bfloat16 x, y;
};

inline thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;

inline uint16_t emu_f2bf(float f) {  // round to nearest even
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0;
  u += 0x7FFFu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}
inline float emu_bf2f(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) {
  return __nv_bfloat162{{emu_f2bf(a)}, {emu_f2bf(b)}};
}
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
template <class T>
inline T __ldg(const T* p) { return *p; }

// ---- CUDA runtime stand-ins (the launcher's calls)
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16 };
struct CUstream_st;
typedef CUstream_st* cudaStream_t;

// shared memory of a CTA: this array for a launch without clusters (one CTA runs at a time),
// one buffer per CTA for a cluster launch (its CTAs run together). A kernel's `extern __shared__
// ... smem_raw[]` is rewritten (ptx_source.py) into a pointer to its CTA's buffer, emu::cta_smem().
namespace {
constexpr int EMU_SMEM_CAP = 232448;
alignas(1024) uint8_t smem_raw[EMU_SMEM_CAP];
}  // namespace

namespace emu {
inline uint8_t* cta_smem();
}
inline size_t __cvta_generic_to_shared(const void* p) {
  return static_cast<size_t>(static_cast<const uint8_t*>(p) - emu::cta_smem());
}

namespace emu {

constexpr int MAXT = 1024;   // threads per CTA
constexpr int NMBAR = 64;    // mbarriers per CTA (vector-clock components after the threads')
constexpr int NCOMP = MAXT + NMBAR;  // vector-clock components per CTA (a cluster's CTAs: NCOMP each)
constexpr int NWORD = EMU_SMEM_CAP / 4;

using Clock = std::vector<uint32_t>;
inline size_t clock_width = NCOMP;  // NCOMP x the CTAs of the launch's clusters (set per launch)
inline void join(Clock& a, const Clock& b) {
  for (size_t i = 0; i < a.size(); ++i) a[i] = std::max(a[i], b[i]);
}

struct Cta;
struct Copy {
  Cta* owner;  // the CTA whose shared memory it writes
  uint32_t dst;
  int n;
  int issuer;
  uint64_t issue_no;
  bool landed = false;
  uint8_t data[16];
  std::vector<std::pair<int, uint32_t>> routes;  // (clock component, value): landing ordered before
  int fence_comp = -1;                            // the issuer's fence.proxy.async after its wait
  uint32_t fence_clock = 0;
};

struct Mma {
  int m_n;                 // N
  std::vector<float*> d;   // accumulator registers
  bool chain;              // accumulate onto an in-flight wgmma's result
  bool acc;                // scale-d
  std::vector<float> init; // accumulator at issue (when not chained)
  bool a_regs;
  uint64_t da, db;
  int ta, tb;
  uint32_t a_frag[4][4];   // rs: the quad's A registers (lane in quad, register)
  std::vector<uint32_t> granules;  // operand granules (byte offsets)
  uint64_t issue_mark;
  std::vector<float> result;
};

struct Thr {
  int tid = 0;
  int comp = 0;  // its vector-clock component: rank x NCOMP + tid
  Clock vc, fenced_vc;
  std::vector<Copy*> open;                 // not committed to a group
  std::deque<std::vector<Copy*>> groups;   // committed, not waited
  std::vector<Copy*> unlanded;             // all of this thread's copies that may not have landed
  std::vector<Copy*> own_landed;           // landed by this thread's waits, not yet fenced by it
  std::vector<Mma> open_mma;
  std::deque<std::vector<Mma>> mma_groups;
  std::mt19937 rng;
  int slow = 0;
  std::vector<uint32_t> fence_stamps;      // this thread's fence.proxy.async, its clock at each
  int regs = 0;                            // registers per thread (setmaxnreg)
  bool cbar_pending = false;               // barrier.cluster.arrive done, its wait not yet
  uint64_t cbar_gen = 0;                   // the cluster barrier's generation it arrived in
};

// st.shared writers of the 8 half-words of a 16-byte granule (writer -1: none), and the fence
// epoch of each write (the number of fence.proxy.async the writer had executed before it)
struct GenW {
  int16_t writer[8] = {-1, -1, -1, -1, -1, -1, -1, -1};
  uint32_t epoch[8] = {};
  bool any = false;
};

struct Mbar {
  Cta* owner;
  int comp;
  int count = 0, pending = 0;
  uint64_t completed = 0;  // phases completed
  Clock acc;
  Clock phase_vc[2];
  bool phase_done[2] = {false, false};
  std::vector<Copy*> tracked;
  std::condition_variable cv;
};

struct NamedBar {
  int n = 0, count = 0;
  uint64_t gen = 0;
  Clock acc;
  std::vector<Clock> results;  // per generation
  int red_acc = 0;             // bar.red.or: the OR of this generation's predicates so far
  std::vector<int> red_results;  // per generation
  std::condition_variable cv;
};

struct Warp {
  std::mutex m;
  std::condition_variable cv;
  int count = 0;
  uint64_t gen = 0;
  uint32_t slot[32][4];
};

struct Cluster;
struct Cta {
  int nthreads = 0;
  int smem_bytes = 0;
  uint8_t* smem = nullptr;  // its shared memory (smem_raw, or a cluster CTA's own buffer)
  int rank = 0;             // %cluster_ctarank
  Cluster* cluster = nullptr;
  std::vector<Thr> thr;
  std::deque<Copy> copies;
  std::vector<Copy*> word;  // per 4-byte word of shared memory: the last cp.async into it
  std::map<uint32_t, std::unique_ptr<Mbar>> mbars;
  std::map<int, std::unique_ptr<NamedBar>> bars;
  std::map<int, std::unique_ptr<NamedBar>> wg_bars;  // per warpgroup: wgmma.wait_group rendezvous
  std::vector<std::unique_ptr<Warp>> warps;
  uint64_t next_issue = 1;
  uint32_t mbar_clock[NMBAR] = {};
  std::vector<GenW> gen;                                        // per 16-byte granule
  std::vector<std::vector<std::pair<int, uint32_t>>> reads;     // per granule: (reader, its clock at the read)
  int reg_pool = 0;                                             // registers given back by setmaxnreg.dec
  std::condition_variable reg_cv;
};

// The CTAs of one cluster launch, run together, their vector clocks one space (component rank x
// NCOMP + local). barrier.cluster: every thread of every CTA arrives (release), then waits for
// its generation (acquire), as at a named barrier spanning the cluster.
struct Cluster {
  std::vector<Cta*> ctas;
  int threads = 0;
  int arrived = 0;
  uint64_t gen = 0;
  Clock acc;                  // the joined clocks of this generation
  std::vector<Clock> results; // per generation
  std::condition_variable cv;
};

inline std::mutex mu;  // all async / barrier state (every CTA's)
inline thread_local Cta* cta = nullptr;
inline thread_local Thr* me = nullptr;
inline uint8_t* cta_smem() { return cta != nullptr ? cta->smem : smem_raw; }
// the thread whose vector-clock component is `comp` (a thread of this CTA's cluster)
inline Thr& thread_of(int comp) {
  Cta* c = cta->cluster != nullptr ? cta->cluster->ctas[static_cast<size_t>(comp / NCOMP)] : cta;
  return c->thr[static_cast<size_t>(comp % NCOMP)];
}

// ---- reports
inline std::atomic<long> hazards{0};
inline std::vector<std::string> messages;  // distinct messages, first occurrences (under mu)
inline std::atomic<bool> aborted{false};
inline unsigned seed = 0;
inline double wait_limit_s = 60.0;
inline std::map<int, int> smem_limit;  // kernel id (unused) -> dynamic shared memory allowed

inline void report_locked(const std::string& what) {
  hazards += 1;
  for (const auto& m : messages)
    if (m.compare(0, m.find(" [thread"), what) == 0) return;
  if (messages.size() < 16) {
    char where[96];
    std::snprintf(where, sizeof where, " [thread %d, block %u]", me ? me->tid : -1, blockIdx.x);
    messages.push_back(what + where);
    std::fprintf(stderr, "sm90_emu: %s%s\n", what.c_str(), where);
  }
}
inline void report(const std::string& what) {
  std::lock_guard<std::mutex> lock(mu);
  report_locked(what);
}
inline void fatal(const std::string& what) {  // cannot go on emulating: report, release every wait
  report(what);
  aborted = true;
}

// Randomly slowed threads (the seed picks how slow each warpgroup is): other interleavings.
inline void jitter() {
  if (seed == 0 || me == nullptr || me->slow == 0) return;
  const unsigned r = me->rng();
  if (r % 16u < static_cast<unsigned>(me->slow)) std::this_thread::sleep_for(std::chrono::microseconds(20 + r % 400u));
}

// Block on cv (mu held in lk) until pred, with a watchdog against deadlock.
template <class P>
inline void block_on(std::condition_variable& cv, std::unique_lock<std::mutex>& lk, P pred, const char* what) {
  const auto t0 = std::chrono::steady_clock::now();
  while (!pred() && !aborted) {
    cv.wait_for(lk, std::chrono::milliseconds(200));
    if (std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() > wait_limit_s) {
      report_locked(std::string("deadlock: a thread waited too long on ") + what);
      aborted = true;
    }
  }
}

// ---- copies
inline void land(Copy* c) {
  if (c->landed) return;
  std::memcpy(c->owner->smem + c->dst, c->data, c->n);
  c->landed = true;
}

inline bool visible(const Copy* c, const Clock& vc) {
  for (const auto& r : c->routes)
    if (vc[r.first] >= r.second) return true;
  return false;
}

// A write (cp.async issue, st.shared) into granule g by this thread: every recorded read of it
// must be ordered before (write-after-read); the reads are then forgotten.
inline void check_war_locked(uint32_t g, const char* what, Cta* t = nullptr) {
  auto& rs = (t != nullptr ? t : cta)->reads[g];
  for (const auto& r : rs)
    if (r.first != me->comp && me->vc[r.first] < r.second) {
      report_locked(std::string(what) + " into shared memory that a wgmma or ld.shared of another thread read, "
                    "without that read (the wgmma's wait_group) ordered before the write");
      break;
    }
  rs.clear();
}
inline void record_read_locked(uint32_t g, Cta* t = nullptr) {
  auto& rs = (t != nullptr ? t : cta)->reads[g];
  const uint32_t now = me->vc[me->comp];
  for (auto& r : rs)
    if (r.first == me->comp) {
      r.second = now;
      return;
    }
  rs.emplace_back(me->comp, now);
}

inline void cp_async(uint32_t dst, const void* src, int cp_size, int src_size) {
  jitter();
  std::lock_guard<std::mutex> lock(mu);
  if (dst % cp_size != 0 || reinterpret_cast<uintptr_t>(src) % cp_size != 0) report_locked("misaligned cp.async");
  if (static_cast<int>(dst) + cp_size > cta->smem_bytes) {
    report_locked("cp.async past the CTA's dynamic shared memory");
    return;
  }
  if (src_size < 0 || src_size > cp_size) report_locked("cp.async src-size out of range");
  cta->copies.emplace_back();
  Copy* c = &cta->copies.back();
  c->owner = cta;
  c->dst = dst;
  c->n = cp_size;
  c->issuer = me->comp;
  c->issue_no = cta->next_issue++;
  std::memset(c->data, 0, sizeof c->data);
  if (src_size > 0) std::memcpy(c->data, src, std::min(src_size, cp_size));
  for (uint32_t w = dst / 4; w < (dst + cp_size) / 4; ++w) {
    Copy* old = cta->word[w];
    if (old != nullptr && !old->landed) report_locked("two cp.async in flight to the same shared memory");
    cta->word[w] = c;
  }
  for (uint32_t g = dst / 16; g < (dst + cp_size + 15) / 16; ++g) {
    check_war_locked(g, "cp.async");
    GenW& gw = cta->gen[g];
    if (gw.any)
      for (int h = 0; h < 8; ++h)
        if (16 * g + 2 * h >= dst && 16 * g + 2 * h < dst + cp_size) gw.writer[h] = -1;
  }
  std::memset(cta->smem + dst, 0xFF, cp_size);  // in flight: the destination is undefined
  me->open.push_back(c);
  me->unlanded.push_back(c);
}

inline void cp_async_commit() {
  std::lock_guard<std::mutex> lock(mu);
  me->groups.push_back(std::move(me->open));
  me->open.clear();
}

inline void cp_async_wait_group(size_t n) {
  jitter();
  std::lock_guard<std::mutex> lock(mu);
  if (me->groups.size() <= n) return;
  const uint32_t stamp = ++me->vc[me->comp];
  while (me->groups.size() > n) {
    for (Copy* c : me->groups.front()) {
      land(c);
      c->routes.emplace_back(me->comp, stamp);
      me->own_landed.push_back(c);
    }
    me->groups.pop_front();
  }
}

inline void fence_proxy_async() {
  std::lock_guard<std::mutex> lock(mu);
  const uint32_t stamp = ++me->vc[me->comp];
  me->fence_stamps.push_back(stamp);
  for (Copy* c : me->own_landed) {
    c->fence_comp = me->comp;
    c->fence_clock = stamp;
  }
  me->own_landed.clear();
  me->fenced_vc = me->vc;
}

// ---- generic-proxy shared memory through PTX
// st.shared into CTA t's shared memory (t: this CTA, or another of its cluster through
// st.shared::cluster), mu held
inline void st_shared_locked(Cta* t, uint32_t addr, const void* v, int n, const char* what) {
  if (addr % n != 0) report_locked(std::string("misaligned ") + what);
  if (static_cast<int>(addr) + n > t->smem_bytes) {
    report_locked(std::string(what) + " past the CTA's dynamic shared memory");
    return;
  }
  for (uint32_t w = addr / 4; w < (addr + n + 3) / 4; ++w) {
    Copy* c = t->word[w];
    if (c == nullptr) continue;
    if (!c->landed) report_locked(std::string(what) + " into shared memory with a cp.async in flight");
    t->word[w] = nullptr;
  }
  for (uint32_t g = addr / 16; g < (addr + n + 15) / 16; ++g) check_war_locked(g, what, t);
  const uint32_t epoch = static_cast<uint32_t>(me->fence_stamps.size());
  for (uint32_t b = addr & ~1u; b < addr + n; b += 2) {
    GenW& gw = t->gen[b / 16];
    gw.any = true;
    gw.writer[(b % 16) / 2] = static_cast<int16_t>(me->comp);
    gw.epoch[(b % 16) / 2] = epoch;
  }
  std::memcpy(t->smem + addr, v, n);
}

inline void st_shared(uint32_t addr, const void* v, int n) {
  jitter();
  std::lock_guard<std::mutex> lock(mu);
  st_shared_locked(cta, addr, v, n, "st.shared");
}

// ld.shared from CTA t's shared memory, mu held
inline void ld_shared_locked(Cta* t, uint32_t addr, void* v, int n, const char* what) {
  if (addr % std::min(n, 16) != 0) report_locked(std::string("misaligned ") + what);
  if (static_cast<int>(addr) + n > t->smem_bytes) {
    report_locked(std::string(what) + " past the CTA's dynamic shared memory");
    return;
  }
  for (uint32_t w = addr / 4; w < (addr + n + 3) / 4; ++w) {
    const Copy* c = t->word[w];
    if (c == nullptr) continue;
    if (!c->landed) report_locked(std::string(what) + " reads shared memory whose cp.async has not landed");
    else if (!visible(c, me->vc))
      report_locked(std::string(what) + " reads cp.async data whose completion is not ordered before the read");
  }
  for (uint32_t g = addr / 16; g < (addr + n + 15) / 16; ++g) record_read_locked(g, t);
  std::memcpy(v, t->smem + addr, n);
}

inline void ld_shared(uint32_t addr, void* v, int n) {
  jitter();
  std::lock_guard<std::mutex> lock(mu);
  ld_shared_locked(cta, addr, v, n, "ld.shared");
}

// ---- distributed shared memory (a cluster's CTAs)
// mapa.shared::cluster: the address `addr` of this CTA's window in CTA `rank` of the cluster,
// tagged (rank + 1) << 24 (an emulator convention; offsets stay below 2^24). An untagged
// address in a shared::cluster access is the executing CTA's own.
inline uint32_t mapa(uint32_t addr, uint32_t rank) {
  const int n = cta->cluster != nullptr ? static_cast<int>(cta->cluster->ctas.size()) : 1;
  if (static_cast<int>(rank) >= n) {
    report("mapa to a CTA rank outside the cluster");
    return addr;
  }
  return ((rank + 1u) << 24) | (addr & 0xFFFFFFu);
}
inline Cta* cluster_target_locked(uint32_t addr, uint32_t& off) {
  off = addr & 0xFFFFFFu;
  if ((addr >> 24) == 0) return cta;
  const uint32_t rank = (addr >> 24) - 1u;
  if (cta->cluster == nullptr || rank >= cta->cluster->ctas.size()) {
    report_locked("shared::cluster address of a CTA rank outside the cluster");
    return nullptr;
  }
  return cta->cluster->ctas[rank];
}
inline void st_shared_cluster(uint32_t addr, const void* v, int n) {
  jitter();
  std::lock_guard<std::mutex> lock(mu);
  uint32_t off;
  Cta* t = cluster_target_locked(addr, off);
  if (t != nullptr) st_shared_locked(t, off, v, n, "st.shared::cluster");
}
inline void ld_shared_cluster(uint32_t addr, void* v, int n) {
  jitter();
  std::lock_guard<std::mutex> lock(mu);
  uint32_t off;
  Cta* t = cluster_target_locked(addr, off);
  if (t != nullptr) ld_shared_locked(t, off, v, n, "ld.shared::cluster");
}

// barrier.cluster.arrive / barrier.cluster.wait
inline void cluster_arrive() {
  jitter();
  std::lock_guard<std::mutex> lock(mu);
  Cluster* cl = cta->cluster;
  if (me->cbar_pending) report_locked("barrier.cluster.arrive again before barrier.cluster.wait");
  me->cbar_pending = true;
  me->cbar_gen = cl->gen;
  join(cl->acc, me->vc);
  me->vc[me->comp] += 1;
  if (++cl->arrived == cl->threads) {
    cl->results.push_back(cl->acc);
    cl->acc.assign(clock_width, 0);
    cl->arrived = 0;
    cl->gen += 1;
    cl->cv.notify_all();
  }
}
inline void cluster_wait() {
  jitter();
  std::unique_lock<std::mutex> lk(mu);
  Cluster* cl = cta->cluster;
  if (!me->cbar_pending) {
    report_locked("barrier.cluster.wait without a barrier.cluster.arrive before it");
    return;
  }
  const uint64_t g = me->cbar_gen;
  block_on(cl->cv, lk, [&] { return cl->gen > g; }, "a cluster barrier");
  me->cbar_pending = false;
  if (g < cl->results.size()) join(me->vc, cl->results[g]);
}

// ---- global fp32 reductions (red.global.add): atomic per element
inline void red_add_f32(uint64_t addr, const float* v, int n) {
  jitter();
  if (addr % (4u * static_cast<unsigned>(n)) != 0) report("misaligned red.global.add");
  float* p = reinterpret_cast<float*>(addr);
  for (int i = 0; i < n; ++i) std::atomic_ref<float>(p[i]).fetch_add(v[i], std::memory_order_relaxed);
}

// ---- global integer reductions (red.global.add.u64): atomic, wrapping (two's complement)
inline void red_add_u64(uint64_t addr, uint64_t v) {
  jitter();
  if (addr % 8u != 0) report("misaligned red.global.add");
  std::atomic_ref<uint64_t>(*reinterpret_cast<uint64_t*>(addr)).fetch_add(v, std::memory_order_relaxed);
}

// ---- setmaxnreg
inline void setmaxnreg(bool inc, int n) {
  std::unique_lock<std::mutex> lk(mu);
  if (n < 24 || n > 256 || n % 8 != 0) report_locked("setmaxnreg count outside 24..256 or not a multiple of 8");
  if (inc ? n < me->regs : n > me->regs) {
    report_locked(inc ? "setmaxnreg.inc below the current register count"
                      : "setmaxnreg.dec above the current register count");
    return;
  }
  if (!inc) {
    cta->reg_pool += me->regs - n;
    me->regs = n;
    cta->reg_cv.notify_all();
    return;
  }
  const int need = n - me->regs;
  block_on(cta->reg_cv, lk, [&] { return cta->reg_pool >= need; }, "setmaxnreg.inc (the CTA's register pool)");
  if (aborted) return;
  cta->reg_pool -= need;
  me->regs = n;
}

// ---- mbarriers
inline Mbar* mbar_at(uint32_t addr) {
  auto it = cta->mbars.find(addr);
  if (it == cta->mbars.end()) {
    report_locked("mbarrier used before mbarrier.init");
    aborted = true;
    return nullptr;
  }
  return it->second.get();
}

inline void mbar_init(uint32_t addr, int count) {
  std::lock_guard<std::mutex> lock(mu);
  if (addr % 8 != 0) report_locked("misaligned mbarrier");
  auto& slot = cta->mbars[addr];
  if (!slot) {
    slot = std::make_unique<Mbar>();
    slot->owner = cta;
    const int local = MAXT + static_cast<int>(cta->mbars.size() - 1);
    if (local >= NCOMP) fatal("too many mbarriers");
    slot->comp = cta->rank * NCOMP + local;
  }
  slot->count = slot->pending = count;
  slot->acc.assign(clock_width, 0);
}

inline void mbar_complete_locked(Mbar* b) {  // the phase's last arrival
  const int par = static_cast<int>(b->completed & 1);
  const uint32_t stamp = ++b->owner->mbar_clock[b->comp % NCOMP - MAXT];
  for (Copy* c : b->tracked) {
    land(c);
    c->routes.emplace_back(b->comp, stamp);
  }
  b->tracked.clear();
  b->acc[b->comp] = stamp;
  b->phase_vc[par] = b->acc;
  b->phase_done[par] = true;
  b->acc.assign(clock_width, 0);
  b->pending = b->count;
  b->completed += 1;
  b->cv.notify_all();
}

inline void mbar_arrive_locked(Mbar* b) {
  join(b->acc, me->vc);  // release
  me->vc[me->comp] += 1;
  if (--b->pending == 0) mbar_complete_locked(b);
}

inline void mbar_arrive(uint32_t addr) {
  jitter();
  std::lock_guard<std::mutex> lock(mu);
  Mbar* b = mbar_at(addr);
  if (b != nullptr) mbar_arrive_locked(b);
}

// mbarrier.arrive on a shared::cluster address (release at cluster scope): the arrival goes to
// that CTA's mbarrier, this CTA's own or another's
inline void mbar_arrive_cluster(uint32_t addr) {
  jitter();
  std::lock_guard<std::mutex> lock(mu);
  uint32_t off;
  Cta* t = cluster_target_locked(addr, off);
  if (t == nullptr) return;
  auto it = t->mbars.find(off);
  if (it == t->mbars.end()) {
    report_locked(t == cta ? "mbarrier used before mbarrier.init"
                           : "remote mbarrier arrival before the target CTA's mbarrier.init (no cluster barrier between?)");
    aborted = true;
    return;
  }
  mbar_arrive_locked(it->second.get());
}

// cp.async.mbarrier.arrive.noinc: an arrival once all the thread's prior cp.async have landed;
// it orders those copies (and nothing else of the thread) before the phase's completion.
inline void mbar_arrive_cp_async(uint32_t addr) {
  jitter();
  std::lock_guard<std::mutex> lock(mu);
  Mbar* b = mbar_at(addr);
  if (b == nullptr) return;
  std::vector<Copy*> still;
  for (Copy* c : me->unlanded)
    if (!c->landed) {
      b->tracked.push_back(c);
      still.push_back(c);
    }
  me->unlanded.swap(still);
  if (--b->pending == 0) mbar_complete_locked(b);
}

inline void mbar_wait_parity(uint32_t addr, int parity) {
  jitter();
  std::unique_lock<std::mutex> lk(mu);
  Mbar* b = mbar_at(addr);
  if (b == nullptr) return;
  const int p = parity & 1;
  block_on(b->cv, lk, [&] { return static_cast<int>(b->completed & 1) != p; }, "an mbarrier");
  if (b->phase_done[p]) join(me->vc, b->phase_vc[p]);  // acquire
}

// ---- named barriers (bar.sync / bar.arrive; __syncthreads is bar.sync 0)
inline void bar(int id, int n, bool wait, int* red_or = nullptr) {
  jitter();
  std::unique_lock<std::mutex> lk(mu);
  if (n <= 0) n = cta->nthreads;
  if (id < 0 || id > 15 || n % 32 != 0) report_locked("bad bar.sync / bar.arrive operands");
  auto& slot = cta->bars[id];
  if (!slot) {
    slot = std::make_unique<NamedBar>();
    slot->acc.assign(clock_width, 0);
  }
  NamedBar* b = slot.get();
  if (b->count == 0) b->n = n;
  else if (b->n != n) report_locked("threads disagree on a named barrier's thread count");
  join(b->acc, me->vc);
  me->vc[me->comp] += 1;
  if (red_or != nullptr) b->red_acc |= *red_or != 0;
  const uint64_t g = b->gen;
  if (++b->count == b->n) {
    b->red_results.push_back(b->red_acc);
    b->red_acc = 0;
    b->results.push_back(b->acc);
    b->acc.assign(clock_width, 0);
    b->count = 0;
    b->gen += 1;
    b->cv.notify_all();
  }
  if (!wait) return;
  block_on(b->cv, lk, [&] { return b->gen > g; }, "a named barrier");
  if (g < b->results.size()) join(me->vc, b->results[g]);
  if (red_or != nullptr && g < b->red_results.size()) *red_or = b->red_results[g];
}

// ---- warp exchange (shuffles, votes): no memory ordering
template <class F>
inline auto warp_exchange(const uint32_t (&v)[4], F f) {
  Warp& w = *cta->warps[me->tid / 32];
  const int lane = me->tid & 31;
  std::unique_lock<std::mutex> lk(w.m);
  auto phase = [&] {
    const uint64_t g = w.gen;
    if (++w.count == 32) {
      w.count = 0;
      w.gen += 1;
      w.cv.notify_all();
    } else {
      const auto t0 = std::chrono::steady_clock::now();
      while (w.gen == g && !aborted) {
        w.cv.wait_for(lk, std::chrono::milliseconds(200));
        if (std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() > wait_limit_s) {
          lk.unlock();
          fatal("deadlock: a warp shuffle waited too long");
          lk.lock();
        }
      }
    }
  };
  std::memcpy(w.slot[lane], v, sizeof v);
  phase();
  auto r = f(w.slot);
  phase();
  return r;
}

// ldmatrix / stmatrix (m8n8, nm matrices): lane L supplies `addr`, the address of row L % 8 of
// matrix L / 8 (16-byte aligned); returns in rows[j] the address of row lane / 4 of matrix j,
// whose bytes 4 (lane % 4) .. + 3 are this lane's register j
inline void matrix_rows(uint32_t addr, int nm, uint32_t (&rows)[4], const char* what) {
  if (addr % 16 != 0) report(std::string("misaligned ") + what + " row (16 bytes)");
  const int lane = me->tid & 31;
  const uint32_t mine[4] = {addr, 0, 0, 0};
  warp_exchange(mine, [&](uint32_t (*slot)[4]) {
    for (int j = 0; j < nm; ++j) rows[j] = slot[8 * j + lane / 4][0];
    return 0;
  });
}

// stmatrix .trans: as matrix_rows, but this lane's register j holds elements (lane / 4,
// 2 (lane % 4) + e) of matrix j, which go to row 2 (lane % 4) + e at byte 2 (lane / 4): returns
// those two rows' addresses per matrix, rows[j][e]
inline void matrix_rows_trans(uint32_t addr, int nm, uint32_t (&rows)[4][2]) {
  if (addr % 16 != 0) report("misaligned stmatrix row (16 bytes)");
  const int lane = me->tid & 31;
  const uint32_t mine[4] = {addr, 0, 0, 0};
  warp_exchange(mine, [&](uint32_t (*slot)[4]) {
    for (int j = 0; j < nm; ++j)
      for (int e = 0; e < 2; ++e) rows[j][e] = slot[8 * j + 2 * (lane % 4) + e][0];
    return 0;
  });
}

// ---- wgmma
inline float smem_bf16(uint32_t byte) {
  uint16_t b;
  std::memcpy(&b, cta->smem + byte, 2);
  return emu_bf2f(b);
}
// byte offset of element (mn, k) of an operand: K-major (trans 0) or MN-major (trans 1), in
// swizzled rows of W bytes (descriptor mode 1: 128-byte swizzle, W = 128; mode 2: 64-byte
// swizzle, W = 64): 8-row atoms, the 16-byte unit's index within a row XORed with the row's
// index within its atom (address bits [4, 4 + log2(W / 16)) ^= bits [7, ...))
inline uint32_t operand_byte(uint64_t d, int trans, int mn, int k) {
  const uint32_t start = static_cast<uint32_t>(d & 0x3FFF) << 4;
  const uint32_t lbo = static_cast<uint32_t>((d >> 16) & 0x3FFF) << 4;
  const uint32_t sbo = static_cast<uint32_t>((d >> 32) & 0x3FFF) << 4;
  const uint32_t W = ((d >> 62) & 3) == 2 ? 64u : 128u, E = W / 2;  // bytes, bf16 elements per row
  uint32_t lin;
  if (trans == 0) lin = start + (mn / 8) * sbo + (mn % 8) * W + 2 * k;
  else lin = start + (mn / E) * lbo + (k / 8) * sbo + (k % 8) * W + 2 * (mn % E);
  return lin ^ (((lin >> 7) & (W / 16 - 1)) << 4);
}

inline void check_desc(uint64_t d) {
  const uint64_t mode = d >> 62;
  if ((mode != 1 && mode != 2) || ((d >> 49) & 7) != 0)
    fatal("unsupported wgmma descriptor (not a 128- or 64-byte swizzle, base 0)");
}

inline void wgmma_issue(int n, std::vector<float*> dregs, bool acc, bool a_regs, const uint32_t* a, uint64_t da,
                        uint64_t db, int ta, int tb) {
  jitter();
  if (static_cast<int>(dregs.size()) != n / 2) {
    fatal("wgmma accumulator count");
    return;
  }
  Mma op;
  op.m_n = n;
  op.acc = acc;
  op.a_regs = a_regs;
  op.da = da;
  op.db = db;
  op.ta = ta;
  op.tb = tb;
  if (a_regs) {  // the quad's A fragments (rows lane/4 (+8) of the warp's 16, all 16 k)
    uint32_t mine[4] = {a[0], a[1], a[2], a[3]};
    const int q0 = (me->tid & 31) & ~3;
    warp_exchange(mine, [&](uint32_t (*slot)[4]) {
      for (int q = 0; q < 4; ++q)
        for (int r = 0; r < 4; ++r) op.a_frag[q][r] = slot[q0 + q][r];
      return 0;
    });
  } else {
    check_desc(da);
  }
  check_desc(db);
  // the operands' 16-byte granules
  if (!a_regs)
    for (int m = 0; m < 64; ++m)
      for (int k = 0; k < 16; k += 8) op.granules.push_back(operand_byte(da, ta, m, k) & ~15u);
  if (tb == 0) {
    for (int c = 0; c < n; ++c)
      for (int k = 0; k < 16; k += 8) op.granules.push_back(operand_byte(db, 0, c, k) & ~15u);
  } else {
    for (int k = 0; k < 16; ++k)
      for (int c = 0; c < n; c += 8) op.granules.push_back(operand_byte(db, 1, c, k) & ~15u);
  }
  {
    std::lock_guard<std::mutex> lock(mu);
    for (uint32_t g : op.granules) {
      if (g + 16 > static_cast<uint32_t>(cta->smem_bytes)) {
        report_locked("wgmma operand past the CTA's dynamic shared memory");
        break;
      }
      const Copy* c = cta->word[g / 4];
      if (c == nullptr) continue;
      const bool fenced = visible(c, me->fenced_vc) || (c->fence_comp >= 0 && me->vc[c->fence_comp] >= c->fence_clock);
      if (fenced) continue;
      if (!c->landed)
        report_locked("wgmma reads shared memory whose cp.async has not landed (no cp.async.wait_group / wait_all "
                      "or mbarrier phase covers the copy yet)");
      else if (!visible(c, me->vc))
        report_locked("wgmma reads cp.async data whose completion is not ordered before the read (the reader "
                      "neither waited for the copy nor synchronized with a thread that did)");
      else
        report_locked("wgmma reads cp.async data without a fence.proxy.async after the wait");
      break;
    }
    // st.shared data: fenced by its writer after the store, the fence ordered before this issue
    bool gen_bad = false;
    for (uint32_t g : op.granules) {
      if (gen_bad) break;
      const GenW& gw = cta->gen[g / 16];
      if (!gw.any) continue;
      for (int h = 0; h < 8 && !gen_bad; ++h) {
        const int w = gw.writer[h];
        if (w < 0) continue;
        const auto& fs = thread_of(w).fence_stamps;
        if (fs.size() <= gw.epoch[h]) {
          report_locked("wgmma reads st.shared data without a fence.proxy.async by its writer after the store");
          gen_bad = true;
        } else if (me->vc[w] < fs[gw.epoch[h]]) {
          report_locked("wgmma reads st.shared data whose store (and the writer's fence.proxy.async) is not "
                        "ordered before the wgmma");
          gen_bad = true;
        }
      }
    }
    op.issue_mark = cta->next_issue;
  }
  // chained onto an in-flight wgmma of this thread with the same accumulators?
  op.chain = false;
  for (const auto& g : me->mma_groups)
    for (const Mma& p : g)
      if (p.d[0] == dregs[0]) op.chain = true;
  for (const Mma& p : me->open_mma)
    if (p.d[0] == dregs[0]) op.chain = true;
  if (!op.chain) {
    op.init.resize(dregs.size());
    for (size_t i = 0; i < dregs.size(); ++i) op.init[i] = *dregs[i];
  }
  for (float* x : dregs) *x = NAN;  // in flight: the registers are not the result yet
  op.d = std::move(dregs);
  me->open_mma.push_back(std::move(op));
}

inline void wgmma_retire(Mma& op, const std::vector<float>* chained_from) {
  {
    std::lock_guard<std::mutex> lock(mu);
    for (uint32_t g : op.granules) {
      const Copy* c = cta->word[g / 4];
      if (c != nullptr && c->issue_no >= op.issue_mark) {
        report_locked("cp.async into shared memory that an in-flight wgmma reads (issued before the wgmma retired)");
        break;
      }
    }
  }
  if ((me->tid & 31) == 0) {
    std::lock_guard<std::mutex> lock(mu);
    uint32_t prev = ~0u;
    for (uint32_t g : op.granules)
      if (g != prev) {
        record_read_locked(g / 16);
        prev = g;
      }
  }
  const int t = me->tid & 127, warp = t / 32, lane = t & 31;
  const int n = op.m_n;
  float a[2][16];
  for (int i = 0; i < 2; ++i)
    for (int k = 0; k < 16; ++k) {
      const int m = 16 * warp + lane / 4 + 8 * i;
      if (op.a_regs) {  // register r = 2 h + i holds (row + 8 i, k = 8 h + 2 (lane % 4) + e)
        const int h = k / 8, q = (k % 8) / 2, e = k % 2;
        const uint32_t v = op.a_frag[q][2 * h + i];
        a[i][k] = emu_bf2f(static_cast<uint16_t>(e ? v >> 16 : v & 0xFFFF));
      } else {
        a[i][k] = smem_bf16(operand_byte(op.da, op.ta, m, k));
      }
    }
  op.result.assign(n / 2, 0.f);
  std::vector<float> b(16);
  for (int j = 0; j < n / 8; ++j)
    for (int e = 0; e < 2; ++e) {
      const int col = 8 * j + 2 * (lane % 4) + e;
      for (int k = 0; k < 16; ++k) b[k] = smem_bf16(operand_byte(op.db, op.tb, col, k));
      for (int i = 0; i < 2; ++i) {
        const int idx = 4 * j + 2 * i + e;
        float acc = 0.f;
        if (op.acc) acc = op.chain ? (chained_from ? (*chained_from)[idx] : NAN) : op.init[idx];
        for (int k = 0; k < 16; ++k) acc += a[i][k] * b[k];
        op.result[idx] = acc;
      }
    }
}

inline void wgmma_commit() {
  me->mma_groups.push_back(std::move(me->open_mma));
  me->open_mma.clear();
}

inline void wg_rendezvous() {
  std::unique_lock<std::mutex> lk(mu);
  const int wg = me->tid / 128;
  const int n = std::min(128, cta->nthreads - 128 * wg);
  auto& slot = cta->wg_bars[wg];
  if (!slot) {
    slot = std::make_unique<NamedBar>();
    slot->acc.assign(clock_width, 0);
  }
  NamedBar* b = slot.get();
  join(b->acc, me->vc);
  me->vc[me->comp] += 1;
  const uint64_t g = b->gen;
  if (++b->count == n) {
    b->results.push_back(b->acc);
    b->acc.assign(clock_width, 0);
    b->count = 0;
    b->gen += 1;
    b->cv.notify_all();
  }
  block_on(b->cv, lk, [&] { return b->gen > g; }, "a warpgroup's wgmma.wait_group (its threads' waits differ?)");
  if (g < b->results.size()) join(me->vc, b->results[g]);
  if (b->results.size() > 4 && b->gen > 4) b->results[b->gen - 5].clear();  // old generations
}

inline void wgmma_wait(size_t n) {
  jitter();
  while (me->mma_groups.size() > n) {
    for (Mma& op : me->mma_groups.front()) {
      // the latest retired result on the same registers (kept across calls in `last`)
      static thread_local std::map<float*, std::vector<float>> last;
      auto it = last.find(op.d[0]);
      wgmma_retire(op, op.chain && it != last.end() ? &it->second : nullptr);
      last[op.d[0]] = op.result;
      for (size_t i = 0; i < op.d.size(); ++i) *op.d[i] = op.result[i];
    }
    me->mma_groups.pop_front();
  }
  // registers of wgmmas still in flight read as NaN
  for (const auto& g : me->mma_groups)
    for (const Mma& p : g)
      for (float* x : p.d) *x = NAN;
  // A wgmma is one operation of the warpgroup: it completes only once all four warps have issued
  // it, so a thread past its wait_group knows the whole warpgroup's wgmmas of the retired groups
  // were issued and have read their operands. Modeled as a rendezvous of the warpgroup (.aligned:
  // its threads execute the same wait_groups) that orders every thread's retirement (and operand
  // reads) before any thread leaves the wait, e.g. before lane 0 releases a ring slot for its
  // warp or another warp overwrites a shared operand. (Stronger than the GPU: it also orders
  // what a warp did between its last commit and its wait.)
  wg_rendezvous();
}

// ---------------------------------------------------------------- the PTX interpreter
struct Operand {
  enum Kind { NONE, ARG, ADDR, VEC, IMM, NAME } kind = NONE;
  int arg = -1;                // %N
  std::vector<int> vec;        // {%a, %b, ...}
  double imm = 0;
  std::string name;
};
struct Instr {
  std::string label;           // a label on this instruction
  std::string guard;           // predicate name, with '!' if negated
  std::string op;              // opcode with its qualifiers
  std::vector<Operand> args;
};
struct Prog {
  std::string text;
  std::vector<Instr> code;
};

struct Op {
  uint64_t v = 0;
  double f = 0;
  bool is_float = false;
  void* out = nullptr;
  int out_size = 0;
  bool out_float = false;
};
template <class T>
inline Op in(const T& x) {
  Op o;
  if constexpr (std::is_pointer_v<T>) o.v = reinterpret_cast<uintptr_t>(x);
  else if constexpr (std::is_floating_point_v<T>) {
    o.f = x;
    o.is_float = true;
  } else o.v = static_cast<uint64_t>(x);
  return o;
}
template <class T>
inline Op out(T& x) {
  Op o;
  o.out = &x;
  o.out_size = sizeof(T);
  o.out_float = std::is_floating_point_v<T>;
  return o;
}
template <class T>
inline Op inout(T& x) {
  Op o = out(x);
  o.is_float = std::is_floating_point_v<T>;
  if constexpr (std::is_floating_point_v<T>) o.f = x;
  else o.v = static_cast<uint64_t>(x);
  return o;
}

inline std::string trim(const std::string& s) {
  size_t a = 0, b = s.size();
  while (a < b && std::isspace(static_cast<unsigned char>(s[a]))) ++a;
  while (b > a && std::isspace(static_cast<unsigned char>(s[b - 1]))) --b;
  return s.substr(a, b - a);
}

inline Operand parse_operand(std::string s) {
  s = trim(s);
  Operand o;
  if (s.empty()) return o;
  if (s[0] == '[') {
    Operand in = parse_operand(s.substr(1, s.find(']') - 1));
    in.kind = in.kind == Operand::ARG ? Operand::ADDR : Operand::NONE;
    return in;
  }
  if (s[0] == '{') {
    o.kind = Operand::VEC;
    std::string body = s.substr(1, s.find('}') - 1);
    size_t p = 0;
    while (p < body.size()) {
      size_t q = body.find(',', p);
      if (q == std::string::npos) q = body.size();
      Operand e = parse_operand(body.substr(p, q - p));
      o.vec.push_back(e.kind == Operand::ARG ? e.arg : -1);
      p = q + 1;
    }
    return o;
  }
  if (s.size() > 1 && s[0] == '%' && s[1] == '%') {  // a special register (%%laneid in the template)
    o.kind = Operand::NAME;
    o.name = s.substr(1);
    return o;
  }
  if (s[0] == '%') {
    o.kind = Operand::ARG;
    o.arg = std::atoi(s.c_str() + 1);
    return o;
  }
  if (std::isdigit(static_cast<unsigned char>(s[0])) || s[0] == '-') {
    o.kind = Operand::IMM;
    o.imm = std::strtod(s.c_str(), nullptr);
    return o;
  }
  o.kind = Operand::NAME;
  o.name = s;
  return o;
}

inline const Prog* compile(const char* text) {
  auto* p = new Prog;  // one per asm statement, kept for the process
  p->text = text;
  std::string src = text;
  // statements end with ';'; scope braces around a block are not statements
  size_t pos = 0;
  while (pos < src.size()) {
    size_t e = src.find(';', pos);
    if (e == std::string::npos) e = src.size();
    std::string st = trim(src.substr(pos, e - pos));
    pos = e + 1;
    for (;;) {  // strip scope braces (a leading '{' not of an operand vector, a '}')
      if (!st.empty() && (st[0] == '}' || (st[0] == '{' && st.size() > 1 && st[1] != '%'))) st = trim(st.substr(1));
      else break;
    }
    Instr in;
    for (;;) {  // labels
      size_t i = 0;
      while (i < st.size() && (std::isalnum(static_cast<unsigned char>(st[i])) || st[i] == '_' || st[i] == '$')) ++i;
      if (i > 0 && i < st.size() && st[i] == ':' && (i + 1 >= st.size() || st[i + 1] != ':')) {
        if (!in.label.empty()) {  // two labels: an empty instruction for the first
          Instr l;
          l.label = in.label;
          l.op = "";
          p->code.push_back(l);
        }
        in.label = st.substr(0, i);
        st = trim(st.substr(i + 1));
      } else {
        break;
      }
    }
    if (!st.empty() && st[0] == '@') {
      size_t sp = st.find_first_of(" \t\n");
      in.guard = st.substr(1, sp - 1);
      st = trim(st.substr(sp));
    }
    if (st.empty() && in.label.empty()) continue;
    size_t sp = st.find_first_of(" \t\n");
    in.op = st.substr(0, sp);
    if (sp != std::string::npos) {
      std::string rest = st.substr(sp);
      int depth = 0;
      size_t a = 0;
      for (size_t i = 0; i <= rest.size(); ++i) {
        if (i < rest.size() && (rest[i] == '{' || rest[i] == '[')) ++depth;
        if (i < rest.size() && (rest[i] == '}' || rest[i] == ']')) --depth;
        if (i == rest.size() || (rest[i] == ',' && depth == 0)) {
          if (!trim(rest.substr(a, i - a)).empty()) in.args.push_back(parse_operand(rest.substr(a, i - a)));
          a = i + 1;
        }
      }
    }
    p->code.push_back(in);
  }
  return p;
}

inline bool starts(const std::string& s, const char* prefix) { return s.rfind(prefix, 0) == 0; }
inline bool has(const std::string& s, const char* part) { return s.find(part) != std::string::npos; }

inline void exec(const Prog& prog, Op* ops, int nops) {
  if (aborted) return;
  std::map<std::string, bool> pred;
  auto val = [&](const Operand& o) -> uint64_t {
    if (o.kind == Operand::ARG || o.kind == Operand::ADDR) {
      if (o.arg < 0 || o.arg >= nops) {
        fatal("PTX operand out of range in: " + prog.text);
        return 0;
      }
      return ops[o.arg].is_float ? static_cast<uint64_t>(ops[o.arg].f) : ops[o.arg].v;
    }
    if (o.kind == Operand::IMM) return static_cast<uint64_t>(static_cast<int64_t>(o.imm));
    return 0;
  };
  auto u32 = [&](const Operand& o) { return static_cast<uint32_t>(val(o)); };
  auto unsupported = [&](const Instr& in) { fatal("unsupported PTX instruction '" + in.op + "' in: " + prog.text); };
  size_t pc = 0, steps = 0;
  while (pc < prog.code.size()) {
    if (++steps > 1000000) {
      fatal("PTX loop does not end: " + prog.text);
      return;
    }
    const Instr& in = prog.code[pc++];
    if (!in.guard.empty()) {
      const bool neg = in.guard[0] == '!';
      const bool v = pred[neg ? in.guard.substr(1) : in.guard];
      if (v == neg) continue;
    }
    const std::string& op = in.op;
    const auto& A = in.args;
    if (op.empty() || starts(op, ".reg")) continue;
    if (op == "setp.ne.b32" || op == "setp.eq.b32" || op == "setp.ne.u32" || op == "setp.eq.u32") {
      const bool ne = u32(A[1]) != u32(A[2]);
      pred[A[0].name] = has(op, ".ne.") ? ne : !ne;
    } else if (op == "selp.u32" || op == "selp.b32") {  // d, a, b, p
      if (A.size() != 4 || A[0].kind != Operand::ARG || ops[A[0].arg].out == nullptr || ops[A[0].arg].out_size != 4)
        return unsupported(in);
      const uint32_t v = pred[A[3].name] ? u32(A[1]) : u32(A[2]);
      std::memcpy(ops[A[0].arg].out, &v, 4);
    } else if (op == "bar.red.or.pred" || op == "barrier.red.or.pred") {  // p, id, n, q
      if (A.size() != 4 || A[0].kind != Operand::NAME || A[3].kind != Operand::NAME) return unsupported(in);
      int v = pred[A[3].name] ? 1 : 0;
      bar(static_cast<int>(val(A[1])), static_cast<int>(val(A[2])), true, &v);
      pred[A[0].name] = v != 0;
    } else if (op == "ex2.approx.ftz.f32" || op == "ex2.approx.f32") {
      if (A.size() != 2 || A[0].kind != Operand::ARG || !ops[A[0].arg].out_float || ops[A[0].arg].out_size != 4 ||
          A[1].kind != Operand::ARG || !ops[A[1].arg].is_float)
        return unsupported(in);
      float x = static_cast<float>(ops[A[1].arg].f);
      if (has(op, ".ftz") && std::fpclassify(x) == FP_SUBNORMAL) x = 0.f;
      float y = exp2f(x);
      if (has(op, ".ftz") && std::fpclassify(y) == FP_SUBNORMAL) y = 0.f;
      std::memcpy(ops[A[0].arg].out, &y, 4);
    } else if (op == "ldmatrix.sync.aligned.m8n8.x4.shared.b16" || op == "ldmatrix.sync.aligned.m8n8.x2.shared.b16" ||
               op == "ldmatrix.sync.aligned.m8n8.x1.shared.b16") {
      // lane L supplies the address of row L % 8 of matrix L / 8; register j of lane l: matrix j,
      // row l / 4, columns 2 (l % 4) + {0, 1}
      const int nm = has(op, ".x4.") ? 4 : has(op, ".x2.") ? 2 : 1;
      std::vector<int> dst = A[0].kind == Operand::VEC ? A[0].vec : std::vector<int>{A[0].arg};
      if (static_cast<int>(dst.size()) != nm || A.size() != 2 || A[1].kind != Operand::ADDR) return unsupported(in);
      const int lane = me->tid & 31;
      uint32_t rows[4] = {0, 0, 0, 0};
      matrix_rows(u32(A[1]), nm, rows, "ldmatrix");
      for (int j = 0; j < nm; ++j) {
        Op& o = ops[dst[j]];
        if (dst[j] < 0 || o.out == nullptr || o.out_size != 4) return unsupported(in);
        uint8_t buf[4];
        ld_shared(rows[j] + 4 * (lane % 4), buf, 4);  // the 4 bytes this lane receives, checked as a load
        std::memcpy(o.out, buf, 4);
      }
    } else if (op == "stmatrix.sync.aligned.m8n8.x4.shared.b16" || op == "stmatrix.sync.aligned.m8n8.x2.shared.b16" ||
               op == "stmatrix.sync.aligned.m8n8.x1.shared.b16" ||
               op == "stmatrix.sync.aligned.m8n8.x4.trans.shared.b16" ||
               op == "stmatrix.sync.aligned.m8n8.x2.trans.shared.b16" ||
               op == "stmatrix.sync.aligned.m8n8.x1.trans.shared.b16") {
      // ldmatrix's layout, stored: lane L supplies the address of row L % 8 of matrix L / 8;
      // register j of lane l (matrix j, row l / 4, columns 2 (l % 4) + {0, 1}) goes to that row's
      // bytes 4 (l % 4) .. + 3, each lane's 4 bytes a st.shared of that lane. .trans: element
      // (l / 4, 2 (l % 4) + e) of matrix j (register j's half e) goes to row 2 (l % 4) + e of that
      // matrix, at byte 2 (l / 4); each half a st.shared of this lane
      const int nm = has(op, ".x4.") ? 4 : has(op, ".x2.") ? 2 : 1;
      const bool trans = has(op, ".trans.");
      std::vector<int> src = A.size() == 2 && A[1].kind == Operand::VEC ? A[1].vec : std::vector<int>{};
      if (A.size() == 2 && A[1].kind == Operand::ARG) src = {A[1].arg};
      if (static_cast<int>(src.size()) != nm || A[0].kind != Operand::ADDR) return unsupported(in);
      const int lane = me->tid & 31;
      uint32_t rows[4] = {0, 0, 0, 0}, trows[4][2] = {};
      if (trans) matrix_rows_trans(u32(A[0]), nm, trows);
      else matrix_rows(u32(A[0]), nm, rows, "stmatrix");
      for (int j = 0; j < nm; ++j) {
        if (src[j] < 0 || ops[src[j]].is_float) return unsupported(in);
        const uint32_t v = static_cast<uint32_t>(ops[src[j]].v);
        if (!trans) {
          st_shared(rows[j] + 4 * (lane % 4), &v, 4);
          continue;
        }
        for (int e = 0; e < 2; ++e) {
          const uint16_t h = static_cast<uint16_t>(v >> (16 * e));
          st_shared(trows[j][e] + 2 * (lane / 4), &h, 2);
        }
      }
    } else if (op == "movmatrix.sync.aligned.m8n8.trans.b16") {
      // lane l holds (row l / 4, columns 2 (l % 4) + {0, 1}); the transpose's: element (c, r)
      // of the input for its (r, c)
      if (A.size() != 2 || A[0].kind != Operand::ARG || ops[A[0].arg].out == nullptr || ops[A[0].arg].out_size != 4)
        return unsupported(in);
      const int lane = me->tid & 31;
      const uint32_t mine[4] = {u32(A[1]), 0, 0, 0};
      const uint32_t v = warp_exchange(mine, [&](uint32_t (*slot)[4]) {
        uint32_t r = 0;
        for (int e = 0; e < 2; ++e) {
          const int row = 2 * (lane % 4) + e, col = lane / 4;  // of the input
          const uint32_t w = slot[4 * row + col / 2][0];
          const uint32_t h = (col % 2) ? w >> 16 : w & 0xFFFFu;
          r |= h << (16 * e);
        }
        return r;
      });
      std::memcpy(ops[A[0].arg].out, &v, 4);
    } else if (op == "bra" || op == "bra.uni") {
      size_t t = 0;
      while (t < prog.code.size() && prog.code[t].label != A[0].name) ++t;
      if (t == prog.code.size()) return unsupported(in);
      pc = t;
    } else if (starts(op, "cp.async.cg.shared.global") || starts(op, "cp.async.ca.shared.global")) {
      // [dst], [src], cp-size[, src-size][, cache-policy]
      const int cp_size = static_cast<int>(val(A[2]));
      int src_size = cp_size;
      const bool hint = has(op, ".L2::cache_hint");
      if (A.size() >= static_cast<size_t>(hint ? 5 : 4)) src_size = static_cast<int>(val(A[3]));
      if (starts(op, "cp.async.cg") && cp_size != 16) report("cp.async.cg with a cp-size other than 16");
      if (cp_size != 4 && cp_size != 8 && cp_size != 16) return unsupported(in);
      cp_async(u32(A[0]), reinterpret_cast<const void*>(val(A[1])), cp_size, src_size);
    } else if (op == "cp.async.commit_group") {
      cp_async_commit();
    } else if (op == "cp.async.wait_group") {
      cp_async_wait_group(val(A[0]));
    } else if (op == "cp.async.wait_all") {  // commit_group + wait_group 0
      cp_async_commit();
      cp_async_wait_group(0);
    } else if (starts(op, "cp.async.mbarrier.arrive.noinc")) {
      mbar_arrive_cp_async(u32(A[0]));
    } else if (starts(op, "fence.proxy.async")) {
      fence_proxy_async();
    } else if (op == "prefetch.global.L1" || op == "prefetch.global.L2") {
      // a cache hint: nothing to model (the address is not checked: a prefetch never faults)
    } else if (op == "fence.acq_rel.gpu" || op == "fence.sc.gpu") {
      // global-memory ordering across CTAs: one CTA runs at a time and each red.global.add is
      // atomic, so there is nothing to model
    } else if (op == "fence.acq_rel.cluster" || op == "fence.mbarrier_init.release.cluster") {
      // (cluster-scope ordering is modelled at the release arrivals and the cluster barrier)
    } else if (starts(op, "barrier.cluster.arrive")) {
      cluster_arrive();
    } else if (starts(op, "barrier.cluster.wait")) {
      cluster_wait();
    } else if (op == "mapa.shared::cluster.u32") {  // d, addr, rank
      Op& o = ops[A[0].arg];
      if (A.size() != 3 || o.out == nullptr || o.out_size != 4) return unsupported(in);
      const uint32_t v = mapa(u32(A[1]), u32(A[2]));
      std::memcpy(o.out, &v, 4);
    } else if (starts(op, "mbarrier.init")) {
      mbar_init(u32(A[0]), static_cast<int>(val(A[1])));
    } else if (starts(op, "mbarrier.arrive.") && !has(op, "expect_tx")) {
      if (has(op, ".shared::cluster")) mbar_arrive_cluster(u32(A[1]));
      else mbar_arrive(u32(A[1]));
    } else if (starts(op, "mbarrier.try_wait.parity")) {
      mbar_wait_parity(u32(A[1]), static_cast<int>(val(A[2])));  // blocks until it would succeed
      pred[A[0].name] = true;
    } else if (op == "bar.sync" || op == "barrier.sync" || op == "bar.arrive" || op == "barrier.arrive") {
      bar(static_cast<int>(val(A[0])), A.size() > 1 ? static_cast<int>(val(A[1])) : 0, has(op, "sync"));
    } else if (op == "wgmma.fence.sync.aligned") {
      // (register dependences are exact here)
    } else if (op == "wgmma.commit_group.sync.aligned") {
      wgmma_commit();
    } else if (op == "wgmma.wait_group.sync.aligned") {
      wgmma_wait(val(A[0]));
    } else if (starts(op, "wgmma.mma_async.sync.aligned.m64n") && has(op, ".f32.bf16.bf16")) {
      const int n = std::atoi(op.c_str() + std::strlen("wgmma.mma_async.sync.aligned.m64n"));
      if (!has(op, "k16.") || A.size() < 6) return unsupported(in);
      std::vector<float*> d;
      for (int i : A[0].vec) {
        if (i < 0 || i >= nops || ops[i].out == nullptr || !ops[i].out_float) return unsupported(in);
        d.push_back(static_cast<float*>(ops[i].out));
      }
      const bool a_regs = A[1].kind == Operand::VEC;
      bool scale_d = true;
      if (A[3].kind == Operand::NAME) scale_d = pred[A[3].name];
      else scale_d = val(A[3]) != 0;
      if (val(A[4]) != 1 || val(A[5]) != 1) return unsupported(in);  // negated operands
      uint32_t a[4] = {0, 0, 0, 0};
      if (a_regs) {
        if (A[1].vec.size() != 4) return unsupported(in);
        for (int r = 0; r < 4; ++r) a[r] = static_cast<uint32_t>(ops[A[1].vec[r]].v);
      }
      const int ta = a_regs ? 0 : (A.size() > 6 ? static_cast<int>(val(A[6])) : 0);
      const int tb = a_regs ? (A.size() > 6 ? static_cast<int>(val(A[6])) : 0)
                            : (A.size() > 7 ? static_cast<int>(val(A[7])) : 0);
      wgmma_issue(n, std::move(d), scale_d, a_regs, a, a_regs ? 0 : val(A[1]), val(A[2]), ta, tb);
    } else if (op == "setmaxnreg.inc.sync.aligned.u32" || op == "setmaxnreg.dec.sync.aligned.u32") {
      setmaxnreg(has(op, ".inc."), static_cast<int>(val(A[0])));
    } else if (op == "mov.u32" && A.size() == 2 && A[0].kind == Operand::ARG && A[1].kind == Operand::NAME) {
      uint32_t v = 0;
      if (A[1].name == "%laneid") v = static_cast<uint32_t>(me->tid & 31);
      else if (A[1].name == "%warpid") v = static_cast<uint32_t>(me->tid / 32);
      else if (A[1].name == "%tid.x") v = static_cast<uint32_t>(me->tid);
      else if (A[1].name == "%cluster_ctarank") v = static_cast<uint32_t>(cta->rank);
      else if (A[1].name == "%cluster_nctarank") v = cta->cluster != nullptr ? static_cast<uint32_t>(cta->cluster->ctas.size()) : 1u;
      else return unsupported(in);
      Op& o = ops[A[0].arg];
      if (o.out == nullptr || o.out_size != 4) return unsupported(in);
      std::memcpy(o.out, &v, 4);
    } else if (starts(op, "st.shared.") || starts(op, "st.shared::cluster.") || starts(op, "st.shared::cta.")) {
      // st.shared[::cluster]{.v2,.v4}.{u16,b16,u32,b32,f32} [addr], value(s)
      const int w = has(op, "16") ? 2 : has(op, "32") ? 4 : 0;
      if (w == 0 || A.size() != 2 || A[0].kind != Operand::ADDR || has(op, "64")) return unsupported(in);
      std::vector<int> src = A[1].kind == Operand::VEC ? A[1].vec : std::vector<int>{A[1].arg};
      uint8_t buf[64];
      for (size_t i = 0; i < src.size(); ++i) {
        uint32_t v = static_cast<uint32_t>(ops[src[i]].v);
        if (ops[src[i]].is_float) {  // an "f" operand: its fp32 bits
          const float f = static_cast<float>(ops[src[i]].f);
          std::memcpy(&v, &f, 4);
        }
        std::memcpy(buf + w * i, &v, w);
      }
      if (starts(op, "st.shared::cluster.")) st_shared_cluster(u32(A[0]), buf, w * static_cast<int>(src.size()));
      else st_shared(u32(A[0]), buf, w * static_cast<int>(src.size()));
    } else if (starts(op, "ld.shared.") || starts(op, "ld.shared::cluster.") || starts(op, "ld.shared::cta.")) {
      // ld.shared[::cluster]{.v2,.v4}.{u32,b32,s32,f32} dst(s), [addr]
      if (!(has(op, "32")) || A.size() != 2 || A[1].kind != Operand::ADDR) return unsupported(in);
      std::vector<int> dst = A[0].kind == Operand::VEC ? A[0].vec : std::vector<int>{A[0].arg};
      uint8_t buf[64];
      if (starts(op, "ld.shared::cluster.")) ld_shared_cluster(u32(A[1]), buf, 4 * static_cast<int>(dst.size()));
      else ld_shared(u32(A[1]), buf, 4 * static_cast<int>(dst.size()));
      for (size_t i = 0; i < dst.size(); ++i) {
        Op& o = ops[dst[i]];
        if (o.out == nullptr || o.out_size != 4) return unsupported(in);
        std::memcpy(o.out, buf + 4 * i, 4);
      }
    } else if (op == "red.global.add.f32" || op == "red.global.add.v2.f32" || op == "red.global.add.v4.f32" ||
               op == "red.global.add.L2::cache_hint.v4.f32") {
      // [addr], value(s)[, cache-policy]: the policy is a hint, with no effect on the result
      const size_t n_args = has(op, ".L2::cache_hint") ? 3 : 2;
      if (A.size() != n_args || A[0].kind != Operand::ADDR) return unsupported(in);
      std::vector<int> src = A[1].kind == Operand::VEC ? A[1].vec : std::vector<int>{A[1].arg};
      const size_t want = has(op, ".v4.") ? 4 : has(op, ".v2.") ? 2 : 1;
      if (src.size() != want) return unsupported(in);
      float v[4];
      for (size_t i = 0; i < src.size(); ++i) {
        if (src[i] < 0 || !ops[src[i]].is_float) return unsupported(in);
        v[i] = static_cast<float>(ops[src[i]].f);
      }
      red_add_f32(val(A[0]), v, static_cast<int>(src.size()));
    } else if (op == "red.global.add.u64") {  // [addr], value
      if (A.size() != 2 || A[0].kind != Operand::ADDR || A[1].kind == Operand::VEC || A[1].arg < 0 ||
          ops[A[1].arg].is_float)
        return unsupported(in);
      red_add_u64(val(A[0]), ops[A[1].arg].v);
    } else if (starts(op, "createpolicy.")) {
      if (ops[A[0].arg].out == nullptr || ops[A[0].arg].out_size != 8) return unsupported(in);
      const uint64_t token = 0x10E7C0DEull;  // an opaque cache policy
      std::memcpy(ops[A[0].arg].out, &token, 8);
    } else {
      return unsupported(in);
    }
  }
}

// ---------------------------------------------------------------- launches
inline cudaError_t last_error = cudaSuccess;

inline void run_thread(Cta& c, int tid, const std::function<void()>& body, dim3 b, dim3 grid) {
  threadIdx = dim3(static_cast<unsigned>(tid));
  blockIdx = b;
  gridDim = grid;  // (thread-local, as blockIdx)
  blockDim = dim3(static_cast<unsigned>(c.nthreads));
  cta = &c;
  me = &c.thr[tid];
  body();
  me = nullptr;
  cta = nullptr;
}

inline void setup_cta(Cta& c, int nt, int smem, unsigned bx) {
  c.nthreads = nt;
  c.smem_bytes = smem;
  c.word.assign(NWORD, nullptr);
  c.gen.assign(EMU_SMEM_CAP / 16, GenW{});
  c.reads.assign(EMU_SMEM_CAP / 16, {});
  const int launch_regs = std::min(255, 65536 / (((nt + 31) / 32) * 32)) & ~7;
  c.thr.resize(nt);
  for (int w = 0; w < (nt + 31) / 32; ++w) c.warps.push_back(std::make_unique<Warp>());
  for (int t = 0; t < nt; ++t) {
    Thr& th = c.thr[t];
    th.tid = t;
    th.comp = c.rank * NCOMP + t;
    th.vc.assign(clock_width, 0);
    th.fenced_vc.assign(clock_width, 0);
    th.regs = launch_regs;
    const unsigned wg = static_cast<unsigned>(t / 128);
    std::mt19937 pick(seed * 7919u + wg * 104729u + bx * 31u + 1u);
    th.slow = seed == 0 ? 0 : static_cast<int>(pick() % 3u) * 3;  // 0, 3 or 6 sixteenths
    th.rng.seed(seed * 1000003u + static_cast<unsigned>(t) * 9176u + bx);
  }
  std::memset(c.smem, 0xFF, EMU_SMEM_CAP);  // uninitialized shared memory
}

// Blocks in clusters of `cluster` consecutive x indices (1: no clusters, one CTA at a time, in
// smem_raw); the CTAs of a cluster run together, each in its own shared memory buffer.
template <class K, class... Args>
inline void launch_clusters(K kernel, dim3 grid, dim3 block, int smem, unsigned cluster, Args... args) {
  const int nt = static_cast<int>(block.x * block.y * block.z);
  if (nt <= 0 || nt > MAXT || smem > EMU_SMEM_CAP || block.y != 1 || block.z != 1 || cluster < 1 ||
      cluster > 8 || grid.x % cluster != 0) {
    last_error = cudaErrorInvalidValue;
    return;
  }
  clock_width = static_cast<size_t>(NCOMP) * cluster;
  std::vector<std::unique_ptr<uint8_t[]>> bufs;
  if (cluster > 1)
    for (unsigned r = 0; r < cluster; ++r) bufs.emplace_back(new uint8_t[EMU_SMEM_CAP + 1024]);
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx0 = 0; bx0 < grid.x; bx0 += cluster) {
        if (aborted) return;
        std::vector<Cta> ctas(cluster);
        Cluster cl;
        cl.threads = nt * static_cast<int>(cluster);
        cl.acc.assign(clock_width, 0);
        for (unsigned r = 0; r < cluster; ++r) {
          Cta& c = ctas[r];
          c.smem = cluster > 1 ? reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(bufs[r].get()) + 1023) &
                                                            ~uintptr_t(1023))
                               : smem_raw;
          c.rank = static_cast<int>(r);
          c.cluster = &cl;
          cl.ctas.push_back(&c);
          setup_cta(c, nt, smem, bx0 + r);
        }
        gridDim = grid;
        std::function<void()> body = [&] { kernel(args...); };
        std::vector<std::thread> th;
        th.reserve(static_cast<size_t>(nt) * cluster);
        for (unsigned r = 0; r < cluster; ++r)
          for (int t = 0; t < nt; ++t)
            th.emplace_back(run_thread, std::ref(ctas[r]), t, std::cref(body), dim3(bx0 + r, by, bz), grid);
        for (auto& x : th) x.join();
      }
}

template <class K, class... Args>
inline void launch(K kernel, dim3 grid, dim3 block, int smem, cudaStream_t, Args... args) {
  launch_clusters(kernel, grid, block, smem, 1u, args...);
}

}  // namespace emu

// ---- builtins that need the runtime
inline void __syncthreads() { emu::bar(0, 0, true); }
inline float __shfl_xor_sync(unsigned mask, float v, int lane_mask) {
  (void)mask;
  uint32_t in[4] = {0, 0, 0, 0};
  std::memcpy(&in[0], &v, 4);
  const int lane = emu::me->tid & 31;
  return emu::warp_exchange(in, [&](uint32_t (*slot)[4]) {
    float r;
    std::memcpy(&r, &slot[(lane ^ lane_mask) & 31][0], 4);
    return r;
  });
}
// float -> integer conversions (cvt.rni.s32.f32, cvt.rni / cvt.rpi .u64.f32): the GPU saturates
// and converts NaN to 0; the kernels that use them bound their values, so a finite value out of
// range is reported (a broken bound), NaN converts to 0 as on the GPU
inline float __int_as_float(int v) {
  float f;
  std::memcpy(&f, &v, 4);
  return f;
}
inline int __float2int_rn(float x) {
  if (std::isnan(x)) return 0;
  if (!(std::fabs(x) < 2147483648.f)) emu::report("__float2int_rn: a value outside the int32 range");
  return static_cast<int>(std::nearbyint(x));
}
inline unsigned long long emu_f2ull(double r) {
  if (std::isnan(r)) return 0;
  if (!(r >= 0 && r < 18446744073709551616.0)) emu::report("__float2ull: a value outside the u64 range");
  return static_cast<unsigned long long>(r);
}
inline unsigned long long __float2ull_rn(float x) { return emu_f2ull(std::nearbyint(static_cast<double>(x))); }
inline unsigned long long __float2ull_ru(float x) { return emu_f2ull(std::ceil(static_cast<double>(x))); }
inline int __any_sync(unsigned mask, int pred) {
  (void)mask;
  uint32_t in[4] = {pred ? 1u : 0u, 0, 0, 0};
  return emu::warp_exchange(in, [](uint32_t (*slot)[4]) {
    int any = 0;
    for (int l = 0; l < 32; ++l) any |= slot[l][0] != 0;
    return any;
  });
}
namespace emu {
inline int sm_count = 2;  // cudaDevAttrMultiProcessorCount: a small count (a persistent grid walks several rows per CTA)
}
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr attr, int dev) {
  (void)dev;
  if (attr != cudaDevAttrMultiProcessorCount) return cudaErrorInvalidValue;
  *v = emu::sm_count;
  return cudaSuccess;
}
inline cudaError_t cudaGetDevice(int* d) {
  *d = 0;
  return cudaSuccess;
}
template <class K>
inline cudaError_t cudaFuncSetAttribute(K, cudaFuncAttribute, int bytes) {
  return bytes <= EMU_SMEM_CAP ? cudaSuccess : cudaErrorInvalidValue;
}
inline cudaError_t cudaGetLastError() {
  const cudaError_t e = emu::last_error;
  emu::last_error = cudaSuccess;
  return e;
}

// cudaLaunchKernelEx with a cluster dimension (the only launch attribute modelled)
enum cudaLaunchAttributeID { cudaLaunchAttributeClusterDimension = 4 };
struct cudaLaunchAttributeValue {
  struct {
    unsigned x, y, z;
  } clusterDim;
};
struct cudaLaunchAttribute {
  cudaLaunchAttributeID id;
  cudaLaunchAttributeValue val;
};
struct cudaLaunchConfig_t {
  dim3 gridDim;
  dim3 blockDim;
  size_t dynamicSmemBytes;
  cudaStream_t stream;
  cudaLaunchAttribute* attrs;
  unsigned numAttrs;
};
template <class... P, class... A>
inline cudaError_t cudaLaunchKernelEx(const cudaLaunchConfig_t* cfg, void (*kernel)(P...), A&&... args) {
  unsigned cluster = 1;
  for (unsigned i = 0; i < cfg->numAttrs; ++i) {
    if (cfg->attrs[i].id != cudaLaunchAttributeClusterDimension) return cudaErrorInvalidValue;
    const auto& d = cfg->attrs[i].val.clusterDim;
    if (d.y != 1 || d.z != 1) return cudaErrorInvalidValue;
    cluster = d.x;
  }
  emu::launch_clusters(kernel, cfg->gridDim, cfg->blockDim, static_cast<int>(cfg->dynamicSmemBytes), cluster,
                       static_cast<P>(args)...);
  return cudaGetLastError();
}
