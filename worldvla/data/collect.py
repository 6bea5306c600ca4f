"""Collect scripted-expert demonstrations from Meta-World into HDF5 files.

One file per task (`<out_dir>/<task>.hdf5`, layout in `worldvla.data.hdf5`), holding
only successful episodes. Episodes run in worker processes, one (task, episode)
job at a time; a failed episode is retried with a fresh layout seed up to
`max_attempts` times. Every seed derives from (seed, task, episode, attempt), so a
rerun reproduces the same files. Tasks whose file already holds the requested
episodes with the same settings are skipped, so an interrupted run resumes; a file
holding more episodes than asked for is cut to its first n (the episodes a fresh run
of n collects, since an episode's seeds do not depend on n), so the files always hold
what was asked for; a file holding fewer keeps those it holds and only the missing
episodes run. A task file collected with other settings, or one that cannot be read as a
demo file (another tool's, or damaged), is replaced only with --overwrite; one another
process is writing, never.
"""
from __future__ import annotations

import argparse
import contextlib
import heapq
import multiprocessing as mp
import os
import shlex
import signal
import sys
import threading
import time
import zlib
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np

from ..cli import non_negative_float, positive_int, seed32
from .hdf5 import OWN_ATTRS, demo_file_info, iter_demos, remove_stale_temps, remove_unfinished_writes, write_demos

# Meta-World's MT10 set.
DEFAULT_TASKS = (
    "reach-v3", "push-v3", "pick-place-v3", "door-open-v3", "drawer-open-v3",
    "drawer-close-v3", "button-press-topdown-v3", "peg-insert-side-v3", "window-open-v3", "window-close-v3",
)
CAMERA_KEY = "agentview"  # the HDF5 key the frames are stored under, whichever sim camera rendered them


def episode_seed(seed: int, task: str, episode: int, attempt: int) -> int:
    """The layout/noise seed of one attempt at one episode; stable across runs and machines."""
    ss = np.random.SeedSequence([seed & 0xFFFFFFFF, zlib.crc32(task.encode()), episode, attempt])
    return int(ss.generate_state(1)[0] & 0x7FFFFFFF)


# One env per (task, settings) per process: building one costs ~0.3-2 s, an episode ~0.5 s.
_ENVS: dict = {}


def _get_env(task: str, image_size: int, camera: str, max_steps: int):
    from ..sim.metaworld_env import make_env

    key = (task, image_size, camera, max_steps)
    if key not in _ENVS:
        _ENVS[key] = make_env(task, seed=0, image_size=image_size, camera=camera, max_steps=max_steps)
    return _ENVS[key]


def _close_envs() -> None:
    while _ENVS:
        _, env = _ENVS.popitem()
        env.close()


def run_episode(job: dict) -> dict:
    """Roll out the scripted expert (plus optional Gaussian action noise) for one job."""
    from ..sim.metaworld_env import expert_policy

    t_setup = time.perf_counter()
    env = _get_env(job["task"], job["image_size"], job["camera"], job["max_steps"])
    policy = expert_policy(job["task"])
    t0 = time.perf_counter()
    rng = np.random.default_rng(job["seed"])
    frame = env.reset(seed=job["seed"])
    frames, actions = [], []
    done = False
    while not done:
        action = policy(env.state)
        if job["noise"] > 0:
            action = np.clip(action + rng.normal(0.0, job["noise"], size=action.shape), -1.0, 1.0)
        frames.append(frame)
        actions.append(action)
        frame, _, _, done = env.step(action)
    return {
        **job,
        "frames": np.stack(frames),
        "actions": np.stack(actions).astype(np.float32),
        "success": env.success,
        "steps": len(actions),
        "seconds": time.perf_counter() - t0,  # the rollout alone
        "setup_seconds": t0 - t_setup,  # building the env (once per task and process)
    }


def _init_worker(parent: int) -> None:
    """A worker process's initializer: Ctrl-C (SIGINT to the terminal's whole process group) is the parent's
    to handle; it stops the pool after the jobs in flight (in the workers it printed a traceback each). And a
    worker ends when the collecting process is gone: killed (SIGKILL, the OOM killer), it left its workers
    running, one blocked writing a result nobody reads, with their memory and the terminal's output held (a
    `| tee` never ended). Their parent is the forkserver, which outlives it, so its pid is watched."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_with, args=(parent,), daemon=True, name="parent-watch").start()


def _exit_with(parent: int, every_s: float = 1.0) -> None:
    while True:
        time.sleep(every_s)
        try:
            os.kill(parent, 0)
        except ProcessLookupError:
            os._exit(1)
        except PermissionError:  # the pid now belongs to another user's process: ours is gone
            os._exit(1)


def _worker_run(job: dict) -> dict:
    try:
        return run_episode(job)
    except Exception as e:  # noqa: BLE001  (reported in the parent with the job that failed)
        return {**job, "error": f"{type(e).__name__}: {e}"}


def _settings(image_size, seed, camera, max_steps, noise) -> dict:
    return {"image_size": int(image_size), "seed": int(seed), "sim_camera": camera,
            "max_steps": int(max_steps), "action_noise": float(noise)}


# The option that sets each recorded setting, to name them when a file was collected with others.
_OPTIONS = {"image_size": "--image-size", "seed": "--seed", "sim_camera": "--camera", "max_steps": "--max-steps",
            "action_noise": "--noise"}


def _written_elsewhere(path: Path) -> BlockingIOError:
    """The refusal of a task file that another process holds open for writing (HDF5's file lock), with --overwrite
    too: replaced under it, the file would lose what that process writes, or that process would overwrite it."""
    return BlockingIOError(f"{path} is open for writing in another process, and collect does not replace a file "
                           f"being written, even with --overwrite; wait for that process to finish or stop it, then "
                           f"run the command again, or choose another --out")


def _existing(path: Path, settings: dict, overwrite: bool = False) -> tuple[dict, list[str]] | None:
    """An existing task file's `demo_file_info` and how its recorded settings differ from `settings` (as options,
    "--seed 0, not 1"; every one if it records none: not this command's file); None when there is no file, or with
    `overwrite` when it cannot be read. Without `overwrite` a file that cannot be read is refused: `write_demos`
    writes whole files, so it is no earlier run's unfinished write but another tool's file (named like a task), or
    one damaged since. A file another process is writing is refused either way (`_written_elsewhere`)."""
    if path.is_dir():  # refused when the task's file was written, after its episodes had run
        raise IsADirectoryError(f"{path} is a folder, where collect writes the task's file; move it away, or choose "
                                f"another --out")
    if not path.is_file():
        return None
    try:
        info = demo_file_info(path)
    except BlockingIOError:
        raise _written_elsewhere(path) from None
    except (ValueError, OSError) as e:
        if overwrite:
            return None
        why = str(e).removeprefix(f"{path}: ")  # the reader's message names the file too
        raise FileExistsError(f"{path} is not a task file collect can read ({why}); it holds no episodes of an "
                              f"earlier run: pass --overwrite to replace it, or choose another --out") from None
    attrs = info["attrs"]
    diff = [f"{_OPTIONS[k]} {attrs[k] if k in attrs else '(none recorded)'}, not {v}" for k, v in settings.items()
            if not (k in attrs and attrs[k] == v)]
    return info, diff


def _is_complete(found, n_episodes: int, settings: dict, task: str, max_attempts: int) -> bool:
    """Whether the file `_existing` found (`found`: what it returned) holds what a fresh run of `n_episodes`
    collects: the same settings, and as its first episodes, episodes 0 .. n-1, each from one of their first
    `max_attempts` attempts, each a success (collect keeps successful episodes only; a failed demo is one another
    writer kept). An earlier run whose episodes failed every attempt kept the others (episodes 0, 1 and 3, say):
    its first demos are not those."""
    if found is None or found[0]["num_demos"] < n_episodes or found[1]:
        return False
    if not all(found[0]["success"][:n_episodes]):
        return False
    seeds = found[0]["attrs"].get("episode_seeds")
    if seeds is None or len(seeds) < n_episodes:
        return False
    return all(int(seeds[e]) in {episode_seed(settings["seed"], task, e, a) for a in range(max_attempts)}
               for e in range(n_episodes))


def _earlier_episodes(path: Path, found, task: str, n_episodes: int, settings: dict,
                      max_attempts: int) -> dict[int, tuple[str, int]]:
    """{episode: (its demo's name, its seed)} of the episodes 0 .. n-1 that the task file `_existing` found
    (`found`) holds from one of their first `max_attempts` attempts with the same settings: the episodes a fresh
    run would collect the same way, kept instead of run again when the file holds too few (a run of fewer
    episodes, or one whose episodes failed every attempt, rerun with more --max-attempts). Empty when it records
    other settings or no episode seeds, or when their frames cannot be read (damaged since: the file records this
    command's settings, so its episodes are collected again)."""
    if found is None or found[1]:
        return {}
    info = found[0]
    seeds = info["attrs"].get("episode_seeds")
    if seeds is None or len(seeds) != info["num_demos"]:
        return {}
    episodes = {episode_seed(settings["seed"], task, e, a): e for e in range(n_episodes) for a in range(max_attempts)}
    earlier = {episodes[int(s)]: (name, int(s)) for name, s, ok in zip(info["names"], seeds, info["success"])
               if ok and int(s) in episodes}
    # Their frames are read once now (and dropped): damage found only when the task's file is written would stop
    # the run there, losing the episodes run since.
    try:
        for _ in iter_demos(path, names={name for name, _ in earlier.values()}):
            pass
    except BlockingIOError:  # opened for writing since `_existing` read it
        raise _written_elsewhere(path) from None
    except (ValueError, OSError):
        return {}
    return earlier


def _keep_first(path: Path, n_episodes: int, info: dict) -> None:
    """Cut a complete file down to its first `n_episodes` episodes (atomically); `info`: its `demo_file_info`."""
    if info["num_demos"] <= n_episodes:
        return
    attrs = {k: v for k, v in info["attrs"].items() if k not in OWN_ATTRS}  # write_demos writes those anew
    if "episode_seeds" in attrs:
        attrs["episode_seeds"] = list(attrs["episode_seeds"])[:n_episodes]
    demos = iter_demos(path)
    first = [next(demos) for _ in range(n_episodes)]
    demos.close()  # closes the file before it is replaced
    write_demos(path, first, info["instruction"], camera=CAMERA_KEY, attrs=attrs)


def _check_episode_settings(image_size: int, camera: str, max_steps: int) -> None:
    """The env's own checks, made before any episode runs (a bad value would fail every episode)."""
    from ..sim.metaworld_env import CAMERAS, check_max_steps

    if image_size < 8:
        raise ValueError(f"--image-size must be at least 8 pixels, got {image_size}")
    if camera not in CAMERAS:
        raise ValueError(f"unknown --camera {camera!r}; Meta-World cameras: {', '.join(CAMERAS)}")
    check_max_steps(max_steps, "--max-steps")


def _mp_context():
    from ..sim.workers import mp_context

    return mp_context(("worldvla.data.collect", "worldvla.sim.metaworld_env"))


def collect(
    tasks,
    n_episodes: int,
    out_dir,
    image_size: int = 64,
    seed: int = 0,
    workers: int = 1,
    camera: str = "corner",
    max_steps: int = 200,
    action_noise: float = 0.0,
    max_attempts: int = 5,
    progress: bool = True,
    overwrite: bool = False,
) -> dict:
    """Collect `n_episodes` successful expert episodes for each task into `out_dir/<task>.hdf5`.

    tasks: names (see `worldvla.sim.TASKS`), a comma-separated string, or "all".
    workers: processes (1 runs in this process). action_noise: std of Gaussian noise
    added to every expert action (before clipping to [-1, 1]) for more varied demos.
    max_attempts: tries per episode, each on a new layout, before giving up on it.
    overwrite: replace task files collected with other settings, and files that cannot be read as demo files
    (another tool's, or damaged); both are refused otherwise, before any episode runs. A file with the same
    settings is kept, cut to `n_episodes`, or completed if it holds fewer: only the episodes it lacks are run. A
    file another process holds open for writing is refused, with `overwrite` too.
    Returns a summary: per task the file, episodes kept, attempts, expert success
    rate, mean steps and seconds per episode; plus totals.
    """
    from ..sim.metaworld_env import TASKS, _require_metaworld, task_list

    _require_metaworld()
    tasks = task_list(tasks)
    if n_episodes < 1:
        raise ValueError(f"n_episodes must be >= 1, got {n_episodes}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if max_attempts < 1:
        raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
    if action_noise < 0:
        raise ValueError(f"action_noise must be >= 0, got {action_noise}")
    _check_episode_settings(image_size, camera, max_steps)
    out_dir = Path(out_dir)
    settings = _settings(image_size, seed, camera, max_steps, action_noise)
    # Each task file is read once; nothing below changes it before its check. One that cannot be read is refused
    # there without --overwrite, before any episode runs.
    existing = {task: _existing(out_dir / f"{task}.hdf5", settings, overwrite) for task in tasks}
    if not overwrite:  # refused before any episode runs, as train, train-vq and pretokenize refuse
        for task in tasks:
            path = out_dir / f"{task}.hdf5"
            found = existing[task]
            if found is not None and found[1]:
                raise FileExistsError(f"{path} holds episodes collected with other settings ({'; '.join(found[1])}); "
                                      f"pass --overwrite to replace it, or choose another --out")
    out_dir.mkdir(parents=True, exist_ok=True)
    for task in tasks:  # the temporary files of task files whose writer was killed (SIGKILL, the OOM killer)
        remove_stale_temps(out_dir / f"{task}.hdf5")

    t_start = time.perf_counter()
    summary: dict = {"out_dir": str(out_dir), "tasks": {}, **settings}
    todo = []
    for task in tasks:
        path = out_dir / f"{task}.hdf5"
        if _is_complete(existing[task], n_episodes, settings, task, max_attempts):
            try:
                _keep_first(path, n_episodes, existing[task][0])
            except BlockingIOError:
                raise _written_elsewhere(path) from None
            except (ValueError, OSError):  # damaged frames of a file of these settings: collected again
                existing[task] = None
                todo.append(task)
                continue
            summary["tasks"][task] = {"path": str(path), "skipped": True, "episodes": n_episodes}
        else:
            todo.append(task)

    base = {"image_size": int(image_size), "camera": camera, "max_steps": int(max_steps), "noise": float(action_noise)}

    def make_job(task, episode, attempt):
        return {**base, "task": task, "episode": episode, "attempt": attempt,
                "seed": episode_seed(seed, task, episode, attempt)}

    # Jobs run in (task, episode, attempt) order, a retry before any later task's episode: each task's file is
    # written as soon as its episodes are settled, so an interrupted run keeps every finished task.
    order = {t: i for i, t in enumerate(todo)}
    pending: list[tuple] = []

    def push(job):
        heapq.heappush(pending, (order[job["task"]], job["episode"], job["attempt"], job))

    # The episodes an earlier run of the same settings left in a task file are kept, not run again; their frames
    # are read when the task's file is written, so only one task's episodes are in memory at a time.
    earlier = {t: _earlier_episodes(out_dir / f"{t}.hdf5", existing[t], t, n_episodes, settings, max_attempts)
               for t in todo}
    for t in todo:
        for e in range(n_episodes):
            if e not in earlier[t]:
                push(make_job(t, e, 0))
    n_jobs = len(pending)
    kept: dict[str, dict[int, dict]] = {t: {} for t in todo}
    stats = {t: {"attempts": 0, "successes": 0, "steps": [], "seconds": []} for t in todo}
    unresolved = {t: n_episodes - len(earlier[t]) for t in todo}
    errors: list[str] = []

    def read_earlier(task):
        episode = {name: (e, seed) for e, (name, seed) in earlier[task].items()}
        demos = iter_demos(out_dir / f"{task}.hdf5", names=set(episode))
        try:
            for demo in demos:
                e, seed = episode[demo.name]
                kept[task][e] = {"frames": demo.frames, "actions": demo.actions.astype(np.float32), "seed": seed}
        finally:
            demos.close()  # closes the file before it is replaced

    def finish_task(task):
        if earlier[task]:
            read_earlier(task)
        eps = [kept[task][e] for e in sorted(kept[task])]
        path = out_dir / f"{task}.hdf5"
        if eps:  # no file at all rather than an empty one
            demos = [{"frames": r["frames"], "actions": r["actions"], "success": True} for r in eps]
            write_demos(path, demos, TASKS[task], camera=CAMERA_KEY,
                        attrs={**settings, "task": task, "episode_seeds": [r["seed"] for r in eps]})
        else:  # nor one left from an earlier run (other settings, or other episodes) to be read downstream
            path.unlink(missing_ok=True)
        s = stats[task]
        summary["tasks"][task] = {
            "path": str(path) if eps else None, "skipped": False, "episodes": len(eps), "reused": len(earlier[task]),
            "attempts": s["attempts"],
            "expert_success_rate": s["successes"] / max(s["attempts"], 1),
            "mean_steps": float(np.mean(s["steps"])) if s["steps"] else 0.0,
            "seconds_per_episode": float(np.mean(s["seconds"])) if s["seconds"] else 0.0,
        }
        kept[task].clear()  # free the frames

    def handle(result) -> list[dict]:
        task, episode = result["task"], result["episode"]
        if "error" in result:
            errors.append(f"{task} episode {episode} attempt {result['attempt']}: {result['error']}")
            ok = False
        else:
            s = stats[task]
            s["attempts"] += 1
            s["seconds"].append(result["seconds"])
            ok = bool(result["success"])
            if ok:
                s["successes"] += 1
                s["steps"].append(result["steps"])
                kept[task][episode] = result
        retry = []
        if not ok and result["attempt"] + 1 < max_attempts:
            retry.append(make_job(task, episode, result["attempt"] + 1))
        else:
            unresolved[task] -= 1
            if unresolved[task] == 0:
                finish_task(task)
        if bar is not None:
            bar.update(1 if (ok or not retry) else 0)
            bar.set_postfix(failed=sum(s["attempts"] - s["successes"] for s in stats.values()) + len(errors))
        return retry

    for t in todo:  # every episode kept from the file (a file `_is_complete` takes is skipped before this)
        if unresolved[t] == 0:
            finish_task(t)
    bar = None
    if progress and pending:
        from tqdm.auto import tqdm

        bar = tqdm(total=n_jobs, desc="collect", unit="ep")
    try:
        if workers == 1 or not pending:
            try:
                while pending:
                    for job in handle(_worker_run(heapq.heappop(pending)[-1])):
                        push(job)
            finally:
                _close_envs()
        else:
            # A crashed worker breaks the executor (BrokenProcessPool) instead of leaving a job hanging, as
            # multiprocessing.Pool would. Two jobs a worker are queued at a time, so that on Ctrl-C or an
            # error only those finish before the run stops (the executor's exit waits for its queue).
            n = min(workers, n_jobs)
            others = set(mp.active_children())
            ex = ProcessPoolExecutor(max_workers=n, mp_context=_mp_context(), initializer=_init_worker,
                                     initargs=(os.getpid(),))
            try:
                in_flight: set = set()
                while pending or in_flight:
                    while pending and len(in_flight) < 2 * n:
                        in_flight.add(ex.submit(_worker_run, heapq.heappop(pending)[-1]))
                    finished, in_flight = wait(in_flight, return_when=FIRST_COMPLETED)
                    for fut in finished:
                        for job in handle(fut.result()):
                            push(job)
            except BrokenProcessPool:  # from a result, or from a submit when the worker died since the last wait
                # Python 3.11's pool terminates the workers it has when it finds one dead; a worker a submit was
                # starting at that moment is left running, and the pool's shutdown waits for it without end.
                for p in set(mp.active_children()) - others:
                    p.terminate()
                raise ChildProcessError(
                    "a collect worker process died while running an episode (killed by the out-of-memory killer, or "
                    "a crash in the simulator or its renderer: a line it printed may be above); the task files "
                    "finished before it are kept: free memory or use fewer --workers (--workers 1 runs the episodes "
                    "in this process, where a crash shows its place), then run the same command again to go on"
                ) from None
            finally:
                ex.shutdown(wait=True, cancel_futures=True)
    finally:
        if bar is not None:
            bar.close()

    n_new = sum(1 for v in summary["tasks"].values() if not v["skipped"])
    all_eps = [x for t in todo for x in stats[t]["seconds"]]
    summary.update({
        "seconds": time.perf_counter() - t_start,
        "tasks_collected": n_new,
        "tasks_skipped": len(tasks) - n_new,
        "episodes_run": len(all_eps),
        "seconds_per_episode": float(np.mean(all_eps)) if all_eps else 0.0,
        "incomplete": [t for t in todo if summary["tasks"][t]["episodes"] < n_episodes],
        "errors": errors,
    })
    summary["tasks"] = {t: summary["tasks"][t] for t in tasks}
    return summary


def _image_size(text: str) -> int:
    """--image-size: a multiple of the 32-px resolution grid, as pretokenize refuses other sizes (their code
    grids are no whole number of its grids, `tokens.sequence`); `collect()` itself takes any size >= 8."""
    from ..tokens.layout import VocabLayout

    n = positive_int(text)
    grid = VocabLayout.res_grid
    if n % grid:
        raise argparse.ArgumentTypeError(f"must be a multiple of {grid} (pretokenize refuses other sizes), got {n}; "
                                         f"use {max(grid, n // grid * grid)} or {(n // grid + 1) * grid}")
    return n


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of `worldvla collect`."""
    from ..sim.metaworld_env import CAMERAS, MAX_EPISODE_STEPS

    parser.add_argument("--tasks", default=",".join(DEFAULT_TASKS),
                        help="comma-separated Meta-World tasks, or 'all' (default: the MT10 set)")
    parser.add_argument("--episodes", type=positive_int, default=50,
                        help="successful episodes per task (default: %(default)s). A task file from an earlier run "
                             "with the same settings and more episodes is cut to its first N (the episodes a fresh "
                             "run of N collects); one with fewer keeps them, and only the missing episodes run")
    parser.add_argument("--out", required=True, help="output folder, one <task>.hdf5 per task")
    parser.add_argument("--image-size", type=_image_size, default=64,
                        help="square frame size in pixels, a multiple of 32 as pretokenize needs (default: "
                             "%(default)s)")
    parser.add_argument("--seed", type=seed32, default=0,
                        help="seed of the layouts and the action noise, in [0, 2**32): every episode's seed derives "
                             "from it (default: %(default)s)")
    parser.add_argument("--workers", type=positive_int, default=max(1, (mp.cpu_count() or 1)),
                        help="worker processes (1 = run in this process; default: %(default)s, the CPU count)")
    parser.add_argument("--camera", default="corner", choices=CAMERAS, help="Meta-World camera (default: corner)")
    parser.add_argument("--max-steps", type=positive_int, default=200,
                        help=f"episode step limit, at most {MAX_EPISODE_STEPS} (default: %(default)s)")
    parser.add_argument("--noise", type=non_negative_float, default=0.0,
                        help="std of Gaussian noise on expert actions (default: %(default)s)")
    parser.add_argument("--max-attempts", type=positive_int, default=5,
                        help="tries per episode, each on a new layout, before giving up (default: %(default)s)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace task files in --out collected with other settings, or that cannot be read "
                             "as demo files (refused otherwise); a file another process is writing is never "
                             "replaced")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _terminated(signum, frame) -> None:
    """SIGTERM's handler during a collection: the temporary file of a task file being written is removed, then the
    process ends as SIGTERM ends it (an exception raised here could be lost in a callback of h5py's objects)."""
    remove_unfinished_writes()
    # os.write, not print: the handler may run inside another write to stderr (the progress bar's)
    os.write(2, b"\nworldvla collect: terminated; run the same command again to continue: finished task files are "
                b"kept\n")
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


@contextlib.contextmanager
def _cleanup_on_sigterm():
    """SIGTERM (`kill`, a job scheduler's stop) ends the process at once, which left the hidden temporary file of
    a task file being written beside it; it is removed first. Only the main thread can set a handler (elsewhere
    SIGTERM is left as it is; the next run removes such files)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = signal.signal(signal.SIGTERM, _terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


def run(args: argparse.Namespace) -> int:
    from ..sim.metaworld_env import MAX_EPISODE_STEPS

    with _cleanup_on_sigterm():
        summary = collect(
            args.tasks, args.episodes, args.out, image_size=args.image_size, seed=args.seed,
            workers=args.workers, camera=args.camera, max_steps=args.max_steps, action_noise=args.noise,
            max_attempts=args.max_attempts, progress=not args.no_progress, overwrite=args.overwrite,
        )
    for task, s in summary["tasks"].items():
        if s["skipped"]:
            print(f"{task:30s} skipped ({s['episodes']} episodes already in {s['path']})")
        else:
            kept = f" ({s['reused']} kept from {s['path']})" if s.get("reused") else ""
            print(f"{task:30s} {s['episodes']:4d} episodes{kept}  expert success {s['expert_success_rate']:.0%}  "
                  f"{s['mean_steps']:.0f} steps  {s['seconds_per_episode']:.2f} s/episode")
    print(f"{summary['episodes_run']} episodes run (every attempt, the failed ones too) in {summary['seconds']:.1f} s "
          f"({summary['seconds_per_episode']:.2f} s/episode per worker) -> {summary['out_dir']}")
    for e in summary["errors"]:
        print(f"error: {e}", file=sys.stderr)
    if summary["incomplete"] and summary["errors"]:  # attempts that raised: their cause, not the expert's luck
        print(f"fewer episodes than asked for: {summary['incomplete']}; {len(summary['errors'])} attempt(s) raised "
              f"the errors above: fix their cause, then run the same command again (finished task files are "
              f"kept)", file=sys.stderr)
        return 1
    if summary["incomplete"]:
        # The seeds are deterministic: the same command would repeat the same failed attempts.
        fixes = [f"--max-attempts above {args.max_attempts} (more layouts tried per episode)"]
        if args.max_steps < MAX_EPISODE_STEPS:
            fixes.append(f"--max-steps above {args.max_steps} (longer episodes, at most {MAX_EPISODE_STEPS})")
        fixes.append(f"a --seed other than {args.seed} (other layouts)")
        print(f"fewer episodes than asked for: {summary['incomplete']} (every attempt at some of their episodes "
              f"failed). The seeds are fixed, so the same command would fail the same way again; pass "
              f"{', '.join(fixes[:-1])} or {fixes[-1]}", file=sys.stderr)
        return 1
    print(f"next: worldvla train-vq {shlex.quote(str(summary['out_dir']))} --out <vq run>   (the image tokenizer; then pretokenize)")
    return 0


def main(argv=None) -> int:
    parser = add_arguments(argparse.ArgumentParser(prog="worldvla collect", description=__doc__.splitlines()[0]))
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
