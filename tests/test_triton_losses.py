"""Triton fused linear cross-entropy (class weights + z-loss) against a float64 reference."""
import re

import pytest
import torch

triton = pytest.importorskip("triton")

from worldvla import VocabLayout  # noqa: E402
from worldvla.ops import linear_cross_entropy, linear_cross_entropy_ref  # noqa: E402

from worldvla.kernels import linear_ce as K  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
LAYOUT = VocabLayout.compact()  # 1067 tokens: an odd vocabulary size


def image_code_weights(alpha=0.04):
    w = torch.ones(LAYOUT.vocab_size)
    w[LAYOUT.image_code_weight_mask()] = alpha
    return w


def ref64(hidden, weight, targets, class_weight, z_weight, ignore_index=-100):
    """The formula of linear_cross_entropy_ref, entirely in float64 (that reference computes in fp32)."""
    valid = targets != ignore_index
    logits = hidden.double()[valid] @ weight.double().t()
    y = targets[valid]
    lse = torch.logsumexp(logits, -1)
    ce = lse - logits.gather(1, y.unsqueeze(1)).squeeze(1)
    if class_weight is None:
        ce_mean = ce.mean()
    else:
        w = class_weight.to(torch.float32).double()[y]
        ce_mean = (w * ce).sum() / w.sum()
    z = (lse * lse).mean()
    return ce_mean + z_weight * z, z.detach()


def inputs(g, n, hidden, dtype, frac_ignored=0.4):
    h = torch.randn(n, hidden, generator=g)
    w = torch.randn(LAYOUT.vocab_size, hidden, generator=g) * 0.2
    # Targets like a mix of action and world samples: bins, image codes, specials; many ignored rows.
    pools = torch.cat([torch.arange(*LAYOUT.bin_range), torch.tensor(LAYOUT.image_code_ids),
                       torch.tensor([LAYOUT.boa, LAYOUT.eoa, LAYOUT.eoi, LAYOUT.boi, LAYOUT.sep, LAYOUT.newline])])
    y = pools[torch.randint(0, pools.numel(), (n,), generator=g)]
    y[torch.rand(n, generator=g) < frac_ignored] = -100
    return h.to(DEV, dtype), w.to(DEV, dtype), y.to(DEV)


def run(fn, h, w, y, cw, zw, grad_scale=1.0):
    # float64 leaves for the float64 reference: leaves of the inputs' dtype would round its gradients to that dtype
    dtype = torch.float64 if fn is ref64 else h.dtype
    hh, ww = (t.detach().to(dtype).clone().requires_grad_() for t in (h, w))
    loss, z = fn(hh, ww, y, cw, zw)
    (loss * grad_scale).backward()
    return loss.detach(), z, hh.grad, ww.grad


F32_EPS = torch.finfo(torch.float32).eps
FP32_FLOOR_EPS = 4  # float32 results: slack of a few float32 eps of the reference's largest magnitude


def check_rule(got, ref, same, name, floor_eps=0.0):
    """Error vs float64 at most 2x torch's at the kernel's precision, plus `floor_eps` float32 eps of the
    reference's largest magnitude (a floor tied to the result's scale: gradients here are ~1e-2)."""
    err = (got.double() - ref).abs().max().item()
    base = (same.double() - ref).abs().max().item()
    floor = floor_eps * F32_EPS * ref.abs().max().item()
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    assert err <= 2 * base + floor, f"{name}: error {err:.3g} > 2 x torch's {base:.3g} (+{floor:.2g})"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("weighted", [False, True])
def test_matches_fp64(rng, dtype, weighted, poison_empty):
    h, w, y = inputs(rng, 151, 96, dtype)
    cw = image_code_weights().to(DEV) if weighted else None
    zw = 1e-3  # larger than the release's 1e-5 so that the z-loss term is visible in the gradients
    got = run(lambda *a: K.linear_cross_entropy(*a, chunk_size=37), h, w, y, cw, zw)  # 3 chunks of labelled rows
    ref = run(ref64, h, w, y, cw, zw)
    same = run(linear_cross_entropy_ref, h, w, y, cw, zw)
    for i, name in enumerate(["loss", "z_mean", "grad_hidden", "grad_weight"]):  # loss and z are float32 always
        check_rule(got[i], ref[i], same[i], f"{name} {dtype}",
                   floor_eps=FP32_FLOOR_EPS if got[i].dtype == torch.float32 else 0.0)
    assert got[2].dtype == dtype and got[3].dtype == dtype
    # ignored rows get no gradient
    assert torch.all(got[2][y == -100] == 0)


def test_default_chunking_and_grad_scale(rng):
    h, w, y = inputs(rng, 203, 64, torch.float32, frac_ignored=0.7)
    cw = image_code_weights(0.0400390625).to(DEV)
    got, ref, same = (run(fn, h, w, y, cw, 1e-5, grad_scale=3.5)
                      for fn in (K.linear_cross_entropy, ref64, linear_cross_entropy_ref))  # the kernel's own chunks
    for i, name in ((0, "loss"), (2, "grad_hidden"), (3, "grad_weight")):
        check_rule(got[i], ref[i], same[i], name, floor_eps=FP32_FLOOR_EPS)


def fp16_inputs(g, n, vocab, w_std, weighted):
    h = torch.randn(n, 32, generator=g)
    w = torch.randn(vocab, 32, generator=g) * w_std
    y = torch.randint(0, vocab, (n,), generator=g)
    y[torch.rand(n, generator=g) < 0.2] = -100
    cw = (torch.rand(vocab, generator=g) + 0.5).to(DEV) if weighted else None
    return h.to(DEV, torch.float16), w.to(DEV, torch.float16), y.to(DEV), cw


@pytest.mark.parametrize("n, vocab, w_std, scale, weighted", [(151, 1067, 0.05, 65536.0, True),
                                                              (151, 1067, 0.2, 1 / 3, True),
                                                              (2048, 4096, 0.05, 32768.0, False)])
def test_fp16_loss_scale(rng, n, vocab, w_std, scale, weighted):
    """fp16 training multiplies the loss by GradScaler's scale (65536 at first) so that small gradients stay
    representable: the backward must scale the gradients before rounding them to fp16, as torch's autograd
    does. They were formed and rounded for d loss = 1 in the forward and multiplied in fp16 after: 65536
    itself overflows fp16 (inf/NaN gradients), any other scale but a power of two rounded them twice, and
    with many rows the d loss = 1 dlogits were fp16 subnormals (2048 rows: 9.7x torch's grad_hidden error)."""
    h, w, y, cw = fp16_inputs(rng, n, vocab, w_std, weighted)
    ref = run(ref64, h, w, y, cw, 1e-5, grad_scale=scale)
    same = run(linear_cross_entropy_ref, h, w, y, cw, 1e-5, grad_scale=scale)
    for fn, how in ((lambda *a: linear_cross_entropy(*a, backend="triton"), "ops"),
                    (lambda *a: K.linear_cross_entropy(*a, chunk_size=max(1, n // 3)), "kernels")):
        got = run(fn, h, w, y, cw, 1e-5, grad_scale=scale)
        for i, name in ((2, "grad_hidden"), (3, "grad_weight")):
            assert got[i].dtype == torch.float16
            check_rule(got[i], ref[i], same[i], f"{how} {name} x {scale:g}")


def test_fp16_grad_weight_sums_do_not_overflow(rng):
    """fp16 dlogits are formed at a scale that brings the largest row weight near 1 (~n times their value):
    where many rows share a target and their hidden states point one way, grad_weight's product of a chunk,
    a sum over its rows, would pass fp16's 65504 at that scale (here ~500 x 200); it is taken at a smaller one."""
    n = 512
    h = (200.0 + torch.rand(n, 32, generator=rng)).to(DEV, torch.float16)
    w = (torch.randn(64, 32, generator=rng) * 1e-3).to(DEV, torch.float16)
    y = torch.full((n,), 3, device=DEV)
    ref = run(ref64, h, w, y, None, 1e-5)
    same = run(linear_cross_entropy_ref, h, w, y, None, 1e-5)
    got = run(lambda *a: K.linear_cross_entropy(*a), h, w, y, None, 1e-5)
    assert ref[3].abs().max() > 100  # the target's row of grad_weight, at d loss = 1
    for i, name in ((2, "grad_hidden"), (3, "grad_weight")):
        check_rule(got[i], ref[i], same[i], name)


def test_every_backend_checks_class_weight_shape(rng):
    """A class_weight that is not [V] is refused at the entry point on every backend, with the Triton
    backend's message (the torch backend broadcast a [V, 1] one into a wrong loss and took a short one)."""
    from worldvla.ops import dispatch

    h, w = torch.randn(6, 8, generator=rng).to(DEV), torch.randn(10, 8, generator=rng).to(DEV)
    y = torch.tensor([1, 2, 3, 4, 0, 2], device=DEV)
    cw = torch.rand(10, generator=rng).to(DEV)
    for backend in ("auto", *dispatch.available("linear_cross_entropy")):
        for bad in (cw[:, None], cw[:5], cw[:1].reshape(())):
            with pytest.raises(ValueError, match=rf"class_weight must be \[V=10\], got {re.escape(str(tuple(bad.shape)))}"):
                linear_cross_entropy(h, w, y, bad, backend=backend)
        loss, _ = linear_cross_entropy(h, w, y, cw, backend=backend)
        assert abs(loss.item() - ref64(h, w, y, cw, 1e-5)[0].item()) < 1e-5


def test_dispatch_and_partial_grads(rng):
    h, w, y = inputs(rng, 64, 32, torch.float32)
    loss, z = linear_cross_entropy(h, w, y, None, 1e-4, backend="triton")
    lr, zr = ref64(h, w, y, None, 1e-4)
    assert abs(loss.item() - lr.item()) < 1e-5 and abs(z.item() - zr.item()) < 1e-3 and not z.requires_grad
    # frozen hidden states (only the head trains) and the converse
    def grad_of(fn, of_weight):
        x = (w if of_weight else h).detach().to(torch.float64 if fn is ref64 else h.dtype).requires_grad_()
        fn(*((h, x) if of_weight else (x, w)), y, None, 1e-4)[0].backward()
        return x.grad

    for of_weight, name in ((True, "grad_weight alone"), (False, "grad_hidden alone")):
        got, ref, same = (grad_of(fn, of_weight) for fn in (K.linear_cross_entropy, ref64, linear_cross_entropy_ref))
        check_rule(got, ref, same, name, floor_eps=FP32_FLOOR_EPS)


@pytest.mark.parametrize("rows", [9, 0])
def test_no_labelled_rows(rng, rows):
    """A micro-batch without a label (every target ignored, or no row: the trainer's rows of labels only)
    gives loss 0 and zero gradients for both inputs on every path: a zero tensor, not None, for the
    weight, as a rank with an empty micro-batch must still join FSDP's gradient reduction."""
    h, w, _ = inputs(rng, 9, 32, torch.float32)
    h = h[:rows]
    y = torch.full((rows,), -100, device=DEV)
    for fn in (K.linear_cross_entropy, linear_cross_entropy_ref):
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        loss, z = fn(hh, ww, y)
        assert loss.item() == 0.0 and z.item() == 0.0
        loss.backward()
        assert hh.grad is None or torch.all(hh.grad == 0)
        assert ww.grad is not None and ww.grad.shape == w.shape and torch.all(ww.grad == 0), fn


@pytest.mark.parametrize("ignore", [-1, "pad"])
def test_ignore_index_other_than_the_default(rng, ignore):
    """Labels marked by another ignore_index: -1, or a pad token's class id (a class otherwise valid). Rows with
    that target add nothing, every other row counts, on the kernel's entry and the Triton backend alike; and
    with ignore_index=-1 a target of -100 is out of range, not ignored."""
    h, w, y = inputs(rng, 61, 32, torch.float32)
    pad = LAYOUT.vocab_size - 1
    assert not bool((y == pad).any())
    index = -1 if ignore == -1 else pad
    y2 = torch.where(y == -100, torch.full_like(y, index), y)
    cw = image_code_weights().to(DEV)
    ref = run(lambda *a: ref64(*a, ignore_index=index), h, w, y2, cw, 1e-3)
    same = run(lambda *a: linear_cross_entropy_ref(*a, ignore_index=index), h, w, y2, cw, 1e-3)
    for how, fn in (("kernels", lambda *a: K.linear_cross_entropy(*a, ignore_index=index, chunk_size=23)),
                    ("ops", lambda *a: linear_cross_entropy(*a, ignore_index=index, backend="triton"))):
        got = run(fn, h, w, y2, cw, 1e-3)
        for i, name in enumerate(["loss", "z_mean", "grad_hidden", "grad_weight"]):
            check_rule(got[i], ref[i], same[i], f"{how} {name}", floor_eps=FP32_FLOOR_EPS)
        assert torch.all(got[2][y2 == index] == 0)
    # the same labelled rows under the default -100: the same loss
    default = K.linear_cross_entropy(h, w, y, cw, 1e-3)[0]
    torch.testing.assert_close(K.linear_cross_entropy(h, w, y2, cw, 1e-3, ignore_index=index)[0], default)
    if ignore == -1:
        for fn in (lambda: K.linear_cross_entropy(h, w, y, cw, ignore_index=-1),
                   lambda: linear_cross_entropy(h, w, y, cw, ignore_index=-1, backend="triton")):
            with pytest.raises(ValueError, match=r"targets must be -1 \(ignored\) or lie in"):
                fn()


def test_bad_inputs_raise(rng):
    h, w, y = inputs(rng, 16, 32, torch.float32)
    bad = y.clone()
    bad[0] = LAYOUT.vocab_size
    with pytest.raises(ValueError, match="targets must be"):
        K.linear_cross_entropy(h, w, bad)
    with pytest.raises(ValueError, match="class_weight"):
        K.linear_cross_entropy(h, w, y, torch.ones(7, device=DEV))
    with pytest.raises(TypeError, match="share a dtype"):
        K.linear_cross_entropy(h, w.half(), y)


@pytest.mark.parametrize("chunk_size", [0, -4])
def test_chunk_size_below_one_is_refused_by_name(rng, chunk_size):
    """A chunk of no rows cannot make progress: the kernels' entry refuses it by name (a step of 0 would
    otherwise fail inside the chunk loop without saying which argument was wrong)."""
    h, w, y = inputs(rng, 8, 16, torch.float32)
    with pytest.raises(ValueError, match=f"chunk_size must be >= 1, got {chunk_size}"):
        K.linear_cross_entropy(h, w, y, chunk_size=chunk_size)


def test_kernel_takes_targets_of_any_integer_dtype_and_refuses_an_empty_vocabulary(rng):
    """The kernels' own entry: uint8 targets are class ids (compared and clamped in their own dtype, -1 had
    become 255 and every loss NaN), and a vocabulary of 0 classes is refused by name, not by a division by 0."""
    h, w = torch.randn(9, 16, generator=rng).to(DEV), (torch.randn(50, 16, generator=rng) / 4).to(DEV)
    y = torch.randint(0, 50, (9,), generator=rng).to(DEV)
    want = K.linear_cross_entropy(h, w, y)[0]
    assert torch.equal(K.linear_cross_entropy(h, w, y.to(torch.uint8))[0], want)
    with pytest.raises(ValueError, match="vocabulary is empty"):
        K.linear_cross_entropy(h, w[:0], torch.full((9,), -100, device=DEV))


def test_short_training_run_tracks_reference(rng):
    """A few SGD steps of a tiny head with the fused loss follow the reference's loss curve."""
    h0, w0, y = inputs(rng, 96, 48, torch.float32, frac_ignored=0.3)
    cw = image_code_weights().to(DEV)
    curves = []
    for fn in (K.linear_cross_entropy, linear_cross_entropy_ref):
        h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
        opt = torch.optim.SGD([h, w], lr=2.0)
        losses = []
        for _ in range(6):
            opt.zero_grad()
            loss, _ = fn(h, w, y, cw, 1e-4)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        curves.append(losses)
    assert curves[0][-1] < curves[0][0] * 0.8
    for a, b in zip(*curves):
        assert abs(a - b) < 1e-4 * max(1.0, abs(b))


@pytest.mark.gpu
def test_gpu_large_vocab():
    g = torch.Generator().manual_seed(0)
    n, hid, vocab = 4096, 1024, 65536
    h = torch.randn(n, hid, generator=g).cuda().bfloat16()
    w = (torch.randn(vocab, hid, generator=g) * 0.05).cuda().bfloat16()
    y = torch.randint(0, vocab, (n,), generator=g).cuda()
    y[torch.rand(n, generator=g).cuda() < 0.5] = -100
    cw = torch.ones(vocab, device="cuda")
    cw[3:8195] = 0.04
    got = run(K.linear_cross_entropy, h, w, y, cw, 1e-5)
    ref = run(ref64, h, w, y, cw, 1e-5)
    same = run(linear_cross_entropy_ref, h, w, y, cw, 1e-5)
    for i, name in enumerate(["loss", "z_mean", "grad_hidden", "grad_weight"]):
        check_rule(got[i], ref[i], same[i], name)


def test_reference_keeps_float64_for_gradcheck():
    """The reference rounded float64 logits to float32, so gradcheck against it failed at any eps."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(5, 6, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(9, 6, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([1, -100, 4, 8, 0])
    cw = torch.rand(9, generator=g, dtype=torch.float64) + 0.5
    assert linear_cross_entropy_ref(h, w, y, cw)[0].dtype == torch.float64
    assert torch.autograd.gradcheck(lambda a, b: linear_cross_entropy_ref(a, b, y, cw, z_weight=0.1)[0], (h, w))


def test_unchecked_targets_out_of_int32_range_make_the_loss_nan():
    """Without the host check, a target of 2^32 + 5 was narrowed to int32 as class 5 and trained on silently;
    like any target outside [0, V) it makes the loss NaN."""
    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(4, 16, generator=g).to(DEV), torch.randn(32, 16, generator=g).to(DEV)
    for bad in (2**32 + 5, -(2**32) + 5, 32):
        y = torch.tensor([1, bad, 3, -100]).to(DEV)
        loss = K.linear_cross_entropy(h, w, y, check_targets=False)[0]
        assert torch.isnan(loss), bad
    assert torch.isfinite(K.linear_cross_entropy(h, w, torch.tensor([1, 5, 3, -100]).to(DEV), check_targets=False)[0])


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_labels_that_all_weigh_zero_give_the_z_loss_alone(backend):
    """Rows whose classes all weigh 0 made the weighted mean 0 / 0 = NaN (loss and gradients); the CE term is
    0 and the z-loss still counts, on every backend."""
    torch.manual_seed(5)
    h = torch.randn(13, 16, dtype=torch.float32, requires_grad=True)
    w = torch.randn(37, 16, dtype=torch.float32, requires_grad=True)
    y = torch.randint(10, 37, (13,))
    y[3] = -100
    cw = torch.ones(37)
    cw[10:] = 0.0
    loss, z = linear_cross_entropy(h, w, y, cw, z_weight=0.1, backend=backend)
    lse = torch.logsumexp(h.detach()[y != -100].double() @ w.detach().double().t(), dim=-1)
    torch.testing.assert_close(loss.double(), 0.1 * (lse * lse).mean(), rtol=1e-5, atol=1e-6)
    loss.backward()
    assert torch.isfinite(h.grad).all() and torch.isfinite(w.grad).all() and h.grad.abs().sum() > 0


def test_non_finite_hidden_states_of_ignored_rows_reach_nothing(rng):
    """The reference selects the labelled rows; the kernel computes every row of a chunk and must zero the
    ignored ones: an inf or NaN hidden state there (padding, a dropped position) leaves loss and grads finite."""
    h, w, y = inputs(rng, 60, 40, torch.float32)
    ignored = (y == -100).nonzero().squeeze(1)
    assert ignored.numel() >= 2
    h = h.detach().clone()
    h[ignored[0]] = float("inf")
    h[ignored[1]] = float("nan")
    got = run(lambda *a: K.linear_cross_entropy(*a, chunk_size=16), h, w, y, None, 1e-3)
    want = run(linear_cross_entropy_ref, h, w, y, None, 1e-3)
    assert all(torch.isfinite(t).all() for t in (got[0], got[3]))
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[3], want[3], rtol=1e-4, atol=1e-5)
    assert torch.all(got[2][y == -100] == 0)


def test_class_weight_that_needs_a_gradient_takes_torch(rng, monkeypatch):
    """The Triton loss differentiates only in hidden and weight, yet said yes to a class_weight that needs a
    gradient, whose .grad then stayed None where the reference's is not. It now declines those inputs (an
    explicit backend says why) and `auto` takes the reference; a class_weight without gradient still runs."""
    from worldvla.ops import dispatch

    h, w, y = inputs(rng, 12, 16, torch.float32)
    cw0 = torch.rand(LAYOUT.vocab_size, generator=rng).to(DEV) + 0.1
    cw = cw0.clone().requires_grad_()
    assert not dispatch.supports("linear_cross_entropy", "triton", h, w, y, cw)
    with torch.no_grad():
        assert dispatch.supports("linear_cross_entropy", "triton", h, w, y, cw)
    assert dispatch.supports("linear_cross_entropy", "triton", h, w, y, cw0)
    with pytest.raises(ValueError, match="class_weight needs a gradient and the Triton kernel gives none"):
        linear_cross_entropy(h, w, y, cw, backend="triton")
    monkeypatch.setitem(dispatch.AUTO_ORDER, ("linear_cross_entropy", DEV), ("triton", "torch"))
    grads = []
    for backend in ("auto", "torch"):
        cw = cw0.clone().requires_grad_()
        linear_cross_entropy(h, w, y, cw, 1e-4, backend=backend)[0].backward()
        grads.append(cw.grad)
    assert grads[0] is not None and grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1])
    with pytest.raises(ValueError, match="class_weight needs a gradient and the Triton kernel gives none"):
        K.linear_cross_entropy(h, w, y, cw0.clone().requires_grad_())  # the kernel's own entry, too


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_no_labelled_rows_with_non_finite_ignored_rows(dtype):
    """With every row ignored the reference returned (hidden.sum() + ...) * 0.0: NaN when an ignored row holds
    an inf. It is now built from empty slices (0, gradients zeros) and keeps float64 inputs in float64."""
    h = torch.randn(4, 8, dtype=dtype)
    h[1, 3] = float("inf")
    h[2, 0] = float("nan")
    w = torch.randn(10, 8, dtype=dtype)
    y = torch.full((4,), -100)
    backends = ["torch"] + (["triton"] if dtype != torch.float64 else [])
    for backend in backends:
        hh, ww = h.clone().to(DEV).requires_grad_(), w.clone().to(DEV).requires_grad_()
        loss, z = linear_cross_entropy(hh, ww, y.to(DEV), backend=backend)
        assert loss.item() == 0.0 and z.item() == 0.0, backend
        assert loss.dtype == z.dtype == (torch.float64 if dtype == torch.float64 else torch.float32), backend
        loss.backward()
        assert torch.equal(hh.grad, torch.zeros_like(hh)) and torch.equal(ww.grad, torch.zeros_like(ww)), backend


def test_fp16_hidden_size_zero():
    """fp16 with hidden size 0 (all logits 0: the loss is log V) crashed in the fp16 grad_weight scaling
    (.amax() of an empty product); it now gives the reference's loss and empty gradients."""
    h = torch.zeros(3, 0, dtype=torch.float16, device=DEV, requires_grad=True)
    w = torch.zeros(5, 0, dtype=torch.float16, device=DEV, requires_grad=True)
    y = torch.tensor([0, 1, -100], device=DEV)
    want = linear_cross_entropy(h, w, y, z_weight=0.0, backend="torch")[0]
    loss = linear_cross_entropy(h, w, y, z_weight=0.0, backend="triton")[0]
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(loss.double().cpu(), torch.tensor(5.0, dtype=torch.float64).log(), rtol=1e-6, atol=0)
    loss.backward()
    assert h.grad.shape == h.shape and w.grad.shape == w.shape


def test_logits_cross_entropy_takes_targets_of_any_integer_dtype(rng):
    """The loss from an adapter head's logits: int32 targets failed in gather, and uint8 ones indexed the class
    weights as a mask (a wrong loss, without a word)."""
    from worldvla.ops.cross_entropy import logits_cross_entropy

    logits = torch.randn(6, 50, generator=rng)
    y = torch.tensor([3, 0, 49, 7, 7, 1])
    cw = torch.rand(50, generator=rng) + 0.5
    want = logits_cross_entropy(logits, y, cw, z_weight=1e-3)
    lse = torch.logsumexp(logits, -1)
    ce = lse - logits[torch.arange(6), y]
    assert torch.allclose(want[0], (cw[y] * ce).sum() / cw[y].sum() + 1e-3 * (lse * lse).mean())
    for dtype in (torch.int32, torch.int16, torch.uint8):
        got = logits_cross_entropy(logits, y.to(dtype), cw, z_weight=1e-3)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), dtype


def test_class_weight_and_target_shapes_are_checked_on_every_entry(rng):
    """A [V, 1] class weight broadcast against the per-row losses into a wrong loss; it is refused by name
    by the logits' loss as well, and by linear_cross_entropy even when no row has a label. Targets must be [N]."""
    from worldvla.ops.cross_entropy import logits_cross_entropy

    h, w = torch.randn(4, 8, generator=rng), torch.randn(20, 8, generator=rng)
    with pytest.raises(ValueError, match=r"class_weight must be \[V=20\], got \(20, 1\)"):
        logits_cross_entropy(h @ w.t(), torch.tensor([1, 2, 3, 4]), torch.ones(20, 1))
    with pytest.raises(ValueError, match=r"class_weight must be \[V=20\], got \(19,\)"):
        linear_cross_entropy(h, w, torch.full((4,), -100), class_weight=torch.ones(19))
    with pytest.raises(ValueError, match=r"targets \[N\]; got \(4, 8\), \(20, 8\), \(4, 1\)"):
        linear_cross_entropy(h, w, torch.tensor([[1], [2], [3], [4]]))


def test_kernel_entry_refuses_a_class_weight_of_v_entries_in_two_dims(rng):
    """A [V, 1] class weight holds V entries but indexes into [N, 1] weights that broadcast against the rows:
    the kernel's own entry refuses it by name, as the ops' entry does."""
    h, w = torch.randn(4, 8, generator=rng).to(DEV), torch.randn(20, 8, generator=rng).to(DEV)
    y = torch.tensor([1, 2, -100, 4], device=DEV)
    with pytest.raises(ValueError, match=r"class_weight must be \[V=20\], got \(20, 1\)"):
        K.linear_cross_entropy(h, w, y, torch.ones(20, 1, device=DEV))


def test_fp16_grad_weight_sums_with_a_strong_z_loss_do_not_overflow(rng):
    """grad_weight's fp16 product of a chunk is taken at a scale bounding each row's dlogits by both of their
    terms, the z-loss's included: with z_weight 0.1 and one class holding nearly all the probability (lse ~ 64)
    while every target is another class, that class's dlogits are ~14x the target weight, and a bound of the
    target term alone let the product pass fp16's 65504 (inf gradients)."""
    n = 512
    h = (200.0 + torch.rand(n, 32, generator=rng)).to(DEV, torch.float16)
    w = torch.randn(64, 32, generator=rng) * 1e-3
    w[5] = 0.01  # class 5's logit ~ 64, the others ~ 1
    w = w.to(DEV, torch.float16)
    y = torch.full((n,), 3, device=DEV)
    ref = run(ref64, h, w, y, None, 0.1)
    same = run(linear_cross_entropy_ref, h, w, y, None, 0.1)
    got = run(lambda *a: K.linear_cross_entropy(*a), h, w, y, None, 0.1)
    assert ref[3].abs().max() > 1000  # class 5's row of grad_weight, at d loss = 1
    for i, name in ((2, "grad_hidden"), (3, "grad_weight")):
        check_rule(got[i], ref[i], same[i], name)


def test_unchecked_targets_out_of_range_with_class_weights_make_the_loss_nan():
    """With per-class weights the out-of-range target's weight is looked up too: a target of V (or past int32)
    reads no class weight out of bounds and, as without weights, makes the loss NaN; targets in range stay finite."""
    g = torch.Generator().manual_seed(1)
    h, w = torch.randn(4, 16, generator=g).to(DEV), torch.randn(32, 16, generator=g).to(DEV)
    cw = torch.linspace(0.5, 2.0, 32).to(DEV)
    for bad in (32, 2**32 + 5, -7):
        y = torch.tensor([1, bad, 31, -100]).to(DEV)
        assert torch.isnan(K.linear_cross_entropy(h, w, y, cw, check_targets=False)[0]), bad
    good = torch.tensor([1, 0, 31, -100]).to(DEV)
    loss = K.linear_cross_entropy(h, w, good, cw, check_targets=False)[0]
    torch.testing.assert_close(loss.double(), ref64(h, w, good, cw, 1e-5)[0], rtol=1e-5, atol=1e-6)


def test_fp16_grad_weight_of_small_hidden_states_is_not_scaled_up(rng):
    """grad_weight's fp16 product of a chunk is scaled down where it could overflow, never up: with hidden states
    of magnitude ~1e-3 the bound of the product is tiny, and scaling the dlogits up to it overflowed fp16 (inf)."""
    n = 6
    h = (torch.randn(n, 16, generator=rng) * 1e-3).to(DEV, torch.float16)
    w = (torch.randn(40, 16, generator=rng) * 0.2).to(DEV, torch.float16)
    y = torch.tensor([0, 3, 39, -100, 7, 7]).to(DEV)
    ref = run(ref64, h, w, y, None, 1e-5)
    same = run(linear_cross_entropy_ref, h, w, y, None, 1e-5)
    got = run(lambda *a: K.linear_cross_entropy(*a), h, w, y, None, 1e-5)
    for i, name in ((2, "grad_hidden"), (3, "grad_weight")):
        check_rule(got[i], ref[i], same[i], name)


def test_fp16_grad_weight_sum_scale_is_each_chunks_own(rng):
    """grad_weight's fp16 product is scaled per chunk from that chunk's own rows: a first chunk of ignored rows
    (zero weight, a bound of 0: no scaling) must not set the scale of a later chunk whose 512 labelled rows of
    hidden states ~200 sharing a target would pass fp16's 65504 unscaled (inf gradients)."""
    n = 512
    h = (200.0 + torch.rand(2 * n, 32, generator=rng)).to(DEV, torch.float16)
    w = (torch.randn(64, 32, generator=rng) * 1e-3).to(DEV, torch.float16)
    y = torch.full((2 * n,), 3, device=DEV)
    y[:n] = -100
    ref = run(ref64, h, w, y, None, 1e-5)
    same = run(linear_cross_entropy_ref, h, w, y, None, 1e-5)
    got = run(lambda *a: K.linear_cross_entropy(*a, chunk_size=n), h, w, y, None, 1e-5)
    assert ref[3].abs().max() > 100  # the target's row of grad_weight, at d loss = 1
    for i, name in ((2, "grad_hidden"), (3, "grad_weight")):
        check_rule(got[i], ref[i], same[i], name)
