"""Chunk-masked attention: the PyTorch reference and the public entry points.

Layouts: q, k, v are [B, L, H, Dh] (padded batch, meta tensors [B, L]) or
[T, H, Dh] (packed, meta.cu_seqlens set). K/V may have fewer heads (GQA).

Non-finite inputs. The rule, so that a NaN or an infinity that reaches attention (a corrupt cache slot, an
overflow upstream) shows up where it belongs and nowhere else:

- a NaN or an infinity in a query, or in the key or the value of a key that query may attend to, makes that
  query's whole output row NaN;
- keys a query may not attend to (hidden by the chunk rule, later in the sequence, in another document of a
  packed batch, past a cache's kv_len) never affect it, whatever they hold;
- a row with no visible key is 0 (possible only with hand-made metadata).

The references below state it directly; the native CPU kernels carry a non-finite score through their
softmax, and where their P V accumulators come out non-finite redo the rows checking each value row. Values
so large that scores or row sums overflow float32 are outside the rule. Known gaps: the torch backend is
PyTorch's SDPA as it is, which adds its mask to the scores (NaN + -inf is NaN: a NaN in a hidden key or value
can reach rows that may not see it); enforcing the rule around it (finite copies of q, k, v, the rule's rows
set NaN after) cost its decode attention 1.8-2.7x on a 2-core CPU, more than the rule is worth on the path
that only serves where no kernel runs. The Triton kernels (worldvla.kernels) and the native CUDA kernels
compute p @ V over whole tiles, so a non-finite value of a hidden key still reaches the rows of its tile
(0 * NaN), and a visible value's infinity may come through as inf rather than NaN; an infinity in q or k
that makes a score -inf gives that key weight 0 there, as if hidden.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..mask import NO_BLOCK, ChunkMaskMeta, DecodeMeta, check_cu_seqlens
from . import dispatch


def _check_qkv(q, k, v):
    if q.dim() not in (3, 4) or k.dim() != q.dim() or v.dim() != q.dim():
        raise ValueError(f"q, k, v must all be [B, L, H, Dh] or [T, H, Dh]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape != v.shape or q.shape[-1] != k.shape[-1] or q.shape[:-2] != k.shape[:-2]:
        raise ValueError(f"k and v must match and share q's tokens and head dim; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape[-2] == 0 or q.shape[-2] % k.shape[-2]:
        raise ValueError(f"kv heads ({k.shape[-2]}) must divide q heads ({q.shape[-2]}) and be at least 1")
    if q.shape[-1] == 0:
        raise ValueError(f"head dim must be at least 1, got q {tuple(q.shape)}")


def _check_meta(op: str, meta, want: type, other: type, other_op: str):
    """The metadata an entry point reads: of its own kind. Another kind (or None) failed on an attribute it lacks,
    in an AttributeError that named neither the op nor what to pass."""
    if isinstance(meta, want):
        return
    hint = f"; a {other.__name__} goes with {other_op}" if isinstance(meta, other) else ""
    raise TypeError(f"{op}: meta must be a {want.__name__} (worldvla.mask builds it), got {type(meta).__name__}{hint}")


def _expand_kv(x, n_heads):
    rep = n_heads // x.shape[-2]
    return x if rep == 1 else x.repeat_interleave(rep, dim=-2)


def _attend_ref(q, k, v, mask, scale):
    """softmax(q k^T * scale) v over the keys `mask` lets each row see, under the rule for non-finite inputs
    (module docstring). q [B, L, H, Dh], k and v [B, M, H, Dh], mask [B, L, M] (True = may attend)."""
    s = torch.einsum("blhd,bmhd->bhlm", q, k) * scale
    # A key whose k or v holds a NaN or an infinity: NaN for every row, so that a row that sees it is NaN
    # (a -inf score would otherwise give it weight 0); a query's own non-finite values make its scores so.
    bad_key = ~(k.isfinite() & v.isfinite()).all(-1)                    # [B, M, H]
    s = s.masked_fill(bad_key.transpose(1, 2).unsqueeze(2), float("nan"))
    # Hidden keys: -inf in place (masked_fill: an additive mask would keep a NaN score, NaN + -inf = NaN).
    s = s.masked_fill(~mask.unsqueeze(1), float("-inf"))
    p = torch.softmax(s, dim=-1)
    p = torch.where(mask.any(-1, keepdim=True).unsqueeze(1), p, 0.0)     # a row that sees no key gives zeros
    # P V on the values' finite part: a hidden key's weight is 0, and 0 * NaN would still reach the row.
    v = v.masked_fill(~v.isfinite(), 0.0)
    return torch.einsum("bhlm,bmhd->blhd", p.to(v.dtype), v)


def masked_attention_ref(q, k, v, meta: ChunkMaskMeta, softmax_scale=None, upcast=True):
    """Dense-mask softmax attention. With `upcast` it computes in fp32 (fp64 inputs stay fp64)."""
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    dtype = q.dtype
    if upcast and dtype in (torch.float16, torch.bfloat16):
        q, k, v = q.float(), k.float(), v.float()
    k, v = _expand_kv(k, q.shape[-2]), _expand_kv(v, q.shape[-2])
    mask = meta.dense_mask()
    q3 = q.dim() == 3
    if q3:  # packed (or one unbatched sequence): a single [T, T] problem
        q, k, v, mask = q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), mask.unsqueeze(0)
    o = _attend_ref(q, k, v, mask, scale)
    if q3:
        o = o.squeeze(0)
    return o.to(dtype)


def decode_attention_ref(q, k_cache, v_cache, meta: DecodeMeta, softmax_scale=None, upcast=True):
    """q [B, Q, H, Dh] against caches [B, S, Hkv, Dh] under `meta.dense_mask()`."""
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    dtype = q.dtype
    if upcast and dtype in (torch.float16, torch.bfloat16):
        q, k_cache, v_cache = q.float(), k_cache.float(), v_cache.float()
    k, v = _expand_kv(k_cache, q.shape[-2]), _expand_kv(v_cache, q.shape[-2])
    return _attend_ref(q, k, v, meta.dense_mask(), scale).to(dtype)


def masked_attention(q, k, v, meta: ChunkMaskMeta, softmax_scale=None, backend: str = "auto"):
    """Attention under the WorldVLA chunk rule (causal, same document, no earlier action blocks
    for actions after the last image). Differentiable on torch and triton; native is forward-only (`auto`
    passes it over for inputs that need gradients). Under autocast the inputs are cast as for torch's SDPA."""
    _check_qkv(q, k, v)
    _check_meta("masked_attention", meta, ChunkMaskMeta, DecodeMeta, "decode_attention")
    softmax_scale = dispatch.check_scale("masked_attention", softmax_scale)
    q, k, v = dispatch.autocast_floats(q.device.type, q, k, v)
    dispatch.check_floats("masked_attention", q=q, k=k, v=v)
    if meta.kv_block.shape != q.shape[:-2]:
        raise ValueError(f"meta covers tokens {tuple(meta.kv_block.shape)} but q has {tuple(q.shape[:-2])}")
    if meta.q_limit.shape != meta.kv_block.shape:
        raise ValueError(f"meta.q_limit {tuple(meta.q_limit.shape)} must be shaped as meta.kv_block "
                         f"{tuple(meta.kv_block.shape)}, a value per token: build the metadata with chunk_mask_meta")
    dispatch.check_devices("masked_attention", q=q, k=k, v=v, **{
        "meta.kv_block": meta.kv_block, "meta.q_limit": meta.q_limit, "meta.cu_seqlens": meta.cu_seqlens})
    if meta.packed:
        check_cu_seqlens(meta, q.shape[0])
    return dispatch.call("masked_attention", backend, q.device.type, q, k, v, meta, softmax_scale)


def decode_attention(q, k_cache, v_cache, meta: DecodeMeta, softmax_scale=None, backend: str = "auto"):
    """A few query rows per sequence against a KV cache (decode; parallel chunk decoding)."""
    if q.dim() != 4 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"decode_attention wants q [B, Q, H, Dh] and caches [B, S, Hkv, Dh]; got "
                         f"{tuple(q.shape)}, {tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
    if q.shape[0] != k_cache.shape[0] or q.shape[-1] != k_cache.shape[-1] or k_cache.shape[2] == 0 \
            or q.shape[2] % k_cache.shape[2]:
        raise ValueError(f"q {tuple(q.shape)} and cache {tuple(k_cache.shape)} disagree on batch, head dim or heads "
                         "(kv heads must be at least 1 and divide q heads)")
    if q.shape[-1] == 0:
        raise ValueError(f"head dim must be at least 1, got q {tuple(q.shape)}")
    _check_meta("decode_attention", meta, DecodeMeta, ChunkMaskMeta, "masked_attention")
    softmax_scale = dispatch.check_scale("decode_attention", softmax_scale)
    q, k_cache, v_cache = dispatch.autocast_floats(q.device.type, q, k_cache, v_cache)  # as masked_attention
    dispatch.check_floats("decode_attention", q=q, k_cache=k_cache, v_cache=v_cache)
    (B, Q), S = q.shape[:2], k_cache.shape[1]
    for name, t, shape in (("q_pos", meta.q_pos, (B, Q)), ("q_limit", meta.q_limit, (B, Q)),
                           ("kv_block", meta.kv_block, (B, S)), ("kv_len", meta.kv_len, (B,))):
        if tuple(t.shape) != shape:
            raise ValueError(f"meta.{name} must have shape {shape}, got {tuple(t.shape)} (q {tuple(q.shape)}, "
                             f"caches {tuple(k_cache.shape)})")
    dispatch.check_devices("decode_attention", q=q, k_cache=k_cache, v_cache=v_cache,
                           **{f"meta.{n}": getattr(meta, n) for n in ("q_pos", "q_limit", "kv_block", "kv_len")})
    return dispatch.call("decode_attention", backend, q.device.type, q, k_cache, v_cache, meta, softmax_scale)


def _documents_padded(meta: ChunkMaskMeta):
    """A packed batch as a padded batch of its documents, without a host sync.

    Returns `src` [n_docs, Lmax] (token index of each padded slot; T marks a pad slot),
    `dst` [T] (padded slot of each token, flattened) and the documents' own chunk masks
    [n_docs, Lmax, Lmax]. A pad query row sees key 0 only, so that no row is empty."""
    cu = meta.cu_seqlens.long()
    T, Lmax, dev = meta.kv_block.numel(), meta.max_seqlen, meta.kv_block.device
    t = torch.arange(Lmax, device=dev)
    valid = t < (cu[1:] - cu[:-1]).unsqueeze(1)                          # [n_docs, Lmax]
    src = torch.where(valid, cu[:-1].unsqueeze(1) + t, T)
    doc = meta.doc_ids().long()
    dst = doc * Lmax + torch.arange(T, device=dev) - cu[:-1][doc]
    kv = torch.cat([meta.kv_block, meta.kv_block.new_full((1,), NO_BLOCK)])[src]
    ql = torch.cat([meta.q_limit, meta.q_limit.new_full((1,), -1)])[src]
    # Each document is one row of a padded batch: the rule's own dense mask, less the padding keys.
    mask = ChunkMaskMeta(kv, ql, t.expand(len(src), Lmax), None, Lmax).dense_mask()
    mask &= valid.unsqueeze(1)
    mask |= ~valid.unsqueeze(2) & (t == 0)
    return src, dst, mask


def masked_attention_sdpa(q, k, v, meta: ChunkMaskMeta, softmax_scale=None):
    """The "torch" backend: SDPA with a dense boolean mask (what the release does). A packed
    batch of several documents runs as a padded batch of its documents when that at least
    halves the [T, T] work (the documents never see each other, so nothing else changes).
    Non-finite inputs: outside the rule (module docstring)."""
    k, v = _expand_kv(k, q.shape[-2]), _expand_kv(v, q.shape[-2])
    if meta.packed and meta.max_seqlen > 0 and 2 * (meta.cu_seqlens.numel() - 1) * meta.max_seqlen ** 2 <= q.shape[0] ** 2:
        _, dst, mask = _documents_padded(meta)
        n, Lmax = mask.shape[:2]
        # index_copy in, index_select out: the backward gathers q, k, v's gradients and
        # scatters only the output's (cheaper on CPU than scattering all four).
        pad = lambda x: (x.new_zeros(n * Lmax, *x.shape[1:]).index_copy(0, dst, x)
                         .view(n, Lmax, *x.shape[1:]).transpose(1, 2))
        o = F.scaled_dot_product_attention(pad(q), pad(k), pad(v), attn_mask=mask.unsqueeze(1), scale=softmax_scale)
        return o.transpose(1, 2).reshape(n * Lmax, *q.shape[1:]).index_select(0, dst)
    mask = meta.dense_mask()
    packed = q.dim() == 3
    if packed:
        q, k, v, mask = q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), mask.unsqueeze(0)
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                       attn_mask=mask.unsqueeze(1), scale=softmax_scale)
    o = o.transpose(1, 2)
    return o.squeeze(0) if packed else o


def decode_attention_sdpa(q, k_cache, v_cache, meta: DecodeMeta, softmax_scale=None):
    k, v = _expand_kv(k_cache, q.shape[-2]), _expand_kv(v_cache, q.shape[-2])
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                       attn_mask=meta.dense_mask().unsqueeze(1), scale=softmax_scale)
    return o.transpose(1, 2)


dispatch.register("masked_attention", "torch", masked_attention_sdpa)
dispatch.register("decode_attention", "torch", decode_attention_sdpa)
