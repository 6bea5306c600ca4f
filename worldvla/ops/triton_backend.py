"""The "triton" backend: registers the Triton kernels of `worldvla.kernels` with dispatch.

Importing this module without Triton raises ImportError, which dispatch takes as
"backend not available". Each op declares what it supports: CUDA tensors, or CPU
tensors when Triton runs in its interpreter (TRITON_INTERPRET=1 set before import).
"""
from __future__ import annotations

import triton  # noqa: F401  (ImportError here = no triton backend)

from worldvla.kernels import attention as _attention
from worldvla.kernels import linear_ce as _linear_ce
from worldvla.kernels._common import FLOAT_DTYPES, device_ok

from . import dispatch


def _float_ok(*tensors) -> bool:
    return all(t.dtype in FLOAT_DTYPES for t in tensors) and len({t.dtype for t in tensors}) == 1


def _attention_supports(q, k, v, meta, softmax_scale=None):
    return (device_ok(q, k, v, meta.kv_block, meta.q_limit, meta.cu_seqlens) and _float_ok(q, k, v)
            and q.shape[-1] <= 256)


def _masked_attention(q, k, v, meta, softmax_scale=None):
    return _attention.chunk_attention(q, k, v, meta, softmax_scale)


def _linear_ce_supports(hidden, weight, targets, class_weight=None, z_weight=1e-5, ignore_index=-100):
    return device_ok(hidden, weight, targets, class_weight) and _float_ok(hidden, weight)


dispatch.register("masked_attention", "triton", _masked_attention, _attention_supports)
dispatch.register("linear_cross_entropy", "triton", _linear_ce.linear_cross_entropy, _linear_ce_supports)
