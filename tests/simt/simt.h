// A host emulation of the CUDA execution model, enough to run the kernels of csrc/cuda on a
// CPU: the CUDA tests of tests/test_simt_cuda.py build them with a host compiler against this
// header (csrc/cuda/cuda_common.cuh includes it when WORLDVLA_SIMT is defined).
//
// Every thread of a block is a fiber with its own stack; blocks of a grid run one after
// another. A fiber runs until it reaches a synchronization point:
//   __syncthreads(), __syncthreads_and/or     every live thread of the block
//   __shfl_sync, __shfl_xor_sync, __ballot_sync/__any_sync/__all_sync, mma.sync, ldmatrix
//                                              all 32 lanes of the warp (full mask only)
//   wgmma.mma_async, .commit_group, .wait_group   all 128 threads of the warpgroup
// and the point completes when every participant has arrived. Warps run in a random order,
// each as far as it can before the next starts, and the lanes of a warp in a shuffled order
// (seeded by WORLDVLA_SIMT_SEED, default 12345), so code that reads another thread's
// shared-memory writes without a barrier between them sees stale values. The emulator raises (instead of
// hanging as a GPU would) when a barrier can never complete: lanes of one warp waiting at
// different points, a warp operation with exited lanes, a block barrier some threads skip.
//
// cp.async copies land at the cp.async.wait_group that covers them, the latest moment the
// hardware may complete them, so a read of their destination before the wait (and the barrier
// after it) sees the old contents.
//
// wgmma (sm_90a) runs at the wgmma.wait_group that covers it, reading its shared-memory operand
// through the matrix descriptor then (no-swizzle layouts only) and writing the accumulators of
// all 128 threads. It raises on a wgmma.mma_async with no wgmma.fence since the thread's last
// wait, on accumulators written by other instructions while a wgmma is in flight, on a wait with
// uncommitted operations, on a block that ends with operations pending, and on an operand byte a
// cp.async wrote that its thread has not ordered for the tensor cores with fence.proxy.async.
//
// Not emulated: timing, memory ordering beyond the barriers, bank conflicts, out-of-bounds
// detection (the tests surround inputs with NaN instead), streams.
#pragma once

#include <vector_functions.h>
#include <vector_types.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <type_traits>

// Shared memory: one static copy per kernel instantiation, shared by the fibers of the running
// block. The kernel files' zero-initialized statics are exactly these arrays; build.py moves
// them into one section, "simt_shared", which the scheduler fills with 0xff bytes (NaN as a
// float or a 16-bit float, -1 as an integer) before every block, so that reads of unwritten
// shared memory show. Launches run one at a time (the binding holds the GIL on the CUDA path).
#undef __shared__
#define __shared__ static
#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif

// The CUDA headers declare the runtime API (cudaStream_t, cudaGetLastError, ...); simt.cpp
// defines the few functions the launchers call, for one emulated device 0.

namespace simt {

extern thread_local uint3 thread_idx, block_idx;
extern thread_local dim3 block_dim, grid_dim;

// Runs `body` (one call of the kernel) once per thread of every block of `grid`, with
// `dynamic_bytes` of dynamic shared memory (dynamic_shared()).
void run_grid(dim3 grid, dim3 block, const std::function<void()>& body, size_t dynamic_bytes = 0);
// The running block's dynamic shared memory (extern __shared__ on a GPU): inside the emulated
// shared memory, 128-byte aligned, poisoned like the rest.
unsigned char* dynamic_shared();

enum BarrierKind : int { kSync = 0, kAnd = 1, kOr = 2 };
int block_barrier(BarrierKind kind, int pred);
uint64_t warp_shuffle(uint32_t mask, uint64_t bits, int lane_arg, bool is_xor, int width);
// __ballot_sync: bit i of the result is lane i's predicate.
uint32_t warp_ballot(uint32_t mask, int pred);
// mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}.{bf16,f16}.f32 on the warp's fragments.
void warp_mma_16816(bool bf16, float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);
// ldmatrix.sync.aligned.m8n8.x4{.trans}.shared.b16: `row` is this lane's row address.
void warp_ldmatrix_x4(uint32_t (&r)[4], const void* row, bool trans);
// cp.async: a copy lands only when a wait_group lets it (the latest moment the hardware may
// complete it), so shared memory read before the wait holds what it held before the copy.
void cp_async(void* dst, const void* src, int bytes, int src_bytes);
void cp_async_commit();
void cp_async_wait(int pending_groups);
// The 18-bit shared-window address of a __shared__ object (as __cvta_generic_to_shared), and
// fence.proxy.async.shared::cta (this thread's landed cp.async bytes become readable by wgmma).
uint32_t shared_address(const void* p);
void fence_proxy_async();
// wgmma.fence / .mma_async (A from registers, B by descriptor; f32 accumulators, m64nNk16) /
// .commit_group / .wait_group on this thread's warpgroup.
void wgmma_fence();
void wgmma_mma_rs(bool bf16, int n, float* d, const uint32_t (&a)[4], uint64_t desc_b, bool scale_d, bool trans_b);
void wgmma_commit();
void wgmma_wait(int pending_groups);

template <typename T>
T shuffle(uint32_t mask, T value, int lane_arg, bool is_xor, int width) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "shuffle of a register-sized value");
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  bits = warp_shuffle(mask, bits, lane_arg, is_xor, width);
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}

}  // namespace simt

#define threadIdx ::simt::thread_idx
#define blockIdx ::simt::block_idx
#define blockDim ::simt::block_dim
#define gridDim ::simt::grid_dim

inline void __syncthreads() { simt::block_barrier(simt::kSync, 0); }
inline int __syncthreads_and(int pred) { return simt::block_barrier(simt::kAnd, pred != 0); }
inline int __syncthreads_or(int pred) { return simt::block_barrier(simt::kOr, pred != 0); }

template <typename T>
inline T __shfl_sync(unsigned mask, T value, int src_lane, int width = 32) {
  return simt::shuffle(mask, value, src_lane, false, width);
}
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T value, int lane_mask, int width = 32) {
  return simt::shuffle(mask, value, lane_mask, true, width);
}
inline unsigned __ballot_sync(unsigned mask, int pred) { return simt::warp_ballot(mask, pred); }
inline int __any_sync(unsigned mask, int pred) { return simt::warp_ballot(mask, pred) != 0; }
inline int __all_sync(unsigned mask, int pred) { return simt::warp_ballot(mask, pred) == 0xffffffffu; }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }

// Fibers of one block never run at the same time, so atomics are plain read-modify-writes.
template <typename T>
inline T atomicMin(T* address, T value) {
  const T old = *address;
  *address = value < old ? value : old;
  return old;
}
template <typename T>
inline T atomicMax(T* address, T value) {
  const T old = *address;
  *address = value > old ? value : old;
  return old;
}

inline uint32_t __float_as_uint(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  return u;
}
inline float __uint_as_float(uint32_t u) {
  float x;
  std::memcpy(&x, &u, 4);
  return x;
}
inline float __log2f(float x) { return std::log2(x); }

// Device code calls min/max unqualified on mixed integer types.
template <typename A, typename B>
inline typename std::common_type<A, B>::type min(A a, B b) {
  return b < a ? b : a;
}
template <typename A, typename B>
inline typename std::common_type<A, B>::type max(A a, B b) {
  return a < b ? b : a;
}
