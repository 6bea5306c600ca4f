// Hopper's warpgroup MMA (wgmma, sm_90a): the helpers the prefill attention's sm_90a path uses.
//
// A warpgroup (4 consecutive warps, 128 threads) issues wgmma.mma_async m64nNk16: A (64x16) from
// registers, warp w holding rows 16w.. exactly as an mma.sync m16n8k16 A fragment; B (16xN) read
// by the tensor cores from shared memory through a 64-bit matrix descriptor; D (64xN, fp32) in
// registers, d[j][0..3] = (16w+g, 8j+2q..+1), (16w+g+8, 8j+2q..+1) for lane 4g+q: the layout of
// the mma.sync kernels' accumulator arrays. The operation is asynchronous: wgmma_fence() orders
// earlier register writes (accumulators, A) before it, wgmma_commit() closes a group,
// wgmma_wait<N>() returns once all but the N newest groups are done, and fence_operands() then
// keeps the compiler from reading the accumulators before the wait.
//
// Shared-memory operands here use the no-swizzle layout: 8x8 "core matrices" of 16-bit values,
// 8 rows of 16 bytes stored as 128 contiguous bytes. Element (k, n) of B sits at
//   K-major  (kTransB 0): start + (n%8)*16 + (n/8)*SBO + (k%8)*2  + (k/8)*LBO
//   MN-major (kTransB 1): start + (n%8)*2  + (n/8)*SBO + (k%8)*16 + (k/8)*LBO
// (PTX ISA, "Shared Memory Matrix Layout" and "Matrix Descriptor Format"). Shared memory filled by
// ordinary stores or cp.async needs fence_proxy_async() in each writing thread before the
// barrier that precedes the wgmma.
//
// The SIMT emulator (tests/simt) runs these with the same semantics; without sm_90a (the sm_80
// to sm_89 passes of a multi-architecture build) the helpers trap and the host never launches
// a kernel that uses them.
#pragma once

#include <type_traits>

#include "cuda_common.cuh"

#if defined(WORLDVLA_SIMT) || defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define WORLDVLA_HAS_WGMMA 1
#endif

namespace worldvla {

__device__ __forceinline__ uint32_t shared_address(const void* p) {
#ifdef WORLDVLA_SIMT
  return simt::shared_address(p);
#else
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
#endif
}

// Descriptor of a no-swizzle operand starting at `smem` (16-byte aligned); lbo and sbo in bytes.
__device__ __forceinline__ uint64_t wgmma_desc(const void* smem, uint32_t lbo, uint32_t sbo) {
  const uint32_t addr = shared_address(smem);
  uint64_t desc = static_cast<uint64_t>((addr & 0x3ffffu) >> 4) | (static_cast<uint64_t>((lbo & 0x3ffffu) >> 4) << 16) |
                  (static_cast<uint64_t>((sbo & 0x3ffffu) >> 4) << 32);
#ifdef WORLDVLA_SIMT
  // The emulator's shared memory holds every kernel's arrays (beyond the GPU's 256 KB window):
  // address bits 18-19 ride in the descriptor's unused bits 14-15 there.
  desc |= static_cast<uint64_t>((addr >> 18) & 3u) << 14;
#endif
  return desc;
}

__device__ __forceinline__ void fence_proxy_async() {
#if defined(WORLDVLA_SIMT)
  simt::fence_proxy_async();
#elif defined(WORLDVLA_HAS_WGMMA)
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}

__device__ __forceinline__ void wgmma_fence() {
#if defined(WORLDVLA_SIMT)
  simt::wgmma_fence();
#elif defined(WORLDVLA_HAS_WGMMA)
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}

__device__ __forceinline__ void wgmma_commit() {
#if defined(WORLDVLA_SIMT)
  simt::wgmma_commit();
#elif defined(WORLDVLA_HAS_WGMMA)
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}

template <int N>
__device__ __forceinline__ void wgmma_wait() {
#if defined(WORLDVLA_SIMT)
  simt::wgmma_wait(N);
#elif defined(WORLDVLA_HAS_WGMMA)
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
#endif
}

// An empty asm that "rewrites" every accumulator: reads of them cannot move above it.
template <int NJ>
__device__ __forceinline__ void fence_operands(float (&d)[NJ][4]) {
#ifndef WORLDVLA_SIMT
#pragma unroll
  for (int j = 0; j < NJ; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) asm volatile("" : "+f"(d[j][e])::"memory");
#endif
}

// Operand lists of the inline assembly below (N = 64 and 128: 32 and 64 accumulators).
#define WORLDVLA_WGMMA_D64 "{" \
  "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15," \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
#define WORLDVLA_WGMMA_ARGS64 "{%32, %33, %34, %35}, %36, p, 1, 1, %38;\n}\n"
#define WORLDVLA_WGMMA_PRED64 "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
#define WORLDVLA_WGMMA_OUT64 \
  "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]), \
  "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]), \
  "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]), \
  "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3])

#define WORLDVLA_WGMMA_D128 "{" \
  "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15," \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31," \
  "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47," \
  "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
#define WORLDVLA_WGMMA_ARGS128 "{%64, %65, %66, %67}, %68, p, 1, 1, %70;\n}\n"
#define WORLDVLA_WGMMA_PRED128 "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
#define WORLDVLA_WGMMA_OUT128 \
  "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]), \
  "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]), \
  "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]), \
  "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3]), \
  "+f"(d[8][0]), "+f"(d[8][1]), "+f"(d[8][2]), "+f"(d[8][3]), "+f"(d[9][0]), "+f"(d[9][1]), "+f"(d[9][2]), "+f"(d[9][3]), \
  "+f"(d[10][0]), "+f"(d[10][1]), "+f"(d[10][2]), "+f"(d[10][3]), "+f"(d[11][0]), "+f"(d[11][1]), "+f"(d[11][2]), "+f"(d[11][3]), \
  "+f"(d[12][0]), "+f"(d[12][1]), "+f"(d[12][2]), "+f"(d[12][3]), "+f"(d[13][0]), "+f"(d[13][1]), "+f"(d[13][2]), "+f"(d[13][3]), \
  "+f"(d[14][0]), "+f"(d[14][1]), "+f"(d[14][2]), "+f"(d[14][3]), "+f"(d[15][0]), "+f"(d[15][1]), "+f"(d[15][2]), "+f"(d[15][3])

// D (+)= A * B for a 64xNx16 step: A from registers, B by descriptor (kTransB: MN-major B);
// scale_d false overwrites D.
template <typename T, int N, int kTransB>
__device__ __forceinline__ void wgmma_rs(float (&d)[N / 8][4], const uint32_t (&a)[4], uint64_t desc, bool scale_d) {
  static_assert(N == 64 || N == 128, "wgmma_rs: N is 64 or 128");
  static_assert(std::is_same<T, __nv_bfloat16>::value || std::is_same<T, __half>::value, "bf16 or fp16");
  [[maybe_unused]] constexpr bool kBf16 = std::is_same<T, __nv_bfloat16>::value;
#if defined(WORLDVLA_SIMT)
  simt::wgmma_mma_rs(kBf16, N, &d[0][0], a, desc, scale_d, kTransB != 0);
#elif defined(WORLDVLA_HAS_WGMMA)
  if constexpr (N == 64 && kBf16)
    asm volatile(WORLDVLA_WGMMA_PRED64 "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 " WORLDVLA_WGMMA_D64
                 WORLDVLA_WGMMA_ARGS64
                 : WORLDVLA_WGMMA_OUT64
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(static_cast<int>(scale_d)), "n"(kTransB));
  else if constexpr (N == 64)
    asm volatile(WORLDVLA_WGMMA_PRED64 "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 " WORLDVLA_WGMMA_D64
                 WORLDVLA_WGMMA_ARGS64
                 : WORLDVLA_WGMMA_OUT64
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(static_cast<int>(scale_d)), "n"(kTransB));
  else if constexpr (kBf16)
    asm volatile(WORLDVLA_WGMMA_PRED128 "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 " WORLDVLA_WGMMA_D128
                 WORLDVLA_WGMMA_ARGS128
                 : WORLDVLA_WGMMA_OUT128
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(static_cast<int>(scale_d)), "n"(kTransB));
  else
    asm volatile(WORLDVLA_WGMMA_PRED128 "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 " WORLDVLA_WGMMA_D128
                 WORLDVLA_WGMMA_ARGS128
                 : WORLDVLA_WGMMA_OUT128
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(static_cast<int>(scale_d)), "n"(kTransB));
#else
  (void)d, (void)a, (void)desc, (void)scale_d;
  __trap();
#endif
}

}  // namespace worldvla
