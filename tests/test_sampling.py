"""The reference draw (`worldvla.ops.sampling.sample_logits`): the Gumbel-max trick is a draw from
softmax(logits / T) over the top-k, and given its noise a deterministic choice."""
import math

import pytest
import torch

from worldvla.ops.sampling import draw_gumbel, sample_logits, scaled_gumbel


@pytest.mark.parametrize("temperature,top_k", [(0.7, None), (1.5, 5), (1.0, 1)])
def test_draw_follows_the_softmax(rng, temperature, top_k):
    """8,192 draws of one row of 12 logits: every class's frequency within 5 standard deviations of
    softmax(logits / T) renormalized over the top-k (a sampler drawing from logits * T, or ignoring top-k,
    misses by more), classes outside the top-k never drawn."""
    n, C = 8192, 12
    logits = torch.randn(1, C, generator=rng) * 1.5
    got = sample_logits(logits.expand(n, C), temperature, top_k, torch.Generator().manual_seed(3))
    kept = torch.topk(logits[0], top_k or C).indices
    p = torch.zeros(C, dtype=torch.float64)
    p[kept] = torch.softmax(logits[0, kept].double() / temperature, 0)
    freq = torch.bincount(got, minlength=C).double() / n
    sd = (p * (1 - p) / n).sqrt()
    assert bool((freq[p == 0] == 0).all())
    assert bool(((freq - p).abs() <= 5 * sd + 1e-12).all()), (freq, p)


def test_draw_is_the_argmax_of_the_noisy_logits(rng):
    """Given its noise, the draw is argmax(logits + T * G) over the top-k (masked below the k-th largest,
    ties at the k-th kept), the first maximum winning; drawing the noise from a generator draws it as
    `draw_gumbel` does."""
    logits = torch.randn(6, 40, generator=rng)
    logits[0, 3] = logits[0, 7] = logits[0].max() + 1  # a tie at the top: the first wins without noise
    g = draw_gumbel((6, 40), torch.Generator().manual_seed(5))
    for T, k in ((0.9, None), (1.3, 4), (2.0, 1)):
        want = logits.clone()
        if k is not None:
            want[want < want.topk(k, dim=1).values[:, -1:]] = -math.inf
        want = (want + scaled_gumbel(g, T)).argmax(1)
        assert torch.equal(sample_logits(logits, T, k, gumbel=g), want)
        assert torch.equal(sample_logits(logits, T, k, torch.Generator().manual_seed(5)), want)
    assert int(sample_logits(logits, 1.0, 2, gumbel=torch.zeros(6, 40))[0]) == 3


def test_gumbel_noise_is_finite_and_gumbel_distributed(monkeypatch):
    g = draw_gumbel((200_000,), torch.Generator().manual_seed(0))
    assert g.dtype == torch.float32 and bool(torch.isfinite(g).all())
    assert abs(g.mean().item() - 0.5772) < 0.01 and abs(g.var().item() - math.pi ** 2 / 6) < 0.03
    # the extreme uniforms torch.rand can return, 0 and the largest below 1, give finite noise
    monkeypatch.setattr(torch, "rand", lambda *a, **k: torch.tensor([0.0, 1.0 - 2.0 ** -24]))
    g = draw_gumbel((2,))
    assert bool(torch.isfinite(g).all()) and -4.5 < g[0] < -4.4 and 16.6 < g[1] < 16.7


def test_top_k_holds_at_any_temperature(rng):
    """Columns outside the top-k stay out however large the noise grows (scores that overflow to inf are
    masked, not turned into NaN); a non-finite temperature is refused."""
    logits = torch.randn(500, 30, generator=rng)
    top2 = logits.topk(2, dim=1).indices
    for T in (1e30, 1e38):
        got = sample_logits(logits, T, 2, torch.Generator().manual_seed(1))
        assert bool((got.view(-1, 1) == top2).any(1).all()), T
    with pytest.raises(ValueError, match="temperature must be a finite number"):
        sample_logits(logits, math.inf, 2)


def test_bad_noise_and_top_k(rng):
    logits = torch.randn(2, 10, generator=rng)
    with pytest.raises(ValueError, match="gumbel noise must be float32"):
        sample_logits(logits, 1.0, gumbel=torch.zeros(2, 9))
    with pytest.raises(ValueError, match="gumbel noise is on meta but the logits are on cpu"):
        sample_logits(logits, 1.0, gumbel=torch.zeros(2, 10, device="meta"))
    for top_k in (0, 2.5, True, "3"):  # a float or a string reached the native sampler's binding
        with pytest.raises(ValueError, match="top_k must be an integer >= 1"):
            sample_logits(logits, 1.0, top_k)
    for temperature in ("1.0", None, math.nan):
        with pytest.raises(ValueError, match="temperature must be a finite number"):
            sample_logits(logits, temperature, 2)


def _near_tie(rng):
    """hidden [4, 8], lm_head [40, 8] whose rows 5 and 9 score 1.0 and 1.001 on the first hidden row: row 9 wins
    in float32, and the two tie in bfloat16 (1.001 rounds to 1.0), where the first, row 5, wins."""
    h, w = torch.randn(4, 8, generator=rng) / 8, torch.randn(40, 8, generator=rng) / 8
    h[0] = 0.0
    h[0, 0] = 1.0
    w[:, 0] = w[:, 0].clamp(max=0.5)
    w[5, 0], w[9, 0] = 1.0, 1.001
    return h, w


def test_constrained_sample_takes_autocast_on_every_backend(rng):
    """Under CPU bfloat16 autocast the torch path's range product ran in bf16 while the native sampler, which
    autocast does not see, computed the fp32 inputs in fp32: the ids depended on the backend `auto` picked for
    the machine. The entry point casts as autocast does: each backend picks what it picks for the bf16-cast
    inputs (row 5 of the near tie, on every backend)."""
    from worldvla import ops
    from worldvla.ops import dispatch

    h, w = _near_tie(rng)
    assert int(ops.constrained_sample(h, w, 0, 40, backend="torch")[0]) == 9  # float32: row 9
    for backend in ["auto"] + dispatch.available("constrained_sample"):
        for kw in ({}, {"temperature": 0.5, "top_k": 3, "gumbel": torch.zeros(4, 37)}):
            lo = 0 if not kw else 3
            want = ops.constrained_sample(h.bfloat16(), w.bfloat16(), lo, 40, backend=backend, **kw)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                got = ops.constrained_sample(h, w, lo, 40, backend=backend, **kw)
            assert torch.equal(got, want) and int(got[0]) == 5, (backend, kw, got, want)


@pytest.mark.parametrize("lo, hi", [(2.7, 10), (2, 10.0), (True, 10), ("2", 10), (2, None)])
def test_constrained_sample_refuses_a_range_that_is_not_integers(rng, lo, hi):
    """A float range was truncated by the native sampler (ids below lo) and refused by torch's slicing with an
    error naming neither; integer types (numpy's, 0-d integer tensors) pass as ints."""
    import numpy as np

    from worldvla import ops
    from worldvla.ops import dispatch

    h, w = torch.randn(3, 8, generator=rng), torch.randn(30, 8, generator=rng)
    for backend in ["auto"] + dispatch.available("constrained_sample"):
        with pytest.raises(TypeError, match=r"constrained_sample: the vocabulary range \[lo, hi\) must be integer "
                                            r"token ids"):
            ops.constrained_sample(h, w, lo, hi, backend=backend)
        want = ops.constrained_sample(h, w, 2, 10, backend=backend)
        assert torch.equal(ops.constrained_sample(h, w, np.int64(2), torch.tensor(10), backend=backend), want)


def _range_edges(rng, lo, hi, hot):
    """hidden [3, 8] and lm_head [40, 8] where each of rows `hot` scores far above the rest on every hidden row."""
    h = torch.randn(3, 8, generator=rng).abs() / 8 + 0.1
    w = torch.randn(40, 8, generator=rng) / 8
    for i, row in enumerate(hot):
        w[row] = 4.0 - i  # the first of `hot` highest
    return h, w


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "drawn"])
def test_every_backend_picks_inside_the_range_and_its_last_id(rng, sampled):
    """The range [lo, hi) at its edges: the rows just outside it (hi, lo - 1) score highest and must never be
    chosen; within it the last row (hi - 1) scores highest and must be; and random inputs give
    lo + argmax(hidden @ W[lo:hi]^T). A range read one row too far, or one row short, passed every test."""
    from worldvla import ops
    from worldvla.ops import dispatch

    lo, hi = 7, 23
    kw = {"temperature": 1e-3, "top_k": 2, "generator": torch.Generator().manual_seed(0)} if sampled else {}
    h, w = _range_edges(rng, lo, hi, hot=(hi, lo - 1, hi - 1))
    hr, wr = torch.randn(5, 8, generator=rng), torch.randn(40, 8, generator=rng)
    for backend in ["auto"] + dispatch.available("constrained_sample"):
        got = ops.constrained_sample(h, w, lo, hi, backend=backend, **kw)
        assert got.tolist() == [hi - 1] * 3, (backend, got)
        if not sampled:
            want = (hr @ wr[lo:hi].t()).argmax(1) + lo
            assert torch.equal(ops.constrained_sample(hr, wr, lo, hi, backend=backend), want), backend


def test_top_k_one_short_of_the_range_still_masks_the_last(rng):
    """top_k = C - 1 must keep out the one lowest column, whatever noise it gets; top_k = 1 is the argmax."""
    logits = torch.randn(64, 12, generator=rng)
    low = logits.argmin(1)
    gumbel = torch.zeros(64, 12)
    gumbel[torch.arange(64), low] = 1e4  # noise that would make the lowest column win
    got = sample_logits(logits, 1.0, 11, gumbel=gumbel)
    assert not bool((got == low).any())
    assert torch.equal(sample_logits(logits, 1.0, 1, gumbel=gumbel), logits.argmax(1))


@pytest.mark.parametrize("lo, hi", [(5, 5), (6, 5), (-1, 4), (30, 41), (0, 41)])
def test_constrained_sample_refuses_an_empty_range_or_one_past_the_vocabulary(rng, lo, hi):
    """A range reaching past the head's 40 rows was cut short by torch's slicing (ids from fewer rows than asked,
    silently) and an empty one left nothing to choose from: every backend names the range and the vocabulary."""
    from worldvla import ops
    from worldvla.ops import dispatch

    h, w = torch.randn(3, 8, generator=rng), torch.randn(40, 8, generator=rng)
    for backend in ["auto"] + dispatch.available("constrained_sample"):
        for kw in ({}, {"temperature": 1.0, "top_k": 2, "generator": torch.Generator().manual_seed(0)}):
            with pytest.raises(ValueError, match=rf"vocabulary range \[{lo}, {hi}\) is empty or outside \[0, 40\)"):
                ops.constrained_sample(h, w, lo, hi, backend=backend, **kw)
    assert bool((ops.constrained_sample(h, w, 39, 40) == 39).all())  # the last row alone: a range of one


def test_greedy_takes_the_first_of_tied_maxima_and_ignores_top_k(rng):
    """At temperature 0 (or below) the choice is the argmax, the first column among equal maxima, whatever
    top_k is given (documented: top_k has no effect on a greedy choice)."""
    logits = torch.randn(4, 16, generator=rng)
    top = logits.max(1, keepdim=True).values + 1.0
    logits[:, 9], logits[:, 2], logits[:, 14] = top[:, 0], top[:, 0], top[:, 0]
    for T, k in ((0.0, None), (0.0, 1), (-1.0, 3), (0.0, 16)):
        assert sample_logits(logits, T, k).tolist() == [2] * 4, (T, k)


def test_constrained_sample_refuses_a_bool_upper_bound(rng):
    """A bool is refused as either bound: hi=True (a flag passed in the bound's place) read as 1 and drew every id
    from the one-row range [0, 1)."""
    from worldvla import ops

    h, w = torch.randn(3, 8, generator=rng), torch.randn(30, 8, generator=rng)
    with pytest.raises(TypeError, match=r"the vocabulary range \[lo, hi\) must be integer token ids, got 0 and True"):
        ops.constrained_sample(h, w, 0, True)


def test_a_greedy_choice_draws_no_noise(rng):
    """At temperature 0 (or below) the choice is the argmax and nothing is drawn: the generator's state is left as
    it was, so the draws after a greedy choice are the ones the generator would have given without it."""
    logits = torch.randn(3, 20, generator=rng)
    g = torch.Generator().manual_seed(11)
    state = g.get_state()
    for T in (0.0, -0.5):
        assert torch.equal(sample_logits(logits, T, 4, generator=g), logits.argmax(1)), T
    assert torch.equal(g.get_state(), state)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_noise_of_another_float_dtype_is_refused_naming_it(rng, dtype):
    """Given noise must be float32, as `draw_gumbel` draws it (a native draw reads it by address as float32):
    noise of the right shape in another float dtype is refused, naming the dtype and the shape expected."""
    logits = torch.randn(2, 10, generator=rng)
    with pytest.raises(ValueError, match=rf"gumbel noise must be float32 \(2, 10\) like the logits, got {dtype} "
                                         rf"\(2, 10\)"):
        sample_logits(logits, 1.0, gumbel=torch.zeros(2, 10, dtype=dtype))


def _cpu_backends():
    """The backends whose constrained_sample runs CPU tensors here: auto, torch, and native where it is built."""
    from worldvla.ops import dispatch

    return ["auto", "torch"] + (["native"] if "native" in dispatch.available("constrained_sample") else [])


def test_a_refused_temperature_is_quoted_as_given(rng):
    """The refusal of a temperature quotes the temperature itself (a string, a NaN), whatever top_k is."""
    logits = torch.randn(2, 10, generator=rng)
    for temperature, shown in (("hot", "'hot'"), (math.nan, "nan"), (-math.inf, "-inf")):
        with pytest.raises(ValueError, match=rf"temperature must be a finite number \(0 or less: greedy\), got "
                                             rf"{shown}$"):
            sample_logits(logits, temperature, 3)


def test_noise_of_the_right_size_but_another_shape_is_refused(rng):
    """Noise holding as many values as the draw needs but laid out [C, N] (or with a leading 1) is refused, naming
    both shapes: the native draw reads the noise by address, so a transposed [hi - lo, N] would pass its values to
    the wrong columns without a word, and torch's sum would broadcast a [1, N, C] into ids of the wrong shape."""
    from worldvla import ops

    logits = torch.randn(2, 10, generator=rng)
    for shape in ((10, 2), (1, 2, 10), (20,)):
        with pytest.raises(ValueError, match=rf"gumbel noise must be float32 \(2, 10\) like the logits, got "
                                             rf"torch.float32 \({', '.join(map(str, shape))},?\)"):
            sample_logits(logits, 1.0, gumbel=torch.zeros(shape))
    h, w = torch.randn(3, 8, generator=rng), torch.randn(40, 8, generator=rng)
    for backend in _cpu_backends():
        with pytest.raises(ValueError, match=r"gumbel noise must be float32 \(3, 30\) like the logits, got "
                                             r"torch.float32 \(30, 3\)"):
            ops.constrained_sample(h, w, 10, 40, 1.0, backend=backend, gumbel=torch.zeros(30, 3))


@pytest.mark.parametrize("top_k", [0, -1, 2.5, "3"])
def test_every_backend_refuses_a_bad_top_k_at_temperature_zero_too(rng, top_k):
    """A greedy choice ignores top_k, but one no draw could take is refused all the same, on every backend: the
    native greedy kernel never reads top_k, so without the entry point's check it took top_k=0 or 2.5 at
    temperature 0 and refused it only once the temperature was raised."""
    from worldvla import ops

    h, w = torch.randn(3, 8, generator=rng), torch.randn(40, 8, generator=rng)
    for backend in _cpu_backends():
        with pytest.raises(ValueError, match=rf"top_k must be an integer >= 1 \(or None for the whole range\), got "
                                             rf"{top_k!r}"):
            ops.constrained_sample(h, w, 10, 40, 0.0, top_k, backend=backend)


def test_constrained_sample_refuses_a_hidden_size_the_head_does_not_have(rng):
    """hidden [N, H] against a head [V, H'] of another width is refused naming both shapes, on every backend (it had
    stopped in torch's matmul error, which names neither the op nor its arguments)."""
    from worldvla import ops

    h = torch.randn(3, 8, generator=rng)
    for w in (torch.randn(40, 7, generator=rng), torch.randn(40, 9, generator=rng)):
        for backend in _cpu_backends():
            with pytest.raises(ValueError, match=rf"constrained_sample wants hidden \[N, H\] and weight \[V, H\]; got "
                                                 rf"\(3, 8\), \(40, {w.shape[1]}\)"):
                ops.constrained_sample(h, w, 10, 40, backend=backend)


def test_auto_screens_natively_only_what_the_native_sampler_takes(rng):
    """`auto` sends bfloat16 choices and float32 ones over SCREEN_MIN_ROWS codes or more to the native sampler only
    where it supports the inputs: a head read through a transposed view (rows not contiguous), which the native
    sampler refuses, is chosen from by the op's order instead (torch's ids), not refused as unsupported."""
    from worldvla import ops
    from worldvla.ops import sampling

    big = sampling.SCREEN_MIN_ROWS
    h = torch.randn(2, 8, generator=rng)
    for dtype, hi in ((torch.bfloat16, 40), (torch.float32, big + 10)):
        w = torch.randn(8, hi, generator=rng).t().to(dtype)  # [hi, 8] with a column stride of hi
        assert w.stride(1) != 1
        hd = h.to(dtype)
        for kw in ({}, {"temperature": 0.7, "top_k": 3, "gumbel": draw_gumbel((2, hi - 10), rng)}):
            want = ops.constrained_sample(hd, w.contiguous(), 10, hi, backend="torch", **kw)
            assert torch.equal(ops.constrained_sample(hd, w, 10, hi, **kw), want), (dtype, kw)


def test_the_cpu_screening_rule_leaves_other_devices_to_the_ops_order(monkeypatch):
    """The rule that takes the native sampler for bfloat16 and frame-sized ranges is the CPU's (measured there): on
    another device the op's own order decides, even where a native implementation would take the inputs (meta
    tensors here, with no order of their own: torch)."""
    from worldvla.ops import dispatch, sampling

    taken = lambda *a, **k: None  # noqa: E731
    monkeypatch.setitem(dispatch._IMPLS["constrained_sample"], "native", (taken, lambda *a, **k: True))
    for dtype, hi in ((torch.bfloat16, 40), (torch.float32, sampling.SCREEN_MIN_ROWS + 10)):
        h, w = torch.empty(2, 8, dtype=dtype, device="meta"), torch.empty(hi, 8, dtype=dtype, device="meta")
        assert sampling.resolve_constrained_sample(h, w, 10, hi) is sampling.constrained_sample_ref, dtype
        h, w = torch.zeros(2, 8, dtype=dtype), torch.zeros(hi, 8, dtype=dtype)
        assert sampling.resolve_constrained_sample(h, w, 10, hi) is taken, dtype  # the same inputs on the CPU


def test_a_draw_scores_float64_logits_in_float32(rng):
    """A draw computes in float32, as every backend's float32 range logits do: float64 logits that differ below
    float32's resolution tie there, and the first of them wins (given the same noise), as it would from the
    float32 logits of the same hidden state."""
    logits = torch.randn(3, 6, generator=rng, dtype=torch.float64)
    logits[:, 4] = logits.max(1).values + 1.0
    logits[:, 1] = logits[:, 4] - 1e-12  # the same float32 value as column 4
    for k in (None, 2):
        got = sample_logits(logits, 1.0, k, gumbel=torch.zeros(3, 6))
        assert got.tolist() == [1, 1, 1], k
        assert torch.equal(got, sample_logits(logits.float(), 1.0, k, gumbel=torch.zeros(3, 6)))
