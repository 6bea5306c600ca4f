"""WorldVLAPolicy: folder format, history semantics, caches, batching, resizing, errors."""
import json
import os

import numpy as np
import pytest
import torch

from worldvla import ActionTokenizer, SequenceBuilder, VocabLayout
from worldvla.inference import InferenceEngine, WorldVLAPolicy, generate_action_chunk, save_policy
from worldvla.model import ModelConfig, WorldVLA
from worldvla.tokens import ByteTextTokenizer
from worldvla.vqgan import VQGAN, VQGANConfig, preprocess

LAYOUT = VocabLayout.compact(n_image_codes=64)
LOW, HIGH = [-1.0, -2.0, 0.0, -1.0], [1.0, 2.0, 1.0, 1.0]



def _parts(seed=0):
    g = torch.Generator().manual_seed(seed)
    model = WorldVLA(ModelConfig.tiny(LAYOUT)).init_weights(0.5, generator=g).eval()
    torch.manual_seed(seed)
    cfg = VQGANConfig(ch=32, ch_mult=(1, 1, 1, 1, 1), num_res_blocks=1, z_channels=32, embed_dim=32, n_embed=64)
    return model, VQGAN(cfg).eval(), ActionTokenizer(LAYOUT, LOW, HIGH)


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("pol") / "policy"
    model, vq, at = _parts()
    save_policy(path, model, vq, at, chunk_size=3, image_size=64, history=2, extra={"task": "demo"})
    return path


def _frames(rng, n=None, size=64):
    shape = (size, size, 3) if n is None else (n, size, size, 3)
    return torch.randint(0, 256, shape, generator=rng, dtype=torch.uint8).numpy()


def _expected(policy, instruction, frames):
    """The chunk from scratch: encode the frames, build the release prompt, decode, de-normalize."""
    codes = [policy.vqgan.encode(preprocess(f))[0] for f in frames]
    b = SequenceBuilder(LAYOUT, ByteTextTokenizer(LAYOUT), policy.action_tokenizer)
    ids = generate_action_chunk(policy.model, b.action_prompt(instruction, codes), LAYOUT, policy.chunk_size,
                                policy.action_dim, mode="sequential")
    return policy.action_tokenizer.decode(ids.numpy()).astype(np.float32)


def test_folder_format_and_metadata(policy_dir):
    info = json.loads((policy_dir / "policy.json").read_text())
    assert info["action_low"] == LOW and info["action_high"] == HIGH
    assert (info["chunk_size"], info["action_dim"], info["image_size"], info["history"]) == (3, 4, 64, 2)
    assert info["extra"] == {"task": "demo"}
    assert (policy_dir / "model" / "config.json").is_file() and (policy_dir / "vqgan" / "config.json").is_file()
    pol = WorldVLAPolicy.from_pretrained(policy_dir, device="cpu")
    assert (pol.chunk_size, pol.action_dim, pol.image_size) == (3, 4, 64)
    meta = pol.metadata()
    assert meta["image_size"] == 64 and meta["chunk_size"] == 3 and meta["action_dim"] == 4
    assert meta["model"]["num_hidden_layers"] == 2 and meta["model"]["parameters"] == pol.model.num_parameters()
    json.dumps(meta)  # serializable (the server sends it)


def test_a_byte_text_policy_takes_no_text_tokenizer(tmp_path, policy_dir):
    """A compact-layout model encodes text as byte ids: save_policy refuses a text_tokenizer.json for it,
    and a folder holding a stray one (an export from a store built before such copies were removed)
    still loads with the byte tokenizer its model was trained with."""
    import shutil

    from worldvla.tokens import ByteTextTokenizer

    model, vq, at = _parts()
    stray = tmp_path / "text_tokenizer.json"
    stray.write_text("{}")  # not even a tokenizer: it must not be read
    with pytest.raises(ValueError, match="byte ids.*drop text_tokenizer_json="):
        save_policy(tmp_path / "p", model, vq, at, chunk_size=3, image_size=64, text_tokenizer_json=stray)
    folder = tmp_path / "old"
    shutil.copytree(policy_dir, folder)
    shutil.copyfile(stray, folder / "text_tokenizer.json")
    pol = WorldVLAPolicy.from_pretrained(folder, device="cpu")
    assert isinstance(pol.text_tokenizer, ByteTextTokenizer)


def test_save_is_atomic_and_replaces(tmp_path):
    model, vq, at = _parts(1)
    path = tmp_path / "p"
    save_policy(path, model, vq, at, 2, 64)
    save_policy(path, model, vq, at, 5, 64)  # overwrite an existing policy
    assert json.loads((path / "policy.json").read_text())["chunk_size"] == 5
    assert sorted(os.listdir(tmp_path)) == ["p"]  # no temporary folders left behind

    class Boom(Exception):
        pass

    def broken_save(_):
        raise Boom()

    vq.save_pretrained = broken_save
    with pytest.raises(Boom):
        save_policy(path, model, vq, at, 7, 64)
    assert json.loads((path / "policy.json").read_text())["chunk_size"] == 5  # the old policy survives
    assert sorted(os.listdir(tmp_path)) == ["p"]
    with pytest.raises(ValueError, match="multiple"):
        save_policy(tmp_path / "q", model, _parts()[1], at, 2, 48)
    # a VQGAN of another factor than the layout's patch: every frame's resolution tokens would be wrong
    coarse = VQGAN(VQGANConfig(ch=32, ch_mult=(1, 1, 1, 1, 1, 1), num_res_blocks=1, z_channels=32, embed_dim=32,
                               n_embed=64)).eval()
    assert coarse.downsample == 2 * LAYOUT.patch
    with pytest.raises(ValueError, match=f"downsamples by {coarse.downsample} but .* counts {LAYOUT.patch} px"):
        save_policy(tmp_path / "q", model, coarse, at, 2, 64)
    with pytest.raises(ValueError, match="downsamples by"):
        WorldVLAPolicy(model, coarse, at, chunk_size=2, image_size=64)
    assert not (tmp_path / "q").exists()
    with pytest.raises(FileNotFoundError, match="policy.json"):
        WorldVLAPolicy.from_pretrained(tmp_path)


def test_dtype_by_name(policy_dir):
    """The short names of the command lines' --dtype work in the Python API too; others are refused by name."""
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("float16", torch.float16),
                        (torch.bfloat16, torch.bfloat16)):
        pol = WorldVLAPolicy.from_pretrained(policy_dir, device="cpu", dtype=name)
        assert next(pol.model.parameters()).dtype == dtype
    assert next(WorldVLAPolicy.from_pretrained(policy_dir, device="cpu").model.parameters()).dtype == torch.float32
    for bad in ("int8", "fp8", torch.int32):
        with pytest.raises(ValueError, match="dtype must be one of float32, fp32, bfloat16"):
            WorldVLAPolicy.from_pretrained(policy_dir, device="cpu", dtype=bad)


def test_a_gpu_that_is_not_there_is_refused_by_name(policy_dir, monkeypatch):
    """Asking for CUDA where torch sees no GPU, or for a GPU index past the last, names the problem
    (serve, eval and imagine load through here) instead of failing deep in torch."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="sees no CUDA GPU"):
        WorldVLAPolicy.from_pretrained(policy_dir, device="cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ValueError, match=r"sees 2 CUDA GPU\(s\) \(cuda:0 to cuda:1\)"):
        WorldVLAPolicy.from_pretrained(policy_dir, device="cuda:2")


def test_damaged_policy_files_are_named(policy_dir, tmp_path):
    """A cut-short model.safetensors was a raw SafetensorError traceback; a broken policy.json a JSON error
    without the file's path."""
    import shutil

    broken = tmp_path / "policy"
    shutil.copytree(policy_dir, broken)
    weights = broken / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ValueError, match=f"{weights}: the weights file cannot be read .*damaged or cut short"):
        WorldVLAPolicy.from_pretrained(broken, device="cpu")
    shutil.copy(policy_dir / "model" / "model.safetensors", weights)
    config = broken / "model" / "config.json"
    config.write_text(config.read_text()[:50])
    with pytest.raises(ValueError, match=f"{config}: not a valid model config"):
        WorldVLAPolicy.from_pretrained(broken, device="cpu")
    shutil.copy(policy_dir / "model" / "config.json", config)

    info = broken / "policy.json"
    info.write_text(info.read_text()[:-20])
    with pytest.raises(ValueError, match=f"{info}: not a valid policy file"):
        WorldVLAPolicy.from_pretrained(broken, device="cpu")
    info.write_text(json.dumps({"chunk_size": 3}))
    with pytest.raises(ValueError, match=r"policy.json: keys \['action_low', 'action_high', 'image_size'\] are "
                                         r"missing"):
        WorldVLAPolicy.from_pretrained(broken, device="cpu")
    info.write_text("[1, 2]")
    with pytest.raises(ValueError, match="not an object"):
        WorldVLAPolicy.from_pretrained(broken, device="cpu")


def test_history_semantics(policy_dir, rng):
    """First query: current frame only; later: the last frame given to act/observe, or explicit history."""
    pol = WorldVLAPolicy.from_pretrained(policy_dir, device="cpu")
    f0, f1, f2, f3 = _frames(rng), _frames(rng), _frames(rng), _frames(rng)
    pol.reset("open the drawer")
    a0 = pol.act(f0)
    assert a0.shape == (3, 4) and a0.dtype == np.float32
    assert np.array_equal(a0, _expected(pol, "open the drawer", [f0]))
    assert np.array_equal(pol.act(f1), _expected(pol, "open the drawer", [f0, f1]))
    pol.observe(f2)
    assert np.array_equal(pol.act(f3), _expected(pol, "open the drawer", [f2, f3]))
    assert np.array_equal(pol.act(f1, history=f0), _expected(pol, "open the drawer", [f0, f1]))
    assert np.array_equal(pol.act(f1, history=None), _expected(pol, "open the drawer", [f1]))
    lo, hi = np.array(LOW), np.array(HIGH)
    assert ((a0 >= lo - 1e-6) & (a0 <= hi + 1e-6)).all()
    pol.reset("open the drawer")  # a new episode forgets the frames
    assert np.array_equal(pol.act(f3), _expected(pol, "open the drawer", [f3]))


def test_history_is_a_copy_of_the_frame(policy_dir, rng):
    """Camera drivers refill one buffer in place every step: the remembered history frame must be the
    frame as it was given, not a view of the buffer."""
    pol = WorldVLAPolicy.from_pretrained(policy_dir, device="cpu")
    f0, f1 = _frames(rng), _frames(rng)
    buf = f0.copy()
    pol.reset("open the drawer")
    pol.act(buf)
    buf[...] = f1  # the driver's next frame, in place
    assert np.array_equal(pol.act(buf), _expected(pol, "open the drawer", [f0, f1]))


def test_step_runs_chunks_open_loop(policy_dir, rng):
    pol = WorldVLAPolicy.from_pretrained(policy_dir, device="cpu")
    frames = [_frames(rng) for _ in range(5)]
    pol.reset("push the button")
    got = [pol.step(f) for f in frames]
    chunk0 = _expected(pol, "push the button", [frames[0]])
    chunk1 = _expected(pol, "push the button", [frames[2], frames[3]])  # previous env step's frame + current
    assert np.array_equal(np.stack(got[:3]), chunk0)
    assert np.array_equal(np.stack(got[3:]), chunk1[:2])


def test_batched_envs_equal_single(policy_dir, rng):
    pol = WorldVLAPolicy.from_pretrained(policy_dir, device="cpu")
    instr = ["open the drawer", "pick up the red cup now", "push"]
    prev, cur = _frames(rng, 3), _frames(rng, 3)
    pol.reset(instr)
    first = pol.act(prev)
    out = pol.act(cur)
    assert first.shape == out.shape == (3, 3, 4)
    for i in range(3):
        assert np.array_equal(first[i], _expected(pol, instr[i], [prev[i]]))
        assert np.array_equal(out[i], _expected(pol, instr[i], [prev[i], cur[i]]))
    with pytest.raises(ValueError, match="3 instructions"):
        pol.act(cur[:2])
    # One instruction broadcast over any number of environments (a subset of envs with explicit history).
    pol.reset("push")
    sub = pol.act(cur[:2], history=prev[:2])
    assert np.array_equal(sub[1], _expected(pol, "push", [prev[1], cur[1]]))
    with pytest.raises(ValueError, match="history="):
        pol.act(cur)  # the recorded frames are for 2 environments


def test_vq_codes_are_cached(policy_dir, rng):
    pol = WorldVLAPolicy.from_pretrained(policy_dir, device="cpu")
    encoded = []
    real = pol.vqgan.encode

    def counting(pix, *a, **k):
        encoded.append(pix.shape[0])
        return real(pix, *a, **k)

    pol.vqgan.encode = counting
    pol.reset("open the drawer")
    f = [_frames(rng) for _ in range(4)]
    pol.act(f[0])
    pol.act(f[1])               # previous = f0, already encoded
    pol.observe(f[2])
    pol.act(f[3])               # f2 and f3 are new: one call with both
    assert encoded == [1, 1, 2]
    # A full cache drops its least recently used codes, not the newest: with room for 2, the frame just
    # encoded is still there for the next query's history.
    pol._code_cache_size = 2
    pol.reset("open the drawer")
    f = [_frames(rng) for _ in range(4)]
    encoded.clear()
    for frame in f:             # each query: the previous frame's codes cached, the new frame encoded
        pol.act(frame)
    assert encoded == [1, 1, 1, 1]


def test_prefix_cache_reused_across_queries(policy_dir, rng):
    pol = WorldVLAPolicy.from_pretrained(policy_dir, device="cpu")
    pol.reset(["open the drawer", "push"])
    pol.act(_frames(rng, 2))
    snap = dict(pol._prefixes)
    assert list(snap) == ["open the drawer", "push"]
    pol.reset(["open the drawer", "push"])  # a new episode with the same instructions keeps the prefix
    eng = pol._engines[2]
    eng.cache.k.normal_()       # poison the cache: the next query must restore the prefix itself
    prev, cur = _frames(rng, 2), _frames(rng, 2)
    out = pol.act(cur, history=prev)
    assert all(pol._prefixes[ins] is kv for ins, kv in snap.items())
    assert np.array_equal(out[0], _expected(pol, "open the drawer", [prev[0], cur[0]]))


def test_prefixes_are_kept_by_instruction_whatever_the_batch(policy_dir, rng, monkeypatch):
    """Robots sharing batches in changing mixes and orders (as a server batches them): each instruction's
    prefix is computed once, and a robot's chunk does not depend on whom it shares a batch with."""
    pol = WorldVLAPolicy.from_pretrained(policy_dir, device="cpu")
    computed = []  # prefills from the first token: prefix computations (a query's own prefill skips its prefix)
    prefill = InferenceEngine.prefill

    def counting(self, prompts, skip=None, **kw):
        if skip is None or not any(skip):
            computed.append(len(prompts))
        return prefill(self, prompts, skip, **kw)

    monkeypatch.setattr(InferenceEngine, "prefill", counting)
    names = ["open the drawer", "push", "press the red button", "close the window"]
    frames = {n: _frames(rng, 1)[0] for n in names}
    alone = {}
    for n in names:
        pol.reset(n)
        alone[n] = pol.act(frames[n], history=None)
    assert len(computed) == 4
    for mix in (names, names[::-1], names[1:3], [names[2], names[0], names[2]], names[::2]):
        pol.reset(mix)
        out = pol.act(np.stack([frames[n] for n in mix]), history=None)
        for n, chunk in zip(mix, out):
            assert np.array_equal(chunk, alone[n]), (mix, n)
    assert len(computed) == 4  # every mix restored the four prefixes


def test_prefix_cache_follows_new_weights(policy_dir, rng):
    """Weights loaded in place (same tensors, new values) make the cached instruction prefixes stale: the
    next query is a fresh policy's on the new weights."""
    pol = WorldVLAPolicy.from_pretrained(policy_dir, device="cpu")
    pol.reset("open the drawer")
    frame = _frames(rng)
    before = pol.act(frame, history=None)
    other, _, _ = _parts(seed=1)
    pol.model.load_state_dict(other.state_dict())
    after = pol.act(frame, history=None)
    fresh = WorldVLAPolicy(other, pol.vqgan, pol.action_tokenizer, chunk_size=3, image_size=64)
    fresh.reset("open the drawer")
    assert np.array_equal(after, fresh.act(frame, history=None)) and not np.array_equal(after, before)


def _bf16_exact(module):
    """`module` with every float32 weight rounded to a bfloat16 value (a bfloat16 checkpoint loaded as float32):
    the CPU's native steps then hold bfloat16 copies of its projections."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    return module


def test_clear_caches_after_writes_through_data(rng, monkeypatch, native_step_runs):
    """Weights written through `.data` (an EMA, a weight sync) bump no version counter, so the instruction
    prefixes, the frames' VQ codes and the native steps' bfloat16 weight copies stayed those of the old weights;
    after `clear_caches()` every query is a fresh policy's on the new weights."""
    from worldvla.ops import decoder, dispatch

    monkeypatch.setitem(dispatch.AUTO_ORDER, ("decoder_layer", "cpu"), ("native", "torch"))
    monkeypatch.setattr(decoder, "NATIVE_STEP", True)
    monkeypatch.setattr(decoder, "BF16_EXACT_WEIGHTS", True)
    model, vq, at = _parts(0)
    pol = WorldVLAPolicy(_bf16_exact(model), vq, at, chunk_size=3, image_size=64)
    pol.reset("open the drawer")
    f0, f1 = _frames(rng), _frames(rng)
    before = pol.act(f0, history=None)
    assert any(buf.plan is not None and buf.plan.bf16_weights for eng in pol._engines.values()
               for buf in eng._steps.values())
    new_model, new_vq, _ = _parts(1)
    _bf16_exact(new_model)
    for old, new in ((pol.model, new_model), (pol.vqgan, new_vq)):
        for a, b in zip([*old.parameters(), *old.buffers()], [*new.parameters(), *new.buffers()]):
            a.data.copy_(b.data)
    pol.clear_caches()
    after = [pol.act(f0, history=None), pol.act(f1)]
    fresh = WorldVLAPolicy(new_model, new_vq, at, chunk_size=3, image_size=64)
    fresh.reset("open the drawer")
    assert np.array_equal(after[0], fresh.act(f0, history=None)) and not np.array_equal(after[0], before)
    assert np.array_equal(after[1], fresh.act(f1))
    assert native_step_runs


def test_a_refused_reset_ends_the_episode(policy_dir, rng):
    """A refused reset kept the previous episode's queued actions and frames: the next step() returned the old
    episode's action. Now it leaves no episode: act/observe/step ask for a reset, and the next accepted reset
    starts afresh."""
    pol = WorldVLAPolicy.from_pretrained(policy_dir, device="cpu")
    frame, other = _frames(rng), _frames(rng)
    limit = pol.model.config.max_position_embeddings
    for bad in ("x" * limit, ["open the drawer", "x" * limit], [], ["open the drawer", ""], "", None):
        pol.reset("open the drawer")
        pol.step(frame)  # two actions of the chunk left
        with pytest.raises(ValueError):
            pol.reset(bad)
        for call in (pol.step, pol.act, pol.observe):
            with pytest.raises(RuntimeError, match=r"call policy.reset\(instruction\) before act/observe/step"):
                call(other)
    pol.reset("push the button")
    assert np.array_equal(pol.step(other), _expected(pol, "push the button", [other])[0])


@pytest.mark.parametrize("first_inside", [True, False])
def test_a_policy_serves_calls_in_and_out_of_inference_mode(policy_dir, rng, monkeypatch, native_step_runs,
                                                           first_inside):
    """A policy first queried under torch.inference_mode kept engines (caches, step buffers) of inference
    tensors, which a query outside it could not update in place; the reverse order too. Either way every
    query is a fresh decode's, the prefixes and codes cached in one mode serving the other."""
    from worldvla.ops import decoder, dispatch

    monkeypatch.setitem(dispatch.AUTO_ORDER, ("decoder_layer", "cpu"), ("native", "torch"))
    monkeypatch.setattr(decoder, "NATIVE_STEP", True)
    pol = WorldVLAPolicy.from_pretrained(policy_dir, device="cpu")
    pol.reset(["open the drawer", "push"])
    f = [_frames(rng, 2) for _ in range(4)]
    for i, inside in enumerate((first_inside, not first_inside, first_inside)):
        del native_step_runs[:]
        with torch.inference_mode(inside):
            got = pol.act(f[i + 1], history=f[i])
        for b, ins in enumerate(["open the drawer", "push"]):
            assert np.array_equal(got[b], _expected(pol, ins, [f[i][b], f[i + 1][b]])), (i, b)
        assert native_step_runs
    assert not any(t.is_inference() for kv in pol._prefixes.values() for t in kv)
    assert not any(c.is_inference() for c in pol._codes.values())


def test_policy_follows_a_replaced_or_converted_model_and_new_vqgan_weights(policy_dir, rng):
    """A model replaced (`policy.model = other`) ran the old model's layers on the engines kept for it;
    `policy.model.to(bfloat16)` failed in attention on their float32 caches; VQGAN weights loaded in place
    left the old codes of seen frames in the code cache. Each query is a fresh policy's."""
    pol = WorldVLAPolicy.from_pretrained(policy_dir, device="cpu")
    pol.reset("open the drawer")
    frame = _frames(rng)
    before = pol.act(frame, history=None)
    other, vq, _ = _parts(seed=1)
    pol.model = other
    swapped = pol.act(frame, history=None)
    assert np.array_equal(swapped, _expected(pol, "open the drawer", [frame])) and not np.array_equal(swapped, before)
    pol.vqgan.load_state_dict(vq.state_dict())
    new_codes = pol.act(frame, history=None)
    assert np.array_equal(new_codes, _expected(pol, "open the drawer", [frame]))
    assert not np.array_equal(new_codes, swapped)
    pol.model.to(torch.bfloat16)
    fresh = WorldVLAPolicy(pol.model, pol.vqgan, pol.action_tokenizer, chunk_size=3, image_size=64)
    fresh.reset("open the drawer")
    assert np.array_equal(pol.act(frame, history=None), fresh.act(frame, history=None))


def test_instruction_longer_than_the_context_is_refused_at_reset(policy_dir):
    pol = WorldVLAPolicy.from_pretrained(policy_dir, device="cpu")
    limit = pol.model.config.max_position_embeddings
    with pytest.raises(ValueError, match=f"instruction is too long.*more than the model's {limit}"):
        pol.reset(["open the drawer", "x" * limit])
    pol.check_instruction("open the drawer")  # fits


def test_resize_and_errors(policy_dir, rng):
    from PIL import Image

    pol = WorldVLAPolicy.from_pretrained(policy_dir, device="cpu")
    with pytest.raises(RuntimeError, match="reset"):
        pol.act(_frames(rng))
    pol.reset("open the drawer")
    big = _frames(rng, size=80)
    small = np.asarray(Image.fromarray(big).resize((64, 64), Image.BILINEAR))
    assert np.array_equal(pol.act(big, history=None), _expected(pol, "open the drawer", [small]))
    with pytest.raises(TypeError, match="uint8"):
        pol.act(big.astype(np.float32))
    with pytest.raises(ValueError, match="RGB"):
        pol.act(big[..., :2])
    for empty in (big[:, :0], big[:0, :0], big[None][:0]):
        with pytest.raises(ValueError, match="non-empty"):
            pol.act(empty)
    with pytest.raises(ValueError, match="mode"):
        WorldVLAPolicy(pol.model, pol.vqgan, pol.action_tokenizer, chunk_size=2, image_size=64, mode="beam")


def test_parallel_policy_equals_sequential(policy_dir, rng):
    par = WorldVLAPolicy.from_pretrained(policy_dir, device="cpu")
    seq = WorldVLAPolicy.from_pretrained(policy_dir, device="cpu", mode="sequential")
    frames = [_frames(rng, 2) for _ in range(3)]
    for p in (par, seq):
        p.reset(["a", "bb"])
    for f in frames:
        assert np.array_equal(par.act(f), seq.act(f))


def test_from_pretrained_keywords_override_the_policy_file(policy_dir, rng):
    """chunk_size= (the release runs one model with chunks of 5 or 10) and history= given at load win over
    policy.json; they had raised "got multiple values for keyword argument"."""
    saved = WorldVLAPolicy.from_pretrained(policy_dir, device="cpu")
    pol = WorldVLAPolicy.from_pretrained(policy_dir, device="cpu", chunk_size=saved.chunk_size + 1, history=1)
    assert (pol.chunk_size, pol.history, pol.image_size) == (saved.chunk_size + 1, 1, saved.image_size)
    pol.reset("a")
    assert pol.act(_frames(rng, 1)[0]).shape == (saved.chunk_size + 1, saved.action_tokenizer.action_dim)


def test_bfloat16_policy_on_the_cpu(policy_dir, rng, monkeypatch, native_step_runs):
    """A policy loaded in bfloat16 on the CPU decodes on the native step (the engine's one-call step for
    bfloat16 models): parallel chunks equal sequential ones, finite float32 actions within the bounds."""
    from worldvla.ops import decoder, dispatch

    monkeypatch.setitem(dispatch.AUTO_ORDER, ("decoder_layer", "cpu"), ("native", "torch"))
    monkeypatch.setattr(decoder, "NATIVE_STEP", True)
    par = WorldVLAPolicy.from_pretrained(policy_dir, device="cpu", dtype="bf16")
    seq = WorldVLAPolicy.from_pretrained(policy_dir, device="cpu", dtype=torch.bfloat16, mode="sequential")
    assert next(par.model.parameters()).dtype == torch.bfloat16
    for p in (par, seq):
        p.reset(["a", "bb"])
    for _ in range(2):
        f = _frames(rng, 2)
        a = par.act(f)
        assert np.array_equal(a, seq.act(f))
        assert a.dtype == np.float32 and a.shape == (2, 3, 4) and np.isfinite(a).all()
        assert (a >= np.array(LOW) - 1e-6).all() and (a <= np.array(HIGH) + 1e-6).all()
    assert native_step_runs


def _release_text_tokenizer(folder):
    """A text_tokenizer.json shaped like the release's: the 8,192 image codes named IMGIMG<digits as letters>Z,
    at ids 4.. in a shuffled order (the release's own order is not the codes' order). -> (path, that order)."""
    perm = torch.randperm(8192, generator=torch.Generator().manual_seed(0)).tolist()
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "a": 9000}
    vocab.update({"IMGIMG" + "".join("ABCDEFGHIJ"[int(c)] for c in str(code)) + "Z": 4 + slot
                  for slot, code in enumerate(perm)})
    path = folder / "text_tokenizer.json"
    path.write_text(json.dumps({"version": "1.0", "added_tokens": [], "normalizer": None, "pre_tokenizer": None,
                                "post_processor": None, "decoder": None,
                                "model": {"type": "BPE", "vocab": vocab, "merges": []}}))
    return path, perm


def test_chameleon_layout_follows_the_text_tokenizer(tmp_path):
    """A release model's config carries no image-code map; the release defines it by the token names of its
    text_tokenizer.json. The policy rebuilds the layout from the tokenizer it is given, and warns without one."""
    import warnings

    from worldvla.tokens.layout import with_release_image_ids
    from worldvla.tokens import ChameleonTextTokenizer

    path, perm = _release_text_tokenizer(tmp_path)
    assumed = VocabLayout.chameleon()
    got = with_release_image_ids(assumed, ChameleonTextTokenizer(path))
    assert got.image_code_ids[perm[17]] == 4 + 17 and got.image_code_ids != assumed.image_code_ids
    with pytest.warns(UserWarning, match="text_tokenizer.json"):
        assert with_release_image_ids(assumed) is assumed
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert with_release_image_ids(LAYOUT) is LAYOUT and with_release_image_ids(got) is got

    model = WorldVLA(ModelConfig.tiny(assumed, num_hidden_layers=1)).eval()  # the release's vocabulary
    _, vq, _ = _parts()
    pol = WorldVLAPolicy(model, vq, ActionTokenizer(assumed, LOW, HIGH), chunk_size=2, image_size=64,
                         text_tokenizer=ChameleonTextTokenizer(path))
    assert pol.layout.image_code_ids == got.image_code_ids
    prompt = pol.builder.action_prompt("a", [torch.tensor([[perm[5]] * 4] * 4)])
    assert (prompt == 4 + 5).sum() == 16  # code perm[5] is the token named for it, id 9


def test_the_uint8_error_suggests_the_conversion_that_keeps_the_image(policy_dir, rng):
    """The error used to suggest `(x * 255).astype(np.uint8)` for every dtype: on an int64 or a 0..255 float
    frame that wraps the pixels around mod 256. The suggestion now follows the dtype and the values, and
    following it gives back the frame; act, observe, step and imagine all say it."""
    import re

    pol = WorldVLAPolicy.from_pretrained(policy_dir, device="cpu")
    pol.reset("open the drawer")
    frame = _frames(rng)
    for bad in (frame.astype(np.int64), frame.astype(np.float32), frame / 255.0, frame / 127.5 - 1.0):
        for call in (pol.act, pol.observe, pol.step, lambda x: pol.imagine(x, np.zeros((1, 4)))):
            with pytest.raises(TypeError, match="uint8") as e:
                call(bad)
            fix = re.search(r"convert with (.+)$", str(e.value)).group(1)
            assert np.array_equal(eval(fix, {"np": np, "x": bad}), frame), (bad.dtype, fix)


def test_reset_refuses_a_missing_or_empty_instruction_as_the_client_does(policy_dir):
    """`reset(None)` was a raw TypeError and `reset("")` was accepted; PolicyClient.reset refuses both."""
    pol = WorldVLAPolicy.from_pretrained(policy_dir, device="cpu")
    for bad in (None, "", "  ", 3):
        with pytest.raises(ValueError, match="reset\\(\\) needs the task instruction as a non-empty string"):
            pol.reset(bad)
    for bad in (["open the drawer", ""], ["open the drawer", None]):
        with pytest.raises(ValueError, match="needs each environment's task instruction as a non-empty string; "
                                             "entry 1 is"):
            pol.reset(bad)
    with pytest.raises(ValueError, match="empty list"):
        pol.reset([])
    pol.reset(["open the drawer", "push"])  # fine


def test_a_folder_of_another_kind_is_named_with_what_loads_it(policy_dir):
    """WorldVLA.from_pretrained on a VQGAN folder listed 419 missing tensors; train-vq --init on a model folder
    20 unknown VQGANConfig fields; a policy folder "config.json is missing". Each now says what the folder
    is and what to give instead."""
    import re

    from worldvla.vqgan import VQGAN

    model, vqgan = re.escape(str(policy_dir / "model")), re.escape(str(policy_dir / "vqgan"))
    with pytest.raises(ValueError, match=f"is a VQGAN folder .*, not a WorldVLA model folder: give {model}, or load "
                                         f"this folder with VQGAN.from_pretrained"):
        WorldVLA.from_pretrained(policy_dir / "vqgan")
    with pytest.raises(ValueError, match=f"is a WorldVLA model folder .*, not a VQGAN folder: give {vqgan}"):
        VQGAN.from_pretrained(policy_dir / "model")
    with pytest.raises(FileNotFoundError, match=f"is a policy folder .*: give {model}, or load this folder with "
                                                f"WorldVLAPolicy.from_pretrained"):
        WorldVLA.from_pretrained(policy_dir)
    with pytest.raises(FileNotFoundError, match=f"is a policy folder .*: give {vqgan}"):
        VQGAN.from_pretrained(policy_dir)
    with pytest.raises(FileNotFoundError, match="is a WorldVLA model folder .*, not a policy folder: give "
                                                + re.escape(str(policy_dir))):
        WorldVLAPolicy.from_pretrained(policy_dir / "model")


def test_from_pretrained_expands_home_and_names_a_path_that_is_not_there(policy_dir, monkeypatch):
    """`~/...` (a quoted path, a config file) was taken literally and reported as "policy.json is missing"."""
    import re

    from worldvla.vqgan import VQGAN

    monkeypatch.setenv("HOME", str(policy_dir.parent))
    assert WorldVLAPolicy.from_pretrained("~/policy", device="cpu").chunk_size == 3  # ~ expanded
    assert WorldVLA.from_pretrained("~/policy/model").config.vocab_size == LAYOUT.vocab_size
    for load in (WorldVLAPolicy.from_pretrained, WorldVLA.from_pretrained, VQGAN.from_pretrained):
        with pytest.raises(FileNotFoundError, match=re.escape(f"{policy_dir.parent / 'nothing'}: no such folder")):
            load("~/nothing")


def test_a_query_that_exactly_fills_the_context_is_accepted_and_one_token_more_refused(policy_dir, rng):
    from worldvla.inference.chunk import chunk_length

    pol = WorldVLAPolicy.from_pretrained(policy_dir, device="cpu")
    ins = "open the drawer"
    codes = torch.zeros(pol.grid, pol.grid, dtype=torch.long)
    need = pol.builder.action_prompt(ins, [codes, codes]).numel() + chunk_length(pol.chunk_size, pol.action_dim)
    pol.model.config.max_position_embeddings = need
    pol.reset(ins)  # fits exactly with the full two-frame history
    pol.act(_frames(rng))
    pol.act(_frames(rng))
    with pytest.raises(ValueError, match="instruction is too long"):
        pol.reset(ins + "!")  # one byte token more


def test_prefix_cache_follows_the_order_of_the_instructions(policy_dir, rng):
    pol = WorldVLAPolicy.from_pretrained(policy_dir, device="cpu")
    frames = _frames(rng, 2)
    for instr in (["open the drawer", "push"], ["push", "open the drawer"]):
        pol.reset(instr)
        out = pol.act(frames, history=None)
        for i in range(2):
            assert np.array_equal(out[i], _expected(pol, instr[i], [frames[i]])), (instr, i)


def test_a_one_frame_policy_never_shows_the_model_a_previous_frame(tmp_path, rng):
    model, vq, at = _parts()
    save_policy(tmp_path / "p1", model, vq, at, chunk_size=3, image_size=64, history=1)
    pol = WorldVLAPolicy.from_pretrained(tmp_path / "p1", device="cpu")
    f0, f1 = _frames(rng), _frames(rng)
    pol.reset("open the drawer")
    pol.act(f0)
    assert np.array_equal(pol.act(f1), _expected(pol, "open the drawer", [f1]))
    assert np.array_equal(pol.act(f1, history=f0), _expected(pol, "open the drawer", [f1]))


def test_explicit_history_and_policy_file_mismatches_are_refused(policy_dir, tmp_path, rng):
    import shutil

    pol = WorldVLAPolicy.from_pretrained(policy_dir, device="cpu")
    pol.reset("push")
    with pytest.raises(ValueError, match="history holds 2 frames for 3 current frames"):
        pol.act(_frames(rng, 3), history=_frames(rng, 2))
    folder = tmp_path / "policy"
    shutil.copytree(policy_dir, folder)
    info = json.loads((folder / "policy.json").read_text())
    info["action_dim"] = 7
    (folder / "policy.json").write_text(json.dumps(info))
    with pytest.raises(ValueError, match="action_dim 7 disagrees with the 4 bounds"):
        WorldVLAPolicy.from_pretrained(folder, device="cpu")


def test_a_chunk_or_image_size_below_one_is_refused_at_construction(policy_dir):
    """chunk_size 0 or -2 was accepted (and listed in metadata()) and failed only at the first act, in the
    chunk decoder; image_size 0 passed the VQGAN-factor check (0 is a multiple of everything)."""
    pol = WorldVLAPolicy.from_pretrained(policy_dir, device="cpu")
    parts = (pol.model, pol.vqgan, pol.action_tokenizer)
    for chunk_size, image_size, name in ((0, 64, "chunk_size"), (-2, 64, "chunk_size"), (2.5, 64, "chunk_size"),
                                         (3, 0, "image_size"), (3, -64, "image_size"), (True, 64, "chunk_size")):
        with pytest.raises(ValueError, match=f"{name} must be an integer >= 1, got"):
            WorldVLAPolicy(*parts, chunk_size=chunk_size, image_size=image_size)
    assert WorldVLAPolicy(*parts, chunk_size=np.int64(1), image_size=64).chunk_size == 1


def test_observe_takes_one_frame_per_environment(policy_dir, rng):
    """After reset with two instructions, observe() took one frame (or three) and the next act failed on
    'the recorded previous frames are for 1 environments', naming history instead of the observe call."""
    pol = WorldVLAPolicy.from_pretrained(policy_dir, device="cpu")
    pol.reset(["open the drawer", "push the button"])
    for wrong in (_frames(rng), _frames(rng, 1), _frames(rng, 3)):
        with pytest.raises(ValueError, match="reset\\(\\) got 2 instructions but observe\\(\\) got (1 frame|3 frames);"):
            pol.observe(wrong)
    pair = _frames(rng, 2)
    pol.observe(pair)
    current = _frames(rng, 2)
    np.testing.assert_array_equal(pol.act(current), pol.act(current, history=pair))
    pol.reset("open the drawer")  # one instruction for every environment: any count
    pol.observe(_frames(rng, 3))
    assert pol.act(_frames(rng, 3)).shape == (3, 3, 4)


def test_errors_on_the_history_frames_name_history(policy_dir, rng):
    """A float history= was reported as 'frames must be uint8', as if the current frame were wrong."""
    pol = WorldVLAPolicy.from_pretrained(policy_dir, device="cpu")
    pol.reset("open the drawer")
    frame = _frames(rng)
    with pytest.raises(TypeError, match=r"^history must be uint8 in \[0, 255\], got float32"):
        pol.act(frame, history=frame.astype(np.float32))
    with pytest.raises(ValueError, match=r"^history must be RGB uint8"):
        pol.act(frame, history=frame[..., :2])
    with pytest.raises(ValueError, match=r"^history must be non-empty"):
        pol.act(frame, history=frame[:0])
    with pytest.raises(TypeError, match=r"^frames must be uint8"):
        pol.act(frame.astype(np.float32), history=frame)


def test_instructions_as_bytes_are_refused_with_the_decoding_to_do(policy_dir):
    """reset(b"open the drawer") (bytes or np.bytes_, as HDF5 datasets give them) was iterated into numbers and
    refused as "entry 0 is 111"."""
    pol = WorldVLAPolicy.from_pretrained(policy_dir, device="cpu")
    for bad, what in ((b"open the drawer", "the task instruction is bytes"),
                      (np.bytes_(b"open the drawer"), "the task instruction is bytes_"),
                      (("push", b"push"), "entry 1 of the instructions is bytes"),
                      (np.array([b"open", b"push"]), "entry 0 of the instructions is bytes_")):
        with pytest.raises(ValueError, match=rf"takes each task instruction as str, but {what} b'.*decode it first "
                                             r"\(instruction\.decode\('utf-8'\)"):
            pol.reset(bad)
    pol.reset(np.array(["open", "push"]))  # str entries (np.str_) are fine


def test_frames_of_different_sizes_and_a_negative_code_cache_are_named(policy_dir, rng):
    """A list of frames of different sizes gave NumPy's "inhomogeneous shape" error, code_cache_size=-1 a
    KeyError 'dictionary is empty' at the first query."""
    pol = WorldVLAPolicy.from_pretrained(policy_dir, device="cpu")
    pol.reset("open the drawer")
    frame = _frames(rng)
    mixed = [frame, _frames(rng, size=48)]
    with pytest.raises(ValueError, match=r"^frames must all have one size \(\[N, H, W, 3\]\), got frames of shapes "
                                         r"\[\(48, 48, 3\), \(64, 64, 3\)\]: resize them to 64x64"):
        pol.act(mixed, history=None)
    with pytest.raises(ValueError, match=r"^history must all have one size"):
        pol.act(np.stack([frame, frame]), history=mixed)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match=rf"code_cache_size must be an integer >= 0 .*got {bad!r}"):
            WorldVLAPolicy(pol.model, pol.vqgan, pol.action_tokenizer, chunk_size=3, image_size=64,
                           code_cache_size=bad)
    none_kept = WorldVLAPolicy(pol.model, pol.vqgan, pol.action_tokenizer, chunk_size=3, image_size=64,
                               code_cache_size=0)
    none_kept.reset("open the drawer")
    assert np.array_equal(none_kept.act(frame, history=None), pol.act(frame, history=None))
    assert len(none_kept._codes) == 0


def test_the_servers_warm_up_engines_serve_the_robots_instructions(policy_dir, rng):
    """The warm-up built engines sized for its instruction "warm up": the first request with a longer one
    rebuilt the engine (on a GPU: a new cache and CUDA-graph capture on a robot's first request). A server's
    engines now leave room for SERVER_ENGINE_HEADROOM more instruction tokens (capped by the model's context),
    and what they compute does not depend on their size."""
    from worldvla.serve import PolicyServer
    from worldvla.serve.server import SERVER_ENGINE_HEADROOM

    pol = WorldVLAPolicy.from_pretrained(policy_dir, device="cpu")
    reference = WorldVLAPolicy.from_pretrained(policy_dir, device="cpu")
    server = PolicyServer(pol, max_batch=2)
    assert pol.engine_headroom == SERVER_ENGINE_HEADROOM and reference.engine_headroom == 0
    server.warmup()
    warm = dict(pol._engines)
    assert sorted(warm) == [1, 2]
    # the longest instruction within the headroom (or the model's context) with the full history
    room = min(pol._prompt_capacity(pol._prefix("warm up").numel()) + SERVER_ENGINE_HEADROOM,
               pol.model.config.max_position_embeddings)
    n = 1
    while pol._prompt_capacity(pol._prefix("x" * (n + 1)).numel()) <= room:
        n += 1
    longest = "x" * n
    prev, cur = _frames(rng, 2), _frames(rng, 2)
    for instructions in (["put the red block in the top drawer and close it"], [longest], [longest, "push"]):
        pol.reset(instructions)
        reference.reset(instructions)
        k = len(instructions)
        for history in (None, prev[:k]):
            out = pol.act(cur[:k], history=history)
            assert np.array_equal(out, reference.act(cur[:k], history=history))  # whatever the engine's size
        assert all(pol._engines[b] is warm[b] for b in warm), instructions  # reused, not rebuilt
    if room < pol.model.config.max_position_embeddings:  # one token past the headroom: a bigger engine, same result
        pol.reset([longest + "x"])
        reference.reset([longest + "x"])
        assert np.array_equal(pol.act(cur[:1], history=None), reference.act(cur[:1], history=None))
        assert pol._engines[1] is not warm[1]


def test_a_server_keeps_the_prefixes_of_all_its_episodes(policy_dir, rng, monkeypatch):
    """PolicyServer raised max_engines but not max_prefixes (32): with more robots' instructions than that,
    stepping in turn, every query prefilled its instruction again."""
    from worldvla.serve import PolicyServer

    pol = WorldVLAPolicy.from_pretrained(policy_dir, device="cpu")
    PolicyServer(pol, max_episodes=64)
    assert pol.max_prefixes == 64
    computed = _count_prefixes(pol, monkeypatch)
    names = [f"task {i}" for i in range(33)]
    _take_turns(pol, names, _frames(rng, 1))
    assert len(computed) == len(names)


def _count_prefixes(pol, monkeypatch) -> list:
    """A list that grows by one each time `pol` computes an instruction's prefix."""
    computed = []
    prefix_kv = pol._prefix_kv
    monkeypatch.setattr(pol, "_prefix_kv", lambda prefix: computed.append(1) or prefix_kv(prefix))
    return computed


def _take_turns(pol, names, frame, rounds: int = 2) -> None:
    """Robots stepping round-robin, one request per policy call: each instruction reset and queried in turn."""
    for _ in range(rounds):
        for name in names:
            pol.reset([name])
            pol.act(frame, history=None)


def test_an_observed_frame_is_a_copy_too(policy_dir, rng):
    """observe() keeps the frame as it was given, as act() does: a camera driver refills its buffer in place."""
    pol = WorldVLAPolicy.from_pretrained(policy_dir, device="cpu")
    f0, f1 = _frames(rng), _frames(rng)
    buf = f0.copy()
    pol.reset("open the drawer")
    pol.observe(buf)
    buf[...] = f1
    assert np.array_equal(pol.act(buf), _expected(pol, "open the drawer", [f0, f1]))


def test_step_on_a_batch_returns_one_action_per_environment(policy_dir, rng):
    """step() on N environments returns [N, D] per call, the chunks' k-th actions in turn, and queries the next
    chunks once all K are used, with the previous env step's frames as history."""
    pol = WorldVLAPolicy.from_pretrained(policy_dir, device="cpu")
    instr = ["open the drawer", "push"]
    frames = [_frames(rng, 2) for _ in range(4)]
    pol.reset(instr)
    got = [pol.step(f) for f in frames]
    assert all(a.shape == (2, 4) and a.dtype == np.float32 for a in got)
    for i, ins in enumerate(instr):
        first = _expected(pol, ins, [frames[0][i]])
        assert np.array_equal(np.stack([a[i] for a in got[:3]]), first)
        assert np.array_equal(got[3][i], _expected(pol, ins, [frames[2][i], frames[3][i]])[0])


def test_a_frame_of_the_right_height_but_another_width_is_resized(policy_dir, rng):
    """A 64x96 camera frame for a 64-px policy is stretched to 64x64 like any other size: only its height
    matching image_size must not let it through at its own width."""
    from PIL import Image

    pol = WorldVLAPolicy.from_pretrained(policy_dir, device="cpu")
    pol.reset("open the drawer")
    for shape in ((64, 96), (96, 64)):
        wide = torch.randint(0, 256, (*shape, 3), generator=rng, dtype=torch.uint8).numpy()
        square = np.asarray(Image.fromarray(wide).resize((64, 64), Image.BILINEAR))
        assert np.array_equal(pol.act(wide, history=None), _expected(pol, "open the drawer", [square])), shape


def test_a_loaded_policy_keeps_its_extra_information(policy_dir):
    """save_policy's `extra` comes back on load (attribute and metadata(), which a server sends its clients)."""
    pol = WorldVLAPolicy.from_pretrained(policy_dir, device="cpu")
    assert pol.extra == {"task": "demo"} and pol.metadata()["extra"] == {"task": "demo"}


def test_a_vqgan_code_one_past_the_layouts_image_ids_is_refused(policy_dir, rng):
    """A VQGAN with one code more than the layout's image ids: a frame quantized to that last code would be
    written as an id past the image range. The first such frame is refused, naming the code."""
    model, _, at = _parts()
    cfg = VQGANConfig(ch=32, ch_mult=(1, 1, 1, 1, 1), num_res_blocks=1, z_channels=32, embed_dim=32, n_embed=65)
    torch.manual_seed(0)
    vq = VQGAN(cfg).eval()
    with torch.no_grad():  # every latent's nearest entry is the last one (code 64)
        vq.quantize.embedding.weight[:64] = 1e3
        vq.quantize.embedding.weight[64] = 0.0
    pol = WorldVLAPolicy(model, vq, at, chunk_size=3, image_size=64)
    pol.reset("open the drawer")
    with pytest.raises(ValueError, match="the VQGAN emits codes up to 64 but the layout has only 64 image ids"):
        pol.act(_frames(rng), history=None)


def test_the_caches_keep_what_was_used_last(policy_dir, rng, monkeypatch):
    """The VQ-code, prefix and engine caches drop their least recently used entries: a frame, instruction or batch
    size used again just before the cache fills stays cached."""
    pol = WorldVLAPolicy.from_pretrained(policy_dir, device="cpu", code_cache_size=2)
    encoded, prefixes = [], []
    encode, prefix_kv = pol.vqgan.encode, pol._prefix_kv
    monkeypatch.setattr(pol.vqgan, "encode", lambda pix, *a, **k: encoded.append(pix.shape[0]) or encode(pix, *a, **k))
    monkeypatch.setattr(pol, "_prefix_kv", lambda prefix: prefixes.append(1) or prefix_kv(prefix))
    a, b, c = _frames(rng), _frames(rng), _frames(rng)
    pol.reset("open the drawer")
    for frame in (a, b, a, c, a):  # a used again before c fills the cache: b goes, a stays
        pol.act(frame, history=None)
    assert encoded == [1, 1, 1]
    pol.max_prefixes = 2
    for name in ("push", "pull", "push", "lift", "push"):
        pol.reset(name)
        pol.act(a, history=None)
    assert len(prefixes) == 4 and list(pol._prefixes) == ["lift", "push"]  # "open the drawer" and "pull" gone
    pol.max_engines = 2
    pol.reset("push")
    for n in (1, 2, 1, 3):
        pol.act(_frames(rng, n), history=None)
    assert list(pol._engines) == [1, 3]


def test_frames_that_differ_in_a_few_pixels_get_their_own_codes(policy_dir, rng):
    """The code cache is keyed by the whole frame: a static scene in which only the robot's gripper moves (a
    patch at the bottom right) is encoded again, not served the codes of the frame before."""
    pol = WorldVLAPolicy.from_pretrained(policy_dir, device="cpu")
    pol.reset("open the drawer")
    scene = _frames(rng)
    moved = scene.copy()
    moved[48:, 48:] = 255 - moved[48:, 48:]
    pol.act(scene, history=None)
    assert np.array_equal(pol.act(moved, history=None), _expected(pol, "open the drawer", [moved]))
    assert np.array_equal(pol.act(moved), _expected(pol, "open the drawer", [moved, moved]))


def test_step_refuses_frames_for_another_number_of_environments_mid_chunk(policy_dir, rng):
    """After a chunk for two environments, step(one frame) returned the queued [2, D] action: one frame's caller
    got two environments' actions without a word. The count must match until the chunk is used up; a refused
    call records nothing."""
    pol = WorldVLAPolicy.from_pretrained(policy_dir, device="cpu")
    pol.reset("open the drawer")
    pair = _frames(rng, 2)
    first = pol.step(pair)
    assert first.shape == (2, 4)
    for wrong in (_frames(rng), _frames(rng, 1), _frames(rng, 3)):
        with pytest.raises(ValueError, match=r"step\(\) got [13] frame\(s\) but the chunk under way is for 2 "
                                             r"environments"):
            pol.step(wrong)
    second = pol.step(_frames(rng, 2))  # the chunk goes on as if the refused calls had not been made
    for i in range(2):
        assert np.array_equal(second[i], _expected(pol, "open the drawer", [pair[i]])[1])
    single = WorldVLAPolicy.from_pretrained(policy_dir, device="cpu")
    single.reset("open the drawer")
    single.step(_frames(rng))
    with pytest.raises(ValueError, match=r"step\(\) got 2 frame\(s\) but the chunk under way is for 1 environment"):
        single.step(_frames(rng, 2))


def test_a_one_frame_policy_takes_any_number_of_environments_without_history(tmp_path, rng):
    """A history=1 policy refused act(one frame) after act(two frames), asking for history= it never uses."""
    model, vq, at = _parts()
    save_policy(tmp_path / "p1", model, vq, at, chunk_size=3, image_size=64, history=1)
    pol = WorldVLAPolicy.from_pretrained(tmp_path / "p1", device="cpu")
    pol.reset("open the drawer")
    pol.act(_frames(rng, 2))
    f = _frames(rng)
    assert np.array_equal(pol.act(f), _expected(pol, "open the drawer", [f]))
    pol.observe(_frames(rng, 3))
    assert pol.act(_frames(rng, 2)).shape == (2, 3, 4)


def test_frames_in_another_layout_are_refused_with_the_conversion(policy_dir, rng):
    """Channels-first, grayscale and RGBA frames were refused with their shape only; the error now says which
    layout the frame seems to be in and how to convert it, and following it gives back the frame. act, observe,
    step, imagine and generate_frames all say it."""
    import re

    from worldvla import generate_frames

    pol = WorldVLAPolicy.from_pretrained(policy_dir, device="cpu")
    pol.reset("open the drawer")
    frame, batch = _frames(rng), _frames(rng, 2)
    gray = frame[..., 0]
    cases = ((np.ascontiguousarray(np.moveaxis(frame, -1, 0)), frame, "channels-first"),
             (np.ascontiguousarray(np.moveaxis(batch, -1, 1)), batch, "channels-first"),
             (np.concatenate([frame, np.full_like(frame[..., :1], 255)], -1), frame, "RGBA"),
             (gray, np.repeat(gray[..., None], 3, axis=-1), "grayscale"),
             (gray[..., None], np.repeat(gray[..., None], 3, axis=-1), "grayscale"))
    world = lambda x: generate_frames(pol.model, pol.vqgan, x, np.zeros((1, 4)), action_tokenizer=pol.action_tokenizer,
                                      text_tokenizer=pol.text_tokenizer)
    for bad, good, kind in cases:
        for call in (pol.act, pol.observe, pol.step, lambda x: pol.imagine(x, np.zeros((len(x), 1, 4)) if x.ndim == 4
                                                                           else np.zeros((1, 4))), world):
            with pytest.raises(ValueError, match=kind) as e:
                call(bad)
            fix = re.search(r"convert with (.+?)(;|$)", str(e.value)).group(1)
            assert np.array_equal(eval(fix, {"np": np, "x": bad}), good), (bad.shape, fix)
    with pytest.raises(ValueError, match=r"x\.permute\(1, 2, 0\)"):  # a torch tensor: its own call
        pol.act(torch.from_numpy(frame).permute(2, 0, 1))
    with pytest.raises(ValueError, match="uint8"):  # generate_frames names the dtype's conversion as act does
        world(frame / 255.0)
    with pytest.raises(ValueError, match=r"convert with \(x \* 255\)\.round\(\)\.astype\(np\.uint8\)"):
        world(frame / 255.0)


def test_the_conversions_named_for_a_torch_frame_are_torch_calls(policy_dir, rng):
    """For a torch tensor frame the errors suggested NumPy calls (`.astype(np.uint8)`), which a tensor does not
    have; following the suggestion now gives back the frame as a tensor, which act takes."""
    import re

    from worldvla import generate_frames

    pol = WorldVLAPolicy.from_pretrained(policy_dir, device="cpu")
    pol.reset("open the drawer")
    frame = torch.from_numpy(_frames(rng))
    gray = frame[..., 0]
    world = lambda x: generate_frames(pol.model, pol.vqgan, x, np.zeros((1, 4)), action_tokenizer=pol.action_tokenizer,
                                      text_tokenizer=pol.text_tokenizer)
    cases = ((frame.long(), frame), (frame.float(), frame), (frame / 255.0, frame), (frame / 127.5 - 1.0, frame),
             (frame > 127, (frame > 127).to(torch.uint8) * 255), (frame.permute(2, 0, 1), frame),
             (frame[None].permute(0, 3, 1, 2), frame[None]), (gray, gray[..., None].expand(64, 64, 3)),
             (gray[..., None], gray[..., None].expand(64, 64, 3)))
    for bad, good in cases:
        for call in (pol.act, world):
            with pytest.raises((TypeError, ValueError), match="convert with") as e:
                call(bad)
            fix = re.search(r"convert with (.+?)(;|$)", str(e.value)).group(1)
            got = eval(fix, {"torch": torch, "x": bad})
            assert isinstance(got, torch.Tensor) and torch.equal(got, good), (bad.dtype, tuple(bad.shape), fix)
        pol.act(got, history=None)


def test_a_history_with_no_frame_for_some_environments_is_named(policy_dir, rng):
    """history=[None, frame] (one environment just reset) was refused as frames of different sizes to resize."""
    pol = WorldVLAPolicy.from_pretrained(policy_dir, device="cpu")
    pol.reset("open the drawer")
    cur, prev = _frames(rng, 2), _frames(rng)
    with pytest.raises(ValueError, match=r"history= holds None for environment 0: .*history=None"):
        pol.act(cur, history=[None, prev])


def test_a_frame_given_to_step_mid_chunk_is_a_copy_too(policy_dir, rng):
    """step() records the frames it gets while the chunk's actions run out, as observe() does: a camera driver
    that refills one buffer in place must not change the history of the next chunk's query."""
    pol = WorldVLAPolicy.from_pretrained(policy_dir, device="cpu")
    frames = [_frames(rng) for _ in range(4)]
    buf = frames[0].copy()
    pol.reset("push the button")
    got = []
    for f in frames:
        buf[...] = f  # the driver's next frame, in place
        got.append(pol.step(buf))
    assert np.array_equal(got[3], _expected(pol, "push the button", [frames[2], frames[3]])[0])


def test_frames_with_nan_pixels_and_an_rgba_batch_are_named(policy_dir, rng):
    """A float frame with a NaN pixel (a failed render) is named as such, with the conversion its finite values
    call for; an all-NaN frame has no values to convert; a clean frame is not said to hold NaN. A batch of RGBA
    frames gets the RGBA conversion, as a single frame does."""
    pol = WorldVLAPolicy.from_pretrained(policy_dir, device="cpu")
    pol.reset("open the drawer")
    scaled = _frames(rng) / 255.0
    scaled[0, 0, 1], scaled[0, 0, 2] = 0.0, 1.0
    with pytest.raises(TypeError) as e:
        pol.act(scaled)
    assert "values in [0, 1]; convert with (x * 255).round().astype(np.uint8)" in str(e.value)
    holed = scaled.copy()
    holed[0, 0, 0] = np.nan
    with pytest.raises(TypeError) as e:
        pol.act(holed)
    assert "float64 with values in [0, 1] and NaN or inf; convert with (x * 255).round().astype(np.uint8)" \
        in str(e.value)
    with pytest.raises(TypeError, match="float32 without a finite value"):
        pol.act(np.full((64, 64, 3), np.nan, dtype=np.float32))
    batch = _frames(rng, 2)
    rgba = np.concatenate([batch, np.full_like(batch[..., :1], 255)], -1)
    with pytest.raises(ValueError, match=r"it looks RGBA: convert with x\[\.\.\., :3\]"):
        pol.act(rgba)


def _action_prompt(rng, instruction="push the button"):
    codes = torch.randint(0, 64, (4, 4), generator=rng)
    return SequenceBuilder(LAYOUT, ByteTextTokenizer(LAYOUT), ActionTokenizer(LAYOUT, LOW, HIGH)).action_prompt(
        instruction, [codes])


def test_a_chunk_of_actions_without_bins_or_of_a_bool_size_is_refused(rng):
    """action_dim 0 decoded K empty [BOA, EOA] blocks without a word, and action_dim=True passed as one bin: both
    are refused as n_actions is."""
    from worldvla.inference import generate_action_chunk

    model = _parts()[0]
    prompt = _action_prompt(rng)
    for mode in ("parallel", "sequential", "causal"):
        with pytest.raises(ValueError, match=r"n_actions and action_dim must be >= 1, got 2 and 0"):
            generate_action_chunk(model, prompt, LAYOUT, 2, 0, mode=mode)
    for bad in (True, False):
        with pytest.raises(TypeError, match="n_actions and action_dim must be integers"):
            generate_action_chunk(model, prompt, LAYOUT, 2, bad)
    assert generate_action_chunk(model, prompt, LAYOUT, 2, 1).shape == (2, 3)


def test_an_adapted_head_chooses_bins_only_whatever_it_scores_elsewhere(rng):
    """A head that is more than its weight (a forward hook's bias) runs over the whole vocabulary: the bins are
    still chosen among the bin ids only, so scores it gives other ids, even the ids just outside the bin range,
    change no action."""
    from worldvla.inference import generate_action_chunk

    model = _parts()[0]
    prompt = _action_prompt(rng)
    lo, hi = LAYOUT.bin_range
    bias = torch.zeros(model.config.vocab_size)
    model.lm_head.register_forward_hook(lambda module, args, out: out + bias)
    for mode in ("parallel", "sequential", "causal"):
        bias.zero_()
        plain = generate_action_chunk(model, prompt, LAYOUT, 3, 4, mode=mode)
        bias[:lo] = bias[hi:] = 1e4  # every id outside the bins, lo - 1 and hi included, far above the bins
        got = generate_action_chunk(model, prompt, LAYOUT, 3, 4, mode=mode)
        assert torch.equal(got, plain), mode
        assert ((got[:, 1:-1] >= lo) & (got[:, 1:-1] < hi)).all(), mode


def test_save_policy_refuses_a_history_the_policy_cannot_load(tmp_path):
    """A policy folder is refused at save time, not written, when its history is neither 1 nor 2 frames:
    WorldVLAPolicy refuses such a history, so the folder would never load."""
    model, vq, at = _parts()
    for history in (0, 3):
        with pytest.raises(ValueError, match=f"history must be 1 .* or 2 .*got {history}"):
            save_policy(tmp_path / "p", model, vq, at, chunk_size=3, image_size=64, history=history)
        with pytest.raises(ValueError, match=f"history must be 1 .* or 2 .*got {history}"):
            WorldVLAPolicy(model, vq, at, chunk_size=3, image_size=64, history=history)
    assert not (tmp_path / "p").exists()


def test_save_policy_refuses_a_chameleon_model_without_its_text_tokenizer(tmp_path):
    """A model on the Chameleon vocabulary encodes its instructions with the release's text_tokenizer.json: a
    policy folder saved without it would load with no way to encode an instruction as the model was trained."""
    _, vq, at = _parts()
    model = WorldVLA(ModelConfig.tiny(VocabLayout.chameleon(), num_hidden_layers=1)).eval()
    with pytest.raises(ValueError, match=r"Chameleon vocabulary needs its text_tokenizer\.json "
                                         r"\(text_tokenizer_json=\)"):
        save_policy(tmp_path / "p", model, vq, at, chunk_size=3, image_size=64)
    assert not (tmp_path / "p").exists()


def test_a_policy_of_a_causally_trained_model_decodes_causally_and_refuses_other_modes(rng):
    """A model trained with plain causal attention decodes its chunks with mode="causal" only: that is the policy's
    default for it, and another mode is refused when the policy is built, not at its first query."""
    chunk_model, vq, at = _parts()
    model = WorldVLA(ModelConfig.tiny(LAYOUT, attention="causal"))
    model.load_state_dict(chunk_model.state_dict())
    model.eval()
    for mode in ("parallel", "sequential", "release"):
        with pytest.raises(ValueError, match=f"plain causal attention; its chunks decode with mode='causal', not "
                                             f"'{mode}'"):
            WorldVLAPolicy(model, vq, at, chunk_size=3, image_size=64, mode=mode)
    pol = WorldVLAPolicy(model, vq, at, chunk_size=3, image_size=64)
    assert pol.mode == "causal"
    frame = _frames(rng)
    pol.reset("open the drawer")
    codes = pol.vqgan.encode(preprocess(frame))[0]
    ids = generate_action_chunk(model, pol.builder.action_prompt("open the drawer", [codes]), LAYOUT, 3, 4,
                                mode="causal")
    assert np.array_equal(pol.act(frame, history=None), at.decode(ids.numpy()).astype(np.float32))


def test_the_constructor_refuses_a_history_layout_or_image_size_the_model_cannot_take(policy_dir):
    """Refused when the policy is built: a layout of another vocabulary size than the model's (ids past its
    head, or image ids where it learned others), and an image size whose code grid is not a whole number of
    resolution grids (its resolution tokens could not say its size)."""
    pol = WorldVLAPolicy.from_pretrained(policy_dir, device="cpu")
    parts = (pol.model, pol.vqgan, pol.action_tokenizer)
    other = VocabLayout.compact(n_image_codes=32)
    with pytest.raises(ValueError, match=f"the layout has {other.vocab_size} ids, the model {LAYOUT.vocab_size}"):
        WorldVLAPolicy(*parts, chunk_size=3, image_size=64, layout=other)
    for size in (48, 80):  # multiples of the VQGAN's 16 px, not of the 32-px resolution grid
        with pytest.raises(ValueError, match=f"image_size {size} must be a multiple of 32 px"):
            WorldVLAPolicy(*parts, chunk_size=3, image_size=size)
    assert WorldVLAPolicy(*parts, chunk_size=3, image_size=96).grid == 6


def test_a_policy_file_without_a_history_loads_the_releases_two_frames(policy_dir, tmp_path):
    """policy.json without "history" (written before the key existed) is a policy of the release's history: the
    previous and the current frame."""
    import shutil

    folder = tmp_path / "policy"
    shutil.copytree(policy_dir, folder)
    info = json.loads((folder / "policy.json").read_text())
    del info["history"]
    (folder / "policy.json").write_text(json.dumps(info))
    assert WorldVLAPolicy.from_pretrained(folder, device="cpu").history == 2


def test_an_engines_headroom_stops_at_the_models_positions(policy_dir, rng):
    """An engine_headroom past what the model's positions leave (a server's, on a model of a short context) makes
    an engine as long as the model's context, not one the engine refuses as longer than that."""
    pol = WorldVLAPolicy.from_pretrained(policy_dir, device="cpu")
    pol.engine_headroom = 10 * pol.model.config.max_position_embeddings
    pol.reset("open the drawer")
    frame = _frames(rng)
    assert np.array_equal(pol.act(frame, history=None), _expected(pol, "open the drawer", [frame]))
    assert pol._engines[1].max_len == pol.model.config.max_position_embeddings


def test_a_batch_of_more_instructions_than_max_prefixes_keeps_them_all(policy_dir, rng, monkeypatch):
    """A batch of more distinct instructions than max_prefixes keeps all of its prefixes: the same batch queried
    again (the next env step) prefills none of them anew."""
    pol = WorldVLAPolicy.from_pretrained(policy_dir, device="cpu")
    computed = []
    prefix_kv = pol._prefix_kv
    monkeypatch.setattr(pol, "_prefix_kv", lambda prefix: computed.append(1) or prefix_kv(prefix))
    pol.max_prefixes = 2
    names = ["open the drawer", "push", "lift the cup"]
    pol.reset(names)
    frames = _frames(rng, 3)
    pol.act(frames, history=None)
    out = pol.act(frames, history=None)
    assert len(computed) == 3 and sorted(pol._prefixes) == sorted(names)
    assert np.array_equal(out[2], _expected(pol, "lift the cup", [frames[2]]))


def test_a_saved_policy_loads_as_it_was(tmp_path, rng):
    """WorldVLAPolicy.save writes what the policy holds: loaded again, it has the same chunk size, image size,
    history and extra information, and gives the same actions."""
    model, vq, at = _parts()
    pol = WorldVLAPolicy(model, vq, at, chunk_size=2, image_size=64, history=1, extra={"task": "drawer", "fps": 10})
    pol.save(tmp_path / "again")
    loaded = WorldVLAPolicy.from_pretrained(tmp_path / "again", device="cpu")
    assert (loaded.chunk_size, loaded.image_size, loaded.history) == (2, 64, 1)
    assert loaded.extra == {"task": "drawer", "fps": 10}
    frames = [_frames(rng) for _ in range(2)]
    for p in (pol, loaded):
        p.reset("open the drawer")
    for f in frames:
        assert np.array_equal(loaded.act(f), pol.act(f))


def test_a_saved_chameleon_policy_keeps_its_text_tokenizer(tmp_path, rng):
    """WorldVLAPolicy.save of a model on the Chameleon vocabulary writes its text_tokenizer.json beside it: loaded
    again, the policy encodes instructions with that tokenizer and maps image codes to the ids it names (not the
    layout's assumed order), and gives the same actions."""
    from worldvla.tokens import ChameleonTextTokenizer

    path, perm = _release_text_tokenizer(tmp_path)
    model = WorldVLA(ModelConfig.tiny(VocabLayout.chameleon(), num_hidden_layers=1)).init_weights(
        0.5, generator=torch.Generator().manual_seed(1)).eval()
    _, vq, _ = _parts()
    pol = WorldVLAPolicy(model, vq, ActionTokenizer(VocabLayout.chameleon(), LOW, HIGH), chunk_size=2,
                         image_size=64, text_tokenizer=ChameleonTextTokenizer(path))
    pol.save(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "text_tokenizer.json").read_text())
    assert saved["model"]["vocab"] == json.loads(path.read_text())["model"]["vocab"]
    loaded = WorldVLAPolicy.from_pretrained(tmp_path / "saved", device="cpu")
    assert isinstance(loaded.text_tokenizer, ChameleonTextTokenizer)
    assert loaded.layout.image_code_ids == pol.layout.image_code_ids and loaded.layout.image_code_ids[perm[3]] == 7
    codes = [torch.tensor([[perm[5]] * 4] * 4)]
    assert torch.equal(loaded.builder.action_prompt("a", codes), pol.builder.action_prompt("a", codes))
    frame = _frames(rng)
    for p in (pol, loaded):
        p.reset("a")
    assert np.array_equal(loaded.act(frame, history=None), pol.act(frame, history=None))


def test_an_empty_prompt_is_refused_as_one_without_the_separator(rng):
    """An empty prompt (alone or in a batch) is named as a prompt that does not end with the separator, not an
    IndexError from reading its last id."""
    from worldvla.inference import generate_action_chunk

    model = _parts()[0]
    empty = torch.empty(0, dtype=torch.long)
    for prompts, b in ((empty, 0), ([_action_prompt(rng), empty], 1)):
        with pytest.raises(ValueError, match=f"prompt {b} must end with the separator id {LAYOUT.sep}"):
            generate_action_chunk(model, prompts, LAYOUT, 2, 3)


def test_save_policy_refuses_sizes_that_are_not_integers(tmp_path):
    """save_policy wrote chunk_size 2.5 as 2 (and True as 1) without a word, where the policy refuses both: it now
    refuses them as the policy does, and writes nothing."""
    model, vq, at = _parts()
    for chunk_size, image_size, name in ((2.5, 64, "chunk_size"), (True, 64, "chunk_size"), (3, 64.0, "image_size"),
                                         (0, 64, "chunk_size")):
        with pytest.raises(ValueError, match=f"{name} must be an integer >= 1, got"):
            save_policy(tmp_path / "p", model, vq, at, chunk_size=chunk_size, image_size=image_size)
    assert not (tmp_path / "p").exists()
    save_policy(tmp_path / "p", model, vq, at, chunk_size=np.int64(2), image_size=np.int32(64))
    assert WorldVLAPolicy.from_pretrained(tmp_path / "p", device="cpu").chunk_size == 2


def test_bfloat16_tensor_frames_are_refused_with_the_conversion(policy_dir, rng):
    """A bfloat16 tensor frame (a model's output, a frame made on a bfloat16 pipeline) failed in NumPy with "Got
    unsupported ScalarType BFloat16"; it is now refused as any other dtype, naming the conversion, and following
    it gives back the frame. act, observe, step, history= and imagine all say it."""
    import re

    pol = WorldVLAPolicy.from_pretrained(policy_dir, device="cpu")
    pol.reset("open the drawer")
    frame = torch.from_numpy(_frames(rng))
    bad = frame.bfloat16()  # integers up to 256 are exact in bfloat16
    for call in (pol.act, pol.observe, pol.step, lambda x: pol.act(frame, history=x),
                 lambda x: pol.imagine(x, np.zeros((1, 4)))):
        with pytest.raises(TypeError, match=r"must be uint8 in \[0, 255\], got bfloat16 with values in") as e:
            call(bad)
        fix = re.search(r"convert with (.+)$", str(e.value)).group(1)
        assert torch.equal(eval(fix, {"torch": torch, "x": bad}), frame), fix


def test_an_engine_limit_below_one_keeps_the_engine_of_the_query(policy_dir, rng):
    """max_engines = 0 (keep no engine) dropped the engine just built for a new batch size and then failed with a
    bare KeyError; the query now runs on it, and only it is kept."""
    pol = WorldVLAPolicy.from_pretrained(policy_dir, device="cpu")
    pol.reset("open the drawer")
    frames = _frames(rng, 2)
    for limit in (0, -1):
        pol.max_engines = limit
        for n in (1, 2):
            out = pol.act(frames[:n], history=None)
            assert np.array_equal(out[-1], _expected(pol, "open the drawer", [frames[n - 1]]))
            assert list(pol._engines) == [n]


def test_max_new_tokens_that_is_not_an_integer_is_refused(policy_dir):
    """max_new_tokens=2.5 was taken as 2 and True as 1 without a word; None was a bare TypeError from int()."""
    import re

    pol = WorldVLAPolicy.from_pretrained(policy_dir, device="cpu")
    parts = (pol.model, pol.vqgan, pol.action_tokenizer)
    for bad in (2.5, True, None, "300", 0):
        with pytest.raises(ValueError, match=rf"max_new_tokens must be an integer >= 1 .*got {re.escape(repr(bad))}"):
            WorldVLAPolicy(*parts, chunk_size=3, image_size=64, mode="release", max_new_tokens=bad)
    assert WorldVLAPolicy(*parts, chunk_size=3, image_size=64, mode="release",
                          max_new_tokens=np.int64(40)).max_new_tokens == 40


def test_extra_that_policy_json_cannot_keep_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    """save_policy(extra=[...]) wrote a policy folder that every load then failed on, with a bare "cannot convert
    dictionary update sequence" TypeError; extra holding a NumPy value failed only once the weights were written.
    Both are refused by name before the model is saved, and the constructor refuses a non-dict extra too."""
    model, vq, at = _parts()
    saved = []
    save = model.save_pretrained
    monkeypatch.setattr(model, "save_pretrained", lambda *a, **k: saved.append(1) or save(*a, **k))
    for bad in ([1, 2], "demo", [("task", "demo")]):
        with pytest.raises(ValueError, match=f"extra must be a dict .*got {type(bad).__name__}"):
            save_policy(tmp_path / "p", model, vq, at, chunk_size=3, image_size=64, extra=bad)
        with pytest.raises(ValueError, match=f"extra must be a dict .*got {type(bad).__name__}"):
            WorldVLAPolicy(model, vq, at, chunk_size=3, image_size=64, extra=bad)
    with pytest.raises(ValueError, match=r"extra must hold JSON values only .*float32.*\.item\(\)"):
        save_policy(tmp_path / "p", model, vq, at, chunk_size=3, image_size=64, extra={"fps": np.float32(10)})
    assert not saved and not (tmp_path / "p").exists()
    save_policy(tmp_path / "p", model, vq, at, chunk_size=3, image_size=64, extra={"fps": 10, "tags": ["a"]})
    assert WorldVLAPolicy.from_pretrained(tmp_path / "p", device="cpu").extra == {"fps": 10, "tags": ["a"]}


def test_a_text_tokenizer_the_byte_layout_was_not_trained_with_is_refused(tmp_path, policy_dir):
    """The constructor took a text_tokenizer.json tokenizer for a model that encodes text as byte ids: every
    instruction became ids the model never saw as text, without a word (only save() then refused it). It is refused
    as save_policy refuses it; the layout's own byte tokenizer is taken."""
    from worldvla.tokens import ChameleonTextTokenizer

    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    vocab.update({c: 10 + i for i, c in enumerate(sorted(set("What action should the robot take to x?")))})
    path = tmp_path / "text_tokenizer.json"
    path.write_text(json.dumps({"version": "1.0", "added_tokens": [], "normalizer": None, "pre_tokenizer": None,
                                "post_processor": None, "decoder": None,
                                "model": {"type": "BPE", "vocab": vocab, "merges": []}}))
    pol = WorldVLAPolicy.from_pretrained(policy_dir, device="cpu")
    parts = (pol.model, pol.vqgan, pol.action_tokenizer)
    other_bytes = ByteTextTokenizer(VocabLayout.compact(n_image_codes=32))  # bytes at another layout's text ids
    for bad in (ChameleonTextTokenizer(path), other_bytes):
        with pytest.raises(ValueError, match="encodes text as byte ids; this text_tokenizer .*drop text_tokenizer="):
            WorldVLAPolicy(*parts, chunk_size=3, image_size=64, text_tokenizer=bad)
    WorldVLAPolicy(*parts, chunk_size=3, image_size=64, text_tokenizer=ByteTextTokenizer(LAYOUT))


def test_an_action_tokenizer_of_another_layout_is_refused(policy_dir, rng):
    """An ActionTokenizer built on another layout (its bins at other ids) was taken: every action the policy
    returned was shifted by the layouts' difference, and imagine encoded the actions as other bins."""
    pol = WorldVLAPolicy.from_pretrained(policy_dir, device="cpu")
    for other in (VocabLayout.compact(n_image_codes=32), VocabLayout.compact(n_image_codes=64, n_bins=128)):
        lo, hi = other.bin_range
        with pytest.raises(ValueError, match=rf"action tokenizer's layout \({other.name}\) has its bins at ids "
                                             rf"\[{lo}, {hi}\].*ActionTokenizer\(model.layout, low, high\)"):
            WorldVLAPolicy(pol.model, pol.vqgan, ActionTokenizer(other, LOW, HIGH), chunk_size=3, image_size=64)
    same = WorldVLAPolicy(pol.model, pol.vqgan, ActionTokenizer(VocabLayout.compact(n_image_codes=64), LOW, HIGH),
                          chunk_size=3, image_size=64)
    frame = _frames(rng)
    same.reset("open the drawer")
    assert np.array_equal(same.act(frame, history=None), _expected(pol, "open the drawer", [frame]))


def test_a_history_of_true_or_a_fraction_is_refused(tmp_path, policy_dir):
    """history=True ("use the history") was taken as 1, a policy that never shows the model the previous frame, and
    save_policy wrote it as 1; 2.0 was taken too. Both are refused, as chunk_size is."""
    model, vq, at = _parts()
    for bad in (True, False, 2.0):
        with pytest.raises(ValueError, match=f"history must be 1 .* or 2 .*got {bad!r}"):
            WorldVLAPolicy(model, vq, at, chunk_size=3, image_size=64, history=bad)
        with pytest.raises(ValueError, match=f"history must be 1 .* or 2 .*got {bad!r}"):
            save_policy(tmp_path / "p", model, vq, at, chunk_size=3, image_size=64, history=bad)
    assert not (tmp_path / "p").exists()
    assert WorldVLAPolicy(model, vq, at, chunk_size=3, image_size=64, history=np.int64(1)).history == 1


def test_step_on_another_number_of_environments_names_step_and_reset(policy_dir, rng):
    """After a chunk for two environments was used up, step(one frame) was refused as act()'s call, asking for a
    history= that step() does not take; the error now names step() and the way out."""
    pol = WorldVLAPolicy.from_pretrained(policy_dir, device="cpu")
    pol.reset("open the drawer")
    for _ in range(pol.chunk_size):
        pol.step(_frames(rng, 2))
    with pytest.raises(ValueError, match=r"previous frames are for 2 environments but step\(\) got 1; step\(\) takes "
                                         r"no history=: .*reset\(\) to start again"):
        pol.step(_frames(rng))
    with pytest.raises(ValueError, match=r"but act\(\) got 1; pass history= explicitly"):
        pol.act(_frames(rng))
    pol.reset("open the drawer")
    assert pol.step(_frames(rng)).shape == (4,)


def test_a_chunk_decoded_with_a_layout_of_another_vocabulary_is_refused(rng):
    """generate_action_chunk took a layout of another vocabulary than the model's: a larger one failed deep in the
    embedding with a bare IndexError, a smaller one decoded its bins at ids the model learned as other tokens, without
    a word. Both are refused by name, as the policy refuses them."""
    model = _parts()[0]
    prompt = _action_prompt(rng)
    for other in (VocabLayout.compact(n_image_codes=512), VocabLayout.compact(n_image_codes=32)):
        for mode in ("parallel", "sequential", "causal"):
            with pytest.raises(ValueError, match=f"the layout '{other.name}' has {other.vocab_size} ids but the model "
                                                 f"{LAYOUT.vocab_size}: pass the model's own layout"):
                generate_action_chunk(model, prompt, other, 2, 4, mode=mode)
    own = generate_action_chunk(model, prompt, LAYOUT, 2, 4)
    assert torch.equal(generate_action_chunk(model, prompt, None, 2, 4), own)


def test_a_chameleon_policy_without_its_text_tokenizer_names_the_keyword_and_the_file(tmp_path):
    """A Chameleon-vocabulary policy built without a text tokenizer was told to pass `tokenizer_json=`, a keyword
    the policy does not take (after a warning about image ids); a policy folder missing its text_tokenizer.json
    said the same. The constructor now names text_tokenizer=, the folder the missing file."""
    import re
    import warnings

    from worldvla.tokens import ChameleonTextTokenizer

    path, _ = _release_text_tokenizer(tmp_path)
    chameleon = VocabLayout.chameleon()
    model = WorldVLA(ModelConfig.tiny(chameleon, num_hidden_layers=1)).eval()
    _, vq, _ = _parts()
    at = ActionTokenizer(chameleon, LOW, HIGH)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # refused before the image-id warning, which would point elsewhere
        with pytest.raises(ValueError, match=r"pass text_tokenizer=ChameleonTextTokenizer\(path\)"):
            WorldVLAPolicy(model, vq, at, chunk_size=2, image_size=64)
    save_policy(tmp_path / "p", model, vq, at, chunk_size=2, image_size=64, text_tokenizer_json=path)
    (tmp_path / "p" / "text_tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(f"{tmp_path / 'p' / 'text_tokenizer.json'} is missing")):
        WorldVLAPolicy.from_pretrained(tmp_path / "p", device="cpu")
    pol = WorldVLAPolicy.from_pretrained(tmp_path / "p", device="cpu", text_tokenizer=ChameleonTextTokenizer(path))
    assert isinstance(pol.text_tokenizer, ChameleonTextTokenizer)


def test_step_shapes_each_action_for_the_frame_it_is_given(policy_dir, rng):
    """step() returns [D] for a frame [H, W, 3] and [N, D] for a batch: mid-chunk it returned the shape of the call
    that queried the chunk, so a batch of one got [D] (and a single frame [1, D]) after a chunk queried the other way.
    The actions are the chunk's, whatever their shape."""
    pol = WorldVLAPolicy.from_pretrained(policy_dir, device="cpu")
    frames = [_frames(rng) for _ in range(3)]
    for first, later in ((lambda f: f, lambda f: f[None]), (lambda f: f[None], lambda f: f)):
        pol.reset("push the button")
        got = [pol.step(first(frames[0]))] + [pol.step(later(f)) for f in frames[1:]]
        assert [a.shape for a in got] == [first(frames[0]).shape[:-3] + (4,)] + [later(frames[1]).shape[:-3] + (4,)] * 2
        chunk = _expected(pol, "push the button", [frames[0]])
        assert np.array_equal(np.stack([a.reshape(4) for a in got]), chunk)
    pol.reset("push the button")  # a batch of two keeps [2, D] throughout
    assert [pol.step(_frames(rng, 2)).shape for _ in range(4)] == [(2, 4)] * 4


def test_frames_too_large_for_the_context_are_named_not_the_instruction(policy_dir):
    """A policy whose frames alone fill the model's context (512-px frames on a 1,024-position model) refused every
    instruction, a one-letter one too, as "too long; shorten it". The error now says no instruction fits, and why."""
    pol = WorldVLAPolicy.from_pretrained(policy_dir, device="cpu")
    parts = (pol.model, pol.vqgan, pol.action_tokenizer)
    for history, fewer in ((2, " or history=1"), (1, "")):
        big = WorldVLAPolicy(*parts, chunk_size=3, image_size=512, history=history)
        with pytest.raises(ValueError, match=rf"no instruction fits the model's 1024 positions: .*\({history} "
                                             rf"frame\(s\) of 512 px, .*use a smaller image_size{fewer}, or a "
                                             rf"smaller chunk_size"):
            big.reset("a")
    release = WorldVLAPolicy(*parts, chunk_size=3, image_size=64, mode="release", max_new_tokens=1000)
    with pytest.raises(ValueError, match="no instruction fits .* or a smaller max_new_tokens"):
        release.reset("a")
    with pytest.raises(ValueError, match="the instruction is too long"):  # frames that fit: the instruction is named
        pol.reset("x" * pol.model.config.max_position_embeddings)
    # An empty query that fills the context exactly leaves no room for any instruction (reset refuses empty ones):
    # "shorten it" was no fix there either. One position more fits a one-letter instruction, not a two-letter one.
    least = pol._prompt_capacity(pol._prefix("").numel())
    pol.model.config.max_position_embeddings = least
    with pytest.raises(ValueError, match=rf"no instruction fits the model's {least} positions: a query needs {least} "
                                         rf"with an empty one"):
        pol.reset("x")
    pol.model.config.max_position_embeddings = least + 1
    pol.reset("x")
    with pytest.raises(ValueError, match=rf"the instruction is too long: a query with it needs {least + 2} "):
        pol.reset("xy")


def test_an_action_dim_written_as_a_string_is_named_as_such(policy_dir, tmp_path):
    """policy.json with "action_dim": "4" (a hand-edited file) was refused as 'action_dim 4 disagrees with the 4
    bounds', a contradiction; the value is now shown as written."""
    import shutil

    folder = tmp_path / "policy"
    shutil.copytree(policy_dir, folder)
    info = json.loads((folder / "policy.json").read_text())
    info["action_dim"] = "4"
    (folder / "policy.json").write_text(json.dumps(info))
    with pytest.raises(ValueError, match="action_dim '4' disagrees with the 4 bounds"):
        WorldVLAPolicy.from_pretrained(folder, device="cpu")


def test_the_policy_keeps_its_own_copy_of_extra():
    """`extra` is copied at construction: a caller editing its dict afterwards (one dict for several policies)
    changes neither the policy's metadata nor what it saves."""
    extra = {"task": "demo"}
    pol = WorldVLAPolicy(*_parts(), chunk_size=3, image_size=64, extra=extra)
    extra["task"] = "other"
    assert pol.metadata()["extra"] == {"task": "demo"}
    pol.extra["robot"] = "arm"
    assert extra == {"task": "other"}


def _release_policy(monkeypatch, generated):
    """A mode='release' policy whose generation returns `generated()` (one Generated per prompt)."""
    from worldvla.inference import policy as policy_mod

    monkeypatch.setattr(policy_mod, "generate_release_actions", lambda model, prompts, *a, **k: generated()[:len(prompts)])
    return WorldVLAPolicy(*_parts(), chunk_size=3, image_size=64, mode="release")


def test_release_chunks_of_one_length_stack_into_one_array(rng, monkeypatch):
    """mode='release': a batch whose environments' chunks hold as many actions each is one [N, n, D] array, which
    step() and the harnesses execute; only chunks of different lengths are a list."""
    from worldvla.inference.release import Generated

    lo = LAYOUT.bin_range[0]
    blocks = [[LAYOUT.boa, *range(lo + 1, lo + 5), LAYOUT.eoa], [LAYOUT.boa, *range(lo + 5, lo + 9), LAYOUT.eoa]]
    gen = [Generated(torch.tensor(sum(blocks, [])), torch.tensor(blocks), False)] * 2
    pol = _release_policy(monkeypatch, lambda: gen)
    frames = _frames(rng, 2)
    pol.reset(["open the drawer", "push the button"])
    out = pol.act(frames, history=None)
    want = pol.action_tokenizer.decode(np.array(blocks)).astype(np.float32)
    assert isinstance(out, np.ndarray) and out.shape == (2, 2, 4)
    assert np.array_equal(out[0], want) and np.array_equal(out[1], want)


def test_step_fails_a_batch_where_any_environments_chunk_holds_a_short_block(rng, monkeypatch):
    """mode='release', a batch: one environment's chunk goes on into a block the release fails on (fails_after),
    the other's does not. step() returns the actions before that block, then raises for the batch, as it does
    for that environment alone; it does not query a new chunk in its place."""
    from worldvla.inference.release import Generated

    lo = LAYOUT.bin_range[0]
    block = [LAYOUT.boa, *range(lo + 1, lo + 5), LAYOUT.eoa]
    gen = [Generated(torch.tensor(block * 2 + [LAYOUT.boa, lo, lo, LAYOUT.eoa]), torch.tensor([block] * 2), False,
                     True),
           Generated(torch.tensor(block * 2), torch.tensor([block] * 2), False, False)]
    calls = []
    pol = _release_policy(monkeypatch, lambda: calls.append(1) or gen)
    frames = _frames(rng, 2)
    pol.reset(["open the drawer", "push the button"])
    want = pol.action_tokenizer.decode(np.array(block)).astype(np.float32)
    for _ in range(2):
        got = pol.step(frames)
        assert got.shape == (2, 4) and np.array_equal(got, np.stack([want, want]))
    with pytest.raises(RuntimeError, match="malformed.*fails the episode"):
        pol.step(frames)
    assert len(calls) == 1
    out = pol.act(frames)  # act() keeps no action of the chunk that holds the short block, the other's all
    assert [c.shape for c in out] == [(0, 4), (2, 4)]


def test_clear_caches_drops_the_codes_of_a_vqgan_without_version_counters(rng):
    """A VQGAN made under torch.inference_mode has inference tensors, which keep no version counter: weights it
    is given in place there are seen by no cache key, so `clear_caches()` itself drops the frames' codes, and
    the next query encodes its frame with the new weights."""
    model, _, at = _parts()
    torch.manual_seed(0)
    cfg = VQGANConfig(ch=32, ch_mult=(1, 1, 1, 1, 1), num_res_blocks=1, z_channels=32, embed_dim=32, n_embed=64)
    with torch.inference_mode():
        vq = VQGAN(cfg).eval()
        torch.manual_seed(1)
        new = VQGAN(cfg).eval()
    assert next(vq.parameters()).is_inference()
    pol = WorldVLAPolicy(model, vq, at, chunk_size=3, image_size=64)
    encoded = []
    real = vq.encode_images
    vq.encode_images = lambda frames: encoded.append(len(frames)) or real(frames)
    pol.reset("open the drawer")
    f0 = _frames(rng)
    pol.act(f0, history=None)
    with torch.inference_mode():
        for a, b in zip([*vq.parameters(), *vq.buffers()], [*new.parameters(), *new.buffers()]):
            a.copy_(b)
    pol.act(f0, history=None)
    assert encoded == [1]  # nothing told the policy of the new weights
    pol.clear_caches()
    after = pol.act(f0, history=None)
    assert encoded == [1, 1]
    fresh = WorldVLAPolicy(model, new, at, chunk_size=3, image_size=64)
    fresh.reset("open the drawer")
    assert np.array_equal(after, fresh.act(f0, history=None))


def test_a_refused_observe_or_act_records_no_frame(policy_dir, rng):
    """observe() or act() refused for a wrong number of frames leaves the recorded previous frames as they were:
    the next act() without history= takes the frames of the last accepted call."""
    pol = WorldVLAPolicy.from_pretrained(policy_dir, device="cpu")
    pol.reset(["open the drawer", "push the button"])
    first = _frames(rng, 2)
    pol.act(first, history=None)
    with pytest.raises(ValueError, match=r"reset\(\) got 2 instructions but observe\(\) got 3 frames"):
        pol.observe(_frames(rng, 3))
    with pytest.raises(ValueError, match=r"reset\(\) got 2 instructions but act\(\) got 1 frame;"):
        pol.act(_frames(rng, 1))
    cur = _frames(rng, 2)
    got = pol.act(cur)
    for i, ins in enumerate(["open the drawer", "push the button"]):
        assert np.array_equal(got[i], _expected(pol, ins, [first[i], cur[i]]))


def test_a_list_of_one_instruction_is_one_environment(policy_dir, rng):
    """reset(["push"]) (a list, as a server resets each robot) is an episode of one environment: two frames are
    refused by act, observe and step, each naming the call made, where reset("push") (a str) takes any number of
    environments."""
    pol = WorldVLAPolicy.from_pretrained(policy_dir, device="cpu")
    pair = _frames(rng, 2)
    pol.reset(["push"])
    for call, name in ((lambda x: pol.act(x, history=None), "act"), (pol.observe, "observe"), (pol.step, "step")):
        with pytest.raises(ValueError, match=rf"^reset\(\) got 1 instruction but {name}\(\) got 2 frames; pass one "
                                             r"frame per environment"):
            call(pair)
    assert pol.act(pair[:1], history=None).shape == (1, 3, 4)
    pol.reset("push")
    assert pol.act(pair, history=None).shape == (2, 3, 4)


def test_errors_name_the_first_environment_at_fault(policy_dir, rng):
    """Where several instructions are empty, or several environments have no history frame, the error names the
    first of them (with its value), as a caller fixing them in order expects."""
    pol = WorldVLAPolicy.from_pretrained(policy_dir, device="cpu")
    with pytest.raises(ValueError, match=r"entry 1 is ''$"):
        pol.reset(["push", "", None])
    pol.reset("push")
    frame = _frames(rng)
    with pytest.raises(ValueError, match=r"history= holds None for environment 1:"):
        pol.act(_frames(rng, 3), history=[frame, None, None])


def test_history_of_more_frames_than_the_current_ones_is_refused(policy_dir, rng):
    """history= with more frames than the current frames is refused as one with fewer is: a surplus frame would
    otherwise be shown to the model as the next environment's previous frame."""
    pol = WorldVLAPolicy.from_pretrained(policy_dir, device="cpu")
    pol.reset("push")
    with pytest.raises(ValueError, match="history holds 3 frames for 2 current frames"):
        pol.act(_frames(rng, 2), history=_frames(rng, 3))
    with pytest.raises(ValueError, match="history holds 2 frames for 1 current frames"):
        pol.act(_frames(rng), history=_frames(rng, 2))


def test_the_mid_chunk_count_error_for_one_environment_is_singular(policy_dir, rng):
    """The refusal of two frames while a one-environment chunk runs says "1 environment", not "1 environments"."""
    pol = WorldVLAPolicy.from_pretrained(policy_dir, device="cpu")
    pol.reset("open the drawer")
    pol.step(_frames(rng))
    with pytest.raises(ValueError, match=r"the chunk under way is for 1 environment: pass one frame per environment"):
        pol.step(_frames(rng, 2))


def test_an_episodes_engine_serves_all_its_queries(policy_dir, rng, monkeypatch):
    """The engine built at an episode's first query (no previous frame) is sized for the episode's longest query,
    the longest instruction of the batch with the full history: the later queries, and a new episode with the same
    instructions, run on it instead of building (and on a GPU capturing) another; the chunks are a fresh policy's."""
    pol = WorldVLAPolicy.from_pretrained(policy_dir, device="cpu")
    built = []
    init = InferenceEngine.__init__
    monkeypatch.setattr(InferenceEngine, "__init__",
                        lambda self, model, batch, *a, **k: built.append(batch) or init(self, model, batch, *a, **k))
    names = ["push", "open the top drawer of the cabinet"]  # prefixes of different lengths
    frames = [_frames(rng, 2) for _ in range(3)]
    pol.reset(names)
    pol.act(frames[0], history=None)
    assert built.count(2) == 1
    eng = pol._engines[2]
    got = pol.act(frames[1])
    pol.reset(names)
    pol.act(frames[2], history=frames[1])
    assert pol._engines[2] is eng and built.count(2) == 1
    for i, ins in enumerate(names):
        assert np.array_equal(got[i], _expected(pol, ins, [frames[0][i], frames[1][i]]))


def test_the_code_cache_holds_exactly_its_size(policy_dir, rng, monkeypatch):
    """With room for two frames' codes, a third frame drops the least recently used: querying it again encodes
    it again; by default 64 frames' codes are kept, the 65th dropping the oldest."""
    pol = WorldVLAPolicy.from_pretrained(policy_dir, device="cpu", code_cache_size=2)
    encoded = []
    encode = pol.vqgan.encode
    monkeypatch.setattr(pol.vqgan, "encode", lambda pix, *a, **k: encoded.append(pix.shape[0]) or encode(pix, *a, **k))
    a, b, c = _frames(rng), _frames(rng), _frames(rng)
    pol.reset("open the drawer")
    for frame in (a, b, c, b, a):
        pol.act(frame, history=None)
    assert encoded == [1, 1, 1, 1]  # b still cached after c, a gone
    default = WorldVLAPolicy(pol.model, pol.vqgan, pol.action_tokenizer, chunk_size=3, image_size=64)
    assert default.code_cache_size == 64
    many = _frames(rng, 65)
    default.reset("open the drawer")
    encoded.clear()
    default.act(many, history=None)
    default.act(many[1], history=None)
    assert encoded == [65]
    default.act(many[0], history=None)
    assert encoded == [65, 1]


def test_frames_that_differ_in_one_pixel_get_their_own_codes(policy_dir, rng, monkeypatch):
    """The code cache's key covers every pixel: a frame differing from a cached one in a single pixel (on an odd row
    and column, in one channel) is encoded anew."""
    pol = WorldVLAPolicy.from_pretrained(policy_dir, device="cpu")
    encoded = []
    encode = pol.vqgan.encode
    monkeypatch.setattr(pol.vqgan, "encode", lambda pix, *a, **k: encoded.append(pix.shape[0]) or encode(pix, *a, **k))
    pol.reset("open the drawer")
    frame = _frames(rng)
    pol.act(frame, history=None)
    for y, x, ch in ((1, 1, 2), (63, 63, 1), (0, 0, 0)):
        moved = frame.copy()
        moved[y, x, ch] ^= 1
        pol.act(moved, history=None)
    assert encoded == [1, 1, 1, 1]


def test_the_default_caches_keep_32_instructions_and_4_batch_sizes(policy_dir, rng, monkeypatch):
    """By default 32 instructions keep their prefixes and 4 batch sizes their engines: robots taking turns within
    those numbers compute no prefix and build no engine twice; one more of each drops the least recently used."""
    pol = WorldVLAPolicy.from_pretrained(policy_dir, device="cpu")
    computed = _count_prefixes(pol, monkeypatch)
    frame = _frames(rng, 1)
    names = [f"task {i}" for i in range(32)]
    _take_turns(pol, names, frame)
    assert len(computed) == 32
    pol.reset(["task 32"])
    pol.act(frame, history=None)
    pol.reset([names[0]])
    pol.act(frame, history=None)
    assert len(computed) == 34
    pol.reset("push")
    frames = _frames(rng, 5)
    for n in (1, 2, 3, 4):
        pol.act(frames[:n], history=None)
    engines = dict(pol._engines)
    for n in (1, 2, 3, 4):
        pol.act(frames[:n], history=None)
        assert pol._engines[n] is engines[n]
    pol.act(frames, history=None)
    assert list(pol._engines) == [2, 3, 4, 5]


def test_the_default_mode_and_what_metadata_reports(tmp_path, rng):
    """A policy decodes its chunks in "parallel" mode by default; metadata() (which a server sends its clients)
    reports the policy's own history, mode, dtype name and VQGAN codebook size."""
    model, _, at = _parts()
    torch.manual_seed(0)
    vq = VQGAN(VQGANConfig(ch=32, ch_mult=(1, 1, 1, 1, 1), num_res_blocks=1, z_channels=32, embed_dim=32,
                           n_embed=32)).eval()  # fewer codes than the layout's 64 image ids
    pol = WorldVLAPolicy(model, vq, at, chunk_size=3, image_size=64, history=1)
    meta = pol.metadata()
    assert pol.mode == "parallel" and meta["mode"] == "parallel"
    assert meta["history"] == 1 and meta["vqgan"] == {"downsample": 16, "codebook_size": 32}
    assert meta["model"]["dtype"] == "float32" and meta["device"] == "cpu"
    pol.model.to(torch.bfloat16)
    assert pol.metadata()["model"]["dtype"] == "bfloat16"


def test_calling_the_policy_is_act_with_its_history(policy_dir, rng):
    """policy(frame, history=...) is act(frame, history=...): the history given is the one the chunk sees."""
    pol = WorldVLAPolicy.from_pretrained(policy_dir, device="cpu")
    f0, f1, f2 = _frames(rng), _frames(rng), _frames(rng)
    pol.reset("open the drawer")
    pol(f0)
    assert np.array_equal(pol(f2, history=f1), _expected(pol, "open the drawer", [f1, f2]))
    assert np.array_equal(pol(f2, history=None), _expected(pol, "open the drawer", [f2]))
    assert np.array_equal(pol(f1), _expected(pol, "open the drawer", [f2, f1]))


def test_the_policy_tunes_malloc_when_told_to_wherever_the_model_is(monkeypatch):
    """tune_malloc=True tunes glibc's malloc whatever the model's device; the default (None) only for a model on the
    CPU."""
    from worldvla.inference import policy as policy_mod

    calls = []
    monkeypatch.setattr(policy_mod, "tune_cpu_malloc", lambda: calls.append(1))
    _, vq, at = _parts()
    with torch.device("meta"):
        model = WorldVLA(ModelConfig.tiny(LAYOUT)).eval()
    for kw, expected in (({}, 0), ({"tune_malloc": True}, 1), ({"tune_malloc": False}, 0)):
        calls.clear()
        WorldVLAPolicy(model, vq, at, chunk_size=3, image_size=64, **kw)
        assert len(calls) == expected, kw


def test_step_fails_a_one_environment_episode_on_the_short_block_mid_chunk(rng, monkeypatch):
    """mode='release', one environment: step() returns the chunk's actions before the block the release fails on,
    then raises the episode's failure (not an error of its own), and an episode whose chunks are all empty raises
    NoActionWritten for a batch as for one frame."""
    from worldvla.inference.policy import NoActionWritten
    from worldvla.inference.release import Generated

    lo = LAYOUT.bin_range[0]
    block = [LAYOUT.boa, *range(lo + 1, lo + 5), LAYOUT.eoa]
    short = Generated(torch.tensor(block * 2 + [LAYOUT.boa, lo, lo, LAYOUT.eoa]), torch.tensor([block] * 2), False,
                      True)
    gen = [short]
    pol = _release_policy(monkeypatch, lambda: gen)
    frame = _frames(rng)
    pol.reset("open the drawer")
    want = pol.action_tokenizer.decode(np.array(block)).astype(np.float32)
    for _ in range(2):
        assert np.array_equal(pol.step(frame), want)
    with pytest.raises(RuntimeError, match="malformed.*fails the episode"):
        pol.step(frame)
    empty = Generated(torch.tensor([LAYOUT.eoa]), torch.zeros(0, 6, dtype=torch.long), True)
    gen[:] = [empty, empty]
    for frames in (_frames(rng, 2), frame):
        pol.reset("open the drawer")
        with pytest.raises(NoActionWritten, match="the model wrote no action block"):
            pol.step(frames)


def test_clear_caches_drops_the_norm_copies_of_a_bfloat16_model_without_version_counters(rng, monkeypatch,
                                                                                         native_step_runs):
    """A bfloat16 model made under torch.inference_mode has no version counters; the native steps hold float32
    copies of its norms. New weights written there in place (norms included) are seen after `clear_caches()`: the
    next query is a fresh policy's on the new weights."""
    from worldvla.ops import decoder, dispatch

    monkeypatch.setitem(dispatch.AUTO_ORDER, ("decoder_layer", "cpu"), ("native", "torch"))
    monkeypatch.setattr(decoder, "NATIVE_STEP", True)
    old, vq, at = _parts(0)
    new = _parts(1)[0]
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in new.named_parameters():
            if "norm" in name:
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
    with torch.inference_mode():
        model = WorldVLA(ModelConfig.tiny(LAYOUT)).to(torch.bfloat16).eval()
        model.load_state_dict(old.state_dict())
    assert next(model.parameters()).is_inference()
    pol = WorldVLAPolicy(model, vq, at, chunk_size=3, image_size=64)
    pol.reset("open the drawer")
    frame = _frames(rng)
    before = pol.act(frame, history=None)
    assert native_step_runs
    with torch.inference_mode():
        model.load_state_dict(new.state_dict())
    pol.clear_caches()
    after = pol.act(frame, history=None)
    fresh = WorldVLAPolicy(new.to(torch.bfloat16), vq, at, chunk_size=3, image_size=64)
    fresh.reset("open the drawer")
    assert np.array_equal(after, fresh.act(frame, history=None)) and not np.array_equal(after, before)


def test_an_instruction_repeated_in_a_batch_counts_once_against_max_prefixes(policy_dir, rng, monkeypatch):
    """A batch may keep more prefixes than max_prefixes only for its own distinct instructions: two robots with the
    same instruction count once, so with room for two, a batch of ("push", "push", "lift") drops an older
    instruction's prefix, which is computed again when it comes back."""
    pol = WorldVLAPolicy.from_pretrained(policy_dir, device="cpu")
    computed = []
    prefix_kv = pol._prefix_kv
    monkeypatch.setattr(pol, "_prefix_kv", lambda prefix: computed.append(1) or prefix_kv(prefix))
    pol.max_prefixes = 2
    frames = _frames(rng, 3)
    pol.reset("open the drawer")
    pol.act(frames[0], history=None)
    pol.reset(["push", "push", "lift"])
    pol.act(frames, history=None)
    assert len(computed) == 3 and sorted(pol._prefixes) == ["lift", "push"]
    pol.reset("open the drawer")
    assert np.array_equal(pol.act(frames[0], history=None), _expected(pol, "open the drawer", [frames[0]]))
    assert len(computed) == 4
