"""A checkpoint of a model built here (not loaded from a release folder) in transformers' Chameleon:
the vocabulary_map its config.json needs, with Chameleon's names for the ids the layout uses."""
import json
import re
from pathlib import Path

import pytest
import torch

from worldvla.checkpoint import config_to_hf
from worldvla.mask import causal_meta
from worldvla.model import ModelConfig, WorldVLA
from worldvla.tokens import VocabLayout
from worldvla.tokens.layout import _code_from_bpe_name

from test_model import load_bin_folder, views_of_one_buffer  # (pytest puts tests/ on sys.path)

transformers = pytest.importorskip("transformers")


def test_a_model_built_here_loads_in_transformers_chameleon(tmp_path):
    """Its config.json had no vocabulary_map, and transformers' Chameleon failed to build the model
    ("'NoneType' object has no attribute 'get'"). Now it loads to the package's logits (fp32), and masks
    exactly the layout's image-code ids, which it reads from the map's IMGIMG names."""
    from transformers import ChameleonForConditionalGeneration

    model = WorldVLA(ModelConfig.tiny()).init_weights(generator=torch.Generator().manual_seed(0)).eval()
    model.save_pretrained(tmp_path / "ck")
    hf = ChameleonForConditionalGeneration.from_pretrained(tmp_path / "ck").eval()
    layout = model.layout
    assert hf.model.vocabulary_mapping.bpe2img == {i: c for c, i in enumerate(layout.image_code_ids)}
    ids = torch.randint(0, model.config.vocab_size, (2, 37), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(input_ids=ids).logits
        got = model(ids, meta=causal_meta(tuple(ids.shape)))
    image = layout.image_code_weight_mask()
    # transformers' Chameleon sets the image codes' logits to the dtype's minimum (its text-only generation)
    assert bool((ref[..., image] == torch.finfo(ref.dtype).min).all())
    torch.testing.assert_close(got[..., ~image], ref[..., ~image], rtol=1e-5, atol=1e-5)

    # Loaded and saved again by the package, the map is written back as it was (hf_extra), not rebuilt.
    first = json.loads((tmp_path / "ck" / "config.json").read_text())["vocabulary_map"]
    WorldVLA.from_pretrained(tmp_path / "ck").save_pretrained(tmp_path / "again")
    assert json.loads((tmp_path / "again" / "config.json").read_text())["vocabulary_map"] == first


def test_the_map_names_the_ids_as_chameleons_tokenizer_does(tmp_path):
    """Image codes under their IMGIMG names at the ids the release's text_tokenizer.json gives them (here not
    in code order), the special tokens at Chameleon's ids; no two names share an id."""
    from worldvla.checkpoint import image_token_name

    for code in (0, 9, 10, 407, 8191):
        assert _code_from_bpe_name(image_token_name(code)) == code
    assert image_token_name(407) == "IMGIMGEAHZ"
    perm = torch.randperm(8192, generator=torch.Generator().manual_seed(0)).tolist()
    names = {"IMGIMG" + "".join("ABCDEFGHIJ"[int(d)] for d in str(code)) + "Z": 4 + slot
             for slot, code in enumerate(perm)}
    tok = tmp_path / "text_tokenizer.json"
    tok.write_text(json.dumps({"model": {"type": "BPE", "vocab": {"<s>": 0, **names}, "merges": []}}))
    layout = VocabLayout.chameleon(tok)
    cfg = ModelConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=4, layout=layout.to_dict())
    vm = config_to_hf(cfg)["vocabulary_map"]
    assert {k: v for k, v in vm.items() if k.startswith("IMGIMG")} == names
    assert {k: vm[k] for k in ("<s>", "<racm3:break>", "<eoss>", "<reserved08706>", "<image>", "<reserved08799>",
                               "<reserved08800>", "<reserved08808>")} == \
        {"<s>": 0, "<racm3:break>": 8197, "<eoss>": 8196, "<reserved08706>": 8710, "<image>": 8711,
         "<reserved08799>": 8803, "<reserved08800>": 8804, "<reserved08808>": layout.res_token(8)}
    assert len(set(vm.values())) == len(vm)
    # A compact vocabulary: the same names for the same roles, no "<image>" (it has no id to spare).
    compact = VocabLayout.compact(n_image_codes=64)
    vm = config_to_hf(ModelConfig.tiny(compact))["vocabulary_map"]
    assert (vm["<s>"], vm["<pad>"], vm["<racm3:break>"], vm["<eoss>"]) == (compact.bos, compact.pad, compact.boi,
                                                                            compact.eoi)
    assert "<image>" not in vm and len(set(vm.values())) == len(vm)
    assert config_to_hf(ModelConfig(vocab_size=300, hidden_size=64))["vocabulary_map"] == {}  # no layout


def test_config_names_the_layouts_own_end_of_turn_id(tmp_path):
    """config.json's eos_token_id is the separator that ends a turn: 8710 on Chameleon's vocabulary, the compact
    layout's own separator otherwise (it said 2, an id the compact layout does not use)."""
    model = WorldVLA(ModelConfig.tiny())
    model.save_pretrained(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    layout = model.config.vocab_layout()
    assert layout.vocab_size != 65536 and cfg["eos_token_id"] == layout.sep != 2
    assert cfg["bos_token_id"] == layout.bos


def test_a_tied_folder_without_a_head_loads_as_transformers_loads_it(tmp_path):
    """tie_word_embeddings: true and no lm_head.weight (a tied export): transformers' Chameleon takes the
    embedding as the head; the package refused it ("missing ['lm_head.weight']"). Now the head is a copy of the
    embedding (the same logits), and a save writes it out as an untied head that transformers reads back."""
    from safetensors.torch import load_file, save_file
    from transformers import ChameleonForConditionalGeneration

    model = WorldVLA(ModelConfig.tiny()).init_weights(generator=torch.Generator().manual_seed(0)).eval()
    f = tmp_path / "tied"
    model.save_pretrained(f)
    sd = load_file(str(f / "model.safetensors"))
    del sd["lm_head.weight"]
    save_file(sd, str(f / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((f / "config.json").read_text())
    (f / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": True}))

    ours = WorldVLA.from_pretrained(f)
    emb = ours.model.embed_tokens.weight
    assert torch.equal(ours.lm_head.weight, emb) and ours.lm_head.weight is not emb  # a copy: its own parameter
    hf = ChameleonForConditionalGeneration.from_pretrained(f).eval()
    image = model.layout.image_code_weight_mask()
    ids = torch.randint(0, model.config.vocab_size, (1, 29), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(input_ids=ids).logits
        got = ours(ids, meta=causal_meta(tuple(ids.shape)))
    torch.testing.assert_close(got[..., ~image], ref[..., ~image], rtol=1e-5, atol=1e-5)

    with torch.no_grad():
        ours.lm_head.weight.mul_(2)  # fine-tuned apart from the embedding
    ours.save_pretrained(tmp_path / "again")
    assert json.loads((tmp_path / "again" / "config.json").read_text())["tie_word_embeddings"] is False
    again = ChameleonForConditionalGeneration.from_pretrained(tmp_path / "again").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits[..., ~image],
                                   ours(ids, meta=causal_meta(tuple(ids.shape)))[..., ~image], rtol=1e-5, atol=1e-5)


def test_a_folder_with_both_a_single_file_and_shards_is_read_as_transformers_reads_it(tmp_path):
    """model.safetensors beside a shard index (a folder written by two tools): the package read the shards,
    transformers the single file, so the two loaded different weights. Both now take the single file."""
    import shutil

    from transformers import ChameleonForConditionalGeneration

    a = WorldVLA(ModelConfig.tiny()).init_weights(generator=torch.Generator().manual_seed(0))
    b = WorldVLA(ModelConfig.tiny()).init_weights(generator=torch.Generator().manual_seed(1))
    a.save_pretrained(tmp_path / "a")
    b.save_pretrained(tmp_path / "both", shard_size_gb=0.0002)
    assert (tmp_path / "both" / "model.safetensors.index.json").is_file()
    shutil.copy(tmp_path / "a" / "model.safetensors", tmp_path / "both")
    ours = WorldVLA.from_pretrained(tmp_path / "both")
    hf = ChameleonForConditionalGeneration.from_pretrained(tmp_path / "both")
    want = a.model.embed_tokens.weight
    assert torch.equal(hf.get_input_embeddings().weight, want)
    assert torch.equal(ours.model.embed_tokens.weight, want)
    assert all(torch.equal(p, q) for p, q in zip(ours.state_dict().values(), a.state_dict().values()))


def test_a_bin_of_views_of_one_flat_buffer_holds_the_weights_once_and_no_two_alias(tmp_path):
    """pytorch_model.bin whose tensors are all views of one flat buffer (an FSDP flat-parameter save): every tensor
    after the first was copied and the first kept the whole buffer alive, so the model held about twice its
    weights. Now the views that do not overlap stay views of the buffer, the only memory they hold; a view that
    overlaps another (a head stored as the embedding's memory, config.json untied) and one whose data starts off a
    16-byte boundary get copies of their own. The values are the file's, and a step on each parameter changes no
    other (aliased parameters would take two)."""
    model = WorldVLA(ModelConfig.tiny()).init_weights(generator=torch.Generator().manual_seed(0))
    model.save_pretrained(tmp_path / "ref")
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    names = [k for k in sd if k != "lm_head.weight"]
    odd = "model.norm.weight"  # placed 4 bytes past a 16-byte boundary
    flat, views = views_of_one_buffer({k: sd[k] for k in names}, off_boundary=(odd,))
    views["lm_head.weight"] = views["model.embed_tokens.weight"]  # a tied model's torch.save
    loaded = load_bin_folder(tmp_path / "flat", views, tmp_path / "ref")
    params = dict(loaded.state_dict())
    want = {**sd, "lm_head.weight": sd["model.embed_tokens.weight"]}
    assert all(torch.equal(params[k], want[k]) for k in want)
    storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in params.values()}
    copied = params["lm_head.weight"].nbytes + params[odd].nbytes
    assert sum(storages.values()) == flat.nbytes + copied  # the buffer once, and the two copies
    in_buffer = [k for k in names if k != odd]
    assert len({params[k].untyped_storage().data_ptr() for k in in_buffer}) == 1
    assert all(params[k].data_ptr() % 16 == 0 for k in params)
    spans = sorted((p.data_ptr(), p.data_ptr() + p.nbytes) for p in params.values())
    assert all(stop <= start for (_, stop), (start, _) in zip(spans, spans[1:]))  # no two overlap
    with torch.no_grad():
        for p in loaded.parameters():
            p.add_(1.0)
    assert all(torch.equal(params[k], want[k] + 1.0) for k in want)

    loaded.save_pretrained(tmp_path / "again")  # views of one buffer are saved as separate tensors
    again = WorldVLA.from_pretrained(tmp_path / "again")
    assert all(torch.equal(v, params[k]) for k, v in again.state_dict().items())


def test_a_tied_config_keeps_a_head_stored_apart_in_one_flat_buffer(tmp_path):
    """tie_word_embeddings: true with a head of its own values (transformers keeps such a head, file's values):
    a head stored beside the embedding in one flat buffer was taken for a tied save (one storage) and replaced
    by a copy of the embedding. Only a head stored as the embedding's very memory is the embedding."""
    model = WorldVLA(ModelConfig.tiny()).init_weights(generator=torch.Generator().manual_seed(0))
    model.save_pretrained(tmp_path / "ref")
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    assert not torch.equal(sd["lm_head.weight"], sd["model.embed_tokens.weight"])
    flat = torch.cat([v.reshape(-1) for v in sd.values()])
    views, n = {}, 0
    for k, v in sd.items():
        views[k] = flat[n:n + v.numel()].view(v.shape)
        n += v.numel()
    f = tmp_path / "flat"
    f.mkdir()
    torch.save(views, f / "pytorch_model.bin")
    cfg = json.loads((tmp_path / "ref" / "config.json").read_text())
    (f / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": True}))
    loaded = WorldVLA.from_pretrained(f)
    assert torch.equal(loaded.lm_head.weight, sd["lm_head.weight"])
    assert torch.equal(loaded.model.embed_tokens.weight, sd["model.embed_tokens.weight"])


def _config(folder) -> dict:
    return json.loads((folder / "config.json").read_text())


def _write_config(folder, cfg: dict) -> None:
    (folder / "config.json").write_text(json.dumps(cfg))


def test_config_keys_set_to_null_take_the_models_defaults():
    """transformers writes a field it has no value for as null: such a key reads as absent (the default),
    not as a None in the model's shape."""
    from worldvla.checkpoint import config_from_hf

    base = dict(model_type="chameleon", vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                num_attention_heads=4)
    nulls = dict(num_key_value_heads=None, max_position_embeddings=None, rms_norm_eps=None, dropout=None,
                 swin_norm=None)
    got = config_from_hf({**base, **nulls})
    assert got == config_from_hf(base)
    default = ModelConfig()
    assert (got.num_key_value_heads, got.max_position_embeddings, got.rms_norm_eps, got.dropout, got.swin_norm) == \
        (4, default.max_position_embeddings, default.rms_norm_eps, default.dropout, default.swin_norm)


def test_a_null_vocabulary_map_is_saved_as_the_layouts_map(tmp_path):
    """transformers' ChameleonConfig writes "vocabulary_map": null when given none. A folder loaded with it and
    saved again wrote the null back (kept with the config.json's other keys), and transformers' Chameleon could
    not build the model from the saved folder; the save writes the layout's map, as for a model built here."""
    from transformers import ChameleonForConditionalGeneration

    from worldvla.checkpoint import vocabulary_map

    model = WorldVLA(ModelConfig.tiny()).init_weights(generator=torch.Generator().manual_seed(0))
    model.save_pretrained(tmp_path / "ck")
    _write_config(tmp_path / "ck", {**_config(tmp_path / "ck"), "vocabulary_map": None})
    WorldVLA.from_pretrained(tmp_path / "ck").save_pretrained(tmp_path / "again")
    vm = _config(tmp_path / "again")["vocabulary_map"]
    assert vm == vocabulary_map(model.layout) and len(vm) > len(model.layout.image_code_ids)
    hf = ChameleonForConditionalGeneration.from_pretrained(tmp_path / "again")
    assert hf.model.vocabulary_mapping.bpe2img == {i: c for c, i in enumerate(model.layout.image_code_ids)}


def test_config_jsons_dtype_wins_over_an_older_torch_dtype(tmp_path):
    """A mixed-dtype folder (bfloat16 matrices, float32 norms) whose config.json holds both keys, disagreeing
    (transformers 5 writes `dtype` and may keep the 4.x `torch_dtype` it read): it loads in `dtype`, the key
    transformers 5 reads."""
    from safetensors.torch import load_file, save_file

    m = WorldVLA(ModelConfig.tiny()).init_weights(generator=torch.Generator().manual_seed(0))
    f = tmp_path / "mixed"
    m.save_pretrained(f)
    sd = load_file(str(f / "model.safetensors"))
    sd = {k: v if "norm" in k else v.to(torch.bfloat16) for k, v in sd.items()}
    save_file(sd, str(f / "model.safetensors"), metadata={"format": "pt"})
    for dtype, torch_dtype, want in (("float32", "bfloat16", torch.float32), ("bfloat16", "float32", torch.bfloat16)):
        _write_config(f, {**_config(f), "dtype": dtype, "torch_dtype": torch_dtype})
        assert {p.dtype for p in WorldVLA.from_pretrained(f).parameters()} == {want}


def test_a_shard_that_fills_the_size_limit_exactly_is_not_split(tmp_path):
    """shard_size_gb is the largest a shard may be, in GB of 10**9 bytes (transformers' "5GB"): tensors whose bytes
    add up to exactly the limit share one shard, and the next tensor starts the second."""
    model = WorldVLA(ModelConfig.tiny())
    sd = model.state_dict()
    names = list(sd)
    first = names[:3]
    limit = sum(sd[k].numel() * sd[k].element_size() for k in first)
    model.save_pretrained(tmp_path / "ck", shard_size_gb=limit / 1e9)
    index = json.loads((tmp_path / "ck" / "model.safetensors.index.json").read_text())
    in_first = sorted(k for k, f in index["weight_map"].items() if f.startswith("model-00001-of-"))
    assert in_first == sorted(first)


def test_a_save_over_a_bin_sharded_folder_leaves_none_of_its_weights(tmp_path):
    """A folder of pytorch_model-*-of-*.bin shards (transformers' older format) saved over: the older save's
    weights files are gone, the caller's own files kept."""
    old = WorldVLA(ModelConfig.tiny()).init_weights(generator=torch.Generator().manual_seed(0))
    new = WorldVLA(ModelConfig.tiny()).init_weights(generator=torch.Generator().manual_seed(1))
    f = tmp_path / "ck"
    old.save_pretrained(f)
    (f / "model.safetensors").unlink()
    sd = old.state_dict()
    names = list(sd)
    shards = {"pytorch_model-00001-of-00002.bin": names[:2], "pytorch_model-00002-of-00002.bin": names[2:]}
    for name, keys in shards.items():
        torch.save({k: sd[k] for k in keys}, f / name)
    weight_map = {k: name for name, keys in shards.items() for k in keys}
    (f / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (f / "notes.txt").write_text("mine")
    got = WorldVLA.from_pretrained(f).state_dict()
    assert all(torch.equal(v, got[k]) for k, v in sd.items())

    new.save_pretrained(f)
    assert sorted(p.name for p in f.iterdir()) == ["config.json", "model.safetensors", "notes.txt"]
    got = WorldVLA.from_pretrained(f).state_dict()
    assert all(torch.equal(v, got[k]) for k, v in new.state_dict().items())


def test_a_failed_atomic_write_leaves_the_older_file_and_no_temporary_one(tmp_path):
    """A write that fails partway (a full disk) leaves the older file as it was, and removes the temporary
    file it was writing."""
    from worldvla.checkpoint import write_atomic, write_text_atomic

    path = tmp_path / "config.json"
    write_text_atomic(path, "old")

    def fails(p):
        with open(p, "w") as fh:
            fh.write("half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        write_atomic(path, fails)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]
    assert path.read_text() == "old"


def test_an_interrupt_after_the_new_folder_took_the_name_keeps_it(tmp_path, monkeypatch):
    """Where the names cannot be exchanged in one step: an interrupt after the second rename (while the
    folder's entries are flushed) keeps the new save at the name and removes the older one set aside."""
    import worldvla.checkpoint as ck

    old = WorldVLA(ModelConfig.tiny()).init_weights(generator=torch.Generator().manual_seed(0))
    new = WorldVLA(ModelConfig.tiny()).init_weights(generator=torch.Generator().manual_seed(1))
    f = tmp_path / "ck"
    old.save_pretrained(f)
    monkeypatch.setattr(ck, "exchange_names", lambda a, b: False)
    real = ck.fsync_path

    def interrupted(p):
        if Path(p) == tmp_path:  # after both renames: the parent folder's entries are being flushed
            raise KeyboardInterrupt
        real(p)

    monkeypatch.setattr(ck, "fsync_path", interrupted)
    with pytest.raises(KeyboardInterrupt):
        new.save_pretrained(f)
    monkeypatch.setattr(ck, "fsync_path", real)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
    got = WorldVLA.from_pretrained(f).state_dict()
    assert all(torch.equal(v, got[k]) for k, v in new.state_dict().items())


def test_a_missing_folder_names_the_set_aside_folder_the_next_save_puts_back(tmp_path):
    """Two saves killed between their renames left two older folders aside. The error for the missing folder
    named the last by name (the names sort by pid), while the next save puts back the newest by time: the
    error now names that one."""
    import os

    from test_model import _dead_pid

    model = WorldVLA(ModelConfig.tiny()).init_weights(generator=torch.Generator().manual_seed(0))
    f = tmp_path / "ck"
    dead = _dead_pid()
    newer, older = tmp_path / f".ck.old-{dead}-0123456789ab", tmp_path / f".ck.old-{dead}-ba9876543210"
    for p, when in ((older, 1_000_000), (newer, 2_000_000)):
        model.save_pretrained(p)
        (p / "from.txt").write_text(p.name)
        os.utime(p, (when, when))
    with pytest.raises(FileNotFoundError, match=f"left the older folder at {newer}: rename it back"):
        WorldVLA.from_pretrained(f)
    model.save_pretrained(f)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
    assert (f / "from.txt").read_text() == newer.name


def test_a_bin_that_pickles_other_objects_is_named_as_such_not_as_damaged(tmp_path):
    """A pytorch_model.bin holding a Python object beside its tensors (argparse's Namespace of a training script)
    was refused as "damaged or cut short: export or copy the model again", which a copy does not fix. The error
    now says what the safe loader refused, and how to save the tensors alone."""
    import argparse

    model = WorldVLA(ModelConfig.tiny()).init_weights(generator=torch.Generator().manual_seed(0))
    model.save_pretrained(tmp_path / "ck")
    (tmp_path / "ck" / "model.safetensors").unlink()
    torch.save({**model.state_dict(), "args": argparse.Namespace(lr=1e-4)}, tmp_path / "ck" / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"holds Python objects besides tensors \(such as argparse.Namespace\)") as e:
        WorldVLA.from_pretrained(tmp_path / "ck")
    assert "damaged" not in str(e.value) and "torch.save(model.state_dict()" in str(e.value)
    (tmp_path / "ck" / "pytorch_model.bin").write_bytes(b"")  # a file cut short is still named as such
    with pytest.raises(ValueError, match="damaged or cut short"):
        WorldVLA.from_pretrained(tmp_path / "ck")


@pytest.mark.parametrize("size", [0, -1.0, float("nan"), float("inf"), "5", True])
def test_a_shard_size_that_is_not_a_positive_number_is_refused_before_writing(tmp_path, size):
    """shard_size_gb 0 or below put every tensor in a file of its own (a folder of hundreds of shards), NaN and
    infinity failed in int(), a string ("5") in a conversion of a billion-digit string, True was one GB."""
    model = WorldVLA(ModelConfig.tiny())
    with pytest.raises(ValueError, match=r"shard_size_gb must be a finite number > 0"):
        model.save_pretrained(tmp_path / "ck", shard_size_gb=size)
    assert not (tmp_path / "ck").exists()


@pytest.mark.parametrize("weight_map, said", [
    ({"lm_head.weight": None}, "names None as the file of lm_head.weight"),
    ({"lm_head.weight": 3}, "names 3 as the file of lm_head.weight"),
    ({}, "names no tensor"),
])
def test_a_shard_index_that_names_no_file_is_refused_naming_it(tmp_path, weight_map, said):
    """A damaged shard index whose weight_map gives a tensor no file name failed with a bare TypeError from
    sorting; one that maps nothing said "no weights found" beside the index."""
    model = WorldVLA(ModelConfig.tiny())
    f = tmp_path / "ck"
    model.save_pretrained(f, shard_size_gb=20e3 / 1e9)
    index = json.loads((f / "model.safetensors.index.json").read_text())
    mapped = {**index["weight_map"], **weight_map} if weight_map else {}
    (f / "model.safetensors.index.json").write_text(json.dumps({**index, "weight_map": mapped}))
    with pytest.raises(ValueError, match=f"model.safetensors.index.json: its weight_map {said}"):
        WorldVLA.from_pretrained(f)


def test_a_model_whose_head_is_its_embedding_saves_and_loads_with_the_same_weights(tmp_path):
    """A head tied to the embedding (one tensor under both names) failed to save with safetensors' error, which
    pointed at another library's save function. Each name is written with a copy of its own, as a load gives a
    tied folder's head one: the folder loads with the same weights, its head a parameter of its own."""
    model = WorldVLA(ModelConfig.tiny()).init_weights(generator=torch.Generator().manual_seed(0))
    model.lm_head.weight = model.model.embed_tokens.weight
    model.save_pretrained(tmp_path / "ck")
    got = WorldVLA.from_pretrained(tmp_path / "ck")
    assert all(torch.equal(v, got.state_dict()[k]) for k, v in model.state_dict().items())
    assert got.lm_head.weight.data_ptr() != got.model.embed_tokens.weight.data_ptr()
    assert _config(tmp_path / "ck")["tie_word_embeddings"] is False


@pytest.mark.parametrize("key, value, said", [
    ("num_attention_heads", 0, "num_attention_heads must be an integer >= 1, got 0"),
    ("num_hidden_layers", 2.0, "num_hidden_layers must be an integer >= 1, got 2.0"),
    ("vocab_size", 619.0, "vocab_size must be an integer >= 1, got 619.0"),
    ("max_position_embeddings", -1, "max_position_embeddings must be an integer >= 1, got -1"),
    ("rope_theta", 0, "rope_theta must be a finite number > 0, got 0.0"),
    ("rope_theta", "abc", "rope_theta must be a finite number > 0, got 'abc'"),
    ("rms_norm_eps", "1e-5", "rms_norm_eps must be a finite number > 0, got '1e-5'"),
    ("swin_norm", "false", "swin_norm must be true or false, got 'false'"),
    ("worldvla_layout", "compact", "layout must be a VocabLayout's dict"),
])
def test_a_config_json_value_no_model_has_is_refused_naming_its_key(tmp_path, key, value, said):
    """Values a config.json can hold but no model has: a zero head count failed with ZeroDivisionError, a float
    or a string deep inside torch (or, rms_norm_eps, at the first forward), a string layout with an
    AttributeError; max_position_embeddings -1 loaded and refused every forward, and rope_theta 0 loaded a model
    whose logits were all NaN. Each is refused before any weight is read, naming the key."""
    model = WorldVLA(ModelConfig.tiny()).init_weights(generator=torch.Generator().manual_seed(0))
    f = tmp_path / "ck"
    model.save_pretrained(f)
    cfg = _config(f)
    cfg.pop("rope_parameters")  # rope_theta alone names the base
    _write_config(f, {**cfg, key: value})
    with pytest.raises(ValueError, match=re.escape(f"its config.json describes no model this package builds: {said}")):
        WorldVLA.from_pretrained(f)


def test_a_model_config_takes_its_layout_as_a_vocab_layout_or_refuses_values_by_name():
    """ModelConfig(layout=VocabLayout) (the object that ModelConfig.tiny and small take) failed in validate()
    with "'VocabLayout' object has no attribute 'get'"; it is stored as its dict. rope_theta 0 built a model whose
    logits were all NaN; now refused, as a head count of 0 (a ZeroDivisionError before)."""
    layout = VocabLayout.compact(n_image_codes=64)
    cfg = ModelConfig(vocab_size=layout.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, layout=layout)
    assert cfg.layout == layout.to_dict() and WorldVLA(cfg).layout == layout
    for bad, said in ((dict(rope_theta=0.0), "rope_theta must be a finite number > 0"),
                      (dict(num_attention_heads=0), "num_attention_heads must be an integer >= 1"),
                      (dict(dropout=1.5), r"dropout must be a number in \[0, 1\)"),
                      (dict(model_parallel_size="1"), "model_parallel_size '1'")):
        with pytest.raises(ValueError, match=said):
            WorldVLA(ModelConfig.tiny(layout, **bad))
