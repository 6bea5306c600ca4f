"""The CPU engine's decode step as one native call (`ops.decoder.DecodeStepPlan`: embedding, every layer
and the final norm in `_C.DecodeStep`) against the layers' modules.

Tolerance rule, as in tests/test_native_decoder.py: the step's largest error against the same step run
by the modules in float64 may be at most 2x that of the modules in float32 (plus a few ulps of the
largest output), for the hidden states and for the keys and values it writes into the cache.
"""
import pytest
import torch

_C = pytest.importorskip("worldvla._C")

from worldvla.inference import InferenceEngine, generate_action_chunk  # noqa: E402
from worldvla.model import ModelConfig, WorldVLA  # noqa: E402
from worldvla.ops import decoder as decoder_op  # noqa: E402
from worldvla.ops import dispatch  # noqa: E402
from worldvla.ops import native_backend as nb  # noqa: E402
from worldvla.tokens import VocabLayout  # noqa: E402

LAYOUT = VocabLayout.compact(n_image_codes=32)
PROMPT_LEN = 24


@pytest.fixture(autouse=True)
def native_first(monkeypatch):
    """`auto` takes the native layer on the CPU (its default on AVX2 and AVX-512 machines), so the engine
    builds step plans here whatever this machine is."""
    monkeypatch.setitem(dispatch.AUTO_ORDER, ("decoder_layer", "cpu"), ("native", "torch"))
    monkeypatch.setattr(decoder_op, "NATIVE_STEP", True)


def _model(rng, swin_norm=False, **kw):
    base = dict(hidden_size=72, intermediate_size=100, num_attention_heads=3, num_key_value_heads=3,
                num_hidden_layers=3)
    base.update(kw)
    model = WorldVLA(ModelConfig.tiny(LAYOUT, swin_norm=swin_norm, **base)).init_weights(0.3, generator=rng).eval()
    with torch.no_grad():  # norms away from their identity init, so that their weights and biases matter
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn(p.shape, generator=rng))
    return model


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


def _assert_rule(out, same, ref, name):
    err, base = (out.double() - ref).abs().max().item(), (same.double() - ref).abs().max().item()
    floor = 1e-6 * ref.abs().max().item()
    assert err <= 2 * base + floor, f"{name}: error {err:.3g} > 2 x the modules' {base:.3g} (+{floor:.2g})"


@pytest.mark.usefixtures("cpu_width")
@pytest.mark.parametrize("swin_norm", [False, True], ids=["pre-norm", "post-norm"])
@pytest.mark.parametrize("B,Q,heads,kv_heads,head_dim,chunk", [
    (1, 1, 3, 3, 24, False), (1, 5, 3, 3, 24, True), (3, 2, 4, 2, 16, True), (2, 7, 2, 1, 36, False),
    (14, 5, 3, 3, 24, True),  # 70 rows: more than NATIVE_MAX_ROWS, still the few-row layer
])
def test_step_matches_f64(rng, swin_norm, B, Q, heads, kv_heads, head_dim, chunk):
    model = _model(rng, swin_norm, hidden_size=heads * head_dim, num_attention_heads=heads,
                   num_key_value_heads=kv_heads)
    S = PROMPT_LEN + Q + 3
    native = _prefilled(model, B, S, rng)
    same = InferenceEngine(model, B, S, backend="torch")  # the modules, float32
    ref = InferenceEngine(WorldVLA(model.config).to(torch.float64).eval(), B, S, backend="torch")
    ref.model.load_state_dict(model.state_dict())
    before = (native.cache.k.clone(), native.cache.v.clone())
    for e in (same, ref):
        _copy_state(native, e)
    step = _random_step(rng, B, Q, chunk)
    outs = {}
    for name, e in (("native", native), ("same", same), ("ref", ref)):
        buf = _set_step(e, *step)
        outs[name] = e.run(buf).clone()
        assert (buf.plan is not None and buf.plan.step is not None) == (name == "native"), name
    assert outs["native"].shape == (B, Q, model.config.hidden_size) and outs["native"].dtype == torch.float32
    _assert_rule(outs["native"], outs["same"], outs["ref"], "hidden states")
    written = torch.zeros(native.cache.k.shape[:3], dtype=torch.bool)
    written[:, :, PROMPT_LEN:PROMPT_LEN + Q] = True
    for i, t in enumerate(("k", "v")):
        got = getattr(native.cache, t)
        assert torch.equal(got[~written], before[i][~written]), f"{t}: a slot outside the step changed"
        _assert_rule(got[written], getattr(same.cache, t)[written], getattr(ref.cache, t)[written], f"cache {t}")


@pytest.mark.usefixtures("cpu_width")
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


def test_parallel_equals_sequential_for_many_robots(rng, native_step_runs):
    """14 prompts of 5-action chunks: every parallel step has 70 rows (above NATIVE_MAX_ROWS) and runs as
    one native call; the tokens equal sequential decoding's, one prompt at a time."""
    model = _model(rng, num_hidden_layers=2)
    prompts = [torch.cat([torch.tensor([LAYOUT.bos]),
                          torch.randint(LAYOUT.text_base, LAYOUT.text_base + 64, (8 + i % 3,), generator=rng),
                          torch.tensor([LAYOUT.sep])]) for i in range(14)]
    K, D = 5, 3
    par = generate_action_chunk(model, prompts, LAYOUT, K, D, mode="parallel")
    assert len(native_step_runs) == D
    for b, prompt in enumerate(prompts):
        assert torch.equal(par[b], generate_action_chunk(model, prompt, LAYOUT, K, D, mode="sequential")), b
    assert len({tuple(p.flatten().tolist()) for p in par}) > 1  # not a constant output


def test_plan_follows_the_model_and_the_dispatch(rng, monkeypatch):
    """The plan is rebuilt when a weight is replaced, and stands aside when `auto` would not run the
    native layer (dispatch order, NATIVE_STEP, dropout in training mode), for bf16 models and for more
    rows per sequence than a decode step has."""
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
    assert plan.step is not None and plan.current(model)
    w = model.model.layers[1].mlp.down_proj.weight
    model.model.layers[1].mlp.down_proj.weight = torch.nn.Parameter(torch.randn(w.shape, generator=rng) * 0.3)
    assert not plan.current(model)
    assert not torch.equal(both(), first)  # the new weight is read
    assert engine.buffers(3).plan is not plan and engine.buffers(3).plan.step is not None

    changes = ((lambda m: m.setitem(dispatch.AUTO_ORDER, ("decoder_layer", "cpu"), ("torch",)),
                "does not take the native decoder layer"),
               (lambda m: m.setattr(decoder_op, "NATIVE_STEP", False), "NATIVE_STEP is off"))
    for change, reason in changes:
        with monkeypatch.context() as m:
            change(m)
            both()  # the modules' step
            assert engine.buffers(3).plan.step is None and reason in engine.buffers(3).plan.reason
        both()  # and the native one again once the change is undone
        assert engine.buffers(3).plan.step is not None
    with torch.no_grad():  # as engine.run calls it
        model.train()
        model.model.layers[0].dropout.p = 0.1
        buf = _set_step(engine, *step)
        assert engine._plan(buf) is None and "dropout" in buf.plan.reason
        model.model.layers[0].dropout.p = 0.0
        model.eval()

        long_step = _random_step(rng, 1, 33, chunk=False)
        assert engine._plan(_set_step(engine, *long_step)) is None  # a prefill's rows: the tiled attention
        assert "1 to 32 rows per sequence" in engine.buffers(33).plan.reason

        half = InferenceEngine(_model(rng).to(torch.bfloat16), 1, S)
        buf = half.buffers(1)
        assert half._plan(buf) is None and "float32" in buf.plan.reason


def test_errors_name_the_problem(rng):
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
