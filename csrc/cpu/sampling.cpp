// Constrained decoding on the CPU: logits of a vocabulary range [lo, hi) only,
// straight from the final hidden state and the lm_head rows of that range.
#include <algorithm>
#include <cmath>
#include <functional>
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

namespace {

// The top-k threshold: the k-th largest of `values` (1 <= k <= its size), as std::nth_element finds it
// under std::greater (reordering `values`). That order has no place for NaN: draw_row leaves NaN out first.
float kth_largest(std::vector<float>& values, int64_t k) {
  std::nth_element(values.begin(), values.begin() + (k - 1), values.end(), std::greater<float>());
  return values[k - 1];
}

// The draw of one row from its exact float32 logits l [R] and noise z [R], as torch computes
// (l + z).masked_fill(l < kth, -inf).argmax(): kth the k-th largest logit as torch.topk orders them (NaN
// above every number), ties at it kept, one float32 add, the first maximum (a NaN score, as torch.argmax
// takes it, the first NaN).
int64_t draw_row(const float* l, const float* z, int64_t R, int64_t top_k, std::vector<float>& scratch) {
  float kth = -INFINITY;
  if (top_k > 0 && top_k < R) {
    scratch.clear();
    for (int64_t v = 0; v < R; ++v)
      if (!std::isnan(l[v])) scratch.push_back(l[v]);
    const int64_t nans = R - int64_t(scratch.size()), k = top_k - nans;
    kth = k > 0 ? kth_largest(scratch, k) : NAN;  // else the k largest are NaN: nothing compares below NaN
  }
  int64_t best = 0;
  float best_score = -INFINITY;
  for (int64_t v = 0; v < R; ++v) {
    const float score = l[v] < kth ? -INFINITY : l[v] + z[v];
    if (v == 0 || score > best_score || (std::isnan(score) && !std::isnan(best_score))) best = v, best_score = score;
  }
  return best;
}

}  // namespace

void choose_from_logits_cpu(const float* logits, const float* z, int64_t N, int64_t R, int64_t top_k, int64_t* ids) {
  std::vector<float> scratch;
  for (int64_t n = 0; n < N; ++n) {
    const float* l = logits + n * R;
    if (z) {
      ids[n] = draw_row(l, z + n * R, R, top_k, scratch);
      continue;
    }
    int64_t best = 0;
    for (int64_t v = 1; v < R && !std::isnan(l[best]); ++v)
      if (l[v] > l[best] || std::isnan(l[v])) best = v;
    ids[n] = best;
  }
}

void range_argmax_cpu(const float* hidden, int64_t h_s, const void* weight, int64_t w_s, int w_dtype,
                      int64_t N, int64_t H, int64_t lo, int64_t hi, int64_t* ids) {
  const int64_t R = hi - lo;
  std::vector<float> logits(N * R);
  range_logits_cpu(hidden, h_s, weight, w_s, w_dtype, N, H, lo, hi, logits.data());
  choose_from_logits_cpu(logits.data(), nullptr, N, R, 0, ids);  // the first maximum (or NaN), as torch.argmax
  for (int64_t n = 0; n < N; ++n) ids[n] += lo;
}

namespace {

// |a_v - e_v| <= screen_bound(h), a_v the logit from the bfloat16 copies b_v of the weights, e_v the one
// the float32 kernel computes. Rounding to the nearest bfloat16 (8 significant bits) moves a weight by at
// most 2^-8 of itself (2^-134 for a subnormal), and a float32 dot product of H terms is within
// gamma_H sum_i |h_i x_i| (gamma_H = H u / (1 - H u), u = 2^-24) of its exact value whatever the order of
// its sums, plus at most 2^-150 a product that underflows. With S = sum_i |h_i| colmax_i
// (colmax_i = max_v |w_vi|) and L = sum_i |h_i|:
// |a_v - e_v| <= (2^-8 + (2 + 2^-8) gamma_H) S + 2^-133 L + 4 H 2^-150, taken with a little room for the
// double sums here.
double screen_bound(const float* h, int64_t H, const float* colmax) {
  const double u = std::ldexp(1.0, -24), gamma = H * u / (1.0 - H * u), r = std::ldexp(1.0, -8);
  double S = 0.0, L = 0.0;
  for (int64_t i = 0; i < H; ++i) {
    const double x = std::fabs(double(h[i]));
    S += x * colmax[i];
    L += x;
  }
  return ((r + (2.0 + r) * gamma) * S + std::ldexp(1.0, -133) * L + 4.0 * double(H) * std::ldexp(1.0, -150)) *
         (1.0 + 1e-9);
}

// The float32 logits of the candidate rows cand of w32 (row stride w_s) for hidden row h: the rows gathered
// and one linear_cpu call, which sums each output as it does among any other rows.
void candidate_logits(const float* h, int64_t h_s, const float* w32, int64_t w_s, int64_t H,
                      const std::vector<int64_t>& cand, std::vector<float>& rows, std::vector<float>& out) {
  const int64_t C = int64_t(cand.size());
  rows.resize(C * H);
  for (int64_t j = 0; j < C; ++j) std::copy(w32 + cand[j] * w_s, w32 + cand[j] * w_s + H, &rows[j * H]);
  out.resize(C);
  linear_cpu(h, h_s, rows.data(), H, 1, H, C, out.data(), C);
}

}  // namespace

// Greedy with a bfloat16 screen: bitwise range_argmax_cpu's answer from about half the weight bytes
// when few codes come close to the top.
//
// With B = screen_bound(h) >= |a_v - e_v| for every v, the best code v* has
// a_v* >= e_v* - B >= e_v - B >= a_v - 2B for every v: every code within 2B of the largest a_v is a
// candidate, and the candidates' float32 logits (candidate_logits: the same kernel, each output summed
// the same way whatever rows surround it) decide, the first maximum winning as in range_argmax_cpu. More
// than max_candidates candidates, a NaN or a non-finite bound, and the row takes the float32 logits of
// the whole range.
void range_argmax_screened_cpu(const float* hidden, int64_t h_s, const float* w32, int64_t w_s, const uint16_t* w16,
                               const float* colmax, int64_t N, int64_t H, int64_t R, int64_t max_candidates,
                               int64_t* ids) {
  std::vector<float> approx(N * R);
  linear_bf16_cpu(hidden, h_s, w16, H, N, H, R, approx.data(), R);
  std::vector<int64_t> cand;
  std::vector<float> exact, rows, cand_logit;
  for (int64_t n = 0; n < N; ++n) {
    const float* h = hidden + n * h_s;
    const float* a = &approx[n * R];
    float amax = a[0];
    bool nan = std::isnan(a[0]);
    for (int64_t v = 1; v < R; ++v) {
      amax = a[v] > amax ? a[v] : amax;
      nan = nan || std::isnan(a[v]);
    }
    const double floor = double(amax) - 2.0 * screen_bound(h, H, colmax);
    cand.clear();
    if (std::isfinite(floor) && std::isfinite(amax) && !nan)
      for (int64_t v = 0; v < R && int64_t(cand.size()) <= max_candidates; ++v)
        if (double(a[v]) >= floor) cand.push_back(v);
    if (cand.empty() || int64_t(cand.size()) > max_candidates) {  // the whole range in float32
      exact.resize(R);
      linear_cpu(h, h_s, w32, w_s, 1, H, R, exact.data(), R);
      choose_from_logits_cpu(exact.data(), nullptr, 1, R, 0, &ids[n]);
      continue;
    }
    candidate_logits(h, h_s, w32, w_s, H, cand, rows, cand_logit);
    int64_t best = 0;  // ascending: a tie keeps the first
    for (size_t j = 1; j < cand.size(); ++j)
      if (cand_logit[j] > cand_logit[best]) best = int64_t(j);
    ids[n] = cand[best];
  }
}

void range_sample_cpu(const float* hidden, int64_t h_s, const void* weight, int64_t w_s, int w_dtype, int64_t N,
                      int64_t H, int64_t lo, int64_t hi, const float* z, int64_t top_k, int64_t* ids) {
  const int64_t R = hi - lo;
  std::vector<float> logits(N * R);
  range_logits_cpu(hidden, h_s, weight, w_s, w_dtype, N, H, lo, hi, logits.data());
  choose_from_logits_cpu(logits.data(), z, N, R, top_k, ids);
  for (int64_t n = 0; n < N; ++n) ids[n] += lo;
}

// The screen of range_argmax_screened_cpu, for the draw: approximate logits a_v from the bfloat16 rows,
// |a_v - e_v| <= B = screen_bound(h) (e_v the float32 logits).
// Without top-k the draw is the first maximum of s_v = fl(e_v + z_v). With t_v = e_v + z_v exactly and
// u = 2^-24, s_v* >= s_v gives t_v* >= t_v - u(|t_v| + |t_v*|), and |t_v - (a_v + z_v)| <= B, so the
// winner has a_v* + z_v* >= a_v + z_v - 2B - 2u(M + B) for every v, M the largest |a_v + z_v|: every
// code within that margin of the largest a_v + z_v (summed in double) is a candidate, and the candidates'
// float32 logits (linear_cpu over their rows gathered: each output summed as among other rows) decide. A
// code left out cannot be the first maximum, so the first maximum among the candidates is the draw's.
// With top-k, the k codes of largest a_v have e_v >= kth_a - B (kth_a: the k-th largest a_v), so the
// k-th largest e_v is at least that, and a code with a_v < kth_a - 2B has e_v below it: it is neither
// kept nor able to move the k-th largest. The codes with a_v >= kth_a - 2B (at least k) get their float32
// logits; the k-th largest of those is the draw's threshold, and the draw runs over them as draw_row runs
// over the whole range (the others are masked there). Too many candidates (max_candidates, or
// top_k + 4 max_candidates with top-k), a NaN, a non-finite bound or a non-finite winning score, and the
// row takes the float32 logits of the whole range (draw_row).
void range_sample_screened_cpu(const float* hidden, int64_t h_s, const float* w32, int64_t w_s, const uint16_t* w16,
                               const float* colmax, int64_t N, int64_t H, int64_t R, int64_t max_candidates,
                               const float* z, int64_t top_k, int64_t* ids) {
  std::vector<float> approx(N * R), exact, scratch, rows;
  linear_bf16_cpu(hidden, h_s, w16, H, N, H, R, approx.data(), R);
  const double u = std::ldexp(1.0, -24) * (1.0 + 1e-6);
  const bool keep_all = top_k <= 0 || top_k >= R;
  std::vector<int64_t> cand;
  std::vector<float> cand_logit;
  for (int64_t n = 0; n < N; ++n) {
    const float* h = hidden + n * h_s;
    const float* a = &approx[n * R];
    const float* zn = z + n * R;
    const double B = screen_bound(h, H, colmax);
    bool nan = false;
    for (int64_t v = 0; v < R && !nan; ++v) nan = std::isnan(a[v]) || std::isnan(zn[v]);
    const int64_t limit = keep_all ? max_candidates : top_k + 4 * max_candidates;
    cand.clear();
    double floor;
    if (keep_all) {
      double top = -INFINITY, M = 0.0;
      for (int64_t v = 0; v < R; ++v) {
        const double t = double(a[v]) + double(zn[v]);
        top = std::max(top, t);
        M = std::max(M, std::fabs(t));
      }
      floor = top - 2.0 * B - 2.0 * u * (M + B);
      if (std::isfinite(floor) && !nan)
        for (int64_t v = 0; v < R && int64_t(cand.size()) <= limit; ++v)
          if (double(a[v]) + double(zn[v]) >= floor) cand.push_back(v);
    } else if (!nan) {
      scratch.assign(a, a + R);
      floor = double(kth_largest(scratch, top_k)) - 2.0 * B;
      if (std::isfinite(floor))
        for (int64_t v = 0; v < R && int64_t(cand.size()) <= limit; ++v)
          if (double(a[v]) >= floor) cand.push_back(v);
    }
    auto whole_range = [&] {  // the float32 logits of the whole range
      exact.resize(R);
      linear_cpu(h, h_s, w32, w_s, 1, H, R, exact.data(), R);
      ids[n] = draw_row(exact.data(), zn, R, top_k, scratch);
    };
    if (cand.empty() || int64_t(cand.size()) > limit || (!keep_all && int64_t(cand.size()) < top_k)) {
      whole_range();
      continue;
    }
    candidate_logits(h, h_s, w32, w_s, H, cand, rows, cand_logit);
    float kth = -INFINITY;
    if (!keep_all) {
      scratch.assign(cand_logit.begin(), cand_logit.end());
      kth = kth_largest(scratch, top_k);
    }
    int64_t best = -1;
    float best_score = -INFINITY;
    for (size_t j = 0; j < cand.size(); ++j) {  // ascending: a tie keeps the first
      if (cand_logit[j] < kth) continue;
      const float score = cand_logit[j] + zn[cand[j]];
      if (best < 0 || score > best_score) best = cand[j], best_score = score;
    }
    if (std::isfinite(best_score))
      ids[n] = best;
    else
      whole_range();  // an infinite or NaN score: the bound does not hold there
  }
}

}  // namespace worldvla
