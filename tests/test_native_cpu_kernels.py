"""The C++ CPU kernels (`worldvla._C` on CPU tensors) at their edges: rounding of bfloat16 results, the
non-finite checks, the argument checks of direct calls.

Numerical cases compare against float64 (or the float64 value rounded as torch rounds it); where a
float32 torch computation is the measure, the rule of the other native tests holds: the kernel's error
against float64 is at most 2x that of torch at the same precision, plus a small floor.
"""
import pytest
import torch

_C = pytest.importorskip("worldvla._C")

from worldvla.mask import NO_BLOCK, DecodeMeta  # noqa: E402
from worldvla.model import KVCache, ModelConfig, WorldVLA  # noqa: E402
from worldvla.ops import native_backend as nb  # noqa: E402


def test_a_bfloat16_steps_hidden_states_are_rounded_to_nearest_even(rng):
    """A bfloat16 model's step norms its hidden states in float32 and rounds them to nearest even, as
    torch's conversion does, not by dropping the low bits. Layers whose branches add zero (o_proj and
    down_proj zero) leave the token embedding, so the step's output is the final RMSNorm of the embedding
    rows: the float64 value's bfloat16 wherever float32 and float64 do not fall either side of a
    rounding boundary (truncation agrees on about half of the values)."""
    cfg = ModelConfig.tiny(hidden_size=60, intermediate_size=44, num_attention_heads=3, num_key_value_heads=1,
                           num_hidden_layers=2)
    model = WorldVLA(cfg).init_weights(0.3, generator=rng).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.norm.weight.add_(0.3 * torch.randn(cfg.hidden_size, generator=rng))
    model = model.to(torch.bfloat16)
    B, Q, S = 2, 3, 13
    cache = KVCache(cfg, B, S, dtype=torch.bfloat16)
    ids = torch.randint(0, cfg.vocab_size, (B, Q), generator=rng)
    pos = torch.arange(Q).view(1, Q).expand(B, Q).contiguous()
    meta = DecodeMeta(pos.int(), torch.full((B, Q), -1, dtype=torch.int32),
                      torch.full((B, S), NO_BLOCK, dtype=torch.int32), torch.full((B,), Q, dtype=torch.int32))
    with torch.no_grad():
        out = nb.build_decode_step(model, cache, ids, pos, meta)()
        e = model.model.embed_tokens.weight[ids].double()
        ref = model.model.norm.weight.double() * e * torch.rsqrt(e.pow(2).mean(-1, keepdim=True) + model.model.norm.eps)
    assert out.dtype == torch.bfloat16 and out.shape == (B, Q, cfg.hidden_size)
    agree = (out == ref.to(torch.bfloat16)).double().mean().item()
    assert agree > 0.98, f"{agree:.1%} of the hidden states are the float64 values rounded to bfloat16"


def _assert_close_rule(out, ref64, same, name, floor=1e-7):
    err = (out.double() - ref64).abs().max().item()
    base = (same.double() - ref64).abs().max().item()
    assert not torch.isnan(out).any(), f"{name}: NaN in output"
    assert err <= 2 * base + floor, f"{name}: error {err:.3g} > 2 x torch's {base:.3g} (+{floor:g})"


def _hidden_block_decode_case(rng, B, Q, H, Hkv, D, S):
    """Q rows per sequence at slots 27.. of an S-slot cache (kv_len 27 + Q) that hide action block 0
    (slots 20-23) under the chunk rule; every other slot before a row is visible to it."""
    q = torch.randn(B, Q, H, D, generator=rng)
    k, v = torch.randn(B, S, Hkv, D, generator=rng), torch.randn(B, S, Hkv, D, generator=rng)
    kv_block = torch.full((B, S), NO_BLOCK, dtype=torch.int32)
    kv_block[:, 20:24] = 0
    kv_block[:, 24:27] = 1
    q_pos = (27 + torch.arange(Q, dtype=torch.int32)).view(1, Q).expand(B, Q).contiguous()
    q_limit = torch.ones(B, Q, dtype=torch.int32)
    meta = DecodeMeta(q_pos, q_limit, kv_block, torch.full((B,), 27 + Q, dtype=torch.int32))
    assert not meta.dense_mask()[:, :, 20:24].any() and meta.dense_mask()[:, :, 24:27 + Q].any()
    return q, k, v, meta


@pytest.mark.usefixtures("cpu_width")
@pytest.mark.parametrize("val", [float("inf"), float("nan")])
@pytest.mark.parametrize("Q", [3, 37])  # the decode kernel; past 32 rows the prefill's tiled core
def test_a_nonfinite_value_in_a_hidden_slot_of_any_kv_head_stays_out(rng, val, Q):
    """A hidden slot's value never reaches a row, whichever kv head holds the non-finite value: each kv head
    beside the first of a work item (the decode kernel takes several per item) and each row of a query
    block is checked, not only the first head's rows. The output is finite and obeys the rule against
    float64 on the clean cache. On the one thread the tests run (conftest), one work item holds all four
    kv heads; with many threads each head may get its own item and the first-head case covers it."""
    assert torch.get_num_threads() == 1
    from worldvla.ops import decode_attention_ref

    B, H, Hkv, D, S = 2, 8, 4, 20, 80
    q, k, v, meta = _hidden_block_decode_case(rng, B, Q, H, Hkv, D, S)
    bad = v.clone()
    bad[:, 21, 1:, 5] = val  # hidden from every row: block 0, every kv head but the first
    bad[1, 22, 3, D - 1] = val  # and one in the head dim's tail
    out = nb.decode_attention(q, k, bad, meta)
    ref = decode_attention_ref(q.double(), k.double(), v.double(), meta)
    same = decode_attention_ref(q, k, v, meta, upcast=False)
    _assert_close_rule(out, ref, same, f"{Q} rows, {val} in hidden slots")


def _st(t):
    return (t.stride(0), t.stride(1), t.stride(2))


def test_a_direct_decode_call_refuses_a_bfloat16_cache_past_32_rows_before_reading_it(rng):
    """More than 32 query rows per sequence take the prefill's tiled core, which reads a float32 cache only:
    a direct `_C.decode_attention` call that names a bfloat16 cache (dtype code 2) there is refused by name
    and writes nothing (the Python wrapper widens such a cache first)."""
    B, Q, H, Hkv, D, S = 1, 33, 2, 1, 16, 80
    q, k, v, meta = _hidden_block_decode_case(rng, B, Q, H, Hkv, D, S)
    o = torch.full_like(q, float("nan"))
    args = (q.data_ptr(), k.data_ptr(), v.data_ptr(), o.data_ptr(), meta.q_pos.data_ptr(), meta.q_limit.data_ptr(),
            meta.kv_block.data_ptr(), meta.kv_len.data_ptr(), B, Q, S, H, Hkv, D, _st(q), _st(k), _st(v), _st(o),
            meta.kv_block.stride(0), D ** -0.5, 0, 0, 1, S)
    with pytest.raises(ValueError, match="bfloat16 cache takes at most 32 query rows"):
        _C.decode_attention(-1, 0, 2, *args)
    assert o.isnan().all()
    _C.decode_attention(-1, 0, 0, *args)  # the same call on the float32 cache it is
    assert not o.isnan().any()


@pytest.mark.parametrize("code", [1, 2, 3])  # float16, bfloat16, float64
def test_direct_cpu_calls_of_another_dtype_than_float32_are_refused(rng, code):
    """The CPU paths of `_C.masked_attention_fwd` and `_C.vq_quantize` read float32 only: a direct call that
    names another dtype is refused by name before anything is read or written."""
    T, H, D = 9, 2, 16
    q, k, v = (torch.randn(T, H, D, generator=rng) for _ in range(3))
    o = torch.full_like(q, float("nan"))
    kv_block = torch.full((T,), NO_BLOCK, dtype=torch.int32)
    q_limit = torch.full((T,), -1, dtype=torch.int32)
    st = (0, H * D, D)
    with pytest.raises(ValueError, match="masked_attention: the CPU path takes float32 tensors"):
        _C.masked_attention_fwd(-1, 0, code, q.data_ptr(), k.data_ptr(), v.data_ptr(), o.data_ptr(),
                                kv_block.data_ptr(), q_limit.data_ptr(), 0, 1, T, T, H, H, D, st, st, st, st, 0, 0.25)
    assert o.isnan().all()
    z, cb = torch.randn(7, 5, generator=rng), torch.randn(11, 5, generator=rng)
    out = torch.full((7,), -1, dtype=torch.int64)
    with pytest.raises(ValueError, match="vq_quantize: the CPU path takes float32 tensors"):
        _C.vq_quantize(-1, 0, code, z.data_ptr(), 5, cb.data_ptr(), 5, 7, 11, 5, out.data_ptr(), 0)
    assert (out == -1).all()


def test_direct_vocabulary_range_calls_refuse_an_empty_range(rng):
    """`_C.range_argmax`, `_C.range_logits` and `_C.range_sample` called with lo == hi (an empty range) are
    refused by name and write nothing; a range of one code gives that code."""
    N, Hd, V, lo = 3, 8, 20, 5
    hidden, weight = torch.randn(N, Hd, generator=rng), torch.randn(V, Hd, generator=rng)
    ids = torch.full((N,), -1, dtype=torch.int64)
    logits = torch.full((N, 1), float("nan"))
    z = torch.zeros(N, 1)
    common = (hidden.data_ptr(), Hd, weight.data_ptr(), Hd)
    with pytest.raises(ValueError, match="constrained_argmax: empty vocabulary range"):
        _C.range_argmax(-1, 0, 0, *common, N, Hd, lo, lo, 0, ids.data_ptr())
    with pytest.raises(ValueError, match="range_logits: empty vocabulary range"):
        _C.range_logits(-1, 0, 0, *common, N, Hd, lo, lo, logits.data_ptr())
    with pytest.raises(ValueError, match="range_sample: empty vocabulary range"):
        _C.range_sample(*common, 0, N, Hd, lo, lo, z.data_ptr(), 0, ids.data_ptr())
    assert (ids == -1).all() and logits.isnan().all()
    _C.range_argmax(-1, 0, 0, *common, N, Hd, lo, lo + 1, 0, ids.data_ptr())
    assert (ids == lo).all()
