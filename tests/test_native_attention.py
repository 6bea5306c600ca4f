"""Native (C++/CUDA) chunk-masked attention, prefill and decode, against a float64 reference.

CPU tests run the C++ paths; tests marked gpu run the CUDA kernels. Tolerance rule:
the kernel's max error vs float64 is at most 2x the error of plain PyTorch at the
kernel's precision (fp32 tests add an absolute floor of 1e-7, below fp32 rounding
of these O(1) outputs, for cases where both errors are a few ulps).
"""
import itertools

import pytest
import torch

_C = pytest.importorskip("worldvla._C")

from worldvla import VocabLayout, causal_meta, chunk_mask_meta  # noqa: E402
from worldvla.mask import NO_BLOCK, ChunkMaskMeta, DecodeMeta  # noqa: E402
from worldvla.ops import (decode_attention, decode_attention_ref, dispatch, masked_attention,  # noqa: E402
                          masked_attention_ref)
from worldvla.ops import native_backend as nb  # noqa: E402
from worldvla.tokens import ActionTokenizer, ByteTextTokenizer, SequenceBuilder  # noqa: E402

LAYOUT = VocabLayout.compact()
BUILDER = SequenceBuilder(LAYOUT, ByteTextTokenizer(LAYOUT), ActionTokenizer(LAYOUT))
FP32_FLOOR = 1e-7

# Every output buffer the native wrappers allocate starts poisoned (NaN / an integer sentinel): an
# element a kernel never writes fails instead of passing on leftover bytes.
pytestmark = pytest.mark.usefixtures("poison_outputs")


# --------------------------------------------------------------------------- sequences
def _codes(g, side=2):
    return torch.randint(0, LAYOUT.n_image_codes, (side, side), generator=g)


def _instruction(g, n):
    return "".join(chr(97 + int(c)) for c in torch.randint(0, 26, (n,), generator=g))


def action_ids(g, length, chunk=4):
    """An action-model sample (two history images, `chunk` actions) of exactly `length` tokens."""
    actions = torch.rand(chunk, 7, generator=g) * 1.6 - 0.8
    base = BUILDER.action_sample("", [_codes(g), _codes(g)], actions).input_ids.numel()
    assert length >= base, (length, base)
    return BUILDER.action_sample(_instruction(g, length - base), [_codes(g), _codes(g)], actions).input_ids


def world_ids(g, length):
    """A world-model sample: its action block precedes the last image, so the rule is plain causal."""
    action = torch.rand(7, generator=g) * 1.6 - 0.8
    base = BUILDER.world_sample(_codes(g), action, _codes(g)).input_ids.numel()
    ids = BUILDER.world_sample(_codes(g), action, _codes(g)).input_ids
    text = LAYOUT.text_base + torch.randint(0, 256, (length - base,), generator=g)
    return torch.cat([ids[:1], text, ids[1:]])


def qkv(g, lead, H, Hkv, D, dtype=torch.float32, device="cpu"):
    q = torch.randn(*lead, H, D, generator=g)
    k = torch.randn(*lead, Hkv, D, generator=g)
    v = torch.randn(*lead, Hkv, D, generator=g)
    return [t.to(device, dtype) for t in (q, k, v)]


def assert_close_rule(out, ref64, same_precision, name="", floor=0.0):
    err = (out.double() - ref64).abs().max().item()
    base = (same_precision.double() - ref64).abs().max().item()
    assert not torch.isnan(out).any(), f"{name}: NaN in output"
    assert err <= 2 * base + floor, f"{name}: error {err:.3g} > 2 x torch's {base:.3g} (+{floor:g})"


def check_prefill(q, k, v, meta, name, scale=None):
    out = nb.masked_attention(q, k, v, meta, scale)
    assert out.shape == q.shape and out.dtype == q.dtype
    ref = masked_attention_ref(q.double().cpu(), k.double().cpu(), v.double().cpu(), meta.to("cpu"), scale)
    if q.dim() == 3 and not meta.packed:
        ref = ref.squeeze(0)  # the reference keeps a batch dim for one unpacked [T] sequence
    same = masked_attention_ref(q, k, v, meta, scale, upcast=False)
    if same.dim() == 4 and q.dim() == 3:
        same = same.squeeze(0)
    floor = FP32_FLOOR if q.dtype == torch.float32 else 0.0
    assert_close_rule(out.cpu(), ref, same.cpu(), name, floor)
    return out


# --------------------------------------------------------------------------- CPU prefill
def test_native_backend_is_registered():
    for op in ("masked_attention", "decode_attention", "vq_quantize", "vq_gather", "constrained_sample"):
        assert "native" in dispatch.available(op), op


def test_chunk_metadata_actually_masks(rng):
    meta = chunk_mask_meta(action_ids(rng, 113), LAYOUT)
    dense = meta.dense_mask()
    causal = torch.ones_like(dense).tril()
    assert (causal & ~dense).sum() > 50  # the rule hides earlier action blocks here


@pytest.mark.usefixtures("cpu_width")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D", [32, 64])
def test_prefill_padded_cpu(rng, dtype, D):
    ids = torch.stack([action_ids(rng, 113), torch.cat([action_ids(rng, 100), torch.full((13,), LAYOUT.pad)])])
    meta = chunk_mask_meta(ids, LAYOUT)
    q, k, v = qkv(rng, (2, 113), 4, 2, D, dtype)  # GQA 4:2
    check_prefill(q, k, v, meta, f"padded {dtype} D={D}")


@pytest.mark.usefixtures("cpu_width")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_packed_cpu(rng, dtype):
    # documents of 1, 99 and 103 tokens: T = 203
    docs = [torch.tensor([LAYOUT.bos]), action_ids(rng, 99), action_ids(rng, 103, chunk=3)]
    ids = torch.cat(docs)
    cu = torch.tensor([0, 1, 100, 203], dtype=torch.int32)
    meta = chunk_mask_meta(ids, LAYOUT, cu_seqlens=cu)
    assert meta.max_seqlen == 103
    q, k, v = qkv(rng, (203,), 3, 1, 48, dtype)  # MQA, odd head dim
    check_prefill(q, k, v, meta, f"packed {dtype}")


def test_prefill_single_unpacked_sequence_cpu(rng):
    ids = action_ids(rng, 113)
    meta = chunk_mask_meta(ids, LAYOUT)  # [T] metadata without cu_seqlens
    q, k, v = qkv(rng, (113,), 2, 2, 16)
    check_prefill(q, k, v, meta, "single [T]", scale=0.3)


@pytest.mark.usefixtures("cpu_width")
def test_prefill_length_one_documents_cpu(rng):
    cu = torch.tensor([0, 1, 2, 3, 7], dtype=torch.int32)
    meta = causal_meta((7,), cu_seqlens=cu)
    q, k, v = qkv(rng, (7,), 2, 1, 8)
    out = check_prefill(q, k, v, meta, "length-1 docs")
    # a one-token document attends only to itself: its output is its own value row
    torch.testing.assert_close(out[:3], v[:3].expand(3, 2, 8), rtol=0, atol=1e-6)


def long_blocks_meta(L, first, end, block):
    """Hand-made [1, L] metadata: action blocks of `block` tokens starting at first, first + block, ...
    below `end` (an image and text before them, a tail after), each hidden from the later ones."""
    kv = torch.full((L,), NO_BLOCK, dtype=torch.int32)
    ql = torch.full((L,), -1, dtype=torch.int32)
    for b, s in enumerate(range(first, end, block)):
        kv[s:s + block] = b
        ql[s:s + block] = b
    return ChunkMaskMeta(kv.view(1, L), ql.view(1, L), torch.arange(L).view(1, L), None, L)


def test_prefill_skips_hidden_tiles_cpu(rng):
    """Hand-made metadata with 80-token action blocks after the image: whole key tiles of
    earlier blocks are hidden from whole query blocks (the skip path), the rest masked per pair."""
    L = 300
    meta = long_blocks_meta(L, 40, 280, 80)
    q, k, v = qkv(rng, (1, L), 2, 1, 24)
    check_prefill(q, k, v, meta, "long blocks")


@pytest.mark.usefixtures("cpu_width")
def test_plain_causal_equivalence_cpu(rng):
    """A world-model sample is plain causal under the chunk rule: the chunk metadata must give
    bit-identical output to causal metadata, and match SDPA's is_causal."""
    ids = world_ids(rng, 203)
    chunk = chunk_mask_meta(ids.view(1, -1), LAYOUT)
    assert not bool((chunk.dense_mask() != torch.ones(203, 203, dtype=torch.bool).tril()).any())
    q, k, v = qkv(rng, (1, 203), 4, 4, 32)
    a = nb.masked_attention(q, k, v, chunk)
    b = nb.masked_attention(q, k, v, causal_meta((1, 203)))
    assert torch.equal(a, b)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                            v.transpose(1, 2), is_causal=True).transpose(1, 2)
    ref = masked_attention_ref(q.double(), k.double(), v.double(), chunk)
    assert_close_rule(a, ref, sdpa, "causal vs sdpa", FP32_FLOOR)


@pytest.mark.usefixtures("cpu_width")
def test_prefill_strided_inputs_cpu(rng):
    """q, k, v as views of one fused projection [B, L, H + 2 Hkv, D] (not contiguous)."""
    B, L, H, Hkv, D = 2, 97, 4, 2, 16
    qkv_ = torch.randn(B, L, H + 2 * Hkv, D, generator=rng)
    q, k, v = qkv_.split([H, Hkv, Hkv], dim=2)
    assert not q.is_contiguous()
    meta = chunk_mask_meta(torch.stack([action_ids(rng, L, chunk=2), action_ids(rng, L, chunk=3)]), LAYOUT)
    check_prefill(q, k, v, meta, "strided")


@pytest.mark.usefixtures("cpu_width")
@pytest.mark.parametrize("D", [256, 512])
def test_large_head_dims_cpu(D):
    """Head dims of 256 and 512 in fp32, prefill and decode with more than 32 rows (the prefill's tiled
    kernel), over several seeds: summed over the head dim in one chain, a score rounds about twice as much
    as torch's fp32 matmul, and the error went past the 2x rule for most seeds at 512."""
    B, L, H, Hkv = 1, 63, 8, 1
    meta = causal_meta((B, L))
    for seed in range(6):
        g = torch.Generator().manual_seed(seed)
        q, k, v = qkv(g, (B, L), H, Hkv, D)
        check_prefill(q, k, v, meta, f"prefill D={D} seed {seed}")
        rows = list(range(L - 40, L))
        dm = decode_meta_from(meta, rows, L)
        out = nb.decode_attention(q[:, rows], k, v, dm)
        ref = decode_attention_ref(q[:, rows].double(), k.double(), v.double(), dm)
        same = decode_attention_ref(q[:, rows], k, v, dm, upcast=False)
        assert_close_rule(out, ref, same, f"decode 40 rows D={D} seed {seed}", FP32_FLOOR)


def test_dispatch_native_backend_cpu(rng):
    meta = chunk_mask_meta(action_ids(rng, 113).view(1, -1), LAYOUT)
    q, k, v = qkv(rng, (1, 113), 2, 2, 32)
    out = masked_attention(q, k, v, meta, backend="native")
    torch.testing.assert_close(out, masked_attention(q, k, v, meta, backend="torch"), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- CPU decode
def decode_meta_from(meta: ChunkMaskMeta, rows, kv_len):
    """DecodeMeta of the query rows `rows` of a [1, L] prefill, against a cache of its L tokens."""
    rows = torch.as_tensor(rows)
    return DecodeMeta(rows.view(1, -1).int(), meta.q_limit[:, rows].contiguous(), meta.kv_block.contiguous(),
                      torch.tensor([kv_len], dtype=torch.int32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_matches_prefill_rows_cpu(rng, dtype):
    """Decode with a KV cache == the same rows of the full prefill (chunk rule included)."""
    L = 203
    meta = chunk_mask_meta(action_ids(rng, L, chunk=6).view(1, -1), LAYOUT)
    q, k, v = qkv(rng, (1, L), 4, 2, 32, dtype)
    full = nb.masked_attention(q, k, v, meta)
    rows = [L - 30, L - 21, L - 12, L - 1]  # rows inside different action blocks
    dm = decode_meta_from(meta, rows, L)
    out = nb.decode_attention(q[:, rows], k, v, dm)
    ref = decode_attention_ref(q[:, rows].double(), k.double(), v.double(), dm)
    same = decode_attention_ref(q[:, rows], k, v, dm, upcast=False)
    assert_close_rule(out, ref, same, f"decode {dtype}", FP32_FLOOR if dtype == torch.float32 else 0.0)
    atol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out.float(), full[:, rows].float(), rtol=0, atol=atol)


def test_decode_many_rows_is_the_prefill_cpu(rng):
    """The engine's prefill runs every prompt row through decode attention: 203 query rows (blocks of
    32 plus a remainder) against the cache must give the prefill kernel's rows."""
    L = 203
    meta = chunk_mask_meta(action_ids(rng, L, chunk=6).view(1, -1), LAYOUT)
    q, k, v = qkv(rng, (1, L), 4, 2, 64)
    dm = decode_meta_from(meta, list(range(L)), L)
    out = nb.decode_attention(q, k, v, dm)
    ref = decode_attention_ref(q.double(), k.double(), v.double(), dm)
    assert_close_rule(out, ref, decode_attention_ref(q, k, v, dm, upcast=False), "decode 203 rows", FP32_FLOOR)
    torch.testing.assert_close(out, nb.masked_attention(q, k, v, meta), rtol=0, atol=1e-5)


def test_decode_random_meta_cpu(rng):
    B, Q, H, Hkv, D, S = 3, 5, 6, 2, 40, 77
    q = torch.randn(B, Q, H, D, generator=rng)
    k = torch.randn(B, S, Hkv, D, generator=rng)
    v = torch.randn(B, S, Hkv, D, generator=rng)
    kv_len = torch.tensor([77, 40, 1], dtype=torch.int32)
    q_pos = torch.randint(0, S, (B, Q), generator=rng).int()  # past kv_len too: kv_len must bound
    kv_block = torch.where(torch.rand(B, S, generator=rng) < 0.5, torch.randint(0, 4, (B, S), generator=rng),
                           torch.full((B, S), NO_BLOCK)).int()
    q_limit = torch.randint(-1, 4, (B, Q), generator=rng).int()
    kv_block[:, 0] = NO_BLOCK  # every row sees at least slot 0
    dm = DecodeMeta(q_pos, q_limit, kv_block, kv_len)
    out = nb.decode_attention(q, k, v, dm)
    ref = decode_attention_ref(q.double(), k.double(), v.double(), dm)
    same = decode_attention_ref(q, k, v, dm, upcast=False)
    assert_close_rule(out, ref, same, "decode random", FP32_FLOOR)
    out2 = decode_attention(q, k, v, dm, backend="native")
    assert torch.equal(out, out2)


def nan_past_kv_len(rng, B, S, Hkv, D, kv_len):
    """Random K and V caches [B, S, Hkv, D] with NaN in every slot at or past each sequence's kv_len."""
    k = torch.randn(B, S, Hkv, D, generator=rng)
    v = torch.randn(B, S, Hkv, D, generator=rng)
    for b, n in enumerate(kv_len.tolist()):
        k[b, n:] = float("nan")
        v[b, n:] = float("nan")
    return k, v


def random_blocks(rng, B, S, Q, frac):
    """q_limit [B, Q] and a kv_block [B, S] with a fraction `frac` of slots in action blocks 0..3 (slot 0
    never): DecodeMeta's middle two fields."""
    kv_block = torch.where(torch.rand(B, S, generator=rng) < frac, torch.randint(0, 4, (B, S), generator=rng),
                           torch.full((B, S), NO_BLOCK)).int()
    kv_block[:, 0] = NO_BLOCK
    return torch.randint(-1, 4, (B, Q), generator=rng).int(), kv_block


def check_against_finite_ref(out, q, k, v, dm, name):
    """The 2x rule against the reference, which reads every slot: NaN slots (never read) as zeros."""
    finite = lambda t: torch.nan_to_num(t, nan=0.0)  # noqa: E731
    ref = decode_attention_ref(q.double(), finite(k).double(), finite(v).double(), dm)
    same = decode_attention_ref(q, finite(k), finite(v), dm)
    assert_close_rule(out, ref, same, name, FP32_FLOOR)


@pytest.mark.parametrize("D", [13, 20, 64])
def test_decode_odd_shapes_cpu(rng, D):
    """Head dims off the kernel's 8- and 16-float blocks, three q heads per kv head, a cache that
    ends inside a key group, a row with no key (q_pos < 0), an empty sequence (kv_len 0) and NaN
    in every slot past kv_len (never read)."""
    B, Q, H, Hkv, S = 3, 3, 6, 2, 301
    q = torch.randn(B, Q, H, D, generator=rng)
    kv_len = torch.tensor([293, 0, 137], dtype=torch.int32)
    k, v = nan_past_kv_len(rng, B, S, Hkv, D, kv_len)
    q_pos = torch.stack([torch.tensor([292, 250, -5]), torch.tensor([5, 0, 3]), torch.tensor([136, 130, 99])]).int()
    dm = DecodeMeta(q_pos, *random_blocks(rng, B, S, Q, 0.3), kv_len)
    out = nb.decode_attention(q, k, v, dm)
    assert not torch.isnan(out).any()
    assert torch.equal(out[0, 2], torch.zeros(H, D)) and torch.equal(out[1], torch.zeros(Q, H, D))
    check_against_finite_ref(out, q, k, v, dm, f"decode odd D={D}")


@pytest.mark.usefixtures("cpu_width")
@pytest.mark.parametrize("Q, D", [(1, 13), (5, 64), (32, 20), (33, 20)])
def test_decode_bf16_cache_read_as_it_is_cpu(rng, monkeypatch, Q, D):
    """A bfloat16 cache is read by the row-by-row kernel as it is (up to 32 rows per sequence; more take a
    float32 copy), each value widened exactly: bitwise the result on a float32 copy of q and the cache,
    strided cache rows, NaN past kv_len and an odd head dim included."""
    B, H, Hkv, S = 2, 6, 2, 211
    kv_len = torch.tensor([S - 4, 97], dtype=torch.int32)
    k, v = (t.bfloat16() for t in nan_past_kv_len(rng, B, S, Hkv, D, kv_len))
    fused = torch.randn(B, S, 2 * Hkv + 1, D, generator=rng).bfloat16()  # rows of a cache with a stride
    fused[:, :, :Hkv] = k
    k = fused[:, :, :Hkv]
    q = torch.randn(B, Q, H, D, generator=rng).bfloat16()
    q_pos = torch.stack([torch.randint(0, int(n), (Q,), generator=rng) for n in kv_len]).int()
    dm = DecodeMeta(q_pos, *random_blocks(rng, B, S, Q, 0.3), kv_len)
    converted, as_float32 = [], nb._as_float32
    monkeypatch.setattr(nb, "_as_float32", lambda *ts: converted.extend(ts) or as_float32(*ts))
    out = nb.decode_attention(q, k, v, dm)
    assert [t is k for t in converted] == ([False] if Q <= 32 else [False, True, False])
    assert out.dtype == torch.bfloat16 and not torch.isnan(out).any()
    assert torch.equal(out, nb.decode_attention(q.float(), k.float(), v.float(), dm).bfloat16())


@pytest.mark.usefixtures("cpu_width")
@pytest.mark.parametrize("Q, D", [(33, 20), (47, 64), (70, 13)])
def test_decode_many_rows_random_meta_cpu(rng, Q, D):
    """More than 32 query rows per sequence take the prefill's tiled kernel: random positions (some
    before slot 0, some past kv_len), random chunk-rule blocks, GQA, an empty sequence, per-sequence
    kv_len and NaN in every slot past it (never read)."""
    B, H, Hkv, S = 3, 6, 2, 150
    q = torch.randn(B, Q, H, D, generator=rng)
    kv_len = torch.tensor([150, 97, 0], dtype=torch.int32)
    k, v = nan_past_kv_len(rng, B, S, Hkv, D, kv_len)
    q_pos = torch.randint(-3, S + 20, (B, Q), generator=rng).int()
    dm = DecodeMeta(q_pos, *random_blocks(rng, B, S, Q, 0.4), kv_len)
    out = nb.decode_attention(q, k, v, dm)
    assert not torch.isnan(out).any()
    blind = ~dm.dense_mask().any(-1)  # rows that see no key give zeros
    assert blind.any() and torch.equal(out[blind], torch.zeros_like(out[blind]))
    check_against_finite_ref(out, q, k, v, dm, f"decode {Q} rows D={D}")


@pytest.mark.usefixtures("cpu_width")
def test_decode_rows_either_side_of_the_tiled_switch_cpu(rng):
    """32 rows (the row-by-row decode kernel) and 33 rows (the tiled kernel) of one prompt agree
    with each other and with the float64 reference."""
    L = 120
    meta = chunk_mask_meta(action_ids(rng, L, chunk=6).view(1, -1), LAYOUT)
    q, k, v = qkv(rng, (1, L), 4, 2, 64)
    outs = []
    for rows in (list(range(L - 32, L)), list(range(L - 33, L))):
        dm = decode_meta_from(meta, rows, L)
        out = nb.decode_attention(q[:, rows], k, v, dm)
        ref = decode_attention_ref(q[:, rows].double(), k.double(), v.double(), dm)
        same = decode_attention_ref(q[:, rows], k, v, dm, upcast=False)
        assert_close_rule(out, ref, same, f"decode {len(rows)} rows", FP32_FLOOR)
        outs.append(out)
    torch.testing.assert_close(outs[0], outs[1][:, 1:], rtol=0, atol=1e-5)


def _check_nonfinite_value_at_key_9(rng, limits, dim: int, val: float, seen_rows: slice, decode_rows: list) -> None:
    """One NaN or infinity in value dim `dim` (of a head dim of 20) of key 9, of action block 0, with the rows' block
    limits `limits` ((row slice, limit) pairs): the rows in `seen_rows` (q heads 0 and 1, which read kv head 0) come out
    NaN throughout, every other row has the bits of the clean call, in the prefill and in decode at each list of
    `decode_rows` (a few rows: row by row; many: the tiled kernel)."""
    T, H = 45, 4
    kv = torch.full((1, T), NO_BLOCK, dtype=torch.int32)
    ql = torch.full((1, T), -1, dtype=torch.int32)
    kv[0, 9] = 0
    for rows, limit in limits:
        ql[0, rows] = limit
    meta = ChunkMaskMeta(kv, ql, torch.arange(T).view(1, T).contiguous(), None, 0)
    q, k, v = qkv(rng, (1, T), H, 2, 20)
    bad = v.clone()
    bad[0, 9, 0, dim] = val
    sees = torch.zeros(T, H, dtype=torch.bool)
    sees[seen_rows, :2] = True

    def check(out, clean, expected, name):
        assert torch.equal(~out.isfinite().all(-1), expected), name
        assert out[expected].isnan().all(), name
        assert torch.equal(out[~expected], clean[~expected]), name

    check(nb.masked_attention(q, k, bad, meta)[0], nb.masked_attention(q, k, v, meta)[0], sees, "prefill")
    for rows in decode_rows:
        dm = decode_meta_from(meta, rows, T)
        out, clean = nb.decode_attention(q[:, rows], k, bad, dm), nb.decode_attention(q[:, rows], k, v, dm)
        check(out[0], clean[0], sees[rows], f"decode {len(rows)} rows")


@pytest.mark.usefixtures("cpu_width")
@pytest.mark.parametrize("val", [float("nan"), float("inf")])
def test_nonfinite_value_in_the_head_dims_tail_cpu(rng, val):
    """A NaN or an infinity in value dim 18 of a head dim of 20 (past the whole 8-float vectors) of key 9,
    which rows 0-8 may not see (causal) nor rows 30 on (key 9 is in action block 0, their limit is block 1):
    the rows that see it come out NaN throughout, every other row has the bits of the clean call, in the
    prefill, in decode row by row (5 rows) and in decode's tiled kernel (40 rows)."""
    _check_nonfinite_value_at_key_9(rng, [(slice(30, None), 1)], 18, val, slice(9, 30),
                                    [[5, 12, 29, 30, 44], list(range(5, 45))])


@pytest.mark.parametrize("Q", [3, 40])  # the row-by-row kernel, the tiled one
def test_decode_head_major_cache_cpu(rng, Q):
    """A cache stored head-major ([B, Hkv, S, D], viewed as [B, S, Hkv, D]: head stride S * D): each kv
    head's keys and values are read at that stride, giving the bits of a contiguous cache. Eight sequences
    of four kv heads, so that a work item of the row-by-row kernel holds several heads."""
    B, H, Hkv, D, S = 8, 8, 4, 16, 48
    q = torch.randn(B, Q, H, D, generator=rng)
    k = torch.randn(B, Hkv, S, D, generator=rng).transpose(1, 2)
    v = torch.randn(B, Hkv, S, D, generator=rng).transpose(1, 2)
    q_pos = torch.randint(Q, S, (B, 1), generator=rng) - torch.arange(Q).flip(0)
    dm = DecodeMeta(q_pos.int().contiguous(), torch.full((B, Q), -1, dtype=torch.int32),
                    torch.full((B, S), NO_BLOCK, dtype=torch.int32), torch.full((B,), S, dtype=torch.int32))
    out = nb.decode_attention(q, k, v, dm)
    assert torch.equal(out, nb.decode_attention(q, k.contiguous(), v.contiguous(), dm))
    ref = decode_attention_ref(q.double(), k.double(), v.double(), dm)
    assert_close_rule(out, ref, decode_attention_ref(q, k, v, dm, upcast=False), f"head-major {Q}", FP32_FLOOR)


@pytest.mark.parametrize("inf", [float("inf"), float("-inf")])
def test_decode_infinite_key_past_the_whole_vectors_of_scores_cpu(rng, inf):
    """Rows at position 10 see keys 0-10: key 9's score lies past the softmax's whole 8-key vectors. An
    infinity in that key makes the score +inf or -inf by the sign of q there (both signs among the rows);
    either way the rows that see it are NaN throughout (a -inf score must not become a weight of 0), and a
    row at position 8 keeps its clean bits."""
    S, D = 16, 16
    q = torch.randn(1, 3, 2, D, generator=rng)
    q[0, 0, :, 3], q[0, 1, :, 3] = 1.5, -1.5
    k = torch.randn(1, S, 1, D, generator=rng)
    v = torch.randn(1, S, 1, D, generator=rng)
    bad = k.clone()
    bad[0, 9, 0, 3] = inf
    dm = DecodeMeta(torch.tensor([[10, 10, 8]], dtype=torch.int32), torch.full((1, 3), -1, dtype=torch.int32),
                    torch.full((1, S), NO_BLOCK, dtype=torch.int32), torch.tensor([11], dtype=torch.int32))
    out = nb.decode_attention(q, bad, v, dm)
    assert out[0, :2].isnan().all()
    assert torch.equal(out[0, 2], nb.decode_attention(q, k, v, dm)[0, 2])


def test_decode_rows_that_see_no_key_beside_nan_rows_cpu(rng):
    """Sixteen sequences: the even ones with a NaN query (their rows NaN), the odd ones with an empty cache
    (kv_len 0: their rows see no key and are 0). The threads reuse their scratch from one sequence to the
    next; a row that sees nothing must come out 0 whatever the sequence before it left there."""
    B, Q, H, D, S = 16, 2, 2, 16, 24
    q = torch.randn(B, Q, H, D, generator=rng)
    q[0::2] = float("nan")
    k = torch.randn(B, S, H, D, generator=rng)
    v = torch.randn(B, S, H, D, generator=rng)
    kv_len = torch.tensor([S, 0] * (B // 2), dtype=torch.int32)
    dm = DecodeMeta(torch.full((B, Q), S - 1, dtype=torch.int32), torch.full((B, Q), -1, dtype=torch.int32),
                    torch.full((B, S), NO_BLOCK, dtype=torch.int32), kv_len)
    out = nb.decode_attention(q, k, v, dm)
    assert out[0::2].isnan().all()
    assert torch.equal(out[1::2], torch.zeros(B // 2, Q, H, D))


def test_decode_strided_cache_cpu(rng):
    """A static cache larger than the filled part, viewed through a slice."""
    big_k = torch.randn(2, 100, 3, 16, generator=rng)
    big_v = torch.randn(2, 100, 3, 16, generator=rng)
    k, v = big_k[:, :64], big_v[:, :64]
    q = torch.randn(2, 1, 3, 16, generator=rng)
    dm = DecodeMeta(torch.tensor([[63], [20]], dtype=torch.int32), torch.full((2, 1), -1, dtype=torch.int32),
                    torch.full((2, 64), NO_BLOCK, dtype=torch.int32), torch.tensor([64, 21], dtype=torch.int32))
    out = nb.decode_attention(q, k, v, dm)
    ref = decode_attention_ref(q.double(), k.double(), v.double(), dm)
    same = decode_attention_ref(q, k, v, dm)
    assert_close_rule(out, ref, same, "decode strided", FP32_FLOOR)


# --------------------------------------------------------------------------- bad arguments
def test_explicit_backend_says_why_it_declines(rng):
    meta = causal_meta((1, 16))
    q, k, v = qkv(rng, (1, 16), 2, 1, 8)
    with pytest.raises(ValueError, match="contiguous last dimension"):
        masked_attention(q.transpose(-1, -2).contiguous().transpose(-1, -2), k, v, meta, backend="native")
    with pytest.raises(ValueError, match="forward-only"):
        masked_attention(q.clone().requires_grad_(), k, v, meta, backend="native")
    assert "forward-only" in nb._attention_supports(q.clone().requires_grad_(), k, v, meta).reason


def test_bad_arguments_raise_clearly(rng):
    meta = causal_meta((1, 16))
    q, k, v = qkv(rng, (1, 16), 2, 1, 8)
    with pytest.raises(TypeError, match="float32, bf16 or fp16"):
        nb.masked_attention(q.double(), k.double(), v.double(), meta)
    with pytest.raises(TypeError, match="share one dtype"):
        nb.masked_attention(q, k.half(), v, meta)
    with pytest.raises(TypeError, match="int32"):
        nb.masked_attention(q, k, v, ChunkMaskMeta(meta.kv_block.long(), meta.q_limit, meta.position_ids))
    with pytest.raises(ValueError, match="contiguous last dimension"):
        nb.masked_attention(q.transpose(2, 3).contiguous().transpose(2, 3), k, v, meta)
    with pytest.raises(ValueError, match="metadata covers tokens"):
        nb.masked_attention(q, k, v, causal_meta((1, 15)))
    with pytest.raises(ValueError, match="must divide"):
        nb.masked_attention(*qkv(rng, (1, 16), 3, 2, 8), meta)
    with pytest.raises(ValueError, match=r"\[B, L, H, D\]"):
        nb.masked_attention(q[0, :, 0], k[0, :, 0], v[0, :, 0], meta)
    bad_cu = causal_meta((16,), cu_seqlens=torch.tensor([0, 9, 16], dtype=torch.int32))
    bad_cu.cu_seqlens = torch.tensor([0, 9, 15], dtype=torch.int32)
    with pytest.raises(ValueError, match="cu_seqlens must rise"):
        nb.masked_attention(q[0], k[0], v[0], bad_cu)
    dm = DecodeMeta(torch.zeros(1, 1, dtype=torch.int32), torch.zeros(1, 1, dtype=torch.int32),
                    torch.zeros(1, 16, dtype=torch.int32), torch.tensor([16], dtype=torch.int32))
    with pytest.raises(ValueError, match="kv_block must have shape"):
        nb.decode_attention(q[:, :1], k, v, DecodeMeta(dm.q_pos, dm.q_limit, dm.kv_block[:, :8], dm.kv_len))
    with pytest.raises(TypeError, match="int32"):
        nb.decode_attention(q[:, :1], k, v, DecodeMeta(dm.q_pos.long(), dm.q_limit, dm.kv_block, dm.kv_len))
    # dispatch: the native backend declines what it cannot run, "auto" never picks it then
    with pytest.raises(ValueError, match="does not support"):
        masked_attention(q.double(), k.double(), v.double(), meta, backend="native")
    for backend in ("native", "torch", "auto"):  # no kv heads: refused at the entry points
        with pytest.raises(ValueError, match=r"kv heads \(0\) must divide q heads \(2\) and be at least 1"):
            masked_attention(q, k[:, :, :0], v[:, :, :0], meta, backend=backend)
        with pytest.raises(ValueError, match="kv heads must be at least 1"):
            decode_attention(q[:, :1], k[:, :, :0], v[:, :, :0], dm, backend=backend)


def test_entry_points_refuse_what_no_backend_can_run(rng):
    """Head dim 0, and decode metadata of the wrong shape, are refused by the entry points with a message naming
    the argument on every backend (head dim 0 was a ZeroDivisionError in the native and Triton wrappers; the
    torch backend broadcast decode metadata of the wrong shape, or failed naming no field)."""
    meta = causal_meta((1, 16))
    q, k, v = qkv(rng, (1, 16), 2, 1, 8)
    dm = DecodeMeta(torch.zeros(1, 1, dtype=torch.int32), torch.zeros(1, 1, dtype=torch.int32),
                    torch.zeros(1, 16, dtype=torch.int32), torch.tensor([16], dtype=torch.int32))
    for backend in ("auto", *dispatch.available("masked_attention")):
        with pytest.raises(ValueError, match=r"head dim must be at least 1, got q \(1, 16, 2, 0\)"):
            masked_attention(q[..., :0], k[..., :0], v[..., :0], meta, backend=backend)
    for backend in ("auto", *dispatch.available("decode_attention")):
        with pytest.raises(ValueError, match=r"head dim must be at least 1, got q \(1, 1, 2, 0\)"):
            decode_attention(q[:, :1, :, :0], k[..., :0], v[..., :0], dm, backend=backend)
        with pytest.raises(ValueError, match=r"meta.kv_block must have shape \(1, 16\), got \(1, 8\)"):
            decode_attention(q[:, :1], k, v, DecodeMeta(dm.q_pos, dm.q_limit, dm.kv_block[:, :8], dm.kv_len),
                             backend=backend)
        with pytest.raises(ValueError, match=r"meta.q_pos must have shape \(1, 1\), got \(1, 2\)"):
            decode_attention(q[:, :1], k, v, DecodeMeta(dm.q_pos.repeat(1, 2), dm.q_limit, dm.kv_block, dm.kv_len),
                             backend=backend)
        with pytest.raises(ValueError, match=r"meta.kv_len must have shape \(1,\), got \(1, 1\)"):
            decode_attention(q[:, :1], k, v, DecodeMeta(dm.q_pos, dm.q_limit, dm.kv_block, dm.kv_len[:, None]),
                             backend=backend)


def test_native_declines_autograd(rng):
    meta = causal_meta((1, 16))
    q, k, v = qkv(rng, (1, 16), 2, 1, 8)
    q.requires_grad_(True)
    assert not nb._attention_supports(q, k, v, meta)
    with torch.no_grad():
        assert nb._attention_supports(q, k, v, meta)


# --------------------------------------------------------------------------- torch.compile
def test_custom_op_under_torch_compile_cpu(rng):
    torch._dynamo.reset()
    meta = chunk_mask_meta(action_ids(rng, 113).view(1, -1), LAYOUT)
    q, k, v = qkv(rng, (1, 113), 2, 1, 16)

    def f(q, k, v, kv_block, q_limit):
        return nb.masked_attention_op(q * 2.0, k, v, kv_block, q_limit, None, 113, 0.25) + 1.0

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(q, k, v, meta.kv_block, meta.q_limit)
    torch.testing.assert_close(out, f(q, k, v, meta.kv_block, meta.q_limit), rtol=0, atol=0)
    torch.library.opcheck(nb.masked_attention_op, (q, k, v, meta.kv_block, meta.q_limit, None, 113, 0.25),
                          test_utils=("test_schema", "test_faketensor"))


def test_the_public_ops_compile_whole_on_their_auto_backend_cpu(rng):
    """`worldvla.ops` entry points under torch.compile(fullgraph=True) with backend "auto", which picks the native
    kernels here: the native backend's check for torch.func-wrapped inputs called a function Dynamo cannot trace,
    so every fullgraph compile failed (only the native functions, called directly, compiled)."""
    from worldvla import ops

    torch._dynamo.reset()
    meta = chunk_mask_meta(action_ids(rng, 113).view(1, -1), LAYOUT)
    q, k, v = qkv(rng, (1, 113), 2, 1, 16)
    h, w = torch.randn(3, 16, generator=rng), torch.randn(50, 16, generator=rng)
    dm = DecodeMeta(torch.tensor([[112, 100]], dtype=torch.int32), torch.full((1, 2), -1, dtype=torch.int32),
                    torch.full((1, 113), NO_BLOCK, dtype=torch.int32), torch.tensor([113], dtype=torch.int32))
    assert dispatch.resolve("masked_attention", "auto", "cpu", q, k, v, meta) is nb.masked_attention

    def f(q, k, v, h, w):
        codes = h[:, :4].long().abs().view(3, 2, 2)
        return (ops.masked_attention(q * 2.0, k, v, meta), ops.decode_attention(q[:, :2], k, v, dm),
                ops.constrained_sample(h, w, 10, 40), ops.vq_quantize(h, w), ops.vq_gather(codes, w), ops.linear(h, w))

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    for got, want in zip(compiled(q, k, v, h, w), f(q, k, v, h, w)):
        assert torch.equal(got, want)

def test_public_wrappers_trace_the_custom_ops_cpu(rng):
    """Eager calls of the public wrappers run the implementations directly (no dispatcher); under
    torch.compile and under fake tensors they must still go through the custom ops."""
    torch._dynamo.reset()
    q = torch.randn(1, 2, 2, 16, generator=rng)
    k, v = torch.randn(1, 40, 2, 16, generator=rng), torch.randn(1, 40, 2, 16, generator=rng)
    dm = DecodeMeta(torch.tensor([[39, 30]], dtype=torch.int32), torch.full((1, 2), -1, dtype=torch.int32),
                    torch.full((1, 40), NO_BLOCK, dtype=torch.int32), torch.tensor([40], dtype=torch.int32))
    h, w = torch.randn(3, 16, generator=rng), torch.randn(50, 16, generator=rng)

    def f(q, k, v, h, w):
        codes = h[:, :4].long().abs().view(3, 2, 2)
        return (nb.decode_attention(q * 2.0, k, v, dm), nb.constrained_sample(h, w, 10, 40), nb.vq_quantize(h, w),
                nb.vq_gather(codes, w))

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    for got, want in zip(compiled(q, k, v, h, w), f(q, k, v, h, w)):
        assert torch.equal(got, want)
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode() as mode:
        fq, fk, fv, fh, fw = (mode.from_tensor(t) for t in (q, k, v, h, w))
        fdm = DecodeMeta(*(mode.from_tensor(t) for t in (dm.q_pos, dm.q_limit, dm.kv_block, dm.kv_len)))
        assert nb.decode_attention(fq, fk, fv, fdm).shape == q.shape
        assert nb.constrained_sample(fh, fw, 10, 40).shape == (3,)
        assert nb.vq_quantize(fh, fw).shape == (3,)


# --------------------------------------------------------------------------- GPU
gpu = pytest.mark.gpu


@pytest.fixture(params=["mma", "wgmma", "wgmma128"])
def cuda_engine(request):
    """The CUDA prefill's matrix engines; the wgmma ones only where the GPU and the build have sm_90a."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if request.param not in nb.prefill_engines(torch.cuda.current_device()):
        pytest.skip(f"the {request.param} prefill engine needs an sm_90 GPU and an sm_90a build")
    nb._C.set_cuda_prefill_engine(request.param)
    yield request.param
    nb._C.set_cuda_prefill_engine("auto")


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D", [64, 128])
def test_prefill_padded_cuda(cuda_engine, rng, dtype, D):
    ids = torch.stack([action_ids(rng, 203, chunk=8), torch.cat([action_ids(rng, 150), torch.full((53,), LAYOUT.pad)])])
    meta = chunk_mask_meta(ids, LAYOUT).to("cuda")
    q, k, v = qkv(rng, (2, 203), 8, 2, D, dtype, "cuda")
    check_prefill(q, k, v, meta, f"cuda padded {dtype} D={D}")


@gpu
@pytest.mark.parametrize("D", [64, 128])
def test_prefill_packed_cuda(cuda_engine, rng, D):
    docs = [torch.tensor([LAYOUT.bos]), action_ids(rng, 333, chunk=20), world_ids(rng, 150), action_ids(rng, 113)]
    lens = [d.numel() for d in docs]
    cu = torch.tensor([0] + list(itertools.accumulate(lens)), dtype=torch.int32)
    meta = chunk_mask_meta(torch.cat(docs), LAYOUT, cu_seqlens=cu).to("cuda")
    q, k, v = qkv(rng, (sum(lens),), 4, 4, D, torch.bfloat16, "cuda")
    check_prefill(q, k, v, meta, f"cuda packed D={D}")


@gpu
def test_prefill_long_blocks_and_strides_cuda(cuda_engine, rng):
    L, H, Hkv, D = 700, 4, 2, 128
    meta = long_blocks_meta(L, 50, 690, 128).to("cuda")
    fused = torch.randn(1, L, H + 2 * Hkv, D, generator=rng).to("cuda", torch.bfloat16)
    q, k, v = fused.split([H, Hkv, Hkv], dim=2)
    check_prefill(q, k, v, meta, "cuda long blocks strided")


@gpu
def test_plain_causal_equivalence_cuda(cuda_engine, rng):
    ids = world_ids(rng, 203).view(1, -1)
    q, k, v = qkv(rng, (1, 203), 4, 4, 64, torch.bfloat16, "cuda")
    a = nb.masked_attention(q, k, v, chunk_mask_meta(ids, LAYOUT).to("cuda"))
    b = nb.masked_attention(q, k, v, causal_meta((1, 203), device="cuda"))
    assert torch.equal(a, b)


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("n_splits", [None, 1, 7])
def test_decode_cuda(rng, dtype, D, n_splits):
    B, Q, H, Hkv, S = 3, 5, 8, 2, 1000
    q = torch.randn(B, Q, H, D, generator=rng).to("cuda", dtype)
    k = torch.randn(B, S, Hkv, D, generator=rng).to("cuda", dtype)
    v = torch.randn(B, S, Hkv, D, generator=rng).to("cuda", dtype)
    kv_len = torch.tensor([1000, 517, 1], dtype=torch.int32)
    q_pos = torch.minimum(torch.randint(0, S, (B, Q), generator=rng), (kv_len - 1).view(B, 1)).int()
    kv_block = torch.where(torch.rand(B, S, generator=rng) < 0.5, torch.randint(0, 4, (B, S), generator=rng),
                           torch.full((B, S), NO_BLOCK)).int()
    kv_block[torch.arange(B).view(B, 1), q_pos.long()] = NO_BLOCK
    q_limit = torch.randint(-1, 4, (B, Q), generator=rng).int()
    dm = DecodeMeta(q_pos.cuda(), q_limit.cuda(), kv_block.cuda(), kv_len.cuda())
    out = nb.decode_attention(q, k, v, dm, n_splits=n_splits)
    dmc = DecodeMeta(q_pos, q_limit, kv_block, kv_len)
    ref = decode_attention_ref(q.double().cpu(), k.double().cpu(), v.double().cpu(), dmc)
    same = decode_attention_ref(q, k, v, dm, upcast=False)
    assert_close_rule(out.cpu(), ref, same.cpu(), f"cuda decode {dtype} D={D} splits={n_splits}")


@gpu
def test_decode_matches_prefill_rows_cuda(rng):
    L = 640
    meta = chunk_mask_meta(action_ids(rng, L, chunk=25).view(1, -1), LAYOUT)
    q, k, v = qkv(rng, (1, L), 8, 8, 128, torch.bfloat16, "cuda")
    full = nb.masked_attention(q, k, v, meta.to("cuda"))
    rows = list(range(L - 9 * 8, L, 9))
    dm = decode_meta_from(meta, rows, L)
    dm = DecodeMeta(*(t.cuda() for t in (dm.q_pos, dm.q_limit, dm.kv_block, dm.kv_len)))
    out = nb.decode_attention(q[:, rows], k, v, dm)
    torch.testing.assert_close(out.float(), full[:, rows].float(), rtol=0, atol=2e-2)


@gpu
def test_decode_cuda_graph_replay(rng):
    """Captured once, replayed while kv_len and q_pos change on the device."""
    B, H, D, S = 2, 8, 128, 512
    q = torch.randn(B, 1, H, D, generator=rng).to("cuda", torch.bfloat16)
    k = torch.randn(B, S, H, D, generator=rng).to("cuda", torch.bfloat16)
    v = torch.randn(B, S, H, D, generator=rng).to("cuda", torch.bfloat16)
    dm = DecodeMeta(torch.zeros(B, 1, dtype=torch.int32, device="cuda"),
                    torch.full((B, 1), -1, dtype=torch.int32, device="cuda"),
                    torch.full((B, S), NO_BLOCK, dtype=torch.int32, device="cuda"),
                    torch.ones(B, dtype=torch.int32, device="cuda"))
    nb.decode_attention(q, k, v, dm)  # warm-up outside capture (module loading)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = nb.decode_attention(q, k, v, dm)
    for n in (1, 100, 333, 512):
        dm.kv_len.fill_(n)
        dm.q_pos.fill_(n - 1)
        graph.replay()
        ref = decode_attention_ref(q.float(), k.float(), v.float(), dm)
        torch.testing.assert_close(out.float(), ref, rtol=0, atol=2e-2)


@gpu
def test_custom_ops_under_torch_compile_cuda(rng):
    torch._dynamo.reset()
    meta = chunk_mask_meta(action_ids(rng, 203).view(1, -1), LAYOUT).to("cuda")
    q, k, v = qkv(rng, (1, 203), 4, 4, 64, torch.bfloat16, "cuda")

    @torch.compile(fullgraph=True)
    def f(q, k, v):
        return nb.masked_attention(q, k, v, meta)

    torch.testing.assert_close(f(q, k, v), nb.masked_attention(q, k, v, meta), rtol=0, atol=0)


@gpu
def test_bad_arguments_cuda(rng):
    meta = causal_meta((1, 16), device="cuda")
    q, k, v = qkv(rng, (1, 16), 2, 1, 64, torch.bfloat16, "cuda")
    with pytest.raises(TypeError, match="bf16 or fp16"):
        nb.masked_attention(q.float(), k.float(), v.float(), meta)
    with pytest.raises(ValueError, match="head dims"):
        nb.masked_attention(*qkv(rng, (1, 16), 2, 1, 96, torch.bfloat16, "cuda"), meta)
    with pytest.raises(ValueError, match="16-byte"):
        big = torch.randn(1, 16, 2, 65, device="cuda", dtype=torch.bfloat16)
        nb.masked_attention(big[..., 1:], k, v, meta)
    with pytest.raises(ValueError, match="is on"):
        nb.masked_attention(q, k, v, causal_meta((1, 16)))


@gpu
def test_auto_passes_over_a_misaligned_storage_cuda(rng):
    """A storage that itself starts off a 16-byte boundary (here built through __cuda_array_interface__, as
    DLPack or CuPy imports can give) passes the stride and offset checks: `supports` refuses it, so that `auto`
    runs another backend, and a direct native call raises before the launch."""
    meta = causal_meta((1, 16), device="cuda")
    q, k, v = qkv(rng, (1, 16), 2, 1, 64, torch.float16, "cuda")
    raw = torch.empty(q.numel() * 2 + 16, dtype=torch.uint8, device="cuda")
    iface = {"shape": tuple(q.shape), "typestr": "<f2", "data": (raw.data_ptr() + 2, False), "version": 2}
    odd = torch.as_tensor(type("Imported", (), {"__cuda_array_interface__": iface})(), device="cuda")
    odd.copy_(q)
    assert odd.data_ptr() % 16 == 2 and odd.storage_offset() == 0
    ok = nb._attention_supports(odd, k, v, meta)
    assert not ok and "16-byte" in ok.reason
    with pytest.raises(ValueError, match="16-byte"):
        nb.masked_attention(odd, k, v, meta)
    torch.testing.assert_close(masked_attention(odd, k, v, meta), masked_attention(q, k, v, meta))


def test_cpu_auto_order_follows_the_measured_vector_width():
    """C++ CPU paths lead only where they were measured faster: constrained sampling on AVX2 machines
    and AMD AVX-512 ones but not Intel AVX-512 ones (MKL), nothing where nothing was measured."""
    avx2, intel512, amd512, other = (dispatch._auto_order(c, v) for c, v in
                                     [("AVX2", "amd"), ("AVX512", "intel"), ("AVX512", "amd"), ("DEFAULT", None)])
    assert avx2[("decode_attention", "cpu")][0] == "native" and avx2[("vq_quantize", "cpu")][0] == "native"
    assert avx2[("masked_attention", "cpu")][0] == "native" and avx2["cpu"] == ("torch",)
    avx2_intel = dispatch._auto_order("AVX2", "intel")
    assert avx2_intel == dispatch._auto_order("AVX2", None)
    assert {k: v for k, v in avx2.items() if k != ("linear", "cpu")} == avx2_intel  # the linear: AMD only
    assert intel512[("masked_attention", "cpu")][0] == "native" and ("constrained_sample", "cpu") not in intel512
    assert dispatch._auto_order("AVX512", None) == intel512
    assert amd512[("constrained_sample", "cpu")][0] == "native" and amd512[("vq_gather", "cpu")][0] == "native"
    assert not any(isinstance(k, tuple) and k[1] == "cpu" for k in other) and other["cuda"][0] == "triton"
    assert dispatch.AUTO_ORDER == dispatch._auto_order(dispatch.cpu_capability(), dispatch.cpu_vendor())


@pytest.mark.parametrize("arch,cap,runs", [
    ("90a-real", (9, 0), True), ("90a-real", (10, 0), False), ("90a-real", (8, 9), False),
    ("80", (8, 7), True), ("80", (9, 0), True), ("80-real", (9, 0), False), ("80-real", (8, 6), True),
    ("86-real", (8, 0), False), ("86-virtual", (12, 0), True), ("87-real", (8, 7), True), ("all", (9, 0), None),
])
def test_cuda_arch_coverage(arch, cap, runs):
    """Which GPUs a build's CUDA code runs on: SASS within its major version, sm_90a only on sm_90,
    PTX on anything newer; entries that do not name an architecture cannot tell."""
    assert nb.arch_runs_on(arch, *cap) is runs


def test_native_names_a_driver_too_old_for_its_cuda_runtime(monkeypatch):
    """The module links the CUDA runtime it was built with: on a driver of an older CUDA major version torch
    still works (its own runtime) while every launch of the native kernels fails. That is said up front, and
    "auto" moves on to the other backends (the native one reports the inputs as unsupported)."""
    monkeypatch.setattr(nb._C, "cuda_archs", "90a-real", raising=False)
    monkeypatch.setattr(nb._C, "cuda_runtime_version", 13000, raising=False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda dev=None: (9, 0))
    nb.arch_problem.cache_clear()
    try:
        for driver, ok in ((12040, False), (13000, True), (13020, True), (0, True)):
            monkeypatch.setattr(nb._C, "cuda_driver_version", lambda d=driver: d, raising=False)
            nb.arch_problem.cache_clear()
            msg = nb.arch_problem(0)
            if ok:
                assert msg is None, (driver, msg)
            else:
                assert "built with CUDA 13.0" in msg and "driver supports CUDA 12.4" in msg and "triton" in msg
    finally:
        nb.arch_problem.cache_clear()


def test_native_names_a_gpu_it_was_not_built_for(monkeypatch):
    monkeypatch.setattr(nb._C, "cuda_archs", "90a-real", raising=False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda dev=None: (8, 7))
    nb.arch_problem.cache_clear()
    try:
        msg = nb.arch_problem(0)
        assert "sm_87" in msg and "90a-real" in msg and "DCMAKE_CUDA_ARCHITECTURES=87" in msg
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda dev=None: (7, 5))
        nb.arch_problem.cache_clear()
        assert "sm_80 or newer" in nb.arch_problem(0)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda dev=None: (9, 0))
        nb.arch_problem.cache_clear()
        assert nb.arch_problem(0) is None
    finally:
        nb.arch_problem.cache_clear()


@pytest.mark.parametrize("Q", [3, 40])  # the row-by-row kernel, the tiled one
def test_decode_kv_len_past_the_cache_reads_only_the_cache_cpu(rng, Q):
    """A kv_len larger than the cache (and rows at positions past it) is bounded by the cache's S slots: the
    slots after them in the cache's storage (NaN here) are never read, and the result has the bits of the
    call with kv_len = S."""
    B, H, Hkv, D, S = 2, 4, 2, 16, 40
    big_k = torch.randn(B, S + 24, Hkv, D, generator=rng)
    big_v = torch.randn(B, S + 24, Hkv, D, generator=rng)
    big_k[:, S:], big_v[:, S:] = float("nan"), float("nan")
    k, v = big_k[:, :S], big_v[:, :S]
    q = torch.randn(B, Q, H, D, generator=rng)
    q_pos = (S + 20 - torch.arange(Q)).repeat(B, 1).int()  # past the cache, the first rows past kv_len too
    no_rule = torch.full((B, Q), -1, dtype=torch.int32), torch.full((B, S), NO_BLOCK, dtype=torch.int32)
    out = nb.decode_attention(q, k, v, DecodeMeta(q_pos, *no_rule, torch.tensor([S + 16, S + 24], dtype=torch.int32)))
    dm = DecodeMeta(q_pos, *no_rule, torch.full((B,), S, dtype=torch.int32))
    assert not out.isnan().any()
    assert torch.equal(out, nb.decode_attention(q, k, v, dm))
    ref = decode_attention_ref(q.double(), k.double(), v.double(), dm)
    assert_close_rule(out, ref, decode_attention_ref(q, k, v, dm, upcast=False), f"kv_len past S, {Q} rows",
                      FP32_FLOOR)


@pytest.mark.parametrize("Hkv", [3, 5])
def test_decode_kv_heads_that_do_not_split_evenly_cpu(rng, Hkv):
    """Three or five kv heads (two q heads each): the row-by-row kernel's work items take the kv heads in
    chunks that do not divide them, and the last chunk must stop at the last head. Every sequence's rows
    are those of the sequence decoded alone, and match the float64 reference."""
    B, Q, D, S = 4, 2, 16, 24
    H = 2 * Hkv
    q = torch.randn(B, Q, H, D, generator=rng)
    k = torch.randn(B, S, Hkv, D, generator=rng)
    v = torch.randn(B, S, Hkv, D, generator=rng)
    dm = DecodeMeta(torch.tensor([[S - 2, S - 1]] * B, dtype=torch.int32), torch.full((B, Q), -1, dtype=torch.int32),
                    torch.full((B, S), NO_BLOCK, dtype=torch.int32), torch.full((B,), S, dtype=torch.int32))
    out = nb.decode_attention(q, k, v, dm)
    ref = decode_attention_ref(q.double(), k.double(), v.double(), dm)
    assert_close_rule(out, ref, decode_attention_ref(q, k, v, dm, upcast=False), f"{Hkv} kv heads", FP32_FLOOR)
    for b in range(B):
        one = DecodeMeta(dm.q_pos[b:b + 1], dm.q_limit[b:b + 1], dm.kv_block[b:b + 1], dm.kv_len[b:b + 1])
        assert torch.equal(out[b:b + 1], nb.decode_attention(q[b:b + 1], k[b:b + 1], v[b:b + 1], one)), b


def test_direct_calls_refuse_kv_heads_that_do_not_divide_the_heads():
    """The binding's own check, for callers that bypass the Python wrappers: 3 q heads over 2 kv heads (or
    none) is refused by name before any pointer is read (no sequences here, so nothing would be read)."""
    s = (0, 0, 0)
    for h, hkv in ((3, 2), (2, 0)):
        with pytest.raises(ValueError, match="masked_attention: n_kv_heads must divide n_heads"):
            _C.masked_attention_fwd(-1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, h, hkv, 8, s, s, s, s, 0, 1.0)
        with pytest.raises(ValueError, match="decode attention: n_kv_heads must divide n_heads"):
            _C.decode_attention(-1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, h, hkv, 8, s, s, s, s, 0, 1.0, 0, 0, 1, 1)


def test_a_direct_decode_call_of_no_sequences_or_no_rows_does_nothing():
    """`_C.decode_attention` with batch 0 or no query rows divided by its zero work items (SIGFPE: the process died);
    the Python wrappers return before the call, direct callers did not. Run in a child process, which the old
    build killed."""
    import subprocess
    import sys

    code = ("from worldvla import _C\n"
            "s = (0, 0, 0)\n"
            "for batch, n_q in ((0, 1), (1, 0), (0, 0)):\n"
            "    _C.decode_attention(-1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, batch, n_q, 4, 2, 1, 4, s, s, s, s, 0, 1.0, 0, 0, "
            "1, 4)\n"
            "print('done')\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "done", (run.returncode, run.stderr[-2000:])


def test_nonfinite_value_at_a_key_in_the_rows_limit_block_cpu(rng):
    """A NaN in the value of key 9, of action block 0: rows 30-39 have block limit 0, which keeps the key
    visible (only blocks below the limit are hidden), rows 40 on limit 1. The rows that see the key (9-39,
    q heads 0 and 1) come out NaN throughout, the others keep the bits of the clean call, in the prefill and
    in decode row by row (5 rows) and tiled (40 rows)."""
    _check_nonfinite_value_at_key_9(rng, [(slice(30, 40), 0), (slice(40, None), 1)], 3, float("nan"), slice(9, 40),
                                    [[5, 12, 30, 39, 40], list(range(5, 45))])


# --------------------------------------------------------------------------- CPU: checks and launch plans
def test_ptx_runs_on_the_capability_it_was_built_for():
    """PTX ("-virtual") code runs on its own compute capability as well as on every newer one; a build for
    "80-virtual" alone must not call an sm_80 GPU unsupported."""
    assert nb.arch_runs_on("80-virtual", 8, 0) is True
    assert nb.arch_runs_on("90-virtual", 9, 0) is True
    assert nb.arch_runs_on("86-virtual", 8, 0) is False
    assert nb.arch_runs_on("90a-virtual", 9, 0) is True


def test_a_driver_of_the_runtimes_major_version_but_an_older_minor_runs_it(monkeypatch):
    """Within one CUDA major version, minor-version compatibility lets an older driver run the runtime: a
    12.8 build on a 12.4 driver is no problem; a 12.8 build on an 11.8 driver is, and both versions are named."""
    monkeypatch.setattr(nb._C, "cuda_archs", "90a-real", raising=False)
    monkeypatch.setattr(nb._C, "cuda_runtime_version", 12080, raising=False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda dev=None: (9, 0))
    try:
        monkeypatch.setattr(nb._C, "cuda_driver_version", lambda: 12040, raising=False)
        nb.arch_problem.cache_clear()
        assert nb.driver_problem() is None and nb.arch_problem(0) is None
        monkeypatch.setattr(nb._C, "cuda_driver_version", lambda: 11080, raising=False)
        nb.arch_problem.cache_clear()
        msg = nb.arch_problem(0)
        assert "built with CUDA 12.8" in msg and "driver supports CUDA 11.8" in msg and "CUDA 12.0 or newer" in msg
    finally:
        nb.arch_problem.cache_clear()


def test_tensors_on_two_devices_are_named_each_with_its_device(rng):
    """The device error names the tensor that is elsewhere with its device, and the first one with its own."""
    meta = causal_meta((1, 16))
    q, k, v = qkv(rng, (1, 16), 2, 1, 8)
    with pytest.raises(ValueError, match=r"k is on meta but q is on cpu"):
        nb.masked_attention(q, k.to("meta"), v, meta)
    with pytest.raises(ValueError, match=r"v is on meta but q is on cpu"):
        nb.masked_attention(q, k, v.to("meta"), meta)


def test_no_kv_heads_is_refused_by_name(rng):
    """k and v with no heads are refused as a bad head count (a ValueError, so `supports` declines and `auto`
    moves on), not a ZeroDivisionError from the divisibility check."""
    meta = causal_meta((1, 16))
    q, k, v = qkv(rng, (1, 16), 2, 1, 8)
    k0, v0 = k[:, :, :0], v[:, :, :0]
    with pytest.raises(ValueError, match=r"kv heads \(0\) must divide q heads \(2\)"):
        nb.masked_attention(q, k0, v0, meta)
    assert "kv heads (0)" in nb._attention_supports(q, k0, v0, meta).reason
    dm = DecodeMeta(torch.zeros(1, 1, dtype=torch.int32), torch.full((1, 1), -1, dtype=torch.int32),
                    torch.full((1, 16), NO_BLOCK, dtype=torch.int32), torch.ones(1, dtype=torch.int32))
    assert not nb._decode_supports(q[:, :1], k0, v0, dm)


def test_steps_of_up_to_the_plan_rows_split_as_one_row(monkeypatch):
    """decode_splits plans steps of up to DECODE_PLAN_QUERIES rows as a one-row step (the split of the cache is
    the mask plan's); a step of one row more is planned from its own rows."""
    from worldvla.mask import DECODE_PLAN_QUERIES

    monkeypatch.setattr(nb, "_sm_count", lambda device: 4)
    k = torch.empty(1, 1024, 1, 64)
    one, plan, more = (nb.decode_splits(torch.empty(1, Q, 8, 64), k)
                       for Q in (1, DECODE_PLAN_QUERIES, DECODE_PLAN_QUERIES + 1))
    assert one == plan == (8, 128)  # one CTA: eight splits give the 4 SMs two each
    assert more == (1, 1024)  # 9 row groups of 16 rows already give the SMs two CTAs each


def _fake_cuda(*shapes_and_dtypes):
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode()
    try:
        with mode:
            return mode, [torch.empty(s, dtype=d, device="cuda") for s, d in shapes_and_dtypes]
    except (RuntimeError, AssertionError) as err:  # a torch without CUDA support
        pytest.skip(f"fake CUDA tensors are not available here: {err}")


def test_cuda_launch_of_too_many_heads_is_refused_before_it():
    """The CUDA prefill puts sequences and heads on grid dimensions of at most 65535: more q heads are refused
    by the checks (here on fake CUDA tensors, as torch.compile traces them), naming both counts."""
    bf16, i32 = torch.bfloat16, torch.int32
    mode, (q, k, meta) = _fake_cuda(((1, 16, 65536, 64), bf16), ((1, 16, 1, 64), bf16), ((1, 16), i32))
    with mode, pytest.raises(ValueError, match="at most 65535 sequences and heads per launch, got 1 and 65536"):
        nb.masked_attention_op(q, k, k, meta, meta, None, 16, 0.125)
    mode, (q, k, meta) = _fake_cuda(((1, 16, 65535, 64), bf16), ((1, 16, 1, 64), bf16), ((1, 16), i32))
    with mode:
        assert nb.masked_attention_op(q, k, k, meta, meta, None, 16, 0.125).shape == q.shape


def _decode_case(rng, B=3, Q=2, H=4, Hkv=2, D=16, S=40):
    q = torch.randn(B, Q, H, D, generator=rng)
    k, v = torch.randn(B, S, Hkv, D, generator=rng), torch.randn(B, S, Hkv, D, generator=rng)
    q_pos = torch.randint(S // 2, S, (B, Q), generator=rng).int()
    q_limit = torch.randint(-1, 4, (B, Q), generator=rng).int()
    return q, k, v, q_pos, q_limit


def test_decode_kv_block_rows_of_a_wider_tensor_cpu(rng):
    """kv_block only needs unit column stride: rows of a wider tensor (a cache's block table with spare
    columns) are read at their own row stride, giving the bits of a contiguous copy."""
    B, S = 3, 40
    q, k, v, q_pos, q_limit = _decode_case(rng, B=B, S=S)
    wide = torch.randint(0, 4, (B, S + 8), generator=rng).int()
    kv_len = torch.full((B,), S, dtype=torch.int32)
    view = DecodeMeta(q_pos, q_limit, wide[:, :S], kv_len)
    assert view.kv_block.stride(0) == S + 8
    copy = DecodeMeta(q_pos, q_limit, wide[:, :S].contiguous(), kv_len)
    out = nb.decode_attention(q, k, v, view)
    assert torch.equal(out, nb.decode_attention(q, k, v, copy))
    assert_close_rule(out, decode_attention_ref(q.double(), k.double(), v.double(), copy),
                      decode_attention_ref(q, k, v, copy), "kv_block rows of a wider tensor", FP32_FLOOR)


def test_decode_kv_len_must_be_contiguous(rng):
    """kv_len is read as B consecutive int32s: a strided view is refused by name, not read past its values."""
    B, S = 2, 40
    q, k, v, q_pos, q_limit = _decode_case(rng, B=B, S=S)
    kv_len = torch.tensor([S, 3, S, 3], dtype=torch.int32)[::2]
    meta = DecodeMeta(q_pos, q_limit, torch.full((B, S), NO_BLOCK, dtype=torch.int32), kv_len)
    with pytest.raises(ValueError, match="kv_len must be contiguous"):
        nb.decode_attention(q, k, v, meta)
    assert not nb._decode_supports(q, k, v, meta)
