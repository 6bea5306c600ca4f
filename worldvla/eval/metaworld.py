"""Closed-loop and world-model evaluation of a WorldVLA policy on Meta-World.

Closed loop (spec section 6 adapted to Meta-World): every episode starts from a
seeded layout (seeds disjoint from the ones `worldvla collect` trains on); when an
env's action queue is empty the policy gets the previous step's frame and the current
frame and returns a chunk of K actions, executed open-loop. Several envs of one task
run in lockstep and their queries are batched. Success is Meta-World's `success` flag.

World model: on held-out scripted-expert rollouts, the model predicts the next frame
from the real current frame and the expert action (one-step), and imagines whole
rollouts from the first frame and the expert's action sequence (multi-step); both
are scored with PSNR and SSIM against the simulator's frames, next to two references:
copying the last real frame, and the VQGAN's own reconstruction of the target.

`worldvla eval --policy DIR [DIR ...] --tasks ... --episodes N --out DIR` writes
metrics.json, success.png, world_model.png, a real-vs-imagined PNG grid and a GIF per task.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .metrics import psnr, ssim
from .rollout import ChunkQuery

EVAL_SEED_TAG = 0x5EED_E7A1  # keeps evaluation layouts apart from collection seeds


def eval_seeds(task: str, episodes: int, seed: int = 0) -> list[int]:
    """Layout seeds of the evaluation episodes of `task` (stable, disjoint in practice
    from `worldvla.data.collect.episode_seed`, which hashes a different tuple)."""
    ss = np.random.SeedSequence([seed & 0xFFFFFFFF, zlib.crc32(task.encode()), EVAL_SEED_TAG])
    return [int(s & 0x7FFFFFFF) for s in ss.generate_state(max(episodes, 1))[:episodes]]


class RandomPolicy:
    """Chance level: uniform random actions in [low, high], in chunks like a trained policy."""

    def __init__(self, chunk_size: int = 5, action_dim: int = 4, seed: int = 0, low: float = -1.0, high: float = 1.0):
        self.chunk_size, self.action_dim = int(chunk_size), int(action_dim)
        self.low, self.high = low, high
        self.rng = np.random.default_rng(seed)

    def reset(self, instruction) -> None:
        pass

    def act(self, image, history=None) -> np.ndarray:
        image = np.asarray(image)
        shape = ((image.shape[0],) if image.ndim == 4 else ()) + (self.chunk_size, self.action_dim)
        return self.rng.uniform(self.low, self.high, size=shape)

    def metadata(self) -> dict:
        return {"kind": "random", "chunk_size": self.chunk_size, "action_dim": self.action_dim}


@dataclass
class TaskResult:
    task: str
    seeds: list[int]
    successes: list[bool]
    steps: list[int]
    latency: dict = field(default_factory=dict)
    frames: np.ndarray | None = None  # first episode, uint8 [T, H, W, 3]
    seconds: float = 0.0

    @property
    def success_rate(self) -> float:
        return float(np.mean(self.successes)) if self.successes else 0.0

    def to_dict(self) -> dict:
        steps_ok = [s for s, ok in zip(self.steps, self.successes) if ok]
        return {"success_rate": self.success_rate, "successes": int(np.sum(self.successes)),
                "episodes": len(self.successes), "seeds": self.seeds, "episode_success": [bool(s) for s in self.successes],
                "mean_steps_to_success": float(np.mean(steps_ok)) if steps_ok else None,
                "latency": self.latency, "seconds": self.seconds}


def _default_env_factory(task: str, image_size: int, max_steps: int):
    from ..sim.metaworld_env import make_env

    return make_env(task, seed=0, image_size=image_size, max_steps=max_steps)


def closed_loop(policy, task: str, episodes: int, *, seed: int = 0, image_size: int | None = None,
                max_steps: int = 200, n_envs: int = 4, record: bool = True, env_factory=None,
                instruction: str | None = None, progress=None) -> TaskResult:
    """Success of `policy` on `episodes` seeded episodes of `task`, `n_envs` envs at a time.

    `env_factory(task, image_size, max_steps)` builds an env with `reset(seed) -> frame`,
    `step(action) -> (frame, reward, success, done)`, `.success` and `.instruction`;
    the default is `worldvla.sim.make_env`. `progress` is an optional tqdm bar to advance.
    """
    if episodes < 1:
        raise ValueError(f"episodes must be >= 1, got {episodes}")
    if n_envs < 1:
        raise ValueError(f"n_envs must be >= 1, got {n_envs}")
    image_size = int(image_size or getattr(policy, "image_size", 64))
    factory = env_factory or _default_env_factory
    seeds = eval_seeds(task, episodes, seed)
    n = min(n_envs, episodes)
    envs = [factory(task, image_size, max_steps) for _ in range(n)]
    instruction = instruction or getattr(envs[0], "instruction", task)
    query = ChunkQuery(policy)
    result = TaskResult(task, seeds, [], [])
    t0 = time.perf_counter()
    try:
        for g in range(0, episodes, n):
            group = seeds[g:g + n]
            m = len(group)
            frames = [envs[i].reset(seed=s) for i, s in enumerate(group)]
            policy.reset(instruction)
            queues: list[list[np.ndarray]] = [[] for _ in range(m)]
            prev: list[np.ndarray | None] = [None] * m
            done, steps = [False] * m, [0] * m
            recording = [frames[0]] if (record and g == 0) else None
            while not all(done):
                need = [i for i in range(m) if not done[i] and not queues[i]]
                # Envs of a group start together, so they have history at the same time;
                # split anyway so a short chunk from the policy cannot break the batch.
                for sub in ([i for i in need if prev[i] is None], [i for i in need if prev[i] is not None]):
                    if not sub:
                        continue
                    imgs = np.stack([frames[i] for i in sub])
                    hist = None if prev[sub[0]] is None else np.stack([prev[i] for i in sub])
                    chunks = query(imgs, hist)
                    for i, c in zip(sub, chunks):
                        if len(c) == 0:
                            raise ValueError("the policy returned an empty action chunk")
                        queues[i].extend(np.asarray(c, dtype=np.float64))
                for i in range(m):
                    if done[i]:
                        continue
                    a = queues[i].pop(0)
                    frame, _, _, d = envs[i].step(np.clip(a, -1.0, 1.0))
                    prev[i], frames[i] = frames[i], frame
                    steps[i] += 1
                    done[i] = bool(d)
                    if recording is not None and i == 0:
                        recording.append(frame)
            for i in range(m):
                result.successes.append(bool(envs[i].success))
                result.steps.append(steps[i])
                if progress is not None:
                    progress.update(1)
            if recording is not None:
                result.frames = np.stack(recording)
            if progress is not None:
                progress.set_postfix(task=task.replace("-v3", ""), sr=f"{result.success_rate:.0%}")
    finally:
        for env in envs:
            if hasattr(env, "close"):
                env.close()
    result.latency = query.latency_summary()
    result.seconds = time.perf_counter() - t0
    return result
