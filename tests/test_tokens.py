import json

import numpy as np
import pytest
import torch

from worldvla import ActionTokenizer, SequenceBuilder, VocabLayout
from worldvla.tokens import (LIBERO_MAX, LIBERO_MIN, ByteTextTokenizer, ChameleonTextTokenizer,
                             codes_from_image_tokens, image_tokens)

CH = VocabLayout.chameleon()


def test_chameleon_ids():
    assert (CH.bos, CH.boi, CH.eoi, CH.newline, CH.sep, CH.boa, CH.eoa) == (0, 8197, 8196, 8803, 8710, 10004, 15004)
    assert CH.bin_range == (10006, 10262)
    assert CH.res_token(8) == 8812 and CH.res_token(16) == 8820
    assert CH.vocab_size == 65536 and CH.n_image_codes == 8192


def _bpe_name(code):
    return "IMGIMG" + "".join("ABCDEFGHIJ"[int(c)] for c in str(code)) + "Z"


def _shuffled_tokenizer(tmp_path, seed):
    """A text_tokenizer.json whose image tokens are NOT in code order (slot i holds code perm[i]) -> (path, perm)."""
    perm = torch.randperm(8192, generator=torch.Generator().manual_seed(seed)).tolist()
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    vocab.update({_bpe_name(code): 4 + slot for slot, code in enumerate(perm)})
    p = tmp_path / "text_tokenizer.json"
    p.write_text(json.dumps({"model": {"type": "BPE", "vocab": vocab, "merges": []}}))
    return p, perm


def test_image_ids_from_tokenizer_json(tmp_path):
    # A tokenizer whose image tokens are NOT in code order: the mapping must follow the names.
    p, perm = _shuffled_tokenizer(tmp_path, 0)
    lay = VocabLayout.chameleon(p)
    for slot in (0, 17, 8191):
        assert lay.image_code_ids[perm[slot]] == 4 + slot
    codes = torch.tensor([[perm[3], perm[5]]])
    assert lay.code_to_id(codes).tolist() == [[7, 9]]
    assert torch.equal(lay.id_to_code(lay.code_to_id(codes)), codes)


def spec_digitize(a):
    """Spec section 1, written out with numpy exactly as the release does."""
    mn, mx = np.array(LIBERO_MIN), np.array(LIBERO_MAX)
    norm = np.clip(2 * (a - mn) / (mx - mn + 1e-8) - 1, -1, 1)
    return np.digitize(norm, np.linspace(-1, 1, 256)) + 10004 + 1


def spec_decode(tok):
    bins = np.linspace(-1, 1, 256)
    centers = (bins[:-1] + bins[1:]) / 2
    v = centers[np.clip(tok - 10004 - 1 - 1, 0, 254)]
    mn, mx = np.array(LIBERO_MIN), np.array(LIBERO_MAX)
    return (v + 1) / 2 * (mx - mn + 1e-8) + mn


def test_action_tokenizer_matches_spec():
    at = ActionTokenizer(CH)
    rng = np.random.default_rng(0)
    a = rng.uniform(-1.2, 1.2, size=(50, 7))
    a[0] = LIBERO_MIN
    a[1] = np.array(LIBERO_MAX) + 0.5  # clipped to norm == 1.0 -> the 256th bin (the +1e-8 keeps the bound itself below it)
    ids = at.encode(a).numpy()
    assert ids.shape == (50, 9) and (ids[:, 0] == 10004).all() and (ids[:, -1] == 15004).all()
    np.testing.assert_array_equal(ids[:, 1:-1], spec_digitize(a))
    assert ids[1, 1:-1].tolist() == [10261] * 7 and ids[0, 1:-1].tolist() == [10006] * 7
    np.testing.assert_allclose(at.decode(ids), spec_decode(ids[:, 1:-1]), rtol=0, atol=0)
    # round trip error is at most half a bin (inside the bounds)
    inside = np.clip(a, LIBERO_MIN, LIBERO_MAX)
    half_bin = (np.array(LIBERO_MAX) - np.array(LIBERO_MIN)) / 255
    assert (np.abs(at.decode(at.encode(inside)) - inside) <= half_bin + 1e-9).all()


def test_action_tokenizer_takes_tensors_of_any_float_dtype():
    """NumPy reads no bfloat16 tensor: encode and normalize raised "Got unsupported ScalarType BFloat16"."""
    at = ActionTokenizer(VocabLayout.compact(), low=[-2, -1, 0], high=[2, 1, 5])
    a = torch.tensor([[0.5, -0.25, 3.0], [1.5, 0.75, 0.5]])  # exact in bfloat16
    want = at.encode(a.numpy())
    for dtype in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
        assert torch.equal(at.encode(a.to(dtype)), want), dtype
        np.testing.assert_array_equal(at.normalize(a.to(dtype)), at.normalize(a.numpy()))


def test_action_tokenizer_any_dim_and_errors():
    at = ActionTokenizer(VocabLayout.compact(), low=[-2, -1, 0], high=[2, 1, 5])
    assert at.encode(np.zeros((4, 3)) + 0.3).shape == (4, 5)
    with pytest.raises(ValueError, match="action dimension 3"):
        at.encode(np.zeros((2, 7)))
    with pytest.raises(ValueError, match="NaN"):
        at.encode(np.array([0.0, np.nan, 1.0]))
    with pytest.raises(ValueError, match="inf"):
        at.encode(np.array([0.0, np.inf, 1.0]))
    with pytest.raises(ValueError):
        ActionTokenizer(VocabLayout.compact(), low=[0, 0], high=[1, 0])


def test_image_tokens_256px_layout():
    codes = torch.randint(0, 8192, (16, 16))
    toks = image_tokens(codes, CH)
    assert toks.numel() == 276
    assert toks[:3].tolist() == [8197, 8812, 8812] and toks[-1] == 8196
    assert (toks[3:-1].view(16, 17)[:, -1] == 8803).all()
    assert torch.equal(codes_from_image_tokens(toks, CH), codes)
    assert image_tokens(torch.randint(0, 8192, (32, 32)), CH).numel() == 1060


def test_non_square_images_give_height_then_width():
    """Spec 1: [BOI, res(H/32), res(W/32), H/16 rows of W/16 codes each closed by a newline, EOI]; every
    other test used square frames, where the two sides cannot be told apart."""
    codes = torch.randint(0, 8192, (16, 32))  # a 256 px high, 512 px wide frame
    toks = image_tokens(codes, CH)
    assert toks[1:3].tolist() == [CH.res_token(8), CH.res_token(16)]
    assert toks.numel() == 1 + 2 + 16 * 33 + 1 and (toks[3:-1].view(16, 33)[:, -1] == 8803).all()
    assert torch.equal(codes_from_image_tokens(toks, CH), codes)


@pytest.mark.parametrize("layout", [CH, VocabLayout.compact(), VocabLayout.compact(n_image_codes=64, n_bins=2, n_res=1)],
                         ids=lambda lay: lay.name)
def test_every_role_has_its_own_ids(layout):
    """Image codes, resolution tokens res(0..n_res), action bins, the specials and (compact) the text bytes never
    share an id: a shared one would make a decoded bin read as a resolution token or the reverse."""
    roles = {"codes": set(layout.image_code_ids), "res": set(range(layout.res_base, layout.res_base + layout.n_res + 1)),
             "bins": set(range(layout.bin_base, layout.bin_base + layout.n_bins)),
             "specials": {layout.bos, layout.boi, layout.eoi, layout.sep, layout.newline, layout.boa, layout.eoa}}
    if layout.name != "chameleon":
        roles["text"] = set(range(layout.text_base, layout.vocab_size))
        roles["specials"].add(layout.pad)
    assert len(roles["specials"]) == (8 if "text" in roles else 7)
    names = list(roles)
    for i, a in enumerate(names):
        assert max(roles[a]) < layout.vocab_size, a
        for b in names[i + 1:]:
            assert not roles[a] & roles[b], (a, b, sorted(roles[a] & roles[b])[:5])


def test_image_side_must_be_whole_grids():
    with pytest.raises(ValueError, match="multiples of 32"):
        image_tokens(torch.zeros(3, 4, dtype=torch.long), CH)


def test_out_of_range_codes_and_ids():
    with pytest.raises(ValueError, match="image codes"):
        CH.code_to_id(torch.tensor([8192]))
    with pytest.raises(ValueError, match="out of range"):
        CH.check_ids(torch.tensor([70000]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bool])
def test_codes_and_ids_must_be_integers(dtype):
    # .long() would truncate 3.7 to 3 without a word (a frame of codes read back as floats)
    with pytest.raises(TypeError, match="image codes must be an integer tensor"):
        CH.code_to_id(torch.tensor([3.7, 1.0]).to(dtype))
    lo = CH.image_id_range[0]
    with pytest.raises(TypeError, match="image token ids must be an integer tensor"):
        CH.id_to_code(torch.tensor([lo + 0.5]).to(dtype))
    for int_dtype in (torch.int16, torch.int32, torch.uint8):  # any integer type is taken
        assert CH.code_to_id(torch.tensor([3, 1], dtype=int_dtype)).tolist() == CH.code_to_id(torch.tensor([3, 1])).tolist()


def test_action_sample_template_and_labels():
    L = VocabLayout.compact(n_image_codes=64)
    text = ByteTextTokenizer(L)
    sb = SequenceBuilder(L, text, ActionTokenizer(L, [-1] * 4, [1] * 4))
    codes = [torch.randint(0, 64, (2, 2)) for _ in range(2)]
    acts = torch.rand(5, 4) * 2 - 1
    s = sb.action_sample("open the drawer", codes, acts)
    prompt = sb.action_prompt("open the drawer", codes)
    n_prompt = len(prompt)
    assert s.input_ids[0] == L.bos
    assert text.decode(s.input_ids[1:n_prompt]).startswith("What action should the robot take to open the drawer?")
    assert s.input_ids[n_prompt - 1] == L.sep and s.input_ids[-1] == L.sep
    assert (s.labels[:n_prompt] == -100).all()
    assert torch.equal(s.labels[n_prompt:], s.input_ids[n_prompt:])
    assert len(s.input_ids) - n_prompt == 5 * 6 + 1
    # two images, each 1 + 2 + 2*(2+1) + 1 tokens
    assert int((s.input_ids == L.boi).sum()) == 2


def test_world_sample_template_and_labels():
    L = VocabLayout.compact(n_image_codes=64)
    sb = SequenceBuilder(L, ByteTextTokenizer(L), ActionTokenizer(L, [-1] * 4, [1] * 4))
    c0, c1 = torch.randint(0, 64, (2, 2)), torch.randint(0, 64, (2, 2))
    s = sb.world_sample(c0, np.array([0.1, -0.2, 0.3, 1.0]), c1)
    n_prompt = int((s.labels == -100).sum())
    answer = s.input_ids[n_prompt:]
    assert torch.equal(answer[:-1], image_tokens(c1, L)) and answer[-1] == L.sep
    assert s.input_ids[n_prompt - 1] == L.sep and s.input_ids[n_prompt - 2] == L.eoa


def test_world_prompt_holds_one_action():
    """A [K, D] chunk (or a [1, D] row) made a prompt of K action blocks, which the world model never saw (its
    samples hold one action): refused by name, for prompts and samples alike."""
    L = VocabLayout.compact(n_image_codes=64)
    sb = SequenceBuilder(L, ByteTextTokenizer(L), ActionTokenizer(L, [-1] * 4, [1] * 4))
    c0 = torch.randint(0, 64, (2, 2))
    one = sb.world_prompt(c0, [0.1, -0.2, 0.3, 1.0])
    assert int((one == L.boa).sum()) == 1
    for bad in (np.zeros((3, 4)), np.zeros((1, 4))):
        with pytest.raises(ValueError, match=rf"holds one action \[4\], got shape \({bad.shape[0]}, 4\)"):
            sb.world_prompt(c0, bad)
        with pytest.raises(ValueError, match="holds one action"):
            sb.world_sample(c0, bad, c0)
    with pytest.raises(ValueError, match="action dimension 4"):
        sb.world_prompt(c0, np.zeros(5))

def test_chameleon_text_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"<unk>": 3, "hello": 100, "robot": 101}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    p = tmp_path / "t.json"
    tok.save(str(p))
    t = ChameleonTextTokenizer(p)
    assert t.encode("hello robot") == [100, 101]
    with pytest.raises(FileNotFoundError):
        ChameleonTextTokenizer(tmp_path / "missing.json")


def test_image_token_lists_are_checked_both_ways():
    """Whole resolution grids in both directions, every row closed by a newline, image ids without holes."""
    import dataclasses

    with pytest.raises(ValueError, match="multiples of 32"):
        image_tokens(torch.zeros(4, 3, dtype=torch.long), CH)  # whole grids high but not wide
    toks = image_tokens(torch.randint(0, 8192, (4, 4)), CH)
    bad = toks.clone()
    bad[3 + 4] = 5  # the first row's newline replaced by an image code
    with pytest.raises(ValueError, match="newline"):
        codes_from_image_tokens(bad, CH)
    holes = dataclasses.replace(VocabLayout.compact(n_image_codes=4), image_code_ids=(4, 5, 7))
    assert holes.id_to_code(torch.tensor([7, 4])).tolist() == [2, 0]
    with pytest.raises(ValueError, match="not image codes"):
        holes.id_to_code(torch.tensor([6]))  # inside [lo, hi) but no code's id


def test_layout_bounds_of_resolution_tokens_and_bins():
    lay = VocabLayout.compact(n_res=4)
    assert lay.res_token(4) == lay.res_base + 4 < lay.bin_base  # res(n_res) is the last resolution token
    assert CH.res_token(CH.n_res) == 8804 + 64
    with pytest.raises(ValueError, match="outside"):
        lay.res_token(5)
    with pytest.raises(ValueError, match="n_bins >= 2"):
        VocabLayout.compact(n_bins=1)  # a single edge leaves no bin centre to decode to


def test_action_samples_need_an_image_and_a_chunk_of_actions():
    L = VocabLayout.compact(n_image_codes=64)
    sb = SequenceBuilder(L, ByteTextTokenizer(L), ActionTokenizer(L, [-1] * 4, [1] * 4))
    codes = [torch.randint(0, 64, (2, 2))]
    with pytest.raises(ValueError, match="at least one image"):
        sb.action_prompt("open the drawer", [])
    with pytest.raises(ValueError, match=r"\[K, D\]"):
        sb.action_sample("open the drawer", codes, np.zeros(4))  # one action [D], not a chunk [K, D]


def test_a_tokenizer_file_of_another_kind_is_named_with_what_was_expected(tmp_path):
    """VocabLayout.chameleon(<a model's config.json>) was a bare KeyError: 'model'; a damaged file json's "Expecting
    value", without the file's name; the text tokenizer itself raised tokenizers' plain Exception."""
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"model_type": "chameleon", "vocab_size": 65536}))
    cut = tmp_path / "text_tokenizer.json"
    cut.write_text('{"model": {"vocab": {"<s>": 0,\n')
    listed = tmp_path / "list.json"
    listed.write_text("[1, 2]")
    with pytest.raises(ValueError, match=f"{config}: no model.vocab object, so this is not a text tokenizer file "
                                         r"\(top-level keys: model_type, vocab_size\); expected the release's "
                                         r"text_tokenizer.json"):
        VocabLayout.chameleon(config)
    with pytest.raises(ValueError, match=f"{cut}: not a valid JSON file .*expected the release's text_tokenizer"):
        VocabLayout.chameleon(cut)
    with pytest.raises(ValueError, match=rf"{listed}: no model.vocab object.*\(a JSON list\)"):
        VocabLayout.chameleon(listed)
    with pytest.raises(FileNotFoundError, match=f"text tokenizer not found: {tmp_path / 'nope.json'}"):
        VocabLayout.chameleon(tmp_path / "nope.json")
    with pytest.raises(ValueError, match=f"{cut}: not a text tokenizer file the tokenizers library can load"):
        ChameleonTextTokenizer(cut)


@pytest.mark.parametrize("low, high", [([float("nan"), -1.0], [1.0, 1.0]), ([-1.0, -np.inf], [1.0, np.inf]),
                                       ([-1.0, -1.0], [1.0, np.inf])])
def test_action_bounds_must_be_finite(low, high):
    """NaN or infinite bounds were taken: every action then decoded to NaN."""
    with pytest.raises(ValueError, match="bounds must be finite.*give finite"):
        ActionTokenizer(VocabLayout.compact(), low=low, high=high)


def test_an_empty_action_chunk_is_refused():
    """A [0, D] chunk gave an action sample whose answer was the separator alone."""
    L = VocabLayout.compact(n_image_codes=64)
    sb = SequenceBuilder(L, ByteTextTokenizer(L), ActionTokenizer(L, [-1] * 4, [1] * 4))
    codes = [torch.randint(0, 64, (2, 2))]
    with pytest.raises(ValueError, match="at least one action.*empty"):
        sb.action_sample("open the drawer", codes, np.zeros((0, 4)))
    s = sb.action_sample("open the drawer", codes, np.zeros((1, 4)))
    assert s.input_ids[s.labels != -100].tolist()[0] == L.boa


def test_byte_text_round_trips_every_byte_and_skips_other_ids():
    """Byte-level text: each UTF-8 byte b is text_base + b (NUL included), decoding leaves out ids of other roles
    and shows a character cut short as U+FFFD rather than dropping it."""
    from worldvla.tokens import text_tokenizer_for

    L = VocabLayout.compact(n_image_codes=64)
    text = text_tokenizer_for(L)
    assert isinstance(text, ByteTextTokenizer)
    s = "a\x00b é\n"
    ids = text.encode(s)
    assert ids == [L.text_base + b for b in s.encode("utf-8")]
    assert text.decode(ids) == s
    assert text.decode([L.bos, *ids[:3], L.image_code_ids[0], L.bin_base, *ids[3:], L.sep]) == s
    assert text.decode(text.encode("é")[:1]) == "\ufffd"


def test_the_chameleon_layout_has_no_byte_text_and_needs_the_tokenizer_file():
    from worldvla.tokens import text_tokenizer_for

    with pytest.raises(ValueError, match="no byte-level text range; use ChameleonTextTokenizer"):
        ByteTextTokenizer(CH)
    with pytest.raises(ValueError, match=r"needs the release's text_tokenizer.json.*--tokenizer-json"):
        text_tokenizer_for(CH)


def test_chameleon_text_tokenizer_adds_no_special_tokens(tmp_path):
    """The sequence builder places BOS itself: a tokenizer file whose post-processor prepends <s> (as the
    release's does) must not put a second one inside the prompt."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    from worldvla.tokens import text_tokenizer_for

    tok = Tokenizer(models.WordLevel({"<s>": 0, "<unk>": 3, "hello": 100, "robot": 101}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    p = tmp_path / "t.json"
    tok.save(str(p))
    t = text_tokenizer_for(CH, p)
    assert isinstance(t, ChameleonTextTokenizer) and t.path == p
    assert t.encode("hello robot") == [100, 101]


def test_negative_codes_and_ids_are_refused():
    """A negative code indexed the id table from its end (code -1 became the last code's id) without a word."""
    with pytest.raises(ValueError, match=r"image codes must lie in \[0, 8192\), got range \[-1, 5\]"):
        CH.code_to_id(torch.tensor([5, -1]))
    with pytest.raises(ValueError, match=r"token ids out of range: \[-3, 7\]"):
        CH.check_ids(torch.tensor([7, -3]))
    with pytest.raises(TypeError, match="token ids must be an integer tensor"):
        CH.check_ids(torch.tensor([1.0, 2.0]))
    CH.check_ids(torch.tensor([0, CH.vocab_size - 1]))  # both ends are in range


def test_a_tokenizer_file_missing_image_codes_is_refused(tmp_path):
    """Every code needs its IMGIMG token; names past the codebook are not codes of it."""
    vocab = {"<s>": 0, _bpe_name(8192): 9}  # one past the last code: left out, not an index error
    vocab.update({_bpe_name(code): 10 + code for code in range(8192) if code not in (5, 700)})
    p = tmp_path / "text_tokenizer.json"
    p.write_text(json.dumps({"model": {"type": "BPE", "vocab": vocab, "merges": []}}))
    with pytest.raises(ValueError, match=r"2 of 8192 image codes have no IMGIMG token \(first: \[5, 700\]\)"):
        VocabLayout.chameleon(p)
    vocab.update({_bpe_name(5): 5, _bpe_name(700): 6})
    p.write_text(json.dumps({"model": {"type": "BPE", "vocab": vocab, "merges": []}}))
    lay = VocabLayout.chameleon(p)
    assert lay.image_code_ids[:7] == (10, 11, 12, 13, 14, 5, 16) and lay.image_code_ids[700] == 6
    assert lay.n_image_codes == 8192


def _image_by_hand(codes, L):
    """Spec 1's image token list, written out: BOI, res(H/32), res(W/32), each row's ids then a newline, EOI."""
    per_grid = L.res_grid // L.patch
    h, w = codes.shape
    ids = [L.boi, L.res_base + h // per_grid, L.res_base + w // per_grid]
    for row in codes.tolist():
        ids += [L.image_code_ids[c] for c in row] + [L.newline]
    return ids + [L.eoi]


def _norm(a):
    """Spec 1's normalization for bounds [-1, 1]: an action of exactly 1.0 stays just below 1.0."""
    return np.clip(2 * (a + 1) / (2 + 1e-8) - 1, -1, 1)


def test_action_sample_is_the_releases_sequence_token_for_token():
    """Spec 2.1-2.2 written out: BOS, the prompt text, the history frames oldest first, the separator | each
    action of the chunk in time order as [BOA, its D bins, EOA], the separator; labels -100 up to and including
    the first separator, the ids after it. A reversed history or a chunk laid out dimension by dimension kept
    every length and count the older test checked."""
    L = VocabLayout.compact(n_image_codes=64)
    text = ByteTextTokenizer(L)
    at = ActionTokenizer(L, [-1] * 3, [1] * 3)
    sb = SequenceBuilder(L, text, at)
    previous, current = torch.tensor([[1, 2], [3, 4]]), torch.tensor([[50, 51], [52, 53]])
    acts = np.array([[-0.9, -0.5, 0.0], [0.1, 0.3, 0.5], [0.7, 0.8, 0.95]])
    s = sb.action_sample("open the drawer", [previous, current], acts)
    prompt = ([L.bos] + list(text.encode("What action should the robot take to open the drawer?"))
              + _image_by_hand(previous, L) + _image_by_hand(current, L) + [L.sep])
    bins = [L.bin_base + int(d) - 1 for d in np.digitize(_norm(acts), np.linspace(-1, 1, L.n_bins)).flatten()]
    answer = []
    for k in range(3):
        answer += [L.boa] + bins[3 * k:3 * k + 3] + [L.eoa]
    answer += [L.sep]
    assert s.input_ids.tolist() == prompt + answer
    assert s.labels.tolist() == [-100] * len(prompt) + answer
    assert s.kind == "action"


def test_world_sample_is_the_releases_sequence_token_for_token():
    """Spec 2.3 written out: BOS, the prompt text, the frame, its action, the separator | the next frame, the
    separator; only the part after the first separator carries labels."""
    from worldvla.tokens.sequence import WORLD_PROMPT

    L = VocabLayout.compact(n_image_codes=64)
    text = ByteTextTokenizer(L)
    at = ActionTokenizer(L, [-1] * 3, [1] * 3)
    sb = SequenceBuilder(L, text, at)
    c0, c1 = torch.tensor([[5, 6], [7, 8]]), torch.tensor([[60, 61], [62, 63]])
    action = np.array([0.2, -0.4, 1.0])
    s = sb.world_sample(c0, action, c1)
    bins = [L.bin_base + int(d) - 1 for d in np.digitize(_norm(action), np.linspace(-1, 1, L.n_bins))]
    prompt = [L.bos] + list(text.encode(WORLD_PROMPT)) + _image_by_hand(c0, L) + [L.boa] + bins + [L.eoa, L.sep]
    answer = _image_by_hand(c1, L) + [L.sep]
    assert s.input_ids.tolist() == prompt + answer
    assert s.labels.tolist() == [-100] * len(prompt) + answer
    assert s.kind == "world"


def test_actions_at_the_bounds_take_the_releases_edge_bins():
    """The release's +1e-8 keeps an action exactly at its upper bound just below 1.0 after normalizing, in the
    255th bin (10260); only what clips to 1.0 takes the 256th (10261). Beyond the lower bound clips to the
    first bin (10006). Every bin decodes to a centre inside the bounds: the top two bins to the last centre,
    the first to the first centre."""
    at = ActionTokenizer(CH)
    mn, mx = np.array(LIBERO_MIN), np.array(LIBERO_MAX)
    ids = at.encode(np.stack([mx, mn, mn - 3.0, mx + 3.0])).numpy()[:, 1:-1]
    assert ids[0].tolist() == [10260] * 7
    assert ids[1].tolist() == [10006] * 7 and ids[2].tolist() == [10006] * 7
    assert ids[3].tolist() == [10261] * 7
    last, first = 1 - 1 / 255, -1 + 1 / 255  # the outermost bin centres of linspace(-1, 1, 256)
    top = (last + 1) / 2 * (mx - mn + 1e-8) + mn
    bottom = (first + 1) / 2 * (mx - mn + 1e-8) + mn
    np.testing.assert_allclose(at.decode(np.full(7, 10261)), top, rtol=0, atol=1e-12)
    np.testing.assert_allclose(at.decode(np.full(7, 10260)), top, rtol=0, atol=1e-12)
    np.testing.assert_allclose(at.decode(np.full(7, 10006)), bottom, rtol=0, atol=1e-12)
    assert (top < mx).all() and (bottom > mn).all()


def test_float64_tensors_keep_their_precision_and_bounds_round_trip():
    """A float64 tensor is read at float64: its normalized values and bins are those of the same NumPy array
    (a float32 detour moved values by ~1e-8, across a bin edge for an action that sits on one), and `to_dict`
    gives back the bounds that rebuild the same tokenizer."""
    at = ActionTokenizer(CH)
    edge = np.linspace(-1, 1, 256)[100]
    a = np.array(LIBERO_MIN) + (edge + 1) / 2 * (np.array(LIBERO_MAX) - np.array(LIBERO_MIN) + 1e-8)
    a = np.stack([a, np.random.default_rng(1).uniform(-0.3, 0.3, 7)])
    np.testing.assert_array_equal(at.normalize(torch.from_numpy(a)), at.normalize(a))
    assert torch.equal(at.encode(torch.from_numpy(a)), at.encode(a))
    back = ActionTokenizer(CH, **at.to_dict())
    assert back.to_dict() == {"low": list(LIBERO_MIN), "high": list(LIBERO_MAX)}
    assert torch.equal(back.encode(a), at.encode(a))


def test_the_id_just_past_the_image_codes_is_named_as_no_image_code():
    """The Chameleon EOI (8196) is the id just past the image codes' range: in a code grid it was refused as an
    index past the code table (an IndexError) rather than named as a token that is no image code."""
    lo, hi = CH.image_id_range
    assert hi == CH.eoi
    with pytest.raises(ValueError, match=rf"1 token ids are not image codes \(expected ids in \[{lo}, {hi}\)\)"):
        CH.id_to_code(torch.tensor([[4, CH.eoi]]))
    assert CH.id_to_code(torch.tensor([lo, hi - 1])).tolist() == [0, 8191]


def test_check_ids_refuses_the_vocabulary_size_itself_and_takes_no_ids():
    """Ids run 0..vocab_size - 1: the id vocab_size is one past the embedding's rows. An empty tensor has no id
    out of range."""
    L = VocabLayout.compact(n_image_codes=64)
    with pytest.raises(ValueError, match=rf"token ids out of range: \[0, {L.vocab_size}\] but the vocabulary has "
                                         rf"{L.vocab_size} entries \(layout 'compact-64-256'\)"):
        L.check_ids(torch.tensor([0, L.vocab_size]))
    L.check_ids(torch.tensor([0, L.vocab_size - 1]))
    L.check_ids(torch.zeros(0, dtype=torch.long))


def test_action_bounds_of_different_lengths_are_refused_by_name():
    with pytest.raises(ValueError, match=r"bounds must be two 1-D sequences of equal length, got \(3,\) and \(2,\)"):
        ActionTokenizer(VocabLayout.compact(), low=[-1, -1, -1], high=[1, 1])
    with pytest.raises(ValueError, match=r"got \(1,\) and \(3,\)"):  # one bound would broadcast over the other
        ActionTokenizer(VocabLayout.compact(), low=[-1], high=[1, 1, 1])


def test_an_image_token_list_cut_short_or_not_closed_is_refused():
    """Generated image tokens may stop early: a list without its closing EOI, with a row missing, or with no body
    at all is refused naming what is wrong, not read as codes or failed on with an index error."""
    codes = torch.randint(0, 64, (4, 2), generator=torch.Generator().manual_seed(0))
    L = VocabLayout.compact(n_image_codes=64)
    toks = image_tokens(codes, L)
    assert torch.equal(codes_from_image_tokens(toks, L), codes)
    unclosed = toks.clone()
    unclosed[-1] = L.image_code_ids[0]  # the EOI replaced by a code: every length still fits
    with pytest.raises(ValueError, match="must start with BOI and end with EOI"):
        codes_from_image_tokens(unclosed, L)
    no_last_row = torch.cat([toks[:-4], toks[-1:]])  # 4 rows announced, 3 written
    with pytest.raises(ValueError, match="image body has 9 tokens, expected 4 rows of 2 codes"):
        codes_from_image_tokens(no_last_row, L)
    for short in ([L.boi, L.eoi], [L.boi, L.res_token(2), L.eoi]):
        with pytest.raises(ValueError, match="must start with BOI and end with EOI"):
            codes_from_image_tokens(torch.tensor(short), L)


def test_image_tokens_round_trip_for_a_vq_of_another_downsampling():
    """A layout whose VQ downsamples by 8 has 4 codes per 32-px resolution grid a side: reading the tokens back
    takes the grid count times 4, as writing them divided by 4."""
    import dataclasses

    L = dataclasses.replace(VocabLayout.compact(n_image_codes=64), patch=8)
    codes = torch.randint(0, 64, (8, 4), generator=torch.Generator().manual_seed(0))  # 64 px high, 32 px wide
    toks = image_tokens(codes, L)
    assert toks[1:3].tolist() == [L.res_token(2), L.res_token(1)] and toks.numel() == 3 + 8 * 5 + 1
    assert torch.equal(codes_from_image_tokens(toks, L), codes)


def test_bool_ids_are_refused_as_ids_that_are_not_integers():
    """A bool tensor (a mask passed where ids go) passed the ids' range check as the ids 0 and 1."""
    with pytest.raises(TypeError, match="token ids must be an integer tensor, got torch.bool"):
        CH.check_ids(torch.tensor([True, False]))


def test_byte_text_decodes_both_ends_of_its_range_and_nothing_past_them():
    """The byte range is [text_base, text_base + 256): its last id (byte 0xFF, never valid UTF-8 alone) shows as
    U+FFFD like any broken byte; the ids just below and just above it are no text and are left out (the one above
    was the byte 256, which bytes() refuses)."""
    L = VocabLayout.compact(n_image_codes=64)
    text = ByteTextTokenizer(L)
    base = L.text_base
    assert text.decode([base + 0x61, base + 255, base + 0x62]) == "a\ufffdb"
    assert text.decode([base - 1, base + 0x61, base + 256]) == "a"
    assert text.decode(torch.tensor([base + 0x68, base + 0x69])) == "hi"  # a tensor of ids, as a model gives them


def test_chameleon_text_tokenizer_decodes_a_tensor_of_ids_leaving_special_tokens_out(tmp_path):
    """What a model generates is a tensor of ids; decoding gives the text of the words, without the <s> the
    sequence builder places."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"<s>": 0, "<unk>": 3, "hello": 100, "robot": 101}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<s>"])
    p = tmp_path / "t.json"
    tok.save(str(p))
    t = ChameleonTextTokenizer(p)
    ids = torch.tensor([0, *t.encode("hello robot")])
    assert t.decode(ids) == "hello robot"
    assert t.decode(np.asarray(ids)) == t.decode(ids.tolist()) == "hello robot"


def test_a_negative_grid_count_and_an_empty_codebook_are_refused():
    """res(-1) would be the id just below the resolution tokens (the compact layout's EOA), not a resolution; a
    compact layout of no image codes has no image range to sample from or weight."""
    lay = VocabLayout.compact(n_res=4)
    assert lay.res_base - 1 == lay.eoa
    with pytest.raises(ValueError, match=r"resolution of -1 grids is outside this layout's 0\.\.4"):
        lay.res_token(-1)
    assert lay.res_token(0) == lay.res_base
    with pytest.raises(ValueError, match="needs n_image_codes >= 1 and n_bins >= 2, got 0, 256"):
        VocabLayout.compact(n_image_codes=0)


def test_an_empty_code_tensor_maps_to_no_ids():
    """No codes (a batch of no frames) have no range to check: they map to an empty id tensor of the same shape."""
    for shape in ((0,), (0, 16), (2, 0)):
        ids = CH.code_to_id(torch.zeros(shape, dtype=torch.long))
        assert ids.shape == shape and ids.dtype == torch.long


def test_a_layout_read_back_from_json_is_the_same_layout():
    """A checkpoint's config carries the layout as JSON. Read back, it equals the layout it was written from (image
    ids a tuple again, the layout hashable), so the Chameleon layout that only assumes code c -> id 4 + c is still
    known as that, and rebuilt from the text tokenizer or warned about."""
    from worldvla.tokens.layout import with_release_image_ids

    for lay in (CH, VocabLayout.compact(n_image_codes=64)):
        back = VocabLayout.from_dict(json.loads(json.dumps(lay.to_dict())))
        assert back == lay and hash(back) == hash(lay)
        assert isinstance(back.image_code_ids, tuple)
    back = VocabLayout.from_dict(json.loads(json.dumps(CH.to_dict())))
    with pytest.warns(UserWarning, match="maps image code c to id 4 \\+ c, an assumption"):
        assert with_release_image_ids(back) is back


def test_the_image_weight_mask_marks_exactly_the_image_ids():
    """The loss weights alpha on image-code ids: with ids that leave a gap (id 6 here is no code), the gap is not an
    image id, nor are the ids around the range."""
    import dataclasses

    holes = dataclasses.replace(VocabLayout.compact(n_image_codes=4), image_code_ids=(4, 5, 7))
    m = holes.image_code_weight_mask()
    assert m.shape == (holes.vocab_size,) and m.dtype == torch.bool
    assert m.nonzero().flatten().tolist() == [4, 5, 7]
    assert CH.image_code_weight_mask().nonzero().flatten().tolist() == list(range(4, 8196))


def test_the_last_rows_newline_is_checked_as_every_other():
    """Every row ends with the newline, the last one too: a code in place of the last newline (generation cut one
    token short of the row's end) is refused, not read as a grid."""
    L = VocabLayout.compact(n_image_codes=64)
    codes = torch.randint(0, 64, (4, 2), generator=torch.Generator().manual_seed(2))
    toks = image_tokens(codes, L)
    bad = toks.clone()
    bad[-2] = L.image_code_ids[1]  # the last row's newline, just before EOI
    with pytest.raises(ValueError, match="image rows must each end with the newline token"):
        codes_from_image_tokens(bad, L)


def test_an_image_token_list_whose_sizes_are_no_resolution_tokens_is_refused():
    """Generated tokens may hold another token where the height or width goes. Such a list was read as a negative
    number of rows ("expected -6 rows of -6 codes"), or failed in a reshape with torch's RuntimeError (here EOA and
    BOA: -2 rows of -4 codes make the 6 body tokens), or as 66 rows for an id past the resolution tokens."""
    L = VocabLayout.compact(n_image_codes=64)
    toks = image_tokens(torch.randint(0, 64, (2, 2), generator=torch.Generator().manual_seed(3)), L)
    res = int(toks[1])
    for h_id, w_id in ((L.eoa, L.boa), (L.newline, L.newline), (res, L.image_code_ids[3]),
                       (L.res_base + L.n_res + 1, res)):
        bad = toks.clone()
        bad[1], bad[2] = h_id, w_id
        with pytest.raises(ValueError, match=rf"must give its height and width as resolution tokens \(ids "
                                             rf"{L.res_base}\.\.{L.res_base + L.n_res}\) after BOI, got ids "
                                             rf"{h_id} and {w_id}"):
            codes_from_image_tokens(bad, L)
    assert codes_from_image_tokens(toks, L).shape == (2, 2)


def test_ids_below_the_bins_decode_to_the_first_bin_centre():
    """As the release: any id decodes to a clipped bin centre. The ids just below the bins (BOA 10004, and 10005),
    which a model may write where a bin goes, take the first centre as 10006 does, not a centre counted from the
    end of the table."""
    at = ActionTokenizer(CH)
    first = at.decode(np.full(7, 10006))
    for tok in (10004, 10005, 0):
        np.testing.assert_array_equal(at.decode(np.full(7, tok)), first)
        np.testing.assert_array_equal(at.decode(np.full(7, tok)), spec_decode(np.full(7, tok)))


def test_decoding_the_wrong_number_of_bin_tokens_is_refused():
    """A one-dimensional tokenizer given two bins broadcast them into two actions without a word."""
    L = VocabLayout.compact()
    at = ActionTokenizer(L, low=[-1.0], high=[1.0])
    for ids in ([L.bin_base, L.bin_base + 5], [L.bin_base] * 4):
        with pytest.raises(ValueError, match=rf"expected 1 bin tokens \(or 3 with BOA/EOA\), got shape \({len(ids)},\)"):
            at.decode(np.array(ids))
    # A bare id is no row of bins either (it was an IndexError from reading its last dimension).
    for ids in (L.bin_base, np.int64(L.bin_base), torch.tensor(L.bin_base)):
        with pytest.raises(ValueError, match=r"expected 1 bin tokens \(or 3 with BOA/EOA\), got shape \(\)"):
            at.decode(ids)
    assert at.decode(np.array([L.boa, L.bin_base, L.eoa])).shape == (1,)


def test_a_scalar_action_and_bounds_of_two_dimensions_are_refused_by_name():
    """A bare number is no action vector; bounds of shape [1, D] (per-dimension statistics kept 2-D) made a tokenizer
    of action_dim 1 that then refused every real action."""
    L = VocabLayout.compact()
    at = ActionTokenizer(L, low=[-1.0], high=[1.0])
    with pytest.raises(ValueError, match=r"actions must end in the action dimension 1, got shape \(\)"):
        at.encode(0.5)
    with pytest.raises(ValueError, match=r"bounds must be two 1-D sequences of equal length, got \(1, 3\) and \(1, 3\)"):
        ActionTokenizer(L, low=[[-1.0, -1.0, -1.0]], high=[[1.0, 1.0, 1.0]])


def test_actions_from_a_tensor_that_requires_grad_are_tokenized():
    """Actions a model predicts carry autograd history; reading them for tokenizing needs no grad."""
    at = ActionTokenizer(VocabLayout.compact(), low=[-2, -1, 0], high=[2, 1, 5])
    a = torch.tensor([[0.5, -0.25, 3.0], [1.5, 0.75, 0.5]], requires_grad=True)
    assert torch.equal(at.encode(a * 1.0), at.encode(a.detach().numpy()))
    np.testing.assert_array_equal(at.normalize(a), at.normalize(a.detach().numpy()))


def test_a_compact_layout_of_a_negative_resolution_count_is_refused():
    """A negative n_res put the first action bins on BOA, EOA and the resolution tokens (n_res=-3: bin_base == BOA),
    so bins decoded from block markers and the markers' ids counted as bins."""
    for n_res in (-1, -3):
        with pytest.raises(ValueError, match=rf"n_res >= 1.*got {n_res}"):
            VocabLayout.compact(n_image_codes=64, n_res=n_res)
    lay = VocabLayout.compact(n_image_codes=64, n_res=1)
    assert lay.bin_base > lay.res_base + lay.n_res > lay.eoa


def test_an_action_prompt_takes_a_stack_of_images_and_refuses_a_single_grid_by_name():
    """History images given as one tensor failed in torch's 'Boolean value of Tensor ... is ambiguous'. A [N, h, w]
    stack is N images; a lone [h, w] grid is refused with the fix (a list of grids)."""
    L = VocabLayout.compact(n_image_codes=64)
    b = SequenceBuilder(L, ByteTextTokenizer(L), ActionTokenizer(L, [-1.0] * 7, [1.0] * 7))
    codes = torch.randint(0, 64, (2, 4, 4), generator=torch.Generator().manual_seed(4))
    assert torch.equal(b.action_prompt("open the drawer", codes), b.action_prompt("open the drawer", list(codes)))
    with pytest.raises(ValueError, match=r"a list of \[h, w\] code grids.*got a tensor of shape \(4, 4\).*\[codes\]"):
        b.action_prompt("open the drawer", codes[0])
    with pytest.raises(ValueError, match="at least one image"):
        b.action_prompt("open the drawer", codes[:0])


@pytest.mark.parametrize("ids", [np.full(9, 10006.7), torch.full((9,), 10006.0), np.ones(9, dtype=bool),
                                 [10006.5] * 9])
def test_decoding_ids_that_are_not_integers_is_refused(ids):
    """Float ids were truncated (10006.7 read as bin 10006) and bools read as ids 0 and 1 without a word."""
    at = ActionTokenizer(CH)
    with pytest.raises(TypeError, match="action token ids must be integers"):
        at.decode(ids)
    assert at.decode(np.full(9, 10006)).shape == at.decode(torch.full((9,), 10006)).shape == (7,)


def test_image_codes_and_ids_given_as_arrays_are_read_as_tensors():
    """VQ codes kept as NumPy arrays (or ids as a list) failed in an AttributeError ('numpy.ndarray' object has no
    attribute 'dim'), where actions as arrays were taken; they give what the same tensor gives."""
    L = VocabLayout.compact(n_image_codes=64)
    b = SequenceBuilder(L, ByteTextTokenizer(L), ActionTokenizer(L, [-1.0] * 7, [1.0] * 7))
    codes = torch.randint(0, 64, (4, 2), generator=torch.Generator().manual_seed(5))
    arr = codes.numpy()
    assert torch.equal(image_tokens(arr, L), image_tokens(codes, L))
    assert torch.equal(L.code_to_id(arr), L.code_to_id(codes))
    assert torch.equal(L.id_to_code(L.code_to_id(codes).numpy()), codes)
    L.check_ids([0, L.vocab_size - 1])
    with pytest.raises(ValueError, match="token ids out of range"):
        L.check_ids([L.vocab_size])
    assert torch.equal(b.action_prompt("push", [arr]), b.action_prompt("push", [codes]))
    s, t = b.world_sample(arr, np.zeros(7), arr), b.world_sample(codes, np.zeros(7), codes)
    assert torch.equal(s.input_ids, t.input_ids) and torch.equal(s.labels, t.labels)


def test_image_token_lists_of_floats_are_refused_not_truncated():
    """Float ids (10.4 for code id 10) were truncated into a grid without a word."""
    L = VocabLayout.compact(n_image_codes=64)
    toks = image_tokens(torch.randint(0, 64, (2, 2), generator=torch.Generator().manual_seed(6)), L)
    for bad in (toks.float() + 0.4, toks.double(), toks.bool()):
        with pytest.raises(TypeError, match="image token ids must be integers"):
            codes_from_image_tokens(bad, L)
    assert codes_from_image_tokens(toks.tolist(), L).shape == (2, 2)


def test_an_instruction_that_is_not_text_is_refused():
    """A missing instruction (None) became the prompt 'What action should the robot take to None?'."""
    L = VocabLayout.compact(n_image_codes=64)
    b = SequenceBuilder(L, ByteTextTokenizer(L), ActionTokenizer(L, [-1.0] * 7, [1.0] * 7))
    codes = torch.zeros(2, 2, dtype=torch.long)
    for instr in (None, 3, b"open the drawer"):
        with pytest.raises(TypeError, match=rf"the instruction must be text \(str\), got {type(instr).__name__}"):
            b.action_prompt(instr, [codes])
        with pytest.raises(TypeError, match="the instruction must be text"):
            b.action_sample(instr, [codes], np.zeros((1, 7)))
    assert b.action_prompt("", [codes])[0] == L.bos


def test_bounds_and_normalized_values_from_tensors_of_any_float_dtype_are_read():
    """Bounds computed from bfloat16 statistics, or from a tensor that requires grad, failed in torch's 'Got
    unsupported ScalarType BFloat16' / 'Can't call numpy() on Tensor that requires grad'; so did denormalizing such
    a tensor, where normalizing it worked."""
    L = VocabLayout.compact()
    ref = ActionTokenizer(L, [-2.0, -1.0, 0.0], [2.0, 1.0, 4.0])
    low, high = torch.tensor([-2.0, -1.0, 0.0]), torch.tensor([2.0, 1.0, 4.0])
    for lo, hi in ((low.bfloat16(), high.bfloat16()), (low.requires_grad_(), high)):
        at = ActionTokenizer(L, lo, hi)
        np.testing.assert_array_equal(at.low, ref.low)
        np.testing.assert_array_equal(at.high, ref.high)
    v = torch.tensor([-1.0, 0.0, 0.5])
    for given in (v.bfloat16(), v.clone().requires_grad_()):
        np.testing.assert_array_equal(ref.denormalize(given), ref.denormalize(v.numpy()))


@pytest.mark.parametrize("code, tok, what", [(1, 4, r"codes 0 and 1 share token id 4"),
                                             (5, 70000, r"code 5 has token id 70000, outside the vocabulary of 65536"),
                                             (7, 65536, r"code 7 has token id 65536, outside the vocabulary of 65536")])
def test_a_tokenizer_file_whose_image_ids_collide_or_leave_the_vocabulary_is_refused(tmp_path, code, tok, what):
    """Two codes on one id decoded that id to one of them only; an id past the vocabulary put the image range past
    the logits. Each was taken without a word."""
    vocab = {"<s>": 0, "<unk>": 3}
    vocab.update({_bpe_name(c): 4 + c for c in range(8192)})
    vocab[_bpe_name(code)] = tok
    p = tmp_path / "text_tokenizer.json"
    p.write_text(json.dumps({"model": {"type": "BPE", "vocab": vocab, "merges": []}}))
    with pytest.raises(ValueError, match=rf"text_tokenizer.json: {what}"):
        VocabLayout.chameleon(p)
    vocab[_bpe_name(code)] = 4 + code
    p.write_text(json.dumps({"model": {"type": "BPE", "vocab": vocab, "merges": []}}))
    assert VocabLayout.chameleon(p) == CH


def test_a_layouts_record_holds_its_public_fields_only():
    """`to_dict` is what a checkpoint's config.json carries: the layout's public fields, not the private lookup
    cache, so the record names exactly what `from_dict` and `VocabLayout(...)` take."""
    import dataclasses

    public = {f.name for f in dataclasses.fields(VocabLayout) if not f.name.startswith("_")}
    for lay in (CH, VocabLayout.compact(n_image_codes=64)):
        d = lay.to_dict()
        assert set(d) == public and not any(k.startswith("_") for k in d)
        assert json.loads(json.dumps(d)) == d


def test_a_compact_layout_needs_one_resolution_token_past_res_0():
    """n_res = 0 leaves only res(0), which names no image: refused as the negative counts are; 1 is the least."""
    with pytest.raises(ValueError, match=r"needs n_res >= 1 resolution tokens .*got 0"):
        VocabLayout.compact(n_image_codes=64, n_res=0)
    assert VocabLayout.compact(n_image_codes=64, n_res=1).n_res == 1


def test_a_tokenizer_file_of_another_kind_names_its_keys_sorted_and_cut_at_eight(tmp_path):
    """The refusal lists the file's top-level keys in sorted order, the first eight of them, then '...'."""
    keys = ["zeta", "beta", "omega", "alpha", "kappa", "delta", "gamma", "eta", "iota"]
    p = tmp_path / "other.json"
    p.write_text(json.dumps({k: 1 for k in keys}))
    with pytest.raises(ValueError, match=r"\(top-level keys: alpha, beta, delta, eta, gamma, iota, kappa, omega, "
                                         r"\.\.\.\)"):
        VocabLayout.chameleon(p)


def test_an_empty_batch_of_action_ids_decodes_to_no_actions():
    """No ids (an empty batch, which NumPy makes float64 by default) have no value to truncate: they decode to an
    empty [0, D] array rather than being refused as ids that are not integers."""
    at = ActionTokenizer(VocabLayout.compact(), low=[-1.0] * 3, high=[1.0] * 3)
    for ids in (np.empty((0, 5)), np.empty((0, 3)), np.zeros((0, 5), dtype=np.int64)):
        out = at.decode(ids)
        assert out.shape == (0, 3) and out.dtype == np.float64


def test_images_of_the_largest_resolution_read_back():
    """res(n_res) is the layout's last resolution token and a valid height or width: an image of n_res grids a
    side reads back (with n_res = 1, every 2x2 code grid is one)."""
    L = VocabLayout.compact(n_image_codes=64, n_res=1)
    codes = torch.randint(0, 64, (2, 2), generator=torch.Generator().manual_seed(7))
    toks = image_tokens(codes, L)
    assert toks[1:3].tolist() == [L.res_base + L.n_res] * 2
    assert torch.equal(codes_from_image_tokens(toks, L), codes)


def test_code_grids_and_action_chunks_of_other_ranks_are_refused_by_name():
    """A flat row of codes, a stack of grids, or a batch of action chunks [N, K, D] is refused naming the shape
    it got, not failed on in an unpacking error or flattened into one long chunk."""
    L = VocabLayout.compact(n_image_codes=64)
    for bad in (torch.zeros(4, dtype=torch.long), torch.zeros(1, 2, 2, dtype=torch.long)):
        shape = str(tuple(bad.shape)).replace("(", r"\(").replace(")", r"\)")
        with pytest.raises(ValueError, match=rf"image codes must be a \[h, w\] grid, got shape {shape}"):
            image_tokens(bad, L)
    sb = SequenceBuilder(L, ByteTextTokenizer(L), ActionTokenizer(L, [-1.0] * 3, [1.0] * 3))
    codes = [torch.zeros(2, 2, dtype=torch.long)]
    with pytest.raises(ValueError, match=r"an action chunk must be \[K, D\], got shape \(2, 3, 5\)"):
        sb.action_sample("open the drawer", codes, np.zeros((2, 3, 3)))


def test_a_chameleon_layout_already_read_from_the_tokenizer_file_is_kept_without_a_warning(tmp_path):
    """Only the Chameleon layout that assumes code c -> id 4 + c is rebuilt or warned about: one whose image ids
    were read from the text tokenizer's names (not in code order) is returned as it is, with no tokenizer given
    and no warning."""
    import warnings

    from worldvla.tokens.layout import with_release_image_ids

    p, _ = _shuffled_tokenizer(tmp_path, 8)
    read = VocabLayout.chameleon(p)
    assert read.name == "chameleon" and read.image_code_ids != CH.image_code_ids
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert with_release_image_ids(read) is read
