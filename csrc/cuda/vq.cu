// VQ nearest-code search (fused distance + argmin) and codebook gather.
//
// vq_quantize: a CTA owns 128 rows of z and one split of the codebook (a multiple
// of 128 codes; the caller picks the split so that a few frames' rows still fill
// the GPU), swept in 128-code tiles. Its 256 threads each accumulate an 8x8 block
// of dot products (rows ty*4.. and 64+ty*4.., codes tx*4.. and 64+tx*4.., read from
// shared memory as float4) over C in fp32, with the norms of their 8 codes; the
// next 8 channels of z and of the codebook are fetched into registers while the
// current ones are used. Each thread keeps its best code per row, and the 16
// threads sharing a row reduce with the lower index winning ties. The CTAs of one
// row tile merge through a 64-bit atomicMin on (order-preserving distance bits,
// code), so the smallest distance wins and, among equal ones, the lowest code, as
// in torch.argmin. The [N, K] distance matrix never exists.
#include <cfloat>

#include "cuda_common.cuh"

namespace worldvla {
namespace {

constexpr int kVqBM = 128, kVqBN = 128, kVqBK = 8, kVqThreads = 256;
constexpr int kVqLoads = kVqBM * kVqBK / kVqThreads;  // elements of z (and of the codebook) a thread stages per step

// (distance, code) as one 64-bit key whose unsigned order is the distance's, then the code's.
__device__ __forceinline__ unsigned long long nearest_key(float d, int code) {
  uint32_t u = __float_as_uint(d + 0.0f);            // -0 -> +0
  u = (u & 0x80000000u) ? ~u : (u | 0x80000000u);    // monotone in d
  return (static_cast<unsigned long long>(u) << 32) | static_cast<uint32_t>(code);
}

__global__ void fill_u64_kernel(unsigned long long* p, int n, unsigned long long value) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) p[i] = value;
}

// In place: the key's code (its low 32 bits) as an int64 index.
__global__ void key_to_code_kernel(int64_t* p, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) p[i] = static_cast<int64_t>(static_cast<unsigned long long>(p[i]) & 0xffffffffull);
}

template <typename T>
__global__ void __launch_bounds__(kVqThreads)  // about 170 registers: one CTA per SM, 8 warps
    vq_quantize_kernel(const T* __restrict__ z, int64_t z_s, const T* __restrict__ cb, int64_t cb_s, int N,
                       int K, int C, int split, unsigned long long* __restrict__ keys) {
  static_assert(kVqBM == kVqBN && kVqBM * kVqBK == kVqLoads * kVqThreads, "square tiles, whole loads");
  __shared__ __align__(16) float zs[kVqBK][kVqBM + 4];
  __shared__ __align__(16) float es[kVqBK][kVqBN + 4];
  const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;
  const int m0 = blockIdx.x * kVqBM;
  const int c_begin = blockIdx.y * split, c_end = min(K, c_begin + split);
  // This thread's rows and codes within a tile: 4 + 4, half a tile apart.
  const int rl[2] = {ty * 4, 64 + ty * 4}, cl[2] = {tx * 4, 64 + tx * 4};

  float best[8];
  int arg[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    best[i] = FLT_MAX;
    arg[i] = 0;
  }

  // Staging: element e = tid + kVqThreads * l of a [128 x 8] tile is (row e / 8, channel e % 8).
  float zr[kVqLoads], er[kVqLoads];
  auto fetch = [&](int n0, int k0) {
#pragma unroll
    for (int l = 0; l < kVqLoads; ++l) {
      const int e = tid + kVqThreads * l, row = e / kVqBK, gk = k0 + e % kVqBK;
      const int gm = m0 + row, gc = n0 + row;
      zr[l] = (gm < N && gk < C) ? to_float<T>(z[gm * z_s + gk]) : 0.f;
      er[l] = (gc < c_end && gk < C) ? to_float<T>(cb[gc * cb_s + gk]) : 0.f;
    }
  };
  auto stage = [&]() {
#pragma unroll
    for (int l = 0; l < kVqLoads; ++l) {
      const int e = tid + kVqThreads * l;
      zs[e % kVqBK][e / kVqBK] = zr[l];
      es[e % kVqBK][e / kVqBK] = er[l];
    }
  };

  for (int n0 = c_begin; n0 < c_end; n0 += kVqBN) {
    float acc[8][8], en[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      en[j] = 0.f;
#pragma unroll
      for (int i = 0; i < 8; ++i) acc[i][j] = 0.f;
    }
    fetch(n0, 0);
    for (int k0 = 0; k0 < C; k0 += kVqBK) {
      stage();
      __syncthreads();
      if (k0 + kVqBK < C) fetch(n0, k0 + kVqBK);  // the next channels load while these are used
#pragma unroll
      for (int kk = 0; kk < kVqBK; ++kk) {
        float a[8], bv[8];
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const float4 av = *reinterpret_cast<const float4*>(&zs[kk][rl[h]]);
          const float4 ev = *reinterpret_cast<const float4*>(&es[kk][cl[h]]);
          a[4 * h] = av.x; a[4 * h + 1] = av.y; a[4 * h + 2] = av.z; a[4 * h + 3] = av.w;
          bv[4 * h] = ev.x; bv[4 * h + 1] = ev.y; bv[4 * h + 2] = ev.z; bv[4 * h + 3] = ev.w;
        }
#pragma unroll
        for (int j = 0; j < 8; ++j) en[j] = fmaf(bv[j], bv[j], en[j]);
#pragma unroll
        for (int i = 0; i < 8; ++i)
#pragma unroll
          for (int j = 0; j < 8; ++j) acc[i][j] = fmaf(a[i], bv[j], acc[i][j]);
      }
      __syncthreads();
    }
    // Codes are visited in increasing order per thread, so a strict '<' keeps the first minimum.
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const int code = n0 + cl[j >> 2] + (j & 3);
      if (code >= c_end) continue;
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const float d = en[j] - 2.f * acc[i][j];
        if (d < best[i]) {
          best[i] = d;
          arg[i] = code;
        }
      }
    }
  }

  // The 16 threads of one ty are 16 consecutive lanes of a warp.
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    float b = best[i];
    int a = arg[i];
#pragma unroll
    for (int o = 8; o > 0; o >>= 1) {
      const float ob = __shfl_xor_sync(0xffffffffu, b, o);
      const int oa = __shfl_xor_sync(0xffffffffu, a, o);
      if (ob < b || (ob == b && oa < a)) {
        b = ob;
        a = oa;
      }
    }
    const int row = m0 + rl[i >> 2] + (i & 3);
    if (tx == 0 && row < N) atomicMin(&keys[row], nearest_key(b, a));
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

}  // namespace

void vq_quantize_cuda(const void* z, int64_t z_s, const void* codebook, int64_t cb_s, int dtype, int64_t N,
                      int64_t K, int64_t C, int64_t code_split, int64_t* out, void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (N == 0) return;
  if (code_split <= 0 || code_split % kVqBN)
    throw std::invalid_argument("vq_quantize (CUDA): code_split must be a positive multiple of 128");
  const dim3 grid(static_cast<unsigned>((N + kVqBM - 1) / kVqBM),
                  static_cast<unsigned>((K + code_split - 1) / code_split));
  const int n = static_cast<int>(N), k = static_cast<int>(K), c = static_cast<int>(C);
  const int split = static_cast<int>(code_split);
  // `out` holds the merge keys until the last kernel turns them into codes.
  unsigned long long* keys = reinterpret_cast<unsigned long long*>(out);
  const unsigned fill_blocks = static_cast<unsigned>((N + 255) / 256);
  launch(fill_u64_kernel, fill_blocks, 256, s, keys, n, ~0ull);
  check_launch("vq_quantize (init)");
  switch (dtype) {
    case kFloat32:
      launch(vq_quantize_kernel<float>, grid, kVqThreads, s, static_cast<const float*>(z), z_s,
          static_cast<const float*>(codebook), cb_s, n, k, c, split, keys);
      break;
    case kFloat16:
      launch(vq_quantize_kernel<__half>, grid, kVqThreads, s, static_cast<const __half*>(z), z_s,
          static_cast<const __half*>(codebook), cb_s, n, k, c, split, keys);
      break;
    case kBFloat16:
      launch(vq_quantize_kernel<__nv_bfloat16>, grid, kVqThreads, s, static_cast<const __nv_bfloat16*>(z), z_s,
          static_cast<const __nv_bfloat16*>(codebook), cb_s, n, k, c, split, keys);
      break;
    default:
      throw std::invalid_argument("vq_quantize (CUDA): needs float32, float16 or bfloat16");
  }
  check_launch("vq_quantize");
  launch(key_to_code_kernel, fill_blocks, 256, s, out, n);
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
