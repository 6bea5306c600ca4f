"""The C++ CPU kernels on aarch64 (a Jetson Orin's CPU, Graviton servers): every file of csrc/cpu compiled by
a cross compiler with warnings as errors, and, where qemu-user can run the result, a driver of the kernels
(tests/aarch64/kernels_main.cpp) compared with the PyTorch reference under the tolerance rule of the x86
tests. Skips without the cross toolchain (Debian: g++-aarch64-linux-gnu, qemu-user-static).
"""
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from test_native_attention import FP32_FLOOR, LAYOUT, action_ids, assert_close_rule, qkv  # noqa: E402
from test_native_linear import assert_close_to_f64  # noqa: E402

from worldvla import chunk_mask_meta  # noqa: E402
from worldvla.mask import NO_BLOCK, DecodeMeta  # noqa: E402
from worldvla.ops import decode_attention_ref, masked_attention_ref  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CXX = shutil.which("aarch64-linux-gnu-g++")
QEMU = shutil.which("qemu-aarch64-static") or shutil.which("qemu-aarch64")
pytestmark = pytest.mark.skipif(CXX is None, reason="no aarch64 cross compiler (aarch64-linux-gnu-g++)")


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    """The kernels' driver for aarch64, linked statically so that qemu-user needs no aarch64 libraries."""
    exe = tmp_path_factory.mktemp("aarch64") / "kernels_main"
    sources = [ROOT / "tests" / "aarch64" / "kernels_main.cpp", *sorted((ROOT / "csrc" / "cpu").glob("*.cpp"))]
    cmd = [CXX, "-O3", "-fopenmp", "-std=gnu++17", "-Wall", "-Werror", "-static", f"-I{ROOT / 'csrc'}",
           *map(str, sources), "-o", str(exe)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return exe


def _run(driver, kernel, tmp_path, *arrays, dtype=np.float32):
    if QEMU is None:
        pytest.skip("no qemu-user to run aarch64 binaries (qemu-aarch64-static)")
    src, dst = tmp_path / f"{kernel}.in", tmp_path / f"{kernel}.out"
    src.write_bytes(b"".join(np.ascontiguousarray(a).tobytes() for a in arrays))
    done = subprocess.run([QEMU, str(driver), kernel, str(src), str(dst)], capture_output=True, text=True,
                          env={"OMP_NUM_THREADS": "2"}, timeout=300)
    assert done.returncode == 0, done.stderr
    return np.fromfile(dst, dtype=dtype)


def test_cpu_sources_compile_for_aarch64(driver):
    assert driver.is_file()


@pytest.mark.parametrize("L,H,Hkv,D", [(113, 3, 1, 64), (203, 2, 2, 40)])
def test_prefill_attention_on_aarch64(driver, tmp_path, rng, L, H, Hkv, D):
    ids = action_ids(rng, L)
    meta = chunk_mask_meta(ids, LAYOUT)
    q, k, v = qkv(rng, (1, L), H, Hkv, D)
    dims = np.array([L, H, Hkv, D], dtype=np.int64)
    out = _run(driver, "attention", tmp_path, dims, q.numpy(), k.numpy(), v.numpy(),
               meta.kv_block.numpy().astype(np.int32), meta.q_limit.numpy().astype(np.int32))
    out = torch.from_numpy(out.copy()).view(1, L, H, D)
    batched = type(meta)(meta.kv_block[None], meta.q_limit[None], meta.position_ids[None], None, meta.max_seqlen)
    ref = masked_attention_ref(q.double(), k.double(), v.double(), batched)
    same = masked_attention_ref(q, k, v, batched, upcast=False)
    assert_close_rule(out, ref, same, f"aarch64 prefill L{L}", FP32_FLOOR)


@pytest.mark.parametrize("M,K,N", [(1, 256, 688), (5, 72, 33), (13, 130, 257)])
def test_few_row_linear_on_aarch64(driver, tmp_path, rng, M, K, N):
    x, w = torch.randn(M, K, generator=rng), torch.randn(N, K, generator=rng)
    y = _run(driver, "linear", tmp_path, np.array([M, K, N], dtype=np.int64), x.numpy(), w.numpy())
    assert_close_to_f64(torch.from_numpy(y.copy()).view(M, N), x, w, f"aarch64 linear {M}x{K}x{N}")


@pytest.mark.parametrize("M,K,N", [(1, 256, 688), (5, 72, 33), (7, 15, 5)])
def test_bf16_weight_linear_on_aarch64(driver, tmp_path, rng, M, K, N):
    """The bfloat16-weight linear's portable widening (no AVX there) gives the float32 kernel's bits."""
    x, w = torch.randn(M, K, generator=rng), torch.randn(N, K, generator=rng).bfloat16().float()
    y = _run(driver, "linear_bf16", tmp_path, np.array([M, K, N], dtype=np.int64), x.numpy(), w.numpy())
    y32, y16 = torch.from_numpy(y.copy()).view(2, M, N)
    assert torch.equal(y16, y32)
    assert_close_to_f64(y16, x, w, f"aarch64 bf16 linear {M}x{K}x{N}")


@pytest.mark.parametrize("Q,H,Hkv,D,S", [(1, 4, 2, 64, 77), (5, 3, 3, 20, 130)])
def test_bf16_cache_decode_on_aarch64(driver, tmp_path, rng, Q, H, Hkv, D, S):
    """Decode attention's portable widening of a bfloat16 cache (no AVX there) gives the float32 cache's
    result bit for bit, within the rule of the float64 reference."""
    q = torch.randn(1, Q, H, D, generator=rng)
    k, v = (torch.randn(1, S, Hkv, D, generator=rng).bfloat16().float() for _ in range(2))
    kv_len = S - 3
    q_pos = torch.randint(0, kv_len, (1, Q), generator=rng).int()
    kv_block = torch.where(torch.rand(1, S, generator=rng) < 0.3, torch.randint(0, 4, (1, S), generator=rng),
                           torch.full((1, S), NO_BLOCK)).int()
    kv_block[:, 0] = NO_BLOCK
    q_limit = torch.randint(-1, 4, (1, Q), generator=rng).int()
    dm = DecodeMeta(q_pos, q_limit, kv_block, torch.tensor([kv_len], dtype=torch.int32))
    o = _run(driver, "decode_bf16", tmp_path, np.array([Q, H, Hkv, D, S], dtype=np.int64), q.numpy(), k.numpy(),
             v.numpy(), q_pos.numpy(), q_limit.numpy(), kv_block.numpy(), np.array([kv_len], dtype=np.int32))
    o32, o16 = torch.from_numpy(o.copy()).view(2, 1, Q, H, D)
    assert torch.equal(o16, o32)
    ref = decode_attention_ref(q.double(), k.double(), v.double(), dm)
    assert_close_rule(o16, ref, decode_attention_ref(q, k, v, dm, upcast=False), f"aarch64 bf16 decode Q{Q}",
                      FP32_FLOOR)


def test_to_bf16_rounds_as_torch(driver, tmp_path, rng):
    """`to_bf16` (the bfloat16 caches' writes) rounds as torch does: random values, exact ties either way,
    the largest finite floats (to infinity), infinities, signed zeros and subnormals; NaN stays NaN."""
    ties = (torch.randint(0, 0x7F00, (64,), generator=rng).int() << 16 | 0x8000).view(torch.float32)  # finite
    special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 3.4028235e38, -3.4028235e38,
                            1e-40, -1e-45, 1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8])
    x = torch.cat([torch.randn(1000, generator=rng) * 10, ties, -ties, special])
    x = torch.cat([x, torch.nextafter(x, torch.tensor(float("inf")))])
    bits = _run(driver, "to_bf16", tmp_path, np.array([x.numel()], dtype=np.int64), x.numpy(), dtype=np.uint16)
    want = x.bfloat16().view(torch.int16).numpy().view(np.uint16)
    nan = torch.isnan(x).numpy()  # any NaN (torch writes 0xffff, to_bf16 the quiet 0x7fc0)
    assert np.array_equal(bits[~nan], want[~nan]), np.flatnonzero(bits[~nan] != want[~nan])[:10]
    assert nan.any() and ((bits[nan] & 0x7F80) == 0x7F80).all() and (bits[nan] & 0x7F).all()


@pytest.fixture(scope="module")
def guided_driver(tmp_path_factory):
    """A driver of decode_frame's guidance mix (`guided` in csrc/cpu/decoder.cpp, a static function: that file is
    compiled into the driver's own), with the driver fixture's flags. decoder.cpp's decode steps are not run here:
    attention.cpp (about a minute under the cross compiler) stays out, its one entry point a stub."""
    folder = tmp_path_factory.mktemp("aarch64_guided")
    main = folder / "guided_main.cpp"
    main.write_text(r"""
#include "cpu/decoder.cpp"

#include <cstdio>
#include <cstdlib>

void worldvla::decode_attention_cpu(const DecodeParams&) { std::abort(); }

// guided_main KERNEL IN OUT   IN: int64 N, R, H; float scale, hidden [2N, H], weight [R, H]   OUT: int64 ids [N]
int main(int argc, char** argv) {
  std::FILE* in = argc == 4 ? std::fopen(argv[2], "rb") : nullptr;
  int64_t dims[3];
  float scale;
  if (!in || std::fread(dims, sizeof(int64_t), 3, in) != 3 || std::fread(&scale, sizeof(float), 1, in) != 1) return 2;
  const int64_t N = dims[0], R = dims[1], H = dims[2];
  std::vector<float> hidden(2 * N * H), weight(R * H), logits;
  if (std::fread(hidden.data(), sizeof(float), hidden.size(), in) != hidden.size() ||
      std::fread(weight.data(), sizeof(float), weight.size(), in) != weight.size())
    return 2;
  std::fclose(in);
  worldvla::GreedyRange g;
  g.weight = weight.data();
  g.w_s = g.H = H;
  g.hi = R;
  std::vector<int64_t> ids(N);
  worldvla::guided(g, hidden.data(), N, scale, nullptr, 0, ids.data(), logits);
  std::FILE* out = std::fopen(argv[3], "wb");
  if (!out || std::fwrite(ids.data(), sizeof(int64_t), N, out) != size_t(N)) return 3;
  std::fclose(out);
}
""")
    exe = folder / "guided_main"
    sources = [main, *(p for p in sorted((ROOT / "csrc" / "cpu").glob("*.cpp"))
                       if p.name not in ("decoder.cpp", "attention.cpp"))]
    cmd = [CXX, "-O3", "-fopenmp", "-std=gnu++17", "-Wall", "-Werror", "-static", f"-I{ROOT / 'csrc'}",
           *map(str, sources), "-o", str(exe)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return exe


def test_guided_mix_rounds_its_product_on_aarch64(guided_driver, tmp_path, rng):
    """decode_frame's guided choice takes u + s * (c - u) rounded as torch rounds it: the product, then the sum.
    aarch64's -O3 fuses the two into one fmadd unless the product is kept apart (x86-64 without FMA cannot fuse, so
    only this build shows it). Pairs of candidates: a mix c, u in [1, 2) with s = 2.7, and the value it takes
    unfused (c = u = that value, exact either way), in both orders; the first maximum wins a tie, so wherever the
    fused value differs (a third of the mixes), one of the two rows turns to the other candidate. The ids equal
    torch's float32 choice bit for bit."""
    n = 96
    scale = torch.tensor(2.7)
    c, u = 1 + torch.rand(n, generator=rng), 1 + torch.rand(n, generator=rng)
    mixed = u + scale * (c - u)
    # rows 2i and 2i + 1: candidates (mix i, its unfused value) and (its unfused value, mix i)
    cond = torch.stack([torch.stack([c, mixed], 1), torch.stack([mixed, c], 1)], 1).reshape(2 * n, 2)
    uncond = torch.stack([torch.stack([u, mixed], 1), torch.stack([mixed, u], 1)], 1).reshape(2 * n, 2)
    N, R = 2 * n, 2
    # one-hot hidden rows: conditional row r reads column 2r of the weight, its unconditional branch column 2r + 1
    hidden = torch.eye(2 * N).view(N, 2, 2 * N).transpose(0, 1).reshape(2 * N, 2 * N)
    weight = torch.stack([cond, uncond], -1).permute(1, 0, 2).reshape(R, 2 * N)
    ids = _run(guided_driver, "guided", tmp_path, np.array([N, R, 2 * N], dtype=np.int64),
               scale.numpy().reshape(1), hidden.numpy(), weight.numpy(), dtype=np.int64)
    logits = hidden @ weight.T  # exact: one term of each sum is not zero
    assert torch.equal(logits[:N], cond) and torch.equal(logits[N:], uncond)
    want = (uncond + scale * (cond - uncond)).argmax(-1)
    # the fused mix, exact in double here (at most 49 significant bits), then rounded once to float32
    fused = (uncond.double() + scale.double() * (cond - uncond).double()).float()
    assert (fused.argmax(-1) != want).sum() > n // 5
    assert np.array_equal(ids, want.numpy()), np.flatnonzero(ids != want.numpy())[:10]
