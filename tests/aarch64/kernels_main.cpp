// A command-line driver of the C++ CPU kernels for tests/test_aarch64.py, built for aarch64 and run
// under qemu-user: reads its inputs from a file, writes the outputs to another.
//   kernels_main attention IN OUT   IN: int64 L, H, Hkv, D; float q [L, H, D], k, v [L, Hkv, D];
//                                   int32 kv_block [L], q_limit [L]   OUT: float o [L, H, D]
//   kernels_main linear IN OUT      IN: int64 M, K, N; float x [M, K], w [N, K]   OUT: float y [M, N]
//   kernels_main linear_bf16 IN OUT as linear, w of bfloat16 values   OUT: y of linear_cpu, then of linear_bf16_cpu
//   kernels_main decode_bf16 IN OUT IN: int64 Q, H, Hkv, D, S; float q [Q, H, D], k, v [S, Hkv, D] of bfloat16
//                                   values; int32 q_pos [Q], q_limit [Q], kv_block [S], kv_len
//                                   OUT: float o [Q, H, D] on the float32 cache, then on its bfloat16 bits
//   kernels_main to_bf16 IN OUT     IN: int64 n; float x [n]   OUT: uint16 bits [n] (to_bf16)
#include <cmath>
#include <cstdio>
#include <cstring>
#include <stdexcept>
#include <vector>

#include "common.h"
#include "cpu/cpu_common.h"

using namespace worldvla;

namespace {

struct File {
  FILE* f;
  File(const char* path, const char* mode) : f(std::fopen(path, mode)) {
    if (!f) throw std::runtime_error(std::string("cannot open ") + path);
  }
  ~File() { std::fclose(f); }
  template <typename T>
  std::vector<T> read(size_t n) {
    std::vector<T> v(n);
    if (std::fread(v.data(), sizeof(T), n, f) != n) throw std::runtime_error("short input file");
    return v;
  }
  template <typename T>
  void write(const std::vector<T>& v) {
    if (std::fwrite(v.data(), sizeof(T), v.size(), f) != v.size()) throw std::runtime_error("short write");
  }
};

void attention(File& in, File& out) {
  const auto dims = in.read<int64_t>(4);
  const int64_t L = dims[0], H = dims[1], Hkv = dims[2], D = dims[3];
  const auto q = in.read<float>(L * H * D), k = in.read<float>(L * Hkv * D), v = in.read<float>(L * Hkv * D);
  const auto kvb = in.read<int32_t>(L), qlim = in.read<int32_t>(L);
  std::vector<float> o(L * H * D);
  AttnFwdParams p;
  p.q = q.data(); p.k = k.data(); p.v = v.data(); p.o = o.data();
  p.kv_block = kvb.data(); p.q_limit = qlim.data();
  p.n_seq = 1; p.seq_len = L; p.max_seqlen = L;
  p.n_heads = H; p.n_kv_heads = Hkv; p.head_dim = D;
  p.q_sb = p.o_sb = L * H * D; p.q_st = p.o_st = H * D; p.q_sh = p.o_sh = D;
  p.k_sb = p.v_sb = L * Hkv * D; p.k_st = p.v_st = Hkv * D; p.k_sh = p.v_sh = D;
  p.meta_sb = L;
  p.scale = 1.f / std::sqrt(static_cast<float>(D));
  masked_attention_fwd_cpu(p);
  out.write(o);
}

// y = x w^T by linear_cpu; with `bf16` (w must hold bfloat16 values) then by linear_bf16_cpu on their bits.
void linear(File& in, File& out, bool bf16) {
  const auto dims = in.read<int64_t>(3);
  const int64_t M = dims[0], K = dims[1], N = dims[2];
  const auto x = in.read<float>(M * K), w = in.read<float>(N * K);
  std::vector<float> y((bf16 ? 2 : 1) * M * N);
  linear_cpu(x.data(), K, w.data(), K, M, K, N, y.data(), N);
  if (bf16) {
    std::vector<uint16_t> w16(N * K);
    for (int64_t i = 0; i < N * K; ++i) {
      uint32_t u;
      std::memcpy(&u, &w[i], sizeof(u));
      w16[i] = static_cast<uint16_t>(u >> 16);
    }
    linear_bf16_cpu(x.data(), K, w16.data(), K, M, K, N, y.data() + M * N, N);
  }
  out.write(y);
}

std::vector<uint16_t> top_bits(const std::vector<float>& x) {  // exact for bfloat16 values
  std::vector<uint16_t> b(x.size());
  for (size_t i = 0; i < x.size(); ++i) {
    uint32_t u;
    std::memcpy(&u, &x[i], sizeof(u));
    b[i] = static_cast<uint16_t>(u >> 16);
  }
  return b;
}

// Decode attention of one sequence on a float32 cache and on the same values as a bfloat16 cache.
void decode_bf16(File& in, File& out) {
  const auto dims = in.read<int64_t>(5);
  const int64_t Q = dims[0], H = dims[1], Hkv = dims[2], D = dims[3], S = dims[4];
  const auto q = in.read<float>(Q * H * D), k = in.read<float>(S * Hkv * D), v = in.read<float>(S * Hkv * D);
  const auto q_pos = in.read<int32_t>(Q), q_limit = in.read<int32_t>(Q), kvb = in.read<int32_t>(S);
  const auto kv_len = in.read<int32_t>(1);
  const auto k16 = top_bits(k), v16 = top_bits(v);
  std::vector<float> o(2 * Q * H * D);
  for (int half = 0; half < 2; ++half) {
    DecodeParams p;
    p.q = q.data();
    p.k = half ? static_cast<const void*>(k16.data()) : k.data();
    p.v = half ? static_cast<const void*>(v16.data()) : v.data();
    p.o = o.data() + half * Q * H * D;
    p.dtype = half ? kBFloat16 : kFloat32;
    p.q_pos = q_pos.data(); p.q_limit = q_limit.data(); p.kv_block = kvb.data(); p.kv_len = kv_len.data();
    p.batch = 1; p.n_q = Q; p.cache_len = S;
    p.n_heads = H; p.n_kv_heads = Hkv; p.head_dim = D;
    p.q_sb = p.o_sb = Q * H * D; p.q_st = p.o_st = H * D; p.q_sh = p.o_sh = D;
    p.k_sb = p.v_sb = S * Hkv * D; p.k_st = p.v_st = Hkv * D; p.k_sh = p.v_sh = D;
    p.kvb_sb = S;
    p.scale = 1.f / std::sqrt(static_cast<float>(D));
    decode_attention_cpu(p);
  }
  out.write(o);
}

void round_bf16(File& in, File& out) {
  const int64_t n = in.read<int64_t>(1)[0];
  const auto x = in.read<float>(n);
  std::vector<uint16_t> b(n);
  for (int64_t i = 0; i < n; ++i) b[i] = to_bf16(x[i]);
  out.write(b);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 4) {
    std::fprintf(stderr, "usage: %s attention|linear|linear_bf16|decode_bf16|to_bf16 IN OUT\n", argv[0]);
    return 2;
  }
  try {
    File in(argv[2], "rb"), out(argv[3], "wb");
    if (!std::strcmp(argv[1], "attention")) attention(in, out);
    else if (!std::strcmp(argv[1], "linear")) linear(in, out, false);
    else if (!std::strcmp(argv[1], "linear_bf16")) linear(in, out, true);
    else if (!std::strcmp(argv[1], "decode_bf16")) decode_bf16(in, out);
    else if (!std::strcmp(argv[1], "to_bf16")) round_bf16(in, out);
    else throw std::runtime_error(std::string("unknown kernel ") + argv[1]);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s\n", e.what());
    return 1;
  }
  return 0;
}
