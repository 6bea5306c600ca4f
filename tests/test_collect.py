"""`worldvla.data.collect`: the summary's counts, the options handed on, the worker pool it starts and the lines
`worldvla collect` prints. Episodes are stood in (no simulator step), so these run in a moment."""
import argparse
import os
from concurrent.futures import Future

import numpy as np
import pytest

from worldvla.data import read_demos
from worldvla.data.hdf5 import demo_file_info, write_demos

pytest.importorskip("metaworld")  # collect() checks for the simulator before anything else


def _stand_in(monkeypatch, fails=(), raises=(), ran=None):
    """`collect`'s episodes stood in: attempt a of episode e takes 2 + e + 3a steps and 0.1 * (1 + a + 2e) s, fails
    where (e, a) is in `fails` and raises where it is in `raises`; its frames' pixels hold its seed. `ran` gets each
    job's (task, episode, attempt)."""
    from worldvla.data import collect as col

    def run_episode(job):
        e, a = job["episode"], job["attempt"]
        if ran is not None:
            ran.append((job["task"], e, a))
        if (e, a) in raises:
            raise RuntimeError("renderer lost")
        steps = 2 + e + 3 * a
        return {**job, "frames": np.full((steps, 8, 8, 3), job["seed"] % 251, np.uint8),
                "actions": np.zeros((steps, 4), np.float32), "success": (e, a) not in fails, "steps": steps,
                "seconds": 0.1 * (1 + a + 2 * e), "setup_seconds": 0.0}

    monkeypatch.setattr(col, "run_episode", run_episode)
    return col


def _task_file(col, path, episodes_attempts, seed=5, max_steps=200, failed=()):
    """A task file of collect's settings (image size 8, corner camera, no noise) holding the episodes given as
    (episode, attempt), in that order; those in `failed` marked as failed demos."""
    demos = [{"frames": np.full((2, 8, 8, 3), e, np.uint8), "actions": np.full((2, 4), e / 10, np.float32),
              "success": (e, a) not in failed} for e, a in episodes_attempts]
    seeds = [col.episode_seed(seed, path.stem, e, a) for e, a in episodes_attempts]
    return write_demos(path, demos, "reach", attrs={**col._settings(8, seed, "corner", max_steps, 0.0),
                                                     "task": path.stem, "episode_seeds": seeds})


def test_the_summary_averages_steps_over_kept_episodes_and_seconds_over_every_attempt(tmp_path, monkeypatch):
    """mean_steps is the length of the episodes kept (a failed attempt's steps are no demo's); seconds per episode
    is over every attempt run, the failed ones too, as episodes_run counts them."""
    col = _stand_in(monkeypatch, fails={(0, 0)})
    s = col.collect(["reach-v3"], 2, tmp_path, image_size=8, seed=5, max_attempts=2, progress=False)
    t = s["tasks"]["reach-v3"]
    # attempts: (0, 0) failed, 2 steps, 0.1 s; (0, 1) kept, 5 steps, 0.2 s; (1, 0) kept, 3 steps, 0.3 s
    assert (t["episodes"], t["attempts"], s["episodes_run"]) == (2, 3, 3)
    assert t["mean_steps"] == pytest.approx(4.0)
    assert t["seconds_per_episode"] == pytest.approx(0.2) and s["seconds_per_episode"] == pytest.approx(0.2)
    assert demo_file_info(tmp_path / "reach-v3.hdf5")["steps"] == [5, 3]


def test_the_progress_bar_counts_raised_attempts_among_the_failures(tmp_path, monkeypatch):
    """The failures shown beside the bar are the attempts that failed and those that raised (a renderer error)."""
    import tqdm.auto

    postfix = []

    class Bar:
        def __init__(self, total, **kw):
            pass

        def update(self, n):
            pass

        def set_postfix(self, **kw):
            postfix.append(kw)

        def close(self):
            pass

    monkeypatch.setattr(tqdm.auto, "tqdm", Bar)
    col = _stand_in(monkeypatch, fails={(1, 0)}, raises={(0, 0)})
    s = col.collect(["reach-v3"], 2, tmp_path, image_size=8, seed=5, max_attempts=2, progress=True)
    assert len(s["errors"]) == 1 and s["tasks"]["reach-v3"]["episodes"] == 2
    assert postfix[-1] == {"failed": 2}


@pytest.mark.parametrize("max_attempts", [1, 3])
def test_a_task_file_whose_episode_came_from_its_last_allowed_attempt_is_complete(tmp_path, monkeypatch,
                                                                                  max_attempts):
    """An episode kept from attempt max_attempts - 1 (the last a run tries) is one a fresh run collects: the file is
    skipped as complete, not written again."""
    ran = []
    col = _stand_in(monkeypatch, ran=ran)
    path = _task_file(col, tmp_path / "reach-v3.hdf5", [(0, 0), (1, max_attempts - 1)])
    mtime = os.stat(path).st_mtime_ns
    s = col.collect(["reach-v3"], 2, tmp_path, image_size=8, seed=5, max_attempts=max_attempts, progress=False)
    assert s["tasks"]["reach-v3"]["skipped"] and ran == [] and os.stat(path).st_mtime_ns == mtime


def test_an_episode_kept_from_its_last_allowed_attempt_is_not_run_again(tmp_path, monkeypatch):
    """A task file holding fewer episodes than asked for keeps an episode that came from the last attempt a run
    tries (attempt max_attempts - 1); only the missing episode runs."""
    ran = []
    col = _stand_in(monkeypatch, ran=ran)
    path = _task_file(col, tmp_path / "reach-v3.hdf5", [(0, 2)])
    s = col.collect(["reach-v3"], 2, tmp_path, image_size=8, seed=5, max_attempts=3, progress=False)
    t = s["tasks"]["reach-v3"]
    assert ran == [("reach-v3", 1, 0)] and (t["episodes"], t["reused"]) == (2, 1)
    assert list(demo_file_info(path)["attrs"]["episode_seeds"]) == [col.episode_seed(5, "reach-v3", 0, 2),
                                                                    col.episode_seed(5, "reach-v3", 1, 0)]


def test_a_task_file_holding_a_failed_demo_is_not_complete(tmp_path, monkeypatch):
    """collect's files hold successful episodes only: a file of the right settings and seeds in which a demo is
    marked failed is not skipped as complete; its successful episode is kept and the failed one runs again."""
    ran = []
    col = _stand_in(monkeypatch, ran=ran)
    path = _task_file(col, tmp_path / "reach-v3.hdf5", [(0, 0), (1, 0)], failed={(1, 0)})
    s = col.collect(["reach-v3"], 2, tmp_path, image_size=8, seed=5, progress=False)
    t = s["tasks"]["reach-v3"]
    assert not t["skipped"] and ran == [("reach-v3", 1, 0)] and (t["episodes"], t["reused"]) == (2, 1)
    assert list(demo_file_info(path)["success"]) == [True, True]


def test_a_task_file_holding_every_episode_out_of_order_is_rewritten_in_order_without_running_any(tmp_path,
                                                                                                  monkeypatch):
    """Episodes 1 and 0, in that order, are not the first two a fresh run writes: the file is written again in
    episode order from the episodes it holds, none run, and the task is counted as collected."""
    ran = []
    col = _stand_in(monkeypatch, ran=ran)
    path = _task_file(col, tmp_path / "reach-v3.hdf5", [(1, 0), (0, 0)])
    s = col.collect(["reach-v3"], 2, tmp_path, image_size=8, seed=5, progress=False)
    t = s["tasks"]["reach-v3"]
    assert ran == [] and not t["skipped"] and (t["episodes"], t["reused"], t["path"]) == (2, 2, str(path))
    assert (s["tasks_collected"], s["tasks_skipped"], s["episodes_run"], s["incomplete"]) == (1, 0, 0, [])
    assert [float(d.actions[0, 0]) for d in read_demos(path)] == pytest.approx([0.0, 0.1])


class _InlinePool:
    """A stand-in for the process pool: records how it was made and how many jobs were in flight at each wait,
    and runs each job in this process when it is submitted."""

    made: list = []
    pools: list = []

    def __init__(self, max_workers=None, mp_context=None, initializer=None, initargs=()):
        _InlinePool.made.append({"max_workers": max_workers, "mp_context": mp_context, "initializer": initializer,
                                 "initargs": initargs})
        self.shutdowns = []
        _InlinePool.pools.append(self)

    def submit(self, fn, *args):
        fut = Future()
        fut.set_result(fn(*args))
        return fut

    def shutdown(self, wait=True, cancel_futures=False):
        self.shutdowns.append({"wait": wait, "cancel_futures": cancel_futures})


def test_collect_starts_one_worker_a_job_at_most_watching_this_process_with_the_collection_preloaded(
        tmp_path, monkeypatch):
    """--workers 4 for 3 episodes starts 3 processes, not 4; the pool's processes come from the simulator workers'
    context with collect's modules preloaded, and each watches this process's pid (to end with it)."""
    from concurrent import futures

    from worldvla.sim import workers

    col = _stand_in(monkeypatch)
    contexts = []
    monkeypatch.setattr(workers, "mp_context", lambda preload=(): contexts.append(tuple(preload)) or "the context")
    monkeypatch.setattr(col, "ProcessPoolExecutor", _InlinePool)
    monkeypatch.setattr(_InlinePool, "made", [])
    monkeypatch.setattr(_InlinePool, "pools", [])
    s = col.collect(["reach-v3"], 3, tmp_path, image_size=8, seed=5, workers=4, progress=False)
    assert s["tasks"]["reach-v3"]["episodes"] == 3 and s["errors"] == []
    (made,) = _InlinePool.made
    assert made["max_workers"] == 3 and made["mp_context"] == "the context"
    assert made["initializer"] is col._init_worker and made["initargs"] == (os.getpid(),)
    assert contexts == [("worldvla.data.collect", "worldvla.sim.metaworld_env")]

    # Two jobs a worker are in flight at a time: 2 workers, 6 episodes -> 4 sent before the first wait.
    waited = []
    real_wait = futures.wait
    monkeypatch.setattr(col, "wait", lambda fs, **kw: waited.append(len(fs)) or real_wait(fs, **kw))
    col.collect(["push-v3"], 6, tmp_path, image_size=8, seed=5, workers=2, progress=False)
    assert waited[0] == 4 and max(waited) == 4


def test_collect_stopped_by_ctrl_c_drops_its_pools_queued_episodes(tmp_path, monkeypatch):
    """Ctrl-C during a collection with workers stops the pool: it waits for the episodes running, and those queued
    but not started are cancelled rather than run before the command ends."""
    from worldvla.sim import workers

    col = _stand_in(monkeypatch)
    scripted = col.run_episode

    def interrupted(job):
        if job["episode"] == 1:
            raise KeyboardInterrupt
        return scripted(job)

    monkeypatch.setattr(col, "run_episode", interrupted)
    monkeypatch.setattr(workers, "mp_context", lambda preload=(): None)
    monkeypatch.setattr(col, "ProcessPoolExecutor", _InlinePool)
    monkeypatch.setattr(_InlinePool, "pools", [])
    with pytest.raises(KeyboardInterrupt):
        col.collect(["reach-v3"], 4, tmp_path, image_size=8, seed=5, workers=2, progress=False)
    (pool,) = _InlinePool.pools
    assert pool.shutdowns == [{"wait": True, "cancel_futures": True}]
    assert not (tmp_path / "reach-v3.hdf5").exists()


def _run_cli(col, argv):
    return col.run(col.add_arguments(argparse.ArgumentParser()).parse_args(argv))


def test_the_command_hands_every_option_on_to_collect(tmp_path, monkeypatch):
    """Each option of `worldvla collect` reaches collect() as given."""
    from worldvla.data import collect as col

    got = []

    def collect(tasks, n_episodes, out_dir, **kw):
        got.append((tasks, n_episodes, out_dir, kw))
        return {"tasks": {}, "episodes_run": 0, "seconds": 0.0, "seconds_per_episode": 0.0, "out_dir": out_dir,
                "errors": [], "incomplete": []}

    monkeypatch.setattr(col, "collect", collect)
    assert _run_cli(col, ["--out", str(tmp_path), "--tasks", "push-v3", "--episodes", "3", "--image-size", "32",
                          "--seed", "9", "--workers", "2", "--camera", "topview", "--max-steps", "120", "--noise",
                          "0.25", "--max-attempts", "4", "--overwrite", "--no-progress"]) == 0
    assert got == [("push-v3", 3, str(tmp_path), {
        "image_size": 32, "seed": 9, "workers": 2, "camera": "topview", "max_steps": 120, "action_noise": 0.25,
        "max_attempts": 4, "progress": False, "overwrite": True})]
    got.clear()
    assert _run_cli(col, ["--out", str(tmp_path)]) == 0
    assert got[0][3]["overwrite"] is False and got[0][3]["progress"] is True and got[0][3]["action_noise"] == 0.0


def test_the_command_prints_each_tasks_line_naming_kept_and_skipped_files(tmp_path, monkeypatch, capsys):
    """A task skipped as complete names its episodes and its file; a task completed from an earlier file names how
    many episodes it kept from which file; a task collected afresh names neither."""
    col = _stand_in(monkeypatch)
    assert _run_cli(col, ["--out", str(tmp_path), "--tasks", "reach-v3,push-v3", "--episodes", "1", "--image-size",
                          "32", "--workers", "1", "--no-progress"]) == 0
    capsys.readouterr()
    col.collect(["drawer-open-v3"], 2, tmp_path, image_size=32, progress=False)
    capsys.readouterr()
    assert _run_cli(col, ["--out", str(tmp_path), "--tasks", "reach-v3,drawer-open-v3,door-open-v3", "--episodes",
                          "1", "--image-size", "32", "--workers", "1", "--no-progress"]) == 0
    assert _run_cli(col, ["--out", str(tmp_path), "--tasks", "push-v3", "--episodes", "3", "--image-size", "32",
                          "--workers", "1", "--no-progress"]) == 0
    lines = capsys.readouterr().out.splitlines()
    by_task = {line.split()[0]: line for line in lines if line.split() and line.split()[0].endswith("-v3")}
    assert by_task["reach-v3"].split(None, 1)[1] == f"skipped (1 episodes already in {tmp_path / 'reach-v3.hdf5'})"
    assert by_task["drawer-open-v3"].split(None, 1)[1].startswith("skipped (1 episodes already in ")
    assert "kept from" not in by_task["door-open-v3"] and "skipped" not in by_task["door-open-v3"]
    assert by_task["door-open-v3"].split()[1:3] == ["1", "episodes"]
    assert f"   3 episodes (1 kept from {tmp_path / 'push-v3.hdf5'})  expert success 100%" in by_task["push-v3"]
