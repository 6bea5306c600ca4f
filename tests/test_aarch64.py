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
