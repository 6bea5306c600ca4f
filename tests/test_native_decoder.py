"""The native decoder layer of cached decode steps (CPU): one C++ call a layer, and a whole step in one
call (the engine's DecodeStepPlan), against the layers' modules.

Tolerance rule: the native layer's largest error against the same layer run in float64 may be at most
2x that of the modules in float32 (plus a few ulps of the largest output); the keys and values it
writes into the cache obey the same rule, and no other slot changes.
"""
import copy
import inspect

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

_C = pytest.importorskip("worldvla._C")

from worldvla import ops  # noqa: E402
from worldvla.inference import InferenceEngine, generate_action_chunk  # noqa: E402
from worldvla.mask import NO_BLOCK, DecodeMeta  # noqa: E402
from worldvla.model import MLP, ForwardContext, KVCache, ModelConfig, RMSNorm, WorldVLA, rope_cos_sin  # noqa: E402
from worldvla.ops import decoder as decoder_op  # noqa: E402
from worldvla.ops import dispatch  # noqa: E402
from worldvla.ops import native_backend as nb  # noqa: E402
from worldvla.tokens import VocabLayout  # noqa: E402


@pytest.fixture(autouse=True)
def poisoned_steps(poison_outputs, monkeypatch):
    """Every buffer the native paths allocate starts poisoned (`poison_outputs`), and a whole-step plan's
    static output, which every run of the step overwrites, is poisoned again before each run: a step that
    leaves a row unwritten shows NaN instead of the previous step's (or a fresh page's) values."""
    build = nb.build_decode_step

    def build_poisoned(*args, **kwargs):
        run = build(*args, **kwargs)
        out = inspect.signature(run).parameters["out"].default  # the step's static output

        def poisoned_run():
            poison_outputs(out)
            return run()

        poisoned_run.native = run.native
        return poisoned_run

    monkeypatch.setattr(nb, "build_decode_step", build_poisoned)


def _model(rng, swin_norm=False, **kw):
    base = dict(hidden_size=72, intermediate_size=100, num_attention_heads=3, num_key_value_heads=3,
                num_hidden_layers=2)
    base.update(kw)
    model = WorldVLA(ModelConfig.tiny(swin_norm=swin_norm, **base)).init_weights(0.3, generator=rng).eval()
    with torch.no_grad():  # norms away from their identity init, so that their weights and biases matter
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn(p.shape, generator=rng))
    return model


def _step(rng, cfg, B, Q, S, chunk=False):
    """Hidden states of Q new rows per sequence at random positions, a random cache and its meta."""
    lens = torch.randint(Q, S - Q, (B,), generator=rng)
    pos = lens.view(B, 1) + torch.arange(Q).view(1, Q)  # the new rows' slots
    kv_block = torch.full((B, S), NO_BLOCK, dtype=torch.int32)
    q_limit = torch.full((B, Q), -1, dtype=torch.int32)
    if chunk:  # the chunk rule: query i sits in block i and may not see the earlier blocks' slots
        for b in range(B):
            blocks = torch.arange(Q, dtype=torch.int32)
            kv_block[b, pos[b]] = blocks
            q_limit[b] = blocks
    meta = DecodeMeta(pos.int(), q_limit, kv_block, (lens + Q).int())
    x = torch.randn(B, Q, cfg.hidden_size, generator=rng)
    cache = KVCache(cfg, B, S)
    cache.k.normal_(generator=rng)
    cache.v.normal_(generator=rng)
    return x, pos, meta, cache


def _run(layer, x, pos, meta, cache, index, native, dtype=torch.float32):
    cfg = layer.self_attn.cfg
    if dtype != torch.float32:
        layer, x = copy.deepcopy(layer).to(dtype), x.to(dtype)
        cache = copy.deepcopy(cache)
        cache.k, cache.v = cache.k.to(dtype), cache.v.to(dtype)
    cos, sin = rope_cos_sin(pos, cfg.head_dim, cfg.rope_theta, x.dtype)
    ctx = ForwardContext(cache=cache, position_ids=pos, decode_meta=meta, backend="torch")
    with torch.no_grad():
        y = nb.decoder_layer(layer, x, cos, sin, ctx, index) if native else layer(x, cos, sin, ctx, index)
    return y, cache


def _assert_rule(out, same, ref, name):
    err, base = (out.double() - ref).abs().max().item(), (same.double() - ref).abs().max().item()
    floor = 1e-6 * ref.abs().max().item()
    assert err <= 2 * base + floor, f"{name}: error {err:.3g} > 2 x the modules' {base:.3g} (+{floor:.2g})"


@pytest.mark.usefixtures("cpu_width")
@pytest.mark.parametrize("swin_norm", [False, True], ids=["pre-norm", "post-norm"])
@pytest.mark.parametrize("B,Q,heads,kv_heads,head_dim,chunk", [
    (1, 1, 3, 3, 24, False), (1, 5, 3, 3, 24, True), (3, 2, 4, 2, 16, True), (2, 7, 2, 1, 36, False),
    (1, 1, 4, 4, 64, False),
    # more than NATIVE_MAX_ROWS rows (a prefill through the cache): torch's GEMM and the C++ stages
    (1, 70, 3, 3, 24, True), (2, 37, 4, 2, 16, False), (3, 50, 2, 1, 36, True)])
def test_layer_matches_f64(rng, swin_norm, B, Q, heads, kv_heads, head_dim, chunk):
    model = _model(rng, swin_norm, hidden_size=heads * head_dim, num_attention_heads=heads,
                   num_key_value_heads=kv_heads)
    x, pos, meta, cache = _step(rng, model.config, B, Q, S=max(41, 2 * Q + 11), chunk=chunk)
    for index, layer in enumerate(model.model.layers):
        ref, ref_cache = _run(layer, x, pos, meta, cache, index, native=False, dtype=torch.float64)
        same, same_cache = _run(layer, x, pos, meta, copy.deepcopy(cache), index, native=False)
        out, out_cache = _run(layer, x, pos, meta, copy.deepcopy(cache), index, native=True)
        assert out.shape == x.shape and out.dtype == torch.float32
        _assert_rule(out, same, ref, f"layer {index} output")
        for t in ("k", "v"):
            got, want, ref_t = getattr(out_cache, t), getattr(same_cache, t), getattr(ref_cache, t)
            written = torch.zeros(got.shape[:3], dtype=torch.bool)
            written[index, torch.arange(B).view(B, 1).expand(B, Q), pos] = True
            assert torch.equal(got[~written], getattr(cache, t)[~written]), f"{t}: a slot outside the step changed"
            _assert_rule(got[written], want[written], ref_t[written], f"layer {index} cache {t}")


@pytest.mark.usefixtures("cpu_width")
def test_rows_do_not_depend_on_the_row_count(rng):
    """A row's output is the same bits alone as among Q rows of its step (parallel chunk decoding
    agrees exactly with sequential decoding because of it)."""
    model = _model(rng)
    layer = model.model.layers[1]
    x, pos, meta, cache = _step(rng, model.config, 1, 6, S=40, chunk=True)
    together, _ = _run(layer, x, pos, meta, copy.deepcopy(cache), 1, native=True)
    for i in range(6):
        one = DecodeMeta(meta.q_pos[:, i:i + 1].contiguous(), meta.q_limit[:, i:i + 1].contiguous(), meta.kv_block,
                         meta.kv_len)
        alone, _ = _run(layer, x[:, i:i + 1].contiguous(), pos[:, i:i + 1].contiguous(), one, copy.deepcopy(cache),
                        1, native=True)
        assert torch.equal(alone, together[:, i:i + 1]), i


def test_model_steps_take_the_native_layer_under_auto(rng, monkeypatch):
    """A cached forward of a few rows runs every layer through `_C.decoder_layer` when `auto` orders it
    first, and a prefill through the cache (more than NATIVE_MAX_ROWS rows) through torch's GEMM and
    `_C.decoder_attention_block`, with the modules' hidden states and cache within float32 rounding;
    backend="torch" and a model in training mode keep the modules."""
    from worldvla.inference import InferenceEngine

    model = _model(rng, num_hidden_layers=3)
    layout = model.layout
    prompt = torch.randint(layout.text_base, layout.vocab_size, (80,), generator=rng)
    step_ids = torch.randint(layout.text_base, layout.vocab_size, (1, 3), generator=rng)
    calls, blocks = [], []
    monkeypatch.setattr(ops.decoder, "NATIVE_STEP", False)  # one call a layer (a whole step: below)
    monkeypatch.setattr(nb._C, "decoder_layer", lambda *a, f=nb._C.decoder_layer: calls.append(1) or f(*a))
    monkeypatch.setattr(nb._C, "decoder_attention_block",
                        lambda *a, f=nb._C.decoder_attention_block: blocks.append(1) or f(*a))
    out, caches = {}, {}
    for order in (("torch",), ("native", "torch")):
        monkeypatch.setitem(dispatch.AUTO_ORDER, ("decoder_layer", "cpu"), order)
        engine = InferenceEngine(model, 1, 96, layout=layout)
        engine.prefill([prompt])
        assert not calls and len(blocks) == (3 if order[0] == "native" else 0)  # 80 rows: the GEMM route
        caches[order[0]] = (engine.cache.k[:, :, :80].clone(), engine.cache.v[:, :, :80].clone())
        buf = engine.buffers(3)
        buf.ids.copy_(step_ids)
        buf.set_positions(torch.tensor([[80, 81, 82]]))
        engine.set_kv_len([83])
        out[order[0]] = engine.run(buf).clone()
        assert len(calls) == (3 if order[0] == "native" else 0)
        calls.clear()
    torch.testing.assert_close(out["native"], out["torch"], rtol=1e-5, atol=1e-5)
    for a, b in zip(caches["native"], caches["torch"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    x = torch.randn(1, 3, model.config.hidden_size)
    ctx = ForwardContext(cache=engine.cache, position_ids=buf.pos, decode_meta=buf.meta)
    layer = model.model.layers[0]
    with torch.no_grad():
        assert ops.resolve_decoder_layer(layer, x, ctx) is nb._dispatched_decoder_layer
        model.train()
        assert ops.resolve_decoder_layer(layer, x, ctx) is nb._dispatched_decoder_layer  # dropout 0: nothing to drop
        layer.dropout.p = 0.1
        assert ops.resolve_decoder_layer(layer, x, ctx) is ops.decoder_layer_ref  # dropout active
        layer.dropout.p = 0.0  # a forward resolves once for all its layers: a later layer's dropout counts too
        model.model.layers[-1].dropout.p = 0.1
        assert ops.resolve_decoder_layer(model.model.layers, x, ctx) is ops.decoder_layer_ref
        model.eval()
        assert ops.resolve_decoder_layer(layer, x, ctx) is nb._dispatched_decoder_layer
    assert ops.resolve_decoder_layer(layer, x, ctx) is ops.decoder_layer_ref  # the weights want gradients
    with torch.no_grad():
        model.hidden_states(step_ids, cache=engine.cache, position_ids=buf.pos, decode_meta=buf.meta, backend="torch")
    assert not calls


def test_errors_name_the_problem(rng):
    model = _model(rng)
    layer = model.model.layers[0]
    x, pos, meta, cache = _step(rng, model.config, 1, 2, S=30)
    cos, sin = rope_cos_sin(pos, model.config.head_dim, model.config.rope_theta, x.dtype)
    ctx = ForwardContext(cache=cache, position_ids=pos, decode_meta=meta)
    w = layer.mlp.up_proj.weight
    with torch.no_grad():
        with pytest.raises(IndexError, match="cache slot 30 of row 1 lies outside a cache of 30 slots"):
            bad = ForwardContext(cache=cache, position_ids=torch.tensor([[29, 30]]), decode_meta=meta)
            nb.decoder_layer(layer, x, cos, sin, bad, 0)
        with pytest.raises(TypeError, match="float32"):
            nb.decoder_layer(layer, x.double(), cos, sin, ctx, 0)
        with pytest.raises(ValueError, match="runs on the CPU; sin is on meta"):
            nb.decoder_layer(layer, x, cos, sin.to("meta"), ctx, 0)
        with pytest.raises(ValueError, match="rotary cos and sin must each hold"):
            nb.decoder_layer(layer, x, cos, sin[..., :-1].contiguous(), ctx, 0)
        with pytest.raises(ValueError, match="decode_meta.q_limit is on meta"):
            on_meta = DecodeMeta(meta.q_pos, meta.q_limit.to("meta"), meta.kv_block, meta.kv_len)
            nb.decoder_layer(layer, x, cos, sin, ForwardContext(cache=cache, position_ids=pos, decode_meta=on_meta), 0)
        with pytest.raises(ValueError, match="cached forwards only"):
            nb.decoder_layer(layer, x, cos, sin, ForwardContext(), 0)
        with pytest.raises(ValueError, match="position_ids must be contiguous int64"):
            int_pos = ForwardContext(cache=cache, position_ids=pos.int(), decode_meta=meta)
            nb.decoder_layer(layer, x, cos, sin, int_pos, 0)
        with pytest.raises(ValueError, match="decode_meta.kv_block must have shape"):
            short = DecodeMeta(meta.q_pos, meta.q_limit, meta.kv_block[:, :10], meta.kv_len)
            nb.decoder_layer(layer, x, cos, sin, ForwardContext(cache=cache, position_ids=pos, decode_meta=short), 0)
        layer.mlp.up_proj.weight = torch.nn.Parameter(w.t().contiguous().t())  # column-major
        with pytest.raises(ValueError, match="up_proj must be contiguous"):
            nb.decoder_layer(layer, x, cos, sin, ctx, 0)
        layer.mlp.up_proj.weight = torch.nn.Parameter(w[:, :-1].contiguous())
        with pytest.raises(ValueError, match="layer 0: up_proj has shape"):
            nb.decoder_layer(layer, x, cos, sin, ctx, 0)
        assert not nb._decoder_layer_supports(layer, x, ctx)
        with pytest.raises(ValueError, match="'native' backend of 'decoder_layer' does not support.*up_proj has shape"):
            ops.resolve_decoder_layer(layer, x, ctx, backend="native")
    layer.mlp.up_proj.weight = w
    with pytest.raises(ValueError, match="forward-only and these inputs need gradients"):
        nb.decoder_layer(layer, x, cos, sin, ctx, 0)


def test_layer_index_outside_the_cache_is_refused(rng):
    """The native layer finds its keys and values at the layer's offset in the cache: an index outside
    the cache's layers (negative, which Python's indexing would count from the end, or past the last) is
    refused before anything is read or written, for a few rows and for a prefill's (torch's GEMM between
    the C++ stages); so is a whole step of a model with more layers than its cache."""
    model = _model(rng)
    layer = model.model.layers[1]
    for Q in (3, 40):  # one C++ call; more than NATIVE_MAX_ROWS rows
        x, pos, meta, cache = _step(rng, model.config, 2, Q, S=100)
        cos, sin = rope_cos_sin(pos, model.config.head_dim, model.config.rope_theta, x.dtype)
        ctx = ForwardContext(cache=cache, position_ids=pos, decode_meta=meta)
        k, v = cache.k.clone(), cache.v.clone()
        for index in (-1, -2, 2):
            with torch.no_grad(), pytest.raises(ValueError, match=rf"layer index {index} must be an int in \[0, 2\)"):
                ops.decoder_layer(layer, x, cos, sin, ctx, index, backend="native")
        assert torch.equal(cache.k, k) and torch.equal(cache.v, v)
    x, pos, meta, cache = _step(rng, model.config, 2, 3, S=40)
    cache.k, cache.v = cache.k[:1], cache.v[:1]  # one layer's cache for the model's two
    ids = torch.zeros(2, 3, dtype=torch.long)
    with torch.no_grad(), pytest.raises(ValueError, match="for the model's 2 layers"):
        nb.build_decode_step(model, cache, ids, pos, meta)
    with torch.no_grad():
        plan = decoder_op.DecodeStepPlan(model, cache, ids, pos, meta)
    assert plan.step is None and "for the model's 2 layers" in plan.reason


def test_auto_order_of_the_layer():
    for cap, vendor in [("AVX2", "amd"), ("AVX2", "intel"), ("AVX2", None), ("AVX512", "amd"), ("AVX512", "intel"),
                        ("AVX512", None)]:
        assert dispatch._auto_order(cap, vendor)[("decoder_layer", "cpu")][0] == "native", (cap, vendor)
    assert ("decoder_layer", "cpu") not in dispatch._auto_order("DEFAULT", None)


# ---------------------------------------------------------------------------------- whole steps
# The CPU engine's decode step as one native call (`ops.decoder.DecodeStepPlan`: embedding, every layer
# and the final norm in `_C.DecodeStep`) against the modules, under the same tolerance rule for the
# hidden states and the keys and values written into the cache.
LAYOUT = VocabLayout.compact(n_image_codes=64)  # ModelConfig.tiny's
PROMPT_LEN = 24


@pytest.fixture
def native_first(monkeypatch):
    """`auto` takes the native layer on the CPU (its default on AVX2 and AVX-512 machines), so the engine
    builds step plans here whatever this machine is."""
    monkeypatch.setitem(dispatch.AUTO_ORDER, ("decoder_layer", "cpu"), ("native", "torch"))
    monkeypatch.setattr(decoder_op, "NATIVE_STEP", True)


def _prefilled(model, B, S, rng):
    """An engine of B rows with random prompts of PROMPT_LEN tokens prefilled."""
    engine = InferenceEngine(model, B, S)
    engine.prefill([torch.randint(LAYOUT.text_base, LAYOUT.vocab_size, (PROMPT_LEN,), generator=rng)
                    for _ in range(B)])
    return engine


def _copy_state(src: InferenceEngine, dst: InferenceEngine):
    with torch.no_grad():
        dst.cache.k.copy_(src.cache.k)
        dst.cache.v.copy_(src.cache.v)
        dst.kv_block.copy_(src.kv_block)
        dst.kv_len.copy_(src.kv_len)


def _set_step(engine, ids, pos, q_limit):
    buf = engine.buffers(ids.shape[1])
    buf.ids.copy_(ids)
    buf.set_positions(pos)
    buf.q_limit.copy_(q_limit)
    engine.set_kv_len((pos[:, -1] + 1).int())
    return buf


def _random_step(rng, B, Q, chunk):
    """Q new rows per sequence right after the prompt; under the chunk rule row i sits in action block i
    and hides the earlier ones (the parallel chunk decoder's step)."""
    ids = torch.randint(LAYOUT.text_base, LAYOUT.vocab_size, (B, Q), generator=rng)
    pos = PROMPT_LEN + torch.arange(Q).view(1, Q).expand(B, Q).contiguous()
    q_limit = (torch.arange(Q, dtype=torch.int32) if chunk else torch.full((Q,), -1, dtype=torch.int32))
    return ids, pos, q_limit.view(1, Q).expand(B, Q).contiguous()


@pytest.mark.usefixtures("cpu_width", "native_first")
@pytest.mark.parametrize("swin_norm", [False, True], ids=["pre-norm", "post-norm"])
@pytest.mark.parametrize("B,Q,heads,kv_heads,head_dim,chunk", [
    (1, 1, 3, 3, 24, False), (1, 5, 3, 3, 24, True), (3, 2, 4, 2, 16, True), (2, 7, 2, 1, 36, False),
    (14, 5, 3, 3, 24, True),  # 70 rows: more than NATIVE_MAX_ROWS, still the few-row layer
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_step_matches_f64(rng, swin_norm, B, Q, heads, kv_heads, head_dim, chunk, dtype):
    """The step's hidden states and the keys and values it writes obey the rule against the same model
    in float64, with its modules as the measure; no other cache slot changes. A bfloat16 model's step
    reads its bfloat16 weights and cache as they are and sums in float32: more precise than its modules
    (not their bits)."""
    model = _model(rng, swin_norm, hidden_size=heads * head_dim, num_attention_heads=heads,
                   num_key_value_heads=kv_heads).to(dtype)
    S = PROMPT_LEN + Q + 3
    native = _prefilled(model, B, S, rng)
    same = InferenceEngine(model, B, S, backend="torch")  # the modules, in the model's dtype
    ref = InferenceEngine(WorldVLA(model.config).to(torch.float64).eval(), B, S, backend="torch")
    ref.model.load_state_dict(model.state_dict())
    before = (native.cache.k.clone(), native.cache.v.clone())
    for e in (same, ref):
        _copy_state(native, e)
    with torch.no_grad():  # the slots the step must write, poisoned in the native engine's cache only
        native.cache.k[:, :, PROMPT_LEN:PROMPT_LEN + Q] = float("nan")
        native.cache.v[:, :, PROMPT_LEN:PROMPT_LEN + Q] = float("nan")
    step = _random_step(rng, B, Q, chunk)
    outs = {}
    for name, e in (("native", native), ("same", same), ("ref", ref)):
        buf = _set_step(e, *step)
        outs[name] = e.run(buf).clone()
        assert (buf.plan is not None and buf.plan.step is not None) == (name == "native"), name
    assert outs["native"].shape == (B, Q, model.config.hidden_size) and outs["native"].dtype == dtype
    assert native.buffers(Q).plan.copies == (dtype == torch.bfloat16)  # float32 copies of the norms' weights
    _assert_rule(outs["native"], outs["same"], outs["ref"], "hidden states")
    if dtype == torch.bfloat16:
        assert native.cache.k.dtype == dtype and not torch.equal(outs["native"], outs["same"])
    written = torch.zeros(native.cache.k.shape[:3], dtype=torch.bool)
    written[:, :, PROMPT_LEN:PROMPT_LEN + Q] = True
    for i, t in enumerate(("k", "v")):
        got = getattr(native.cache, t)
        assert torch.equal(got[~written], before[i][~written]), f"{t}: a slot outside the step changed"
        _assert_rule(got[written], getattr(same.cache, t)[written], getattr(ref.cache, t)[written], f"cache {t}")
    if dtype == torch.bfloat16:
        # Rounded to nearest even, as torch rounds: the first layer's new keys and values (which no rounded
        # value has touched yet; later layers see the rows' own rounded keys) are the float64 values'
        # bfloat16s but where float32 and float64 fall either side of a rounding boundary.
        for t in ("k", "v"):
            got, want = getattr(native.cache, t)[0][written[0]], getattr(ref.cache, t)[0][written[0]]
            agree = (got == want.to(dtype)).double().mean().item()
            assert agree > 0.98, f"cache {t}: {agree:.1%} of values are the float64 values rounded to bfloat16"


@pytest.mark.usefixtures("cpu_width", "native_first")
def test_rows_do_not_depend_on_the_batch(rng):
    """Each sequence's rows are the same bits in a step of 14 sequences (70 rows) as alone: the parallel
    chunk decoder's rows get the sequential decoder's arithmetic however many robots are batched."""
    model = _model(rng)
    B, Q = 14, 5
    S = PROMPT_LEN + Q + 1
    batch = _prefilled(model, B, S, rng)
    ids, pos, q_limit = _random_step(rng, B, Q, chunk=True)
    together = batch.run(_set_step(batch, ids, pos, q_limit)).clone()
    alone = InferenceEngine(model, 1, S)
    for b in range(B):
        with torch.no_grad():
            for t in ("k", "v"):
                getattr(alone.cache, t).copy_(getattr(batch.cache, t)[:, b:b + 1])
            alone.kv_block.copy_(batch.kv_block[b:b + 1])
        out = alone.run(_set_step(alone, ids[b:b + 1], pos[b:b + 1], q_limit[b:b + 1]))
        assert torch.equal(out[0], together[b]), b


@pytest.mark.usefixtures("native_first")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_parallel_equals_sequential_for_many_robots(rng, native_step_runs, dtype):
    """14 prompts of 5-action chunks: every parallel step has 70 rows (above NATIVE_MAX_ROWS) and runs as
    one native call; the tokens equal sequential decoding's, one prompt at a time, for float32 and
    bfloat16 models."""
    model = _model(rng, num_hidden_layers=2).to(dtype)
    prompts = [torch.cat([torch.tensor([LAYOUT.bos]),
                          torch.randint(LAYOUT.text_base, LAYOUT.text_base + 64, (8 + i % 3,), generator=rng),
                          torch.tensor([LAYOUT.sep])]) for i in range(14)]
    K, D = 5, 3
    par = generate_action_chunk(model, prompts, LAYOUT, K, D, mode="parallel")
    assert len(native_step_runs) == D
    for b, prompt in enumerate(prompts):
        assert torch.equal(par[b], generate_action_chunk(model, prompt, LAYOUT, K, D, mode="sequential")), b
    assert len({tuple(p.flatten().tolist()) for p in par}) > 1  # not a constant output


@pytest.mark.usefixtures("native_first")
def test_plan_follows_the_model_and_the_dispatch(rng, monkeypatch):
    """The plan is rebuilt when the model changes (a weight replaced, a module swapped, a forward hook,
    training mode: found by `check_model`, which every prefill runs), stands aside step by step while
    `auto` would not run the native layer (dispatch order, NATIVE_STEP) without being rebuilt, and is
    not made for bf16 models or more rows per sequence than a decode step has."""
    model = _model(rng)
    S = PROMPT_LEN + 40
    engine = _prefilled(model, 1, S, rng)
    modules = InferenceEngine(model, 1, S, backend="torch")
    _copy_state(engine, modules)
    step = _random_step(rng, 1, 3, chunk=True)

    def both():
        a = engine.run(_set_step(engine, *step)).clone()
        b = modules.run(_set_step(modules, *step)).clone()
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        return a

    first = both()
    plan = engine.buffers(3).plan
    assert plan.step is not None and not engine.check_model()
    w = model.model.layers[1].mlp.down_proj.weight
    model.model.layers[1].mlp.down_proj.weight = torch.nn.Parameter(torch.randn(w.shape, generator=rng) * 0.3)
    assert engine.check_model() and engine.buffers(3).plan is None
    assert not torch.equal(both(), first)  # the new weight is read
    plan = engine.buffers(3).plan
    assert plan.step is not None
    with torch.no_grad():
        w.copy_(torch.randn(w.shape, generator=rng))
        model.model.layers[1].mlp.down_proj.weight.data = w  # the same Parameter, another address
    with torch.no_grad():
        engine.prefill([torch.randint(LAYOUT.text_base, LAYOUT.vocab_size, (PROMPT_LEN,), generator=rng)])
    assert engine.buffers(3).plan is None  # the prefill found it
    _copy_state(engine, modules)
    both()
    plan = engine.buffers(3).plan

    changes = ((lambda m: m.setitem(dispatch.AUTO_ORDER, ("decoder_layer", "cpu"), ("torch",))),
               (lambda m: m.setattr(decoder_op, "NATIVE_STEP", False)))
    for change in changes:
        with monkeypatch.context() as m:
            change(m)
            with torch.no_grad():
                assert engine._plan(engine.buffers(3)) is None
            both()  # the modules' step
        both()  # and the native one again once the change is undone, on the same plan
        assert engine.buffers(3).plan is plan and engine._plan(engine.buffers(3)) is plan
    with torch.no_grad():  # an in-place update: a float32 plan reads the weights where they are
        model.model.layers[0].self_attn.o_proj.weight.mul_(1.5)
    assert engine.check_model() and engine.buffers(3).plan is plan
    both()

    fresh = _prefilled(model, 1, S, rng)
    with FlopCounterMode(display=False) as flops:  # a dispatch mode sees the modules' ops
        fresh.run(_set_step(fresh, *step))
    assert flops.get_total_flops() > 0 and fresh.buffers(3).plan is None
    fresh.run(_set_step(fresh, *step))  # and the plan is made once the mode is gone
    assert fresh.buffers(3).plan.step is not None

    final_norm = model.model.norm
    model.model.norm = torch.nn.LayerNorm(model.config.hidden_size)  # not what the native step computes
    assert engine.check_model()
    both()  # the modules' step, with the LayerNorm
    assert engine.buffers(3).plan.step is None and "not the RMSNorm" in engine.buffers(3).plan.reason
    model.model.norm = final_norm
    engine.check_model()
    both()
    assert engine.buffers(3).plan.step is not None
    handle = model.model.layers[1].mlp.register_forward_hook(lambda m, args, out: out * 1.5)
    assert engine.check_model()
    hooked = both()  # the modules' step, with the hook
    assert engine.buffers(3).plan.step is None and "forward hook" in engine.buffers(3).plan.reason
    handle.remove()
    assert engine.check_model()
    assert not torch.equal(both(), hooked) and engine.buffers(3).plan.step is not None

    with torch.no_grad():  # as engine.run calls it
        model.train()
        model.model.layers[0].dropout.p = 0.1
        engine.check_model()
        buf = _set_step(engine, *step)
        assert engine._plan(buf) is None and "dropout" in buf.plan.reason
        model.model.layers[0].dropout.p = 0.0
        model.eval()
        engine.check_model()

        long_step = _random_step(rng, 1, 33, chunk=False)
        assert engine._plan(_set_step(engine, *long_step)) is None  # a prefill's rows: the tiled attention
        assert "1 to 32 rows per sequence" in engine.buffers(33).plan.reason

        half = InferenceEngine(_model(rng).to(torch.float16), 1, S)  # (bfloat16 models run: below)
        buf = half.buffers(1)
        assert half._plan(buf) is None and "float32" in buf.plan.reason


@pytest.mark.usefixtures("native_first")
def test_bf16_exact_weights_stream_as_bf16(rng, monkeypatch):
    """A model whose projection weights are all bfloat16 values (a bfloat16 checkpoint loaded as float32)
    has its steps stream bfloat16 copies of them: bitwise the float32 plan's hidden states and cache
    writes. A weight updated in place (as load_state_dict does) is seen at the next check_model; a
    model with any other value keeps float32."""
    model = _model(rng, num_hidden_layers=3)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.bfloat16().float())
    S = PROMPT_LEN + 12
    engine = _prefilled(model, 2, S, rng)
    f32 = InferenceEngine(model, 2, S)
    modules = InferenceEngine(model, 2, S, backend="torch")
    step = _random_step(rng, 2, 5, chunk=True)

    _copy_state(engine, f32)
    _copy_state(engine, modules)
    with monkeypatch.context() as m:
        m.setattr(decoder_op, "BF16_EXACT_WEIGHTS", False)  # read when the plan is made
        want = f32.run(_set_step(f32, *step)).clone()
    got = engine.run(_set_step(engine, *step)).clone()
    assert engine.buffers(5).plan.bf16_weights and not f32.buffers(5).plan.bf16_weights
    assert torch.equal(got, want)
    assert torch.equal(engine.cache.k, f32.cache.k) and torch.equal(engine.cache.v, f32.cache.v)
    torch.testing.assert_close(got, modules.run(_set_step(modules, *step)), rtol=1e-5, atol=1e-5)

    w = model.model.layers[2].mlp.down_proj.weight
    with torch.no_grad():
        w.copy_(torch.randn(w.shape, generator=rng).bfloat16().float())  # in place: the same address
    assert engine.check_model()
    _copy_state(f32, engine)
    updated = engine.run(_set_step(engine, *step)).clone()
    assert engine.buffers(5).plan.bf16_weights and not torch.equal(updated, got)
    _copy_state(f32, modules)
    torch.testing.assert_close(updated, modules.run(_set_step(modules, *step)), rtol=1e-5, atol=1e-5)

    with torch.no_grad():
        w.mul_(1 + 2 ** -12)  # most values no longer bfloat16s
    assert engine.check_model()
    _copy_state(f32, engine)
    engine.run(_set_step(engine, *step))
    assert engine.buffers(5).plan.step is not None and not engine.buffers(5).plan.bf16_weights


@pytest.mark.usefixtures("native_first")
def test_bf16_model_norm_copies_follow_updates(rng):
    """A bfloat16 model's step holds float32 copies of its norms' weights: an in-place update of one is
    seen at the next check_model (the plan made again), as a fresh engine sees it."""
    model = _model(rng, num_hidden_layers=2).to(torch.bfloat16)
    S = PROMPT_LEN + 6
    engine, fresh = _prefilled(model, 2, S, rng), InferenceEngine(model, 2, S)
    step = _random_step(rng, 2, 3, chunk=True)
    _copy_state(engine, fresh)
    before = engine.run(_set_step(engine, *step)).clone()
    norm = model.model.layers[1].post_attention_layernorm.weight
    with torch.no_grad():
        norm.mul_(-1.5)  # in place: the same address, a new version
    assert engine.check_model()
    _copy_state(fresh, engine)
    after = engine.run(_set_step(engine, *step)).clone()
    assert not torch.equal(after, before)
    assert torch.equal(after, fresh.run(_set_step(fresh, *step)))


def test_bf16_copies_and_writes_the_version_counter_misses(rng):
    """The bfloat16 copies of the projections follow the weights' version counters: a write through
    `.data` is seen once `torch.autograd.graph.increment_version` marks it (as the engine's check_model
    sees it), and inference tensors, which have none, get no copies (a step reads them where they are)."""
    from torch.autograd.graph import increment_version

    model = _model(rng)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.bfloat16().float())
    first = nb.bf16_projections(model)
    w = model.model.layers[1].mlp.down_proj.weight
    assert first is not None and torch.equal(first[-1], w.bfloat16())
    w.data.copy_(torch.randn(w.shape, generator=rng).bfloat16().float())
    increment_version(w)
    assert torch.equal(nb.bf16_projections(model)[-1], w.bfloat16())
    assert "increment_version" in nb.bf16_projections.__doc__
    with torch.inference_mode():
        frozen = _model(rng)
        for p in frozen.parameters():
            p.copy_(p.bfloat16().float())
        assert frozen.model.layers[0].mlp.up_proj.weight.is_inference()
        assert nb.bf16_projections(frozen) is None


@pytest.mark.usefixtures("cpu_width", "native_first")
@pytest.mark.parametrize("rows", [1, 2])
def test_release_head_norm_rows_on_the_native_paths(rng, rows):
    """The release's q/k norms (affine rows shared by consecutive heads, ModelConfig.model_parallel_size):
    the native prefill and step read them repeated per head, within the rule against float64; the
    step holds those repeats, so an in-place update of a shared row is seen at the next check_model."""
    model = _model(rng, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, model_parallel_size=rows)
    assert model.model.layers[0].self_attn.q_norm.weight.shape == (rows, 16)
    S, B, Q = PROMPT_LEN + 8, 2, 3
    native = _prefilled(model, B, S, rng)
    prompts = [torch.randint(LAYOUT.text_base, LAYOUT.vocab_size, (PROMPT_LEN,), generator=rng) for _ in range(B)]
    engines = {"native": native, "same": InferenceEngine(model, B, S, backend="torch"),
               "ref": InferenceEngine(WorldVLA(model.config).to(torch.float64).eval(), B, S, backend="torch")}
    engines["ref"].model.load_state_dict(model.state_dict())
    for e in engines.values():
        e.prefill(prompts)
    for t in ("k", "v"):  # the prompt's keys and values
        _assert_rule(*(getattr(engines[n].cache, t)[:, :, :PROMPT_LEN] for n in ("native", "same", "ref")),
                     f"prefill {t}")
    step = _random_step(rng, B, Q, chunk=True)
    outs = {}
    for name, e in engines.items():
        outs[name] = e.run(_set_step(e, *step)).clone()
    assert native.buffers(Q).plan.step is not None and native.buffers(Q).plan.copies
    _assert_rule(outs["native"], outs["same"], outs["ref"], "hidden states")

    fresh = InferenceEngine(model, B, S)
    with torch.no_grad():
        model.model.layers[1].self_attn.k_norm.bias.add_(0.5)  # in place: the same address, a new version
    assert native.check_model()
    fresh.prefill(prompts)
    _copy_state(fresh, native)
    after = native.run(_set_step(native, *step)).clone()
    assert not torch.equal(after, outs["native"])
    assert torch.equal(after, fresh.run(_set_step(fresh, *step)))


@pytest.mark.usefixtures("native_first")
def test_step_errors_name_the_problem(rng):
    model = _model(rng, num_hidden_layers=1)
    engine = _prefilled(model, 2, PROMPT_LEN + 4, rng)
    ids, pos, q_limit = _random_step(rng, 2, 2, chunk=False)
    ids[1, 0] = LAYOUT.vocab_size
    buf = _set_step(engine, ids, pos, q_limit)
    with pytest.raises(IndexError, match=f"token id {LAYOUT.vocab_size} of row 2 is outside the vocabulary"):
        engine.run(buf)
    ids[1, 0] = 5
    buf = _set_step(engine, ids, pos + 3, q_limit)
    with pytest.raises(IndexError, match="position 28 of row 1 is outside the rotary tables' 28 positions"):
        engine.run(buf)
    with pytest.raises(ValueError, match="takes 1 to 32 rows per sequence"):
        nb.build_decode_step(model, engine.cache, torch.zeros(2, 40, dtype=torch.long),
                             torch.zeros(2, 40, dtype=torch.long), buf.meta)
    # bf16_weights are read by address: copies of another shape or dtype read past their ends (a segfault on a
    # larger model) or read float32 bits as bfloat16 (NaN rows); refused by name.
    n = len(nb._PROJECTION_SLOTS)
    with torch.no_grad():
        own = [w for i, w in enumerate(nb._layer_weights(model.model.layers[0])) if i in nb._PROJECTION_SLOTS]
    for wrong in ([torch.zeros(1, dtype=torch.bfloat16)] * n, [w.detach() for w in own]):  # too small; float32
        with torch.no_grad(), pytest.raises(ValueError, match=r"bf16_weights: layer 0's projection \d must be a "
                                                                r"contiguous bfloat16 CPU copy of shape"):
            nb.build_decode_step(model, engine.cache, buf.ids, buf.pos, buf.meta, bf16_weights=wrong)


@pytest.mark.usefixtures("native_first")
def test_a_step_keeps_the_tensors_it_reads_when_their_holders_change(rng):
    """The step held the KVCache and DecodeMeta objects, not their tensors: replacing cache.k (or a meta field)
    freed memory the step still read by address (a segfault on the next run). It keeps the tensors now."""
    import gc

    model = _model(rng, num_hidden_layers=1)
    engine = _prefilled(model, 2, PROMPT_LEN + 4, rng)
    ids, pos, q_limit = _random_step(rng, 2, 2, chunk=False)
    buf = _set_step(engine, ids, pos, q_limit)
    with torch.no_grad():
        run = nb.build_decode_step(model, engine.cache, buf.ids, buf.pos, buf.meta)
        first = run().clone()
        k, v = engine.cache.k, engine.cache.v
        engine.cache.k, engine.cache.v = torch.zeros_like(k), torch.zeros_like(v)
        meta_kv_len = buf.meta.kv_len
        buf.meta.kv_len = torch.zeros_like(meta_kv_len)
        del k, v, meta_kv_len
        gc.collect()
        assert torch.equal(run(), first)  # it still reads the tensors it was built on, which it keeps alive


class _ScaledLinear(torch.nn.Linear):
    def forward(self, x):
        return 2 * super().forward(x)


class _ScaledNorm(RMSNorm):
    def forward(self, x):
        return 1.5 * super().forward(x)


def _steer(module, args, output):  # a forward hook, as activation steering and probing add them
    return output + 0.5


def _adapt(model, kind, rng, lora):
    """Change `model` in a way the native layer does not compute; returns a callable undoing any global
    part and the reason the native paths must give."""
    layers = model.model.layers
    for i, layer in enumerate(layers):
        old = layer.mlp.up_proj
        if kind == "lora" or kind == "lora-last-layer" and i == len(layers) - 1:
            layer.mlp.up_proj = lora(old, rng)
        elif kind == "subclass":
            layer.mlp.up_proj = _ScaledLinear(old.in_features, old.out_features, bias=False)
            layer.mlp.up_proj.weight = old.weight
        elif kind == "norm-subclass":
            norm = layer.post_attention_layernorm
            layer.post_attention_layernorm = _ScaledNorm(norm.weight.numel(), norm.eps)
        elif kind == "hook" and i == 1:
            layer.mlp.register_forward_hook(_steer)
        elif kind == "projection-hook" and i == 0:
            layer.self_attn.v_proj.register_forward_hook(_steer)  # (q and k are layer-normed after)
    if kind == "global-hook":
        handle = torch.nn.modules.module.register_module_forward_hook(
            lambda m, a, out: out + 0.5 if isinstance(m, MLP) else out)
        return handle.remove, "a forward hook is registered"
    reason = {"lora": "up_proj is a LoRA, not a plain nn.Linear", "lora-last-layer": "up_proj is a LoRA",
              "subclass": "up_proj is a _ScaledLinear, not a plain nn.Linear",
              "norm-subclass": "post_attention_layernorm is a _ScaledNorm, not worldvla's RMSNorm",
              "hook": "a forward hook is registered", "projection-hook": "a forward hook is registered"}[kind]
    return (lambda: None), reason


@pytest.mark.usefixtures("native_first")
@pytest.mark.parametrize("kind", ["lora", "lora-last-layer", "subclass", "norm-subclass", "hook", "projection-hook",
                                  "global-hook"])
def test_adapted_layers_keep_the_modules(rng, kind, lora):
    """A layer the native paths would not compute as its modules do (an adapter on every layer's
    projection or on the last layer's only, an nn.Linear or RMSNorm subclass with its own forward, a
    forward hook on one layer's MLP, on one projection or on every module) sends the layers and the engine's steps to the
    modules under `auto`, with the reason, and the tokens are the modules' own."""
    model = _model(rng)
    prompt = torch.cat([torch.tensor([LAYOUT.bos]), torch.randint(LAYOUT.text_base, LAYOUT.vocab_size, (10,),
                                                                  generator=rng), torch.tensor([LAYOUT.sep])])
    plain = generate_action_chunk(model, prompt, LAYOUT, 3, 4)
    undo, reason = _adapt(model, kind, rng, lora)
    try:
        adapted = generate_action_chunk(model, prompt, LAYOUT, 3, 4)
        assert torch.equal(adapted, generate_action_chunk(model, prompt, LAYOUT, 3, 4, backend="torch"))
        with pytest.MonkeyPatch.context() as m:
            m.setattr(decoder_op, "NATIVE_STEP", False)  # one call a layer: the forward resolves all of them
            assert torch.equal(adapted, generate_action_chunk(model, prompt, LAYOUT, 3, 4))
            m.setitem(dispatch.AUTO_ORDER, ("decoder_layer", "cpu"), ("torch",))  # the modules with the
            m.setitem(dispatch.AUTO_ORDER, ("linear", "cpu"), ("native", "torch"))  # few-row linear (AMD's)
            assert torch.equal(adapted, generate_action_chunk(model, prompt, LAYOUT, 3, 4))
        assert not torch.equal(adapted, plain)  # the change changes the answer, so it was computed
        engine = _prefilled(model, 1, PROMPT_LEN + 4, rng)
        with torch.no_grad():
            buf = _set_step(engine, *_random_step(rng, 1, 2, chunk=False))
            assert engine._plan(buf) is None
        assert reason in buf.plan.reason
    finally:
        undo()


@pytest.mark.usefixtures("native_first")
def test_a_plan_refused_for_gradients_is_made_once_they_are_off(rng):
    """A plan first asked for while gradients were on (weights that need them) was refused and kept: every
    later step ran the modules. It is made again once gradients are off."""
    engine = _prefilled(_model(rng), 1, PROMPT_LEN + 40, rng)
    assert engine.step_plan(3) is None and "gradients" in engine.buffers(3).plan.reason
    with torch.no_grad():
        assert engine.step_plan(3) is not None


def test_auto_keeps_torchs_path_for_later_layers_the_native_kernels_cannot_take(lora):
    """A forward resolves `linear` and `decoder_layer` once, on its first layer's tensors. A later layer that the
    forward-only native kernels cannot take (an adapter whose projections need gradients; a weight of another
    layout) raised ("no autograd formula", "must be contiguous"); such layers take torch's path now, with the
    torch backend's results."""
    g = torch.Generator().manual_seed(0)
    cfg = ModelConfig.tiny(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                           num_hidden_layers=2)
    base = WorldVLA(cfg).init_weights(0.3, generator=g).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, 24), generator=g)
    grads = {}
    for backend in ("torch", "auto"):
        m = copy.deepcopy(base).requires_grad_(False)
        attn = m.model.layers[1].self_attn
        attn.q_proj = lora(attn.q_proj, torch.Generator().manual_seed(1), scale=0.3)
        h = m.hidden_states(ids, backend=backend)
        (h * torch.randn(h.shape, generator=torch.Generator().manual_seed(2))).sum().backward()
        grads[backend] = attn.q_proj.a.grad
    scale = float(grads["torch"].abs().max())
    assert scale > 1e-3
    # the same gradient up to float32 rounding (layer 0 ran the native kernels forward, on frozen weights)
    torch.testing.assert_close(grads["auto"], grads["torch"], rtol=1e-3, atol=1e-4 * scale)

    m = copy.deepcopy(base)
    q = m.model.layers[1].self_attn.q_proj
    q.weight = torch.nn.Parameter(q.weight.detach().t().contiguous().t(), requires_grad=False)  # column-major
    B, Q, S = 1, 2, 16
    cache = KVCache(cfg, B, S)
    cache.k.normal_(generator=g)
    cache.v.normal_(generator=g)
    meta = DecodeMeta(torch.tensor([[5, 6]], dtype=torch.int32), torch.full((B, Q), -1, dtype=torch.int32),
                      torch.full((B, S), NO_BLOCK, dtype=torch.int32), torch.tensor([7], dtype=torch.int32))
    out = {}
    with torch.no_grad():
        for backend in ("torch", "auto"):
            c = copy.deepcopy(cache)
            out[backend] = m.hidden_states(ids[:, :Q], cache=c, position_ids=torch.tensor([[5, 6]]),
                                           decode_meta=meta, backend=backend)
    torch.testing.assert_close(out["auto"], out["torch"], rtol=1e-4, atol=1e-5)


@pytest.mark.usefixtures("native_first")
@pytest.mark.parametrize("whole_step", [True, False], ids=["step", "layers"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nonfinite_cache_slots_follow_the_attention_rule(rng, monkeypatch, native_step_runs, whole_step, dtype):
    """The rule for non-finite inputs (worldvla/ops/attention.py) through the native decode step and layer,
    whose attention is decode_attention_cpu's: a NaN key in a prompt slot every row sees makes its sequence's
    hidden states NaN; an infinite value in a slot the chunk rule shows to row 0 only makes that row NaN; a NaN
    key past kv_len changes nothing. Every other row keeps the clean step's bits. (The native kernels dropped
    such NaNs: finite, wrong rows. The torch modules' SDPA is a documented gap of the rule.)"""
    monkeypatch.setattr(decoder_op, "NATIVE_STEP", whole_step)
    model = _model(rng).to(dtype)
    B, Q = 3, 5
    S = PROMPT_LEN + Q + 3
    native = _prefilled(model, B, S, rng)
    with torch.no_grad():  # sequence 1: row i's slot in action block i, which rows after i hide (q_limit i),
        # and prompt slot 10 in block 0 too: only row 0 sees it
        native.kv_block[1, PROMPT_LEN:PROMPT_LEN + Q] = torch.arange(Q, dtype=native.kv_block.dtype)
        native.kv_block[1, 10] = 0
    step = _random_step(rng, B, Q, chunk=True)
    engines = {"native": native}
    clean = {name: e.run(_set_step(e, *step)).clone() for name, e in engines.items()}
    assert (len(native_step_runs) > 0) == whole_step
    with torch.no_grad():  # layer 0's cache
        for e in engines.values():
            e.cache.k[0, 0, 3, 0, 1] = float("nan")
            e.cache.v[0, 1, 10, 0, 1] = float("inf")
            e.cache.k[0, 2, S - 1, 0, 1] = float("nan")  # past kv_len
    expected = torch.zeros(B, Q, dtype=torch.bool)
    expected[0], expected[1, 0] = True, True
    for name, e in engines.items():
        out = e.run(_set_step(e, *step))
        nonfinite = ~out.isfinite().all(-1)
        assert torch.equal(nonfinite, expected), f"{name}: non-finite rows {nonfinite.nonzero().tolist()}"
        assert out[expected].isnan().all(), name
        assert torch.equal(out[~expected], clean[name][~expected]), name


def test_autocast_keeps_the_modules_and_a_direct_native_call_stays_float32(rng):
    """Under CPU autocast the layer's modules compute in autocast's dtype. The native layer does not: `auto`
    passed it anyway, and a prefill of more than NATIVE_MAX_ROWS rows (torch's GEMM between the C++ stages)
    got bfloat16 buffers from F.linear that the C++ stages read as float32, past their ends (a crash in
    malloc). Now `auto` keeps the modules under autocast (and the engine its eager steps, one block a step),
    and a direct native call computes in float32 as without autocast."""
    from worldvla.inference import InferenceEngine

    model = _model(rng)
    layer, cfg = model.model.layers[0], model.config
    x, pos, meta, cache = _step(rng, cfg, 1, nb.NATIVE_MAX_ROWS + 6, 2 * nb.NATIVE_MAX_ROWS + 40)
    plain, plain_cache = _run(layer, x, pos, meta, copy.deepcopy(cache), 0, native=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast, cast_cache = _run(layer, x, pos, meta, copy.deepcopy(cache), 0, native=True)
        ctx = ForwardContext(cache=cache, position_ids=pos, decode_meta=meta)
        fits = nb._decoder_layer_supports(layer, x, ctx)
        assert not fits and "autocast" in fits.reason
        with torch.no_grad():
            assert ops.resolve_decoder_layer(layer, x, ctx) is ops.decoder_layer_ref
        engine = InferenceEngine(model, 1, 96, layout=model.layout)
        assert engine.max_step_rows() == 1 and engine._plan(engine.buffers(1)) is None
    assert torch.equal(cast, plain) and cast.dtype == torch.float32
    assert torch.equal(cast_cache.k, plain_cache.k) and torch.equal(cast_cache.v, plain_cache.v)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():  # a bfloat16 model: nothing to cast
        bf16 = copy.deepcopy(layer).to(torch.bfloat16)
        assert "autocast" not in str(getattr(nb._decoder_layer_supports(bf16, x.to(torch.bfloat16), ctx), "reason", ""))


@pytest.mark.usefixtures("native_first")
def test_a_model_that_overrides_hidden_states_keeps_its_override(rng):
    """A WorldVLA subclass with its own hidden_states (here: shifted by 1) is not stood in for by the native
    step, which would run the base model's: the engine makes no plan for it, says why, and its steps give
    the subclass's hidden states."""
    class Shifted(WorldVLA):
        def hidden_states(self, *args, **kwargs):
            return super().hidden_states(*args, **kwargs) + 1.0

    model = _model(rng)
    shifted = Shifted(model.config).eval()
    shifted.load_state_dict(model.state_dict())
    S = PROMPT_LEN + 8
    engine = _prefilled(shifted, 1, S, rng)
    modules = InferenceEngine(shifted, 1, S, backend="torch")
    _copy_state(engine, modules)
    step = _random_step(rng, 1, 2, chunk=False)
    with torch.no_grad():
        got = engine.run(_set_step(engine, *step)).clone()
        want = modules.run(_set_step(modules, *step)).clone()
    plan = engine.buffers(2).plan
    assert plan is not None and plan.step is None and "overrides hidden_states" in plan.reason
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_direct_calls_refuse_an_odd_head_dim():
    """The binding's own check, for callers that bypass the Python wrappers (the model's config refuses an odd
    head_dim first): rotary embedding pairs the two halves of each head, so head_dim 5 is refused by name
    when a step is built, and by the layer and its attention stage, before any pointer is read."""
    s, w, msg = (0, 0, 0), [0] * 13, "decoder_layer: head_dim must be even"
    with pytest.raises(ValueError, match=msg):
        _C.DecodeStep(0, 0, 10, 0, 0, 4, 0, 1e-6, 0, [w], [0], [0], 8, 8, 0, 1e-6, 1e-5, False, 0, 0, 0, 0, 1, 1, 4,
                      2, 1, 5, s, s, 0, 1.0, False, 0)
    with pytest.raises(ValueError, match=msg):
        _C.decoder_layer(0, 0, 8, 8, w, 0, 0, 0, 1e-6, 1e-5, False, 0, 0, 0, 0, 0, 0, 1, 1, 4, 2, 1, 5, s, s, 0, 1.0)
    with pytest.raises(ValueError, match=msg):
        _C.decoder_attention_block(0, 0, 0, 0, w, 0, 0, 0, 1e-5, 0, 0, 0, 0, 0, 0, 1, 1, 4, 2, 1, 5, s, s, 0, 1.0)


def test_direct_calls_of_no_sequences_or_no_rows_do_nothing():
    """`_C.decoder_layer`, `_C.decoder_attention_block`, a `_C.DecodeStep` and `_C.decode_frame` called directly with
    batch 0, no query rows or both (the Python wrappers return before the call or pass empty tensors through):
    each returns and writes nothing, on buffers of one sequence of one row poisoned with NaN (the cache with 7s,
    the frame's codes with -1). The layer's decode attention divided by its zero work items there before it
    returned at once for no work (SIGFPE: the process died): run in a child process, so that a crash fails this
    test."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import torch
        from worldvla import _C
        from worldvla.mask import DecodeMeta
        from worldvla.model import ForwardContext, KVCache, ModelConfig, WorldVLA, rope_cos_sin
        from worldvla.ops import native_backend as nb

        torch.set_grad_enabled(False)
        m = WorldVLA(ModelConfig.tiny()).eval()
        cfg, layout = m.config, m.layout
        D, Dh, S = cfg.hidden_size, cfg.head_dim, 8
        w = [t.data_ptr() for t in nb._layer_weights(m.model.layers[0])]
        cache = KVCache(cfg, 1, S)
        cache.k.fill_(7.0)
        cache.v.fill_(7.0)
        x = torch.randn(1, 1, D)
        pos = torch.zeros(1, 1, dtype=torch.long)
        meta = DecodeMeta(pos.int(), torch.full((1, 1), -1, dtype=torch.int32), torch.zeros(1, S, dtype=torch.int32),
                          torch.ones(1, dtype=torch.int32))
        cos, sin = (t.contiguous() for t in rope_cos_sin(pos, Dh, cfg.rope_theta, torch.float32))
        cache_args = list(nb._cache_args(cfg, x, ForwardContext(cache=cache, position_ids=pos, decode_meta=meta), 0))
        q, o = (torch.full((1, 1, cfg.num_attention_heads * Dh), float("nan")) for _ in range(2))
        k, v = (torch.full((1, 1, cfg.num_key_value_heads * Dh), float("nan")) for _ in range(2))
        y = torch.full_like(x, float("nan"))
        real_step, made = _C.DecodeStep, []
        _C.DecodeStep = lambda *a: made.append(a) or real_step(*a)
        run = nb.build_decode_step(m, cache, torch.zeros(1, 1, dtype=torch.long), pos, meta)
        step_args, out = list(made[0]), run.__defaults__[1]
        out.fill_(float("nan"))


        def untouched():
            return (bool((cache.k == 7).all() and (cache.v == 7).all())
                    and all(bool(t.isnan().all()) for t in (y, q, k, v, o, out)))


        for batch, n_q in ((0, 1), (1, 0), (0, 0)):
            cache_args[6:8] = batch, n_q
            _C.decoder_layer(x.data_ptr(), y.data_ptr(), D, cfg.intermediate_size, w, cos.data_ptr(), sin.data_ptr(),
                             pos.data_ptr(), 1e-5, 1e-5, False, *cache_args)
            _C.decoder_attention_block(q.data_ptr(), k.data_ptr(), v.data_ptr(), o.data_ptr(), w, cos.data_ptr(),
                                       sin.data_ptr(), pos.data_ptr(), 1e-5, *cache_args)
            step_args[22:24] = batch, n_q
            real_step(*step_args).run()
            print("step", batch, n_q, untouched())
        # a frame of no sequences: one- and two-row steps of batch 0; greedy, drawn (one image row) and guided
        codes = torch.full((1, 4), -1, dtype=torch.long)
        next_pos = torch.full((2,), 5, dtype=torch.long)
        lo, hi = min(layout.image_code_ids), max(layout.image_code_ids) + 1
        noise = torch.zeros(2, 1, hi - lo)
        steps = [real_step(*step_args[:22], 0, n_q, *step_args[24:]) for n_q in (1, 2)]
        for first, z, guided in ((1, 0, False), (2, noise.data_ptr(), False), (1, 0, True)):
            _C.decode_frame(*steps, 0, 2, 2, layout.newline, codes.data_ptr(), next_pos.data_ptr(),
                            m.lm_head.weight.data_ptr(), D, 0, D, lo, hi, 0, 0, 0, first, 4, z, 0, guided, 3.0)
            print("frame", first, guided, bool((codes == -1).all() and (next_pos == 5).all()) and untouched())
    """)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, (run.returncode, run.stderr[-2000:])
    assert run.stdout.splitlines() == ["step 0 1 True", "step 1 0 True", "step 0 0 True", "frame 1 False True",
                                       "frame 2 False True", "frame 1 True True"], run.stdout


@pytest.mark.usefixtures("cpu_width")
def test_rows_up_to_the_one_call_limit_do_not_depend_on_the_row_count(rng):
    """Up to NATIVE_MAX_ROWS rows a layer is one native call, whose rows are each the same bits alone as among
    the others; a step of exactly NATIVE_MAX_ROWS rows is still that call (torch's GEMM, past it, rounds
    otherwise)."""
    from worldvla.ops.projection import NATIVE_MAX_ROWS

    model = _model(rng, hidden_size=48, num_attention_heads=2, num_key_value_heads=1, num_hidden_layers=1)
    layer = model.model.layers[0]
    B, Q = 2, NATIVE_MAX_ROWS // 2
    x, pos, meta, cache = _step(rng, model.config, B, Q, S=2 * Q + 11, chunk=True)  # rows hide each other
    together, _ = _run(layer, x, pos, meta, copy.deepcopy(cache), 0, native=True)
    for b in range(B):
        for i in range(Q):
            one = DecodeMeta(meta.q_pos[b:b + 1, i:i + 1].contiguous(), meta.q_limit[b:b + 1, i:i + 1].contiguous(),
                             meta.kv_block[b:b + 1].contiguous(), meta.kv_len[b:b + 1].contiguous())
            sub = copy.deepcopy(cache)
            sub.k, sub.v = cache.k[:, b:b + 1].clone(), cache.v[:, b:b + 1].clone()
            alone, _ = _run(layer, x[b:b + 1, i:i + 1].contiguous(), pos[b:b + 1, i:i + 1].contiguous(), one, sub, 0,
                            native=True)
            assert torch.equal(alone, together[b:b + 1, i:i + 1]), (b, i)


def test_a_sampled_frame_refuses_top_k_0_before_any_native_call():
    """decode_frame's draws keep the top_k best codes: 0 would keep none, and is refused by name before a step
    is touched (the steps here are never reached)."""
    rows, h, w, lo, hi = 2, 2, 3, 10, 40
    codes = torch.zeros(rows, h * w, dtype=torch.long)
    next_pos = torch.zeros(rows, dtype=torch.long)
    weight = torch.randn(50, 8)
    noise = torch.zeros(w, rows, hi - lo)
    for top_k in (0, -2):
        with pytest.raises(ValueError, match=f"top_k must be >= 1 \\(or None for the whole range\\), got {top_k}"):
            nb.decode_frame(None, None, weight, lo, hi, codes, next_pos, h, w, 0, 1, w, noise, top_k)


def test_bf16_copies_need_every_low_half_zero(rng):
    """bfloat16 copies stand in for the float32 projections only where widening them back is exact: one value
    with any of its low 16 bits set (here the lowest, then bit 8) takes the copies away."""
    model = _model(rng)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.bfloat16().float())
    assert nb.bf16_projections(model) is not None
    w = model.model.layers[0].self_attn.k_proj.weight
    for bit in (0x1, 0x100):
        with torch.no_grad():
            w.copy_(w.bfloat16().float())
            w.view(torch.int32)[3, 5] |= bit
        assert nb.bf16_projections(model) is None, hex(bit)


@pytest.mark.usefixtures("native_first")
def test_a_bfloat16_models_step_refuses_bf16_weights(rng):
    """bf16_weights stand in for a float32 model's projections; a bfloat16 model's projections are streamed
    as they are, and copies handed to its step are refused by name."""
    model = _model(rng, num_hidden_layers=1).to(torch.bfloat16)
    engine = _prefilled(model, 2, PROMPT_LEN + 4, rng)
    buf = _set_step(engine, *_random_step(rng, 2, 2, chunk=False))
    with torch.no_grad():
        own = [w.clone() for i, w in enumerate(nb._layer_weights(model.model.layers[0])) if i in nb._PROJECTION_SLOTS]
        with pytest.raises(ValueError, match="bf16_weights are for float32 models"):
            nb.build_decode_step(model, engine.cache, buf.ids, buf.pos, buf.meta, bf16_weights=own)


def test_native_prefill_off_keeps_the_modules_past_the_one_call_rows(rng, monkeypatch):
    """With NATIVE_PREFILL off, `auto` keeps the native layer for up to NATIVE_MAX_ROWS rows in all (the bound
    included, counted over the whole batch) and the modules past them; an explicit backend is taken as asked."""
    model = _model(rng)
    layer, cfg, R = model.model.layers[0], model.config, nb.NATIVE_MAX_ROWS
    monkeypatch.setitem(dispatch.AUTO_ORDER, ("decoder_layer", "cpu"), ("native", "torch"))
    monkeypatch.setattr(decoder_op, "NATIVE_PREFILL", False)
    with torch.no_grad():
        for B, Q, native in ((1, R, True), (1, R + 1, False), (2, R // 2, True), (2, R // 2 + 1, False)):
            x, pos, meta, cache = _step(rng, cfg, B, Q, S=2 * R + 10)
            ctx = ForwardContext(cache=cache, position_ids=pos, decode_meta=meta)
            want = nb._dispatched_decoder_layer if native else ops.decoder_layer_ref
            assert ops.resolve_decoder_layer(layer, x, ctx) is want, (B, Q)
            assert ops.resolve_decoder_layer(layer, x, ctx, backend="native") is nb._dispatched_decoder_layer, (B, Q)
        monkeypatch.setattr(decoder_op, "NATIVE_PREFILL", True)
        assert ops.resolve_decoder_layer(layer, x, ctx) is nb._dispatched_decoder_layer


def test_decoder_layer_hands_its_backend_on(rng, monkeypatch):
    """`ops.decoder_layer` runs the backend it is given whatever `auto`'s order: native runs `_C.decoder_layer`,
    torch the modules, and both give the same hidden states."""
    model = _model(rng)
    layer, cfg = model.model.layers[0], model.config
    x, pos, meta, cache = _step(rng, cfg, 1, 2, S=20)
    cos, sin = rope_cos_sin(pos, cfg.head_dim, cfg.rope_theta, x.dtype)
    calls, outs = [], {}
    monkeypatch.setattr(nb._C, "decoder_layer", lambda *a, f=nb._C.decoder_layer: calls.append(1) or f(*a))
    for order, backend, n in ((("torch",), "native", 1), (("native", "torch"), "torch", 0),
                              (("native", "torch"), "auto", 1), (("torch",), "auto", 0)):
        monkeypatch.setitem(dispatch.AUTO_ORDER, ("decoder_layer", "cpu"), order)
        calls.clear()
        ctx = ForwardContext(cache=copy.deepcopy(cache), position_ids=pos, decode_meta=meta)
        with torch.no_grad():
            outs[order, backend] = ops.decoder_layer(layer, x, cos, sin, ctx, 0, backend=backend)
        assert len(calls) == n, (order, backend)
    for got in outs.values():
        torch.testing.assert_close(got, outs[("torch",), "auto"], rtol=1e-5, atol=1e-5)


def test_native_step_active_follows_the_first_available_backend_of_auto(monkeypatch):
    """A whole step runs natively exactly when the first backend of `auto`'s order for the CPU's decoder_layer
    that is available is the native one (an unknown name is passed over, a torch ahead of it wins); without an
    order of its own the op takes the CPU's general order."""
    monkeypatch.setattr(decoder_op, "NATIVE_STEP", True)
    assert "native" in dispatch.available("decoder_layer")
    for order, want in ((("native", "torch"), True), (("torch", "native"), False),
                        (("no_such_backend", "native", "torch"), True), (("torch",), False)):
        monkeypatch.setitem(dispatch.AUTO_ORDER, ("decoder_layer", "cpu"), order)
        assert decoder_op.native_step_active() is want, order
    monkeypatch.delitem(dispatch.AUTO_ORDER, ("decoder_layer", "cpu"), raising=False)
    for order, want in ((("native", "torch"), True), (("torch",), False)):
        monkeypatch.setitem(dispatch.AUTO_ORDER, "cpu", order)
        assert decoder_op.native_step_active() is want, order


@pytest.mark.usefixtures("native_first")
def test_a_plan_hands_bf16_copies_to_its_step_only_for_a_float32_model(rng, monkeypatch):
    """The plan builds its step with bfloat16 copies of the projections for a float32 model whose values are all
    bfloat16s (BF16_EXACT_WEIGHTS on), and with none for the same model in bfloat16 (whose weights stream as
    they are; copies would be refused) or with BF16_EXACT_WEIGHTS off; each plan is made and says so."""
    handed = []
    monkeypatch.setattr(nb, "build_decode_step", lambda *a, f=nb.build_decode_step: handed.append(a[5]) or f(*a))
    model = _model(rng, num_hidden_layers=1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.bfloat16().float())
    for m, exact, want in ((model, True, True), (copy.deepcopy(model).to(torch.bfloat16), True, False),
                           (model, False, False)):
        monkeypatch.setattr(decoder_op, "BF16_EXACT_WEIGHTS", exact)
        engine = _prefilled(m, 1, PROMPT_LEN + 4, rng)
        buf = _set_step(engine, *_random_step(rng, 1, 2, chunk=False))
        handed.clear()
        with torch.no_grad():
            plan = decoder_op.DecodeStepPlan(m, engine.cache, buf.ids, buf.pos, buf.meta)
        assert plan.step is not None, plan.reason
        dtype = m.model.embed_tokens.weight.dtype
        assert len(handed) == 1 and (handed[0] is not None) is want and plan.bf16_weights is want, (dtype, exact)
        assert plan.copies is (want or dtype == torch.bfloat16)


@pytest.mark.usefixtures("native_first")
def test_a_plan_of_a_wrapped_model_is_made(rng):
    """A wrapper that forwards its attributes to the WorldVLA inside (as torch.compile's module does) and has
    no hidden_states of its own on its class gets the inner model's plan, not an AttributeError."""
    class Wrapper(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def __getattr__(self, name):
            try:
                return super().__getattr__(name)
            except AttributeError:
                return getattr(super().__getattr__("inner"), name)

    model = _model(rng, num_hidden_layers=1)
    engine = _prefilled(model, 1, PROMPT_LEN + 4, rng)
    buf = _set_step(engine, *_random_step(rng, 1, 2, chunk=False))
    assert not hasattr(Wrapper, "hidden_states")
    with torch.no_grad():
        plan = decoder_op.DecodeStepPlan(Wrapper(model), engine.cache, buf.ids, buf.pos, buf.meta)
    assert plan.step is not None and plan.reason is None, plan.reason


@pytest.mark.usefixtures("native_first")
@pytest.mark.parametrize("error", [KeyError("layers.0.mlp"), AttributeError("'Foreign' object has no attribute 'eps'")])
def test_a_plan_of_modules_the_step_does_not_know_is_refused_with_the_reason(rng, monkeypatch, error):
    """Modules that are not worldvla's (a missing state entry or attribute when the step is built) leave the plan
    without a step and with the error as its reason, so the engine keeps the modules' step."""
    def refuse(*args, **kwargs):
        raise error

    model = _model(rng, num_hidden_layers=1)
    engine = _prefilled(model, 1, PROMPT_LEN + 4, rng)
    buf = _set_step(engine, *_random_step(rng, 1, 2, chunk=False))
    monkeypatch.setattr(nb, "build_decode_step", refuse)
    with torch.no_grad():
        plan = decoder_op.DecodeStepPlan(model, engine.cache, buf.ids, buf.pos, buf.meta)
    assert plan.step is None and plan.reason == str(error)
