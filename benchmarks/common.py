"""Timing and reporting shared by every benchmark.

Rules: warm-up first; on CUDA, CUDA-event medians over many repeats; on CPU, perf_counter medians;
both sides of every ratio are timed in the same process, on the same inputs; FLOP counts exclude
masked-out work.

On CUDA a call whose inputs fit in L2 would find them there on every repeat and time the cache, not
memory: kernel benchmarks pass a `Rotation`, several independent input sets that together exceed a
few times L2, and `time_fn` hands the timed function the next set on every call (warm-up included).
Kernel benchmarks also time with `gpu_time`: the CUDA events then measure the device's work, not the
host's launch overhead, which would otherwise dominate microsecond kernels such as decode attention.
"""
from __future__ import annotations

import datetime
import json
import math
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

ROTATION_FACTOR = 3          # input sets together cover this many times L2
ROTATION_BUDGET = 4 << 30    # at most this many bytes of rotated inputs (and a quarter of free memory)
ROTATION_MAX_SETS = 512
SPIN_CYCLES = 2_000_000      # about 1 ms at Hopper clocks: time for the host to queue a call behind it


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


def environment(device="cpu") -> dict:
    env = {"device": device_name(device), "torch": torch.__version__, "python": platform.python_version(),
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "cuda": torch.version.cuda, "cpu_threads": torch.get_num_threads(),
           "l2_cache_bytes": l2_cache_bytes(device)}
    if torch.device(device).type == "cpu":
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
                   max_sets: int = ROTATION_MAX_SETS) -> int:
    """How many input sets of `bytes_per_set` (what one call reads) together cover `factor` x L2.

    1 off CUDA. Capped by `budget_bytes // new_bytes`, `new_bytes` being what each extra set
    allocates (default `bytes_per_set`); the default budget is the smaller of `ROTATION_BUDGET`
    and a quarter of the free device memory.
    """
    device = torch.device(device)
    l2 = l2_cache_bytes(device)
    if l2 is None:
        return 1
    want = math.ceil(factor * l2 / max(1, bytes_per_set))
    if budget_bytes is None:
        budget_bytes = min(ROTATION_BUDGET, torch.cuda.mem_get_info(device)[0] // 4)
    fit = budget_bytes // max(1, new_bytes if new_bytes is not None else bytes_per_set)
    return int(max(1, min(want, fit, max_sets)))


class Rotation:
    """Independent input sets, built up front, handed out in turn (one per timed call).

    `make_inputs(i)` returns the inputs of set i as a tuple; the timed function is called as
    `fn(*inputs)`. The number of sets comes from `rotation_count` unless `n` is given; the
    sets are sized by what one call reads (`bytes_per_set`, default: every tensor of a set).
    Share one Rotation between the implementations compared, so both sides see the same sets.
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
        self.l2_bytes = l2_cache_bytes(self.device)
        self._next = 0

    def __len__(self) -> int:
        return len(self.sets)

    def next(self) -> tuple:
        """The next set, cycling."""
        inputs = self.sets[self._next]
        self._next = (self._next + 1) % len(self.sets)
        return inputs

    def info(self) -> dict:
        """What a result row records about the rotation."""
        return {"rotated_sets": len(self.sets), "set_bytes": self.bytes_per_set, "l2_bytes": self.l2_bytes}


def time_fn(fn, *, warmup: int = 3, repeats: int = 20, device="cpu", setup=None,
            rotation: Rotation | None = None, gpu_time: bool = False) -> dict:
    """Median / p10 / p90 milliseconds of `fn()`, or of `fn(*rotation.next())` with a rotation.

    `setup()` (untimed) runs before each call. `gpu_time` (CUDA): a spin kernel queued before the
    start event holds the stream while the host launches `fn`, so the events time the device work
    alone, not Python's launch overhead (for kernels; end-to-end latencies leave it off).
    """
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
    times.sort()
    q = lambda f: times[min(len(times) - 1, int(f * len(times)))]
    out = {"median_ms": statistics.median(times), "p10_ms": q(0.1), "p90_ms": q(0.9), "repeats": repeats}
    if rotation is not None:
        out.update(rotation.info())
    if on_gpu:
        out["timed"] = "device" if spin else "wall"
    return out


def _proc_status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"no {field} in /proc/self/status")


def peak_memory(fn, device="cpu") -> int | None:
    """Peak memory `fn` adds: CUDA's allocator peak over what was allocated before; on CPU (Linux)
    the growth of the process's peak resident set (VmHWM, reset through /proc/self/clear_refs) over
    the resident set before. The CPU figure sees large tensors (mmap'd by the allocator) fully, and
    may miss small ones served from memory the process already holds. None where neither applies,
    and on the CPU once `tune_cpu_malloc` ran in this process: freed memory then stays with it and is
    reused, so the resident set no longer shows what a call allocates."""
    device = torch.device(device)
    if device.type == "cpu":
        from worldvla.inference.malloc import cpu_malloc_settings

        if cpu_malloc_settings() is not None:
            return None
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current resident set
            base = _proc_status_bytes("VmRSS")
            fn()
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


def write_results(name: str, rows: list[dict], device="cpu", out_dir: str | Path = "benchmarks/results",
                  extra: dict | None = None, plot: tuple[str, str, str] | None = None) -> Path:
    """Write `<out_dir>/<name>-<device>.json` (and a PNG plot of `plot=(x_key, y_key, group_key)`)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    env = environment(device)
    stem = f"{name}-{env['device']}"
    doc = {"benchmark": name, **env, **(extra or {}), "rows": rows}
    path = out_dir / f"{stem}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=2))
    os.replace(tmp, path)
    if plot is not None:
        plot_rows(rows, *plot, title=f"{name} ({env['device']})", path=out_dir / f"{stem}.png")
    return path


def plot_rows(rows, x_key, y_key, group_key, title, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict = {}
    for r in rows:
        if r.get(y_key) is not None:
            groups.setdefault(r[group_key], []).append((str(r[x_key]), r[y_key]))
    fig, ax = plt.subplots(figsize=(7, 4))
    xs = sorted({x for pts in groups.values() for x, _ in pts}, key=lambda s: (len(s), s))
    width = 0.8 / max(1, len(groups))
    for i, (g, pts) in enumerate(sorted(groups.items())):
        d = dict(pts)
        ax.bar([xs.index(x) + i * width for x in d], list(d.values()), width, label=str(g))
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(xs))], xs, rotation=20, fontsize=8)
    ax.set_ylabel(y_key)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = [max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(w) for c, w in zip(columns, widths)))


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def main_for(run, description: str, argv=None, flags: dict[str, str] | None = None):
    """The `python -m benchmarks.<name>` entry point every benchmark shares. `flags`: a benchmark's own
    on/off options, "--name": help, passed to `run` as name=True/False."""
    import argparse

    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="small shapes and few repeats")
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    p.add_argument("--out", default="benchmarks/results", help="folder for the JSON results and plots")
    for flag, help_text in (flags or {}).items():
        p.add_argument(flag, action="store_true", help=help_text)
    a = p.parse_args(argv)
    extra = {f.lstrip("-").replace("-", "_"): getattr(a, f.lstrip("-").replace("-", "_")) for f in flags or {}}
    return run(a.quick, a.device, a.out, **extra)
