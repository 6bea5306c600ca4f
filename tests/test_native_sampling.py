"""Native constrained decoding: range logits and greedy argmax over [lo, hi).

Greedy picks are judged by logit, not index: the chosen token's float64 logit may
trail the true maximum by at most 2x what torch's argmax at the same precision
gives up (the reference rounds logits to the input dtype, so bf16 ties are common).
"""
import pytest
import torch

_C = pytest.importorskip("worldvla._C")

from worldvla import VocabLayout  # noqa: E402
from worldvla.ops import constrained_sample, constrained_sample_ref  # noqa: E402
from worldvla.ops import native_backend as nb  # noqa: E402
from worldvla.ops.sampling import draw_gumbel, sample_logits  # noqa: E402

LAYOUT = VocabLayout.compact()

# Every output buffer the native wrappers allocate starts poisoned (NaN / an integer sentinel): an
# element a kernel never writes fails instead of passing on leftover bytes.
pytestmark = pytest.mark.usefixtures("poison_outputs")


def nan_of(bits: int, dtype: torch.dtype) -> torch.Tensor:
    """The NaN with these float32 bits (for bfloat16 their top half), as a one-element tensor: a cast
    would not keep its sign and payload (torch makes every bfloat16 NaN 0x7fc0)."""
    if dtype == torch.float32:
        return torch.tensor([bits]).to(torch.int32).view(torch.float32)
    return torch.tensor([bits >> 16]).to(torch.int16).view(torch.bfloat16)


def assert_greedy(ids, hidden, weight, lo, hi, torch_ids, name=""):
    logits = hidden.double().cpu() @ weight[lo:hi].double().cpu().t()
    best = logits.max(1).values
    rows = torch.arange(hidden.shape[0])
    ids, torch_ids = ids.cpu(), torch_ids.cpu()
    assert ids.dtype == torch.int64 and bool(((ids >= lo) & (ids < hi)).all()), f"{name}: ids outside range"
    gap = (best - logits[rows, ids - lo]).max().item()
    torch_gap = (best - logits[rows, torch_ids - lo]).max().item()
    assert gap <= 2 * torch_gap + 1e-6 * best.abs().max().item(), f"{name}: gap {gap:.3g} vs torch {torch_gap:.3g}"


@pytest.mark.usefixtures("cpu_width")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_greedy_bins_cpu(rng, dtype):
    lo, hi = LAYOUT.bin_range
    hidden = torch.randn(13, 96, generator=rng).to(dtype)
    weight = (torch.randn(LAYOUT.vocab_size, 96, generator=rng) * 0.1).to(dtype)
    ids = nb.range_argmax_op(hidden, weight, lo, hi)
    assert_greedy(ids, hidden, weight, lo, hi, constrained_sample_ref(hidden, weight, lo, hi), f"cpu {dtype}")
    assert torch.equal(constrained_sample(hidden, weight, lo, hi, backend="native"), ids)


def test_greedy_ties_pick_first_cpu(rng):
    hidden = torch.randn(3, 32, generator=rng)
    weight = torch.randn(50, 32, generator=rng)
    weight[30] = weight[10] = hidden[0] * 3.0  # the same (largest) logit twice for row 0
    ids = nb.range_argmax_op(hidden, weight, 5, 41)
    assert int(ids[0]) == 10
    assert torch.equal(ids, constrained_sample_ref(hidden, weight, 5, 41))


def _unscreened(hidden, weight, lo, hi):
    ids = torch.empty(hidden.shape[0], dtype=torch.int64)
    _C.range_argmax(-1, 0, 0, hidden.data_ptr(), hidden.stride(0), weight.data_ptr(), weight.stride(0),
                    hidden.shape[0], hidden.shape[1], lo, hi, 0, ids.data_ptr())
    return ids


@pytest.mark.usefixtures("cpu_width")
def test_screen_tables_follow_the_range_of_one_weight(rng):
    """One lm_head, two ranges of it screened in turn (a world model's image codes, then an action model's bins
    widened to screen size): each call's bfloat16 copies must be the rows of its own range, not the last range
    screened of that weight, nor of one as long at another offset."""
    V, H = 7000, 24
    weight = torch.randn(V, H, generator=rng)
    for lo, hi in ((0, 2048), (4000, 6048), (2000, 4048), (4000, 6048), (0, 2048), (10, 7000)):
        hidden = torch.randn(5, H, generator=rng)
        assert nb.screen_tables(weight, lo, hi) is not None
        assert torch.equal(nb.screen_tables(weight, lo, hi)[0], weight[lo:hi].bfloat16())
        assert torch.equal(nb.range_argmax_op(hidden, weight, lo, hi), _unscreened(hidden, weight, lo, hi)), (lo, hi)



def test_screen_tables_follow_the_end_of_a_range(rng):
    """Two ranges of one weight from the same first row but of different lengths are screened each with its own
    rows: the tables of the shorter one would leave the longer range's last rows out of the screen."""
    V, H = 3000, 16
    weight = torch.randn(V, H, generator=rng)
    hidden = torch.randn(4, H, generator=rng)
    weight[2900] = hidden[0] * 4.0  # row 0's best code, past the shorter range's end
    for hi in (2100, 3000, 2100):
        w16, colmax = nb.screen_tables(weight, 0, hi)
        assert w16.shape == (hi, H) and torch.equal(w16, weight[:hi].bfloat16())
        assert torch.equal(colmax, weight[:hi].abs().amax(0))
        ids = nb.range_argmax_op(hidden, weight, 0, hi)
        assert torch.equal(ids, _unscreened(hidden, weight, 0, hi)), hi
        assert (int(ids[0]) == 2900) == (hi == 3000)


def test_a_range_whose_values_overflow_bfloat16_is_not_screened(rng):
    """A float32 value beyond bfloat16's range would be an infinity in the screen's copies: such a range gets no
    tables (None) and its greedy ids are the float32 ones."""
    V, H = 2500, 16
    weight = torch.randn(V, H, generator=rng)
    hidden = torch.randn(3, H, generator=rng)
    weight[7, 3] = torch.finfo(torch.float32).max  # finite in float32, rounds to inf in bfloat16
    assert not torch.isfinite(weight[7].bfloat16()).all()
    assert nb.screen_tables(weight, 0, V) is None
    assert nb.screen_tables(weight, 8, V) is not None  # the rows after it screen as usual
    assert torch.equal(nb.range_argmax_op(hidden, weight, 0, V), _unscreened(hidden, weight, 0, V))

def _close_calls(rng):
    """A frame-sized range (8,192 codes of 9,000) whose rows hold the cases a bfloat16 screen must get
    right: for hidden row 0 an exact tie at the top (rows top and top + 7: the first wins) and a row a few
    ulps above them (top + 9), for row 1 two rows apart below bfloat16's resolution (lo + 10, lo + 11),
    for row 2 two rows that round to the same bfloat16s (lo + 12, lo + 13). -> hidden, weight, lo, hi, top."""
    V, H, lo, hi = 9000, 72, 500, 500 + 8192
    hidden = torch.randn(7, H, generator=rng)
    weight = torch.randn(V, H, generator=rng) * 0.05
    top = lo + 4000
    weight[top] = hidden[0] * 0.2
    weight[top + 7] = weight[top]
    weight[top + 9] = weight[top] * (1 + 2 ** -22)
    weight[lo + 10] = hidden[1] * 0.2
    weight[lo + 11] = weight[lo + 10] + 1e-7 * torch.randn(H, generator=rng)
    weight[lo + 12] = hidden[2] * 0.2 + 2 ** -12
    weight[lo + 13] = hidden[2] * 0.2 - 2 ** -12
    return hidden, weight, lo, hi, top


@pytest.mark.usefixtures("cpu_width")
@pytest.mark.parametrize("max_candidates", [64, 1, 0])
def test_screened_greedy_is_the_float32_choice(rng, monkeypatch, max_candidates):
    """Greedy over a frame-sized range is screened with bfloat16 copies of its rows: bitwise the ids of
    the float32 kernel, also for exact ties (the first wins), near ties a few ulps apart, logits that
    bfloat16 rounding reorders, and rows whose candidates overflow (the whole range in float32)."""
    monkeypatch.setattr(nb, "SCREEN_MAX_CANDIDATES", max_candidates)
    hidden, weight, lo, hi, top = _close_calls(rng)
    H = hidden.shape[1]
    ids = nb.range_argmax_op(hidden, weight, lo, hi)
    assert torch.equal(ids, _unscreened(hidden, weight, lo, hi))
    assert int(ids[0]) in (top, top + 9) and int(ids[1]) in (lo + 10, lo + 11) and int(ids[2]) in (lo + 12, lo + 13)
    for _ in range(20):  # fresh rows
        h = torch.randn(3, H, generator=rng)
        assert torch.equal(nb.range_argmax_op(h, weight, lo, hi), _unscreened(h, weight, lo, hi))


def _reference_draw(hidden, weight, lo, hi, temperature, top_k, gumbel):
    """The reference draw on the float32 kernel's unscreened logits of the range."""
    return sample_logits(nb._range_logits_impl(hidden, weight, lo, hi), temperature, top_k, gumbel=gumbel) + lo


@pytest.mark.usefixtures("cpu_width")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("top_k", [None, 1, 5, 300])
def test_native_draw_is_the_reference_draw(rng, dtype, top_k):
    """A draw on the CPU is one native call: given the same noise, the reference's ids on the same
    float32 logits (bfloat16 weights widened exactly), with and without top-k (300 >= the 256 bins);
    from a generator, the reference's draw of its noise."""
    lo, hi = LAYOUT.bin_range
    hidden = torch.randn(9, 80, generator=rng).to(dtype)
    weight = (torch.randn(LAYOUT.vocab_size, 80, generator=rng) * 0.1).to(dtype)
    for T in (0.05, 1.0, 3.0):
        g = draw_gumbel((9, hi - lo), rng)
        got = constrained_sample(hidden, weight, lo, hi, T, top_k, gumbel=g, backend="native")
        assert torch.equal(got, _reference_draw(hidden, weight, lo, hi, T, top_k, g)), T
    seed = int(torch.randint(0, 2**31, (1,), generator=rng))
    got = constrained_sample(hidden, weight, lo, hi, 1.0, top_k, torch.Generator().manual_seed(seed), backend="native")
    g = draw_gumbel((9, hi - lo), torch.Generator().manual_seed(seed))
    assert torch.equal(got, _reference_draw(hidden, weight, lo, hi, 1.0, top_k, g))


@pytest.mark.usefixtures("cpu_width")
@pytest.mark.parametrize("max_candidates", [64, 1, 0])
@pytest.mark.parametrize("top_k", [None, 5, 100])
def test_screened_draw_is_the_float32_draw(rng, monkeypatch, max_candidates, top_k):
    """A draw over a frame-sized range is screened with bfloat16 copies of its rows: bitwise the ids of
    the draw on the float32 kernel's logits, for exact ties and near ties a few ulps apart under
    vanishing noise (the first maximum wins), logits that bfloat16 rounding reorders, temperatures from
    0.001 to 2, and rows whose candidates overflow (the whole range in float32)."""
    monkeypatch.setattr(nb, "SCREEN_MAX_CANDIDATES", max_candidates)
    hidden, weight, lo, hi, top = _close_calls(rng)
    H = hidden.shape[1]
    for T in (0.001, 0.05, 0.5, 2.0):
        g = draw_gumbel((7, hi - lo), rng)
        for noise in (g, torch.zeros_like(g)):  # zero noise: the ties decide
            got = constrained_sample(hidden, weight, lo, hi, T, top_k, gumbel=noise, backend="native")
            assert torch.equal(got, _reference_draw(hidden, weight, lo, hi, T, top_k, noise)), (T, noise.any())
    zero = constrained_sample(hidden, weight, lo, hi, 1.0, top_k, gumbel=torch.zeros(7, hi - lo), backend="native")
    assert int(zero[0]) == top + 9 and int(zero[1]) in (lo + 10, lo + 11)
    for _ in range(10):  # fresh rows
        h = torch.randn(3, H, generator=rng)
        g = draw_gumbel((3, hi - lo), rng)
        got = constrained_sample(h, weight, lo, hi, 0.7, top_k, gumbel=g, backend="native")
        assert torch.equal(got, _reference_draw(h, weight, lo, hi, 0.7, top_k, g))


@pytest.mark.usefixtures("cpu_width")
@pytest.mark.parametrize("R", [250, 2048])  # the whole range in float32; the bfloat16 screen
@pytest.mark.parametrize("top_k", [3, 6])
def test_top_k_keeps_ties_at_the_threshold(rng, R, top_k):
    """Four codes tied at the 3rd largest logit (equal rows): the k-th largest is theirs for k = 3 to 6,
    and every one of them stays drawable (torch masks only logits below it), from the whole range's
    threshold as from the one among the screen's candidates. The noise picks the last of them."""
    lo, H = 5, 16
    hidden = torch.randn(2, H, generator=rng)
    weight = torch.randn(lo + R, H, generator=rng) * 0.05
    base = hidden[0] * 0.1
    weight[lo + 3], weight[lo + 9] = base * 3, base * 2
    tied = (20, 40, 41, 100)
    for c in tied:
        weight[lo + c] = base
    g = torch.zeros(2, R)
    g[0, 100] = 50.0
    got = constrained_sample(hidden, weight, lo, lo + R, 1.0, top_k, gumbel=g, backend="native")
    assert torch.equal(got, _reference_draw(hidden, weight, lo, lo + R, 1.0, top_k, g))
    assert int(got[0]) == lo + 100


def test_screen_bound_covers_bfloat16_rounding(monkeypatch):
    """Two codes 2^-19 apart whose weights round to bfloat16 values 2^-7 apart, the lower logit's code
    rounding up: the screen's bound must allow bfloat16's full rounding error (2^-8 of a weight, not
    2^-9), or the screened greedy choice and the screened draw pick the wrong code."""
    monkeypatch.setattr(nb, "SCREEN_MAX_CANDIDATES", 64)
    R = 2048
    weight = torch.zeros(R, 2)
    weight[0] = torch.tensor([1 + 2 ** -8 - 2 ** -20, 2 ** -18])
    weight[1] = torch.tensor([1 + 2 ** -8 + 2 ** -20, 0.0])
    hidden = torch.ones(1, 2)
    assert int(constrained_sample_ref(hidden, weight, 0, R)[0]) == 0
    assert int(nb.range_argmax_op(hidden, weight, 0, R)[0]) == 0
    for top_k in (None, 1, 2):
        got = constrained_sample(hidden, weight, 0, R, 1.0, top_k, gumbel=torch.zeros(1, R), backend="native")
        assert int(got[0]) == 0, top_k


@pytest.mark.parametrize("top_k", [None, 2, 3, 6])
def test_draw_takes_nan_as_torch_does(rng, top_k):
    """NaN logits (a NaN weight row) are drawn and chosen greedily as torch does: topk orders NaN above every
    number, the threshold then masks nothing if the k largest are NaN, and argmax takes the first NaN."""
    hidden = torch.randn(4, 16, generator=rng)
    weight = torch.randn(300, 16, generator=rng)
    weight[40, 3] = weight[7, 0] = float("nan")
    for _ in range(5):
        g = draw_gumbel((4, 250), rng)
        got = constrained_sample(hidden, weight, 5, 255, 1.0, top_k, gumbel=g, backend="native")
        want = sample_logits((hidden @ weight[5:255].t()).float(), 1.0, top_k, gumbel=g) + 5
        assert torch.equal(got, want), (top_k, got, want)
    # greedy too: the first NaN, as torch.argmax (the C++ argmax had skipped NaN logits)
    greedy = constrained_sample(hidden, weight, 5, 255, backend="native")
    assert torch.equal(greedy, (hidden @ weight[5:255].t()).argmax(-1) + 5) and int(greedy[0]) == 7


@pytest.mark.usefixtures("cpu_width")
@pytest.mark.parametrize("top_k", [None, 5])
def test_screened_draw_takes_nan_noise_as_torch_does(rng, top_k):
    """A NaN in the given noise makes that code's score NaN; torch's argmax takes the first NaN. A draw
    over a frame-sized range (the bfloat16 screen) must do the same: the screen's margin means nothing
    for a NaN score, so the row is drawn over the whole range. Row 0's NaN sits at its largest logit
    (kept by any top-k); row 1's at a code that top-k masks."""
    hidden, weight, lo, hi, top = _close_calls(rng)
    g = draw_gumbel((7, hi - lo), rng)
    g[0, top - lo] = float("nan")
    g[1, 7] = float("nan")
    got = constrained_sample(hidden, weight, lo, hi, 0.5, top_k, gumbel=g, backend="native")
    assert torch.equal(got, _reference_draw(hidden, weight, lo, hi, 0.5, top_k, g))
    assert int(got[0]) == top
    if top_k is None:
        assert int(got[1]) == lo + 7


@pytest.mark.usefixtures("cpu_width")
def test_screened_draw_keeps_scores_that_float32_rounds_together():
    """At a high temperature the noise dwarfs the logits, and float32 rounds two codes' scores to the same
    value (3e6 - 0.1 and 3e6 + 0.1 both give 3e6, whose ulp is 0.25): the first of them wins, although its
    logit is 0.2 lower, far more than the bfloat16 screen's bound. The screen's margin must allow for that
    rounding of the sum, or it leaves the first code out and draws the second."""
    R, first, second = 2048, 100, 900
    weight = torch.randn(R, 4, generator=torch.Generator().manual_seed(0)) * 0.05
    weight[first] = torch.tensor([-0.1, 0.0, 0.0, 0.0])
    weight[second] = torch.tensor([0.1, 0.0, 0.0, 0.0])
    hidden = torch.tensor([[1.0, 0.3, -0.2, 0.1]])
    g = torch.zeros(1, R)
    g[0, first] = g[0, second] = 3.0
    T = 1e6
    assert int(_reference_draw(hidden, weight, 0, R, T, None, g)[0]) == first
    assert int(constrained_sample(hidden, weight, 0, R, T, None, gumbel=g, backend="native")[0]) == first


@pytest.mark.usefixtures("cpu_width")
@pytest.mark.parametrize("top_k", [None, 5])
def test_screened_draw_takes_infinite_noise_as_torch_does(rng, top_k):
    """Noise of -inf everywhere makes every score -inf, and torch's argmax then takes column 0 even where
    top-k masks it; +inf noise at two codes kept by top-k gives the first of them. A screened draw
    (frame-sized range) must give the same ids, not the first code among its candidates."""
    hidden, weight, lo, hi, top = _close_calls(rng)
    g = torch.full((7, hi - lo), float("-inf"))
    g[2, 12] = g[2, 13] = float("inf")  # row 2's two top codes
    got = constrained_sample(hidden, weight, lo, hi, 1.0, top_k, gumbel=g, backend="native")
    want = _reference_draw(hidden, weight, lo, hi, 1.0, top_k, g)
    assert torch.equal(got, want), (got, want)
    assert int(got[0]) == lo and int(got[2]) == lo + 12
    assert torch.equal(got[torch.arange(7) != 2], torch.full((6,), lo))


def test_screened_tables_follow_the_weight(rng):
    """The bfloat16 tables are made again after an in-place update (as load_state_dict does)."""
    weight = torch.randn(4096, 40, generator=rng)
    hidden = torch.randn(2, 40, generator=rng)
    before = nb.range_argmax_op(hidden, weight, 0, 4096)
    with torch.no_grad():
        weight.copy_(torch.randn(4096, 40, generator=rng))
    after = nb.range_argmax_op(hidden, weight, 0, 4096)
    assert torch.equal(after, _unscreened(hidden, weight, 0, 4096)) and not torch.equal(after, before)


def test_screened_tables_and_writes_the_version_counter_misses(rng):
    """Writes the version counter does not see leave the cached tables stale, so: an inference tensor
    (no counter) is never screened and gets the float32 ids after an in-place update; a write through
    `.data` is seen once `torch.autograd.graph.increment_version` marks it, as the docstring says."""
    from torch.autograd.graph import increment_version

    V, H = 4096, 64
    with torch.inference_mode():
        weight = torch.randn(V, H, generator=rng)
        hidden = torch.randn(4, H, generator=rng)
        g = draw_gumbel((4, V), rng)
        nb.constrained_sample(hidden, weight, 0, V)
        nb.constrained_sample(hidden, weight, 0, V, 0.5, gumbel=g)
        weight.copy_(torch.randn(V, H, generator=rng))  # in place, no version counter to bump
        assert nb.screen_tables(weight, 0, V) is None
        assert torch.equal(nb.constrained_sample(hidden, weight, 0, V), _unscreened(hidden, weight, 0, V))
        assert torch.equal(nb.constrained_sample(hidden, weight, 0, V, 0.5, gumbel=g),
                           _reference_draw(hidden, weight, 0, V, 0.5, None, g))
    weight, hidden = weight.clone(), hidden.clone()  # ordinary tensors: screened
    before = nb.constrained_sample(hidden, weight, 0, V)
    assert nb.screen_tables(weight, 0, V) is not None
    weight.data.mul_(-1)
    increment_version(weight)
    after = nb.constrained_sample(hidden, weight, 0, V)
    assert torch.equal(after, _unscreened(hidden, weight, 0, V)) and not torch.equal(after, before)
    assert torch.equal(nb.constrained_sample(hidden, weight, 0, V, 0.5, gumbel=g),
                       _reference_draw(hidden, weight, 0, V, 0.5, None, g))
    assert "increment_version" in nb.screen_tables.__doc__ and "`weight.data`" in nb.screen_tables.__doc__
    # `.data` swapped for a narrower view of the same memory: same address, row stride and version, but the
    # kept [rows, 64] tables no longer fit the rows (the screen chose from the old columns).
    base = torch.randn(V, 64, generator=rng)
    base[2999, :32] = 10.0
    weight = base.clone()
    nb.constrained_sample(torch.randn(2, 64, generator=rng), weight, 0, 3000)
    keep = weight.data
    weight.data = keep[:, :32]
    hidden = torch.ones(2, 32)
    assert torch.equal(nb.constrained_sample(hidden, weight, 0, 3000), torch.tensor([2999, 2999]))


@pytest.mark.parametrize("lo,hi", [(10, 300), (10, 2990)], ids=["small", "screened"])
@pytest.mark.parametrize("backend", ["native", "auto", "torch"])
def test_gumbel_noise_on_another_device_is_refused(rng, lo, hi, backend):
    """The native draw reads the noise by address on the CPU: noise on another device (meta here; a
    CUDA tensor alike) is refused by the check every backend shares, not read."""
    hidden, weight = torch.randn(4, 32, generator=rng), torch.randn(3000, 32, generator=rng)
    g = torch.empty(4, hi - lo, device="meta")
    with pytest.raises(ValueError, match="gumbel noise is on meta but the logits are on cpu"):
        constrained_sample(hidden, weight, lo, hi, 0.8, backend=backend, gumbel=g)


def test_auto_screens_frame_sized_ranges(rng, monkeypatch):
    """`auto` sends greedy choices and draws over ranges of SCREEN_MIN_ROWS codes or more on the CPU to
    the native (screened) sampler whatever the op's order, and a bfloat16 model's over any range; smaller
    float32 ranges and other dtypes keep the order."""
    from worldvla.ops import dispatch
    from worldvla.ops import sampling

    monkeypatch.setitem(dispatch.AUTO_ORDER, ("constrained_sample", "cpu"), ("torch",))
    taken = []
    monkeypatch.setattr(nb, "_range_argmax_impl", lambda *a, f=nb._range_argmax_impl: taken.append(a[3] - a[2]) or f(*a))
    monkeypatch.setattr(nb, "_range_sample_cpu", lambda *a, f=nb._range_sample_cpu: taken.append(-(a[3] - a[2])) or f(*a))
    hidden = torch.randn(2, 40, generator=rng)
    weight = torch.randn(5000, 40, generator=rng)
    big = sampling.SCREEN_MIN_ROWS
    assert torch.equal(constrained_sample(hidden, weight, 100, 100 + big), _unscreened(hidden, weight, 100, 100 + big))
    constrained_sample(hidden, weight, 100, 100 + big - 1)
    constrained_sample(hidden, weight, 100, 100 + big - 1, temperature=1.0)
    constrained_sample(hidden.double(), weight.double(), 100, 100 + big)
    constrained_sample(hidden.double(), weight.double(), 100, 100 + big, temperature=1.0)
    assert taken == [big]
    g = draw_gumbel((2, big), rng)
    drawn = constrained_sample(hidden, weight, 100, 100 + big, temperature=1.0, gumbel=g)
    assert taken == [big, -big] and torch.equal(drawn, _reference_draw(hidden, weight, 100, 100 + big, 1.0, None, g))
    ids = constrained_sample(hidden.bfloat16(), weight.bfloat16(), 7, 7 + 256)
    constrained_sample(hidden.bfloat16(), weight.bfloat16(), 7, 7 + 256, temperature=1.0)
    assert taken == [big, -big, 256, -256]
    assert torch.equal(ids, nb.constrained_sample(hidden.bfloat16(), weight.bfloat16(), 7, 7 + 256))


def test_range_logits_cpu(rng):
    lo, hi = LAYOUT.image_id_range
    hidden = torch.randn(5, 64, generator=rng)
    weight = torch.randn(LAYOUT.vocab_size, 64, generator=rng)
    out = nb.range_logits_op(hidden, weight, lo, hi)
    ref = hidden.double() @ weight[lo:hi].double().t()
    same = hidden @ weight[lo:hi].t()
    err, base = (out.double() - ref).abs().max().item(), (same.double() - ref).abs().max().item()
    assert out.shape == (5, hi - lo) and out.dtype == torch.float32
    assert err <= 2 * base + 1e-6, (err, base)


@pytest.mark.usefixtures("cpu_width")
@pytest.mark.parametrize("N,H", [(1, 13), (7, 260)])
def test_bf16_weight_read_as_it_is_cpu(rng, monkeypatch, N, H):
    """A bfloat16 lm_head is streamed as it is on the CPU, each value widened exactly: bitwise the logits
    and ids of the same call on float32 copies (an odd range at an odd row, hidden sizes off the
    kernel's vector steps)."""
    lo, hi = 5, 5 + 301
    hidden = torch.randn(N, H, generator=rng).bfloat16()
    weight = torch.randn(400, H, generator=rng).bfloat16()
    converted, as_float32 = [], nb._as_float32
    monkeypatch.setattr(nb, "_as_float32", lambda *ts: converted.extend(ts) or as_float32(*ts))
    logits = nb.range_logits_op(hidden, weight, lo, hi)
    assert converted and all(t is hidden for t in converted)  # the hidden states only, never the weight's rows
    assert torch.equal(logits, nb.range_logits_op(hidden.float(), weight.float(), lo, hi))
    ids = nb.range_argmax_op(hidden, weight, lo, hi)
    assert torch.equal(ids, nb.range_argmax_op(hidden.float(), weight.float(), lo, hi))
    assert torch.equal(ids, logits.argmax(-1) + lo)
    assert N == 1 or len(set(ids.tolist())) > 1


@pytest.mark.usefixtures("cpu_width")
@pytest.mark.parametrize("N,H", [(1, 13), (4, 96), (7, 260), (9, 8)])
def test_range_logits_odd_shapes_cpu(rng, N, H):
    """Rows left over from the kernel's 4-row blocks, hidden sizes off its 8-float steps, an odd
    range starting at an odd row (vocabulary rows left over from its 2-row blocks)."""
    lo, hi = 3, 3 + 131
    hidden = torch.randn(N, H, generator=rng)
    weight = torch.randn(200, H, generator=rng)
    out = nb.range_logits_op(hidden, weight, lo, hi)
    ref = hidden.double() @ weight[lo:hi].double().t()
    same = hidden @ weight[lo:hi].t()
    err, base = (out.double() - ref).abs().max().item(), (same.double() - ref).abs().max().item()
    assert out.shape == (N, hi - lo)
    assert err <= 2 * base + 1e-6, (err, base)
    ids = nb.range_argmax_op(hidden, weight, lo, hi)
    assert_greedy(ids, hidden, weight, lo, hi, constrained_sample_ref(hidden, weight, lo, hi), f"N={N} H={H}")


def test_top_k_sampling_cpu(rng):
    lo, hi = LAYOUT.bin_range
    hidden = torch.randn(4, 48, generator=rng)
    weight = torch.randn(LAYOUT.vocab_size, 48, generator=rng)
    logits = hidden @ weight[lo:hi].t()
    top = torch.topk(logits, 5, dim=-1).indices + lo
    g = torch.Generator().manual_seed(7)
    for _ in range(5):
        ids = constrained_sample(hidden, weight, lo, hi, temperature=0.8, top_k=5, generator=g, backend="native")
        assert bool((ids.view(-1, 1) == top).any(1).all())
    ids1 = constrained_sample(hidden, weight, lo, hi, temperature=1.0, top_k=1, generator=g, backend="native")
    assert torch.equal(ids1, logits.argmax(-1) + lo)


def test_sampling_bad_arguments(rng):
    hidden, weight = torch.randn(2, 8, generator=rng), torch.randn(20, 8, generator=rng)
    with pytest.raises(ValueError, match="vocabulary range"):
        nb.range_argmax_op(hidden, weight, 5, 5)
    with pytest.raises(ValueError, match="vocabulary range"):
        nb.range_argmax_op(hidden, weight, 0, 21)
    with pytest.raises(ValueError, match=r"hidden \[N, H\]"):
        nb.range_argmax_op(hidden[:, :4], weight, 0, 4)
    with pytest.raises(TypeError, match="share one dtype"):
        nb.range_argmax_op(hidden.bfloat16(), weight, 0, 4)
    with pytest.raises(ValueError, match="contiguous last dimension"):
        nb.range_logits_op(torch.randn(8, 2, generator=rng).t(), weight, 0, 4)


def test_auto_chooses_the_same_ids_with_and_without_grad_mode(rng):
    """Sampled ids carry no gradient, so a head whose weight requires one (a model in training mode, sampled
    outside no_grad) must get the choice it gets under no_grad: `auto` took torch's bfloat16-rounded logits
    there and the native float32 sums here, and some rows' ids differed."""
    hidden = torch.randn(4096, 64, generator=rng).bfloat16()
    weight = torch.randn(300, 64, generator=rng).bfloat16().requires_grad_()
    with torch.no_grad():
        plain = constrained_sample(hidden, weight, 10, 266)
    assert torch.equal(constrained_sample(hidden, weight, 10, 266), plain)
    assert torch.equal(constrained_sample(hidden, weight, 10, 266, backend="native"), plain)


@pytest.mark.parametrize("backend", ["auto", "torch", "native"])
def test_entry_points_name_the_input_of_a_wrong_dtype(rng, backend):
    """torch's own message ("expected m1 and m2 to have the same dtype") names neither the op nor the input."""
    from worldvla.ops import linear, vq_quantize

    hidden, weight = torch.randn(2, 8, generator=rng), torch.randn(20, 8, generator=rng)
    with pytest.raises(TypeError, match="constrained_sample: weight is torch.bfloat16 but hidden is torch.float32"):
        constrained_sample(hidden, weight.bfloat16(), 0, 4, backend=backend)
    with pytest.raises(TypeError, match="constrained_sample: hidden must be a floating-point tensor"):
        constrained_sample(hidden.long(), weight, 0, 4, backend=backend)
    with pytest.raises(TypeError, match="linear: weight is torch.bfloat16 but x is torch.float32"):
        linear(hidden, weight.bfloat16(), backend=backend)
    with pytest.raises(TypeError, match="vq_quantize: z must be a floating-point tensor"):
        vq_quantize(hidden.long(), weight, backend=backend)
    with pytest.raises(ValueError, match="the codebook holds no code"):
        vq_quantize(hidden, weight[:0], backend=backend)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts mixed inputs to one dtype: allowed
        assert linear(hidden, weight.bfloat16(), backend="torch").shape == (2, 20)


def test_range_argmax_under_torch_compile_cpu(rng):
    torch._dynamo.reset()
    hidden, weight = torch.randn(3, 16, generator=rng), torch.randn(40, 16, generator=rng)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def pick(h, w):
        return nb.range_argmax_op(h * 0.5, w, 10, 30)

    assert torch.equal(pick(hidden, weight), (hidden @ weight[10:30].t()).argmax(-1) + 10)


# --------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("N", [1, 7])
def test_greedy_cuda(rng, dtype, N):
    V, H = 9000, 4096
    hidden = torch.randn(N, H, generator=rng).to("cuda", dtype)
    weight = (torch.randn(V, H, generator=rng) * 0.02).to("cuda", dtype)
    for lo, hi in ((4, 8196), (100, 356), (8999, 9000)):
        ids = nb.range_argmax_op(hidden, weight, lo, hi)
        assert_greedy(ids, hidden, weight, lo, hi, constrained_sample_ref(hidden, weight, lo, hi), f"cuda {dtype}")


@pytest.mark.gpu
def test_range_logits_cuda(rng):
    hidden = torch.randn(5, 4096, generator=rng).to("cuda", torch.bfloat16)
    weight = (torch.randn(1000, 4096, generator=rng) * 0.02).to("cuda", torch.bfloat16)
    out = nb.range_logits_op(hidden, weight, 100, 713)
    ref = hidden.double() @ weight[100:713].double().t()
    same = (hidden @ weight[100:713].t()).float()
    err, base = (out.double() - ref).abs().max().item(), (same.double() - ref).abs().max().item()
    assert err <= 2 * base, (err, base)


@pytest.mark.gpu
def test_greedy_cuda_graph(rng):
    hidden = torch.randn(2, 1024, generator=rng).to("cuda", torch.bfloat16)
    weight = torch.randn(600, 1024, generator=rng).to("cuda", torch.bfloat16)
    nb.range_argmax_op(hidden, weight, 10, 500)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ids = nb.range_argmax_op(hidden, weight, 10, 500)
    for _ in range(3):
        hidden.copy_(torch.randn(2, 1024, generator=rng).to("cuda", torch.bfloat16))
        graph.replay()
        assert_greedy(ids, hidden, weight, 10, 500, constrained_sample_ref(hidden, weight, 10, 500), "graph")


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_native_op_on_another_device_keeps_the_current_one(rng):
    """The extension makes the tensors' device current for a call; torch's current device (the same
    driver context) must be the caller's again afterwards."""
    torch.cuda.set_device(0)
    hidden = torch.randn(3, 64, generator=rng).to("cuda:1", torch.bfloat16)
    weight = torch.randn(300, 64, generator=rng).to("cuda:1", torch.bfloat16)
    ids = nb.range_argmax_op(hidden, weight, 10, 290)
    assert torch.cuda.current_device() == 0
    assert ids.device == torch.device("cuda:1")
    assert_greedy(ids, hidden, weight, 10, 290, constrained_sample_ref(hidden, weight, 10, 290), "cuda:1")
