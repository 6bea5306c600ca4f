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

// v8f values passed between force-inlined helpers: the by-value vector ABI note does not apply.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

namespace worldvla {

// Everything below is force-inlined into the multiversioned callers, so each clone gets
// its own code: 8 floats live in one ymm register in the x86-64-v3 clone, in a pair of
// xmm registers in the baseline one.
#define WORLDVLA_INLINE inline __attribute__((always_inline))
typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));

WORLDVLA_INLINE v8f load8(const float* p) {
  v8f v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}
WORLDVLA_INLINE void store8(float* p, const v8f& v) { __builtin_memcpy(p, &v, sizeof(v)); }
WORLDVLA_INLINE v8f splat8(float x) { return v8f{x, x, x, x, x, x, x, x}; }

// Pairwise sums within 128-bit halves, as vhaddps: {a0+a1, a2+a3, b0+b1, b2+b3, a4+a5, a6+a7, b4+b5, b6+b7}.
WORLDVLA_INLINE v8f hadd8(const v8f& a, const v8f& b) {
  const v8i even = {0, 2, 8, 10, 4, 6, 12, 14}, odd = {1, 3, 9, 11, 5, 7, 13, 15};
  return __builtin_shuffle(a, b, even) + __builtin_shuffle(a, b, odd);
}

// {sum(a[0]), ..., sum(a[7])}: eight horizontal sums for the price of about two.
WORLDVLA_INLINE v8f sum8x8(const v8f* a) {
  const v8f u0 = hadd8(hadd8(a[0], a[1]), hadd8(a[2], a[3]));  // {s0 s1 s2 s3 | s0' s1' s2' s3'} (halves)
  const v8f u1 = hadd8(hadd8(a[4], a[5]), hadd8(a[6], a[7]));
  const v8i lo = {0, 1, 2, 3, 8, 9, 10, 11}, hi = {4, 5, 6, 7, 12, 13, 14, 15};
  return __builtin_shuffle(u0, u1, lo) + __builtin_shuffle(u0, u1, hi);
}

WORLDVLA_INLINE float hsum8(const v8f& a) {
  float s = 0.f;
  for (int i = 0; i < 8; ++i) s += a[i];
  return s;
}

// Contiguous dot product with four independent vector accumulators, so that the FMA
// latency is hidden (one accumulator would wait on itself at every step).
WORLDVLA_INLINE float dot_f32(const float* __restrict a, const float* __restrict b, int64_t n) {
  v8f s0 = {}, s1 = {}, s2 = {}, s3 = {};
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    s0 += load8(a + i) * load8(b + i);
    s1 += load8(a + i + 8) * load8(b + i + 8);
    s2 += load8(a + i + 16) * load8(b + i + 16);
    s3 += load8(a + i + 24) * load8(b + i + 24);
  }
  for (; i + 8 <= n; i += 8) s0 += load8(a + i) * load8(b + i);
  float s = hsum8((s0 + s1) + (s2 + s3));
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// Dot products of 4 rows x[i] with 2 rows wa, wb (length n): lane 2 * i + j of the result is
// x[i] . (j ? wb : wa). Eight vector accumulators; each 8-float step loads 6 vectors for 8 FMAs
// (a plain dot loads 2 for 1), and one transposing reduction gives the eight sums.
WORLDVLA_INLINE v8f dot_4x2(const float* const* x, const float* wa, const float* wb, int64_t n) {
  const int64_t n8 = n / 8 * 8;
  v8f a[8] = {};
  for (int64_t d = 0; d < n8; d += 8) {
    const v8f ya = load8(wa + d), yb = load8(wb + d);
    for (int i = 0; i < 4; ++i) {
      const v8f xi = load8(x[i] + d);
      a[2 * i] += xi * ya;
      a[2 * i + 1] += xi * yb;
    }
  }
  v8f sums = sum8x8(a);
  for (int64_t d = n8; d < n; ++d)
    for (int i = 0; i < 4; ++i) {
      sums[2 * i] += x[i][d] * wa[d];
      sums[2 * i + 1] += x[i][d] * wb[d];
    }
  return sums;
}

// exp(x) on eight lanes for x <= 0 (softmax weights): exp(x) = 2^n * e^r with n = round(x / ln 2)
// (the 1.5 * 2^23 rounding trick: no vector floor in the baseline instruction set), |r| <= ln(2) / 2,
// and e^r from a degree-6 polynomial (Cephes' expf coefficients, about 1 ulp). -inf and anything
// below -87 give 0. Written on vectors because GCC leaves a scalar version of this loop scalar.
WORLDVLA_INLINE v8f exp8_nonpos(const v8f& x_in) {
  const v8i keep = x_in > splat8(-87.0f);  // false for -inf and NaN
  const v8f x = keep ? x_in : splat8(-87.0f);
  const v8f magic = splat8(12582912.0f);
  const v8f n = (x * splat8(1.44269504088896341f) + magic) - magic;
  v8f r = x - n * splat8(0.693359375f);
  r = r - n * splat8(-2.12194440e-4f);
  v8f y = splat8(1.9875691500e-4f);
  y = y * r + splat8(1.3981999507e-3f);
  y = y * r + splat8(8.3334519073e-3f);
  y = y * r + splat8(4.1665795894e-2f);
  y = y * r + splat8(1.6666665459e-1f);
  y = y * r + splat8(5.0000001201e-1f);
  y = y * r * r + r + splat8(1.0f);
  const v8i bits = (__builtin_convertvector(n, v8i) + 127) << 23;
  v8f scale;
  __builtin_memcpy(&scale, &bits, sizeof(scale));
  return keep ? y * scale : splat8(0.0f);
}

}  // namespace worldvla
