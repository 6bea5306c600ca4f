"""Projections y = x W^T of the model's linear layers.

The reference is `F.linear` (torch's BLAS). The native CPU kernel serves the few rows of a decode
step, where the product is a stream over the weights and torch's sgemm (MKL) reads them far below
memory speed on some CPUs (benchmarks/NOTES.md, "Small-M linear on the CPU"). Prefills and training
keep torch's blocked GEMM: `auto` takes the native kernel only up to `NATIVE_MAX_ROWS` rows.
On GPUs cuBLAS is the path (the native kernel is CPU-only).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from . import dispatch

# A decode step's 28 projections (small config, weights cycling, benchmarks/NOTES.md) on the machine
# that leads with the kernel, called directly: 4-6x torch's at 1-5 rows, 2.0-2.3x at 16-24, 1.7x at 32,
# 1.3-1.4x at 64, 1.1x at 96-128 (two runs); through worldvla.ops 1.6-2.6x up to 16 rows, 1.7x at 64. Past 64 rows (a prefill; many robots' chunks in one batch) torch's
# blocked GEMM, which reuses each weight across many rows, keeps it.
NATIVE_MAX_ROWS = 64


def linear_ref(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [..., K], weight [N, K] -> [..., N]."""
    return F.linear(x, weight)


def _auto_backend(x: torch.Tensor, backend: str) -> str:
    if backend == "auto" and x.numel() > NATIVE_MAX_ROWS * max(x.shape[-1], 1):
        return "torch"
    return backend


def resolve_linear(x: torch.Tensor, weight: torch.Tensor, backend: str = "auto") -> Callable:
    """The implementation `linear(x, weight, backend)` runs for inputs like these. A forward pass
    resolves it once and calls it for each of its projections (same dtype, device, rows)."""
    if x.dim() < 1 or weight.dim() != 2 or x.shape[-1] != weight.shape[-1]:
        raise ValueError(f"linear wants x [..., K] and weight [N, K]; got {tuple(x.shape)}, {tuple(weight.shape)}")
    return dispatch.resolve("linear", _auto_backend(x, backend), x.device.type, x, weight)


def linear(x: torch.Tensor, weight: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    # Checked here, not in resolve_linear: a forward resolves it on sharded fp32 weights beside bf16 activations
    # (FSDP's mixed precision casts each layer's weights as it runs).
    x, weight = dispatch.autocast_floats(x.device.type, x, weight)
    dispatch.check_floats("linear", x=x, weight=weight)
    dispatch.check_devices("linear", x=x, weight=weight)
    return resolve_linear(x, weight, backend)(x, weight)


dispatch.register("linear", "torch", linear_ref)
