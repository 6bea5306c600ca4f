// Constrained decoding on the CPU: logits of a vocabulary range [lo, hi) only,
// straight from the final hidden state and the lm_head rows of that range.
#include <algorithm>
#include <vector>

#include "common.h"
#include "cpu/cpu_common.h"

namespace worldvla {

namespace {

// Logits of vocabulary rows [v0, v1) for all N hidden rows: blocks of 4 hidden rows x 2 vocabulary
// rows (dot_4x2), plain dots for the rows left over.
template <int W>
WORLDVLA_INLINE void logits_rows(const float* hidden, int64_t h_s, const float* weight, int64_t w_s, int64_t N,
                                 int64_t H, int64_t lo, int64_t v0, int64_t v1, int64_t R, float* logits) {
  const int64_t N4 = N / 4 * 4, v2 = v0 + (v1 - v0) / 2 * 2;
  for (int64_t n0 = 0; n0 < N4; n0 += 4) {
    const float* h[4] = {hidden + n0 * h_s, hidden + (n0 + 1) * h_s, hidden + (n0 + 2) * h_s, hidden + (n0 + 3) * h_s};
    for (int64_t v = v0; v < v2; v += 2) {
      const float* wa = weight + (lo + v) * w_s;
      const v8f sums = dot_4x2<W>(h, wa, wa + w_s, H);
      for (int i = 0; i < 4; ++i) {
        logits[(n0 + i) * R + v] = sums[2 * i];
        logits[(n0 + i) * R + v + 1] = sums[2 * i + 1];
      }
    }
    for (int64_t v = v2; v < v1; ++v)
      for (int i = 0; i < 4; ++i) logits[(n0 + i) * R + v] = dot_f32<W>(h[i], weight + (lo + v) * w_s, H);
  }
  for (int64_t n = N4; n < N; ++n)
    for (int64_t v = v0; v < v1; ++v) logits[n * R + v] = dot_f32<W>(hidden + n * h_s, weight + (lo + v) * w_s, H);
}

WORLDVLA_MULTIVERSION void logits_rows_w8(const float* hidden, int64_t h_s, const float* weight, int64_t w_s,
                                          int64_t N, int64_t H, int64_t lo, int64_t v0, int64_t v1, int64_t R,
                                          float* logits) {
  logits_rows<8>(hidden, h_s, weight, w_s, N, H, lo, v0, v1, R, logits);
}
WORLDVLA_AVX512 void logits_rows_w16(const float* hidden, int64_t h_s, const float* weight, int64_t w_s, int64_t N,
                                     int64_t H, int64_t lo, int64_t v0, int64_t v1, int64_t R, float* logits) {
  logits_rows<16>(hidden, h_s, weight, w_s, N, H, lo, v0, v1, R, logits);
}

}  // namespace

void range_logits_cpu(const float* hidden, int64_t h_s, const float* weight, int64_t w_s,
                      int64_t N, int64_t H, int64_t lo, int64_t hi, float* logits) {
  const int64_t R = hi - lo;
  constexpr int64_t kChunk = 64;
  const auto rows = cpu_vector_width() == 16 ? logits_rows_w16 : logits_rows_w8;
  // Parallel over vocabulary rows: N is small (a few decode rows), R is large.
#pragma omp parallel for schedule(static)
  for (int64_t v0 = 0; v0 < R; v0 += kChunk)
    rows(hidden, h_s, weight, w_s, N, H, lo, v0, std::min(R, v0 + kChunk), R, logits);
}

void range_argmax_cpu(const float* hidden, int64_t h_s, const float* weight, int64_t w_s,
                      int64_t N, int64_t H, int64_t lo, int64_t hi, int64_t* ids) {
  const int64_t R = hi - lo;
  std::vector<float> logits(N * R);
  range_logits_cpu(hidden, h_s, weight, w_s, N, H, lo, hi, logits.data());
  for (int64_t n = 0; n < N; ++n) {
    const float* l = &logits[n * R];
    int64_t best = 0;
    for (int64_t v = 1; v < R; ++v)
      if (l[v] > l[best]) best = v;  // strict: the first maximum wins, as torch.argmax
    ids[n] = lo + best;
  }
}

}  // namespace worldvla
