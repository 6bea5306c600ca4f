"""The "native" backend: the C++/CUDA kernels of `worldvla._C` as torch custom ops.

`worldvla._C` does not link libtorch: its functions take raw pointers, sizes,
element strides, dtype codes and a CUDA stream handle. This module checks every
argument (dtype, device, shape, stride, alignment) before a launch and raises a
clear exception, allocates outputs and workspaces with torch, and wraps each op
in `torch.library.custom_op("worldvla::...")` with a fake implementation, so the
ops trace under `torch.compile` and can be captured in CUDA graphs (no host sync,
no allocation inside the launch path).

Forward only: the native attention is an inference path. CUDA tensors run the
CUDA kernels when the extension was built with CUDA (`worldvla._C.with_cuda`);
CPU tensors run the C++ CPU paths (float32; bf16/fp16 inputs are computed in
float32 and the result cast back; bfloat16 caches and weights are read as they are where a kernel
widens them itself: decode attention's row-by-row kernel, the range sampler, the decode step).

Importing this module without the extension raises ImportError, which dispatch
takes as "backend not available".
"""
from __future__ import annotations

import functools
import math
import numbers
import re
import weakref
from typing import Optional

import torch
import torch.autograd.forward_ad as _forward_ad
import torch.nn.functional as F
from torch import Tensor
from torch._C._functorch import is_functorch_wrapped_tensor as _is_functorch_wrapped
from torch.utils.weak import WeakIdKeyDictionary
from torch.utils._python_dispatch import _get_current_dispatch_mode

from worldvla import _C  # ImportError here = no native backend

from ..mask import DECODE_PLAN_QUERIES, ChunkMaskMeta, DecodeMeta, cu_seqlens_problem
from . import dispatch
from .decoder import DECODE_STEP_MAX_QUERIES
from .projection import NATIVE_MAX_ROWS
from .sampling import SCREEN_MIN_ROWS, draw_noise, sample_logits, scaled_gumbel

_DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3,
               torch.int32: 4, torch.int64: 5}
_CUDA_ATTN_DTYPES = (torch.bfloat16, torch.float16)
_CUDA_HEAD_DIMS = (64, 128)
_CPU_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_CUDA_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_DECODE_TILE = 64  # keys per tile of the CUDA decode kernel; split sizes are multiples of it
_MAX_GRID_YZ = 65535
_DECODE_ROWS_PER_CTA = 16  # kDecRows in csrc/cuda/attention.cu
_VQ_TILE = 128  # rows per CTA and codes per tile of the CUDA nearest-code search (kVqBM, kVqBN in csrc/cuda/vq.cu)


# ------------------------------------------------------------------ argument checks
def _fail(op: str, msg: str, exc=ValueError):
    raise exc(f"{op} (native): {msg}")


def arch_runs_on(arch: str, major: int, minor: int) -> bool | None:
    """Whether code built for one entry of CMake's architecture list ("90a-real", "80", "86-virtual",
    ...) runs on a GPU of compute capability major.minor; None for entries that do not say ("all",
    "native"). Real (SASS) code runs on its own major version at the same or a higher minor, an
    arch-specific "a" build only on its exact GPU; virtual (PTX) code on that capability or any newer."""
    m = re.fullmatch(r"(\d+)(a?)(?:-(real|virtual))?", arch.strip())
    if m is None:
        return None
    num, specific, kind = int(m.group(1)), m.group(2) == "a", m.group(3)
    want, have = (num // 10, num % 10), (major, minor)
    real = (have == want) if specific else (have[0] == want[0] and have[1] >= want[1])
    virtual = (have == want) if specific else have >= want
    return {"real": real, "virtual": virtual}.get(kind, real or virtual)


def _cuda_version(v: int) -> str:
    return f"{v // 1000}.{v % 1000 // 10}"


def driver_problem() -> str | None:
    """Why the driver cannot run this build's CUDA runtime, or None. The module links the CUDA runtime of the
    toolkit it was built with, which needs a driver of that CUDA major version or newer (within a major
    version, CUDA's minor-version compatibility covers an older driver); torch brings its own runtime, so
    torch can work on this GPU while every launch of these kernels would fail."""
    built, driver = getattr(_C, "cuda_runtime_version", 0), 0
    if built and hasattr(_C, "cuda_driver_version"):
        driver = _C.cuda_driver_version()
    if not built or not driver or driver // 1000 >= built // 1000:
        return None
    return (f"worldvla._C was built with CUDA {_cuda_version(built)}, whose runtime needs a driver for CUDA "
            f"{built // 1000}.0 or newer, but this machine's driver supports CUDA {_cuda_version(driver)}: update the "
            f"driver, or rebuild with a CUDA {driver // 1000} toolkit (torch here is built with CUDA "
            f"{torch.version.cuda}), or use backend='triton'/'torch'")


@functools.lru_cache(maxsize=None)
def arch_problem(dev: int) -> str | None:
    """Why this build's CUDA kernels cannot run on GPU `dev`, or None if they can (or cannot tell)."""
    problem = driver_problem()
    if problem:
        return problem
    major, minor = torch.cuda.get_device_capability(dev)
    archs = [a for a in _C.cuda_archs.split(",") if a]
    answers = [arch_runs_on(a, major, minor) for a in archs]
    if not archs or any(a is None or a for a in answers):
        return None
    if major < 8:
        return (f"the CUDA kernels need sm_80 or newer (bf16 mma.sync, cp.async); this GPU is sm_{major}{minor}: "
                f"use backend='triton' or 'torch'")
    return (f"worldvla._C holds CUDA kernels for {', '.join(archs)}, none of which runs on this GPU "
            f"(sm_{major}{minor}); rebuild on it (pip install . picks the GPUs nvidia-smi reports) or with "
            f"CMAKE_ARGS=\"-DCMAKE_CUDA_ARCHITECTURES={major}{minor}\" WORLDVLA_CUDA=ON pip install ., "
            f"or use backend='triton'/'torch'")


def prefill_engines(dev: int) -> list[str]:
    """The CUDA prefill attention's matrix engines GPU `dev` runs with this build: "mma" (mma.sync,
    sm_80 and newer; what "auto" runs until the wgmma engines have passed the GPU tests on hardware)
    and, on sm_90 GPUs with an sm_90a build, "wgmma" (64 query rows per CTA, one warpgroup) and
    "wgmma128" (128 rows, two warpgroups sharing each K/V tile).
    Force one with worldvla._C.set_cuda_prefill_engine(name), e.g. to compare the two."""
    if not _C.with_cuda:
        return []
    wgmma = torch.cuda.get_device_capability(dev) == (9, 0) and any(
        a.strip().startswith("90a") for a in _C.cuda_archs.split(","))
    return ["mma", "wgmma", "wgmma128"] if wgmma else ["mma"]


def _device_index(op: str, t: Tensor) -> int:
    """-1 for CPU, the CUDA index for CUDA; anything else is an error."""
    if t.device.type == "cpu":
        return -1
    if t.device.type == "cuda":
        if not _C.with_cuda:
            _fail(op, "worldvla._C was built without CUDA; rebuild with nvcc on PATH "
                      "(WORLDVLA_CUDA=ON pip install .) or use backend='triton'/'torch'", RuntimeError)
        dev = t.device.index if t.device.index is not None else torch.cuda.current_device()
        problem = arch_problem(dev)
        if problem:
            _fail(op, problem, RuntimeError)
        return dev
    _fail(op, f"tensors on {t.device.type} are not supported; use CPU or CUDA tensors")


def _same_device(op: str, **named):
    items = [(n, t) for n, t in named.items() if t is not None]
    dev = items[0][1].device
    for n, t in items[1:]:
        if t.device != dev:
            _fail(op, f"{n} is on {t.device} but {items[0][0]} is on {dev}; move them to one device")


def _int32(op: str, **named):
    for n, t in named.items():
        if t is None:
            continue
        if t.dtype != torch.int32:
            _fail(op, f"{n} must be int32, got {t.dtype} (build it with worldvla.mask or call .int())", TypeError)


def _contiguous(op: str, **named):
    for n, t in named.items():
        if t is not None and not t.is_contiguous():
            _fail(op, f"{n} must be contiguous (call .contiguous()), got strides {t.stride()}")


def _last_dim_unit(op: str, **named):
    for n, t in named.items():
        if t.numel() and t.stride(-1) != 1:
            _fail(op, f"{n} must have a contiguous last dimension (stride 1), got strides {t.stride()}; "
                      "call .contiguous()")


def _aligned16(op: str, **named):
    """CUDA kernels read rows with 16-byte vector loads: every row start must be 16-byte aligned. Strides and
    offset say so for storages torch allocated; a storage that itself starts off a boundary (one imported
    through DLPack, `frombuffer` or __cuda_array_interface__) passes them, so the address is checked too,
    where a tensor has one (`_holds_address`). Run by the ops' checks, hence by `supports` as well: `auto`
    moves on where a launch would refuse."""
    for n, t in named.items():
        vec = 16 // t.element_size()
        bad = [s for s in t.stride()[:-1] if s % vec] if t.numel() else []
        if bad or t.storage_offset() % vec:
            _fail(op, f"{n} rows must start on 16-byte boundaries (strides and offset multiples of {vec} "
                      f"elements), got strides {t.stride()} and offset {t.storage_offset()}; call .contiguous()")
    for n, t in named.items():
        if t.numel() and _holds_address(t) and t.data_ptr() % 16:
            _fail(op, f"{n}'s data pointer is not 16-byte aligned (its storage starts off a boundary); "
                      "call .clone() for a fresh allocation")


def _holds_address(t: Tensor) -> bool:
    """Whether `t.data_ptr()` is where a CUDA tensor's values lie: not for fake tensors (torch.compile's
    tracing, the ops' fake implementations) or other subclasses that handle their own dispatch, nor for
    torch.func's wrapped tensors; CPU tensors take no 16-byte loads here."""
    return (t.is_cuda and type(t).__torch_dispatch__ is Tensor.__torch_dispatch__
            and not _is_functorch_wrapped(t))


def _stream(dev: int) -> int:
    return 0 if dev < 0 else torch.cuda.current_stream(dev).cuda_stream


def _as_float32(*tensors):
    return [t if t.dtype == torch.float32 else t.float() for t in tensors]


_PLAIN = (Tensor, torch.nn.Parameter)


def _direct(*tensors) -> bool:
    """Whether a call may run the op's implementation directly. Going through a Python custom op's
    dispatcher costs tens of microseconds a call, as much as a small kernel; eager calls on plain
    tensors skip it. torch.compile, make_fx/export tracing, tensor subclasses (fake, functional),
    torch.func's wrapped tensors (vmap's batched ones have no storage to read; the op loops over
    the batch) and inputs that need gradients still go through the op (which raises when a backward
    reaches it)."""
    return (not torch.compiler.is_compiling() and _get_current_dispatch_mode() is None
            and all(type(t) in _PLAIN and not _is_functorch_wrapped(t) for t in tensors)
            and _no_grad_needed(*tensors))


def _plain_values(*tensors, tangents: bool = True):
    """Whether the kernels see all of `tensors` (None skipped): not torch.func's wrapped tensors (vmap, grad,
    jvp), whose values a kernel cannot read by address, and (`tangents`) none a dual carrying a forward-AD
    tangent, which a kernel would drop without a word (ids and codes carry none: their ops pass False). `auto`
    then takes torch, which runs under both. Outside forward AD the tangent check costs one global read.
    Under torch.compile the check is not made: Dynamo cannot trace it (a fullgraph compile of every public op
    failed on it), and the call goes through the custom ops, whose fake implementations Dynamo traces."""
    if torch.compiler.is_compiling():
        return True
    if any(t is not None and _is_functorch_wrapped(t) for t in tensors):
        return dispatch.Unsupported("torch.func transforms (vmap, grad, jvp) wrap the inputs, and the native "
                                    "kernels cannot read wrapped tensors")
    if tangents and _forward_ad._current_level >= 0 and any(
            t is not None and _forward_ad.unpack_dual(t).tangent is not None for t in tensors):
        return dispatch.Unsupported("inputs carry forward-AD tangents, which the native kernels would drop")
    return True


# ------------------------------------------------------------------ masked attention (prefill)
def _check_attention(q, k, v, kv_block, q_limit, cu_seqlens):
    op = "masked_attention"
    if q.dim() not in (3, 4) or k.dim() != q.dim() or v.dim() != q.dim():
        _fail(op, f"q, k, v must all be [B, L, H, D] or packed [T, H, D]; got {tuple(q.shape)}, "
                  f"{tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape != v.shape or q.shape[:-2] != k.shape[:-2] or q.shape[-1] != k.shape[-1]:
        _fail(op, f"k and v must have equal shapes sharing q's tokens and head dim; got q {tuple(q.shape)}, "
                  f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.shape[-2] == 0 or q.shape[-2] % k.shape[-2]:
        _fail(op, f"kv heads ({k.shape[-2]}) must divide q heads ({q.shape[-2]})")
    if q.dtype != k.dtype or q.dtype != v.dtype:
        _fail(op, f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}", TypeError)
    if kv_block.shape != q.shape[:-2] or q_limit.shape != q.shape[:-2]:
        _fail(op, f"metadata covers tokens {tuple(kv_block.shape)} / {tuple(q_limit.shape)} but q has "
                  f"{tuple(q.shape[:-2])}")
    if cu_seqlens is not None:
        if q.dim() != 3:
            _fail(op, "cu_seqlens is for the packed layout [T, H, D]; padded batches [B, L, H, D] take none")
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
            _fail(op, f"cu_seqlens must be 1-D with n_docs + 1 >= 2 entries, got shape {tuple(cu_seqlens.shape)}")
    _same_device(op, q=q, k=k, v=v, kv_block=kv_block, q_limit=q_limit, cu_seqlens=cu_seqlens)
    _int32(op, kv_block=kv_block, q_limit=q_limit, cu_seqlens=cu_seqlens)
    _contiguous(op, kv_block=kv_block, q_limit=q_limit, cu_seqlens=cu_seqlens)
    _last_dim_unit(op, q=q, k=k, v=v)
    if q.is_cuda:
        if q.dtype not in _CUDA_ATTN_DTYPES:
            _fail(op, f"CUDA needs bf16 or fp16 q/k/v, got {q.dtype}; cast them or use backend='triton'", TypeError)
        if q.shape[-1] not in _CUDA_HEAD_DIMS:
            _fail(op, f"CUDA supports head dims {_CUDA_HEAD_DIMS}, got {q.shape[-1]}; use backend='triton'")
        _aligned16(op, q=q, k=k, v=v)
        n_seq = q.shape[0] if q.dim() == 4 else cu_seqlens.numel() - 1 if cu_seqlens is not None else 1
        if n_seq > _MAX_GRID_YZ or q.shape[-2] > _MAX_GRID_YZ:
            _fail(op, f"at most {_MAX_GRID_YZ} sequences and heads per launch, got {n_seq} and {q.shape[-2]}")
    elif q.dtype not in _CPU_FLOAT_DTYPES:
        _fail(op, f"the CPU path takes float32, bf16 or fp16, got {q.dtype}", TypeError)


def _check_cu_seqlens_values(cu_seqlens: Tensor, T: int, max_seqlen: int):
    """CPU only: reading the values of a CUDA tensor would synchronize."""
    problem = cu_seqlens_problem(cu_seqlens.tolist(), T, max_seqlen)
    if problem:
        _fail("masked_attention", problem)


def _masked_attention_impl(q: Tensor, k: Tensor, v: Tensor, kv_block: Tensor, q_limit: Tensor,
                           cu_seqlens: Optional[Tensor], max_seqlen: int, softmax_scale: float) -> Tensor:
    """Chunk-masked attention forward. q [B, L, H, D] (meta [B, L]) or packed [T, H, D] (meta [T],
    cu_seqlens int32 [n_docs + 1]; without cu_seqlens one sequence). Returns a contiguous tensor like q."""
    _check_attention(q, k, v, kv_block, q_limit, cu_seqlens)
    dev = _device_index("masked_attention", q)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if q.numel() == 0:
        return out
    # Packed with cu_seqlens: documents found through cu_seqlens. Padded, or [T, H, D]
    # without cu_seqlens (one sequence): sequence s starts at s * (batch stride).
    packed = cu_seqlens is not None
    if packed and max_seqlen <= 0:
        max_seqlen = q.shape[0]  # a safe bound: CTAs past a document's end exit at once
    # On CUDA the values of cu_seqlens are not checked (that would read the device): the kernel clamps each
    # document to the T tokens, so wrong boundaries give wrong rows, never an access outside the tensors.
    # max_seqlen sizes the grid: rows of a document longer than it would stay unwritten. `chunk_mask_meta`
    # and `causal_meta` always set both right; hand-built metadata must too (or pass max_seqlen 0).
    if dev < 0:
        if packed:
            _check_cu_seqlens_values(cu_seqlens, q.shape[0], max_seqlen)
        qc, kc, vc = _as_float32(q, k, v)
        oc = out if out.dtype == torch.float32 else torch.empty(q.shape, dtype=torch.float32)
    else:
        qc, kc, vc, oc = q, k, v, out

    def strides(t):  # (sequence, token, head) in elements
        return (0, t.stride(0), t.stride(1)) if t.dim() == 3 else (t.stride(0), t.stride(1), t.stride(2))

    if packed:
        n_seq, seq_len, meta_sb = cu_seqlens.numel() - 1, q.shape[0], 0
    elif q.dim() == 3:
        n_seq, seq_len, meta_sb, max_seqlen = 1, q.shape[0], 0, q.shape[0]
    else:
        n_seq, seq_len, meta_sb, max_seqlen = q.shape[0], q.shape[1], q.shape[1], q.shape[1]
    _C.masked_attention_fwd(
        dev, _stream(dev), _DTYPE_CODE[qc.dtype], qc.data_ptr(), kc.data_ptr(), vc.data_ptr(), oc.data_ptr(),
        kv_block.data_ptr(), q_limit.data_ptr(), cu_seqlens.data_ptr() if packed else 0,
        n_seq, seq_len, max_seqlen, q.shape[-2], k.shape[-2], q.shape[-1],
        strides(qc), strides(kc), strides(vc), strides(oc), meta_sb, float(softmax_scale))
    if oc is not out:
        out.copy_(oc)
    return out


masked_attention_op = torch.library.custom_op("worldvla::masked_attention", _masked_attention_impl, mutates_args=())


@masked_attention_op.register_fake
def _(q, k, v, kv_block, q_limit, cu_seqlens, max_seqlen, softmax_scale):
    _check_attention(q, k, v, kv_block, q_limit, cu_seqlens)
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)


def masked_attention(q: Tensor, k: Tensor, v: Tensor, meta: ChunkMaskMeta,
                     softmax_scale: float | None = None) -> Tensor:
    """Forward of `worldvla.ops.masked_attention` on the native kernels (no autograd)."""
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    fn = _masked_attention_impl if _direct(q, k, v) else masked_attention_op
    return fn(q, k, v, meta.kv_block, meta.q_limit, meta.cu_seqlens, int(meta.max_seqlen), float(scale))


# ------------------------------------------------------------------ decode attention
def _check_decode(q, k, v, q_pos, q_limit, kv_block, kv_len):
    op = "decode_attention"
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape:
        _fail(op, f"q must be [B, Q, H, D] and k_cache, v_cache equal [B, S, Hkv, D]; got {tuple(q.shape)}, "
                  f"{tuple(k.shape)}, {tuple(v.shape)}")
    B, Q, H, D = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    if k.shape[0] != B or k.shape[3] != D or Hkv == 0 or H % Hkv:
        _fail(op, f"q {tuple(q.shape)} and cache {tuple(k.shape)} disagree on batch, head dim or heads "
                  "(kv heads must divide q heads)")
    if q.dtype != k.dtype or q.dtype != v.dtype:
        _fail(op, f"q, k_cache, v_cache must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}", TypeError)
    for n, t, shape in (("q_pos", q_pos, (B, Q)), ("q_limit", q_limit, (B, Q)), ("kv_block", kv_block, (B, S)),
                        ("kv_len", kv_len, (B,))):
        if tuple(t.shape) != shape:
            _fail(op, f"meta.{n} must have shape {shape}, got {tuple(t.shape)}")
    _same_device(op, q=q, k_cache=k, v_cache=v, q_pos=q_pos, q_limit=q_limit, kv_block=kv_block, kv_len=kv_len)
    _int32(op, q_pos=q_pos, q_limit=q_limit, kv_block=kv_block, kv_len=kv_len)
    _contiguous(op, q_pos=q_pos, q_limit=q_limit, kv_len=kv_len)
    _last_dim_unit(op, q=q, k_cache=k, v_cache=v, kv_block=kv_block)
    if q.is_cuda:
        if q.dtype not in _CUDA_ATTN_DTYPES:
            _fail(op, f"CUDA needs bf16 or fp16 q and caches, got {q.dtype}; cast them or use backend='triton'",
                  TypeError)
        if D not in _CUDA_HEAD_DIMS:
            _fail(op, f"CUDA supports head dims {_CUDA_HEAD_DIMS}, got {D}; use backend='triton'")
        _aligned16(op, q=q, k_cache=k, v_cache=v)
        if B > _MAX_GRID_YZ:
            _fail(op, f"at most {_MAX_GRID_YZ} sequences per launch, got {B}")
        row_groups = Hkv * -(-(Q * (H // Hkv)) // _DECODE_ROWS_PER_CTA)
        if row_groups > _MAX_GRID_YZ:
            _fail(op, f"{Q} queries x {H} heads need {row_groups} row groups per sequence, at most {_MAX_GRID_YZ} "
                      f"per launch; split the queries into several calls")
    elif q.dtype not in _CPU_FLOAT_DTYPES:
        _fail(op, f"the CPU path takes float32, bf16 or fp16, got {q.dtype}", TypeError)


def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def _split(length: int, tile: int, ctas: int, device: torch.device, n_splits: int | None,
           max_splits: int = 1 << 31) -> tuple[int, int]:
    """(splits, items per split) of `length` items over CTAs, splits in whole `tile`s, from shapes
    only: `n_splits` if given, else enough that the `ctas` CTAs of one split become about two per SM."""
    max_splits = max(1, min(-(-length // tile), max_splits))
    if n_splits is None:
        sms = _sm_count(device)
        n_splits = -(-2 * sms // max(1, ctas))
    n_splits = min(max(1, int(n_splits)), max_splits)
    size = -(-(-(-max(length, 1) // n_splits)) // tile) * tile
    return max(1, -(-length // size)), size


def decode_splits(q: Tensor, k_cache: Tensor, n_splits: int | None = None) -> tuple[int, int]:
    """(n_splits, split_size) of the CUDA split-KV decode, from shapes only (fixed across a
    captured graph's replays). Enough splits to give every SM about two CTAs; steps of up to
    DECODE_PLAN_QUERIES rows are split as one row is (worldvla.mask)."""
    B, Q, H, _ = q.shape
    S, Hkv = k_cache.shape[1], k_cache.shape[2]
    planned = 1 if Q <= DECODE_PLAN_QUERIES else Q
    rowgroups = -(-(planned * (H // Hkv)) // _DECODE_ROWS_PER_CTA)
    return _split(S, _DECODE_TILE, B * Hkv * rowgroups, q.device, n_splits)


def _decode_attention_impl(q: Tensor, k_cache: Tensor, v_cache: Tensor, q_pos: Tensor, q_limit: Tensor,
                           kv_block: Tensor, kv_len: Tensor, softmax_scale: float, n_splits: int) -> Tensor:
    """q [B, Q, H, D] against caches [B, S, Hkv, D] under DecodeMeta's rule. On CUDA the split-KV
    partials live in torch-allocated workspaces (from the graph pool under capture)."""
    _check_decode(q, k_cache, v_cache, q_pos, q_limit, kv_block, kv_len)
    dev = _device_index("decode_attention", q)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if q.numel() == 0:
        return out
    B, Q, H, D = q.shape
    S, Hkv = k_cache.shape[1], k_cache.shape[2]
    if dev < 0:
        # A bfloat16 cache is read as it is by the row-by-row kernel (up to DECODE_STEP_MAX_QUERIES rows per
        # sequence), widened exactly: the same result as a float32 copy, without copying the whole cache.
        qc, = _as_float32(q)
        bf16_cache = k_cache.dtype == torch.bfloat16 and Q <= DECODE_STEP_MAX_QUERIES
        kc, vc = (k_cache, v_cache) if bf16_cache else _as_float32(k_cache, v_cache)
        oc = out if out.dtype == torch.float32 else torch.empty(q.shape, dtype=torch.float32)
        o_part = lse_part = None
        splits, split_size = 1, max(S, 1)
    else:
        qc, kc, vc, oc = q, k_cache, v_cache, out
        splits, split_size = decode_splits(q, k_cache, n_splits if n_splits > 0 else None)
        o_part = torch.empty((B, splits, Q, H, D), dtype=torch.float32, device=q.device)
        lse_part = torch.empty((B, splits, Q, H), dtype=torch.float32, device=q.device)
    st = lambda t: (t.stride(0), t.stride(1), t.stride(2))  # noqa: E731
    _C.decode_attention(
        dev, _stream(dev), _DTYPE_CODE[kc.dtype], qc.data_ptr(), kc.data_ptr(), vc.data_ptr(), oc.data_ptr(),
        q_pos.data_ptr(), q_limit.data_ptr(), kv_block.data_ptr(), kv_len.data_ptr(), B, Q, S, H, Hkv, D,
        st(qc), st(kc), st(vc), st(oc), kv_block.stride(0), float(softmax_scale),
        0 if o_part is None else o_part.data_ptr(), 0 if lse_part is None else lse_part.data_ptr(),
        splits, split_size)
    if oc is not out:
        out.copy_(oc)
    return out


decode_attention_op = torch.library.custom_op("worldvla::decode_attention", _decode_attention_impl, mutates_args=())


@decode_attention_op.register_fake
def _(q, k_cache, v_cache, q_pos, q_limit, kv_block, kv_len, softmax_scale, n_splits):
    _check_decode(q, k_cache, v_cache, q_pos, q_limit, kv_block, kv_len)
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)


def decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, meta: DecodeMeta,
                     softmax_scale: float | None = None, n_splits: int | None = None) -> Tensor:
    """`worldvla.ops.decode_attention` on the native kernels. `n_splits` overrides the CUDA
    split-KV heuristic (useful when the cache is much longer than the filled part)."""
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    fn = _decode_attention_impl if _direct(q, k_cache, v_cache) else decode_attention_op
    return fn(q, k_cache, v_cache, meta.q_pos, meta.q_limit, meta.kv_block, meta.kv_len, float(scale),
              int(n_splits or 0))


# ------------------------------------------------------------------ VQ
def _check_vq_quantize(z, codebook):
    op = "vq_quantize"
    if z.dim() != 2 or codebook.dim() != 2 or z.shape[1] != codebook.shape[1]:
        _fail(op, f"wants z [N, C] and codebook [K, C]; got {tuple(z.shape)}, {tuple(codebook.shape)}")
    if codebook.shape[0] == 0:
        _fail(op, "the codebook is empty")
    if z.dtype != codebook.dtype:
        _fail(op, f"z and codebook must share one dtype, got {z.dtype} and {codebook.dtype}", TypeError)
    _same_device(op, z=z, codebook=codebook)
    _last_dim_unit(op, z=z, codebook=codebook)
    allowed = _CUDA_FLOAT_DTYPES if z.is_cuda else _CPU_FLOAT_DTYPES
    if z.dtype not in allowed:
        _fail(op, f"takes {', '.join(map(str, allowed))}, got {z.dtype}", TypeError)


def vq_code_split(z: Tensor, codebook: Tensor, code_splits: int | None = None) -> tuple[int, int]:
    """(code_splits, codes per split) of the CUDA nearest-code search, from shapes only: a CTA takes
    128 rows and one split of the codebook, with enough splits to give every SM about two CTAs
    (a few frames' rows alone would leave most SMs idle)."""
    return _split(codebook.shape[0], _VQ_TILE, -(-z.shape[0] // _VQ_TILE), z.device, code_splits, _MAX_GRID_YZ)


def _vq_quantize_impl(z: Tensor, codebook: Tensor, code_splits: int = 0) -> Tensor:
    """argmin_k ||z_n - e_k||^2 for z [N, C], codebook [K, C] -> int64 [N] (first minimum on ties).
    `code_splits` > 0 overrides the CUDA split heuristic (`vq_code_split`)."""
    _check_vq_quantize(z, codebook)
    dev = _device_index("vq_quantize", z)
    out = torch.empty(z.shape[0], dtype=torch.int64, device=z.device)
    if z.shape[0] == 0:
        return out
    if dev < 0:
        z, codebook = _as_float32(z, codebook)
        split = 0
    else:
        split = vq_code_split(z, codebook, code_splits if code_splits > 0 else None)[1]
    N, C = z.shape
    _C.vq_quantize(dev, _stream(dev), _DTYPE_CODE[z.dtype], z.data_ptr(), z.stride(0), codebook.data_ptr(),
                   codebook.stride(0), N, codebook.shape[0], C, out.data_ptr(), split)
    return out


vq_quantize_op = torch.library.custom_op("worldvla::vq_quantize", _vq_quantize_impl, mutates_args=())


@vq_quantize_op.register_fake
def _(z, codebook, code_splits=0):
    _check_vq_quantize(z, codebook)
    return torch.empty(z.shape[0], dtype=torch.int64, device=z.device)


def _check_vq_gather(indices, codebook):
    op = "vq_gather"
    if indices.dim() != 3 or codebook.dim() != 2:
        _fail(op, f"wants indices [B, h, w] and codebook [K, C]; got {tuple(indices.shape)}, {tuple(codebook.shape)}")
    if indices.dtype not in (torch.int32, torch.int64):
        _fail(op, f"indices must be int32 or int64, got {indices.dtype}", TypeError)
    if codebook.element_size() not in (2, 4, 8):
        _fail(op, f"codebook elements must be 2, 4 or 8 bytes, got {codebook.dtype}", TypeError)
    _same_device(op, indices=indices, codebook=codebook)
    _contiguous(op, indices=indices)
    _last_dim_unit(op, codebook=codebook)


def _vq_gather_impl(indices: Tensor, codebook: Tensor) -> Tensor:
    """indices [B, h, w] -> codebook rows as [B, C, h, w]. Codes outside [0, K) give zeros
    (the entry point `worldvla.ops.vq_gather` rejects them first)."""
    _check_vq_gather(indices, codebook)
    dev = _device_index("vq_gather", indices)
    B, h, w = indices.shape
    K, C = codebook.shape
    out = torch.empty((B, C, h, w), dtype=codebook.dtype, device=codebook.device)
    if out.numel() == 0:
        return out
    _C.vq_gather(dev, _stream(dev), indices.data_ptr(), _DTYPE_CODE[indices.dtype], codebook.data_ptr(),
                 codebook.stride(0), codebook.element_size(), B, h * w, K, C, out.data_ptr())
    return out


vq_gather_op = torch.library.custom_op("worldvla::vq_gather", _vq_gather_impl, mutates_args=())


@vq_gather_op.register_fake
def _(indices, codebook):
    _check_vq_gather(indices, codebook)
    B, h, w = indices.shape
    return torch.empty((B, codebook.shape[1], h, w), dtype=codebook.dtype, device=codebook.device)


# ------------------------------------------------------------------ constrained decoding
def _check_range(hidden, weight, lo, hi, op="constrained_sample"):
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        _fail(op, f"wants hidden [N, H] and weight [V, H]; got {tuple(hidden.shape)}, {tuple(weight.shape)}")
    if not 0 <= lo < hi <= weight.shape[0]:
        _fail(op, f"vocabulary range [{lo}, {hi}) is empty or outside [0, {weight.shape[0]})")
    if hidden.dtype != weight.dtype:
        _fail(op, f"hidden and weight must share one dtype, got {hidden.dtype} and {weight.dtype}", TypeError)
    _same_device(op, hidden=hidden, weight=weight)
    _last_dim_unit(op, hidden=hidden, weight=weight)
    if hidden.is_cuda:
        if hidden.dtype not in _CUDA_FLOAT_DTYPES:
            _fail(op, f"CUDA takes float32, bf16 or fp16, got {hidden.dtype}", TypeError)
        _aligned16(op, hidden=hidden, weight=weight)
        if hidden.shape[1] % (16 // hidden.element_size()):
            _fail(op, f"CUDA needs the hidden size to be a multiple of {16 // hidden.element_size()}, "
                      f"got {hidden.shape[1]}")
    elif hidden.dtype not in _CPU_FLOAT_DTYPES:
        _fail(op, f"the CPU path takes float32, bf16 or fp16, got {hidden.dtype}", TypeError)


def _range_launch(fn_name: str, hidden, weight, lo, hi, out, workspace=None):
    dev = _device_index(fn_name, hidden)
    w, lo_c, hi_c = weight, lo, hi
    if dev < 0 and weight.dtype == torch.float16:
        # Only the range's rows are converted, not the whole lm_head.
        hidden, w = _as_float32(hidden, weight[lo:hi])
        lo_c, hi_c = 0, hi - lo
    elif dev < 0:  # float32 hidden; a float32 or bfloat16 weight read as it is (widened exactly)
        hidden, = _as_float32(hidden)
    args = (dev, _stream(dev), _DTYPE_CODE[w.dtype], hidden.data_ptr(), hidden.stride(0), w.data_ptr(),
            w.stride(0), hidden.shape[0], hidden.shape[1], lo_c, hi_c)
    if fn_name == "range_argmax":
        _C.range_argmax(*args, 0 if workspace is None else workspace.data_ptr(), out.data_ptr())
        if lo_c != lo:
            out.add_(lo - lo_c)  # the CPU path saw only the range's rows
    else:
        _C.range_logits(*args, out.data_ptr())


# Greedy decoding over ranges of at least SCREEN_MIN_ROWS codes on the CPU (ops/sampling.py) screens with
# bfloat16 copies of the range's rows (`range_argmax_screened_cpu`): the same ids from about half the
# bytes. Rows with more than SCREEN_MAX_CANDIDATES codes within the screen's error bound of their top
# take the whole range in float32.
SCREEN_MAX_CANDIDATES = 64
_screen_tables = WeakIdKeyDictionary()  # lm_head weight -> (key, bf16 rows, column maxima); gone with it


def screen_tables(weight: Tensor, lo: int, hi: int):
    """Rows [lo, hi) of a float32 CPU weight as contiguous bfloat16 copies, and each column's largest
    |value| over them, for the screened greedy choice and draw; None where the screen does not apply (a
    weight that is not float32, a range under SCREEN_MIN_ROWS, an inference tensor: below) or a value
    would not round to a finite bfloat16. Kept with the weight (while it lives), keyed by its address,
    version counter and range: an in-place update through the weight (load_state_dict, an optimizer
    step, `weight.copy_(...)` under torch.no_grad()) makes new tables.

    Writes that bypass the version counter are NOT seen, and the screen would then choose from the old
    values: through `weight.data` (`weight.data.copy_(...)`), a NumPy array or DLPack capsule sharing
    its memory. After such a write call `torch.autograd.graph.increment_version(weight)`, which the
    inference engine's `check_model` needs too. (Checking the values instead would read the whole range
    every call, more than the screen saves.) Inference tensors (made under torch.inference_mode) have no
    version counter, so their ranges are not screened: the unscreened float32 choice, the same ids."""
    if weight.dtype != torch.float32 or hi - lo < SCREEN_MIN_ROWS or weight.is_inference():
        return None
    key = (weight.data_ptr(), weight._version, tuple(weight.shape), weight.stride(0), lo, hi)  # the shape: `.data`
    kept = _screen_tables.get(weight)
    if kept is None or kept[0] != key:
        with torch.no_grad():
            rows = weight[lo:hi]
            w16 = rows.to(torch.bfloat16).contiguous()
            tables = (w16, rows.abs().amax(0).contiguous()) if bool(torch.isfinite(w16).all()) else None
        kept = _screen_tables[weight] = (key, tables)
    return kept[1]


def _range_argmax_impl(hidden: Tensor, weight: Tensor, lo: int, hi: int) -> Tensor:
    """Greedy token in [lo, hi) per row: lo + argmax_v hidden . weight[v] (fp32 accumulation)."""
    _check_range(hidden, weight, lo, hi, "range_argmax")
    out = torch.empty(hidden.shape[0], dtype=torch.int64, device=hidden.device)
    if hidden.shape[0] == 0:
        return out
    if hidden.is_cpu and hidden.dtype == torch.float32:
        tables = screen_tables(weight, lo, hi)
        if tables is not None:
            w16, colmax = tables
            _C.range_argmax_screened(hidden.data_ptr(), hidden.stride(0), weight.data_ptr() + lo * weight.stride(0) * weight.element_size(),
                                     weight.stride(0), w16.data_ptr(), colmax.data_ptr(), hidden.shape[0],
                                     hidden.shape[1], hi - lo, SCREEN_MAX_CANDIDATES, out.data_ptr())
            return out.add_(lo)
    on_cuda = _device_index("range_argmax", hidden) >= 0
    ws = torch.empty(hidden.shape[0], dtype=torch.int64, device=hidden.device) if on_cuda else None
    _range_launch("range_argmax", hidden, weight, lo, hi, out, ws)
    return out


range_argmax_op = torch.library.custom_op("worldvla::range_argmax", _range_argmax_impl, mutates_args=())


@range_argmax_op.register_fake
def _(hidden, weight, lo, hi):
    _check_range(hidden, weight, lo, hi, "range_argmax")
    return torch.empty(hidden.shape[0], dtype=torch.int64, device=hidden.device)


def _range_logits_impl(hidden: Tensor, weight: Tensor, lo: int, hi: int) -> Tensor:
    """float32 logits [N, hi - lo] of the vocabulary range only."""
    _check_range(hidden, weight, lo, hi, "range_logits")
    out = torch.empty((hidden.shape[0], hi - lo), dtype=torch.float32, device=hidden.device)
    if hidden.shape[0] == 0:
        return out
    _range_launch("range_logits", hidden, weight, lo, hi, out)
    return out


range_logits_op = torch.library.custom_op("worldvla::range_logits", _range_logits_impl, mutates_args=())


@range_logits_op.register_fake
def _(hidden, weight, lo, hi):
    _check_range(hidden, weight, lo, hi, "range_logits")
    return torch.empty((hidden.shape[0], hi - lo), dtype=torch.float32, device=hidden.device)


def _range_sample_cpu(hidden: Tensor, weight: Tensor, lo: int, hi: int, temperature: float, top_k, generator,
                      gumbel) -> Tensor:
    """`sample_logits`' draw over [lo, hi) in one native call on the CPU, from the generator's noise as
    sample_logits draws it (or `gumbel`): the range's float32 logits, screened with bfloat16 rows as the
    greedy choice is for float32 ranges of SCREEN_MIN_ROWS or more (the same ids either way)."""
    op = "constrained_sample"
    _check_range(hidden, weight, lo, hi, op)
    if weight.dtype not in (torch.float32, torch.bfloat16):
        _fail(op, f"the CPU draw takes float32 or bfloat16 weights, got {weight.dtype}", TypeError)
    N, R = hidden.shape[0], hi - lo
    gumbel = draw_noise((N, R), temperature, top_k, generator, gumbel, hidden.device)
    out = torch.empty(N, dtype=torch.int64)
    if N == 0:
        return out
    z = scaled_gumbel(gumbel, temperature).contiguous()
    h32, = _as_float32(hidden)
    tables = screen_tables(weight, lo, hi)
    if tables is not None:
        w16, colmax = tables
        _C.range_sample_screened(h32.data_ptr(), h32.stride(0), weight.data_ptr() + lo * weight.stride(0) * weight.element_size(),
                                 weight.stride(0), w16.data_ptr(), colmax.data_ptr(), N, hidden.shape[1], R,
                                 SCREEN_MAX_CANDIDATES, z.data_ptr(), top_k or 0, out.data_ptr())
        return out.add_(lo)
    _C.range_sample(h32.data_ptr(), h32.stride(0), weight.data_ptr(), weight.stride(0), _DTYPE_CODE[weight.dtype], N,
                    hidden.shape[1], lo, hi, z.data_ptr(), top_k or 0, out.data_ptr())
    return out


@torch.no_grad()
def constrained_sample(hidden, weight, lo, hi, temperature=0.0, top_k=None, generator=None, gumbel=None):
    """`worldvla.ops.constrained_sample` with the range logits computed natively: greedy is one
    fused kernel; a draw is one native call on the CPU (`_range_sample_cpu`), elsewhere torch's draw
    (`sample_logits`) from the native float32 logits: the same ids. Token ids need no gradient, so inputs
    that require one (a model in training mode sampled outside no_grad) run here too."""
    direct = _direct(hidden, weight)
    if temperature <= 0.0:
        return (_range_argmax_impl if direct else range_argmax_op)(hidden, weight, int(lo), int(hi))
    if direct and hidden.is_cpu and weight.dtype != torch.float16:
        return _range_sample_cpu(hidden, weight, int(lo), int(hi), temperature, top_k, generator, gumbel)
    logits = (_range_logits_impl if direct else range_logits_op)(hidden, weight, int(lo), int(hi))
    return sample_logits(logits, temperature, top_k, generator, gumbel) + lo


# ------------------------------------------------------------------ linear (CPU, few rows)
def _check_linear(x, weight):
    if weight.dim() != 2 or x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        _fail("linear", f"wants x [..., K] and weight [N, K]; got {tuple(x.shape)}, {tuple(weight.shape)}")
    if x.device.type != "cpu" or weight.device.type != "cpu":
        _fail("linear", f"the native path runs on the CPU; got {x.device} and {weight.device} "
                        f"(on GPUs torch's cuBLAS is the fast path)")
    if x.dtype != torch.float32 or weight.dtype != torch.float32:
        _fail("linear", f"the CPU path takes float32, got {x.dtype} and {weight.dtype}", TypeError)
    _last_dim_unit("linear", weight=weight)


def _linear_impl(x: Tensor, weight: Tensor) -> Tensor:
    """x [..., K] @ weight[N, K]^T in float32 (x's rows may be strided; each row contiguous).
    Called once per projection of a decode step, so the common case is checked in one expression
    (the kernel itself takes a few microseconds); anything else goes through the full checks."""
    if not (x.is_cpu and weight.is_cpu and x.dtype == torch.float32 and weight.dtype == torch.float32
            and weight.dim() == 2 and x.dim() >= 1 and x.shape[-1] == weight.shape[1] and weight.stride(1) == 1):
        _check_linear(x, weight)
    N, K = weight.shape
    x2 = x if x.dim() == 2 else x.reshape(math.prod(x.shape[:-1]), K)  # (-1 is ambiguous when K is 0)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    y = torch.empty((*x.shape[:-1], N), dtype=torch.float32)
    if M and N:
        _C.linear(-1, x2.data_ptr(), x2.stride(0), weight.data_ptr(), weight.stride(0), M, K, N, y.data_ptr(), N)
    return y


linear_op = torch.library.custom_op("worldvla::linear", _linear_impl, mutates_args=())


@linear_op.register_fake
def _(x, weight):
    _check_linear(x, weight)
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def linear(x: Tensor, weight: Tensor) -> Tensor:
    return (_linear_impl if _direct(x, weight) else linear_op)(x, weight)


def _dispatched_linear(x: Tensor, weight: Tensor) -> Tensor:
    """`linear` as the dispatcher hands it out. A forward resolves the op once, on its first projection: a later
    one the kernel cannot take (a weight or input that needs gradients, an adapter or an unfrozen layer further
    in: the kernel is forward-only; a weight of another layout or dtype) goes through torch's."""
    if not _no_grad_needed(x, weight):
        return F.linear(x, weight)
    if not (x.dtype == weight.dtype == torch.float32 and weight.dim() == 2 and weight.stride(1) == 1
            and weight.is_cpu) and not _passes(_check_linear, x, weight):
        return F.linear(x, weight)  # (a bfloat16 x: under autocast, the activations a forward's modules cast)
    return linear(x, weight)  # (under autocast `auto` resolves to torch's linear: `_linear_supports`)


# ------------------------------------------------------------------ decoder layer (CPU decode steps)
_DECODER_WEIGHTS = ("input_layernorm", "q_proj", "k_proj", "v_proj", "o_proj", "q_norm.weight", "q_norm.bias",
                    "k_norm.weight", "k_norm.bias", "post_attention_layernorm", "gate_proj", "up_proj", "down_proj")


_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_LAYER_PARTS = ("self_attn", "mlp", "input_layernorm", "post_attention_layernorm", "self_attn.q_norm",
                "self_attn.k_norm", "dropout")
_module_kinds = None


def _kinds() -> tuple:
    """worldvla's own module classes the native layer computes, in the order of `_LAYER_PARTS` (the
    layer's class first). Imported on first use: worldvla.model imports worldvla.ops."""
    global _module_kinds
    if _module_kinds is None:
        from ..model import MLP, Attention, DecoderLayer, HeadLayerNorm, RMSNorm
        _module_kinds = (DecoderLayer, Attention, MLP, RMSNorm, RMSNorm, HeadLayerNorm, HeadLayerNorm,
                         torch.nn.Dropout)
    return _module_kinds


def _hooked(modules) -> bool:
    """Whether calling any of `modules` would run a forward hook (its own or torch's global ones), which
    a native path, calling no module, would skip."""
    from torch.nn.modules import module as M
    return bool(M._global_forward_hooks or M._global_forward_pre_hooks
                or any([m._forward_hooks or m._forward_pre_hooks for m in modules]))


def _structure_problem(layer, parts, projs) -> str:
    """Why `layer` (its parts and projections as `_layer_weights` found them) is not what the native
    layer computes."""
    for name, mod, kind in zip(("layer", *_LAYER_PARTS), (layer, *parts), _kinds()):
        if type(mod) is not kind:
            return (f"{name} is a {type(mod).__name__}, not worldvla's {kind.__name__}; subclassed or replaced "
                    "modules keep the layer's modules")
    for name, proj in zip(_PROJECTIONS, projs):
        if type(proj) is not torch.nn.Linear or proj._parameters.get("bias") is not None:
            return (f"{name} is a {type(proj).__name__}, not a plain nn.Linear without bias; adapted, quantized "
                    "or subclassed projections keep the layer's modules")
    if _hooked((layer, *parts, *projs)):
        return "a forward hook is registered on the layer, one of its modules or globally; hooked layers keep their modules"
    attn_eps = (parts[4].eps, parts[5].eps)
    if parts[2].eps != parts[3].eps or attn_eps[0] != attn_eps[1]:
        return (f"the layer's two RMSNorms (eps {parts[2].eps}, {parts[3].eps}) or its head norms (eps {attn_eps[0]}, "
                f"{attn_eps[1]}) differ in epsilon; the native layer takes one of each")
    return ""


def _layer_weights(layer) -> tuple:
    """The 13 parameters of a decoder layer in the order of `_C.decoder_layer`. Read from the modules'
    dictionaries: nn.Module attribute lookups cost about 2 us each, the whole layer's about 30 us.
    Raises ValueError unless the layer is made of worldvla's own modules as the native layer computes
    them: plain bias-free nn.Linear projections (not an adapter such as LoRA, a quantized linear or a
    subclass with its own forward), worldvla's norms with one epsilon per kind, and no forward hooks
    (a native call runs no module, so it would skip them)."""
    mods = layer._modules
    attn, mlp = mods["self_attn"], mods["mlp"]
    a, m = attn._modules, mlp._modules
    parts = (attn, mlp, mods["input_layernorm"], mods["post_attention_layernorm"], a["q_norm"], a["k_norm"],
             mods["dropout"])
    projs = (a["q_proj"], a["k_proj"], a["v_proj"], a["o_proj"], m["gate_proj"], m["up_proj"], m["down_proj"])
    kinds = _kinds()
    lin = torch.nn.Linear
    if not (all([type(p) is k for p, k in zip((layer, *parts), kinds)])
            and all([type(p) is lin and p._parameters.get("bias") is None for p in projs])
            and not _hooked((layer, *parts, *projs))
            and parts[2].eps == parts[3].eps and parts[4].eps == parts[5].eps):
        _fail("decoder_layer", _structure_problem(layer, parts, projs))
    qn, kn = parts[4], parts[5]
    # The head norms' affine rows per head: the parameters, or (the release's shared rows) their repeats.
    qw, qb = (qn._parameters["weight"], qn._parameters["bias"]) if qn.rows == qn.heads else qn.per_head()
    kw, kb = (kn._parameters["weight"], kn._parameters["bias"]) if kn.rows == kn.heads else kn.per_head()
    return (parts[2]._parameters["weight"], projs[0]._parameters["weight"],
            projs[1]._parameters["weight"], projs[2]._parameters["weight"], projs[3]._parameters["weight"],
            qw, qb, kw, kb, parts[3]._parameters["weight"],
            projs[4]._parameters["weight"], projs[5]._parameters["weight"], projs[6]._parameters["weight"])


def shared_head_norms(model) -> bool:
    """Whether the model's q/k norms hold the release's shared affine rows, which the native layer reads
    repeated per head: copies, which an in-place update of the rows leaves stale."""
    return model.config.model_parallel_size is not None and model.config.model_parallel_size != \
        model.config.num_attention_heads


@functools.lru_cache(maxsize=None)
def _decoder_shapes(H: int, Hkv: int, Dh: int, D: int, I: int) -> tuple:
    return tuple(torch.Size(s) for s in ((D,), (H * Dh, D), (Hkv * Dh, D), (Hkv * Dh, D), (D, H * Dh), (H, Dh),
                                         (H, Dh), (Hkv, Dh), (Hkv, Dh), (D,), (I, D), (I, D), (D, I)))


def _config_shapes(cfg) -> tuple:
    return _decoder_shapes(cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.hidden_size,
                           cfg.intermediate_size)


def _check_decoder_layer(layer, x, cos, sin, ctx, index, dtype=torch.float32):
    """Everything `_C.decoder_layer` relies on; `cos`, `sin` None skip the rotary tables (a forward's
    dispatch checks before they exist; every call checks them). `dtype`: the one the weights, hidden
    states and cache must have (the decode step also takes bfloat16 models)."""
    op = "decoder_layer"
    cache, meta, pos = ctx.cache, ctx.decode_meta, ctx.position_ids
    if cache is None or meta is None or pos is None:
        _fail(op, "runs cached forwards only (a KV cache, position_ids and decode_meta)")
    try:
        cfg = layer.self_attn.cfg
        w, names = _layer_weights(layer), _DECODER_WEIGHTS
    except (KeyError, AttributeError) as err:
        _fail(op, f"layer {index} is not laid out as worldvla's DecoderLayer (no {err}); it keeps its modules")
    Hkv, Dh, D = cfg.num_key_value_heads, cfg.head_dim, cfg.hidden_size
    if x.dim() != 3 or x.shape[-1] != D:
        _fail(op, f"wants hidden states [B, Q, {D}], got {tuple(x.shape)}")
    B, Q = x.shape[:2]
    if not _no_grad_needed(x, *w):
        _fail(op, "the native layer is forward-only and these inputs need gradients; use torch.no_grad()")
    for n, t, shape in zip(names, w, _config_shapes(cfg)):
        if t.shape != shape:
            _fail(op, f"layer {index}: {n} has shape {tuple(t.shape)}, the config says {tuple(shape)}")
    # The kernels find layer `index` at that offset from the cache's start: a negative or too large
    # index would read and write outside it (Python's indexing would take -1 as the last layer).
    n_layers = min(cache.k.shape[0], cache.v.shape[0]) if cache.k.dim() == cache.v.dim() == 5 else 0
    if not isinstance(index, numbers.Integral) or not 0 <= index < n_layers:
        _fail(op, f"layer index {index!r} must be an int in [0, {n_layers}), the layers of the cache "
                  f"(k {tuple(cache.k.shape)}, v {tuple(cache.v.shape)}, [layers, B, S, kv heads, head dim]); "
                  "pass the layer's position in the model, counted from 0")
    k, v = cache.k[index], cache.v[index]
    if k.shape != (B, k.shape[1], Hkv, Dh) or v.shape != k.shape:
        _fail(op, f"the cache's layer {index} is {tuple(k.shape)}, expected [{B}, S, {Hkv}, {Dh}]")
    tensors = dict(zip(names, w), x=x, k_cache=k, v_cache=v, **({} if cos is None else {"cos": cos, "sin": sin}))
    for n, t in (*tensors.items(), ("position_ids", pos), ("decode_meta.q_pos", meta.q_pos),
                 ("decode_meta.q_limit", meta.q_limit), ("decode_meta.kv_block", meta.kv_block),
                 ("decode_meta.kv_len", meta.kv_len)):
        if type(t) not in _PLAIN:
            _fail(op, f"{n} is a {type(t).__name__}; the native layer takes plain tensors (sharded or traced "
                      "weights keep the modules)")
        if not t.is_cpu:
            _fail(op, f"the native layer runs on the CPU; {n} is on {t.device}")
    for n, t in tensors.items():
        if t.dtype != dtype:  # (cos and sin come with float32 layers only)
            what = "float32" if dtype == torch.float32 else f"one dtype, {dtype} here"
            _fail(op, f"the CPU path takes {what}; {n} is {t.dtype}", TypeError)
    _contiguous(op, **dict(zip(names, w)), x=x, cos=cos, sin=sin)
    _last_dim_unit(op, k_cache=k, v_cache=v)
    if cos is not None and not cos.numel() == sin.numel() == B * Q * Dh:
        _fail(op, f"rotary cos and sin must each hold [B, Q, {Dh}] values, got {tuple(cos.shape)} and "
                  f"{tuple(sin.shape)}")
    if tuple(pos.shape) != (B, Q) or pos.dtype != torch.int64 or not pos.is_contiguous():
        _fail(op, f"position_ids must be contiguous int64 [{B}, {Q}], got {pos.dtype} {tuple(pos.shape)}")
    S = k.shape[1]
    for n, t, shape in (("q_pos", meta.q_pos, (B, Q)), ("q_limit", meta.q_limit, (B, Q)),
                        ("kv_block", meta.kv_block, (B, S)), ("kv_len", meta.kv_len, (B,))):
        if tuple(t.shape) != shape:
            _fail(op, f"decode_meta.{n} must have shape {shape}, got {tuple(t.shape)}")
    _int32(op, q_pos=meta.q_pos, q_limit=meta.q_limit, kv_block=meta.kv_block, kv_len=meta.kv_len)
    _contiguous(op, q_pos=meta.q_pos, q_limit=meta.q_limit, kv_len=meta.kv_len)
    _last_dim_unit(op, kv_block=meta.kv_block)


def _decoder_layer_ready(w, shapes, x, cos, sin, ctx, index) -> bool:
    """The common case of `_check_decoder_layer` in a few expressions (a step calls the layer once per
    layer; the full checks cost about 60 us). False sends the call through the full checks. `cos`,
    `sin` None skip the rotary tables, as there."""
    f32, i32 = torch.float32, torch.int32
    cache, meta, pos = ctx.cache, ctx.decode_meta, ctx.position_ids
    if cache is None or meta is None or pos is None or x.dim() != 3:
        return False
    B, Q, D = x.shape
    k, v = cache.k, cache.v
    return (_no_grad_needed(x, *w) and all([type(t) in _PLAIN and t.dtype == f32 and t.is_cpu for t in w])
            and [t.shape for t in w] == list(shapes) and all([t.is_contiguous() for t in w])
            and type(x) in _PLAIN and x.dtype == f32 and x.is_cpu and x.is_contiguous() and D == shapes[0][0]
            and (cos is None or cos.dtype == sin.dtype == f32 and cos.is_cpu and sin.is_cpu and cos.is_contiguous()
                 and sin.is_contiguous() and cos.numel() == sin.numel() == B * Q * shapes[5][1])
            and k.dtype == v.dtype == f32 and k.is_cpu and v.is_cpu and k.dim() == 5 and k.shape == v.shape
            and k.shape[1] == B and k.shape[3:] == shapes[7] and k.is_contiguous() and v.is_contiguous()
            and 0 <= index < k.shape[0] and pos.dtype == torch.int64 and pos.is_cpu and pos.is_contiguous()
            and pos.shape == (B, Q) == meta.q_pos.shape == meta.q_limit.shape
            and meta.q_pos.dtype == meta.q_limit.dtype == meta.kv_block.dtype == meta.kv_len.dtype == i32
            and meta.kv_block.shape == (B, k.shape[2]) and meta.kv_len.shape == (B,) and meta.kv_block.is_cpu
            and meta.q_pos.is_cpu and meta.q_limit.is_cpu and meta.kv_len.is_cpu
            and meta.q_pos.is_contiguous() and meta.q_limit.is_contiguous() and meta.kv_len.is_contiguous()
            and meta.kv_block.stride(1) == 1)


def decoder_layer(layer, x: Tensor, cos: Tensor, sin: Tensor, ctx, index: int) -> Tensor:
    """`worldvla.ops.decoder_layer` natively: x [B, Q, D] -> the layer's output, with this layer's keys
    and values written into `ctx.cache` at `ctx.position_ids`. Up to NATIVE_MAX_ROWS rows (decode
    steps) in one C++ call; more (a prefill through the cache) with torch's GEMM for the seven
    projections and the C++ stages between them. Eager only (it takes a module): traced forwards and
    inputs that need gradients keep the modules (`auto`)."""
    mods = layer._modules
    attn = mods["self_attn"]
    cfg = attn.cfg
    w, shapes = _layer_weights(layer), _config_shapes(cfg)
    if not _decoder_layer_ready(w, shapes, x, cos, sin, ctx, index):
        _check_decoder_layer(layer, x, cos, sin, ctx, index)
    B, Q, D = x.shape
    if B * Q > NATIVE_MAX_ROWS:
        # float32 throughout, as the one-call path: under autocast F.linear would return buffers of another
        # dtype, which the C++ stages read as float32 (`auto` passes over this layer under autocast)
        with dispatch.autocast_off(x.device.type):
            return _decoder_layer_gemm(layer, w, x, cos, sin, ctx, index)
    y = torch.empty_like(x)
    if x.numel():
        _C.decoder_layer(x.data_ptr(), y.data_ptr(), D, cfg.intermediate_size, [t.data_ptr() for t in w],
                         cos.data_ptr(), sin.data_ptr(), ctx.position_ids.data_ptr(),
                         float(mods["input_layernorm"].eps), float(attn._modules["q_norm"].eps),
                         bool(layer.swin_norm), *_cache_args(cfg, x, ctx, index))
    return y


def _dispatched_decoder_layer(layer, x: Tensor, cos: Tensor, sin: Tensor, ctx, index: int) -> Tensor:
    """`decoder_layer` as the dispatcher hands it out. A forward resolves the op on its first layer's tensors: a
    later layer the native path cannot take (a weight that needs gradients, a non-contiguous one) runs its
    modules instead of failing. Anything else wrong (the cache, the metadata, the layer index) is refused as
    `decoder_layer` refuses it."""
    w = _layer_weights(layer)
    if not _no_grad_needed(*w) or not all(t.is_contiguous() for t in w):
        from .decoder import decoder_layer_ref
        return decoder_layer_ref(layer, x, cos, sin, ctx, index)
    return decoder_layer(layer, x, cos, sin, ctx, index)


def _cache_args(cfg, x, ctx, index) -> tuple:
    """The cache and DecodeMeta arguments `_C.decoder_layer` and `_C.decoder_attention_block` share."""
    meta = ctx.decode_meta
    k, v = ctx.cache.k, ctx.cache.v  # [layers, B, S, Hkv, Dh]: layer `index` by its offset (no views)
    k_ptr = k.data_ptr() + index * k.stride(0) * k.element_size()
    v_ptr = v.data_ptr() + index * v.stride(0) * v.element_size()
    return (k_ptr, v_ptr, meta.q_pos.data_ptr(), meta.q_limit.data_ptr(), meta.kv_block.data_ptr(),
            meta.kv_len.data_ptr(), x.shape[0], x.shape[1], k.shape[2], cfg.num_attention_heads,
            cfg.num_key_value_heads, cfg.head_dim, k.stride()[1:4], v.stride()[1:4], meta.kv_block.stride(0),
            1.0 / math.sqrt(cfg.head_dim))


def _decoder_layer_gemm(layer, w, x, cos, sin, ctx, index) -> Tensor:
    """The checked layer over many rows: torch's sgemm (about twice linear.cpp's rate at prefill
    sizes) for the projections, `_C` for the norms, rotary embedding, cache write, attention,
    residuals and SwiGLU between them."""
    ln1, wq, wk, wv, wo, _, _, _, _, ln2, wg, wu, wd = w
    mods = layer._modules
    attn = mods["self_attn"]
    cfg, post = attn.cfg, bool(layer.swin_norm)
    eps = float(mods["input_layernorm"].eps)
    B, Q, D = x.shape
    R = B * Q
    x2 = x.view(R, D)
    a_in = x2
    if not post:
        a_in = torch.empty_like(x2)
        _C.rms_norm(x2.data_ptr(), ln1.data_ptr(), R, D, eps, a_in.data_ptr())
    q, k, v = F.linear(a_in, wq), F.linear(a_in, wk), F.linear(a_in, wv)
    o = torch.empty_like(q)
    _C.decoder_attention_block(q.data_ptr(), k.data_ptr(), v.data_ptr(), o.data_ptr(), [t.data_ptr() for t in w],
                               cos.data_ptr(), sin.data_ptr(), ctx.position_ids.data_ptr(),
                               float(attn._modules["q_norm"].eps), *_cache_args(cfg, x, ctx, index))
    h = F.linear(o, wo)
    y = torch.empty_like(x2)
    # y = x + attention branch; under pre-norm h becomes the MLP's normed input.
    _C.decoder_residual(x2.data_ptr(), h.data_ptr(), y.data_ptr(), R, D, ln1.data_ptr(),
                        0 if post else ln2.data_ptr(), h.data_ptr(), eps, post)
    m_in = y if post else h
    g, u = F.linear(m_in, wg), F.linear(m_in, wu)
    _C.silu_mul(g.data_ptr(), u.data_ptr(), g.numel())
    d = F.linear(g, wd)
    _C.decoder_residual(y.data_ptr(), d.data_ptr(), y.data_ptr(), R, D, ln2.data_ptr(), 0, 0, eps, post)
    return y.view(B, Q, D)


_PROJECTION_SLOTS = (1, 2, 3, 4, 10, 11, 12)  # the projections among a layer's 13 weights (_DECODER_WEIGHTS)
# model -> (its projections' addresses and versions, their bfloat16 copies or None); gone with the model
_bf16_projections = weakref.WeakKeyDictionary()


def bf16_projections(model) -> list | None:
    """Every layer's seven projection weights as contiguous bfloat16 copies, if every one of their values
    is a bfloat16 (the low 16 bits of each float32 zero: a bfloat16 checkpoint loaded as float32), so
    that widening them back is exact; else None. The last answer is kept with the model (while it
    lives), keyed by the weights' addresses and version counters (an in-place update such as
    load_state_dict makes new copies). As for `screen_tables`: a write through `.data` (or NumPy, DLPack)
    is not seen until `torch.autograd.graph.increment_version(weight)`, and inference tensors, which
    have no version counter, get no copies (None: the step reads them where they are)."""
    weights = [w for layer in model.model.layers for i, w in enumerate(_layer_weights(layer)) if i in _PROJECTION_SLOTS]
    if any([w.is_inference() for w in weights]):
        _bf16_projections.pop(model, None)
        return None
    key = tuple((w.data_ptr(), w._version, tuple(w.shape)) for w in weights)  # a `.data` swap may keep the address
    kept = _bf16_projections.get(model)
    if kept is None or kept[0] != key:
        with torch.no_grad():
            exact = all(w.dtype == torch.float32 and w.is_contiguous() and not (w.view(torch.int32) & 0xFFFF).any()
                        for w in weights)
            kept = _bf16_projections[model] = (key, [w.to(torch.bfloat16) for w in weights] if exact else None)
    return kept[1]


def build_decode_step(model, cache, ids: Tensor, pos: Tensor, meta, bf16_weights: list | None = None):
    """A whole cached decode step of `model` (a `worldvla.model.WorldVLA`) as one `_C.DecodeStep` call on
    fixed buffers: ids, pos [B, Q] int64 (positions = cache slots), `meta` the step's DecodeMeta, `cache`
    the KVCache. Returns `run`: `run()` writes the step's final-norm hidden states into one static
    [B, Q, hidden] tensor and returns it, and the cache slots at `pos` of every layer as the layers'
    modules would. Raises
    ValueError / TypeError naming what does not fit (the decoder layer's own checks, for every layer).
    `bf16_weights`: `bf16_projections(model)`, to stream the projections at half the bytes (the same
    results: their values are exactly those bfloat16s).

    A bfloat16 model runs too: its embedding, projections and cache are read as they are and widened
    exactly, every sum is float32 (its norms' weights as float32 copies, which the step holds), the
    cache takes keys and values rounded to bfloat16 as torch rounds them, and `run()` returns bfloat16
    hidden states. That is more precise than its modules' bfloat16 arithmetic, so its tokens may
    differ from theirs where two logits are close; parallel and sequential decoding, both on the
    step, still agree exactly.

    Every row is computed the same way whatever the number of rows (the few-row layer at any batch),
    so a parallel chunk's rows get exactly the sequential decoder's arithmetic however many
    sequences are batched."""
    op = "decode_step"
    from ..model import ForwardContext, RMSNorm, rope_cos_sin

    cfg = model.config
    if ids.dim() != 2 or ids.dtype != torch.int64 or not ids.is_contiguous() or not ids.is_cpu:
        _fail(op, f"ids must be contiguous int64 [B, Q] on the CPU, got {ids.dtype} {tuple(ids.shape)} on {ids.device}")
    B, Q = ids.shape
    if not 1 <= Q <= DECODE_STEP_MAX_QUERIES:
        _fail(op, f"takes 1 to {DECODE_STEP_MAX_QUERIES} rows per sequence (a decode step), got {Q}")
    layers = list(model.model.layers)
    if not layers:
        _fail(op, "the model has no decoder layers")
    if cache.k.dim() != 5 or cache.k.shape[0] < len(layers):
        _fail(op, f"the cache (k {tuple(cache.k.shape)}) must hold [layers, B, S, kv heads, head dim] for the "
                  f"model's {len(layers)} layers; make it with KVCache(model.config, ...)")
    if model.training and any(m.p > 0 for m in model.modules() if isinstance(m, torch.nn.Dropout)):
        _fail(op, "dropout is active (training mode); call model.eval()")
    dtype = model.model.embed_tokens.weight.dtype
    if dtype not in (torch.float32, torch.bfloat16):
        _fail(op, f"runs float32 and bfloat16 models, not {dtype}", TypeError)
    if dtype == torch.bfloat16 and bf16_weights is not None:
        _fail(op, "bf16_weights are for float32 models; a bfloat16 model's projections are streamed as they are")
    x = torch.empty(B, Q, cfg.hidden_size, dtype=dtype)  # stands in for the hidden states in the layers' checks
    ctx = ForwardContext(cache=cache, position_ids=pos, decode_meta=meta)
    for i, layer in enumerate(layers):
        _check_decoder_layer(layer, x, None, None, ctx, i, dtype)
        if bool(layer.swin_norm) != bool(layers[0].swin_norm) or any(
                float(a.eps) != float(b.eps) for a, b in ((layer.input_layernorm, layers[0].input_layernorm),
                                                          (layer.self_attn.q_norm, layers[0].self_attn.q_norm))):
            _fail(op, f"layer {i} differs from layer 0 in its norm placement or epsilons; the step shares them")
    for n, mod, kind in (("embed_tokens", model.model.embed_tokens, torch.nn.Embedding),
                         ("norm", model.model.norm, RMSNorm)):
        if type(mod) is not kind or getattr(mod, "max_norm", None) is not None:
            _fail(op, f"model.{n} is a {type(mod).__name__}, not the {kind.__name__} the native step computes; "
                      "the layers' modules keep it")
        if _hooked((mod,)):
            _fail(op, f"a forward hook is registered on model.{n}; hooked modules keep their forward")
    embed, norm = model.model.embed_tokens.weight, model.model.norm.weight
    for n, t, shape in (("embed_tokens.weight", embed, (cfg.vocab_size, cfg.hidden_size)),
                        ("norm.weight", norm, (cfg.hidden_size,))):
        if type(t) not in _PLAIN or not t.is_cpu or t.dtype != dtype or not t.is_contiguous():
            _fail(op, f"{n} must be a plain contiguous {dtype} CPU tensor (as the layers' weights), got "
                      f"{type(t).__name__} {t.dtype} on {t.device}")
        if tuple(t.shape) != shape:
            _fail(op, f"{n} has shape {tuple(t.shape)}, the config says {shape}")
    if not _no_grad_needed(embed, norm):
        _fail(op, "the native step is forward-only and these weights need gradients; use torch.no_grad()")
    S = cache.k.shape[2]
    cos, sin = (t.reshape(S, cfg.head_dim).contiguous() for t in
                rope_cos_sin(torch.arange(S), cfg.head_dim, cfg.rope_theta, torch.float32))
    out = torch.empty(B, Q, cfg.hidden_size, dtype=dtype)
    common = _cache_args(cfg, x, ctx, 0)[2:]  # everything after layer 0's K and V addresses
    kv = [_cache_args(cfg, x, ctx, i)[:2] for i in range(len(layers))]
    attn = layers[0].self_attn
    weights = [list(_layer_weights(layer)) for layer in layers]
    if dtype == torch.bfloat16:  # the norms' weights (all but the projections) as float32 copies
        weights = [[t if i in _PROJECTION_SLOTS else t.float() for i, t in enumerate(row)] for row in weights]
        norm = norm.float()
    addresses = [[t.data_ptr() for t in row] for row in weights]
    if bf16_weights is not None:
        if len(bf16_weights) != len(_PROJECTION_SLOTS) * len(layers):
            _fail(op, f"bf16_weights holds {len(bf16_weights)} tensors, not the {len(layers)} layers' seven projections")
        copies = iter(bf16_weights)
        for layer, (row, own) in enumerate(zip(addresses, weights)):
            for i in _PROJECTION_SLOTS:
                c = next(copies)  # read by address: anything but a bfloat16 copy of this very projection reads garbage
                if not (isinstance(c, Tensor) and c.dtype == torch.bfloat16 and c.is_cpu and c.is_contiguous()
                        and c.shape == own[i].shape):
                    got = f"{c.dtype} {tuple(c.shape)}" if isinstance(c, Tensor) else type(c).__name__
                    _fail(op, f"bf16_weights: layer {layer}'s projection {i} must be a contiguous bfloat16 CPU copy "
                              f"of shape {tuple(own[i].shape)}, got {got}; build them with bf16_projections(model)")
                row[i] = c.data_ptr()
    step = _C.DecodeStep(ids.data_ptr(), embed.data_ptr(), cfg.vocab_size, cos.data_ptr(), sin.data_ptr(), S,
                         norm.data_ptr(), float(model.model.norm.eps), out.data_ptr(), addresses,
                         [k for k, _ in kv], [v for _, v in kv], cfg.hidden_size, cfg.intermediate_size,
                         pos.data_ptr(), float(layers[0].input_layernorm.eps), float(attn.q_norm.eps),
                         bool(layers[0].swin_norm), *common, bf16_weights is not None, _DTYPE_CODE[dtype])
    # The step reads these by address: they live as long as it does. The tensors themselves, not the KVCache
    # and DecodeMeta holding them: an attribute of those replaced would free memory the step still reads.
    keep = (cos, sin, ids, pos, meta.q_pos, meta.q_limit, meta.kv_block, meta.kv_len, cache.k, cache.v, embed,
            bf16_weights, weights, norm)

    def run(step=step, out=out, keep=keep) -> Tensor:
        step.run()
        return out

    run.native = step  # (decode_frame runs it in its own loop)
    return run


def decode_frame(one, two, weight: Tensor, lo: int, hi: int, codes: Tensor, next_pos: Tensor, h: int, w: int,
                 newline: int, first: int = 1, last: int | None = None, noise: Tensor | None = None,
                 top_k: int | None = None, cfg_scale: float | None = None) -> None:
    """A world-model frame's codes [first, last) (default: all but the given first) in one native call:
    `one` and `two`, the engine's one- and two-row steps (`build_decode_step`'s `run`, on its buffers), fed
    as `generate_frame_codes` feeds them: codes [rows, h * w] int64 (column 0 given, the rest written),
    next_pos [rows] int64 (advanced). Each code is chosen over lm_head rows [lo, hi) of `weight` exactly as
    the native `constrained_sample` chooses it (screened for float32 ranges of SCREEN_MIN_ROWS or more):
    greedily without `noise`, else drawn as `sample_logits` draws it with `noise`, the image row's
    temperature-scaled Gumbel noise [w, rows, hi - lo] float32 (`ops.sampling.scaled_gumbel`; code i takes
    row i % w), and `top_k`; a sampled call then stays within one image row. With `cfg_scale`, the steps
    hold the unconditional branches after the rows (next_pos [2 * rows]) and each code is chosen from
    u + cfg_scale * (c - u) of the two branches' float32 logits, as `generate_frame_codes` computes them
    on the native kernel."""
    op = "decode_frame"
    rows, last = codes.shape[0], h * w if last is None else last
    seqs = rows * (1 if cfg_scale is None else 2)
    if codes.dtype != torch.int64 or tuple(codes.shape) != (rows, h * w) or not codes.is_contiguous() or not codes.is_cpu:
        _fail(op, f"codes must be contiguous int64 [rows, {h * w}] on the CPU, got {codes.dtype} {tuple(codes.shape)}")
    if next_pos.dtype != torch.int64 or tuple(next_pos.shape) != (seqs,) or not next_pos.is_contiguous():
        _fail(op, f"next_pos must be contiguous int64 [{seqs}], got {next_pos.dtype} {tuple(next_pos.shape)}")
    if weight.dtype not in (torch.float32, torch.bfloat16) or not weight.is_cpu or weight.dim() != 2 \
            or weight.stride(1) != 1 or not 0 <= lo < hi <= weight.shape[0]:
        _fail(op, f"wants a float32 or bfloat16 CPU lm_head weight with unit column stride and a range inside it, got "
                  f"{weight.dtype} {tuple(weight.shape)} on {weight.device}, [{lo}, {hi})")
    if not 1 <= first <= last <= h * w:
        _fail(op, f"codes [{first}, {last}) must lie within [1, {h * w}]")
    screen = colmax = None
    if noise is not None:
        if noise.dtype != torch.float32 or tuple(noise.shape) != (w, rows, hi - lo) or not noise.is_contiguous() \
                or not noise.is_cpu:
            _fail(op, f"noise must be contiguous float32 [{w}, {rows}, {hi - lo}] on the CPU, got {noise.dtype} "
                      f"{tuple(noise.shape)}")
        if first < last and first // w != (last - 1) // w:
            _fail(op, f"a sampled call covers one image row of {w} codes, got codes [{first}, {last})")
        if top_k is not None and top_k < 1:
            _fail(op, f"top_k must be >= 1 (or None for the whole range), got {top_k}")
    tables = screen_tables(weight, lo, hi) if cfg_scale is None else None  # guided choices take float32 logits
    if tables is not None:
        screen, colmax = tables
    _C.decode_frame(one.native, two.native, rows, h, w, newline, codes.data_ptr(), next_pos.data_ptr(),
                    weight.data_ptr(), weight.stride(0), _DTYPE_CODE[weight.dtype], weight.shape[1], lo, hi,
                    0 if screen is None else screen.data_ptr(), 0 if colmax is None else colmax.data_ptr(),
                    SCREEN_MAX_CANDIDATES, first, last, 0 if noise is None else noise.data_ptr(), top_k or 0,
                    cfg_scale is not None, 1.0 if cfg_scale is None else float(cfg_scale))


def vq_quantize(z: Tensor, codebook: Tensor, code_splits: int | None = None) -> Tensor:
    """`worldvla.ops.vq_quantize` on the native kernels. `code_splits` overrides the CUDA split of
    the codebook over CTAs (`vq_code_split`)."""
    return (_vq_quantize_impl if _direct(z, codebook) else vq_quantize_op)(z, codebook, int(code_splits or 0))


def vq_gather(indices: Tensor, codebook: Tensor) -> Tensor:
    """`worldvla.ops.vq_gather` on the native kernels."""
    return (_vq_gather_impl if _direct(indices, codebook) else vq_gather_op)(indices, codebook)


# ------------------------------------------------------------------ dispatch registration
def _device_ok(op: str, t: Tensor):
    return _passes(_device_index, op, t)


def _no_grad_needed(*tensors) -> bool:
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


def _no_grad(*tensors):
    return True if _no_grad_needed(*tensors) else dispatch.Unsupported(
        "inputs need gradients and the native kernels are forward-only; use torch.no_grad() or another backend")


def _passes(check, *args):
    try:
        check(*args)
    except (ValueError, TypeError, RuntimeError) as err:
        return dispatch.Unsupported(str(err))
    return True


def _attention_supports(q, k, v, meta, softmax_scale=None):
    return dispatch.first_false(
        lambda: _device_ok("masked_attention", q), lambda: _no_grad(q, k, v), lambda: _plain_values(q, k, v),
        lambda: _passes(_check_attention, q, k, v, meta.kv_block, meta.q_limit, meta.cu_seqlens))


def _decode_supports(q, k_cache, v_cache, meta, softmax_scale=None):
    return dispatch.first_false(
        lambda: _device_ok("decode_attention", q), lambda: _no_grad(q, k_cache, v_cache),
        lambda: _plain_values(q, k_cache, v_cache),
        lambda: _passes(_check_decode, q, k_cache, v_cache, meta.q_pos, meta.q_limit, meta.kv_block, meta.kv_len))


def _vq_quantize_supports(z, codebook):
    return dispatch.first_false(lambda: _device_ok("vq_quantize", z),
                                lambda: _plain_values(z, codebook, tangents=False),
                                lambda: _passes(_check_vq_quantize, z, codebook))


def _vq_gather_supports(indices, codebook):
    return dispatch.first_false(lambda: _device_ok("vq_gather", indices), lambda: _no_grad(codebook),
                                lambda: _plain_values(indices, codebook),
                                lambda: _passes(_check_vq_gather, indices, codebook))


def _linear_supports(x, weight):
    plain = type(x) in _PLAIN and type(weight) in _PLAIN or dispatch.Unsupported(
        "tensor subclasses (sharded DTensor weights, traced fake tensors) take torch's linear")
    def no_autocast():
        if dispatch.autocast_casts(x.device.type, x.dtype, weight.dtype):
            return dispatch.Unsupported(f"autocast to {torch.get_autocast_dtype(x.device.type)} is on, which "
                                        "torch's linear follows and the float32 kernel would not")
        return True
    return dispatch.first_false(plain, lambda: _no_grad(x, weight), lambda: _plain_values(x, weight), no_autocast,
                                lambda: _passes(_check_linear, x, weight))


def _decoder_layer_supports(layer, x, ctx, step: bool = False):
    """`layer`: one decoder layer, or every layer of a forward (the model's ModuleList: a forward resolves
    the op once for all of them, so each one's modules are checked; the tensors' checks, shared, on the
    first). `step`: whether the whole decode step (`build_decode_step`) would take it, which also runs
    bfloat16 models."""
    layers = (layer,) if isinstance(layer, torch.nn.Module) and not isinstance(layer, torch.nn.ModuleList) else layer
    def eager():
        if torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None:
            return dispatch.Unsupported("traced forwards keep the layer's modules")
        return True
    def no_dropout():  # after `modules`: a layer's one dropout is its nn.Dropout `dropout`
        if any([lay._modules["dropout"].training and lay._modules["dropout"].p > 0 for lay in layers]):
            return dispatch.Unsupported("dropout is active (training mode); call model.eval()")
        return True
    def modules():
        for i, lay in enumerate(layers):
            try:
                _layer_weights(lay)
            except ValueError as err:
                return dispatch.Unsupported(f"layer {i}: {err}" if len(layers) > 1 else str(err))
            except (KeyError, AttributeError) as err:
                return dispatch.Unsupported(f"layer {i} is not laid out as worldvla's DecoderLayer (no {err}); "
                                            "it keeps its modules")
        return True
    def no_autocast():  # the layer's modules under autocast compute in its dtype; this layer would not
        w = _layer_weights(layers[0])
        if dispatch.autocast_casts(x.device.type, x.dtype, *{t.dtype for t in w}):
            return dispatch.Unsupported(f"autocast to {torch.get_autocast_dtype(x.device.type)} is on, which the "
                                        "layer's modules follow and the native layer would not")
        return True
    def checks():
        first = layers[0]
        if step and x.dtype == torch.bfloat16:
            return _passes(_check_decoder_layer, first, x, None, None, ctx, 0, torch.bfloat16)
        if _decoder_layer_ready(_layer_weights(first), _config_shapes(first.self_attn.cfg), x, None, None, ctx, 0):
            return True  # the few expressions of the common case first (a forward resolves the op every step)
        return _passes(_check_decoder_layer, first, x, None, None, ctx, 0)
    if not len(layers):
        return dispatch.Unsupported("no decoder layers")
    return dispatch.first_false(eager, lambda: _plain_values(x), modules, no_dropout, no_autocast, checks)


def _sample_supports(hidden, weight, lo, hi, temperature=0.0, top_k=None, generator=None):
    # No gradient check: the ids carry none, and `auto` must choose alike with and without grad mode.
    return dispatch.first_false(lambda: _device_ok("constrained_sample", hidden),
                                lambda: _plain_values(hidden, weight, tangents=False),
                                lambda: _passes(_check_range, hidden, weight, lo, hi))



dispatch.register("masked_attention", "native", masked_attention, _attention_supports)
dispatch.register("decode_attention", "native", decode_attention, _decode_supports)
dispatch.register("vq_quantize", "native", vq_quantize, _vq_quantize_supports)
dispatch.register("vq_gather", "native", vq_gather, _vq_gather_supports)
dispatch.register("constrained_sample", "native", constrained_sample, _sample_supports)
dispatch.register("linear", "native", _dispatched_linear, _linear_supports)
dispatch.register("decoder_layer", "native", _dispatched_decoder_layer, _decoder_layer_supports)
