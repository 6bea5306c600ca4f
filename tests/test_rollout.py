"""The closed-loop harnesses' chunk queries (`worldvla.eval.rollout.ChunkQuery`): what a policy's `act` may return,
how a batch's chunks are split per image, and the latency record kept across queries."""
import numpy as np
import pytest

from worldvla.eval import rollout
from worldvla.eval.rollout import ChunkQuery


class Returns:
    """A policy whose `act` returns the given object, whatever the images."""

    def __init__(self, out):
        self.out = out

    def act(self, images, history=None):
        return self.out


ONE = np.zeros((8, 8, 3), np.uint8)
TWO = np.zeros((2, 8, 8, 3), np.uint8)


def test_a_tuple_of_chunks_is_taken_as_a_list_of_chunks():
    """A policy may return its batch's chunks as a tuple: equal lengths stack to [N, K, D]; different lengths are
    refused by name (mode='release'), not with an error about a tuple having no shape."""
    a, b = np.full((3, 4), 0.25), np.full((3, 4), 0.75)
    out = ChunkQuery(Returns((a, b)))(TWO, None)
    assert out.shape == (2, 3, 4) and out.dtype == np.float64
    np.testing.assert_array_equal(out[1], b)
    with pytest.raises(ValueError, match="chunks differ in length"):
        ChunkQuery(Returns((np.zeros((2, 4)), np.zeros((3, 4)))))(TWO, None)
    rows = ChunkQuery(Returns((np.zeros((2, 4)), np.ones((3, 4))))).chunks(TWO, None)
    assert [r.shape for r in rows] == [(2, 4), (3, 4)] and rows[1].sum() == 12.0


def test_a_list_holding_something_that_is_not_a_number_is_refused_by_name():
    """A batch's chunks holding None (a policy that failed on one image) are named as not an array of numbers."""
    with pytest.raises(ValueError, match="policy.act returned a list that is not a rectangular array of numbers"):
        ChunkQuery(Returns([np.zeros((3, 4)), None]))(TWO, None)


def test_chunks_are_float64_whatever_the_policy_returns():
    """Integer or float32 chunks come back as float64 actions, from a call and from `chunks` alike (an integer
    chunk kept as integers would truncate whatever the harness computes from it)."""
    out = ChunkQuery(Returns(np.ones((2, 3, 4), np.int64)))(TWO, None)
    assert out.dtype == np.float64 and out.shape == (2, 3, 4)
    out = ChunkQuery(Returns(np.full((3, 4), 0.1, np.float32)))(ONE, None)
    assert out.dtype == np.float64
    rows = ChunkQuery(Returns([np.ones((2, 4), np.int32), np.full((1, 4), 0.5, np.float32)])).chunks(TWO, None)
    assert [r.dtype for r in rows] == [np.float64, np.float64]


def test_chunks_refuses_a_wrong_number_of_chunks_by_name():
    """`chunks` (each env's own chunk) refuses one chunk too many or too few for the batch, as a call does."""
    with pytest.raises(ValueError, match=r"returned 3 chunk\(s\) for 2 images"):
        ChunkQuery(Returns([np.zeros((2, 4))] * 3)).chunks(TWO, None)
    with pytest.raises(ValueError, match=r"returned 1 chunk\(s\) for 2 images"):
        ChunkQuery(Returns(np.zeros((1, 2, 4)))).chunks(TWO, None)


def test_latency_summary_of_one_query_and_of_queries_out_of_order(monkeypatch):
    """One query is summarised as itself; the maximum is the slowest query, not the latest."""
    query = ChunkQuery(Returns(np.zeros((2, 4))))
    ticks = iter([0.0, 2.0, 10.0, 18.0, 20.0, 21.0])  # queries of 2, 8 and 1 s
    monkeypatch.setattr(rollout.time, "perf_counter", lambda: next(ticks))
    query(ONE, None)
    assert query.latency_summary() == {"queries": 1, "mean_s": 2.0, "median_s": 2.0, "p90_s": 2.0, "max_s": 2.0}
    query(ONE, None)
    query(ONE, None)
    monkeypatch.undo()
    s = query.latency_summary()
    assert s["queries"] == 3 and s["max_s"] == 8.0 and s["median_s"] == 2.0


def test_an_act_whose_signature_inspect_cannot_find_gets_the_current_frame_only():
    """For a builtin `act` inspect finds no signature and raises ValueError (not TypeError): the query is still
    made, as the plain interface `act(images)`."""
    class BuiltinLike:
        @property
        def __signature__(self):
            raise ValueError("no signature found for builtin")

        def __call__(self, images):
            return np.full((len(images), 3, 4), 0.5)

    query = ChunkQuery(type("Policy", (), {"act": BuiltinLike()})())
    assert not query.takes_history
    out = query(TWO, np.ones_like(TWO))
    assert out.shape == (2, 3, 4) and (out == 0.5).all()


def test_non_finite_actions_are_refused_naming_the_policy():
    """A None inside a chunk's numbers read as NaN, and a NaN or inf chunk went on to the simulator: Meta-World's
    env then failed naming the env, and LIBERO's took it. Every way out of a query refuses it, naming where."""
    nan_row = [[0.1, 0.2, 0.3, 0.4], [0.5, None, 0.7, 0.8]]
    with pytest.raises(ValueError, match=r"non-finite action \(action 1: \[0.5, nan, 0.7, 0.8\]\)"):
        ChunkQuery(Returns(nan_row))(ONE, None)
    bad = np.zeros((2, 3, 4))
    bad[1, 2, 0] = np.inf
    with pytest.raises(ValueError, match=r"non-finite action \(image 1, action 2"):
        ChunkQuery(Returns(bad))(TWO, None)
    with pytest.raises(ValueError, match=r"non-finite action \(image 0, action 0"):
        ChunkQuery(Returns([np.full((1, 4), np.nan), np.zeros((3, 4))])).chunks(TWO, None)
    ok = ChunkQuery(Returns([[0.1, 0.2, 0.3, 0.4]]))(ONE, None)  # finite lists still pass
    assert ok.shape == (1, 4)


def test_a_chunk_with_several_non_finite_actions_names_the_first_of_them():
    """A NaN in action 1 and an inf in action 3 of a chunk are reported at action 1 (the first the simulator would have taken), for
    one image and for a batch's image alike."""
    chunk = np.zeros((4, 4))
    chunk[1, 2], chunk[3, 0] = np.nan, np.inf
    with pytest.raises(ValueError, match=r"non-finite action \(action 1: \[0.0, 0.0, nan, 0.0\]\)"):
        ChunkQuery(Returns(chunk))(ONE, None)
    with pytest.raises(ValueError, match=r"non-finite action \(image 1, action 1: "):
        ChunkQuery(Returns(np.stack([np.zeros((4, 4)), chunk])))(TWO, None)


class _ReachesAtStep:
    """A stand-in Meta-World env whose goal is reached on step `goal` of an episode (counted from one), or never
    for goal None; done on success or at `max_steps`, as `MetaWorldEnv.step`."""

    instruction = "reach the goal position"

    def __init__(self, goal, max_steps):
        self.goal, self.max_steps, self.seeds = goal, max_steps, []

    def reset(self, seed):
        self.seeds.append(seed)
        self.t, self.success = 0, False
        return np.full((8, 8, 3), 0, np.uint8)

    def step(self, action):
        assert self.t < self.max_steps, "a step past the episode's limit"
        self.t += 1
        self.success = self.success or (self.goal is not None and self.t >= self.goal)
        return np.full((8, 8, 3), self.t, np.uint8), 0.0, self.success, self.success or self.t >= self.max_steps

    def close(self):
        pass


class _Forward:
    """A policy whose chunks are three actions of 0.5 each, whatever the frames."""

    chunk_size, action_dim, image_size = 3, 4, 8

    def reset(self, instruction):
        pass

    def act(self, images, history=None):
        return np.full((len(images), self.chunk_size, 4), 0.5)


def test_an_episode_whose_goal_is_reached_on_its_last_allowed_step_counts_as_a_success():
    """Success on step `max_steps` itself is a success, counted at that many steps; an episode that never reaches
    its goal runs exactly `max_steps` steps and fails; each env's episode has its own seed."""
    from worldvla.eval.metaworld import closed_loop, eval_seeds

    envs = [_ReachesAtStep(5, 5), _ReachesAtStep(None, 5), _ReachesAtStep(4, 5)]
    r = closed_loop(_Forward(), "reach-v3", 3, seed=7, max_steps=5, envs=envs, record=True)
    assert r.successes == [True, False, True] and r.steps == [5, 5, 4]
    assert [e.seeds for e in envs] == [[s] for s in eval_seeds("reach-v3", 3, 7)]
    assert len(r.frames) == 6 and r.frames[-1].max() == 5  # the reset's frame and one a step, to the last
    d = r.to_dict()
    assert (d["successes"], d["episodes"], d["mean_steps_to_success"]) == (2, 3, 4.5)


def test_evaluation_seeds_in_the_upper_half_of_the_32_bit_range_draw_their_own_layouts():
    """--seed takes [0, 2**32): seed 2**31 is not seed 0 with its top bit dropped, nor 2**32 - 1 seed 2**31 - 1."""
    from worldvla.eval.metaworld import eval_seeds

    assert set(eval_seeds("reach-v3", 4, 1 << 31)).isdisjoint(eval_seeds("reach-v3", 4, 0))
    assert set(eval_seeds("reach-v3", 4, (1 << 32) - 1)).isdisjoint(eval_seeds("reach-v3", 4, (1 << 31) - 1))


def test_a_variants_latency_is_the_mean_of_its_tasks_latencies_not_their_median(tmp_path, monkeypatch):
    """Over three tasks whose median query times are 1, 2 and 6 s (means 2, 3 and 7 s), the variant's figures are
    their means, 3 s and 4 s, as the table says ("each task's median, mean over tasks")."""
    from worldvla.eval import metaworld as mw

    monkeypatch.setattr(mw, "_default_env_factory", lambda task, size, steps, cam="corner": _ReachesAtStep(2, steps))
    times = {"reach-v3": (1.0, 2.0), "push-v3": (2.0, 3.0), "drawer-open-v3": (6.0, 7.0)}

    def timed(policy, task, episodes, **kw):
        median, mean = times[task]
        return mw.TaskResult(task, [1], [True], [2], latency={"queries": 1, "median_s": median, "mean_s": mean})

    monkeypatch.setattr(mw, "closed_loop", timed)
    m = mw.evaluate([_Forward()], list(times), 1, tmp_path, max_steps=3, n_envs=1, wm_episodes=0, gifs=False,
                    progress=False, env_workers=1, random_baseline=False, variant_names=["p"])
    assert m["variants"]["p"]["latency_median_s"] == 3.0 and m["variants"]["p"]["latency_mean_s"] == 4.0
