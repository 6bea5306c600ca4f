"""The WorldVLA transformer: the Chameleon decoder, read top to bottom.

Pre-norm RMSNorm blocks (or the post-norm `swin_norm` variant of Chameleon-30B),
LayerNorm on q and k over the head dimension with affine parameters before rotate-half
RoPE (one row per head, transformers' layout; or the release's [model_parallel_size, head_dim]
rows, each shared by consecutive heads), SwiGLU MLP, untied lm_head, no biases.
Parameter names are transformers' Chameleon names, so release checkpoints load as is.
Attention goes through `worldvla.ops` (chunk rule for prefill/training, KV cache for decode).
"""
from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from . import ops
from .mask import ChunkMaskMeta, DecodeMeta, causal_meta, chunk_mask_meta
from .tokens.layout import VocabLayout
from .checks import is_count


ATTENTION_MODES = ("chunk", "causal")


@dataclass
class ModelConfig:
    vocab_size: int = 65536
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    swin_norm: bool = False
    dropout: float = 0.0
    attention: str = "chunk"  # "chunk": the release's chunk mask (spec 3); "causal": plain causal (the ablation)
    # The q/k norms' affine rows: None, one per head ([heads, head_dim], transformers' Chameleon); n, the
    # release's layout ([n, head_dim], row i shared by the i-th n-th of the heads; its checkpoints have n = 1).
    model_parallel_size: int | None = None
    layout: dict | None = field(default=None, repr=False)  # VocabLayout.to_dict(); None = chameleon for 65536
    # The config.json keys of a loaded checkpoint that this package does not read (the release's
    # vocabulary_map, vq_config, architectures, ...): written back on save, so that the release's code
    # loads the folder again. Not part of `to_dict` (a checkpoint's record of the model's shape).
    hf_extra: dict | None = field(default=None, repr=False, compare=False)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def chameleon_7b(cls, **kw) -> "ModelConfig":
        return cls(**kw)

    @classmethod
    def small(cls, layout: VocabLayout | None = None, **kw) -> "ModelConfig":
        """~3.7M parameters over the compact vocabulary: trains on a laptop CPU."""
        layout = layout or VocabLayout.compact()
        base = dict(vocab_size=layout.vocab_size, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                    num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=2048, layout=layout.to_dict())
        base.update(kw)
        return cls(**base)

    @classmethod
    def tiny(cls, layout: VocabLayout | None = None, **kw) -> "ModelConfig":
        layout = layout or VocabLayout.compact(n_image_codes=64)
        base = dict(vocab_size=layout.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, layout=layout.to_dict())
        base.update(kw)
        return cls(**base)

    def vocab_layout(self) -> VocabLayout | None:
        if self.layout is not None:
            return VocabLayout.from_dict(self.layout)
        return VocabLayout.chameleon() if self.vocab_size == 65536 else None

    def __post_init__(self):
        if isinstance(self.layout, VocabLayout):  # the field holds its dict form (to_dict, config.json)
            self.layout = self.layout.to_dict()

    def validate(self) -> None:
        # Checked first: a zero would divide below, a float or a string fail deep inside torch, and a base or eps
        # of no meaning (rope_theta 0) build a model whose logits are all NaN.
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "max_position_embeddings"):
            value = getattr(self, name)
            if not is_count(value, 1):
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        for name in ("rope_theta", "rms_norm_eps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) \
                    or value <= 0:
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, numbers.Real) or not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be a number in [0, 1), got {self.dropout!r}")
        if not isinstance(self.swin_norm, bool):  # a string "false" would turn the post-norm variant on
            raise ValueError(f"swin_norm must be true or false, got {self.swin_norm!r}")
        if self.layout is not None and not isinstance(self.layout, dict):
            raise ValueError(f"layout must be a VocabLayout's dict (VocabLayout.to_dict()) or None, got "
                             f"{type(self.layout).__name__}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_key_value_heads {self.num_key_value_heads} must divide num_attention_heads {self.num_attention_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for RoPE")
        if self.attention not in ATTENTION_MODES:
            raise ValueError(f"attention must be one of {ATTENTION_MODES}, got {self.attention!r}")
        if self.layout is not None and self.layout.get("vocab_size") != self.vocab_size:
            # The loss weights and the chunk rule cover the layout's ids; the embedding and the head vocab_size.
            raise ValueError(f"vocab_size {self.vocab_size} differs from its layout's vocabulary of "
                             f"{self.layout.get('vocab_size')} ids: give vocab_size={self.layout.get('vocab_size')} "
                             f"(ModelConfig.tiny and small take it from the layout), or the layout of this vocabulary")
        n = self.model_parallel_size
        if n is not None and (not is_count(n, 1)
                              or self.num_attention_heads % n or self.num_key_value_heads % n):
            raise ValueError(f"model_parallel_size {n!r} (the q/k norms' shared affine rows) must divide the "
                             f"{self.num_attention_heads} query and {self.num_key_value_heads} key/value heads; "
                             f"None gives every head its own row")

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("hf_extra")
        return d


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class HeadLayerNorm(nn.Module):
    """LayerNorm over head_dim, then an affine (gamma, beta) of `rows` rows: one per head (rows = heads,
    transformers' layout), or the release's fewer rows, each repeated over heads // rows consecutive heads
    (its checkpoints hold one row that every head shares)."""

    def __init__(self, heads: int, head_dim: int, rows: int | None = None):
        super().__init__()
        rows = heads if rows is None else rows
        if rows < 1 or heads % rows:
            raise ValueError(f"{rows} affine rows cannot be shared evenly by {heads} heads")
        self.heads, self.rows = heads, rows
        self.weight = nn.Parameter(torch.ones(rows, head_dim))
        self.bias = nn.Parameter(torch.zeros(rows, head_dim))
        self.eps = 1e-5

    def per_head(self) -> tuple[torch.Tensor, torch.Tensor]:
        """gamma, beta as [heads, head_dim]: the parameters themselves, or their rows repeated."""
        if self.rows == self.heads:
            return self.weight, self.bias
        n = self.heads // self.rows
        return self.weight.repeat_interleave(n, 0), self.bias.repeat_interleave(n, 0)

    def forward(self, x):  # [..., heads, head_dim]
        w, b = self.per_head()
        return F.layer_norm(x, x.shape[-1:], None, None, eps=self.eps) * w + b


def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float, dtype):
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float32) / head_dim))
    freqs = position_ids.float().unsqueeze(-1) * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype).unsqueeze(-2), emb.sin().to(dtype).unsqueeze(-2)  # [..., L, 1, Dh]


def apply_rope(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class KVCache:
    """Static cache: slot s of every layer holds the key/value of the token at position s."""

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, device=None, dtype=torch.float32):
        shape = (cfg.num_hidden_layers, batch, max_len, cfg.num_key_value_heads, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len

    def write(self, layer: int, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """pos [B, Q] slots; k, v [B, Q, Hkv, Dh]."""
        b = torch.arange(pos.shape[0], device=pos.device).unsqueeze(1).expand_as(pos)
        self.k[layer][b, pos] = k.to(self.k.dtype)
        self.v[layer][b, pos] = v.to(self.v.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        H, Hkv, Dh = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, H * Dh, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, Hkv * Dh, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, Hkv * Dh, bias=False)
        self.o_proj = nn.Linear(H * Dh, cfg.hidden_size, bias=False)
        self.q_norm = HeadLayerNorm(H, Dh, cfg.model_parallel_size)
        self.k_norm = HeadLayerNorm(Hkv, Dh, cfg.model_parallel_size)

    def forward(self, x, cos, sin, ctx: "ForwardContext", layer: int):
        B, L, _ = x.shape
        cfg = self.cfg
        proj = ctx.project
        q = self.q_norm(proj(self.q_proj, x).view(B, L, cfg.num_attention_heads, cfg.head_dim))
        k = self.k_norm(proj(self.k_proj, x).view(B, L, cfg.num_key_value_heads, cfg.head_dim))
        v = proj(self.v_proj, x).view(B, L, cfg.num_key_value_heads, cfg.head_dim)
        # Under autocast the norms' float32 affine and the float32 rotary tables leave q and k in float32 while v
        # comes out of its projection in the autocast dtype: one dtype for the attention kernels, v's (a no-op
        # without autocast; the release trains with bfloat16 parameters, so its q and k are bfloat16 there too).
        q, k = apply_rope(q, cos, sin).to(v.dtype), apply_rope(k, cos, sin).to(v.dtype)
        if ctx.cache is None:
            if ctx.meta.packed:  # [1, T, ...] -> [T, ...]
                o = ops.masked_attention(q[0], k[0], v[0], ctx.meta, backend=ctx.backend).unsqueeze(0)
            else:
                o = ops.masked_attention(q, k, v, ctx.meta, backend=ctx.backend)
        else:
            ctx.cache.write(layer, ctx.position_ids, k, v)
            o = ops.decode_attention(q, ctx.cache.k[layer], ctx.cache.v[layer], ctx.decode_meta, backend=ctx.backend)
        return proj(self.o_proj, o.reshape(B, L, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x, ctx: "ForwardContext"):
        proj = ctx.project
        return proj(self.down_proj, F.silu(proj(self.gate_proj, x)) * proj(self.up_proj, x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.swin_norm = cfg.swin_norm
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, cos, sin, ctx, layer):
        if self.swin_norm:  # post-norm (Chameleon-30B)
            x = x + self.dropout(self.input_layernorm(self.self_attn(x, cos, sin, ctx, layer)))
            return x + self.dropout(self.post_attention_layernorm(self.mlp(x, ctx)))
        x = x + self.dropout(self.self_attn(self.input_layernorm(x), cos, sin, ctx, layer))
        return x + self.dropout(self.mlp(self.post_attention_layernorm(x), ctx))


def plain_linear(layer: nn.Module) -> bool:
    """Whether `layer` computes its weight alone: a bias-free nn.Linear (not an adapter such as LoRA, a
    subclass or a quantized linear) that no forward hook watches. Only such a layer may be replaced by
    a kernel taking its weight; any other runs as a module."""
    return (type(layer) is nn.Linear and layer.bias is None and not layer._forward_hooks
            and not layer._forward_pre_hooks and not _GLOBAL_HOOKS[0] and not _GLOBAL_HOOKS[1])


_GLOBAL_HOOKS = (nn.modules.module._global_forward_hooks, nn.modules.module._global_forward_pre_hooks)


@dataclass
class ForwardContext:
    meta: ChunkMaskMeta | None = None
    cache: KVCache | None = None
    position_ids: torch.Tensor | None = None
    decode_meta: DecodeMeta | None = None
    backend: str = "auto"
    linear: Callable | None = None  # a kernel for the projections (ops.resolve_linear); None: the modules

    def project(self, layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        if self.linear is None or not plain_linear(layer):  # adapters, subclasses, hooks: the module
            return layer(x)
        return self.linear(x, layer.weight)


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList([DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


@torch.no_grad()
def _fill(p: torch.Tensor, init) -> None:
    """Apply the in-place initializer `init` to `p`; a DTensor is initialized whole on the CPU
    (where a CPU generator can draw it) and gets its local shard."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(p, DTensor):
        full = torch.empty(p.shape, dtype=torch.float32)
        init(full)
        local = distribute_tensor(full.to(p.device), p.device_mesh, p.placements, src_data_rank=None).to_local()
        p.to_local().copy_(local)
    else:
        init(p)


def loss_class_weights(layout: VocabLayout, alpha: float = 0.04, release: bool = False) -> torch.Tensor:
    """Per-target-class CE weights: alpha on exactly the image-code ids, 1 elsewhere.

    The release writes `w[3:8195] = alpha`, which covers ids 3..8194: it down-weights
    `<unk>` (3) and misses the last image code (8195). Here the weight sits on the
    image-code ids themselves; `release=True` gives the release's slice instead (its ids
    shifted down by one: [first image id - 1, last image id), the same on a compact layout)
    and its value: FSDP's bfloat16 cast of the weight tensor makes 0.04 0.0400390625."""
    # float32's range too: a finite 1e39 became an inf weight
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not math.isfinite(alpha) or alpha < 0 \
            or alpha > torch.finfo(torch.float32).max:
        raise ValueError(f"the image-code loss weight must be a finite number >= 0 (0 leaves image codes out of "
                         f"the loss, 1 weighs them as other tokens), got {alpha!r}")
    w = torch.ones(layout.vocab_size)
    if release:
        lo, hi = min(layout.image_code_ids), max(layout.image_code_ids)
        w[lo - 1:hi] = float(torch.tensor(alpha, dtype=torch.bfloat16))
    else:
        w[layout.image_code_weight_mask()] = alpha
    return w


class WorldVLA(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.config = cfg
        self.layout = cfg.vocab_layout()
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.gradient_checkpointing = False
        self.attn_backend = "auto"

    # ------------------------------------------------------------------ core
    def attention_meta(self, input_ids, cu_seqlens=None) -> ChunkMaskMeta:
        """The attention metadata this model uses for `input_ids` (chunk rule, or causal for
        `attention="causal"` or a model without a layout). Built on the ids' device: callers
        holding the ids on the host can build it there and move it, with no device sync."""
        return self._meta_for(input_ids, None, cu_seqlens)

    def _meta_for(self, input_ids, meta, cu_seqlens):
        if meta is not None:
            return meta
        if self.layout is not None and self.config.attention == "chunk":
            return chunk_mask_meta(input_ids, self.layout, cu_seqlens)
        return causal_meta(tuple(input_ids.shape), input_ids.device, cu_seqlens)

    def hidden_states(self, input_ids, meta: ChunkMaskMeta | None = None, cu_seqlens=None, *,
                      cache: KVCache | None = None, position_ids=None, decode_meta: DecodeMeta | None = None,
                      backend: str | None = None, check_ids: bool = True):
        """Final-norm hidden states.

        Without a cache: input_ids [B, L] (or [T] with cu_seqlens / packed meta) under the chunk rule.
        With a cache: input_ids [B, Q] written at slots `position_ids` [B, Q], attending under `decode_meta`;
        this path makes no host synchronization, so it can be captured in a CUDA graph.
        `backend` picks the attention backend (default: `self.attn_backend`); the projections take
        `ops.linear`'s `auto` choice, or torch's with backend="torch".
        `check_ids=False` skips the ids' range check (one host read of the device) for callers that
        checked the ids before moving them to the device (the trainer).
        """
        backend = backend or self.attn_backend
        cfg = self.config
        ops.dispatch.require_integers(input_ids, "input_ids must be integer token ids")  # a bool mask too
        # The cached (decode) path skips the range check: it would synchronize the host on every step and
        # break CUDA-graph capture; the engine validates prompts once before prefill.
        if cache is None and check_ids and input_ids.numel():
            lo, hi = (int(x) for x in torch.stack(torch.aminmax(input_ids)).tolist())  # one host sync, not two
            if lo < 0 or hi >= cfg.vocab_size:
                raise ValueError(f"token ids out of range [{lo}, {hi}] for a vocabulary of {cfg.vocab_size}")
        if cache is None:
            if not input_ids.numel():
                raise ValueError(f"input_ids of shape {tuple(input_ids.shape)} hold no tokens: give at least one "
                                 f"token per sequence")
            meta = self._meta_for(input_ids, meta, cu_seqlens)
            packed = meta.packed
            ids = input_ids.view(1, -1) if packed else (input_ids.unsqueeze(0) if input_ids.dim() == 1 else input_ids)
            built = tuple(meta.position_ids.shape)
            if not packed and meta.kv_block.dim() == 1:  # one unbatched sequence
                meta = ChunkMaskMeta(meta.kv_block[None], meta.q_limit[None], meta.position_ids[None], None, meta.max_seqlen)
            if ((1, *built) if packed else tuple(meta.position_ids.shape)) != tuple(ids.shape):
                raise ValueError(f"meta was built for input_ids of shape {built}, but input_ids have shape "
                                 f"{tuple(input_ids.shape)}: build it from these ids (model.attention_meta(input_ids, "
                                 f"cu_seqlens)), or leave meta out")
            pos = meta.position_ids.view(ids.shape)
            # The metadata's longest document, a host int (read the positions only if it was not set).
            longest = meta.max_seqlen if meta.max_seqlen > 0 else int(pos.max()) + 1
            if longest > cfg.max_position_embeddings:
                raise ValueError(f"sequence of {longest} positions exceeds max_position_embeddings "
                                 f"{cfg.max_position_embeddings}")
            ctx = ForwardContext(meta=meta, backend=backend)
        else:
            if decode_meta is None or position_ids is None:
                raise ValueError("a cached forward needs position_ids and decode_meta")
            ids, pos = input_ids, position_ids
            ctx = ForwardContext(cache=cache, position_ids=position_ids, decode_meta=decode_meta, backend=backend)
        x = self.model.embed_tokens(ids)
        # Projections: `auto` (the native few-row kernel for decode steps where it was measured faster)
        # unless the reference was asked for; resolved once here for every layer.
        lin = ops.resolve_linear(x, self.model.layers[0].mlp.up_proj.weight, "torch" if backend == "torch" else "auto")
        ctx.linear = None if lin is ops.linear_ref else lin
        cos, sin = rope_cos_sin(pos, cfg.head_dim, cfg.rope_theta, x.dtype)
        # A cached step's layers: the modules, or where `auto` finds it faster (few rows on the CPU)
        # each whole layer in one native call; resolved once here for every layer.
        run_layer = ops.decoder_layer_ref
        if cache is not None and backend == "auto":
            run_layer = ops.resolve_decoder_layer(self.model.layers, x, ctx)
        for i, layer in enumerate(self.model.layers):
            if self.gradient_checkpointing and self.training and cache is None:
                x = checkpoint(layer, x, cos, sin, ctx, i, use_reentrant=False)
            else:
                x = run_layer(layer, x, cos, sin, ctx, i)
        x = self.model.norm(x)
        if cache is None and (meta.packed or input_ids.dim() == 1):
            x = x[0]
        return x

    def forward(self, input_ids, meta: ChunkMaskMeta | None = None, cu_seqlens=None, **cache_kw):
        """Logits (fp32, every position) as the release computes them."""
        return self.lm_head(self.hidden_states(input_ids, meta, cu_seqlens, **cache_kw)).float()

    def loss(self, input_ids, labels, meta: ChunkMaskMeta | None = None, cu_seqlens=None, *,
             image_weight: float = 0.04, z_weight: float = 1e-5, class_weight=None, backend: str = "auto",
             label_rows: torch.Tensor | None = None, check_ids: bool = True):
        """Weighted CE + z-loss (spec 2.5) on the positions with a label; logits of position i predict label i+1.
        Returns (loss, z_mean). For packed input, documents are contiguous and each starts with BOS, so the shift
        across a document boundary lands on the next document's BOS, whose label is -100.

        `label_rows`: indices into the flattened shifted positions whose label is set (`labels[..., 1:]
        .reshape(-1) != -100`), found by the caller while the labels are still on the host; then only those
        rows reach the head (action samples label a few percent of their tokens). Without it every row does,
        and the loss skips the ignored ones itself; neither way synchronizes the device. `check_ids`: see
        `hidden_states`."""
        if labels.shape != input_ids.shape:
            raise ValueError(f"labels {tuple(labels.shape)} must match input_ids {tuple(input_ids.shape)}")
        h = self.hidden_states(input_ids, meta, cu_seqlens, check_ids=check_ids)
        h, y = h[..., :-1, :].reshape(-1, h.shape[-1]), labels[..., 1:].reshape(-1)
        if label_rows is not None:
            label_rows = label_rows.to(h.device, non_blocking=True)
            h, y = h.index_select(0, label_rows), y.index_select(0, label_rows)
        if class_weight is None and self.layout is not None:
            class_weight = loss_class_weights(self.layout, image_weight).to(h.device)
        if not plain_linear(self.lm_head):  # an adapted or hooked head: its module on the labelled rows
            keep = y != -100
            return ops.logits_cross_entropy(self.lm_head(h[keep]).float(), y[keep], class_weight, z_weight)
        return ops.linear_cross_entropy(h, self.lm_head.weight, y, class_weight, z_weight, ignore_index=-100,
                                        backend=backend)

    # ------------------------------------------------------------------ io
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @classmethod
    def from_pretrained(cls, path, device=None, dtype=None) -> "WorldVLA":
        from .checkpoint import load_model

        return load_model(path, device=device, dtype=dtype)

    def save_pretrained(self, path, shard_size_gb: float = 5.0) -> None:
        from .checkpoint import save_model

        save_model(self, path, shard_size_gb=shard_size_gb)

    def init_weights(self, std: float = 0.02, generator=None):
        """Normal(0, std) matrices, ones for norm weights, zeros for biases; the residual output
        projections get std / sqrt(2 * layers). Works on plain parameters and on FSDP2-sharded
        ones (DTensor, e.g. after `to_empty` of a meta-device model): each sharded parameter is
        drawn whole on the CPU, one at a time, and its local shard copied in, so a sharded model
        gets exactly the weights a single process would draw from the same generator."""
        for name, p in self.named_parameters():
            if p.dim() == 2 and "norm" not in name:
                _fill(p, lambda t: nn.init.normal_(t, std=std, generator=generator))
            elif name.endswith("bias"):
                _fill(p, nn.init.zeros_)
            else:
                _fill(p, nn.init.ones_)
        for layer in self.model.layers:  # scaled residual projections
            for lin in (layer.self_attn.o_proj, layer.mlp.down_proj):
                s = std / math.sqrt(2 * self.config.num_hidden_layers)
                _fill(lin.weight, lambda t: nn.init.normal_(t, std=s, generator=generator))
        return self
