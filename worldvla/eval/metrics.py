"""Image-quality metrics for the world model: PSNR and SSIM in plain PyTorch.

SSIM follows Wang et al. (2004): Gaussian window of 11 taps with sigma 1.5, constants
C1 = (0.01 L)^2 and C2 = (0.03 L)^2 for data range L, local statistics over the
'valid' part of the image (no padding), averaged over pixels and channels.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from ..checks import is_count, is_integer

K1, K2 = 0.01, 0.03
WINDOW, SIGMA = 11, 1.5


def as_float_images(images, data_range: float | None = None) -> tuple[torch.Tensor, float]:
    """uint8 numpy/tensor [..., H, W, 3] -> float64 [N, 3, H, W] with range 255, or a float
    tensor [..., C, H, W] (kept channels-first) with the given data range (default 1.0)."""
    if isinstance(images, np.ndarray):
        images = np.ascontiguousarray(images)
        if not images.flags.writeable:  # a broadcast or read-only view: torch.from_numpy warns of it
            images = images.copy()
        images = torch.from_numpy(images)
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be numpy arrays or torch tensors, got {type(images).__name__}")
    if images.dtype == torch.uint8:
        if images.dim() < 3 or images.shape[-1] not in (1, 3):
            raise ValueError(f"uint8 images must be channels-last [..., H, W, 3], got shape {tuple(images.shape)}")
        x = images.to(torch.float64).movedim(-1, -3)
        rng = 255.0 if data_range is None else float(data_range)
    elif images.is_floating_point():
        if images.dim() < 3 or images.shape[-3] not in (1, 3):  # [H, W, 3] would read as H channels
            raise ValueError(f"float images must be channels-first [..., C, H, W] with C = 1 or 3, got shape "
                             f"{tuple(images.shape)}")
        x = images.to(torch.float64)
        rng = 1.0 if data_range is None else float(data_range)
    else:
        raise TypeError(f"images must be uint8 (channels-last) or floating point (channels-first), got {images.dtype}")
    if x.shape[-2] * x.shape[-1] == 0:  # no pixel to score (reshape(-1, ...) could not even tell the batch)
        raise ValueError(f"images of {tuple(x.shape[-2:])} pixels have no pixel to score")
    return x.reshape(-1, *x.shape[-3:]), rng


def _is_uint8(images) -> bool:
    return images.dtype == (np.uint8 if isinstance(images, np.ndarray) else torch.uint8)


def _pair(a, b, data_range):
    # uint8 is channels-last with L = 255, float channels-first with L = 1: a mixed pair would be compared
    # across layouts and ranges and give a meaningless score.
    if isinstance(a, (np.ndarray, torch.Tensor)) and isinstance(b, (np.ndarray, torch.Tensor)) \
            and _is_uint8(a) != _is_uint8(b):
        raise TypeError(f"the two image batches differ in kind: {a.dtype} {tuple(a.shape)} vs {b.dtype} "
                        f"{tuple(b.shape)}; pass both as uint8 channels-last [..., H, W, 3] or both as float "
                        f"channels-first [..., C, H, W]")
    x, rng = as_float_images(a, data_range)
    y, _ = as_float_images(b, data_range)
    if x.shape != y.shape:
        raise ValueError(f"the two image batches differ in shape: {tuple(x.shape)} vs {tuple(y.shape)}")
    if not 0 < rng < math.inf:  # NaN or inf would make every score NaN or inf
        raise ValueError(f"data_range must be positive and finite (255 for uint8 images, 1.0 for floats in "
                         f"[0, 1]), got {rng}")
    return x, y, rng


def mse(a, b, data_range: float | None = None) -> torch.Tensor:
    """Mean squared error per image -> [N] float64."""
    x, y, _ = _pair(a, b, data_range)
    return ((x - y) ** 2).flatten(1).mean(1)


def psnr(a, b, data_range: float | None = None) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per image -> [N] (inf where the images are identical).

    uint8 channels-last images use L = 255; float channels-first images L = 1 unless given."""
    x, y, rng = _pair(a, b, data_range)
    err = ((x - y) ** 2).flatten(1).mean(1)
    return 10.0 * torch.log10(rng * rng / err)  # err == 0 -> +inf, as it should be


def gaussian_window(size: int = WINDOW, sigma: float = SIGMA, dtype=torch.float64) -> torch.Tensor:
    """Normalized 1-D Gaussian taps [size]."""
    r = torch.arange(size, dtype=dtype) - (size - 1) / 2.0
    g = torch.exp(-(r ** 2) / (2.0 * sigma * sigma))
    return g / g.sum()


def _filter(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Separable 'valid' Gaussian filtering of every channel of x [N, C, H, W]."""
    c = x.shape[1]
    k = g.numel()
    x = F.conv2d(x, g.view(1, 1, k, 1).expand(c, 1, k, 1), groups=c)
    return F.conv2d(x, g.view(1, 1, 1, k).expand(c, 1, 1, k), groups=c)


def ssim(a, b, data_range: float | None = None, window: int = WINDOW, sigma: float = SIGMA,
         return_map: bool = False) -> torch.Tensor:
    """Structural similarity per image -> [N] float64 (or the SSIM map [N, C, h, w]).

    Images smaller than the window use a window as wide as their smaller side (odd)."""
    # A window of no tap would be taken for images too small for it; sigma 0 makes every tap NaN.
    if not is_count(window, 1):
        raise ValueError(f"window must be an integer >= 1 (Gaussian taps; {WINDOW} in Wang et al.), got {window!r}")
    if not 0 < sigma < math.inf:
        raise ValueError(f"sigma must be a positive finite number ({SIGMA} in Wang et al.), got {sigma}")
    x, y, rng = _pair(a, b, data_range)
    side = min(x.shape[-2:])
    size = min(window, side if side % 2 else side - 1)
    if size < 1:
        raise ValueError(f"images of {tuple(x.shape[-2:])} pixels are too small for SSIM")
    g = gaussian_window(size, sigma)
    c1, c2 = (K1 * rng) ** 2, (K2 * rng) ** 2
    mu_x, mu_y = _filter(x, g), _filter(y, g)
    sxx = _filter(x * x, g) - mu_x * mu_x
    syy = _filter(y * y, g) - mu_y * mu_y
    sxy = _filter(x * y, g) - mu_x * mu_y
    smap = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (sxx + syy + c2))
    return smap if return_map else smap.flatten(1).mean(1)


def summarize(values) -> dict:
    """mean / std / count of finite values (PSNR of identical frames is inf and is counted apart)."""
    v = np.asarray([float(t) for t in values], dtype=np.float64)
    finite, infs = v[np.isfinite(v)], v[np.isinf(v)]
    out = {"n": int(v.size), "n_inf": int(infs.size)}
    if finite.size:
        out["mean"] = float(finite.mean())
    elif infs.size and (infs == infs[0]).all():  # identical frames only (PSNR +inf): so is their mean
        out["mean"] = float(infs[0])
    else:  # no values, NaNs only (NaN pixels), or infinities of both signs: no mean
        out["mean"] = math.nan
    out["std"] = float(finite.std()) if finite.size else 0.0
    return out


def success_interval(successes: int, episodes: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval (95% by default) of a success rate from `successes` of `episodes`: at the
    10-50 episodes of a closed-loop evaluation a rate is known to tens of points, and the interval says how
    many (unlike the normal approximation, it stays in [0, 1] and is not empty at 0 or all successes)."""
    # Counts, not rates: success_interval(0.4, 10) would be read as 0.4 successes of 10.
    for name, n in (("successes", successes), ("episodes", episodes)):
        if not is_integer(n):
            raise ValueError(f"{name} must be an integer count, got {n!r}" + (
                " (a rate? pass the number of successful episodes)" if name == "successes" else ""))
    if not 0 < z < math.inf:
        raise ValueError(f"z must be a positive finite number (1.96 for a 95% interval), got {z}")
    if episodes < 1:
        raise ValueError(f"episodes must be >= 1, got {episodes}")
    if not 0 <= successes <= episodes:
        raise ValueError(f"successes must be in [0, {episodes}], got {successes}")
    p, z2 = successes / episodes, z * z
    centre = (p + z2 / (2 * episodes)) / (1 + z2 / episodes)
    half = z * math.sqrt(p * (1 - p) / episodes + z2 / (4 * episodes * episodes)) / (1 + z2 / episodes)
    # At 0 or all successes the exact ends are the rate itself; rounding can leave them a step past it (6 of 6
    # gave an upper end of 0.9999999999999999), an interval that would not hold its own rate.
    return min(max(0.0, centre - half), p), max(min(1.0, centre + half), p)


__all__ = ["psnr", "ssim", "mse", "gaussian_window", "as_float_images", "summarize", "success_interval"]
