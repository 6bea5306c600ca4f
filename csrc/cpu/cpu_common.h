// Helpers of the C++ CPU paths.
#pragma once

#include <cstdint>
#include <limits>

// Hot loops are compiled twice on x86-64, for AVX2+FMA (x86-64-v3) and for the
// baseline, and the loader picks one per machine: wheels stay portable while a
// modern CPU gets 8-wide FMA. Elsewhere the attribute is empty.
//
// The kernels are templates on the vector width W (floats per vector). W = 8 goes through those
// clones; on AVX-512 machines (x86-64-v4) a W = 16 instantiation compiled for it runs instead:
// the same register blocks, each vector a zmm register of 16 floats. The choice is made once per
// process (`cpu_vector_width`); tests and benchmarks can force W = 8 to compare.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(__APPLE__)
#define WORLDVLA_MULTIVERSION __attribute__((target_clones("arch=x86-64-v3", "default")))
#define WORLDVLA_AVX512 __attribute__((target("arch=x86-64-v4")))
#define WORLDVLA_AVX2 __attribute__((target("arch=x86-64-v3")))
#define WORLDVLA_WITH_AVX512 1
#else
#define WORLDVLA_MULTIVERSION
#define WORLDVLA_AVX512
#define WORLDVLA_AVX2
#define WORLDVLA_WITH_AVX512 0
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
WORLDVLA_INLINE v8f splat8(float x) { return v8f{} + x; }  // a broadcast: see splatv

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

// Width-generic vectors for the templated kernels: vec<8> is v8f, vec<16> one zmm register.
template <int W>
struct VecOf {
  typedef float type __attribute__((vector_size(4 * W)));
};
template <int W>
using vec = typename VecOf<W>::type;

template <int W>
WORLDVLA_INLINE vec<W> loadv(const float* p) {
  vec<W> v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}
template <int W>
WORLDVLA_INLINE void storev(float* p, const vec<W>& v) { __builtin_memcpy(p, &v, sizeof(v)); }
// A broadcast. Written as 0 + x (which only turns -0 into +0): inside the target-specific
// kernels GCC builds `{x, x, ...}` or a lane-by-lane fill one insert at a time (vinsertps
// chains, masked broadcasts), which made the old 8-wide prefill almost 2x slower.
template <int W>
WORLDVLA_INLINE vec<W> splatv(float x) { return vec<W>{} + x; }

// A broadcast of *p for the micro-kernels' inner loops. With MB (the AVX2 and AVX-512 builds of
// the kernels) one vbroadcastss from memory, a load-port instruction. splatv's scalar add and
// register broadcast take an FMA port or the shuffle port (on AVX-512 cores also the second FMA
// port): the 4 x 2W register blocks measured at about half the FMA peak with it. Inline asm,
// because the intrinsics do not inline into these templates (no target attribute of their own),
// and GCC turns `x - 0`-style splats of a loaded value into lane-by-lane masked broadcasts there.
// Without MB (the baseline x86-64 clone, which may run where AVX is missing) splatv.
template <int W, bool MB>
WORLDVLA_INLINE vec<W> bcastv(const float* p) {
#if WORLDVLA_WITH_AVX512
  if constexpr (MB) {
    vec<W> r;
    asm("vbroadcastss %1, %0" : "=v"(r) : "m"(*p));
    return r;
  }
#endif
  return splatv<W>(*p);
}

// A vector's lanes summed down to 8 (lane l + lane l + 8 for W = 16).
WORLDVLA_INLINE v8f fold8(const vec<8>& a) { return a; }
WORLDVLA_INLINE v8f fold8(const vec<16>& a) {
  v8f lo, hi;
  __builtin_memcpy(&lo, &a, sizeof(lo));
  __builtin_memcpy(&hi, reinterpret_cast<const char*>(&a) + sizeof(lo), sizeof(hi));
  return lo + hi;
}

WORLDVLA_INLINE float hsum8(const v8f& a) {
  float s = 0.f;
  for (int i = 0; i < 8; ++i) s += a[i];
  return s;
}

// Contiguous dot product with four independent vector accumulators, so that the FMA
// latency is hidden (one accumulator would wait on itself at every step).
template <int W = 8>
WORLDVLA_INLINE float dot_f32(const float* __restrict a, const float* __restrict b, int64_t n) {
  vec<W> s0 = {}, s1 = {}, s2 = {}, s3 = {};
  int64_t i = 0;
  for (; i + 4 * W <= n; i += 4 * W) {
    s0 += loadv<W>(a + i) * loadv<W>(b + i);
    s1 += loadv<W>(a + i + W) * loadv<W>(b + i + W);
    s2 += loadv<W>(a + i + 2 * W) * loadv<W>(b + i + 2 * W);
    s3 += loadv<W>(a + i + 3 * W) * loadv<W>(b + i + 3 * W);
  }
  for (; i + W <= n; i += W) s0 += loadv<W>(a + i) * loadv<W>(b + i);
  float s = hsum8(fold8((s0 + s1) + (s2 + s3)));
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// Dot products of 4 rows x[i] with 2 rows wa, wb (length n): lane 2 * i + j of the result is
// x[i] . (j ? wb : wa). Eight vector accumulators; each W-float step loads 6 vectors for 8 FMAs
// (a plain dot loads 2 for 1), and one transposing reduction gives the eight sums.
template <int W = 8>
WORLDVLA_INLINE v8f dot_4x2(const float* const* x, const float* wa, const float* wb, int64_t n) {
  const int64_t nw = n / W * W;
  vec<W> a[8] = {};
  for (int64_t d = 0; d < nw; d += W) {
    const vec<W> ya = loadv<W>(wa + d), yb = loadv<W>(wb + d);
    for (int i = 0; i < 4; ++i) {
      const vec<W> xi = loadv<W>(x[i] + d);
      a[2 * i] += xi * ya;
      a[2 * i + 1] += xi * yb;
    }
  }
  v8f f[8];
  for (int i = 0; i < 8; ++i) f[i] = fold8(a[i]);
  v8f sums = sum8x8(f);
  for (int64_t d = nw; d < n; ++d)
    for (int i = 0; i < 4; ++i) {
      sums[2 * i] += x[i][d] * wa[d];
      sums[2 * i + 1] += x[i][d] * wb[d];
    }
  return sums;
}

typedef uint16_t bf16_t;  // a bfloat16's bits

// W consecutive floats: loaded as they are, or bfloat16s widened exactly (a bfloat16 is the top 16 bits
// of a float32). The kernels that read bfloat16 weights (linear.cpp) or caches (attention.cpp) use these.
template <int W, bool AVX>
WORLDVLA_INLINE vec<W> loadw(const float* p) {
  return loadv<W>(p);
}
template <int W>
struct Bf16Vec {  // W bfloat16 bits, and the same widened to 32 bits
  typedef bf16_t half __attribute__((vector_size(2 * W)));
  typedef uint32_t word __attribute__((vector_size(4 * W)));
};
// With AVX (the AVX2 and AVX-512 builds) one vpmovzxwd from memory: GCC's own widening of the vector
// type goes through 128-bit halves and inserts (three shuffles a vector; the bfloat16 linear then ran
// 1.1x the float32 one at five rows, where it should save half the bytes).
template <int W, bool AVX>
WORLDVLA_INLINE vec<W> loadw(const bf16_t* p) {
  typename Bf16Vec<W>::word u;
#if WORLDVLA_WITH_AVX512
  if constexpr (AVX) {
    struct Bits { bf16_t b[W]; };
    asm("vpmovzxwd %1, %0" : "=v"(u) : "m"(*reinterpret_cast<const Bits*>(p)));
  } else
#endif
  {
    typename Bf16Vec<W>::half h;
    __builtin_memcpy(&h, p, sizeof(h));
    u = __builtin_convertvector(h, typename Bf16Vec<W>::word);
  }
  u <<= 16;
  vec<W> v;
  __builtin_memcpy(&v, &u, sizeof(v));
  return v;
}
WORLDVLA_INLINE float widen(float x) { return x; }
WORLDVLA_INLINE float widen(bf16_t x) {
  const uint32_t u = uint32_t(x) << 16;
  float f;
  __builtin_memcpy(&f, &u, sizeof(f));
  return f;
}

// float32 -> bfloat16 bits, rounding to nearest even as torch's conversion does; NaN -> a quiet NaN (0x7fc0).
WORLDVLA_INLINE bf16_t to_bf16(float x) {
  uint32_t u;
  __builtin_memcpy(&u, &x, sizeof(u));
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16_t(0x7fc0);
  return bf16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// exp(x) on W lanes for x <= 0 (softmax weights): exp(x) = 2^n * e^r with n = round(x / ln 2)
// (the 1.5 * 2^23 rounding trick: no vector floor in the baseline instruction set), |r| <= ln(2) / 2,
// and e^r from a degree-6 polynomial (Cephes' expf coefficients, about 1 ulp). -inf and anything
// below -87 give 0, NaN gives NaN (a NaN score must reach the softmax's sum, see attention.cpp).
// Written on vectors because GCC leaves a scalar version of this loop scalar.
template <int W>
struct IntVecOf {
  typedef int32_t type __attribute__((vector_size(4 * W)));
};
template <int W>
WORLDVLA_INLINE typename IntVecOf<W>::type splati(int32_t x) { return typename IntVecOf<W>::type{} + x; }
template <int W>
WORLDVLA_INLINE vec<W> expv_nonpos(const vec<W>& x_in) {
  using I = typename IntVecOf<W>::type;
  const I keep = x_in > splatv<W>(-87.0f);  // false for -inf and NaN (NaN lanes: the last line)
  const vec<W> x = keep ? x_in : splatv<W>(-87.0f);
  const vec<W> magic = splatv<W>(12582912.0f);
  const vec<W> n = (x * splatv<W>(1.44269504088896341f) + magic) - magic;
  vec<W> r = x - n * splatv<W>(0.693359375f);
  r = r - n * splatv<W>(-2.12194440e-4f);
  vec<W> y = splatv<W>(1.9875691500e-4f);
  y = y * r + splatv<W>(1.3981999507e-3f);
  y = y * r + splatv<W>(8.3334519073e-3f);
  y = y * r + splatv<W>(4.1665795894e-2f);
  y = y * r + splatv<W>(1.6666665459e-1f);
  y = y * r + splatv<W>(5.0000001201e-1f);
  y = y * r * r + r + splatv<W>(1.0f);
  const I bits = (__builtin_convertvector(n, I) + 127) << 23;
  vec<W> scale;
  __builtin_memcpy(&scale, &bits, sizeof(scale));
  const vec<W> e = keep ? y * scale : splatv<W>(0.0f);
  return x_in != x_in ? x_in : e;
}
WORLDVLA_INLINE v8f exp8_nonpos(const v8f& x) { return expv_nonpos<8>(x); }

// The softmax kernels' rule for non-finite values (worldvla/ops/attention.py): a NaN or an infinity in a
// query, or in the key or value of a key the query sees, makes the query's output row NaN.
// A visible score as the softmax takes it: finite scores as they are, an infinite one NaN (x - x is 0 for a
// finite x, NaN for an infinite or NaN one). A score of -inf (an infinity in q or k) would otherwise give its
// key weight 0, as if hidden, and +inf would make the row NaN only by way of inf - inf.
template <int W>
WORLDVLA_INLINE vec<W> nan_if_infinite(const vec<W>& x) { return x + (x - x); }
WORLDVLA_INLINE float nan_if_infinite(float x) { return x + (x - x); }
// 1 / (a softmax's sum) for its output row: 0 for a row that saw no key (sum 0), NaN for a row whose sum is
// NaN (it saw a non-finite value).
WORLDVLA_INLINE float inv_row_sum(double sum) {
  return sum > 0.0 ? static_cast<float>(1.0 / sum) : sum == 0.0 ? 0.f : std::numeric_limits<float>::quiet_NaN();
}

}  // namespace worldvla
