"""Pieces shared by the Triton kernels: interpreter detection, launch checks, small helpers."""
from __future__ import annotations

import inspect
import os

import torch
import triton
import triton.language as tl

# Triton reads TRITON_INTERPRET when a @triton.jit function is defined, so the kernels
# of this package run in the interpreter exactly when it was set at import time.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _interpreter_index_for_numpy_2_4() -> None:
    """The interpreter of Triton 3.6 turns a scalar (a one-element array) into a Python int with
    int(array), which NumPy 2.4 refuses for arrays of ndim > 0 ("only 0-dimensional arrays can be
    converted to Python scalars"): every `range(..., n, ...)` over a runtime int failed. Newer Triton
    converts the array's single element (triton-lang/triton#9171); do the same where it does not."""
    try:
        from triton.runtime import interpreter
        patch_lang_tensor = interpreter._patch_lang_tensor
        if "int(self.handle.data))" not in inspect.getsource(patch_lang_tensor):
            return
    except (ImportError, AttributeError, OSError, TypeError):
        return

    def _patch_lang_tensor(tensor, scope):
        patch_lang_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    interpreter._patch_lang_tensor = _patch_lang_tensor


if INTERPRET:
    _interpreter_index_for_numpy_2_4()

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# Larger than any action-block ordinal: the value of kv_block outside action blocks
# (worldvla.mask.NO_BLOCK) and the neutral element of min-reductions over q_limit. The greedy and
# nearest-code picks (sampling.py, vq.py) also offset indices by it: their launchers refuse ranges
# that would reach it.
BIG = tl.constexpr(1 << 30)


def device_ok(*tensors: torch.Tensor) -> bool:
    """CUDA tensors, or CPU tensors when the kernels run in Triton's interpreter."""
    ts = [t for t in tensors if t is not None]
    if all(t.is_cuda for t in ts):
        return True
    return INTERPRET and os.environ.get("TRITON_INTERPRET") == "1" and all(t.device.type == "cpu" for t in ts)


def check_device(name: str, *tensors: torch.Tensor) -> None:
    if not device_ok(*tensors):
        devs = sorted({str(t.device) for t in tensors if t is not None})
        raise ValueError(f"{name}: the Triton kernels need CUDA tensors (or CPU tensors with TRITON_INTERPRET=1 "
                         f"set before import); got tensors on {devs}. Move them to one CUDA device or use backend='torch'.")
    devs = {t.device for t in tensors if t is not None}
    if len(devs) > 1:
        raise ValueError(f"{name}: all tensors must be on one device, got {sorted(map(str, devs))}")


# CUDA's grid limits (blocks along x, y, z): a launch beyond them fails with an opaque CUDA error.
MAX_GRID = (2**31 - 1, 65535, 65535)


def grid_limit_problem(grid, axes) -> str | None:
    """Why `grid` cannot launch, naming what each axis counts (`axes`), or None when it can."""
    for n, limit, what in zip(grid, MAX_GRID, axes):
        if n > limit:
            return f"{what} = {n} > {limit} (a grid axis limit)"
    return None


def check_dtype(name: str, *tensors: torch.Tensor) -> None:
    for t in tensors:
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name}: the Triton kernels take float16, bfloat16 or float32 tensors, got {t.dtype}; "
                            f"cast the inputs or use backend='torch'")


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs use full-precision dots (torch's fp32 matmul does not use TF32 by default)."""
    return "ieee" if dtype == torch.float32 else "tf32"


def head_block(d: int) -> int:
    """Head dims are padded to the next power of two (at least 16, tl.dot's minimum)."""
    return max(16, triton.next_power_of_2(d))


def last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


@triton.jit
def load_f32(ptrs, mask, UPCAST: tl.constexpr):
    """Load, casting to fp32 when UPCAST (always under the interpreter: its bf16 arithmetic is wrong)."""
    x = tl.load(ptrs, mask=mask, other=0.0)
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def chunk_visible(q_pos, k_pos, k_valid, kv_block, q_limit):
    """The chunk rule (worldvla.mask) on broadcast operands: a key is visible to a query when it does not come
    after it, lies inside the sequence, and its action-block ordinal is not below the query's limit."""
    return (k_pos <= q_pos) & k_valid & (kv_block >= q_limit)


@triton.jit
def online_softmax_step(s, v, m_i, l_i, acc, DOT_PREC: tl.constexpr):
    """One key tile of the online softmax, in base 2: scores `s` [M, N] (scaled by log2(e), -inf where hidden),
    values `v` [N, D]. Returns the running max, denominator and unnormalized output after the tile."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
    return m_new, l_i, acc


def store_dtype(dtype: torch.dtype) -> torch.dtype:
    """Buffer dtype a kernel writes for a result of `dtype`: the interpreter's fp32 -> bf16
    conversion is not round-to-nearest, so there bf16 results are written in fp32 and cast by torch."""
    return torch.float32 if INTERPRET and dtype == torch.bfloat16 else dtype
