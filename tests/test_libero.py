"""The LIBERO harness (spec section 6) driven by a stand-in environment with LIBERO's
observation / step interface."""
from __future__ import annotations

import os

import numpy as np
import pytest

from worldvla.eval import libero
from worldvla.tokens.actions import LIBERO_MAX, LIBERO_MIN


class FakeLiberoEnv:
    """Frames encode the step count, so the test can tell which frame the policy saw;
    `done` after `succeed_at` steps (or never)."""

    def __init__(self, size=8, succeed_at=None, fail_at=None, rng=None):
        self.size, self.succeed_at, self.fail_at = size, succeed_at, fail_at
        self.rng = rng or np.random.default_rng()
        self.actions: list[list[float]] = []
        self.t = 0
        self.closed = False
        self.init_state = None

    def _obs(self):
        img = self.rng.integers(0, 256, size=(self.size, self.size + 3, 3), dtype=np.uint8)
        img[0, 0, 0] = self.t  # step stamp in the raw (upside-down) frame's first pixel
        self.raw_frames.append(img.copy())
        return {"agentview_image": img, "robot0_eef_pos": np.zeros(3)}

    def reset(self):
        self.t = 0
        self.actions = []
        self.raw_frames = []
        return self._obs()

    def set_init_state(self, state):
        self.init_state = state
        return self._obs()

    def step(self, action):
        assert isinstance(action, list) and len(action) == 7
        self.actions.append(action)
        self.t += 1
        if self.fail_at is not None and self.t == self.fail_at:
            raise RuntimeError("simulated physics failure")
        done = self.succeed_at is not None and self.t >= self.succeed_at
        return self._obs(), float(done), done, {}

    def close(self):
        self.closed = True


class RecordingPolicy:
    """Returns distinct, known chunks and records the frames it was shown."""

    def __init__(self, k=3, rng=None):
        self.k = k
        self.action_dim = 7
        self.image_size = 8
        self.calls: list[tuple[np.ndarray, np.ndarray | None]] = []
        self.chunks: list[np.ndarray] = []
        self.instructions = []
        self.rng = rng or np.random.default_rng()

    def reset(self, instruction):
        self.instructions.append(instruction)

    def act(self, image, history=None):
        self.calls.append((image.copy(), None if history is None else history.copy()))
        chunk = self.rng.uniform(-0.9, 0.9, size=(self.k, 7))
        self.chunks.append(chunk)
        return chunk

    def metadata(self):
        return {"action_low": list(LIBERO_MIN), "action_high": list(LIBERO_MAX)}


class FakeSuite:
    name = "fake_suite"

    def __init__(self, envs, max_steps):
        self.envs, self.max_steps = envs, max_steps

    @property
    def n_tasks(self):
        return len(self.envs)

    def instruction(self, task_id):
        return f"do task {task_id}"

    def init_states(self, task_id):
        return [f"state{task_id}-{i}" for i in range(5)]

    def make_env(self, task_id):
        return self.envs[task_id]


def test_episode_settles_rotates_and_runs_chunks_in_order():
    rng = np.random.default_rng()
    k, max_steps = 3, 7
    env = FakeLiberoEnv(rng=rng)
    pol = RecordingPolicy(k=k, rng=rng)
    query = libero.ChunkQuery(pol)
    r = libero.run_episode(env, pol, query, "put the bowl on the plate", "s0", max_steps=max_steps)
    assert env.init_state == "s0" and pol.instructions == ["put the bowl on the plate"]
    assert r["success"] is False and r["error"] is None
    # 10 settle steps with the dummy action, then exactly max_steps policy actions.
    assert len(env.actions) == libero.SETTLE_STEPS + max_steps
    assert all(a == list(libero.DUMMY_ACTION) for a in env.actions[:libero.SETTLE_STEPS])
    # Chunks executed open-loop, in order: queries at policy steps 0, 3, 6.
    executed = np.asarray(env.actions[libero.SETTLE_STEPS:])
    expected = np.concatenate(pol.chunks)[:max_steps]
    np.testing.assert_array_equal(executed, expected)
    assert len(pol.calls) == -(-max_steps // k) == r["queries"]
    # Frames: rotated by 180 degrees; history = the previous env step's frame (none at first).
    raw = env.raw_frames  # [reset, init, settle obs 1..10, policy obs ...]
    for q, (img, hist) in enumerate(pol.calls):
        t = libero.SETTLE_STEPS + q * k  # env step count when the frame was observed
        np.testing.assert_array_equal(img, raw[1 + t][::-1, ::-1])
        assert img.flags["C_CONTIGUOUS"]
        if q == 0:
            assert hist is None
        else:
            np.testing.assert_array_equal(hist, raw[1 + t - 1][::-1, ::-1])


def test_success_is_done_and_exception_is_failure():
    rng = np.random.default_rng()
    env = FakeLiberoEnv(rng=rng, succeed_at=libero.SETTLE_STEPS + 4)
    pol = RecordingPolicy(k=2, rng=rng)
    r = libero.run_episode(env, pol, libero.ChunkQuery(pol), "x", None, max_steps=50)
    assert r["success"] and len(env.actions) == libero.SETTLE_STEPS + 4

    env = FakeLiberoEnv(rng=rng, fail_at=libero.SETTLE_STEPS + 2)
    r = libero.run_episode(env, pol, libero.ChunkQuery(pol), "x", None, max_steps=50)
    assert not r["success"] and "simulated physics failure" in r["error"]


def test_evaluate_suite_counts_and_uses_init_states(tmp_path):
    rng = np.random.default_rng()
    envs = [FakeLiberoEnv(rng=rng, succeed_at=libero.SETTLE_STEPS + 3), FakeLiberoEnv(rng=rng)]
    suite = FakeSuite(envs, max_steps=5)
    pol = RecordingPolicy(k=2, rng=rng)
    res = libero.evaluate_suite(pol, suite, episodes=3, out_dir=tmp_path, progress=False)
    assert res["tasks"]["0"]["success_rate"] == 1.0 and res["tasks"]["1"]["success_rate"] == 0.0
    assert res["success_rate"] == pytest.approx(0.5)
    assert envs[1].init_state == "state1-2" and all(e.closed for e in envs)
    assert (tmp_path / "libero_results.json").is_file()
    assert res["latency"]["queries"] > 0
    # A task named twice runs once: it counted twice in the suite's rate (an always-successful task read 0.5).
    envs = [FakeLiberoEnv(rng=rng, succeed_at=libero.SETTLE_STEPS + 3)]
    twice = libero.evaluate_suite(pol, FakeSuite(envs, max_steps=5), episodes=2, tasks=[0, 0],
                                  out_dir=tmp_path / "twice", progress=False)
    assert twice["success_rate"] == 1.0 and list(twice["tasks"]) == ["0"]


def test_bounds_and_suite_checks():
    pol = RecordingPolicy()
    pol.metadata = lambda: {"action_low": [-1.0] * 7, "action_high": [1.0] * 7}
    with pytest.raises(ValueError, match="fixed LIBERO bounds"):
        libero.check_bounds(pol)
    libero.check_bounds(pol, allow_mismatch=True)
    # Metadata naming one bound only: that bound is still checked (it was skipped with the other missing).
    pol.metadata = lambda: {"action_high": [1.0] * 7}
    with pytest.raises(ValueError, match="fixed LIBERO bounds"):
        libero.check_bounds(pol)
    from worldvla.tokens.actions import LIBERO_MAX, LIBERO_MIN
    pol.metadata = lambda: {"action_low": list(LIBERO_MIN)}
    libero.check_bounds(pol)
    pol.metadata = lambda: {"action_low": list(LIBERO_MIN), "action_high": list(LIBERO_MAX)}
    libero.check_bounds(pol)
    pol.action_dim = 4
    with pytest.raises(ValueError, match="7-D"):
        libero.check_bounds(pol)
    with pytest.raises(ValueError, match="unknown LIBERO suite"):
        libero.LiberoSuite("libero_90")
    assert libero.MAX_STEPS == {"libero_spatial": 220, "libero_object": 280, "libero_goal": 300, "libero_10": 520}


def test_too_few_initial_states_are_refused_before_the_first_episode():
    """A task with fewer initial states than --episodes was found when its turn came, possibly hours in."""
    rng = np.random.default_rng()

    class ShortLast(FakeSuite):
        def init_states(self, task_id):
            return super().init_states(task_id)[:3 if task_id == 1 else 5]

    envs = [FakeLiberoEnv(rng=rng), FakeLiberoEnv(rng=rng)]
    with pytest.raises(ValueError, match="--episodes 4 needs as many initial states per task; task 1 has 3"):
        libero.evaluate_suite(RecordingPolicy(k=2, rng=rng), ShortLast(envs, max_steps=5), episodes=4, progress=False)
    assert envs[0].init_state is None  # no episode ran


def test_each_tasks_initial_states_are_read_once():
    """The initial states were read for the check before the first episode and again when the task came up
    (LIBERO's suite loads them from a file each time); the episodes run from the ones checked."""
    rng = np.random.default_rng()
    read = []

    class Counting(FakeSuite):
        def init_states(self, task_id):
            read.append(task_id)
            return super().init_states(task_id)

    envs = [FakeLiberoEnv(rng=rng), FakeLiberoEnv(rng=rng)]
    libero.evaluate_suite(RecordingPolicy(k=2, rng=rng), Counting(envs, max_steps=3), episodes=2, progress=False)
    assert read == [0, 1] and [e.init_state for e in envs] == ["state0-1", "state1-1"]


def test_missing_libero_names_what_to_install(capsys):
    import importlib

    pytest.importorskip("argparse")
    try:
        importlib.import_module("libero")
        pytest.skip("LIBERO is installed here")
    except ImportError:
        pass
    with pytest.raises(ImportError, match="LIBERO"):
        libero.LiberoSuite("libero_goal")
    import argparse

    args = libero.add_arguments(argparse.ArgumentParser()).parse_args(["--policy", "nowhere"])
    assert libero.run(args) == 2
    assert "pip install" in capsys.readouterr().err
    # Results are saved by default (a run without --out kept nothing of its hours on a crash); an empty --out is
    # refused before anything loads.
    assert libero.add_arguments(argparse.ArgumentParser()).parse_args(["--policy", "x"]).out == "libero_eval"
    args = libero.add_arguments(argparse.ArgumentParser()).parse_args(["--policy", "nowhere", "--out", ""])
    with pytest.raises(ValueError, match="--out names no folder"):
        libero.run(args)


class InterruptAfter(RecordingPolicy):
    """Stops the process (like Ctrl-C or a kill) at its `n`-th query."""

    def __init__(self, n, **kw):
        super().__init__(**kw)
        self.n = n

    def act(self, image, history=None):
        if len(self.calls) + 1 == self.n:
            raise KeyboardInterrupt
        return super().act(image, history)


@pytest.fixture
def policy_and_out(tmp_path):
    """A policy folder (its files key the saved results) and an evaluation folder."""
    folder = tmp_path / "policy"
    folder.mkdir()
    (folder / "policy.json").write_text("{}")
    return folder, tmp_path / "eval"


def test_results_are_saved_after_every_episode_and_a_rerun_resumes(policy_and_out):
    """libero_results.json used to be written once, at the end: a crash lost every episode."""
    import json

    rng = np.random.default_rng()
    folder, out = policy_and_out

    def suite():
        return FakeSuite([FakeLiberoEnv(rng=rng, succeed_at=libero.SETTLE_STEPS + 3), FakeLiberoEnv(rng=rng)],
                         max_steps=5)

    # One query per episode of task 0 (succeeds within a chunk of 3): stop in its third episode.
    with pytest.raises(KeyboardInterrupt):
        libero.evaluate_suite(InterruptAfter(3, k=3, rng=rng), suite(), episodes=3, out_dir=out, progress=False,
                              policy_path=folder)
    saved = json.loads((out / "libero_results.json").read_text())
    assert saved["complete"] is False and saved["tasks"]["0"]["episode_success"] == [True, True]

    rerun = suite()
    res = libero.evaluate_suite(RecordingPolicy(k=3, rng=rng), rerun, episodes=3, out_dir=out, progress=False,
                                policy_path=folder)
    assert rerun.envs[0].init_state == "state0-2"  # only the missing episode ran on task 0
    assert res["tasks"]["0"]["episode_success"] == [True, True, True] and res["tasks"]["1"]["success_rate"] == 0.0
    assert json.loads((out / "libero_results.json").read_text())["complete"] is True

    # Everything saved: nothing runs; other policy files or resume=False run again.
    again = suite()
    libero.evaluate_suite(RecordingPolicy(k=3, rng=rng), again, episodes=3, out_dir=out, progress=False,
                          policy_path=folder)
    assert again.envs[0].init_state is None and again.envs[1].init_state is None
    again = suite()
    libero.evaluate_suite(RecordingPolicy(k=3, rng=rng), again, episodes=3, out_dir=out, progress=False,
                          policy_path=folder, resume=False)
    assert again.envs[0].init_state == "state0-2"
    (folder / "policy.json").write_text('{"retrained": true}')
    again = suite()
    libero.evaluate_suite(RecordingPolicy(k=3, rng=rng), again, episodes=1, out_dir=out, progress=False,
                          policy_path=folder)
    assert again.envs[0].init_state == "state0-0"


def test_results_are_keyed_by_the_fingerprint_taken_before_the_policy_loaded(policy_and_out):
    """The command fingerprinted the policy folder after loading it: a new export written meanwhile would have
    had the loaded weights' episodes saved as its own."""
    from worldvla.eval.metaworld import _policy_fingerprint

    rng = np.random.default_rng()
    folder, out = policy_and_out
    before = _policy_fingerprint(folder)
    (folder / "policy.json").write_text('{"exported": "again, while the old one was loading"}')
    suite = FakeSuite([FakeLiberoEnv(rng=rng)], max_steps=5)
    pol = RecordingPolicy(k=3, rng=rng)
    res = libero.evaluate_suite(pol, suite, episodes=1, out_dir=out, progress=False, policy_path=folder,
                                policy_fingerprint=before)
    assert res["key"] == libero._results_key(suite, pol, before)
    assert res["key"] != libero._results_key(suite, pol, _policy_fingerprint(folder))
    # A rerun on the new files does not take those episodes for its own.
    again = FakeSuite([FakeLiberoEnv(rng=rng)], max_steps=5)
    libero.evaluate_suite(RecordingPolicy(k=3, rng=rng), again, episodes=1, out_dir=out, progress=False,
                          policy_path=folder)
    assert again.envs[0].init_state == "state0-0"


def test_a_rerun_with_other_tasks_or_episodes_keeps_and_reuses_the_saved_ones(policy_and_out):
    """`--tasks 1` after a full run used to rewrite libero_results.json with task 1 only, and `--episodes 1`
    cut the saved episodes, so a later `--episodes 3` ran them again."""
    import json

    rng = np.random.default_rng()
    folder, out = policy_and_out

    def suite():
        return FakeSuite([FakeLiberoEnv(rng=rng, succeed_at=libero.SETTLE_STEPS + 3), FakeLiberoEnv(rng=rng),
                          FakeLiberoEnv(rng=rng)], max_steps=5)

    def evaluate(s, **kw):
        return libero.evaluate_suite(RecordingPolicy(k=3, rng=rng), s, out_dir=out, progress=False,
                                     policy_path=folder, **kw)

    def saved_episodes():
        return {k: v["episodes"] for k, v in json.loads((out / "libero_results.json").read_text())["tasks"].items()}

    first = evaluate(suite(), episodes=2)
    s = suite()
    res = evaluate(s, episodes=2, tasks=[1])
    assert list(res["tasks"]) == ["1"] and res["tasks"]["1"]["episodes"] == 2  # only the asked task reported
    assert s.envs[1].init_state is None  # reused
    assert saved_episodes() == {"0": 2, "1": 2, "2": 2}
    saved = json.loads((out / "libero_results.json").read_text())
    assert saved["run_tasks"] == [1] and saved["tasks"]["0"] == first["tasks"]["0"]

    s = suite()
    res = evaluate(s, episodes=1)
    assert all(t["episodes"] == 1 for t in res["tasks"].values()) and res["success_rate"] == pytest.approx(1 / 3)
    assert all(e.init_state is None for e in s.envs) and saved_episodes() == {"0": 2, "1": 2, "2": 2}

    s = suite()
    res = evaluate(s, episodes=3, tasks=[0, 2])
    assert s.envs[0].init_state == "state0-2" and s.envs[2].init_state == "state2-2"  # only the third episode ran
    assert s.envs[1].init_state is None
    assert res["tasks"]["0"]["episode_success"] == [True] * 3 and set(res["tasks"]) == {"0", "2"}
    assert saved_episodes() == {"0": 3, "1": 2, "2": 3}

    # resume=False runs the asked episodes again and still keeps the others.
    s = suite()
    evaluate(s, episodes=1, tasks=[0], resume=False)
    assert s.envs[0].init_state == "state0-0" and saved_episodes() == {"0": 3, "1": 2, "2": 3}


def test_another_policy_into_the_same_folder_keeps_the_first_ones_episodes(tmp_path):
    """libero_results.json held one policy's episodes: a run of policy B into the same --out replaced A's, and
    A's rerun started over. Two folders with identical files written within one clock tick also shared a
    fingerprint, so B reported A's saved episodes."""
    import json

    rng = np.random.default_rng()
    a, b = tmp_path / "a", tmp_path / "b"
    for folder in (a, b):
        folder.mkdir()
        (folder / "policy.json").write_text("{}")
    os.utime(b / "policy.json", ns=(os.stat(a / "policy.json").st_atime_ns, os.stat(a / "policy.json").st_mtime_ns))

    def run(folder):
        s = FakeSuite([FakeLiberoEnv(rng=rng, succeed_at=libero.SETTLE_STEPS + 3)], max_steps=5)
        libero.evaluate_suite(RecordingPolicy(k=3, rng=rng), s, episodes=2, out_dir=tmp_path / "eval",
                              progress=False, policy_path=folder)
        return s.envs[0].init_state

    assert run(a) == "state0-1"
    assert run(b) == "state0-1"  # B's own episodes, not A's
    assert run(a) is None  # A's episodes were kept: nothing runs again
    assert json.loads((tmp_path / "eval" / "libero_results.json").read_text())["tasks"]["0"]["episodes"] == 2


def test_steps_count_policy_actions_alike_on_success_and_failure():
    """`steps` used to hold the settle steps too and to be one short on success (4 policy actions gave
    13) while a failure counted every env step (max_steps + 10)."""
    rng = np.random.default_rng()
    pol = RecordingPolicy(k=2, rng=rng)
    env = FakeLiberoEnv(rng=rng, succeed_at=libero.SETTLE_STEPS + 4)
    r = libero.run_episode(env, pol, libero.ChunkQuery(pol), "x", None, max_steps=50)
    assert r["success"] and r["steps"] == 4 == len(env.actions) - libero.SETTLE_STEPS
    env = FakeLiberoEnv(rng=rng)
    r = libero.run_episode(env, pol, libero.ChunkQuery(pol), "x", None, max_steps=7)
    assert not r["success"] and r["steps"] == 7 == len(env.actions) - libero.SETTLE_STEPS
    env = FakeLiberoEnv(rng=rng, fail_at=libero.SETTLE_STEPS + 3)  # the third policy action raises
    r = libero.run_episode(env, pol, libero.ChunkQuery(pol), "x", None, max_steps=50)
    assert r["error"] and r["steps"] == 2


def test_mode_help_names_the_causal_default():
    """The help said the default was parallel; a model trained with plain causal attention decodes causally."""
    import argparse

    help_text = " ".join(libero.add_arguments(argparse.ArgumentParser()).format_help().split())
    assert "default: parallel, or causal for a model trained without the chunk mask" in help_text


# What LIBERO's libero/libero/__init__.py does on import when its config file is missing: ask on the terminal.
_FAKE_LIBERO_INIT = '''
import os

config_file = os.path.join(os.environ.get("LIBERO_CONFIG_PATH", os.path.expanduser("~/.libero")), "config.yaml")
if not os.path.exists(config_file):
    input("Do you want to specify a custom path for the dataset folder? (Y/N): ")


def get_libero_path(key):
    return "/libero/" + key
'''


@pytest.fixture
def fake_libero(tmp_path, monkeypatch):
    """A stand-in LIBERO package on sys.path, whose `libero.libero` calls input() without its config file;
    input() fails as in a batch job (EOFError). Yields the list of prompts input() got."""
    import sys

    root = tmp_path / "site"
    (root / "libero" / "libero").mkdir(parents=True)
    (root / "libero" / "__init__.py").write_text("")
    (root / "libero" / "libero" / "__init__.py").write_text(_FAKE_LIBERO_INIT)
    (root / "libero" / "libero" / "envs.py").write_text("class OffScreenRenderEnv:\n    pass\n")
    (root / "libero" / "libero" / "benchmark.py").write_text(
        "class Goal:\n    n_tasks = 10\n\n\ndef get_benchmark_dict():\n    return {'libero_goal': Goal}\n")
    monkeypatch.syspath_prepend(str(root))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("LIBERO_CONFIG_PATH", raising=False)
    prompts = []

    def no_terminal(prompt=""):
        prompts.append(prompt)
        raise EOFError("EOF when reading a line")

    monkeypatch.setattr("builtins.input", no_terminal)
    for name in [m for m in sys.modules if m == "libero" or m.startswith("libero.")]:
        monkeypatch.delitem(sys.modules, name)
    yield prompts
    for name in [m for m in sys.modules if m == "libero" or m.startswith("libero.")]:
        del sys.modules[name]


def test_a_missing_libero_config_is_named_instead_of_prompting(fake_libero, tmp_path, monkeypatch):
    """With LIBERO installed but no ~/.libero/config.yaml, LIBERO's first import asks for a dataset path with
    input(): a batch job hung there or died with EOFError. The harness names the missing file first."""
    import argparse
    import re

    home_config = re.escape(str(tmp_path / "home" / ".libero" / "config.yaml"))
    with pytest.raises(FileNotFoundError, match=rf"LIBERO's config file {home_config} is missing; .*"
                                                r"python -c 'import libero.libero'.*LIBERO_CONFIG_PATH"):
        libero.LiberoSuite("libero_goal")
    args = libero.add_arguments(argparse.ArgumentParser()).parse_args(["--policy", str(tmp_path / "nowhere"),
                                                                       "--out", str(tmp_path / "out")])
    with pytest.raises(FileNotFoundError, match="LIBERO's config file .* is missing"):  # before the policy loads
        libero.run(args)
    # LIBERO_CONFIG_PATH moves the file LIBERO reads, and the one checked.
    monkeypatch.setenv("LIBERO_CONFIG_PATH", str(tmp_path / "cfg"))
    with pytest.raises(FileNotFoundError, match=rf"LIBERO's config file {re.escape(str(tmp_path / 'cfg'))}/config"):
        libero.LiberoSuite("libero_goal")
    assert fake_libero == []  # LIBERO never got to ask
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "config.yaml").write_text("bddl_files: /libero/bddl_files\n")
    suite = libero.LiberoSuite("libero_goal")
    assert suite.n_tasks == 10 and suite._bddl_root == "/libero/bddl_files" and fake_libero == []


def test_eval_libero_checks_libero_once_before_the_policy_loads(fake_libero, tmp_path, monkeypatch):
    """`run` checked LIBERO (installed, config file there) before the policy loaded, and its `LiberoSuite` checked
    both again; they run once now, before the policy, and `LiberoSuite` alone still checks."""
    import argparse
    import sys
    import types

    from worldvla import inference

    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "config.yaml").write_text("bddl_files: /libero/bddl_files\n")
    monkeypatch.setenv("LIBERO_CONFIG_PATH", str(tmp_path / "cfg"))
    events = []
    check, import_module = libero._check_libero_config, libero.importlib.import_module
    monkeypatch.setattr(libero, "_check_libero_config", lambda: events.append("config") or check())
    monkeypatch.setattr(libero, "importlib", types.SimpleNamespace(
        import_module=lambda name: events.append(f"import {name}") or import_module(name)))
    monkeypatch.setattr(inference.WorldVLAPolicy, "from_pretrained",
                        lambda *a, **k: events.append("policy") or RecordingPolicy())
    monkeypatch.setattr(libero, "evaluate_suite", lambda policy, suite, **k: events.append(f"eval {suite.name}") or
                        {"suite": suite.name, "success_rate": 0.0, "tasks": {}})
    args = libero.add_arguments(argparse.ArgumentParser()).parse_args(
        ["--policy", str(tmp_path / "p"), "--suite", "libero_goal", "--out", str(tmp_path / "out")])
    assert libero.run(args) == 0
    assert events == ["import libero", "config", "import libero.libero", "policy", "eval libero_goal"]
    for name in [m for m in sys.modules if m == "libero" or m.startswith("libero.")]:
        del sys.modules[name]  # a library user's first suite: checked as the CLI checks
    events.clear()
    assert libero.LiberoSuite("libero_goal").n_tasks == 10
    assert events == ["import libero", "config", "import libero.libero"] and fake_libero == []


def _run_eval_libero(tmp_path, monkeypatch, policy, suite, *argv):
    """`libero.run` on `suite` with `policy` (LIBERO itself, the policy's loading and the suite stood in)."""
    import argparse

    from worldvla import inference

    monkeypatch.setattr(libero, "_require_libero", lambda: None)
    monkeypatch.setattr(libero, "LiberoSuite", lambda name, resolution: suite)
    monkeypatch.setattr(inference.WorldVLAPolicy, "from_pretrained", lambda *a, **k: policy)
    args = libero.add_arguments(argparse.ArgumentParser()).parse_args(
        ["--policy", str(tmp_path / "p"), "--out", str(tmp_path / "out"), "--no-progress", *argv])
    return libero.run(args)


def test_eval_libero_names_episodes_that_ended_on_an_error(tmp_path, monkeypatch, capsys):
    """Every exception in an episode (a policy out of memory, a simulator error) became a failed episode: the
    command printed the success rates only and exited 0, the errors were only in libero_results.json. It names
    them per task now, and exits 1 when every episode erred."""
    rng = np.random.default_rng()

    class Broken(RecordingPolicy):
        def act(self, image, history=None):
            raise RuntimeError("CUDA error: out of memory")

    suite = FakeSuite([FakeLiberoEnv(rng=rng), FakeLiberoEnv(rng=rng)], max_steps=5)
    assert _run_eval_libero(tmp_path, monkeypatch, Broken(rng=rng), suite, "--episodes", "2") == 1
    out, err = capsys.readouterr()
    for task in (0, 1):
        assert (f"task  {task}  2 of 2 episodes ended on an error (counted as failures); first: episode 0: "
                f"RuntimeError: CUDA error: out of memory") in out, out
    assert "4 episodes ended on an error" in out
    assert "every episode ended on an error" in err and "reruns the episodes that ended on an error" in err, err

    # Some episodes erred, not all: named, and the run still succeeds (the release counts them as failures).
    suite = FakeSuite([FakeLiberoEnv(rng=rng, fail_at=libero.SETTLE_STEPS + 2), FakeLiberoEnv(rng=rng)], max_steps=5)
    assert _run_eval_libero(tmp_path, monkeypatch, RecordingPolicy(rng=rng), suite, "--episodes", "1",
                            "--no-resume") == 0
    out, err = capsys.readouterr()
    assert "task  0  1 of 1 episodes ended on an error (counted as failures); first: episode 0: RuntimeError: " \
           "simulated physics failure" in out, out
    assert out.count("ended on an error (counted as failures)") == 1 and "every episode" not in err


def test_resume_runs_again_the_episodes_that_ended_on_an_error(tmp_path):
    """A saved episode that ended on an error (the policy or the simulator failed, not the task) is not a
    result: a resumed run starts again from the first such episode and keeps the saved ones before it."""
    rng = np.random.default_rng()

    class BrokenFrom(RecordingPolicy):
        def __init__(self, n_ok, **kw):
            super().__init__(**kw)
            self.n_ok = n_ok

        def reset(self, instruction):
            super().reset(instruction)
            if len(self.instructions) > self.n_ok:  # one reset per episode
                self.fail = True

        def act(self, image, history=None):
            if getattr(self, "fail", False):
                raise RuntimeError("CUDA error: out of memory")
            return super().act(image, history)

    suite = FakeSuite([FakeLiberoEnv(rng=rng)], max_steps=4)
    run = lambda policy: libero.evaluate_suite(policy, suite, episodes=3, out_dir=tmp_path, progress=False,  # noqa: E731
                                               policy_fingerprint="same policy files")
    first = run(BrokenFrom(1, rng=rng))["tasks"]["0"]
    assert first["episode_errors"][0] is None and all(first["episode_errors"][1:]), first
    again = RecordingPolicy(rng=rng)
    second = run(again)["tasks"]["0"]
    assert len(again.instructions) == 2, again.instructions  # episodes 1 and 2 ran again, episode 0 was reused
    assert second["errors"] == [] and second["episode_steps"][0] == first["episode_steps"][0], second


def test_repeated_tasks_options_add_up(tmp_path, monkeypatch):
    """`--tasks 0 --tasks 2` kept only the last one."""
    rng = np.random.default_rng()
    suite = FakeSuite([FakeLiberoEnv(rng=rng) for _ in range(3)], max_steps=2)
    assert _run_eval_libero(tmp_path, monkeypatch, RecordingPolicy(rng=rng), suite, "--episodes", "1",
                            "--tasks", "0", "--tasks", "2") == 0
    assert [e.init_state for e in suite.envs] == ["state0-0", None, "state2-0"]


def test_a_rerun_episode_keeps_only_its_new_gif(tmp_path):
    """--save-videos named each GIF after its outcome: an episode run again with the other outcome left both
    task00_ep000_failure.gif and task00_ep000_success.gif, the old one looking current."""
    rng = np.random.default_rng()
    out = tmp_path / "out"
    for succeed_at, tag in ((libero.SETTLE_STEPS + 3, "success"), (None, "failure"),
                            (libero.SETTLE_STEPS + 3, "success")):
        suite = FakeSuite([FakeLiberoEnv(rng=rng, succeed_at=succeed_at)], max_steps=5)
        libero.evaluate_suite(RecordingPolicy(rng=rng), suite, episodes=1, out_dir=out, save_videos=True,
                              progress=False, resume=False)
        assert sorted(p.name for p in out.glob("*.gif")) == [f"task00_ep000_{tag}.gif"]


def test_an_out_folder_inside_the_policy_folder_does_not_change_its_fingerprint(tmp_path):
    """The fingerprint hashed every file under the policy folder: with --out inside it, each run's own results
    changed it, so a rerun reused nothing and runs/ grew by a file a run."""
    folder = tmp_path / "policy"
    (folder / "model").mkdir(parents=True)
    (folder / "policy.json").write_text("{}")
    (folder / "model" / "model.safetensors").write_bytes(b"weights")
    out = folder / "libero_eval"
    rng = np.random.default_rng()

    def run():
        s = FakeSuite([FakeLiberoEnv(rng=rng)], max_steps=5)
        libero.evaluate_suite(RecordingPolicy(rng=rng), s, episodes=1, out_dir=out, progress=False,
                              policy_path=folder)
        return s.envs[0].init_state

    assert run() == "state0-0"
    assert run() is None  # reused: the results written into the folder are no part of the policy
    assert len(list((out / "runs").iterdir())) == 1
    (folder / "model" / "model.safetensors").write_bytes(b"retrained")  # the policy's own files still count
    assert run() == "state0-0"


def test_an_episode_whose_query_yields_no_action_fails_without_an_error(tmp_path, monkeypatch, capsys):
    """mode='release' may decode no action block; the release's loop fails the episode there. It was recorded as
    an error, so every resume ran it (and the task's later episodes) again, deterministically alike, and a policy
    that never wrote an action made the command exit 1 as if it had crashed. It is a failure now, counted apart."""
    rng = np.random.default_rng()

    class WritesNoActionIn(RecordingPolicy):  # greedy: the episodes from these initial states yield no action
        def __init__(self, states, **kw):
            super().__init__(**kw)
            self.states, self.bad = states, False

        def act(self, image, history=None):
            return np.zeros((0, 7)) if self.bad else super().act(image, history)

    class Env(FakeLiberoEnv):
        def set_init_state(self, state):
            policy.bad = state in policy.states
            return super().set_init_state(state)

    policy = WritesNoActionIn({"state0-1"}, rng=rng)
    suite = FakeSuite([Env(rng=rng, succeed_at=libero.SETTLE_STEPS + 2)], max_steps=5)
    run = lambda: libero.evaluate_suite(policy, suite, episodes=3, out_dir=tmp_path, progress=False,  # noqa: E731
                                        policy_fingerprint="same policy files")
    task = run()["tasks"]["0"]
    assert task["episode_success"] == [True, False, True] and task["errors"] == [], task
    assert task["ended_without_action"] == 1 and task["episode_no_action"] == [False, True, False]
    assert task["episode_steps"][1] == 0
    n = len(policy.instructions)
    again = run()["tasks"]["0"]  # everything reused: nothing to run again
    assert len(policy.instructions) == n and again["episode_success"] == [True, False, True]
    assert again["ended_without_action"] == 1

    policy = WritesNoActionIn({f"state{t}-{e}" for t in range(2) for e in range(5)}, rng=rng)
    suite = FakeSuite([Env(rng=rng), Env(rng=rng)], max_steps=5)
    assert _run_eval_libero(tmp_path, monkeypatch, policy, suite, "--episodes", "2") == 0
    out, err = capsys.readouterr()
    assert "task  0  2 of 2 episodes failed on a query that yielded no action" in out, out
    assert "ended on an error" not in out + err


def test_a_chunk_of_other_than_7_d_actions_ends_the_episode_before_it_reaches_the_env():
    """A policy trained on other data returns 6-D actions: the episode fails with an error naming the sizes, and
    no action of the wrong size is sent to the simulator."""
    rng = np.random.default_rng()

    class SixD(RecordingPolicy):
        def act(self, image, history=None):
            return super().act(image, history)[:, :6]

    env = FakeLiberoEnv(rng=rng)
    pol = SixD(rng=rng)
    r = libero.run_episode(env, pol, libero.ChunkQuery(pol), "x", None, max_steps=5)
    assert not r["success"] and r["steps"] == 0 and r["queries"] == 0
    assert r["error"] == "ValueError: the policy returned 6-D actions; LIBERO needs 7"
    assert len(env.actions) == libero.SETTLE_STEPS  # the settle steps only


def test_saved_episodes_are_not_reused_at_another_camera_size_or_step_limit(tmp_path):
    """What an episode's outcome depends on keys its saved results: the same policy files at another camera size
    or step limit run their episodes again, and back at the first settings reuse the first run's."""
    rng = np.random.default_rng()

    def run(resolution, max_steps):
        suite = FakeSuite([FakeLiberoEnv(rng=rng)], max_steps=max_steps)
        suite.resolution = resolution
        libero.evaluate_suite(RecordingPolicy(rng=rng), suite, episodes=1, out_dir=tmp_path, progress=False,
                              policy_fingerprint="same policy files")
        return suite.envs[0].init_state

    assert run(256, 5) == "state0-0"
    assert run(256, 5) is None  # reused
    assert run(512, 5) == "state0-0"  # another camera size
    assert run(256, 6) == "state0-0"  # another step limit
    assert run(256, 5) is None and run(512, 5) is None  # each kept beside the others


def test_task_ids_and_episodes_outside_the_suite_are_refused_before_any_episode():
    rng = np.random.default_rng()
    envs = [FakeLiberoEnv(rng=rng), FakeLiberoEnv(rng=rng)]
    suite = FakeSuite(envs, max_steps=3)
    with pytest.raises(ValueError, match=r"task ids \[2\] are outside this suite's 0..1"):
        libero.evaluate_suite(RecordingPolicy(rng=rng), suite, episodes=1, tasks=[0, 2], progress=False)
    for episodes in (0, -1):
        with pytest.raises(ValueError, match=f"episodes must be >= 1, got {episodes}"):
            libero.evaluate_suite(RecordingPolicy(rng=rng), suite, episodes=episodes, progress=False)
    assert all(e.init_state is None for e in envs)  # no episode ran


def test_as_many_episodes_as_initial_states_run_every_one():
    """FakeSuite has 5 initial states per task: --episodes 5 runs from each of them."""
    rng = np.random.default_rng()
    seen = []

    class Env(FakeLiberoEnv):
        def set_init_state(self, state):
            seen.append(state)
            return super().set_init_state(state)

    res = libero.evaluate_suite(RecordingPolicy(rng=rng), FakeSuite([Env(rng=rng)], max_steps=2), episodes=5,
                                progress=False)
    assert seen == [f"state0-{i}" for i in range(5)] and res["tasks"]["0"]["episodes"] == 5


def test_a_task_summary_averages_its_episodes_steps(tmp_path):
    """Episodes that succeed after 2, 3 and 4 policy actions: mean_steps 3, and each episode's own count kept."""
    rng = np.random.default_rng()

    class Env(FakeLiberoEnv):
        def set_init_state(self, state):
            self.succeed_at = libero.SETTLE_STEPS + 2 + int(state[-1])  # state0-0 -> 2 policy actions
            return super().set_init_state(state)

    res = libero.evaluate_suite(RecordingPolicy(k=2, rng=rng), FakeSuite([Env(rng=rng)], max_steps=9), episodes=3,
                                out_dir=tmp_path, progress=False)
    task = res["tasks"]["0"]
    assert task["episode_steps"] == [2, 3, 4] and task["mean_steps"] == 3.0 and task["success_rate"] == 1.0


def _strip_saved(out, key):
    """Drop `key` from every task of the results saved in `out` (as a file written before it was kept)."""
    import json

    for path in [out / "libero_results.json", *(out / "runs").glob("*.json")]:
        saved = json.loads(path.read_text())
        for task in saved["tasks"].values():
            del task[key]
        path.write_text(json.dumps(saved))


def test_a_rerun_extends_results_saved_before_no_action_episodes_were_kept(tmp_path):
    """Results saved before `episode_no_action` was kept have none: a rerun asking for more episodes counts the
    saved ones as having yielded actions, and the new episode's flag lands at its own index."""
    rng = np.random.default_rng()

    class NoActionFromThird(RecordingPolicy):
        def act(self, image, history=None):
            if len(self.instructions) == 1:  # this run's first episode: the task's third
                return np.zeros((0, 7))
            return super().act(image, history)

    def run(policy, episodes):
        suite = FakeSuite([FakeLiberoEnv(rng=rng, succeed_at=libero.SETTLE_STEPS + 2)], max_steps=5)
        return libero.evaluate_suite(policy, suite, episodes=episodes, out_dir=tmp_path, progress=False,
                                     policy_fingerprint="same policy files")["tasks"]["0"]

    run(RecordingPolicy(rng=rng), 2)
    _strip_saved(tmp_path, "episode_no_action")
    task = run(NoActionFromThird(rng=rng), 3)
    assert task["episode_success"] == [True, True, False]
    assert task["episode_no_action"] == [False, False, True] and task["ended_without_action"] == 1


def test_results_saved_in_libero_results_json_alone_are_reused(tmp_path):
    """A folder written before the per-key files under runs/ holds libero_results.json only: a rerun with the
    same policy files reuses its episodes."""
    import shutil

    rng = np.random.default_rng()

    def run():
        suite = FakeSuite([FakeLiberoEnv(rng=rng)], max_steps=3)
        libero.evaluate_suite(RecordingPolicy(rng=rng), suite, episodes=2, out_dir=tmp_path, progress=False,
                              policy_fingerprint="same policy files")
        return suite.envs[0].init_state

    assert run() == "state0-1"
    shutil.rmtree(tmp_path / "runs")
    assert run() is None


def test_eval_libero_names_task_ids_that_are_not_numbers(tmp_path, monkeypatch):
    rng = np.random.default_rng()
    suite = FakeSuite([FakeLiberoEnv(rng=rng)], max_steps=2)
    with pytest.raises(ValueError, match=r"--tasks takes comma-separated task ids like 0,3,7, got '0,one'"):
        _run_eval_libero(tmp_path, monkeypatch, RecordingPolicy(rng=rng), suite, "--tasks", "0,one")
    assert suite.envs[0].init_state is None


def test_eval_libero_no_resume_runs_the_saved_episodes_again(tmp_path, monkeypatch):
    rng = np.random.default_rng()
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "policy.json").write_text("{}")

    def run(*argv):
        suite = FakeSuite([FakeLiberoEnv(rng=rng)], max_steps=2)
        assert _run_eval_libero(tmp_path, monkeypatch, RecordingPolicy(rng=rng), suite, "--episodes", "1",
                                *argv) == 0
        return suite.envs[0].init_state

    assert run() == "state0-0"
    assert run() is None  # resumed: reused
    assert run("--no-resume") == "state0-0"


def test_a_libero_suite_builds_its_tasks_env_from_its_bddl_file_at_its_camera_size(tmp_path, monkeypatch):
    """The environment of a task: its BDDL file under LIBERO's bddl_files, the suite's camera size, seeded 0."""
    import sys

    root = tmp_path / "site"
    (root / "libero" / "libero").mkdir(parents=True)
    (root / "libero" / "__init__.py").write_text("")
    (root / "libero" / "libero" / "__init__.py").write_text(
        "def get_libero_path(key):\n    return '/libero/' + key\n")
    (root / "libero" / "libero" / "envs.py").write_text(
        "class OffScreenRenderEnv:\n"
        "    def __init__(self, **kw):\n        self.kw, self.seeds = kw, []\n"
        "    def seed(self, s):\n        self.seeds.append(s)\n")
    (root / "libero" / "libero" / "benchmark.py").write_text(
        "import types\n\n"
        "class Spatial:\n"
        "    n_tasks = 2\n"
        "    def get_task(self, i):\n"
        "        return types.SimpleNamespace(language=f'task {i}', problem_folder='libero_spatial',\n"
        "                                     bddl_file=f'task{i}.bddl')\n"
        "    def get_task_init_states(self, i):\n        return [i]\n\n"
        "def get_benchmark_dict():\n    return {'libero_spatial': Spatial}\n")
    monkeypatch.syspath_prepend(str(root))
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "config.yaml").write_text("bddl_files: /libero/bddl_files\n")
    monkeypatch.setenv("LIBERO_CONFIG_PATH", str(tmp_path / "cfg"))
    for name in [m for m in sys.modules if m == "libero" or m.startswith("libero.")]:
        monkeypatch.delitem(sys.modules, name)
    try:
        suite = libero.LiberoSuite("libero_spatial", resolution=128)
        env = suite.make_env(1)
        assert env.kw == {"bddl_file_name": "/libero/bddl_files/libero_spatial/task1.bddl", "camera_heights": 128,
                          "camera_widths": 128}
        assert env.seeds == [0] and suite.max_steps == 220
        assert suite.instruction(1) == "task 1" and suite.init_states(1) == [1]
    finally:
        for name in [m for m in sys.modules if m == "libero" or m.startswith("libero.")]:
            del sys.modules[name]


def test_eval_libero_says_which_decoding_its_success_rates_are_of(tmp_path, monkeypatch, capsys):
    """The default decoding (parallel, the structure forced) is not the release's free greedy decoding: the run says
    so, and names --mode release for rates comparable with the release's; a release-mode run says nothing."""
    rng = np.random.default_rng()
    for mode, said in (("parallel", True), ("causal", True), ("release", False)):
        policy = RecordingPolicy(rng=rng)
        policy.mode = mode
        suite = FakeSuite([FakeLiberoEnv(rng=rng)], max_steps=5)
        assert _run_eval_libero(tmp_path, monkeypatch, policy, suite, "--episodes", "1", "--no-resume") == 0
        out = capsys.readouterr().out
        assert (f"decoding: {mode} (each chunk's action structure forced" in out) == said, out
        assert ("--mode release decodes as the release's evaluation does" in out) == said


def test_a_policy_whose_low_bounds_are_not_liberos_is_refused():
    """The low bounds are checked as the high ones are: a policy trained with low=-1 (high as LIBERO's) would
    execute its negative deltas wrongly scaled."""
    pol = RecordingPolicy()
    pol.metadata = lambda: {"action_low": [-1.0] * 7, "action_high": list(LIBERO_MAX)}
    with pytest.raises(ValueError, match=r"bounds low=\[-1.0, .*not the release's fixed LIBERO bounds"):
        libero.check_bounds(pol)
    pol.metadata = lambda: {"action_low": [-1.0] * 7}
    with pytest.raises(ValueError, match="fixed LIBERO bounds"):
        libero.check_bounds(pol)
    libero.check_bounds(pol, allow_mismatch=True)


def test_saved_episodes_without_their_error_records_run_again(tmp_path):
    """A saved task whose per-episode lists disagree in length (its episode_errors missing) has no episode whose
    outcome is whole: a rerun runs them again, and what it saves has one entry per episode in every list."""
    import json

    rng = np.random.default_rng()

    def run(episodes):
        suite = FakeSuite([FakeLiberoEnv(rng=rng, succeed_at=libero.SETTLE_STEPS + 2)], max_steps=5)
        policy = RecordingPolicy(rng=rng)
        task = libero.evaluate_suite(policy, suite, episodes=episodes, out_dir=tmp_path, progress=False,
                                     policy_fingerprint="same policy files")["tasks"]["0"]
        return task, len(policy.instructions)

    run(3)
    _strip_saved(tmp_path, "episode_errors")
    task, ran = run(2)
    assert ran == 2  # none of the saved episodes was reused
    saved = json.loads((tmp_path / libero.RESULTS).read_text())["tasks"]["0"]
    for t in (task, saved):
        assert t["episodes"] == 2 and t["successes"] == 2
        assert [len(t[k]) for k in ("episode_success", "episode_steps", "episode_errors", "episode_no_action")] \
            == [2, 2, 2, 2], t


def test_eval_libero_renders_at_the_policys_image_size_unless_told(tmp_path, monkeypatch):
    """Without --resolution the suite's camera renders frames of the policy's image size (no resize on the way, as
    the release evaluates); --resolution sets another."""
    import argparse

    from worldvla import inference

    rng = np.random.default_rng()
    policy = RecordingPolicy(rng=rng)
    policy.image_size = 8
    sizes = []
    monkeypatch.setattr(libero, "_require_libero", lambda: None)
    monkeypatch.setattr(libero, "LiberoSuite", lambda name, resolution: sizes.append(resolution) or
                        FakeSuite([FakeLiberoEnv(rng=rng)], max_steps=2))
    monkeypatch.setattr(inference.WorldVLAPolicy, "from_pretrained", lambda *a, **k: policy)
    for extra, want in (([], 8), (["--resolution", "128"], 128)):
        args = libero.add_arguments(argparse.ArgumentParser()).parse_args(
            ["--policy", str(tmp_path / "p"), "--out", str(tmp_path / "out"), "--no-progress", "--episodes", "1",
             "--no-resume", *extra])
        assert libero.run(args) == 0
        assert sizes[-1] == want


def test_eval_libero_keys_its_results_by_the_policy_files_before_they_loaded(tmp_path, monkeypatch):
    """The command fingerprints the policy folder before the policy loads: a new export that replaces the folder
    while the old one loads does not get the loaded weights' episodes saved as its own."""
    import argparse
    import json

    from worldvla import inference
    from worldvla.eval.metaworld import _policy_fingerprint

    rng = np.random.default_rng()
    folder = tmp_path / "p"
    folder.mkdir()
    (folder / "policy.json").write_text("{}")
    before = _policy_fingerprint(folder)
    policy = RecordingPolicy(rng=rng)
    suite = FakeSuite([FakeLiberoEnv(rng=rng)], max_steps=2)

    class Loading:
        @staticmethod
        def from_pretrained(*a, **k):
            (folder / "policy.json").write_text('{"exported": "again, while this one was loading"}')
            return policy

    monkeypatch.setattr(inference, "WorldVLAPolicy", Loading)
    monkeypatch.setattr(libero, "_require_libero", lambda: None)
    monkeypatch.setattr(libero, "LiberoSuite", lambda name, resolution: suite)
    args = libero.add_arguments(argparse.ArgumentParser()).parse_args(
        ["--policy", str(folder), "--out", str(tmp_path / "out"), "--no-progress", "--episodes", "1"])
    assert libero.run(args) == 0
    key = json.loads((tmp_path / "out" / libero.RESULTS).read_text())["key"]
    assert key == libero._results_key(suite, policy, before)
    assert key != libero._results_key(suite, policy, _policy_fingerprint(folder))


def test_a_chunk_querys_latency_summary_describes_its_queries(monkeypatch):
    """The latency a results file reports: the count, mean, median, 90th percentile and longest of the queries'
    times (ten queries of 1, 2, ..., 10 s here), none before the first query."""
    from worldvla.eval import rollout

    class Instant:
        def act(self, images, history=None):
            return np.ones((1, 7))

    ticks = iter(np.cumsum([0] + [x for d in range(1, 11) for x in (d, 0)]).tolist())
    monkeypatch.setattr(rollout.time, "perf_counter", lambda: next(ticks))
    query = rollout.ChunkQuery(Instant())
    assert query.latency_summary() == {"queries": 0}
    for _ in range(10):
        query(np.zeros((8, 8, 3), np.uint8), None)
    assert query.latencies == [float(d) for d in range(1, 11)]
    assert query.latency_summary() == pytest.approx({"queries": 10, "mean_s": 5.5, "median_s": 5.5, "p90_s": 9.1,
                                                     "max_s": 10.0})


def test_runs_without_a_policy_fingerprint_reuse_nothing(tmp_path):
    """Without the policy's folder (no fingerprint) nothing tells two policies' episodes apart: a second policy
    evaluated into the same folder runs its own episodes instead of reporting the first one's."""
    import json

    rng = np.random.default_rng()
    outcomes = []
    for succeed_at in (libero.SETTLE_STEPS + 2, None):  # a policy that succeeds, then one that never does
        suite = FakeSuite([FakeLiberoEnv(rng=rng, succeed_at=succeed_at)], max_steps=4)
        res = libero.evaluate_suite(RecordingPolicy(rng=rng), suite, episodes=2, out_dir=tmp_path, progress=False)
        assert suite.envs[0].init_state == "state0-1"  # both episodes ran
        outcomes.append(res["tasks"]["0"]["episode_success"])
    assert outcomes == [[True, True], [False, False]]
    saved = json.loads((tmp_path / libero.RESULTS).read_text())
    assert saved["key"] is None and saved["tasks"]["0"]["episode_success"] == [False, False]
    assert not (tmp_path / "runs").exists()


def test_another_decoding_mode_or_suite_runs_the_episodes_again(tmp_path):
    """The same policy files decoded another way (the policy's metadata names its mode) or run on another suite
    give other outcomes: their episodes run again, and each run's are kept for its own rerun."""
    rng = np.random.default_rng()

    def run(mode, suite_name):
        policy = RecordingPolicy(rng=rng)
        policy.metadata = lambda: {"action_low": list(LIBERO_MIN), "action_high": list(LIBERO_MAX), "mode": mode}
        suite = FakeSuite([FakeLiberoEnv(rng=rng)], max_steps=3)
        suite.name = suite_name
        libero.evaluate_suite(policy, suite, episodes=1, out_dir=tmp_path, progress=False,
                              policy_fingerprint="same policy files")
        return suite.envs[0].init_state

    assert run("parallel", "libero_goal") == "state0-0"
    assert run("parallel", "libero_goal") is None  # reused
    assert run("release", "libero_goal") == "state0-0"  # another decoding
    assert run("parallel", "my_suite") == "state0-0"  # another suite
    assert run("release", "libero_goal") is None and run("parallel", "my_suite") is None


def test_allowing_other_bounds_still_refuses_actions_of_another_width():
    """--allow-bounds-mismatch accepts other de-normalization bounds, not a policy of another robot: a 4-D
    Meta-World policy is refused with it too."""
    pol = RecordingPolicy()
    pol.action_dim = 4
    pol.metadata = lambda: {"action_low": [-1.0] * 4, "action_high": [1.0] * 4}
    with pytest.raises(ValueError, match="this policy emits 4-D actions; LIBERO policies emit 7-D"):
        libero.check_bounds(pol, allow_mismatch=True)


def test_eval_libero_refuses_a_tasks_option_naming_no_task(tmp_path, monkeypatch):
    """`--tasks ,` names no task id: refused with the option named, before any episode runs."""
    rng = np.random.default_rng()
    suite = FakeSuite([FakeLiberoEnv(rng=rng)], max_steps=2)
    with pytest.raises(ValueError, match="no LIBERO tasks to evaluate: --tasks names none"):
        _run_eval_libero(tmp_path, monkeypatch, RecordingPolicy(rng=rng), suite, "--tasks", ",")
    assert suite.envs[0].init_state is None
    with pytest.raises(ValueError, match="no LIBERO tasks to evaluate"):
        libero.evaluate_suite(RecordingPolicy(rng=rng), suite, episodes=1, tasks=[], progress=False)


def test_eval_libero_passes_its_options_to_the_policy_and_the_harness(tmp_path, monkeypatch):
    """--mode reaches the policy's loading (left out, the policy's own default stands), --save-videos writes one GIF
    per episode, and --allow-bounds-mismatch lets a policy of other bounds run."""
    from worldvla import inference

    rng = np.random.default_rng()
    loaded = []
    policy = RecordingPolicy(rng=rng)
    policy.metadata = lambda: {"action_low": [-1.0] * 7, "action_high": [1.0] * 7}  # not LIBERO's bounds
    suite = FakeSuite([FakeLiberoEnv(rng=rng, succeed_at=libero.SETTLE_STEPS + 2)], max_steps=4)
    with pytest.raises(ValueError, match="fixed LIBERO bounds"):
        _run_eval_libero(tmp_path, monkeypatch, policy, suite, "--episodes", "1")
    assert suite.envs[0].init_state is None

    monkeypatch.setattr(inference.WorldVLAPolicy, "from_pretrained", lambda *a, **k: loaded.append(k) or policy)
    assert _run_eval_libero_loaded(tmp_path, monkeypatch, suite, "--episodes", "2", "--allow-bounds-mismatch",
                                   "--save-videos", "--mode", "release") == 0
    assert loaded[-1].get("mode") == "release"
    assert sorted(p.name for p in (tmp_path / "out").glob("*.gif")) == ["task00_ep000_success.gif",
                                                                        "task00_ep001_success.gif"]
    assert _run_eval_libero_loaded(tmp_path, monkeypatch, suite, "--episodes", "1", "--allow-bounds-mismatch",
                                   "--no-resume") == 0
    assert "mode" not in loaded[-1]


def _run_eval_libero_loaded(tmp_path, monkeypatch, suite, *argv):
    """`libero.run` on `suite` with the policy loader the test set up (LIBERO itself and the suite stood in)."""
    import argparse

    monkeypatch.setattr(libero, "_require_libero", lambda: None)
    monkeypatch.setattr(libero, "LiberoSuite", lambda name, resolution: suite)
    args = libero.add_arguments(argparse.ArgumentParser()).parse_args(
        ["--policy", str(tmp_path / "p"), "--out", str(tmp_path / "out"), "--no-progress", *argv])
    return libero.run(args)


@pytest.mark.parametrize("text", ["[1, 2]", "null", '"results"', "3"])
def test_a_results_file_that_is_json_but_not_results_is_not_reused(tmp_path, text):
    """A libero_results.json holding other JSON (not an object) made every run into the folder fail with
    AttributeError ('list' object has no attribute 'get'): it holds no episodes to reuse, and the run replaces it."""
    import json

    rng = np.random.default_rng()
    (tmp_path / libero.RESULTS).write_text(text)
    suite = FakeSuite([FakeLiberoEnv(rng=rng)], max_steps=2)
    libero.evaluate_suite(RecordingPolicy(rng=rng), suite, episodes=1, out_dir=tmp_path, progress=False,
                          policy_fingerprint="same policy files")
    assert suite.envs[0].init_state == "state0-0"
    assert json.loads((tmp_path / libero.RESULTS).read_text())["tasks"]["0"]["episodes"] == 1


@pytest.mark.parametrize("tasks, names", [("12", None), ([1.5], "1.5"), (["a"], "'a'"), ([True], "True")])
def test_task_ids_given_as_one_string_or_not_whole_numbers_are_not_taken_for_other_tasks(tasks, names):
    """tasks="12" was iterated as tasks 1 and 2, and 1.5 was cut to task 1: other tasks than asked, run silently."""
    rng = np.random.default_rng()
    envs = [FakeLiberoEnv(rng=rng) for _ in range(3)]
    suite = FakeSuite(envs, max_steps=2)
    want = r"task ids \[12\] are outside" if names is None else f"task ids must be whole numbers .*got {names}"
    with pytest.raises(ValueError, match=want):
        libero.evaluate_suite(RecordingPolicy(rng=rng), suite, episodes=1, tasks=tasks, progress=False)
    assert all(e.init_state is None for e in envs)  # no episode ran


def test_task_ids_may_be_one_string_of_ids_separated_by_commas():
    rng = np.random.default_rng()
    suite = FakeSuite([FakeLiberoEnv(rng=rng) for _ in range(3)], max_steps=2)
    res = libero.evaluate_suite(RecordingPolicy(rng=rng), suite, episodes=1, tasks="2, 0", progress=False)
    assert list(res["tasks"]) == ["2", "0"]
    assert [e.init_state for e in suite.envs] == ["state0-0", None, "state2-0"]


@pytest.mark.parametrize("episodes", [2.0, True, "2"])
def test_an_episode_count_that_is_not_a_whole_number_is_refused_naming_it(episodes):
    rng = np.random.default_rng()
    suite = FakeSuite([FakeLiberoEnv(rng=rng)], max_steps=2)
    with pytest.raises(ValueError, match=f"episodes must be >= 1, got {episodes!r}; give a whole number"):
        libero.evaluate_suite(RecordingPolicy(rng=rng), suite, episodes=episodes, progress=False)
    assert suite.envs[0].init_state is None


def test_bounds_of_another_length_are_named_as_other_bounds_not_a_numpy_error():
    """A policy without `action_dim` whose metadata names 6-D bounds failed with numpy's "operands could not be
    broadcast together"."""
    pol = RecordingPolicy()
    del pol.action_dim
    pol.metadata = lambda: {"action_low": [0.0] * 6, "action_high": list(LIBERO_MAX)}
    with pytest.raises(ValueError, match=r"bounds low=\[0.0, 0.0, 0.0, 0.0, 0.0, 0.0\].*not the release's fixed"):
        libero.check_bounds(pol)


def test_eval_libero_names_task_ids_written_in_digits_that_are_not_decimal(tmp_path, monkeypatch):
    """'²' is a digit to str.isdigit but not a number to int(): it ended in int()'s own error."""
    rng = np.random.default_rng()
    suite = FakeSuite([FakeLiberoEnv(rng=rng)], max_steps=2)
    with pytest.raises(ValueError, match=r"--tasks takes comma-separated task ids like 0,3,7, got '²'"):
        _run_eval_libero(tmp_path, monkeypatch, RecordingPolicy(rng=rng), suite, "--tasks", "²")
    assert suite.envs[0].init_state is None


def test_saving_videos_without_a_folder_for_them_is_refused_before_any_episode():
    """save_videos=True without out_dir ran every episode and saved no GIF, without a word."""
    rng = np.random.default_rng()
    suite = FakeSuite([FakeLiberoEnv(rng=rng)], max_steps=2)
    with pytest.raises(ValueError, match="save_videos=True needs out_dir"):
        libero.evaluate_suite(RecordingPolicy(rng=rng), suite, episodes=1, save_videos=True, progress=False)
    assert suite.envs[0].init_state is None


def test_an_error_in_an_episodes_reset_fails_that_episode_not_the_evaluation(tmp_path):
    """policy.reset, env.reset and env.set_init_state ran before the episode's error handling: an initial state
    the simulator refused stopped the whole evaluation instead of failing its episode."""
    rng = np.random.default_rng()

    class BadState(FakeLiberoEnv):
        def set_init_state(self, state):
            if state == "state0-1":
                raise ValueError("initial state has 9 values, the scene 11")
            return super().set_init_state(state)

    class BadReset(FakeLiberoEnv):
        def reset(self):
            super().reset()
            raise RuntimeError("MuJoCo could not load the scene")

    class BadPolicyReset(RecordingPolicy):
        def reset(self, instruction):
            raise RuntimeError("the policy's cache could not be cleared")

    suite = FakeSuite([BadState(rng=rng, succeed_at=libero.SETTLE_STEPS + 1), BadReset(rng=rng)], max_steps=3)
    res = libero.evaluate_suite(RecordingPolicy(rng=rng), suite, episodes=3, out_dir=tmp_path, progress=False)
    t0, t1 = res["tasks"]["0"], res["tasks"]["1"]
    assert t0["episode_success"] == [True, False, True], t0
    assert t0["errors"] == ["episode 1: ValueError: initial state has 9 values, the scene 11"], t0
    assert t0["episode_steps"] == [1, 0, 1]
    assert t1["episode_errors"] == ["RuntimeError: MuJoCo could not load the scene"] * 3, t1
    assert all(e.closed for e in suite.envs)
    r = libero.run_episode(FakeLiberoEnv(rng=rng), BadPolicyReset(rng=rng), libero.ChunkQuery(RecordingPolicy()),
                           "x", None, max_steps=5)
    assert r["error"] == "RuntimeError: the policy's cache could not be cleared" and not r["success"], r

    class InterruptedReset(RecordingPolicy):
        def reset(self, instruction):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # Ctrl-C still stops the evaluation
        libero.run_episode(FakeLiberoEnv(rng=rng), InterruptedReset(rng=rng), libero.ChunkQuery(RecordingPolicy()),
                           "x", None, max_steps=5)


def test_an_episode_starts_with_the_releases_ten_settle_steps_of_an_open_gripper():
    """Spec section 6: the first 10 env steps take the dummy action [0, 0, 0, 0, 0, 0, -1] (gripper open) while
    objects settle; the policy's first frame is the one observed after them. Written out here, not read from the
    module's constants, which a change would move along with the loop."""
    rng = np.random.default_rng()
    env = FakeLiberoEnv(rng=rng)
    pol = RecordingPolicy(k=3, rng=rng)
    r = libero.run_episode(env, pol, libero.ChunkQuery(pol), "x", None, max_steps=3)
    assert libero.SETTLE_STEPS == 10 and libero.DUMMY_ACTION == (0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -1.0)
    assert env.actions[:10] == [[0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -1.0]] * 10
    assert len(env.actions) == 13 and r["steps"] == 3 and r["queries"] == 1
    np.testing.assert_array_equal(pol.calls[0][0], env.raw_frames[1 + 10][::-1, ::-1])  # [reset, init, settle...]


def test_done_during_the_settle_steps_is_not_a_success():
    """The release's loop ignores `done` on the settle steps (it steps and continues): an episode whose initial
    scene already reads as solved still needs a policy action to count, so no success is scored without one."""
    rng = np.random.default_rng()
    env = FakeLiberoEnv(rng=rng, succeed_at=1)  # done from the first dummy step on
    pol = RecordingPolicy(k=3, rng=rng)
    r = libero.run_episode(env, pol, libero.ChunkQuery(pol), "x", None, max_steps=5)
    assert r["success"] is True and r["steps"] == 1 and r["queries"] == 1
    assert len(env.actions) == libero.SETTLE_STEPS + 1


def test_each_episode_of_a_suite_runs_the_suites_step_limit_of_policy_actions():
    """evaluate_suite gives every episode the suite's own `max_steps` policy actions after the settle steps
    (spatial 220 ... libero_10 520 in LIBERO): no more, whatever the settle steps."""
    rng = np.random.default_rng()
    env = FakeLiberoEnv(rng=rng)  # never done: the episode runs out
    res = libero.evaluate_suite(RecordingPolicy(k=3, rng=rng), FakeSuite([env], max_steps=4), episodes=1,
                                progress=False)
    assert res["tasks"]["0"]["episode_steps"] == [4] and res["tasks"]["0"]["success_rate"] == 0.0
    assert len(env.actions) == libero.SETTLE_STEPS + 4


def test_the_success_rate_is_over_the_tasks_run_not_the_suites_tasks():
    """`--tasks 0` on a suite of more tasks: the rate is that task's (its successes over its episodes), not
    divided over the tasks that did not run."""
    rng = np.random.default_rng()

    def rate(tasks):
        envs = [FakeLiberoEnv(rng=rng, succeed_at=libero.SETTLE_STEPS + 2), FakeLiberoEnv(rng=rng),
                FakeLiberoEnv(rng=rng, succeed_at=libero.SETTLE_STEPS + 2)]
        return libero.evaluate_suite(RecordingPolicy(k=3, rng=rng), FakeSuite(envs, max_steps=3), episodes=2,
                                     tasks=tasks, progress=False)["success_rate"]

    assert rate([0]) == 1.0 and rate([1]) == 0.0
    assert rate([0, 1]) == 0.5 and rate([0, 2]) == 1.0 and rate(None) == pytest.approx(2 / 3)


def test_recorded_frames_are_the_rotated_frames_the_policy_saw():
    """record=True (--save-videos) keeps each policy step's frame as the policy saw it: rotated by 180 degrees,
    one per policy action, not LIBERO's upside-down render."""
    rng = np.random.default_rng()
    env = FakeLiberoEnv(rng=rng)
    pol = RecordingPolicy(k=2, rng=rng)
    r = libero.run_episode(env, pol, libero.ChunkQuery(pol), "x", None, max_steps=4, record=True)
    assert len(r["frames"]) == 4
    for i, frame in enumerate(r["frames"]):
        np.testing.assert_array_equal(frame, env.raw_frames[1 + libero.SETTLE_STEPS + i][::-1, ::-1])
    np.testing.assert_array_equal(r["frames"][2], pol.calls[1][0])  # the second query's frame


def test_a_negative_task_id_is_refused_not_taken_for_a_task_from_the_end():
    """-1 is no task of a suite: it is refused naming it, not run as the suite's last task (Python's index)."""
    rng = np.random.default_rng()
    envs = [FakeLiberoEnv(rng=rng), FakeLiberoEnv(rng=rng)]
    with pytest.raises(ValueError, match=r"task ids \[-1\] are outside this suite's 0..1"):
        libero.evaluate_suite(RecordingPolicy(rng=rng), FakeSuite(envs, max_steps=2), episodes=1, tasks=[0, -1],
                              progress=False)
    assert all(e.init_state is None for e in envs)  # no episode ran


def test_a_task_whose_episodes_are_all_reused_builds_no_environment(tmp_path):
    """A LIBERO environment takes seconds to build (a MuJoCo scene and its renderer): a task whose asked episodes
    were all saved runs none and builds none; a task with an episode left builds its own once."""
    rng = np.random.default_rng()

    class Counting(FakeSuite):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.made = []

        def make_env(self, task_id):
            self.made.append(task_id)
            return super().make_env(task_id)

    def run(episodes):
        suite = Counting([FakeLiberoEnv(rng=rng), FakeLiberoEnv(rng=rng)], max_steps=2)
        libero.evaluate_suite(RecordingPolicy(rng=rng), suite, episodes=episodes, out_dir=tmp_path, progress=False,
                              policy_fingerprint="same policy files", tasks=[0] if episodes == 1 else None)
        return suite.made

    assert run(1) == [0]
    assert run(1) == []  # everything asked for is saved
    assert run(2) == [0, 1]  # task 0 has its second episode to run, task 1 both


def test_a_policy_without_metadata_is_evaluated_without_a_bounds_check(tmp_path):
    """The harness takes any policy object with reset and act: one without `metadata()` names no bounds, so none are
    checked (and its saved results are keyed without metadata); it was not refused for the missing method."""
    rng = np.random.default_rng()

    class Bare(RecordingPolicy):  # RecordingPolicy's metadata() hidden: hasattr(policy, "metadata") is False
        metadata = property(lambda self: (_ for _ in ()).throw(AttributeError("metadata")))

    bare = Bare(rng=rng)
    assert not hasattr(bare, "metadata")
    libero.check_bounds(bare)
    suite = FakeSuite([FakeLiberoEnv(rng=rng, succeed_at=libero.SETTLE_STEPS + 1)], max_steps=3)
    res = libero.evaluate_suite(bare, suite, episodes=1, out_dir=tmp_path, progress=False,
                                policy_fingerprint="policy files")
    assert res["success_rate"] == 1.0 and res["key"] == libero._results_key(suite, bare, "policy files")


def test_bounds_that_differ_by_more_than_rounding_are_refused():
    """LIBERO's bounds read back through float32 (a checkpoint's metadata) are the same bounds; bounds off by a
    thousandth are other bounds, whose de-normalized actions are off by as much."""
    pol = RecordingPolicy()
    as_float32 = [float(x) for x in np.asarray(LIBERO_MAX, np.float32)]
    pol.metadata = lambda: {"action_low": list(LIBERO_MIN), "action_high": as_float32}
    libero.check_bounds(pol)
    high = list(LIBERO_MAX)
    high[0] += 1e-3
    pol.metadata = lambda: {"action_low": list(LIBERO_MIN), "action_high": high}
    with pytest.raises(ValueError, match="not the release's fixed LIBERO bounds"):
        libero.check_bounds(pol)


def test_eval_libero_names_the_first_episode_error_when_every_episode_erred(tmp_path, monkeypatch, capsys):
    """Every episode ended on an error, each task on its own: the closing line names the first one (task 0's), the
    one to fix first, not the last task's."""
    rng = np.random.default_rng()

    class Env(FakeLiberoEnv):
        def __init__(self, message, **kw):
            super().__init__(**kw)
            self.message = message

        def set_init_state(self, state):
            raise RuntimeError(self.message)

    suite = FakeSuite([Env("scene 0 failed to load", rng=rng), Env("scene 1 failed to load", rng=rng)], max_steps=2)
    assert _run_eval_libero(tmp_path, monkeypatch, RecordingPolicy(rng=rng), suite, "--episodes", "1") == 1
    err = capsys.readouterr().err
    assert "(first: task 0, episode 0: RuntimeError: scene 0 failed to load)" in err, err


def test_eval_libero_ends_with_the_suites_rate_over_its_tasks_and_episodes(tmp_path, monkeypatch, capsys):
    """The closing line: the suite, its success rate in percent, and the tasks and episodes it is over; each task's
    line before it, its rate in percent and its instruction."""
    rng = np.random.default_rng()
    suite = FakeSuite([FakeLiberoEnv(rng=rng, succeed_at=libero.SETTLE_STEPS + 1), FakeLiberoEnv(rng=rng)],
                      max_steps=2)
    assert _run_eval_libero(tmp_path, monkeypatch, RecordingPolicy(rng=rng), suite, "--episodes", "2") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-3:] == ["task  0  100.0%  do task 0", "task  1    0.0%  do task 1",
                          "fake_suite: 50.0% over 2 tasks x 2 episodes"], lines


def test_a_libero_whose_own_import_fails_is_named_with_what_to_install(tmp_path, monkeypatch, capsys):
    """LIBERO present but its `libero.libero` failing to import (robosuite missing, as after a plain pip install of
    LIBERO) is reported with the install hint, as a missing LIBERO is, by the suite and in the command's one line."""
    import argparse
    import sys

    root = tmp_path / "site"
    (root / "libero" / "libero").mkdir(parents=True)
    (root / "libero" / "__init__.py").write_text("")
    (root / "libero" / "libero" / "__init__.py").write_text("import robosuite_not_installed_here\n")
    monkeypatch.syspath_prepend(str(root))
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "config.yaml").write_text("bddl_files: /libero/bddl_files\n")
    monkeypatch.setenv("LIBERO_CONFIG_PATH", str(tmp_path / "cfg"))
    for name in [m for m in sys.modules if m == "libero" or m.startswith("libero.")]:
        monkeypatch.delitem(sys.modules, name)
    try:
        with pytest.raises(ImportError, match=r"^LIBERO is not installed\. .*pip install -e LIBERO.*"
                                              r"\(No module named 'robosuite_not_installed_here'\)$"):
            libero.LiberoSuite("libero_goal")
        args = libero.add_arguments(argparse.ArgumentParser()).parse_args(
            ["--policy", str(tmp_path / "p"), "--out", str(tmp_path / "out")])
        assert libero.run(args) == 2
        err = capsys.readouterr().err
        assert err.startswith("worldvla eval-libero: LIBERO is not installed.") and "pip install -e LIBERO" in err
    finally:
        for name in [m for m in sys.modules if m == "libero" or m.startswith("libero.")]:
            del sys.modules[name]


def test_eval_libero_fingerprints_a_policy_folder_given_under_home(tmp_path, monkeypatch):
    """`--policy ~/p` (a tilde the shell left, as in --policy=~/p) keys the results by the files in the home folder's
    p: fingerprinted as a folder named '~' that does not exist, a retrained policy there got the same key and was
    reported with the old weights' episodes."""
    import argparse
    import json

    from worldvla import inference
    from worldvla.eval.metaworld import _policy_fingerprint

    home = tmp_path / "home"
    (home / "p").mkdir(parents=True)
    (home / "p" / "policy.json").write_text("{}")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng()
    policy = RecordingPolicy(rng=rng)
    suite = FakeSuite([FakeLiberoEnv(rng=rng)], max_steps=2)
    monkeypatch.setattr(libero, "_require_libero", lambda: None)
    monkeypatch.setattr(libero, "LiberoSuite", lambda name, resolution: suite)
    monkeypatch.setattr(inference.WorldVLAPolicy, "from_pretrained", lambda *a, **k: policy)
    args = libero.add_arguments(argparse.ArgumentParser()).parse_args(
        ["--policy", "~/p", "--out", str(tmp_path / "out"), "--no-progress", "--episodes", "1"])
    assert libero.run(args) == 0
    key = json.loads((tmp_path / "out" / libero.RESULTS).read_text())["key"]
    assert key == libero._results_key(suite, policy, _policy_fingerprint(home / "p"))


def test_the_progress_bar_counts_every_asked_episode_reused_or_run_and_closes(tmp_path, monkeypatch):
    """The bar's total is the asked tasks' episodes (not the suite's), reused episodes advance it as run ones do, its
    postfix shows the task's rate over the episodes run so far, and it is closed at the end."""
    bars = []

    class Bar:
        def __init__(self, total, desc, unit):
            self.total, self.desc, self.n, self.postfix, self.closed = total, desc, 0, [], False
            bars.append(self)

        def update(self, n=1):
            self.n += n

        def set_postfix(self, **kw):
            self.postfix.append(kw)

        def close(self):
            self.closed = True

    rng = np.random.default_rng()

    def suite():
        return FakeSuite([FakeLiberoEnv(rng=rng, succeed_at=libero.SETTLE_STEPS + 1) for _ in range(3)], max_steps=3)

    libero.evaluate_suite(RecordingPolicy(rng=rng), suite(), episodes=1, tasks=[0], out_dir=tmp_path, progress=False,
                          policy_fingerprint="same policy files")
    monkeypatch.setattr("tqdm.auto.tqdm", Bar)
    libero.evaluate_suite(RecordingPolicy(rng=rng), suite(), episodes=2, tasks=[0, 2], out_dir=tmp_path,
                          progress=True, policy_fingerprint="same policy files")
    (bar,) = bars
    assert bar.total == 4 and bar.desc == "eval fake_suite" and bar.n == 4  # task 0's first episode reused
    assert bar.postfix == [{"task": 0, "sr": "100%"}, {"task": 2, "sr": "100%"}, {"task": 2, "sr": "100%"}]
    assert bar.closed


def test_an_interrupted_task_still_closes_its_environment():
    """Ctrl-C in the middle of a task's episode stops the evaluation; the task's simulator (a MuJoCo scene and its
    renderer) is closed on the way out, not left open."""
    rng = np.random.default_rng()
    env = FakeLiberoEnv(rng=rng)
    with pytest.raises(KeyboardInterrupt):
        libero.evaluate_suite(InterruptAfter(2, k=3, rng=rng), FakeSuite([env], max_steps=5), episodes=2,
                              progress=False)
    assert env.init_state == "state0-0" and env.closed


def test_episode_gifs_play_at_twenty_frames_a_second(tmp_path):
    """--save-videos writes each episode's frames at 20 frames a second (a delay of 50 ms a frame), the control rate
    of LIBERO's simulator, so a GIF plays at the speed the episode ran."""
    from PIL import Image

    rng = np.random.default_rng()
    suite = FakeSuite([FakeLiberoEnv(rng=rng)], max_steps=3)
    libero.evaluate_suite(RecordingPolicy(rng=rng), suite, episodes=1, out_dir=tmp_path, save_videos=True,
                          progress=False)
    with Image.open(tmp_path / "task00_ep000_failure.gif") as gif:
        durations = []
        for k in range(gif.n_frames):
            gif.seek(k)
            durations.append(gif.info["duration"])
    assert len(durations) == 3 and set(durations) == {50}


def test_an_out_folder_whose_parents_are_missing_is_created(tmp_path):
    """out_dir nested in folders that do not exist yet (--out runs/libero/today) is made with its parents."""
    rng = np.random.default_rng()
    out = tmp_path / "runs" / "libero" / "today"
    libero.evaluate_suite(RecordingPolicy(rng=rng), FakeSuite([FakeLiberoEnv(rng=rng)], max_steps=2), episodes=1,
                          out_dir=out, progress=False)
    assert (out / libero.RESULTS).is_file()


def test_the_results_file_lists_its_tasks_in_numeric_order(tmp_path):
    """libero_results.json holds the tasks by their number (2 before 10), whatever order they were asked in."""
    import json

    rng = np.random.default_rng()
    suite = FakeSuite([FakeLiberoEnv(rng=rng) for _ in range(11)], max_steps=1)
    libero.evaluate_suite(RecordingPolicy(rng=rng), suite, episodes=1, tasks=[10, 2], out_dir=tmp_path,
                          progress=False, policy_fingerprint="same policy files")
    libero.evaluate_suite(RecordingPolicy(rng=rng), suite, episodes=1, tasks=[1], out_dir=tmp_path,
                          progress=False, policy_fingerprint="same policy files")
    saved = json.loads((tmp_path / libero.RESULTS).read_text())
    assert list(saved["tasks"]) == ["1", "2", "10"] and saved["run_tasks"] == [1]


@pytest.mark.parametrize("tasks, names", [(["²"], "'²'"), ("0,²", "'²'")])
def test_task_ids_in_digits_that_are_not_decimal_are_named_by_the_harness(tasks, names):
    """'²' is a digit to str.isdigit but no number to int(): evaluate_suite names it as a task id that is not a whole
    number, not with int()'s own error."""
    rng = np.random.default_rng()
    suite = FakeSuite([FakeLiberoEnv(rng=rng)], max_steps=2)
    with pytest.raises(ValueError, match=f"task ids must be whole numbers like 0, 3, 7; got {names}$"):
        libero.evaluate_suite(RecordingPolicy(rng=rng), suite, episodes=1, tasks=tasks, progress=False)
    assert suite.envs[0].init_state is None


def test_tasks_that_are_not_a_list_are_refused_naming_what_was_given():
    """tasks=3 (one id, not a list of them) is refused saying what tasks takes and what it got, not with Python's
    "'int' object is not iterable"."""
    rng = np.random.default_rng()
    suite = FakeSuite([FakeLiberoEnv(rng=rng) for _ in range(4)], max_steps=2)
    with pytest.raises(ValueError, match=r"^tasks must be a list of task ids like \[0, 3, 7\] \(or the string "
                                         r"'0,3,7'\), got 3$"):
        libero.evaluate_suite(RecordingPolicy(rng=rng), suite, episodes=1, tasks=3, progress=False)
    assert all(e.init_state is None for e in suite.envs)


def test_eval_libero_hands_its_options_to_the_policy_loader_and_the_harness(tmp_path, monkeypatch):
    """--device reaches the policy's loading; --episodes, --tasks, --out, --save-videos, --allow-bounds-mismatch,
    --no-resume and --no-progress reach evaluate_suite, and their absence its defaults (a progress bar, resume)."""
    import argparse

    from worldvla import inference

    loaded, evaluated = [], []
    policy = RecordingPolicy()
    monkeypatch.setattr(libero, "_require_libero", lambda: None)
    monkeypatch.setattr(libero, "LiberoSuite", lambda name, resolution: FakeSuite([], max_steps=2))
    monkeypatch.setattr(inference.WorldVLAPolicy, "from_pretrained", lambda *a, **k: loaded.append((a, k)) or policy)
    monkeypatch.setattr(libero, "evaluate_suite", lambda policy, suite, **k: evaluated.append(k) or
                        {"suite": "s", "success_rate": 0.0, "tasks": {}})

    def run(*argv):
        args = libero.add_arguments(argparse.ArgumentParser()).parse_args(
            ["--policy", str(tmp_path / "p"), "--out", str(tmp_path / "out"), *argv])
        assert libero.run(args) == 0
        return loaded[-1], evaluated[-1]

    (a, k), ev = run("--device", "cpu", "--episodes", "3", "--tasks", "2,0", "--save-videos", "--allow-bounds-mismatch",
                     "--no-resume", "--no-progress")
    assert a == (str(tmp_path / "p"),) and k == {"device": "cpu"}
    assert (ev["episodes"], ev["tasks"], ev["out_dir"]) == (3, ["2", "0"], str(tmp_path / "out"))
    assert (ev["save_videos"], ev["allow_bounds_mismatch"], ev["resume"], ev["progress"]) == (True, True, False, False)
    (a, k), ev = run()
    assert k == {"device": None} and ev["episodes"] == 50 and ev["tasks"] is None
    assert (ev["save_videos"], ev["allow_bounds_mismatch"], ev["resume"], ev["progress"]) == (False, False, True, True)


def test_eval_libero_takes_a_tasks_string_set_in_code_as_one_option(tmp_path, monkeypatch):
    """Arguments built in code may hold --tasks as one string, "12" or "0,12": its ids are task 12 (and 0), not the
    characters 1 and 2 taken for tasks of their own."""
    import argparse

    from worldvla import inference

    evaluated = []
    monkeypatch.setattr(libero, "_require_libero", lambda: None)
    monkeypatch.setattr(libero, "LiberoSuite", lambda name, resolution: FakeSuite([], max_steps=2))
    monkeypatch.setattr(inference.WorldVLAPolicy, "from_pretrained", lambda *a, **k: RecordingPolicy())
    monkeypatch.setattr(libero, "evaluate_suite", lambda policy, suite, **k: evaluated.append(k["tasks"]) or
                        {"suite": "s", "success_rate": 0.0, "tasks": {}})
    for given, want in (("12", ["12"]), ("0,12", ["0", "12"])):
        args = libero.add_arguments(argparse.ArgumentParser()).parse_args(
            ["--policy", str(tmp_path / "p"), "--out", str(tmp_path / "out"), "--no-progress"])
        args.tasks = given
        assert libero.run(args) == 0
        assert evaluated[-1] == want


def test_the_results_say_how_long_the_evaluation_took(tmp_path, monkeypatch):
    """`seconds` in the results (returned and saved) is the wall time from before the first episode to the end."""
    import json
    import types

    rng = np.random.default_rng()
    clock = iter([100.0, 107.5])
    monkeypatch.setattr(libero, "time", types.SimpleNamespace(perf_counter=lambda: next(clock)))
    res = libero.evaluate_suite(RecordingPolicy(rng=rng), FakeSuite([FakeLiberoEnv(rng=rng)], max_steps=2),
                                episodes=1, out_dir=tmp_path, progress=False)
    assert res["seconds"] == 7.5
    assert json.loads((tmp_path / libero.RESULTS).read_text())["seconds"] == 7.5


def test_eval_libero_points_at_the_results_file_when_episodes_erred(tmp_path, monkeypatch, capsys):
    """The closing line of a run with erred episodes counts them and names the file where each error is kept."""
    rng = np.random.default_rng()
    suite = FakeSuite([FakeLiberoEnv(rng=rng, fail_at=libero.SETTLE_STEPS + 1), FakeLiberoEnv(rng=rng)], max_steps=2)
    assert _run_eval_libero(tmp_path, monkeypatch, RecordingPolicy(rng=rng), suite, "--episodes", "2") == 0
    last = capsys.readouterr().out.splitlines()[-1]
    assert last == (f"fake_suite: 0.0% over 2 tasks x 2 episodes; 2 episodes ended on an error (see "
                    f"{tmp_path / 'out' / libero.RESULTS})"), last


def test_a_libero_config_folder_without_its_config_file_is_named(fake_libero, tmp_path, monkeypatch):
    """LIBERO_CONFIG_PATH naming a folder that exists but holds no config.yaml: LIBERO would still ask on the
    terminal, so the missing file is named as when the folder is missing too."""
    import re

    (tmp_path / "cfg").mkdir()
    monkeypatch.setenv("LIBERO_CONFIG_PATH", str(tmp_path / "cfg"))
    with pytest.raises(FileNotFoundError,
                       match=rf"LIBERO's config file {re.escape(str(tmp_path / 'cfg' / 'config.yaml'))} is missing"):
        libero.LiberoSuite("libero_goal")
    assert fake_libero == []


def test_a_first_episode_that_ended_on_an_error_runs_again_with_the_ones_after_it(tmp_path):
    """The saved first episode ended on an error: a resumed run reuses none of the task's saved episodes, as for an
    error in any later one."""
    rng = np.random.default_rng()

    class BrokenFirst(RecordingPolicy):
        def act(self, image, history=None):
            if len(self.instructions) == 1:
                raise RuntimeError("CUDA error: out of memory")
            return super().act(image, history)

    suite = FakeSuite([FakeLiberoEnv(rng=rng, succeed_at=libero.SETTLE_STEPS + 1)], max_steps=3)
    def run(policy):
        return libero.evaluate_suite(policy, suite, episodes=2, out_dir=tmp_path, progress=False,
                                     policy_fingerprint="same policy files")["tasks"]["0"]

    first = run(BrokenFirst(rng=rng))
    assert first["episode_errors"][0] and first["episode_errors"][1] is None, first
    again = RecordingPolicy(rng=rng)
    second = run(again)
    assert len(again.instructions) == 2 and second["errors"] == [] and second["episode_success"] == [True, True]


def test_eval_libero_names_a_tasks_errors_and_its_episodes_without_action_both(tmp_path, monkeypatch, capsys):
    """A task with an episode that erred and one whose query yielded no action: both are named, each on its line."""
    rng = np.random.default_rng()

    class Env(FakeLiberoEnv):
        def set_init_state(self, state):
            if state == "state0-1":
                raise RuntimeError("scene failed to load")
            return super().set_init_state(state)

    class NoActionFirst(RecordingPolicy):
        def act(self, image, history=None):
            return np.zeros((0, 7)) if len(self.instructions) == 1 else super().act(image, history)

    suite = FakeSuite([Env(rng=rng)], max_steps=2)
    assert _run_eval_libero(tmp_path, monkeypatch, NoActionFirst(rng=rng), suite, "--episodes", "2") == 0
    out = capsys.readouterr().out
    assert ("task  0  1 of 2 episodes ended on an error (counted as failures); first: episode 1: RuntimeError: scene "
            "failed to load") in out, out
    assert "task  0  1 of 2 episodes failed on a query that yielded no action" in out, out
