"""The "torch" backend of masked_attention (SDPA) against the float64 reference, on both of its
paths: one dense [T, T] mask, and a packed batch run as a padded batch of its documents."""
import pytest
import torch

from worldvla import VocabLayout, chunk_mask_meta
from worldvla.mask import NO_BLOCK, ChunkMaskMeta, causal_meta
from worldvla.ops import dispatch, masked_attention, masked_attention_ref
from worldvla.ops.attention import _documents_padded

from test_mask import loop_mask, random_sequence

LAYOUT = VocabLayout.compact()


def _packed(gen, docs):
    ids = torch.tensor(sum(docs, []))
    cu = torch.tensor([0] + [len(d) for d in docs]).cumsum(0).to(torch.int32)
    return ids, chunk_mask_meta(ids, LAYOUT, cu_seqlens=cu)


def _docs_with_empty(gen):
    """Documents with an empty one (a repeated cu_seqlens entry) in the middle."""
    docs = _docs(gen)
    return docs[:2] + [[]] + docs[2:]


def _docs(gen):
    # A one-token document, a chunk of one action, a trailing open block, a world sample.
    return [random_sequence(LAYOUT, gen, 2, 5, 7), [LAYOUT.bos], random_sequence(LAYOUT, gen, 1, 1, 7),
            random_sequence(LAYOUT, gen, 1, 3, 4, trailing_open=True), random_sequence(LAYOUT, gen, 1, 1, 7, world=True),
            random_sequence(LAYOUT, gen, 2, 4, 7)] + [random_sequence(LAYOUT, gen, 2, 5, 7) for _ in range(4)]


def _dense(meta):
    """The same metadata without max_seqlen: the torch backend then takes its dense path."""
    return type(meta)(meta.kv_block, meta.q_limit, meta.position_ids, meta.cu_seqlens, 0)


def test_documents_padded_masks_are_each_documents_rule():
    gen = torch.Generator().manual_seed(3)
    docs = _docs_with_empty(gen)
    ids, meta = _packed(gen, docs)
    src, dst, mask = _documents_padded(meta)
    T = ids.numel()
    assert src.shape == (len(docs), meta.max_seqlen) and mask.shape == (len(docs), meta.max_seqlen, meta.max_seqlen)
    assert torch.equal(src.flatten()[dst], torch.arange(T))  # every token lands in its slot and back
    for d, doc in enumerate(docs):
        n = len(doc)
        assert torch.equal(mask[d, :n, :n], torch.from_numpy(loop_mask(doc, LAYOUT)))
        assert not mask[d, :n, n:].any()              # real rows never see padding
        assert bool(mask[d, n:, 0].all())             # pad rows see one key: no empty softmax row
        assert bool((src[d, n:] == T).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_packed_documents_path_matches_reference(dtype, kv_heads):
    gen = torch.Generator().manual_seed(11)
    ids, meta = _packed(gen, _docs_with_empty(gen))
    T = ids.numel()
    assert 2 * (meta.cu_seqlens.numel() - 1) * meta.max_seqlen ** 2 <= T ** 2  # takes the per-document path
    q = torch.randn(T, 4, 64, generator=gen).to(dtype).requires_grad_()
    k = torch.randn(T, kv_heads, 64, generator=gen).to(dtype).requires_grad_()
    v = torch.randn(T, kv_heads, 64, generator=gen).to(dtype).requires_grad_()
    g = torch.randn(T, 4, 64, generator=gen).to(dtype)

    out = masked_attention(q, k, v, meta, backend="torch")
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), g)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = masked_attention_ref(q64, k64, v64, meta)
    rq, rk, rv = torch.autograd.grad(ref, (q64, k64, v64), g.double())
    # Plain PyTorch at the inputs' precision (the Triton tests' baseline). In bf16 the largest
    # single-element error is one rounding step of the largest gradient entry whichever way
    # SDPA blocks its sums, so bf16 compares relative L2 errors; fp32 compares max errors.
    qs, ks, vs = (t.detach().requires_grad_() for t in (q, k, v))
    same = masked_attention_ref(qs, ks, vs, meta, upcast=False)
    sq, sk, sv = torch.autograd.grad(same, (qs, ks, vs), g)
    if dtype == torch.float32:
        error = lambda a, r: (a.double() - r).abs().max().item()
    else:
        error = lambda a, r: ((a.double() - r).norm() / r.norm()).item()
    for name, a, r, s in (("out", out, ref, same), ("dq", dq, rq, sq), ("dk", dk, rk, sk), ("dv", dv, rv, sv)):
        assert a.dtype == dtype and not torch.isnan(a).any(), name
        err, base = error(a, r), error(s, r)
        assert err <= 2 * base + (1e-6 if dtype == torch.float32 else 0.0), f"{name}: {err:.3g} > 2 x {base:.3g}"


def test_one_document_and_dense_path_agree():
    """A single document (and a batch that does not pay to split) take the dense path; both
    paths give the same numbers on the same packed batch."""
    gen = torch.Generator().manual_seed(5)
    ids, meta = _packed(gen, _docs(gen))
    T = ids.numel()
    q, k, v = (torch.randn(T, 2, 64, generator=gen, dtype=torch.float64) for _ in range(3))
    split = masked_attention(q, k, v, meta, backend="torch")
    dense = masked_attention(q, k, v, _dense(meta), backend="torch")
    torch.testing.assert_close(split, dense, rtol=1e-12, atol=1e-12)
    one = causal_meta((T,), cu_seqlens=torch.tensor([0, T]))
    ref = torch.nn.functional.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                                           is_causal=True).transpose(0, 1)
    torch.testing.assert_close(masked_attention(q, k, v, one, backend="torch"), ref, rtol=1e-12, atol=1e-12)


def test_every_backend_refuses_bad_cu_seqlens():
    """Hand-built packed metadata whose cu_seqlens does not rise from 0 to T (documents that stop short of
    the last token, or overlap), or whose max_seqlen is shorter than a document, is refused at the entry point
    on every backend, naming the field (Triton returned unwritten rows or overlapping documents, the torch
    backend failed with an IndexError deep inside or overlapped the documents too)."""
    T, H, D = 10, 2, 16
    q = torch.randn(T, H, D, generator=torch.Generator().manual_seed(0))
    kvb, ql = torch.full((T,), NO_BLOCK, dtype=torch.int32), torch.full((T,), -1, dtype=torch.int32)
    cases = (([0, 5], 7, r"cu_seqlens must rise from 0 to T=10 .*got \[0, 5\]"),
             ([0, 7, 3, 10], 7, r"cu_seqlens must rise from 0 to T=10 .*got \[0, 7, 3, 10\]"),
             ([0, 5], 0, r"cu_seqlens must rise from 0 to T=10"),  # without max_seqlen
             ([0, 9, 10], 7, r"max_seqlen=7 is shorter than the longest document \(9 tokens\)"))
    for cu, max_seqlen, message in cases:
        meta = ChunkMaskMeta(kvb, ql, torch.arange(T), torch.tensor(cu, dtype=torch.int32), max_seqlen)
        for backend in ("auto", *dispatch.available("masked_attention")):
            with pytest.raises(ValueError, match=message):
                masked_attention(q, q, q, meta, backend=backend)
    # Values on a device are not read (that would synchronize), what the host ints tell still is: meta tensors
    # stand in for CUDA ones here.
    on_device = ChunkMaskMeta(*(t.to("meta") for t in (kvb, ql, torch.arange(T), torch.tensor([0, 5], dtype=torch.int32))), 7)
    with pytest.raises(ValueError, match=r"cu_seqlens must rise from 0 to T=10, but its 1 document\(s\) of at most "
                                         r"max_seqlen=7 tokens cannot cover them"):
        masked_attention(*(q.to("meta"),) * 3, on_device, backend="torch")
    with pytest.raises(ValueError, match=r"meta.cu_seqlens must be 1-D with n_docs \+ 1 >= 2 entries"):
        masked_attention(q, q, q, ChunkMaskMeta(kvb, ql, torch.arange(T), torch.tensor([10], dtype=torch.int32)),
                         backend="torch")
    with pytest.raises(TypeError, match="meta.cu_seqlens must hold integers, got torch.float32"):
        masked_attention(q, q, q, ChunkMaskMeta(kvb, ql, torch.arange(T), torch.tensor([0.0, 10.0])), backend="torch")


def test_cu_seqlens_are_checked_once_per_metadata(no_host_reads):
    """The values are read on the host once per metadata (every layer of a forward, and its backward, share
    it); an in-place edit of cu_seqlens is checked again."""
    T = 12
    meta = causal_meta((T,), cu_seqlens=torch.tensor([0, 5, T], dtype=torch.int32))
    q = torch.randn(T, 2, 8, generator=torch.Generator().manual_seed(1))
    want = masked_attention(q, q, q, meta, backend="torch")
    with no_host_reads():
        again = masked_attention(q, q, q, meta, backend="torch")
    assert torch.equal(again, want)
    meta.cu_seqlens[1] = 13
    with pytest.raises(ValueError, match=r"cu_seqlens must rise from 0 to T=12 .*got \[0, 13, 12\]"):
        masked_attention(q, q, q, meta, backend="torch")
    with torch.inference_mode():  # inference tensors have no version counter: checked at every call
        meta = causal_meta((T,), cu_seqlens=torch.tensor([0, 5, T], dtype=torch.int32))
        assert torch.equal(masked_attention(q, q, q, meta, backend="torch"), want)
        meta.cu_seqlens[1] = 13
        with pytest.raises(ValueError, match=r"cu_seqlens must rise from 0 to T=12 .*got \[0, 13, 12\]"):
            masked_attention(q, q, q, meta, backend="torch")


def test_metadata_on_another_device_is_refused():
    """Metadata on the meta device went through the torch path (auto on the CPU) as uninitialized values: a
    finite wrong output with no error. Every input must be on q's device."""
    from worldvla.mask import DecodeMeta
    from worldvla.ops import decode_attention

    q = k = v = torch.randn(1, 6, 2, 8)
    meta = causal_meta((1, 6))
    on_meta = ChunkMaskMeta(meta.kv_block.to("meta"), meta.q_limit.to("meta"), meta.position_ids)
    for backend in ("auto", "torch"):
        with pytest.raises(ValueError, match="meta.kv_block is on meta but q is on cpu"):
            masked_attention(q, k, v, on_meta, backend=backend)
    dm = DecodeMeta(torch.zeros(1, 1, dtype=torch.int32, device="meta"), torch.full((1, 1), -1, dtype=torch.int32),
                    torch.full((1, 6), NO_BLOCK, dtype=torch.int32), torch.tensor([6], dtype=torch.int32))
    with pytest.raises(ValueError, match="meta.q_pos is on meta but q is on cpu"):
        decode_attention(q[:, :1], k, v, dm, backend="torch")


def test_mixed_dtypes_are_refused_by_name():
    """q in bfloat16 with k, v in float32 failed inside einsum with torch's own message on the torch path;
    every backend now names the input and the fix."""
    from worldvla.mask import DecodeMeta
    from worldvla.ops import decode_attention

    q, k = torch.randn(1, 6, 2, 8).bfloat16(), torch.randn(1, 6, 2, 8)
    for backend in ("auto", "torch"):
        with pytest.raises(TypeError, match="k is torch.float32 but q is torch.bfloat16"):
            masked_attention(q, k, k, causal_meta((1, 6)), backend=backend)
    dm = DecodeMeta(torch.zeros(1, 1, dtype=torch.int32), torch.full((1, 1), -1, dtype=torch.int32),
                    torch.full((1, 6), NO_BLOCK, dtype=torch.int32), torch.tensor([6], dtype=torch.int32))
    with pytest.raises(TypeError, match="v_cache is torch.float16 but q is torch.bfloat16"):
        decode_attention(q[:, :1], k.bfloat16(), k.half(), dm, backend="torch")
    with pytest.raises(TypeError, match="q must be a floating-point tensor"):
        masked_attention(torch.ones(1, 6, 2, 8, dtype=torch.long), k.long(), k.long(), causal_meta((1, 6)))


@pytest.mark.parametrize("layout", ["padded", "packed_dense", "packed_documents"])
def test_every_backend_honours_softmax_scale(layout):
    """The model never passes a softmax scale, so dropping it on a path (the torch backend's padded SDPA call,
    say) went unnoticed: every installed backend, on every path, against the reference at a scale of 0.3."""
    gen = torch.Generator().manual_seed(5)
    if layout == "padded":
        q = torch.randn(2, 10, 2, 16, generator=gen)
        meta = causal_meta((2, 10))
    else:
        ids, meta = _packed(gen, _docs(gen))
        meta = _dense(meta) if layout == "packed_dense" else meta
        q = torch.randn(ids.numel(), 2, 16, generator=gen)
    k, v = torch.randn_like(q), torch.randn_like(q)
    want = masked_attention_ref(q.double(), k.double(), v.double(), meta, softmax_scale=0.3)
    assert (want - masked_attention_ref(q.double(), k.double(), v.double(), meta)).abs().max() > 0.1
    backends = dispatch.available("masked_attention")  # each takes these inputs: none is skipped
    assert "torch" in backends
    for backend in backends:
        got = masked_attention(q, k, v, meta, softmax_scale=0.3, backend=backend)
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5, msg=lambda m: f"{backend}: {m}")


def test_every_decode_backend_honours_softmax_scale():
    from worldvla.mask import DecodeMeta
    from worldvla.ops import decode_attention, decode_attention_ref

    gen = torch.Generator().manual_seed(6)
    q, kc, vc = torch.randn(2, 3, 4, 16, generator=gen), torch.randn(2, 40, 2, 16, generator=gen), \
        torch.randn(2, 40, 2, 16, generator=gen)
    meta = DecodeMeta(torch.tensor([[30, 31, 32], [20, 21, 22]], dtype=torch.int32),
                      torch.full((2, 3), -1, dtype=torch.int32), torch.full((2, 40), NO_BLOCK, dtype=torch.int32),
                      torch.tensor([33, 23], dtype=torch.int32))
    want = decode_attention_ref(q.double(), kc.double(), vc.double(), meta, softmax_scale=0.3)
    for backend in dispatch.available("decode_attention"):  # each takes these inputs: none is skipped
        got = decode_attention(q, kc, vc, meta, softmax_scale=0.3, backend=backend)
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5, msg=lambda m: f"{backend}: {m}")


def _attention_by_hand(q, k, v, mask, scale):
    """Each query row, head by head, written out: softmax(q . k * scale) over the keys its mask row allows,
    times their values; query head h reads key/value head h // (H / Hkv) (transformers' grouping)."""
    L, H, Dh = q.shape
    rep = H // k.shape[1]
    out = torch.zeros_like(q)
    for i in range(L):
        seen = mask[i].nonzero().flatten()
        for h in range(H):
            s = (k[seen, h // rep] @ q[i, h]) * scale
            out[i, h] = torch.softmax(s, 0) @ v[seen, h // rep]
    return out


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_reference_is_each_rows_softmax_over_its_visible_keys(kv_heads):
    """The reference every backend is held to, against a literal loop over rows and heads under the release's
    rule (test_mask.loop_mask): a right-padded batch of two sequences of different lengths (its real rows never
    see the padding), and the same two as a packed batch. Grouped heads share a key/value head in
    consecutive runs, the default scale is 1 / sqrt(head_dim), and bfloat16 inputs give bfloat16 outputs."""
    gen = torch.Generator().manual_seed(21)
    docs = [random_sequence(LAYOUT, gen, 2, 3, 5), random_sequence(LAYOUT, gen, 1, 4, 5)]
    n = max(len(d) for d in docs)
    ids = torch.tensor([d + [LAYOUT.bos] * (n - len(d)) for d in docs])
    meta = chunk_mask_meta(ids, LAYOUT)
    q = torch.randn(2, n, 4, 8, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(2, n, kv_heads, 8, generator=gen, dtype=torch.float64) for _ in range(2))
    got = masked_attention_ref(q, k, v, meta)
    for b, doc in enumerate(docs):
        m = len(doc)
        mask = torch.from_numpy(loop_mask(doc, LAYOUT))
        want = _attention_by_hand(q[b, :m], k[b, :m], v[b, :m], mask, 8 ** -0.5)
        torch.testing.assert_close(got[b, :m], want, rtol=1e-12, atol=1e-12)
    # the same two sequences packed, without their padding
    packed_ids, packed_meta = _packed(gen, docs)
    cat = lambda x: torch.cat([x[b, :len(d)] for b, d in enumerate(docs)])
    got = masked_attention_ref(cat(q), cat(k), cat(v), packed_meta)
    torch.testing.assert_close(got, cat(masked_attention_ref(q, k, v, meta)), rtol=1e-12, atol=1e-12)
    low = masked_attention_ref(q.bfloat16(), k.bfloat16(), v.bfloat16(), meta)
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.double(), masked_attention_ref(q.bfloat16().double(), k.bfloat16().double(),
                                                                  v.bfloat16().double(), meta), rtol=1e-2, atol=1e-2)


def test_decode_reference_is_each_rows_softmax_over_its_visible_slots():
    """decode_attention_ref against the literal loop: grouped heads, the default scale, and the cache slots a
    row may read (its own position and those before it, within kv_len; none of a later slot's garbage)."""
    from worldvla.mask import DecodeMeta
    from worldvla.ops import decode_attention_ref

    gen = torch.Generator().manual_seed(22)
    q = torch.randn(2, 2, 4, 8, generator=gen, dtype=torch.float64)
    kc, vc = (torch.randn(2, 12, 2, 8, generator=gen, dtype=torch.float64) for _ in range(2))
    meta = DecodeMeta(torch.tensor([[6, 7], [3, 4]], dtype=torch.int32), torch.full((2, 2), -1, dtype=torch.int32),
                      torch.full((2, 12), NO_BLOCK, dtype=torch.int32), torch.tensor([8, 5], dtype=torch.int32))
    got = decode_attention_ref(q, kc, vc, meta)
    for b in range(2):
        mask = torch.zeros(2, 12, dtype=torch.bool)
        for j, pos in enumerate(meta.q_pos[b].tolist()):
            mask[j, :pos + 1] = True
        want = _attention_by_hand(q[b], kc[b], vc[b], mask, 8 ** -0.5)
        torch.testing.assert_close(got[b], want, rtol=1e-12, atol=1e-12)


def test_heads_that_do_not_group_and_metadata_of_other_tokens_are_refused_by_name():
    """4 query heads over 3 key/value heads cannot be grouped (each key/value head must serve the same number of
    query heads), and metadata built for 9 tokens cannot mask 10, nor a q_limit of 9 values with 10 tokens: all are refused before any backend runs, naming
    the problem, on every backend (a backend's own shape error named neither)."""
    gen = torch.Generator().manual_seed(23)
    q = torch.randn(1, 10, 4, 8, generator=gen)
    k3 = torch.randn(1, 10, 3, 8, generator=gen)
    for backend in dispatch.available("masked_attention"):
        with pytest.raises(ValueError, match=r"kv heads \(3\) must divide q heads \(4\)"):
            masked_attention(q, k3, k3, causal_meta((1, 10)), backend=backend)
        with pytest.raises(ValueError, match=r"meta covers tokens \(1, 9\) but q has \(1, 10\)"):
            masked_attention(q, q, q, causal_meta((1, 9)), backend=backend)
        meta = causal_meta((1, 10))  # a q_limit of another shape: torch's broadcast error named no argument
        meta.q_limit = meta.q_limit[:, :9]
        with pytest.raises(ValueError, match=r"meta.q_limit \(1, 9\) must be shaped as meta.kv_block \(1, 10\)"):
            masked_attention(q, q, q, meta, backend=backend)


def test_references_compute_half_precision_inputs_in_float32():
    """The references upcast bfloat16 and float16 inputs: softmax and P V run in float32 and only the output is
    rounded, so a half-precision call gives exactly the float32 call's output rounded to its dtype (computing in
    bfloat16 moved outputs by several of its ulps), both for a chunk-masked prefill and for a decode step."""
    from worldvla.mask import DecodeMeta
    from worldvla.ops import decode_attention_ref

    gen = torch.Generator().manual_seed(24)
    meta = causal_meta((2, 16))
    dmeta = DecodeMeta(torch.tensor([[9, 10], [4, 5]], dtype=torch.int32), torch.full((2, 2), -1, dtype=torch.int32),
                       torch.full((2, 16), NO_BLOCK, dtype=torch.int32), torch.tensor([11, 6], dtype=torch.int32))
    for dtype in (torch.bfloat16, torch.float16):
        q, k, v = (torch.randn(2, 16, h, 32, generator=gen).to(dtype) for h in (4, 2, 2))
        got = masked_attention_ref(q, k, v, meta)
        want = masked_attention_ref(q.float(), k.float(), v.float(), meta).to(dtype)
        assert got.dtype == dtype and torch.equal(got, want), (dtype, (got.float() - want.float()).abs().max())
        got = decode_attention_ref(q[:, :2], k, v, dmeta)
        want = decode_attention_ref(q[:, :2].float(), k.float(), v.float(), dmeta).to(dtype)
        assert got.dtype == dtype and torch.equal(got, want), (dtype, (got.float() - want.float()).abs().max())


def test_keys_of_other_tokens_and_caches_of_another_batch_are_refused_by_name():
    """k and v must cover q's tokens (the metadata is checked against q alone), and decode caches must hold q's
    batch: SDPA would broadcast a cache of batch 1 over a query of batch 2 without a word."""
    from worldvla.mask import DecodeMeta
    from worldvla.ops import decode_attention

    gen = torch.Generator().manual_seed(25)
    q = torch.randn(1, 6, 2, 8, generator=gen)
    k7 = torch.randn(1, 7, 2, 8, generator=gen)
    with pytest.raises(ValueError, match=r"k and v must match and share q's tokens and head dim; got \(1, 6, 2, 8\), "
                                         r"\(1, 7, 2, 8\), \(1, 7, 2, 8\)"):
        masked_attention(q, k7, k7, causal_meta((1, 6)), backend="torch")
    q2 = torch.randn(2, 1, 2, 8, generator=gen)
    dm = DecodeMeta(torch.full((2, 1), 5, dtype=torch.int32), torch.full((2, 1), -1, dtype=torch.int32),
                    torch.full((2, 6), NO_BLOCK, dtype=torch.int32), torch.full((2,), 6, dtype=torch.int32))
    for backend in ("auto", "torch"):
        with pytest.raises(ValueError, match=r"q \(2, 1, 2, 8\) and cache \(1, 6, 2, 8\) disagree on batch"):
            decode_attention(q2, q, q, dm, backend=backend)


def test_a_softmax_scale_of_zero_weighs_every_visible_key_alike():
    """A scale of 0 is a scale, not "unset": every score is 0 and each row is the mean of the values it may see
    (the default 1 / sqrt(head_dim) would weigh them by q . k)."""
    from worldvla.mask import DecodeMeta
    from worldvla.ops import decode_attention, decode_attention_ref

    gen = torch.Generator().manual_seed(26)
    q, k, v = (torch.randn(1, 6, 2, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    want = torch.stack([v[0, :i + 1].mean(0) for i in range(6)]).unsqueeze(0)  # causal: rows 0..i
    meta = causal_meta((1, 6))
    torch.testing.assert_close(masked_attention_ref(q, k, v, meta, softmax_scale=0.0), want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(masked_attention(q, k, v, meta, softmax_scale=0.0, backend="torch"), want,
                               rtol=1e-12, atol=1e-12)
    assert (masked_attention_ref(q, k, v, meta) - want).abs().max() > 0.1
    dm = DecodeMeta(torch.tensor([[3, 5]], dtype=torch.int32), torch.full((1, 2), -1, dtype=torch.int32),
                    torch.full((1, 6), NO_BLOCK, dtype=torch.int32), torch.tensor([6], dtype=torch.int32))
    for got in (decode_attention_ref(q[:, 4:], k, v, dm, softmax_scale=0.0),
                decode_attention(q[:, 4:], k, v, dm, softmax_scale=0.0, backend="torch")):
        torch.testing.assert_close(got, want[:, [3, 5]], rtol=1e-12, atol=1e-12)


def _probe_op(monkeypatch, order=None, **impls):
    """An op "probe_op" with the given backends, each `name=(fn, supports)`, and (`order`) its CPU auto order."""
    dispatch.registered_ops()  # the real backends load first: the probe op stays out of their registration
    monkeypatch.setitem(dispatch._IMPLS, "probe_op", dict(impls))
    if order is not None:
        monkeypatch.setitem(dispatch.AUTO_ORDER, ("probe_op", "cpu"), order)


def test_a_backend_that_did_not_import_is_named_with_its_error_and_install_hint(monkeypatch):
    """A backend module that fails to import is recorded on the first dispatch: an explicit request names the
    import error and how to install the backend, `auto` takes torch without a word, and the failure is kept
    (asked again, the same answer)."""
    def torch_fn(*args):
        return "torch"

    monkeypatch.setattr(dispatch, "_loaded", False)
    monkeypatch.setattr(dispatch, "_IMPORT_ERRORS", {})
    monkeypatch.setattr(dispatch, "_BACKEND_MODULES", {"triton": "worldvla.ops.no_such_backend_module"})
    monkeypatch.setitem(dispatch._IMPLS, "probe_op", {"torch": (torch_fn, lambda *a: True)})
    monkeypatch.setitem(dispatch.AUTO_ORDER, ("probe_op", "cpu"), ("triton", "torch"))
    for _ in range(2):
        with pytest.raises(RuntimeError, match=r"op 'probe_op' has no 'triton' implementation available here: the "
                                               r"'triton' backend did not import \(No module named "
                                               r"'worldvla.ops.no_such_backend_module'\); "
                                               r"pip install \"worldvla\[triton\]\""):
            dispatch.resolve("probe_op", "triton", "cpu")
    assert dispatch.resolve("probe_op", "auto", "cpu") is torch_fn
    assert set(dispatch._IMPORT_ERRORS) == {"triton"}


def test_available_backends_are_listed_in_sorted_order(monkeypatch):
    """`available` names an op's backends sorted, whatever order they registered in (triton's, native's, then
    torch's here), as `info` and the tests list them."""
    fn = lambda *a: None  # noqa: E731
    _probe_op(monkeypatch, triton=(fn, None), native=(fn, None), torch=(fn, None))
    assert dispatch.available("probe_op") == ["native", "torch", "triton"]
    assert dispatch.available("masked_attention") == sorted(dispatch.available("masked_attention"))
    assert dispatch.available("no_such_op") == []


def test_auto_falls_back_to_torch_where_no_backend_of_the_order_takes_the_inputs(monkeypatch):
    """An auto order whose backends all refuse the inputs (or lack the op) ends on the torch reference, not on
    the last backend it tried; an explicit request for the refusing backend quotes its reason."""
    def torch_fn(*args):
        return "torch"

    def native_fn(*args):
        return "native"

    _probe_op(monkeypatch, order=("triton", "native"), torch=(torch_fn, lambda *a: True),
              native=(native_fn, lambda *a: dispatch.Unsupported("head dim 300 > 256")))
    assert dispatch.resolve("probe_op", "auto", "cpu", 1) is torch_fn
    assert dispatch.call("probe_op", "auto", "cpu", 1) == "torch"
    with pytest.raises(ValueError, match=r"the 'native' backend of 'probe_op' does not support these inputs "
                                         r"\(head dim 300 > 256\); use backend='torch' or 'auto'"):
        dispatch.resolve("probe_op", "native", "cpu", 1)


def test_keys_of_another_head_dim_are_refused_by_name_on_every_backend():
    """q and k must share their head dim (q . k needs it): keys of 16 for queries of 8 are refused at the entry
    point, naming the three shapes, on every backend, and so are decode caches of another head dim."""
    from worldvla.mask import DecodeMeta
    from worldvla.ops import decode_attention

    gen = torch.Generator().manual_seed(27)
    q = torch.randn(1, 6, 2, 8, generator=gen)
    k16 = torch.randn(1, 6, 2, 16, generator=gen)
    for backend in ("auto", *dispatch.available("masked_attention")):
        with pytest.raises(ValueError, match=r"k and v must match and share q's tokens and head dim; got "
                                             r"\(1, 6, 2, 8\), \(1, 6, 2, 16\), \(1, 6, 2, 16\)"):
            masked_attention(q, k16, k16, causal_meta((1, 6)), backend=backend)
    dm = DecodeMeta(torch.full((1, 1), 5, dtype=torch.int32), torch.full((1, 1), -1, dtype=torch.int32),
                    torch.full((1, 6), NO_BLOCK, dtype=torch.int32), torch.full((1,), 6, dtype=torch.int32))
    for backend in ("auto", *dispatch.available("decode_attention")):
        with pytest.raises(ValueError, match=r"q \(1, 1, 2, 8\) and cache \(1, 6, 2, 16\) disagree on batch, head dim"):
            decode_attention(q[:, :1], k16, k16, dm, backend=backend)


@pytest.mark.parametrize("T,H,Hkv,Dh", [(1, 1, 1, 1), (5, 1, 1, 3), (7, 6, 2, 12), (1, 4, 1, 24)])
def test_edge_shapes_keep_their_layout_on_every_backend(T, H, Hkv, Dh):
    """One token, one head, a head dim of 1 or one that is not a power of two, and query heads grouped over fewer
    key/value heads: every backend gives the reference's numbers in the inputs' own shape, padded [1, T, H, Dh]
    and packed [T, H, Dh] alike (a single head or token is not squeezed away), and so does decode attention of
    one row per sequence."""
    from worldvla.mask import DecodeMeta
    from worldvla.ops import decode_attention, decode_attention_ref

    gen = torch.Generator().manual_seed(28)
    q = torch.randn(1, T, H, Dh, generator=gen)
    k, v = (torch.randn(1, T, Hkv, Dh, generator=gen) for _ in range(2))
    for meta, (qq, kk, vv) in ((causal_meta((1, T)), (q, k, v)),
                               (causal_meta((T,), cu_seqlens=torch.tensor([0, T], dtype=torch.int32)),
                                (q[0], k[0], v[0]))):
        want = masked_attention_ref(qq.double(), kk.double(), vv.double(), meta)
        assert want.shape == qq.shape
        for backend in ("auto", *dispatch.available("masked_attention")):
            got = masked_attention(qq, kk, vv, meta, backend=backend)
            assert got.shape == qq.shape and got.dtype == torch.float32, (backend, tuple(got.shape), got.dtype)
            torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5, msg=lambda m: f"{backend}: {m}")
    dm = DecodeMeta(torch.full((1, 1), T - 1, dtype=torch.int32), torch.full((1, 1), -1, dtype=torch.int32),
                    torch.full((1, T), NO_BLOCK, dtype=torch.int32), torch.full((1,), T, dtype=torch.int32))
    want = decode_attention_ref(q[:, -1:].double(), k.double(), v.double(), dm)
    prefill = masked_attention_ref(q.double(), k.double(), v.double(), causal_meta((1, T)))
    torch.testing.assert_close(want, prefill[:, -1:], rtol=1e-12, atol=1e-12)
    for backend in ("auto", *dispatch.available("decode_attention")):
        got = decode_attention(q[:, -1:], k, v, dm, backend=backend)
        assert got.shape == (1, 1, H, Dh) and got.dtype == torch.float32, (backend, tuple(got.shape))
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5, msg=lambda m: f"{backend}: {m}")


def test_cu_seqlens_on_another_device_is_refused_by_name():
    """A packed batch's cu_seqlens must be on q's device like the rest of its metadata: one left on the meta
    device is refused at the entry point, naming it."""
    T = 6
    q = torch.randn(T, 2, 8, generator=torch.Generator().manual_seed(29))
    meta = causal_meta((T,), cu_seqlens=torch.tensor([0, 2, T], dtype=torch.int32))
    on_meta = ChunkMaskMeta(meta.kv_block, meta.q_limit, meta.position_ids, meta.cu_seqlens.to("meta"),
                            meta.max_seqlen)
    for backend in ("auto", "torch"):
        with pytest.raises(ValueError, match="masked_attention: meta.cu_seqlens is on meta but q is on cpu"):
            masked_attention(q, q, q, on_meta, backend=backend)


def test_decode_caches_and_metadata_of_other_shapes_are_refused_by_name_on_every_backend():
    """decode_attention checks its own arguments before any backend runs: a value cache shaped unlike the key
    cache, and metadata fields shaped for another batch or another row count (kv_len of two sequences for one,
    q_limit of two rows for one), each named with the shape it must have."""
    from worldvla.mask import DecodeMeta
    from worldvla.ops import decode_attention

    gen = torch.Generator().manual_seed(30)
    q = torch.randn(1, 1, 2, 8, generator=gen)
    kc, vc = (torch.randn(1, 6, 2, 8, generator=gen) for _ in range(2))
    pos, ql = torch.full((1, 1), 5, dtype=torch.int32), torch.full((1, 1), -1, dtype=torch.int32)
    kvb, kvl = torch.full((1, 6), NO_BLOCK, dtype=torch.int32), torch.full((1,), 6, dtype=torch.int32)
    cases = ((vc[:, :5], DecodeMeta(pos, ql, kvb, kvl),
              r"decode_attention wants q \[B, Q, H, Dh\] and caches \[B, S, Hkv, Dh\]; got \(1, 1, 2, 8\), "
              r"\(1, 6, 2, 8\), \(1, 5, 2, 8\)"),
             (vc, DecodeMeta(pos, ql, kvb, kvl.repeat(2)), r"meta.kv_len must have shape \(1,\), got \(2,\)"),
             (vc, DecodeMeta(pos, ql.repeat(1, 2), kvb, kvl), r"meta.q_limit must have shape \(1, 1\), got \(1, 2\)"))
    for v_cache, meta, message in cases:
        for backend in ("auto", *dispatch.available("decode_attention")):
            with pytest.raises(ValueError, match=message):
                decode_attention(q, kc, v_cache, meta, backend=backend)


def test_decode_kv_len_on_another_device_is_refused_by_name():
    """Every decode metadata field must be on q's device, kv_len included (the torch path read a meta tensor's
    uninitialized values as the cache's lengths)."""
    from worldvla.mask import DecodeMeta
    from worldvla.ops import decode_attention

    q = torch.randn(1, 6, 2, 8, generator=torch.Generator().manual_seed(31))
    dm = DecodeMeta(torch.full((1, 1), 5, dtype=torch.int32), torch.full((1, 1), -1, dtype=torch.int32),
                    torch.full((1, 6), NO_BLOCK, dtype=torch.int32),
                    torch.tensor([6], dtype=torch.int32, device="meta"))
    for backend in ("auto", "torch"):
        with pytest.raises(ValueError, match="decode_attention: meta.kv_len is on meta but q is on cpu"):
            decode_attention(q[:, -1:], q, q, dm, backend=backend)


@pytest.mark.parametrize("sizes,split", [([4, 4], True), ([3, 3, 2], True), ([5, 3], False), ([4, 1, 1, 1, 1], False)])
def test_packed_batches_split_into_documents_exactly_when_that_halves_the_work(monkeypatch, sizes, split):
    """The torch backend runs a packed batch as a padded batch of its documents when n_docs * max_seqlen^2 is at
    most half of T^2, the bound included (two documents of 4 tokens: 2 * 16 = 64 / 2), and the dense [T, T]
    mask otherwise; both give the reference's numbers."""
    from worldvla.ops import attention

    calls = []
    monkeypatch.setattr(attention, "_documents_padded",
                        lambda meta, f=attention._documents_padded: calls.append(1) or f(meta))
    T = sum(sizes)
    meta = causal_meta((T,), cu_seqlens=torch.tensor([0, *sizes], dtype=torch.int32).cumsum(0).to(torch.int32))
    assert meta.max_seqlen == max(sizes)
    q, k, v = (torch.randn(T, 2, 8, generator=torch.Generator().manual_seed(32 + i), dtype=torch.float64)
               for i in range(3))
    got = masked_attention(q, k, v, meta, backend="torch")
    assert len(calls) == int(split)
    torch.testing.assert_close(got, masked_attention_ref(q, k, v, meta), rtol=1e-12, atol=1e-12)


def test_references_without_upcast_compute_in_the_inputs_dtype():
    """upcast=False (the "plain PyTorch at the inputs' precision" baseline of the accuracy rules) computes
    bfloat16 inputs in bfloat16 for a prefill and a decode step alike: not the float32 result rounded, but
    within bfloat16's error of it, and still a bfloat16 output."""
    from worldvla.mask import DecodeMeta
    from worldvla.ops import decode_attention_ref

    gen = torch.Generator().manual_seed(33)
    q, k, v = (torch.randn(2, 16, h, 32, generator=gen).bfloat16() for h in (4, 2, 2))
    dmeta = DecodeMeta(torch.tensor([[13, 14, 15], [7, 8, 9]], dtype=torch.int32),
                       torch.full((2, 3), -1, dtype=torch.int32), torch.full((2, 16), NO_BLOCK, dtype=torch.int32),
                       torch.tensor([16, 10], dtype=torch.int32))
    meta = causal_meta((2, 16))
    for ref, args in ((masked_attention_ref, (q, k, v, meta)), (decode_attention_ref, (q[:, -3:], k, v, dmeta))):
        low, up = ref(*args, upcast=False), ref(*args)
        assert low.dtype == up.dtype == torch.bfloat16
        assert not torch.equal(low, up), ref.__name__
        torch.testing.assert_close(low.float(), up.float(), rtol=0.05, atol=0.05)
