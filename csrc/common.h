// Shared by the C++ CPU paths, the CUDA kernels and the bindings: parameter
// blocks (raw pointers, sizes, element strides) and the dtype codes the Python
// side passes. Nothing here depends on libtorch or on the CUDA headers.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace worldvla {

// Element types, as numbered by worldvla/ops/native_backend.py (_DTYPE_CODE).
enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3, kInt32 = 4, kInt64 = 5 };

inline int dtype_size(int code) {
  switch (code) {
    case kFloat32: case kInt32: return 4;
    case kFloat16: case kBFloat16: return 2;
    case kFloat64: case kInt64: return 8;
  }
  throw std::invalid_argument("unknown dtype code " + std::to_string(code));
}

// "no action block": kv_block of a token outside every block (worldvla.mask.NO_BLOCK).
constexpr int32_t kNoBlock = 1 << 30;

// Chunk-masked prefill attention. Tokens of sequence `s`, position `i` live at
//   x + s * x_sb + (start_s + i) * x_st + head * x_sh      (last dim contiguous)
// where start_s = cu_seqlens[s] for a packed batch (x_sb == 0) and 0 for a
// padded one. The metadata tensors are indexed the same way with meta_sb.
struct AttnFwdParams {
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  void* o = nullptr;
  const int32_t* kv_block = nullptr;
  const int32_t* q_limit = nullptr;
  const int32_t* cu_seqlens = nullptr;  // [n_seq + 1] when packed, else null
  int64_t n_seq = 0;       // batch size (padded) or number of documents (packed)
  int64_t seq_len = 0;     // L (padded) or T, the packed batch's tokens (CUDA clamps documents to it)
  int64_t max_seqlen = 0;  // upper bound on any sequence length (grid size)
  int64_t n_heads = 0, n_kv_heads = 0, head_dim = 0;
  int64_t q_sb = 0, q_st = 0, q_sh = 0;
  int64_t k_sb = 0, k_st = 0, k_sh = 0;
  int64_t v_sb = 0, v_st = 0, v_sh = 0;
  int64_t o_sb = 0, o_st = 0, o_sh = 0;
  int64_t meta_sb = 0;
  float scale = 1.f;
  int dtype = kFloat32;
};

// Decode attention: q [B, Q, H, D] against caches [B, S, Hkv, D].
// Key s is visible to query i of sequence b iff
//   s <= q_pos[b, i]  and  s < kv_len[b]  and  not kv_block[b, s] < q_limit[b, i].
struct DecodeParams {
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  void* o = nullptr;
  const int32_t* q_pos = nullptr;    // [B, Q] contiguous
  const int32_t* q_limit = nullptr;  // [B, Q] contiguous
  const int32_t* kv_block = nullptr; // [B, kvb_sb] rows, first S entries used
  const int32_t* kv_len = nullptr;   // [B]
  int64_t batch = 0, n_q = 0, cache_len = 0;
  int64_t n_heads = 0, n_kv_heads = 0, head_dim = 0;
  int64_t q_sb = 0, q_st = 0, q_sh = 0;
  int64_t k_sb = 0, k_st = 0, k_sh = 0;
  int64_t v_sb = 0, v_st = 0, v_sh = 0;
  int64_t o_sb = 0, o_st = 0, o_sh = 0;
  int64_t kvb_sb = 0;
  float scale = 1.f;
  int dtype = kFloat32;
  // CUDA split-KV workspace (allocated by the caller):
  //   o_part [B, n_splits, Q, H, D] fp32, lse_part [B, n_splits, Q, H] fp32.
  float* o_part = nullptr;
  float* lse_part = nullptr;
  int64_t n_splits = 1;
  int64_t split_size = 0;  // keys per split, a multiple of the kernel's key tile
};

// One Chameleon decoder layer of a cached decode step (csrc/cpu/decoder.cpp), float32 on the CPU:
// y [R, D] = the layer applied to x [R, D], R = attn.batch * attn.n_q rows (row r is query r % n_q of
// sequence r / n_q), with this layer's key and value written into the cache at slots pos[r] first.
// Pre-norm:  h = x + Wo attn(rope(qnorm(Wq rms(x))), ...), y = h + Wd (silu(Wg rms(h)) * Wu rms(h));
// post-norm (swin_norm): the RMSNorms move onto the two branch outputs.
// Weights are row-major and contiguous: ln1, ln2 [D]; wq [H*Dh, D]; wk, wv [Hkv*Dh, D]; wo [D, H*Dh];
// qn_w, qn_b [H, Dh]; kn_w, kn_b [Hkv, Dh]; wg, wu [I, D]; wd [D, I]. cos, sin [R, Dh].
// `attn` carries the cache (k, v and their strides, attn.dtype its element type: float32, or bfloat16,
// written rounded to nearest even and read widened), the DecodeMeta pointers, the sizes and the
// softmax scale; its q and o are set to the layer's own scratch.
struct DecoderLayerParams {
  const float* x = nullptr;
  float* y = nullptr;
  int64_t hidden = 0, intermediate = 0;
  const float *ln1 = nullptr, *wq = nullptr, *wk = nullptr, *wv = nullptr, *wo = nullptr;
  const float *qn_w = nullptr, *qn_b = nullptr, *kn_w = nullptr, *kn_b = nullptr;
  const float *ln2 = nullptr, *wg = nullptr, *wu = nullptr, *wd = nullptr;
  const float *cos = nullptr, *sin = nullptr;
  const int64_t* pos = nullptr;  // [R] cache slots
  float rms_eps = 1e-5f, ln_eps = 1e-5f;
  bool post_norm = false;
  // The seven projections (wq, wk, wv, wo, wg, wu, wd) point at bfloat16 values (their bits): streamed
  // at half the bytes, and widened exactly, so the layer's result is the float32 layer's on those values.
  bool bf16_proj = false;
  DecodeParams attn;
};

// ---- CPU paths (csrc/cpu/*.cpp); float32 tensors, unless said otherwise ----
int cpu_vector_width();  // 16 on AVX-512 machines, else 8 (csrc/cpu/isa.cpp)
bool cpu_has_avx2();     // AVX2 + FMA (x86-64-v3): the 8-wide kernels' AVX2 builds run (csrc/cpu/isa.cpp)
void set_cpu_vector_width(int width);
void masked_attention_fwd_cpu(const AttnFwdParams& p);
// q and o float32; the cache float32, or bfloat16 (p.dtype) for up to 32 query rows per sequence.
void decode_attention_cpu(const DecodeParams& p);
void decoder_layer_cpu(const DecoderLayerParams& p);  // throws std::out_of_range for a slot outside the cache
// A whole cached decode step (csrc/cpu/decoder.cpp): the token embedding, every layer in turn and the
// final RMSNorm, for the rows of layers[0].attn (batch x n_q; every layer shares them, their positions
// layers[0].pos and their DecodeMeta). The rotary tables hold a row per position.
struct DecodeStepParams {
  const int64_t* ids = nullptr;  // [R] token ids
  // A bfloat16 model (kBFloat16): the embedding table, `out` and every layer's cache are bfloat16 and
  // its projections are streamed as they are (the layers' bf16_proj and attn.dtype say so); every
  // sum is float32, and its norms' weights come as float32 copies. Else all float32.
  int dtype = kFloat32;
  const void* embed = nullptr;  // [vocab, hidden]
  int64_t vocab = 0;
  const float *cos_table = nullptr, *sin_table = nullptr;  // [table_len, head_dim]
  int64_t table_len = 0;
  const float* final_norm = nullptr;  // [hidden]
  float final_eps = 1e-5f;
  void* out = nullptr;                     // [R, hidden]
  std::vector<DecoderLayerParams> layers;  // x, y, cos and sin are set by decode_step_cpu
};
// Throws std::out_of_range for a token id outside the vocabulary or a position outside the tables or cache.
void decode_step_cpu(const DecodeStepParams& p);
// The greedy choice over vocabulary rows [lo, hi) of an lm_head [V, H] (row stride w_s, float32 or
// bfloat16 per w_dtype), as range_argmax_cpu; float32 weights may come with their range's bfloat16
// screen (range_argmax_screened_cpu: screen [hi - lo, H] and colmax [H], else null).
struct GreedyRange {
  const void* weight = nullptr;
  int64_t w_s = 0, H = 0, lo = 0, hi = 0, max_candidates = 0;
  int w_dtype = kFloat32;
  const uint16_t* screen = nullptr;
  const float* colmax = nullptr;
};
// A world-model frame's decode in one call (csrc/cpu/decoder.cpp): for each of rows sequences, codes[r, 0]
// given, every next code chosen by `head` from the hidden state of the token fed before it, a row's last
// code fed together with `newline` (the two-row step `two`, else `one`), positions from next_pos[r] on
// (advanced). The steps' ids, positions and q_pos buffers (their bound addresses) are written as the
// engine's Python loop writes them, so the codes are that loop's.
// Greedy without `noise`. With it, a top-k / temperature draw as worldvla.ops.sampling.sample_logits
// makes it from the range's float32 logits l (range_logits_cpu): argmax of l + z over the top_k largest
// l (every l when top_k is 0), the first maximum winning, z the temperature-scaled Gumbel noise of the
// code: noise + ((i % w) * rows + r) * (hi - lo) for code i of sequence r (one image row's noise).
struct FrameDecodeParams {
  int64_t rows = 0, h = 0, w = 0, newline = 0;
  int64_t* codes = nullptr;     // [rows, h * w] vocabulary ids
  int64_t* next_pos = nullptr;  // [rows]
  GreedyRange head;
  const float* noise = nullptr;  // [w, rows, hi - lo] float32, or null: greedy
  int64_t top_k = 0;
  // Classifier-free guidance: the steps hold 2 x rows sequences, sequence rows + r the unconditional
  // branch of r, fed r's codes; each code is chosen from u + cfg_scale * (c - u) of the float32 logits
  // of the range (range_logits_cpu) of the two branches, as torch computes it (no fused multiply-add).
  bool guided = false;
  float cfg_scale = 1.f;
};
// Codes [first, last) of the frame (1 <= first; the caller walks 1 .. h*w, e.g. one at a time to stay
// interruptible; with noise, within one image row).
void decode_frame_cpu(const DecodeStepParams& one, const DecodeStepParams& two, const FrameDecodeParams& f,
                      int64_t first, int64_t last);
// The layer's stages between its projections (prefills run torch's GEMM for those; csrc/cpu/decoder.cpp).
// q [R, H, Dh], k, v [R, Hkv, Dh] (R = batch * n_q rows): q and k normed and rotated in place, k and v
// written into the cache at p.pos, the attention of q written to o [R, H, Dh]; p's projection weights unused.
void decoder_attention_block_cpu(const DecoderLayerParams& p, float* q, float* k, const float* v, float* o);
// y = x + b (b RMS-normed with w_branch first under post-norm, in place); under pre-norm with w_next,
// h = RMSNorm(y) with w_next. [R, D] each; y may be x, h may be b.
void decoder_residual_cpu(const float* x, float* b, float* y, int64_t R, int64_t D, const float* w_branch,
                          const float* w_next, float* h, float eps, bool post_norm);
void silu_mul_cpu(float* g, const float* u, int64_t n);  // g = silu(g) * u
void rms_norm_cpu(const float* x, const float* w, int64_t R, int64_t D, float eps, float* out);  // the model's RMSNorm
// z [N, C], codebook [K, C] (row strides z_s, cb_s) -> out int64 [N]
void vq_quantize_cpu(const float* z, int64_t z_s, const float* codebook, int64_t cb_s,
                     int64_t N, int64_t K, int64_t C, int64_t* out);
// indices [B, h*w] (int32 or int64) -> out [B, C, h*w]; elements copied bitwise
void vq_gather_cpu(const void* indices, int index_dtype, const void* codebook, int64_t cb_s,
                   int elem_size, int64_t B, int64_t HW, int64_t K, int64_t C, void* out);
// y[m, n] = x[m] . w[n] for m < M, n < N (row strides x_s, w_s, y_s); rows of x, w and y contiguous
void linear_cpu(const float* x, int64_t x_s, const float* w, int64_t w_s, int64_t M, int64_t K, int64_t N,
                float* y, int64_t y_s);
// The same with bfloat16 weights (their bits), each widened exactly to float32: bitwise linear_cpu's
// result on the float32 values of those weights.
void linear_bf16_cpu(const float* x, int64_t x_s, const uint16_t* w, int64_t w_s, int64_t M, int64_t K, int64_t N,
                     float* y, int64_t y_s);
// logits[n, v - lo] = hidden[n] . weight[v] for v in [lo, hi); float32 hidden and logits, the weight
// float32 or bfloat16 (w_dtype; widened exactly, as linear_bf16_cpu)
void range_logits_cpu(const float* hidden, int64_t h_s, const void* weight, int64_t w_s, int w_dtype,
                      int64_t N, int64_t H, int64_t lo, int64_t hi, float* logits);
// ids[n] = lo + argmax over [lo, hi) as torch.argmax takes it (the first maximum; the first NaN if any)
void range_argmax_cpu(const float* hidden, int64_t h_s, const void* weight, int64_t w_s, int w_dtype,
                      int64_t N, int64_t H, int64_t lo, int64_t hi, int64_t* ids);
// The same greedy choice over rows [0, R) of w32 (row stride w_s; ids in [0, R)), screened with w16,
// their bfloat16 copies [R, H] contiguous, and colmax [H], each column's largest |w32|: bitwise
// range_argmax_cpu's ids (csrc/cpu/sampling.cpp says why); a row with more than max_candidates codes
// near its top takes the float32 logits of the whole range.
void range_argmax_screened_cpu(const float* hidden, int64_t h_s, const float* w32, int64_t w_s, const uint16_t* w16,
                               const float* colmax, int64_t N, int64_t H, int64_t R, int64_t max_candidates,
                               int64_t* ids);
// The top-k / temperature draw of worldvla.ops.sampling.sample_logits given its scaled Gumbel noise z
// [N, hi - lo] (temperature x G): ids[n] = lo + the first v maximizing l_v + z_v among the top_k largest
// float32 logits l (range_logits_cpu's; all of them when top_k <= 0), bit for bit torch's float32
// operations there.
void range_sample_cpu(const float* hidden, int64_t h_s, const void* weight, int64_t w_s, int w_dtype, int64_t N,
                      int64_t H, int64_t lo, int64_t hi, const float* z, int64_t top_k, int64_t* ids);
// The same draw over rows [0, R) of w32 (ids in [0, R)), screened as range_argmax_screened_cpu: bitwise
// range_sample_cpu's ids (csrc/cpu/sampling.cpp says why).
// Choices from logits [N, R] (float32): with z (scaled Gumbel noise [N, R]) the draw of range_sample_cpu,
// else torch.argmax's (the first maximum; the first NaN where there is one). ids in [0, R).
void choose_from_logits_cpu(const float* logits, const float* z, int64_t N, int64_t R, int64_t top_k, int64_t* ids);
void range_sample_screened_cpu(const float* hidden, int64_t h_s, const float* w32, int64_t w_s, const uint16_t* w16,
                               const float* colmax, int64_t N, int64_t H, int64_t R, int64_t max_candidates,
                               const float* z, int64_t top_k, int64_t* ids);

#ifdef WORLDVLA_WITH_CUDA
// ---- CUDA launchers (csrc/cuda/*.cu); `stream` is a cudaStream_t ----
// Each launches asynchronously and throws std::runtime_error if the launch failed.
void masked_attention_fwd_cuda(const AttnFwdParams& p, void* stream);
void decode_attention_cuda(const DecodeParams& p, void* stream);
// code_split: codes per CTA, a positive multiple of 64 (the grid has ceil(K / code_split) CTAs per 64 rows)
void vq_quantize_cuda(const void* z, int64_t z_s, const void* codebook, int64_t cb_s, int dtype,
                      int64_t N, int64_t K, int64_t C, int64_t code_split, int64_t* out, void* stream);
void vq_gather_cuda(const void* indices, int index_dtype, const void* codebook, int64_t cb_s,
                    int elem_size, int64_t B, int64_t HW, int64_t K, int64_t C, void* out, void* stream);
// workspace: uint64 [N], zeroed by the caller
void range_argmax_cuda(const void* hidden, int64_t h_s, const void* weight, int64_t w_s, int dtype,
                       int64_t N, int64_t H, int64_t lo, int64_t hi, unsigned long long* workspace,
                       int64_t* ids, void* stream);
void range_logits_cuda(const void* hidden, int64_t h_s, const void* weight, int64_t w_s, int dtype,
                       int64_t N, int64_t H, int64_t lo, int64_t hi, float* logits, void* stream);
// Makes `device` current for the calling thread and returns the device current before
// (torch and this module each link their own CUDA runtime; the driver context is shared,
// so a device left current here would be torch's current device too).
int set_device_cuda(int device);
// The newest CUDA version the installed driver supports (cudaDriverGetVersion: 13000 for 13.0), 0 if it cannot
// tell, and the CUDA runtime version this module was built with and links statically (CUDART_VERSION).
int cuda_driver_version();
int cuda_runtime_version();
void restore_device_cuda(int device) noexcept;
// The prefill attention's matrix engine on the GPU: "auto" (mma.sync everywhere until the wgmma
// engines have passed the GPU tests on hardware), "mma", "wgmma" or "wgmma128" (sm_90 with an
// sm_90a build; 64 or 128 query rows per CTA).
std::string cuda_prefill_engine();
void set_cuda_prefill_engine(const std::string& name);
#endif

}  // namespace worldvla
