// Chunk-masked attention on the CPU: float32, online softmax over key tiles,
// OpenMP over (sequence, head, query block). Tiles the chunk rule hides from a
// whole query block are skipped; tiles it cannot touch skip the per-pair test.
// Q K^T and P V run as register-blocked 4 x 2W micro-kernels (W = 8 or 16 floats per
// vector, see cpu_common.h); K is transposed once per (sequence, kv head) up front.
//
// Non-finite inputs follow the rule of worldvla/ops/attention.py: a NaN or an infinity in a query, or in
// the key or value of a key it sees, makes the query's output row NaN; hidden keys never reach it. A visible
// score that is not finite turns into NaN (nan_if_infinite), which exp and the sums carry to the row
// (expv_nonpos, inv_row_sum); hidden scores are -inf whatever they were. Values: a hidden key's weight is 0,
// and 0 * NaN would still reach the row in P V. A NaN or an infinity in any value row read makes the P V
// accumulators non-finite, so they are checked at the end (a few rows of D floats), and only then is the
// work done again with every value row checked as it is copied (kChecked): zeroed, and NaN for the rows
// that see it (poison_nonfinite_values). Checking every copy cost decode about 5%.
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
constexpr int64_t kDecodeKB = 16;  // keys per P V tile of decode (its V copy stays in L2)
// Decode calls with more query rows per sequence than this take the prefill's tiled kernel. Below
// it, a row's result depends only on that row and the cache (parallel chunk decoding relies on it).
constexpr int64_t kDecodeTiledRows = 32;
constexpr int64_t kDAlign = 32;    // head dims padded to whole P V column blocks (2 W floats) at either width
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// dst[0, D) = src[0, D), dst[D, Dp) = 0: one K or V row into a padded tile. Vector copies inline into
// the kernels; std::copy of a row this short was a memmove call per key (6-13% of their time).
// A bfloat16 row (a bfloat16 cache's) is widened on the way. With kCheck it returns 0 when the row is
// finite, else non-zero bits (x - x is +0 for a finite x, NaN otherwise: their bits OR-ed); without, 0.
template <bool AVX = false, bool kCheck = false, typename T>
WORLDVLA_INLINE uint32_t copy_row_padded(float* __restrict dst, const T* __restrict src, int64_t D, int64_t Dp) {
  int64_t d = 0;
  v8i bad = {};
  for (; d + 8 <= D; d += 8) {
    const v8f x = loadw<8, AVX>(src + d);
    store8(dst + d, x);
    if constexpr (kCheck) {
      v8i b;
      const v8f z = x - x;
      __builtin_memcpy(&b, &z, sizeof(b));
      bad |= b;
    }
  }
  uint32_t any = 0;
  for (int l = 0; l < 8; ++l) any |= uint32_t(bad[l]);
  for (; d < D; ++d) {
    dst[d] = widen(src[d]);
    if constexpr (kCheck) any |= dst[d] - dst[d] != 0.f;
  }
  for (; d < Dp; ++d) dst[d] = 0.f;
  return any;
}

// Whether n floats (P V accumulators) are all finite.
WORLDVLA_INLINE bool all_finite(const float* x, int64_t n) {
  v8i bad = {};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const v8f a = load8(x + i);
    const v8f z = a - a;
    v8i b;
    __builtin_memcpy(&b, &z, sizeof(b));
    bad |= b;
  }
  bool ok = true;
  for (int l = 0; l < 8; ++l) ok &= bad[l] == 0;
  for (; i < n; ++i) ok &= x[i] - x[i] == 0.f;
  return ok;
}

// A tile's value rows after copy_row_padded reported a non-finite one (any != 0): each such row (keys
// [0, cols), row c at vt + c * Dp) is zeroed, so that the rows that may not see it multiply its weight 0 by 0,
// and every query row that may see it (`sees(r, c)`, rows [0, rows)) gets a NaN softmax sum, which makes
// its output row NaN. Rare; kept out of the kernels' loops.
template <typename Sees>
void poison_nonfinite_values(float* vt, int64_t cols, int64_t D, int64_t Dp, int64_t rows, double* row_sum,
                             const Sees& sees) {
  for (int64_t c = 0; c < cols; ++c) {
    float* x = vt + c * Dp;
    bool finite = true;
    for (int64_t d = 0; d < D; ++d) finite &= x[d] - x[d] == 0.f;
    if (finite) continue;
    std::fill(x, x + D, 0.f);
    for (int64_t r = 0; r < rows; ++r)
      if (sees(r, c)) row_sum[r] = std::numeric_limits<double>::quiet_NaN();
  }
}

struct WorkItem {
  int64_t seq, head, start, len, m0;
};

struct Scratch {
  std::vector<float> qs, vt, sc, acc, row_max;
  std::vector<double> row_sum;  // softmax denominators: a long sequential sum, kept in double
  std::vector<int32_t> ql, pos;
  Scratch(int64_t D, int64_t Dp)
      : qs(kQB * D), vt(kKB * Dp), sc(kQB * kKB), acc(kQB * Dp), row_max(kQB), row_sum(kQB), ql(kQB), pos(kQB) {}
};

// Head-dim block of the scores: each score is summed over kScoreDB dims at a time in registers, and the
// blocks' partial sums are added in sc. One chain over a whole head dim of 256 or more rounded about twice
// as much as torch's fp32 matmul; head dims up to kScoreDB take one block, the one chain they always had.
constexpr int64_t kScoreDB = 128;

// sc[r][c] = sum_d qs[r][d] kt[d * ldk + c] for rows r < rows (a multiple of 4), all kKB columns.
// Rank-1 updates of a 4 x 2W register block (8 accumulators): no horizontal sums, no reassociation
// within a head-dim block (kScoreDB).
template <int W, bool MB>
WORLDVLA_INLINE void score_tile(const float* __restrict qs, const float* __restrict kt, int64_t ldk,
                                float* __restrict sc, int64_t rows, int64_t D) {
  static_assert(kKB % (2 * W) == 0, "whole column blocks");
  using V = vec<W>;
  if constexpr (W == 16 && kKB == 4 * W) {
    // AVX-512 (32 registers): 4 rows x the whole 64-key tile, 16 accumulators, 8 loads per 16 FMAs (the
    // 4 x 2W block below needs 6 per 8): 1.2x the 4 x 2W block's rate alone in L1, the same sums.
    for (int64_t r0 = 0; r0 < rows; r0 += 4) {
      const float* q0 = qs + r0 * D;
      for (int64_t d0 = 0; d0 < D; d0 += kScoreDB) {
        const int64_t d1 = std::min(D, d0 + kScoreDB);
        V a[4][4] = {};
        for (int64_t d = d0; d < d1; ++d) {
          V k[4];
          for (int j = 0; j < 4; ++j) k[j] = loadv<W>(kt + d * ldk + j * W);
          for (int i = 0; i < 4; ++i) {
            const V x = bcastv<W, MB>(q0 + i * D + d);
            for (int j = 0; j < 4; ++j) a[i][j] += x * k[j];
          }
        }
        for (int i = 0; i < 4; ++i)
          for (int j = 0; j < 4; ++j) {
            float* s = sc + (r0 + i) * kKB + j * W;
            storev<W>(s, d0 ? loadv<W>(s) + a[i][j] : a[i][j]);
          }
      }
    }
    return;
  }
  for (int64_t r0 = 0; r0 < rows; r0 += 4)
    for (int64_t c0 = 0; c0 < kKB; c0 += 2 * W) {
      const float* q0 = qs + r0 * D;
      float* s0 = sc + r0 * kKB + c0;
      for (int64_t d0 = 0; d0 < D; d0 += kScoreDB) {
        const int64_t d1 = std::min(D, d0 + kScoreDB);
        V a0 = {}, a1 = {}, a2 = {}, a3 = {}, b0 = {}, b1 = {}, b2 = {}, b3 = {};
        for (int64_t d = d0; d < d1; ++d) {
          const V k0 = loadv<W>(kt + d * ldk + c0), k1 = loadv<W>(kt + d * ldk + c0 + W);
          const V x0 = bcastv<W, MB>(q0 + d), x1 = bcastv<W, MB>(q0 + D + d), x2 = bcastv<W, MB>(q0 + 2 * D + d),
                  x3 = bcastv<W, MB>(q0 + 3 * D + d);
          a0 += x0 * k0; b0 += x0 * k1;
          a1 += x1 * k0; b1 += x1 * k1;
          a2 += x2 * k0; b2 += x2 * k1;
          a3 += x3 * k0; b3 += x3 * k1;
        }
        if (d0) {  // a later head-dim block: added to the sums so far
          a0 += loadv<W>(s0); b0 += loadv<W>(s0 + W);
          a1 += loadv<W>(s0 + kKB); b1 += loadv<W>(s0 + kKB + W);
          a2 += loadv<W>(s0 + 2 * kKB); b2 += loadv<W>(s0 + 2 * kKB + W);
          a3 += loadv<W>(s0 + 3 * kKB); b3 += loadv<W>(s0 + 3 * kKB + W);
        }
        storev<W>(s0, a0); storev<W>(s0 + W, b0);
        storev<W>(s0 + kKB, a1); storev<W>(s0 + kKB + W, b1);
        storev<W>(s0 + 2 * kKB, a2); storev<W>(s0 + 2 * kKB + W, b2);
        storev<W>(s0 + 3 * kKB, a3); storev<W>(s0 + 3 * kKB + W, b3);
      }
    }
}

// acc[r][:Dp] += sum_{c < cols} p[r * ldp + c] v[c * ldv + :] for rows r < rows, Dp a multiple of 2W:
// 4 x 2W register blocks, then single rows for the last rows % 4. The tile's sum is formed on its own
// and then added: shorter rounding chains than accumulating in place.
template <int W, bool MB>
WORLDVLA_INLINE void pv_tile(const float* __restrict p, int64_t ldp, const float* __restrict v, int64_t ldv,
                             float* __restrict acc, int64_t rows, int64_t cols, int64_t Dp) {
  using V = vec<W>;
  const int64_t rows4 = rows / 4 * 4;
  for (int64_t r = rows4; r < rows; ++r)
    for (int64_t d0 = 0; d0 < Dp; d0 += 2 * W) {
      V a = {}, b = {};
      const float* pr = p + r * ldp;
      for (int64_t c = 0; c < cols; ++c) {
        const V x = bcastv<W, MB>(pr + c);
        a += x * loadv<W>(v + c * ldv + d0);
        b += x * loadv<W>(v + c * ldv + d0 + W);
      }
      float* o = acc + r * Dp + d0;
      storev<W>(o, loadv<W>(o) + a); storev<W>(o + W, loadv<W>(o + W) + b);
    }
  int64_t d4 = 0;  // AVX-512: columns in blocks of 4W (16 accumulators), as in score_tile
  if constexpr (W == 16) {
    for (d4 = 0; d4 + 4 * W <= Dp; d4 += 4 * W)
      for (int64_t r0 = 0; r0 < rows4; r0 += 4) {
        V a[4][4] = {};
        const float* p0 = p + r0 * ldp;
        for (int64_t c = 0; c < cols; ++c) {
          V vv[4];
          for (int j = 0; j < 4; ++j) vv[j] = loadv<W>(v + c * ldv + d4 + j * W);
          for (int i = 0; i < 4; ++i) {
            const V x = bcastv<W, MB>(p0 + i * ldp + c);
            for (int j = 0; j < 4; ++j) a[i][j] += x * vv[j];
          }
        }
        for (int i = 0; i < 4; ++i)
          for (int j = 0; j < 4; ++j) {
            float* o = acc + (r0 + i) * Dp + d4 + j * W;
            storev<W>(o, loadv<W>(o) + a[i][j]);
          }
      }
  }
  for (int64_t r0 = 0; r0 < rows4; r0 += 4)
    for (int64_t d0 = d4; d0 < Dp; d0 += 2 * W) {
      V a0 = {}, a1 = {}, a2 = {}, a3 = {}, b0 = {}, b1 = {}, b2 = {}, b3 = {};
      const float* p0 = p + r0 * ldp;
      for (int64_t c = 0; c < cols; ++c) {
        const V v0 = loadv<W>(v + c * ldv + d0), v1 = loadv<W>(v + c * ldv + d0 + W);
        const V x0 = bcastv<W, MB>(p0 + c), x1 = bcastv<W, MB>(p0 + ldp + c), x2 = bcastv<W, MB>(p0 + 2 * ldp + c),
                x3 = bcastv<W, MB>(p0 + 3 * ldp + c);
        a0 += x0 * v0; b0 += x0 * v1;
        a1 += x1 * v0; b1 += x1 * v1;
        a2 += x2 * v0; b2 += x2 * v1;
        a3 += x3 * v0; b3 += x3 * v1;
      }
      float* o0 = acc + r0 * Dp + d0;
      storev<W>(o0, loadv<W>(o0) + a0); storev<W>(o0 + W, loadv<W>(o0 + W) + b0);
      storev<W>(o0 + Dp, loadv<W>(o0 + Dp) + a1); storev<W>(o0 + Dp + W, loadv<W>(o0 + Dp + W) + b1);
      storev<W>(o0 + 2 * Dp, loadv<W>(o0 + 2 * Dp) + a2); storev<W>(o0 + 2 * Dp + W, loadv<W>(o0 + 2 * Dp + W) + b2);
      storev<W>(o0 + 3 * Dp, loadv<W>(o0 + 3 * Dp) + a3); storev<W>(o0 + 3 * Dp + W, loadv<W>(o0 + 3 * Dp + W) + b3);
    }
}

// K^T of every (sequence, kv head), tile by tile: [ceil(len / kKB)][D][kKB], zero columns after
// the sequence. A key tile is one contiguous block (D x 256 bytes) that the micro-kernel walks
// row by row; a [D][len] layout made every row of the walk a jump of the whole sequence length.
struct KeysT {
  std::vector<float> data;
  std::vector<int64_t> offset;  // per (sequence, kv head)
};

// Up to kQB query rows of one (sequence, q head) against one kv head's keys, tile by tile with an
// online softmax: the core of the prefill and of decode with many query rows (a prefill through the
// KV cache). Row r sees key j iff j < n_keys, j <= pos[r] and not kvb[j] < qlim[r].
struct RowBlock {
  const float* q;  // row r at q + r * q_st
  int64_t q_st;
  float* o;  // row r at o + r * o_st
  int64_t o_st;
  const int32_t* pos;
  const int32_t* qlim;
  int64_t rows;
  const int32_t* kvb;
  int64_t n_keys;
  const float* kt;  // K^T tiles of the keys (KeysT)
  const float* v;   // key j's V row at v + j * v_st
  int64_t v_st;
};

template <int W, bool MB, bool kChecked = false>
WORLDVLA_INLINE void tiled_rows(const RowBlock& rb, int64_t D, float scale, Scratch& w) {
  using V = vec<W>;
  using I = typename IntVecOf<W>::type;
  I iota;
  for (int l = 0; l < W; ++l) iota[l] = l;
  const int64_t Dp = round_up(D, kDAlign), rows = rb.rows, rows4 = round_up(rows, 4);
  int32_t ql_min = INT_MAX, ql_max = INT_MIN;
  int64_t pos_min = INT64_MAX, pos_max = -1;
  for (int64_t r = 0; r < rows4; ++r) {
    for (int64_t d = 0; d < D; ++d) w.qs[r * D + d] = r < rows ? rb.q[r * rb.q_st + d] : 0.f;
    w.row_max[r] = kNegInf;
    w.row_sum[r] = 0.0;
    if (r < rows) {
      w.ql[r] = rb.qlim[r];
      ql_min = std::min(ql_min, w.ql[r]);
      ql_max = std::max(ql_max, w.ql[r]);
      pos_min = std::min<int64_t>(pos_min, rb.pos[r]);
      pos_max = std::max<int64_t>(pos_max, rb.pos[r]);
    }
  }
  std::fill(w.acc.begin(), w.acc.begin() + rows4 * Dp, 0.f);

  const int64_t n_end = std::min(rb.n_keys, pos_max + 1);  // causal: keys up to the last row
  for (int64_t n0 = 0; n0 < n_end; n0 += kKB) {
    const int64_t cols = std::min(kKB, n_end - n0);
    int32_t kv_min = INT_MAX, kv_max = INT_MIN;
    for (int64_t c = 0; c < cols; ++c) {
      kv_min = std::min(kv_min, rb.kvb[n0 + c]);
      kv_max = std::max(kv_max, rb.kvb[n0 + c]);
    }
    if (kv_max < ql_min) continue;  // the chunk rule hides this whole tile
    const bool need_mask = (n0 + cols - 1 > pos_min) || (kv_min < ql_max);

    score_tile<W, MB>(w.qs.data(), rb.kt + n0 * D, kKB, w.sc.data(), rows4, D);  // tile n0 / kKB
    for (int64_t r = 0; r < rows; ++r) {  // padding rows (up to rows4) are never read
      float* sr = &w.sc[r * kKB];
      V m = splatv<W>(kNegInf);
      if (cols == kKB) {  // a whole tile: scale, the rule and the maximum in one vector pass
        const I pos = splati<W>(rb.pos[r]), ql = splati<W>(w.ql[r]);
        for (int64_t c0 = 0; c0 < kKB; c0 += W) {
          V x = nan_if_infinite<W>(loadv<W>(sr + c0) * splatv<W>(scale));  // scaled after the dot, as torch
          if (need_mask) {
            I kv;
            __builtin_memcpy(&kv, rb.kvb + n0 + c0, sizeof(kv));
            const I hide = ((iota + static_cast<int32_t>(n0 + c0)) > pos) | (kv < ql);
            x = hide ? splatv<W>(kNegInf) : x;
          }
          storev<W>(sr + c0, x);
          m = x > m ? x : m;
        }
      } else {  // the last, partial tile of the keys
        const int64_t i = rb.pos[r];
        for (int64_t c = 0; c < cols; ++c) {
          const int64_t j = n0 + c;
          sr[c] = (j > i || rb.kvb[j] < w.ql[r]) ? kNegInf : nan_if_infinite(sr[c] * scale);
        }
        std::fill(sr + cols, sr + kKB, kNegInf);  // past the keys: K^T's zero columns
        for (int64_t c0 = 0; c0 < kKB; c0 += W) {
          const V x = loadv<W>(sr + c0);
          m = x > m ? x : m;
        }
      }
      // The maximum skips NaN scores (x > m is false for them): a NaN-propagating maximum cost the 16-wide
      // prefill about 2x. A NaN score reaches the row through exp and the sum instead (expv_nonpos keeps
      // it), or, where the maximum found nothing else, through the check below.
      float mx = w.row_max[r];
      for (int l = 0; l < W; ++l) mx = std::max(mx, m[l]);
      if (mx == kNegInf) {  // nothing visible yet in this row, or only NaN scores
        bool nan = false;
        for (int64_t c = 0; c < kKB; ++c) nan |= sr[c] != sr[c];
        if (nan) w.row_sum[r] = std::numeric_limits<double>::quiet_NaN();
        std::fill(sr, sr + kKB, 0.f);
        continue;
      }
      const float alpha = std::exp(w.row_max[r] - mx);
      V sv = {};
      for (int64_t c0 = 0; c0 < kKB; c0 += W) {
        const V e = expv_nonpos<W>(loadv<W>(sr + c0) - splatv<W>(mx));
        storev<W>(sr + c0, e);
        sv += e;
      }
      w.row_sum[r] = w.row_sum[r] * alpha + hsum8(fold8(sv));  // the running sum across tiles in double
      w.row_max[r] = mx;
      if (alpha != 1.f)
        for (int64_t d = 0; d < Dp; ++d) w.acc[r * Dp + d] *= alpha;
    }
    // The tile's V rows are copied to one contiguous block first: read in place, each of the
    // micro-kernel's passes would jump a whole token (heads x D floats) per key.
    uint32_t bad = 0;
    for (int64_t c = 0; c < cols; ++c)
      bad |= copy_row_padded<false, kChecked>(&w.vt[c * Dp], rb.v + (n0 + c) * rb.v_st, D, Dp);
    if (bad)
      poison_nonfinite_values(w.vt.data(), cols, D, Dp, rows, w.row_sum.data(), [&](int64_t r, int64_t c) {
        return n0 + c <= rb.pos[r] && rb.kvb[n0 + c] >= w.ql[r];
      });
    pv_tile<W, MB>(w.sc.data(), kKB, w.vt.data(), Dp, w.acc.data(), rows, cols, Dp);
  }
  if constexpr (!kChecked)  // a non-finite value row was read (or a row is NaN anyway): again, checking values
    if (!all_finite(w.acc.data(), rows * Dp)) return tiled_rows<W, MB, true>(rb, D, scale, w);

  for (int64_t r = 0; r < rows; ++r) {
    // A row that sees no key (possible only with hand-made metadata) gives zeros, one that saw a non-finite
    // value NaN (even where its accumulators stayed finite: a non-finite value row was zeroed for P V).
    const float inv = inv_row_sum(w.row_sum[r]);
    for (int64_t d = 0; d < D; ++d) rb.o[r * rb.o_st + d] = w.acc[r * Dp + d] * inv;
  }
}

// The K^T tiles of `len` keys (key j's row at kb + j * k_st) into dst.
inline void transpose_keys(const float* kb, int64_t k_st, int64_t len, int64_t D, float* dst) {
  for (int64_t j0 = 0; j0 < len; j0 += kKB, dst += D * kKB) {
    const int64_t cols = std::min(kKB, len - j0);
    for (int64_t c = 0; c < cols; ++c)
      for (int64_t d = 0; d < D; ++d) dst[d * kKB + c] = kb[(j0 + c) * k_st + d];
    for (int64_t d = 0; d < D; ++d) std::fill(dst + d * kKB + cols, dst + (d + 1) * kKB, 0.f);
  }
}

template <int W, bool MB>
WORLDVLA_INLINE void prefill_item(const AttnFwdParams& p, const WorkItem& it, const KeysT& kT, Scratch& w) {
  const int64_t group = p.n_heads / p.n_kv_heads, hk = it.head / group;
  const int64_t rows = std::min(kQB, it.len - it.m0);
  for (int64_t r = 0; r < rows; ++r) w.pos[r] = static_cast<int32_t>(it.m0 + r);  // a prefill row's position is its index
  RowBlock rb;
  rb.q = static_cast<const float*>(p.q) + it.seq * p.q_sb + (it.start + it.m0) * p.q_st + it.head * p.q_sh;
  rb.q_st = p.q_st;
  rb.o = static_cast<float*>(p.o) + it.seq * p.o_sb + (it.start + it.m0) * p.o_st + it.head * p.o_sh;
  rb.o_st = p.o_st;
  rb.pos = w.pos.data();
  rb.qlim = p.q_limit + it.seq * p.meta_sb + it.start + it.m0;
  rb.rows = rows;
  rb.kvb = p.kv_block + it.seq * p.meta_sb + it.start;
  rb.n_keys = it.len;
  rb.kt = kT.data.data() + kT.offset[it.seq * p.n_kv_heads + hk];
  rb.v = static_cast<const float*>(p.v) + it.seq * p.v_sb + it.start * p.v_st + hk * p.v_sh;
  rb.v_st = p.v_st;
  tiled_rows<W, MB>(rb, p.head_dim, p.scale, w);
}

struct DecodeItem {
  int64_t b, hk0, hk1, i0, i1;  // sequence, kv heads [hk0, hk1), query rows [i0, i1)
};

struct DecodeScratch {
  std::vector<float> qs, sc, acc, vt;
  std::vector<double> row_sum;
};

// Query rows [i0, i1) of kv heads [hk0, hk1) of one sequence; the R = G * Q rows (Q = i1 - i0)
// that share a kv head are one group. Keys are visited in order with the heads inner, so a
// thread streams contiguous [heads, D] blocks of the cache.
//   scores:  eight keys at a time, eight vector accumulators per row, one transposing
//            reduction (sum8x8) for the eight sums; the next eight keys are prefetched;
//   softmax: whole rows (a row's scores are at most the cache length);
//   P V:     the prefill's register-blocked tile over kDecodeKB keys.
// Slots at or past kv_len are never read (they may hold anything). Hidden slots before it are
// read: their scores become -inf, and a NaN or an infinity in their values, which their weight 0
// would carry into P V, sends the item through again with the values checked (kChecked; the Triton
// kernel lets it through). The cache holds KV = float or bfloat16 (bf16_t) values, the
// latter widened exactly as they are read; q and o are float32 either way.
template <int W, bool MB, typename KV, bool kChecked = false>
WORLDVLA_INLINE void decode_item(const DecodeParams& p, const DecodeItem& it, DecodeScratch& w) {
  const float* q = static_cast<const float*>(p.q);
  const KV* k = static_cast<const KV*>(p.k) + it.b * p.k_sb;
  const KV* v = static_cast<const KV*>(p.v) + it.b * p.v_sb;
  float* o = static_cast<float*>(p.o);
  const int64_t Q = it.i1 - it.i0, D = p.head_dim, S = p.cache_len, G = p.n_heads / p.n_kv_heads;
  const int64_t DW = D / W * W, Dp = round_up(D, kDAlign), R = G * Q;
  const int64_t n_kv = it.hk1 - it.hk0, n_rows = n_kv * R;
  const int64_t kv_len = std::min<int64_t>(std::max<int64_t>(p.kv_len[it.b], 0), S);
  const int32_t* kvb = p.kv_block + it.b * p.kvb_sb;
  const int32_t* qpos = p.q_pos + it.b * p.n_q + it.i0;
  const int32_t* qlim = p.q_limit + it.b * p.n_q + it.i0;

  // Keys [0, end) are the union of what the rows can see.
  int64_t end = 0;
  for (int64_t i = 0; i < Q; ++i) end = std::max<int64_t>(end, std::min<int64_t>(kv_len, int64_t(qpos[i]) + 1));
  const int64_t ldp = round_up(std::max<int64_t>(end, 1), 8);
  w.sc.resize(n_rows * ldp);
  w.qs.resize(n_rows * D);  // every row is copied in below
  w.acc.assign(n_rows * Dp, 0.f);
  w.row_sum.resize(n_rows);  // every row is written by the softmax
  // Row (hh * R + g * Q + i) holds query i of head (hk0 + hh) * G + g.
  for (int64_t hh = 0; hh < n_kv; ++hh)
    for (int64_t g = 0; g < G; ++g)
      for (int64_t i = 0; i < Q; ++i) {
        const float* qr = q + it.b * p.q_sb + (it.i0 + i) * p.q_st + ((it.hk0 + hh) * G + g) * p.q_sh;
        std::copy(qr, qr + D, &w.qs[(hh * R + g * Q + i) * D]);
      }

  // Scores, eight keys at a time (the last group repeats the last key; masked below). The head dim's
  // tail past the vectors is an explicit fused multiply-add: left to contraction, GCC fused it for float
  // keys but not for widened bfloat16 ones on aarch64, and the two caches' results differed there.
  for (int64_t s0 = 0; s0 < end; s0 += 8) {
    const KV* kr[8];
    const KV* kn[8];  // the next group's rows, prefetched a head at a time
    for (int64_t j = 0; j < 8; ++j) {
      kr[j] = k + std::min(s0 + j, end - 1) * p.k_st + it.hk0 * p.k_sh;
      kn[j] = k + std::min(s0 + 8 + j, end - 1) * p.k_st + it.hk0 * p.k_sh;
    }
    for (int64_t hh = 0; hh < n_kv; ++hh) {
      const int64_t koff = hh * p.k_sh;
      for (int j = 0; j < 8; ++j)
        for (int64_t d = 0; d < D; d += 64 / sizeof(KV)) __builtin_prefetch(kn[j] + koff + d);
      for (int64_t r = 0; r < R; ++r) {
        const float* qr = &w.qs[(hh * R + r) * D];
        vec<W> a[8] = {};
        for (int64_t d = 0; d < DW; d += W) {
          const vec<W> x = loadv<W>(qr + d);
          for (int j = 0; j < 8; ++j) a[j] += x * loadw<W, MB>(kr[j] + koff + d);
        }
        v8f f[8];
        for (int j = 0; j < 8; ++j) f[j] = fold8(a[j]);
        v8f sums = sum8x8(f);
        for (int64_t d = DW; d < D; ++d)
          for (int j = 0; j < 8; ++j) sums[j] = __builtin_fmaf(qr[d], widen(kr[j][koff + d]), sums[j]);
        store8(&w.sc[(hh * R + r) * ldp + s0], sums * splat8(p.scale));  // scaled after the dot, as torch
      }
    }
  }

  // Mask and softmax, one row at a time; keys past a row's last visible one get weight 0.
  for (int64_t hh = 0; hh < n_kv; ++hh)
    for (int64_t r = 0; r < R; ++r) {
      float* sr = &w.sc[(hh * R + r) * ldp];
      if (end == 0) {
        std::fill(sr, sr + ldp, 0.f);
        w.row_sum[hh * R + r] = 0.0;  // (the scratch holds an earlier item's sums, NaN among them maybe)
        continue;
      }
      const int64_t i = r % Q;
      const int64_t lim = std::clamp<int64_t>(int64_t(qpos[i]) + 1, 0, end);  // causal and cache length
      const int32_t ql = qlim[i];
      // The chunk rule and the row maximum, eight keys at a time (written out: GCC leaves the
      // conditional store of the plain loop scalar, a branch per key).
      const v8f ninf = splat8(kNegInf);
      const v8i qlv = v8i{} + ql;
      v8f vmx = ninf;
      int64_t s = 0;
      for (; s + 8 <= lim; s += 8) {
        v8i kb;
        __builtin_memcpy(&kb, kvb + s, sizeof(kb));
        const v8f x = kb < qlv ? ninf : nan_if_infinite<8>(load8(sr + s));
        store8(sr + s, x);
        vmx = vmx < x ? x : vmx;
      }
      float mx = kNegInf;
      for (int j = 0; j < 8; ++j) mx = std::max(mx, vmx[j]);
      for (; s < lim; ++s) {
        sr[s] = kvb[s] < ql ? kNegInf : nan_if_infinite(sr[s]);
        mx = std::max(mx, sr[s]);
      }
      // The maximum skips NaN scores; exp keeps them NaN (expv_nonpos), and so does the sum.
      if (mx == kNegInf) mx = 0.f;  // nothing visible (or only NaN): every other weight is exp(-inf) = 0
      std::fill(sr + lim, sr + ldp, kNegInf);
      for (int64_t s = 0; s < ldp; s += 8) store8(sr + s, exp8_nonpos(load8(sr + s) - splat8(mx)));
      double sum = 0.0;  // a long sum: double, in vector lanes
#pragma omp simd reduction(+ : sum)
      for (int64_t s = 0; s < lim; ++s) sum += sr[s];
      w.row_sum[hh * R + r] = sum;
    }

  // P V, kDecodeKB keys at a time. The tile's V rows of all the item's heads are first copied in
  // cache order ([key][head][D], contiguous) into [head][key][Dp], and the next tile's rows are
  // prefetched meanwhile: reading one head's rows in place jumps a whole cache row (heads x D
  // floats) per key, a new page every few keys, which the hardware prefetcher does not follow.
  w.vt.resize(n_kv * kDecodeKB * Dp);
  for (int64_t s0 = 0; s0 < end; s0 += kDecodeKB) {
    const int64_t cols = std::min(kDecodeKB, end - s0);
    const int64_t next = std::min(kDecodeKB, end - s0 - kDecodeKB);  // rows of the next tile
    uint32_t bad = 0;
    for (int64_t c = 0; c < cols; ++c) {
      const KV* vr = v + (s0 + c) * p.v_st + it.hk0 * p.v_sh;
      if (c < next)  // fetched while this tile's P V runs
        for (int64_t x = 0; x < (n_kv - 1) * p.v_sh + D; x += 64 / sizeof(KV))
          __builtin_prefetch(vr + kDecodeKB * p.v_st + x);
      for (int64_t hh = 0; hh < n_kv; ++hh)
        bad |= copy_row_padded<MB, kChecked>(&w.vt[(hh * kDecodeKB + c) * Dp], vr + hh * p.v_sh, D, Dp);
    }
    if (bad)  // row r of head hh sees key s0 + c: before its causal limit and not hidden by the chunk rule
      for (int64_t hh = 0; hh < n_kv; ++hh)
        poison_nonfinite_values(&w.vt[hh * kDecodeKB * Dp], cols, D, Dp, R, &w.row_sum[hh * R],
                                [&](int64_t r, int64_t c) {
                                  const int64_t i = r % Q, j = s0 + c;
                                  return j <= int64_t(qpos[i]) && kvb[j] >= qlim[i];
                                });
    for (int64_t hh = 0; hh < n_kv; ++hh)
      pv_tile<W, MB>(&w.sc[hh * R * ldp + s0], ldp, &w.vt[hh * kDecodeKB * Dp], Dp, &w.acc[hh * R * Dp], R, cols, Dp);
  }
  if constexpr (!kChecked)  // a non-finite value row was read (or a row is NaN anyway): again, checking values
    if (!all_finite(w.acc.data(), n_rows * Dp)) return decode_item<W, MB, KV, true>(p, it, w);

  for (int64_t hh = 0; hh < n_kv; ++hh)
    for (int64_t g = 0; g < G; ++g)
      for (int64_t i = 0; i < Q; ++i) {
        const int64_t r = hh * R + g * Q + i;
        const float inv = inv_row_sum(w.row_sum[r]);  // 0: no key seen; NaN: a non-finite value seen
        float* orow = o + it.b * p.o_sb + (it.i0 + i) * p.o_st + ((it.hk0 + hh) * G + g) * p.o_sh;
        for (int64_t d = 0; d < D; ++d) orow[d] = w.acc[r * Dp + d] * inv;
      }
}

// The kernels at the two vector widths: W = 16 for AVX-512; W = 8 for AVX2 + FMA (x86-64-v3), and
// W = 8 in a multiversioned build (an x86-64-v3 clone and the baseline) for CPUs without AVX2.
WORLDVLA_MULTIVERSION void prefill_item_w8(const AttnFwdParams& p, const WorkItem& it, const KeysT& kT, Scratch& w) {
  prefill_item<8, false>(p, it, kT, w);
}
WORLDVLA_AVX2 void prefill_item_avx2(const AttnFwdParams& p, const WorkItem& it, const KeysT& kT, Scratch& w) {
  prefill_item<8, true>(p, it, kT, w);
}
WORLDVLA_AVX512 void prefill_item_w16(const AttnFwdParams& p, const WorkItem& it, const KeysT& kT, Scratch& w) {
  prefill_item<16, true>(p, it, kT, w);
}
WORLDVLA_MULTIVERSION void tiled_rows_w8(const RowBlock& rb, int64_t D, float scale, Scratch& w) {
  tiled_rows<8, false>(rb, D, scale, w);
}
WORLDVLA_AVX2 void tiled_rows_avx2(const RowBlock& rb, int64_t D, float scale, Scratch& w) {
  tiled_rows<8, true>(rb, D, scale, w);
}
WORLDVLA_AVX512 void tiled_rows_w16(const RowBlock& rb, int64_t D, float scale, Scratch& w) {
  tiled_rows<16, true>(rb, D, scale, w);
}
// Decode stays 8 wide everywhere: it streams the cache, and on an AVX-512 Xeon its 16-wide build
// measured 0.82-0.96x of the 8-wide one at head dim 128 (`worldvla bench cpu_ops`, native-w8).
WORLDVLA_MULTIVERSION void decode_item_w8(const DecodeParams& p, const DecodeItem& it, DecodeScratch& w) {
  decode_item<8, false, float>(p, it, w);
}
WORLDVLA_AVX2 void decode_item_avx2(const DecodeParams& p, const DecodeItem& it, DecodeScratch& w) {
  decode_item<8, true, float>(p, it, w);
}
WORLDVLA_MULTIVERSION void decode_item_bf16_w8(const DecodeParams& p, const DecodeItem& it, DecodeScratch& w) {
  decode_item<8, false, bf16_t>(p, it, w);
}
WORLDVLA_AVX2 void decode_item_bf16_avx2(const DecodeParams& p, const DecodeItem& it, DecodeScratch& w) {
  decode_item<8, true, bf16_t>(p, it, w);
}

// The build for this CPU and the chosen width (cpu_vector_width).
template <class F>
F pick(F w8, F avx2, F w16) {
  if (cpu_vector_width() == 16) return w16;
  return cpu_has_avx2() ? avx2 : w8;
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
  std::vector<int64_t> lens(p.n_seq);
  int64_t total = 0;
  for (int64_t s = 0; s < p.n_seq; ++s) {
    const int64_t start = p.cu_seqlens ? p.cu_seqlens[s] : 0;
    const int64_t len = p.cu_seqlens ? p.cu_seqlens[s + 1] - start : p.seq_len;
    for (int64_t h = 0; h < p.n_heads; ++h)
      for (int64_t m0 = 0; m0 < len; m0 += kQB) work.push_back({s, h, start, len, m0});
    lens[s] = len;
    for (int64_t hk = 0; hk < Hkv; ++hk, total += D * round_up(len, kKB)) kT.offset[s * Hkv + hk] = total;
  }
  kT.data.resize(total);
  const auto item = pick(prefill_item_w8, prefill_item_avx2, prefill_item_w16);
  // Longest items (most keys) first.
  std::stable_sort(work.begin(), work.end(), [](const WorkItem& a, const WorkItem& b) { return a.m0 > b.m0; });
#pragma omp parallel
  {
#pragma omp for schedule(static)
    for (int64_t sh = 0; sh < p.n_seq * Hkv; ++sh) {
      const int64_t s = sh / Hkv, hk = sh % Hkv, len = lens[s];
      const int64_t start = p.cu_seqlens ? p.cu_seqlens[s] : 0;
      transpose_keys(k + s * p.k_sb + start * p.k_st + hk * p.k_sh, p.k_st, len, D, kT.data.data() + kT.offset[sh]);
    }
    Scratch w(D, round_up(D, kDAlign));
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < (int64_t)work.size(); ++i) item(p, work[i], kT, w);
  }
}

// Many query rows per sequence (the engine's prefill through the cache): the prefill's tiled core,
// rows in blocks of kQB per (sequence, q head) against K^T of the keys the rows can see.
static void decode_many_rows_cpu(const DecodeParams& p) {
  const int64_t D = p.head_dim, Hkv = p.n_kv_heads, G = p.n_heads / Hkv;
  std::vector<int64_t> n_keys(p.batch);
  KeysT kT;
  kT.offset.resize(p.batch * Hkv);
  int64_t total = 0;
  for (int64_t b = 0; b < p.batch; ++b) {
    int64_t last = -1;
    for (int64_t i = 0; i < p.n_q; ++i) last = std::max<int64_t>(last, p.q_pos[b * p.n_q + i]);
    n_keys[b] = std::clamp<int64_t>(last + 1, 0, std::clamp<int64_t>(p.kv_len[b], 0, p.cache_len));
    for (int64_t hk = 0; hk < Hkv; ++hk, total += D * round_up(n_keys[b], kKB)) kT.offset[b * Hkv + hk] = total;
  }
  kT.data.resize(total);
  std::vector<WorkItem> work;  // seq = b, head = q head, m0 = first row
  for (int64_t m0 = (p.n_q - 1) / kQB * kQB; m0 >= 0; m0 -= kQB)  // later rows usually see more keys: first
    for (int64_t b = 0; b < p.batch; ++b)
      for (int64_t h = 0; h < p.n_heads; ++h) work.push_back({b, h, 0, p.n_q, m0});
  const auto item = pick(tiled_rows_w8, tiled_rows_avx2, tiled_rows_w16);
#pragma omp parallel
  {
#pragma omp for schedule(static)
    for (int64_t bh = 0; bh < p.batch * Hkv; ++bh) {
      const int64_t b = bh / Hkv, hk = bh % Hkv;
      transpose_keys(static_cast<const float*>(p.k) + b * p.k_sb + hk * p.k_sh, p.k_st, n_keys[b], D,
                     kT.data.data() + kT.offset[bh]);
    }
    Scratch w(D, round_up(D, kDAlign));
#pragma omp for schedule(dynamic, 1)
    for (int64_t x = 0; x < (int64_t)work.size(); ++x) {
      const WorkItem& it = work[x];
      const int64_t b = it.seq, h = it.head, hk = h / G;
      RowBlock rb;
      rb.q = static_cast<const float*>(p.q) + b * p.q_sb + it.m0 * p.q_st + h * p.q_sh;
      rb.q_st = p.q_st;
      rb.o = static_cast<float*>(p.o) + b * p.o_sb + it.m0 * p.o_st + h * p.o_sh;
      rb.o_st = p.o_st;
      rb.pos = p.q_pos + b * p.n_q + it.m0;
      rb.qlim = p.q_limit + b * p.n_q + it.m0;
      rb.rows = std::min(kQB, p.n_q - it.m0);
      rb.kvb = p.kv_block + b * p.kvb_sb;
      rb.n_keys = n_keys[b];
      rb.kt = kT.data.data() + kT.offset[b * Hkv + hk];
      rb.v = static_cast<const float*>(p.v) + b * p.v_sb + hk * p.v_sh;
      rb.v_st = p.v_st;
      item(rb, D, p.scale, w);
    }
  }
}

void decode_attention_cpu(const DecodeParams& p) {
  if (p.dtype != kFloat32 && p.dtype != kBFloat16)
    throw std::invalid_argument("decode_attention: the CPU path takes a float32 or bfloat16 cache");
  if (p.batch == 0 || p.n_q == 0) return;  // nothing to compute (and no work items to divide among)
  if (p.n_q > kDecodeTiledRows) {
    if (p.dtype != kFloat32)
      throw std::invalid_argument("decode_attention: a bfloat16 cache takes at most " +
                                  std::to_string(kDecodeTiledRows) + " query rows per sequence on the CPU");
    return decode_many_rows_cpu(p);
  }
  int n_threads = 1;
#ifdef _OPENMP
  n_threads = omp_get_max_threads();
#endif
  // Many query rows (a prefill through the cache) go in blocks of kQB, each with only the keys its
  // rows can see; then enough head chunks per block to keep every thread busy (two items each).
  const int64_t q_blocks = (p.n_q + kQB - 1) / kQB, per_seq = p.batch * q_blocks;
  int64_t chunks = std::min<int64_t>(p.n_kv_heads, std::max<int64_t>(1, (2 * n_threads + per_seq - 1) / per_seq));
  // At least two kv heads per item where every thread still gets an item: one head's keys are a
  // quarter of each cache row for the small config (256 of 1,024 B), which streams worse; two heads
  // per item ran 1.07-1.17x there on two threads with K and V in cache (about even out of cache),
  // the same results (each head is computed alike).
  if (p.n_kv_heads < 2 * chunks)
    chunks = std::max<int64_t>(std::min<int64_t>(chunks, (n_threads + per_seq - 1) / per_seq), (p.n_kv_heads + 1) / 2);
  const int64_t per_chunk = (p.n_kv_heads + chunks - 1) / chunks;
  std::vector<DecodeItem> work;
  for (int64_t qb = q_blocks - 1; qb >= 0; --qb)  // later rows usually see more keys: they go first
    for (int64_t b = 0; b < p.batch; ++b)
      for (int64_t hk = 0; hk < p.n_kv_heads; hk += per_chunk)
        work.push_back({b, hk, std::min(hk + per_chunk, p.n_kv_heads), qb * kQB, std::min((qb + 1) * kQB, p.n_q)});
  const bool bf16 = p.dtype == kBFloat16;
  const auto item = cpu_has_avx2() ? (bf16 ? decode_item_bf16_avx2 : decode_item_avx2)
                                   : (bf16 ? decode_item_bf16_w8 : decode_item_w8);
#pragma omp parallel
  {
    DecodeScratch w;
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < (int64_t)work.size(); ++i) item(p, work[i], w);
  }
}

}  // namespace worldvla
