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

// Force-inlined so that each multiversioned caller compiles them for its own target.

// Contiguous dot product; `omp simd` lets the compiler split the sum into
// vector lanes (a reassociation that plain -O3 does not allow itself).
__attribute__((always_inline)) inline float dot_f32(const float* __restrict a, const float* __restrict b, int64_t n) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

// exp(x) for x <= 0 (softmax weights), written so that loops over it vectorize:
// exp(x) = 2^n * e^r with n = round(x / ln 2), |r| <= ln(2) / 2, and e^r from a
// degree-6 polynomial (Cephes' expf coefficients, about 1 ulp). -inf and
// anything below -87 give 0.
__attribute__((always_inline)) inline float exp_nonpos(float x) {
  const bool tiny = !(x > -87.0f);  // also true for -inf and NaN
  x = tiny ? -87.0f : x;
  const float n = __builtin_floorf(x * 1.44269504088896341f + 0.5f);
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  __builtin_memcpy(&scale, &bits, sizeof(scale));
  return tiny ? 0.0f : y * scale;
}

__attribute__((always_inline)) inline void axpy_f32(float* __restrict y, const float* __restrict x, float a, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}

}  // namespace worldvla
