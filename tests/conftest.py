import os

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
    g = torch.Generator().manual_seed(abs(hash(os.environ.get("PYTEST_CURRENT_TEST", ""))) % (2**31))
    return g
