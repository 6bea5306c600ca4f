// VQ nearest-code search and codebook gather on the CPU.
#include <algorithm>
#include <cstring>
#include <limits>
#include <vector>

#include "common.h"
#include "cpu/cpu_common.h"

namespace worldvla {

namespace {

constexpr int64_t kRows = 4;  // z rows per step: each code row is read once for 4 rows

WORLDVLA_MULTIVERSION
void code_norms(const float* codebook, int64_t cb_s, int64_t k0, int64_t k1, int64_t C, float* enorm) {
  for (int64_t c = k0; c < k1; ++c) enorm[c] = dot_f32(codebook + c * cb_s, codebook + c * cb_s, C);
}

WORLDVLA_MULTIVERSION
void nearest_rows(const float* z, int64_t z_s, const float* codebook, int64_t cb_s, const float* enorm, int64_t n0,
                  int64_t rows, int64_t K, int64_t C, int64_t* out) {
  const float* zr[kRows];
  for (int64_t r = 0; r < kRows; ++r) zr[r] = z + (n0 + (r < rows ? r : 0)) * z_s;
  float best[kRows];
  int64_t arg[kRows];
  for (int64_t r = 0; r < kRows; ++r) {
    best[r] = std::numeric_limits<float>::infinity();
    arg[r] = 0;
  }
  for (int64_t c = 0; c < K; ++c) {
    const float* e = codebook + c * cb_s;
    float d0 = 0.f, d1 = 0.f, d2 = 0.f, d3 = 0.f;
#pragma omp simd reduction(+ : d0, d1, d2, d3)
    for (int64_t d = 0; d < C; ++d) {
      d0 += zr[0][d] * e[d];
      d1 += zr[1][d] * e[d];
      d2 += zr[2][d] * e[d];
      d3 += zr[3][d] * e[d];
    }
    const float dist[kRows] = {enorm[c] - 2.f * d0, enorm[c] - 2.f * d1, enorm[c] - 2.f * d2, enorm[c] - 2.f * d3};
    for (int64_t r = 0; r < kRows; ++r)
      if (dist[r] < best[r]) {  // strict: the first minimum wins, as torch.argmin
        best[r] = dist[r];
        arg[r] = c;
      }
  }
  for (int64_t r = 0; r < rows; ++r) out[n0 + r] = arg[r];
}

}  // namespace

void vq_quantize_cpu(const float* z, int64_t z_s, const float* codebook, int64_t cb_s,
                     int64_t N, int64_t K, int64_t C, int64_t* out) {
  // ||z - e||^2 = ||z||^2 + ||e||^2 - 2 z.e ; ||z||^2 is the same for every code.
  std::vector<float> enorm(K);
  constexpr int64_t kChunk = 256;
#pragma omp parallel
  {
#pragma omp for schedule(static)
    for (int64_t k0 = 0; k0 < K; k0 += kChunk) code_norms(codebook, cb_s, k0, std::min(K, k0 + kChunk), C, enorm.data());
#pragma omp for schedule(dynamic, 4)
    for (int64_t n0 = 0; n0 < N; n0 += kRows)
      nearest_rows(z, z_s, codebook, cb_s, enorm.data(), n0, std::min(kRows, N - n0), K, C, out);
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
