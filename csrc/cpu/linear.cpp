// y = x W^T for a few rows of x (decode steps, the sampler's logits) on the CPU, float32.
//
// With few rows the product is a stream over the weights: every weight is used M times, so at
// M = 1 the floor is the time to read W. MKL's small-M sgemm reads it at 4-9 GB/s on the AMD
// machines measured (benchmarks/NOTES.md); this kernel keeps the weights streaming and does the
// arithmetic in registers. Register block: 4 weight rows x MT rows of x, one vector accumulator
// each, the K loop W floats a step (4 + MT loads for 4 MT FMAs), then one transposing reduction for
// all 4 MT sums. Rows of x come in groups of MT (up to 6) while the block's 4 weight rows are still in L1/L2,
// so W is read from memory once whatever M is. OpenMP splits the weight rows.
//
// The weights may also be bfloat16 (`linear_bf16_cpu`): each is widened to float32 exactly (its 16
// bits above 16 zero bits) before the same multiply-adds, so a float32 matrix whose every value is a
// bfloat16 (a bfloat16 checkpoint loaded as float32) gives bitwise the same products from half the bytes.
#include <algorithm>

#include "common.h"
#include "cpu/cpu_common.h"

namespace worldvla {

namespace {

constexpr int64_t kNR = 4;  // weight rows per register block

// Rows of x per group: at W = 16, 6 x 4 accumulators + 4 weight vectors + 1 x vector = 29 of the
// 32 zmm registers; at W = 8 (16 ymm registers) 2 x 4 + 4 + 1 = 13.
template <int W>
constexpr int kMaxRows = W == 16 ? 6 : 2;

// y[m, n] for m < MT, n < NR (NR = kNR, or 1 for the last N % 4 weight rows).
template <int W, int MT, int NR, bool AVX, typename T>
WORLDVLA_INLINE void block(const float* __restrict x, int64_t x_s, const T* __restrict w, int64_t w_s,
                           int64_t K, float* __restrict y, int64_t y_s) {
  const int64_t Kw = K / W * W;
  vec<W> acc[MT * NR] = {};
  for (int64_t k = 0; k < Kw; k += W) {
    vec<W> wv[NR];
    for (int j = 0; j < NR; ++j) wv[j] = loadw<W, AVX>(w + j * w_s + k);
    for (int j = 0; j < NR; ++j) __builtin_prefetch(w + (NR + j) * w_s + k);  // the next block's rows
    for (int m = 0; m < MT; ++m) {
      const vec<W> xv = loadv<W>(x + m * x_s + k);
      for (int j = 0; j < NR; ++j) acc[m * NR + j] += xv * wv[j];
    }
  }
  // Sums of the MT * NR accumulators, eight at a time (sum8x8); unused slots are zero vectors.
  constexpr int kAcc = MT * NR, kGroups = (kAcc + 7) / 8;
  float sums[kGroups * 8];
  for (int g = 0; g < kGroups; ++g) {
    v8f f[8];
    for (int i = 0; i < 8; ++i) f[i] = g * 8 + i < kAcc ? fold8(acc[g * 8 + i]) : v8f{};
    const v8f s = sum8x8(f);
    for (int i = 0; i < 8; ++i) sums[g * 8 + i] = s[i];
  }
  for (int m = 0; m < MT; ++m)
    for (int j = 0; j < NR; ++j) {
      float s = sums[m * NR + j];
      // An explicit fused multiply-add: left to contraction, GCC fused the float and bfloat16 tails differently.
      for (int64_t k = Kw; k < K; ++k) s = __builtin_fmaf(x[m * x_s + k], widen(w[j * w_s + k]), s);
      y[m * y_s + j] = s;
    }
}

// Weight rows [n, n + NR) against all M rows of x, in groups of at most kMaxRows<W> rows of
// near-equal size (10 rows: 5 + 5, not 6 + 4: the pass count is the same and the small group wastes less).
template <int W, int NR, bool AVX, typename T>
WORLDVLA_INLINE void rows_of_w(const float* x, int64_t x_s, const T* w, int64_t w_s, int64_t M, int64_t K,
                               int64_t n, float* y, int64_t y_s) {
  constexpr int R = kMaxRows<W>;
  const int64_t groups = (M + R - 1) / R;
  for (int64_t g = 0, m = 0; g < groups; ++g) {
    const int64_t rows = (M - m) / (groups - g);  // the remaining rows spread over the remaining groups
    const float* xm = x + m * x_s;
    const T* wn = w + n * w_s;
    float* ym = y + m * y_s + n;
    switch (rows) {
      case 6: if constexpr (R >= 6) block<W, 6, NR, AVX, T>(xm, x_s, wn, w_s, K, ym, y_s); break;
      case 5: if constexpr (R >= 5) block<W, 5, NR, AVX, T>(xm, x_s, wn, w_s, K, ym, y_s); break;
      case 4: if constexpr (R >= 4) block<W, 4, NR, AVX, T>(xm, x_s, wn, w_s, K, ym, y_s); break;
      case 3: if constexpr (R >= 3) block<W, 3, NR, AVX, T>(xm, x_s, wn, w_s, K, ym, y_s); break;
      case 2: block<W, 2, NR, AVX, T>(xm, x_s, wn, w_s, K, ym, y_s); break;
      default: block<W, 1, NR, AVX, T>(xm, x_s, wn, w_s, K, ym, y_s); break;
    }
    m += rows;
  }
}

template <int W, bool AVX = false, typename T>
WORLDVLA_INLINE void linear_range(const float* x, int64_t x_s, const T* w, int64_t w_s, int64_t M, int64_t K,
                                  int64_t n0, int64_t n1, float* y, int64_t y_s) {
  int64_t n = n0;
  for (; n + kNR <= n1; n += kNR) rows_of_w<W, kNR, AVX>(x, x_s, w, w_s, M, K, n, y, y_s);
  for (; n < n1; ++n) rows_of_w<W, 1, AVX>(x, x_s, w, w_s, M, K, n, y, y_s);
}

WORLDVLA_MULTIVERSION void linear_range_w8(const float* x, int64_t x_s, const float* w, int64_t w_s, int64_t M,
                                           int64_t K, int64_t n0, int64_t n1, float* y, int64_t y_s) {
  linear_range<8>(x, x_s, w, w_s, M, K, n0, n1, y, y_s);
}
WORLDVLA_AVX512 void linear_range_w16(const float* x, int64_t x_s, const float* w, int64_t w_s, int64_t M,
                                      int64_t K, int64_t n0, int64_t n1, float* y, int64_t y_s) {
  linear_range<16>(x, x_s, w, w_s, M, K, n0, n1, y, y_s);
}
WORLDVLA_MULTIVERSION void linear_range_bf16_w8(const float* x, int64_t x_s, const bf16_t* w, int64_t w_s, int64_t M,
                                                int64_t K, int64_t n0, int64_t n1, float* y, int64_t y_s) {
  linear_range<8>(x, x_s, w, w_s, M, K, n0, n1, y, y_s);
}
WORLDVLA_AVX2 void linear_range_bf16_avx2(const float* x, int64_t x_s, const bf16_t* w, int64_t w_s, int64_t M,
                                          int64_t K, int64_t n0, int64_t n1, float* y, int64_t y_s) {
  linear_range<8, true>(x, x_s, w, w_s, M, K, n0, n1, y, y_s);
}
WORLDVLA_AVX512 void linear_range_bf16_w16(const float* x, int64_t x_s, const bf16_t* w, int64_t w_s, int64_t M,
                                           int64_t K, int64_t n0, int64_t n1, float* y, int64_t y_s) {
  linear_range<16, true>(x, x_s, w, w_s, M, K, n0, n1, y, y_s);
}

// Work items of 16 weight rows (a multiple of kNR); below about 64 K of multiply-adds the threads'
// start-up costs more than it saves.
template <typename T, typename Range>
void linear_items(Range run, const float* x, int64_t x_s, const T* w, int64_t w_s, int64_t M, int64_t K, int64_t N,
                  float* y, int64_t y_s) {
  if (M <= 0 || N <= 0) return;
  constexpr int64_t kItem = 16;
  const int64_t items = (N + kItem - 1) / kItem;
#pragma omp parallel for schedule(static) if (M * N * K >= (int64_t{1} << 16))
  for (int64_t i = 0; i < items; ++i) run(x, x_s, w, w_s, M, K, i * kItem, std::min(N, (i + 1) * kItem), y, y_s);
}

}  // namespace

void linear_cpu(const float* x, int64_t x_s, const float* w, int64_t w_s, int64_t M, int64_t K, int64_t N,
                float* y, int64_t y_s) {
  linear_items(cpu_vector_width() == 16 ? linear_range_w16 : linear_range_w8, x, x_s, w, w_s, M, K, N, y, y_s);
}

void linear_bf16_cpu(const float* x, int64_t x_s, const uint16_t* w, int64_t w_s, int64_t M, int64_t K, int64_t N,
                     float* y, int64_t y_s) {
  const auto run = cpu_vector_width() == 16 ? linear_range_bf16_w16
                   : cpu_has_avx2()           ? linear_range_bf16_avx2
                                              : linear_range_bf16_w8;
  linear_items(run, x, x_s, w, w_s, M, K, N, y, y_s);
}

}  // namespace worldvla
