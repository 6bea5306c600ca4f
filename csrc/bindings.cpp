// The one pybind11 binding file of worldvla._C. Ops take raw pointers, shapes,
// strides and a stream handle, so the module does not link libtorch and one
// build serves every supported torch version.
//
// Every op takes `device` first: -1 runs the C++ CPU path (float32 only), a
// CUDA device index runs the CUDA kernel asynchronously on `stream` (a
// cudaStream_t as an integer). worldvla/ops/native_backend.py validates dtypes,
// devices, shapes, strides and alignment before calling in; the checks here
// only guard against calls that bypass it.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <cstdint>
#include <vector>

#include "common.h"

namespace py = pybind11;
using namespace worldvla;

namespace {

using Strides = std::array<int64_t, 3>;

template <typename T>
T* ptr(int64_t p) {
  return reinterpret_cast<T*>(static_cast<uintptr_t>(p));
}

// The tensors' device is current for one call; the caller's device is current again afterwards.
struct DeviceScope {
  int prev = -1;
  explicit DeviceScope(int device) {
#ifdef WORLDVLA_WITH_CUDA
    if (device >= 0) prev = set_device_cuda(device);
#endif
  }
  ~DeviceScope() {
#ifdef WORLDVLA_WITH_CUDA
    restore_device_cuda(prev);
#endif
  }
  DeviceScope(const DeviceScope&) = delete;
  DeviceScope& operator=(const DeviceScope&) = delete;
};

bool on_cpu(int device, int dtype, const char* op) {
  if (device < 0) {
    if (dtype != kFloat32)
      throw std::invalid_argument(std::string(op) + ": the CPU path takes float32 tensors");
    return true;
  }
#ifdef WORLDVLA_WITH_CUDA
  return false;
#else
  throw std::runtime_error(std::string(op) + ": worldvla._C was built without CUDA");
#endif
}

void masked_attention_fwd(int device, int64_t stream, int dtype, int64_t q, int64_t k, int64_t v, int64_t o,
                          int64_t kv_block, int64_t q_limit, int64_t cu_seqlens, int64_t n_seq, int64_t seq_len,
                          int64_t max_seqlen, int64_t n_heads, int64_t n_kv_heads, int64_t head_dim, Strides qs,
                          Strides ks, Strides vs, Strides os, int64_t meta_sb, double scale) {
  if (n_kv_heads <= 0 || n_heads % n_kv_heads)
    throw std::invalid_argument("masked_attention: n_kv_heads must divide n_heads");
  AttnFwdParams p;
  p.q = ptr<const void>(q);
  p.k = ptr<const void>(k);
  p.v = ptr<const void>(v);
  p.o = ptr<void>(o);
  p.kv_block = ptr<const int32_t>(kv_block);
  p.q_limit = ptr<const int32_t>(q_limit);
  p.cu_seqlens = ptr<const int32_t>(cu_seqlens);
  p.n_seq = n_seq;
  p.seq_len = seq_len;
  p.max_seqlen = max_seqlen;
  p.n_heads = n_heads;
  p.n_kv_heads = n_kv_heads;
  p.head_dim = head_dim;
  p.q_sb = qs[0]; p.q_st = qs[1]; p.q_sh = qs[2];
  p.k_sb = ks[0]; p.k_st = ks[1]; p.k_sh = ks[2];
  p.v_sb = vs[0]; p.v_st = vs[1]; p.v_sh = vs[2];
  p.o_sb = os[0]; p.o_st = os[1]; p.o_sh = os[2];
  p.meta_sb = meta_sb;
  p.scale = static_cast<float>(scale);
  p.dtype = dtype;
  DeviceScope scope(device);
  if (on_cpu(device, dtype, "masked_attention")) {
    py::gil_scoped_release nogil;
    masked_attention_fwd_cpu(p);
    return;
  }
#ifdef WORLDVLA_WITH_CUDA
  masked_attention_fwd_cuda(p, ptr<void>(stream));
#endif
}

// The cache and DecodeMeta half of DecodeParams, shared by decode_attention and decoder_layer.
DecodeParams decode_params(int64_t k, int64_t v, int64_t q_pos, int64_t q_limit, int64_t kv_block, int64_t kv_len,
                           int64_t batch, int64_t n_q, int64_t cache_len, int64_t n_heads, int64_t n_kv_heads,
                           int64_t head_dim, const Strides& ks, const Strides& vs, int64_t kvb_sb, double scale) {
  if (n_kv_heads <= 0 || n_heads % n_kv_heads)
    throw std::invalid_argument("decode attention: n_kv_heads must divide n_heads");
  DecodeParams p;
  p.k = ptr<const void>(k);
  p.v = ptr<const void>(v);
  p.q_pos = ptr<const int32_t>(q_pos);
  p.q_limit = ptr<const int32_t>(q_limit);
  p.kv_block = ptr<const int32_t>(kv_block);
  p.kv_len = ptr<const int32_t>(kv_len);
  p.batch = batch;
  p.n_q = n_q;
  p.cache_len = cache_len;
  p.n_heads = n_heads;
  p.n_kv_heads = n_kv_heads;
  p.head_dim = head_dim;
  p.k_sb = ks[0]; p.k_st = ks[1]; p.k_sh = ks[2];
  p.v_sb = vs[0]; p.v_st = vs[1]; p.v_sh = vs[2];
  p.kvb_sb = kvb_sb;
  p.scale = static_cast<float>(scale);
  return p;
}

void decode_attention(int device, int64_t stream, int dtype, int64_t q, int64_t k, int64_t v, int64_t o,
                      int64_t q_pos, int64_t q_limit, int64_t kv_block, int64_t kv_len, int64_t batch, int64_t n_q,
                      int64_t cache_len, int64_t n_heads, int64_t n_kv_heads, int64_t head_dim, Strides qs,
                      Strides ks, Strides vs, Strides os, int64_t kvb_sb, double scale, int64_t o_part,
                      int64_t lse_part, int64_t n_splits, int64_t split_size) {
  DecodeParams p = decode_params(k, v, q_pos, q_limit, kv_block, kv_len, batch, n_q, cache_len, n_heads, n_kv_heads,
                                 head_dim, ks, vs, kvb_sb, scale);
  p.q = ptr<const void>(q);
  p.o = ptr<void>(o);
  p.q_sb = qs[0]; p.q_st = qs[1]; p.q_sh = qs[2];
  p.o_sb = os[0]; p.o_st = os[1]; p.o_sh = os[2];
  p.dtype = dtype;
  p.o_part = ptr<float>(o_part);
  p.lse_part = ptr<float>(lse_part);
  p.n_splits = n_splits;
  p.split_size = split_size;
  DeviceScope scope(device);
  if (device < 0) {  // q and o float32; dtype the cache's, float32 or bfloat16 (decode_attention_cpu checks)
    py::gil_scoped_release nogil;
    decode_attention_cpu(p);
    return;
  }
  on_cpu(device, dtype, "decode_attention");
#ifdef WORLDVLA_WITH_CUDA
  decode_attention_cuda(p, ptr<void>(stream));
#endif
}

void vq_quantize(int device, int64_t stream, int dtype, int64_t z, int64_t z_s, int64_t codebook, int64_t cb_s,
                 int64_t N, int64_t K, int64_t C, int64_t out, int64_t code_split) {
  DeviceScope scope(device);
  if (on_cpu(device, dtype, "vq_quantize")) {
    py::gil_scoped_release nogil;
    vq_quantize_cpu(ptr<const float>(z), z_s, ptr<const float>(codebook), cb_s, N, K, C, ptr<int64_t>(out));
    return;
  }
#ifdef WORLDVLA_WITH_CUDA
  vq_quantize_cuda(ptr<const void>(z), z_s, ptr<const void>(codebook), cb_s, dtype, N, K, C, code_split,
                   ptr<int64_t>(out), ptr<void>(stream));
#endif
}

void vq_gather(int device, int64_t stream, int64_t indices, int index_dtype, int64_t codebook, int64_t cb_s,
               int elem_size, int64_t B, int64_t HW, int64_t K, int64_t C, int64_t out) {
  // Bitwise copy: any element type of the right size works on either device.
  if (device < 0) {
    py::gil_scoped_release nogil;
    vq_gather_cpu(ptr<const void>(indices), index_dtype, ptr<const void>(codebook), cb_s, elem_size, B, HW, K, C,
                  ptr<void>(out));
    return;
  }
#ifdef WORLDVLA_WITH_CUDA
  DeviceScope scope(device);
  vq_gather_cuda(ptr<const void>(indices), index_dtype, ptr<const void>(codebook), cb_s, elem_size, B, HW, K, C,
                 ptr<void>(out), ptr<void>(stream));
#else
  throw std::runtime_error("vq_gather: worldvla._C was built without CUDA");
#endif
}

void range_argmax(int device, int64_t stream, int dtype, int64_t hidden, int64_t h_s, int64_t weight, int64_t w_s,
                  int64_t N, int64_t H, int64_t lo, int64_t hi, int64_t workspace, int64_t ids) {
  if (hi <= lo) throw std::invalid_argument("constrained_argmax: empty vocabulary range");
  DeviceScope scope(device);
  if (device < 0) {  // hidden float32; dtype the weight's, float32 or bfloat16 (range_logits_cpu checks)
    py::gil_scoped_release nogil;
    range_argmax_cpu(ptr<const float>(hidden), h_s, ptr<const void>(weight), w_s, dtype, N, H, lo, hi,
                     ptr<int64_t>(ids));
    return;
  }
  on_cpu(device, dtype, "constrained_argmax");
#ifdef WORLDVLA_WITH_CUDA
  range_argmax_cuda(ptr<const void>(hidden), h_s, ptr<const void>(weight), w_s, dtype, N, H, lo, hi,
                    ptr<unsigned long long>(workspace), ptr<int64_t>(ids), ptr<void>(stream));
#endif
}

void range_argmax_screened(int64_t hidden, int64_t h_s, int64_t w32, int64_t w_s, int64_t w16, int64_t colmax,
                           int64_t N, int64_t H, int64_t R, int64_t max_candidates, int64_t ids) {
  if (R <= 0) throw std::invalid_argument("constrained_argmax: empty vocabulary range");
  py::gil_scoped_release nogil;
  range_argmax_screened_cpu(ptr<const float>(hidden), h_s, ptr<const float>(w32), w_s, ptr<const uint16_t>(w16),
                            ptr<const float>(colmax), N, H, R, max_candidates, ptr<int64_t>(ids));
}

void range_sample(int64_t hidden, int64_t h_s, int64_t weight, int64_t w_s, int dtype, int64_t N, int64_t H,
                  int64_t lo, int64_t hi, int64_t z, int64_t top_k, int64_t ids) {
  if (hi <= lo) throw std::invalid_argument("range_sample: empty vocabulary range");
  py::gil_scoped_release nogil;
  range_sample_cpu(ptr<const float>(hidden), h_s, ptr<const void>(weight), w_s, dtype, N, H, lo, hi,
                   ptr<const float>(z), top_k, ptr<int64_t>(ids));
}

void range_sample_screened(int64_t hidden, int64_t h_s, int64_t w32, int64_t w_s, int64_t w16, int64_t colmax,
                           int64_t N, int64_t H, int64_t R, int64_t max_candidates, int64_t z, int64_t top_k,
                           int64_t ids) {
  if (R <= 0) throw std::invalid_argument("range_sample: empty vocabulary range");
  py::gil_scoped_release nogil;
  range_sample_screened_cpu(ptr<const float>(hidden), h_s, ptr<const float>(w32), w_s, ptr<const uint16_t>(w16),
                            ptr<const float>(colmax), N, H, R, max_candidates, ptr<const float>(z), top_k,
                            ptr<int64_t>(ids));
}

void range_logits(int device, int64_t stream, int dtype, int64_t hidden, int64_t h_s, int64_t weight, int64_t w_s,
                  int64_t N, int64_t H, int64_t lo, int64_t hi, int64_t logits) {
  if (hi <= lo) throw std::invalid_argument("range_logits: empty vocabulary range");
  DeviceScope scope(device);
  if (device < 0) {  // as range_argmax
    py::gil_scoped_release nogil;
    range_logits_cpu(ptr<const float>(hidden), h_s, ptr<const void>(weight), w_s, dtype, N, H, lo, hi,
                     ptr<float>(logits));
    return;
  }
  on_cpu(device, dtype, "range_logits");
#ifdef WORLDVLA_WITH_CUDA
  range_logits_cuda(ptr<const void>(hidden), h_s, ptr<const void>(weight), w_s, dtype, N, H, lo, hi,
                    ptr<float>(logits), ptr<void>(stream));
#endif
}

void linear(int device, int64_t x, int64_t x_s, int64_t w, int64_t w_s, int64_t M, int64_t K, int64_t N, int64_t y,
            int64_t y_s) {
  // CPU only: on GPUs cuBLAS is the fast path for these shapes.
  if (device >= 0) throw std::invalid_argument("linear: the native path runs on the CPU only");
  py::gil_scoped_release nogil;
  linear_cpu(ptr<const float>(x), x_s, ptr<const float>(w), w_s, M, K, N, ptr<float>(y), y_s);
}

void linear_bf16(int64_t x, int64_t x_s, int64_t w, int64_t w_s, int64_t M, int64_t K, int64_t N, int64_t y,
                 int64_t y_s) {
  py::gil_scoped_release nogil;
  linear_bf16_cpu(ptr<const float>(x), x_s, ptr<const uint16_t>(w), w_s, M, K, N, ptr<float>(y), y_s);
}

DecoderLayerParams layer_params(int64_t x, int64_t y, int64_t hidden, int64_t intermediate, std::array<int64_t, 13> w,
                   int64_t cos, int64_t sin, int64_t pos, double rms_eps, double ln_eps, bool post_norm,
                   int64_t k_cache, int64_t v_cache, int64_t q_pos, int64_t q_limit, int64_t kv_block,
                   int64_t kv_len, int64_t batch, int64_t n_q, int64_t cache_len, int64_t n_heads,
                   int64_t n_kv_heads, int64_t head_dim, Strides ks, Strides vs, int64_t kvb_sb, double scale) {
  if (head_dim % 2) throw std::invalid_argument("decoder_layer: head_dim must be even (rotary halves)");
  DecoderLayerParams p;
  p.x = ptr<const float>(x);
  p.y = ptr<float>(y);
  p.hidden = hidden;
  p.intermediate = intermediate;
  const float** dst[13] = {&p.ln1, &p.wq, &p.wk, &p.wv, &p.wo, &p.qn_w, &p.qn_b,
                           &p.kn_w, &p.kn_b, &p.ln2, &p.wg, &p.wu, &p.wd};
  for (int i = 0; i < 13; ++i) *dst[i] = ptr<const float>(w[i]);
  p.cos = ptr<const float>(cos);
  p.sin = ptr<const float>(sin);
  p.pos = ptr<const int64_t>(pos);
  p.rms_eps = static_cast<float>(rms_eps);
  p.ln_eps = static_cast<float>(ln_eps);
  p.post_norm = post_norm;
  p.attn = decode_params(k_cache, v_cache, q_pos, q_limit, kv_block, kv_len, batch, n_q, cache_len, n_heads,
                         n_kv_heads, head_dim, ks, vs, kvb_sb, scale);
  p.attn.split_size = cache_len;
  return p;
}

void decoder_layer(int64_t x, int64_t y, int64_t hidden, int64_t intermediate, std::array<int64_t, 13> w,
                   int64_t cos, int64_t sin, int64_t pos, double rms_eps, double ln_eps, bool post_norm,
                   int64_t k_cache, int64_t v_cache, int64_t q_pos, int64_t q_limit, int64_t kv_block,
                   int64_t kv_len, int64_t batch, int64_t n_q, int64_t cache_len, int64_t n_heads,
                   int64_t n_kv_heads, int64_t head_dim, Strides ks, Strides vs, int64_t kvb_sb, double scale) {
  DecoderLayerParams p = layer_params(x, y, hidden, intermediate, w, cos, sin, pos, rms_eps, ln_eps, post_norm,
                                      k_cache, v_cache, q_pos, q_limit, kv_block, kv_len, batch, n_q, cache_len,
                                      n_heads, n_kv_heads, head_dim, ks, vs, kvb_sb, scale);
  py::gil_scoped_release nogil;
  decoder_layer_cpu(p);
}

// The same layer's attention stage alone (the prefill route: torch projects q, k, v and o); `w` as in
// decoder_layer, of which only the head norms (qn_w, qn_b, kn_w, kn_b) are read.
void decoder_attention_block(int64_t q, int64_t k, int64_t v, int64_t o, std::array<int64_t, 13> w, int64_t cos,
                             int64_t sin, int64_t pos, double ln_eps, int64_t k_cache, int64_t v_cache,
                             int64_t q_pos, int64_t q_limit, int64_t kv_block, int64_t kv_len, int64_t batch,
                             int64_t n_q, int64_t cache_len, int64_t n_heads, int64_t n_kv_heads, int64_t head_dim,
                             Strides ks, Strides vs, int64_t kvb_sb, double scale) {
  DecoderLayerParams p = layer_params(0, 0, 0, 0, w, cos, sin, pos, 0.0, ln_eps, false, k_cache, v_cache, q_pos,
                                      q_limit, kv_block, kv_len, batch, n_q, cache_len, n_heads, n_kv_heads,
                                      head_dim, ks, vs, kvb_sb, scale);
  py::gil_scoped_release nogil;
  decoder_attention_block_cpu(p, ptr<float>(q), ptr<float>(k), ptr<const float>(v), ptr<float>(o));
}

void decoder_residual(int64_t x, int64_t b, int64_t y, int64_t R, int64_t D, int64_t w_branch, int64_t w_next,
                      int64_t h, double eps, bool post_norm) {
  py::gil_scoped_release nogil;
  decoder_residual_cpu(ptr<const float>(x), ptr<float>(b), ptr<float>(y), R, D, ptr<const float>(w_branch),
                       ptr<const float>(w_next), ptr<float>(h), static_cast<float>(eps), post_norm);
}

void rms_norm(int64_t x, int64_t w, int64_t R, int64_t D, double eps, int64_t out) {
  py::gil_scoped_release nogil;
  rms_norm_cpu(ptr<const float>(x), ptr<const float>(w), R, D, static_cast<float>(eps), ptr<float>(out));
}

void silu_mul(int64_t g, int64_t u, int64_t n) {
  py::gil_scoped_release nogil;
  silu_mul_cpu(ptr<float>(g), ptr<const float>(u), n);
}

// A whole decode step with its addresses fixed once (the engine's static step buffers, cache and
// weights), so that a step costs one call without arguments: the CPU's counterpart of a CUDA graph.
// `weights[l]` as in decoder_layer, `k_caches[l]`, `v_caches[l]` layer l's [B, S, Hkv, Dh] cache;
// the rest as in decoder_layer, shared by every layer.
class DecodeStep {
 public:
  DecodeStep(int64_t ids, int64_t embed, int64_t vocab, int64_t cos_table, int64_t sin_table, int64_t table_len,
             int64_t final_norm, double final_eps, int64_t out, const std::vector<std::array<int64_t, 13>>& weights,
             const std::vector<int64_t>& k_caches, const std::vector<int64_t>& v_caches, int64_t hidden,
             int64_t intermediate, int64_t pos, double rms_eps, double ln_eps, bool post_norm, int64_t q_pos,
             int64_t q_limit, int64_t kv_block, int64_t kv_len, int64_t batch, int64_t n_q, int64_t cache_len,
             int64_t n_heads, int64_t n_kv_heads, int64_t head_dim, Strides ks, Strides vs, int64_t kvb_sb,
             double scale, bool bf16_proj, int dtype) {
    if (weights.empty() || weights.size() != k_caches.size() || weights.size() != v_caches.size())
      throw std::invalid_argument("DecodeStep: one weight set and one K and V cache per layer, at least one layer");
    if (dtype != kFloat32 && dtype != kBFloat16)
      throw std::invalid_argument("DecodeStep: a float32 or bfloat16 model");
    p_.dtype = dtype;
    p_.ids = ptr<const int64_t>(ids);
    p_.embed = ptr<const void>(embed);
    p_.vocab = vocab;
    p_.cos_table = ptr<const float>(cos_table);
    p_.sin_table = ptr<const float>(sin_table);
    p_.table_len = table_len;
    p_.final_norm = ptr<const float>(final_norm);
    p_.final_eps = static_cast<float>(final_eps);
    p_.out = ptr<void>(out);
    for (size_t l = 0; l < weights.size(); ++l) {
      p_.layers.push_back(layer_params(0, 0, hidden, intermediate, weights[l], 0, 0, pos, rms_eps, ln_eps, post_norm,
                                       k_caches[l], v_caches[l], q_pos, q_limit, kv_block, kv_len, batch, n_q,
                                       cache_len, n_heads, n_kv_heads, head_dim, ks, vs, kvb_sb, scale));
      p_.layers.back().bf16_proj = bf16_proj || dtype == kBFloat16;
      p_.layers.back().attn.dtype = dtype;
    }
  }

  void run() const {
    py::gil_scoped_release nogil;
    decode_step_cpu(p_);
  }

  const DecodeStepParams& params() const { return p_; }

 private:
  DecodeStepParams p_;
};

void decode_frame(const DecodeStep& one, const DecodeStep& two, int64_t rows, int64_t h, int64_t w, int64_t newline,
                  int64_t codes, int64_t next_pos, int64_t weight, int64_t w_s, int w_dtype, int64_t H, int64_t lo,
                  int64_t hi, int64_t screen, int64_t colmax, int64_t max_candidates, int64_t first, int64_t last,
                  int64_t noise, int64_t top_k, bool guided, double cfg_scale) {
  if (hi <= lo) throw std::invalid_argument("decode_frame: empty vocabulary range");
  FrameDecodeParams f;
  f.rows = rows;
  f.h = h;
  f.w = w;
  f.newline = newline;
  f.codes = ptr<int64_t>(codes);
  f.next_pos = ptr<int64_t>(next_pos);
  f.head.weight = ptr<const void>(weight);
  f.head.w_s = w_s;
  f.head.w_dtype = w_dtype;
  f.head.H = H;
  f.head.lo = lo;
  f.head.hi = hi;
  f.head.screen = ptr<const uint16_t>(screen);
  f.head.colmax = ptr<const float>(colmax);
  f.head.max_candidates = max_candidates;
  f.noise = ptr<const float>(noise);
  f.top_k = top_k;
  f.guided = guided;
  f.cfg_scale = static_cast<float>(cfg_scale);  // torch multiplies a float32 tensor by a Python float as float32
  // A code at a time, the GIL released for each, so that Ctrl-C stops a long frame (a 7B model's takes
  // minutes on a CPU) between two steps; a step costs hundreds of microseconds, the GIL about one.
  for (int64_t i = first; i < last; ++i) {
    {
      py::gil_scoped_release nogil;
      decode_frame_cpu(one.params(), two.params(), f, i, i + 1);
    }
    if (PyErr_CheckSignals() != 0) throw py::error_already_set();
  }
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "worldvla native kernels (C++ CPU paths, CUDA when built with it)";
#ifdef WORLDVLA_WITH_CUDA
  m.attr("with_cuda") = true;
  // CMake's architecture list, comma-separated: "90a-real", "80;86" -> "80,86", ...
  m.attr("cuda_archs") = WORLDVLA_CUDA_ARCHS;
  m.attr("cuda_runtime_version") = cuda_runtime_version();
  m.def("cuda_driver_version", &cuda_driver_version,
        "The newest CUDA version the installed driver supports (13000 for 13.0); 0 if it cannot tell.");
#else
  m.attr("with_cuda") = false;
  m.attr("cuda_archs") = "";
#endif
  m.attr("NO_BLOCK") = kNoBlock;
  m.def("masked_attention_fwd", &masked_attention_fwd,
        "Chunk-masked prefill attention: q/k/v/o pointers, metadata pointers, sizes, (batch, token, head) "
        "element strides of q, k, v, o, metadata batch stride, softmax scale.");
  m.def("decode_attention", &decode_attention,
        "Decode attention against a KV cache under DecodeMeta; CUDA uses the caller's split-KV workspace.");
  m.def("vq_quantize", &vq_quantize,
        "Nearest codebook entry per row of z (int64 out); CUDA splits the codebook in code_split codes per CTA.");
  m.def("vq_gather", &vq_gather, "Codebook rows for indices [B, h*w] into out [B, C, h*w].");
  m.def("linear", &linear,
        "y [M, N] = x [M, K] w [N, K]^T in float32 on the CPU (pointers and row strides), tuned for few rows.");
  m.def("linear_bf16", &linear_bf16,
        "linear with bfloat16 weights [N, K] (CPU): each widened exactly, bitwise linear on their float32 values.");
  m.def("decoder_layer", &decoder_layer,
        "One decoder layer of a cached decode step on the CPU (float32): x -> y [R, D], the layer's key and "
        "value written into its cache slots; weights (ln1, wq, wk, wv, wo, qn_w, qn_b, kn_w, kn_b, ln2, wg, "
        "wu, wd) contiguous.");
  m.def("decoder_attention_block", &decoder_attention_block,
        "decoder_layer's attention stage on projected q, k, v (CPU, float32): head norms and rotary in place on "
        "q and k, k and v into the cache, attention into o.");
  m.def("decoder_residual", &decoder_residual,
        "y = x + b (b normed first under post-norm); under pre-norm with w_next, h = RMSNorm(y) (CPU, float32).");
  m.def("rms_norm", &rms_norm, "out = RMSNorm(x) * w over rows [R, D] (CPU, float32; the mean in double).");
  m.def("silu_mul", &silu_mul, "g = silu(g) * u over n floats (CPU, float32).");
  py::class_<DecodeStep>(m, "DecodeStep",
                         "A cached decode step on the CPU with every address fixed at construction: token "
                         "embedding, every decoder layer, final RMSNorm into `out`. With bf16_proj the seven "
                         "projections' weights are bfloat16 (their exact float32 values, at half the bytes). dtype: "
                         "the model's (float32, or bfloat16: embedding, caches, projections and out bfloat16, the "
                         "norms' weights float32 copies, every sum float32).")
      .def(py::init<int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, double, int64_t,
                    const std::vector<std::array<int64_t, 13>>&, const std::vector<int64_t>&,
                    const std::vector<int64_t>&, int64_t, int64_t, int64_t, double, double, bool, int64_t, int64_t,
                    int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, Strides, Strides, int64_t,
                    double, bool, int>())
      .def("run", &DecodeStep::run, "Run the step on the buffers' current contents.");
  m.def("decode_frame", &decode_frame,
        "A world-model frame's codes [first, last) in one call on the CPU: a one-row and a two-row DecodeStep "
        "(the engine's, on its buffers), codes [rows, h*w] (column 0 given), next positions [rows], the lm_head "
        "range's pointers (and its bfloat16 screen for greedy float32 choices, or 0); greedy without noise, else "
        "sample_logits' draw with the image row's scaled Gumbel noise [w, rows, hi - lo] and top_k (0: all); guided: "
        "steps of 2 x rows sequences (the unconditional branches after) and the guidance scale.");
  m.def("range_argmax", &range_argmax, "Greedy token over the vocabulary range [lo, hi) (int64 out).");
  m.def("range_argmax_screened", &range_argmax_screened,
        "range_argmax on the CPU screened with bfloat16 copies of the range's rows (bitwise its ids).");
  m.def("range_logits", &range_logits, "float32 logits [N, hi - lo] of the vocabulary range [lo, hi).");
  m.def("range_sample", &range_sample,
        "The top-k / temperature draw over [lo, hi) on the CPU given its scaled Gumbel noise [N, hi - lo] "
        "(sample_logits' float32 operations on range_logits' logits; int64 ids out).");
  m.def("range_sample_screened", &range_sample_screened,
        "range_sample over rows [0, R) screened with bfloat16 copies of the rows (bitwise its ids).");
#ifdef WORLDVLA_WITH_CUDA
  m.def("cuda_prefill_engine", &cuda_prefill_engine,
        "The CUDA prefill attention's matrix engine: 'auto' (mma.sync on every GPU until the wgmma engines have "
        "passed the GPU tests on hardware), 'mma', or on sm_90 GPUs with an sm_90a build 'wgmma' (64 query rows "
        "per CTA) or 'wgmma128' (128).");
  m.def("set_cuda_prefill_engine", &set_cuda_prefill_engine, py::arg("name"),
        "Force the CUDA prefill attention's matrix engine ('mma', 'wgmma', 'wgmma128'), or 'auto'; e.g. to "
        "compare them.");
#endif
  m.def("cpu_vector_width", &cpu_vector_width,
        "Floats per vector of the C++ CPU kernels: 16 on AVX-512 (x86-64-v4) machines, else 8.");
  m.def("set_cpu_vector_width", &set_cpu_vector_width,
        "Run the C++ CPU kernels at 8 or 16 floats per vector (16 needs AVX-512), e.g. to compare the two.");
}
