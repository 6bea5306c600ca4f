// One decoder layer of a cached decode step on the CPU, in one call.
//
// A decode step has a few rows per sequence, so each of the layer's seven projections is a stream
// over its weights (linear.cpp) and everything else is a few thousand floats. Run op by op from
// Python, a small-config layer is ~100 tensor ops of a few microseconds each, several times the
// time of its weight stream; here the norms, rotary embedding, cache write, attention (attention.cpp)
// and SwiGLU run between the projections without leaving C++. Every row's result depends only on
// that row (and the cache), never on how many rows came in: the parallel chunk decoder's exact
// agreement with sequential decoding rests on it.
//
// A prefill through the cache (hundreds of rows) is the other way round: its projections are GEMMs
// that torch's blocked sgemm runs about twice as fast as linear.cpp, and the rest is large enough
// to cost memory traffic. Python then calls torch for the seven projections and the stages below
// for everything between them (rms_norm, decoder_attention_block, decoder_residual, silu_mul), the same code
// the few-row layer runs, split over threads by rows.
//
// A whole step (decode_step_cpu) also runs bfloat16 models: the embedding, the projections (linear.cpp's
// bfloat16 kernel) and the cache are read as they are and widened exactly, the norms take float32
// copies of their weights, every sum is float32, and the cache and the step's output take bfloat16
// values rounded to nearest even, as torch rounds them.
#include <algorithm>
#include <cmath>
#include <vector>

#include "common.h"
#include "cpu/cpu_common.h"

namespace worldvla {

namespace {

// out[r] = w * (x[r] / sqrt(mean(x[r]^2) + eps)), as the model's RMSNorm (the mean in double).
// Row loops split over threads only for prefill-sized work (a decode step's few rows stay serial).
constexpr int64_t kParallelRows = 64;

void rms_norm(const float* x, const float* w, int64_t R, int64_t D, float eps, float* out) {
#pragma omp parallel for schedule(static) if (R >= kParallelRows)
  for (int64_t r = 0; r < R; ++r) {
    const float* xr = x + r * D;
    double ss = 0.0;
    for (int64_t d = 0; d < D; ++d) ss += double(xr[d]) * xr[d];
    const float inv = 1.f / std::sqrt(float(ss / D) + eps);
    for (int64_t d = 0; d < D; ++d) out[r * D + d] = w[d] * (xr[d] * inv);
  }
}

// One head's LayerNorm over its Dh values with the per-head affine (w, b [Dh]), then the rotary embedding
// x * cos + rotate_half(x) * sin, in place on x [Dh]; tmp holds Dh floats. The mean and the variance (of
// the centred values) are float sums over 8-lane vectors, the lanes then added in a fixed order:
// compiled for AVX2 where the CPU has it. (The double sums of scalar loops this replaced took about
// 1 ms of a 574-token prefill of the small config.)
WORLDVLA_MULTIVERSION void norm_rope_head(float* x, int64_t Dh, const float* w, const float* b, const float* c,
                                          const float* s, float eps, float* tmp) {
  const int64_t D8 = Dh / 8 * 8, half = Dh / 2;
  v8f acc = {};
  for (int64_t d = 0; d < D8; d += 8) acc += load8(x + d);
  float sum = hsum8(acc);
  for (int64_t d = D8; d < Dh; ++d) sum += x[d];
  const float m = sum / float(Dh);
  const v8f m8 = splat8(m);
  acc = v8f{};
  for (int64_t d = 0; d < D8; d += 8) {
    const v8f t = load8(x + d) - m8;
    acc += t * t;
  }
  float var = hsum8(acc);
  for (int64_t d = D8; d < Dh; ++d) var += (x[d] - m) * (x[d] - m);
  const float inv = 1.f / std::sqrt(var / float(Dh) + eps);
  for (int64_t d = 0; d < Dh; ++d) tmp[d] = (x[d] - m) * inv * w[d] + b[d];
  for (int64_t d = 0; d < half; ++d) x[d] = tmp[d] * c[d] - tmp[d + half] * s[d];
  for (int64_t d = half; d < Dh; ++d) x[d] = tmp[d] * c[d] + tmp[d - half] * s[d];
}

// In place on t [R, heads, Dh]: each head's LayerNorm and rotary embedding (norm_rope_head) with the
// per-head affine w, b [heads, Dh] and the rows' cos, sin [R, Dh].
void head_norm_rope(float* t, int64_t R, int64_t heads, int64_t Dh, const float* w, const float* b,
                    const float* cos, const float* sin, float eps) {
#pragma omp parallel if (R >= kParallelRows)
  {
    std::vector<float> tmp(Dh);  // one head's normed values, per thread
#pragma omp for schedule(static)
    for (int64_t r = 0; r < R; ++r)
      for (int64_t h = 0; h < heads; ++h)
        norm_rope_head(t + (r * heads + h) * Dh, Dh, w + h * Dh, b + h * Dh, cos + r * Dh, sin + r * Dh, eps,
                       tmp.data());
  }
}

}  // namespace

void rms_norm_cpu(const float* x, const float* w, int64_t R, int64_t D, float eps, float* out) {
  rms_norm(x, w, R, D, eps, out);
}

void decoder_residual_cpu(const float* x, float* b, float* y, int64_t R, int64_t D, const float* w_branch,
                          const float* w_next, float* h, float eps, bool post_norm) {
  if (post_norm) rms_norm(b, w_branch, R, D, eps, b);  // row by row: each row read before written
  const int64_t n = R * D;
#pragma omp parallel for schedule(static) if (R >= kParallelRows)
  for (int64_t i = 0; i < n; ++i) y[i] = x[i] + b[i];
  if (!post_norm && w_next) rms_norm(y, w_next, R, D, eps, h);
}

namespace {

// silu(g) * u on W lanes: sigmoid from e = exp(-|g|) (never overflows): 1 / (1 + e) for g >= 0, else
// e / (1 + e). Every element takes this same vector arithmetic (the tail through a padded vector), so
// its result depends on its own inputs only, wherever it sits in the array; and the exp polynomial is
// the same at either width.
template <int W>
WORLDVLA_INLINE vec<W> silu_mul_v(const vec<W>& g, const vec<W>& u) {
  const vec<W> zero = splatv<W>(0.0f), one = splatv<W>(1.0f);
  const vec<W> e = expv_nonpos<W>(g < zero ? g : -g);
  const vec<W> sig = (g < zero ? e : one) / (one + e);
  return g * sig * u;
}

template <int W>
WORLDVLA_INLINE void silu_mul_range(float* g, const float* u, int64_t i0, int64_t i1) {
  int64_t i = i0;
  for (; i + W <= i1; i += W) storev<W>(g + i, silu_mul_v<W>(loadv<W>(g + i), loadv<W>(u + i)));
  if (i < i1) {
    float gt[W] = {}, ut[W] = {};
    for (int64_t j = i; j < i1; ++j) gt[j - i] = g[j], ut[j - i] = u[j];
    storev<W>(gt, silu_mul_v<W>(loadv<W>(gt), loadv<W>(ut)));
    for (int64_t j = i; j < i1; ++j) g[j] = gt[j - i];
  }
}

WORLDVLA_MULTIVERSION void silu_mul_w8(float* g, const float* u, int64_t i0, int64_t i1) {
  silu_mul_range<8>(g, u, i0, i1);
}
WORLDVLA_AVX512 void silu_mul_w16(float* g, const float* u, int64_t i0, int64_t i1) {
  silu_mul_range<16>(g, u, i0, i1);
}

}  // namespace

void silu_mul_cpu(float* g, const float* u, int64_t n) {
  const auto run = cpu_vector_width() == 16 ? silu_mul_w16 : silu_mul_w8;
  const int64_t block = 4096;  // a multiple of 16: blocks split on vector boundaries
  const int64_t blocks = (n + block - 1) / block;
#pragma omp parallel for schedule(static) if (blocks >= 16)
  for (int64_t b = 0; b < blocks; ++b) run(g, u, b * block, std::min(n, (b + 1) * block));
}

namespace {

float cache_value(float x, float) { return x; }
bf16_t cache_value(float x, bf16_t) { return to_bf16(x); }

// Rows' keys and values [R, Hkv, Dh] into their cache slots pos[r] (float32 or bfloat16 caches).
template <typename T>
void write_cache(const DecodeParams& m, const int64_t* pos, const float* k, const float* v, int64_t R, T* kc, T* vc) {
  const int64_t Hkv = m.n_kv_heads, Dh = m.head_dim;
#pragma omp parallel for schedule(static) if (R >= kParallelRows)
  for (int64_t r = 0; r < R; ++r) {
    const int64_t b = r / m.n_q, s = pos[r];
    for (int64_t hk = 0; hk < Hkv; ++hk)
      for (int64_t d = 0; d < Dh; ++d) {
        kc[b * m.k_sb + s * m.k_st + hk * m.k_sh + d] = cache_value(k[(r * Hkv + hk) * Dh + d], T{});
        vc[b * m.v_sb + s * m.v_st + hk * m.v_sh + d] = cache_value(v[(r * Hkv + hk) * Dh + d], T{});
      }
  }
}

}  // namespace

void decoder_attention_block_cpu(const DecoderLayerParams& p, float* q, float* k, const float* v, float* o) {
  const DecodeParams& m = p.attn;
  const int64_t R = m.batch * m.n_q, H = m.n_heads, Hkv = m.n_kv_heads, Dh = m.head_dim, Nq = H * Dh;
  for (int64_t r = 0; r < R; ++r)
    if (p.pos[r] < 0 || p.pos[r] >= m.cache_len)
      throw std::out_of_range("decoder_layer: cache slot " + std::to_string(p.pos[r]) + " of row " +
                              std::to_string(r) + " lies outside a cache of " + std::to_string(m.cache_len) +
                              " slots");
  head_norm_rope(q, R, H, Dh, p.qn_w, p.qn_b, p.cos, p.sin, p.ln_eps);
  head_norm_rope(k, R, Hkv, Dh, p.kn_w, p.kn_b, p.cos, p.sin, p.ln_eps);
  if (m.dtype == kBFloat16)  // a bfloat16 model's cache: its keys and values rounded as torch rounds them
    write_cache(m, p.pos, k, v, R, static_cast<bf16_t*>(const_cast<void*>(m.k)),
                static_cast<bf16_t*>(const_cast<void*>(m.v)));
  else
    write_cache(m, p.pos, k, v, R, static_cast<float*>(const_cast<void*>(m.k)),
                static_cast<float*>(const_cast<void*>(m.v)));
  DecodeParams a = m;
  a.q = q;
  a.o = o;
  a.q_sb = a.o_sb = m.n_q * Nq;
  a.q_st = a.o_st = Nq;
  a.q_sh = a.o_sh = Dh;
  decode_attention_cpu(a);
}

// y [R, N] = x [R, K] w^T for one of the layer's projections, float32 or bfloat16 (p.bf16_proj).
static void project(const DecoderLayerParams& p, const float* x, const float* w, int64_t R, int64_t K, int64_t N,
                    float* y) {
  if (p.bf16_proj)
    linear_bf16_cpu(x, K, reinterpret_cast<const uint16_t*>(w), K, R, K, N, y, N);
  else
    linear_cpu(x, K, w, K, R, K, N, y, N);
}

void decoder_layer_cpu(const DecoderLayerParams& p) {
  const DecodeParams& m = p.attn;
  const int64_t R = m.batch * m.n_q, D = p.hidden, I = p.intermediate;
  const int64_t Nq = m.n_heads * m.head_dim, Nkv = m.n_kv_heads * m.head_dim;
  // Scratch: the normed input (later the branch outputs), q, k, v, the attention output, gate, up.
  std::vector<float> scratch(R * (D + 2 * Nq + 2 * Nkv + 2 * I));
  float* h = scratch.data();
  float* q = h + R * D;
  float* k = q + R * Nq;
  float* v = k + R * Nkv;
  float* o = v + R * Nkv;
  float* g = o + R * Nq;
  float* u = g + R * I;

  // Attention branch.
  const float* a_in = p.x;
  if (!p.post_norm) {
    rms_norm(p.x, p.ln1, R, D, p.rms_eps, h);
    a_in = h;
  }
  project(p, a_in, p.wq, R, D, Nq, q);
  project(p, a_in, p.wk, R, D, Nkv, k);
  project(p, a_in, p.wv, R, D, Nkv, v);
  decoder_attention_block_cpu(p, q, k, v, o);
  project(p, o, p.wo, R, Nq, D, h);
  // y = x + branch; under pre-norm h = the MLP's normed input.
  decoder_residual_cpu(p.x, h, p.y, R, D, p.ln1, p.ln2, h, p.rms_eps, p.post_norm);

  // MLP branch.
  const float* m_in = p.post_norm ? p.y : h;
  project(p, m_in, p.wg, R, D, I, g);
  project(p, m_in, p.wu, R, D, I, u);
  silu_mul_cpu(g, u, R * I);
  project(p, g, p.wd, R, I, D, h);
  decoder_residual_cpu(p.y, h, p.y, R, D, p.ln2, nullptr, nullptr, p.rms_eps, p.post_norm);
}

void decode_step_cpu(const DecodeStepParams& p) {
  if (p.layers.empty()) throw std::invalid_argument("decode_step: a model needs at least one layer");
  const DecoderLayerParams& first = p.layers.front();
  const int64_t R = first.attn.batch * first.attn.n_q, D = first.hidden, Dh = first.attn.head_dim;
  // Two hidden-state buffers the layers alternate between, and the rows' rotary tables.
  std::vector<float> scratch(R * (2 * D + 2 * Dh));
  float* x = scratch.data();
  float* y = x + R * D;
  float* cos = y + R * D;
  float* sin = cos + R * Dh;
  for (int64_t r = 0; r < R; ++r) {
    const int64_t id = p.ids[r], pos = first.pos[r];
    if (id < 0 || id >= p.vocab)
      throw std::out_of_range("decode_step: token id " + std::to_string(id) + " of row " + std::to_string(r) +
                              " is outside the vocabulary of " + std::to_string(p.vocab));
    if (pos < 0 || pos >= p.table_len)
      throw std::out_of_range("decode_step: position " + std::to_string(pos) + " of row " + std::to_string(r) +
                              " is outside the rotary tables' " + std::to_string(p.table_len) + " positions");
    if (p.dtype == kBFloat16) {
      const bf16_t* e = static_cast<const bf16_t*>(p.embed) + id * D;
      for (int64_t d = 0; d < D; ++d) x[r * D + d] = widen(e[d]);
    } else {
      const float* e = static_cast<const float*>(p.embed) + id * D;
      std::copy(e, e + D, x + r * D);
    }
    std::copy(p.cos_table + pos * Dh, p.cos_table + (pos + 1) * Dh, cos + r * Dh);
    std::copy(p.sin_table + pos * Dh, p.sin_table + (pos + 1) * Dh, sin + r * Dh);
  }
  for (const DecoderLayerParams& layer : p.layers) {
    DecoderLayerParams lp = layer;
    lp.x = x;
    lp.y = y;
    lp.cos = cos;
    lp.sin = sin;
    decoder_layer_cpu(lp);
    std::swap(x, y);
  }
  if (p.dtype == kBFloat16) {  // a bfloat16 model's hidden states: normed in float32, then rounded
    rms_norm(x, p.final_norm, R, D, p.final_eps, y);
    bf16_t* out = static_cast<bf16_t*>(p.out);
    for (int64_t i = 0; i < R * D; ++i) out[i] = to_bf16(y[i]);
  } else {
    rms_norm(x, p.final_norm, R, D, p.final_eps, static_cast<float*>(p.out));
  }
}

// The greedy choice of each row of hidden [N, H] (float32) into ids (vocabulary ids).
static void greedy(const GreedyRange& g, const float* hidden, int64_t N, int64_t* ids) {
  if (g.screen) {
    const float* w = static_cast<const float*>(g.weight) + g.lo * g.w_s;
    range_argmax_screened_cpu(hidden, g.H, w, g.w_s, g.screen, g.colmax, N, g.H, g.hi - g.lo, g.max_candidates, ids);
    for (int64_t n = 0; n < N; ++n) ids[n] += g.lo;
  } else {
    range_argmax_cpu(hidden, g.H, g.weight, g.w_s, g.w_dtype, N, g.H, g.lo, g.hi, ids);
  }
}

// The draw of sample_logits from the range's logits and its scaled Gumbel noise z [N, hi - lo], as the
// native constrained_sample makes it (screened where the greedy choice is).
static void sample(const GreedyRange& g, const float* hidden, int64_t N, const float* z, int64_t top_k, int64_t* ids) {
  if (g.screen) {
    const float* w = static_cast<const float*>(g.weight) + g.lo * g.w_s;
    range_sample_screened_cpu(hidden, g.H, w, g.w_s, g.screen, g.colmax, N, g.H, g.hi - g.lo, g.max_candidates, z,
                              top_k, ids);
    for (int64_t n = 0; n < N; ++n) ids[n] += g.lo;
  } else {
    range_sample_cpu(hidden, g.H, g.weight, g.w_s, g.w_dtype, N, g.H, g.lo, g.hi, z, top_k, ids);
  }
}

// The guided choices: u + s * (c - u) over the float32 logits of both branches (hidden [2N, H]: the
// conditional rows, then the unconditional ones), each operation rounded as torch rounds it (the product
// kept apart from the sum: no fused multiply-add), then the choice of sample_logits.
static void guided(const GreedyRange& g, const float* hidden, int64_t N, float scale, const float* z, int64_t top_k,
                   int64_t* ids, std::vector<float>& logits) {
  const int64_t R = g.hi - g.lo;
  logits.resize(2 * N * R);
  range_logits_cpu(hidden, g.H, g.weight, g.w_s, g.w_dtype, 2 * N, g.H, g.lo, g.hi, logits.data());
  for (int64_t i = 0; i < N * R; ++i) {
    const float u = logits[N * R + i];
    volatile float m = scale * (logits[i] - u);  // volatile: stored and read back, never fused into the add
    logits[i] = u + m;
  }
  choose_from_logits_cpu(logits.data(), z, N, R, top_k, ids);
  for (int64_t n = 0; n < N; ++n) ids[n] += g.lo;
}

void decode_frame_cpu(const DecodeStepParams& one, const DecodeStepParams& two, const FrameDecodeParams& f,
                      int64_t first, int64_t last) {
  const int64_t N = f.rows, hw = f.h * f.w, D = one.layers.front().hidden;
  const int64_t B = f.guided ? 2 * N : N;  // the steps' sequences
  if (one.layers.front().attn.batch != B || two.layers.front().attn.batch != B || one.layers.front().attn.n_q != 1 ||
      two.layers.front().attn.n_q != 2 || two.layers.front().hidden != D || f.head.H != D || one.dtype != two.dtype)
    throw std::invalid_argument("decode_frame: wants a one-row and a two-row step of the same model over "
                                "the frame's sequences");
  if (first < 1 || last > hw)
    throw std::out_of_range("decode_frame: codes [" + std::to_string(first) + ", " + std::to_string(last) +
                            ") lie outside [1, " + std::to_string(hw) + ")");
  if (f.noise && first < last && (first / f.w != (last - 1) / f.w))
    throw std::invalid_argument("decode_frame: a sampled call covers one image row (its noise's)");
  std::vector<float> hidden(B * D), logits;
  std::vector<int64_t> ids(N);
  for (int64_t i = first; i < last; ++i) {
    const bool row_end = i % f.w == 0;  // the previous code closes a row: fed with the row's newline
    const DecodeStepParams& s = row_end ? two : one;
    const int64_t Q = row_end ? 2 : 1;
    int64_t* step_ids = const_cast<int64_t*>(s.ids);
    int64_t* pos = const_cast<int64_t*>(s.layers.front().pos);
    int32_t* q_pos = const_cast<int32_t*>(s.layers.front().attn.q_pos);
    for (int64_t r = 0; r < B; ++r) {
      step_ids[r * Q] = f.codes[(r % N) * hw + i - 1];  // an unconditional branch is fed its sequence's codes
      if (row_end) step_ids[r * Q + 1] = f.newline;
      for (int64_t q = 0; q < Q; ++q) {
        pos[r * Q + q] = f.next_pos[r] + q;
        q_pos[r * Q + q] = static_cast<int32_t>(f.next_pos[r] + q);
      }
    }
    decode_step_cpu(s);
    for (int64_t r = 0; r < B; ++r) {
      f.next_pos[r] += Q;
      const int64_t at = (r * Q + Q - 1) * D;  // the row's last token's hidden state
      if (s.dtype == kBFloat16)
        for (int64_t d = 0; d < D; ++d) hidden[r * D + d] = widen(static_cast<const bf16_t*>(s.out)[at + d]);
      else
        std::copy(static_cast<const float*>(s.out) + at, static_cast<const float*>(s.out) + at + D, &hidden[r * D]);
    }
    const float* z = f.noise ? f.noise + (i % f.w) * N * (f.head.hi - f.head.lo) : nullptr;
    if (f.guided)
      guided(f.head, hidden.data(), N, f.cfg_scale, z, f.top_k, ids.data(), logits);
    else if (z)
      sample(f.head, hidden.data(), N, z, f.top_k, ids.data());
    else
      greedy(f.head, hidden.data(), N, ids.data());
    for (int64_t r = 0; r < N; ++r) f.codes[r * hw + i] = ids[r];
  }
}

}  // namespace worldvla
