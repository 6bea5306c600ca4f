"""What the entry points of worldvla.ops refuse, on every backend that runs here: inputs no backend computes
correctly give one clear error naming the op, the argument and the fix, instead of a torch error from inside
a backend, a wrong result, or a value read from uninitialized memory."""
import copy
import math

import pytest
import torch

from worldvla import ops
from worldvla.ops import dispatch

LCE_BACKENDS = ["auto"] + (["triton"] if "triton" in dispatch.available("linear_cross_entropy") else [])


@pytest.fixture
def lce_inputs(rng):
    return torch.randn(9, 16, generator=rng), torch.randn(300, 16, generator=rng) / 4


@pytest.mark.parametrize("backend", LCE_BACKENDS)
def test_linear_cross_entropy_refuses_bad_inputs(lce_inputs, backend):
    h, w = lce_inputs
    y = torch.arange(9)
    lce = lambda *a, **k: ops.linear_cross_entropy(*a, **k, backend=backend)
    with pytest.raises(TypeError, match="linear_cross_entropy: weight is torch.float32 but hidden is torch.bfloat16"):
        lce(h.bfloat16(), w, y)
    with pytest.raises(TypeError, match="linear_cross_entropy: hidden must be a floating-point tensor"):
        lce(h.long(), w.long(), y)
    for bad in (y.float(), y.bool()):
        with pytest.raises(TypeError, match="targets must be integer class ids"):
            lce(h, w, bad)
    for value in (300, -3, 2 ** 32 + 5):
        bad = y.clone()
        bad[4] = value
        with pytest.raises(ValueError, match=r"targets must be -100 \(ignored\) or lie in \[0, 300\)"):
            lce(h, w, bad)
    with pytest.raises(ValueError, match="vocabulary is empty"):
        lce(h, w[:0], torch.full((9,), -100))


@pytest.mark.parametrize("backend", LCE_BACKENDS)
@pytest.mark.parametrize("dtype, vocab", [(torch.uint8, 50), (torch.uint8, 300), (torch.int8, 300),
                                          (torch.int16, 40000), (torch.int16, 70000), (torch.int32, 300)])
def test_linear_cross_entropy_small_integer_targets(rng, backend, dtype, vocab):
    """Targets of any integer dtype are class ids: the loss is the int64 targets' (the Triton path had
    compared and clamped them in their own dtype, where uint8's -1 is 255 and int8 cannot hold V)."""
    h, w = torch.randn(9, 16, generator=rng), torch.randn(vocab, 16, generator=rng) / 4
    y = torch.randint(0, min(vocab, torch.iinfo(dtype).max + 1), (9,), generator=rng)
    if dtype != torch.uint8:
        y[2] = -100  # ignored
    elif vocab > 156:
        y[0] = 156  # compared with ignore_index -100 in uint8 arithmetic, it would be ignored
    want = ops.linear_cross_entropy(h, w, y, backend=backend)
    got = ops.linear_cross_entropy(h, w, y.to(dtype), backend=backend)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_linear_cross_entropy_mixed_dtypes_under_autocast(lce_inputs):
    """Autocast casts the inputs to one dtype: mixed dtypes pass the checks there."""
    h, w = lce_inputs
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = ops.linear_cross_entropy(h.bfloat16(), w, torch.arange(9))
    assert torch.isfinite(loss)


def test_linear_cross_entropy_takes_autocast_on_every_backend(lce_inputs):
    """Under autocast the reference's logits come from a bf16 matmul while a fused kernel, which autocast does
    not see, computed fp32 inputs in fp32, and refused training's mixed bf16 hidden and fp32 head (falling back
    to the reference's full logits). The entry point casts as autocast does: every backend gives the loss of
    the bf16-cast inputs, and the fp32 head's gradient comes back in fp32."""
    h, w = lce_inputs
    y = torch.arange(9) * 7 % w.shape[0]
    y[4] = -100
    for backend in dispatch.available("linear_cross_entropy"):
        want = ops.linear_cross_entropy(h.bfloat16(), w.bfloat16(), y, backend=backend)[0]
        for hidden in (h, h.bfloat16()):
            wp = w.clone().requires_grad_()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = ops.linear_cross_entropy(hidden, wp, y, backend=backend)[0]
            assert torch.equal(loss, want), (backend, hidden.dtype)
            loss.backward()
            assert wp.grad.dtype == torch.float32 and wp.grad.abs().sum() > 0, backend


def _meta(t):
    return t.to("meta")


def _entry_points(rng):
    """(name, call, the argument on the meta device) for each entry point and each of its tensors."""
    h, w, y = torch.randn(3, 16, generator=rng), torch.randn(100, 16, generator=rng), torch.tensor([1, 2, 3])
    cw = torch.ones(100)
    z, cb = torch.randn(6, 8, generator=rng), torch.randn(20, 8, generator=rng)
    idx = torch.zeros(1, 2, 2, dtype=torch.long)
    lce = ops.linear_cross_entropy
    return [
        ("linear_cross_entropy", lambda b: lce(_meta(h), w, y, backend=b), "weight is on cpu but hidden is on meta"),
        ("linear_cross_entropy", lambda b: lce(h, _meta(w), y, backend=b), "weight is on meta but hidden is on cpu"),
        ("linear_cross_entropy", lambda b: lce(h, w, _meta(y), backend=b), "targets is on meta but hidden is on cpu"),
        ("linear_cross_entropy", lambda b: lce(h, w, y, _meta(cw), backend=b), "class_weight is on meta but hidden is on cpu"),
        ("constrained_sample", lambda b: ops.constrained_sample(h, _meta(w), 0, 100, backend=b), "weight is on meta"),
        ("constrained_sample", lambda b: ops.constrained_sample(_meta(h), w, 0, 100, backend=b), "weight is on cpu but hidden is on meta"),
        ("linear", lambda b: ops.linear(h, _meta(w), backend=b), "weight is on meta but x is on cpu"),
        ("linear", lambda b: ops.linear(_meta(h), w, backend=b), "weight is on cpu but x is on meta"),
        ("vq_quantize", lambda b: ops.vq_quantize(z, _meta(cb), backend=b), "codebook is on meta but z is on cpu"),
        ("vq_quantize", lambda b: ops.vq_quantize(_meta(z), cb, backend=b), "codebook is on cpu but z is on meta"),
        ("vq_gather", lambda b: ops.vq_gather(idx, _meta(cb), backend=b), "codebook is on meta but indices is on cpu"),
        ("vq_gather", lambda b: ops.vq_gather(_meta(idx), cb, backend=b), "codebook is on cpu but indices is on meta"),
    ]


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_entry_points_refuse_mixed_devices(rng, backend):
    """A meta tensor beside CPU ones (the one other device every machine has): the torch path had returned
    values computed from uninitialized memory, on the CPU, without an error (or raised torch's own error)."""
    for op, call, message in _entry_points(rng):
        with pytest.raises(ValueError, match=f"{op}: {message}"):
            call(backend)


def _attention_inputs(rng):
    """fp32 q, k, v of a padded batch under the chunk rule, with its prefill and decode metadata."""
    from test_mask import random_sequence

    from worldvla import VocabLayout, chunk_mask_meta
    from worldvla.mask import NO_BLOCK, DecodeMeta

    layout = VocabLayout.compact()
    ids = torch.tensor(random_sequence(layout, rng, n_images=1, n_actions=3, dim=4)).view(1, -1)
    L = ids.shape[1]
    q, k, v = (torch.randn(1, L, 4, 16, generator=rng) for _ in range(3))
    Q = 3
    decode = DecodeMeta(torch.arange(L - Q, L, dtype=torch.int32).view(1, Q), torch.full((1, Q), -1, dtype=torch.int32),
                        torch.full((1, L), NO_BLOCK, dtype=torch.int32), torch.tensor([L], dtype=torch.int32))
    return q, k, v, chunk_mask_meta(ids, layout), decode


def test_every_backend_takes_autocast_as_torch_does(rng):
    """Under CPU bfloat16 autocast with fp32 inputs, the torch path (F.linear, SDPA, which autocast casts) returned
    bf16 and the native kernels, which autocast does not see, fp32 computed in fp32: the dtype and the numbers of
    `auto` depended on the backend the machine picked. Every backend now takes the inputs as autocast casts them
    and returns the torch path's dtype, close to its values."""
    q, k, v, meta, decode = _attention_inputs(rng)
    x, w = torch.randn(5, 32, generator=rng), torch.randn(24, 32, generator=rng)
    calls = {"linear": lambda b: ops.linear(x, w, backend=b),
             "masked_attention": lambda b: ops.masked_attention(q, k, v, meta, backend=b),
             "decode_attention": lambda b: ops.decode_attention(q[:, -3:], k, v, decode, backend=b)}
    for op, call in calls.items():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            want = call("torch")
            assert want.dtype == torch.bfloat16, op
            for backend in ["auto"] + dispatch.available(op):
                try:
                    got = call(backend)
                except ValueError as e:  # a backend without bf16 (native linear) says so; `auto` passes it over
                    assert "does not support these inputs" in str(e) and backend != "auto", (op, backend)
                    continue
                assert got.dtype == torch.bfloat16, (op, backend)
                torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2, msg=f"{op} {backend}")
        assert call("auto").dtype == torch.float32, op  # and fp32 without autocast


def test_vq_distances_stay_fp32_under_autocast(rng):
    """The torch reference computed z @ e^T in bfloat16 under CPU autocast (the VQGAN's --precision bf16 training),
    not in fp32 as its docstring says: codes between two near codes flipped (51 of 512 rows here)."""
    C, N = 64, 512
    e0 = torch.randn(C, generator=rng) * 4
    codebook = torch.stack([e0, e0 + torch.randn(C, generator=rng) * 0.05])
    t = torch.rand(N, 1, generator=rng)
    z = (e0 + t * (codebook[1] - e0) + 0.001 * torch.randn(N, C, generator=rng)).bfloat16()
    want = ops.vq_quantize(z, codebook, backend="torch")
    assert 0 < int(want.sum()) < N  # rows on both sides of the midpoint
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for backend in ["auto", "torch"]:
            assert torch.equal(ops.vq_quantize(z, codebook, backend=backend), want), backend


@pytest.mark.skipif("triton" not in dispatch.available("vq_gather"), reason="needs Triton")
def test_triton_vq_gather_passes_a_complex_codebook_to_torch():
    """Triton's answer for a complex codebook was yes, and its launch then failed with KeyError('complex64')."""
    from worldvla.ops import triton_backend

    codebook = torch.randn(5, 3, dtype=torch.complex64)
    indices = torch.tensor([[[0, 4], [2, 1]]])
    assert not triton_backend._vq_gather_supports(indices, codebook)
    torch.testing.assert_close(ops.vq_gather(indices, codebook), ops.vq_gather_ref(indices, codebook))


def test_float64_beside_float32_is_refused_under_autocast_too(rng):
    """check_floats skipped the dtype check under autocast, which casts fp32, fp16 and bf16 but keeps fp64: fp64
    beside fp32 reached SDPA or the matmul and stopped in torch's error, naming neither the op nor the argument.
    Dtypes that autocast makes one still pass."""
    q, k, v, meta, decode = _attention_inputs(rng)
    x, w, y = torch.randn(3, 16, generator=rng), torch.randn(20, 16, generator=rng), torch.tensor([1, 2, 3])
    calls = [("masked_attention", "k", "q", lambda d: ops.masked_attention(q.to(d), k, v, meta)),
             ("decode_attention", "k_cache", "q", lambda d: ops.decode_attention(q[:, -3:].to(d), k, v, decode)),
             ("linear", "weight", "x", lambda d: ops.linear(x.to(d), w)),
             ("linear_cross_entropy", "weight", "hidden", lambda d: ops.linear_cross_entropy(x.to(d), w, y)),
             ("constrained_sample", "weight", "hidden", lambda d: ops.constrained_sample(x.to(d), w, 0, 20))]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for op, name, first, call in calls:
            with pytest.raises(TypeError, match=rf"{op}: {name} is torch\.(float32|bfloat16) but {first} is "
                                                rf"torch\.float64, which autocast does not make one .* convert them"):
                call(torch.float64)
            call(torch.float16)  # cast to bf16 with the others


# torch.func's own machinery warns here (its TorchScript helpers, SDPA's batching fallback): not this package's.
@pytest.mark.skipif("native" not in dispatch.available("linear"), reason="needs the native extension")
@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore:There is a performance drop:UserWarning")
def test_auto_passes_native_over_under_torch_func_and_forward_ad(rng, monkeypatch):
    """Where `auto` leads with native (the order depends on the CPU: forced here), torch.func's wrapped tensors
    reached the kernels ("Cannot access data pointer of Tensor that doesn't have storage") and forward-AD duals
    lost their tangents without a word. The native backend now declines both, and `auto` takes torch."""
    import torch.autograd.forward_ad as fwAD

    for op in ("linear", "vq_quantize", "masked_attention"):
        monkeypatch.setitem(dispatch.AUTO_ORDER, (op, "cpu"), ("native", "torch"))
    x, w, t = torch.randn(2, 8, generator=rng), torch.randn(3, 8, generator=rng), torch.randn(2, 8, generator=rng)
    xb = torch.randn(4, 2, 8, generator=rng)
    assert dispatch.resolve("linear", "auto", "cpu", x, w) is not dispatch.resolve("linear", "torch", "cpu", x, w)
    for op, call in (("linear", lambda a, b: ops.linear(a, w, backend=b)),
                     ("vq_quantize", lambda a, b: ops.vq_quantize(a, w, backend=b))):
        torch.testing.assert_close(torch.func.vmap(lambda a: call(a, "auto"))(xb),
                                   torch.func.vmap(lambda a: call(a, "torch"))(xb), msg=op)
    q, k, v, meta, _ = _attention_inputs(rng)
    qb = torch.stack([q, 2 * q])
    torch.testing.assert_close(torch.func.vmap(lambda a: ops.masked_attention(a, k, v, meta))(qb),
                               torch.func.vmap(lambda a: ops.masked_attention(a, k, v, meta, backend="torch"))(qb))
    with fwAD.dual_level():
        tangent = fwAD.unpack_dual(ops.linear(fwAD.make_dual(x, t), w)).tangent
        assert not dispatch.supports("masked_attention", "native", fwAD.make_dual(q, q), k, v, meta)
    assert tangent is not None
    torch.testing.assert_close(tangent, t @ w.t())
    torch.testing.assert_close(torch.func.jvp(lambda a: ops.linear(a, w), (x,), (t,))[1], t @ w.t())
    with pytest.raises(ValueError, match="torch.func transforms .* wrap the inputs"):
        torch.func.vmap(lambda a: ops.linear(a, w, backend="native"))(xb)


@pytest.mark.skipif("triton" not in dispatch.available("masked_attention"), reason="needs Triton")
def test_triton_attention_takes_metadata_built_under_inference_mode(rng):
    """The Triton op saved the metadata for backward, and tensors made under torch.inference_mode (a data
    pipeline's masks) cannot be saved ("Inference tensors cannot be saved for backward"); torch's path takes them.
    The metadata needs no autograd: the backward gets it as it is, with gradients as torch's."""
    from worldvla.mask import causal_meta

    with torch.inference_mode():
        meta = causal_meta((1, 6))
    q0 = torch.randn(1, 6, 2, 16, generator=rng)
    grads = {}
    for backend in ("torch", "triton"):
        q = q0.clone().requires_grad_()
        ops.masked_attention(q, q, q, meta, backend=backend).square().sum().backward()
        grads[backend] = q.grad
    torch.testing.assert_close(grads["triton"], grads["torch"], rtol=1e-4, atol=1e-5)


@pytest.mark.skipif("native" not in dispatch.available("masked_attention"), reason="needs the native extension")
@pytest.mark.filterwarnings("error::UserWarning")  # torch warns where a fake tensor's address is read
def test_native_alignment_rule_reads_the_address_only_of_cuda_tensors_that_hold_one(monkeypatch):
    """The CUDA kernels' 16-byte rule has one home (`_aligned16`, run by the ops' checks and so by `supports`):
    strides and offset first, then the storage's own address, which can start off a boundary with offset 0
    (an imported buffer). The address is read only from tensors whose values lie there on a GPU: not from CPU
    tensors (no 16-byte loads) nor from fake CUDA tensors (tracing, the ops' fake implementations)."""
    import numpy as np
    from torch._subclasses.fake_tensor import FakeTensorMode

    from worldvla.ops import native_backend as nb

    buf = np.zeros(96, dtype=np.uint8)
    start = -buf.ctypes.data % 16 + 2
    odd = torch.from_numpy(buf[start:start + 64]).view(torch.float16).view(2, 16)
    assert odd.data_ptr() % 16 == 2 and odd.storage_offset() == 0
    assert not nb._holds_address(odd)
    nb._aligned16("op", x=odd)  # a CPU tensor: its address is not checked
    with FakeTensorMode():
        fake = torch.empty(2, 16, dtype=torch.float16, device="cuda")
    assert fake.is_cuda and not nb._holds_address(fake)
    nb._check_range(fake, fake, 0, 2)  # the CUDA checks of fake tensors pass without reading an address

    monkeypatch.setattr(nb, "_holds_address", lambda t: True)  # as a CUDA tensor of that address would be
    with pytest.raises(ValueError, match=r"op \(native\): x's data pointer is not 16-byte aligned .* call \.clone\(\)"):
        nb._aligned16("op", x=odd)
    with pytest.raises(ValueError, match=r"x rows must start on 16-byte boundaries"):
        nb._aligned16("op", x=odd[:, 1:])  # the strides and offset are named first
    nb._aligned16("op", x=odd[:, :0])  # nothing to load


@pytest.mark.parametrize("backend", ["auto", "torch", "native"])
def test_a_softmax_scale_or_generator_of_another_type_is_refused_by_every_backend(rng, backend):
    """A string scale was computed with by the native backend and refused deep inside SDPA by torch's; a generator
    that is no torch.Generator failed inside torch.rand, or at temperature 0 went unnoticed. A number of another
    kind (a NumPy float, an int) is the float it holds."""
    import numpy as np

    from worldvla import ops
    from worldvla.ops import dispatch

    if backend == "native" and "native" not in dispatch.available("masked_attention"):
        pytest.skip("the native extension is not built")
    q, k, v, meta, decode = _attention_inputs(rng)
    for bad in ("0.1", torch.tensor(0.1), True, float("nan"), float("inf")):
        with pytest.raises(TypeError, match="masked_attention: softmax_scale must be a finite number or None"):
            ops.masked_attention(q, k, v, meta, softmax_scale=bad, backend=backend)
        with pytest.raises(TypeError, match="decode_attention: softmax_scale must be a finite number or None"):
            ops.decode_attention(q[:, -3:], k, v, decode, softmax_scale=bad, backend=backend)
    want = ops.masked_attention(q, k, v, meta, softmax_scale=0.25, backend=backend)
    for same in (np.float32(0.25), np.float64(0.25)):
        assert torch.equal(ops.masked_attention(q, k, v, meta, softmax_scale=same, backend=backend), want)
    h, w = torch.randn(3, 16, generator=rng), torch.randn(40, 16, generator=rng)
    for temperature in (0.0, 1.0):
        with pytest.raises(TypeError, match="generator must be a torch.Generator"):
            ops.constrained_sample(h, w, 8, 30, temperature=temperature, generator=5, backend=backend)


@pytest.mark.parametrize("backend", ["auto", "torch", "native"])
def test_a_softmax_scale_of_any_real_number_type_is_the_float_it_holds(rng, backend):
    """Every real number is taken as the float it holds, by prefill and decode alike: a Fraction (a numbers.Real
    that torch's SDPA refuses) or an int scale gives what the float gives."""
    from fractions import Fraction

    import numpy as np

    from worldvla import ops
    from worldvla.ops import dispatch

    if backend == "native" and "native" not in dispatch.available("masked_attention"):
        pytest.skip("the native extension is not built")
    q, k, v, meta, decode = _attention_inputs(rng)
    want = ops.masked_attention(q, k, v, meta, softmax_scale=0.25, backend=backend)
    want_decode = ops.decode_attention(q[:, -3:], k, v, decode, softmax_scale=0.25, backend=backend)
    for same in (Fraction(1, 4), np.float32(0.25)):
        assert torch.equal(ops.masked_attention(q, k, v, meta, softmax_scale=same, backend=backend), want)
        assert torch.equal(ops.decode_attention(q[:, -3:], k, v, decode, softmax_scale=same, backend=backend),
                           want_decode)
    one = ops.decode_attention(q[:, -3:], k, v, decode, softmax_scale=1.0, backend=backend)
    assert torch.equal(ops.decode_attention(q[:, -3:], k, v, decode, softmax_scale=1, backend=backend), one)


_needs_native = pytest.mark.skipif("native" not in dispatch.available("masked_attention"),
                                   reason="needs the native extension")


@_needs_native
def test_decode_attention_reads_strided_metadata_as_it_is_laid_out(rng, monkeypatch):
    """DecodeMeta whose q_pos or q_limit is a strided view (a [Q, B] table transposed): the native kernels read
    them as contiguous [B, Q], so the native backend declines them and `auto` takes torch; every backend gives the
    reference's rows."""
    from worldvla.mask import NO_BLOCK, DecodeMeta

    monkeypatch.setitem(dispatch.AUTO_ORDER, ("decode_attention", "cpu"), ("native", "torch"))
    B, Q, S, H, D = 2, 3, 12, 2, 8
    q = torch.randn(B, Q, H, D, generator=rng)
    k, v = torch.randn(B, S, H, D, generator=rng), torch.randn(B, S, H, D, generator=rng)
    kv_block = torch.full((B, S), NO_BLOCK, dtype=torch.int32)
    kv_block[:, 3:9] = torch.arange(6, dtype=torch.int32).repeat_interleave(2)[:6].view(1, 6)
    q_pos = torch.tensor([[9, 10, 11], [8, 9, 10]], dtype=torch.int32)
    q_limit = torch.tensor([[-1, 1, 2], [3, -1, 0]], dtype=torch.int32)
    kv_len = torch.tensor([12, 11], dtype=torch.int32)
    for field in ("q_pos", "q_limit"):
        fields = dict(q_pos=q_pos, q_limit=q_limit)
        fields[field] = fields[field].t().contiguous().t()  # the same values, strides (1, B)
        assert not fields[field].is_contiguous()
        strided = DecodeMeta(fields["q_pos"], fields["q_limit"], kv_block, kv_len)
        want = ops.decode_attention_ref(q, k, v, DecodeMeta(q_pos, q_limit, kv_block, kv_len))
        torch.testing.assert_close(ops.decode_attention(q, k, v, strided), want, rtol=1e-5, atol=1e-6, msg=field)
        with pytest.raises(ValueError, match=rf"does not support these inputs .*{field} must be contiguous"):
            ops.decode_attention(q, k, v, strided, backend="native")


@_needs_native
def test_vq_gather_takes_a_codebook_of_any_layout(rng, monkeypatch):
    """A codebook whose rows are not contiguous (a [C, K] table transposed): the native gather copies each row's
    C elements as one block, so it declines the codebook and `auto` takes torch's gather, with the reference's
    embeddings."""
    monkeypatch.setitem(dispatch.AUTO_ORDER, ("vq_gather", "cpu"), ("native", "torch"))
    codebook = torch.randn(8, 20, generator=rng).t()  # [K=20, C=8], strides (1, 20)
    indices = torch.randint(0, 20, (2, 3, 4), generator=rng)
    want = ops.vq_gather_ref(indices, codebook.contiguous())
    assert torch.equal(ops.vq_gather(indices, codebook), want)
    with pytest.raises(ValueError, match="does not support these inputs .*codebook must have a contiguous last dim"):
        ops.vq_gather(indices, codebook, backend="native")


@_needs_native
def test_native_fp16_draw_returns_ids_in_the_range(rng):
    """A draw over [lo, hi) with a float16 lm_head on the CPU takes the native float32 logits and torch's draw: its
    ids are vocabulary ids in [lo, hi) (lo added back), the draw the reference makes from the same noise."""
    from worldvla.ops.sampling import sample_logits

    hidden, weight = torch.randn(4, 16, generator=rng).half(), torch.randn(90, 16, generator=rng).half()
    lo, hi = 50, 80
    gumbel = -torch.log(-torch.log(torch.rand(4, hi - lo, generator=rng)))
    logits = (hidden.double() @ weight[lo:hi].double().t()).float()
    for top_k in (None, 5):
        got = ops.constrained_sample(hidden, weight, lo, hi, temperature=0.7, top_k=top_k, gumbel=gumbel,
                                     backend="native")
        assert bool(((got >= lo) & (got < hi)).all()), got
        assert torch.equal(got, sample_logits(logits, 0.7, top_k, None, gumbel) + lo), top_k


@_needs_native
def test_native_ops_called_directly_check_their_metadata(rng):
    """The native ops (`torch.ops.worldvla.*`, `native_backend`'s functions) read metadata by address, so they check
    its shape themselves when called without the entry points: a q_limit, kv_len or cu_seqlens of another shape, or
    an empty codebook, is refused before a launch would read outside it. Inputs that need gradients go through the
    custom op, whose backward refuses, instead of returning a result that silently drops the gradient."""
    from worldvla.mask import ChunkMaskMeta, DecodeMeta, causal_meta
    from worldvla.ops import native_backend as nb

    q, k, v, meta, decode = _attention_inputs(rng)
    L = q.shape[1]
    short = ChunkMaskMeta(meta.kv_block, meta.q_limit[:, :-1], meta.position_ids)
    with pytest.raises(ValueError, match=r"masked_attention \(native\): metadata covers tokens"):
        nb.masked_attention(q, k, v, short)
    packed = causal_meta((L,), cu_seqlens=torch.tensor([0, L]))
    packed.cu_seqlens = packed.cu_seqlens[:1]
    with pytest.raises(ValueError, match=r"cu_seqlens must be 1-D with n_docs \+ 1 >= 2 entries, got shape \(1,\)"):
        nb.masked_attention(q[0], k[0], v[0], packed)
    long_len = DecodeMeta(decode.q_pos, decode.q_limit, decode.kv_block, decode.kv_len.repeat(2))
    with pytest.raises(ValueError, match=r"meta.kv_len must have shape \(1,\), got \(2,\)"):
        nb.decode_attention(q[:, -3:], k, v, long_len)
    with pytest.raises(ValueError, match="the codebook is empty"):
        nb.vq_quantize(torch.randn(4, 8, generator=rng), torch.randn(0, 8))
    q.requires_grad_()
    out = nb.masked_attention(q, k, v, meta)
    assert out.requires_grad
    with pytest.raises(RuntimeError):
        (out.sum() + q.sum()).backward()


def _decoder_case(rng):
    """A tiny model's first layer, its cached step's inputs (x, cos, sin, ForwardContext) and the cache."""
    from test_native_decoder import _model, _step

    from worldvla.model import ForwardContext, rope_cos_sin

    model = _model(rng)
    x, pos, meta, cache = _step(rng, model.config, 1, 2, S=20)
    cos, sin = rope_cos_sin(pos, model.config.head_dim, model.config.rope_theta, x.dtype)
    return model, x, cos, sin, ForwardContext(cache=cache, position_ids=pos, decode_meta=meta)


def _layer_outputs(layer, x, cos, sin, ctx, backend):
    cache = copy.deepcopy(ctx.cache)
    ctx = type(ctx)(cache=cache, position_ids=ctx.position_ids, decode_meta=ctx.decode_meta)
    with torch.no_grad():
        return ops.decoder_layer(layer, x, cos, sin, ctx, 0, backend=backend), cache


@_needs_native
@pytest.mark.parametrize("change", ["biased-projection", "head-norm-eps", "global-pre-hook"])
def test_a_decoder_layer_the_native_kernel_does_not_compute_keeps_its_modules(rng, monkeypatch, change):
    """A plain nn.Linear projection with a bias, q and k head norms of different epsilons, a global forward
    pre-hook: the native layer reads the weights alone (no bias), one head-norm epsilon, and calls no module. Such a
    layer is refused by the native backend with the reason, and `auto` computes the modules' output and cache."""
    from worldvla.ops import native_backend as nb

    monkeypatch.setitem(dispatch.AUTO_ORDER, ("decoder_layer", "cpu"), ("native", "torch"))
    model, x, cos, sin, ctx = _decoder_case(rng)
    layer = model.model.layers[0]
    undo = lambda: None  # noqa: E731
    if change == "biased-projection":
        old = layer.self_attn.v_proj
        layer.self_attn.v_proj = torch.nn.Linear(old.in_features, old.out_features)
        with torch.no_grad():
            layer.self_attn.v_proj.weight.copy_(old.weight)
        reason = "v_proj is a Linear, not a plain nn.Linear without bias"
    elif change == "head-norm-eps":
        layer.self_attn.k_norm.eps = 1e-2
        reason = "differ in epsilon"
    else:
        handle = torch.nn.modules.module.register_module_forward_pre_hook(
            lambda m, args: (args[0] * 2,) + args[1:] if type(m).__name__ == "MLP" else None)
        undo, reason = handle.remove, "a forward hook is registered"
    try:
        with pytest.raises(ValueError, match=reason):
            nb._layer_weights(layer)
        want, want_cache = _layer_outputs(layer, x, cos, sin, ctx, "torch")
        got, got_cache = _layer_outputs(layer, x, cos, sin, ctx, "auto")
        assert torch.equal(got, want) and torch.equal(got_cache.k, want_cache.k)
        assert torch.equal(got_cache.v, want_cache.v)
    finally:
        undo()


@_needs_native
def test_an_eval_mode_layer_with_a_dropout_rate_takes_the_native_layer(rng, monkeypatch):
    """Dropout only drops in training mode: a model in eval mode whose layers carry a dropout rate (as configs
    for fine-tuning set it) computes what the native layer computes, so `auto` keeps it there."""
    from worldvla.ops import native_backend as nb

    monkeypatch.setitem(dispatch.AUTO_ORDER, ("decoder_layer", "cpu"), ("native", "torch"))
    model, x, cos, sin, ctx = _decoder_case(rng)
    for layer in model.model.layers:
        layer.dropout.p = 0.1
    with torch.no_grad():
        assert ops.resolve_decoder_layer(model.model.layers, x, ctx) is nb._dispatched_decoder_layer
        model.train()
        assert ops.resolve_decoder_layer(model.model.layers, x, ctx) is ops.decoder_layer_ref


@_needs_native
def test_bf16_projection_copies_only_for_weights_that_hold_bfloat16_values(rng):
    """The decode step streams bfloat16 copies of the projections only where every float32 value is a bfloat16 (its
    low 16 bits zero): one value with a bit set anywhere below, even above the lowest 8, keeps float32."""
    from worldvla.ops import native_backend as nb

    model, *_ = _decoder_case(rng)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.bfloat16().float())
    assert nb.bf16_projections(model) is not None
    w = model.model.layers[1].mlp.down_proj.weight
    with torch.no_grad():
        w.view(torch.int32)[3, 5] |= 0x100  # bit 8: not a bfloat16, yet its lowest byte is zero
    assert nb.bf16_projections(model) is None


def test_complex_ids_are_refused_as_not_integers(rng):
    """Complex codes or targets are no integer ids: refused with the entry point's message, as floats and bools are
    (they reached torch.aminmax, or the loss's indexing, and stopped in a torch error naming no argument)."""
    codebook = torch.randn(5, 3, generator=rng)
    for backend in ["auto"] + dispatch.available("vq_gather"):
        with pytest.raises(TypeError, match="vq_gather: indices must hold integer codes, got torch.complex64"):
            ops.vq_gather(torch.zeros(1, 2, 2, dtype=torch.complex64), codebook, backend=backend)
    h, w = torch.randn(3, 8, generator=rng), torch.randn(10, 8, generator=rng)
    with pytest.raises(TypeError, match="targets must be integer class ids"):
        ops.linear_cross_entropy(h, w, torch.tensor([1, 2, 3], dtype=torch.complex64))


def test_an_unknown_backend_name_is_refused_with_the_choices(rng):
    """A misspelt or device-like backend name ("cuda", "Native") is refused naming the valid ones, on every op;
    it had read as an op without that implementation."""
    q, k, v, meta, _ = _attention_inputs(rng)
    x, w = torch.randn(2, 16, generator=rng), torch.randn(4, 16, generator=rng)
    for name in ("cuda", "Native"):
        with pytest.raises(ValueError, match=r"backend must be 'auto' or one of \('torch', 'triton', 'native'\), "
                                             rf"got '{name}'"):
            ops.masked_attention(q, k, v, meta, backend=name)
        with pytest.raises(ValueError, match="backend must be 'auto' or one of"):
            ops.linear(x, w, backend=name)


@pytest.mark.parametrize("backend", ["auto", "torch", "native", "triton"])
def test_attention_metadata_of_the_other_kind_or_none_is_refused_by_name(rng, backend):
    """A DecodeMeta given to masked_attention, a ChunkMaskMeta to decode_attention, or no metadata: each stopped in
    an AttributeError ("'NoneType' object has no attribute 'kv_block'") that named neither the op nor what to pass."""
    if backend not in ["auto"] + dispatch.available("masked_attention"):
        pytest.skip(f"the {backend} backend is not available here")
    q, k, v, meta, decode = _attention_inputs(rng)
    with pytest.raises(TypeError, match="masked_attention: meta must be a ChunkMaskMeta .*got DecodeMeta; a DecodeMeta "
                                        "goes with decode_attention"):
        ops.masked_attention(q, k, v, decode, backend=backend)
    with pytest.raises(TypeError, match="masked_attention: meta must be a ChunkMaskMeta .*got NoneType$"):
        ops.masked_attention(q, k, v, None, backend=backend)
    with pytest.raises(TypeError, match="decode_attention: meta must be a DecodeMeta .*got ChunkMaskMeta; a "
                                        "ChunkMaskMeta goes with masked_attention"):
        ops.decode_attention(q[:, -3:], k, v, meta, backend=backend)
    with pytest.raises(TypeError, match="decode_attention: meta must be a DecodeMeta .*got NoneType$"):
        ops.decode_attention(q[:, -3:], k, v, None, backend=backend)


@pytest.mark.parametrize("backend", LCE_BACKENDS)
def test_linear_cross_entropy_refuses_a_z_weight_or_ignore_index_of_another_kind(lce_inputs, backend):
    """A string z_weight was taken by the Triton path (its float()) and refused by the reference inside torch ("only
    integer tensors of a single element can be converted to an index"); a NaN one made the loss NaN. A fractional
    ignore_index was truncated by the Triton path (-100.5 ignored the -100 rows) and refused by the reference as
    targets out of range; None failed in int(). Each is refused by name on every backend; an integer of another
    type (a NumPy int, a 0-d integer tensor) is the int it holds."""
    import numpy as np

    h, w = lce_inputs
    y = torch.arange(9)
    y[3] = -100
    lce = lambda **k: ops.linear_cross_entropy(h, w, y, **k, backend=backend)  # noqa: E731
    for bad in ("0.1", float("nan"), float("inf"), torch.tensor(1e-4), True):
        with pytest.raises(TypeError, match="linear_cross_entropy: z_weight must be a finite number"):
            lce(z_weight=bad)
    for bad in (-100.5, -100.0, None, "x", False):
        with pytest.raises(TypeError, match="linear_cross_entropy: ignore_index must be an integer label"):
            lce(ignore_index=bad)
    assert torch.equal(lce(z_weight=np.float64(1e-3))[0], lce(z_weight=1e-3)[0])
    assert torch.equal(lce(z_weight=0)[0], lce(z_weight=0.0)[0])
    for same in (np.int64(-100), torch.tensor(-100)):
        assert torch.equal(lce(ignore_index=same)[0], lce()[0])


def test_logits_cross_entropy_of_no_rows_is_zero_not_nan(rng):
    """The loss of a head run as a module (an adapter or a hooked lm_head: `WorldVLA.loss` gives it the labelled
    rows) on a micro-batch without a label was the NaN of an empty mean, loss and z alike, where
    linear_cross_entropy gives 0: a training step's logged loss went NaN. It is 0 now, reaching the logits."""
    from worldvla.model import ModelConfig, WorldVLA

    logits = torch.randn(0, 30, generator=rng, requires_grad=True)
    for cw in (None, torch.rand(30, generator=rng)):
        loss, z = ops.logits_cross_entropy(logits, torch.zeros(0, dtype=torch.long), cw)
        assert loss.item() == 0 and z.item() == 0 and loss.dtype == torch.float32
        loss.backward()
        assert logits.grad is not None and logits.grad.shape == (0, 30)

    model = WorldVLA(ModelConfig.tiny(hidden_size=32, intermediate_size=40, num_attention_heads=2,
                                      num_key_value_heads=2, num_hidden_layers=1)).init_weights(0.3, generator=rng)
    ids, labels = torch.randint(0, 100, (1, 8), generator=rng), torch.full((1, 8), -100)
    model.lm_head.register_forward_hook(lambda module, args, out: out)  # the head now runs as a module
    loss, z = model.loss(ids, labels)
    assert loss.item() == 0 and z.item() == 0


def test_logits_cross_entropy_refuses_what_it_cannot_score(rng):
    """The logits' loss is public (worldvla.ops): an ignored row's -100 or a target past V stopped in torch's gather
    ("index -100 is out of bounds"), targets of another length in a broadcasting error, float targets were truncated
    without a word, integer logits taken, a class weight on another device failed inside torch. Each is refused by
    name; bfloat16 logits are scored in float32, as the docstring says, not in bfloat16."""
    logits, y = torch.randn(5, 20, generator=rng), torch.tensor([1, 2, 3, 4, 5])
    for bad in (-100, -1, 20):
        wrong = y.clone()
        wrong[1] = bad
        with pytest.raises(ValueError, match=r"logits_cross_entropy: targets must lie in \[0, 20\) \(labelled rows "
                                             r"only: leave out the ignored ones"):
            ops.logits_cross_entropy(logits, wrong)
    shapes = ((logits, y[:3]), (logits, y.view(5, 1)), (logits[0], y[:1]), (logits.view(1, 5, 20), y.view(1, 5)))
    for bad_logits, bad_y in shapes:
        with pytest.raises(ValueError, match=r"logits_cross_entropy wants logits \[n, V\] and targets \[n\]"):
            ops.logits_cross_entropy(bad_logits, bad_y)
    with pytest.raises(TypeError, match="logits_cross_entropy: targets must be integer class ids, got torch.float32"):
        ops.logits_cross_entropy(logits, y.float() + 0.5)
    with pytest.raises(TypeError, match="logits_cross_entropy: logits must be a floating-point tensor"):
        ops.logits_cross_entropy(logits.long(), y)
    with pytest.raises(ValueError, match="logits_cross_entropy: class_weight is on meta but logits is on cpu"):
        ops.logits_cross_entropy(logits, y, torch.ones(20, device="meta"))
    with pytest.raises(TypeError, match="logits_cross_entropy: z_weight must be a finite number"):
        ops.logits_cross_entropy(logits, y, z_weight="1e-5")
    half = logits.bfloat16()
    loss, z = ops.logits_cross_entropy(half, y)
    want = ops.logits_cross_entropy(half.float(), y)
    assert loss.dtype == torch.float32 and torch.equal(loss, want[0]) and torch.equal(z, want[1])



@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_negative_or_non_finite_class_weights_on_the_cpu_are_refused(lce_inputs, backend):
    """Negative class weights were taken: a weight sum <= 0 skipped the mean's division, so the loss rewarded the
    rows' CE (-4x the unweighted loss for weights of -1 on every target). CPU weights are read where the targets
    are (the reference, which "auto" takes on the CPU, and the logits' loss), where that is free; weights >= 0
    (integers too) give the weighted mean as before."""
    h, w = lce_inputs
    y = torch.arange(9)
    for value, shown in ((-1.0, "-1.0"), (float("nan"), "nan"), (float("inf"), "inf")):
        cw = torch.ones(300)
        cw[[4, 7, 200]] = value
        fragment = (rf"class_weight must hold finite weights >= 0 \(0 leaves a class out of the loss, 1 weighs it as "
                    rf"usual\), got {shown} for class 4 and 2 more")
        with pytest.raises(ValueError, match="linear_cross_entropy: " + fragment):
            ops.linear_cross_entropy(h, w, y, cw, backend=backend)
        with pytest.raises(ValueError, match="logits_cross_entropy: " + fragment):
            ops.logits_cross_entropy(h @ w.t(), y, cw)
    cw = torch.rand(300, generator=torch.Generator().manual_seed(0))
    cw[3] = 0.0
    logits = h @ w.t()
    z = torch.logsumexp(logits, -1).square().mean()
    want = torch.nn.functional.cross_entropy(logits, y, weight=cw) + 1e-5 * z
    torch.testing.assert_close(ops.linear_cross_entropy(h, w, y, cw, 1e-5, backend=backend)[0], want)
    ints = (cw * 4).long()
    torch.testing.assert_close(ops.logits_cross_entropy(logits, y, ints)[0],
                               torch.nn.functional.cross_entropy(logits, y, weight=ints.float()) + 1e-5 * z)


def test_the_models_loss_refuses_negative_class_weights_given_on_the_cpu():
    """`WorldVLA.loss` hands a class_weight given to it to the ops, which refuse negative CPU weights; the weights it
    builds itself (`loss_class_weights`) refuse a negative image weight there, on the CPU."""
    from worldvla.model import ModelConfig, WorldVLA

    model = WorldVLA(ModelConfig.tiny(hidden_size=32, intermediate_size=40, num_attention_heads=2,
                                      num_key_value_heads=2, num_hidden_layers=1))
    ids = torch.randint(0, 100, (1, 8), generator=torch.Generator().manual_seed(2))
    cw = torch.ones(model.config.vocab_size)
    cw[ids[0, 1:]] = -1.0
    with pytest.raises(ValueError, match=r"linear_cross_entropy: class_weight must hold finite weights >= 0"):
        model.loss(ids, ids, class_weight=cw)
    with pytest.raises(ValueError, match=r"the image-code loss weight must be a finite number >= 0"):
        model.loss(ids, ids, image_weight=-0.5)
    cw[ids[0, 1:]] = 2.0
    torch.testing.assert_close(model.loss(ids, ids, class_weight=cw)[0], model.loss(ids, ids, class_weight=cw / 2)[0])


def test_the_cpu_vendor_is_read_as_the_auto_order_names_it(monkeypatch, tmp_path):
    """`cpu_vendor` names Intel and AMD as CPU_NATIVE_FIRST's keys do ("intel", "amd"): any other spelling
    would give an AMD CPU the vendor-less order, without the native linear measured faster there."""
    import builtins

    for vendor_id, want in (("GenuineIntel", "intel"), ("AuthenticAMD", "amd"), ("HygonGenuine", "hygongenuine"),
                            ("", None)):
        info = tmp_path / f"cpuinfo-{vendor_id}"
        info.write_text(f"processor\t: 0\nvendor_id\t: {vendor_id}\ncpu family\t: 25\n")
        monkeypatch.setattr(dispatch, "open", lambda path, *a, info=info: builtins.open(info, *a), raising=False)
        assert dispatch.cpu_vendor() == want, vendor_id
    assert ("AVX2", "amd") in dispatch.CPU_NATIVE_FIRST and ("AVX512", "amd") in dispatch.CPU_NATIVE_FIRST

    def missing(path, *a):
        raise FileNotFoundError(path)
    monkeypatch.setattr(dispatch, "open", missing, raising=False)
    assert dispatch.cpu_vendor() is None


def test_bfloat16_is_cast_as_torch_casts_it_under_float16_autocast(rng):
    """Under CPU float16 autocast torch's F.linear takes a bfloat16 input beside an fp32 weight as two float16
    tensors; the entry point casts bfloat16 too (not only fp32 and fp16), so it gives that result instead of
    refusing the pair as dtypes autocast does not make one."""
    x = torch.randn(5, 32, generator=rng).bfloat16()
    w = torch.randn(24, 32, generator=rng)
    with torch.autocast("cpu", dtype=torch.float16):
        want = torch.nn.functional.linear(x, w)
        assert want.dtype == torch.float16
        assert [t.dtype for t in dispatch.autocast_floats("cpu", x, w, w.double())] == \
            [torch.float16, torch.float16, torch.float64]
        for backend in ("auto", "torch"):
            got = ops.linear(x, w, backend=backend)
            assert got.dtype == torch.float16, backend
            torch.testing.assert_close(got, want)


def test_a_generator_is_a_torch_generator_not_anything_with_a_manual_seed(rng):
    """The `torch.random` module (or `torch` itself) has a manual_seed but draws nothing as a generator: it is
    refused by name at every temperature, not taken at 0 and failed on deep inside the draw at 1."""
    h, w = torch.randn(3, 16, generator=rng), torch.randn(40, 16, generator=rng)
    for temperature in (0.0, 1.0):
        for bad in (torch.random, torch):
            with pytest.raises(TypeError, match="generator must be a torch.Generator .*, got module"):
                ops.constrained_sample(h, w, 8, 30, temperature=temperature, generator=bad)
    assert ops.constrained_sample(h, w, 8, 30, temperature=1.0, generator=torch.Generator().manual_seed(0)).shape == (3,)


def test_a_fake_tensors_values_are_not_readable_after_its_mode_has_ended():
    """A fake tensor kept past its FakeTensorMode (export's inputs) holds no values: the entry points must not read
    them, though no fake mode is active any more."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        fake = torch.zeros(3, dtype=torch.long)
        assert not dispatch.values_readable(fake)
    assert not dispatch.values_readable(fake)
    assert dispatch.values_readable(torch.zeros(3, dtype=torch.long))


def _lse_rows(logits, targets):
    """(CE, logsumexp) of each row, by a Python loop over the row's values, in float64."""
    ce, lse = [], []
    for row, t in zip(logits.double().tolist(), targets.tolist()):
        top = max(row)
        s = top + math.log(sum(math.exp(v - top) for v in row))
        lse.append(s)
        ce.append(s - row[t])
    return ce, lse


def test_the_z_loss_mean_comes_back_as_a_value_beside_the_loss_that_carries_the_gradient(lce_inputs):
    """The second result is the z-loss mean for logging: mean(logsumexp^2) over the labelled rows, without a graph
    (labelled rows or none), while the loss carries the gradients; for the logits' loss as for the reference."""
    h, w = lce_inputs
    hp, wp = h.clone().requires_grad_(), w.clone().requires_grad_()
    y = torch.arange(9) * 31 % 300
    y[[2, 6]] = -100
    keep = y != -100
    ce, lse = _lse_rows(h[keep] @ w.t(), y[keep])
    want_z = sum(s * s for s in lse) / len(lse)
    want_loss = sum(ce) / len(ce) + 1e-3 * want_z
    logits = hp[keep] @ wp.t()
    for loss, z in (ops.linear_cross_entropy(hp, wp, y, z_weight=1e-3, backend="torch"),
                    ops.logits_cross_entropy(logits, y[keep], z_weight=1e-3),
                    ops.linear_cross_entropy(hp, wp, torch.full((9,), -100), backend="torch"),
                    ops.logits_cross_entropy(logits[:0], y[:0])):
        assert loss.requires_grad and not z.requires_grad and z.grad_fn is None
        if loss.item() != 0:
            assert math.isclose(z.item(), want_z, rel_tol=1e-5) and math.isclose(loss.item(), want_loss, rel_tol=1e-5)


@pytest.mark.parametrize("bad", [[4], [4, 7]], ids=["one", "two"])
def test_a_refused_class_weight_names_the_first_and_counts_the_others(lce_inputs, bad):
    """The refusal names the first bad class and how many more there are: none for one bad weight (no "and 0
    more"), "and 1 more" for two."""
    h, w = lce_inputs
    cw = torch.ones(300)
    cw[bad] = -1.0
    more = "" if len(bad) == 1 else " and 1 more"
    for call in (lambda: ops.linear_cross_entropy(h, w, torch.arange(9), cw, backend="torch"),
                 lambda: ops.logits_cross_entropy(h @ w.t(), torch.arange(9), cw)):
        with pytest.raises(ValueError, match=rf"got -1\.0 for class 4{more}; the loss is the targets' CE"):
            call()


def test_logits_cross_entropy_keeps_float64_and_scores_half_precision_in_float32(rng):
    """float64 logits give a float64 loss and z-loss mean (the formula, to float64 precision), bfloat16 and float16
    ones float32 results, with labelled rows and with none."""
    logits = torch.randn(5, 30, generator=rng, dtype=torch.float64) * 3
    y = torch.tensor([0, 29, 7, 7, 12])
    ce, lse = _lse_rows(logits, y)
    loss, z = ops.logits_cross_entropy(logits, y, z_weight=0.25)
    want_z = sum(s * s for s in lse) / 5
    assert loss.dtype == z.dtype == torch.float64
    assert abs(z.item() - want_z) <= 1e-12 * want_z
    assert abs(loss.item() - (sum(ce) / 5 + 0.25 * want_z)) <= 1e-12 * loss.item()
    for dtype, rows in ((torch.float64, 0), (torch.bfloat16, 5), (torch.bfloat16, 0), (torch.float16, 0)):
        loss, z = ops.logits_cross_entropy(logits[:rows].to(dtype), y[:rows])
        want = torch.float64 if dtype == torch.float64 else torch.float32
        assert loss.dtype == z.dtype == want, (dtype, rows)


def test_vq_quantize_reference_gives_int64_nearest_codes_in_float64_too(rng):
    """The reference's codes are int64, the nearest code by squared distance (a loop over the codes here), for
    float32 inputs and for float64 ones, also beside a float32 codebook (cast to the latents' float64)."""
    z = torch.randn(7, 5, generator=rng, dtype=torch.float64)
    codebook = torch.randn(11, 5, generator=rng, dtype=torch.float64)
    want = [min(range(11), key=lambda c: float(((row - codebook[c]) ** 2).sum())) for row in z]
    for zz, cb in ((z, codebook), (z, codebook.float()), (z.float(), codebook.float())):
        for backend in ("torch", "auto"):
            got = ops.vq_quantize(zz, cb, backend=backend)
            assert got.dtype == torch.int64 and got.tolist() == want, (zz.dtype, cb.dtype, backend)
        got = ops.vq_quantize_ref(zz, cb)
        assert got.dtype == torch.int64 and got.tolist() == want, (zz.dtype, cb.dtype)


def test_linear_takes_a_single_vector(rng):
    """x [K] is a vector of the [..., K] that linear takes: it gives the N dot products with the weight's rows."""
    x, w = torch.randn(12, generator=rng), torch.randn(5, 12, generator=rng)
    want = torch.tensor([sum(a * b for a, b in zip(x.tolist(), row)) for row in w.tolist()])
    for backend in ("auto", "torch"):
        got = ops.linear(x, w, backend=backend)
        assert got.shape == (5,), backend
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@_needs_native
def test_without_native_prefill_auto_keeps_the_native_layer_up_to_the_row_limit(rng, monkeypatch):
    """With NATIVE_PREFILL off, a cached forward of exactly NATIVE_MAX_ROWS rows (2 sequences of 32) is still a
    decode step and takes the native layer under `auto`; one more row per sequence is a prefill and keeps the
    modules."""
    from test_native_decoder import _model, _step

    from worldvla.model import ForwardContext
    from worldvla.ops import decoder as decoder_op
    from worldvla.ops import native_backend as nb
    from worldvla.ops.projection import NATIVE_MAX_ROWS

    monkeypatch.setitem(dispatch.AUTO_ORDER, ("decoder_layer", "cpu"), ("native", "torch"))
    monkeypatch.setattr(decoder_op, "NATIVE_PREFILL", False)
    model = _model(rng)
    Q = NATIVE_MAX_ROWS // 2
    for Q, want in ((Q, nb._dispatched_decoder_layer), (Q + 1, ops.decoder_layer_ref)):
        x, pos, meta, cache = _step(rng, model.config, 2, Q, S=2 * Q + 10)
        ctx = ForwardContext(cache=cache, position_ids=pos, decode_meta=meta)
        with torch.no_grad():
            assert ops.resolve_decoder_layer(model.model.layers, x, ctx) is want, Q


def test_every_auto_order_closes_with_torch():
    """torch, the reference, closes every order `auto` walks, for every CPU measured and any other (what `worldvla
    info` lists per op), so that an op falls back to it whatever the faster backends refuse."""
    for cap in ("AVX2", "AVX512", "DEFAULT", "NO AVX"):
        for vendor in ("intel", "amd", None, "hygongenuine"):
            for key, order in dispatch._auto_order(cap, vendor).items():
                assert order[-1] == "torch" and order.count("torch") == 1, (cap, vendor, key, order)
    assert all(order[-1] == "torch" for order in dispatch.AUTO_ORDER.values())


def test_the_first_input_of_another_dtype_is_the_one_named(rng):
    """Of several inputs in dtypes other than the first's, the refusal names the first of them (k beside q, before
    v), as it names the first of several inputs on another device."""
    q, k, v, meta, decode = _attention_inputs(rng)
    with pytest.raises(TypeError, match=r"masked_attention: k is torch.float16 but q is torch.float32; convert"):
        ops.masked_attention(q, k.half(), v.bfloat16(), meta, backend="torch")
    with pytest.raises(TypeError, match=r"decode_attention: k_cache is torch.bfloat16 but q is torch.float32; convert"):
        ops.decode_attention(q[:, -3:], k.bfloat16(), v.double(), decode, backend="torch")
    with pytest.raises(TypeError, match=r"op: b is torch.float64 but a is torch.float32; convert"):
        dispatch.check_floats("op", a=q, b=q.double(), c=q.half())


def test_devices_are_compared_past_an_absent_tensor():
    """check_devices skips an input given as None and goes on comparing the ones after it, against the first
    tensor given (a None first is no device to compare with)."""
    cpu, meta = torch.zeros(2), torch.zeros(2, device="meta")
    with pytest.raises(ValueError, match=r"op: c is on meta but b is on cpu; move it to cpu"):
        dispatch.check_devices("op", a=None, b=cpu, c=meta)
    with pytest.raises(ValueError, match=r"op: d is on meta but a is on cpu; move it to cpu"):
        dispatch.check_devices("op", a=cpu, b=None, c=cpu, d=meta)
    dispatch.check_devices("op", a=None, b=meta, c=None, d=meta)


def _weighted_loss(logits, targets, class_weight, z_weight):
    """sum_i w[y_i] CE_i / sum_i w[y_i] + z_weight * mean_i lse_i^2, by a Python loop over the rows, in float64."""
    ce, lse = _lse_rows(logits, targets)
    w = [float(class_weight[t]) for t in targets.tolist()]
    z = sum(s * s for s in lse) / len(lse)
    return sum(a * b for a, b in zip(w, ce)) / sum(w) + z_weight * z


@pytest.mark.parametrize("scale", [1e-3, 0.1, 7.0])
def test_class_weights_give_the_weighted_mean_whatever_their_sum(lce_inputs, scale):
    """The weighted CE is sum w[y] CE / sum w[y] whether the labelled rows' weights sum to less than 1 (small
    weights), about 1 or more: the scale of the weights does not change the loss, an ignored row at either end of
    the batch neither adds its CE nor its weight, for the reference, `auto` and the logits' loss."""
    h, w = lce_inputs
    y = torch.arange(9) * 37 % 300
    y[[0, 8]] = -100  # ignored at the first and the last position
    cw = torch.rand(300, generator=torch.Generator().manual_seed(1)) + 0.5
    keep = y != -100
    want = _weighted_loss(h[keep] @ w.t(), y[keep], cw, 1e-3)
    for loss in (ops.linear_cross_entropy(h, w, y, cw * scale, 1e-3, backend="torch")[0],
                 ops.linear_cross_entropy(h, w, y, cw * scale, 1e-3, backend="auto")[0],
                 ops.logits_cross_entropy(h[keep] @ w.t(), y[keep], cw * scale, 1e-3)[0]):
        assert math.isclose(loss.item(), want, rel_tol=1e-5), (scale, loss.item(), want)


def test_float64_class_weights_are_read_in_float64_with_float64_inputs(rng):
    """With float64 inputs the loss is float64 to float64 precision, class weights included: weights that float32
    would round (1/3, 1 + 1e-9) are taken as they are, not cast to float32 first."""
    logits = torch.randn(6, 12, generator=rng, dtype=torch.float64) * 2
    h, w = torch.randn(6, 5, generator=rng, dtype=torch.float64), torch.randn(12, 5, generator=rng, dtype=torch.float64)
    y = torch.tensor([0, 11, 3, 3, 7, 1])
    cw = torch.full((12,), 1.0 / 3, dtype=torch.float64)
    cw[[3, 7]] = 1.0 + 1e-9
    cw[0] = 1e-7 + 1e-15
    for loss, want in ((ops.logits_cross_entropy(logits, y, cw, 0.5)[0], _weighted_loss(logits, y, cw, 0.5)),
                       (ops.linear_cross_entropy(h, w, y, cw, 0.5, backend="torch")[0],
                        _weighted_loss(h @ w.t(), y, cw, 0.5))):
        assert loss.dtype == torch.float64
        assert abs(loss.item() - want) <= 1e-13 * abs(want), (loss.item(), want)


def test_a_target_out_of_range_is_refused_naming_the_ignore_index_given(lce_inputs):
    """The refusal of a target out of range names the ignored label the caller gave (-1 here), not the default -100;
    targets equal to that label are ignored, -100 then being out of range."""
    h, w = lce_inputs
    y = torch.arange(9)
    y[[0, 8]] = -1
    loss = ops.linear_cross_entropy(h, w, y, ignore_index=-1, backend="torch")[0]
    keep = y != -1
    assert math.isclose(loss.item(), _weighted_loss(h[keep] @ w.t(), y[keep], torch.ones(300), 1e-5), rel_tol=1e-5)
    for backend in ("auto", "torch"):
        for value in (-100, 300):
            bad = y.clone()
            bad[4] = value
            with pytest.raises(ValueError, match=r"linear_cross_entropy: targets must be -1 \(ignored\) or lie in "
                                                 r"\[0, 300\); got values outside"):
                ops.linear_cross_entropy(h, w, bad, ignore_index=-1, backend=backend)


def test_registering_an_unknown_backend_is_refused_and_registers_nothing(monkeypatch):
    """A backend registers under one of BACKENDS only: a device-like or misspelt name ("cuda", "Triton") is refused
    naming the valid ones, and leaves the op unregistered (an implementation `resolve` could never pick)."""
    monkeypatch.setattr(dispatch, "_IMPLS", dict(dispatch._IMPLS))
    for name in ("cuda", "Triton", "auto"):
        with pytest.raises(ValueError, match=rf"unknown backend '{name}'; expected one of \('torch', 'triton', "
                                             r"'native'\)"):
            dispatch.register("an_op", name, lambda: None)
    assert "an_op" not in dispatch._IMPLS
    dispatch.register("an_op", "torch", lambda: None)
    assert dispatch.available("an_op") == ["torch"]


def test_meta_tensors_values_are_not_read(rng):
    """A meta tensor holds no values: `values_readable` says so, and the logits' loss of meta inputs (shape
    propagation, as a model's init on the meta device runs it) gives a meta loss without reading its targets."""
    assert not dispatch.values_readable(torch.zeros(3, dtype=torch.long, device="meta"))
    logits = torch.empty(4, 20, device="meta")
    y = torch.empty(4, dtype=torch.long, device="meta")
    for cw in (None, torch.empty(20, device="meta")):
        loss, z = ops.logits_cross_entropy(logits, y, cw)
        assert loss.device.type == z.device.type == "meta" and loss.shape == z.shape == ()
