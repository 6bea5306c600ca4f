"""The Chameleon VQGAN image tokenizer (spec section 4): a frame becomes a grid of codes and back.

    pixels [B, 3, H, W] in [-1, 1]
      -> encoder (conv_in, 5 levels of ResnetBlocks, 4 stride-2 downsamplings, mid Res-Attn-Res, conv_out)
      -> quant_conv (1x1)                      latents [B, embed_dim, H/16, W/16]
      -> nearest codebook entry (squared L2)   codes   [B, H/16, W/16] int64, row-major
      -> codebook gather -> post_quant_conv -> decoder (mirror image, num_res_blocks + 1 blocks
         per level, nearest x2 upsampling + conv) -> clamp [-1, 1]

Module and parameter names follow taming-transformers' `VQModel`, which is what the
release's `vqgan.ckpt` holds (`encoder.down.0.block.0.norm1.weight`, `quantize.embedding.weight`,
`decoder.up.4.upsample.conv.weight`, ...), so its state dict loads without renaming.
The nearest-code search and the codebook gather go through `worldvla.ops` so that the
fast backends serve them on GPU.
"""
from __future__ import annotations

import json
import numbers
import os
import warnings
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .ops import vq_gather, vq_quantize

COMMITMENT_BETA = 0.25
RELEASE_YAML = "vqgan.yaml"
RELEASE_CKPT = "vqgan.ckpt"
_TAMING_TARGET = "taming.models.vqgan.VQModel"
# The release's checkpoint also carries its training loss (LPIPS + discriminator) under `loss.`.
_IGNORED_PREFIXES = ("loss.",)


class UntrustedCheckpoint(RuntimeError):
    """A checkpoint that pickles other Python objects than tensors, refused by the safe loader: a caller that can
    offer its own way to accept it (a command's option) catches this."""


@dataclass
class VQGANConfig:
    """The taming `ddconfig` plus the codebook size, with the Chameleon release's defaults."""
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    z_channels: int = 256
    n_embed: int = 8192
    embed_dim: int = 256
    in_channels: int = 3
    out_ch: int = 3
    resolution: int = 512
    attn_resolutions: tuple[int, ...] = ()
    dropout: float = 0.0
    double_z: bool = False

    def __post_init__(self):
        # A yaml or config.json may hold any type: each field is checked here, by name, rather than failing
        # later inside torch (a string n_embed, a bare number for ch_mult).
        for name in ("ch_mult", "attn_resolutions"):
            value = getattr(self, name)
            if name == "attn_resolutions" and value is None:
                value = ()
            if not isinstance(value, (list, tuple)):
                example = "[1, 1, 2, 2, 4]" if name == "ch_mult" else "[16], or [] for none"
                raise ValueError(f"the VQGAN config's {name} must be a list of whole numbers (e.g. {example}), "
                                 f"got {value!r}")
            setattr(self, name, tuple(_whole(f"{name}[{i}]", v) for i, v in enumerate(value)))
        for name in ("ch", "num_res_blocks", "z_channels", "n_embed", "embed_dim", "in_channels", "out_ch",
                     "resolution"):
            value = _whole(name, getattr(self, name))
            if value < 1:
                raise ValueError(f"the VQGAN config's {name} must be >= 1, got {value}")
            setattr(self, name, value)
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, numbers.Real) \
                or not 0.0 <= self.dropout < 1.0:  # 1 drops every residual branch's output: nothing would train
            raise ValueError(f"the VQGAN config's dropout must be a probability in [0, 1), got {self.dropout!r}")
        if self.double_z:
            raise ValueError("double_z=True makes the encoder emit a Gaussian (mean, logvar) pair, which a VQ "
                             "model does not use; set double_z=False")
        if len(self.ch_mult) < 1:
            raise ValueError("ch_mult needs at least one level")
        for m in self.ch_mult:
            if m < 1 or (self.ch * m) % 32:
                raise ValueError(f"every level's channel count ch*ch_mult[i] must be a positive multiple of 32 "
                                 f"(GroupNorm uses 32 groups); got ch={self.ch}, ch_mult={self.ch_mult}")

    @classmethod
    def chameleon(cls) -> "VQGANConfig":
        """The Chameleon-7B / WorldVLA release's tokenizer: 8192 codes of 256 dims, factor 16."""
        return cls()

    @classmethod
    def small(cls) -> "VQGANConfig":
        """A tiny tokenizer with the release's downsampling factor 16 (tests, toy runs)."""
        return cls(ch=32, ch_mult=(1, 1, 2, 2, 2), num_res_blocks=1, z_channels=64, embed_dim=64, n_embed=512)

    @property
    def downsample(self) -> int:
        """Image side / latent side."""
        return 2 ** (len(self.ch_mult) - 1)

    # ------------------------------------------------------------------ (de)serialization
    def to_dict(self) -> dict:
        d = asdict(self)
        d["ch_mult"] = list(self.ch_mult)
        d["attn_resolutions"] = list(self.attn_resolutions)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "VQGANConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown VQGANConfig fields {unknown}; expected a subset of {sorted(known)}")
        return cls(**d)

    def to_taming(self) -> dict:
        """`model.params` of a taming `VQModel` yaml."""
        dd = self.to_dict()
        return {"embed_dim": dd.pop("embed_dim"), "n_embed": dd.pop("n_embed"), "ddconfig": dd}

    @classmethod
    def from_taming(cls, params: dict) -> "VQGANConfig":
        """Build from `model.params` of a taming yaml (ddconfig, n_embed, embed_dim)."""
        if not isinstance(params, dict) or "ddconfig" not in params:
            raise ValueError("a taming VQGAN config needs model.params.ddconfig (with ch, ch_mult, ...), "
                             "model.params.n_embed and model.params.embed_dim")
        if not isinstance(params["ddconfig"], dict):
            raise ValueError(f"model.params.ddconfig of a taming VQGAN config must be a mapping (ch: 128, ch_mult: "
                             f"[1, 1, 2, 2, 4], ...), got {params['ddconfig']!r}")
        dd = dict(params["ddconfig"])
        attn_type = dd.pop("attn_type", "vanilla")
        if attn_type != "vanilla":
            raise ValueError(f"only attn_type='vanilla' is supported, the yaml says {attn_type!r}")
        known = {f.name for f in fields(cls)}
        # taming's other Encoder/Decoder options: this model is built as their defaults give it
        for key, default in _TAMING_DEFAULTS.items():
            if key in dd and dd.pop(key) != default:
                raise ValueError(f"the yaml's ddconfig sets {key}: {params['ddconfig'][key]!r}, which changes the "
                                 f"architecture; only taming's default ({default!r}) is supported")
        unknown = sorted(k for k in dd if k not in known)
        if unknown:
            warnings.warn(f"ignoring ddconfig keys the VQGAN does not know: {', '.join(unknown)}", stacklevel=2)
        kwargs = {k: v for k, v in dd.items() if k in known}
        for key in ("n_embed", "embed_dim"):
            if key not in params:
                raise ValueError(f"the taming config lacks model.params.{key}")
            kwargs[key] = params[key]
        return cls(**kwargs)


def _whole(name: str, value) -> int:
    """`value` as an int when it is a whole number (2 or 2.0); else a ValueError naming the field."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not float(value).is_integer():
        raise ValueError(f"the VQGAN config's {name} must be a whole number, got {value!r}")
    return int(value)


# taming's Encoder/Decoder options that this model does not take, at the values it is built as
_TAMING_DEFAULTS = {"resamp_with_conv": True, "give_pre_end": False, "tanh_out": False, "use_linear_attn": False}


# ---------------------------------------------------------------------- building blocks
def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """GN -> swish -> conv3x3 -> GN -> swish -> dropout -> conv3x3, plus a 1x1 shortcut when channels change."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float):
        super().__init__()
        self.norm1 = _group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels, with 1x1 conv projections."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _group_norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.norm(x)
        # [B, C, H, W] -> [B, 1, HW, C]: one head of width C, the softmax scale is C^-1/2.
        q, k, v = (p(h).flatten(2).transpose(1, 2).unsqueeze(1) for p in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.squeeze(1).transpose(1, 2).reshape(B, C, H, W)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # taming pads right/bottom only, so the stride-2 window grid starts at the top-left pixel.
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One resolution level: `block` (ResnetBlocks), `attn` (maybe empty), then a resampler or none."""

    def __init__(self, blocks: list[nn.Module], attns: list[nn.Module], resample_name: str | None,
                 resample: nn.Module | None):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList(attns)
        if resample_name is not None:
            setattr(self, resample_name, resample)
        self._resample_name = resample_name

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.block):
            h = block(h)
            if len(self.attn):
                h = self.attn[i](h)
        if self._resample_name is not None:
            h = getattr(self, self._resample_name)(h)
        return h


class _Mid(nn.Module):
    def __init__(self, channels: int, dropout: float):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels, dropout)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(h)))


class Encoder(nn.Module):
    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        n_levels = len(cfg.ch_mult)
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        levels, block_in, res = [], cfg.ch, cfg.resolution
        for i in range(n_levels):
            block_out = cfg.ch * cfg.ch_mult[i]
            blocks, attns = [], []
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResnetBlock(block_in, block_out, cfg.dropout))
                block_in = block_out
                if res in cfg.attn_resolutions:
                    attns.append(AttnBlock(block_in))
            last = i == n_levels - 1
            levels.append(_Level(blocks, attns, None if last else "downsample", None if last else Downsample(block_in)))
            if not last:
                res //= 2
        self.down = nn.ModuleList(levels)
        self.mid = _Mid(block_in, cfg.dropout)
        self.norm_out = _group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        n_levels = len(cfg.ch_mult)
        block_in = cfg.ch * cfg.ch_mult[-1]
        res = cfg.resolution // 2 ** (n_levels - 1)
        self.conv_in = nn.Conv2d(cfg.z_channels, block_in, 3, padding=1)
        self.mid = _Mid(block_in, cfg.dropout)
        # Built coarsest first, but indexed like the encoder: up[0] is the full-resolution level.
        levels = [None] * n_levels
        for i in reversed(range(n_levels)):
            block_out = cfg.ch * cfg.ch_mult[i]
            blocks, attns = [], []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, block_out, cfg.dropout))
                block_in = block_out
                if res in cfg.attn_resolutions:
                    attns.append(AttnBlock(block_in))
            levels[i] = _Level(blocks, attns, "upsample" if i else None, Upsample(block_in) if i else None)
            if i:
                res *= 2
        self.up = nn.ModuleList(levels)
        self.norm_out = _group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, cfg.out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))  # no tanh: the release clamps afterwards


class VectorQuantizer(nn.Module):
    """Holds the codebook; the search and the gather are `worldvla.ops` calls."""

    def __init__(self, n_embed: int, embed_dim: int):
        super().__init__()
        self.embedding = nn.Embedding(n_embed, embed_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / n_embed, 1.0 / n_embed)

    def forward(self, z: torch.Tensor, backend: str = "auto") -> torch.Tensor:
        """z [B, C, h, w] -> codes [B, h, w] int64 (nearest entry by squared L2)."""
        B, C, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, C)
        return vq_quantize(flat, self.embedding.weight, backend=backend).view(B, h, w)


# ---------------------------------------------------------------------- the tokenizer
def _inference_layout(x: torch.Tensor) -> torch.Tensor:
    """Channels-last activations for inference on CPU: oneDNN's convolutions run 1.3-1.4x
    faster on them here (64-px frames, 2-core AVX2: encode 9.1 -> 6.6 ms, decode 19.7 -> 13.5 ms
    a frame). Training keeps NCHW, whose convolution backward is faster on CPU."""
    return x.contiguous(memory_format=torch.channels_last) if x.device.type == "cpu" else x


class VQGAN(nn.Module):
    def __init__(self, config: VQGANConfig | None = None):
        super().__init__()
        self.config = config = config or VQGANConfig.chameleon()
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quantize = VectorQuantizer(config.n_embed, config.embed_dim)
        self.quant_conv = nn.Conv2d(config.z_channels, config.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.z_channels, 1)

    @property
    def downsample(self) -> int:
        return self.config.downsample

    @property
    def codebook(self) -> torch.Tensor:
        return self.quantize.embedding.weight

    # ------------------------------------------------------------------ input checks
    def _check_pixels(self, pixels) -> torch.Tensor:
        if not isinstance(pixels, torch.Tensor):
            raise TypeError(f"pixels must be a torch.Tensor [B, {self.config.in_channels}, H, W] in [-1, 1], got "
                            f"{type(pixels).__name__}; convert images with worldvla.vqgan.preprocess()")
        if not pixels.is_floating_point():
            raise TypeError(f"pixels must be floating point in [-1, 1], got dtype {pixels.dtype}; "
                            f"convert uint8 images with worldvla.vqgan.preprocess() (x / 255 * 2 - 1)")
        c = self.config.in_channels
        if pixels.dim() != 4 or pixels.shape[1] != c:
            raise ValueError(f"pixels must have shape [B, {c}, H, W] (channels first, {c} channels), got "
                             f"{tuple(pixels.shape)}; for HWC images use worldvla.vqgan.preprocess()")
        H, W = pixels.shape[-2:]
        f = self.downsample
        if H % f or W % f or H == 0 or W == 0:
            raise ValueError(f"image size {H}x{W} (HxW) is not a multiple of the VQGAN downsampling factor {f}; "
                             f"crop or resize both sides to a multiple of {f} (e.g. {max(f, H // f * f)}x"
                             f"{max(f, W // f * f)})")
        return pixels.to(self.codebook.device, self.codebook.dtype)  # as decode moves its codes to the model

    # ------------------------------------------------------------------ inference
    def encode_latents(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pre-quantization latents: pixels [B, 3, H, W] -> [B, embed_dim, H/f, W/f]."""
        return self.quant_conv(self.encoder(self._check_pixels(pixels)))

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor, backend: str = "auto") -> torch.Tensor:
        """pixels [B, 3, H, W] in [-1, 1] -> codes [B, H/16, W/16] int64."""
        checked = self._check_pixels(pixels)
        if checked.shape[0] == 0:  # no images, no codes (aminmax has nothing to reduce), as decode of none gives none
            f = self.downsample
            return torch.empty((0, checked.shape[2] // f, checked.shape[3] // f), dtype=torch.long,
                               device=self.codebook.device)
        lo, hi = torch.aminmax(pixels.detach())  # the values given, before the model's dtype rounds them
        if not (float(lo) >= -1.001 and float(hi) <= 1.001):  # NaN fails both comparisons
            raise ValueError(f"pixels must lie in [-1, 1], got values in [{float(lo):.3g}, {float(hi):.3g}] "
                             f"(NaN where the bounds read nan); "
                             f"map uint8 images with worldvla.vqgan.preprocess() (x / 255 * 2 - 1)")
        return self.quantize(self.encode_latents(_inference_layout(checked)), backend=backend)

    def decode_latents(self, z_q: torch.Tensor) -> torch.Tensor:
        """Quantized latents [B, embed_dim, h, w] -> unclamped pixels [B, 3, h*f, w*f]."""
        return self.decoder(self.post_quant_conv(z_q))

    @torch.no_grad()
    def decode(self, codes: torch.Tensor, backend: str = "auto") -> torch.Tensor:
        """codes [B, h, w] (integer) -> pixels [B, 3, h*16, w*16] clamped to [-1, 1].

        Runs without autograd, like `encode`; `decode_latents` is the differentiable path."""
        if not isinstance(codes, torch.Tensor) or codes.is_floating_point() or codes.is_complex() \
                or codes.dtype == torch.bool:
            raise TypeError(f"codes must be an integer tensor [B, h, w], got "
                            f"{codes.dtype if isinstance(codes, torch.Tensor) else type(codes).__name__}")
        if codes.dim() != 3:
            raise ValueError(f"codes must have shape [B, h, w], got {tuple(codes.shape)}; "
                             f"add a batch dimension with codes[None] for a single image")
        if 0 in codes.shape[1:]:
            raise ValueError(f"codes [B, h, w] must hold at least one code per row and column, got shape "
                             f"{tuple(codes.shape)}: an image of 0 pixels has no codes to decode")
        z_q = vq_gather(codes.to(self.codebook.device), self.codebook, backend=backend)
        return self.decode_latents(_inference_layout(z_q)).clamp(-1.0, 1.0).contiguous()

    def encode_images(self, images, backend: str = "auto") -> torch.Tensor:
        """uint8 images ([H, W, 3], [N, H, W, 3] or a PIL image) -> codes [N, h, w] int64 on the VQGAN's
        device: `preprocess`, then `encode`."""
        return self.encode(preprocess(images).to(self.codebook.device, self.codebook.dtype), backend=backend)

    def decode_images(self, codes: torch.Tensor, backend: str = "auto") -> np.ndarray:
        """codes [B, h, w] -> uint8 images [B, H, W, 3] on the host: `decode`, then `postprocess`."""
        return postprocess(self.decode(codes, backend=backend))

    # ------------------------------------------------------------------ training
    def forward(self, pixels: torch.Tensor, beta: float = COMMITMENT_BETA):
        """Training pass: (reconstruction [B, 3, H, W] unclamped, VQ loss, codes [B, h, w]).

        VQ loss = ||sg[z] - e||^2 (codebook) + beta * ||z - sg[e]||^2 (commitment), means over
        elements; gradients reach the encoder through the straight-through estimator.
        (taming's `legacy=True` quantizer puts beta on the codebook term instead.)
        """
        z = self.encode_latents(pixels)
        with torch.no_grad():
            codes = self.quantize(z)
        z_q = self.quantize.embedding(codes).permute(0, 3, 1, 2)
        vq_loss = F.mse_loss(z_q, z.detach()) + beta * F.mse_loss(z, z_q.detach())
        z_st = z + (z_q - z).detach()
        return self.decode_latents(z_st), vq_loss, codes

    # ------------------------------------------------------------------ weights
    def load_checked(self, state_dict: dict, source: str = "state dict") -> None:
        """Load weights strictly on this model's own keys.

        Keys under `loss.` (the release's LPIPS / discriminator) are dropped; other unknown keys
        warn, except under the model's own modules (encoder, decoder, quantizer and their convs), where
        they mean trained layers the config leaves out (fewer resolutions, no attention blocks): those
        raise, as missing keys and shape mismatches do, listing every offender.
        """
        own = self.state_dict()
        sd = {k: v for k, v in state_dict.items() if not k.startswith(_IGNORED_PREFIXES)}
        missing = [k for k in own if k not in sd]
        not_tensors = [f"{k} ({type(sd[k]).__name__})" for k in own if k in sd and not isinstance(sd[k], torch.Tensor)]
        mismatched = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
                      for k in own if isinstance(sd.get(k), torch.Tensor) and tuple(sd[k].shape) != tuple(own[k].shape)]
        unexpected = [k for k in sd if k not in own]
        modules = tuple(f"{name}." for name, _ in self.named_children())
        dropped = [k for k in unexpected if k.startswith(modules)]
        if missing or not_tensors or mismatched or dropped:
            msg = [f"cannot load the VQGAN weights from {source}:"]
            if missing:
                msg.append(f"{len(missing)} missing keys: {', '.join(missing[:20])}" + (" ..." if len(missing) > 20 else ""))
            if not_tensors:
                msg.append(f"{len(not_tensors)} weights that are not tensors: {', '.join(not_tensors[:20])}"
                           + (" ..." if len(not_tensors) > 20 else ""))
            if mismatched:
                msg.append(f"{len(mismatched)} shape mismatches: " + "; ".join(mismatched[:20])
                           + (" ..." if len(mismatched) > 20 else ""))
            if dropped:
                msg.append(f"{len(dropped)} weights of the model's own modules that the config has no layer for: "
                           + ", ".join(dropped[:20]) + (" ..." if len(dropped) > 20 else ""))
            msg.append("the config (yaml / config.json) probably does not describe this checkpoint")
            raise ValueError("\n  ".join(msg))
        if unexpected:
            warnings.warn(f"ignoring {len(unexpected)} keys of {source} that the VQGAN does not use: "
                          f"{', '.join(unexpected[:10])}" + (" ..." if len(unexpected) > 10 else ""), stacklevel=2)
        self.load_state_dict({k: sd[k] for k in own}, strict=True)

    @classmethod
    def from_release(cls, yaml_path: str | os.PathLike, ckpt_path: str | os.PathLike, *,
                     map_location="cpu", trust_checkpoint: bool = False) -> "VQGAN":
        """Load the release's `vqgan.yaml` (taming config) and `vqgan.ckpt` (weights under "state_dict").

        The checkpoint is read with `torch.load(weights_only=True)`; a file that pickles other
        Python objects needs `trust_checkpoint=True` (full unpickling: only for files you trust).
        The model is then moved to `map_location`, as `from_pretrained` moves it. It runs in float32 whatever
        dtype the file's tensors hold, as the release's tokenizer runs it (its taming VQModel is built in float32
        and `load_state_dict` copies the weights into it); `.to(dtype)` gives another. `from_pretrained` keeps
        the dtype of this package's own files instead (a bfloat16 `save_pretrained` stays bfloat16).
        """
        import yaml

        yaml_path, ckpt_path = os.path.expanduser(yaml_path), os.path.expanduser(ckpt_path)
        with open(yaml_path) as fh:
            doc = yaml.safe_load(fh)
        try:
            params = doc["model"]["params"]
        except (TypeError, KeyError):
            raise ValueError(f"{yaml_path} is not a taming VQGAN config: it needs model.params.ddconfig, "
                             f"model.params.n_embed and model.params.embed_dim") from None
        model = cls(VQGANConfig.from_taming(params))
        if not os.path.isfile(ckpt_path):
            raise FileNotFoundError(f"no VQGAN checkpoint at {ckpt_path} (the release's vqgan.ckpt)")
        try:
            # Read onto the CPU, where the model is built and its weights are copied into; moved afterwards.
            ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=not trust_checkpoint)
        except Exception as err:
            if not trust_checkpoint and "weights only load failed" in str(err).lower():
                raise UntrustedCheckpoint(f"{ckpt_path} holds Python objects besides tensors and was refused by the safe "
                                   f"loader ({type(err).__name__}). If you trust the file, pass "
                                   f"trust_checkpoint=True") from err
            raise ValueError(f"{ckpt_path}: the checkpoint cannot be read ({type(err).__name__}: {err}); it is "
                             f"damaged or cut short: copy it again") from err
        sd = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
        if not isinstance(sd, dict):
            raise ValueError(f"{ckpt_path} holds no state dict (expected a dict with weights under 'state_dict')")
        model.load_checked(sd, source=str(ckpt_path))
        return model.to(map_location).eval()

    def save_release(self, folder: str | os.PathLike) -> None:
        """Write `vqgan.yaml` and `vqgan.ckpt` in the release's (taming) format, as `save_pretrained`
        does: a crash never leaves a vqgan.yaml next to missing, half-written or older weights."""
        from pathlib import Path

        import yaml

        from .checkpoint import write_atomic, write_text_atomic

        doc = {"model": {"target": _TAMING_TARGET, "params": self.config.to_taming()}}
        folder = Path(folder).expanduser()  # the folder from_release reads back
        sd = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        (folder / RELEASE_YAML).unlink(missing_ok=True)
        write_atomic(folder / RELEASE_CKPT, lambda p: torch.save({"state_dict": sd}, p))
        write_text_atomic(folder / RELEASE_YAML, yaml.safe_dump(doc, sort_keys=False))

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Write `model.safetensors`, then `config.json`, each under a temporary name renamed into
        place (an older config.json is removed first): a crash never leaves a config.json next to
        missing, half-written or older weights."""
        from pathlib import Path

        from safetensors.torch import save_file

        from .checkpoint import write_atomic, write_text_atomic

        folder = Path(folder).expanduser()  # the folder from_pretrained reads back
        sd = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        (folder / "config.json").unlink(missing_ok=True)
        write_atomic(folder / "model.safetensors", lambda p: save_file(sd, p))
        write_text_atomic(folder / "config.json", json.dumps(self.config.to_dict(), indent=2))

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, map_location="cpu") -> "VQGAN":
        from .checkpoint import check_folder, read_weights_file, read_json_file

        folder = check_folder(folder, "vqgan")  # a model or policy folder named as such, not by its fields
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"{folder}: config.json is missing (expected a VQGAN folder: "
                                    f"VQGAN.save_pretrained, `worldvla train-vq` OUT/vqgan)")
        saved = read_json_file(folder / "config.json", "VQGAN config")  # a damaged file is refused naming it
        try:
            config = VQGANConfig.from_dict(saved)
        except ValueError as e:  # say which file holds the bad field
            raise ValueError(f"{folder / 'config.json'}: {e}") from None
        model = cls(config)
        path = folder / "model.safetensors"
        sd = read_weights_file(path)  # a damaged file is refused naming it
        model.load_checked(sd, source=path)
        dtypes = {v.dtype for v in sd.values()}
        if len(dtypes) == 1:
            model.to(dtypes.pop())
        return model.to(map_location).eval()


# ---------------------------------------------------------------------- pixels <-> tensors
def whiten_transparency(img):
    """Composite an image with transparency onto white, as the release's tokenizer does."""
    from PIL import Image, ImageMode

    if img.mode == "RGB":
        return img
    # Pillow's conversion to RGB clips 16-bit and 32-bit pixels to 255 and takes float ones as 0..255, so such an
    # image would come out nearly all white or all black.
    if ImageMode.getmode(img.mode).typestr[-2:] not in ("u1", "b1"):
        raise ValueError(f"an image of mode {img.mode} (more than 8 bits a pixel: 16-bit or float) would lose its "
                         f"levels in the conversion to 8-bit RGB; scale it to 0..255 and save or pass it as 8-bit RGB "
                         f"first")
    rgba = np.asarray(img.convert("RGBA"))
    if (rgba[..., 3] == 255).all():
        return img.convert("RGB")
    alpha = rgba[..., 3:4].astype(np.float64) / 255.0
    rgb = (1.0 - alpha) * 255.0 + alpha * rgba[..., :3]
    return Image.fromarray(rgb.astype(np.uint8), "RGB")


def preprocess(image) -> torch.Tensor:
    """uint8 image(s) -> float32 pixels in [-1, 1], channels first, batched.

    Accepts a PIL image (transparency whitened, converted to RGB), or a uint8 numpy array /
    tensor of shape [H, W, 3] or [N, H, W, 3]. Returns [1, 3, H, W] or [N, 3, H, W].
    """
    try:
        from PIL import Image
        if isinstance(image, Image.Image):
            image = np.asarray(whiten_transparency(image))
    except ImportError:
        pass
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    if not isinstance(image, np.ndarray):
        raise TypeError(f"preprocess takes a PIL image or a uint8 array [H, W, 3] / [N, H, W, 3], got "
                        f"{type(image).__name__}")
    if image.dtype != np.uint8:
        raise TypeError(f"preprocess wants uint8 pixels in [0, 255], got dtype {image.dtype}; "
                        f"float images already in [-1, 1] can go straight to VQGAN.encode as [B, 3, H, W]")
    if image.ndim not in (3, 4) or image.shape[-1] != 3:
        raise ValueError(f"preprocess wants an RGB array [H, W, 3] or [N, H, W, 3] (channels last), got shape "
                         f"{image.shape}; convert grayscale / RGBA first (PIL: img.convert('RGB'))")
    x = torch.from_numpy(np.require(image, requirements=["C", "W"])).double()
    if x.dim() == 3:
        x = x[None]
    # In float64, then float32, as the release maps pixels (numpy's x / 255 * 2 - 1): in float32 half of the
    # 256 levels came out one float32 step off.
    return (x / 255.0 * 2.0 - 1.0).float().permute(0, 3, 1, 2).contiguous()


def postprocess(pixels: torch.Tensor) -> np.ndarray:
    """Pixels in [-1, 1] ([3, H, W] or [B, 3, H, W]) -> uint8 numpy ([H, W, 3] or [B, H, W, 3]).

    Rounds to the nearest level (the release truncates, which can be one level darker).
    """
    if not isinstance(pixels, torch.Tensor) or not pixels.is_floating_point():
        raise TypeError("postprocess wants a floating point tensor of pixels in [-1, 1]")
    if pixels.dim() not in (3, 4) or pixels.shape[-3] != 3:
        raise ValueError(f"postprocess wants [3, H, W] or [B, 3, H, W], got {tuple(pixels.shape)}")
    x = ((pixels.detach().float().clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)
    return x.movedim(-3, -1).cpu().numpy()


__all__ = ["VQGAN", "VQGANConfig", "preprocess", "postprocess", "whiten_transparency", "COMMITMENT_BETA"]
