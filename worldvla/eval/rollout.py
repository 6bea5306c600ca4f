"""What every closed-loop harness here shares: asking a policy for an action chunk
from the previous and the current frame (the release's "2h_1a_img_only" prompt), and
timing those queries."""
from __future__ import annotations

import inspect
import time

import numpy as np


def _accepts(fn, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


class ChunkQuery:
    """Calls `policy.act` with explicit history frames and records latency.

    `images`: the current frames, uint8 [H, W, 3] or [N, H, W, 3]; `previous`: the
    frames of the previous env step (same shape), or None on an episode's first query
    (the release then prompts with the current frame only). Returns [K, D] or [N, K, D].
    A policy whose `act` has no `history` argument is given only the current frame.
    """

    def __init__(self, policy):
        self.policy = policy
        self.takes_history = _accepts(policy.act, "history")
        self.latencies: list[float] = []

    def __call__(self, images: np.ndarray, previous: np.ndarray | None) -> np.ndarray:
        t0 = time.perf_counter()
        if self.takes_history:
            out = self.policy.act(images, history=previous)
        else:
            out = self.policy.act(images)
        self.latencies.append(time.perf_counter() - t0)
        from ..inference.policy import check_chunk

        out = np.asarray(check_chunk(out), dtype=np.float64)
        want = 3 if images.ndim == 4 else 2  # [N, K, D] for a batch, [K, D] for one image
        if out.ndim != want:
            raise ValueError(f"policy.act returned shape {out.shape}; expected "
                             f"{'[N, K, D]' if images.ndim == 4 else '[K, D]'} for images of shape {images.shape}")
        return out

    def latency_summary(self) -> dict:
        lat = np.asarray(self.latencies, dtype=np.float64)
        if lat.size == 0:
            return {"queries": 0}
        return {"queries": int(lat.size), "mean_s": float(lat.mean()), "median_s": float(np.median(lat)),
                "p90_s": float(np.percentile(lat, 90)), "max_s": float(lat.max())}
