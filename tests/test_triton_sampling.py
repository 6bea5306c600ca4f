"""Triton constrained decoding: range logits, greedy argmax, temperature / top-k sampling."""
import pytest
import torch

triton = pytest.importorskip("triton")

from worldvla import VocabLayout  # noqa: E402
from worldvla.ops import constrained_sample, constrained_sample_ref  # noqa: E402

from worldvla.kernels import sampling as K  # noqa: E402

from test_native_sampling import nan_of  # noqa: E402  (NaNs of chosen bits)

DEV = "cuda" if torch.cuda.is_available() else "cpu"
LAYOUT = VocabLayout.compact()


def head(g, n, hidden, dtype):
    h = torch.randn(n, hidden, generator=g)
    w = torch.randn(LAYOUT.vocab_size, hidden, generator=g) * 0.3
    return h.to(DEV, dtype), w.to(DEV, dtype)


def logits64(h, w, lo, hi):
    return h.double() @ w[lo:hi].double().t()


RANGES = {"bins": LAYOUT.bin_range, "image": LAYOUT.image_id_range, "one": (LAYOUT.eoa, LAYOUT.eoa + 1),
          "odd": (37, 300)}


@pytest.mark.parametrize("name", list(RANGES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy(rng, name, dtype, poison_empty):
    lo, hi = RANGES[name]
    h, w = head(rng, 7, 96, dtype)
    got = constrained_sample(h, w, lo, hi, backend="triton")
    assert got.dtype == torch.int64 and bool(((got >= lo) & (got < hi)).all())
    l64 = logits64(h, w, lo, hi)
    # The chosen logit is the maximum up to twice the torch reference's own shortfall (+ fp32 rounding).
    gap = lambda ids: (l64.max(1).values - l64.gather(1, (ids - lo).view(-1, 1)).squeeze(1)).max().item()
    floor = 8 * torch.finfo(torch.float32).eps * l64.abs().max().item()
    assert gap(got) <= 2 * gap(constrained_sample_ref(h, w, lo, hi)) + floor
    if dtype == torch.float32:
        assert torch.equal(got, l64.argmax(1) + lo)


def test_greedy_single_row_ties(rng):
    h, w = head(rng, 1, 64, torch.float32)
    lo, hi = LAYOUT.bin_range
    w[lo + 70] *= 3.0  # clearly the best row for h below
    w[lo + 200] = w[lo + 70]  # an exact tie across logit tiles: the lower id wins, as torch.argmax
    h = w[lo + 70:lo + 71] * 10.0
    assert K.constrained_sample(h, w, lo, hi).item() == lo + 70


def test_greedy_stays_inside_the_range_and_reads_rows_at_their_stride(rng):
    """Decoding's hidden states are the last position of [N, L, H] (rows L * H apart) and the head may be a
    column slice of a wider buffer: each row is read at its own stride. The ids just outside an odd range
    (263 ids: a partial last logit tile) have the largest logits of all and must never be chosen."""
    lo, hi = 37, 300
    states = torch.randn(5, 3, 48, generator=rng)
    hidden = states[:, -1]
    w_buf = torch.randn(400, 56, generator=rng) * 0.3
    weight = w_buf[:, 4:52]
    assert hidden.stride() == (144, 1) and weight.stride() == (56, 1)
    weight[lo - 1] = hidden[0] * 5.0
    weight[hi] = hidden[1] * 5.0
    hidden, weight = hidden.to(DEV), weight.to(DEV)
    l64 = logits64(hidden, weight, lo, hi)
    full = hidden.double() @ weight.double().t()
    assert full[0].argmax().item() == lo - 1 and full[1].argmax().item() == hi  # the bait outside the range
    hidden_t = hidden.t().contiguous().t()  # the same values, channels not contiguous
    assert hidden_t.stride() == (1, 5)
    for h in (hidden, hidden_t):
        got = K.constrained_sample(h, weight, lo, hi)
        assert torch.equal(got, l64.argmax(1) + lo)
        logits = K.range_logits(h, weight, lo, hi)
        assert logits.shape == (5, hi - lo)
        assert (logits.double() - l64).abs().max().item() < 1e-4


def test_greedy_exact_ties_inside_one_logit_tile_go_to_the_lowest_id():
    """Integer-valued hidden states and head rows (exact fp32 logits): among equal maxima in one logit tile,
    and in another tile after them, the lowest id wins, as torch.argmax."""
    g = torch.Generator().manual_seed(3)
    hidden = torch.randint(-3, 4, (4, 32), generator=g).float()
    weight = torch.randint(-3, 4, (300, 32), generator=g).float()
    lo, hi = 20, 300
    for r in range(4):
        best = hidden[r] * 2.0
        for v in (lo + 9 + r, lo + 50 + r, lo + 100 + r, lo + 200 + r):  # one tile (or two), then a later one
            weight[v] = best
    hidden, weight = hidden.to(DEV), weight.to(DEV)
    logits = hidden @ weight[lo:hi].t()
    assert torch.equal(logits.argmax(1) + lo, torch.arange(4, device=DEV) + lo + 9)
    assert K.constrained_sample(hidden, weight, lo, hi).tolist() == [lo + 9 + r for r in range(4)]
    assert constrained_sample(hidden, weight, lo, hi, backend="triton").tolist() == [lo + 9 + r for r in range(4)]


def test_backend_draws_keep_top_k_and_the_given_noise(rng):
    """The Triton backend's draw (the op's logits, then torch's sampler): top-k is applied at any temperature
    (a hot draw from all 190 ids leaves the top 3 almost surely), and given Gumbel noise gives the
    reference's ids for that noise."""
    h, w = head(rng, 32, 24, torch.float32)
    lo, hi = 40, 230
    l64 = logits64(h, w, lo, hi)
    top3 = l64.topk(3, dim=1).indices + lo
    gen = torch.Generator(device=DEV).manual_seed(7)
    got = constrained_sample(h, w, lo, hi, temperature=5.0, top_k=3, generator=gen, backend="triton")
    assert bool((got.view(-1, 1) == top3).any(1).all())
    gumbel = -torch.log(-torch.log(torch.rand(32, hi - lo, generator=rng).clamp(1e-6, 1 - 1e-6))).to(DEV)
    for top_k in (None, 5):
        want = constrained_sample_ref(h, w, lo, hi, temperature=0.9, top_k=top_k, gumbel=gumbel)
        for fn in (lambda **kw: constrained_sample(h, w, lo, hi, backend="triton", **kw),
                   lambda **kw: K.constrained_sample(h, w, lo, hi, **kw)):
            assert torch.equal(fn(temperature=0.9, top_k=top_k, gumbel=gumbel), want), top_k


@pytest.mark.filterwarnings("ignore:invalid value encountered in matmul:RuntimeWarning")  # the interpreter's numpy
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_takes_the_first_nan(rng, dtype):
    """A NaN logit is above every number, +inf included, and the first NaN wins, as in torch.argmax,
    whatever its sign and payload and in whichever logit tile. The tile maximum had skipped NaN (tl.max),
    and a range holding only NaNs gave an id outside it."""
    hidden = torch.randn(3, 32, generator=rng)
    hidden[:, 0] = hidden[:, 0].abs() + 0.5
    weight = torch.randn(600, 32, generator=rng) * 0.1
    weight[[10, 200]] = 0.0
    weight[[10, 200], 0] = float("inf")  # +inf logits
    hidden, weight = hidden.to(dtype), weight.to(dtype)
    for v, bits in ((150, 0xFFC00000), (170, 0x7FFFFFFF), (300, 0xFFFFFFFF), (420, 0x7FC00000)):
        weight[v, 3] = nan_of(bits, dtype)[0]
    hidden, weight = hidden.to(DEV), weight.to(DEV)
    logits = hidden.float() @ weight.float().t()
    cases = {(0, 600): 150,  # +inf in an earlier tile
             (151, 600): 170,  # the first NaN, +inf and other NaNs after it
             (171, 600): 300,  # +inf first, the NaN in a later tile
             (190, 310): 300,  # +inf first, the NaN in the same tile (the interpreter's 128 columns)
             (150, 151): 150,  # a range of one NaN
             (301, 600): 420,
             (0, 150): 10}  # +inf, no NaN
    for (lo, hi), want in cases.items():
        got = K.constrained_sample(hidden, weight, lo, hi)
        assert got.tolist() == [want] * 3, (lo, hi, got)
        assert torch.equal(got, logits[:, lo:hi].argmax(1) + lo)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_range_logits_rule(rng, dtype, poison_empty):
    h, w = head(rng, 19, 200, dtype)
    lo, hi = 5, 1000
    got = K.range_logits(h, w, lo, hi)
    ref = logits64(h, w, lo, hi)
    same = (h @ w[lo:hi].t()).float()  # what the reference computes
    err = (got.double() - ref).abs().max().item()
    base = (same.double() - ref).abs().max().item()
    assert got.shape == (19, hi - lo) and got.dtype == torch.float32
    assert err <= 2 * base + 1e-6, (err, base)  # fp32 floor: both errors are ~5e-6 here


def test_top_k_and_temperature(rng, poison_empty):
    h, w = head(rng, 40, 64, torch.float32)
    lo, hi = LAYOUT.bin_range
    l64 = logits64(h, w, lo, hi)
    top5 = l64.topk(5, dim=1).indices + lo
    got = K.constrained_sample(h, w, lo, hi, temperature=0.7, top_k=5)
    assert bool((got.view(-1, 1) == top5).any(1).all())
    # top-1 sampling is greedy
    assert torch.equal(K.constrained_sample(h, w, lo, hi, temperature=1.3, top_k=1), l64.argmax(1) + lo)


def test_sampling_distribution(rng):
    """512 copies of one row over a 16-token range: empirical frequencies follow softmax(logits / T)."""
    _, w = head(rng, 1, 32, torch.float32)
    h = (torch.randn(1, 32, generator=rng) * 0.5).to(DEV).expand(512, 32)
    lo, hi = 100, 116
    gen = torch.Generator(device=DEV).manual_seed(1234)
    got = K.constrained_sample(h, w, lo, hi, temperature=0.8, generator=gen)
    probs = torch.softmax(logits64(h[:1], w, lo, hi)[0] / 0.8, 0)
    freq = torch.bincount(got - lo, minlength=16).double() / 512
    assert (freq - probs).abs().max().item() < 0.08
    # the same generator state gives the reference's draws
    gen1 = torch.Generator(device=DEV).manual_seed(99)
    gen2 = torch.Generator(device=DEV).manual_seed(99)
    a = K.constrained_sample(h[:64], w, lo, hi, temperature=0.8, generator=gen1)
    b = constrained_sample_ref(h[:64], w, lo, hi, temperature=0.8, generator=gen2)
    assert (a == b).float().mean().item() > 0.95


def test_rows_beyond_the_grid_go_to_another_backend():
    """Row tiles of 16 are the kernel's grid y axis, at most 65535 programs: more rows are declined with
    the reason (so "auto" takes another backend), and the kernel refuses them. Expanded (zero-stride) rows."""
    from worldvla.ops import dispatch
    from worldvla.ops import triton_backend as tb

    w = torch.zeros(8, 16, device=DEV)
    row = torch.zeros(1, 16, device=DEV)
    assert tb._sample_supports(row.expand(65535 * 16, 16), w, 0, 8) is True
    too_many = row.expand(65535 * 16 + 1, 16)
    why = tb._sample_supports(too_many, w, 0, 8)
    assert not why and "row tiles = 65536 > 65535" in why.reason, why
    with pytest.raises(ValueError, match="'triton' backend of 'constrained_sample' does not support.*65535"):
        dispatch.resolve("constrained_sample", "triton", DEV, too_many, w, 0, 8)
    with pytest.raises(ValueError, match="row tiles = 65536 > 65535"):
        K.constrained_sample(too_many, w, 0, 8)


def test_bad_inputs(rng):
    h, w = head(rng, 2, 32, torch.float32)
    with pytest.raises(ValueError, match="vocabulary range"):
        K.constrained_sample(h, w, 10, 10)
    with pytest.raises(TypeError, match="share a dtype"):
        K.constrained_sample(h.half(), w, 0, 10)
    for fn in (K.constrained_sample, constrained_sample_ref):
        with pytest.raises(ValueError, match="top_k must be an integer >= 1"):
            fn(h, w, 0, 10, temperature=1.0, top_k=0)


@pytest.mark.gpu
def test_gpu_chameleon_head():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(10, 4096, generator=g).cuda().bfloat16()
    w = (torch.randn(65536, 4096, generator=g) * 0.02).cuda().bfloat16()
    for lo, hi in ((10006, 10262), (4, 8196)):
        got = K.constrained_sample(h, w, lo, hi)
        l64 = logits64(h, w, lo, hi)
        ref = constrained_sample_ref(h, w, lo, hi)
        gap = lambda ids: (l64.max(1).values - l64.gather(1, (ids - lo).view(-1, 1)).squeeze(1)).max().item()
        assert gap(got) <= 2 * gap(ref) + 1e-4


def test_greedy_near_ties_inside_one_logit_tile_go_to_the_larger_logit():
    """Logits one fp32 step apart in one logit tile (exact: one-hot hidden states pick a head column): the
    larger wins even at a higher id, as torch.argmax; only exactly equal logits go to the lowest id."""
    lo, hi = 20, 300
    hidden = torch.eye(3, 16)
    weight = torch.zeros(400, 16)
    for r, top in enumerate((1.0, 4.0, 100.0)):
        weight[lo + 5, r] = top
        weight[lo + 60, r] = torch.nextafter(torch.tensor(top), torch.tensor(2 * top)).item()
    hidden, weight = hidden.to(DEV), weight.to(DEV)
    want = (hidden @ weight[lo:hi].t()).argmax(1) + lo
    assert want.tolist() == [lo + 60] * 3
    assert K.constrained_sample(hidden, weight, lo, hi).tolist() == [lo + 60] * 3


@pytest.mark.filterwarnings("ignore:invalid value encountered in matmul:RuntimeWarning")  # the interpreter's numpy
def test_greedy_with_an_infinite_hidden_state_stays_inside_the_range(rng):
    """A hidden state holding inf (an overflowed activation) makes every logit of the range +-inf, and the
    padding columns of a partial last logit tile (a range of 263 ids, or of 7) 0 x inf = NaN, which are no ids:
    the greedy pick is torch.argmax's over the range (its first +inf), never an id at or past its end."""
    lo, hi = 37, 300
    hidden = torch.randn(3, 48, generator=rng)
    hidden[:, 5] = float("inf")
    weight = torch.randn(400, 48, generator=rng) * 0.3
    weight[lo:hi, 5] = -weight[lo:hi, 5].abs() - 0.1  # every logit -inf but the two below
    weight[[lo + 3, lo + 260], 5] = 0.5  # +inf logits: one in the first tile, one in the partial last tile
    hidden, weight = hidden.to(DEV), weight.to(DEV)
    logits = hidden @ weight[lo:hi].t()
    assert not torch.isnan(logits).any()
    for a, b in ((lo, hi), (lo + 256, hi)):
        want = (hidden @ weight[a:b].t()).argmax(1) + a
        got = K.constrained_sample(hidden, weight, a, b)
        assert bool(((got >= a) & (got < b)).all()), (a, b, got)
        assert torch.equal(got, want), (a, b)


def test_range_starting_below_zero_is_refused(rng):
    """A range [lo, hi) with lo < 0 is refused naming the range: the kernel would read head rows before the
    weight's first row."""
    h, w = head(rng, 2, 32, torch.float32)
    for fn in (K.constrained_sample, K.range_logits):
        with pytest.raises(ValueError, match=r"vocabulary range \[-1, 10\) is empty or outside \[0, "):
            fn(h, w, -1, 10)


def test_greedy_and_logits_take_a_head_stored_channel_first(rng):
    """A head stored channel-first ([H, V] storage seen as [V, H], channels not contiguous): the kernel reads
    channels one apart, so the head is made contiguous first; ids and logits are those of a contiguous copy."""
    lo, hi = 37, 300
    hidden = torch.randn(5, 48, generator=rng)
    weight = (torch.randn(400, 48, generator=rng) * 0.3).t().contiguous().t()
    assert weight.stride() == (1, 400)
    hidden, weight = hidden.to(DEV), weight.to(DEV)
    l64 = logits64(hidden, weight, lo, hi)
    assert torch.equal(K.constrained_sample(hidden, weight, lo, hi), l64.argmax(1) + lo)
    assert (K.range_logits(hidden, weight, lo, hi).double() - l64).abs().max().item() < 1e-4


def test_range_of_2_to_the_30_less_127_ids_is_refused_and_one_less_launches(monkeypatch):
    """The greedy pick offsets column indices by 2**30 within int32: a range of 2**30 - 127 ids is refused
    before launching, one of 2**30 - 128 ids reaches the launch (a stand-in kernel records it). Expanded rows."""

    class Launched(Exception):
        pass

    class StandIn:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                raise Launched(grid)
            return launch

    monkeypatch.setattr(K, "_range_logits_kernel", StandIn())
    w = torch.zeros(1, 16, device=DEV).expand(2**30, 16)
    h = torch.zeros(1, 16, device=DEV)
    with pytest.raises(ValueError, match=f"a vocabulary range of {2**30 - 127} ids is too large"):
        K.constrained_sample(h, w, 0, 2**30 - 127)
    with pytest.raises(ValueError, match=f"a vocabulary range of {2**30 - 127} ids is too large"):
        K.range_logits(h, w, 1, 2**30 - 126)
    with pytest.raises(Launched):
        K.constrained_sample(h, w, 0, 2**30 - 128)


@pytest.mark.filterwarnings("ignore:invalid value encountered in matmul:RuntimeWarning")  # padding rows: 0 x inf
def test_greedy_prefers_inf_in_a_later_logit_tile_to_the_largest_finite_logit():
    """The tiles' maxima are compared as they are: the largest finite fp32 logit in the first logit tile loses
    to a +inf logit in a later tile, as torch.argmax over the range (exact: one-hot hidden states)."""
    lo, hi = 20, 300
    hidden = torch.eye(1, 16)
    weight = torch.zeros(400, 16)
    weight[lo + 5, 0] = torch.finfo(torch.float32).max
    weight[lo + 200, 0] = float("inf")
    hidden, weight = hidden.to(DEV), weight.to(DEV)
    logits = hidden @ weight[lo:hi].t()
    assert not torch.isnan(logits).any() and logits[0, 5].item() == torch.finfo(torch.float32).max
    assert (logits.argmax(1) + lo).tolist() == [lo + 200]
    assert K.constrained_sample(hidden, weight, lo, hi).tolist() == [lo + 200]
