"""Timing and reporting shared by every benchmark.

Rules: warm-up first; on CUDA, CUDA-event medians over many repeats (inputs larger than L2 are
rotated between repeats by the callers); on CPU, perf_counter medians; both sides of every ratio are
timed in the same process; FLOP counts exclude masked-out work.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch


def device_name(device: str | torch.device = "cpu") -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device).replace(" ", "-")
    return f"cpu-{os.cpu_count()}core"


def environment(device="cpu") -> dict:
    env = {"device": device_name(device), "torch": torch.__version__, "python": platform.python_version(),
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "cuda": torch.version.cuda, "cpu_threads": torch.get_num_threads()}
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


def time_fn(fn, *, warmup: int = 3, repeats: int = 20, device="cpu", setup=None) -> dict:
    """Median / p10 / p90 milliseconds of `fn()`; `setup()` (untimed) runs before each call."""
    device = torch.device(device)
    for _ in range(warmup):
        if setup:
            setup()
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(repeats):
            if setup:
                setup()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(repeats):
            if setup:
                setup()
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    q = lambda f: times[min(len(times) - 1, int(f * len(times)))]
    return {"median_ms": statistics.median(times), "p10_ms": q(0.1), "p90_ms": q(0.9), "repeats": repeats}


def peak_memory(fn, device="cpu") -> int | None:
    device = torch.device(device)
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


def main_for(run, description: str, argv=None):
    """The `python -m benchmarks.<name>` entry point every benchmark shares."""
    import argparse

    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="small shapes and few repeats")
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    p.add_argument("--out", default="benchmarks/results", help="folder for the JSON results and plots")
    a = p.parse_args(argv)
    return run(a.quick, a.device, a.out)
