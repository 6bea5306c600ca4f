// Chunk-masked attention on the CPU: float32, online softmax over key tiles,
// OpenMP over (sequence, head, query block). Tiles the chunk rule hides from a
// whole query block are skipped; tiles it cannot touch skip the per-pair test.
#include <algorithm>
#include <climits>
#include <cmath>
#include <limits>
#include <vector>

#include "common.h"

namespace worldvla {
namespace {

constexpr int64_t kQB = 32;  // query rows per work item
constexpr int64_t kKB = 64;  // keys per tile

struct WorkItem {
  int64_t seq, head, start, len, m0;
};

}  // namespace

void masked_attention_fwd_cpu(const AttnFwdParams& p) {
  const float* q = static_cast<const float*>(p.q);
  const float* k = static_cast<const float*>(p.k);
  const float* v = static_cast<const float*>(p.v);
  float* o = static_cast<float*>(p.o);
  const int64_t D = p.head_dim, H = p.n_heads, group = p.n_heads / p.n_kv_heads;
  const float NEG_INF = -std::numeric_limits<float>::infinity();

  // Flat work list: packed documents have different lengths, so the query
  // blocks of all of them go into one list scheduled dynamically.
  std::vector<WorkItem> work;
  for (int64_t s = 0; s < p.n_seq; ++s) {
    const int64_t start = p.cu_seqlens ? p.cu_seqlens[s] : 0;
    const int64_t len = p.cu_seqlens ? p.cu_seqlens[s + 1] - start : p.seq_len;
    for (int64_t h = 0; h < H; ++h)
      for (int64_t m0 = 0; m0 < len; m0 += kQB) work.push_back({s, h, start, len, m0});
  }

#pragma omp parallel
  {
    std::vector<float> qs(kQB * D), kt(D * kKB), sc(kQB * kKB), acc(kQB * D);
    std::vector<float> row_max(kQB), row_sum(kQB);
    std::vector<int32_t> ql(kQB);
#pragma omp for schedule(dynamic, 1)
    for (int64_t w = 0; w < (int64_t)work.size(); ++w) {
      const WorkItem it = work[w];
      const int64_t rows = std::min(kQB, it.len - it.m0);
      const int64_t hk = it.head / group;
      const float* qb = q + it.seq * p.q_sb + (it.start + it.m0) * p.q_st + it.head * p.q_sh;
      const float* kb = k + it.seq * p.k_sb + it.start * p.k_st + hk * p.k_sh;
      const float* vb = v + it.seq * p.v_sb + it.start * p.v_st + hk * p.v_sh;
      const int32_t* kvb = p.kv_block + it.seq * p.meta_sb + it.start;
      const int32_t* qlim = p.q_limit + it.seq * p.meta_sb + it.start;

      int32_t ql_min = INT_MAX, ql_max = INT_MIN;
      for (int64_t r = 0; r < rows; ++r) {
        for (int64_t d = 0; d < D; ++d) qs[r * D + d] = qb[r * p.q_st + d] * p.scale;
        ql[r] = qlim[it.m0 + r];
        ql_min = std::min(ql_min, ql[r]);
        ql_max = std::max(ql_max, ql[r]);
        row_max[r] = NEG_INF;
        row_sum[r] = 0.f;
      }
      std::fill(acc.begin(), acc.begin() + rows * D, 0.f);

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

        for (int64_t c = 0; c < cols; ++c) {
          const float* kr = kb + (n0 + c) * p.k_st;
          for (int64_t d = 0; d < D; ++d) kt[d * kKB + c] = kr[d];
        }
        // scores = qs @ kt, accumulated as rank-1 updates so the inner loop is
        // contiguous and vectorizes without reassociating a reduction.
        for (int64_t r = 0; r < rows; ++r) {
          float* sr = &sc[r * kKB];
          for (int64_t c = 0; c < cols; ++c) sr[c] = 0.f;
          for (int64_t d = 0; d < D; ++d) {
            const float a = qs[r * D + d];
            const float* kd = &kt[d * kKB];
            for (int64_t c = 0; c < cols; ++c) sr[c] += a * kd[c];
          }
        }
        for (int64_t r = 0; r < rows; ++r) {
          float* sr = &sc[r * kKB];
          const int64_t i = it.m0 + r;
          if (need_mask) {
            for (int64_t c = 0; c < cols; ++c) {
              const int64_t j = n0 + c;
              if (j > i || kvb[j] < ql[r]) sr[c] = NEG_INF;
            }
          }
          float mx = row_max[r];
          for (int64_t c = 0; c < cols; ++c) mx = std::max(mx, sr[c]);
          if (mx == NEG_INF) continue;  // nothing visible yet in this row
          const float alpha = std::exp(row_max[r] - mx);
          float sum = 0.f;
          for (int64_t c = 0; c < cols; ++c) {
            sr[c] = std::exp(sr[c] - mx);
            sum += sr[c];
          }
          row_sum[r] = row_sum[r] * alpha + sum;
          row_max[r] = mx;
          float* ar = &acc[r * D];
          if (alpha != 1.f)
            for (int64_t d = 0; d < D; ++d) ar[d] *= alpha;
          for (int64_t c = 0; c < cols; ++c) {
            const float pc = sr[c];
            if (pc == 0.f) continue;
            const float* vr = vb + (n0 + c) * p.v_st;
            for (int64_t d = 0; d < D; ++d) ar[d] += pc * vr[d];
          }
        }
      }

      float* ob = o + it.seq * p.o_sb + (it.start + it.m0) * p.o_st + it.head * p.o_sh;
      for (int64_t r = 0; r < rows; ++r) {
        // A row that sees no key (possible only with hand-made metadata) gives zeros.
        const float inv = row_sum[r] > 0.f ? 1.f / row_sum[r] : 0.f;
        for (int64_t d = 0; d < D; ++d) ob[r * p.o_st + d] = acc[r * D + d] * inv;
      }
    }
  }
}

void decode_attention_cpu(const DecodeParams& p) {
  const float* q = static_cast<const float*>(p.q);
  const float* k = static_cast<const float*>(p.k);
  const float* v = static_cast<const float*>(p.v);
  float* o = static_cast<float*>(p.o);
  const int64_t B = p.batch, Q = p.n_q, H = p.n_heads, D = p.head_dim, S = p.cache_len;
  const int64_t group = p.n_heads / p.n_kv_heads;
  const float NEG_INF = -std::numeric_limits<float>::infinity();

#pragma omp parallel
  {
    std::vector<float> sc(S), qs(D), acc(D);
#pragma omp for collapse(3) schedule(dynamic, 4)
    for (int64_t b = 0; b < B; ++b)
      for (int64_t i = 0; i < Q; ++i)
        for (int64_t h = 0; h < H; ++h) {
          const int64_t hk = h / group;
          const float* qr = q + b * p.q_sb + i * p.q_st + h * p.q_sh;
          const float* kb = k + b * p.k_sb + hk * p.k_sh;
          const float* vb = v + b * p.v_sb + hk * p.v_sh;
          const int32_t* kvb = p.kv_block + b * p.kvb_sb;
          const int64_t pos = p.q_pos[b * Q + i];
          const int32_t lim = p.q_limit[b * Q + i];
          const int64_t kv_len = std::min<int64_t>(std::max<int64_t>(p.kv_len[b], 0), S);
          const int64_t end = std::min<int64_t>(kv_len, pos + 1);
          for (int64_t d = 0; d < D; ++d) qs[d] = qr[d] * p.scale;

          float mx = NEG_INF;
          for (int64_t s = 0; s < end; ++s) {
            if (kvb[s] < lim) {
              sc[s] = NEG_INF;
              continue;
            }
            const float* kr = kb + s * p.k_st;
            float dot = 0.f;
#pragma omp simd reduction(+ : dot)
            for (int64_t d = 0; d < D; ++d) dot += qs[d] * kr[d];
            sc[s] = dot;
            mx = std::max(mx, dot);
          }
          std::fill(acc.begin(), acc.end(), 0.f);
          float sum = 0.f;
          if (mx != NEG_INF) {
            for (int64_t s = 0; s < end; ++s) {
              if (sc[s] == NEG_INF) continue;
              const float e = std::exp(sc[s] - mx);
              sum += e;
              const float* vr = vb + s * p.v_st;
              for (int64_t d = 0; d < D; ++d) acc[d] += e * vr[d];
            }
          }
          const float inv = sum > 0.f ? 1.f / sum : 0.f;
          float* orow = o + b * p.o_sb + i * p.o_st + h * p.o_sh;
          for (int64_t d = 0; d < D; ++d) orow[d] = acc[d] * inv;
        }
  }
}

}  // namespace worldvla
