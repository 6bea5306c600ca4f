import os
import zlib

import pytest
import torch

# Triton reads TRITON_INTERPRET when a @triton.jit function is defined: set it
# before any kernel module is imported, so that CPU-only machines run the kernels
# in Triton's interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


# Tiny models run faster on one intra-op thread, and it keeps timings steady when other jobs share the cores.
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def rng():
    """A fresh generator per test, seeded from the test's name for reproducibility."""
    # crc32, not hash(): str hashes change with every interpreter (PYTHONHASHSEED), so a failure
    # seen once could not be reproduced.
    g = torch.Generator().manual_seed(zlib.crc32(os.environ.get("PYTEST_CURRENT_TEST", "").encode()))
    return g


@pytest.fixture
def poison_empty(monkeypatch):
    """Every float buffer made with torch.empty starts as NaN, so unwritten kernel outputs show up."""
    real_empty = torch.empty

    def nan_empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        if t.dtype.is_floating_point:
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(torch, "empty", nan_empty)
    yield
