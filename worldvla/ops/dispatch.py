"""The single dispatch point: every op names its implementations per backend.

A backend registers `(op, fn, supports)`; `supports(*args, **kwargs)` says whether
it can take those inputs (device, dtype, head dim, ...). `backend="auto"` walks the
op's preference order for the inputs' device and takes the first that supports them;
"torch" (the reference) supports everything and closes every list.
"""
from __future__ import annotations

import importlib
import math
import numbers
from contextlib import nullcontext
from typing import Callable

import torch

BACKENDS = ("torch", "triton", "native")

# On CPU the C++ paths lead only where `worldvla bench cpu_ops` measured them faster than torch,
# which depends on the vector width (torch.backends.cpu.get_cpu_capability()) and on the vendor
# (torch's matmuls go through MKL, whose AMD code paths are slower than its Intel ones):
# - AVX2 (2-core AMD EPYC): C++ faster for decode attention (1.2-1.7x), constrained sampling (up to
#   1.8x), VQ search (1.2-1.5x) and gather (1.2x), and for prefill attention at head dim 64 (1.4-2.2x)
#   though not at 128 (0.74x); that run predates the broadcast fix in cpu_common.h, which made the
#   8-wide prefill 1.5-1.8x faster. On the Intel Xeon below with torch, MKL and oneDNN held to AVX2
#   (cpu_ops-cpu-2core-avx512-intel-limited-to-avx2.json) the 8-wide prefill is 1.2x torch at head
#   dim 128 and 1.6-2.2x at 64, so AVX2 machines take the C++ prefill too.
# - AVX512 on Intel (2-core Xeon; the C++ kernels 16 wide, decode 8), two runs with each side's call on
#   its own input set (earlier runs let the C++ side read inputs torch had just cached): C++ faster
#   for prefill attention (1.4-1.9x), decode attention (1.02-1.51x) and gather (1.2-1.6x), even for the
#   VQ search at 256-1,024 rows (0.96-1.05x; 1.5x at 16); constrained sampling about even (0.91-1.22x), so
#   torch's MKL keeps it, except greedy over frame-sized ranges, which `auto` screens natively on every
#   CPU (ops/sampling.py SCREEN_MIN_ROWS). The AVX2 AMD line above was measured the earlier way.
# - AVX512 on AMD (2-core EPYC with AVX-512), two runs in the fair order: C++ faster for every op:
#   prefill 1.6-2.3x, decode 1.2-1.9x (one case about even: a one-row step at 32 heads of 128,
#   0.96-0.97x), constrained sampling 1.2-2.3x, VQ search 1.1-2.6x, gather 1.2-1.45x; three earlier runs
#   the earlier way agreed on the order.
#   The few-row linear (decode steps' projections, up to ops.projection.NATIVE_MAX_ROWS rows), on the
#   first such machine: a step's projections through worldvla.ops 1.6-2.6x torch's MKL sgemm up to 16
#   rows, 1.7x at 64 (the kernel alone 4-6x at 1-5 rows), MKL streaming the weights at 5-9 GB/s there
#   (NOTES.md); in the fair-order runs, whose MKL was faster, 1.2-2.5x up to 16 rows, 1.3-1.9x at 40-64. The same machine with torch,
#   MKL and oneDNN held to AVX2 and the kernel 8 wide (cpu_ops-cpu-2core-avx512-amd-limited-to-avx2.json),
#   standing in for an AMD AVX2 CPU: 2.0x at 1 row, 2.6-3.0x at 2-10, 1.2x at 64. On the Intel Xeon MKL
#   stays ahead through worldvla.ops (0.68-1.07x), so Intel CPUs and unknown vendors keep torch's linear.
# - The decoder layer of decode steps (ops.decoder_layer: one C++ call a layer, up to
#   ops.projection.NATIVE_MAX_ROWS rows) on the Intel Xeon with AVX-512, a small-config step's 4 layers:
#   2.6-3.0x the modules at 1 row, 2.4-2.75x at 5, 2.1x at 10, 1.4x at 40 (two runs); with torch held to
#   AVX2 and the kernels 8 wide 3.0x / 2.4x / 1.9x / 1.1x. On the AMD EPYC with AVX-512 3.9-4.05x at 1
#   row, 3.85x at 5, 3.4x at 10, 1.7x at 40 (two runs).
#   Above NATIVE_MAX_ROWS (a prefill through the cache) the layer runs torch's GEMM for its projections
#   and its C++ stages between them: 1.11-1.13x a parallel chunk's time on the Xeon (ops.decoder.NATIVE_PREFILL).
#   Where decoder_layer leads, the inference engine runs each whole decode step (up to 32 rows per
#   sequence, any batch) in one native call (ops.decoder.DecodeStepPlan, NATIVE_STEP): 1.8x a one-row
#   step, a frame 1.5x on the Xeon.
# Anything else (other architectures, no AVX2) was not measured: torch.
_ALL_CPU_OPS = ("masked_attention", "decode_attention", "constrained_sample", "vq_quantize", "vq_gather")
CPU_NATIVE_FIRST = {
    "AVX2": _ALL_CPU_OPS + ("decoder_layer",),
    ("AVX2", "amd"): _ALL_CPU_OPS + ("linear", "decoder_layer"),
    "AVX512": ("masked_attention", "decode_attention", "vq_quantize", "vq_gather", "decoder_layer"),
    ("AVX512", "amd"): _ALL_CPU_OPS + ("linear", "decoder_layer"),
}


def cpu_capability() -> str:
    import torch

    return torch.backends.cpu.get_cpu_capability()


def cpu_vendor() -> str | None:
    """The CPU's vendor: "intel", "amd", another vendor_id in lower case, or None where /proc/cpuinfo
    does not say (it is read on x86 Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    vendor = line.split(":", 1)[1].strip()
                    return {"GenuineIntel": "intel", "AuthenticAMD": "amd"}.get(vendor, vendor.lower() or None)
    except OSError:
        pass
    return None


def _auto_order(capability: str, vendor: str | None = None) -> dict:
    """Fastest first, per device type, or per (op, device type) where an op differs from its device's
    rule. Triton leads on CUDA until the native CUDA kernels have passed their GPU tests on hardware."""
    order = {"cuda": ("triton", "native", "torch"), "cpu": ("torch",),
             ("linear", "cuda"): ("torch",),          # cuBLAS
             ("decoder_layer", "cuda"): ("torch",)}   # the modules (captured in the engine's CUDA graphs)
    for op in CPU_NATIVE_FIRST.get((capability, vendor), CPU_NATIVE_FIRST.get(capability, ())):
        order[(op, "cpu")] = ("native", "torch")
    return order


AUTO_ORDER = _auto_order(cpu_capability(), cpu_vendor())


class Unsupported:
    """A `supports` answer that is false and says why; an explicit backend's error quotes it."""

    __slots__ = ("reason",)

    def __init__(self, reason: str):
        self.reason = reason

    def __bool__(self) -> bool:
        return False

    def __repr__(self) -> str:
        return f"Unsupported({self.reason!r})"


def values_readable(t) -> bool:
    """Whether `t`'s values can be read on the host: not while torch.compile traces, not a meta or fake
    tensor (FakeTensorMode, export), not while a fake mode is active (its ops return fake tensors).
    (Entry points read only CPU values, or pay one sync where they say so.)"""
    import torch
    from torch._subclasses.fake_tensor import is_fake

    return not (torch.compiler.is_compiling() or t.device.type == "meta" or is_fake(t)
                or torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE) is not None)


def check_generator(generator) -> None:
    """A sampling call's `generator`: a torch.Generator or None. Anything else failed deep in torch.rand, or at
    temperature 0 (where nothing is drawn) went unnoticed."""
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator (or None: torch's default), got {type(generator).__name__}")


def check_scale(op: str, softmax_scale) -> float | None:
    """An attention call's `softmax_scale` as a float (None: 1/sqrt(head dim)). A string or a tensor was taken by
    one backend and refused deep inside another."""
    if softmax_scale is None:
        return None
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, numbers.Real) \
            or not math.isfinite(softmax_scale):
        raise TypeError(f"{op}: softmax_scale must be a finite number or None (1/sqrt(head dim)), got "
                        f"{softmax_scale!r} ({type(softmax_scale).__name__})")
    return float(softmax_scale)


def check_floats(op: str, same: bool = True, **tensors) -> None:
    """An entry point's floating inputs, named in the error: each floating-point, and (`same`) all of the first
    one's dtype as autocast leaves them (`autocast_floats`: it casts fp32, fp16 and bf16 to one dtype but keeps
    fp64, so fp64 beside fp32 is refused under autocast too). torch's own error ("expected m1 and m2 to have
    the same dtype") names neither the op nor the argument to convert."""
    (first, t0), *rest = tensors.items()
    for name, t in tensors.items():
        if not t.dtype.is_floating_point:
            raise TypeError(f"{op}: {name} must be a floating-point tensor, got {t.dtype}")
    mixed = [(name, t) for name, t in rest if same and t.dtype != t0.dtype]
    if not mixed:
        return
    cast = _autocast_dtype(t0.device.type)
    if cast is not None:
        def after(dtype):
            return cast if dtype in _AUTOCAST_LOWER else dtype
        mixed = [(name, t) for name, t in mixed if after(t.dtype) != after(t0.dtype)]
        if not mixed:
            return
        name, t = mixed[0]
        raise TypeError(f"{op}: {name} is {t.dtype} but {first} is {t0.dtype}, which autocast does not make one "
                        f"(it casts fp32, fp16 and bf16 to {cast} but keeps fp64); convert them to one dtype")
    name, t = mixed[0]
    raise TypeError(f"{op}: {name} is {t.dtype} but {first} is {t0.dtype}; convert them to one dtype")


_AUTOCAST_LOWER = (torch.float32, torch.float16, torch.bfloat16)  # the dtypes autocast casts (fp64 it keeps)


def _autocast_dtype(device_type: str):
    """The dtype autocast casts to on `device_type`, or None where it is off (or a device type it does not know)."""
    try:
        return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
    except RuntimeError:  # meta
        return None


def autocast_floats(device_type: str, *tensors):
    """`tensors` as torch's own matmul-like ops (F.linear, SDPA) take them under autocast on `device_type`: the
    fp32, fp16 and bf16 ones in autocast's dtype (fp64 kept, as autocast keeps it); as given where it is off. An
    entry point casts its inputs so before choosing a backend: custom kernels are not seen by autocast, so the
    native ones computed in fp32 and returned fp32 where torch's path returned bf16, and `auto`'s answer
    depended on the machine."""
    dtype = _autocast_dtype(device_type)
    if dtype is None:
        return tensors
    return tuple(t.to(dtype) if t is not None and t.dtype in _AUTOCAST_LOWER else t for t in tensors)


def autocast_casts(device_type: str, *dtypes) -> bool:
    """Whether autocast on `device_type` would compute torch's matmul-like ops on tensors of `dtypes` in another
    dtype: a fused path that reads them as they are (the native decoder layer and decode step) would then
    compute something else than the modules it stands for."""
    dtype = _autocast_dtype(device_type)
    return dtype is not None and any(d in _AUTOCAST_LOWER and d != dtype for d in dtypes)


def autocast_off(device_type: str):
    """A context in which autocast does not cast on `device_type`: for a reference that computes in fp32 or wider
    whatever the caller's autocast (the VQ distances, whose argmin bf16 rounding would change)."""
    if _autocast_dtype(device_type) is None:
        return nullcontext()
    return torch.autocast(device_type, enabled=False)


def require_integers(t: torch.Tensor, what: str) -> None:
    """Refuse ids, codes or offsets `t` that are not integers (`what`: the message, up to the dtype): a float
    would be truncated by `.long()` without a word, a bool taken as a mask."""
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"{what}, got {t.dtype}")


def check_devices(op: str, **tensors) -> None:
    """An entry point's tensors (None skipped) all on the first one's device. Mixed devices reach no kernel:
    the torch path would read a meta tensor's uninitialized memory beside CPU ones without an error, or stop
    in a torch error that names neither the op nor the argument to move. One device comparison per tensor
    (on the decode path's every projection)."""
    dev = None
    for name, t in tensors.items():
        if t is None:
            continue
        if dev is None:
            first, dev = name, t.device
        elif t.device != dev:
            raise ValueError(f"{op}: {name} is on {t.device} but {first} is on {dev}; move it to {dev}")


def first_false(*answers):
    """The first false answer of a `supports` chain (an Unsupported keeps its reason), else True.
    An answer may be a zero-argument callable, evaluated only if every answer before it passed."""
    for answer in answers:
        ok = answer() if callable(answer) else answer
        if not ok:
            return ok
    return True


_IMPLS: dict[str, dict[str, tuple[Callable, Callable]]] = {}
_loaded = False
_BACKEND_MODULES = {"triton": "worldvla.ops.triton_backend", "native": "worldvla.ops.native_backend"}
_IMPORT_ERRORS: dict[str, ImportError] = {}  # backend -> why its module did not import
_INSTALL_HINTS = {"triton": 'pip install "worldvla[triton]"', "native": "build the extension (pip install .)"}


def register(op: str, backend: str, fn: Callable, supports: Callable | None = None) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    _IMPLS.setdefault(op, {})[backend] = (fn, supports or (lambda *a, **k: True))


def _load_backends() -> None:
    """Import the optional backends once; each registers what it has."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    for backend, mod in _BACKEND_MODULES.items():
        try:
            importlib.import_module(mod)
        except ImportError as err:
            _IMPORT_ERRORS[backend] = err


def registered_ops() -> list[str]:
    _load_backends()
    return sorted(_IMPLS)


def available(op: str) -> list[str]:
    _load_backends()
    return sorted(_IMPLS.get(op, {}))


def supports(op: str, backend: str, *args, **kwargs) -> bool:
    """Whether `backend` has `op` and accepts these inputs."""
    _load_backends()
    impl = _IMPLS.get(op, {}).get(backend)
    return impl is not None and bool(impl[1](*args, **kwargs))


def resolve(op: str, backend: str, device_type: str, *args, **kwargs) -> Callable:
    _load_backends()
    impls = _IMPLS.get(op)
    if not impls:
        raise KeyError(f"no implementation registered for op {op!r}")
    if backend == "auto":
        for name in AUTO_ORDER.get((op, device_type)) or AUTO_ORDER.get(device_type, ("torch",)):
            if name in impls and impls[name][1](*args, **kwargs):
                return impls[name][0]
        return impls["torch"][0]
    if backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
    if backend not in impls:
        if backend in _IMPORT_ERRORS:  # the backend itself is missing, not just this op
            raise RuntimeError(f"op {op!r} has no {backend!r} implementation available here: the {backend!r} "
                               f"backend did not import ({_IMPORT_ERRORS[backend]}); {_INSTALL_HINTS[backend]}")
        raise RuntimeError(f"op {op!r} has no {backend!r} implementation; it has {sorted(impls)}: use one of "
                           f"those or backend='auto'")
    fn, supports = impls[backend]
    ok = supports(*args, **kwargs)
    if not ok:
        why = ok.reason if isinstance(ok, Unsupported) else "device, dtype or shape"
        raise ValueError(f"the {backend!r} backend of {op!r} does not support these inputs ({why}); "
                         f"use backend='torch' or 'auto'")
    return fn


def call(op: str, backend: str, device_type: str, *args, **kwargs):
    return resolve(op, backend, device_type, *args, **kwargs)(*args, **kwargs)
