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
from worldvla.ops import masked_attention_ref  # noqa: E402

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


def _run(driver, kernel, tmp_path, *arrays):
    if QEMU is None:
        pytest.skip("no qemu-user to run aarch64 binaries (qemu-aarch64-static)")
    src, dst = tmp_path / f"{kernel}.in", tmp_path / f"{kernel}.out"
    src.write_bytes(b"".join(np.ascontiguousarray(a).tobytes() for a in arrays))
    done = subprocess.run([QEMU, str(driver), kernel, str(src), str(dst)], capture_output=True, text=True,
                          env={"OMP_NUM_THREADS": "2"}, timeout=300)
    assert done.returncode == 0, done.stderr
    return np.fromfile(dst, dtype=np.float32)


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
