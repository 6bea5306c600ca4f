// Chunk-masked attention on the CPU: float32, online softmax over key tiles,
// OpenMP over (sequence, head, query block). Tiles the chunk rule hides from a
// whole query block are skipped; tiles it cannot touch skip the per-pair test.
// Q K^T and P V run as register-blocked 4-row micro-kernels over local,
// zero-padded copies of the tiles.
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

namespace worldvla {
namespace {

constexpr int64_t kQB = 32;  // query rows per work item (a multiple of 4)
constexpr int64_t kKB = 64;  // keys per tile (a multiple of 16)
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

struct WorkItem {
  int64_t seq, head, start, len, m0;
};

struct Scratch {
  std::vector<float> qs, kt, vt, sc, acc, row_max;
  std::vector<double> row_sum;  // softmax denominators: a long sequential sum, kept in double
  std::vector<int32_t> ql;
  Scratch(int64_t D, int64_t Dp)
      : qs(kQB * D), kt(D * kKB), vt(kKB * Dp), sc(kQB * kKB), acc(kQB * Dp), row_max(kQB), row_sum(kQB),
        ql(kQB) {}
};

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// sc[r][c] = sum_d qs[r][d] kt[d][c] for rows r < rows (a multiple of 4) and all kKB columns.
inline void score_tile(const float* __restrict qs, const float* __restrict kt, float* __restrict sc, int64_t rows,
                       int64_t D) {
  for (int64_t r0 = 0; r0 < rows; r0 += 4)
    for (int64_t c0 = 0; c0 < kKB; c0 += 16) {
      float a[4][16] = {};
      for (int64_t d = 0; d < D; ++d) {
        const float* kd = kt + d * kKB + c0;
        for (int i = 0; i < 4; ++i) {
          const float x = qs[(r0 + i) * D + d];
          for (int j = 0; j < 16; ++j) a[i][j] += x * kd[j];
        }
      }
      for (int i = 0; i < 4; ++i)
        for (int j = 0; j < 16; ++j) sc[(r0 + i) * kKB + c0 + j] = a[i][j];
    }
}

// acc[r][:] += sum_c p[r][c] vt[c][:] for rows r < rows (multiple of 4), Dp a multiple of 16.
inline void pv_tile(const float* __restrict p, const float* __restrict vt, float* __restrict acc, int64_t rows,
                    int64_t cols, int64_t Dp) {
  for (int64_t r0 = 0; r0 < rows; r0 += 4)
    for (int64_t d0 = 0; d0 < Dp; d0 += 16) {
      float a[4][16] = {};  // the tile's own sum, added at the end: shorter rounding chains
      for (int64_t c = 0; c < cols; ++c) {
        const float* vc = vt + c * Dp + d0;
        for (int i = 0; i < 4; ++i) {
          const float x = p[(r0 + i) * kKB + c];
          for (int j = 0; j < 16; ++j) a[i][j] += x * vc[j];
        }
      }
      for (int i = 0; i < 4; ++i)
        for (int j = 0; j < 16; ++j) acc[(r0 + i) * Dp + d0 + j] += a[i][j];
    }
}

WORLDVLA_MULTIVERSION
void prefill_item(const AttnFwdParams& p, const WorkItem& it, Scratch& w) {
  const float* q = static_cast<const float*>(p.q);
  const float* k = static_cast<const float*>(p.k);
  const float* v = static_cast<const float*>(p.v);
  float* o = static_cast<float*>(p.o);
  const int64_t D = p.head_dim, Dp = round_up(D, 16), group = p.n_heads / p.n_kv_heads;
  const int64_t rows = std::min(kQB, it.len - it.m0), rows4 = round_up(rows, 4);
  const int64_t hk = it.head / group;
  const float* qb = q + it.seq * p.q_sb + (it.start + it.m0) * p.q_st + it.head * p.q_sh;
  const float* kb = k + it.seq * p.k_sb + it.start * p.k_st + hk * p.k_sh;
  const float* vb = v + it.seq * p.v_sb + it.start * p.v_st + hk * p.v_sh;
  const int32_t* kvb = p.kv_block + it.seq * p.meta_sb + it.start;
  const int32_t* qlim = p.q_limit + it.seq * p.meta_sb + it.start;

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

    for (int64_t c = 0; c < kKB; ++c) {
      float* vd = &w.vt[c * Dp];
      if (c < cols) {
        const float* kr = kb + (n0 + c) * p.k_st;
        const float* vr = vb + (n0 + c) * p.v_st;
        for (int64_t d = 0; d < D; ++d) w.kt[d * kKB + c] = kr[d];
        for (int64_t d = 0; d < D; ++d) vd[d] = vr[d];
        for (int64_t d = D; d < Dp; ++d) vd[d] = 0.f;
      } else {
        for (int64_t d = 0; d < D; ++d) w.kt[d * kKB + c] = 0.f;
      }
    }
    score_tile(w.qs.data(), w.kt.data(), w.sc.data(), rows4, D);

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
      double sum = 0.0;
      for (int64_t c = 0; c < cols; ++c) {
        sr[c] = std::exp(sr[c] - mx);
        sum += sr[c];
      }
      w.row_sum[r] = w.row_sum[r] * alpha + sum;
      w.row_max[r] = mx;
      if (alpha != 1.f)
        for (int64_t d = 0; d < Dp; ++d) w.acc[r * Dp + d] *= alpha;
    }
    pv_tile(w.sc.data(), w.vt.data(), w.acc.data(), rows4, cols, Dp);
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
    double sum = 0.0;
    for (int64_t s = 0; s < end; ++s) {
      sr[s] = mx == kNegInf ? 0.f : std::exp(sr[s] - mx);
      sum += sr[s];
    }
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
  const int64_t D = p.head_dim;
  // Flat work list: packed documents have different lengths, so the query
  // blocks of all of them go into one list scheduled dynamically.
  std::vector<WorkItem> work;
  for (int64_t s = 0; s < p.n_seq; ++s) {
    const int64_t start = p.cu_seqlens ? p.cu_seqlens[s] : 0;
    const int64_t len = p.cu_seqlens ? p.cu_seqlens[s + 1] - start : p.seq_len;
    for (int64_t h = 0; h < p.n_heads; ++h)
      for (int64_t m0 = 0; m0 < len; m0 += kQB) work.push_back({s, h, start, len, m0});
  }
  // Longest items (most keys) first.
  std::stable_sort(work.begin(), work.end(), [](const WorkItem& a, const WorkItem& b) { return a.m0 > b.m0; });
#pragma omp parallel
  {
    Scratch w(D, round_up(D, 16));
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < (int64_t)work.size(); ++i) prefill_item(p, work[i], w);
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
