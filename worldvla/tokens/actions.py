"""Continuous actions <-> action tokens (spec section 1, OpenVLA-style uniform bins)."""
from __future__ import annotations

import numpy as np
import torch

from .layout import VocabLayout

# The release's fixed LIBERO bounds for [dx, dy, dz, drx, dry, drz, gripper].
LIBERO_MIN = (-0.9375, -0.9375, -0.9375, -0.32571429, -0.375, -0.375, -1.0)
LIBERO_MAX = (0.9375, 0.9375, 0.9375, 0.375, 0.375, 0.375, 1.0)


def float64_array(x) -> np.ndarray:
    """`x` (array-like, or a tensor of any float dtype on any device) as a float64 NumPy array. NumPy reads
    neither bfloat16 nor device tensors itself ("Got unsupported ScalarType BFloat16")."""
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


class ActionTokenizer:
    """Per-dimension min-max normalization with fixed bounds, `np.digitize` into
    `n_bins` edges over [-1, 1], decoding to bin centres.

    encode: actions [..., D] -> ids [..., D + 2] = [BOA, bins..., EOA]
    decode: ids [..., D] (bins only) or [..., D + 2] -> de-normalized actions [..., D]
    """

    def __init__(self, layout: VocabLayout, low=LIBERO_MIN, high=LIBERO_MAX):
        self.layout = layout
        self.low = float64_array(low)  # bounds may come from statistics kept as tensors
        self.high = float64_array(high)
        if self.low.shape != self.high.shape or self.low.ndim != 1:
            raise ValueError(f"bounds must be two 1-D sequences of equal length, got {self.low.shape} and {self.high.shape}")
        if not (np.all(np.isfinite(self.low)) and np.all(np.isfinite(self.high))):
            raise ValueError(f"action bounds must be finite numbers, got low={self.low}, high={self.high}: every action "
                             f"would decode to NaN; give finite per-dimension bounds (the demos' min/max, or [-1, 1])")
        if np.any(self.high <= self.low):
            raise ValueError(f"every upper bound must exceed its lower bound: low={self.low}, high={self.high}")
        self.n_bins = layout.n_bins
        self.edges = np.linspace(-1.0, 1.0, self.n_bins)
        self.centers = (self.edges[:-1] + self.edges[1:]) / 2.0

    @property
    def action_dim(self) -> int:
        return len(self.low)

    def _check(self, actions) -> np.ndarray:
        a = float64_array(actions)
        if a.ndim == 0 or a.shape[-1] != self.action_dim:
            raise ValueError(f"actions must end in the action dimension {self.action_dim}, got shape {a.shape}")
        if not np.all(np.isfinite(a)):
            raise ValueError("actions contain NaN or inf; clean the data before tokenizing")
        return a

    def normalize(self, actions) -> np.ndarray:
        a = self._check(actions)
        return np.clip(2.0 * (a - self.low) / (self.high - self.low + 1e-8) - 1.0, -1.0, 1.0)

    def denormalize(self, values) -> np.ndarray:
        v = float64_array(values)
        return (v + 1.0) / 2.0 * (self.high - self.low + 1e-8) + self.low

    def bins(self, actions) -> np.ndarray:
        """Bin token ids [..., D] (no BOA/EOA)."""
        d = np.digitize(self.normalize(actions), self.edges)  # 1..n_bins (n_bins only at exactly 1.0)
        return (d - 1 + self.layout.bin_base).astype(np.int64)

    def encode(self, actions) -> torch.Tensor:
        b = self.bins(actions)
        boa = np.full(b.shape[:-1] + (1,), self.layout.boa, dtype=np.int64)
        eoa = np.full(b.shape[:-1] + (1,), self.layout.eoa, dtype=np.int64)
        return torch.from_numpy(np.concatenate([boa, b, eoa], axis=-1))

    def decode(self, ids) -> np.ndarray:
        t = np.asarray(ids.detach().cpu() if isinstance(ids, torch.Tensor) else ids)
        if t.size and t.dtype.kind not in "iu":  # a float would be truncated to another id, a bool read as 0 or 1
            raise TypeError(f"action token ids must be integers, got {t.dtype}")
        t = t.astype(np.int64)
        if t.ndim and t.shape[-1] == self.action_dim + 2:
            t = t[..., 1:-1]
        if t.ndim == 0 or t.shape[-1] != self.action_dim:
            raise ValueError(f"expected {self.action_dim} bin tokens (or {self.action_dim + 2} with BOA/EOA), got shape {t.shape}")
        # As the release: any token decodes to a clipped bin centre (n_bins - 1 centres).
        idx = np.clip(t - self.layout.bin_base, 0, self.n_bins - 2)
        return self.denormalize(self.centers[idx])

    def to_dict(self) -> dict:
        return {"low": self.low.tolist(), "high": self.high.tolist()}
