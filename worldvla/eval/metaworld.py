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

Nothing finished is lost: each (variant, task) closed loop is saved under `<out>/runs/` as it
ends (with its first episode's GIF, put back under the variant's name when the run is reused), keyed
by the policy's own files (`POLICY_ENTRIES`: not an --out inside its folder) and the evaluation
settings, not by the variant's name (one file per key, so a run with other settings never overwrites
it), and metrics.json is rewritten after each one (`"complete": false` until the end). A rerun with
the same key reuses those results (episodes depend on their seeds alone) and runs only what is missing.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..checkpoint import write_atomic, write_text_atomic
from ..cli import POLICY_FOLDER_HELP, non_negative_int, positive_int, seed32
from ..sim.metaworld_env import MAX_EPISODE_STEPS, TASKS, check_max_steps, check_tasks, task_list
from .metrics import psnr, ssim, success_interval
from .rollout import ChunkQuery

EVAL_SEED_TAG = 0x5EED_E7A1  # keeps evaluation layouts apart from collection seeds


def eval_seeds(task: str, episodes: int, seed: int = 0) -> list[int]:
    """Layout seeds of the evaluation episodes of `task` (stable, disjoint in practice
    from `worldvla.data.collect.episode_seed`, which hashes a different tuple)."""
    ss = np.random.SeedSequence([seed & 0xFFFFFFFF, zlib.crc32(task.encode()), EVAL_SEED_TAG])
    return [int(s & 0x7FFFFFFF) for s in ss.generate_state(max(episodes, 1))[:episodes]]


class RandomPolicy:
    """Chance level: uniform random actions in [low, high], in chunks like a trained policy.
    It does not look at the frames (`needs_images = False`), so evaluation skips rendering."""

    needs_images = False

    def __init__(self, chunk_size: int = 5, action_dim: int = 4, seed: int = 0, low: float = -1.0, high: float = 1.0):
        self.chunk_size, self.action_dim = int(chunk_size), int(action_dim)
        self.low, self.high, self.seed = low, high, int(seed)
        self.rng = np.random.default_rng(seed)

    def reset(self, instruction) -> None:
        pass

    def act(self, image, history=None) -> np.ndarray:
        image = np.asarray(image)
        shape = ((image.shape[0],) if image.ndim == 4 else ()) + (self.chunk_size, self.action_dim)
        return self.rng.uniform(self.low, self.high, size=shape)

    def metadata(self) -> dict:
        return {"kind": "random", "chunk_size": self.chunk_size, "action_dim": self.action_dim, "seed": self.seed}


@dataclass
class TaskResult:
    task: str
    seeds: list[int]
    successes: list[bool]
    steps: list[int]
    latency: dict = field(default_factory=dict)
    frames: np.ndarray | None = None  # first episode, uint8 [T, H, W, 3]
    seconds: float = 0.0
    no_action: list[bool] = field(default_factory=list)  # ended (failed) on a chunk without an action

    @property
    def success_rate(self) -> float:
        return float(np.mean(self.successes)) if self.successes else 0.0

    def to_dict(self) -> dict:
        steps_ok = [s for s, ok in zip(self.steps, self.successes) if ok]
        return {"success_rate": self.success_rate, "successes": int(np.sum(self.successes)),
                "episodes": len(self.successes), "seeds": self.seeds, "episode_success": [bool(s) for s in self.successes],
                "ci95": list(success_interval(int(np.sum(self.successes)), len(self.successes)))
                if self.successes else None,  # Wilson interval of the success rate
                "mean_steps_to_success": float(np.mean(steps_ok)) if steps_ok else None,
                # episodes failed because the model wrote no action block, or malformed ones (a mode='release' chunk)
                "ended_without_action": int(np.sum(self.no_action)),
                "latency": self.latency, "seconds": self.seconds}


def _default_env_factory(task: str, image_size: int, max_steps: int, camera: str = "corner"):
    from ..sim.metaworld_env import make_env

    return make_env(task, seed=0, image_size=image_size, max_steps=max_steps, camera=camera)


def policy_camera(policy, camera: str | None = None) -> str:
    """The Meta-World camera to evaluate `policy` from: `camera` if given (a warning when the policy's
    demonstrations were rendered from another), else the one they were rendered from, else 'corner'."""
    from ..sim.metaworld_env import CAMERAS

    own = (getattr(policy, "extra", None) or {}).get("sim_camera")
    if camera is None:
        return own or "corner"
    if camera not in CAMERAS:
        raise ValueError(f"unknown camera {camera!r}; Meta-World cameras: {', '.join(CAMERAS)}")
    if own and own != camera:
        warnings.warn(f"the policy was trained on frames from the {own!r} camera and is evaluated from {camera!r}",
                      stacklevel=2)
    return camera


def check_execute(policy, execute: int | None, name: str = "the policy") -> None:
    """Refuse `execute` above the policy's chunk size: the slice would run the whole chunk while metrics.json
    records `execute`. A mode='release' policy writes as many actions as its model does, so any N is its own."""
    k = getattr(policy, "chunk_size", None)
    if execute is None or k is None or getattr(policy, "mode", None) == "release":
        return
    if execute > k:
        raise ValueError(f"--execute {execute} is more than the chunk size of {name} ({k} actions); give "
                         f"--execute {k} or less (or leave it out to run whole chunks)")


def closed_loop(policy, task: str, episodes: int, *, seed: int = 0, image_size: int | None = None,
                max_steps: int = 200, n_envs: int = 4, record: bool = True, env_factory=None,
                instruction: str | None = None, progress=None, envs: list | None = None,
                execute: int | None = None, camera: str | None = None) -> TaskResult:
    """Success of `policy` on `episodes` seeded episodes of `task`, `n_envs` envs at a time.

    `env_factory(task, image_size, max_steps)` builds an env with `reset(seed) -> frame`,
    `step(action) -> (frame, reward, success, done)`, `.success` and `.instruction`;
    the default is `worldvla.sim.make_env`, rendering from `camera` (default: the policy's own,
    `policy_camera`). `envs`: already built envs of `task` to use (and
    leave open) instead; each episode's layout comes from its seed alone. A policy with
    `needs_images = False` gets blank frames, and envs with `can_skip_render` skip rendering.
    `progress` is an optional tqdm bar to advance. `execute`: run only the first `execute` actions
    of each chunk before querying again (receding horizon; default: the whole chunk, as the release).
    Each env runs its own chunk (a mode='release' policy's chunks differ in length); an env given an
    empty chunk (the model wrote no action) fails its episode, as in the release's loop.
    """
    if episodes < 1:
        raise ValueError(f"episodes must be >= 1, got {episodes}")
    if n_envs < 1:
        raise ValueError(f"n_envs must be >= 1, got {n_envs}")
    if execute is not None and execute < 1:
        raise ValueError(f"execute must be >= 1 actions of a chunk (or None for all), got {execute}")
    check_execute(policy, execute)
    image_size = int(image_size or getattr(policy, "image_size", 64))
    seeds = eval_seeds(task, episodes, seed)
    own_envs = envs is None
    if own_envs:
        cam = None if env_factory else policy_camera(policy, camera)
        envs = [env_factory(task, image_size, max_steps) if env_factory else
                _default_env_factory(task, image_size, max_steps, cam) for _ in range(min(n_envs, episodes))]
    n = min(len(envs), episodes)
    blind = (not getattr(policy, "needs_images", True) and not record
             and all(getattr(e, "can_skip_render", False) for e in envs))
    kw = {"render": False} if blind else {}
    blank = np.zeros((image_size, image_size, 3), dtype=np.uint8)
    instruction = instruction or getattr(envs[0], "instruction", task)
    query = ChunkQuery(policy)
    result = TaskResult(task, seeds, [], [])
    t0 = time.perf_counter()
    try:
        for g in range(0, episodes, n):
            group = seeds[g:g + n]
            m = len(group)
            frames = [envs[i].reset(seed=s, **kw) for i, s in enumerate(group)]
            if blind:
                frames = [blank] * m
            policy.reset(instruction)
            queues: list[list[np.ndarray]] = [[] for _ in range(m)]
            prev: list[np.ndarray | None] = [None] * m
            done, failed, steps = [False] * m, [False] * m, [0] * m
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
                    # Each env runs its own chunk: mode='release' chunks differ in length.
                    for i, c in zip(sub, query.chunks(imgs, hist)):
                        if len(c) == 0:  # no action to run: the episode fails, as in the release's loop
                            done[i], failed[i] = True, True
                        queues[i].extend(c[:execute])
                # Envs in worker processes (`step_async`) all start their step before the first wait.
                live = [i for i in range(m) if not done[i]]
                started: list[int] = []
                try:
                    for i in live:
                        if hasattr(envs[i], "step_async"):
                            envs[i].step_async(np.clip(queues[i].pop(0), -1.0, 1.0), **kw)
                            started.append(i)
                    for i in live:
                        if i in started:
                            started.remove(i)
                            frame, _, _, d = envs[i].step_wait()
                        else:
                            frame, _, _, d = envs[i].step(np.clip(queues[i].pop(0), -1.0, 1.0), **kw)
                        frame = blank if blind else frame
                        prev[i], frames[i] = frames[i], frame
                        steps[i] += 1
                        done[i] = bool(d)
                        if recording is not None and i == 0:
                            recording.append(frame)
                except BaseException:
                    _settle([envs[i].step_wait for i in started])
                    raise
            for i in range(m):
                result.successes.append(bool(envs[i].success) and not failed[i])
                result.steps.append(steps[i])
                result.no_action.append(failed[i])
                if progress is not None:
                    progress.update(1)
            if recording is not None:
                result.frames = np.stack(recording)
            if progress is not None:
                progress.set_postfix(task=task.replace("-v3", ""), sr=f"{result.success_rate:.0%}")
    finally:
        for env in envs if own_envs else ():
            if hasattr(env, "close"):
                env.close()
    result.latency = query.latency_summary()
    result.seconds = time.perf_counter() - t0
    return result


def _settle(waits) -> None:
    """Read the replies still owed by envs in worker processes after an error, so that their pool stays in step
    for its next use (a reply left unread would be taken for the next command's); their own errors are the
    first one's consequences."""
    for wait in waits:
        try:
            wait()
        except Exception:  # noqa: BLE001
            pass


# ---------------------------------------------------------------------- world model
def expert_rollouts(task: str, episodes: int, *, seed: int = 0, image_size: int | None = None, max_steps: int = 200,
                    env_factory=None, envs: list | None = None, camera: str | None = None,
                    policy=None, progress=None) -> list[dict]:
    """Scripted-expert episodes on evaluation seeds: frames [T+1, H, W, 3] and actions [T, 4].

    `envs`: envs of `task` in worker processes (`worldvla.sim.workers`) to run the episodes on,
    side by side; otherwise one env is built here, `image_size` square from `camera` (defaults: those of
    `policy`, the policy whose world model the frames are to score, as `closed_loop`; else 64, 'corner').
    Either way an episode depends on its seed alone. `progress` is an optional tqdm bar to advance, one
    step an episode."""
    from ..sim.metaworld_env import expert_episode

    def done(episode: dict) -> dict:
        if progress is not None:
            progress.update(1)
        return episode

    seeds = eval_seeds(task, episodes, seed + 1)  # other layouts than the closed-loop episodes
    if envs and all(hasattr(e, "expert_async") for e in envs):
        out = []
        for g in range(0, len(seeds), len(envs)):
            group = list(zip(envs, seeds[g:g + len(envs)]))
            for env, s in group:
                env.expert_async(s)
            for k, (env, _) in enumerate(group):
                try:
                    out.append(done(env.expert_wait()))
                except BaseException:
                    _settle([e.expert_wait for e, _ in group[k + 1:]])
                    raise
        return out
    image_size = int(image_size or getattr(policy, "image_size", None) or 64)
    env = env_factory(task, image_size, max_steps) if env_factory else _default_env_factory(
        task, image_size, max_steps, policy_camera(policy, camera))
    try:
        return [done(expert_episode(env, s)) for s in seeds]
    finally:
        env.close()


def _scores(pred: np.ndarray, real: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return psnr(pred, real).numpy(), ssim(pred, real).numpy()


PSNR_CAP_DB = 100.0  # an identical pair's PSNR (infinite) counts as this, so every frame stays in the mean


def _mean_finite(v) -> float | None:
    """Mean of PSNRs in dB over every entry: infinite ones (identical images) at PSNR_CAP_DB, missing ones
    (None, NaN: a task without the metric) left out."""
    v = np.minimum(np.asarray([np.nan if x is None else x for x in np.ravel(v)], dtype=np.float64), PSNR_CAP_DB)
    v = v[~np.isnan(v)]
    return float(v.mean()) if v.size else None


def world_model_metrics(policy, rollouts: list[dict], horizon: int = 8, one_step_points: int = 8) -> dict:
    """PSNR / SSIM of next-frame predictions and of imagined multi-step rollouts against
    the simulator, with the copy-last-frame and VQGAN-reconstruction references.

    `policy` provides `model`, `vqgan`, `action_tokenizer` and `text_tokenizer` (a
    `WorldVLAPolicy`). Frames of another size than the policy's are resized to it first, as
    `policy.imagine` resizes them, and scored at that size. Returns the metrics and, under
    "examples", frames for the figures."""
    for i, r in enumerate(rollouts):  # frame t + 1 is the one action t leads to: one more frame than actions
        if len(r["frames"]) != len(r["actions"]) + 1:
            raise ValueError(f"rollout {i} has {len(r['frames'])} frames for {len(r['actions'])} actions; a rollout "
                             f"holds the frame before each action and the one after the last, one frame more than "
                             f"actions (drop the actions that no frame follows)")
    from ..inference.frames import generate_frames
    model, vqgan = policy.model, policy.vqgan
    kw = dict(layout=getattr(policy, "layout", None) or model.layout, action_tokenizer=policy.action_tokenizer,
              text_tokenizer=policy.text_tokenizer)
    prepare = getattr(policy, "_frames", None)
    usable = [{**r, "frames": prepare(r["frames"])[0] if prepare else r["frames"]}
              for r in rollouts if len(r["actions"]) >= 1]
    if not usable:
        raise ValueError("world-model metrics need at least one rollout with one action")

    # One step: real frame t + expert action t -> frame t+1, at evenly spaced t.
    imgs, acts, targets = [], [], []
    for r in usable:
        T = len(r["actions"])
        for t in np.unique(np.linspace(0, T - 1, min(one_step_points, T)).astype(int)):
            imgs.append(r["frames"][t])
            acts.append(r["actions"][t])
            targets.append(r["frames"][t + 1])
    imgs, acts, targets = np.stack(imgs), np.stack(acts), np.stack(targets)
    t0 = time.perf_counter()
    out = generate_frames(model, vqgan, imgs, acts[:, None], **kw)
    pred, pred_codes = out.frames[:, 0], out.codes[:, 0].cpu()
    one_step_s = (time.perf_counter() - t0) / len(imgs)
    target_codes = vqgan.encode_images(targets)
    current_codes = vqgan.encode_images(imgs).cpu()
    recon = vqgan.decode_images(target_codes)  # what a world model whose every code is right would show
    target_codes = target_codes.cpu()
    p_m, s_m = _scores(pred, targets)
    p_c, s_c = _scores(imgs, targets)
    p_r, s_r = _scores(recon, targets)
    # In the tokenizer's own space, free of its reconstruction ceiling: the share of the next
    # frame's VQ codes predicted exactly, against keeping the current frame's codes.
    one_step = {"n": int(len(imgs)), "psnr": _mean_finite(p_m), "ssim": float(s_m.mean()),
                "copy_last_psnr": _mean_finite(p_c), "copy_last_ssim": float(s_c.mean()),
                "vqgan_recon_psnr": _mean_finite(p_r), "vqgan_recon_ssim": float(s_r.mean()),
                "code_accuracy": float((pred_codes == target_codes).double().mean()),
                "copy_last_code_accuracy": float((current_codes == target_codes).double().mean()),
                "seconds_per_frame": one_step_s}

    # Multi-step: from each rollout's first frame, imagine `H` steps under the expert's actions.
    H = max(1, min(horizon, min(len(r["actions"]) for r in usable)))
    first = np.stack([r["frames"][0] for r in usable])
    seq = np.stack([r["actions"][:H] for r in usable])
    real = np.stack([r["frames"][1:H + 1] for r in usable])            # [N, H, ...]
    t0 = time.perf_counter()
    imagined = generate_frames(model, vqgan, first, seq, **kw).frames  # [N, H, ...]
    multi_s = time.perf_counter() - t0
    per_step_p, per_step_s, copy_p, copy_s = [], [], [], []
    for k in range(H):
        p, s = _scores(imagined[:, k], real[:, k])
        pc, sc = _scores(first, real[:, k])
        per_step_p.append(_mean_finite(p))
        per_step_s.append(float(s.mean()))
        copy_p.append(_mean_finite(pc))
        copy_s.append(float(sc.mean()))
    multi = {"horizon": H, "rollouts": len(usable), "psnr_per_step": per_step_p, "ssim_per_step": per_step_s,
             "copy_first_psnr_per_step": copy_p, "copy_first_ssim_per_step": copy_s,
             "psnr": _mean_finite(per_step_p), "ssim": float(np.mean(per_step_s)), "seconds": multi_s}
    return {"one_step": one_step, "multi_step": multi,
            "examples": {"real": np.concatenate([first[:1], real[0]]), "imagined": np.concatenate([first[:1], imagined[0]])}}


def action_only(policy) -> bool:
    """Whether `policy`'s export says that its model saw no world-model sample in training: the sample kinds
    its training recorded (`extra["kinds"]`) lack "world", or the token store it was trained from
    (`extra["store"]`, where that is still readable here) holds none. False where neither says so."""
    from ..data.store import MANIFEST

    extra = getattr(policy, "extra", None) or {}
    kinds = extra.get("kinds")
    if isinstance(kinds, (list, tuple)) and kinds:
        return "world" not in kinds
    if not isinstance(extra.get("store"), str):
        return False
    try:
        manifest = json.loads((Path(extra["store"]) / MANIFEST).read_text())
    except (OSError, ValueError):  # moved, on another machine, or not a store: it does not say
        return False
    return isinstance(manifest, dict) and manifest.get("n_world") == 0


# ---------------------------------------------------------------------- the whole evaluation
def load_policy(path, device=None):
    from ..inference import WorldVLAPolicy

    return WorldVLAPolicy.from_pretrained(path, device=device)


# What an exported policy consists of (`worldvla.inference.save_policy`): the files it loads from.
POLICY_ENTRIES = ("policy.json", "text_tokenizer.json", "model", "vqgan")


def _policy_files(root: Path) -> list[Path]:
    """The files of the policy folder `root` that the policy loads from (`POLICY_ENTRIES`), sorted; every file
    of a folder laid out otherwise (none of those entries), so that it is still told apart from another."""
    files = []
    for entry in (root / name for name in POLICY_ENTRIES):
        files += [entry] if entry.is_file() else [q for q in entry.rglob("*") if q.is_file()]
    return sorted(files) if files else sorted(q for q in root.rglob("*") if q.is_file())


def _policy_fingerprint(src) -> str | None:
    """Identity of a policy folder: its path and its policy files' names, sizes and modification times (a
    retrained or replaced policy gets a new one; two folders written within one tick of the clock do not share
    one). Only the files the policy loads from (`POLICY_ENTRIES`) count: anything else in the folder, such as an
    evaluation's --out inside it (whose every run would change the fingerprint, so that nothing saved is ever
    reused), is no part of the policy. None for a policy given as an object."""
    if not isinstance(src, (str, Path)):
        return None
    root = Path(src)
    # surrogateescape: a name in another encoding than the file system's (bytes UTF-8 cannot decode) is still a
    # name, hashed as its bytes
    h = hashlib.sha256(f"{root.resolve()}\n".encode("utf-8", "surrogateescape"))
    for f in _policy_files(root):
        st = f.stat()
        line = f"{f.relative_to(root).as_posix()}:{st.st_size}:{st.st_mtime_ns}\n"
        h.update(line.encode("utf-8", "surrogateescape"))
    return h.hexdigest()


class _SavedRuns:
    """Finished closed loops under `<out>/runs/<task>__<key>.json`, each with the key it was run under (and,
    as a label, the variant name it was saved by). The key is in the name so that runs of other settings
    (a 1-episode spot check beside a 50-episode run) are kept side by side instead of overwriting each
    other; the variant name is not, so that a policy evaluated under another name (--names, or default
    names that change when a folder of the same name joins) finds its runs."""

    def __init__(self, out_dir: Path, enabled: bool):
        self.dir = out_dir / "runs"
        self.enabled = enabled

    def _path(self, task: str, key: str, suffix: str = ".json") -> Path:
        return self.dir / f"{task}__{key[:16]}{suffix}"

    def get(self, task: str, key: str | None) -> dict | None:
        if not (self.enabled and key):
            return None
        try:
            saved = json.loads(self._path(task, key).read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(saved, dict) or saved.get("key") != key or not _whole_result(saved.get("result")):
            return None  # damaged (or not a closed loop's record): run again
        return saved["result"]

    def put(self, name: str, task: str, key: str | None, result: dict) -> None:
        if key:
            write_text_atomic(self._path(task, key),
                              json.dumps({"key": key, "variant": name, "result": result}, default=_json_default))

    def gif(self, task: str, key: str) -> Path:
        """The first episode's GIF of a saved run, kept beside it: the variant's GIF in the output folder is
        rewritten by runs of other settings or names, and a reused result must show its own episode."""
        return self._path(task, key, ".gif")


def _whole_result(res) -> bool:
    """Whether a saved closed loop's result holds what the metrics and the GIFs read from it, consistently."""
    if not isinstance(res, dict):
        return False
    ok = res.get("episode_success")
    return (isinstance(ok, list) and len(ok) >= 1 and all(isinstance(x, bool) for x in ok)
            and res.get("episodes") == len(ok) and res.get("successes") == sum(ok)
            and isinstance(res.get("success_rate"), (int, float)) and isinstance(res.get("latency"), dict))


def _copy_file(src: Path, dst: Path) -> None:
    write_atomic(dst, lambda tmp: shutil.copyfile(src, tmp))


def gif_stems(names) -> dict[str, str]:
    """File-name stems of the variants' GIFs: each name made safe for a file name, with a short hash of the name
    where two names would give one stem ("a b" and "a_b", or "A" and "a" on a case-insensitive disk), so that no
    variant's GIF replaces another's."""
    stems = {n: _slug(n) for n in names}
    folded = [s.casefold() for s in stems.values()]

    def tagged(n: str) -> str:
        return f"{stems[n]}-{hashlib.sha256(n.encode('utf-8', 'surrogateescape')).hexdigest()[:8]}"

    return {n: s if folded.count(s.casefold()) == 1 else tagged(n) for n, s in stems.items()}


def _summarize_variant(v: dict, tasks: list[str]) -> None:
    """A variant's mean success over tasks, with the Wilson interval of all its episodes pooled (the same
    number of episodes per task, so the pooled rate is the mean)."""
    v["success_rate"] = float(np.mean([v["tasks"][t]["success_rate"] for t in tasks]))
    ok, n = (sum(v["tasks"][t][k] for t in tasks) for k in ("successes", "episodes"))
    v["success_ci95"] = list(success_interval(ok, n))
    for t in tasks:  # runs saved before the intervals were recorded
        v["tasks"][t].setdefault("ci95", list(success_interval(v["tasks"][t]["successes"], v["tasks"][t]["episodes"])))


def default_variant_names(policies) -> list[str]:
    """Policy folders' names, a run's `policy` folder (what `worldvla train` exports) by its run's (runs/wvla/policy
    -> wvla); folders of the same name are told apart by the folders above them (run1/policy, run2/policy -> run1,
    run2). Policies given as objects are policy0, policy1, ..."""
    paths = [Path(p).resolve() if isinstance(p, (str, Path)) else None for p in policies]
    plain = [f"policy{i}" if p is None else p.parent.name if p.name == "policy" and len(p.parts) > 2 else p.name
             for i, p in enumerate(paths)]
    names = plain
    deepest = max((len(p.parts) for p in paths if p is not None), default=0)
    for depth in range(1, deepest - 1):  # parent folders, never the root
        if len(set(names)) == len(names):
            break
        names = [n if p is None or names.count(n) == 1 else "/".join(p.parts[-1 - depth:-1])
                 for n, p in zip(names, paths)]
    names = names if len(set(names)) == len(names) else plain
    # A folder name in another encoding than the file system's holds bytes UTF-8 cannot decode: shown as escapes
    # (pol\\xff), as the figures' labels and metrics.json's text cannot hold them.
    return [n.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace") for n in names]


def evaluate(policies, tasks, episodes: int, out_dir, *, seed: int = 0, max_steps: int = 200, n_envs: int = 4,
             random_baseline: bool = True, wm_episodes: int = 2, wm_horizon: int = 8, progress: bool = True,
             variant_names: list[str] | None = None, device=None, gifs: bool = True,
             causal_variant: bool = False, env_workers: int = 2, resume: bool = True,
             execute: int | None = None, camera: str | None = None) -> dict:
    """Evaluate one or more policies (folders or loaded objects) on `tasks`; write artifacts to
    `out_dir` and return the metrics (also written to `out_dir/metrics.json`).

    `causal_variant`: also evaluate every chunk-mask policy with its chunks decoded without
    the mask (plain causal attention, `worldvla.eval.ablations.CausalChunkPolicy`): the
    inference-only ablation. A policy trained with `--attention causal` decodes causally by itself.
    `env_workers`: processes the envs of a task are spread over (`worldvla.sim.workers`;
    1 = step them in this process). `resume`: reuse the closed loops saved under `out_dir/runs/`
    by an earlier call with the same policy files and settings (see the module's docstring).
    `execute`: actions of each chunk run before the next query (default all; see `closed_loop`).
    `camera`: the Meta-World camera to render from (default: each policy's own, `policy_camera`)."""
    from tqdm.auto import tqdm

    from ..ops import dispatch
    from . import plots

    # A task named twice runs once (it would count twice in the means); every name is checked before anything
    # loads or runs.
    tasks = task_list(tasks)
    # Triton must be loaded before MuJoCo's software renderer (their LLVMs clash otherwise).
    dispatch.available("masked_attention")
    if not tasks:
        raise ValueError("no tasks to evaluate: pass Meta-World task names (--tasks drawer-open-v3,door-open-v3)")
    if episodes < 1:
        raise ValueError(f"--episodes must be >= 1, got {episodes}")
    if n_envs < 1:
        raise ValueError(f"--envs must be >= 1, got {n_envs}")
    check_max_steps(max_steps, "--max-steps")  # the envs refuse it, but only once the policies have loaded
    policies = list(policies)
    if not policies and not random_baseline:
        raise ValueError("nothing to evaluate: no policy and no random baseline; pass policies (--policy DIR) or "
                         "leave the baseline on (random_baseline=True)")
    names = list(variant_names or [])
    if len(names) > len(policies):  # the extra names would label the --add-causal-variant variants instead
        raise ValueError(f"{len(names)} variant names {names} for {len(policies)} policies; give one name per policy "
                         f"(or fewer: the rest keep their folders' names)")
    names += default_variant_names(policies)[len(names):]
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():  # named before the policies load
        raise NotADirectoryError(f"the output folder {out_dir} is a file, not a folder: name a folder (--out; it is "
                                 f"created if missing)")
    if len(set(names)) != len(names):
        raise ValueError(f"variant names must differ, got {names}; name the policies with --names a,b,... "
                         f"(variant_names in Python)")
    if random_baseline and "random" in names:  # the baseline's key in metrics.json and its column in the table
        raise ValueError(f"a variant is named 'random', the random baseline's name (variants: {names}); name the "
                         f"policies otherwise with --names a,b,... (variant_names in Python), or leave the baseline "
                         f"out with --no-random (random_baseline=False)")
    # A folder's fingerprint is taken once, before it loads: one taken later could be that of a new export that
    # replaced the folder meanwhile, and the loaded weights' results would be saved as the new files'.
    fingerprints, loaded = [], []
    for p in policies:
        fingerprints.append(_policy_fingerprint(p))
        loaded.append(load_policy(p, device) if isinstance(p, (str, Path)) else p)
    for name, pol in zip(names, loaded):  # before any env is built or any variant has run
        check_execute(pol, execute, f"policy {name!r}")
    # Created once every argument is known to be usable: a refused call leaves no empty folder behind.
    out_dir.mkdir(parents=True, exist_ok=True)
    # The world-model scores are the first policy's. Those of a model that never saw a world-model sample are an
    # untrained world model's: still scored (a reference beside a joint model's), but said so, here, in
    # metrics.json and in the table.
    wm_action_only = wm_episodes > 0 and bool(loaded) and hasattr(loaded[0], "model") and action_only(loaded[0])
    if wm_action_only:
        warnings.warn(f"policy {names[0]!r} was trained on action samples only (no world-model sample): its "
                      f"world-model scores are those of an untrained world model; pass --wm-episodes 0 "
                      f"(wm_episodes=0) to skip them", stacklevel=2)
    if causal_variant:
        from .ablations import CausalChunkPolicy

        for i in range(len(loaded)):
            if hasattr(loaded[i], "builder") and loaded[i].model.config.attention == "chunk":
                loaded.append(CausalChunkPolicy.from_policy(loaded[i]))
                policies.append(policies[i])
                fingerprints.append(fingerprints[i])
                names.append(f"{names[i]} (no chunk mask)")
                if names[-1] in names[:-1]:  # its results would replace those of the variant of that name
                    raise ValueError(f"the variant {names[-1]!r} that --add-causal-variant adds for {names[i]!r} has "
                                     f"the name of another variant; name the policies otherwise with --names a,b,... "
                                     f"(variant_names in Python)")
    # Each policy is evaluated from the camera its demonstrations were rendered from (or `camera`); the
    # random baseline shares the first policy's envs.
    cameras = {id(p): policy_camera(p, camera) for p in loaded}
    default_camera = cameras[id(loaded[0])] if loaded else policy_camera(None, camera)
    metrics: dict = {"tasks": tasks, "episodes": episodes, "max_steps": max_steps, "seed": seed,
                     "execute": execute, "complete": False, "variants": {}}
    saved = _SavedRuns(out_dir, resume)
    stems = gif_stems(names)
    # Envs per batch too: a batch's composition can move the last bits of a batched query.
    settings = {"episodes": episodes, "max_steps": max_steps, "seed": seed, "n_envs": min(n_envs, episodes)}

    def run_key(fp: str | None, pol, task: str) -> str | None:
        """What a closed loop's result depends on: the policy's files (`fp`, their fingerprint) and how it was
        loaded (device, dtype: its metadata), the task and the settings; not the variant's name. None when it
        cannot be known."""
        if fp is None:
            return None
        meta = _jsonable(pol.metadata()) if hasattr(pol, "metadata") else None
        k = getattr(pol, "chunk_size", None)
        # Whole chunks either way, for a policy whose chunks are all `chunk_size` long.
        ex = None if execute == k and getattr(pol, "mode", None) != "release" else execute
        blob = json.dumps({"kind": type(pol).__name__, "policy": fp, "metadata": meta, "task": task,
                           "chunk_size": k, "camera": cameras.get(id(pol), default_camera),
                           **settings, "execute": ex}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()

    def run_task(name: str, fp: str | None, pol, task: str, record: bool) -> dict:
        """One closed loop, or the saved result of the same one; saved and written out as it ends."""
        key = run_key(fp, pol, task)
        res = saved.get(task, key)
        gif = {tag: out_dir / f"{stems.get(name) or _slug(name)}_{task}_{tag}.gif" for tag in ("success", "failure")}
        if res is not None:
            bar.update(episodes)
            own = gif["success" if res["episode_success"][0] else "failure"]
            # The GIF of the other outcome is an earlier run's: it would stand beside this result as current. So
            # would one of this outcome that a run of other settings (or another variant's name) wrote: the GIF
            # kept with the saved run replaces it.
            gif["failure" if res["episode_success"][0] else "success"].unlink(missing_ok=True)
            if gifs and saved.gif(task, key).is_file():
                _copy_file(saved.gif(task, key), own)
            return {**res, "reused": True}
        r = closed_loop(pol, task, episodes, seed=seed, max_steps=max_steps, progress=bar, record=record,
                        envs=envs_for(task, pol), execute=execute)
        res = r.to_dict()
        for path in gif.values():  # an earlier run's GIF, of either outcome, is not this run's
            path.unlink(missing_ok=True)
        if gifs and r.frames is not None:
            own = gif["success" if r.successes[0] else "failure"]
            plots.save_gif(r.frames, own)
            if key:  # before the run is saved: a saved run with GIFs on has its GIF
                _copy_file(own, saved.gif(task, key))
        saved.put(name, task, key, res)
        return res

    def write_metrics() -> None:
        write_text_atomic(out_dir / "metrics.json", json.dumps(metrics, indent=1, default=_json_default))

    n_runs = len(tasks) * episodes * (len(loaded) + int(random_baseline))
    bar = tqdm(total=n_runs, desc="evaluate", unit="ep", disable=not progress, dynamic_ncols=True)
    expert_bar = None
    rates: dict[str, dict[str, float]] = {}
    # Every variant (and the random baseline) runs on one set of envs per task: building an env
    # costs about as much as a hundred steps, and each episode's layout comes from its seed alone.
    pool: dict[tuple, list] = {}
    worker_pools = []

    def close_envs() -> None:
        for env in (e for envs in pool.values() for e in envs):
            env.close()
        for workers in worker_pools:
            workers.close()
        pool.clear()
        worker_pools.clear()

    def envs_for(task: str, pol) -> list:
        size = getattr(pol, "image_size", None) or (getattr(loaded[0], "image_size", None) if loaded else None)
        key = (task, int(size or 64), cameras.get(id(pol), default_camera))
        if key not in pool:
            n = min(n_envs, episodes)
            if env_workers > 1 and n > 1:
                from ..sim.workers import EnvWorkers

                worker_pools.append(EnvWorkers(task, n, key[1], max_steps, workers=env_workers, camera=key[2]))
                pool[key] = worker_pools[-1].envs
            else:
                pool[key] = [_default_env_factory(task, key[1], max_steps, key[2]) for _ in range(n)]
        return pool[key]

    try:
        for name, src, fp, pol in zip(names, policies, fingerprints, loaded):
            meta = pol.metadata() if hasattr(pol, "metadata") else {}
            v = {"policy": str(src) if isinstance(src, (str, Path)) else name, "chunk_size": getattr(pol, "chunk_size", None), "metadata": _jsonable(meta), "tasks": {}}
            metrics["variants"][name] = v
            for task in tasks:
                v["tasks"][task] = run_task(name, fp, pol, task, record=True)
                write_metrics()
            _summarize_variant(v, tasks)
            for key in ("mean_s", "median_s"):
                lat = [v["tasks"][t]["latency"].get(key) for t in tasks]
                lat = [x for x in lat if x is not None]
                v[f"latency_{key}"] = float(np.mean(lat)) if lat else None
            rates[name] = {t: v["tasks"][t]["success_rate"] for t in tasks}
        if random_baseline:
            k = getattr(loaded[0], "chunk_size", 5) if loaded else 5
            # A mode='release' policy may be run with --execute above its chunk size (check_execute): the baseline
            # draws chunks of at least that many actions, whose length changes nothing else of uniform noise.
            k = max(k, execute or 0)
            v = {"policy": "uniform random actions", "chunk_size": k, "tasks": {}}
            metrics["random"] = v
            for task in tasks:
                # Seeded per task, so a task's random actions do not depend on which tasks ran (or were
                # reloaded from saved runs) before it.
                rnd = RandomPolicy(chunk_size=k, seed=zlib.crc32(f"random {seed} {task}".encode()))
                v["tasks"][task] = run_task("(random baseline)", "random", rnd, task, record=False)
                write_metrics()
            _summarize_variant(v, tasks)
            rates["random"] = {t: v["tasks"][t]["success_rate"] for t in tasks}
        # Expert rollouts for the world-model metrics, on the same envs while they are up.
        rollouts = {}
        if wm_episodes > 0 and loaded and hasattr(loaded[0], "model"):
            bar.close()  # the closed loops are done: the expert episodes get a bar of their own
            expert_bar = tqdm(total=len(tasks) * wm_episodes, desc="expert rollouts", unit="ep",
                              disable=not progress, dynamic_ncols=True)
            size, cam = int(loaded[0].image_size), cameras[id(loaded[0])]
            for task in tasks:
                rollouts[task] = expert_rollouts(task, wm_episodes, seed=seed, image_size=size, max_steps=max_steps,
                                                 envs=pool.get((task, size, cam)), camera=cam, progress=expert_bar)
    finally:
        bar.close()
        if expert_bar is not None:
            expert_bar.close()
        close_envs()

    # World model, for the first policy (the others share the metric code; run `evaluate` per policy).
    # An earlier run's world-model figures that this run does not rewrite (no world model now, other
    # tasks, no GIFs) would pass for this run's: remove them first.
    wm_files = {"world_model.png", "world_model_grid.png"} if rollouts else set()
    wm_files |= {f"world_model_{t}.gif" for t in tasks} if rollouts and gifs else set()
    for stale in [out_dir / "world_model.png", out_dir / "world_model_grid.png", *out_dir.glob("world_model_*.gif")]:
        if stale.name not in wm_files and not stale.name.endswith(("_success.gif", "_failure.gif")):  # a variant's
            stale.unlink(missing_ok=True)
    # So would the closed-loop GIFs of variants (or tasks) this run did not evaluate, and any with GIFs off: only
    # names of this module's pattern, <variant>_<task>_<outcome>.gif with a Meta-World task, are touched.
    loop_gifs = {f"{stems.get(n) or _slug(n)}_{t}_{tag}.gif" for n in names for t in tasks
                 for tag in ("success", "failure")} if gifs else set()
    for stale in [*out_dir.glob("*_success.gif"), *out_dir.glob("*_failure.gif")]:
        parts = stale.name[:-len(".gif")].rsplit("_", 2)  # task names and outcomes hold no "_"
        if stale.name not in loop_gifs and len(parts) == 3 and parts[1] in TASKS:
            stale.unlink(missing_ok=True)
    if rollouts:
        wm: dict = {}
        curves = {}
        grid_rows, grid_labels = [], []
        for task in tqdm(tasks, desc="world model", unit="task", disable=not progress):
            res = world_model_metrics(loaded[0], rollouts[task], horizon=wm_horizon)
            ex = res.pop("examples")
            wm[task] = res
            ms = res["multi_step"]
            curves[task.replace("-v3", "")] = {"psnr": ms["psnr_per_step"], "ssim": ms["ssim_per_step"],
                                               "psnr_ref": ms["copy_first_psnr_per_step"],
                                               "ssim_ref": ms["copy_first_ssim_per_step"]}
            grid_rows += [ex["real"], ex["imagined"]]
            grid_labels += [f"{task.replace('-v3', '')} real", "imagined"]
            if gifs:
                plots.save_gif(plots.side_by_side(ex["real"], ex["imagined"]), out_dir / f"world_model_{task}.gif", fps=4)
        plots.frame_grid(grid_rows, out_dir / "world_model_grid.png", labels=grid_labels)
        plots.horizon_curves(curves, out_dir / "world_model.png")
        wm["mean"] = {
            "one_step_psnr": _mean_finite([wm[t]["one_step"]["psnr"] for t in tasks]),
            "one_step_ssim": float(np.mean([wm[t]["one_step"]["ssim"] for t in tasks])),
            "copy_last_psnr": _mean_finite([wm[t]["one_step"]["copy_last_psnr"] for t in tasks]),
            "copy_last_ssim": float(np.mean([wm[t]["one_step"]["copy_last_ssim"] for t in tasks])),
            "vqgan_recon_psnr": _mean_finite([wm[t]["one_step"]["vqgan_recon_psnr"] for t in tasks]),
            "code_accuracy": float(np.mean([wm[t]["one_step"]["code_accuracy"] for t in tasks])),
            "copy_last_code_accuracy": float(np.mean([wm[t]["one_step"]["copy_last_code_accuracy"] for t in tasks])),
            "vqgan_recon_ssim": float(np.mean([wm[t]["one_step"]["vqgan_recon_ssim"] for t in tasks])),
            "multi_step_psnr": _mean_finite([wm[t]["multi_step"]["psnr"] for t in tasks]),
            "multi_step_ssim": float(np.mean([wm[t]["multi_step"]["ssim"] for t in tasks])),
        }
        if wm_action_only:
            wm["action_only"] = True  # the policy's model never saw a world-model sample
        metrics["world_model"] = wm
    if rates:
        cols = {**metrics["variants"], **({"random": metrics["random"]} if "random" in metrics else {})}
        plots.success_bars(rates, out_dir / "success.png",
                           intervals={c: {**{t: cols[c]["tasks"][t]["ci95"] for t in tasks},
                                          "mean": cols[c]["success_ci95"]} for c in rates})
    metrics["complete"] = True
    write_metrics()
    return metrics


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name).strip("_") or "policy"


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def _jsonable(d):
    return json.loads(json.dumps(d, default=_json_default))


def format_results(metrics: dict) -> str:
    """A plain-text table of success rates (per variant and random) and world-model scores."""
    tasks = metrics["tasks"]
    # (heading, results) per column: the baseline's by its own key, so that a variant may be called 'random'
    # when there is no baseline (`evaluate` refuses the name beside it).
    columns = list(metrics.get("variants", {}).items()) + ([("random", metrics["random"])] if "random" in metrics
                                                           else [])
    cols, summaries = [c for c, _ in columns], [v for _, v in columns]

    def rate(v, task):
        t = v["tasks"].get(task)
        if t is None:  # an evaluation stopped before this closed loop (metrics.json "complete": false)
            return "not run"
        return f"{t['success_rate']:.0%} ({t['successes']}/{t['episodes']})"

    def mean(v, w):
        return f"{v['success_rate']:>{w}.0%}" if "success_rate" in v else f"{'-':>{w}}"

    w0 = max([len("task")] + [len(t) for t in tasks] + [len("mean")])
    widths = [max(len(c), 12) for c in cols]
    lines = ["closed-loop success (Meta-World, held-out layouts)"
             + (" -- incomplete: the evaluation stopped; the same command finishes it"
                if metrics.get("complete") is False else ""),
             "  ".join([f"{'task':<{w0}}"] + [f"{c:>{w}}" for c, w in zip(cols, widths)])]
    for t in tasks:
        lines.append("  ".join([f"{t:<{w0}}"] + [f"{rate(v, t):>{w}}" for v, w in zip(summaries, widths)]))
    lines.append("  ".join([f"{'mean':<{w0}}"] + [mean(v, w) for v, w in zip(summaries, widths)]))
    cis = [v.get("success_ci95") for v in summaries]
    if cis and all(cis):
        lines.append("  ".join([f"{'95% CI':<{w0}}"] + [f"{f'{lo:.0%}-{hi:.0%}':>{w}}" for (lo, hi), w in zip(cis, widths)])
                     + "  (Wilson, all episodes pooled)")
    for c in metrics.get("variants", {}):
        ended = {t: metrics["variants"][c]["tasks"][t].get("ended_without_action", 0) for t in tasks
                 if t in metrics["variants"][c]["tasks"]}
        if any(ended.values()):
            lines.append(f"{c}: episodes failed on a chunk without an action (the model wrote none): "
                         + ", ".join(f"{t.replace('-v3', '')} {n}" for t, n in ended.items() if n))
        lat = metrics["variants"][c].get("latency_median_s")
        if lat is not None:
            lines.append(f"{c}: {lat * 1000:.0f} ms per action-chunk query (each task's median, mean over tasks; "
                         f"batched over the envs)")
    wm = metrics.get("world_model")
    if wm:
        m = wm["mean"]
        f = lambda x: "n/a" if x is None else f"{x:.2f}"  # noqa: E731
        lines.append("world model (held-out expert rollouts)        PSNR dB    SSIM")
        if wm.get("action_only"):
            lines.append("  (trained on action samples only: an untrained world model's scores)")
        lines.append(f"  next frame, predicted                       {f(m['one_step_psnr']):>7}  {m['one_step_ssim']:.3f}")
        lines.append(f"  next frame = current frame (reference)      {f(m['copy_last_psnr']):>7}  {m['copy_last_ssim']:.3f}")
        lines.append(f"  VQGAN reconstruction (every code right)     {f(m['vqgan_recon_psnr']):>7}  {m['vqgan_recon_ssim']:.3f}")
        # The horizon is per task: an expert that finishes early leaves its task fewer steps to imagine.
        horizons = {t: wm[t]["multi_step"]["horizon"] for t in tasks if t in wm}
        if len(set(horizons.values())) == 1:
            label = f"imagined {next(iter(horizons.values()))}-step rollout, mean over steps"
        else:
            label = "imagined rollouts, mean over steps"
        lines.append(f"  {label:<44}{f(m['multi_step_psnr']):>7}  {m['multi_step_ssim']:.3f}")
        if len(set(horizons.values())) > 1:
            lines.append("    imagined steps per task: "
                         + ", ".join(f"{t.replace('-v3', '')} {h}" for t, h in horizons.items()))
        if m.get("code_accuracy") is not None:
            lines.append(f"  next-frame VQ codes predicted exactly: {m['code_accuracy']:.1%} "
                         f"(current frame's codes kept: {m['copy_last_code_accuracy']:.1%})")
    return "\n".join(lines)


# ---------------------------------------------------------------------- command line
def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from ..sim.metaworld_env import CAMERAS

    parser.add_argument("--policy", nargs="+", action="extend", required=True,
                        help=f"{POLICY_FOLDER_HELP}; several (or --policy given again) = variants compared")
    parser.add_argument("--names", default=None,
                        help="comma-separated variant names (default: the policy folders' names, a run's policy/ "
                             "by its run's, and parent folders' where names are the same: run1/policy run2/policy "
                             "-> run1, run2); 'random' is the random baseline's unless --no-random")
    parser.add_argument("--tasks", action="append", required=True,
                        help="comma-separated Meta-World tasks, e.g. drawer-open-v3,door-open-v3, or 'all' (as "
                             "`worldvla collect`; given again: its tasks are added)")
    parser.add_argument("--episodes", type=positive_int, default=10, help="closed-loop episodes per task (default: %(default)s)")
    parser.add_argument("--out", required=True, help="output folder: metrics.json, success.png, world_model*.png, GIFs")
    parser.add_argument("--max-steps", type=positive_int, default=200,
                        help=f"episode step limit, at most {MAX_EPISODE_STEPS} (Meta-World's own; "
                             "default: %(default)s)")
    parser.add_argument("--envs", type=positive_int, default=4, help="envs run in lockstep with batched queries (default: %(default)s)")
    parser.add_argument("--env-workers", type=positive_int, default=2,
                        help="processes the envs step in, side by side (1 = in this process; default: %(default)s)")
    parser.add_argument("--seed", type=seed32, default=0,
                        help="evaluation seed in [0, 2**32) (layouts are derived from it; default: %(default)s)")
    parser.add_argument("--no-random", action="store_true", help="skip the random-policy (chance) baseline")
    parser.add_argument("--wm-episodes", type=non_negative_int, default=2,
                        help="held-out expert rollouts per task for the world-model metrics (0 = skip; "
                             "default: %(default)s)")
    parser.add_argument("--wm-horizon", type=positive_int, default=8, help="imagined steps per rollout (default: %(default)s)")
    parser.add_argument("--add-causal-variant", "--no-chunk-mask-variant", dest="causal_variant",
                        action="store_true",
                        help="also evaluate each chunk-mask policy decoding its chunks with plain causal attention, "
                             "as an extra variant '<name> (no chunk mask)' (the chunk-mask ablation at inference)")
    parser.add_argument("--device", default=None, help="torch device (default: the policy's default)")
    parser.add_argument("--execute", type=positive_int, default=None, metavar="N",
                        help="run only the first N actions of each predicted chunk before asking again (receding "
                             "horizon; default: the whole chunk, as the release). Random baseline included")
    parser.add_argument("--no-resume", action="store_true",
                        help="rerun every closed loop, even those saved under OUT/runs/ by an earlier run with the "
                             "same policy files and settings")
    parser.add_argument("--camera", default=None, choices=CAMERAS,
                        help="Meta-World camera to render from (default: the one the policy's demonstrations were "
                             "collected with, recorded at training; corner for policies without one)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def run(args: argparse.Namespace) -> int:
    given = ",".join([args.tasks] if isinstance(args.tasks, str) else args.tasks)  # --tasks may be given again
    tasks = [t.strip() for t in given.split(",") if t.strip()]
    tasks = [x for t in tasks for x in (TASKS if t == "all" else [t])]  # evaluate() runs a task named twice once
    if not tasks:
        print(f"worldvla eval: --tasks {given!r} names no task; pass Meta-World tasks, e.g. "
              f"--tasks drawer-open-v3,door-open-v3", file=sys.stderr)
        return 2
    check_tasks(tasks)  # a typo is named before the policy folders are read
    if args.names is not None and not args.names.strip():  # likely an unset shell variable, not "the defaults"
        print(f"worldvla eval: --names {args.names!r} names no variant; give one name per policy, e.g. "
              f"--names joint,action-only, or leave --names out for the policy folders' names", file=sys.stderr)
        return 2
    names = [n.strip() for n in args.names.split(",")] if args.names is not None else None
    if names is not None and len(names) != len(args.policy):
        print(f"worldvla eval: --names has {len(names)} names for {len(args.policy)} policies", file=sys.stderr)
        return 2
    if names is not None and not all(names):
        print(f"worldvla eval: --names {args.names!r} holds an empty name; give one name per policy, e.g. "
              f"--names joint,action-only", file=sys.stderr)
        return 2
    from ..checkpoint import check_folder

    # `~` expanded here too: the saved closed loops are keyed by the folder's files (`_policy_fingerprint`).
    args.policy = [str(check_folder(p, "policy")) for p in args.policy]  # nothing there, a model folder...: named
    for p in args.policy:
        if not (Path(p) / "policy.json").is_file():
            print(f"worldvla eval: {p} is not a policy folder (no policy.json); train one with `worldvla train` "
                  f"or `worldvla demo`", file=sys.stderr)
            return 2
    for p in args.policy:
        note = unseen_tasks_note(p, tasks)
        if note:
            print(note, file=sys.stderr)
    metrics = evaluate(args.policy, tasks, args.episodes, args.out, seed=args.seed, max_steps=args.max_steps,
                       n_envs=args.envs, random_baseline=not args.no_random, wm_episodes=args.wm_episodes,
                       wm_horizon=args.wm_horizon, progress=not args.no_progress, variant_names=names,
                       device=args.device, causal_variant=args.causal_variant, env_workers=args.env_workers,
                       resume=not args.no_resume, execute=args.execute, camera=args.camera)
    print(format_results(metrics))
    print(f"-> {Path(args.out) / 'metrics.json'}")
    return 0


def unseen_tasks_note(policy_dir, tasks) -> str | None:
    """A line naming the tasks whose instruction the policy was not trained on, where its policy.json records
    the instructions of its demonstrations (`worldvla train` does): their success rates measure generalization
    to new tasks, not what was learned. None where every task was seen, or the policy does not say."""
    from ..sim.metaworld_env import TASKS

    try:
        seen = json.loads((Path(policy_dir) / "policy.json").read_text()).get("extra", {}).get("instructions")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(seen, list) or not seen:
        return None
    unseen = [t for t in tasks if TASKS.get(t) not in seen]
    if not unseen:
        return None
    return (f"note: {policy_dir} was trained on {len(seen)} instruction(s) ({'; '.join(map(repr, seen[:3]))}"
            f"{'; ...' if len(seen) > 3 else ''}), not on those of {', '.join(unseen)}: their success rates measure "
            f"how it carries over to tasks it never saw")


__all__ = ["closed_loop", "check_execute", "check_tasks", "RandomPolicy", "eval_seeds", "expert_rollouts",
           "world_model_metrics", "action_only", "evaluate", "default_variant_names", "format_results", "TaskResult",
           "add_arguments", "run"]
