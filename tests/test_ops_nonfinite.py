"""One rule for NaN and infinity in attention, on every backend (worldvla/ops/attention.py's docstring): a
non-finite value in a query, or in the key or value of a key the query may attend to, makes the query's whole
output row NaN; keys it may not attend to never affect it; a row that sees no key is 0.

Each case puts one NaN or infinity in a packed batch (or a padded one, or a decode cache) at a place some rows
see and others do not (earlier rows, later action blocks, other documents), and checks on each backend which
(token, head) rows come out non-finite, exactly; that those are NaN throughout; and that every other row has the
bits of the same call on clean inputs. The native CPU backend runs at each vector width this CPU has. The
Triton kernels (in Triton's interpreter on the CPU) and the torch backend (SDPA) have known gaps, listed in
the docstring: their cases are strict xfails.
"""
import pytest
import torch

from worldvla import VocabLayout, chunk_mask_meta
from worldvla.mask import NO_BLOCK, ChunkMaskMeta, DecodeMeta
from worldvla.ops import decode_attention, decode_attention_ref, dispatch, masked_attention, masked_attention_ref

from test_mask import random_sequence

LAYOUT = VocabLayout.compact()
# NaN and inf through numpy in Triton's interpreter warn ("invalid value encountered in matmul"): expected here.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
NAN, INF = float("nan"), float("inf")
H, HKV = 4, 2  # grouped heads: q heads 0, 1 read kv head 0

# (name, tensor, value). The value goes to one element (dim 3) of one row of kv head 0 (q head 0 for q).
CASES = [("k_nan", "k", NAN), ("k_inf", "k", INF), ("k_neg_inf", "k", -INF), ("v_nan", "v", NAN),
         ("v_inf", "v", INF), ("q_nan", "q", NAN), ("q_inf", "q", INF)]
# The Triton kernels' gaps (module docstring): an infinity in k gives rows whose q is negative there a score of
# -inf, a weight of 0; p @ V over whole tiles lets a hidden value's NaN or infinity reach the tile's rows.
TRITON_GAPS = {"k_inf", "k_neg_inf", "v_nan", "v_inf"}
# The torch backend is SDPA as it is (module docstring): its additive mask lets a hidden key's or value's NaN
# through (NaN + -inf), and a NaN query in a row that sees no key gives NaN, not 0.
TORCH_GAPS = {"k_nan", "k_inf", "k_neg_inf", "v_nan", "v_inf"}


def _backends(op):
    names = ["ref64", "ref"] + dispatch.available(op)
    params = []
    for b in names:
        for name, what, val in CASES:
            marks = ()
            if b == "triton" and name in TRITON_GAPS:
                marks = pytest.mark.xfail(strict=True, reason="Triton kernels: a documented gap of the rule")
            if b == "torch" and name in TORCH_GAPS:
                marks = pytest.mark.xfail(strict=True, reason="torch's SDPA: a documented gap of the rule")
            params.append(pytest.param(b, name, what, val, marks=marks, id=f"{b}-{name}"))
    return params


def _widths(backend):
    """The native backend at every vector width this CPU runs (8 and, on AVX-512 machines, 16)."""
    if backend != "native":
        yield None
        return
    from worldvla import _C

    default = _C.cpu_vector_width()
    try:
        for w in (8, 16):
            try:
                _C.set_cpu_vector_width(w)
            except ValueError:
                continue
            yield w
    finally:
        _C.set_cpu_vector_width(default)


def _run(op, backend, *args):
    if backend.startswith("ref"):
        ref = masked_attention_ref if op == "masked_attention" else decode_attention_ref
        dt = torch.float64 if backend == "ref64" else torch.float32
        meta = args[-1]
        out = ref(*(t.to(dt) for t in args[:-1]), meta)
        return out.squeeze(0) if out.dim() == 4 and args[0].dim() == 3 else out
    fn = masked_attention if op == "masked_attention" else decode_attention
    if not dispatch.supports(op, backend, *args):  # Triton on a machine with a GPU: CUDA tensors only
        pytest.skip(f"the {backend} backend does not take these (CPU) inputs here")
    with torch.no_grad():
        return fn(*args, backend=backend)


def _check(out, clean, expected, where):
    """out, clean [..., H, D]; expected [..., H]: the rows that must be non-finite."""
    bad = ~out.isfinite().all(-1)
    assert torch.equal(bad, expected), (f"{where}: non-finite rows {bad.nonzero().tolist()}, "
                                        f"expected {expected.nonzero().tolist()}")
    assert out[expected].isnan().all(), f"{where}: a row the rule makes NaN is not NaN throughout"
    assert torch.equal(out[~expected], clean[~expected]), f"{where}: a row that must not change changed"


# --------------------------------------------------------------------------- prefill
def _packed(gen):
    """Four documents with action blocks (the chunk rule hides earlier blocks from later ones), short enough
    that the torch backend runs them as a padded batch of documents; `_dense` of it takes the [T, T] path."""
    docs = [random_sequence(LAYOUT, gen, 1, 3, 4) for _ in range(4)]
    ids = torch.tensor(sum(docs, []))
    cu = torch.tensor([0] + [len(d) for d in docs]).cumsum(0).to(torch.int32)
    meta = chunk_mask_meta(ids, LAYOUT, cu_seqlens=cu)
    assert 2 * 4 * meta.max_seqlen ** 2 <= ids.numel() ** 2  # the torch backend's per-document path
    return ids, meta


def _padded(gen):
    """Two rows of one padded batch, the second ending in padding; the first row's token 0 hand-made to see
    no key (its kv_block below its q_limit), the one kind of row the rule makes 0."""
    a = random_sequence(LAYOUT, gen, 1, 3, 4)
    b = random_sequence(LAYOUT, gen, 1, 2, 4)
    ids = torch.tensor([a, b + [LAYOUT.pad] * (len(a) - len(b))])
    meta = chunk_mask_meta(ids, LAYOUT)
    kv, ql = meta.kv_block.clone(), meta.q_limit.clone()
    kv[0, 0], ql[0, 0] = 0, 1
    return ids, ChunkMaskMeta(kv, ql, meta.position_ids, None, 0)


def _layout(name, gen):
    if name == "padded":
        return _padded(gen)
    ids, meta = _packed(gen)
    if name == "packed-dense":  # without max_seqlen the torch backend takes its dense [T, T] path
        meta = ChunkMaskMeta(meta.kv_block, meta.q_limit, meta.position_ids, meta.cu_seqlens, 0)
    return ids, meta


def _prefill_place(meta, what, layout):
    """Where the bad value goes: (index of the token, expected [..., H] non-finite rows)."""
    mask = meta.dense_mask()  # [T, T] or [B, L, L]
    if layout == "padded":
        mask = mask[0]
    if what == "q":  # a query in document 1 (its rows see keys)
        i = int(meta.cu_seqlens[1]) + 5 if layout != "padded" else 5
        rows = torch.zeros(mask.shape[0], H, dtype=torch.bool)
        rows[i, 0] = True
        return i, rows
    # The first bin of document 0's second action block: earlier rows, and the rows of the blocks after it,
    # may not see it; its own block and the tokens after the chunk may; no other document may.
    kv = meta.kv_block[0] if layout == "padded" else meta.kv_block
    j = int((kv == 1).nonzero()[0])
    rows = mask[:, j].unsqueeze(-1).expand(-1, H).clone()
    rows[:, H // HKV:] = False  # q heads 2, 3 read kv head 1
    sees, later = mask[:, j], torch.arange(mask.shape[0]) > j
    assert sees.any() and (later & ~sees).any() and (~sees[:j]).all(), "the case must split the rows"
    return j, rows


@pytest.mark.parametrize("D", [16, 20])  # 20: a head dim past whole vectors (the kernels' scalar tails)
@pytest.mark.parametrize("layout", ["packed-docs", "packed-dense", "padded"])
@pytest.mark.parametrize("backend,name,what,val", _backends("masked_attention"))
def test_prefill_nonfinite_rows(layout, backend, name, what, val, D):
    gen = torch.Generator().manual_seed(7)
    ids, meta = _layout(layout, gen)
    lead = tuple(ids.shape)
    q, k, v = torch.randn(*lead, H, D, generator=gen), torch.randn(*lead, HKV, D, generator=gen), \
        torch.randn(*lead, HKV, D, generator=gen)
    j, rows = _prefill_place(meta, what, layout)
    expected = torch.zeros(*lead, H, dtype=torch.bool)
    (expected[0] if layout == "padded" else expected)[:] = rows
    if layout == "padded":
        assert not meta.dense_mask()[0, 0].any()  # the hand-made row that sees nothing
    if what != "q":  # an infinity's score takes the sign of q there: both signs among the rows that see it
        qs = q[0] if layout == "padded" else q
        seen = qs[rows[:, 0], 0, 3].abs()
        qs[rows[:, 0], 0, 3] = seen * (1 - 2 * (torch.arange(seen.numel()) % 2))
    x = dict(q=q, k=k, v=v)[what].clone()
    (x[0] if layout == "padded" else x)[j, 0, 3] = val
    args = {**dict(q=q, k=k, v=v), what: x}
    for w in _widths(backend):
        clean = _run("masked_attention", backend, q, k, v, meta)
        out = _run("masked_attention", backend, args["q"], args["k"], args["v"], meta)
        _check(out, clean, expected, f"{backend}{'' if w is None else f' w{w}'} {layout} {name}")
        if layout == "padded" and backend != "torch":  # the row that sees no key is 0, with a NaN query too
            q0 = q.clone()
            q0[0, 0, 0, 0] = NAN
            z = _run("masked_attention", backend, q0, k, v, meta)
            assert torch.equal(z[0, 0], torch.zeros_like(z[0, 0])), f"{backend} w{w}: a row without keys"


# --------------------------------------------------------------------------- decode
def _decode_meta(Q):
    """Two sequences of a 48-slot cache. Sequence 0: kv_len 40; slots 28-39 are three action blocks (0, 1, 2)
    and query i sits at 28 + i with q_limit (-1, 1, 2, -1, ...): slot 29 (block 0) comes after row 0, rows 1
    and 2 hide block 0 under the chunk rule, the rows after see it. Sequence 1 must stay finite."""
    S = 48
    kvb = torch.full((2, S), NO_BLOCK, dtype=torch.int32)
    kvb[0, 28:40] = torch.tensor([0] * 4 + [1] * 4 + [2] * 4, dtype=torch.int32)
    q_pos = torch.stack([28 + torch.arange(Q), 20 + torch.arange(Q)]).int().clamp(max=S - 1)
    q_lim = torch.full((2, Q), -1, dtype=torch.int32)
    q_lim[0, 1:3] = torch.tensor([1, 2], dtype=torch.int32)
    return DecodeMeta(q_pos, q_lim, kvb, torch.tensor([40, 33], dtype=torch.int32)), S


@pytest.mark.parametrize("D", [16, 20])
@pytest.mark.parametrize("Q", [5, 40])  # 40 rows: past kDecodeTiledRows, the native prefill's tiled core
@pytest.mark.parametrize("backend,name,what,val", _backends("decode_attention") +
                         [pytest.param(b, "past_kv_len", "k", NAN, id=f"{b}-past_kv_len",
                                       marks=pytest.mark.xfail(strict=True, reason="torch's SDPA: a documented gap")
                                       if b == "torch" else ())
                          for b in ["ref64", "ref"] + dispatch.available("decode_attention")])
def test_decode_nonfinite_rows(Q, backend, name, what, val, D):
    gen = torch.Generator().manual_seed(8)
    meta, S = _decode_meta(Q)
    q = torch.randn(2, Q, H, D, generator=gen)
    kc, vc = torch.randn(2, S, HKV, D, generator=gen), torch.randn(2, S, HKV, D, generator=gen)
    mask = meta.dense_mask()[0]  # [Q, S]
    expected = torch.zeros(2, Q, H, dtype=torch.bool)
    if what == "q":
        i = 1
        expected[0, i, 0] = True
    else:
        j = 42 if name == "past_kv_len" else 29  # past kv_len (no row sees it), or block 0 (rows 3 and on)
        expected[0, :, : H // HKV] = mask[:, j].unsqueeze(-1)
        if name != "past_kv_len":
            assert mask[:, j].any() and not mask[:, j].all()
            # An infinity's score takes the sign of q there: both signs among the rows that see the slot.
            seen = q[0, mask[:, j], 0, 3].abs()
            q[0, mask[:, j], 0, 3] = seen * (1 - 2 * (torch.arange(seen.numel()) % 2))
    x = dict(q=q, k=kc, v=vc)[what].clone()
    x[0, i if what == "q" else j, 0, 3] = val
    args = {**dict(q=q, k=kc, v=vc), what: x}
    for w in _widths(backend):
        clean = _run("decode_attention", backend, q, kc, vc, meta)
        out = _run("decode_attention", backend, args["q"], args["k"], args["v"], meta)
        _check(out, clean, expected, f"{backend}{'' if w is None else f' w{w}'} Q{Q} {name}")
