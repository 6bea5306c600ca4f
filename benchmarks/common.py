"""Timing and reporting shared by every benchmark.

Rules: warm-up first; on CUDA, CUDA-event medians over many repeats; on CPU, perf_counter medians;
both sides of every ratio are timed in the same process, on the same inputs; FLOP counts exclude
masked-out work.

A call whose inputs fit in the cache would find them there on every repeat and time the cache, not
memory: kernel benchmarks pass a `Rotation`, several independent input sets that together exceed a
few times the GPU's L2 (on CUDA) or the CPU's last-level cache (elsewhere; 480 MiB of L3 on some
machines), within a memory budget, and `time_fn` hands the timed function the next set on every call
(warm-up included). Every row records whether its inputs rotated, the cache and whether the sets
together still fit in it (`inputs_cache_hot`). Kernel benchmarks also time with `gpu_time`: the CUDA
events then measure the device's work, not the host's launch overhead, which would otherwise dominate
microsecond kernels such as decode attention.

Peak memory (`peak_memory`): CUDA's allocator peak; on the CPU the growth of the peak resident set
after glibc has handed every free page back to the kernel (`malloc_trim`), so that blocks served from
memory the process already holds count as well as fresh ones (see `PEAK_MEMORY_METHOD`).

The sides of a ratio are timed interleaved where they can be (`time_interleaved`: one call of each a
round, the order turning every round), so that a machine that speeds up or slows down moves every side
alike. Every timed row records p90_over_p10 (or, in a row of too few repeats for percentiles, max_over_min:
`_stats`); `print_table` warns about rows above `NOISY_SPREAD`, and
each result records the load average when its benchmark started (`load_average_start`, passed in its
extra) and when it was written (`load_average_end`), so that a run on a busy machine shows as one.

Every result records where it ran (`environment`): the device, torch, CUDA, Triton, Python, the date, the
L2 or last-level cache, worldvla's version and the git commit of its checkout (None without git), and on
CUDA the NVIDIA driver's version. `measure_bandwidth` measures the device's copy bandwidth in the calling
process (attention's decode rows and e2e's weight-streaming floor are read against it).

`--quick` runs write `<name>-<device>-quick.json` next to the full results, never over them. Each JSON and
plot is written under a temporary name of its own and renamed whole (`checkpoint.write_atomic`), so runs
writing into one folder at once never mix their files.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import datetime
import functools
import gc
import json
import math
import os
import platform
import warnings
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch

ROTATION_FACTOR = 3          # input sets together cover this many times the cache (GPU L2, CPU last level)
ROTATION_BUDGET = 4 << 30    # at most this many bytes of rotated inputs (and a quarter of free memory)
QUICK_ROTATION_BUDGET = 256 << 20  # the same for --quick runs (smoke runs: their inputs may stay cache-hot)
ROTATION_MAX_SETS = 512
SPIN_CYCLES = 2_000_000      # about 1 ms at Hopper clocks: time for the host to queue a call behind it
# A row whose p90 exceeds this many times its p10 was timed on a busy machine (or its side is erratic):
# print_table warns, and write_results counts such rows (`noisy_rows`). On a shared CPU a descheduled
# worker thread costs a scheduler tick (4 ms at 250 Hz), which alone can spread a row's times this much.
NOISY_SPREAD = 1.5


def device_name(device: str | torch.device = "cpu") -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device).replace(" ", "-")
    # The vector width torch's CPU kernels use, and the vendor (MKL's code paths differ), decide
    # which side of a C++-vs-torch ratio wins.
    from worldvla.ops.dispatch import cpu_capability, cpu_vendor

    vendor = cpu_vendor()
    cap = cpu_capability().lower()
    name = f"cpu-{os.cpu_count()}core-{{}}" + (f"-{vendor}" if vendor else "")
    if isa_limits():
        # torch, MKL or oneDNN held to a narrower instruction set (to stand in for an older CPU): name the
        # machine and the limit, so that the result never overwrites a real machine's.
        return name.format(_hardware_capability() or cap) + f"-limited-to-{cap}"
    return name.format(cap)


ISA_LIMIT_VARS = ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA")


def isa_limits() -> dict:
    """Settings that cap the instruction sets torch, MKL and oneDNN use."""
    return {k: os.environ[k] for k in ISA_LIMIT_VARS if os.environ.get(k)}


def _hardware_capability() -> str | None:
    """The widest of torch's CPU capabilities the hardware has ("avx512", "avx2"), from /proc/cpuinfo."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
                    return "avx512"
                return "avx2" if {"avx2", "fma"} <= flags else None
    except OSError:
        pass
    return None


def cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


@functools.lru_cache(maxsize=None)
def package_version() -> tuple[str | None, str | None]:
    """(worldvla's version, the git commit of its checkout): None where unknown (an installed copy, no git, a
    working tree copied without its .git)."""
    try:
        import worldvla

        version = getattr(worldvla, "__version__", None)
        root = Path(worldvla.__file__).resolve().parents[1]
    except ImportError:
        return None, None
    commit = None
    if not (root / ".git").exists():  # not a checkout: git would answer for whatever repository holds it
        return version, None
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            commit = out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return version, commit


@functools.lru_cache(maxsize=None)
def nvidia_driver_version() -> str | None:
    """The NVIDIA driver's version ("550.54.15", from nvidia-smi); else the CUDA driver API version torch
    reports ("cuda driver api 12040"); None where neither answers."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        return f"cuda driver api {torch._C._cuda_getDriverVersion()}"
    except (AttributeError, RuntimeError):
        return None


def environment(device="cpu") -> dict:
    version, commit = package_version()
    env = {"device": device_name(device), "torch": torch.__version__, "python": platform.python_version(),
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "cuda": torch.version.cuda, "cpu_threads": torch.get_num_threads(),
           "l2_cache_bytes": l2_cache_bytes(device), "worldvla": version, "git_commit": commit}
    if torch.device(device).type == "cuda":
        env["nvidia_driver"] = nvidia_driver_version()
    if torch.device(device).type == "cpu":
        llc = cpu_last_level_cache()
        env.update(cpu_cache=llc and llc[0], cpu_cache_bytes=llc and llc[1])
        from worldvla.ops.dispatch import cpu_capability, cpu_vendor

        from worldvla.inference.malloc import cpu_malloc_settings

        env.update(cpu_model=cpu_model(), cpu_capability=cpu_capability(), cpu_vendor=cpu_vendor(),
                   cpu_malloc=cpu_malloc_settings() or "glibc defaults (or the environment's)")
        # Settings that cap the instruction sets torch, MKL and oneDNN use (to stand in for an older CPU).
        limits = isa_limits()
        if limits:
            env["isa_limits"] = limits
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    try:
        import worldvla._C as C

        env["native_cuda"] = bool(C.with_cuda)
    except ImportError:
        env["native_cuda"] = None
    return env


def timed_backends(op: str) -> list[str]:
    """The backends of `op` worth timing: every registered one, less Triton while it runs in its
    CPU interpreter (TRITON_INTERPRET=1, as under the test suite), whose times say nothing."""
    from worldvla import ops

    interpreted = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    return [b for b in ops.dispatch.available(op) if not (b == "triton" and interpreted)]


def l2_cache_bytes(device="cpu") -> int | None:
    """The GPU's L2 size in bytes; None off CUDA."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    size = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0)
    return int(size) if size else 50 << 20  # older torch: assume an H100-sized L2


def _cache_size_bytes(text: str) -> int:
    """sysfs cache sizes: "491520K", "32M", "1024"."""
    text = text.strip().upper()
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
    return int(text.rstrip("KMG")) * scale


@functools.lru_cache(maxsize=None)
def cpu_last_level_cache() -> tuple[str, int] | None:
    """("L3", bytes): the highest-level data cache of the CPUs this process may run on, summed over its
    distinct instances (sysfs `shared_cpu_list`), from /sys/devices/system/cpu/cpu*/cache; None if unreadable."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = list(range(os.cpu_count() or 1))
    caches = {}  # (level, shared_cpu_list) -> bytes
    for cpu in cpus:
        for idx in Path(f"/sys/devices/system/cpu/cpu{cpu}/cache").glob("index*"):
            try:
                if (idx / "type").read_text().strip() == "Instruction":
                    continue
                level = int((idx / "level").read_text())
                shared = (idx / "shared_cpu_list").read_text().strip()
                caches[level, shared] = _cache_size_bytes((idx / "size").read_text())
            except (OSError, ValueError):
                continue
    if not caches:
        return None
    top = max(level for level, _ in caches)
    return f"L{top}", sum(size for (level, _), size in caches.items() if level == top)


def cache_info(device="cpu") -> tuple[str | None, int | None]:
    """The cache a rotation must overflow: ("L2", bytes) of a CUDA device, the CPU's last-level cache
    otherwise; (None, None) where unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        return "L2", l2_cache_bytes(device)
    if device.type != "cpu":
        return None, None
    return cpu_last_level_cache() or (None, None)


def _available_memory(device) -> int:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0  # unknown: no rotation beyond the first set


def rotation_budget(device="cpu", quick: bool = False) -> int:
    """Bytes the extra input sets may take: `ROTATION_BUDGET` (`QUICK_ROTATION_BUDGET` for --quick
    runs), and at most a quarter of the device's free memory."""
    return min(QUICK_ROTATION_BUDGET if quick else ROTATION_BUDGET, _available_memory(device) // 4)


def input_bytes(inputs) -> int:
    """Bytes of the distinct tensor storages in a (nested) tuple / list / dict of inputs."""
    seen, total = set(), 0

    def walk(x):
        nonlocal total
        if isinstance(x, torch.Tensor):
            key = (x.device, x.untyped_storage().data_ptr())
            if key not in seen:
                seen.add(key)
                total += x.untyped_storage().nbytes()
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)

    walk(inputs)
    return total


def rotation_count(bytes_per_set: int, device="cpu", *, new_bytes: int | None = None,
                   factor: float = ROTATION_FACTOR, budget_bytes: int | None = None,
                   max_sets: int = ROTATION_MAX_SETS, quick: bool = False) -> int:
    """How many input sets of `bytes_per_set` (what one call reads) together cover `factor` x the
    cache (`cache_info`: the GPU's L2, the CPU's last-level cache).

    1 where the cache is unknown. Capped by `budget_bytes // new_bytes`, `new_bytes` being what each
    extra set allocates (default `bytes_per_set`); the default budget is `rotation_budget(device, quick)`.
    Sets that do not fit the budget are not made: the rotation's `inputs_cache_hot` then says so.
    """
    device = torch.device(device)
    _, cache = cache_info(device)
    if cache is None:
        return 1
    want = math.ceil(factor * cache / max(1, bytes_per_set))
    if budget_bytes is None:
        budget_bytes = rotation_budget(device, quick)
    fit = budget_bytes // max(1, new_bytes if new_bytes is not None else bytes_per_set)
    return int(max(1, min(want, fit, max_sets)))


class Rotation:
    """Independent input sets, built up front, handed out in turn (one per timed call).

    `make_inputs(i)` returns the inputs of set i as a tuple; the timed function is called as
    `fn(*inputs)`. The number of sets comes from `rotation_count` (on every device) unless `n` is
    given; the sets are sized by what one call reads (`bytes_per_set`, default: every tensor of a
    set). Share one Rotation between the implementations compared, so that every side draws its inputs
    from the same sets (`time_fn` hands one side each set in turn; `cpu_ops.interleaved` hands every call
    the next set, so that no call finds the previous call's inputs in the cache).
    """

    def __init__(self, make_inputs: Callable[[int], tuple], device="cpu", *, n: int | None = None,
                 bytes_per_set: int | None = None, **count_kwargs):
        self.device = torch.device(device)
        first = tuple(make_inputs(0))
        self.bytes_per_set = int(bytes_per_set if bytes_per_set is not None else input_bytes(first))
        if n is None:
            n = rotation_count(self.bytes_per_set, self.device, new_bytes=input_bytes(first), **count_kwargs)
        if n < 1:
            raise ValueError(f"a rotation needs at least one input set, got n={n}")
        self.sets = [first] + [tuple(make_inputs(i)) for i in range(1, n)]
        self.cache, self.cache_bytes = cache_info(self.device)
        self._next = 0

    def __len__(self) -> int:
        return len(self.sets)

    def next(self) -> tuple:
        """The next set, cycling."""
        inputs = self.sets[self._next]
        self._next = (self._next + 1) % len(self.sets)
        return inputs

    def info(self) -> dict:
        """What a result row records about the rotation: the sets, the cache they must overflow and
        whether they still fit in it together (then repeats may find a call's inputs there)."""
        n = len(self.sets)
        hot = None if self.cache_bytes is None else n * self.bytes_per_set <= self.cache_bytes
        return {"rotated_sets": n, "set_bytes": self.bytes_per_set, "inputs_rotated": n > 1,
                "cache": self.cache, "cache_bytes": self.cache_bytes, "inputs_cache_hot": hot}


def _check_counts(warmup, repeats) -> None:
    """A timing's call counts: a median needs at least one timed call (none gave statistics' StatisticsError)."""
    for name, value, low in (("warmup", warmup, 0), ("repeats", repeats, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def time_fn(fn, *, warmup: int = 3, repeats: int = 20, device="cpu", setup=None,
            rotation: Rotation | None = None, gpu_time: bool = False) -> dict:
    """Median / p10 / p90 milliseconds of `fn()`, or of `fn(*rotation.next())` with a rotation.

    `setup()` (untimed) runs before each call. `gpu_time` (CUDA): a spin kernel queued before the
    start event holds the stream while the host launches `fn`, so the events time the device work
    alone, not Python's launch overhead (for kernels; end-to-end latencies leave it off).
    """
    _check_counts(warmup, repeats)
    device = torch.device(device)
    on_gpu = device.type == "cuda"
    spin = on_gpu and gpu_time and hasattr(torch.cuda, "_sleep")

    def args():
        return rotation.next() if rotation is not None else ()

    for _ in range(warmup):
        a = args()
        if setup:
            setup()
        fn(*a)
    times = []
    if on_gpu:
        torch.cuda.synchronize(device)
        for _ in range(repeats):
            a = args()
            if setup:
                setup()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            if spin:
                torch.cuda._sleep(SPIN_CYCLES)
            start.record()
            fn(*a)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(repeats):
            a = args()
            if setup:
                setup()
            t0 = time.perf_counter()
            fn(*a)
            times.append((time.perf_counter() - t0) * 1e3)
    out = {**_stats(times), "repeats": repeats, "warmup": warmup}
    out.update(rotation.info() if rotation is not None else {"inputs_rotated": False})
    if on_gpu:
        out["timed"] = "device" if spin else "wall"
    return out


def time_interleaved(fns: dict, *, warmup: int = 2, repeats: int = 7, device="cpu", rotation: Rotation | None = None,
                     before=None, gpu_time: bool = False) -> dict:
    """time_fn's statistics for each of `fns` (name -> call), the calls interleaved: one call of each
    side a round, the order turning every round (A, B, C; B, C, A; ...), so that a machine that speeds
    up or slows down during the run (clocks, other jobs) moves every side alike and no side always
    runs after the same one (reading what it left in the cache). Every call takes the rotation's
    next input set if one is given; `before(name)`, if given, runs untimed before each call. On CUDA
    each call is timed by events around it, the device synchronized after it (wall time); with
    `gpu_time` a spin kernel queued before the start event holds the stream while the host launches
    the call, as in `time_fn`, so the events time the device's work alone (kernel benchmarks)."""
    _check_counts(warmup, repeats)
    device = torch.device(device)
    on_gpu = device.type == "cuda"
    spin = on_gpu and gpu_time and hasattr(torch.cuda, "_sleep")
    names = list(fns)
    times = {name: [] for name in names}
    if on_gpu:
        torch.cuda.synchronize(device)
    for r in range(warmup + repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            a = rotation.next() if rotation is not None else ()
            if before is not None:
                before(name)
            if on_gpu:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                if spin:
                    torch.cuda._sleep(SPIN_CYCLES)
                start.record()
                fns[name](*a)
                end.record()
                end.synchronize()
                ms = start.elapsed_time(end)
            else:
                t0 = time.perf_counter()
                fns[name](*a)
                ms = (time.perf_counter() - t0) * 1e3
            if r >= warmup:
                times[name].append(ms)
    return {name: {**_stats(ts), "repeats": repeats, "warmup": warmup, "interleaved": True,
                   **(rotation.info() if rotation is not None else {"inputs_rotated": False}),
                   **({"timed": "device" if spin else "wall"} if on_gpu else {})}
            for name, ts in times.items()}


BANDWIDTH_METHOD = "median of a 2 GiB device-to-device copy, (read + write bytes) / time"


def measure_bandwidth(device, nbytes: int | None = None, *, gpu_time: bool = False, repeats: int = 10) -> float | None:
    """Device copy bandwidth in GB/s (bytes read + written per second: `BANDWIDTH_METHOD`), measured in the
    calling process; None off CUDA. `gpu_time`: timed as the kernel benchmarks time their sides (`time_fn`'s
    spin kernel: the device's work alone)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    nbytes = nbytes or 2 << 30
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    t = time_fn(functools.partial(dst.copy_, src), device=device, warmup=3, repeats=repeats, gpu_time=gpu_time)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * nbytes / (t["median_ms"] * 1e-3) / 1e9


def bound_errors(out, ref64, same, floor=0.0) -> tuple[bool, float, float]:
    """The package's error rule: `out` is finite and max |out - ref64| <= 2 x that of `same` (the same
    computation at the inputs' precision; or that error already measured, a float) + `floor`. Computed on
    ref64's device. Returns (ok, out's error, same's error)."""
    err = (out.detach().to(ref64.device, torch.float64) - ref64).abs().max().item()
    base = same if isinstance(same, (int, float)) else \
        (same.detach().to(ref64.device, torch.float64) - ref64).abs().max().item()
    ok = bool(torch.isfinite(out).all().item()) and err <= 2 * base + floor
    return ok, err, base


def bound_check(out, ref64, same, floor=0.0) -> tuple[bool, str]:
    """out within 2x the error of the same-precision reference `same` (both against `ref64`), and finite
    (`bound_errors`); with a line saying by how much."""
    ok, err, base = bound_errors(out, ref64, same, floor)
    return ok, f"err {err:.3g} <= 2 x {base:.3g} + {floor:g}"


def _spread(p10: float, p90: float) -> float | None:
    """p90 / p10 of a row's times: 1 on a quiet machine; above `NOISY_SPREAD`, a noisy measurement."""
    return p90 / p10 if p10 > 0 else None


# Repeats from which a row's p10 and p90 are percentiles of their own: read by rank, the 90th percentile of 10
# times or fewer is the slowest of them, and the 10th of fewer than 10 the fastest.
PERCENTILE_MIN_REPEATS = 11


def _stats(times: list[float]) -> dict:
    """The median of `times` (ms) and their spread, named as what it is: from PERCENTILE_MIN_REPEATS times on the
    10th and 90th percentiles (by rank: the sorted times' int(0.1 n)-th and int(0.9 n)-th) and p90_over_p10;
    below, where those would be the fastest and slowest under other names, min_ms, max_ms and max_over_min."""
    ts = sorted(times)
    if len(ts) < PERCENTILE_MIN_REPEATS:
        return {"median_ms": statistics.median(ts), "min_ms": ts[0], "max_ms": ts[-1],
                "max_over_min": _spread(ts[0], ts[-1])}
    q = lambda f: ts[min(len(ts) - 1, int(f * len(ts)))]
    return {"median_ms": statistics.median(ts), "p10_ms": q(0.1), "p90_ms": q(0.9),
            "p90_over_p10": _spread(q(0.1), q(0.9))}


def row_spread(row: dict) -> float | None:
    """A row's spread: p90_over_p10, or max_over_min where its repeats were too few for percentiles."""
    return row.get("p90_over_p10") or row.get("max_over_min")


def noisy_rows(rows: list[dict]) -> list[dict]:
    """The rows whose times spread more than `NOISY_SPREAD` (`row_spread`: p90 / p10, or max / min)."""
    return [r for r in rows if (row_spread(r) or 0) > NOISY_SPREAD]


def load_average() -> list[float] | None:
    """The machine's 1-, 5- and 15-minute load averages (os.getloadavg); None where unavailable. Each
    benchmark records them at its start (`load_average_start`, in its `extra`) and write_results at each
    write (`load_average_end`): a load above the cores the run uses means other jobs shared them."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def _proc_status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"no {field} in /proc/self/status")


PEAK_MEMORY_METHOD = {
    "cuda": "torch.cuda.max_memory_allocated over the call minus memory_allocated before it "
            "(reset_peak_memory_stats first)",
    "cpu": "growth of the process's peak resident set (VmHWM, reset through /proc/self/clear_refs) over the "
           "resident set before the call, after gc.collect() and glibc's malloc_trim(0) handed every free page "
           "of every arena back to the kernel: blocks served from memory the process already held fault their "
           "pages in again and count, like fresh mmaps",
}


@functools.lru_cache(maxsize=None)
def _malloc_trim():
    """glibc's malloc_trim, or None (another C library: freed memory it keeps cannot be handed back)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        fn = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
    return fn


def peak_memory_method(device="cpu") -> str | None:
    """How `peak_memory` measures on `device` (for a result's JSON); None where it cannot."""
    device = torch.device(device)
    if device.type == "cpu" and (_malloc_trim() is None or not os.path.exists("/proc/self/clear_refs")):
        return None
    return PEAK_MEMORY_METHOD.get(device.type)


def peak_memory(fn, device="cpu") -> int | None:
    """Peak memory `fn` adds over what was allocated before (`PEAK_MEMORY_METHOD`). On the CPU the
    resident set only grows when a page is first touched, and glibc keeps freed blocks (all of them
    once `tune_cpu_malloc` ran; those up to its dynamic mmap threshold, up to 32 MiB, otherwise) to
    serve later ones without a fault: `malloc_trim(0)` first hands every free page back, so whatever
    `fn` allocates faults in and counts, however the allocator is tuned. None where that cannot be
    done (not Linux with glibc), and on devices other than CUDA and the CPU."""
    device = torch.device(device)
    if device.type == "cpu":
        trim = _malloc_trim()
        if trim is None:
            return None
        try:  # the measurement's own failures (no /proc, clear_refs refused) make the peak unknown
            gc.collect()
            trim(0)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current resident set
            base = _proc_status_bytes("VmRSS")
        except OSError:
            return None
        fn()  # outside the try: an OSError of the measured call is the benchmark's failure, not an unknown peak
        try:
            return max(0, _proc_status_bytes("VmHWM") - base)
        except OSError:
            return None
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def result_stem(name: str, device="cpu", quick: bool = False) -> str:
    """`<name>-<device>`, `<name>-<device>-quick` for --quick runs (which never overwrite full results)."""
    return f"{name}-{device_name(device)}" + ("-quick" if quick else "")


def write_results(name: str, rows: list[dict], device="cpu", out_dir: str | Path = "benchmarks/results",
                  extra: dict | None = None, plot: tuple | None = None, *,
                  quick: bool = False) -> Path:
    """Write `<out_dir>/<name>-<device>.json`, `<name>-<device>-quick.json` for a --quick run (and a PNG
    plot of `plot=(x_key, y_key, group_key)` beside it; group_key may be a tuple of keys)."""
    from worldvla.checkpoint import write_text_atomic

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    env = environment(device)
    stem = result_stem(name, device, quick)
    doc = {"benchmark": name, **env, "quick": quick, **(extra or {}), "load_average_end": load_average(),
           "noisy_rows": len(noisy_rows(rows)),
           "noisy_rows_rule": f"p90_over_p10 (max_over_min in rows of fewer than {PERCENTILE_MIN_REPEATS} repeats) "
                              f"> {NOISY_SPREAD}", "rows": rows}
    path = out_dir / f"{stem}.json"
    # A temporary name of its own, not a fixed one: two runs writing into one folder would otherwise write one
    # file and rename it from under each other.
    write_text_atomic(path, json.dumps(doc, indent=2))
    if plot is not None:
        plot_rows(rows, *plot, title=f"{name} ({env['device']})", path=out_dir / f"{stem}.png")
    return path


def plot_rows(rows, x_key, y_key, group_key, title, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from worldvla.checkpoint import write_atomic

    keys = (group_key,) if isinstance(group_key, str) else tuple(group_key)  # a bar series per distinct value(s)
    groups: dict = {}
    for r in rows:
        if r.get(y_key) is not None:
            groups.setdefault(" ".join(str(r.get(k, "")) for k in keys), []).append((str(r[x_key]), r[y_key]))
    for g, pts in groups.items():
        if len({x for x, _ in pts}) < len(pts):  # two rows would share one bar: a series key is missing
            warnings.warn(f"plot {path}: series {g!r} has several {y_key} values at one {x_key}; only the last is "
                          f"drawn (group by more keys than {keys})")
    fig, ax = plt.subplots(figsize=(7, 4))
    xs = sorted({x for pts in groups.values() for x, _ in pts}, key=lambda s: (len(s), s))
    width = 0.8 / max(1, len(groups))
    colors = series_colors(len(groups))
    for i, (g, pts) in enumerate(sorted(groups.items())):
        d = dict(pts)
        ax.bar([xs.index(x) + i * width for x in d], list(d.values()), width, label=str(g), color=colors[i])
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(xs))], xs, rotation=20, fontsize=8)
    ax.set_ylabel(y_key)
    ax.set_title(title)
    if groups:
        ax.legend(fontsize=8)
    else:  # every row's value missing (its cases skipped or failed): say so, not an empty frame
        ax.text(0.5, 0.5, f"no {y_key} measured", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    try:  # whole or not at all, under a temporary name of its own (as the JSON beside it)
        write_atomic(Path(path), lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    finally:
        plt.close(fig)


def series_colors(n: int) -> list:
    """n distinct colours for a plot's series: matplotlib's default cycle has 10, and the attention plot
    draws more (backends x modes), so series 11 on would repeat series 1's colour. tab10 up to 10, tab20
    up to 20, evenly spaced hues of a continuous map beyond."""
    from matplotlib import colormaps

    if n <= 10:
        return list(colormaps["tab10"].colors[:n])
    if n <= 20:
        return list(colormaps["tab20"].colors[:n])
    return [colormaps["turbo"](i / (n - 1)) for i in range(n)]


def print_table(rows: list[dict], columns: list[str]) -> None:
    """The rows as a table, then a warning naming the rows whose times spread more than NOISY_SPREAD."""
    widths = [max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(w) for c, w in zip(columns, widths)))
    noisy = noisy_rows(rows)
    if noisy:  # named by the columns before the time (case, impl, mode, shapes, ...)
        ids = columns[:columns.index("median_ms")] if "median_ms" in columns else columns
        names = [" ".join(_fmt(r.get(c)) for c in ids)
                 + f" ({row_spread(r):.2f}x{'' if r.get('p90_over_p10') else ' max/min'})" for r in noisy]
        print(f"warning: {len(noisy)} of {len(rows)} rows spread p90/p10 > {NOISY_SPREAD} (max/min where a row has "
              f"too few repeats for percentiles; a busy machine? load average {load_average()}, "
              f"{torch.get_num_threads()} threads): " + "; ".join(names))


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def module_name(fn) -> str:
    """The module that defines `fn`, as `python -m` takes it: benchmarks.<name> in a source checkout,
    worldvla.benchmarks.<name> in an installed package (run as __main__ too, by its module's spec)."""
    spec = getattr(sys.modules.get(fn.__module__), "__spec__", None)
    return spec.name if spec is not None else f"benchmarks.{Path(fn.__code__.co_filename).stem}"


def main_for(run, description: str, argv=None, flags: dict[str, str] | None = None):
    """The `python -m benchmarks.<name>` entry point every benchmark shares. `flags`: a benchmark's own
    on/off options, "--name": help, passed to `run` as name=True/False."""
    import argparse

    p = argparse.ArgumentParser(prog=f"python -m {module_name(run)}",
                                description=description)
    p.add_argument("--quick", action="store_true",
                   help="small shapes and few repeats; writes <name>-<device>-quick.json")
    p.add_argument("--device", help="cuda, cuda:N or cpu (default: cuda when available)")
    p.add_argument("--out", default="benchmarks/results",
                   help="folder for the JSON results and plots (default: %(default)s)")
    for flag, help_text in (flags or {}).items():
        p.add_argument(flag, action="store_true", help=help_text)
    a = p.parse_args(argv)
    if not a.out.strip():  # `--out "$DIR"` with DIR unset: the results would land in the current folder
        p.error("--out is empty: name a folder for the results (it is created if missing)")
    extra = {f.lstrip("-").replace("-", "_"): getattr(a, f.lstrip("-").replace("-", "_")) for f in flags or {}}
    return run(a.quick, a.device, a.out, **extra)
