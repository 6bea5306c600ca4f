// Constrained decoding on the CPU: logits of a vocabulary range [lo, hi) only,
// straight from the final hidden state and the lm_head rows of that range.
#include <vector>

#include "common.h"

namespace worldvla {

void range_logits_cpu(const float* hidden, int64_t h_s, const float* weight, int64_t w_s,
                      int64_t N, int64_t H, int64_t lo, int64_t hi, float* logits) {
  linear_cpu(hidden, h_s, weight + lo * w_s, w_s, N, H, hi - lo, logits, hi - lo);
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
