"""One decoder layer of a cached decode step: a few query rows per sequence against the KV cache.

The reference is the model's own layer (`DecoderLayer.forward`): projections, RMSNorms, the per-head
LayerNorms, rotary embedding, the cache write and `ops.decode_attention`, one tensor op at a time.
With a few rows every one of those ops is a few thousand floats, so on the CPU a step is mostly the
cost of calling them (about 100 ops a layer); the native path runs the whole layer in one C++ call
(csrc/cpu/decoder.cpp) on the same kernels as `ops.linear` and `ops.decode_attention`. A prefill
through the cache (more than NATIVE_MAX_ROWS rows) takes the native path too, with torch's GEMM for
the projections and the same C++ stages between them. Every other device keeps the layer's modules.
"""
from __future__ import annotations

from typing import Callable

import torch

from . import dispatch
from .projection import NATIVE_MAX_ROWS

# `auto` sends prefills through the cache (more than NATIVE_MAX_ROWS rows) to the native layer as well;
# False keeps the modules for them (benchmarks.e2e --decode-paths compares both).
NATIVE_PREFILL = True


def decoder_layer_ref(layer, x: torch.Tensor, cos, sin, ctx, index: int) -> torch.Tensor:
    """`layer` (a `worldvla.model.DecoderLayer`) on x [B, Q, D] at the cached positions of `ctx`."""
    return layer(x, cos, sin, ctx, index)


def resolve_decoder_layer(layer, x: torch.Tensor, ctx, backend: str = "auto") -> Callable:
    """The implementation `decoder_layer` runs for a cached forward like this one (`ctx` carries the
    cache, the positions and the DecodeMeta). A forward resolves it once for all its layers, which
    share their shapes and dtypes."""
    if backend == "auto" and not NATIVE_PREFILL and x.numel() > NATIVE_MAX_ROWS * max(x.shape[-1], 1):
        backend = "torch"
    return dispatch.resolve("decoder_layer", backend, x.device.type, layer, x, ctx)


def decoder_layer(layer, x: torch.Tensor, cos, sin, ctx, index: int, backend: str = "auto") -> torch.Tensor:
    return resolve_decoder_layer(layer, x, ctx, backend)(layer, x, cos, sin, ctx, index)


dispatch.register("decoder_layer", "torch", decoder_layer_ref)
