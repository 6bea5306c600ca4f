"""Triton chunk-masked attention (forward, backward) against a float64 reference.

On machines without CUDA the kernels run in Triton's interpreter (conftest sets
TRITON_INTERPRET=1), so shapes stay small and tiles wide.
"""
import math

import pytest
import torch

triton = pytest.importorskip("triton")

from worldvla import VocabLayout, causal_meta, chunk_mask_meta  # noqa: E402
from worldvla.mask import ChunkMaskMeta  # noqa: E402
from worldvla.ops import masked_attention, masked_attention_ref  # noqa: E402
from worldvla.tokens import image_tokens  # noqa: E402

from worldvla.kernels import attention as K  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
LAYOUT = VocabLayout.compact()
IMG = 3 + 4 * 5 + 1  # tokens of a 4x4-code image
DIMS = 7


# --------------------------------------------------------------------------- realistic sequences
def _image(g, h=4, w=4):
    return image_tokens(torch.randint(0, LAYOUT.n_image_codes, (h, w), generator=g), LAYOUT)


def _block(g, dims=DIMS):
    bins = LAYOUT.bin_base + torch.randint(0, LAYOUT.n_bins, (dims,), generator=g)
    return torch.cat([torch.tensor([LAYOUT.boa]), bins, torch.tensor([LAYOUT.eoa])])


def _text(g, n):
    return LAYOUT.text_base + torch.randint(0, 256, (n,), generator=g)


def action_sample(g, length, n_images=2, chunk=5):
    """BOS, text, history images, SEP, `chunk` action blocks, SEP, padded with text to `length`."""
    fixed = 1 + n_images * IMG + 1 + chunk * (DIMS + 2) + 1
    assert length >= fixed, (length, fixed)
    parts = [torch.tensor([LAYOUT.bos]), _text(g, length - fixed)] + [_image(g) for _ in range(n_images)]
    parts += [torch.tensor([LAYOUT.sep])] + [_block(g) for _ in range(chunk)] + [torch.tensor([LAYOUT.sep])]
    return torch.cat(parts)


def world_sample(g, length):
    """BOS, text, image, one action block, SEP, next image, SEP: plain causal under the chunk rule."""
    fixed = 1 + IMG + DIMS + 2 + 1 + IMG + 1
    parts = [torch.tensor([LAYOUT.bos]), _text(g, length - fixed), _image(g), _block(g),
             torch.tensor([LAYOUT.sep]), _image(g), torch.tensor([LAYOUT.sep])]
    return torch.cat(parts)


def qkv(g, shape_q, n_kv_heads, dtype, scale=1.0):
    *lead, H, D = shape_q
    q = torch.randn(*lead, H, D, generator=g) * scale
    k = torch.randn(*lead, n_kv_heads, D, generator=g) * scale
    v = torch.randn(*lead, n_kv_heads, D, generator=g)
    return [t.to(DEV, dtype) for t in (q, k, v)]


F32_EPS = torch.finfo(torch.float32).eps
FP32_FLOOR_EPS = 4  # float32 results: slack of a few float32 eps of the reference's largest magnitude


def assert_close_rule(out, ref64, same_precision, name="", floor_eps=0.0):
    """Kernel error vs float64 must be at most 2x the error of plain PyTorch at the kernel's precision,
    plus `floor_eps` float32 eps of the reference's largest magnitude (a floor tied to the output's scale)."""
    err = (out.double() - ref64).abs().max().item()
    base = (same_precision.double() - ref64).abs().max().item()
    floor = floor_eps * F32_EPS * (ref64.abs().max().item() if ref64.numel() else 0.0)
    assert not torch.isnan(out).any(), f"{name}: NaN in output"
    assert err <= 2 * base + floor, f"{name}: error {err:.3g} > 2 x torch's {base:.3g} (+{floor:.2g})"


def fp32_floor(dtype):
    return FP32_FLOOR_EPS if dtype == torch.float32 else 0.0


def torch_same_precision(q, k, v, meta, softmax_scale=None):
    """Plain PyTorch at the kernel's precision: fp32 math for fp32, native low-precision math otherwise."""
    return masked_attention_ref(q, k, v, meta, softmax_scale, upcast=False)


def fa2_backward_same_precision(q, k, v, meta, do, softmax_scale=None):
    """The kernels' backward (FlashAttention-2) in plain PyTorch at float32: p = exp2(s * scale * log2(e) - lse2),
    delta = rowsum(dO * O), dS = p * (dO V^T - delta), dQ = scale dS K, dK = scale dS^T Q, dV = p^T dO.

    Autograd's softmax backward subtracts sum_j p_j dP_j, computed from the same rounded dP, so its rounding
    errors in dP cancel against their own weighted mean; FA2's delta comes from O and does not cancel them
    (up to 2.7x autograd's dQ error in test_backward_packed's setting). This is the same computation as the kernels', so
    their gradients are held to 2x its error."""
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    q, k, v, do = (t.float() for t in (q, k, v, do))
    H, Hkv = q.shape[-2], k.shape[-2]
    kk, vv = k.repeat_interleave(H // Hkv, -2), v.repeat_interleave(H // Hkv, -2)
    mask, packed = meta.dense_mask(), q.dim() == 3
    if packed:  # one [T, T] problem
        q, kk, vv, do, mask = q[None], kk[None], vv[None], do[None], mask[None]
    s2 = torch.einsum("blhd,bmhd->bhlm", q, kk) * (scale * K.LOG2E)
    s2 = s2.masked_fill(~mask.unsqueeze(1), float("-inf"))
    lse2 = torch.logsumexp(s2 * K.LN2, -1) / K.LN2
    p = torch.exp2(s2 - lse2.unsqueeze(-1)).nan_to_num(0.0)  # a row with no visible key: zeros
    o = torch.einsum("bhlm,bmhd->blhd", p, vv)
    delta = (do * o).sum(-1).transpose(1, 2)  # [B, H, L]
    ds = p * (torch.einsum("blhd,bmhd->bhlm", do, vv) - delta.unsqueeze(-1))
    dq = torch.einsum("bhlm,bmhd->blhd", ds, kk) * scale
    dk = torch.einsum("bhlm,blhd->bmhd", ds, q) * scale
    dv = torch.einsum("bhlm,blhd->bmhd", p, do)
    dk, dv = (t.unflatten(-2, (Hkv, H // Hkv)).sum(-2) for t in (dk, dv))  # the GQA group's heads
    return [g[0] for g in (dq, dk, dv)] if packed else [dq, dk, dv]


# --------------------------------------------------------------------------- forward
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_forward_padded_gqa(rng, dtype, poison_empty):
    ids = torch.stack([action_sample(rng, 113, chunk=5), world_sample(rng, 113)])
    meta = chunk_mask_meta(ids, LAYOUT).to(DEV)
    q, k, v = qkv(rng, (2, 113, 4, 64), 2, dtype)
    out = K.chunk_attention(q, k, v, meta)
    ref = masked_attention_ref(q.double(), k.double(), v.double(), meta)
    assert out.dtype == dtype and out.shape == q.shape
    assert_close_rule(out, ref, torch_same_precision(q, k, v, meta), f"fwd {dtype}", floor_eps=fp32_floor(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_packed_with_lse(rng, dtype, poison_empty):
    # Documents of 113, 1 and 89 tokens (203 in all); the first has a chunk of one action.
    docs = [action_sample(rng, 113, chunk=1), torch.tensor([LAYOUT.bos]), action_sample(rng, 89, n_images=1, chunk=4)]
    ids = torch.cat(docs)
    cu = torch.tensor([0, 113, 114, 203], dtype=torch.int32)
    meta = chunk_mask_meta(ids, LAYOUT, cu_seqlens=cu).to(DEV)
    assert meta.max_seqlen == 113
    q, k, v = qkv(rng, (203, 2, 128), 1, dtype)
    out, lse = K.chunk_attention_with_lse(q, k, v, meta)
    ref = masked_attention_ref(q.double(), k.double(), v.double(), meta)
    assert_close_rule(out, ref, torch_same_precision(q, k, v, meta), "packed", floor_eps=fp32_floor(dtype))

    # log-sum-exp of the visible scores: float64, and torch's float32 (the kernel's scores are fp32 dots
    # of the inputs' values whatever their dtype)
    def lse_of(x):
        s = torch.einsum("thd,shd->hts", x(q), x(k).repeat_interleave(2, dim=1)) / math.sqrt(128)
        return torch.logsumexp(s.masked_fill(~meta.dense_mask().unsqueeze(0), float("-inf")), -1).t()

    assert lse.shape == (203, 2) and lse.dtype == torch.float32
    assert_close_rule(lse, lse_of(torch.Tensor.double), lse_of(torch.Tensor.float), f"lse {dtype}",
                      floor_eps=FP32_FLOOR_EPS)
    # the one-token document sees only itself
    torch.testing.assert_close(out[113].float(), v[113].float().expand(2, 128), rtol=2 * torch.finfo(dtype).eps, atol=0)


@pytest.mark.parametrize("head_dim", [40, 96])
def test_forward_padded_head_dims(rng, head_dim, poison_empty):
    ids = action_sample(rng, 97, chunk=3).unsqueeze(0)
    meta = chunk_mask_meta(ids, LAYOUT).to(DEV)
    q, k, v = qkv(rng, (1, 97, 2, head_dim), 2, torch.float16)
    out = K.chunk_attention(q, k, v, meta, softmax_scale=0.3)
    ref = masked_attention_ref(q.double(), k.double(), v.double(), meta, softmax_scale=0.3)
    assert_close_rule(out, ref, masked_attention_ref(q, k, v, meta, softmax_scale=0.3, upcast=False), "head dim")


def test_world_sample_is_causal(rng):
    """A chunk mask that equals plain causal reproduces the causal result exactly."""
    ids = world_sample(rng, 131).unsqueeze(0)
    meta = chunk_mask_meta(ids, LAYOUT).to(DEV)
    assert bool((meta.dense_mask() == torch.ones(131, 131, dtype=torch.bool, device=DEV).tril()).all())
    q, k, v = qkv(rng, (1, 131, 2, 64), 2, torch.float32)
    out = K.chunk_attention(q, k, v, meta)
    out_causal = K.chunk_attention(q, k, v, causal_meta((1, 131), device=DEV))
    assert torch.equal(out, out_causal)
    sdpa = [torch.nn.functional.scaled_dot_product_attention(
        q.to(t).transpose(1, 2), k.to(t).transpose(1, 2), v.to(t).transpose(1, 2), is_causal=True).transpose(1, 2)
        for t in (torch.float64, torch.float32)]
    assert_close_rule(out, *sdpa, "causal vs sdpa", floor_eps=FP32_FLOOR_EPS)


def loop_tile_classes(meta, block_m, block_n):
    """Literal per-tile classification with Python loops: 's' skipped, 'f' mask-free, 'p' partial."""
    dense = meta.dense_mask().cpu()
    kvb, ql = meta.kv_block.cpu(), meta.q_limit.cpu()
    n = dense.shape[-1]
    out = {}
    for m0 in range(0, n, block_m):
        for n0 in range(0, n, block_n):
            rows, cols = range(m0, min(n, m0 + block_m)), range(n0, min(n, n0 + block_n))
            if n0 > rows[-1] or max(kvb[j] for j in cols) < min(ql[i] for i in rows):
                out[m0 // block_m, n0 // block_n] = "s"
            elif n0 + block_n - 1 <= m0 and n0 + block_n <= n and min(kvb[j] for j in cols) >= max(ql[i] for i in rows):
                assert bool(dense[m0:m0 + block_m, n0:n0 + block_n].all())  # mask-free really is fully visible
                out[m0 // block_m, n0 // block_n] = "f"
            else:
                out[m0 // block_m, n0 // block_n] = "p"
    return out


def test_tile_classes_all_exercised(rng, poison_empty):
    """16-wide tiles over a long chunk: skipped, mask-free and partial tiles all occur (classified as a
    literal loop does), and forward and backward stay exact."""
    ids = action_sample(rng, 203, n_images=2, chunk=10)
    meta = chunk_mask_meta(ids.unsqueeze(0), LAYOUT).to(DEV)
    plan = K.tile_plan(meta, 16, 16)
    want = loop_tile_classes(chunk_mask_meta(ids, LAYOUT), 16, 16)
    got = {key: "f" if bool(plan.full[0][key]) else "p" if bool(plan.part[0][key]) else "s" for key in want}
    assert got == want
    classes = set(want.values())
    skipped_block = [key for key, c in want.items() if c == "s" and key[1] <= key[0]]
    assert classes == {"s", "f", "p"} and skipped_block, "the sequence must exercise every tile class"
    q, k, v = qkv(rng, (1, 203, 1, 32), 1, torch.float32)
    qs, ks, vs = (t.clone().requires_grad_() for t in (q, k, v))
    out = K.chunk_attention(qs, ks, vs, meta, block_m=16, block_n=16)
    qd, kd, vd = (t.double().requires_grad_() for t in (q, k, v))
    ref = masked_attention_ref(qd, kd, vd, meta)
    assert_close_rule(out, ref, torch_same_precision(q, k, v, meta), "fwd", floor_eps=FP32_FLOOR_EPS)
    do = torch.randn(out.shape, generator=rng).to(DEV)
    out.backward(do)
    ref.backward(do.double())
    same = fa2_backward_same_precision(q, k, v, meta, do)
    for name, got_t, want_t, s in zip("qkv", (qs, ks, vs), (qd, kd, vd), same):
        assert_close_rule(got_t.grad, want_t.grad, s, f"d{name}", floor_eps=FP32_FLOOR_EPS)


def test_tile_plan_follows_in_place_meta_edits(rng):
    """Plans are cached on the metadata; editing it in place must not reuse a stale plan."""
    ids = action_sample(rng, 100, n_images=1, chunk=6).unsqueeze(0)
    meta = chunk_mask_meta(ids, LAYOUT).to(DEV)
    q, k, v = qkv(rng, (1, 100, 1, 64), 1, torch.float32)
    K.chunk_attention(q, k, v, meta, block_m=16, block_n=16)
    meta.q_limit.fill_(-1)  # now plain causal
    out = K.chunk_attention(q, k, v, meta, block_m=16, block_n=16)
    causal = causal_meta((1, 100), device=DEV)
    ref = masked_attention_ref(q.double(), k.double(), v.double(), causal)
    assert_close_rule(out, ref, torch_same_precision(q, k, v, causal), "causal after the edit",
                      floor_eps=FP32_FLOOR_EPS)


def test_inference_mode(rng):
    """Deployment code runs the model under torch.inference_mode: the tile-plan cache read the metadata's
    version counter, which inference tensors lack, and the kernel raised."""
    ids = action_sample(rng, 100, n_images=1, chunk=6).unsqueeze(0)
    q, k, v = qkv(rng, (1, 100, 2, 64), 1, torch.float32)
    ref = masked_attention_ref(q.double(), k.double(), v.double(), chunk_mask_meta(ids, LAYOUT))
    with torch.inference_mode():
        meta = chunk_mask_meta(ids, LAYOUT).to(DEV)
        for _ in range(2):  # no plan kept across calls either
            out = masked_attention(q.to(DEV), k.to(DEV), v.to(DEV), meta, backend="triton")
    assert_close_rule(out, ref, torch_same_precision(q, k, v, chunk_mask_meta(ids, LAYOUT)), "inference mode",
                      floor_eps=FP32_FLOOR_EPS)


def check_fp32_forward_backward(rng, q, k, v, meta, what="", **kernel_kw):
    """fp32 forward and backward of the kernels against the float64 reference, under the tolerance rule (the
    forward's baseline is torch at the same precision, the backward's the kernels' FA2 backward in float32
    torch). Returns the output and the leaves, whose .grad hold the kernels' gradients."""
    xs = [t.clone().requires_grad_() for t in (q, k, v)]
    xd = [t.double().requires_grad_() for t in (q, k, v)]
    out = K.chunk_attention(*xs, meta, **kernel_kw)
    ref = masked_attention_ref(*xd, meta)
    assert_close_rule(out, ref, torch_same_precision(q, k, v, meta), f"fwd{what}", floor_eps=FP32_FLOOR_EPS)
    do = torch.randn(out.shape, generator=rng).to(DEV)
    out.backward(do)
    ref.backward(do.double())
    for name, a, b, same in zip("qkv", xs, xd, fa2_backward_same_precision(q, k, v, meta, do)):
        assert_close_rule(a.grad, b.grad, same, f"d{name}{what}", floor_eps=FP32_FLOOR_EPS)
    return out, xs


def test_rows_without_visible_keys(rng, poison_empty):
    """Arbitrary metadata may hide every key from a row: output and gradients are zero there, never NaN."""
    B, L = 1, 70
    kvb = torch.randint(0, 4, (B, L), generator=rng, dtype=torch.int32)
    ql = torch.randint(-1, 5, (B, L), generator=rng, dtype=torch.int32)
    meta = ChunkMaskMeta(kvb, ql, torch.arange(L).expand(B, L), None, L).to(DEV)
    empty_rows = ~meta.dense_mask()[0].any(-1)
    assert empty_rows.any() and not empty_rows.all()
    q, k, v = qkv(rng, (B, L, 2, 64), 2, torch.float32)
    out, xs = check_fp32_forward_backward(rng, q, k, v, meta)
    assert torch.all(out[0, empty_rows] == 0)
    assert torch.all(xs[0].grad[0, empty_rows] == 0)


# --------------------------------------------------------------------------- backward
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_padded_gqa(rng, dtype, poison_empty):
    ids = torch.stack([action_sample(rng, 113, chunk=1), action_sample(rng, 113, n_images=1, chunk=6)])
    meta = chunk_mask_meta(ids, LAYOUT).to(DEV)
    q, k, v = qkv(rng, (2, 113, 4, 64), 2, dtype)
    do = torch.randn(q.shape, generator=rng).to(DEV, dtype)

    def grads(fn, *xs):
        xs = [x.detach().clone().requires_grad_() for x in xs]
        fn(*xs).backward(do.to(xs[0].dtype))
        return [x.grad for x in xs]

    got = grads(lambda *x: K.chunk_attention(*x, meta), q, k, v)
    ref = grads(lambda *x: masked_attention_ref(*x, meta), q.double(), k.double(), v.double())
    if dtype == torch.float32:  # the kernels' FA2 backward in float32 torch (see fa2_backward_same_precision)
        same = fa2_backward_same_precision(q, k, v, meta, do)
    else:  # torch's bfloat16 math
        same = grads(lambda *x: masked_attention_ref(*x, meta, upcast=False), q, k, v)
    for name, g, r, s in zip("qkv", got, ref, same):
        assert g.dtype == dtype
        assert_close_rule(g, r, s, f"d{name}", floor_eps=fp32_floor(dtype))


def test_backward_packed(rng, poison_empty):
    docs = [world_sample(rng, 77), action_sample(rng, 91, chunk=2), torch.tensor([LAYOUT.bos])]
    cu = torch.tensor([0, 77, 168, 169], dtype=torch.int32)
    meta = chunk_mask_meta(torch.cat(docs), LAYOUT, cu_seqlens=cu).to(DEV)
    q, k, v = qkv(rng, (169, 4, 64), 1, torch.float32)
    xs = [t.clone().requires_grad_() for t in (q, k, v)]
    xd = [t.double().requires_grad_() for t in (q, k, v)]
    do = torch.randn(q.shape, generator=rng).to(DEV)
    K.chunk_attention(*xs, meta).backward(do)
    masked_attention_ref(*xd, meta).backward(do.double())
    # The baseline is the kernels' FA2 backward in float32 torch (see fa2_backward_same_precision): against
    # autograd's backward the kernel's dQ error is up to 2.7x larger here (12 seeds), at most 1.7x FA2's in torch.
    for name, g, r, s in zip("qkv", xs, xd, fa2_backward_same_precision(q, k, v, meta, do)):
        assert_close_rule(g.grad, r.grad, s, f"d{name}", floor_eps=FP32_FLOOR_EPS)


def test_float32_wide_heads(rng, poison_empty):
    """fp32 at head dim 160 (padded to 256, the GPU's 16 x 32 tiles): forward and backward against the
    reference, with the same rule as at the narrower heads."""
    ids = action_sample(rng, 61, n_images=1, chunk=3).unsqueeze(0)
    meta = chunk_mask_meta(ids, LAYOUT).to(DEV)
    q, k, v = qkv(rng, (1, 61, 2, 160), 1, torch.float32)
    check_fp32_forward_backward(rng, q, k, v, meta, " D160")


@pytest.mark.parametrize("packed", [False, True])
def test_backward_strided_head_dim(rng, packed, poison_empty):
    """q, k, v (and dO) whose head dim is not contiguous (views of [..., Dh, H] storage as [..., H, Dh]): the
    forward copies them to a contiguous last dim, and so must the backward, whose kernels assume unit stride
    there; the gradients are those of the same values stored contiguously, on both autograd paths."""
    L, H, Hkv, D = 20, 2, 1, 16
    meta = (causal_meta((L,), cu_seqlens=torch.tensor([0, 12, L], dtype=torch.int32)) if packed
            else causal_meta((1, L))).to(DEV)
    lead = (L,) if packed else (1, L)

    def strided(n_heads):
        return torch.randn(*lead, D, n_heads, generator=rng).to(DEV).transpose(-1, -2)

    q, k, v, do = strided(H), strided(Hkv), strided(Hkv), strided(H)
    assert q.stride(-1) != 1 and do.stride(-1) != 1

    def grads(fn, xs, do):
        xs = [x.detach().clone(memory_format=torch.preserve_format).requires_grad_() for x in xs]
        fn(*xs).backward(do)
        return [x.grad for x in xs]

    for name, fn in (("ops", lambda *x: masked_attention(*x, meta, backend="triton")),
                     ("kernels", lambda *x: K.chunk_attention(*x, meta))):
        got = grads(fn, (q, k, v), do)
        want = grads(fn, [x.contiguous() for x in (q, k, v)], do.contiguous())
        for n, g, w in zip("qkv", got, want):
            torch.testing.assert_close(g, w, rtol=0, atol=0, msg=f"{name}: d{n}")


# --------------------------------------------------------------------------- dispatch and inputs
def test_dispatch_triton_backend(rng):
    ids = action_sample(rng, 64, n_images=1, chunk=2).unsqueeze(0)
    meta = chunk_mask_meta(ids, LAYOUT).to(DEV)
    # q, k, v as views into one fused projection: non-contiguous strides
    qkv_t = torch.randn(1, 64, 3, 2, 64, generator=rng).to(DEV)
    q, k, v = qkv_t.unbind(2)
    out = masked_attention(q, k, v, meta, backend="triton")
    ref = masked_attention_ref(q.double(), k.double(), v.double(), meta)
    assert_close_rule(out, ref, torch_same_precision(q, k, v, meta), "dispatch", floor_eps=FP32_FLOOR_EPS)
    with pytest.raises(ValueError, match="does not support"):
        masked_attention(q.double(), k.double(), v.double(), meta, backend="triton")


def test_auto_leaves_the_triton_kernels_where_they_cannot_launch(rng):
    """Head dims above 256 have no tiles, and sequences x heads beyond 65535 overflow the grid: "auto"
    then takes another backend instead of failing at launch."""
    from worldvla.ops import dispatch

    ids = action_sample(rng, 64, n_images=1, chunk=2).unsqueeze(0)
    meta = chunk_mask_meta(ids, LAYOUT).to(DEV)
    for dtype, d, ok in ((torch.float32, 160, True), (torch.float32, 264, False), (torch.bfloat16, 160, True),
                         (torch.bfloat16, 264, False)):
        q = torch.randn(1, 64, 2, d, generator=rng).to(DEV, dtype)
        assert dispatch.supports("masked_attention", "triton", q, q, q, meta) is ok, (dtype, d)
    many = causal_meta((32768,), cu_seqlens=torch.arange(0, 32769, 2, dtype=torch.int32), device=DEV)
    q = torch.randn(32768, 4, 16, generator=rng).to(DEV)
    assert dispatch.supports("masked_attention", "triton", q, q, q, many) is False  # 16384 documents x 4 heads
    assert dispatch.supports("masked_attention", "triton", q[:, :3], q[:, :3], q[:, :3], many) is True
    with pytest.raises(ValueError, match="split the batch"):  # an explicit backend says why it declines
        dispatch.call("masked_attention", "triton", q.device.type, q, q, q, many)
    q = torch.randn(1, 64, 2, 264, generator=rng).to(DEV)
    with pytest.raises(ValueError, match="head dim 264 > 256"):
        dispatch.call("masked_attention", "triton", q.device.type, q, q, q, meta)


def test_auto_leaves_the_triton_kernels_for_layouts_they_reject(rng, monkeypatch):
    """The kernel takes packed [T, H, Dh] with cu_seqlens and padded [B, L, H, Dh] without: one unbatched
    sequence [T, H, Dh] without cu_seqlens is declined with the reason, so "auto" with Triton first (the
    CUDA order) takes the next backend instead of raising."""
    from worldvla.ops import dispatch

    monkeypatch.setitem(dispatch.AUTO_ORDER, ("masked_attention", DEV), ("triton", "torch"))
    T = 20
    q, k = torch.randn(T, 2, 16, generator=rng).to(DEV), torch.randn(T, 1, 16, generator=rng).to(DEV)
    meta = causal_meta((T,), device=DEV)
    assert dispatch.supports("masked_attention", "triton", q, k, k, meta) is False
    with pytest.raises(ValueError, match="'triton' backend of 'masked_attention' does not support.*cu_seqlens"):
        masked_attention(q, k, k, meta, backend="triton")
    torch.testing.assert_close(masked_attention(q, k, k, meta), masked_attention_ref(q, k, k, meta))
    one_doc = causal_meta((T,), cu_seqlens=torch.tensor([0, T], dtype=torch.int32), device=DEV)
    assert dispatch.supports("masked_attention", "triton", q, k, k, one_doc) is True


@pytest.mark.parametrize("bad", [[0, 113, 300], [-30, 113, 203], [0, 113, 203, 250]])
def test_packed_boundaries_past_the_tokens_stay_inside(rng, bad, poison_empty):
    """On CUDA the kernels do not read cu_seqlens on the host: each document is clamped to the T tokens (in
    the kernels and the tile plan), so boundaries past T or below 0 never reach outside the tensors (here
    the rows past T are NaN) and give what the same boundaries clamped by hand give, forward and backward."""
    ids = torch.cat([action_sample(rng, 113, chunk=2), world_sample(rng, 90)])
    T = ids.numel()
    good = chunk_mask_meta(ids, LAYOUT, cu_seqlens=torch.tensor([0, 113, T], dtype=torch.int32)).to(DEV)
    bad_meta = ChunkMaskMeta(good.kv_block, good.q_limit, good.position_ids,
                             torch.tensor(bad, dtype=torch.int32, device=DEV), 0)
    base = qkv(rng, (T, 2, 32), 1, torch.float32)

    def nan_tailed_leaf(x):  # x in the first T rows of a buffer whose further rows are NaN
        big = torch.full((T + 64, *x.shape[1:]), float("nan"), device=DEV)
        big[:T] = x
        return big[:T].requires_grad_()

    runs = []
    for meta in (good, bad_meta):
        xs = [nan_tailed_leaf(x) for x in base]
        out = K.chunk_attention(*xs, meta)
        out.backward(torch.cos(torch.arange(out.numel(), device=DEV, dtype=torch.float32)).view_as(out))
        runs.append([out.detach()] + [x.grad for x in xs])
    for a, b, name in zip(*runs, ("out", "dq", "dk", "dv")):
        assert torch.isfinite(b).all(), name
        assert torch.equal(a, b), name


def test_bad_inputs_raise(rng):
    meta = causal_meta((1, 20), device=DEV)
    q = torch.randn(1, 20, 3, 64, device=DEV)
    k = torch.randn(1, 20, 2, 64, device=DEV)
    with pytest.raises(ValueError, match="must divide"):
        K.chunk_attention(q, k, k, meta)
    with pytest.raises(ValueError, match="meta covers"):
        K.chunk_attention(q, q, q, causal_meta((1, 21), device=DEV))
    with pytest.raises(ValueError, match="cu_seqlens"):
        K.chunk_attention(q[0], q[0], q[0], causal_meta((20,), device=DEV))
    wide = torch.randn(1, 20, 1, 264, device=DEV)  # no tiles above head dim 256
    with pytest.raises(ValueError, match="head dim 264 is larger than the Triton kernel's 256"):
        K.chunk_attention(wide, wide, wide, meta)


# --------------------------------------------------------------------------- GPU sizes
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_long_sequences(dtype):
    g = torch.Generator().manual_seed(0)
    ids = torch.stack([action_sample(g, 1023, chunk=10), world_sample(g, 1023)])
    meta = chunk_mask_meta(ids, LAYOUT).to("cuda")
    q, k, v = qkv(g, (2, 1023, 8, 128), 2, dtype)
    xs = [t.clone().requires_grad_() for t in (q, k, v)]
    out = K.chunk_attention(*xs, meta)
    do = torch.randn_like(out)
    out.backward(do)
    xd = [t.double().requires_grad_() for t in (q, k, v)]
    ref = masked_attention_ref(*xd, meta)
    ref.backward(do.double())
    xsame = [t.clone().requires_grad_() for t in (q, k, v)]
    same = masked_attention_ref(*xsame, meta, upcast=False)
    same.backward(do)
    assert_close_rule(out, ref, same, "gpu fwd")
    for name, a, b, c in zip("qkv", xs, xd, xsame):
        assert_close_rule(a.grad, b.grad, c.grad, f"gpu d{name}")


def _tile_metas(gen):
    """Metadata whose key tiles start one block below a query tile's limit (a tile whose smallest block is
    b - 1 against queries limited to b must be partial, not mask-free), and random few-block metadata."""
    from worldvla.mask import NO_BLOCK

    kvb = torch.tensor([0] * 16 + [NO_BLOCK] * 4 + [1] * 12, dtype=torch.int32)
    ql = torch.tensor([-1] * 20 + [1] * 12, dtype=torch.int32)
    yield kvb, ql
    for _ in range(12):
        L = int(torch.randint(20, 70, (1,), generator=gen))
        kvb = torch.randint(-1, 3, (L,), generator=gen, dtype=torch.int32).sort().values
        kvb[kvb < 0] = NO_BLOCK
        yield kvb, torch.randint(-1, 4, (L,), generator=gen, dtype=torch.int32).sort().values


def test_tile_classes_match_a_literal_loop_at_block_boundaries(rng, poison_empty):
    """A mask-free test off by one block (a key tile of block b - 1 taken as fully visible to queries limited
    to b) passed the long-chunk test, whose tiles never met that case: the plan equals a literal loop, and
    the output the reference, on metadata built to meet it."""
    for kvb, ql in _tile_metas(rng):
        L = kvb.numel()
        meta = ChunkMaskMeta(kvb.view(1, L), ql.view(1, L), torch.arange(L).view(1, L), None, L).to(DEV)
        plan = K.tile_plan(meta, 16, 16)
        want = loop_tile_classes(ChunkMaskMeta(kvb, ql, torch.arange(L), None, L), 16, 16)
        got = {key: "f" if bool(plan.full[0][key]) else "p" if bool(plan.part[0][key]) else "s" for key in want}
        assert got == want, (kvb.tolist(), ql.tolist())
        q, k, v = qkv(rng, (1, L, 1, 32), 1, torch.float32)
        out = K.chunk_attention(q, k, v, meta, block_m=16, block_n=16)
        ref = masked_attention_ref(q.double(), k.double(), v.double(), meta)
        assert_close_rule(out, ref, torch_same_precision(q, k, v, meta), "fwd", floor_eps=FP32_FLOOR_EPS)


def test_lse_of_a_row_without_visible_keys_is_infinite(rng, poison_empty):
    """chunk_attention_with_lse promises +inf for a row that sees no key (the backward never reads it there)."""
    L = 4
    meta = ChunkMaskMeta(torch.zeros(1, L, dtype=torch.int32), torch.tensor([[-1, -1, -1, 5]], dtype=torch.int32),
                         torch.arange(L).view(1, L), None, L).to(DEV)
    q, k, v = qkv(rng, (1, L, 1, 32), 1, torch.float32)
    out, lse = K.chunk_attention_with_lse(q, k, v, meta)
    assert torch.isinf(lse[0, 3]).all() and (lse[0, 3] > 0).all() and torch.isfinite(lse[0, :3]).all()
    assert torch.all(out[0, 3] == 0)


@pytest.mark.parametrize("blocks", [(32, 16), (16, 32)])
def test_unequal_query_and_key_tiles(rng, blocks, poison_empty):
    """The GPU's tiles are taller than wide (128 x 64 forward, 64 x 32 backward at head dim 128) while the
    interpreter's defaults are square, where a tile list indexed with the query-tile count instead of the
    key-tile count (or the other way round) reads the same entries: with unequal tiles, over a batch of a
    plain causal sequence and an action chunk of odd length, forward and backward equal the reference."""
    block_m, block_n = blocks
    L = 137
    ids = torch.stack([world_sample(rng, L), action_sample(rng, L, n_images=1, chunk=10)])
    meta = chunk_mask_meta(ids, LAYOUT).to(DEV)
    plan = K.tile_plan(meta, block_m, block_n)
    assert plan.full.shape[1:] == (math.ceil(L / block_m), math.ceil(L / block_n))
    assert plan.full.any() and plan.part.any()
    skipped_below_diagonal = [(i, j) for i in range(plan.full.shape[1]) for j in range(plan.full.shape[2])
                              if j * block_n < (i + 1) * block_m and not (plan.full[1, i, j] or plan.part[1, i, j])]
    assert skipped_below_diagonal, "the chunk must hide whole tiles below the diagonal"
    q, k, v = qkv(rng, (2, L, 2, 32), 1, torch.float32)
    check_fp32_forward_backward(rng, q, k, v, meta, block_m=block_m, block_n=block_n)


@pytest.mark.parametrize("packed", [False, True])
def test_backward_through_fused_projection_views(rng, packed, poison_empty):
    """q, k, v as slices of one fused projection (head dim contiguous, other strides not those of a
    contiguous tensor) and dO a slice of a wider gradient: the backward reads each of q, k, v, O and dO,
    and writes dQ, dK, dV, with that tensor's own strides, so the gradients equal those of contiguous copies."""
    H, Hkv, D = 2, 1, 16
    if packed:
        ids = torch.cat([action_sample(rng, 64, n_images=1, chunk=2), world_sample(rng, 61)])
        meta = chunk_mask_meta(ids, LAYOUT, cu_seqlens=torch.tensor([0, 64, 125], dtype=torch.int32)).to(DEV)
        lead = (125,)
    else:
        ids = torch.stack([action_sample(rng, 64, n_images=1, chunk=2), world_sample(rng, 64)])
        meta = chunk_mask_meta(ids, LAYOUT).to(DEV)
        lead = (2, 64)
    fused = torch.randn(*lead, H + 2 * Hkv, D, generator=rng).to(DEV).requires_grad_()
    q, k, v = fused.split([H, Hkv, Hkv], dim=-2)
    do = torch.randn(*lead, 3 * H, D, generator=rng).to(DEV)[..., :H, :]
    assert all(t.stride(-1) == 1 and not t.is_contiguous() for t in (q, k, v, do))
    K.chunk_attention(q, k, v, meta).backward(do)
    got = fused.grad.split([H, Hkv, Hkv], dim=-2)

    want = [x.detach().contiguous().requires_grad_() for x in (q, k, v)]
    K.chunk_attention(*want, meta).backward(do.contiguous())
    for n, g, w in zip("qkv", got, want):
        torch.testing.assert_close(g, w.grad, rtol=0, atol=0, msg=f"d{n}")


def test_tile_plan_of_a_negative_document_start_is_that_of_the_clamped_one(rng, poison_empty):
    """A packed document starting below 0 is clamped to token 0 by the kernels, and must be by the tile plan too:
    a plan read from the metadata 30 tokens earlier (wrapping to the end of the tokens) skipped a key tile
    the clamped document's queries see. Here that earlier metadata hides the whole tile, the clamped one none."""
    from worldvla.mask import NO_BLOCK

    T = 140
    kvb = torch.full((T,), NO_BLOCK, dtype=torch.int32)
    ql = torch.full((T,), -1, dtype=torch.int32)
    kvb[:2], kvb[T - 14:] = 0, 0  # the keys 30 tokens before key tile 1 (tokens 16-31)
    ql[18:34] = 5  # the queries 30 tokens before query tile 3 (tokens 48-63)
    pos = torch.arange(T)
    good = ChunkMaskMeta(kvb, ql, pos, torch.tensor([0, 113, T], dtype=torch.int32), 0).to(DEV)
    bad = ChunkMaskMeta(kvb, ql, pos, torch.tensor([-30, 113, T], dtype=torch.int32), 0).to(DEV)
    q, k, v = qkv(rng, (T, 1, 16), 1, torch.float32)
    want = masked_attention_ref(q.double(), k.double(), v.double(), good)
    assert bool(good.dense_mask()[48:64, 16:32].all()), "the clamped document's tile (3, 1) is fully visible"
    outs = [K.chunk_attention(q, k, v, meta, block_m=16, block_n=16) for meta in (good, bad)]
    assert_close_rule(outs[0], want, torch_same_precision(q, k, v, good), "clamped by hand", floor_eps=FP32_FLOOR_EPS)
    assert torch.equal(outs[1], outs[0])


def test_tile_plan_takes_keys_of_the_queries_own_limit_as_mask_free():
    """A key tile whose smallest block equals the largest limit of a query tile (a long action block seen by
    its own later queries) is fully visible: mask-free (no per-element rule), not partial, as a literal loop
    classifies it."""
    L = 64
    kvb = torch.zeros(L, dtype=torch.int32)  # one action block of 64 tokens
    ql = torch.zeros(L, dtype=torch.int32)
    meta = ChunkMaskMeta(kvb.view(1, L), ql.view(1, L), torch.arange(L).view(1, L), None, L).to(DEV)
    plan = K.tile_plan(meta, 16, 16)
    want = loop_tile_classes(ChunkMaskMeta(kvb, ql, torch.arange(L), None, L), 16, 16)
    got = {key: "f" if bool(plan.full[0][key]) else "p" if bool(plan.part[0][key]) else "s" for key in want}
    assert got == want
    assert [key for key, c in want.items() if c == "f"] == [(1, 0), (2, 0), (2, 1), (3, 0), (3, 1), (3, 2)]


def test_kernel_entry_refuses_a_max_seqlen_below_the_longest_document(rng):
    """The kernels launch row tiles for max_seqlen rows a document: a smaller value would leave the longer
    document's last rows unwritten. Where cu_seqlens can be read without a synchronization (CPU tensors) the
    kernel's entry refuses it by name; a max_seqlen of 0 (unknown) is found from cu_seqlens."""
    T = 40
    cu = torch.tensor([0, 30, T], dtype=torch.int32)
    q, k, v = qkv(rng, (T, 1, 16), 1, torch.float32)
    causal = causal_meta((T,), cu_seqlens=cu, device=DEV)
    fields = (causal.kv_block, causal.q_limit, causal.position_ids, causal.cu_seqlens)
    if DEV == "cpu":
        short = ChunkMaskMeta(*fields, 20)
        with pytest.raises(ValueError, match=r"meta.max_seqlen=20 is smaller than the longest document \(30\)"):
            K.chunk_attention(q, k, v, short)
    unknown = ChunkMaskMeta(*fields, 0)
    torch.testing.assert_close(K.chunk_attention(q, k, v, unknown), masked_attention_ref(q, k, v, unknown))


@pytest.mark.parametrize("blocks, bad", [((8, 16), 8), ((16, 48), 48)])
def test_kernel_entry_refuses_blocks_that_are_not_powers_of_two_from_16(rng, blocks, bad):
    """tl.dot needs tiles of at least 16 and tl.arange powers of two: other block sizes are refused by name."""
    meta = causal_meta((1, 20), device=DEV)
    q = torch.randn(1, 20, 1, 16, generator=rng).to(DEV)
    with pytest.raises(ValueError, match=f"block sizes must be powers of two >= 16, got {bad}"):
        K.chunk_attention(q, q, q, meta, block_m=blocks[0], block_n=blocks[1])


def test_auto_keeps_the_triton_kernels_at_the_grid_limit_itself():
    """Sequences x heads is a grid axis of at most 65535 programs: exactly 65535 (13107 documents x 5 heads)
    still launches, one document more does not. Expanded (zero-stride) inputs: nothing of that size is made."""
    from worldvla.ops import dispatch

    for n_docs, ok in ((13107, True), (13108, False)):
        T = 2 * n_docs
        meta = causal_meta((T,), cu_seqlens=torch.arange(0, T + 1, 2, dtype=torch.int32), device=DEV)
        q = torch.zeros(1, 1, 16, device=DEV).expand(T, 5, 16)
        assert dispatch.supports("masked_attention", "triton", q, q, q, meta) is ok, n_docs


def test_tile_plan_follows_replaced_meta_tensors(rng):
    """Plans are cached on the metadata; a field replaced by another tensor at the same version counter (both
    fresh) must not reuse the plan of the tensor it replaced."""
    ids = action_sample(rng, 100, n_images=1, chunk=6).unsqueeze(0)
    chunk = chunk_mask_meta(ids, LAYOUT)
    meta = ChunkMaskMeta(chunk.kv_block.clone(), chunk.q_limit.clone(), chunk.position_ids, None, 100).to(DEV)
    q, k, v = qkv(rng, (1, 100, 1, 64), 1, torch.float32)
    K.chunk_attention(q, k, v, meta, block_m=16, block_n=16)
    causal_limit = torch.full((1, 100), -1, dtype=torch.int32, device=DEV)
    assert causal_limit._version == meta.q_limit._version
    meta.q_limit = causal_limit  # now plain causal
    out = K.chunk_attention(q, k, v, meta, block_m=16, block_n=16)
    causal = causal_meta((1, 100), device=DEV)
    ref = masked_attention_ref(q.double(), k.double(), v.double(), causal)
    assert_close_rule(out, ref, torch_same_precision(q, k, v, causal), "causal after the replacement",
                      floor_eps=FP32_FLOOR_EPS)


def test_padded_lse_of_a_batch_is_per_sequence_token_and_head(rng, poison_empty):
    """chunk_attention_with_lse on padded inputs returns lse [B, L, H]: entry (b, i, h) is the log-sum-exp of
    head h's visible scores of sequence b's token i. Two sequences of an odd length and three query heads
    over one KV head, so that a layout mixing batch, token and head indices cannot agree by coincidence."""
    L, H = 67, 3
    ids = torch.stack([action_sample(rng, L, n_images=1, chunk=2), world_sample(rng, L)])
    meta = chunk_mask_meta(ids, LAYOUT).to(DEV)
    q, k, v = qkv(rng, (2, L, H, 32), 1, torch.float32)
    out, lse = K.chunk_attention_with_lse(q, k, v, meta)
    assert lse.shape == (2, L, H) and lse.dtype == torch.float32

    def lse_of(x):
        s = torch.einsum("blhd,bmhd->bhlm", x(q), x(k).expand(2, L, H, 32)) / math.sqrt(32)
        s = s.masked_fill(~meta.dense_mask().unsqueeze(1), float("-inf"))
        return torch.logsumexp(s, -1).transpose(1, 2)  # [B, L, H]

    assert_close_rule(lse, lse_of(torch.Tensor.double), lse_of(torch.Tensor.float), "padded lse",
                      floor_eps=FP32_FLOOR_EPS)
    ref = masked_attention_ref(q.double(), k.double(), v.double(), meta)
    assert_close_rule(out, ref, torch_same_precision(q, k, v, meta), "padded out", floor_eps=FP32_FLOOR_EPS)


@pytest.mark.parametrize("packed", [False, True])
def test_backward_honours_the_softmax_scale(rng, packed, poison_empty):
    """A softmax_scale other than 1/sqrt(Dh) enters the backward as it does the forward: dQ, dK and dV under
    scale 0.3 equal the float64 reference's gradients at that scale (odd lengths, a KV group of two heads)."""
    scale, H, Hkv, D = 0.3, 2, 1, 40
    if packed:
        ids = torch.cat([action_sample(rng, 59, n_images=1, chunk=1), world_sample(rng, 61)])
        meta = chunk_mask_meta(ids, LAYOUT, cu_seqlens=torch.tensor([0, 59, 120], dtype=torch.int32)).to(DEV)
        lead = (120,)
    else:
        ids = action_sample(rng, 67, n_images=1, chunk=2).unsqueeze(0)
        meta = chunk_mask_meta(ids, LAYOUT).to(DEV)
        lead = (1, 67)
    q, k, v = qkv(rng, (*lead, H, D), Hkv, torch.float32)
    xs = [t.clone().requires_grad_() for t in (q, k, v)]
    xd = [t.double().requires_grad_() for t in (q, k, v)]
    out = K.chunk_attention(*xs, meta, softmax_scale=scale)
    ref = masked_attention_ref(*xd, meta, softmax_scale=scale)
    assert_close_rule(out, ref, torch_same_precision(q, k, v, meta, scale), "fwd", floor_eps=FP32_FLOOR_EPS)
    do = torch.randn(out.shape, generator=rng).to(DEV)
    out.backward(do)
    ref.backward(do.double())
    for name, a, b, same in zip("qkv", xs, xd, fa2_backward_same_precision(q, k, v, meta, do, scale)):
        assert_close_rule(a.grad, b.grad, same, f"d{name}", floor_eps=FP32_FLOOR_EPS)


def test_bfloat16_outputs_are_rounded_to_nearest(rng, poison_empty):
    """bf16 outputs are the fp32 results rounded to nearest, as torch's cast rounds. With q = 0 every visible key
    scores alike, so causal row i is the mean of v[0..i]: for values j / 64 (|j| <= 128) and i + 1 a power of two that
    mean is exact in fp32 in any order of summation, while it may need more bits than bf16 holds; the kernel's bf16
    output must be its rounding to nearest."""
    L, H, D = 21, 2, 32
    meta = causal_meta((1, L), device=DEV)
    q = torch.zeros(1, L, H, D, device=DEV, dtype=torch.bfloat16)
    k = torch.randn(1, L, H, D, generator=rng).to(DEV, torch.bfloat16)
    v = (torch.randint(-128, 129, (1, L, H, D), generator=rng) / 64).to(DEV, torch.bfloat16)
    out = K.chunk_attention(q, k, v, meta)
    rows = [0, 1, 3, 7, 15]
    mean = torch.stack([v[0, :i + 1].float().sum(0) / (i + 1) for i in rows])  # [rows, H, D], exact
    want = mean.to(torch.bfloat16)
    assert not torch.equal(want, (mean.view(torch.int32) & ~0xFFFF).view(torch.float32).to(torch.bfloat16)), \
        "rounding to nearest must differ from truncation somewhere for the test to see it"
    assert torch.equal(out[0, rows], want)
