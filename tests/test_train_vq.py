"""The VQGAN trainer: it learns, restarts dead codes, resumes exactly and exports a usable tokenizer."""
import json

import numpy as np
import pytest
import torch

from worldvla.data.hdf5 import write_demos
from worldvla.train import distributed as dist_utils
from worldvla.train import vq as vqt
from worldvla.train.checkpointing import latest_checkpoint
from worldvla.vqgan import VQGAN, VQGANConfig

from ranks import spawn


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("vqdata")
    rng = np.random.default_rng(11)
    # Smooth frames (a few blobs on a gradient) so that a tiny VQGAN can learn something quickly.
    yy, xx = np.mgrid[0:32, 0:32] / 31.0
    demos = []
    for T in (9, 7):
        frames = []
        for _ in range(T):
            c = rng.uniform(0, 1, (3, 3))
            img = np.stack([c[k, 0] * xx + c[k, 1] * yy + c[k, 2] * (1 - xx) for k in range(3)], -1)
            frames.append((np.clip(img / img.max(), 0, 1) * 255).astype(np.uint8))
        demos.append({"frames": np.stack(frames), "actions": rng.uniform(-1, 1, (T, 4)).astype(np.float32)})
    write_demos(root / "d.hdf5", demos, "reach")
    torch.manual_seed(0)
    init = VQGAN(VQGANConfig(ch=32, ch_mult=(1, 1, 1, 1, 1), num_res_blocks=1, z_channels=32, embed_dim=16,
                             n_embed=32))
    init.save_pretrained(root / "init")
    return root


def args_for(data, out, *extra):
    return vqt.build_parser().parse_args(
        [str(data / "d.hdf5"), "--out", str(out), "--init", str(data / "init"), "--batch-size", "4", "--lr", "2e-3",
         "--warmup", "2", "--min-lr", "2e-4", "--save-every", "0", "--no-progress", "--restart-every", "2",
         "--device", "cpu",
         *map(str, extra)])


def test_vq_training_learns_and_exports(data, tmp_path):
    s = vqt.train_vq(args_for(data, tmp_path / "run", "--steps", 16))
    log = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(log) == 16 and {"l1", "l2", "vq", "psnr", "perplexity", "codes_used"} <= set(log[0])
    assert (tmp_path / "run" / "training.png").is_file()
    first, last = np.mean([r["l2"] for r in log[:3]]), np.mean([r["l2"] for r in log[-3:]])
    assert last < 0.7 * first, (first, last)
    vq = VQGAN.from_pretrained(s["export"])
    assert vq.config.n_embed == 32
    px = torch.rand(2, 3, 32, 32) * 2 - 1
    assert vq.encode(px).shape == (2, 2, 2)


def test_vq_resume_is_exact(data, tmp_path):
    # 16 frames in batches of 4: crosses an epoch boundary; fast usage decay so that restarts happen.
    common = ["--steps", 7, "--restart-threshold", 0.5, "--usage-decay", 0.5]
    straight = vqt.train_vq(args_for(data, tmp_path / "a", *common))
    part = vqt.train_vq(args_for(data, tmp_path / "b", *common, "--stop-after", 3))
    with open(tmp_path / "b" / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "loss"')  # a line a crash cut short: dropped on resume
    again = vqt.train_vq(args_for(data, tmp_path / "b", *common, "--stop-after", 3, "--resume"))
    assert again["step"] == 3 and again["losses"] == []  # already there: no step past --stop-after
    rest = vqt.train_vq(args_for(data, tmp_path / "b", *common, "--resume"))
    assert part["losses"] + rest["losses"] == straight["losses"]
    log = [json.loads(ln) for ln in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert sum(r["restarted"] for r in log) > 0
    wa = torch.load(latest_checkpoint(tmp_path / "a") / "model.pt", weights_only=True)
    wb = torch.load(latest_checkpoint(tmp_path / "b") / "model.pt", weights_only=True)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_vq_sigterm_saves_the_step_and_resume_continues_exactly(data, tmp_path, monkeypatch, capsys):
    """SIGTERM ends a VQGAN run after the step under way, saved (it had ended it where it stood)."""
    import os
    import signal

    common = ["--steps", 5, "--restart-threshold", 0.5, "--usage-decay", 0.5]
    straight = vqt.train_vq(args_for(data, tmp_path / "a", *common))
    import worldvla.vqgan

    real, calls = worldvla.vqgan.preprocess, []

    def preprocess(*a, **kw):  # once a step: SIGTERM during step 2
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*a, **kw)

    monkeypatch.setattr(worldvla.vqgan, "preprocess", preprocess)
    assert vqt.run(args_for(data, tmp_path / "b", *common)) == 128 + signal.SIGTERM
    assert "stopped by SIGTERM after step 2, checkpoint step_00000002 saved" in capsys.readouterr().err
    assert latest_checkpoint(tmp_path / "b").name == "step_00000002" and not (tmp_path / "b" / "vqgan").exists()
    monkeypatch.undo()
    rest = vqt.train_vq(args_for(data, tmp_path / "b", *common, "--resume"))
    assert straight["losses"][2:] == rest["losses"] and rest["export"]
    wa = torch.load(latest_checkpoint(tmp_path / "a") / "model.pt", weights_only=True)
    wb = torch.load(latest_checkpoint(tmp_path / "b") / "model.pt", weights_only=True)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_vq_resume_does_not_read_init(data, tmp_path):
    """A fine-tuning run (--init FOLDER) could not resume once FOLDER had moved or was written another way
    (compared as a string), and every resume reloaded it only to overwrite its weights. The VQGAN is now built
    from the config the checkpoint records."""
    common = ["--steps", 4]
    straight = vqt.train_vq(args_for(data, tmp_path / "a", *common))
    part = vqt.train_vq(args_for(data, tmp_path / "b", *common, "--stop-after", 2))
    args = args_for(data, tmp_path / "b", *common, "--resume")
    args.init = str(tmp_path / "gone")  # no such folder: never opened
    rest = vqt.train_vq(args)
    assert part["losses"] + rest["losses"] == straight["losses"]
    wa = torch.load(latest_checkpoint(tmp_path / "a") / "model.pt", weights_only=True)
    wb = torch.load(latest_checkpoint(tmp_path / "b") / "model.pt", weights_only=True)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert VQGAN.from_pretrained(rest["export"]).config.to_dict() == VQGAN.from_pretrained(data / "init").config.to_dict()


def test_vq_resume_takes_another_epochs_under_steps(data, tmp_path):
    """--steps decides the run's length; --epochs, unused then, was compared and a resume refused over it."""
    vqt.train_vq(args_for(data, tmp_path / "r", "--steps", 3, "--epochs", 1, "--stop-after", 1))
    assert vqt.train_vq(args_for(data, tmp_path / "r", "--steps", 3, "--epochs", 5, "--resume"))["step"] == 3
    with pytest.raises(ValueError, match="started with --steps 3"):  # --steps itself still counts
        vqt.train_vq(args_for(data, tmp_path / "r", "--steps", 4, "--resume"))


@pytest.mark.parametrize("change", [("--steps", 9), ("--lr", 1e-3), ("--batch-size", 2), ("--seed", 3),
                                    ("--l2", 0.5), ("--restart-every", 3)])
def test_vq_resume_refuses_other_settings(data, tmp_path, change, monkeypatch):
    """The schedule is computed from --steps/--lr/--warmup at every step and the position in the frames'
    order is restored: a resume with other values would follow neither run, so it is refused by name, before
    the frames are read; so is another loss or dead-code restart setting, which the run would otherwise
    continue under silently."""
    common = {"--steps": 4, "--lr": 2e-3, "--batch-size": 4, "--seed": 0, "--l2": 1.0, "--restart-every": 2}
    flat = [x for kv in common.items() for x in kv]
    vqt.train_vq(args_for(data, tmp_path / "r", *flat, "--stop-after", 1))
    name, value = change
    other = [x for kv in {**common, name: value}.items() for x in kv]

    def no_frames(*a, **k):
        raise AssertionError("the frames were read before the settings were checked")

    monkeypatch.setattr(vqt, "load_frames", no_frames)
    with pytest.raises(ValueError, match=f"started with {name} {common[name]}, not {name} {value}"):
        vqt.train_vq(args_for(data, tmp_path / "r", *other, "--resume"))


def test_vq_resume_refuses_other_demo_files_and_old_checkpoints_still_resume(data, tmp_path, monkeypatch):
    """A resume on other demo files continued the old run's position in its frames' order and its schedule, whose
    length (--epochs) came from the new frames, silently. The files' names and sizes are recorded with the run's
    settings and compared before the frames are read; a checkpoint written before they were recorded resumes."""
    import shutil

    out = tmp_path / "r"
    vqt.train_vq(args_for(data, out, "--epochs", 2, "--stop-after", 1))
    other = args_for(data, out, "--epochs", 2, "--resume")
    other.inputs = [str(shutil.copy(data / "d.hdf5", tmp_path / "e.hdf5"))]  # same frames, another name
    load = vqt.load_frames
    monkeypatch.setattr(vqt, "load_frames", lambda *a, **k: pytest.fail("the frames were read before the check"))
    with pytest.raises(ValueError, match=r"started on other data \(demo files d\.hdf5 \(\d+ bytes\), not e\.hdf5 "
                                         r"\(\d+ bytes\)\).*Resume with the demo files it was started on"):
        vqt.train_vq(other)
    monkeypatch.setattr(vqt, "load_frames", load)
    state_file = latest_checkpoint(out) / "state.json"
    state = json.loads(state_file.read_text())
    del state["args"]["demo_files"]  # as written before it was recorded
    state_file.write_text(json.dumps(state))
    assert vqt.train_vq(args_for(data, out, "--epochs", 2, "--stop-after", 2, "--resume"))["step"] == 2


def _vqgan_after_one_adam_step():
    """A 16-code VQGAN and its AdamW after one step (every parameter has its Adam state)."""
    torch.manual_seed(0)
    model = VQGAN(VQGANConfig(ch=32, ch_mult=(1, 1, 1, 1, 1), num_res_blocks=1, z_channels=32, embed_dim=8,
                              n_embed=16))
    opt = torch.optim.AdamW(model.parameters())
    model(torch.rand(2, 3, 32, 32) * 2 - 1)[1].backward()
    opt.step()
    return model, opt


def test_dead_code_restart_reseeds_from_latents():
    model, opt = _vqgan_after_one_adam_step()
    usage = vqt.CodeUsage(16, decay=0.0)
    usage.update(torch.tensor([[0, 0, 1, 1, 2, 0]]))        # codes 3..15 unused
    latents = torch.randn(2, 8, 3, 5)
    before = model.quantize.embedding.weight.detach().clone()
    n = vqt.restart_dead_codes(model, opt, usage, latents, threshold=0.5, generator=torch.Generator().manual_seed(0))
    w = model.quantize.embedding.weight.detach()
    assert n == 13
    assert torch.equal(w[:3], before[:3])
    pool = latents.permute(0, 2, 3, 1).reshape(-1, 8)
    for c in range(3, 16):
        assert (pool == w[c]).all(1).any(), c
    st = opt.state[model.quantize.embedding.weight]
    assert (st["exp_avg"][3:] == 0).all() and (st["exp_avg"][:3] != 0).any()
    assert torch.allclose(usage.ema[3:], torch.full((13,), 1 / 16, dtype=torch.float64))


def _restart(latents, seed=0):
    torch.manual_seed(0)
    model = VQGAN(VQGANConfig(ch=32, ch_mult=(1, 1, 1, 1, 1), num_res_blocks=1, z_channels=32, embed_dim=8,
                              n_embed=16))
    opt = torch.optim.AdamW(model.parameters())
    usage = vqt.CodeUsage(16, decay=0.0)
    usage.update(torch.tensor([[0, 0, 1, 1, 2, 0]]))        # codes 3..15 unused
    gen = torch.Generator().manual_seed(seed)
    n = vqt.restart_dead_codes(model, opt, usage, latents, threshold=0.5, generator=gen)
    return n, model.quantize.embedding.weight.detach()[3:].clone(), gen.get_state(), usage


def test_dead_code_restart_gives_each_dead_code_its_own_vector():
    """The 13 dead codes were re-seeded with encoder outputs drawn with replacement: with this seed and 30
    outputs the draw repeats (3 pairs), and the codes seeded alike stayed duplicates (the nearest-code search
    picks one of them only). Now each takes another output while there are enough, deterministically under
    the run's generator (a resumed run restores its state); with fewer outputs than dead codes they share."""
    latents = torch.randn(2, 8, 3, 5, generator=torch.Generator().manual_seed(1))  # 30 outputs
    assert len(set(torch.randint(0, 30, (13,), generator=torch.Generator().manual_seed(0)).tolist())) < 13
    n, seeded, state, _ = _restart(latents)
    assert n == 13 and len(torch.unique(seeded, dim=0)) == 13
    pool = latents.permute(0, 2, 3, 1).reshape(-1, 8)
    assert all((pool == row).all(1).any() for row in seeded)
    n2, seeded2, state2, _ = _restart(latents)
    assert torch.equal(seeded, seeded2) and torch.equal(state, state2)
    few = latents[:1, :, :1, :]  # 5 outputs for 13 dead codes: 5 re-seeded, each with its own output
    n, seeded, _, _ = _restart(few)
    pool = few.permute(0, 2, 3, 1).reshape(-1, 8)
    assert n == 5 and len(torch.unique(seeded[:5], dim=0)) == 5
    assert all((pool == row).all(1).any() for row in seeded[:5])


def test_dead_code_restart_seeds_distinct_values_when_outputs_repeat():
    """A batch of frames with flat backgrounds or an idle robot gives bit-identical encoder outputs: drawn by
    position, several dead codes got one vector and all but one stayed dead (with their usage reset to uniform,
    unrestarted for hundreds of steps). Codes take distinct values; those left over stay dead for the next
    restart, their usage untouched."""
    g = torch.Generator().manual_seed(2)
    values = torch.randn(4, 8, generator=g)
    latents = values[torch.randint(0, 4, (2 * 3 * 5,), generator=g)].view(2, 3, 5, 8).permute(0, 3, 1, 2)
    n, w, _, usage = _restart(latents)
    assert n == 4
    assert len(torch.unique(w[:4], dim=0)) == 4 and all((values == row).all(1).any() for row in w[:4])
    assert (usage.ema[3:7] == 1 / 16).all() and (usage.ema[7:] == 0).all()
    assert torch.equal(usage.dead(0.5), torch.arange(7, 16))


def test_frames_whose_sides_are_no_multiple_of_32_are_refused_before_training(data, tmp_path):
    """48x48 frames suit a VQGAN of factor 16 but give a 3x3 code grid, no whole number of the layout's 32-px
    resolution grids: train-vq trained and exported, and pretokenize refused the VQGAN's frames afterwards."""
    rng = np.random.default_rng(0)
    demos = [{"frames": rng.integers(0, 256, (6, 48, 48, 3), dtype=np.uint8),
              "actions": rng.uniform(-1, 1, (6, 4)).astype(np.float32)}]
    write_demos(tmp_path / "d48" / "d.hdf5", demos, "push")
    args = args_for(data, tmp_path / "out", "--steps", 2)
    args.inputs = [str(tmp_path / "d48" / "d.hdf5")]
    with pytest.raises(ValueError, match=r"frames are 48x48: .*multiples of 32 px.*--image-size"):
        vqt.train_vq(args)
    assert not (tmp_path / "out" / "vqgan").exists()


def test_bad_inputs(data, tmp_path):
    with pytest.raises(ValueError, match="batch-size"):
        vqt.train_vq(args_for(data, tmp_path / "x", "--steps", 1, "--batch-size", 64))
    with pytest.raises(ValueError, match="stride"):
        vqt.load_frames(data / "d.hdf5", stride=0)


def test_fresh_run_refuses_old_checkpoints_and_overwrite_starts_over(data, tmp_path):
    """A run without --resume into a folder of an earlier run used to prune its own checkpoint, so that a
    later --resume continued (and exported) the old run; now it is refused unless --overwrite."""
    out = tmp_path / "run"
    vqt.train_vq(args_for(data, out, "--steps", 3, "--save-every", 1))
    with pytest.raises(FileExistsError, match="--resume.*--overwrite"):
        vqt.train_vq(args_for(data, out, "--steps", 1))
    assert latest_checkpoint(out).name == "step_00000003"
    s = vqt.train_vq(args_for(data, out, "--steps", 2, "--stop-after", 1, "--overwrite"))
    assert s["step"] == 1 and s["export"] is None
    assert latest_checkpoint(out).name == "step_00000001" and not (out / "vqgan").exists()
    s = vqt.train_vq(args_for(data, out, "--steps", 2, "--resume"))
    assert s["step"] == 2 and s["losses"] and (out / "vqgan" / "config.json").is_file()


def test_a_fresh_run_refuses_an_earlier_export_without_checkpoints_before_reading_frames(data, tmp_path, monkeypatch):
    """A folder holding an earlier run's vqgan/ whose checkpoints were deleted: a fresh run replaced that export
    without a word. It is refused, naming the folder and --overwrite, before any frame is loaded; --overwrite
    starts over."""
    import shutil

    out = tmp_path / "run"
    vqt.train_vq(args_for(data, out, "--steps", 2))
    shutil.rmtree(out / "checkpoints")  # deleted to free the disk, the export kept
    before = (out / "vqgan" / "model.safetensors").read_bytes()
    loaded = []
    real_load = vqt.load_frames
    monkeypatch.setattr(vqt, "load_frames", lambda *a, **k: loaded.append(1) or real_load(*a, **k))
    with pytest.raises(FileExistsError, match=r"holds the exported vqgan/ of an earlier run.*--overwrite"):
        vqt.train_vq(args_for(data, out, "--steps", 2, "--seed", 5))
    assert not loaded and (out / "vqgan" / "model.safetensors").read_bytes() == before
    s = vqt.train_vq(args_for(data, out, "--steps", 2, "--seed", 5, "--overwrite"))
    assert loaded and s["export"] and (out / "vqgan" / "model.safetensors").read_bytes() != before

@pytest.mark.parametrize("option,value", [("--batch-size", "0"), ("--log-every", "0"), ("--epochs", "0"),
                                          ("--steps", "-5"), ("--frame-stride", "0"), ("--keep-last", "-1"),
                                          ("--seed", "-1")])
def test_cli_refuses_bad_counts_naming_the_option(option, value, tmp_path, capsys):
    from worldvla.cli import main

    with pytest.raises(SystemExit) as e:
        main(["train-vq", str(tmp_path), "--out", str(tmp_path / "o"), option, value])
    assert e.value.code == 2
    assert f"argument {option}: must be >= " in capsys.readouterr().err


@pytest.mark.parametrize("option,value", [
    ("--beta", "nan"), ("--min-lr", "nan"), ("--lr", "inf"), ("--l1", "nan"), ("--l2", "-1"),
    ("--restart-threshold", "nan"), ("--usage-decay", "nan"), ("--usage-decay", "1.5"), ("--grad-clip", "-1"),
    ("--weight-decay", "inf"), ("--beta1", "nan"), ("--beta2", "inf"), ("--beta1", "1.0"), ("--beta2", "-0.1")])
def test_cli_refuses_non_finite_and_out_of_range_floats_naming_the_option(option, value, tmp_path, capsys):
    """`--beta nan` and `--min-lr nan` trained to a loss of nan (and exported it) with exit 0."""
    from worldvla.cli import main

    with pytest.raises(SystemExit) as e:
        main(["train-vq", str(tmp_path), "--out", str(tmp_path / "o"), option, value])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}: " in err and value in err


def test_overwrite_keeps_the_earlier_run_when_the_inputs_are_refused(data, tmp_path):
    """--overwrite deleted the earlier run's checkpoints and VQGAN before the demo files, their frames and --init
    were checked, so a typo cost the run and trained nothing; they are checked first now."""
    out = tmp_path / "run"
    vqt.train_vq(args_for(data, out, "--steps", 2))
    before = sorted(p.name for p in out.iterdir()), sorted(p.name for p in (out / "checkpoints").iterdir())
    for bad, error in ((("--batch-size", 64), "only 16 frames for a batch of 64"),
                       (("--init", data), "no VQGAN|not a VQGAN|VQGAN folder"),
                       (("--init", tmp_path / "no-vqgan"), "no such folder")):
        args = args_for(data, out, "--steps", 2, "--overwrite", *bad)
        with pytest.raises((ValueError, OSError), match=error):
            vqt.train_vq(args)
        assert not getattr(args, "run_dir_ready", False), bad  # an interrupt's advice: the earlier run is untouched
        assert (sorted(p.name for p in out.iterdir()), sorted(p.name for p in (out / "checkpoints").iterdir())) \
            == before, bad
    empty = args_for(data, out, "--steps", 2, "--overwrite")
    empty.inputs = [str(tmp_path / "no-demos")]
    (tmp_path / "no-demos").mkdir()
    with pytest.raises((ValueError, OSError)):
        vqt.train_vq(empty)
    assert sorted(p.name for p in out.iterdir()) == before[0]


def test_a_damaged_state_json_is_refused_naming_it(data, tmp_path):
    """A state.json cut short failed a resume with a bare JSONDecodeError (in --min-lr's default, or in the
    settings check); now it names the file and says what to do."""
    out = tmp_path / "run"
    vqt.train_vq(args_for(data, out, "--steps", 2, "--stop-after", 1))
    (latest_checkpoint(out) / "state.json").write_text('{"step": 1, "args": ')
    for args in (args_for(data, out, "--steps", 2, "--resume"), _vq_args(data, out, "--steps", 2, "--resume")):
        with pytest.raises(ValueError, match=r"step_00000001.state\.json: the checkpoint file cannot be read "
                                             r"\(JSONDecodeError.*no older checkpoint to resume from"):
            vqt.train_vq(args)


def test_resume_with_overwrite_is_refused_and_resume_messages(data, tmp_path, capsys):
    """--overwrite was silently ignored under --resume; a resumed run that had finished said only where it
    resumed; a --resume with no checkpoint said nothing."""
    out = tmp_path / "run"
    vqt.train_vq(args_for(data, out, "--steps", 2, "--resume"))
    assert f"--resume: no checkpoint in {out / 'checkpoints'}; a new run starts in {out}" in capsys.readouterr().out
    with pytest.raises(ValueError, match="--resume.*--overwrite.*not both"):
        vqt.train_vq(args_for(data, out, "--steps", 2, "--resume", "--overwrite"))
    assert latest_checkpoint(out).name == "step_00000002"
    assert vqt.run(args_for(data, out, "--steps", 2, "--resume")) == 0
    text = capsys.readouterr().out
    assert "at step 2: the run had already finished (2 steps)" in text and "exported again" in text
    assert text.strip().splitlines()[-1] == f"step 2: no steps run; exported {out / 'vqgan'} again"


def _ddp_worker(rank, world, init_file, data, out, common):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        vqt.train_vq(args_for(data, out, *common, "--stop-after", 2))
        vqt.train_vq(args_for(data, out, *common, "--resume"))  # resumed mid-run
    finally:
        dist_utils.shutdown()


def test_vq_two_processes_match_single_process(data, tmp_path):
    """torchrun-style data parallelism: two gloo ranks with half the batch each follow the
    single-process run (losses, dead-code restarts, weights) and resume mid-run.

    Tolerance: the ranks convolve half batches, so latents differ from the single process in the
    last bits, and nearest-code picks near a tie can flip; measured loss deviation 1.5e-4 over
    6 steps, against 0.17 when both ranks take the same half of the batch."""
    common = ["--steps", 4, "--restart-threshold", 0.5, "--usage-decay", 0.5]
    single = vqt.train_vq(args_for(data, tmp_path / "single", *common))
    spawn(_ddp_worker, 2, (str(tmp_path / "pg"), data, tmp_path / "ddp", common), timeout_s=120)
    read = lambda d: [json.loads(ln) for ln in (d / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    a, b = read(tmp_path / "single"), read(tmp_path / "ddp")
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    np.testing.assert_allclose([r["loss"] for r in b], single["losses"], rtol=1e-3)
    assert [r["restarted"] for r in b] == [r["restarted"] for r in a] and sum(r["restarted"] for r in a) > 0
    assert [r["codes_used"] for r in b] == [r["codes_used"] for r in a]
    ws = torch.load(latest_checkpoint(tmp_path / "single") / "model.pt", weights_only=True)
    wd = torch.load(latest_checkpoint(tmp_path / "ddp") / "model.pt", weights_only=True)
    assert ws.keys() == wd.keys()
    # Adam moves a weight by about lr per step whatever its gradient's size, so a gradient near zero
    # whose sign differs in the last bits can move single weights apart by a few lr; on average the
    # runs agree far closer (measured: max 3.3e-3, mean 1.5e-6 for lr 2e-3).
    lr, d = 2e-3, torch.cat([(wd[k] - ws[k]).abs().flatten() for k in ws])
    assert float(d.mean()) < 0.01 * lr and float(d.max()) <= 2 * lr * 4
    assert VQGAN.from_pretrained(tmp_path / "ddp" / "vqgan").config.n_embed == 32


@pytest.mark.parametrize("option", [("--n-embed", 128), ("--config", "chameleon")])
def test_init_refuses_architecture_options(data, tmp_path, option):
    """--init took the folder's VQGAN and silently ignored --n-embed and --config (a 128-code request
    exported 32 codes)."""
    with pytest.raises(ValueError, match="--init starts from that VQGAN's own architecture"):
        vqt.train_vq(args_for(data, tmp_path / "run", "--steps", 1, *option))


def _vq_args(data, out, *extra):
    """`args_for` without --min-lr (its default is what these tests look at)."""
    return vqt.build_parser().parse_args(
        [str(data / "d.hdf5"), "--out", str(out), "--init", str(data / "init"), "--batch-size", "4", "--warmup", "1",
         "--save-every", "0", "--no-progress", "--restart-every", "0", "--device", "cpu", *map(str, extra)])


def test_min_lr_defaults_to_a_tenth_of_lr_and_above_lr_is_refused(data, tmp_path):
    """--min-lr defaulted to a fixed 2e-5, so `--lr 1e-5` "decayed" up to 1.9e-5; a --min-lr above --lr was
    accepted too. The default is now --lr / 10, as in `worldvla train`, and a floor above --lr is refused."""
    vqt.train_vq(_vq_args(data, tmp_path / "a", "--lr", 1e-5, "--steps", 4))
    lrs = [json.loads(ln)["lr"] for ln in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    # The last logged step's rate: the cosine two thirds of the way from 1e-5 down to its floor, 1e-6.
    assert max(lrs) == pytest.approx(1e-5) and lrs[-1] == pytest.approx(1e-6 + 0.5 * 9e-6 * (1 + np.cos(np.pi * 2 / 3)))
    assert all(b <= a for a, b in zip(lrs, lrs[1:]))
    with pytest.raises(ValueError, match=r"--min-lr 0\.01 is above --lr 0\.001.*at most --lr"):
        vqt.train_vq(_vq_args(data, tmp_path / "b", "--lr", 1e-3, "--min-lr", 1e-2, "--steps", 2))
    assert not (tmp_path / "b").exists()


def test_a_run_started_under_the_old_fixed_min_lr_default_still_resumes(data, tmp_path):
    """A checkpoint records --min-lr; one written when its default was a fixed 2e-5 resumes without --min-lr
    on its own schedule (the new default, --lr / 10, would otherwise be refused as another setting), even
    where that floor lies above its --lr."""
    out = tmp_path / "r"
    vqt.train_vq(_vq_args(data, out, "--lr", 1e-5, "--min-lr", 1e-6, "--steps", 3, "--stop-after", 1))
    state_file = latest_checkpoint(out) / "state.json"
    state = json.loads(state_file.read_text())
    state["args"]["min_lr"] = 2e-5  # as the old default recorded it
    state_file.write_text(json.dumps(state))
    s = vqt.train_vq(_vq_args(data, out, "--lr", 1e-5, "--steps", 3, "--resume"))
    assert s["step"] == 3
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["lr"] == pytest.approx(1.5e-5)  # halfway down the cosine from 1e-5 to the recorded 2e-5
    new = tmp_path / "n"  # a run started now records its floor: resumes without --min-lr too
    vqt.train_vq(_vq_args(data, new, "--lr", 1e-3, "--steps", 2, "--stop-after", 1))
    assert json.loads((latest_checkpoint(new) / "state.json").read_text())["args"]["min_lr"] == pytest.approx(1e-4)
    assert vqt.train_vq(_vq_args(data, new, "--lr", 1e-3, "--steps", 2, "--resume"))["step"] == 2


def test_libero_like_frames_are_rotated_with_a_line_and_rotate_180_no_keeps_them(tmp_path, capsys):
    """train-vq read a user's file in LIBERO's layout (obs/agentview_rgb, no `upright`) rotated by 180
    degrees, silently and with no option to read it as stored (pretokenize has --rotate-180)."""
    import h5py

    frames = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    with h5py.File(tmp_path / "mine.hdf5", "w") as f:
        f.create_dataset("data/demo_0/obs/agentview_rgb", data=frames)
        f.create_dataset("data/demo_0/actions", data=np.zeros((4, 4), np.float32))
    turned = vqt.load_frames(tmp_path / "mine.hdf5", announce=True)
    out = capsys.readouterr().out
    np.testing.assert_array_equal(turned, frames[:, ::-1, ::-1])
    assert len(out.strip().splitlines()) == 1 and "mine.hdf5" in out and "--rotate-180 no" in out
    np.testing.assert_array_equal(vqt.load_frames(tmp_path / "mine.hdf5", rotate_180=False, announce=True), frames)
    assert capsys.readouterr().out == ""
    args = vqt.build_parser().parse_args([str(tmp_path / "mine.hdf5"), "--out", str(tmp_path / "o"),
                                          "--rotate-180", "no"])
    assert args.rotate_180 == "no" and "rotate_180" in vqt.RESUME_SETTINGS
    text = " ".join(vqt.build_parser().format_help().split())
    assert "rotated by 180 degrees" in text and "--rotate-180 no" in text


def test_seeds_up_to_torchs_largest_are_taken_and_larger_ones_refused_by_name(data, tmp_path, capsys):
    """--seed 2**64 failed with "Overflow when unpacking long long" after --overwrite had deleted the earlier run,
    and 2**64 - 1 (a seed torch takes) failed the same way in the dead-code restarts' generator."""
    from worldvla.cli import main

    with pytest.raises(SystemExit):
        main(["train-vq", str(data / "d.hdf5"), "--out", str(tmp_path / "o"), "--seed", str(2 ** 64)])
    assert "argument --seed: must be >= 0 and < 2**64" in capsys.readouterr().err
    assert vqt.train_vq(args_for(data, tmp_path / "r", "--steps", 1, "--seed", 2 ** 64 - 1))["step"] == 1


def test_a_diverging_run_stops_at_its_first_non_finite_loss_without_saving_or_exporting(data, tmp_path):
    """`--lr 100000` trained to a loss of nan, exited 0 and exported an all-nan VQGAN. The run now stops at the
    first step whose loss is not finite, naming it and the likely causes; the checkpoint before it is kept, the
    step itself is neither saved nor exported."""
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=r"step 2: the loss is nan .*not finite.*neither saved nor exported.*"
                                         r"step_00000001.*--lr"):
        vqt.train_vq(args_for(data, out, "--steps", 4, "--lr", 1e5, "--min-lr", 0, "--warmup", 0, "--save-every", 1))
    assert [p.name for p in (out / "checkpoints").glob("step_*")] == ["step_00000001"]
    assert not (out / "vqgan").exists()
    assert (out / "training.png").is_file()  # the curves up to the failure
    weights = torch.load(latest_checkpoint(out) / "model.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())


def test_a_state_json_without_a_key_the_resume_needs_is_refused_naming_it(data, tmp_path):
    """A state.json without `usage` (edited by hand, another version) failed a resume with a bare KeyError."""
    out = tmp_path / "run"
    vqt.train_vq(args_for(data, out, "--steps", 3, "--stop-after", 1))
    state_file = latest_checkpoint(out) / "state.json"
    state = json.loads(state_file.read_text())
    del state["usage"]
    state_file.write_text(json.dumps(state))
    with pytest.raises(ValueError, match=rf"{state_file}: .*lacks 'usage'.*no older checkpoint to resume from"):
        vqt.train_vq(args_for(data, out, "--steps", 3, "--resume"))


def test_resume_refuses_a_run_of_the_other_trainer_by_name(data, tmp_path, monkeypatch):
    """`train --resume` on a train-vq run listed the settings to resume it with and then failed loading the VQGAN's
    weights into WorldVLA; `train-vq --resume` on a train run asked for settings train-vq has not. Each refuses the
    other's run by name now, before comparing settings, for checkpoints that record their kind and older ones."""
    from test_train import args_for as train_args
    from test_train import make_store

    from worldvla.train import trainer

    store = make_store(tmp_path / "data")
    vq_run, train_run = tmp_path / "vq", tmp_path / "train"
    vqt.train_vq(args_for(data, vq_run, "--steps", 2, "--stop-after", 1))
    trainer.train(train_args(store, train_run, "--steps", 2, "--batch-tokens", 300, "--stop-after", 1))
    assert json.loads((latest_checkpoint(vq_run) / "state.json").read_text())["kind"] == "train-vq"
    assert json.loads((latest_checkpoint(train_run) / "state.json").read_text())["kind"] == "train"
    monkeypatch.setattr(vqt, "load_frames", lambda *a, **k: pytest.fail("the frames were read before the check"))
    monkeypatch.setattr(trainer, "_build_model", lambda *a, **k: pytest.fail("the model was built before the check"))
    with pytest.raises(FileExistsError, match="holds checkpoints of a `worldvla train-vq` run. Pass --overwrite"):
        trainer.train(train_args(store, vq_run, "--steps", 2, "--batch-tokens", 300))
    for recorded in (True, False):
        if not recorded:  # checkpoints written before the kind was recorded: told apart by their keys
            for run in (vq_run, train_run):
                state_file = latest_checkpoint(run) / "state.json"
                state = json.loads(state_file.read_text())
                del state["kind"]
                state_file.write_text(json.dumps(state))
        with pytest.raises(ValueError, match=rf"--resume: {vq_run} holds a `worldvla train-vq` run, not a "
                                             r"`worldvla train` one.*worldvla train-vq --resume"):
            trainer.train(train_args(store, vq_run, "--steps", 2, "--batch-tokens", 300, "--resume"))
        with pytest.raises(ValueError, match=rf"--resume: {train_run} holds a `worldvla train` run, not a "
                                             r"`worldvla train-vq` one.*worldvla train --resume"):
            vqt.train_vq(args_for(data, train_run, "--steps", 2, "--resume"))
        # _vq_args: without --min-lr, whose default is read from the checkpoint's settings first
        with pytest.raises(ValueError, match="holds a `worldvla train` run"):
            vqt.train_vq(_vq_args(data, train_run, "--steps", 2, "--resume"))


def test_the_summary_names_the_checkpoint_the_save_wrote_or_the_one_resumed(data, tmp_path, monkeypatch):
    """The run's summary (and the line a SIGTERM ends with) named a folder rebuilt by hand from the step, not the
    one save_checkpoint returned: a save that names its folder otherwise was misreported. Now it is the returned
    folder; a resumed run with nothing left to train names the checkpoint it resumed from."""
    import os

    real = vqt.save_checkpoint
    returned = []

    def save_elsewhere(*a, **kw):
        folder = real(*a, **kw)
        moved = folder.with_name(folder.name + "-moved")
        os.replace(folder, moved)
        returned.append(moved)
        return moved

    monkeypatch.setattr(vqt, "save_checkpoint", save_elsewhere)
    s = vqt.train_vq(args_for(data, tmp_path / "r", "--steps", 2))
    assert s["checkpoint"] == str(returned[-1]) and returned[-1].is_dir()
    monkeypatch.setattr(vqt, "save_checkpoint", real)
    vqt.train_vq(args_for(data, tmp_path / "done", "--steps", 2))
    again = vqt.train_vq(args_for(data, tmp_path / "done", "--steps", 2, "--resume"))
    assert again["losses"] == [] and again["checkpoint"] == str(latest_checkpoint(tmp_path / "done"))


def test_max_frames_and_stride_bound_the_frames_read(data):
    """--max-frames is a bound: the frames are cut to it, also where a demo file holds more."""
    full = vqt.load_frames(data / "d.hdf5")
    assert full.shape == (16, 32, 32, 3)  # demos of 9 and 7 frames
    ten = vqt.load_frames(data / "d.hdf5", max_frames=10)
    assert ten.shape[0] == 10 and np.array_equal(ten, full[:10])
    strided = vqt.load_frames(data / "d.hdf5", stride=2)
    assert np.array_equal(strided, np.concatenate([full[:9:2], full[9::2]]))  # every 2nd frame of each demo
    assert np.array_equal(vqt.load_frames(data / "d.hdf5", stride=2, max_frames=6), strided[:6])


def _batches_seen(data, tmp_path, monkeypatch, *extra):
    """The frame indices of every step's batch of a run (by the frames handed to preprocess)."""
    import worldvla.vqgan

    full = vqt.load_frames(data / "d.hdf5")
    real, seen = worldvla.vqgan.preprocess, []

    def preprocess(frames, *a, **kw):
        seen.append([next(j for j in range(len(full)) if np.array_equal(full[j], f)) for f in frames])
        return real(frames, *a, **kw)

    monkeypatch.setattr(worldvla.vqgan, "preprocess", preprocess)
    s = vqt.train_vq(args_for(data, tmp_path, *extra))
    monkeypatch.undo()
    return s, seen


def test_every_epoch_takes_each_frame_once_in_a_new_order(data, tmp_path, monkeypatch):
    """16 frames in batches of 4: each epoch of 4 steps sees every frame once, and the next epoch reshuffles
    (the same order every epoch would give the same batches each time)."""
    _, seen = _batches_seen(data, tmp_path / "r", monkeypatch, "--steps", 8, "--restart-every", 0)
    assert len(seen) == 8 and all(len(b) == 4 for b in seen)
    epochs = [sum(seen[:4], []), sum(seen[4:], [])]
    assert all(sorted(e) == list(range(16)) for e in epochs)
    assert epochs[0] != epochs[1]
    _, other = _batches_seen(data, tmp_path / "s", monkeypatch, "--steps", 4, "--restart-every", 0, "--seed", 1)
    assert sum(other, []) != epochs[0]  # the order follows --seed


def test_a_new_vqgan_follows_the_seed_and_the_codebook_size(data, tmp_path):
    """Without --init the VQGAN is built from --config and --n-embed and initialized from --seed: two runs with
    the same seed export the same weights, another seed other weights."""

    def fresh(out, seed):
        args = vqt.build_parser().parse_args(
            [str(data / "d.hdf5"), "--out", str(out), "--config", "small", "--n-embed", "24", "--steps", "1",
             "--batch-size", "4", "--warmup", "1", "--save-every", "0", "--no-progress", "--device", "cpu",
             "--seed", str(seed)])
        s = vqt.train_vq(args)
        return VQGAN.from_pretrained(s["export"])

    a, b, c = fresh(tmp_path / "a", 3), fresh(tmp_path / "b", 3), fresh(tmp_path / "c", 4)
    assert a.config.n_embed == 24 and a.quantize.embedding.weight.shape[0] == 24
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_a_batch_of_every_frame_is_taken_and_one_more_refused(data, tmp_path):
    """16 frames make one batch of 16; a batch of 17 has no whole batch to take and is refused by name."""
    s = vqt.train_vq(args_for(data, tmp_path / "a", "--steps", 2, "--batch-size", 16))
    assert s["step"] == 2 and len(s["losses"]) == 2
    with pytest.raises(ValueError, match="only 16 frames for a batch of 17; lower --batch-size"):
        vqt.train_vq(args_for(data, tmp_path / "b", "--steps", 1, "--batch-size", 17))


def test_sigterm_during_the_last_step_stops_the_run_and_a_resume_finishes_at_once(data, tmp_path, monkeypatch,
                                                                                   capsys):
    """A SIGTERM that arrived during the last step was taken for a finished run (exit 0, the VQGAN exported), and
    `worldvla demo` went on to its next stage. It now stops the run as any SIGTERM does (exit 143, the step saved,
    the export left to the resume), and the resume has nothing left to train: it exports and exits 0."""
    import os
    import signal

    import worldvla.vqgan

    real, calls = worldvla.vqgan.preprocess, []

    def preprocess(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*a, **kw)

    monkeypatch.setattr(worldvla.vqgan, "preprocess", preprocess)
    assert vqt.run(args_for(data, tmp_path / "r", "--steps", 2)) == 128 + signal.SIGTERM
    err = capsys.readouterr().err
    assert "stopped by SIGTERM after step 2, the run's last, checkpoint step_00000002 saved" in err
    assert "add --resume" in err
    assert latest_checkpoint(tmp_path / "r").name == "step_00000002" and not (tmp_path / "r" / "vqgan").exists()
    monkeypatch.undo()
    assert vqt.run(args_for(data, tmp_path / "r", "--steps", 2, "--resume")) == 0
    out = capsys.readouterr().out
    assert "nothing is left to train" in out and "no steps run" in out
    assert (tmp_path / "r" / "vqgan" / "config.json").is_file()


def test_sigterm_after_the_final_save_stops_the_run(data, tmp_path, monkeypatch, capsys):
    """A SIGTERM that arrived after the last step's all-reduce (here: once its checkpoint was saved) was dropped
    with the handler, and the run ended as finished."""
    import os
    import signal

    real = vqt.save_checkpoint

    def save_then_sigterm(out, step, *a, **kw):
        path = real(out, step, *a, **kw)
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return path

    monkeypatch.setattr(vqt, "save_checkpoint", save_then_sigterm)
    s = vqt.train_vq(args_for(data, tmp_path / "r", "--steps", 2))
    assert s["stopped"] and s["step"] == 2 and s["export"] is None
    assert latest_checkpoint(tmp_path / "r").name == "step_00000002"


def test_sigterm_during_the_export_stops_the_run(data, tmp_path, monkeypatch):
    """A SIGTERM during the export is noted, not acted on at once: the export is completed and the run is
    reported stopped."""
    import os
    import signal

    real = VQGAN.save_pretrained

    def save_then_sigterm(self, folder):
        real(self, folder)
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(VQGAN, "save_pretrained", save_then_sigterm)
    before = signal.getsignal(signal.SIGTERM)
    s = vqt.train_vq(args_for(data, tmp_path / "r", "--steps", 2))
    assert s["stopped"] and s["export"] and (tmp_path / "r" / "vqgan" / "config.json").is_file()
    assert signal.getsignal(signal.SIGTERM) is before


def test_grad_clip_0_leaves_the_gradients_as_they_are(data, tmp_path):
    """--grad-clip 0 turns clipping off (as a bound no gradient reaches would), not to a norm of 0."""
    off = vqt.train_vq(args_for(data, tmp_path / "off", "--steps", 4, "--grad-clip", 0))
    huge = vqt.train_vq(args_for(data, tmp_path / "huge", "--steps", 4, "--grad-clip", 1e9))
    assert off["losses"] == huge["losses"] and off["losses"][-1] < off["losses"][0]
    log = [json.loads(ln) for ln in (tmp_path / "off" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["grad_norm"] > 0 for r in log)


def test_the_log_holds_every_nth_step_the_last_one_and_no_line_twice_after_a_resume(data, tmp_path):
    """--log-every 3 logs steps 3 and 6 and the last step 7; PSNR is of frames in [-1, 1] (peak-to-peak 2). A run
    killed after logging step 3 but saving step 2 resumes at 2: its step-3 line and a line cut short are dropped."""
    vqt.train_vq(args_for(data, tmp_path / "a", "--steps", 7, "--log-every", 3))
    log = [json.loads(ln) for ln in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [3, 6, 7]
    assert all(r["psnr"] == pytest.approx(10 * np.log10(4.0 / r["l2"])) for r in log)
    out = tmp_path / "b"
    vqt.train_vq(args_for(data, out, "--steps", 4, "--stop-after", 2))
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 3, "loss": 1.0}) + "\n" + '{"step": 4, "lo')
    vqt.train_vq(args_for(data, out, "--steps", 4, "--resume"))
    log = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4] and log[2]["loss"] != 1.0


def test_the_loss_weighs_each_reconstruction_term_by_its_own_option(data, tmp_path):
    vqt.train_vq(args_for(data, tmp_path / "r", "--steps", 2, "--l1", 0.5, "--l2", 2.0))
    log = [json.loads(ln) for ln in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert len(log) == 2
    for r in log:
        assert r["loss"] == pytest.approx(0.5 * r["l1"] + 2.0 * r["l2"] + r["vq"], rel=1e-5)


def test_a_restart_threshold_of_0_calls_no_code_dead():
    """A code is dead below the threshold times the uniform rate: with --restart-threshold 0 none is, not even a
    code never picked."""
    usage = vqt.CodeUsage(4, decay=0.0)
    usage.update(torch.tensor([0, 0, 0, 1]))
    assert usage.dead(0.0).tolist() == []
    assert usage.dead(0.5).tolist() == [2, 3]  # 0.25 of the picks is the uniform rate: code 1 is at it
    assert usage.dead(1.01).tolist() == [1, 2, 3]


def test_the_next_line_names_the_demos_it_trained_on_quoted_for_the_shell(data, tmp_path, capsys):
    """The closing `next:` line said `worldvla pretokenize <the demos>` although the run knows its inputs: it names
    them now, each quoted as the shell needs (a path with a space is one argument)."""
    import shlex
    import shutil

    spaced = tmp_path / "my demos" / "d one.hdf5"
    spaced.parent.mkdir()
    shutil.copy(data / "d.hdf5", spaced)
    args = args_for(data, tmp_path / "run", "--steps", 1)
    args.inputs = [str(spaced), str(data / "d.hdf5")]
    assert vqt.run(args) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("next:"))
    words = shlex.split(line.split("   ")[0])
    assert words[:6] == ["next:", "worldvla", "pretokenize", str(spaced), str(data / "d.hdf5"), "--vqgan"], line
    assert words[6] == str(tmp_path / "run" / "vqgan")


def test_the_run_names_what_comes_next_and_files_without_frames_are_named(data, tmp_path, capsys):
    """The finished run says how its VQGAN is used next; demo files that hold no demo were refused as "no frames
    found in [PosixPath(...)]", a Python list that named no fix."""
    import h5py

    assert vqt.run(args_for(data, tmp_path / "run", "--steps", 2)) == 0
    out = capsys.readouterr().out
    assert f"next: worldvla pretokenize {data / 'd.hdf5'} --vqgan {tmp_path / 'run' / 'vqgan'} --out <store>" in out
    assert str(tmp_path / "run" / "training.png") in out
    empty = tmp_path / "empty.hdf5"
    with h5py.File(empty, "w") as f:
        f.create_group("data")
    with pytest.raises(ValueError, match=rf"no frames in {empty}: their 'data' groups hold no demo; collect"):
        vqt.load_frames([empty])


def test_curves_that_cannot_be_drawn_are_said_once_and_never_stop_the_run(tmp_path, monkeypatch, capsys):
    """training.png is a convenience: matplotlib missing (an ImportError, not an OSError) is said once on stderr and
    not tried again at later saves or at the end, so the run neither stops nor repeats the note. A new run's curves
    wait a period (a minute by default) before the first drawing, not one per save."""
    from worldvla.eval import plots
    from worldvla.train.checkpointing import CurvePlot

    calls = []

    def no_matplotlib(*a, **k):
        calls.append(a)
        raise ImportError("No module named 'matplotlib'")

    monkeypatch.setattr(plots, "training_curves", no_matplotlib)
    curves = CurvePlot(tmp_path, vqt.VQ_CURVES, "worldvla train-vq")
    curves.update()
    assert calls == []  # the run is younger than the default period
    curves.update(force=True)
    curves.last -= 3600
    curves.update()
    curves.update(force=True)
    assert len(calls) == 1
    err = capsys.readouterr().err
    assert err.count("could not draw") == 1 and "ImportError: No module named 'matplotlib'" in err


def test_an_export_stopped_partway_leaves_no_vqgan_folder_and_resume_leaves_only_its_files(data, tmp_path,
                                                                                            monkeypatch):
    """The export wrote into <out>/vqgan in place: stopped between its weights and its config (Ctrl-C, a kill) it
    left a vqgan/ folder without config.json, and a killed one a hidden weights-sized temporary file there that no
    later export removed. The folder is now written whole or not at all, and a resumed export leaves only its files."""
    out = tmp_path / "run"
    real = VQGAN.save_pretrained

    def stopped(self, folder):
        real(self, folder)
        (folder / "config.json").unlink()  # as a stop between the two files leaves it
        raise KeyboardInterrupt

    monkeypatch.setattr(VQGAN, "save_pretrained", stopped)
    with pytest.raises(KeyboardInterrupt):
        vqt.train_vq(args_for(data, out, "--steps", 2))
    monkeypatch.setattr(VQGAN, "save_pretrained", real)
    assert not (out / "vqgan").exists()
    assert latest_checkpoint(out).name == "step_00000002"
    # What a SIGKILL during an export left in place: weights without config.json and the write's temporary file.
    (out / "vqgan").mkdir()
    (out / "vqgan" / ".model.safetensors.0123456789ab.tmp").write_bytes(b"\0" * 64)
    s = vqt.train_vq(args_for(data, out, "--steps", 2, "--resume"))
    assert s["export"] == str(out / "vqgan")
    assert sorted(p.name for p in (out / "vqgan").iterdir()) == ["config.json", "model.safetensors"]
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]
    assert VQGAN.from_pretrained(out / "vqgan").config.n_embed == 32


def test_a_run_ended_by_stop_after_says_how_to_go_on_and_a_finished_one_does_not(data, tmp_path, capsys):
    """--stop-after ends the run with the steps left and how to go on; the run that then reaches its last step
    says nothing of --stop-after, and only it exports the VQGAN."""
    assert vqt.run(args_for(data, tmp_path / "run", "--steps", 3, "--stop-after", 1)) == 0
    out = capsys.readouterr().out
    assert "stopped at --stop-after, step 1 of 3: to go on, run the same command with --resume" in out, out
    assert not (tmp_path / "run" / "vqgan").exists()
    assert vqt.run(args_for(data, tmp_path / "run", "--steps", 3, "--resume")) == 0
    out = capsys.readouterr().out
    assert "--stop-after" not in out and "step 3: loss" in out, out
    assert (tmp_path / "run" / "vqgan" / "config.json").is_file()


@pytest.mark.parametrize("stride, max_frames, fragment", [
    (1, -3, "max_frames must be an integer >= 0 (0: every frame), got -3"),
    (1, True, "max_frames must be an integer >= 0 (0: every frame), got True"),
    (1, 2.5, "max_frames must be an integer >= 0 (0: every frame), got 2.5"),
    (1.5, 0, "frame stride must be an integer >= 1, got 1.5"),
    (True, 0, "frame stride must be an integer >= 1, got True")])
def test_load_frames_refuses_bounds_that_are_no_counts(data, stride, max_frames, fragment):
    """max_frames=-3 returned the first demo less its last 3 frames (6 of 16), max_frames=True one frame, and a
    float a bare "slice indices must be integers"."""
    import re

    with pytest.raises(ValueError, match=re.escape(fragment)):
        vqt.load_frames(data / "d.hdf5", stride=stride, max_frames=max_frames)
    assert vqt.load_frames(data / "d.hdf5", stride=np.int64(2), max_frames=np.int64(5)).shape == (5, 32, 32, 3)


def test_the_logged_terms_are_the_first_batchs_under_the_starting_weights_and_beta(data, tmp_path):
    """A step logs L1, L2 and the VQ loss of its batch under the weights it starts from, the VQ loss with --beta on
    the commitment term: the first step's are those of the first batch of epoch 0 through the --init VQGAN."""
    from worldvla.vqgan import preprocess

    vqt.train_vq(args_for(data, tmp_path / "r", "--steps", 1, "--beta", 1.5))
    r = json.loads((tmp_path / "r" / "metrics.jsonl").read_text())
    frames = vqt.load_frames(data / "d.hdf5")
    px = preprocess(frames[vqt._epoch_order(len(frames), 4, 0, 0)[0]])
    with torch.no_grad():
        recon, vq_loss, _ = VQGAN.from_pretrained(data / "init").float().train()(px, beta=1.5)
        at_default = VQGAN.from_pretrained(data / "init").float().train()(px)[1]
    assert r["l1"] == pytest.approx(float((recon - px).abs().mean()), rel=1e-5)
    assert r["l2"] == pytest.approx(float(((recon - px) ** 2).mean()), rel=1e-5)
    assert r["vq"] == pytest.approx(float(vq_loss), rel=1e-5)
    assert float(vq_loss) > 1.5 * float(at_default)  # (1 + 1.5) / (1 + 0.25): --beta is not the default's


def test_the_log_follows_the_schedule_restarts_every_nth_step_and_counts_the_batchs_codes(data, tmp_path):
    """--warmup 2 ramps the rate up over steps 1-2, then a cosine decays it from --lr towards --min-lr over the
    4 steps left; the optimizer ran at the rate logged. Restarts happen at multiples of --restart-every only,
    and a batch of 4 frames of 2x2 tokens picks at most 16 codes, with a perplexity between 1 and their count."""
    import math

    vqt.train_vq(args_for(data, tmp_path / "r", "--steps", 6, "--restart-threshold", 0.5, "--usage-decay", 0.5))
    log = [json.loads(ln) for ln in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    want = [1e-3, 2e-3] + [2e-4 + 0.5 * 1.8e-3 * (1 + math.cos(math.pi * i / 4)) for i in range(4)]
    assert [r["lr"] for r in log] == pytest.approx(want, rel=1e-9)
    optim = torch.load(latest_checkpoint(tmp_path / "r") / "optim.pt", weights_only=True)
    assert optim["param_groups"][0]["lr"] == pytest.approx(want[-1], rel=1e-9)
    assert any(r["restarted"] for r in log) and all(r["restarted"] == 0 for r in log if r["step"] % 2)
    assert all(1.0 <= r["perplexity"] <= r["codes_used"] <= 16 for r in log), log
    assert any(r["perplexity"] > 1.0 for r in log)


def test_a_min_lr_equal_to_lr_keeps_the_rate_constant(data, tmp_path):
    """--min-lr at --lr is no decay (a constant rate after the warm-up), not one that raises the rate: it is taken."""
    vqt.train_vq(args_for(data, tmp_path / "r", "--steps", 2, "--warmup", 0, "--min-lr", 2e-3))
    log = [json.loads(ln) for ln in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in log] == [2e-3, 2e-3]


def test_code_usage_starts_uniform_and_moves_by_its_decay():
    """A fresh average holds every code at the uniform rate (none dead before any step); each step moves it by
    (1 - decay) towards the step's fractions."""
    usage = vqt.CodeUsage(4, decay=0.9)
    assert usage.ema.tolist() == [0.25] * 4 and usage.dead(1.0).tolist() == []
    frac = usage.update(torch.tensor([0, 0, 0, 1]))
    assert frac.tolist() == [0.75, 0.25, 0.0, 0.0]
    assert usage.ema.tolist() == pytest.approx([0.3, 0.25, 0.225, 0.225], rel=1e-12)


def test_resume_refuses_another_loss_restart_or_optimizer_setting_by_name(data, tmp_path, monkeypatch):
    """--beta, --l1, the dead-code restarts' threshold and usage decay, the clipping and the optimizer's settings
    are part of the run as much as --l2: a resume under other values would continue another run, so each is
    refused by name before the frames are read."""
    import re

    vqt.train_vq(args_for(data, tmp_path / "r", "--steps", 4, "--stop-after", 1))

    def no_frames(*a, **k):
        raise AssertionError("the frames were read before the settings were checked")

    monkeypatch.setattr(vqt, "load_frames", no_frames)
    for name, before, value in [("--beta", 0.25, 1.0), ("--l1", 1.0, 0.5), ("--restart-threshold", 0.03, 0.5),
                                ("--usage-decay", 0.99, 0.5), ("--grad-clip", 1.0, 0.5), ("--warmup", 2, 3),
                                ("--min-lr", 0.0002, 0.0001), ("--weight-decay", 0.0, 0.1), ("--beta1", 0.5, 0.9)]:
        with pytest.raises(ValueError, match=re.escape(f"started with {name} {before}, not {name} {value}")):
            vqt.train_vq(args_for(data, tmp_path / "r", "--steps", 4, name, value, "--resume"))


def test_dead_code_restart_draws_its_outputs_from_the_generator():
    """The outputs a restart takes are a random draw under the run's generator (not the first rows of the sorted
    outputs, a biased pick): another generator state draws others, and the draw advances the generator."""
    latents = torch.randn(2, 8, 3, 5, generator=torch.Generator().manual_seed(1))  # 30 outputs for 13 dead codes
    _, a, state_a, _ = _restart(latents, seed=0)
    _, b, _, _ = _restart(latents, seed=1)
    assert not torch.equal(a, b)
    assert not torch.equal(state_a, torch.Generator().manual_seed(0).get_state())


def test_load_frames_refuses_demos_of_another_image_size_by_name(tmp_path):
    """Frames of two sizes cannot make one batch: the file and demo of the other size are named, with the fix."""
    for name, side in (("a.hdf5", 32), ("b.hdf5", 64)):
        write_demos(tmp_path / name, [{"frames": np.zeros((2, side, side, 3), np.uint8),
                                       "actions": np.zeros((2, 4), np.float32)}], "reach")
    with pytest.raises(ValueError, match=r"has frames of shape \(64, 64, 3\), earlier demos \(32, 32, 3\); "
                                         r"train the VQGAN on one image size"):
        vqt.load_frames([tmp_path / "a.hdf5", tmp_path / "b.hdf5"])


def test_dead_code_restart_zeroes_both_adam_moments_of_the_codes_it_reseeds():
    """A re-seeded code starts its Adam state afresh: an old second moment would scale its first updates by the
    gradients of the vector it replaced. Both moments of the re-seeded rows are zeroed, the live codes' are kept."""
    model, opt = _vqgan_after_one_adam_step()
    st = opt.state[model.quantize.embedding.weight]
    for key in ("exp_avg", "exp_avg_sq"):
        st[key].fill_(0.5)
    usage = vqt.CodeUsage(16, decay=0.0)
    usage.update(torch.tensor([[0, 0, 1, 1, 2, 0]]))  # codes 3..15 unused
    latents = torch.randn(2, 8, 3, 5, generator=torch.Generator().manual_seed(1))
    assert vqt.restart_dead_codes(model, opt, usage, latents, 0.5, torch.Generator().manual_seed(0)) == 13
    for key in ("exp_avg", "exp_avg_sq"):
        assert (st[key][3:] == 0).all() and (st[key][:3] == 0.5).all(), key


def test_the_export_holds_the_weights_of_the_last_step(data, tmp_path):
    """<out>/vqgan is the VQGAN as its last step left it (the weights of the final checkpoint), not another one."""
    s = vqt.train_vq(args_for(data, tmp_path / "r", "--steps", 2))
    exported = VQGAN.from_pretrained(s["export"]).state_dict()
    saved = torch.load(latest_checkpoint(tmp_path / "r") / "model.pt", weights_only=True)
    init = VQGAN.from_pretrained(data / "init").state_dict()
    assert exported.keys() == saved.keys()
    assert all(torch.equal(exported[k], saved[k]) for k in saved)
    assert not torch.equal(exported["quantize.embedding.weight"], init["quantize.embedding.weight"])


def test_the_optimizer_runs_with_the_betas_and_weight_decay_given(data, tmp_path):
    """--beta1, --beta2 and --weight-decay are AdamW's, each in its own place."""
    vqt.train_vq(args_for(data, tmp_path / "r", "--steps", 1, "--beta1", 0.6, "--beta2", 0.95,
                          "--weight-decay", 0.05))
    group = torch.load(latest_checkpoint(tmp_path / "r") / "optim.pt", weights_only=True)["param_groups"][0]
    assert list(group["betas"]) == [0.6, 0.95] and group["weight_decay"] == 0.05


def test_epochs_count_passes_over_the_frames_in_steps(data, tmp_path):
    """Under --epochs the run is that many passes of whole batches: 16 frames in batches of 8 for 2 epochs is 4
    steps, each epoch taking every frame once."""
    s = vqt.train_vq(args_for(data, tmp_path / "r", "--epochs", 2, "--batch-size", 8, "--restart-every", 0))
    assert s["total"] == 4 and s["step"] == 4 and len(s["losses"]) == 4
    log = [json.loads(ln) for ln in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["epoch"]) for r in log] == [(1, 0), (2, 0), (3, 1), (4, 1)]


def test_a_run_trains_on_the_camera_and_rotation_given(data, tmp_path, monkeypatch, capsys):
    """--camera picks the frames a run trains on and --rotate-180 how they are turned: a file in LIBERO's layout is
    read rotated, with the line that says so, and `--camera eye_in_hand --rotate-180 no` trains on that camera's
    frames as stored."""
    import h5py

    import worldvla.vqgan

    rng = np.random.default_rng(0)
    views = {c: rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8) for c in ("agentview", "eye_in_hand")}
    path = tmp_path / "libero.hdf5"
    with h5py.File(path, "w") as f:
        for c, v in views.items():
            f.create_dataset(f"data/demo_0/obs/{c}_rgb", data=v)
        f.create_dataset("data/demo_0/actions", data=np.zeros((4, 4), np.float32))
    real = worldvla.vqgan.preprocess

    def batch(out, *extra):
        seen = []
        monkeypatch.setattr(worldvla.vqgan, "preprocess",
                            lambda fr, *a, **k: seen.append(fr.copy()) or real(fr, *a, **k))
        args = args_for(data, out, "--steps", 1, *extra)
        args.inputs = [str(path)]
        vqt.train_vq(args)
        monkeypatch.undo()
        return seen[0]

    def same_frames(got, want):
        return len(got) == len(want) and all(any(np.array_equal(g, w) for w in want) for g in got)

    assert same_frames(batch(tmp_path / "a"), views["agentview"][:, ::-1, ::-1])
    assert "libero.hdf5" in capsys.readouterr().out
    assert same_frames(batch(tmp_path / "b", "--camera", "eye_in_hand", "--rotate-180", "no"), views["eye_in_hand"])


def test_resume_refuses_other_frames_or_beta2_and_another_epochs_by_name(data, tmp_path, monkeypatch):
    """The frames a run trains on (--frame-stride, --max-frames, --camera, --rotate-180) and AdamW's --beta2 are
    the run's as much as its --seed: a resume under other values would continue its position in another frame set
    or under another optimizer, so each is refused by name before the frames are read; so is another --epochs
    where --epochs sets the run's length."""
    import re

    vqt.train_vq(args_for(data, tmp_path / "s", "--steps", 4, "--stop-after", 1))
    vqt.train_vq(args_for(data, tmp_path / "e", "--epochs", 2, "--stop-after", 1))

    def no_frames(*a, **k):
        raise AssertionError("the frames were read before the settings were checked")

    monkeypatch.setattr(vqt, "load_frames", no_frames)
    for run, name, before, value in [("s", "--frame-stride", 1, 2), ("s", "--max-frames", 0, 12),
                                     ("s", "--camera", None, "wrist"), ("s", "--rotate-180", "auto", "no"),
                                     ("s", "--beta2", 0.9, 0.95), ("e", "--epochs", 2, 3)]:
        length = ("--steps", 4) if run == "s" else ()
        with pytest.raises(ValueError, match=re.escape(f"started with {name} {before}, not {name} {value}")):
            vqt.train_vq(args_for(data, tmp_path / run, *length, name, value, "--resume"))


def test_a_resume_in_a_later_epoch_continues_that_epochs_order(data, tmp_path):
    """16 frames in batches of 8: a run stopped at step 3 stands in epoch 1, and its resume takes epoch 1's order
    from the batch it stopped at, as the run without a stop does."""
    common = ["--steps", 4, "--batch-size", 8, "--restart-every", 0]
    straight = vqt.train_vq(args_for(data, tmp_path / "a", *common))
    part = vqt.train_vq(args_for(data, tmp_path / "b", *common, "--stop-after", 3))
    rest = vqt.train_vq(args_for(data, tmp_path / "b", *common, "--resume"))
    assert part["losses"] + rest["losses"] == straight["losses"] and len(rest["losses"]) == 1


def test_restarts_follow_the_threshold_and_the_usage_decay_each_in_its_place(data, tmp_path):
    """A batch of 16 picks leaves at least half of the 32 codes unused: under --usage-decay 0.5 those unused at both
    steps fall below half the uniform rate and --restart-threshold 0.5 re-seeds them at step 2; with a threshold of
    0 no code is dead, and with a decay of 1 the usage never moves from uniform, so neither restarts any."""
    def restarted(name, *extra):
        vqt.train_vq(args_for(data, tmp_path / name, "--steps", 2, *extra))
        return [json.loads(ln)["restarted"] for ln in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]

    assert restarted("both", "--restart-threshold", 0.5, "--usage-decay", 0.5)[1] > 0
    assert restarted("no-threshold", "--restart-threshold", 0, "--usage-decay", 0.5) == [0, 0]
    assert restarted("no-decay", "--restart-threshold", 0.5, "--usage-decay", 1.0) == [0, 0]


def test_keep_last_prunes_the_older_checkpoints(data, tmp_path):
    """--keep-last 2 with a save every step leaves the two newest checkpoints of a 3-step run."""
    vqt.train_vq(args_for(data, tmp_path / "r", "--steps", 3, "--save-every", 1, "--keep-last", 2,
                          "--restart-every", 0))
    assert sorted(p.name for p in (tmp_path / "r" / "checkpoints").glob("step_*")) == ["step_00000002",
                                                                                       "step_00000003"]


# ---------------------------------------------------------------- batches, architecture, precision, clipping, checks


def test_batches_that_do_not_divide_the_frames_leave_the_remainder_out_of_each_epoch(data, tmp_path, monkeypatch):
    """16 frames in batches of 5: an epoch is 3 whole batches of distinct frames (15 of them, one left over), so
    --epochs 2 runs 6 steps and the second epoch draws its 15 anew."""
    s, seen = _batches_seen(data, tmp_path / "r", monkeypatch, "--epochs", 2, "--batch-size", 5, "--restart-every", 0)
    assert s["total"] == 6 and s["step"] == 6 and [len(b) for b in seen] == [5] * 6
    for epoch in (seen[:3], seen[3:]):
        frames = sum(epoch, [])
        assert len(set(frames)) == 15 and set(frames) <= set(range(16))


def test_a_new_vqgan_is_built_from_the_config_named_with_its_codebook_override(data, tmp_path, monkeypatch):
    """Without --init, --config chameleon builds the release's architecture (not the small one), with --n-embed's
    codebook size when given; the small config is the default."""
    import worldvla.vqgan

    class Built(Exception):
        pass

    def capture(cfg):
        raise Built(cfg)

    monkeypatch.setattr(worldvla.vqgan, "VQGAN", capture)

    def built(*extra):
        args = vqt.build_parser().parse_args([str(data / "d.hdf5"), "--out", str(tmp_path / "o"), "--steps", "1",
                                              "--batch-size", "4", "--no-progress", "--device", "cpu", *extra])
        with pytest.raises(Built) as e:
            vqt.train_vq(args)
        return e.value.args[0].to_dict()

    assert built("--config", "chameleon", "--n-embed", "64") == {**VQGANConfig.chameleon().to_dict(), "n_embed": 64}
    assert built("--config", "chameleon") == VQGANConfig.chameleon().to_dict()
    assert built() == VQGANConfig.small().to_dict()


def test_a_fresh_run_over_an_earlier_one_takes_the_default_min_lr_not_the_earlier_runs(data, tmp_path):
    """Only --resume inherits the floor a checkpoint records: an --overwrite run without --min-lr starts on
    --lr / 10, whatever the run it replaces had."""
    out = tmp_path / "r"
    vqt.train_vq(_vq_args(data, out, "--lr", 1e-3, "--min-lr", 5e-4, "--steps", 2, "--stop-after", 1))
    vqt.train_vq(_vq_args(data, out, "--lr", 1e-3, "--steps", 2, "--stop-after", 1, "--overwrite"))
    assert json.loads((latest_checkpoint(out) / "state.json").read_text())["args"]["min_lr"] == pytest.approx(1e-4)


def test_precision_auto_is_fp32_on_cpu_and_bf16_is_honoured(data, tmp_path):
    """On the CPU --precision auto trains in float32 (the losses of --precision fp32, bit for bit); --precision bf16
    runs the forward pass under bfloat16 autocast, which gives other losses; the weights stay float32 either way."""
    def losses(name, precision):
        s = vqt.train_vq(args_for(data, tmp_path / name, "--steps", 2, "--restart-every", 0, "--precision", precision))
        assert all(v.dtype == torch.float32 for v in VQGAN.from_pretrained(s["export"]).state_dict().values()
                   if v.is_floating_point())
        return s["losses"]

    fp32 = losses("fp32", "fp32")
    assert losses("auto", "auto") == fp32
    bf16 = losses("bf16", "bf16")
    assert all(np.isfinite(bf16)) and bf16 != fp32


def test_grad_clip_bounds_the_step_a_gradient_takes(data, tmp_path):
    """--grad-clip scales the gradient down to that norm before AdamW's step: a bound of 1e-9 leaves gradients far
    below Adam's eps, so the first step barely moves the weights, where an unclipped one moves them by about the
    rate; the logged norm is the gradient's before clipping."""
    init = VQGAN.from_pretrained(data / "init").state_dict()

    def moved(name, clip):
        s = vqt.train_vq(args_for(data, tmp_path / name, "--steps", 1, "--restart-every", 0, "--grad-clip", clip))
        w = VQGAN.from_pretrained(s["export"]).state_dict()
        log = json.loads((tmp_path / name / "metrics.jsonl").read_text())
        return max(float((w[k] - init[k]).abs().max()) for k in init if init[k].is_floating_point()), log["grad_norm"]

    free, norm_free = moved("free", 0)
    clipped, norm_clipped = moved("clipped", 1e-9)
    assert free > 1e-4 and clipped < 0.05 * free, (free, clipped)
    assert norm_clipped == pytest.approx(norm_free, rel=1e-6) and norm_free > 1e-9


def test_frames_per_second_counts_the_steps_of_this_run_only(data, tmp_path, monkeypatch):
    """frames_per_s is the frames this run has trained on over the time it has run: a resumed run counts its own
    steps from its own start, not the steps its checkpoint had already done (a clock of one second per reading:
    one step a second, 4 frames a second)."""
    import time
    import types

    clock = iter(range(10 ** 6))
    monkeypatch.setattr(vqt, "time", types.SimpleNamespace(perf_counter=lambda: float(next(clock)), time=time.time))
    out = tmp_path / "r"
    vqt.train_vq(args_for(data, out, "--steps", 4, "--stop-after", 2))
    vqt.train_vq(args_for(data, out, "--steps", 4, "--resume"))
    log = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["frames_per_s"]) for r in log] == [(1, 4.0), (2, 4.0), (3, 4.0), (4, 4.0)]


def test_no_progress_draws_no_bar_and_without_it_the_bar_is_drawn(data, tmp_path, capsys):
    """--no-progress keeps the progress bar off stderr (a log file of bars otherwise); without it the bar is there."""
    vqt.train_vq(args_for(data, tmp_path / "quiet", "--steps", 1, "--restart-every", 0))
    assert "train-vq" not in capsys.readouterr().err
    args = args_for(data, tmp_path / "bar", "--steps", 1, "--restart-every", 0)
    args.no_progress = False
    vqt.train_vq(args)
    assert "train-vq" in capsys.readouterr().err


@pytest.mark.parametrize("shape", [(32, 48), (48, 32)])
def test_frames_with_either_side_no_multiple_of_32_are_refused_naming_both(data, tmp_path, shape):
    """32x48 and 48x32 frames suit the VQGAN's factor 16 in both sides, but one side is no whole number of the
    layout's 32-px grids: either side refuses them, naming the frames' size, before any run folder is made."""
    h, w = shape
    rng = np.random.default_rng(0)
    write_demos(tmp_path / "d" / "d.hdf5", [{"frames": rng.integers(0, 256, (6, h, w, 3), dtype=np.uint8),
                                             "actions": np.zeros((6, 4), np.float32)}], "push")
    args = args_for(data, tmp_path / "out", "--steps", 1)
    args.inputs = [str(tmp_path / "d" / "d.hdf5")]
    with pytest.raises(ValueError, match=rf"frames are {h}x{w}: .*multiples of 32 px"):
        vqt.train_vq(args)
    assert not (tmp_path / "out").exists()


def test_frames_smaller_than_the_vqgans_factor_are_refused_naming_it(data, tmp_path):
    """A VQGAN of 7 levels downsamples by 64: 32x32 frames give it no whole code grid, and the run is refused with
    the frames' size and the factor, before the folder is made, not failed inside the encoder."""
    torch.manual_seed(0)
    VQGAN(VQGANConfig(ch=32, ch_mult=(1,) * 7, num_res_blocks=1, z_channels=8, embed_dim=8,
                      n_embed=16)).save_pretrained(tmp_path / "deep")
    args = args_for(data, tmp_path / "out", "--steps", 1)
    args.init = str(tmp_path / "deep")
    with pytest.raises(ValueError, match="frames are 32x32, not a multiple of the VQGAN factor 64"):
        vqt.train_vq(args)
    assert not (tmp_path / "out").exists()


def test_a_gradient_norm_that_is_not_finite_stops_the_run_naming_it(data, tmp_path, monkeypatch):
    """A step whose loss is finite but whose gradient norm is not leaves garbage weights as well: the run stops at
    it, naming the gradient norm, with nothing saved or exported."""
    real = torch.nn.utils.clip_grad_norm_

    def inf_norm(params, max_norm, *a, **kw):
        real(params, max_norm, *a, **kw)
        return torch.tensor(float("inf"))

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", inf_norm)
    out = tmp_path / "r"
    with pytest.raises(ValueError, match=r"step 1: the gradient norm is inf \(not finite\)"):
        vqt.train_vq(args_for(data, out, "--steps", 2, "--save-every", 1))
    assert latest_checkpoint(out) is None and not (out / "vqgan").exists()


def test_a_global_batch_that_does_not_divide_over_the_ranks_is_refused_before_anything(data, tmp_path, monkeypatch):
    """--batch-size is the global batch: 4 frames over 3 ranks gives no equal slices, and the run is refused by
    name before the run folder is made or any frame is read."""
    monkeypatch.setattr(dist_utils, "world_size", lambda: 3)
    monkeypatch.setattr(vqt, "load_frames", lambda *a, **k: pytest.fail("the frames were read before the check"))
    with pytest.raises(ValueError, match=r"--batch-size 4 \(the global batch\) must divide evenly over 3 ranks"):
        vqt.train_vq(args_for(data, tmp_path / "r", "--steps", 1))
    assert not (tmp_path / "r").exists()


def test_a_bfloat16_init_is_trained_and_exported_in_float32(data, tmp_path):
    """A VQGAN saved in bfloat16 (from_pretrained keeps a file's dtype) is fine-tuned in float32, so that AdamW's
    small steps are not rounded away, and exported in float32."""
    VQGAN.from_pretrained(data / "init").to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    args = args_for(data, tmp_path / "r", "--steps", 1, "--restart-every", 0)
    args.init = str(tmp_path / "bf16")
    s = vqt.train_vq(args)
    sd = VQGAN.from_pretrained(s["export"]).state_dict()
    assert {v.dtype for v in sd.values() if v.is_floating_point()} == {torch.float32}


def test_a_resume_says_which_checkpoint_it_resumed_from(data, tmp_path, capsys):
    """A resumed run names the checkpoint folder and the step it continues from."""
    out = tmp_path / "r"
    vqt.train_vq(args_for(data, out, "--steps", 2, "--stop-after", 1, "--restart-every", 0))
    capsys.readouterr()
    vqt.train_vq(args_for(data, out, "--steps", 2, "--resume", "--restart-every", 0))
    assert f"resumed from {out / 'checkpoints' / 'step_00000001'} at step 1\n" in capsys.readouterr().out


# ---------------------------------------------------------------- architecture on resume, frame bounds, the log's numbers
def _small_args(data, out, *extra):
    """A run of a new small VQGAN (no --init), as `--config small --n-embed 24` builds it."""
    return vqt.build_parser().parse_args(
        [str(data / "d.hdf5"), "--out", str(out), "--config", "small", "--n-embed", "24", "--steps", "2",
         "--batch-size", "4", "--warmup", "1", "--save-every", "0", "--no-progress", "--restart-every", "0",
         "--device", "cpu", *map(str, extra)])


def test_resume_refuses_another_architecture_or_codebook_size_by_name(data, tmp_path, monkeypatch):
    """A resumed run is built from the config its checkpoint records: a resume under another --config or --n-embed
    would go on with the recorded architecture, not the one asked for, so each is refused by name before the frames
    are read."""
    import re

    out = tmp_path / "r"
    vqt.train_vq(_small_args(data, out, "--stop-after", 1))
    monkeypatch.setattr(vqt, "load_frames", lambda *a, **k: pytest.fail("the frames were read before the check"))
    for option, value, before in (("--n-embed", "16", "24"), ("--config", "chameleon", "small")):
        with pytest.raises(ValueError, match=re.escape(f"started with {option} {before}, not {option} {value}")):
            vqt.train_vq(_small_args(data, out, "--resume", option, value))


def test_the_logged_perplexity_and_codes_used_are_the_first_batchs(data, tmp_path):
    """A step logs how many codes its batch picked and their perplexity, exp of the entropy of the picks' fractions:
    the first step's are those of the first batch of epoch 0 through the --init VQGAN."""
    import math

    from worldvla.vqgan import preprocess

    vqt.train_vq(args_for(data, tmp_path / "r", "--steps", 1))
    r = json.loads((tmp_path / "r" / "metrics.jsonl").read_text())
    frames = vqt.load_frames(data / "d.hdf5")
    px = preprocess(frames[vqt._epoch_order(len(frames), 4, 0, 0)[0]])
    with torch.no_grad():
        codes = VQGAN.from_pretrained(data / "init").float().train()(px)[2]
    p = torch.bincount(codes.flatten(), minlength=32).double()
    p = p[p > 0] / p.sum()
    assert r["codes_used"] == len(p) > 1
    assert r["perplexity"] == pytest.approx(math.exp(-float((p * p.log()).sum())), rel=1e-9)


def test_a_run_trains_on_the_frames_its_max_frames_and_stride_leave(data, tmp_path, monkeypatch):
    """--max-frames and --frame-stride bound the frames a run trains on: an epoch of --max-frames 8 is the first 8
    frames (2 batches of 4), and one of --frame-stride 2 every other frame of each demo (9 frames, 2 whole batches)."""
    s, seen = _batches_seen(data, tmp_path / "m", monkeypatch, "--epochs", 1, "--max-frames", 8, "--restart-every", 0)
    assert s["total"] == 2 and sorted(sum(seen, [])) == list(range(8))
    s, seen = _batches_seen(data, tmp_path / "s", monkeypatch, "--epochs", 1, "--frame-stride", 2,
                            "--restart-every", 0)
    strided = [0, 2, 4, 6, 8, 9, 11, 13, 15]  # demos of 9 and 7 frames
    assert s["total"] == 2 and len(set(sum(seen, []))) == 8 and set(sum(seen, [])) <= set(strided)


def test_a_fine_tuned_vqgan_trains_with_its_dropout(data, tmp_path):
    """A VQGAN folder loads in eval mode; fine-tuning it trains it in training mode, so a dropout in its config acts:
    the first step's L1 is not the one the VQGAN gives the first batch with its dropout off."""
    from worldvla.vqgan import preprocess

    cfg = VQGAN.from_pretrained(data / "init").config.to_dict()
    torch.manual_seed(0)
    VQGAN(VQGANConfig(**{**cfg, "dropout": 0.5})).save_pretrained(tmp_path / "init")
    args = args_for(data, tmp_path / "r", "--steps", 1, "--restart-every", 0)
    args.init = str(tmp_path / "init")
    vqt.train_vq(args)
    r = json.loads((tmp_path / "r" / "metrics.jsonl").read_text())
    frames = vqt.load_frames(data / "d.hdf5")
    px = preprocess(frames[vqt._epoch_order(len(frames), 4, 0, 0)[0]])
    with torch.no_grad():
        recon = VQGAN.from_pretrained(tmp_path / "init").eval()(px)[0]
    assert r["l1"] != pytest.approx(float((recon - px).abs().mean()), rel=1e-3)


def test_frames_of_a_width_off_the_vqgans_factor_are_refused_before_the_run_folder(data, tmp_path):
    """64x32 frames are whole 32-px grids but their width is no multiple of a VQGAN factor of 64: refused naming the
    size and the factor before the run folder is made, not failed inside the first step."""
    torch.manual_seed(0)
    VQGAN(VQGANConfig(ch=32, ch_mult=(1,) * 7, num_res_blocks=1, z_channels=8, embed_dim=8,
                      n_embed=16)).save_pretrained(tmp_path / "deep")
    write_demos(tmp_path / "d" / "d.hdf5", [{"frames": np.zeros((4, 64, 32, 3), np.uint8),
                                             "actions": np.zeros((4, 4), np.float32)}], "push")
    args = args_for(data, tmp_path / "out", "--steps", 1)
    args.inputs, args.init = [str(tmp_path / "d" / "d.hdf5")], str(tmp_path / "deep")
    with pytest.raises(ValueError, match="frames are 64x32, not a multiple of the VQGAN factor 64"):
        vqt.train_vq(args)
    assert not (tmp_path / "out").exists()


def test_load_frames_stops_reading_at_max_frames(tmp_path):
    """Once max_frames are read no further file is opened: a later file of another image size does not matter."""
    for name, side in (("a.hdf5", 32), ("b.hdf5", 64)):
        write_demos(tmp_path / name, [{"frames": np.full((3, side, side, 3), side, np.uint8),
                                       "actions": np.zeros((3, 4), np.float32)}], "reach")
    frames = vqt.load_frames([tmp_path / "a.hdf5", tmp_path / "b.hdf5"], max_frames=3)
    assert frames.shape == (3, 32, 32, 3) and (frames == 32).all()


def test_a_resumed_runs_progress_bar_counts_on_from_the_checkpoints_step(data, tmp_path, capsys):
    """The bar of a run resumed at step 2 of 4 starts at 2 and ends at 4/4, not at 2/4."""
    out = tmp_path / "r"
    vqt.train_vq(args_for(data, out, "--steps", 4, "--stop-after", 2, "--restart-every", 0))
    capsys.readouterr()
    args = args_for(data, out, "--steps", 4, "--resume", "--restart-every", 0)
    args.no_progress = False
    vqt.train_vq(args)
    err = capsys.readouterr().err
    assert "4/4" in err and "2/4" in err
