"""Engine, parallel action-chunk decoding and the release baseline on random small models (fp32)."""
import itertools

import numpy as np
import pytest
import torch

from worldvla import ActionTokenizer, SequenceBuilder, VocabLayout, chunk_mask_meta
from worldvla.inference import InferenceEngine, baseline_generate_action_chunk, generate_action_chunk
from worldvla.inference.baseline import GrowingKVCache, chunk_structure_processor, parse_action_blocks
from worldvla.inference.release import generate_release_actions
from worldvla.mask import DecodeMeta, causal_meta
from worldvla.model import ModelConfig, WorldVLA
from worldvla.ops import decoder as decoder_op
from worldvla.ops import dispatch
from worldvla.tokens import ByteTextTokenizer

LAYOUT = VocabLayout.compact(n_image_codes=64)



def _model(seed, cfg=None, std=0.5):
    g = torch.Generator().manual_seed(seed)
    m = WorldVLA(cfg or ModelConfig.tiny(LAYOUT)).init_weights(std, generator=g).eval()
    with torch.no_grad():  # non-trivial norm affines
        for name, p in m.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return m


@torch.no_grad()
def always_separator(model, layout=LAYOUT):
    """Make `model`'s greedy choice the separator after any token: its layers add nothing, every hidden state
    is the same vector, and only the separator's lm_head row sees it."""
    for layer in model.model.layers:
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
    model.model.embed_tokens.weight[:, 0] = 5.0
    model.model.norm.weight.fill_(1.0)
    model.lm_head.weight[layout.sep] = 0.0
    model.lm_head.weight[layout.sep, 0] = 100.0
    return model


def _builder(layout=LAYOUT, dim=7):
    return SequenceBuilder(layout, ByteTextTokenizer(layout), ActionTokenizer(layout, [-1.0] * dim, [1.0] * dim))


WORDS = ["pick", "up", "the", "red", "block", "open", "drawer", "push", "button", "left", "cup"]


def _prompt(rng, n_images, grid=(4, 4), layout=LAYOUT):
    n = int(torch.randint(1, 6, (1,), generator=rng))
    instr = " ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (n,), generator=rng))
    codes = [torch.randint(0, layout.n_image_codes, grid, generator=rng) for _ in range(n_images)]
    return _builder(layout).action_prompt(instr, codes)


@torch.no_grad()
def _full_recompute_chunk(model, prompt, K, D, layout=LAYOUT, causal=False, meta_of=None):
    """Independent reference: constrained greedy decoding, recomputing the whole sequence with
    model.forward (the model's own mask built from the ids, plain causal, or `meta_of(seq)`'s) for every token."""
    T, (lo, hi) = D + 2, layout.bin_range
    seq = prompt.clone()
    for j in range(K * T):
        if j % T == 0:
            tok = layout.boa
        elif j % T == T - 1:
            tok = layout.eoa
        else:
            meta = causal_meta(tuple(seq.shape), seq.device) if causal else meta_of(seq) if meta_of else None
            tok = int(model(seq, meta)[-1, lo:hi].argmax()) + lo
        seq = torch.cat([seq, torch.tensor([tok])])
    return seq[prompt.numel():].view(K, T)


# ---------------------------------------------------------------------------------- engine
@pytest.mark.parametrize("step", [1, 3])
def test_engine_cached_path_matches_fp64_full_forward(rng, step):
    """The engine's cached path (a ragged prefill, then decode steps of `step` rows through `engine.run`,
    which on the CPU is the one-call native step) gives the hidden states of a float64 full-sequence
    forward of the same model at the same rows, within 2x the error of torch's float32 full forward."""
    import copy

    from test_native_decoder import _assert_rule  # (tests/ is on sys.path)

    model = _model(1)
    b = _builder()
    seqs = []
    for n_img, K in ((2, 2), (1, 3)):
        acts = torch.rand(K, 7, generator=rng) * 2 - 1
        seqs.append(torch.cat([_prompt(rng, n_img), b.actions.encode(acts).flatten(), torch.tensor([LAYOUT.sep])]))
    n_steps = 12 // step
    cut = [s.numel() - 13 for s in seqs]  # the prefill stops inside the action blocks
    eng = InferenceEngine(model, 2, max(s.numel() for s in seqs) + step)
    h_pre = eng.prefill([s[:c] for s, c in zip(seqs, cut)], return_all=True)
    metas = [chunk_mask_meta(s, LAYOUT) for s in seqs]
    for r, (s, m) in enumerate(zip(seqs, metas)):
        eng.kv_block[r, :s.numel()] = m.kv_block
    eng.set_kv_len([s.numel() for s in seqs])
    buf = eng.buffers(step)
    steps = []
    for t in range(0, n_steps * step, step):
        pos = torch.tensor([[c + t + i for i in range(step)] for c in cut])
        buf.ids.copy_(torch.stack([s[p] for s, p in zip(seqs, pos)]))
        buf.set_positions(pos)
        buf.q_limit.copy_(torch.stack([m.q_limit[p] for m, p in zip(metas, pos)]))
        steps.append(eng.run(buf).clone())
    if decoder_op.native_step_active():  # the steps above ran as the one-call native step
        assert eng.step_plan(step) is not None, eng.buffers(step).plan.reason
    h_steps = torch.cat(steps, dim=1)  # [2, 12, H]
    model64 = copy.deepcopy(model).double()
    with torch.no_grad():
        for r, (s, c) in enumerate(zip(seqs, cut)):
            got = torch.cat([h_pre[r, :c], h_steps[r]])
            want = model64.hidden_states(s, backend="torch")[:c + 12]
            same = model.hidden_states(s, backend="torch")[:c + 12]
            _assert_rule(got, same, want, f"row {r}")


@pytest.mark.parametrize("step", [1, 3])
def test_cached_decode_matches_full_recompute(rng, step):
    """Ragged prefill + decode steps of `step` tokens on the static cache == model.forward on the
    whole sequences, over prompts that hold restricted action blocks."""
    model = _model(2)
    b = _builder()
    seqs = []
    for n_img, K in ((1, 3), (2, 2)):
        prompt = _prompt(rng, n_img)
        acts = torch.rand(K, 7, generator=rng) * 2 - 1
        seqs.append(torch.cat([prompt, b.actions.encode(acts).flatten(), torch.tensor([LAYOUT.sep])]))
    cut = [s.numel() - 13 for s in seqs]  # the prefill stops inside the action blocks
    eng = InferenceEngine(model, 2, max(s.numel() for s in seqs) + step)
    eng.prefill([s[:c] for s, c in zip(seqs, cut)])
    metas = [chunk_mask_meta(s, LAYOUT) for s in seqs]
    for r, (s, m) in enumerate(zip(seqs, metas)):
        eng.kv_block[r, :s.numel()] = m.kv_block
    eng.set_kv_len([s.numel() for s in seqs])
    buf = eng.buffers(step)
    got = [[], []]
    for t in range(0, 12, step):
        pos = torch.tensor([[c + t + i for i in range(step)] for c in cut])
        buf.ids.copy_(torch.stack([s[p] for s, p in zip(seqs, pos)]))
        buf.set_positions(pos)
        buf.q_limit.copy_(torch.stack([m.q_limit[p] for m, p in zip(metas, pos)]))
        h = eng.run(buf)
        for r in range(2):
            got[r].append(model.lm_head(h[r]).float().detach())
    for r, s in enumerate(seqs):
        with torch.no_grad():
            want = model(s)[cut[r]:cut[r] + 12]
        g = torch.cat(got[r])
        err = float((g - want).abs().max())
        assert err <= 1e-4 * max(1.0, float(want.abs().max())), err


def test_engine_rejects_bad_input(rng):
    model = _model(3)
    prompt = _prompt(rng, 1)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        InferenceEngine(model, 1, model.config.max_position_embeddings + 1)
    eng = InferenceEngine(model, 1, prompt.numel() - 1)
    with pytest.raises(ValueError, match="do not fit"):
        eng.prefill([prompt])
    with pytest.raises(ValueError, match="2 prompts"):
        eng.prefill([prompt, prompt])
    with pytest.raises(ValueError, match="out of range"):
        InferenceEngine(model, 1, 50).prefill([torch.tensor([0, LAYOUT.vocab_size])])
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="cuda_graphs"):
            InferenceEngine(model, 1, 50, cuda_graphs=True)


# ---------------------------------------------------------------------------------- chunks
COMBOS = list(itertools.product([1, 3, 5], [1, 4, 7]))


@pytest.fixture(params=["linear-torch", "linear-native", "layer-native", "step-native"])
def step_path(request, monkeypatch):
    """The decode steps through the layers' modules with the projections on torch's GEMM or on the
    native few-row kernel, through the native decoder layer (one C++ call a layer), and as one native
    call a step (the engine's DecodeStepPlan, the CPU default)."""
    path = request.param
    if path != "linear-torch":
        pytest.importorskip("worldvla._C")
    native_layer = path in ("layer-native", "step-native")
    monkeypatch.setitem(dispatch.AUTO_ORDER, ("decoder_layer", "cpu"), ("native", "torch") if native_layer else ("torch",))
    monkeypatch.setitem(dispatch.AUTO_ORDER, ("linear", "cpu"), ("native", "torch") if path == "linear-native" else ("torch",))
    monkeypatch.setattr(decoder_op, "NATIVE_STEP", path == "step-native")
    calls = []
    if path == "step-native":
        calls = request.getfixturevalue("native_step_runs")
    elif path != "linear-torch":
        from worldvla.ops import native_backend as nb
        name = "decoder_layer" if native_layer else "linear"
        monkeypatch.setattr(nb._C, name, lambda *a, f=getattr(nb._C, name): calls.append(1) or f(*a))
    yield path
    assert (len(calls) > 0) == (path != "linear-torch"), "the path under test was not taken"


def test_parallel_equals_sequential_many_prompts(rng, step_path):
    """27 random prompts (1 or 2 history images), every (K, D) in {1,3,5} x {1,4,7}:
    parallel decoding (D passes of K rows) gives exactly the sequential tokens, one prompt at a
    time and as a ragged batch; the chunks are well formed and the bins lie in the bin range."""
    model = _model(4)
    lo, hi = LAYOUT.bin_range
    by_combo = {c: [] for c in COMBOS}
    for i in range(27):
        K, D = COMBOS[i % len(COMBOS)]
        prompt = _prompt(rng, 1 + i % 2)
        par = generate_action_chunk(model, prompt, LAYOUT, K, D, mode="parallel")
        seq = generate_action_chunk(model, prompt, LAYOUT, K, D, mode="sequential")
        assert par.shape == (K, D + 2) and par.dtype == torch.long
        assert torch.equal(par, seq), (i, K, D, par, seq)
        assert (par[:, 0] == LAYOUT.boa).all() and (par[:, -1] == LAYOUT.eoa).all()
        assert ((par[:, 1:-1] >= lo) & (par[:, 1:-1] < hi)).all()
        by_combo[(K, D)].append((prompt, par))
    # Distinct blocks differ (positions matter): the test is not trivially passing on a constant output.
    K5 = [p for (K, _), v in by_combo.items() if K == 5 for _, p in v]
    assert any(len({tuple(r.tolist()) for r in p}) > 1 for p in K5)
    for (K, D), items in by_combo.items():
        prompts = [p for p, _ in items]
        for mode in ("parallel", "sequential"):
            batch = generate_action_chunk(model, prompts, LAYOUT, K, D, mode=mode)
            assert batch.shape == (len(prompts), K, D + 2)
            for row, (_, want) in zip(batch, items):
                assert torch.equal(row, want), (K, D, mode)


def _near_tie_head(model, seed, scale=1e-5):
    """The bins' rows of the head made nearly equal (`scale` apart; in a bfloat16 model a few of its steps):
    their logits then nearly tie, where a step that rounds one row differently from another flips the greedy
    bin (random models' gaps hide that: at 1e-5, 8 of 8 seeds flipped tokens before the fix, at 1e-4 2 of 8)."""
    g = torch.Generator().manual_seed(seed)
    lo, hi = LAYOUT.bin_range
    with torch.no_grad():
        w = model.lm_head.weight
        w[lo:hi] = w[lo].float() + scale * torch.randn(hi - lo, w.shape[1], generator=g).to(w.device)
    return model


def _check_near_ties(rng, backend):
    model = _near_tie_head(_model(21), 5)
    for K, D in ((5, 7), (10, 3)):
        prompts = [_prompt(rng, 1 + i % 2) for i in range(3)]
        par = generate_action_chunk(model, prompts, LAYOUT, K, D, mode="parallel", backend=backend)
        seq = generate_action_chunk(model, prompts, LAYOUT, K, D, mode="sequential", backend=backend)
        assert torch.equal(par, seq), f"{int((par != seq).sum())} of {par.numel()} tokens differ (K={K}, D={D})"
        assert len({tuple(r.tolist()) for r in par[0]}) > 1  # not a constant output


def test_parallel_equals_sequential_on_near_ties(rng, step_path):
    """Parallel decoding ran every block in one step on every path but the CPU's one-call step, where torch's
    GEMM rounds a several-row step differently from a one-row step (about 4e-6 in float32): on a head whose
    bins nearly tie, parallel took other bins than sequential. Steps off the one-call path now run one block
    at a time, and every path gives the sequential tokens exactly, in a ragged batch too."""
    _check_near_ties(rng, "auto")


def test_parallel_equals_sequential_on_near_ties_with_the_torch_backend(rng):
    _check_near_ties(rng, "torch")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_parallel_equals_sequential_beyond_the_one_call_steps_rows(rng, dtype):
    """Chunks of more than DECODE_STEP_MAX_QUERIES actions: the CPU's one-call step takes at most that
    many rows per sequence, so a parallel step over every block would go layer by layer and round
    differently from the one-row sequential step (a bfloat16 model's projections flip tokens); the
    blocks run in groups instead and keep the sequential tokens exactly, in a ragged batch too."""
    pytest.importorskip("worldvla._C")
    model = _model(8, ModelConfig.small(LAYOUT), std=0.2).to(dtype)
    K, D = decoder_op.DECODE_STEP_MAX_QUERIES + 8, 2
    prompts = [_prompt(rng, 1 + i % 2) for i in range(4)]
    par = generate_action_chunk(model, prompts, LAYOUT, K, D, mode="parallel")
    seq = generate_action_chunk(model, prompts, LAYOUT, K, D, mode="sequential")
    assert par.shape == (4, K, D + 2)
    assert torch.equal(par, seq), f"{int((par != seq).sum())} of {par.numel()} tokens differ"
    assert len({tuple(r.tolist()) for r in par[0]}) > 1  # not a constant output


def test_chunks_past_the_models_positions_are_refused_naming_what_to_change(rng):
    """The engine's message said to shorten the prompt where the actions to generate were too many."""
    model = _model(5)
    prompt = _prompt(rng, 1)
    limit = model.config.max_position_embeddings
    with pytest.raises(ValueError, match=rf"{prompt.numel()} tokens.*max_position_embeddings {limit}; generate fewer"):
        generate_action_chunk(model, prompt, LAYOUT, limit // 6, 4)
    eng = InferenceEngine(model, 2, 64)
    k = torch.zeros(model.config.num_hidden_layers, 4, *eng.cache.k.shape[3:])
    with pytest.raises(ValueError, match=r"row must be an integer in \[0, 2\)"):
        eng.set_row_prefix(-1, k, k)
    # row_prefix handed out the last row's slots for row -1, and fewer slots than asked past the cache
    with pytest.raises(ValueError, match=r"row must be an integer in \[0, 2\)"):
        eng.row_prefix(-1, 4)
    with pytest.raises(ValueError, match=r"n must be an integer in \[0, 64\]"):
        eng.row_prefix(0, 65)
    snap = InferenceEngine(model, 2, 80).snapshot_prefix([70, 70])
    with pytest.raises(ValueError, match="a prefix snapshot of 70 slots does not fit an engine of 64"):
        eng.restore_prefix(snap)


def test_equal_length_batch_tensor(rng):
    model = _model(5)
    b = _builder()
    prompts = torch.stack([b.action_prompt("push the button", [torch.randint(0, 64, (2, 2), generator=rng)] * 2)
                           for _ in range(3)])
    out = generate_action_chunk(model, prompts, LAYOUT, 3, 4)
    assert out.shape == (3, 3, 6)
    for r in range(3):
        assert torch.equal(out[r], generate_action_chunk(model, prompts[r], LAYOUT, 3, 4, mode="sequential"))


@pytest.mark.parametrize("cfg_name", ["tiny", "small"])
def test_chunk_matches_full_recompute(rng, cfg_name):
    """Both decoders reproduce greedy decoding by full recomputation with model.forward."""
    cfg = ModelConfig.tiny(LAYOUT) if cfg_name == "tiny" else ModelConfig.small(LAYOUT)
    model = _model(6, cfg, std=0.5 if cfg_name == "tiny" else 0.2)
    for n_img, K, D in ((1, 3, 4), (2, 2, 7)):
        prompt = _prompt(rng, n_img)
        want = _full_recompute_chunk(model, prompt, K, D)
        assert torch.equal(generate_action_chunk(model, prompt, LAYOUT, K, D, mode="parallel"), want)
        assert torch.equal(generate_action_chunk(model, prompt, LAYOUT, K, D, mode="sequential"), want)


def _adapt_head(model, kind, gen, lora):
    if kind == "lora":
        model.lm_head = lora(model.lm_head, gen)
    else:  # a forward hook: a logit bias, as steering or calibration adds one
        bias = 3.0 * torch.randn(model.config.vocab_size, generator=gen)
        model.lm_head.register_forward_hook(lambda m, args, out: out + bias)


@pytest.mark.parametrize("kind", ["lora", "hook"])
def test_adapted_head_is_computed(rng, kind, lora):
    """A head that is more than its weight (an adapter, a forward hook) is run as a module: both decoders
    reproduce greedy decoding by full recomputation with model.forward, which calls it, and the answer
    differs from the plain head's."""
    model = _model(6)
    prompts = [_prompt(rng, 1) for _ in range(3)]
    plain = [generate_action_chunk(model, p, LAYOUT, 3, 4) for p in prompts]
    _adapt_head(model, kind, torch.Generator().manual_seed(1), lora)
    changed = False
    for prompt, before in zip(prompts, plain):
        want = _full_recompute_chunk(model, prompt, 3, 4)
        assert torch.equal(generate_action_chunk(model, prompt, LAYOUT, 3, 4, mode="parallel"), want)
        assert torch.equal(generate_action_chunk(model, prompt, LAYOUT, 3, 4, mode="sequential"), want)
        changed |= not torch.equal(want, before)
    assert changed


def test_prompt_with_earlier_action_blocks(rng):
    """A prompt that already holds action blocks after its last image: the generated blocks must
    not see them (their ordinals start after the prompt's), as under the chunk rule."""
    model = _model(7)
    b = _builder(dim=3)
    prompt = _prompt(rng, 1)[:-1]
    prompt = torch.cat([prompt, b.actions.encode(torch.rand(2, 3, generator=rng) * 2 - 1).flatten(),
                        torch.tensor([LAYOUT.sep])])
    want = _full_recompute_chunk(model, prompt, 2, 3)
    for mode in ("parallel", "sequential"):
        assert torch.equal(generate_action_chunk(model, prompt, LAYOUT, 2, 3, mode=mode), want)


def test_causal_mode(rng):
    """mode="causal" is greedy decoding under plain causal attention: for a chunk-trained model
    it equals a full causal recompute (the inference-only ablation) and differs from the chunk
    decoders; a model configured with attention="causal" masks nothing in forward, decodes
    only in this mode, and equals its own full recompute."""
    chunk_model = _model(11)
    causal_model = WorldVLA(ModelConfig.tiny(LAYOUT, attention="causal"))
    causal_model.load_state_dict(chunk_model.state_dict())
    causal_model.eval()
    differs = False
    for n_img, K, D in ((1, 3, 4), (2, 4, 3)):
        prompt = _prompt(rng, n_img)
        want = _full_recompute_chunk(chunk_model, prompt, K, D, causal=True)
        got = generate_action_chunk(chunk_model, prompt, LAYOUT, K, D, mode="causal")
        assert torch.equal(got, want)
        assert torch.equal(generate_action_chunk(causal_model, prompt, LAYOUT, K, D, mode="causal"), want)
        assert torch.equal(_full_recompute_chunk(causal_model, prompt, K, D), want)
        assert torch.equal(got[0], generate_action_chunk(chunk_model, prompt, LAYOUT, K, D)[0])  # block 0 sees no block
        differs |= not torch.equal(got, generate_action_chunk(chunk_model, prompt, LAYOUT, K, D))
    assert differs  # the mask matters somewhere, or the test would not tell the modes apart
    engine = InferenceEngine(causal_model, 1, 200)
    with pytest.raises(ValueError, match="causal"):  # refused before the given engine's cache is written
        generate_action_chunk(causal_model, prompt, LAYOUT, K, D, mode="parallel", engine=engine)
    assert not engine.cache.k.any()
    with pytest.raises(ValueError, match="attention"):
        WorldVLA(ModelConfig.tiny(LAYOUT, attention="sliding"))


def test_chunk_input_errors(rng):
    model = _model(8)
    prompt = _prompt(rng, 1)
    with pytest.raises(ValueError, match="separator"):
        generate_action_chunk(model, prompt[:-1], LAYOUT, 2, 3)
    with pytest.raises(ValueError, match="mode"):
        generate_action_chunk(model, prompt, LAYOUT, 2, 3, mode="beam")
    with pytest.raises(ValueError, match=">= 1"):
        generate_action_chunk(model, prompt, LAYOUT, 0, 3)
    with pytest.raises(TypeError, match="integers"):
        generate_action_chunk(model, prompt.float(), LAYOUT, 2, 3)
    eng = InferenceEngine(model, 1, prompt.numel() + 5)
    with pytest.raises(ValueError, match="cache slots"):
        generate_action_chunk(model, prompt, LAYOUT, 2, 3, engine=eng)
    with pytest.raises(TypeError, match="must be integers"):
        generate_action_chunk(model, prompt, LAYOUT, 2.0, 3)
    with pytest.raises(ValueError, match="pass that engine"):  # a fresh engine holds no prefix
        generate_action_chunk(model, prompt, LAYOUT, 2, 3, skip=[3])
    import numpy as np  # numpy integers and a skip of nothing cached are fine without an engine
    assert torch.equal(generate_action_chunk(model, prompt, LAYOUT, np.int64(2), 3, skip=[0]),
                       generate_action_chunk(model, prompt, LAYOUT, 2, 3))
    with pytest.raises(ValueError, match="pass that engine"):
        generate_release_actions(model, prompt, LAYOUT, 3, skip=[3])
    with pytest.raises(TypeError, match="integers"):
        generate_release_actions(model, prompt.float(), LAYOUT, 3)
    eng = InferenceEngine(model, 1, prompt.numel() + 3 * 5 + 1)
    with pytest.raises(ValueError, match="skip gives cached prefixes for 2 rows; this engine holds 1"):
        generate_action_chunk(model, prompt, LAYOUT, 3, 3, engine=eng, skip=[1, 1])


def test_empty_batches_and_fractional_ids_are_refused_by_name(rng):
    """A [0, P] batch failed on `max() arg is an empty sequence`, and `prefill` cast float ids to integers,
    truncating them, before checking them."""
    model = _model(8)
    prompt = _prompt(rng, 1)
    for empty in (torch.empty(0, 5, dtype=torch.long), prompt[None][:0]):
        with pytest.raises(ValueError, match=r"input_ids holds no prompt \(shape \(0, \d+\)\)"):
            generate_action_chunk(model, empty, LAYOUT, 2, 3)
        with pytest.raises(ValueError, match=r"input_ids holds no prompt"):
            generate_release_actions(model, empty, LAYOUT, 3, 5)
    eng = InferenceEngine(model, 1, prompt.numel())
    for bad in (prompt.float() + 0.7, prompt.double(), prompt > 3):
        with pytest.raises(TypeError, match=f"prompt 0: token ids must be integers, got {bad.dtype}"):
            eng.prefill([bad])
    assert eng.prefill([prompt.int()]).shape == (1, model.config.hidden_size)  # any integer dtype


def test_a_bool_prompt_is_refused_as_ids_that_are_not_integers(rng):
    """generate_action_chunk checked only floating dtypes: a bool prompt was refused as one that does not end
    with the separator, and generate_release_actions decoded it as the ids 0 and 1."""
    model = _model(8)
    prompt = _prompt(rng, 1)
    for bad in (prompt > 3, torch.ones(10, dtype=torch.bool), prompt.float()):
        with pytest.raises(TypeError, match=f"prompt 0: token ids must be integers, got {bad.dtype}"):
            generate_action_chunk(model, bad, LAYOUT, 2, 3)
        with pytest.raises(TypeError, match=f"prompt 1: token ids must be integers, got {bad.dtype}"):
            generate_release_actions(model, [prompt, bad], LAYOUT, 3, 5)


@pytest.mark.parametrize("built_inside,first_inside", list(itertools.product([True, False], repeat=2)))
def test_an_engine_serves_calls_in_and_out_of_inference_mode(rng, monkeypatch, native_step_runs, built_inside,
                                                             first_inside):
    """An engine built, or first stepped, under torch.inference_mode held inference tensors (its cache, block
    ordinals and lengths; its step buffers, made on first use) that a later call outside inference mode could
    not update in place. Built and first used in either mode, it serves both, with a fresh decode's tokens, on
    the native step (whose plan, made on first use, keeps the caller's grad mode)."""
    monkeypatch.setitem(dispatch.AUTO_ORDER, ("decoder_layer", "cpu"), ("native", "torch"))
    monkeypatch.setattr(decoder_op, "NATIVE_STEP", True)
    model = _model(4)
    prompts = [_prompt(rng, 2), _prompt(rng, 1)]
    chunks = {m: generate_action_chunk(model, prompts, LAYOUT, 3, 4, mode=m) for m in ("parallel", "sequential")}
    release = [g.tokens for g in generate_release_actions(model, prompts, LAYOUT, 4, 12)]
    with torch.inference_mode(built_inside):
        eng = InferenceEngine(model, 2, max(p.numel() for p in prompts) + 3 * 6 + 12)
    for inside in (first_inside, not first_inside, first_inside):
        del native_step_runs[:]
        with torch.inference_mode(inside):
            for mode, want in chunks.items():
                assert torch.equal(generate_action_chunk(model, prompts, LAYOUT, 3, 4, mode=mode, engine=eng), want)
            got = generate_release_actions(model, prompts, LAYOUT, 4, 12, engine=eng)
            assert all(torch.equal(g.tokens, w) for g, w in zip(got, release))
            k, v = eng.row_prefix(1, 5)
            snap = eng.snapshot_prefix([5, 5])
        assert native_step_runs, inside
        assert not any(t.is_inference() for t in (eng.cache.k, eng.kv_block, eng.kv_len, k, v, snap.k, snap.v))
        assert not any(t.is_inference() for buf in eng._steps.values() for t in (buf.ids, buf.pos, buf.q_limit))
        k.add_(1)  # the caller's copies are its own, outside inference mode too
        eng.restore_prefix(snap)


def test_prefill_says_which_row_does_not_fit(rng):
    """Rows are padded to the batch's longest uncached part: a long cached prefix next to a long uncached
    prompt may not fit although each prompt does; the error says so instead of naming the longest prompt."""
    model = _model(8)
    long, short = _prompt(rng, 2), _prompt(rng, 1)
    eng = InferenceEngine(model, 2, long.numel() + 4)
    eng.prefill([long, short])  # fits
    with pytest.raises(ValueError, match=f"row 0's cached prefix of {long.numel() - 3} tokens and the batch's "
                                         f"longest uncached part \\({short.numel() - 1} tokens"):
        eng.prefill([long, short], skip=[long.numel() - 3, 1])


def test_prefix_restore_gives_same_chunk(rng):
    """Prefilling only the suffix after restoring a snapshot of the prefix's keys/values == a full prefill."""
    model = _model(9)
    prompts = [_prompt(rng, 2), _prompt(rng, 1)]
    n_pre = [5, 9]
    eng = InferenceEngine(model, 2, max(p.numel() for p in prompts) + 3 * 6 + 1)
    eng.prefill([p[:n] for p, n in zip(prompts, n_pre)])
    snap = eng.snapshot_prefix(n_pre)
    want = generate_action_chunk(model, prompts, LAYOUT, 3, 4)
    eng.cache.k.normal_()  # poison everything, then restore only the prefix
    eng.cache.v.normal_()
    eng.restore_prefix(snap)
    got = generate_action_chunk(model, prompts, LAYOUT, 3, 4, engine=eng, skip=n_pre)
    assert torch.equal(got, want)


def test_prefill_after_a_cached_prefix_keeps_the_chunk_rule_of_both_parts(rng):
    """A prompt whose action blocks straddle the cached prefix (a causal-mode query of a chunk-trained model,
    or a caller's own prefix cache): the uncached rows take their own rows of the rule, and the cached
    blocks stay hidden from later blocks. Every row's hidden state equals a full prefill's."""
    model = _model(12)
    D = 3
    blocks = [torch.cat([torch.tensor([LAYOUT.boa]), LAYOUT.bin_base + torch.randint(0, LAYOUT.n_bins, (D,),
                                                                                    generator=rng),
                         torch.tensor([LAYOUT.eoa])]) for _ in range(3)]
    prompt = torch.cat([_prompt(rng, 1), *blocks])
    cut = prompt.numel() - 2 * (D + 2) - 2  # inside the first block: it spans the cached and uncached parts
    full = InferenceEngine(model, 1, prompt.numel() + 2).prefill([prompt], return_all=True)[0]
    eng = InferenceEngine(model, 1, prompt.numel() + 2)
    eng.prefill([prompt[:cut]])
    rest = eng.prefill([prompt], skip=[cut], return_all=True)[0]
    torch.testing.assert_close(rest, full[cut:], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------- baseline
def test_baseline_with_structure_processor_equals_sequential(rng):
    """The release's decoder (full vocabulary, dense mask row rebuilt every step, growing cache)
    gives the constrained sequential decoder's tokens once its argmax is restricted the same way."""
    model = _model(10)
    for n_img, K, D in ((1, 3, 4), (2, 2, 7), (2, 1, 1)):
        prompt = _prompt(rng, n_img)
        proc = chunk_structure_processor(LAYOUT, prompt.numel(), K, D)
        out = baseline_generate_action_chunk(model, prompt, LAYOUT, K, D, logits_processor=proc)
        assert out.tokens.numel() == K * (D + 2) + 1 and int(out.tokens[-1]) == LAYOUT.sep
        assert torch.equal(out.actions, generate_action_chunk(model, prompt, LAYOUT, K, D, mode="sequential"))


def test_baseline_release_behaviour(rng):
    """Unconstrained: full-vocabulary greedy runs to max_new_tokens or stops at the separator."""
    model = _model(11)
    prompt = _prompt(rng, 1)
    out = baseline_generate_action_chunk(model, prompt, LAYOUT, 2, 3, max_new_tokens=9)
    assert out.tokens.shape == (9,) and out.actions.shape[1] == 5
    # The first token is the full-vocabulary argmax after the prompt.
    assert int(out.tokens[0]) == int(model(prompt)[-1].argmax())
    always_separator(model)  # generation stops at once
    out = baseline_generate_action_chunk(model, prompt, LAYOUT, 2, 3)
    assert out.tokens.tolist() == [LAYOUT.sep] and out.actions.shape == (0, 5)
    with pytest.raises(ValueError, match="batch size 1"):
        baseline_generate_action_chunk(model, torch.stack([prompt, prompt]), LAYOUT, 2, 3)


def test_parse_action_blocks_skips_malformed():
    L = LAYOUT
    b = L.bin_base
    toks = torch.tensor([5, L.boa, b, b + 1, L.eoa, L.eoa, L.boa, b, L.eoa, L.boa, b + 2, b + 3, L.eoa, L.sep])
    blocks = parse_action_blocks(toks, L, 2)
    assert blocks.tolist() == [[L.boa, b, b + 1, L.eoa], [L.boa, b + 2, b + 3, L.eoa]]


def test_parse_release_actions_as_the_release():
    """generate_dis_ma's loop then unnorm_min_max's shapes: each EOA closes the latest BOA's block, whatever its
    length; a stray EOA after a closed block is skipped; a longer block keeps its first D ids, a 1-id block is
    broadcast; a block of 0 or 2..D-1 ids (or an EOA before any BOA) ends the kept actions and fails after them."""
    from worldvla.inference.baseline import parse_release_actions

    L, b = LAYOUT, LAYOUT.bin_base
    A, E = L.boa, L.eoa
    parse = lambda toks, D=3: (lambda r: (r[0].tolist(), r[1]))(parse_release_actions(torch.tensor(toks), L, D))
    assert parse([5, A, b, b + 1, b + 2, b + 3, E, E, 7, A, b + 4, E, A, b, b, b, L.sep]) == (
        [[A, b, b + 1, b + 2, E], [A, b + 4, b + 4, b + 4, E]], False)       # trailing open block: not decoded
    assert parse([A, b, A, b + 1, b + 2, b + 3, E]) == ([[A, b + 1, b + 2, b + 3, E]], False)  # BOA restarts
    assert parse([A, b, b, b, E, A, b, b, E, A, b, b, b, E]) == ([[A, b, b, b, E]], True)
    assert parse([A, b, b, b, E, A, E, A, b, b, b, E]) == ([[A, b, b, b, E]], True)
    assert parse([E, A, b, b, b, E]) == ([], True)                           # start_index unset: raises
    assert parse([]) == ([], False) and parse_release_actions(torch.tensor([]), L, 3)[0].shape == (0, 5)


def test_growing_cache_concatenates():
    c = GrowingKVCache(1)
    k = torch.randn(1, 3, 2, 4)
    c.write(0, None, k, k)
    c.write(0, None, k[:, :1], k[:, :1])
    assert len(c) == 4 and torch.equal(c.k[0][:, 3], k[:, 0])


def test_decode_meta_subclass_is_decode_meta():
    from worldvla.inference.baseline import DenseRowMeta

    z = torch.zeros(1, 1, dtype=torch.int32)
    m = DenseRowMeta(z, z, z, z[:, 0], mask=torch.ones(1, 1, 1, dtype=torch.bool))
    assert isinstance(m, DecodeMeta) and m.dense_mask().shape == (1, 1, 1)


# ---------------------------------------------------------------------------------- GPU
def _differs(got, want) -> str:
    bad = (got != want).any(-1).nonzero().flatten().tolist()
    return f"rows {bad[:8]} differ, by up to {(got.float() - want.float()).abs().max().item():.3g}"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_projection_rows_do_not_depend_on_the_rows_beside_them(dtype):
    """What parallel decoding's exactness on CUDA rests on (the near-tie test below checks the tokens): a step of
    B x K rows computes each row's projections bit for bit as a step of B rows, or of one, does. cuBLAS may take
    another kernel, or another split of the reduction, for one row than for several. A failure names the shape
    and the row count, and max_step_rows() must then bound the rows of a CUDA step."""
    from worldvla import ops

    g = torch.Generator(device="cuda").manual_seed(0)
    # The small config's projections, then the 7B's (hidden 4096, MLP 11008).
    for n_out, n_in in ((256, 256), (688, 256), (256, 688), (4096, 4096), (11008, 4096), (4096, 11008)):
        w = (torch.randn(n_out, n_in, device="cuda", generator=g) / n_in ** 0.5).to(dtype)
        x = torch.randn(30, n_in, device="cuda", generator=g).to(dtype)
        one = torch.cat([ops.linear(x[i:i + 1], w) for i in range(30)])
        for M in (2, 3, 5, 10, 15, 16, 30):
            got = ops.linear(x[:M], w)
            assert torch.equal(got, one[:M]), f"linear {n_out}x{n_in} {dtype}, {M} rows: {_differs(got, one[:M])}"


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "native"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(4, 4, 64), (32, 32, 128), (8, 2, 64)])
def test_cuda_decode_attention_rows_do_not_depend_on_the_rows_beside_them(backend, dtype, heads, kv_heads, head_dim):
    """The other half of a step: K query rows in K action blocks of a chunk (the parallel step) give each row's
    attention bit for bit as a one-row query does (the sequential step). The split of the cache over CTAs (and
    Triton's row tile) is chosen from the shapes: steps of up to DECODE_PLAN_QUERIES rows take the one-row
    step's (the CPU tests check the plans, and the native kernel's rows in the SIMT emulator)."""
    from worldvla import ops
    from worldvla.mask import NO_BLOCK

    g = torch.Generator(device="cuda").manual_seed(1)
    B, P, K, D = 3, 574, 10, 7  # a 256 px prompt, a chunk of 10 actions of 7 values
    S = P + K * (D + 2) + 1
    k_cache = torch.randn(B, S, kv_heads, head_dim, device="cuda", generator=g).to(dtype)
    v_cache = torch.randn(B, S, kv_heads, head_dim, device="cuda", generator=g).to(dtype)
    q = torch.randn(B, K, heads, head_dim, device="cuda", generator=g).to(dtype)
    kv_block = torch.full((B, S), NO_BLOCK, dtype=torch.int32)
    for j in range(K):
        kv_block[:, P + j * (D + 2):P + (j + 1) * (D + 2)] = j
    d = 4  # the step writing each block's 4th value: block j's row at P + j (D + 2) + d
    q_pos = torch.tensor([[P + j * (D + 2) + d for j in range(K)]] * B, dtype=torch.int32)
    q_limit = torch.arange(K, dtype=torch.int32).repeat(B, 1)
    kv_len = torch.full((B,), S, dtype=torch.int32)
    meta = DecodeMeta(q_pos.cuda(), q_limit.cuda(), kv_block.cuda(), kv_len.cuda())
    if backend not in dispatch.available("decode_attention") or \
            not dispatch.supports("decode_attention", backend, q, k_cache, v_cache, meta):
        pytest.skip(f"no {backend} decode attention for these tensors here")
    full = ops.decode_attention(q, k_cache, v_cache, meta, backend=backend)
    for j in range(K):
        one_meta = DecodeMeta(meta.q_pos[:, j:j + 1].contiguous(), meta.q_limit[:, j:j + 1].contiguous(), meta.kv_block,
                              meta.kv_len)
        one = ops.decode_attention(q[:, j:j + 1].contiguous(), k_cache, v_cache, one_meta, backend=backend)
        assert torch.equal(full[:, j:j + 1], one), \
            f"{backend} {dtype} H{heads}/{kv_heads} Dh{head_dim}, block {j} of {K}: " \
            f"{_differs(full[:, j].flatten(1), one[:, 0].flatten(1))}"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_parallel_equals_sequential_on_near_ties(dtype):
    """On CUDA a parallel step runs every block at once (max_step_rows None): exact only if the GEMMs and the
    decode attention give each row the same bits with K rows as with one. A head whose bins nearly tie shows
    a difference as other tokens."""
    rng = torch.Generator().manual_seed(1)
    model = _model(22, ModelConfig.small(LAYOUT), std=0.2).to("cuda", dtype)
    _near_tie_head(model, 6, 1e-5 if dtype == torch.float32 else 0.02)
    prompts = [_prompt(rng, 2, grid=(8, 8)) for _ in range(3)]
    for K, D in ((5, 7), (10, 7)):
        par = generate_action_chunk(model, prompts, LAYOUT, K, D, mode="parallel")
        seq = generate_action_chunk(model, prompts, LAYOUT, K, D, mode="sequential")
        assert torch.equal(par, seq), f"{int((par != seq).sum())} of {par.numel()} tokens differ (K={K}, {dtype})"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_decode_matches_eager(dtype):
    """Graph-replayed decode steps == eager steps (same tokens; hidden states equal up to rounding)."""
    rng = torch.Generator().manual_seed(0)
    model = _model(12, ModelConfig.small(LAYOUT), std=0.2).to("cuda", dtype)
    prompts = [_prompt(rng, 2, grid=(8, 8)), _prompt(rng, 1, grid=(8, 8))]
    for mode in ("parallel", "sequential"):
        outs = []
        for graphs in (False, True):
            eng = InferenceEngine(model, 2, max(p.numel() for p in prompts) + 5 * 9 + 1, cuda_graphs=graphs)
            outs.append(generate_action_chunk(model, prompts, LAYOUT, 5, 7, mode=mode, engine=eng))
            outs.append(generate_action_chunk(model, prompts, LAYOUT, 5, 7, mode=mode, engine=eng))  # replay again
            assert eng.cuda_graphs == graphs
        assert all(torch.equal(o, outs[0]) for o in outs), mode
    if dtype == torch.float32:
        want = torch.stack([_full_recompute_chunk(model.cpu(), p, 5, 7) for p in prompts])
        assert torch.equal(outs[0], want)


def test_compiled_model_wrapper_decodes(rng):
    """A model wrapped by torch.compile (an OptimizedModule, which forwards its attributes to the model)
    decodes as the model does; the engine's model checks read through the wrapper."""
    model = _model(7)
    prompt = _prompt(rng, 1)
    want = generate_action_chunk(model, prompt, LAYOUT, 3, 4)
    wrapped = torch.compile(model)
    assert torch.equal(generate_action_chunk(wrapped, prompt, LAYOUT, 3, 4, mode="parallel"), want)
    assert torch.equal(generate_action_chunk(wrapped, prompt, LAYOUT, 3, 4, mode="sequential"), want)
    engine = InferenceEngine(wrapped, 1, prompt.numel() + 8, layout=LAYOUT)
    engine.prefill([prompt])
    assert not engine.check_model()
    model.model.layers[0].mlp.up_proj.register_forward_hook(lambda m, a, out: out)
    assert engine.check_model()  # seen through the wrapper


def test_an_engine_runs_only_the_model_it_was_built_for(rng):
    """An engine passed with another model ran that engine's layers under the other model's head; one whose
    model was converted (`model.to(bfloat16)`) kept float32 caches: both are refused by name."""
    a, b = _model(0), _model(1)
    prompt = _prompt(rng, 1)
    eng = InferenceEngine(a, 1, prompt.numel() + 40)
    with pytest.raises(ValueError, match="built for another model"):
        generate_action_chunk(b, prompt, LAYOUT, 2, 7, engine=eng)
    with pytest.raises(ValueError, match="built for another model"):
        generate_release_actions(b, prompt, LAYOUT, 7, 10, engine=eng)
    want = generate_action_chunk(a, prompt, LAYOUT, 2, 7)
    assert torch.equal(generate_action_chunk(a, prompt, LAYOUT, 2, 7, engine=eng), want)
    a.to(torch.bfloat16)
    with pytest.raises(ValueError, match=r"now torch.bfloat16 .* build a new engine after model.to"):
        generate_action_chunk(a, prompt, LAYOUT, 2, 7, engine=eng)


def test_prefill_boundaries_and_prefix_snapshot_rows(rng):
    """A prompt that fills the cache exactly is taken; a cached prefix must leave a token to compute; a prefix
    snapshot is restored only into an engine of as many rows (one row would be broadcast into every row)."""
    model = _model(3)
    prompt = _prompt(rng, 1)
    eng = InferenceEngine(model, 1, prompt.numel())
    assert eng.prefill([prompt]).shape == (1, model.config.hidden_size)
    with pytest.raises(ValueError, match="at least one token past its cached prefix"):
        eng.prefill([prompt], skip=[prompt.numel()])
    snap = eng.snapshot_prefix([prompt.numel()])
    with pytest.raises(ValueError, match="does not fit an engine of 2"):
        InferenceEngine(model, 2, prompt.numel()).restore_prefix(snap)


def test_an_engine_serves_the_compiled_wrapper_of_its_model(rng):
    """The engine's model check reads through torch.compile's wrapper: an engine built for the model also
    serves `torch.compile(model)` (and decodes the same chunk)."""
    model = _model(7)
    prompt = _prompt(rng, 1)
    want = generate_action_chunk(model, prompt, LAYOUT, 3, 4)
    eng = InferenceEngine(model, 1, prompt.numel() + 40)
    assert torch.equal(generate_action_chunk(torch.compile(model), prompt, LAYOUT, 3, 4, engine=eng), want)


def test_an_engine_of_no_rows_or_no_slots_is_refused(rng):
    model = _model(3)
    for rows, slots in ((0, 8), (1, 0)):
        with pytest.raises(ValueError, match=rf"batch_size and max_len must be >= 1, got {rows} and {slots}"):
            InferenceEngine(model, rows, slots)


def test_a_causal_model_prefills_a_prompt_with_action_blocks_without_the_chunk_rule(rng):
    """A model trained with plain causal attention: its prompt's earlier action blocks stay visible to the later
    ones in the engine's prefill (as in its own forward), where the chunk rule would hide them."""
    chunk_model = _model(7)
    causal_model = WorldVLA(ModelConfig.tiny(LAYOUT, attention="causal"))
    causal_model.load_state_dict(chunk_model.state_dict())
    causal_model.eval()
    b = _builder(dim=3)
    prompt = torch.cat([_prompt(rng, 1)[:-1], b.actions.encode(torch.rand(2, 3, generator=rng) * 2 - 1).flatten(),
                        torch.tensor([LAYOUT.sep])])
    with torch.no_grad():
        want = causal_model(prompt)
        chunk = chunk_model(prompt)
        eng = InferenceEngine(causal_model, 1, prompt.numel())
        got = causal_model.lm_head(eng.prefill([prompt], return_all=True)[0])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert (chunk - want).abs().max() > 0.1  # the chunk rule changes these logits: the check tells the two apart


def test_an_engine_for_a_request_that_fills_the_models_positions_exactly(rng):
    """The longest prompt and the tokens to generate may take every position the model has, not one more."""
    from worldvla.inference.engine import engine_for

    model = _model(3)
    prompt = _prompt(rng, 1)
    limit = model.config.max_position_embeddings
    assert engine_for(model, [prompt], limit - prompt.numel()).max_len == limit
    with pytest.raises(ValueError, match=rf"need {limit + 1} positions, more than the model's "
                                         rf"max_position_embeddings {limit}"):
        engine_for(model, [prompt], limit - prompt.numel() + 1)


def test_a_changed_model_drops_the_steps_cuda_graphs_as_well_as_their_plans(rng):
    """A captured step holds the model's weights by address and runs its modules as they were: a changed model
    (a forward hook added) drops the step's graph, as it drops its native plan."""
    model = _model(3)
    prompt = _prompt(rng, 1)
    eng = InferenceEngine(model, 1, prompt.numel() + 4)
    eng.prefill([prompt])
    buf = eng.buffers(1)
    buf.graph = object()  # stands for a graph captured on a CUDA device
    assert not eng.check_model() and buf.graph is not None
    model.model.layers[0].mlp.up_proj.register_forward_hook(lambda m, a, out: out)
    assert eng.check_model()
    assert buf.graph is None and buf.plan is None


def test_a_row_prefix_longer_than_the_engine_is_refused_by_name(rng):
    model = _model(3)
    prompt = _prompt(rng, 1)
    big = InferenceEngine(model, 1, prompt.numel())
    big.prefill([prompt])
    k, v = big.row_prefix(0, prompt.numel())
    small = InferenceEngine(model, 2, prompt.numel() - 1)
    with pytest.raises(ValueError, match=rf"a prefix of {prompt.numel()} slots does not fit an engine of "
                                         rf"{prompt.numel() - 1}"):
        small.set_row_prefix(1, k, v)
    small.set_row_prefix(1, k[:, :-1], v[:, :-1])
    assert torch.equal(small.cache.k[:, 1], k[:, :-1]) and not small.cache.k[:, 0].any()


def test_the_baseline_refuses_ids_that_are_not_integers_and_an_empty_prompt(rng):
    """The release's baseline cast a float prompt to integers, truncating it (1.7 decoded as 1), and took a bool
    prompt as the ids 0 and 1, where the engine's decoders refuse both by name; it refuses them too now."""
    model = _model(8)
    prompt = _prompt(rng, 1)
    for bad in (prompt.float() + 0.7, prompt.double(), prompt > 3):
        with pytest.raises(TypeError, match=f"input_ids: token ids must be integers, got {bad.dtype}"):
            baseline_generate_action_chunk(model, bad, LAYOUT, 2, 3)
    with pytest.raises(ValueError, match=r"input_ids must be one prompt \[P\] or \[1, P\], got shape \(0,\)"):
        baseline_generate_action_chunk(model, prompt[:0], LAYOUT, 2, 3)
    want = baseline_generate_action_chunk(model, prompt, LAYOUT, 2, 3).tokens
    assert torch.equal(baseline_generate_action_chunk(model, prompt.int(), LAYOUT, 2, 3).tokens, want)


def test_the_baseline_gives_the_model_its_attention_backend_back(rng):
    """The baseline runs the release's dense-mask attention on the "torch" backend and puts the model's own
    backend back afterwards, also when a logits processor raises partway."""
    model = _model(8)
    prompt = _prompt(rng, 1)
    model.attn_backend = "native"
    baseline_generate_action_chunk(model, prompt, LAYOUT, 2, 3)
    assert model.attn_backend == "native"

    def fails(seq, logits):
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        baseline_generate_action_chunk(model, prompt, LAYOUT, 2, 3, logits_processor=fails)
    assert model.attn_backend == "native"


def test_parse_action_blocks_takes_a_block_that_ends_the_tokens():
    """A well-formed block as the last tokens (no separator after it) is parsed, as one before other tokens."""
    lo = LAYOUT.bin_range[0]
    block = [LAYOUT.boa, lo, lo + 5, LAYOUT.eoa]
    assert parse_action_blocks(torch.tensor(block), LAYOUT, 2).tolist() == [block]
    assert parse_action_blocks(torch.tensor([LAYOUT.sep, *block, *block]), LAYOUT, 2).tolist() == [block, block]


def test_an_engine_too_small_for_the_longest_prompts_chunk_is_refused(rng):
    """Prompts of different lengths on a given engine: the longest one's chunk must fit, not the shortest's."""
    model = _model(8)
    short, long = _prompt(rng, 1), _prompt(rng, 2)
    assert long.numel() > short.numel() + 1
    need = long.numel() + 2 * 5 + 1  # 2 actions of 3 bins, then the separator
    eng = InferenceEngine(model, 2, need - 1)
    with pytest.raises(ValueError, match=f"prompt \\+ chunk need {need} cache slots but the engine has {need - 1}"):
        generate_action_chunk(model, [short, long], LAYOUT, 2, 3, engine=eng)
    eng = InferenceEngine(model, 2, need)
    got = generate_action_chunk(model, [short, long], LAYOUT, 2, 3, engine=eng)
    assert torch.equal(got[1], generate_action_chunk(model, long, LAYOUT, 2, 3))


class _FakeCuda:
    """Stand-ins for torch.cuda's streams, device guard and graph capture on a machine without a GPU: they record
    where each decode forward of an engine runs (the current device and stream) and how each step is captured.
    torch's `torch.cuda.graph` without `stream=` captures on one stream it makes once per process on whatever
    device is current then (here cuda:0, as on a machine whose first capture was for cuda:0)."""

    class Stream:
        def __init__(self, device=None):
            self.device = torch.device(device if device is not None else "cuda:0")

        def wait_stream(self, other):
            pass

    def __init__(self, monkeypatch):
        self.device, self.stream, self.capturing = torch.device("cuda:0"), None, False
        self.default_capture_stream = self.Stream("cuda:0")
        self.captures, self.replays = [], 0
        fake = self

        class CUDAGraph:
            def replay(self):
                fake.replays += 1

        for name, value in (("Stream", self.Stream), ("CUDAGraph", CUDAGraph), ("stream", self._stream),
                            ("device", self._device), ("graph", self._graph), ("synchronize", lambda device=None: None),
                            ("current_stream", lambda device=None: self.Stream(device or self.device)),
                            ("graph_pool_handle", lambda: ("pool", 0))):
            monkeypatch.setattr(torch.cuda, name, value)

    def _swap(self, **state):
        old = {k: getattr(self, k) for k in state}
        for k, v in state.items():
            setattr(self, k, v)
        return old

    def _context(self, **state):
        from contextlib import contextmanager

        @contextmanager
        def ctx():
            old = self._swap(**state)
            try:
                yield
            finally:
                self._swap(**old)
        return ctx()

    def _stream(self, s):
        return self._context(stream=s)

    def _device(self, d):
        return self._context(device=torch.device(d))

    def _graph(self, graph, pool=None, stream=None, capture_error_mode="global"):
        stream = stream or self.default_capture_stream
        self.captures.append({"stream": stream, "pool": pool, "current_device": self.device,
                              "mode": capture_error_mode})
        return self._context(stream=stream, capturing=True)


def test_decode_steps_are_captured_and_run_on_the_engines_own_device(rng, monkeypatch):
    """An engine on a GPU that is not the current device (cuda:1 while cuda:0 is current) warms up, captures
    and runs its decode steps with its own device current and on its streams: torch's default capture stream
    belongs to the device current when it was first made, so a step was captured on a cuda:0 stream while its
    kernels ran on cuda:1, and Triton launches its kernels on the current device. All captures of one engine
    take one stream, as torch asks of graphs that share a memory pool."""
    model = _model(3)
    prompt = _prompt(rng, 1)
    eng = InferenceEngine(model, 1, prompt.numel() + 4, cuda_graphs=False)
    h = eng.prefill([prompt])
    assert h.shape == (1, model.config.hidden_size)
    want = {}
    for q in (1, 2):
        buf = eng.buffers(q)
        buf.ids.fill_(LAYOUT.bin_range[0])
        buf.set_positions(torch.full((1, q), prompt.numel()) + torch.arange(q))
        with torch.no_grad():  # as a step runs (the native layer on some CPUs takes no gradients)
            want[q] = eng._forward(buf.ids, buf.pos, buf.meta).clone()
    fake = _FakeCuda(monkeypatch)
    eng.device, eng.cuda_graphs = torch.device("cuda:1"), True  # as an engine of a model on cuda:1
    forwards = []
    plain_forward = eng._forward

    def recorded(*args):
        forwards.append((fake.device, fake.stream.device if fake.stream is not None else None, fake.capturing))
        return plain_forward(*args)

    monkeypatch.setattr(eng, "_forward", recorded)
    for q in (1, 2, 1):
        got = eng.run(eng.buffers(q))
        torch.testing.assert_close(got, want[q], rtol=0, atol=0)
    cuda1 = torch.device("cuda:1")
    assert len(fake.captures) == 2 and fake.replays == 3
    assert all(c["stream"].device == cuda1 and c["current_device"] == cuda1 for c in fake.captures)
    assert fake.captures[0]["stream"] is fake.captures[1]["stream"]
    assert all(c["mode"] == "thread_local" for c in fake.captures)  # other threads' CUDA work is no error of it
    assert fake.captures[0]["pool"] == fake.captures[1]["pool"] is not None
    # two warm-up forwards on a side stream of cuda:1, then the captured one, per step size
    assert forwards == [(cuda1, cuda1, False), (cuda1, cuda1, False), (cuda1, cuda1, True)] * 2
    # an engine that runs its steps eagerly runs them with its device current as well
    del forwards[:]
    eng.cuda_graphs = False
    eng.run(eng.buffers(1))
    assert forwards == [(cuda1, None, False)]


def test_every_forward_of_an_engine_runs_inside_its_device_guard(rng, monkeypatch):
    """The prefill's forward, like every step's, runs with the engine's GPU current (`_on_device`): Triton launches
    on the current device, so a model on cuda:1 prefilled under cuda:0 would run its kernels on the wrong GPU.
    Checked on the CPU by recording, at each forward, whether the guard is entered."""
    from contextlib import contextmanager

    model = _model(3)
    prompt = _prompt(rng, 1)
    eng = InferenceEngine(model, 1, prompt.numel() + 4, cuda_graphs=False)
    inside, seen = [False], []

    @contextmanager
    def guard():
        inside[0] = True
        try:
            yield
        finally:
            inside[0] = False

    plain_forward = eng._forward

    def recorded(*args):
        seen.append(inside[0])
        return plain_forward(*args)

    monkeypatch.setattr(eng, "_on_device", guard)
    monkeypatch.setattr(eng, "_forward", recorded)
    monkeypatch.setattr(eng, "_plan", lambda buf: None)  # each step through `_forward`, as on a GPU
    eng.prefill([prompt])
    buf = eng.buffers(1)
    buf.ids.fill_(LAYOUT.bin_range[0])
    buf.set_positions(torch.full((1, 1), prompt.numel()))
    eng.run(buf)
    assert seen == [True, True]


def _one_step_engine(rng):
    """An engine of one row, prefilled with a prompt, and its one-query buffers set for the next step."""
    prompt = _prompt(rng, 1)
    eng = InferenceEngine(_model(3), 1, prompt.numel() + 4, cuda_graphs=False)
    eng.prefill([prompt])
    buf = eng.buffers(1)
    buf.ids.fill_(LAYOUT.bin_range[0])
    buf.set_positions(torch.full((1, 1), prompt.numel()))
    return eng, buf


def test_a_step_captured_under_autocast_caches_no_casts_and_is_recaptured_when_autocast_changes(rng, monkeypatch):
    """Under CUDA autocast, a capture with autocast's weight-cast cache on records reads of cached casts that the
    caller's autocast block frees on exit (torch's make_graphed_callables refuses that cache); and a graph captured
    with autocast off (or at another dtype) replayed its old casts after autocast changed."""
    eng, buf = _one_step_engine(rng)
    fake = _FakeCuda(monkeypatch)
    eng.device, eng.cuda_graphs = torch.device("cuda:0"), True
    state = {"on": False, "dtype": torch.float16}
    enabled, dtype = torch.is_autocast_enabled, torch.get_autocast_dtype  # the CPU's stay as they are
    monkeypatch.setattr(torch, "is_autocast_enabled",
                        lambda *a: state["on"] if a == ("cuda",) else enabled(*a))
    monkeypatch.setattr(torch, "get_autocast_dtype", lambda d: state["dtype"] if d == "cuda" else dtype(d))
    entered = []

    class Autocast:  # records what the capture asks of autocast (CUDA autocast is off without a GPU)
        def __init__(self, device_type, dtype=None, enabled=True, cache_enabled=None):
            entered.append((device_type, dtype, enabled, cache_enabled))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(torch, "autocast", Autocast)
    eng.run(buf)
    eng.run(buf)
    assert len(fake.captures) == 1 and entered == []  # autocast off: captured once, as it is
    state.update(on=True, dtype=torch.bfloat16)
    eng.run(buf)
    eng.run(buf)
    assert len(fake.captures) == 2 and entered == [("cuda", torch.bfloat16, True, False)]
    state["dtype"] = torch.float16
    eng.run(buf)
    assert len(fake.captures) == 3 and entered[-1] == ("cuda", torch.float16, True, False)
    assert fake.replays == 5


def test_prompts_and_modes_given_in_another_form_are_named_with_the_fix(rng):
    """One prompt's ids as a Python list read as a list of prompts of one token each; `mode="release"` (a policy's
    mode) is the release's decoding, which has its own function."""
    model = _model(3)
    prompt = _prompt(rng, 1)
    with pytest.raises(ValueError, match=r"list of \d+ numbers: one prompt's ids go in a 1-D tensor, torch.tensor"):
        generate_action_chunk(model, prompt.tolist(), LAYOUT, 2, 3)
    with pytest.raises(ValueError, match="a list of prompts must hold 1-D id tensors"):
        generate_action_chunk(model, [prompt, prompt.view(1, -1)], LAYOUT, 2, 3)
    with pytest.raises(ValueError, match="generate_release_actions"):
        generate_action_chunk(model, prompt, LAYOUT, 2, 3, mode="release")
    with pytest.raises(ValueError, match="mode must be one of") as err:
        generate_action_chunk(model, prompt, LAYOUT, 2, 3, mode="beam")
    assert "generate_release_actions" not in str(err.value)


def test_a_list_of_prompts_with_some_scalars_is_not_read_as_one_prompts_ids(rng):
    """Only a list of numbers alone is one prompt's ids given as a list; a list of prompts with a scalar among them
    (a prompt lost its dimension) is named as a list of prompts that must hold 1-D tensors."""
    model = _model(3)
    prompt = _prompt(rng, 1)
    for mixed in ([prompt, torch.tensor(5)], [prompt, 3, 4], [torch.tensor(5), prompt]):
        with pytest.raises(ValueError, match="a list of prompts must hold 1-D id tensors") as err:
            generate_action_chunk(model, mixed, LAYOUT, 2, 3)
        assert "numbers" not in str(err.value)
    with pytest.raises(ValueError, match=r"input_ids is a list of 1 numbers"):
        generate_action_chunk(model, [7], LAYOUT, 2, 3)


def test_a_cached_prefix_and_the_padded_uncached_part_may_fill_the_cache_exactly(rng):
    """Row 0's cached prefix plus the batch's longest uncached part may take every slot, and its hidden states are
    a full prefill's; one slot more is refused naming the row and the slots, before anything is written."""
    model = _model(8)
    prompt = _prompt(rng, 1)
    n = prompt.numel()
    eng = InferenceEngine(model, 2, n)
    full = eng.prefill([prompt, prompt[:-1]])
    got = eng.prefill([prompt, prompt[:-1]], skip=[n - 3, n - 4])  # 3 uncached tokens each: n - 3 + 3 = n slots
    torch.testing.assert_close(got, full, rtol=1e-5, atol=1e-5)
    before = eng.cache.k.clone()
    with pytest.raises(ValueError, match=rf"row 0's cached prefix of {n - 3} tokens and the batch's longest uncached "
                                         rf"part \(4 tokens, .*\) need {n + 1} cache slots; the engine has {n}"):
        eng.prefill([prompt, prompt[:-1]], skip=[n - 3, n - 5])
    assert torch.equal(eng.cache.k, before)


def test_decoding_a_model_in_training_mode_warns_only_where_dropout_makes_it_random(rng):
    import warnings

    prompt = _prompt(rng, 1)
    for dropout, warns in ((0.1, True), (0.0, False)):
        model = WorldVLA(ModelConfig.tiny(LAYOUT, dropout=dropout)).init_weights(generator=torch.Generator().manual_seed(0))
        eng = InferenceEngine(model.train(), 1, prompt.numel())
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            eng.prefill([prompt])
        said = [str(w.message) for w in seen if issubclass(w.category, RuntimeWarning)]
        if warns:
            assert any(f"its dropout ({dropout}) makes the output random; call model.eval()" in s for s in said), said
        else:
            assert not any("dropout" in s for s in said), said


def test_a_row_prefix_of_a_negative_length_is_refused(rng):
    """n = -1 would copy every slot but the last (a slice from the end) rather than name the mistake."""
    model = _model(3)
    prompt = _prompt(rng, 1)
    eng = InferenceEngine(model, 1, prompt.numel())
    eng.prefill([prompt])
    with pytest.raises(ValueError, match=rf"n must be an integer in \[0, {prompt.numel()}\] \(the engine's slots\), got -1"):
        eng.row_prefix(0, -1)
    k, v = eng.row_prefix(0, 0)
    assert k.shape[1] == v.shape[1] == 0


def test_the_baseline_refuses_ids_outside_the_vocabulary_by_name(rng):
    """The cached forward skips the range check (the engine checks its prompts before prefill): the baseline checks
    its prompt itself, where an id past the vocabulary failed as an index error of the embedding."""
    model = _model(8)
    prompt = _prompt(rng, 1)
    for bad in (LAYOUT.vocab_size, -1):
        p = prompt.clone()
        p[3] = bad
        with pytest.raises(ValueError, match="token ids out of range"):
            baseline_generate_action_chunk(model, p, LAYOUT, 2, 3)


def test_a_cpu_engine_steps_as_many_rows_as_the_one_call_step_computes_alike(rng):
    """Where the CPU runs a step as one native call (backend auto), parallel decoding may put up to
    DECODE_STEP_MAX_QUERIES blocks in one step; layer by layer (backend torch) every row must go alone. A value of
    1 on the native path would keep the tokens but decode the parallel mode one block at a time."""
    pytest.importorskip("worldvla._C")
    model = _model(3)
    assert decoder_op.native_step_active(torch.float32)
    assert InferenceEngine(model, 1, 64).max_step_rows() == decoder_op.DECODE_STEP_MAX_QUERIES
    assert InferenceEngine(model, 1, 64, backend="torch").max_step_rows() == 1


def test_parse_action_blocks_takes_no_delimiter_as_a_value():
    """A run of D + 2 tokens from a BOA to an EOA is a block only if no BOA or EOA lies between: [BOA, b, EOA, EOA]
    holds a block of one value and a stray EOA, not an action whose second value is the EOA's id."""
    L, b = LAYOUT, LAYOUT.bin_base
    for toks in ([L.boa, b, L.eoa, L.eoa], [L.boa, L.boa, b, L.eoa], [L.boa, b, L.eoa, L.boa, b + 1, L.eoa]):
        assert parse_action_blocks(torch.tensor(toks), L, 2).tolist() == [], toks
    good = [L.boa, b, L.eoa, L.eoa, L.boa, b + 2, b + 3, L.eoa]
    assert parse_action_blocks(torch.tensor(good), L, 2).tolist() == [[L.boa, b + 2, b + 3, L.eoa]]


def test_a_prefill_refuses_a_model_converted_since_the_engine_was_built(rng):
    """An engine used directly (not through the decoders, which check first): its prefill refuses a model
    converted by `model.to(...)` since its cache was allocated, by name, instead of running it on the old cache."""
    model = _model(3)
    prompt = _prompt(rng, 1)
    eng = InferenceEngine(model, 1, prompt.numel() + 4)
    eng.prefill([prompt])
    model.to(torch.float64)
    with pytest.raises(ValueError, match=r"now torch.float64 .* build a new engine after model.to"):
        eng.prefill([prompt])


def test_a_step_before_any_prefill_checks_the_model_and_keeps_its_plan(rng):
    """Steps run on a restored cache without a prefill: the first one checks the model (a converted model is
    refused by name) and records it, so a later check of the unchanged model keeps the step's plan."""
    model = _model(3)
    prompt = _prompt(rng, 1)
    source = InferenceEngine(model, 1, prompt.numel() + 4)
    source.prefill([prompt])
    snap = source.snapshot_prefix([prompt.numel()])

    eng = InferenceEngine(model, 1, prompt.numel() + 4)
    eng.restore_prefix(snap)
    eng.set_kv_len([prompt.numel() + 1])
    buf = eng.buffers(1)
    buf.ids.fill_(LAYOUT.boa)
    buf.set_positions(torch.tensor([[prompt.numel()]]))
    eng.run(buf)
    plan = buf.plan
    assert not eng.check_model() and buf.plan is plan

    converted = InferenceEngine(model, 1, prompt.numel() + 4)
    model.to(torch.float64)
    with pytest.raises(ValueError, match=r"now torch.float64 .* build a new engine after model.to"):
        converted.run(converted.buffers(1))


def test_a_module_given_another_class_in_place_drops_the_steps_plans(rng):
    """A module whose class is swapped in place (an adapter that subclasses it, same object and weights) runs
    another forward: check_model sees it and drops the steps' plans, so the next step runs the new forward."""
    model = _model(3)
    prompt = _prompt(rng, 1)
    eng = InferenceEngine(model, 1, prompt.numel() + 4)
    eng.prefill([prompt])
    buf = eng.buffers(1)
    buf.ids.fill_(LAYOUT.boa)
    buf.set_positions(torch.tensor([[prompt.numel()]]))
    eng.set_kv_len([prompt.numel() + 1])
    before = eng.run(buf).clone()
    mlp = model.model.layers[0].mlp

    class Doubled(type(mlp)):
        def forward(self, *args, **kwargs):
            return 2 * super().forward(*args, **kwargs)

    mlp.__class__ = Doubled
    assert eng.check_model() and buf.plan is None
    modules = InferenceEngine(model, 1, prompt.numel() + 4, backend="torch")  # runs the modules as they are
    with torch.no_grad():
        modules.cache.k.copy_(eng.cache.k)
        modules.cache.v.copy_(eng.cache.v)
        modules.kv_block.copy_(eng.kv_block)
    want = modules.run(_copy_step(modules, buf)).clone()
    got = eng.run(buf).clone()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (got - before).abs().max() > 1e-3  # the doubled MLP changes the step's output


def _copy_step(eng, buf):
    mine = eng.buffers(buf.ids.shape[1])
    mine.ids.copy_(buf.ids)
    mine.set_positions(buf.pos)
    mine.q_limit.copy_(buf.q_limit)
    eng.set_kv_len(buf.meta.kv_len)
    return mine


def test_a_skip_list_of_fewer_rows_than_the_engine_is_refused(rng):
    """`skip` names a cached prefix per row: a list short of the engine's rows would leave the last rows'
    prompts unwritten (the rows are zipped), so it is refused by name."""
    model = _model(3)
    prompts = [_prompt(rng, 1), _prompt(rng, 1)]
    eng = InferenceEngine(model, 2, max(p.numel() for p in prompts) + 4)
    with pytest.raises(ValueError, match="skip gives cached prefixes for 1 rows; this engine holds 2"):
        eng.prefill(prompts, skip=[0])


def test_a_global_forward_pre_hook_drops_the_steps_plans(rng):
    """torch's global forward pre-hooks run before every module's forward, which a native plan would skip: one
    registered, or removed, since the plans were made is a changed model for check_model."""
    from torch.nn.modules.module import register_module_forward_pre_hook

    model = _model(3)
    prompt = _prompt(rng, 1)
    eng = InferenceEngine(model, 1, prompt.numel() + 4)
    eng.prefill([prompt])
    buf = eng.buffers(1)
    buf.plan = plan = object()  # stands for the step's native plan
    assert not eng.check_model() and buf.plan is plan
    handle = register_module_forward_pre_hook(lambda m, args: None)
    try:
        assert eng.check_model() and buf.plan is None
        buf.plan = plan
    finally:
        handle.remove()
    assert eng.check_model() and buf.plan is None


# ------------------------------------------------------------------ the inference engine's cache and its metadata
def _tiny_engine(batch_size=2, max_len=16, n_layers=2):
    from worldvla.inference import InferenceEngine
    from worldvla.model import ModelConfig, WorldVLA

    L = VocabLayout.compact(n_image_codes=64)
    cfg = ModelConfig.tiny(L)
    cfg.num_hidden_layers = n_layers
    model = WorldVLA(cfg).init_weights(0.5, generator=torch.Generator().manual_seed(0)).eval()
    return InferenceEngine(model, batch_size, max_len)


def test_a_prefix_snapshot_takes_one_length_per_row_within_the_cache():
    """A negative length sliced to `:-1`, a snapshot of every slot but the last; a length past the cache gave fewer
    slots than its lengths claim; lengths for fewer rows were kept as they were; none failed in max()."""
    eng = _tiny_engine()
    for lengths, what in (([-3, -1], r"lengths must lie in \[0, 16\].*got \[-3, -1\]"),
                          ([20, 4], r"lengths must lie in \[0, 16\].*got \[20, 4\]"),
                          ([5], r"one length per row \(2\), got 1"), ([], r"one length per row \(2\), got 0")):
        with pytest.raises(ValueError, match=what):
            eng.snapshot_prefix(lengths)
    snap = eng.snapshot_prefix([6, 4])
    assert snap.n_slots == 6 and snap.lengths == [6, 4]
    assert eng.snapshot_prefix([16, 0]).n_slots == 16


def test_restoring_keys_and_values_of_another_model_names_what_differs():
    """A snapshot or row prefix of a model with another number of layers (or heads, or head size) failed in torch's
    'The size of tensor a (3) must match the size of tensor b (2)'."""
    eng, other = _tiny_engine(), _tiny_engine(n_layers=3)
    snap = other.snapshot_prefix([4, 4])
    with pytest.raises(ValueError, match=r"prefix snapshot.*\(3, 2, 4, 2, 16\).*\(2, 2, 4, 2, 16\).*same model"):
        eng.restore_prefix(snap)
    k, v = other.row_prefix(0, 4)
    with pytest.raises(ValueError, match=r"row prefix.*\(3, 4, 2, 16\).*\(2, 4, 2, 16\).*same model"):
        eng.set_row_prefix(0, k, v)
    k, v = eng.row_prefix(1, 4)
    with pytest.raises(ValueError, match=r"keys \(4 slots\) and values \(3 slots\)"):
        eng.set_row_prefix(0, k, v[:, :3])
    eng.set_row_prefix(0, k, v)
    assert torch.equal(eng.cache.k[:, 0, :4], k) and torch.equal(eng.cache.v[:, 0, :4], v)
    eng.restore_prefix(eng.snapshot_prefix([3, 2]))


def test_an_engine_for_no_prompts_or_a_negative_token_count_is_refused():
    """No prompts failed in max() ('arg is an empty sequence'); a negative count of new tokens made an engine too
    small for its own prompts, refused only at the prefill."""
    from worldvla.inference.engine import engine_for

    eng = _tiny_engine()
    with pytest.raises(ValueError, match="at least one prompt"):
        engine_for(eng.model, [], 4)
    with pytest.raises(ValueError, match="new_tokens must be an integer >= 0, got -3"):
        engine_for(eng.model, [torch.arange(5)], -3)
    assert engine_for(eng.model, [torch.arange(5), torch.arange(3)], 0).max_len == 5


def test_kv_lengths_take_one_per_row_or_one_for_all():
    """Lengths for another number of rows failed in torch's broadcast error."""
    eng = _tiny_engine()
    with pytest.raises(ValueError, match=r"one length per row \(2\) or one for every row, got 3"):
        eng.set_kv_len([1, 2, 3])
    eng.set_kv_len([3, 5])
    assert eng.kv_len.tolist() == [3, 5]
    eng.set_kv_len(7)
    assert eng.kv_len.tolist() == [7, 7]


def test_engine_sizes_step_rows_and_cached_prefixes_must_be_whole_numbers():
    """A fractional max_len or a bool batch size failed in torch's 'argument size ... must be tuple of ints'; a
    fractional cached prefix (skip=2.7) was truncated to 2 without a word; a step of -1 rows failed in torch's
    'Dimension size must be non-negative'."""
    from worldvla.inference import InferenceEngine

    eng = _tiny_engine()
    for B, S, what in ((2, 10.5, "max_len"), (True, 10, "batch_size"), (2.0, 10, "batch_size")):
        with pytest.raises(TypeError, match=rf"{what} must be an integer, got {type(S if what == 'max_len' else B).__name__}"):
            InferenceEngine(eng.model, B, S)
    assert InferenceEngine(eng.model, np.int64(2), np.int64(10)).max_len == 10
    prompts = [torch.arange(4, 10), torch.arange(4, 8)]
    with pytest.raises(ValueError, match=r"skip\[0\] must be a whole number of tokens, got 2.7"):
        eng.prefill(prompts, skip=[2.7, 0])
    assert eng.prefill(prompts, skip=[2.0, np.int64(1)]).shape == (2, eng.model.config.hidden_size)
    for q in (0, -1):
        with pytest.raises(ValueError, match=rf"a decode step has at least one query row per sequence, got {q}"):
            eng.buffers(q)


def test_the_baseline_refuses_a_request_past_the_models_positions_before_decoding(rng):
    """`baseline_generate_action_chunk` decoded on past max_position_embeddings (to position 94 of a 90-position
    model), where `generate_release_actions` refuses the same request; it is refused now, before any step."""
    prompt = _prompt(rng, 1)
    P = prompt.numel()
    model = _model(5, ModelConfig.tiny(LAYOUT, max_position_embeddings=P + 4))
    lo, _ = LAYOUT.bin_range
    calls = []

    def bins(seq, logits):  # plain bin ids only: no block the mask could refuse, so decoding runs to the end
        calls.append(seq.numel())
        out = torch.full_like(logits, float("-inf"))
        out[lo] = 0.0
        return out

    assert baseline_generate_action_chunk(model, prompt, LAYOUT, 2, 3, max_new_tokens=4,
                                          logits_processor=bins).tokens.tolist() == [lo] * 4  # fills it exactly
    calls.clear()
    with pytest.raises(ValueError, match=rf"the prompt \({P} tokens\) and the 5 tokens to generate need {P + 5} "
                                         rf"positions, more than the model's max_position_embeddings {P + 4}; "
                                         "generate fewer tokens"):
        baseline_generate_action_chunk(model, prompt, LAYOUT, 2, 3, max_new_tokens=5, logits_processor=bins)
    with pytest.raises(ValueError, match=rf"the 11 tokens to generate need {P + 11} positions"):  # the default K(D+2)+1
        baseline_generate_action_chunk(model, prompt, LAYOUT, 2, 3, logits_processor=bins)
    assert calls == []
    with pytest.raises(ValueError, match=rf"the longest prompt \({P} tokens\) and the 5 tokens to generate need "
                                         rf"{P + 5} positions, more than the model's max_position_embeddings {P + 4}"):
        generate_release_actions(model, prompt, LAYOUT, 3, max_new_tokens=5)  # as the release's decoding refuses it


def test_an_empty_prompt_is_refused_as_one_without_the_separator(rng):
    """An empty prompt of integer ids is refused by name, not by an IndexError on its last id."""
    model = _model(8)
    empty = torch.empty(0, dtype=torch.long)
    with pytest.raises(ValueError, match=rf"prompt 0 must end with the separator id {LAYOUT.sep} \(the human turn's "
                                         r"end\); build it with SequenceBuilder.action_prompt"):
        generate_action_chunk(model, empty, LAYOUT, 2, 3)
    with pytest.raises(ValueError, match=rf"prompt 1 must end with the separator id {LAYOUT.sep}"):
        generate_action_chunk(model, [_prompt(rng, 1), empty], LAYOUT, 2, 3, mode="sequential")


def test_a_layout_of_another_vocabulary_is_refused_naming_the_models_own(rng):
    """A layout whose vocabulary is not the model's is refused as such, not as a prompt without the separator
    (its separator id is another one)."""
    model = _model(8)
    prompt = _prompt(rng, 1)
    for n_codes in (32, 128):
        other = VocabLayout.compact(n_image_codes=n_codes)
        with pytest.raises(ValueError, match=rf"the layout '{other.name}' has {other.vocab_size} ids but the model "
                                             rf"{model.config.vocab_size}: pass the model's own layout"):
            generate_action_chunk(model, prompt, other, 2, 3)


def test_a_prefill_resets_the_metadata_past_each_prompt_whatever_was_decoded_there(rng):
    """A prefill writes each prompt's block ordinals, its last token's too (a block left open: later blocks must not
    see it), NO_BLOCK in every slot past the prompt (where an earlier chunk wrote its blocks' ordinals), and each
    row's prompt length as kv_len."""
    from worldvla.mask import NO_BLOCK

    model, D = _model(8), 3
    block = lambda: torch.cat([torch.tensor([LAYOUT.boa]), LAYOUT.bin_base + torch.randint(0, 8, (D,), generator=rng),
                               torch.tensor([LAYOUT.eoa])])
    first = _prompt(rng, 1)
    # a block before the separator; a block left open at the end (as the release's free decoding may be prompted)
    prompts = [torch.cat([first[:-1], block(), first[-1:]]), torch.cat([_prompt(rng, 2), block()[:2]])]
    eng = InferenceEngine(model, 2, max(p.numel() for p in prompts) + 2 * (D + 2) + 1)
    eng.kv_block.fill_(1)  # as a chunk decoded before leaves its blocks' ordinals
    eng.kv_len.fill_(eng.max_len)
    eng.prefill(prompts)
    for b, p in enumerate(prompts):
        assert eng.kv_block[b, :p.numel()].tolist() == chunk_mask_meta(p, LAYOUT).kv_block.tolist()
        assert (eng.kv_block[b, p.numel():] == NO_BLOCK).all()
    assert eng.kv_len.tolist() == [p.numel() for p in prompts]
    assert (eng.kv_block[0] == 0).sum() == D + 2
    assert eng.kv_block[1, len(prompts[1]) - 2:len(prompts[1])].tolist() == [0, 0]  # the open block's BOA and bin


def test_a_steps_buffers_move_their_slots_and_positions_together_by_any_number_of_tokens():
    """advance(n) moves both the cache slots a step writes and its queries' positions (what each query sees) n on."""
    eng = InferenceEngine(_model(8), 3, 16)
    buf = eng.buffers(2)
    buf.set_positions(torch.tensor([[0, 1], [4, 5], [8, 9]]))
    buf.advance(3)
    assert buf.pos.tolist() == buf.q_pos.tolist() == [[3, 4], [7, 8], [11, 12]]



def test_fractional_rows_lengths_and_token_counts_are_refused_by_name():
    """snapshot_prefix cut a length of 2.5 to a prefix of 2 slots without a word; row_prefix with 2.5 failed in
    torch's slicing, a row of 0.5 named no argument, and engine_for's 2.5 new tokens was refused as 'max_len must be
    an integer', an argument the caller never gave."""
    from worldvla.inference.engine import engine_for

    eng = _tiny_engine()
    with pytest.raises(ValueError, match=r"prefix lengths must be integers \(slots\), got \[2.5, 2\]"):
        eng.snapshot_prefix([2.5, 2])
    with pytest.raises(ValueError, match=r"prefix lengths must be integers \(slots\), got \[True, 2\]"):
        eng.snapshot_prefix([True, 2])
    with pytest.raises(ValueError, match=r"n must be an integer in \[0, \d+\] \(the engine's slots\), got 2.5"):
        eng.row_prefix(0, 2.5)
    with pytest.raises(ValueError, match=r"row must be an integer in \[0, 2\) \(the engine's batch rows\), got 0.5"):
        eng.row_prefix(0.5, 2)
    with pytest.raises(ValueError, match=r"new_tokens must be an integer >= 0, got 2.5"):
        engine_for(eng.model, [torch.arange(5)], 2.5)
    assert eng.snapshot_prefix([3, 2]) is not None and eng.row_prefix(1, 3)[0].shape[1] == 3


def test_a_tuple_of_prompts_decodes_as_the_list_of_them(rng):
    """A tuple of prompts of different lengths is a batch like a list of them: each row its prompt's chunk."""
    model = _model(0)
    prompts = (_prompt(rng, 1), _prompt(rng, 1, grid=(2, 2)))
    got = generate_action_chunk(model, prompts, LAYOUT, 2, 3)
    assert got.shape == (2, 2, 5)
    assert torch.equal(got, generate_action_chunk(model, list(prompts), LAYOUT, 2, 3))
    for r, p in enumerate(prompts):
        assert torch.equal(got[r], generate_action_chunk(model, p, LAYOUT, 2, 3, mode="sequential"))


@torch.no_grad()
def test_head_sample_draws_with_the_given_noise_whatever_the_head(rng):
    """`gumbel` (the frame decoder's noise) reaches the draw on both paths of head_sample: the fused sampler on
    lm_head's weight and a head that is more than its weight (a forward hook here). Tokens are
    argmax(logits + T * gumbel) over the top_k, offset by lo, not a draw of noise of their own."""
    from worldvla.inference.chunk import head_sample

    model = _model(0)
    lo, hi = LAYOUT.bin_range
    h = torch.randn(16, model.config.hidden_size, generator=rng)
    g = -torch.log(-torch.log(torch.rand(16, hi - lo, generator=rng)))
    logits = h @ model.lm_head.weight[lo:hi].t()
    kth = torch.topk(logits, 3, dim=-1).values[:, -1:]
    want = {None: (logits + 5.0 * g).argmax(-1) + lo,
            3: (logits + 5.0 * g).masked_fill(logits < kth, float("-inf")).argmax(-1) + lo}
    assert not torch.equal(want[None], logits.argmax(-1) + lo)  # the noise changes the choice
    for hooked in (False, True):
        hook = model.lm_head.register_forward_hook(lambda mod, inp, out: None) if hooked else None
        for top_k, tokens in want.items():
            torch.manual_seed(1)  # noise drawn in place of `gumbel` would come from here
            assert torch.equal(head_sample(model, h, lo, hi, 5.0, top_k, gumbel=g), tokens), (hooked, top_k)
        if hook is not None:
            hook.remove()


def test_sampling_backend_keeps_a_backend_with_the_sampler_and_else_takes_auto():
    """A backend that implements constrained sampling samples the chunk; one that does not (Triton's attention
    without its sampler) leaves the sampling to "auto" instead of failing on an op it lacks."""
    from worldvla.inference.chunk import sampling_backend

    have = dispatch.available("constrained_sample")
    assert "torch" in have
    for backend in dispatch.BACKENDS:
        assert sampling_backend(backend) == (backend if backend in have else "auto")
    assert sampling_backend("auto") == "auto"


def test_a_step_whose_capture_fails_runs_eagerly_from_then_on(rng, monkeypatch):
    """A backend that cannot be captured (it syncs or allocates on the host) warns once and runs its steps
    eagerly: the engine does not try, fail and warn again at every later step."""
    eng, buf = _one_step_engine(rng)
    with torch.no_grad():
        want = eng._forward(buf.ids, buf.pos, buf.meta).clone()
    fake = _FakeCuda(monkeypatch)
    tries = []

    def uncapturable(*args, **kwargs):
        tries.append(1)
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(torch.cuda, "graph", uncapturable)
    eng.device, eng.cuda_graphs = torch.device("cuda:0"), True
    with pytest.warns(RuntimeWarning, match="capture of the decode step failed.*running eagerly") as caught:
        for _ in range(3):
            torch.testing.assert_close(eng.run(buf), want, rtol=0, atol=0)
    assert len(tries) == 1 and len([w for w in caught if w.category is RuntimeWarning]) == 1
    assert eng.cuda_graphs is False and buf.graph is None and fake.replays == 0


def test_a_prefix_snapshot_of_every_slot_is_restored(rng):
    """snapshot_prefix takes lengths up to the engine's slots: a snapshot of all of them restores into an engine of
    as many slots (and rows), giving back every key and value."""
    eng = _tiny_engine()
    k, v = torch.randn(eng.cache.k.shape, generator=rng), torch.randn(eng.cache.v.shape, generator=rng)
    eng.cache.k.copy_(k)
    eng.cache.v.copy_(v)
    snap = eng.snapshot_prefix([16, 16])
    eng.cache.k.zero_()
    eng.cache.v.zero_()
    eng.restore_prefix(snap)
    assert torch.equal(eng.cache.k, k) and torch.equal(eng.cache.v, v)


def test_a_row_past_the_engines_last_is_refused_by_name(rng):
    """Row `batch_size` is one past the last: row_prefix and set_row_prefix name the rows there are rather than
    fail in torch's indexing."""
    eng = _tiny_engine(batch_size=2)
    k, v = eng.row_prefix(1, 4)
    for call in (lambda: eng.row_prefix(2, 4), lambda: eng.set_row_prefix(2, k, v)):
        with pytest.raises(ValueError, match=r"row must be an integer in \[0, 2\) \(the engine's batch rows\), got 2"):
            call()


def test_causal_mode_lets_the_generated_actions_see_the_prompts_own_action_blocks(rng):
    """mode="causal" hides nothing from the generated tokens: a chunk-trained model's prompt with action blocks after
    its last image is prefilled under the chunk rule, and every generated token attends to those blocks too. The
    reference recomputes the whole sequence with the chunk rule's metadata for the prompt and no limit after it."""
    model = _model(7)
    b = _builder(dim=3)
    prompt = torch.cat([_prompt(rng, 1)[:-1], b.actions.encode(torch.rand(2, 3, generator=rng) * 2 - 1).flatten(),
                        torch.tensor([LAYOUT.sep])])
    P, K, D = prompt.numel(), 3, 3

    def reference(hide_prompt_blocks):
        def meta_of(seq):
            meta = chunk_mask_meta(seq, LAYOUT)
            meta.q_limit[P:] = 2 if hide_prompt_blocks else -1  # the prompt holds blocks 0 and 1
            return meta

        return _full_recompute_chunk(model, prompt, K, D, meta_of=meta_of)

    want = reference(False)
    assert not torch.equal(want, reference(True))  # the prompt's blocks change the greedy bins
    assert torch.equal(generate_action_chunk(model, prompt, LAYOUT, K, D, mode="causal"), want)
    assert torch.equal(generate_action_chunk(model, [prompt, _prompt(rng, 2)], LAYOUT, K, D, mode="causal")[0], want)


def test_the_structure_processor_keeps_only_the_ids_each_chunk_position_may_take():
    """At a bin position only the bin ids [lo, hi) keep their logits (the ids just outside stay -inf); BOA, EOA and,
    after the K blocks, the separator are the only ids left at their positions."""
    K, D, P = 2, 3, 11
    T, (lo, hi) = D + 2, LAYOUT.bin_range
    proc = chunk_structure_processor(LAYOUT, P, K, D)
    logits = torch.arange(LAYOUT.vocab_size, dtype=torch.float32)
    for j in range(K * T + 1):
        out = proc(torch.zeros(P + j, dtype=torch.long), logits.clone())
        finite = torch.isfinite(out).nonzero().flatten().tolist()
        if j == K * T:
            assert finite == [LAYOUT.sep], j
        elif j % T == 0:
            assert finite == [LAYOUT.boa], j
        elif j % T == T - 1:
            assert finite == [LAYOUT.eoa], j
        else:
            assert finite == list(range(lo, hi)), j
            assert torch.equal(out[lo:hi], logits[lo:hi])


def test_the_release_prefill_gives_the_model_its_attention_backend_back(rng):
    """release_prefill runs the release's dense-mask attention on the "torch" backend and puts the model's own backend
    back afterwards, also when the prefill raises."""
    from worldvla.inference.baseline import release_prefill

    model = _model(8)
    prompt = _prompt(rng, 1)
    model.attn_backend = "native"
    k, v, h = release_prefill(model, prompt, LAYOUT)
    assert model.attn_backend == "native"
    assert k.shape[:2] == (model.config.num_hidden_layers, prompt.numel()) and h.shape == (model.config.hidden_size,)
    bad = torch.cat([prompt[:-1], torch.tensor([LAYOUT.boa, LAYOUT.boa, LAYOUT.sep])])  # a BOA inside an open block
    with pytest.raises(ValueError):
        release_prefill(model, bad, LAYOUT)
    assert model.attn_backend == "native"


def test_a_release_prefill_with_a_whole_row_recomputes_every_rows_cached_prefix(rng):
    """Where one row of a release prefill is computed whole (its prompt hides an earlier block), every row is:
    the cached prefixes `skip` names are recomputed, so a row whose cache holds something else than its prefix
    still gets its prompt's hidden state, for rows of different lengths."""
    model = _model(3)
    b = LAYOUT.bin_base
    blocks = [LAYOUT.boa, b, b + 1, LAYOUT.eoa, LAYOUT.boa, b + 2, b + 3, LAYOUT.eoa]
    whole = torch.cat([_prompt(rng, 1), torch.tensor(blocks)])
    other = torch.cat([_prompt(rng, 1), _prompt(rng, 1)])
    assert int(chunk_mask_meta(whole, LAYOUT, release_pairing=True).q_limit.max()) >= 1
    n = max(whole.numel(), other.numel()) + 2
    ref = InferenceEngine(model, 2, n).prefill([whole, other], release=True)
    eng = InferenceEngine(model, 2, n)
    with torch.no_grad():
        eng.cache.k.normal_()
        eng.cache.v.normal_()
    got = eng.prefill([whole, other], skip=[0, 4], release=True)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def _stand_in_plan(copies):
    from types import SimpleNamespace

    return SimpleNamespace(copies=copies, step=object())


def test_weights_updated_in_place_drop_only_the_plans_that_hold_copies_of_them(rng):
    """An in-place weight update (a version counter moves) leaves a plan that reads the weights by address as it is
    and drops one holding copies of them; drop_weight_copies drops the same ones and keeps the others."""
    model = _model(3)
    prompt = _prompt(rng, 1)
    eng = InferenceEngine(model, 1, prompt.numel() + 4)
    eng.prefill([prompt])
    reads, copies = eng.buffers(1), eng.buffers(2)
    reads.plan, copies.plan = by_address, copied = _stand_in_plan([]), _stand_in_plan(["q_proj"])
    assert not eng.check_model() and reads.plan is by_address and copies.plan is copied
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(1.0)
    assert eng.check_model()
    assert reads.plan is by_address and copies.plan is None
    copies.plan = copied
    eng.drop_weight_copies()
    assert reads.plan is by_address and copies.plan is None


def test_all_step_sizes_capture_into_one_memory_pool(rng, monkeypatch):
    """The decode steps' CUDA graphs of every query count share the engine's one memory pool (the handle taken
    once, at the first capture), as their outputs' shared pool is documented."""
    import itertools

    model = _model(3)
    prompt = _prompt(rng, 1)
    eng = InferenceEngine(model, 1, prompt.numel() + 4, cuda_graphs=False)
    eng.prefill([prompt])
    for q in (1, 2, 3):
        buf = eng.buffers(q)
        buf.ids.fill_(LAYOUT.bin_range[0])
        buf.set_positions(torch.full((1, q), prompt.numel()) + torch.arange(q))
    fake = _FakeCuda(monkeypatch)
    handles = itertools.count()
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: ("pool", next(handles)))
    eng.device, eng.cuda_graphs = torch.device("cuda:0"), True  # as an engine of a model on a GPU
    for q in (1, 2, 3, 1):
        eng.run(eng.buffers(q))
    assert [c["pool"] for c in fake.captures] == [("pool", 0)] * 3


def test_a_plan_refused_with_gradients_off_is_not_rebuilt_at_every_step(rng, monkeypatch):
    """A step's native plan that refused (no step) while gradients were on is built again once they are off; one
    that refused with gradients off stays refused: later steps run layer by layer without building it again."""
    from types import SimpleNamespace

    from worldvla.inference import engine as engine_mod

    built = []

    def refusing_plan(*args):
        built.append(torch.is_grad_enabled())
        return SimpleNamespace(step=None, copies=[])

    monkeypatch.setattr(engine_mod, "native_step_active", lambda dtype: True)
    monkeypatch.setattr(engine_mod, "DecodeStepPlan", refusing_plan)
    model = _model(3)
    prompt = _prompt(rng, 1)
    eng = InferenceEngine(model, 1, prompt.numel() + 4, backend="auto")
    eng.prefill([prompt])
    buf = eng.buffers(1)
    buf.ids.fill_(LAYOUT.bin_range[0])
    buf.set_positions(torch.tensor([[prompt.numel()]]))
    with torch.enable_grad():
        assert eng.step_plan(1) is None
    assert built == [True]
    with torch.no_grad():  # as a step runs
        want = eng._forward(buf.ids, buf.pos, buf.meta).clone()
    for _ in range(3):
        torch.testing.assert_close(eng.run(buf), want, rtol=0, atol=0)
    assert built == [True, False]


# ---------------------------------------------------------------------------------- chunk edges and arguments
def test_rows_with_different_numbers_of_earlier_blocks_each_take_their_own_ordinals(rng):
    """In a batch, each row's generated blocks are numbered after its own prompt's blocks: a row whose prompt holds
    two action blocks beside a row whose prompt holds none decodes as it does alone (and as a full recompute under
    the chunk rule), in both chunk modes, whichever row comes first."""
    model = _model(7)
    b = _builder(dim=3)
    plain = _prompt(rng, 1)
    blocks = torch.cat([_prompt(rng, 1)[:-1], b.actions.encode(torch.rand(2, 3, generator=rng) * 2 - 1).flatten(),
                        torch.tensor([LAYOUT.sep])])
    K, D = 3, 3
    want = {id(p): _full_recompute_chunk(model, p, K, D) for p in (plain, blocks)}

    def nothing_hidden(seq):
        meta = chunk_mask_meta(seq, LAYOUT)
        meta.q_limit.fill_(-1)
        return meta

    # hiding the prompt's blocks changes the bins, so a row numbered as the other row would decode otherwise
    assert not torch.equal(want[id(blocks)], _full_recompute_chunk(model, blocks, K, D, meta_of=nothing_hidden))
    for pair in ((plain, blocks), (blocks, plain)):
        for mode in ("parallel", "sequential"):
            got = generate_action_chunk(model, list(pair), LAYOUT, K, D, mode=mode)
            for r, p in enumerate(pair):
                assert torch.equal(got[r], want[id(p)]), (mode, r)


@torch.no_grad()
def test_head_sample_draws_from_the_given_generator_whatever_the_head(rng):
    """Without noise given, a draw at a temperature above zero comes from `generator`, on the fused sampler and on a
    head that is more than its weight: the same seed gives the same tokens whatever torch's global seed, another
    seed other tokens."""
    from worldvla.inference.chunk import head_sample

    model = _model(0)
    lo, hi = LAYOUT.bin_range
    h = torch.randn(32, model.config.hidden_size, generator=rng)
    for hooked in (False, True):
        hook = model.lm_head.register_forward_hook(lambda mod, inp, out: None) if hooked else None
        draws = []
        for global_seed, seed in ((1, 7), (2, 7), (1, 8)):
            torch.manual_seed(global_seed)
            draws.append(head_sample(model, h, lo, hi, 5.0, None, torch.Generator().manual_seed(seed)))
        assert ((draws[0] >= lo) & (draws[0] < hi)).all()
        assert torch.equal(draws[0], draws[1]), hooked
        assert not torch.equal(draws[0], draws[2]), hooked
        if hook is not None:
            hook.remove()


def test_make_engine_sizes_for_the_longest_prompts_chunk_and_hands_on_its_options(rng):
    """make_engine gives a row per prompt and the longest prompt's chunk of slots (K(D+2)+1 after it), with the
    attention backend and the CUDA-graph choice it is given: graphs asked for without CUDA are refused."""
    from worldvla.inference.chunk import make_engine

    model = _model(3)
    prompts = [_prompt(rng, 1), _prompt(rng, 2)]
    eng = make_engine(model, prompts, 3, 4, LAYOUT, backend="torch", cuda_graphs=False)
    assert (eng.batch_size, eng.max_len) == (2, max(p.numel() for p in prompts) + 3 * 6 + 1)
    assert eng.backend == "torch" and eng.cuda_graphs is False
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="cuda_graphs"):
            make_engine(model, prompts, 3, 4, LAYOUT, cuda_graphs=True)


def test_an_engine_of_another_number_of_rows_is_refused_naming_both_counts(rng):
    """A given engine must hold exactly one row per prompt: more rows than prompts are refused as fewer are, by the
    counts, before its cache is written."""
    model = _model(3)
    prompts = [_prompt(rng, 1), _prompt(rng, 2)]
    size = max(p.numel() for p in prompts) + 2 * 5 + 1
    for rows in (1, 3):
        eng = InferenceEngine(model, rows, size)
        for mode in ("parallel", "sequential", "causal"):
            with pytest.raises(ValueError, match=f"the engine holds {rows} sequences but got 2 prompts"):
                generate_action_chunk(model, prompts, LAYOUT, 2, 3, mode=mode, engine=eng)
        assert not eng.cache.k.any()


def test_a_batch_of_one_prompt_keeps_its_batch_dimension(rng):
    """A [1, P] tensor or a list of one prompt is a batch: [1, K, D+2] comes back, where a [P] prompt gives [K, D+2];
    the chunk is the same. One action of one bin (K = D = 1) is the smallest chunk."""
    model = _model(3)
    prompt = _prompt(rng, 1)
    for K, D in ((2, 3), (1, 1)):
        want = generate_action_chunk(model, prompt, LAYOUT, K, D)
        assert want.shape == (K, D + 2)
        for batch in (prompt.view(1, -1), [prompt]):
            for mode in ("parallel", "sequential"):
                got = generate_action_chunk(model, batch, LAYOUT, K, D, mode=mode)
                assert got.shape == (1, K, D + 2) and torch.equal(got[0], want), (K, D, mode)


def test_a_causally_trained_model_is_refused_in_every_chunk_mode_naming_the_causal_one(rng):
    """A model trained with plain causal attention decodes only in mode="causal": "parallel" and "sequential" (both
    under the chunk mask it never saw) are refused, before a given engine's cache is written."""
    model = WorldVLA(ModelConfig.tiny(LAYOUT, attention="causal")).eval()
    prompt = _prompt(rng, 1)
    for mode in ("parallel", "sequential"):
        engine = InferenceEngine(model, 1, prompt.numel() + 2 * 5 + 1)
        with pytest.raises(ValueError, match="trained with plain causal attention.*mode='causal'"):
            generate_action_chunk(model, prompt, LAYOUT, 2, 3, mode=mode, engine=engine)
        assert not engine.cache.k.any(), mode
    assert generate_action_chunk(model, prompt, LAYOUT, 2, 3, mode="causal").shape == (2, 5)


def test_a_skip_naming_a_cached_prefix_in_any_row_needs_the_engine_that_holds_it(rng):
    """Without an engine, `skip` may name no cached tokens in any row: a prefix named for a later row (the first
    row's 0) is refused as one for the first row is, since a fresh engine holds no keys for it."""
    model = _model(3)
    prompts = [_prompt(rng, 1), _prompt(rng, 2)]
    for skip in ([0, 3], [3, 0]):
        with pytest.raises(ValueError, match="pass that engine"):
            generate_action_chunk(model, prompts, LAYOUT, 2, 3, skip=skip)
    assert torch.equal(generate_action_chunk(model, prompts, LAYOUT, 2, 3, skip=[0, 0]),
                       generate_action_chunk(model, prompts, LAYOUT, 2, 3))


@torch.no_grad()
def test_the_baseline_chooses_over_the_whole_vocabulary_up_to_its_last_id(rng):
    """The release's decoder takes the greedy choice over every id, at the prefill's last position and at each step
    after it: a head that favours the vocabulary's last id gives that id every time."""
    model = _model(2)
    last = model.config.vocab_size - 1
    for layer in model.model.layers:  # every hidden state the same vector, seen only by the last id's row
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
    model.model.embed_tokens.weight[:, 0] = 5.0
    model.model.norm.weight.fill_(1.0)
    model.lm_head.weight[last] = 0.0
    model.lm_head.weight[last, 0] = 100.0
    out = baseline_generate_action_chunk(model, _prompt(rng, 1), LAYOUT, 2, 3, max_new_tokens=3)
    assert out.tokens.tolist() == [last] * 3 and out.actions.shape == (0, 5)


def test_the_baseline_refuses_a_batch_of_no_prompt_by_its_size(rng):
    """The release's decoder runs one prompt: a [0, P] batch is refused as a batch of 0 prompts, as [2, P] is of 2."""
    model = _model(2)
    prompt = _prompt(rng, 1)
    for batch, n in ((prompt.view(1, -1)[:0], 0), (torch.stack([prompt, prompt]), 2)):
        with pytest.raises(ValueError, match=f"the release's decoder runs batch size 1 only, got {n} prompts"):
            baseline_generate_action_chunk(model, batch, LAYOUT, 2, 3)
    assert torch.equal(baseline_generate_action_chunk(model, prompt.view(1, -1), LAYOUT, 2, 3, max_new_tokens=4).tokens,
                       baseline_generate_action_chunk(model, prompt, LAYOUT, 2, 3, max_new_tokens=4).tokens)
