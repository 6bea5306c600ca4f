// Chunk-masked attention on the GPU.
//
// Prefill: one CTA of 4 warps per (64 query rows, head, sequence); each warp owns
// 16 rows and runs Q K^T and P V on tensor cores with fp32 accumulation and an
// online softmax over 64-key tiles. Two matrix engines share the kernel: mma.sync
// m16n8k16 per warp (sm_80 and newer; K and V fragments loaded with ldmatrix, V's
// transposed), and on Hopper (sm_90a) wgmma m64nNk16 over the warpgroup (Q and P
// from registers, K and V read by the tensor cores from shared memory in the
// no-swizzle core-matrix layout; see wgmma.cuh). K and V tiles arrive by cp.async, pipelined:
// a tile's V loads during its Q K^T, the next visible tile's K during its P V.
// A key tile the chunk rule hides from every row of the CTA (max kv_block < min
// q_limit) is skipped without being loaded; a tile below the diagonal that the
// rule cannot touch (min kv_block >= max q_limit) skips the per-pair test.
//
// Decode: split-KV. CTAs of (key split, kv head x row group, batch) each run
// up to 16 rows (query x grouped q head: one m16 tensor-core tile) against one
// split of the cache, the four warps taking 16 keys each of every 64-key tile
// (K and V by cp.async, pipelined as in the prefill) and merging their softmax
// states at the end; each CTA writes a normalized partial output and its
// log-sum-exp, and a combine kernel merges the splits. The number of splits
// depends on shapes only, so a captured CUDA graph stays valid while kv_len and
// q_pos change on the device.
#include <climits>

#include <atomic>
#include <cstring>

#include "cuda_common.cuh"
#include "wgmma.cuh"

namespace worldvla {
namespace {

constexpr int kBM = 64;        // query rows per prefill CTA (16 per warp)
constexpr int kBN = 64;        // keys per prefill tile
constexpr int kThreads = 128;  // 4 warps

// One tile of ROWS rows of K or V (rows `first`.. of `src`, `row_stride` elements apart) into
// shared memory rows of `LD` elements by cp.async, as one commit group; rows at or past
// `end` are zero-filled and not read.
template <int ROWS, int D, int LD, int THREADS = kThreads, typename T>
__device__ __forceinline__ void load_tile_async(uint16_t* dst, const T* src, int64_t row_stride, int first,
                                                int end) {
  constexpr int CPR = D / 8;  // 16-byte chunks per row
  for (int c = threadIdx.x; c < ROWS * CPR; c += THREADS) {
    const int row = c / CPR, col = (c % CPR) * 8, j = first + row;
    cp_async_16(&dst[row * LD + col], src + static_cast<int64_t>(j < end ? j : 0) * row_stride + col, j < end);
  }
  cp_async_commit();
}

// The same tile in the wgmma layout: 8x8 core matrices (8 rows of 16 bytes, 128 contiguous
// bytes), those of rows 8i..8i+7 side by side: element (r, c) at ((r/8)*(D/8) + c/8)*64 + (r%8)*8 + c%8.
// Copy i (16 bytes) is exactly element 8i's chunk, so eight consecutive threads fill one core matrix.
template <int ROWS, int D, int THREADS, typename T>
__device__ __forceinline__ void load_tile_core_async(uint16_t* dst, const T* src, int64_t row_stride, int first,
                                                     int end) {
  constexpr int CPR = D / 8;
  for (int c = threadIdx.x; c < ROWS * CPR; c += THREADS) {
    const int r8 = c & 7, chunk = (c >> 3) % CPR, row = (c >> 3) / CPR * 8 + r8, j = first + row;
    cp_async_16(&dst[c * 8], src + static_cast<int64_t>(j < end ? j : 0) * row_stride + chunk * 8, j < end);
  }
  cp_async_commit();
}

// The score half of an online-softmax step over a tile of mma accumulators. `s` holds this
// thread's scores of its two rows (elements 0-1: row g, 2-3: row g + 8) in log2 units, -inf where
// hidden; the quad of lanes sharing a row reduces the row max. On return `s` holds
// exp2(s - new max), the running max and this thread's share of the row sums are updated, and
// `alpha` holds the factor the output accumulators still need (rescale_rows).
template <int NT>
__device__ __forceinline__ void softmax_scores(float (&s)[NT][4], float (&m_run)[2], float (&l_run)[2],
                                               float (&alpha)[2]) {
  float mx[2] = {m_run[0], m_run[1]};
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) mx[e >> 1] = fmaxf(mx[e >> 1], s[nt][e]);
  float base[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 1));
    mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 2));
    base[i] = mx[i] == -INFINITY ? 0.f : mx[i];  // a row with nothing visible yet stays at 0
    alpha[i] = fast_exp2(m_run[i] - base[i]);
    m_run[i] = mx[i];
    l_run[i] *= alpha[i];
  }
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      s[nt][e] = fast_exp2(s[nt][e] - base[e >> 1]);
      l_run[e >> 1] += s[nt][e];
    }
  }
}

// 1 / (a row's softmax sum) for its output: 0 for a row that saw no key (sum 0), NaN for one whose sum is NaN
// (it saw a non-finite score: the rule of worldvla/ops/attention.py). The running maximum (fmaxf) skips NaN
// scores; exp2 and the sums carry them to the row.
__device__ __forceinline__ float softmax_inv(float l) { return l > 0.f ? 1.f / l : l == 0.f ? 0.f : l; }

template <int DT>
__device__ __forceinline__ void rescale_rows(float (&o)[DT][4], const float (&alpha)[2]) {
#pragma unroll
  for (int dt = 0; dt < DT; ++dt) {
    o[dt][0] *= alpha[0];
    o[dt][1] *= alpha[0];
    o[dt][2] *= alpha[1];
    o[dt][3] *= alpha[1];
  }
}

// A whole online-softmax step: the scores, then the output accumulators rescaled.
template <int NT, int DT>
__device__ __forceinline__ void online_softmax_step(float (&s)[NT][4], float (&m_run)[2], float (&l_run)[2],
                                                    float (&o)[DT][4]) {
  float alpha[2];
  softmax_scores(s, m_run, l_run, alpha);
  rescale_rows(o, alpha);
}

// Both engines' P: the S accumulators of key tiles 2kk and 2kk+1 are exactly the A fragment of
// a 16x16 P block (mma.sync m16n8k16, and a warp's part of wgmma's m64n*k16).
template <typename T, int NT>
__device__ __forceinline__ void pack_p(uint32_t (&pa)[NT / 2][4], const float (&s)[NT][4]) {
#pragma unroll
  for (int kk = 0; kk < NT / 2; ++kk) {
    pa[kk][0] = pack2<T>(s[2 * kk][0], s[2 * kk][1]);
    pa[kk][1] = pack2<T>(s[2 * kk][2], s[2 * kk][3]);
    pa[kk][2] = pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]);
    pa[kk][3] = pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3]);
  }
}

// Prefill threads per CTA: 16 query rows a warp; the mma.sync engine and the one-warpgroup wgmma
// engine take 64 rows, the two-warpgroup wgmma engine 128 (both warpgroups share each K/V tile).
__host__ __device__ constexpr int prefill_rows(int warpgroups) { return warpgroups > 1 ? 64 * warpgroups : kBM; }

// kWG: 0 for the mma.sync engine, else the wgmma engine with kWG warpgroups (1 or 2).
template <typename T, int D, int kWG>
__global__ void __launch_bounds__(2 * prefill_rows(kWG)) masked_attention_fwd_kernel(const AttnFwdParams p) {
  constexpr bool kWg = kWG > 0;
  constexpr int kRows = prefill_rows(kWG);  // query rows per CTA
  constexpr int kThr = 2 * kRows;           // threads per CTA
#ifndef WORLDVLA_HAS_WGMMA
  if constexpr (kWg) {  // built for an architecture without wgmma: never launched there
    __trap();
    return;
  }
#endif
  constexpr int KS = D / 16;  // k-steps of Q K^T over the head dim
  constexpr int NT = kBN / 8; // 8-key column tiles of S
  constexpr int DT = D / 8;   // 8-wide column tiles of O
  // mma.sync: one K and one V tile, row stride LD in 16-bit elements: rows stay 16-byte aligned,
  // and the 8 rows of 16 bytes an ldmatrix phase reads fall in 8 different 16-byte bank groups.
  // wgmma: two K and two V tiles in the core-matrix layout (load_tile_core_async), in dynamic
  // shared memory (64 KB at head dim 128); its static tile arrays are placeholders.
  constexpr int LD = D + 8;
  __shared__ __align__(16) uint16_t k_s[kWg ? 8 : kBN * LD];
  __shared__ __align__(16) uint16_t v_s[kWg ? 8 : kBN * LD];
  __shared__ int32_t kvb_s[2][kBN];  // kv_block of the current and of the next visible tile
  __shared__ int32_t ql_min_s, ql_max_s;

  const int seq = blockIdx.z, head = blockIdx.y, m0 = blockIdx.x * kRows;
  // A packed document is clamped to the batch's T = p.seq_len tokens: boundaries that are not checked on
  // the device (reading them on the host would synchronize) cannot send a CTA outside the tensors.
  int64_t start = 0, end = p.seq_len;
  if (p.cu_seqlens) {
    start = min(max(static_cast<int64_t>(p.cu_seqlens[seq]), int64_t(0)), p.seq_len);
    end = min(max(static_cast<int64_t>(p.cu_seqlens[seq + 1]), start), p.seq_len);
  }
  const int len = static_cast<int>(end - start);
  if (m0 >= len) return;  // uniform over the CTA

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t4 = lane & 3;
  const int hk = head / static_cast<int>(p.n_heads / p.n_kv_heads);
  const T* qb = static_cast<const T*>(p.q) + seq * p.q_sb + start * p.q_st + head * p.q_sh;
  const T* kb = static_cast<const T*>(p.k) + seq * p.k_sb + start * p.k_st + hk * p.k_sh;
  const T* vb = static_cast<const T*>(p.v) + seq * p.v_sb + start * p.v_st + hk * p.v_sh;
  const int32_t* kvb_g = p.kv_block + seq * p.meta_sb + start;
  const int32_t* ql_g = p.q_limit + seq * p.meta_sb + start;

  if (tid == 0) {
    ql_min_s = INT_MAX;
    ql_max_s = INT_MIN;
  }
  __syncthreads();
  if (tid < kRows && m0 + tid < len) {
    const int32_t x = ql_g[m0 + tid];
    atomicMin(&ql_min_s, x);
    atomicMax(&ql_max_s, x);
  }

  // This thread's two rows and its Q fragments (registers for the whole key loop).
  const int r0 = m0 + warp * 16 + g, r1 = r0 + 8;
  const bool v0 = r0 < len, v1 = r1 < len;
  uint32_t qa[KS][4];
#pragma unroll
  for (int ks = 0; ks < KS; ++ks) {
    const int c = ks * 16 + 2 * t4;
    qa[ks][0] = v0 ? *reinterpret_cast<const uint32_t*>(qb + r0 * p.q_st + c) : 0u;
    qa[ks][1] = v1 ? *reinterpret_cast<const uint32_t*>(qb + r1 * p.q_st + c) : 0u;
    qa[ks][2] = v0 ? *reinterpret_cast<const uint32_t*>(qb + r0 * p.q_st + c + 8) : 0u;
    qa[ks][3] = v1 ? *reinterpret_cast<const uint32_t*>(qb + r1 * p.q_st + c + 8) : 0u;
  }
  const int32_t ql0 = v0 ? ql_g[r0] : INT_MIN, ql1 = v1 ? ql_g[r1] : INT_MIN;
  __syncthreads();
  const int32_t ql_min = ql_min_s, ql_max = ql_max_s;

  float o[DT][4];
#pragma unroll
  for (int dt = 0; dt < DT; ++dt) o[dt][0] = o[dt][1] = o[dt][2] = o[dt][3] = 0.f;
  float m_run[2] = {-INFINITY, -INFINITY};
  float l_run[2] = {0.f, 0.f};  // this thread's share of the row sums
  const float sl2 = p.scale * kLog2e;
  const int n_end = min(len, m0 + kRows);  // causal: no key after the CTA's last row

  // The first key tile at or after `from` that some row of the CTA may see (n_end if none): its
  // kv_block values go to kvb_s[buf]; `need_mask` tells whether the per-pair test is needed.
  // Every call that looks at a tile passes block barriers.
  auto next_visible = [&](int from, int buf, bool& need_mask) {
    for (int n0 = from; n0 < n_end; n0 += kBN) {
      const bool kin = tid < kBN && n0 + tid < n_end;
      const int32_t my_kvb = kin ? kvb_g[n0 + tid] : kNoBlock;
      if (tid < kBN) kvb_s[buf][tid] = my_kvb;
      if (__syncthreads_and(!kin || my_kvb < ql_min)) continue;  // tile hidden from every row
      need_mask = __syncthreads_or(kin && my_kvb < ql_max) || (n0 + kBN - 1 > m0);
      return n0;
    }
    return n_end;
  };
  // K or V rows past the sequence are zero-filled.
  auto load_tile = [&](uint16_t* dst, const T* src, int64_t row_stride, int n0) {
    if constexpr (kWg) load_tile_core_async<kBN, D, kThr>(dst, src, row_stride, n0, len);
    else load_tile_async<kBN, D, LD>(dst, src, row_stride, n0, len);
  };

  // Scores of a tile in log2 units, -inf where the pair is hidden (causal or chunk rule).
  auto mask_scores = [&](float (&s)[NT][4], int n0, int buf, bool need_mask) {
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float x = s[nt][e] * sl2;
        if (need_mask) {
          const int r = e < 2 ? r0 : r1;
          const int jj = nt * 8 + 2 * t4 + (e & 1);
          if (n0 + jj > r || kvb_s[buf][jj] < (e < 2 ? ql0 : ql1)) x = -INFINITY;
        }
        s[nt][e] = x;
      }
    }
  };

  if constexpr (kWg) {
    // wgmma engine. Tile j's Q K^T and tile j-1's P V are issued together; the softmax of tile j
    // runs while P V still occupies the tensor cores, and the output is rescaled once P V is done.
    // Tile j's V and tile j+1's K load during tile j (two buffers of each: a buffer is reloaded
    // only after the wgmma that read it has been waited for, before the barrier that ends a tile).
    // B operands: K^T is K-major (each key's head-dim values contiguous): Q K^T step ks starts at
    // core-matrix column 2ks, LBO = the next 8 head-dim values (128 B), SBO = the next 8 keys.
    // V is MN-major (N = head dim): P V step kk starts at core-matrix row group 2kk, LBO = the
    // next 8 keys, SBO = the next 8 head-dim values (128 B).
    constexpr int kTile = kBN * D;  // 16-bit elements per K or V tile
    WORLDVLA_DYNAMIC_SHARED(dyn);
    uint16_t* const k_buf = reinterpret_cast<uint16_t*>(dyn);  // [2][kTile]
    uint16_t* const v_buf = k_buf + 2 * kTile;                 // [2][kTile]
    auto issue_pv = [&](const uint32_t (&pa)[kBN / 16][4], const uint16_t* v) {
#pragma unroll
      for (int kk = 0; kk < kBN / 16; ++kk)
        wgmma_rs<T, D, 1>(o, pa[kk], wgmma_desc(v + kk * 2 * DT * 64, DT * 128, 128), true);
      wgmma_commit();
    };
    // Every wgmma sits on a path all threads take (ptxas serializes wgmma in branches it cannot
    // prove uniform): the first tile's P V of "the previous tile" multiplies P = 0 by a zeroed
    // V buffer, and so does the last P V when no tile is visible.
    uint32_t pa[kBN / 16][4];  // P of the previous tile, until its P V has been waited for
#pragma unroll
    for (int kk = 0; kk < kBN / 16; ++kk) pa[kk][0] = pa[kk][1] = pa[kk][2] = pa[kk][3] = 0u;
    for (int c = tid; c < kTile / 8; c += kThr)
      *reinterpret_cast<uint4*>(v_buf + kTile + c * 8) = make_uint4(0u, 0u, 0u, 0u);
    fence_proxy_async();  // ordinary stores read by the tensor cores
    bool need_mask = false;
    int n0 = next_visible(0, 0, need_mask);
    if (n0 < n_end) load_tile(k_buf, kb, p.k_st, n0);
    cp_async_wait<0>();
    fence_proxy_async();  // the landed bytes visible to the tensor cores' reads
    __syncthreads();
    int j = 0;
    for (; n0 < n_end; ++j) {
      const int b = j & 1;
      bool next_mask = false;
      const int n1 = next_visible(n0 + kBN, b ^ 1, next_mask);
      load_tile(v_buf + b * kTile, vb, p.v_st, n0);
      if (n1 < n_end) load_tile(k_buf + (b ^ 1) * kTile, kb, p.k_st, n1);
      float s[NT][4];
      wgmma_fence();
#pragma unroll
      for (int ks = 0; ks < KS; ++ks)
        wgmma_rs<T, kBN, 0>(s, qa[ks], wgmma_desc(k_buf + b * kTile + ks * 2 * 64, 128, D * 16), ks > 0);
      wgmma_commit();
      issue_pv(pa, v_buf + (b ^ 1) * kTile);
      wgmma_wait<1>();  // Q K^T (the older group) done; P V may still run
      fence_operands(s);
      mask_scores(s, n0, b, need_mask);
      float alpha[2];
      softmax_scores(s, m_run, l_run, alpha);
      wgmma_wait<0>();
      fence_operands(o);
      rescale_rows(o, alpha);
      pack_p<T>(pa, s);
      cp_async_wait<0>();  // this tile's V and the next tile's K ...
      fence_proxy_async();
      __syncthreads();     // ... landed for every thread, and every wgmma of this tile done
      n0 = n1;
      need_mask = next_mask;
    }
    wgmma_fence();  // the last tile's P V
    issue_pv(pa, v_buf + ((j - 1) & 1) * kTile);
    wgmma_wait<0>();
    fence_operands(o);
  } else {
    // mma.sync engine, software-pipelined over the visible tiles: V of a tile loads while Q K^T
    // and the softmax run, K of the next visible tile while P V runs; one K and one V buffer.
    const int mat = lane >> 3, mrow = lane & 7;
    bool need_mask = false;
    int n0 = next_visible(0, 0, need_mask);
    if (n0 < n_end) load_tile(k_s, kb, p.k_st, n0);
    for (int buf = 0; n0 < n_end; buf ^= 1) {
      load_tile(v_s, vb, p.v_st, n0);  // v_s is free: the last P V ended with a barrier
      cp_async_wait<1>();              // this thread's K copies have landed ...
      __syncthreads();                 // ... and every thread's
      float s[NT][4];
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
      // K's B fragments of two 8-key column tiles per ldmatrix: matrices (keys nt*8.., d ks*16..),
      // (same keys, d +8), (keys (nt+1)*8.., d ks*16..), (same keys, d +8).
#pragma unroll
      for (int ks = 0; ks < KS; ++ks) {
#pragma unroll
        for (int nt = 0; nt < NT; nt += 2) {
          uint32_t b[4];
          ldmatrix_x4<false>(b, &k_s[((nt + (mat >> 1)) * 8 + mrow) * LD + ks * 16 + (mat & 1) * 8]);
          mma_16816<T>(s[nt], qa[ks], b[0], b[1]);
          mma_16816<T>(s[nt + 1], qa[ks], b[2], b[3]);
        }
      }
      mask_scores(s, n0, buf, need_mask);
      online_softmax_step(s, m_run, l_run, o);

      // The next visible tile: its probe's barriers also end every warp's reads of k_s, so its K
      // can load into k_s while P V runs; then wait for this tile's V.
      bool next_mask = false;
      const int n1 = next_visible(n0 + kBN, buf ^ 1, next_mask);
      if (n1 < n_end) {
        load_tile(k_s, kb, p.k_st, n1);
        cp_async_wait<1>();
      } else {
        cp_async_wait<0>();
      }
      __syncthreads();

      // P V. V's B fragments (two keys of one column per register) come from transposing
      // ldmatrix loads of the row-major V tile: matrices (keys kk*16.., d dt*8..), (keys +8,
      // same d), (keys kk*16.., d (dt+1)*8..), (keys +8, same d).
      uint32_t pa[kBN / 16][4];
      pack_p<T>(pa, s);
#pragma unroll
      for (int kk = 0; kk < kBN / 16; ++kk) {
#pragma unroll
        for (int dt = 0; dt < DT; dt += 2) {
          uint32_t b[4];
          ldmatrix_x4<true>(b, &v_s[(kk * 16 + (mat & 1) * 8 + mrow) * LD + (dt + (mat >> 1)) * 8]);
          mma_16816<T>(o[dt], pa[kk], b[0], b[1]);
          mma_16816<T>(o[dt + 1], pa[kk], b[2], b[3]);
        }
      }
      __syncthreads();  // every warp is done with v_s
      n0 = n1;
      need_mask = next_mask;
    }
  }

  float inv[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    float l = l_run[i];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    inv[i] = softmax_inv(l);  // 0 for a row that sees no key, NaN for one that saw a NaN
  }
  T* ob = static_cast<T*>(p.o) + seq * p.o_sb + start * p.o_st + head * p.o_sh;
#pragma unroll
  for (int dt = 0; dt < DT; ++dt) {
    const int c = dt * 8 + 2 * t4;
    if (v0) *reinterpret_cast<uint32_t*>(ob + r0 * p.o_st + c) = pack2<T>(o[dt][0] * inv[0], o[dt][1] * inv[0]);
    if (v1) *reinterpret_cast<uint32_t*>(ob + r1 * p.o_st + c) = pack2<T>(o[dt][2] * inv[1], o[dt][3] * inv[1]);
  }
}

// ---------------------------------------------------------------------------- decode
// A CTA takes up to 16 rows (query x grouped head) of one kv head: one m16 tile of the tensor
// cores. Its four warps share each 64-key tile, 16 keys a warp, each with its own online
// softmax over the keys it sees; the four partial states merge at the end.
constexpr int kDecRows = 16;  // rows per CTA
constexpr int kDecTile = 64;  // keys per tile; split sizes are multiples of it
constexpr int kDecWarpKeys = kDecTile / (kThreads / 32);  // 16 keys of each tile per warp

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) decode_split_kernel(const DecodeParams p, int n_rowgroups) {
  constexpr int KS = D / 16, DT = D / 8, LD = D + 8;  // LD as in the prefill (ldmatrix, cp.async)
  // K and V tiles, reused after the key loop for the four warps' partial outputs [4][16][D] fp32.
  __shared__ __align__(16) uint16_t kv_s[2 * kDecTile * LD];
  __shared__ int32_t kvb_s[2][kDecTile];
  __shared__ float part_m[4][kDecRows], part_l[4][kDecRows];
  static_assert(4 * kDecRows * D * sizeof(float) <= sizeof(uint16_t) * 2 * kDecTile * LD, "partials fit in kv_s");
  uint16_t* const k_s = kv_s;
  uint16_t* const v_s = kv_s + kDecTile * LD;

  const int split = blockIdx.x, b = blockIdx.z;
  const int hk = blockIdx.y / n_rowgroups, rg = blockIdx.y % n_rowgroups;
  const int G = static_cast<int>(p.n_heads / p.n_kv_heads);
  const int Q = static_cast<int>(p.n_q), H = static_cast<int>(p.n_heads);
  const int R = Q * G;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t4 = lane & 3;
  const int S = static_cast<int>(p.cache_len);
  const int kv_len = min(max(p.kv_len[b], 0), S);
  const float sl2 = p.scale * kLog2e;

  // Rows r0 = g and r1 = g + 8 of the row group: query r / G, q head hk * G + r % G.
  const int r0 = rg * kDecRows + g, r1 = r0 + 8;
  const bool v0 = r0 < R, v1 = r1 < R;
  const T* qg = static_cast<const T*>(p.q) + b * p.q_sb + hk * G * p.q_sh;
  const T* q0 = qg + (r0 / G) * p.q_st + (r0 % G) * p.q_sh;
  const T* q1 = qg + (r1 / G) * p.q_st + (r1 % G) * p.q_sh;
  uint32_t qa[KS][4];
#pragma unroll
  for (int ks = 0; ks < KS; ++ks) {
    const int c = ks * 16 + 2 * t4;
    qa[ks][0] = v0 ? *reinterpret_cast<const uint32_t*>(q0 + c) : 0u;
    qa[ks][1] = v1 ? *reinterpret_cast<const uint32_t*>(q1 + c) : 0u;
    qa[ks][2] = v0 ? *reinterpret_cast<const uint32_t*>(q0 + c + 8) : 0u;
    qa[ks][3] = v1 ? *reinterpret_cast<const uint32_t*>(q1 + c + 8) : 0u;
  }
  const int pos0 = v0 ? p.q_pos[b * Q + r0 / G] : -1, pos1 = v1 ? p.q_pos[b * Q + r1 / G] : -1;
  const int32_t lim0 = v0 ? p.q_limit[b * Q + r0 / G] : INT_MAX, lim1 = v1 ? p.q_limit[b * Q + r1 / G] : INT_MAX;
  int max_pos = -1;
  int32_t ql_min = INT_MAX;
  for (int rr = 0; rr < kDecRows; ++rr) {  // over the CTA's rows: uniform
    const int r = rg * kDecRows + rr;
    if (r < R) {
      max_pos = max(max_pos, p.q_pos[b * Q + r / G]);
      ql_min = min(ql_min, p.q_limit[b * Q + r / G]);
    }
  }

  float o[DT][4];
#pragma unroll
  for (int dt = 0; dt < DT; ++dt) o[dt][0] = o[dt][1] = o[dt][2] = o[dt][3] = 0.f;
  float m_run[2] = {-INFINITY, -INFINITY};
  float l_run[2] = {0.f, 0.f};  // this thread's share of the row sums over its warp's keys

  const int s_begin = split * static_cast<int>(p.split_size);
  const int s_end = min(min(s_begin + static_cast<int>(p.split_size), kv_len), max_pos + 1);
  const T* kg = static_cast<const T*>(p.k) + b * p.k_sb + hk * p.k_sh;
  const T* vg = static_cast<const T*>(p.v) + b * p.v_sb + hk * p.v_sh;
  const int32_t* kvb_g = p.kv_block + b * p.kvb_sb;

  // The first tile at or after `from` that some row may see (s_end if none); its kv_block values
  // go to kvb_s[buf]. Every call that looks at a tile passes block barriers.
  auto next_visible = [&](int from, int buf) {
    for (int s0 = from; s0 < s_end; s0 += kDecTile) {
      const bool kin = tid < kDecTile && s0 + tid < s_end;
      const int32_t my_kvb = kin ? kvb_g[s0 + tid] : kNoBlock;
      if (tid < kDecTile) kvb_s[buf][tid] = my_kvb;
      if (__syncthreads_and(!kin || my_kvb < ql_min)) continue;  // tile hidden from every row
      return s0;
    }
    return s_end;
  };
  // Slots at or past s_end (past kv_len, or another split's) are zero-filled and never read.
  auto load_tile = [&](uint16_t* dst, const T* src, int64_t row_stride, int s0) {
    load_tile_async<kDecTile, D, LD>(dst, src, row_stride, s0, s_end);
  };

  // Pipelined as the prefill: a tile's V loads during its Q K^T, the next tile's K during its P V.
  const int mat = lane >> 3, mrow = lane & 7, wk = warp * kDecWarpKeys;  // this warp's keys in a tile
  int s0 = next_visible(s_begin, 0);
  if (s0 < s_end) load_tile(k_s, kg, p.k_st, s0);
  for (int buf = 0; s0 < s_end; buf ^= 1) {
    load_tile(v_s, vg, p.v_st, s0);
    cp_async_wait<1>();
    __syncthreads();

    float sc[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};  // S of this warp's two 8-key tiles
#pragma unroll
    for (int ks = 0; ks < KS; ++ks) {
      uint32_t kf[4];
      ldmatrix_x4<false>(kf, &k_s[(wk + (mat >> 1) * 8 + mrow) * LD + ks * 16 + (mat & 1) * 8]);
      mma_16816<T>(sc[0], qa[ks], kf[0], kf[1]);
      mma_16816<T>(sc[1], qa[ks], kf[2], kf[3]);
    }
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int jj = wk + nt * 8 + 2 * t4 + (e & 1), j = s0 + jj;
        const bool see = j < s_end && (e < 2 ? j <= pos0 && kvb_s[buf][jj] >= lim0
                                             : j <= pos1 && kvb_s[buf][jj] >= lim1);
        sc[nt][e] = see ? sc[nt][e] * sl2 : -INFINITY;
      }
    }
    online_softmax_step(sc, m_run, l_run, o);

    const int s1 = next_visible(s0 + kDecTile, buf ^ 1);  // its barriers end every warp's reads of k_s
    if (s1 < s_end) {
      load_tile(k_s, kg, p.k_st, s1);
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();

    // P V over this warp's 16 keys: P's two 8-key S tiles are the A fragment of one k-step.
    const uint32_t a[4] = {pack2<T>(sc[0][0], sc[0][1]), pack2<T>(sc[0][2], sc[0][3]),
                           pack2<T>(sc[1][0], sc[1][1]), pack2<T>(sc[1][2], sc[1][3])};
#pragma unroll
    for (int dt = 0; dt < DT; dt += 2) {
      uint32_t vf[4];
      ldmatrix_x4<true>(vf, &v_s[(wk + (mat & 1) * 8 + mrow) * LD + (dt + (mat >> 1)) * 8]);
      mma_16816<T>(o[dt], a, vf[0], vf[1]);
      mma_16816<T>(o[dt + 1], a, vf[2], vf[3]);
    }
    __syncthreads();  // every warp is done with v_s
    s0 = s1;
  }

  // Merge the four warps' states per row: m = max m_w, l = sum l_w 2^(m_w - m), o likewise.
  float* part_o = reinterpret_cast<float*>(kv_s);  // [4][16][D]; the key loop ended with a barrier
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    float l = l_run[i];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    l_run[i] = l;
  }
  if (t4 == 0) {
    part_m[warp][g] = m_run[0];
    part_m[warp][g + 8] = m_run[1];
    part_l[warp][g] = l_run[0];
    part_l[warp][g + 8] = l_run[1];
  }
#pragma unroll
  for (int dt = 0; dt < DT; ++dt) {
    const int c = dt * 8 + 2 * t4;
    float* w0 = part_o + (warp * kDecRows + g) * D + c;
    float* w1 = part_o + (warp * kDecRows + g + 8) * D + c;
    w0[0] = o[dt][0];
    w0[1] = o[dt][1];
    w1[0] = o[dt][2];
    w1[1] = o[dt][3];
  }
  __syncthreads();
  for (int idx = tid; idx < kDecRows * D; idx += kThreads) {
    const int rr = idx / D, d = idx % D, r = rg * kDecRows + rr;
    if (r >= R) continue;
    float m = -INFINITY;
#pragma unroll
    for (int w = 0; w < 4; ++w) m = fmaxf(m, part_m[w][rr]);
    // Every warp's state is merged, even where no warp's maximum is finite: a warp whose visible scores were
    // all NaN (fmaxf skips them) has m = -inf and l = NaN, and its factor 0 keeps that NaN (NaN * 0).
    const float base = m == -INFINITY ? 0.f : m;
    float l = 0.f, acc = 0.f;
#pragma unroll
    for (int w = 0; w < 4; ++w) {
      const float f = fast_exp2(part_m[w][rr] - base);  // 0 for a warp that saw nothing
      l += part_l[w][rr] * f;
      acc += part_o[(w * kDecRows + rr) * D + d] * f;
    }
    const int qi = r / G, h = hk * G + r % G;
    const int64_t row = ((static_cast<int64_t>(b) * p.n_splits + split) * Q + qi) * H + h;
    // Every CTA writes its rows, empty splits included (l = 0: weight 0 when merged); a NaN sum stays NaN in
    // both, and the combine kernel passes it on (the rule of worldvla/ops/attention.py).
    p.o_part[row * D + d] = l > 0.f ? acc / l : l == 0.f ? 0.f : l;
    if (d == 0) p.lse_part[row] = l > 0.f ? m + __log2f(l) : l == 0.f ? -INFINITY : l;
  }
}

template <typename T, int D>
__global__ void __launch_bounds__(D) decode_combine_kernel(const DecodeParams p) {
  const int H = static_cast<int>(p.n_heads), Q = static_cast<int>(p.n_q), ns = static_cast<int>(p.n_splits);
  const int idx = blockIdx.x, h = idx % H, qi = (idx / H) % Q, b = idx / (H * Q), d = threadIdx.x;
  auto row_of = [&](int s) { return ((static_cast<int64_t>(b) * ns + s) * Q + qi) * H + h; };
  float mx = -INFINITY;
  bool nan = false;  // a split whose softmax sum was NaN (it saw a non-finite value): the row is NaN
  for (int s = 0; s < ns; ++s) {
    const float lse = p.lse_part[row_of(s)];
    nan |= lse != lse;
    mx = fmaxf(mx, lse);
  }
  float acc = 0.f, wsum = 0.f;
  if (mx != -INFINITY) {
    for (int s = 0; s < ns; ++s) {
      const float w = exp2f(p.lse_part[row_of(s)] - mx);
      wsum += w;
      if (w > 0.f) acc = fmaf(w, p.o_part[row_of(s) * D + d], acc);
    }
  }
  T* op = static_cast<T*>(p.o) + b * p.o_sb + qi * p.o_st + h * p.o_sh;
  op[d] = from_float<T>(nan ? NAN : wsum > 0.f ? acc / wsum : 0.f);
}

// The prefill's matrix engine: kAuto runs mma.sync on every GPU until the wgmma engine has passed
// the GPU tests on an H100/H200 (benchmarks/gpu_all.sh tests and times both); kEngineWgmma needs an
// sm_90 device and sm_90a code in the build (set_cuda_prefill_engine).
// Non-zero values: the SIMT test build turns a .cu file's zero-initialized globals (.bss) into
// emulated shared memory.
enum PrefillEngine : int { kEngineAuto = 1, kEngineMma = 2, kEngineWgmma = 3, kEngineWgmma128 = 4 };
std::atomic<int> g_prefill_engine{kEngineAuto};

// Whether the current device runs the wgmma kernels: compute capability 9.0 and sm_90a in the build.
bool device_has_wgmma() {
#ifdef WORLDVLA_SIMT
  return true;  // the emulator runs either engine
#else
  static std::atomic<int> cached[64];  // per device: 0 unknown, 1 no, 2 yes
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0) return false;
  if (dev < 64 && cached[dev].load(std::memory_order_relaxed)) return cached[dev].load() == 2;
  int major = 0, minor = 0;
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
  cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev);
  const bool yes = major == 9 && minor == 0 && std::strstr(WORLDVLA_CUDA_ARCHS, "90a") != nullptr;
  if (dev < 64) cached[dev].store(yes ? 2 : 1);
  return yes;
#endif
}

// Warpgroups per CTA of the selected wgmma engine (1: 64 query rows, 2: 128), 0 for mma.sync.
int wgmma_warpgroups() {
  const int engine = g_prefill_engine.load(std::memory_order_relaxed);
  if (engine != kEngineWgmma && engine != kEngineWgmma128) return 0;
  if (!device_has_wgmma())
    throw std::invalid_argument(
        "masked_attention (CUDA): the wgmma prefill engines need an sm_90 GPU (H100/H200) and a build with "
        "sm_90a; set_cuda_prefill_engine('auto') runs mma.sync, which every supported GPU has");
  return engine == kEngineWgmma128 ? 2 : 1;
}

template <typename T, int D, int kWG>
void launch_prefill_engine(const AttnFwdParams& p, cudaStream_t stream) {
  constexpr int rows = prefill_rows(kWG);
  const dim3 grid(static_cast<unsigned>((p.max_seqlen + rows - 1) / rows), static_cast<unsigned>(p.n_heads),
                  static_cast<unsigned>(p.n_seq));
  if constexpr (kWG > 0) {  // two K and two V tiles of 64 keys in dynamic shared memory
    constexpr size_t smem = 4 * kBN * D * sizeof(uint16_t);
    allow_dynamic_shared<masked_attention_fwd_kernel<T, D, kWG>>(smem);
    launch_dynamic(masked_attention_fwd_kernel<T, D, kWG>, grid, 2 * rows, smem, stream, p);
  } else {
    launch(masked_attention_fwd_kernel<T, D, 0>, grid, 2 * rows, stream, p);
  }
}

template <typename T, int D>
void launch_prefill(const AttnFwdParams& p, cudaStream_t stream) {
  switch (wgmma_warpgroups()) {
    case 1: launch_prefill_engine<T, D, 1>(p, stream); break;
    case 2: launch_prefill_engine<T, D, 2>(p, stream); break;
    default: launch_prefill_engine<T, D, 0>(p, stream);
  }
}

template <typename T, int D>
void launch_decode(const DecodeParams& p, cudaStream_t stream) {
  const int G = static_cast<int>(p.n_heads / p.n_kv_heads);
  const int n_rg = static_cast<int>((p.n_q * G + kDecRows - 1) / kDecRows);
  const dim3 grid(static_cast<unsigned>(p.n_splits), static_cast<unsigned>(p.n_kv_heads * n_rg),
                  static_cast<unsigned>(p.batch));
  launch(decode_split_kernel<T, D>, grid, kThreads, stream, p, n_rg);
  check_launch("decode_attention (split)");
  launch(decode_combine_kernel<T, D>, static_cast<unsigned>(p.batch * p.n_q * p.n_heads), D, stream, p);
}

}  // namespace

int set_device_cuda(int device) {
  int cur = -1;
  cudaError_t err = cudaGetDevice(&cur);
  if (err != cudaSuccess || cur != device) err = cudaSetDevice(device);
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("worldvla: cannot use CUDA device ") + std::to_string(device) + ": " +
                             cudaGetErrorString(err));
  return cur;
}

int cuda_driver_version() {
  int v = 0;
  return cudaDriverGetVersion(&v) == cudaSuccess ? v : 0;
}

int cuda_runtime_version() { return CUDART_VERSION; }

void restore_device_cuda(int device) noexcept {
  int cur = -1;
  if (device >= 0 && cudaGetDevice(&cur) == cudaSuccess && cur != device) cudaSetDevice(device);
}

void masked_attention_fwd_cuda(const AttnFwdParams& p, void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (p.n_seq == 0 || p.max_seqlen == 0 || p.n_heads == 0) return;
  if (p.dtype == kBFloat16 && p.head_dim == 64) launch_prefill<__nv_bfloat16, 64>(p, s);
  else if (p.dtype == kBFloat16 && p.head_dim == 128) launch_prefill<__nv_bfloat16, 128>(p, s);
  else if (p.dtype == kFloat16 && p.head_dim == 64) launch_prefill<__half, 64>(p, s);
  else if (p.dtype == kFloat16 && p.head_dim == 128) launch_prefill<__half, 128>(p, s);
  else throw std::invalid_argument("masked_attention (CUDA): needs bf16/fp16 and head_dim 64 or 128");
  check_launch("masked_attention");
}

std::string cuda_prefill_engine() {
  switch (g_prefill_engine.load()) {
    case kEngineMma: return "mma";
    case kEngineWgmma: return "wgmma";
    case kEngineWgmma128: return "wgmma128";
    default: return "auto";
  }
}

void set_cuda_prefill_engine(const std::string& name) {
  if (name == "auto") g_prefill_engine = kEngineAuto;
  else if (name == "mma") g_prefill_engine = kEngineMma;
  else if (name == "wgmma") g_prefill_engine = kEngineWgmma;
  else if (name == "wgmma128") g_prefill_engine = kEngineWgmma128;
  else throw std::invalid_argument("set_cuda_prefill_engine: expected 'auto', 'mma', 'wgmma' or 'wgmma128', got '" +
                                   name + "'");
}

void decode_attention_cuda(const DecodeParams& p, void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (p.batch == 0 || p.n_q == 0 || p.n_heads == 0) return;
  if (p.split_size <= 0 || p.split_size % kDecTile || p.n_splits < 1)
    throw std::invalid_argument("decode_attention (CUDA): split_size must be a positive multiple of 64");
  if (p.n_splits * p.split_size < p.cache_len)
    throw std::invalid_argument("decode_attention (CUDA): n_splits * split_size must cover the cache length");
  if (p.dtype == kBFloat16 && p.head_dim == 64) launch_decode<__nv_bfloat16, 64>(p, s);
  else if (p.dtype == kBFloat16 && p.head_dim == 128) launch_decode<__nv_bfloat16, 128>(p, s);
  else if (p.dtype == kFloat16 && p.head_dim == 64) launch_decode<__half, 64>(p, s);
  else if (p.dtype == kFloat16 && p.head_dim == 128) launch_decode<__half, 128>(p, s);
  else throw std::invalid_argument("decode_attention (CUDA): needs bf16/fp16 and head_dim 64 or 128");
  check_launch("decode_attention (combine)");
}

}  // namespace worldvla
