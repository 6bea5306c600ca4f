"""`worldvla imagine`: world-model rollouts from a recorded episode or an image and actions."""
import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from worldvla import cli
from worldvla.data.hdf5 import read_demos, write_demos
from worldvla.inference.frames import generate_frames
from worldvla.inference.policy import WorldVLAPolicy, _resize, save_policy
from worldvla.model import ModelConfig, WorldVLA
from worldvla.tokens import ActionTokenizer, VocabLayout
from worldvla.vqgan import VQGAN, VQGANConfig


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny random policy (32 px frames, 4-D actions) and a file of two 6-frame episodes of 48 px."""
    root = tmp_path_factory.mktemp("imagine")
    layout = VocabLayout.compact(n_image_codes=64)
    model = WorldVLA(ModelConfig.tiny(layout)).init_weights(0.5, torch.Generator().manual_seed(3))
    with torch.random.fork_rng():  # the same weights whichever tests ran before: draws compared below depend on them
        torch.manual_seed(3)
        vqgan = VQGAN(dataclasses.replace(VQGANConfig.small(), n_embed=64))
    save_policy(root / "policy", model, vqgan, ActionTokenizer(layout, [-1.0] * 4, [1.0] * 4), chunk_size=3,
                image_size=32)
    rng = np.random.default_rng(0)
    demos = [{"frames": rng.integers(0, 256, (6, 48, 48, 3), dtype=np.uint8),
              "actions": rng.uniform(-1, 1, (6, 4)).astype(np.float32)} for _ in range(2)]
    write_demos(root / "demos.hdf5", demos, "push the block")
    return root


def _run(*argv):
    return cli.main(["imagine", *map(str, argv), "--no-progress"])


def test_demo_rollout_beside_the_recorded_frames(files, tmp_path):
    """From episode 1 at frame 1: as many steps as recorded frames follow (4 of the 9 asked), the codes
    of generate_frames on the same frame and actions, the recorded frames resized to the policy's size,
    a score per step, and every output file."""
    out = tmp_path / "out"
    assert _run(files / "policy", "--demos", files / "demos.hdf5", "--demo", 1, "--start", 1, "--steps", 9,
                "--out", out) == 0
    result = json.loads((out / "rollout.json").read_text())
    arrays = np.load(out / "rollout.npz")
    demo = read_demos(files / "demos.hdf5")[1]
    assert result["steps"] == 4 and result["source"]["demo"] == 1
    assert all(len(result["scores"][k]) == 4 for k in ("psnr_per_step", "ssim_per_step", "copy_first_psnr_per_step",
                                                       "vqgan_recon_psnr_per_step", "vqgan_recon_ssim_per_step"))
    first = _resize(demo.frames[1], 32)
    assert np.array_equal(arrays["first"], first)
    assert np.array_equal(arrays["recorded"], np.stack([_resize(f, 32) for f in demo.frames[2:6]]))
    policy = WorldVLAPolicy.from_pretrained(files / "policy", device="cpu")
    want = generate_frames(policy.model, policy.vqgan, first, demo.actions[1:5], layout=policy.layout,
                           action_tokenizer=policy.action_tokenizer, text_tokenizer=policy.text_tokenizer)
    assert np.array_equal(arrays["codes"][0], want.codes.numpy())
    assert np.array_equal(arrays["imagined"][0], want.frames)
    for name in ("rollout.png", "rollout.gif", "scores.png"):
        assert (out / name).stat().st_size > 0


def test_drawn_futures_follow_the_seed(files, tmp_path):
    """Three futures drawn together: the same seed draws the same ones, another seed others, and the three
    are not all the same future."""
    codes = {}
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        assert _run(files / "policy", "--demos", files / "demos.hdf5", "--steps", 2, "--samples", 3,
                    "--temperature", 1.0, "--top-k", 20, "--seed", seed, "--out", tmp_path / name) == 0
        codes[name] = np.load(tmp_path / name / "rollout.npz")["codes"]
    assert codes["a"].shape == (3, 2, 2, 2)
    assert np.array_equal(codes["a"], codes["b"]) and not np.array_equal(codes["a"], codes["c"])
    assert not (np.array_equal(codes["a"][0], codes["a"][1]) and np.array_equal(codes["a"][0], codes["a"][2]))


@pytest.mark.parametrize("suffix", [".csv", ".txt", ".npy"])
def test_image_and_actions_files(files, tmp_path, suffix):
    from PIL import Image

    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "frame.png")
    acts = rng.uniform(-1, 1, (3, 4))
    path = tmp_path / f"actions{suffix}"
    if suffix == ".npy":
        np.save(path, acts)
    else:
        np.savetxt(path, acts, delimiter="," if suffix == ".csv" else " ")
    out = tmp_path / "out"
    assert _run(files / "policy", "--image", tmp_path / "frame.png", "--actions", path, "--out", out) == 0
    result = json.loads((out / "rollout.json").read_text())
    assert result["steps"] == 3 and "scores" not in result and not (out / "scores.png").exists()
    assert np.allclose(result["actions"], acts)


def test_bad_input_gets_one_line(files, tmp_path, capsys):
    policy, demos = files / "policy", files / "demos.hdf5"
    np.save(tmp_path / "wide.npy", np.zeros((2, 5)))
    cases = [
        ((policy,), "give one input"),
        ((policy, "--demos", demos, "--image", tmp_path / "x.png"), "give one input"),
        ((policy, "--image", tmp_path / "x.png"), "--image needs --actions"),
        ((policy, "--demos", demos, "--samples", 2), "set --temperature above 0"),
        ((policy, "--demos", demos, "--top-k", 5), "--top-k applies to draws"),
        ((policy, "--demos", demos, "--temperature", "inf"), "--temperature: must be a finite number"),
        ((policy, "--demos", demos, "--seed", 2 ** 64), r"--seed must be in \[0, 2\^63\)"),
        ((policy, "--demos", demos, "--demo", 2), r"holds 2 episode\(s\); --demo 2"),
        ((policy, "--demos", demos, "--start", 5), "leaves no recorded frame"),
        ((policy, "--demos", tmp_path / "none.hdf5"), "no demo file"),
        ((policy, "--image", tmp_path / "none.png", "--actions", tmp_path / "wide.npy"), "no image"),
    ]
    from PIL import Image

    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(tmp_path / "ok.png")
    cases.append(((policy, "--image", tmp_path / "ok.png", "--actions", tmp_path / "wide.npy"), r"must be \[T, 4\]"))
    np.save(tmp_path / "objects.npy", np.array([[1, "a"]], dtype=object), allow_pickle=True)
    (tmp_path / "text.npy").write_text("0.1 0.2 0.3 0.4\n")
    for bad in ("objects.npy", "text.npy"):  # numpy's own messages named no file, one spoke of pickles
        cases.append(((policy, "--image", tmp_path / "ok.png", "--actions", tmp_path / bad),
                      f"{bad}: not a numeric .npy array"))
    for argv, message in cases:
        try:
            rc = _run(*argv, "--out", tmp_path / "o")
        except SystemExit as e:  # refused by the parser itself
            rc = e.code
        assert rc == 2, argv
        err = capsys.readouterr().err
        assert "error:" in err and re.search(message, err), (argv, err)
    assert not (tmp_path / "o").exists()  # nothing written for bad input


def test_policy_imagine_resizes_its_frames(files):
    """`WorldVLAPolicy.imagine` takes frames of any size (resized as `act` resizes them), single or batched,
    and needs no reset."""
    policy = WorldVLAPolicy.from_pretrained(files / "policy", device="cpu")
    rng = np.random.default_rng(2)
    frames, acts = rng.integers(0, 256, (2, 48, 48, 3), dtype=np.uint8), rng.uniform(-1, 1, (2, 3, 4))
    kw = dict(layout=policy.layout, action_tokenizer=policy.action_tokenizer, text_tokenizer=policy.text_tokenizer)
    want = generate_frames(policy.model, policy.vqgan, np.stack([_resize(f, 32) for f in frames]), acts, **kw)
    got = policy.imagine(frames, acts)
    assert got.frames.shape == (2, 3, 32, 32, 3) and np.array_equal(got.codes, want.codes)
    one = policy.imagine(frames[1], acts[1])
    assert np.array_equal(one.codes, want.codes[1]) and np.array_equal(one.frames, want.frames[1])
    with pytest.raises(TypeError, match="uint8"):
        policy.imagine(frames.astype(np.float32), acts)


def test_an_image_run_removes_a_demo_runs_score_plot(files, tmp_path):
    """The same --out first from a demonstration (scores.png written), then from an image (no scores): the
    old plot does not stay behind beside the new rollout."""
    from PIL import Image

    out = tmp_path / "out"
    assert _run(files / "policy", "--demos", files / "demos.hdf5", "--steps", 2, "--out", out) == 0
    assert (out / "scores.png").exists()
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(tmp_path / "f.png")
    np.save(tmp_path / "a.npy", np.zeros((2, 4)))
    assert _run(files / "policy", "--image", tmp_path / "f.png", "--actions", tmp_path / "a.npy", "--out", out) == 0
    assert not (out / "scores.png").exists() and "scores" not in json.loads((out / "rollout.json").read_text())


def test_cfg_scale_must_be_finite(files, tmp_path, capsys):
    """`--cfg-scale nan` used to write all-zero codes and exit 0."""
    for value in ("nan", "inf", "-inf"):
        with pytest.raises(SystemExit) as e:
            _run(files / "policy", "--demos", files / "demos.hdf5", f"--cfg-scale={value}", "--out", tmp_path / "o")
        assert e.value.code == 2 and "argument --cfg-scale: must be a finite number" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_a_transparent_image_is_composited_onto_white(tmp_path):
    """An RGBA --image lost its alpha channel (the colours under transparent pixels kept); the release's
    tokenizer composites transparency onto white, as VQGAN.encode_images does."""
    from PIL import Image

    from worldvla.eval.imagine import load_image

    rgba = np.zeros((16, 16, 4), dtype=np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 128
    Image.fromarray(rgba, "RGBA").save(tmp_path / "half.png")
    got = load_image(tmp_path / "half.png")
    a = 128 / 255
    want = np.round(np.array([(1 - a) * 255 + a * 200, (1 - a) * 255, (1 - a) * 255]) - 0.5).astype(np.uint8)
    assert got.shape == (16, 16, 3) and np.all(np.abs(got.astype(int) - want) <= 1)


def test_policy_imagine_refuses_what_the_cli_refuses(files):
    """The API decoded greedily at temperature=-1 and ignored top_k with greedy codes, where `worldvla imagine`
    refuses both."""
    policy = WorldVLAPolicy.from_pretrained(files / "policy", device="cpu")
    frame, actions = np.zeros((32, 32, 3), np.uint8), np.zeros((1, 4))
    for t in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="temperature must be a finite number >= 0"):
            policy.imagine(frame, actions, temperature=t)
    with pytest.raises(ValueError, match="top_k applies to draws; set temperature above 0"):
        policy.imagine(frame, actions, top_k=5)
    for k in (0, 2.5, True):
        with pytest.raises(ValueError, match="top_k must be an integer >= 1"):
            policy.imagine(frame, actions, temperature=1.0, top_k=k)
    assert policy.imagine(frame, actions, temperature=1.0, top_k=5).frames.shape == (1, 32, 32, 3)


def test_demo_frames_are_turned_as_pretokenize_turns_them(tmp_path, capsys):
    """imagine turned a LIBERO-looking file's frames by 180 degrees with no word and no way to keep them as
    stored; it says so now, and --rotate-180 no reads them as stored."""
    import h5py

    from worldvla.eval.imagine import demo_segment

    frames = np.zeros((3, 8, 8, 3), np.uint8)
    frames[:, :4] = 255  # white top half
    with h5py.File(tmp_path / "regen.hdf5", "w") as f:  # LIBERO's camera key, no `upright` attribute
        f.create_dataset("data/demo_0/obs/agentview_rgb", data=frames)
        f.create_dataset("data/demo_0/actions", data=np.zeros((3, 7), np.float32))
    first, actions, real, _ = demo_segment(tmp_path / "regen.hdf5", 0, 0, 2)
    assert first[:4].max() == 0 and first[4:].min() == 255 and actions.shape == (2, 7)
    assert "rotated by 180 degrees" in capsys.readouterr().out
    first, _, _, _ = demo_segment(tmp_path / "regen.hdf5", 0, 0, 2, rotate_180=False)
    assert first[:4].min() == 255 and capsys.readouterr().out == ""


def test_one_step_scores_without_a_non_writable_array_warning(files, tmp_path, recwarn):
    """`imagine --steps 1` printed PyTorch's "The given NumPy array is not writable" warning: the first frame
    kept, broadcast to one step, is a read-only view that np.ascontiguousarray passed through uncopied."""
    from worldvla.eval import metrics

    frame = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    view = np.broadcast_to(frame, (1, 8, 8, 3))
    assert not view.flags.writeable
    x, _ = metrics.as_float_images(view)
    assert torch.equal(x[0], torch.from_numpy(frame).double().permute(2, 0, 1))
    assert _run(files / "policy", "--demos", files / "demos.hdf5", "--steps", 1, "--out", tmp_path / "o") == 0
    assert not [w for w in recwarn if issubclass(w.category, UserWarning)], [str(w.message) for w in recwarn]


def test_demo_options_with_an_image_are_refused(files, tmp_path, capsys):
    """With --image, --demo, --start, --camera and --rotate-180 (which pick and turn a recorded episode's frame)
    were silently ignored; they are refused as --actions with --demos is, when given."""
    from PIL import Image

    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(tmp_path / "f.png")
    np.save(tmp_path / "a.npy", np.zeros((2, 4)))
    image = ("--image", tmp_path / "f.png", "--actions", tmp_path / "a.npy")
    for extra, named in ((("--start", 2), "--start goes with --demos"),
                         (("--demo", 1, "--camera", "wrist"), "--demo, --camera go with --demos"),
                         (("--rotate-180", "yes"), "--rotate-180 goes with --demos")):
        assert _run(files / "policy", *image, *extra, "--out", tmp_path / "o") == 2
        err = capsys.readouterr().err
        assert named in err and "with --image they have no effect: drop" in err, err
    assert not (tmp_path / "o").exists()
    assert _run(files / "policy", *image, "--out", tmp_path / "o") == 0  # the defaults themselves are fine


def _outputs(folder):
    """Every entry of `folder` (hidden ones too) and the bytes of its files."""
    return {p.name: p.read_bytes() if p.is_file() else None for p in folder.iterdir()}


def _image_run_over_a_demo_run(files, tmp_path, monkeypatch, fail):
    """--out first written by a demonstration's run (scores.png too, and a file of the user's beside), then an
    image run into it with `fail` patched in; (the folder's entries before, its entries after)."""
    from PIL import Image

    monkeypatch.setenv("WORLDVLA_TRACEBACK", "1")  # the interruption reaches the test, not cli's "interrupted"
    out = tmp_path / "out"
    assert _run(files / "policy", "--demos", files / "demos.hdf5", "--steps", 2, "--out", out) == 0
    (out / "notes.txt").write_text("mine")
    before = _outputs(out)
    assert {"rollout.png", "rollout.gif", "scores.png", "rollout.npz", "rollout.json"} < set(before)
    Image.fromarray(np.full((32, 32, 3), 90, dtype=np.uint8)).save(tmp_path / "f.png")
    np.save(tmp_path / "a.npy", np.full((3, 4), 0.5))
    fail(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        _run(files / "policy", "--image", tmp_path / "f.png", "--actions", tmp_path / "a.npy", "--out", out)
    return before, _outputs(out)


def test_an_interrupted_run_leaves_the_earlier_outputs_as_they_were(files, tmp_path, monkeypatch):
    """imagine wrote its files one after another into --out: a Ctrl-C before the last (rollout.json) left the new
    rollout.png, .gif and .npz beside the earlier run's rollout.json and scores.png. They are written aside and
    moved in at the end now: stopped while writing, the folder is as it was, with nothing left aside."""
    from worldvla import checkpoint

    real = checkpoint.write_text_atomic

    def fail(monkeypatch):
        def interrupted(path, text):
            if Path(path).name == "rollout.json":
                raise KeyboardInterrupt
            return real(path, text)
        monkeypatch.setattr(checkpoint, "write_text_atomic", interrupted)

    before, after = _image_run_over_a_demo_run(files, tmp_path, monkeypatch, fail)
    assert after == before  # every file of the earlier set, byte for byte, and nothing else


def test_a_run_stopped_while_its_outputs_move_in_mixes_no_earlier_one(files, tmp_path, monkeypatch):
    """Stopped between the renames that move the outputs in: the earlier run's are all gone already (rollout.json
    first), so the folder holds some of the new run's files and no rollout.json, never files of both runs."""
    import os

    real, moved = os.replace, []

    def fail(monkeypatch):
        def second_interrupted(src, dst):
            if Path(dst).parent == tmp_path / "out":  # a move into --out (not a write in the staging folder)
                if moved:
                    raise KeyboardInterrupt
                moved.append(Path(dst).name)
            real(src, dst)
        monkeypatch.setattr(os, "replace", second_interrupted)

    before, after = _image_run_over_a_demo_run(files, tmp_path, monkeypatch, fail)
    assert moved == ["rollout.png"]
    assert set(after) == {"notes.txt", "rollout.png"} and after["rollout.png"] != before["rollout.png"]


def test_a_finished_run_replaces_the_whole_set(files, tmp_path):
    """The same --out from a demonstration, then from an image: the image run's set, the earlier scores.png gone,
    the user's file kept, no staging folder left."""
    from PIL import Image

    out = tmp_path / "out"
    assert _run(files / "policy", "--demos", files / "demos.hdf5", "--steps", 2, "--out", out) == 0
    (out / "notes.txt").write_text("mine")
    Image.fromarray(np.full((32, 32, 3), 90, dtype=np.uint8)).save(tmp_path / "f.png")
    np.save(tmp_path / "a.npy", np.full((3, 4), 0.5))
    assert _run(files / "policy", "--image", tmp_path / "f.png", "--actions", tmp_path / "a.npy", "--out", out) == 0
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "rollout.gif", "rollout.json", "rollout.npz",
                                                     "rollout.png"]
    assert json.loads((out / "rollout.json").read_text())["steps"] == 3
    assert np.load(out / "rollout.npz")["codes"].shape[1] == 3


def test_load_actions_takes_one_action_and_refuses_empty_or_non_finite_ones(tmp_path):
    from worldvla.eval.imagine import load_actions

    np.save(tmp_path / "one.npy", np.array([0.1, 0.2, 0.3, 0.4]))  # np.save of a single action [D]
    np.testing.assert_array_equal(load_actions(tmp_path / "one.npy", 4), [[0.1, 0.2, 0.3, 0.4]])
    np.save(tmp_path / "none.npy", np.zeros((0, 4)))
    with pytest.raises(ValueError, match=r"none.npy: actions must be \[T, 4\] .*got shape \(0, 4\)"):
        load_actions(tmp_path / "none.npy", 4)
    for value in ("nan", "inf"):
        (tmp_path / f"{value}.csv").write_text(f"0.1,0.2,0.3,0.4\n0.1,{value},0.3,0.4\n")
        with pytest.raises(ValueError, match=f"{value}.csv: actions hold NaN or infinite values"):
            load_actions(tmp_path / f"{value}.csv", 4)


def test_an_image_run_imagines_steps_frames_of_longer_actions(files, tmp_path):
    from PIL import Image

    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(tmp_path / "f.png")
    acts = np.random.default_rng(4).uniform(-1, 1, (5, 4))
    np.save(tmp_path / "a.npy", acts)
    out = tmp_path / "out"
    assert _run(files / "policy", "--image", tmp_path / "f.png", "--actions", tmp_path / "a.npy", "--steps", 2,
                "--out", out) == 0
    result = json.loads((out / "rollout.json").read_text())
    assert result["steps"] == 2 and np.allclose(result["actions"], acts[:2])
    assert np.load(out / "rollout.npz")["imagined"].shape[:2] == (1, 2)


def test_drawn_futures_are_scored_each_and_on_average(files, tmp_path, monkeypatch):
    """Two futures against a demonstration: each one's PSNR per step, their mean, the first frame kept and the
    reconstruction scored against the recorded frames, and a row of rollout.png per future."""
    from worldvla.eval import metrics, plots

    grids = []
    real_grid = plots.frame_grid
    monkeypatch.setattr(plots, "frame_grid", lambda rows, path, labels: grids.append(labels) or
                        real_grid(rows, path, labels=labels))
    out = tmp_path / "out"
    assert _run(files / "policy", "--demos", files / "demos.hdf5", "--steps", 3, "--samples", 2,
                "--temperature", 1.0, "--seed", 1, "--out", out) == 0
    sc = json.loads((out / "rollout.json").read_text())["scores"]
    arrays = np.load(out / "rollout.npz")
    real, first, imagined = arrays["recorded"], arrays["first"], arrays["imagined"]
    each = [np.minimum(metrics.psnr(imagined[m], real).numpy(), 100.0) for m in range(2)]
    assert not np.allclose(each[0], each[1])  # two different futures
    np.testing.assert_allclose(sc["psnr_per_sample"], each)
    np.testing.assert_allclose(sc["psnr_per_step"], (each[0] + each[1]) / 2)
    np.testing.assert_allclose(sc["copy_first_psnr_per_step"],
                               metrics.psnr(np.broadcast_to(first, real.shape), real).numpy())
    assert len(sc["ssim_per_step"]) == 3 and grids == [["recorded", "sample 1", "sample 2"]]


def test_a_still_demonstration_scores_the_kept_first_frame_at_the_cap(files, tmp_path):
    """Every recorded frame is the first one: keeping it is exact (an infinite PSNR), which the scores hold as
    the cap, so that rollout.json stays JSON (no Infinity)."""
    from worldvla.data.hdf5 import write_demos

    frame = np.random.default_rng(5).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    write_demos(tmp_path / "still.hdf5", [{"frames": np.stack([frame] * 4), "actions": np.zeros((4, 4))}], "stay")
    out = tmp_path / "out"
    assert _run(files / "policy", "--demos", tmp_path / "still.hdf5", "--steps", 3, "--out", out) == 0

    def no_constants(name):
        raise AssertionError(f"rollout.json holds {name}")

    sc = json.loads((out / "rollout.json").read_text(), parse_constant=no_constants)["scores"]
    assert sc["copy_first_psnr_per_step"] == [100.0] * 3 and sc["psnr_cap_db"] == 100.0


def test_imagine_times_a_frame_over_the_actions_and_draws_every_sample_from_the_seed(monkeypatch):
    from worldvla.eval import imagine as imagine_mod

    class Policy:
        model = torch.nn.Linear(1, 1)

        def imagine(self, frames, actions, generator, **kw):
            self.args = frames, actions, generator.initial_seed(), kw
            return "rollout"

    clock = iter([10.0, 16.0])
    monkeypatch.setattr(imagine_mod.time, "perf_counter", lambda: next(clock))
    policy = Policy()
    first, actions = np.zeros((8, 8, 3), np.uint8), np.ones((3, 4))
    out, per_frame = imagine_mod.imagine(policy, first, actions, samples=2, temperature=0.5, seed=7)
    assert out == "rollout" and per_frame == 2.0  # 6 s for 3 frames
    frames, acts, seed, kw = policy.args
    assert frames.shape == (2, 8, 8, 3) and acts.shape == (2, 3, 4) and seed == 7 and kw["temperature"] == 0.5


def test_a_run_removes_the_staging_folders_of_killed_runs(files, tmp_path):
    """A run killed while it wrote (SIGKILL, out of memory) left its staging folder in --out: the next run
    removes it."""
    import subprocess
    import sys

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # its process id no longer runs
    out = tmp_path / "out"
    stale = out / f".rollout.tmp-{gone.pid}-abcdef"
    stale.mkdir(parents=True)
    (stale / "rollout.png").write_bytes(b"half written")
    assert _run(files / "policy", "--demos", files / "demos.hdf5", "--steps", 1, "--out", out) == 0
    assert sorted(p.name for p in out.iterdir()) == ["rollout.gif", "rollout.json", "rollout.npz", "rollout.png",
                                                     "scores.png"]


def test_demo_segment_names_an_episode_of_one_frame(tmp_path):
    import h5py

    from worldvla.eval.imagine import demo_segment

    with h5py.File(tmp_path / "one.hdf5", "w") as f:
        f.create_dataset("data/demo_0/obs/agentview_rgb", data=np.zeros((1, 8, 8, 3), np.uint8))
        f.create_dataset("data/demo_0/actions", data=np.zeros((1, 7), np.float32))
    with pytest.raises(ValueError, match=r"episode 0 of .*one.hdf5 has 1 frame\(s\): nothing recorded to imagine"):
        demo_segment(tmp_path / "one.hdf5", 0, 0, 2, rotate_180=False)


def test_actions_with_demos_are_refused(files, tmp_path, capsys):
    np.save(tmp_path / "a.npy", np.zeros((2, 4)))
    assert _run(files / "policy", "--demos", files / "demos.hdf5", "--actions", tmp_path / "a.npy",
                "--out", tmp_path / "o") == 2
    assert "--actions goes with --image; with --demos the episode's recorded actions are used" in \
        capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_a_demo_run_shows_each_row_from_the_first_frame_and_scores_the_vqgans_reconstruction(files, tmp_path,
                                                                                             monkeypatch):
    """rollout.png's rows and rollout.gif start at the frame the rollout starts from: the recorded row is that
    frame then the recorded ones, the imagined row that frame then the imagined ones, side by side in the GIF. The
    reconstruction's scores are those of the VQGAN's decoding of the recorded frames' codes (below the cap: not the
    recorded frames themselves)."""
    from worldvla.eval import metrics, plots

    shown = {}
    real_grid, real_gif = plots.frame_grid, plots.save_gif
    monkeypatch.setattr(plots, "frame_grid", lambda rows, path, labels: shown.update(rows=rows) or
                        real_grid(rows, path, labels=labels))
    monkeypatch.setattr(plots, "save_gif", lambda frames, path, fps: shown.update(gif=frames) or
                        real_gif(frames, path, fps=fps))
    out = tmp_path / "out"
    assert _run(files / "policy", "--demos", files / "demos.hdf5", "--steps", 3, "--out", out) == 0
    arrays = np.load(out / "rollout.npz")
    first, real, imagined = arrays["first"], arrays["recorded"], arrays["imagined"]
    recorded_row, imagined_row = shown["rows"]
    assert recorded_row.shape[0] == imagined_row.shape[0] == 4
    np.testing.assert_array_equal(recorded_row, np.concatenate([first[None], real]))
    np.testing.assert_array_equal(imagined_row, np.concatenate([first[None], imagined[0]]))
    np.testing.assert_array_equal(shown["gif"], plots.side_by_side(recorded_row, imagined_row))

    policy = WorldVLAPolicy.from_pretrained(files / "policy", device="cpu")
    recon = policy.vqgan.decode_images(policy.vqgan.encode_images(real))
    want = np.minimum(metrics.psnr(recon, real).numpy(), 100.0)
    sc = json.loads((out / "rollout.json").read_text())["scores"]
    assert (want < 100.0).all()
    np.testing.assert_allclose(sc["vqgan_recon_psnr_per_step"], want)


def test_load_actions_of_a_one_value_policy_reads_a_line_an_action(tmp_path):
    """Actions of one value as text, one a line: each line is one action [T, 1], not one action of T values."""
    from worldvla.eval.imagine import load_actions

    (tmp_path / "a.csv").write_text("0.1\n0.2\n0.3\n")
    (tmp_path / "a.txt").write_text("0.1\n0.2\n0.3\n")
    for name in ("a.csv", "a.txt"):
        np.testing.assert_array_equal(load_actions(tmp_path / name, 1), [[0.1], [0.2], [0.3]])


def test_demo_segment_names_a_file_without_episodes(tmp_path):
    from worldvla.eval.imagine import demo_segment

    write_demos(tmp_path / "empty.hdf5", [], "push")
    with pytest.raises(ValueError, match=r"empty.hdf5 holds no episodes$"):
        demo_segment(tmp_path / "empty.hdf5", 0, 0, 2)


def test_ssim_scores_each_future_their_mean_the_first_frame_and_the_reconstruction(files, tmp_path):
    """The SSIM lists of rollout.json: each drawn future's against the recorded frames, their mean per step, the
    first frame kept and the VQGAN's reconstruction, each its own."""
    from worldvla.eval import metrics

    out = tmp_path / "out"
    assert _run(files / "policy", "--demos", files / "demos.hdf5", "--steps", 3, "--samples", 2,
                "--temperature", 1.0, "--seed", 2, "--out", out) == 0
    sc = json.loads((out / "rollout.json").read_text())["scores"]
    arrays = np.load(out / "rollout.npz")
    real, first, imagined = arrays["recorded"], arrays["first"], arrays["imagined"]
    each = [metrics.ssim(imagined[m], real).numpy() for m in range(2)]
    assert not np.allclose(each[0], each[1])  # two different futures
    np.testing.assert_allclose(sc["ssim_per_sample"], each)
    np.testing.assert_allclose(sc["ssim_per_step"], (each[0] + each[1]) / 2)
    np.testing.assert_allclose(sc["copy_first_ssim_per_step"],
                               metrics.ssim(np.broadcast_to(first, real.shape), real).numpy())
    policy = WorldVLAPolicy.from_pretrained(files / "policy", device="cpu")
    recon = policy.vqgan.decode_images(policy.vqgan.encode_images(real))
    want = metrics.ssim(recon, real).numpy()
    assert not np.allclose(want, sc["copy_first_ssim_per_step"])  # the two baselines differ here
    np.testing.assert_allclose(sc["vqgan_recon_ssim_per_step"], want)


def test_the_largest_seed_is_taken_and_the_next_refused(files, tmp_path, capsys):
    out = tmp_path / "out"
    assert _run(files / "policy", "--demos", files / "demos.hdf5", "--steps", 1, "--seed", 2 ** 63,
                "--out", out) == 2
    assert r"--seed must be in [0, 2^63), got 9223372036854775808" in capsys.readouterr().err
    assert not out.exists()
    assert _run(files / "policy", "--demos", files / "demos.hdf5", "--steps", 1, "--seed", 2 ** 63 - 1,
                "--out", out) == 0
    assert json.loads((out / "rollout.json").read_text())["seed"] == 2 ** 63 - 1


def test_a_demo_run_reads_the_camera_and_turn_asked_for(files, tmp_path):
    """A LIBERO-looking file (its camera keys, no `upright` mark) with two cameras: by default agentview's frames
    turned by 180 degrees as pretokenize turns them, --rotate-180 no as stored, --camera the other camera's;
    rollout.json records the choice."""
    import h5py

    top_white = np.zeros((4, 32, 32, 3), np.uint8)
    top_white[:, :16] = 255
    with h5py.File(tmp_path / "two.hdf5", "w") as f:
        f.create_dataset("data/demo_0/obs/agentview_rgb", data=top_white)
        f.create_dataset("data/demo_0/obs/eye_in_hand_rgb", data=np.full((4, 32, 32, 3), 128, np.uint8))
        f.create_dataset("data/demo_0/actions", data=np.zeros((4, 4), np.float32))
    firsts, sources = {}, {}
    for name, extra in (("auto", ()), ("stored", ("--rotate-180", "no")), ("wrist", ("--camera", "eye_in_hand"))):
        out = tmp_path / name
        assert _run(files / "policy", "--demos", tmp_path / "two.hdf5", "--steps", 1, *extra, "--out", out) == 0
        firsts[name] = np.load(out / "rollout.npz")["first"]
        sources[name] = json.loads((out / "rollout.json").read_text())["source"]
    assert firsts["auto"][:16].max() == 0 and firsts["auto"][16:].min() == 255
    assert firsts["stored"][:16].min() == 255 and firsts["stored"][16:].max() == 0
    assert (firsts["wrist"] == 128).all()
    assert sources["stored"] == {"demos": str(tmp_path / "two.hdf5"), "demo": 0, "start": 0, "camera": None,
                                 "rotate_180": "no"}
    assert sources["wrist"]["camera"] == "eye_in_hand" and sources["auto"]["rotate_180"] == "auto"


def test_a_demo_run_records_where_it_starts_and_its_draws(files, tmp_path):
    out = tmp_path / "out"
    assert _run(files / "policy", "--demos", files / "demos.hdf5", "--demo", 1, "--start", 2, "--steps", 2,
                "--samples", 2, "--temperature", 0.5, "--top-k", 7, "--seed", 9, "--out", out) == 0
    result = json.loads((out / "rollout.json").read_text())
    assert result["source"]["demo"] == 1 and result["source"]["start"] == 2
    assert (result["samples"], result["temperature"], result["top_k"], result["seed"]) == (2, 0.5, 7, 9)
    demo = read_demos(files / "demos.hdf5")[1]
    np.testing.assert_array_equal(result["actions"], demo.actions[2:4])


def test_a_demo_whose_actions_are_not_the_policys_is_refused_by_name(files, tmp_path, capsys):
    write_demos(tmp_path / "wide.hdf5", [{"frames": np.zeros((3, 32, 32, 3), np.uint8),
                                          "actions": np.zeros((3, 7), np.float32)}], "push")
    assert _run(files / "policy", "--demos", tmp_path / "wide.hdf5", "--out", tmp_path / "o") == 2
    assert "the episode's actions have 7 values, the policy's 4" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_an_image_runs_gif_starts_at_the_image(files, tmp_path, monkeypatch):
    """Without a demonstration rollout.gif plays the frame the rollout starts from, then the imagined ones."""
    from PIL import Image

    from worldvla.eval import plots

    shown = {}
    real_gif = plots.save_gif
    monkeypatch.setattr(plots, "save_gif", lambda frames, path, fps: shown.update(gif=frames) or
                        real_gif(frames, path, fps=fps))
    Image.fromarray(np.full((32, 32, 3), 90, dtype=np.uint8)).save(tmp_path / "f.png")
    np.save(tmp_path / "a.npy", np.full((2, 4), 0.5))
    out = tmp_path / "out"
    assert _run(files / "policy", "--image", tmp_path / "f.png", "--actions", tmp_path / "a.npy", "--out", out) == 0
    arrays = np.load(out / "rollout.npz")
    assert (arrays["first"] == 90).all()
    np.testing.assert_array_equal(shown["gif"], np.concatenate([arrays["first"][None], arrays["imagined"][0]]))


def test_a_run_stopped_while_the_earlier_outputs_go_leaves_no_rollout_json_beside_part_of_them(files, tmp_path,
                                                                                              monkeypatch):
    """Stopped between the removals of the earlier run's outputs: its rollout.json (which says the files beside it
    are one run's complete set) went first, so it never stays beside part of that set."""
    real, removed = Path.unlink, []

    def fail(monkeypatch):
        def second_interrupted(self, missing_ok=False):
            if self.parent == tmp_path / "out":
                if removed:
                    raise KeyboardInterrupt
                removed.append(self.name)
            return real(self, missing_ok=missing_ok)
        monkeypatch.setattr(Path, "unlink", second_interrupted)

    before, after = _image_run_over_a_demo_run(files, tmp_path, monkeypatch, fail)
    assert removed == ["rollout.json"]
    assert set(after) == set(before) - {"rollout.json"}
    assert all(after[name] == before[name] for name in after)


def test_the_outputs_reach_the_disk_before_their_names_move_in_and_the_names_after(files, tmp_path, monkeypatch):
    """Against a power loss: every staged file is flushed before the first rename into --out (else a new name could
    point at empty data), and --out itself after the last (else the renames could be lost)."""
    import os

    from worldvla import checkpoint

    events = []
    out = tmp_path / "out"
    real_tree, real_path, real_replace = checkpoint.fsync_tree, checkpoint.fsync_path, os.replace

    def tree(root):
        events.append(("fsync_tree", Path(root).parent))
        return real_tree(root)

    def path(p):
        events.append(("fsync_path", Path(p)))
        return real_path(p)

    def replace(src, dst):
        if Path(dst).parent == out:
            events.append(("move in", Path(dst).name))
        return real_replace(src, dst)

    monkeypatch.setattr(checkpoint, "fsync_tree", tree)
    monkeypatch.setattr(checkpoint, "fsync_path", path)
    monkeypatch.setattr(os, "replace", replace)
    assert _run(files / "policy", "--demos", files / "demos.hdf5", "--steps", 1, "--out", out) == 0
    moves = [i for i, e in enumerate(events) if e[0] == "move in"]
    assert [events[i][1] for i in moves] == ["rollout.png", "rollout.gif", "scores.png", "rollout.npz", "rollout.json"]
    assert ("fsync_tree", out) in events[:moves[0]]
    assert ("fsync_path", out) in events[moves[-1]:]


def test_load_actions_reads_an_upper_case_suffix_as_its_format(tmp_path):
    """ACTIONS.CSV was read as whitespace-separated text and ACTIONS.NPY as text: both refused as not numbers."""
    from worldvla.eval.imagine import load_actions

    acts = np.array([[0.1, 0.2, 0.3, 0.4], [0.5, 0.6, 0.7, 0.8]])
    np.savetxt(tmp_path / "ACTIONS.CSV", acts, delimiter=",")
    with open(tmp_path / "ACTIONS.NPY", "wb") as f:
        np.save(f, acts)
    for name in ("ACTIONS.CSV", "ACTIONS.NPY"):
        np.testing.assert_array_equal(load_actions(tmp_path / name, 4), acts)


def test_demo_segment_reads_only_its_episode(tmp_path, monkeypatch):
    """--demo N read every episode's frames up to N (a late episode of a large file took minutes); it reads that
    episode's alone now, and still names an index past the last episode."""
    import worldvla.data.hdf5 as hdf5
    from worldvla.eval.imagine import demo_segment

    rng = np.random.default_rng(0)
    demos = [{"frames": rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8), "actions": rng.uniform(-1, 1, (4, 7))}
             for _ in range(5)]
    write_demos(tmp_path / "five.hdf5", demos, "push")
    read = []
    real_read = hdf5._read_one
    monkeypatch.setattr(hdf5, "_read_one", lambda g, *a, **k: read.append(g.name) or real_read(g, *a, **k))
    first, actions, real, instruction = demo_segment(tmp_path / "five.hdf5", 3, 1, 2, rotate_180=False)
    assert read == ["/data/demo_3"]
    np.testing.assert_array_equal(first, demos[3]["frames"][1])
    np.testing.assert_array_equal(real, demos[3]["frames"][2:4])
    np.testing.assert_allclose(actions, demos[3]["actions"][1:3])
    assert instruction == "push"
    with pytest.raises(ValueError, match=r"holds 5 episode\(s\); --demo 5 is not one of them \(0..4\)"):
        demo_segment(tmp_path / "five.hdf5", 5, 0, 2, rotate_180=False)


def test_a_16_bit_image_is_refused_naming_the_file(files, tmp_path, capsys):
    """A 16-bit grayscale PNG (and a float TIFF) came out of the RGB conversion nearly all white (black): the run
    imagined from a blank frame. It is refused naming the file, before the policy is loaded."""
    from PIL import Image

    from worldvla.eval.imagine import load_image

    levels = np.linspace(0, 65535, 24 * 24).reshape(24, 24)
    Image.fromarray(levels.astype(np.uint16)).save(tmp_path / "deep.png")
    Image.fromarray((levels / 65535).astype(np.float32)).save(tmp_path / "float.tiff")
    for name in ("deep.png", "float.tiff"):
        with pytest.raises(ValueError, match=f"{name}: an image of mode .* 8-bit RGB"):
            load_image(tmp_path / name)
    np.save(tmp_path / "a.npy", np.zeros((2, 4)))
    out = tmp_path / "out"
    assert _run(files / "policy", "--image", tmp_path / "deep.png", "--actions", tmp_path / "a.npy", "--out", out) == 2
    assert "deep.png: an image of mode I;16" in capsys.readouterr().err and not out.exists()
    # an 8-bit grayscale image is still taken, as gray RGB
    Image.fromarray((levels / 257).astype(np.uint8)).save(tmp_path / "gray.png")
    got = load_image(tmp_path / "gray.png")
    assert got.shape == (24, 24, 3) and np.array_equal(got[..., 0], (levels / 257).astype(np.uint8))


def test_load_actions_refuses_an_archive_or_complex_actions_by_name(tmp_path):
    """np.load opens an .npz archive whatever the file is named, and converts complex actions to float dropping their
    imaginary parts: both are refused naming the file, not a bare conversion error or a silent change."""
    from worldvla.eval.imagine import load_actions

    np.savez(tmp_path / "several.npz", actions=np.zeros((2, 4)))
    (tmp_path / "several.npz").rename(tmp_path / "several.npy")
    with pytest.raises(ValueError, match=r"several.npy: an .npz archive of several arrays, not one .npy array"):
        load_actions(tmp_path / "several.npy", 4)
    np.save(tmp_path / "complex.npy", np.full((2, 4), 0.5 + 0.5j))
    with pytest.raises(ValueError, match=r"complex.npy: not a numeric .npy array \(dtype complex128\)"):
        load_actions(tmp_path / "complex.npy", 4)
    np.save(tmp_path / "ints.npy", np.ones((2, 4), dtype=np.int32))  # whole numbers are numbers
    np.testing.assert_array_equal(load_actions(tmp_path / "ints.npy", 4), np.ones((2, 4)))


def test_load_actions_reads_a_csv_with_a_byte_order_mark(tmp_path):
    """Spreadsheets save "CSV UTF-8" with a byte-order mark before the first number, which made the file "not a table
    of numbers"; and a file of the other separator is refused saying which separator its suffix takes."""
    from worldvla.eval.imagine import load_actions

    (tmp_path / "sheet.csv").write_bytes("0.1,0.2,0.3,0.4\r\n0.5,0.6,0.7,0.8\r\n".encode("utf-8-sig"))
    np.testing.assert_array_equal(load_actions(tmp_path / "sheet.csv", 4), [[0.1, 0.2, 0.3, 0.4], [0.5, 0.6, 0.7, 0.8]])
    (tmp_path / "commas.txt").write_text("0.1,0.2,0.3,0.4\n")
    with pytest.raises(ValueError, match="commas.txt: not a table of numbers .*a .csv file's values are separated by "
                                         "commas, any other text file's by spaces or tabs"):
        load_actions(tmp_path / "commas.txt", 4)


def test_a_damaged_image_or_episode_is_refused_before_the_policy_loads(files, tmp_path, monkeypatch, capsys):
    """A PNG cut short (an interrupted copy) was refused with Pillow's bare "image file is truncated", naming
    neither the file nor the fix, and only after the policy had loaded (minutes for a large model): it is refused
    naming the file at once, as a missing episode is."""
    from PIL import Image

    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "f.png")
    data = (tmp_path / "f.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[:len(data) // 2])
    np.save(tmp_path / "a.npy", np.zeros((2, 4)))

    def no_policy(*a, **k):
        raise AssertionError("the policy was loaded before the input was checked")

    monkeypatch.setattr(WorldVLAPolicy, "from_pretrained", no_policy)
    assert _run(files / "policy", "--image", tmp_path / "cut.png", "--actions", tmp_path / "a.npy",
                "--out", tmp_path / "out") == 2
    assert "cut.png: the image cannot be read (image file is truncated" in capsys.readouterr().err
    assert _run(files / "policy", "--demos", files / "demos.hdf5", "--demo", 7, "--out", tmp_path / "out") == 2
    assert "--demo 7 is not one of them" in capsys.readouterr().err


def test_demo_segment_refuses_non_finite_actions_naming_the_episode(tmp_path):
    """A NaN among the segment's actions reached the action tokenizer, whose error named no file or episode; a NaN
    outside the segment does not matter to it."""
    from worldvla.data.hdf5 import DemoFormatError
    from worldvla.eval.imagine import demo_segment

    import h5py

    actions = np.random.default_rng(0).uniform(-1, 1, (6, 4)).astype(np.float32)
    actions[4, 2] = np.nan
    frames = np.random.default_rng(1).integers(0, 256, (6, 16, 16, 3), dtype=np.uint8)
    with h5py.File(tmp_path / "nan.hdf5", "w") as f:  # another tool's file: write_demos refuses NaN actions
        f.create_dataset("data/demo_0/obs/agentview_rgb", data=frames)
        f.create_dataset("data/demo_0/actions", data=actions)
    with pytest.raises(DemoFormatError, match=r"nan.hdf5: episode 0, steps 2..4: actions contain NaN or inf "
                                              r"\(first at step 2 of 3\)"):
        demo_segment(tmp_path / "nan.hdf5", 0, 2, 3, rotate_180=False)
    first, got, real, _ = demo_segment(tmp_path / "nan.hdf5", 0, 0, 3, rotate_180=False)  # steps 0..2: finite
    assert np.array_equal(got, actions[:3]) and np.array_equal(first, frames[0])


def test_a_run_draws_with_the_temperature_top_k_and_guidance_asked_for(files, tmp_path, monkeypatch):
    """`--samples 2 --temperature 2.5 --top-k 7 --cfg-scale 2 --seed 4` writes policy.imagine's futures under those
    settings from a generator seeded 4; without the top-k, the guidance or at another temperature they differ (so a
    setting the run dropped would show). rollout.gif plays the first future ("sample 1") beside the recorded frames."""
    from worldvla.eval import plots

    shown, real_gif = {}, plots.save_gif
    monkeypatch.setattr(plots, "save_gif", lambda frames, path, fps: shown.update(gif=frames) or
                        real_gif(frames, path, fps=fps))
    out = tmp_path / "out"
    assert _run(files / "policy", "--demos", files / "demos.hdf5", "--steps", 2, "--samples", 2, "--temperature", 2.5,
                "--top-k", 7, "--cfg-scale", 2, "--seed", 4, "--out", out) == 0
    arrays = np.load(out / "rollout.npz")
    start = arrays["first"][None]
    np.testing.assert_array_equal(shown["gif"], plots.side_by_side(np.concatenate([start, arrays["recorded"]]),
                                                                   np.concatenate([start, arrays["imagined"][0]])))
    policy = WorldVLAPolicy.from_pretrained(files / "policy", device="cpu")
    acts = read_demos(files / "demos.hdf5")[0].actions[:2]
    settings = dict(temperature=2.5, top_k=7, cfg_scale=2.0)

    def draw(**changed):
        return policy.imagine(np.repeat(arrays["first"][None], 2, axis=0), np.repeat(acts[None], 2, axis=0),
                              generator=torch.Generator().manual_seed(4), **{**settings, **changed}).codes.numpy()

    assert arrays["codes"].shape == (2, 2, 2, 2) and np.array_equal(arrays["codes"], draw())
    for changed in ({"top_k": None}, {"cfg_scale": None}, {"temperature": 1.0}):
        assert not np.array_equal(arrays["codes"], draw(**changed)), changed


def test_scores_hold_an_exact_frame_at_the_cap_in_every_list():
    """A future or a reconstruction equal to the recorded frames (an infinite PSNR) scores the cap, as the kept first
    frame does, so that the mean over futures stays finite and rollout.json stays JSON."""
    from worldvla.eval import metrics
    from worldvla.eval.imagine import _scores

    rng = np.random.default_rng(6)
    real = rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    other = rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    sc = _scores(np.stack([real, other]), real, other[0], real.copy())
    other_psnr = metrics.psnr(other, real).numpy()
    assert sc["psnr_per_sample"][0] == [100.0, 100.0] and sc["vqgan_recon_psnr_per_step"] == [100.0, 100.0]
    np.testing.assert_allclose(sc["psnr_per_sample"][1], other_psnr)
    np.testing.assert_allclose(sc["psnr_per_step"], (100.0 + other_psnr) / 2)
    json.dumps(sc, allow_nan=False)


def test_a_demo_run_prints_each_steps_scores_on_its_own_line(files, tmp_path, capsys):
    """The table printed after a demonstration's run numbers the steps from 1, each line with that step's PSNR / SSIM
    of the imagined frames, of the first frame kept and of the reconstruction, as rollout.json holds them."""
    out = tmp_path / "out"
    assert _run(files / "policy", "--demos", files / "demos.hdf5", "--steps", 3, "--out", out) == 0
    sc = json.loads((out / "rollout.json").read_text())["scores"]
    lines = capsys.readouterr().out.splitlines()
    table = lines[lines.index("step  imagined        first kept      reconstruction") + 1:]
    rows = [[float(x) for x in re.findall(r"-?[0-9.]+", line)] for line in table]
    assert [r[0] for r in rows] == [1, 2, 3]
    names = ("psnr_per_step", "ssim_per_step", "copy_first_psnr_per_step", "copy_first_ssim_per_step",
             "vqgan_recon_psnr_per_step", "vqgan_recon_ssim_per_step")
    np.testing.assert_allclose([r[1:] for r in rows], [[sc[n][k] for n in names] for k in range(3)], atol=0.006)


def test_a_start_past_the_last_step_is_refused_with_the_last_start_that_works(files):
    """An episode of 6 frames has a recorded frame after --start 4 at most: the refusal of --start 5 names 4, and
    --start 4 gives one step against the last frame."""
    from worldvla.eval.imagine import demo_segment

    demos = files / "demos.hdf5"
    with pytest.raises(ValueError, match=r"has 6 frames; --start 5 leaves no recorded frame after it \(use --start 4 "
                                         r"or less\)"):
        demo_segment(demos, 0, 5, 8, rotate_180=False)
    first, actions, real, _ = demo_segment(demos, 0, 4, 8, rotate_180=False)
    (episode,) = read_demos(demos, rotate_180=False)[:1]
    assert actions.shape == (1, 4) and len(real) == 1
    np.testing.assert_array_equal(first, episode.frames[4])
    np.testing.assert_array_equal(real[0], episode.frames[5])


def test_load_actions_names_the_shape_of_a_single_action_of_the_wrong_size(tmp_path):
    """A one-dimensional .npy of 5 values for a 4-value policy is refused as the (5,) array it is, not as a
    [1, 5] table it was never saved as."""
    from worldvla.eval.imagine import load_actions

    np.save(tmp_path / "five.npy", np.zeros(5))
    with pytest.raises(ValueError, match=r"five.npy: actions must be \[T, 4\] .*got shape \(5,\)$"):
        load_actions(tmp_path / "five.npy", 4)


def test_an_image_run_records_the_frame_size_and_plays_its_gif_at_four_frames_a_second(files, tmp_path):
    """rollout.json says the size the frames were imagined at (the policy's 32 px, not the image's 40), and
    rollout.gif shows each frame for a quarter of a second, slow enough to follow a step."""
    from PIL import Image

    Image.fromarray(np.full((40, 40, 3), 60, dtype=np.uint8)).save(tmp_path / "f.png")
    np.save(tmp_path / "a.npy", np.full((2, 4), 0.25))
    out = tmp_path / "out"
    assert _run(files / "policy", "--image", tmp_path / "f.png", "--actions", tmp_path / "a.npy", "--out", out) == 0
    assert json.loads((out / "rollout.json").read_text())["image_size"] == 32
    with Image.open(out / "rollout.gif") as gif:
        assert gif.size == (32, 32)
        durations = []
        for k in range(gif.n_frames):
            gif.seek(k)
            durations.append(gif.info["duration"])
    assert durations and set(durations) == {250}


def test_run_refuses_a_temperature_that_is_not_finite_given_in_code(files, tmp_path):
    """The command line refuses --temperature inf or nan itself; arguments built in code (a NaN passes every
    comparison with 0) are refused by `run` before anything is loaded or written."""
    import argparse

    from worldvla.eval import imagine

    args = imagine.add_arguments(argparse.ArgumentParser()).parse_args(
        [str(files / "policy"), "--demos", str(files / "demos.hdf5"), "--out", str(tmp_path / "o")])
    for bad in (float("nan"), float("inf")):
        args.temperature = bad
        with pytest.raises(ValueError, match=f"--temperature must be finite, got {bad}"):
            imagine.run(args)
    assert not (tmp_path / "o").exists()


def test_a_single_future_is_labelled_imagined_and_the_score_plot_draws_each_score_list(files, tmp_path, monkeypatch):
    """One future (no draws) is the row "imagined" under the recorded one, and scores.png draws the imagined frames',
    the kept first frame's and the reconstruction's PSNR and SSIM lists of rollout.json, each under its own name."""
    from worldvla.eval import plots

    grids, curves = [], []
    real_grid, real_curves = plots.frame_grid, plots.horizon_curves
    monkeypatch.setattr(plots, "frame_grid", lambda rows, path, labels: grids.append(labels) or
                        real_grid(rows, path, labels=labels))
    monkeypatch.setattr(plots, "horizon_curves", lambda c, path, title: curves.append((c, Path(path).name)) or
                        real_curves(c, path, title=title))
    out = tmp_path / "out"
    assert _run(files / "policy", "--demos", files / "demos.hdf5", "--steps", 3, "--out", out) == 0
    sc = json.loads((out / "rollout.json").read_text())["scores"]
    assert grids == [["recorded", "imagined"]]
    assert curves == [({"imagined": {"psnr": sc["psnr_per_step"], "ssim": sc["ssim_per_step"]},
                        "first frame kept": {"psnr": sc["copy_first_psnr_per_step"],
                                             "ssim": sc["copy_first_ssim_per_step"]},
                        "VQGAN reconstruction": {"psnr": sc["vqgan_recon_psnr_per_step"],
                                                 "ssim": sc["vqgan_recon_ssim_per_step"]}}, "scores.png")]
    assert sc["ssim_per_step"] != sc["copy_first_ssim_per_step"] != sc["vqgan_recon_ssim_per_step"]


def test_an_image_run_records_its_input_files_in_an_out_folder_it_creates_with_its_parents(files, tmp_path,
                                                                                           monkeypatch):
    """rollout.json of an image run names the image and the actions file it imagined from; an --out whose parent
    folders do not exist yet is made with them; the single future's row is labelled "imagined"."""
    from PIL import Image

    from worldvla.eval import plots

    grids, real_grid = [], plots.frame_grid
    monkeypatch.setattr(plots, "frame_grid", lambda rows, path, labels: grids.append(labels) or
                        real_grid(rows, path, labels=labels))
    Image.fromarray(np.full((32, 32, 3), 70, dtype=np.uint8)).save(tmp_path / "f.png")
    np.save(tmp_path / "a.npy", np.full((2, 4), 0.1))
    out = tmp_path / "runs" / "today" / "out"
    assert _run(files / "policy", "--image", tmp_path / "f.png", "--actions", tmp_path / "a.npy", "--out", out) == 0
    result = json.loads((out / "rollout.json").read_text())
    assert result["source"] == {"image": str(tmp_path / "f.png"), "actions": str(tmp_path / "a.npy")}
    assert grids == [["imagined"]]


def test_the_policy_loads_on_the_device_and_dtype_asked_and_the_run_records_where_it_ran(files, tmp_path,
                                                                                         monkeypatch):
    """--device and --dtype reach the policy's loading; rollout.json records the device the model ran on (the one
    chosen for it without --device, not "None")."""
    loaded, real = [], WorldVLAPolicy.from_pretrained

    def load(*a, **k):
        policy = real(*a, **k)
        loaded.append((k, policy))
        return policy

    monkeypatch.setattr(WorldVLAPolicy, "from_pretrained", load)
    out = tmp_path / "out"
    assert _run(files / "policy", "--demos", files / "demos.hdf5", "--steps", 1, "--device", "cpu", "--dtype",
                "bfloat16", "--out", out) == 0
    k, policy = loaded[-1]
    assert k == {"device": "cpu", "dtype": "bfloat16"} and next(policy.model.parameters()).dtype == torch.bfloat16
    assert json.loads((out / "rollout.json").read_text())["device"] == "cpu"
    assert _run(files / "policy", "--demos", files / "demos.hdf5", "--steps", 1, "--out", out) == 0
    k, policy = loaded[-1]
    assert k == {"device": None, "dtype": None}
    assert json.loads((out / "rollout.json").read_text())["device"] == str(next(policy.model.parameters()).device)


def test_a_run_says_how_many_frames_it_imagined(files, tmp_path, capsys):
    """--steps 9 from frame 1 of a 6-frame episode imagines the 4 frames recorded after it: the closing line says 4
    frames (x the futures drawn), the time a frame rollout.json holds, and the folder written to."""
    out = tmp_path / "out"
    assert _run(files / "policy", "--demos", files / "demos.hdf5", "--start", 1, "--steps", 9, "--samples", 2,
                "--temperature", 1.0, "--out", out) == 0
    result = json.loads((out / "rollout.json").read_text())
    line = capsys.readouterr().out.splitlines()[0]
    assert line == (f"imagined 4 frame(s) x 2 at {result['seconds_per_frame']:.3f} s a frame ({result['device']}); "
                    f"written to {out}/"), line


def test_demo_segment_refuses_a_negative_episode_index(files):
    """--demo -1 (given in code; the command line refuses it) is no episode of the file: refused naming the range,
    not read as the last episode, as a Python index would."""
    from worldvla.eval.imagine import demo_segment

    with pytest.raises(ValueError, match=r"holds 2 episode\(s\); --demo -1 is not one of them \(0..1\)"):
        demo_segment(files / "demos.hdf5", -1, 0, 2, rotate_180=False)


def test_a_missing_actions_file_or_a_file_that_is_no_image_is_refused_naming_it(tmp_path):
    """A missing actions file is a FileNotFoundError naming it, as a missing image is; a file Pillow cannot read
    as an image is refused naming the file."""
    from worldvla.eval.imagine import load_actions, load_image

    with pytest.raises(FileNotFoundError, match=r"no actions file at .*none\.npy$"):
        load_actions(tmp_path / "none.npy", 4)
    (tmp_path / "notes.png").write_text("not a picture")
    with pytest.raises(ValueError, match=r"notes\.png: not an image Pillow can read$"):
        load_image(tmp_path / "notes.png")
