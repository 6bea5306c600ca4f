"""The hidden temporary names of atomic writes (`checkpoint.sibling_name`) and the readers that find them."""
import os
import re
import sys
from unittest import mock

import pytest
import torch

from worldvla.checkpoint import check_folder, remove_stale, sibling_files, sibling_name, write_text_atomic
from worldvla.model import ModelConfig, WorldVLA

from test_model import _dead_pid, load_bin_folder, views_of_one_buffer  # (pytest puts tests/ on sys.path)


def _dead_sibling(path, tag):
    """A `sibling_name(path, tag)` as a process that no longer runs named it."""
    with mock.patch("os.getpid", return_value=_dead_pid()):
        return sibling_name(path, tag)


@pytest.mark.parametrize("name", ["c" * 230, "c" * 250, "é" * 127, "d" * 200 + "é" * 27],
                         ids=["230", "250", "254-in-2-byte-chars", "mixed"])
def test_a_temporary_name_fits_the_file_systems_limit_and_is_unique_to_its_name(tmp_path, name):
    """A name of about 230 bytes or more made `.{name}.tmp-{pid}-{hex}` longer than the 255 bytes a file name may
    have, and the save failed with "File name too long" though the name itself is valid."""
    assert len(os.fsencode(name)) <= 255
    for tag in ("tmp", "old"):
        p = sibling_name(tmp_path / name, tag)
        assert len(os.fsencode(p.name)) <= 255 and p.parent == tmp_path
        assert re.fullmatch(rf"\..*\.{tag}-{os.getpid()}-[0-9a-f]{{12}}", p.name)
        p.write_text("")  # the file system takes it
        assert sibling_name(tmp_path / (name[:-1] + "x"), tag).name[:-12] != p.name[:-12]
    assert sorted(f.name for *_, f in sibling_files(tmp_path / name, "tmp")) == \
        [f.name for f in tmp_path.iterdir() if ".tmp-" in f.name]
    # a name that fits keeps the whole name, as before
    assert re.fullmatch(rf"\.ck\.tmp-{os.getpid()}-[0-9a-f]{{12}}", sibling_name(tmp_path / "ck", "tmp").name)


@pytest.mark.skipif(os.name != "posix", reason="a killed save's pid is checked on POSIX only")
def test_saves_to_a_long_name_write_it_and_remove_what_killed_saves_of_it_left(tmp_path):
    """A model folder or a file of a 250-byte name: saved (was: OSError, File name too long), and the temporary
    names killed saves of it left are removed by the next save, while those of another long name of the same start
    and a running process's are kept."""
    text, ck = tmp_path / ("t" * 250), tmp_path / ("c" * 250)
    write_text_atomic(text, "one")
    m = WorldVLA(ModelConfig.tiny()).init_weights()
    m.save_pretrained(ck)
    dead_file, live_file = _dead_sibling(text, "tmp"), sibling_name(text, "tmp")
    other_file = _dead_sibling(tmp_path / ("t" * 249 + "x"), "tmp")
    dead_dirs = [_dead_sibling(ck, "tmp"), _dead_sibling(ck, "tmp")]
    live_dir = sibling_name(ck, "tmp")
    for p in (dead_file, live_file, other_file):
        p.write_text("half")
    for p in (*dead_dirs, live_dir):
        p.mkdir()
    write_text_atomic(text, "two")
    m.save_pretrained(ck)
    assert text.read_text() == "two" and WorldVLA.from_pretrained(ck).config == m.config
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        p.name for p in (text, ck, live_file, other_file, live_dir))
    remove_stale(tmp_path, re.escape(ck.name), own=True)  # this process's too, with own
    assert not live_dir.exists()


@pytest.mark.skipif(os.name != "posix", reason="a killed save's pid is checked on POSIX only")
def test_an_older_folder_of_a_long_name_set_aside_is_named_and_put_back(tmp_path):
    """A save killed between its two renames left the older folder aside under a cut name: loading names it, and
    the next save puts it back (with the caller's files in it) before it saves."""
    old = WorldVLA(ModelConfig.tiny()).init_weights(0.02, torch.Generator().manual_seed(0))
    new = WorldVLA(ModelConfig.tiny()).init_weights(0.02, torch.Generator().manual_seed(1))
    ck = tmp_path / ("c" * 250)
    old.save_pretrained(ck)
    (ck / "text_tokenizer.json").write_text("{}")
    aside = _dead_sibling(ck, "old")
    os.rename(ck, aside)
    with pytest.raises(FileNotFoundError, match=f"left the older folder at {re.escape(str(aside))}: rename it back"):
        check_folder(ck, "model")
    new.save_pretrained(ck)
    assert sorted(p.name for p in tmp_path.iterdir()) == [ck.name]
    assert sorted(p.name for p in ck.iterdir()) == ["config.json", "model.safetensors", "text_tokenizer.json"]
    got = WorldVLA.from_pretrained(ck).state_dict()
    assert all(torch.equal(v, got[k]) for k, v in new.state_dict().items())


@pytest.mark.skipif(os.name != "posix", reason="a killed writer's pid is checked on POSIX only")
def test_demos_written_to_a_long_file_name_and_the_temporary_files_killed_writes_of_it_left(tmp_path):
    """write_demos to a 250-byte file name failed (OSError, File name too long) on its hidden temporary file. Now
    the file is written, and the temporary files that killed writes of it left are found and removed (by
    `remove_stale_temps`, and by the next write), a running writer's kept."""
    import numpy as np

    from worldvla.data.hdf5 import read_demos, remove_stale_temps, temp_name, write_demos

    path = tmp_path / ("d" * 245 + ".hdf5")
    demo = {"frames": np.full((2, 4, 4, 3), 7, np.uint8), "actions": np.arange(4.0).reshape(2, 2)}
    with mock.patch("os.getpid", return_value=os.getppid()):  # a writer that runs
        live = temp_name(path)
    left = [_dead_sibling(path, "tmp"), temp_name(path)]  # a killed writer's, and an earlier call's of this pid
    for p in (live, *left):
        p.write_bytes(b"half")
    assert sorted(remove_stale_temps(path)) == sorted(left)
    for p in left:
        p.write_bytes(b"half")
    write_demos(path, [demo], "push")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([path.name, live.name])
    (got,) = read_demos(path)
    assert np.array_equal(got.frames, demo["frames"]) and np.array_equal(got.actions, demo["actions"])


def test_a_model_saved_to_a_path_under_home_loads_from_it(tmp_path, monkeypatch):
    """save_pretrained("~/ck") wrote a folder named "~" in the working folder, while from_pretrained("~/ck") reads
    the home folder's ck: the load found nothing there, or an older save."""
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir(), cwd.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    m = WorldVLA(ModelConfig.tiny()).init_weights(0.02, torch.Generator().manual_seed(0))
    m.save_pretrained("~/ck")
    assert list(cwd.iterdir()) == [] and sorted(p.name for p in (home / "ck").iterdir()) == [
        "config.json", "model.safetensors"]
    got = WorldVLA.from_pretrained("~/ck").state_dict()
    assert all(torch.equal(v, got[k]) for k, v in m.state_dict().items())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="renameat2 is Linux's")
def test_two_folders_exchange_their_names_or_the_file_system_is_the_reason_they_do_not(tmp_path):
    """`exchange_names` swaps two existing folders (RENAME_EXCHANGE). A wrong flag (RENAME_NOREPLACE refuses an existing
    target) would make every save fall back to two renames, leaving the checkpoint's name free between them,
    while the test of the exchange skips as if the file system could not: a failure must be the file system's."""
    import ctypes
    import errno

    import worldvla.checkpoint as ck

    if ck._renameat2() is None:
        pytest.skip("no renameat2 in this C library")
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    (a / "from_a").write_text("")
    if not ck.exchange_names(a, b):
        assert ctypes.get_errno() in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP), os.strerror(ctypes.get_errno())
        assert [p.name for p in a.iterdir()] == ["from_a"] and list(b.iterdir()) == []
        pytest.skip("this file system cannot exchange names")
    assert list(a.iterdir()) == [] and [p.name for p in b.iterdir()] == ["from_a"]


def test_a_model_on_chameleons_vocabulary_ends_a_turn_with_its_separator():
    """config.json's special ids of a model built on the release's vocabulary are Chameleon's: transformers' generate
    stops at eos_token_id, which must be the separator that ends a turn (8710), not the "<image>" id beside it."""
    from worldvla.checkpoint import config_to_hf
    from worldvla.tokens import VocabLayout

    layout = VocabLayout.chameleon()
    cfg = config_to_hf(ModelConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                                   num_key_value_heads=4, layout=layout.to_dict()))
    assert (cfg["eos_token_id"], cfg["bos_token_id"]) == (8710, 0) == (layout.sep, layout.bos)
    assert cfg["vocabulary_map"]["<reserved08706>"] == cfg["eos_token_id"]


def test_a_config_json_of_the_other_kind_is_refused_as_a_wrong_file_not_a_missing_one(tmp_path):
    """A VQGAN folder given for a model (or a model folder for a VQGAN) holds the wrong config.json: a ValueError
    that names what it is and its loader, not the FileNotFoundError of a folder that lacks a file. A config.json
    with only some of VQGANConfig's keys is no folder this package wrote: left to the loader to name."""
    import json

    from worldvla.checkpoint import folder_kind

    vq, model, partial = tmp_path / "codec", tmp_path / "lm", tmp_path / "partial"  # none the name the other looks for
    for folder, cfg in ((vq, {"ch_mult": [1, 2], "n_embed": 8, "z_channels": 4}), (model, {"model_type": "chameleon"}),
                        (partial, {"n_embed": 8, "z_channels": 4})):
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="is a VQGAN folder .*not a WorldVLA model folder: load it with "
                                         "VQGAN.from_pretrained"):
        check_folder(vq, "model")
    with pytest.raises(ValueError, match="is a WorldVLA model folder .*not a VQGAN folder: load it with "
                                         "WorldVLA.from_pretrained"):
        check_folder(model, "vqgan")
    assert folder_kind(partial) is None and check_folder(partial, "model") == partial


def test_a_sharded_save_indexes_its_bytes_and_a_shard_lost_since_is_named(tmp_path):
    """The shard index of a sharded save gives the weights' total size in bytes and a shard for every tensor; a
    folder that lost one of its shards (an interrupted copy or download) is refused naming the missing file."""
    import json

    model = WorldVLA(ModelConfig.tiny()).init_weights(0.02, torch.Generator().manual_seed(0))
    f = tmp_path / "ck"
    model.save_pretrained(f, shard_size_gb=20e3 / 2 ** 30)
    index = json.loads((f / "model.safetensors.index.json").read_text())
    sd = model.state_dict()
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in sd.values())
    assert sorted(index["weight_map"]) == sorted(sd)
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and all((f / s).is_file() for s in shards)
    (f / shards[1]).unlink()
    with pytest.raises(FileNotFoundError, match=rf"shards listed in model.safetensors.index.json are missing: "
                                                rf"\['{shards[1]}'\]"):
        WorldVLA.from_pretrained(f)


def test_a_model_with_float32_norms_saves_the_dtype_of_its_matrices(tmp_path):
    """config.json's dtype of a bfloat16 model whose final norm is kept in float32 is bfloat16, its head's: the dtype
    a load in "auto" takes, which loads the folder in bfloat16 again, not all of it in float32."""
    import json

    model = WorldVLA(ModelConfig.tiny()).init_weights(0.02, torch.Generator().manual_seed(0)).to(torch.bfloat16)
    model.model.norm.float()
    model.save_pretrained(tmp_path / "ck")
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert cfg["dtype"] == cfg["torch_dtype"] == "bfloat16"
    got = WorldVLA.from_pretrained(tmp_path / "ck")
    assert {p.dtype for p in got.parameters()} == {torch.bfloat16}
    assert torch.equal(got.lm_head.weight, model.lm_head.weight)


def test_a_config_json_that_holds_no_object_is_refused_naming_the_file(tmp_path):
    """A config.json of valid JSON that is not an object (a list, a number) is refused as the model config it is
    not, naming the file, not with an AttributeError from inside the config reader."""
    f = tmp_path / "ck"
    WorldVLA(ModelConfig.tiny()).save_pretrained(f)
    (f / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"config.json: not a valid model config \(a JSON list, not an object\)"):
        WorldVLA.from_pretrained(f)


def test_an_atomic_write_through_a_symbolic_link_updates_its_target_and_keeps_the_link(tmp_path):
    """A results file the user linked elsewhere (`metrics.json -> /shared/run7.json`) is written through the link:
    the target gets the new text, the link stays a link and no temporary file is left in either folder."""
    (tmp_path / "shared").mkdir()
    (tmp_path / "run").mkdir()
    target = tmp_path / "shared" / "run7.json"
    target.write_text("old")
    link = tmp_path / "run" / "metrics.json"
    link.symlink_to(target)
    write_text_atomic(link, "new")
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert target.read_text() == "new"
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["metrics.json", "run", "run7.json", "shared"]


def _tiny_hf_config():
    from worldvla.checkpoint import config_to_hf

    return config_to_hf(ModelConfig.tiny())


def test_rope_parameters_without_a_base_or_a_type_take_rope_theta_and_plain_rope():
    """transformers 5 writes `rope_parameters` beside 4.x's `rope_theta`; one that gives no base of its own (or no
    rope_type, which means "default") is no second, conflicting base: the folder loads with rope_theta's."""
    from worldvla.checkpoint import config_from_hf

    d = {**_tiny_hf_config(), "rope_theta": 5e5}
    for params in ({"rope_type": "default"}, {}, {"rope_theta": 5e5}):
        assert config_from_hf({**d, "rope_parameters": params}).rope_theta == 5e5
    del d["rope_theta"]
    assert config_from_hf({**d, "rope_parameters": {"rope_theta": 2e4}}).rope_theta == 2e4
    with pytest.raises(ValueError, match="two RoPE bases"):
        config_from_hf({**d, "rope_theta": 5e5, "rope_parameters": {"rope_theta": 2e4}})


def test_a_rope_theta_of_true_is_refused_naming_the_key_not_read_as_one(tmp_path):
    """JSON's `true` is no RoPE base: read as the number 1.0 it would build a model of another base without a word;
    the load names rope_theta and the value."""
    import json

    f = tmp_path / "ck"
    WorldVLA(ModelConfig.tiny()).save_pretrained(f)
    cfg = json.loads((f / "config.json").read_text())
    cfg.pop("rope_parameters")
    cfg["rope_theta"] = True
    (f / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"rope_theta must be a finite number > 0, got True"):
        WorldVLA.from_pretrained(f)


@pytest.mark.skipif(os.name != "posix", reason="symbolic links")
def test_a_save_keeps_a_dangling_link_of_the_callers_in_the_folder(tmp_path):
    """A caller's symbolic link in a model folder whose target is gone (a tokenizer on an unmounted disk) is carried
    into the new save as a link; flushing the new folder to the disk skips links, so the save does not fail on it."""
    f = tmp_path / "ck"
    m = WorldVLA(ModelConfig.tiny()).init_weights(0.02, torch.Generator().manual_seed(0))
    m.save_pretrained(f)
    (f / "tokenizer.json").symlink_to(tmp_path / "gone" / "tokenizer.json")
    m.save_pretrained(f)
    assert os.readlink(f / "tokenizer.json") == str(tmp_path / "gone" / "tokenizer.json")
    assert sorted(p.name for p in f.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_a_name_whose_temporary_name_fits_exactly_is_kept_whole(tmp_path):
    """The temporary name `.{name}.tmp-{pid}-{hex}` of exactly 255 bytes fits: the name is kept whole, and only one
    byte more cuts it to a hash."""
    rest = len(f".tmp-{os.getpid()}-") + 12
    name = "n" * (255 - 1 - rest)
    p = sibling_name(tmp_path / name, "tmp")
    assert len(os.fsencode(p.name)) == 255 and p.name.startswith(f".{name}.tmp-")
    cut = sibling_name(tmp_path / (name + "n"), "tmp")
    assert len(os.fsencode(cut.name)) <= 255 and "~" in cut.name and not cut.name.startswith(f".{name}n.tmp-")


@pytest.mark.skipif(os.name != "posix", reason="a killed save's pid is checked on POSIX only")
def test_a_folder_named_with_a_pid_no_process_can_have_is_removed(tmp_path):
    """A `.ck.tmp-<pid>-*` folder whose pid is past any the system gives (too large for a signal) belongs to no
    running process: it is removed as a killed save's, not kept for ever."""
    huge = tmp_path / f".ck.tmp-{2 ** 70}-0123456789ab"
    huge.mkdir()
    (huge / "model.safetensors").write_bytes(b"half")
    remove_stale(tmp_path, re.escape("ck"), ("tmp", "old"), restore="old")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(os.name != "posix", reason="symbolic links; a killed save's pid is checked on POSIX only")
def test_a_link_named_as_a_set_aside_folder_is_not_taken_for_one(tmp_path):
    """A symbolic link that happens to bear a killed save's hidden name (to a folder, or a file) is no folder or file
    a save left: it is neither renamed to the checkpoint's name nor removed."""
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "f").write_text("kept")
    link = _dead_sibling(tmp_path / "ck", "old")
    link.symlink_to(target)
    remove_stale(tmp_path, re.escape("ck"), ("tmp", "old"), restore="old")
    assert not (tmp_path / "ck").exists() and link.is_symlink() and (target / "f").read_text() == "kept"
    with pytest.raises(FileNotFoundError, match="no such folder") as err:
        check_folder(tmp_path / "ck", "model")
    assert "older folder" not in str(err.value)
    file_link = _dead_sibling(tmp_path / "notes.txt", "tmp")
    file_link.symlink_to(target / "f")
    write_text_atomic(tmp_path / "notes.txt", "new")
    assert file_link.is_symlink() and (tmp_path / "notes.txt").read_text() == "new"


def test_a_save_to_a_path_that_is_a_file_is_refused_and_leaves_the_file(tmp_path):
    """A model saved to the name of a file is refused naming it, before anything is written: the file stays as it
    was and no temporary folder is left beside it."""
    f = tmp_path / "ck"
    f.write_text("notes")
    with pytest.raises(NotADirectoryError, match=rf"{re.escape(str(f))} is a file, not a folder"):
        WorldVLA(ModelConfig.tiny()).save_pretrained(f)
    assert f.read_text() == "notes" and [p.name for p in tmp_path.iterdir()] == ["ck"]


@pytest.mark.skipif(os.name != "posix", reason="a killed save's pid is checked on POSIX only")
def test_a_missing_folder_names_the_newest_of_two_set_aside_folders(tmp_path):
    """Two saves killed between their renames left two older folders aside: the error of the missing folder names the
    newer (by time, not by name), the one the next save puts back."""
    ck = tmp_path / "ck"
    asides = [_dead_sibling(ck, "old") for _ in range(2)]
    for p in asides:
        p.mkdir()
    newest = max(asides, key=lambda p: p.name)  # the later name, made the older by time
    for p, when in ((newest, 1_000_000), (min(asides, key=lambda p: p.name), 2_000_000)):
        os.utime(p, (when, when))
    other = min(asides, key=lambda p: p.name)
    with pytest.raises(FileNotFoundError, match=f"left the older folder at {re.escape(str(other))}: rename it back"):
        check_folder(ck, "model")


def test_linking_a_model_folder_says_when_it_copied_instead(tmp_path, monkeypatch):
    """Where the file system makes no hard links (another disk), the files are copied and the call says so (False),
    so that a caller that counted on shared disk space can tell; the copy loads the same weights."""
    from worldvla.checkpoint import link_model_files

    model = WorldVLA(ModelConfig.tiny()).init_weights(0.02, torch.Generator().manual_seed(0))
    model.save_pretrained(tmp_path / "src")
    assert link_model_files(tmp_path / "src", tmp_path / "linked")
    assert (tmp_path / "linked" / "model.safetensors").stat().st_nlink == 2

    def no_links(src, dst):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", no_links)
    assert link_model_files(tmp_path / "src", tmp_path / "copied") is False
    assert (tmp_path / "copied" / "model.safetensors").stat().st_nlink == 1
    got = WorldVLA.from_pretrained(tmp_path / "copied").state_dict()
    assert all(torch.equal(v, got[k]) for k, v in model.state_dict().items())


@pytest.mark.skipif(os.name != "posix", reason="a killed save's pid is checked on POSIX only")
def test_a_missing_policy_folder_gets_one_hint_the_set_aside_folder_where_there_is_one(tmp_path):
    """A missing policy folder is told where `worldvla train` and `worldvla demo` write one; where a killed save set
    the older folder aside, the error names that folder alone, not both."""
    with pytest.raises(FileNotFoundError, match=r"no such folder \(expected a policy folder\); `worldvla train` "
                                                r"writes one to <its --out>/policy"):
        check_folder(tmp_path / "policy", "policy")
    aside = _dead_sibling(tmp_path / "policy", "old")
    aside.mkdir()
    with pytest.raises(FileNotFoundError) as err:
        check_folder(tmp_path / "policy", "policy")
    assert str(err.value).endswith(f"left the older folder at {aside}: rename it back to policy (the next save to "
                                   f"{tmp_path / 'policy'} does so)")
    assert "worldvla train" not in str(err.value)


def test_only_a_model_folder_given_for_a_policy_is_told_to_write_a_policy_around_it(tmp_path):
    """save_policy writes a policy folder around a model, not around a VQGAN: a VQGAN folder given for a policy is
    told its own loader only."""
    import json

    vq, lm = tmp_path / "codec", tmp_path / "lm"
    vq.mkdir()
    (vq / "config.json").write_text(json.dumps({"ch_mult": [1, 2], "n_embed": 8, "z_channels": 4}))
    WorldVLA(ModelConfig.tiny()).save_pretrained(lm)
    with pytest.raises(FileNotFoundError) as err:
        check_folder(vq, "policy")
    assert str(err.value).endswith("not a policy folder: load it with VQGAN.from_pretrained")
    with pytest.raises(FileNotFoundError) as err:
        check_folder(lm, "policy")
    assert str(err.value).endswith("not a policy folder: load it with WorldVLA.from_pretrained (or write a policy "
                                   "folder around it with worldvla.inference.save_policy)")



def test_a_view_eight_bytes_off_a_16_byte_boundary_loads_as_an_aligned_copy(tmp_path):
    """A view of a flat buffer (an FSDP save's pytorch_model.bin) that starts 8 bytes past a 16-byte boundary is
    loaded as a copy of its own, on a 16-byte boundary (the kernels' vector loads); the aligned views stay views."""
    m = WorldVLA(ModelConfig.tiny()).init_weights(0.02, torch.Generator().manual_seed(0))
    m.save_pretrained(tmp_path / "ref")
    sd = {k: v.detach().clone() for k, v in m.state_dict().items()}
    off = "model.norm.weight"
    _, views = views_of_one_buffer(sd, off_boundary=(off,), off_by=2)  # float32: 2 elements are 8 bytes
    assert views[off].data_ptr() % 16 == 8
    params = load_bin_folder(tmp_path / "bin", views, tmp_path / "ref").state_dict()
    assert all(torch.equal(params[k], v) for k, v in sd.items())
    assert params[off].data_ptr() % 16 == 0
    assert params[off].untyped_storage().data_ptr() != params["lm_head.weight"].untyped_storage().data_ptr()
    assert params["model.embed_tokens.weight"].untyped_storage().data_ptr() == \
        params["lm_head.weight"].untyped_storage().data_ptr()


def test_a_policy_folder_given_for_a_model_names_its_model_and_the_policys_own_loader(tmp_path):
    """A policy folder given where a model folder is wanted: the error names the model folder inside it and the
    loader of what was given (the policy's), not the model's."""
    import json

    pol = tmp_path / "pol"
    WorldVLA(ModelConfig.tiny()).save_pretrained(pol / "model")
    (pol / "policy.json").write_text(json.dumps({}))
    with pytest.raises(FileNotFoundError) as err:
        check_folder(pol, "model")
    assert str(err.value) == (f"{pol} is a policy folder (policy.json, model/, vqgan/), not a WorldVLA model folder: "
                              f"give {pol / 'model'}, or load this folder with WorldVLAPolicy.from_pretrained")


def test_a_tensor_in_two_shards_names_both_files_in_reading_order_and_the_indexs_choice(tmp_path):
    """A sharded folder that mixes two saves (a stale shard the index now names for one tensor, that tensor still in
    the newer shard too) is refused naming the tensor, the file read first, then the one that repeats it, and the
    file the index names for it."""
    import json

    from safetensors.torch import load_file, save_file

    folder = tmp_path / "ck"
    WorldVLA(ModelConfig.tiny()).save_pretrained(folder, shard_size_gb=1e-4)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = {f: load_file(str(folder / f)) for f in sorted(set(index["weight_map"].values()))}
    last, shard = next((f, s) for f, s in shards.items() if len(s) > 1)  # stays listed for its other tensors
    k = sorted(shard)[0]
    save_file({k: shard[k]}, str(folder / "a-stale.safetensors"))
    index["weight_map"][k] = "a-stale.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError) as err:
        WorldVLA.from_pretrained(folder)
    assert (f"tensors in more than one shard (1), e.g. {k} in both a-stale.safetensors and {last} (the shard index "
            f"names a-stale.safetensors): the folder mixes two saves") in str(err.value)


def test_a_folder_of_one_dtype_keeps_it_whatever_its_config_json_says(tmp_path):
    """config.json's dtype picks the dtype only of a folder whose tensors hold several: float32 weights under a
    config.json that says bfloat16 (edited by hand, or another exporter's default) load as float32, unrounded."""
    import json

    model = WorldVLA(ModelConfig.tiny()).init_weights(0.02, torch.Generator().manual_seed(0))
    model.save_pretrained(tmp_path / "ck")
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert cfg["dtype"] == "float32"
    cfg["dtype"] = cfg["torch_dtype"] = "bfloat16"
    (tmp_path / "ck" / "config.json").write_text(json.dumps(cfg))
    got = WorldVLA.from_pretrained(tmp_path / "ck").state_dict()
    assert {v.dtype for v in got.values()} == {torch.float32}
    assert all(torch.equal(v, got[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("given", [None, "auto"])
def test_a_folder_of_several_dtypes_without_a_config_dtype_takes_the_heads(tmp_path, given):
    """A folder whose tensors hold several dtypes, with no dtype in config.json (or "auto"), loads in its output
    head's dtype, as transformers' dtype="auto" does: a float32 head beside a bfloat16 embedding loads float32."""
    import json

    from safetensors.torch import save_file

    model = WorldVLA(ModelConfig.tiny()).init_weights(0.02, torch.Generator().manual_seed(0))
    model.save_pretrained(tmp_path / "ck")
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    sd["model.embed_tokens.weight"] = sd["model.embed_tokens.weight"].bfloat16()
    save_file(sd, str(tmp_path / "ck" / "model.safetensors"))
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    for key in ("dtype", "torch_dtype"):
        cfg.pop(key)
        if given is not None:
            cfg[key] = given
    (tmp_path / "ck" / "config.json").write_text(json.dumps(cfg))
    got = WorldVLA.from_pretrained(tmp_path / "ck").state_dict()
    assert {v.dtype for v in got.values()} == {torch.float32}
    assert torch.equal(got["model.embed_tokens.weight"], sd["model.embed_tokens.weight"].float())
    assert torch.equal(got["lm_head.weight"], sd["lm_head.weight"])


def test_a_policys_model_folder_given_for_the_policy_names_the_policy_around_it(tmp_path):
    """The model folder inside a policy folder, given where the policy is wanted: the error names the policy folder
    around it, and the model's own loader."""
    import json

    pol = tmp_path / "pol"
    WorldVLA(ModelConfig.tiny()).save_pretrained(pol / "model")
    (pol / "policy.json").write_text(json.dumps({}))
    with pytest.raises(FileNotFoundError) as err:
        check_folder(pol / "model", "policy")
    assert str(err.value).endswith(f"not a policy folder: give {pol}, or load this folder with "
                                   f"WorldVLA.from_pretrained (or write a policy folder around it with "
                                   f"worldvla.inference.save_policy)")


def test_a_sharded_safetensors_index_is_read_before_a_pytorch_model_bin_beside_it(tmp_path):
    """transformers' order: a folder with sharded safetensors and their index, and a stale pytorch_model.bin of
    other weights beside them, loads the safetensors shards."""
    new = WorldVLA(ModelConfig.tiny()).init_weights(0.02, torch.Generator().manual_seed(0))
    old = WorldVLA(ModelConfig.tiny()).init_weights(0.02, torch.Generator().manual_seed(1))
    new.save_pretrained(tmp_path / "ck", shard_size_gb=1e-4)
    assert not (tmp_path / "ck" / "model.safetensors").exists()
    torch.save(old.state_dict(), tmp_path / "ck" / "pytorch_model.bin")
    got = WorldVLA.from_pretrained(tmp_path / "ck").state_dict()
    assert all(torch.equal(v, got[k]) for k, v in new.state_dict().items())


@pytest.mark.parametrize("prefix", ["vqmodel.", "model.vqmodel."])
def test_the_releases_vqmodel_tensors_are_left_out_of_the_model(tmp_path, prefix):
    """The release's checkpoints hold the VQGAN's tensors beside the model's, as vqmodel.* (or model.vqmodel.*):
    a load leaves them out, not refused as tensors of no module."""
    from safetensors.torch import save_file

    model = WorldVLA(ModelConfig.tiny()).init_weights(0.02, torch.Generator().manual_seed(0))
    model.save_pretrained(tmp_path / "ck")
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    save_file({**sd, prefix + "quantize.embedding.weight": torch.randn(16, 8)},
              str(tmp_path / "ck" / "model.safetensors"))
    got = WorldVLA.from_pretrained(tmp_path / "ck").state_dict()
    assert sorted(got) == sorted(sd) and all(torch.equal(v, got[k]) for k, v in sd.items())
