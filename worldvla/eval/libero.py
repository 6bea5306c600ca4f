"""LIBERO evaluation following the release's protocol (spec section 6).

Per suite and task: `episodes` episodes (50 in the paper) starting from the suite's
fixed initial states, `env.seed(0)`; each episode

1. runs `max_steps + 10` env steps at most (spatial 220, object 280, goal 300, libero_10 520),
2. spends the first 10 steps on the dummy action [0, 0, 0, 0, 0, 0, -1] so objects settle,
3. reads `obs["agentview_image"][::-1, ::-1]` (LIBERO renders upside down; no resize),
4. when the action queue is empty asks the policy for a chunk from the previous env
   step's frame and the current frame (the current one only on the first query),
5. executes the whole chunk open-loop, one action per step, de-normalized with the
   fixed LIBERO bounds, gripper value passed through unchanged,
6. counts success when the env reports `done`; any exception ends the episode as a failure
   (`worldvla eval-libero` counts and names such episodes per task, and exits 1 when all of them erred).

LIBERO itself (with robosuite and its assets) is an optional dependency; the harness
takes any suite object with the small interface of `LiberoSuite`, which is how the
tests drive it with a stand-in environment.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from ..checkpoint import write_text_atomic
from ..cli import POLICY_FOLDER_HELP, POLICY_MODE_CHOICES, positive_int
from .rollout import ChunkQuery
from ..checks import is_count, is_integer

MAX_STEPS = {"libero_spatial": 220, "libero_object": 280, "libero_goal": 300, "libero_10": 520}
SETTLE_STEPS = 10
DUMMY_ACTION = (0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -1.0)
ACTION_DIM = 7
_INSTALL_HINT = (
    "LIBERO is not installed. `worldvla eval-libero` needs LIBERO and robosuite with their scene assets: "
    "git clone https://github.com/Lifelong-Robot-Learning/LIBERO && pip install -e LIBERO "
    "(it pulls robosuite; the PyPI package lacks the assets). Then rerun this command."
)


def _check_libero_config() -> None:
    """LIBERO's `libero.libero` asks on the terminal (`input()`) where to keep its datasets when its config file
    is missing, on its first import: a batch job hangs there or dies with EOFError. Refuse before importing it."""
    if "libero.libero" in sys.modules:  # imported already: the config is there
        return
    # Where LIBERO looks (libero/libero/__init__.py): $LIBERO_CONFIG_PATH, else ~/.libero.
    folder = os.environ.get("LIBERO_CONFIG_PATH", os.path.expanduser("~/.libero"))
    config = os.path.join(folder, "config.yaml")
    if not os.path.isfile(config):
        raise FileNotFoundError(
            f"LIBERO's config file {config} is missing; LIBERO would ask for it on the terminal, which this run "
            "cannot answer. Create it once in a terminal: python -c 'import libero.libero' (answer N to keep the "
            "datasets in the LIBERO checkout), or set LIBERO_CONFIG_PATH to a folder holding a config.yaml. "
            "Then rerun this command.")


def _require_libero() -> None:
    """Import `libero.libero` (which reads LIBERO's config file on import), refusing first what would make that fail
    or hang: LIBERO not installed (the install hint) or its config file missing (`_check_libero_config`). Checked
    until it is imported, not after: `run` imports it before the policy loads, and its `LiberoSuite` finds it."""
    if "libero.libero" in sys.modules:
        return
    try:
        importlib.import_module("libero")  # the package alone: its libero.libero reads the config on import
    except ImportError as e:
        raise ImportError(f"{_INSTALL_HINT} ({e})") from e
    _check_libero_config()
    try:
        importlib.import_module("libero.libero")
    except ImportError as e:
        raise ImportError(f"{_INSTALL_HINT} ({e})") from e


class LiberoSuite:
    """One LIBERO benchmark suite: tasks, their fixed initial states and environments."""

    def __init__(self, name: str, resolution: int = 256):
        if name not in MAX_STEPS:
            raise ValueError(f"unknown LIBERO suite {name!r}; choose one of {', '.join(MAX_STEPS)}")
        _require_libero()
        try:
            from libero.libero import benchmark, get_libero_path
            from libero.libero.envs import OffScreenRenderEnv
        except ImportError as e:
            raise ImportError(f"{_INSTALL_HINT} ({e})") from e
        self.name = name
        self.resolution = int(resolution)
        self._suite = benchmark.get_benchmark_dict()[name]()
        self._bddl_root = get_libero_path("bddl_files")
        self._env_cls = OffScreenRenderEnv
        self.max_steps = MAX_STEPS[name]

    @property
    def n_tasks(self) -> int:
        return self._suite.n_tasks

    def instruction(self, task_id: int) -> str:
        return self._suite.get_task(task_id).language

    def init_states(self, task_id: int):
        return self._suite.get_task_init_states(task_id)

    def make_env(self, task_id: int):
        task = self._suite.get_task(task_id)
        bddl = os.path.join(self._bddl_root, task.problem_folder, task.bddl_file)
        env = self._env_cls(bddl_file_name=bddl, camera_heights=self.resolution, camera_widths=self.resolution)
        env.seed(0)
        return env


def upright(obs) -> np.ndarray:
    """The release's view of LIBERO's agent camera: rotated by 180 degrees."""
    return np.ascontiguousarray(np.asarray(obs["agentview_image"])[::-1, ::-1])


def run_episode(env, policy, query: ChunkQuery, instruction: str, init_state, max_steps: int,
                settle_steps: int = SETTLE_STEPS, record: bool = False) -> dict:
    """One episode of the release's loop; returns success, steps, queries, error, no_action and (if
    `record`) the upright frames the policy saw. `steps`: the env steps taken by policy actions
    (the settle steps left out), whether the episode succeeds, runs out or fails on an error.
    `no_action`: a query yielded no action (mode='release': the model wrote none), which fails the
    episode as the release's loop does, without an error."""
    from ..inference.policy import NoActionWritten

    queue: list[np.ndarray] = []
    previous: np.ndarray | None = None  # the frame of the step before: all of the history the release reads
    frames: list[np.ndarray] = []
    t, steps, queries, success, error, no_action = 0, 0, 0, False, None, False
    try:
        # Inside the try: a reset that fails (a bad initial state, a crashed simulator) fails this episode, with
        # its error recorded, not the whole evaluation. KeyboardInterrupt is no Exception: it still stops the run.
        policy.reset(instruction)
        env.reset()
        obs = env.set_init_state(init_state)
        while t < max_steps + settle_steps:
            if t < settle_steps:
                obs, _, done, _ = env.step(list(DUMMY_ACTION))
                t += 1
                continue
            img = upright(obs)
            if record:
                frames.append(img)
            if not queue:
                chunk = query(img, previous)
                if chunk.shape[-1] != ACTION_DIM:
                    raise ValueError(f"the policy returned {chunk.shape[-1]}-D actions; LIBERO needs {ACTION_DIM}")
                queue.extend(chunk)
                queries += 1
            action = queue.pop(0)
            obs, _, done, _ = env.step(np.asarray(action, dtype=np.float64).tolist())
            steps += 1
            previous = img
            if done:
                success = True
                break
            t += 1
    except NoActionWritten:  # the task failed, not the policy or the simulator: a rerun would repeat it
        no_action = True
    except Exception as e:  # noqa: BLE001  (the release ends the episode as a failure)
        error = f"{type(e).__name__}: {e}"
    return {"success": success, "steps": steps, "queries": queries, "error": error, "no_action": no_action,
            "frames": frames}


def check_bounds(policy, allow_mismatch: bool = False) -> None:
    """The release de-normalizes with fixed LIBERO bounds; a policy trained with other
    bounds would execute wrongly scaled actions."""
    from ..tokens.actions import LIBERO_MAX, LIBERO_MIN

    meta = policy.metadata() if hasattr(policy, "metadata") else {}
    low, high = meta.get("action_low"), meta.get("action_high")
    if getattr(policy, "action_dim", ACTION_DIM) != ACTION_DIM:
        raise ValueError(f"this policy emits {policy.action_dim}-D actions; LIBERO policies emit {ACTION_DIM}-D "
                         "[dx, dy, dz, drx, dry, drz, gripper]. Evaluate a policy trained on LIBERO data.")
    if allow_mismatch:
        return
    # A bound the metadata leaves out is not checked; one it names must be the release's.
    def same(bound, fixed) -> bool:  # bounds of another length are other bounds, not a numpy broadcast error
        return bound is None or (np.shape(bound) == np.shape(fixed) and np.allclose(bound, fixed, atol=1e-6))

    if not (same(low, LIBERO_MIN) and same(high, LIBERO_MAX)):
        raise ValueError(f"the policy de-normalizes with bounds low={low} high={high}, not the release's fixed "
                         f"LIBERO bounds low={list(LIBERO_MIN)} high={list(LIBERO_MAX)}; retrain with the LIBERO "
                         "bounds or pass --allow-bounds-mismatch")


RESULTS = "libero_results.json"


def _results_key(suite, policy, fp: str | None) -> str | None:
    """What an episode's outcome depends on: the policy's files (`fp`, their fingerprint) and metadata, the
    suite and its camera size. None (no reuse) without a policy folder's fingerprint."""
    from .metaworld import _jsonable

    if fp is None:
        return None
    meta = _jsonable(policy.metadata()) if hasattr(policy, "metadata") else None
    # "steps" names what an episode's steps count, so no earlier count of another kind is merged in.
    blob = json.dumps({"policy": fp, "metadata": meta, "suite": getattr(suite, "name", "custom"),
                       "resolution": getattr(suite, "resolution", None), "max_steps": suite.max_steps,
                       "steps": "policy actions"}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _archive(out_dir: Path, key: str) -> Path:
    """Every episode run into `out_dir` under `key`: one file per key, so that another policy's (or suite's)
    run into the same folder leaves them for a later rerun to reuse."""
    return out_dir / "runs" / f"{key[:16]}.json"


def _saved_tasks(out_dir: Path, key: str | None) -> dict:
    """The per-task episode records of earlier runs with the same key ({} when there is none)."""
    if key is None:
        return {}
    # libero_results.json: a folder written before the per-key files
    for path in (_archive(out_dir, key), out_dir / RESULTS):
        try:
            saved = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(saved, dict) and saved.get("key") == key:  # other JSON (a list, null) holds no episodes
            return saved.get("tasks", {})
    return {}


def _task_summary(instruction: str, success: list, steps: list, errors: list, no_action: list) -> dict:
    """One task's entry from its per-episode records (errors: None or the episode's error; no_action: whether it
    ended on a query that yielded no action)."""
    n = len(success)
    return {"instruction": instruction, "successes": int(sum(success)), "episodes": n,
            "success_rate": sum(success) / max(n, 1), "mean_steps": float(np.mean(steps)) if steps else 0.0,
            "errors": [f"episode {ep}: {e}" for ep, e in enumerate(errors) if e],
            "ended_without_action": int(sum(no_action)),
            "episode_success": [bool(x) for x in success], "episode_steps": [int(x) for x in steps],
            "episode_errors": errors, "episode_no_action": [bool(x) for x in no_action]}


def _task_ids(tasks) -> list[int]:
    """`tasks` (ids, or one string of ids separated by commas as --tasks takes them) as ints. A string is not
    iterated ("12" would be tasks 1 and 2), and an id that is not a whole number is refused, not cut to another."""
    if isinstance(tasks, str):
        tasks = [t.strip() for t in tasks.split(",") if t.strip()]
    try:
        tasks = list(tasks)
    except TypeError:
        raise ValueError(f"tasks must be a list of task ids like [0, 3, 7] (or the string '0,3,7'), got {tasks!r}") \
            from None
    # isdecimal, not isdigit: int() refuses digits such as '²'
    bad = [t for t in tasks if not (is_integer(t) or (isinstance(t, str) and t.strip().isdecimal()))]
    if bad:
        raise ValueError(f"task ids must be whole numbers like 0, 3, 7; got {', '.join(map(repr, bad))}")
    return [int(t) for t in tasks]


def evaluate_suite(policy, suite, episodes: int = 50, tasks=None, out_dir=None, save_videos: bool = False,
                   allow_bounds_mismatch: bool = False, progress: bool = True, policy_path=None,
                   resume: bool = True, policy_fingerprint: str | None = None) -> dict:
    """Success rates of `policy` on `suite` (a `LiberoSuite` or an object with its interface), over the
    first `episodes` episodes of each of `tasks`. An episode's `steps` are the env steps its policy
    actions took (the settle steps left out).

    With `out_dir`, `libero_results.json` is rewritten atomically after every episode (`"complete":
    false` until the end). With `policy_path` (the policy's folder) every episode run with the same policy
    files, suite and camera size is kept (in `out_dir/runs/<key>.json`, which another policy's run into the
    same folder leaves in place) and the file shows them: this run's, and earlier runs' of other tasks or beyond
    `episodes` (its `tasks` then hold more than this run reports; `run_tasks`, `episodes_per_task` and
    `success_rate` are this run's). With `resume`, a rerun reuses the saved episodes it asks for and runs
    only the missing ones (and, from the first saved episode that ended on an error, the rest again): every
    episode starts from its task's fixed initial state. The folder is fingerprinted
    here unless `policy_fingerprint` gives the fingerprint taken before `policy` loaded from it (the command's
    way: a new export that replaced the folder meanwhile must not have the loaded weights' episodes saved as
    its own)."""
    from .metaworld import _policy_fingerprint

    check_bounds(policy, allow_bounds_mismatch)
    # A task named twice runs once (it would count twice in the suite's rate otherwise).
    task_ids = list(range(suite.n_tasks)) if tasks is None else list(dict.fromkeys(_task_ids(tasks)))
    bad = [t for t in task_ids if not 0 <= t < suite.n_tasks]
    if bad:
        raise ValueError(f"task ids {bad} are outside this suite's 0..{suite.n_tasks - 1}")
    if not task_ids:
        raise ValueError("no LIBERO tasks to evaluate: --tasks names none")
    if save_videos and out_dir is None:  # the GIFs would go nowhere, silently
        raise ValueError("save_videos=True needs out_dir, the folder the GIFs are written to")
    if not is_count(episodes, 1):
        raise ValueError(f"episodes must be >= 1, got {episodes!r}; give a whole number of episodes per task")
    # Checked before the first episode, not when the task comes up (possibly hours into the run); read once, here.
    states = {t: suite.init_states(t) for t in task_ids}
    short = {t: len(s) for t, s in states.items() if len(s) < episodes}
    if short:
        raise ValueError(f"--episodes {episodes} needs as many initial states per task; "
                         + ", ".join(f"task {t} has {n}" for t, n in short.items()))
    out_dir = Path(out_dir) if out_dir is not None else None
    if policy_fingerprint is None and policy_path is not None:
        policy_fingerprint = _policy_fingerprint(policy_path)
    key = _results_key(suite, policy, policy_fingerprint)
    saved = {}
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        # Read even without `resume`: the tasks and episodes this run does not redo stay in the file.
        saved = _saved_tasks(out_dir, key)
    query = ChunkQuery(policy)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(task_ids) * episodes, desc=f"eval {getattr(suite, 'name', 'libero')}", unit="ep")
    results = {"suite": getattr(suite, "name", "custom"), "episodes_per_task": episodes, "key": key,
               "complete": False, "tasks": {}}
    kept = dict(saved)  # every saved episode, with this run's merged in: what the file holds
    t_start = time.perf_counter()

    def write_results() -> None:
        if out_dir is None:
            return
        tasks_kept = dict(sorted(kept.items(), key=lambda kv: int(kv[0])))
        write_text_atomic(out_dir / RESULTS, json.dumps({**results, "run_tasks": task_ids, "tasks": tasks_kept},
                                                        indent=2))
        if key is not None:
            _archive(out_dir, key).parent.mkdir(exist_ok=True)
            write_text_atomic(_archive(out_dir, key), json.dumps({"key": key, "tasks": tasks_kept}))

    try:
        for task_id in task_ids:
            instruction = suite.instruction(task_id)
            old = saved.get(str(task_id), {})
            runs = [list(old.get(k, [])) for k in ("episode_success", "episode_steps", "episode_errors")]
            n = min(len(r) for r in runs)
            success, steps, errors = (r[:n] for r in runs)
            no_action = list(old.get("episode_no_action", []))[:n]  # absent from files written before it was kept
            no_action += [False] * (n - len(no_action))
            start = min(n, episodes) if resume else 0  # saved episodes reused, up to what is asked
            # ... up to the first that ended on an error (the policy or the simulator failed, not the task): it and
            # those after it run again.
            start = next((i for i in range(start) if errors[i]), start)
            if bar is not None:
                bar.update(start)
            results["tasks"][str(task_id)] = _task_summary(instruction, success[:start], steps[:start],
                                                           errors[:start], no_action[:start])
            if start == episodes:
                continue
            init_states = states[task_id]
            env = suite.make_env(task_id)
            try:
                for ep in range(start, episodes):
                    r = run_episode(env, policy, query, instruction, init_states[ep], suite.max_steps,
                                    record=save_videos and out_dir is not None)
                    for lst, v in ((success, r["success"]), (steps, r["steps"]), (errors, r["error"]),
                                   (no_action, r["no_action"])):
                        if ep < len(lst):  # without resume: a saved episode run again
                            lst[ep] = v
                        else:
                            lst.append(v)
                    kept[str(task_id)] = _task_summary(instruction, success, steps, errors, no_action)
                    results["tasks"][str(task_id)] = _task_summary(instruction, success[:ep + 1], steps[:ep + 1],
                                                                   errors[:ep + 1], no_action[:ep + 1])
                    if save_videos and out_dir is not None:
                        # An earlier run's GIF of the other outcome would stand beside this one as current.
                        gif = {tag: out_dir / f"task{task_id:02d}_ep{ep:03d}_{tag}.gif"
                               for tag in ("success", "failure")}
                        for path in gif.values():
                            path.unlink(missing_ok=True)
                        if r["frames"]:
                            from .plots import save_gif

                            save_gif(r["frames"], gif["success" if r["success"] else "failure"], fps=20)
                    write_results()
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(task=task_id, sr=f"{sum(success[:ep + 1]) / (ep + 1):.0%}")
            finally:
                if hasattr(env, "close"):
                    env.close()
    finally:
        if bar is not None:
            bar.close()
    total_ok = sum(t["successes"] for t in results["tasks"].values())
    results["success_rate"] = total_ok / (len(task_ids) * episodes)
    results["latency"] = query.latency_summary()
    results["seconds"] = time.perf_counter() - t_start
    results["complete"] = True
    write_results()
    return results


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--policy", required=True, help=POLICY_FOLDER_HELP)
    parser.add_argument("--suite", default="libero_spatial", choices=sorted(MAX_STEPS),
                        help="LIBERO suite; step limits spatial 220, object 280, goal 300, libero_10 520 "
                             "(default: %(default)s)")
    parser.add_argument("--tasks", action="append", default=None,
                        help="comma-separated task ids; given again, its ids are added (default: all 10)")
    parser.add_argument("--episodes", type=positive_int, default=50,
                        help="episodes per task (the paper: 50; default: %(default)s)")
    parser.add_argument("--resolution", type=positive_int, default=None,
                        help="camera size in pixels (default: the policy's image size; the release: 256 or 512)")
    parser.add_argument("--out", default="libero_eval",
                        help="folder for libero_results.json, rewritten after every episode (and --save-videos GIFs); "
                             "a rerun into it reuses the episodes already run with the same policy files and suite, "
                             "and keeps those of other tasks and beyond --episodes (default: ./%(default)s)")
    parser.add_argument("--no-resume", action="store_true",
                        help="run the asked episodes again, even those saved in OUT by an earlier run")
    parser.add_argument("--save-videos", action="store_true",
                        help="one GIF per episode in --out, taskTT_epEEE_success.gif or _failure.gif (an episode "
                             "run again replaces its earlier GIF, whichever the outcome)")
    parser.add_argument("--device", default=None, help="torch device of the policy (default: cuda if available)")
    parser.add_argument("--allow-bounds-mismatch", action="store_true",
                        help="evaluate a policy whose action bounds differ from the fixed LIBERO bounds")
    parser.add_argument("--mode", default=None, choices=POLICY_MODE_CHOICES,
                        help="chunk decoding (default: parallel, or causal for a model trained without the chunk "
                             "mask); 'release' decodes as the release's "
                             "evaluation does (free greedy over the whole vocabulary, every action block the model "
                             "writes executed; an episode whose query yields none fails, as there)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def run(args: argparse.Namespace) -> int:
    if not args.out:  # before LIBERO loads: the episodes (and GIFs) would go nowhere
        raise ValueError("--out names no folder: give --out FOLDER (the results are saved there after every episode)")
    try:
        _require_libero()  # before the policy loads
    except ImportError as e:
        print(f"worldvla eval-libero: {e}", file=sys.stderr)
        return 2
    from ..inference import WorldVLAPolicy

    given = None if args.tasks is None else ",".join([args.tasks] if isinstance(args.tasks, str) else args.tasks)
    tasks = None if given is None else [t.strip() for t in given.split(",") if t.strip()]
    if tasks is not None and not all(t.isdecimal() for t in tasks):  # int() refuses some digits ('²')
        raise ValueError(f"--tasks takes comma-separated task ids like 0,3,7, got {given!r}")
    from .metaworld import _policy_fingerprint

    fingerprint = _policy_fingerprint(Path(args.policy).expanduser())  # before it loads: see evaluate_suite
    policy = WorldVLAPolicy.from_pretrained(args.policy, device=args.device,
                                            **({} if args.mode is None else {"mode": args.mode}))
    suite = LiberoSuite(args.suite, resolution=args.resolution or policy.image_size)
    mode = getattr(policy, "mode", None)
    if mode is not None and mode != "release":  # the default: say that the numbers are this decoding's
        print(f"decoding: {mode} (each chunk's action structure forced, every bin chosen among the bin ids); "
              f"--mode release decodes as the release's evaluation does, for success rates comparable with its own")
    res = evaluate_suite(policy, suite, episodes=args.episodes, tasks=tasks, out_dir=args.out,
                         save_videos=args.save_videos, allow_bounds_mismatch=args.allow_bounds_mismatch,
                         progress=not args.no_progress, policy_path=Path(args.policy).expanduser(),
                         resume=not args.no_resume, policy_fingerprint=fingerprint)
    errored, first = 0, None
    for tid, r in res["tasks"].items():
        print(f"task {tid:>2}  {r['success_rate']:6.1%}  {r['instruction']}")
        errors = r.get("errors") or []
        if errors:  # counted as failures, as the release does; named, so a broken policy or sim is not taken for one
            print(f"task {tid:>2}  {len(errors)} of {r['episodes']} episodes ended on an error (counted as "
                  f"failures); first: {errors[0]}")
            errored += len(errors)
            first = first or f"task {tid}, {errors[0]}"
        if r.get("ended_without_action"):
            print(f"task {tid:>2}  {r['ended_without_action']} of {r['episodes']} episodes failed on a query that "
                  f"yielded no action (the model wrote no action block, as mode='release' allows)")
    print(f"{res['suite']}: {res['success_rate']:.1%} over {len(res['tasks'])} tasks x {args.episodes} episodes"
          + (f"; {errored} episodes ended on an error (see {Path(args.out) / RESULTS})" if errored else ""))
    total = sum(r["episodes"] for r in res["tasks"].values())
    if total and errored == total:
        print(f"worldvla eval-libero: every episode ended on an error, so the success rate measures the error, not "
              f"the policy (first: {first}). Fix the error and run the command again: it reruns the episodes "
              f"that ended on an error.", file=sys.stderr)
        return 1
    return 0


__all__ = ["MAX_STEPS", "SETTLE_STEPS", "DUMMY_ACTION", "LiberoSuite", "run_episode", "evaluate_suite", "upright"]
