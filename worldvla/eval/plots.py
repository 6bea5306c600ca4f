"""Figures and image artifacts of an evaluation: success-rate bars, PSNR/SSIM over
the imagined horizon, real-vs-imagined frame grids and GIFs; and a training run's curves."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from ..checkpoint import write_atomic


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


# Every figure and image is written to a temporary file beside `path` that then replaces it: a failed
# write (a full disk, a kill) leaves the previous file whole, as metrics.json is. The temporary name
# ends in .tmp, so the format is given explicitly, from `path`'s suffix.
def _save_figure(fig, path, **kw) -> Path:
    import matplotlib

    path = Path(path)
    fmt = path.suffix[1:].lower() or matplotlib.rcParams["savefig.format"]
    write_atomic(path, lambda tmp: fig.savefig(tmp, format=fmt, **kw))
    return path


def _save_image(img, path, default_format: str, **kw) -> Path:
    from PIL import Image

    path = Path(path)
    fmt = Image.registered_extensions().get(path.suffix.lower(), default_format)
    write_atomic(path, lambda tmp: img.save(tmp, format=fmt, **kw))
    return path


def _uint8_frames(frames, what: str) -> np.ndarray:
    """Frames as uint8, refusing what a cast would silently get wrong: floats in [0, 1] become black (0), bools
    0 and 1, and integers past 255 wrap around."""
    a = np.asarray(frames)
    if a.dtype == np.uint8:
        return a
    if a.dtype.kind in "iu" and (a.size == 0 or (a.min() >= 0 and a.max() <= 255)):
        return a.astype(np.uint8)
    if a.dtype.kind in "iu":
        raise ValueError(f"{what} must hold pixel values in [0, 255], got {a.dtype} values in [{a.min()}, {a.max()}]")
    hint = "; convert floats in [0, 1] with (x * 255).round().astype(np.uint8)" if a.dtype.kind == "f" else ""
    raise ValueError(f"{what} must be uint8 pixels in [0, 255], got {a.dtype}{hint}")


def success_bars(rates: dict[str, dict[str, float]], path, title: str = "Meta-World closed-loop success",
                 intervals: dict[str, dict[str, tuple[float, float]]] | None = None) -> Path:
    """rates: variant -> {task: success rate in [0, 1]}; one group of bars per task
    (plus the mean over tasks). intervals: variant -> {task or "mean": (low, high)}, drawn as error bars
    (e.g. `worldvla.eval.metrics.success_interval`)."""
    for v, r in rates.items():  # a percentage would draw its bar far above the axis's 0-110
        bad = {t: x for t, x in r.items() if not (0 <= x <= 1 or np.isnan(x))}
        if bad:
            raise ValueError(f"success rates must be fractions in [0, 1], got {bad} for {v!r} (percentages? divide "
                             f"them by 100)")
    plt = _pyplot()
    variants = list(rates)
    tasks = sorted({t for r in rates.values() for t in r})
    groups = tasks + (["mean"] if len(tasks) > 1 else [])
    width = 0.8 / max(len(variants), 1)
    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(groups) * max(1, len(variants)) ** 0.5 + 2), 3.4))
    x = np.arange(len(groups))
    for i, v in enumerate(variants):
        vals = [rates[v].get(t, np.nan) for t in tasks]
        if len(tasks) > 1:
            vals.append(float(np.nanmean(vals)))
        xs = x + (i - (len(variants) - 1) / 2) * width
        bars = ax.bar(xs, np.asarray(vals) * 100, width, label=v)
        tops = np.asarray(vals) * 100
        ci = (intervals or {}).get(v)
        if ci:
            lohi = np.asarray([ci.get(g) or (np.nan, np.nan) for g in groups], dtype=np.float64) * 100
            yerr = np.stack([tops - lohi[:, 0], lohi[:, 1] - tops]).clip(min=0)
            ax.errorbar(xs, tops, yerr=yerr, fmt="none", ecolor="0.25", elinewidth=0.8, capsize=2)
            tops = np.fmax(tops, lohi[:, 1])
        for b, val, top in zip(bars, vals, tops):
            if np.isfinite(val):
                ax.text(b.get_x() + b.get_width() / 2, top + 1, f"{val * 100:.0f}", ha="center",
                        va="bottom", fontsize=7)
    ax.set_xticks(x, [g.replace("-v3", "") for g in groups], rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("success rate (%)" + ("\nbars: 95% Wilson interval" if intervals else ""), fontsize=9)
    ax.set_ylim(0, 110)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    try:
        return _save_figure(fig, path, dpi=120)
    finally:
        plt.close(fig)


def horizon_curves(curves: dict[str, dict[str, list[float]]], path, title: str = "imagined rollouts vs simulator") -> Path:
    """curves: label -> {"psnr": [per step], "ssim": [per step]}; two panels over the horizon. A curve's
    optional "psnr_ref" / "ssim_ref" (a baseline of the same rollouts, e.g. the first frame kept) are drawn
    dashed in its colour."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
    has_ref = False
    for label, c in curves.items():
        for ax, key in zip(axes, ("psnr", "ssim")):
            vals = np.asarray(c.get(key, []), dtype=np.float64)
            if vals.size:
                (line,) = ax.plot(np.arange(1, vals.size + 1), vals, marker="o", ms=3, label=label)
                ref = np.asarray(c.get(f"{key}_ref", []), dtype=np.float64)
                if ref.size:
                    ax.plot(np.arange(1, ref.size + 1), ref, ls="--", lw=1, color=line.get_color())
                    has_ref = True
    if has_ref:
        axes[0].plot([], [], ls="--", lw=1, color="0.4", label="dashed: first frame kept")
    axes[0].set_ylabel("PSNR (dB)")
    axes[1].set_ylabel("SSIM")
    from matplotlib.ticker import MaxNLocator

    for ax in axes:
        ax.set_xlabel("imagined step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    try:
        return _save_figure(fig, path, dpi=120)
    finally:
        plt.close(fig)


def frame_grid(rows: list[np.ndarray], path, labels: list[str] | None = None, pad: int = 2) -> Path:
    """Save rows of frames (each uint8 [T, H, W, 3], frames of one size) as one PNG, rows on top of each
    other. Rows may differ in length (a task whose expert finished early imagines fewer steps): a
    shorter row ends in blank cells."""
    from PIL import Image, ImageDraw

    rows = [np.asarray(r) for r in rows]
    if not rows or any(r.ndim != 4 or r.shape[1:] != rows[0].shape[1:] for r in rows):
        raise ValueError(f"frame_grid wants rows of frames of one size [T, H, W, 3], got {[r.shape for r in rows]}")
    rows = [_uint8_frames(r, f"frame_grid's row {i}") for i, r in enumerate(rows)]
    if labels is not None and len(labels) > len(rows):  # the extra labels would go below the image, unseen
        raise ValueError(f"frame_grid got {len(labels)} labels for {len(rows)} rows; give one label per row (or "
                         f"fewer)")
    T = max(len(r) for r in rows)
    H, W = rows[0].shape[1:3]
    label_w = 0 if not labels else 8 + 6 * max(len(s) for s in labels)
    canvas = np.full((len(rows) * (H + pad) + pad, label_w + T * (W + pad) + pad, 3), 255, dtype=np.uint8)
    for i, r in enumerate(rows):
        for t in range(len(r)):
            y, x = pad + i * (H + pad), label_w + pad + t * (W + pad)
            canvas[y:y + H, x:x + W] = r[t]
    img = Image.fromarray(canvas)
    if labels:
        draw = ImageDraw.Draw(img)
        for i, s in enumerate(labels):
            draw.text((2, pad + i * (H + pad) + H // 2 - 5), s, fill=(0, 0, 0))
    return _save_image(img, path, "PNG")


def save_gif(frames, path, fps: float = 20) -> Path:
    """frames: uint8 [T, H, W, 3] (or a list of such frames), played at `fps` (at most 100) in a loop."""
    from PIL import Image

    frames = [Image.fromarray(_uint8_frames(f, f"save_gif's frame {t}")) for t, f in enumerate(frames)]
    if not frames:
        raise ValueError("save_gif needs at least one frame")
    # GIF stores each frame's delay in hundredths of a second; Pillow takes milliseconds. Over 100 fps (or inf)
    # the delay is stored as 0, which viewers replace by a speed of their own.
    if not 0 < fps <= 100:
        raise ValueError(f"fps must be > 0 and at most 100 (a GIF's delays are in hundredths of a second), got {fps}")
    return _save_image(frames[0], path, "GIF", save_all=True, append_images=frames[1:], duration=round(1000 / fps),
                       loop=0)


def side_by_side(a: np.ndarray, b: np.ndarray, pad: int = 2) -> np.ndarray:
    """Two frame sequences [T, H, W, 3] next to each other (white gap) -> [T, H, 2W + pad, 3]."""
    a, b = np.asarray(a), np.asarray(b)
    if a.ndim != 4 or b.ndim != 4 or a.shape[1] != b.shape[1] or a.shape[3] != b.shape[3] or a.dtype != b.dtype:
        raise ValueError(f"side_by_side wants two frame sequences [T, H, W, C] of one height, channels and dtype, got "
                         f"{a.dtype} {a.shape} and {b.dtype} {b.shape}")
    T = min(len(a), len(b))
    gap = np.full((T, a.shape[1], pad, a.shape[3]), 255, dtype=a.dtype)
    return np.concatenate([a[:T], gap, b[:T]], axis=2)


def read_log(path) -> list[dict]:
    """The records of a training run's metrics.jsonl, in order (none where there is no log yet); a line a crash
    cut short is left out."""
    recs, path = [], Path(path)
    # errors="replace": bytes a crash or a damaged disk left in a line spoil that line only
    for ln in (path.read_text(errors="replace").splitlines() if path.is_file() else []):
        try:
            rec = json.loads(ln)
        except json.JSONDecodeError:
            continue
        step = rec.get("step") if isinstance(rec, dict) else None
        # not true (a bool is an int) nor NaN or Infinity, which json reads: no step to draw a record at
        if isinstance(step, (int, float)) and not isinstance(step, bool) and math.isfinite(step):
            recs.append(rec)
    return recs


def _smoothed(y: np.ndarray) -> np.ndarray:
    """A centred moving average over about a twentieth of the points (fewer at the ends; NaNs left out): the
    trend of a noisy per-step curve, without the lag of a running average."""
    n, half = len(y), max(1, len(y) // 40)
    ok = np.isfinite(y)
    sums = np.concatenate([[0.0], np.cumsum(np.where(ok, y, 0.0))])
    counts = np.concatenate([[0], np.cumsum(ok)])
    i = np.arange(n)
    lo, hi = np.clip(i - half, 0, n), np.clip(i + half + 1, 0, n)
    k = counts[hi] - counts[lo]
    return np.where(k > 0, (sums[hi] - sums[lo]) / np.maximum(k, 1), np.nan)


def training_curves(log_path, path, panels: list[tuple[str, str, bool, bool]], title: str) -> Path | None:
    """One panel per (key, label, log scale, smooth) of `panels` over the steps of the run's metrics.jsonl: the
    logged values, thin under their moving average where `smooth` and there are enough points. Keys no record
    holds are left out; None (and nothing written) when the log has no records yet."""
    recs = read_log(log_path)
    panels = [p for p in panels if any(isinstance(r.get(p[0]), (int, float)) for r in recs)]
    if not recs or not panels:
        return None
    plt = _pyplot()
    cols = min(len(panels), 2)
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 2.6 * rows), squeeze=False)
    steps = np.asarray([r["step"] for r in recs], dtype=np.float64)
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    plain = FuncFormatter(lambda v, _: f"{v:g}")  # 0.5, not 5 x 10^-1, on log axes
    # minor ticks of a log axis labelled at 2 and 5 only (every one crowds them)
    minor = FuncFormatter(lambda v, _: f"{v:g}" if v > 0 and f"{v:.0e}"[0] in "25" else "")
    for ax, (key, label, log_y, smooth) in zip(axes.flat, panels):
        y = np.asarray([r.get(key) if isinstance(r.get(key), (int, float)) else np.nan for r in recs], dtype=np.float64)
        if log_y:
            y = np.where(y > 0, y, np.nan)  # a zero (or a sign) has no place on a log axis
        smooth = smooth and len(y) >= 20
        ax.plot(steps, y, lw=0.8, alpha=0.45 if smooth else 1.0, marker=None if len(y) > 1 else "o")
        if smooth:
            ax.plot(steps, _smoothed(y), lw=1.6, color="C0")
        fin = y[np.isfinite(y)]
        if log_y and fin.size and fin.max() > 10 * fin.min():  # a log axis only over more than a decade
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(plain)
            ax.yaxis.set_minor_formatter(minor)
        ax.set_ylabel(label, fontsize=9)
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax in axes.flat:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in axes[-1]:
        ax.set_xlabel("step", fontsize=9)
    fig.suptitle(f"{title} (step {int(steps[-1])})", fontsize=10)
    fig.tight_layout()
    try:
        return _save_figure(fig, path, dpi=110)
    finally:
        plt.close(fig)


__all__ = ["success_bars", "horizon_curves", "frame_grid", "save_gif", "side_by_side", "read_log", "training_curves"]
