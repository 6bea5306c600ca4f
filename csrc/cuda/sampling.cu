// Constrained decoding: logits of a vocabulary range [lo, hi) from the final
// hidden states and the lm_head rows of that range, and their argmax.
//
// Each warp takes 4 vocabulary rows and up to 4 hidden rows at a time (16 dot
// products sharing every 16-byte load); the weight rows of the range are read
// once per group of 4 hidden rows. The argmax packs (order-preserving logit
// bits, inverted index) into 64 bits and uses atomicMax, so the largest logit
// wins and ties go to the lowest id, as in torch.argmax. As there, a NaN logit
// (of either sign, any payload) is above every number: the first NaN wins.
#include "cuda_common.cuh"

namespace worldvla {
namespace {

constexpr int kRows = 4;          // vocab rows per warp step
constexpr int kHid = 4;           // hidden rows per pass
constexpr int kWarpsPerCta = 8;

template <typename T>
struct Vec;  // one 16-byte load as floats
template <>
struct Vec<float> {
  static constexpr int N = 4;
  __device__ static void load(const float* p, float (&x)[4]) {
    const float4 v = *reinterpret_cast<const float4*>(p);
    x[0] = v.x; x[1] = v.y; x[2] = v.z; x[3] = v.w;
  }
};
template <typename T16>
struct Vec16 {
  static constexpr int N = 8;
  __device__ static void load(const T16* p, float (&x)[8]) {
    const uint4 v = *reinterpret_cast<const uint4*>(p);
    const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 f = unpack2<T16>(w[i]);
      x[2 * i] = f.x;
      x[2 * i + 1] = f.y;
    }
  }
};
template <>
struct Vec<__half> : Vec16<__half> {};
template <>
struct Vec<__nv_bfloat16> : Vec16<__nv_bfloat16> {};

__device__ __forceinline__ unsigned long long argmax_key(float x, int v) {
  x += 0.0f;  // -0 -> +0, so the two zeros tie (the lower id wins) as in torch.argmax
  const uint32_t b = __float_as_uint(x);
  uint32_t u = (b & 0x80000000u) ? ~b : (b | 0x80000000u);  // monotone in x
  // Every NaN takes the one key above +inf's: a NaN with the sign bit set (what x86 makes of
  // inf - inf) would map below -inf, and NaNs would otherwise rank by payload, not by id.
  if ((b & 0x7fffffffu) > 0x7f800000u) u = 0xffffffffu;
  return (static_cast<unsigned long long>(u) << 32) | static_cast<unsigned long long>(0xffffffffu - v);
}

template <typename T, bool kArgmax>
__global__ void __launch_bounds__(kWarpsPerCta * 32)
    range_dot_kernel(const T* __restrict__ hidden, int64_t h_s, const T* __restrict__ weight, int64_t w_s, int N,
                     int H, int lo, int R, float* __restrict__ logits, unsigned long long* __restrict__ best) {
  constexpr int V = Vec<T>::N;
  const int lane = threadIdx.x & 31;
  const int v0 = (blockIdx.x * kWarpsPerCta + (threadIdx.x >> 5)) * kRows;
  if (v0 >= R) return;  // whole warp
  const T* wr[kRows];
#pragma unroll
  for (int j = 0; j < kRows; ++j) wr[j] = weight + static_cast<int64_t>(lo + min(v0 + j, R - 1)) * w_s;

  for (int n0 = 0; n0 < N; n0 += kHid) {
    const T* hr[kHid];
#pragma unroll
    for (int i = 0; i < kHid; ++i) hr[i] = hidden + static_cast<int64_t>(min(n0 + i, N - 1)) * h_s;
    float acc[kHid][kRows];
#pragma unroll
    for (int i = 0; i < kHid; ++i)
#pragma unroll
      for (int j = 0; j < kRows; ++j) acc[i][j] = 0.f;
    for (int c = lane * V; c < H; c += 32 * V) {
      float w[kRows][V], x[V];
#pragma unroll
      for (int j = 0; j < kRows; ++j) Vec<T>::load(wr[j] + c, w[j]);
#pragma unroll
      for (int i = 0; i < kHid; ++i) {
        Vec<T>::load(hr[i] + c, x);
#pragma unroll
        for (int j = 0; j < kRows; ++j)
#pragma unroll
          for (int e = 0; e < V; ++e) acc[i][j] = fmaf(x[e], w[j][e], acc[i][j]);
      }
    }
#pragma unroll
    for (int i = 0; i < kHid; ++i)
#pragma unroll
      for (int j = 0; j < kRows; ++j) acc[i][j] = warp_sum(acc[i][j]);
    if (lane == 0) {
#pragma unroll
      for (int i = 0; i < kHid; ++i) {
        if (n0 + i >= N) continue;
#pragma unroll
        for (int j = 0; j < kRows; ++j) {
          if (v0 + j >= R) continue;
          if (kArgmax)
            atomicMax(&best[n0 + i], argmax_key(acc[i][j], v0 + j));
          else
            logits[static_cast<int64_t>(n0 + i) * R + v0 + j] = acc[i][j];
        }
      }
    }
  }
}

__global__ void argmax_zero_kernel(unsigned long long* best, int N) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < N) best[i] = 0ull;
}

__global__ void argmax_finish_kernel(const unsigned long long* __restrict__ best, int N, int64_t lo,
                                     int64_t* __restrict__ ids) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < N) ids[i] = lo + static_cast<int64_t>(0xffffffffu - static_cast<uint32_t>(best[i] & 0xffffffffull));
}

template <bool kArgmax>
void launch_range(const void* hidden, int64_t h_s, const void* weight, int64_t w_s, int dtype, int N, int H, int lo,
                  int R, float* logits, unsigned long long* best, cudaStream_t s) {
  const unsigned blocks = static_cast<unsigned>((R + kWarpsPerCta * kRows - 1) / (kWarpsPerCta * kRows));
  const int threads = kWarpsPerCta * 32;
  switch (dtype) {
    case kFloat32:
      launch(range_dot_kernel<float, kArgmax>, blocks, threads, s, static_cast<const float*>(hidden), h_s,
          static_cast<const float*>(weight), w_s, N, H, lo, R, logits, best);
      break;
    case kFloat16:
      launch(range_dot_kernel<__half, kArgmax>, blocks, threads, s, static_cast<const __half*>(hidden), h_s,
          static_cast<const __half*>(weight), w_s, N, H, lo, R, logits, best);
      break;
    case kBFloat16:
      launch(range_dot_kernel<__nv_bfloat16, kArgmax>, blocks, threads, s, static_cast<const __nv_bfloat16*>(hidden),
          h_s, static_cast<const __nv_bfloat16*>(weight), w_s, N, H, lo, R, logits, best);
      break;
    default:
      throw std::invalid_argument("constrained sampling (CUDA): needs float32, float16 or bfloat16");
  }
}

// The kernel reads rows with 16-byte loads. The Python wrapper checks CUDA tensors for that; the
// launchers check again (in the wrapper's words) for callers it does not see, such as the emulator's
// tests on host tensors, which would otherwise fault on a misaligned load or read past a row.
void check_rows(const char* op, const void* hidden, int64_t h_s, const void* weight, int64_t w_s, int dtype,
                int64_t H) {
  if (dtype != kFloat32 && dtype != kFloat16 && dtype != kBFloat16)
    throw std::invalid_argument(std::string(op) + " (CUDA): needs float32, float16 or bfloat16");
  const int64_t vec = dtype == kFloat32 ? 4 : 8;  // values per 16-byte load
  if (H % vec)
    throw std::invalid_argument(std::string(op) + " (CUDA): needs the hidden size to be a multiple of " +
                                std::to_string(vec) + ", got " + std::to_string(H));
  const bool aligned = reinterpret_cast<uintptr_t>(hidden) % 16 == 0 && reinterpret_cast<uintptr_t>(weight) % 16 == 0;
  if (h_s % vec || w_s % vec || !aligned)
    throw std::invalid_argument(std::string(op) + " (CUDA): hidden and weight rows must start on 16-byte boundaries "
                                "(row strides multiples of " + std::to_string(vec) + " values, aligned data pointers)");
}

}  // namespace

void range_argmax_cuda(const void* hidden, int64_t h_s, const void* weight, int64_t w_s, int dtype, int64_t N,
                       int64_t H, int64_t lo, int64_t hi, unsigned long long* workspace, int64_t* ids, void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (N == 0) return;
  check_rows("constrained_argmax", hidden, h_s, weight, w_s, dtype, H);
  const char* op = "constrained_argmax";
  const int n = int32_size(N, op, "rows");
  launch(argmax_zero_kernel, (n + 127) / 128, 128, s, workspace, n);
  check_launch("constrained_argmax (init)");
  launch_range<true>(hidden, h_s, weight, w_s, dtype, n, int32_size(H, op, "hidden size"),
                     int32_size(lo, op, "range start"), int32_size(hi - lo, op, "range size"), nullptr, workspace, s);
  check_launch("constrained_argmax");
  launch(argmax_finish_kernel, (n + 127) / 128, 128, s, workspace, n, lo, ids);
  check_launch("constrained_argmax (finish)");
}

void range_logits_cuda(const void* hidden, int64_t h_s, const void* weight, int64_t w_s, int dtype, int64_t N,
                       int64_t H, int64_t lo, int64_t hi, float* logits, void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (N == 0) return;
  check_rows("range_logits", hidden, h_s, weight, w_s, dtype, H);
  const char* op = "range_logits";
  launch_range<false>(hidden, h_s, weight, w_s, dtype, int32_size(N, op, "rows"), int32_size(H, op, "hidden size"),
                      int32_size(lo, op, "range start"), int32_size(hi - lo, op, "range size"), logits, nullptr, s);
  check_launch("range_logits");
}

}  // namespace worldvla
