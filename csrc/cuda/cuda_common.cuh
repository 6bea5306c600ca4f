// Small device helpers shared by the CUDA kernels: element conversion, packed
// 16-bit pairs, the m16n8k16 tensor-core MMA, warp reductions, launches.
//
// With WORLDVLA_SIMT defined the kernels compile with a host compiler against the
// CUDA execution-model emulator of tests/simt (the CPU tests of the CUDA kernels);
// only the inline-assembly helpers (mma, ldmatrix, cp.async, ex2; wgmma in wgmma.cuh), the launch
// helpers and the dynamic shared-memory declaration differ.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#ifdef WORLDVLA_SIMT
#include "simt.h"
#else
#include <cuda_runtime.h>
#endif

#include <atomic>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <utility>

#include "common.h"

namespace worldvla {

// kernel<<<grid, block, 0, stream>>>(args...)
template <typename... Params, typename... Args>
inline void launch(void (*kernel)(Params...), dim3 grid, dim3 block, cudaStream_t stream, Args&&... args) {
#ifdef WORLDVLA_SIMT
  (void)stream;
  simt::run_grid(grid, block, [&] { kernel(args...); });
#else
  kernel<<<grid, block, 0, stream>>>(std::forward<Args>(args)...);
#endif
}

// Lets `Kernel` use `bytes` of dynamic shared memory on the current device (above 48 KB a kernel
// must opt in). Once per device and kernel, so that after the first launch (a warm-up before any
// CUDA-graph capture) launches make no runtime calls besides the launch itself.
template <auto Kernel>
inline void allow_dynamic_shared(size_t bytes) {
#ifdef WORLDVLA_SIMT
  (void)bytes;
#else
  static std::atomic<uint64_t> done{0};  // bit d: device d
  int dev = 0;
  if (bytes <= 48 * 1024 || cudaGetDevice(&dev) != cudaSuccess) return;
  const uint64_t bit = dev < 64 ? uint64_t{1} << dev : 0;
  if (bit && (done.load(std::memory_order_relaxed) & bit)) return;
  const cudaError_t err =
      cudaFuncSetAttribute(Kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("worldvla CUDA kernel needs ") + std::to_string(bytes) +
                             " bytes of shared memory: " + cudaGetErrorString(err));
  done.fetch_or(bit);
#endif
}

// kernel<<<grid, block, dynamic_bytes, stream>>>(args...), for kernels that declare their shared
// memory with WORLDVLA_DYNAMIC_SHARED (above 48 KB, after allow_dynamic_shared).
template <typename... Params, typename... Args>
inline void launch_dynamic(void (*kernel)(Params...), dim3 grid, dim3 block, size_t dynamic_bytes,
                           cudaStream_t stream, Args&&... args) {
#ifdef WORLDVLA_SIMT
  (void)stream;
  simt::run_grid(grid, block, [&] { kernel(args...); }, dynamic_bytes);
#else
  kernel<<<grid, block, dynamic_bytes, stream>>>(std::forward<Args>(args)...);
#endif
}

// A kernel's dynamic shared memory (extern __shared__ on a GPU; the emulator's region under SIMT).
#ifdef WORLDVLA_SIMT
#define WORLDVLA_DYNAMIC_SHARED(name) unsigned char* const name = ::simt::dynamic_shared()
#else
#define WORLDVLA_DYNAMIC_SHARED(name) extern __shared__ __align__(128) unsigned char name[]
#endif

inline void check_launch(const char* what) {
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("worldvla CUDA kernel ") + what + " failed to launch: " +
                             cudaGetErrorString(err));
}

// A host-side size for a kernel that indexes with 32-bit ints; larger calls must be split by the caller.
inline int int32_size(int64_t value, const char* op, const char* what) {
  if (value < 0 || value > INT32_MAX)
    throw std::invalid_argument(std::string(op) + " (CUDA): " + what + " = " + std::to_string(value) +
                                " is outside the kernel's 32-bit range [0, 2^31 - 1]; split the call");
  return static_cast<int>(value);
}

template <typename T>
__device__ __forceinline__ float to_float(T x);
template <>
__device__ __forceinline__ float to_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ float to_float<__half>(__half x) { return __half2float(x); }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// Two floats -> one 32-bit register of two 16-bit values, the first in the low half
// (the lower column index of an MMA fragment pair).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

template <typename T>
__device__ __forceinline__ float2 unpack2(uint32_t u);
template <>
__device__ __forceinline__ float2 unpack2<__nv_bfloat16>(uint32_t u) {
  // bf16 -> fp32 is exact: the bf16 bits are the top half of the fp32 bits.
  return make_float2(__uint_as_float(u << 16), __uint_as_float(u & 0xffff0000u));
}
template <>
__device__ __forceinline__ float2 unpack2<__half>(uint32_t u) {
  __half2 h = *reinterpret_cast<__half2*>(&u);
  return __half22float2(h);
}

// D = A * B + C for a 16x8x16 tile; A row-major 16x16 (4 regs), B "col" 16x8 (2 regs),
// C/D 16x8 fp32 (4 regs). Fragment layouts (lane = 4 * g + t):
//   A: a0 = (g, 2t..2t+1)  a1 = (g+8, 2t..)  a2 = (g, 2t+8..)  a3 = (g+8, 2t+8..)
//   B: b0 = (k = 2t..2t+1, n = g)  b1 = (k = 2t+8.., n = g)
//   C: c0,c1 = (g, 2t..2t+1)  c2,c3 = (g+8, 2t..2t+1)
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);
template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                                         uint32_t b1) {
#ifdef WORLDVLA_SIMT
  simt::warp_mma_16816(true, d, a, b0, b1);
#else
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}
template <>
__device__ __forceinline__ void mma_16816<__half>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                                  uint32_t b1) {
#ifdef WORLDVLA_SIMT
  simt::warp_mma_16816(false, d, a, b0, b1);
#else
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

// Four 8x8 matrices of 16-bit values from shared memory (ldmatrix .x4): lanes 8j..8j+7 pass
// the addresses of matrix j's rows (16-byte aligned); register j of lane 4g+q receives row g,
// columns 2q..2q+1 of matrix j, or with `trans` rows 2q..2q+1 of column g: exactly an mma
// A-fragment register (plain) or B-fragment register of a row-major [k][n] tile (trans).
template <bool kTrans>
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
#ifdef WORLDVLA_SIMT
  simt::warp_ldmatrix_x4(r, row, kTrans);
#else
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(row));
  if (kTrans)
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
  else
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
#endif
}

// 16 bytes global -> shared without passing through registers (cp.async.cg, sm_80+); with
// `valid` false the 16 bytes are zero-filled and `gmem` is not read. Copies are grouped by
// cp_async_commit(); cp_async_wait<N>() returns once all but the N newest groups of this
// thread have landed (a barrier then makes them visible to the other threads).
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool valid) {
#ifdef WORLDVLA_SIMT
  simt::cp_async(smem, gmem, 16, valid ? 16 : 0);
#else
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(addr), "l"(gmem), "r"(valid ? 16 : 0));
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#ifdef WORLDVLA_SIMT
  simt::cp_async_commit();
#else
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#ifdef WORLDVLA_SIMT
  simt::cp_async_wait(N);
#else
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");  // shared memory changed under us
#endif
}

__device__ __forceinline__ float fast_exp2(float x) {
#ifdef WORLDVLA_SIMT
  return exp2f(x);
#else
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#endif
}

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

constexpr float kLog2e = 1.4426950408889634f;

}  // namespace worldvla
