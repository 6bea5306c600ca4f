// Constrained decoding on the CPU: logits of a vocabulary range [lo, hi) only,
// straight from the final hidden state and the lm_head rows of that range.
#include <algorithm>
#include <vector>

#include "common.h"
#include "cpu/cpu_common.h"

namespace worldvla {

namespace {

WORLDVLA_MULTIVERSION
void logits_rows(const float* hidden, int64_t h_s, const float* weight, int64_t w_s, int64_t N, int64_t H,
                 int64_t lo, int64_t v0, int64_t v1, int64_t R, float* logits) {
  for (int64_t v = v0; v < v1; ++v) {
    const float* w = weight + (lo + v) * w_s;
    for (int64_t n = 0; n < N; ++n) logits[n * R + v] = dot_f32(hidden + n * h_s, w, H);
  }
}

}  // namespace

void range_logits_cpu(const float* hidden, int64_t h_s, const float* weight, int64_t w_s,
                      int64_t N, int64_t H, int64_t lo, int64_t hi, float* logits) {
  const int64_t R = hi - lo;
  constexpr int64_t kChunk = 64;
  // Parallel over vocabulary rows: N is small (a few decode rows), R is large.
#pragma omp parallel for schedule(static)
  for (int64_t v0 = 0; v0 < R; v0 += kChunk)
    logits_rows(hidden, h_s, weight, w_s, N, H, lo, v0, std::min(R, v0 + kChunk), R, logits);
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
