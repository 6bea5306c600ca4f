"""The release's free greedy action decoding on the engine (inference/release.py) against the release's
procedure itself (the baseline: growing cache, dense mask rebuilt at every token), on random small models."""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from worldvla import ActionTokenizer, SequenceBuilder, VocabLayout
from worldvla.inference import baseline_generate_action_chunk, generate_action_chunk
from worldvla.inference.baseline import chunk_structure_processor, release_prefill
from worldvla.inference.release import generate_release_actions, release_engine
from worldvla.model import ModelConfig, WorldVLA
from worldvla.tokens import ByteTextTokenizer

sys.path.insert(0, str(Path(__file__).parent))
from test_inference import always_separator  # noqa: E402

LAYOUT = VocabLayout.compact(n_image_codes=64)
D = 4


def _model(seed):
    g = torch.Generator().manual_seed(seed)
    return WorldVLA(ModelConfig.tiny(LAYOUT)).init_weights(0.5, generator=g).eval()


def _prompts(rng, n, n_images=2):
    builder = SequenceBuilder(LAYOUT, ByteTextTokenizer(LAYOUT), ActionTokenizer(LAYOUT, [-1.0] * D, [1.0] * D))
    return [builder.action_prompt(f"task {i}" * (1 + i), [torch.randint(0, 64, (4, 4), generator=rng)
                                                          for _ in range(n_images)]) for i in range(n)]


def _biased_to_blocks(model, strength=6.0, nxt=None):
    """Make the model write action blocks by itself: its layers' outputs scaled down, so the last hidden state
    is mostly the last token's embedding, and lm_head rows that map it to the next token of a block
    (separator or EOA -> BOA -> D bins -> EOA), so that the fast path meets blocks without a logits processor."""
    lo = LAYOUT.bin_range[0]
    chain = [LAYOUT.boa, *range(lo, lo + D), LAYOUT.eoa]
    nxt = nxt or {LAYOUT.sep: LAYOUT.boa, **{a: b for a, b in zip(chain, chain[1:])}, LAYOUT.eoa: LAYOUT.boa}
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.mul_(0.003)
            layer.mlp.down_proj.weight.mul_(0.003)
        E = model.model.embed_tokens.weight
        for t, n in nxt.items():
            model.lm_head.weight[n] += strength * E[t] / E[t].norm()
    return model


@pytest.mark.parametrize("seed,biased", [(0, False), (1, False), (2, True), (3, True)])
def test_equals_the_release_procedure(rng, seed, biased):
    """Batched on the engine, each prompt's tokens and blocks are the release baseline's, prompt by prompt."""
    model = _model(seed)
    if biased:
        model = _biased_to_blocks(model)
    prompts = _prompts(rng, 3)
    got = generate_release_actions(model, prompts, LAYOUT, D, max_new_tokens=40)
    for p, g in zip(prompts, got):
        try:
            want = baseline_generate_action_chunk(model, p, LAYOUT, 1, D, max_new_tokens=40)
        except ValueError as err:  # the baseline's mask refuses malformed blocks: the fast path stopped there
            assert "malformed" in str(err) and g.malformed
            continue
        assert not g.malformed and torch.equal(g.tokens, want.tokens) and torch.equal(g.actions, want.actions)
        assert g.fails_after == want.fails_after
    if biased:  # the fast path met action blocks, not only free text
        assert sum(g.actions.shape[0] for g in got) > 0


def test_with_the_structure_processor_equals_sequential(rng):
    """Forced into the chunk's structure, the release's decoding gives the constrained sequential decoder's
    tokens: the chunk rule of the blocks it writes is the one the structured decoder applies."""
    model = _model(4)
    for K, n_images in ((3, 1), (2, 2)):
        p = _prompts(rng, 1, n_images)[0]
        proc = chunk_structure_processor(LAYOUT, p.numel(), K, D)
        got = generate_release_actions(model, p, LAYOUT, D, logits_processor=proc)[0]
        assert torch.equal(got.tokens, baseline_generate_action_chunk(model, p, LAYOUT, K, D, logits_processor=proc).tokens)
        assert torch.equal(got.actions, generate_action_chunk(model, p, LAYOUT, K, D, mode="sequential"))


def test_stops_at_the_separator_and_on_its_engine(rng):
    model = _model(5)
    prompts = _prompts(rng, 2)
    engine = release_engine(model, prompts, 12)
    first = generate_release_actions(model, prompts, LAYOUT, D, 12, engine=engine)
    again = generate_release_actions(model, prompts, LAYOUT, D, 12, engine=engine)  # the engine reused
    assert [g.tokens.tolist() for g in first] == [g.tokens.tolist() for g in again]
    assert all(0 < g.tokens.numel() <= 12 for g in first)
    out = generate_release_actions(always_separator(model, LAYOUT), prompts, LAYOUT, D, 12)
    assert [g.tokens.tolist() for g in out] == [[LAYOUT.sep]] * 2 and all(g.actions.shape == (0, D + 2) for g in out)


def test_stops_at_a_malformed_block(rng):
    """A BOA inside an open block: the chunk rule is not defined there (the baseline's mask refuses the
    sequence); the sequence stops before it, its complete blocks kept."""
    lo = LAYOUT.bin_range[0]
    model = _biased_to_blocks(_model(8), nxt={LAYOUT.sep: LAYOUT.boa, LAYOUT.boa: lo, lo: LAYOUT.boa})
    (got,) = generate_release_actions(model, _prompts(rng, 1)[0], LAYOUT, D, 20)
    assert got.malformed and got.tokens.tolist() == [LAYOUT.boa, lo] and got.actions.shape == (0, D + 2)
    with pytest.raises(ValueError, match="malformed"):
        baseline_generate_action_chunk(model, _prompts(rng, 1)[0], LAYOUT, 1, D, max_new_tokens=20)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", ["auto", "native", "torch"])
def test_a_half_precision_choice_rounds_its_logits_as_the_release(dtype, backend):
    """Logits 20.0 and 20.0625 (float32 sums) round to one bfloat16 value: the release takes the first of
    the two ids, where a float32-summing kernel would take the second. (float16 rounds 2050 and 2050.5
    alike.) The release's choice is the argmax of the head's logits in the model's dtype, on every backend."""
    from worldvla.inference.chunk import head_sample
    from worldvla.inference.release import release_choice

    model = _model(0).to(dtype)
    H, V = model.config.hidden_size, model.config.vocab_size
    big = 20.0 if dtype == torch.bfloat16 else 2050.0
    with torch.no_grad():
        model.lm_head.weight.zero_()
        model.lm_head.weight[5, 0] = big
        model.lm_head.weight[200, :2] = torch.tensor([big, 0.0625 if dtype == torch.bfloat16 else 0.5])
    h = torch.zeros(1, H, dtype=dtype)
    h[0, :2] = 1.0
    with torch.no_grad():  # as generate_release_actions runs
        logits = model.lm_head(h).float()[0]
        assert logits[5] == logits[200] and int(logits.argmax()) == 5  # the release's computation
        assert int(head_sample(model, h, 0, V, backend="native")) == 200  # float32 sums: no tie
        assert int(release_choice(model, h, backend)) == 5


def test_errors(rng):
    model = _model(6)
    prompts = _prompts(rng, 2)
    with pytest.raises(ValueError, match="max_new_tokens must be an integer >= 1, got 0"):
        generate_release_actions(model, prompts, LAYOUT, D, 0)
    with pytest.raises(ValueError, match="cache slots"):
        generate_release_actions(model, prompts, LAYOUT, D, 50, engine=release_engine(model, prompts, 10))
    causal = WorldVLA(ModelConfig.tiny(LAYOUT, attention="causal")).eval()
    with pytest.raises(ValueError, match="plain causal"):
        generate_release_actions(causal, prompts, LAYOUT, D)


def test_policy_release_mode(tmp_path, rng):
    """WorldVLAPolicy(mode="release"): each environment's actions are the blocks the release's procedure finds
    for the policy's prompt, decoded; chunks of different lengths come back as a list."""
    from worldvla.inference import WorldVLAPolicy
    from worldvla.vqgan import VQGAN, VQGANConfig, preprocess

    model = _biased_to_blocks(_model(7))
    torch.manual_seed(0)
    vq = VQGAN(VQGANConfig(ch=32, ch_mult=(1, 1, 1, 1, 1), num_res_blocks=1, z_channels=32, embed_dim=32,
                           n_embed=64)).eval()
    at = ActionTokenizer(LAYOUT, [-1.0] * D, [1.0] * D)
    policy = WorldVLAPolicy(model, vq, at, chunk_size=3, image_size=64, mode="release", max_new_tokens=30)
    frames = torch.randint(0, 256, (3, 64, 64, 3), generator=rng, dtype=torch.uint8).numpy()
    instructions = ["open the drawer", "push", "pick up the cup"]
    policy.reset(instructions)
    out = policy.act(frames, history=None)
    chunks = out if isinstance(out, list) else list(out)
    builder = SequenceBuilder(LAYOUT, ByteTextTokenizer(LAYOUT), at)
    for ins, f, chunk in zip(instructions, frames, chunks):
        prompt = builder.action_prompt(ins, [vq.encode(preprocess(f))[0]])
        try:
            want = baseline_generate_action_chunk(model, prompt, LAYOUT, 1, D, max_new_tokens=30).actions
        except ValueError:
            continue  # malformed: the baseline's mask refuses it
        assert np.array_equal(chunk, at.decode(want.numpy()).astype(np.float32).reshape(-1, D))
    assert sum(c.shape[0] for c in chunks) > 0
    with pytest.raises(ValueError, match="max_new_tokens"):
        WorldVLAPolicy(model, vq, at, chunk_size=3, image_size=64, mode="release", max_new_tokens=0)


def test_release_chunks_of_different_or_no_length(rng, monkeypatch):
    """mode="release" returns as many actions as blocks: a batch whose chunks differ in length is a list,
    and `step()` and the evaluation harnesses' `ChunkQuery` refuse by name what they cannot execute in
    order (chunks of different lengths; no block at all, where the release's loop fails the episode)."""
    from worldvla.eval.rollout import ChunkQuery
    from worldvla.inference import WorldVLAPolicy, policy as policy_mod
    from worldvla.inference.release import Generated
    from worldvla.vqgan import VQGAN, VQGANConfig

    lo, _ = LAYOUT.bin_range
    block = [LAYOUT.boa] + [lo + 3] * D + [LAYOUT.eoa]
    blocks = {"n": [2, 0]}

    def fake(model, prompts, *a, **k):
        return [Generated(torch.tensor(block * n), torch.tensor([block] * n, dtype=torch.long).view(n, D + 2), False)
                for n in blocks["n"][:len(prompts)]]

    monkeypatch.setattr(policy_mod, "generate_release_actions", fake)
    torch.manual_seed(0)
    vq = VQGAN(VQGANConfig(ch=32, ch_mult=(1, 1, 1, 1, 1), num_res_blocks=1, z_channels=32, embed_dim=32,
                           n_embed=64)).eval()
    at = ActionTokenizer(LAYOUT, [-1.0] * D, [1.0] * D)
    policy = WorldVLAPolicy(_model(8), vq, at, chunk_size=3, image_size=64, mode="release")
    frames = torch.randint(0, 256, (2, 64, 64, 3), generator=rng, dtype=torch.uint8).numpy()
    policy.reset(["open the drawer", "push"])
    out = policy.act(frames, history=None)
    assert isinstance(out, list) and [c.shape for c in out] == [(2, D), (0, D)]
    with pytest.raises(ValueError, match="chunks differ in length"):
        policy.step(frames)
    with pytest.raises(ValueError, match="chunks differ in length"):
        ChunkQuery(policy)(frames, None)
    blocks["n"] = [0]
    policy.reset("push")
    with pytest.raises(RuntimeError, match="no action block"):
        policy.step(frames[0])
    with pytest.raises(RuntimeError, match="no action block"):
        ChunkQuery(policy)(frames[0], None)
    blocks["n"] = [2]
    assert policy.step(frames[0]).shape == (D,) and policy.step(frames[0]).shape == (D,)
    # Output that turned malformed after a good block (here a second EOA closing no block, on which the
    # release's mask raises and generation aborts) gives no action, not the blocks before it.
    good = Generated(torch.tensor(block + [LAYOUT.eoa] * 2), torch.tensor([block]), True)
    monkeypatch.setattr(policy_mod, "generate_release_actions", lambda *a, **k: [good])
    policy.reset("push")
    assert policy.act(frames[0], history=None).shape == (0, D)
    with pytest.raises(RuntimeError, match="malformed"):
        ChunkQuery(policy)(frames[0], None)


def _forcing(template, prompt_len):
    """A logits processor writing `template` after the prompt: an id is forced, None leaves the model's choice
    among the bin ids (so the tokens still depend on the mask); the separator once the template is written."""
    lo, hi = LAYOUT.bin_range

    def proc(ids, logits):
        j = ids.numel() - prompt_len
        out = torch.full_like(logits, float("-inf"))
        t = template[j] if j < len(template) else LAYOUT.sep
        if t is None:
            out[lo:hi] = logits[lo:hi]
        else:
            out[t] = 0.0
        return out

    return proc


def _release(template, seed=9, n=40):
    """generate_release_actions and the release's procedure (the baseline) on one prompt with `template` forced."""
    model = _model(seed)
    p = _prompts(torch.Generator().manual_seed(seed), 1)[0]
    (got,) = generate_release_actions(model, p, LAYOUT, D, n, logits_processor=_forcing(template, p.numel()))
    want = baseline_generate_action_chunk(model, p, LAYOUT, 1, D, max_new_tokens=n,
                                          logits_processor=_forcing(template, p.numel()))
    assert torch.equal(got.tokens, want.tokens) and torch.equal(got.actions, want.actions)
    assert got.fails_after == want.fails_after and not got.malformed
    return got


BOA, EOA, X = LAYOUT.boa, LAYOUT.eoa, None  # X: the model's bin


def test_release_keeps_the_first_d_ids_of_a_longer_block():
    """The release's parser decodes a block of D+1 ids and its unnorm_min_max executes the first D: one action,
    and the next block (whose rows hide the longer one) one more."""
    got = _release([BOA, *[X] * (D + 1), EOA, BOA, *[X] * D, EOA])
    t = got.tokens.tolist()
    assert got.actions.tolist() == [[BOA, *t[1:D + 1], EOA], t[D + 3:2 * D + 5]]
    assert t[-1] == LAYOUT.sep and not got.fails_after


def test_release_skips_a_stray_eoa_after_a_closed_block():
    """An EOA closing no block after a closed one: the release's mask drops it (a token outside any block) and
    its parser skips it; generation goes on, the blocks before it are actions."""
    got = _release([BOA, *[X] * D, EOA, BOA, *[X] * D, EOA, EOA, X, X])
    t = got.tokens.tolist()
    assert t[2 * D + 4] == EOA and len(t) == 2 * D + 8 and t[-1] == LAYOUT.sep
    assert got.actions.tolist() == [t[:D + 2], t[D + 2:2 * D + 4]] and not got.fails_after


def test_release_broadcasts_a_one_id_block():
    got = _release([BOA, X, EOA, BOA, *[X] * D, EOA])
    t = got.tokens.tolist()
    assert got.actions.tolist() == [[BOA, *[t[1]] * D, EOA], t[3:D + 5]] and not got.fails_after


@pytest.mark.parametrize("short", [0, 2, D - 1])
def test_release_fails_on_a_short_block(short):
    """A block of 0 or 2..D-1 ids: the release executes the actions before it, then fails the episode."""
    got = _release([BOA, *[X] * D, EOA, BOA, *[X] * short, EOA, BOA, *[X] * D, EOA])
    assert got.actions.tolist() == [got.tokens.tolist()[:D + 2]] and got.fails_after


@pytest.mark.parametrize("template,stop,what", [
    ([BOA, *[X] * D, EOA, EOA, BOA, X, X], D + 3, "BOA after an EOA that closed no block"),
    ([BOA, *[X] * D, EOA, EOA, X, EOA, X], D + 4, "second EOA"),
    ([X, EOA, BOA, *[X] * D, EOA], 1, "EOA before any action block")])
def test_release_stops_where_the_release_fails_or_pairs_out_of_order(template, stop, what):
    """Still malformed (generation stops, no action): a second stray EOA (the release's mask raises), an EOA
    before any block (its parser raises), a BOA after a stray EOA (the release pairs it with an earlier EOA,
    out of order, which the chunk rule cannot express)."""
    model = _model(9)
    p = _prompts(torch.Generator().manual_seed(9), 1)[0]
    (got,) = generate_release_actions(model, p, LAYOUT, D, 30, logits_processor=_forcing(template, p.numel()))
    assert got.malformed and got.tokens.numel() == stop
    with pytest.raises(ValueError, match=f"malformed action blocks.*{what}"):
        baseline_generate_action_chunk(model, p, LAYOUT, 1, D, max_new_tokens=30,
                                       logits_processor=_forcing(template, p.numel()))


def test_policy_release_parsing(rng, monkeypatch):
    """WorldVLAPolicy(mode="release") executes what the release executes: the first D ids of a longer block, the
    block before a stray EOA; a short block after a good one: step() runs the good one, then raises where the
    release fails the episode; act() (the harnesses' and the server's call) keeps no action of that chunk."""
    from worldvla.eval.rollout import ChunkQuery
    from worldvla.inference import WorldVLAPolicy, policy as policy_mod
    from worldvla.vqgan import VQGAN, VQGANConfig

    lo = LAYOUT.bin_range[0]
    torch.manual_seed(0)
    vq = VQGAN(VQGANConfig(ch=32, ch_mult=(1, 1, 1, 1, 1), num_res_blocks=1, z_channels=32, embed_dim=32,
                           n_embed=64)).eval()
    at = ActionTokenizer(LAYOUT, [-1.0] * D, [1.0] * D)
    policy = WorldVLAPolicy(_model(9), vq, at, chunk_size=1, image_size=64, mode="release", max_new_tokens=20)
    frame = torch.randint(0, 256, (64, 64, 3), generator=rng, dtype=torch.uint8).numpy()
    real = policy_mod.generate_release_actions
    template = {}
    monkeypatch.setattr(policy_mod, "generate_release_actions", lambda m, prompts, *a, **k: real(
        m, prompts, *a, **k, logits_processor=_forcing(template["t"], prompts[0].numel())))
    bins = list(range(lo + 1, lo + D + 1))
    want = at.decode(np.array(bins)).astype(np.float32)
    for t in ([BOA, *bins, lo, EOA], [BOA, *bins, EOA, EOA]):
        template["t"] = t
        policy.reset("push")
        assert np.array_equal(policy.act(frame, history=None), want[None])
        policy.reset("push")
        assert np.array_equal(policy.step(frame), want)
    template["t"] = [BOA, *bins, EOA, BOA, lo, lo, EOA, BOA, *bins, EOA]
    policy.reset("push")
    assert policy.act(frame, history=None).shape == (0, D)
    with pytest.raises(RuntimeError, match="no action block, or malformed"):
        ChunkQuery(policy)(frame, None)
    policy.reset("push")
    assert np.array_equal(policy.step(frame), want)
    with pytest.raises(RuntimeError, match="malformed.*fails the episode"):
        policy.step(frame)
    assert np.array_equal(policy.step(frame), want)  # a caller going on: a new query


def test_an_engine_one_slot_short_is_refused_naming_the_slots(rng):
    """The engine needs room for the longest prompt and every new token: one of exactly that size decodes, one
    slot fewer is refused before anything runs, saying how many slots the call needs."""
    from worldvla.inference import InferenceEngine

    model = _model(6)
    prompts = _prompts(rng, 2)
    need = max(p.numel() for p in prompts) + 12
    exact = InferenceEngine(model, 2, need)
    want = generate_release_actions(model, prompts, LAYOUT, D, 12)
    got = generate_release_actions(model, prompts, LAYOUT, D, 12, engine=exact)
    assert [g.tokens.tolist() for g in got] == [g.tokens.tolist() for g in want]
    short = InferenceEngine(model, 2, need - 1)
    with pytest.raises(ValueError, match=rf"need {need} cache slots; the engine has {need - 1}"):
        generate_release_actions(model, prompts, LAYOUT, D, 12, engine=short)
    assert not short.cache.k.any()


def test_a_skip_of_nothing_cached_needs_no_engine(rng):
    """skip= of zeros names no cached prefix: without an engine it decodes as without skip, and a cached prefix
    without the engine holding it is refused."""
    model = _model(5)
    prompts = _prompts(rng, 2)
    want = generate_release_actions(model, prompts, LAYOUT, D, 12)
    got = generate_release_actions(model, prompts, LAYOUT, D, 12, skip=[0, 0])
    assert [g.tokens.tolist() for g in got] == [g.tokens.tolist() for g in want]
    with pytest.raises(ValueError, match="pass that engine"):
        generate_release_actions(model, prompts, LAYOUT, D, 12, skip=[0, 3])


def test_an_engine_for_another_batch_size_is_refused_by_name(rng):
    model = _model(6)
    prompts = _prompts(rng, 3)
    engine = release_engine(model, prompts, 12)
    with pytest.raises(ValueError, match="the engine holds 3 sequences but got 2 prompts"):
        generate_release_actions(model, prompts[:2], LAYOUT, D, 12, engine=engine)
    with pytest.raises(ValueError, match="the engine holds 3 sequences but got 1 prompts"):
        generate_release_actions(model, prompts[0], LAYOUT, D, 12, engine=engine)


def test_the_layout_defaults_to_the_models(rng):
    model = _model(5)
    prompts = _prompts(rng, 2)
    want = generate_release_actions(model, prompts, LAYOUT, D, 12)
    got = generate_release_actions(model, prompts, None, D, 12)
    assert [g.tokens.tolist() for g in got] == [g.tokens.tolist() for g in want]


@pytest.mark.parametrize("backend", ["auto", "native", "torch"])
def test_the_choice_covers_the_last_id_of_the_vocabulary(backend):
    """The release's argmax runs over every id, the last one too."""
    from worldvla.inference.release import release_choice

    model = _model(0)
    H, V = model.config.hidden_size, model.config.vocab_size
    h = torch.randn(2, H, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model.lm_head.weight.zero_()
        model.lm_head.weight[V - 1] = h[0] / h[0].norm()
        model.lm_head.weight[V - 2] = h[1] / h[1].norm()
        assert release_choice(model, h, backend).tolist() == [V - 1, V - 2]


def test_decoding_stops_at_the_releases_cap_of_300_tokens(rng):
    """A model that never writes the separator: the release stops after max_new_tokens, 300 by default."""
    text = LAYOUT.text_base + 5

    def free_text(ids, logits):
        out = torch.full_like(logits, float("-inf"))
        out[text] = 0.0
        return out

    (got,) = generate_release_actions(_model(5), _prompts(rng, 1)[0], LAYOUT, D, logits_processor=free_text)
    assert got.tokens.tolist() == [text] * 300 and got.actions.shape == (0, D + 2) and not got.malformed


def test_a_sequence_that_reached_the_separator_ends_there_while_others_go_on(rng):
    """In a batch, the prompt that writes the separator first keeps exactly its tokens up to it while the other
    still writes its block."""
    model = _model(9)
    prompts = _prompts(rng, 2)
    short, long_ = (_forcing([], prompts[0].numel()), _forcing([BOA, *[X] * D, EOA], prompts[1].numel()))

    def per_prompt(ids, logits):  # the prompts differ in length: the ids say which one this is
        first = ids.numel() >= prompts[0].numel() and torch.equal(ids[:prompts[0].numel()], prompts[0])
        return (short if first else long_)(ids, logits)

    assert prompts[0].numel() != prompts[1].numel()
    got = generate_release_actions(model, prompts, LAYOUT, D, 20, logits_processor=per_prompt)
    assert got[0].tokens.tolist() == [LAYOUT.sep] and got[0].actions.shape == (0, D + 2)
    t = got[1].tokens.tolist()
    assert len(t) == D + 3 and t[-1] == LAYOUT.sep and got[1].actions.tolist() == [t[:D + 2]]


def test_a_layout_of_another_vocabulary_is_refused(rng):
    """generate_release_actions took a layout of another vocabulary than the model's: a larger one failed deep in the
    embedding with a bare IndexError, a smaller one parsed its bins at ids the model learned as other tokens. Both are
    refused by name, as generate_action_chunk refuses them."""
    model, prompts = _model(0), _prompts(rng, 2)
    for other in (VocabLayout.compact(n_image_codes=512), VocabLayout.compact(n_image_codes=32)):
        with pytest.raises(ValueError, match=f"the layout '{other.name}' has {other.vocab_size} ids but the model "
                                             f"{LAYOUT.vocab_size}: pass the model's own layout"):
            generate_release_actions(model, prompts, other, D, max_new_tokens=8)
    own = generate_release_actions(model, prompts, LAYOUT, D, max_new_tokens=8)
    same = generate_release_actions(model, prompts, None, D, max_new_tokens=8)
    assert all(torch.equal(a.tokens, b.tokens) for a, b in zip(own, same))


def test_counts_that_are_not_integers_of_at_least_one_are_refused(rng):
    """generate_release_actions took an action_dim of 0, -1 or True and parsed blocks of that many values (none of
    the model's D-value blocks), a float one failed in torch's view() after the whole generation; a max_new_tokens
    of True generated one token, of None or 8.0 failed deep inside; release_engine sized an engine for no new
    token."""
    model, prompts = _model(6), _prompts(rng, 2)
    for dim in (0, -1, True, 4.0):
        with pytest.raises(ValueError, match=f"action_dim must be an integer >= 1, got {dim!r}"):
            generate_release_actions(model, prompts, LAYOUT, dim, 8)
    for n in (True, None, 8.0):
        with pytest.raises(ValueError, match=f"max_new_tokens must be an integer >= 1, got {n!r}"):
            generate_release_actions(model, prompts, LAYOUT, D, n)
    for n in (0, 2.5):
        with pytest.raises(ValueError, match=f"max_new_tokens must be an integer >= 1, got {n!r}"):
            release_engine(model, prompts, n)
    got = generate_release_actions(model, prompts, LAYOUT, np.int64(D), np.int64(8))
    assert [g.tokens.numel() for g in got] == [8, 8] and all(g.actions.shape[1] == D + 2 for g in got)


def test_release_engine_takes_one_prompt_as_one_row(rng):
    """release_engine(model, prompt) with one prompt [P], as generate_release_actions takes it, made an engine of P
    rows of one token each, which the decoding then refused ("the engine holds P sequences but got 1 prompts")."""
    model = _model(5)
    p = _prompts(rng, 1)[0]
    engine = release_engine(model, p, 12)
    assert engine.batch_size == 1 and engine.max_len == p.numel() + 12
    got = generate_release_actions(model, p, LAYOUT, D, 12, engine=engine)
    assert torch.equal(got[0].tokens, generate_release_actions(model, p, LAYOUT, D, 12)[0].tokens)
    batch = torch.stack([p, p])
    assert release_engine(model, batch, 12).batch_size == 2


def test_the_parsers_refuse_rows_and_action_dims_below_one():
    """The parsers compared each row of a [1, n] tensor whole with BOA and EOA and found no action, without a word;
    an action_dim of 0 or -1 parsed [BOA, EOA] or one-id rows, and parse_action_blocks with -2 never advanced
    (it appended empty blocks until memory ran out)."""
    from worldvla.inference.baseline import parse_action_blocks, parse_release_actions

    lo = LAYOUT.bin_range[0]
    t = torch.tensor([BOA, *range(lo, lo + D), EOA] * 2 + [LAYOUT.sep])
    want = t[:-1].view(2, D + 2)
    assert torch.equal(parse_action_blocks(t, LAYOUT, D), want)
    assert torch.equal(parse_release_actions(t, LAYOUT, D)[0], want)
    assert torch.equal(parse_action_blocks(t.tolist(), LAYOUT, D), want)  # a list of ids is one sequence
    for parse in (parse_action_blocks, parse_release_actions):
        with pytest.raises(ValueError, match=r"tokens must be one generated sequence \[n\], got shape \(1, 13\)"):
            parse(t.view(1, -1), LAYOUT, D)
        with pytest.raises(TypeError, match="generated ids must be integers, got torch.float32"):
            parse(t.float(), LAYOUT, D)
        for dim in (0, -1, -2, True):
            with pytest.raises(ValueError, match=f"action_dim must be an integer >= 1, got {dim!r}"):
                parse(t, LAYOUT, dim)


def test_the_baseline_refuses_a_layout_of_another_vocabulary(rng):
    """baseline_generate_action_chunk took a layout of another vocabulary than the model's and parsed the model's ids
    as that layout's tokens: no action, or actions at ids the model learned as other tokens."""
    model, p = _model(0), _prompts(rng, 1)[0]
    for other in (VocabLayout.compact(n_image_codes=512), VocabLayout.compact(n_image_codes=32)):
        with pytest.raises(ValueError, match=f"the layout '{other.name}' has {other.vocab_size} ids but the model "
                                             f"{LAYOUT.vocab_size}: pass the model's own layout"):
            baseline_generate_action_chunk(model, p[:5], other, 1, D, max_new_tokens=4)
    own = baseline_generate_action_chunk(model, p, LAYOUT, 1, D, max_new_tokens=4)
    assert torch.equal(own.tokens, baseline_generate_action_chunk(model, p, None, 1, D, max_new_tokens=4).tokens)


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_a_prompt_with_blocks_after_its_image_is_prefilled_as_the_release_prefills_it(backend):
    """The release prefills a prompt under its mask's last row at every position; the engine applied the chunk rule
    row by row, which inside the prompt hides a block after the last image from the next one. With blocks there,
    the prompt's keys and values differed from the release's, and here the free tokens from the third on."""
    lo = LAYOUT.bin_range[0]
    model = _model(8)
    base = _prompts(torch.Generator().manual_seed(8), 1)[0]
    g = torch.Generator().manual_seed(8)
    blocks = [[BOA, *(lo + torch.randint(0, 256, (D,), generator=g)).tolist(), EOA] for _ in range(3)]
    p = torch.cat([base[:-1], torch.tensor(sum(blocks, [])), base[-1:]])
    want = [baseline_generate_action_chunk(model, q, LAYOUT, 1, D, max_new_tokens=8).tokens for q in (p, base)]
    got = generate_release_actions(model, [p, base], LAYOUT, D, 8, backend=backend)
    assert [x.tokens.tolist() for x in got] == [w.tolist() for w in want]
    # on an engine holding the prefixes of both prompts: the same tokens
    engine = release_engine(model, [p, base], 8, backend=backend)
    generate_release_actions(model, [p, base], LAYOUT, D, 8, engine=engine)
    got = generate_release_actions(model, [p, base], LAYOUT, D, 8, engine=engine, skip=[40, 40])
    assert [x.tokens.tolist() for x in got] == [w.tolist() for w in want]
    # the engine's prefill alone: the release's keys and values, and its last hidden state
    k, v, h = release_prefill(model, p, LAYOUT)
    engine = release_engine(model, [p], 8, backend=backend)
    got_h = engine.prefill([p], release=True)[0]
    torch.testing.assert_close(got_h, h, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(engine.cache.k[:, 0, :len(p)], k, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(engine.cache.v[:, 0, :len(p)], v, rtol=1e-4, atol=1e-5)
    # the chunk rule row by row (the default) differs there: the test would pass without the release's prefill
    assert not torch.allclose(release_engine(model, [p], 8, backend=backend).prefill([p])[0], h, rtol=1e-2)


def test_a_prompt_with_a_stray_eoa_after_a_closed_block_decodes_as_the_release_decodes_it():
    """The release's mask takes one EOA closing no block after a closed block as a token outside any block, in a
    prompt as in the output. The engine's prefill paired the prompt's blocks by the strict rule and refused it
    ("an EOA that closes no open action block"), where the release decodes on."""
    lo = LAYOUT.bin_range[0]
    model = _model(8)
    base = _prompts(torch.Generator().manual_seed(8), 1)[0]
    p = torch.cat([base[:-1], torch.tensor([BOA, lo, lo + 1, lo + 2, lo + 3, EOA, EOA]), base[-1:]])
    want = baseline_generate_action_chunk(model, p, LAYOUT, 1, D, max_new_tokens=8).tokens
    got = generate_release_actions(model, [p, base], LAYOUT, D, 8)
    assert got[0].tokens.tolist() == want.tolist() and len(want) == 8
    assert got[1].tokens.tolist() == baseline_generate_action_chunk(model, base, LAYOUT, 1, D, 8).tokens.tolist()
    # the strict rule still refuses it where structured decoding prefills
    with pytest.raises(ValueError, match="an EOA that closes no open action block"):
        release_engine(model, [p], 8).prefill([p])


def test_an_engine_of_another_layout_is_refused(rng):
    """release_engine took a layout of another vocabulary, and generate_release_actions an engine built with one: its
    prefill placed the prompts' action blocks by that layout's ids (here it found none), so the chunk rule's metadata
    of the prompt was wrong and the tokens differed from those of an engine of the model's layout."""
    from worldvla.inference import InferenceEngine

    lo = LAYOUT.bin_range[0]
    model, p = _model(8), _prompts(rng, 1)[0]
    p = torch.cat([p, torch.tensor([BOA, *range(lo, lo + D), EOA] * 2)])
    other = VocabLayout.chameleon()
    with pytest.raises(ValueError, match=f"the layout 'chameleon' has {other.vocab_size} ids but the model "):
        release_engine(model, p, 8, layout=other)
    engine = InferenceEngine(model, 1, p.numel() + 8, layout=other)
    with pytest.raises(ValueError, match="the engine was built with the layout 'chameleon' but the decoding uses "
                                         f"'{LAYOUT.name}': build the engine with the same layout"):
        generate_release_actions(model, p, LAYOUT, D, 8, engine=engine)
    want = generate_release_actions(model, p, LAYOUT, D, 8)[0].tokens
    assert torch.equal(generate_release_actions(model, p, LAYOUT, D, 8, engine=release_engine(model, p, 8))[0].tokens,
                       want)


def test_a_skip_that_is_not_one_count_per_prompt_is_refused_by_name(rng):
    """skip=3 (one count for a batch) failed in Python's "'int' object is not iterable", with or without an engine."""
    model, prompts = _model(5), _prompts(rng, 2)
    engine = release_engine(model, prompts, 12)
    for kw in ({}, {"engine": engine}):
        with pytest.raises(ValueError, match=r"skip must give one count of cached prefix tokens per prompt \(2\), got 3"):
            generate_release_actions(model, prompts, LAYOUT, D, 12, skip=3, **kw)
    got = generate_release_actions(model, prompts, LAYOUT, D, 12, engine=engine, skip=torch.tensor([0, 0]))
    assert [g.tokens.numel() for g in got] == [12, 12]


@pytest.mark.parametrize("template", [[BOA, *[X] * D, EOA, EOA, EOA], [BOA, *[X] * D, EOA, BOA, X, BOA],
                                      [BOA, *[X] * D, EOA, EOA, BOA], [X, X, EOA]])
def test_the_last_token_allowed_is_never_fed_so_never_malformed(template):
    """The release's generate stops after the max_new_tokens-th token without a forward pass of it, so no mask is built
    with it: a second stray EOA, a BOA inside an open block or after a stray EOA there is only parsed (skipped,
    restarting or opening a block). Both decoders treated it as fed: the baseline raised, generate_release_actions
    gave malformed output, whose block the policy then dropped; an EOA before any block still fails the episode."""
    got = _release(template, n=len(template))
    assert got.tokens.numel() == len(template) and got.tokens.tolist()[-1] == template[-1]
    if template[0] == BOA:
        assert got.actions.tolist() == [got.tokens.tolist()[:D + 2]] and not got.fails_after
    else:
        assert got.actions.shape == (0, D + 2) and got.fails_after


def _with_blocks(base, n_blocks, seed):
    """`base` with `n_blocks` action blocks between its image and its closing separator."""
    lo, g = LAYOUT.bin_range[0], torch.Generator().manual_seed(seed)
    blocks = [[BOA, *(lo + torch.randint(0, 256, (D,), generator=g)).tolist(), EOA] for _ in range(n_blocks)]
    return torch.cat([base[:-1], torch.tensor(sum(blocks, [])), base[-1:]])


def test_every_row_of_a_batch_is_prefilled_as_the_release_prefills_it():
    """The release's prefill (every position under the mask's last row) holds for each row of a batch, and for a
    prompt whose last block after the image is only its second (block ordinal 1): each row's keys, values and last
    hidden state are the release's own."""
    model = _model(8)
    base = _prompts(torch.Generator().manual_seed(8), 2)
    prompts = [_with_blocks(base[0], 2, 1), _with_blocks(base[1], 3, 2)]
    engine = release_engine(model, prompts, 4)
    got_h = engine.prefill(prompts, release=True)
    for b, p in enumerate(prompts):
        k, v, h = release_prefill(model, p, LAYOUT)
        torch.testing.assert_close(got_h[b], h, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(engine.cache.k[:, b, :len(p)], k, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(engine.cache.v[:, b, :len(p)], v, rtol=1e-4, atol=1e-5)


def test_a_release_prefill_recomputes_a_prefix_cached_under_the_chunk_rule():
    """A prefix cached by a structured prefill (the chunk rule row by row, where the second block after the image
    hides the first) is not the release's: a release prefill with skip= recomputes it, so the keys, values and last
    hidden state are those of a release prefill from nothing."""
    model = _model(8)
    p = _with_blocks(_prompts(torch.Generator().manual_seed(8), 1)[0], 2, 1)
    k, v, h = release_prefill(model, p, LAYOUT)
    engine = release_engine(model, [p], 4)
    engine.prefill([p])
    assert not torch.allclose(engine.cache.k[:, 0, :len(p)], k, rtol=1e-2)  # the cached prefix is not the release's
    got_h = engine.prefill([p], skip=[len(p) - 1], release=True)[0]
    torch.testing.assert_close(got_h, h, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(engine.cache.k[:, 0, :len(p)], k, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(engine.cache.v[:, 0, :len(p)], v, rtol=1e-4, atol=1e-5)


def test_an_engine_of_another_model_is_refused_by_name(rng):
    """An engine built for one model, passed with another: refused before decoding (its prefill would run the
    engine's model while the choices read the other's head)."""
    prompts = _prompts(rng, 2)
    engine = release_engine(_model(5), prompts, 8)
    with pytest.raises(ValueError, match="this engine was built for another model"):
        generate_release_actions(_model(6), prompts, LAYOUT, D, 8, engine=engine)


def test_a_layout_given_for_a_model_without_one_decodes(rng):
    """A model that carries no layout (model.layout None) decodes with the layout given, and so does a model whose
    own layout is another of the same vocabulary: the engine is built with the layout passed, the tokens are those
    of the model with that layout."""
    import dataclasses

    model, prompts = _model(5), _prompts(rng, 2)
    want = [g.tokens.tolist() for g in generate_release_actions(model, prompts, LAYOUT, D, 8)]
    model.layout = None
    assert [g.tokens.tolist() for g in generate_release_actions(model, prompts, LAYOUT, D, 8)] == want
    model.layout = dataclasses.replace(LAYOUT, name="renamed")
    assert [g.tokens.tolist() for g in generate_release_actions(model, prompts, LAYOUT, D, 8)] == want


def test_a_malformed_first_token_gives_no_token_and_no_action():
    """An EOA as the first generated token (before any block): generation stops there with no token, as an integer
    sequence, and no action; the release's procedure refuses the same output."""
    model = _model(9)
    p = _prompts(torch.Generator().manual_seed(9), 1)[0]
    template = [EOA, BOA, *[X] * D, EOA]
    (got,) = generate_release_actions(model, p, LAYOUT, D, 20, logits_processor=_forcing(template, p.numel()))
    assert got.malformed and got.tokens.dtype == torch.long and got.tokens.numel() == 0
    assert got.actions.shape == (0, D + 2)
    with pytest.raises(ValueError, match="malformed action blocks.*EOA before any action block"):
        baseline_generate_action_chunk(model, p, LAYOUT, 1, D, max_new_tokens=20,
                                       logits_processor=_forcing(template, p.numel()))


def test_prompts_of_float_or_bool_ids_are_refused_by_name(rng):
    """Token ids that are not integers are refused, naming the prompt, before anything runs: cast to long, a float
    prompt's ids were truncated and a bool one's read as ids 0 and 1, and both decoded without a word."""
    model, (p, q) = _model(5), _prompts(rng, 2)
    with pytest.raises(TypeError, match=r"prompt 0: token ids must be integers, got torch\.float32"):
        generate_release_actions(model, p.float() + 0.5, LAYOUT, D, 4)
    with pytest.raises(TypeError, match=r"prompt 1: token ids must be integers, got torch\.bool"):
        generate_release_actions(model, [p, q > 100], LAYOUT, D, 4)


def test_the_last_token_allowed_costs_no_forward_pass(rng):
    """After the prefill, decoding runs one step for each token it feeds: max_new_tokens - 1 steps for a sequence
    that never writes the separator (the last token is only parsed), none once every sequence has written it."""
    text = LAYOUT.text_base + 5

    def free_text(ids, logits):
        out = torch.full_like(logits, float("-inf"))
        out[text] = 0.0
        return out

    for model, n, kw, steps in ((_model(5), 6, {"logits_processor": free_text}, 5),
                                (always_separator(_model(5), LAYOUT), 6, {}, 0)):
        prompts = _prompts(rng, 2)
        engine = release_engine(model, prompts, n)
        runs, run = [], engine.run
        engine.run = lambda buf: runs.append(buf.ids.shape) or run(buf)
        got = generate_release_actions(model, prompts, LAYOUT, D, n, engine=engine, **kw)
        assert [g.tokens.numel() for g in got] == ([n, n] if steps else [1, 1])
        assert runs == [(2, 1)] * steps


def test_an_engine_of_another_layout_of_the_same_vocabulary_is_refused(rng):
    """An engine built with a layout of the model's vocabulary size but other action ids (BOA and EOA swapped) is
    refused by name: its prefill would find the prompt's blocks by the other layout's ids."""
    import dataclasses

    from worldvla.inference import InferenceEngine

    lo = LAYOUT.bin_range[0]
    model, p = _model(8), _prompts(rng, 1)[0]
    p = torch.cat([p, torch.tensor([BOA, *range(lo, lo + D), EOA])])
    swapped = dataclasses.replace(LAYOUT, boa=LAYOUT.eoa, eoa=LAYOUT.boa, name="swapped")
    assert swapped.vocab_size == LAYOUT.vocab_size
    engine = InferenceEngine(model, 1, p.numel() + 8, layout=swapped)
    with pytest.raises(ValueError, match="the engine was built with the layout 'swapped' but the decoding uses "
                                         f"'{LAYOUT.name}'"):
        generate_release_actions(model, p, LAYOUT, D, 8, engine=engine)
