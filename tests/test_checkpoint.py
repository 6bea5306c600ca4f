"""The hidden temporary names of atomic writes (`checkpoint.sibling_name`) and the readers that find them."""
import os
import re
from unittest import mock

import pytest
import torch

from worldvla.checkpoint import check_folder, remove_stale, sibling_files, sibling_name, write_text_atomic
from worldvla.model import ModelConfig, WorldVLA

from test_model import _dead_pid  # (pytest puts tests/ on sys.path)


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
