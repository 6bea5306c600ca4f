"""Triton split-KV decode attention against the float64 references.

Decode with a KV cache must equal recomputing the full sequence: the rows of the chunk-masked
attention over the whole sequence at the queried positions.
"""
import pytest
import torch

triton = pytest.importorskip("triton")

from worldvla import VocabLayout, chunk_mask_meta  # noqa: E402
from worldvla.mask import NO_BLOCK, DecodeMeta  # noqa: E402
from worldvla.ops import decode_attention, decode_attention_ref, masked_attention_ref  # noqa: E402
from worldvla.tokens import image_tokens  # noqa: E402

from worldvla.kernels import decode_attention as K  # noqa: E402

from test_triton_attention import FP32_FLOOR_EPS, assert_close_rule  # noqa: E402  (tests/ is on sys.path)

DEV = "cuda" if torch.cuda.is_available() else "cpu"
LAYOUT = VocabLayout.compact()
DIMS = 7


def action_sequence(g, n_text, chunk):
    img = image_tokens(torch.randint(0, LAYOUT.n_image_codes, (4, 4), generator=g), LAYOUT)
    blocks = [torch.cat([torch.tensor([LAYOUT.boa]), LAYOUT.bin_base + torch.randint(0, 256, (DIMS,), generator=g),
                         torch.tensor([LAYOUT.eoa])]) for _ in range(chunk)]
    return torch.cat([torch.tensor([LAYOUT.bos]), LAYOUT.text_base + torch.randint(0, 256, (n_text,), generator=g),
                      img, img.clone(), torch.tensor([LAYOUT.sep])] + blocks + [torch.tensor([LAYOUT.sep])])


def caches_from_sequences(g, seqs, S, H, Hkv, D, dtype, poison=True):
    """Full q/k/v per sequence and caches [B, S, Hkv, D] whose slots past each length hold NaN."""
    B = len(seqs)
    lens = [s.numel() for s in seqs]
    qs = [torch.randn(n, H, D, generator=g) for n in lens]
    ks = [torch.randn(n, Hkv, D, generator=g) for n in lens]
    vs = [torch.randn(n, Hkv, D, generator=g) for n in lens]
    fill = float("nan") if poison else 0.0
    k_cache = torch.full((B, S, Hkv, D), fill)
    v_cache = torch.full((B, S, Hkv, D), fill)
    kv_block = torch.full((B, S), NO_BLOCK, dtype=torch.int32)
    for b, (ids, k, v) in enumerate(zip(seqs, ks, vs)):
        n = ids.numel()
        k_cache[b, :n], v_cache[b, :n] = k, v
        kv_block[b, :n] = chunk_mask_meta(ids, LAYOUT).kv_block
    cast = lambda t: t.to(DEV, dtype)
    return [cast(t) for t in qs], [cast(t) for t in ks], [cast(t) for t in vs], cast(k_cache), cast(v_cache), \
        kv_block.to(DEV), torch.tensor(lens, dtype=torch.int32, device=DEV)


def full_rows(ids, q, k, v, positions, dtype=torch.float64):
    """Rows `positions` of the chunk-masked attention over the whole sequence, computed in `dtype`."""
    out = masked_attention_ref(q.to(dtype).unsqueeze(0), k.to(dtype).unsqueeze(0), v.to(dtype).unsqueeze(0),
                               chunk_mask_meta(ids.unsqueeze(0), LAYOUT).to(DEV), upcast=False)[0]
    return out[positions]


def no_block_meta(q_pos, kv_len, S: int) -> DecodeMeta:
    """Decode metadata of plain causal rows, no action block in a cache of S slots: positions [B][Q], lengths [B]."""
    q_pos = torch.tensor(q_pos, dtype=torch.int32, device=DEV)
    return DecodeMeta(q_pos, torch.full(q_pos.shape, -1, dtype=torch.int32, device=DEV),
                      torch.full((q_pos.shape[0], S), NO_BLOCK, dtype=torch.int32, device=DEV),
                      torch.tensor(kv_len, dtype=torch.int32, device=DEV))


def check_splits(q, kc, vc, meta, splits) -> None:
    """The kernel at each split count against the float64 reference under the tolerance rule (the same computation
    in float32 as the measure, its inputs contiguous); the output has the queries' shape, contiguous."""
    ref = decode_attention_ref(q.double(), kc.double(), vc.double(), meta)
    same = decode_attention_ref(q.contiguous(), kc.contiguous(), vc.contiguous(), meta, upcast=False)
    for n in splits:
        out = K.decode_attention(q, kc, vc, meta, num_splits=n, block_n=32)
        assert out.shape == q.shape and out.is_contiguous()
        assert_close_rule(out, ref, same, f"{n} splits", floor_eps=FP32_FLOOR_EPS)


@pytest.mark.parametrize("num_splits,rows", [(1, "mixed"), (3, "mixed"), (2, "late"), (2, "last_block")])
def test_decode_equals_full_recompute(rng, num_splits, rows, poison_empty):
    """Query rows at different positions against caches of 150 and 97 tokens: "mixed" = the last block's
    BOA, the first block's BOA and the last token; "late" = the last token and the last block's BOA
    (rows with different block limits over the same key tiles); "last_block" = the last block's BOA alone (its
    earlier blocks are hidden, so whole key tiles are skipped)."""
    seqs = [action_sequence(rng, 9, chunk=10), action_sequence(rng, 19, chunk=3)]
    assert [s.numel() for s in seqs] == [150, 97]
    S, H, Hkv, D = 203, 4, 2, 64
    qs, ks, vs, kc, vc, kvb, kvlen = caches_from_sequences(rng, seqs, S, H, Hkv, D, torch.float32)
    pos = []
    for ids in seqs:
        boa = (ids == LAYOUT.boa).nonzero().squeeze(1)
        last = torch.tensor(ids.numel() - 1)
        pos.append(torch.stack({"mixed": [boa[-1], boa[0], last], "late": [last, boa[-1]], "last_block": [boa[-1]]}[rows]))
    n_q = pos[0].numel()
    q = torch.stack([qq[p] for qq, p in zip(qs, pos)])  # [B, 3, H, D]
    q_limit = torch.stack([chunk_mask_meta(ids, LAYOUT).q_limit[p] for ids, p in zip(seqs, pos)]).to(DEV)
    meta = DecodeMeta(torch.stack(pos).to(DEV, torch.int32), q_limit.to(torch.int32), kvb, kvlen)
    out = K.decode_attention(q, kc, vc, meta, num_splits=num_splits, block_n=32)
    assert out.shape == (2, n_q, H, D) and not torch.isnan(out).any()
    for b, ids in enumerate(seqs):  # float64, and torch's float32 over the whole sequence
        want, same = (full_rows(ids, qs[b], ks[b], vs[b], pos[b].to(DEV), t) for t in (torch.float64, torch.float32))
        assert_close_rule(out[b], want, same, f"sequence {b}", floor_eps=FP32_FLOOR_EPS)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_decode_low_precision_rule(rng, dtype, poison_empty):
    seqs = [action_sequence(rng, 30, chunk=5), action_sequence(rng, 71, chunk=1)]
    S, H, Hkv, D = 160, 8, 2, 128
    qs, ks, vs, kc, vc, kvb, kvlen = caches_from_sequences(rng, seqs, S, H, Hkv, D, dtype, poison=False)
    q = torch.randn(2, 1, H, D, generator=rng).to(DEV, dtype)
    pos = (kvlen - 1).view(2, 1)
    meta = DecodeMeta(pos, torch.full((2, 1), -1, dtype=torch.int32, device=DEV), kvb, kvlen)
    out = decode_attention(q, kc, vc, meta, backend="triton")
    ref = decode_attention_ref(q.double(), kc.double(), vc.double(), meta)
    same = decode_attention_ref(q, kc, vc, meta, upcast=False)
    err = (out.double() - ref).abs().max().item()
    base = (same.double() - ref).abs().max().item()
    assert err <= 2 * base, (err, base)


def test_decode_rows_without_keys_and_random_meta(rng, poison_empty):
    """Arbitrary metadata (rows hiding every key, kv_len 0) gives the reference's zeros, never NaN."""
    B, n_q, S, H, D = 3, 5, 90, 2, 64
    q = torch.randn(B, n_q, H, D, generator=rng).to(DEV)
    kc = torch.randn(B, S, H, D, generator=rng).to(DEV)
    vc = torch.randn(B, S, H, D, generator=rng).to(DEV)
    meta = DecodeMeta(torch.randint(0, S, (B, n_q), generator=rng, dtype=torch.int32).to(DEV),
                      torch.randint(-1, 6, (B, n_q), generator=rng, dtype=torch.int32).to(DEV),
                      torch.randint(0, 5, (B, S), generator=rng, dtype=torch.int32).to(DEV),
                      torch.tensor([S, 41, 0], dtype=torch.int32, device=DEV))
    ref = decode_attention_ref(q.double(), kc.double(), vc.double(), meta)
    same = decode_attention_ref(q, kc, vc, meta, upcast=False)
    assert bool((ref[0] != 0).any() and (ref[1] != 0).any()), "rows that see keys must be compared too"
    for splits in (1, 2):
        out = K.decode_attention(q, kc, vc, meta, num_splits=splits, block_n=32)
        assert_close_rule(out, ref, same, f"{splits} splits", floor_eps=FP32_FLOOR_EPS)
        assert torch.all(out[ref.abs().sum(-1) == 0] == 0) and torch.all(out[2] == 0)


def test_decode_bad_inputs(rng):
    q = torch.randn(1, 1, 4, 64, device=DEV)
    with pytest.raises(ValueError, match="disagree"):
        K.decode_attention(q, torch.randn(1, 10, 3, 64, device=DEV), torch.randn(1, 10, 3, 64, device=DEV), None)
    kc = torch.randn(1, 10, 2, 64, device=DEV)
    i32 = dict(dtype=torch.int32, device=DEV)
    bad = DecodeMeta(torch.zeros(1, 2, **i32), torch.zeros(1, 2, **i32), torch.zeros(1, 10, **i32), torch.ones(1, **i32))
    with pytest.raises(ValueError, match="q_pos"):
        K.decode_attention(q, kc, kc, bad)


@pytest.mark.gpu
def test_gpu_decode_long_cache():
    g = torch.Generator().manual_seed(0)
    B, n_q, S, H, Hkv, D = 4, 10, 4096, 32, 8, 128
    q = torch.randn(B, n_q, H, D, generator=g).cuda().bfloat16()
    kc = torch.randn(B, S, Hkv, D, generator=g).cuda().bfloat16()
    vc = torch.randn(B, S, Hkv, D, generator=g).cuda().bfloat16()
    kv_len = torch.tensor([4096, 3001, 700, 1], dtype=torch.int32).cuda()
    kvb = torch.full((B, S), NO_BLOCK, dtype=torch.int32)
    kvb[:, 600:690] = torch.arange(10).repeat_interleave(9)
    meta = DecodeMeta((kv_len - 1).view(B, 1).expand(B, n_q).contiguous(),
                      torch.arange(n_q, dtype=torch.int32).expand(B, n_q).contiguous().cuda(),
                      kvb.cuda(), kv_len)
    out = K.decode_attention(q, kc, vc, meta)
    ref = decode_attention_ref(q.double(), kc.double(), vc.double(), meta)
    same = decode_attention_ref(q, kc, vc, meta, upcast=False)
    assert (out.double() - ref).abs().max() <= 2 * (same.double() - ref).abs().max()


def test_inputs_that_need_gradients_go_to_another_backend():
    """The Triton decode kernel has no backward: it took inputs that need gradients (first in the CUDA auto
    order), and a backward through it then failed; such inputs now go to a backend that has one."""
    from worldvla.ops import triton_backend as tb

    q, k = torch.randn(1, 2, 4, 16, device=DEV), torch.randn(1, 8, 2, 16, device=DEV)
    meta = DecodeMeta(torch.tensor([[6, 7]], dtype=torch.int32, device=DEV), torch.full((1, 2), -1, dtype=torch.int32,
                      device=DEV), torch.full((1, 8), NO_BLOCK, dtype=torch.int32, device=DEV),
                      torch.tensor([8], dtype=torch.int32, device=DEV))
    assert tb._decode_supports(q, k, k, meta) is True
    assert "forward-only" in tb._decode_supports(q.requires_grad_(), k, k, meta).reason
    with torch.no_grad():
        assert tb._decode_supports(q, k, k, meta) is True


def test_batches_beyond_the_grid_go_to_another_backend():
    """B x Hkv is a grid axis of both decode kernels, at most 65535 programs: larger batches are declined
    with the reason (so "auto" takes another backend), and the kernel's entry point refuses them before
    launching. The inputs are expanded (zero strides): nothing of that size is allocated."""
    from worldvla.ops import dispatch
    from worldvla.ops import triton_backend as tb

    def inputs(B, Hkv):
        q = torch.zeros(1, 1, 1, 16, device=DEV).expand(B, 2, 2 * Hkv, 16)
        cache = torch.zeros(1, 1, 1, 16, device=DEV).expand(B, 8, Hkv, 16)
        int32 = lambda *shape: torch.zeros((1,) * len(shape), dtype=torch.int32, device=DEV).expand(*shape)
        return q, cache, cache, DecodeMeta(int32(B, 2), int32(B, 2), int32(B, 8), int32(B))

    assert tb._decode_supports(*inputs(65535, 1)) is True
    too_many = inputs(32768, 2)
    why = tb._decode_supports(*too_many)
    assert not why and "batch x kv heads = 65536 > 65535" in why.reason, why
    assert dispatch.supports("decode_attention", "triton", *too_many) is False
    with pytest.raises(ValueError, match="'triton' backend of 'decode_attention' does not support.*65535"):
        dispatch.resolve("decode_attention", "triton", DEV, *too_many)
    with pytest.raises(ValueError, match="batch x kv heads = 65536 > 65535"):
        K.decode_attention(*too_many)


@pytest.mark.parametrize("num_splits", [2, 3])
def test_split_kv_merge_when_a_later_split_dominates(rng, num_splits, poison_empty):
    """In the other tests the first split holds the most keys and dominates, so the merge's rescaling of the
    running sums never mattered: here the query matches one key of the last split strongly."""
    B, S, H, D = 1, 96, 2, 64
    kc = torch.randn(B, S, H, D, generator=rng).to(DEV)
    vc = torch.randn(B, S, H, D, generator=rng).to(DEV)
    q = (3.0 * kc[:, 90]).unsqueeze(1)  # [B, 1, H, D]: its best key is near the end of the cache
    meta = no_block_meta([[S - 1]], [S], S)
    check_splits(q, kc, vc, meta, [num_splits])


@pytest.mark.parametrize("n_q,block_r", [(10, 16), (20, 32)])
def test_query_rows_spanning_several_row_tiles(rng, poison_empty, n_q, block_r):
    """Decoding the last n_q tokens with 4 query heads per KV head is 4 n_q rows of a KV group, in several row
    tiles (the interpreter takes the GPU's), each of which must place its rows at their own queries and heads:
    10 queries (a parallel chunk step) take a one-row step's 16-row tile, 20 the float32 cap of 32 rows."""
    seqs = [action_sequence(rng, 9, chunk=10), action_sequence(rng, 19, chunk=3)]
    S, H, Hkv, D = 160, 8, 2, 32
    qs, ks, vs, kc, vc, kvb, kvlen = caches_from_sequences(rng, seqs, S, H, Hkv, D, torch.float32)
    plan, _ = K.launch_plan(torch.empty(2, n_q, H, D, device=DEV), kc)
    assert plan[0] == 4 * n_q and plan[2] == block_r, plan
    pos = [torch.arange(ids.numel() - n_q, ids.numel()) for ids in seqs]
    q = torch.stack([qq[p] for qq, p in zip(qs, pos)])
    q_limit = torch.stack([chunk_mask_meta(ids, LAYOUT).q_limit[p] for ids, p in zip(seqs, pos)])
    meta = DecodeMeta(torch.stack(pos).to(DEV, torch.int32), q_limit.to(DEV, torch.int32), kvb, kvlen)
    for splits in (1, 2):
        out = K.decode_attention(q, kc, vc, meta, num_splits=splits, block_n=32)
        for b, ids in enumerate(seqs):
            want, same = (full_rows(ids, qs[b], ks[b], vs[b], pos[b].to(DEV), t) for t in (torch.float64, torch.float32))
            assert_close_rule(out[b], want, same, f"{splits} splits, sequence {b}", floor_eps=FP32_FLOOR_EPS)


class _NoLaunch:
    """A kernel stand-in whose launches do nothing: `kernel[grid](...)`."""
    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def test_steps_of_a_few_rows_launch_as_a_one_row_step(monkeypatch):
    """Parallel chunk decoding's step (K query rows, one per action block) must give each row's attention bit
    for bit as the one-row sequential step does. The row tile (tl.dot's M) and the split of the cache (the
    order in which partial softmaxes merge) were chosen from all the rows: with 4 query heads per KV head,
    10 queries took a 64-row tile (bf16) and a third of the one-row step's programs. Steps of up to
    DECODE_PLAN_QUERIES queries now launch as one row does; larger ones (a prefill) are planned for their own."""
    from worldvla.mask import DECODE_PLAN_QUERIES

    programs = []
    monkeypatch.setattr(K, "_default_splits", lambda n_tiles, n_programs, device: programs.append(n_programs) or 1)
    # Only the launch's plan is checked: the kernel itself is not run (in the interpreter, a minute of the suite).
    monkeypatch.setattr(K, "_split_kernel", _NoLaunch())
    for dtype, H, Hkv, D in [(torch.bfloat16, 8, 2, 64), (torch.float32, 8, 2, 64), (torch.bfloat16, 32, 32, 128),
                             (torch.bfloat16, 32, 1, 128)]:
        kc = torch.zeros(2, 100, Hkv, D, dtype=dtype, device=DEV)
        tiles, programs[:] = {}, []
        for n_q in (1, 2, 5, 10, DECODE_PLAN_QUERIES, DECODE_PLAN_QUERIES + 1):
            q = torch.randn(2, n_q, H, D, device=DEV).to(dtype)
            meta = DecodeMeta(torch.full((2, n_q), 99, dtype=torch.int32, device=DEV),
                              torch.zeros(2, n_q, dtype=torch.int32, device=DEV),
                              torch.full((2, 100), NO_BLOCK, dtype=torch.int32, device=DEV),
                              torch.full((2,), 100, dtype=torch.int32, device=DEV))
            tiles[n_q] = K.launch_plan(q, kc)[0][2]
            K.decode_attention(q, kc, kc, meta, block_n=64)
        case = f"{dtype} H{H}/{Hkv} Dh{D}: row tiles {tiles}, programs {programs}"
        assert len(set(list(tiles.values())[:-1])) == 1 and len(set(programs[:-1])) == 1, case
        if H // Hkv > 1 and dtype == torch.bfloat16:  # past the bound the step is planned for its own rows
            assert tiles[DECODE_PLAN_QUERIES + 1] > tiles[1] and programs[-1] != programs[0], case


def test_value_cache_with_its_own_strides(rng, poison_empty):
    """K and V caches need not share a layout (a value cache allocated for more slots or heads and sliced):
    each is addressed by its own batch, slot and head strides."""
    B, S, H, Hkv, D = 2, 70, 4, 2, 32
    kc = torch.randn(B, S, Hkv, D, generator=rng).to(DEV)
    v_store = torch.full((B, S + 9, Hkv + 1, D), float("nan"))
    v_store[:, :S, :Hkv] = torch.randn(B, S, Hkv, D, generator=rng)
    vc = v_store.to(DEV)[:, :S, :Hkv]
    assert vc.stride() != kc.stride() and vc.stride(-1) == 1
    q = torch.randn(B, 3, H, D, generator=rng).to(DEV)
    meta = no_block_meta([[S - 1, 30, 12], [44, 44, 20]], [S, 45], S)
    check_splits(q, kc, vc, meta, [1, 2])


@pytest.mark.parametrize("head_dim", [40, 96])
def test_split_merge_with_head_dims_below_the_tile(rng, head_dim, poison_empty):
    """Head dims that are not a power of two pad to the next one inside the kernels: the merge of the
    split-KV partials must write only the head's own columns, never the padding into a neighbouring head."""
    B, n_q, S, H, Hkv = 2, 3, 100, 4, 2
    q = torch.randn(B, n_q, H, head_dim, generator=rng).to(DEV)
    kc = torch.randn(B, S, Hkv, head_dim, generator=rng).to(DEV)
    vc = torch.randn(B, S, Hkv, head_dim, generator=rng).to(DEV)
    meta = no_block_meta([[S - 1, 70, 33], [80, 80, 5]], [S, 81], S)
    check_splits(q, kc, vc, meta, [1, 3])


def test_kv_len_and_positions_past_the_cache_read_only_the_cache(rng, poison_empty):
    """kv_len and q_pos beyond the cache's S slots (a length counted past the allocated cache) make every
    slot visible, as in the reference, and the kernel reads no slot past S (here: the next sequence's)."""
    B, S, H, D = 2, 40, 2, 32
    q = torch.randn(B, 1, H, D, generator=rng).to(DEV)
    kc = torch.randn(B, S, H, D, generator=rng).to(DEV)
    vc = torch.randn(B, S, H, D, generator=rng).to(DEV)
    meta = no_block_meta([[S + 20], [S - 1]], [S + 30, S], S)
    check_splits(q, kc, vc, meta, [1, 2])


def test_queries_stored_heads_first(rng, poison_empty):
    """Queries kept heads first ([B, H, Q, D] storage seen as [B, Q, H, D], as attention layers often hold them):
    their strides are not those of the contiguous output the kernel allocates, and each must be addressed by its
    own (the one-split path stores straight from the split kernel, more splits through the merge)."""
    B, n_q, S, H, Hkv, D = 2, 3, 70, 4, 2, 32
    q = torch.randn(B, H, n_q, D, generator=rng).to(DEV).transpose(1, 2)
    assert q.stride() != q.contiguous().stride() and q.stride(-1) == 1
    kc = torch.randn(B, S, Hkv, D, generator=rng).to(DEV)
    vc = torch.randn(B, S, Hkv, D, generator=rng).to(DEV)
    meta = no_block_meta([[S - 1, 40, 9], [50, 50, 21]], [S, 51], S)
    check_splits(q, kc, vc, meta, [1, 2])


def test_kernel_entry_refuses_head_dims_above_256(rng):
    """Head dims pad to a power of two inside the kernels and have tiles up to 256: the kernel's own entry (which
    torch.compile and direct callers reach without dispatch's check) refuses wider heads by name."""
    B, S, D = 1, 8, 264
    q = torch.randn(B, 1, 2, D, generator=rng).to(DEV)
    kc = torch.randn(B, S, 2, D, generator=rng).to(DEV)
    meta = DecodeMeta(torch.tensor([[S - 1]], dtype=torch.int32, device=DEV),
                      torch.full((B, 1), -1, dtype=torch.int32, device=DEV),
                      torch.full((B, S), NO_BLOCK, dtype=torch.int32, device=DEV),
                      torch.tensor([S], dtype=torch.int32, device=DEV))
    with pytest.raises(ValueError, match="head dim 264 is larger than the Triton kernel's 256"):
        K.decode_attention(q, kc, kc, meta)


@pytest.mark.parametrize("splits", [1, 2])
def test_decode_honours_the_softmax_scale(rng, splits, poison_empty):
    """A softmax_scale other than 1/sqrt(Dh) is the scale of the scores, on the one-split path and through the
    merge: rows of a GQA group at different positions against caches of odd lengths equal the float64 reference
    at scale 0.2 (and not the default scale's result)."""
    B, S, H, Hkv, D = 2, 75, 4, 2, 40
    q = torch.randn(B, 3, H, D, generator=rng).to(DEV)
    kc = torch.randn(B, S, Hkv, D, generator=rng).to(DEV)
    vc = torch.randn(B, S, Hkv, D, generator=rng).to(DEV)
    meta = no_block_meta([[S - 1, 40, 9], [60, 61, 22]], [S, 62], S)
    ref = decode_attention_ref(q.double(), kc.double(), vc.double(), meta, softmax_scale=0.2)
    same = decode_attention_ref(q, kc, vc, meta, softmax_scale=0.2, upcast=False)
    out = K.decode_attention(q, kc, vc, meta, softmax_scale=0.2, num_splits=splits, block_n=32)
    assert_close_rule(out, ref, same, f"{splits} splits", floor_eps=FP32_FLOOR_EPS)
    default = decode_attention_ref(q.double(), kc.double(), vc.double(), meta)
    assert (default - ref).abs().max().item() > 1e-2, "the scale must matter for these inputs"


@pytest.mark.parametrize("splits", [1, 2])
def test_decode_softmax_scale_of_zero_is_a_plain_mean(rng, splits, poison_empty):
    """softmax_scale=0 is a scale like any other, not "the default": every visible key weighs the same, so each row
    is the mean of its visible values (the reference's result at scale 0, far from the default scale's)."""
    B, S, H, Hkv, D = 2, 70, 4, 2, 32
    q = (3.0 * torch.randn(B, 2, H, D, generator=rng)).to(DEV)
    kc = torch.randn(B, S, Hkv, D, generator=rng).to(DEV)
    vc = torch.randn(B, S, Hkv, D, generator=rng).to(DEV)
    meta = no_block_meta([[S - 1, 33], [40, 9]], [S, 41], S)
    out = K.decode_attention(q, kc, vc, meta, softmax_scale=0.0, num_splits=splits, block_n=32)
    for b, rows in enumerate(meta.q_pos.tolist()):
        for i, p in enumerate(rows):
            mean = vc[b, :p + 1].double().mean(0).repeat_interleave(H // Hkv, dim=0)  # [H, D]
            torch.testing.assert_close(out[b, i].double(), mean, rtol=0, atol=1e-5)
    default = decode_attention_ref(q.double(), kc.double(), vc.double(), meta)
    assert (default - out.double()).abs().max().item() > 1e-1, "the default scale must give another result"


def test_decode_takes_head_dims_of_exactly_256(rng, poison_empty):
    """256 is the widest head dim the kernels tile: it is taken (one split and through the merge), not refused."""
    B, S, H, Hkv, D = 1, 40, 2, 1, 256
    q = torch.randn(B, 1, H, D, generator=rng).to(DEV)
    kc = torch.randn(B, S, Hkv, D, generator=rng).to(DEV)
    vc = torch.randn(B, S, Hkv, D, generator=rng).to(DEV)
    meta = no_block_meta([[S - 3]], [S], S)
    check_splits(q, kc, vc, meta, [1, 2])


@pytest.mark.parametrize("splits", [1, 2])
def test_head_dims_below_the_tile_read_no_neighbouring_columns(rng, splits, poison_empty):
    """A head dim of 40 pads to a tile of 64: the key and value loads are masked to the head's own 40 columns. Past
    them lie the next head's columns, or for the last head the next slot's, here a slot past kv_len holding NaN,
    which must not reach the scores (0 x NaN is NaN) of the last visible key."""
    B, S, H, Hkv, D, n = 2, 60, 4, 2, 40, 35
    kc = torch.full((B, S, Hkv, D), float("nan"))
    vc = torch.full((B, S, Hkv, D), float("nan"))
    kc[:, :n], vc[:, :n] = torch.randn(B, n, Hkv, D, generator=rng), torch.randn(B, n, Hkv, D, generator=rng)
    q = torch.randn(B, 2, H, D, generator=rng).to(DEV)
    meta = no_block_meta([[n - 1, 20], [n - 1, n - 1]], [n, n], S)
    clean = lambda t: torch.nan_to_num(t, nan=0.0).to(DEV)
    ref = decode_attention_ref(q.double(), clean(kc).double(), clean(vc).double(), meta)
    same = decode_attention_ref(q, clean(kc), clean(vc), meta, upcast=False)
    out = K.decode_attention(q, kc.to(DEV), vc.to(DEV), meta, num_splits=splits, block_n=32)
    assert_close_rule(out, ref, same, f"{splits} splits", floor_eps=FP32_FLOOR_EPS)


def _plain_meta(B, n_q, S, kv_len):
    i32 = dict(dtype=torch.int32, device=DEV)
    return DecodeMeta(torch.full((B, n_q), max(S - 1, 0), **i32), torch.full((B, n_q), -1, **i32),
                      torch.full((B, S), NO_BLOCK, **i32), torch.full((B,), kv_len, **i32))


@pytest.mark.parametrize("splits", [None, 1, 3])
def test_decode_against_an_empty_cache_gives_zeros(rng, splits, poison_empty):
    """A cache of no slot at all (S = 0, a first step before anything was cached) has no key to see: every row comes
    out as the reference's zeros, at any split count asked for."""
    B, H, Hkv, D = 2, 4, 2, 24
    q = torch.randn(B, 2, H, D, generator=rng).to(DEV)
    kc = torch.zeros(B, 0, Hkv, D, device=DEV)
    meta = _plain_meta(B, 2, 0, 0)
    out = K.decode_attention(q, kc, kc, meta, num_splits=splits)
    assert out.shape == q.shape and torch.equal(out, decode_attention_ref(q, kc, kc, meta))
    assert torch.all(out == 0)


def test_grid_limit_counts_row_tiles_not_rows():
    """The split kernel's second grid axis counts query row tiles: a step of 70000 query rows (2188 tiles) fits the
    65535 limit and is taken, and only a step of more than 65535 tiles is refused, naming the tiles. The inputs are
    expanded (zero strides): nothing of that size is allocated."""
    cache = torch.zeros(1, 1, 1, 16, device=DEV).expand(1, 8, 1, 16)
    q = torch.zeros(1, 1, 1, 16, device=DEV).expand(1, 70000, 1, 16)
    assert K.grid_problem(q, cache) is None
    block_r = K.launch_plan(q, cache)[0][2]
    too_many = torch.zeros(1, 1, 1, 16, device=DEV).expand(1, 65535 * block_r + 1, 1, 16)
    assert K.grid_problem(too_many, cache) == "query row tiles = 65536 > 65535 (a grid axis limit)"
