// VQ nearest-code search and codebook gather on the CPU.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "common.h"
#include "cpu/cpu_common.h"

namespace worldvla {

namespace {

constexpr int64_t kRows = 4;        // z rows per micro-kernel step (dot_4x2)
constexpr int64_t kRowBlock = 32;   // z rows per work item
constexpr int64_t kCodeTile = 128;  // codes per pass over the item's rows (128 x C floats stay in L2)

template <int W>
WORLDVLA_INLINE void code_norms(const float* codebook, int64_t cb_s, int64_t k0, int64_t k1, int64_t C,
                                float* enorm) {
  for (int64_t c = k0; c < k1; ++c) enorm[c] = dot_f32<W>(codebook + c * cb_s, codebook + c * cb_s, C);
}

// Keeps the running (best, arg) of a row as torch.argmin does: the first minimum, and the first NaN
// over any number (a NaN distance comes from NaN or inf inputs; returning its code lets the NaN reach
// the decoded frame instead of hiding it). One compare per distance: !(dist >= best) holds for a
// smaller distance and for any NaN; only then is best checked, so that once a NaN is kept it stays.
WORLDVLA_INLINE void keep_nearest(float dist, int64_t code, float& best, int64_t& arg) {
  if (!(dist >= best) && !std::isnan(best)) {
    best = dist;
    arg = code;
  }
}

// Nearest code of z rows [n0, n1): the codebook is walked a tile at a time, each tile against
// every row of the item, so a code row is fetched from memory once per item instead of once per
// 4 rows. Codes are visited in order, so keep_nearest's strict '<' leaves the first minimum.
// Every code's dot products come from dot_4x2, whose two lanes per row are computed alike (an odd
// tile's last code goes in as both of its codes): duplicate codes get bit-identical distances, so
// the first of them wins wherever it sits (dot_f32 sums in another order, which let a duplicate
// scored by it beat an earlier one by a rounding).
template <int W>
WORLDVLA_INLINE void nearest_rows(const float* z, int64_t z_s, const float* codebook, int64_t cb_s,
                                  const float* enorm, int64_t n0, int64_t n1, int64_t K, int64_t C, int64_t* out) {
  float best[kRowBlock];
  int64_t arg[kRowBlock];
  for (int64_t r = 0; r < kRowBlock; ++r) {
    best[r] = std::numeric_limits<float>::infinity();
    arg[r] = 0;
  }
  for (int64_t k0 = 0; k0 < K; k0 += kCodeTile) {
    const int64_t k1 = std::min(K, k0 + kCodeTile), k2 = k0 + (k1 - k0) / 2 * 2;
    for (int64_t m = n0; m < n1; m += kRows) {
      const float* zr[kRows];
      for (int64_t r = 0; r < kRows; ++r) zr[r] = z + std::min(m + r, n1 - 1) * z_s;  // repeats the last row
      float* b = best + (m - n0);
      int64_t* a = arg + (m - n0);
      for (int64_t c = k0; c < k2; c += 2) {
        const float* e = codebook + c * cb_s;
        const v8f dots = dot_4x2<W>(zr, e, e + cb_s, C);
        for (int64_t r = 0; r < kRows; ++r)
          for (int64_t j = 0; j < 2; ++j) keep_nearest(enorm[c + j] - 2.f * dots[2 * r + j], c + j, b[r], a[r]);
      }
      if (k2 < k1) {
        const float* e = codebook + k2 * cb_s;
        const v8f dots = dot_4x2<W>(zr, e, e, C);
        for (int64_t r = 0; r < kRows; ++r) keep_nearest(enorm[k2] - 2.f * dots[2 * r], k2, b[r], a[r]);
      }
    }
  }
  for (int64_t n = n0; n < n1; ++n) out[n] = arg[n - n0];
}

// The kernels at each vector width: W = 8 in the AVX2 / baseline clones, W = 16 for AVX-512.
WORLDVLA_MULTIVERSION void code_norms_w8(const float* cb, int64_t cb_s, int64_t k0, int64_t k1, int64_t C, float* en) {
  code_norms<8>(cb, cb_s, k0, k1, C, en);
}
WORLDVLA_AVX512 void code_norms_w16(const float* cb, int64_t cb_s, int64_t k0, int64_t k1, int64_t C, float* en) {
  code_norms<16>(cb, cb_s, k0, k1, C, en);
}
WORLDVLA_MULTIVERSION void nearest_rows_w8(const float* z, int64_t z_s, const float* cb, int64_t cb_s,
                                           const float* en, int64_t n0, int64_t n1, int64_t K, int64_t C,
                                           int64_t* out) {
  nearest_rows<8>(z, z_s, cb, cb_s, en, n0, n1, K, C, out);
}
WORLDVLA_AVX512 void nearest_rows_w16(const float* z, int64_t z_s, const float* cb, int64_t cb_s,
                                      const float* en, int64_t n0, int64_t n1, int64_t K, int64_t C, int64_t* out) {
  nearest_rows<16>(z, z_s, cb, cb_s, en, n0, n1, K, C, out);
}

}  // namespace

void vq_quantize_cpu(const float* z, int64_t z_s, const float* codebook, int64_t cb_s,
                     int64_t N, int64_t K, int64_t C, int64_t* out) {
  const bool w16 = cpu_vector_width() == 16;
  const auto norms = w16 ? code_norms_w16 : code_norms_w8;
  const auto nearest = w16 ? nearest_rows_w16 : nearest_rows_w8;
  // ||z - e||^2 = ||z||^2 + ||e||^2 - 2 z.e ; ||z||^2 is the same for every code.
  std::vector<float> enorm(K);
  constexpr int64_t kChunk = 256;
#pragma omp parallel
  {
#pragma omp for schedule(static)
    for (int64_t k0 = 0; k0 < K; k0 += kChunk) norms(codebook, cb_s, k0, std::min(K, k0 + kChunk), C, enorm.data());
#pragma omp for schedule(dynamic, 1)
    for (int64_t n0 = 0; n0 < N; n0 += kRowBlock)
      nearest(z, z_s, codebook, cb_s, enorm.data(), n0, std::min(N, n0 + kRowBlock), K, C, out);
  }
}

namespace {
template <typename E, typename I>
void gather_impl(const I* idx, const E* cb, int64_t cb_s, int64_t B, int64_t HW, int64_t K,
                 int64_t C, E* out) {
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t b = 0; b < B; ++b)
    for (int64_t c = 0; c < C; ++c) {
      const I* ib = idx + b * HW;
      E* ob = out + (b * C + c) * HW;
      for (int64_t x = 0; x < HW; ++x) {
        const int64_t code = static_cast<int64_t>(ib[x]);
        // Out-of-range codes were rejected in Python; never read outside the codebook.
        ob[x] = (code >= 0 && code < K) ? cb[code * cb_s + c] : E(0);
      }
    }
}

template <typename E>
void gather_dispatch_index(const void* idx, int index_dtype, const void* cb, int64_t cb_s,
                           int64_t B, int64_t HW, int64_t K, int64_t C, void* out) {
  if (index_dtype == kInt64)
    gather_impl(static_cast<const int64_t*>(idx), static_cast<const E*>(cb), cb_s, B, HW, K, C,
                static_cast<E*>(out));
  else if (index_dtype == kInt32)
    gather_impl(static_cast<const int32_t*>(idx), static_cast<const E*>(cb), cb_s, B, HW, K, C,
                static_cast<E*>(out));
  else
    throw std::invalid_argument("vq_gather: indices must be int32 or int64");
}
}  // namespace

void vq_gather_cpu(const void* indices, int index_dtype, const void* codebook, int64_t cb_s,
                   int elem_size, int64_t B, int64_t HW, int64_t K, int64_t C, void* out) {
  switch (elem_size) {
    case 2: gather_dispatch_index<uint16_t>(indices, index_dtype, codebook, cb_s, B, HW, K, C, out); break;
    case 4: gather_dispatch_index<uint32_t>(indices, index_dtype, codebook, cb_s, B, HW, K, C, out); break;
    case 8: gather_dispatch_index<uint64_t>(indices, index_dtype, codebook, cb_s, B, HW, K, C, out); break;
    default: throw std::invalid_argument("vq_gather: element size must be 2, 4 or 8 bytes");
  }
}

}  // namespace worldvla
