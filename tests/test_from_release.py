"""`worldvla import-release`: a policy folder from the release's model folder and tokenizer folder."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from worldvla import ModelConfig, VocabLayout, WorldVLA
from worldvla.cli import main
from worldvla.inference.from_release import import_release, infer_from_path
from worldvla.tokens.actions import LIBERO_MAX, LIBERO_MIN
from worldvla.vqgan import VQGAN, VQGANConfig


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """The release's layout in miniature: ckpts/model_256/libero_{goal,10} (a tiny model on the Chameleon
    vocabulary, saved in the Hugging Face Chameleon format) and ckpts/chameleon/tokenizer."""
    from test_store import _release_text_tokenizer
    from test_vqgan import _write_release

    root = tmp_path_factory.mktemp("ckpts")
    model = WorldVLA(ModelConfig.tiny(VocabLayout.chameleon())).init_weights(generator=torch.Generator().manual_seed(0))
    for suite in ("libero_goal", "libero_10"):
        model.save_pretrained(root / "model_256" / suite)
    model.save_pretrained(root / "elsewhere")
    tok = root / "chameleon" / "tokenizer"
    tok.mkdir(parents=True)
    torch.manual_seed(0)
    vq = VQGAN(VQGANConfig(ch=32, ch_mult=(1, 1, 1, 1, 1), num_res_blocks=1, z_channels=32, embed_dim=32,
                           n_embed=64)).eval()
    _write_release(tok, vq, dict(vq.state_dict()))
    _release_text_tokenizer(tok / "text_tokenizer.json")
    return root


@pytest.mark.parametrize("path, want", [
    ("ckpts/model_256/libero_goal", {"suite": "goal", "chunk_size": 5, "image_size": 256}),
    ("ckpts/model_512/libero_10", {"suite": "10", "chunk_size": 10, "image_size": 512}),
    ("hub/WorldVLA-ActionModel-LIBERO-Spatial-512", {"suite": "spatial", "chunk_size": 5, "image_size": 512}),
    ("hub/WorldVLA-ActionModel-LIBERO-10-256", {"suite": "10", "chunk_size": 10, "image_size": 256}),
    ("runs/my_model", {}),
    ("runs/model_2560/libero_100", {}),
    ("hub/WorldVLA-ActionModel-LIBERO-Goal-2560", {}),  # no frame size the release publishes
])
def test_the_path_names_the_suite_and_size_as_the_release_publishes_them(path, want, tmp_path):
    assert infer_from_path(tmp_path / path) == want


def test_an_imported_policy_acts_with_the_releases_settings(release, tmp_path, capsys):
    """The policy takes the release's fixed LIBERO bounds, its chunk size per suite, the size of the folder it was
    published in and two frames of history; it acts with chunks of that size inside those bounds."""
    from worldvla.inference import WorldVLAPolicy

    out = tmp_path / "goal"
    assert main(["import-release", str(release / "model_256" / "libero_goal"), "--tokenizer",
                 str(release / "chameleon" / "tokenizer"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "5 actions a chunk (from the path" in printed and "256 px frames (from the path" in printed
    assert f"worldvla eval-libero --policy {out} --suite libero_goal" in printed
    policy = WorldVLAPolicy.from_pretrained(out, device="cpu")
    assert (policy.chunk_size, policy.image_size, policy.history) == (5, 256, 2)
    np.testing.assert_allclose(policy.action_tokenizer.low, LIBERO_MIN)
    np.testing.assert_allclose(policy.action_tokenizer.high, LIBERO_MAX)
    assert policy.metadata()["extra"]["source"] == "release" and policy.metadata()["extra"]["suite"] == "goal"
    policy.reset("push the plate")
    frame = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    actions = policy.act(frame, history=frame)
    assert actions.shape == (5, 7)
    assert (actions >= np.asarray(LIBERO_MIN) - 1e-6).all() and (actions <= np.asarray(LIBERO_MAX) + 1e-6).all()
    # LIBERO-10 runs chunks of 10; options win over the path
    info = import_release(release / "model_256" / "libero_10", release / "chameleon" / "tokenizer", tmp_path / "ten")
    assert (info["chunk_size"], info["suite"]) == (10, "10")
    info = import_release(release / "model_256" / "libero_10", release / "chameleon" / "tokenizer", tmp_path / "x",
                          chunk_size=3, image_size=128)
    assert (info["chunk_size"], info["image_size"], info["sources"]["chunk_size"]) == (3, 128, "--chunk-size")


def test_a_path_that_names_no_suite_asks_for_the_sizes_by_option(release, tmp_path, capsys):
    tok = str(release / "chameleon" / "tokenizer")
    argv = ["import-release", str(release / "elsewhere"), "--tokenizer", tok, "--out", str(tmp_path / "p")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "its path names no LIBERO suite and size, so give --chunk-size" in err and "10 for LIBERO-10" in err
    assert main([*argv, "--chunk-size", "5"]) == 2
    assert "give --image-size (frame size in pixels: 256 or 512" in capsys.readouterr().err
    assert main([*argv, "--chunk-size", "5", "--image-size", "256"]) == 0
    printed = capsys.readouterr().out  # no suite to name: eval-libero is told none
    assert f"worldvla eval-libero --policy {tmp_path / 'p'}   or   worldvla serve" in printed
    assert not (tmp_path / "q").exists()


def test_missing_or_wrong_folders_are_named_before_any_weight_is_read(release, tmp_path, capsys):
    model = str(release / "model_256" / "libero_goal")
    assert main(["import-release", model, "--tokenizer", str(tmp_path / "nope"), "--out", str(tmp_path / "p")]) == 2
    assert "nope: no such folder (expected the release's tokenizer folder, chameleon/tokenizer" in \
        capsys.readouterr().err
    assert main(["import-release", str(release / "chameleon" / "tokenizer"), "--tokenizer", model, "--out",
                 str(tmp_path / "p")]) == 2
    assert "expected a WorldVLA model folder" in capsys.readouterr().err
    assert main(["import-release", model, "--tokenizer", str(release / "model_256"), "--out", str(tmp_path / "p")]) == 2
    assert "tokenizer files missing: ['vqgan.yaml', 'vqgan.ckpt', 'text_tokenizer.json']" in capsys.readouterr().err
    assert main(["import-release", model, "--tokenizer", str(release / "chameleon" / "tokenizer"), "--out",
                 str(tmp_path / "p"), "--dtype", "float64x"]) == 2
    assert "float64x" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()


def test_a_relative_path_is_read_as_the_folder_it_names(tmp_path, monkeypatch):
    """`worldvla import-release .` from inside ckpts/model_256/libero_goal: the path's words are those of the folder
    it resolves to, not of the `.` typed."""
    here = tmp_path / "ckpts" / "model_256" / "libero_goal"
    here.mkdir(parents=True)
    monkeypatch.chdir(here)
    assert infer_from_path(".") == {"suite": "goal", "chunk_size": 5, "image_size": 256}
    assert infer_from_path("../libero_10") == {"suite": "10", "chunk_size": 10, "image_size": 256}


def test_the_weights_are_stored_in_the_dtype_asked_for(release, tmp_path):
    """--dtype bfloat16 halves the policy folder: its weights are stored (and loaded) as bfloat16."""
    from worldvla.inference import WorldVLAPolicy

    out = tmp_path / "bf16"
    assert main(["import-release", str(release / "model_256" / "libero_goal"), "--tokenizer",
                 str(release / "chameleon" / "tokenizer"), "--out", str(out), "--dtype", "bfloat16"]) == 0
    assert {p.dtype for p in WorldVLA.from_pretrained(out / "model").parameters()} == {torch.bfloat16}
    assert WorldVLAPolicy.from_pretrained(out, device="cpu").metadata()["model"]["dtype"] == "bfloat16"


def test_a_bad_dtype_is_refused_before_the_tokenizer_or_the_model_is_read(release, tmp_path, monkeypatch, capsys):
    """A typo in --dtype is named at once, not after the release's VQGAN and a 7B model were read."""
    from worldvla import checkpoint

    def never(*a, **k):
        raise AssertionError("the tokenizer folder was read before --dtype was checked")

    monkeypatch.setattr(checkpoint, "load_release_tokenizer", never)
    monkeypatch.setattr(WorldVLA, "from_pretrained", never)
    assert main(["import-release", str(release / "model_256" / "libero_goal"), "--tokenizer",
                 str(release / "chameleon" / "tokenizer"), "--out", str(tmp_path / "p"), "--dtype", "float64x"]) == 2
    err = capsys.readouterr().err
    assert "float64x" in err and "AssertionError" not in err


def test_a_model_of_another_vocabulary_is_refused(tmp_path, release, capsys):
    """A model trained here on the compact vocabulary, filed like a release model, is not taken for one: its ids are
    not the release tokenizer's."""
    model = tmp_path / "model_256" / "libero_goal"
    WorldVLA(ModelConfig.tiny(VocabLayout.compact(n_image_codes=64))).save_pretrained(model)
    assert main(["import-release", str(model), "--tokenizer", str(release / "chameleon" / "tokenizer"), "--out",
                 str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err
    assert "a model of 619 ids, not the release's Chameleon vocabulary of 65536" in err
    assert not (tmp_path / "p").exists()


def test_a_vqgan_checkpoint_holding_objects_needs_trust_checkpoint(release, tmp_path, capsys):
    """A vqgan.ckpt that pickles trainer state besides its tensors is refused by the safe loader: the command said so
    with a traceback naming the Python keyword trust_checkpoint=True; it names the file and --trust-checkpoint, and
    with that option the policy is written."""
    import shutil

    from test_vqgan import Opaque

    tok = tmp_path / "tokenizer"
    shutil.copytree(release / "chameleon" / "tokenizer", tok)
    ckpt = torch.load(tok / "vqgan.ckpt", weights_only=True)
    torch.save({**ckpt, "callbacks": Opaque()}, tok / "vqgan.ckpt")
    argv = ["import-release", str(release / "model_256" / "libero_goal"), "--tokenizer", str(tok), "--out",
            str(tmp_path / "p")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"{tok / 'vqgan.ckpt'} holds Python objects besides tensors" in err and "--trust-checkpoint" in err
    assert "Traceback" not in err and not (tmp_path / "p").exists()
    assert main([*argv, "--trust-checkpoint"]) == 0
    assert (tmp_path / "p" / "policy.json").is_file()


def test_the_releases_weight_files_are_linked_not_written_again(release, tmp_path, monkeypatch, capsys):
    """Without --dtype the policy's model is the release's files as they are: hard links (a 7B model's 14 GB not
    written again), or copies where the file system has no links; a sharded folder brings every shard and its
    index. The policy loads the same weights either way; --dtype writes them anew."""
    import os

    import worldvla.checkpoint as ckpt

    tok = release / "chameleon" / "tokenizer"
    src = release / "model_256" / "libero_spatial"  # 256 px: two 512 px frames overflow the tiny model's positions
    want = WorldVLA.from_pretrained(release / "model_256" / "libero_goal")
    want.save_pretrained(src, shard_size_gb=0.05 / 1024)  # about 50 kB a shard
    names = sorted(p.name for p in src.iterdir())
    assert "model.safetensors.index.json" in names and len(names) > 3

    def check(out, how):
        got = sorted(p.name for p in (out / "model").iterdir())
        assert got == names
        for name in names:
            assert os.path.samefile(src / name, out / "model" / name) == (how == "linked"), name
            assert (src / name).read_bytes() == (out / "model" / name).read_bytes()
        model = WorldVLA.from_pretrained(out / "model")
        sd = model.state_dict()
        assert all(torch.equal(sd[k], v) for k, v in want.state_dict().items())

    assert main(["import-release", str(src), "--tokenizer", str(tok), "--out", str(tmp_path / "linked")]) == 0
    assert "the release's weight files hard-linked" in capsys.readouterr().out
    check(tmp_path / "linked", "linked")

    def no_links(a, b):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(ckpt.os, "link", no_links)
    assert import_release(src, tok, tmp_path / "copied")["weights"] == "copied"
    check(tmp_path / "copied", "copied")
    monkeypatch.undo()

    info = import_release(src, tok, tmp_path / "bf16", dtype="bfloat16")
    assert info["weights"] == "saved"
    assert not any(os.path.samefile(src / n, p) for n in names for p in (tmp_path / "bf16" / "model").iterdir())


def test_the_command_says_how_the_weights_were_written(release, tmp_path, monkeypatch, capsys):
    """The closing line says what the policy's model is: the release's files copied where they could not be
    linked, or the weights written anew in the --dtype asked for (not "hard-linked" in either case)."""
    import worldvla.checkpoint as ckpt

    src, tok = release / "model_256" / "libero_goal", release / "chameleon" / "tokenizer"
    assert main(["import-release", str(src), "--tokenizer", str(tok), "--out", str(tmp_path / "bf16"),
                 "--dtype", "bfloat16"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].endswith("two frames of history, the weights in bfloat16"), out

    def no_links(a, b):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(ckpt.os, "link", no_links)
    assert main(["import-release", str(src), "--tokenizer", str(tok), "--out", str(tmp_path / "copied")]) == 0
    out = capsys.readouterr().out
    assert "the release's weight files copied (no hard links across file systems)" in out and "hard-linked" not in out


@pytest.mark.parametrize("option, value", [("--chunk-size", "0"), ("--chunk-size", "-5"), ("--image-size", "0"),
                                           ("--image-size", "-256")])
def test_sizes_that_are_not_positive_are_refused_by_the_option(release, tmp_path, capsys, option, value):
    """`--chunk-size 0` or a negative frame size is named by its option before anything is read or written."""
    with pytest.raises(SystemExit) as e:
        main(["import-release", str(release / "model_256" / "libero_goal"), "--tokenizer",
              str(release / "chameleon" / "tokenizer"), "--out", str(tmp_path / "p"), option, value])
    assert e.value.code == 2
    assert f"argument {option}: " in capsys.readouterr().err and not (tmp_path / "p").exists()


def test_a_model_of_another_vocabulary_that_states_no_layout_is_refused(tmp_path, release, capsys):
    """A Chameleon folder of another vocabulary size that states no layout of ids (a model published elsewhere, filed
    like a release model) is refused as one of another vocabulary, not written as a policy."""
    model = tmp_path / "model_256" / "libero_goal"
    WorldVLA(dataclasses.replace(ModelConfig.tiny(), vocab_size=1000, layout=None)).save_pretrained(model)
    assert main(["import-release", str(model), "--tokenizer", str(release / "chameleon" / "tokenizer"), "--out",
                 str(tmp_path / "p")]) == 2
    assert "a model of 1000 ids, not the release's Chameleon vocabulary of 65536" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()


def test_the_policy_records_its_sources_by_absolute_paths(release, tmp_path, monkeypatch):
    """Folders given relative to the working directory are recorded as the folders they name: the policy is served
    and evaluated from other directories, where a relative path would name nothing."""
    from worldvla.inference import WorldVLAPolicy

    monkeypatch.chdir(release)
    import_release("model_256/libero_goal", "chameleon/tokenizer", tmp_path / "p")
    monkeypatch.chdir(tmp_path)
    extra = WorldVLAPolicy.from_pretrained(tmp_path / "p", device="cpu").metadata()["extra"]
    assert extra["model"] == str((release / "model_256" / "libero_goal").resolve())
    assert extra["tokenizer"] == str((release / "chameleon" / "tokenizer").resolve())


def test_a_path_that_names_the_suite_but_no_size_still_gives_the_chunk_size(release, tmp_path):
    """A release model copied to `runs/libero_10` names its suite but no frame size: the chunk size comes from the
    suite, and only --image-size is asked for."""
    assert infer_from_path(tmp_path / "runs" / "libero_10") == {"suite": "10", "chunk_size": 10}
    assert infer_from_path(tmp_path / "model_512" / "mine") == {"image_size": 512}
    model = tmp_path / "runs" / "libero_10"
    WorldVLA.from_pretrained(release / "model_256" / "libero_10").save_pretrained(model)
    info = import_release(model, release / "chameleon" / "tokenizer", tmp_path / "p", image_size=256)
    assert (info["chunk_size"], info["image_size"], info["suite"]) == (10, 256, "10")
    assert info["sources"] == {"chunk_size": f"the path ({model})", "image_size": "--image-size"}


def test_an_out_folder_under_the_home_folder_is_checked_where_it_is_written(release, tmp_path, monkeypatch):
    """A Python caller's `~/...` out names the home folder where the policy is written: the check that it is not
    the release's folder looks there too (it looked at ./~/..., let it through, and the release's model folder was
    replaced by the policy)."""
    import shutil

    home = tmp_path / "home"
    shutil.copytree(release / "model_256" / "libero_goal", home / "model_256" / "libero_goal")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=f"would replace {home / 'model_256'}"):
        import_release("~/model_256/libero_goal", release / "chameleon" / "tokenizer", "~/model_256")
    assert (home / "model_256" / "libero_goal" / "config.json").is_file() and not (tmp_path / "~").exists()
    info = import_release(home / "model_256" / "libero_goal", release / "chameleon" / "tokenizer", "~/p")
    assert info["path"] == str(home / "p") and (home / "p" / "policy.json").is_file()


@pytest.mark.parametrize("out", ["model_256/libero_goal", "model_256", ".", "chameleon/tokenizer", "chameleon"])
def test_an_out_folder_that_is_or_holds_a_source_folder_is_refused(release, tmp_path, capsys, out):
    """The policy folder is written whole in place of --out: given the model's folder, the tokenizer's, or a folder
    around them (ckpts/model_256), the release's files there were removed (the other suites' models, vqgan.ckpt,
    the model folder's other files). Refused before anything is read or written."""
    import shutil

    root = tmp_path / "ckpts"
    for part in ("model_256/libero_goal", "model_256/libero_10", "chameleon/tokenizer"):
        shutil.copytree(release / part, root / part)
    (root / "model_256" / "libero_goal" / "README.md").write_text("notes")
    before = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
    assert main(["import-release", str(root / "model_256" / "libero_goal"), "--tokenizer",
                 str(root / "chameleon" / "tokenizer"), "--out", str(root / out)]) == 2
    err = capsys.readouterr().err
    assert f"would replace {(root / out).resolve()}" in err and "give a new folder for it" in err
    assert sorted(str(p.relative_to(root)) for p in root.rglob("*")) == before
    # beside the release's folders, or inside the model's, the policy is written
    for fine in ("policies/goal", "model_256/libero_goal/policy"):
        assert main(["import-release", str(root / "model_256" / "libero_goal"), "--tokenizer",
                     str(root / "chameleon" / "tokenizer"), "--out", str(root / fine)]) == 0
        assert (root / fine / "policy.json").is_file()
    assert WorldVLA.from_pretrained(root / "model_256" / "libero_goal").layout is not None


@pytest.mark.parametrize("sizes, said", [
    (["--image-size", "512"], "two 512 px frames (1060 tokens each) and 5 actions needs 2"),
    (["--chunk-size", "200"], "two 256 px frames (276 tokens each) and 200 actions needs 2"),
])
def test_sizes_a_query_of_the_model_cannot_hold_are_refused_before_writing(release, tmp_path, capsys, sizes, said):
    """A frame size or chunk whose query (two frames, the chunk) is longer than the model's positions was taken: the
    policy was written, and refused every episode at reset. Refused at import, naming the options."""
    assert main(["import-release", str(release / "model_256" / "libero_goal"), "--tokenizer",
                 str(release / "chameleon" / "tokenizer"), "--out", str(tmp_path / "p"), *sizes]) == 2
    err = capsys.readouterr().err
    assert said in err and "more than the model's 1024 (max_position_embeddings)" in err
    assert "give a smaller --image-size or --chunk-size" in err and not (tmp_path / "p").exists()


def test_a_tokenizer_file_given_for_its_folder_is_named_as_a_file(release, tmp_path, capsys):
    """--tokenizer chameleon/tokenizer/text_tokenizer.json (the file, not its folder) was refused as "no such
    folder", of a path that exists; it is named as a file, with the folder to give."""
    tok = release / "chameleon" / "tokenizer"
    assert main(["import-release", str(release / "model_256" / "libero_goal"), "--tokenizer",
                 str(tok / "text_tokenizer.json"), "--out", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err
    assert f"{tok / 'text_tokenizer.json'} is a file, not a folder" in err and f"give the folder that holds it, {tok}" in err
    assert "no such folder" not in err and not (tmp_path / "p").exists()


def test_the_release_tokenizer_folder_is_read_from_a_path_under_home(release, monkeypatch):
    """load_release_tokenizer("~/...") looked for a folder named "~" (every file "missing"), where the model's
    and the VQGAN's loaders expand it."""
    from worldvla.checkpoint import load_release_tokenizer

    monkeypatch.setenv("HOME", str(release))
    layout, _, vqgan = load_release_tokenizer("~/chameleon/tokenizer")
    assert layout.vocab_size == 65536 and vqgan.config.n_embed == 64


def test_import_release_reads_a_tokenizer_folder_given_under_home(release, tmp_path, monkeypatch):
    """`--tokenizer ~/chameleon/tokenizer` (quoted, or from a Python caller) names the home folder's tokenizer, as
    the model's `~/...` does: it was refused as "no such folder"; the policy records the folder it names."""
    from worldvla.inference import WorldVLAPolicy

    monkeypatch.setenv("HOME", str(release))
    monkeypatch.chdir(tmp_path)
    info = import_release("~/model_256/libero_goal", "~/chameleon/tokenizer", tmp_path / "p")
    assert info["chunk_size"] == 5 and not (tmp_path / "~").exists()
    extra = WorldVLAPolicy.from_pretrained(tmp_path / "p", device="cpu").metadata()["extra"]
    assert extra["tokenizer"] == str((release / "chameleon" / "tokenizer").resolve())


def test_an_untrusted_vqgan_checkpoint_under_home_is_named_where_it_is(release, tmp_path, monkeypatch, capsys):
    """The refusal of a vqgan.ckpt holding Python objects names the file read (under the home folder), not a
    `~/...` path relative to nothing."""
    import shutil

    from test_vqgan import Opaque

    home = tmp_path / "home"
    tok = home / "tokenizer"
    shutil.copytree(release / "chameleon" / "tokenizer", tok)
    ckpt = torch.load(tok / "vqgan.ckpt", weights_only=True)
    torch.save({**ckpt, "callbacks": Opaque()}, tok / "vqgan.ckpt")
    monkeypatch.setenv("HOME", str(home))
    assert main(["import-release", str(release / "model_256" / "libero_goal"), "--tokenizer", "~/tokenizer",
                 "--out", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err
    assert f"{tok / 'vqgan.ckpt'} holds Python objects besides tensors" in err and "~" not in err.split(" holds")[0]


def test_a_query_that_fills_the_models_positions_exactly_is_taken(release, tmp_path, capsys):
    """The check that a query fits the model's positions lets through a query of exactly max_position_embeddings
    positions (the policy can serve it); one action more is refused."""
    import re

    tok = release / "chameleon" / "tokenizer"
    with pytest.raises(ValueError, match="needs") as e:
        import_release(release / "model_256" / "libero_goal", tok, tmp_path / "big", chunk_size=100)
    need = int(re.search(r"needs (\d+) positions", str(e.value)).group(1))
    model = tmp_path / "model_256" / "libero_goal"
    config = dataclasses.replace(ModelConfig.tiny(VocabLayout.chameleon()), max_position_embeddings=need)
    WorldVLA(config).save_pretrained(model)
    info = import_release(model, tok, tmp_path / "p", chunk_size=100)
    assert info["chunk_size"] == 100 and (tmp_path / "p" / "policy.json").is_file()
    with pytest.raises(ValueError, match=rf"more than the model's {need} \(max_position_embeddings\)"):
        import_release(model, tok, tmp_path / "q", chunk_size=101)
    assert not (tmp_path / "q").exists()


def test_a_chunk_size_of_zero_from_a_python_caller_is_refused_not_replaced_by_the_paths(release, tmp_path):
    """`import_release(..., chunk_size=0)` is a bad size to name, not a request for the size the path says."""
    for kw, name in (({"chunk_size": 0}, "chunk_size"), ({"image_size": 0}, "image_size")):
        with pytest.raises(ValueError, match=rf"{name} must be an integer >= 1, got 0"):
            import_release(release / "model_256" / "libero_goal", release / "chameleon" / "tokenizer",
                           tmp_path / "p", **kw)
    assert not (tmp_path / "p").exists()


def test_importing_a_policy_leaves_the_allocator_as_it_is(release, tmp_path, monkeypatch):
    """Writing a policy folder is not a control loop: the CPU policy built to check the sizes does not fix
    glibc's malloc thresholds for the importing process."""
    from worldvla.inference import policy

    calls = []
    monkeypatch.setattr(policy, "tune_cpu_malloc", lambda *a, **k: calls.append(1))
    import_release(release / "model_256" / "libero_goal", release / "chameleon" / "tokenizer", tmp_path / "p")
    assert calls == [] and (tmp_path / "p" / "policy.json").is_file()


@pytest.mark.parametrize("out, what, held", [("model_256", "model", "model_256/libero_goal"),
                                             ("chameleon", "tokenizer", "chameleon/tokenizer")])
def test_an_out_folder_around_a_source_folder_names_the_release_folder_it_holds(release, tmp_path, capsys, out,
                                                                                 what, held):
    """--out ckpts/model_256 (or ckpts/chameleon) is refused naming the release's folder inside it that would be
    replaced, and a new folder named after the model to give instead."""
    import shutil

    root = tmp_path / "ckpts"
    for part in ("model_256/libero_goal", "chameleon/tokenizer"):
        shutil.copytree(release / part, root / part)
    assert main(["import-release", str(root / "model_256" / "libero_goal"), "--tokenizer",
                 str(root / "chameleon" / "tokenizer"), "--out", str(root / out)]) == 2
    err = capsys.readouterr().err
    assert f"would replace {(root / out).resolve()}, which holds the release's {what} folder " \
           f"{(root / held).resolve()}: " in err
    assert "e.g. policies/libero_goal" in err and not (root / out / "policy.json").exists()


def test_a_model_folder_that_is_missing_or_holds_no_model_is_named(release, tmp_path, capsys):
    """A --model path with nothing there is named as no such folder; an empty folder there is named (not the
    tokenizer's) as no model folder, with what the release's model folders hold. Nothing is written."""
    tok = str(release / "chameleon" / "tokenizer")
    model = tmp_path / "model_256" / "libero_goal"
    argv = ["import-release", str(model), "--tokenizer", tok, "--out", str(tmp_path / "p")]
    assert main(argv) == 2
    assert f"{model}: no such folder (expected a WorldVLA model folder)" in capsys.readouterr().err
    model.mkdir(parents=True)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"{model}: expected a WorldVLA model folder (the release's model_256/<suite> or model_512/<suite>" in err
    assert not (tmp_path / "p").exists()


def test_the_closing_line_says_where_each_size_came_from(release, tmp_path, capsys):
    """A chunk size read from the path beside a frame size given by option: each is said to come from its own
    source."""
    model = release / "model_256" / "libero_goal"
    assert main(["import-release", str(model), "--tokenizer", str(release / "chameleon" / "tokenizer"), "--out",
                 str(tmp_path / "p"), "--image-size", "256"]) == 0
    line = capsys.readouterr().out.splitlines()[0]
    assert f"5 actions a chunk (from the path ({model})), 256 px frames (from --image-size), " in line
