// Constrained decoding on the CPU: logits of a vocabulary range [lo, hi) only,
// straight from the final hidden state and the lm_head rows of that range.
#include <cmath>
#include <vector>

#include "common.h"

namespace worldvla {

void range_logits_cpu(const float* hidden, int64_t h_s, const void* weight, int64_t w_s, int w_dtype,
                      int64_t N, int64_t H, int64_t lo, int64_t hi, float* logits) {
  if (w_dtype == kBFloat16)  // a bfloat16 lm_head streamed as it is: no float32 copy of the range
    linear_bf16_cpu(hidden, h_s, static_cast<const uint16_t*>(weight) + lo * w_s, w_s, N, H, hi - lo, logits, hi - lo);
  else if (w_dtype == kFloat32)
    linear_cpu(hidden, h_s, static_cast<const float*>(weight) + lo * w_s, w_s, N, H, hi - lo, logits, hi - lo);
  else
    throw std::invalid_argument("range_logits: the CPU path takes a float32 or bfloat16 weight");
}

void range_argmax_cpu(const float* hidden, int64_t h_s, const void* weight, int64_t w_s, int w_dtype,
                      int64_t N, int64_t H, int64_t lo, int64_t hi, int64_t* ids) {
  const int64_t R = hi - lo;
  std::vector<float> logits(N * R);
  range_logits_cpu(hidden, h_s, weight, w_s, w_dtype, N, H, lo, hi, logits.data());
  for (int64_t n = 0; n < N; ++n) {
    const float* l = &logits[n * R];
    int64_t best = 0;
    for (int64_t v = 1; v < R; ++v)
      if (l[v] > l[best]) best = v;  // strict: the first maximum wins, as torch.argmax
    ids[n] = lo + best;
  }
}

// Greedy with a bfloat16 screen: bitwise range_argmax_cpu's answer from about half the weight bytes
// when few codes come close to the top.
//
// a_v, from the bfloat16 copies b_v, and e_v, the float32 logit range_argmax_cpu computes, differ by
// at most c * S, S = sum_i |h_i| colmax_i (colmax_i = max_v |w_vi|): rounding to bfloat16 moves each
// weight by at most 2^-9 of itself, and each float32 dot product of H terms is within gamma_H =
// H u / (1 - H u) (u = 2^-24) of its exact value whatever the order of its sums, so
// c = 2^-9 + (2 + 2^-9) gamma_H. The best code v* then has a_v* >= e_v* - cS >= e_v - cS >= a_v - 2cS
// for every v: every code within 2cS of the largest a_v is a candidate, and the candidates' float32
// logits, computed by the same kernel one row at a time (each output of linear_cpu is summed the same
// way whatever rows surround it), decide, the first maximum winning as in range_argmax_cpu. More than
// max_candidates candidates, or a non-finite bound, and the row takes the float32 logits of the whole range.
void range_argmax_screened_cpu(const float* hidden, int64_t h_s, const float* w32, int64_t w_s, const uint16_t* w16,
                               const float* colmax, int64_t N, int64_t H, int64_t R, int64_t max_candidates,
                               int64_t* ids) {
  std::vector<float> approx(N * R);
  linear_bf16_cpu(hidden, h_s, w16, H, N, H, R, approx.data(), R);
  const double u = std::ldexp(1.0, -24), gamma = H * u / (1.0 - H * u);
  const double c = (std::ldexp(1.0, -9) + (2.0 + std::ldexp(1.0, -9)) * gamma) * (1.0 + 1e-12);
  std::vector<int64_t> cand;
  std::vector<float> exact;
  for (int64_t n = 0; n < N; ++n) {
    const float* h = hidden + n * h_s;
    const float* a = &approx[n * R];
    double S = 0.0;
    for (int64_t i = 0; i < H; ++i) S += std::fabs(double(h[i])) * colmax[i];
    float amax = a[0];
    for (int64_t v = 1; v < R; ++v) amax = a[v] > amax ? a[v] : amax;
    const double floor = double(amax) - 2.0 * c * S;
    cand.clear();
    if (std::isfinite(floor) && std::isfinite(amax))
      for (int64_t v = 0; v < R && int64_t(cand.size()) <= max_candidates; ++v)
        if (double(a[v]) >= floor) cand.push_back(v);
    if (cand.empty() || int64_t(cand.size()) > max_candidates) {  // the whole range in float32
      exact.resize(R);
      linear_cpu(h, h_s, w32, w_s, 1, H, R, exact.data(), R);
      int64_t best = 0;
      for (int64_t v = 1; v < R; ++v)
        if (exact[v] > exact[best]) best = v;
      ids[n] = best;
      continue;
    }
    int64_t best = -1;
    float best_logit = 0.f;
    for (const int64_t v : cand) {  // ascending: a tie keeps the first
      float e;
      linear_cpu(h, h_s, w32 + v * w_s, w_s, 1, H, 1, &e, 1);
      if (best < 0 || e > best_logit) best = v, best_logit = e;
    }
    ids[n] = best;
  }
}

}  // namespace worldvla
