// VQ nearest-code search (fused distance + argmin) and codebook gather.
//
// vq_quantize: argmin_c ||e_c||^2 - 2 z.e_c on the tensor cores. A CTA owns 128 rows of z and
// one split of the codebook (a multiple of 128 codes; the caller picks the split so that a few
// frames' rows still fill the GPU), swept in 128-code tiles. Per 32 channels its 256 threads
// stage the z and code tiles into shared memory, 8 channels of a row per thread and chunk (one
// 16-byte load and one 16-byte store where rows are 16-byte aligned; the next 32 channels load
// into registers while the current ones are multiplied), and each of the 8 warps computes a
// 32-row x 64-code block with mma.sync m16n8k16, fragments by ldmatrix. The code norms (and, where
// needed, the row norms) are fp32 sums of the staged values. The CTAs of a row tile merge
// through a 64-bit atomicMin on (order-preserving distance bits, code): the smallest distance
// wins and, among equal ones, the lowest code, as in torch.argmin. As there, a NaN distance (NaN or
// inf inputs) is below every number: the first NaN wins. The [N, K] distance matrix never exists.
//
// fp16 / bf16 inputs: one pass; their products are exact in the fp32 accumulator.
//
// fp32 inputs: the tensor cores see bf16 roundings, so a distance d~ is only known to within
//   E = rel * |z| |e| + 2^-22 |e|^2,   rel = 1.25 (2^-6 + C 2^-21)
// (bf16 rounding of both factors, at most 2^-7 |z||e| on the dot product, plus fp32 accumulation
// on either side, with a quarter of margin). Two passes make the answer the fp32 one:
//   1. bound:   every row's key starts at min_c (d~ + E), an upper bound on its true minimum
//               (+inf where no code gives one);
//   2. certify: every code with d~ - E <= the row's current key (it only decreases) may be the
//               minimum, and only those are recomputed exactly (fp32 FMAs, one warp per code)
//               and merged by the same atomicMin; the upper bound's code field is 0xffffffff,
//               so the exact minimum replaces it even at an equal distance. A NaN d~ - E is a
//               candidate too: the exact distance may be NaN, which beats every number.
// E only holds while neither computation overflows. Below |z||e| = 2^126, 2 z.e stays finite in
// both, so only the last subtraction can, and only to +inf: a d~ of +inf says nothing of the exact
// distance. Codes at or past 2^126 (or with a NaN or inf norm), and codes with d~ = +inf, bound
// nothing and are always candidates.
// For random codebooks a row has a handful of such candidates among thousands of codes.

#include "cuda_common.cuh"

namespace worldvla {
namespace {

constexpr int kVqBM = 128, kVqBN = 128, kVqBK = 32, kVqThreads = 256;
constexpr int kVqLD = kVqBK + 8;  // 80-byte rows: the 8 rows an ldmatrix reads sit in distinct banks
constexpr int kVqChunks = kVqBM * kVqBK / 8 / kVqThreads;  // 8-channel chunks of z (and of codes) a thread stages
constexpr unsigned kFull = 0xffffffffu;

// What the tensor cores multiply: 16-bit inputs as they are, fp32 rounded to bf16 (its range).
template <typename T>
struct VqMma {
  using type = T;
};
template <>
struct VqMma<float> {
  using type = __nv_bfloat16;
};

enum VqPass : int { kVqDirect = 0, kVqBound = 1, kVqCertify = 2 };

__device__ __forceinline__ uint32_t ordered_bits(float d) {
  const uint32_t u = __float_as_uint(d + 0.0f);  // -0 -> +0
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);  // monotone in d
}

__device__ __forceinline__ float from_ordered_bits(uint32_t u) {
  return __uint_as_float((u & 0x80000000u) ? (u & 0x7fffffffu) : ~u);
}

// (distance, code) as one 64-bit key whose unsigned order is the distance's, then the code's.
// Every NaN takes the distance field 0, below -inf's, so the first NaN wins as in torch.argmin: a
// NaN with the sign bit set (what x86 makes of inf - inf) would map below -inf and any other NaN
// above +inf, and NaNs would rank by payload, not by code.
__device__ __forceinline__ unsigned long long nearest_key(float d, uint32_t code) {
  const bool nan = (__float_as_uint(d) & 0x7fffffffu) > 0x7f800000u;
  return (static_cast<unsigned long long>(nan ? 0u : ordered_bits(d)) << 32) | code;
}

__global__ void fill_u64_kernel(unsigned long long* p, int n, unsigned long long value) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) p[i] = value;
}

// In place: the key's code (its low 32 bits) as an int64 index. A row whose distances are all +inf
// can keep the bound pass's key, which has no code; it reads 0, torch.argmin's first +inf.
__global__ void key_to_code_kernel(int64_t* p, int n, int k) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const int64_t code = static_cast<int64_t>(static_cast<unsigned long long>(p[i]) & 0xffffffffull);
  p[i] = code < k ? code : 0;
}

// Eight consecutive channels of one row on their way to shared memory: 16-bit inputs as loaded,
// fp32 as loaded and rounded to bf16 at the store.
template <typename T>
struct Chunk8 {
  uint4 v;
};
template <>
struct Chunk8<float> {
  float4 lo, hi;
};

// Channels k..k+7 of `row` (zeros past C or for a row that does not exist). kVec: 16-byte aligned
// rows and C a multiple of 8, so a chunk is one 16-byte load (two for fp32); else one load a value.
template <typename T, bool kVec>
__device__ __forceinline__ void load_chunk(Chunk8<T>& c, const T* row, int k, int C, bool valid) {
  if constexpr (std::is_same<T, float>::value) {
    if (kVec) {
      const bool in = valid && k < C;
      c.lo = in ? *reinterpret_cast<const float4*>(row + k) : make_float4(0.f, 0.f, 0.f, 0.f);
      c.hi = in ? *reinterpret_cast<const float4*>(row + k + 4) : make_float4(0.f, 0.f, 0.f, 0.f);
    } else {
      float x[8];
#pragma unroll
      for (int i = 0; i < 8; ++i) x[i] = (valid && k + i < C) ? row[k + i] : 0.f;
      c.lo = make_float4(x[0], x[1], x[2], x[3]);
      c.hi = make_float4(x[4], x[5], x[6], x[7]);
    }
  } else {
    if (kVec) {
      c.v = (valid && k < C) ? *reinterpret_cast<const uint4*>(row + k) : make_uint4(0u, 0u, 0u, 0u);
    } else {
      const uint16_t* bits = reinterpret_cast<const uint16_t*>(row);
      uint32_t w[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const uint32_t a = (valid && k + 2 * i < C) ? bits[k + 2 * i] : 0u;
        const uint32_t b = (valid && k + 2 * i + 1 < C) ? bits[k + 2 * i + 1] : 0u;
        w[i] = a | (b << 16);
      }
      c.v = make_uint4(w[0], w[1], w[2], w[3]);
    }
  }
}

template <typename T>
__device__ __forceinline__ float chunk_sumsq(const Chunk8<T>& c) {
  float s = 0.f;
  if constexpr (std::is_same<T, float>::value) {
    s = fmaf(c.lo.x, c.lo.x, s); s = fmaf(c.lo.y, c.lo.y, s); s = fmaf(c.lo.z, c.lo.z, s); s = fmaf(c.lo.w, c.lo.w, s);
    s = fmaf(c.hi.x, c.hi.x, s); s = fmaf(c.hi.y, c.hi.y, s); s = fmaf(c.hi.z, c.hi.z, s); s = fmaf(c.hi.w, c.hi.w, s);
  } else {
    const uint32_t w[4] = {c.v.x, c.v.y, c.v.z, c.v.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 f = unpack2<T>(w[i]);
      s = fmaf(f.x, f.x, s);
      s = fmaf(f.y, f.y, s);
    }
  }
  return s;
}

// One 16-byte shared store of a chunk as the tensor cores' type M.
template <typename M, typename T>
__device__ __forceinline__ void store_chunk(M* dst, const Chunk8<T>& c) {
  if constexpr (std::is_same<T, float>::value) {
    *reinterpret_cast<uint4*>(dst) = make_uint4(pack2<M>(c.lo.x, c.lo.y), pack2<M>(c.lo.z, c.lo.w),
                                                pack2<M>(c.hi.x, c.hi.y), pack2<M>(c.hi.z, c.hi.w));
  } else {
    *reinterpret_cast<uint4*>(dst) = c.v;
  }
}

template <typename T, int kPass, bool kVec>
__global__ void __launch_bounds__(kVqThreads, kVec ? 2 : 1)  // vectorized: two CTAs (16 warps) per SM
    vq_quantize_kernel(const T* __restrict__ z, int64_t z_s, const T* __restrict__ cb, int64_t cb_s, int N,
                       int K, int C, int split, unsigned long long* keys) {
  using M = typename VqMma<T>::type;
  constexpr bool kNorms = kPass != kVqDirect;  // the certified passes need |z| and |e| for the error bound
  __shared__ __align__(16) M zs[kVqBM * kVqLD];
  __shared__ __align__(16) M es[kVqBN * kVqLD];
  __shared__ float en_s[kVqBN], cn_s[kVqBN], zn_s[kVqBM];  // |e|^2, |e|, |z|
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t = lane & 3, mat = lane >> 3, mrow = lane & 7;
  const int wm = (warp & 3) * 32, wn = (warp >> 2) * 64;  // this warp's rows and codes within a tile
  const int m0 = blockIdx.x * kVqBM;
  const int c_begin = blockIdx.y * split, c_end = min(K, c_begin + split);
  const float rel = 1.25f * (0x1p-6f + static_cast<float>(C) * 0x1p-21f);

  // Staging: chunk q = tid + 256 l (l = 0, 1) of a [128 x 32] tile is row q / 4, channels 8 (q % 4)
  // .. + 8, so the 4 threads of a row are 4 consecutive lanes and a row's sum of squares is a per-thread
  // partial over the channel steps, reduced across those lanes once per tile.
  const int srow = tid >> 2, scol = (tid & 3) * 8;  // rows srow and srow + 64
  Chunk8<T> zc[kVqChunks], ec[kVqChunks];
  float zsq[kVqChunks], esq[kVqChunks];
  auto fetch = [&](int n0, int k0) {
#pragma unroll
    for (int l = 0; l < kVqChunks; ++l) {
      const int gm = m0 + srow + 64 * l, gc = n0 + srow + 64 * l;
      load_chunk<T, kVec>(zc[l], z + static_cast<int64_t>(min(gm, N - 1)) * z_s, k0 + scol, C, gm < N);
      load_chunk<T, kVec>(ec[l], cb + static_cast<int64_t>(min(gc, K - 1)) * cb_s, k0 + scol, C, gc < c_end);
    }
  };

  // Per thread: rows wm + mt*16 + g + 8h (i = 2mt + h), codes wn + nt*8 + 2t + e.
  float best[4], bound[4];
  uint32_t arg[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    best[i] = INFINITY;  // a code at FLT_MAX must replace it; an all-+inf row keeps code 0, as torch
    arg[i] = 0;
    bound[i] = 0.f;
  }

  for (int n0 = c_begin; n0 < c_end; n0 += kVqBN) {
    const bool first = n0 == c_begin;
    float acc[2][8][4];
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
      for (int nt = 0; nt < 8; ++nt)
#pragma unroll
        for (int r = 0; r < 4; ++r) acc[mt][nt][r] = 0.f;
#pragma unroll
    for (int l = 0; l < kVqChunks; ++l) esq[l] = zsq[l] = 0.f;

    fetch(n0, 0);
    for (int k0 = 0; k0 < C; k0 += kVqBK) {
#pragma unroll
      for (int l = 0; l < kVqChunks; ++l) {
        const int row = srow + 64 * l;
        store_chunk<M>(&zs[row * kVqLD + scol], zc[l]);
        store_chunk<M>(&es[row * kVqLD + scol], ec[l]);
        esq[l] += chunk_sumsq(ec[l]);
        if constexpr (kNorms) {
          if (first) zsq[l] += chunk_sumsq(zc[l]);
        }
      }
      __syncthreads();
      if (k0 + kVqBK < C) fetch(n0, k0 + kVqBK);  // the next channels load while these are used
#pragma unroll
      for (int ks = 0; ks < kVqBK / 16; ++ks) {
        uint32_t a[2][4];
#pragma unroll
        for (int mt = 0; mt < 2; ++mt)
          ldmatrix_x4<false>(a[mt], &zs[(wm + mt * 16 + (lane & 15)) * kVqLD + ks * 16 + (lane >> 4) * 8]);
#pragma unroll
        for (int nt = 0; nt < 8; nt += 2) {
          uint32_t b[4];
          ldmatrix_x4<false>(b, &es[(wn + (nt + (mat >> 1)) * 8 + mrow) * kVqLD + ks * 16 + (mat & 1) * 8]);
#pragma unroll
          for (int mt = 0; mt < 2; ++mt) {
            mma_16816<M>(acc[mt][nt], a[mt], b[0], b[1]);
            mma_16816<M>(acc[mt][nt + 1], a[mt], b[2], b[3]);
          }
        }
      }
      __syncthreads();
    }
    // Norms of this tile's codes (and, on the first tile, of the rows) for the epilogue.
#pragma unroll
    for (int l = 0; l < kVqChunks; ++l) {
      float e2 = esq[l], z2 = zsq[l];
#pragma unroll
      for (int o = 1; o < 4; o <<= 1) {
        e2 += __shfl_xor_sync(kFull, e2, o);
        if (kNorms) z2 += __shfl_xor_sync(kFull, z2, o);
      }
      if ((tid & 3) == 0) {
        en_s[srow + 64 * l] = e2;
        cn_s[srow + 64 * l] = sqrtf(e2);
        if (kNorms && first) zn_s[srow + 64 * l] = sqrtf(z2);
      }
    }
    __syncthreads();

    // Element (i, nt, e) of this thread: row wm + (i/2)*16 + g + 8(i%2), code wn + nt*8 + 2t + e.
    auto row_of = [&](int i) { return wm + (i >> 1) * 16 + g + 8 * (i & 1); };
    auto code_of = [&](int nt, int e) { return wn + nt * 8 + 2 * t + e; };
    auto dist = [&](int i, int nt, int e) { return en_s[code_of(nt, e)] - 2.f * acc[i >> 1][nt][2 * (i & 1) + e]; };
    // E, the half-width of the bracket d~ +- E around the exact distance (see the top of the file), or
    // +inf where no bracket holds (d~ = +inf, |z||e| >= 2^126, a NaN norm): such a code then bounds
    // nothing (d~ + E is +inf or NaN, which fminf skips) and is always a candidate (d~ - E is -inf or NaN).
    auto err = [&](int i, int nt, int e, float d) {
      const int cl = code_of(nt, e);
      const float p = zn_s[row_of(i)] * cn_s[cl];
      return d < INFINITY && p < 0x1p126f ? rel * p + 0x1p-22f * en_s[cl] : INFINITY;
    };
    if constexpr (kPass == kVqCertify) {
      // Every row's current key bounds its minimum from above (other CTAs lower it as they go). A
      // key holding a NaN gives way only to a NaN of a lower code: its bound -inf lets no bracketed number
      // in (NaN approximations and unbracketed codes still pass the test below), and a row whose NaN code
      // lies below this tile has nothing left to find here.
      bool live[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int row = m0 + row_of(i);
        const auto key = *reinterpret_cast<volatile const unsigned long long*>(&keys[row < N ? row : 0]);
        const float b = from_ordered_bits(static_cast<uint32_t>(key >> 32));
        const bool nan_key = b != b;
        bound[i] = nan_key ? -INFINITY : b;
        live[i] = row < N && !(nan_key && (key & 0xffffffffull) < static_cast<unsigned long long>(n0));
      }
      // This thread's candidates as a bit mask over its 64 elements (bit 16i + 2nt + e).
      uint64_t cand = 0;
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int nt = 0; nt < 8; ++nt)
#pragma unroll
          for (int e = 0; e < 2; ++e)
            if (live[i] && n0 + code_of(nt, e) < c_end) {
              const float d = dist(i, nt, e);
              if (!(d - err(i, nt, e, d) > bound[i])) cand |= 1ull << (16 * i + 2 * nt + e);
            }
      // Candidates are rare: for most warps one vote skips the tile. Otherwise the warp takes
      // them one at a time and recomputes each distance exactly, all lanes along the channels.
      while (__any_sync(kFull, cand != 0)) {
        const int j = cand ? __ffsll(static_cast<long long>(cand)) - 1 : 0;
        unsigned pending = __ballot_sync(kFull, cand != 0);
        cand &= cand - 1;
        while (pending) {
          const int src = __ffs(pending) - 1;
          pending &= pending - 1;
          const int js = __shfl_sync(kFull, j, src), gs = src >> 2, ts = src & 3;
          const int r = m0 + wm + (js >> 5) * 16 + gs + 8 * ((js >> 4) & 1);  // row_of(js / 16) of lane src
          const int cl = wn + ((js >> 1) & 7) * 8 + 2 * ts + (js & 1);       // code_of(nt, e) of lane src
          float dot = 0.f;
          for (int k = lane; k < C; k += 32)
            dot = fmaf(to_float<T>(z[r * z_s + k]), to_float<T>(cb[(n0 + cl) * cb_s + k]), dot);
          dot = warp_sum(dot);
          if (lane == 0) atomicMin(&keys[r], nearest_key(en_s[cl] - 2.f * dot, static_cast<uint32_t>(n0 + cl)));
        }
      }
    } else {
      // Codes are visited in increasing order per thread, so a strict '<' keeps the first minimum.
      // !(d >= best) holds for a NaN distance too, which is kept as torch.argmin keeps the first
      // NaN; once best is NaN, best == best fails and nothing replaces it.
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int nt = 0; nt < 8; ++nt)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int code = n0 + code_of(nt, e);
            if (code >= c_end) continue;
            const float d = dist(i, nt, e);
            if constexpr (kPass == kVqBound) {
              best[i] = fminf(best[i], d + err(i, nt, e, d));
            } else if (!(d >= best[i]) && best[i] == best[i]) {
              best[i] = d;
              arg[i] = static_cast<uint32_t>(code);
            }
          }
    }
    __syncthreads();  // en_s, cn_s are rewritten by the next tile
  }
  if constexpr (kPass != kVqCertify) {
    // The 4 threads sharing a row (t = 0..3) are 4 consecutive lanes; they merge keys, so NaN and
    // ties order as in the atomicMin. The bound pass leaves the code field at its maximum: any exact
    // (distance, code) at or below it wins.
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      unsigned long long key = nearest_key(best[i], kPass == kVqBound ? 0xffffffffu : arg[i]);
#pragma unroll
      for (int o = 1; o < 4; o <<= 1) key = min(key, __shfl_xor_sync(kFull, key, o));
      const int row = m0 + wm + (i >> 1) * 16 + g + 8 * (i & 1);  // row_of(i)
      if (t == 0 && row < N) atomicMin(&keys[row], key);
    }
  }
}

template <typename E, typename I>
__global__ void vq_gather_kernel(const I* __restrict__ idx, const E* __restrict__ cb, int64_t cb_s, int64_t B,
                                 int64_t HW, int64_t K, int64_t C, E* __restrict__ out) {
  // One thread per output element, consecutive threads along h*w: coalesced writes,
  // codebook reads hit the cache (the codebook is small).
  const int64_t total = B * C * HW;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t x = e % HW, c = (e / HW) % C, b = e / (HW * C);
    const int64_t code = static_cast<int64_t>(idx[b * HW + x]);
    out[e] = (code >= 0 && code < K) ? cb[code * cb_s + c] : E(0);
  }
}

template <typename E>
void launch_gather(const void* idx, int index_dtype, const void* cb, int64_t cb_s, int64_t B, int64_t HW,
                   int64_t K, int64_t C, void* out, cudaStream_t s) {
  const int64_t total = B * C * HW;
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>((total + 255) / 256, 65535));
  if (index_dtype == kInt64)
    launch(vq_gather_kernel<E, int64_t>, blocks, 256, s, static_cast<const int64_t*>(idx), static_cast<const E*>(cb),
        cb_s, B, HW, K, C, static_cast<E*>(out));
  else if (index_dtype == kInt32)
    launch(vq_gather_kernel<E, int32_t>, blocks, 256, s, static_cast<const int32_t*>(idx), static_cast<const E*>(cb),
        cb_s, B, HW, K, C, static_cast<E*>(out));
  else
    throw std::invalid_argument("vq_gather (CUDA): indices must be int32 or int64");
}

struct VqArgs {
  const void* z;
  int64_t z_s;
  const void* cb;
  int64_t cb_s;
  int n, k, c, split;
  unsigned long long* keys;
  dim3 grid;
  cudaStream_t stream;
};

template <typename T, int kPass>
void vq_pass(const VqArgs& a, bool vec) {
  const T* z = static_cast<const T*>(a.z);
  const T* cb = static_cast<const T*>(a.cb);
  if (vec)
    launch(vq_quantize_kernel<T, kPass, true>, a.grid, kVqThreads, a.stream, z, a.z_s, cb, a.cb_s, a.n, a.k, a.c,
        a.split, a.keys);
  else
    launch(vq_quantize_kernel<T, kPass, false>, a.grid, kVqThreads, a.stream, z, a.z_s, cb, a.cb_s, a.n, a.k, a.c,
        a.split, a.keys);
}

}  // namespace

void vq_quantize_cuda(const void* z, int64_t z_s, const void* codebook, int64_t cb_s, int dtype, int64_t N,
                      int64_t K, int64_t C, int64_t code_split, int64_t* out, void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (N == 0) return;
  if (code_split <= 0 || code_split % kVqBN)
    throw std::invalid_argument("vq_quantize (CUDA): code_split must be a positive multiple of 128");
  const dim3 grid(static_cast<unsigned>((N + kVqBM - 1) / kVqBM),
                  static_cast<unsigned>((K + code_split - 1) / code_split));
  const char* op = "vq_quantize";
  const int n = int32_size(N, op, "vectors"), k = int32_size(K, op, "codes"), c = int32_size(C, op, "code width");
  const int split = int32_size(code_split, op, "code_split");
  // `out` holds the merge keys until the last kernel turns them into codes.
  unsigned long long* keys = reinterpret_cast<unsigned long long*>(out);
  const unsigned fill_blocks = static_cast<unsigned>((N + 255) / 256);
  launch(fill_u64_kernel, fill_blocks, 256, s, keys, n, ~0ull);
  check_launch("vq_quantize (init)");
  // 16-byte loads where every row allows them (the release's z and codebook always do).
  const size_t esize = dtype == kFloat32 ? 4 : 2;
  const bool vec = c % 8 == 0 && reinterpret_cast<uintptr_t>(z) % 16 == 0 &&
                   reinterpret_cast<uintptr_t>(codebook) % 16 == 0 && (z_s * esize) % 16 == 0 &&
                   (cb_s * esize) % 16 == 0;
  const VqArgs a{z, z_s, codebook, cb_s, n, k, c, split, keys, grid, s};
  switch (dtype) {
    case kFloat32:  // an upper bound per row, then the exact distances of the codes that may beat it
      vq_pass<float, kVqBound>(a, vec);
      check_launch("vq_quantize (bound)");
      vq_pass<float, kVqCertify>(a, vec);
      break;
    case kFloat16:
      vq_pass<__half, kVqDirect>(a, vec);
      break;
    case kBFloat16:
      vq_pass<__nv_bfloat16, kVqDirect>(a, vec);
      break;
    default:
      throw std::invalid_argument("vq_quantize (CUDA): needs float32, float16 or bfloat16");
  }
  check_launch("vq_quantize");
  launch(key_to_code_kernel, fill_blocks, 256, s, out, n, k);
  check_launch("vq_quantize (finish)");
}

void vq_gather_cuda(const void* indices, int index_dtype, const void* codebook, int64_t cb_s, int elem_size,
                    int64_t B, int64_t HW, int64_t K, int64_t C, void* out, void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (B * HW * C == 0) return;
  switch (elem_size) {
    case 2: launch_gather<uint16_t>(indices, index_dtype, codebook, cb_s, B, HW, K, C, out, s); break;
    case 4: launch_gather<uint32_t>(indices, index_dtype, codebook, cb_s, B, HW, K, C, out, s); break;
    case 8: launch_gather<uint64_t>(indices, index_dtype, codebook, cb_s, B, HW, K, C, out, s); break;
    default: throw std::invalid_argument("vq_gather (CUDA): element size must be 2, 4 or 8 bytes");
  }
  check_launch("vq_gather");
}

}  // namespace worldvla
