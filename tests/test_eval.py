"""PSNR / SSIM on known cases and the Meta-World closed-loop harness on a stand-in env."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from worldvla.eval import metrics
from worldvla.eval.metaworld import RandomPolicy, closed_loop, eval_seeds, format_results


@pytest.fixture(autouse=True)
def _stand_in_tasks(monkeypatch):
    """The stand-in env's tasks count as Meta-World tasks for `evaluate`, which refuses unknown names up front."""
    from worldvla.sim import TASKS

    for task in ("fake-a-v3", "fake-b-v3"):
        monkeypatch.setitem(TASKS, task, "a stand-in task")


def _ssim_reference(x: np.ndarray, y: np.ndarray, L: float) -> float:
    """Direct float64 SSIM: explicit 11x11 Gaussian window at every valid position."""
    g = np.exp(-((np.arange(11) - 5.0) ** 2) / (2 * 1.5 ** 2))
    w = np.outer(g, g)
    w /= w.sum()
    c1, c2 = (0.01 * L) ** 2, (0.03 * L) ** 2
    vals = []
    for c in range(x.shape[0]):
        for i in range(x.shape[1] - 10):
            for j in range(x.shape[2] - 10):
                a, b = x[c, i:i + 11, j:j + 11], y[c, i:i + 11, j:j + 11]
                ma, mb = (w * a).sum(), (w * b).sum()
                va, vb = (w * (a - ma) ** 2).sum(), (w * (b - mb) ** 2).sum()
                cov = (w * (a - ma) * (b - mb)).sum()
                vals.append((2 * ma * mb + c1) * (2 * cov + c2) / ((ma ** 2 + mb ** 2 + c1) * (va + vb + c2)))
    return float(np.mean(vals))


def test_psnr_known_cases():
    rng = np.random.default_rng()
    a = rng.integers(0, 256, size=(2, 13, 17, 3), dtype=np.uint8)
    assert torch.isinf(metrics.psnr(a, a)).all()
    # A constant offset of d levels everywhere: MSE = d^2 exactly.
    b = a.astype(np.int32)
    d = int(rng.integers(1, 20))
    b = np.where(b + d <= 255, b + d, b - d).astype(np.uint8)
    want = 10 * math.log10(255 ** 2 / d ** 2)
    np.testing.assert_allclose(metrics.psnr(a, b).numpy(), want, rtol=1e-12)
    # Float images in [0, 1] (channels first) use data range 1.
    x = torch.rand(3, 3, 9, 11, dtype=torch.float64)
    y = (x + 0.1).clamp(max=1.0)
    mse = ((x - y) ** 2).flatten(1).mean(1)
    np.testing.assert_allclose(metrics.psnr(x, y).numpy(), (10 * torch.log10(1 / mse)).numpy(), rtol=1e-12)


def test_ssim_known_cases():
    rng = np.random.default_rng()
    a = rng.integers(0, 256, size=(19, 23, 3), dtype=np.uint8)
    np.testing.assert_allclose(metrics.ssim(a, a).numpy(), 1.0, atol=1e-12)
    # Two constant images: variances vanish, SSIM = (2ab + C1) / (a^2 + b^2 + C1).
    va, vb = rng.integers(0, 256, size=2)
    c1 = (0.01 * 255) ** 2
    want = (2.0 * va * vb + c1) / (va ** 2 + vb ** 2 + c1)
    sa = np.full((16, 16, 3), va, np.uint8)
    sb = np.full((16, 16, 3), vb, np.uint8)
    np.testing.assert_allclose(metrics.ssim(sa, sb).numpy(), want, rtol=1e-10)
    # Negated contrast around the mean drives SSIM below zero.
    x = torch.rand(1, 1, 24, 24, dtype=torch.float64)
    assert metrics.ssim(x, 1.0 - x).item() < 0
    # Symmetric, and noise lowers it monotonically.
    y = (x + 0.05 * torch.randn_like(x)).clamp(0, 1)
    z = (x + 0.2 * torch.randn_like(x)).clamp(0, 1)
    assert metrics.ssim(x, y).item() == pytest.approx(metrics.ssim(y, x).item(), abs=1e-12)
    assert 1.0 > metrics.ssim(x, y).item() > metrics.ssim(x, z).item()


def test_ssim_matches_direct_reference():
    rng = np.random.default_rng()
    x = rng.integers(0, 256, size=(15, 18, 3), dtype=np.uint8)
    y = np.clip(x.astype(np.int32) + rng.integers(-40, 40, size=x.shape), 0, 255).astype(np.uint8)
    ref = _ssim_reference(np.moveaxis(x, -1, 0).astype(np.float64), np.moveaxis(y, -1, 0).astype(np.float64), 255.0)
    assert metrics.ssim(x, y).item() == pytest.approx(ref, abs=1e-10)
    m = metrics.ssim(x, y, return_map=True)
    assert m.shape == (1, 3, 5, 8)


def test_metric_input_errors():
    a = np.zeros((8, 8, 3), np.uint8) + 7
    with pytest.raises(ValueError, match="differ in shape"):
        metrics.psnr(a, a[:4])
    with pytest.raises(TypeError, match="uint8"):
        metrics.ssim(a.astype(np.int16), a.astype(np.int16))
    s = metrics.summarize([1.0, 3.0, float("inf")])
    assert s["mean"] == 2.0 and s["n_inf"] == 1 and s["n"] == 3


class FakeMetaWorldEnv:
    """Goal reached when the summed x-actions exceed a threshold; frames carry the step."""

    instances: list = []

    def __init__(self, task, image_size, max_steps, camera="corner"):
        self.task, self.image_size, self.max_steps, self.camera = task, image_size, max_steps, camera
        self.instruction = f"solve {task}"
        self.rng = np.random.default_rng()
        self.closed = False
        self.seeds = []
        FakeMetaWorldEnv.instances.append(self)

    def _frame(self):
        f = self.rng.integers(0, 256, size=(self.image_size, self.image_size, 3), dtype=np.uint8)
        f[0, 0, 0] = self.t % 256
        return f

    def reset(self, seed):
        self.seeds.append(seed)
        self.t, self.pos, self.success = 0, 0.0, False
        self.goal = 1.0 + (seed % 3)
        return self._frame()

    def step(self, action):
        assert action.shape == (4,) and np.all(np.abs(action) <= 1)
        self.t += 1
        self.pos += float(action[0])
        self.success = self.success or self.pos >= self.goal
        return self._frame(), 0.0, self.success, self.success or self.t >= self.max_steps

    def close(self):
        self.closed = True


class PushRight:
    """Moves +x in batched chunks; checks the history it is given."""

    chunk_size, action_dim, image_size = 3, 4, 8

    def __init__(self):
        self.seen = []

    def reset(self, instruction):
        self.instruction = instruction

    def act(self, image, history=None):
        assert image.ndim == 4
        if history is not None:
            assert history.shape == image.shape
            # The previous frame is exactly one env step older than the current one.
            assert np.all((image[:, 0, 0, 0].astype(int) - history[:, 0, 0, 0]) % 256 == 1)
        self.seen.append(len(image))
        out = np.zeros((len(image), self.chunk_size, 4))
        out[..., 0] = 0.5
        return out


def test_closed_loop_on_stand_in_env():
    FakeMetaWorldEnv.instances = []
    pol = PushRight()
    r = closed_loop(pol, "fake-v3", episodes=5, n_envs=2, max_steps=30, env_factory=FakeMetaWorldEnv)
    assert r.success_rate == 1.0 and len(r.successes) == 5
    assert r.seeds == eval_seeds("fake-v3", 5) and len(set(r.seeds)) == 5
    # goal g in {1, 2, 3} needs 2g steps at 0.5 per step.
    assert r.steps == [2 * (1 + s % 3) for s in r.seeds]
    assert len(FakeMetaWorldEnv.instances) == 2 and all(e.closed for e in FakeMetaWorldEnv.instances)
    assert max(pol.seen) == 2 and r.latency["queries"] == len(pol.seen)
    assert r.frames is not None and r.frames.shape[1:] == (8, 8, 3) and len(r.frames) == r.steps[0] + 1

    rnd = closed_loop(RandomPolicy(chunk_size=4, seed=1), "fake-v3", episodes=3, n_envs=3, max_steps=6,
                      env_factory=FakeMetaWorldEnv, record=False)
    assert len(rnd.successes) == 3 and all(s <= 6 for s in rnd.steps) and rnd.frames is None
    d = rnd.to_dict()
    assert d["episodes"] == 3 and 0.0 <= d["success_rate"] <= 1.0


def test_closed_loop_receding_horizon():
    """execute=N runs N actions of each chunk, then queries again: same episodes for a policy whose
    chunks repeat one action, one query per step for N=1."""
    full = closed_loop(PushRight(), "fake-v3", episodes=4, n_envs=2, max_steps=30, env_factory=FakeMetaWorldEnv)
    pol = PushRight()
    one = closed_loop(pol, "fake-v3", episodes=4, n_envs=2, max_steps=30, env_factory=FakeMetaWorldEnv, execute=1)
    assert one.steps == full.steps and one.successes == full.successes
    groups = [one.steps[0:2], one.steps[2:4]]
    assert one.latency["queries"] == sum(max(g) for g in groups)
    assert full.latency["queries"] == sum(-(-max(g) // PushRight.chunk_size) for g in groups)
    with pytest.raises(ValueError, match="execute"):
        closed_loop(PushRight(), "fake-v3", episodes=1, env_factory=FakeMetaWorldEnv, execute=0)


def test_execute_beyond_the_chunk_is_refused(tmp_path, monkeypatch):
    """`eval --execute 10` with 5-action chunks ran 5 actions a query and recorded 10 in metrics.json."""
    from worldvla.eval import metaworld as mw

    monkeypatch.setattr(mw, "_default_env_factory", FakeMetaWorldEnv)  # the old code ran these loops
    kw = dict(episodes=1, max_steps=4, n_envs=1, wm_episodes=0, gifs=False, progress=False, env_workers=1)
    with pytest.raises(ValueError, match=r"--execute 4 is more than the chunk size of policy 'p' \(3 actions\); "
                                         r"give --execute 3 or less"):
        mw.evaluate([PushRight()], ["fake-a-v3"], out_dir=tmp_path / "a", variant_names=["p"], execute=4, **kw)
    assert not (tmp_path / "a" / "metrics.json").exists()
    with pytest.raises(ValueError, match="--execute 4 is more than the chunk size"):
        closed_loop(PushRight(), "fake-v3", episodes=1, env_factory=FakeMetaWorldEnv, execute=4)
    assert mw.evaluate([PushRight()], ["fake-a-v3"], out_dir=tmp_path / "b", execute=3, **kw)["execute"] == 3

    class Release(PushRight):  # chunks as long as the model writes them: no size to exceed
        mode = "release"

    closed_loop(Release(), "fake-v3", episodes=1, max_steps=4, env_factory=FakeMetaWorldEnv, execute=4)


def test_eval_names_a_policy_folder_that_is_not_there(tmp_path, monkeypatch, capsys):
    """`--policy '~/run/policy'` (quoted) or a typo was reported as "not a policy folder (no policy.json)"."""
    from worldvla.cli import main

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("WORLDVLA_TRACEBACK", raising=False)
    assert main(["eval", "--policy", "~/nothing", "--tasks", "reach-v3", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert f"worldvla eval: error: {tmp_path / 'nothing'}: no such folder (expected a policy folder); `worldvla " \
           f"train` writes one to <its --out>/policy, `worldvla demo` to worldvla_demo/policy" in err, err


def _tiny_policy(chunk_size):
    from worldvla.inference.policy import WorldVLAPolicy
    from worldvla.model import ModelConfig, WorldVLA
    from worldvla.tokens import ActionTokenizer, VocabLayout
    from worldvla.vqgan import VQGAN, VQGANConfig

    vq = VQGAN(VQGANConfig(ch=32, ch_mult=(1, 1, 1, 1, 1), num_res_blocks=1, z_channels=32, embed_dim=32, n_embed=64))
    lay = VocabLayout.compact(n_image_codes=64)
    model = WorldVLA(ModelConfig.tiny(lay)).init_weights(0.5, torch.Generator().manual_seed(int(torch.randint(0, 1000, ()))))
    return WorldVLAPolicy(model, vq, ActionTokenizer(lay, [-1.0] * 4, [1.0] * 4), chunk_size=chunk_size,
                          image_size=32, mode="sequential")


def test_causal_chunk_decoding_ablation():
    from worldvla.eval.ablations import CausalChunkPolicy

    rng = np.random.default_rng()
    img = rng.integers(0, 256, size=(2, 32, 32, 3), dtype=np.uint8)
    prev = rng.integers(0, 256, size=(2, 32, 32, 3), dtype=np.uint8)
    # One action per chunk: there is no earlier block to hide, so both decoders agree exactly.
    pol = _tiny_policy(1)
    causal = CausalChunkPolicy.from_policy(pol)
    for p in (pol, causal):
        p.reset("open the drawer")
    np.testing.assert_array_equal(pol.act(img, history=prev), causal.act(img, history=prev))
    # Longer chunks: the first action is still identical; the rest see earlier actions only
    # without the mask, and with large random weights they (almost surely) change somewhere.
    pol = _tiny_policy(6)
    causal = CausalChunkPolicy.from_policy(pol)
    for p in (pol, causal):
        p.reset("open the drawer")
    a, b = pol.act(img, history=prev), causal.act(img, history=prev)
    assert a.shape == b.shape == (2, 6, 4)
    np.testing.assert_array_equal(a[:, 0], b[:, 0])
    assert not np.array_equal(a, b)
    assert causal.metadata()["mode"].startswith("causal")


def test_a_causal_copy_of_a_policy_keeps_its_settings_and_the_processs_malloc(monkeypatch):
    """`CausalChunkPolicy.from_policy` decodes the same weights without the chunk mask, with every setting of the
    policy it copies: history, extra, token and cache limits, and the limits a server set on its caches and
    engines; making it leaves the process's malloc settings as they are."""
    from worldvla.eval.ablations import CausalChunkPolicy
    from worldvla.inference import policy as policy_mod
    from worldvla.inference.policy import WorldVLAPolicy

    base = _tiny_policy(3)
    pol = WorldVLAPolicy(base.model, base.vqgan, base.action_tokenizer, chunk_size=3, image_size=32, history=1,
                         mode="sequential", extra={"task": "reach"}, max_new_tokens=77, code_cache_size=5,
                         tune_malloc=False)
    pol.max_prefixes, pol.max_engines, pol.engine_headroom = 3, 9, 128
    tuned = []
    monkeypatch.setattr(policy_mod, "tune_cpu_malloc", lambda: tuned.append(1))
    causal = CausalChunkPolicy.from_policy(pol)
    assert tuned == []
    assert causal.model is pol.model and causal.vqgan is pol.vqgan and causal.mode == "causal"
    for name in ("chunk_size", "image_size", "history", "extra", "max_new_tokens", "code_cache_size", "layout",
                 "max_prefixes", "max_engines", "engine_headroom"):
        assert getattr(causal, name) == getattr(pol, name), name
    assert causal.metadata()["mode"] == "causal (no chunk mask)" and causal.metadata()["history"] == 1


def test_world_model_code_accuracy_against_copy_last():
    """Code accuracy is the share of the target frame's VQ codes predicted exactly; with a static scene
    (every frame the same) keeping the current codes is exactly right, and the model's share matches an
    independent count over its own predictions."""
    from worldvla.eval.metaworld import world_model_metrics
    from worldvla.inference.frames import generate_frames
    from worldvla.vqgan import preprocess

    pol = _tiny_policy(2)
    rng = np.random.default_rng()
    frame = rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    rollouts = [{"frames": np.stack([frame] * 4), "actions": rng.uniform(-1, 1, size=(3, 4)).astype(np.float32)}]
    m = world_model_metrics(pol, rollouts, horizon=2, one_step_points=3)["one_step"]
    assert m["copy_last_code_accuracy"] == 1.0
    with torch.no_grad():
        target = pol.vqgan.encode(preprocess(frame[None]))[0]
    pred = generate_frames(pol.model, pol.vqgan, np.stack([frame] * 3), rollouts[0]["actions"][:, None],
                           layout=pol.layout, action_tokenizer=pol.action_tokenizer,
                           text_tokenizer=pol.text_tokenizer).codes[:, 0]
    assert m["code_accuracy"] == pytest.approx(float((pred == target).double().mean()))
    assert 0.0 <= m["code_accuracy"] <= 1.0


def test_world_model_horizon_is_the_shortest_rollouts_and_at_most_the_asked_one():
    """Rollouts of unequal length (an expert that finished early) are imagined over the steps every one of them
    has: the shortest rollout's length, capped by `horizon`; a rollout with no action is left out."""
    from worldvla.eval.metaworld import world_model_metrics

    pol = _tiny_policy(2)
    rng = np.random.default_rng()

    def rollout(n_actions):
        return {"frames": rng.integers(0, 256, size=(n_actions + 1, 32, 32, 3), dtype=np.uint8),
                "actions": rng.uniform(-1, 1, size=(n_actions, 4)).astype(np.float32)}

    rollouts = [rollout(5), rollout(2), rollout(4), rollout(0)]
    for horizon, want in ((8, 2), (1, 1)):
        m = world_model_metrics(pol, rollouts, horizon=horizon, one_step_points=2)["multi_step"]
        assert m["horizon"] == want and m["rollouts"] == 3
        assert len(m["psnr_per_step"]) == len(m["copy_first_psnr_per_step"]) == want


def test_evaluate_saves_each_closed_loop_and_resumes(tmp_path, monkeypatch):
    """A crash mid-evaluation keeps the finished closed loops (metrics.json marked incomplete);
    a rerun reuses them and runs only the missing ones; new policy files invalidate them."""
    import json

    from worldvla.eval import metaworld as mw
    from worldvla.inference import save_policy

    pol = _tiny_policy(chunk_size=2)
    folder = tmp_path / "policy"
    save_policy(folder, pol.model, pol.vqgan, pol.action_tokenizer, chunk_size=2, image_size=32)
    monkeypatch.setattr(mw, "_default_env_factory", FakeMetaWorldEnv)
    real_closed_loop = mw.closed_loop
    calls = []

    def counting(policy, task, *a, **k):
        calls.append((type(policy).__name__, task))
        if crash_on is not None and calls[-1] == crash_on:
            raise RuntimeError("simulated crash")
        return real_closed_loop(policy, task, *a, **k)

    monkeypatch.setattr(mw, "closed_loop", counting)
    kw = dict(tasks=["fake-a-v3", "fake-b-v3"], episodes=2, max_steps=4, n_envs=2, wm_episodes=0, gifs=False,
              progress=False, env_workers=1, variant_names=["tiny"])
    out = tmp_path / "eval"

    crash_on = ("RandomPolicy", "fake-b-v3")
    with pytest.raises(RuntimeError, match="simulated crash"):
        mw.evaluate([folder], out_dir=out, **kw)
    partial = json.loads((out / "metrics.json").read_text())
    assert partial["complete"] is False
    assert set(partial["variants"]["tiny"]["tasks"]) == {"fake-a-v3", "fake-b-v3"}
    assert set(partial["random"]["tasks"]) == {"fake-a-v3"}
    assert len(calls) == 4

    crash_on, calls[:] = None, []
    full = mw.evaluate([folder], out_dir=out, **kw)
    assert calls == [("RandomPolicy", "fake-b-v3")]  # only the unfinished closed loop ran
    assert full["complete"] is True and json.loads((out / "metrics.json").read_text())["complete"] is True
    for task in kw["tasks"]:
        got, before = full["variants"]["tiny"]["tasks"][task], partial["variants"]["tiny"]["tasks"][task]
        assert got["reused"] and got["episode_success"] == before["episode_success"] and got["seeds"] == before["seeds"]
    assert full["random"]["tasks"]["fake-a-v3"]["reused"] and "reused" not in full["random"]["tasks"]["fake-b-v3"]

    # Other settings, or rewritten policy files, run again; resume=False ignores saved runs.
    calls[:] = []
    mw.evaluate([folder], out_dir=out, **{**kw, "episodes": 3})
    assert len(calls) == 4
    calls[:] = []
    mw.evaluate([folder], out_dir=out, **{**kw, "episodes": 3, "n_envs": 1})  # other batches: rerun
    assert len(calls) == 4
    calls[:] = []
    save_policy(folder, pol.model, pol.vqgan, pol.action_tokenizer, chunk_size=2, image_size=32)
    mw.evaluate([folder], out_dir=out, **{**kw, "episodes": 3})
    assert [c for c in calls if c[0] != "RandomPolicy"] == [("WorldVLAPolicy", "fake-a-v3"), ("WorldVLAPolicy", "fake-b-v3")]
    calls[:] = []
    mw.evaluate([folder], out_dir=out, resume=False, **{**kw, "episodes": 3})
    assert len(calls) == 4
    # A task named twice runs (here: is reused) once and counts once in the means.
    twice = mw.evaluate([folder], out_dir=out, **{**kw, "episodes": 3, "tasks": ["fake-a-v3", "fake-a-v3"]})
    assert twice["tasks"] == ["fake-a-v3"] and twice["variants"]["tiny"]["success_rate"] == \
        twice["variants"]["tiny"]["tasks"]["fake-a-v3"]["success_rate"]


def test_same_named_policy_folders_get_distinct_default_names(tmp_path):
    """`worldvla eval --policy run1/policy run2/policy` used to fail ("pass variant_names")."""
    from worldvla.eval.metaworld import default_variant_names, evaluate

    assert default_variant_names(["run1/policy", "run2/policy"]) == ["run1", "run2"]
    assert default_variant_names(["a/x/policy", "b/x/policy", "c/other"]) == ["a/x", "b/x", "other"]
    assert default_variant_names([tmp_path / "p", tmp_path / "q"]) == ["p", "q"]
    # a run's exported policy/ alone is named after its run, not "policy"
    assert default_variant_names(["runs/wvla/policy"]) == ["wvla"]
    assert default_variant_names(["runs/wvla/policy", "other/wvla"]) == ["wvla", "other"]  # told apart as before
    with pytest.raises(ValueError, match="variant names must differ.*--names"):
        evaluate([PushRight(), PushRight()], ["fake-a-v3"], 1, tmp_path, variant_names=["a", "a"], progress=False)


def test_evaluate_refuses_no_tasks_and_no_envs(tmp_path, capsys):
    """An empty task list used to write a complete metrics.json with a mean of nan; --envs 0 an IndexError."""
    from worldvla.cli import main
    from worldvla.eval.metaworld import evaluate

    with pytest.raises(ValueError, match="no tasks"):
        evaluate([PushRight()], [], 1, tmp_path / "a", progress=False)
    with pytest.raises(ValueError, match="--envs"):
        evaluate([PushRight()], ["fake-a-v3"], 1, tmp_path / "b", n_envs=0, progress=False)
    assert not (tmp_path / "a" / "metrics.json").exists()
    assert main(["eval", "--policy", str(tmp_path), "--tasks", "", "--out", str(tmp_path / "c")]) == 2
    assert "--tasks '' names no task" in capsys.readouterr().err
    for option in ("--envs", "--episodes", "--max-steps", "--wm-horizon", "--execute"):
        with pytest.raises(SystemExit) as e:
            main(["eval", "--policy", str(tmp_path), "--tasks", "x", "--out", str(tmp_path), option, "0"])
        assert e.value.code == 2 and f"argument {option}: must be >= 1" in capsys.readouterr().err


def test_random_baseline_is_seeded_per_task(tmp_path, monkeypatch):
    """A task's random actions do not depend on which tasks ran before it (or were reloaded): each task's
    random policy has its own seed, the same whatever the task order."""
    from worldvla.eval import metaworld as mw

    monkeypatch.setattr(mw, "_default_env_factory", FakeMetaWorldEnv)
    real_closed_loop = mw.closed_loop
    seen = {}

    def spy(policy, task, *a, **k):
        if isinstance(policy, mw.RandomPolicy):
            seen.setdefault(tuple(order), {})[task] = (policy.seed, policy.rng.bit_generator.state["state"]["state"])
        return real_closed_loop(policy, task, *a, **k)

    monkeypatch.setattr(mw, "closed_loop", spy)
    kw = dict(episodes=1, max_steps=3, n_envs=1, wm_episodes=0, gifs=False, progress=False, env_workers=1)
    for order in (["fake-a-v3", "fake-b-v3"], ["fake-b-v3", "fake-a-v3"]):
        mw.evaluate([], tasks=order, out_dir=tmp_path / "-".join(order), **kw)
    first, second = seen.values()
    assert first == second and first["fake-a-v3"][0] != first["fake-b-v3"][0]


def test_psnr_means_keep_identical_frames():
    """An identical pair (infinite PSNR) counts at the cap instead of leaving the mean; missing entries are
    left out."""
    from worldvla.eval.metaworld import PSNR_CAP_DB, _mean_finite

    assert _mean_finite([np.inf, 20.0]) == (PSNR_CAP_DB + 20.0) / 2
    assert _mean_finite([None, 10.0]) == 10.0 and _mean_finite([]) is None


def test_runs_of_other_settings_do_not_overwrite_each_other(tmp_path, monkeypatch):
    """Saved runs were filed by variant and task only: a 1-episode spot check into the same folder replaced
    a 4-episode result, which the next 4-episode run then had to run again."""
    from worldvla.eval import metaworld as mw

    monkeypatch.setattr(mw, "_default_env_factory", FakeMetaWorldEnv)
    kw = dict(max_steps=3, n_envs=1, wm_episodes=0, gifs=False, progress=False, env_workers=1)
    mw.evaluate([], ["fake-a-v3"], 4, tmp_path, **kw)
    mw.evaluate([], ["fake-a-v3"], 1, tmp_path, **kw)
    assert len(list((tmp_path / "runs").glob("*.json"))) == 2
    for episodes in (4, 1):
        m = mw.evaluate([], ["fake-a-v3"], episodes, tmp_path, **kw)
        assert m["random"]["tasks"]["fake-a-v3"]["reused"] and m["random"]["tasks"]["fake-a-v3"]["episodes"] == episodes


def _stand_in_policy_folder(tmp_path, monkeypatch, pol):
    """A policy folder whose loading gives `pol` (its files still key the saved runs)."""
    from worldvla.eval import metaworld as mw

    monkeypatch.setattr(mw, "_default_env_factory", FakeMetaWorldEnv)
    monkeypatch.setattr(mw, "load_policy", lambda path, device=None: pol)
    folder = tmp_path / "policy"
    folder.mkdir()
    (folder / "policy.json").write_text("{}")
    return folder


def test_a_policy_folder_replaced_during_an_evaluation_does_not_lend_it_its_runs(tmp_path, monkeypatch):
    """The folder's fingerprint was taken per task: a new export landing after the first task filed the old
    weights' closed loops of the later tasks under the new files' key, and the next evaluation of the new
    policy reused them. The fingerprint is taken once, before the policy loads."""
    from worldvla.eval import metaworld as mw

    folder = _stand_in_policy_folder(tmp_path, monkeypatch, PushRight())
    real_closed_loop = mw.closed_loop

    def export_lands(policy, task, *a, **k):
        r = real_closed_loop(policy, task, *a, **k)
        if task == "fake-a-v3":
            (folder / "policy.json").write_text('{"new": 1}')
        return r

    monkeypatch.setattr(mw, "closed_loop", export_lands)
    kw = dict(episodes=1, max_steps=4, n_envs=1, wm_episodes=0, gifs=False, progress=False, env_workers=1,
              random_baseline=False, variant_names=["p"])
    mw.evaluate([folder], ["fake-a-v3", "fake-b-v3"], out_dir=tmp_path / "eval", **kw)
    monkeypatch.setattr(mw, "closed_loop", real_closed_loop)
    m = mw.evaluate([folder], ["fake-a-v3", "fake-b-v3"], out_dir=tmp_path / "eval", **kw)
    assert [m["variants"]["p"]["tasks"][t].get("reused", False) for t in m["tasks"]] == [False, False]
    m = mw.evaluate([folder], ["fake-a-v3", "fake-b-v3"], out_dir=tmp_path / "eval", **kw)
    assert [m["variants"]["p"]["tasks"][t].get("reused", False) for t in m["tasks"]] == [True, True]


def test_saved_runs_are_found_whatever_the_variant_is_called(tmp_path, monkeypatch):
    """The variant's name was part of a saved run's key: the same folder under another name (--names, or the
    default names, which change when a folder of the same name is added) ran everything again. So did
    --execute K against no --execute for chunks of K actions (the same runs)."""
    import json

    from worldvla.eval import metaworld as mw

    folder = _stand_in_policy_folder(tmp_path, monkeypatch, PushRight())
    out = tmp_path / "eval"
    (out / "runs").mkdir(parents=True)
    (out / "runs" / "a__fake-a-v3.json").write_text('{"key": "x", "result": {}}')  # saved by earlier versions
    (out / "runs" / "a__fake-a-v3__0123456789abcdef.json").write_text("not json")
    kw = dict(episodes=2, max_steps=8, n_envs=2, wm_episodes=0, gifs=False, progress=False, env_workers=1,
              random_baseline=False)
    first = mw.evaluate([folder], ["fake-a-v3"], out_dir=out, variant_names=["a"], **kw)
    assert "reused" not in first["variants"]["a"]["tasks"]["fake-a-v3"]
    m = mw.evaluate([folder], ["fake-a-v3"], out_dir=out, variant_names=["b"], **kw)
    assert list(m["variants"]) == ["b"] and m["variants"]["b"]["tasks"]["fake-a-v3"]["reused"]
    assert m["variants"]["b"]["tasks"]["fake-a-v3"]["episode_success"] == \
        first["variants"]["a"]["tasks"]["fake-a-v3"]["episode_success"]
    saved = [json.loads(f.read_text()) for f in (out / "runs").glob("fake-a-v3__*.json")]
    assert [r["variant"] for r in saved] == ["a"]  # a label: the lookup went by task and key
    m = mw.evaluate([folder], ["fake-a-v3"], out_dir=out, execute=PushRight.chunk_size, **kw)
    default = mw.default_variant_names([folder])[0]
    assert m["execute"] == 3 and m["variants"][default]["tasks"]["fake-a-v3"]["reused"]
    m = mw.evaluate([folder], ["fake-a-v3"], out_dir=out, execute=2, **kw)
    assert "reused" not in m["variants"][default]["tasks"]["fake-a-v3"]


def test_eval_refuses_more_steps_than_metaworld_before_loading_a_policy(tmp_path, monkeypatch, capsys):
    """`eval --max-steps 600` failed in an env worker once the policies had loaded, as a RuntimeError with two
    tracebacks; refused up front now, in the command's one line, and --help says the limit."""
    import argparse

    from worldvla.cli import main
    from worldvla.eval import metaworld as mw
    from worldvla.sim.metaworld_env import MAX_EPISODE_STEPS

    folder = _stand_in_policy_folder(tmp_path, monkeypatch, None)
    monkeypatch.setattr(mw, "load_policy", lambda *a, **k: pytest.fail("the policy loaded before the check"))
    monkeypatch.delenv("WORLDVLA_TRACEBACK", raising=False)
    assert main(["eval", "--policy", str(folder), "--tasks", "reach-v3", "--max-steps", str(MAX_EPISODE_STEPS + 1),
                 "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"worldvla eval: error: --max-steps must be in [1, {MAX_EPISODE_STEPS}] (Meta-World's own "
                   f"episode limit), got {MAX_EPISODE_STEPS + 1} (WORLDVLA_TRACEBACK=1 shows where)"), err
    assert f"at most {MAX_EPISODE_STEPS}" in " ".join(mw.add_arguments(argparse.ArgumentParser()).format_help().split())


def test_world_model_frames_of_another_size_are_scored_at_the_policys(tmp_path):
    """`policy.imagine` resizes frames to the policy's image_size; the world-model metrics scored 64-px frames
    with a 32-px policy at 64 px and failed on 48-px ones. They are resized as imagine resizes them now."""
    from worldvla.eval.metaworld import world_model_metrics

    pol = _tiny_policy(2)  # 32 px
    rng = np.random.default_rng()
    big = rng.integers(0, 256, (4, 64, 64, 3), dtype=np.uint8)
    actions = rng.uniform(-1, 1, (3, 4)).astype(np.float32)
    got = world_model_metrics(pol, [{"frames": big, "actions": actions}], horizon=2, one_step_points=2)
    want = world_model_metrics(pol, [{"frames": pol._frames(big)[0], "actions": actions}], horizon=2,
                               one_step_points=2)
    assert got["examples"]["imagined"].shape == (3, 32, 32, 3)
    np.testing.assert_array_equal(got["examples"]["real"], want["examples"]["real"])
    for part in ("one_step", "multi_step"):
        for k in ("psnr", "ssim"):
            assert got[part][k] == want[part][k]
    odd = rng.integers(0, 256, (4, 48, 48, 3), dtype=np.uint8)
    assert world_model_metrics(pol, [{"frames": odd, "actions": actions}], horizon=2,
                               one_step_points=2)["examples"]["real"].shape == (3, 32, 32, 3)


def test_closed_loop_and_expert_rollouts_render_from_the_policys_camera(monkeypatch):
    """`evaluate` renders from the camera of the policy's demonstrations; closed_loop and expert_rollouts on
    envs of their own rendered from 'corner' whatever that camera."""
    from worldvla.eval import metaworld as mw
    from worldvla.sim import metaworld_env

    monkeypatch.setattr(mw, "_default_env_factory", FakeMetaWorldEnv)
    monkeypatch.setattr(metaworld_env, "expert_episode", lambda env, seed: {"seed": seed})
    pol = PushRight()
    pol.extra = {"sim_camera": "topview"}
    FakeMetaWorldEnv.instances = []
    closed_loop(pol, "fake-v3", 1, max_steps=2, n_envs=1, record=False)
    mw.expert_rollouts("fake-v3", 1, max_steps=2, policy=pol)
    assert [(e.camera, e.image_size) for e in FakeMetaWorldEnv.instances] == [("topview", 8)] * 2
    FakeMetaWorldEnv.instances = []
    with pytest.warns(UserWarning, match="trained on frames from the 'topview' camera and is evaluated from 'corner'"):
        closed_loop(pol, "fake-v3", 1, max_steps=2, n_envs=1, record=False, camera="corner")
    mw.expert_rollouts("fake-v3", 1, max_steps=2)
    assert [(e.camera, e.image_size) for e in FakeMetaWorldEnv.instances] == [("corner", 8), ("corner", 64)]


def test_an_expert_error_leaves_the_other_envs_replies_read():
    """Expert episodes run side by side in worker processes: an error in one left the others' replies unread,
    to be taken for the next command's. (closed_loop's steps: test_sim.)"""
    from collections import deque

    from worldvla.eval.metaworld import expert_rollouts

    owed = deque()

    class Remote:  # the `RemoteEnv` expert interface, on one pipe
        def __init__(self, fails):
            self.fails = fails

        def expert_async(self, seed):
            owed.append(self)

        def expert_wait(self):
            assert owed.popleft() is self, "replies read out of order"
            if self.fails:
                raise ValueError("the expert failed")
            return {"seed": 0, "success": True}

    with pytest.raises(ValueError, match="the expert failed"):
        expert_rollouts("fake-v3", 3, envs=[Remote(False), Remote(True), Remote(False)])
    assert not owed
    assert len(expert_rollouts("fake-v3", 3, envs=[Remote(False)] * 3)) == 3


def _fake_expert_rollouts(lengths):
    """expert_rollouts stand-in: `lengths[task]` expert actions per rollout (an expert that finishes early)."""
    rng = np.random.default_rng()

    def rollouts(task, episodes, **kw):
        T = lengths[task]
        return [{"frames": rng.integers(0, 256, (T + 1, 32, 32, 3), dtype=np.uint8),
                 "actions": rng.uniform(-1, 1, (T, 4))} for _ in range(episodes)]
    return rollouts


def test_world_model_tasks_of_different_horizons(tmp_path, monkeypatch):
    """A task whose expert finished inside --wm-horizon imagines fewer steps: frame_grid used to refuse the
    rows of unequal length at the very end, and the table labelled every task with the first one's horizon."""
    from PIL import Image

    from worldvla.eval import metaworld as mw

    monkeypatch.setattr(mw, "_default_env_factory", FakeMetaWorldEnv)
    monkeypatch.setattr(mw, "expert_rollouts", _fake_expert_rollouts({"fake-a-v3": 3, "fake-b-v3": 6}))
    m = mw.evaluate([_tiny_policy(2)], ["fake-a-v3", "fake-b-v3"], 1, tmp_path, max_steps=3, n_envs=1,
                    random_baseline=False, wm_episodes=1, wm_horizon=5, progress=False, env_workers=1, gifs=False)
    assert m["complete"] and [m["world_model"][t]["multi_step"]["horizon"] for t in m["tasks"]] == [3, 5]
    grid = np.asarray(Image.open(tmp_path / "world_model_grid.png"))
    assert grid.shape[0] == 4 * (32 + 2) + 2  # real and imagined rows of both tasks
    text = mw.format_results(m)
    assert "imagined 3-step" not in text and "imagined steps per task: fake-a 3, fake-b 5" in text


def test_outputs_a_run_does_not_rewrite_are_removed(tmp_path, monkeypatch):
    """A rerun without world-model metrics left the earlier world_model*.png/gif beside its metrics, and a
    closed loop whose first episode now fails left the earlier <variant>_<task>_success.gif."""
    from worldvla.eval import metaworld as mw

    monkeypatch.setattr(mw, "_default_env_factory", FakeMetaWorldEnv)
    pol = PushRight()  # reaches its goal in 2 to 6 steps
    pol.image_size = 32
    monkeypatch.setattr(mw, "load_policy", lambda path, device=None: pol)
    folder, out = tmp_path / "policy", tmp_path / "eval"
    folder.mkdir()
    (folder / "policy.json").write_text("{}")
    kw = dict(n_envs=1, random_baseline=False, progress=False, env_workers=1, variant_names=["p"], wm_episodes=0)
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    mw.evaluate([folder], ["fake-a-v3"], 1, out, max_steps=40, **kw)
    assert (out / "p_fake-a-v3_success.gif").is_file()
    for name in ("world_model.png", "world_model_grid.png", "world_model_fake-a-v3.gif", "world_model_old-v3.gif"):
        (out / name).write_bytes(b"an earlier run's")
    mw.evaluate([folder], ["fake-a-v3"], 1, out, max_steps=1, **kw)
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "notes.txt", "p_fake-a-v3_failure.gif", "runs",
                                                     "success.png"]
    # A reused result keeps its own GIF and removes the other outcome's.
    (out / "p_fake-a-v3_success.gif").write_bytes(b"an earlier run's")
    m = mw.evaluate([folder], ["fake-a-v3"], 1, out, max_steps=1, **kw)
    assert m["variants"]["p"]["tasks"]["fake-a-v3"]["reused"]
    assert (out / "p_fake-a-v3_failure.gif").is_file() and not (out / "p_fake-a-v3_success.gif").exists()


class ReleaseLike:
    """Like WorldVLAPolicy(mode='release').act on a batch: env i's chunk holds `lengths[i]` actions (a list
    when they differ, as the policy returns them)."""

    image_size, chunk_size = 8, 3

    def __init__(self, lengths):
        self.lengths = lengths

    def reset(self, instruction):
        pass

    def act(self, image, history=None):
        c = [np.full((self.lengths[i % len(self.lengths)], 4), 0.5) for i in range(len(image))]
        return np.stack(c) if len({x.shape for x in c}) == 1 else c


def test_release_chunks_of_different_lengths_run_per_env_and_an_empty_one_fails_its_episode():
    """Batched envs used to abort the whole evaluation for a mode='release' policy whose chunks differ in
    length, and for an empty chunk, where LIBERO fails that episode."""
    r = closed_loop(ReleaseLike([1, 3]), "fake-v3", episodes=4, n_envs=2, max_steps=30, env_factory=FakeMetaWorldEnv,
                    record=False)
    assert r.successes == [True] * 4 and r.steps == [2 * (1 + s % 3) for s in r.seeds]
    r = closed_loop(ReleaseLike([2, 0]), "fake-v3", episodes=4, n_envs=2, max_steps=30, env_factory=FakeMetaWorldEnv,
                    record=False)
    assert r.successes == [True, False, True, False] and r.steps[1] == r.steps[3] == 0
    # Told apart from time-outs in the results and the printed table.
    assert r.to_dict()["ended_without_action"] == 2 and r.no_action == [False, True, False, True]
    table = format_results({"tasks": ["fake-v3"], "variants": {"v": {"tasks": {"fake-v3": r.to_dict()},
                                                                     "success_rate": r.success_rate}}})
    assert "v: episodes failed on a chunk without an action (the model wrote none): fake 2" in table


def test_a_wrong_number_of_chunks_is_refused_by_name():
    """One chunk for a batch of two images used to end in `IndexError: pop from empty list`."""
    from worldvla.eval.rollout import ChunkQuery

    class OneRow(ReleaseLike):
        def act(self, image, history=None):
            return np.full((1, 3, 4), 0.5)

    with pytest.raises(ValueError, match=r"returned 1 chunk\(s\) for 2 images"):
        closed_loop(OneRow([3]), "fake-v3", episodes=2, n_envs=2, max_steps=10, env_factory=FakeMetaWorldEnv,
                    record=False)
    with pytest.raises(ValueError, match=r"returned 1 chunk\(s\) for 2 images"):
        ChunkQuery(OneRow([3]))(np.zeros((2, 8, 8, 3), np.uint8), None)


def test_psnr_refuses_a_float_and_a_uint8_image():
    """A float CHW image in [0, 1] against a uint8 HWC image gave -43 dB (compared across ranges)."""
    rng = np.random.default_rng()
    u8 = rng.integers(0, 256, (1, 8, 8, 3), dtype=np.uint8)
    f = np.moveaxis(u8, -1, 1).astype(np.float32) / 255
    for a, b in ((f, u8), (u8, f), (torch.from_numpy(f), u8)):
        with pytest.raises(TypeError, match="differ in kind.*both as uint8"):
            metrics.psnr(a, b)
    assert torch.isinf(metrics.psnr(torch.from_numpy(u8), u8)).all() and torch.isinf(metrics.psnr(f, f)).all()


def test_gifs_play_at_their_frame_rate(tmp_path):
    """GIFs were written with their delay in seconds where imageio (2.28 and later) takes milliseconds: every
    frame had no delay, so viewers played them at their own speed."""
    from PIL import Image

    from worldvla.eval.plots import save_gif

    frames = np.random.default_rng().integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    for fps, ms in ((4, 250), (20, 50)):
        with Image.open(save_gif(frames, tmp_path / f"{fps}.gif", fps=fps)) as im:
            assert im.n_frames == 3 and im.info["duration"] == ms and im.info["loop"] == 0
    with pytest.raises(ValueError, match="fps must be > 0"):
        save_gif(frames, tmp_path / "x.gif", fps=0)


def test_a_policy_is_evaluated_from_the_camera_of_its_demonstrations(tmp_path, monkeypatch):
    """`collect --camera topview` demos made a policy that was evaluated from the corner camera (frames 71 levels
    apart on average): the camera now travels from the demo files through the store into the policy."""
    from worldvla.data.hdf5 import write_demos
    from worldvla.data.store import TokenStore, build_store
    from worldvla.eval import metaworld as mw

    rng = np.random.default_rng()
    demos = [{"frames": rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8),
              "actions": rng.uniform(-1, 1, (4, 4)).astype(np.float32)}]
    write_demos(tmp_path / "top.hdf5", demos, "reach", attrs={"sim_camera": "topview"})
    write_demos(tmp_path / "plain.hdf5", demos, "reach")
    vq = _tiny_policy(2).vqgan
    for name, want in (("top", "topview"), ("plain", None)):
        store = build_store([tmp_path / f"{name}.hdf5"], tmp_path / f"store_{name}", vq, chunk_size=2,
                            progress=False)
        assert TokenStore(store).manifest["sim_camera"] == want

    pol = _tiny_policy(2)
    monkeypatch.setattr(mw, "_default_env_factory", FakeMetaWorldEnv)
    FakeMetaWorldEnv.instances.clear()
    kw = dict(max_steps=3, n_envs=1, wm_episodes=0, gifs=False, progress=False, env_workers=1, resume=False)
    pol.extra = {"sim_camera": "topview"}
    mw.evaluate([pol], ["fake-a-v3"], 1, tmp_path / "e1", **kw)
    assert {e.camera for e in FakeMetaWorldEnv.instances} == {"topview"}  # the random baseline's envs too
    FakeMetaWorldEnv.instances.clear()
    with pytest.warns(UserWarning, match="trained on frames from the 'topview' camera and is evaluated from 'corner'"):
        mw.evaluate([pol], ["fake-a-v3"], 1, tmp_path / "e2", camera="corner", **kw)
    assert {e.camera for e in FakeMetaWorldEnv.instances} == {"corner"}
    pol.extra = {}
    assert mw.policy_camera(pol) == "corner"
    with pytest.raises(ValueError, match="unknown camera 'top'"):
        mw.policy_camera(pol, "top")


def test_success_rates_carry_their_wilson_interval(tmp_path):
    """Ten episodes a task know a rate to about +-30 points; the results, the table and the bar plot say so."""
    from worldvla.eval import plots
    from worldvla.eval.metrics import success_interval

    lo, hi = success_interval(4, 10)
    assert lo == pytest.approx(0.1682, abs=1e-4) and hi == pytest.approx(0.6873, abs=1e-4)
    assert success_interval(0, 10)[0] == 0.0 and success_interval(10, 10)[1] == 1.0
    with pytest.raises(ValueError, match="successes must be in"):
        success_interval(11, 10)
    r = closed_loop(ReleaseLike([2, 0]), "fake-v3", episodes=4, n_envs=2, max_steps=30, env_factory=FakeMetaWorldEnv,
                    record=False)
    d = r.to_dict()
    assert d["ci95"] == pytest.approx(list(success_interval(2, 4)))
    v = {"tasks": {"fake-v3": d}}
    from worldvla.eval.metaworld import _summarize_variant

    _summarize_variant(v, ["fake-v3"])
    assert v["success_ci95"] == d["ci95"]
    table = format_results({"tasks": ["fake-v3"], "variants": {"v": v}})
    assert "95% CI" in table and f"{d['ci95'][0]:.0%}-{d['ci95'][1]:.0%}" in table
    out = plots.success_bars({"v": {"a": 0.4, "b": 1.0}}, tmp_path / "s.png",
                             intervals={"v": {"a": (0.17, 0.69), "b": (0.72, 1.0), "mean": (0.5, 0.85)}})
    assert out.stat().st_size > 0


def test_ssim_of_small_images_uses_an_odd_window():
    """Images smaller than the 11-tap window take the widest odd window that fits (7 taps at 8 px): an even
    one would have no centre pixel."""
    rng = np.random.default_rng()
    a, b = (rng.integers(0, 256, (2, 8, 8, 3), dtype=np.uint8) for _ in range(2))
    torch.testing.assert_close(metrics.ssim(a, b), metrics.ssim(a, b, window=7), rtol=0, atol=0)
    a, b = (rng.integers(0, 256, (2, 10, 12, 3), dtype=np.uint8) for _ in range(2))
    torch.testing.assert_close(metrics.ssim(a, b), metrics.ssim(a, b, window=9), rtol=0, atol=0)


def test_channels_last_float_images_are_refused():
    """Float images are channels-first: a [N, H, W, 3] batch was read as H channels of W x 3 pixels and scored."""
    x = torch.rand(2, 16, 16, 3)
    for fn in (metrics.psnr, metrics.ssim):
        with pytest.raises(ValueError, match="channels-first .* C = 1 or 3"):
            fn(x, x)
    assert torch.isinf(metrics.psnr(x.movedim(-1, -3), x.movedim(-1, -3))).all()


def _writers():
    from worldvla.eval import plots

    frames = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    return {"success.png": lambda p: plots.success_bars({"a": {"reach-v3": 0.5, "push-v3": 0.25}}, p),
            "world_model.png": lambda p: plots.horizon_curves({"reach": {"psnr": [20, 18], "ssim": [0.8, 0.7]}}, p),
            "grid.png": lambda p: plots.frame_grid([frames, frames[:2]], p, labels=["real", "imagined"]),
            "rollout.gif": lambda p: plots.save_gif(frames, p, fps=4),
            "training.png": lambda p: plots.training_curves(_training_log(p.parent.with_name(p.parent.name + ".jsonl"), 30), p,
                                                            [("loss", "loss", True, True)], "train")}


def _training_log(path, n, extra=""):
    """A metrics.jsonl of n steps: a loss falling over two decades with noise, a constant lr, no grad_norm."""
    import json

    rng = np.random.default_rng(1)
    lines = [json.dumps({"step": s, "loss": float(5.0 * 0.95 ** s * rng.uniform(0.8, 1.2)), "lr": 1e-3})
             for s in range(1, n + 1)]
    path.write_text("\n".join(lines) + "\n" + extra)
    return path


def test_training_curves_draw_each_logged_key_over_the_steps(tmp_path, monkeypatch):
    """One panel per key a record holds (a key none holds is left out), the logged values over their steps (a
    line a crash cut short skipped), a centred trend where smoothed, and a log axis only over a decade or more."""
    from worldvla.eval import plots

    figures = _drawn(monkeypatch)
    log = _training_log(tmp_path / "metrics.jsonl", 100, extra='{"step": 101, "loss": 0.')
    panels = [("loss", "loss", True, True), ("grad_norm", "gradient norm", True, True), ("lr", "lr", True, False)]
    assert plots.training_curves(log, tmp_path / "t.png", panels, "worldvla train").is_file()
    loss_ax, lr_ax, *blank = figures[0]
    assert [loss_ax["ylabel"], lr_ax["ylabel"]] == ["loss", "lr"] and all(not ax["lines"] for ax in blank)
    recs = plots.read_log(log)
    assert [r["step"] for r in recs] == list(range(1, 101))
    (xs, raw, _), (xs2, trend, _) = loss_ax["lines"]
    assert xs == xs2 == list(range(1, 101)) and raw == pytest.approx([r["loss"] for r in recs])
    # the trend is centred: at step 50 the mean of steps 48..52 (a window of 5 over 100 points), no lag
    assert trend[49] == pytest.approx(np.mean(raw[47:52]))
    assert lr_ax["lines"] == [(list(range(1, 101)), [1e-3] * 100, "-")]  # not smoothed: one line
    import matplotlib.pyplot as plt

    scaled = []
    monkeypatch.setattr(plt.Axes, "set_yscale", lambda self, v, **k: scaled.append((self, v)))
    plots.training_curves(log, tmp_path / "t.png", panels, "worldvla train")
    assert [(ax.get_ylabel(), v) for ax, v in scaled] == [("loss", "log")]  # lr spans no decade: linear


def test_training_curves_of_an_empty_or_unrelated_log_write_nothing(tmp_path):
    from worldvla.eval import plots

    log = tmp_path / "metrics.jsonl"
    assert plots.training_curves(log, tmp_path / "t.png", [("loss", "loss", True, True)], "t") is None  # no log yet
    log.write_text("")
    assert plots.training_curves(log, tmp_path / "t.png", [("loss", "loss", True, True)], "t") is None
    _training_log(log, 5)
    assert plots.training_curves(log, tmp_path / "t.png", [("psnr", "PSNR", False, True)], "t") is None
    assert not (tmp_path / "t.png").exists()


def test_smoothing_is_a_centred_mean_that_leaves_nans_out():
    from worldvla.eval.plots import _smoothed

    ramp = np.arange(200, dtype=np.float64)
    np.testing.assert_allclose(_smoothed(ramp)[5:-5], ramp[5:-5])  # a running average would lag by its half width
    y = np.array([1.0, np.nan, 3.0, 5.0])
    np.testing.assert_allclose(_smoothed(y), [1.0, 2.0, 4.0, 4.0])
    assert np.isnan(_smoothed(np.full(3, np.nan))).all()


def test_read_log_keeps_the_records_after_a_damaged_line_and_only_those_of_a_step(tmp_path):
    """A line cut short mid-log (a kill, then a run that appended on) is skipped, not the end of the log: the records
    after it are drawn too. Lines that are no record of a step (a list, a note without a step) are left out."""
    from worldvla.eval import plots

    log = tmp_path / "metrics.jsonl"
    log.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo\n{"step": 2, "loss": 1.5}\n[1, 2]\n'
                   '{"note": "resumed"}\n{"step": 3, "loss": 1.0}\n')
    assert [(r["step"], r["loss"]) for r in plots.read_log(log)] == [(1, 2.0), (2, 1.5), (3, 1.0)]
    assert plots.training_curves(log, tmp_path / "t.png", [("loss", "loss", False, False)], "t").is_file()


def test_training_curves_of_a_key_logged_at_some_steps_only(tmp_path, monkeypatch):
    """A key logged at every other line (an evaluation between logs) keeps its panel, and its trend is the mean of
    the values logged, not pulled toward zero by the lines without one. Three panels take two rows (none dropped),
    and the title names the last logged step (a log every 10 steps: 400, not its 40 lines)."""
    import json

    from worldvla.eval import plots

    figures, titles = _drawn(monkeypatch), []
    keep = plots._save_figure
    monkeypatch.setattr(plots, "_save_figure", lambda fig, path, **kw: titles.append(fig._suptitle.get_text())
                        or keep(fig, path, **kw))
    log = tmp_path / "metrics.jsonl"
    recs = [{"step": 10 * (i + 1), "loss": 1.0 + 0.01 * i, "lr": 1e-3, **({"psnr": 20.0 + i} if i % 2 == 0 else {})}
            for i in range(40)]
    log.write_text("".join(json.dumps(r) + "\n" for r in recs))
    panels = [("loss", "loss", True, True), ("psnr", "PSNR", False, True), ("lr", "lr", False, False)]
    plots.training_curves(log, tmp_path / "t.png", panels, "worldvla train-vq")
    (axes,) = figures
    assert [ax["ylabel"] for ax in axes] == ["loss", "PSNR", "lr", ""]
    (xs, raw, _), (_, trend, _) = axes[1]["lines"]
    assert xs == [10 * (i + 1) for i in range(40)] and np.isnan(raw[1::2]).all()
    # each window of three lines holds one or two logged values of the ramp 20 + i, whose mean is 20 + i (the last
    # line's window holds its left neighbour's alone)
    assert trend == pytest.approx([20.0 + i for i in range(39)] + [58.0])
    assert titles == ["worldvla train-vq (step 400)"]


def test_a_log_axis_needs_a_decade_of_positive_values_and_a_trend_enough_points(tmp_path, monkeypatch):
    """A loss falling from 1.0 to 0.2 (less than a decade) stays on a linear axis; a logged zero (a loss at its floor)
    neither counts toward the decade nor is drawn on a log axis. A log of few lines is drawn without a trend."""
    import json

    import matplotlib.pyplot as plt

    from worldvla.eval import plots

    figures, scaled = _drawn(monkeypatch), []
    monkeypatch.setattr(plt.Axes, "set_yscale", lambda self, v, **k: scaled.append(v))
    log = tmp_path / "metrics.jsonl"

    def draw(values):
        log.write_text("".join(json.dumps({"step": s, "loss": v}) + "\n" for s, v in enumerate(values, 1)))
        plots.training_curves(log, tmp_path / "t.png", [("loss", "loss", True, True)], "t")
        return scaled.pop() if scaled else None

    assert draw([1.0, 0.6, 0.2]) is None
    assert draw([0.0, 1.0, 2.0]) is None
    assert draw([0.0, 1.0, 20.0]) == "log"
    (_, raw, _), = figures[-1][0]["lines"]
    assert np.isnan(raw[0]) and raw[1:] == [1.0, 20.0]
    assert len(figures[-1][0]["lines"]) == 1  # 3 points: no trend
    assert draw(list(np.linspace(1.0, 0.5, 19))) is None and len(figures[-1][0]["lines"]) == 1
    assert draw(list(np.linspace(1.0, 0.5, 20))) is None and len(figures[-1][0]["lines"]) == 2


@pytest.mark.parametrize("name", ["success.png", "world_model.png", "grid.png", "rollout.gif", "training.png"])
def test_figures_are_written_atomically(tmp_path, monkeypatch, name):
    """A rewrite of success.png on a full disk left a corrupt file (metrics.json, written atomically, kept its
    old content): figures and GIFs go to a temporary file that replaces the old one only once complete."""
    import errno
    import os

    import matplotlib.figure
    from PIL import Image

    from worldvla.eval.plots import _pyplot

    write, path = _writers()[name], tmp_path / name
    assert write(path) == path
    with Image.open(path) as im:  # the format follows the name, not the temporary file's .tmp
        assert im.format == ("GIF" if name.endswith(".gif") else "PNG")
    good = path.read_bytes()

    def full_disk(self, fp, *a, **k):  # a few bytes written, then the disk is full
        with open(fp, "wb") as f:
            f.write(b"\x89PNG\r\n")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", full_disk)
    monkeypatch.setattr(Image.Image, "save", full_disk)
    with pytest.raises(OSError, match="No space left"):
        write(path)
    assert path.read_bytes() == good
    assert os.listdir(tmp_path) == [name]  # no temporary file left behind
    assert _pyplot().get_fignums() == []  # nor an open figure


def test_an_unknown_task_is_named_before_any_closed_loop_runs(tmp_path, monkeypatch, capsys):
    """`--tasks reach-v3,drawer-close-v3,raech-v3` ran the first two tasks' closed loops before the typo
    failed; now every name is checked first, and the error names the closest tasks."""
    from worldvla.cli import main
    from worldvla.eval import metaworld as mw
    from worldvla.sim import TASKS

    def make_env(task, *a):  # as the real one: an unknown task fails when its env is built
        if task not in TASKS:
            raise ValueError(f"unknown Meta-World task {task!r}")
        return FakeMetaWorldEnv(task, *a)

    monkeypatch.setattr(mw, "_default_env_factory", make_env)
    real_closed_loop, calls = mw.closed_loop, []

    def counting(policy, task, *a, **k):
        calls.append(task)
        return real_closed_loop(policy, task, *a, **k)

    monkeypatch.setattr(mw, "closed_loop", counting)
    kw = dict(episodes=1, max_steps=3, n_envs=1, wm_episodes=0, gifs=False, progress=False, env_workers=1)
    with pytest.raises(ValueError) as e:
        mw.evaluate([PushRight()], ["fake-a-v3", "reach-v3", "raech-v3", "drawer-opne-v3"], out_dir=tmp_path / "o",
                    **kw)
    assert calls == [] and not (tmp_path / "o").exists()
    msg = str(e.value)
    assert msg.startswith("unknown Meta-World tasks 'raech-v3' (did you mean reach-v3, reach-wall-v3"), msg
    assert "'drawer-opne-v3' (did you mean drawer-open-v3" in msg and "nothing was run: fix --tasks" in msg
    assert "assembly-v3" not in msg  # every unknown name has close ones: no list of all 50
    with pytest.raises(ValueError, match=r"unknown Meta-World task 'zzz'; .*the tasks are assembly-v3, "):
        mw.evaluate([PushRight()], ["zzz"], out_dir=tmp_path / "o", **kw)
    # The command line names the typo before it reads the policy folders.
    monkeypatch.delenv("WORLDVLA_TRACEBACK", raising=False)
    assert main(["eval", "--policy", str(tmp_path / "nowhere"), "--tasks", "reach-v3,raech-v3",
                 "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "worldvla eval: error: unknown Meta-World task 'raech-v3' (did you mean reach-v3" in err, err
    assert calls == [] and not (tmp_path / "o").exists()


def test_every_entry_point_names_an_unknown_task_the_same_way(monkeypatch):
    """The env, `collect`, the demo and `eval` each refused unknown tasks with a message of their own (one with
    close matches, three with all 50 names); they share `worldvla.sim.check_tasks` now."""
    import sys

    from worldvla import demo, sim
    from worldvla.sim import task_list
    from worldvla.eval import metaworld as mw
    from worldvla.sim import metaworld_env

    monkeypatch.setitem(sys.modules, "metaworld", None)  # every name is checked before the simulator loads
    close = "unknown Meta-World task 'raech-v3' (did you mean reach-v3, reach-wall-v3 or drawer-close-v3?); "
    calls = [lambda: metaworld_env.MetaWorldEnv("raech-v3"), lambda: sim.make_env("raech-v3"),
             lambda: metaworld_env._check_task("raech-v3"), lambda: task_list("raech-v3"),
             lambda: task_list(["raech-v3", "raech-v3"]), lambda: demo.DemoConfig(tasks=("raech-v3",)).check(),
             lambda: mw.check_tasks(["raech-v3"]), lambda: sim.check_tasks(["raech-v3"])]
    msgs = []
    for call in calls:
        with pytest.raises(ValueError) as e:
            call()
        msgs.append(str(e.value))
    assert all(m.startswith(close) and "the tasks are" not in m for m in msgs), msgs
    assert msgs[0] == close + "nothing was run: fix the task name"
    assert set(msgs[3:]) == {close + "nothing was run: fix --tasks"}
    assert mw.check_tasks is sim.check_tasks and "check_tasks" in mw.__all__ and "check_tasks" in sim.__all__
    with pytest.raises(ValueError, match=r"^no tasks given"):  # named as no task, before any name is checked
        task_list(" , ")
    with pytest.raises(ValueError, match=r"^--tasks names no task; pass comma-separated Meta-World tasks, such as "
                                         r"button-press-topdown-v3,.* from: assembly-v3, "):
        demo.DemoConfig(tasks=()).check()
    assert task_list("reach-v3, push-v3,reach-v3") == ["reach-v3", "push-v3"]
    assert task_list("all") == list(sim.TASKS)


def test_mse_summary_of_identical_frames_and_refused_inputs():
    a = np.zeros((2, 8, 8, 3), np.uint8)
    b = np.full((2, 8, 8, 3), 10, np.uint8)
    assert metrics.mse(a, b).tolist() == [100.0, 100.0]
    s = metrics.summarize([math.inf, math.inf])  # every frame reproduced exactly
    assert s["mean"] == math.inf and s["n_inf"] == 2 and s["std"] == 0.0
    with pytest.raises(ValueError, match="data_range must be positive"):
        metrics.psnr(a, b, data_range=0)
    for shape in ((2, 8, 8, 4), (2, 3, 8, 8)):  # RGBA, and uint8 channels-first
        with pytest.raises(ValueError, match="channels-last"):
            metrics.psnr(np.zeros(shape, np.uint8), np.zeros(shape, np.uint8))


def test_an_evaluation_inside_the_policy_folder_reuses_its_runs(tmp_path, monkeypatch):
    """The policy's fingerprint hashed every file in its folder: with --out inside it, each evaluation's own
    outputs changed it, so a rerun reused nothing and runs/ grew by a file a run. Only the policy's files
    (policy.json, model/, vqgan/, text_tokenizer.json) count now."""
    from worldvla.eval import metaworld as mw

    folder = _stand_in_policy_folder(tmp_path, monkeypatch, PushRight())
    (folder / "model").mkdir()
    (folder / "model" / "model.safetensors").write_bytes(b"weights")
    kw = dict(episodes=1, max_steps=4, n_envs=1, wm_episodes=0, gifs=False, progress=False, env_workers=1,
              random_baseline=False, variant_names=["p"])
    out = folder / "eval"
    m = mw.evaluate([folder], ["fake-a-v3"], out_dir=out, **kw)
    assert not m["variants"]["p"]["tasks"]["fake-a-v3"].get("reused", False)
    m = mw.evaluate([folder], ["fake-a-v3"], out_dir=out, **kw)
    assert m["variants"]["p"]["tasks"]["fake-a-v3"]["reused"] and len(list((out / "runs").iterdir())) == 1
    before = mw._policy_fingerprint(folder)
    (folder / "notes.txt").write_text("not part of the policy")
    assert mw._policy_fingerprint(folder) == before
    for name in ("model/model.safetensors", "vqgan/config.json", "text_tokenizer.json"):  # the policy's own do
        (folder / name).parent.mkdir(exist_ok=True)
        (folder / name).write_text(name)
        assert mw._policy_fingerprint(folder) != before
        before = mw._policy_fingerprint(folder)


def test_a_variant_named_random_is_refused_beside_the_random_baseline(tmp_path, monkeypatch, capsys):
    """A variant called 'random' shared the baseline's key in the rates and its column in the table: one of
    the two was shown under both."""
    from worldvla.cli import main
    from worldvla.eval import metaworld as mw

    folder = _stand_in_policy_folder(tmp_path, monkeypatch, PushRight())
    kw = dict(episodes=1, max_steps=4, n_envs=1, wm_episodes=0, gifs=False, progress=False, env_workers=1)
    with pytest.raises(ValueError, match=r"a variant is named 'random', the random baseline's name .*--names a,b"):
        mw.evaluate([folder], ["fake-a-v3"], out_dir=tmp_path / "o", variant_names=["random"], **kw)
    random_folder = tmp_path / "random"  # a default name too
    random_folder.mkdir()
    with pytest.raises(ValueError, match="a variant is named 'random'"):
        mw.evaluate([random_folder], ["fake-a-v3"], out_dir=tmp_path / "o", **kw)
    monkeypatch.delenv("WORLDVLA_TRACEBACK", raising=False)
    assert main(["eval", "--policy", str(folder), "--names", "random", "--tasks", "fake-a-v3",
                 "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    assert "--names" in capsys.readouterr().err
    # Without the baseline the name is free.
    m = mw.evaluate([folder], ["fake-a-v3"], out_dir=tmp_path / "o", variant_names=["random"],
                    random_baseline=False, **kw)
    assert list(m["variants"]) == ["random"] and "random" not in m
    assert format_results(m).splitlines()[1].split() == ["task", "random"]


def test_repeated_policy_and_tasks_options_add_up(tmp_path, monkeypatch):
    """`--policy A --policy B` kept only B (nargs="+"), and `--tasks a --tasks b` only b."""
    from worldvla.cli import main
    from worldvla.eval import metaworld as mw

    folders = []
    for name in ("a", "b", "c"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "policy.json").write_text("{}")
        folders.append(str(tmp_path / name))
    got = {}
    monkeypatch.setattr(mw, "evaluate", lambda policies, tasks, *a, **k: got.update(policies=policies, tasks=tasks)
                        or {"tasks": [], "variants": {}})
    monkeypatch.setattr(mw, "format_results", lambda m: "")
    assert main(["eval", "--policy", folders[0], folders[1], "--policy", folders[2], "--tasks", "fake-a-v3",
                 "--tasks", "fake-b-v3", "--out", str(tmp_path / "o")]) == 0
    assert got == {"policies": folders, "tasks": ["fake-a-v3", "fake-b-v3"]}
    # 'all', as `worldvla collect` takes it: every Meta-World task
    assert main(["eval", "--policy", folders[0], "--tasks", "all", "--out", str(tmp_path / "o")]) == 0
    assert got["tasks"] == list(mw.TASKS) and "reach-v3" in got["tasks"]


def test_eval_names_the_tasks_a_policy_never_saw(tmp_path, monkeypatch, capsys):
    """`worldvla eval --tasks door-open-v3` on a policy trained on drawer-open alone ran without a word, its 0%
    taken for what it learned; a policy whose training recorded its instructions now has the unseen tasks named."""
    import json

    from worldvla.cli import main
    from worldvla.eval import metaworld as mw
    from worldvla.sim.metaworld_env import TASKS

    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "policy.json").write_text(json.dumps({"extra": {"instructions": [TASKS["drawer-open-v3"]]}}))
    assert mw.unseen_tasks_note(tmp_path / "p", ["drawer-open-v3"]) is None
    note = mw.unseen_tasks_note(tmp_path / "p", ["drawer-open-v3", "door-open-v3", "reach-v3"])
    assert note.startswith(f"note: {tmp_path / 'p'} was trained on 1 instruction(s) ({TASKS['drawer-open-v3']!r})")
    assert "not on those of door-open-v3, reach-v3:" in note
    (tmp_path / "q").mkdir()
    (tmp_path / "q" / "policy.json").write_text(json.dumps({"extra": {}}))  # a policy that does not say
    assert mw.unseen_tasks_note(tmp_path / "q", ["door-open-v3"]) is None
    monkeypatch.setattr(mw, "evaluate", lambda *a, **k: {"tasks": [], "variants": {}})
    monkeypatch.setattr(mw, "format_results", lambda m: "")
    assert main(["eval", "--policy", str(tmp_path / "p"), str(tmp_path / "q"), "--tasks", "door-open-v3",
                 "--out", str(tmp_path / "o")]) == 0
    err = capsys.readouterr().err
    assert err.count("note:") == 1 and "not on those of door-open-v3" in err


def test_a_policy_json_that_records_no_instruction_list_says_nothing_of_unseen_tasks(tmp_path):
    """policy.json of an older version (no `extra`, or `extra: null`), a damaged one, or instructions that are no list
    of them: the note is left out (the loader names a damaged file), not an error before the evaluation starts, nor a
    substring match against one string."""
    import json

    from worldvla.eval import metaworld as mw
    from worldvla.sim.metaworld_env import TASKS

    for i, text in enumerate([json.dumps({}), json.dumps({"extra": None}), '{"extra": {"instr',
                              json.dumps({"extra": {"instructions": TASKS["drawer-open-v3"] + " " + TASKS["reach-v3"]}})]):
        (tmp_path / str(i)).mkdir()
        (tmp_path / str(i) / "policy.json").write_text(text)
        assert mw.unseen_tasks_note(tmp_path / str(i), ["door-open-v3", "reach-v3"]) is None, text


def test_action_only_reads_the_recorded_kinds_and_the_store(tmp_path):
    """A policy is known to be action-only from the kinds its training recorded, else from its token store (when
    still readable) holding no world-model sample; anything else does not say so."""
    from worldvla.eval.metaworld import action_only

    pol = PushRight()
    assert not action_only(pol)  # no export metadata at all
    for extra, want in (({"kinds": ["action"]}, True), ({"kinds": ["action", "world"]}, False),
                        ({"store": str(tmp_path / "gone")}, False), ({"store": str(tmp_path / "store")}, True),
                        ({"kinds": ["action", "world"], "store": str(tmp_path / "store")}, False)):
        (tmp_path / "store").mkdir(exist_ok=True)
        (tmp_path / "store" / "manifest.json").write_text('{"n_action": 5, "n_world": 0}')
        pol.extra = extra
        assert action_only(pol) == want, extra
    (tmp_path / "store" / "manifest.json").write_text('{"n_action": 5, "n_world": 5}')
    pol.extra = {"store": str(tmp_path / "store")}
    assert not action_only(pol)


@pytest.mark.parametrize("kinds", [["action"], ["action", "world"]])
def test_an_action_only_policys_world_model_scores_are_said_to_be_untrained(tmp_path, monkeypatch, recwarn, kinds):
    """`evaluate` scored an action-only policy as a world model without a word: it warns before the closed loops
    run, marks the scores in metrics.json and says so in the table; a joint policy's scores are not marked."""
    from worldvla.eval import metaworld as mw

    def said():
        return [w for w in recwarn if "trained on action samples only" in str(w.message)]

    monkeypatch.setattr(mw, "_default_env_factory", FakeMetaWorldEnv)
    monkeypatch.setattr(mw, "expert_rollouts", _fake_expert_rollouts({"fake-a-v3": 2}))
    before_loop = []  # the warnings given when the closed loop began
    real_closed_loop = mw.closed_loop
    monkeypatch.setattr(mw, "closed_loop", lambda *a, **k: before_loop.append(len(said())) or real_closed_loop(*a, **k))
    pol = _tiny_policy(2)
    pol.extra = {"kinds": kinds}
    m = mw.evaluate([pol], ["fake-a-v3"], 1, tmp_path, max_steps=2, n_envs=1, random_baseline=False, wm_episodes=1,
                    wm_horizon=1, progress=False, env_workers=1, gifs=False)
    text = mw.format_results(m)
    if kinds == ["action"]:
        assert len(said()) == 1 and "--wm-episodes 0" in str(said()[0].message) and before_loop == [1]
        assert m["world_model"]["action_only"] is True
        assert "trained on action samples only: an untrained world model's scores" in text
    else:
        assert not said() and "action_only" not in m["world_model"] and "untrained" not in text
    assert m["world_model"]["fake-a-v3"]["one_step"]["n"] >= 1  # scored either way


@pytest.mark.parametrize("progress", [True, False])
def test_expert_rollouts_for_the_world_model_show_a_progress_bar(tmp_path, monkeypatch, progress):
    """The expert episodes of the world-model scores ran without a progress bar: they get one, an episode a step,
    hidden as the others are without progress."""
    import tqdm.auto

    from worldvla.eval import metaworld as mw
    from worldvla.sim import metaworld_env

    rng = np.random.default_rng(0)
    monkeypatch.setattr(mw, "_default_env_factory", FakeMetaWorldEnv)
    monkeypatch.setattr(metaworld_env, "expert_episode", lambda env, seed: {
        "frames": rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8), "actions": rng.uniform(-1, 1, (2, 4))})
    bars = []

    class Recording(tqdm.auto.tqdm):
        def __init__(self, *a, desc=None, **k):
            super().__init__(*a, desc=desc, **k)
            self.label, self.counted, self.hidden = desc, 0, self.disable  # (closing a bar disables it)
            bars.append(self)

        def update(self, n=1):
            self.counted += n
            return super().update(n)

    monkeypatch.setattr(tqdm.auto, "tqdm", Recording)
    mw.evaluate([_tiny_policy(2)], ["fake-a-v3", "fake-b-v3"], 1, tmp_path, max_steps=2, n_envs=1,
                random_baseline=False, wm_episodes=2, wm_horizon=1, progress=progress, env_workers=1, gifs=False)
    expert = [b for b in bars if b.label == "expert rollouts"]
    assert len(expert) == 1 and expert[0].total == 2 * 2 and expert[0].counted == 2 * 2
    assert expert[0].hidden != progress


def test_summary_std_is_over_the_finite_values_only():
    """The spread of PSNRs with an identical frame among them (inf) is the finite values' spread, as the
    mean is: an std over every value would be NaN or inf."""
    s = metrics.summarize([1.0, 3.0, float("inf")])
    assert s == {"n": 3, "n_inf": 1, "mean": 2.0, "std": 1.0}
    s = metrics.summarize([5.0, float("inf"), float("inf")])
    assert s == {"n": 3, "n_inf": 2, "mean": 5.0, "std": 0.0}


def test_a_variants_success_rate_is_the_mean_over_every_task():
    """A variant's success rate averages every task's rate, and its interval pools every task's episodes:
    with 2/4 and 4/4 the rate is 0.75 and the interval that of 6 of 8 (not the first task's alone)."""
    from worldvla.eval.metaworld import _summarize_variant
    from worldvla.eval.metrics import success_interval

    v = {"tasks": {"fake-a-v3": {"success_rate": 0.5, "successes": 2, "episodes": 4},
                   "fake-b-v3": {"success_rate": 1.0, "successes": 4, "episodes": 4}}}
    _summarize_variant(v, ["fake-a-v3", "fake-b-v3"])
    assert v["success_rate"] == 0.75
    assert v["success_ci95"] == pytest.approx(list(success_interval(6, 8)))
    assert v["tasks"]["fake-a-v3"]["ci95"] == pytest.approx(list(success_interval(2, 4)))
    assert v["tasks"]["fake-b-v3"]["ci95"] == pytest.approx(list(success_interval(4, 4)))


def test_world_model_predictions_are_scored_against_the_next_frames(monkeypatch):
    """A world model that predicts the simulator's next frames exactly scores the PSNR cap and SSIM 1, one
    step and at every step of a rollout: its frame after action t is frame t+1 of the rollout (scoring it
    against frame t, or the rollout's step k against frame k, would mark an exact model wrong)."""
    from worldvla.eval.metaworld import PSNR_CAP_DB, world_model_metrics
    from worldvla.inference import frames
    from worldvla.inference.frames import FrameRollout

    pol = _tiny_policy(2)  # 32 px
    rng = np.random.default_rng(0)
    video = rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)  # distinct frames
    actions = rng.uniform(-1, 1, (4, 4)).astype(np.float32)
    index = {video[t].tobytes(): t for t in range(len(video))}

    def exact_frames(model, vqgan, image, acts, **kw):  # the simulator's frames after each action
        steps = np.asarray(acts).shape[1]
        out = []
        for img in image:
            t = index[img.tobytes()]
            np.testing.assert_array_equal(np.asarray(acts)[len(out)], actions[t:t + steps])
            out.append(video[t + 1:t + 1 + steps])
        out = np.stack(out)
        codes = vqgan.encode_images(out.reshape(-1, *out.shape[2:]))
        return FrameRollout(codes.view(len(out), steps, *codes.shape[1:]), out)

    monkeypatch.setattr(frames, "generate_frames", exact_frames)
    m = world_model_metrics(pol, [{"frames": video, "actions": actions}], horizon=3, one_step_points=4)
    one, multi = m["one_step"], m["multi_step"]
    assert one["n"] == 4
    assert one["psnr"] == PSNR_CAP_DB and one["ssim"] == pytest.approx(1.0, abs=1e-9)
    assert one["code_accuracy"] == 1.0
    assert multi["horizon"] == 3
    assert multi["psnr_per_step"] == [PSNR_CAP_DB] * 3
    assert multi["ssim_per_step"] == pytest.approx([1.0] * 3, abs=1e-9)
    assert multi["psnr"] == PSNR_CAP_DB


def test_the_causal_ablation_keeps_every_setting_of_the_policy_it_is_made_from():
    """The no-chunk-mask variant differs from its policy in the decoding only: the same weights (not a copy),
    tokenizers, chunk, frame size, history and extra metadata."""
    from worldvla.eval.ablations import CausalChunkPolicy
    from worldvla.inference.policy import WorldVLAPolicy

    base = _tiny_policy(3)
    pol = WorldVLAPolicy(base.model, base.vqgan, base.action_tokenizer, chunk_size=5, image_size=64, history=1,
                         text_tokenizer=base.text_tokenizer, mode="parallel", extra={"trained_on": "reach-v3"})
    causal = CausalChunkPolicy.from_policy(pol)
    assert causal.model is pol.model and causal.vqgan is pol.vqgan
    assert causal.action_tokenizer is pol.action_tokenizer and causal.text_tokenizer is pol.text_tokenizer
    assert (causal.chunk_size, causal.image_size, causal.history, causal.mode) == (5, 64, 1, "causal")
    meta = causal.metadata()
    assert meta["mode"] == "causal (no chunk mask)" and meta["extra"] == {"trained_on": "reach-v3"}
    assert {k: v for k, v in meta.items() if k != "mode"} == {k: v for k, v in pol.metadata().items() if k != "mode"}


def test_the_causal_ablation_keeps_a_policys_own_layout_and_limits():
    """A policy given its layout (the release's image ids read from a tokenizer file), a token budget or a code
    cache size passes them on: the variant took the model's layout, whose image ids may be only assumed."""
    from worldvla.eval.ablations import CausalChunkPolicy
    from worldvla.inference.policy import WorldVLAPolicy

    base = _tiny_policy(3)
    layout = dataclasses.replace(base.layout)
    pol = WorldVLAPolicy(base.model, base.vqgan, base.action_tokenizer, chunk_size=5, image_size=64,
                         text_tokenizer=base.text_tokenizer, layout=layout, max_new_tokens=77, code_cache_size=3)
    causal = CausalChunkPolicy.from_policy(pol)
    assert causal.layout is pol.layout is layout
    assert (causal.max_new_tokens, causal.code_cache_size) == (77, 3)


def test_chunk_queries_are_timed_one_by_one(monkeypatch):
    """Each query's own time (the clock read around policy.act), summarised as mean, median, 90th percentile and
    maximum."""
    from worldvla.eval import rollout

    class Policy:
        def act(self, images, history=None):
            return np.zeros((2, 4))

    query = rollout.ChunkQuery(Policy())
    assert query.latency_summary() == {"queries": 0}
    ticks = iter([0.0, 1.0, 5.0, 7.0, 10.0, 14.0, 20.0, 28.0])  # queries of 1, 2, 4 and 8 s
    monkeypatch.setattr(rollout.time, "perf_counter", lambda: next(ticks))
    for _ in range(4):
        query(np.zeros((8, 8, 3), np.uint8), None)
    monkeypatch.undo()
    assert query.latencies == [1.0, 2.0, 4.0, 8.0]
    assert query.latency_summary() == {"queries": 4, "mean_s": 3.75, "median_s": 3.0,
                                       "p90_s": pytest.approx(6.8), "max_s": 8.0}


def test_a_policy_whose_act_has_no_readable_signature_gets_the_current_frame_only():
    """An `act` whose parameters cannot be read (a compiled function's) is called as the plain interface
    `act(images)`, not given a `history` it may not take."""
    from worldvla.eval.rollout import ChunkQuery

    class CompiledAct:
        __signature__ = "unreadable"  # inspect.signature raises TypeError, as for some compiled callables

        def __init__(self):
            self.seen = []

        def __call__(self, images):
            self.seen.append(images)
            return np.zeros((2, 4))

    act = CompiledAct()
    query = ChunkQuery(type("Policy", (), {"act": act})())
    frame = np.zeros((8, 8, 3), np.uint8)
    assert not query.takes_history
    assert query(frame, np.ones((8, 8, 3), np.uint8)).shape == (2, 4) and act.seen[0] is frame


def test_a_chunk_of_the_wrong_rank_is_refused_by_name():
    """A batch's chunks [N, K, D] for one frame (or one chunk [K, D] for a batch) would run N chunks as actions:
    refused, naming the shapes. `chunks` refuses an image's chunk that is not [K, D]."""
    from worldvla.eval.rollout import ChunkQuery

    class Returns:
        def __init__(self, out):
            self.out = out

        def act(self, images, history=None):
            return self.out

    one, two = np.zeros((8, 8, 3), np.uint8), np.zeros((2, 8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match=r"policy.act returned shape \(1, 3, 4\); expected \[K, D\] for images of "
                                         r"shape \(8, 8, 3\)"):
        ChunkQuery(Returns(np.zeros((1, 3, 4))))(one, None)
    with pytest.raises(ValueError, match=r"returned shape \(3, 4\); expected \[N, K, D\] for images of shape "
                                         r"\(2, 8, 8, 3\)"):
        ChunkQuery(Returns(np.zeros((3, 4))))(two, None)
    with pytest.raises(ValueError, match=r"returned shape \(2, 4\); expected \[N, K, D\]"):
        ChunkQuery(Returns(np.zeros((2, 4)))).chunks(two, None)
    with pytest.raises(ValueError, match=r"chunks of shapes \[\(4,\)\]; each image's chunk must be \[K, D\]"):
        ChunkQuery(Returns([np.zeros((3, 4)), np.zeros(4)])).chunks(two, None)
    with pytest.raises(ValueError, match=r"returned 3 chunk\(s\) for 2 images"):  # a chunk for each image
        ChunkQuery(Returns(np.zeros((3, 3, 4))))(two, None)
    with pytest.raises(ValueError, match=r"returned 3 chunk\(s\) for 2 images"):
        ChunkQuery(Returns(np.zeros((3, 3, 4)))).chunks(two, None)
    got = ChunkQuery(Returns([np.zeros((3, 4)), np.ones((1, 4))])).chunks(two, None)
    assert [c.shape for c in got] == [(3, 4), (1, 4)] and got[1].dtype == np.float64
    assert [c.shape for c in ChunkQuery(Returns([np.zeros((3, 4)), np.zeros((0, 4))])).chunks(two, None)] == \
        [(3, 4), (0, 4)]  # an image may get no action


def test_expert_rollouts_use_other_layouts_than_the_closed_loop(monkeypatch):
    """The world model is scored on expert episodes of their own layout seeds, apart from the closed-loop
    episodes' (`eval_seeds` of seed + 1), each seed once."""
    import worldvla.sim.metaworld_env as sim
    from worldvla.eval.metaworld import expert_rollouts

    class Env:
        def close(self):
            pass

    seen = []
    monkeypatch.setattr(sim, "expert_episode", lambda env, seed: seen.append(seed) or {"seed": seed})
    out = expert_rollouts("reach-v3", 4, seed=7, env_factory=lambda task, size, steps: Env())
    assert seen == [r["seed"] for r in out] == eval_seeds("reach-v3", 4, 8)
    assert not set(seen) & set(eval_seeds("reach-v3", 4, 7)) and len(set(seen)) == 4


def test_closed_loop_queries_carry_the_previous_steps_frame():
    """Each episode's first query has no history; every later one gets the frame of the previous env step
    (PushRight checks that it is exactly one step older)."""

    class Recording(PushRight):
        def act(self, image, history=None):
            self.histories.append(history is not None)
            return super().act(image, history)

    pol = Recording()
    pol.histories = []
    r = closed_loop(pol, "fake-v3", episodes=3, n_envs=1, max_steps=30, env_factory=FakeMetaWorldEnv, execute=1,
                    record=False)
    assert r.success_rate == 1.0 and len(pol.histories) == sum(r.steps)
    expected = [h for s in r.steps for h in [False] + [True] * (s - 1)]
    assert pol.histories == expected


def test_summary_of_nan_values_is_not_infinite():
    """NaN scores (from NaN pixels) are neither finite nor identical frames: they stay out of the mean and of
    n_inf, and a list of NaNs alone has no mean (it was reported as inf, as if every frame were exact)."""
    s = metrics.summarize([float("nan"), 2.0, 4.0])
    assert s == {"n": 3, "n_inf": 0, "mean": 3.0, "std": 1.0}
    s = metrics.summarize([float("nan")])
    assert s["n"] == 1 and s["n_inf"] == 0 and math.isnan(s["mean"])
    s = metrics.summarize([float("nan"), math.inf])  # the exact frame still says so
    assert s["n_inf"] == 1 and s["mean"] == math.inf
    s = metrics.summarize([])
    assert s["n"] == 0 and math.isnan(s["mean"])


def test_success_intervals_hold_their_own_rate_and_end_exactly_at_0_and_1():
    """Every interval of n < 200 episodes holds its rate, and 0 or all successes give an end of exactly 0 or 1:
    floating-point rounding gave 6 of 6 an upper end of 0.9999999999999999 and 0 of 11 a lower end of 2.8e-17,
    77 such pairs in all, so a check of a rate against its interval failed on them."""
    from worldvla.eval.metrics import success_interval

    for n in range(1, 200):
        for k in range(n + 1):
            lo, hi = success_interval(k, n)
            assert 0.0 <= lo <= k / n <= hi <= 1.0, (k, n, lo, hi)
        assert success_interval(0, n)[0] == 0.0 and success_interval(n, n)[1] == 1.0, n


def test_success_interval_refuses_impossible_counts():
    """No episodes, or fewer than zero successes, have no success rate: named, not a division by zero or an
    interval of a negative rate."""
    with pytest.raises(ValueError, match="episodes must be >= 1, got 0"):
        metrics.success_interval(0, 0)
    with pytest.raises(ValueError, match=r"successes must be in \[0, 10\], got -1"):
        metrics.success_interval(-1, 10)


def test_ssim_and_mse_are_per_image_in_a_batch():
    """A batch gets one score per image, not the batch's mean repeated: the identical pair scores SSIM 1 and
    MSE 0 beside the other pair's own values."""
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    b = a.copy()
    b[1] = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    s = metrics.ssim(a, b)
    assert s.shape == (2,) and s[0].item() == pytest.approx(1.0, abs=1e-12)
    assert s[1].item() == pytest.approx(metrics.ssim(a[1], b[1]).item(), abs=1e-12) and s[1] < 0.5
    m = metrics.mse(a, b)
    assert m[0].item() == 0.0 and m[1].item() == metrics.mse(a[1], b[1]).item() > 0


def test_a_given_data_range_is_used_for_float_and_uint8_images():
    """Float frames in [0, 255] with data_range=255 score as the same frames in uint8; a uint8 pair scored with
    L = 2 * 255 gains 20 log10(2) dB and a higher SSIM (larger constants)."""
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    b = np.clip(a.astype(np.int32) + rng.integers(-30, 30, a.shape), 0, 255).astype(np.uint8)
    fa, fb = (torch.from_numpy(np.moveaxis(x, -1, 1).astype(np.float64)) for x in (a, b))
    np.testing.assert_allclose(metrics.psnr(fa, fb, data_range=255).numpy(), metrics.psnr(a, b).numpy(), rtol=1e-12)
    np.testing.assert_allclose(metrics.ssim(fa, fb, data_range=255).numpy(), metrics.ssim(a, b).numpy(), rtol=1e-12)
    np.testing.assert_allclose(metrics.psnr(a, b, data_range=510).numpy(),
                               metrics.psnr(a, b).numpy() + 20 * math.log10(2), rtol=1e-12)
    assert (metrics.ssim(a, b, data_range=510) > metrics.ssim(a, b)).all()


def _drawn(monkeypatch) -> list[list[dict]]:
    """What each figure written by `worldvla.eval.plots` shows, per axes: bar heights, error-bar ends, lines
    (x, y, style) and the y label; read before the figure is saved and closed."""
    from matplotlib.container import ErrorbarContainer

    from worldvla.eval import plots

    figures, save = [], plots._save_figure

    def keep(fig, path, **kw):
        axes = []
        for ax in fig.axes:
            errs = [np.asarray(c.lines[2][0].get_segments()) for c in ax.containers if isinstance(c, ErrorbarContainer)]
            axes.append({"bars": [[p.get_height() for p in c] for c in ax.containers
                                  if not isinstance(c, ErrorbarContainer)],
                         "errors": errs, "ylabel": ax.get_ylabel(),
                         "lines": [(list(ln.get_xdata()), list(ln.get_ydata()), ln.get_linestyle()) for ln in ax.lines
                                   if len(ln.get_xdata())]})
        figures.append(axes)
        return save(fig, path, **kw)

    monkeypatch.setattr(plots, "_save_figure", keep)
    return figures


def test_success_bars_show_the_rates_and_their_intervals_in_percent(tmp_path, monkeypatch):
    """One bar per variant and task in percent, the mean over the tasks a variant has (a task it lacks is no
    zero), and the error bars span each rate's interval (not mirrored about the bar, not in fractions)."""
    from worldvla.eval import plots

    figures = _drawn(monkeypatch)
    rates = {"a": {"t1-v3": 0.5, "t2-v3": 0.25}, "b": {"t1-v3": 1.0}}
    intervals = {"a": {"t1-v3": (0.2, 0.9), "t2-v3": (0.1, 0.7), "mean": (0.3, 0.6)}}  # not centred on the rates
    assert plots.success_bars(rates, tmp_path / "s.png", intervals=intervals).is_file()
    (ax,) = figures[0]
    a, b = ax["bars"]
    assert a == pytest.approx([50.0, 25.0, 37.5])
    assert b[0] == 100.0 and math.isnan(b[1]) and b[2] == 100.0
    (err,) = ax["errors"]  # variant a's: segments from low to high at each bar
    lows, highs = np.sort(err[:, :, 1], axis=1).T
    np.testing.assert_allclose(lows, [20.0, 10.0, 30.0])
    np.testing.assert_allclose(highs, [90.0, 70.0, 60.0])
    assert "Wilson interval" in ax["ylabel"]
    plots.success_bars(rates, tmp_path / "s.png")
    assert figures[1][0]["errors"] == [] and "Wilson" not in figures[1][0]["ylabel"]


def test_horizon_curves_draw_each_metric_in_its_panel_from_step_one(tmp_path, monkeypatch):
    """PSNR on the left panel (labelled PSNR), SSIM on the right, over imagined steps 1..H, each with its own
    dashed reference."""
    from worldvla.eval import plots

    figures = _drawn(monkeypatch)
    curves = {"reach": {"psnr": [20.0, 18.0, 17.0], "ssim": [0.8, 0.7, 0.6], "psnr_ref": [15.0, 14.0, 13.0],
                        "ssim_ref": [0.5, 0.4, 0.3]}}
    plots.horizon_curves(curves, tmp_path / "h.png")
    left, right = figures[0]
    assert "PSNR" in left["ylabel"] and "SSIM" in right["ylabel"]
    assert left["lines"] == [([1, 2, 3], [20.0, 18.0, 17.0], "-"), ([1, 2, 3], [15.0, 14.0, 13.0], "--")]
    assert right["lines"] == [([1, 2, 3], [0.8, 0.7, 0.6], "-"), ([1, 2, 3], [0.5, 0.4, 0.3], "--")]


def test_frame_grid_places_every_frame_in_its_cell(tmp_path):
    """Row i, step t holds frame t of row i, right of the labels; a shorter row ends in white cells."""
    from PIL import Image

    from worldvla.eval import plots

    H, W, pad, T = 6, 5, 2, 3
    rows = [np.stack([np.full((H, W, 3), 10 * (3 * i + t + 1), np.uint8) for t in range(n)])
            for i, n in enumerate((T, 2))]
    grid = np.asarray(Image.open(plots.frame_grid(rows, tmp_path / "g.png", labels=["real", "imagined"], pad=pad)))
    assert grid.shape[0] == 2 * (H + pad) + pad and grid.shape[1] > T * (W + pad) + pad  # room for the labels
    right = grid.shape[1]
    for i in range(2):
        for t in range(T):
            y, x = pad + i * (H + pad), right - (T - t) * (W + pad)  # cells counted from the right edge
            cell = grid[y:y + H, x:x + W]
            want = rows[i][t] if t < len(rows[i]) else np.full((H, W, 3), 255, np.uint8)
            np.testing.assert_array_equal(cell, want, err_msg=f"row {i}, step {t}")


def test_side_by_side_puts_the_second_sequence_right_of_the_first():
    """[T, H, W, 3] twice -> [T, H, 2W + pad, 3]: the first on the left, a white gap, the second on the right;
    the longer sequence is cut to the shorter's length."""
    from worldvla.eval.plots import side_by_side

    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (3, 4, 5, 3), dtype=np.uint8)
    b = rng.integers(0, 256, (2, 4, 5, 3), dtype=np.uint8)
    out = side_by_side(a, b, pad=2)
    assert out.shape == (2, 4, 12, 3)
    np.testing.assert_array_equal(out[:, :, :5], a[:2])
    assert (out[:, :, 5:7] == 255).all()
    np.testing.assert_array_equal(out[:, :, 7:], b)


def test_saved_runs_are_reused_only_under_the_same_seed_camera_and_loading(tmp_path, monkeypatch):
    """A closed loop saved under one evaluation seed, camera or way of loading the policy (device, dtype: its
    metadata) is another run's result under another; more envs than episodes batch the same episodes, so
    their runs are reused."""
    import json

    from worldvla.eval import metaworld as mw

    pol = PushRight()
    loaded_as = {"device": "cpu"}
    pol.metadata = lambda: dict(loaded_as)
    folder = _stand_in_policy_folder(tmp_path, monkeypatch, pol)
    kw = dict(episodes=2, max_steps=8, n_envs=2, wm_episodes=0, gifs=False, progress=False, env_workers=1,
              random_baseline=False, variant_names=["p"])

    def run(**k):
        return mw.evaluate([folder], ["fake-a-v3"], out_dir=tmp_path / "eval", **{**kw, **k})["variants"]["p"][
            "tasks"]["fake-a-v3"]

    assert not run().get("reused")
    assert run()["reused"] and run(n_envs=4)["reused"]
    other_seed = run(seed=1)
    assert not other_seed.get("reused") and other_seed["seeds"] == eval_seeds("fake-a-v3", 2, 1)
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["seed"] == 1
    assert not run(camera="topview").get("reused")
    loaded_as["device"] = "cuda"
    assert not run().get("reused")
    loaded_as["device"] = "cpu"
    assert run()["reused"] and run(seed=1)["reused"] and run(camera="topview")["reused"]


def test_a_release_policys_whole_chunks_are_not_its_first_k_actions(tmp_path, monkeypatch):
    """`--execute K` equals whole chunks for a policy whose chunks are all K long, and reuses their runs; a
    mode='release' policy writes chunks of any length, so its --execute K runs are its own."""
    from worldvla.eval import metaworld as mw

    class Release(ReleaseLike):
        mode = "release"

    folder = _stand_in_policy_folder(tmp_path, monkeypatch, Release([5]))
    kw = dict(episodes=1, max_steps=8, n_envs=1, wm_episodes=0, gifs=False, progress=False, env_workers=1,
              random_baseline=False, variant_names=["p"], out_dir=tmp_path / "eval")
    mw.evaluate([folder], ["fake-a-v3"], **kw)
    m = mw.evaluate([folder], ["fake-a-v3"], execute=Release.chunk_size, **kw)
    assert not m["variants"]["p"]["tasks"]["fake-a-v3"].get("reused")


def test_policy_fingerprints_tell_folders_and_unusual_layouts_apart(tmp_path):
    """Two exports alike in file names, sizes and times (copies, or written within one tick of the clock) are
    two policies; a folder laid out without the usual policy files is told apart by its own files."""
    import os

    from worldvla.eval.metaworld import _policy_fingerprint

    for name in ("one", "two"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "policy.json").write_text("{}")
        os.utime(tmp_path / name / "policy.json", ns=(1_000_000_000, 1_000_000_000))
    assert _policy_fingerprint(tmp_path / "one") != _policy_fingerprint(tmp_path / "two")
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "weights.bin").write_bytes(b"1")
    before = _policy_fingerprint(odd)
    (odd / "weights.bin").write_bytes(b"12")
    assert _policy_fingerprint(odd) != before
    assert _policy_fingerprint(PushRight()) is None


def test_a_saved_run_under_another_key_is_not_reused(tmp_path, monkeypatch):
    """Saved runs are filed under the first 16 hex digits of their key: a file there whose full key differs (a
    clash of those digits) is another run's, and runs again."""
    import json

    from worldvla.eval import metaworld as mw

    folder = _stand_in_policy_folder(tmp_path, monkeypatch, PushRight())
    kw = dict(episodes=1, max_steps=8, n_envs=1, wm_episodes=0, gifs=False, progress=False, env_workers=1,
              random_baseline=False, variant_names=["p"], out_dir=tmp_path / "eval")
    mw.evaluate([folder], ["fake-a-v3"], **kw)
    (saved,) = (tmp_path / "eval" / "runs").glob("*.json")
    run = json.loads(saved.read_text())
    saved.write_text(json.dumps({**run, "key": run["key"][:16] + "0" * 48}))
    assert not mw.evaluate([folder], ["fake-a-v3"], **kw)["variants"]["p"]["tasks"]["fake-a-v3"].get("reused")


def test_runs_saved_without_intervals_get_theirs_and_the_bars_show_each_tasks(tmp_path, monkeypatch):
    """Runs saved before the intervals were recorded are reused with their Wilson interval worked out; the
    success bars show each task's own rate and interval, and the pooled one on the mean."""
    import json

    from worldvla.eval import metaworld as mw
    from worldvla.eval.metrics import success_interval

    # Goals 1-3 at 0.5 a step: 2, 4 or 6 steps; a 4-step limit fails some episodes and not others.
    folder = _stand_in_policy_folder(tmp_path, monkeypatch, PushRight())
    kw = dict(episodes=6, max_steps=4, n_envs=2, wm_episodes=0, gifs=False, progress=False, env_workers=1,
              random_baseline=False, variant_names=["p"], out_dir=tmp_path / "eval")
    tasks = ["fake-a-v3", "fake-b-v3"]
    first = mw.evaluate([folder], tasks, **kw)["variants"]["p"]
    for f in (tmp_path / "eval" / "runs").glob("*.json"):
        run = json.loads(f.read_text())
        del run["result"]["ci95"]
        f.write_text(json.dumps(run))
    figures = _drawn(monkeypatch)
    v = mw.evaluate([folder], tasks, **kw)["variants"]["p"]
    ok = [v["tasks"][t]["successes"] for t in tasks]
    assert all(v["tasks"][t]["reused"] for t in tasks) and len(set(ok)) == 2  # the tasks' rates differ
    for t, k in zip(tasks, ok):
        assert v["tasks"][t]["ci95"] == pytest.approx(list(success_interval(k, 6))) == first["tasks"][t]["ci95"]
    assert v["success_ci95"] == pytest.approx(list(success_interval(sum(ok), 12)))
    (ax,) = figures[0]
    assert ax["bars"] == [pytest.approx([100 * k / 6 for k in ok] + [100 * sum(ok) / 12])]
    lows, highs = np.sort(ax["errors"][0][:, :, 1], axis=1).T
    want = np.asarray([v["tasks"][t]["ci95"] for t in tasks] + [v["success_ci95"]]) * 100
    np.testing.assert_allclose(lows, want[:, 0])
    np.testing.assert_allclose(highs, want[:, 1])


def test_steps_to_success_count_successful_episodes_only():
    """The mean steps to success leave out the failed episodes (which ran to the step limit)."""
    from worldvla.eval.metaworld import TaskResult

    r = TaskResult("t", [1, 2, 3], [True, False, True], [4, 200, 8])
    assert r.to_dict()["mean_steps_to_success"] == 6.0
    assert TaskResult("t", [1], [False], [200]).to_dict()["mean_steps_to_success"] is None


def test_world_model_references_keep_the_right_real_frames(monkeypatch):
    """The one-step reference keeps frame t as the prediction of frame t+1; the multi-step one keeps the
    rollout's first frame at every imagined step k (scored against frame k+1)."""
    from worldvla.eval.metaworld import _mean_finite, world_model_metrics
    from worldvla.inference import frames
    from worldvla.inference.frames import FrameRollout

    pol = _tiny_policy(2)  # 32 px
    rng = np.random.default_rng(0)
    video = rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    actions = rng.uniform(-1, 1, (4, 4)).astype(np.float32)

    def blank_frames(model, vqgan, image, acts, **kw):
        out = np.zeros((len(image), np.asarray(acts).shape[1], 32, 32, 3), np.uint8)
        codes = vqgan.encode_images(out.reshape(-1, 32, 32, 3))
        return FrameRollout(codes.view(*out.shape[:2], *codes.shape[1:]), out)

    monkeypatch.setattr(frames, "generate_frames", blank_frames)
    m = world_model_metrics(pol, [{"frames": video, "actions": actions}], horizon=3, one_step_points=4)
    one, multi = m["one_step"], m["multi_step"]
    assert one["copy_last_psnr"] == pytest.approx(_mean_finite(metrics.psnr(video[:4], video[1:]).numpy()))
    assert one["copy_last_ssim"] == pytest.approx(float(metrics.ssim(video[:4], video[1:]).mean()))
    for k in range(3):
        assert multi["copy_first_psnr_per_step"][k] == pytest.approx(metrics.psnr(video[0], video[k + 1]).item())
        assert multi["copy_first_ssim_per_step"][k] == pytest.approx(metrics.ssim(video[0], video[k + 1]).item())


def test_world_model_means_average_every_task_and_the_curves_show_them(tmp_path, monkeypatch):
    """metrics.json's world-model means are over every task, each from its own score; world_model.png draws
    each task's per-step scores and references."""
    from worldvla.eval import metaworld as mw

    def scores(task_index):
        s = 10.0 * (task_index + 1)
        return {"one_step": {"psnr": s + 1, "ssim": 0.1 * task_index + 0.01, "copy_last_psnr": s + 2,
                             "copy_last_ssim": 0.1 * task_index + 0.02, "vqgan_recon_psnr": s + 3,
                             "vqgan_recon_ssim": 0.1 * task_index + 0.03, "code_accuracy": 0.1 * task_index + 0.04,
                             "copy_last_code_accuracy": 0.1 * task_index + 0.05},
                "multi_step": {"horizon": 2, "psnr": s + 4, "ssim": 0.1 * task_index + 0.06,
                               "psnr_per_step": [s + 5, s + 6], "ssim_per_step": [0.5, 0.4],
                               "copy_first_psnr_per_step": [s, s - 1], "copy_first_ssim_per_step": [0.3, 0.2]}}

    def canned(policy, rollouts, horizon):
        task = rollouts[0]["task"]
        frame = np.zeros((3, 8, 8, 3), np.uint8)
        return {**scores(["fake-a-v3", "fake-b-v3"].index(task)), "examples": {"real": frame, "imagined": frame}}

    pol = PushRight()
    pol.model = None  # a world model to score
    monkeypatch.setattr(mw, "_default_env_factory", FakeMetaWorldEnv)
    monkeypatch.setattr(mw, "expert_rollouts", lambda task, episodes, **k: [{"task": task}] * episodes)
    monkeypatch.setattr(mw, "world_model_metrics", canned)
    figures = _drawn(monkeypatch)
    m = mw.evaluate([pol], ["fake-a-v3", "fake-b-v3"], 1, tmp_path, max_steps=2, n_envs=1, random_baseline=False,
                    wm_episodes=1, progress=False, env_workers=1, gifs=False)
    a, b = scores(0), scores(1)
    want = {f"{part}_{k}": (a[part][k] + b[part][k]) / 2 for part in ("one_step", "multi_step")
            for k in ("psnr", "ssim")}
    for k in ("copy_last_psnr", "copy_last_ssim", "vqgan_recon_psnr", "vqgan_recon_ssim", "code_accuracy",
              "copy_last_code_accuracy"):
        want[k] = (a["one_step"][k] + b["one_step"][k]) / 2
    assert m["world_model"]["mean"] == pytest.approx(want)
    left, right = figures[0]  # world_model.png, before success.png
    psnr_lines = [s["multi_step"][k] for s in (a, b) for k in ("psnr_per_step", "copy_first_psnr_per_step")]
    assert [ln[1] for ln in left["lines"]] == psnr_lines
    assert [ln[1] for ln in right["lines"]] == [[0.5, 0.4], [0.3, 0.2]] * 2


def test_a_camera_given_for_a_policy_that_records_none_is_taken_without_a_warning():
    """A policy that records no camera (exported before cameras were recorded, or trained on demos that do not say)
    is evaluated from the camera asked for, with no warning of a mismatch there is no sign of."""
    import warnings

    from worldvla.eval.metaworld import policy_camera

    for extra in (None, {}, {"sim_camera": None}):
        pol = PushRight()
        pol.extra = extra
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert policy_camera(pol, "topview") == "topview"
            assert policy_camera(RandomPolicy(), "topview") == "topview"


def test_closed_loop_builds_no_more_envs_than_episodes_and_leaves_given_envs_open():
    """Each env is a simulator with a renderer: one episode with n_envs=4 builds one env. Envs passed in are the
    caller's (`evaluate` shares them across variants): they are used as far as the episodes need and left open."""
    FakeMetaWorldEnv.instances = []
    r = closed_loop(PushRight(), "fake-v3", episodes=1, n_envs=4, max_steps=30, env_factory=FakeMetaWorldEnv,
                    record=False)
    assert r.success_rate == 1.0
    assert len(FakeMetaWorldEnv.instances) == 1 and FakeMetaWorldEnv.instances[0].closed
    envs = [FakeMetaWorldEnv("fake-v3", 8, 30) for _ in range(3)]
    r = closed_loop(PushRight(), "fake-v3", episodes=2, envs=envs, record=False)
    assert r.success_rate == 1.0 and [e.seeds for e in envs] == [[r.seeds[0]], [r.seeds[1]], []]
    assert not any(e.closed for e in envs)


def test_actions_beyond_the_bounds_are_run_clipped():
    """Meta-World's actions lie in [-1, 1]: a policy whose actions overshoot (a random baseline drawn from wider
    bounds, a chunk de-normalised past them) has them clipped before the env steps, so 2.0 moves as far as 1.0."""

    class Overshoot(PushRight):
        def act(self, image, history=None):
            return 4.0 * super().act(image, history)  # +2.0 along x

    r = closed_loop(Overshoot(), "fake-v3", episodes=3, n_envs=1, max_steps=30, env_factory=FakeMetaWorldEnv,
                    record=False)
    # goal g in {1, 2, 3} needs g steps at 1.0 per step (the stand-in env refuses actions outside [-1, 1])
    assert r.success_rate == 1.0 and r.steps == [1 + s % 3 for s in r.seeds]
    wide = closed_loop(RandomPolicy(chunk_size=4, seed=3, low=-5.0, high=5.0), "fake-v3", episodes=2, n_envs=1,
                       max_steps=6, env_factory=FakeMetaWorldEnv, record=False)
    assert len(wide.steps) == 2 and all(1 <= s <= 6 for s in wide.steps)


def test_closed_loop_advances_its_progress_bar_an_episode_at_a_time():
    """The bar counts episodes (its total is episodes x tasks x variants), however many envs run them together."""

    class Bar:
        def __init__(self):
            self.n, self.postfix = 0, None

        def update(self, n=1):
            self.n += n

        def set_postfix(self, **kw):
            self.postfix = kw

    bar = Bar()
    closed_loop(PushRight(), "fake-v3", episodes=5, n_envs=2, max_steps=30, env_factory=FakeMetaWorldEnv, record=False,
                progress=bar)
    assert bar.n == 5 and bar.postfix == {"task": "fake", "sr": "100%"}


def test_closed_loop_prompts_with_the_instruction_given_else_the_envs():
    pol = PushRight()
    kw = dict(episodes=1, n_envs=1, max_steps=30, env_factory=FakeMetaWorldEnv, record=False)
    closed_loop(pol, "fake-v3", instruction="push the block to the right", **kw)
    assert pol.instruction == "push the block to the right"
    closed_loop(pol, "fake-v3", **kw)
    assert pol.instruction == "solve fake-v3"


def test_an_episode_that_gets_no_action_fails_even_after_the_goal_was_reached():
    """In an env that goes on after its goal (Meta-World's terminate_on_success=False) an episode that then gets a
    chunk without an action ends there, failed, as the release's loop fails it, and is counted as such."""

    class GoesOn(FakeMetaWorldEnv):
        def step(self, action):
            frame, reward, success, _ = super().step(action)
            return frame, reward, success, self.t >= self.max_steps

    class OneChunkThenNone(ReleaseLike):
        def reset(self, instruction):
            self.calls = 0

        def act(self, image, history=None):
            self.calls += 1
            return np.full((len(image), 6 if self.calls == 1 else 0, 4), 1.0)

    FakeMetaWorldEnv.instances = []
    r = closed_loop(OneChunkThenNone([6]), "fake-v3", episodes=1, n_envs=1, max_steps=30, env_factory=GoesOn,
                    record=False)
    assert FakeMetaWorldEnv.instances[0].success  # the goal was reached within the six actions
    assert r.steps == [6] and r.no_action == [True] and r.successes == [False]


def test_an_expert_error_reads_each_envs_reply_once():
    """After an expert episode fails in its worker, the replies still owed by the others are read, once each; the
    failed env's reply was the error: waiting on it again would wait for a reply that never comes."""
    from worldvla.eval.metaworld import expert_rollouts

    class Remote:
        def __init__(self, fails):
            self.fails, self.waits = fails, 0

        def expert_async(self, seed):
            pass

        def expert_wait(self):
            self.waits += 1
            if self.fails:
                raise ValueError("the expert failed")
            return {"seed": 0, "success": True}

    envs = [Remote(False), Remote(True), Remote(False)]
    with pytest.raises(ValueError, match="the expert failed"):
        expert_rollouts("fake-v3", 3, envs=envs)
    assert [e.waits for e in envs] == [1, 1, 1]


def test_expert_rollouts_close_the_env_they_build(monkeypatch):
    """The env built for the expert episodes (a simulator and its renderer) is closed after them, and after an
    expert episode that fails."""
    from worldvla.eval.metaworld import expert_rollouts
    from worldvla.sim import metaworld_env

    FakeMetaWorldEnv.instances = []
    monkeypatch.setattr(metaworld_env, "expert_episode", lambda env, seed: {"seed": seed})
    assert len(expert_rollouts("fake-v3", 2, env_factory=FakeMetaWorldEnv)) == 2

    def fails(env, seed):
        raise RuntimeError("the expert failed")

    monkeypatch.setattr(metaworld_env, "expert_episode", fails)
    with pytest.raises(RuntimeError, match="the expert failed"):
        expert_rollouts("fake-v3", 2, env_factory=FakeMetaWorldEnv)
    assert len(FakeMetaWorldEnv.instances) == 2 and all(e.closed for e in FakeMetaWorldEnv.instances)


def test_a_store_or_kinds_that_do_not_count_world_samples_do_not_make_a_policy_action_only(tmp_path):
    """A store whose build stopped before its counts were summed has no n_world: it does not say the model saw no
    world-model sample. An empty list of recorded kinds says nothing either, and the store is read instead."""
    from worldvla.eval.metaworld import action_only

    pol = PushRight()
    store = tmp_path / "store"
    store.mkdir()
    (store / "manifest.json").write_text('{"shards": [], "complete": false}')
    pol.extra = {"store": str(store)}
    assert not action_only(pol)
    (store / "manifest.json").write_text('{"n_action": 5, "n_world": 5}')
    pol.extra = {"kinds": [], "store": str(store)}
    assert not action_only(pol)
    (store / "manifest.json").write_text('{"n_action": 5, "n_world": 0}')
    assert action_only(pol)


def test_a_policy_folder_named_by_a_relative_path_keeps_its_fingerprint(tmp_path, monkeypatch):
    """`evaluate(["runs/x/policy"], ...)` from the project folder and the same folder by its absolute path (or by
    another spelling of it) are one policy, whose saved runs each finds."""
    from worldvla.eval.metaworld import _policy_fingerprint

    folder = tmp_path / "runs" / "x" / "policy"
    folder.mkdir(parents=True)
    (folder / "policy.json").write_text("{}")
    absolute = _policy_fingerprint(folder)
    monkeypatch.chdir(tmp_path)
    assert _policy_fingerprint("runs/x/policy") == _policy_fingerprint("./runs/x/policy") == absolute
    monkeypatch.chdir(tmp_path / "runs")
    assert _policy_fingerprint("x/../x/policy") == absolute


def test_a_damaged_saved_run_is_run_again(tmp_path, monkeypatch):
    """A saved run cut short (a copy stopped partway) or holding no result's record is no finished closed loop: the
    evaluation runs it again and rewrites its file, instead of failing on it."""
    import json

    from worldvla.eval import metaworld as mw

    folder = _stand_in_policy_folder(tmp_path, monkeypatch, PushRight())
    kw = dict(episodes=2, max_steps=8, n_envs=2, wm_episodes=0, gifs=False, progress=False, env_workers=1,
              random_baseline=False, variant_names=["p"], out_dir=tmp_path / "eval")
    first = mw.evaluate([folder], ["fake-a-v3"], **kw)["variants"]["p"]["tasks"]["fake-a-v3"]
    (saved,) = (tmp_path / "eval" / "runs").glob("*.json")
    text = saved.read_text()
    for damaged in (text[:len(text) // 2], *(json.dumps({**json.loads(text), "result": r}) for r in (None, []))):
        saved.write_text(damaged)
        again = mw.evaluate([folder], ["fake-a-v3"], **kw)["variants"]["p"]["tasks"]["fake-a-v3"]
        assert not again.get("reused") and again["episode_success"] == first["episode_success"]
        assert json.loads(saved.read_text())["result"]["episode_success"] == first["episode_success"]


def test_saved_runs_and_metrics_are_written_atomically(tmp_path, monkeypatch):
    """A disk that fills up while a rerun rewrites a saved run or metrics.json must leave the earlier file whole (a
    half-written run would be taken for a damaged one, a half-written metrics.json would be unreadable), and no
    temporary file behind."""
    import errno
    import json
    import pathlib

    from worldvla.eval import metaworld as mw

    folder = _stand_in_policy_folder(tmp_path, monkeypatch, PushRight())
    kw = dict(episodes=2, max_steps=8, n_envs=2, wm_episodes=0, gifs=False, progress=False, env_workers=1,
              random_baseline=False, variant_names=["p"], out_dir=tmp_path / "eval", resume=False)
    mw.evaluate([folder], ["fake-a-v3"], **kw)
    out = tmp_path / "eval"
    (saved,) = (out / "runs").glob("*.json")
    real_write_text = pathlib.Path.write_text
    for target in (saved, out / "metrics.json"):
        before = target.read_text()

        def full_disk(self, data, *a, **k):
            if target.name in self.name:  # the file, or a temporary file beside it
                real_write_text(self, data[:10], *a, **k)
                raise OSError(errno.ENOSPC, "No space left on device")
            return real_write_text(self, data, *a, **k)

        monkeypatch.setattr(pathlib.Path, "write_text", full_disk)
        with pytest.raises(OSError, match="No space left"):
            mw.evaluate([folder], ["fake-a-v3"], **kw)
        monkeypatch.setattr(pathlib.Path, "write_text", real_write_text)
        assert target.read_text() == before and json.loads(before)
        assert [p.name for p in (out / "runs").iterdir()] == [saved.name]
        assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "runs", "success.png"]


def test_the_random_baseline_runs_chunks_of_the_policys_size(tmp_path, monkeypatch):
    """Chance level is measured as the policy acts: in chunks of its size, so that `--execute 8` for a policy of
    8-action chunks runs the baseline too (the baseline's default is 5 actions)."""
    from worldvla.eval import metaworld as mw

    class Long(PushRight):
        chunk_size = 8

    monkeypatch.setattr(mw, "_default_env_factory", FakeMetaWorldEnv)
    m = mw.evaluate([Long()], ["fake-a-v3"], 2, tmp_path, max_steps=8, n_envs=1, wm_episodes=0, gifs=False,
                    progress=False, env_workers=1, execute=8)
    assert m["random"]["chunk_size"] == 8
    assert m["random"]["tasks"]["fake-a-v3"]["latency"]["queries"] == 2  # one 8-action chunk an episode


def test_reused_runs_fill_the_progress_bar(tmp_path, monkeypatch):
    """The closed-loop bar counts every episode, run or reused from a saved run: a rerun that reuses everything
    ends full, not at zero."""
    import tqdm.auto

    from worldvla.eval import metaworld as mw

    bars = []

    class Counting(tqdm.auto.tqdm):
        def __init__(self, *a, desc=None, **k):
            super().__init__(*a, desc=desc, **k)
            self.label, self.counted = desc, 0
            bars.append(self)

        def update(self, n=1):
            self.counted += n
            return super().update(n)

    monkeypatch.setattr(tqdm.auto, "tqdm", Counting)
    folder = _stand_in_policy_folder(tmp_path, monkeypatch, PushRight())
    kw = dict(episodes=3, max_steps=8, n_envs=2, wm_episodes=0, gifs=False, progress=False, env_workers=1,
              variant_names=["p"], out_dir=tmp_path / "eval")
    tasks = ["fake-a-v3", "fake-b-v3"]
    for reused in (False, True):
        bars.clear()
        m = mw.evaluate([folder], tasks, **kw)
        assert [m[c]["tasks"][t].get("reused", False) for c in ("random",) for t in tasks] == [reused] * 2
        assert [m["variants"]["p"]["tasks"][t].get("reused", False) for t in tasks] == [reused] * 2
        (bar,) = [b for b in bars if b.label == "evaluate"]
        assert bar.total == bar.counted == 2 * 3 * 2  # tasks x episodes x (variant, random baseline)


def test_evaluate_closes_its_envs_also_after_an_error(tmp_path, monkeypatch):
    """The envs `evaluate` builds (simulators with renderers, or worker processes) are closed when it ends, and when
    a closed loop fails."""
    from worldvla.eval import metaworld as mw

    monkeypatch.setattr(mw, "_default_env_factory", FakeMetaWorldEnv)
    kw = dict(max_steps=4, n_envs=2, wm_episodes=0, gifs=False, progress=False, env_workers=1)
    FakeMetaWorldEnv.instances = []
    mw.evaluate([PushRight()], ["fake-a-v3", "fake-b-v3"], 2, tmp_path / "a", **kw)
    assert len(FakeMetaWorldEnv.instances) == 4 and all(e.closed for e in FakeMetaWorldEnv.instances)

    class Fails(PushRight):
        def act(self, image, history=None):
            raise RuntimeError("the policy failed")

    FakeMetaWorldEnv.instances = []
    with pytest.raises(RuntimeError, match="the policy failed"):
        mw.evaluate([Fails()], ["fake-a-v3"], 2, tmp_path / "b", **kw)
    assert len(FakeMetaWorldEnv.instances) == 2 and all(e.closed for e in FakeMetaWorldEnv.instances)


def test_policies_of_different_cameras_run_on_envs_of_their_own_camera(tmp_path, monkeypatch):
    """Beside a policy trained on topview frames, one trained on corner frames runs on corner envs (not the first's),
    and its runs are saved under its own camera: a later topview evaluation of it does not reuse them."""
    from pathlib import Path

    from worldvla.eval import metaworld as mw

    top, corner = PushRight(), PushRight()
    top.extra, corner.extra = {"sim_camera": "topview"}, {"sim_camera": "corner"}
    pols = {"top": top, "corner": corner}
    for name in pols:
        (tmp_path / name).mkdir()
        (tmp_path / name / "policy.json").write_text("{}")
    monkeypatch.setattr(mw, "_default_env_factory", FakeMetaWorldEnv)
    monkeypatch.setattr(mw, "load_policy", lambda path, device=None: pols[Path(path).name])
    real_closed_loop, seen = mw.closed_loop, []

    def spy(policy, task, *a, envs=None, **k):
        seen.append((policy.extra["sim_camera"], {e.camera for e in envs}))
        return real_closed_loop(policy, task, *a, envs=envs, **k)

    monkeypatch.setattr(mw, "closed_loop", spy)
    kw = dict(episodes=1, max_steps=8, n_envs=1, wm_episodes=0, gifs=False, progress=False, env_workers=1,
              random_baseline=False, out_dir=tmp_path / "eval")
    mw.evaluate([tmp_path / "top", tmp_path / "corner"], ["fake-a-v3"], **kw)
    assert seen == [("topview", {"topview"}), ("corner", {"corner"})]
    with pytest.warns(UserWarning, match="from the 'corner' camera and is evaluated from 'topview'"):
        m = mw.evaluate([tmp_path / "corner"], ["fake-a-v3"], camera="topview", **kw)
    assert not m["variants"]["corner"]["tasks"]["fake-a-v3"].get("reused")
    m = mw.evaluate([tmp_path / "corner"], ["fake-a-v3"], **kw)
    assert m["variants"]["corner"]["tasks"]["fake-a-v3"]["reused"]


def test_the_causal_variants_runs_are_saved_and_reused(tmp_path, monkeypatch):
    """The chunk-mask ablation of a policy folder is keyed by that folder's files as the policy is: a rerun reuses
    both variants' closed loops, each under its own key."""
    from worldvla.eval import metaworld as mw

    folder = _stand_in_policy_folder(tmp_path, monkeypatch, _tiny_policy(2))
    kw = dict(episodes=1, max_steps=2, n_envs=1, wm_episodes=0, gifs=False, progress=False, env_workers=1,
              random_baseline=False, variant_names=["p"], causal_variant=True, out_dir=tmp_path / "eval")
    first = mw.evaluate([folder], ["fake-a-v3"], **kw)
    assert list(first["variants"]) == ["p", "p (no chunk mask)"]
    again = mw.evaluate([folder], ["fake-a-v3"], **kw)
    assert [v["tasks"]["fake-a-v3"].get("reused", False) for v in again["variants"].values()] == [True, True]
    assert len(list((tmp_path / "eval" / "runs").glob("*.json"))) == 2


def test_eval_refuses_a_names_list_of_another_length_than_the_policies(tmp_path, monkeypatch, capsys):
    """`--names a,b` for one policy, or one name for two, is refused before anything runs (the extra names were
    dropped, missing ones made up)."""
    from worldvla.cli import main
    from worldvla.eval import metaworld as mw

    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "policy.json").write_text("{}")
    monkeypatch.setattr(mw, "evaluate", lambda *a, **k: pytest.fail("evaluated with a wrong --names"))
    for policies, names, want in (([tmp_path / "a"], "x,y", "--names has 2 names for 1 policies"),
                                  ([tmp_path / "a", tmp_path / "b"], "x", "--names has 1 names for 2 policies")):
        assert main(["eval", "--policy", *map(str, policies), "--names", names, "--tasks", "fake-a-v3",
                     "--out", str(tmp_path / "o"), "--no-progress"]) == 2
        assert want in capsys.readouterr().err


def test_evaluate_takes_tasks_given_as_one_string_as_task_names(tmp_path, monkeypatch):
    """`evaluate(policies, "reach-v3", ...)` iterated the string: every letter was named an unknown task. One string
    is read as --tasks reads it (names separated by commas); one that names no task is refused as such."""
    from worldvla.eval import metaworld as mw

    monkeypatch.setattr(mw, "_default_env_factory", FakeMetaWorldEnv)
    kw = dict(episodes=1, max_steps=4, n_envs=1, wm_episodes=0, gifs=False, progress=False, env_workers=1,
              random_baseline=False, variant_names=["p"])
    out = mw.evaluate([PushRight()], "fake-a-v3, fake-b-v3,fake-a-v3", out_dir=tmp_path / "a", **kw)
    assert list(out["variants"]["p"]["tasks"]) == ["fake-a-v3", "fake-b-v3"]
    with pytest.raises(ValueError, match=r"unknown Meta-World task 'raech-v3' \(did you mean reach-v3"):
        mw.evaluate([PushRight()], "fake-a-v3,raech-v3", out_dir=tmp_path / "b", **kw)
    for empty in ("", " , ", []):
        with pytest.raises(ValueError, match=r"no tasks given; pass Meta-World task names"):
            mw.evaluate([PushRight()], empty, out_dir=tmp_path / "c", **kw)
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


def test_ssim_refuses_a_window_or_sigma_that_gives_no_score():
    """A window of 0 taps was taken for images too small for SSIM (16 x 16 pixels named as the problem), and sigma 0
    gave NaN scores without a word."""
    a = np.random.default_rng(0).integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
    for window in (0, -3, 5.0, True):
        with pytest.raises(ValueError, match=f"window must be an integer >= 1.*got {window!r}"):
            metrics.ssim(a, a, window=window)
    for sigma in (0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=f"sigma must be a positive finite number.*got {sigma}"):
            metrics.ssim(a, a, sigma=sigma)
    assert metrics.ssim(a, a, window=3, sigma=0.5).item() == pytest.approx(1.0)


def test_scores_refuse_a_data_range_that_is_not_finite_and_images_without_pixels():
    """data_range NaN or inf gave NaN or inf for every image; images of no pixel failed in a reshape naming
    neither."""
    rng = np.random.default_rng(0)
    a, b = (rng.integers(0, 256, size=(2, 8, 8, 3), dtype=np.uint8) for _ in range(2))
    for bad in (float("nan"), float("inf")):
        for score in (metrics.psnr, metrics.ssim, metrics.mse):
            with pytest.raises(ValueError, match=f"data_range must be positive and finite.*got {bad}"):
                score(a, b, data_range=bad)
    for score in (metrics.psnr, metrics.ssim, metrics.mse):
        with pytest.raises(ValueError, match=r"\(0, 8\) pixels have no pixel"):
            score(a[:, :0], b[:, :0])
    assert metrics.psnr(a[:0], b[:0]).shape == (0,)  # no image (not images of no pixel): no score


def test_success_interval_takes_counts_not_rates():
    """success_interval(0.4, 10), a rate given for the count, gave an interval around 4% without a word."""
    for successes, episodes, what in ((0.4, 10, "successes"), (True, 1, "successes"), (2, 4.0, "episodes")):
        bad = episodes if what == "episodes" else successes
        with pytest.raises(ValueError, match=f"{what} must be an integer count, got {bad!r}"):
            metrics.success_interval(successes, episodes)
    for z in (0, -1.96, float("nan")):
        with pytest.raises(ValueError, match="z must be a positive finite number"):
            metrics.success_interval(3, 10, z=z)
    assert metrics.success_interval(np.int64(3), np.int64(10)) == pytest.approx(metrics.success_interval(3, 10))


def _gifs(out):
    return sorted(p.name for p in out.glob("*.gif"))


def test_a_reused_closed_loop_shows_its_own_episodes_gif(tmp_path, monkeypatch):
    """A rerun that reused a saved closed loop kept whatever GIF lay under the variant's name: a run of other
    settings in between (its first episode failing) left none at all for the reused success, and the same policy
    under another name got no GIF. The GIF is kept with the saved run and put back on reuse."""
    from worldvla.eval import metaworld as mw

    folder = _stand_in_policy_folder(tmp_path, monkeypatch, PushRight())  # reaches its goal in 2 to 6 steps
    out = tmp_path / "eval"
    kw = dict(n_envs=1, wm_episodes=0, progress=False, env_workers=1, random_baseline=False)
    mw.evaluate([folder], ["fake-a-v3"], 1, out, max_steps=40, variant_names=["p"], **kw)
    first = (out / "p_fake-a-v3_success.gif").read_bytes()
    mw.evaluate([folder], ["fake-a-v3"], 1, out, max_steps=1, variant_names=["p"], **kw)
    assert _gifs(out) == ["p_fake-a-v3_failure.gif"]
    m = mw.evaluate([folder], ["fake-a-v3"], 1, out, max_steps=40, variant_names=["p"], **kw)
    assert m["variants"]["p"]["tasks"]["fake-a-v3"]["reused"]
    assert _gifs(out) == ["p_fake-a-v3_success.gif"] and (out / "p_fake-a-v3_success.gif").read_bytes() == first
    m = mw.evaluate([folder], ["fake-a-v3"], 1, out, max_steps=40, variant_names=["q"], **kw)
    assert m["variants"]["q"]["tasks"]["fake-a-v3"]["reused"]
    assert (out / "q_fake-a-v3_success.gif").read_bytes() == first


def test_variants_whose_names_make_one_file_name_keep_a_gif_each(tmp_path, monkeypatch):
    """Variants 'a b' and 'a_b' both wrote a_b_<task>_<outcome>.gif: the second replaced the first's."""
    from worldvla.eval import metaworld as mw

    monkeypatch.setattr(mw, "_default_env_factory", FakeMetaWorldEnv)
    pols = {"a b": PushRight(), "a_b": PushRight(), "c": PushRight()}
    monkeypatch.setattr(mw, "load_policy", lambda path, device=None: pols[path.name])
    folders = []
    for name in pols:
        (tmp_path / name).mkdir()
        (tmp_path / name / "policy.json").write_text(name)
        folders.append(tmp_path / name)
    out = tmp_path / "eval"
    mw.evaluate(folders, ["fake-a-v3"], 1, out, max_steps=40, n_envs=1, wm_episodes=0, progress=False, env_workers=1,
                random_baseline=False)
    assert len(_gifs(out)) == 3
    stems = mw.gif_stems(list(pols))
    assert stems["c"] == "c" and stems["a b"] != stems["a_b"] and stems["a b"].startswith("a_b-")
    assert _gifs(out) == sorted(f"{stems[n]}_fake-a-v3_success.gif" for n in pols)
    assert mw.gif_stems(["A", "a"])["A"] != mw.gif_stems(["A", "a"])["a"]  # one file on a case-insensitive disk


def test_a_policy_folder_whose_name_is_not_utf8_is_evaluated(tmp_path, monkeypatch):
    """A folder named in another encoding (a byte UTF-8 cannot decode) failed in the fingerprint with
    UnicodeEncodeError, and its default name failed in the figures."""
    import os

    from worldvla.eval import metaworld as mw

    monkeypatch.setattr(mw, "_default_env_factory", FakeMetaWorldEnv)
    monkeypatch.setattr(mw, "load_policy", lambda path, device=None: PushRight())
    folder = tmp_path / os.fsdecode(b"pol\xff")
    folder.mkdir()
    (folder / "policy.json").write_text("{}")
    kw = dict(n_envs=1, wm_episodes=0, progress=False, env_workers=1, random_baseline=False, max_steps=8)
    m = mw.evaluate([folder], ["fake-a-v3"], 1, tmp_path / "eval", **kw)
    assert list(m["variants"]) == ["pol\\xff"] and (tmp_path / "eval" / "success.png").is_file()
    again = mw.evaluate([folder], ["fake-a-v3"], 1, tmp_path / "eval", **kw)
    assert again["variants"]["pol\\xff"]["tasks"]["fake-a-v3"]["reused"]


def test_more_variant_names_than_policies_are_refused(tmp_path, monkeypatch):
    """The name past the policies' went to the first --add-causal-variant variant: the policy decoded without the
    chunk mask was reported under the name 'b'."""
    from worldvla.eval import metaworld as mw

    folder = _stand_in_policy_folder(tmp_path, monkeypatch, PushRight())
    with pytest.raises(ValueError, match=r"2 variant names \['a', 'b'\] for 1 policies"):
        mw.evaluate([folder], ["fake-a-v3"], 1, tmp_path / "eval", variant_names=["a", "b"], causal_variant=True,
                    progress=False, env_workers=1)
    assert not (tmp_path / "eval").exists()


def test_a_saved_run_missing_its_counts_is_run_again(tmp_path, monkeypatch):
    """A saved run whose result lacked a field (a damaged or hand-edited file) failed the rerun with a KeyError or
    IndexError; one whose counts disagree was reused as it was."""
    import json

    from worldvla.eval import metaworld as mw

    folder = _stand_in_policy_folder(tmp_path, monkeypatch, PushRight())
    kw = dict(episodes=2, max_steps=8, n_envs=2, wm_episodes=0, gifs=False, progress=False, env_workers=1,
              random_baseline=False, variant_names=["p"], out_dir=tmp_path / "eval")
    first = mw.evaluate([folder], ["fake-a-v3"], **kw)["variants"]["p"]["tasks"]["fake-a-v3"]
    (saved,) = (tmp_path / "eval" / "runs").glob("*.json")
    whole = json.loads(saved.read_text())
    res = whole["result"]
    for damaged in ({}, {k: v for k, v in res.items() if k != "successes"}, {**res, "episode_success": []},
                    {**res, "episodes": 5}, {**res, "successes": 7}, {**res, "episode_success": [1, 0]},
                    {k: v for k, v in res.items() if k != "latency"}):
        saved.write_text(json.dumps({**whole, "result": damaged}))
        again = mw.evaluate([folder], ["fake-a-v3"], **kw)["variants"]["p"]["tasks"]["fake-a-v3"]
        assert not again.get("reused") and again["episode_success"] == first["episode_success"]
    assert mw.evaluate([folder], ["fake-a-v3"], **kw)["variants"]["p"]["tasks"]["fake-a-v3"]["reused"]


def test_world_model_metrics_name_a_rollout_without_a_frame_after_each_action():
    """Frames as many as actions (the frame after the last action missing) failed with a bare IndexError."""
    from worldvla.eval.metaworld import world_model_metrics

    rng = np.random.default_rng(0)
    good = {"frames": rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8), "actions": np.zeros((2, 4))}
    short = {"frames": good["frames"][:2], "actions": np.zeros((2, 4))}
    with pytest.raises(ValueError, match="rollout 1 has 2 frames for 2 actions.*one frame more than actions"):
        world_model_metrics(_tiny_policy(chunk_size=2), [good, short])


def test_the_table_of_a_stopped_evaluation_shows_what_finished():
    """metrics.json as an evaluation stopped partway leaves it ("complete": false, a variant without its later
    tasks or its mean) made format_results fail with KeyError."""
    m = {"tasks": ["a-v3", "b-v3"], "complete": False,
         "variants": {"x": {"tasks": {"a-v3": {"success_rate": 0.5, "successes": 1, "episodes": 2,
                                                "ended_without_action": 1}}}}}
    lines = format_results(m).splitlines()
    assert "incomplete" in lines[0] and "same command" in lines[0]
    assert lines[2].split() == ["a-v3", "50%", "(1/2)"] and lines[3].split() == ["b-v3", "not", "run"]
    assert lines[4].split() == ["mean", "-"] and not any("95% CI" in ln for ln in lines)
    assert lines[5] == "x: episodes failed on a chunk without an action (the model wrote none): a 1"
    done = {**m, "complete": True, "variants": {"x": {**m["variants"]["x"], "success_rate": 0.5}}}
    done["variants"]["x"]["tasks"] = {t: m["variants"]["x"]["tasks"]["a-v3"] for t in m["tasks"]}
    assert "incomplete" not in format_results(done) and "not run" not in format_results(done)
    assert "95% CI" not in format_results({"tasks": ["a-v3"], "variants": {}})  # no column, no interval line


def test_a_refused_evaluation_leaves_no_folder_and_nothing_to_evaluate_is_refused(tmp_path, monkeypatch):
    """--episodes 0 was refused after the output folder had been made; an --out that is a file failed in mkdir
    with a bare FileExistsError; no policy and no baseline wrote an empty metrics.json marked complete."""
    from worldvla.eval import metaworld as mw

    monkeypatch.setattr(mw, "_default_env_factory", FakeMetaWorldEnv)
    kw = dict(max_steps=3, n_envs=1, wm_episodes=0, progress=False, env_workers=1)
    with pytest.raises(ValueError, match="--episodes must be >= 1"):
        mw.evaluate([], ["fake-a-v3"], 0, tmp_path / "e0", **kw)
    assert not (tmp_path / "e0").exists()
    (tmp_path / "afile").write_text("mine")
    with pytest.raises(NotADirectoryError, match="afile is a file, not a folder: name a folder"):
        mw.evaluate([], ["fake-a-v3"], 1, tmp_path / "afile", **kw)
    with pytest.raises(ValueError, match="nothing to evaluate"):
        mw.evaluate([], ["fake-a-v3"], 1, tmp_path / "none", random_baseline=False, **kw)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_a_causal_variant_named_as_another_variant_is_refused(tmp_path, monkeypatch):
    """--add-causal-variant named policy a's ablation 'a (no chunk mask)' beside a policy given that name: the
    ablation's results replaced the other policy's in metrics.json, which then lacked it without a word."""
    from worldvla.eval import metaworld as mw

    monkeypatch.setattr(mw, "_default_env_factory", FakeMetaWorldEnv)
    ran = []
    monkeypatch.setattr(mw, "closed_loop", lambda *a, **k: ran.append(a) or pytest.fail("a closed loop ran"))
    pols = [_tiny_policy(chunk_size=2), _tiny_policy(chunk_size=2)]
    with pytest.raises(ValueError, match=r"'a \(no chunk mask\)' that --add-causal-variant adds for 'a' has the name "
                                         r"of another variant.*--names"):
        mw.evaluate(pols, ["fake-a-v3"], 1, tmp_path / "eval", variant_names=["a", "a (no chunk mask)"],
                    causal_variant=True, progress=False, env_workers=1, wm_episodes=0)
    assert not ran


def test_the_causal_ablation_leaves_the_process_malloc_settings_and_keeps_the_cache_limits(monkeypatch):
    """Making the ablation put glibc's malloc settings back to the defaults (tune_malloc on a CPU), over those a
    caller chose for a policy built with tune_malloc=False; and the ablation dropped the limits a server sets on
    the policy's prefixes and engines."""
    from worldvla.eval.ablations import CausalChunkPolicy
    from worldvla.inference import policy as policy_module
    from worldvla.inference.policy import WorldVLAPolicy

    base = _tiny_policy(3)
    pol = WorldVLAPolicy(base.model, base.vqgan, base.action_tokenizer, chunk_size=3, image_size=32,
                         text_tokenizer=base.text_tokenizer, tune_malloc=False)
    pol.max_prefixes, pol.max_engines, pol.engine_headroom = 3, 9, 17
    tuned = []
    monkeypatch.setattr(policy_module, "tune_cpu_malloc", lambda *a, **k: tuned.append(a))
    causal = CausalChunkPolicy.from_policy(pol)
    assert tuned == []
    assert (causal.max_prefixes, causal.max_engines, causal.engine_headroom) == (3, 9, 17)


def test_gifs_of_variants_a_run_did_not_evaluate_are_removed(tmp_path, monkeypatch):
    """A run of other variants (or tasks) into the folder of an earlier one left that run's
    <variant>_<task>_<outcome>.gif beside metrics.json, which did not hold those variants."""
    from worldvla.eval import metaworld as mw

    monkeypatch.setattr(mw, "_default_env_factory", FakeMetaWorldEnv)
    pol = PushRight()
    pol.image_size = 32
    monkeypatch.setattr(mw, "load_policy", lambda path, device=None: pol)
    folder, out = tmp_path / "policy", tmp_path / "eval"
    folder.mkdir()
    (folder / "policy.json").write_text("{}")
    kw = dict(n_envs=1, random_baseline=False, progress=False, env_workers=1, wm_episodes=0, max_steps=40)
    mw.evaluate([folder], ["fake-a-v3", "fake-b-v3"], 1, out, variant_names=["p"], **kw)
    out.joinpath("holiday_success.gif").write_bytes(b"mine")  # not of the pattern: a user's files stay
    out.joinpath("p_not-a-task_failure.gif").write_bytes(b"mine")
    out.joinpath("task00_ep000_success.gif").write_bytes(b"a LIBERO run's")
    m = mw.evaluate([folder], ["fake-b-v3"], 1, out, variant_names=["q"], **kw)
    assert list(m["variants"]) == ["q"]
    assert sorted(p.name for p in out.glob("*.gif")) == ["holiday_success.gif", "p_not-a-task_failure.gif",
                                                        "q_fake-b-v3_success.gif", "task00_ep000_success.gif"]
    # The removed GIFs are still kept with their saved runs: a rerun under the old name puts them back.
    m = mw.evaluate([folder], ["fake-a-v3", "fake-b-v3"], 1, out, variant_names=["p"], **kw)
    assert all(r["reused"] for r in m["variants"]["p"]["tasks"].values())
    assert {"p_fake-a-v3_success.gif", "p_fake-b-v3_success.gif"} <= {p.name for p in out.glob("*.gif")}
    assert not (out / "q_fake-b-v3_success.gif").exists()
    mw.evaluate([folder], ["fake-b-v3"], 1, out, variant_names=["p"], gifs=False, **kw)  # GIFs off: none shown
    assert sorted(p.name for p in out.glob("*.gif")) == ["holiday_success.gif", "p_not-a-task_failure.gif",
                                                        "task00_ep000_success.gif"]


def test_eval_refuses_a_names_option_that_names_no_variant(tmp_path, monkeypatch, capsys):
    """`--names ""` (say, an unset shell variable) silently meant the folders' names."""
    from worldvla.cli import main
    from worldvla.eval import metaworld as mw

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "policy.json").write_text("{}")
    monkeypatch.setattr(mw, "evaluate", lambda *a, **k: pytest.fail("evaluated with an empty --names"))
    for names in ("", "  "):
        assert main(["eval", "--policy", str(tmp_path / "a"), "--names", names, "--tasks", "fake-a-v3",
                     "--out", str(tmp_path / "o"), "--no-progress"]) == 2
        assert f"--names {names!r} names no variant; give one name per policy" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_summary_of_infinities_of_both_signs_has_no_mean():
    """+inf and -inf counted apart have no mean (their sum is NaN): the mean is NaN, not the first one's sign."""
    s = metrics.summarize([math.inf, -math.inf])
    assert s["n"] == 2 and s["n_inf"] == 2 and math.isnan(s["mean"]) and s["std"] == 0.0
    assert metrics.summarize([-math.inf, -math.inf])["mean"] == -math.inf


def test_single_channel_uint8_images_are_scored():
    """Grayscale uint8 frames [..., H, W, 1] are channels-last images as RGB ones are (L = 255)."""
    a = np.zeros((2, 12, 12, 1), np.uint8)
    b = np.full((2, 12, 12, 1), 10, np.uint8)
    np.testing.assert_allclose(metrics.psnr(a, b).numpy(), 10 * np.log10(255.0 ** 2 / 100.0), rtol=1e-12)
    np.testing.assert_allclose(metrics.ssim(b, b).numpy(), 1.0, atol=1e-12)


class _RunsToItsLimit(FakeMetaWorldEnv):
    """Goes on after its goal (Meta-World's terminate_on_success=False): every episode runs max_steps steps."""

    def step(self, action):
        frame, reward, success, _ = super().step(action)
        return frame, reward, success, self.t >= self.max_steps


def test_the_random_baseline_runs_on_the_policys_seeds_and_with_its_execute(tmp_path, monkeypatch):
    """Chance level is measured on the layouts the policy was evaluated on (the same seeds per task, reset in the
    same order) and with the policy's --execute: one query a step for --execute 1, not whole chunks."""
    from worldvla.eval import metaworld as mw

    monkeypatch.setattr(mw, "_default_env_factory", _RunsToItsLimit)
    FakeMetaWorldEnv.instances = []
    m = mw.evaluate([PushRight()], ["fake-a-v3", "fake-b-v3"], 3, tmp_path, seed=7, max_steps=4, n_envs=1,
                    wm_episodes=0, gifs=False, progress=False, env_workers=1, variant_names=["p"], execute=1)
    for task in ("fake-a-v3", "fake-b-v3"):
        pol, rnd = m["variants"]["p"]["tasks"][task], m["random"]["tasks"][task]
        assert pol["seeds"] == rnd["seeds"] == eval_seeds(task, 3, 7)
        assert pol["latency"]["queries"] == rnd["latency"]["queries"] == 3 * 4  # 3 episodes of 4 one-action chunks
    env_a, env_b = FakeMetaWorldEnv.instances  # one env a task, shared by the variant and the baseline
    assert env_a.seeds == eval_seeds("fake-a-v3", 3, 7) * 2 and env_b.seeds == eval_seeds("fake-b-v3", 3, 7) * 2


def test_episodes_run_to_the_step_limit_of_the_evaluation(tmp_path, monkeypatch):
    """An episode that does not reach its goal runs exactly --max-steps steps, in closed_loop and in evaluate."""
    from worldvla.eval import metaworld as mw

    class Still(PushRight):
        def act(self, image, history=None):
            return 0.0 * super().act(image, history)

    r = closed_loop(Still(), "fake-v3", episodes=3, n_envs=2, max_steps=5, env_factory=FakeMetaWorldEnv)
    assert r.steps == [5, 5, 5] and r.successes == [False] * 3 and len(r.frames) == 6
    monkeypatch.setattr(mw, "_default_env_factory", FakeMetaWorldEnv)
    m = mw.evaluate([Still()], ["fake-a-v3"], 2, tmp_path, max_steps=5, n_envs=1, wm_episodes=0, gifs=False,
                    progress=False, env_workers=1, random_baseline=False, variant_names=["p"], execute=1)
    assert m["variants"]["p"]["tasks"]["fake-a-v3"]["latency"]["queries"] == 2 * 5  # one query a step
    assert m["variants"]["p"]["tasks"]["fake-a-v3"]["success_rate"] == 0.0


def test_actions_run_in_worker_processes_are_clipped_too():
    """Envs in worker processes (`step_async`, `step_wait`) get the clipped action, as envs stepped here do."""

    class Async(FakeMetaWorldEnv):
        def step(self, action):
            raise AssertionError("an env in a worker process is stepped with step_async")

        def step_async(self, action):
            self.reply = FakeMetaWorldEnv.step(self, action)  # refuses actions outside [-1, 1]

        def step_wait(self):
            return self.reply

    class Overshoot(PushRight):
        def act(self, image, history=None):
            return 4.0 * super().act(image, history)  # +2.0 along x

    envs = [Async("fake-v3", 8, 30) for _ in range(2)]
    r = closed_loop(Overshoot(), "fake-v3", episodes=3, envs=envs, record=False)
    assert r.success_rate == 1.0 and r.steps == [1 + s % 3 for s in r.seeds]


def test_a_variants_latency_is_the_mean_of_its_tasks_medians(tmp_path, monkeypatch):
    """metrics.json's latency_median_s (and the table's "ms per action-chunk query") is each task's median query
    time averaged over the tasks; latency_mean_s the tasks' means averaged."""
    from worldvla.eval import metaworld as mw

    monkeypatch.setattr(mw, "_default_env_factory", FakeMetaWorldEnv)
    real_closed_loop = mw.closed_loop
    latency = {"fake-a-v3": {"queries": 3, "mean_s": 0.5, "median_s": 0.1},
               "fake-b-v3": {"queries": 3, "mean_s": 0.9, "median_s": 0.3}}

    def timed(policy, task, *a, **k):
        r = real_closed_loop(policy, task, *a, **k)
        r.latency = latency[task]
        return r

    monkeypatch.setattr(mw, "closed_loop", timed)
    m = mw.evaluate([PushRight()], ["fake-a-v3", "fake-b-v3"], 1, tmp_path, max_steps=8, n_envs=1, wm_episodes=0,
                    gifs=False, progress=False, env_workers=1, random_baseline=False, variant_names=["p"])
    assert m["variants"]["p"]["latency_median_s"] == pytest.approx(0.2)
    assert m["variants"]["p"]["latency_mean_s"] == pytest.approx(0.7)
    assert "p: 200 ms per action-chunk query" in format_results(m)


def test_the_gif_of_a_closed_loop_is_named_by_its_first_episodes_outcome(tmp_path, monkeypatch):
    """The GIF shows the first episode: named failure when that one failed, though later ones succeeded, when
    the run is made and when it is reused."""
    from worldvla.eval import metaworld as mw

    folder = _stand_in_policy_folder(tmp_path, monkeypatch, PushRight())  # 6, 4 and 2 steps to the goals
    out = tmp_path / "eval"
    kw = dict(n_envs=1, wm_episodes=0, progress=False, env_workers=1, random_baseline=False, variant_names=["p"])
    for reused in (False, True):
        m = mw.evaluate([folder], ["fake-a-v3"], 3, out, max_steps=5, **kw)
        res = m["variants"]["p"]["tasks"]["fake-a-v3"]
        assert res["episode_success"] == [False, True, True] and res.get("reused", False) == reused
        assert _gifs(out) == ["p_fake-a-v3_failure.gif"]


class _SeedFrames(FakeMetaWorldEnv):
    """Frames carry the episode's seed (pixel [0, 0, 1]) besides the step."""

    def _frame(self):
        f = super()._frame()
        f[0, 0, 1] = self.seeds[-1] % 251
        return f


def test_the_recorded_frames_are_the_first_episodes():
    """The GIF's frames (TaskResult.frames) are those of the first episode, from its reset to its last step, also
    when later groups of envs run other episodes."""
    pol = PushRight()
    r = closed_loop(pol, "fake-v3", episodes=4, n_envs=2, max_steps=30, env_factory=_SeedFrames)
    assert r.steps == [2, 6, 2, 2]
    assert len(r.frames) == r.steps[0] + 1 and list(r.frames[:, 0, 0, 1]) == [r.seeds[0] % 251] * len(r.frames)
    assert list(r.frames[:, 0, 0, 0]) == list(range(len(r.frames)))


def test_a_blind_policy_still_records_the_frames_of_its_gif():
    """A policy that needs no images skips rendering only when nothing is recorded: with record=True the GIF gets
    the env's frames, not blank ones."""

    class Skips(FakeMetaWorldEnv):
        can_skip_render = True

        def reset(self, seed, render=True):
            frame = super().reset(seed)
            return frame if render else np.zeros_like(frame)

        def step(self, action, render=True):
            frame, *rest = super().step(action)
            return (frame if render else np.zeros_like(frame), *rest)

    r = closed_loop(RandomPolicy(chunk_size=2, seed=0), "fake-v3", episodes=1, n_envs=1, max_steps=4,
                    env_factory=Skips, image_size=8)
    assert r.frames.shape == (r.steps[0] + 1, 8, 8, 3) and all(f.any() for f in r.frames)
    blind = closed_loop(RandomPolicy(chunk_size=2, seed=0), "fake-v3", episodes=1, n_envs=1, max_steps=4,
                        env_factory=Skips, image_size=8, record=False)
    assert blind.frames is None and blind.steps == r.steps  # the same episode, unrendered


def test_the_random_baseline_draws_each_envs_actions_apart():
    """A batch of envs gets a chunk of its own each, not one chunk repeated, so that the baseline's episodes are
    independent; drawn within [low, high]."""
    a = RandomPolicy(chunk_size=3, action_dim=4, seed=5, low=-0.5, high=0.5).act(np.zeros((2, 8, 8, 3), np.uint8))
    assert a.shape == (2, 3, 4) and not np.allclose(a[0], a[1])
    assert a.min() >= -0.5 and a.max() <= 0.5


def test_the_policy_is_reset_for_every_group_of_episodes():
    """Each group of envs starts new episodes: the policy is reset (its instruction, any state it keeps) before
    each group's first query."""

    class Counting(PushRight):
        resets = 0

        def reset(self, instruction):
            Counting.resets += 1
            super().reset(instruction)

    closed_loop(Counting(), "fake-v3", episodes=5, n_envs=2, max_steps=30, env_factory=FakeMetaWorldEnv, record=False)
    assert Counting.resets == 3


def test_evaluation_layouts_differ_between_tasks():
    """Each task gets its own layout seeds (the task's name is hashed into them), and a seed's first episodes do
    not depend on the number of episodes."""
    a, b = eval_seeds("reach-v3", 5), eval_seeds("push-v3", 5)
    assert set(a).isdisjoint(b) and len(set(a)) == 5
    assert eval_seeds("reach-v3", 3) == a[:3] and eval_seeds("reach-v3", 5, seed=1) != a


def test_metrics_json_holds_each_finished_task_of_a_variant_before_the_next_runs(tmp_path, monkeypatch):
    """A variant's closed loop that fails leaves metrics.json ("complete": false) with the tasks it finished."""
    import json

    from worldvla.eval import metaworld as mw

    monkeypatch.setattr(mw, "_default_env_factory", FakeMetaWorldEnv)
    real_closed_loop = mw.closed_loop

    def fails_on_b(policy, task, *a, **k):
        if task == "fake-b-v3":
            raise RuntimeError("simulated crash")
        return real_closed_loop(policy, task, *a, **k)

    monkeypatch.setattr(mw, "closed_loop", fails_on_b)
    with pytest.raises(RuntimeError, match="simulated crash"):
        mw.evaluate([PushRight()], ["fake-a-v3", "fake-b-v3"], 1, tmp_path, max_steps=8, n_envs=1, wm_episodes=0,
                    gifs=False, progress=False, env_workers=1, variant_names=["p"])
    partial = json.loads((tmp_path / "metrics.json").read_text())
    assert partial["complete"] is False and list(partial["variants"]["p"]["tasks"]) == ["fake-a-v3"]
    assert partial["variants"]["p"]["tasks"]["fake-a-v3"]["episode_success"] == [True]


def test_the_random_baseline_runs_a_release_mode_policys_execute_past_its_chunk_size(tmp_path, monkeypatch):
    """A mode='release' policy may run --execute above its chunk size (it writes as many actions as its model does);
    the random baseline took that chunk size and refused the --execute after every variant had run, blaming 'the
    policy', and metrics.json was left incomplete."""
    from worldvla.eval import metaworld as mw

    class Release(PushRight):  # chunk_size 3
        mode = "release"

    monkeypatch.setattr(mw, "_default_env_factory", _RunsToItsLimit)
    m = mw.evaluate([Release()], ["fake-a-v3"], 2, tmp_path, max_steps=8, n_envs=1, wm_episodes=0, gifs=False,
                    progress=False, env_workers=1, variant_names=["p"], execute=4)
    assert m["complete"] and m["random"]["chunk_size"] == 4
    rnd = m["random"]["tasks"]["fake-a-v3"]
    assert rnd["episodes"] == 2 and rnd["latency"]["queries"] == 2 * 2  # 2 episodes of 2 chunks of 4 actions, 8 steps


def test_evaluation_layout_seeds_are_stable_non_negative_31_bit_integers():
    """The layouts of an evaluation are fixed by its seed across versions (results stay comparable), and each is a
    non-negative 31-bit integer, as the collection's episode seeds are."""
    seeds = eval_seeds("reach-v3", 64) + eval_seeds("push-v3", 64, seed=2**32 - 1)
    assert all(0 <= s < 2**31 for s in seeds)
    assert eval_seeds("reach-v3", 3) == [12213606, 2096212414, 28889560]


def test_closed_loop_refuses_no_episode_and_no_env_by_name():
    """closed_loop called directly with episodes=0 or n_envs=0 names the argument instead of failing on an env that
    was never built."""
    for kw, want in (({"episodes": 0}, "episodes must be >= 1, got 0"), ({"n_envs": 0}, "n_envs must be >= 1, got 0")):
        with pytest.raises(ValueError, match=want):
            closed_loop(PushRight(), "fake-v3", **{"episodes": 2, "n_envs": 2, "max_steps": 4,
                                                   "env_factory": FakeMetaWorldEnv, **kw})


def test_rendering_is_skipped_only_when_every_env_can_skip_it():
    """Given envs of which only some take `render=False`, a blind policy's episodes are rendered as usual: the others
    are stepped without the keyword they do not take."""

    class Skips(FakeMetaWorldEnv):
        can_skip_render = True

        def reset(self, seed, render=True):
            self.rendered = render
            return super().reset(seed)

        def step(self, action, render=True):
            self.rendered = render
            return super().step(action)

    envs = [Skips("fake-v3", 8, 4), FakeMetaWorldEnv("fake-v3", 8, 4)]
    r = closed_loop(RandomPolicy(chunk_size=2, seed=0), "fake-v3", episodes=2, envs=envs, record=False)
    assert len(r.steps) == 2 and envs[0].rendered is True
    skipping = [Skips("fake-v3", 8, 4), Skips("fake-v3", 8, 4)]
    closed_loop(RandomPolicy(chunk_size=2, seed=0), "fake-v3", episodes=2, envs=skipping, record=False)
    assert [e.rendered for e in skipping] == [False, False]


def test_a_closed_loops_seconds_are_the_time_it_took(monkeypatch):
    """TaskResult.seconds (metrics.json's "seconds") is the wall time from the first reset to the end of the last
    episode."""
    import types

    from worldvla.eval import metaworld as mw

    ticks = iter([100.0, 112.5])
    monkeypatch.setattr(mw, "time", types.SimpleNamespace(perf_counter=lambda: next(ticks)))
    r = closed_loop(PushRight(), "fake-v3", episodes=2, n_envs=2, max_steps=8, env_factory=FakeMetaWorldEnv,
                    record=False)
    assert r.seconds == 12.5 and r.to_dict()["seconds"] == 12.5


def test_a_saved_run_without_its_success_rate_is_run_again(tmp_path, monkeypatch):
    """A saved run whose result lacks its success rate (or holds one that is no number) is no finished closed loop:
    it runs again instead of failing the summary with a KeyError."""
    import json

    from worldvla.eval import metaworld as mw

    folder = _stand_in_policy_folder(tmp_path, monkeypatch, PushRight())
    kw = dict(episodes=2, max_steps=8, n_envs=2, wm_episodes=0, gifs=False, progress=False, env_workers=1,
              random_baseline=False, variant_names=["p"], out_dir=tmp_path / "eval")
    first = mw.evaluate([folder], ["fake-a-v3"], **kw)["variants"]["p"]
    (saved,) = (tmp_path / "eval" / "runs").glob("*.json")
    whole = json.loads(saved.read_text())
    res = whole["result"]
    for damaged in ({k: v for k, v in res.items() if k != "success_rate"}, {**res, "success_rate": "1.0"}):
        saved.write_text(json.dumps({**whole, "result": damaged}))
        again = mw.evaluate([folder], ["fake-a-v3"], **kw)["variants"]["p"]
        assert not again["tasks"]["fake-a-v3"].get("reused") and again["success_rate"] == first["success_rate"]


def test_a_policy_folder_named_policy_at_the_root_keeps_its_name():
    """A run's policy/ is named after its run; a folder called policy right under the root has no run above it and
    keeps its own name (not an empty one)."""
    from worldvla.eval.metaworld import default_variant_names

    assert default_variant_names(["/policy"]) == ["policy"]
    assert default_variant_names(["/runs/policy"]) == ["runs"]


def test_an_action_only_policy_without_world_model_scores_gets_no_warning(tmp_path, monkeypatch, recwarn):
    """With --wm-episodes 0 no world model is scored: nothing to warn about for an action-only policy, and
    metrics.json holds no world-model entry."""
    from worldvla.eval import metaworld as mw

    monkeypatch.setattr(mw, "_default_env_factory", FakeMetaWorldEnv)
    pol = PushRight()
    pol.model, pol.extra = None, {"kinds": ["action"]}
    m = mw.evaluate([pol], ["fake-a-v3"], 1, tmp_path, max_steps=2, n_envs=1, random_baseline=False, wm_episodes=0,
                    progress=False, env_workers=1, gifs=False)
    assert not [w for w in recwarn if "trained on action samples only" in str(w.message)]
    assert "world_model" not in m and "untrained" not in mw.format_results(m)


def test_envs_run_in_worker_processes_only_where_a_task_has_several(tmp_path, monkeypatch):
    """--env-workers spreads a task's envs over processes; a task run on one env (one episode, or --envs 1) steps it
    in this process, where starting a worker would cost more than it saves."""
    from worldvla.eval import metaworld as mw
    from worldvla.sim import workers

    pools = []

    class Workers:
        def __init__(self, task, n_envs, image_size, max_steps, workers=2, camera="corner"):
            self.envs = [FakeMetaWorldEnv(task, image_size, max_steps, camera) for _ in range(n_envs)]
            self.closed = False
            pools.append((task, n_envs, workers, self))

        def close(self):
            self.closed = True

    monkeypatch.setattr(workers, "EnvWorkers", Workers)
    monkeypatch.setattr(mw, "_default_env_factory", FakeMetaWorldEnv)
    kw = dict(max_steps=4, wm_episodes=0, gifs=False, progress=False, random_baseline=False, env_workers=2)
    FakeMetaWorldEnv.instances = []
    mw.evaluate([PushRight()], ["fake-a-v3"], 1, tmp_path / "one", n_envs=4, **kw)
    mw.evaluate([PushRight()], ["fake-a-v3"], 3, tmp_path / "single", n_envs=1, **kw)
    assert pools == [] and len(FakeMetaWorldEnv.instances) == 2
    mw.evaluate([PushRight()], ["fake-a-v3"], 3, tmp_path / "three", n_envs=4, **kw)
    assert [p[:3] for p in pools] == [("fake-a-v3", 3, 2)] and pools[0][3].closed
    mw.evaluate([PushRight()], ["fake-a-v3"], 3, tmp_path / "here", n_envs=4, **{**kw, "env_workers": 1})
    assert len(pools) == 1


def test_the_random_baselines_draws_follow_the_evaluation_seed(tmp_path, monkeypatch):
    """The baseline's random actions are seeded by the evaluation seed (and the task): evaluations under two seeds
    draw two sets of actions, as they run two sets of layouts."""
    from worldvla.eval import metaworld as mw

    monkeypatch.setattr(mw, "_default_env_factory", FakeMetaWorldEnv)
    real_closed_loop, seeds = mw.closed_loop, []

    def spy(policy, task, *a, **k):
        seeds.append(policy.seed)
        return real_closed_loop(policy, task, *a, **k)

    monkeypatch.setattr(mw, "closed_loop", spy)
    kw = dict(episodes=1, max_steps=3, n_envs=1, wm_episodes=0, gifs=False, progress=False, env_workers=1)
    for seed in (0, 1, 0):
        mw.evaluate([], ["fake-a-v3"], out_dir=tmp_path / str(seed), seed=seed, resume=False, **kw)
    assert seeds[0] == seeds[2] != seeds[1]


def test_a_variant_name_without_a_safe_character_gets_a_file_name_stem():
    """A variant named with no character a file name keeps (say '***') still gets a GIF name of its own."""
    from worldvla.eval.metaworld import gif_stems

    assert gif_stems(["***", "a/b"]) == {"***": "policy", "a/b": "a_b"}


def _world_model_table(horizons):
    """format_results of metrics holding world-model means whose every score is apart from the others."""
    tasks = [f"t{i}-v3" for i in range(len(horizons))]
    mean = {"one_step_psnr": 21.0, "one_step_ssim": 0.61, "copy_last_psnr": 22.0, "copy_last_ssim": 0.62,
            "vqgan_recon_psnr": 23.0, "vqgan_recon_ssim": 0.63, "multi_step_psnr": 24.0, "multi_step_ssim": 0.64,
            "code_accuracy": 0.255, "copy_last_code_accuracy": 0.5}
    wm = {"mean": mean, **{t: {"multi_step": {"horizon": h}} for t, h in zip(tasks, horizons)}}
    return {"tasks": tasks, "variants": {}, "world_model": wm}


def test_the_table_shows_each_world_model_score_in_its_row():
    """Each row of the world-model table carries its own PSNR and SSIM: the model's prediction, the copy-last and
    VQGAN references, the imagined rollout (labelled with its horizon when every task has the same one)."""
    lines = format_results(_world_model_table([3, 3])).splitlines()
    rows = {ln.strip().split("  ")[0]: ln.split()[-2:] for ln in lines}
    assert rows["next frame, predicted"] == ["21.00", "0.610"]
    assert rows["next frame = current frame (reference)"] == ["22.00", "0.620"]
    assert rows["VQGAN reconstruction (every code right)"] == ["23.00", "0.630"]
    assert rows["imagined 3-step rollout, mean over steps"] == ["24.00", "0.640"]
    assert "  next-frame VQ codes predicted exactly: 25.5% (current frame's codes kept: 50.0%)" in lines
    assert not any("imagined steps per task" in ln for ln in lines)
    m = _world_model_table([3, 3])
    m["world_model"]["mean"]["one_step_psnr"] = None  # no task had the metric
    (row,) = [ln for ln in format_results(m).splitlines() if "next frame, predicted" in ln]
    assert row.split()[-2:] == ["n/a", "0.610"]


def test_the_tasks_of_a_table_line_up_under_their_headings():
    """Every line of the success table is as wide as its heading line, whatever the rates' widths: a column is
    at least as wide as '100% (10/10)'."""
    from worldvla.eval.metaworld import TaskResult, _summarize_variant

    tasks = ["fake-a-v3", "fake-b-v3"]
    variants = {}
    for name, ok in (("x", [True] * 10), ("a-long-variant-name", [True, False])):
        v = {"tasks": {t: TaskResult(t, list(range(len(ok))), ok, [1] * len(ok)).to_dict() for t in tasks}}
        _summarize_variant(v, tasks)
        variants[name] = v
    lines = format_results({"tasks": tasks, "variants": variants}).splitlines()
    assert lines[2].split() == ["fake-a-v3", "100%", "(10/10)", "50%", "(1/2)"]
    assert {len(ln) for ln in lines[1:5]} == {len(lines[1])}


def test_the_unseen_tasks_note_shows_up_to_three_instructions(tmp_path):
    """The note quotes the first three instructions a policy was trained on, and marks more with '...'."""
    import json

    from worldvla.eval import metaworld as mw

    for n, shown in ((3, "('i0'; 'i1'; 'i2')"), (4, "('i0'; 'i1'; 'i2'; ...)")):
        folder = tmp_path / str(n)
        folder.mkdir()
        (folder / "policy.json").write_text(json.dumps({"extra": {"instructions": [f"i{k}" for k in range(n)]}}))
        note = mw.unseen_tasks_note(folder, ["reach-v3"])
        assert f"was trained on {n} instruction(s) {shown}, not on those of reach-v3:" in note, note


def test_a_policy_files_size_or_time_alone_changes_its_fingerprint(tmp_path):
    """A policy file rewritten with another size within one tick of the clock, or with the same size at another
    time, makes another policy: its saved runs are not reused."""
    import os

    from worldvla.eval.metaworld import _policy_fingerprint

    folder = tmp_path / "policy"
    folder.mkdir()
    f = folder / "policy.json"

    def write(text, ns):
        f.write_text(text)
        os.utime(f, ns=(ns, ns))
        return _policy_fingerprint(folder)

    first = write('{"a": 1}', 1_000_000_000)
    assert write('{"a": 1}', 1_000_000_000) == first
    assert write('{"a": 12}', 1_000_000_000) != first  # same time, another size
    assert write('{"a": 2}', 2_000_000_000) != first  # same size, another time


def test_expert_rollouts_in_worker_processes_advance_the_progress_bar():
    """Expert episodes run side by side in worker processes count on the bar one episode each, as those run here."""
    from worldvla.eval.metaworld import expert_rollouts

    class Remote:
        def expert_async(self, seed):
            self.seed = seed

        def expert_wait(self):
            return {"seed": self.seed}

    class Bar:
        n = 0

        def update(self, n=1):
            self.n += n

    bar = Bar()
    out = expert_rollouts("fake-v3", 5, envs=[Remote(), Remote()], progress=bar)
    assert bar.n == 5 and [r["seed"] for r in out] == eval_seeds("fake-v3", 5, 1)


def test_a_policy_without_a_chunk_size_runs_any_execute():
    """A policy that does not state a chunk size has nothing to check --execute against: its chunks run N actions at
    a time."""
    from worldvla.eval.metaworld import check_execute

    class Unsized:
        image_size = 8

        def reset(self, instruction):
            pass

        def act(self, image, history=None):
            out = np.zeros((len(image), 4, 4))
            out[..., 0] = 0.5
            return out

    check_execute(Unsized(), 9)
    r = closed_loop(Unsized(), "fake-v3", episodes=3, n_envs=1, max_steps=30, env_factory=FakeMetaWorldEnv,
                    record=False, execute=2)
    assert r.success_rate == 1.0 and r.steps == [2 * (1 + s % 3) for s in r.seeds]
    assert r.latency["queries"] == sum(-(-s // 2) for s in r.steps)


def test_the_random_baseline_alone_renders_from_the_camera_asked_for(tmp_path, monkeypatch):
    """With no policy (the random baseline only) the envs render from the camera given, not the default one."""
    from worldvla.eval import metaworld as mw

    monkeypatch.setattr(mw, "_default_env_factory", FakeMetaWorldEnv)
    kw = dict(max_steps=3, n_envs=1, wm_episodes=0, gifs=False, progress=False, env_workers=1)
    for camera, want in (("topview", "topview"), (None, "corner")):
        FakeMetaWorldEnv.instances = []
        mw.evaluate([], ["fake-a-v3"], 1, tmp_path / str(camera), camera=camera, **kw)
        assert [e.camera for e in FakeMetaWorldEnv.instances] == [want]


def test_the_random_baseline_records_no_gif(tmp_path, monkeypatch):
    """The baseline's episodes are not recorded: no GIF beside its saved runs (nor in the output folder), only the
    variants' own."""
    from worldvla.eval import metaworld as mw

    monkeypatch.setattr(mw, "_default_env_factory", FakeMetaWorldEnv)
    real_closed_loop, recorded = mw.closed_loop, {}

    def spy(policy, task, *a, record=True, **k):
        recorded[type(policy).__name__] = record
        return real_closed_loop(policy, task, *a, record=record, **k)

    monkeypatch.setattr(mw, "closed_loop", spy)
    folder = tmp_path / "policy"
    folder.mkdir()
    (folder / "policy.json").write_text("{}")
    monkeypatch.setattr(mw, "load_policy", lambda path, device=None: PushRight())
    out = tmp_path / "eval"
    mw.evaluate([folder], ["fake-a-v3"], 1, out, max_steps=40, n_envs=1, wm_episodes=0, progress=False, env_workers=1,
                variant_names=["p"])
    assert recorded == {"PushRight": True, "RandomPolicy": False}
    assert len(list((out / "runs").glob("*.json"))) == 2 and len(list((out / "runs").glob("*.gif"))) == 1
    assert _gifs(out) == ["p_fake-a-v3_success.gif"]


def test_metrics_json_names_each_variants_policy_folder(tmp_path, monkeypatch):
    """A variant's entry in metrics.json records the folder its policy came from (its name, for a policy given as an
    object), and its chunk size."""
    from worldvla.eval import metaworld as mw

    folder = _stand_in_policy_folder(tmp_path, monkeypatch, PushRight())
    m = mw.evaluate([folder, PushRight()], ["fake-a-v3"], 1, tmp_path / "eval", max_steps=8, n_envs=1, wm_episodes=0,
                    gifs=False, progress=False, env_workers=1, random_baseline=False, variant_names=["p", "q"])
    assert m["variants"]["p"]["policy"] == str(folder) and m["variants"]["q"]["policy"] == "q"
    assert m["variants"]["p"]["chunk_size"] == m["variants"]["q"]["chunk_size"] == PushRight.chunk_size


def test_eval_passes_every_option_to_the_evaluation(tmp_path, monkeypatch):
    """Each option of `worldvla eval` reaches `evaluate` as given, and left out takes its stated default."""
    from worldvla.cli import main
    from worldvla.eval import metaworld as mw

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "policy.json").write_text("{}")
    got = {}

    def evaluate(policies, tasks, episodes, out, **kw):
        got.clear()
        got.update(kw, policies=policies, tasks=tasks, episodes=episodes, out=out)
        return {"tasks": [], "variants": {}}

    monkeypatch.setattr(mw, "evaluate", evaluate)
    monkeypatch.setattr(mw, "format_results", lambda m: "")
    base = ["eval", "--policy", str(tmp_path / "a"), "--tasks", "fake-a-v3", "--out", str(tmp_path / "o")]
    assert main(base) == 0
    given = {"policies": [str(tmp_path / "a")], "tasks": ["fake-a-v3"], "out": str(tmp_path / "o")}
    assert got == {**given, "episodes": 10,
                   "seed": 0, "max_steps": 200, "n_envs": 4, "random_baseline": True, "wm_episodes": 2,
                   "wm_horizon": 8, "progress": True, "variant_names": None, "device": None, "causal_variant": False,
                   "env_workers": 2, "resume": True, "execute": None, "camera": None}
    assert main(base + ["--episodes", "3", "--max-steps", "50", "--envs", "2", "--env-workers", "3", "--seed", "9",
                        "--no-random", "--wm-episodes", "0", "--wm-horizon", "4", "--add-causal-variant", "--device",
                        "cpu", "--execute", "2", "--no-resume", "--camera", "topview", "--no-progress",
                        "--names", "x"]) == 0
    assert got == {**given, "episodes": 3,
                   "seed": 9, "max_steps": 50, "n_envs": 2, "random_baseline": False, "wm_episodes": 0,
                   "wm_horizon": 4, "progress": False, "variant_names": ["x"], "device": "cpu", "causal_variant": True,
                   "env_workers": 3, "resume": False, "execute": 2, "camera": "topview"}


def test_ssim_of_one_pixel_images_is_the_luminance_term_of_a_one_tap_window():
    """Images of one pixel (or of a 2-pixel side) are scored with a window of one tap: the local variances and
    covariance are 0, so SSIM is (2xy + C1) / (x^2 + y^2 + C1) per channel, and 1 for identical images."""
    a = np.array([[[[10, 100, 200]]]], np.uint8)  # [1, 1, 1, 3]
    b = np.array([[[[20, 100, 250]]]], np.uint8)
    c1 = (metrics.K1 * 255.0) ** 2
    x, y = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    want = np.mean((2 * x * y + c1) / (x * x + y * y + c1))
    assert metrics.ssim(a, b).item() == pytest.approx(want, rel=1e-12)
    assert metrics.ssim(a, a).item() == pytest.approx(1.0, abs=1e-12)
    two = np.repeat(np.repeat(a, 2, axis=1), 2, axis=2)  # 2 x 2 pixels of the same colour: window of 1 tap
    assert metrics.ssim(two, np.repeat(np.repeat(b, 2, axis=1), 2, axis=2)).item() == pytest.approx(want, rel=1e-12)
    assert metrics.ssim(two, two, return_map=True).shape == (1, 3, 2, 2)


def test_images_of_no_column_are_refused_as_of_no_pixel():
    """A width of 0 (not only a height of 0) has no pixel to score: refused naming the size, not a NaN score."""
    a = np.zeros((2, 8, 0, 3), np.uint8)
    for score in (metrics.psnr, metrics.ssim, metrics.mse):
        with pytest.raises(ValueError, match=r"\(8, 0\) pixels have no pixel"):
            score(a, a)
    f = torch.zeros(2, 3, 8, 0)
    with pytest.raises(ValueError, match=r"\(8, 0\) pixels have no pixel"):
        metrics.psnr(f, f)


def test_read_only_arrays_are_scored_without_a_warning():
    """Frames held in a read-only array (a memory map, a frozen buffer) are scored as copies: no warning of
    writing into a non-writable array, and the same scores as writable ones."""
    import warnings

    rng = np.random.default_rng(1)
    a, b = (rng.integers(0, 256, size=(2, 12, 12, 3), dtype=np.uint8) for _ in range(2))
    ra, rb = a.copy(), b.copy()
    ra.setflags(write=False)
    rb.setflags(write=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for score in (metrics.psnr, metrics.ssim, metrics.mse):
            torch.testing.assert_close(score(ra, rb), score(a, b), rtol=0, atol=0)
