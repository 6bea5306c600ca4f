// One decoder layer of a cached decode step on the CPU, in one call.
//
// A decode step has a few rows per sequence, so each of the layer's seven projections is a stream
// over its weights (linear.cpp) and everything else is a few thousand floats. Run op by op from
// Python, a small-config layer is ~100 tensor ops of a few microseconds each, several times the
// time of its weight stream; here the norms, rotary embedding, cache write, attention (attention.cpp)
// and SwiGLU run between the projections without leaving C++. Every row's result depends only on
// that row (and the cache), never on how many rows came in: the parallel chunk decoder's exact
// agreement with sequential decoding rests on it.
#include <cmath>
#include <vector>

#include "common.h"

namespace worldvla {

namespace {

// out[r] = w * (x[r] / sqrt(mean(x[r]^2) + eps)), as the model's RMSNorm (the mean in double).
void rms_norm(const float* x, const float* w, int64_t R, int64_t D, float eps, float* out) {
  for (int64_t r = 0; r < R; ++r) {
    const float* xr = x + r * D;
    double ss = 0.0;
    for (int64_t d = 0; d < D; ++d) ss += double(xr[d]) * xr[d];
    const float inv = 1.f / std::sqrt(float(ss / D) + eps);
    for (int64_t d = 0; d < D; ++d) out[r * D + d] = w[d] * (xr[d] * inv);
  }
}

// In place on t [R, heads, Dh]: LayerNorm over Dh with a per-head affine (w, b [heads, Dh]), then the
// rotary embedding t * cos + rotate_half(t) * sin with cos, sin [R, Dh].
void head_norm_rope(float* t, int64_t R, int64_t heads, int64_t Dh, const float* w, const float* b,
                    const float* cos, const float* sin, float eps, float* tmp) {
  const int64_t half = Dh / 2;
  for (int64_t r = 0; r < R; ++r)
    for (int64_t h = 0; h < heads; ++h) {
      float* x = t + (r * heads + h) * Dh;
      double mean = 0.0, var = 0.0;
      for (int64_t d = 0; d < Dh; ++d) mean += x[d];
      mean /= Dh;
      for (int64_t d = 0; d < Dh; ++d) var += (x[d] - mean) * (x[d] - mean);
      const float m = float(mean), inv = 1.f / std::sqrt(float(var / Dh) + eps);
      for (int64_t d = 0; d < Dh; ++d) tmp[d] = (x[d] - m) * inv * w[h * Dh + d] + b[h * Dh + d];
      const float* c = cos + r * Dh;
      const float* s = sin + r * Dh;
      for (int64_t d = 0; d < half; ++d) x[d] = tmp[d] * c[d] - tmp[d + half] * s[d];
      for (int64_t d = half; d < Dh; ++d) x[d] = tmp[d] * c[d] + tmp[d - half] * s[d];
    }
}

// A branch's input: x itself under post-norm, else its RMSNorm written into h.
const float* branch_input(const DecoderLayerParams& p, const float* x, const float* w, int64_t R, float* h) {
  if (p.post_norm) return x;
  rms_norm(x, w, R, p.hidden, p.rms_eps, h);
  return h;
}

// y = x + the branch output b (normed first under post-norm; b is overwritten then).
void add_branch(const DecoderLayerParams& p, const float* x, float* b, const float* w, int64_t R, float* y) {
  if (p.post_norm) rms_norm(b, w, R, p.hidden, p.rms_eps, b);  // row by row: each row read before written
  for (int64_t i = 0; i < R * p.hidden; ++i) y[i] = x[i] + b[i];
}

}  // namespace

void decoder_layer_cpu(const DecoderLayerParams& p) {
  const DecodeParams& m = p.attn;
  const int64_t R = m.batch * m.n_q, D = p.hidden, I = p.intermediate;
  const int64_t H = m.n_heads, Hkv = m.n_kv_heads, Dh = m.head_dim, Nq = H * Dh, Nkv = Hkv * Dh;
  for (int64_t r = 0; r < R; ++r)
    if (p.pos[r] < 0 || p.pos[r] >= m.cache_len)
      throw std::out_of_range("decoder_layer: cache slot " + std::to_string(p.pos[r]) + " of row " +
                              std::to_string(r) + " lies outside a cache of " + std::to_string(m.cache_len) +
                              " slots");
  // Scratch: the normed input (later the branch outputs), q, k, v, the attention output, gate, up.
  std::vector<float> scratch(R * (D + 2 * Nq + 2 * Nkv + 2 * I) + Dh);
  float* h = scratch.data();
  float* q = h + R * D;
  float* k = q + R * Nq;
  float* v = k + R * Nkv;
  float* o = v + R * Nkv;
  float* g = o + R * Nq;
  float* u = g + R * I;
  float* tmp = u + R * I;

  // Attention branch.
  const float* a_in = branch_input(p, p.x, p.ln1, R, h);
  linear_cpu(a_in, D, p.wq, D, R, D, Nq, q, Nq);
  linear_cpu(a_in, D, p.wk, D, R, D, Nkv, k, Nkv);
  linear_cpu(a_in, D, p.wv, D, R, D, Nkv, v, Nkv);
  head_norm_rope(q, R, H, Dh, p.qn_w, p.qn_b, p.cos, p.sin, p.ln_eps, tmp);
  head_norm_rope(k, R, Hkv, Dh, p.kn_w, p.kn_b, p.cos, p.sin, p.ln_eps, tmp);
  float* kc = static_cast<float*>(const_cast<void*>(m.k));
  float* vc = static_cast<float*>(const_cast<void*>(m.v));
  for (int64_t r = 0; r < R; ++r) {
    const int64_t b = r / m.n_q, s = p.pos[r];
    for (int64_t hk = 0; hk < Hkv; ++hk)
      for (int64_t d = 0; d < Dh; ++d) {
        kc[b * m.k_sb + s * m.k_st + hk * m.k_sh + d] = k[(r * Hkv + hk) * Dh + d];
        vc[b * m.v_sb + s * m.v_st + hk * m.v_sh + d] = v[(r * Hkv + hk) * Dh + d];
      }
  }
  DecodeParams a = m;
  a.q = q;
  a.o = o;
  a.q_sb = a.o_sb = m.n_q * Nq;
  a.q_st = a.o_st = Nq;
  a.q_sh = a.o_sh = Dh;
  a.dtype = kFloat32;
  decode_attention_cpu(a);
  linear_cpu(o, Nq, p.wo, Nq, R, Nq, D, h, D);
  add_branch(p, p.x, h, p.ln1, R, p.y);

  // MLP branch.
  const float* m_in = branch_input(p, p.y, p.ln2, R, h);
  linear_cpu(m_in, D, p.wg, D, R, D, I, g, I);
  linear_cpu(m_in, D, p.wu, D, R, D, I, u, I);
  for (int64_t i = 0; i < R * I; ++i) g[i] = g[i] / (1.f + std::exp(-g[i])) * u[i];
  linear_cpu(g, I, p.wd, I, R, I, D, h, D);
  add_branch(p, p.y, h, p.ln2, R, p.y);
}

}  // namespace worldvla
