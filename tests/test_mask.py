"""The chunk rule against the spec's worked example and a literal loop re-implementation."""
import numpy as np
import pytest
import torch

from worldvla import VocabLayout, chunk_attention_mask, chunk_mask_meta
from worldvla.mask import NO_BLOCK, ChunkMaskMeta, DecodeMeta, causal_meta

CH = VocabLayout.chameleon()

# Spec 3.2: 1 image with 2 codes, chunk of 2 actions with 2 dims.
SPEC_EXAMPLE = """
1...............
11..............
111.............
1111............
11111...........
111111..........
1111111.........
11111111........
111111111.......
1111111111......
11111111111.....
1111111....1....
1111111....11...
1111111....111..
1111111....1111.
1111111111111111
"""


def _example_ids(L):
    return torch.tensor([L.bos, 20000, L.boi, 4, 5, L.eoi, L.sep, L.boa, L.bin_base, L.bin_base + 1, L.eoa,
                         L.boa, L.bin_base + 2, L.bin_base + 3, L.eoa, L.sep])


def release_last_image_end(ids, L):
    """The release's `last_image_end`: BOI and EOI positions paired in order after one EOI too many is dropped
    from the end (or an open image closed at the sequence's end); ValueError where the counts still differ."""
    S = [i for i, t in enumerate(ids) if t == L.boi]
    E = [i for i, t in enumerate(ids) if t == L.eoi]
    if len(S) > len(E):
        E.append(len(ids) - 1)
    elif len(S) < len(E):
        E = E[:-1]
    if len(S) != len(E):
        raise ValueError("Mismatched image start and end tokens")
    return E[-1] if E else -1


def loop_mask(ids, L):
    """Literal re-implementation of the release's rule with Python loops (spec 3.1)."""
    ids = list(ids)
    n = len(ids)
    m = np.tril(np.ones((n, n), dtype=bool))
    last_img_end = release_last_image_end(ids, L)
    blocks, start = [], None
    for i, t in enumerate(ids):
        if t == L.boa and start is None:
            start = i
        elif t == L.eoa and start is not None:
            blocks.append((start, i))
            start = None
    if start is not None:
        blocks.append((start, n - 1))
    for s, e in blocks:
        if s <= last_img_end:
            continue
        for ps, pe in blocks:
            if pe < s:
                m[s:e + 1, ps:pe + 1] = False
    return m


def random_sequence(L, gen, n_images, n_actions, dim, trailing_open=False, world=False):
    ids = [L.bos] + [L.text_base + int(x) for x in torch.randint(0, 256, (5,), generator=gen)]
    img = lambda: [L.boi, L.res_base + 1, L.res_base + 1] + [L.image_code_ids[0]] * 2 + [L.newline, L.eoi]
    act = lambda: [L.boa] + [L.bin_base + int(x) for x in torch.randint(0, L.n_bins, (dim,), generator=gen)] + [L.eoa]
    if world:
        ids += img() + act() + [L.sep] + img() + [L.sep]
        return ids
    for _ in range(n_images):
        ids += img()
    ids += [L.sep]
    for _ in range(n_actions):
        ids += act()
    if trailing_open:
        ids += [L.boa, L.bin_base]
    else:
        ids += [L.sep]
    return ids


def test_spec_worked_example():
    expected = np.array([[c == "1" for c in row] for row in SPEC_EXAMPLE.split()])
    got = chunk_attention_mask(_example_ids(CH), CH).numpy()
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("n_images,n_actions,dim,open_", [(2, 5, 7, False), (1, 1, 3, False), (0, 3, 2, False),
                                                           (2, 4, 7, True), (1, 10, 1, False)])
def test_matches_loop_reference(n_images, n_actions, dim, open_):
    L = VocabLayout.compact()
    gen = torch.Generator().manual_seed(n_images * 100 + n_actions)
    ids = torch.tensor(random_sequence(L, gen, n_images, n_actions, dim, open_))
    np.testing.assert_array_equal(chunk_attention_mask(ids, L).numpy(), loop_mask(ids.tolist(), L))


def test_world_sample_is_causal():
    L = VocabLayout.compact()
    ids = torch.tensor(random_sequence(L, torch.Generator().manual_seed(0), 1, 1, 4, world=True))
    m = chunk_attention_mask(ids, L)
    assert torch.equal(m, torch.ones_like(m).tril())


def test_actions_before_last_image_unrestricted():
    # An action block before an image (history actions) keeps plain causal attention itself.
    L = VocabLayout.compact()
    gen = torch.Generator().manual_seed(3)
    ids = random_sequence(L, gen, 1, 0, 0)[:-1]  # drop sep
    act = [L.boa, L.bin_base, L.eoa]
    ids = ids + act + act + [L.boi, L.res_base, L.res_base, L.newline, L.eoi] + act + act + [L.sep]
    ids = torch.tensor(ids)
    np.testing.assert_array_equal(chunk_attention_mask(ids, L).numpy(), loop_mask(ids.tolist(), L))


def test_batched_and_packed_agree_with_single():
    L = VocabLayout.compact()
    gen = torch.Generator().manual_seed(7)
    # The first document ends inside an open action block: it must not leak into the next ones.
    seqs = [random_sequence(L, gen, 1, 2, 3, trailing_open=True), random_sequence(L, gen, 2, 3, 4),
            random_sequence(L, gen, 1, 2, 2), random_sequence(L, gen, 1, 1, 3, world=True)]
    # packed
    flat = torch.tensor(sum(seqs, []))
    lens = torch.tensor([0] + [len(s) for s in seqs]).cumsum(0)
    meta = chunk_mask_meta(flat, L, cu_seqlens=lens)
    dense = meta.dense_mask()
    for i, s in enumerate(seqs):
        a, b = int(lens[i]), int(lens[i + 1])
        np.testing.assert_array_equal(dense[a:b, a:b].numpy(), loop_mask(s, L))
        assert not dense[a:b, :a].any() and not dense[a:b, b:].any()
        assert torch.equal(meta.position_ids[a:b], torch.arange(b - a))
    # padded batch (right padding with 0)
    Lmax = max(map(len, seqs))
    batch = torch.tensor([s + [L.bos] * (Lmax - len(s)) for s in seqs])
    bm = chunk_mask_meta(batch, L).dense_mask()
    for i, s in enumerate(seqs):
        n = len(s)
        np.testing.assert_array_equal(bm[i, :n, :n].numpy(), loop_mask(s, L))


def test_causal_meta_is_causal():
    m = causal_meta((9,)).dense_mask()
    assert torch.equal(m, torch.ones(9, 9, dtype=torch.bool).tril())


def test_decode_meta_matches_full_mask_rows():
    # Decoding one token at a time with a slot-indexed cache sees exactly the full mask's last row.
    L = VocabLayout.compact()
    ids = torch.tensor(random_sequence(L, torch.Generator().manual_seed(5), 2, 3, 4, trailing_open=True))
    full = chunk_mask_meta(ids, L)
    n = len(ids)
    dm = DecodeMeta(q_pos=torch.tensor([[n - 1]], dtype=torch.int32), q_limit=full.q_limit[-1:].view(1, 1),
                    kv_block=torch.cat([full.kv_block, torch.full((4,), 1 << 30, dtype=torch.int32)]).view(1, -1),
                    kv_len=torch.tensor([n], dtype=torch.int32))
    assert torch.equal(dm.dense_mask()[0, 0, :n], full.dense_mask()[-1])
    assert not dm.dense_mask()[0, 0, n:].any()


def test_bad_inputs():
    L = VocabLayout.compact()
    with pytest.raises(TypeError):
        chunk_mask_meta(torch.zeros(4), L)
    with pytest.raises(ValueError, match="cu_seqlens"):
        chunk_mask_meta(torch.zeros(6, dtype=torch.long), L, cu_seqlens=torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="cu_seqlens"):
        causal_meta((6,), cu_seqlens=torch.tensor([0, 4, 3, 6]))
    with pytest.raises(ValueError, match="cu_seqlens"):
        causal_meta((6,), cu_seqlens=torch.tensor([0, 4]))
    with pytest.raises(ValueError, match=r"\(T,\)"):
        causal_meta((2, 3), cu_seqlens=torch.tensor([0, 3, 6]))
    packed = causal_meta((6,), cu_seqlens=torch.tensor([0, 2, 6]))
    assert packed.position_ids.tolist() == [0, 1, 0, 1, 2, 3] and packed.max_seqlen == 4


def test_malformed_action_blocks_are_rejected():
    L = VocabLayout.compact()
    gen = torch.Generator().manual_seed(3)
    good = random_sequence(L, gen, 1, 2, 3)
    chunk_mask_meta(torch.tensor(good), L)
    eoa_first = good.index(L.boa)
    unopened = good[:eoa_first] + [L.eoa] + good[eoa_first:]           # EOA before any BOA
    nested = good[:eoa_first + 2] + [L.boa] + good[eoa_first + 2:]     # BOA inside an open block
    for bad, what in ((unopened, "EOA"), (nested, "BOA")):
        with pytest.raises(ValueError, match=f"malformed action blocks.*{what}"):
            chunk_mask_meta(torch.tensor(bad), L)
    # A document ending inside an open block does not make the next document's blocks malformed,
    # in a packed stream or across the rows of a padded batch.
    open_tail = random_sequence(L, gen, 1, 2, 3, trailing_open=True)
    packed = torch.tensor(open_tail + good)
    meta = chunk_mask_meta(packed, L, cu_seqlens=torch.tensor([0, len(open_tail), len(packed)], dtype=torch.int32))
    assert torch.equal(meta.dense_mask()[len(open_tail):, len(open_tail):],
                       chunk_mask_meta(torch.tensor(good), L).dense_mask())
    n = max(len(open_tail), len(good))
    rows = torch.full((2, n), L.pad)
    rows[0, :len(open_tail)], rows[1, :len(good)] = torch.tensor(open_tail), torch.tensor(good)
    chunk_mask_meta(rows, L)


@pytest.mark.parametrize("release_pairing", [False, True])
def test_growing_block_meta_is_the_whole_sequence_meta(release_pairing):
    """Token by token, GrowingBlockMeta gives each new token the kv_block and q_limit that chunk_mask_meta of the
    whole sequence so far gives its last token, and refuses the token that makes the blocks malformed; with the
    release's pairing too, where one EOA closing no block after a closed block is a token outside any block."""
    from worldvla.mask import GrowingBlockMeta

    L = VocabLayout.compact(n_image_codes=64)
    tokens = [L.boa, L.eoa, L.eoi, L.boi, L.sep, L.bin_base, L.bin_base + 3, L.text_base + 2, 5]
    g = torch.Generator().manual_seed(0)
    pushed = refused = strays = 0
    for _ in range(1000):
        seq = [tokens[int(i)] for i in torch.randint(0, len(tokens), (int(torch.randint(2, 30, (1,), generator=g)),),
                                                       generator=g)]
        cut = int(torch.randint(1, len(seq), (1,), generator=g))
        try:
            chunk_mask_meta(torch.tensor(seq[:cut]), L, release_pairing=release_pairing)
        except ValueError:
            continue
        grow = GrowingBlockMeta(torch.tensor(seq[:cut]), L, release_pairing=release_pairing)
        for i in range(cut, len(seq)):
            try:
                want = chunk_mask_meta(torch.tensor(seq[:i + 1]), L, release_pairing=release_pairing)
            except ValueError as err:
                with pytest.raises(ValueError, match="malformed (action|image) blocks") as got:
                    grow.push(seq[i])
                if "image" in str(err):  # names the pushed token, the prefix's last, and the counts
                    assert str(got.value) == str(err)
                else:
                    reason = lambda e: str(e).split(";")[0].split(" is ", 1)[1]
                    assert reason(got.value) == reason(err)
                refused += 1
                break
            strays += seq[i] == L.eoa and not grow.open
            assert grow.push(seq[i]) == (int(want.kv_block[-1]), int(want.q_limit[-1])), seq[:i + 1]
            pushed += 1
    assert pushed > 800 and refused > 80
    assert (strays > 20) if release_pairing else strays == 0, (pushed, refused, strays)


def release_att_mask_3(ids, L):
    """The release's `generate_att_mask_3` literally: BOA and EOA positions paired in order after one EOA too many
    is dropped from the end (or the open block closed at the end), ValueError where the counts still differ.
    Also returns the pairs, to see those out of order."""
    ids = list(ids)
    n = len(ids)
    S = [i for i, t in enumerate(ids) if t == L.boa]
    E = [i for i, t in enumerate(ids) if t == L.eoa]
    if len(S) > len(E):
        E.append(n - 1)
    elif len(S) < len(E):
        E = E[:-1]
    if len(S) != len(E):
        raise ValueError("Mismatched action start and end tokens")
    m = np.tril(np.ones((n, n), dtype=bool))
    last_eoi = release_last_image_end(ids, L)
    blocks = list(zip(S, E))
    for s, e in blocks:
        if s > last_eoi:
            for ps, pe in blocks:
                if pe < s:
                    m[s:e + 1, ps:pe + 1] = False
    return m, blocks


def test_release_pairing_is_the_release_mask():
    """chunk_mask_meta(release_pairing=True) accepts a sequence exactly when the release's mask, rebuilt at every
    prefix, never raises and pairs its blocks in order, and no EOA precedes every BOA (the release's parser
    raises there); and then its mask is the release's. The default refuses every EOA closing no block."""
    L = VocabLayout.compact(n_image_codes=64)
    tokens = [L.boa, L.eoa, L.eoa, L.eoi, L.boi, L.sep, L.bin_base, L.bin_base + 3, 5]
    g = torch.Generator().manual_seed(1)
    accepted = strays = unpaired = 0
    for _ in range(2000):
        seq = [tokens[int(i)] for i in torch.randint(0, len(tokens), (int(torch.randint(1, 24, (1,), generator=g)),),
                                                       generator=g)]
        ok = True
        for k in range(1, len(seq) + 1):
            try:
                _, blocks = release_att_mask_3(seq[:k], L)
            except ValueError:
                ok = False
                break
            ok &= all(s <= e for s, e in blocks) and all(e < s2 for (_, e), (s2, _) in zip(blocks, blocks[1:]))
        first_boa = seq.index(L.boa) if L.boa in seq else len(seq)
        ok &= L.eoa not in seq[:first_boa]
        try:
            meta = chunk_mask_meta(torch.tensor(seq), L, release_pairing=True)
        except ValueError as err:
            assert not ok and ("malformed action blocks" in str(err) or "malformed image blocks" in str(err)), seq
            continue
        assert ok, seq
        assert np.array_equal(meta.dense_mask().numpy(), release_att_mask_3(seq, L)[0]), seq
        accepted += 1
        stray = seq.count(L.eoa) > seq.count(L.boa)
        strays += stray
        unpaired += seq.count(L.boi) != seq.count(L.eoi) and L.boa in seq
        if stray:
            with pytest.raises(ValueError, match="EOA that closes no open action block"):
                chunk_mask_meta(torch.tensor(seq), L)
    assert accepted > 250 and strays > 10 and unpaired > 40, (accepted, strays, unpaired)


def test_image_blocks_pair_as_the_release_pairs_them():
    """The chunk rule holds for action blocks after the last image's end. That end was the last EOI; the release
    pairs BOI and EOI first: an image left open (a BOI the model wrote while decoding freely) ends at the
    sequence's end, so no block is restricted, and with one EOI too many the last pair ends at the EOI before it.
    Counts further apart are refused, as the release's mask raises."""
    L = VocabLayout.compact(n_image_codes=64)
    b = L.bin_base
    block = [L.boa, b, b + 1, L.eoa]
    img = [L.boi, L.image_code_ids[0], L.eoi]
    for seq in (img + [L.sep] + block + [L.boi] + block,            # an open image between two blocks
                img + [L.sep] + block + [L.eoi] + block + [L.sep],  # a stray EOI between two blocks
                img + [L.sep] + block + block + [L.boi, 5],         # an open image after them
                [L.eoi] + block + block,                            # an EOI too many, no image
                img + block + block):                               # the well-formed case
        want = loop_mask(seq, L)
        for pairing in (False, True):
            assert np.array_equal(chunk_attention_mask(torch.tensor(seq), L, release_pairing=pairing).numpy(), want)
    open_between = img + [L.sep] + block + [L.boi] + block
    n = len(open_between)  # plain causal: nothing hidden
    assert torch.equal(chunk_attention_mask(torch.tensor(open_between), L), torch.ones(n, n, dtype=torch.bool).tril())
    stray = img + [L.sep] + block + [L.eoi] + block
    assert not chunk_attention_mask(torch.tensor(stray), L)[-1, 4:8].any()  # the second block hides the first
    for bad in ([L.boi, L.boi] + block, img + [L.eoi, L.eoi] + block):
        with pytest.raises(ValueError, match="malformed image blocks: at token .* image blocks pair only while"):
            chunk_mask_meta(torch.tensor(bad), L)
    # Per document, packed: the open image of the first document does not reach the second.
    docs = img[:2] + block + img + block + block
    meta = chunk_mask_meta(torch.tensor(docs), L, cu_seqlens=torch.tensor([0, 6, len(docs)]))
    assert meta.q_limit.tolist() == [-1] * 9 + [1] * 4 + [2] * 4  # block ordinals count on across documents


def test_release_pairing_refusals():
    L = VocabLayout.compact(n_image_codes=64)
    b = L.bin_base
    block = [L.boa, b, b + 1, L.eoa]
    seq = [L.sep] + block + block + [L.eoa, 5, L.sep]
    meta = chunk_mask_meta(torch.tensor(seq), L, release_pairing=True)
    assert meta.kv_block.tolist()[9:] == [1 << 30] * 3 and meta.q_limit.tolist()[9:] == [-1] * 3
    for bad, what in (([L.eoa] + block, "EOA before any action block"),
                      (block + [L.eoa, 5, L.eoa], "second EOA that closes no open action block"),
                      (block + [L.eoa] + block, "BOA after an EOA that closed no block"),
                      (block[:2] + block, "BOA inside an open action block")):
        with pytest.raises(ValueError, match=f"malformed action blocks.*{what}"):
            chunk_mask_meta(torch.tensor(bad), L, release_pairing=True)
    # Per document: a stray EOA in one document does not count in the next, packed or padded.
    docs = block + [L.eoa] + block + [L.eoa]
    chunk_mask_meta(torch.tensor(docs), L, cu_seqlens=torch.tensor([0, 5, 10]), release_pairing=True)
    chunk_mask_meta(torch.tensor(docs).view(2, 5), L, release_pairing=True)
    with pytest.raises(ValueError, match="BOA after an EOA"):
        chunk_mask_meta(torch.tensor(docs), L, release_pairing=True)
    with pytest.raises(ValueError, match="EOA before any"):  # the second document's EOA comes before its blocks
        chunk_mask_meta(torch.tensor(block + [L.eoa, L.eoa] + block), L, cu_seqlens=torch.tensor([0, 5, 10]),
                        release_pairing=True)




def test_decode_meta_hides_slots_at_and_past_kv_len():
    """A query whose position runs past kv_len (a right-padded prefill row) sees only the valid slots."""
    dm = DecodeMeta(q_pos=torch.tensor([[6]], dtype=torch.int32), q_limit=torch.tensor([[-1]], dtype=torch.int32),
                    kv_block=torch.full((1, 8), 1 << 30, dtype=torch.int32), kv_len=torch.tensor([3], dtype=torch.int32))
    assert dm.dense_mask()[0, 0].tolist() == [True] * 3 + [False] * 5


def test_moving_packed_metadata_off_the_cpu_checks_max_seqlen():
    """The GPU kernels launch row tiles for max_seqlen rows per document and trust it (read on the host it would
    synchronize): hand-built metadata with a smaller value left rows 128-149 of a 150-token document unwritten.
    Metadata moved from the CPU is checked on the way, where the read is free."""
    cu = torch.tensor([0, 150, 160], dtype=torch.int32)
    meta = ChunkMaskMeta(torch.full((160,), NO_BLOCK, dtype=torch.int32), torch.full((160,), -1, dtype=torch.int32),
                         torch.cat([torch.arange(150), torch.arange(10)]), cu, max_seqlen=100)
    with pytest.raises(ValueError, match=r"max_seqlen=100 is shorter than the longest document \(150 tokens\)"):
        meta.to("meta")
    for ok in (150, 0):  # enough, or unknown (the kernels then read the boundaries themselves)
        meta.max_seqlen = ok
        assert meta.to("meta").max_seqlen == ok


def test_growing_meta_of_a_prompt_with_one_eoi_too_many_pairs_its_images_as_the_whole_sequence():
    """A prompt whose images hold one EOI too many (here two EOIs inside an open block): the last image ends at the
    EOI before the last, so the open block, started before it, keeps sight of the earlier block while it grows,
    and a block started after it is restricted, as chunk_mask_meta of the whole sequence gives."""
    from worldvla.mask import GrowingBlockMeta

    L = VocabLayout.compact(n_image_codes=64)
    b = L.bin_base
    prompt = [L.boa, b, L.eoa, L.boi, L.boa, b, L.eoi, L.eoi]
    grow = GrowingBlockMeta(torch.tensor(prompt), L)
    seq, got = list(prompt), []
    for tok in (b, L.eoa, L.boa, b, L.eoa):
        seq.append(tok)
        got.append(grow.push(tok))
    meta = chunk_mask_meta(torch.tensor(seq), L)
    assert got == [(1, -1), (1, -1), (2, 2), (2, 2), (2, 2)]
    assert got == list(zip(meta.kv_block[len(prompt):].tolist(), meta.q_limit[len(prompt):].tolist()))


def test_fractional_cu_seqlens_are_refused_not_truncated():
    """Document boundaries 0, 3.5, 6 would be read as 0, 3, 6: a boundary in the wrong place without a word."""
    L = VocabLayout.compact()
    for cu in (torch.tensor([0.0, 3.5, 6.0]), torch.tensor([0.0, 3.0, 6.0], dtype=torch.float64)):
        with pytest.raises(TypeError, match=f"cu_seqlens must hold integers, got {cu.dtype}"):
            chunk_mask_meta(torch.zeros(6, dtype=torch.long), L, cu_seqlens=cu)
        with pytest.raises(TypeError, match=f"cu_seqlens must hold integers, got {cu.dtype}"):
            causal_meta((6,), cu_seqlens=cu)
    for cu in (torch.tensor([0, 3, 6], dtype=torch.int32), torch.tensor([0, 3, 6])):
        assert chunk_mask_meta(torch.zeros(6, dtype=torch.long), L, cu_seqlens=cu).cu_seqlens.tolist() == [0, 3, 6]


def test_a_max_seqlen_one_short_of_the_longest_document_is_refused():
    """One row short is as wrong as fifty: the kernels would leave the document's last row unwritten."""
    from worldvla.mask import check_cu_seqlens

    cu = torch.tensor([0, 150, 160], dtype=torch.int32)
    for short in (149, 1):
        meta = ChunkMaskMeta(torch.full((160,), NO_BLOCK, dtype=torch.int32), torch.full((160,), -1, dtype=torch.int32),
                             torch.cat([torch.arange(150), torch.arange(10)]), cu, max_seqlen=short)
        with pytest.raises(ValueError, match=rf"max_seqlen={short} is shorter than the longest document \(150 tokens\)"):
            check_cu_seqlens(meta, 160)
        with pytest.raises(ValueError, match=rf"max_seqlen={short} is shorter"):
            meta.to("meta")
    meta.max_seqlen = 150
    check_cu_seqlens(meta, 160)


def test_bool_ids_are_refused_as_ids_that_are_not_integers():
    """A bool tensor (a mask passed where ids go) gave the metadata of the ids 0 and 1: no action block at all."""
    L = VocabLayout.compact()
    with pytest.raises(TypeError, match="input_ids must be integer token ids, got torch.bool"):
        chunk_mask_meta(torch.tensor([True, False, True]), L)
    with pytest.raises(TypeError, match="input_ids must be integer token ids, got torch.bool"):
        chunk_attention_mask(torch.tensor([True, False, True]), L)


def test_the_kept_cu_seqlens_check_holds_only_for_its_tensor_length_and_max_seqlen():
    """check_cu_seqlens keeps its result on the metadata so that the layers of a forward read nothing again. It holds
    for that tensor, that T and that max_seqlen only: boundaries replaced by another tensor (at the same version
    count) or edited in place, the metadata used for another number of tokens, or a smaller max_seqlen set on it
    are checked again."""
    from worldvla.mask import check_cu_seqlens

    meta = causal_meta((12,), cu_seqlens=torch.tensor([0, 5, 12], dtype=torch.int32))
    check_cu_seqlens(meta, 12)
    meta.cu_seqlens = torch.tensor([0, 13, 12], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"cu_seqlens must rise from 0 to T=12 .*got \[0, 13, 12\]"):
        check_cu_seqlens(meta, 12)

    meta = causal_meta((12,), cu_seqlens=torch.tensor([0, 5, 12], dtype=torch.int32))
    check_cu_seqlens(meta, 12)
    with pytest.raises(ValueError, match=r"cu_seqlens must rise from 0 to T=14"):
        check_cu_seqlens(meta, 14)
    check_cu_seqlens(meta, 12)
    meta.max_seqlen = 6
    with pytest.raises(ValueError, match=r"max_seqlen=6 is shorter than the longest document \(7 tokens\)"):
        check_cu_seqlens(meta, 12)
    meta.max_seqlen = 7
    check_cu_seqlens(meta, 12)
    meta.cu_seqlens[1] = 13  # edited in place: the version count moves on
    with pytest.raises(ValueError, match=r"cu_seqlens must rise from 0 to T=12 .*got \[0, 13, 12\]"):
        check_cu_seqlens(meta, 12)


def test_boundaries_whose_values_cannot_be_read_are_checked_by_their_count():
    """Where cu_seqlens cannot be read on the host (a meta or fake tensor while tracing; on a GPU the read would
    synchronize), only what the host ints tell is checked: n_docs documents of at most max_seqlen tokens must be
    able to cover T (exactly covering is enough), max_seqlen 0 (unknown) tells nothing, and fewer than 2 entries
    mark no document at all."""
    from worldvla.mask import check_cu_seqlens

    def on_meta(cu, max_seqlen):
        T = 12
        return ChunkMaskMeta(torch.full((T,), NO_BLOCK, dtype=torch.int32, device="meta"),
                             torch.full((T,), -1, dtype=torch.int32, device="meta"),
                             torch.zeros(T, dtype=torch.long, device="meta"),
                             torch.tensor(cu, dtype=torch.int32).to("meta"), max_seqlen)

    check_cu_seqlens(on_meta([0, 6, 12], 6), 12)
    check_cu_seqlens(on_meta([0, 6, 12], 0), 12)
    with pytest.raises(ValueError, match=r"its 2 document\(s\) of at most max_seqlen=5 tokens cannot cover them"):
        check_cu_seqlens(on_meta([0, 6, 12], 5), 12)
    for cu in ([12], []):
        with pytest.raises(ValueError, match=rf"1-D with n_docs \+ 1 >= 2 entries, got shape \({len(cu)},\)"):
            check_cu_seqlens(on_meta(cu, 0), 12)


def test_boundaries_that_do_not_start_at_zero_are_refused():
    """cu_seqlens [2, 4, 6] for 6 tokens leaves tokens 0-1 in no document."""
    from worldvla.mask import check_cu_seqlens, cu_seqlens_problem

    L = VocabLayout.compact()
    assert "must rise from 0 to T=6" in cu_seqlens_problem([2, 4, 6], 6)
    with pytest.raises(ValueError, match=r"cu_seqlens must rise from 0 to T=6 .*got \[2, 4, 6\]"):
        chunk_mask_meta(torch.zeros(6, dtype=torch.long), L, cu_seqlens=torch.tensor([2, 4, 6]))
    with pytest.raises(ValueError, match=r"cu_seqlens must rise from 0 to T=6"):
        causal_meta((6,), cu_seqlens=torch.tensor([2, 4, 6]))
    meta = ChunkMaskMeta(torch.full((6,), NO_BLOCK, dtype=torch.int32), torch.full((6,), -1, dtype=torch.int32),
                         torch.arange(6), torch.tensor([2, 4, 6], dtype=torch.int32), 2)
    with pytest.raises(ValueError, match=r"meta\.cu_seqlens must rise from 0 to T=6"):
        check_cu_seqlens(meta, 6)


def test_packed_metadata_with_an_empty_document_gives_the_longest_documents_length():
    """max_seqlen is the longest document's length (the kernels launch row tiles for that many rows), not the first
    one's; an empty document between two others is allowed and holds no token."""
    L = VocabLayout.compact(n_image_codes=64)
    b = L.bin_base
    first = [L.bos, L.boi, L.image_code_ids[0], L.eoi]
    second = [L.bos, L.boi, L.image_code_ids[1], L.eoi, L.sep, L.boa, b, L.eoa, L.boa, b + 1, L.eoa]
    ids = torch.tensor(first + second)
    meta = chunk_mask_meta(ids, L, cu_seqlens=torch.tensor([0, 4, 4, 15]))
    assert meta.max_seqlen == 11
    assert meta.doc_ids().tolist() == [0] * 4 + [2] * 11
    assert meta.position_ids.tolist() == list(range(4)) + list(range(11))
    dense = meta.dense_mask()
    assert not dense[4:, :4].any()
    np.testing.assert_array_equal(dense[4:, 4:].numpy(), loop_mask(second, L))


def test_an_empty_sequence_has_empty_metadata_and_can_grow():
    """No tokens yet (generation from an empty prompt, a batch of empty rows): empty metadata, and a growing
    sequence from there gives each token what the whole sequence's metadata gives it."""
    from worldvla.mask import GrowingBlockMeta

    L = VocabLayout.compact(n_image_codes=64)
    for shape in ((0,), (2, 0)):
        meta = chunk_mask_meta(torch.zeros(shape, dtype=torch.long), L)
        assert meta.kv_block.shape == meta.q_limit.shape == shape and meta.dense_mask().numel() == 0
    grow = GrowingBlockMeta(torch.zeros(0, dtype=torch.long), L)
    seq = [L.boi, L.image_code_ids[0], L.eoi, L.boa, L.bin_base, L.eoa, L.boa, L.bin_base, L.eoa]
    got = [grow.push(t) for t in seq]
    whole = chunk_mask_meta(torch.tensor(seq), L)
    assert got == list(zip(whole.kv_block.tolist(), whole.q_limit.tolist()))
    assert got[-1] == (1, 1)


def test_ids_and_boundaries_given_as_lists_or_arrays_are_read_as_tensors():
    """Token ids (and packed boundaries) as a list or a NumPy array failed in an AttributeError ('list' object has no
    attribute 'dtype') from the integer check; they give the metadata of the same ids as a tensor."""
    L = VocabLayout.compact(n_image_codes=64)
    ids = [0, L.boi, 5, L.eoi, L.boa, L.bin_base, L.eoa, L.boa, L.bin_base + 1, L.eoa]
    ref = chunk_mask_meta(torch.tensor(ids), L)
    for given in (ids, np.array(ids)):
        meta = chunk_mask_meta(given, L)
        assert torch.equal(meta.kv_block, ref.kv_block) and torch.equal(meta.q_limit, ref.q_limit)
    packed_ref = chunk_mask_meta(torch.tensor(ids + ids), L, torch.tensor([0, 10, 20]))
    for cu in ([0, 10, 20], np.array([0, 10, 20])):
        packed = chunk_mask_meta(np.array(ids + ids), L, cu)
        assert torch.equal(packed.q_limit, packed_ref.q_limit) and packed.cu_seqlens.tolist() == [0, 10, 20]
        assert causal_meta((20,), cu_seqlens=cu).cu_seqlens.tolist() == [0, 10, 20]
    with pytest.raises(TypeError, match="input_ids must be integer token ids"):
        chunk_mask_meta([0.0, 1.5], L)


def test_a_growing_sequence_is_one_sequence_not_a_batch_read_end_to_end():
    """A [2, L] batch of prompts was flattened into one sequence of 2L tokens, the second row's blocks numbered
    after the first's and its tokens placed after them."""
    from worldvla.mask import GrowingBlockMeta

    L = VocabLayout.compact(n_image_codes=64)
    row = torch.tensor([0, L.boi, 5, L.eoi])
    with pytest.raises(ValueError, match=r"one sequence.*got shape \(2, 4\).*one GrowingBlockMeta per row"):
        GrowingBlockMeta(torch.stack([row, row]), L)
    assert GrowingBlockMeta(row.view(1, 4), L).length == 4
    with pytest.raises(TypeError, match="input_ids must be integer token ids"):  # was truncated to ids 0 and 1
        GrowingBlockMeta(torch.tensor([0.0, 1.5]), L)


def test_ids_of_another_rank_are_refused_by_name_padded_and_packed():
    """Padded ids are [L] or [B, L], packed ids [T]: a [B, L, X] tensor, or a [B, L] batch given with cu_seqlens,
    is refused naming the shape, not failed on in an unpacking error or read as some other stream."""
    L = VocabLayout.compact()
    with pytest.raises(ValueError, match=r"input_ids must be \[L\] or \[B, L\], got shape \(2, 2, 3\)"):
        chunk_mask_meta(torch.zeros(2, 2, 3, dtype=torch.long), L)
    with pytest.raises(ValueError, match=r"input_ids must be \[L\] or \[B, L\], got shape \(2, 2, 3\)"):
        chunk_attention_mask(torch.zeros(2, 2, 3, dtype=torch.long), L)
    with pytest.raises(ValueError, match=r"packed input_ids must be 1-D \[T\] with cu_seqlens, got shape \(2, 3\)"):
        chunk_mask_meta(torch.zeros(2, 3, dtype=torch.long), L, cu_seqlens=torch.tensor([0, 6]))


def test_a_single_boundary_marks_no_document():
    """cu_seqlens needs n_docs + 1 >= 2 entries: [0] for no tokens is refused with the rule, not a bare max() error."""
    from worldvla.mask import cu_seqlens_problem

    L = VocabLayout.compact()
    assert "must rise from 0 to T=0" in cu_seqlens_problem([0], 0)
    with pytest.raises(ValueError, match=r"cu_seqlens must rise from 0 to T=0 .*got \[0\]"):
        chunk_mask_meta(torch.zeros(0, dtype=torch.long), L, cu_seqlens=torch.tensor([0]))
    with pytest.raises(ValueError, match=r"cu_seqlens must rise from 0 to T=0"):
        causal_meta((0,), cu_seqlens=torch.tensor([0]))


def test_padded_metadata_carries_its_row_length_as_max_seqlen():
    """Padded metadata sets max_seqlen to the row length, as causal_meta does (0 would send the model to read the
    positions on the host for it)."""
    L = VocabLayout.compact()
    for shape in ((7,), (3, 5)):
        ids = torch.zeros(shape, dtype=torch.long)
        assert chunk_mask_meta(ids, L).max_seqlen == shape[-1] == causal_meta(shape).max_seqlen


def test_decode_meta_takes_each_rows_own_kv_len():
    """kv_len is per sequence: a short row's query hides the slots past its own length even where a longer row of
    the batch has them filled."""
    dm = DecodeMeta(q_pos=torch.tensor([[5], [5]], dtype=torch.int32), q_limit=torch.full((2, 1), -1, dtype=torch.int32),
                    kv_block=torch.full((2, 8), NO_BLOCK, dtype=torch.int32), kv_len=torch.tensor([8, 3], dtype=torch.int32))
    m = dm.dense_mask()
    assert m[0, 0].tolist() == [True] * 6 + [False] * 2
    assert m[1, 0].tolist() == [True] * 3 + [False] * 5


def test_a_malformed_sequence_names_its_first_bad_token():
    """Every token after a stray EOA (or inside a nested BOA's block) is malformed as well: the error names the
    first one, and what it is, not a later token."""
    L = VocabLayout.compact(n_image_codes=64)
    b = L.bin_base
    block = [L.boa, b, b + 1, L.eoa]
    with pytest.raises(ValueError, match=r"token 4 \(of the flattened input\) is an EOA that closes no open action"):
        chunk_mask_meta(torch.tensor(block + [L.eoa, 5, L.sep]), L)
    with pytest.raises(ValueError, match=r"token 2 \(of the flattened input\) is a BOA inside an open action block"):
        chunk_mask_meta(torch.tensor(block[:2] + block + [5]), L)
    with pytest.raises(ValueError, match=r"token 8 \(of the flattened input\) is a BOA after an EOA"):
        chunk_mask_meta(torch.tensor(block + [L.eoa, 5, 6, 7] + block + [L.eoa]), L, release_pairing=True)


def test_boundaries_listed_in_an_error_are_cut_only_past_eight():
    """The error lists up to eight boundaries; '...' marks only a list that had more."""
    from worldvla.mask import cu_seqlens_problem

    assert cu_seqlens_problem(list(range(7)) + [9], 8).endswith("got [0, 1, 2, 3, 4, 5, 6, 9]")
    assert cu_seqlens_problem(list(range(8)) + [9], 8).endswith("got [0, 1, 2, 3, 4, 5, 6, 7]...")


def test_boundaries_of_another_rank_are_refused_not_flattened():
    """cu_seqlens is 1-D: a [1, 3] tensor of valid boundaries is refused (flattened it would pass the check and then
    fail in a shape error), for packed chunk and causal metadata and at the kernels' check, which names the shape."""
    from worldvla.mask import check_cu_seqlens

    L = VocabLayout.compact()
    cu = torch.tensor([[0, 3, 6]])
    with pytest.raises(ValueError, match=r"cu_seqlens must rise from 0 to T=6 .*got \[\]"):
        chunk_mask_meta(torch.zeros(6, dtype=torch.long), L, cu_seqlens=cu)
    with pytest.raises(ValueError, match=r"cu_seqlens must rise from 0 to T=6"):
        causal_meta((6,), cu_seqlens=cu)
    meta = causal_meta((6,), cu_seqlens=torch.tensor([0, 3, 6]))
    meta.cu_seqlens = cu.to(torch.int32)
    with pytest.raises(ValueError, match=r"meta.cu_seqlens must be 1-D with n_docs \+ 1 >= 2 entries, got shape \(1, 3\)"):
        check_cu_seqlens(meta, 6)


def test_a_growing_sequence_refuses_an_eoa_as_its_very_first_token():
    """An EOA as the first token of an empty sequence closes no block: refused in both pairings, as the whole
    sequence's metadata refuses it."""
    from worldvla.mask import GrowingBlockMeta

    L = VocabLayout.compact(n_image_codes=64)
    with pytest.raises(ValueError, match="token 0 is an EOA that closes no open action block"):
        GrowingBlockMeta(torch.zeros(0, dtype=torch.long), L).push(L.eoa)
    with pytest.raises(ValueError, match="token 0 is an EOA before any action block"):
        GrowingBlockMeta(torch.zeros(0, dtype=torch.long), L, release_pairing=True).push(L.eoa)
    with pytest.raises(ValueError, match="an EOA that closes no open action block"):
        chunk_mask_meta(torch.tensor([L.eoa]), L)


def test_block_ordinals_count_on_past_a_document_that_ends_inside_a_block():
    """The block a document (or row) leaves open keeps its ordinal: the next document's blocks number on from it,
    so ordinals grow along the whole stream, packed or padded."""
    L = VocabLayout.compact(n_image_codes=64)
    b = L.bin_base
    first = [L.boi, 5, L.eoi, L.boa, b]                       # ends inside block 0
    second = [L.boi, 6, L.eoi, L.boa, b, L.eoa, L.boa, b, L.eoa]
    meta = chunk_mask_meta(torch.tensor(first + second), L, cu_seqlens=torch.tensor([0, 5, 14]))
    assert meta.kv_block.tolist() == [NO_BLOCK] * 3 + [0, 0] + [NO_BLOCK] * 3 + [1] * 3 + [2] * 3
    assert meta.q_limit.tolist() == [-1] * 3 + [0, 0] + [-1] * 3 + [1] * 3 + [2] * 3
    rows = torch.full((2, 9), L.pad)
    rows[0, :5], rows[1] = torch.tensor(first), torch.tensor(second)
    padded = chunk_mask_meta(rows, L)
    assert padded.kv_block[1].tolist() == [NO_BLOCK] * 3 + [1] * 3 + [2] * 3
    assert padded.kv_block[0, :5].tolist() == [NO_BLOCK] * 3 + [0, 0]
