// Chunk-masked attention on the GPU.
//
// Prefill: one CTA of 4 warps per (64 query rows, head, sequence); each warp owns
// 16 rows and runs Q K^T and P V on tensor cores (mma.sync m16n8k16, fp32
// accumulation; K and V fragments loaded with ldmatrix, V's transposed) with an
// online softmax over 64-key tiles. K and V tiles arrive by cp.async, pipelined:
// a tile's V loads during its Q K^T, the next visible tile's K during its P V. A key tile the chunk
// rule hides from every row of the CTA (max kv_block < min q_limit) is skipped
// without being loaded; a tile below the diagonal that the rule cannot touch
// (min kv_block >= max q_limit) skips the per-pair test.
//
// Decode: split-KV. CTAs of (key split, kv head x row group, batch) each run
// up to 16 rows (query x grouped q head) against one split of the cache and
// write a normalized partial output and its log-sum-exp; a combine kernel merges
// the splits. The number of splits depends on shapes only, so a captured CUDA
// graph stays valid while kv_len and q_pos change on the device.
#include <climits>

#include "cuda_common.cuh"

namespace worldvla {
namespace {

constexpr int kBM = 64;        // query rows per prefill CTA (16 per warp)
constexpr int kBN = 64;        // keys per prefill tile
constexpr int kThreads = 128;  // 4 warps

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) masked_attention_fwd_kernel(const AttnFwdParams p) {
  constexpr int KS = D / 16;  // k-steps of Q K^T over the head dim
  constexpr int NT = kBN / 8; // 8-key column tiles of S
  constexpr int DT = D / 8;   // 8-wide column tiles of O
  // Row stride of the K/V tiles in 16-bit elements: rows stay 16-byte aligned, and the
  // 8 rows of 16 bytes an ldmatrix phase reads fall in 8 different 16-byte bank groups.
  constexpr int LD = D + 8;
  __shared__ __align__(16) uint16_t k_s[kBN * LD];
  __shared__ __align__(16) uint16_t v_s[kBN * LD];
  __shared__ int32_t kvb_s[2][kBN];  // kv_block of the current and of the next visible tile
  __shared__ int32_t ql_min_s, ql_max_s;

  const int seq = blockIdx.z, head = blockIdx.y, m0 = blockIdx.x * kBM;
  const int64_t start = p.cu_seqlens ? p.cu_seqlens[seq] : 0;
  const int len = static_cast<int>(p.cu_seqlens ? p.cu_seqlens[seq + 1] - start : p.seq_len);
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
  if (tid < kBM && m0 + tid < len) {
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
  const int n_end = min(len, m0 + kBM);  // causal: no key after the CTA's last row

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
  // One 64-key tile of K or V into shared memory with cp.async (rows past the sequence zero-filled).
  constexpr int CPR = D / 8;  // 16-byte chunks per row
  auto load_tile = [&](uint16_t* dst, const T* src, int64_t row_stride, int n0) {
    for (int c = tid; c < kBN * CPR; c += kThreads) {
      const int row = c / CPR, col = (c % CPR) * 8, j = n0 + row;
      cp_async_16(&dst[row * LD + col], src + static_cast<int64_t>(j < len ? j : 0) * row_stride + col, j < len);
    }
    cp_async_commit();
  };

  // Software pipeline over the visible tiles: V of a tile loads while Q K^T and the softmax
  // run, K of the next visible tile while P V runs; one K and one V buffer suffice.
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
    const int mat = lane >> 3, mrow = lane & 7;
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

    float mx[2] = {m_run[0], m_run[1]};
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
        mx[e >> 1] = fmaxf(mx[e >> 1], x);
      }
    }
    float alpha[2], base[2];
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
#pragma unroll
    for (int dt = 0; dt < DT; ++dt) {
      o[dt][0] *= alpha[0];
      o[dt][1] *= alpha[0];
      o[dt][2] *= alpha[1];
      o[dt][3] *= alpha[1];
    }

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

    // P V: the S accumulators of key tiles 2kk and 2kk+1 are exactly the A fragment of a
    // 16x16 P block. V's B fragments (two keys of one column per register) come from
    // transposing ldmatrix loads of the row-major V tile: matrices (keys kk*16.., d dt*8..),
    // (keys +8, same d), (keys kk*16.., d (dt+1)*8..), (keys +8, same d).
#pragma unroll
    for (int kk = 0; kk < kBN / 16; ++kk) {
      const uint32_t a[4] = {pack2<T>(s[2 * kk][0], s[2 * kk][1]), pack2<T>(s[2 * kk][2], s[2 * kk][3]),
                             pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                             pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
      for (int dt = 0; dt < DT; dt += 2) {
        uint32_t b[4];
        ldmatrix_x4<true>(b, &v_s[(kk * 16 + (mat & 1) * 8 + mrow) * LD + (dt + (mat >> 1)) * 8]);
        mma_16816<T>(o[dt], a, b[0], b[1]);
        mma_16816<T>(o[dt + 1], a, b[2], b[3]);
      }
    }
    __syncthreads();  // every warp is done with v_s
    n0 = n1;
    need_mask = next_mask;
  }

  float inv[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    float l = l_run[i];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    inv[i] = l > 0.f ? 1.f / l : 0.f;  // a row that sees no key gives zeros
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
// Rows (query x grouped head) per CTA, 4 per warp, dealt round-robin: row w + 4 i goes to warp w,
// so a CTA with few rows (5 queries of one head: a parallel action chunk) spreads them over its
// warps instead of queueing them on the first one.
constexpr int kDecRows = 16;
constexpr int kDecTile = 64;  // keys per tile; split sizes are multiples of it

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) decode_split_kernel(const DecodeParams p, int n_rowgroups) {
  constexpr int LDK = D + 2;  // odd number of 32-bit words per row: lane-per-row reads are conflict-free
  constexpr int DP = D / 64;  // 32-bit column pairs per lane
  __shared__ __align__(16) uint16_t k_s[kDecTile * LDK];
  __shared__ __align__(16) uint16_t v_s[kDecTile * LDK];
  __shared__ __align__(16) float q_s[kDecRows * D];
  __shared__ int32_t kvb_s[kDecTile];

  const int split = blockIdx.x, b = blockIdx.z;
  const int hk = blockIdx.y / n_rowgroups, rg = blockIdx.y % n_rowgroups;
  const int G = static_cast<int>(p.n_heads / p.n_kv_heads);
  const int Q = static_cast<int>(p.n_q), H = static_cast<int>(p.n_heads);
  const int R = Q * G;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int S = static_cast<int>(p.cache_len);
  const int kv_len = min(max(p.kv_len[b], 0), S);
  const float sl2 = p.scale * kLog2e;

  const T* qg = static_cast<const T*>(p.q) + b * p.q_sb;
  for (int idx = tid; idx < kDecRows * D; idx += kThreads) {
    const int r = rg * kDecRows + idx / D, d = idx % D;
    float x = 0.f;
    if (r < R) x = to_float<T>(qg[(r / G) * p.q_st + (hk * G + r % G) * p.q_sh + d]) * sl2;
    q_s[idx] = x;
  }
  int max_pos = -1;
  int32_t ql_min = INT_MAX;
  for (int rr = 0; rr < kDecRows; ++rr) {
    const int r = rg * kDecRows + rr;
    if (r < R) {
      max_pos = max(max_pos, p.q_pos[b * Q + r / G]);
      ql_min = min(ql_min, p.q_limit[b * Q + r / G]);
    }
  }
  int my_pos[4];
  int32_t my_lim[4];
  bool my_valid[4];
  float m_run[4], l_run[4], acc[4][2 * DP];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int r = rg * kDecRows + warp + 4 * i;
    my_valid[i] = r < R;
    my_pos[i] = my_valid[i] ? p.q_pos[b * Q + r / G] : -1;
    my_lim[i] = my_valid[i] ? p.q_limit[b * Q + r / G] : INT_MAX;
    m_run[i] = -INFINITY;
    l_run[i] = 0.f;
#pragma unroll
    for (int e = 0; e < 2 * DP; ++e) acc[i][e] = 0.f;
  }

  const int s_begin = split * static_cast<int>(p.split_size);
  const int s_end = min(min(s_begin + static_cast<int>(p.split_size), kv_len), max_pos + 1);
  const T* kg = static_cast<const T*>(p.k) + b * p.k_sb + hk * p.k_sh;
  const T* vg = static_cast<const T*>(p.v) + b * p.v_sb + hk * p.v_sh;
  const int32_t* kvb_g = p.kv_block + b * p.kvb_sb;
  __syncthreads();  // q_s ready

  for (int s0 = s_begin; s0 < s_end; s0 += kDecTile) {
    const bool kin = tid < kDecTile && s0 + tid < s_end;
    const int32_t my_kvb = kin ? kvb_g[s0 + tid] : kNoBlock;
    if (tid < kDecTile) kvb_s[tid] = my_kvb;
    if (__syncthreads_and(!kin || my_kvb < ql_min)) continue;  // tile hidden from every row

    constexpr int CPR = D / 8;
    for (int c = tid; c < kDecTile * CPR; c += kThreads) {
      const int row = c / CPR, col = (c % CPR) * 8, j = s0 + row;
      uint4 kv = make_uint4(0u, 0u, 0u, 0u), vv = make_uint4(0u, 0u, 0u, 0u);
      if (j < s_end) {
        kv = *reinterpret_cast<const uint4*>(kg + j * p.k_st + col);
        vv = *reinterpret_cast<const uint4*>(vg + j * p.v_st + col);
      }
      uint32_t* kd = reinterpret_cast<uint32_t*>(&k_s[row * LDK + col]);
      uint32_t* vd = reinterpret_cast<uint32_t*>(&v_s[row * LDK + col]);
      kd[0] = kv.x; kd[1] = kv.y; kd[2] = kv.z; kd[3] = kv.w;
      vd[0] = vv.x; vd[1] = vv.y; vd[2] = vv.z; vd[3] = vv.w;
    }
    __syncthreads();

    const uint32_t* ka = reinterpret_cast<const uint32_t*>(&k_s[lane * LDK]);
    const uint32_t* kb2 = reinterpret_cast<const uint32_t*>(&k_s[(lane + 32) * LDK]);
    const int ja = s0 + lane, jb = s0 + lane + 32;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      if (!my_valid[i]) continue;  // uniform over the warp
      const float2* qr = reinterpret_cast<const float2*>(&q_s[(warp + 4 * i) * D]);
      float sa = 0.f, sb = 0.f;
#pragma unroll 8
      for (int w = 0; w < D / 2; ++w) {
        const float2 qv = qr[w];
        const float2 xa = unpack2<T>(ka[w]), xb = unpack2<T>(kb2[w]);
        sa = fmaf(qv.x, xa.x, fmaf(qv.y, xa.y, sa));
        sb = fmaf(qv.x, xb.x, fmaf(qv.y, xb.y, sb));
      }
      if (ja >= s_end || ja > my_pos[i] || kvb_s[lane] < my_lim[i]) sa = -INFINITY;
      if (jb >= s_end || jb > my_pos[i] || kvb_s[lane + 32] < my_lim[i]) sb = -INFINITY;
      const float mx = fmaxf(warp_max(fmaxf(sa, sb)), m_run[i]);
      const float base = mx == -INFINITY ? 0.f : mx;
      const float alpha = fast_exp2(m_run[i] - base);
      m_run[i] = mx;
      const float pa = fast_exp2(sa - base), pb = fast_exp2(sb - base);
      l_run[i] = l_run[i] * alpha + pa + pb;
#pragma unroll
      for (int e = 0; e < 2 * DP; ++e) acc[i][e] *= alpha;
#pragma unroll 4
      for (int kk = 0; kk < 64; ++kk) {
        const float pk = __shfl_sync(0xffffffffu, kk < 32 ? pa : pb, kk & 31);
        if (pk == 0.f) continue;  // same on every lane; keeps garbage in hidden slots out of the sum
        const uint32_t* vr = reinterpret_cast<const uint32_t*>(&v_s[kk * LDK]);
#pragma unroll
        for (int dp = 0; dp < DP; ++dp) {
          const float2 x = unpack2<T>(vr[lane + 32 * dp]);
          acc[i][2 * dp] = fmaf(pk, x.x, acc[i][2 * dp]);
          acc[i][2 * dp + 1] = fmaf(pk, x.y, acc[i][2 * dp + 1]);
        }
      }
    }
    __syncthreads();
  }

  // Every CTA writes its rows, empty splits included (lse = -inf, o = 0).
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    if (!my_valid[i]) continue;
    const float l = warp_sum(l_run[i]);
    const int r = rg * kDecRows + warp + 4 * i, qi = r / G, h = hk * G + r % G;
    const int64_t row = ((static_cast<int64_t>(b) * p.n_splits + split) * Q + qi) * H + h;
    const float inv = l > 0.f ? 1.f / l : 0.f;
    float* op = p.o_part + row * D;
#pragma unroll
    for (int dp = 0; dp < DP; ++dp) {
      op[2 * (lane + 32 * dp)] = acc[i][2 * dp] * inv;
      op[2 * (lane + 32 * dp) + 1] = acc[i][2 * dp + 1] * inv;
    }
    if (lane == 0) p.lse_part[row] = l > 0.f ? m_run[i] + __log2f(l) : -INFINITY;
  }
}

template <typename T, int D>
__global__ void __launch_bounds__(D) decode_combine_kernel(const DecodeParams p) {
  const int H = static_cast<int>(p.n_heads), Q = static_cast<int>(p.n_q), ns = static_cast<int>(p.n_splits);
  const int idx = blockIdx.x, h = idx % H, qi = (idx / H) % Q, b = idx / (H * Q), d = threadIdx.x;
  auto row_of = [&](int s) { return ((static_cast<int64_t>(b) * ns + s) * Q + qi) * H + h; };
  float mx = -INFINITY;
  for (int s = 0; s < ns; ++s) mx = fmaxf(mx, p.lse_part[row_of(s)]);
  float acc = 0.f, wsum = 0.f;
  if (mx != -INFINITY) {
    for (int s = 0; s < ns; ++s) {
      const float w = exp2f(p.lse_part[row_of(s)] - mx);
      wsum += w;
      if (w > 0.f) acc = fmaf(w, p.o_part[row_of(s) * D + d], acc);
    }
  }
  T* op = static_cast<T*>(p.o) + b * p.o_sb + qi * p.o_st + h * p.o_sh;
  op[d] = from_float<T>(wsum > 0.f ? acc / wsum : 0.f);
}

template <typename T, int D>
void launch_prefill(const AttnFwdParams& p, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((p.max_seqlen + kBM - 1) / kBM), static_cast<unsigned>(p.n_heads),
                  static_cast<unsigned>(p.n_seq));
  launch(masked_attention_fwd_kernel<T, D>, grid, kThreads, stream, p);
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
