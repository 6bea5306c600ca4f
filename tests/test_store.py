"""The pretokenized token store: sample contents against SequenceBuilder, one VQGAN pass per frame,
resumable atomic builds with checksums, kind filtering and packing."""
import argparse
import json
import os
import re

import numpy as np
import pytest
import torch

from worldvla.data import store as st
from worldvla.data.hdf5 import write_demos
from worldvla.model import ModelConfig, WorldVLA
from worldvla.tokens import ActionTokenizer, ByteTextTokenizer, SequenceBuilder, VocabLayout
from worldvla.vqgan import VQGAN, VQGANConfig, preprocess

K = 3



def tiny_vqgan(seed=0):
    torch.manual_seed(seed)
    return VQGAN(VQGANConfig(ch=32, ch_mult=(1, 1, 1, 1, 1), num_res_blocks=1, z_channels=32, embed_dim=32,
                             n_embed=64)).eval()


def random_demos(rng, lengths, size=32, success=None, dim=4):
    return [{"frames": rng.integers(0, 256, (T, size, size, 3), dtype=np.uint8),
             "actions": rng.uniform(-1, 1, (T, dim)).astype(np.float32),
             "success": True if success is None else success[i]} for i, T in enumerate(lengths)]


class CountingVQGAN(VQGAN):
    """Counts frames and calls that go through encode."""
    frames = 0
    calls = 0

    def encode(self, pixels, backend="auto"):
        type(self).frames += pixels.shape[0]
        type(self).calls += 1
        return super().encode(pixels, backend)


def counting(vq):
    c = CountingVQGAN(vq.config)
    c.load_state_dict(vq.state_dict())
    CountingVQGAN.frames = CountingVQGAN.calls = 0
    return c.eval()


@pytest.fixture
def demo_dir(tmp_path):
    rng = np.random.default_rng(7)
    demos = random_demos(rng, (7, 5, 2, 6), success=[True, True, True, False])
    write_demos(tmp_path / "demos" / "a.hdf5", demos[:3], "push the red block")
    write_demos(tmp_path / "demos" / "sub" / "b.h5", demos[3:], "open the drawer")
    return tmp_path / "demos", demos


def test_samples_match_sequence_builder(demo_dir, tmp_path):
    folder, demos = demo_dir
    vq = tiny_vqgan()
    out = st.build_store(folder, tmp_path / "s", vq, chunk_size=K, demos_per_shard=2, progress=False)
    store = st.TokenStore(out, verify=True)
    layout = store.layout
    assert layout == VocabLayout.compact(n_image_codes=64)
    # Expected samples of the successful demos (the failed demo of b.h5 is skipped), frame by frame.
    builder = SequenceBuilder(layout, ByteTextTokenizer(layout), ActionTokenizer(layout, [-1.0] * 4, [1.0] * 4))
    expected = []
    for d in demos[:3]:
        codes = [vq.encode(preprocess(f))[0] for f in d["frames"]]
        T = len(d["actions"])
        for j in range(T - K + 1):
            expected.append(builder.action_sample("push the red block", codes[max(0, j - 1):j + 1],
                                                  d["actions"][j:j + K]))
        for j in range(T - 1):
            expected.append(builder.world_sample(codes[j], d["actions"][j], codes[j + 1]))
    assert len(store) == len(expected) == (5 + 6) + (3 + 4) + (0 + 1)
    got = sorted((tuple(store[i][0].tolist()), tuple(store[i][1].tolist()), store[i][2]) for i in range(len(store)))
    want = sorted((tuple(s.input_ids.tolist()), tuple(s.labels.tolist()), s.kind) for s in expected)
    assert got == want
    # History: one image at j = 0, two afterwards; the loss covers only the answer.
    boi = [int((store[i][0] == layout.boi).sum()) for i in range(len(store)) if store[i][2] == "action"]
    assert sorted(set(boi)) == [1, 2] and boi.count(1) == 2
    for i in range(len(store)):
        ids, labels, kind = store[i]
        assert ids.dtype == labels.dtype == torch.int64 and ids.shape == labels.shape
        lab = labels != -100
        first = int(lab.nonzero()[0])
        assert not lab[:first].any() and lab[first:].all() and torch.equal(labels[lab], ids[lab])
        assert int(ids[first - 1]) == layout.sep
    m = json.loads((out / "manifest.json").read_text())
    assert m["complete"] and m["n_action"] == 8 and m["n_world"] == 11 and len(m["shards"]) == 3
    assert m["action"]["low"] == [-1.0] * 4 and m["action"]["chunk_size"] == K
    assert store.kind_counts() == {"action": 8, "world": 11}
    assert all(len(e["files"]) == 5 and all(len(h) == 64 for h in e["files"].values()) for e in m["shards"])
    assert np.array_equal(store.lengths, [len(store[i][0]) for i in range(len(store))])
    torch.testing.assert_close(VQGAN.from_pretrained(store.vqgan_path).codebook, vq.codebook)


def test_each_frame_encoded_once_in_batches(demo_dir, tmp_path):
    folder, demos = demo_dir
    vq = counting(tiny_vqgan())
    st.build_store(folder, tmp_path / "s", vq, chunk_size=K, encode_batch=4, only_success=False, progress=False)
    lengths = [len(d["actions"]) for d in demos]
    assert CountingVQGAN.frames == sum(lengths)
    assert CountingVQGAN.calls == sum(-(-T // 4) for T in lengths)
    store = st.TokenStore(tmp_path / "s")
    assert len(store) == sum(max(0, T - K + 1) + T - 1 for T in lengths)


def test_interrupted_build_resumes_and_skips_verified_shards(demo_dir, tmp_path, monkeypatch):
    folder, _ = demo_dir
    out = tmp_path / "s"
    real = st._write_shard
    calls = []

    def crash_on_second(path, samples):
        calls.append(path.name)
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated crash")
        return real(path, samples)

    monkeypatch.setattr(st, "_write_shard", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        st.build_store(folder, out, tiny_vqgan(), chunk_size=K, demos_per_shard=2, progress=False)
    monkeypatch.setattr(st, "_write_shard", real)
    m = json.loads((out / "manifest.json").read_text())
    assert not m["complete"] and [e["name"] for e in m["shards"]] == ["shard_00000"]
    with pytest.raises(ValueError, match="incomplete"):
        st.TokenStore(out)
    # The resumed build encodes only the demos of the unfinished shards (a.hdf5 demo 2, b.h5 demo 0).
    vq = counting(tiny_vqgan())
    st.build_store(folder, out, vq, chunk_size=K, demos_per_shard=2, progress=False)
    assert CountingVQGAN.frames == 2  # demo 2 of a.hdf5; b.h5's only demo failed and is not encoded
    whole = st.build_store(folder, tmp_path / "ref", tiny_vqgan(), chunk_size=K, demos_per_shard=2, progress=False)
    a, b = st.TokenStore(out, verify=True), st.TokenStore(whole)
    assert len(a) == len(b) and all(torch.equal(a[i][0], b[i][0]) for i in range(len(a)))
    # A corrupted shard fails verification and is rebuilt on the next run; intact ones are skipped.
    tok = out / "shard_00000" / "tokens.npy"
    arr = np.load(tok)
    arr[5] += 1
    np.save(tok, arr)
    with pytest.raises(ValueError, match="checksum"):
        st.TokenStore(out, verify=True)
    vq = counting(tiny_vqgan())
    st.build_store(folder, out, vq, chunk_size=K, demos_per_shard=2, progress=False)
    assert CountingVQGAN.frames == 7 + 5  # the two demos of shard 0 only
    st.TokenStore(out, verify=True)


def test_changed_settings_need_overwrite_and_world_switch(demo_dir, tmp_path):
    folder, _ = demo_dir
    out = st.build_store(folder, tmp_path / "s", tiny_vqgan(), chunk_size=K, progress=False)
    with pytest.raises(FileExistsError, match="overwrite"):
        st.build_store(folder, out, tiny_vqgan(), chunk_size=2, progress=False)
    with pytest.raises(FileExistsError, match="overwrite"):
        st.build_store(folder, out, tiny_vqgan(seed=1), chunk_size=K, progress=False)
    st.build_store(folder, out, tiny_vqgan(), chunk_size=2, world=False, overwrite=True, progress=False)
    store = st.TokenStore(out)
    assert store.kind_counts() == {"action": 6 + 4 + 1, "world": 0} and store.chunk_size == 2
    with pytest.raises(ValueError, match="kinds"):
        st.TokenStore(out, kinds=("actions",))


def test_kind_filter_and_pack(demo_dir, tmp_path):
    folder, _ = demo_dir
    out = st.build_store(folder, tmp_path / "s", tiny_vqgan(), chunk_size=K, progress=False)
    full, act, world = st.TokenStore(out), st.TokenStore(out, kinds="action"), st.TokenStore(out, kinds=["world"])
    assert len(act) + len(world) == len(full)
    assert {act[i][2] for i in range(len(act))} == {"action"} and {world[i][2] for i in range(len(world))} == {"world"}
    samples = [full[0], full[len(full) - 1], full[3]]
    lens = [len(s[0]) for s in samples]
    ids, labels, cu = st.pack(samples, sum(lens))
    assert cu.dtype == torch.int32 and cu.tolist() == [0, lens[0], lens[0] + lens[1], sum(lens)]
    assert torch.equal(ids, torch.cat([s[0] for s in samples]))
    assert torch.equal(labels, torch.cat([s[1] for s in samples]))
    pid, plab, pcu = st.pack(samples, sum(lens) + 9, pad_id=1)
    assert pid.numel() == sum(lens) + 9 and pcu[-1] == pid.numel() and (plab[-9:] == -100).all()
    with pytest.raises(ValueError, match="max_tokens"):
        st.pack(samples, sum(lens) - 1)
    # Packed documents do not see each other: logits equal those of each sample alone.
    torch.manual_seed(0)
    model = WorldVLA(ModelConfig.tiny(full.layout)).init_weights(0.05, torch.Generator().manual_seed(1)).eval()
    with torch.no_grad():
        packed = model(ids, cu_seqlens=cu)
        for s, a, b in zip(samples, cu[:-1].tolist(), cu[1:].tolist()):
            torch.testing.assert_close(packed[a:b], model(s[0]), rtol=1e-4, atol=1e-4)


def test_bounds_and_bad_inputs(tmp_path):
    rng = np.random.default_rng(3)
    d = random_demos(rng, (5,))
    d[0]["actions"][0, 2] = 1.7
    write_demos(tmp_path / "x" / "a.hdf5", d, "reach")
    files = st.find_demo_files(tmp_path / "x")
    low, high = st.action_bounds("auto", files, 4)
    assert high[2] == pytest.approx(1.7) and low[2] == pytest.approx(float(d[0]["actions"][:, 2].min()))
    assert st.action_bounds("unit", files, 4) == ([-1.0] * 4, [1.0] * 4)
    with pytest.raises(ValueError, match="7-D"):
        st.action_bounds("libero", files, 4)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no HDF5"):
        st.find_demo_files(tmp_path / "empty")
    write_demos(tmp_path / "y" / "a.hdf5", random_demos(rng, (4,)), "reach")
    write_demos(tmp_path / "y" / "b.hdf5", random_demos(rng, (4,), size=64), "reach")
    with pytest.raises(ValueError, match="one size"):
        st.build_store(tmp_path / "y", tmp_path / "sy", tiny_vqgan(), chunk_size=3, progress=False)
    with pytest.raises(ValueError, match="chunk size"):
        st.build_store(tmp_path / "x", tmp_path / "sz", tiny_vqgan(), chunk_size=0, progress=False)
    with pytest.raises(ValueError, match=r"-K 9 is longer than every demo \(the longest has 5 steps\)"):
        st.build_store(tmp_path / "x", tmp_path / "sw", tiny_vqgan(), chunk_size=9, world=False, progress=False)
    assert not (tmp_path / "sw").exists()  # refused before any work
    with pytest.raises(FileNotFoundError, match="not a token store"):
        st.TokenStore(tmp_path / "x")


def _pretokenize_args(folder, tmp_path, out: str, *options):
    """pretokenize's parsed command line for the demos in `folder`, a tiny VQGAN and K = 2, into tmp_path/out."""
    vq_dir = tmp_path / "vq"
    tiny_vqgan().save_pretrained(vq_dir)
    p = argparse.ArgumentParser()
    st.add_arguments(p)
    return p.parse_args([str(folder), "--out", str(tmp_path / out), "--vqgan", str(vq_dir), "-K", "2", *options])


def test_cli(demo_dir, tmp_path, capsys):
    folder, _ = demo_dir
    args = _pretokenize_args(folder, tmp_path, "my store", "--no-world", "--include-failed", "--no-progress")
    assert st.run(args) == 0
    store = st.TokenStore(tmp_path / "my store")
    assert store.kind_counts() == {"action": 6 + 4 + 1 + 5, "world": 0}
    assert f"next: worldvla train --store '{tmp_path}/my store' --out <run>" in capsys.readouterr().out  # quoted


def test_no_action_samples_is_refused(tmp_path):
    """Only a failed demo is long enough for -K: a store with world samples but no action samples
    used to be built (and would train a policy on nothing)."""
    rng = np.random.default_rng(5)
    write_demos(tmp_path / "d" / "a.hdf5", random_demos(rng, (3, 8), success=[True, False]), "reach")
    with pytest.raises(ValueError, match="-K 5 is longer than every successful demo.*no action sample"):
        st.build_store(tmp_path / "d", tmp_path / "s", tiny_vqgan(), chunk_size=5, progress=False)


def test_vqgan_save_never_leaves_a_config_without_weights(tmp_path, monkeypatch):
    import safetensors.torch

    vq = tiny_vqgan()
    vq.save_pretrained(tmp_path / "old")

    def crash(tensors, path, metadata=None):
        open(path, "wb").write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        vq.save_pretrained(tmp_path / "new")
    assert list((tmp_path / "new").iterdir()) == []  # no config.json, no half-written weights
    with pytest.raises(OSError, match="disk full"):
        vq.save_pretrained(tmp_path / "old")  # over an older VQGAN: its config is gone with it
    assert sorted(p.name for p in (tmp_path / "old").iterdir()) == ["model.safetensors"]


def test_store_copies_the_vqgan_again_when_its_weights_are_missing(demo_dir, tmp_path):
    folder, _ = demo_dir
    vq = tiny_vqgan()
    st.build_store(folder, tmp_path / "s", vq, chunk_size=K, progress=False)
    (tmp_path / "s" / "vqgan" / "model.safetensors").unlink()  # a copy interrupted before the weights
    st.build_store(folder, tmp_path / "s", vq, chunk_size=K, progress=False)
    copy = VQGAN.from_pretrained(st.TokenStore(tmp_path / "s").vqgan_path)
    assert all(torch.equal(a, b) for a, b in zip(copy.state_dict().values(), vq.state_dict().values()))


def test_a_vqgan_copy_killed_partway_leaves_only_a_whole_copy_after_the_rerun(demo_dir, tmp_path):
    """The store's VQGAN was written into <store>/vqgan in place: a build killed during the copy left weights
    without config.json and a hidden weights-sized temporary file, which the rerun's copy kept beside the new files
    for good. The copy is now written whole, as a folder renamed in."""
    folder, _ = demo_dir
    vq = tiny_vqgan()
    out = tmp_path / "s"
    st.build_store(folder, out, vq, chunk_size=K, progress=False)
    (out / "vqgan" / "config.json").unlink()  # what a build killed between the two files leaves
    (out / "vqgan" / ".model.safetensors.0123456789ab.tmp").write_bytes(b"\0" * 64)
    st.build_store(folder, out, vq, chunk_size=K, progress=False)
    assert sorted(p.name for p in (out / "vqgan").iterdir()) == ["config.json", "model.safetensors"]
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]
    st.TokenStore(out, verify=True)


@pytest.mark.parametrize("option,value", [("--encode-batch", "0"), ("-K", "0"), ("--demos-per-shard", "-1")])
def test_cli_refuses_bad_counts_naming_the_option(option, value, tmp_path, capsys):
    from worldvla.cli import main

    with pytest.raises(SystemExit) as e:
        main(["pretokenize", str(tmp_path), "--out", str(tmp_path / "s"), "--vqgan", str(tmp_path), option, value])
    assert e.value.code == 2
    assert "must be >= " in capsys.readouterr().err


def test_cli_names_a_missing_vqgan_folder_and_a_too_long_chunk(demo_dir, tmp_path, capsys):
    from worldvla.cli import main

    folder, _ = demo_dir
    assert main(["pretokenize", str(folder), "--out", str(tmp_path / "s"), "--vqgan", str(tmp_path / "nothere")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("worldvla pretokenize: error: the VQGAN folder") and "nothere is missing" in err
    tiny_vqgan().save_pretrained(tmp_path / "vq")
    args = [str(folder), "--out", str(tmp_path / "s"), "--vqgan", str(tmp_path / "vq"), "--no-progress"]
    assert main(["pretokenize", *args, "-K", "500"]) == 2
    err = capsys.readouterr().err
    assert "-K 500 is longer than every demo (the longest has 7 steps)" in err and "Traceback" not in err


def test_cli_names_a_file_that_is_not_hdf5(tmp_path, capsys, monkeypatch):
    """`pretokenize somefile.log` said only h5py's "file signature not found", not which file."""
    from worldvla.cli import main

    monkeypatch.delenv("WORLDVLA_TRACEBACK", raising=False)
    log = tmp_path / "somefile.log"
    log.write_text("not a demo file\n")
    tiny_vqgan().save_pretrained(tmp_path / "vq")
    assert main(["pretokenize", str(log), "--out", str(tmp_path / "s"), "--vqgan", str(tmp_path / "vq"),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{log}: not an HDF5 file" in err and "Traceback" not in err


def test_cli_refuses_an_unknown_device_in_one_line(demo_dir, tmp_path, capsys, monkeypatch):
    """`--device gpu` was torch's RuntimeError traceback."""
    from worldvla.cli import main

    monkeypatch.delenv("WORLDVLA_TRACEBACK", raising=False)
    folder, _ = demo_dir
    tiny_vqgan().save_pretrained(tmp_path / "vq")
    assert main(["pretokenize", str(folder), "--out", str(tmp_path / "s"), "--vqgan", str(tmp_path / "vq"),
                 "--device", "gpu", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "unknown device 'gpu' (--device)" in err


def test_noop_filter_and_rotation_reach_the_store(tmp_path):
    """--drop-noops and --rotate-180 change what is tokenized (recorded in the manifest's settings)."""
    rng = np.random.default_rng(3)
    (demo,) = random_demos(rng, (8,))
    demo["actions"][[0, 1, 4], :3] = 0.0  # arm still, gripper unchanged from the step before: 0, 1 and 4 are no-ops
    demo["actions"][:, 3] = 1.0
    write_demos(tmp_path / "d" / "a.hdf5", [demo], "push")
    vq = tiny_vqgan()
    plain = st.build_store(tmp_path / "d", tmp_path / "s0", vq, chunk_size=2, world=False, progress=False)
    kept = st.build_store(tmp_path / "d", tmp_path / "s1", vq, chunk_size=2, world=False, drop_noops=True,
                          progress=False)
    turned = st.build_store(tmp_path / "d", tmp_path / "s2", vq, chunk_size=2, world=False, rotate_180=True,
                            progress=False)
    n = {p: json.loads((p / st.MANIFEST).read_text()) for p in (plain, kept, turned)}
    assert n[plain]["n_action"] == 7 and n[kept]["n_action"] == 4  # 8 and 5 steps, K = 2
    assert n[kept]["settings"]["drop_noops"] and n[turned]["settings"]["rotate_180"] is True
    ids = [torch.as_tensor(st.TokenStore(p)[0][0]) for p in (plain, turned)]  # the first sample's image codes
    assert ids[0].shape == ids[1].shape and not torch.equal(ids[0], ids[1])


def _release_text_tokenizer(path):
    """A text_tokenizer.json in the release's form: a few words, and the 8192 image-code token names."""
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "push": 9000, "open": 9001}
    vocab.update({"IMGIMG" + "".join("ABCDEFGHIJ"[int(c)] for c in str(code)) + "Z": 4 + code
                  for code in range(8192)})
    path.write_text(json.dumps({"version": "1.0", "added_tokens": [], "normalizer": None,
                                "pre_tokenizer": {"type": "Whitespace"}, "post_processor": None, "decoder": None,
                                "model": {"type": "BPE", "vocab": vocab, "merges": [], "unk_token": "<unk>"}}))
    return path


def test_text_tokenizer_json_only_in_a_chameleon_store(demo_dir, tmp_path):
    """A compact store's text is byte ids: a text_tokenizer.json in its folder (left by an earlier chameleon
    build) would reach the exported policy, which would then encode instructions with it."""
    folder, _ = demo_dir
    tok = _release_text_tokenizer(tmp_path / "text_tokenizer.json")
    out = st.build_store(folder, tmp_path / "s", tiny_vqgan(), layout="chameleon", tokenizer_json=tok,
                         chunk_size=K, progress=False)
    assert st.TokenStore(out).text_tokenizer_path == out / st.TEXT_TOKENIZER
    assert (out / st.TEXT_TOKENIZER).read_bytes() == tok.read_bytes()
    st.build_store(folder, out, tiny_vqgan(), layout="compact", chunk_size=K, overwrite=True, progress=False)
    assert not (out / st.TEXT_TOKENIZER).exists() and st.TokenStore(out).text_tokenizer_path is None
    # A compact store built before stale copies were removed: the reader does not offer the copy either.
    (out / st.TEXT_TOKENIZER).write_bytes(tok.read_bytes())
    assert st.TokenStore(out).text_tokenizer_path is None


def test_store_replaces_a_vqgan_its_manifest_does_not_name(demo_dir, tmp_path):
    """A folder left without its manifest keeps an older VQGAN in vqgan/: the build saves its own VQGAN
    over it, and the reader refuses a vqgan/ folder whose weights are not the manifest's."""
    folder, _ = demo_dir
    old, new = tiny_vqgan(0), tiny_vqgan(1)
    out = st.build_store(folder, tmp_path / "s", old, chunk_size=K, progress=False)
    (out / st.MANIFEST).unlink()  # e.g. a first build interrupted after vqgan/ was saved
    st.build_store(folder, out, new, chunk_size=K, progress=False)
    store = st.TokenStore(out)
    copy = VQGAN.from_pretrained(store.vqgan_path)
    assert store.manifest["vqgan_sha256"] == st._state_dict_digest(new) == st._state_dict_digest(copy)
    old.save_pretrained(out / "vqgan")
    with pytest.raises(ValueError, match="holds another VQGAN .* rerun `worldvla pretokenize`"):
        st.TokenStore(out).checked_vqgan_path()  # where the VQGAN is used (the trainer's export)
    with pytest.raises(ValueError, match="holds another VQGAN"):
        st.TokenStore(out, verify=True)
    st.build_store(folder, out, new, chunk_size=K, progress=False)  # the same arguments restore it
    assert st.TokenStore(out, verify=True).checked_vqgan_path() == out / "vqgan"
    (out / "vqgan" / "model.safetensors").unlink()
    assert len(st.TokenStore(out)) > 0  # opening reads no VQGAN: training without an export needs none
    with pytest.raises(FileNotFoundError, match="lacks its VQGAN"):
        st.TokenStore(out).checked_vqgan_path()


def test_data_bounds_cover_exactly_the_demos_and_steps_the_store_tokenizes(tmp_path):
    """--action-bounds data / auto were the min/max over every demo of the files, failed ones (not tokenized
    under only_success) and no-op steps (dropped under drop_noops) included: one failed demo with wild actions
    widened the bounds 8x, so the trained actions used a few of the 256 bins."""
    rng = np.random.default_rng(9)
    demos = random_demos(rng, (6, 5, 6), success=[True, False, True])
    demos[1]["actions"] *= 30  # a failed demo that flailed
    demos[2]["actions"][0] = [0.0, 0.0, 0.0, 7.0]  # a first step whose arm is still: a no-op
    write_demos(tmp_path / "d" / "a.hdf5", demos, "reach")
    vq = tiny_vqgan()
    out = st.build_store(tmp_path / "d", tmp_path / "s", vq, chunk_size=2, world=False, bounds="data",
                         drop_noops=True, progress=False)
    kept = np.concatenate([demos[0]["actions"], demos[2]["actions"][1:]]).astype(np.float64)
    a = json.loads((out / st.MANIFEST).read_text())["action"]
    np.testing.assert_allclose(a["low"], kept.min(0), rtol=1e-6)
    np.testing.assert_allclose(a["high"], kept.max(0), rtol=1e-6)
    files = st.find_demo_files(tmp_path / "d")
    assert st.action_bounds("auto", files, 4, drop_noops=True) == ([-1.0] * 4, [1.0] * 4)  # all it tokenizes is unit
    assert st.action_bounds("auto", files, 4, only_success=False, drop_noops=True)[1][0] > 1.0
    with pytest.raises(ValueError, match="no actions to derive action bounds from.*--include-failed"):
        st.action_bounds("data", st.find_demo_files(write_demos(tmp_path / "f" / "a.hdf5", demos[1:2], "reach")), 4)


def test_index_records_each_demos_ordinal_in_its_file_under_drop_noops(tmp_path):
    """index.npy took a demo's ordinal from its place among the demos iter_demos yields, which skips demos of
    no-ops only under drop_noops: every later demo was recorded as the one before it (and filed in its shard)."""
    rng = np.random.default_rng(4)
    demos = random_demos(rng, (4, 3, 5, 4))
    demos[1]["actions"][:] = 0.0  # every step a no-op: skipped
    write_demos(tmp_path / "d" / "a.hdf5", demos, "reach")
    with pytest.warns(UserWarning, match="demo_1: every step is a no-op"):
        out = st.build_store(tmp_path / "d", tmp_path / "s", tiny_vqgan(), chunk_size=2, world=False, drop_noops=True,
                             demos_per_shard=1, progress=False)
    m = json.loads((out / st.MANIFEST).read_text())
    got = {}
    for e in m["shards"]:
        index = np.load(out / e["name"] / "index.npy")
        got[tuple(e["demos"])] = sorted(set(index[:, 0].tolist()))
    assert got == {(0, 1): [0], (1, 2): [], (2, 3): [2], (3, 4): [3]}


def test_damaged_store_files_are_named_with_what_to_do(demo_dir, tmp_path):
    """A cut tokens.npy ("mmap length is greater than file size"), an overwritten offsets.npy (numpy's pickle
    advice) and a cut manifest (json's "Unterminated string", which also stopped `pretokenize --overwrite`) named
    no file."""
    folder, _ = demo_dir
    out = st.build_store(folder, tmp_path / "s", tiny_vqgan(), chunk_size=K, progress=False)
    tokens, offsets, mpath = out / "shard_00000" / "tokens.npy", out / "shard_00000" / "offsets.npy", out / st.MANIFEST
    os.truncate(tokens, tokens.stat().st_size // 2)
    with pytest.raises(ValueError, match=f"{tokens}: cannot read this token-store array .*rerun `worldvla pretokenize"):
        st.TokenStore(out)
    st.build_store(folder, out, tiny_vqgan(), chunk_size=K, progress=False)  # the same arguments rebuild the shard
    offsets.write_bytes(b"garbage" * 10)
    with pytest.raises(ValueError, match=f"{offsets}: cannot read this token-store array"):
        st.TokenStore(out)
    st.build_store(folder, out, tiny_vqgan(), chunk_size=K, progress=False)
    n = len(st.TokenStore(out))
    text = mpath.read_text()
    mpath.write_text(text[:len(text) // 2])
    with pytest.raises(ValueError, match=f"{mpath}: not a valid token store manifest.*pretokenize.*--overwrite"):
        st.TokenStore(out)
    with pytest.raises(ValueError, match=f"{mpath}: not a valid token store manifest.*--overwrite"):
        st.build_store(folder, out, tiny_vqgan(), chunk_size=K, progress=False)
    st.build_store(folder, out, tiny_vqgan(), chunk_size=K, overwrite=True, progress=False)
    assert len(st.TokenStore(out, verify=True)) == n


def test_nan_actions_are_refused_naming_the_demo_unless_it_is_not_tokenized(tmp_path):
    """NaN actions in a demo file ended in the action tokenizer's "actions contain NaN or inf", naming neither the
    file nor the demo; a failed demo, which the store skips, may hold them."""
    import h5py

    rng = np.random.default_rng(2)
    path = write_demos(tmp_path / "d" / "a.hdf5", random_demos(rng, (4, 5, 4), success=[True, True, False]), "reach")
    with h5py.File(path, "a") as f:
        f["data/demo_2/actions"][1, 0] = np.nan  # the failed demo
    for bounds in ("unit", "data"):
        st.build_store(tmp_path / "d", tmp_path / f"ok_{bounds}", tiny_vqgan(), chunk_size=2, bounds=bounds,
                       progress=False)
    with h5py.File(path, "a") as f:
        f["data/demo_1/actions"][3, 2] = np.inf
    for bounds in ("unit", "data"):
        with pytest.raises(ValueError, match=f"{path}:data/demo_1: actions contain NaN or inf \\(first at step 3"):
            st.build_store(tmp_path / "d", tmp_path / f"s_{bounds}", tiny_vqgan(), chunk_size=2, bounds=bounds,
                           progress=False)


def test_out_of_range_ids_name_the_shard_file_the_value_and_the_position(demo_dir, tmp_path):
    """A damaged shard's token ids outside the vocabulary reached the trainer's "token ids out of range: [lo, hi]",
    naming no file. The sample is refused where it is read, naming the shard's file, the value, its position in the
    file and the fix; a damaged label is named too (IGNORE is not). Following the fix rebuilds the shard, even one
    whose checksums match its damaged files."""
    import shutil

    folder, _ = demo_dir
    out = st.build_store(folder, tmp_path / "s", tiny_vqgan(), chunk_size=K, progress=False)
    store = st.TokenStore(out)
    want = [store[i] for i in range(len(store))]
    shard = out / "shard_00000"
    offsets = np.load(shard / "offsets.npy")
    first = 0  # the store's sample 0 is the shard's
    vocab = store.layout.vocab_size
    for name, value in (("tokens", vocab + 5), ("labels", -7)):
        arr = np.load(shard / f"{name}.npy", mmap_mode="r+")
        pos = int(offsets[1]) + 4  # sample 1's fifth token
        arr[pos] = value
        arr.flush()
        del arr
        damaged = st.TokenStore(out)
        assert damaged[first][0].tolist() == want[first][0].tolist()  # the shard's other samples still read
        with pytest.raises(ValueError, match=(
                f"{shard / f'{name}.npy'}: value {value} at position {pos} \\(sample 1 of the shard, its token 4\\) "
                f"is outside the vocabulary's ids \\[0, {vocab}\\).*the shard is damaged; rebuild it: remove {shard} "
                f"and rerun `worldvla pretokenize` with the same arguments")):
            damaged[first + 1]
        # As the message says; the manifest's checksums are made to match, as for a shard written so.
        m = json.loads((out / st.MANIFEST).read_text())
        entry = next(e for e in m["shards"] if e["name"] == shard.name)
        entry["files"] = {f: st.sha256_file(shard / f) for f in entry["files"]}
        (out / st.MANIFEST).write_text(json.dumps(m))
        shutil.rmtree(shard)
        st.build_store(folder, out, tiny_vqgan(), chunk_size=K, progress=False)
        again = st.TokenStore(out, verify=True)
        assert all(torch.equal(again[i][0], w[0]) and torch.equal(again[i][1], w[1]) for i, w in enumerate(want))


def _own_robot_file(path, actions, frames=None):
    """A user's file in LIBERO's layout written with h5py: obs/agentview_rgb, no `upright` attribute."""
    import h5py

    frames = np.zeros((len(actions), 32, 32, 3), np.uint8) if frames is None else frames
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        d = f.create_group("data")
        d.attrs["instruction"] = "pick up the cube"
        g = d.create_group("demo_0")
        g.create_dataset("obs/agentview_rgb", data=frames)
        g.create_dataset("actions", data=actions.astype(np.float32))
    return path


def test_auto_bounds_are_libero_only_for_libero_files_and_say_when_they_clip(tmp_path, capsys):
    """`--action-bounds auto` gave every 7-D action set the LIBERO bounds without looking at it: robomimic-style
    actions in [-1, 1] had half their rotation values clipped at +-0.375, silently."""
    rng = np.random.default_rng(0)
    unit7 = np.clip(rng.normal(0, 0.5, (200, 7)), -1, 1)
    frames = rng.integers(0, 256, (200, 32, 32, 3), dtype=np.uint8)
    write_demos(tmp_path / "robomimic" / "a.hdf5", [{"frames": frames, "actions": unit7}], "lift")
    files = st.find_demo_files(tmp_path / "robomimic")
    assert st.action_bounds("auto", files, 7) == ([-1.0] * 7, [1.0] * 7)  # not LIBERO's file: unit
    wide = unit7 * 3
    write_demos(tmp_path / "wide" / "a.hdf5", [{"frames": frames, "actions": wide}], "lift")
    low, high = st.action_bounds("auto", st.find_demo_files(tmp_path / "wide"), 7)
    np.testing.assert_allclose(low, wide.min(0))
    np.testing.assert_allclose(high, wide.max(0))
    assert capsys.readouterr().out == ""

    # LIBERO's layout: its fixed bounds (the release's), silent while they fit the data ...
    libero_min, libero_max = np.array(st.LIBERO_MIN), np.array(st.LIBERO_MAX)
    inside = rng.uniform(libero_min, libero_max, (200, 7))
    inside[:, :6][rng.random((200, 6)) < 0.005] = 0.99  # a few outliers (< 1% of a dimension): no line
    files = [_own_robot_file(tmp_path / "libero" / "a.hdf5", inside)]
    assert st.action_bounds("auto", files, 7) == (list(st.LIBERO_MIN), list(st.LIBERO_MAX))
    assert capsys.readouterr().out == ""
    # ... and one line when they clip more than 1% of a dimension's values, with the share per dimension.
    files = [_own_robot_file(tmp_path / "mine" / "a.hdf5", unit7)]
    assert st.action_bounds("auto", files, 7) == (list(st.LIBERO_MIN), list(st.LIBERO_MAX))
    out = capsys.readouterr().out
    share = ((unit7 < libero_min) | (unit7 > libero_max)).mean(0)
    assert len(out.strip().splitlines()) == 1 and "--action-bounds data" in out and "--action-bounds libero" in out
    assert " ".join(f"{x:.1%}" for x in share) in out and share[3:6].min() > 0.3
    assert st.action_bounds("libero", files, 7) == (list(st.LIBERO_MIN), list(st.LIBERO_MAX))
    assert capsys.readouterr().out == ""  # chosen by name: kept silently
    p = argparse.ArgumentParser()
    st.add_arguments(p)
    assert "LIBERO's files" in p.format_help() and "1%" in p.format_help()


def test_libero_like_frames_are_rotated_with_a_line_naming_the_option(tmp_path, capsys):
    """A user's own file in LIBERO's layout (obs/agentview_rgb, no `upright`) had its frames rotated by 180
    degrees, silently (the policy at deployment does not rotate)."""
    rng = np.random.default_rng(1)
    frames = rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    _own_robot_file(tmp_path / "d" / "mine.hdf5", rng.uniform(-1, 1, (6, 4)), frames)
    vq = tiny_vqgan()
    st.build_store(tmp_path / "d", tmp_path / "s0", vq, chunk_size=2, progress=False)
    out = capsys.readouterr().out
    assert len(out.strip().splitlines()) == 1
    assert "mine.hdf5" in out and "rotated by 180 degrees" in out and "--rotate-180 no" in out
    st.build_store(tmp_path / "d", tmp_path / "s1", vq, chunk_size=2, rotate_180=False, progress=False)
    assert capsys.readouterr().out == ""
    write_demos(tmp_path / "e" / "ours.hdf5", [{"frames": frames, "actions": rng.uniform(-1, 1, (6, 4))}], "x")
    st.build_store(tmp_path / "e", tmp_path / "s2", vq, chunk_size=2, progress=False)
    assert capsys.readouterr().out == ""  # marked upright: read as it is
    p = argparse.ArgumentParser()
    st.add_arguments(p)
    text = " ".join(p.format_help().split())
    assert "rotated by 180 degrees" in text and "--rotate-180 no" in text


def _hashed_inputs(monkeypatch):
    """The demo files `st.sha256_file` reads from now on (shard files and the text tokenizer left out)."""
    seen = []
    real = st.sha256_file

    def counting_sha256(path, *a, **k):
        if str(path).endswith((".hdf5", ".h5")):
            seen.append(os.path.basename(path))
        return real(path, *a, **k)

    monkeypatch.setattr(st, "sha256_file", counting_sha256)
    return seen


def _sha256(path):
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_rerun_refuses_inputs_whose_content_changed_at_the_same_size(tmp_path, monkeypatch):
    """Inputs were told apart by name and size alone: a demo file collected again (another seed, the same shapes)
    reused the shards of the old demos, silently. Each input's sha256 is recorded and checked on a rerun; a file is
    hashed again only when its size or mtime changed (a copied folder: once), and a manifest written before the
    digests is accepted and completed."""
    import shutil

    f = tmp_path / "d" / "a.hdf5"
    write_demos(f, random_demos(np.random.default_rng(0), (5, 4)), "push", compression=None)
    vq = tiny_vqgan()
    hashed = _hashed_inputs(monkeypatch)
    out = st.build_store(f.parent, tmp_path / "s", vq, chunk_size=2, progress=False)
    (rec,) = json.loads((out / st.MANIFEST).read_text())["inputs"]
    assert hashed == ["a.hdf5"] and rec["sha256"] == _sha256(f) and rec["size"] == f.stat().st_size
    assert rec["mtime_ns"] == f.stat().st_mtime_ns and rec["rotation"] == "none" and rec["instruction"] == "push"
    st.build_store(f.parent, out, vq, chunk_size=2, progress=False)
    assert hashed == ["a.hdf5"]  # unchanged size and mtime: not hashed again
    # The folder copied elsewhere (new mtimes): hashed once, and the shards are kept.
    shutil.copytree(f.parent, tmp_path / "copy", copy_function=shutil.copyfile)
    vq_count = counting(vq)
    st.build_store(tmp_path / "copy", out, vq_count, chunk_size=2, progress=False)
    assert hashed == ["a.hdf5"] * 2 and CountingVQGAN.frames == 0
    # A manifest written before the digests were recorded: accepted, its records completed.
    m = json.loads((out / st.MANIFEST).read_text())
    m["inputs"] = [{"path": r["path"], "size": r["size"]} for r in m["inputs"]]
    (out / st.MANIFEST).write_text(json.dumps(m))
    st.build_store(f.parent, out, vq, chunk_size=2, progress=False)
    assert json.loads((out / st.MANIFEST).read_text())["inputs"][0]["sha256"] == rec["sha256"]
    size = f.stat().st_size
    write_demos(f, random_demos(np.random.default_rng(1), (5, 4)), "push", compression=None)
    assert f.stat().st_size == size and _sha256(f) != rec["sha256"]
    with pytest.raises(FileExistsError, match=f"{f} \\(its content changed\\).*--overwrite"):
        st.build_store(f.parent, out, vq, chunk_size=2, progress=False)
    st.build_store(f.parent, out, vq, chunk_size=2, overwrite=True, progress=False)
    fresh = st.build_store(f.parent, tmp_path / "fresh", vq, chunk_size=2, progress=False)
    a, b = st.TokenStore(out), st.TokenStore(fresh)
    assert len(a) == len(b) and all(torch.equal(a[i][0], b[i][0]) for i in range(len(a)))


def test_the_fingerprint_keeps_its_terms(demo_dir, tmp_path):
    """Trainers resuming a run compare the store's fingerprint: the digests, rotations and instructions recorded
    per input stay out of it, so stores built before them keep theirs."""
    import hashlib

    folder, _ = demo_dir
    vq = tiny_vqgan()
    out = st.build_store(folder, tmp_path / "s", vq, chunk_size=K, progress=False)
    m = json.loads((out / st.MANIFEST).read_text())
    settings = {k: v for k, v in m["settings"].items() if k != "instruction"}
    assert settings == {"chunk_size": K, "history": 2, "action": True, "world": True, "demos_per_shard": 0,
                        "only_success": True, "camera": None, "rotate_180": None, "drop_noops": False}
    files = st.find_demo_files(folder)
    want = hashlib.sha256(json.dumps(
        {"version": 1, "settings": settings, "layout": m["layout"], "low": m["action"]["low"],
         "high": m["action"]["high"], "vqgan": st._state_dict_digest(vq),
         "inputs": [(p.name, p.stat().st_size) for p in files]}, sort_keys=True).encode()).hexdigest()
    assert m["fingerprint"] == want


def test_another_text_tokenizer_file_is_not_taken_for_the_one_the_store_was_built_with(demo_dir, tmp_path):
    """The chameleon layout holds the tokenizer's image ids, not its text vocabulary: a rerun with another
    text_tokenizer.json of the same image ids reused the shards tokenized with the old text, silently."""
    folder, _ = demo_dir
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    tok = _release_text_tokenizer(tmp_path / "a" / "text_tokenizer.json")
    other = tmp_path / "b" / "text_tokenizer.json"
    other.write_text(tok.read_text().replace('"push": 9000', '"push": 9002'))
    vq = tiny_vqgan()
    out = st.build_store(folder, tmp_path / "s", vq, layout="chameleon", tokenizer_json=tok, chunk_size=K,
                         progress=False)
    assert json.loads((out / st.MANIFEST).read_text())["text_tokenizer_sha256"] == _sha256(tok)
    st.build_store(folder, out, vq, layout="chameleon", tokenizer_json=tok, chunk_size=K, progress=False)
    with pytest.raises(FileExistsError, match=f"{other} \\(the text tokenizer.*--overwrite"):
        st.build_store(folder, out, vq, layout="chameleon", tokenizer_json=other, chunk_size=K, progress=False)
    st.build_store(folder, out, vq, layout="chameleon", tokenizer_json=other, chunk_size=K, overwrite=True,
                   progress=False)
    assert (out / st.TEXT_TOKENIZER).read_bytes() == other.read_bytes()


def _robomimic_file(path, env_name, rng, T=5):
    """robomimic's layout: obs/<camera>_image, no instruction, env_args naming the environment."""
    import h5py

    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        d = f.create_group("data")
        if env_name:
            d.attrs["env_args"] = json.dumps({"env_name": env_name, "type": 1})
        d.create_dataset("demo_0/obs/agentview_image", data=rng.integers(0, 256, (T, 32, 32, 3), dtype=np.uint8))
        d.create_dataset("demo_0/actions", data=rng.uniform(-1, 1, (T, 7)).astype(np.float32))
    return path


def _prompt(store, i=0):
    ids = store[i][0].tolist()
    return ByteTextTokenizer(store.layout).decode(ids)


def test_files_without_an_instruction_are_named_and_instruction_overrides_them(tmp_path, capsys):
    """robomimic's files (all named image.hdf5) were prompted with "image", silently. Their env name is the guess
    now, with a line per file naming --instruction; --instruction prompts every demo; a file with no instruction and
    nothing to guess it from is refused."""
    rng = np.random.default_rng(0)
    _robomimic_file(tmp_path / "d" / "lift" / "ph" / "image.hdf5", "Lift", rng)
    _robomimic_file(tmp_path / "d" / "can" / "ph" / "image.hdf5", "PickPlaceCan", rng)
    vq = tiny_vqgan()
    out = st.build_store(tmp_path / "d", tmp_path / "s", vq, chunk_size=2, world=False, progress=False)
    lines = [x for x in capsys.readouterr().out.splitlines() if "no instruction" in x]
    assert len(lines) == 2 and all("env name" in x and "--instruction" in x for x in lines)
    store = st.TokenStore(out)
    assert {_prompt(store, i).split("take to ")[-1].split("?")[0] for i in range(len(store))} == \
        {"pick place can", "lift"}
    assert [r["instruction_from"] for r in store.manifest["inputs"]] == ["env name"] * 2
    with pytest.raises(FileExistsError, match="its instruction 'pick place can' then, 'stack the cubes' now"):
        st.build_store(tmp_path / "d", out, vq, chunk_size=2, world=False, instruction="stack the cubes",
                       progress=False)
    st.build_store(tmp_path / "d", out, vq, chunk_size=2, world=False, instruction="stack the cubes", overwrite=True,
                   progress=False)
    assert "no instruction" not in capsys.readouterr().out
    store = st.TokenStore(out)
    assert all("stack the cubes" in _prompt(store, i) for i in range(len(store)))
    assert store.manifest["settings"]["instruction"] == "stack the cubes"
    _robomimic_file(tmp_path / "e" / "image.hdf5", None, rng)
    with pytest.raises(ValueError, match="image.hdf5 holds no instruction.*--instruction TEXT"):
        st.build_store(tmp_path / "e", tmp_path / "s2", vq, chunk_size=2, progress=False)
    with pytest.raises(ValueError, match="--instruction must be a non-empty text"):
        st.build_store(tmp_path / "e", tmp_path / "s2", vq, chunk_size=2, instruction=" ", progress=False)
    p = argparse.ArgumentParser()
    st.add_arguments(p)
    assert p.parse_args([".", "--out", "o", "--vqgan", "v", "--instruction", "lift it"]).instruction == "lift it"


def test_auto_bounds_keep_unit_only_when_every_dimension_reaches_half_of_it(tmp_path, capsys):
    """Small deltas (+-0.02) inside [-1, 1] got unit bounds under auto: about 5 of the 256 bins, silently."""
    rng = np.random.default_rng(0)
    acts = np.concatenate([rng.uniform(-0.02, 0.02, (40, 3)), rng.choice([-1.0, 1.0], (40, 1))], 1)
    frames = rng.integers(0, 256, (40, 32, 32, 3), dtype=np.uint8)
    files = [write_demos(tmp_path / "small" / "a.hdf5", [{"frames": frames, "actions": acts}], "wipe")]
    low, high = st.action_bounds("auto", files, 4)
    np.testing.assert_allclose(low, acts.min(0))
    np.testing.assert_allclose(high, acts.max(0))
    out = capsys.readouterr().out
    assert len(out.strip().splitlines()) == 1 and "dimension(s) 0, 1, 2" in out and "--action-bounds unit" in out
    assert st.action_bounds("unit", files, 4) == ([-1.0] * 4, [1.0] * 4)
    acts[0, :3] = [0.5, -0.6, 0.9]  # every dimension reaches 0.5: unit, silently
    files = [write_demos(tmp_path / "wide" / "a.hdf5", [{"frames": frames, "actions": acts}], "wipe")]
    assert st.action_bounds("auto", files, 4) == ([-1.0] * 4, [1.0] * 4)
    assert capsys.readouterr().out == ""


def test_a_demo_without_actions_is_named_by_file_and_demo(tmp_path):
    """A demo without an `actions` dataset was reported as "-K 5 is longer than every demo (the longest has 0
    steps) ... choose -K <= 0"."""
    import h5py

    path = tmp_path / "d" / "a.hdf5"
    path.parent.mkdir()
    with h5py.File(path, "w") as f:
        d = f.create_group("data")
        d.attrs["instruction"], d.attrs["upright"] = "x", True
        d.create_dataset("demo_0/obs/agentview_rgb", data=np.zeros((4, 32, 32, 3), np.uint8))
    for world in (True, False):
        with pytest.raises(ValueError, match=f"{path}:data/demo_0: missing the 'actions' dataset"):
            st.build_store(tmp_path / "d", tmp_path / "s", tiny_vqgan(), chunk_size=5, world=world, progress=False)


def test_temporary_shard_folders_of_killed_builds_are_removed(demo_dir, tmp_path, monkeypatch):
    """A build killed while writing a shard left .shard_00000.tmp-<pid>-<hex> (before `new_sibling`,
    .shard_00000.tmp-<pid>) in the store for good. A rerun removes those of processes that no longer run and this
    process's (an interrupted earlier call), and keeps a running build's. A build names its temporary folders as
    `replace_folder` does (`checkpoint.new_sibling`), for the one helper that removes both (`remove_stale`)."""
    import re
    import subprocess
    import sys

    folder, _ = demo_dir
    renamed = []
    replace = os.replace
    monkeypatch.setattr(st.os, "replace", lambda src, dst: renamed.append(os.path.basename(src)) or replace(src, dst))
    out = st.build_store(folder, tmp_path / "s", tiny_vqgan(), chunk_size=K, progress=False)
    shard_tmps = [n for n in renamed if n.startswith(".shard_")]
    assert shard_tmps and all(re.fullmatch(rf"\.shard_\d+\.tmp-{os.getpid()}-[0-9a-f]{{12}}", n) for n in shard_tmps)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    dead = [out / f".shard_00000.tmp-{gone.pid}-0123456789ab", out / f".shard_00001.tmp-{2 ** 22 + 12345}",
            out / f".shard_00002.tmp-{os.getpid()}-0123456789ab"]
    live = out / f".shard_00001.tmp-{os.getppid()}-0123456789ab"
    for p in (*dead, live):
        p.mkdir()
        (p / "tokens.npy").write_bytes(b"half")
    st.build_store(folder, out, tiny_vqgan(), chunk_size=K, progress=False)
    assert not any(p.exists() for p in dead) and live.is_dir()


def _turned_inputs(folder, seed):
    """Three demo files in `folder`: LIBERO's layout marked 'opengl' (gl.hdf5) and 'opencv' (cv.hdf5), and one
    of worldvla's own (ours.hdf5)."""
    import h5py

    rng = np.random.default_rng(seed)
    frames = rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    for name, convention in (("gl.hdf5", "opengl"), ("cv.hdf5", "opencv")):
        path = _own_robot_file(folder / name, rng.uniform(-1, 1, (4, 4)), frames)
        with h5py.File(path, "a") as f:
            f["data"].attrs["macros_image_convention"] = convention
    write_demos(folder / "ours.hdf5", [{"frames": frames, "actions": rng.uniform(-1, 1, (4, 4))}], "x")


def test_the_manifest_records_how_each_inputs_frames_were_turned(tmp_path, capsys):
    """A store did not say how its frames were turned; LIBERO's files of macros_image_convention 'opencv' are
    mirrored left-right (the release's view), those of 'opengl' rotated by 180 degrees, each named in the note."""
    _turned_inputs(tmp_path / "d", seed=2)
    out = st.build_store(tmp_path / "d", tmp_path / "s", tiny_vqgan(), chunk_size=2, progress=False)
    note = capsys.readouterr().out
    assert "(gl.hdf5) are rotated by 180 degrees" in note and "(cv.hdf5) are mirrored left-right" in note
    rotation = {os.path.basename(r["path"]): r["rotation"] for r in st.TokenStore(out).manifest["inputs"]}
    assert rotation == {"gl.hdf5": "rotated_180", "cv.hdf5": "mirrored", "ours.hdf5": "none"}
    out = st.build_store(tmp_path / "d", tmp_path / "s2", tiny_vqgan(), chunk_size=2, rotate_180=True, progress=False)
    assert {r["rotation"] for r in st.TokenStore(out).manifest["inputs"]} == {"rotated_180"}


def test_the_rotation_note_reuses_the_turns_the_inputs_records_read(tmp_path, capsys, monkeypatch):
    """build_store read each input's turn for its manifest (`reading_record`) and then opened every file again for
    the same turn to word the rotation note (`rotation_note` -> `frame_turn`); the note is made from the records."""
    from worldvla.data import hdf5

    _turned_inputs(tmp_path / "d", seed=3)
    want = hdf5.rotation_note(st.find_demo_files(tmp_path / "d"))
    turned = []
    frame_turn = hdf5.frame_turn
    monkeypatch.setattr(hdf5, "frame_turn", lambda *a, **k: turned.append(a) or frame_turn(*a, **k))
    st.build_store(tmp_path / "d", tmp_path / "s", tiny_vqgan(), chunk_size=2, progress=False)
    assert turned == [] and want in capsys.readouterr().out.splitlines()


def test_libero_files_prompted_by_their_names_are_said_in_one_line(tmp_path, capsys):
    """LIBERO's regenerated files (a suite's worth: 10 to 90 of them) take their task's name from the file name, as
    the release does: one line says so for all of them, naming one, not a line per file."""
    import h5py

    rng = np.random.default_rng(0)
    names = ["put_the_bowl_on_the_plate_demo", "open_the_top_drawer_demo", "turn_on_the_stove_demo"]
    (tmp_path / "d").mkdir()
    for name in names:  # the regenerated files' layout: LIBERO's camera names, no attributes
        with h5py.File(tmp_path / "d" / f"{name}.hdf5", "w") as f:
            f.create_dataset("data/demo_0/obs/agentview_rgb", data=rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8))
            f.create_dataset("data/demo_0/actions", data=rng.uniform(-1, 1, (4, 7)).astype(np.float32))
    st.build_store(tmp_path / "d", tmp_path / "s", tiny_vqgan(), chunk_size=2, world=False, progress=False)
    lines = [x for x in capsys.readouterr().out.splitlines() if "no instruction" in x]
    assert len(lines) == 1, lines
    assert "3 LIBERO file(s)" in lines[0] and "from the file name, as the release does" in lines[0]
    assert "and 2 more" in lines[0]
    store = st.TokenStore(tmp_path / "s")
    prompts = {_prompt(store, i).split("take to ")[-1].split("?")[0] for i in range(len(store))}
    assert prompts == {"put the bowl on the plate", "open the top drawer", "turn on the stove"}


def test_label_count_negative_indices_and_an_exactly_full_pack(demo_dir, tmp_path):
    folder, _ = demo_dir
    out = st.build_store(folder, tmp_path / "s", tiny_vqgan(), chunk_size=K, progress=False)
    store = st.TokenStore(out)
    n = len(store)
    m = json.loads((out / st.MANIFEST).read_text())
    assert m["n_label_tokens"] == sum(int((store[i][1] != -100).sum()) for i in range(n))
    for i in (1, n):
        (ids, labels, kind), (ids2, labels2, kind2) = store[-i], store[n - i]
        assert torch.equal(ids, ids2) and torch.equal(labels, labels2) and kind == kind2
    with pytest.raises(IndexError):
        store[-n - 1]
    samples = [store[0], store[1]]
    total = sum(len(s[0]) for s in samples)
    ids, _, cu = st.pack(samples, total, pad_id=1)  # the budget is full: no (empty) padding document
    assert ids.numel() == total and cu.tolist() == [0, len(samples[0][0]), total]


def test_a_shard_whose_arrays_disagree_in_length_is_refused(demo_dir, tmp_path):
    folder, _ = demo_dir
    out = st.build_store(folder, tmp_path / "s", tiny_vqgan(), chunk_size=K, progress=False)
    kinds = out / "shard_00000" / "kinds.npy"
    np.save(kinds, np.load(kinds)[:-1])  # a readable .npy, one sample short
    with pytest.raises(ValueError, match="do not fit together"):
        st.TokenStore(out)


def test_libero_bounds_stored_as_float32_are_not_counted_as_clipped(tmp_path, capsys):
    rng = np.random.default_rng(1)
    acts = rng.uniform(np.array(st.LIBERO_MIN), np.array(st.LIBERO_MAX), (200, 7))
    acts[:50] = np.array(st.LIBERO_MIN)  # a quarter of the steps at the lower bounds (float32 in the file)
    files = [_own_robot_file(tmp_path / "libero" / "a.hdf5", acts)]
    assert st.action_bounds("auto", files, 7) == (list(st.LIBERO_MIN), list(st.LIBERO_MAX))
    assert capsys.readouterr().out == ""


def test_auto_bounds_are_unit_when_actions_touch_minus_one(tmp_path):
    rng = np.random.default_rng(2)
    d = random_demos(rng, (6,))
    d[0]["actions"] = (d[0]["actions"] * 0.5).astype(np.float32)
    d[0]["actions"][1] = [0.8, -0.7, 0.6, 0.5]  # every dimension reaches half of [-1, 1] (auto's unit rule)
    d[0]["actions"][0, 3] = -1.0  # a closed gripper, exactly -1 (Meta-World's gripper commands are +-1)
    write_demos(tmp_path / "d" / "a.hdf5", d, "reach")
    assert st.action_bounds("auto", st.find_demo_files(tmp_path / "d"), 4) == ([-1.0] * 4, [1.0] * 4)


def test_shards_name_only_the_demos_their_file_holds(tmp_path):
    rng = np.random.default_rng(6)
    write_demos(tmp_path / "d" / "a.hdf5", random_demos(rng, (4, 4, 4)), "reach")
    out = st.build_store(tmp_path / "d", tmp_path / "s", tiny_vqgan(), chunk_size=2, world=False, demos_per_shard=2,
                         progress=False)
    assert [e["demos"] for e in json.loads((out / st.MANIFEST).read_text())["shards"]] == [[0, 2], [2, 3]]


def test_a_chunk_one_step_longer_than_every_demo_is_refused_before_any_work(tmp_path):
    rng = np.random.default_rng(3)
    write_demos(tmp_path / "x" / "a.hdf5", random_demos(rng, (5,)), "reach")
    with pytest.raises(ValueError, match=r"-K 6 is longer than every demo \(the longest has 5 steps\)"):
        st.build_store(tmp_path / "x", tmp_path / "s", tiny_vqgan(), chunk_size=6, progress=False)
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("action", [True, False])
def test_each_input_files_info_is_read_once_per_build(demo_dir, tmp_path, monkeypatch, action):
    """build_store read every input's `demo_file_info` four times (the chunk check, the shard plan, the sim camera
    and the demos' ordinals), each opening the file again for the same metadata; it is read once and handed on."""
    from worldvla.data import hdf5

    folder, _ = demo_dir
    read = []
    demo_file_info = hdf5.demo_file_info
    monkeypatch.setattr(hdf5, "demo_file_info", lambda path: read.append(path.name) or demo_file_info(path))
    out = st.build_store(folder, tmp_path / "s", tiny_vqgan(), chunk_size=K, action=action, progress=False)
    assert sorted(read) == ["a.hdf5", "b.h5"]
    assert st.TokenStore(out).manifest["n_samples"] > 0


@pytest.mark.parametrize("edit, said", [
    (lambda m: m.pop("layout"), "has no 'layout'"),
    (lambda m: m["shards"][0].pop("n_samples"), r"has a shard entry 0 \(shard_00000\) that has no 'n_samples'"),
    (lambda m: m["action"].pop("chunk_size"), "has no 'chunk_size' in its 'action'"),
    (lambda m: m["layout"].pop("bos"), "has a 'layout' that is not a vocabulary layout"),
])
def test_a_manifest_without_a_key_the_reader_takes_is_named_with_the_fix(demo_dir, tmp_path, edit, said):
    """A manifest that is valid JSON but lacks a key (edited by hand, another version's) was a bare KeyError
    ('layout', 'n_samples') from TokenStore; the rebuild it advises (the same arguments and --overwrite) works."""
    folder, _ = demo_dir
    out = st.build_store(folder, tmp_path / "s", tiny_vqgan(), chunk_size=K, progress=False)
    n = len(st.TokenStore(out))
    mpath = out / st.MANIFEST
    m = json.loads(mpath.read_text())
    edit(m)
    mpath.write_text(json.dumps(m))
    with pytest.raises(ValueError, match=f"{mpath}: the token store manifest {said} .*rerunning `worldvla "
                                         f"pretokenize` with the same arguments and --overwrite"):
        st.TokenStore(out)
    st.build_store(folder, out, tiny_vqgan(), chunk_size=K, overwrite=True, progress=False)
    assert len(st.TokenStore(out, verify=True)) == n


def test_a_resumed_build_rebuilds_a_shard_whose_entry_lacks_a_key(demo_dir, tmp_path):
    folder, _ = demo_dir
    out = st.build_store(folder, tmp_path / "s", tiny_vqgan(), chunk_size=K, progress=False)
    mpath = out / st.MANIFEST
    m = json.loads(mpath.read_text())
    n, entry = m["n_samples"], m["shards"][1]
    del entry["n_samples"]
    mpath.write_text(json.dumps(m))
    st.build_store(folder, out, tiny_vqgan(), chunk_size=K, progress=False)
    assert json.loads(mpath.read_text())["shards"][1] == {**entry, "n_samples": entry["n_action"] + entry["n_world"]}
    assert len(st.TokenStore(out, verify=True)) == n


def test_inputs_without_a_successful_demo_are_refused_before_any_work_naming_the_flag(tmp_path, capsys,
                                                                                       monkeypatch):
    """Demos all marked failed: the error came after the whole build (frames read and encoded, shards written) and
    said "pass only_success=False", a Python argument, to the command line's users (the flag: --include-failed)."""
    from worldvla.cli import main

    monkeypatch.delenv("WORLDVLA_TRACEBACK", raising=False)
    rng = np.random.default_rng(4)
    write_demos(tmp_path / "d" / "a.hdf5", random_demos(rng, (4, 5), success=[False, False]), "reach")
    tiny_vqgan().save_pretrained(tmp_path / "vq")
    vq = counting(tiny_vqgan())
    with pytest.raises(ValueError, match=r"none of the 2 demos in 1 demo file\(s\) is marked successful.*pass "
                                         r"--include-failed \(only_success=False from Python\)"):
        st.build_store(tmp_path / "d", tmp_path / "s", vq, chunk_size=K, bounds="unit", progress=False)
    assert CountingVQGAN.frames == 0 and not (tmp_path / "s").exists()
    assert main(["pretokenize", str(tmp_path / "d"), "--out", str(tmp_path / "s"), "--vqgan", str(tmp_path / "vq"),
                 "--action-bounds", "unit", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "pass --include-failed" in err and "Traceback" not in err and not (tmp_path / "s").exists()
    st.build_store(tmp_path / "d", tmp_path / "s", vq, chunk_size=K, only_success=False, progress=False)
    # Demos too short for any sample (world samples need 2 steps): still found by the build, named with the flag.
    write_demos(tmp_path / "e" / "a.hdf5", random_demos(rng, (1, 1)), "reach")
    with pytest.raises(ValueError, match=r"no samples were built.*--include-failed, only_success=False from Python"):
        st.build_store(tmp_path / "e", tmp_path / "t", tiny_vqgan(), action=False, progress=False)


def test_a_vqgan_path_that_is_a_file_is_named_as_one(demo_dir, tmp_path, capsys, monkeypatch):
    """`--vqgan <run>/vqgan/config.json` said "the VQGAN folder ... is missing", of a path that is there."""
    from worldvla.cli import main

    monkeypatch.delenv("WORLDVLA_TRACEBACK", raising=False)
    folder, _ = demo_dir
    tiny_vqgan().save_pretrained(tmp_path / "vq")
    config = tmp_path / "vq" / "config.json"
    assert main(["pretokenize", str(folder), "--out", str(tmp_path / "s"), "--vqgan", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is missing" not in err
    assert (f"the VQGAN path {config} is a file, not a folder; pass the folder that holds config.json and "
            f"model.safetensors" in err and f"{tmp_path / 'vq'}, which holds it, is one" in err)


@pytest.mark.parametrize("content, said", [
    ('{"a":\n', "not a valid JSON file"),
    (json.dumps({"architectures": ["ChameleonForConditionalGeneration"], "hidden_size": 64}),
     r"no model.vocab object, so this is not a text tokenizer file \(top-level keys: architectures, hidden_size\)"),
])
def test_a_text_tokenizer_json_of_another_kind_is_refused_before_any_work(demo_dir, tmp_path, content, said):
    """--layout chameleon --tokenizer-json <a model's config.json> was a bare KeyError: 'model'; a damaged file
    json's "Expecting value: line 2 column 1", naming neither the file nor what it should be."""
    folder, _ = demo_dir
    bad = tmp_path / "tok.json"
    bad.write_text(content)
    vq = counting(tiny_vqgan())
    with pytest.raises(ValueError, match=f"{bad}: {said}.*expected the release's text_tokenizer.json"):
        st.build_store(folder, tmp_path / "s", vq, layout="chameleon", tokenizer_json=bad, chunk_size=K,
                       progress=False)
    assert CountingVQGAN.frames == 0 and not (tmp_path / "s").exists()


def test_a_chameleon_layout_object_takes_the_image_ids_of_the_tokenizer_json(tmp_path):
    """layout=VocabLayout.chameleon() with tokenizer_json kept the assumed map code c -> id 4 + c while the store
    copied the tokenizer in, and the policy rebuilds the map from that file (with_release_image_ids): training and
    inference gave the images other ids. The object now takes the file's map, as layout="chameleon" does."""
    from worldvla.tokens import ChameleonTextTokenizer
    from worldvla.tokens.layout import with_release_image_ids

    tok = _release_text_tokenizer(tmp_path / "text_tokenizer.json")
    doc = json.loads(tok.read_text())
    perm = np.random.default_rng(0).permutation(8192).tolist()  # image tokens not in code order
    doc["model"]["vocab"].update({"IMGIMG" + "".join("ABCDEFGHIJ"[int(c)] for c in str(code)) + "Z": 4 + slot
                                  for slot, code in enumerate(perm)})
    tok.write_text(json.dumps(doc))
    write_demos(tmp_path / "in" / "a.hdf5", random_demos(np.random.default_rng(1), (4,)), "push")
    vq = tiny_vqgan()
    by_name = st.TokenStore(st.build_store(tmp_path / "in", tmp_path / "s_str", vq, layout="chameleon",
                                           tokenizer_json=tok, chunk_size=2, progress=False))
    by_object = st.TokenStore(st.build_store(tmp_path / "in", tmp_path / "s_obj", vq, layout=VocabLayout.chameleon(),
                                             tokenizer_json=tok, chunk_size=2, progress=False))
    assert by_object.layout.image_code_ids == VocabLayout.chameleon(tok).image_code_ids != \
        VocabLayout.chameleon().image_code_ids
    at_inference = with_release_image_ids(by_object.layout, ChameleonTextTokenizer(by_object.text_tokenizer_path))
    assert at_inference == by_object.layout
    assert [by_object[i][0].tolist() for i in range(len(by_object))] == \
        [by_name[i][0].tolist() for i in range(len(by_name))]


@pytest.mark.parametrize("bounds", ["auto", "data", "unit"])
def test_input_files_of_other_action_widths_are_refused_naming_the_demo(tmp_path, bounds):
    """Files of 4-D and 3-D actions under --action-bounds auto / data gave numpy's bare concatenate error (the
    actions were pooled for the bounds before the per-demo check): now each bounds mode names the file and demo."""
    rng = np.random.default_rng(1)
    write_demos(tmp_path / "in" / "a.hdf5", random_demos(rng, (5, 5)), "push the block")
    write_demos(tmp_path / "in" / "b.hdf5", random_demos(rng, (5,), dim=3), "open the drawer")
    with pytest.raises(ValueError, match=r"b\.hdf5:demo_0 has 3-D actions, the store 4-D.*one store per action width"):
        st.build_store(tmp_path / "in", tmp_path / "s", tiny_vqgan(), chunk_size=2, bounds=bounds, progress=False)


def test_a_failed_demo_the_store_skips_does_not_set_its_frame_size_or_action_width(tmp_path):
    """The store's frame size and action width were taken from the file's first demo, a failed one it skips, and
    every demo was checked against them: the successful demos were refused. They come from the first demo tokenized
    now, and only the demos tokenized are checked."""
    rng = np.random.default_rng(1)
    failed = random_demos(rng, (5,), size=64, success=[False], dim=3)
    write_demos(tmp_path / "in" / "a.hdf5", failed + random_demos(rng, (5, 6)), "push the block")
    vq = tiny_vqgan()
    for bounds in ("unit", "auto"):
        store = st.TokenStore(st.build_store(tmp_path / "in", tmp_path / f"s_{bounds}", vq, chunk_size=2,
                                             bounds=bounds, progress=False))
        assert store.image_size == (32, 32) and store.manifest["action"]["dim"] == 4
        assert {int(d) for si in range(len(store.shards)) for d in store._shard(si)["index"][:, 0]} == {1, 2}
    with pytest.raises(ValueError, match=r"a\.hdf5:demo_1 has 32x32 frames but the store uses 64x64"):
        st.build_store(tmp_path / "in", tmp_path / "s_all", vq, chunk_size=2, bounds="unit", only_success=False,
                       progress=False)


def test_a_file_with_an_empty_instruction_is_refused_like_one_with_none(tmp_path):
    """An empty instruction was taken as it was: the store's prompts read "What action should the robot take to ?".
    It is the "none" case now, refused naming --instruction."""
    import h5py

    path = write_demos(tmp_path / "in" / "a.hdf5", random_demos(np.random.default_rng(1), (5,)), "push")
    with h5py.File(path, "a") as f:
        f["data"].attrs["instruction"] = " "
        f["data/demo_0"].attrs["instruction"] = ""
    vq = tiny_vqgan()
    with pytest.raises(ValueError, match="a.hdf5 holds no instruction.*only empty ones.*--instruction TEXT"):
        st.build_store(tmp_path / "in", tmp_path / "s", vq, chunk_size=2, progress=False)
    store = st.TokenStore(st.build_store(tmp_path / "in", tmp_path / "s", vq, chunk_size=2, instruction="push it",
                                         progress=False))
    assert "take to push it?" in _prompt(store)


def test_a_build_killed_while_replacing_the_text_tokenizer_leaves_no_complete_store_beside_it(tmp_path, monkeypatch):
    """With overwrite the VQGAN and text_tokenizer.json were replaced before the manifest was rewritten incomplete:
    a kill in between left the old complete manifest beside the new tokenizer, read as a whole store. The manifest
    goes first now, and the reader checks the file against the manifest's text_tokenizer_sha256."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    tok = _release_text_tokenizer(tmp_path / "a" / "text_tokenizer.json")
    other = tmp_path / "b" / "text_tokenizer.json"
    other.write_text(tok.read_text().replace('"push": 9000', '"push": 9002'))
    write_demos(tmp_path / "in" / "a.hdf5", random_demos(np.random.default_rng(1), (5, 5)), "push")
    vq = tiny_vqgan()
    out = st.build_store(tmp_path / "in", tmp_path / "s", vq, layout="chameleon", tokenizer_json=tok, chunk_size=2,
                         progress=False)

    def killed(*a, **k):
        raise KeyboardInterrupt("killed")

    with monkeypatch.context() as m:  # killed at the first manifest write: nothing replaced yet
        m.setattr(st, "_atomic_json", killed)
        with pytest.raises(KeyboardInterrupt):
            st.build_store(tmp_path / "in", out, vq, layout="chameleon", tokenizer_json=other, chunk_size=2,
                           overwrite=True, progress=False)
    store = st.TokenStore(out, verify=True)
    assert store.text_tokenizer_path.read_bytes() == tok.read_bytes()
    with monkeypatch.context() as m:  # killed after the tokenizer was replaced: the store is incomplete
        m.setattr(st, "_write_shard", killed)
        with pytest.raises(KeyboardInterrupt):
            st.build_store(tmp_path / "in", out, vq, layout="chameleon", tokenizer_json=other, chunk_size=2,
                           overwrite=True, progress=False)
    assert (out / st.TEXT_TOKENIZER).read_bytes() == other.read_bytes()
    with pytest.raises(ValueError, match="incomplete"):
        st.TokenStore(out)
    st.build_store(tmp_path / "in", out, vq, layout="chameleon", tokenizer_json=tok, chunk_size=2, overwrite=True,
                   progress=False)
    (out / st.TEXT_TOKENIZER).write_bytes(other.read_bytes())  # the file replaced under a complete manifest
    with pytest.raises(ValueError, match="text_tokenizer_sha256.*must be rebuilt.*--overwrite"):
        st.TokenStore(out).text_tokenizer_path
    with pytest.raises(ValueError, match="not the text tokenizer the token store"):
        st.TokenStore(out, verify=True)


def _store_bytes(out):
    """A store's manifest (less its creation time) and the bytes of every file of its shards, by name."""
    m = json.loads((out / st.MANIFEST).read_text())
    m.pop("created")
    shards = {f"{e['name']}/{n}": (out / e["name"] / n).read_bytes() for e in m["shards"] for n in e["files"]}
    return m, shards


def test_a_resumed_build_reads_no_frames_of_the_demos_of_its_finished_shards(tmp_path, monkeypatch):
    """A resumed build read every demo of a file (and the first demo once more, for the store's frame size) to
    tokenize those of its unfinished shards only. It reads only theirs now, and builds the same store, byte for
    byte, as a build that was not interrupted."""
    from worldvla.data import hdf5

    rng = np.random.default_rng(11)
    write_demos(tmp_path / "d" / "a.hdf5", random_demos(rng, (4, 5, 3, 6)), "push")
    write_demos(tmp_path / "d" / "b.hdf5", random_demos(rng, (5, 4)), "reach")
    vq = tiny_vqgan()
    kw = dict(chunk_size=2, demos_per_shard=1, progress=False)
    real_write, real_read = st._write_shard, hdf5._read_one
    written, read = [], []

    def crash_on_fourth(path, samples):
        written.append(path.name)
        if len(written) == 4:
            raise KeyboardInterrupt("simulated crash")
        return real_write(path, samples)

    def reading(g, where, *a, **k):
        read.append(os.path.relpath(where, tmp_path / "d"))  # <file>:data/<demo>
        return real_read(g, where, *a, **k)

    monkeypatch.setattr(hdf5, "_read_one", reading)
    with monkeypatch.context() as m:
        m.setattr(st, "_write_shard", crash_on_fourth)
        with pytest.raises(KeyboardInterrupt):
            st.build_store(tmp_path / "d", tmp_path / "s", vq, **kw)
    assert [e["name"] for e in json.loads((tmp_path / "s" / st.MANIFEST).read_text())["shards"]] == \
        ["shard_00000", "shard_00001", "shard_00002"]
    read.clear()
    st.build_store(tmp_path / "d", tmp_path / "s", vq, **kw)
    assert read == ["a.hdf5:data/demo_3", "b.hdf5:data/demo_0", "b.hdf5:data/demo_1"]
    read.clear()
    st.build_store(tmp_path / "d", tmp_path / "ref", vq, **kw)
    assert len(read) == 6  # a straight build reads each demo once
    assert _store_bytes(tmp_path / "s") == _store_bytes(tmp_path / "ref")
    st.TokenStore(tmp_path / "s", verify=True)


def test_overwrite_with_fewer_shards_removes_the_old_ones_only_once_the_old_store_is_replaced(demo_dir, tmp_path,
                                                                                              monkeypatch):
    """--overwrite with fewer shards (a larger --demos-per-shard, fewer files) left the old store's other shard
    folders on disk, unused. They go once the build has replaced the old manifest with its own, incomplete one:
    a build killed after that leaves a store the reader refuses as incomplete, whose manifest names no missing
    shard. A folder named like a shard that holds anything else is not the store's and is kept."""
    folder, _ = demo_dir
    vq = tiny_vqgan()
    out = st.build_store(folder, tmp_path / "s", vq, chunk_size=K, demos_per_shard=1, progress=False)
    assert sorted(p.name for p in out.glob("shard_*")) == [f"shard_0000{i}" for i in range(4)]
    (out / "shard_00009").mkdir()
    (out / "shard_00009" / "notes.txt").write_text("mine")
    (out / "shard_00003" / "extra.npy").write_bytes(b"")  # not a file the store writes: the folder is kept

    def killed(*a, **k):
        raise KeyboardInterrupt("killed")

    with monkeypatch.context() as m:
        m.setattr(st, "_write_shard", killed)
        with pytest.raises(KeyboardInterrupt):
            st.build_store(folder, out, vq, chunk_size=K, overwrite=True, progress=False)  # 2 shards: one per file
    m = json.loads((out / st.MANIFEST).read_text())
    assert not m["complete"] and all((out / e["name"] / "done").is_file() for e in m["shards"])
    with pytest.raises(ValueError, match="incomplete"):
        st.TokenStore(out)
    assert sorted(p.name for p in out.glob("shard_*")) == ["shard_00000", "shard_00001", "shard_00003",
                                                           "shard_00009"]
    st.build_store(folder, out, vq, chunk_size=K, overwrite=True, progress=False)
    assert sorted(p.name for p in out.glob("shard_*")) == ["shard_00000", "shard_00001", "shard_00003",
                                                           "shard_00009"]
    (out / "shard_00003" / "extra.npy").unlink()
    st.build_store(folder, out, vq, chunk_size=K, overwrite=True, progress=False)
    assert sorted(p.name for p in out.glob("shard_*")) == ["shard_00000", "shard_00001", "shard_00009"]
    assert (out / "shard_00009" / "notes.txt").read_text() == "mine"
    ref = st.build_store(folder, tmp_path / "ref", vq, chunk_size=K, progress=False)
    assert _store_bytes(out)[1] == _store_bytes(ref)[1]
    st.TokenStore(out, verify=True)


def _noop_demo_file(path, seed: int, noops: list[int]) -> dict:
    """An 8-step random demo whose steps `noops` are no-ops (zero motion, the gripper's dimension kept), written to
    `path`; returns it."""
    (demo,) = random_demos(np.random.default_rng(seed), (8,))
    demo["actions"][:, 3] = 1.0
    demo["actions"][noops, :3] = 0.0
    write_demos(path, [demo], "push")
    return demo


def test_world_samples_under_drop_noops_target_the_frame_each_action_led_to(tmp_path):
    """Under --drop-noops a world sample paired the kept frame I_j and action A_j with the next kept frame, which
    after dropped no-op steps is several steps later: not the frame A_j led to. Its target is now the file's frame
    after step j. The samples stay the release's: j < T - 1 of the kept steps, none after the last."""
    demo = _noop_demo_file(tmp_path / "d" / "a.hdf5", 5, [3, 4, 7])  # no-ops: kept steps 0, 1, 2, 5, 6
    vq = counting(tiny_vqgan())
    out = st.build_store(tmp_path / "d", tmp_path / "s", vq, action=False, bounds="unit", drop_noops=True,
                         progress=False)
    assert CountingVQGAN.frames == 5 + 1  # the kept frames, and frame 3
    store = st.TokenStore(out)
    layout = store.layout
    builder = SequenceBuilder(layout, ByteTextTokenizer(layout), ActionTokenizer(layout, [-1.0] * 4, [1.0] * 4))
    codes = [vq.encode(preprocess(f))[0] for f in demo["frames"]]
    pairs = [(0, 1), (1, 2), (2, 3), (5, 6)]  # (step, the step after it in the file)
    want = [builder.world_sample(codes[t], demo["actions"][t], codes[u]).input_ids.tolist() for t, u in pairs]
    assert [store[i][0].tolist() for i in range(len(store))] == want
    assert np.load(out / "shard_00000" / "index.npy")[:, 1].tolist() == [0, 1, 2, 3]  # j among the steps kept
    # A store built before, whose world samples targeted the next kept frame, is not resumed with shards of both.
    import hashlib

    m = json.loads((out / st.MANIFEST).read_text())
    settings = {k: v for k, v in m["settings"].items() if k != "instruction"}
    m["fingerprint"] = hashlib.sha256(json.dumps(
        {"version": 1, "settings": settings, "layout": m["layout"], "low": m["action"]["low"],
         "high": m["action"]["high"], "vqgan": st._state_dict_digest(vq),
         "inputs": [("a.hdf5", (tmp_path / "d" / "a.hdf5").stat().st_size)]}, sort_keys=True).encode()).hexdigest()
    (out / st.MANIFEST).write_text(json.dumps(m))
    with pytest.raises(FileExistsError, match="overwrite"):
        st.build_store(tmp_path / "d", out, vq, action=False, bounds="unit", drop_noops=True, progress=False)


def test_demo_files_without_any_demo_are_named_not_blamed_on_the_chunk_size(tmp_path, capsys, monkeypatch):
    """A demo file whose `data` group holds no demo (a collection that kept none) was refused as "-K 5 is longer
    than every demo (the longest has 0 steps) ... choose -K <= 0", and under --no-action as holding no successful
    demo, which --include-failed would not change."""
    import h5py

    from worldvla.cli import main

    monkeypatch.delenv("WORLDVLA_TRACEBACK", raising=False)
    path = tmp_path / "d" / "a.hdf5"
    path.parent.mkdir()
    with h5py.File(path, "w") as f:
        f.create_group("data").attrs["instruction"] = "reach"
    for action, world in ((True, True), (False, True)):
        with pytest.raises(ValueError, match=f"{path} holds no demo .*data/demo_0"):
            st.build_store(tmp_path / "d", tmp_path / "s", tiny_vqgan(), chunk_size=5, action=action, world=world,
                           progress=False)
    assert not (tmp_path / "s").exists()  # refused before any work
    tiny_vqgan().save_pretrained(tmp_path / "vq")
    assert main(["pretokenize", str(tmp_path / "d"), "--out", str(tmp_path / "s"), "--vqgan", str(tmp_path / "vq"),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"{path} holds no demo" in err and "-K" not in err and "Traceback" not in err


def test_a_store_built_otherwise_is_refused_naming_what_differs(demo_dir, tmp_path):
    """A rebuild into a store made otherwise said only "built with other settings, inputs or VQGAN", leaving the
    user to guess which: another VQGAN, another -K and another input set are each named."""
    folder, _ = demo_dir
    out = tmp_path / "s"
    st.build_store(folder, out, tiny_vqgan(), chunk_size=K, bounds="unit", progress=False)
    with pytest.raises(FileExistsError, match=r"VQGAN: another VQGAN \(its weights' digest differs\); pass"):
        st.build_store(folder, out, tiny_vqgan(seed=1), chunk_size=K, bounds="unit", progress=False)
    with pytest.raises(FileExistsError, match=rf"VQGAN: chunk_size {K} then, 2 now; pass"):
        st.build_store(folder, out, tiny_vqgan(), chunk_size=2, bounds="unit", progress=False)
    with pytest.raises(FileExistsError, match=r"VQGAN: other input files \(b.h5 no longer given\); pass"):
        st.build_store(folder / "a.hdf5", out, tiny_vqgan(), chunk_size=K, bounds="unit", progress=False)
    # the same build again still continues the store
    st.build_store(folder, out, tiny_vqgan(), chunk_size=K, bounds="unit", progress=False)


def test_a_demo_file_without_demos_beside_others_is_no_refusal(tmp_path):
    """Only inputs that hold no demo at all are refused: an empty file beside one with a single demo builds the store
    of that demo."""
    import h5py

    folder = tmp_path / "d"
    write_demos(folder / "a.hdf5", random_demos(np.random.default_rng(0), (5,)), "push the red block")
    with h5py.File(folder / "b.hdf5", "w") as f:
        f.create_group("data").attrs["instruction"] = "reach"
    store = st.TokenStore(st.build_store(folder, tmp_path / "s", tiny_vqgan(), chunk_size=K, progress=False))
    assert store.kind_counts()["action"] == 5 - K + 1


def test_the_differences_named_are_those_the_old_manifest_records():
    """What a refusal names: each recorded setting, input, bound or layout that differs; what an older manifest does
    not record (a setting added since, no VQGAN digest, no inputs, no layout) is not claimed to differ, nor does a
    missing setting fail the refusal itself."""
    layout = VocabLayout.compact(n_image_codes=64).to_dict()
    terms = {"settings": {"chunk_size": 5, "drop_noops": True}, "vqgan": "v1", "inputs": [("a.hdf5", 120)],
             "low": [-1.0, -1.0], "high": [1.0, 1.0], "layout": layout}
    same = {"settings": {"chunk_size": 5, "drop_noops": True}, "vqgan_sha256": "v1",
            "inputs": [{"path": "/data/a.hdf5", "size": 120}], "action": {"low": [-1.0, -1.0], "high": [1.0, 1.0]},
            "layout": layout}
    assert st._fingerprint_differences(same, terms) == []
    assert st._fingerprint_differences({"settings": {"chunk_size": 5}}, terms) == []
    assert st._fingerprint_differences({}, terms) == []
    assert st._fingerprint_differences({**same, "inputs": [{"path": "/data/a.hdf5", "size": 100}]}, terms) == [
        "other input files (a.hdf5 changed size)"]
    assert st._fingerprint_differences({**same, "action": {"low": [-1.0, -1.0], "high": [1.0, 2.0]}}, terms) == [
        "other action bounds"]
    other = VocabLayout.compact(n_image_codes=128).to_dict()
    assert st._fingerprint_differences({**same, "layout": other}, terms) == ["another vocabulary layout"]


def test_a_train_vq_run_folder_given_as_the_vqgan_names_its_vqgan_folder(demo_dir, tmp_path):
    """`--vqgan <a train-vq run>` said "<run> is not a complete VQGAN folder: config.json, model.safetensors
    missing". The run's folder is named as such now, with <run>/vqgan to give; a run that exported none yet says
    that."""
    folder, _ = demo_dir
    run = tmp_path / "vqrun"
    (run / "checkpoints" / "step_00000002").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=re.escape(f"{run} is a training run's folder")) as e:
        st.build_store(folder, tmp_path / "s", run, chunk_size=K, progress=False)
    assert "no exported VQGAN" in str(e.value) and "--resume" in str(e.value)
    tiny_vqgan().save_pretrained(run / "vqgan")
    with pytest.raises(FileNotFoundError, match=re.escape(f"{run} is a training run's folder")) as e:
        st.build_store(folder, tmp_path / "s", run, chunk_size=K, progress=False)
    assert f"give {run / 'vqgan'}" in str(e.value)


def test_a_store_mismatch_names_the_option_first_and_the_keyword_as_pythons(demo_dir, tmp_path):
    """The mismatch refusal said "pass overwrite=True (--overwrite)", the Python keyword first for a command-line
    user; it now reads as the other messages of the store do: the option, then the keyword "from Python"."""
    folder, _ = demo_dir
    out = tmp_path / "s"
    st.build_store(folder, out, tiny_vqgan(), chunk_size=K, bounds="unit", progress=False)
    with pytest.raises(FileExistsError, match=re.escape("; pass --overwrite (overwrite=True from Python) to rebuild")):
        st.build_store(folder, out, tiny_vqgan(), chunk_size=2, bounds="unit", progress=False)
    (out / "manifest.json").write_text("{")
    with pytest.raises(ValueError, match=re.escape("; pass --overwrite (overwrite=True from Python) to rebuild")):
        st.build_store(folder, out, tiny_vqgan(), chunk_size=K, bounds="unit", progress=False)


def test_a_folder_that_holds_a_vqgan_folder_names_it_and_one_that_holds_none_does_not(demo_dir, tmp_path):
    """A folder of exports (not a run) given as the VQGAN, with the VQGAN in its vqgan/ subfolder: the refusal names
    that subfolder to pass. A folder without one names only what is missing (no folder to pass that is not
    there)."""
    folder, _ = demo_dir
    exports = tmp_path / "exports"
    tiny_vqgan().save_pretrained(exports / "vqgan")
    with pytest.raises(FileNotFoundError, match=re.escape(f"{exports} is not a complete VQGAN folder")) as e:
        st.build_store(folder, tmp_path / "s", exports, chunk_size=K, progress=False)
    assert str(e.value).endswith(f"; {exports / 'vqgan'}, inside it, is one: pass that"), str(e.value)
    bare = tmp_path / "bare"
    bare.mkdir()
    with pytest.raises(FileNotFoundError, match=re.escape(f"{bare} is not a complete VQGAN folder")) as e:
        st.build_store(folder, tmp_path / "s", bare, chunk_size=K, progress=False)
    assert str(e.value).endswith("as `worldvla train-vq` exports them)"), str(e.value)
    assert not (tmp_path / "s").exists()


def test_a_folder_and_a_file_inside_it_are_tokenized_once(demo_dir, tmp_path):
    """`pretokenize demos demos/a.hdf5` names a.hdf5 twice: its demos are tokenized once, as from the folder alone."""
    folder, _ = demo_dir
    vq = tiny_vqgan()
    assert st.find_demo_files([folder, folder / "a.hdf5"]) == st.find_demo_files(folder)
    both = st.build_store([folder, folder / "a.hdf5"], tmp_path / "both", vq, chunk_size=K, progress=False)
    alone = st.build_store(folder, tmp_path / "alone", vq, chunk_size=K, progress=False)
    m = json.loads((both / st.MANIFEST).read_text())
    assert [os.path.basename(r["path"]) for r in m["inputs"]] == ["a.hdf5", "b.h5"]
    assert m["n_samples"] == json.loads((alone / st.MANIFEST).read_text())["n_samples"] == 8 + 11


def test_data_bounds_widen_a_constant_dimension_by_one_on_each_side(tmp_path):
    """A gripper held shut through every demo has min == max: its bounds are widened to [c - 1, c + 1], a range the
    action tokenizer can bin, with c in the middle bin."""
    rng = np.random.default_rng(8)
    d = random_demos(rng, (6, 5))
    for demo in d:
        demo["actions"][:, 3] = 0.5
    files = [write_demos(tmp_path / "d" / "a.hdf5", d, "reach")]
    low, high = st.action_bounds("data", files, 4)
    acts = np.concatenate([demo["actions"] for demo in d]).astype(np.float64)
    np.testing.assert_allclose(low[:3], acts[:, :3].min(0))
    np.testing.assert_allclose(high[:3], acts[:, :3].max(0))
    assert (low[3], high[3]) == (-0.5, 1.5)
    out = st.build_store(tmp_path / "d", tmp_path / "s", tiny_vqgan(), chunk_size=2, world=False, bounds="data",
                         progress=False)
    assert st.TokenStore(out).manifest["action"]["low"][3] == -0.5


def test_auto_bounds_take_data_for_a_dimension_just_short_of_half_of_unit(tmp_path, capsys):
    rng = np.random.default_rng(1)
    acts = rng.uniform(-1, 1, (30, 4))
    acts[:, 2] = np.linspace(-0.45, 0.45, 30)  # reaches 0.45 < UNIT_MIN_REACH
    frames = rng.integers(0, 256, (30, 32, 32, 3), dtype=np.uint8)
    files = [write_demos(tmp_path / "d" / "a.hdf5", [{"frames": frames, "actions": acts}], "wipe")]
    low, high = st.action_bounds("auto", files, 4)
    np.testing.assert_allclose(low, acts.min(0))
    np.testing.assert_allclose(high, acts.max(0))
    assert "dimension(s) 2 reach only max |a| 0.45" in capsys.readouterr().out


def test_a_negative_demos_per_shard_from_python_is_refused_before_any_work(demo_dir, tmp_path):
    folder, _ = demo_dir
    with pytest.raises(ValueError, match=r"demos_per_shard must be >= 0 \(0 = one shard per file\), got -1"):
        st.build_store(folder, tmp_path / "s", tiny_vqgan(), chunk_size=K, demos_per_shard=-1, progress=False)
    assert not (tmp_path / "s").exists()


def test_a_chunk_as_long_as_the_longest_demo_gives_it_one_action_sample(tmp_path):
    rng = np.random.default_rng(3)
    write_demos(tmp_path / "x" / "a.hdf5", random_demos(rng, (5, 3)), "reach")
    out = st.build_store(tmp_path / "x", tmp_path / "s", tiny_vqgan(), chunk_size=5, world=False, progress=False)
    store = st.TokenStore(out)
    assert store.kind_counts() == {"action": 1, "world": 0} and store.chunk_size == 5


def test_the_sim_camera_is_recorded_only_when_every_input_names_the_same(tmp_path):
    """The evaluation renders from the store's sim_camera: inputs collected from different cameras name none."""
    rng = np.random.default_rng(2)
    write_demos(tmp_path / "same" / "a.hdf5", random_demos(rng, (4,)), "reach", attrs={"sim_camera": "topview"})
    write_demos(tmp_path / "same" / "b.hdf5", random_demos(rng, (4,)), "reach", attrs={"sim_camera": "topview"})
    write_demos(tmp_path / "mixed" / "a.hdf5", random_demos(rng, (4,)), "reach", attrs={"sim_camera": "topview"})
    write_demos(tmp_path / "mixed" / "b.hdf5", random_demos(rng, (4,)), "reach", attrs={"sim_camera": "corner"})
    vq = tiny_vqgan()
    for name, want in (("same", "topview"), ("mixed", None)):
        out = st.build_store(tmp_path / name, tmp_path / f"s_{name}", vq, chunk_size=2, world=False, progress=False)
        assert st.TokenStore(out).manifest["sim_camera"] == want


def test_a_rerun_refuses_a_store_whose_inputs_frames_were_turned_otherwise(tmp_path):
    """A store whose manifest records another turn of an input's frames (built by a version that read the file
    otherwise) is not resumed with shards of both; --overwrite rebuilds it."""
    rng = np.random.default_rng(4)
    write_demos(tmp_path / "d" / "a.hdf5", random_demos(rng, (4, 5)), "reach")
    vq = tiny_vqgan()
    out = st.build_store(tmp_path / "d", tmp_path / "s", vq, chunk_size=2, demos_per_shard=1, progress=False)
    mpath = out / st.MANIFEST
    m = json.loads(mpath.read_text())
    assert m["inputs"][0]["rotation"] == "none"
    m["inputs"][0]["rotation"] = "rotated_180"
    m["complete"] = False
    m["shards"] = m["shards"][:1]  # an unfinished build
    mpath.write_text(json.dumps(m))
    with pytest.raises(FileExistsError, match="a.hdf5 \\(its frames rotated_180 then, none now\\).*--overwrite"):
        st.build_store(tmp_path / "d", out, vq, chunk_size=2, demos_per_shard=1, progress=False)
    st.build_store(tmp_path / "d", out, vq, chunk_size=2, demos_per_shard=1, overwrite=True, progress=False)
    assert st.TokenStore(out, verify=True).manifest["inputs"][0]["rotation"] == "none"


def test_an_empty_selection_of_kinds_is_refused(demo_dir, tmp_path):
    folder, _ = demo_dir
    out = st.build_store(folder, tmp_path / "s", tiny_vqgan(), chunk_size=K, progress=False)
    for kinds in ((), []):
        with pytest.raises(ValueError, match=r"kinds must be a non-empty subset of \('action', 'world'\)"):
            st.TokenStore(out, kinds=kinds)


def test_a_shard_whose_labels_are_shorter_than_its_tokens_is_refused(demo_dir, tmp_path):
    folder, _ = demo_dir
    out = st.build_store(folder, tmp_path / "s", tiny_vqgan(), chunk_size=K, progress=False)
    labels = out / "shard_00000" / "labels.npy"
    np.save(labels, np.load(labels)[:-1])  # a readable .npy, one token short: the last sample's labels misaligned
    with pytest.raises(ValueError, match=f"the arrays of {out / 'shard_00000'} do not fit together"):
        st.TokenStore(out)


def test_a_token_id_equal_to_the_vocabulary_size_is_refused(demo_dir, tmp_path):
    """The vocabulary's ids are [0, vocab_size): vocab_size itself is one past the embedding table."""
    folder, _ = demo_dir
    out = st.build_store(folder, tmp_path / "s", tiny_vqgan(), chunk_size=K, progress=False)
    vocab = st.TokenStore(out).layout.vocab_size
    tokens = out / "shard_00000" / "tokens.npy"
    arr = np.load(tokens, mmap_mode="r+")
    arr[2] = vocab
    arr.flush()
    del arr
    with pytest.raises(ValueError, match=f"{tokens}: value {vocab} at position 2 .*outside the vocabulary's ids"):
        st.TokenStore(out)[0]


def test_kind_counts_of_a_store_opened_for_one_kind_count_only_it(demo_dir, tmp_path):
    folder, _ = demo_dir
    out = st.build_store(folder, tmp_path / "s", tiny_vqgan(), chunk_size=K, progress=False)
    assert st.TokenStore(out, kinds="action").kind_counts() == {"action": 8}
    assert st.TokenStore(out, kinds=["world"]).kind_counts() == {"world": 11}


def test_pack_refuses_an_empty_sample():
    empty = (torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))
    whole = (torch.arange(4), torch.arange(4))
    with pytest.raises(ValueError, match=r"sample 1: ids \(0\) and labels \(0\) must have the same, non-zero length"):
        st.pack([whole, empty], 16)


def test_a_pickled_store_carries_no_arrays_it_has_read(demo_dir, tmp_path):
    """Data-loader workers receive the store pickled: the shards it has memory-mapped are not copied into it."""
    import pickle

    folder, _ = demo_dir
    out = st.build_store(folder, tmp_path / "s", tiny_vqgan(), chunk_size=K, progress=False)
    store = st.TokenStore(out)
    size = len(pickle.dumps(store))
    want = [store[i] for i in range(len(store))]  # every shard memory-mapped
    copy = pickle.loads(pickle.dumps(store))
    assert len(pickle.dumps(store)) == size
    assert all(torch.equal(copy[i][0], w[0]) and copy[i][2] == w[2] for i, w in enumerate(want))


def test_frames_wider_than_high_keep_their_height_and_width(tmp_path):
    rng = np.random.default_rng(6)
    d = random_demos(rng, (4, 3))
    for demo in d:
        demo["frames"] = rng.integers(0, 256, (len(demo["actions"]), 32, 64, 3), dtype=np.uint8)
    write_demos(tmp_path / "d" / "a.hdf5", d, "reach")
    vq = tiny_vqgan()
    out = st.build_store(tmp_path / "d", tmp_path / "s", vq, chunk_size=2, progress=False)
    store = st.TokenStore(out)
    assert store.image_size == (32, 64)
    assert store.manifest["code_grid"] == [32 // vq.downsample, 64 // vq.downsample]
    ids, _, kind = store[len(store) - 1]
    lo, hi = store.layout.image_id_range
    assert kind == "world" and int(((ids >= lo) & (ids < hi)).sum()) == 2 * 2 * 4  # two images of 2 x 4 codes


def test_cli_options_reach_the_store(demo_dir, tmp_path):
    folder, _ = demo_dir
    args = _pretokenize_args(folder, tmp_path, "s", "--no-action", "--drop-noops", "--demos-per-shard", "1",
                             "--rotate-180", "yes", "--history", "1", "--action-bounds", "unit",
                             "--instruction", "lift it", "--no-progress")
    assert st.run(args) == 0
    m = st.TokenStore(tmp_path / "s").manifest
    assert {k: m["settings"][k] for k in ("action", "world", "drop_noops", "demos_per_shard", "rotate_180",
                                          "history", "instruction", "only_success")} == \
        {"action": False, "world": True, "drop_noops": True, "demos_per_shard": 1, "rotate_180": True, "history": 1,
         "instruction": "lift it", "only_success": True}
    assert len(m["shards"]) == 3 + 1 and m["action"]["bounds"] == "unit" and m["n_action"] == 0


@pytest.mark.parametrize("batch", [0, -1])
def test_an_encode_batch_below_one_is_refused_before_anything_is_written(demo_dir, tmp_path, batch):
    """encode_batch=0 from Python ended in range()'s "arg 3 must not be zero" (and -1 in torch.cat's "expected a
    non-empty list of Tensors") at the first demo, after an incomplete manifest and the VQGAN were written."""
    folder, _ = demo_dir
    with pytest.raises(ValueError, match=rf"encode_batch \(--encode-batch\).*>= 1, got {batch}"):
        st.build_store(folder, tmp_path / "s", tiny_vqgan(), chunk_size=K, encode_batch=batch, progress=False)
    assert not (tmp_path / "s").exists()


def test_a_tokenizer_json_without_the_chameleon_layout_is_refused_naming_the_option(demo_dir, tmp_path):
    """--tokenizer-json under the default compact layout was never read: the store was built on byte text without a
    word, for a user who meant the release's vocabulary."""
    folder, _ = demo_dir
    tok = _release_text_tokenizer(tmp_path / "text_tokenizer.json")
    args = _pretokenize_args(folder, tmp_path, "s", "--tokenizer-json", str(tok), "--no-progress")
    with pytest.raises(ValueError, match=r"--tokenizer-json .* is read only with --layout chameleon \(the compact "
                                         r"layout encodes text as byte ids\): add --layout chameleon"):
        st.run(args)
    assert not (tmp_path / "s").exists()
    with pytest.raises(ValueError, match="read only with --layout chameleon"):
        st.build_store(folder, tmp_path / "s", tiny_vqgan(), layout=VocabLayout.compact(n_image_codes=64),
                       tokenizer_json=tok, chunk_size=K, progress=False)
    st.build_store(folder, tmp_path / "s", tiny_vqgan(), layout="chameleon", tokenizer_json=tok, chunk_size=K,
                   progress=False)
    assert st.TokenStore(tmp_path / "s").layout.name == "chameleon"


def test_a_chunk_only_failed_demos_fit_is_refused_before_overwrite_replaces_the_store(tmp_path):
    """A -K longer than every successful demo, but not than a failed one the store skips, was refused only after
    every frame was encoded, and under --overwrite after the complete store in the folder was replaced."""
    rng = np.random.default_rng(5)
    write_demos(tmp_path / "d" / "a.hdf5", random_demos(rng, (3, 8), success=[True, False]), "reach")
    out = st.build_store(tmp_path / "d", tmp_path / "s", tiny_vqgan(), chunk_size=2, progress=False)
    before = _store_bytes(out)
    vq = counting(tiny_vqgan())
    with pytest.raises(ValueError, match=r"-K 5 is longer than every successful demo \(the longest has 3 steps; "
                                         r"failed demos, up to 8 steps long, are tokenized only with "
                                         r"--include-failed\).*choose -K <= 3, or pass --include-failed"):
        st.build_store(tmp_path / "d", out, vq, chunk_size=5, overwrite=True, progress=False)
    assert CountingVQGAN.frames == 0 and _store_bytes(out) == before
    st.TokenStore(out, verify=True)
    st.build_store(tmp_path / "d", tmp_path / "all", tiny_vqgan(), chunk_size=5, only_success=False, progress=False)


def test_an_earlier_versions_drop_noops_world_store_is_refused_saying_why(tmp_path):
    """Such a store (world targets the next kept frames) was refused as "built with other settings, inputs or VQGAN"
    with nothing named, though every setting, input and the VQGAN were the same."""
    import hashlib

    _noop_demo_file(tmp_path / "d" / "a.hdf5", 5, [3, 4, 7])
    vq = tiny_vqgan()
    kw = dict(action=False, bounds="unit", drop_noops=True, progress=False)
    out = st.build_store(tmp_path / "d", tmp_path / "s", vq, **kw)
    m = json.loads((out / st.MANIFEST).read_text())
    settings = {k: v for k, v in m["settings"].items() if k != "instruction"}
    m["fingerprint"] = hashlib.sha256(json.dumps(  # the terms before world targets changed
        {"version": 1, "settings": settings, "layout": m["layout"], "low": m["action"]["low"],
         "high": m["action"]["high"], "vqgan": st._state_dict_digest(vq),
         "inputs": [("a.hdf5", (tmp_path / "d" / "a.hdf5").stat().st_size)]}, sort_keys=True).encode()).hexdigest()
    (out / st.MANIFEST).write_text(json.dumps(m))
    with pytest.raises(FileExistsError, match=r"world samples under --drop-noops built by an earlier version.*"
                                              r"--overwrite"):
        st.build_store(tmp_path / "d", out, vq, **kw)
    # Another setting that differs is named alone.
    with pytest.raises(FileExistsError, match=r"other settings, inputs or VQGAN: history 2 then, 1 now; pass"):
        st.build_store(tmp_path / "d", out, vq, history=1, **kw)


@pytest.mark.filterwarnings("ignore:.*every step is a no-op")
def test_a_shard_whose_demo_was_skipped_is_recorded_before_the_next_file(tmp_path, monkeypatch):
    """A shard with a demo iter_demos skips (every step a no-op under --drop-noops) was written when its file was
    done but entered in the manifest only at the build's end: a stop in a later file lost it, and the resumed
    build encoded its demos again."""
    rng = np.random.default_rng(5)
    first = random_demos(rng, (6, 5))
    for d in first:
        d["actions"][:, 3] = 1.0
    first[1]["actions"][:, :3] = 0.0  # every step a no-op: skipped
    write_demos(tmp_path / "d" / "a.hdf5", first, "push")
    write_demos(tmp_path / "d" / "b.hdf5", random_demos(rng, (6, 5)), "reach")
    kw = dict(chunk_size=2, drop_noops=True, bounds="unit", progress=False)
    real = st._write_shard

    def stop_at_the_second_file(path, samples):
        if path.name == "shard_00001":
            raise KeyboardInterrupt("simulated stop")
        return real(path, samples)

    with monkeypatch.context() as m:
        m.setattr(st, "_write_shard", stop_at_the_second_file)
        with pytest.raises(KeyboardInterrupt):
            st.build_store(tmp_path / "d", tmp_path / "s", tiny_vqgan(), **kw)
    assert [e["name"] for e in json.loads((tmp_path / "s" / st.MANIFEST).read_text())["shards"]] == ["shard_00000"]
    vq = counting(tiny_vqgan())
    st.build_store(tmp_path / "d", tmp_path / "s", vq, **kw)
    assert CountingVQGAN.frames == 6 + 5  # b.hdf5's frames alone
    st.build_store(tmp_path / "d", tmp_path / "ref", tiny_vqgan(), **kw)
    assert _store_bytes(tmp_path / "s") == _store_bytes(tmp_path / "ref")


def test_pack_takes_a_generator_of_samples(demo_dir, tmp_path):
    """A generator was read once for the ids, leaving no labels: the packed labels came out shorter than the ids,
    and an empty generator made a pack of padding alone."""
    folder, _ = demo_dir
    store = st.TokenStore(st.build_store(folder, tmp_path / "s", tiny_vqgan(), chunk_size=K, progress=False))
    want = st.pack([store[i] for i in range(3)], 1000, pad_id=1)
    got = st.pack((store[i] for i in range(3)), 1000, pad_id=1)
    assert all(torch.equal(a, b) for a, b in zip(got, want)) and got[1].shape == got[0].shape == (1000,)
    with pytest.raises(ValueError, match="at least one sample"):
        st.pack((s for s in []), 1000, pad_id=1)


@pytest.mark.parametrize("damage", ["cut short", "zeros", "empty"])
def test_a_damaged_vqgan_copy_is_named_and_a_rerun_restores_it(demo_dir, tmp_path, damage):
    """The store's vqgan/model.safetensors damaged: verify (and the trainer's export check) raised a bare
    SafetensorError naming no file, and the rerun its fix advises raised it too, leaving the store incomplete."""
    folder, _ = demo_dir
    vq = tiny_vqgan()
    out = st.build_store(folder, tmp_path / "s", vq, chunk_size=K, progress=False)
    weights = out / "vqgan" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes({"cut short": data[:len(data) // 2], "zeros": bytes(100), "empty": b""}[damage])
    with pytest.raises(ValueError, match=rf"{weights}: the VQGAN's weights file cannot be read .*damaged.*rerun "
                                         rf"`worldvla pretokenize` with the same arguments and VQGAN"):
        st.TokenStore(out, verify=True)
    counted = counting(vq)
    st.build_store(folder, out, counted, chunk_size=K, progress=False)
    assert CountingVQGAN.frames == 0  # the shards are kept
    torch.testing.assert_close(VQGAN.from_pretrained(st.TokenStore(out, verify=True).vqgan_path).codebook, vq.codebook)


def test_paths_with_a_tilde_are_taken_as_the_home_folder(demo_dir, tmp_path, monkeypatch):
    """`--vqgan=~/vq` reaches the command unexpanded: the store refused it as a missing folder, though
    VQGAN.from_pretrained takes it; `--store=~/s` was not a token store either."""
    folder, _ = demo_dir
    monkeypatch.setenv("HOME", str(tmp_path))
    tiny_vqgan().save_pretrained(tmp_path / "vq")
    tok = _release_text_tokenizer(tmp_path / "text_tokenizer.json")
    st.build_store(folder, "~/s", "~/vq", layout="chameleon", tokenizer_json="~/text_tokenizer.json", chunk_size=K,
                   progress=False)
    store = st.TokenStore("~/s", verify=True)
    assert store.path == tmp_path / "s" and store.text_tokenizer_path.read_bytes() == tok.read_bytes()
    assert [p.name for p in st.find_demo_files("~/demos")] == ["a.hdf5", "b.h5"]


def test_a_sim_camera_attribute_stored_as_bytes_is_recorded_as_its_text(tmp_path):
    """A fixed-length HDF5 string attribute reads as bytes: the manifest recorded sim_camera "b'corner'", a camera
    the evaluation cannot render from."""
    import h5py

    path = write_demos(tmp_path / "d" / "a.hdf5", random_demos(np.random.default_rng(0), (4, 4)), "push")
    with h5py.File(path, "a") as f:
        f["data"].attrs["sim_camera"] = np.bytes_(b"corner")
    out = st.build_store(tmp_path / "d", tmp_path / "s", tiny_vqgan(), chunk_size=2, bounds="unit", progress=False)
    assert json.loads((out / st.MANIFEST).read_text())["sim_camera"] == "corner"


def test_an_out_path_that_is_a_file_and_a_manifest_path_are_named(demo_dir, tmp_path):
    """build_store into a file raised a bare "[Errno 17] File exists" once the VQGAN was loaded; TokenStore given the
    store's manifest.json said it was no token store and advised building one."""
    folder, _ = demo_dir
    (tmp_path / "taken").write_text("notes")
    with pytest.raises(NotADirectoryError, match=r"taken \(--out\) is a file, not a folder: name a folder"):
        st.build_store(folder, tmp_path / "taken", tiny_vqgan(), chunk_size=K, progress=False)
    out = st.build_store(folder, tmp_path / "s", tiny_vqgan(), chunk_size=K, progress=False)
    with pytest.raises(NotADirectoryError, match=rf"is a token store's manifest, not its folder: pass the folder that "
                                                 rf"holds it, {out}$"):
        st.TokenStore(out / st.MANIFEST)


def _libero_like_file(path, rng, T=4, cameras=("agentview_rgb", "eye_in_hand_rgb")):
    import h5py

    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        for cam in cameras:
            f.create_dataset(f"data/demo_0/obs/{cam}", data=rng.integers(0, 256, (T, 32, 32, 3), dtype=np.uint8))
        f.create_dataset("data/demo_0/actions", data=rng.uniform(-1, 1, (T, 7)).astype(np.float32))
    return path


def _refingerprint(out, vq, files, **settings):
    """The store's manifest as an earlier version wrote it: `settings` recorded, the fingerprint of them."""
    import hashlib

    m = json.loads((out / st.MANIFEST).read_text())
    m["settings"].update(settings)
    terms = {k: v for k, v in m["settings"].items() if k != "instruction"}
    m["fingerprint"] = hashlib.sha256(json.dumps(
        {"version": 1, "settings": terms, "layout": m["layout"], "low": m["action"]["low"],
         "high": m["action"]["high"], "vqgan": st._state_dict_digest(vq),
         "inputs": [(p.name, p.stat().st_size) for p in files]}, sort_keys=True).encode()).hexdigest()
    (out / st.MANIFEST).write_text(json.dumps(m))
    return m["fingerprint"]


def test_camera_spellings_that_read_the_same_frames_make_one_store(tmp_path):
    """--camera agentview and --camera agentview_rgb read the same obs/agentview_rgb but were recorded as other
    settings: a rerun with the other spelling was refused ("camera 'agentview_rgb' then, 'agentview' now")."""
    rng = np.random.default_rng(4)
    path = _libero_like_file(tmp_path / "d" / "put_the_bowl_demo.hdf5", rng)
    vq = tiny_vqgan()
    kw = dict(chunk_size=2, world=False, bounds="unit", progress=False)
    out = st.build_store(path.parent, tmp_path / "s", vq, camera="agentview_rgb", **kw)
    m = json.loads((out / st.MANIFEST).read_text())
    assert m["settings"]["camera"] == "agentview" and m["complete"]
    counted = counting(vq)
    st.build_store(path.parent, out, counted, camera="agentview", **kw)
    assert CountingVQGAN.frames == 0 and json.loads((out / st.MANIFEST).read_text())["fingerprint"] == m["fingerprint"]
    # A store an earlier version recorded under either spelling is still this one, its fingerprint kept.
    for recorded in ("agentview_rgb", "agentview"):
        fp = _refingerprint(out, vq, [path], camera=recorded)
        for given in ("agentview", "agentview_rgb"):
            st.build_store(path.parent, out, counted, camera=given, **kw)
            m = json.loads((out / st.MANIFEST).read_text())
            assert CountingVQGAN.frames == 0 and m["fingerprint"] == fp and m["settings"]["camera"] == recorded
    with pytest.raises(FileExistsError, match=r"camera 'agentview' then, 'eye_in_hand' now"):
        st.build_store(path.parent, out, counted, camera="eye_in_hand_rgb", **kw)
    # Where the spellings read other frames, they stay apart: the short one reads obs/agentview_rgb.
    both = _libero_like_file(tmp_path / "both" / "a.hdf5", rng, cameras=("agentview_rgb", "agentview_image"))
    out = st.build_store(both.parent, tmp_path / "s2", vq, camera="agentview_image", rotate_180=False, **kw)
    assert json.loads((out / st.MANIFEST).read_text())["settings"]["camera"] == "agentview_image"
    with pytest.raises(FileExistsError, match=r"camera 'agentview_image' then, 'agentview' now"):
        st.build_store(both.parent, out, vq, camera="agentview", rotate_180=False, **kw)


def test_a_chunk_only_failed_demos_fit_under_drop_noops_is_refused_before_any_work(tmp_path):
    """Under --drop-noops the chunk check counted the steps before the no-ops were dropped: a -K that only a failed
    demo fits once they are was refused ("no action samples were built") after every frame was encoded."""
    rng = np.random.default_rng(6)
    ok, failed = random_demos(rng, (6, 8), success=[True, False])
    ok["actions"][:, 3] = 1.0
    ok["actions"][[1, 2, 3], :3] = 0.0  # no-ops: 3 of its 6 steps are kept
    failed["actions"][:, 3] = 1.0
    failed["actions"][[2, 5], :3] = 0.0  # 6 of its 8
    write_demos(tmp_path / "d" / "a.hdf5", [ok, failed], "push")
    vq = counting(tiny_vqgan())
    with pytest.raises(ValueError, match=r"-K 5 is longer than every successful demo once --drop-noops has dropped "
                                         r"its no-op steps \(the longest keeps 3 steps; failed demos are tokenized "
                                         r"only with --include-failed\).*choose -K <= 3, pass --include-failed "
                                         r"\(only_success=False from Python\), or leave out --drop-noops"):
        st.build_store(tmp_path / "d", tmp_path / "s", vq, chunk_size=5, drop_noops=True, progress=False)
    assert CountingVQGAN.frames == 0 and not (tmp_path / "s").exists()
    with pytest.raises(ValueError, match=r"-K 9 is longer than every demo \(the longest has 8 steps\)"):
        st.build_store(tmp_path / "d", tmp_path / "s", vq, chunk_size=9, drop_noops=True, progress=False)
    with pytest.raises(ValueError, match=r"-K 7 is longer than every demo once --drop-noops has dropped its no-op "
                                         r"steps \(the longest keeps 6 steps\), so no action sample fits; choose "
                                         r"-K <= 6, or leave out --drop-noops"):
        st.build_store(tmp_path / "d", tmp_path / "s", vq, chunk_size=7, drop_noops=True, only_success=False,
                       progress=False)
    assert CountingVQGAN.frames == 0 and not (tmp_path / "s").exists()
    out = st.build_store(tmp_path / "d", tmp_path / "s", vq, chunk_size=3, world=False, drop_noops=True,
                         progress=False)
    assert st.TokenStore(out).manifest["n_action"] == 1  # the kept 3 steps: one chunk


def test_no_camera_and_the_camera_it_reads_make_one_store(tmp_path):
    """Without --camera the reader takes obs/agentview_rgb, as --camera agentview does, but the two were recorded as
    other settings: a rerun with the other was refused ("camera None then, 'agentview' now"). A store built with no
    camera keeps None and its fingerprint; where the inputs settle on other cameras without one, it stays apart."""
    rng = np.random.default_rng(9)
    path = _libero_like_file(tmp_path / "d" / "put_the_bowl_demo.hdf5", rng)
    vq = tiny_vqgan()
    counted = counting(vq)
    kw = dict(chunk_size=2, world=False, bounds="unit", progress=False)
    out = st.build_store(path.parent, tmp_path / "s", vq, **kw)
    fp = json.loads((out / st.MANIFEST).read_text())["fingerprint"]
    for given in ("agentview", "agentview_rgb", None):
        st.build_store(path.parent, out, counted, camera=given, **kw)
        m = json.loads((out / st.MANIFEST).read_text())
        assert CountingVQGAN.frames == 0 and m["fingerprint"] == fp and m["settings"]["camera"] is None
    out = st.build_store(path.parent, tmp_path / "s2", vq, camera="agentview", **kw)
    fp = json.loads((out / st.MANIFEST).read_text())["fingerprint"]
    st.build_store(path.parent, out, counted, **kw)
    m = json.loads((out / st.MANIFEST).read_text())
    assert CountingVQGAN.frames == 0 and m["fingerprint"] == fp and m["settings"]["camera"] == "agentview"
    # a.hdf5 settles on obs/agentview_rgb without a camera, b.hdf5 (no agentview) on obs/eye_in_hand_rgb
    _libero_like_file(tmp_path / "mixed" / "a.hdf5", rng)
    _libero_like_file(tmp_path / "mixed" / "b.hdf5", rng, cameras=("eye_in_hand_rgb",))
    files = st.find_demo_files(tmp_path / "mixed")
    assert st._camera_spellings(files, None) == [None]
    assert st._camera_spellings(files, "eye_in_hand") == ["eye_in_hand", "eye_in_hand_rgb"]
    out = st.build_store(tmp_path / "mixed", tmp_path / "s3", vq, **kw)
    assert json.loads((out / st.MANIFEST).read_text())["settings"]["camera"] is None
    with pytest.raises(FileExistsError, match=r"camera None then, 'eye_in_hand' now"):
        st.build_store(tmp_path / "mixed", out, counted, camera="eye_in_hand", **kw)


def test_nan_actions_under_drop_noops_are_named_at_the_files_step(tmp_path):
    """Under --drop-noops the build named the first step not finite by its place among the steps kept ("step 2 of
    5"), not the file's step; with --no-action and fixed bounds no scan of the actions refuses it before the build."""
    import h5py

    rng = np.random.default_rng(10)
    (demo,) = random_demos(rng, (8,), dim=7)
    demo["actions"][:, 6] = 1.0
    demo["actions"][[0, 1, 4], :6] = 0.0  # no-ops: the file's steps 2, 3, 5, 6 and 7 are kept
    path = write_demos(tmp_path / "d" / "a.hdf5", [demo], "push")
    with h5py.File(path, "a") as f:
        f["data/demo_0/actions"][5, 0] = np.nan  # the third step kept
    said = re.escape(f"{path}:data/demo_0: actions contain NaN or inf (first at step 5 of 8)")
    for i, kw in enumerate((dict(action=False, bounds="unit"), dict(action=False, bounds="libero"),
                            dict(chunk_size=2, bounds="unit"))):  # the last one refused by the chunk check's scan
        with pytest.raises(ValueError, match=said):
            st.build_store(tmp_path / "d", tmp_path / f"s{i}", tiny_vqgan(), drop_noops=True, progress=False, **kw)


def test_history_one_gives_each_action_sample_its_own_frame_alone_and_is_recorded(tmp_path):
    """--history 1: every action sample holds the frame at its step j alone (the window ends at j), and the manifest
    records 1, which the trainer's export hands the policy (a policy given 2 would prompt with two frames)."""
    rng = np.random.default_rng(11)
    (demo,) = random_demos(rng, (4,))
    write_demos(tmp_path / "d" / "a.hdf5", [demo], "reach")
    vq = tiny_vqgan()
    out = st.build_store(tmp_path / "d", tmp_path / "s", vq, chunk_size=2, history=1, world=False, bounds="unit",
                         progress=False)
    store = st.TokenStore(out)
    builder = SequenceBuilder(store.layout, ByteTextTokenizer(store.layout),
                              ActionTokenizer(store.layout, [-1.0] * 4, [1.0] * 4))
    codes = [vq.encode(preprocess(f))[0] for f in demo["frames"]]
    want = [builder.action_sample("reach", [codes[j]], demo["actions"][j:j + 2]).input_ids.tolist() for j in range(3)]
    index = np.load(out / "shard_00000" / "index.npy")
    assert index[:, 1].tolist() == [0, 1, 2]
    assert [store[i][0].tolist() for i in range(len(store))] == want
    assert store.manifest["action"]["history"] == 1


def test_the_index_one_past_the_last_sample_is_refused_and_iteration_stops_there(tmp_path):
    """store[len(store)] is out of range (the index would otherwise wrap to sample 0), and iterating a store, which
    runs on __getitem__ until IndexError, yields each sample once."""
    rng = np.random.default_rng(12)
    write_demos(tmp_path / "d" / "a.hdf5", random_demos(rng, (3,)), "reach")
    store = st.TokenStore(st.build_store(tmp_path / "d", tmp_path / "s", tiny_vqgan(), chunk_size=2, bounds="unit",
                                         progress=False))
    n = len(store)
    assert n == 2 + 2
    with pytest.raises(IndexError, match=f"sample {n} out of range for a store of {n} samples"):
        store[n]
    assert [s[2] for s in store] == ["action"] * 2 + ["world"] * 2


@pytest.mark.parametrize("first, rerun", [("reach", None), (None, "reach")], ids=["take-own", "lose-own"])
def test_a_rerun_that_changes_a_demos_own_instruction_is_refused_naming_it(tmp_path, first, rerun):
    """--instruction equal to the file's, given on one run and not the other: demo_1, which has an instruction of its
    own, is prompted with the override on one side and with its own on the other. The inputs' records differ in that
    demo's instruction alone, which a rerun must not resume past (its shards hold the first run's prompt), and the
    refusal names the demo, not the file's instruction, which is the same."""
    rng = np.random.default_rng(13)
    demos = random_demos(rng, (3, 3))
    demos[1]["instruction"] = "push the block"
    write_demos(tmp_path / "d" / "a.hdf5", demos, "reach")
    kw = dict(chunk_size=2, bounds="unit", progress=False)
    vq = tiny_vqgan()
    out = st.build_store(tmp_path / "d", tmp_path / "s", vq, instruction=first, **kw)
    with pytest.raises(FileExistsError, match=r"a\.hdf5 \(its demo\(s\) demo_1 prompted with other instructions than "
                                              r"then\); pass --overwrite"):
        st.build_store(tmp_path / "d", out, vq, instruction=rerun, **kw)


def test_a_shard_whose_arrays_agree_but_hold_other_samples_than_its_entry_is_refused(demo_dir, tmp_path):
    """A shard folder whose five arrays fit together but hold one sample fewer than its manifest entry records (the
    folder of another build copied in) is refused on open, not read as it is."""
    folder, _ = demo_dir
    out = st.build_store(folder, tmp_path / "s", tiny_vqgan(), chunk_size=K, progress=False)
    shard = out / "shard_00000"
    a = {n: np.load(shard / f"{n}.npy") for n in st._ARRAYS}
    n = len(a["kinds"])
    end = int(a["offsets"][n - 1])
    cut = {"tokens": a["tokens"][:end], "labels": a["labels"][:end], "offsets": a["offsets"][:n],
           "kinds": a["kinds"][:n - 1], "index": a["index"][:n - 1]}
    for name, arr in cut.items():
        np.save(shard / f"{name}.npy", arr)
    with pytest.raises(ValueError, match=rf"the arrays of .*shard_00000 do not fit together or its manifest entry "
                                         rf"\({n} samples\): the shard is damaged"):
        st.TokenStore(out)


def test_auto_bounds_warn_only_when_the_libero_bounds_clip_more_than_one_percent(tmp_path, capsys):
    """The line of --action-bounds auto is for a share above CLIP_WARN_SHARE: one value in 100 outside the bounds is
    a stray outlier the edge bin absorbs, two are a warning."""
    rng = np.random.default_rng(14)
    acts = rng.uniform(np.array(st.LIBERO_MIN) * 0.9, np.array(st.LIBERO_MAX) * 0.9, (100, 7))
    for outside, warned in ((1, False), (2, True)):
        acts[:outside, 0] = 2.0
        files = [_own_robot_file(tmp_path / f"libero{outside}" / "a.hdf5", acts)]
        assert st.action_bounds("auto", files, 7) == (list(st.LIBERO_MIN), list(st.LIBERO_MAX))
        out = capsys.readouterr().out
        assert (f"values per dimension: 2.0%{' 0.0%' * 6}; pass --action-bounds data" in out) if warned else out == ""


def test_action_samples_alone_under_drop_noops_encode_only_the_kept_frames(tmp_path):
    """The frames after dropped no-op steps are encoded only as world samples' targets: a build of action samples
    alone encodes each kept frame once and no other."""
    _noop_demo_file(tmp_path / "d" / "a.hdf5", 15, [3, 4, 7])  # no-ops: kept steps 0, 1, 2, 5, 6
    vq = counting(tiny_vqgan())
    out = st.build_store(tmp_path / "d", tmp_path / "s", vq, chunk_size=2, world=False, bounds="unit",
                         drop_noops=True, progress=False)
    assert CountingVQGAN.frames == 5 and len(st.TokenStore(out)) == 4


def test_data_bounds_of_a_dimension_below_zero_end_at_its_largest_value(tmp_path):
    """--action-bounds data spans each dimension's own min and max, also for a dimension whose values all lie below
    zero (or above it): a bound at 0 would leave the bins between it and the data unused."""
    rng = np.random.default_rng(16)
    (demo,) = random_demos(rng, (6,))
    demo["actions"][:, 0] = rng.uniform(-3.0, -2.0, 6)
    demo["actions"][:, 1] = rng.uniform(2.0, 3.0, 6)
    write_demos(tmp_path / "d" / "a.hdf5", [demo], "reach")
    low, high = st.action_bounds("data", st.find_demo_files(tmp_path / "d"), 4)
    a = demo["actions"].astype(np.float64)
    np.testing.assert_allclose(low, a.min(0), rtol=1e-6)
    np.testing.assert_allclose(high, a.max(0), rtol=1e-6)


def test_the_lengths_of_a_store_opened_for_one_kind_are_those_of_its_samples(demo_dir, tmp_path):
    """`lengths` (which the trainer packs batches by) follows the kind filter: each sample's own length."""
    folder, _ = demo_dir
    out = st.build_store(folder, tmp_path / "s", tiny_vqgan(), chunk_size=K, demos_per_shard=2, progress=False)
    for kind in st.KINDS:
        store = st.TokenStore(out, kinds=kind)
        assert len(store) > 0 and {store[i][2] for i in range(len(store))} == {kind}
        assert store.lengths.tolist() == [len(store[i][0]) for i in range(len(store))]


def test_under_drop_noops_the_last_world_sample_targets_the_frame_its_action_led_to(tmp_path):
    """No-ops between the last two kept steps: the world sample of the last kept step but one (j = T - 2) targets
    the file's frame after it, not the last kept frame."""
    demo = _noop_demo_file(tmp_path / "d" / "a.hdf5", 17, [5, 6])  # no-ops: kept steps 0, 1, 2, 3, 4, 7
    vq = tiny_vqgan()
    out = st.build_store(tmp_path / "d", tmp_path / "s", vq, action=False, bounds="unit", drop_noops=True,
                         progress=False)
    store = st.TokenStore(out)
    builder = SequenceBuilder(store.layout, ByteTextTokenizer(store.layout),
                              ActionTokenizer(store.layout, [-1.0] * 4, [1.0] * 4))
    codes = [vq.encode(preprocess(f))[0] for f in demo["frames"]]
    want = builder.world_sample(codes[4], demo["actions"][4], codes[5]).input_ids.tolist()
    assert len(store) == 5 and store[4][0].tolist() == want


def test_a_rerun_takes_each_inputs_digest_from_its_own_record(tmp_path):
    """Two input files of one size and one mtime: a rerun reuses each file's recorded sha256 (not the first file's
    for both), so it resumes the store instead of refusing it as changed."""
    rng = np.random.default_rng(18)
    paths = [write_demos(tmp_path / "d" / f"{n}.hdf5", random_demos(rng, (3,)), "reach", compression=None)
             for n in "ab"]
    assert paths[0].stat().st_size == paths[1].stat().st_size
    for p in paths:
        os.utime(p, ns=(1_700_000_000_000_000_000,) * 2)
    kw = dict(chunk_size=2, bounds="unit", progress=False)
    out = st.build_store(tmp_path / "d", tmp_path / "s", tiny_vqgan(), **kw)
    vq = counting(tiny_vqgan())
    st.build_store(tmp_path / "d", out, vq, **kw)
    records = json.loads((out / st.MANIFEST).read_text())["inputs"]
    assert CountingVQGAN.frames == 0 and [r["sha256"] for r in records] == [st.sha256_file(p) for p in paths]


def test_an_input_file_without_demos_keeps_its_own_empty_shard(tmp_path):
    """Every input file has a shard of its own, a file without demos too (an empty one, demos [0, 0]): the shards of
    the files after it keep their names, and the store opens with its samples alone."""
    import h5py

    folder = tmp_path / "d"
    write_demos(folder / "b.hdf5", random_demos(np.random.default_rng(0), (4,)), "push the red block")
    with h5py.File(folder / "a.hdf5", "w") as f:
        f.create_group("data").attrs["instruction"] = "reach"
    out = st.build_store(folder, tmp_path / "s", tiny_vqgan(), chunk_size=K, progress=False)
    m = json.loads((out / st.MANIFEST).read_text())
    assert [(e["name"], e["file"], e["demos"], e["n_samples"]) for e in m["shards"]] == \
        [("shard_00000", 0, [0, 0], 0), ("shard_00001", 1, [0, 1], (4 - K + 1) + 3)]
    assert sorted(p.name for p in (out / "shard_00000").iterdir()) == sorted(st._SHARD_FILES)
    assert len(st.TokenStore(out, verify=True)) == (4 - K + 1) + 3


def test_a_folder_whose_name_only_begins_like_a_shards_is_kept(demo_dir, tmp_path):
    """Only folders named exactly shard_<digits> are taken for the store's own: one named shard_00005_old (or
    shard_7.bak) that holds a shard's files is not removed by a build that replaces the store."""
    import shutil

    folder, _ = demo_dir
    vq = tiny_vqgan()
    out = st.build_store(folder, tmp_path / "s", vq, chunk_size=K, demos_per_shard=1, progress=False)
    (out / "shard_00003").rename(out / "shard_00005_old")
    shutil.copytree(out / "shard_00002", out / "shard_7.bak")
    st.build_store(folder, out, vq, chunk_size=K, overwrite=True, progress=False)
    assert sorted(p.name for p in out.glob("shard_*")) == ["shard_00000", "shard_00001", "shard_00005_old",
                                                           "shard_7.bak"]
    assert sorted(p.name for p in (out / "shard_00005_old").iterdir()) == sorted(st._SHARD_FILES)


def test_a_resumed_build_rebuilds_a_shard_whose_entry_names_other_demos_or_another_file(demo_dir, tmp_path):
    """A shard is taken as done only when its entry names the file and the demos the plan gives it: an entry whose
    files match their checksums but that names other demos (or another file) is built again."""
    folder, _ = demo_dir
    vq = tiny_vqgan()
    out = st.build_store(folder, tmp_path / "s", vq, chunk_size=K, demos_per_shard=2, progress=False)
    mpath = out / st.MANIFEST
    m = json.loads(mpath.read_text())
    want = [dict(e) for e in m["shards"]]
    m["shards"][0]["demos"] = [0, 1]
    m["shards"][2]["file"] = 0
    mpath.write_text(json.dumps(m))
    vq = counting(vq)
    st.build_store(folder, out, vq, chunk_size=K, demos_per_shard=2, progress=False)
    assert CountingVQGAN.frames == 7 + 5  # shard_00000's demos (shard_00002 holds a failed demo, not encoded)
    assert json.loads(mpath.read_text())["shards"] == want


def test_demos_left_without_any_step_by_drop_noops_are_not_blamed_on_the_chunk_size(tmp_path):
    """Under --drop-noops a file whose every step is a no-op keeps no step: the build says no demo is left to
    tokenize, not that -K is longer than a demo of 0 steps (with the advice -K <= 0)."""
    _noop_demo_file(tmp_path / "d" / "a.hdf5", 19, list(range(8)))
    with pytest.raises(ValueError) as e:
        st.build_store(tmp_path / "d", tmp_path / "s", tiny_vqgan(), chunk_size=K, bounds="unit", drop_noops=True,
                       progress=False)
    assert "none of the 1 demo files holds a demo to tokenize" in str(e.value)
    assert "left without steps by --drop-noops" in str(e.value) and "chunk-size" not in str(e.value)


def test_a_chunk_too_long_for_the_kept_steps_of_successful_demos_names_no_failed_ones(tmp_path):
    """Every demo successful: a -K longer than the steps --drop-noops keeps is refused with the longest kept count
    and the fix, and says nothing of failed demos or --include-failed (there are none)."""
    _noop_demo_file(tmp_path / "d" / "a.hdf5", 21, [2, 3, 4, 5, 6])  # kept steps 0, 1, 7
    with pytest.raises(ValueError) as e:
        st.build_store(tmp_path / "d", tmp_path / "s", tiny_vqgan(), chunk_size=4, bounds="unit", drop_noops=True,
                       progress=False)
    assert str(e.value) == ("--chunk-size/-K 4 is longer than every successful demo once --drop-noops has dropped its "
                            "no-op steps (the longest keeps 3 steps), so no action sample fits; choose -K <= 3, or "
                            "leave out --drop-noops")


def test_a_folder_named_like_a_demo_file_inside_an_input_folder_is_not_taken_for_one(tmp_path):
    """Inside an input folder only files count: a sub-folder named old.hdf5 is searched, not read as a demo file."""
    write_demos(tmp_path / "d" / "a.hdf5", random_demos(np.random.default_rng(22), (3,)), "reach")
    write_demos(tmp_path / "d" / "old.hdf5" / "b.h5", random_demos(np.random.default_rng(23), (3,)), "reach")
    assert st.find_demo_files(tmp_path / "d") == [(tmp_path / "d" / "a.hdf5").resolve(),
                                                  (tmp_path / "d" / "old.hdf5" / "b.h5").resolve()]
