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

namespace simt {

thread_local uint3 thread_idx, block_idx;
thread_local dim3 block_dim, grid_dim;

namespace {

constexpr size_t kStackBytes = 128 * 1024;
constexpr int kWarp = 32;

enum State : int { kReady, kAtBlock, kAtWarp, kDone };
enum WarpOp : int { kShfl = 1, kShflXor = 2, kMmaBf16 = 3, kMmaF16 = 4, kLdsm = 5, kLdsmTrans = 6, kBallot = 7 };

const char* state_name(const State s) {
  switch (s) {
    case kReady: return "running";
    case kAtBlock: return "at a block barrier";
    case kAtWarp: return "at a warp operation";
    case kDone: return "exited";
  }
  return "?";
}

struct AsyncCopy {
  void* dst;
  const void* src;
  int bytes, src_bytes;  // src_bytes < bytes: the rest is zero-filled
};

void land(std::vector<AsyncCopy>& copies) {
  for (const AsyncCopy& c : copies) {
    if (c.src_bytes) std::memcpy(c.dst, c.src, static_cast<size_t>(c.src_bytes));
    std::memset(static_cast<char*>(c.dst) + c.src_bytes, 0, static_cast<size_t>(c.bytes - c.src_bytes));
  }
  copies.clear();
}

struct Thread {
  State state = kReady;
  std::vector<AsyncCopy> open_group;                // cp.async copies not committed yet
  std::vector<std::vector<AsyncCopy>> groups;       // committed, oldest first
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
  std::vector<ucontext_t> ctx;
  std::vector<std::unique_ptr<char[]>> stacks;
  ucontext_t sched;
  int cur = -1;
  const std::function<void()>* body = nullptr;
};

thread_local Block* g_block = nullptr;

// Bounds of the shared-memory section (defined by the linker; absent if no kernel has any).
extern "C" char __start_simt_shared[] __attribute__((weak));
extern "C" char __stop_simt_shared[] __attribute__((weak));

void poison_shared_memory() {
  if (__start_simt_shared && __stop_simt_shared > __start_simt_shared)
    std::memset(__start_simt_shared, 0xff, static_cast<size_t>(__stop_simt_shared - __start_simt_shared));
}

void fiber_main() {
  (*g_block->body)();
  Thread& th = g_block->t[g_block->cur];
  for (auto& group : th.groups) land(group);  // copies still in flight land before the block ends
  land(th.open_group);
  th.state = kDone;  // returns to the scheduler through uc_link
}

void yield() { swapcontext(&g_block->ctx[g_block->cur], &g_block->sched); }

[[noreturn]] void fail(const std::string& what) {
  std::ostringstream msg;
  msg << "simt: block (" << block_idx.x << ", " << block_idx.y << ", " << block_idx.z << "): " << what;
  throw std::runtime_error(msg.str());
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

// Completes warp `w`'s pending operation if all its lanes have reached it; false if they have not.
bool try_complete_warp(Block& blk, int w) {
  const int first = w * kWarp, size = std::min(kWarp, blk.n - first);
  Thread* lanes = &blk.t[first];
  int waiting = 0, done = 0;
  for (int i = 0; i < size; ++i) {
    waiting += lanes[i].state == kAtWarp;
    done += lanes[i].state == kDone;
  }
  if (waiting == 0 || waiting + done < size) return false;  // others still running or at a block barrier
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

void run_grid(dim3 grid, dim3 block, const std::function<void()>& body) {
  if (g_block) throw std::runtime_error("simt: a kernel launched from inside a kernel");
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
                }
              } while (try_complete_warp(blk, w));
            }
            bool all_done = true;
            for (const Thread& th : blk.t) all_done &= th.state == kDone;
            if (all_done) break;
            if (!try_complete_block(blk)) deadlock(blk);
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
    fail("a cp.async address is not aligned to the copy size");
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
    land(th.groups.front());
    th.groups.erase(th.groups.begin());
  }
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
extern "C" {
cudaError_t cudaGetLastError(void) { return cudaSuccess; }
const char* cudaGetErrorString(cudaError_t) { return "no error"; }
cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
cudaError_t cudaSetDevice(int device) { return device == 0 ? cudaSuccess : cudaErrorInvalidDevice; }
}
