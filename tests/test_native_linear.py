"""The native few-row linear (CPU): y = x W^T against a float64 reference.

Tolerance rule: the kernel's largest error against float64 may be at most 2x that of torch's
float32 `F.linear` on the same inputs (plus a few ulps of the largest output).
"""
import pytest
import torch
import torch.nn.functional as F

_C = pytest.importorskip("worldvla._C")

from worldvla import ops  # noqa: E402
from worldvla.ops import dispatch  # noqa: E402
from worldvla.ops import native_backend as nb  # noqa: E402
from worldvla.ops.projection import NATIVE_MAX_ROWS  # noqa: E402


def assert_close_to_f64(out, x, w, name=""):
    ref = x.double() @ w.double().t()
    same = F.linear(x, w).double()
    err, base = (out.double() - ref).abs().max().item(), (same - ref).abs().max().item()
    assert out.shape == same.shape and out.dtype == torch.float32, name
    assert err <= 2 * base + 4e-7 * ref.abs().max().item(), f"{name}: error {err:.3g} vs torch {base:.3g}"


@pytest.mark.usefixtures("cpu_width")
@pytest.mark.parametrize("M", [1, 2, 3, 4, 5, 6, 7, 10, 13, 17, 40, 67])
@pytest.mark.parametrize("K,N", [(256, 688), (113, 203), (7, 5), (203, 4), (16, 1)])
def test_linear_matches_f64(rng, M, K, N):
    x = torch.randn(M, K, generator=rng)
    w = torch.randn(N, K, generator=rng) / K ** 0.5
    assert_close_to_f64(nb.linear(x, w), x, w, f"M={M} K={K} N={N}")


@pytest.mark.usefixtures("cpu_width")
def test_linear_strided_rows_and_leading_dims(rng):
    """Rows of x and of the weight may be strided (a slice of a wider tensor, lm_head rows);
    x may carry leading dimensions [B, Q, K] as in a decode step."""
    wide = torch.randn(3, 5, 130, generator=rng)
    x = wide[..., 3:120]                            # [3, 5, 117], row stride 130
    big = torch.randn(70, 125, generator=rng)
    w = big[10:61, 4:121]                           # [51, 117], row stride 125
    out = nb.linear(x, w)
    assert out.shape == (3, 5, 51)
    assert_close_to_f64(out.reshape(15, 51), x.reshape(15, 117), w)
    xt = torch.randn(117, 6, generator=rng).t()     # columns contiguous: copied to rows first
    assert_close_to_f64(nb.linear(xt, w), xt, w, "transposed x")


@pytest.mark.usefixtures("cpu_width")
@pytest.mark.parametrize("M", [1, 2, 5, 6, 7, 13])
@pytest.mark.parametrize("K,N", [(256, 688), (113, 203), (7, 5), (40, 9), (16, 1)])
def test_bf16_weights_give_the_float32_bits(rng, M, K, N):
    """bfloat16 weights, widened exactly in the kernel, give bitwise the float32 kernel's result on their
    values (odd K: the vector loop's tail; odd N: the last weight rows), strided rows included."""
    x = torch.randn(M, K + 3, generator=rng)[:, 2:K + 2]
    w16 = (torch.randn(N, K + 5, generator=rng) / K ** 0.5).bfloat16()[:, 1:K + 1]
    w32 = w16.float()
    want = torch.full((M, N), float("nan"))
    got = torch.full((M, N), float("nan"))
    _C.linear(-1, x.data_ptr(), x.stride(0), w32.data_ptr(), w32.stride(0), M, K, N, want.data_ptr(), N)
    _C.linear_bf16(x.data_ptr(), x.stride(0), w16.data_ptr(), w16.stride(0), M, K, N, got.data_ptr(), N)
    assert torch.equal(got, want)
    assert_close_to_f64(got, x, w32, f"M={M} K={K} N={N}")


def test_rows_do_not_depend_on_the_row_count(rng):
    """Each output is summed in the same order whatever M is and wherever the row falls in its
    register block, so a decode step of K rows gives each row the bits it gets alone. Parallel
    action-chunk decoding relies on that for exact agreement with sequential decoding."""
    x = torch.randn(13, 256, generator=rng)
    w = torch.randn(37, 256, generator=rng)
    together = nb.linear(x, w)
    for m in range(13):
        assert torch.equal(nb.linear(x[m:m + 1], w), together[m:m + 1]), m


def test_sampling_logits_are_the_linear_kernel(rng):
    """The constrained sampler's range logits are the same kernel over the range's lm_head rows."""
    hidden = torch.randn(5, 96, generator=rng)
    weight = torch.randn(300, 96, generator=rng)
    assert torch.equal(nb.range_logits_op(hidden, weight, 40, 290), nb.linear(hidden, weight[40:290]))


def test_linear_errors():
    x, w = torch.randn(2, 8), torch.randn(4, 8)
    with pytest.raises(ValueError, match="weight \\[N, K\\]"):
        nb.linear(x, torch.randn(4, 9))
    with pytest.raises(TypeError, match="float32"):
        nb.linear(x.double(), w.double())
    with pytest.raises(ValueError, match="contiguous"):
        nb.linear(x, torch.randn(8, 4).t())
    with pytest.raises(ValueError, match="does not support"):
        ops.linear(x, w.requires_grad_(), backend="native")
    for backend in ("native", "torch", "auto"):  # a 0-d x has no K
        with pytest.raises(ValueError, match=r"x \[\.\.\., K\] and weight \[N, K\]; got \(\), \(3, 1\)"):
            ops.linear(torch.tensor(1.0), torch.randn(3, 1), backend=backend)


def test_a_backend_without_the_op_says_so(monkeypatch):
    """Asking a backend that is installed for an op it does not implement names the backends that do;
    the install hint is for a backend that did not import."""
    x, w = torch.randn(3, 8), torch.randn(4, 8)
    targets = torch.zeros(3, dtype=torch.long)
    with pytest.raises(RuntimeError, match=r"'linear_cross_entropy' has no 'native' implementation; it has \[") as err:
        ops.linear_cross_entropy(x, w, targets, backend="native")
    assert "build the extension" not in str(err.value) and "'torch'" in str(err.value)
    monkeypatch.setitem(dispatch._IMPORT_ERRORS, "native", ImportError("No module named 'worldvla._C'"))
    with pytest.raises(RuntimeError, match=r"the 'native' backend did not import \(No module named 'worldvla._C'\); "
                                           r"build the extension"):
        ops.linear_cross_entropy(x, w, targets, backend="native")


@pytest.mark.usefixtures("poison_outputs")
def test_linear_empty():
    assert nb.linear(torch.randn(0, 8), torch.randn(4, 8)).shape == (0, 4)
    assert nb.linear(torch.randn(3, 8), torch.randn(0, 8)).shape == (3, 0)
    for shape in ((3, 5, 0), (4, 0), (2, 0, 0)):  # K = 0: zeros (leading dims kept, also with no rows)
        x = torch.randn(shape)
        assert torch.equal(nb.linear(x, torch.randn(7, 0)), torch.zeros(*shape[:-1], 7))
        assert torch.equal(ops.linear(x, torch.randn(7, 0), backend="native"), torch.zeros(*shape[:-1], 7))


def test_auto_keeps_torch_for_many_rows_and_for_training(monkeypatch):
    monkeypatch.setitem(dispatch.AUTO_ORDER, ("linear", "cpu"), ("native", "torch"))
    w = torch.randn(16, 8)
    assert ops.resolve_linear(torch.randn(NATIVE_MAX_ROWS, 8), w) is nb._dispatched_linear
    assert ops.resolve_linear(torch.randn(NATIVE_MAX_ROWS + 1, 8), w) is ops.linear_ref  # torch's GEMM
    assert ops.resolve_linear(torch.randn(2, NATIVE_MAX_ROWS // 2, 8), w) is nb._dispatched_linear  # rows of all dims
    assert ops.resolve_linear(torch.randn(1, 8), w.requires_grad_()) is ops.linear_ref
    monkeypatch.setitem(dispatch.AUTO_ORDER, ("linear", "cpu"), ("torch",))
    assert ops.resolve_linear(torch.randn(1, 8), torch.randn(16, 8)) is ops.linear_ref


def test_linear_traces_as_a_custom_op(rng):
    x, w = torch.randn(3, 32, generator=rng), torch.randn(8, 32, generator=rng)
    torch.library.opcheck(nb.linear_op, (x, w))


def test_decode_step_with_native_projections(rng, monkeypatch):
    """A model's cached forward (a decode step of 3 rows) takes the native kernel for its projections
    when `auto` orders it first, and gives torch's hidden states within float32 rounding."""
    from worldvla import VocabLayout
    from worldvla.inference import InferenceEngine
    from worldvla.model import ModelConfig, WorldVLA

    layout = VocabLayout.compact(n_image_codes=64)
    model = WorldVLA(ModelConfig.tiny(layout)).init_weights(0.5, generator=rng).eval()
    prompt = torch.randint(layout.text_base, layout.vocab_size, (40,), generator=rng)
    step_ids = torch.randint(layout.text_base, layout.vocab_size, (1, 3), generator=rng)
    out = {}
    for order in (("torch",), ("native", "torch")):
        monkeypatch.setitem(dispatch.AUTO_ORDER, ("linear", "cpu"), order)
        monkeypatch.setitem(dispatch.AUTO_ORDER, ("decoder_layer", "cpu"), ("torch",))  # the layers' modules
        engine = InferenceEngine(model, 1, 64, layout=layout)
        engine.prefill([prompt])
        buf = engine.buffers(3)
        buf.ids.copy_(step_ids)
        buf.set_positions(torch.tensor([[40, 41, 42]]))
        engine.set_kv_len([43])
        calls = []
        monkeypatch.setattr(nb._C, "linear", lambda *a, f=nb._C.linear: calls.append(a) or f(*a))
        out[order[0]] = engine.run(buf).clone()
        monkeypatch.undo()
        assert (len(calls) > 0) == (order[0] == "native")
    torch.testing.assert_close(out["native"], out["torch"], rtol=1e-5, atol=1e-5)


def test_auto_takes_the_linear_only_where_measured():
    for cap in ("AVX512", "AVX2"):
        assert dispatch._auto_order(cap, "amd")[("linear", "cpu")][0] == "native"
    for cap, vendor in [("AVX2", "intel"), ("AVX2", None), ("AVX512", "intel"), ("AVX512", None), ("DEFAULT", None)]:
        assert ("linear", "cpu") not in dispatch._auto_order(cap, vendor), (cap, vendor)


@pytest.mark.parametrize("backend", ["torch", "native", "triton"])
def test_every_attention_backend_resolves_its_projections(rng, backend):
    """The engine's `backend` names the attention backend; the projections follow `auto` (or torch's
    with "torch"), so a backend without a linear of its own still runs a decode step, and gets the
    float64 model's hidden states within 2x the error of the backend="torch" engine in float32."""
    import copy

    from test_native_decoder import _assert_rule  # (tests/ is on sys.path)
    from worldvla import VocabLayout
    from worldvla.inference import InferenceEngine
    from worldvla.model import ModelConfig, WorldVLA

    if backend not in dispatch.available("decode_attention"):
        pytest.skip(f"no {backend} backend here")
    layout = VocabLayout.compact(n_image_codes=64)
    model = WorldVLA(ModelConfig.tiny(layout)).init_weights(0.5, generator=rng).eval()
    prompt = torch.randint(layout.text_base, layout.vocab_size, (20,), generator=rng)
    step_ids = torch.randint(layout.text_base, layout.vocab_size, (1, 2), generator=rng)

    def step(m, be):
        engine = InferenceEngine(m, 1, 32, layout=layout, backend=be)
        engine.prefill([prompt])
        buf = engine.buffers(2)
        buf.ids.copy_(step_ids)
        buf.set_positions(torch.tensor([[20, 21]]))
        engine.set_kv_len([22])
        return engine.run(buf).clone()

    out = step(model, backend)
    assert out.shape == (1, 2, model.config.hidden_size) and out.dtype == torch.float32
    _assert_rule(out, step(model, "torch"), step(copy.deepcopy(model).double(), "torch"), f"{backend} step")


def test_auto_keeps_cublas_for_the_linear_on_gpus():
    for cap, vendor in [("AVX512", "amd"), ("AVX2", None)]:
        assert dispatch._auto_order(cap, vendor)[("linear", "cuda")] == ("torch",)


def test_auto_keeps_torch_for_tensor_subclasses(monkeypatch):
    """Sharded (DTensor) or traced weights go to torch's linear, which knows how to handle them."""
    monkeypatch.setitem(dispatch.AUTO_ORDER, ("linear", "cpu"), ("native", "torch"))

    class Wrapped(torch.Tensor):
        pass

    w = torch.randn(16, 8)
    with torch.no_grad():
        assert ops.resolve_linear(torch.randn(2, 8), w) is nb._dispatched_linear
        assert ops.resolve_linear(torch.randn(2, 8), w.as_subclass(Wrapped)) is ops.linear_ref


def test_a_float32_models_forward_under_autocast_keeps_torchs_linear(rng, monkeypatch):
    """Under CPU autocast a float32 model's forward resolved its projections to the float32 kernel on its first
    (float32) input, which computed without autocast; the next projection's input came out of autocast's
    bfloat16 attention, and the kernel refused it: "linear (native): the CPU path takes float32". `auto` keeps
    torch's linear (autocast's matmul) under autocast now, and a kernel handed out before passes such inputs on."""
    from worldvla import VocabLayout
    from worldvla.inference import InferenceEngine
    from worldvla.model import ModelConfig, WorldVLA

    layout = VocabLayout.compact(n_image_codes=64)
    model = WorldVLA(ModelConfig.tiny(layout)).init_weights(0.5, generator=rng).eval()
    prompt = torch.randint(layout.text_base, layout.vocab_size, (40,), generator=rng)
    step_ids = torch.randint(layout.text_base, layout.vocab_size, (1, 3), generator=rng)
    monkeypatch.setitem(dispatch.AUTO_ORDER, ("linear", "cpu"), ("native", "torch"))
    monkeypatch.setitem(dispatch.AUTO_ORDER, ("decoder_layer", "cpu"), ("torch",))  # the layers' modules
    calls = []
    monkeypatch.setattr(nb._C, "linear", lambda *a, f=nb._C.linear: calls.append(a) or f(*a))
    out = {}
    for backend in ("auto", "torch"):
        engine = InferenceEngine(model, 1, 64, layout=layout, backend=backend)
        with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
            engine.prefill([prompt])
            buf = engine.buffers(3)
            buf.ids.copy_(step_ids)
            buf.set_positions(torch.tensor([[40, 41, 42]]))
            engine.set_kv_len([43])
            out[backend] = engine.run(buf).clone()
    assert not calls
    x32, w32 = torch.randn(3, 64, generator=rng), model.lm_head.weight
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert ops.resolve_linear(x32, w32) is ops.linear_ref
        y = nb._dispatched_linear(x32.bfloat16(), w32)  # resolved before: autocast's bfloat16 activations
    assert y.dtype == torch.bfloat16 and not calls
    assert out["auto"].dtype == out["torch"].dtype


def test_an_explicit_native_backend_takes_any_row_count(rng):
    """NATIVE_MAX_ROWS bounds only `auto`'s choice: backend="native" runs the kernel on a prefill's rows too."""
    w = torch.randn(16, 8, generator=rng)
    x = torch.randn(3 * NATIVE_MAX_ROWS, 8, generator=rng)
    assert ops.resolve_linear(x, w, "native") is nb._dispatched_linear
    assert torch.equal(ops.linear(x, w, backend="native"), nb.linear(x, w))


@pytest.mark.parametrize("backend", ["native", "torch", "auto"])
def test_mismatched_shapes_are_named_on_every_backend(backend):
    """Every backend refuses x and weight that do not multiply with one ValueError naming both shapes."""
    x = torch.randn(2, 8)
    for w in (torch.randn(4, 9), torch.randn(2, 4, 8)):
        with pytest.raises(ValueError, match=r"linear wants x \[\.\.\., K\] and weight \[N, K\]; got \(2, 8\), "):
            ops.linear(x, w, backend=backend)


def test_linear_under_autocast_is_autocasts_linear(rng, monkeypatch):
    """Under CPU autocast (bfloat16) ops.linear computes as F.linear does there: on bfloat16 copies of its
    float32 inputs, returning bfloat16. `auto` (ordered to try the native kernel first) must not hand the
    float32 inputs to the kernel, which autocast does not see; backend="native" refuses the bfloat16 copies."""
    monkeypatch.setitem(dispatch.AUTO_ORDER, ("linear", "cpu"), ("native", "torch"))
    x, w = torch.randn(3, 40, generator=rng), torch.randn(24, 40, generator=rng)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = F.linear(x, w)
        got = ops.linear(x, w)
        with pytest.raises(ValueError, match="the CPU path takes float32, got torch.bfloat16"):
            ops.linear(x, w, backend="native")
    assert want.dtype == got.dtype == torch.bfloat16
    assert torch.equal(got, want)


def test_a_handed_out_kernel_passes_inputs_that_need_gradients_to_torch(rng, monkeypatch):
    """A forward resolves the linear once, on its first projection; a later projection whose weight needs
    gradients (an unfrozen layer further in) goes through torch's linear from the handed-out function, so
    its gradient is F.linear's, and the forward-only kernel is not called."""
    monkeypatch.setitem(dispatch.AUTO_ORDER, ("linear", "cpu"), ("native", "torch"))
    frozen, x = torch.randn(16, 8, generator=rng), torch.randn(3, 8, generator=rng)
    with torch.no_grad():
        fn = ops.resolve_linear(x, frozen)
    assert fn is nb._dispatched_linear
    calls = []
    monkeypatch.setattr(nb._C, "linear", lambda *a, f=nb._C.linear: calls.append(a) or f(*a))
    w = torch.randn(16, 8, generator=rng, requires_grad=True)
    g = torch.randn(3, 16, generator=rng)
    y = fn(x, w)
    assert torch.equal(y, F.linear(x, w)) and y.requires_grad
    (y * g).sum().backward()
    torch.testing.assert_close(w.grad, g.t() @ x)
    assert not calls
    assert torch.equal(fn(x, frozen), nb.linear(x, frozen)) and len(calls) == 2  # frozen: the kernel
