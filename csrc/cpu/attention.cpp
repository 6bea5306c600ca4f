// Chunk-masked attention on the CPU: float32, online softmax over key tiles,
// OpenMP over (sequence, head, query block). Tiles the chunk rule hides from a
// whole query block are skipped; tiles it cannot touch skip the per-pair test.
// Q K^T and P V run as register-blocked 4 x 2W micro-kernels (W = 8 or 16 floats per
// vector, see cpu_common.h); K is transposed once per (sequence, kv head) up front.
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
constexpr int64_t kDAlign = 32;    // head dims padded to whole P V column blocks (2 W floats) at either width
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

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
// Rank-1 updates of a 4 x 2W register block (8 accumulators): no horizontal sums, no reassociation.
template <int W>
WORLDVLA_INLINE void score_tile(const float* __restrict qs, const float* __restrict kt, int64_t ldk,
                                float* __restrict sc, int64_t rows, int64_t D) {
  static_assert(kKB % (2 * W) == 0, "whole column blocks");
  using V = vec<W>;
  for (int64_t r0 = 0; r0 < rows; r0 += 4)
    for (int64_t c0 = 0; c0 < kKB; c0 += 2 * W) {
      V a0 = {}, a1 = {}, a2 = {}, a3 = {}, b0 = {}, b1 = {}, b2 = {}, b3 = {};
      const float* q0 = qs + r0 * D;
      for (int64_t d = 0; d < D; ++d) {
        const V k0 = loadv<W>(kt + d * ldk + c0), k1 = loadv<W>(kt + d * ldk + c0 + W);
        const V x0 = splatv<W>(q0[d]), x1 = splatv<W>(q0[D + d]), x2 = splatv<W>(q0[2 * D + d]),
                x3 = splatv<W>(q0[3 * D + d]);
        a0 += x0 * k0; b0 += x0 * k1;
        a1 += x1 * k0; b1 += x1 * k1;
        a2 += x2 * k0; b2 += x2 * k1;
        a3 += x3 * k0; b3 += x3 * k1;
      }
      float* s0 = sc + r0 * kKB + c0;
      storev<W>(s0, a0); storev<W>(s0 + W, b0);
      storev<W>(s0 + kKB, a1); storev<W>(s0 + kKB + W, b1);
      storev<W>(s0 + 2 * kKB, a2); storev<W>(s0 + 2 * kKB + W, b2);
      storev<W>(s0 + 3 * kKB, a3); storev<W>(s0 + 3 * kKB + W, b3);
    }
}

// acc[r][:Dp] += sum_{c < cols} p[r * ldp + c] v[c * ldv + :] for rows r < rows, Dp a multiple of 2W:
// 4 x 2W register blocks, then single rows for the last rows % 4. The tile's sum is formed on its own
// and then added: shorter rounding chains than accumulating in place.
template <int W>
WORLDVLA_INLINE void pv_tile(const float* __restrict p, int64_t ldp, const float* __restrict v, int64_t ldv,
                             float* __restrict acc, int64_t rows, int64_t cols, int64_t Dp) {
  using V = vec<W>;
  const int64_t rows4 = rows / 4 * 4;
  for (int64_t r = rows4; r < rows; ++r)
    for (int64_t d0 = 0; d0 < Dp; d0 += 2 * W) {
      V a = {}, b = {};
      const float* pr = p + r * ldp;
      for (int64_t c = 0; c < cols; ++c) {
        const V x = splatv<W>(pr[c]);
        a += x * loadv<W>(v + c * ldv + d0);
        b += x * loadv<W>(v + c * ldv + d0 + W);
      }
      float* o = acc + r * Dp + d0;
      storev<W>(o, loadv<W>(o) + a); storev<W>(o + W, loadv<W>(o + W) + b);
    }
  for (int64_t r0 = 0; r0 < rows4; r0 += 4)
    for (int64_t d0 = 0; d0 < Dp; d0 += 2 * W) {
      V a0 = {}, a1 = {}, a2 = {}, a3 = {}, b0 = {}, b1 = {}, b2 = {}, b3 = {};
      const float* p0 = p + r0 * ldp;
      for (int64_t c = 0; c < cols; ++c) {
        const V v0 = loadv<W>(v + c * ldv + d0), v1 = loadv<W>(v + c * ldv + d0 + W);
        const V x0 = splatv<W>(p0[c]), x1 = splatv<W>(p0[ldp + c]), x2 = splatv<W>(p0[2 * ldp + c]),
                x3 = splatv<W>(p0[3 * ldp + c]);
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

template <int W>
WORLDVLA_INLINE void prefill_item(const AttnFwdParams& p, const WorkItem& it, const KeysT& kT, Scratch& w) {
  const float* q = static_cast<const float*>(p.q);
  const float* v = static_cast<const float*>(p.v);
  float* o = static_cast<float*>(p.o);
  const int64_t D = p.head_dim, Dp = round_up(D, kDAlign), group = p.n_heads / p.n_kv_heads;
  const int64_t rows = std::min(kQB, it.len - it.m0), rows4 = round_up(rows, 4);
  const int64_t hk = it.head / group;
  const float* qb = q + it.seq * p.q_sb + (it.start + it.m0) * p.q_st + it.head * p.q_sh;
  const float* vb = v + it.seq * p.v_sb + it.start * p.v_st + hk * p.v_sh;
  const float* kt = kT.data.data() + kT.offset[it.seq * p.n_kv_heads + hk];
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

    score_tile<W>(w.qs.data(), kt + n0 * D, kKB, w.sc.data(), rows4, D);  // tile n0 / kKB
    for (int64_t r = 0; r < rows; ++r) {  // padding rows (up to rows4) are never read
      float* sr = &w.sc[r * kKB];
      const int64_t i = it.m0 + r;
      for (int64_t c = 0; c < cols; ++c) sr[c] *= p.scale;  // after the dot, as torch's reference
      if (need_mask) {
        for (int64_t c = 0; c < cols; ++c) {
          const int64_t j = n0 + c;
          if (j > i || kvb[j] < w.ql[r]) sr[c] = kNegInf;
        }
      }
      std::fill(sr + cols, sr + kKB, kNegInf);  // past the sequence: K^T's zero columns
      v8f m8 = load8(sr);
      for (int64_t c = 8; c < kKB; c += 8) {
        const v8f x = load8(sr + c);
        m8 = x > m8 ? x : m8;
      }
      float mx = w.row_max[r];
      for (int l = 0; l < 8; ++l) mx = std::max(mx, m8[l]);
      if (mx == kNegInf) {  // nothing visible yet in this row
        std::fill(sr, sr + kKB, 0.f);
        continue;
      }
      const float alpha = std::exp(w.row_max[r] - mx);
      v8f s8 = {};
      for (int64_t c = 0; c < kKB; c += 8) {
        const v8f e = exp8_nonpos(load8(sr + c) - splat8(mx));
        store8(sr + c, e);
        s8 += e;
      }
      w.row_sum[r] = w.row_sum[r] * alpha + hsum8(s8);  // the running sum across tiles in double
      w.row_max[r] = mx;
      if (alpha != 1.f)
        for (int64_t d = 0; d < Dp; ++d) w.acc[r * Dp + d] *= alpha;
    }
    // The tile's V rows are copied to one contiguous block first: read in place, each of the
    // micro-kernel's passes would jump a whole token (heads x D floats) per key.
    for (int64_t c = 0; c < cols; ++c) {
      const float* vr = vb + (n0 + c) * p.v_st;
      std::copy(vr, vr + D, &w.vt[c * Dp]);
      std::fill(&w.vt[c * Dp + D], &w.vt[(c + 1) * Dp], 0.f);
    }
    pv_tile<W>(w.sc.data(), kKB, w.vt.data(), Dp, w.acc.data(), rows, cols, Dp);
  }

  float* ob = o + it.seq * p.o_sb + (it.start + it.m0) * p.o_st + it.head * p.o_sh;
  for (int64_t r = 0; r < rows; ++r) {
    // A row that sees no key (possible only with hand-made metadata) gives zeros.
    const float inv = w.row_sum[r] > 0.0 ? static_cast<float>(1.0 / w.row_sum[r]) : 0.f;
    for (int64_t d = 0; d < D; ++d) ob[r * p.o_st + d] = w.acc[r * Dp + d] * inv;
  }
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
// Slots at or past kv_len are never read (they may hold anything). Hidden slots before it
// are read and weighted by 0, so they must hold finite values (the engine's cache starts
// zeroed), as for the Triton kernel.
template <int W>
WORLDVLA_INLINE void decode_item(const DecodeParams& p, const DecodeItem& it, DecodeScratch& w) {
  const float* q = static_cast<const float*>(p.q);
  const float* k = static_cast<const float*>(p.k) + it.b * p.k_sb;
  const float* v = static_cast<const float*>(p.v) + it.b * p.v_sb;
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

  // Scores, eight keys at a time (the last group repeats the last key; masked below).
  for (int64_t s0 = 0; s0 < end; s0 += 8) {
    const float* kr[8];
    const float* kn[8];  // the next group's rows, prefetched a head at a time
    for (int64_t j = 0; j < 8; ++j) {
      kr[j] = k + std::min(s0 + j, end - 1) * p.k_st + it.hk0 * p.k_sh;
      kn[j] = k + std::min(s0 + 8 + j, end - 1) * p.k_st + it.hk0 * p.k_sh;
    }
    for (int64_t hh = 0; hh < n_kv; ++hh) {
      const int64_t koff = hh * p.k_sh;
      for (int j = 0; j < 8; ++j)
        for (int64_t d = 0; d < D; d += 16) __builtin_prefetch(kn[j] + koff + d);
      for (int64_t r = 0; r < R; ++r) {
        const float* qr = &w.qs[(hh * R + r) * D];
        vec<W> a[8] = {};
        for (int64_t d = 0; d < DW; d += W) {
          const vec<W> x = loadv<W>(qr + d);
          for (int j = 0; j < 8; ++j) a[j] += x * loadv<W>(kr[j] + koff + d);
        }
        v8f f[8];
        for (int j = 0; j < 8; ++j) f[j] = fold8(a[j]);
        v8f sums = sum8x8(f);
        for (int64_t d = DW; d < D; ++d)
          for (int j = 0; j < 8; ++j) sums[j] += qr[d] * kr[j][koff + d];
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
        continue;
      }
      const int64_t i = r % Q;
      const int64_t lim = std::clamp<int64_t>(int64_t(qpos[i]) + 1, 0, end);  // causal and cache length
      const int32_t ql = qlim[i];
      float mx = kNegInf;
#pragma omp simd reduction(max : mx)
      for (int64_t s = 0; s < lim; ++s) {
        sr[s] = kvb[s] < ql ? kNegInf : sr[s];
        mx = std::max(mx, sr[s]);
      }
      if (mx == kNegInf) mx = 0.f;  // nothing visible: every weight is exp(-inf) = 0
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
    for (int64_t c = 0; c < cols; ++c) {
      const float* vr = v + (s0 + c) * p.v_st + it.hk0 * p.v_sh;
      if (c < next)  // fetched while this tile's P V runs
        for (int64_t x = 0; x < (n_kv - 1) * p.v_sh + D; x += 16) __builtin_prefetch(vr + kDecodeKB * p.v_st + x);
      for (int64_t hh = 0; hh < n_kv; ++hh) {
        float* dst = &w.vt[(hh * kDecodeKB + c) * Dp];
        std::copy(vr + hh * p.v_sh, vr + hh * p.v_sh + D, dst);
        std::fill(dst + D, dst + Dp, 0.f);
      }
    }
    for (int64_t hh = 0; hh < n_kv; ++hh)
      pv_tile<W>(&w.sc[hh * R * ldp + s0], ldp, &w.vt[hh * kDecodeKB * Dp], Dp, &w.acc[hh * R * Dp], R, cols, Dp);
  }

  for (int64_t hh = 0; hh < n_kv; ++hh)
    for (int64_t g = 0; g < G; ++g)
      for (int64_t i = 0; i < Q; ++i) {
        const int64_t r = hh * R + g * Q + i;
        const float inv = w.row_sum[r] > 0.0 ? static_cast<float>(1.0 / w.row_sum[r]) : 0.f;
        float* orow = o + it.b * p.o_sb + (it.i0 + i) * p.o_st + ((it.hk0 + hh) * G + g) * p.o_sh;
        for (int64_t d = 0; d < D; ++d) orow[d] = w.acc[r * Dp + d] * inv;
      }
}

// Prefill items at the two vector widths: W = 8 in the AVX2 / baseline clones, W = 16 for AVX-512.
WORLDVLA_MULTIVERSION void prefill_item_w8(const AttnFwdParams& p, const WorkItem& it, const KeysT& kT, Scratch& w) {
  prefill_item<8>(p, it, kT, w);
}
WORLDVLA_AVX512 void prefill_item_w16(const AttnFwdParams& p, const WorkItem& it, const KeysT& kT, Scratch& w) {
  prefill_item<16>(p, it, kT, w);
}
// Decode stays 8 wide everywhere: it streams the cache, and on an AVX-512 Xeon its 16-wide build
// measured 0.82-0.96x of the 8-wide one at head dim 128 (`worldvla bench cpu_ops`, native-w8).
WORLDVLA_MULTIVERSION void decode_item_w8(const DecodeParams& p, const DecodeItem& it, DecodeScratch& w) {
  decode_item<8>(p, it, w);
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
  const auto item = cpu_vector_width() == 16 ? prefill_item_w16 : prefill_item_w8;
  // Longest items (most keys) first.
  std::stable_sort(work.begin(), work.end(), [](const WorkItem& a, const WorkItem& b) { return a.m0 > b.m0; });
#pragma omp parallel
  {
#pragma omp for schedule(static)
    for (int64_t sh = 0; sh < p.n_seq * Hkv; ++sh) {
      const int64_t s = sh / Hkv, hk = sh % Hkv, len = lens[s];
      const int64_t start = p.cu_seqlens ? p.cu_seqlens[s] : 0;
      const float* kb = k + s * p.k_sb + start * p.k_st + hk * p.k_sh;
      float* dst = kT.data.data() + kT.offset[sh];
      for (int64_t j0 = 0; j0 < len; j0 += kKB, dst += D * kKB) {
        const int64_t cols = std::min(kKB, len - j0);
        for (int64_t c = 0; c < cols; ++c)
          for (int64_t d = 0; d < D; ++d) dst[d * kKB + c] = kb[(j0 + c) * p.k_st + d];
        for (int64_t d = 0; d < D; ++d) std::fill(dst + d * kKB + cols, dst + (d + 1) * kKB, 0.f);
      }
    }
    Scratch w(D, round_up(D, kDAlign));
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < (int64_t)work.size(); ++i) item(p, work[i], kT, w);
  }
}

void decode_attention_cpu(const DecodeParams& p) {
  int n_threads = 1;
#ifdef _OPENMP
  n_threads = omp_get_max_threads();
#endif
  // Many query rows (a prefill through the cache) go in blocks of kQB, each with only the keys its
  // rows can see; then enough head chunks per block to keep every thread busy (two items each).
  const int64_t q_blocks = (p.n_q + kQB - 1) / kQB, per_seq = p.batch * q_blocks;
  const int64_t chunks = std::min<int64_t>(p.n_kv_heads, std::max<int64_t>(1, (2 * n_threads + per_seq - 1) / per_seq));
  const int64_t per_chunk = (p.n_kv_heads + chunks - 1) / chunks;
  std::vector<DecodeItem> work;
  for (int64_t qb = q_blocks - 1; qb >= 0; --qb)  // later rows usually see more keys: they go first
    for (int64_t b = 0; b < p.batch; ++b)
      for (int64_t hk = 0; hk < p.n_kv_heads; hk += per_chunk)
        work.push_back({b, hk, std::min(hk + per_chunk, p.n_kv_heads), qb * kQB, std::min((qb + 1) * kQB, p.n_q)});
#pragma omp parallel
  {
    DecodeScratch w;
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < (int64_t)work.size(); ++i) decode_item_w8(p, work[i], w);
  }
}

}  // namespace worldvla
