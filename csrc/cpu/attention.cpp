// Chunk-masked attention on the CPU: float32, online softmax over key tiles,
// OpenMP over (sequence, head, query block). Tiles the chunk rule hides from a
// whole query block are skipped; tiles it cannot touch skip the per-pair test.
// Q K^T and P V run as register-blocked 4 x 16 micro-kernels; K is transposed
// once per (sequence, kv head) up front.
#include <algorithm>
#include <climits>
#include <cmath>
#include <limits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "common.h"
#include "cpu/cpu_common.h"

// v8f values passed between force-inlined helpers: the by-value vector ABI note does not apply.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

namespace worldvla {
namespace {

constexpr int64_t kQB = 32;  // query rows per work item (a multiple of 4)
constexpr int64_t kKB = 64;  // keys per tile (a multiple of 16)
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// 8 floats; the x86-64-v3 clone keeps these in ymm registers, the baseline in pairs of xmm.
// Everything below is force-inlined into the multiversioned callers, so each clone gets
// its own code.
typedef float v8f __attribute__((vector_size(32)));
#define WORLDVLA_INLINE inline __attribute__((always_inline))

WORLDVLA_INLINE v8f load8(const float* p) {
  v8f v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}
WORLDVLA_INLINE void store8(float* p, const v8f& v) { __builtin_memcpy(p, &v, sizeof(v)); }
WORLDVLA_INLINE v8f splat8(float x) { return v8f{x, x, x, x, x, x, x, x}; }

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

struct WorkItem {
  int64_t seq, head, start, len, m0;
};

struct Scratch {
  std::vector<float> qs, vt, sc, acc, row_max;
  std::vector<double> row_sum;  // softmax denominators: a long sequential sum, kept in double
  std::vector<int32_t> ql;
  Scratch(int64_t D, int64_t Dp)
      : qs(kQB * D), vt(kKB * Dp), sc(kQB * kKB), acc(kQB * Dp), row_max(kQB), row_sum(kQB), ql(kQB) {}
};

// sc[r][c] = sum_d qs[r][d] kt[d * ldk + c] for rows r < rows (a multiple of 4), all kKB columns.
// Rank-1 updates of a 4 x 16 register block: no horizontal sums, no reassociation.
WORLDVLA_INLINE void score_tile(const float* __restrict qs, const float* __restrict kt, int64_t ldk, float* __restrict sc,
                       int64_t rows, int64_t D) {
  for (int64_t r0 = 0; r0 < rows; r0 += 4)
    for (int64_t c0 = 0; c0 < kKB; c0 += 16) {
      v8f a0 = {}, a1 = {}, a2 = {}, a3 = {}, b0 = {}, b1 = {}, b2 = {}, b3 = {};
      const float* q0 = qs + r0 * D;
      for (int64_t d = 0; d < D; ++d) {
        const v8f k0 = load8(kt + d * ldk + c0), k1 = load8(kt + d * ldk + c0 + 8);
        const v8f x0 = splat8(q0[d]), x1 = splat8(q0[D + d]), x2 = splat8(q0[2 * D + d]), x3 = splat8(q0[3 * D + d]);
        a0 += x0 * k0; b0 += x0 * k1;
        a1 += x1 * k0; b1 += x1 * k1;
        a2 += x2 * k0; b2 += x2 * k1;
        a3 += x3 * k0; b3 += x3 * k1;
      }
      float* s0 = sc + r0 * kKB + c0;
      store8(s0, a0); store8(s0 + 8, b0);
      store8(s0 + kKB, a1); store8(s0 + kKB + 8, b1);
      store8(s0 + 2 * kKB, a2); store8(s0 + 2 * kKB + 8, b2);
      store8(s0 + 3 * kKB, a3); store8(s0 + 3 * kKB + 8, b3);
    }
}

// acc[r][:Dp] += sum_{c < cols} p[r][c] v[c * ldv + :] for rows r < rows (multiple of 4), Dp a multiple of 16.
// The tile's sum is formed on its own and then added: shorter rounding chains than accumulating in place.
WORLDVLA_INLINE void pv_tile(const float* __restrict p, const float* __restrict v, int64_t ldv, float* __restrict acc,
                    int64_t rows, int64_t cols, int64_t Dp) {
  for (int64_t r0 = 0; r0 < rows; r0 += 4)
    for (int64_t d0 = 0; d0 < Dp; d0 += 16) {
      v8f a0 = {}, a1 = {}, a2 = {}, a3 = {}, b0 = {}, b1 = {}, b2 = {}, b3 = {};
      const float* p0 = p + r0 * kKB;
      for (int64_t c = 0; c < cols; ++c) {
        const v8f v0 = load8(v + c * ldv + d0), v1 = load8(v + c * ldv + d0 + 8);
        const v8f x0 = splat8(p0[c]), x1 = splat8(p0[kKB + c]), x2 = splat8(p0[2 * kKB + c]),
                  x3 = splat8(p0[3 * kKB + c]);
        a0 += x0 * v0; b0 += x0 * v1;
        a1 += x1 * v0; b1 += x1 * v1;
        a2 += x2 * v0; b2 += x2 * v1;
        a3 += x3 * v0; b3 += x3 * v1;
      }
      float* o0 = acc + r0 * Dp + d0;
      store8(o0, load8(o0) + a0); store8(o0 + 8, load8(o0 + 8) + b0);
      store8(o0 + Dp, load8(o0 + Dp) + a1); store8(o0 + Dp + 8, load8(o0 + Dp + 8) + b1);
      store8(o0 + 2 * Dp, load8(o0 + 2 * Dp) + a2); store8(o0 + 2 * Dp + 8, load8(o0 + 2 * Dp + 8) + b2);
      store8(o0 + 3 * Dp, load8(o0 + 3 * Dp) + a3); store8(o0 + 3 * Dp + 8, load8(o0 + 3 * Dp + 8) + b3);
    }
}

// K^T of every (sequence, kv head): [D][len + kKB] with zero columns after the
// sequence, so every key tile is a plain strided block of the micro-kernel.
struct KeysT {
  std::vector<float> data;
  std::vector<int64_t> offset;  // per (sequence, kv head)
  std::vector<int64_t> ld;      // per sequence
};

WORLDVLA_MULTIVERSION
void prefill_item(const AttnFwdParams& p, const WorkItem& it, const KeysT& kT, Scratch& w) {
  const float* q = static_cast<const float*>(p.q);
  const float* v = static_cast<const float*>(p.v);
  float* o = static_cast<float*>(p.o);
  const int64_t D = p.head_dim, Dp = round_up(D, 16), group = p.n_heads / p.n_kv_heads;
  const int64_t rows = std::min(kQB, it.len - it.m0), rows4 = round_up(rows, 4);
  const int64_t hk = it.head / group;
  const float* qb = q + it.seq * p.q_sb + (it.start + it.m0) * p.q_st + it.head * p.q_sh;
  const float* vb = v + it.seq * p.v_sb + it.start * p.v_st + hk * p.v_sh;
  const float* kt = kT.data.data() + kT.offset[it.seq * p.n_kv_heads + hk];
  const int64_t ldk = kT.ld[it.seq];
  const int32_t* kvb = p.kv_block + it.seq * p.meta_sb + it.start;
  const int32_t* qlim = p.q_limit + it.seq * p.meta_sb + it.start;
  // V rows are read in place when they hold whole 16-float groups, else copied padded.
  const bool v_direct = D == Dp;

  int32_t ql_min = INT_MAX, ql_max = INT_MIN;
  for (int64_t r = 0; r < rows4; ++r) {
    for (int64_t d = 0; d < D; ++d) w.qs[r * D + d] = r < rows ? qb[r * p.q_st + d] : 0.f;
    w.row_max[r] = kNegInf;
    w.row_sum[r] = 0.0;
    if (r < rows) {
      w.ql[r] = qlim[it.m0 + r];
      ql_min = std::min(ql_min, w.ql[r]);
      ql_max = std::max(ql_max, w.ql[r]);
    }
  }
  std::fill(w.acc.begin(), w.acc.begin() + rows4 * Dp, 0.f);

  const int64_t n_end = it.m0 + rows;  // causal: keys up to the last row
  for (int64_t n0 = 0; n0 < n_end; n0 += kKB) {
    const int64_t cols = std::min(kKB, n_end - n0);
    int32_t kv_min = INT_MAX, kv_max = INT_MIN;
    for (int64_t c = 0; c < cols; ++c) {
      kv_min = std::min(kv_min, kvb[n0 + c]);
      kv_max = std::max(kv_max, kvb[n0 + c]);
    }
    if (kv_max < ql_min) continue;  // the chunk rule hides this whole tile
    const bool need_mask = (n0 + cols - 1 > it.m0) || (kv_min < ql_max);

    score_tile(w.qs.data(), kt + n0, ldk, w.sc.data(), rows4, D);
    for (int64_t r = 0; r < rows4; ++r) {
      float* sr = &w.sc[r * kKB];
      if (r >= rows) {  // padding rows: zero weights, nothing accumulated
        std::fill(sr, sr + kKB, 0.f);
        continue;
      }
      const int64_t i = it.m0 + r;
      for (int64_t c = 0; c < cols; ++c) sr[c] *= p.scale;  // after the dot, as torch's reference
      if (need_mask) {
        for (int64_t c = 0; c < cols; ++c) {
          const int64_t j = n0 + c;
          if (j > i || kvb[j] < w.ql[r]) sr[c] = kNegInf;
        }
      }
      float mx = w.row_max[r];
      for (int64_t c = 0; c < cols; ++c) mx = std::max(mx, sr[c]);
      if (mx == kNegInf) {  // nothing visible yet in this row
        std::fill(sr, sr + kKB, 0.f);
        continue;
      }
      const float alpha = std::exp(w.row_max[r] - mx);
      for (int64_t c = 0; c < cols; ++c) sr[c] = exp_nonpos(sr[c] - mx);
      double sum = 0.0;
      for (int64_t c = 0; c < cols; ++c) sum += sr[c];
      w.row_sum[r] = w.row_sum[r] * alpha + sum;
      w.row_max[r] = mx;
      if (alpha != 1.f)
        for (int64_t d = 0; d < Dp; ++d) w.acc[r * Dp + d] *= alpha;
    }
    if (v_direct) {
      pv_tile(w.sc.data(), vb + n0 * p.v_st, p.v_st, w.acc.data(), rows4, cols, Dp);
    } else {
      for (int64_t c = 0; c < cols; ++c) {
        const float* vr = vb + (n0 + c) * p.v_st;
        float* vd = &w.vt[c * Dp];
        for (int64_t d = 0; d < D; ++d) vd[d] = vr[d];
        for (int64_t d = D; d < Dp; ++d) vd[d] = 0.f;
      }
      pv_tile(w.sc.data(), w.vt.data(), Dp, w.acc.data(), rows4, cols, Dp);
    }
  }

  float* ob = o + it.seq * p.o_sb + (it.start + it.m0) * p.o_st + it.head * p.o_sh;
  for (int64_t r = 0; r < rows; ++r) {
    // A row that sees no key (possible only with hand-made metadata) gives zeros.
    const float inv = w.row_sum[r] > 0.0 ? static_cast<float>(1.0 / w.row_sum[r]) : 0.f;
    for (int64_t d = 0; d < D; ++d) ob[r * p.o_st + d] = w.acc[r * Dp + d] * inv;
  }
}

struct DecodeItem {
  int64_t b, hk0, hk1;
};

// All query rows of kv heads [hk0, hk1) of one sequence. Keys are visited in
// order with the heads inner, so a thread streams contiguous [heads, D] blocks
// of the cache instead of one head's rows at a head-count stride.
WORLDVLA_MULTIVERSION
void decode_item(const DecodeParams& p, const DecodeItem& it, std::vector<float>& sc, std::vector<float>& qs,
                 std::vector<float>& acc) {
  const float* q = static_cast<const float*>(p.q);
  const float* k = static_cast<const float*>(p.k);
  const float* v = static_cast<const float*>(p.v);
  float* o = static_cast<float*>(p.o);
  const int64_t Q = p.n_q, D = p.head_dim, S = p.cache_len, G = p.n_heads / p.n_kv_heads;
  const int64_t per_head = G * Q, n_rows = (it.hk1 - it.hk0) * per_head;
  const int64_t kv_len = std::min<int64_t>(std::max<int64_t>(p.kv_len[it.b], 0), S);
  const int32_t* kvb = p.kv_block + it.b * p.kvb_sb;
  const int32_t* qpos = p.q_pos + it.b * Q;
  const int32_t* qlim = p.q_limit + it.b * Q;

  // Row r = (hk - hk0) * G * Q + g * Q + i  <->  head hk * G + g, query i.
  int64_t end = 0;
  for (int64_t i = 0; i < Q; ++i) end = std::max<int64_t>(end, std::min<int64_t>(kv_len, int64_t(qpos[i]) + 1));
  sc.resize(std::max<int64_t>(n_rows * end, 1));
  qs.resize(n_rows * D);
  acc.assign(n_rows * D, 0.f);
  for (int64_t r = 0; r < n_rows; ++r) {
    const int64_t hk = it.hk0 + r / per_head, g = (r % per_head) / Q, i = r % Q;
    const float* qr = q + it.b * p.q_sb + i * p.q_st + (hk * G + g) * p.q_sh;
    for (int64_t d = 0; d < D; ++d) qs[r * D + d] = qr[d];
  }

  for (int64_t s = 0; s < end; ++s) {
    const float* kbase = k + it.b * p.k_sb + s * p.k_st;
    for (int64_t r = 0; r < n_rows; ++r) {
      const int64_t hk = it.hk0 + r / per_head, i = r % Q;
      const bool visible = s <= qpos[i] && !(kvb[s] < qlim[i]);
      sc[r * end + s] = visible ? dot_f32(&qs[r * D], kbase + hk * p.k_sh, D) * p.scale : kNegInf;
    }
  }
  std::vector<float> inv(n_rows);
  for (int64_t r = 0; r < n_rows; ++r) {
    float* sr = &sc[r * end];
    float mx = kNegInf;
    for (int64_t s = 0; s < end; ++s) mx = std::max(mx, sr[s]);
    if (mx == kNegInf) mx = 0.f;  // nothing visible: every weight is exp(-inf) = 0
    for (int64_t s = 0; s < end; ++s) sr[s] = exp_nonpos(sr[s] - mx);
    double sum = 0.0;
    for (int64_t s = 0; s < end; ++s) sum += sr[s];
    inv[r] = sum > 0.0 ? static_cast<float>(1.0 / sum) : 0.f;
  }
  for (int64_t s = 0; s < end; ++s) {
    const float* vbase = v + it.b * p.v_sb + s * p.v_st;
    for (int64_t r = 0; r < n_rows; ++r) {
      const float pr = sc[r * end + s];
      if (pr == 0.f) continue;  // hidden slot: also keeps garbage in unused cache slots out
      axpy_f32(&acc[r * D], vbase + (it.hk0 + r / per_head) * p.v_sh, pr, D);
    }
  }
  for (int64_t r = 0; r < n_rows; ++r) {
    const int64_t hk = it.hk0 + r / per_head, g = (r % per_head) / Q, i = r % Q;
    float* orow = o + it.b * p.o_sb + i * p.o_st + (hk * G + g) * p.o_sh;
    for (int64_t d = 0; d < D; ++d) orow[d] = acc[r * D + d] * inv[r];
  }
}

}  // namespace

void masked_attention_fwd_cpu(const AttnFwdParams& p) {
  const int64_t D = p.head_dim, Hkv = p.n_kv_heads;
  const float* k = static_cast<const float*>(p.k);
  // Flat work list: packed documents have different lengths, so the query
  // blocks of all of them go into one list scheduled dynamically.
  std::vector<WorkItem> work;
  KeysT kT;
  kT.offset.resize(p.n_seq * Hkv);
  kT.ld.resize(p.n_seq);
  int64_t total = 0;
  for (int64_t s = 0; s < p.n_seq; ++s) {
    const int64_t start = p.cu_seqlens ? p.cu_seqlens[s] : 0;
    const int64_t len = p.cu_seqlens ? p.cu_seqlens[s + 1] - start : p.seq_len;
    for (int64_t h = 0; h < p.n_heads; ++h)
      for (int64_t m0 = 0; m0 < len; m0 += kQB) work.push_back({s, h, start, len, m0});
    kT.ld[s] = len + kKB;
    for (int64_t hk = 0; hk < Hkv; ++hk, total += D * kT.ld[s]) kT.offset[s * Hkv + hk] = total;
  }
  kT.data.resize(total);
  // Longest items (most keys) first.
  std::stable_sort(work.begin(), work.end(), [](const WorkItem& a, const WorkItem& b) { return a.m0 > b.m0; });
#pragma omp parallel
  {
#pragma omp for schedule(static)
    for (int64_t sh = 0; sh < p.n_seq * Hkv; ++sh) {
      const int64_t s = sh / Hkv, hk = sh % Hkv, ld = kT.ld[s], len = ld - kKB;
      const int64_t start = p.cu_seqlens ? p.cu_seqlens[s] : 0;
      const float* kb = k + s * p.k_sb + start * p.k_st + hk * p.k_sh;
      float* dst = kT.data.data() + kT.offset[sh];
      for (int64_t j = 0; j < len; ++j)
        for (int64_t d = 0; d < D; ++d) dst[d * ld + j] = kb[j * p.k_st + d];
      for (int64_t d = 0; d < D; ++d) std::fill(dst + d * ld + len, dst + (d + 1) * ld, 0.f);
    }
    Scratch w(D, round_up(D, 16));
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < (int64_t)work.size(); ++i) prefill_item(p, work[i], kT, w);
  }
}

void decode_attention_cpu(const DecodeParams& p) {
  int n_threads = 1;
#ifdef _OPENMP
  n_threads = omp_get_max_threads();
#endif
  // Enough head chunks per sequence to keep every thread busy (two items each).
  const int64_t chunks = std::min<int64_t>(p.n_kv_heads, std::max<int64_t>(1, (2 * n_threads + p.batch - 1) / p.batch));
  const int64_t per_chunk = (p.n_kv_heads + chunks - 1) / chunks;
  std::vector<DecodeItem> work;
  for (int64_t b = 0; b < p.batch; ++b)
    for (int64_t hk = 0; hk < p.n_kv_heads; hk += per_chunk)
      work.push_back({b, hk, std::min(hk + per_chunk, p.n_kv_heads)});
#pragma omp parallel
  {
    std::vector<float> sc, qs, acc;
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < (int64_t)work.size(); ++i) decode_item(p, work[i], sc, qs, acc);
  }
}

}  // namespace worldvla
