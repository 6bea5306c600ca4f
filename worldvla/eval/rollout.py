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
    (the release then prompts with the current frame only). Returns [K, D] or [N, K, D];
    `chunks` returns a batch's chunks one by one, of any length. A policy whose `act` has no
    `history` argument is given only the current frame.
    """

    def __init__(self, policy):
        self.policy = policy
        self.takes_history = _accepts(policy.act, "history")
        self.latencies: list[float] = []

    def _act(self, images: np.ndarray, previous: np.ndarray | None):
        t0 = time.perf_counter()
        if self.takes_history:
            out = self.policy.act(images, history=previous)
        else:
            out = self.policy.act(images)
        self.latencies.append(time.perf_counter() - t0)
        return out

    @staticmethod
    def _check_rows(n_chunks: int, images: np.ndarray) -> None:
        if n_chunks != len(images):
            raise ValueError(f"policy.act returned {n_chunks} chunk(s) for {len(images)} images; it must return one "
                             f"chunk per image, [N, K, D] for images [N, H, W, 3]")

    @staticmethod
    def _check_finite(chunks, batch: bool) -> None:
        """Refuse a chunk holding NaN or inf (a None in a list of numbers reads as NaN): the simulators would
        take it, or fail a step later naming the env, not the policy."""
        for n, chunk in enumerate(chunks if batch else [chunks]):
            bad = np.argwhere(~np.isfinite(chunk))
            if len(bad):
                k = int(bad[0][0])
                where = f"image {n}, action {k}" if batch else f"action {k}"
                raise ValueError(f"policy.act returned a non-finite action ({where}: {chunk[k].tolist()}); it must "
                                 f"return finite numbers (a None entry reads as NaN)")

    def __call__(self, images: np.ndarray, previous: np.ndarray | None) -> np.ndarray:
        out = self._act(images, previous)
        from ..inference.policy import check_chunk

        if isinstance(out, (list, tuple)):  # nested lists [K][D]; a list of chunks of different lengths stays one
            try:
                out = np.asarray(out, dtype=np.float64)
            except (ValueError, TypeError):
                if not all(np.ndim(c) == 2 for c in out):
                    raise ValueError(f"policy.act returned a {type(out).__name__} that is not a rectangular array "
                                     f"of numbers; return an array [K, D] for one image, [N, K, D] for a batch "
                                     f"[N, H, W, 3]") from None
                out = list(out)  # mode='release': each image's chunk, of different lengths (check_chunk says so)
        out = np.asarray(check_chunk(out), dtype=np.float64)
        want = 3 if images.ndim == 4 else 2  # [N, K, D] for a batch, [K, D] for one image
        if out.ndim != want:
            raise ValueError(f"policy.act returned shape {out.shape}; expected "
                             f"{'[N, K, D]' if images.ndim == 4 else '[K, D]'} for images of shape {images.shape}")
        if images.ndim == 4:
            self._check_rows(len(out), images)
        self._check_finite(out, images.ndim == 4)
        return out

    def chunks(self, images: np.ndarray, previous: np.ndarray | None) -> list[np.ndarray]:
        """Each image's own chunk [K_i, D] for a batch `images` [N, H, W, 3]. Unlike a call, this takes
        chunks of different lengths and empty ones (mode='release' decodes as many actions as the model
        wrote, possibly none): the caller runs each env's own chunk, and fails the episode of an env
        whose chunk is empty."""
        out = self._act(images, previous)
        rows = list(out) if isinstance(out, (list, tuple)) else np.asarray(out)
        if isinstance(rows, np.ndarray) and rows.ndim != 3:
            raise ValueError(f"policy.act returned shape {rows.shape}; expected [N, K, D] for images of shape "
                             f"{images.shape}")
        self._check_rows(len(rows), images)
        rows = [np.asarray(c, dtype=np.float64) for c in rows]
        bad = [c.shape for c in rows if c.ndim != 2]
        if bad:
            raise ValueError(f"policy.act returned chunks of shapes {bad}; each image's chunk must be [K, D]")
        self._check_finite(rows, True)
        return rows

    def latency_summary(self) -> dict:
        lat = np.asarray(self.latencies, dtype=np.float64)
        if lat.size == 0:
            return {"queries": 0}
        return {"queries": int(lat.size), "mean_s": float(lat.mean()), "median_s": float(np.median(lat)),
                "p90_s": float(np.percentile(lat, 90)), "max_s": float(lat.max())}
