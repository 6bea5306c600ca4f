"""The "triton" backend: the Triton kernels of `worldvla.kernels` as torch custom ops.

Each op is a `torch.library.custom_op("worldvla_triton::...")` with a fake (meta)
implementation, so `torch.compile` traces through it without a graph break, and takes the
metadata objects of `worldvla.mask` as their tensors and ints. Attention and the fused
linear cross-entropy are differentiable through `register_autograd`: the attention backward
is its own op fed with the forward's log-sum-exp; the cross-entropy forward already computes
the gradients, which the backward scales. For CUDA inputs the op implementations read no tensor
values on the host, so they can be captured in CUDA graphs, with one exception: packed attention
under metadata without max_seqlen (max_seqlen <= 0, "unknown") reads cu_seqlens on the host, in the
forward and again in the backward, to find the longest document (a synchronization; `chunk_mask_meta`
and `causal_meta` set max_seqlen).

Sampling with temperature > 0 draws from the op's logits outside any op: a torch.Generator
cannot be an operator argument.

Importing this module without Triton raises ImportError, which dispatch takes as "backend
not available". Each op declares what it supports: CUDA tensors, or CPU tensors when Triton
runs in its interpreter (TRITON_INTERPRET=1 set before import).
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Optional

import torch
import triton  # noqa: F401  (ImportError here = no triton backend)
from torch import Tensor

from worldvla.kernels import attention as _attention
from worldvla.kernels import decode_attention as _decode
from worldvla.kernels import linear_ce as _linear_ce
from worldvla.kernels import sampling as _sampling
from worldvla.kernels import vq as _vq
from worldvla.kernels._common import FLOAT_DTYPES, MAX_GRID, check_device

from ..mask import ChunkMaskMeta, DecodeMeta
from . import dispatch
from .sampling import sample_logits


def _scale(q: Tensor, softmax_scale) -> float:
    return float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])


# ------------------------------------------------------------------ masked attention (prefill)
# Tile plans are cached per metadata tensors (as on a ChunkMaskMeta), so every layer of a
# forward and its backward share one. An entry holds its tensors, so the ids in its key
# cannot be reused while it lives; the plan cache checks versions against in-place edits.
_META_CACHE: OrderedDict = OrderedDict()
_META_CACHE_SIZE = 8


def _chunk_meta(kv_block: Tensor, q_limit: Tensor, cu_seqlens: Optional[Tensor], max_seqlen: int) -> ChunkMaskMeta:
    key = (id(kv_block), id(q_limit), id(cu_seqlens), max_seqlen)
    meta = _META_CACHE.get(key)
    if meta is None or any(a is not b for a, b in zip((meta.kv_block, meta.q_limit, meta.cu_seqlens),
                                                       (kv_block, q_limit, cu_seqlens))):
        meta = ChunkMaskMeta(kv_block, q_limit, None, cu_seqlens, max_seqlen)
        _META_CACHE[key] = meta
        if len(_META_CACHE) > _META_CACHE_SIZE:
            _META_CACHE.popitem(last=False)
    _META_CACHE.move_to_end(key)
    return meta


def _n_tokens(q: Tensor):
    return q.shape[0] if q.dim() == 3 else q.shape[0] * q.shape[1]


def _check_attention_shapes(q, k, v, kv_block, q_limit, cu_seqlens):
    """The shape rules of the kernels, for the fake implementation (the kernels check them too)."""
    if q.dim() not in (3, 4) or k.dim() != q.dim() or k.shape != v.shape or q.shape[:-2] != k.shape[:-2] \
            or q.shape[-1] != k.shape[-1] or q.shape[-2] % k.shape[-2]:
        raise ValueError(f"masked_attention wants q [B, L, H, Dh] or [T, H, Dh] and equal k, v with kv heads "
                         f"dividing H; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if kv_block.shape != q.shape[:-2] or q_limit.shape != q.shape[:-2]:
        raise ValueError(f"meta covers tokens {tuple(kv_block.shape)} but q has {tuple(q.shape[:-2])}")
    if (cu_seqlens is not None) != (q.dim() == 3):
        raise ValueError("packed q/k/v [T, H, Dh] need cu_seqlens, padded [B, L, H, Dh] take none")


@torch.library.custom_op("worldvla_triton::masked_attention", mutates_args=())
def masked_attention_op(q: Tensor, k: Tensor, v: Tensor, kv_block: Tensor, q_limit: Tensor,
                        cu_seqlens: Optional[Tensor], max_seqlen: int, softmax_scale: float) -> tuple[Tensor, Tensor]:
    """Chunk-masked attention forward: (out like q, lse2 fp32 [H, tokens]), lse2 the base-2
    log-sum-exp the backward reuses. Layouts as `worldvla.ops.masked_attention`."""
    meta = _chunk_meta(kv_block, q_limit, cu_seqlens, max_seqlen)
    out, lse2, _ = _attention.attention_forward(q, k, v, meta, softmax_scale)
    return out, lse2


@masked_attention_op.register_fake
def _(q, k, v, kv_block, q_limit, cu_seqlens, max_seqlen, softmax_scale):
    _check_attention_shapes(q, k, v, kv_block, q_limit, cu_seqlens)
    return q.new_empty(q.shape), q.new_empty((q.shape[-2], _n_tokens(q)), dtype=torch.float32)


@torch.library.custom_op("worldvla_triton::masked_attention_backward", mutates_args=())
def masked_attention_backward_op(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse2: Tensor,
                                 kv_block: Tensor, q_limit: Tensor, cu_seqlens: Optional[Tensor], max_seqlen: int,
                                 softmax_scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) of chunk-masked attention from the forward's output and lse2."""
    meta = _chunk_meta(kv_block, q_limit, cu_seqlens, max_seqlen)
    pb = _attention._Problem(q, k, v, meta, softmax_scale, None, None)
    return _attention.attention_backward(grad_out, q, k, v, out, lse2, pb)


@masked_attention_backward_op.register_fake
def _(grad_out, q, k, v, out, lse2, kv_block, q_limit, cu_seqlens, max_seqlen, softmax_scale):
    _check_attention_shapes(q, k, v, kv_block, q_limit, cu_seqlens)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _attention_setup_context(ctx, inputs, output):
    q, k, v, kv_block, q_limit, cu_seqlens, max_seqlen, softmax_scale = inputs
    out, lse2 = output
    ctx.mark_non_differentiable(lse2)
    ctx.save_for_backward(q, k, v, out, lse2)
    # The metadata needs no autograd: kept as it is, not saved, since metadata built under
    # torch.inference_mode (a data pipeline's) cannot be saved for backward, and torch's path takes it.
    # The same tensors also keep the backward on the forward's cached tile plan (_chunk_meta).
    ctx.meta = (kv_block, q_limit, cu_seqlens)
    ctx.max_seqlen, ctx.softmax_scale = max_seqlen, softmax_scale


def _attention_backward(ctx, grad_out, grad_lse2):
    q, k, v, out, lse2 = ctx.saved_tensors
    kv_block, q_limit, cu_seqlens = ctx.meta
    dq, dk, dv = masked_attention_backward_op(grad_out, q, k, v, out, lse2, kv_block, q_limit, cu_seqlens,
                                              ctx.max_seqlen, ctx.softmax_scale)
    return dq, dk, dv, None, None, None, None, None


masked_attention_op.register_autograd(_attention_backward, setup_context=_attention_setup_context)


def masked_attention(q, k, v, meta: ChunkMaskMeta, softmax_scale=None):
    """`worldvla.ops.masked_attention` on the Triton kernels (differentiable)."""
    out, _ = masked_attention_op(q, k, v, meta.kv_block, meta.q_limit, meta.cu_seqlens, int(meta.max_seqlen),
                                 _scale(q, softmax_scale))
    return out


# ------------------------------------------------------------------ decode attention
@torch.library.custom_op("worldvla_triton::decode_attention", mutates_args=())
def decode_attention_op(q: Tensor, k_cache: Tensor, v_cache: Tensor, q_pos: Tensor, q_limit: Tensor,
                        kv_block: Tensor, kv_len: Tensor, softmax_scale: float, num_splits: int) -> Tensor:
    """q [B, Q, H, D] against caches [B, S, Hkv, D] under DecodeMeta's rule; num_splits 0 = default."""
    meta = DecodeMeta(q_pos, q_limit, kv_block, kv_len)
    return _decode.decode_attention(q, k_cache, v_cache, meta, softmax_scale, num_splits or None)


@decode_attention_op.register_fake
def _(q, k_cache, v_cache, q_pos, q_limit, kv_block, kv_len, softmax_scale, num_splits):
    if q.dim() != 4 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape or k_cache.shape[0] != q.shape[0] \
            or k_cache.shape[3] != q.shape[3] or q.shape[2] % k_cache.shape[2]:
        raise ValueError(f"decode_attention wants q [B, Q, H, Dh] and caches [B, S, Hkv, Dh]; got "
                         f"{tuple(q.shape)}, {tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
    return q.new_empty(q.shape)


def decode_attention(q, k_cache, v_cache, meta: DecodeMeta, softmax_scale=None, num_splits=None):
    """`worldvla.ops.decode_attention` on the Triton kernels (forward only)."""
    return decode_attention_op(q, k_cache, v_cache, meta.q_pos, meta.q_limit, meta.kv_block, meta.kv_len,
                               _scale(q, softmax_scale), int(num_splits or 0))


# ------------------------------------------------------------------ fused linear cross-entropy
@torch.library.custom_op("worldvla_triton::linear_cross_entropy", mutates_args=())
def linear_cross_entropy_op(hidden: Tensor, weight: Tensor, targets: Tensor, class_weight: Optional[Tensor],
                            z_weight: float, ignore_index: int, need_grad_hidden: bool, need_grad_weight: bool,
                            chunk_size: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(loss, z_mean, grad_hidden, grad_weight) with the gradients for d loss = 1 in fp32 (the backward
    scales them, then rounds them to the inputs' dtype); a gradient not asked for is an empty tensor.
    chunk_size 0 = automatic. Sync-free on CUDA."""
    loss, z, gh, gw = _linear_ce.linear_ce_forward(hidden, weight, targets, class_weight, z_weight, ignore_index,
                                                   need_grad_hidden, need_grad_weight, chunk_size or None)
    empty = hidden.new_empty(0, dtype=torch.float32)
    return loss, z, empty if gh is None else gh, empty.clone() if gw is None else gw


@linear_cross_entropy_op.register_fake
def _(hidden, weight, targets, class_weight, z_weight, ignore_index, need_grad_hidden, need_grad_weight, chunk_size):
    _linear_ce.check_inputs(hidden, weight, targets, class_weight)
    scalar = hidden.new_empty((), dtype=torch.float32)
    return (scalar, scalar.new_empty(()), scalar.new_empty(hidden.shape if need_grad_hidden else (0,)),
            scalar.new_empty(weight.shape if need_grad_weight else (0,)))


def _linear_ce_setup_context(ctx, inputs, output):
    _, z, gh, gw = output
    ctx.mark_non_differentiable(z, gh, gw)
    ctx.need_grad = inputs[6:8]
    ctx.dtypes = (inputs[0].dtype, inputs[1].dtype)
    ctx.save_for_backward(gh, gw)


def _linear_ce_backward(ctx, grad_loss, grad_z, grad_gh, grad_gw):
    # fp32 gradients for d loss = 1, scaled before they are rounded to the inputs' dtype (a loss scale
    # of 65536 would overflow fp16 itself)
    gh, gw = ctx.saved_tensors
    dh = _linear_ce.scale_grad(gh, grad_loss, ctx.dtypes[0]) if ctx.need_grad[0] else None
    dw = _linear_ce.scale_grad(gw, grad_loss, ctx.dtypes[1]) if ctx.need_grad[1] else None
    return dh, dw, None, None, None, None, None, None, None


linear_cross_entropy_op.register_autograd(_linear_ce_backward, setup_context=_linear_ce_setup_context)


def linear_cross_entropy(hidden, weight, targets, class_weight=None, z_weight=1e-5, ignore_index=-100, chunk_size=None):
    """`worldvla.ops.linear_cross_entropy` on the Triton kernels: (loss, z_mean), differentiable
    in hidden and weight. Gradients are computed in the forward only for inputs that need them."""
    grad = torch.is_grad_enabled()
    loss, z, _, _ = linear_cross_entropy_op(hidden, weight, targets, class_weight, float(z_weight), int(ignore_index),
                                            grad and hidden.requires_grad, grad and weight.requires_grad,
                                            int(chunk_size or 0))
    return loss, z


# ------------------------------------------------------------------ VQ
@torch.library.custom_op("worldvla_triton::vq_quantize", mutates_args=())
def vq_quantize_op(z: Tensor, codebook: Tensor) -> Tensor:
    """argmin_k ||z_n - e_k||^2 for z [N, C], codebook [K, C] -> int64 [N]."""
    return _vq.vq_quantize(z, codebook)


@vq_quantize_op.register_fake
def _(z, codebook):
    return z.new_empty(z.shape[0], dtype=torch.int64)


@torch.library.custom_op("worldvla_triton::vq_gather", mutates_args=())
def vq_gather_op(indices: Tensor, codebook: Tensor) -> Tensor:
    """indices [B, h, w] -> codebook rows as [B, C, h, w]."""
    return _vq.vq_gather(indices, codebook)


@vq_gather_op.register_fake
def _(indices, codebook):
    B, h, w = indices.shape
    return codebook.new_empty((B, codebook.shape[1], h, w))


def _vq_gather_setup_context(ctx, inputs, output):
    indices, codebook = inputs
    ctx.save_for_backward(indices)
    ctx.n_codes = codebook.shape[0]


def _vq_gather_backward(ctx, grad_out):
    (indices,) = ctx.saved_tensors
    C = grad_out.shape[1]
    rows = grad_out.permute(0, 2, 3, 1).reshape(-1, C)
    grad = rows.new_zeros((ctx.n_codes, C)).index_add_(0, indices.reshape(-1).long(), rows)
    return None, grad


vq_gather_op.register_autograd(_vq_gather_backward, setup_context=_vq_gather_setup_context)


# ------------------------------------------------------------------ constrained decoding
@torch.library.custom_op("worldvla_triton::range_argmax", mutates_args=())
def range_argmax_op(hidden: Tensor, weight: Tensor, lo: int, hi: int) -> Tensor:
    """Greedy token in [lo, hi) per row: lo + argmax_v hidden . weight[v] (fp32 accumulation)."""
    return _sampling.constrained_sample(hidden, weight, lo, hi)


@range_argmax_op.register_fake
def _(hidden, weight, lo, hi):
    return hidden.new_empty(hidden.shape[0], dtype=torch.int64)


@torch.library.custom_op("worldvla_triton::range_logits", mutates_args=())
def range_logits_op(hidden: Tensor, weight: Tensor, lo: int, hi: int) -> Tensor:
    """fp32 logits [N, hi - lo] of the vocabulary range [lo, hi) only."""
    if hidden.shape[0] == 0:
        return hidden.new_empty((0, hi - lo), dtype=torch.float32)
    return _sampling.range_logits(hidden, weight, lo, hi)


@range_logits_op.register_fake
def _(hidden, weight, lo, hi):
    return hidden.new_empty((hidden.shape[0], hi - lo), dtype=torch.float32)


def constrained_sample(hidden, weight, lo, hi, temperature=0.0, top_k=None, generator=None, gumbel=None):
    """`worldvla.ops.constrained_sample` on the Triton kernels: greedy is one op; sampling draws
    from the op's fp32 logits with torch (the generator stays outside the op)."""
    if temperature <= 0.0:
        return range_argmax_op(hidden, weight, int(lo), int(hi))
    return sample_logits(range_logits_op(hidden, weight, int(lo), int(hi)), temperature, top_k, generator, gumbel) + lo


# ------------------------------------------------------------------ dispatch registration
# Each `supports` answers True or a dispatch.Unsupported saying why (an explicit backend's error quotes it).
def _device(*tensors):
    try:
        check_device("triton", *tensors)
    except ValueError as err:
        return dispatch.Unsupported(str(err))
    return True


def _float(*tensors):
    dtypes = {t.dtype for t in tensors}
    if all(d in FLOAT_DTYPES for d in dtypes) and len(dtypes) == 1:
        return True
    return dispatch.Unsupported(f"wants one dtype among float16, bfloat16, float32; got {sorted(map(str, dtypes))}")


def _layout(q, meta):
    """The kernel's layouts: padded [B, L, H, Dh] without cu_seqlens, packed [T, H, Dh] with them (one
    unbatched sequence [T, H, Dh] needs cu_seqlens [0, T]), metadata covering q's tokens."""
    if (q.dim() == 3) != meta.packed:
        return dispatch.Unsupported("packed q/k/v [T, H, Dh] need meta.cu_seqlens, padded [B, L, H, Dh] take none; "
                                    "one unbatched sequence runs on the Triton kernel with cu_seqlens [0, T]")
    if meta.kv_block.shape != q.shape[:-2] or meta.q_limit.shape != q.shape[:-2]:
        return dispatch.Unsupported(f"meta covers tokens {tuple(meta.kv_block.shape)} / {tuple(meta.q_limit.shape)} "
                                    f"but q has {tuple(q.shape[:-2])}")
    return True


def _attention_supports(q, k, v, meta, softmax_scale=None):
    n_seq = meta.cu_seqlens.numel() - 1 if meta.cu_seqlens is not None else (q.shape[0] if q.dim() == 4 else 1)
    max_dh, max_y = _attention.MAX_HEAD_DIM, MAX_GRID[1]  # the kernels' grid axis 1: sequences x heads
    return dispatch.first_false(
        _device(q, k, v, meta.kv_block, meta.q_limit, meta.cu_seqlens), _float(q, k, v), lambda: _layout(q, meta),
        q.shape[-1] <= max_dh or dispatch.Unsupported(f"head dim {q.shape[-1]} > {max_dh}"),
        n_seq * q.shape[-2] <= max_y or dispatch.Unsupported(
            f"{n_seq} sequences x {q.shape[-2]} heads > {max_y} (a grid axis); split the batch"))


def _grid(why):
    """A kernel module's grid_problem answer as a supports answer."""
    return True if why is None else dispatch.Unsupported(f"{why}; split the batch")


def _decode_grid(q, k_cache):
    if q.dim() != 4 or k_cache.dim() != 4 or k_cache.shape[2] == 0:
        return True  # malformed shapes: the op raises its own error
    return _grid(_decode.grid_problem(q, k_cache))


def _decode_supports(q, k_cache, v_cache, meta, softmax_scale=None):
    return dispatch.first_false(
        _device(q, k_cache, v_cache, meta.q_pos, meta.q_limit, meta.kv_block, meta.kv_len),
        _float(q, k_cache, v_cache),
        not (torch.is_grad_enabled() and any(t.requires_grad for t in (q, k_cache, v_cache)))
        or dispatch.Unsupported("inputs need gradients and the Triton decode kernel is forward-only"),
        q.shape[-1] <= 256 or dispatch.Unsupported(f"head dim {q.shape[-1]} > 256"),
        lambda: _decode_grid(q, k_cache))


def _linear_ce_supports(hidden, weight, targets, class_weight=None, z_weight=1e-5, ignore_index=-100):
    return dispatch.first_false(
        _device(hidden, weight, targets, class_weight), _float(hidden, weight),
        not (class_weight is not None and torch.is_grad_enabled() and class_weight.requires_grad)
        or dispatch.Unsupported("class_weight needs a gradient and the Triton kernel gives none (only hidden's and "
                                "weight's); detach it to train without one"))


def _sample_supports(hidden, weight, lo, hi, temperature=0.0, top_k=None, generator=None):
    return dispatch.first_false(_device(hidden, weight), _float(hidden, weight),
                                lambda: hidden.dim() != 2 or _grid(_sampling.grid_problem(hidden.shape[0])))


def _vq_quantize_supports(z, codebook):
    return dispatch.first_false(_device(z, codebook), all(t.dtype in FLOAT_DTYPES for t in (z, codebook)) or
                        dispatch.Unsupported(f"wants float16, bfloat16 or float32; got {z.dtype}, {codebook.dtype}"))


def _vq_gather_supports(indices, codebook):
    return dispatch.first_false(
        _device(indices, codebook),
        not indices.dtype.is_floating_point or dispatch.Unsupported(f"indices must be integers, got {indices.dtype}"),
        not codebook.dtype.is_complex or  # the launcher has no pointer type for them
        dispatch.Unsupported(f"the codebook is {codebook.dtype}; complex codebooks take the torch path"),
        lambda: indices.dim() != 3 or codebook.dim() != 2
        or _grid(_vq.gather_grid_problem(indices.shape, codebook.shape[1])))


def _on_its_device(fn):
    """`fn` with its first argument's GPU current: Triton launches on the current device, not the tensors' (a
    model on cuda:1 while cuda:0 is current). Autograd runs the backward ops on their tensors' device itself, and
    a compiled graph sets its own device guards (so tracing passes straight through)."""
    def on_device(x, *args, **kwargs):
        if torch.compiler.is_compiling() or x.device.type != "cuda" \
                or x.device.index in (None, torch.cuda.current_device()):
            return fn(x, *args, **kwargs)
        with torch.cuda.device(x.device):
            return fn(x, *args, **kwargs)
    return on_device


dispatch.register("masked_attention", "triton", _on_its_device(masked_attention), _attention_supports)
dispatch.register("decode_attention", "triton", _on_its_device(decode_attention), _decode_supports)
dispatch.register("linear_cross_entropy", "triton", _on_its_device(linear_cross_entropy), _linear_ce_supports)
dispatch.register("vq_quantize", "triton", _on_its_device(vq_quantize_op), _vq_quantize_supports)
dispatch.register("vq_gather", "triton", _on_its_device(vq_gather_op), _vq_gather_supports)
dispatch.register("constrained_sample", "triton", _on_its_device(constrained_sample), _sample_supports)
