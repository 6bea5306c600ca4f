// Helpers of the C++ CPU paths.
#pragma once

#include <cstdint>

// Hot loops are compiled twice on x86-64, for AVX2+FMA (x86-64-v3) and for the
// baseline, and the loader picks one per machine: wheels stay portable while a
// modern CPU gets 8-wide FMA. Elsewhere the attribute is empty.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(__APPLE__)
#define WORLDVLA_MULTIVERSION __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define WORLDVLA_MULTIVERSION
#endif

namespace worldvla {

// Contiguous dot product; `omp simd` lets the compiler split the sum into
// vector lanes (a reassociation that plain -O3 does not allow itself).
inline float dot_f32(const float* __restrict a, const float* __restrict b, int64_t n) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

inline void axpy_f32(float* __restrict y, const float* __restrict x, float a, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}

}  // namespace worldvla
