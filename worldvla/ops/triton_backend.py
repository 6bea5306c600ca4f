"""The "triton" backend: registers the Triton kernels of `worldvla.kernels` with dispatch.

Importing this module without Triton raises ImportError, which dispatch takes as
"backend not available". Each op declares what it supports: CUDA tensors, or CPU
tensors when Triton runs in its interpreter (TRITON_INTERPRET=1 set before import).
"""
from __future__ import annotations

import triton  # noqa: F401  (ImportError here = no triton backend)

from worldvla.kernels import attention as _attention
from worldvla.kernels import decode_attention as _decode
from worldvla.kernels import linear_ce as _linear_ce
from worldvla.kernels import sampling as _sampling
from worldvla.kernels import vq as _vq
from worldvla.kernels._common import FLOAT_DTYPES, device_ok

from . import dispatch


def _float_ok(*tensors) -> bool:
    return all(t.dtype in FLOAT_DTYPES for t in tensors) and len({t.dtype for t in tensors}) == 1


def _attention_supports(q, k, v, meta, softmax_scale=None):
    return (device_ok(q, k, v, meta.kv_block, meta.q_limit, meta.cu_seqlens) and _float_ok(q, k, v)
            and q.shape[-1] <= 256)


def _masked_attention(q, k, v, meta, softmax_scale=None):
    return _attention.chunk_attention(q, k, v, meta, softmax_scale)


def _decode_supports(q, k_cache, v_cache, meta, softmax_scale=None):
    return (device_ok(q, k_cache, v_cache, meta.q_pos, meta.q_limit, meta.kv_block, meta.kv_len)
            and _float_ok(q, k_cache, v_cache) and q.shape[-1] <= 256)


def _decode_attention(q, k_cache, v_cache, meta, softmax_scale=None):
    return _decode.decode_attention(q, k_cache, v_cache, meta, softmax_scale)


def _linear_ce_supports(hidden, weight, targets, class_weight=None, z_weight=1e-5, ignore_index=-100):
    return device_ok(hidden, weight, targets, class_weight) and _float_ok(hidden, weight)


def _sample_supports(hidden, weight, lo, hi, temperature=0.0, top_k=None, generator=None):
    return device_ok(hidden, weight) and _float_ok(hidden, weight)


def _vq_quantize_supports(z, codebook):
    return device_ok(z, codebook) and all(t.dtype in FLOAT_DTYPES for t in (z, codebook))


def _vq_gather_supports(indices, codebook):
    return device_ok(indices, codebook) and not indices.dtype.is_floating_point


dispatch.register("masked_attention", "triton", _masked_attention, _attention_supports)
dispatch.register("decode_attention", "triton", _decode_attention, _decode_supports)
dispatch.register("linear_cross_entropy", "triton", _linear_ce.linear_cross_entropy, _linear_ce_supports)
dispatch.register("vq_quantize", "triton", _vq.vq_quantize, _vq_quantize_supports)
dispatch.register("vq_gather", "triton", _vq.vq_gather, _vq_gather_supports)
dispatch.register("constrained_sample", "triton", _sampling.constrained_sample, _sample_supports)
