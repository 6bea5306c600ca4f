"""CPU-sized benchmark cases under pytest-benchmark, plus a smoke run of the benchmark harness."""
import json

import pytest
import torch

from worldvla import chunk_mask_meta, ops

pytest.importorskip("pytest_benchmark")


def test_bench_chunk_mask_meta(benchmark):
    from worldvla.benchmarks.attention import LAYOUT, packed_batch

    ids, meta = packed_batch(256, 2000, torch.Generator().manual_seed(0))
    cu = meta.cu_seqlens
    out = benchmark(chunk_mask_meta, ids, LAYOUT, cu)
    assert torch.equal(out.kv_block, meta.kv_block)


def test_bench_masked_attention_torch(benchmark):
    from worldvla.benchmarks.attention import packed_batch

    ids, meta = packed_batch(256, 650, torch.Generator().manual_seed(1))
    q, k, v = (torch.randn(ids.numel(), 2, 64) for _ in range(3))
    out = benchmark(ops.masked_attention, q, k, v, meta, None, "torch")
    ref = ops.masked_attention_ref(q.double(), k.double(), v.double(), meta)
    assert (out.double() - ref).abs().max() < 1e-4


def test_harness_writes_results(tmp_path):
    from worldvla.benchmarks import vq

    path = vq.run(quick=True, device="cpu", out_dir=tmp_path)
    doc = json.loads(path.read_text())
    assert doc["device"].startswith("cpu") and doc["torch"] and doc["date"]
    assert all(r["argmin_agreement"] == 1.0 for r in doc["rows"])
    assert path.with_suffix(".png").is_file()
