import gc
import importlib.util
import os
import sys
import time

import numpy as np
import pytest

from worldvla.data import read_demos
from worldvla.data.collect import collect, episode_seed
from worldvla.sim import TASKS, MetaWorldEnv, expert_policy, make_env

needs_sim = pytest.mark.skipif(importlib.util.find_spec("metaworld") is None,
                               reason="needs the simulator extra: pip install 'worldvla[sim]'")


def test_missing_metaworld_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "metaworld", None)  # makes `import metaworld` fail
    with pytest.raises(ImportError, match=r"pip install \"worldvla\[sim\]\""):
        make_env("reach-v3")
    with pytest.raises(ImportError, match=r"worldvla\[sim\]"):
        expert_policy("reach-v3")
    with pytest.raises(ImportError, match=r"worldvla\[sim\]"):
        collect(["reach-v3"], 1, tmp_path)


def test_collect_without_metaworld_is_one_line_naming_the_install(monkeypatch, tmp_path, capsys):
    """`worldvla collect` without Meta-World printed a traceback ending in this ImportError."""
    from worldvla.cli import main

    monkeypatch.setitem(sys.modules, "metaworld", None)
    monkeypatch.delenv("WORLDVLA_TRACEBACK", raising=False)
    assert main(["collect", "--out", str(tmp_path), "--tasks", "reach-v3", "--episodes", "1", "--workers", "1",
                 "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("worldvla collect: error:")
    assert 'pip install "worldvla[sim]"' in err and "Traceback" not in err


def test_a_missing_opengl_library_names_mujoco_gl_and_what_to_install(monkeypatch, tmp_path, capsys):
    """MUJOCO_GL=osmesa without OSMesa died importing MuJoCo with "AttributeError: 'NoneType' object has no
    attribute 'glGetError'" (PyOpenGL's, without its library), a traceback that named neither."""
    import builtins

    from worldvla.cli import main

    real_import = builtins.__import__

    def no_osmesa(name, *args, **kwargs):  # PyOpenGL's own failure, raised from its module as there
        if name == "metaworld":
            code = "class _p:\n    GL = None\n_p.GL.glGetError\n"  # PyOpenGL's platform, without its library
            exec(compile(code, "/site-packages/OpenGL/raw/GL/_errors.py", "exec"), {})
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_osmesa)
    monkeypatch.setenv("MUJOCO_GL", "osmesa")
    monkeypatch.delenv("WORLDVLA_TRACEBACK", raising=False)
    with pytest.raises(ImportError, match=r"MUJOCO_GL=osmesa: the OSMesa library was not found .*glGetError.*"
                                          r"apt-get install libosmesa6.*set MUJOCO_GL to a backend"):
        make_env("reach-v3")
    assert main(["collect", "--out", str(tmp_path), "--tasks", "reach-v3", "--episodes", "1", "--workers", "1",
                 "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("worldvla collect: error:") and "MUJOCO_GL=osmesa" in err

    def bug(name, *args, **kwargs):  # an AttributeError elsewhere is a bug: it keeps its kind
        if name == "metaworld":
            raise AttributeError("module 'gymnasium' has no attribute 'register'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", bug)
    with pytest.raises(AttributeError, match="register"):
        make_env("reach-v3")


@pytest.mark.parametrize("value", ["inf", "nan", "-1"])
def test_collect_refuses_a_non_finite_noise(value, capsys):
    """`--noise inf` failed every attempt of every episode (nan: the expert's actions)."""
    import argparse

    from worldvla.data.collect import add_arguments

    parser = add_arguments(argparse.ArgumentParser())
    with pytest.raises(SystemExit) as e:
        parser.parse_args(["--out", "x", "--noise", value])
    assert e.value.code == 2 and "argument --noise:" in capsys.readouterr().err


def test_an_incomplete_collection_suggests_what_would_change_the_outcome(monkeypatch, tmp_path, capsys):
    """The seeds are fixed, so 'rerun to retry them' repeated the same failures: the advice is the options
    that change the attempts."""
    import argparse

    from worldvla.data import collect as collect_mod

    summary = {"tasks": {"reach-v3": {"skipped": False, "episodes": 1, "expert_success_rate": 0.2, "mean_steps": 80,
                                      "seconds_per_episode": 0.5}},
               "episodes_run": 5, "seconds": 2.5, "seconds_per_episode": 0.5, "out_dir": str(tmp_path), "errors": [],
               "incomplete": ["reach-v3"]}
    monkeypatch.setattr(collect_mod, "collect", lambda *a, **k: summary)
    parser = collect_mod.add_arguments(argparse.ArgumentParser())
    assert collect_mod.run(parser.parse_args(["--out", str(tmp_path), "--max-attempts", "3", "--seed", "7"])) == 1
    err = capsys.readouterr().err
    assert "rerun to retry" not in err and "['reach-v3']" in err
    assert "--max-attempts above 3" in err and "--max-steps above 200" in err and "a --seed other than 7" in err
    assert collect_mod.run(parser.parse_args(["--out", str(tmp_path), "--max-steps", "500"])) == 1
    err = capsys.readouterr().err
    assert "--max-steps" not in err and "--max-attempts above 5" in err  # 500 is Meta-World's own limit
    # Attempts that raised (a renderer that cannot start, say) point at their errors, not at other seeds.
    summary["errors"] = ["reach-v3 episode 0 attempt 0: RuntimeError: EGL not available"]
    assert collect_mod.run(parser.parse_args(["--out", str(tmp_path)])) == 1
    err = capsys.readouterr().err
    assert "error: reach-v3 episode 0" in err and "raised the errors above: fix their cause" in err
    assert "--max-attempts" not in err
    assert "next:" not in capsys.readouterr().out  # an incomplete collection points at no next step
    summary.update(errors=[], incomplete=[])
    assert collect_mod.run(parser.parse_args(["--out", str(tmp_path)])) == 0
    assert f"next: worldvla train-vq {tmp_path} --out <vq run>" in capsys.readouterr().out
    summary["out_dir"] = str(tmp_path / "my demos")  # quoted for the shell
    assert collect_mod.run(parser.parse_args(["--out", str(tmp_path / "my demos")])) == 0
    assert f"next: worldvla train-vq '{tmp_path}/my demos' --out <vq run>" in capsys.readouterr().out


@pytest.fixture(scope="module")
def reach_env():
    with make_env("reach-v3", seed=0, image_size=40, max_steps=120) as env:
        yield env


def fresh_seed():
    return int.from_bytes(os.urandom(3), "little")


@needs_sim
def test_task_names_are_metaworld_ids():
    from metaworld.policies import ENV_POLICY_MAP

    assert set(TASKS) <= set(ENV_POLICY_MAP)
    assert all(isinstance(v, str) and v for v in TASKS.values())


@needs_sim
def test_frames_shape_dtype_and_motion(reach_env):
    seed = fresh_seed()
    f0 = reach_env.reset(seed=seed)
    assert f0.shape == (40, 40, 3) and f0.dtype == np.uint8 and f0.flags.c_contiguous
    assert f0.std() > 10, "frame is (nearly) constant"
    frames = [f0]
    for _ in range(6):
        f, reward, success, done = reach_env.step(np.array([1.0, -1.0, 1.0, 0.5]))
        frames.append(f)
        assert isinstance(reward, float) and not done
    assert reach_env.t == 6
    assert np.abs(frames[-1].astype(int) - f0).sum() > 0, "the arm moved but the frame did not change"
    # A seed names one layout: the same seed gives the same first frame and state.
    again = reach_env.reset(seed=seed)
    np.testing.assert_array_equal(again, f0)
    goal = reach_env.state[-3:].copy()
    reach_env.reset(seed=seed + 1)
    assert not np.allclose(reach_env.state[-3:], goal)


@needs_sim
def test_corner_camera_is_upright(reach_env):
    # Upright, the top of the corner view is empty background (black with the skybox
    # off) and the table fills the bottom; the raw camera shows the reverse.
    f = reach_env.reset(seed=fresh_seed()).astype(float)
    h = f.shape[0]
    assert f[: h // 4].mean() < 0.5 * f[-h // 4:].mean()


@needs_sim
def test_envs_in_one_process_keep_their_frames(reach_env):
    # Each env has its own OpenGL context whose object ids overlap with the others':
    # creating, closing and garbage-collecting envs must not blank the others.
    seed = fresh_seed()
    before = reach_env.reset(seed=seed)
    other = make_env("push-v3", seed=0, image_size=40)
    pushed = other.reset(seed=seed)
    np.testing.assert_array_equal(reach_env.reset(seed=seed), before)
    other.close()
    with pytest.raises(RuntimeError, match="closed"):
        other.render()
    again = make_env("push-v3", seed=0, image_size=40)
    del other
    gc.collect()
    np.testing.assert_array_equal(again.reset(seed=seed), pushed)
    np.testing.assert_array_equal(reach_env.reset(seed=seed), before)
    del again  # never closed explicitly
    gc.collect()
    np.testing.assert_array_equal(reach_env.reset(seed=seed), before)


@needs_sim
def test_expert_succeeds_within_limit(reach_env):
    policy = expert_policy("reach-v3")
    reach_env.reset(seed=fresh_seed())
    done = False
    while not done:
        _, _, success, done = reach_env.step(policy(reach_env.state))
    assert reach_env.success and success, f"expert failed within {reach_env.max_steps} steps"
    assert reach_env.t < reach_env.max_steps
    with pytest.raises(RuntimeError, match="reset"):
        for _ in range(reach_env.max_steps + 1):
            reach_env.step(np.zeros(4))


@needs_sim
def test_bad_inputs(reach_env):
    reach_env.reset(seed=1)
    with pytest.raises(ValueError, match="4-D"):
        reach_env.step(np.zeros(7))
    with pytest.raises(ValueError, match="NaN"):
        reach_env.step(np.array([0.0, np.nan, 0.0, 0.0]))
    with pytest.raises(ValueError, match=r"unknown Meta-World task 'reach-v2' \(did you mean reach-v3"):
        MetaWorldEnv("reach-v2")
    with pytest.raises(ValueError, match="unknown camera"):
        MetaWorldEnv("reach-v3", camera="front")


@needs_sim
def test_collect_writes_and_resumes(tmp_path):
    seed = fresh_seed()
    summary = collect(["reach-v3"], 2, tmp_path, image_size=32, seed=seed, workers=1, progress=False)
    s = summary["tasks"]["reach-v3"]
    assert not s["skipped"] and s["episodes"] == 2 and summary["incomplete"] == [] and summary["errors"] == []
    demos = read_demos(tmp_path / "reach-v3.hdf5")
    assert len(demos) == 2
    for d in demos:
        assert d.frames.shape[1:] == (32, 32, 3) and d.frames.dtype == np.uint8
        assert d.actions.shape == (len(d.frames), 4) and np.all(np.abs(d.actions) <= 1)
        assert d.success and d.instruction == TASKS["reach-v3"]
    assert not np.array_equal(demos[0].actions[:5], demos[1].actions[:5])  # different layouts
    mtime = os.stat(tmp_path / "reach-v3.hdf5").st_mtime_ns

    t0 = time.perf_counter()
    again = collect("reach-v3", 2, tmp_path, image_size=32, seed=seed, workers=1, progress=False)
    assert again["tasks"]["reach-v3"]["skipped"] and again["episodes_run"] == 0
    assert time.perf_counter() - t0 < 5.0
    assert os.stat(tmp_path / "reach-v3.hdf5").st_mtime_ns == mtime

    # Other settings: refused (test_collect_refuses_a_file_collected_with_other_settings), replaced with overwrite.
    noisy = collect("reach-v3", 1, tmp_path, image_size=32, seed=seed, workers=1, action_noise=0.1, progress=False,
                    overwrite=True)
    assert not noisy["tasks"]["reach-v3"]["skipped"]
    assert len(read_demos(tmp_path / "reach-v3.hdf5")) == 1


@needs_sim
def test_collect_in_worker_processes(tmp_path):
    seed = fresh_seed()
    summary = collect(["reach-v3"], 2, tmp_path, image_size=24, seed=seed, workers=2, progress=False)
    assert summary["errors"] == [] and summary["tasks"]["reach-v3"]["episodes"] == 2
    (tmp_path / "in_process").mkdir()
    ref = collect(["reach-v3"], 2, tmp_path / "in_process", image_size=24, seed=seed, workers=1, progress=False)
    assert ref["errors"] == []
    # Same seeds -> the same demos, whichever process ran them.
    for a, b in zip(read_demos(tmp_path / "reach-v3.hdf5"), read_demos(tmp_path / "in_process" / "reach-v3.hdf5")):
        np.testing.assert_array_equal(a.actions, b.actions)
        np.testing.assert_array_equal(a.frames, b.frames)


def test_episode_seeds_are_distinct_and_stable():
    seeds = {episode_seed(7, t, e, a) for t in ("reach-v3", "push-v3") for e in range(20) for a in range(3)}
    assert len(seeds) == 120
    assert episode_seed(7, "push-v3", 3, 1) == episode_seed(7, "push-v3", 3, 1)


@needs_sim
def test_collect_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match=r"unknown Meta-World task 'fly-v3'; nothing was run: fix --tasks; the "
                                         r"tasks are assembly-v3, "):
        collect(["reach-v3", "fly-v3"], 1, tmp_path)
    with pytest.raises(ValueError, match="n_episodes"):
        collect(["reach-v3"], 0, tmp_path)


@needs_sim
def test_collect_rejects_bad_episode_settings_before_running_any(tmp_path, capsys):
    """These used to fail every episode in the workers (with retries), then advise a rerun."""
    from worldvla.cli import main

    for kw, match in (({"camera": "bogus"}, "--camera"), ({"image_size": 0}, "--image-size"),
                      ({"max_steps": 0}, "--max-steps"), ({"max_steps": 501}, "--max-steps")):
        with pytest.raises(ValueError, match=match):
            collect(["reach-v3"], 1, tmp_path, workers=1, progress=False, **kw)
    assert list(tmp_path.iterdir()) == []
    for option, value in (("--camera", "bogus"), ("--image-size", "0"), ("--max-steps", "0"),
                          ("--episodes", "0"), ("--noise", "-1"), ("--workers", "0"), ("--max-attempts", "0")):
        with pytest.raises(SystemExit) as e:
            main(["collect", "--out", str(tmp_path), option, value])
        assert e.value.code == 2 and f"argument {option}:" in capsys.readouterr().err


@needs_sim
def test_collect_cuts_a_larger_file_to_the_episodes_asked_for(tmp_path):
    """A file with more episodes than asked for (same settings) used to be kept whole, so the data
    used downstream did not match the request; it is now cut to its first episodes."""
    from worldvla.data.collect import _settings, episode_seed
    from worldvla.data.hdf5 import demo_file_info, write_demos

    rng = np.random.default_rng(0)
    demos = [{"frames": rng.integers(0, 256, (3, 16, 16, 3), dtype=np.uint8),
              "actions": rng.uniform(-1, 1, (3, 4)).astype(np.float32)} for _ in range(3)]
    settings = _settings(16, 7, "corner", 200, 0.0)
    seeds = [episode_seed(7, "reach-v3", e, a) for e, a in ((0, 0), (1, 2), (2, 0))]  # episode 1 on its third try
    path = write_demos(tmp_path / "reach-v3.hdf5", demos, TASKS["reach-v3"],
                       attrs={**settings, "task": "reach-v3", "episode_seeds": seeds})
    s = collect(["reach-v3"], 2, tmp_path, image_size=16, seed=7, workers=1, progress=False)
    assert s["tasks"]["reach-v3"]["skipped"] and s["tasks"]["reach-v3"]["episodes"] == 2 and s["episodes_run"] == 0
    kept = read_demos(path)
    assert len(kept) == 2
    for got, want in zip(kept, demos):
        np.testing.assert_array_equal(got.frames, want["frames"])
        np.testing.assert_array_equal(got.actions, want["actions"])
    attrs = demo_file_info(path)["attrs"]
    assert list(attrs["episode_seeds"]) == seeds[:2] and attrs["task"] == "reach-v3"
    assert all(attrs[k] == v for k, v in settings.items())  # still counts as complete
    assert collect(["reach-v3"], 2, tmp_path, image_size=16, seed=7, workers=1, progress=False)["episodes_run"] == 0


@needs_sim
def test_collect_redoes_a_file_whose_first_episodes_are_not_the_first(tmp_path):
    """A run of 3 whose episode 0 failed every attempt kept episodes 1 and 2; a later run of 1 with the same
    settings took the file as complete and episode 1 as "the first episode", where a fresh run of 1 collects
    episode 0 (or nothing). Such a file is collected again, and one that ends up with no episode is removed."""
    from worldvla.data.collect import _settings, episode_seed
    from worldvla.data.hdf5 import demo_file_info, write_demos

    rng = np.random.default_rng(1)
    demos = [{"frames": rng.integers(0, 256, (3, 16, 16, 3), dtype=np.uint8),
              "actions": rng.uniform(-1, 1, (3, 4)).astype(np.float32)} for _ in range(2)]
    settings = _settings(16, 7, "corner", 10, 0.0)
    path = write_demos(tmp_path / "reach-v3.hdf5", demos, TASKS["reach-v3"], attrs={
        **settings, "task": "reach-v3", "episode_seeds": [episode_seed(7, "reach-v3", e, 0) for e in (1, 2)]})
    # 10 steps: too few for the expert, so episode 0 fails again and the task ends with no episode
    s = collect(["reach-v3"], 1, tmp_path, image_size=16, seed=7, max_steps=10, max_attempts=1, workers=1,
                progress=False)
    assert not s["tasks"]["reach-v3"]["skipped"] and s["episodes_run"] == 1
    assert s["tasks"]["reach-v3"]["episodes"] == 0 and not path.exists()
    # the file asked for, a run of 2 that kept episodes 0 and 1, is complete for 1
    write_demos(path, demos, TASKS["reach-v3"], attrs={
        **settings, "task": "reach-v3", "episode_seeds": [episode_seed(7, "reach-v3", e, 0) for e in (0, 1)]})
    s = collect(["reach-v3"], 1, tmp_path, image_size=16, seed=7, max_steps=10, max_attempts=1, workers=1,
                progress=False)
    assert s["tasks"]["reach-v3"]["skipped"] and s["episodes_run"] == 0
    assert demo_file_info(path)["num_demos"] == 1


def test_blind_random_baseline_and_shared_envs_change_no_episode():
    """The random baseline skips rendering and evaluation shares envs across variants; neither may
    change an episode: the same actions on the same seeds give the same outcomes as rendering
    policies on fresh envs."""
    from worldvla.eval.metaworld import RandomPolicy, closed_loop
    from worldvla.sim import make_env

    class LookingRandom(RandomPolicy):
        needs_images = True

        def act(self, image, history=None):
            assert np.asarray(image).std() > 0  # real frames arrive
            return super().act(image, history)

    kw = dict(seed=3, max_steps=40, record=False)
    fresh = closed_loop(LookingRandom(seed=5), "reach-v3", 4, n_envs=2, **kw)
    envs = [make_env("reach-v3", max_steps=40) for _ in range(2)]
    try:
        closed_loop(RandomPolicy(seed=9), "reach-v3", 4, envs=envs, **kw)  # the envs have been used before
        shared = closed_loop(RandomPolicy(seed=5), "reach-v3", 4, envs=envs, **kw)
    finally:
        for e in envs:
            e.close()
    assert shared.successes == fresh.successes and shared.steps == fresh.steps
    assert shared.seeds == fresh.seeds
    # The physics itself: a used env, not rendering, follows a fresh rendering env step for step.
    rng = np.random.default_rng(0)
    actions = rng.uniform(-1, 1, size=(30, 4))
    used, new = make_env("reach-v3", max_steps=40), make_env("reach-v3", max_steps=40)
    try:
        used.reset(seed=1)
        for a in actions[:20]:
            used.step(a[::-1].copy())
        assert used.reset(seed=7, render=False) is None
        new.reset(seed=7)
        for a in actions:
            frame, r_used, _, _ = used.step(a, render=False)
            assert frame is None
            _, r_new, _, _ = new.step(a)
            np.testing.assert_array_equal(used.state, new.state)
            assert r_used == r_new
    finally:
        used.close()
        new.close()


@needs_sim
def test_envs_in_worker_processes_match_envs_in_this_process():
    """Envs stepped in worker processes give the frames, rewards and successes of the same envs
    stepped here, also when their steps are started together (step_async) and across resets;
    closed_loop gives the same episodes with either; a worker's error reaches the caller."""
    from worldvla.eval.metaworld import RandomPolicy, closed_loop
    from worldvla.sim.metaworld_env import expert_episode
    from worldvla.sim.workers import EnvWorkers

    rng = np.random.default_rng(1)
    actions = rng.uniform(-1, 1, size=(3, 12, 4))
    local = [make_env("reach-v3", max_steps=40) for _ in range(3)]
    with EnvWorkers("reach-v3", 3, image_size=64, max_steps=40, workers=2) as pool:
        remote = pool.envs
        assert remote[0].instruction == local[0].instruction
        for seed in (4, 11):
            for e_l, e_r, s in zip(local, remote, (seed, seed + 1, seed + 2)):
                np.testing.assert_array_equal(e_r.reset(seed=s), e_l.reset(seed=s))
            for t in range(actions.shape[1]):
                for e_r, a in zip(remote, actions[:, t]):
                    e_r.step_async(a)
                for e_l, e_r, a in zip(local, remote, actions[:, t]):
                    f_r, r_r, s_r, d_r = e_r.step_wait()
                    f_l, r_l, s_l, d_l = e_l.step(a)
                    np.testing.assert_array_equal(f_r, f_l)
                    assert (r_r, s_r, d_r, e_r.success) == (r_l, s_l, d_l, e_l.success)
        with pytest.raises(ValueError, match=r"env 1 \(in env worker process \d+\): Meta-World actions are 4-D"):
            remote[1].step(np.zeros(3))
        kw = dict(seed=2, max_steps=40, record=False)
        here = closed_loop(RandomPolicy(seed=5), "reach-v3", 4, envs=local[:2], **kw)
        there = closed_loop(RandomPolicy(seed=5), "reach-v3", 4, envs=remote[:2], **kw)
        assert (there.successes, there.steps) == (here.successes, here.steps)
        # Scripted-expert episodes (the world-model metrics' rollouts) run side by side in the workers.
        remote[0].expert_async(21)
        remote[1].expert_async(22)
        got = [remote[0].expert_wait(), remote[1].expert_wait()]
        for g, s in zip(got, (21, 22)):
            want = expert_episode(local[2], s)
            np.testing.assert_array_equal(g["frames"], want["frames"])
            np.testing.assert_array_equal(g["actions"], want["actions"])
            assert g["success"] == want["success"] and len(g["actions"]) > 1
    for e in local:
        e.close()
    with pytest.raises(ValueError, match="unknown"):
        EnvWorkers("no-such-task-v3", 2)


@needs_sim
def test_a_worker_error_keeps_its_kind_and_a_dead_worker_is_named():
    """A worker's ValueError came back as a RuntimeError (`eval --max-steps 600`: a traceback instead of the
    command's one line), and a worker killed (OOM killer) surfaced as a bare BrokenPipeError when a step was sent
    or ConnectionResetError when its reply was read."""
    import signal

    from worldvla.sim.workers import EnvWorkers

    with pytest.raises(ValueError, match=r"env worker process \d+: max_steps must be in \[1, 500\]"):
        EnvWorkers("reach-v3", 2, image_size=16, max_steps=600, workers=2)
    with EnvWorkers("reach-v3", 2, image_size=16, max_steps=20, workers=2) as pool:
        first, second = pool.envs
        first.reset(seed=1)
        second.reset(seed=2)
        with pytest.raises(ValueError, match=r"env 0 \(in env worker process \d+\): action contains NaN") as e:
            first.step(np.array([np.nan, 0, 0, 0]))
        # One line for the command's report; the worker's traceback rides as the cause (shown if uncaught).
        assert "\n" not in str(e.value) and "Traceback" not in str(e.value)
        assert "Traceback (most recent call last)" in str(e.value.__cause__)
        assert "in step" in str(e.value.__cause__)  # the worker's own frames
        first.step(np.zeros(4))  # the env is still in step with its worker
        # An unknown command's reply had 3 fields where 4 are read: "not enough values to unpack" instead.
        pool._workers[0].send("bogus", 0, None)
        with pytest.raises(ValueError, match=r"env 0 \(in env worker process \d+\): unknown command 'bogus'"):
            pool._workers[0].recv(0)
        first.step(np.zeros(4))
        # A worker killed after it started is not blamed on a missing `if __name__ == "__main__":`.
        os.kill(pool._workers[0].proc.pid, signal.SIGKILL)
        pool._workers[0].proc.join(timeout=10)
        with pytest.raises(ChildProcessError, match=r"env worker process \d+ died \(exit code -9, killed by SIGKILL: "
                                               r"often the out-of-memory killer") as e:
            first.step(np.zeros(4))  # sending
        assert "__main__" not in str(e.value)
        proc = pool._workers[1].proc
        os.kill(proc.pid, signal.SIGSTOP)  # the step is sent, and still unanswered when the worker is killed
        second.step_async(np.zeros(4))
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(timeout=10)
        with pytest.raises(ChildProcessError, match=r"env worker process \d+ died \(exit code -9, killed by SIGKILL"):
            second.step_wait()  # reading


def test_a_dead_worker_is_blamed_on_the_main_guard_only_before_it_started():
    """Every worker death said a script needs `if __name__ == "__main__":`, a crash in the renderer too: that is
    the likely cause only before a worker's start-up reply (it imports the main module then)."""
    from types import SimpleNamespace

    from worldvla.sim.workers import _Worker

    w = _Worker.__new__(_Worker)
    w.proc = SimpleNamespace(pid=123, exitcode=-11, join=lambda timeout=None: None)
    w.started = True
    msg = str(w._died())
    assert "died (exit code -11, killed by SIGSEGV: a crash in the simulator or its renderer" in msg, msg
    assert "MUJOCO_GL=" in msg and "__main__" not in msg
    w.proc.exitcode = 3
    assert "died (exit code 3; a traceback it printed is above)" in str(w._died())
    w.started, w.proc.exitcode = False, 1
    msg = str(w._died())
    assert "died (exit code 1) before it started" in msg and 'if __name__ == "__main__":' in msg, msg


def test_a_worker_that_sends_no_reply_is_named_not_waited_for_without_end(monkeypatch):
    """A hung worker (a renderer deadlock) hung the evaluation for good: a reply is now awaited for
    REPLY_TIMEOUT_S at most, and the error names the worker and what to check."""
    import multiprocessing as mp
    import time
    from types import SimpleNamespace

    from worldvla.sim import workers
    from worldvla.sim.workers import _Worker

    monkeypatch.setattr(workers, "REPLY_TIMEOUT_S", 0.2)
    w = _Worker.__new__(_Worker)
    w.conn, silent = mp.Pipe()  # the other end never writes
    w.proc, w.started = SimpleNamespace(pid=321), True
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match=r"env worker process 321 sent no reply in 0 s: it hangs .*MUJOCO_GL="):
        w.reply(0)
    assert time.monotonic() - t0 < 5
    silent.send(("ok", "late"))  # a reply that comes is read as before
    assert w.reply(0) == "late"


def test_a_timed_out_reply_is_not_read_as_a_later_commands(monkeypatch):
    """After a wait timed out, its reply could still come and was read as the next command's (a reset got the late
    step's reply). The timed-out command stays pending: another wait for it reads its reply, and a new command is
    refused until then, naming what to do."""
    import multiprocessing as mp
    from types import SimpleNamespace

    from worldvla.sim import workers

    monkeypatch.setattr(workers, "REPLY_TIMEOUT_S", 0.2)
    w = workers._Worker.__new__(workers._Worker)
    w.conn, worker_end = mp.Pipe()
    w.proc, w.started, w.rank, w.stride, w.pending = SimpleNamespace(pid=321), True, 1, 2, workers.deque()
    w.send("step", 0, None)
    with pytest.raises(TimeoutError, match="sent no reply"):
        w.recv(0)
    with pytest.raises(RuntimeError, match=r"env worker process 321: its reply to an earlier command \(env 1\) timed "
                                           r"out and has not been read.*wait for it again"):
        w.send("reset", 0, None)
    assert worker_end.recv() == ("step", 0, None) and not worker_end.poll(0)  # the refused reset was not sent
    worker_end.send(("ok", "late step"))
    assert w.recv(0) == "late step" and not w.pending
    w.send("reset", 0, None)  # usable again once the late reply is read
    worker_end.send(("ok", "reset"))
    assert w.recv(0) == "reset"


@needs_sim
def test_closing_a_pool_reads_the_replies_left_unread():
    """Ctrl-C while expert rollouts ran left a reply unread (an episode's frames are more than a pipe holds): its
    worker blocked in its send and never read "close", and close() waited 10 s, killed it, and never joined it."""
    from worldvla.sim.workers import EnvWorkers

    pool = EnvWorkers("reach-v3", 1, image_size=64, max_steps=150, workers=1)
    env = pool.envs[0]
    env.reset(seed=1)
    for _ in range(100):  # 100 frames of 12 KB: about 1.2 MB of replies, none read
        env.step_async(np.zeros(4))
    proc = pool._workers[0].proc
    pool.close(timeout=60)  # room for the 100 steps on busy cores: the exit code, not the time, tells the two apart
    assert proc.exitcode == 0  # the worker ended by itself on "close": neither killed nor left unjoined


def test_a_policy_returning_nested_lists_is_taken_as_its_array():
    """A policy whose act returns a plain list [K][D] failed with "the environments' chunks differ in length
    (mode='release' ...)", which it has nothing to do with."""
    from worldvla.eval.rollout import ChunkQuery

    class Lists:
        def __init__(self, out):
            self.out = out

        def act(self, image):
            return self.out

    one = np.zeros((16, 16, 3), np.uint8)
    out = ChunkQuery(Lists([[0.0, 0.1, 0.2, 0.3], [0.4, 0.5, 0.6, 0.7]]))(one, None)
    np.testing.assert_array_equal(out, np.arange(8).reshape(2, 4) / 10)
    assert ChunkQuery(Lists([[[0.0] * 4] * 3] * 2))(np.stack([one, one]), None).shape == (2, 3, 4)
    with pytest.raises(ValueError, match="policy.act returned a list that is not a rectangular array") as e:
        ChunkQuery(Lists([[0.0, 0.1], [0.2]]))(one, None)
    assert "mode='release'" not in str(e.value)
    # release-mode chunks of different lengths are still named as such
    with pytest.raises(ValueError, match="chunks differ in length"):
        ChunkQuery(Lists([np.zeros((2, 4)), np.zeros((3, 4))]))(np.stack([one, one]), None)


@needs_sim
def test_an_env_error_in_closed_loop_leaves_its_worker_pool_usable():
    """closed_loop starts every env's step before it waits for the first: an error in one env left the others'
    replies unread, and the next closed loop on the same pool (a notebook's retry) failed on them."""
    from worldvla.eval.metaworld import closed_loop
    from worldvla.sim.workers import EnvWorkers

    class WideOnce:  # env 0's first chunk is 5 wide, which its env refuses (the query does not know the width)
        chunk_size, action_dim, image_size = 2, 4, 16

        def __init__(self):
            self.calls = 0

        def reset(self, instruction):
            pass

        def act(self, image, history=None):
            self.calls += 1
            out = [np.zeros((2, 4)) for _ in range(len(image))]
            if self.calls == 1:
                out[0] = np.zeros((2, 5))
            return out

    pol = WideOnce()
    with EnvWorkers("reach-v3", 4, image_size=16, max_steps=6, workers=2) as pool:
        with pytest.raises(ValueError, match=r"env 0 \(in env worker process \d+\): Meta-World actions are 4-D"):
            closed_loop(pol, "reach-v3", 4, max_steps=6, envs=pool.envs, record=False)
        r = closed_loop(pol, "reach-v3", 4, max_steps=6, envs=pool.envs, record=False)
        assert r.steps == [6] * 4


@needs_sim
def test_an_env_left_open_exits_without_egl_errors():
    """An env not closed by its user was freed during the interpreter's teardown, after EGL's, and printed three
    EGLError tracebacks at every exit."""
    import subprocess

    code = ("from worldvla.sim import make_env\n"
            "a = make_env('reach-v3', image_size=16); a.reset(seed=1)\n"
            "b = make_env('reach-v3', image_size=16); b.reset(seed=2); b.close()\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "Exception ignored" not in done.stderr and "EGLError" not in done.stderr, done.stderr


@needs_sim
def test_collect_writes_each_task_as_it_settles_and_keeps_them_on_an_interrupt(tmp_path, monkeypatch):
    """A failed attempt was retried after every other task's first attempts, so no task's file was written until
    near the end of the whole run, and an interrupt or crash at 90% kept nothing."""
    from worldvla.data import collect as col

    ran = []

    def fake_episode(job):
        ran.append((job["task"], job["episode"], job["attempt"]))
        if job["task"] == "push-v3":
            raise KeyboardInterrupt  # the user stops the run at the third task
        rng = np.random.default_rng(job["seed"])
        return {**job, "frames": rng.integers(0, 256, (3, 8, 8, 3), dtype=np.uint8),
                "actions": rng.uniform(-1, 1, (3, 4)).astype(np.float32),
                "success": not (job["episode"] == 0 and job["attempt"] == 0),  # one retry each
                "steps": 3, "seconds": 0.0, "setup_seconds": 0.0}

    monkeypatch.setattr(col, "run_episode", fake_episode)
    with pytest.raises(KeyboardInterrupt):
        collect(["reach-v3", "drawer-open-v3", "push-v3"], 2, tmp_path, image_size=8, workers=1, progress=False)
    assert ran[:3] == [("reach-v3", 0, 0), ("reach-v3", 0, 1), ("reach-v3", 1, 0)]  # the retry comes first
    for task in ("reach-v3", "drawer-open-v3"):
        assert len(read_demos(tmp_path / f"{task}.hdf5")) == 2
    assert not (tmp_path / "push-v3.hdf5").exists()


@needs_sim
def test_ctrl_c_stops_collection_workers_without_tracebacks(tmp_path, interrupt_cli):
    """A terminal's Ctrl-C reaches every process of its group: each worker printed a KeyboardInterrupt
    traceback, then the parent its own. Now the parent stops the pool and says how to continue (exit 130)."""
    rc, err = interrupt_cli(["collect", "--out", tmp_path, "--tasks", "reach-v3,push-v3", "--episodes", 30,
                             "--workers", 2, "--image-size", 32, "--no-progress"],
                            ready=lambda: (tmp_path / "reach-v3.hdf5").is_file())  # the workers are on push-v3 now
    assert rc == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert "worldvla collect: interrupted; run the same command again to continue" in err
    assert len(read_demos(tmp_path / "reach-v3.hdf5")) == 30


@needs_sim
def test_collect_refuses_a_file_collected_with_other_settings(tmp_path, capsys, monkeypatch):
    """`collect` replaced a task file collected with other settings (or not by collect at all) silently, where
    train, train-vq and pretokenize refuse without --overwrite. Refused before any episode runs, naming the
    file and the settings; a file with the same settings is still kept (and cut) as before."""
    from worldvla.cli import main
    from worldvla.data import collect as col
    from worldvla.data.hdf5 import write_demos

    rng = np.random.default_rng(0)
    demos = [{"frames": rng.integers(0, 256, (3, 16, 16, 3), dtype=np.uint8),
              "actions": rng.uniform(-1, 1, (3, 4)).astype(np.float32)} for _ in range(3)]
    path = write_demos(tmp_path / "reach-v3.hdf5", demos, TASKS["reach-v3"],
                       attrs={**col._settings(16, 7, "corner", 200, 0.0), "task": "reach-v3",
                              "episode_seeds": [col.episode_seed(7, "reach-v3", e, 0) for e in range(3)]})
    mtime = os.stat(path).st_mtime_ns
    monkeypatch.setattr(col, "_worker_run", lambda job: pytest.fail("an episode ran before the files were checked"))
    with pytest.raises(FileExistsError, match=rf"{path} holds episodes collected with other settings \(--image-size "
                                              rf"16, not 32; --seed 7, not 0\); pass --overwrite"):
        collect(["push-v3", "reach-v3"], 2, tmp_path, image_size=32, seed=0, workers=1, progress=False)
    assert main(["collect", "--out", str(tmp_path), "--tasks", "reach-v3", "--episodes", "2", "--workers", "1",
                 "--image-size", "32", "--seed", "7", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(path) in err and "--image-size 16, not 32" in err
    assert "--overwrite" in err and os.stat(path).st_mtime_ns == mtime
    # Not collect's file (no settings recorded): refused too.
    own = write_demos(tmp_path / "push-v3.hdf5", demos, "push")
    with pytest.raises(FileExistsError, match=r"push-v3\.hdf5 holds .*--image-size \(none recorded\), not 16"):
        collect(["push-v3"], 2, tmp_path, image_size=16, seed=7, workers=1, progress=False)
    # The same settings: kept (cut to 2 episodes), no episode run.
    s = collect(["reach-v3"], 2, tmp_path, image_size=16, seed=7, workers=1, progress=False)
    assert s["tasks"]["reach-v3"]["skipped"] and s["episodes_run"] == 0
    # --overwrite replaces it.
    monkeypatch.undo()
    s = collect(["reach-v3"], 1, tmp_path, image_size=32, seed=0, workers=1, progress=False, overwrite=True)
    assert not s["tasks"]["reach-v3"]["skipped"] and s["tasks"]["reach-v3"]["episodes"] == 1
    assert [d.frames.shape[1] for d in read_demos(path)] == [32] and own.is_file()


def test_collect_image_size_must_be_what_pretokenize_takes():
    """`collect --image-size 48` (help: ">= 8") wrote files that pretokenize refuses (sides must be
    multiples of its 32-px resolution grid); refused when parsed now."""
    import argparse

    from worldvla.data.collect import add_arguments

    parser = add_arguments(argparse.ArgumentParser())
    assert parser.parse_args(["--out", "o", "--image-size", "64"]).image_size == 64
    for bad in ("48", "8", "100"):
        with pytest.raises(SystemExit):
            parser.parse_args(["--out", "o", "--image-size", bad])
    assert "multiple of 32" in " ".join(parser.format_help().split())


def test_a_collection_worker_ends_when_the_collecting_process_is_gone():
    """Killed (SIGKILL, the OOM killer), the collecting process left its pool's workers running: their parent is
    the forkserver, and a worker blocked writing a result waits forever, since every worker holds the result
    pipe's reading end too. Each worker watches the collecting process's pid and exits once it is gone."""
    import multiprocessing as mp
    import subprocess
    import sys

    from worldvla.data.collect import _exit_with

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a pid that no longer runs
    worker = mp.get_context("spawn").Process(target=_exit_with, args=(gone.pid, 0.05))
    worker.start()
    worker.join(timeout=30)
    assert worker.exitcode == 1


@needs_sim
def test_collect_reads_an_existing_task_files_summary_once(tmp_path, monkeypatch):
    """The settings check, the completeness check and the cut to the episodes asked for each read the file's
    summary again (four reads of one file); what the first read found is handed on."""
    from worldvla.data import collect as collect_module
    from worldvla.data.collect import _settings
    from worldvla.data.hdf5 import demo_file_info, write_demos

    rng = np.random.default_rng(2)
    demos = [{"frames": rng.integers(0, 256, (3, 16, 16, 3), dtype=np.uint8),
              "actions": rng.uniform(-1, 1, (3, 4)).astype(np.float32)} for _ in range(3)]
    settings = _settings(16, 7, "corner", 200, 0.0)
    path = write_demos(tmp_path / "reach-v3.hdf5", demos, TASKS["reach-v3"], attrs={
        **settings, "task": "reach-v3", "episode_seeds": [episode_seed(7, "reach-v3", e, 0) for e in range(3)]})
    read = []
    monkeypatch.setattr(collect_module, "demo_file_info", lambda p: read.append(p) or demo_file_info(p))
    s = collect(["reach-v3"], 2, tmp_path, image_size=16, seed=7, workers=1, progress=False)
    assert s["tasks"]["reach-v3"]["skipped"] and s["episodes_run"] == 0
    assert read == [path] and len(read_demos(path)) == 2


def test_worker_envs_end_their_episodes_where_a_local_env_does():
    """EnvWorkers' envs give what the same env gives in the calling process: with the defaults too (the pool
    cut episodes at 150 steps, a local env at 200)."""
    import inspect

    from worldvla.sim import metaworld_env
    from worldvla.sim.workers import EnvWorkers

    local = inspect.signature(metaworld_env.MetaWorldEnv.__init__).parameters["max_steps"].default
    assert inspect.signature(EnvWorkers.__init__).parameters["max_steps"].default == local


def _fake_workers(monkeypatch, fail_rank=None, error=None):
    """`_Worker` stood in (no process) in `worldvla.sim.workers`: the list each new one is appended to. The
    worker of rank `fail_rank` reports an error at start-up (`error`, or a ValueError)."""
    from types import SimpleNamespace

    from worldvla.sim import workers

    made = []

    class FakeWorker:
        def __init__(self, ctx, task, n_envs, image_size, max_steps, kwargs, rank=0, stride=1):
            self.n_envs, self.rank, self.stride, self.closed = n_envs, rank, stride, False
            self.proc = SimpleNamespace(is_alive=lambda: False, join=lambda timeout=None: None)
            self.conn = SimpleNamespace(close=lambda: setattr(self, "closed", True))
            made.append(self)

        def reply(self, i=None):
            if self.rank == fail_rank:
                raise error or ValueError("max_steps must be in [1, 500]")
            return "reach the goal"

    monkeypatch.setattr(workers, "_Worker", FakeWorker)
    monkeypatch.setattr(workers, "mp_context", lambda: None)
    return made


def test_a_pool_spreads_its_envs_round_robin_over_at_most_one_worker_an_env(monkeypatch):
    from worldvla.sim.workers import EnvWorkers

    made = _fake_workers(monkeypatch)
    pool = EnvWorkers("reach-v3", 5, workers=3)
    assert [w.n_envs for w in made] == [2, 2, 1] and [(w.rank, w.stride) for w in made] == [(0, 3), (1, 3), (2, 3)]
    # env j: worker j % 3's env j // 3
    assert [(made.index(e._worker), e._index) for e in pool.envs] == [(0, 0), (1, 0), (2, 0), (0, 1), (1, 1)]
    assert pool.envs[4].instruction == "reach the goal"
    made.clear()
    assert len(EnvWorkers("reach-v3", 2, workers=4).envs) == 2 and [w.n_envs for w in made] == [1, 1]
    made.clear()
    for n_envs, n_workers in ((0, 2), (2, 0)):
        with pytest.raises(ValueError, match=f"need n_envs >= 1 and workers >= 1, got n_envs={n_envs}, "
                                             f"workers={n_workers}"):
            EnvWorkers("reach-v3", n_envs, workers=n_workers)
    assert made == []


def test_a_pool_whose_worker_fails_to_start_closes_every_worker(monkeypatch):
    from worldvla.sim.workers import EnvWorkers

    made = _fake_workers(monkeypatch, fail_rank=1)
    with pytest.raises(ValueError, match="max_steps must be in") as failed:
        EnvWorkers("reach-v3", 3, workers=3)
    # The error's traceback, held as a caller reporting it holds it, keeps the half-built pool alive: its workers
    # are closed already, not when it is collected.
    assert failed.tb is not None and len(made) == 3 and all(w.closed for w in made)


def test_a_worker_type_error_is_raised_as_one_and_replies_are_read_in_order(monkeypatch):
    """A reply read for another env than the next pending one would hand one env's frame to another: refused.
    A TypeError in a worker is raised as a TypeError here, naming the pool's env."""
    import multiprocessing as mp
    from types import SimpleNamespace

    from worldvla.sim import workers

    monkeypatch.setattr(workers, "REPLY_TIMEOUT_S", 0.2)
    w = workers._Worker.__new__(workers._Worker)
    w.conn, worker_end = mp.Pipe()
    w.proc, w.started, w.rank, w.stride, w.pending = SimpleNamespace(pid=321), True, 1, 2, workers.deque()
    w.send("step", 0, None)
    w.send("step", 1, None)
    with pytest.raises(RuntimeError, match=r"env 3: replies are read in the order the commands were sent; env 1 "
                                           r"\(on the same worker\) was sent one before: wait for it first"):
        w.recv(1)  # this worker's env 1: the pool's env 1 * 2 + 1
    try:
        raise TypeError("action must be a sequence of numbers")
    except TypeError as e:
        worker_end.send(("error", workers._error_reply(e)))
    with pytest.raises(TypeError, match=r"^env 1 \(in env worker process 321\): action must be a sequence") as e:
        w.recv(0)  # this worker's env 0: the pool's env 0 * 2 + 1
    assert "Traceback" in str(e.value.__cause__)
    worker_end.send(("ok", "frame of env 1"))
    assert w.recv(1) == "frame of env 1" and not w.pending


def test_a_worker_that_exited_by_itself_is_named_with_its_exit_code():
    from worldvla.sim.workers import _exit_cause

    assert _exit_cause(0) == "exit code 0; a traceback it printed is above"
    assert _exit_cause(None) == "it closed its connection but is still running"
    assert _exit_cause(-15) == "exit code -15, killed by SIGTERM, sent by another process"


def test_closing_a_pool_kills_a_worker_that_does_not_end():
    """A worker that never reads "close" (hung in the simulator) is killed once the timeout has passed, not left
    running."""
    import multiprocessing as mp
    import signal

    from worldvla.sim.workers import EnvWorkers, _Worker

    ctx = mp.get_context("fork")
    w = _Worker.__new__(_Worker)
    w.conn, _ = ctx.Pipe()
    w.proc = ctx.Process(target=time.sleep, args=(60,), daemon=True)
    w.proc.start()
    pool = EnvWorkers.__new__(EnvWorkers)
    pool._workers = [w]
    t0 = time.monotonic()
    pool.close(timeout=0.5)
    assert w.proc.exitcode == -signal.SIGKILL and time.monotonic() - t0 < 5 and pool._workers == []


@needs_sim
def test_a_remote_env_skips_rendering_and_follows_success_as_a_local_one():
    """`render=False` reaches the worker's env (no frame drawn), and the handle's `success` follows the worker's
    env through an expert episode, a reset and steps."""
    from worldvla.sim.workers import EnvWorkers

    with EnvWorkers("reach-v3", 1, image_size=16, max_steps=150, workers=1) as pool:
        env = pool.envs[0]
        assert env.reset(seed=3, render=False) is None
        assert env.step(np.zeros(4), render=False)[0] is None
        env.expert_async(3)
        expert = env.expert_wait()
        assert expert["success"] and env.success is True
        assert env.reset(seed=3).shape == (16, 16, 3) and env.success is False
        for a in expert["actions"]:  # the expert's episode again, step by step
            frame, _, _, done = env.step(a)
        assert frame.shape == (16, 16, 3) and done and env.success is True
        for _ in range(40):  # away from the goal, up: a step not at the goal, and the episode's success kept
            _, _, at_goal, _ = env.step(np.array([0.0, 0.0, 1.0, 0.0]), render=False)
            if not at_goal:
                break
        assert not at_goal and env.success is True


@needs_sim
def test_an_episode_ends_at_its_step_limit_and_refuses_another_step(reach_env):
    """An episode is `max_steps` steps long: the last step says done, and one more is refused (it would run
    past the limit the episode was recorded and scored with)."""
    reach_env.reset(seed=1, render=False)
    dones = [reach_env.step(np.zeros(4), render=False)[3] for _ in range(reach_env.max_steps)]
    assert not reach_env.success  # holding still does not reach the goal
    assert dones == [False] * (reach_env.max_steps - 1) + [True]
    assert reach_env.t == reach_env.max_steps
    with pytest.raises(RuntimeError, match=f"episode is over \\({reach_env.max_steps} steps\\); call reset"):
        reach_env.step(np.zeros(4), render=False)
    reach_env.reset(seed=1, render=False)
    assert reach_env.t == 0 and not reach_env.step(np.zeros(4), render=False)[3]


@needs_sim
def test_corner_camera_frames_are_rotated_not_mirrored(reach_env):
    """The corner camera's axes are declared as right = (-1, 1, 0), up = (-0.2, -0.2, -1) (pointing at the
    floor); the upright view, rotated by 180 degrees, has right = (1, -1, 0): the hand moving along +y moves
    left in the frame. Flipping the rows alone would give a mirrored scene, where it moves right."""

    def changed_columns(dy):  # column centroid of the pixels that change as the hand moves along y
        start = reach_env.reset(seed=1).astype(float)
        for _ in range(25):
            frame, *_ = reach_env.step(np.array([0.0, dy, 0.0, 0.0]))
        change = np.abs(frame.astype(float) - start).sum(-1)
        change *= change > 30
        return (change.sum(0) * np.arange(change.shape[1])).sum() / change.sum()

    assert changed_columns(1.0) < changed_columns(-1.0) - 1.0


@needs_sim
def test_an_expert_episode_cut_by_the_step_limit_is_not_a_success():
    from worldvla.sim.metaworld_env import expert_episode

    with make_env("reach-v3", seed=0, image_size=16, max_steps=2) as env:
        episode = expert_episode(env, seed=1)
    assert episode["success"] is False  # it ended on the step limit, not on the goal
    assert episode["actions"].shape == (2, 4) and episode["frames"].shape == (3, 16, 16, 3)


def test_a_policy_that_needs_no_images_still_records_real_frames():
    """Envs skip rendering for a policy that reads no images (the random baseline), but not while the episode is
    recorded: the GIF of its first episode shows the scene, not blank frames."""
    from worldvla.eval.metaworld import RandomPolicy, closed_loop

    r = closed_loop(RandomPolicy(seed=1), "reach-v3", 1, seed=2, max_steps=6, n_envs=1, record=True)
    assert r.frames is not None and len(r.frames) == 7  # the reset's frame and one a step
    assert all(f.std() > 0 for f in r.frames)


@needs_sim
def test_an_env_that_does_not_end_on_success_runs_to_its_step_limit():
    """With terminate_on_success=False an episode goes on after the task succeeds (done only at the step limit),
    and `success` stays true for the rest of it."""
    with make_env("reach-v3", seed=0, image_size=16, max_steps=150, terminate_on_success=False) as env:
        expert = expert_policy("reach-v3")
        env.reset(seed=1, render=False)
        done = False
        while not env.success:
            _, _, _, done = env.step(expert(env.state), render=False)
        assert not done and env.t < env.max_steps
        while not done:
            _, _, _, done = env.step(np.zeros(4), render=False)
            assert env.success
        assert env.t == env.max_steps


def test_env_settings_outside_what_meta_world_renders_or_runs_are_refused():
    """Frames smaller than 8 px and episodes longer than Meta-World's own limit of 500 steps are refused before
    the simulator starts; 500 steps itself is the limit, not past it."""
    from worldvla.sim.metaworld_env import MAX_EPISODE_STEPS, check_max_steps

    for size in (4, 7, 8.0):
        with pytest.raises(ValueError, match=f"image_size must be an integer >= 8, got {size!r}"):
            MetaWorldEnv("reach-v3", image_size=size)
    assert MAX_EPISODE_STEPS == 500
    check_max_steps(500)
    check_max_steps(1)
    for bad in (0, 501):
        with pytest.raises(ValueError, match=rf"max_steps must be in \[1, 500\] .*, got {bad}"):
            check_max_steps(bad)


@needs_sim
def test_making_an_env_leaves_meta_worlds_goal_count_as_it_was():
    """An env asks Meta-World's MT1 for one goal, which Meta-World keeps in a module global: it is put back, so a
    benchmark built afterwards in the same process still samples its usual number of goals."""
    import metaworld

    before = metaworld._N_GOALS
    assert before != 1  # else one goal left behind would go unseen
    with make_env("reach-v3", seed=0, image_size=16):
        assert metaworld._N_GOALS == before


def test_simulator_workers_can_be_started_from_a_thread_other_than_the_main_one():
    """A pool built from another thread (a notebook's or a server's worker thread) gets its context: only the main
    thread may set signal handlers, so the forkserver is then started as multiprocessing starts it, on use."""
    import threading

    from worldvla.sim.workers import mp_context

    got = []

    def build():
        try:
            got.append(mp_context())
        except Exception as e:  # noqa: BLE001  (what the thread raised is the finding)
            got.append(e)

    t = threading.Thread(target=build)
    t.start()
    t.join(timeout=60)
    assert len(got) == 1 and not isinstance(got[0], Exception), got
    assert got[0].get_start_method() in ("forkserver", "spawn")


@needs_sim
def test_an_env_worker_ignores_ctrl_c_and_keeps_serving():
    """Ctrl-C reaches every process of the terminal's group: an env worker ignores it (the command that owns the
    pool handles it and closes the workers) instead of dying with a traceback of its own, whatever the process it
    was started from did with SIGINT."""
    import multiprocessing as mp
    import signal

    from worldvla.sim.workers import _serve

    ctx = mp.get_context("spawn")  # a fresh interpreter: SIGINT raises KeyboardInterrupt unless the worker ignores it
    conn, child = ctx.Pipe()
    proc = ctx.Process(target=_serve, args=(child, "reach-v3", 1, 16, 20, {}), daemon=True)
    proc.start()
    child.close()
    try:
        assert conn.poll(120) and conn.recv() == ("ok", TASKS["reach-v3"])
        os.kill(proc.pid, signal.SIGINT)
        time.sleep(0.5)
        conn.send(("reset", 0, {"seed": 1, "render": True}))
        assert conn.poll(60)
        status, (frame, success) = conn.recv()
        assert status == "ok" and frame.shape == (16, 16, 3) and success is False
        conn.send(("close", -1, None))
        proc.join(timeout=30)
        assert proc.exitcode == 0
    finally:
        if proc.is_alive():
            proc.kill()
            proc.join(timeout=5)
        conn.close()


def test_a_ctrl_c_while_a_pool_starts_closes_every_worker(monkeypatch):
    """Ctrl-C while the workers import the simulator (seconds) reaches the pool's start-up wait: the workers
    already started are closed then too, not left running in a notebook's process."""
    from worldvla.sim.workers import EnvWorkers

    made = _fake_workers(monkeypatch, fail_rank=1, error=KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        EnvWorkers("reach-v3", 3, workers=3)
    assert len(made) == 3 and all(w.closed for w in made)


def test_a_worker_error_of_a_derived_kind_keeps_its_kind_and_names_the_pools_env(monkeypatch):
    """An error whose kind derives from ValueError (json's JSONDecodeError, numpy's LinAlgError) is a ValueError
    in the caller too, and it names the pool's env: the second of two workers holds the pool's envs 1 and 3."""
    import json
    import multiprocessing as mp
    from types import SimpleNamespace

    from worldvla.sim import workers

    monkeypatch.setattr(workers, "REPLY_TIMEOUT_S", 5.0)
    w = workers._Worker.__new__(workers._Worker)
    w.conn, worker_end = mp.Pipe()
    w.proc, w.started, w.rank, w.stride, w.pending = SimpleNamespace(pid=321), True, 1, 2, workers.deque()
    w.send("step", 1, None)
    try:
        json.loads("{")
    except ValueError as e:
        worker_end.send(("error", workers._error_reply(e)))
    with pytest.raises(ValueError, match=r"^env 3 \(in env worker process 321\): Expecting property name") as e:
        w.recv(1)  # this worker's env 1: the pool's env 1 * 2 + 1
    assert "JSONDecodeError" in str(e.value.__cause__) and not w.pending


def test_a_dead_workers_exit_code_is_read_once_the_process_has_ended():
    """A killed worker's pipe can close a moment before the process is reaped: the exit code read at once is
    None ("still running"), which hid the out-of-memory killer's SIGKILL. The process is waited for first."""
    from types import SimpleNamespace

    from worldvla.sim.workers import _Worker

    proc = SimpleNamespace(pid=123, exitcode=None)
    proc.join = lambda timeout=None: setattr(proc, "exitcode", -9)  # reaped while joined
    w = _Worker.__new__(_Worker)
    w.proc, w.started = proc, True
    assert "died (exit code -9, killed by SIGKILL: often the out-of-memory killer" in str(w._died())


@needs_sim
def test_an_env_takes_the_smallest_frame_size_given_as_a_numpy_integer():
    """8 px is the smallest frame size taken, and a size read from a file's attributes (a numpy integer) is taken
    as the same int."""
    with make_env("reach-v3", image_size=np.int64(8)) as env:
        frame = env.reset(seed=1)
    assert frame.shape == (8, 8, 3) and type(env.image_size) is int


@needs_sim
def test_a_reset_without_a_seed_draws_the_layout_of_the_envs_own_seed():
    with make_env("reach-v3", seed=5, image_size=16) as env:
        env.reset(render=False)
        own = env.state.copy()
        env.reset(seed=5, render=False)
        np.testing.assert_array_equal(env.state, own)
        env.reset(seed=0, render=False)
        assert not np.allclose(env.state[-3:], own[-3:])  # another goal: the seed is not ignored


@needs_sim
def test_the_scripted_expert_returns_actions_within_the_action_range(reach_env):
    """The experts are proportional controllers: far from the goal they ask for more than the env takes. Their
    actions (recorded as demos by callers that step them directly) are clipped to [-1, 1]."""
    import warnings

    expert = expert_policy("reach-v3")
    reach_env.reset(seed=1, render=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        raw = np.asarray(expert._policy.get_action(reach_env.state), dtype=np.float64)
    assert np.abs(raw).max() > 1  # else this layout shows nothing
    a = expert(reach_env.state)
    assert a.shape == (4,) and np.abs(a).max() <= 1.0
    np.testing.assert_allclose(a, np.clip(raw, -1.0, 1.0), rtol=1e-6)


def test_a_missing_opengl_library_is_named_for_mujoco_gl_in_capitals(monkeypatch):
    """MuJoCo reads MUJOCO_GL in any case (OSMESA picks OSMesa): the error names OSMesa and its package then too,
    not EGL's."""
    import builtins

    real_import = builtins.__import__

    def no_osmesa(name, *args, **kwargs):  # PyOpenGL's own failure, raised from its module as there
        if name == "metaworld":
            code = "class _p:\n    GL = None\n_p.GL.glGetError\n"
            exec(compile(code, "/site-packages/OpenGL/raw/GL/_errors.py", "exec"), {})
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_osmesa)
    monkeypatch.setenv("MUJOCO_GL", "OSMESA")
    with pytest.raises(ImportError, match=r"MUJOCO_GL=OSMESA: the OSMesa library was not found .*"
                                          r"\(apt-get install libosmesa6\)"):
        make_env("reach-v3")


def test_unknown_task_names_are_each_named_once_with_the_task_list_when_one_has_no_close_match():
    """The full task list is added when any name has no close match (not only when none has); a name given twice
    is named once; a name that is not a string (a number in a config file) is named, not a TypeError."""
    from worldvla.sim import check_tasks

    with pytest.raises(ValueError) as e:
        check_tasks(["raech-v3", "zzz", "raech-v3", 5])
    msg = str(e.value)
    assert msg.startswith("unknown Meta-World tasks 'raech-v3' (did you mean reach-v3, reach-wall-v3 or "
                          "drawer-close-v3?), 'zzz', 5; nothing was run: fix --tasks; the tasks are assembly-v3, "), msg
    assert msg.count("raech-v3") == 1
    with pytest.raises(ValueError, match=r"^unknown Meta-World task 'zzz'; nothing was run"):
        check_tasks(["zzz", "zzz"])


@needs_sim
def test_an_env_that_fails_to_build_leaves_meta_worlds_goal_count_as_it_was(monkeypatch):
    """Meta-World stores the goal count an env asks for before it builds the env: a build that failed after that
    (a renderer that cannot start) left one goal for every benchmark built afterwards in the process."""
    import gymnasium
    import metaworld

    before = metaworld._N_GOALS

    def failing_make(*args, num_goals=None, **kwargs):
        metaworld._N_GOALS = num_goals
        raise RuntimeError("the renderer cannot start")

    monkeypatch.setattr(gymnasium, "make", failing_make)
    with pytest.raises(RuntimeError, match="renderer cannot start"):
        make_env("reach-v3", image_size=16)
    assert metaworld._N_GOALS == before


def test_a_worker_whose_reply_wait_was_interrupted_refuses_to_go_on_out_of_step(monkeypatch):
    """Ctrl-C while waiting for a step's reply (a notebook's evaluation) left that reply in the pipe: the next
    command on the same pool read it as its own (a reset got the step's frame). Such a worker now refuses, naming
    what to do, until the pool is closed."""
    import multiprocessing as mp
    from types import SimpleNamespace

    from worldvla.sim import workers

    monkeypatch.setattr(workers, "REPLY_TIMEOUT_S", 5.0)
    w = workers._Worker.__new__(workers._Worker)
    conn, worker_end = mp.Pipe()
    w.proc, w.started, w.rank, w.stride, w.pending = SimpleNamespace(pid=321), True, 0, 2, workers.deque()

    class CtrlCInWait:  # the worker's pipe, where the first wait is cut short by Ctrl-C
        waits = 0

        def __getattr__(self, name):
            return getattr(conn, name)

        def poll(self, timeout=0.0):
            self.waits += 1
            if self.waits == 1:
                raise KeyboardInterrupt
            return conn.poll(timeout)

    w.conn = CtrlCInWait()
    w.send("step", 0, None)
    w.send("step", 1, None)
    with pytest.raises(KeyboardInterrupt):
        w.recv(0)
    worker_end.send(("ok", "frame of env 0's step"))  # the worker answers after all
    worker_end.send(("ok", "frame of env 1's step"))
    refused = r"env worker process 321: a wait for one of its replies was interrupted.*close this pool"
    with pytest.raises(RuntimeError, match=refused):
        w.recv(1)  # would get env 0's frame
    with pytest.raises(RuntimeError, match=refused):
        w.send("reset", 0, {"seed": 1, "render": True})


@needs_sim
def test_multisampling_is_off_by_default_and_antialias_turns_it_on():
    """4x multisampling triples the render time of a small frame through Mesa: an env renders without it unless
    `antialias=True`, which keeps Meta-World's own setting and gives smoother (different) frames."""
    with make_env("reach-v3", image_size=16) as plain, make_env("reach-v3", image_size=16, antialias=True) as smooth:
        assert plain._raw.model.vis.quality.offsamples == 0
        assert smooth._raw.model.vis.quality.offsamples > 0
        assert np.abs(plain.reset(seed=1).astype(int) - smooth.reset(seed=1)).sum() > 0


@needs_sim
def test_an_action_with_a_leading_axis_of_one_is_taken_as_that_action(reach_env):
    """A policy's chunk of one action ([1, 4]) steps the env as the action itself; a [2, 4] chunk is refused."""
    a = np.array([0.5, -0.5, 0.2, 0.0])
    reach_env.reset(seed=2, render=False)
    reach_env.step(a, render=False)
    want = reach_env.state.copy()
    reach_env.reset(seed=2, render=False)
    reach_env.step(a[None], render=False)
    np.testing.assert_array_equal(reach_env.state, want)
    with pytest.raises(ValueError, match=r"actions are 4-D .*got shape \(2, 4\)"):
        reach_env.step(np.zeros((2, 4)), render=False)


@needs_sim
def test_a_closed_env_refuses_reset_and_step_naming_that_it_is_closed():
    """After close() the simulator is gone: a reset or step says so, not "'NoneType' object has no attribute"."""
    env = make_env("reach-v3", image_size=8)
    env.reset(seed=1, render=False)
    env.close()
    for use in (lambda: env.reset(seed=1), lambda: env.step(np.zeros(4)), env.render):
        with pytest.raises(RuntimeError, match=r"reach-v3 env is closed .*make a new one"):
            use()


@needs_sim
@pytest.mark.parametrize("seed", [-1, 2.5, "3", True])
def test_a_layout_seed_that_is_not_a_whole_number_from_zero_is_refused(reach_env, seed):
    """A negative seed failed inside Meta-World with an error of its own kind naming no argument; a fraction was
    cut to the layout of another seed (2.5 drew seed 2's)."""
    with pytest.raises(ValueError, match=r"seed must be a whole number >= 0 .*got"):
        reach_env.reset(seed=seed, render=False)


@needs_sim
def test_an_env_seed_outside_what_meta_world_takes_is_refused_naming_the_range():
    for seed in (-1, 1 << 32):
        with pytest.raises(ValueError, match=r"seed must be a whole number >= 0 and below 4294967296"):
            make_env("reach-v3", seed=seed, image_size=8)


@needs_sim
def test_an_env_of_a_closed_pool_says_the_pool_was_closed_not_that_its_worker_died():
    from worldvla.sim.workers import EnvWorkers

    pool = EnvWorkers("reach-v3", 1, image_size=8, workers=1)
    env = pool.envs[0]
    env.reset(seed=1, render=False)
    pool.close()
    for use in (lambda: env.reset(seed=1), lambda: env.step(np.zeros(4)), lambda: env.expert_async(1)):
        with pytest.raises(RuntimeError, match=r"was closed with its pool \(EnvWorkers.close\).*make a new EnvWorkers"):
            use()


@needs_sim
def test_a_pools_envs_keep_their_workers_running_after_the_pool_object_is_dropped():
    """`envs = EnvWorkers(...).envs` closed every worker as the pool object went, and the envs then said their
    workers had died. A worker now ends once neither the pool nor any env of it is left."""
    from worldvla.sim.workers import EnvWorkers

    pool = EnvWorkers("reach-v3", 2, image_size=8, workers=2)
    procs = [w.proc for w in pool._workers]
    env = pool.envs[1]  # on the second worker
    del pool
    gc.collect()
    assert env.reset(seed=1).shape == (8, 8, 3) and env.step(np.zeros(4))[0].shape == (8, 8, 3)
    procs[0].join(timeout=10)
    assert procs[0].exitcode == 0 and procs[1].is_alive()  # the first worker has no env left
    del env
    procs[1].join(timeout=10)
    assert procs[1].exitcode == 0


@pytest.mark.parametrize("max_steps", [50.7, True, "50"])
def test_a_step_limit_that_is_not_a_whole_number_is_refused_not_cut(max_steps):
    """50.7 ran episodes of 50 steps and True of 1; "50" failed on a bare comparison error."""
    from worldvla.sim.metaworld_env import check_max_steps

    with pytest.raises(ValueError, match=r"max_steps must be in \[1, 500\] .*got .*; give a whole number of steps"):
        check_max_steps(max_steps)
    check_max_steps(np.int64(50))  # read from a file's attributes


@needs_sim
@pytest.mark.parametrize("shape", [(10,), (38,), (40, 40, 3)])
def test_the_scripted_expert_refuses_a_state_that_is_not_the_envs_39_d_state(reach_env, shape):
    """The experts slice the state by position: a 10-D one gave the action [0, 0, 0, 0] without an error."""
    with pytest.raises(ValueError, match=rf"reads the 39-D state of MetaWorldEnv.state, got shape \({shape[0]},"):
        expert_policy("reach-v3")(np.ones(shape))
    reach_env.reset(seed=1, render=False)
    expert = expert_policy("reach-v3")
    np.testing.assert_array_equal(expert(reach_env.state[None]), expert(reach_env.state))


def test_waiting_for_an_env_that_was_sent_nothing_says_to_send_first():
    """step_wait without step_async said "replies are read in the order the commands were sent (next pending: [])"."""
    import multiprocessing as mp
    from types import SimpleNamespace

    from worldvla.sim import workers

    w = workers._Worker.__new__(workers._Worker)
    w.conn, worker_end = mp.Pipe()
    w.proc, w.started, w.rank, w.stride, w.pending = SimpleNamespace(pid=321), True, 0, 2, workers.deque()
    env = workers.RemoteEnv(w, 2, "reach-v3", "reach the goal")  # the pool's env 4
    with pytest.raises(RuntimeError, match=r"^env 4: no command of it awaits a reply; call step_async \(expert_async\) "
                                           r"before step_wait \(expert_wait\)$"):
        env.step_wait()
    assert not worker_end.poll(0)  # nothing was sent


@pytest.mark.parametrize("n_envs, n_workers", [(2.0, 1), (True, 1), (2, 1.5)])
def test_a_pool_refuses_counts_that_are_not_whole_numbers(monkeypatch, n_envs, n_workers):
    """n_envs=2.0 failed on a bare "'float' object cannot be interpreted as an integer"; True made one env."""
    from worldvla.sim.workers import EnvWorkers

    made = _fake_workers(monkeypatch)
    with pytest.raises(ValueError, match=rf"need n_envs >= 1 and workers >= 1, got n_envs={n_envs!r}, "
                                         rf"workers={n_workers!r}; give whole numbers"):
        EnvWorkers("reach-v3", n_envs, workers=n_workers)
    assert made == []


@pytest.mark.parametrize("tasks", [None, 5])
def test_a_task_list_that_is_not_names_is_refused_naming_what_to_give(tasks):
    from worldvla.sim import task_list

    with pytest.raises(ValueError, match=rf"tasks must be Meta-World task names like .* \(--tasks\), got {tasks}"):
        task_list(tasks)


def _stand_in_episodes(monkeypatch, ran):
    """`collect`'s episodes stood in (in this process, workers=1): each succeeds with 2 frames whose pixels hold
    its seed and actions that hold its noise setting; `ran` gets each job's (episode, attempt)."""
    from worldvla.data import collect as col

    def run_episode(job):
        ran.append((job["episode"], job["attempt"]))
        return {**job, "frames": np.full((2, 8, 8, 3), job["seed"] % 251, np.uint8),
                "actions": np.full((2, 4), job["noise"], np.float32), "success": True, "steps": 2, "seconds": 0.0,
                "setup_seconds": 0.0}

    monkeypatch.setattr(col, "run_episode", run_episode)
    return col


@needs_sim
def test_an_overwritten_task_file_of_other_settings_lends_none_of_its_episodes(tmp_path, monkeypatch):
    """With --overwrite, a task file of other settings (another noise here) holding fewer episodes than asked for
    is replaced whole: none of its episodes is kept as one of this command's, though their seeds are the same."""
    from worldvla.data.hdf5 import demo_file_info

    ran = []
    col = _stand_in_episodes(monkeypatch, ran)
    col.collect(["reach-v3"], 1, tmp_path, image_size=8, seed=5, action_noise=0.5, progress=False)
    ran.clear()
    s = col.collect(["reach-v3"], 2, tmp_path, image_size=8, seed=5, progress=False, overwrite=True)
    assert ran == [(0, 0), (1, 0)] and (s["tasks"]["reach-v3"]["episodes"], s["tasks"]["reach-v3"]["reused"]) == (2, 0)
    demos = read_demos(tmp_path / "reach-v3.hdf5")
    assert [float(np.abs(d.actions).max()) for d in demos] == [0.0, 0.0]  # none of the noisy file's episodes
    assert demo_file_info(tmp_path / "reach-v3.hdf5")["attrs"]["action_noise"] == 0.0


@needs_sim
def test_episodes_of_other_cameras_in_one_process_each_render_their_own(monkeypatch):
    """The envs kept for reuse in a process are told apart by their camera: an episode of another camera after
    one of the corner camera (two collections in one process) must not render the first env's view."""
    from worldvla.data import collect as col
    from worldvla.sim import metaworld_env

    monkeypatch.setattr(metaworld_env, "expert_policy", lambda task: lambda state: np.zeros(4))
    job = {"task": "reach-v3", "image_size": 16, "noise": 0.0, "seed": 3, "episode": 0, "attempt": 0,
           "max_steps": 1}
    try:
        got = {cam: col.run_episode({**job, "camera": cam})["frames"][0] for cam in ("corner", "topview")}
    finally:
        col._close_envs()
    for cam, frame in got.items():
        with make_env("reach-v3", seed=0, image_size=16, camera=cam, max_steps=1) as env:
            np.testing.assert_array_equal(frame, env.reset(seed=3))
    assert not np.array_equal(got["corner"], got["topview"])


@needs_sim
def test_a_collection_worker_that_dies_stops_the_collection_naming_the_broken_pool(tmp_path, monkeypatch):
    """A worker killed mid-collection (the OOM killer) breaks the pool: collect raises, neither waiting for that
    worker's episode without end nor going on without it as if the episode had never been asked for. The error is
    an OSError, which the command line reports in one line, saying what to do (the pool's own error was a
    RuntimeError, printed with its traceback, saying only that a process "terminated abruptly")."""
    import multiprocessing as mp
    import signal
    from concurrent.futures import ProcessPoolExecutor

    from worldvla.data import collect as col

    class KilledPool(ProcessPoolExecutor):
        """Kills one of its workers once both are started (a submit starts one while fewer run). Not sooner: a
        worker started while Python 3.11's pool handles the death of another is never terminated by it, and the
        pool's shutdown waits for that worker without end."""

        def __init__(self, *args, **kwargs):
            self.before, self.killed = set(mp.active_children()), False
            super().__init__(*args, **kwargs)

        def submit(self, fn, *args, **kwargs):
            fut = super().submit(fn, *args, **kwargs)
            workers = [p for p in mp.active_children() if p not in self.before]
            if not self.killed and len(workers) == 2:
                self.killed = True
                os.kill(workers[0].pid, signal.SIGKILL)
            return fut

    monkeypatch.setattr(col, "ProcessPoolExecutor", KilledPool)
    t0 = time.monotonic()
    with pytest.raises(ChildProcessError, match=r"a collect worker process died while running an episode \(killed by "
                       r"the out-of-memory killer.*use fewer --workers.*run the same command again to go on"):
        col.collect(["reach-v3"], 2, tmp_path, image_size=8, max_steps=5, max_attempts=1, workers=2, progress=False)
    assert time.monotonic() - t0 < 120 and not (tmp_path / "reach-v3.hdf5").exists()


@needs_sim
def test_a_worker_started_while_the_pool_handles_a_dead_one_does_not_hang_the_collection(tmp_path, monkeypatch):
    """Python 3.11's pool terminates the workers it has when it finds one dead; a worker that a submit was starting
    at that moment is never terminated by it, and the pool's shutdown waited for that worker without end: a hung
    `worldvla collect` after a crash. The interleaving is forced here (the second worker is started once the pool
    is marked broken); collect must still end with its one-line error, in seconds."""
    import multiprocessing as mp
    import signal
    import threading
    from concurrent.futures import ProcessPoolExecutor

    from worldvla.data import collect as col

    class LateTable(dict):
        """The pool's table of workers. The second worker, started, kills the first one and enters the table only
        once the pool has terminated the workers it had (its call queue's reader closed): alive, as in the race."""

        def __setitem__(self, pid, proc):
            if self:
                os.kill(next(iter(self.values())).pid, signal.SIGKILL)
                deadline = time.monotonic() + 30
                while not self.pool._call_queue._reader.closed and time.monotonic() < deadline:
                    time.sleep(0.005)
            super().__setitem__(pid, proc)

    class LatePool(ProcessPoolExecutor):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._processes = LateTable()
            self._processes.pool = self

    monkeypatch.setattr(col, "ProcessPoolExecutor", LatePool)
    before = set(mp.active_children())
    raised = []

    def run():
        try:
            col.collect(["reach-v3"], 2, tmp_path, image_size=8, max_steps=5, max_attempts=1, workers=2,
                        progress=False)
        except BaseException as e:  # noqa: BLE001  (checked below)
            raised.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(60)
    hung = t.is_alive()
    for p in set(mp.active_children()) - before:  # a hung run's workers, so the test process can end
        p.kill()
    t.join(10)
    assert not hung, "collect still waited for a worker 60 s after the pool broke"
    assert len(raised) == 1 and isinstance(raised[0], ChildProcessError), raised
    assert "a collect worker process died while running an episode" in str(raised[0])


def test_a_worker_process_that_dies_before_its_start_up_reply_is_blamed_on_the_main_guard(monkeypatch):
    """A real worker that ends before it sends its start-up reply (a script evaluating at its top level, re-run
    by the worker) is named as one that died before it started, with the `__main__` advice."""
    import multiprocessing as mp

    from worldvla.sim import workers

    monkeypatch.setattr(workers, "_serve", lambda conn, *args: os._exit(3))
    w = workers._Worker(mp.get_context("fork"), "reach-v3", 1, 8, 10, {})
    try:
        with pytest.raises(ChildProcessError, match=r"env worker process \d+ died \(exit code 3\) before it started; .*"
                                               r"if __name__ == \"__main__\":"):
            w.reply()
    finally:
        workers._close_workers([w], timeout=1.0)


@needs_sim
def test_an_action_reaches_meta_world_unchanged_and_its_reward_and_success_come_back(reach_env):
    """The env passes an action in [-1, 1] to Meta-World as it is: a scaled or reordered one moves the hand another
    way than the action recorded with the episode. Meta-World's own step gives the reference, also for the reward
    and the success flag the step returns (this step's reward is > 0 and its success false)."""
    a = np.array([0.7, -0.4, 0.9, 0.3])
    reach_env.reset(seed=3, render=False)
    want, want_reward, _, _, info = reach_env._env.step(a)
    reach_env.reset(seed=3, render=False)
    _, reward, success, done = reach_env.step(a, render=False)
    np.testing.assert_array_equal(reach_env.state, want)
    assert (reward, success, done) == (float(want_reward), False, False) and reward > 0 and not info["success"]
    assert np.abs(reach_env.state[:3] - reach_env.state[18:21]).max() > 1e-3  # the hand moved this step


def test_each_tasks_instruction_names_its_own_direction_not_the_opposite_one():
    """The instruction is all the model is told of the task: a lock task's instruction saying "unlock" (or an
    open task's saying "close") trains and evaluates it on the opposite of what the task scores."""
    opposite = {"open": "close", "close": "open", "push": "pull", "pull": "push", "lock": "unlock", "unlock": None}
    checked = []
    for task, text in TASKS.items():
        words = text.split()
        for w in (w for w in task.split("-") if w in opposite):
            o = opposite[w]
            assert w in words or w + "d" in words, (task, text)
            assert o is None or not (o in words or o + "d" in words), (task, text)
            checked.append(task)
    assert len(checked) == 21 and len(set(TASKS.values())) == len(TASKS) == 50


@needs_sim
def test_an_expert_episode_starts_from_its_own_seeds_layout_with_the_experts_actions(reach_env, monkeypatch):
    """`expert_episode(env, seed)` records the layout of `seed`, not the env's own seed's, and its actions are the
    task's expert's for the states it went through."""
    from worldvla.sim.metaworld_env import expert_episode

    monkeypatch.setattr(reach_env, "max_steps", 2)
    episode = expert_episode(reach_env, seed=7)
    first = reach_env.reset(seed=7)
    want = expert_policy("reach-v3")(reach_env.state)
    np.testing.assert_array_equal(episode["frames"][0], first)
    assert not np.array_equal(first, reach_env.reset(seed=reach_env.seed))
    assert episode["seed"] == 7 and episode["actions"].shape == (2, 4)
    np.testing.assert_array_equal(episode["actions"][0], want)


@needs_sim
def test_a_pool_found_broken_when_the_next_episode_is_sent_is_reported_as_a_dead_worker(tmp_path, monkeypatch):
    """A worker can die between the wait that returned a finished episode and the sending of the next one: the
    pool then refuses the submit itself. That is the same dead worker, reported the same way (one line on the
    command line, with what to do), not the pool's own RuntimeError and its traceback."""
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    from worldvla.data import collect as col

    class BrokenOnThirdSubmit(ProcessPoolExecutor):
        def submit(self, fn, *args, **kwargs):
            self.sent = getattr(self, "sent", 0) + 1
            if self.sent == 3:
                raise BrokenProcessPool("A child process terminated abruptly, the process pool is not usable anymore")
            return super().submit(fn, *args, **kwargs)

    monkeypatch.setattr(col, "ProcessPoolExecutor", BrokenOnThirdSubmit)
    with pytest.raises(ChildProcessError, match=r"a collect worker process died while running an episode .*run the "
                                                r"same command again to go on"):
        col.collect(["reach-v3"], 3, tmp_path, image_size=8, max_steps=2, max_attempts=1, workers=2,
                    progress=False)
    assert not (tmp_path / "reach-v3.hdf5").exists()


@pytest.mark.parametrize("sig", ["SIGSEGV", "SIGBUS", "SIGABRT", "SIGILL", "SIGFPE"])
def test_a_worker_killed_by_a_crash_signal_is_named_as_a_simulator_crash(sig):
    """Every crash signal (an abort in the renderer's library too, not only a segfault) points at the simulator
    and its renderer, not at another process that sent the signal."""
    import signal

    from worldvla.sim.workers import _exit_cause

    code = -int(getattr(signal, sig))
    msg = _exit_cause(code)
    assert msg.startswith(f"exit code {code}, killed by {sig}: a crash in the simulator or its renderer"), msg
    assert "sent by another process" not in msg


def test_a_worker_ended_by_a_signal_without_a_name_is_named_by_its_number():
    """A signal number Python has no name for is named by that number (positive), with the exit code as it is."""
    from worldvla.sim.workers import _exit_cause

    assert _exit_cause(-200) == "exit code -200, killed by signal 200, sent by another process"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the forkserver is started on Linux only")
def test_getting_the_workers_context_leaves_the_callers_ctrl_c_handler_as_it_was():
    """The forkserver is started with SIGINT ignored; the caller's own handler is put back afterwards, so Ctrl-C
    still reaches the command (or notebook) that builds the pool."""
    import signal

    from worldvla.sim.workers import mp_context

    def mine(signum, frame):  # the caller's handler
        pass

    before = signal.signal(signal.SIGINT, mine)
    try:
        assert mp_context().get_start_method() == "forkserver"
        assert signal.getsignal(signal.SIGINT) is mine
    finally:
        signal.signal(signal.SIGINT, before)


def test_a_task_list_refusal_names_the_option_the_caller_gives_to_fix():
    """`fix` names what the user should change: an unknown task and a list naming none both say it."""
    from worldvla.sim import task_list

    with pytest.raises(ValueError, match=r"^unknown Meta-World task 'zzz'; nothing was run: fix --eval-tasks; "):
        task_list("reach-v3,zzz", fix="--eval-tasks")
    with pytest.raises(ValueError, match=r"^no tasks given; .* \(--eval-tasks\)$"):
        task_list(" , ", fix="--eval-tasks")


@needs_sim
def test_only_the_corner_camera_is_turned_upright_the_others_come_as_meta_world_renders_them(reach_env):
    """The corner camera's frames are rotated by 180 degrees; another camera's (topview here) are Meta-World's own
    frames, neither rotated nor flipped."""
    corner = reach_env.reset(seed=1)
    reach_env._viewer.make_context_current()
    np.testing.assert_array_equal(corner, reach_env._raw.render()[::-1, ::-1])
    with make_env("reach-v3", image_size=16, camera="topview") as env:
        frame = env.reset(seed=1)
        env._viewer.make_context_current()
        raw = env._raw.render()
    assert frame.std() > 0 and not np.array_equal(raw, raw[::-1, ::-1])  # a rotation would show
    np.testing.assert_array_equal(frame, raw)


@needs_sim
def test_shadows_reflections_and_the_skybox_are_off(reach_env):
    """Each of the three costs render time on a CPU renderer and none is needed by the model: all are off."""
    flags = reach_env._viewer.scn.flags
    rnd = reach_env._mujoco.mjtRndFlag
    assert [int(flags[f]) for f in (rnd.mjRND_SHADOW, rnd.mjRND_REFLECTION, rnd.mjRND_SKYBOX)] == [0, 0, 0]


@needs_sim
def test_an_episode_that_ended_on_success_stays_done_away_from_the_goal(reach_env):
    """`done` is true once the task succeeded (terminate_on_success): a step taken after that (not refused before
    the step limit) still says done, also when the hand has left the goal and the step itself is no success."""
    expert = expert_policy("reach-v3")
    reach_env.reset(seed=1, render=False)
    done = False
    while not done:
        _, _, _, done = reach_env.step(expert(reach_env.state), render=False)
    assert reach_env.success and reach_env.t < reach_env.max_steps - 40
    for _ in range(40):  # up, away from the goal
        _, _, at_goal, done = reach_env.step(np.array([0.0, 0.0, 1.0, 0.0]), render=False)
        assert done
        if not at_goal:
            break
    assert not at_goal and done and reach_env.success


@needs_sim
def test_an_expert_episode_that_succeeds_on_its_last_allowed_step_is_a_success():
    """The reach expert reaches layout 1's goal on step 51: with a limit of 51 steps that last step is a success
    (done, as it is the limit too), with a limit of 50 the episode ends one step short of it."""
    from worldvla.sim.metaworld_env import expert_episode

    with make_env("reach-v3", seed=0, image_size=8, max_steps=51) as env:
        episode = expert_episode(env, seed=1)
        assert episode["success"] is True and len(episode["actions"]) == 51 and env.t == 51
    with make_env("reach-v3", seed=0, image_size=8, max_steps=50) as env:
        episode = expert_episode(env, seed=1)
        assert episode["success"] is False and len(episode["actions"]) == 50


@needs_sim
def test_the_largest_env_seed_meta_world_takes_is_accepted():
    """An env's seed is refused from 2**32 on, not below: 2**32 - 1 is a seed of its own."""
    with make_env("reach-v3", seed=(1 << 32) - 1, image_size=8) as env:
        assert env.seed == (1 << 32) - 1 and env.reset().shape == (8, 8, 3)


@needs_sim
def test_a_pools_env_settings_reach_the_envs_in_its_workers():
    """Env settings beyond the frame size and step limit (the camera, as evaluation passes it) reach the envs built
    in the worker processes: a pool's topview env gives the frame a topview env gives in this process."""
    from worldvla.sim.workers import EnvWorkers

    with make_env("reach-v3", seed=0, image_size=16, camera="topview", max_steps=20) as local:
        want = local.reset(seed=3)
    with EnvWorkers("reach-v3", 1, image_size=16, max_steps=20, workers=1, camera="topview") as pool:
        got = pool.envs[0].reset(seed=3)
    np.testing.assert_array_equal(got, want)


def test_closing_a_pool_closes_its_end_of_each_workers_pipe():
    """A closed pool keeps no pipe to its workers open: each worker's connection is closed with it, the worker that
    had ended by itself too."""
    import multiprocessing as mp

    from worldvla.sim.workers import EnvWorkers, _Worker

    ctx = mp.get_context("fork")
    made = []
    for target in (int, time.sleep):  # one that has ended, one that reads no "close" and is killed
        w = _Worker.__new__(_Worker)
        w.conn, _ = ctx.Pipe()
        w.proc = ctx.Process(target=target, args=(0,) if target is int else (60,), daemon=True)
        w.proc.start()
        made.append(w)
    made[0].proc.join(timeout=10)
    pool = EnvWorkers.__new__(EnvWorkers)
    pool._workers = list(made)
    pool.close(timeout=0.5)
    assert [w.conn.closed for w in made] == [True, True]
    assert [w.proc.exitcode for w in made] == [0, -9]


def test_a_dropped_worker_whose_process_hangs_is_killed_not_left_running(monkeypatch):
    """Once neither its pool nor any env of it is left, a worker is closed as EnvWorkers.close closes it: one hung in
    the simulator (it reads no "close", so its pipe closing does not end it) is killed, not left running."""
    import multiprocessing as mp
    import signal

    from worldvla.sim import workers

    close = workers._close_workers
    monkeypatch.setattr(workers, "_close_workers", lambda ws, timeout=10.0: close(ws, 0.5))  # no 10 s wait here
    ctx = mp.get_context("fork")
    w = workers._Worker.__new__(workers._Worker)
    w.conn, worker_end = ctx.Pipe()
    w.proc = proc = ctx.Process(target=time.sleep, args=(60,), daemon=True)
    proc.start()
    w.spawned = True
    try:
        del w
        gc.collect()
        proc.join(timeout=5)
        assert proc.exitcode == -signal.SIGKILL
    finally:
        if proc.is_alive():
            proc.kill()
            proc.join(timeout=5)
