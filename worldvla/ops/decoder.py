"""One decoder layer of a cached decode step: a few query rows per sequence against the KV cache.

The reference is the model's own layer (`DecoderLayer.forward`): projections, RMSNorms, the per-head
LayerNorms, rotary embedding, the cache write and `ops.decode_attention`, one tensor op at a time.
With a few rows every one of those ops is a few thousand floats, so on the CPU a step is mostly the
cost of calling them (about 100 ops a layer); the native path runs the whole layer in one C++ call
(csrc/cpu/decoder.cpp) on the same kernels as `ops.linear` and `ops.decode_attention`. A prefill
through the cache (more than NATIVE_MAX_ROWS rows) takes the native path too, with torch's GEMM for
the projections and the same C++ stages between them. Every other device keeps the layer's modules.

The inference engine's decode steps go one further on the CPU (`DecodeStepPlan`): the whole step,
embedding, every layer and the final norm, in one native call whose addresses were fixed once on the
engine's static buffers, as a CUDA graph fixes them on a GPU.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from . import dispatch
from .projection import NATIVE_MAX_ROWS

# Rows per sequence a whole-step call takes: the decode attention's row-by-row kernel (more rows per
# sequence take its tiled kernel, a prefill's; kDecodeTiledRows in csrc/cpu/attention.cpp).
DECODE_STEP_MAX_QUERIES = 32

# `auto` sends prefills through the cache (more than NATIVE_MAX_ROWS rows) to the native layer as well;
# False keeps the modules for them (benchmarks.e2e --decode-paths compares both).
NATIVE_PREFILL = True
# The engine runs a whole decode step (embedding, every layer, final norm) in one native call on its
# static buffers wherever `auto` takes the native layer (DecodeStepPlan); False keeps one call a layer.
# Read at every step.
NATIVE_STEP = True
# A step plan streams the projections' weights as bfloat16 when every one of their float32 values is a
# bfloat16 (a bfloat16 checkpoint loaded as float32): the same results from half the bytes. Read when a
# plan is built; False keeps float32 (benchmarks.e2e --decode-paths compares both).
BF16_EXACT_WEIGHTS = True


def decoder_layer_ref(layer, x: torch.Tensor, cos, sin, ctx, index: int) -> torch.Tensor:
    """`layer` (a `worldvla.model.DecoderLayer`) on x [B, Q, D] at the cached positions of `ctx`."""
    return layer(x, cos, sin, ctx, index)


def resolve_decoder_layer(layer, x: torch.Tensor, ctx, backend: str = "auto") -> Callable:
    """The implementation `decoder_layer` runs for a cached forward like this one (`ctx` carries the
    cache, the positions and the DecodeMeta). `layer` is one layer, or all the layers of a forward (the
    model's ModuleList), which then resolve once together: they share their shapes and dtypes, and a
    native path is taken only if every one of them is made of the modules it computes."""
    if backend == "auto" and not NATIVE_PREFILL and x.numel() > NATIVE_MAX_ROWS * max(x.shape[-1], 1):
        backend = "torch"
    return dispatch.resolve("decoder_layer", backend, x.device.type, layer, x, ctx)


def decoder_layer(layer, x: torch.Tensor, cos, sin, ctx, index: int, backend: str = "auto") -> torch.Tensor:
    return resolve_decoder_layer(layer, x, ctx, backend)(layer, x, cos, sin, ctx, index)


dispatch.register("decoder_layer", "torch", decoder_layer_ref)


def native_step_active(dtype: torch.dtype | None = None) -> bool:
    """Whether the engine's CPU decode steps run as one native call now: NATIVE_STEP is on, `auto`'s
    order for the CPU's decoder_layer leads with the native backend, no dispatch mode (a
    FlopCounterMode, a tracer) is watching the ops, which a native call would not show it, and (for a
    model of `dtype`) autocast does not make its modules compute in another dtype, which the step would not."""
    if not NATIVE_STEP or _get_current_dispatch_mode() is not None:
        return False
    if dtype is not None and dispatch.autocast_casts("cpu", dtype):
        return False
    have = dispatch.available("decoder_layer")
    order = dispatch.AUTO_ORDER.get(("decoder_layer", "cpu")) or dispatch.AUTO_ORDER.get("cpu", ("torch",))
    return next((name for name in order if name in have), "torch") == "native"


class DecodeStepPlan:
    """A cached decode step of `model` on fixed buffers (ids and pos [B, Q], the DecodeMeta `meta`, the
    KVCache `cache`) in one native call (the CPU; see `native_backend.build_decode_step`). `step` is
    None where the model or the step does not fit it, with the reason in `reason`; whether a step takes
    it is decided step by step (`native_step_active`), so switching dispatch does not rebuild it.

    The plan holds the model's weights by address, as a CUDA graph does: it describes the model as it
    was built, and the engine that keeps it rebuilds it when the model changes (its
    `check_model`). `copies`: whether it also holds copies of some weights (bfloat16 copies of a
    float32 model's projections, `bf16_weights`; float32 copies of a bfloat16 model's norms; the release's
    shared head-norm rows repeated per head), which an in-place update of the weights leaves stale."""

    def __init__(self, model, cache, ids, pos, meta):
        self.step, self.reason, self.bf16_weights, self.copies = None, None, False, False
        if "native" not in dispatch.available("decoder_layer"):
            self.reason = "the native backend is not built"
            return
        from ..model import ForwardContext, WorldVLA
        from . import native_backend
        if getattr(type(model), "hidden_states", WorldVLA.hidden_states) is not WorldVLA.hidden_states:
            # (a wrapper such as torch.compile's forwards the attribute to the WorldVLA it wraps)
            self.reason = f"{type(model).__name__} overrides hidden_states, which the native step would not run"
            return
        x = torch.empty(*ids.shape, model.config.hidden_size, device=ids.device,
                        dtype=model.model.embed_tokens.weight.dtype)
        ctx = ForwardContext(cache=cache, position_ids=pos, decode_meta=meta)
        try:
            fits = native_backend._decoder_layer_supports(model.model.layers, x, ctx, step=True)
            if not fits:
                self.reason = "the native decoder layer does not take this step: " + fits.reason
                return
            bf16 = (native_backend.bf16_projections(model) if BF16_EXACT_WEIGHTS and x.dtype == torch.float32
                    else None)
            self.step = native_backend.build_decode_step(model, cache, ids, pos, meta, bf16)
            self.bf16_weights = bf16 is not None
            self.copies = self.bf16_weights or x.dtype == torch.bfloat16 or native_backend.shared_head_norms(model)
        except (ValueError, TypeError, KeyError, AttributeError) as err:  # the last two: not worldvla's modules
            self.reason = str(err)

    def __call__(self) -> torch.Tensor:
        return self.step()
