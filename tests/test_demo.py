"""`worldvla demo --fast`: the whole chain at toy sizes, its artifacts, and its stage cache."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

pytest.importorskip("metaworld")
pytest.importorskip("mujoco")


def test_fast_demo_runs_and_reuses_its_caches(tmp_path, capsys):
    from worldvla import demo
    from worldvla.inference import WorldVLAPolicy

    out = tmp_path / "demo"
    argv = ["--fast", "--out", str(out), "--no-progress"]
    t0 = time.perf_counter()
    assert demo.main(argv) == 0
    first = time.perf_counter() - t0
    printed = capsys.readouterr().out
    assert "closed-loop success" in printed and "random" in printed
    assert "--resume" not in printed  # the demo's own trainings: no "--resume: no checkpoint" line

    for rel in ("metrics.json", "policy/policy.json", "policy/model", "policy/vqgan", "eval/metrics.json",
                "eval/success.png", "eval/world_model.png", "eval/world_model_grid.png", "demos/reach-v3.hdf5",
                "store/manifest.json", "vq/training.png", "train/training.png"):
        assert (out / rel).exists(), rel
    assert f"training curves: {out / 'train' / 'training.png'}, {out / 'vq' / 'training.png'}" in printed
    assert list((out / "eval").glob("*.gif"))
    m = json.loads((out / "metrics.json").read_text())
    assert set(m["stages"]) == {"collect", "train-vq", "pretokenize", "train", "evaluate"}
    assert not any(s["cached"] for s in m["stages"].values())
    ev = m["eval"]
    assert 0.0 <= ev["variants"]["WorldVLA"]["success_rate"] <= 1.0 and "random" in ev
    wm = ev["world_model"]["reach-v3"]
    assert wm["one_step"]["n"] >= 1 and 0.0 < wm["one_step"]["psnr"] < 100 and -1 <= wm["one_step"]["ssim"] <= 1

    policy = WorldVLAPolicy.from_pretrained(out / "policy", device="cpu")
    assert policy.chunk_size == m["config"]["chunk_size"] and policy.action_dim == 4

    # Second run: every stage is cached and the metrics are reproduced from the cache.
    t0 = time.perf_counter()
    assert demo.main(argv) == 0
    second = time.perf_counter() - t0
    m2 = json.loads((out / "metrics.json").read_text())
    assert all(s["cached"] for s in m2["stages"].values())
    assert m2["eval"]["variants"] == ev["variants"]
    assert second < first / 2

    # A changed training setting reruns training and evaluation only; a broken marker reruns its stage.
    assert demo.main(argv + ["--train-steps", "2"]) == 0
    m3 = json.loads((out / "metrics.json").read_text())
    assert [s for s, v in m3["stages"].items() if not v["cached"]] == ["train", "evaluate"]
    (out / "store" / "manifest.json").unlink()
    assert demo.main(argv + ["--train-steps", "2"]) == 0
    m4 = json.loads((out / "metrics.json").read_text())
    assert [s for s, v in m4["stages"].items() if not v["cached"]] == ["pretokenize", "train", "evaluate"]

    # --ablations adds the action-only and the no-chunk-mask trainings; earlier stages stay cached.
    assert demo.main(argv + ["--train-steps", "2", "--ablations"]) == 0
    m5 = json.loads((out / "metrics.json").read_text())
    assert [s for s, v in m5["stages"].items() if not v["cached"]] == ["train-action-only", "train-causal",
                                                                       "evaluate"]
    assert m5["stages"]["train-causal"]["info"]["attention"] == "causal"
    assert set(m5["eval"]["variants"]) == {"WorldVLA", "action-only", "trained without chunk mask",
                                           "WorldVLA (no chunk mask)", "action-only (no chunk mask)"}
    causal = WorldVLAPolicy.from_pretrained(out / "policy_causal", device="cpu")
    assert causal.model.config.attention == "causal" and causal.mode == "causal"

    # A stage's output cut short (a full disk) was read as it stood: "Unterminated string", naming no file.
    metrics = out / "eval" / "metrics.json"
    metrics.write_text(metrics.read_text()[:100])
    capsys.readouterr()
    assert demo.main(argv + ["--train-steps", "2", "--ablations"]) == 0
    assert f"{metrics} cannot be read" in capsys.readouterr().out
    m6 = json.loads((out / "metrics.json").read_text())
    assert [s for s, v in m6["stages"].items() if not v["cached"]] == ["evaluate"]


def test_demo_rejects_bad_settings(capsys):
    from worldvla import demo

    assert demo.main(["--fast", "--tasks", "no-such-task-v3", "--out", "/nonexistent/x"]) == 2
    assert "unknown" in capsys.readouterr().err
    assert demo.main(["--fast", "--image-size", "48", "--out", "/nonexistent/x"]) == 2
    assert "multiple of 32" in capsys.readouterr().err
    # A bad --seed was refused by the training stage's own parser, after the collection had run.
    with pytest.raises(ValueError, match=r"--seed must be in \[0, 2\*\*32\)"):
        demo.DemoConfig.fast_preset(seed=-1).check()


def test_only_this_runs_tasks_reach_training(tmp_path):
    """A demo folder shared with an earlier run (--fast, other --tasks) may hold other tasks' files: the VQGAN
    and the store read this run's tasks only."""
    from worldvla.demo import DemoConfig, demo_files

    cfg = DemoConfig(tasks=("drawer-open-v3", "window-open-v3"))
    (tmp_path / "demos").mkdir()
    (tmp_path / "demos" / "reach-v3.hdf5").write_bytes(b"")  # an earlier run's task
    assert demo_files(cfg, tmp_path) == [tmp_path / "demos" / "drawer-open-v3.hdf5",
                                         tmp_path / "demos" / "window-open-v3.hdf5"]


def test_the_stages_read_this_runs_files_only(tmp_path, monkeypatch):
    """The VQGAN stage and the store stage are given `demo_files`, not the demos folder (where an earlier
    run's reach-v3.hdf5 lies): each is stopped at its entry and its inputs checked."""
    from worldvla import demo
    from worldvla.data import store
    from worldvla.train import vq as train_vq

    cfg = demo.DemoConfig(tasks=("drawer-open-v3", "window-open-v3"))
    (tmp_path / "demos").mkdir()
    (tmp_path / "demos" / "reach-v3.hdf5").write_bytes(b"")
    seen = {}

    class Stop(Exception):
        pass

    def record(name):
        def stop(*args, **kwargs):
            seen[name] = args[0]
            raise Stop()
        return stop

    monkeypatch.setattr(train_vq, "train_vq", record("vq"))
    monkeypatch.setattr(store, "build_store", record("store"))
    with pytest.raises(Stop):
        demo.stage_train_vq(cfg, tmp_path, False, True)
    with pytest.raises(Stop):
        demo.stage_pretokenize(cfg, tmp_path, False)
    want = [tmp_path / "demos" / "drawer-open-v3.hdf5", tmp_path / "demos" / "window-open-v3.hdf5"]
    assert seen["store"] == want
    assert seen["vq"].inputs == [str(p) for p in want], seen["vq"]


def test_force_starts_an_interrupted_training_over(tmp_path, monkeypatch):
    """`demo --force` used to resume train-vq and train from the checkpoints of an interrupted run (their
    .started markers were kept), and to reuse the closed loops saved for the same policy files (the same
    files after a deterministic retraining, while the decoding code may have changed)."""
    from worldvla import demo

    seen = {}

    def evaluate(cfg, out, progress, reuse):
        seen["reuse"] = reuse
        (out / "eval").mkdir(exist_ok=True)
        (out / "eval" / "metrics.json").write_text(json.dumps({"complete": True}))
        return {}

    monkeypatch.setattr(demo, "load_kernels_first", lambda: None)
    monkeypatch.setattr(demo, "stage_collect", lambda cfg, out, progress, fresh: seen.update(demos=fresh) or {})
    monkeypatch.setattr(demo, "stage_pretokenize", lambda cfg, out, progress, fresh: seen.update(store=fresh) or {})
    monkeypatch.setattr(demo, "stage_train_vq", lambda cfg, out, progress, resume: seen.update(vq=resume) or {})
    monkeypatch.setattr(demo, "stage_train", lambda cfg, out, progress, resume, **k: seen.update(train=resume) or {})
    monkeypatch.setattr(demo, "stage_evaluate", evaluate)
    cfg = demo.DemoConfig.fast_preset()
    keys = demo.stage_keys(cfg)

    def interrupted():
        (tmp_path / "stages").mkdir(exist_ok=True)
        for stage in ("train-vq", "train"):
            (tmp_path / "stages" / f"{stage}.started").write_text(keys[stage])

    interrupted()
    demo.run_demo(cfg, tmp_path, progress=False, force=True)
    assert seen == {"demos": True, "store": True, "vq": False, "train": False, "reuse": False}
    interrupted()
    demo.run_demo(cfg, tmp_path, progress=False)  # the stand-in collect writes no demos: every stage reruns
    # without --force an interrupted training resumes, and complete demo files and shards are kept
    assert seen == {"demos": False, "store": False, "vq": True, "train": True, "reuse": True}


def test_the_trainings_resume_only_from_a_checkpoint(tmp_path, monkeypatch):
    """The demo passed --resume to every training, so each fresh run printed "--resume: no checkpoint under
    .../train, starting fresh" although the user passed no --resume: --resume goes only where a checkpoint is."""
    from worldvla import demo
    from worldvla.train import trainer
    from worldvla.train import vq as train_vq

    seen = {}

    class Stop(Exception):
        pass

    def record(name):
        def stop(args):
            seen[name] = args.resume
            raise Stop()
        return stop

    monkeypatch.setattr(trainer, "train", record("train"))
    monkeypatch.setattr(train_vq, "train_vq", record("vq"))
    cfg = demo.DemoConfig.fast_preset()
    for started in (False, True):  # a fresh stage, an interrupted one that had saved no checkpoint yet
        for name, stage in (("train", demo.stage_train), ("vq", demo.stage_train_vq)):
            with pytest.raises(Stop):
                stage(cfg, tmp_path, False, started)
            assert seen[name] is False, (name, started)
    for name, stage in (("train", demo.stage_train), ("vq", demo.stage_train_vq)):
        (tmp_path / name / "checkpoints" / "step_00000001").mkdir(parents=True)
        with pytest.raises(Stop):
            stage(cfg, tmp_path, False, True)
        assert seen[name] is True, name


def test_a_stage_resumed_without_checkpoints_starts_over_in_an_emptied_folder(tmp_path, monkeypatch):
    """A training stage asked to resume where the checkpoints are gone (deleted to free the disk) but the export is
    left: the folder was kept, and the trainers refuse a fresh run into a folder holding an earlier run's export
    (--overwrite, which the demo does not pass). The stage empties its own folder and starts over."""
    from worldvla import demo
    from worldvla.train import trainer
    from worldvla.train import vq as train_vq

    seen = {}

    class Stop(Exception):
        pass

    def record(name, folder):
        def stop(args):
            seen[name] = (args.resume, sorted(p.name for p in (tmp_path / folder).glob("*")))
            raise Stop()
        return stop

    monkeypatch.setattr(trainer, "train", record("train", "train"))
    monkeypatch.setattr(train_vq, "train_vq", record("vq", "vq"))
    cfg = demo.DemoConfig.fast_preset()
    for name, export, stage in (("train", "policy", demo.stage_train), ("vq", "vqgan", demo.stage_train_vq)):
        (tmp_path / name / export).mkdir(parents=True)
        (tmp_path / name / "metrics.jsonl").write_text("{}\n")
        with pytest.raises(Stop):
            stage(cfg, tmp_path, False, True)
        assert seen[name] == (False, []), name

def test_a_training_stopped_by_sigterm_ends_the_demo_saying_how_to_continue(tmp_path, monkeypatch, capsys):
    """A SIGTERM inside the demo's training ends that training after a saved step: the demo used to go on and
    fail with "training finished without exporting a policy". It ends with SIGTERM's status and the way on."""
    from worldvla import demo
    from worldvla.cli import main
    from worldvla.train import trainer

    monkeypatch.setattr(demo, "load_kernels_first", lambda: None)
    monkeypatch.setattr(demo, "stage_collect", lambda cfg, out, progress, fresh: {})
    monkeypatch.setattr(demo, "stage_pretokenize", lambda cfg, out, progress, fresh: {})
    monkeypatch.setattr(demo, "stage_train_vq", lambda cfg, out, progress, resume: {})
    monkeypatch.setattr(trainer, "train", lambda args: {"step": 7, "losses": [1.0], "export": None, "stopped": True,
                                                        "checkpoint": "step_00000007"})
    assert main(["demo", "--fast", "--out", str(tmp_path), "--no-progress"]) == 143
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == ("worldvla demo: stopped by SIGTERM in train after step 7, which is saved; run the same command "
                   "again to continue: finished stages are kept"), err
    assert (tmp_path / "stages" / "train.started").is_file()  # the next run resumes the training


def test_a_failed_collection_does_not_advise_the_same_rerun(tmp_path, monkeypatch):
    """The layouts derive from --seed: the same run fails the same way, so another --seed is the advice."""
    from worldvla import demo
    from worldvla.data import collect

    monkeypatch.setattr(collect, "collect", lambda *a, **k: {"incomplete": ["reach-v3"], "errors": []})
    with pytest.raises(ValueError, match="another --seed"):
        demo.stage_collect(demo.DemoConfig.fast_preset(), tmp_path, False)


def test_a_collection_whose_attempts_raised_names_their_errors_in_one_line(tmp_path, monkeypatch, capsys):
    """Attempts that raised (a renderer that cannot start) were blamed on the layouts ("choose another --seed"),
    in a RuntimeError's traceback: the advice is to fix their cause, as `worldvla collect` says, in one line."""
    from worldvla import demo
    from worldvla.cli import main
    from worldvla.data import collect

    errors = [f"reach-v3 episode 0 attempt {a}: RuntimeError: EGL: eglMakeCurrent failed" for a in range(5)]
    monkeypatch.setattr(collect, "collect", lambda *a, **k: {"incomplete": ["reach-v3"], "errors": errors})
    monkeypatch.setattr(demo, "load_kernels_first", lambda: None)
    monkeypatch.delenv("WORLDVLA_TRACEBACK", raising=False)
    assert main(["demo", "--fast", "--out", str(tmp_path), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("worldvla demo: fewer episodes than asked for: "
                                                         "['reach-v3']; 5 attempt(s) raised errors"), err
    assert "attempt 0: RuntimeError: EGL: eglMakeCurrent failed" in err and "fix their cause" in err
    assert "--seed" not in err and "Traceback" not in err


def test_demo_refuses_empty_tasks(tmp_path, monkeypatch, capsys):
    """`--tasks ""` counted as not given and ran the default tasks."""
    import argparse

    from worldvla import demo

    monkeypatch.setattr(demo, "load_kernels_first", lambda: None)
    monkeypatch.setattr(demo, "stage_collect", lambda *a, **k: pytest.fail("the demo ran"))
    parser = demo.add_arguments(argparse.ArgumentParser())
    for tasks in ("", " , "):
        assert demo.config_from_args(parser.parse_args(["--fast", "--tasks", tasks])).tasks == ()
        assert demo.main(["--fast", "--tasks", tasks, "--out", str(tmp_path)]) == 2
        assert "--tasks names no task; pass comma-separated Meta-World tasks" in capsys.readouterr().err
    assert demo.config_from_args(parser.parse_args(["--fast"])).tasks == ("reach-v3",)


def test_a_task_named_twice_is_one_task_of_the_demo():
    """`--tasks reach-v3,push-v3,reach-v3` gave other stage keys than `--tasks reach-v3,push-v3`, so a run of the same
    tasks redid every finished stage (which run a repeated task once). It is the same configuration now."""
    import argparse

    from worldvla import demo

    parser = demo.add_arguments(argparse.ArgumentParser())
    once, twice = (demo.config_from_args(parser.parse_args(["--tasks", t]))
                   for t in ("reach-v3,push-v3", "reach-v3, push-v3,reach-v3"))
    assert twice.tasks == ("reach-v3", "push-v3") and twice == once
    assert demo.stage_keys(twice) == demo.stage_keys(once)


@pytest.mark.parametrize("text", ["[1, 2]", "3", "null", '"key"', '{"key": [1]}', '{"seconds": [1]}'])
def test_a_stage_marker_that_is_json_but_not_a_markers_means_not_done(tmp_path, text):
    """JSON that is not a dict crashed done() (AttributeError) and recorded_seconds() (TypeError)."""
    from worldvla import demo

    stages = demo.Stages(tmp_path, demo.DemoConfig.fast_preset())
    stages.dir.mkdir()
    (stages.dir / "collect.json").write_text(text)
    assert stages.done("collect") is False
    assert stages.recorded_seconds("collect") is None
    stages.mark("collect", 2.5)
    assert stages.done("collect") is True and stages.recorded_seconds("collect") == 2.5


def test_a_run_drops_the_old_metrics_and_writes_its_files_atomically(tmp_path, monkeypatch):
    """demo_config.json and metrics.json were written in place (a crash could leave half a file), and an earlier
    run's metrics.json stayed beside the new settings while the new run ran, or after it failed."""
    from worldvla import checkpoint, demo

    written, seen = [], {}
    real = checkpoint.write_text_atomic
    monkeypatch.setattr(checkpoint, "write_text_atomic", lambda p, text: written.append(Path(p).name) or real(p, text))
    monkeypatch.setattr(demo, "load_kernels_first", lambda: None)

    def collect(cfg, out, progress, fresh):
        seen["old metrics"] = (out / "metrics.json").exists()
        seen["config"] = json.loads((out / "demo_config.json").read_text())
        return {}

    def evaluate(cfg, out, progress, reuse):
        (out / "eval").mkdir(parents=True, exist_ok=True)
        (out / "eval" / "metrics.json").write_text(json.dumps({"complete": True, "new": 1}))
        return {}

    for name in ("stage_train_vq", "stage_pretokenize", "stage_train"):
        monkeypatch.setattr(demo, name, lambda *a, **k: {})
    monkeypatch.setattr(demo, "stage_collect", collect)
    monkeypatch.setattr(demo, "stage_evaluate", evaluate)
    (tmp_path / "metrics.json").write_text(json.dumps({"eval": {"old": 1}}))
    (tmp_path / "demo_config.json").write_text("{}")  # the earlier run's: a demo folder
    cfg = demo.DemoConfig.fast_preset()
    demo.run_demo(cfg, tmp_path, progress=False)
    assert seen == {"old metrics": False, "config": json.loads(json.dumps(demo.asdict(cfg)))}
    assert {"demo_config.json", "metrics.json"} <= set(written), written
    assert json.loads((tmp_path / "metrics.json").read_text())["eval"] == {"complete": True, "new": 1}


def test_collect_replaces_files_of_other_settings_when_the_stage_reruns(tmp_path, monkeypatch):
    """The stage reruns only when its key (the collect settings) changed, so the files it finds are of other
    settings: it replaces them (collect refuses that unless told to overwrite, and the demo then stopped)."""
    from worldvla import demo
    from worldvla.data import collect

    seen = {}
    monkeypatch.setattr(collect, "collect",
                        lambda *a, **k: seen.update(k) or {"incomplete": [], "errors": [], "tasks": {}})
    demo.stage_collect(demo.DemoConfig.fast_preset(), tmp_path, False)
    assert seen["overwrite"] is True


def test_force_collects_and_tokenizes_anew(tmp_path, monkeypatch):
    """--force redid only the trainings and the evaluation: collect kept the complete task files of the same
    settings and build_store the shards whose fingerprint matched, so changed expert or tokenizer code kept its
    old demos and shards."""
    from worldvla import demo
    from worldvla.data import collect, store

    cfg = demo.DemoConfig.fast_preset()
    (tmp_path / "demos").mkdir()
    for t in cfg.tasks:
        (tmp_path / "demos" / f"{t}.hdf5").write_bytes(b"old")
    (tmp_path / "store").mkdir()
    (tmp_path / "store" / "old_shard").write_bytes(b"old")
    found = {}

    def fake_collect(*a, **k):
        found["demos"] = sorted(p.name for p in (tmp_path / "demos").iterdir())
        return {"incomplete": [], "errors": [], "tasks": {}}

    def fake_build_store(files, out, *a, **k):
        found["store"] = out.exists()
        out.mkdir()
        (out / store.MANIFEST).write_text(json.dumps({"n_samples": 1, "n_action": 1, "n_world": 0, "n_tokens": 9}))
        return out

    monkeypatch.setattr(collect, "collect", fake_collect)
    monkeypatch.setattr(store, "build_store", fake_build_store)
    monkeypatch.setattr(demo, "demo_files", lambda cfg, out: [])
    demo.stage_collect(cfg, tmp_path, False)
    assert found["demos"] == sorted(f"{t}.hdf5" for t in cfg.tasks)  # kept without --force
    demo.stage_collect(cfg, tmp_path, False, fresh=True)
    assert found["demos"] == []
    demo.stage_pretokenize(cfg, tmp_path, False, fresh=True)
    assert found["store"] is False


def test_a_training_resumed_at_its_last_checkpoint_reports_its_losses(tmp_path, monkeypatch):
    """A run killed after its final checkpoint resumes with no step left: its summary holds no loss, and the
    stage recorded first and final loss as None (a resume from a middle checkpoint recorded the first loss after
    it as the first). They come from the run's log now."""
    from worldvla import demo
    from worldvla.train import trainer

    cfg = demo.DemoConfig.fast_preset()

    def fake_train(args):
        run = Path(args.out)
        run.mkdir(parents=True, exist_ok=True)
        with open(run / "metrics.jsonl", "w") as f:
            for step in range(1, cfg.train_steps + 1):
                f.write(json.dumps({"step": step, "loss": 10.0 - step}) + "\n")
        (run / "policy").mkdir(exist_ok=True)
        (run / "policy" / "policy.json").write_text("{}")
        return {"losses": [], "export": str(run / "policy")}

    monkeypatch.setattr(trainer, "train", fake_train)
    info = demo.stage_train(cfg, tmp_path, False, resume=True)
    assert info["first_loss"] == 9.0 and info["final_loss"] == 10.0 - cfg.train_steps


@pytest.mark.parametrize("field, value", [("image_size", 0), ("image_size", -32), ("workers", 0), ("episodes", 0),
                                          ("seed", 1 << 32)])
def test_demo_config_refuses_values_no_stage_can_run(field, value):
    from worldvla import demo

    with pytest.raises(ValueError, match=field.replace("_", "-")):
        demo.DemoConfig.fast_preset(**{field: value}).check()
    demo.DemoConfig.fast_preset(seed=(1 << 32) - 1, image_size=32, workers=1).check()  # the largest seed is taken


@pytest.mark.parametrize("option", ["--episodes", "--eval-episodes", "--chunk-size", "--train-steps", "--vq-steps",
                                    "--workers"])
def test_demo_names_the_option_of_a_count_below_one(option, tmp_path, monkeypatch, capsys):
    """`worldvla demo --episodes 0` said "episodes must be >= 1", naming no option, without the usage line."""
    from worldvla.cli import main

    monkeypatch.delenv("WORLDVLA_TRACEBACK", raising=False)
    with pytest.raises(SystemExit) as e:
        main(["demo", "--fast", option, "0", "--out", str(tmp_path / "d")])
    assert e.value.code == 2
    assert f"worldvla demo: error: argument {option}: must be >= 1, got 0" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("field, value, stage", [
    ("tasks", ("drawer-open-v3",), "collect"), ("episodes", 3, "collect"), ("image_size", 128, "collect"),
    ("seed", 1, "collect"), ("collect_max_steps", 150, "collect"), ("vq_steps", 5, "train-vq"),
    ("vq_batch", 8, "train-vq"), ("vq_lr", 2e-3, "train-vq"), ("vq_codes", 128, "train-vq"),
    ("chunk_size", 3, "pretokenize"), ("model", "small", "train"), ("train_steps", 5, "train"),
    ("batch_tokens", 1024, "train"), ("micro_tokens", 512, "train"), ("lr", 2e-3, "train"), ("world", False, "train"),
    ("eval_episodes", 3, "evaluate"), ("eval_max_steps", 20, "evaluate"), ("wm_episodes", 2, "evaluate"),
    ("wm_horizon", 3, "evaluate"), ("eval_envs", 1, "evaluate")])
def test_a_setting_changes_the_key_of_its_stage_and_of_every_later_one(field, value, stage):
    """Each stage's key holds its own settings and the key of the stage before it, so that a changed setting
    reruns its stage and everything after it, and leaves the stages before it cached."""
    from dataclasses import replace

    from worldvla import demo

    cfg = demo.DemoConfig.fast_preset()
    assert getattr(cfg, field) != value
    before, after = demo.stage_keys(cfg), demo.stage_keys(replace(cfg, **{field: value}))
    at = demo.STAGES.index(stage)
    for i, s in enumerate(demo.STAGES):
        assert (before[s] == after[s]) == (i < at), (s, field)


def _stub_stages(monkeypatch, seen):
    """run_demo's stages as stand-ins that write the files each stage leaves, recording the calls."""
    from worldvla import demo

    def collect(cfg, out, progress, fresh):
        seen.append("collect")
        (out / "demos").mkdir(exist_ok=True)
        for t in cfg.tasks:
            (out / "demos" / f"{t}.hdf5").write_bytes(b"demo")
        return {}

    def train_vq(cfg, out, progress, resume):
        seen.append(("train-vq", resume))
        (out / "vq" / "vqgan").mkdir(parents=True, exist_ok=True)
        (out / "vq" / "vqgan" / "config.json").write_text("{}")
        return {}

    def pretokenize(cfg, out, progress, fresh):
        seen.append("pretokenize")
        (out / "store").mkdir(exist_ok=True)
        (out / "store" / "manifest.json").write_text(json.dumps({"complete": True}))
        return {}

    def train(cfg, out, progress, resume, **kw):
        seen.append(("train", resume))
        (out / "policy").mkdir(exist_ok=True)
        (out / "policy" / "policy.json").write_text("{}")
        return {}

    def evaluate(cfg, out, progress, reuse):
        seen.append("evaluate")
        (out / "eval").mkdir(exist_ok=True)
        (out / "eval" / "metrics.json").write_text(json.dumps({"complete": True}))
        return {}

    monkeypatch.setattr(demo, "load_kernels_first", lambda: None)
    for name, fn in (("stage_collect", collect), ("stage_train_vq", train_vq), ("stage_pretokenize", pretokenize),
                     ("stage_train", train), ("stage_evaluate", evaluate)):
        monkeypatch.setattr(demo, name, fn)


def test_a_missing_task_file_reruns_collection_and_finished_stages_leave_no_started_marker(tmp_path, monkeypatch):
    """The collect stage is cached only while every task's file is there; a stage that finished leaves no
    `.started` marker (which would make a later run of its training resume an old run's checkpoint)."""
    from worldvla import demo

    seen = []
    _stub_stages(monkeypatch, seen)
    cfg = demo.DemoConfig.fast_preset(tasks=("reach-v3", "push-v3"))
    demo.run_demo(cfg, tmp_path, progress=False)
    assert seen == ["collect", ("train-vq", False), "pretokenize", ("train", False), "evaluate"]
    assert not list((tmp_path / "stages").glob("*.started"))
    seen.clear()
    demo.run_demo(cfg, tmp_path, progress=False)
    assert seen == []
    (tmp_path / "demos" / "push-v3.hdf5").unlink()
    demo.run_demo(cfg, tmp_path, progress=False)
    assert seen == ["collect", ("train-vq", False), "pretokenize", ("train", False), "evaluate"]


def test_an_interrupted_training_of_other_settings_starts_over(tmp_path, monkeypatch):
    """A training's `.started` marker records the key of the settings it started under: a run with other settings
    (here another --vq-steps, another --train-steps) starts that training over instead of resuming the other run."""
    from dataclasses import replace

    from worldvla import demo

    seen = []
    _stub_stages(monkeypatch, seen)
    cfg = demo.DemoConfig.fast_preset()
    old = demo.stage_keys(replace(cfg, vq_steps=7, train_steps=9))
    (tmp_path / "stages").mkdir()
    for stage in ("train-vq", "train"):
        (tmp_path / "stages" / f"{stage}.started").write_text(old[stage])
    demo.run_demo(cfg, tmp_path, progress=False)
    assert ("train-vq", False) in seen and ("train", False) in seen


def test_the_trainings_start_in_an_empty_folder_unless_they_resume(tmp_path, monkeypatch):
    """A training that does not resume removes the folder of an earlier run first (the trainers refuse a folder
    holding another run's checkpoints)."""
    from worldvla import demo
    from worldvla.train import trainer
    from worldvla.train import vq as train_vq

    seen = {}

    class Stop(Exception):
        pass

    def record(name, folder):
        def stop(args):
            seen[name] = (args.resume, (tmp_path / folder).exists())
            raise Stop()
        return stop

    monkeypatch.setattr(train_vq, "train_vq", record("vq", "vq"))
    monkeypatch.setattr(trainer, "train", record("train", "train"))
    cfg = demo.DemoConfig.fast_preset()
    for name, stage in (("vq", demo.stage_train_vq), ("train", demo.stage_train)):
        (tmp_path / name / "checkpoints" / "step_00000001").mkdir(parents=True)
        with pytest.raises(Stop):
            stage(cfg, tmp_path, False, False)
        assert seen[name] == (False, False), name


def test_an_action_only_model_gets_no_world_model_scores(tmp_path, monkeypatch):
    from worldvla import demo
    from worldvla.eval import metaworld

    seen = {}
    monkeypatch.setattr(metaworld, "evaluate", lambda policies, tasks, episodes, out, **kw: seen.update(kw) or {})
    demo.stage_evaluate(demo.DemoConfig.fast_preset(world=False), tmp_path, False)
    assert seen["wm_episodes"] == 0
    demo.stage_evaluate(demo.DemoConfig.fast_preset(wm_episodes=3), tmp_path, False)
    assert seen["wm_episodes"] == 3


def test_a_missing_dependency_is_reported_in_one_line(tmp_path, monkeypatch, capsys):
    from worldvla import demo

    def run_demo(*a, **k):
        raise ImportError("Meta-World is not installed; pip install 'worldvla[sim]'")

    monkeypatch.setattr(demo, "run_demo", run_demo)
    assert demo.main(["--fast", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "worldvla demo: Meta-World is not installed; pip install 'worldvla[sim]'"


@pytest.mark.parametrize("text, complete", [('{"complete": true}', True), ('{"complete": 1}', False),
                                            ('{"complete": "yes"}', False), ('{}', False), ("[1]", False)])
def test_a_stage_output_is_complete_only_when_it_says_complete_true(tmp_path, text, complete):
    from worldvla import demo

    p = tmp_path / "metrics.json"
    p.write_text(text)
    assert demo._marked_complete(p) is complete


def test_the_vqgan_stage_reports_the_last_logged_step(tmp_path, monkeypatch):
    from worldvla import demo
    from worldvla.train import vq as train_vq

    def fake_train_vq(args):
        run = Path(args.out)
        run.mkdir(parents=True, exist_ok=True)
        lines = [{"step": s, "psnr": 20.0 + s, "codes_used": 10 * s, "perplexity": 5.0 + s, "loss": 1.0 / s,
                  "l1": 0.1} for s in (1, 2)]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + "\n")
        return {"step": 2, "export": str(run / "vqgan"), "stopped": False}

    monkeypatch.setattr(train_vq, "train_vq", fake_train_vq)
    info = demo.stage_train_vq(demo.DemoConfig.fast_preset(), tmp_path, False, False)
    assert info == {"psnr": 22.0, "codes_used": 20, "perplexity": 7.0, "loss": 0.5}


def test_demo_refuses_an_out_folder_that_holds_another_commands_outputs(tmp_path, monkeypatch, capsys):
    """`--out` naming a training run's folder had its exported policy/ replaced by the demo's without a word (and
    an eval folder its metrics.json): a folder that is not a demo's and holds names the demo writes is refused
    before anything is deleted."""
    from worldvla import demo

    seen = []
    _stub_stages(monkeypatch, seen)
    run = tmp_path / "run"
    (run / "checkpoints" / "step_00000002").mkdir(parents=True)
    (run / "policy").mkdir()
    (run / "policy" / "policy.json").write_text('{"mine": 1}')
    (run / "metrics.json").write_text('{"mine": 1}')
    assert demo.main(["--fast", "--out", str(run), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"--out {run} holds files that are not a worldvla demo's (metrics.json, policy)" in err
    assert "choose a new or empty folder" in err
    assert seen == []
    assert (run / "policy" / "policy.json").read_text() == '{"mine": 1}'
    assert (run / "metrics.json").read_text() == '{"mine": 1}'
    assert not (run / "demo_config.json").exists()

    # An empty folder, one holding only other files, and an earlier demo's folder run.
    for name, files in (("empty", ()), ("notes", ("notes.txt",))):
        folder = tmp_path / name
        folder.mkdir()
        for f in files:
            (folder / f).write_text("x")
        demo.run_demo(demo.DemoConfig.fast_preset(), folder, progress=False)
        assert (folder / "metrics.json").is_file() and (folder / "notes.txt").exists() == bool(files)
    seen.clear()
    demo.run_demo(demo.DemoConfig.fast_preset(), tmp_path / "empty", progress=False)
    assert seen == []  # every stage cached


def test_a_demo_killed_while_collecting_runs_again_in_its_own_folder(tmp_path, monkeypatch):
    """A demo stopped during its first stage leaves demo_config.json and part of demos/ but no stages/ yet: its
    folder is a demo's, and running the demo there again goes on rather than refusing it as another command's."""
    from worldvla import demo

    seen = []
    _stub_stages(monkeypatch, seen)
    out = tmp_path / "run"
    (out / "demos").mkdir(parents=True)
    (out / "demos" / "partial.hdf5.tmp").write_bytes(b"half")
    (out / "demo_config.json").write_text(json.dumps({"tasks": ["a"]}))
    demo.run_demo(demo.DemoConfig.fast_preset(), out, progress=False)
    assert seen[0] == "collect" and (out / "metrics.json").is_file()


def _stub_all_stages(monkeypatch, seen, interrupt=None):
    """run_demo's stages, the ablation trainings included, as stand-ins that write the files each stage leaves and
    record their calls (stage, and for the trainings resume and their keyword arguments). `interrupt`: the stage
    that, after writing its files, is stopped as by Ctrl-C (once)."""
    from worldvla import demo

    def stop_if(stage):
        if interrupt and interrupt[0] == stage:
            interrupt.clear()
            raise KeyboardInterrupt

    def collect(cfg, out, progress, fresh):
        seen.append(("collect", fresh))
        (out / "demos").mkdir(exist_ok=True)
        for t in cfg.tasks:
            (out / "demos" / f"{t}.hdf5").write_bytes(b"demo")
        stop_if("collect")
        return {}

    def train_vq(cfg, out, progress, resume):
        seen.append(("train-vq", resume))
        (out / "vq" / "vqgan").mkdir(parents=True, exist_ok=True)
        (out / "vq" / "vqgan" / "config.json").write_text("{}")
        stop_if("train-vq")
        return {}

    def pretokenize(cfg, out, progress, fresh):
        seen.append(("pretokenize", fresh))
        (out / "store").mkdir(exist_ok=True)
        (out / "store" / "manifest.json").write_text(json.dumps({"complete": True}))
        stop_if("pretokenize")
        return {}

    def train(cfg, out, progress, resume, **kw):
        stage = {"policy": "train", "policy_action_only": "train-action-only",
                 "policy_causal": "train-causal"}[kw.get("policy_name", "policy")]
        seen.append((stage, resume, kw))
        (out / kw.get("policy_name", "policy")).mkdir(exist_ok=True)
        (out / kw.get("policy_name", "policy") / "policy.json").write_text("{}")
        stop_if(stage)
        return {}

    def evaluate(cfg, out, progress, reuse):
        seen.append(("evaluate", reuse))
        (out / "eval").mkdir(exist_ok=True)
        (out / "eval" / "metrics.json").write_text(json.dumps({"complete": True}))
        stop_if("evaluate")
        return {}

    monkeypatch.setattr(demo, "load_kernels_first", lambda: None)
    for name, fn in (("stage_collect", collect), ("stage_train_vq", train_vq), ("stage_pretokenize", pretokenize),
                     ("stage_train", train), ("stage_evaluate", evaluate)):
        monkeypatch.setattr(demo, name, fn)


def _ran(seen):
    return [s[0] for s in seen]


@pytest.mark.parametrize("output, first", [
    ("demos/reach-v3.hdf5", "collect"), ("vq/vqgan/config.json", "train-vq"), ("store/manifest.json", "pretokenize"),
    ("policy/policy.json", "train"), ("policy_action_only/policy.json", "train-action-only"),
    ("policy_causal/policy.json", "train-causal"), ("eval/metrics.json", "evaluate")])
def test_a_stage_whose_output_is_gone_runs_again_with_every_later_one(tmp_path, monkeypatch, output, first):
    """A marker alone does not make a stage cached: the files it left must still be there (a deleted policy or
    VQGAN is made again, and what was built on it too)."""
    from worldvla import demo

    seen = []
    _stub_all_stages(monkeypatch, seen)
    cfg = demo.DemoConfig.fast_preset(ablations=True)
    demo.run_demo(cfg, tmp_path, progress=False)
    assert _ran(seen) == list(demo.STAGES)
    seen.clear()
    demo.run_demo(cfg, tmp_path, progress=False)
    assert seen == []
    (tmp_path / output).unlink()
    demo.run_demo(cfg, tmp_path, progress=False)
    assert _ran(seen) == list(demo.STAGES[demo.STAGES.index(first):])


def test_force_runs_every_cached_stage_again(tmp_path, monkeypatch):
    """--force redoes a finished demo: every stage runs again, collection and tokenization anew, the trainings
    without resuming, the evaluation without the saved closed loops."""
    from worldvla import demo

    seen = []
    _stub_all_stages(monkeypatch, seen)
    cfg = demo.DemoConfig.fast_preset()
    demo.run_demo(cfg, tmp_path, progress=False)
    seen.clear()
    demo.run_demo(cfg, tmp_path, progress=False, force=True)
    assert [s[:2] for s in seen] == [("collect", True), ("train-vq", False), ("pretokenize", True), ("train", False),
                                     ("evaluate", False)]
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert not any(s["cached"] for s in m["stages"].values())


@pytest.mark.parametrize("stage", ["train-vq", "train", "train-action-only", "train-causal"])
def test_an_interrupted_training_resumes_on_the_next_run(tmp_path, monkeypatch, stage):
    """A training stopped (Ctrl-C, a kill) resumes from its checkpoint when the same command runs again, the
    ablation trainings as the main one; the stages before it stay cached."""
    from worldvla import demo

    seen = []
    _stub_all_stages(monkeypatch, seen, interrupt=[stage])
    cfg = demo.DemoConfig.fast_preset(ablations=True)
    with pytest.raises(KeyboardInterrupt):
        demo.run_demo(cfg, tmp_path, progress=False)
    assert seen[-1][:2] == (stage, False)
    seen.clear()
    demo.run_demo(cfg, tmp_path, progress=False)
    assert seen[0][:2] == (stage, True), seen
    assert _ran(seen) == list(demo.STAGES[demo.STAGES.index(stage):])
    assert not list((tmp_path / "stages").glob("*.started"))


@pytest.mark.parametrize("stage", ["collect", "train-vq", "pretokenize", "train", "evaluate"])
def test_a_stage_interrupted_while_it_runs_again_is_not_taken_as_finished(tmp_path, monkeypatch, stage):
    """A stage that runs again (its output was deleted) loses its marker before it starts: stopped after writing
    part of its files (a policy.json copied, the model not yet), the next run does not take them as finished."""
    from worldvla import demo

    seen = []
    _stub_all_stages(monkeypatch, seen)
    cfg = demo.DemoConfig.fast_preset()
    demo.run_demo(cfg, tmp_path, progress=False)
    outputs = {"collect": "demos/reach-v3.hdf5", "train-vq": "vq/vqgan/config.json", "pretokenize": "store/manifest.json",
               "train": "policy/policy.json", "evaluate": "eval/metrics.json"}
    (tmp_path / outputs[stage]).unlink()
    seen.clear()
    _stub_all_stages(monkeypatch, seen, interrupt=[stage])
    with pytest.raises(KeyboardInterrupt):
        demo.run_demo(cfg, tmp_path, progress=False)
    assert (tmp_path / outputs[stage]).is_file()  # the stopped stage had written it
    seen.clear()
    demo.run_demo(cfg, tmp_path, progress=False)
    assert _ran(seen)[0] == stage, seen


def test_the_trainings_get_the_sample_kinds_and_attention_of_their_variant(tmp_path, monkeypatch):
    """--action-only trains the policy on action samples only; --ablations adds an action-only training and one
    with plain causal attention, each into its own run and policy folder."""
    from worldvla import demo

    seen = []
    _stub_all_stages(monkeypatch, seen)
    demo.run_demo(demo.DemoConfig.fast_preset(world=False), tmp_path / "action_only", progress=False)
    trains = {s[0]: s[2] for s in seen if s[0].startswith("train") and s[0] != "train-vq"}
    assert trains == {"train": {"action_only": True}}
    seen.clear()
    demo.run_demo(demo.DemoConfig.fast_preset(ablations=True), tmp_path / "ablations", progress=False)
    trains = {s[0]: s[2] for s in seen if s[0].startswith("train") and s[0] != "train-vq"}
    assert trains == {
        "train": {"action_only": False},
        "train-action-only": {"action_only": True, "run_name": "train_action_only", "policy_name": "policy_action_only"},
        "train-causal": {"action_only": False, "run_name": "train_causal", "policy_name": "policy_causal",
                         "attention": "causal"}}


def test_the_ablations_setting_changes_the_key_of_the_ablation_trainings_and_the_evaluation():
    """Turning --ablations off after a run with it must not take that run's evaluation (with the ablation models'
    variants) as this one's: the evaluation's key depends on it, the main training's does not."""
    from dataclasses import replace

    from worldvla import demo

    cfg = demo.DemoConfig.fast_preset()
    before, after = demo.stage_keys(cfg), demo.stage_keys(replace(cfg, ablations=True))
    assert [s for s in demo.STAGES if before[s] != after[s]] == ["train-action-only", "train-causal", "evaluate"]


@pytest.mark.parametrize("field", ["eval_episodes", "chunk_size", "vq_steps", "train_steps"])
def test_demo_config_refuses_a_count_below_one_of_any_stage(field):
    """DemoConfig used from Python (not through the parser, which refuses them itself) is checked too."""
    from worldvla import demo

    with pytest.raises(ValueError, match=f"--{field.replace('_', '-')} must be >= 1, got 0"):
        demo.DemoConfig.fast_preset(**{field: 0}).check()


def test_a_collection_whose_failed_attempts_were_retried_goes_on(tmp_path, monkeypatch):
    """Attempts that raised but were retried until every task had its episodes leave the collection complete: the
    stage returns each task's summary (without its file path), it does not fail on the errors of the retried ones."""
    from worldvla import demo
    from worldvla.data import collect

    seen = {}

    def fake_collect(tasks, episodes, out, **kw):
        seen.update(kw, tasks=tasks, episodes=episodes)
        return {"incomplete": [], "errors": ["reach-v3 episode 1 attempt 0: RuntimeError: MuJoCo warning"],
                "tasks": {"reach-v3": {"episodes": 2, "successes": 2, "path": str(out / "reach-v3.hdf5")}}}

    monkeypatch.setattr(collect, "collect", fake_collect)
    cfg = demo.DemoConfig.fast_preset(seed=5, image_size=32)
    info = demo.stage_collect(cfg, tmp_path, False)
    assert info == {"reach-v3": {"episodes": 2, "successes": 2}}
    assert seen["tasks"] == ["reach-v3"] and seen["episodes"] == 2
    assert (seen["seed"], seen["image_size"], seen["max_steps"]) == (5, 32, cfg.collect_max_steps)


def test_the_trainings_get_the_demos_settings(tmp_path, monkeypatch):
    """The settings reach the trainers' parsers: a micro-batch no larger than the batch (the trainer refuses a
    larger one: `batch_tokens=1024` with the default `micro_tokens=1536` stopped the demo), the VQGAN's learning
    rate decaying to a tenth, a checkpoint a third of the way (50 steps at least), and the seed."""
    from worldvla import demo

    cfg = demo.DemoConfig(batch_tokens=1024, lr=2e-3, train_steps=300, vq_steps=600, vq_lr=4e-3, vq_batch=6,
                          vq_codes=128, seed=7)
    v, t = _trainer_args(monkeypatch, tmp_path, cfg)
    assert (t.batch_tokens, t.micro_tokens, t.lr, t.steps, t.seed) == (1024, 1024, 2e-3, 300, 7)
    assert (t.save_every, t.attention, t.kinds) == (100, "chunk", "")
    assert (v.steps, v.batch_size, v.lr, v.min_lr, v.n_embed, v.seed) == (600, 6, 4e-3, pytest.approx(4e-4), 128, 7)
    assert v.save_every == 200
    _, t = _trainer_args(monkeypatch, tmp_path, demo.DemoConfig(), action_only=True, attention="causal")
    assert (t.batch_tokens, t.micro_tokens, t.save_every, t.attention, t.kinds) == (1536, 1536, 300, "causal", "action")


def test_a_retrained_policy_replaces_the_earlier_policy_folder(tmp_path, monkeypatch):
    """The exported policy is copied into <out>/policy in place of the earlier one: a file only the earlier export
    had does not stay beside the new model."""
    from worldvla import demo
    from worldvla.train import trainer

    cfg = demo.DemoConfig.fast_preset()

    def fake_train(args):
        run = Path(args.out)
        (run / "policy").mkdir(parents=True, exist_ok=True)
        (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 1.0}) + "\n")
        (run / "policy" / "policy.json").write_text('{"new": true}')
        return {"export": str(run / "policy")}

    monkeypatch.setattr(trainer, "train", fake_train)
    (tmp_path / "policy" / "model").mkdir(parents=True)
    (tmp_path / "policy" / "model" / "old_weights.safetensors").write_bytes(b"old")
    (tmp_path / "policy" / "policy.json").write_text('{"old": true}')
    demo.stage_train(cfg, tmp_path, False, resume=False)
    assert sorted(p.name for p in (tmp_path / "policy").rglob("*")) == ["policy.json"]
    assert json.loads((tmp_path / "policy" / "policy.json").read_text()) == {"new": True}


def test_the_evaluation_gets_the_demos_settings_and_its_policies_in_order(tmp_path, monkeypatch):
    """Each policy folder is evaluated under its own name, with the demo's seed (the held-out layouts), episode limit,
    environments and worker processes; the variants decoded without the chunk mask only with --ablations."""
    from worldvla import demo
    from worldvla.eval import metaworld

    seen = {}
    monkeypatch.setattr(metaworld, "evaluate", lambda policies, tasks, episodes, out, **kw:
                        seen.update(kw, policies=policies, tasks=tasks, episodes=episodes, out=out) or {})
    cfg = demo.DemoConfig.fast_preset(seed=3, eval_max_steps=40, eval_envs=4, workers=3, eval_episodes=6,
                                      wm_horizon=5, tasks=("reach-v3", "push-v3"))
    demo.stage_evaluate(cfg, tmp_path, False)
    assert (seen["seed"], seen["max_steps"], seen["n_envs"], seen["env_workers"], seen["episodes"]) == (3, 40, 4, 3, 6)
    assert (seen["wm_horizon"], seen["tasks"], seen["out"], seen["resume"]) == (5, ["reach-v3", "push-v3"],
                                                                                tmp_path / "eval", True)
    assert seen["policies"] == [tmp_path / "policy"] and seen["variant_names"] == ["WorldVLA"]
    assert seen["causal_variant"] is False
    demo.stage_evaluate(demo.DemoConfig.fast_preset(ablations=True), tmp_path, False, reuse=False)
    assert dict(zip(seen["variant_names"], seen["policies"])) == {
        "WorldVLA": tmp_path / "policy", "action-only": tmp_path / "policy_action_only",
        "trained without chunk mask": tmp_path / "policy_causal"}
    assert seen["causal_variant"] is True and seen["resume"] is False


def test_demo_options_reach_its_settings():
    """Each option of `worldvla demo` sets its setting, over the --fast preset as over the defaults."""
    import argparse

    from worldvla import demo

    parser = demo.add_arguments(argparse.ArgumentParser())
    cfg = demo.config_from_args(parser.parse_args(
        ["--fast", "--tasks", "drawer-open-v3, window-open-v3", "--episodes", "3", "--eval-episodes", "4",
         "--image-size", "128", "--chunk-size", "2", "--train-steps", "5", "--vq-steps", "6", "--model", "small",
         "--lr", "0.002", "--workers", "3", "--seed", "9", "--action-only", "--ablations"]))
    assert cfg == demo.DemoConfig.fast_preset(
        tasks=("drawer-open-v3", "window-open-v3"), episodes=3, eval_episodes=4, image_size=128, chunk_size=2,
        train_steps=5, vq_steps=6, model="small", lr=0.002, workers=3, seed=9, world=False, ablations=True)
    assert demo.config_from_args(parser.parse_args([])) == demo.DemoConfig()
    assert demo.config_from_args(parser.parse_args(["--seed", "0", "--fast"])).seed == 0


def test_the_figures_line_names_the_training_curves_of_this_runs_stages_only(tmp_path, monkeypatch, capsys):
    """A run without --ablations in a folder where an earlier run trained the ablation models listed their curves
    as this run's."""
    from worldvla import demo
    from worldvla.eval import metaworld

    monkeypatch.setattr(metaworld, "format_results", lambda m: "")
    for run in ("vq", "train", "train_action_only", "train_causal"):
        (tmp_path / run).mkdir()
        (tmp_path / run / "training.png").write_bytes(b"png")
    results = {"eval": {}, "policy": str(tmp_path / "policy"), "total_seconds": 1.0,
               "stages": {s: {"cached": True} for s in ("collect", "train-vq", "pretokenize", "train", "evaluate")}}
    demo.print_table(results)
    printed = capsys.readouterr().out
    assert f"training curves: {tmp_path / 'train' / 'training.png'}, {tmp_path / 'vq' / 'training.png'}\n" in printed
    results["stages"].update({s: {"cached": True} for s in demo.ABLATION_STAGES})
    demo.print_table(results)
    assert (f"training curves: {tmp_path / 'train' / 'training.png'}, "
            f"{tmp_path / 'train_action_only' / 'training.png'}, {tmp_path / 'train_causal' / 'training.png'}, "
            f"{tmp_path / 'vq' / 'training.png'}\n") in capsys.readouterr().out


def test_ablations_of_an_action_only_demo_do_not_train_its_model_twice(tmp_path, monkeypatch):
    """With --action-only the main model is the action-only one: --ablations trained the same model again (identical
    weights, twice the time) and evaluated it as a second variant. Only the model without the chunk mask is added."""
    from worldvla import demo
    from worldvla.eval import metaworld

    stage_evaluate = demo.stage_evaluate
    seen = []
    _stub_all_stages(monkeypatch, seen)
    cfg = demo.DemoConfig.fast_preset(world=False, ablations=True)
    demo.run_demo(cfg, tmp_path / "run", progress=False)
    trains = {s[0]: s[2] for s in seen if s[0].startswith("train") and s[0] != "train-vq"}
    assert trains == {"train": {"action_only": True},
                      "train-causal": {"action_only": True, "run_name": "train_causal", "policy_name": "policy_causal",
                                       "attention": "causal"}}
    got = {}
    monkeypatch.setattr(metaworld, "evaluate", lambda policies, tasks, episodes, out, **kw:
                        got.update(kw, policies=policies) or {})
    stage_evaluate(cfg, tmp_path, False)
    assert dict(zip(got["variant_names"], got["policies"])) == {
        "WorldVLA (action-only)": tmp_path / "policy", "trained without chunk mask": tmp_path / "policy_causal"}


def test_a_diverged_training_names_the_demos_own_option(tmp_path, monkeypatch, capsys):
    """A loss that stops being finite (--lr too high) ended the demo with the trainer's advice only, which names
    options the demo does not take (--warmup, --grad-clip, --overwrite)."""
    from worldvla import demo
    from worldvla.train import checkpointing, trainer

    def diverge(args):
        checkpointing.check_finite(2, {"loss": float("nan")}, Path(args.out), trainer.DIVERGENCE_CAUSES)

    monkeypatch.setattr(trainer, "train", diverge)
    with pytest.raises(ValueError, match=r"^train: step 2: the loss is nan .*In `worldvla demo`: run it again with "
                                         r"a lower --lr \(its trainings then start over\)$"):
        demo.stage_train(demo.DemoConfig.fast_preset(), tmp_path, False, False)
    monkeypatch.setattr(trainer, "train", lambda args: (_ for _ in ()).throw(ValueError("another problem")))
    with pytest.raises(ValueError, match=r"^another problem$"):  # other errors pass as they are
        demo.stage_train(demo.DemoConfig.fast_preset(), tmp_path, False, False)


@pytest.mark.parametrize("field, value, message", [
    ("model", "medium", r"--model must be tiny or small, got 'medium'"),
    ("lr", 0.0, r"--lr must be a number > 0, got 0.0"),
    ("vq_lr", float("nan"), r"DemoConfig.vq_lr must be a number > 0, got nan"),
    ("vq_batch", 0, r"DemoConfig.vq_batch must be >= 1, got 0"),
    ("vq_codes", 0, r"DemoConfig.vq_codes must be >= 1, got 0"),
    ("batch_tokens", 0, r"DemoConfig.batch_tokens must be >= 1, got 0"),
    ("micro_tokens", -1, r"DemoConfig.micro_tokens must be >= 0, got -1"),
    ("eval_envs", 0, r"DemoConfig.eval_envs must be >= 1, got 0"),
    ("wm_episodes", -1, r"DemoConfig.wm_episodes must be >= 0, got -1"),
    ("wm_horizon", 0, r"DemoConfig.wm_horizon must be >= 1, got 0"),
    ("eval_max_steps", 0, r"DemoConfig.eval_max_steps must be in \[1, 500\]"),
    ("collect_max_steps", 501, r"DemoConfig.collect_max_steps must be in \[1, 500\]"),
    ("episodes", 2.5, r"--episodes must be a whole number, got 2.5"),
    ("image_size", 64.0, r"--image-size must be a whole number, got 64.0"),
    ("seed", 1.5, r"--seed must be a whole number, got 1.5"),
])
def test_demo_config_refuses_every_setting_a_later_stage_would_refuse(field, value, message, tmp_path, monkeypatch):
    """From Python, a bad model name, batch or environment count was refused by a stage's own parser (SystemExit with
    that command's usage, naming its option) or by the evaluation, only after the stages before it had run; a
    learning rate of 0 was taken and trained nothing. run_demo refuses them before collecting."""
    from worldvla import demo

    monkeypatch.setattr(demo, "stage_collect", lambda *a, **k: pytest.fail("collected before checking the settings"))
    with pytest.raises(ValueError, match=message):
        demo.run_demo(demo.DemoConfig.fast_preset(**{field: value}), tmp_path / "d", progress=False)
    assert not (tmp_path / "d").exists()
    demo.DemoConfig.fast_preset(micro_tokens=0, wm_episodes=0, eval_max_steps=500).check()  # their edges are taken


@pytest.mark.parametrize("damaged", [b"\xff\xfe\x00", b""])
def test_a_damaged_started_marker_starts_its_training_over(tmp_path, monkeypatch, damaged):
    """A `.started` marker that is not UTF-8 ended every run of the demo with "'utf-8' codec can't decode byte 0xff",
    naming no file; one that does not hold the stage's key means its training starts over."""
    from worldvla import demo

    seen = []
    _stub_all_stages(monkeypatch, seen)
    cfg = demo.DemoConfig.fast_preset()
    demo.run_demo(cfg, tmp_path, progress=False)
    (tmp_path / "stages" / "train.json").unlink()
    (tmp_path / "stages" / "train.started").write_bytes(damaged)
    seen.clear()
    demo.run_demo(cfg, tmp_path, progress=False)
    assert seen[0][:2] == ("train", False) and _ran(seen) == ["train", "evaluate"]
    assert not (tmp_path / "stages" / "train.started").exists()


def test_force_and_no_progress_of_the_command_line_reach_every_stage(tmp_path, monkeypatch):
    """`worldvla demo --force` and `--no-progress` go through `run` to every stage: a finished demo is redone
    (collection and tokenization anew, the evaluation without its saved closed loops), without progress bars."""
    from worldvla import demo

    seen, progress = [], []
    _stub_all_stages(monkeypatch, seen)
    for name in ("stage_collect", "stage_train_vq", "stage_pretokenize", "stage_train", "stage_evaluate"):
        def record(cfg, out, shown, *a, _stage=getattr(demo, name), **k):
            progress.append(shown)
            return _stage(cfg, out, shown, *a, **k)
        monkeypatch.setattr(demo, name, record)
    monkeypatch.setattr(demo, "print_table", lambda results: None)
    argv = ["--fast", "--out", str(tmp_path)]
    assert demo.main(argv) == 0
    assert progress == [True] * 5
    seen.clear(), progress.clear()
    assert demo.main(argv + ["--no-progress", "--force"]) == 0
    assert [s[:2] for s in seen] == [("collect", True), ("train-vq", False), ("pretokenize", True), ("train", False),
                                     ("evaluate", False)]
    assert progress == [False] * 5


def test_the_stages_pass_the_progress_setting_on(tmp_path, monkeypatch):
    """Each stage hands `progress` to the code it runs: the trainers get --no-progress, collect, the store and the
    evaluation progress=False (a log of `--no-progress` filled with bars otherwise)."""
    from worldvla import demo
    from worldvla.data import collect, store
    from worldvla.eval import metaworld
    from worldvla.train import trainer
    from worldvla.train import vq as train_vq

    seen = {}

    class Stop(Exception):
        pass

    def record(name):
        def stop(*args, **kwargs):
            seen[name] = not args[0].no_progress if name in ("train", "vq") else kwargs["progress"]
            raise Stop()
        return stop

    monkeypatch.setattr(trainer, "train", record("train"))
    monkeypatch.setattr(train_vq, "train_vq", record("vq"))
    monkeypatch.setattr(collect, "collect", record("collect"))
    monkeypatch.setattr(store, "build_store", record("store"))
    monkeypatch.setattr(metaworld, "evaluate", record("evaluate"))
    cfg = demo.DemoConfig.fast_preset()
    for shown in (False, True):
        for stage in (demo.stage_collect, demo.stage_train_vq, demo.stage_pretokenize, demo.stage_train,
                      demo.stage_evaluate):
            with pytest.raises(Stop):
                stage(cfg, tmp_path, shown, *([False] if stage in (demo.stage_train_vq, demo.stage_train) else []))
        assert seen == dict.fromkeys(("collect", "vq", "store", "train", "evaluate"), shown), shown


def test_the_store_and_the_model_get_the_demos_chunk_size_and_model_size(tmp_path, monkeypatch):
    """--chunk-size reaches the store (its samples hold chunks of K actions, the policy's chunk size) and --model the
    trainer's --config; both differ from the store's and the trainer's own defaults here."""
    from worldvla import demo
    from worldvla.data import store
    from worldvla.train import trainer

    seen = {}

    class Stop(Exception):
        pass

    def build_store(files, out, vqgan, **kw):
        seen.update(kw, vqgan=vqgan)
        raise Stop()

    def train(args):
        seen["config"] = args.config
        raise Stop()

    monkeypatch.setattr(store, "build_store", build_store)
    monkeypatch.setattr(trainer, "train", train)
    cfg = demo.DemoConfig.fast_preset(chunk_size=3, model="tiny")
    with pytest.raises(Stop):
        demo.stage_pretokenize(cfg, tmp_path, False)
    assert (seen["chunk_size"], seen["vqgan"]) == (3, tmp_path / "vq" / "vqgan")
    with pytest.raises(Stop):
        demo.stage_train(cfg, tmp_path, False, False)
    assert seen["config"] == "tiny"
    with pytest.raises(Stop):
        demo.stage_train(demo.DemoConfig(), tmp_path, False, False)
    assert seen["config"] == "small"


def test_force_collects_every_tasks_file_anew(tmp_path, monkeypatch):
    """--force removes the file of each of the run's tasks before collecting (a kept one is not collected again),
    and leaves other tasks' files alone."""
    from worldvla import demo
    from worldvla.data import collect

    cfg = demo.DemoConfig.fast_preset(tasks=("reach-v3", "push-v3", "drawer-open-v3"))
    (tmp_path / "demos").mkdir()
    for t in (*cfg.tasks, "window-open-v3"):
        (tmp_path / "demos" / f"{t}.hdf5").write_bytes(b"old")
    found = {}

    def fake_collect(*a, **k):
        found["demos"] = sorted(p.name for p in (tmp_path / "demos").iterdir())
        return {"incomplete": [], "errors": [], "tasks": {}}

    monkeypatch.setattr(collect, "collect", fake_collect)
    demo.stage_collect(cfg, tmp_path, False, fresh=True)
    assert found["demos"] == ["window-open-v3.hdf5"]


def test_a_cached_stage_counts_no_seconds_of_this_run(tmp_path, monkeypatch, capsys):
    """A second run's summary gives a cached stage 0 s of its own and the time it took when it ran as
    original_seconds; the total is this run's, not the earlier run's."""
    from worldvla import demo

    seen = []
    _stub_all_stages(monkeypatch, seen)
    cfg = demo.DemoConfig.fast_preset()
    demo.run_demo(cfg, tmp_path, progress=False)
    for marker in (tmp_path / "stages").glob("*.json"):  # as if each stage had taken 1000 s
        marker.write_text(json.dumps({**json.loads(marker.read_text()), "seconds": 1000.0}))
    capsys.readouterr()
    results = demo.run_demo(cfg, tmp_path, progress=False)
    assert results["stages"] == {s: {"cached": True, "seconds": 0.0, "original_seconds": 1000.0}
                                 for s in demo.stages_for(cfg)}
    assert results["total_seconds"] < 100
    assert json.loads((tmp_path / "metrics.json").read_text())["stages"] == results["stages"]
    assert "[worldvla demo] train: cached (1000 s when it ran)" in capsys.readouterr().out


def _stub_trainer_and_evaluation(monkeypatch, seen):
    """run_demo with the stand-in stages of _stub_all_stages up to the store, and its own training and evaluation
    stages around stand-ins of the trainer and of the evaluation. Each training exports a policy (policy.json naming
    its run folder and attention, model/, vqgan/) and logs a loss a step; each evaluation writes the metrics of its
    variants (1 success of the episodes) and, when asked for, of the random baseline (none), and records its keyword
    arguments with the run folder of each policy it is given."""
    from worldvla import demo
    from worldvla.eval import metaworld
    from worldvla.train import trainer

    stage_train, stage_evaluate = demo.stage_train, demo.stage_evaluate
    _stub_all_stages(monkeypatch, seen)
    monkeypatch.setattr(demo, "stage_train", stage_train)
    monkeypatch.setattr(demo, "stage_evaluate", stage_evaluate)

    def train(args):
        run = Path(args.out)
        export = run / "policy"
        (export / "model").mkdir(parents=True)
        (export / "vqgan").mkdir()
        (export / "model" / "model.safetensors").write_bytes(b"weights")
        (export / "vqgan" / "config.json").write_text("{}")
        (export / "policy.json").write_text(json.dumps({"run": run.name, "attention": args.attention}))
        (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 10.0 - s}) + "\n"
                                                   for s in range(1, args.steps + 1)))
        return {"export": str(export)}

    def evaluate(policies, tasks, episodes, out, **kw):
        trained = {n: json.loads((p / "policy.json").read_text())["run"] if (p / "policy.json").is_file() else None
                   for n, p in zip(kw["variant_names"], policies)}
        seen.append(("evaluate", kw["resume"], dict(kw, trained=trained)))

        def result(successes):
            return {"success_rate": successes / episodes, "tasks": {
                t: {"success_rate": successes / episodes, "successes": successes, "episodes": episodes} for t in tasks}}

        metrics = {"tasks": list(tasks), "variants": {n: result(1) for n in kw["variant_names"]}, "complete": True}
        if kw["random_baseline"]:
            metrics["random"] = result(0)
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(metrics))
        return metrics

    monkeypatch.setattr(trainer, "train", train)
    monkeypatch.setattr(metaworld, "evaluate", evaluate)


def test_the_demo_evaluates_the_random_baseline_and_reports_it_beside_the_policy(tmp_path, monkeypatch, capsys):
    """The evaluation runs the uniform-random policy on the same layouts, and metrics.json and the printed table
    report its success next to the policy's (chance level, without which a success rate says little)."""
    from worldvla import demo
    from worldvla.eval import metaworld

    seen = []
    _stub_trainer_and_evaluation(monkeypatch, seen)
    assert demo.main(["--fast", "--out", str(tmp_path), "--no-progress"]) == 0
    assert _ran(seen)[-1] == "evaluate" and seen[-1][2]["random_baseline"] is True
    ev = json.loads((tmp_path / "metrics.json").read_text())["eval"]
    assert ev["variants"]["WorldVLA"]["success_rate"] == 0.5 and ev["random"]["tasks"]["reach-v3"]["successes"] == 0
    printed = capsys.readouterr().out
    assert metaworld.format_results(ev) in printed
    table = printed[printed.index("closed-loop success"):].splitlines()
    assert table[1].split() == ["task", "WorldVLA", "random"], table
    assert table[2].split() == ["reach-v3", "50%", "(1/2)", "0%", "(0/2)"], table


@pytest.mark.parametrize("damage", ["cut short", "not complete", "not a dict"])
def test_an_evaluation_output_cut_short_runs_the_evaluation_again_alone(tmp_path, monkeypatch, capsys, damage):
    """eval/metrics.json cut short (a full disk) was read as it stood ("Unterminated string", naming no file); one
    that an evaluation stopped before its end says "complete": false. Either way the evaluation runs again, and it
    alone: the stages before it stay cached. A file that is not a metrics dict is named."""
    from worldvla import demo

    seen = []
    _stub_all_stages(monkeypatch, seen)
    cfg = demo.DemoConfig.fast_preset(ablations=True)
    demo.run_demo(cfg, tmp_path, progress=False)
    metrics = tmp_path / "eval" / "metrics.json"
    text = metrics.read_text()
    metrics.write_text({"cut short": text[:len(text) // 2], "not complete": json.dumps({"complete": False}),
                        "not a dict": "[1]"}[damage])
    seen.clear()
    capsys.readouterr()
    results = demo.run_demo(cfg, tmp_path, progress=False)
    assert _ran(seen) == ["evaluate"]
    assert [s for s, v in results["stages"].items() if not v["cached"]] == ["evaluate"]
    printed = capsys.readouterr().out
    assert (f"[worldvla demo] {metrics} cannot be read (" in printed) == (damage != "not complete"), printed
    assert ("its stage runs again" in printed) == (damage != "not complete"), printed
    assert results["eval"] == json.loads((tmp_path / "metrics.json").read_text())["eval"] == {"complete": True}


def test_the_summary_reports_this_runs_evaluation_not_an_earlier_runs(tmp_path, monkeypatch, capsys):
    """The folder holds the evaluation of an earlier run of other settings (2 episodes, no ablations): metrics.json
    and the printed table report this run's (4 episodes, three variants)."""
    from worldvla import demo
    from worldvla.eval import metaworld

    seen = []
    _stub_trainer_and_evaluation(monkeypatch, seen)
    argv = ["--fast", "--out", str(tmp_path), "--no-progress"]
    assert demo.main(argv) == 0
    capsys.readouterr()
    assert demo.main(argv + ["--eval-episodes", "4", "--ablations"]) == 0
    printed = capsys.readouterr().out
    ev = json.loads((tmp_path / "metrics.json").read_text())["eval"]
    assert ev == json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert set(ev["variants"]) == {"WorldVLA", "action-only", "trained without chunk mask"}
    assert ev["random"]["tasks"]["reach-v3"]["episodes"] == 4
    assert metaworld.format_results(ev) in printed
    assert "(1/4)" in printed and "(1/2)" not in printed


def test_each_training_exports_into_its_own_policy_folder_and_is_evaluated_from_it(tmp_path, monkeypatch):
    """With --ablations three trainings export a policy: each export is copied whole (policy.json, model/, vqgan/)
    into its own folder, none over another's, and the evaluation loads each variant from its own folder."""
    from worldvla import demo

    seen = []
    _stub_trainer_and_evaluation(monkeypatch, seen)
    demo.run_demo(demo.DemoConfig.fast_preset(ablations=True), tmp_path, progress=False)
    exports = {"policy": ("train", "chunk"), "policy_action_only": ("train_action_only", "chunk"),
               "policy_causal": ("train_causal", "causal")}
    for folder, (run, attention) in exports.items():
        policy = tmp_path / folder
        assert json.loads((policy / "policy.json").read_text()) == {"run": run, "attention": attention}, folder
        assert sorted(p.relative_to(policy).as_posix() for p in policy.rglob("*")) == [
            "model", "model/model.safetensors", "policy.json", "vqgan", "vqgan/config.json"], folder
    assert seen[-1][2]["trained"] == {"WorldVLA": "train", "action-only": "train_action_only",
                                      "trained without chunk mask": "train_causal"}


def test_the_summary_records_what_each_training_reports(tmp_path, monkeypatch):
    """metrics.json keeps each training's own report: its first and last loss, the sample kinds and the attention
    it trained with (the model without the chunk mask: causal)."""
    from worldvla import demo

    seen = []
    _stub_trainer_and_evaluation(monkeypatch, seen)
    demo.run_demo(demo.DemoConfig.fast_preset(ablations=True), tmp_path, progress=False)
    stages = json.loads((tmp_path / "metrics.json").read_text())["stages"]
    last = 10.0 - demo.DemoConfig.fast_preset().train_steps
    assert {s: stages[s]["info"] for s in ("train", "train-action-only", "train-causal")} == {
        "train": {"first_loss": 9.0, "final_loss": last, "action_only": False, "attention": "chunk"},
        "train-action-only": {"first_loss": 9.0, "final_loss": last, "action_only": True, "attention": "chunk"},
        "train-causal": {"first_loss": 9.0, "final_loss": last, "action_only": False, "attention": "causal"}}


def test_the_summary_records_this_runs_settings_and_policy_folder(tmp_path, monkeypatch, capsys):
    """metrics.json holds the settings of the run that wrote it (the policy's chunk size among them), and the summary
    names the policy folder to serve."""
    from dataclasses import asdict

    from worldvla import demo

    seen = []
    _stub_trainer_and_evaluation(monkeypatch, seen)
    argv = ["--fast", "--out", str(tmp_path), "--no-progress"]
    for chunk in ("3", "2"):
        assert demo.main(argv + ["--chunk-size", chunk]) == 0
        m = json.loads((tmp_path / "metrics.json").read_text())
        assert m["config"] == json.loads(json.dumps(asdict(demo.DemoConfig.fast_preset(chunk_size=int(chunk)))))
    assert m["policy"] == str(tmp_path / "policy")
    policy = tmp_path / "policy"
    assert f"policy: {policy}  (worldvla serve --checkpoint {policy})\n" in capsys.readouterr().out


def test_a_cached_evaluation_is_reported_again(tmp_path, monkeypatch):
    """A second run with every stage cached reports the evaluation kept in eval/metrics.json, as the first did."""
    from worldvla import demo

    seen = []
    _stub_trainer_and_evaluation(monkeypatch, seen)
    cfg = demo.DemoConfig.fast_preset()
    first = demo.run_demo(cfg, tmp_path, progress=False)
    seen.clear()
    second = demo.run_demo(cfg, tmp_path, progress=False)
    assert seen == [] and all(s["cached"] for s in second["stages"].values())
    assert second["eval"] == first["eval"] and second["eval"]["variants"]["WorldVLA"]["success_rate"] == 0.5
    assert json.loads((tmp_path / "metrics.json").read_text())["eval"] == first["eval"]


def test_a_changed_setting_reruns_its_stage_and_the_later_ones_only(tmp_path, monkeypatch):
    """Through run_demo: another --train-steps reruns the training and the evaluation, and --ablations then adds the
    two ablation trainings and the evaluation; the stages before them stay cached."""
    from dataclasses import replace

    from worldvla import demo

    seen = []
    _stub_all_stages(monkeypatch, seen)
    cfg = demo.DemoConfig.fast_preset()
    demo.run_demo(cfg, tmp_path, progress=False)
    for changed, ran in (({"train_steps": 2}, ["train", "evaluate"]),
                         ({"train_steps": 2, "ablations": True}, ["train-action-only", "train-causal", "evaluate"])):
        seen.clear()
        results = demo.run_demo(replace(cfg, **changed), tmp_path, progress=False)
        assert _ran(seen) == ran, changed
        assert [s for s, v in results["stages"].items() if not v["cached"]] == ran, changed


@pytest.mark.parametrize("field, value, message", [
    ("lr", True, r"--lr must be a number > 0, got True"),
    ("vq_lr", "0.001", r"DemoConfig.vq_lr must be a number > 0, got '0.001'"),
    ("lr", float("inf"), r"--lr must be a number > 0, got inf"),
])
def test_a_learning_rate_that_is_not_a_number_is_refused_naming_it(field, value, message):
    """True is no learning rate (the trainer's parser would get "--lr True"), nor is a string or infinity."""
    from worldvla import demo

    with pytest.raises(ValueError, match=message):
        demo.DemoConfig.fast_preset(**{field: value}).check()


@pytest.mark.parametrize("field", ["workers", "episodes"])
def test_demo_config_names_the_option_of_a_setting_the_command_line_takes(field):
    """From Python, a setting that `worldvla demo` has an option for is named by that option, as on the command
    line (--workers, not DemoConfig.workers)."""
    from worldvla import demo

    with pytest.raises(ValueError, match=rf"^--{field} must be >= 1, got 0$"):
        demo.DemoConfig.fast_preset(**{field: 0}).check()


def test_collect_starts_no_more_workers_than_episodes(tmp_path, monkeypatch):
    """The collection's worker processes are the demo's --workers, but never more than the episodes to collect
    (each idle one would still start a simulator)."""
    from worldvla import demo
    from worldvla.data import collect

    seen = {}
    monkeypatch.setattr(collect, "collect",
                        lambda *a, **k: seen.update(k) or {"incomplete": [], "errors": [], "tasks": {}})
    demo.stage_collect(demo.DemoConfig.fast_preset(workers=5), tmp_path, False)  # 1 task x 2 episodes
    assert seen["workers"] == 2
    demo.stage_collect(demo.DemoConfig.fast_preset(workers=3, tasks=("reach-v3", "push-v3")), tmp_path, False)
    assert seen["workers"] == 3  # 4 episodes: every worker has one


@pytest.mark.parametrize("n, shown, more", [(3, 3, False), (4, 3, True)])
def test_a_failed_collection_names_its_first_three_errors(tmp_path, monkeypatch, n, shown, more):
    """The one-line message of attempts that raised names the first three errors, and marks with "; ..." that there
    were more only when there were."""
    from worldvla import demo
    from worldvla.data import collect

    errors = [f"reach-v3 episode 0 attempt {a}: RuntimeError: failure {a}" for a in range(n)]
    monkeypatch.setattr(collect, "collect", lambda *a, **k: {"incomplete": ["reach-v3"], "errors": errors})
    with pytest.raises(demo.CollectionFailed) as e:
        demo.stage_collect(demo.DemoConfig.fast_preset(), tmp_path, False)
    msg = str(e.value)
    assert f"{n} attempt(s) raised errors ({'; '.join(errors[:shown])}{'; ...' if more else ''}): fix" in msg, msg
    assert all(err not in msg for err in errors[shown:])


def test_a_vqgan_training_stopped_by_sigterm_ends_the_demo_saying_where(tmp_path, monkeypatch):
    """A SIGTERM inside the VQGAN training ends it after a saved step, with no export: the demo stops there naming
    the stage and the step (the next run resumes it), not with "finished without exporting a VQGAN"."""
    from worldvla import demo
    from worldvla.cli import Stopped
    from worldvla.train import vq as train_vq

    monkeypatch.setattr(train_vq, "train_vq", lambda args: {"step": 5, "export": None, "stopped": True})
    with pytest.raises(Stopped, match=r"^stopped by SIGTERM in train-vq after step 5, which is saved$"):
        demo.stage_train_vq(demo.DemoConfig.fast_preset(), tmp_path, False, False)


def _trainer_args(monkeypatch, tmp_path, cfg, **train_kw):
    """The parsed arguments each training stage gives its trainer for `cfg` (each trainer stopped at its entry);
    `train_kw` goes to the WorldVLA training stage."""
    from worldvla import demo
    from worldvla.train import trainer
    from worldvla.train import vq as train_vq

    seen = {}

    class Stop(Exception):
        pass

    def record(name):
        def stop(args):
            seen[name] = args
            raise Stop()
        return stop

    monkeypatch.setattr(trainer, "train", record("train"))
    monkeypatch.setattr(train_vq, "train_vq", record("vq"))
    with pytest.raises(Stop):
        demo.stage_train_vq(cfg, tmp_path, False, False)
    with pytest.raises(Stop):
        demo.stage_train(cfg, tmp_path, False, False, **train_kw)
    return seen["vq"], seen["train"]


def test_the_trainings_run_on_the_cpu_with_the_demos_schedule(tmp_path, monkeypatch):
    """What the demo sets in its trainers beyond its own settings: the CPU, one checkpoint kept, a checkpoint a third
    of the way but at least every 50 steps, the WorldVLA's loss logged every step (first and final loss are read
    from the log) after a 5% warm-up, and the VQGAN's warm-up a tenth of its steps (1 to 100), its usage average
    fast (0.9) and dead codes restarted every 20 steps, so that a short run keeps its small codebook in use."""
    from worldvla import demo

    vq, train = _trainer_args(monkeypatch, tmp_path, demo.DemoConfig.fast_preset(vq_steps=30, train_steps=12))
    assert (vq.device, vq.config, vq.keep_last, vq.save_every, vq.warmup) == ("cpu", "small", 1, 50, 3)
    assert (vq.usage_decay, vq.restart_every, vq.log_every) == (0.9, 20, 10)
    assert (train.device, train.keep_last, train.save_every, train.warmup, train.log_every) == ("cpu", 1, 50, 0.05, 1)
    for vq_steps, warmup in ((5, 1), (600, 60), (3000, 100)):
        vq, _ = _trainer_args(monkeypatch, tmp_path, demo.DemoConfig.fast_preset(vq_steps=vq_steps))
        assert vq.warmup == warmup, vq_steps


def test_the_store_holds_both_sample_kinds_of_unit_bounds_with_two_frames_of_history(tmp_path, monkeypatch):
    """The store's key does not depend on --action-only, so it holds both sample kinds either way (a later run
    without --action-only reuses it; the trainer picks the kinds), each with the frame before the current one,
    actions scaled by the unit bounds of Meta-World, and replaces a store of other settings."""
    from worldvla import demo
    from worldvla.data import store

    seen = {}

    class Stop(Exception):
        pass

    def build_store(files, out, vqgan, **kw):
        seen.update(kw)
        raise Stop()

    monkeypatch.setattr(store, "build_store", build_store)
    for world in (True, False):
        seen.clear()
        with pytest.raises(Stop):
            demo.stage_pretokenize(demo.DemoConfig.fast_preset(world=world), tmp_path, False)
        assert {k: seen[k] for k in ("history", "action", "world", "bounds", "overwrite")} == {
            "history": 2, "action": True, "world": True, "bounds": "unit", "overwrite": True}, world


def test_a_training_resumed_after_logging_its_last_step_reports_the_last_loss_logged(tmp_path, monkeypatch):
    """A run killed after logging its final step but before saving it resumes from its last checkpoint and logs the
    steps after it again: the final loss is the one logged last, the rerun's, not the killed run's."""
    from worldvla import demo
    from worldvla.train import trainer

    cfg = demo.DemoConfig.fast_preset()
    last = cfg.train_steps

    def fake_train(args):
        run = Path(args.out)
        run.mkdir(parents=True, exist_ok=True)
        rows = [{"step": s, "loss": 10.0 - s} for s in range(1, last + 1)] + [{"step": last, "loss": 0.5}]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (run / "policy").mkdir(exist_ok=True)
        (run / "policy" / "policy.json").write_text("{}")
        return {"export": str(run / "policy")}

    monkeypatch.setattr(trainer, "train", fake_train)
    info = demo.stage_train(cfg, tmp_path, False, resume=True)
    assert info["first_loss"] == 9.0 and info["final_loss"] == 0.5


def test_a_demo_folder_whose_config_file_is_gone_is_still_the_demos(tmp_path, monkeypatch):
    """A folder holding stages/ is a demo's even without its demo_config.json (deleted, or lost in a copy): the demo
    runs there again instead of refusing its own policy/ and metrics.json as another command's."""
    from worldvla import demo

    seen = []
    _stub_stages(monkeypatch, seen)
    cfg = demo.DemoConfig.fast_preset()
    demo.run_demo(cfg, tmp_path, progress=False)
    (tmp_path / "demo_config.json").unlink()
    seen.clear()
    demo.run_demo(cfg, tmp_path, progress=False)
    assert seen == [] and (tmp_path / "demo_config.json").is_file()  # every stage cached


@pytest.mark.parametrize("name", ["demos", "vq", "store", "train", "train_action_only", "train_causal", "policy",
                                  "policy_action_only", "policy_causal", "eval", "metrics.json"])
def test_demo_refuses_a_folder_holding_any_name_it_writes(tmp_path, monkeypatch, name, capsys):
    """Each name the demo writes into --out (and so replaces) makes a folder that is not a demo's refused."""
    from worldvla import demo

    seen = []
    _stub_stages(monkeypatch, seen)
    out = tmp_path / "other"
    out.mkdir()
    if "." in name:
        (out / name).write_text("{}")
    else:
        (out / name).mkdir()
    assert demo.main(["--fast", "--out", str(out), "--no-progress"]) == 2
    assert f"--out {out} holds files that are not a worldvla demo's ({name})" in capsys.readouterr().err
    assert seen == [] and sorted(p.name for p in out.iterdir()) == [name]


def test_the_evaluations_results_are_kept_once_not_in_its_stage_record(tmp_path, monkeypatch):
    """metrics.json reports the evaluation under "eval"; its stage record (in metrics.json and its marker under
    stages/) keeps no second copy of it, as the trainings' records keep what they report."""
    from worldvla import demo

    seen = []
    _stub_trainer_and_evaluation(monkeypatch, seen)
    demo.run_demo(demo.DemoConfig.fast_preset(), tmp_path, progress=False)
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["eval"]["variants"]["WorldVLA"]["success_rate"] == 0.5
    assert m["stages"]["evaluate"]["info"] == {} and m["stages"]["train"]["info"]["first_loss"] == 9.0
    assert json.loads((tmp_path / "stages" / "evaluate.json").read_text())["info"] == {}


def test_the_stages_that_run_simulator_workers_say_their_cpu_time_is_not_counted(tmp_path, monkeypatch, capsys):
    """The CPU seconds printed for a stage are this process's: collect and evaluate say that their simulator
    workers' are not in them; the stages without workers do not."""
    from worldvla import demo

    seen = []
    _stub_all_stages(monkeypatch, seen)
    demo.run_demo(demo.DemoConfig.fast_preset(), tmp_path, progress=False)
    done = [ln for ln in capsys.readouterr().out.splitlines() if ": done in " in ln]
    assert [ln.split(":")[0].split()[-1] for ln in done] == ["collect", "train-vq", "pretokenize", "train", "evaluate"]
    for ln in done:
        workers = ln.split(":")[0].endswith(("collect", "evaluate"))
        assert ln.endswith("CPU-s in this process; the simulator workers' not counted)") == workers, ln
        assert ln.endswith("CPU-s in this process)") != workers, ln


def test_a_stage_marker_without_its_seconds_is_reported_cached(tmp_path, monkeypatch, capsys):
    """A marker that holds its key but not the seconds its stage took still marks the stage cached, reported without
    a time (not a crash formatting None)."""
    from worldvla import demo

    seen = []
    _stub_all_stages(monkeypatch, seen)
    cfg = demo.DemoConfig.fast_preset()
    demo.run_demo(cfg, tmp_path, progress=False)
    marker = tmp_path / "stages" / "collect.json"
    marker.write_text(json.dumps({k: v for k, v in json.loads(marker.read_text()).items() if k != "seconds"}))
    seen.clear()
    capsys.readouterr()
    results = demo.run_demo(cfg, tmp_path, progress=False)
    assert seen == [] and results["stages"]["collect"] == {"cached": True, "seconds": 0.0, "original_seconds": None}
    assert "[worldvla demo] collect: cached\n" in capsys.readouterr().out


def test_the_demos_defaults_are_the_ones_its_help_states():
    """The epilog of `worldvla demo --help` spells out the default run; the defaults are that run, and the default
    output folder is the one its first example names."""
    import argparse

    from worldvla import demo

    d = demo.DemoConfig()
    assert (len(d.tasks), d.episodes, d.image_size, d.vq_codes, d.vq_steps, d.vq_batch) == (3, 30, 64, 256, 300, 12)
    assert (d.model, d.train_steps, d.batch_tokens, d.chunk_size) == ("small", 900, 1536, 5)
    assert (d.eval_episodes, d.eval_max_steps, d.wm_episodes, d.wm_horizon) == (10, 150, 2, 8)
    for stated in ("3 tasks x 30 expert demos at 64x64 px, a 256-code VQGAN (300 steps of 12 frames)",
                   "900 steps of 1,536 tokens", "chunks\nof K=5", "10 evaluation episodes per task", "(150 steps max)",
                   "2 held-out expert rollouts\nper task (8 imagined steps)", "the default run into ./worldvla_demo"):
        assert stated in demo.EPILOG, stated
    assert demo.add_arguments(argparse.ArgumentParser()).parse_args([]).out == "./worldvla_demo"


def test_the_summary_line_gives_each_stages_time_or_cached_and_this_runs_total(tmp_path, monkeypatch, capsys):
    """The closing stages line names every stage in order, a cached one as cached, one that ran with its
    rounded seconds, and ends with the run's total."""
    from worldvla import demo
    from worldvla.eval import metaworld

    monkeypatch.setattr(metaworld, "format_results", lambda m: "")
    results = {"eval": {}, "policy": str(tmp_path / "policy"), "total_seconds": 61.6,
               "stages": {"collect": {"cached": True, "seconds": 0.0}, "train-vq": {"cached": False, "seconds": 12.4},
                          "pretokenize": {"cached": False, "seconds": 3.6}, "train": {"cached": False, "seconds": 45.0},
                          "evaluate": {"cached": True, "seconds": 0.0}}}
    demo.print_table(results)
    lines = capsys.readouterr().out.splitlines()
    assert "stages: collect cached, train-vq 12 s, pretokenize 4 s, train 45 s, evaluate cached; total 62 s" in lines
    policy = tmp_path / "policy"
    assert f"policy: {policy}  (worldvla serve --checkpoint {policy})" in lines


def test_the_tokenize_stage_reports_the_stores_sample_and_token_counts(tmp_path, monkeypatch):
    """The pretokenize stage's record holds the counts of the store's manifest: its samples, of each kind, and
    its tokens."""
    from worldvla import demo
    from worldvla.data import store

    counts = {"n_samples": 7, "n_action": 4, "n_world": 3, "n_tokens": 901}

    def build_store(files, out, vqgan, **kw):
        out.mkdir(parents=True, exist_ok=True)
        (out / store.MANIFEST).write_text(json.dumps({**counts, "complete": True, "shards": []}))
        return out

    monkeypatch.setattr(store, "build_store", build_store)
    assert demo.stage_pretokenize(demo.DemoConfig.fast_preset(), tmp_path, False) == counts


def test_the_collect_stage_reports_every_tasks_summary(tmp_path, monkeypatch):
    """The collect stage's record holds the summary of each of the run's tasks, each without its file path."""
    from worldvla import demo
    from worldvla.data import collect

    tasks = ("reach-v3", "drawer-open-v3")

    def fake_collect(tasks, episodes, out, **kw):
        return {"incomplete": [], "errors": [],
                "tasks": {t: {"episodes": 2, "successes": 1 + i, "path": str(out / f"{t}.hdf5")}
                          for i, t in enumerate(tasks)}}

    monkeypatch.setattr(collect, "collect", fake_collect)
    info = demo.stage_collect(demo.DemoConfig.fast_preset(tasks=tasks), tmp_path, False)
    assert info == {"reach-v3": {"episodes": 2, "successes": 1}, "drawer-open-v3": {"episodes": 2, "successes": 2}}
