"""The Triton backend's ops as torch custom ops (`worldvla_triton::*`): opcheck, fake tensors,
torch.compile with fullgraph and gradients, and forward paths free of host synchronization.

On machines without CUDA the kernels run in Triton's interpreter (conftest), so shapes are tiny.
"""
import pytest
import torch

triton = pytest.importorskip("triton")

from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402

from worldvla import VocabLayout, chunk_mask_meta  # noqa: E402
from worldvla import ops  # noqa: E402
from worldvla.mask import NO_BLOCK, DecodeMeta  # noqa: E402
from worldvla.tokens import image_tokens  # noqa: E402

from worldvla.kernels import linear_ce as KL  # noqa: E402
from worldvla.ops import triton_backend as TB  # noqa: E402

from test_triton_attention import (FP32_FLOOR_EPS, assert_close_rule, fa2_backward_same_precision,  # noqa: E402
                                   torch_same_precision)  # (tests/ is on sys.path)

DEV = "cuda" if torch.cuda.is_available() else "cpu"
LAYOUT = VocabLayout.compact()
LIB = torch.ops.worldvla_triton


def action_ids(g, n_text=2, chunk=3, dims=3):
    """BOS, text, a 2x2-code image, then `chunk` action blocks: the last blocks may not see earlier ones."""
    img = image_tokens(torch.randint(0, LAYOUT.n_image_codes, (2, 2), generator=g), LAYOUT)
    bins = lambda: LAYOUT.bin_base + torch.randint(0, LAYOUT.n_bins, (dims,), generator=g)  # noqa: E731
    blocks = [torch.cat([torch.tensor([LAYOUT.boa]), bins(), torch.tensor([LAYOUT.eoa])]) for _ in range(chunk)]
    return torch.cat([torch.tensor([LAYOUT.bos]), LAYOUT.text_base + torch.randint(0, 256, (n_text,), generator=g), img]
                     + blocks)


def attention_inputs(g, packed=False, H=4, Hkv=2, D=16):
    if packed:
        ids = torch.cat([action_ids(g), action_ids(g, n_text=5, chunk=2)])
        cu = torch.tensor([0, ids.numel() - 20, ids.numel()], dtype=torch.int32)
        meta = chunk_mask_meta(ids, LAYOUT, cu_seqlens=cu).to(DEV)
        lead = (ids.numel(),)
    else:
        ids = action_ids(g).unsqueeze(0)
        meta = chunk_mask_meta(ids, LAYOUT).to(DEV)
        lead = tuple(ids.shape)
    assert bool((meta.q_limit >= 0).any()), "the sample must exercise the action-block rule"
    q = torch.randn(*lead, H, D, generator=g).to(DEV)
    k = torch.randn(*lead, Hkv, D, generator=g).to(DEV)
    v = torch.randn(*lead, Hkv, D, generator=g).to(DEV)
    return q, k, v, meta


def ce_inputs(g, n=40, hidden=24, frac_ignored=0.4):
    h = torch.randn(n, hidden, generator=g)
    w = torch.randn(LAYOUT.vocab_size, hidden, generator=g) * 0.2
    y = torch.randint(0, LAYOUT.vocab_size, (n,), generator=g)
    y[torch.rand(n, generator=g) < frac_ignored] = -100
    cw = torch.ones(LAYOUT.vocab_size)
    cw[LAYOUT.image_code_weight_mask()] = 0.04
    cw[LAYOUT.bin_base:LAYOUT.bin_base + 64] = 2.5
    return h.to(DEV), w.to(DEV), y.to(DEV), cw.to(DEV)


def ce_ref64(hidden, weight, targets, class_weight, z_weight, ignore_index=-100):
    valid = targets != ignore_index
    logits = hidden.double()[valid] @ weight.double().t()
    y = targets[valid]
    lse = torch.logsumexp(logits, -1)
    ce = lse - logits.gather(1, y.unsqueeze(1)).squeeze(1)
    w = class_weight.double()[y]
    return (w * ce).sum() / w.sum() + z_weight * (lse * lse).mean()


def ce_same_precision(h, w, y, cw, z_weight, grad_scale=1.0):
    """torch's float32 loss and gradients (the baseline of the 2x rule): (loss, grad_hidden, grad_weight)."""
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss = ops.linear_cross_entropy_ref(hh, ww, y, cw, z_weight)[0]
    (grad_scale * loss).backward()
    return loss.detach(), hh.grad, ww.grad


def decode_inputs(g, D=16, H=4, Hkv=2, S=32):
    ids = action_ids(g)
    n = ids.numel()
    full = chunk_mask_meta(ids, LAYOUT)
    pos = torch.tensor([[n - 5, n - 1]])
    kv_block = torch.full((1, S), NO_BLOCK, dtype=torch.int32)
    kv_block[0, :n] = full.kv_block
    meta = [pos.int(), full.q_limit[pos[0]].unsqueeze(0).int(), kv_block, torch.tensor([n], dtype=torch.int32)]
    q = torch.randn(1, 2, H, D, generator=g)
    kc = torch.randn(1, S, Hkv, D, generator=g)
    vc = torch.randn(1, S, Hkv, D, generator=g)
    return [t.to(DEV) for t in (q, kc, vc)], DecodeMeta(*(t.to(DEV) for t in meta))


# --------------------------------------------------------------------------- opcheck
def test_opcheck_attention(rng):
    q, k, v, meta = attention_inputs(rng)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    args = (q, k, v, meta.kv_block, meta.q_limit, None, meta.max_seqlen, 0.3)
    torch.library.opcheck(LIB.masked_attention, args)
    out, lse2 = LIB.masked_attention(*(a.detach() if isinstance(a, torch.Tensor) else a for a in args))
    do = torch.randn(out.shape, generator=rng).to(DEV)
    torch.library.opcheck(LIB.masked_attention_backward,
                          (do, q.detach(), k.detach(), v.detach(), out, lse2, meta.kv_block, meta.q_limit, None,
                           meta.max_seqlen, 0.3))


def test_opcheck_attention_packed(rng):
    q, k, v, meta = attention_inputs(rng, packed=True)
    args = (q.requires_grad_(), k, v.requires_grad_(), meta.kv_block, meta.q_limit, meta.cu_seqlens, meta.max_seqlen,
            0.25)
    torch.library.opcheck(LIB.masked_attention, args, test_utils=("test_schema", "test_faketensor",
                                                                  "test_autograd_registration"))


def test_opcheck_decode(rng):
    (q, kc, vc), meta = decode_inputs(rng)
    torch.library.opcheck(LIB.decode_attention, (q, kc, vc, meta.q_pos, meta.q_limit, meta.kv_block, meta.kv_len,
                                                 0.25, 2))


@pytest.mark.parametrize("weighted", [False, True])
def test_opcheck_linear_ce(rng, weighted):
    h, w, y, cw = ce_inputs(rng)
    args = (h.requires_grad_(), w.requires_grad_(), y, cw if weighted else None, 1e-3, -100, True, True, 16)
    torch.library.opcheck(LIB.linear_cross_entropy, args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck_linear_ce_without_gradients(rng, dtype):
    """Gradients not asked for come back as empty fp32 tensors, as the fake implementation says, in any input
    dtype (a compiled graph traced with the fake's dtypes)."""
    h, w, y, cw = ce_inputs(rng)
    h, w = h.to(dtype), w.to(dtype)
    for need in ((False, False), (True, False), (False, True)):
        args = (h, w, y, cw, 1e-3, -100, *need, 16)
        torch.library.opcheck(LIB.linear_cross_entropy, args, test_utils=("test_schema", "test_faketensor"))
        _, _, gh, gw = LIB.linear_cross_entropy(*args)
        assert gh.dtype == gw.dtype == torch.float32
        assert gh.shape == (h.shape if need[0] else (0,)) and gw.shape == (w.shape if need[1] else (0,))


def test_opcheck_vq_and_sampling(rng):
    z = torch.randn(37, 8, generator=rng).to(DEV)
    codebook = torch.randn(70, 8, generator=rng).to(DEV)
    torch.library.opcheck(LIB.vq_quantize, (z, codebook))
    idx = torch.randint(0, 70, (2, 3, 5), generator=rng).to(DEV)
    torch.library.opcheck(LIB.vq_gather, (idx, codebook.clone().requires_grad_()))
    hid = torch.randn(5, 24, generator=rng).to(DEV)
    head = torch.randn(300, 24, generator=rng).to(DEV)
    torch.library.opcheck(LIB.range_argmax, (hid, head, 40, 230))
    torch.library.opcheck(LIB.range_logits, (hid, head, 40, 230))


# --------------------------------------------------------------------------- fake tensors
def test_fake_shapes(rng):
    q, k, v, meta = attention_inputs(rng)
    qp, kp, vp, mp = attention_inputs(rng, packed=True)
    (dq_, kc, vc), dm = decode_inputs(rng)
    h, w, y, cw = ce_inputs(rng)
    idx = torch.randint(0, 70, (2, 3, 5), generator=rng).to(DEV)
    lse = torch.randn(4, q.shape[1], generator=rng).to(DEV)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        f = lambda *ts: [mode.from_tensor(t) for t in ts]  # noqa: E731
        out, lse2 = LIB.masked_attention(*f(q, k, v, meta.kv_block, meta.q_limit), None, meta.max_seqlen, 0.25)
        assert out.shape == q.shape and out.dtype == q.dtype
        assert lse2.shape == (4, q.shape[1]) and lse2.dtype == torch.float32
        out, lse2 = LIB.masked_attention(*f(qp, kp, vp, mp.kv_block, mp.q_limit, mp.cu_seqlens), mp.max_seqlen, 0.25)
        assert out.shape == qp.shape and lse2.shape == (4, qp.shape[0])
        grads = LIB.masked_attention_backward(*f(q, q, k, v, q, lse, meta.kv_block, meta.q_limit),
                                              None, meta.max_seqlen, 0.25)
        assert [g.shape for g in grads] == [q.shape, k.shape, v.shape]
        o = LIB.decode_attention(*f(dq_, kc, vc, dm.q_pos, dm.q_limit, dm.kv_block, dm.kv_len), 0.25, 0)
        assert o.shape == dq_.shape
        loss, z, gh, gw = LIB.linear_cross_entropy(*f(h, w, y, cw), 1e-5, -100, True, False, 0)
        assert loss.shape == () and z.shape == () and loss.dtype == torch.float32
        assert gh.shape == h.shape and gw.shape == (0,)
        assert LIB.vq_quantize(*f(h, w)).shape == (h.shape[0],)
        g = LIB.vq_gather(*f(idx, w))
        assert g.shape == (2, w.shape[1], 3, 5) and g.dtype == w.dtype
        assert LIB.range_argmax(*f(h, w), 10, 90).dtype == torch.int64
        assert LIB.range_logits(*f(h, w), 10, 90).shape == (h.shape[0], 80)
        with pytest.raises(ValueError, match="linear_cross_entropy wants"):
            LIB.linear_cross_entropy(*f(h, w, y[1:], cw), 1e-5, -100, False, False, 0)
        with pytest.raises(ValueError, match="meta covers"):
            LIB.masked_attention(*f(q, k, v, meta.kv_block[:, 1:], meta.q_limit[:, 1:]), None, meta.max_seqlen, 0.25)
        with pytest.raises(ValueError, match="need cu_seqlens"):
            LIB.masked_attention(*f(qp, kp, vp, mp.kv_block, mp.q_limit), None, mp.max_seqlen, 0.25)


# --------------------------------------------------------------------------- torch.compile
@pytest.mark.parametrize("packed", [False, True])
def test_compiled_attention_matches_reference(rng, packed):
    torch._dynamo.reset()
    q, k, v, meta = attention_inputs(rng, packed=packed)
    do = torch.randn(q.shape, generator=rng).to(DEV)

    def fn(q, k, v):
        return ops.masked_attention(q, k, v, meta, softmax_scale=0.3, backend="triton")

    xs = [t.clone().requires_grad_() for t in (q, k, v)]
    out = torch.compile(fn, backend="aot_eager", fullgraph=True)(*xs)
    out.backward(do)
    xd = [t.double().requires_grad_() for t in (q, k, v)]
    ref = ops.masked_attention_ref(*xd, meta, softmax_scale=0.3)
    ref.backward(do.double())
    assert_close_rule(out, ref, torch_same_precision(q, k, v, meta, 0.3), "out", floor_eps=FP32_FLOOR_EPS)
    same = fa2_backward_same_precision(q, k, v, meta, do, 0.3)  # the kernels' backward in float32 torch
    for name, a, b, c in zip("qkv", xs, xd, same):
        assert_close_rule(a.grad, b.grad, c, f"d{name}", floor_eps=FP32_FLOOR_EPS)


def test_compiled_linear_ce_matches_reference(rng):
    torch._dynamo.reset()
    h, w, y, cw = ce_inputs(rng)

    def fn(h, w):
        loss, z = ops.linear_cross_entropy(h, w, y, cw, 1e-3, backend="triton")
        return loss, z

    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss, z = torch.compile(fn, backend="aot_eager", fullgraph=True)(hh, ww)
    assert not z.requires_grad
    (2.5 * loss).backward()
    hd, wd = h.double().requires_grad_(), w.double().requires_grad_()
    ref = ce_ref64(hd, wd, y, cw, 1e-3)
    (2.5 * ref).backward()
    same = ce_same_precision(h, w, y, cw, 1e-3, grad_scale=2.5)
    for name, a, b, c in zip(("loss", "grad_hidden", "grad_weight"), (loss, hh.grad, ww.grad), (ref, hd.grad, wd.grad),
                             same):
        assert_close_rule(a, b.detach(), c, name, floor_eps=FP32_FLOOR_EPS)
    assert torch.all(hh.grad[y == -100] == 0)


def test_compiled_head_only_gradient(rng):
    """Frozen hidden states: only the weight gradient is computed and returned."""
    torch._dynamo.reset()
    h, w, y, cw = ce_inputs(rng, n=20)
    ww = w.clone().requires_grad_()
    fn = torch.compile(lambda w: ops.linear_cross_entropy(h, w, y, None, 1e-4, backend="triton")[0],
                       backend="aot_eager", fullgraph=True)
    fn(ww).backward()
    wd = w.double().requires_grad_()
    ce_ref64(h, wd, y, torch.ones_like(cw), 1e-4).backward()
    assert_close_rule(ww.grad, wd.grad, ce_same_precision(h, w, y, None, 1e-4)[2], "grad_weight",
                      floor_eps=FP32_FLOOR_EPS)


# --------------------------------------------------------------------------- no host synchronization
def test_linear_ce_has_no_host_sync(rng, no_host_reads):
    h, w, y, cw = ce_inputs(rng, n=50)
    with no_host_reads():
        loss, z, gh, gw = KL.linear_ce_forward(h, w, y, cw, 1e-3, need_grad_hidden=True, need_grad_weight=True,
                                               chunk_size=16, check_targets=False)
    hd, wd = h.double().requires_grad_(), w.double().requires_grad_()
    ref = ce_ref64(hd, wd, y, cw, 1e-3)
    ref.backward()
    for name, a, b, c in zip(("loss", "grad_hidden", "grad_weight"), (loss, gh, gw), (ref, hd.grad, wd.grad),
                             ce_same_precision(h, w, y, cw, 1e-3)):
        assert_close_rule(a, b.detach(), c, name, floor_eps=FP32_FLOOR_EPS)
    # the guard does catch the row selection that the loss used to do
    with pytest.raises(AssertionError, match="host read|boolean-mask"), no_host_reads():
        h[y != -100]


def test_attention_and_decode_have_no_host_sync(rng, no_host_reads):
    q, k, v, meta = attention_inputs(rng)
    (dq_, kc, vc), dm = decode_inputs(rng)
    with no_host_reads():
        out, lse2 = TB.masked_attention_op(q, k, v, meta.kv_block, meta.q_limit, None, meta.max_seqlen, 0.3)
        TB.masked_attention_backward_op(torch.ones_like(out), q, k, v, out, lse2, meta.kv_block, meta.q_limit, None,
                                        meta.max_seqlen, 0.3)
        TB.decode_attention_op(dq_, kc, vc, dm.q_pos, dm.q_limit, dm.kv_block, dm.kv_len, 0.25, 2)
        TB.range_argmax_op(q[0, :, 0], kc[0, :, 0], 3, 20)


def test_linear_ce_ignored_rows_and_bad_targets(rng):
    """Ignored rows may hold anything (they are zeroed, not selected); a bad target makes the loss NaN
    on the sync-free path and raises where it may read the targets."""
    h, w, y, cw = ce_inputs(rng, n=30)
    h_bad = h.clone()
    h_bad[y == -100] = float("inf")
    hh = h_bad.clone().requires_grad_()
    loss, _ = ops.linear_cross_entropy(hh, w, y, cw, 1e-3, backend="triton")
    loss.backward()
    assert abs(loss.item() - ce_ref64(h, w, y, cw, 1e-3).item()) < 1e-5
    assert torch.isfinite(hh.grad).all() and torch.all(hh.grad[y == -100] == 0)
    y_bad = y.clone()
    y_bad[int((y != -100).int().argmax())] = LAYOUT.vocab_size + 3
    loss, _, _, _ = KL.linear_ce_forward(h, w, y_bad, cw, 1e-3, check_targets=False)
    assert torch.isnan(loss)
    with pytest.raises(ValueError, match="targets must be"):
        ops.linear_cross_entropy(h, w, y_bad, cw, backend="triton")


def test_no_labelled_rows_is_zero(rng):
    h, w, _, cw = ce_inputs(rng, n=9)
    y = torch.full((9,), -100, device=DEV)
    hh = h.clone().requires_grad_()
    loss, z = ops.linear_cross_entropy(hh, w, y, cw, backend="triton")
    assert loss.item() == 0.0 and z.item() == 0.0
    loss.backward()
    assert torch.all(hh.grad == 0)


# --------------------------------------------------------------------------- the other ops through dispatch
def test_dispatch_decode_vq_sampling(rng):
    (q, kc, vc), dm = decode_inputs(rng)
    got = ops.decode_attention(q, kc, vc, dm, backend="triton")
    ref = ops.decode_attention_ref(q.double(), kc.double(), vc.double(), dm)
    assert_close_rule(got, ref, ops.decode_attention_ref(q, kc, vc, dm, upcast=False), "decode",
                      floor_eps=FP32_FLOOR_EPS)
    codebook = torch.randn(70, 8, generator=rng).to(DEV)
    z = torch.randn(37, 8, generator=rng).to(DEV)
    codes = ops.vq_quantize(z, codebook, backend="triton")
    assert torch.equal(codes, ops.vq_quantize_ref(z.double(), codebook.double()))
    idx = torch.randint(0, 70, (2, 3, 5), generator=rng).to(DEV)
    cb, cb_ref = codebook.clone().requires_grad_(), codebook.double().requires_grad_()
    out = ops.vq_gather(idx, cb, backend="triton")
    gout = torch.randn(out.shape, generator=rng).to(DEV)
    out.backward(gout)
    ops.vq_gather_ref(idx, cb_ref).backward(gout.double())
    assert torch.equal(out, codebook[idx].permute(0, 3, 1, 2))
    assert (cb.grad.double() - cb_ref.grad).abs().max().item() < 1e-6
    hid = torch.randn(5, 24, generator=rng).to(DEV)
    head = torch.randn(300, 24, generator=rng).to(DEV)
    greedy = ops.constrained_sample(hid, head, 40, 230, backend="triton")
    assert torch.equal(greedy, ops.constrained_sample_ref(hid.double(), head.double(), 40, 230))
    g1, g2 = torch.Generator(DEV).manual_seed(3), torch.Generator(DEV).manual_seed(3)
    drawn = ops.constrained_sample(hid, head, 40, 230, temperature=0.7, top_k=20, generator=g1, backend="triton")
    assert torch.equal(drawn, ops.constrained_sample_ref(hid, head, 40, 230, 0.7, 20, g2))


# --------------------------------------------------------------------------- CUDA: no host sync at all
@pytest.mark.gpu
def test_gpu_linear_ce_and_attention_without_sync():
    g = torch.Generator().manual_seed(0)
    h, w, y, cw = (t.cuda() for t in ce_inputs(g, n=512, hidden=64))
    q, k, v, meta = attention_inputs(g, D=64)
    q, k, v, meta = q.cuda().bfloat16(), k.cuda().bfloat16(), v.cuda().bfloat16(), meta.to("cuda")
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    qq = q.clone().requires_grad_()
    for step in range(2):  # the first call compiles the kernels
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error" if step else "default")
        try:
            loss, _ = ops.linear_cross_entropy(hh, ww, y, cw, 1e-4, backend="triton")
            loss.backward()
            ops.masked_attention(qq, k, v, meta, backend="triton").float().sum().backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(hh.grad).all() and torch.isfinite(qq.grad).all()


def _guarded_op(monkeypatch, current: int):
    """A Triton op wrapped as the dispatch wraps it, with torch.cuda's current device `current` and its device guard
    stood in for: (op, the devices the guard made current, each call's (device, args, kwargs))."""
    entered, seen = [], []

    class Guard:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            entered.append(self.device)

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(torch.cuda, "current_device", lambda: current)
    monkeypatch.setattr(torch.cuda, "device", Guard)
    return TB._on_its_device(lambda x, *a, **k: seen.append((x.device, a, k)) or "out"), entered, seen


def test_triton_ops_run_with_their_tensors_gpu_current(monkeypatch):
    """Triton launches its kernels on the current device: an op on cuda:1 tensors while cuda:0 was current
    launched on cuda:0 (a pointer of another device, or a fault). Every Triton op of the dispatch now makes its
    first tensor's GPU current around the call, and leaves the current device alone where it is already right."""
    from types import SimpleNamespace

    from worldvla.ops import dispatch

    op, entered, seen = _guarded_op(monkeypatch, current=0)
    for dev in ("cuda:1", "cuda:0", "cuda", "cpu"):
        assert op(SimpleNamespace(device=torch.device(dev)), 2, k=3) == "out"
    assert entered == [torch.device("cuda:1")] and len(seen) == 4 and seen[0][1:] == ((2,), {"k": 3})
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)  # traced: the graph guards its device itself
    op(SimpleNamespace(device=torch.device("cuda:1")))
    assert entered == [torch.device("cuda:1")] and len(seen) == 5
    dispatch.registered_ops()  # the backends registered
    wrapped = {name for name, impls in dispatch._IMPLS.items() if "triton" in impls
               and impls["triton"][0].__qualname__.startswith("_on_its_device")}
    assert wrapped == {name for name, impls in dispatch._IMPLS.items() if "triton" in impls} != set()


def test_triton_ops_guard_by_the_current_device_whichever_it_is(monkeypatch):
    """With cuda:1 current, a cuda:1 tensor runs as it is and a cuda:0 one makes cuda:0 current; every call, guarded
    or not, gets its arguments and keywords whole."""
    from types import SimpleNamespace

    op, entered, seen = _guarded_op(monkeypatch, current=1)
    for dev in ("cuda:1", "cuda:0", "cpu"):
        assert op(SimpleNamespace(device=torch.device(dev)), 2, k=3) == "out"
    assert entered == [torch.device("cuda:0")]
    assert seen == [(torch.device(d), (2,), {"k": 3}) for d in ("cuda:1", "cuda:0", "cpu")]


# --------------------------------------------------------------------------- the ops' metadata cache
@pytest.mark.skipif(DEV == "cuda", reason="CUDA metadata's max_seqlen is trusted, not checked (mask.ChunkMaskMeta)")
def test_a_refused_max_seqlen_does_not_stick_to_the_metadata_tensors(rng):
    """The ops cache their metadata per metadata tensors and max_seqlen: a max_seqlen shorter than a document is
    refused whatever an earlier call with the same tensors gave, and a refused call leaves nothing that a later
    call with the right max_seqlen takes."""
    q, k, v, meta = attention_inputs(rng, packed=True, H=2, Hkv=1)
    args = (q, k, v, meta.kv_block, meta.q_limit, meta.cu_seqlens)
    with pytest.raises(ValueError, match="meta.max_seqlen=1 is smaller than the longest document"):
        LIB.masked_attention(*args, 1, 0.25)
    out, _ = LIB.masked_attention(*args, meta.max_seqlen, 0.25)
    ref = ops.masked_attention_ref(q.double(), k.double(), v.double(), meta, softmax_scale=0.25)
    assert_close_rule(out, ref, torch_same_precision(q, k, v, meta, 0.25), "out", floor_eps=FP32_FLOOR_EPS)
    with pytest.raises(ValueError, match="meta.max_seqlen=1 is smaller than the longest document"):
        LIB.masked_attention(*args, 1, 0.25)


def _tiny_meta_tensors(n):
    return torch.zeros(n, dtype=torch.int32), torch.full((n,), -1, dtype=torch.int32), torch.tensor([0, n],
                                                                                                    dtype=torch.int32)


def test_the_metadata_cache_keeps_the_most_recently_used_entries(monkeypatch):
    """The ops' metadata cache holds at most _META_CACHE_SIZE entries (each holds its tensors alive) and drops the
    least recently used one: metadata that every layer keeps using stays cached while newer ones come and go."""
    from collections import OrderedDict

    monkeypatch.setattr(TB, "_META_CACHE", OrderedDict())
    size = TB._META_CACHE_SIZE
    hot = _tiny_meta_tensors(3)
    first = TB._chunk_meta(*hot, 3)
    assert TB._chunk_meta(*hot, 3) is first
    others = [_tiny_meta_tensors(4 + i) for i in range(3 * size)]
    for i, t in enumerate(others):
        TB._chunk_meta(*t, 4 + i)
        assert TB._chunk_meta(*hot, 3) is first, i  # used again between each newer one: never dropped
        assert len(TB._META_CACHE) == min(i + 2, size)
    cold = TB._chunk_meta(*others[0], 4)  # dropped long ago: built anew
    assert cold.kv_block is others[0][0] and cold.max_seqlen == 4
    for i in range(1, size):
        TB._chunk_meta(*others[i], 4 + i)
    assert all(e.kv_block is not hot[0] for e in TB._META_CACHE.values())  # `hot`, unused since, went first
    assert len(TB._META_CACHE) == size


def test_fake_attention_matches_the_kernel_on_a_batch_in_bfloat16(rng):
    """The fake implementation's lse2 is fp32 [H, B * L] for a padded batch of several sequences in any input dtype,
    as the kernel's is (a compiled graph is traced with the fake's shapes and dtypes)."""
    ids = torch.stack([action_ids(rng), action_ids(rng)])
    meta = chunk_mask_meta(ids, LAYOUT).to(DEV)
    B, L = ids.shape
    q = torch.randn(B, L, 2, 16, generator=rng).to(DEV, torch.bfloat16)
    k, v = (torch.randn(B, L, 1, 16, generator=rng).to(DEV, torch.bfloat16) for _ in range(2))
    args = (q, k, v, meta.kv_block, meta.q_limit, None, meta.max_seqlen, 0.25)
    torch.library.opcheck(LIB.masked_attention, args, test_utils=("test_schema", "test_faketensor"))
    out, lse2 = LIB.masked_attention(*args)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake_out, fake_lse2 = LIB.masked_attention(*(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a
                                                     for a in args))
    assert (fake_out.shape, fake_out.dtype) == (out.shape, out.dtype) == (q.shape, torch.bfloat16)
    assert (fake_lse2.shape, fake_lse2.dtype) == (lse2.shape, lse2.dtype) == ((2, B * L), torch.float32)


def test_the_attention_ops_lse2_takes_no_gradient(rng):
    """The forward's lse2 is marked non-differentiable: the backward reads no gradient for it, so a loss through
    lse2 must not get a silent zero gradient (it does not require grad), while the output does."""
    q, k, v, meta = attention_inputs(rng, H=2, Hkv=1)
    q.requires_grad_()
    out, lse2 = LIB.masked_attention(q, k, v, meta.kv_block, meta.q_limit, None, meta.max_seqlen, 0.25)
    assert out.requires_grad and not lse2.requires_grad and lse2.grad_fn is None


def test_the_dispatched_ops_hand_the_kernels_the_metadata_max_seqlen_and_scale(rng, monkeypatch):
    """The backend's attention passes the metadata's max_seqlen to the op (0, "unknown", makes the op read
    cu_seqlens on the host: a synchronization per layer on a GPU) and 1/sqrt(head dim) where no scale is given;
    decode passes num_splits 0 ("the kernel's default") where none is given."""
    seen = []
    real_attention, real_decode = TB.masked_attention_op, TB.decode_attention_op
    monkeypatch.setattr(TB, "masked_attention_op", lambda *a: seen.append(a[5:]) or real_attention(*a))
    monkeypatch.setattr(TB, "decode_attention_op", lambda *a: seen.append(a[7:]) or real_decode(*a))
    q, k, v, meta = attention_inputs(rng, packed=True, H=2, Hkv=1)
    assert meta.max_seqlen > 0
    ops.masked_attention(q, k, v, meta, backend="triton")
    cu, max_seqlen, scale = seen.pop()
    assert cu is meta.cu_seqlens and (max_seqlen, scale) == (meta.max_seqlen, 0.25)  # head dim 16
    (dq, kc, vc), dm = decode_inputs(rng)
    ops.decode_attention(dq, kc, vc, dm, softmax_scale=0.5, backend="triton")
    assert seen.pop() == (0.5, 0)


def test_the_linear_ce_ops_gradients_follow_its_need_grad_flags(rng):
    """The op computes (and its backward returns) only the gradients its flags ask for: an input that requires grad
    but was not asked for gets none, the other its gradient."""
    h, w, y, cw = ce_inputs(rng, n=12)
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss, _, gh, gw = LIB.linear_cross_entropy(hh, ww, y, cw, 1e-3, -100, True, False, 0)
    assert gh.shape == h.shape and gw.shape == (0,)
    loss.backward()
    assert ww.grad is None
    hd = h.double().requires_grad_()
    ce_ref64(hd, w, y, cw, 1e-3).backward()
    assert_close_rule(hh.grad, hd.grad, ce_same_precision(h, w, y, cw, 1e-3)[1], "grad_hidden",
                      floor_eps=FP32_FLOOR_EPS)


def test_fake_decode_refuses_heads_that_do_not_group(rng):
    """The decode op's fake implementation refuses q heads that the caches' kv heads do not divide, as the kernel
    does, so a traced graph does not take shapes the kernel refuses."""
    (q, kc, vc), dm = decode_inputs(rng, H=3, Hkv=2)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        f = lambda *ts: [mode.from_tensor(t) for t in ts]  # noqa: E731
        with pytest.raises(ValueError, match="decode_attention wants q"):
            LIB.decode_attention(*f(q, kc, vc, dm.q_pos, dm.q_limit, dm.kv_block, dm.kv_len), 0.25, 0)
        o = LIB.decode_attention(*f(q[:, :, :2], kc, vc, dm.q_pos, dm.q_limit, dm.kv_block, dm.kv_len), 0.25, 0)
        assert o.shape == q[:, :, :2].shape


def test_linear_ce_asks_the_op_for_the_gradients_autograd_will_want(rng, monkeypatch):
    """The backend's linear_cross_entropy asks the op for an input's gradient only where autograd will want it:
    the input requires grad and grad mode is on (under torch.no_grad, an evaluation's loss, it computes none)."""
    seen = []
    real = TB.linear_cross_entropy_op
    monkeypatch.setattr(TB, "linear_cross_entropy_op", lambda *a: seen.append(a[6:]) or real(*a))
    h, w, y, cw = ce_inputs(rng, n=12)
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    with torch.no_grad():
        loss, _ = ops.linear_cross_entropy(hh, ww, y, cw, 1e-3, backend="triton")
    assert seen.pop() == (False, False, 0) and not loss.requires_grad
    loss, _ = ops.linear_cross_entropy(h, ww, y, cw, 1e-3, backend="triton")
    assert seen.pop() == (False, True, 0) and loss.requires_grad



def test_greedy_choice_is_one_op_without_the_ranges_logits(rng, monkeypatch):
    """A greedy choice (temperature 0) is the fused argmax op alone: it does not write the range's fp32 logits
    [N, hi - lo] (a frame's 8,192 codes per row) to take their argmax."""
    hid = torch.randn(5, 24, generator=rng).to(DEV)
    head = torch.randn(300, 24, generator=rng).to(DEV)

    def no_logits(*args):
        raise AssertionError("a greedy choice wrote the range's logits")

    monkeypatch.setattr(TB, "range_logits_op", no_logits)
    greedy = ops.constrained_sample(hid, head, 40, 230, temperature=0.0, backend="triton")
    assert torch.equal(greedy, ops.constrained_sample_ref(hid.double(), head.double(), 40, 230))


def test_triton_takes_head_dims_up_to_its_limits(rng):
    """The Triton attention kernels take head dims up to and including their limits (256 for both), and refuse
    the next one naming it."""
    from worldvla.kernels.attention import MAX_HEAD_DIM
    from worldvla.ops import dispatch

    _, _, _, meta = attention_inputs(rng)
    (_, _, _), dm = decode_inputs(rng)
    lead, S = tuple(meta.kv_block.shape), dm.kv_block.shape[1]
    for D in (MAX_HEAD_DIM, MAX_HEAD_DIM + 1):
        q = torch.zeros(*lead, 2, D, device=DEV)
        assert bool(dispatch.supports("masked_attention", "triton", q, q, q, meta)) == (D == MAX_HEAD_DIM), D
        qd, cache = torch.zeros(1, 2, 2, D, device=DEV), torch.zeros(1, S, 2, D, device=DEV)
        assert bool(dispatch.supports("decode_attention", "triton", qd, cache, cache, dm)) == (D == 256), D
    with pytest.raises(ValueError, match=rf"head dim {MAX_HEAD_DIM + 1} > {MAX_HEAD_DIM}"):
        dispatch.resolve("masked_attention", "triton", DEV, q, q, q, meta)
    with pytest.raises(ValueError, match="head dim 257 > 256"):
        dispatch.resolve("decode_attention", "triton", DEV, qd, cache, cache, dm)
