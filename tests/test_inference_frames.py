"""World-model frame generation: cached decoding vs full recomputation, forced structure, CFG, rollouts."""
import dataclasses
import warnings

import numpy as np
import pytest
import torch

from worldvla import ActionTokenizer, SequenceBuilder, VocabLayout
from worldvla.inference import InferenceEngine, generate_frame_codes, generate_frames
from worldvla.inference.frames import _unconditional_prompt
from worldvla.model import ModelConfig, WorldVLA
from worldvla.tokens import ByteTextTokenizer, image_tokens
from worldvla.vqgan import VQGAN, VQGANConfig, postprocess

LAYOUT = VocabLayout.compact(n_image_codes=64)



def _model(seed, layout=LAYOUT):
    g = torch.Generator().manual_seed(seed)
    return WorldVLA(ModelConfig.tiny(layout)).init_weights(0.5, generator=g).eval()


def _builder(layout=LAYOUT):
    return SequenceBuilder(layout, ByteTextTokenizer(layout), ActionTokenizer(layout, [-1.0] * 4, [1.0] * 4))


def _tiny_vqgan(seed=0):
    torch.manual_seed(seed)
    cfg = VQGANConfig(ch=32, ch_mult=(1, 1, 1, 1, 1), num_res_blocks=1, z_channels=32, embed_dim=32, n_embed=64)
    return VQGAN(cfg).eval()


@torch.no_grad()
def _check_greedy(model, builder, codes, actions, nxt, cfg_scale=None):
    """Teacher-forced check: with the generated frame appended, the full-sequence logits (model.forward)
    pick every generated code by (guided) argmax over the image-code ids."""
    lay = builder.layout
    lo, hi = lay.image_id_range
    for i in range(codes.shape[0]):
        answer = image_tokens(nxt[i], lay)
        cond = torch.cat([builder.world_prompt(codes[i], actions[i]), answer])
        logits = model(cond)[-answer.numel() - 1:-1, lo:hi]
        if cfg_scale is not None:
            unc = torch.cat([_unconditional_prompt(builder, codes[i]), answer])
            u = model(unc)[-answer.numel() - 1:-1, lo:hi]
            banned = torch.isneginf(logits) | torch.isneginf(u)  # ruled out by either branch: stays out
            logits = (u + cfg_scale * (logits - u)).masked_fill(banned, float("-inf"))
        is_code = (answer >= lo) & (answer < hi)
        assert is_code.sum() == nxt[i].numel()
        pick = logits[is_code].argmax(-1) + lo
        assert torch.equal(pick, answer[is_code]), i


@pytest.mark.parametrize("grid", [(2, 2), (4, 6)])
def test_greedy_frame_matches_full_recompute(rng, grid):
    model, b = _model(0), _builder()
    codes = torch.randint(0, 64, (2, *grid), generator=rng)
    actions = torch.rand(2, 4, generator=rng).numpy() * 2 - 1
    nxt = generate_frame_codes(model, codes, actions, b)
    assert nxt.shape == codes.shape and nxt.dtype == torch.long
    assert int(nxt.min()) >= 0 and int(nxt.max()) < 64
    assert len(set(nxt.flatten().tolist())) > 1
    _check_greedy(model, b, codes, actions, nxt)


def test_actions_as_bfloat16_tensors(rng):
    """generate_frame_codes read actions through NumPy, which reads no bfloat16 tensor."""
    model, b = _model(0), _builder()
    codes = torch.randint(0, 64, (2, 2, 2), generator=rng)
    actions = (torch.rand(2, 4, generator=rng) * 2 - 1).bfloat16()
    want = generate_frame_codes(model, codes, actions.float().numpy(), b)
    assert torch.equal(generate_frame_codes(model, codes, actions, b), want)


def test_the_unconditional_prompt_is_the_world_prompt_without_its_action():
    """Guidance contrasts the prompt with and without the action; the full-recompute check builds its
    unconditional branch with the same helper, so the prompt itself is checked here."""
    from worldvla.inference.frames import _unconditional_prompt

    b = _builder()
    codes = torch.randint(0, 64, (4, 4))
    action = np.array([0.3, -0.7, 0.1, 0.9])
    full, act = b.world_prompt(codes, action), b.actions.encode(action)
    at = next(i for i in range(full.numel() - act.numel() + 1) if torch.equal(full[i:i + act.numel()], act))
    assert torch.equal(_unconditional_prompt(b, codes), torch.cat([full[:at], full[at + act.numel():]]))


def test_cfg_frame_matches_full_recompute(rng):
    model, b = _model(1), _builder()
    codes = torch.randint(0, 64, (2, 4, 4), generator=rng)
    actions = torch.rand(2, 4, generator=rng).numpy() * 2 - 1
    nxt = generate_frame_codes(model, codes, actions, b, cfg_scale=3.0)
    _check_greedy(model, b, codes, actions, nxt, cfg_scale=3.0)
    # Guidance changes the result for this model (the test would not notice a guidance no-op otherwise).
    assert not torch.equal(nxt, generate_frame_codes(model, codes, actions, b))


@pytest.mark.parametrize("cfg_scale", [None, 2.0])
def test_adapted_head_frame_matches_full_recompute(rng, cfg_scale):
    """An lm_head with a forward hook (a logit bias) runs as a module, in the fused sampler's place and in
    guidance's logits: the frame is model.forward's (guided) argmax, and not the plain head's."""
    model, b = _model(0), _builder()
    codes = torch.randint(0, 64, (1, 4, 4), generator=rng)
    actions = torch.rand(1, 4, generator=rng).numpy() * 2 - 1
    plain = generate_frame_codes(model, codes, actions, b, cfg_scale=cfg_scale)
    bias = 3.0 * torch.randn(model.config.vocab_size, generator=torch.Generator().manual_seed(1))
    model.lm_head.register_forward_hook(lambda m, args, out: out + bias)
    nxt = generate_frame_codes(model, codes, actions, b, cfg_scale=cfg_scale)
    _check_greedy(model, b, codes, actions, nxt, cfg_scale)
    assert not torch.equal(nxt, plain)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_guidance_keeps_out_the_codes_a_head_hook_bans(rng, temperature):
    """A head hook that bans codes with -inf: guidance's unc + s * (cond - unc) made them NaN (-inf - -inf),
    which argmax and top-k take for the largest score, so the guided frame was all banned codes."""
    model, b = _model(0), _builder()
    codes = torch.randint(0, 64, (2, 4, 4), generator=rng)
    actions = torch.rand(2, 4, generator=rng).numpy() * 2 - 1
    lo, _ = LAYOUT.image_id_range
    ban = torch.zeros(model.config.vocab_size)
    ban[lo:lo + 32] = float("-inf")  # codes 0..31
    model.lm_head.register_forward_hook(lambda m, args, out: out + ban)
    for cfg_scale in (None, 2.0):
        nxt = generate_frame_codes(model, codes, actions, b, cfg_scale=cfg_scale, temperature=temperature,
                                   top_k=5 if temperature else None, generator=torch.Generator().manual_seed(3))
        assert int(nxt.min()) >= 32, (cfg_scale, nxt.flatten().tolist())
    if not temperature:  # the allowed codes' guided argmax, as model.forward computes it
        _check_greedy(model, b, codes, actions, nxt, cfg_scale=2.0)


def test_sampling_arguments_are_checked_by_name(rng):
    """A float top_k reached the native sampler's binding (a pybind11 dump of signatures), a string temperature
    a bare comparison error, a wrong generator an AttributeError; a model without a layout an AttributeError."""
    model, b = _model(0), _builder()
    codes = torch.randint(0, 64, (1, 4, 4), generator=rng)
    actions = np.zeros((1, 4))
    for kw, message in (({"temperature": 1.0, "top_k": 2.5}, "top_k must be an integer >= 1"),
                        ({"temperature": "1"}, "temperature must be a finite number"),
                        ({"temperature": 1.0, "generator": 7}, "generator must be a torch.Generator")):
        with pytest.raises((ValueError, TypeError), match=message):
            generate_frame_codes(model, codes, actions, b, **kw)
    bare = _model(0)
    bare.layout = None
    with pytest.raises(ValueError, match=r"pass the model's VocabLayout \(layout=\)"):
        generate_frames(bare, _tiny_vqgan(), np.zeros((64, 64, 3), dtype=np.uint8), np.zeros((1, 4)),
                        action_tokenizer=b.actions, text_tokenizer=b.text)


@pytest.mark.parametrize("native_loop", [True, False], ids=["native-loop", "python-loop"])
def test_permuted_image_ids(rng, monkeypatch, native_loop):
    """Image codes on permuted ids (as the Chameleon BPE mapping): sampled ids map back to codes through the
    layout's code table (not by their offset from the first image id), in the native frame loop where it runs
    and in the Python one."""
    from worldvla.inference import frames

    monkeypatch.setattr(frames, "NATIVE_FRAME_LOOP", native_loop)
    perm = torch.randperm(64, generator=rng)
    lay = dataclasses.replace(LAYOUT, image_code_ids=tuple((4 + perm).tolist()))
    model, b = _model(2, lay), _builder(lay)
    codes = torch.randint(0, 64, (1, 2, 4), generator=rng)
    actions = np.array([[0.1, -0.3, 0.5, 0.9]])
    nxt = generate_frame_codes(model, codes, actions, b)
    _check_greedy(model, b, codes, actions, nxt)


def test_sampling(rng):
    model, b = _model(3), _builder()
    codes = torch.randint(0, 64, (1, 4, 4), generator=rng)
    a = np.array([[0.2, 0.4, -0.6, 0.0]])
    greedy = generate_frame_codes(model, codes, a, b)
    assert torch.equal(generate_frame_codes(model, codes, a, b, temperature=1.0, top_k=1), greedy)
    s1 = generate_frame_codes(model, codes, a, b, temperature=2.0, top_k=20, generator=torch.Generator().manual_seed(7))
    s2 = generate_frame_codes(model, codes, a, b, temperature=2.0, top_k=20, generator=torch.Generator().manual_seed(7))
    assert torch.equal(s1, s2) and not torch.equal(s1, greedy)
    assert int(s1.min()) >= 0 and int(s1.max()) < 64


@pytest.mark.parametrize("cfg_scale", [None, 2.0])
def test_a_sampled_frame_does_not_depend_on_its_batch(rng, cfg_scale):
    """With one seed, a frame's sample is the same alone, first in a batch of 3 and in another batch
    of 3 (each frame draws from its own generator); the frames of a batch differ from each other."""
    model, b = _model(3), _builder()
    codes = torch.randint(0, 64, (3, 4, 4), generator=rng)
    a = np.random.default_rng(int(torch.randint(0, 2**31, (1,), generator=rng))).uniform(-1, 1, (3, 4))
    other_codes, other_a = torch.randint(0, 64, (3, 4, 4), generator=rng), -a
    other_codes[0], other_a[0] = codes[0], a[0]

    def draw(c, x):
        return generate_frame_codes(model, c, x, b, temperature=1.5, cfg_scale=cfg_scale,
                                    generator=torch.Generator().manual_seed(11))

    alone, batch, other = draw(codes[:1], a[:1]), draw(codes, a), draw(other_codes, other_a)
    assert torch.equal(batch[0], alone[0]) and torch.equal(other[0], alone[0])
    same_input = draw(codes[[1, 1]], a[[1, 1]])  # one input twice: two different draws
    assert not torch.equal(same_input[0], same_input[1])


def test_decoding_a_model_in_training_mode_warns(rng):
    """Dropout left on makes decoding random: the engine says so and names model.eval()."""
    cfg = dataclasses.replace(ModelConfig.tiny(LAYOUT), dropout=0.1)
    model, b = WorldVLA(cfg).init_weights(0.5), _builder()
    codes, a = torch.randint(0, 64, (1, 4, 4), generator=rng), np.array([[0.2, 0.4, -0.6, 0.0]])
    with pytest.warns(RuntimeWarning, match=r"training mode.*model\.eval\(\)"):
        generate_frame_codes(model, codes, a, b)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        generate_frame_codes(model.eval(), codes, a, b)


def test_rollout_feeds_predictions_back(rng):
    model, b, vq = _model(4), _builder(), _tiny_vqgan()
    img = torch.randint(0, 256, (64, 64, 3), generator=rng, dtype=torch.uint8).numpy()
    acts = torch.rand(3, 4, generator=rng).numpy() * 2 - 1
    out = generate_frames(model, vq, img, acts, action_tokenizer=b.actions, text_tokenizer=b.text)
    assert out.codes.shape == (3, 4, 4) and out.frames.shape == (3, 64, 64, 3) and out.frames.dtype == np.uint8
    from worldvla.vqgan import preprocess

    prev = vq.encode(preprocess(img))
    for t in range(3):
        want = generate_frame_codes(model, prev, acts[t:t + 1], b)
        assert torch.equal(out.codes[t], want[0]), t
        prev = want
    assert np.array_equal(out.frames, postprocess(vq.decode(out.codes)))
    # Batched rollouts equal single ones.
    imgs = np.stack([img, img[::-1].copy()])
    batch = generate_frames(model, vq, imgs, np.stack([acts, acts[::-1].copy()]), action_tokenizer=b.actions,
                            text_tokenizer=b.text)
    assert batch.codes.shape == (2, 3, 4, 4) and batch.frames.shape == (2, 3, 64, 64, 3)
    assert torch.equal(batch.codes[0], out.codes)
    # One action for one image: a single step.
    one = generate_frames(model, vq, img, acts[0], action_tokenizer=b.actions, text_tokenizer=b.text)
    assert torch.equal(one.codes, out.codes[:1])


def test_frames_bad_input(rng):
    model, b, vq = _model(5), _builder(), _tiny_vqgan()
    img = np.zeros((64, 64, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="uint8"):
        generate_frames(model, vq, img.astype(np.float32), np.zeros((2, 4)), action_tokenizer=b.actions,
                        text_tokenizer=b.text)
    with pytest.raises(ValueError, match="actions"):
        generate_frames(model, vq, img, np.zeros((2, 5)), action_tokenizer=b.actions, text_tokenizer=b.text)
    with pytest.raises(ValueError, match=r"\[N, h, w\]"):
        generate_frame_codes(model, torch.zeros(4, 4, dtype=torch.long), np.zeros((1, 4)), b)
    with pytest.raises(ValueError, match="T >= 1"):
        generate_frames(model, vq, img, np.zeros((0, 4)), action_tokenizer=b.actions, text_tokenizer=b.text)
    codes = torch.zeros(2, 4, 4, dtype=torch.long)
    for bad in (np.zeros((4, 2)), np.zeros((1, 4)), np.zeros(8)):  # [D, N], too few, flat: never reshaped
        with pytest.raises(ValueError, match=r"actions must be \[N, D\] = \[2, 4\]"):
            generate_frame_codes(model, codes, bad, b)
    with pytest.raises(ValueError, match="cfg_scale must be a finite"):
        generate_frame_codes(model, codes, np.zeros((2, 4)), b, cfg_scale=float("nan"))
    with pytest.raises(TypeError, match="image codes must be an integer tensor"):  # not truncated to ints
        generate_frame_codes(model, codes.float() + 0.5, np.zeros((2, 4)), b)
    small = InferenceEngine(model, 2, 40)
    with pytest.raises(ValueError, match="cache slots; the engine has 40"):
        generate_frame_codes(model, codes, np.zeros((2, 4)), b, engine=small)
    with pytest.raises(ValueError, match="built for another model"):
        generate_frame_codes(_model(1), codes, np.zeros((2, 4)), b, engine=small)


def test_rollout_actions_are_checked_before_the_first_step(monkeypatch):
    """A NaN in the last action was found only by that step's prompt, after every frame before it was generated;
    and a string cfg_scale reached math.isfinite (TypeError: must be real number, not str)."""
    import worldvla.inference.frames as frames_mod

    model, b, vq = _model(5), _builder(), _tiny_vqgan()
    kw = dict(action_tokenizer=b.actions, text_tokenizer=b.text)
    steps, encoded = [], []
    monkeypatch.setattr(frames_mod, "generate_frame_codes", lambda *a, **k: steps.append(1))
    monkeypatch.setattr(vq, "encode_images", lambda *a, **k: encoded.append(1))
    img = np.zeros((64, 64, 3), dtype=np.uint8)
    acts = np.zeros((6, 4))
    for value in (np.nan, np.inf, -np.inf):
        acts[-1, 2] = value
        with pytest.raises(ValueError, match="actions must be finite: step 5 holds NaN or inf"):
            generate_frames(model, vq, img, acts, **kw)
    batch = np.zeros((2, 3, 4))
    batch[1, 2, 0] = np.nan
    with pytest.raises(ValueError, match="actions must be finite: image 1, step 2 holds NaN or inf"):
        generate_frames(model, vq, np.stack([img, img]), batch, **kw)
    for bad in ("2", b"2", True, [2.0], float("inf")):
        with pytest.raises(ValueError, match="cfg_scale must be a finite number .* got"):
            generate_frames(model, vq, img, np.zeros((1, 4)), cfg_scale=bad, **kw)
        with pytest.raises(ValueError, match="cfg_scale must be a finite number .* got"):
            generate_frame_codes(model, torch.zeros(1, 2, 2, dtype=torch.long), np.zeros((1, 4)), b, cfg_scale=bad)
    assert not steps and not encoded


def test_a_batch_of_images_needs_its_actions_per_image(rng):
    """N images with actions [N, D] silently ran one step of each, where [T, D] means T steps of one image:
    refused, naming [N, T, D] and [N, 1, D]."""
    model, b, vq = _model(5), _builder(), _tiny_vqgan()
    kw = dict(action_tokenizer=b.actions, text_tokenizer=b.text)
    imgs = torch.randint(0, 256, (2, 64, 64, 3), generator=rng, dtype=torch.uint8).numpy()
    acts = torch.rand(2, 4, generator=rng).numpy() * 2 - 1
    for bad in (acts, acts[:1], np.zeros((3, 4))):
        with pytest.raises(ValueError, match=r"actions for a batch of 2 images must be \[N, T, 4\] \(\[2, 1, 4\] for "
                                             r"one step of each"):
            generate_frames(model, vq, imgs, bad, **kw)
    with pytest.raises(ValueError, match=r"actions for a batch of 1 images must be \[N, T, 4\]"):
        generate_frames(model, vq, imgs[:1], acts[:1], **kw)
    out = generate_frames(model, vq, imgs, acts[:, None], **kw)  # one step of each image
    assert out.codes.shape == (2, 1, 4, 4)
    one = generate_frames(model, vq, imgs[1], acts[1:], **kw)
    assert torch.equal(out.codes[1], one.codes)


def test_an_empty_batch_of_frames_is_refused_by_name():
    """N = 0 frames failed on an IndexError (codes[0]) or in the VQGAN (aminmax over nothing)."""
    model, b, vq = _model(5), _builder(), _tiny_vqgan()
    with pytest.raises(ValueError, match=r"codes holds no frame \(shape \(0, 2, 2\)\)"):
        generate_frame_codes(model, torch.empty(0, 2, 2, dtype=torch.long), np.zeros((0, 4)), b)
    with pytest.raises(ValueError, match=r"image holds no frame \(shape \(0, 64, 64, 3\)\)"):
        generate_frames(model, vq, np.zeros((0, 64, 64, 3), dtype=np.uint8), np.zeros((0, 2, 4)),
                        action_tokenizer=b.actions, text_tokenizer=b.text)


def test_a_float_image_is_refused_as_the_policy_refuses_one():
    """generate_frames refused a float image with a ValueError and WorldVLAPolicy with a TypeError: one
    error, both (FrameDtypeError), so that a caller catching either sees it from both."""
    from worldvla.inference import WorldVLAPolicy
    from worldvla.inference.frames import FrameDtypeError

    model, b, vq = _model(5), _builder(), _tiny_vqgan()
    img = np.random.default_rng(0).random((64, 64, 3), dtype=np.float32)
    with pytest.raises(FrameDtypeError, match=r"^image must be uint8 in \[0, 255\], got float32 with values in "
                                              r"\[[0-9.e-]+, [0-9.e-]+\]; convert with \(x \* 255\)\.round\(\)\.astype\(np\.uint8\)"):
        generate_frames(model, vq, img, np.zeros((1, 4)), action_tokenizer=b.actions, text_tokenizer=b.text)
    assert issubclass(FrameDtypeError, TypeError) and issubclass(FrameDtypeError, ValueError)
    pol = WorldVLAPolicy.__new__(WorldVLAPolicy)  # only its frame check is exercised
    pol.image_size = 64
    with pytest.raises(FrameDtypeError, match=r"^frames must be uint8 in \[0, 255\], got float32"):
        pol._frames(img)


@pytest.mark.parametrize("cfg_scale", [None, 2.0])
def test_a_frame_engine_serves_calls_in_and_out_of_inference_mode(rng, monkeypatch, native_step_runs, cfg_scale):
    """An engine whose 1- and 2-row step buffers were made under torch.inference_mode could not be stepped
    outside it (an in-place update of an inference tensor), and the reverse: both orders give a fresh engine's
    codes, on the native steps (the frame's native loop)."""
    from worldvla.ops import decoder, dispatch

    monkeypatch.setitem(dispatch.AUTO_ORDER, ("decoder_layer", "cpu"), ("native", "torch"))
    monkeypatch.setattr(decoder, "NATIVE_STEP", True)
    model, b = _model(2), _builder()
    codes = torch.randint(0, 64, (2, 2, 4), generator=rng)
    actions = torch.rand(2, 4, generator=rng).numpy() * 2 - 1
    want = generate_frame_codes(model, codes, actions, b, cfg_scale=cfg_scale)
    rows = 4 if cfg_scale else 2
    for first_inside in (True, False):
        eng = InferenceEngine(model, rows, b.world_prompt(codes[0], actions[0]).numel() + 3 + 2 * 5)
        for inside in (first_inside, not first_inside):
            del native_step_runs[:]
            with torch.inference_mode(inside):
                got = generate_frame_codes(model, codes, actions, b, cfg_scale=cfg_scale, engine=eng)
            assert torch.equal(got, want) and native_step_runs, (first_inside, inside)


@pytest.mark.gpu
@pytest.mark.parametrize("cfg_scale", [None, 2.0])
def test_frames_cuda_graphs_match_eager(cfg_scale):
    """Graph-replayed 1- and 2-row steps give the eager engine's codes on the GPU."""
    rng = torch.Generator().manual_seed(0)
    model, b = _model(6).cuda(), _builder()
    codes = torch.randint(0, 64, (2, 4, 6), generator=rng)
    actions = torch.rand(2, 4, generator=rng).numpy() * 2 - 1
    rows = 4 if cfg_scale else 2
    max_len = b.world_prompt(codes[0], actions[0]).numel() + 3 + 4 * 7
    outs = []
    for graphs in (False, True, True):
        eng = InferenceEngine(model, rows, max_len, cuda_graphs=graphs)
        outs.append(generate_frame_codes(model, codes, actions, b, cfg_scale=cfg_scale, engine=eng))
        outs.append(generate_frame_codes(model, codes, actions, b, cfg_scale=cfg_scale, engine=eng))
        assert eng.cuda_graphs == graphs
    assert all(torch.equal(o, outs[0]) for o in outs)
    _check_greedy(model.cpu(), b, codes, actions, outs[0].cpu(), cfg_scale=cfg_scale)


@pytest.mark.parametrize("dtype,n_codes,sampling,cfg_scale", [
    (torch.float32, 64, None, None), (torch.float32, 2304, None, None), (torch.bfloat16, 64, None, None),
    (torch.float32, 64, (1.3, None), None), (torch.float32, 2304, (0.8, 5), None), (torch.bfloat16, 64, (1.0, 3), None),
    (torch.float32, 64, None, 2.7), (torch.float32, 2304, (0.9, 7), 1.3), (torch.bfloat16, 64, None, 3.1)],
    ids=["float32", "float32-screened", "bfloat16", "float32-sampled", "float32-top-k", "bfloat16-top-k",
         "float32-guided", "float32-guided-top-k", "bfloat16-guided"])
def test_native_frame_loop_is_the_python_loop(rng, monkeypatch, dtype, n_codes, sampling, cfg_scale):
    """On the CPU a frame on native steps runs its loop in native calls (one for a greedy frame, one an
    image row for a sampled one): the codes of the Python loop, over two sequences, a grid of 4 rows of 6
    codes, twice on one engine (a rollout), float32 (plain and screened greedy choices) and bfloat16
    models, greedy and sampled (with and without top-k) from the same generator state, unguided and with
    classifier-free guidance."""
    frames, calls = _native_frame_steps(monkeypatch)
    lay = VocabLayout.compact(n_image_codes=n_codes)
    model, b = _model(1, lay).to(dtype), _builder(lay)
    temperature, top_k = sampling or (0.0, None)
    rows = 4 if cfg_scale else 2  # guided: the unconditional branches too
    for trial in range(3):  # fresh frames and actions (a loop on other logits differs only now and then)
        codes = torch.randint(0, n_codes, (2, 4, 6), generator=rng)
        actions = torch.rand(2, 4, generator=rng).numpy() * 2 - 1
        seed = int(torch.randint(0, 2**31, (1,), generator=rng))
        got = {}
        for native in (True, False):
            monkeypatch.setattr(frames, "NATIVE_FRAME_LOOP", native)
            engine = InferenceEngine(model, rows, b.world_prompt(codes[0], actions[0]).numel() + 3 + 4 * 7, layout=lay)
            gen = torch.Generator().manual_seed(seed)
            kw = dict(engine=engine, temperature=temperature, top_k=top_k, generator=gen, cfg_scale=cfg_scale)
            first = generate_frame_codes(model, codes, actions, b, **kw)
            got[native] = (first, generate_frame_codes(model, first, actions, b, **kw))
        assert torch.equal(got[True][0], got[False][0]) and torch.equal(got[True][1], got[False][1]), trial
        assert len(set(got[True][0].flatten().tolist())) > 3  # not a constant output
    assert len(calls) == 3 * (8 if sampling else 2)  # the native loop's calls; the Python loop's add none
    if sampling or cfg_scale:  # a draw, or guided codes: not the unguided greedy ones
        monkeypatch.setattr(frames, "NATIVE_FRAME_LOOP", True)
        assert not torch.equal(got[True][0], generate_frame_codes(model, codes, actions, b))


def test_native_frame_loop_stops_on_a_signal(rng, monkeypatch):
    """The native frame loop checks for signals between steps: a handler that raises (as Ctrl-C's does)
    stops it mid-frame, with the codes chosen so far written and the rest untouched.

    The timer fires every millisecond from just before the native call. The handler lets a signal pass until
    the loop is some steps into the frame (its tenth code written): one before that may have come during the
    Python before the loop (the wrapper's checks, which a loaded machine may stretch past any fixed delay).
    Then it raises, and the loop stops at its next check, unless it does not check signals: then the handler
    runs only once the loop has returned, with all 399 codes written."""
    import signal

    nb = pytest.importorskip("worldvla.ops.native_backend")
    from worldvla.ops import decoder, dispatch

    monkeypatch.setitem(dispatch.AUTO_ORDER, ("decoder_layer", "cpu"), ("native", "torch"))
    monkeypatch.setitem(dispatch.AUTO_ORDER, ("constrained_sample", "cpu"), ("native", "torch"))
    monkeypatch.setattr(decoder, "NATIVE_STEP", True)
    seen, real = [], nb.decode_frame

    class Stop(Exception):
        pass

    def handler(signum, frame):
        if not seen or int(seen[0][0, 10]) == -1:  # the loop has not begun, or is only a few steps in
            return
        signal.setitimer(signal.ITIMER_REAL, 0)  # once: no second Stop while the first unwinds
        raise Stop()

    def armed(one, two, weight, lo, hi, codes, *rest, **kw):
        codes[:, 1:] = -1
        seen.append(codes)
        signal.setitimer(signal.ITIMER_REAL, 0.001, 0.001)
        return real(one, two, weight, lo, hi, codes, *rest, **kw)

    monkeypatch.setattr(nb, "decode_frame", armed)
    old = signal.signal(signal.SIGALRM, handler)
    try:
        g = torch.Generator().manual_seed(2)  # steps of a fraction of a millisecond: 399 outlast a period by far
        model = WorldVLA(ModelConfig.tiny(LAYOUT, hidden_size=256, intermediate_size=688, num_hidden_layers=4))
        model, b = model.init_weights(0.5, generator=g).eval(), _builder()
        codes = torch.randint(0, 64, (1, 20, 20), generator=rng)  # 399 steps
        with pytest.raises(Stop):
            generate_frame_codes(model, codes, torch.zeros(1, 4).numpy(), b)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    done = int((seen[0][0] != -1).sum())
    assert 10 < done < 20 * 20, done  # (400: not stopped until the loop had returned)


def _native_frame_steps(monkeypatch):
    """The frames module with the CPU's native steps and sampler ordered first, and a list that counts the
    native frame loop's calls."""
    nb = pytest.importorskip("worldvla.ops.native_backend")
    from worldvla.inference import frames
    from worldvla.ops import decoder, dispatch

    monkeypatch.setitem(dispatch.AUTO_ORDER, ("decoder_layer", "cpu"), ("native", "torch"))
    monkeypatch.setitem(dispatch.AUTO_ORDER, ("constrained_sample", "cpu"), ("native", "torch"))
    monkeypatch.setattr(decoder, "NATIVE_STEP", True)
    calls, real = [], nb._C.decode_frame
    monkeypatch.setattr(nb._C, "decode_frame", lambda *a: calls.append(1) or real(*a))
    return frames, calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cfg_scale", [None, 2.0])
def test_native_frame_loop_under_autocast_is_the_python_loop(rng, monkeypatch, dtype, cfg_scale):
    """Under CPU bfloat16 autocast the frame loop was chosen on the uncast tensors: a float32 model's loop ran
    natively on float32 logits, where the Python loop's choices (`constrained_sample`, the guided head's matmul)
    take autocast's bfloat16. Every odd image-code row of lm_head is its even neighbour times (1 + 2^-12): one
    bfloat16 row, so in bfloat16 each pair ties and the even code wins, while in float32 the odd one wins
    wherever the code's logit is positive. A float32 model under autocast now keeps the Python loop (the native
    one reads its float32 weight and hidden states as they are) and picks even codes only; a bfloat16 model,
    which autocast leaves as it is, still takes the native loop, with the same codes."""
    frames, calls = _native_frame_steps(monkeypatch)
    model, b = _model(1), _builder()
    lo, hi = LAYOUT.image_id_range
    with torch.no_grad():
        rows = model.lm_head.weight[lo:hi].bfloat16().float()  # bfloat16 values: the pairs round to one row
        rows[1::2] = rows[0::2] * (1 + 2 ** -12)
        model.lm_head.weight[lo:hi] = rows
    model = model.to(dtype)
    n = 4 if cfg_scale else 2
    codes = torch.randint(0, 64, (2, 4, 6), generator=rng)
    actions = torch.rand(2, 4, generator=rng).numpy() * 2 - 1
    got = {}
    for native in (True, False):
        monkeypatch.setattr(frames, "NATIVE_FRAME_LOOP", native)
        engine = InferenceEngine(model, n, b.world_prompt(codes[0], actions[0]).numel() + 3 + 4 * 7)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got[native] = generate_frame_codes(model, codes, actions, b, engine=engine, cfg_scale=cfg_scale)
    assert torch.equal(got[True], got[False])
    assert (got[True] % 2 == 0).all()  # each pair's first code: bfloat16 logits, as autocast computes them
    assert len(calls) == (0 if dtype == torch.float32 else 1)  # the native loop (one call) where it computes alike
    if dtype == torch.float32:  # without autocast the same frame takes float32 logits: odd codes
        assert (generate_frame_codes(model, codes, actions, b, cfg_scale=cfg_scale) % 2 == 1).any()


@pytest.mark.parametrize("call", ["codes", "frames"])
def test_frames_refuse_a_negative_temperature_and_top_k_with_greedy_codes(rng, call):
    """generate_frames decoded greedily at temperature -1 and ignored top_k at temperature 0, each without a word,
    where `policy.imagine` and `worldvla imagine` refuse both; generate_frame_codes likewise."""
    model, b = _model(0), _builder()
    codes = torch.randint(0, 64, (1, 2, 2), generator=rng)

    def run(**kw):
        if call == "codes":
            return generate_frame_codes(model, codes, np.zeros((1, 4)), b, **kw)
        return generate_frames(model, _tiny_vqgan(), np.zeros((32, 32, 3), np.uint8), np.zeros((1, 4)),
                               action_tokenizer=b.actions, text_tokenizer=b.text, **kw)

    for t in (-1.0, -1e-9, float("nan"), float("-inf")):
        with pytest.raises(ValueError, match=r"temperature must be a finite number >= 0 \(0: greedy codes\)"):
            run(temperature=t)
    for kw in ({"top_k": 5}, {"top_k": 5, "temperature": 0.0}):
        with pytest.raises(ValueError, match="top_k applies to draws; set temperature above 0"):
            run(**kw)
    with pytest.raises(ValueError, match="top_k must be an integer >= 1"):
        run(temperature=1.0, top_k=0)
    run(temperature=1.0, top_k=5, generator=torch.Generator().manual_seed(0))  # a draw among the top 5: fine
    run()  # greedy codes: fine


def test_rollouts_go_through_the_vqgan_a_few_frames_a_call(rng, monkeypatch):
    """N images x T steps were decoded in one VQGAN call (and the N images encoded in one): at 512 px the
    decoder's peak grows by about 700 MB a frame. The frames are the same at any batch of frames."""
    from worldvla.inference import frames

    model, b, vq = _model(4), _builder(), _tiny_vqgan()
    imgs = torch.randint(0, 256, (3, 64, 64, 3), generator=rng, dtype=torch.uint8).numpy()
    acts = torch.rand(3, 3, 4, generator=rng).numpy() * 2 - 1
    whole = generate_frames(model, vq, imgs, acts, action_tokenizer=b.actions, text_tokenizer=b.text)
    sizes = {"encode": [], "decode": []}
    for name in sizes:
        real = getattr(vq, f"{name}_images")
        monkeypatch.setattr(vq, f"{name}_images", lambda x, f=real, n=name, **k: sizes[n].append(len(x)) or f(x, **k))
    monkeypatch.setattr(frames, "VQGAN_BATCH", 2)
    parts = generate_frames(model, vq, imgs, acts, action_tokenizer=b.actions, text_tokenizer=b.text)
    assert sizes == {"encode": [2, 1], "decode": [2, 2, 2, 2, 1]}
    assert torch.equal(parts.codes, whole.codes) and np.array_equal(parts.frames, whole.frames)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_guidance_keeps_out_the_codes_only_the_unconditional_branch_bans(rng, temperature):
    """A code the unconditional branch alone rules out (-inf there, finite in the conditional branch) must stay
    out: guidance's unc + s * (cond - unc) gives it +inf at s > 1, so a ban read from the conditional branch
    alone would make the guided frame all banned codes."""
    model, b = _model(0), _builder()
    n = 2
    codes = torch.randint(0, 64, (n, 4, 4), generator=rng)
    actions = torch.rand(n, 4, generator=rng).numpy() * 2 - 1
    lo, _ = LAYOUT.image_id_range
    ban = torch.zeros(model.config.vocab_size)
    ban[lo:lo + 32] = float("-inf")  # codes 0..31

    def unconditional_ban(module, args, out):
        if out.dim() != 2 or out.shape[0] != 2 * n:
            return out
        out = out.clone()
        out[n:] += ban  # rows n and after: the unconditional branch
        return out

    model.lm_head.register_forward_hook(unconditional_ban)
    nxt = generate_frame_codes(model, codes, actions, b, cfg_scale=3.0, temperature=temperature,
                               top_k=5 if temperature else None, generator=torch.Generator().manual_seed(3))
    assert int(nxt.min()) >= 32, nxt.flatten().tolist()
    assert len(set(nxt.flatten().tolist())) > 1  # not a constant output


def test_a_vqgan_code_one_past_the_layouts_image_ids_is_refused():
    """A VQGAN with one code more than the layout's 64 image ids, whose frame quantizes to that last code: the
    rollout refuses it before the first step rather than writing an id past the image range."""
    model, b = _model(3), _builder()
    torch.manual_seed(0)
    cfg = VQGANConfig(ch=32, ch_mult=(1, 1, 1, 1, 1), num_res_blocks=1, z_channels=32, embed_dim=32, n_embed=65)
    vq = VQGAN(cfg).eval()
    with torch.no_grad():  # every latent's nearest entry is the last one (code 64)
        vq.quantize.embedding.weight[:64] = 1e3
        vq.quantize.embedding.weight[64] = 0.0
    img = np.zeros((64, 64, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="the VQGAN has more codes than the layout's 64 image ids"):
        generate_frames(model, vq, img, np.zeros((1, 4)), action_tokenizer=b.actions, text_tokenizer=b.text)


def test_a_batched_rollouts_frames_are_each_images_own(rng):
    """The frames of a batched rollout ([N, T, H, W, 3]) are the decoded codes of the same image and step."""
    model, b, vq = _model(4), _builder(), _tiny_vqgan()
    imgs = torch.randint(0, 256, (2, 64, 64, 3), generator=rng, dtype=torch.uint8).numpy()
    acts = torch.rand(2, 3, 4, generator=rng).numpy() * 2 - 1
    out = generate_frames(model, vq, imgs, acts, action_tokenizer=b.actions, text_tokenizer=b.text)
    assert out.frames.shape == (2, 3, 64, 64, 3)
    for n in range(2):
        assert np.array_equal(out.frames[n], postprocess(vq.decode(out.codes[n]))), n


def test_a_guidance_scale_of_one_is_no_guidance(rng):
    """cfg_scale=1.0 is the conditional prediction itself: no unconditional branch is decoded (an engine of one
    row a frame serves it) and the codes are the unguided ones."""
    model, b = _model(2), _builder()
    codes = torch.randint(0, 64, (2, 2, 2), generator=rng)
    actions = torch.rand(2, 4, generator=rng).numpy() * 2 - 1
    plain = generate_frame_codes(model, codes, actions, b)
    engine = InferenceEngine(model, 2, 200, layout=LAYOUT)
    assert torch.equal(generate_frame_codes(model, codes, actions, b, cfg_scale=1.0, engine=engine), plain)


@pytest.mark.parametrize("cfg_scale", [None, 2.0])
def test_image_ids_with_other_ids_between_them_are_the_only_choices(rng, cfg_scale):
    """The last image code on an id far past the others (ids of other tokens between them, as the Chameleon
    vocabulary scatters its image ids): every code is chosen among the image ids only, greedily by its logit."""
    lay = dataclasses.replace(LAYOUT, image_code_ids=tuple(range(4, 67)) + (600,))
    model, b = _model(2, lay), _builder(lay)
    codes = torch.randint(0, 64, (1, 2, 4), generator=rng)
    actions = np.array([[0.1, -0.3, 0.5, 0.9]])
    nxt = generate_frame_codes(model, codes, actions, b, cfg_scale=cfg_scale)
    assert int(nxt.min()) >= 0 and int(nxt.max()) < 64
    ids = torch.tensor(lay.image_code_ids)
    answer = image_tokens(nxt[0], lay)
    with torch.no_grad():
        logits = model(torch.cat([b.world_prompt(codes[0], actions[0]), answer]))[-answer.numel() - 1:-1]
        if cfg_scale is not None:
            u = model(torch.cat([_unconditional_prompt(b, codes[0]), answer]))[-answer.numel() - 1:-1]
            logits = u + cfg_scale * (logits - u)
    is_code = torch.isin(answer, ids)
    assert torch.equal(logits[is_code][:, ids].argmax(-1), nxt[0].flatten())


def test_a_sampled_frame_follows_its_generators_seed(rng):
    """Sampled frames are drawn from the given generator: two seeds give two different frames, one seed the same
    frame again."""
    model, b = _model(3), _builder()
    codes = torch.randint(0, 64, (1, 4, 4), generator=rng)
    a = np.array([[0.2, 0.4, -0.6, 0.0]])

    def draw(seed):
        return generate_frame_codes(model, codes, a, b, temperature=2.0, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(draw(5), draw(5)) and not torch.equal(draw(5), draw(6))


def test_actions_for_another_number_of_images_are_refused_before_the_vqgan(monkeypatch):
    """[M, T, D] actions for N != M images (or for one image) are refused by name before any frame is encoded,
    not by the first step's prompt after the VQGAN's work."""
    import re

    model, b, vq = _model(5), _builder(), _tiny_vqgan()
    encoded, encode = [], vq.encode_images
    monkeypatch.setattr(vq, "encode_images", lambda x, **k: encoded.append(len(x)) or encode(x, **k))
    img = np.zeros((64, 64, 3), dtype=np.uint8)
    for images, acts in ((np.stack([img, img]), np.zeros((3, 1, 4))), (np.stack([img, img]), np.zeros((1, 2, 4))),
                         (img, np.zeros((2, 1, 4)))):
        n = len(images) if images.ndim == 4 else 1
        want = re.escape(f"got {acts.shape} for {n} image(s)")
        with pytest.raises(ValueError, match=r"actions must be \[T, 4\] .*" + want):
            generate_frames(model, vq, images, acts, action_tokenizer=b.actions, text_tokenizer=b.text)
    assert not encoded


def _recording_bar(bars: list):
    """A tqdm stand-in class whose bars, appended to `bars`, record their total, count and whether they closed."""

    class Bar:
        def __init__(self, total, **kw):
            self.total, self.n, self.closed = total, 0, False
            bars.append(self)

        def update(self, n=1):
            self.n += n

        def close(self):
            self.closed = True

    return Bar


def test_the_progress_bar_counts_the_rollouts_steps(rng, monkeypatch):
    """progress=True shows one bar over the rollout's T steps (not its N images), advanced once a step and closed
    at the end."""
    import tqdm.auto

    bars = []
    Bar = _recording_bar(bars)

    monkeypatch.setattr(tqdm.auto, "tqdm", Bar)
    model, b, vq = _model(4), _builder(), _tiny_vqgan()
    imgs = torch.randint(0, 256, (3, 32, 32, 3), generator=rng, dtype=torch.uint8).numpy()
    out = generate_frames(model, vq, imgs, np.zeros((3, 2, 4)), action_tokenizer=b.actions, text_tokenizer=b.text,
                          progress=True)
    assert out.codes.shape == (3, 2, 2, 2)
    assert [(bar.total, bar.n, bar.closed) for bar in bars] == [(2, 2, True)]


@pytest.mark.parametrize("guided", [False, True])
def test_frame_needs_exactly_the_slots_it_fills(guided):
    """A frame is fed every code and newline but the last code and the last row's newline: an engine of exactly
    the prompt plus those slots decodes the same codes as a roomier one (the step asked for 2 slots it never
    filled, and refused an engine that fits), and one slot fewer is refused by name."""
    from worldvla.inference.frames import frame_cache_slots

    model, b = _model(5), _builder()
    g = torch.Generator().manual_seed(3)
    codes = torch.randint(0, LAYOUT.n_image_codes, (2, 4, 2), generator=g)
    acts = np.random.default_rng(4).uniform(-1, 1, (2, 4))
    assert frame_cache_slots(4, 2) == 4 * 3 - 2 and frame_cache_slots(1, 1) == 0
    prompt = b.world_prompt(codes[0], acts[0]).numel() + 3  # + BOI, res(h), res(w)
    need = prompt + frame_cache_slots(4, 2)
    rows = 4 if guided else 2
    kw = dict(cfg_scale=2.0 if guided else None)
    roomy = generate_frame_codes(model, codes, acts, b, engine=InferenceEngine(model, rows, need + 7), **kw)
    exact = generate_frame_codes(model, codes, acts, b, engine=InferenceEngine(model, rows, need), **kw)
    assert torch.equal(exact, roomy)
    with pytest.raises(ValueError, match=f"need {need} cache slots; the engine has {need - 1}"):
        generate_frame_codes(model, codes, acts, b, engine=InferenceEngine(model, rows, need - 1), **kw)


def test_a_bfloat16_frame_tensor_is_named_with_its_conversion():
    """generate_frames gave NumPy's bare "Got unsupported ScalarType BFloat16" for a bfloat16 frame tensor; it names
    the dtype, the values and the conversion now, as for other dtypes."""
    model, b, vq = _model(5), _builder(), _tiny_vqgan()
    img = torch.rand(64, 64, 3).to(torch.bfloat16)
    with pytest.raises(ValueError, match=r"image must be uint8 in \[0, 255\], got bfloat16 with values in \[\S+, "
                                         r"[0-9.]+\]; convert with \(x \* 255\)\.round\(\)\.to\(torch\.uint8\)"):
        generate_frames(model, vq, img, np.zeros((1, 4)), action_tokenizer=b.actions, text_tokenizer=b.text)


def test_a_float_frame_whose_pixels_reach_one_is_named_as_a_0_to_1_frame():
    """A float frame in [0, 1] whose brightest pixel is exactly 1.0 is named with the 0..1 conversion; one that
    reaches below 0 with the VQGAN's [-1, 1] one."""
    model, b, vq = _model(5), _builder(), _tiny_vqgan()
    kw = dict(action_tokenizer=b.actions, text_tokenizer=b.text)
    img = np.random.default_rng(0).random((64, 64, 3), dtype=np.float32)
    img[0, 0] = [0.0, 1.0, 0.5]
    with pytest.raises(ValueError, match=r"got float32 with values in \[0, 1\]; convert with "
                                         r"\(x \* 255\)\.round\(\)\.astype\(np\.uint8\)$"):
        generate_frames(model, vq, img, np.zeros((1, 4)), **kw)
    with pytest.raises(ValueError, match=r"got float32 with values in \[-1, 1\]; convert with "
                                         r"\(\(x \+ 1\) \* 127\.5\)\.round\(\)\.astype\(np\.uint8\)$"):
        generate_frames(model, vq, img * 2 - 1, np.zeros((1, 4)), **kw)


def test_a_batch_of_channels_first_frames_is_named_with_its_conversion():
    """[N, 3, H, W] frames (torchvision's layout) are named channels-first for any N, not only N = 3."""
    model, b, vq = _model(5), _builder(), _tiny_vqgan()
    kw = dict(action_tokenizer=b.actions, text_tokenizer=b.text)
    imgs = np.zeros((2, 3, 64, 64), dtype=np.uint8)
    with pytest.raises(ValueError, match=r"got shape \(2, 3, 64, 64\); it looks channels-first: convert with "
                                         r"np\.moveaxis\(x, -3, -1\)"):
        generate_frames(model, vq, imgs, np.zeros((2, 1, 4)), **kw)
    with pytest.raises(ValueError, match=r"it looks channels-first: convert with x\.permute\(0, 2, 3, 1\)"):
        generate_frames(model, vq, torch.from_numpy(imgs), np.zeros((2, 1, 4)), **kw)


def test_one_images_actions_as_d_by_t_are_refused_not_read_as_other_steps(monkeypatch):
    """Actions [D, T] (or any [A, B] with B != D) for one image are refused by shape: read in rows of D they would
    run as other actions without a word."""
    model, b, vq = _model(5), _builder(), _tiny_vqgan()
    encoded = []
    monkeypatch.setattr(vq, "encode_images", lambda *a, **k: encoded.append(1))
    img = np.zeros((64, 64, 3), dtype=np.uint8)
    for bad in (np.zeros((4, 3)), np.zeros((2, 6))):
        with pytest.raises(ValueError, match=rf"actions must be \[T, 4\] \(or \[4\]\) for one image, .*got "
                                             rf"\({bad.shape[0]}, {bad.shape[1]}\) for 1 image\(s\)"):
            generate_frames(model, vq, img, bad, action_tokenizer=b.actions, text_tokenizer=b.text)
    assert not encoded


def test_a_batch_of_one_image_keeps_its_batch_axis(rng):
    """A batch [1, H, W, 3] gives codes [1, T, h, w] and frames [1, T, H, W, 3], the single image's rollout with
    the batch axis kept."""
    model, b, vq = _model(4), _builder(), _tiny_vqgan()
    kw = dict(action_tokenizer=b.actions, text_tokenizer=b.text)
    img = torch.randint(0, 256, (64, 64, 3), generator=rng, dtype=torch.uint8).numpy()
    acts = torch.rand(1, 2, 4, generator=rng).numpy() * 2 - 1
    batch, one = generate_frames(model, vq, img[None], acts, **kw), generate_frames(model, vq, img, acts[0], **kw)
    assert batch.codes.shape == (1, 2, 4, 4) and batch.frames.shape == (1, 2, 64, 64, 3)
    assert torch.equal(batch.codes[0], one.codes) and np.array_equal(batch.frames[0], one.frames)


def test_an_rgba_frame_is_refused_with_its_own_shape_and_conversion():
    """An RGBA frame is refused by generate_frames' own check, naming the frame's shape and x[..., :3], not by the
    VQGAN's preprocessing (which names the batched shape)."""
    model, b, vq = _model(5), _builder(), _tiny_vqgan()
    with pytest.raises(ValueError, match=r"image must be RGB uint8 \[H, W, 3\] or \[N, H, W, 3\], got shape "
                                         r"\(64, 64, 4\); it looks RGBA: convert with x\[\.\.\., :3\]"):
        generate_frames(model, vq, np.zeros((64, 64, 4), np.uint8), np.zeros((1, 4)), action_tokenizer=b.actions,
                        text_tokenizer=b.text)


def test_a_rollout_steps_with_its_draw_and_guidance_settings(rng):
    """Every step of a guided, sampled rollout is generate_frame_codes' step under the same temperature, top_k,
    cfg_scale and generator, fed the step before; the rollout without top_k or without guidance differs (so a
    setting left out of the steps would show)."""
    from worldvla.vqgan import preprocess

    model, b, vq = _model(4), _builder(), _tiny_vqgan()
    kw = dict(action_tokenizer=b.actions, text_tokenizer=b.text)
    img = torch.randint(0, 256, (32, 32, 3), generator=rng, dtype=torch.uint8).numpy()
    acts = torch.rand(2, 4, generator=rng).numpy() * 2 - 1
    settings = dict(temperature=3.0, top_k=2, cfg_scale=2.5)
    out = generate_frames(model, vq, img, acts, generator=torch.Generator().manual_seed(3), **settings, **kw)
    gen, prev = torch.Generator().manual_seed(3), vq.encode(preprocess(img))
    for t in range(2):
        prev = generate_frame_codes(model, prev, acts[t:t + 1], b, generator=gen, **settings)
        assert torch.equal(out.codes[t], prev[0]), t
    for changed in ({"top_k": None}, {"cfg_scale": None}):
        other = generate_frames(model, vq, img, acts, generator=torch.Generator().manual_seed(3),
                                **{**settings, **changed}, **kw)
        assert not torch.equal(other.codes, out.codes), changed


@pytest.mark.parametrize("native_loop", [True, False], ids=["native-loop", "python-loop"])
def test_a_sampled_frames_codes_are_gumbel_max_draws_of_their_own_noise(rng, monkeypatch, native_loop):
    """Each code of a sampled frame is argmax(logits + T * G) with G the frame's own Gumbel noise, drawn an image
    row at a time from its generator, code i taking row i % w: two codes that shared one noise row would not be
    independent draws (the first code and the second, say)."""
    from worldvla.inference import frames
    from worldvla.inference.frames import _item_generators
    from worldvla.ops.sampling import draw_gumbel

    monkeypatch.setattr(frames, "NATIVE_FRAME_LOOP", native_loop)
    model, b = _model(3), _builder()
    h, w, T = 2, 4, 1.5
    codes = torch.randint(0, 64, (1, h, w), generator=rng)
    a = np.array([[0.2, 0.4, -0.6, 0.0]])
    nxt = generate_frame_codes(model, codes, a, b, temperature=T, generator=torch.Generator().manual_seed(8))
    g, = _item_generators(torch.Generator().manual_seed(8), 1, torch.device("cpu"))
    noise = torch.cat([draw_gumbel((w, 64), g, "cpu") for _ in range(h)])  # [h * w, codes]
    lo, hi = LAYOUT.image_id_range
    answer = image_tokens(nxt[0], LAYOUT)
    with torch.no_grad():
        logits = model(torch.cat([b.world_prompt(codes[0], a[0]), answer]))[-answer.numel() - 1:-1, lo:hi]
    is_code = (answer >= lo) & (answer < hi)
    assert torch.equal((logits[is_code].float() + T * noise).argmax(-1), nxt[0].flatten())


def test_a_numpy_bool_frame_is_named_with_a_conversion_to_uint8():
    """A NumPy bool frame (a mask) is refused naming x.astype(np.uint8) * 255: following it gives a uint8 frame of
    0 and 255, which generate_frames takes."""
    import re

    from worldvla.inference.frames import FrameDtypeError

    model, b, vq = _model(5), _builder(), _tiny_vqgan()
    kw = dict(action_tokenizer=b.actions, text_tokenizer=b.text)
    mask = np.random.default_rng(0).random((32, 32, 3)) > 0.5
    with pytest.raises(FrameDtypeError, match=r"got bool; convert with x\.astype\(np\.uint8\) \* 255$") as e:
        generate_frames(model, vq, mask, np.zeros((1, 4)), **kw)
    fixed = eval(re.search(r"convert with (.+)$", str(e.value)).group(1), {"np": np, "x": mask})
    assert fixed.dtype == np.uint8 and np.array_equal(fixed, np.where(mask, 255, 0))
    assert generate_frames(model, vq, fixed, np.zeros((1, 4)), **kw).codes.shape == (1, 2, 2)


def test_frames_that_are_not_numbers_are_named_as_such():
    """Frames of strings or of Python objects are refused as frames that are not numeric (a FrameDtypeError naming
    np.asarray(x, dtype=np.uint8)), not by a NumPy reduction's error nor as an "object" frame with values."""
    from worldvla.inference.frames import FrameDtypeError

    model, b, vq = _model(5), _builder(), _tiny_vqgan()
    kw = dict(action_tokenizer=b.actions, text_tokenizer=b.text)
    for bad in (np.full((32, 32, 3), "a"), np.zeros((32, 32, 3), dtype=np.uint8).astype(object)):
        want = (rf"^image must be uint8 in \[0, 255\], got {bad.dtype}; give RGB pixels as a numeric array, "
                r"e\.g\. np\.asarray\(x, dtype=np\.uint8\)$")
        with pytest.raises(FrameDtypeError, match=want):
            generate_frames(model, vq, bad, np.zeros((1, 4)), **kw)


@pytest.mark.parametrize("dtype", [np.int64, np.float32])
@pytest.mark.parametrize("tensor", [False, True], ids=["numpy", "torch"])
def test_frames_beyond_0_to_255_are_named_with_a_clipping_conversion(dtype, tensor):
    """Integer or float pixels below 0 or above 255 are named with a conversion that clips them first: following it
    gives the clipped frame, where a bare cast would wrap -20 to 236 and 300 to 44."""
    import re

    model, b, vq = _model(5), _builder(), _tiny_vqgan()
    kw = dict(action_tokenizer=b.actions, text_tokenizer=b.text)
    x = np.random.default_rng(1).integers(-40, 300, (32, 32, 3)).astype(dtype)
    x[0, 0] = [-20, 300, 7]
    want = np.clip(x, 0, 255).round().astype(np.uint8)
    bad = torch.from_numpy(x) if tensor else x
    with pytest.raises(ValueError, match=r"with values in \[-\d+, \d+\]; convert with") as e:
        generate_frames(model, vq, bad, np.zeros((1, 4)), **kw)
    fixed = eval(re.search(r"convert with (.+)$", str(e.value)).group(1), {"np": np, "torch": torch, "x": bad})
    fixed = fixed.numpy() if tensor else fixed
    assert fixed.dtype == np.uint8 and np.array_equal(fixed, want)


@pytest.mark.parametrize("tensor", [False, True], ids=["numpy", "torch"])
def test_a_batch_of_one_channel_frames_is_named_grayscale(tensor):
    """A batch [N, H, W, 1] is named grayscale, as a single [H, W, 1] frame is, with a conversion that gives
    [N, H, W, 3]."""
    import re

    model, b, vq = _model(5), _builder(), _tiny_vqgan()
    gray = np.random.default_rng(2).integers(0, 256, (2, 32, 32, 1)).astype(np.uint8)
    bad = torch.from_numpy(gray) if tensor else gray
    with pytest.raises(ValueError, match=r"got shape \(2, 32, 32, 1\); it looks grayscale: convert with") as e:
        generate_frames(model, vq, bad, np.zeros((2, 1, 4)), action_tokenizer=b.actions, text_tokenizer=b.text)
    fixed = eval(re.search(r"convert with (.+)$", str(e.value)).group(1), {"np": np, "torch": torch, "x": bad})
    fixed = np.asarray(fixed)
    assert fixed.shape == (2, 32, 32, 3) and all(np.array_equal(fixed[..., c], gray[..., 0]) for c in range(3))


def test_a_rollout_with_a_guidance_scale_of_one_is_the_unguided_rollout(rng):
    """generate_frames(cfg_scale=1.0) is no guidance, as in generate_frame_codes: the unguided rollout's codes (its
    engine holds one row an image, which the steps take)."""
    model, b, vq = _model(4), _builder(), _tiny_vqgan()
    kw = dict(action_tokenizer=b.actions, text_tokenizer=b.text)
    imgs = torch.randint(0, 256, (2, 32, 32, 3), generator=rng, dtype=torch.uint8).numpy()
    acts = torch.rand(2, 2, 4, generator=rng).numpy() * 2 - 1
    plain = generate_frames(model, vq, imgs, acts, **kw)
    one = generate_frames(model, vq, imgs, acts, cfg_scale=1.0, **kw)
    assert torch.equal(one.codes, plain.codes) and np.array_equal(one.frames, plain.frames)


def test_the_first_non_finite_action_is_the_one_named(monkeypatch):
    """Actions with NaN or inf at several steps: the error names the first (by image, then step)."""
    model, b, vq = _model(5), _builder(), _tiny_vqgan()
    kw = dict(action_tokenizer=b.actions, text_tokenizer=b.text)
    monkeypatch.setattr(vq, "encode_images", lambda *a, **k: pytest.fail("encoded"))
    img = np.zeros((32, 32, 3), dtype=np.uint8)
    acts = np.zeros((6, 4))
    acts[1, 3], acts[4, 0] = np.nan, np.inf
    with pytest.raises(ValueError, match=r"actions must be finite: step 1 holds NaN or inf"):
        generate_frames(model, vq, img, acts, **kw)
    batch = np.zeros((2, 3, 4))
    batch[0, 2, 1], batch[1, 0, 0] = np.inf, np.nan
    with pytest.raises(ValueError, match=r"actions must be finite: image 0, step 2 holds NaN or inf"):
        generate_frames(model, vq, np.stack([img, img]), batch, **kw)


def test_the_progress_bar_is_closed_when_a_step_fails(rng, monkeypatch):
    """A rollout whose second step raises leaves no progress bar open: the bar counted the first step and is
    closed, and the step's error is what the caller sees."""
    import tqdm.auto

    from worldvla.inference import frames

    bars = []
    Bar = _recording_bar(bars)

    class StepFailed(Exception):
        pass

    real, calls = frames.generate_frame_codes, []

    def failing(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise StepFailed()
        return real(*a, **k)

    monkeypatch.setattr(tqdm.auto, "tqdm", Bar)
    monkeypatch.setattr(frames, "generate_frame_codes", failing)
    model, b, vq = _model(4), _builder(), _tiny_vqgan()
    img = torch.randint(0, 256, (32, 32, 3), generator=rng, dtype=torch.uint8).numpy()
    with pytest.raises(StepFailed):
        generate_frames(model, vq, img, np.zeros((3, 4)), action_tokenizer=b.actions, text_tokenizer=b.text,
                        progress=True)
    assert [(bar.total, bar.n, bar.closed) for bar in bars] == [(3, 1, True)]


@pytest.mark.parametrize("guided", [False, True])
def test_an_engine_of_more_rows_than_the_step_is_refused_by_name(rng, guided):
    """An engine holds one row a frame (two when guided): one with a row more than the step needs is refused, naming
    both counts, as one with a row fewer is."""
    model, b = _model(5), _builder()
    codes = torch.randint(0, 64, (2, 2, 2), generator=rng)
    acts = np.zeros((2, 4))
    rows = 4 if guided else 2
    for other in (rows - 1, rows + 1):
        with pytest.raises(ValueError, match=f"the engine holds {other} rows but this step needs {rows}"):
            generate_frame_codes(model, codes, acts, b, cfg_scale=2.0 if guided else None,
                                 engine=InferenceEngine(model, other, 200))


def test_the_advice_for_a_batchs_actions_gives_actions_it_takes(rng):
    """A batch of images with [T, D] actions is refused naming np.repeat(actions[None], N, axis=0) for the same steps
    from every image: following it gives [N, T, D] actions, whose rollout is each image's rollout of those steps."""
    import re

    model, b, vq = _model(4), _builder(), _tiny_vqgan()
    kw = dict(action_tokenizer=b.actions, text_tokenizer=b.text)
    imgs = torch.randint(0, 256, (2, 32, 32, 3), generator=rng, dtype=torch.uint8).numpy()
    actions = torch.rand(3, 4, generator=rng).numpy() * 2 - 1
    with pytest.raises(ValueError, match=r"np\.repeat\(actions\[None\], 2, axis=0\) for the same steps") as e:
        generate_frames(model, vq, imgs, actions, **kw)
    fixed = eval(re.search(r"(np\.repeat\(.+?\)) for the same steps", str(e.value)).group(1),
                 {"np": np, "actions": actions})
    assert fixed.shape == (2, 3, 4)
    out = generate_frames(model, vq, imgs, fixed, **kw)
    assert torch.equal(out.codes[1], generate_frames(model, vq, imgs[1], actions, **kw).codes)


@pytest.mark.parametrize("settings", [{"temperature": -1.0}, {"top_k": 5}, {"temperature": True}],
                         ids=["negative", "top-k-greedy", "bool"])
def test_sampling_settings_are_refused_before_the_vqgan_encodes(monkeypatch, settings):
    """A temperature below 0, a top_k with greedy codes, or a bool temperature is refused by generate_frames before
    the VQGAN encodes a frame (not by the first step, after the encoder's work)."""
    model, b, vq = _model(5), _builder(), _tiny_vqgan()
    encoded = []
    monkeypatch.setattr(vq, "encode_images", lambda *a, **k: encoded.append(1))
    with pytest.raises(ValueError, match="temperature must be a finite number|top_k applies to draws"):
        generate_frames(model, vq, np.zeros((32, 32, 3), np.uint8), np.zeros((1, 4)), action_tokenizer=b.actions,
                        text_tokenizer=b.text, **settings)
    assert not encoded


def test_a_bool_temperature_is_refused(rng):
    """temperature=True is no temperature (it read as 1.0 and drew codes): refused by name, as a bool cfg_scale is."""
    model, b = _model(0), _builder()
    codes = torch.randint(0, 64, (1, 2, 2), generator=rng)
    for t in (True, False):
        with pytest.raises(ValueError, match=rf"temperature must be a finite number >= 0 .*got {t!r}"):
            generate_frame_codes(model, codes, np.zeros((1, 4)), b, temperature=t,
                                 generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("native_loop", [True, False], ids=["native-loop", "python-loop"])
def test_a_frame_on_an_engine_that_decoded_action_chunks_is_a_fresh_engines_frame(rng, monkeypatch, native_loop):
    """One engine serves action chunks and frames alike: the chunk decoder leaves its step buffers' query limits at
    a block's, which the frame's steps (no action block) must not inherit; the frame is the fresh engine's."""
    from worldvla.inference import frames, generate_action_chunk

    monkeypatch.setattr(frames, "NATIVE_FRAME_LOOP", native_loop)
    model, b = _model(1), _builder()
    codes = torch.randint(0, 64, (2, 4, 6), generator=rng)
    actions = torch.rand(2, 4, generator=rng).numpy() * 2 - 1
    want = generate_frame_codes(model, codes, actions, b)
    engine = InferenceEngine(model, 2, 300, layout=LAYOUT)
    generate_action_chunk(model, [b.action_prompt("push", [codes[i]]) for i in range(2)], LAYOUT, 3, 4,
                          engine=engine, mode="sequential")
    assert (engine.buffers(1).q_limit != -1).any()  # a block's limit left in the step buffer
    assert torch.equal(generate_frame_codes(model, codes, actions, b, engine=engine), want)


def test_a_frame_tensor_that_requires_grad_is_read_and_named_with_its_conversion():
    """A float frame tensor that requires grad (a rendered or generated image), read outside torch.no_grad as the
    policy's act reads its frames: frame_array gives its values (a bfloat16 one as float32, naming bfloat16), and the
    policy refuses it as a float frame with the torch conversion, not with torch's "Can't call numpy() on Tensor that
    requires grad"."""
    from worldvla.inference import WorldVLAPolicy
    from worldvla.inference.frames import FrameDtypeError, frame_array

    img = torch.rand(32, 32, 3, generator=torch.Generator().manual_seed(0))
    a, name = frame_array(img.clone().requires_grad_())
    assert name is None and a.dtype == np.float32 and np.array_equal(a, img.numpy())
    a, name = frame_array(img.bfloat16().requires_grad_())
    assert name == "bfloat16" and a.dtype == np.float32 and np.array_equal(a, img.bfloat16().float().numpy())
    pol = WorldVLAPolicy.__new__(WorldVLAPolicy)  # only its frame check is exercised
    pol.image_size = 32
    with pytest.raises(FrameDtypeError, match=r"got float32 with values in \[[0-9.e-]+, [0-9.e-]+\]; convert with "
                                              r"\(x \* 255\)\.round\(\)\.to\(torch\.uint8\)$"):
        pol._frames(img.clone().requires_grad_())


@pytest.mark.parametrize("tensor", [False, True], ids=["numpy", "torch"])
def test_fractional_float_pixels_beyond_0_to_255_are_rounded_by_the_named_conversion(tensor):
    """Float pixels with fractions, some below 0 or above 255: the conversion named clips and rounds them (a bare
    cast after the clip would truncate 254.7 to 254), giving np.clip(x, 0, 255).round() as uint8."""
    import re

    model, b, vq = _model(5), _builder(), _tiny_vqgan()
    x = np.random.default_rng(3).uniform(-40, 300, (32, 32, 3)).astype(np.float32)
    x[0, 0] = [-20.5, 300.25, 254.7]
    want = np.clip(x, 0, 255).round().astype(np.uint8)
    bad = torch.from_numpy(x) if tensor else x
    with pytest.raises(ValueError, match=r"with values in \[-\S+, \S+\]; convert with") as e:
        generate_frames(model, vq, bad, np.zeros((1, 4)), action_tokenizer=b.actions, text_tokenizer=b.text)
    fixed = eval(re.search(r"convert with (.+)$", str(e.value)).group(1), {"np": np, "torch": torch, "x": bad})
    fixed = fixed.numpy() if tensor else fixed
    assert fixed.dtype == np.uint8 and np.array_equal(fixed, want) and fixed[0, 0, 2] == 255


def test_the_layout_given_to_a_rollout_wins_over_the_models_own(rng):
    """generate_frames(layout=...) tokenizes with the layout given, not the one the model carries: a model whose own
    layout puts the image codes on other ids rolls out, given the right layout, as the model carrying it does."""
    model, b, vq = _model(4), _builder(), _tiny_vqgan()
    kw = dict(action_tokenizer=b.actions, text_tokenizer=b.text)
    img = torch.randint(0, 256, (32, 32, 3), generator=rng, dtype=torch.uint8).numpy()
    acts = torch.rand(2, 4, generator=rng).numpy() * 2 - 1
    want = generate_frames(model, vq, img, acts, **kw)
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(5))
    other = dataclasses.replace(LAYOUT, image_code_ids=tuple((4 + perm).tolist()), name="permuted")
    model.layout = other
    assert not torch.equal(generate_frames(model, vq, img, acts, **kw).codes, want.codes)  # the model's own layout
    got = generate_frames(model, vq, img, acts, layout=LAYOUT, **kw)
    assert torch.equal(got.codes, want.codes) and np.array_equal(got.frames, want.frames)


@pytest.mark.parametrize("cfg_scale", [None, 2.0])
def test_a_rollouts_engine_holds_exactly_the_slots_its_frames_fill(rng, monkeypatch, cfg_scale):
    """generate_frames builds one engine for all its steps, of one row an image (two when guided) and exactly the
    prompt (with the frame's header) plus the slots a frame fills: no cache memory that no step uses."""
    from worldvla.inference import frames
    from worldvla.inference.frames import frame_cache_slots

    built = []

    class Recording(InferenceEngine):
        def __init__(self, model, batch_size, max_len, **kw):
            built.append((batch_size, max_len))
            super().__init__(model, batch_size, max_len, **kw)

    monkeypatch.setattr(frames, "InferenceEngine", Recording)
    model, b, vq = _model(4), _builder(), _tiny_vqgan()
    imgs = torch.randint(0, 256, (2, 32, 32, 3), generator=rng, dtype=torch.uint8).numpy()
    acts = torch.rand(2, 2, 4, generator=rng).numpy() * 2 - 1
    out = generate_frames(model, vq, imgs, acts, cfg_scale=cfg_scale, action_tokenizer=b.actions, text_tokenizer=b.text)
    assert out.codes.shape == (2, 2, 2, 2)  # 2 x 2 codes a frame; the prompt's length depends on the grid only
    prompt = b.world_prompt(out.codes[0, 0], acts[0, 0]).numel() + 3  # + BOI, res(h), res(w)
    assert built == [(4 if cfg_scale else 2, prompt + frame_cache_slots(2, 2))]


def test_a_list_of_frames_of_different_sizes_is_refused_naming_their_shapes(rng):
    """A list of frames of different sizes cannot be stacked into one batch: the error names the shapes and asks
    for one size, as the policy's does, rather than NumPy's "inhomogeneous shape"."""
    model, b, vq = _model(4), _builder(), _tiny_vqgan()
    frames = [torch.randint(0, 256, (32, 32, 3), generator=rng, dtype=torch.uint8).numpy(),
              torch.randint(0, 256, (64, 48, 3), generator=rng, dtype=torch.uint8).numpy()]
    with pytest.raises(ValueError, match=r"^image must all have one size \(\[N, H, W, 3\]\), got frames of shapes "
                                         r"\[\(32, 32, 3\), \(64, 48, 3\)\]: resize them to one size first$"):
        generate_frames(model, vq, frames, np.zeros((2, 1, 4)), action_tokenizer=b.actions, text_tokenizer=b.text)
