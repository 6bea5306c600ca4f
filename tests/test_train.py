"""The WorldVLA trainer: data order, batch splitting, schedule, loss bookkeeping, exact resume,
and FSDP2 across two Gloo processes (torchrun) against a single process."""
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import worldvla.model
from worldvla.data.hdf5 import write_demos
from worldvla.data.store import TokenStore, build_store, pack
from worldvla.model import WorldVLA, loss_class_weights
from worldvla.train import distributed as dist_utils
from worldvla.train import trainer
from worldvla.train.checkpointing import latest_checkpoint, load_checkpoint
from worldvla.vqgan import VQGAN, VQGANConfig

from ranks import gloo_threads, spawn


def make_store(root: Path, seed: int = 0, lengths=(8, 6, 7), demo_seed: int | None = None, **kw) -> Path:
    """A token store of demos drawn with `demo_seed` (default `seed`), tokenized by a VQGAN drawn with `seed`;
    `kw`: build_store's."""
    rng = np.random.default_rng(seed if demo_seed is None else demo_seed)
    demos = [{"frames": rng.integers(0, 256, (T, 32, 32, 3), dtype=np.uint8),
              "actions": rng.uniform(-1, 1, (T, 4)).astype(np.float32)} for T in lengths]
    write_demos(root / "demos" / "a.hdf5", demos[:2], "push the red block")
    write_demos(root / "demos" / "b.hdf5", demos[2:], "open the drawer")
    torch.manual_seed(seed)
    vq = VQGAN(VQGANConfig(ch=32, ch_mult=(1, 1, 1, 1, 1), num_res_blocks=1, z_channels=32, embed_dim=32,
                           n_embed=64))
    return build_store(root / "demos", root / "store", vq, chunk_size=3, progress=False, **kw)


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    torch.set_num_threads(1)
    return make_store(tmp_path_factory.mktemp("trainstore"))


def args_for(store, out, *extra):
    return trainer.build_parser().parse_args(
        ["--store", str(store), "--out", str(out), "--config", "tiny", "--lr", "2e-3", "--warmup", "2",
         "--no-progress", "--save-every", "0", "--seed", "3", "--device", "cpu", *map(str, extra)])


def read_log(out):
    return [json.loads(ln) for ln in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def final_weights(out):
    ck = latest_checkpoint(out)
    return torch.load(ck / "model.pt", weights_only=True)


# ---------------------------------------------------------------------- pure functions
def test_epoch_batches_cover_every_sample_once_within_budget():
    rng = np.random.default_rng(1)
    lengths = rng.integers(20, 97, size=53)
    b0 = trainer.epoch_batches(lengths, 300, seed=5, epoch=0)
    flat = np.concatenate(b0)
    assert sorted(flat.tolist()) == list(range(53))
    assert all(lengths[b].sum() <= 300 for b in b0)
    assert all(lengths[b].sum() + lengths[n[0]] > 300 for b, n in zip(b0[:-1], b0[1:]))  # greedy: next didn't fit
    again = trainer.epoch_batches(lengths, 300, seed=5, epoch=0)
    assert all(np.array_equal(x, y) for x, y in zip(b0, again))
    b1 = trainer.epoch_batches(lengths, 300, seed=5, epoch=1)
    assert not np.array_equal(np.concatenate(b1), flat)
    with pytest.raises(ValueError, match="batch-tokens"):
        trainer.epoch_batches(lengths, 50, seed=0, epoch=0)


@pytest.mark.parametrize("world,micro", [(1, 300), (1, 101), (2, 150), (3, 97)])
def test_split_batch_assigns_each_sample_once(world, micro):
    rng = np.random.default_rng(world * 100 + micro)
    lengths = rng.integers(10, 96, size=40)
    batch = rng.permutation(40)[:17]
    steps = trainer.split_batch(batch, lengths, world, micro)
    assert all(len(s) == world for s in steps)
    got = sorted(i for s in steps for r in s for i in r)
    assert got == sorted(batch.tolist())
    assert all(lengths[r].sum() <= micro for s in steps for r in s if r)
    assert len(steps) >= int(np.ceil(lengths[batch].sum() / (world * micro)))


def test_a_warmup_fraction_is_its_share_of_the_run_in_steps():
    """--warmup 0.29 over 100 steps was 28 warm-up steps: 0.29 * 100 is 28.999999999999996 in floating point."""
    from types import SimpleNamespace

    def steps(w, total):
        return trainer._warmup_steps(SimpleNamespace(warmup=w, lr=1e-3, schedule="cosine", min_lr=None), total)

    for w, total, want in [(0.07, 100, 7), (0.29, 100, 29), (0.57, 100, 57), (0.58, 100, 58), (0.05, 1000, 50),
                           (0.1, 35, 3), (0.999, 10, 9), (0.0, 100, 0), (3, 100, 3)]:
        assert steps(w, total) == want, (w, total)


def test_schedule_warmup_cosine_and_constant():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    s = trainer.WarmupCosine(opt, lr=1e-3, total=110, warmup=10, min_lr=1e-4)
    lrs = [s.lr_at(i) for i in range(110)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert lrs[10] == pytest.approx(1e-3) and lrs[60] == pytest.approx(5.5e-4)
    assert s.lr_at(110) == pytest.approx(1e-4)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    s.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(2e-4)
    c = trainer.WarmupCosine(opt, lr=5e-6, total=50, warmup=3, kind="constant")
    assert [c.lr_at(i) for i in (0, 2, 3, 49)] == pytest.approx([5e-6 / 3, 5e-6, 5e-6, 5e-6])


# ---------------------------------------------------------------------- training
def test_logged_loss_is_the_global_batch_loss(store_dir, tmp_path):
    """Step 1's loss, accumulated over 4+ micro-batches, equals model.loss on the whole packed batch."""
    a = args_for(store_dir, tmp_path / "run", "--steps", 1, "--batch-tokens", 600, "--micro-tokens", 140,
                 "--no-export")
    trainer.train(a)
    logged = read_log(a.out)[0]
    store = TokenStore(store_dir)
    batch = trainer.epoch_batches(store.lengths, 600, seed=3, epoch=0)[0]
    assert len(trainer.split_batch(batch, store.lengths, 1, 140)) >= 4
    model = trainer._build_model(a, store.layout, torch.device("cpu"), fsdp=False)
    ids, labels, cu = pack([store[i] for i in batch], 600)
    with torch.no_grad():
        loss, z = model.loss(ids, labels, cu_seqlens=cu)
    assert logged["loss"] == pytest.approx(float(loss), rel=1e-5)
    assert logged["z"] == pytest.approx(float(z), rel=1e-5)
    assert logged["tokens"] == int(store.lengths[batch].sum())


def test_micro_batches_whose_labels_all_weigh_zero_add_their_z_loss_alone(store_dir, tmp_path, monkeypatch):
    """A micro-batch whose labelled classes all weigh 0 (here every world-model label: the class weights are
    zeroed for them) had a loss of 0 / 0 = NaN, and the step's loss and gradients were NaN. Its CE term is now
    0, its z-loss counts with its share of the labelled rows, and the logged loss is still model.loss over the
    whole batch."""
    store = TokenStore(store_dir)
    cw = torch.ones(store.layout.vocab_size)
    for i in range(len(store)):
        ids, lab, kind = store[i]
        if kind == "world":
            cw[lab[lab != -100]] = 0.0
    monkeypatch.setattr(worldvla.model, "loss_class_weights", lambda layout, alpha, release=False: cw.clone())
    a = args_for(store_dir, tmp_path / "run", "--steps", 2, "--batch-tokens", 600, "--micro-tokens", 140,
                 "--z-weight", 1e-2, "--no-export", "--save-every", 2)
    batch = trainer.epoch_batches(store.lengths, 600, seed=3, epoch=0)[0]
    micro = trainer._micro_batches(store, [b[0] for b in trainer.split_batch(batch, store.lengths, 1, 140)], 140,
                                   store.layout.pad, store.layout.bos)
    stats = [trainer._label_stats(lab, cw) for _, lab, _ in micro]
    assert any(w == 0 and n > 0 for w, n in stats) and any(w > 0 for w, n in stats)
    model = trainer._build_model(a, store.layout, torch.device("cpu"), fsdp=False)
    ids, labels, cu = pack([store[i] for i in batch], 600)
    with torch.no_grad():
        want, z = model.loss(ids, labels, cu_seqlens=cu, class_weight=cw, z_weight=1e-2)
    trainer.train(a)
    logged = read_log(a.out)
    assert logged[0]["loss"] == pytest.approx(float(want), rel=1e-5)
    assert logged[0]["z"] == pytest.approx(float(z), rel=1e-5)
    assert all(np.isfinite(r["loss"]) for r in logged)
    assert all(torch.isfinite(v).all() for v in final_weights(a.out).values())


def test_micro_batch_loss_is_the_model_loss_and_checks_the_ids(store_dir, tmp_path):
    """The micro-step `worldvla train` and benchmarks.train run (labelled rows, mask metadata and the ids'
    range check found on the host) gives model.loss over every row of the packed batch, and refuses ids
    outside the layout although the model's own check is skipped."""
    store = TokenStore(store_dir)
    model = trainer._build_model(args_for(store_dir, tmp_path), store.layout, torch.device("cpu"), fsdp=False)
    ids, labels, cu = pack([store[i] for i in range(len(store))], int(store.lengths.sum()))
    cw = loss_class_weights(store.layout, 0.3)
    got = trainer.micro_batch_loss(model, store.layout, ids, labels, cu, torch.device("cpu"), class_weight=cw,
                                   z_weight=1e-2)
    want = model.loss(ids, labels, cu_seqlens=cu, class_weight=cw, z_weight=1e-2)
    torch.testing.assert_close(got, want)
    bad = ids.clone()
    bad[-1] = store.layout.vocab_size
    with pytest.raises(ValueError, match="token ids out of range"):
        trainer.micro_batch_loss(model, store.layout, bad, labels, cu, torch.device("cpu"), class_weight=cw)


def test_cpu_training_tunes_malloc_unless_told_not_to(store_dir, tmp_path, monkeypatch):
    from worldvla.inference import malloc

    calls = []
    monkeypatch.setattr(malloc, "tune_cpu_malloc", lambda **kw: calls.append(kw))
    trainer.train(args_for(store_dir, tmp_path / "a", "--steps", 1, "--batch-tokens", 600, "--no-export"))
    assert calls == [{"mmap": False}]
    trainer.train(args_for(store_dir, tmp_path / "b", "--steps", 1, "--batch-tokens", 600, "--no-export",
                           "--no-malloc-tuning"))
    assert calls == [{"mmap": False}]


def test_micro_batching_does_not_change_training(store_dir, tmp_path):
    """One packed sequence per step == 5 accumulated micro-batches with activation checkpointing."""
    one = trainer.train(args_for(store_dir, tmp_path / "one", "--steps", 3, "--batch-tokens", 600, "--no-export"))
    acc = trainer.train(args_for(store_dir, tmp_path / "acc", "--steps", 3, "--batch-tokens", 600,
                                 "--micro-tokens", 140, "--grad-checkpointing", "--no-export"))
    np.testing.assert_allclose(acc["losses"], one["losses"], rtol=2e-5)
    w1, w2 = final_weights(tmp_path / "one"), final_weights(tmp_path / "acc")
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-4)  # Adam: ~5% of one lr step


def test_resume_continues_exactly(store_dir, tmp_path):
    """N steps straight == k steps, stop, resume, N - k steps: same losses, same final weights (fp32, CPU),
    with dropout on (RNG states restored) and an epoch boundary crossed."""
    common = ["--steps", 9, "--batch-tokens", 600, "--micro-tokens", 270, "--dropout", 0.1, "--no-export"]
    straight = trainer.train(args_for(store_dir, tmp_path / "a", *common))
    first = trainer.train(args_for(store_dir, tmp_path / "b", *common, "--stop-after", 3))
    assert first["step"] == 3
    rest = trainer.train(args_for(store_dir, tmp_path / "b", *common, "--resume"))
    assert first["losses"] + rest["losses"] == straight["losses"]
    assert [r["step"] for r in read_log(tmp_path / "b")] == list(range(1, 10))
    epochs = {r["epoch"] for r in read_log(tmp_path / "a")}
    assert len(epochs) > 1, "the run should cross an epoch boundary"
    wa, wb = final_weights(tmp_path / "a"), final_weights(tmp_path / "b")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def _sigterm_in_step(n, rank=None):
    """trainer.split_batch (called once a step) that sends SIGTERM to this process during step n (on `rank`
    alone, when given)."""
    import os
    import signal

    real, calls = trainer.split_batch, []

    def split(*a, **kw):
        calls.append(1)
        if len(calls) == n and (rank is None or dist_utils.rank() == rank):
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*a, **kw)

    return split


def test_stop_signal_hands_back_the_handler_it_replaced():
    """signal.signal reads a handler set outside Python as None: restore() then left the trainer's handler in place
    after training. It now puts back the earlier handler, or the default one."""
    import signal

    from worldvla.train.checkpointing import StopSignal

    before = signal.getsignal(signal.SIGTERM)
    try:
        mine = lambda signum, frame: None  # noqa: E731
        signal.signal(signal.SIGTERM, mine)
        s = StopSignal()
        assert signal.getsignal(signal.SIGTERM) == s._note
        s.restore()
        assert signal.getsignal(signal.SIGTERM) is mine
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        s = StopSignal()
        s._before = None  # as a handler installed from C reads back
        s.restore()
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    finally:
        signal.signal(signal.SIGTERM, before)


def test_sigterm_saves_the_step_and_resume_continues_exactly(store_dir, tmp_path, monkeypatch, capsys):
    """SIGTERM (a scheduler's preemption) ended the run where it stood, losing every step since the last
    --save-every. The step under way now finishes, is saved, and the run ends with SIGTERM's status and the
    way on; --resume then continues as if nothing had happened."""
    import signal

    common = ["--steps", 6, "--batch-tokens", 600, "--micro-tokens", 270, "--dropout", 0.1, "--no-export"]
    straight = trainer.train(args_for(store_dir, tmp_path / "a", *common))
    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(trainer, "split_batch", _sigterm_in_step(3))
    rc = trainer.run(args_for(store_dir, tmp_path / "b", *common))
    assert rc == 128 + signal.SIGTERM and signal.getsignal(signal.SIGTERM) is before
    assert latest_checkpoint(tmp_path / "b").name == "step_00000003"
    assert [r["step"] for r in read_log(tmp_path / "b")] == [1, 2, 3]
    assert "stopped by SIGTERM after step 3, checkpoint step_00000003 saved; add --resume" in capsys.readouterr().err
    # The way on follows the command, as a Ctrl-C's does: --overwrite cannot take --resume beside it (it said
    # "add --resume" there too), and a resumed run goes on with the same command.
    monkeypatch.undo()
    monkeypatch.setattr(trainer, "split_batch", _sigterm_in_step(3))
    rc = trainer.run(args_for(store_dir, tmp_path / "b2", *common, "--overwrite"))
    assert rc == 128 + signal.SIGTERM
    assert "saved; run the same command with --resume instead of --overwrite" in capsys.readouterr().err
    monkeypatch.undo()
    monkeypatch.setattr(trainer, "split_batch", _sigterm_in_step(1))  # the resumed run's first step, step 4
    assert trainer.run(args_for(store_dir, tmp_path / "b2", *common, "--resume")) == 128 + signal.SIGTERM
    assert "step_00000004 saved; run the same command again to continue" in capsys.readouterr().err
    monkeypatch.undo()
    rest = trainer.train(args_for(store_dir, tmp_path / "b", *common, "--resume"))
    assert [r["loss"] for r in read_log(tmp_path / "b")] == straight["losses"] and len(rest["losses"]) == 3
    wa, wb = final_weights(tmp_path / "a"), final_weights(tmp_path / "b")
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def test_stop_after_and_resume_save_each_step_once_and_never_overshoot(store_dir, tmp_path, monkeypatch):
    """--stop-after at a --save-every multiple saves that step once (a second save of it replaced the
    folder in place); a resume at or past --stop-after trains and saves nothing; a log line cut short by
    a crash is dropped on resume; the same step saved again replaces the folder whole."""
    saves = []
    real = trainer.save_checkpoint
    monkeypatch.setattr(trainer, "save_checkpoint",
                        lambda out, step, *a, **k: saves.append(step) or real(out, step, *a, **k))
    out = tmp_path / "run"
    common = ["--steps", 6, "--batch-tokens", 300, "--save-every", 2, "--keep-last", 0, "--no-export"]
    first = trainer.train(args_for(store_dir, out, *common, "--stop-after", 4))
    assert first["step"] == 4 and saves == [2, 4]
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 1.2')  # a crash in the middle of a line
    again = trainer.train(args_for(store_dir, out, *common, "--stop-after", 2, "--resume"))
    assert again["step"] == 4 and again["losses"] == [] and saves == [2, 4]
    assert again["checkpoint"] == str(out / "checkpoints" / "step_00000004")
    assert [r["step"] for r in read_log(out)] == [1, 2, 3, 4]
    rest = trainer.train(args_for(store_dir, out, *common, "--resume"))
    assert rest["step"] == 6 and saves == [2, 4, 6] and [r["step"] for r in read_log(out)] == list(range(1, 7))

    from worldvla.train.checkpointing import save_checkpoint
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    save_checkpoint(tmp_path / "same", 5, model, opt, {"mark": 1})
    with torch.no_grad():
        model.weight += 1.0
    again = save_checkpoint(tmp_path / "same", 5, model, opt, {"mark": 2})
    assert json.loads((again / "state.json").read_text())["mark"] == 2
    assert torch.equal(torch.load(again / "model.pt", weights_only=True)["weight"], model.weight)
    assert sorted(p.name for p in (tmp_path / "same" / "checkpoints").iterdir()) == ["latest", "step_00000005"]
    # Folders of saves killed at other steps (a full model and optimizer each) were left for good: the next
    # save removes them once its checkpoint is in.
    for stale in (".tmp-step_00000003", ".old-step_00000004"):
        (tmp_path / "same" / "checkpoints" / stale).mkdir()
        (tmp_path / "same" / "checkpoints" / stale / "model.pt").write_bytes(b"half")
    save_checkpoint(tmp_path / "same", 6, model, opt, {"mark": 3})
    assert sorted(p.name for p in (tmp_path / "same" / "checkpoints").iterdir()) == \
        ["latest", "step_00000005", "step_00000006"]


class _Killed(BaseException):
    """A process killed where it stood: nothing after the raise runs, no handler of the code under test catches it."""


def test_a_step_saved_again_has_a_complete_copy_at_every_moment(tmp_path, monkeypatch):
    """A step saved again never leaves the run without that step: where the old and new folders can exchange names
    in one step its name is never free, and where they cannot (two renames), a kill between the renames leaves the
    older copy set aside, which the run's next resume finds (it was the only checkpoint) and its next save puts back
    at its name."""
    import os

    from worldvla.train import checkpointing as ckm

    def pair(seed):
        torch.manual_seed(seed)
        model = torch.nn.Linear(3, 2)
        return model, torch.optim.AdamW(model.parameters())

    model, opt = pair(0)
    first = model.weight.detach().clone()
    ckm.save_checkpoint(tmp_path / "one", 5, model, opt, {"mark": 1}, keep_last=1)
    real_replace = os.replace
    freed = []
    monkeypatch.setattr(os, "replace", lambda src, dst: freed.append(Path(src).name) or real_replace(src, dst))
    with torch.no_grad():
        model.weight += 1.0
    ckm.save_checkpoint(tmp_path / "one", 5, model, opt, {"mark": 2}, keep_last=1)
    assert "step_00000005" not in freed  # the names were exchanged, the step's never free
    assert ckm.read_state(latest_checkpoint(tmp_path / "one"))["mark"] == 2

    # A file system that cannot exchange names: killed between the renames.
    def killed_at_second(src, dst):
        if Path(src).name == ".tmp-step_00000005":
            raise _Killed
        return real_replace(src, dst)

    run = tmp_path / "two"
    model, opt = pair(0)
    ckm.save_checkpoint(run, 5, model, opt, {"mark": 1}, keep_last=1)
    monkeypatch.setattr(ckm, "exchange_names", lambda a, b: False)
    monkeypatch.setattr(os, "replace", killed_at_second)
    with torch.no_grad():
        model.weight += 1.0
    with pytest.raises(_Killed):
        ckm.save_checkpoint(run, 5, model, opt, {"mark": 2}, keep_last=1)
    monkeypatch.setattr(os, "replace", real_replace)
    assert not (run / "checkpoints" / "step_00000005").exists()  # the name is free: the older copy is aside
    found = latest_checkpoint(run)
    assert found is not None and ckm.read_state(found)["mark"] == 1
    assert ckm.has_checkpoints(run)
    with pytest.raises(FileExistsError, match="already holds checkpoints"):  # not taken for an empty run folder
        ckm.check_run_dir(run, resume=False, overwrite=False)
    resumed, resumed_opt = pair(1)
    assert ckm.load_checkpoint(run, resumed, resumed_opt)["mark"] == 1
    assert torch.equal(resumed.weight, first)
    ckm.save_checkpoint(run, 6, resumed, resumed_opt, {"mark": 3}, keep_last=0)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step_00000005", "step_00000006"]
    assert ckm.read_state(run / "checkpoints" / "step_00000005")["mark"] == 1
    assert latest_checkpoint(run).name == "step_00000006"


@pytest.mark.parametrize("change", [("--lr", 1e-3), ("--steps", 8), ("--batch-tokens", 400), ("--config", "small"),
                                    ("--weight-decay", 0.0), ("--dropout", 0.1), ("--alpha", 0.5), ("--z-weight", 0.0),
                                    ("--grad-clip", 1.0)])
def test_resume_refuses_other_settings_naming_them(store_dir, tmp_path, change, monkeypatch):
    """The schedule (restored from the checkpoint), the data order (a position in it), the model and the loss
    must be the run's own: another value is refused by name instead of being ignored or mixing runs, and before
    the model is built (minutes for a 7B one)."""
    common = {"--steps": 4, "--batch-tokens": 300, "--lr": 2e-3, "--config": "tiny", "--weight-decay": 0.1,
              "--dropout": 0.0, "--alpha": 0.04, "--z-weight": 1e-5, "--grad-clip": 4.0}
    flat = [x for kv in common.items() for x in kv]
    trainer.train(args_for(store_dir, tmp_path / "r", *flat, "--stop-after", 1, "--no-export"))
    name, value = change
    other = [x for kv in {**common, name: value}.items() for x in kv]

    def no_build(*a, **k):
        raise AssertionError("the model was built before the settings were checked")

    monkeypatch.setattr(trainer, "_build_model", no_build)
    with pytest.raises(ValueError, match=f"started with {name} {common[name]}, not {name} {value}"):
        trainer.train(args_for(store_dir, tmp_path / "r", *other, "--resume", "--no-export"))


def test_resume_refuses_another_store_naming_it_and_old_checkpoints_still_resume(store_dir, tmp_path, monkeypatch):
    """A resume on another token store continued the old run's position and learning-rate schedule (its total
    steps) on the new store's batches, silently. The store's fingerprint and the run's total are recorded with its
    settings and compared before the model is built; a checkpoint written before they were recorded resumes."""
    other = make_store(tmp_path / "other", seed=1, lengths=(5, 9))
    common = ("--epochs", 2, "--batch-tokens", 300, "--no-export")
    out = tmp_path / "run"
    trainer.train(args_for(store_dir, out, *common, "--stop-after", 1))
    build = trainer._build_model
    monkeypatch.setattr(trainer, "_build_model", lambda *a, **k: pytest.fail("the model was built before the check"))
    with pytest.raises(ValueError, match=r"started on other data \(store fingerprint .*; total steps .*Resume with "
                                         rf"--store {store_dir}, the token store it was started on.*--overwrite"):
        trainer.train(args_for(other, out, *common, "--resume"))
    monkeypatch.setattr(trainer, "_build_model", build)
    state_file = latest_checkpoint(out) / "state.json"
    state = json.loads(state_file.read_text())
    assert state["args"]["store_fingerprint"] == TokenStore(store_dir).manifest["fingerprint"]
    assert state["args"]["store_content"] == trainer._store_digest(TokenStore(store_dir).manifest)
    assert state["args"]["total_steps"] == trainer.train(args_for(store_dir, tmp_path / "whole", *common))["step"]
    for key in ("store_fingerprint", "store_content", "total_steps"):  # as written before they were recorded
        del state["args"][key]
    state_file.write_text(json.dumps(state))
    assert trainer.train(args_for(store_dir, out, *common, "--resume", "--stop-after", 2))["step"] == 2


def test_resume_refuses_a_store_rebuilt_from_other_demos_of_the_same_sizes(tmp_path):
    """The store's fingerprint covers its settings, VQGAN and its inputs' names and sizes, not their content: a
    store rebuilt in place from other demos of the same shapes, or with another --instruction, kept it, and a
    resume trained on the other tokens from the old run's position, silently. The shards' digests that the
    manifest holds are recorded with the run and compared too."""
    root = tmp_path / "data"
    store = make_store(root)
    out = tmp_path / "run"
    common = ("--steps", 3, "--batch-tokens", 300, "--no-export")
    trainer.train(args_for(store, out, *common, "--stop-after", 1))
    fingerprint = TokenStore(store).manifest["fingerprint"]
    for rebuild in ({"demo_seed": 7}, {"instruction": "a much longer instruction than any of the demo files'"}):
        make_store(root, overwrite=True, **rebuild)
        assert TokenStore(store).manifest["fingerprint"] == fingerprint
        with pytest.raises(ValueError, match=r"started on other data \(store content [0-9a-f]{12}\.\.\., not .*\. The "
                                             rf"token store {store} was rebuilt since the run started"):
            trainer.train(args_for(store, out, *common, "--resume"))
    make_store(root, overwrite=True)  # the demos it was started on: it resumes
    assert trainer.train(args_for(store, out, *common, "--resume"))["step"] == 3


def test_resume_compares_settings_as_they_act_on_the_run(store_dir, tmp_path):
    """--kinds '' (every kind) and --kinds world,action, --min-lr's default and --lr / 10 given, another --epochs
    under --steps (unused) were refused as other settings on a resume; they select the same samples and schedule,
    and the run continues exactly under them. A setting that acts otherwise is still refused."""
    common = ["--steps", 4, "--batch-tokens", 300, "--dropout", 0.1, "--no-export"]
    straight = trainer.train(args_for(store_dir, tmp_path / "a", *common))
    out = tmp_path / "b"
    first = trainer.train(args_for(store_dir, out, *common, "--stop-after", 2))
    for same in (("--kinds", "world, action"), ("--min-lr", 2e-4), ("--epochs", 5)):
        assert trainer.train(args_for(store_dir, out, *common, *same, "--resume", "--stop-after", 2))["step"] == 2
    for other, was in ((("--kinds", "action"), "--kinds "), (("--min-lr", 1e-4), "--min-lr None")):
        with pytest.raises(ValueError, match=f"started with {was}, not {' '.join(map(str, other))};"):
            trainer.train(args_for(store_dir, out, *common, *other, "--resume"))
    rest = trainer.train(args_for(store_dir, out, *common, "--kinds", "world,action", "--min-lr", 2e-4, "--epochs", 3,
                                  "--resume"))
    assert first["losses"] + rest["losses"] == straight["losses"]
    wa, wb = final_weights(tmp_path / "a"), final_weights(out)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    const = ("--steps", 2, "--batch-tokens", 300, "--schedule", "constant", "--no-export")  # no floor to reach
    trainer.train(args_for(store_dir, tmp_path / "c", *const, "--min-lr", 1e-4, "--stop-after", 1))
    assert trainer.train(args_for(store_dir, tmp_path / "c", *const, "--resume"))["step"] == 2


def test_a_damaged_state_json_is_refused_naming_it_and_the_older_checkpoints(store_dir, tmp_path):
    """A state.json cut short failed a resume with a bare JSONDecodeError ("Expecting value: line 1 column 21");
    now it names the file and the older checkpoints to resume from."""
    out = tmp_path / "run"
    common = ("--steps", 3, "--batch-tokens", 300, "--save-every", 1, "--keep-last", 0, "--no-export")
    trainer.train(args_for(store_dir, out, *common, "--stop-after", 2))
    ck = latest_checkpoint(out)
    (ck / "state.json").write_text('{"step": 2, "args": ')
    with pytest.raises(ValueError, match=rf"{ck / 'state.json'}: the checkpoint file cannot be read \(JSONDecodeError"
                                         r".*damaged or cut short; resume from an older checkpoint of the run: "
                                         r"step_00000001 \(remove .*step_00000002, and --resume continues from "
                                         r"step_00000001\)"):
        trainer.train(args_for(store_dir, out, *common, "--resume"))


def test_a_resume_at_a_larger_world_size_warns_that_rng_states_start_fresh(tmp_path, monkeypatch, capsys):
    """A world-size-1 checkpoint resumed by 2 ranks: rank 1 lacks its RNG file, but only rank 0 printed, and only
    about its own file, so no warning came. Rank 0 now looks for every rank's file."""
    from worldvla.train import checkpointing
    from worldvla.train.checkpointing import save_checkpoint

    model = torch.nn.Linear(3, 2)
    ck = save_checkpoint(tmp_path, 1, model, torch.optim.AdamW(model.parameters()), {})
    load_checkpoint(ck, model)
    assert "warning" not in capsys.readouterr().out
    monkeypatch.setattr(checkpointing.dist_utils, "world_size", lambda: 2)  # as rank 0 of two
    load_checkpoint(ck, model)
    assert "warning: rng_rank1.pt missing (saved by 1 rank(s), resumed by 2)" in capsys.readouterr().out
    assert checkpointing.missing_rng_files(ck, 3) == ["rng_rank1.pt", "rng_rank2.pt"]


def test_cli_run_exports_and_action_only(store_dir, tmp_path, capsys):
    import shlex

    out = tmp_path / "my run"  # the next line quotes it for the shell
    a = args_for(store_dir, out, "--steps", 2, "--batch-tokens", 300, "--kinds", "action")
    assert trainer.run(a) == 0
    exported = out / "policy" if (out / "policy").exists() else out / "model"
    if exported.name == "policy":
        assert f"next: worldvla eval --policy {shlex.quote(str(exported))} --tasks <tasks>" in capsys.readouterr().out
        from worldvla.inference import WorldVLAPolicy

        from worldvla.eval.metaworld import action_only

        pol = WorldVLAPolicy.from_pretrained(exported)
        assert pol.chunk_size == 3 and pol.action_dim == 4
        assert pol.extra["kinds"] == ["action"] and action_only(pol)  # an evaluation says what its scores are
        inputs = TokenStore(store_dir).manifest["inputs"]
        assert pol.extra["instructions"] == sorted({i["instruction"] for i in inputs}) != []
        model_dir = exported / "model"
    else:
        model_dir = exported
    m = WorldVLA.from_pretrained(model_dir)
    w = final_weights(out)
    for k, v in m.state_dict().items():
        assert torch.equal(v, w[k]), k
    assert read_log(out)[-1]["samples"] > 0
    with pytest.raises(ValueError, match="kinds"):
        trainer.train(args_for(store_dir, tmp_path / "bad", "--steps", 1, "--kinds", "actions"))


def test_causal_attention_ablation_trains_and_exports_a_causal_policy(store_dir, tmp_path):
    """--attention causal trains under plain causal attention (different losses from the chunk mask
    on the same data and init) and exports a policy that decodes its chunks causally."""
    common = ("--steps", 2, "--batch-tokens", 300, "--kinds", "action")
    chunk = trainer.train(args_for(store_dir, tmp_path / "chunk", *common, "--no-export"))
    causal = trainer.train(args_for(store_dir, tmp_path / "causal", *common, "--attention", "causal"))
    assert chunk["losses"][0] != causal["losses"][0]  # chunk of 3 actions: the masks differ
    exported = Path(causal["export"])
    if exported.name == "policy":
        from worldvla.inference import WorldVLAPolicy

        pol = WorldVLAPolicy.from_pretrained(exported)
        assert pol.model.config.attention == "causal" and pol.mode == "causal"
        with pytest.raises(ValueError, match="causal"):
            WorldVLAPolicy.from_pretrained(exported, mode="parallel")
    else:
        assert WorldVLA.from_pretrained(exported).config.attention == "causal"


def test_bad_arguments_fail_clearly(store_dir, tmp_path):
    with pytest.raises(ValueError, match="micro-tokens"):
        trainer.train(args_for(store_dir, tmp_path / "x", "--steps", 1, "--batch-tokens", 200,
                               "--micro-tokens", 400))
    with pytest.raises(ValueError, match="chameleon"):
        trainer.train(args_for(store_dir, tmp_path / "y", "--steps", 1, "--config", "chameleon_7b"))
    with pytest.raises(ValueError, match="batch-tokens"):
        trainer.train(args_for(store_dir, tmp_path / "z", "--steps", 1, "--batch-tokens", 20))


def test_min_lr_above_lr_is_refused_naming_both(store_dir, tmp_path):
    """`--lr 0.001 --min-lr 1` trained with a "decay" that raised the learning rate to 1."""
    with pytest.raises(ValueError, match=r"--min-lr 1\.0 is above --lr 0\.001.*at most --lr"):
        trainer.train(args_for(store_dir, tmp_path / "x", "--steps", 2, "--lr", 1e-3, "--min-lr", 1))
    assert not (tmp_path / "x").exists()  # refused before anything is written
    s = trainer.train(args_for(store_dir, tmp_path / "y", "--steps", 2, "--lr", 1e-3, "--min-lr", 1e-3,
                               "--no-export"))
    assert s["step"] == 2  # a floor equal to --lr: a constant rate


def test_a_gpu_that_is_not_there_is_refused_by_name(store_dir, tmp_path, monkeypatch):
    """--device cuda where torch sees no GPU: a one-line error naming it (it had been a ZeroDivisionError
    from the local-rank arithmetic); both trainers start through distributed.init."""
    from worldvla.train import distributed

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="sees no CUDA GPU"):
        distributed.init("cuda")
    with pytest.raises(ValueError, match="sees no CUDA GPU"):
        trainer.train(args_for(store_dir, tmp_path / "g", "--steps", 1, "--device", "cuda"))


def test_fresh_run_refuses_a_folder_with_checkpoints_and_overwrite_starts_over(store_dir, tmp_path, capsys):
    """A run without --resume into a folder of an earlier run is refused (it used to prune its own new
    checkpoint and leave `latest` dangling); --overwrite deletes the old run and starts over."""
    from worldvla.cli import main

    out = tmp_path / "run"
    common = ("--batch-tokens", 300, "--kinds", "action", "--save-every", 1, "--keep-last", 2)
    trainer.train(args_for(store_dir, out, "--steps", 3, *common))
    with pytest.raises(FileExistsError, match="--resume.*--overwrite"):
        trainer.train(args_for(store_dir, out, "--steps", 1, *common, "--no-export"))
    assert main(["train", "--store", str(store_dir), "--out", str(out), "--steps", "1", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("worldvla train: error:") and "--resume" in err and "Traceback" not in err
    assert latest_checkpoint(out).name == "step_00000003"  # nothing was touched

    s = trainer.train(args_for(store_dir, out, "--steps", 1, *common, "--no-export", "--overwrite"))
    assert s["step"] == 1 and latest_checkpoint(out).name == "step_00000001"
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == ["step_00000001"]
    assert not (out / "policy").exists() and not (out / "model").exists()  # the old run's export went too
    assert [r["step"] for r in read_log(out)] == [1]


def test_a_checkpoint_is_on_the_disk_before_its_name(tmp_path, monkeypatch):
    """Every file of a checkpoint, its folder, the folder it is renamed into and the `latest` pointer are
    flushed (fsync) before the next step names them: a power loss cannot leave a named, empty checkpoint."""
    import os

    from worldvla.train.checkpointing import save_checkpoint

    flushed = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: flushed.append(os.readlink(f"/proc/self/fd/{fd}")) or real(fd))
    model = torch.nn.Linear(3, 2)
    final = save_checkpoint(tmp_path, 7, model, torch.optim.AdamW(model.parameters()), {})
    names = [os.path.basename(p) for p in flushed]
    for f in ("model.pt", "optim.pt", "state.json", "rng_rank0.pt", ".tmp-step_00000007", "checkpoints"):
        assert f in names, (f, names)
    assert names.index("state.json") < names.index(".tmp-step_00000007") < names.index("checkpoints")
    assert any(n.startswith(".latest.") for n in names) and (final / "state.json").is_file()
    assert latest_checkpoint(tmp_path) == final


def test_pruning_never_removes_the_checkpoint_just_written(tmp_path):
    from worldvla.train.checkpointing import save_checkpoint

    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    save_checkpoint(tmp_path, 900, model, opt, {}, keep_last=1)  # a later step of an abandoned run
    for step, keep in ((3, 1), (5, 2), (7, 2)):
        written = save_checkpoint(tmp_path, step, model, opt, {}, keep_last=keep)
        assert written.is_dir() and latest_checkpoint(tmp_path) == written
    # Older ones beyond --keep-last are pruned; newer ones are never touched.
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*")) == \
        ["step_00000005", "step_00000007", "step_00000900"]


def test_a_save_removes_the_temporary_pointer_files_of_saves_killed_while_writing_latest(tmp_path):
    """A save killed while it replaced `latest` (after its checkpoint was renamed in) left a hidden
    temporary file beside the checkpoints, and the later saves of the resumed run kept it for good."""
    import subprocess
    import sys

    from worldvla.train.checkpointing import save_checkpoint

    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    root = tmp_path / "checkpoints"
    save_checkpoint(tmp_path, 3, model, opt, {})
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)
    (root / f".latest.tmp-{dead}-0123456789ab").write_text("")  # what the killed pointer write left
    (root / ".tmp-step_00000005").mkdir()  # and a save killed before its rename
    written = save_checkpoint(tmp_path, 6, model, opt, {})
    assert latest_checkpoint(tmp_path) == written
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000003", "step_00000006"]


def test_a_crash_before_the_latest_pointer_is_written_resumes_from_the_new_checkpoint(tmp_path, monkeypatch):
    """The checkpoint is renamed into place, then `latest` is written: a crash between the two resumed from the
    previous checkpoint (the steps in between redone). The new one names its predecessor and is found; a later
    step that does not follow the pointer's checkpoint (another run's) is still not taken."""
    from worldvla.train import checkpointing

    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    stray = checkpointing.save_checkpoint(tmp_path, 900, model, opt, {})  # another run's later step
    root = tmp_path / "checkpoints"
    (root / "latest").unlink()
    first = checkpointing.save_checkpoint(tmp_path, 3, model, opt, {})
    assert checkpointing.latest_checkpoint(tmp_path) == first
    assert json.loads((first / "state.json").read_text())["follows"] == stray.name  # no pointer: the highest

    def crash(path, text):
        raise KeyboardInterrupt  # the power goes out before the pointer is replaced

    monkeypatch.setattr(checkpointing, "write_text_atomic", crash)
    with pytest.raises(KeyboardInterrupt):
        checkpointing.save_checkpoint(tmp_path, 5, model, opt, {})
    assert (root / "latest").read_text().strip() == first.name and (root / "step_00000005").is_dir()
    assert checkpointing.latest_checkpoint(tmp_path) == root / "step_00000005"
    with pytest.raises(KeyboardInterrupt):
        checkpointing.save_checkpoint(tmp_path, 7, model, opt, {})  # crashed the same way again: a chain
    assert checkpointing.latest_checkpoint(tmp_path) == root / "step_00000007"
    monkeypatch.undo()
    (root / "step_00000007" / "state.json").write_text("{damaged")  # an unreadable link ends the chain
    assert checkpointing.latest_checkpoint(tmp_path) == root / "step_00000005"
    assert stray.is_dir()


@pytest.mark.parametrize("option,value", [("--log-every", "0"), ("--steps", "-1"), ("--epochs", "0"),
                                          ("--batch-tokens", "0"), ("--keep-last", "-2"), ("--warmup", "-1")])
def test_cli_refuses_bad_counts_naming_the_option(option, value, tmp_path, capsys):
    from worldvla.cli import main

    with pytest.raises(SystemExit) as e:
        main(["train", "--store", str(tmp_path), "--out", str(tmp_path / "o"), option, value])
    assert e.value.code == 2
    assert f"argument {option}: must be >= " in capsys.readouterr().err


@pytest.mark.parametrize("option,value", [
    ("--alpha", "nan"), ("--z-weight", "inf"), ("--min-lr", "nan"), ("--grad-clip", "-1"), ("--grad-clip", "nan"),
    ("--eps", "nan"), ("--init-std", "inf"), ("--lr", "nan"), ("--lr", "-0.001"), ("--beta1", "nan"),
    ("--beta2", "inf"), ("--weight-decay", "nan"), ("--warmup", "inf"), ("--dropout", "nan"), ("--dropout", "1.5"),
    ("--eps", "0")])
def test_cli_refuses_non_finite_and_out_of_range_floats_naming_the_option(option, value, tmp_path, capsys):
    """`--alpha nan` trained to a loss of nan and exported it with exit 0; `--warmup inf` was an
    OverflowError traceback; a negative --grad-clip silently meant 'off'."""
    from worldvla.cli import main

    with pytest.raises(SystemExit) as e:
        main(["train", "--store", str(tmp_path), "--out", str(tmp_path / "o"), option, value])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}: " in err and value in err


def test_resume_settings_compare_nan_equal():
    """A run recorded with a nan setting (possible before nan was refused at parse time) resumes with it."""
    from argparse import Namespace

    from worldvla.train.checkpointing import check_resume_settings

    check_resume_settings({"lr": float("nan"), "steps": 4}, Namespace(lr=float("nan"), steps=4), ("lr", "steps"), "r")
    with pytest.raises(ValueError, match="--lr nan"):
        check_resume_settings({"lr": float("nan")}, Namespace(lr=1e-3), ("lr",), "r")


def test_an_unknown_device_name_is_refused_by_name(store_dir, tmp_path, capsys, monkeypatch):
    """`--device gpu` was torch's RuntimeError traceback."""
    from worldvla.cli import main

    with pytest.raises(ValueError, match="unknown device 'gpu' \\(--device\\)"):
        trainer.train(args_for(store_dir, tmp_path / "g", "--steps", 1, "--device", "gpu"))
    monkeypatch.delenv("WORLDVLA_TRACEBACK", raising=False)
    assert main(["train", "--store", str(store_dir), "--out", str(tmp_path / "g"), "--device", "gpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cpu, cuda or cuda:N" in err


def test_a_single_process_takes_the_gpu_its_device_names(monkeypatch):
    """`--device cuda:1` in a plain (not torchrun) launch trained on cuda:0: the index was replaced by the local
    rank, 0. A process group's ranks still take their local rank's GPU. (CUDA stood in: 2 devices.)"""
    picked = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", picked.append)
    for var in ("LOCAL_RANK", "WORLD_SIZE", "RANK"):
        monkeypatch.delenv(var, raising=False)
    assert dist_utils.init("cuda:1") == torch.device("cuda", 1)
    assert dist_utils.init("cuda") == torch.device("cuda", 0)
    monkeypatch.setenv("LOCAL_RANK", "1")  # torchrun's second local rank, whatever --device names
    assert dist_utils.init("cuda:0") == torch.device("cuda", 1)
    assert picked == [torch.device("cuda", i) for i in (1, 0, 1)]


def test_init_joins_the_group_torchrun_describes_and_only_once(monkeypatch):
    """Under torchrun (WORLD_SIZE > 1, no init_method) a CPU process joins by Gloo with the timeout asked for; a
    process already in a group does not join again; a plain launch joins none; an explicit init_method passes its
    rank and world size."""
    import datetime

    import torch.distributed as dist

    calls = []
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: calls.append(kw))
    for var in ("LOCAL_RANK", "WORLD_SIZE", "RANK"):
        monkeypatch.delenv(var, raising=False)
    assert dist_utils.init("cpu") == torch.device("cpu") and calls == []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert dist_utils.init("cpu", timeout_s=60) == torch.device("cpu")
    assert calls == [{"backend": "gloo", "timeout": datetime.timedelta(seconds=60)}]
    monkeypatch.setattr(dist_utils, "is_distributed", lambda: True)  # joined already
    dist_utils.init("cpu")
    assert len(calls) == 1
    monkeypatch.setattr(dist_utils, "is_distributed", lambda: False)
    monkeypatch.delenv("WORLD_SIZE")
    dist_utils.init("cpu", init_method="file:///tmp/pg", rank_=1, world=2)
    assert calls[1] == {"backend": "gloo", "timeout": datetime.timedelta(seconds=1800), "init_method": "file:///tmp/pg",
                        "rank": 1, "world_size": 2}


def test_tokens_per_second_leaves_out_the_checkpoint_saves(store_dir, tmp_path, monkeypatch):
    """A periodic save ran after the step's log line, so its time went into the next logged step's interval: the
    step after every save showed throughput collapsing (a 7B model's save takes minutes)."""
    save = trainer._save

    def slow_save(*args, **kwargs):
        time.sleep(1.0)
        return save(*args, **kwargs)

    monkeypatch.setattr(trainer, "_save", slow_save)
    out = tmp_path / "run"
    trainer.train(args_for(store_dir, out, "--steps", 4, "--batch-tokens", 300, "--save-every", 2, "--log-every", 1,
                           "--no-export"))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    step_s = {r["step"]: r["tokens"] for r in rows}
    assert sorted(step_s) == [1, 2, 3, 4]
    # the step after the save (3) would take over 1 s; a training step of this model takes milliseconds
    per_step = {r["step"]: (r["tokens"] - step_s.get(r["step"] - 1, 0)) / r["tokens_per_s"] for r in rows}
    assert per_step[3] < 0.5, per_step


def test_resume_with_overwrite_is_refused_by_name(store_dir, tmp_path):
    """--overwrite was silently ignored under --resume; the pair is refused before anything is touched."""
    out = tmp_path / "run"
    common = ("--steps", 2, "--batch-tokens", 300, "--kinds", "action", "--no-export")
    trainer.train(args_for(store_dir, out, *common, "--stop-after", 1))

    with pytest.raises(ValueError, match="--resume.*--overwrite.*not both"):  # by prepare_run_dir, before all else
        trainer.train(args_for(store_dir, out, *common, "--resume", "--overwrite"))
    assert latest_checkpoint(out).name == "step_00000001"  # nothing was touched


def test_resume_says_when_there_is_nothing_to_resume_or_the_run_had_finished(store_dir, tmp_path, capsys):
    out = tmp_path / "run"
    common = ("--steps", 2, "--batch-tokens", 300, "--kinds", "action")
    trainer.run(args_for(store_dir, out, *common, "--resume"))  # a user's --resume into an empty folder
    text = capsys.readouterr().out
    assert f"--resume: no checkpoint in {out / 'checkpoints'}; a new run starts in {out}" in text
    exported = Path(trainer.train(args_for(store_dir, out, *common, "--resume"))["export"])
    text = capsys.readouterr().out
    assert "at step 2 (epoch 0, batch 2): the run had already finished (2 steps)" in text and "exported again" in text
    assert exported.is_dir()
    assert trainer.run(args_for(store_dir, out, *common, "--resume")) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("step 2: no steps run;") and f"exported {exported} again" in last
    trainer.train(args_for(store_dir, out, *common, "--resume", "--no-export"))
    text = capsys.readouterr().out
    assert "had already finished" in text and "exported again" not in text


def test_cli_reports_bad_inputs_in_one_line_and_other_errors_with_traceback(tmp_path, capsys, monkeypatch):
    from worldvla.cli import main

    assert main(["train", "--store", str(tmp_path / "nothere"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("worldvla train: error:") and "not a token store" in err and "Traceback" not in err

    def bug(args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(trainer, "run", bug)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["train", "--store", str(tmp_path), "--out", str(tmp_path / "o")])


# ---------------------------------------------------------------------- FSDP2, two processes
FSDP_COMMON = ["--steps", 4, "--batch-tokens", 600, "--micro-tokens", 140]
FSDP_SMALL = ["--steps", 3, "--batch-tokens", 150]


def _fsdp_worker(rank, world, init_file, store, out):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        # Stop after step 2 (a full checkpoint gathered from the shards), then resume in a fresh
        # model and optimizer (the full state dict broadcast from rank 0 into the shards).
        first = trainer.train(args_for(store, out, *FSDP_COMMON, "--stop-after", 2, "--no-export"))
        assert first["step"] == 2
        trainer.train(args_for(store, out, *FSDP_COMMON, "--resume", "--no-export"))
        # Batches of one or two samples: a rank's micro-batch is often empty, and still joins the reduction.
        trainer.train(args_for(store, out + "-small", *FSDP_SMALL, "--no-export"))
        # Gradients reduce-scattered after every micro-step (shards kept) instead of the last one only.
        trainer.train(args_for(store, out + "-every", *FSDP_COMMON, "--reduce-every-micro-step", "--no-export"))
    finally:
        dist_utils.shutdown()


def _sigterm_after_saving(step_n, rank=None):
    """trainer.save_checkpoint that sends SIGTERM to this process once it has saved step `step_n` (on `rank`
    alone, when given): after the step's all-reduce, where the loop no longer read the flag."""
    import os
    import signal

    real = trainer.save_checkpoint

    def save(out, step, *a, **kw):
        path = real(out, step, *a, **kw)
        if step == step_n and (rank is None or dist_utils.rank() == rank):
            os.kill(os.getpid(), signal.SIGTERM)
        return path

    return save


def test_sigterm_during_the_last_step_or_its_save_stops_the_run_and_a_resume_finishes_at_once(
        store_dir, tmp_path, monkeypatch, capsys):
    """A SIGTERM during the last step or its final save was lost (the handler handed back, what it noted dropped):
    the run ended as finished, exit 0, and `worldvla demo` went on to its next stage. It now stops the run (exit
    143, the step saved, the export left to the resume), and the resume has nothing left to train: it exports
    and exits 0."""
    import signal

    common = ["--steps", 3, "--batch-tokens", 600, "--micro-tokens", 270]
    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(trainer, "split_batch", _sigterm_in_step(3))
    assert trainer.run(args_for(store_dir, tmp_path / "a", *common)) == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before
    err = capsys.readouterr().err
    assert "stopped by SIGTERM after step 3, the run's last, checkpoint step_00000003 saved" in err, err
    assert latest_checkpoint(tmp_path / "a").name == "step_00000003" and not (tmp_path / "a" / "policy").exists()
    monkeypatch.undo()
    assert trainer.run(args_for(store_dir, tmp_path / "a", *common, "--resume")) == 0
    out = capsys.readouterr().out
    assert "nothing is left to train" in out and "no steps run" in out
    assert (tmp_path / "a" / "policy" / "policy.json").is_file()

    monkeypatch.setattr(trainer, "save_checkpoint", _sigterm_after_saving(3))
    s = trainer.train(args_for(store_dir, tmp_path / "b", *common))
    assert s["stopped"] and s["step"] == 3 and s["export"] is None
    assert latest_checkpoint(tmp_path / "b").name == "step_00000003"


def test_sigterm_during_the_export_completes_it_and_stops_the_run(store_dir, tmp_path, monkeypatch, capsys):
    """A SIGTERM during the export is noted, not acted on at once, and not lost when the handler is handed back:
    the policy is written whole and the run ends stopped (exit 143, saying its step was the last)."""
    import os
    import signal

    real = trainer._export

    def export_then_sigterm(*a, **kw):
        path = real(*a, **kw)
        os.kill(os.getpid(), signal.SIGTERM)
        return path

    monkeypatch.setattr(trainer, "_export", export_then_sigterm)
    before = signal.getsignal(signal.SIGTERM)
    rc = trainer.run(args_for(store_dir, tmp_path / "a", "--steps", 2, "--batch-tokens", 300))
    assert rc == 128 + signal.SIGTERM and signal.getsignal(signal.SIGTERM) is before
    assert "stopped by SIGTERM after step 2, the run's last, checkpoint step_00000002 saved" in capsys.readouterr().err
    assert (tmp_path / "a" / "policy" / "policy.json").is_file()


def test_a_rank_0_failure_another_rank_learns_is_reported_in_one_line(store_dir, tmp_path, monkeypatch, capsys):
    """The other ranks end with rank 0's reason (`on_rank_0`): the command line reports it in one line, as a bad
    input's error, on those ranks too, not as a traceback."""
    from worldvla.cli import main

    def rank_0_failed(args):
        raise dist_utils.RankZeroFailed("rank 0 could not read the --init folder: no config.json")

    monkeypatch.delenv("WORLDVLA_TRACEBACK", raising=False)
    monkeypatch.setattr(trainer, "train", rank_0_failed)
    assert main(["train", "--store", str(store_dir), "--out", str(tmp_path / "a"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err == ("worldvla train: error: rank 0 could not read the --init folder: no config.json "
                   "(WORLDVLA_TRACEBACK=1 shows where)\n"), err


def _fsdp_sigterm_after_final_save_worker(rank, world, init_file, store, out):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        trainer.save_checkpoint = _sigterm_after_saving(4, rank=1)  # rank 1 alone, after the final save
        s = trainer.train(args_for(store, out, *FSDP_COMMON))
        assert s["stopped"] and s["step"] == 4 and s["export"] is None, s  # every rank: stopped, nothing exported
    finally:
        dist_utils.shutdown()


def _fsdp_sigterm_worker(rank, world, init_file, store, out):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        trainer.split_batch = _sigterm_in_step(2, rank=1)  # rank 1 alone, during step 2
        s = trainer.train(args_for(store, out, *FSDP_COMMON, "--no-export"))
        assert s["stopped"] and s["step"] == 2, s  # both ranks stop after the same step
    finally:
        dist_utils.shutdown()


def test_fsdp_two_processes_match_single_process_and_resume(store_dir, tmp_path):
    single = trainer.train(args_for(store_dir, tmp_path / "single", *FSDP_COMMON, "--no-export"))
    spawn(_fsdp_worker, 2, (str(tmp_path / "pg_init"), str(store_dir), str(tmp_path / "fsdp")))
    dist_losses = [r["loss"] for r in read_log(tmp_path / "fsdp")]
    assert len(dist_losses) == 4
    np.testing.assert_allclose(dist_losses, single["losses"], rtol=2e-5)
    # The gradients' scale too (Adam's steps hardly depend on it, so the weights below barely would show it).
    np.testing.assert_allclose([r["grad_norm"] for r in read_log(tmp_path / "fsdp")],
                               [r["grad_norm"] for r in read_log(tmp_path / "single")], rtol=1e-4)
    ws, wd = final_weights(tmp_path / "single"), final_weights(tmp_path / "fsdp")
    assert ws.keys() == wd.keys()
    for k in ws:
        torch.testing.assert_close(wd[k], ws[k], rtol=1e-4, atol=1e-4)  # Adam: ~5% of one lr step
    state = json.loads((latest_checkpoint(tmp_path / "fsdp") / "state.json").read_text())
    assert state["world_size"] == 2 and state["step"] == 4
    # The ranks' torch generators differ (each rank's dropout masks its own; both had been seeded alike).
    rng = [torch.load(latest_checkpoint(tmp_path / "fsdp") / f"rng_rank{r}.pt", weights_only=True)["torch"]
           for r in (0, 1)]
    assert not torch.equal(rng[0], rng[1])
    np.testing.assert_allclose([r["loss"] for r in read_log(tmp_path / "fsdp-every")], single["losses"], rtol=2e-5)
    we = final_weights(tmp_path / "fsdp-every")
    for k in ws:
        torch.testing.assert_close(we[k], ws[k], rtol=1e-4, atol=1e-4)
    small = trainer.train(args_for(store_dir, tmp_path / "single-small", *FSDP_SMALL, "--no-export"))
    np.testing.assert_allclose([r["loss"] for r in read_log(tmp_path / "fsdp-small")], small["losses"], rtol=2e-5)
    # A checkpoint written by two ranks loads into a single-process model and optimizer.
    a = args_for(store_dir, tmp_path / "fsdp")
    model = trainer._build_model(a, TokenStore(store_dir).layout, torch.device("cpu"), fsdp=False)
    opt = torch.optim.AdamW(model.parameters())
    st = load_checkpoint(tmp_path / "fsdp", model, opt, restore_rng_state=False)
    assert st["step"] == 4 and len(opt.state) == len(list(model.parameters()))
    for k, v in model.state_dict().items():
        assert torch.equal(v, wd[k])


def _fsdp_init_worker(rank, world, init_file, store, init, out):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        reads, real = [], WorldVLA.from_pretrained

        def counted(*a, **k):
            reads.append(a)
            return real(*a, **k)

        WorldVLA.from_pretrained = counted
        trainer.train(args_for(store, out, *FSDP_COMMON, "--init", init, "--no-export"))
        assert len(reads) == (1 if rank == 0 else 0), reads  # only rank 0 reads the --init folder
        # A resume builds the model from the config its checkpoint records: no rank reads --init, which may be gone.
        trainer.train(args_for(store, out + "-resumed", *FSDP_COMMON, "--init", init, "--stop-after", 2, "--no-export"))
        n = len(reads)
        trainer.train(args_for(store, out + "-resumed", *FSDP_COMMON, "--init", init + "-moved", "--resume",
                               "--no-export"))
        assert len(reads) == n, reads
        # A folder rank 0 refuses stops every rank with its reason (the others would wait for its config).
        want = ValueError if rank == 0 else dist_utils.RankZeroFailed  # each reported in one line by the CLI
        with pytest.raises(want, match="vocabulary entries") as refused:
            trainer.train(args_for(store, out + "-bad", *FSDP_COMMON, "--init", init + "-other-vocab", "--no-export"))
        # rank 0 raises its own error; the traceback goes here (its frames hold the group, whose threads must go)
        kind = type(refused.value)
        del refused
        assert (kind is dist_utils.RankZeroFailed) == (rank != 0), kind
        # A run that fails after sharding (last: it leaves the group). Its traceback's frames hold the model,
        # which holds the group: the group and its Gloo threads must still be gone once the command has
        # failed, not only when the traceback is let go (possibly in the interpreter's exit).
        def full_disk(*args, **kwargs):
            raise OSError(28, "No space left on device")

        trainer.save_checkpoint = full_disk
        with pytest.raises(OSError, match="No space left") as failed:
            trainer.run(args_for(store, out + "-failing", *FSDP_COMMON, "--no-export"))
        assert failed.value.__traceback__ is not None and not dist_utils.is_distributed()
        assert not gloo_threads(), gloo_threads()
    finally:
        dist_utils.shutdown()


def test_fsdp_sigterm_to_one_rank_stops_every_rank_after_the_same_step(store_dir, tmp_path):
    """A SIGTERM that reaches one rank only (torchrun passes its own to all, a hand's `kill` need not) stops
    every rank after the same step, with one checkpoint, which a resume continues."""
    spawn(_fsdp_sigterm_worker, 2, (str(tmp_path / "pg_init"), str(store_dir), str(tmp_path / "fsdp")))
    assert latest_checkpoint(tmp_path / "fsdp").name == "step_00000002"
    rest = trainer.train(args_for(store_dir, tmp_path / "fsdp", *FSDP_COMMON, "--resume", "--no-export"))
    assert rest["step"] == 4 and not rest["stopped"]


def test_fsdp_sigterm_to_one_rank_after_the_final_save_stops_every_rank(store_dir, tmp_path):
    """A SIGTERM that reaches one rank after the last step's all-reduce (here: after the final save) stops every
    rank alike: none exports, all report the run stopped."""
    spawn(_fsdp_sigterm_after_final_save_worker, 2, (str(tmp_path / "pg_init"), str(store_dir),
                                                      str(tmp_path / "fsdp")))
    assert latest_checkpoint(tmp_path / "fsdp").name == "step_00000004"
    assert not (tmp_path / "fsdp" / "policy").exists()


def test_fsdp_init_is_read_by_rank_0_alone_and_matches_a_single_process(store_dir, tmp_path):
    """Every rank read the whole --init model into host memory (eight 28 GB copies for a 7B model on an 8-GPU
    node). Rank 0 alone reads it now; the others take its config and get their shards by broadcast, and the
    run matches a single process's (here a release-layout checkpoint: its config travels too)."""
    from worldvla.model import ModelConfig
    from worldvla.tokens import VocabLayout

    layout = VocabLayout.from_dict(TokenStore(store_dir).manifest["layout"])
    init = WorldVLA(ModelConfig.tiny(layout, model_parallel_size=1)).init_weights(
        generator=torch.Generator().manual_seed(1))
    init.save_pretrained(tmp_path / "init")
    WorldVLA(ModelConfig.tiny(VocabLayout.compact(n_image_codes=layout.n_image_codes + 8))).save_pretrained(tmp_path / "init-other-vocab")
    single = trainer.train(args_for(store_dir, tmp_path / "single", *FSDP_COMMON, "--init", tmp_path / "init",
                                    "--no-export"))
    spawn(_fsdp_init_worker, 2, (str(tmp_path / "pg_init"), str(store_dir), str(tmp_path / "init"),
                                  str(tmp_path / "fsdp")))
    ws = final_weights(tmp_path / "single")
    for run in ("fsdp", "fsdp-resumed"):
        np.testing.assert_allclose([r["loss"] for r in read_log(tmp_path / run)], single["losses"], rtol=2e-5)
        wd = final_weights(tmp_path / run)
        assert ws.keys() == wd.keys() and wd["model.layers.0.self_attn.q_norm.weight"].shape == (1, 16)
        for k in ws:
            torch.testing.assert_close(wd[k], ws[k], rtol=1e-4, atol=1e-4)


def test_fine_tuning_a_release_layout_checkpoint(store_dir, tmp_path, monkeypatch):
    """--init from a checkpoint in the release's head-norm layout ([1, head_dim] rows every head shares) trains
    that one row (the release's parameterization) and exports the same layout; --release-loss-weights reaches
    the loss's class weights."""
    from worldvla import model as model_mod
    from worldvla.model import ModelConfig

    layout = TokenStore(store_dir).manifest["layout"]
    from worldvla.tokens import VocabLayout

    init = WorldVLA(ModelConfig.tiny(VocabLayout.from_dict(layout), model_parallel_size=1)).init_weights()
    init.save_pretrained(tmp_path / "init")
    asked = []
    real = model_mod.loss_class_weights

    def spy(layout, alpha=0.04, release=False):
        asked.append(release)
        return real(layout, alpha, release)

    monkeypatch.setattr(model_mod, "loss_class_weights", spy)
    out = tmp_path / "run"
    assert trainer.run(args_for(store_dir, out, "--steps", 2, "--batch-tokens", 300, "--init", tmp_path / "init",
                                "--release-loss-weights")) == 0
    assert asked == [True]
    with pytest.raises(ValueError, match="--max-positions 999 sizes a model built from --config"):
        trainer.train(args_for(store_dir, tmp_path / "other", "--steps", 1, "--init", tmp_path / "init",
                               "--max-positions", 999))
    w = final_weights(out)
    row = w["model.layers.0.self_attn.q_norm.weight"]
    assert row.shape == (1, 16) and not torch.equal(row, init.model.layers[0].self_attn.q_norm.weight.detach())
    exported = out / "policy" / "model" if (out / "policy").exists() else out / "model"
    assert WorldVLA.from_pretrained(exported).config.model_parallel_size == 1


def test_a_fine_tuning_run_resumes_exactly_once_its_init_folder_has_moved(store_dir, tmp_path, monkeypatch):
    """A run started with --init reloaded the whole --init model on --resume, only to overwrite it with the
    checkpoint's weights, and compared --init as a string: once the folder had moved, or was named otherwise
    (a relative path, a trailing slash), the run could not resume. Its model is built from the config its
    checkpoint records now, --init is not read, and the run continues exactly; the export keeps the --init
    config.json's keys that this package does not read."""
    from worldvla.model import ModelConfig
    from worldvla.tokens import VocabLayout

    layout = VocabLayout.from_dict(TokenStore(store_dir).manifest["layout"])
    init = tmp_path / "init"
    WorldVLA(ModelConfig.tiny(layout, model_parallel_size=1)).init_weights(
        generator=torch.Generator().manual_seed(1)).save_pretrained(init)
    hf = json.loads((init / "config.json").read_text())
    (init / "config.json").write_text(json.dumps({**hf, "vq_config": {"embed_dim": 256}}))
    common = ["--steps", 4, "--batch-tokens", 300, "--dropout", 0.1]
    straight = trainer.train(args_for(store_dir, tmp_path / "a", *common, "--init", init))
    out = tmp_path / "b"
    first = trainer.train(args_for(store_dir, out, *common, "--init", init, "--stop-after", 1))
    init.rename(tmp_path / "moved")
    monkeypatch.setattr(WorldVLA, "from_pretrained", lambda *a, **k: pytest.fail("--init was read on a resume"))
    mid = trainer.train(args_for(store_dir, out, *common, "--init", init, "--stop-after", 2, "--resume"))
    monkeypatch.chdir(tmp_path)
    rest = trainer.train(args_for(store_dir, out, *common, "--init", "moved/", "--resume"))
    assert first["losses"] + mid["losses"] + rest["losses"] == straight["losses"]
    wa, wb = final_weights(tmp_path / "a"), final_weights(out)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    exported = [json.loads((Path(s["export"]) / "model" / "config.json").read_text()) for s in (straight, rest)]
    assert exported[0] == exported[1] and exported[1]["vq_config"] == {"embed_dim": 256}


def _class_weight_dtype_worker(rank, world, init_file):
    import torch.distributed as dist

    from worldvla import ops
    from worldvla.model import ModelConfig, WorldVLA, loss_class_weights

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = WorldVLA(ModelConfig.tiny()).init_weights(generator=torch.Generator().manual_seed(0))
        cw = loss_class_weights(model.layout, 0.04)
        seen, real = [], ops.linear_cross_entropy

        def spy(h, w, y, class_weight=None, *a, **k):
            seen.append(class_weight)
            return real(h, w, y, class_weight, *a, **k)

        ops.linear_cross_entropy = spy
        dist_utils.shard_model(model, mixed_precision=torch.bfloat16)  # the GPU runs' policy, here on the CPU
        img = torch.tensor(sorted(model.layout.image_code_ids))
        ids = torch.cat([torch.tensor([model.layout.bos]), img[torch.randint(0, len(img), (40,))]])
        model.loss(ids[None], ids[None], class_weight=cw)
        assert seen and seen[-1].dtype == torch.float32, seen[-1].dtype
        assert torch.equal(seen[-1], cw)
    finally:
        model = None  # the sharded model holds the group: it goes first (shutdown frees what nothing holds)
        dist_utils.shutdown()


def _shard_layers_worker(rank, world, init_file):
    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule

    from worldvla.model import ModelConfig, WorldVLA

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = WorldVLA(ModelConfig.tiny(num_hidden_layers=2)).init_weights(generator=torch.Generator().manual_seed(0))
        dist_utils.shard_model(model)
        assert dist_utils.is_fsdp(model)
        assert len(model.model.layers) == 2 and all(isinstance(layer, FSDPModule) for layer in model.model.layers)
    finally:
        model = None
        dist_utils.shutdown()


def test_shard_model_shards_each_decoder_layer_on_its_own(tmp_path):
    """Each decoder layer is its own FSDP unit (gathered for its forward alone, then freed), not only the root,
    which would hold every layer's full parameters at once."""
    spawn(_shard_layers_worker, 1, (str(tmp_path / "pg_init"),))


def test_fsdp_mixed_precision_keeps_the_loss_class_weights_in_float32(tmp_path):
    """Under FSDP with bf16 parameters the root cast every floating input of `model.loss` to bf16: the class
    weights too, so the image weight 0.04 became 0.0400390625 inside the loss while the trainer normalized
    with the fp32 0.04."""
    spawn(_class_weight_dtype_worker, 1, (str(tmp_path / "pg_init"),))


def test_cuda_rng_state_is_this_devices_and_restores_on_a_machine_with_fewer_devices(monkeypatch, capsys):
    """Checkpoints held every visible GPU's RNG state (8 on an 8-GPU node) and restored them all, which raised
    IndexError on a machine that sees fewer GPUs. A rank now saves and restores its own device's state; the
    older list format gives this rank's device's entry, or starts fresh when there is none."""
    from worldvla.train.checkpointing import capture_rng, restore_rng

    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": torch.tensor([10 + device]))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": calls.append((state, device)))

    state = capture_rng()
    assert torch.equal(state["cuda"], torch.tensor([11]))
    restore_rng(state)
    assert len(calls) == 1 and torch.equal(calls[0][0], torch.tensor([11])) and calls[0][1] == 1
    old = dict(state, cuda=[torch.tensor([20 + d]) for d in range(8)])  # saved on an 8-GPU node
    restore_rng(old)
    assert torch.equal(calls[1][0], torch.tensor([21])) and calls[1][1] == 1
    restore_rng(dict(state, cuda=[torch.tensor([30])]))  # saved with one device: none for device 1
    assert len(calls) == 2 and "none for this rank's device 1" in capsys.readouterr().out


def test_a_backend_that_cannot_train_here_is_refused_before_the_run_starts(store_dir, tmp_path):
    """--attn-backend native (forward-only kernels) failed at the first step, after the model was built and the
    run folder written; it is refused up front with the op's reason."""
    out = tmp_path / "run"
    with pytest.raises(ValueError, match="--attn-backend native cannot train on cpu: .*forward-only"):
        trainer.train(args_for(store_dir, out, "--steps", 1, "--attn-backend", "native"))
    assert not out.exists()


def test_atomic_writes_take_the_umask_mode_and_leave_nothing_behind_on_failure(tmp_path):
    """write_atomic's file gets the mode a plain write gives it (0o666 less the umask; a temporary file's
    0o600 made plots, metrics and checkpoints unreadable to the group); a failed write keeps the old file
    and leaves no temporary sibling."""
    import os

    from worldvla.checkpoint import write_atomic, write_text_atomic

    old = os.umask(0o022)
    try:
        write_text_atomic(tmp_path / "a.json", "{}")
        (tmp_path / "plain.json").write_text("{}")
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == (tmp_path / "plain.json").stat().st_mode & 0o777 == 0o644

    def fails(p):
        open(p, "w").write("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomic(tmp_path / "a.json", fails)
    assert (tmp_path / "a.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "plain.json"]


def test_a_damaged_checkpoint_file_is_refused_naming_it_and_the_older_checkpoints(tmp_path):
    """A model.pt cut short (a full disk) failed with torch's "PytorchStreamReader failed reading zip archive";
    now the file is named, with the older checkpoints of the run to resume from."""
    from worldvla.train.checkpointing import save_checkpoint

    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, model, opt, {})
    ck = tmp_path / "checkpoints" / "step_00000003"
    data = (ck / "model.pt").read_bytes()
    for cut in (0, len(data) // 2):
        (ck / "model.pt").write_bytes(data[:cut])
        with pytest.raises(ValueError, match=rf"{ck / 'model.pt'}: the checkpoint file cannot be read .* damaged or "
                                             r"cut short; resume from an older checkpoint of the run: step_00000001, "
                                             r"step_00000002 \(remove .*step_00000003, and --resume continues from "
                                             r"step_00000002\)"):
            load_checkpoint(tmp_path, model, opt)
    (ck / "model.pt").write_bytes(data)
    (tmp_path / "checkpoints" / "step_00000001" / "optim.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"step_00000001.optim.pt: the checkpoint file cannot be read .*"
                                         r"no older checkpoint to resume from"):
        load_checkpoint(tmp_path / "checkpoints" / "step_00000001", model, opt)
    assert load_checkpoint(tmp_path, model, opt)["step"] == 3


def test_a_damaged_checkpoint_names_an_older_step_set_aside_by_a_killed_save_where_resume_finds_it(tmp_path):
    """An older step whose second save was killed between its two renames is complete only under its set-aside
    name: the refusal of a newer damaged checkpoint names that folder, the one --resume then continues from."""
    from worldvla.train.checkpointing import SET_ASIDE, resumable_checkpoint, save_checkpoint

    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    for step in (1, 2, 3):
        ck = save_checkpoint(tmp_path, step, model, opt, {})
    root = tmp_path / "checkpoints"
    (root / "step_00000002").rename(root / f"{SET_ASIDE}step_00000002")
    (ck / "model.pt").write_bytes(b"cut short")
    with pytest.raises(ValueError, match=rf"resume from an older checkpoint of the run: step_00000001, "
                                         rf"{SET_ASIDE}step_00000002 \(remove {ck}, and --resume continues from "
                                         rf"{SET_ASIDE}step_00000002\)"):
        load_checkpoint(tmp_path, model, opt)
    shutil.rmtree(ck)
    assert resumable_checkpoint(tmp_path) == root / f"{SET_ASIDE}step_00000002"


def _fsdp_damaged_worker(rank, world, init_file, store, out):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        trainer.train(args_for(store, out, *FSDP_COMMON, "--stop-after", 2, "--no-export"))
        if rank == 0:
            model_file = latest_checkpoint(out) / "model.pt"
            model_file.write_bytes(model_file.read_bytes()[:1000])
        dist.barrier()
        want = ValueError if rank == 0 else dist_utils.RankZeroFailed  # both reported in one line by the CLI
        with pytest.raises(want, match=r"model\.pt.*cannot be read") as refused:
            trainer.train(args_for(store, out, *FSDP_COMMON, "--resume", "--no-export"))
        # rank 0 raises its own error; the traceback goes here (its frames hold the group, whose threads must go)
        kind = type(refused.value)
        del refused
        assert (kind is dist_utils.RankZeroFailed) == (rank != 0), kind
    finally:
        dist_utils.shutdown()


def test_fsdp_resume_from_a_damaged_checkpoint_ends_every_rank_with_its_reason(store_dir, tmp_path):
    """Rank 0 alone reads a checkpoint's model and optimizer files: when one is damaged, every rank stops with
    rank 0's reason (the others waited in the weights' broadcast until the process group timed out)."""
    spawn(_fsdp_damaged_worker, 2, (str(tmp_path / "pg_init"), str(store_dir), str(tmp_path / "fsdp")), timeout_s=60)


def test_samples_no_micro_step_or_position_range_holds_are_refused_before_the_run(store_dir, tmp_path):
    """A sample longer than --micro-tokens or than the model's positions was refused only when its batch came up
    (hours into a real run, losing the steps since the last checkpoint); now before anything is written."""
    longest = int(TokenStore(store_dir).lengths.max())
    cases = (("--micro-tokens", longest - 1, "--batch-tokens", 4 * longest, r"--micro-tokens \d+ \(the longest"),
             ("--max-positions", longest - 1, "--batch-tokens", 4 * longest, r"the model's \d+ positions"))
    for opt, value, bopt, bvalue, message in cases:
        with pytest.raises(ValueError, match=r"sample\(s\) of the store are longer than " + message) as err:
            trainer.train(args_for(store_dir, tmp_path / opt, "--steps", 2, opt, value, bopt, bvalue))
        assert not (tmp_path / opt).exists()
        # The long samples are the world-model ones: the advice names the options that leave them out, which
        # exist (it named `pretokenize --kinds`, which does not).
        assert "world-model samples" in str(err.value) and "--kinds action" in str(err.value)
        assert "`worldvla pretokenize --no-world`" in str(err.value) and "pretokenize --kinds" not in str(err.value)
    assert "--kinds" in trainer.build_parser().format_help()
    assert "--no-world" in _pretokenize_help() and "--history" in _pretokenize_help()


def _pretokenize_help() -> str:
    import argparse

    from worldvla.data import store

    p = argparse.ArgumentParser()
    store.add_arguments(p)
    return p.format_help()


def test_overwrite_keeps_the_earlier_run_when_the_command_line_is_refused(store_dir, tmp_path):
    """--overwrite deleted the earlier run's checkpoints and policy before the rest of the options were checked,
    so a typo cost the run and did nothing; the options are checked first now."""
    from worldvla.model import ModelConfig
    from worldvla.tokens import VocabLayout

    layout = VocabLayout.from_dict(TokenStore(store_dir).manifest["layout"])
    WorldVLA(ModelConfig.tiny(layout)).save_pretrained(tmp_path / "init")
    WorldVLA(ModelConfig.tiny(VocabLayout.compact(n_image_codes=layout.n_image_codes + 8))).save_pretrained(tmp_path / "other-vocab")
    WorldVLA(ModelConfig.tiny(layout)).save_pretrained(tmp_path / "cut-weights")
    weights = tmp_path / "cut-weights" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:3000])  # its config.json is fine: only reading the weights fails
    out = tmp_path / "run"
    trainer.train(args_for(store_dir, out, "--steps", 1, "--no-export"))
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    for bad in (("--micro-tokens", 4000, "--batch-tokens", 600), ("--store", tmp_path / "no-store"),
                ("--warmup", 2.5), ("--init", tmp_path / "no-model"), ("--init", tmp_path / "other-vocab"),
                ("--init", tmp_path / "init", "--max-positions", 999), ("--init", tmp_path / "cut-weights")):
        args = args_for(store_dir, out, "--steps", 1, "--overwrite", *bad)
        with pytest.raises((ValueError, OSError)):
            trainer.train(args)
        assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before, bad
        assert not getattr(args, "run_dir_ready", False), bad  # an interrupt's advice: the earlier run is untouched
    args = args_for(store_dir, out, "--steps", 1, "--overwrite", "--no-export")
    trainer.train(args)
    assert args.run_dir_ready


def test_options_out_of_range_are_refused_by_name(capsys, store_dir, tmp_path):
    for opt, value in (("--seed", -1), ("--beta1", 1.5), ("--beta2", 1.0), ("--dropout", 1.0), ("--seed", 2 ** 64),
                       ("--eps", 0)):
        with pytest.raises(SystemExit):
            args_for(store_dir, tmp_path / "x", opt, value)
        assert f"argument {opt}: must be" in capsys.readouterr().err
    # torch takes seeds up to 2**64 - 1 ("Overflow when unpacking long long" above, after --overwrite had deleted
    # the earlier run): the largest is accepted and trains, the next refused naming the range.
    with pytest.raises(SystemExit):
        args_for(store_dir, tmp_path / "x", "--seed", 2 ** 64)
    assert "argument --seed: must be >= 0 and < 2**64" in capsys.readouterr().err
    assert trainer.train(args_for(store_dir, tmp_path / "s", "--steps", 1, "--batch-tokens", 300, "--seed", 2 ** 64 - 1,
                                  "--no-export"))["step"] == 1
    trainer.train(args_for(store_dir, tmp_path / "w", "--steps", 2, "--warmup", 5, "--no-export"))
    assert "--warmup 5.0 is 5 steps, more than the run's 2" in capsys.readouterr().out


def test_fine_tuning_records_its_dropout_with_the_model(store_dir, tmp_path):
    """--init with --dropout trained with it but recorded the checkpoint's 0.0 in the model config (the exported
    model, and the checkpoints' model_config)."""
    from worldvla.model import ModelConfig
    from worldvla.tokens import VocabLayout

    layout = VocabLayout.from_dict(TokenStore(store_dir).manifest["layout"])
    WorldVLA(ModelConfig.tiny(layout)).init_weights().save_pretrained(tmp_path / "init")
    trainer.train(args_for(store_dir, tmp_path / "ft", "--steps", 1, "--init", tmp_path / "init", "--dropout", 0.3,
                           "--no-export"))
    state = json.loads((latest_checkpoint(tmp_path / "ft") / "state.json").read_text())
    assert state["model_config"]["dropout"] == 0.3


def test_a_diverging_run_stops_at_its_first_non_finite_loss_without_saving_or_exporting(store_dir, tmp_path, capsys):
    """A run whose loss went nan (--lr 10000, --eps 0) printed "loss nan", exited 0 and exported an all-nan policy.
    It now stops at the step whose loss is not finite, naming it and the likely causes; the checkpoints before it
    (finite weights) are kept, the step itself is neither saved nor exported."""
    from worldvla.cli import main

    out = tmp_path / "run"
    common = ("--steps", 6, "--batch-tokens", 300, "--lr", 1e4, "--warmup", 0, "--save-every", 1, "--keep-last", 0)
    with pytest.raises(ValueError, match=r"step 4: the loss is nan .*not finite.*stopped.*neither saved nor "
                                         r"exported.*step_00000003.*--lr.*--eps") as err:
        trainer.train(args_for(store_dir, out, *common))
    assert "--resume" in str(err.value)
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == [f"step_{i:08d}" for i in (1, 2, 3)]
    assert not (out / "policy").exists() and not (out / "model").exists()
    assert all(torch.isfinite(v).all() for v in final_weights(out).values())
    assert (out / "training.png").is_file()  # the curves up to the failure
    argv = ["train", "--store", str(store_dir), "--out", str(tmp_path / "cli"), "--config", "tiny", "--no-progress",
            "--seed", "3", "--device", "cpu", *map(str, common)]
    assert main(argv) == 2
    assert "step 4: the loss is nan" in capsys.readouterr().err


def test_a_checkpoint_missing_a_file_or_a_state_key_is_refused_naming_it_and_the_older_checkpoints(store_dir, tmp_path):
    """A checkpoint without model.pt (a partial copy) failed a resume with a bare "[Errno 2] No such file or
    directory", a state.json without a key the resume reads (here `scheduler`) with a KeyError, and one whose "step" is
    not a count (a string, negative) deep in the loop; all now name
    what is missing and the older checkpoints to resume from, as a damaged file does."""
    import shutil

    common = ("--steps", 4, "--batch-tokens", 300, "--save-every", 1, "--keep-last", 0, "--no-export")
    first = tmp_path / "first"
    trainer.train(args_for(store_dir, first, *common, "--stop-after", 3))
    older = (r"resume from an older checkpoint of the run: step_00000001, step_00000002 \(remove .*step_00000003, "
             r"and --resume continues from step_00000002\)")
    out = tmp_path / "no-model"
    shutil.copytree(first, out)
    ck = latest_checkpoint(out)
    (ck / "model.pt").unlink()
    with pytest.raises(FileNotFoundError, match=rf"{ck / 'model.pt'}: .*missing.*; {older}"):
        trainer.train(args_for(store_dir, out, *common, "--resume"))
    for key in ("scheduler", "tokens_seen", "batch_in_epoch"):
        out = tmp_path / f"no-{key}"
        shutil.copytree(first, out)
        ck = latest_checkpoint(out)
        state = json.loads((ck / "state.json").read_text())
        del state[key]
        (ck / "state.json").write_text(json.dumps(state))
        with pytest.raises(ValueError, match=rf"{ck / 'state.json'}: .*lacks '{key}'.*; {older}"):
            trainer.train(args_for(store_dir, out, *common, "--resume"))
    for step in ("3", -1, 2.5, None):
        out = tmp_path / f"step-{step}"
        shutil.copytree(first, out)
        ck = latest_checkpoint(out)
        state = json.loads((ck / "state.json").read_text())
        state["step"] = step
        (ck / "state.json").write_text(json.dumps(state))
        with pytest.raises(ValueError, match=rf"{ck / 'state.json'}: .*\"step\" is .*not a count of steps.*; {older}"):
            trainer.train(args_for(store_dir, out, *common, "--resume"))
    assert trainer.train(args_for(store_dir, first, *common, "--resume"))["step"] == 4


def test_a_store_without_its_vqgan_is_refused_before_training_unless_no_export(store_dir, tmp_path):
    """A token store whose vqgan/ folder was gone trained the whole run and failed only at the policy export, which
    needs it; it is refused before anything is written or deleted, saying how to fix it, and --no-export trains."""
    import shutil

    store = tmp_path / "store"
    shutil.copytree(store_dir, store)
    shutil.rmtree(store / "vqgan")
    out = tmp_path / "run"
    trainer.train(args_for(store_dir, out, "--steps", 1, "--batch-tokens", 300, "--no-export"))
    with pytest.raises(FileNotFoundError, match=r"lacks its VQGAN.*pretokenize.*--no-export"):
        trainer.train(args_for(store, out, "--steps", 2, "--batch-tokens", 300, "--overwrite"))
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == ["step_00000001"]
    with pytest.raises(FileNotFoundError, match="lacks its VQGAN"):
        trainer.train(args_for(store, tmp_path / "new", "--steps", 2, "--batch-tokens", 300))
    assert not (tmp_path / "new").exists()
    assert trainer.train(args_for(store, tmp_path / "new", "--steps", 1, "--batch-tokens", 300,
                                  "--no-export"))["step"] == 1
    # On the Chameleon vocabulary the export needs the store's text_tokenizer.json as well: checked with the VQGAN.
    from types import SimpleNamespace

    chameleon = SimpleNamespace(path=store, image_size=(32, 32), checked_vqgan_path=lambda: store / "vqgan",
                                layout=SimpleNamespace(text_base=-1), text_tokenizer_path=None)
    with pytest.raises(FileNotFoundError, match=r"lacks its text_tokenizer\.json.*--no-export"):
        trainer._check_export_inputs(chameleon)
    trainer._check_export_inputs(SimpleNamespace(**{**vars(chameleon), "text_tokenizer_path": store / "t.json"}))


def test_an_export_that_fails_after_training_says_resume_exports_again(store_dir, tmp_path, monkeypatch):
    """The store's VQGAN removed during the run (or a full disk) failed the export after the whole training, naming
    neither the saved checkpoint nor the way to export without training again."""
    out = tmp_path / "run"
    real = trainer._export

    def full_disk(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(trainer, "_export", full_disk)
    with pytest.raises(OSError, match=r"No space left.*final checkpoint \(step_00000002\) is saved.*--resume exports"):
        trainer.train(args_for(store_dir, out, "--steps", 2, "--batch-tokens", 300))
    monkeypatch.setattr(trainer, "_export", real)
    again = trainer.train(args_for(store_dir, out, "--steps", 2, "--batch-tokens", 300, "--resume"))
    assert again["losses"] == [] and again["export"] is not None and (out / "policy" / "policy.json").is_file()


def test_without_a_latest_pointer_the_highest_step_is_taken_not_the_newest_file(tmp_path):
    """With no `latest` pointer (lost, or removed by hand) the checkpoint resumed from is the highest step; a
    folder's modification time says nothing about its step (an older checkpoint copied or touched later)."""
    import os

    from worldvla.train.checkpointing import save_checkpoint

    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    old = save_checkpoint(tmp_path, 3, model, opt, {})
    new = save_checkpoint(tmp_path, 5, model, opt, {})
    (tmp_path / "checkpoints" / "latest").unlink()
    later = new.stat().st_mtime + 100
    for p in (old, *old.iterdir()):
        os.utime(p, (later, later))
    assert old.stat().st_mtime > new.stat().st_mtime
    assert latest_checkpoint(tmp_path) == new


def test_restored_rng_states_repeat_the_draws_from_the_captured_position():
    """Restoring Python's, NumPy's and torch's RNG states continues from the very draw where they were
    captured, also partway through NumPy's block of 624 words (its `pos`): a resumed run draws the same
    numbers as the uninterrupted one."""
    import random

    from worldvla.train.checkpointing import capture_rng, restore_rng

    old = capture_rng()
    try:
        random.seed(0)
        np.random.seed(0)
        torch.manual_seed(0)
        random.random(), np.random.random(3), torch.rand(3)  # partway into each generator's stream
        state = capture_rng()
        assert 0 < state["numpy"]["pos"] < 624
        a = ([random.random() for _ in range(5)], np.random.random(5), torch.rand(5))
        restore_rng(state)
        b = ([random.random() for _ in range(5)], np.random.random(5), torch.rand(5))
    finally:
        restore_rng(old)
    assert a[0] == b[0]
    np.testing.assert_array_equal(a[1], b[1])
    assert torch.equal(a[2], b[2])


def test_a_run_draws_its_curves_and_a_figure_that_fails_never_stops_it(store_dir, tmp_path, monkeypatch, capsys):
    """<run>/training.png shows metrics.jsonl's curves at the run's end; a figure that cannot be drawn (here a full
    disk) is said once on stderr, and the run trains and exports as without it."""
    from PIL import Image

    from worldvla.eval import plots

    out = tmp_path / "run"
    trainer.train(args_for(store_dir, out, "--steps", 2, "--batch-tokens", 300))
    with Image.open(out / "training.png") as im:
        assert im.format == "PNG"
    calls = []

    def full_disk(*a, **k):
        calls.append(a)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(plots, "training_curves", full_disk)
    s = trainer.train(args_for(store_dir, tmp_path / "b", "--steps", 3, "--batch-tokens", 300, "--save-every", 1))
    assert s["step"] == 3 and s["export"] and len(calls) == 1  # tried once, at the end
    err = capsys.readouterr().err
    assert err.count("could not draw") == 1 and "No space left" in err and "metrics.jsonl has the same numbers" in err


def test_curves_are_redrawn_at_saves_at_most_once_a_period_and_always_when_forced(tmp_path, monkeypatch):
    from worldvla.eval import plots
    from worldvla.train.checkpointing import CurvePlot

    drawn = []
    monkeypatch.setattr(plots, "training_curves", lambda log, path, panels, title: drawn.append((log, path, title)))
    curves = CurvePlot(tmp_path, trainer.TRAIN_CURVES, "worldvla train", every_s=3600)
    curves.update()  # the run is younger than a period: nothing yet
    assert drawn == []
    curves.last -= 3600
    curves.update()
    curves.update()
    assert drawn == [(tmp_path / "metrics.jsonl", tmp_path / "training.png", "worldvla train")]
    curves.update(force=True)
    assert len(drawn) == 2
    try:  # Ctrl-C: the `finally` that forces a drawing lets the process exit at once instead
        raise KeyboardInterrupt
    except KeyboardInterrupt:
        curves.update(force=True)
    assert len(drawn) == 2


def test_init_from_a_policy_of_another_vqgan_is_named(store_dir, tmp_path, capsys):
    """`train --init runA/policy/model` on a store encoded with another VQGAN trained without a word, though the
    model's image-code embeddings were learned for other codes; the VQGAN beside the model says so."""
    first = tmp_path / "a"
    trainer.train(args_for(store_dir, first, "--steps", 1, "--batch-tokens", 300))
    init = first / "policy" / "model"
    capsys.readouterr()
    trainer.train(args_for(store_dir, tmp_path / "b", "--steps", 1, "--batch-tokens", 300, "--init", init,
                           "--no-export"))
    assert "note: --init" not in capsys.readouterr().err  # the store's own VQGAN beside it
    torch.manual_seed(123)
    VQGAN(VQGANConfig(ch=32, ch_mult=(1, 1, 1, 1, 1), num_res_blocks=1, z_channels=32, embed_dim=32,
                      n_embed=64)).save_pretrained(first / "policy" / "vqgan")
    s = trainer.train(args_for(store_dir, tmp_path / "c", "--steps", 1, "--batch-tokens", 300, "--init", init,
                               "--no-export"))
    err = capsys.readouterr().err
    assert s["step"] == 1 and f"note: --init {init} was trained with the VQGAN beside it" in err
    assert f"pretokenize the demos with --vqgan {(first / 'policy' / 'vqgan').resolve()}" in err


def test_init_vqgan_note_speaks_only_of_a_vqgan_it_can_compare(store_dir, tmp_path, monkeypatch):
    """No VQGAN beside the model, or a store that records no digest: nothing to say. A VQGAN beside it that is not
    the store's is named, also when --init is given as ~/..."""
    store = TokenStore(store_dir)
    model = tmp_path / "runs" / "policy" / "model"
    model.mkdir(parents=True)
    assert trainer._init_vqgan_note(model, store) is None  # nothing beside it
    torch.manual_seed(123)
    VQGAN(VQGANConfig(ch=32, ch_mult=(1, 1, 1, 1, 1), num_res_blocks=1, z_channels=32, embed_dim=32,
                      n_embed=64)).save_pretrained(model.parent / "vqgan")
    assert trainer._init_vqgan_note(model, store).startswith(f"note: --init {model} was trained with the VQGAN")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert trainer._init_vqgan_note("~/runs/policy/model", store) is not None
    monkeypatch.setattr(store, "manifest", {k: v for k, v in store.manifest.items() if k != "vqgan_sha256"})
    assert trainer._init_vqgan_note(model, store) is None  # a store without its VQGAN's digest


def test_the_export_records_every_instruction_its_demos_were_prompted_with(store_dir, tmp_path, monkeypatch):
    """A file's demos may each carry their own instruction (`demo_instructions`); an empty file instruction is none."""
    from worldvla.inference import policy as policy_mod
    from worldvla.model import ModelConfig

    store = TokenStore(store_dir)
    inputs = [{"instruction": "", "demo_instructions": {"demo_0": "stack the cups", "demo_1": "open the drawer"}},
              {"instruction": "open the drawer"}]
    monkeypatch.setattr(store, "manifest", {**store.manifest, "inputs": inputs})
    seen = {}
    monkeypatch.setattr(policy_mod, "save_policy", lambda *a, extra=None, **k: seen.update(extra))
    trainer._export(WorldVLA(ModelConfig.tiny(store.layout)), store, tmp_path,
                    args_for(store_dir, tmp_path / "run", "--steps", 1))
    assert seen["instructions"] == ["open the drawer", "stack the cups"]


def test_a_run_ended_by_stop_after_says_how_to_go_on(store_dir, tmp_path, capsys):
    """--stop-after ended like a finished run (a loss and a checkpoint), with nothing said of the steps left."""
    a = args_for(store_dir, tmp_path / "run", "--steps", 3, "--batch-tokens", 300, "--stop-after", 1, "--no-export")
    assert trainer.run(a) == 0
    assert "stopped at --stop-after, step 1 of 3: to go on, run the same command with --resume" in capsys.readouterr().out
    a = args_for(store_dir, tmp_path / "run", "--steps", 3, "--batch-tokens", 300, "--no-export", "--resume")
    assert trainer.run(a) == 0
    assert "--stop-after" not in capsys.readouterr().out  # the run's end


def test_the_trainer_modules_run_as_the_command_line_does(tmp_path):
    """`torchrun -m worldvla.train.trainer` (or train.vq) skipped the command line: a bad input ended in a
    traceback on every rank, where `worldvla train` prints one line."""
    import subprocess
    import sys

    for module, command, arg in (("worldvla.train.trainer", "train", "--store"), ("worldvla.train.vq", "train-vq", "")):
        argv = [sys.executable, "-m", module, *([arg] if arg else []), str(tmp_path / "missing"),
                "--out", str(tmp_path / "run")]
        r = subprocess.run(argv, capture_output=True, text=True, cwd=tmp_path, timeout=120)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert r.stderr.startswith(f"worldvla {command}: error: ") and str(tmp_path / "missing") in r.stderr


# ---------------------------------------------------------------------- boundaries and bookkeeping
def test_a_sample_of_exactly_batch_tokens_is_a_batch_and_one_token_more_is_refused():
    """A batch holds at most --batch-tokens tokens: a sample of exactly that many is a batch of its own, a sample one
    token longer is refused by name (it would make a batch over the budget)."""
    lengths = np.array([50, 300, 120, 180])
    batches = trainer.epoch_batches(lengths, 300, seed=0, epoch=0)
    assert sorted(i for b in batches for i in b.tolist()) == [0, 1, 2, 3]
    assert all(lengths[b].sum() <= 300 for b in batches) and [1] in [b.tolist() for b in batches]
    with pytest.raises(ValueError, match=r"1 samples are longer than --batch-tokens 300 \(longest 301\)"):
        trainer.epoch_batches(np.array([50, 301, 120]), 300, seed=0, epoch=0)


def test_split_batch_fills_a_micro_batch_up_to_exactly_micro_tokens():
    """Samples whose lengths add up to exactly --micro-tokens share one micro-batch: 200 tokens over 2 ranks of 100
    are one micro-step, not two."""
    lengths = np.array([60, 40, 30, 70])
    assert trainer.split_batch(np.array([0, 1]), lengths, 1, 100) == [[[0, 1]]]
    # largest first into the emptiest bin that fits: 70 | 60, then 40 fills rank 1's and 30 rank 0's
    assert trainer.split_batch(np.array([0, 1, 2, 3]), lengths, 2, 100) == [[[2, 3], [0, 1]]]


def test_epochs_trains_every_sample_once_per_epoch(store_dir, tmp_path, monkeypatch):
    """Without --steps the run is --epochs whole epochs, each in its own order: every sample is trained on once per
    epoch."""
    real, trained = trainer.split_batch, []
    monkeypatch.setattr(trainer, "split_batch", lambda batch, *a: trained.append(batch.tolist()) or real(batch, *a))
    a = args_for(store_dir, tmp_path / "run", "--epochs", 2, "--batch-tokens", 600, "--kinds", "action", "--no-export")
    s = trainer.train(a)
    store = TokenStore(store_dir, kinds=("action",))
    epochs = [trainer.epoch_batches(store.lengths, 600, 3, e) for e in (0, 1)]
    assert trained == [b.tolist() for b in epochs[0] + epochs[1]]
    assert sorted(map(sorted, epochs[0])) != sorted(map(sorted, epochs[1]))  # another order, other batches
    per_epoch = [len(b) for b in epochs]
    assert s["step"] == s["total"] == sum(per_epoch)
    log = read_log(a.out)
    assert [r["epoch"] for r in log] == [0] * per_epoch[0] + [1] * per_epoch[1]
    assert log[-1]["tokens"] == 2 * int(store.lengths.sum())


def test_grad_clip_0_turns_the_clipping_off(store_dir, tmp_path):
    """--grad-clip 0 means no clipping (its help says so): the run is that of an unreachable bound, not one whose
    gradients are all clipped to zero."""
    common = ("--steps", 2, "--batch-tokens", 300, "--no-export")
    off = trainer.train(args_for(store_dir, tmp_path / "off", *common, "--grad-clip", 0))
    huge = trainer.train(args_for(store_dir, tmp_path / "huge", *common, "--grad-clip", 1e9))
    assert off["losses"] == huge["losses"] and off["losses"][1] < off["losses"][0]
    w_off, w_huge = final_weights(tmp_path / "off"), final_weights(tmp_path / "huge")
    assert all(torch.equal(w_off[k], w_huge[k]) for k in w_off)


def test_the_run_logs_its_last_step_whatever_log_every(store_dir, tmp_path):
    a = args_for(store_dir, tmp_path / "run", "--steps", 5, "--batch-tokens", 300, "--log-every", 2, "--no-export")
    trainer.train(a)
    assert [r["step"] for r in read_log(a.out)] == [2, 4, 5]


def test_each_logged_learning_rate_is_the_one_its_step_trained_with(store_dir, tmp_path):
    """--lr 2e-3, a warm-up of 2 steps, a cosine to 2e-4 over the other 2: step 1 trains at half the peak."""
    seen = []
    real_step = torch.optim.AdamW.step

    def step(opt, *a, **k):
        seen.append(opt.param_groups[0]["lr"])
        return real_step(opt, *a, **k)

    a = args_for(store_dir, tmp_path / "run", "--steps", 4, "--batch-tokens", 300, "--no-export")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.optim.AdamW, "step", step)
        trainer.train(a)
    logged = [r["lr"] for r in read_log(a.out)]
    assert logged == pytest.approx([1e-3, 2e-3, 2e-3, 1.1e-3]) and logged == pytest.approx(seen)


def test_a_resumed_run_counts_the_tokens_seen_since_the_run_started(store_dir, tmp_path):
    common = ("--steps", 4, "--batch-tokens", 300, "--no-export")
    trainer.train(args_for(store_dir, tmp_path / "a", *common))
    trainer.train(args_for(store_dir, tmp_path / "b", *common, "--stop-after", 2))
    trainer.train(args_for(store_dir, tmp_path / "b", *common, "--resume"))
    store = TokenStore(store_dir)
    batches = trainer.epoch_batches(store.lengths, 300, seed=3, epoch=0)[:4]
    want = np.cumsum([int(store.lengths[b].sum()) for b in batches]).tolist()
    assert [r["tokens"] for r in read_log(tmp_path / "a")] == want
    assert [r["tokens"] for r in read_log(tmp_path / "b")] == want
    assert json.loads((latest_checkpoint(tmp_path / "b") / "state.json").read_text())["tokens_seen"] == want[-1]


def test_a_sample_exactly_as_long_as_micro_tokens_and_the_positions_trains(store_dir, tmp_path):
    """The limits are inclusive: a sample of --micro-tokens tokens fills a micro-batch, and one of as many tokens
    as the model's positions uses them all."""
    longest = int(TokenStore(store_dir).lengths.max())
    s = trainer.train(args_for(store_dir, tmp_path / "run", "--steps", 2, "--batch-tokens", 2 * longest,
                               "--micro-tokens", longest, "--max-positions", longest, "--no-export"))
    assert s["step"] == 2 and all(np.isfinite(s["losses"]))


def test_a_save_at_the_step_of_a_save_killed_before_its_rename_replaces_its_leftovers(tmp_path):
    """A save killed while writing step 4's files leaves .tmp-step_00000004; the resumed run saves step 4 again
    (it resumes from an earlier checkpoint), which must not fail on that folder."""
    from worldvla.train.checkpointing import save_checkpoint

    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    root = tmp_path / "checkpoints"
    save_checkpoint(tmp_path, 2, model, opt, {})
    (root / ".tmp-step_00000004").mkdir()
    (root / ".tmp-step_00000004" / "model.pt").write_bytes(b"half")
    written = save_checkpoint(tmp_path, 4, model, opt, {"mark": 1})
    assert latest_checkpoint(tmp_path) == written == root / "step_00000004"
    assert torch.equal(torch.load(written / "model.pt", weights_only=True)["weight"], model.weight)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000002", "step_00000004"]


def test_a_checkpoint_that_lacks_a_setting_recorded_since_still_resumes(store_dir, tmp_path):
    """A checkpoint of an older version records fewer settings: those it lacks are not compared (and the resume does
    not fail on them)."""
    out = tmp_path / "run"
    common = ("--steps", 3, "--batch-tokens", 300, "--no-export")
    trainer.train(args_for(store_dir, out, *common, "--stop-after", 1))
    state_file = latest_checkpoint(out) / "state.json"
    state = json.loads(state_file.read_text())
    for name in ("attention", "kinds", "release_loss_weights"):
        del state["args"][name]
    state_file.write_text(json.dumps(state))
    assert trainer.train(args_for(store_dir, out, *common, "--resume"))["step"] == 3


def test_a_checkpoint_folder_without_its_state_json_is_never_the_latest(tmp_path):
    """A checkpoint folder that lacks its state.json (a partial copy) is not complete: neither the highest step nor
    a `latest` naming it makes it the run's latest checkpoint; the newest complete one is."""
    from worldvla.train.checkpointing import save_checkpoint

    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    complete = save_checkpoint(tmp_path, 3, model, opt, {})
    partial = save_checkpoint(tmp_path, 5, model, opt, {})
    (partial / "state.json").unlink()
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == partial.name
    assert latest_checkpoint(tmp_path) == complete
    (tmp_path / "checkpoints" / "latest").unlink()
    assert latest_checkpoint(tmp_path) == complete


def test_an_infinite_loss_or_gradient_norm_stops_the_run_as_a_nan_does(tmp_path):
    """An overflow gives inf, not NaN: the weights are as lost, and the run stops at that step as well."""
    from worldvla.train.checkpointing import check_finite

    check_finite(3, {"loss": 2.5, "gradient norm": 1e30}, tmp_path, "a cause")  # large but finite: goes on
    for name, value in (("loss", float("inf")), ("gradient norm", float("-inf")), ("loss", float("nan"))):
        with pytest.raises(ValueError, match=rf"^step 3: the {name} is {value} \(not finite\).*no checkpoint of the "
                                             r"run was written. Likely causes: a cause"):
            check_finite(3, {"loss": 2.5, "gradient norm": 1.0, name: value}, tmp_path, "a cause")


def test_a_checkpoint_is_renamed_in_on_the_disk_before_latest_names_it(tmp_path, monkeypatch):
    """The checkpoints folder (which records the rename of the new checkpoint into place) is flushed before the
    `latest` pointer's new file is written, so a power loss cannot leave `latest` naming a folder the disk lacks."""
    import os

    from worldvla.train.checkpointing import save_checkpoint

    flushed = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: flushed.append(os.readlink(f"/proc/self/fd/{fd}")) or real(fd))
    model = torch.nn.Linear(3, 2)
    save_checkpoint(tmp_path, 7, model, torch.optim.AdamW(model.parameters()), {})
    names = [os.path.basename(p) for p in flushed]
    pointer = next(i for i, n in enumerate(names) if n.startswith(".latest."))
    assert names.index(".tmp-step_00000007") < names.index("checkpoints") < pointer, names


def test_resume_takes_the_min_lr_its_default_stands_for_at_the_default_lr(store_dir, tmp_path):
    """--min-lr's default stands for --lr / 10, but at the default --lr 3e-4 that is 2.9999999999999997e-05 in
    floating point: a resume given --min-lr 3e-5 (the same floor, typed out) was refused as another setting. Settings
    equal up to rounding are the same; one that differs beyond it is still refused."""
    from worldvla.train.checkpointing import _same_setting

    assert _same_setting(3e-4 * 0.1, 3e-5) and _same_setting(float("nan"), float("nan"))
    assert not _same_setting(3e-5, 3.0001e-5) and not _same_setting(0.0, 1e-300)
    assert not _same_setting(1.0, float("nan"))
    out = tmp_path / "run"
    common = ["--steps", 3, "--batch-tokens", 300, "--lr", 3e-4, "--no-export"]
    trainer.train(args_for(store_dir, out, *common, "--stop-after", 1))
    with pytest.raises(ValueError, match=r"started with --min-lr None, not --min-lr 3\.1e-05;"):
        trainer.train(args_for(store_dir, out, *common, "--min-lr", 3.1e-5, "--resume"))
    assert trainer.train(args_for(store_dir, out, *common, "--min-lr", 3e-5, "--resume"))["step"] == 3


def test_a_min_lr_above_lr_is_unused_not_refused_under_a_constant_schedule(store_dir, tmp_path, capsys):
    """--min-lr is the cosine's floor: under --schedule constant it was refused as "the cosine decay would raise the
    learning rate", where the run has no decay and says instead that the option is unused."""
    s = trainer.train(args_for(store_dir, tmp_path / "c", "--steps", 2, "--batch-tokens", 300, "--lr", 1e-3,
                               "--min-lr", 1e-2, "--schedule", "constant", "--no-export"))
    assert s["step"] == 2
    assert "warning: --min-lr 0.01 is unused under --schedule constant" in capsys.readouterr().out
    assert [r["lr"] for r in read_log(tmp_path / "c")] == [5e-4, 1e-3]  # warm-up of 2 steps, then --lr
    with pytest.raises(ValueError, match=r"--min-lr 0\.01 is above --lr 0\.001.*cosine"):
        trainer.train(args_for(store_dir, tmp_path / "d", "--steps", 2, "--lr", 1e-3, "--min-lr", 1e-2))


def test_an_init_model_of_another_vocabulary_is_refused_saying_what_to_do(store_dir, tmp_path):
    """The refusal named the two vocabulary sizes only, not what to do about them."""
    from worldvla.checkpoint import config_to_hf

    cfg = trainer.build_model_config("tiny", TokenStore(store_dir).layout)
    cfg.vocab_size += 64  # a model of a VQGAN with a larger codebook
    init = tmp_path / "init"
    init.mkdir()
    (init / "config.json").write_text(json.dumps(config_to_hf(cfg)))
    with pytest.raises(ValueError, match=rf"--init model has {cfg.vocab_size} vocabulary entries, the store's layout "
                                         rf"{cfg.vocab_size - 64}: .*pretokenize.*VQGAN.*or drop --init"):
        trainer.train(args_for(store_dir, tmp_path / "run", "--steps", 1, "--init", init, "--no-export"))
    assert not (tmp_path / "run").exists()  # refused before anything is written


def test_a_fresh_run_refuses_a_folder_holding_an_earlier_runs_export_without_its_checkpoints(store_dir, tmp_path):
    """A finished run whose checkpoints were deleted (to free the disk) kept its policy and log; a fresh run there
    went ahead without --overwrite, emptied that log and, under --no-export, left the other run's policy beside its
    own checkpoints, as if this run had made it. It is refused now, and --overwrite deletes the export."""
    import shutil

    out = tmp_path / "run"
    trainer.train(args_for(store_dir, out, "--steps", 2, "--batch-tokens", 300))
    exported = next(out / name for name in ("policy", "model") if (out / name).is_dir())
    shutil.rmtree(out / "checkpoints")
    log = (out / "metrics.jsonl").read_text()
    with pytest.raises(FileExistsError, match=rf"{out} holds the exported {exported.name}/ of an earlier run \(its "
                                              r"checkpoints are gone\)\. Pass --overwrite to delete it"):
        trainer.train(args_for(store_dir, out, "--steps", 1, "--batch-tokens", 300, "--no-export"))
    assert (out / "metrics.jsonl").read_text() == log and exported.is_dir()
    trainer.train(args_for(store_dir, out, "--steps", 1, "--batch-tokens", 300, "--no-export", "--overwrite"))
    assert not exported.exists() and [r["step"] for r in read_log(out)] == [1]
    # A run stopped before its first checkpoint leaves only its log: the same command starts over there.
    shutil.rmtree(out / "checkpoints")
    assert trainer.train(args_for(store_dir, out, "--steps", 1, "--batch-tokens", 300, "--no-export"))["step"] == 1


def test_distributed_init_names_a_bad_launch_description(monkeypatch):
    """An init_method without rank_/world failed inside torch ("`rank` must be an integer. None"), rank_/world
    without an init_method were silently ignored (one process), and a WORLD_SIZE that is not a number gave
    "invalid literal for int()", naming no variable."""
    import torch.distributed as dist

    from worldvla.train import distributed

    monkeypatch.setattr(dist, "init_process_group", lambda **kw: pytest.fail("no group may be joined"))
    for var in ("LOCAL_RANK", "WORLD_SIZE", "RANK"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(ValueError, match=r"init_method 'file:///tmp/pg' needs rank_ .* got rank_=None, world=None"):
        distributed.init("cpu", init_method="file:///tmp/pg")
    with pytest.raises(ValueError, match=r"rank_=1 and world=2 are used with an init_method only"):
        distributed.init("cpu", rank_=1, world=2)
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match=r"WORLD_SIZE='two' is not a number of processes.*unset it"):
        distributed.init("cpu")


def test_a_resume_on_other_data_names_each_changed_value_as_saved_then_as_given():
    """The refusal names what the run was started on first and what this resume gives second, lists of more than
    three files by their first three and a count, digests by their first 12 characters; names the checkpoint does
    not record (written before they were) are not compared."""
    import re

    from worldvla.train.checkpointing import check_resume_data

    saved = {"demo_files": ["a.hdf5", "b.hdf5", "c.hdf5", "d.hdf5", "e.hdf5"], "store_content": "0123456789abcdef01",
             "total_steps": 10, "store_name": "sixteen_chars_ab"}
    data = {"demo_files": ["a.hdf5", "x.hdf5"], "store_content": "fedcba9876543210ff", "total_steps": 12,
            "store_name": "sixteen_chars_ab", "recorded_since": 1}
    expected = ("--resume: the run in /runs/r was started on other data (demo files a.hdf5, b.hdf5, c.hdf5 and 2 more, "
                "not a.hdf5, x.hdf5; store content 0123456789ab..., not fedcba987654...; total steps 10, not 12); "
                "its checkpoint continues the data order and the learning-rate schedule of that data only. Resume "
                "with --store /s, or start a new run in another --out")
    with pytest.raises(ValueError, match=re.escape(expected)):
        check_resume_data(saved, data, "/runs/r", "Resume with --store /s")
    check_resume_data(saved, {**data, "demo_files": saved["demo_files"], "store_content": "0123456789abcdef01",
                              "total_steps": 10}, "/runs/r", "unused")  # the same data: no refusal
    with pytest.raises(ValueError, match=r"\(store name sixteen_chars_ab, not sixteen_chars_ac\)"):  # shown whole
        check_resume_data(saved, {"store_name": "sixteen_chars_ac"}, "/runs/r", "unused")


def test_trim_log_keeps_the_checkpoints_steps_and_drops_later_and_cut_short_lines(tmp_path, monkeypatch):
    """After a resume from step 2 the log holds steps 1 and 2 once, not the steps past the checkpoint (redone) nor
    a line a crash cut short; a crash while it is rewritten leaves the log as it was, not cut short."""
    from worldvla.train.checkpointing import trim_log

    log = tmp_path / "metrics.jsonl"
    lines = ['{"step": 1, "loss": 3.0}', '{"step": 2, "loss": 2.5}', '{"step": 3, "lo', '[4]',
             '{"step": 3, "loss": 2.0}', '', '{"step": 4, "loss": 1.5}']
    log.write_text("\n".join(lines) + "\n")
    trim_log(log, 3)
    assert log.read_text() == '{"step": 1, "loss": 3.0}\n{"step": 2, "loss": 2.5}\n{"step": 3, "loss": 2.0}\n'
    before = log.read_text()
    real = Path.write_text

    def crash(self, text, *a, **kw):  # the power goes out halfway through the write
        real(self, text[:len(text) // 2], *a, **kw)
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "write_text", crash)
    with pytest.raises(KeyboardInterrupt):
        trim_log(log, 1)
    monkeypatch.undo()
    assert log.read_text() == before
    trim_log(tmp_path / "none.jsonl", 1)  # a run stopped before its first log line: nothing to trim
    assert not (tmp_path / "none.jsonl").exists()


def test_restored_rng_states_repeat_the_normal_draws_of_a_cached_pair():
    """Python's random.gauss and NumPy's legacy normal draw their values in pairs and keep the second for the next
    call: restored without it, a resumed run's next normal draw differs from the uninterrupted run's."""
    import random

    from worldvla.train.checkpointing import capture_rng, restore_rng

    old = capture_rng()
    try:
        random.seed(0)
        np.random.seed(0)
        random.gauss(0, 1), np.random.normal(size=1)  # one of a pair drawn: the other is kept for the next call
        state = capture_rng()
        a = ([random.gauss(0, 1) for _ in range(3)], np.random.normal(size=3))
        restore_rng(state)
        b = ([random.gauss(0, 1) for _ in range(3)], np.random.normal(size=3))
    finally:
        restore_rng(old)
    assert a[0] == b[0]
    np.testing.assert_array_equal(a[1], b[1])


def test_a_run_keeps_its_last_two_checkpoints_unless_told_otherwise(tmp_path):
    """--keep-last defaults to 2: a damaged newest checkpoint (a full disk, a copy stopped partway) leaves the one
    before it to resume from."""
    import argparse

    from worldvla.train.checkpointing import add_run_arguments, save_checkpoint

    p = argparse.ArgumentParser()
    add_run_arguments(p, save_every=100, exports="policy")
    args = p.parse_args([])
    assert (args.keep_last, args.save_every, args.stop_after, args.log_every) == (2, 100, 0, 1)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, model, opt, {}, keep_last=args.keep_last)
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*")) == ["step_00000002", "step_00000003"]


def test_a_resume_refuses_a_folder_holding_an_earlier_runs_export_without_its_checkpoints(store_dir, tmp_path):
    """A finished run whose checkpoints were deleted kept its policy and log; --resume there found no checkpoint,
    started a new run, emptied the log and replaced the policy with the new run's, as a fresh run without
    --overwrite no longer may. It is refused before anything is read, the log and the policy left as they were."""
    import shutil

    out = tmp_path / "run"
    trainer.train(args_for(store_dir, out, "--steps", 2, "--batch-tokens", 300))
    exported = next(out / name for name in ("policy", "model") if (out / name).is_dir())
    shutil.rmtree(out / "checkpoints")
    log, made = (out / "metrics.jsonl").read_text(), exported.stat().st_mtime_ns
    with pytest.raises(FileExistsError, match=rf"--resume: {out} holds the exported {exported.name}/ of an earlier run "
                                              r"but not its checkpoints \(they are gone\): there is nothing to continue"
                                              r".*Pass --overwrite instead of --resume to delete it"):
        trainer.train(args_for(store_dir, out, "--steps", 2, "--batch-tokens", 300, "--resume"))
    assert (out / "metrics.jsonl").read_text() == log and exported.stat().st_mtime_ns == made


def test_load_checkpoint_without_a_kind_takes_any_commands_checkpoint_and_can_leave_the_rng_alone(tmp_path):
    """load_checkpoint refuses another command's checkpoint only when told which command loads it (`kind`), and
    restores the RNG states only when asked: loading weights to look at them must not move a caller's RNG."""
    from worldvla.train.checkpointing import save_checkpoint

    model = torch.nn.Linear(3, 2)
    ck = save_checkpoint(tmp_path, 1, model, torch.optim.AdamW(model.parameters()), {"kind": "train-vq"})
    other = torch.nn.Linear(3, 2)
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    assert load_checkpoint(ck, other, restore_rng_state=False)["kind"] == "train-vq"
    assert torch.equal(other.weight, model.weight)
    assert torch.equal(torch.rand(3), expected)
    with pytest.raises(ValueError, match=r"holds a `worldvla train-vq` run, not a `worldvla train` one"):
        load_checkpoint(ck, model, kind="train")


def test_a_state_json_that_is_no_object_or_lacks_its_step_is_refused_naming_the_newest_older_checkpoints(tmp_path):
    """A state.json that reads as JSON but not as an object (a list, a number: edited by hand, or another file
    copied over it) is named as damaged, one without its "step" as lacking it, not with a bare AttributeError or
    KeyError; the refusal names the three newest older checkpoints, the last of which --resume then takes."""
    from worldvla.train.checkpointing import resumable_checkpoint, save_checkpoint

    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    for step in (1, 2, 3, 4, 5):
        ck = save_checkpoint(tmp_path, step, model, opt, {})
    older = (r"resume from an older checkpoint of the run: step_00000002, step_00000003, step_00000004 \(remove "
             rf"{ck}, and --resume continues from step_00000004\)")
    (ck / "state.json").write_text("[5]")
    with pytest.raises(ValueError, match=rf"{ck / 'state.json'}: the checkpoint file cannot be read \(ValueError: a "
                                         rf"JSON list, not an object\); it is damaged or cut short; {older}"):
        resumable_checkpoint(tmp_path)
    (ck / "state.json").write_text('{"args": {}}')
    with pytest.raises(ValueError, match=rf"{ck / 'state.json'}: the checkpoint's state lacks 'step', which a resume "
                                         rf"needs .*; {older}"):
        resumable_checkpoint(tmp_path)


def test_the_stop_agreement_holds_a_stop_agreed_earlier_or_a_sigterm_noted_since():
    """After the last step the run asks once more whether to stop: yes when the ranks had agreed already or a
    SIGTERM came since, no otherwise."""
    from worldvla.train.checkpointing import StopSignal

    s = StopSignal()
    try:
        assert (s.agreed(False, "cpu"), s.agreed(True, "cpu"), s.flag) == (False, True, 0.0)
        s._note(None, None)
        assert (s.agreed(False, "cpu"), s.flag) == (True, 1.0)
    finally:
        s.restore()


def test_a_checkpoint_without_rank_0s_rng_file_warns_that_its_rng_state_starts_fresh(tmp_path, capsys):
    """A checkpoint whose own rank 0 RNG file is lost (a partial copy) is resumed with a warning that names it, as
    for the other ranks' files: rank 0's RNG state starts fresh, and the run no longer repeats the uninterrupted
    one's draws."""
    from worldvla.train.checkpointing import missing_rng_files, save_checkpoint

    model = torch.nn.Linear(3, 2)
    ck = save_checkpoint(tmp_path, 1, model, torch.optim.AdamW(model.parameters()), {})
    (ck / "rng_rank0.pt").unlink()
    assert missing_rng_files(ck, 2) == ["rng_rank0.pt", "rng_rank1.pt"]
    load_checkpoint(ck, model)
    assert "warning: rng_rank0.pt missing (saved by 1 rank(s), resumed by 1)" in capsys.readouterr().out


# ---------------------------------------------------------------------- the run's settings as they act on it
def test_each_step_is_adamw_on_the_weighted_loss_under_the_runs_settings(store_dir, tmp_path):
    """Three steps of two micro-batches each give the weights, losses, gradient norms and learning rates of an
    AdamW written out here on the whole batches: the image weight, the z-loss weight, the clipping bound (the
    gradient norm is above it), both betas, eps, the weight decay and the --min-lr floor each act as given. The log
    names each step's samples and the wall-clock time; train_args.json records the arguments."""
    opts = ("--alpha", 0.5, "--z-weight", 1e-2, "--grad-clip", 0.5, "--beta1", 0.8, "--beta2", 0.9, "--eps", 1e-3,
            "--weight-decay", 0.5, "--warmup", 1, "--min-lr", 1e-3)
    a = args_for(store_dir, tmp_path / "run", "--steps", 3, "--batch-tokens", 300, "--micro-tokens", 150,
                 "--no-export", *opts)
    start = time.time()
    trainer.train(a)
    end = time.time()
    store = TokenStore(store_dir)
    model = trainer._build_model(a, store.layout, torch.device("cpu"), fsdp=False)
    opt = torch.optim.AdamW(model.parameters(), betas=(0.8, 0.9), eps=1e-3, weight_decay=0.5)
    cw = loss_class_weights(store.layout, 0.5)
    batches = trainer.epoch_batches(store.lengths, 300, seed=3, epoch=0)[:3]
    want = []
    for batch, lr in zip(batches, (2e-3, 2e-3, 1.5e-3)):  # the cosine from 2e-3 halfway down to 1e-3 at step 3
        ids, labels, cu = pack([store[i] for i in batch], 300)
        loss, z = model.loss(ids, labels, cu_seqlens=cu, class_weight=cw, z_weight=1e-2)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        opt.param_groups[0]["lr"] = lr
        opt.step()
        opt.zero_grad()
        want.append({"loss": loss.item(), "z": z.item(), "grad_norm": float(norm), "lr": lr, "samples": len(batch)})
    log = read_log(a.out)
    assert all(w["grad_norm"] > 0.5 for w in want)  # the bound clips every step
    assert [{k: r[k] for k in want[0]} for r in log] == [pytest.approx(w, rel=1e-5) for w in want]
    assert all(start <= r["time"] <= end for r in log)
    assert json.loads((tmp_path / "run" / "train_args.json").read_text())["weight_decay"] == 0.5
    got = final_weights(a.out)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(got[k], v, rtol=1e-5, atol=1e-6)


def test_a_resume_in_a_later_epoch_trains_that_epochs_batches(store_dir, tmp_path, monkeypatch, capsys):
    """A run stopped in its second epoch resumes in that epoch's order, not the first epoch's, logs each step's
    number of samples, and ends on the loss of its last step."""
    real, trained = trainer.split_batch, []
    monkeypatch.setattr(trainer, "split_batch", lambda batch, *x: trained.append(batch.tolist()) or real(batch, *x))
    common = ("--steps", 6, "--batch-tokens", 600, "--kinds", "action", "--no-export")
    assert trainer.run(args_for(store_dir, tmp_path / "run", *common, "--stop-after", 4)) == 0
    assert trainer.run(args_for(store_dir, tmp_path / "run", *common, "--resume")) == 0
    store = TokenStore(store_dir, kinds=("action",))
    epochs = [trainer.epoch_batches(store.lengths, 600, 3, e) for e in (0, 1)]
    assert len(epochs[0]) < 4 < len(epochs[0]) + len(epochs[1])  # step 4 is in the second epoch
    want = [b.tolist() for b in epochs[0] + epochs[1]][:6]
    assert trained == want
    log = read_log(tmp_path / "run")
    assert [r["samples"] for r in log] == [len(b) for b in want] and max(map(len, want)) > 1
    assert log[-1]["step"] == 6 and f"step 6: loss {log[-1]['loss']:.4f}; checkpoint" in capsys.readouterr().out


def test_resume_refuses_other_optimizer_schedule_seed_and_model_settings_naming_them(store_dir, tmp_path,
                                                                                      monkeypatch):
    """AdamW's betas and eps, the warm-up and the schedule (restored from the checkpoint: new values would be ignored),
    the seed (the data order), the attention, the positions and the release's loss weights are the run's own."""
    out = tmp_path / "r"
    common = ("--steps", 4, "--batch-tokens", 300, "--no-export")
    trainer.train(args_for(store_dir, out, *common, "--stop-after", 1))
    monkeypatch.setattr(trainer, "_build_model", lambda *a, **k: pytest.fail("the model was built before the check"))
    for change, was in ((("--beta1", 0.8), "--beta1 0.9"), (("--beta2", 0.99), "--beta2 0.95"),
                        (("--eps", 1e-6), "--eps 1e-08"), (("--warmup", 1), "--warmup 2.0"),
                        (("--schedule", "constant"), "--schedule cosine"), (("--seed", 4), "--seed 3"),
                        (("--attention", "causal"), "--attention chunk"), (("--max-positions", 512), "--max-positions 0"),
                        (("--release-loss-weights",), "--release-loss-weights False")):
        with pytest.raises(ValueError, match=rf"started with {was}, not {change[0]} "):
            trainer.train(args_for(store_dir, out, *common, *change, "--resume"))



def test_the_export_records_a_store_given_under_the_home_folder_where_it_is(store_dir, tmp_path, monkeypatch):
    """`--store=~/...` (a ~ the shell leaves) is read from the home folder; the policy records that folder, not
    ./~/..., which an evaluation would look for in vain."""
    from worldvla.inference import policy as policy_mod
    from worldvla.model import ModelConfig

    monkeypatch.setenv("HOME", str(Path(store_dir).parent))
    monkeypatch.chdir(tmp_path)
    given = f"~/{Path(store_dir).name}"
    store = TokenStore(given)
    seen = {}
    monkeypatch.setattr(policy_mod, "save_policy", lambda *a, extra=None, **k: seen.update(extra))
    trainer._export(WorldVLA(ModelConfig.tiny(store.layout)), store, tmp_path, args_for(given, tmp_path / "run",
                                                                                          "--steps", 1))
    assert seen["store"] == str(Path(store_dir).resolve())
    assert trainer._store_fix(given, str(Path(store_dir))).startswith(f"The token store {Path(store_dir)} was rebuilt")

def test_warmup_of_one_is_one_step_and_a_warmup_as_long_as_the_run_is_not_warned_of(capsys):
    """--warmup 1 counts one step (a fraction of the run is given below 1); a warm-up of exactly the run's steps
    reaches --lr at its last step, so only a longer one is warned of."""
    from types import SimpleNamespace

    def steps(w, total):
        return trainer._warmup_steps(SimpleNamespace(warmup=w, lr=1e-3, schedule="cosine", min_lr=None), total)

    assert (steps(1, 100), steps(1.0, 100), steps(2, 2)) == (1, 1, 2)
    assert "warning" not in capsys.readouterr().out
    assert steps(3, 2) == 3 and "--warmup 3 is 3 steps, more than the run's 2" in capsys.readouterr().out


def test_the_export_records_the_sim_camera_config_and_store(store_dir, tmp_path, monkeypatch):
    """The policy's extra metadata names the simulator camera its demos were rendered from (the evaluation renders
    from it), the model config and the token store."""
    from worldvla.inference import policy as policy_mod
    from worldvla.model import ModelConfig

    store = TokenStore(store_dir)
    monkeypatch.setattr(store, "manifest", {**store.manifest, "sim_camera": "corner2"})
    seen = {}
    monkeypatch.setattr(policy_mod, "save_policy", lambda *a, extra=None, **k: seen.update(extra))
    trainer._export(WorldVLA(ModelConfig.tiny(store.layout)), store, tmp_path,
                    args_for(store_dir, tmp_path / "run", "--steps", 1))
    assert (seen["sim_camera"], seen["config"], seen["store"]) == ("corner2", "tiny", str(Path(store_dir).resolve()))


def test_fine_tuning_takes_the_runs_attention_and_dropout(store_dir, tmp_path, monkeypatch):
    """--init of a chunk-mask model without dropout, fine-tuned with --attention causal --dropout 0.3, trains (and
    records) a causal model whose every dropout layer drops 0.3."""
    from worldvla.model import ModelConfig
    from worldvla.tokens import VocabLayout

    layout = VocabLayout.from_dict(TokenStore(store_dir).manifest["layout"])
    WorldVLA(ModelConfig.tiny(layout)).init_weights().save_pretrained(tmp_path / "init")
    built, real = [], trainer._build_model
    monkeypatch.setattr(trainer, "_build_model", lambda *a, **k: built.append(real(*a, **k)) or built[-1])
    trainer.train(args_for(store_dir, tmp_path / "ft", "--steps", 1, "--batch-tokens", 300, "--init",
                           tmp_path / "init", "--attention", "causal", "--dropout", 0.3, "--no-export"))
    ps = [m.p for m in built[0].modules() if isinstance(m, torch.nn.Dropout)]
    assert ps and all(p == 0.3 for p in ps)
    assert built[0].config.attention == "causal"
    state = json.loads((latest_checkpoint(tmp_path / "ft") / "state.json").read_text())
    assert state["model_config"]["attention"] == "causal"


def test_a_built_model_takes_the_runs_seed_init_std_and_gradient_checkpointing(store_dir, tmp_path):
    """--seed and --init-std decide the initial weights of a model built here; --grad-checkpointing reaches it."""
    layout = TokenStore(store_dir).layout

    def build(*extra):
        a = args_for(store_dir, tmp_path, *extra)
        return trainer._build_model(a, layout, torch.device("cpu"), fsdp=False)

    base, same, other_seed = build(), build(), build("--seed", 4)
    wide = build("--init-std", 0.05, "--grad-checkpointing")
    key = "model.embed_tokens.weight"
    assert torch.equal(base.state_dict()[key], same.state_dict()[key])
    assert not torch.equal(base.state_dict()[key], other_seed.state_dict()[key])
    assert float(base.state_dict()[key].std()) == pytest.approx(0.02, rel=0.05)
    assert float(wide.state_dict()[key].std()) == pytest.approx(0.05, rel=0.05)
    assert (base.gradient_checkpointing, wide.gradient_checkpointing) == (False, True)


def test_the_defaults_are_the_documented_ones(tmp_path):
    """The defaults the help and the module's notes give: the release's AdamW, clipping and z-loss weight, and the
    learning rate, warm-up and loss weights chosen for small models."""
    a = trainer.build_parser().parse_args(["--store", "s", "--out", str(tmp_path)])
    want = {"config": "small", "steps": 0, "epochs": 1, "batch_tokens": 8192, "micro_tokens": 0, "lr": 3e-4,
            "min_lr": None, "warmup": 0.01, "schedule": "cosine", "weight_decay": 0.1, "beta1": 0.9, "beta2": 0.95,
            "eps": 1e-8, "grad_clip": 4.0, "alpha": 0.04, "release_loss_weights": False, "z_weight": 1e-5,
            "dropout": 0.0, "init_std": 0.02, "max_positions": 0, "attention": "chunk", "kinds": "", "seed": 0,
            "save_every": 1000}
    assert {k: getattr(a, k) for k in want} == want


def _linear_and_adamw():
    model = torch.nn.Linear(3, 2)
    return model, torch.optim.AdamW(model.parameters())


def test_a_latest_pointer_ending_in_a_newline_still_names_its_checkpoint(tmp_path):
    """A `latest` written by hand or by a shell (`echo step_00000003 > latest`) ends in a newline: it still names
    step 3, not the highest step in the folder (here another run's step 900, which follows no checkpoint)."""
    from worldvla.train.checkpointing import LATEST, save_checkpoint

    model, opt = _linear_and_adamw()
    save_checkpoint(tmp_path, 900, model, opt, {})
    (tmp_path / "checkpoints" / LATEST).unlink()
    ck = save_checkpoint(tmp_path, 3, model, opt, {})
    assert latest_checkpoint(tmp_path) == ck
    (tmp_path / "checkpoints" / LATEST).write_text("step_00000003\n")
    assert latest_checkpoint(tmp_path) == ck
    (tmp_path / "checkpoints" / LATEST).write_text("step_00000004\n")  # no such checkpoint: the highest step
    assert latest_checkpoint(tmp_path).name == "step_00000900"


def test_of_two_checkpoints_written_after_the_pointers_the_higher_step_is_taken(tmp_path):
    """Where two checkpoints both follow the one `latest` names (their pointer writes cut off), the newer of them,
    the higher step, is the run's latest, not the first one past the pointer."""
    from worldvla.train.checkpointing import LATEST, save_checkpoint

    model, opt = _linear_and_adamw()
    first = save_checkpoint(tmp_path, 3, model, opt, {})
    for step in (5, 7):
        ck = save_checkpoint(tmp_path, step, model, opt, {})
        state = json.loads((ck / "state.json").read_text())
        (ck / "state.json").write_text(json.dumps({**state, "follows": first.name}))
    (tmp_path / "checkpoints" / LATEST).write_text(first.name)
    assert latest_checkpoint(tmp_path).name == "step_00000007"


def test_trim_log_keeps_a_record_without_a_step(tmp_path):
    """A log record without a "step" (a note written before the first step) is kept by the trim after a resume,
    not read as a KeyError; the steps past the checkpoint are dropped around it."""
    from worldvla.train.checkpointing import trim_log

    log = tmp_path / "metrics.jsonl"
    log.write_text('{"note": "started"}\n{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.0}\n')
    trim_log(log, 1)
    assert log.read_text() == '{"note": "started"}\n{"step": 1, "loss": 2.0}\n'


def test_a_resume_on_other_data_shows_a_list_of_three_files_whole():
    """A list of exactly three files is shown whole (no "and 0 more"); only a longer one is cut to three and a
    count."""
    import re

    from worldvla.train.checkpointing import check_resume_data

    saved = {"demo_files": ["a.hdf5", "b.hdf5", "c.hdf5"]}
    with pytest.raises(ValueError, match=re.escape("(demo files a.hdf5, b.hdf5, c.hdf5, not a.hdf5, b.hdf5, c.hdf5 "
                                                   "and 1 more)")):
        check_resume_data(saved, {"demo_files": ["a.hdf5", "b.hdf5", "c.hdf5", "d.hdf5"]}, "/runs/r", "unused")


def test_a_checkpoint_holding_keys_of_both_commands_is_not_taken_for_either(tmp_path):
    """A state.json without its "kind" that holds keys of both commands' runs tells neither: it is not refused as
    the other command's run (only a recorded kind, or keys of one command alone, name it)."""
    from worldvla.train.checkpointing import check_state, checkpoint_kind

    both = {"step": 4, "usage": [1, 2], "scheduler": {}}
    assert checkpoint_kind(both) is None
    for kind in ("train", "train-vq"):
        check_state(both, tmp_path / "checkpoints" / "step_00000004", kind)
    assert checkpoint_kind({"step": 4, "usage": [1]}) == "train-vq"
    assert checkpoint_kind({"step": 4, "model_config": {}}) == "train"
    assert checkpoint_kind({**both, "kind": "train"}) == "train"


def test_a_state_json_that_is_not_text_is_refused_naming_it(tmp_path):
    """A state.json of bytes that are no UTF-8 (a binary file copied over it, a disk error) is named as damaged,
    with the older checkpoint to resume from, not a bare UnicodeDecodeError."""
    from worldvla.train.checkpointing import resumable_checkpoint, save_checkpoint

    model, opt = _linear_and_adamw()
    for step in (1, 2):
        ck = save_checkpoint(tmp_path, step, model, opt, {})
    (ck / "state.json").write_bytes(b"\xff\xfe\x00garbage\x80")
    with pytest.raises(ValueError, match=rf"{ck / 'state.json'}: the checkpoint file cannot be read "
                                         r"\(UnicodeDecodeError: .*damaged or cut short; resume from an older "
                                         r"checkpoint of the run: step_00000001"):
        resumable_checkpoint(tmp_path)

