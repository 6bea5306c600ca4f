"""The trainer's edges: where the learning-rate schedule turns and ends, the scheduler's saved state, what a run's
log lines and messages report, and the checks of its arguments."""
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from worldvla.data.store import TokenStore
from worldvla.train import trainer

from test_train import args_for, make_store, read_log


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    """The trainer tests' token store (make_store's demos), built once for this module."""
    return make_store(tmp_path_factory.mktemp("trainstore"))


def _optimizer(lr=1.0):
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)


# ---------------------------------------------------------------------- schedule
def test_a_schedule_of_no_steps_is_refused_naming_the_total():
    with pytest.raises(ValueError, match=r"total=0, warmup=0"):
        trainer.WarmupCosine(_optimizer(), lr=1e-3, total=0)
    with pytest.raises(ValueError, match=r"total=5, warmup=-1"):
        trainer.WarmupCosine(_optimizer(), lr=1e-3, total=5, warmup=-1)


def test_a_warmup_as_long_as_the_run_ends_at_the_peak_rate():
    """A warm-up of all the run's steps: its last step trains at --lr, and stepping past it (the scheduler's
    step after the run's last optimizer step) stays at --lr instead of dividing by the cosine's zero length."""
    opt = _optimizer()
    s = trainer.WarmupCosine(opt, lr=1e-3, total=3, warmup=3, min_lr=1e-4)
    seen = [opt.param_groups[0]["lr"]]
    for _ in range(3):
        s.step()
        seen.append(opt.param_groups[0]["lr"])
    assert seen == pytest.approx([1e-3 / 3, 2e-3 / 3, 1e-3, 1e-3])


def test_the_cosine_stays_at_its_floor_after_the_last_step():
    s = trainer.WarmupCosine(_optimizer(), lr=1e-3, total=10, warmup=2, min_lr=1e-4)
    assert [s.lr_at(k) for k in (10, 11, 15, 30)] == pytest.approx([1e-4] * 4, abs=1e-12)


def test_a_loaded_scheduler_state_sets_the_optimizers_learning_rate():
    """load_state_dict puts the restored step's rate into the optimizer (a fresh one holds step 0's)."""
    a = trainer.WarmupCosine(_optimizer(), lr=1e-3, total=10, warmup=2, min_lr=1e-4)
    for _ in range(6):
        a.step()
    opt = _optimizer()
    b = trainer.WarmupCosine(opt, lr=1e-3, total=10, warmup=2, min_lr=1e-4)
    assert opt.param_groups[0]["lr"] == pytest.approx(5e-4)
    b.load_state_dict(a.state_dict())
    assert b.step_count == 6 and opt.param_groups[0]["lr"] == pytest.approx(a.lr_at(6))
    assert opt.param_groups[0]["lr"] < 1e-3


# ---------------------------------------------------------------------- data order
def test_split_batch_puts_each_sample_into_the_emptiest_bin_that_fits():
    """Four equal samples over two ranks of one micro-step: two each, not all four on the first rank (which they
    would fit) while the other runs an empty bin."""
    lengths = np.array([5, 5, 5, 5])
    bins = trainer.split_batch(np.arange(4), lengths, world=2, micro_tokens=20)
    assert bins == [[[0, 2], [1, 3]]]
    # one rank, two micro-steps: loads of 12 and 11 tokens, not 19 and 4
    bins = trainer.split_batch(np.arange(4), np.array([8, 7, 4, 4]), world=1, micro_tokens=20)
    assert bins == [[[0, 3]], [[1, 2]]]


def test_a_run_of_whole_epochs_counts_each_epochs_own_batches(store_dir, tmp_path):
    """Without --steps, the run's length is the sum of each epoch's number of batches (epochs shuffled
    differently are cut into different numbers of batches), not the first epoch's times --epochs."""
    store = TokenStore(store_dir)
    counts = None
    for bt in range(int(store.lengths.max()), int(store.lengths.sum()) + 1):
        c = [len(trainer.epoch_batches(store.lengths, bt, 3, e)) for e in (0, 1, 2)]
        if sum(c) != 3 * c[0]:
            counts = bt, c
            break
    assert counts is not None
    bt, c = counts
    s = trainer.train(args_for(store_dir, tmp_path / "run", "--epochs", 3, "--batch-tokens", bt, "--stop-after", 1,
                               "--no-export"))
    assert s["total"] == sum(c) != 3 * c[0]


# ---------------------------------------------------------------------- log lines
def test_each_logged_throughput_is_that_of_the_steps_since_the_last_line(store_dir, tmp_path,
                                                                          monkeypatch):
    """tokens_per_s is the tokens of the steps since the previous log line over their time: with a clock that
    ticks one second a reading, each line (--log-every 1) reports its own step's tokens per second."""
    ticks = iter(range(1000))
    monkeypatch.setattr(trainer, "time", SimpleNamespace(perf_counter=lambda: float(next(ticks)), time=time.time))
    a = args_for(store_dir, tmp_path / "run", "--steps", 3, "--batch-tokens", 300, "--log-every", 1, "--no-export")
    trainer.train(a)
    log = read_log(a.out)
    per_step = [r["tokens"] - p for r, p in zip(log, [0] + [r["tokens"] for r in log])]
    assert [r["tokens_per_s"] for r in log] == pytest.approx(per_step)


# ---------------------------------------------------------------------- argument checks
def test_samples_longer_than_the_batch_are_refused_naming_batch_tokens_when_micro_tokens_is_not_given(
        store_dir, tmp_path):
    """Without --micro-tokens a micro-step is the whole batch: the refusal names --batch-tokens, the option to
    raise, not --micro-tokens, which was not given."""
    longest = int(TokenStore(store_dir).lengths.max())
    with pytest.raises(ValueError, match=rf"longer than --batch-tokens {longest - 1} \(the longest has {longest} "
                                         rf"tokens\); raise --batch-tokens") as err:
        trainer.train(args_for(store_dir, tmp_path / "run", "--steps", 1, "--batch-tokens", longest - 1))
    assert "--micro-tokens" not in str(err.value) and not (tmp_path / "run").exists()


def test_the_refusal_of_long_samples_counts_those_longer_than_the_limit(store_dir, tmp_path):
    """At --micro-tokens equal to a sample's length, that sample fits: only the longer ones are counted."""
    lengths = TokenStore(store_dir).lengths
    limit = int(np.unique(lengths)[-2])  # the second-longest length: samples of it fit, longer ones do not
    n = int((lengths > limit).sum())
    assert 0 < n < int((lengths >= limit).sum())
    with pytest.raises(ValueError, match=rf"^{n} sample\(s\) of the store are longer than --micro-tokens {limit} "):
        trainer.train(args_for(store_dir, tmp_path / "run", "--steps", 1, "--batch-tokens", 4 * limit,
                               "--micro-tokens", limit))


# ---------------------------------------------------------------------- export
def test_the_export_records_only_the_kinds_the_store_has_samples_of(store_dir, tmp_path, monkeypatch):
    """A store without world-model samples (built with --no-world) trains an action-only model, whatever --kinds
    selects: the policy records the kinds that had samples, so an evaluation can tell it is action-only."""
    from worldvla.inference import policy as policy_mod
    from worldvla.model import ModelConfig, WorldVLA

    store = TokenStore(store_dir)
    monkeypatch.setattr(store, "kind_counts", lambda: {"world": 0, "action": 5})
    seen = {}
    monkeypatch.setattr(policy_mod, "save_policy", lambda *a, extra=None, **k: seen.update(extra))
    trainer._export(WorldVLA(ModelConfig.tiny(store.layout)), store, tmp_path,
                    args_for(store_dir, tmp_path / "run", "--steps", 1))
    assert seen["kinds"] == ["action"]


def test_a_min_lr_of_zero_under_a_constant_schedule_is_warned_of_as_unused(capsys):
    """--min-lr 0 is a value given, as unused under --schedule constant as any other."""
    args = SimpleNamespace(warmup=0, lr=1e-3, schedule="constant", min_lr=0.0)
    assert trainer._warmup_steps(args, 10) == 0
    assert "warning: --min-lr 0.0 is unused under --schedule constant" in capsys.readouterr().out


def test_a_store_with_no_samples_of_the_kinds_is_refused_naming_it(store_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(TokenStore, "__len__", lambda self: 0)
    with pytest.raises(ValueError, match=rf"the store {store_dir} holds no samples of kinds \('action',\)"):
        trainer.train(args_for(store_dir, tmp_path / "run", "--steps", 1, "--kinds", "action", "--no-export"))
    assert not (tmp_path / "run").exists()


def test_a_min_lr_of_zero_is_the_cosines_floor_not_the_default(store_dir, tmp_path):
    """--min-lr 0 decays to 0, not to the default --lr / 10: halfway down the cosine (step 3 of a warm-up of 1 and
    two decaying steps) the rate is --lr / 2."""
    a = args_for(store_dir, tmp_path / "run", "--steps", 3, "--warmup", 1, "--min-lr", 0, "--batch-tokens", 300,
                 "--no-export")
    trainer.train(a)
    assert [r["lr"] for r in read_log(a.out)] == pytest.approx([2e-3, 2e-3, 1e-3])


def test_a_run_of_whole_epochs_refuses_a_resume_of_another_number_of_epochs(store_dir, tmp_path):
    """Without --steps, --epochs decides the run's length (and its schedule): a resume with another is refused by
    name."""
    common = ("--batch-tokens", 600, "--kinds", "action", "--no-export")
    out = tmp_path / "run"
    trainer.train(args_for(store_dir, out, *common, "--epochs", 2, "--stop-after", 1))
    with pytest.raises(ValueError, match=r"started with --epochs 2, not --epochs 3"):
        trainer.train(args_for(store_dir, out, *common, "--epochs", 3, "--resume"))


# ---------------------------------------------------------------------- saves and the run's end
def test_save_every_one_saves_every_step_once_the_last_at_the_runs_end(store_dir, tmp_path, monkeypatch):
    saved, real = [], trainer._save
    monkeypatch.setattr(trainer, "_save", lambda out, step, *a: saved.append(step) or real(out, step, *a))
    trainer.train(args_for(store_dir, tmp_path / "run", "--steps", 3, "--batch-tokens", 300, "--save-every", 1,
                           "--no-export"))
    assert saved == [1, 2, 3]


def test_a_stop_after_one_step_before_the_end_says_how_to_go_on(store_dir, tmp_path, capsys):
    a = args_for(store_dir, tmp_path / "run", "--steps", 2, "--batch-tokens", 300, "--stop-after", 1, "--no-export")
    assert trainer.run(a) == 0
    assert "stopped at --stop-after, step 1 of 2: to go on" in capsys.readouterr().out


def test_non_square_frames_need_no_vqgan_before_the_run(store_dir, tmp_path, monkeypatch):
    """Only the model is exported for frames that are not square: a store whose VQGAN is gone still trains."""
    store = TokenStore(store_dir)

    def gone():
        raise FileNotFoundError("the VQGAN is gone")

    monkeypatch.setattr(store, "checked_vqgan_path", gone)
    with pytest.raises(FileNotFoundError, match="the VQGAN is gone.*restore it before training"):
        trainer._check_export_inputs(store)
    monkeypatch.setattr(type(store), "image_size", property(lambda self: (32, 48)))
    trainer._check_export_inputs(store)


def test_long_samples_of_every_kind_the_run_trains_on_get_no_advice_to_train_on_none(store_dir, tmp_path):
    """A run on world-model samples alone whose long samples are world-model ones has no other kind to train on:
    the refusal says what they are, not `--kinds ` (an empty list) or a store built without them."""
    store = TokenStore(store_dir, kinds=("world",))
    longest = int(store.lengths.max())
    with pytest.raises(ValueError, match=r"\(the longest has \d+ tokens\); raise --micro-tokens; they are world-model "
                                         r"samples$") as err:
        trainer.train(args_for(store_dir, tmp_path / "run", "--steps", 1, "--kinds", "world", "--batch-tokens",
                               4 * longest, "--micro-tokens", longest - 1))
    assert "--kinds" not in str(err.value) and "--no-world" not in str(err.value)
