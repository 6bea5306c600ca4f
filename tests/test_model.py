"""The reference transformer against transformers' Chameleon, checkpoints, and the loss."""
import json
import os
import re
import shutil

import pytest
import torch

from worldvla import VocabLayout
from worldvla.mask import causal_meta
from worldvla.model import ModelConfig, WorldVLA, loss_class_weights

transformers = pytest.importorskip("transformers")


def _hf_tiny(tmp_path, swin_norm=False, seed=0, shared_qk_affine=False):
    from transformers import ChameleonConfig, ChameleonForConditionalGeneration

    torch.manual_seed(seed)
    vm = {"<image>": 90, **{f"IMGIMG{'ABCDEFGHIJ'[i]}Z": 4 + i for i in range(8)}}
    cfg = ChameleonConfig(vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                          swin_norm=swin_norm, rope_theta=10000.0, vocabulary_map=vm,
                          vq_config=dict(embed_dim=32, num_embeddings=8, base_channels=32, channel_multiplier=[1, 1],
                                         num_res_blocks=1, latent_channels=32))
    m = ChameleonForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # non-trivial norm affines, distinct per head (or one row all heads share)
        for name, p in m.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
                if shared_qk_affine and ("q_norm" in name or "k_norm" in name):
                    p.copy_(p[:1].expand_as(p))
    m.save_pretrained(tmp_path / "hf")
    return m, tmp_path / "hf"


@pytest.mark.parametrize("swin_norm", [False, True])
def test_logits_match_transformers_chameleon(tmp_path, swin_norm):
    hf, path = _hf_tiny(tmp_path, swin_norm)
    ours = WorldVLA.from_pretrained(path)
    assert ours.config.swin_norm == swin_norm and ours.config.num_key_value_heads == 2
    ids = torch.randint(12, 160, (2, 37))
    with torch.no_grad():
        ref = hf(input_ids=ids).logits.float()
        got = ours(ids, meta=causal_meta(tuple(ids.shape)))
    # transformers' Chameleon sets image-code logits to the dtype minimum; the release does not.
    cols = torch.ones(160, dtype=torch.bool)
    cols[4:12] = False
    rel = (got[..., cols] - ref[..., cols]).norm() / ref[..., cols].norm()
    assert rel <= 1e-5, rel


def test_release_folder_variants(tmp_path):
    """4.x config (rope_theta), .bin weights, vqmodel keys ignored, sharded safetensors."""
    hf, path = _hf_tiny(tmp_path)
    ours = WorldVLA.from_pretrained(path)
    ids = torch.randint(12, 160, (1, 21))
    want = ours(ids)
    cfg = json.loads((path / "config.json").read_text())
    if "rope_parameters" in cfg:  # transformers 5.x writes it; 4.x writes rope_theta already
        cfg["rope_theta"] = cfg.pop("rope_parameters")["rope_theta"]
    alt = tmp_path / "v4"
    alt.mkdir()
    (alt / "config.json").write_text(json.dumps(cfg))
    sd = dict(hf.state_dict())
    sd["model.vqmodel.quantize.embedding.weight"] = torch.randn(8, 32)
    torch.save(sd, alt / "pytorch_model.bin")
    assert torch.equal(WorldVLA.from_pretrained(alt)(ids), want)
    ours.save_pretrained(tmp_path / "sharded", shard_size_gb=20e3 / 1e9)
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert torch.equal(WorldVLA.from_pretrained(tmp_path / "sharded")(ids), want)


def test_a_saved_checkpoint_keeps_the_config_keys_the_release_reads(tmp_path):
    """The release's code builds its model from config.json keys this package does not read
    (vocabulary_map for the image tokens, vq_config, mask_image_logits, its architecture's name): a
    checkpoint loaded and saved again keeps them, with the model's own shape, RoPE and rule written
    over them; transformers' Chameleon loads the saved folder to the same logits."""
    from transformers import ChameleonForConditionalGeneration

    hf, path = _hf_tiny(tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(architectures=["ChameleonXLLMXForConditionalGeneration_ck"], mask_image_logits=False,
               z_loss_weight=1e-5, hidden_size=64)
    (path / "config.json").write_text(json.dumps(cfg))
    ours = WorldVLA.from_pretrained(path)
    ours.config.attention = "causal"  # the model's own settings win over the loaded ones
    ours.save_pretrained(tmp_path / "again")
    saved = json.loads((tmp_path / "again" / "config.json").read_text())
    for key in ("vocabulary_map", "vq_config", "architectures", "mask_image_logits", "z_loss_weight"):
        assert saved[key] == cfg[key], key
    assert saved["worldvla_attention"] == "causal" and saved["num_key_value_heads"] == 2
    assert "hf_extra" not in ours.config.to_dict()  # a checkpoint's record of the shape stays small
    again = ChameleonForConditionalGeneration.from_pretrained(tmp_path / "again").eval()
    ids = torch.randint(12, 160, (1, 19))
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits, hf(input_ids=ids).logits)


def _release_layout(folder, out):
    """A transformers-layout checkpoint rewritten as the release stores it: the q/k norms' affine
    parameters as one [1, head_dim] row (model_parallel_size 1) that every head shares."""
    from safetensors.torch import load_file, save_file

    sd = load_file(str(folder / "model.safetensors"))
    for k in [k for k in sd if "_norm." in k and ("q_norm" in k or "k_norm" in k)]:
        assert torch.equal(sd[k], sd[k][:1].expand_as(sd[k])), k  # the heads share their row
        sd[k] = sd[k][:1].clone()
    out.mkdir()
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(model_parallel_size=1, architectures=["ChameleonXLLMXForConditionalGeneration"])
    (out / "config.json").write_text(json.dumps(cfg))


def test_release_head_norm_layout(tmp_path):
    """The release's checkpoints store q_norm / k_norm as [model_parallel_size = 1, head_dim], one row
    repeated over the heads: they load (the logits of transformers' Chameleon with that row on every
    head), decode on the native step as on the modules, and save back in the same layout."""
    hf, path = _hf_tiny(tmp_path, shared_qk_affine=True)
    _release_layout(path, tmp_path / "release")
    ours = WorldVLA.from_pretrained(tmp_path / "release")
    attn = ours.model.layers[1].self_attn
    assert ours.config.model_parallel_size == 1 and attn.q_norm.weight.shape == attn.k_norm.bias.shape == (1, 16)
    ids = torch.randint(12, 160, (2, 37))
    with torch.no_grad():
        ref = hf(input_ids=ids).logits.float()
        got = ours(ids, meta=causal_meta(tuple(ids.shape)))
    cols = torch.ones(160, dtype=torch.bool)
    cols[4:12] = False  # transformers' Chameleon sets image-code logits to the dtype minimum
    rel = (got[..., cols] - ref[..., cols]).norm() / ref[..., cols].norm()
    assert rel <= 1e-5, rel

    ours.save_pretrained(tmp_path / "again")
    from safetensors.torch import load_file
    saved = load_file(str(tmp_path / "again" / "model.safetensors"))
    assert saved["model.layers.0.self_attn.k_norm.weight"].shape == (1, 16)
    assert json.loads((tmp_path / "again" / "config.json").read_text())["model_parallel_size"] == 1
    again = WorldVLA.from_pretrained(tmp_path / "again")
    assert torch.equal(again(ids), ours(ids))

    # A row the heads do not share cannot be a layout the release's code reads: refused by name.
    bad = tmp_path / "bad"
    _release_layout(path, bad)
    from safetensors.torch import save_file
    sd = load_file(str(bad / "model.safetensors"))
    for k in [k for k in sd if "q_norm" in k or "k_norm" in k]:
        sd[k] = torch.cat([sd[k]] * 3)  # 3 rows for 4 query and 2 key/value heads
    save_file(sd, str(bad / "model.safetensors"))
    with pytest.raises(ValueError, match="q_norm has 3 affine rows"):
        WorldVLA.from_pretrained(bad)


def test_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        WorldVLA.from_pretrained(tmp_path)
    m = WorldVLA(ModelConfig.tiny()).init_weights()
    m.save_pretrained(tmp_path / "ck")
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    cfg["hidden_size"] = 128
    (tmp_path / "ck" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="shape mismatches"):
        WorldVLA.from_pretrained(tmp_path / "ck")
    (tmp_path / "ck" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no weights"):
        WorldVLA.from_pretrained(tmp_path / "ck")


def test_config_and_weight_files_as_transformers_reads_them(tmp_path):
    """config.json's dtype is the saved weights' (it said bfloat16 for a float32 model, so transformers'
    dtype="auto" loaded it in bfloat16); a model.safetensors is read before a stale pytorch_model.bin beside
    it (the .bin won); a non-SiLU hidden_act is refused (it was ignored: a GELU model ran as SwiGLU)."""
    m = WorldVLA(ModelConfig.tiny()).init_weights()
    m.save_pretrained(tmp_path / "f32")
    cfg = json.loads((tmp_path / "f32" / "config.json").read_text())
    assert cfg["torch_dtype"] == cfg["dtype"] == "float32"
    WorldVLA.from_pretrained(tmp_path / "f32", dtype=torch.bfloat16).save_pretrained(tmp_path / "bf16")
    cfg = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert cfg["torch_dtype"] == cfg["dtype"] == "bfloat16"

    other = WorldVLA(ModelConfig.tiny()).init_weights(generator=torch.Generator().manual_seed(7))
    torch.save(other.state_dict(), tmp_path / "f32" / "pytorch_model.bin")
    ids = torch.randint(0, m.config.vocab_size, (1, 20))
    assert torch.equal(WorldVLA.from_pretrained(tmp_path / "f32")(ids), m(ids))

    cfg = json.loads((tmp_path / "f32" / "config.json").read_text())
    (tmp_path / "f32" / "config.json").write_text(json.dumps({**cfg, "hidden_act": "gelu"}))
    with pytest.raises(ValueError, match="unsupported hidden_act 'gelu'"):
        WorldVLA.from_pretrained(tmp_path / "f32")


def test_roundtrip_keeps_layout(tmp_path):
    m = WorldVLA(ModelConfig.tiny()).init_weights()
    m.save_pretrained(tmp_path / "ck")
    m2 = WorldVLA.from_pretrained(tmp_path / "ck")
    assert m2.layout == m.layout
    ids = torch.randint(0, m.config.vocab_size, (1, 30))
    assert torch.equal(m(ids), m2(ids))


def test_save_replaces_an_older_save_whole_and_keeps_the_callers_files(tmp_path):
    """A single-file save over a sharded one: the old shard index would win at load and bring the old
    weights back. Files the caller put in the folder (a tokenizer, a vqgan/ folder) stay."""
    old = WorldVLA(ModelConfig.tiny()).init_weights(0.02, torch.Generator().manual_seed(0))
    new = WorldVLA(ModelConfig.tiny()).init_weights(0.02, torch.Generator().manual_seed(1))
    f = tmp_path / "ck"
    old.save_pretrained(f, shard_size_gb=1e-4)
    assert (f / "model.safetensors.index.json").is_file()
    (f / "text_tokenizer.json").write_text("{}")
    (f / "vqgan").mkdir()
    (f / "vqgan" / "config.json").write_text("{}")
    new.save_pretrained(f)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # no temporary folder left behind
    assert sorted(p.name for p in f.iterdir()) == ["config.json", "model.safetensors", "text_tokenizer.json", "vqgan"]
    assert (f / "vqgan" / "config.json").read_text() == "{}"
    umask = os.umask(0o22)
    os.umask(umask)
    assert f.stat().st_mode & 0o777 == 0o777 & ~umask  # the umask's mode, not a temporary folder's 0700
    got = WorldVLA.from_pretrained(f).state_dict()
    assert all(torch.equal(v, got[k]) for k, v in new.state_dict().items())
    # Through a link to the folder: the folder is replaced and the link kept, pointing at it.
    (tmp_path / "link").symlink_to(f)
    old.save_pretrained(tmp_path / "link")
    assert (tmp_path / "link").is_symlink() and sorted(p.name for p in tmp_path.iterdir()) == ["ck", "link"]
    got = WorldVLA.from_pretrained(f).state_dict()
    assert all(torch.equal(v, got[k]) for k, v in old.state_dict().items())


def test_a_saved_folder_is_on_the_disk_before_its_name(tmp_path, monkeypatch):
    """save_model flushes every file of the new folder and the folder itself before renaming it in, then
    the parent folder (the rename): a power loss cannot leave the name on empty files."""
    flushed = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: flushed.append(os.readlink(f"/proc/self/fd/{fd}")) or real(fd))
    WorldVLA(ModelConfig.tiny()).save_pretrained(tmp_path / "ck", shard_size_gb=1e-4)
    names = [os.path.basename(p) for p in flushed]
    assert "config.json" in names and "model.safetensors.index.json" in names
    assert sum(n.startswith("model-") for n in names) == len(list((tmp_path / "ck").glob("model-*.safetensors")))
    assert names[-1] == tmp_path.name and names[-2].startswith(".ck.tmp-")  # the folder, then its parent


def test_failed_sharded_save_leaves_the_older_save(tmp_path, monkeypatch):
    """A crash partway through a sharded save over an older one used to leave a folder that loaded
    without error, a mix of old and new tensors; now the older folder stays as it was."""
    import safetensors.torch

    old = WorldVLA(ModelConfig.tiny()).init_weights(0.02, torch.Generator().manual_seed(0))
    new = WorldVLA(ModelConfig.tiny()).init_weights(0.02, torch.Generator().manual_seed(1))
    f = tmp_path / "ck"
    old.save_pretrained(f, shard_size_gb=1e-4)
    before = {p.name: p.read_bytes() for p in f.iterdir()}
    real, calls = safetensors.torch.save_file, []

    def crash_on_third(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 3:
            raise KeyboardInterrupt("simulated crash")
        return real(tensors, path, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        new.save_pretrained(f, shard_size_gb=1e-4)
    monkeypatch.setattr(safetensors.torch, "save_file", real)
    assert {p.name: p.read_bytes() for p in f.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
    got = WorldVLA.from_pretrained(f).state_dict()
    assert all(torch.equal(v, got[k]) for k, v in old.state_dict().items())


def test_bad_token_ids():
    m = WorldVLA(ModelConfig.tiny())
    with pytest.raises(ValueError, match="out of range"):
        m(torch.tensor([[0, m.config.vocab_size]]))
    with pytest.raises(TypeError):
        m(torch.zeros(1, 3))


def _action_batch(m, gen, n=3):
    from worldvla import ActionTokenizer, SequenceBuilder
    from worldvla.tokens import ByteTextTokenizer

    L = m.layout
    sb = SequenceBuilder(L, ByteTextTokenizer(L), ActionTokenizer(L, [-1] * 3, [1] * 3))
    samples = []
    for i in range(n):
        codes = [torch.randint(0, L.n_image_codes, (2, 2), generator=gen) for _ in range(2)]
        if i % 2:
            samples.append(sb.world_sample(codes[0], torch.rand(3, generator=gen) * 2 - 1, codes[1]))
        else:
            samples.append(sb.action_sample("go", codes, torch.rand(4, 3, generator=gen) * 2 - 1))
    return samples


def test_packed_equals_padded_and_single():
    gen = torch.Generator().manual_seed(1)
    m = WorldVLA(ModelConfig.tiny()).init_weights(generator=gen).eval()
    samples = _action_batch(m, gen)
    ids = torch.cat([s.input_ids for s in samples])
    cu = torch.tensor([0] + [len(s.input_ids) for s in samples]).cumsum(0)
    packed = m(ids, cu_seqlens=cu)
    for i, s in enumerate(samples):
        single = m(s.input_ids)
        torch.testing.assert_close(packed[cu[i]:cu[i + 1]], single, rtol=1e-5, atol=1e-5)


def test_chunk_mask_changes_action_logits_only_after_first_block():
    gen = torch.Generator().manual_seed(2)
    m = WorldVLA(ModelConfig.tiny()).init_weights(generator=gen).eval()
    s = _action_batch(m, gen, 1)[0]
    masked = m(s.input_ids)
    causal = m(s.input_ids, meta=causal_meta(tuple(s.input_ids.shape)))
    first_boa = int((s.input_ids == m.layout.boa).nonzero()[1])  # second block
    torch.testing.assert_close(masked[:first_boa], causal[:first_boa])
    assert (masked[first_boa:-1] - causal[first_boa:-1]).abs().max() > 1e-4


def _padded_batch(m, gen, n):
    """n action samples right-padded into ids and labels [n, L] (pad id 0, label -100)."""
    samples = _action_batch(m, gen, n)
    Lmax = max(len(s.input_ids) for s in samples)
    ids = torch.stack([torch.cat([s.input_ids, torch.zeros(Lmax - len(s.input_ids), dtype=torch.long)]) for s in samples])
    lab = torch.stack([torch.cat([s.labels, torch.full((Lmax - len(s.labels),), -100)]) for s in samples])
    return ids, lab


def test_loss_matches_release_formula():
    gen = torch.Generator().manual_seed(3)
    m = WorldVLA(ModelConfig.tiny()).init_weights(generator=gen)
    ids, lab = _padded_batch(m, gen, 2)
    loss, z = m.loss(ids, lab)
    # release: CrossEntropyLoss(weight=w) over shifted fp32 logits + 1e-5 * mean(lse^2)
    logits = m(ids)[:, :-1].reshape(-1, m.config.vocab_size)
    y = lab[:, 1:].reshape(-1)
    w = loss_class_weights(m.layout, 0.04)
    ce = torch.nn.functional.cross_entropy(logits, y, weight=w, ignore_index=-100)
    lse = torch.logsumexp(logits[y != -100], -1)
    torch.testing.assert_close(loss, ce + 1e-5 * (lse ** 2).mean(), rtol=1e-5, atol=1e-6)
    loss.backward()
    assert m.lm_head.weight.grad.abs().sum() > 0
    # Only the labelled rows, selected on the host: the same loss and gradients.
    grads = {k: p.grad.clone() for k, p in m.named_parameters()}
    m.zero_grad()
    rows = (y != -100).nonzero().squeeze(1)
    assert 0 < rows.numel() < y.numel()
    loss_rows, z_rows = m.loss(ids, lab, label_rows=rows)
    torch.testing.assert_close(loss_rows, loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(z_rows, z, rtol=1e-6, atol=1e-7)
    loss_rows.backward()
    for k, p in m.named_parameters():
        torch.testing.assert_close(p.grad, grads[k], rtol=1e-5, atol=1e-7)




@pytest.mark.parametrize("label_rows", [False, True])
def test_loss_of_an_adapted_head(label_rows, lora):
    """A LoRA-wrapped lm_head is run as a module by the loss: the release formula over its logits, and
    gradients reach the adapter's parameters (the fused loss would read only the base weight)."""
    gen = torch.Generator().manual_seed(4)
    m = WorldVLA(ModelConfig.tiny()).init_weights(generator=gen)
    ids, lab = _padded_batch(m, gen, 2)
    plain, _ = m.loss(ids, lab)
    m.lm_head = lora(m.lm_head, gen, scale=0.1)
    y = lab[:, 1:].reshape(-1)
    rows = (y != -100).nonzero().squeeze(1) if label_rows else None
    loss, z = m.loss(ids, lab, label_rows=rows)
    logits = m(ids)[:, :-1].reshape(-1, m.config.vocab_size)
    ce = torch.nn.functional.cross_entropy(logits, y, weight=loss_class_weights(m.layout, 0.04), ignore_index=-100)
    lse = torch.logsumexp(logits[y != -100], -1)
    torch.testing.assert_close(loss, ce + 1e-5 * (lse ** 2).mean(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(z, (lse ** 2).mean(), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(loss, plain)
    loss.backward()
    assert m.lm_head.a.grad.abs().sum() > 0 and m.lm_head.b.grad.abs().sum() > 0

def test_training_forward_and_backward_read_nothing_on_the_host(no_host_reads):
    """The trainer's step on the device: packed ids, metadata and labelled rows built on the host,
    ids checked there (check_ids=False). With the fused loss (the GPU's "auto"; Triton's interpreter
    here) forward and backward make no host read, so the device never waits for the host; the
    default range check is a read the mode catches. (The torch reference loss selects rows with a mask.)"""
    pytest.importorskip("triton")
    gen = torch.Generator().manual_seed(4)
    m = WorldVLA(ModelConfig.tiny()).init_weights(generator=gen)
    samples = _action_batch(m, gen, 3)
    ids = torch.cat([s.input_ids for s in samples])
    labels = torch.cat([s.labels for s in samples])
    cu = torch.tensor([0] + [len(s.input_ids) for s in samples]).cumsum(0).to(torch.int32)
    meta = m.attention_meta(ids, cu)
    rows = (labels[1:] != -100).nonzero().squeeze(1)
    ref, _ = m.loss(ids, labels, meta, label_rows=rows, backend="torch")
    with no_host_reads():
        loss, _ = m.loss(ids, labels, meta, label_rows=rows, check_ids=False, backend="triton")
        loss.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    assert m.lm_head.weight.grad.abs().sum() > 0
    with pytest.raises(AssertionError, match="host read"), no_host_reads():
        m.loss(ids, labels, meta, label_rows=rows, backend="triton")

def test_class_weights_cover_exactly_image_codes():
    L = VocabLayout.chameleon()
    w = loss_class_weights(L, 0.04)
    assert (w[4:8196] == 0.04).all() and w[3] == 1 and w[8196] == 1 and w[10006] == 1
    r = loss_class_weights(L, 0.04, release=True)  # the release's w[3:8195], cast to bfloat16 by its FSDP
    assert (r[3:8195] == 0.0400390625).all() and r[8195] == 1 and r[2] == 1
    assert (r != 0.0400390625).sum() == L.vocab_size - 8192


@pytest.mark.parametrize("alpha", [-0.04, float("nan"), float("inf"), 1e39, True, "0.04"])
def test_class_weights_refuse_a_weight_that_is_no_finite_non_negative_number(alpha):
    """A negative image weight made the CE normalizer (the sum of the label weights) negative or zero, and the
    loss nonsense; it is refused by name before any training step, as are NaN, inf (1e39 is inf in float32) and
    non-numbers."""
    with pytest.raises(ValueError, match="the image-code loss weight must be a finite number >= 0"):
        loss_class_weights(VocabLayout.chameleon(), alpha)
    m = WorldVLA(ModelConfig.tiny()).init_weights(generator=torch.Generator().manual_seed(0))
    ids = torch.randint(0, m.config.vocab_size, (1, 8))
    with pytest.raises(ValueError, match="image-code loss weight"):
        m.loss(ids, ids.clone(), image_weight=alpha)
    assert loss_class_weights(VocabLayout.chameleon(), 0)[5] == 0  # 0 (image codes out of the loss) is fine


def test_position_limit_counts_the_longest_document():
    """Positions restart in every packed document: the limit applies to the longest one, read
    from the metadata on the host; a padded row longer than the limit is refused."""
    m = WorldVLA(ModelConfig.tiny(max_position_embeddings=16)).init_weights(generator=torch.Generator().manual_seed(0))
    ids = torch.randint(10, 60, (30,))
    ids[0] = ids[16] = m.layout.bos
    m(ids, cu_seqlens=torch.tensor([0, 16, 30], dtype=torch.int32))  # documents of 16 and 14 tokens: fine
    with pytest.raises(ValueError, match="17 positions exceeds max_position_embeddings 16"):
        m(ids, cu_seqlens=torch.tensor([0, 17, 30], dtype=torch.int32))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        m(ids[None, :17])
    meta = m.attention_meta(ids, torch.tensor([0, 16, 30], dtype=torch.int32))
    assert meta.max_seqlen == 16 and torch.equal(m(ids, meta), m(ids, cu_seqlens=meta.cu_seqlens))


def test_attention_takes_one_dtype_under_autocast(monkeypatch):
    """Under bfloat16 autocast the head norms' float32 affine and the float32 rotary tables used to leave q and k
    in float32 beside a bfloat16 v, which the fused kernels refuse (auto then fell back to dense SDPA): the
    attention op now gets q, k and v in one dtype."""
    from worldvla import ops

    model = WorldVLA(ModelConfig.tiny()).init_weights()
    seen, real = [], ops.masked_attention

    def spy(q, k, v, meta, *args, **kwargs):
        seen.append((q.dtype, k.dtype, v.dtype))
        return real(q, k, v, meta, *args, **kwargs)

    monkeypatch.setattr(ops, "masked_attention", spy)
    ids = torch.randint(0, model.config.vocab_size, (1, 30))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(ids)
    assert seen and all(s == (torch.bfloat16,) * 3 for s in seen), seen
    seen.clear()
    model(ids)  # without autocast: float32 throughout, as before
    assert all(s == (torch.float32,) * 3 for s in seen), seen


def test_the_kernels_distribution_is_not_shadowed():
    """transformers (5.25 and later) imports the `kernels` distribution; the repository's own `kernels/` folder,
    importable from the repository root, must not stand in for it (conftest imports the distribution first)."""
    import importlib.metadata
    from pathlib import Path

    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("no `kernels` distribution installed")
    import kernels

    assert Path(__file__).resolve().parents[1] not in Path(kernels.__file__).resolve().parents


# ---------------------------------------------------------------------- checkpoint loading and saving


def _resave(folder, fn):
    """Rewrite a folder's model.safetensors with fn(tensors)."""
    from safetensors.torch import load_file, save_file

    sd = fn(load_file(str(folder / "model.safetensors")))
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})


def _edit_config(folder, **kw):
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(kw)
    for k in [k for k, v in kw.items() if v is None]:
        cfg.pop(k)
    (folder / "config.json").write_text(json.dumps(cfg))


def test_a_checkpoint_of_several_dtypes_loads_in_one(tmp_path):
    """bfloat16 matrices with float32 norms (as some exports write them) loaded into a model that kept both
    dtypes, and its forward failed ("expected m1 and m2 to have the same dtype"). Now it loads in one dtype, as
    transformers does: config.json's dtype, else the head's; a folder of one dtype keeps it (no copy)."""
    m = WorldVLA(ModelConfig.tiny()).init_weights(generator=torch.Generator().manual_seed(0))
    f = tmp_path / "mixed"
    m.save_pretrained(f)
    _resave(f, lambda sd: {k: v if "norm" in k else v.to(torch.bfloat16) for k, v in sd.items()})
    ids = torch.randint(0, m.config.vocab_size, (1, 20))
    for dtype_keys, want in (({"dtype": "float32", "torch_dtype": "float32"}, torch.float32),
                             ({"dtype": None, "torch_dtype": "bfloat16"}, torch.bfloat16),
                             ({"dtype": None, "torch_dtype": None}, torch.bfloat16)):  # the head's
        _edit_config(f, **dtype_keys)
        got = WorldVLA.from_pretrained(f)
        assert {p.dtype for p in got.parameters()} == {want}, dtype_keys
        ref = WorldVLA.from_pretrained(f, dtype=want)
        assert torch.equal(got(ids), ref(ids))
    # One dtype in the file: kept, whatever config.json says.
    _resave(f, lambda sd: {k: v.to(torch.bfloat16) for k, v in sd.items()})
    _edit_config(f, dtype="float32", torch_dtype="float32")
    assert {p.dtype for p in WorldVLA.from_pretrained(f).parameters()} == {torch.bfloat16}


def test_dtype_and_device_names_are_checked_before_any_file_is_read(tmp_path, monkeypatch):
    """dtype="bf16" (the command lines' name) failed in Module.to after every weight had been read, and so did a
    device torch does not have; both are now resolved first (devices.torch_dtype / torch_device)."""
    import worldvla.checkpoint as ck

    m = WorldVLA(ModelConfig.tiny()).init_weights()
    m.save_pretrained(tmp_path / "ck")
    got = WorldVLA.from_pretrained(tmp_path / "ck", dtype="bf16", device="cpu")
    assert {(p.dtype, p.device.type) for p in got.parameters()} == {(torch.bfloat16, "cpu")}
    assert next(WorldVLA.from_pretrained(tmp_path / "ck", dtype="fp16").parameters()).dtype == torch.float16
    assert next(WorldVLA.from_pretrained(tmp_path / "ck").parameters()).device.type == "cpu"  # None: the CPU
    read = []
    monkeypatch.setattr(ck, "read_weights_file", lambda path: read.append(path))
    for kw, match in (({"dtype": "int8"}, "dtype must be one of"), ({"dtype": torch.int8}, "dtype must be one of"),
                      ({"device": "gpu"}, "unknown device 'gpu'")):
        with pytest.raises(ValueError, match=match):
            WorldVLA.from_pretrained(tmp_path / "ck", **kw)
        with pytest.raises(ValueError, match=match):  # not "no such folder": checked before anything
            WorldVLA.from_pretrained(tmp_path / "nothing here", **kw)
    assert read == []


def test_weights_that_fit_no_module_are_refused_naming_their_shard(tmp_path):
    """An extra tensor (an action head) was refused as a checkpoint that "does not match its config.json", with
    no word of where it is or what to do: now its shard is named, and what to do said."""
    from safetensors.torch import load_file, save_file

    m = WorldVLA(ModelConfig.tiny()).init_weights()
    f = tmp_path / "ck"
    m.save_pretrained(f, shard_size_gb=1e-4)
    index = json.loads((f / "model.safetensors.index.json").read_text())
    shard = index["weight_map"]["lm_head.weight"]
    sd = load_file(str(f / shard))
    sd["action_head.weight"] = torch.zeros(7, 64)
    save_file(sd, str(f / shard))
    index["weight_map"]["action_head.weight"] = shard
    (f / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=rf"action_head.weight \(in {shard}\): they belong to no module of this "
                                         r"model; remove them from the checkpoint, or load them separately"):
        WorldVLA.from_pretrained(f)


def test_a_head_missing_from_an_untied_folder_says_how_a_tied_one_loads(tmp_path):
    m = WorldVLA(ModelConfig.tiny()).init_weights()
    m.save_pretrained(tmp_path / "ck")
    _resave(tmp_path / "ck", lambda sd: {k: v for k, v in sd.items() if k != "lm_head.weight"})
    with pytest.raises(ValueError, match=r"missing 1 tensors: the weights files \['model.safetensors'\].*"
                                         r"'lm_head.weight'.*\"tie_word_embeddings\": true"):
        WorldVLA.from_pretrained(tmp_path / "ck")


def _dead_pid() -> int:
    """A pid no process has (past the system's largest)."""
    try:
        return int(open("/proc/sys/kernel/pid_max").read()) + 1
    except OSError:
        return 2 ** 22 + 1


@pytest.mark.skipif(os.name != "posix", reason="a killed save's pid is checked on POSIX only")
def test_a_save_removes_what_killed_saves_left_beside_the_folder(tmp_path):
    """A save killed (SIGKILL) partway left its hidden `.ck.tmp-<pid>-*` (and `.ck.old-<pid>-*`) folder, a whole
    model each, and later saves never removed them. Now a save removes those of processes that no longer run,
    and keeps a running one's."""
    m = WorldVLA(ModelConfig.tiny()).init_weights()
    f = tmp_path / "ck"
    m.save_pretrained(f)
    dead, live = _dead_pid(), os.getpid()
    for name in (f".ck.tmp-{dead}-0123456789ab", f".ck.old-{dead}-0123456789ab", f".ck.tmp-{live}-0123456789ab",
                 f".other.tmp-{dead}-0123456789ab"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(b"\0" * 1000)
    m.save_pretrained(f)
    assert sorted(p.name for p in tmp_path.iterdir()) == \
        [f".ck.tmp-{live}-0123456789ab", f".other.tmp-{dead}-0123456789ab", "ck"]


@pytest.mark.skipif(os.name != "posix", reason="a killed save's pid is checked on POSIX only")
def test_an_older_folder_a_killed_save_set_aside_is_put_back(tmp_path):
    """A save killed between its two renames left the older folder under its hidden `.old-` name and none at
    the checkpoint's: loading says where it is, and the next save puts it back first, so its other files (a
    tokenizer) are kept as by any save."""
    old = WorldVLA(ModelConfig.tiny()).init_weights(0.02, torch.Generator().manual_seed(0))
    new = WorldVLA(ModelConfig.tiny()).init_weights(0.02, torch.Generator().manual_seed(1))
    f = tmp_path / "ck"
    old.save_pretrained(f)
    (f / "text_tokenizer.json").write_text("{}")
    aside = tmp_path / f".ck.old-{_dead_pid()}-0123456789ab"
    os.rename(f, aside)
    with pytest.raises(FileNotFoundError, match=f"left the older folder at {aside}: rename it back"):
        WorldVLA.from_pretrained(f)
    new.save_pretrained(f)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
    assert sorted(p.name for p in f.iterdir()) == ["config.json", "model.safetensors", "text_tokenizer.json"]
    got = WorldVLA.from_pretrained(f).state_dict()
    assert all(torch.equal(v, got[k]) for k, v in new.state_dict().items())


@pytest.mark.skipif(os.name != "posix", reason="a killed process's pid is checked on POSIX only")
def test_one_helper_removes_what_killed_saves_and_store_builds_left(tmp_path):
    """replace_folder and build_store each had their own code for the temporary folders a killed process left,
    named by its pid. One helper does both (`checkpoint.remove_stale`, on `sibling_name`'s names): a dead process's
    folders are removed and a running one's kept; a model folder's set-aside older folder is put back while its
    name is free; a token store's builds also remove this process's (an interrupted earlier call), and the names
    its builds gave before (no hex part)."""
    import re
    import subprocess
    import sys

    from worldvla.checkpoint import remove_stale, sibling_name

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    beyond, live, me = 2 ** 22 + 12345, os.getppid(), os.getpid()  # 2**22 is Linux's largest pid_max
    own = sibling_name(tmp_path / "ck", "tmp").name
    assert re.fullmatch(rf"\.ck\.tmp-{me}-[0-9a-f]{{12}}", own)
    names = [f".ck.tmp-{beyond}-0123456789ab", f".ck.old-{gone.pid}-0123456789ab", f".ck.tmp-{live}-0123456789ab",
             own, f".shard_00000.tmp-{beyond}-0123456789ab", f".shard_00001.tmp-{gone.pid}",
             f".shard_00002.tmp-{me}-0123456789ab", f".shard_00003.tmp-{live}-0123456789ab", "shard_00004"]
    for name in names:
        (tmp_path / name).mkdir()
        (tmp_path / name / "f").write_text(name)
    remove_stale(tmp_path, re.escape("ck"), ("tmp", "old"), restore="old")
    assert (tmp_path / "ck" / "f").read_text() == f".ck.old-{gone.pid}-0123456789ab"
    remove_stale(tmp_path, r"shard_\d+", own=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == \
        sorted([f".ck.tmp-{live}-0123456789ab", own, f".shard_00003.tmp-{live}-0123456789ab", "shard_00004", "ck"])


def _names_and_weights(folder):
    return sorted(p.name for p in folder.iterdir()), WorldVLA.from_pretrained(folder).state_dict()


def test_an_interrupt_between_the_two_renames_leaves_the_older_folder(tmp_path, monkeypatch):
    """Where the names cannot be exchanged in one step, the older folder is renamed aside, then the new one in.
    A Ctrl-C between the two deleted the new folder and left the older one under its hidden name: nothing was
    left at the checkpoint's name. Now the older folder is put back."""
    import worldvla.checkpoint as ck

    old = WorldVLA(ModelConfig.tiny()).init_weights(0.02, torch.Generator().manual_seed(0))
    new = WorldVLA(ModelConfig.tiny()).init_weights(0.02, torch.Generator().manual_seed(1))
    f = tmp_path / "ck"
    old.save_pretrained(f)
    (f / "notes.txt").write_text("mine")
    monkeypatch.setattr(ck, "exchange_names", lambda a, b: False, raising=False)  # a file system without it
    real = os.replace

    def interrupted(src, dst):
        real(src, dst)
        if ".old-" in str(dst):
            raise KeyboardInterrupt

    monkeypatch.setattr(ck.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        new.save_pretrained(f)
    monkeypatch.setattr(ck.os, "replace", real)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
    names, got = _names_and_weights(f)
    assert names == ["config.json", "model.safetensors", "notes.txt"]
    assert all(torch.equal(v, got[k]) for k, v in old.state_dict().items())
    new.save_pretrained(f)  # the same save, not interrupted, renames twice and leaves nothing behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
    names, got = _names_and_weights(f)
    assert names == ["config.json", "model.safetensors", "notes.txt"]
    assert all(torch.equal(v, got[k]) for k, v in new.state_dict().items())


def test_the_checkpoints_name_is_never_free_where_linux_exchanges_names(tmp_path, monkeypatch):
    """On Linux the older folder and the new one exchange names in one step (renameat2 RENAME_EXCHANGE): no
    moment leaves the checkpoint's name free, not even to a SIGKILL. An interrupt right after the exchange keeps
    the new folder and removes the older one."""
    import worldvla.checkpoint as ck

    probe = tmp_path / "probe"
    (probe / "a").mkdir(parents=True)
    (probe / "b").mkdir()
    if hasattr(ck, "exchange_names") and not ck.exchange_names(probe / "a", probe / "b"):
        pytest.skip("no renameat2(RENAME_EXCHANGE) here")
    shutil.rmtree(probe)
    old = WorldVLA(ModelConfig.tiny()).init_weights(0.02, torch.Generator().manual_seed(0))
    new = WorldVLA(ModelConfig.tiny()).init_weights(0.02, torch.Generator().manual_seed(1))
    f = tmp_path / "ck"
    old.save_pretrained(f)
    moved = []
    real_replace = os.replace
    monkeypatch.setattr(ck.os, "replace", lambda a, b: moved.append(str(a)) or real_replace(a, b))
    new.save_pretrained(f)
    assert str(f) not in moved  # never renamed away
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
    got = WorldVLA.from_pretrained(f).state_dict()
    assert all(torch.equal(v, got[k]) for k, v in new.state_dict().items())

    real_exchange = ck.exchange_names

    def interrupted(a, b):
        assert real_exchange(a, b)
        raise KeyboardInterrupt

    monkeypatch.setattr(ck, "exchange_names", interrupted)
    with pytest.raises(KeyboardInterrupt):
        old.save_pretrained(f)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
    got = WorldVLA.from_pretrained(f).state_dict()
    assert all(torch.equal(v, got[k]) for k, v in old.state_dict().items())


def test_config_from_hf_defaults_and_refusals():
    from worldvla.checkpoint import config_from_hf

    base = {"vocab_size": 300, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1,
            "num_attention_heads": 4}
    assert config_from_hf(base).num_key_value_heads == 4  # no grouped-query attention unless config.json says so
    with pytest.raises(ValueError, match="RoPE scaling"):
        config_from_hf({**base, "rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}})
    with pytest.raises(ValueError, match="rope_scaling"):
        config_from_hf({**base, "rope_scaling": {"type": "linear", "factor": 2.0}})


def test_the_map_names_every_resolution_token_and_sharded_saves_write_no_empty_shard(tmp_path):
    from worldvla.checkpoint import save_model, vocabulary_map

    layout = VocabLayout.compact(n_res=4)
    vm = vocabulary_map(layout)
    assert [vm[f"<reserved{8800 + n:05d}>"] for n in range(5)] == [layout.res_token(n) for n in range(5)]
    model = WorldVLA(ModelConfig.tiny())
    save_model(model, tmp_path / "m", shard_size_gb=1e-9)  # every tensor over the limit: a shard each
    index = json.loads((tmp_path / "m" / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in (tmp_path / "m").glob("model-*.safetensors"))
    assert shards == sorted(set(index["weight_map"].values())) and len(shards) == len(model.state_dict())


def test_tensors_a_bin_file_shares_load_as_parameters_of_their_own(tmp_path):
    """torch.save of a tied model stores its head as the embedding's tensor; loaded with an untied config.json,
    the two became one memory under two parameters (an optimizer stepped it twice, and a save raised "Some
    tensors share memory"). Now each is its own copy of the file's values; a config.json that says tied gets
    the same, and the folder it saves says untied, as for a tied folder without a head."""
    m = WorldVLA(ModelConfig.tiny()).init_weights(generator=torch.Generator().manual_seed(0))
    m.save_pretrained(tmp_path / "a")
    sd = dict(m.state_dict())
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    for tied in (False, True):
        f = tmp_path / f"bin-{tied}"
        f.mkdir()
        torch.save(sd, f / "pytorch_model.bin")
        (f / "config.json").write_text((tmp_path / "a" / "config.json").read_text())
        if tied:
            _edit_config(f, tie_word_embeddings=True)
        t = WorldVLA.from_pretrained(f)
        head, emb = t.lm_head.weight, t.model.embed_tokens.weight
        assert head.untyped_storage().data_ptr() != emb.untyped_storage().data_ptr()
        assert torch.equal(head, m.model.embed_tokens.weight) and torch.equal(emb, m.model.embed_tokens.weight)
        with torch.no_grad():
            head.add_(1.0)  # a step on the head leaves the embedding as it was
        assert torch.equal(emb, m.model.embed_tokens.weight)
        t.save_pretrained(tmp_path / f"again-{tied}")
        again = WorldVLA.from_pretrained(tmp_path / f"again-{tied}")
        assert torch.equal(again.lm_head.weight, head) and torch.equal(again.model.embed_tokens.weight, emb)
        assert json.loads((tmp_path / f"again-{tied}" / "config.json").read_text())["tie_word_embeddings"] is False


def test_a_tensor_in_two_shards_is_refused_naming_both(tmp_path):
    """A later shard's stale copy of a tensor that the index places in an earlier shard silently replaced it
    (the shards were merged in turn, the index's weight_map unread). Now the folder is refused, naming the
    tensor, both shards and the index's."""
    from safetensors.torch import load_file, save_file

    m = WorldVLA(ModelConfig.tiny()).init_weights(generator=torch.Generator().manual_seed(0))
    f = tmp_path / "s"
    m.save_pretrained(f, shard_size_gb=60e3 / 1e9)
    weight_map = json.loads((f / "model.safetensors.index.json").read_text())["weight_map"]
    files = sorted(set(weight_map.values()))
    key = next(k for k, name in weight_map.items() if name == files[0])
    last = load_file(str(f / files[-1]))
    last[key] = torch.zeros_like(m.state_dict()[key])
    save_file(last, str(f / files[-1]), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"{key} in both {files[0]} and {files[-1]} \(the shard index names "
                                         rf"{files[0]}\): the folder mixes two saves"):
        WorldVLA.from_pretrained(f)


def test_dropout_is_read_from_and_written_to_config_json(tmp_path):
    """The release's config.json says "dropout": 0.05; the model got 0.0 and a save wrote the stale 0.05 back,
    whatever the model was trained with. Now the model takes config.json's dropout and a save writes its own;
    a loaded model is in eval mode, so inference runs without dropout."""
    m = WorldVLA(ModelConfig.tiny()).init_weights(generator=torch.Generator().manual_seed(0)).eval()
    m.save_pretrained(tmp_path / "rel")
    assert json.loads((tmp_path / "rel" / "config.json").read_text())["dropout"] == 0.0
    _edit_config(tmp_path / "rel", dropout=0.05)
    rel = WorldVLA.from_pretrained(tmp_path / "rel")
    assert rel.config.dropout == 0.05 and rel.model.layers[0].dropout.p == 0.05
    assert "dropout" not in (rel.config.hf_extra or {})
    ids = torch.randint(m.layout.text_base, m.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    assert not rel.training and torch.equal(rel(ids), m(ids))
    rel.config.dropout = 0.1  # a fine-tune's (the trainer's --dropout)
    rel.save_pretrained(tmp_path / "ft")
    assert json.loads((tmp_path / "ft" / "config.json").read_text())["dropout"] == 0.1
    assert WorldVLA.from_pretrained(tmp_path / "ft").config.dropout == 0.1


def test_a_vocab_size_other_than_the_layouts_is_refused(tmp_path):
    """ModelConfig.tiny(vocab_size=640) over a 619-id layout built a model whose loss then failed ("class_weight
    must be [V=640]"); with 600 the layout's own ids lay outside the embedding. Both are refused when the model
    is built, and a config.json that says so is refused naming its folder."""
    n = VocabLayout.compact(n_image_codes=64).vocab_size
    for v in (n + 21, n - 19):
        with pytest.raises(ValueError, match=rf"vocab_size {v} differs from its layout's vocabulary of {n} ids: "
                                             rf"give vocab_size={n}"):
            WorldVLA(ModelConfig.tiny(vocab_size=v))
    WorldVLA(ModelConfig.tiny()).save_pretrained(tmp_path / "ck")
    _edit_config(tmp_path / "ck", vocab_size=n + 21)
    with pytest.raises(ValueError, match=rf"checkpoint {tmp_path / 'ck'}: .*vocab_size {n + 21} differs"):
        WorldVLA.from_pretrained(tmp_path / "ck")


def test_empty_input_is_refused():
    """No tokens failed in torch.max ("Expected reduction dim to be specified..."); now it says so."""
    m = WorldVLA(ModelConfig.tiny()).init_weights(generator=torch.Generator().manual_seed(0)).eval()
    for shape in ((2, 0), (0,), (0, 5)):
        with pytest.raises(ValueError, match=rf"input_ids of shape {re.escape(str(shape))} hold no tokens: give at "
                                             r"least one token per sequence"):
            m(torch.zeros(shape, dtype=torch.long))
        with pytest.raises(ValueError, match="hold no tokens"):
            m.loss(torch.zeros(shape, dtype=torch.long), torch.zeros(shape, dtype=torch.long))


def test_metadata_built_for_other_ids_is_refused_naming_both_shapes():
    """Metadata built for other ids failed in a reshape ("shape '[2, 10]' is invalid for input of size 18") or in
    the attention, with the shapes it had made of them; now the metadata's and the ids' shapes are named, and
    what to do."""
    from worldvla.mask import chunk_mask_meta

    m = WorldVLA(ModelConfig.tiny()).init_weights(generator=torch.Generator().manual_seed(0)).eval()
    ids = torch.randint(m.layout.text_base, m.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(1))
    for meta in (causal_meta((2, 9)), causal_meta((20,)), chunk_mask_meta(ids[:, :9], m.layout)):
        with pytest.raises(ValueError, match=r"meta was built for input_ids of shape \((2, 9|20,)\), but input_ids "
                                             r"have shape \(2, 10\): build it from these ids"):
            m(ids, meta=meta)
    with pytest.raises(ValueError, match=r"shape \(19,\), but input_ids have shape \(20,\)"):
        m(ids.flatten(), meta=causal_meta((19,), cu_seqlens=torch.tensor([0, 10, 19])))
    assert torch.equal(m(ids, meta=causal_meta((2, 10))), m(ids, meta=causal_meta((2, 10))))
    assert m(ids[0], meta=causal_meta((1, 10))).shape == (10, m.config.vocab_size)  # one sequence, batched meta


def test_rope_parameters_are_read_beside_rope_theta(tmp_path):
    """A folder this package saves holds rope_theta (transformers 4.x) and rope_parameters (5.x, which reads only
    it). An edited or scaled rope_parameters was ignored whenever rope_theta stood beside it: another model than
    transformers builds, or a RoPE scaling loaded as plain RoPE, without a word."""
    m = WorldVLA(ModelConfig.tiny()).init_weights(generator=torch.Generator().manual_seed(0))
    m.save_pretrained(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["rope_theta"] == cfg["rope_parameters"]["rope_theta"]
    _edit_config(tmp_path / "m", rope_parameters={"rope_type": "default", "rope_theta": 5e5})
    with pytest.raises(ValueError, match=r"two RoPE bases, rope_theta 10000.0 and rope_parameters' rope_theta 500000"):
        WorldVLA.from_pretrained(tmp_path / "m")
    _edit_config(tmp_path / "m", rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 1e4})
    with pytest.raises(ValueError, match="unsupported RoPE scaling"):
        WorldVLA.from_pretrained(tmp_path / "m")
    _edit_config(tmp_path / "m", rope_theta=None, rope_parameters={"rope_type": "default", "rope_theta": 5e5})
    assert WorldVLA.from_pretrained(tmp_path / "m").config.rope_theta == 5e5


def test_a_bin_that_is_not_a_state_dict_is_named(tmp_path):
    """pytorch_model.bin holding a training checkpoint, a list or a non-tensor entry crashed in the loader with
    "'collections.OrderedDict' object has no attribute 'numel'" and the like, naming neither file nor problem."""
    m = WorldVLA(ModelConfig.tiny()).init_weights(generator=torch.Generator().manual_seed(0))
    m.save_pretrained(tmp_path / "ref")
    sd = dict(m.state_dict())
    cases = [({"model": sd, "step": 3}, r"not a state dict of named tensors \(found 'model': a dict\); it looks like "
                                        r"a training checkpoint: save its 'model' entry alone"),
             (list(sd.values()), r"not a state dict of named tensors \(found a list\)"),
             ({**sd, "step": 3}, r"not a state dict of named tensors \(found 'step': a int\)$")]
    for i, (obj, message) in enumerate(cases):
        f = tmp_path / f"bin{i}"
        f.mkdir()
        (f / "config.json").write_text((tmp_path / "ref" / "config.json").read_text())
        torch.save(obj, f / "pytorch_model.bin")
        with pytest.raises(ValueError, match=re.escape(str(f / "pytorch_model.bin")) + ": " + message):
            WorldVLA.from_pretrained(f)


def test_a_tied_config_with_a_head_of_its_own_is_saved_untied(tmp_path):
    """config.json saying tied beside a head stored apart: the head loads as stored (as transformers 5 loads it),
    and the folder saved from it said tied still, which a library that ties (transformers 4.x) would read as the
    embedding in place of the head written out. It says untied now."""
    m = WorldVLA(ModelConfig.tiny()).init_weights(generator=torch.Generator().manual_seed(0))
    m.save_pretrained(tmp_path / "m")
    _edit_config(tmp_path / "m", tie_word_embeddings=True)
    loaded = WorldVLA.from_pretrained(tmp_path / "m")
    assert torch.equal(loaded.lm_head.weight, m.lm_head.weight)
    loaded.save_pretrained(tmp_path / "again")
    assert json.loads((tmp_path / "again" / "config.json").read_text())["tie_word_embeddings"] is False


def test_loss_takes_its_image_weight():
    """`loss(image_weight=a)` weighs the image-code targets by a (the class weights of `loss_class_weights`), not by
    the default 0.04 whatever it is given."""
    gen = torch.Generator().manual_seed(5)
    m = WorldVLA(ModelConfig.tiny()).init_weights(generator=gen)
    ids, lab = _padded_batch(m, gen, 2)
    image = torch.tensor(sorted(m.layout.image_code_ids))
    assert torch.isin(lab, image).any()  # the weight has targets to act on
    with torch.no_grad():
        half, _ = m.loss(ids, lab, image_weight=0.5)
        want, _ = m.loss(ids, lab, class_weight=loss_class_weights(m.layout, 0.5))
        default, _ = m.loss(ids, lab)
    torch.testing.assert_close(half, want, rtol=1e-6, atol=1e-7)
    assert not torch.allclose(half, default)


def test_a_folder_without_the_packages_attention_key_loads_with_the_chunk_rule(tmp_path):
    """The release's config.json (and transformers') has no worldvla_attention: the release's model was trained
    under the chunk rule, so such a folder loads with it, not as a plain causal model."""
    WorldVLA(ModelConfig.tiny()).save_pretrained(tmp_path / "ck")
    _edit_config(tmp_path / "ck", worldvla_attention=None)
    assert WorldVLA.from_pretrained(tmp_path / "ck").config.attention == "chunk"


def test_a_stale_model_parallel_size_is_not_written_back(tmp_path):
    """config.json says model_parallel_size 1 (the release's shared head-norm row) beside per-head q/k norm rows
    (weights converted to transformers' layout): the model loads per head, and its save does not carry the
    stale key over, which the release's code would read as one shared row."""
    m = WorldVLA(ModelConfig.tiny()).init_weights(generator=torch.Generator().manual_seed(0))
    m.save_pretrained(tmp_path / "ck")
    _edit_config(tmp_path / "ck", model_parallel_size=1)
    loaded = WorldVLA.from_pretrained(tmp_path / "ck")
    assert loaded.config.model_parallel_size is None
    assert loaded.model.layers[0].self_attn.q_norm.weight.shape[0] == m.config.num_attention_heads
    loaded.save_pretrained(tmp_path / "again")
    assert "model_parallel_size" not in json.loads((tmp_path / "again" / "config.json").read_text())


def test_an_atomic_file_write_is_on_the_disk_before_its_name(tmp_path, monkeypatch):
    """write_text_atomic flushes the temporary file before renaming it over the name, then the folder: a power
    loss cannot leave the name on an empty file."""
    from worldvla.checkpoint import write_text_atomic

    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
                        or real_fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: events.append(("replace", str(a))) or real_replace(a, b))
    write_text_atomic(tmp_path / "run.json", '{"step": 3}')
    tmp = next(p for kind, p in events if kind == "replace")
    assert events.index(("fsync", tmp)) < events.index(("replace", tmp))
    assert events[-1] == ("fsync", str(tmp_path))
    assert (tmp_path / "run.json").read_text() == '{"step": 3}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.json"]


@pytest.mark.skipif(os.name != "posix", reason="a killed save's pid is checked on POSIX only")
def test_a_folder_of_another_users_running_process_is_kept(tmp_path, monkeypatch):
    """A process that may not be signalled (another user's: PermissionError) still runs: the folder its save is
    writing is kept, not removed as a killed save's."""
    from worldvla.checkpoint import remove_stale

    def kill(pid, sig):
        raise PermissionError(1, "Operation not permitted")

    name = ".ck.tmp-4242-0123456789ab"
    (tmp_path / name).mkdir()
    monkeypatch.setattr(os, "kill", kill)
    remove_stale(tmp_path, re.escape("ck"), ("tmp", "old"), restore="old")
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


@pytest.mark.skipif(os.name != "posix", reason="a killed save's pid is checked on POSIX only")
def test_the_newest_of_two_set_aside_folders_is_put_back(tmp_path):
    """Two saves killed between their renames left two older folders aside: the newer of them (the last
    complete save) is put back at the checkpoint's name, and the other removed."""
    from worldvla.checkpoint import remove_stale

    dead = _dead_pid()
    older, newer = tmp_path / f".ck.old-{dead}-0123456789ab", tmp_path / f".ck.old-{dead}-ba9876543210"
    for p, when in ((older, 1_000_000), (newer, 2_000_000)):
        p.mkdir()
        (p / "f").write_text(p.name)
        os.utime(p, (when, when))
    remove_stale(tmp_path, re.escape("ck"), ("tmp", "old"), restore="old")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
    assert (tmp_path / "ck" / "f").read_text() == newer.name


def test_replace_folder_keeps_what_write_wrote_over_the_older_folders_file(tmp_path):
    """An entry that both the older folder holds and `write` writes is the new one; the older folder's other
    entries that `keep` picks are carried over."""
    from worldvla.checkpoint import replace_folder

    f = tmp_path / "out"
    f.mkdir()
    (f / "notes.txt").write_text("old")
    (f / "mine.txt").write_text("kept")
    replace_folder(f, lambda tmp: (tmp / "notes.txt").write_text("new"), keep=lambda name: True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert {p.name: p.read_text() for p in f.iterdir()} == {"notes.txt": "new", "mine.txt": "kept"}


def test_a_shard_index_is_read_before_a_stale_bin_beside_it(tmp_path):
    """Sharded safetensors with their index beside an older pytorch_model.bin: the shards are read (transformers'
    order), not the stale .bin."""
    new = WorldVLA(ModelConfig.tiny()).init_weights(0.02, torch.Generator().manual_seed(0))
    old = WorldVLA(ModelConfig.tiny()).init_weights(0.02, torch.Generator().manual_seed(1))
    f = tmp_path / "ck"
    new.save_pretrained(f, shard_size_gb=1e-4)
    assert (f / "model.safetensors.index.json").is_file()
    torch.save(old.state_dict(), f / "pytorch_model.bin")
    got = WorldVLA.from_pretrained(f).state_dict()
    assert all(torch.equal(v, got[k]) for k, v in new.state_dict().items())


def views_of_one_buffer(tensors: dict, off_boundary=(), off_by: int = 1) -> tuple[torch.Tensor, dict]:
    """(flat, views): float32 `tensors` copied into views of one flat buffer, as an FSDP flat-parameter save
    holds them; each view starts on a 16-byte boundary, those named in `off_boundary` `off_by` elements (4 bytes
    each) past one."""
    offsets, n = {}, 0
    for k, v in tensors.items():
        n = -(-n // 4) * 4 + (off_by if k in off_boundary else 0)
        offsets[k] = n
        n += v.numel()
    flat = torch.zeros(n)
    views = {k: flat[offsets[k]:offsets[k] + v.numel()].view(v.shape) for k, v in tensors.items()}
    for k, v in tensors.items():
        views[k].copy_(v)
    return flat, views


def load_bin_folder(folder, tensors: dict, config_from) -> WorldVLA:
    """A WorldVLA loaded from `folder`, written to hold `tensors` as its pytorch_model.bin and the config.json
    of the checkpoint folder `config_from`."""
    folder.mkdir()
    torch.save(tensors, folder / "pytorch_model.bin")
    (folder / "config.json").write_text((config_from / "config.json").read_text())
    return WorldVLA.from_pretrained(folder)


def test_a_bin_whose_buffer_also_holds_the_vqgan_keeps_only_the_models_weights(tmp_path):
    """pytorch_model.bin whose tensors are views of one flat buffer that also holds the release's vqmodel.*
    tensors, which are not loaded: views kept of the buffer would hold all of it with the model. The model's
    tensors get copies of their own instead, of the file's values."""
    m = WorldVLA(ModelConfig.tiny()).init_weights(generator=torch.Generator().manual_seed(0))
    m.save_pretrained(tmp_path / "ref")
    sd = {k: v.detach().clone() for k, v in m.state_dict().items()}
    vq = torch.randn(4 * sum(v.numel() for v in sd.values()) // 64, 64)
    tensors = {**sd, "model.vqmodel.quantize.embedding.weight": vq}
    flat, views = views_of_one_buffer(tensors)  # every view aligned: only the unused buffer calls for copies
    params = dict(load_bin_folder(tmp_path / "bin", views, tmp_path / "ref").state_dict())
    assert all(torch.equal(params[k], v) for k, v in sd.items())
    storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in params.values()}
    assert sum(storages.values()) == sum(p.nbytes for p in params.values()) < flat.nbytes


def test_the_releases_bare_vqmodel_keys_are_ignored(tmp_path):
    """The release's checkpoints name the VQGAN's tensors vqmodel.* (or model.vqmodel.*): neither is refused as a
    tensor of no module."""
    m = WorldVLA(ModelConfig.tiny()).init_weights(generator=torch.Generator().manual_seed(0))
    m.save_pretrained(tmp_path / "ck")
    _resave(tmp_path / "ck", lambda sd: {**sd, "vqmodel.quantize.embedding.weight": torch.randn(8, 4),
                                         "model.vqmodel.encoder.conv_in.weight": torch.randn(4, 3, 3, 3)})
    got = WorldVLA.from_pretrained(tmp_path / "ck").state_dict()
    assert sorted(got) == sorted(m.state_dict())
    assert all(torch.equal(v, got[k]) for k, v in m.state_dict().items())


def test_a_shard_index_without_a_weight_map_is_refused_naming_it(tmp_path):
    """A damaged shard index (no weight_map) is refused naming the file and the problem."""
    WorldVLA(ModelConfig.tiny()).save_pretrained(tmp_path / "ck", shard_size_gb=1e-4)
    index = tmp_path / "ck" / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": 0}}))
    with pytest.raises(ValueError, match=re.escape(str(index)) + ": no 'weight_map' object; the shard index is "
                                                                 "damaged"):
        WorldVLA.from_pretrained(tmp_path / "ck")


def test_shared_head_norm_rows_go_to_consecutive_heads():
    """The release's [model_parallel_size, head_dim] q/k norm affine is repeat-interleaved over the heads (spec 5.1):
    with 2 rows over 4 heads, heads 0 and 1 take row 0 and heads 2 and 3 row 1 (a tiled repeat gave heads 0 and 2
    row 0, and the release's checkpoints, of one row, could not tell the two apart). Each head is normalized over
    its head_dim (eps 1e-5, biased variance) before the affine."""
    from worldvla.model import HeadLayerNorm

    gen = torch.Generator().manual_seed(7)
    norm = HeadLayerNorm(4, 6, rows=2)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(2, 6, generator=gen))
        norm.bias.copy_(torch.randn(2, 6, generator=gen))
    x = torch.randn(3, 5, 4, 6, generator=gen, dtype=torch.float64)
    got = norm.double()(x)
    for h in range(4):
        xh = x[..., h, :]
        unit = (xh - xh.mean(-1, keepdim=True)) / torch.sqrt(xh.var(-1, unbiased=False, keepdim=True) + 1e-5)
        row = h // 2
        torch.testing.assert_close(got[..., h, :], unit * norm.weight[row] + norm.bias[row], rtol=1e-12, atol=1e-12)


def test_rope_tables_follow_rope_theta_and_the_positions():
    """cos/sin of position p, frequency i: p * theta^(-2i / head_dim), the half-dim table repeated (rotate-half
    RoPE); a model's rope_theta reaches its attention (the release's 10000 is only a default)."""
    from worldvla.model import rope_cos_sin

    pos = torch.tensor([[0, 1, 5, 300]])
    for theta in (10000.0, 500000.0):
        cos, sin = rope_cos_sin(pos, 8, theta, torch.float64)
        inv = torch.tensor([theta ** (-2 * i / 8) for i in range(4)], dtype=torch.float64)
        ang = pos[0].double()[:, None] * inv
        assert cos.shape == (1, 4, 1, 8)
        torch.testing.assert_close(cos[0, :, 0], torch.cat([ang, ang], -1).cos(), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(sin[0, :, 0], torch.cat([ang, ang], -1).sin(), rtol=1e-6, atol=1e-6)
    gen = torch.Generator().manual_seed(8)
    base = WorldVLA(ModelConfig.tiny()).init_weights(generator=gen).eval()
    wide = WorldVLA(ModelConfig.tiny(rope_theta=500000.0)).eval()
    wide.load_state_dict(base.state_dict())
    ids = torch.randint(12, 60, (1, 24), generator=gen)
    with torch.no_grad():
        assert (base(ids) - wide(ids))[:, 1:].abs().max() > 1e-4  # position 0 is not rotated: equal there
        torch.testing.assert_close(base(ids)[:, 0], wide(ids)[:, 0])


def test_a_causal_model_attends_causally_and_returns_float32_logits():
    """attention="causal" (the ablation) masks plainly causally where the default model takes the chunk rule:
    its logits are those of the same weights under causal metadata. Logits come out float32 from a bfloat16
    model too, as the release computes them."""
    gen = torch.Generator().manual_seed(9)
    chunk = WorldVLA(ModelConfig.tiny()).init_weights(generator=gen).eval()
    causal = WorldVLA(ModelConfig.tiny(attention="causal")).eval()
    causal.load_state_dict(chunk.state_dict())
    ids = _action_batch(chunk, gen, 1)[0].input_ids
    with torch.no_grad():
        want = chunk(ids, meta=causal_meta(tuple(ids.shape)))
        torch.testing.assert_close(causal(ids), want, rtol=0, atol=0)
        assert (chunk(ids) - want).abs().max() > 1e-4
        low = chunk.to(torch.bfloat16)(ids)
    assert low.dtype == torch.float32 and low.shape == (ids.numel(), chunk.config.vocab_size)


def test_init_weights_scales_the_residual_projections_and_keeps_the_norms_identity():
    """Matrices draw N(0, std), the attention and MLP output projections N(0, std / sqrt(2 * layers)); every norm,
    the q/k head norms (2-D parameters) included, starts as the identity: weights one, biases zero."""
    cfg = ModelConfig.small(num_hidden_layers=8)
    m = WorldVLA(cfg).init_weights(std=0.02, generator=torch.Generator().manual_seed(10))
    resid = 0.02 / (2 * 8) ** 0.5
    for name, p in m.named_parameters():
        if "norm" in name:
            assert torch.equal(p, torch.ones_like(p) if name.endswith("weight") else torch.zeros_like(p)), name
        elif name.endswith(("o_proj.weight", "down_proj.weight")):
            assert abs(p.std().item() - resid) < 0.05 * resid, name
        else:
            assert abs(p.std().item() - 0.02) < 0.05 * 0.02, name


def test_a_model_parallel_size_that_does_not_divide_the_kv_heads_is_refused_by_name():
    """4 query heads and 2 key/value heads: 4 shared affine rows fit the query norm but not the key norm."""
    with pytest.raises(ValueError, match="model_parallel_size 4 .* must divide the 4 query and 2 key/value heads"):
        WorldVLA(ModelConfig.tiny(model_parallel_size=4))
    assert WorldVLA(ModelConfig.tiny(model_parallel_size=2)).model.layers[0].self_attn.k_norm.weight.shape == (2, 16)


def test_saved_weights_are_readable_as_the_umask_allows(tmp_path):
    """safetensors writes its files 0o600 whatever the umask: a model or VQGAN saved for a team (a policy served
    from another account) was unreadable to everyone but its writer. Saves give them the umask's mode."""
    from worldvla.vqgan import VQGAN, VQGANConfig

    old = os.umask(0o022)
    try:
        WorldVLA(ModelConfig.tiny()).save_pretrained(tmp_path / "one")
        WorldVLA(ModelConfig.tiny()).save_pretrained(tmp_path / "sharded", shard_size_gb=1e-4)
        VQGAN(VQGANConfig(ch=32, ch_mult=(1, 1), num_res_blocks=1, z_channels=8, embed_dim=8,
                          n_embed=16)).save_pretrained(tmp_path / "vq")
    finally:
        os.umask(old)
    files = [*(tmp_path / "one").iterdir(), *(tmp_path / "sharded").iterdir(), *(tmp_path / "vq").iterdir()]
    assert len([f for f in files if f.suffix == ".safetensors"]) > 3
    # Keyed by the path under tmp_path: the model's and the VQGAN's model.safetensors share a name.
    modes = {str(f.relative_to(tmp_path)): oct(f.stat().st_mode & 0o777) for f in files}
    assert modes == dict.fromkeys(modes, "0o644") and "one/model.safetensors" in modes


def test_linking_a_model_folder_brings_shards_an_index_names_in_a_subfolder(tmp_path):
    """A shard index may name its shards by a path in a subfolder (the loader reads them there): the linked folder
    gets them at the same paths, and loads the same weights."""
    from worldvla.checkpoint import link_model_files

    model = WorldVLA(ModelConfig.tiny()).init_weights(generator=torch.Generator().manual_seed(0))
    src = tmp_path / "src"
    model.save_pretrained(src, shard_size_gb=1e-4)
    index_path = src / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    (src / "shards").mkdir()
    for name in shards:
        (src / name).rename(src / "shards" / name)
    index["weight_map"] = {k: f"shards/{v}" for k, v in index["weight_map"].items()}
    index_path.write_text(json.dumps(index))

    assert link_model_files(src, tmp_path / "dst")
    got = sorted(str(p.relative_to(tmp_path / "dst")) for p in (tmp_path / "dst").rglob("*") if p.is_file())
    assert got == sorted(["config.json", "model.safetensors.index.json", *(f"shards/{n}" for n in shards)])
    loaded = WorldVLA.from_pretrained(tmp_path / "dst").state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())


def test_linking_a_model_folder_refuses_a_folder_that_exists(tmp_path):
    """The files go into a new folder: one already there (another model's shards in it) is refused as it is, not
    mixed with this model's files."""
    from worldvla.checkpoint import link_model_files

    WorldVLA(ModelConfig.tiny()).save_pretrained(tmp_path / "src")
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "model-00001-of-00002.safetensors").write_bytes(b"another model's shard")
    with pytest.raises(FileExistsError):
        link_model_files(tmp_path / "src", dst)
    assert [p.name for p in dst.iterdir()] == ["model-00001-of-00002.safetensors"]


def test_an_atomic_write_removes_the_temporary_files_of_killed_writes(tmp_path):
    """A write killed between creating its temporary file and renaming it (SIGKILL, an out-of-memory kill) left
    the file for good. The next write of the same name removes those of processes that no longer run, and keeps
    a running process's (a write under way) and other names'."""
    import subprocess
    import sys

    from worldvla.checkpoint import sibling_name, write_text_atomic

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    target = tmp_path / "metrics.json"
    killed = target.with_name(f".metrics.json.tmp-{dead_pid}-0123456789ab")
    running = sibling_name(target, "tmp")  # this process's: a write under way in another thread
    other = tmp_path / f".other.json.tmp-{dead_pid}-0123456789ab"
    for p in (killed, running, other):
        p.write_text("half")
    write_text_atomic(target, "{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([target.name, running.name, other.name])
    assert target.read_text() == "{}"


@pytest.mark.skipif(os.name != "posix", reason="a killed write's pid is checked on POSIX only")
@pytest.mark.parametrize("name", ["a+b.json", "run (1.json", "demo[2].json", "v1.2.json"])
def test_an_atomic_write_finds_the_temporary_files_of_a_name_with_pattern_characters(tmp_path, name):
    """The name is matched as it is, not as a pattern: a `+`, an unclosed `(` or a `[...]` in it must neither
    hide its own killed writes' files nor fail the write, and `.` stands for a dot only (another name's file is
    kept)."""
    from worldvla.checkpoint import write_text_atomic

    target = tmp_path / name
    killed = tmp_path / f".{name}.tmp-{_dead_pid()}-0123456789ab"
    lookalike = tmp_path / f".{name.replace('.', '_')}.tmp-{_dead_pid()}-0123456789ab"
    for p in (killed, lookalike):
        p.write_text("half")
    write_text_atomic(target, "{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([target.name, lookalike.name])
    assert target.read_text() == "{}"


def test_loss_takes_its_z_weight():
    """`loss(z_weight=w)` adds w times the mean squared log-normalizer of the labelled rows (spec 2.5), on the
    fused head and on an adapted one, not the default 1e-5 whatever it is given."""
    gen = torch.Generator().manual_seed(6)
    m = WorldVLA(ModelConfig.tiny()).init_weights(generator=gen)
    ids, lab = _padded_batch(m, gen, 2)
    with torch.no_grad():
        logits = m(ids)[:, :-1].reshape(-1, m.config.vocab_size)
        y = lab[:, 1:].reshape(-1)
        ce = torch.nn.functional.cross_entropy(logits, y, weight=loss_class_weights(m.layout, 0.04), ignore_index=-100)
        z_want = (torch.logsumexp(logits[y != -100], -1) ** 2).mean()
        for head in ("plain", "hooked"):
            if head == "hooked":  # a hooked head runs as a module: the loss over its logits
                m.lm_head.register_forward_hook(lambda mod, args, out: out)
            for w in (0.0, 0.1):
                loss, z = m.loss(ids, lab, z_weight=w)
                torch.testing.assert_close(z, z_want, rtol=1e-5, atol=1e-6)
                torch.testing.assert_close(loss, ce + w * z_want, rtol=1e-5, atol=1e-6)
    assert z_want > 1  # a z term that tells the weights apart at these tolerances


def test_metadata_with_an_unknown_longest_document_still_has_its_positions_counted():
    """max_seqlen 0 (unknown, as hand-built metadata may leave it): the positions themselves are read, and a row of
    max_position_embeddings + 1 tokens is refused as when the metadata gives its length."""
    m = WorldVLA(ModelConfig.tiny(max_position_embeddings=16)).init_weights(generator=torch.Generator().manual_seed(0))
    ids = torch.randint(10, 60, (1, 17), generator=torch.Generator().manual_seed(1))
    meta = m.attention_meta(ids)
    meta.max_seqlen = 0
    with pytest.raises(ValueError, match="17 positions exceeds max_position_embeddings 16"):
        m(ids, meta)
    fits = m.attention_meta(ids[:, :16])
    fits.max_seqlen = 0
    assert torch.equal(m(ids[:, :16], fits), m(ids[:, :16]))


def test_labels_of_another_shape_than_the_ids_are_refused_naming_both():
    """Labels one token longer than the ids (a row built off by one) gave an error about the loss's rows, far
    from the cause."""
    m = WorldVLA(ModelConfig.tiny()).init_weights(generator=torch.Generator().manual_seed(0))
    ids = torch.randint(10, 60, (2, 6), generator=torch.Generator().manual_seed(1))
    for labels in (torch.randint(10, 60, (2, 7)), ids.flatten()):
        with pytest.raises(ValueError, match=rf"labels {re.escape(str(tuple(labels.shape)))} must match input_ids "
                                             r"\(2, 6\)"):
            m.loss(ids, labels)


def test_key_value_heads_that_do_not_divide_the_query_heads_are_refused_by_name():
    """Grouped-query attention shares each key/value head among heads / kv_heads query heads: 3 key/value heads
    cannot be shared by 4 query heads."""
    with pytest.raises(ValueError, match="num_key_value_heads 3 must divide num_attention_heads 4"):
        WorldVLA(ModelConfig.tiny(num_key_value_heads=3))
    with pytest.raises(ValueError, match="hidden_size 64 is not divisible by num_attention_heads 3"):
        WorldVLA(ModelConfig.tiny(num_attention_heads=3, num_key_value_heads=1))
    assert WorldVLA(ModelConfig.tiny(num_key_value_heads=1)).model.layers[0].self_attn.k_proj.weight.shape == (16, 64)


def test_an_odd_head_dim_and_an_unknown_attention_mode_are_refused_by_name():
    """Rotate-half RoPE pairs a head's two halves: 60 / 4 = 15 dimensions cannot be split. The attention mode is one
    of two rules; another name would have run as plain causal attention."""
    with pytest.raises(ValueError, match="head_dim 15 must be even for RoPE"):
        WorldVLA(ModelConfig.tiny(hidden_size=60))
    with pytest.raises(ValueError, match=r"attention must be one of \('chunk', 'causal'\), got 'full'"):
        WorldVLA(ModelConfig.tiny(attention="full"))


def test_bool_ids_are_refused_by_name():
    """A bool tensor (a mask passed where ids go) failed in the embedding with an error about its indices."""
    m = WorldVLA(ModelConfig.tiny())
    ids = torch.tensor([[True, False, True]])
    with pytest.raises(TypeError, match="input_ids must be integer token ids, got torch.bool"):
        m(ids)
    with pytest.raises(TypeError, match="input_ids must be integer token ids, got torch.bool"):
        m.loss(ids, ids.long())


def test_rms_norms_take_the_configs_eps_and_round_as_transformers_chameleon():
    """Every RMSNorm of a model divides by sqrt(mean square + rms_norm_eps), the config's eps (not a fixed 1e-5), and
    a bfloat16 model's rounds the normalized rows to bfloat16 before the weight multiplies them, as transformers'
    ChameleonRMSNorm does (the float32 product rounded once differs in the last bit of some values): the same
    values bit for bit in float32 and in bfloat16."""
    from transformers.models.chameleon.modeling_chameleon import ChameleonRMSNorm

    gen = torch.Generator().manual_seed(30)
    for dtype in (torch.float32, torch.bfloat16):
        m = WorldVLA(ModelConfig.tiny(rms_norm_eps=0.25)).to(dtype)
        ref = ChameleonRMSNorm(64, eps=0.25).to(dtype)
        with torch.no_grad():
            ref.weight.copy_(torch.randn(64, generator=gen) + 1)
        x = (torch.randn(3, 5, 64, generator=gen) * 0.5).to(dtype)  # mean square ~0.25: the eps weighs as much
        want = ref(x)
        for norm in (m.model.norm, m.model.layers[0].input_layernorm, m.model.layers[1].post_attention_layernorm):
            norm.load_state_dict(ref.state_dict())
            got = norm(x)
            assert got.dtype == want.dtype and torch.equal(got, want), (dtype, (got - want).abs().max())


def test_a_dropout_of_one_is_refused_by_name():
    """A dropout rate of 1 zeroes every residual branch in training (the layers then learn nothing): the range is
    [0, 1), its upper end refused as a rate above it is; a rate just below 1 builds."""
    with pytest.raises(ValueError, match=r"dropout must be a number in \[0, 1\), got 1.0"):
        WorldVLA(ModelConfig.tiny(dropout=1.0))
    assert WorldVLA(ModelConfig.tiny(dropout=0.99)).model.layers[0].dropout.p == 0.99


def _cached_in_pieces(m, rows, steps, backend):
    """Hidden states [L_b, H] of each sequence of `rows` fed through a KVCache: step j writes steps[j][b] more
    tokens of row b, the step padded to the most of them as the engine's prefill pads (pad ids in the slots
    past kv_len, which the row's later steps overwrite). The DecodeMeta holds the chunk rule of the whole
    sequences: kv_block of every slot, the q_limit of each step's rows."""
    from worldvla.mask import NO_BLOCK, DecodeMeta, chunk_mask_meta
    from worldvla.model import KVCache

    B, S = len(rows), max(len(r) for r in rows) + max(max(s) for s in steps)
    metas = [chunk_mask_meta(r, m.layout) for r in rows]
    kv_block = torch.full((B, S), NO_BLOCK, dtype=torch.int32)
    for b, meta in enumerate(metas):
        kv_block[b, :len(rows[b])] = meta.kv_block
    cache, cur = KVCache(m.config, B, S), [0] * B
    out = [torch.full((len(r), m.config.hidden_size), float("nan")) for r in rows]
    for step in steps:
        Q = max(step)
        ids = torch.full((B, Q), m.layout.pad, dtype=torch.long)
        q_limit = torch.full((B, Q), -1, dtype=torch.int32)
        for b, n in enumerate(step):
            ids[b, :n] = rows[b][cur[b]:cur[b] + n]
            q_limit[b, :n] = metas[b].q_limit[cur[b]:cur[b] + n]
        pos = torch.tensor(cur).view(B, 1) + torch.arange(Q).view(1, Q)
        kv_len = torch.tensor([c + n for c, n in zip(cur, step)], dtype=torch.int32)
        dm = DecodeMeta(pos.int(), q_limit, kv_block, kv_len)
        with torch.no_grad():
            h = m.hidden_states(ids, cache=cache, position_ids=pos, decode_meta=dm, backend=backend)
        for b, n in enumerate(step):
            out[b][cur[b]:cur[b] + n] = h[b, :n]
            cur[b] += n
    assert cur == [len(r) for r in rows]
    return out


def _pieces(lens, prefix, singles, several):
    """Per-row token counts of the steps: each row's prefix, `singles` one-token steps, then steps of `several`
    tokens (fewer at a row's end, none after it)."""
    left, steps = [n - p for n, p in zip(lens, prefix)], [list(prefix)]
    while any(left):
        step = [min(1 if len(steps) <= singles else several, x) for x in left]
        left = [x - s for x, s in zip(left, step)]
        steps.append(step)
    return steps


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_a_prompt_fed_in_pieces_through_the_cache_gives_the_whole_forwards_hidden_states(backend, monkeypatch):
    """A prompt written into the KV cache in pieces (a prefix that ends inside or before the first action block,
    single tokens, then three at a time, the steps crossing the blocks' ends) gets the hidden states of one
    uncached forward of the whole sequence under the chunk rule; alone and in a batch of two sequences of
    different lengths at different positions. The sequences hold two images and then three or four action
    blocks, whose later blocks may not see the earlier ones: plain causal attention is far off there.
    Tolerance: the rule of the native decoder's tests, the error against the float64 forward at most twice
    that of the uncached float32 forward (plus 1e-6 of the largest value). backend="auto" runs the native
    layer: C++ decoder_layer for the steps of a few rows, torch's GEMM and C++ decoder_attention_block for the
    prefixes of over 64 rows."""
    import copy

    from worldvla import ActionTokenizer, SequenceBuilder
    from worldvla.tokens import ByteTextTokenizer

    calls = []
    if backend == "auto":
        pytest.importorskip("worldvla._C")
        from worldvla.ops import dispatch
        from worldvla.ops import native_backend as nb

        for op in ("decoder_layer", "decode_attention", "linear", "masked_attention"):
            monkeypatch.setitem(dispatch.AUTO_ORDER, (op, "cpu"), ("native", "torch"))
        for name in ("decoder_layer", "decoder_attention_block"):  # a step of up to 64 rows, a longer one
            monkeypatch.setattr(nb._C, name, lambda *a, f=getattr(nb._C, name), n=name: calls.append(n) or f(*a))
    gen = torch.Generator().manual_seed(8)
    m = WorldVLA(ModelConfig.tiny()).init_weights(0.2, generator=gen).eval()
    L = m.layout
    sb = SequenceBuilder(L, ByteTextTokenizer(L), ActionTokenizer(L, [-1] * 3, [1] * 3))
    seqs = []
    for text, blocks in (("go", 4), ("pick up the cup", 3)):
        codes = [torch.randint(0, L.n_image_codes, (2, 2), generator=gen) for _ in range(2)]
        seqs.append(sb.action_sample(text, codes, torch.rand(blocks, 3, generator=gen) * 2 - 1).input_ids)
    first_boa = [int((s == L.boa).nonzero()[0]) for s in seqs]
    assert [len(s) for s in seqs] == [83, 91] and first_boa == [62, 75]
    wide = copy.deepcopy(m).double()
    for rows, prefix in (([seqs[0]], [65]), (seqs, [65, 73])):
        got = _cached_in_pieces(m, rows, _pieces([len(r) for r in rows], prefix, singles=8, several=3), backend)
        for b, r in enumerate(rows):
            with torch.no_grad():
                ref, same = wide.hidden_states(r), m.hidden_states(r, backend=backend)
                causal = m.hidden_states(r, meta=causal_meta(tuple(r.shape)), backend=backend)
            err, base = (got[b].double() - ref).abs().max().item(), (same.double() - ref).abs().max().item()
            bound = 2 * base + 1e-6 * ref.abs().max().item()
            assert err <= bound, (len(rows), b, err, base)
            # the chunk rule's holes: the later action blocks' rows, and those alone, differ from causal attention
            second_boa = int((r == L.boa).nonzero()[1])
            assert (causal[:second_boa].double() - ref[:second_boa]).abs().max() <= bound
            assert (causal[second_boa:-1].double() - ref[second_boa:-1]).abs().max() > 1000 * bound
    steps = len(_pieces([83], [65], 8, 3)) + len(_pieces([83, 91], [65, 73], 8, 3))  # each prefix over 64 rows
    want = {"decoder_attention_block": 2 * 2, "decoder_layer": 2 * (steps - 2)} if backend == "auto" else {}
    assert {n: calls.count(n) for n in set(calls)} == want


# ---------------------------------------------------------------------- config forms, models without a layout
def _plain_config(**kw):
    """A small model over a vocabulary of no layout (not the Chameleon size): no chunk rule, no image codes."""
    base = dict(vocab_size=300, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=2, max_position_embeddings=64)
    return ModelConfig(**{**base, **kw})


def test_negative_token_ids_are_refused_naming_the_range():
    """An id below zero (a -100 label passed as an input) is refused as out of range, naming the ids' range,
    not failing inside the embedding."""
    m = WorldVLA(ModelConfig.tiny())
    with pytest.raises(ValueError, match=rf"token ids out of range \[-100, 5\] for a vocabulary of "
                                         rf"{m.config.vocab_size}"):
        m(torch.tensor([[0, -100, 5]]))
    with pytest.raises(ValueError, match="out of range"):
        m.loss(torch.tensor([[0, -1, 5]]), torch.tensor([[0, 1, 5]]))


def test_a_cached_forward_needs_both_its_positions_and_its_metadata():
    """With a KV cache, the slots (position_ids) and the decode metadata are both needed: one of them alone is
    refused by name, not failed on inside the attention."""
    from worldvla.mask import DecodeMeta
    from worldvla.model import KVCache

    m = WorldVLA(ModelConfig.tiny()).eval()
    ids = torch.tensor([[5, 6]])
    pos = torch.tensor([[0, 1]])
    dm = DecodeMeta(pos.int(), torch.full((1, 2), -1, dtype=torch.int32), torch.full((1, 4), -1, dtype=torch.int32),
                    torch.tensor([2], dtype=torch.int32))
    for kw in (dict(position_ids=pos), dict(decode_meta=dm)):
        with pytest.raises(ValueError, match="a cached forward needs position_ids and decode_meta"):
            m.hidden_states(ids, cache=KVCache(m.config, 1, 4), **kw)


def test_the_loss_of_a_head_with_a_bias_counts_the_bias():
    """A head with a bias is not a plain weight: the loss runs it as a module, so its bias is in the logits the
    loss is taken over (the fused loss reads the weight alone)."""
    gen = torch.Generator().manual_seed(12)
    m = WorldVLA(ModelConfig.tiny()).init_weights(generator=gen)
    ids, lab = _padded_batch(m, gen, 2)
    plain, _ = m.loss(ids, lab)
    head = torch.nn.Linear(m.config.hidden_size, m.config.vocab_size, bias=True)
    with torch.no_grad():
        head.weight.copy_(m.lm_head.weight)
        head.bias.copy_(torch.randn(m.config.vocab_size, generator=gen))
    m.lm_head = head
    loss, z = m.loss(ids, lab)
    with torch.no_grad():
        logits = m(ids)[:, :-1].reshape(-1, m.config.vocab_size)
    y = lab[:, 1:].reshape(-1)
    ce = torch.nn.functional.cross_entropy(logits, y, weight=loss_class_weights(m.layout, 0.04), ignore_index=-100)
    lse = torch.logsumexp(logits[y != -100], -1)
    torch.testing.assert_close(loss, ce + 1e-5 * (lse ** 2).mean(), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(loss, plain)


def test_a_global_forward_hook_sees_the_head_in_the_loss():
    """A forward hook registered for every module (torch.nn.modules.module.register_module_forward_hook, as
    profilers and activation recorders do) sees the head's call in the loss, which then runs the head as a module."""
    from torch.nn.modules.module import register_module_forward_hook

    gen = torch.Generator().manual_seed(13)
    m = WorldVLA(ModelConfig.tiny()).init_weights(generator=gen)
    ids, lab = _padded_batch(m, gen, 2)
    want, _ = m.loss(ids, lab)
    seen = []
    handle = register_module_forward_hook(lambda mod, args, out: seen.append(mod) if mod is m.lm_head else None)
    try:
        got, _ = m.loss(ids, lab)
    finally:
        handle.remove()
    assert seen
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("swin_norm", [False, True])
def test_dropout_acts_on_both_residual_branches_in_training(swin_norm):
    """In training, the attention's and the MLP's outputs each go through the dropout before they join the
    residual stream: with the other branch silenced (its output projection zero), two forwards of the same ids
    differ; in eval mode they are equal."""
    for silenced in ("mlp", "attn"):
        gen = torch.Generator().manual_seed(14)
        m = WorldVLA(ModelConfig.tiny(dropout=0.5, swin_norm=swin_norm)).init_weights(generator=gen)
        with torch.no_grad():
            for layer in m.model.layers:
                (layer.mlp.down_proj if silenced == "mlp" else layer.self_attn.o_proj).weight.zero_()
        ids = torch.randint(m.layout.text_base, m.config.vocab_size, (1, 12), generator=gen)
        with torch.no_grad():
            torch.manual_seed(0)
            a = m.train()(ids)
            b = m(ids)
            assert (a - b).abs().max() > 1e-3, silenced
            assert torch.equal(m.eval()(ids), m(ids))


def test_a_chameleon_sized_vocabulary_without_a_layout_takes_the_chameleon_layout():
    """A config.json of 65536 ids and no layout of this package's (the release's) is the Chameleon vocabulary:
    the model gets its layout, and with it the chunk rule and the image-code loss weights; another size without
    a layout gets none."""
    cfg = _plain_config(vocab_size=65536)
    assert cfg.vocab_layout() == VocabLayout.chameleon()
    assert WorldVLA(cfg).layout == VocabLayout.chameleon()
    assert _plain_config().vocab_layout() is None and WorldVLA(_plain_config()).layout is None


def test_a_model_without_a_layout_attends_causally_and_weighs_every_target_alike():
    """A vocabulary of no layout has no chunk rule and no image codes: its forward is plain causal attention,
    its loss the unweighted cross-entropy plus the z term."""
    gen = torch.Generator().manual_seed(15)
    m = WorldVLA(_plain_config()).init_weights(generator=gen).eval()
    ids = torch.randint(0, 300, (2, 20), generator=gen)
    labels = ids.clone()
    labels[:, :5] = -100
    with torch.no_grad():
        logits = m(ids)
        torch.testing.assert_close(logits, m(ids, meta=causal_meta(tuple(ids.shape))), rtol=0, atol=0)
        loss, _ = m.loss(ids, labels)
    flat, y = logits[:, :-1].reshape(-1, 300), labels[:, 1:].reshape(-1)
    ce = torch.nn.functional.cross_entropy(flat, y, ignore_index=-100)
    lse = torch.logsumexp(flat[y != -100], -1)
    torch.testing.assert_close(loss, ce + 1e-5 * (lse ** 2).mean(), rtol=1e-5, atol=1e-6)


def test_a_config_takes_a_vocab_layout_object_as_its_dict():
    """ModelConfig(layout=VocabLayout) stores the layout's dict (the form config.json holds), so the model builds
    and saves as with layout.to_dict()."""
    layout = VocabLayout.compact(n_image_codes=64)
    cfg = _plain_config(vocab_size=layout.vocab_size, layout=layout)
    assert cfg.layout == layout.to_dict()
    assert WorldVLA(cfg).layout == layout


@pytest.mark.parametrize("n", [0, True, 2.0, -2])
def test_a_model_parallel_size_that_is_no_count_is_refused_by_name(n):
    """model_parallel_size is a count of shared rows: 0, a boolean, a float or a negative number is refused naming
    it, not failed on as a division by zero or built with a row count of true."""
    with pytest.raises(ValueError, match=rf"model_parallel_size {re.escape(repr(n))} \(the q/k norms' shared affine "
                                         r"rows\)"):
        WorldVLA(ModelConfig.tiny(model_parallel_size=n))


@pytest.mark.parametrize("name", ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                  "num_attention_heads", "num_key_value_heads", "max_position_embeddings"])
def test_a_count_of_zero_is_refused_naming_it_and_one_is_taken(name):
    """Every size of the model is a count of at least one: zero is refused naming the field and the value (zero
    layers or zero-wide projections built a model that computed nothing), one is the smallest accepted."""
    with pytest.raises(ValueError, match=rf"^{name} must be an integer >= 1, got 0$"):
        _plain_config(**{name: 0}).validate()
    ones = dict(vocab_size=1, hidden_size=2, intermediate_size=1, num_hidden_layers=1, num_attention_heads=1,
                num_key_value_heads=1, max_position_embeddings=1)
    _plain_config(**ones).validate()  # head_dim 2: the smallest even one


@pytest.mark.parametrize("name", ["rope_theta", "rms_norm_eps"])
def test_a_rope_base_or_norm_eps_of_zero_is_refused_by_name(name):
    """The RoPE base and the RMSNorm eps must be above zero (a zero base gave NaN logits, a zero eps divides an
    all-zero row by zero); the smallest positive float is taken."""
    with pytest.raises(ValueError, match=rf"^{name} must be a finite number > 0, got 0.0$"):
        _plain_config(**{name: 0.0}).validate()
    _plain_config(**{name: 5e-324}).validate()


def test_only_the_chameleon_vocabulary_size_itself_takes_the_chameleon_layout():
    """Without a layout, exactly 65536 ids are read as the Chameleon vocabulary: one id fewer or more is another
    vocabulary, which gets no layout (plain causal attention, every target weighed alike)."""
    assert _plain_config(vocab_size=65536).vocab_layout() == VocabLayout.chameleon()
    for size in (65535, 65537):
        assert _plain_config(vocab_size=size).vocab_layout() is None, size


def test_the_largest_float32_image_weight_is_taken_as_it_is():
    """The image-code loss weight may be as large as float32 holds: its largest finite value is kept on the image
    ids, not refused (only what would round to inf in float32 is)."""
    big = torch.finfo(torch.float32).max
    lay = VocabLayout.compact(n_image_codes=64)
    w = loss_class_weights(lay, big)
    assert bool(torch.isfinite(w).all())
    assert (w[lay.image_code_weight_mask()] == big).all() and (w[~lay.image_code_weight_mask()] == 1).all()


def test_init_weights_draws_every_matrix_from_the_generator_alone():
    """Given a generator, init_weights draws every matrix from it (the scaled residual projections too): two
    models initialized from generators of one seed are identical whatever the global RNG holds, and the global
    RNG is left as it was."""
    def init(global_seed):
        torch.manual_seed(global_seed)
        m = WorldVLA(ModelConfig.tiny())
        before = torch.get_rng_state()
        m.init_weights(generator=torch.Generator().manual_seed(21))
        assert torch.equal(torch.get_rng_state(), before)
        return m.state_dict()

    a, b = init(1), init(2)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_init_weights_zeroes_the_bias_of_a_head_that_has_one():
    """init_weights gives every bias zeros, not only the q/k norms': a head replaced by one with a bias starts with
    a zero bias (its weight drawn as any matrix)."""
    m = WorldVLA(ModelConfig.tiny())
    m.lm_head = torch.nn.Linear(m.config.hidden_size, m.config.vocab_size, bias=True)
    m.init_weights(generator=torch.Generator().manual_seed(22))
    assert torch.equal(m.lm_head.bias, torch.zeros_like(m.lm_head.bias))
    assert abs(m.lm_head.weight.std().item() - 0.02) < 0.1 * 0.02


def test_the_models_attention_backend_is_the_default_of_its_forward_and_an_argument_overrides_it():
    """`attn_backend` is the backend a forward uses when none is given (a name no backend has is then refused by
    the attention, naming it); a backend given to the forward is used instead."""
    m = WorldVLA(ModelConfig.tiny()).init_weights(generator=torch.Generator().manual_seed(23)).eval()
    ids = torch.tensor([[0, 5, 6, 7]])
    with torch.no_grad():
        want = m(ids, backend="torch")
        m.attn_backend = "no-such-backend"
        with pytest.raises(ValueError, match="got 'no-such-backend'"):
            m(ids)
        torch.testing.assert_close(m(ids, backend="torch"), want, rtol=0, atol=0)
