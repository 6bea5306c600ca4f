"""The VQGAN tokenizer: shapes, errors, parity with transformers' Chameleon encoder, file formats, training."""
import json
import math
import re
import warnings

import numpy as np
import pytest
import torch
import yaml

from worldvla.vqgan import VQGAN, VQGANConfig, _inference_layout, postprocess, preprocess

TINY = dict(ch=32, ch_mult=(1, 1, 2, 2, 2), num_res_blocks=1, z_channels=64, embed_dim=32, n_embed=96,
            resolution=64)


def _randomize(model: torch.nn.Module, gen: torch.Generator) -> None:
    """Weights far from the default init: norms not 1, biases not 0, so every term counts."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                base = 1.0 if name.endswith("weight") else 0.0
                p.copy_(base + 0.2 * torch.randn(p.shape, generator=gen))
            else:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(fan_in))


def _model(gen, **over) -> VQGAN:
    m = VQGAN(VQGANConfig(**{**TINY, **over}))
    _randomize(m, gen)
    return m.eval()


def _pixels(gen, b, h, w):
    return torch.rand(b, 3, h, w, generator=gen) * 2 - 1


# ---------------------------------------------------------------------- config and shapes
def test_config_presets():
    c = VQGANConfig.chameleon()
    assert (c.ch, c.ch_mult, c.num_res_blocks, c.z_channels, c.n_embed, c.embed_dim) == \
        (128, (1, 1, 2, 2, 4), 2, 256, 8192, 256)
    assert c.downsample == 16 and VQGANConfig.small().downsample == 16
    assert VQGANConfig.from_dict(c.to_dict()) == c
    assert VQGANConfig.from_taming(c.to_taming()) == c
    with pytest.raises(ValueError, match="multiple of 32"):
        VQGANConfig(ch=48, ch_mult=(1, 1))
    with pytest.raises(ValueError, match="double_z"):
        VQGANConfig(double_z=True)
    with pytest.raises(ValueError, match="unknown VQGANConfig fields"):
        VQGANConfig.from_dict({**c.to_dict(), "tanh_out": True})


@pytest.mark.parametrize("h,w", [(32, 48), (64, 16)])
def test_encode_decode_shapes(rng, h, w):
    m = _model(rng)
    x = _pixels(rng, 2, h, w)
    codes = m.encode(x)
    assert codes.shape == (2, h // 16, w // 16) and codes.dtype == torch.int64
    assert int(codes.min()) >= 0 and int(codes.max()) < m.config.n_embed
    y = m.decode(codes)
    assert y.shape == (2, 3, h, w) and y.dtype == torch.float32
    assert float(y.abs().max()) <= 1.0 and not y.requires_grad
    rec, loss, codes2 = m(x)
    assert rec.shape == (2, 3, h, w) and loss.dim() == 0 and torch.equal(codes2, codes)
    # decode = clamp(decoder(post_quant_conv(codebook[codes]))), in decode's memory layout (channels-last on the
    # CPU: another layout runs other convolution kernels, which round otherwise, by up to about 1e-5 here)
    with torch.no_grad():
        z_q = m.codebook[codes].permute(0, 3, 1, 2).contiguous()
        assert torch.equal(y, m.decode_latents(_inference_layout(z_q)).clamp(-1, 1))


def test_codes_are_nearest_entries(rng):
    m = _model(rng)
    x = _pixels(rng, 1, 48, 32)
    z = m.encode_latents(x).detach().double()
    flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
    d = torch.cdist(flat, m.codebook.detach().double())
    codes = m.encode(x).flatten()
    best = d.min(1).values
    chosen = d.gather(1, codes[:, None]).squeeze(1)
    assert torch.all(chosen <= best * (1 + 1e-6) + 1e-9)


def test_decoder_architecture():
    cfg = VQGANConfig.chameleon()
    with torch.device("meta"):
        m = VQGAN(cfg)
    dec, enc = m.decoder, m.encoder
    assert len(dec.up) == len(cfg.ch_mult) == 5
    assert all(len(level.block) == cfg.num_res_blocks + 1 == 3 for level in dec.up)
    assert all(len(level.block) == cfg.num_res_blocks == 2 for level in enc.down)
    assert [hasattr(level, "upsample") for level in dec.up] == [False, True, True, True, True]
    assert [hasattr(level, "downsample") for level in enc.down] == [True, True, True, True, False]
    assert [level.block[-1].conv2.out_channels for level in dec.up] == [128, 128, 256, 256, 512]
    sd = m.state_dict()
    assert sd["decoder.conv_in.weight"].shape == (512, 256, 3, 3)
    assert sd["decoder.conv_out.weight"].shape == (3, 128, 3, 3)
    assert sd["decoder.up.4.block.0.conv1.weight"].shape == (512, 512, 3, 3)
    assert sd["decoder.up.3.block.0.nin_shortcut.weight"].shape == (256, 512, 1, 1)
    assert sd["post_quant_conv.weight"].shape == (256, 256, 1, 1)
    assert sd["quantize.embedding.weight"].shape == (8192, 256)
    n_res = sum(1 for k in sd if k.startswith("decoder.up.") and k.endswith(".conv1.weight"))
    n_up = sum(1 for k in sd if k.startswith("decoder.up.") and k.endswith("upsample.conv.weight"))
    assert (n_res, n_up) == (15, 4)
    # the decoder really doubles the side 4 times (tiny config, actual run)
    tiny = VQGAN(VQGANConfig(**TINY))
    assert tiny.decode_latents(torch.randn(1, TINY["embed_dim"], 3, 2)).shape == (1, 3, 48, 32)


# ---------------------------------------------------------------------- input errors
def test_input_errors(rng):
    m = _model(rng)
    with pytest.raises(ValueError, match=r"40x32.*downsampling factor 16"):
        m.encode(_pixels(rng, 1, 40, 32))
    with pytest.raises(ValueError, match=r"32x24.*factor 16"):
        m.encode(_pixels(rng, 1, 32, 24))
    with pytest.raises(ValueError, match="3 channels"):
        m.encode(torch.rand(1, 4, 32, 32, generator=rng))
    with pytest.raises(ValueError, match="3 channels"):
        m.encode(torch.rand(1, 32, 32, 3, generator=rng))
    with pytest.raises(TypeError, match="floating point"):
        m.encode(torch.randint(0, 255, (1, 3, 32, 32), dtype=torch.uint8, generator=rng))
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        m.encode(torch.rand(1, 3, 32, 32, generator=rng) * 255)
    with pytest.raises(TypeError, match="integer"):
        m.decode(torch.rand(1, 2, 2, generator=rng))
    with pytest.raises(ValueError, match=r"\[B, h, w\]"):
        m.decode(torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="codes must lie in"):
        m.decode(torch.full((1, 2, 2), m.config.n_embed, dtype=torch.long))


def test_preprocess_postprocess(rng):
    from PIL import Image

    img = torch.randint(0, 256, (32, 48, 3), dtype=torch.uint8, generator=rng).numpy()
    x = preprocess(img)
    assert x.shape == (1, 3, 32, 48) and x.dtype == torch.float32
    torch.testing.assert_close(x[0, 1], torch.from_numpy(img[..., 1]).float() / 255 * 2 - 1)
    # every level exactly as the release maps it: numpy's float64 x / 255 * 2 - 1, then float32
    levels = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1).repeat(3, axis=-1)
    release = torch.from_numpy((levels / 255.0 * 2 - 1).astype(np.float32)).permute(0, 3, 1, 2)
    assert torch.equal(preprocess(levels), release)
    assert np.array_equal(postprocess(x)[0], img)
    assert np.array_equal(postprocess(x[0]), img)
    assert np.array_equal(preprocess(Image.fromarray(img)).numpy(), x.numpy())
    batch = np.stack([img, img[::-1]])
    assert preprocess(batch).shape == (2, 3, 32, 48)
    # transparency is composited onto white
    rgba = np.concatenate([img, np.zeros((32, 48, 1), np.uint8)], axis=-1)
    assert float(preprocess(Image.fromarray(rgba, "RGBA")).min()) == 1.0
    with pytest.raises(TypeError, match="uint8"):
        preprocess(img.astype(np.float32))
    with pytest.raises(ValueError, match="RGB"):
        preprocess(rgba)
    with pytest.raises(ValueError, match=r"\[3, H, W\]"):
        postprocess(torch.rand(32, 32, 3))


def test_images_in_and_out(rng):
    """encode_images / decode_images are preprocess -> encode and decode -> postprocess, in the VQGAN's
    own dtype (a bfloat16 VQGAN takes uint8 frames as they are)."""
    for dtype in (torch.float32, torch.bfloat16):
        m = _model(rng).to(dtype)
        frames = torch.randint(0, 256, (3, 32, 48, 3), dtype=torch.uint8, generator=rng).numpy()
        codes = m.encode_images(frames)
        assert torch.equal(codes, m.encode(preprocess(frames).to(dtype)))
        assert torch.equal(m.encode_images(frames[1]), codes[1:2])  # one [H, W, 3] image
        out = m.decode_images(codes)
        assert out.dtype == np.uint8 and out.shape == frames.shape
        assert np.array_equal(out, postprocess(m.decode(codes)))


# ---------------------------------------------------------------------- parity with transformers
@pytest.mark.parametrize("attn_res", [(), (32,)])
def test_encoder_matches_transformers(rng, attn_res):
    transformers = pytest.importorskip("transformers")
    hf_cfg = transformers.ChameleonVQVAEConfig(
        embed_dim=TINY["embed_dim"], num_embeddings=TINY["n_embed"], latent_channels=TINY["z_channels"],
        base_channels=TINY["ch"], channel_multiplier=list(TINY["ch_mult"]), num_res_blocks=2,
        resolution=TINY["resolution"], attn_resolutions=list(attn_res) or None)
    hf = transformers.ChameleonVQVAE(hf_cfg).eval()
    _randomize(hf, rng)
    ours = VQGAN(VQGANConfig(**{**TINY, "num_res_blocks": 2, "attn_resolutions": attn_res})).eval()
    result = ours.load_state_dict(hf.state_dict(), strict=False)
    assert not result.unexpected_keys
    assert result.missing_keys and all(k.startswith("decoder.") for k in result.missing_keys)

    x = _pixels(rng, 2, 64, 48)
    with torch.no_grad():
        out = hf.encode(x)  # transformers 5.x: an output object; 4.x: (quant, loss, image tokens)
        ref_h = hf.encoder(x)
        ref_z = hf.quant_conv(ref_h)
        h = ours.encoder(x)
        z = ours.encode_latents(x)
    for got, ref in ((h, ref_h), (z, ref_z)):
        rel = float((got - ref).norm() / ref.norm())
        assert rel <= 1e-5, rel
    codes = ours.encode(x)
    ref_codes = (out[2] if isinstance(out, tuple) else out.image_tokens).view(codes.shape)
    if not torch.equal(codes, ref_codes):
        # only exact ties (in float64) may differ
        flat = ref_z.double().permute(0, 2, 3, 1).reshape(-1, ref_z.shape[1])
        d = torch.cdist(flat, ours.codebook.detach().double())
        a, b = codes.flatten(), ref_codes.flatten()
        gap = (d.gather(1, a[:, None]) - d.gather(1, b[:, None])).abs()
        assert float(gap.max()) <= 1e-5 * float(d.min(1).values.max())


# ---------------------------------------------------------------------- file formats
def _write_release(folder, model: VQGAN, state_dict: dict):
    cfg = model.config
    doc = {"model": {"base_learning_rate": 4.5e-06, "target": "taming.models.vqgan.VQModel",
                     "params": {"embed_dim": cfg.embed_dim, "n_embed": cfg.n_embed,
                                "ddconfig": {"double_z": False, "z_channels": cfg.z_channels,
                                             "resolution": cfg.resolution, "in_channels": 3, "out_ch": 3,
                                             "ch": cfg.ch, "ch_mult": list(cfg.ch_mult),
                                             "num_res_blocks": cfg.num_res_blocks, "attn_resolutions": [],
                                             "dropout": 0.0},
                                "lossconfig": {"target": "taming.modules.losses.vqperceptual.DummyLoss"}}}}
    with open(folder / "vqgan.yaml", "w") as fh:
        yaml.safe_dump(doc, fh)
    torch.save({"state_dict": state_dict, "global_step": 7}, folder / "vqgan.ckpt")
    return folder / "vqgan.yaml", folder / "vqgan.ckpt"


class Opaque:
    """A pickled object that the safe loader refuses (checkpoints often carry trainer state)."""


def _same_weights(a: VQGAN, b: VQGAN):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_release_round_trip(rng, tmp_path):
    m = _model(rng)
    sd = dict(m.state_dict())
    sd["loss.discriminator.main.0.weight"] = torch.randn(4, 3, 4, 4, generator=rng)
    sd["loss.logvar"] = torch.randn((), generator=rng)
    y, c = _write_release(tmp_path, m, sd)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # loss.* must be dropped silently
        loaded = VQGAN.from_release(y, c)
    assert loaded.config == m.config and not loaded.training
    _same_weights(m, loaded)
    x = _pixels(rng, 1, 32, 32)
    assert torch.equal(m.encode(x), loaded.encode(x))

    out = tmp_path / "again"
    loaded.save_release(out)
    again = VQGAN.from_release(out / "vqgan.yaml", out / "vqgan.ckpt")
    _same_weights(m, again)


def test_a_release_format_vqgan_under_the_home_folder(rng, tmp_path, monkeypatch):
    """`~/...` names the home folder for the release format's writer and reader, as for save_pretrained (the
    writer made a folder named ~ in the working directory, and the reader did not find it)."""
    m = _model(rng)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    m.save_release("~/tok")
    assert (tmp_path / "home" / "tok" / "vqgan.ckpt").is_file() and not (tmp_path / "~").exists()
    _same_weights(m, VQGAN.from_release("~/tok/vqgan.yaml", "~/tok/vqgan.ckpt"))


def test_pretrained_round_trip(rng, tmp_path):
    m = _model(rng)
    m.save_pretrained(tmp_path)
    loaded = VQGAN.from_pretrained(tmp_path)
    assert loaded.config == m.config
    _same_weights(m, loaded)
    codes = m.encode(_pixels(rng, 1, 16, 32))
    torch.testing.assert_close(loaded.decode(codes), m.decode(codes), rtol=0, atol=0)
    m.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    assert VQGAN.from_pretrained(tmp_path / "bf16").codebook.dtype == torch.bfloat16


def test_load_errors(rng, tmp_path):
    m = _model(rng)
    sd = dict(m.state_dict())
    del sd["decoder.up.2.block.1.conv2.weight"]
    del sd["quantize.embedding.weight"]
    y, c = _write_release(tmp_path, m, sd)
    with pytest.raises(ValueError, match=r"2 missing keys.*decoder\.up\.2\.block\.1\.conv2\.weight"):
        VQGAN.from_release(y, c)

    sd = dict(m.state_dict())
    sd["encoder.conv_out.weight"] = torch.randn(32, 64, 3, 3, generator=rng)
    y, c = _write_release(tmp_path, m, sd)
    with pytest.raises(ValueError, match=r"shape mismatch.*encoder\.conv_out\.weight: checkpoint \(32, 64, 3, 3\) "
                                         r"vs model \(64, 64, 3, 3\)"):
        VQGAN.from_release(y, c)

    sd = dict(m.state_dict())
    sd["discriminator.extra.weight"] = torch.randn(3, generator=rng)  # no module of the VQGAN's: a warning
    y, c = _write_release(tmp_path, m, sd)
    with pytest.warns(UserWarning, match="discriminator.extra.weight"):
        VQGAN.from_release(y, c)
    # Weights under its own modules that the config has no layer for (a yaml without the checkpoint's attention
    # blocks, one resolution fewer): the trained layers would be dropped, giving another tokenizer.
    sd = dict(m.state_dict())
    sd["decoder.up.0.attn.0.q.weight"] = torch.randn(3, generator=rng)
    y, c = _write_release(tmp_path, m, sd)
    with pytest.raises(ValueError, match=r"1 weights of the model's own modules that the config has no layer for: "
                                         r"decoder\.up\.0\.attn\.0\.q\.weight"):
        VQGAN.from_release(y, c)

    # taming's options this model is not built with change the architecture: refused by name; an unknown key warns
    import yaml

    y, c = _write_release(tmp_path, m, dict(m.state_dict()))
    doc = yaml.safe_load(y.read_text())
    for key, value in (("tanh_out", True), ("resamp_with_conv", False)):
        (tmp_path / f"{key}.yaml").write_text(yaml.safe_dump(
            {"model": {"params": {**doc["model"]["params"],
                                  "ddconfig": {**doc["model"]["params"]["ddconfig"], key: value}}}}))
        with pytest.raises(ValueError, match=f"sets {key}.*changes the architecture"):
            VQGAN.from_release(tmp_path / f"{key}.yaml", c)
    (tmp_path / "extra.yaml").write_text(yaml.safe_dump(
        {"model": {"params": {**doc["model"]["params"],
                              "ddconfig": {**doc["model"]["params"]["ddconfig"], "tanh_out": False, "colour": 1}}}}))
    with pytest.warns(UserWarning, match="ignoring ddconfig keys the VQGAN does not know: colour"):
        VQGAN.from_release(tmp_path / "extra.yaml", c)
    (tmp_path / "bad.yaml").write_text("model:\n  target: x\n")
    with pytest.raises(ValueError, match="ddconfig"):
        VQGAN.from_release(tmp_path / "bad.yaml", c)

    torch.save({"state_dict": m.state_dict(), "callbacks": Opaque()}, tmp_path / "opaque.ckpt")
    with pytest.raises(RuntimeError, match="trust_checkpoint=True"):
        VQGAN.from_release(y, tmp_path / "opaque.ckpt")
    _same_weights(m, VQGAN.from_release(y, tmp_path / "opaque.ckpt", trust_checkpoint=True))
    # A missing or damaged file is named as such (both were reported as objects refused by the safe loader).
    with pytest.raises(FileNotFoundError, match="no VQGAN checkpoint at"):
        VQGAN.from_release(y, tmp_path / "none.ckpt")
    (tmp_path / "cut.ckpt").write_bytes(c.read_bytes()[:100])
    with pytest.raises(ValueError, match="cut.ckpt: the checkpoint cannot be read.*damaged or cut short"):
        VQGAN.from_release(y, tmp_path / "cut.ckpt")


# ---------------------------------------------------------------------- training
def test_training_reduces_reconstruction_loss():
    # Many tiny ops: with other torch processes on the machine, a second OpenMP thread mostly
    # waits at barriers (seen: 100x slower), so this test runs single-threaded.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _train_tiny()
    finally:
        torch.set_num_threads(threads)


def _train_tiny():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1234)
    m = VQGAN(VQGANConfig(**TINY)).train()
    # smooth images: low-frequency random patterns a tiny model can learn to reconstruct
    coarse = torch.rand(4, 3, 4, 4, generator=gen) * 2 - 1
    x = torch.nn.functional.interpolate(coarse, size=(32, 32), mode="bilinear", align_corners=False)
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    losses = []
    for _ in range(40):
        rec, vq_loss, _ = m(x)
        rec_loss = (rec - x).pow(2).mean()
        (rec_loss + vq_loss).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(rec_loss.detach()))
    assert all(math.isfinite(v) for v in losses)
    final = np.mean(losses[-5:])
    # halves the loss, and beats the best constant image (whose error is the pixel variance)
    assert final < 0.6 * losses[0] and final < 0.95 * float(x.var()), (float(x.var()), losses)
    # gradients reach the encoder (straight-through) and the codebook (codebook loss)
    rec, vq_loss, _ = m(x)
    ((rec - x).pow(2).mean() + vq_loss).backward()
    assert m.encoder.conv_in.weight.grad.abs().sum() > 0
    assert m.codebook.grad.abs().sum() > 0


def test_a_damaged_vqgan_folder_is_named(tmp_path):
    """A cut-short model.safetensors or config.json ended in a SafetensorError / JSONDecodeError naming no file."""
    from worldvla.vqgan import VQGAN, VQGANConfig

    VQGAN(VQGANConfig(ch=32, ch_mult=(1, 1), num_res_blocks=1, z_channels=8, embed_dim=8, n_embed=16)).save_pretrained(
        tmp_path / "vq")
    weights = tmp_path / "vq" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"model.safetensors: the weights file cannot be read"):
        VQGAN.from_pretrained(tmp_path / "vq")
    (tmp_path / "vq" / "config.json").write_text('{"ch": 32,')
    with pytest.raises(ValueError, match=r"config.json: not a valid VQGAN config"):
        VQGAN.from_pretrained(tmp_path / "vq")


def test_nan_pixels_are_refused():
    """NaN passed the [-1, 1] range check (both comparisons false) and came back as code 0."""
    torch.manual_seed(0)
    vq = VQGAN(VQGANConfig(ch=32, ch_mult=(1, 1, 1, 1, 1), num_res_blocks=1, z_channels=32, embed_dim=16,
                           n_embed=32)).eval()
    px = torch.rand(1, 3, 32, 32) * 2 - 1
    px[0, 1, 5, 7] = float("nan")
    with pytest.raises(ValueError, match=r"pixels must lie in \[-1, 1\].*NaN"):
        vq.encode(px)


def test_the_release_tokenizer_folder_loads_and_passes_trust_checkpoint_on(rng, tmp_path):
    """load_release_tokenizer reads vqgan.yaml, vqgan.ckpt and text_tokenizer.json; a vqgan.ckpt that pickles
    other objects (trainer state) is refused by the safe loader and needs trust_checkpoint=True, which the
    folder loader had no way to pass on."""
    from test_store import _release_text_tokenizer

    from worldvla.checkpoint import load_release_tokenizer

    m = VQGAN(VQGANConfig(ch=32, ch_mult=(1, 1, 1, 1, 1), num_res_blocks=1, z_channels=32, embed_dim=32,
                          n_embed=64)).eval()
    _write_release(tmp_path, m, dict(m.state_dict()))
    _release_text_tokenizer(tmp_path / "text_tokenizer.json")
    layout, text, vq = load_release_tokenizer(tmp_path)
    assert layout.name == "chameleon" and layout.n_image_codes == 8192 and text.encode("push")
    _same_weights(m, vq)
    torch.save({"state_dict": m.state_dict(), "callbacks": Opaque()}, tmp_path / "vqgan.ckpt")
    with pytest.raises(RuntimeError, match="trust_checkpoint=True"):
        load_release_tokenizer(tmp_path)
    _same_weights(m, load_release_tokenizer(tmp_path, trust_checkpoint=True)[2])


def _retain_latents(m) -> dict:
    """A dict whose "z" will be the encoder's latents (quant_conv's output) of m's next forward, gradient kept."""
    seen = {}

    def keep(module, inputs, out):
        out.retain_grad()
        seen["z"] = out

    m.quant_conv.register_forward_hook(keep)
    return seen


def test_vq_loss_weights_the_commitment_term_by_beta():
    """The VQ loss is ||sg[z] - e||^2 + beta * ||z - sg[e]||^2: the codebook is pulled towards the encoder's
    latents at full weight and the encoder towards the codebook at weight beta. Putting beta on the codebook
    term instead would still train, with the codebook moving 4x slower and the encoder 4x harder pulled."""
    from worldvla.vqgan import COMMITMENT_BETA

    gen = torch.Generator().manual_seed(7)
    m = _model(gen).train()
    seen = _retain_latents(m)
    _, vq_loss, codes = m(_pixels(gen, 2, 32, 32))
    vq_loss.backward()
    z = seen["z"].detach()                                  # [B, C, h, w]
    e = m.codebook.detach()[codes].permute(0, 3, 1, 2)      # each latent's chosen entry
    n = z.numel()
    assert codes.unique().numel() > 1
    torch.testing.assert_close(seen["z"].grad, 2 * COMMITMENT_BETA * (z - e) / n)
    want = torch.zeros_like(m.codebook)
    want.index_add_(0, codes.reshape(-1), (2 * (e - z) / n).permute(0, 2, 3, 1).reshape(-1, z.shape[1]))
    torch.testing.assert_close(m.codebook.grad, want)
    assert want.abs().sum() > 0


def test_the_reconstruction_gradient_passes_straight_through_to_the_encoder():
    """The straight-through estimator: the reconstruction loss's gradient at the decoder's input reaches the
    encoder's latents unchanged, and the codebook gets none of it (only the VQ loss moves the codebook)."""
    gen = torch.Generator().manual_seed(11)
    m = _model(gen).train()
    seen = _retain_latents(m)

    def keep_decoder_input(module, inputs):
        inputs[0].retain_grad()
        seen["z_st"] = inputs[0]

    m.post_quant_conv.register_forward_pre_hook(keep_decoder_input)
    x = _pixels(gen, 2, 32, 32)
    rec, _, _ = m(x)
    (rec - x).pow(2).mean().backward()
    assert seen["z_st"].grad.abs().sum() > 0
    torch.testing.assert_close(seen["z"].grad, seen["z_st"].grad, rtol=0, atol=0)
    assert m.codebook.grad is None or not m.codebook.grad.any()


@pytest.mark.parametrize("release", [False, True])
def test_a_save_cut_short_before_the_config_leaves_no_older_config(rng, tmp_path, monkeypatch, release):
    """Saving over an older VQGAN: the new weights are in place when the config's write fails (a full disk, a
    kill). The older config must be gone by then, so that loading fails naming the missing config instead of
    building the older architecture around the new weights."""
    import worldvla.checkpoint as checkpoint

    old, new = _model(rng), _model(rng, n_embed=64)
    config = tmp_path / ("vqgan.yaml" if release else "config.json")
    (old.save_release if release else old.save_pretrained)(tmp_path)
    assert config.is_file()

    def disk_full(path, text):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "write_text_atomic", disk_full)
    with pytest.raises(OSError, match="No space left"):
        (new.save_release if release else new.save_pretrained)(tmp_path)
    assert not config.exists()
    with pytest.raises(FileNotFoundError):
        if release:
            VQGAN.from_release(config, tmp_path / "vqgan.ckpt")
        else:
            VQGAN.from_pretrained(tmp_path)


def test_a_bfloat16_vqgan_encodes_float32_pixels(rng):
    """preprocess() gives float32 pixels; a bfloat16 VQGAN's encode takes them as they are, in its own dtype."""
    m = _model(rng).to(torch.bfloat16)
    x = _pixels(rng, 2, 32, 48)
    assert torch.equal(m.encode(x), m.encode(x.to(torch.bfloat16)))
    assert m.encode_latents(x).dtype == torch.bfloat16


def test_semi_transparent_pixels_are_composited_onto_white():
    """An RGBA image whose every pixel is partly transparent (no alpha of 0 or 255 anywhere) is blended onto
    white by its alpha, not stripped of it."""
    from PIL import Image

    from worldvla.vqgan import whiten_transparency

    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[..., 3] = 51  # alpha 0.2: 0.8 * 255 + 0.2 * channel
    out = np.asarray(whiten_transparency(Image.fromarray(rgba, "RGBA")))
    assert out.shape == (16, 16, 3)
    assert (out[..., 0] == 244).all() and (out[..., 1:] == 204).all()


def test_postprocess_clamps_pixels_outside_the_range():
    """Unclamped pixels (`decode_latents`, the training pass's reconstruction) saturate at 0 and 255 instead of
    wrapping around in uint8."""
    pixels = torch.tensor([-3.0, -1.2, -1.0, 0.0, 1.0, 1.2, 3.0]).view(1, 1, 7).expand(3, 1, 7)
    out = postprocess(pixels)
    assert out.shape == (1, 7, 3)
    assert out[0, :, 0].tolist() == [0, 0, 0, 128, 255, 255, 255]


def test_a_release_checkpoint_of_the_bare_state_dict_loads(rng, tmp_path):
    """A vqgan.ckpt that holds the weights themselves (torch.save(model.state_dict()), no "state_dict" entry)
    loads as one that keeps them under "state_dict"."""
    m = _model(rng)
    y, _ = _write_release(tmp_path, m, dict(m.state_dict()))
    torch.save(dict(m.state_dict()), tmp_path / "bare.ckpt")
    loaded = VQGAN.from_release(y, tmp_path / "bare.ckpt")
    _same_weights(m, loaded)
    assert not loaded.training


def test_a_yaml_of_another_attention_type_is_refused_by_name(rng, tmp_path):
    """taming's linear attention has other weights and another output: a yaml naming it is refused, as this model
    builds the vanilla attention only; attn_type 'vanilla' said outright loads."""
    m = _model(rng)
    y, c = _write_release(tmp_path, m, dict(m.state_dict()))
    doc = yaml.safe_load(y.read_text())
    for attn_type in ("linear", "vanilla"):
        doc["model"]["params"]["ddconfig"]["attn_type"] = attn_type
        (tmp_path / f"{attn_type}.yaml").write_text(yaml.safe_dump(doc))
    with pytest.raises(ValueError, match="only attn_type='vanilla' is supported, the yaml says 'linear'"):
        VQGAN.from_release(tmp_path / "linear.yaml", c)
    _same_weights(m, VQGAN.from_release(tmp_path / "vanilla.yaml", c))


def test_boolean_codes_are_refused():
    """A boolean mask passed for codes would decode as codes 0 and 1: refused as not integer codes."""
    m = VQGAN(VQGANConfig(**TINY)).eval()
    with pytest.raises(TypeError, match="codes must be an integer tensor"):
        m.decode(torch.ones(1, 2, 2, dtype=torch.bool))
    assert m.decode(torch.ones(1, 2, 2, dtype=torch.int32)).shape == (1, 3, 32, 32)


def test_a_yaml_without_the_codebook_size_is_refused_by_name(rng, tmp_path):
    """model.params.n_embed / embed_dim missing from the yaml are named, not taken from the Chameleon defaults."""
    m = _model(rng)
    y, c = _write_release(tmp_path, m, dict(m.state_dict()))
    for key in ("n_embed", "embed_dim"):
        doc = yaml.safe_load(y.read_text())
        del doc["model"]["params"][key]
        (tmp_path / f"no_{key}.yaml").write_text(yaml.safe_dump(doc))
        with pytest.raises(ValueError, match=f"the taming config lacks model.params.{key}"):
            VQGAN.from_release(tmp_path / f"no_{key}.yaml", c)


def test_a_loaded_vqgan_encodes_alike_every_time(rng, tmp_path):
    """A VQGAN loaded from either format is in eval mode: with dropout in its config, encoding one image twice gives
    the same codes (in training mode dropout would draw other codes each time)."""
    m = _model(rng, dropout=0.5)
    m.save_pretrained(tmp_path / "hf")
    y, c = _write_release(tmp_path, m, dict(m.state_dict()))
    doc = yaml.safe_load(y.read_text())
    doc["model"]["params"]["ddconfig"]["dropout"] = 0.5
    y.write_text(yaml.safe_dump(doc))
    x = _pixels(rng, 2, 32, 32)
    for loaded in (VQGAN.from_pretrained(tmp_path / "hf"), VQGAN.from_release(y, c)):
        assert not loaded.training and loaded.config.dropout == 0.5
        assert torch.equal(loaded.encode(x), loaded.encode(x))
        assert torch.equal(loaded.encode(x), m.encode(x))


@pytest.mark.parametrize("name", ["num_res_blocks", "n_embed", "embed_dim", "z_channels", "resolution"])
def test_a_size_of_zero_is_refused_by_name(name, tmp_path):
    """A config.json (or a yaml) with a size of 0 (no residual blocks, an empty codebook) is refused naming the
    field, not built into a model that fails, or silently does nothing, later."""
    with pytest.raises(ValueError, match=f"{name} must be >= 1, got 0"):
        VQGANConfig(**{**TINY, name: 0})
    with pytest.raises(ValueError, match=f"{name} must be >= 1, got 0"):
        VQGANConfig.from_dict({**VQGANConfig(**TINY).to_dict(), name: 0})


def test_an_empty_image_is_refused_by_name(rng):
    """An image with no rows or no columns is refused as a size the VQGAN cannot tokenize."""
    m = _model(rng)
    for h, w in ((0, 32), (32, 0)):
        with pytest.raises(ValueError, match=f"image size {h}x{w} .*multiple of 16"):
            m.encode(torch.zeros(1, 3, h, w))


def test_preprocess_takes_a_uint8_tensor_as_an_array(rng):
    """A uint8 tensor [H, W, 3] / [N, H, W, 3] (frames read with torchvision) is taken as the same numpy array."""
    frames = torch.randint(0, 256, (2, 32, 48, 3), dtype=torch.uint8, generator=rng)
    assert torch.equal(preprocess(frames), preprocess(frames.numpy()))
    assert torch.equal(preprocess(frames[1]), preprocess(frames[1].numpy()))
    m = _model(rng)
    assert torch.equal(m.encode_images(frames), m.encode_images(frames.numpy()))


def test_release_files_of_another_shape_are_refused_by_name(rng, tmp_path):
    """A yaml whose model.params has no ddconfig, and a checkpoint whose "state_dict" is no dict of tensors
    (a list), are refused naming what is missing, not with a KeyError or an AttributeError."""
    m = _model(rng)
    y, c = _write_release(tmp_path, m, dict(m.state_dict()))
    doc = yaml.safe_load(y.read_text())
    del doc["model"]["params"]["ddconfig"]
    (tmp_path / "no_ddconfig.yaml").write_text(yaml.safe_dump(doc))
    with pytest.raises(ValueError, match="needs model.params.ddconfig"):
        VQGAN.from_release(tmp_path / "no_ddconfig.yaml", c)
    torch.save({"state_dict": list(m.state_dict().values())}, tmp_path / "list.ckpt")
    with pytest.raises(ValueError, match="list.ckpt holds no state dict"):
        VQGAN.from_release(y, tmp_path / "list.ckpt")


def test_an_empty_batch_encodes_to_no_codes(rng):
    """No images in ([0, 3, H, W], or [0, H, W, 3] through encode_images) give no codes [0, H/16, W/16], as
    decode of no codes gives no pixels, rather than a torch error from the range check."""
    m = _model(rng)
    codes = m.encode(torch.zeros(0, 3, 32, 48))
    assert codes.shape == (0, 2, 3) and codes.dtype == torch.int64
    assert m.encode_images(np.zeros((0, 32, 48, 3), np.uint8)).shape == (0, 2, 3)
    assert m.decode(codes).shape == (0, 3, 32, 48)


def test_codes_of_no_rows_or_columns_are_refused_by_name(rng):
    """codes [B, 0, w] or [B, h, 0] describe an image of no pixels: refused as such, not with a convolution error."""
    m = _model(rng)
    for shape in ((1, 0, 2), (1, 2, 0)):
        with pytest.raises(ValueError, match="at least one code per row and column"):
            m.decode(torch.zeros(shape, dtype=torch.long))


def test_from_release_puts_the_model_on_map_location(rng, tmp_path):
    """map_location places the loaded model, as from_pretrained's does (the meta device: no data is needed to
    tell where the weights are)."""
    m = _model(rng)
    y, c = _write_release(tmp_path, m, dict(m.state_dict()))
    loaded = VQGAN.from_release(y, c, map_location="meta")
    assert {p.device.type for p in loaded.parameters()} == {"meta"}
    assert not loaded.training
    _same_weights(VQGAN.from_release(y, c, map_location="cpu"), m)


@pytest.mark.parametrize("field, value, message", [
    ("n_embed", "96", "n_embed must be a whole number, got '96'"),
    ("n_embed", 1.5, "n_embed must be a whole number, got 1.5"),
    ("ch_mult", 2, r"ch_mult must be a list of whole numbers \(e.g. \[1, 1, 2, 2, 4\]\), got 2"),
    ("attn_resolutions", 16, "attn_resolutions must be a list of whole numbers"),
    ("dropout", 2.0, r"dropout must be a probability in \[0, 1\), got 2.0"),
    ("dropout", 1.0, r"dropout must be a probability in \[0, 1\), got 1.0"),
    ("ch", 0, "ch must be >= 1, got 0"),
    ("ch", -32, "ch must be >= 1, got -32"),
])
def test_config_fields_of_another_type_are_refused_by_name(rng, tmp_path, field, value, message):
    """A yaml or config.json field of the wrong type (a quoted number, one number for a list, a dropout above 1) is
    refused naming the field (and the file), not with a TypeError from inside the comparison or the model's build."""
    m = _model(rng)
    y, c = _write_release(tmp_path, m, dict(m.state_dict()))
    doc = yaml.safe_load(y.read_text())
    params = doc["model"]["params"]
    if field == "n_embed":
        params[field] = value
    else:
        params["ddconfig"][field] = value
    y.write_text(yaml.safe_dump(doc))
    with pytest.raises(ValueError, match=message):
        VQGAN.from_release(y, c)
    m.save_pretrained(tmp_path / "hf")
    config = m.config.to_dict()
    config[field] = value
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=f"config.json: the VQGAN config's {message}"):
        VQGAN.from_pretrained(tmp_path / "hf")


def test_whole_numbers_written_as_floats_are_taken():
    """256.0 for a size (a yaml written by a script) is the whole number it says."""
    c = VQGANConfig(**{**TINY, "resolution": 64.0, "ch_mult": [1, 1, 2.0, 2, 2]})
    assert c.resolution == 64 and isinstance(c.resolution, int) and c.ch_mult == (1, 1, 2, 2, 2)


def test_a_ddconfig_that_is_no_mapping_is_refused_by_name(rng, tmp_path):
    m = _model(rng)
    y, c = _write_release(tmp_path, m, dict(m.state_dict()))
    doc = yaml.safe_load(y.read_text())
    doc["model"]["params"]["ddconfig"] = [1, 2]
    y.write_text(yaml.safe_dump(doc))
    with pytest.raises(ValueError, match="ddconfig of a taming VQGAN config must be a mapping"):
        VQGAN.from_release(y, c)


def test_a_checkpoint_weight_that_is_no_tensor_is_refused_by_name(rng, tmp_path):
    """A state dict whose entry for one of the model's weights is not a tensor is refused listing it, not with an
    AttributeError."""
    m = _model(rng)
    sd = dict(m.state_dict())
    sd["encoder.conv_in.weight"] = 3
    y, c = _write_release(tmp_path, m, sd)
    with pytest.raises(ValueError, match=r"1 weights that are not tensors: encoder.conv_in.weight \(int\)"):
        VQGAN.from_release(y, c)


@pytest.mark.parametrize("mode", ["I;16", "I", "F"])
def test_images_of_more_than_8_bits_are_refused(mode):
    """Pillow converts 16-bit and 32-bit images to RGB by clipping at 255 (nearly all white) and float ones as
    0..255 (nearly all black): such an image is refused, not tokenized as a blank frame."""
    from PIL import Image

    levels = np.linspace(0, 65535, 16 * 16).reshape(16, 16)
    arr = {"I;16": levels.astype(np.uint16), "I": levels.astype(np.int32), "F": (levels / 65535).astype(np.float32)}
    img = Image.fromarray(arr[mode])
    assert img.mode == mode
    with pytest.raises(ValueError, match=f"an image of mode {re.escape(mode)} .*8-bit RGB"):
        preprocess(img)
    # 8-bit modes are taken as before
    for small in (img.convert("L"), Image.new("1", (16, 16)), Image.new("P", (16, 16)), Image.new("CMYK", (16, 16))):
        assert preprocess(small).shape == (1, 3, 16, 16)


def test_encode_moves_the_pixels_to_the_model_as_decode_moves_the_codes(rng):
    """Pixels on the host given to a VQGAN on another device are moved to it (as decode moves its codes), rather
    than failing inside the first convolution. The meta device stands in for a GPU: it needs none."""
    m = VQGAN(VQGANConfig(**TINY)).to("meta").eval()
    assert m.encode(_pixels(rng, 2, 32, 48)).device.type == "meta"
    assert m.encode(_pixels(rng, 2, 32, 48)).shape == (2, 2, 3)
    assert m.decode(torch.zeros(2, 2, 3, dtype=torch.long)).device.type == "meta"
    with pytest.raises(ValueError, match="pixels must lie in"):  # the range is still checked, on the given values
        m.encode(_pixels(rng, 1, 32, 32) * 2)


def test_a_release_checkpoint_of_half_precision_runs_in_float32_as_the_release_runs_it(rng, tmp_path):
    """The release's tokenizer builds its VQModel in float32 and copies the checkpoint into it, so it runs in
    float32 whatever the file holds: `from_release` does the same (its bfloat16 weights' values, widened), where
    `from_pretrained` keeps this package's own files' dtype."""
    m = _model(rng).to(torch.bfloat16)
    y, c = _write_release(tmp_path, m, dict(m.state_dict()))
    loaded = VQGAN.from_release(y, c)
    assert {p.dtype for p in loaded.state_dict().values()} == {torch.float32}
    for k, v in m.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v.float()), k
    x = _pixels(rng, 1, 32, 32)
    assert torch.equal(loaded.encode(x), m.float().encode(x))


# ---------------------------------------------------------------------- parity of the decoder with transformers' Janus
def _janus_twin(gen, attn_res):
    """transformers' Janus VQVAE (taming's encoder and decoder, as Chameleon's) and a VQGAN of the same weights.

    transformers' Chameleon VQVAE has no decoder; Janus's has the same blocks, built coarsest level first, so its
    `decoder.up.0` is this model's `decoder.up.4`. Janus puts an attention block after every ResnetBlock of the
    coarsest level; for the release's attn_resolutions=[] their proj_out is zeroed, which leaves x + 0 = x."""
    transformers = pytest.importorskip("transformers")
    n = len(TINY["ch_mult"])
    hf_cfg = transformers.JanusVQVAEConfig(
        embed_dim=TINY["embed_dim"], num_embeddings=TINY["n_embed"], latent_channels=TINY["z_channels"],
        base_channels=TINY["ch"], channel_multiplier=list(TINY["ch_mult"]), num_res_blocks=TINY["num_res_blocks"],
        num_patches=TINY["resolution"] // 2 ** (n - 1))
    hf = transformers.JanusVQVAE(hf_cfg).eval()
    _randomize(hf, gen)
    sd = {}
    with torch.no_grad():
        for k, v in hf.state_dict(keep_vars=True).items():
            if ".attn." in k and not attn_res:
                if ".proj_out." in k:
                    v.zero_()
                continue
            if k.startswith("decoder.up."):
                level, rest = k[len("decoder.up."):].split(".", 1)
                k = f"decoder.up.{n - 1 - int(level)}.{rest}"
            sd[k] = v.detach()
    ours = VQGAN(VQGANConfig(**{**TINY, "attn_resolutions": attn_res})).eval()
    ours.load_state_dict(sd, strict=True)
    return hf, ours


@pytest.mark.parametrize("attn_res", [(), (4,)])
def test_decoder_matches_transformers_janus(attn_res):
    """The decoder (post_quant_conv, conv_in, mid Res-Attn-Res, 3 ResnetBlocks a level, nearest x2 upsampling then
    a conv, GN -> swish -> conv_out, no tanh) against a second implementation with the same weights, on a grid of
    3x2 codes (rows and columns differ). The encoder's parity with Chameleon's does not reach the decoder."""
    gen = torch.Generator().manual_seed(23)
    hf, ours = _janus_twin(gen, attn_res)
    codes = torch.randint(0, TINY["n_embed"], (2, 3, 2), generator=gen)
    with torch.no_grad():
        z_q = ours.codebook[codes].permute(0, 3, 1, 2)
        ref = hf.decoder(hf.post_quant_conv(z_q))
        got = ours.decode_latents(z_q)
        assert got.shape == ref.shape == (2, 3, 48, 32)
        rel = float((got - ref).norm() / ref.norm())
        assert rel <= 1e-5, rel
        assert float(ref.abs().max()) > 1.0  # unclamped: a tanh or a clamp here would show
        assert torch.allclose(ours.decode(codes), ref.clamp(-1, 1), rtol=0, atol=5e-5)


def test_a_vqgan_saved_to_a_path_under_home_loads_from_it(tmp_path, monkeypatch):
    """save_pretrained("~/vq") wrote a folder named "~" in the working folder, while from_pretrained("~/vq") reads
    the home folder's vq: the load found nothing, or an older save's weights."""
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    (home / "vq").mkdir(parents=True), cwd.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    torch.manual_seed(0)
    m = VQGAN(VQGANConfig(**TINY))
    m.save_pretrained("~/vq")
    assert list(cwd.iterdir()) == [] and sorted(p.name for p in (home / "vq").iterdir()) == [
        "config.json", "model.safetensors"]
    got = VQGAN.from_pretrained("~/vq").state_dict()
    assert all(torch.equal(v, got[k]) for k, v in m.state_dict().items())


# ---------------------------------------------------------------------- config edges, files, pixels
def test_an_attn_resolutions_of_null_means_no_attention_blocks():
    """A yaml or config (transformers' Chameleon one) that says attn_resolutions: null builds the model without
    attention blocks, as an empty list does, rather than being refused as a list of the wrong type."""
    c = VQGANConfig(**{**TINY, "attn_resolutions": None})
    assert c.attn_resolutions == () and c == VQGANConfig(**TINY)
    assert not any(".attn." in k for k in VQGAN(c).state_dict())


@pytest.mark.parametrize("field, value", [("dropout", True), ("n_embed", True), ("ch_mult", [1, True])])
def test_a_boolean_for_a_number_is_refused_by_name(field, value):
    """true in a yaml is no size and no dropout rate (Python would take it as 1): refused naming the field."""
    name = "ch_mult[1]" if field == "ch_mult" else field
    with pytest.raises(ValueError, match=rf"the VQGAN config's {re.escape(name)} must be a "):
        VQGANConfig(**{**TINY, field: value})


def test_a_one_level_tokenizer_has_a_factor_of_one():
    """ch_mult of one level is a tokenizer without downsampling: one code a pixel, decoded to as many pixels."""
    torch.manual_seed(0)
    m = VQGAN(VQGANConfig(ch=32, ch_mult=(1,), num_res_blocks=1, z_channels=8, embed_dim=8, n_embed=16)).eval()
    assert m.downsample == 1 and not hasattr(m.encoder.down[0], "downsample")
    codes = m.encode(torch.rand(1, 3, 3, 2) * 2 - 1)
    assert codes.shape == (1, 3, 2)
    assert m.decode(codes).shape == (1, 3, 3, 2)


def test_a_new_codebook_starts_as_tamings():
    """A VQGAN built from scratch draws its codebook uniformly in [-1/n_embed, 1/n_embed], as taming's quantizer
    does (nn.Embedding's own N(0, 1) would put the entries far from the encoder's first latents)."""
    torch.manual_seed(0)
    book = VQGAN(VQGANConfig(**TINY)).codebook.detach()
    n = TINY["n_embed"]
    assert float(book.abs().max()) <= 1.0 / n and float(book.abs().max()) > 0.9 / n
    assert float(book.min()) < -0.9 / n and book.unique().numel() > book.numel() // 2


def test_a_size_off_the_factor_names_the_nearest_size_that_fits():
    """The refusal suggests each side rounded down to the factor (at least the factor itself)."""
    m = VQGAN(VQGANConfig(**TINY)).eval()
    for (h, w), fix in (((40, 32), "32x32"), ((8, 52), "16x48"), ((33, 47), "32x32")):
        with pytest.raises(ValueError, match=rf"image size {h}x{w} .*\(e\.g\. {fix}\)"):
            m.encode(torch.zeros(1, 3, h, w))


def test_no_images_give_no_codes_on_the_models_device():
    """An empty batch's codes are on the VQGAN's device, as those of any other batch (the meta device stands
    in for a GPU)."""
    m = VQGAN(VQGANConfig(**TINY)).to("meta").eval()
    codes = m.encode(torch.zeros(0, 3, 32, 48))
    assert codes.device.type == "meta" and codes.shape == (0, 2, 3) and codes.dtype == torch.int64


def test_pixels_a_rounding_step_past_the_range_are_taken_and_others_refused(rng):
    """Values a float rounding step outside [-1, 1] (a resize, a bfloat16 round trip) are tokenized as the edge;
    values clearly outside (1.05, -1.05) are refused."""
    m = _model(rng)
    x = _pixels(rng, 1, 32, 32)
    x[0, 0, 0, 0], x[0, 1, 0, 0] = 1.0005, -1.0005
    assert m.encode(x).shape == (1, 2, 2)
    for bad in (1.05, -1.05):
        y = x.clone()
        y[0, 2, 3, 3] = bad
        with pytest.raises(ValueError, match=r"pixels must lie in \[-1, 1\]"):
            m.encode(y)


def test_complex_codes_are_refused_as_not_integer():
    """Complex codes are no code ids: refused as not integer, as floating point ones are."""
    m = VQGAN(VQGANConfig(**TINY)).eval()
    with pytest.raises(TypeError, match="codes must be an integer tensor"):
        m.decode(torch.zeros(1, 2, 2, dtype=torch.complex64))


@pytest.mark.parametrize("key", ["quantize.embedding.cluster_size", "quant_conv.extra.weight",
                                 "post_quant_conv.extra.weight"])
def test_weights_under_the_quantizer_and_its_convs_that_the_model_has_no_layer_for_are_refused(rng, tmp_path, key):
    """The quantizer and the convs around it are the model's own modules too: a checkpoint weight under them
    that this model has no place for (an EMA quantizer's statistics) is refused naming it, not dropped with a
    warning."""
    m = _model(rng)
    sd = dict(m.state_dict())
    sd[key] = torch.zeros(3)
    y, c = _write_release(tmp_path, m, sd)
    with pytest.raises(ValueError, match=rf"1 weights of the model's own modules that the config has no layer for: "
                                         rf"{re.escape(key)}"):
        VQGAN.from_release(y, c)


@pytest.mark.parametrize("text", ["", "- 1\n- 2\n", "model: 3\n"])
def test_a_yaml_that_is_no_mapping_is_refused_naming_the_file(rng, tmp_path, text):
    """An empty vqgan.yaml, a list, or a model entry that is no mapping is refused as no taming config, naming the
    file, not with a TypeError."""
    m = _model(rng)
    _, c = _write_release(tmp_path, m, dict(m.state_dict()))
    (tmp_path / "odd.yaml").write_text(text)
    with pytest.raises(ValueError, match=r"odd.yaml is not a taming VQGAN config"):
        VQGAN.from_release(tmp_path / "odd.yaml", c)


def test_save_release_writes_what_tamings_loader_reads(rng, tmp_path):
    """vqgan.yaml names taming's VQModel as model.target (instantiate_from_config builds it from there), and
    vqgan.ckpt keeps the weights under "state_dict" (VQModel.init_from_ckpt reads them there), as the release's
    files do."""
    m = _model(rng)
    m.save_release(tmp_path)
    doc = yaml.safe_load((tmp_path / "vqgan.yaml").read_text())
    assert doc["model"]["target"] == "taming.models.vqgan.VQModel"
    assert doc["model"]["params"]["n_embed"] == TINY["n_embed"] and doc["model"]["params"]["ddconfig"]["ch"] == 32
    ckpt = torch.load(tmp_path / "vqgan.ckpt", weights_only=True)
    assert set(ckpt) == {"state_dict"} and ckpt["state_dict"].keys() == m.state_dict().keys()


def test_from_pretrained_puts_the_model_on_map_location(rng, tmp_path):
    """map_location places the model that from_pretrained loads (the meta device: no data is needed to tell where
    the weights are), in eval mode."""
    m = _model(rng)
    m.save_pretrained(tmp_path)
    loaded = VQGAN.from_pretrained(tmp_path, map_location="meta")
    assert {p.device.type for p in loaded.parameters()} == {"meta"} and not loaded.training


def test_preprocess_refuses_what_is_no_array_naming_its_type():
    """A nested list of pixels is refused naming its type, not failed on as an array without a dtype."""
    with pytest.raises(TypeError, match="preprocess takes a PIL image or a uint8 array .*got list"):
        preprocess([[[0, 0, 0]]])


def test_preprocess_takes_flipped_and_strided_views(rng):
    """A view with negative or uneven strides (img[::-1], a crop of every other column) gives the pixels of
    its copy."""
    img = torch.randint(0, 256, (2, 32, 64, 3), dtype=torch.uint8, generator=rng).numpy()
    for view in (img[:, ::-1], img[..., ::2, :], img[::-1, :, :, ::-1]):
        assert torch.equal(preprocess(view), preprocess(view.copy()))
    ro = img.copy()
    ro.setflags(write=False)
    assert torch.equal(preprocess(ro), preprocess(img))


def test_postprocess_refuses_integer_pixels():
    """uint8 images given to postprocess (they are already images) are refused, not scaled as if in [-1, 1]."""
    with pytest.raises(TypeError, match="postprocess wants a floating point tensor"):
        postprocess(torch.zeros(3, 4, 4, dtype=torch.uint8))
    with pytest.raises(TypeError, match="postprocess wants a floating point tensor"):
        postprocess(np.zeros((3, 4, 4), np.float32))


@pytest.mark.parametrize("key, default, other", [("resamp_with_conv", True, False), ("give_pre_end", False, True),
                                                 ("tanh_out", False, True), ("use_linear_attn", False, True)])
def test_tamings_other_options_load_at_their_default_and_are_refused_otherwise(rng, tmp_path, key, default, other):
    """A yaml that spells out one of taming's other Encoder/Decoder options at its default builds this model, with
    no warning; the other value changes the architecture and is refused naming the option."""
    m = _model(rng)
    y, c = _write_release(tmp_path, m, dict(m.state_dict()))
    doc = yaml.safe_load(y.read_text())
    for value in (default, other):
        doc["model"]["params"]["ddconfig"][key] = value
        (tmp_path / f"{value}.yaml").write_text(yaml.safe_dump(doc))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _same_weights(m, VQGAN.from_release(tmp_path / f"{default}.yaml", c))
    with pytest.raises(ValueError, match=rf"sets {key}: {other!r}, which changes the architecture; only taming's "
                                         rf"default \({default!r}\)"):
        VQGAN.from_release(tmp_path / f"{other}.yaml", c)


# ---------------------------------------------------------------------- range tolerance, transparency, dtypes, names
def test_pixels_half_a_percent_past_the_range_are_refused(rng):
    """The range check forgives a rounding step past [-1, 1], no more: 1.005 or -1.005 (a half-percent overshoot, no
    float's rounding) is refused, not tokenized as the edge."""
    m = _model(rng)
    x = _pixels(rng, 1, 32, 32)
    for bad in (1.005, -1.005):
        y = x.clone()
        y[0, 1, 2, 3] = bad
        with pytest.raises(ValueError, match=r"pixels must lie in \[-1, 1\]"):
            m.encode(y)


def test_an_image_partly_opaque_is_composited_onto_white_where_it_is_transparent():
    """An RGBA image with opaque pixels and transparent ones is composited as a whole: the transparent pixels come
    out white and the opaque ones as they are (an opaque pixel anywhere does not make the image count as opaque)."""
    from PIL import Image

    from worldvla.vqgan import whiten_transparency

    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., :3] = 30
    rgba[:4, :, 3] = 255  # top half opaque, bottom half fully transparent
    out = np.asarray(whiten_transparency(Image.fromarray(rgba, "RGBA")))
    assert (out[:4] == 30).all() and (out[4:] == 255).all()


def test_transparency_is_composited_with_the_releases_truncation():
    """The blend onto white is truncated to uint8, as the release's tokenizer does it (its levels, not rounded ones):
    alpha 100 over a channel of 2 gives 155.78, taken as 155."""
    from PIL import Image

    from worldvla.vqgan import whiten_transparency

    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0], rgba[..., 1], rgba[..., 3] = 2, 1, 100
    out = np.asarray(whiten_transparency(Image.fromarray(rgba, "RGBA")))
    release = ((1 - 100 / 255) * 255 + (100 / 255) * rgba[..., :3].astype(np.float64)).astype(np.uint8)
    assert np.array_equal(out, release)
    assert (out[..., 0] == 155).all() and (out[..., 1] == 155).all() and (out[..., 2] == 155).all()


def test_postprocess_gives_bfloat16_pixels_the_levels_of_their_values():
    """A bfloat16 VQGAN decodes to bfloat16 pixels: each maps to the level of its value (computed in float32), not
    to one a bfloat16 product rounded off (-0.4921875 is level 65, not 64)."""
    values = torch.linspace(-1, 1, 2001).to(torch.bfloat16).unique()
    pixels = values.view(1, 1, -1).expand(3, 1, -1)
    got = postprocess(pixels)
    assert np.array_equal(got, postprocess(pixels.float()))
    i = int((values == -0.4921875).nonzero())
    assert got[0, i].tolist() == [65, 65, 65]


def test_weights_that_do_not_load_name_the_file_they_came_from(rng, tmp_path):
    """A checkpoint that does not fit the config is refused naming the file read: the release's vqgan.ckpt, or a
    VQGAN folder's model.safetensors."""
    from safetensors.torch import load_file, save_file

    m = _model(rng)
    sd = dict(m.state_dict())
    del sd["decoder.conv_out.bias"]
    y, c = _write_release(tmp_path, m, sd)
    with pytest.raises(ValueError, match=rf"cannot load the VQGAN weights from {re.escape(str(c))}:"):
        VQGAN.from_release(y, c)
    m.save_pretrained(tmp_path / "hf")
    weights = tmp_path / "hf" / "model.safetensors"
    sd = load_file(weights)
    del sd["decoder.conv_out.bias"]
    save_file(sd, weights)
    with pytest.raises(ValueError, match=rf"cannot load the VQGAN weights from {re.escape(str(weights))}:"):
        VQGAN.from_pretrained(tmp_path / "hf")


def test_a_checkpoint_entry_only_named_like_a_module_is_ignored_with_a_warning(rng, tmp_path):
    """Entries under the model's own modules that it has no layer for are refused; an entry whose name merely begins
    like one of them (quantize_ema.decay: another object's, not under `quantize.`) is ignored with a warning."""
    m = _model(rng)
    sd = dict(m.state_dict())
    sd["quantize_ema.decay"] = torch.tensor(0.99)
    y, c = _write_release(tmp_path, m, sd)
    with pytest.warns(UserWarning, match="ignoring 1 keys .*quantize_ema.decay"):
        loaded = VQGAN.from_release(y, c)
    _same_weights(m, loaded)


def test_a_missing_or_untrusted_checkpoint_is_named(rng, tmp_path):
    """A checkpoint that is missing, or that the safe loader refuses, is named in the error (not the yaml beside it)."""
    m = _model(rng)
    y, _ = _write_release(tmp_path, m, dict(m.state_dict()))
    with pytest.raises(FileNotFoundError, match=rf"no VQGAN checkpoint at {re.escape(str(tmp_path / 'none.ckpt'))}"):
        VQGAN.from_release(y, tmp_path / "none.ckpt")
    torch.save({"state_dict": m.state_dict(), "callbacks": Opaque()}, tmp_path / "opaque.ckpt")
    with pytest.raises(RuntimeError, match=rf"^{re.escape(str(tmp_path / 'opaque.ckpt'))} holds Python objects"):
        VQGAN.from_release(y, tmp_path / "opaque.ckpt")


def test_a_folder_of_weights_in_mixed_dtypes_loads_in_float32(rng, tmp_path):
    """from_pretrained takes the dtype of a folder whose weights share one; weights of several dtypes (some
    bfloat16, some float16) load into the float32 model as they are copied, not cast to one of the file's dtypes."""
    from safetensors.torch import load_file, save_file

    m = _model(rng)
    m.save_pretrained(tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    for i, k in enumerate(sd):
        sd[k] = sd[k].to(torch.bfloat16 if i % 2 else torch.float16)
    save_file(sd, tmp_path / "model.safetensors")
    loaded = VQGAN.from_pretrained(tmp_path)
    assert {v.dtype for v in loaded.state_dict().values()} == {torch.float32}
    for k, v in sd.items():
        assert torch.equal(loaded.state_dict()[k], v.float()), k
