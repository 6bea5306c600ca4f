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

from . import dispatch
from .projection import NATIVE_MAX_ROWS

# `auto` sends prefills through the cache (more than NATIVE_MAX_ROWS rows) to the native layer as well;
# False keeps the modules for them (benchmarks.e2e --decode-paths compares both).
NATIVE_PREFILL = True
# The engine runs a whole decode step (embedding, every layer, final norm) in one native call on its
# static buffers wherever `auto` takes the native layer (DecodeStepPlan); False keeps one call a layer.
NATIVE_STEP = True


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


class DecodeStepPlan:
    """A cached decode step of `model` on fixed buffers (ids and pos [B, Q], the DecodeMeta `meta`, the
    KVCache `cache`) in one native call, where `auto` would run the layers natively (the CPU; see
    `native_backend.build_decode_step`). `step` is None where it cannot, with the reason in `reason`.

    The plan holds its weights' addresses, as a CUDA graph does: `current(model)` says whether it still
    describes the model (the same addresses, dispatch order, NATIVE_STEP and training mode); a weight
    replaced, moved or converted since changes an address and so the answer."""

    def __init__(self, model, cache, ids, pos, meta):
        self.key = self._key(model)
        self.step, self.reason = None, None
        if not NATIVE_STEP:
            self.reason = "ops.decoder.NATIVE_STEP is off"
            return
        if "native" not in dispatch.available("decoder_layer"):
            self.reason = "the native backend is not built"
            return
        from ..model import ForwardContext
        from . import native_backend
        x = torch.empty(*ids.shape, model.config.hidden_size, device=ids.device,
                        dtype=model.model.embed_tokens.weight.dtype)
        ctx = ForwardContext(cache=cache, position_ids=pos, decode_meta=meta)
        try:
            layer = model.model.layers[0]
            if resolve_decoder_layer(layer, x, ctx) is not native_backend.decoder_layer:
                why = native_backend._decoder_layer_supports(layer, x, ctx)
                self.reason = ("auto does not take the native decoder layer for this step: " +
                               (getattr(why, "reason", None) or "another backend comes first"))
                return
            self.step = native_backend.build_decode_step(model, cache, ids, pos, meta)
        except (ValueError, TypeError, KeyError, AttributeError) as err:  # the last two: not worldvla's modules
            self.reason = str(err)

    @staticmethod
    def _key(model) -> tuple:
        weights = ()
        if "native" in dispatch.available("decoder_layer"):
            from .native_backend import step_weights
            try:
                weights = tuple([t.data_ptr() for t in step_weights(model)])
            except (ValueError, KeyError, AttributeError):  # modules the native step does not take
                weights = None
        order = dispatch.AUTO_ORDER.get(("decoder_layer", "cpu"))
        return NATIVE_STEP, order, model.training, weights

    def current(self, model) -> bool:
        return self._key(model) == self.key

    def __call__(self) -> torch.Tensor:
        return self.step()
