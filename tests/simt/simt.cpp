// The fiber scheduler behind simt.h (see there for what is emulated).
#include "simt.h"

#include <cuda_fp16.h>
#include <ucontext.h>

#include <algorithm>
#include <cstdlib>
#include <memory>
#include <random>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

extern unsigned char simt_dynamic_shared_region[];  // shared_region.cpp

namespace simt {

thread_local uint3 thread_idx, block_idx;
thread_local dim3 block_dim, grid_dim;

namespace {

constexpr size_t kStackBytes = 128 * 1024;
constexpr int kWarp = 32;

enum State : int { kReady, kAtBlock, kAtWarp, kAtGroup, kDone };
enum WarpOp : int { kShfl = 1, kShflXor = 2, kMmaBf16 = 3, kMmaF16 = 4, kLdsm = 5, kLdsmTrans = 6, kBallot = 7 };

const char* state_name(const State s) {
  switch (s) {
    case kReady: return "running";
    case kAtBlock: return "at a block barrier";
    case kAtWarp: return "at a warp operation";
    case kAtGroup: return "at a warpgroup operation";
    case kDone: return "exited";
  }
  return "?";
}

struct AsyncCopy {
  void* dst;
  const void* src;
  int bytes, src_bytes;  // src_bytes < bytes: the rest is zero-filled
};

// Bounds of the shared-memory section (defined by the linker; absent if no kernel has any).
extern "C" char __start_simt_shared[] __attribute__((weak));
extern "C" char __stop_simt_shared[] __attribute__((weak));

size_t shared_bytes() {
  return __start_simt_shared && __stop_simt_shared > __start_simt_shared
             ? static_cast<size_t>(__stop_simt_shared - __start_simt_shared)
             : 0;
}
bool in_shared(const void* p, size_t bytes) {
  const char* c = static_cast<const char*>(p);
  return shared_bytes() && c >= __start_simt_shared && c + bytes <= __stop_simt_shared;
}

// One flag per shared-memory byte: written by a landed cp.async whose thread has not issued
// fence.proxy.async since (wgmma may not read it yet).
thread_local std::vector<uint8_t> g_unfenced;

void land(std::vector<AsyncCopy>& copies, std::vector<std::pair<char*, int>>* unfenced) {
  for (const AsyncCopy& c : copies) {
    if (c.src_bytes) std::memcpy(c.dst, c.src, static_cast<size_t>(c.src_bytes));
    std::memset(static_cast<char*>(c.dst) + c.src_bytes, 0, static_cast<size_t>(c.bytes - c.src_bytes));
    if (unfenced && in_shared(c.dst, static_cast<size_t>(c.bytes))) {
      char* dst = static_cast<char*>(c.dst);
      std::memset(&g_unfenced[static_cast<size_t>(dst - __start_simt_shared)], 1, static_cast<size_t>(c.bytes));
      unfenced->emplace_back(dst, c.bytes);
    }
  }
  copies.clear();
}

constexpr int kGroup = 128;  // threads of a warpgroup

// A thread's operands of a wgmma.mma_async, and the warpgroup's operation (run at the wait that
// covers it): shape and flags as the first thread gave them, every thread's accumulators and A.
struct WgArgs {
  bool bf16 = true, scale_d = true, trans_b = false;
  int n = 0;
  uint64_t desc = 0;
  float* d = nullptr;
  uint32_t a[4] = {};
};
struct WgMma {
  WgArgs shape;
  float* d[kGroup] = {};
  uint32_t a[kGroup][4] = {};
  std::vector<float> d_at_issue;  // [kGroup][n / 2]: the accumulators may not change until the wait
  bool chained = false;           // accumulating onto an earlier in-flight wgmma: no snapshot to compare
};

struct Thread {
  State state = kReady;
  std::vector<AsyncCopy> open_group;                // cp.async copies not committed yet
  std::vector<std::vector<AsyncCopy>> groups;       // committed, oldest first
  std::vector<std::pair<char*, int>> unfenced;      // landed cp.async bytes not proxy-fenced yet
  // warpgroup operations (op: kWgMma, kWgCommit, kWgWait); wg_fenced: a wgmma.fence since the last wait
  bool wg_fenced = false;
  WgArgs wg;  // this thread's part of a pending wgmma.mma_async
  int wg_pending = 0;
  // block barrier
  BarrierKind kind = kSync;
  int pred = 0, result = 0;
  // warp operations
  int op = 0, width = kWarp, lane_arg = 0;
  uint32_t mask = 0;
  uint64_t bits = 0;
  uint32_t a[4] = {}, b[2] = {};
  float c[4] = {};
  const uint16_t* row = nullptr;  // ldmatrix
};

struct Block {
  int n = 0;
  std::vector<Thread> t;
  // per warpgroup: wgmma operations issued and not committed, and committed groups (oldest first)
  std::vector<std::vector<WgMma>> wg_open;
  std::vector<std::vector<std::vector<WgMma>>> wg_groups;
  std::vector<ucontext_t> ctx;
  std::vector<std::unique_ptr<char[]>> stacks;
  ucontext_t sched;
  int cur = -1;
  std::string error;  // set by a fiber that found an error (raised by the scheduler)
  const std::function<void()>* body = nullptr;
};

thread_local Block* g_block = nullptr;

// Dynamic shared memory of the running block: shared_region.cpp's array, inside the emulated
// shared memory (poisoned, fence-tracked and addressable by wgmma descriptors like the static arrays).
constexpr size_t kDynamicCapacity = 96 * 1024;
thread_local size_t g_dynamic_bytes = 0;

void poison_shared_memory() {
  if (shared_bytes()) std::memset(__start_simt_shared, 0xff, shared_bytes());
  g_unfenced.assign(shared_bytes(), 0);
}

void fiber_main() {
  (*g_block->body)();
  Thread& th = g_block->t[g_block->cur];
  for (auto& group : th.groups) land(group, nullptr);  // copies still in flight land before the block ends
  land(th.open_group, nullptr);
  th.state = kDone;  // returns to the scheduler through uc_link
}

void yield() { swapcontext(&g_block->ctx[g_block->cur], &g_block->sched); }

[[noreturn]] void fail(const std::string& what) {
  std::ostringstream msg;
  msg << "simt: block (" << block_idx.x << ", " << block_idx.y << ", " << block_idx.z << "): " << what;
  throw std::runtime_error(msg.str());
}

// An error found inside a fiber: an exception cannot unwind out of a fiber's stack, so the
// fiber hands the message to the scheduler, which raises it, and is never resumed.
[[noreturn]] void fail_in_fiber(const std::string& what) {
  g_block->error = what;
  yield();
  std::abort();
}

float half_bits_to_float(uint16_t h, bool bf16) {
  if (bf16) {
    const uint32_t u = static_cast<uint32_t>(h) << 16;
    float x;
    std::memcpy(&x, &u, 4);
    return x;
  }
  __half_raw r;
  r.x = h;
  return __half2float(__half(r));
}

// The m16n8k16 fragments (PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating point
// type"); lane = 4 * groupID + threadID_in_group, g = groupID, q = threadID_in_group:
//   A 16x16: reg0 = (g, 2q..2q+1), reg1 = (g+8, 2q..), reg2 = (g, 2q+8..), reg3 = (g+8, 2q+8..)
//   B 16x8:  reg0 = (k = 2q..2q+1, n = g), reg1 = (k = 2q+8.., n = g)
//   C/D 16x8: c0, c1 = (g, 2q..2q+1), c2, c3 = (g+8, 2q..2q+1)
// The lower 16 bits of a register hold the element with the lower index.
void complete_mma(Thread* lanes, bool bf16) {
  float A[16][16], B[16][8], C[16][8];
  for (int lane = 0; lane < kWarp; ++lane) {
    const Thread& L = lanes[lane];
    const int g = lane >> 2, q = lane & 3;
    const int arow[4] = {g, g + 8, g, g + 8}, acol[4] = {2 * q, 2 * q, 2 * q + 8, 2 * q + 8};
    for (int r = 0; r < 4; ++r) {
      A[arow[r]][acol[r]] = half_bits_to_float(static_cast<uint16_t>(L.a[r] & 0xffffu), bf16);
      A[arow[r]][acol[r] + 1] = half_bits_to_float(static_cast<uint16_t>(L.a[r] >> 16), bf16);
    }
    for (int r = 0; r < 2; ++r) {
      B[2 * q + 8 * r][g] = half_bits_to_float(static_cast<uint16_t>(L.b[r] & 0xffffu), bf16);
      B[2 * q + 8 * r + 1][g] = half_bits_to_float(static_cast<uint16_t>(L.b[r] >> 16), bf16);
    }
    C[g][2 * q] = L.c[0];
    C[g][2 * q + 1] = L.c[1];
    C[g + 8][2 * q] = L.c[2];
    C[g + 8][2 * q + 1] = L.c[3];
  }
  float D[16][8];
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 8; ++j) {
      double s = C[i][j];  // products of 16-bit values are exact; one rounding at the end
      for (int k = 0; k < 16; ++k) s += static_cast<double>(A[i][k]) * B[k][j];
      D[i][j] = static_cast<float>(s);
    }
  for (int lane = 0; lane < kWarp; ++lane) {
    Thread& L = lanes[lane];
    const int g = lane >> 2, q = lane & 3;
    L.c[0] = D[g][2 * q];
    L.c[1] = D[g][2 * q + 1];
    L.c[2] = D[g + 8][2 * q];
    L.c[3] = D[g + 8][2 * q + 1];
  }
}

// ldmatrix .x4: lanes 8j..8j+7 give the rows of 8x8 matrix j (16-byte aligned); register j of
// lane l receives row l/4, columns 2(l%4) and 2(l%4)+1 of matrix j, or with .trans rows
// 2(l%4) and 2(l%4)+1 of column l/4 (PTX ISA, "Warp-level matrix load instruction: ldmatrix").
void complete_ldmatrix(Thread* lanes, bool trans, const std::string& where) {
  uint16_t m[4][8][8];
  for (int j = 0; j < 4; ++j)
    for (int i = 0; i < 8; ++i) {
      const uint16_t* row = lanes[8 * j + i].row;
      if (reinterpret_cast<uintptr_t>(row) % 16) fail(where + "an ldmatrix row address is not 16-byte aligned");
      std::memcpy(m[j][i], row, 16);
    }
  for (int lane = 0; lane < kWarp; ++lane) {
    const int g = lane >> 2, q = lane & 3;
    for (int j = 0; j < 4; ++j) {
      const uint16_t lo = trans ? m[j][2 * q][g] : m[j][g][2 * q];
      const uint16_t hi = trans ? m[j][2 * q + 1][g] : m[j][g][2 * q + 1];
      lanes[lane].a[j] = static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
    }
  }
}

// The wgmma.mma_async fragments (PTX ISA, "Register Fragments" and "Shared Memory Matrix Layout"
// of the asynchronous warpgroup-level matrix instructions), for thread i = 32 w + 4 g + q of
// the warpgroup: A 64x16 in registers, warp w holding rows 16w.. as an mma.m16n8k16 A fragment;
// D 64xN, d[4j..4j+3] = (16w+g, 8j+2q), (16w+g, 8j+2q+1), (16w+g+8, 8j+2q), (16w+g+8, 8j+2q+1).
// B 16xN in shared memory, no swizzle: 8x8 core matrices of 16 bytes a row, element (k, n) at
//   K-major  (trans_b 0): start + (n%8)*16 + (n/8)*SBO + (k%8)*2  + (k/8)*LBO
//   MN-major (trans_b 1): start + (n%8)*2  + (n/8)*SBO + (k%8)*16 + (k/8)*LBO
// with start, LBO and SBO the descriptor's bits 0-13, 16-29 and 32-45, each times 16 bytes.
// Also raised: a descriptor with the swizzle bits set, and accumulators changed between the issue
// and the wait (undefined on the hardware).
void run_wgmma(const WgMma& op) {
  const WgArgs& sh = op.shape;
  if (sh.desc >> 62) fail("wgmma: only the no-swizzle shared-memory layout is emulated");
  // The emulated shared memory holds every kernel's arrays, past a GPU's 18-bit window: the
  // descriptor carries address bits 18-19 in its (otherwise zero) bits 14-15 (wgmma_desc).
  const size_t start = (sh.desc & 0xffffu) << 4, lbo = ((sh.desc >> 16) & 0x3fffu) << 4,
               sbo = ((sh.desc >> 32) & 0x3fffu) << 4;
  const int N = sh.n;
  for (int i = 0; i < kGroup && !op.chained; ++i)
    if (std::memcmp(&op.d_at_issue[static_cast<size_t>(i * N / 2)], op.d[i], sizeof(float) * (N / 2)))
      fail("wgmma accumulators written by other instructions while the wgmma was in flight");
  std::vector<float> B(static_cast<size_t>(16 * N));
  for (int k = 0; k < 16; ++k)
    for (int n = 0; n < N; ++n) {
      const size_t off = sh.trans_b ? start + (n % 8) * 2 + (n / 8) * sbo + (k % 8) * 16 + (k / 8) * lbo
                                    : start + (n % 8) * 16 + (n / 8) * sbo + (k % 8) * 2 + (k / 8) * lbo;
      if (off + 2 > shared_bytes()) fail("wgmma: the B descriptor reaches past shared memory");
      if (g_unfenced[off] || g_unfenced[off + 1])
        fail("wgmma reads shared memory written by cp.async without a fence.proxy.async by the writing thread");
      uint16_t h;
      std::memcpy(&h, __start_simt_shared + off, 2);
      B[static_cast<size_t>(k * N + n)] = half_bits_to_float(h, sh.bf16);
    }
  float A[64][16];
  for (int i = 0; i < kGroup; ++i) {
    const int w = i / kWarp, g = (i % kWarp) >> 2, q = i & 3;
    const int arow[4] = {g, g + 8, g, g + 8}, acol[4] = {2 * q, 2 * q, 2 * q + 8, 2 * q + 8};
    for (int r = 0; r < 4; ++r) {
      A[16 * w + arow[r]][acol[r]] = half_bits_to_float(static_cast<uint16_t>(op.a[i][r] & 0xffffu), sh.bf16);
      A[16 * w + arow[r]][acol[r] + 1] = half_bits_to_float(static_cast<uint16_t>(op.a[i][r] >> 16), sh.bf16);
    }
  }
  for (int i = 0; i < kGroup; ++i) {
    const int w = i / kWarp, g = (i % kWarp) >> 2, q = i & 3;
    for (int j = 0; j < N / 8; ++j)
      for (int e = 0; e < 4; ++e) {
        const int row = 16 * w + g + (e >> 1) * 8, col = 8 * j + 2 * q + (e & 1);
        float& d = op.d[i][4 * j + e];
        double s = sh.scale_d ? d : 0.0;  // products of 16-bit values are exact; one rounding at the end
        for (int k = 0; k < 16; ++k) s += static_cast<double>(A[row][k]) * B[static_cast<size_t>(k * N + col)];
        d = static_cast<float>(s);
      }
  }
}

enum WgOp : int { kWgMma = 1, kWgCommit = 2, kWgWait = 3 };

// Whether the `size` threads at `th` all wait at `at` or have exited, at least one waiting
// (others still running or at a block barrier: false); `done` counts the exited ones.
bool all_arrived(const Thread* th, int size, State at, int& done) {
  int waiting = 0;
  done = 0;
  for (int i = 0; i < size; ++i) {
    waiting += th[i].state == at;
    done += th[i].state == kDone;
  }
  return waiting > 0 && waiting + done == size;
}

// Completes warpgroup `wg`'s pending operation if all its threads have reached it.
bool try_complete_group(Block& blk, int wg) {
  const int first = wg * kGroup, size = std::min(kGroup, blk.n - first);
  Thread* th = &blk.t[first];
  int done = 0;
  if (!all_arrived(th, size, kAtGroup, done)) return false;
  std::ostringstream where;
  where << "warpgroup " << wg << ": ";
  if (done) fail(where.str() + std::to_string(done) + " threads exited while the others wait at a wgmma operation");
  if (size != kGroup) fail(where.str() + "a wgmma operation in a block whose size is not a multiple of 128");
  const int op = th[0].op;
  for (int i = 0; i < kGroup; ++i)
    if (th[i].op != op) fail(where.str() + "threads wait at different wgmma operations (divergent code)");
  if (op == kWgMma) {
    WgMma m;
    m.shape = th[0].wg;
    for (int i = 0; i < kGroup; ++i) {
      const WgArgs& x = th[i].wg;
      const WgArgs& s = m.shape;
      if (!th[i].wg_fenced) fail(where.str() + "wgmma.mma_async without a wgmma.fence since the last wgmma.wait_group");
      if (x.desc != s.desc || x.n != s.n || x.bf16 != s.bf16 || x.scale_d != s.scale_d || x.trans_b != s.trans_b)
        fail(where.str() + "the threads of a wgmma.mma_async disagree on its descriptor, shape or flags");
      m.d[i] = x.d;
      std::memcpy(m.a[i], x.a, sizeof(m.a[i]));
    }
    for (const WgMma& q : blk.wg_open[wg]) m.chained |= q.d[0] == m.d[0];
    for (const auto& group : blk.wg_groups[wg])
      for (const WgMma& q : group) m.chained |= q.d[0] == m.d[0];
    m.d_at_issue.resize(static_cast<size_t>(kGroup * m.shape.n / 2));
    for (int i = 0; i < kGroup; ++i)
      std::memcpy(&m.d_at_issue[static_cast<size_t>(i * m.shape.n / 2)], m.d[i], sizeof(float) * (m.shape.n / 2));
    blk.wg_open[wg].push_back(m);
  } else if (op == kWgCommit) {
    blk.wg_groups[wg].push_back(std::move(blk.wg_open[wg]));
    blk.wg_open[wg].clear();
  } else {
    if (!blk.wg_open[wg].empty()) fail(where.str() + "wgmma.wait_group with wgmma.mma_async not committed");
    auto& groups = blk.wg_groups[wg];
    while (static_cast<int>(groups.size()) > th[0].wg_pending) {
      for (const WgMma& m : groups.front()) run_wgmma(m);
      groups.erase(groups.begin());
    }
    for (int i = 0; i < kGroup; ++i) th[i].wg_fenced = false;
  }
  for (int i = 0; i < kGroup; ++i) th[i].state = kReady;
  return true;
}

// Completes warp `w`'s pending operation if all its lanes have reached it; false if they have not.
bool try_complete_warp(Block& blk, int w) {
  const int first = w * kWarp, size = std::min(kWarp, blk.n - first);
  Thread* lanes = &blk.t[first];
  int done = 0;
  if (!all_arrived(lanes, size, kAtWarp, done)) return false;
  std::ostringstream where;
  where << "warp " << w << ": ";
  if (done) fail(where.str() + std::to_string(done) + " lanes exited while the others wait at a full-mask warp operation");
  if (size != kWarp) fail(where.str() + "a warp operation in a block whose size is not a multiple of 32");
  const int op = lanes[0].op;
  for (int i = 0; i < kWarp; ++i) {
    if (lanes[i].op != op) fail(where.str() + "lanes wait at different warp operations (divergent code)");
    if (lanes[i].mask != 0xffffffffu) fail(where.str() + "only full-warp masks are emulated");
  }
  if (op == kShfl || op == kShflXor) {
    uint64_t in[kWarp];
    for (int i = 0; i < kWarp; ++i) in[i] = lanes[i].bits;
    for (int i = 0; i < kWarp; ++i) {
      const int width = lanes[i].width;
      if (width <= 0 || width > kWarp || (width & (width - 1))) fail(where.str() + "shuffle width must be a power of 2 <= 32");
      const int base = i & ~(width - 1);
      int src = op == kShflXor ? (i ^ lanes[i].lane_arg) : base + (lanes[i].lane_arg & (width - 1));
      if (op == kShflXor && (src & ~(width - 1)) != base) src = i;  // outside the segment: own value
      lanes[i].bits = in[src & (kWarp - 1)];
    }
  } else if (op == kBallot) {
    uint64_t votes = 0;
    for (int i = 0; i < kWarp; ++i) votes |= static_cast<uint64_t>(lanes[i].bits != 0) << i;
    for (int i = 0; i < kWarp; ++i) lanes[i].bits = votes;
  } else if (op == kLdsm || op == kLdsmTrans) {
    complete_ldmatrix(lanes, op == kLdsmTrans, where.str());
  } else {
    complete_mma(lanes, op == kMmaBf16);
  }
  for (int i = 0; i < kWarp; ++i) lanes[i].state = kReady;
  return true;
}

bool try_complete_block(Block& blk) {
  int live = 0, at = 0;
  for (const Thread& th : blk.t) {
    live += th.state != kDone;
    at += th.state == kAtBlock;
  }
  if (at == 0 || at != live) return false;
  int all = 1, any = 0, kind = -1;
  for (const Thread& th : blk.t)
    if (th.state == kAtBlock) {
      if (kind >= 0 && th.kind != kind) fail("threads wait at different kinds of block barrier");
      kind = th.kind;
      all &= th.pred;
      any |= th.pred;
    }
  for (Thread& th : blk.t)
    if (th.state == kAtBlock) {
      th.result = th.kind == kAnd ? all : th.kind == kOr ? any : 0;
      th.state = kReady;
    }
  return true;
}

[[noreturn]] void deadlock(const Block& blk) {
  std::ostringstream msg;
  msg << "no thread can proceed (a GPU would hang):";
  int shown = 0;
  for (int i = 0; i < blk.n && shown < 8; ++i) {
    const int w = i / kWarp;
    if (i % kWarp == 0 || blk.t[i].state != blk.t[i - 1].state) {
      msg << " thread " << i << " (warp " << w << ") " << state_name(blk.t[i].state) << ";";
      ++shown;
    }
  }
  fail(msg.str());
}

uint32_t seed_from_env() {
  const char* s = std::getenv("WORLDVLA_SIMT_SEED");
  return s ? static_cast<uint32_t>(std::strtoul(s, nullptr, 10)) : 12345u;
}

}  // namespace

void run_grid(dim3 grid, dim3 block, const std::function<void()>& body, size_t dynamic_bytes) {
  if (g_block) throw std::runtime_error("simt: a kernel launched from inside a kernel");
  if (dynamic_bytes > kDynamicCapacity)
    throw std::runtime_error("simt: " + std::to_string(dynamic_bytes) + " bytes of dynamic shared memory; the emulator has " +
                             std::to_string(kDynamicCapacity));
  g_dynamic_bytes = dynamic_bytes;
  const int n = static_cast<int>(block.x * block.y * block.z);
  if (n <= 0 || n > 1024) throw std::runtime_error("simt: block size must be 1..1024 threads");
  Block blk;
  blk.n = n;
  blk.body = &body;
  blk.ctx.resize(n);
  for (int i = 0; i < n; ++i) blk.stacks.emplace_back(new char[kStackBytes]);
  std::mt19937 rng(seed_from_env());
  std::vector<int> order(n), warps((n + kWarp - 1) / kWarp);
  for (size_t w = 0; w < warps.size(); ++w) warps[w] = static_cast<int>(w);
  grid_dim = grid;
  block_dim = block;
  g_block = &blk;
  try {
    for (unsigned bz = 0; bz < grid.z; ++bz)
      for (unsigned by = 0; by < grid.y; ++by)
        for (unsigned bx = 0; bx < grid.x; ++bx) {
          block_idx = make_uint3(bx, by, bz);
          poison_shared_memory();
          blk.t.assign(n, Thread());
          blk.wg_open.assign((n + kGroup - 1) / kGroup, {});
          blk.wg_groups.assign((n + kGroup - 1) / kGroup, {});
          for (int i = 0; i < n; ++i) {
            getcontext(&blk.ctx[i]);
            blk.ctx[i].uc_stack.ss_sp = blk.stacks[i].get();
            blk.ctx[i].uc_stack.ss_size = kStackBytes;
            blk.ctx[i].uc_link = &blk.sched;
            makecontext(&blk.ctx[i], fiber_main, 0);
            order[i] = i;
          }
          // Warps in a random order, each run as far as it goes (through its warp operations, up to
          // a block barrier or its end) before the next starts: between block barriers one warp
          // runs far ahead of the others, as it may on a GPU.
          for (;;) {
            std::shuffle(warps.begin(), warps.end(), rng);
            for (const int w : warps) {
              do {
                const int first = w * kWarp, last = std::min(n, first + kWarp);
                std::shuffle(order.begin() + first, order.begin() + last, rng);
                for (int k = first; k < last; ++k) {
                  const int i = order[k];
                  if (blk.t[i].state != kReady) continue;
                  blk.cur = i;
                  thread_idx = make_uint3(i % block.x, (i / block.x) % block.y, i / (block.x * block.y));
                  swapcontext(&blk.sched, &blk.ctx[i]);
                  if (!blk.error.empty()) fail(blk.error);
                }
              } while (try_complete_warp(blk, w));
            }
            bool all_done = true, group_done = false;
            for (const Thread& th : blk.t) all_done &= th.state == kDone;
            if (all_done) {
              for (size_t wg = 0; wg < blk.wg_groups.size(); ++wg)
                if (!blk.wg_groups[wg].empty() || !blk.wg_open[wg].empty())
                  fail("the block ended with wgmma operations not waited for");
              break;
            }
            for (size_t wg = 0; wg < blk.wg_groups.size(); ++wg) group_done |= try_complete_group(blk, static_cast<int>(wg));
            if (!group_done && !try_complete_block(blk)) deadlock(blk);
          }
        }
  } catch (...) {
    g_block = nullptr;
    throw;
  }
  g_block = nullptr;
}

int block_barrier(BarrierKind kind, int pred) {
  if (!g_block) throw std::runtime_error("simt: __syncthreads outside a kernel");
  Thread& th = g_block->t[g_block->cur];
  th.kind = kind;
  th.pred = pred;
  th.state = kAtBlock;
  yield();
  return g_block->t[g_block->cur].result;
}

uint64_t warp_shuffle(uint32_t mask, uint64_t bits, int lane_arg, bool is_xor, int width) {
  Thread& th = g_block->t[g_block->cur];
  th.op = is_xor ? kShflXor : kShfl;
  th.mask = mask;
  th.bits = bits;
  th.lane_arg = lane_arg;
  th.width = width;
  th.state = kAtWarp;
  yield();
  return g_block->t[g_block->cur].bits;
}

uint32_t warp_ballot(uint32_t mask, int pred) {
  Thread& th = g_block->t[g_block->cur];
  th.op = kBallot;
  th.mask = mask;
  th.bits = pred != 0;
  th.state = kAtWarp;
  yield();
  return static_cast<uint32_t>(g_block->t[g_block->cur].bits);
}

void warp_mma_16816(bool bf16, float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  Thread& th = g_block->t[g_block->cur];
  th.op = bf16 ? kMmaBf16 : kMmaF16;
  th.mask = 0xffffffffu;
  for (int i = 0; i < 4; ++i) {
    th.a[i] = a[i];
    th.c[i] = d[i];
  }
  th.b[0] = b0;
  th.b[1] = b1;
  th.state = kAtWarp;
  yield();
  const Thread& done = g_block->t[g_block->cur];
  for (int i = 0; i < 4; ++i) d[i] = done.c[i];
}

void cp_async(void* dst, const void* src, int bytes, int src_bytes) {
  if (reinterpret_cast<uintptr_t>(dst) % bytes || (src_bytes && reinterpret_cast<uintptr_t>(src) % bytes))
    fail_in_fiber("a cp.async address is not aligned to the copy size");
  g_block->t[g_block->cur].open_group.push_back({dst, src, bytes, src_bytes});
}

void cp_async_commit() {
  Thread& th = g_block->t[g_block->cur];
  th.groups.push_back(std::move(th.open_group));
  th.open_group.clear();
}

void cp_async_wait(int pending_groups) {
  Thread& th = g_block->t[g_block->cur];
  while (static_cast<int>(th.groups.size()) > pending_groups) {
    land(th.groups.front(), &th.unfenced);
    th.groups.erase(th.groups.begin());
  }
}

unsigned char* dynamic_shared() {
  if (!g_dynamic_bytes) fail_in_fiber("dynamic shared memory used by a kernel launched without any");
  return simt_dynamic_shared_region;
}

uint32_t shared_address(const void* p) {
  if (!in_shared(p, 1)) fail_in_fiber("a shared-memory address of an object outside __shared__ memory");
  const size_t off = static_cast<size_t>(static_cast<const char*>(p) - __start_simt_shared);
  if (off >= (1u << 20)) fail_in_fiber("emulated shared memory past 1 MB (the descriptors' 20 address bits)");
  return static_cast<uint32_t>(off);
}

void fence_proxy_async() {
  Thread& th = g_block->t[g_block->cur];
  for (const auto& r : th.unfenced)
    std::memset(&g_unfenced[static_cast<size_t>(r.first - __start_simt_shared)], 0, static_cast<size_t>(r.second));
  th.unfenced.clear();
}

void wgmma_fence() { g_block->t[g_block->cur].wg_fenced = true; }

void wgmma_mma_rs(bool bf16, int n, float* d, const uint32_t (&a)[4], uint64_t desc_b, bool scale_d, bool trans_b) {
  Thread& th = g_block->t[g_block->cur];
  th.op = kWgMma;
  th.wg.bf16 = bf16;
  th.wg.n = n;
  th.wg.desc = desc_b;
  th.wg.scale_d = scale_d;
  th.wg.trans_b = trans_b;
  th.wg.d = d;
  std::memcpy(th.wg.a, a, sizeof(th.wg.a));
  th.state = kAtGroup;
  yield();
}

void wgmma_commit() {
  Thread& th = g_block->t[g_block->cur];
  th.op = kWgCommit;
  th.state = kAtGroup;
  yield();
}

void wgmma_wait(int pending_groups) {
  Thread& th = g_block->t[g_block->cur];
  th.op = kWgWait;
  th.wg_pending = pending_groups;
  th.state = kAtGroup;
  yield();
}

void warp_ldmatrix_x4(uint32_t (&r)[4], const void* row, bool trans) {
  Thread& th = g_block->t[g_block->cur];
  th.op = trans ? kLdsmTrans : kLdsm;
  th.mask = 0xffffffffu;
  th.row = static_cast<const uint16_t*>(row);
  th.state = kAtWarp;
  yield();
  const Thread& done = g_block->t[g_block->cur];
  for (int i = 0; i < 4; ++i) r[i] = done.a[i];
}

}  // namespace simt

// The runtime functions the launchers call, for one emulated device 0 whose launches never fail.
// Hidden: the module's calls bind to these even where a CUDA build of PyTorch has loaded the real
// libcudart with RTLD_GLOBAL (its exported cudaGetDevice would otherwise interpose and, without a
// driver, fail).
#define SIMT_RUNTIME __attribute__((visibility("hidden")))
extern "C" {
SIMT_RUNTIME cudaError_t cudaGetLastError(void) { return cudaSuccess; }
SIMT_RUNTIME const char* cudaGetErrorString(cudaError_t) { return "no error"; }
SIMT_RUNTIME cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
SIMT_RUNTIME cudaError_t cudaSetDevice(int device) { return device == 0 ? cudaSuccess : cudaErrorInvalidDevice; }
// The emulated driver runs the runtime the module was built against.
SIMT_RUNTIME cudaError_t cudaDriverGetVersion(int* version) {
  *version = CUDART_VERSION;
  return cudaSuccess;
}
}
