"""World-model generation: the next frame's tokens from (frame, action) (spec 2.3).

The answer of a world-model prompt is one image: `BOI, res(h), res(w), h rows of
(w codes, newline), EOI`. Everything but the codes is determined by the grid size, so it
is forced, and forced tokens ride in the forward pass of the token before them: the
header goes with the prompt's prefill, and a row's newline with the row's last code
(a 2-row step). A frame of h x w codes costs h*w - 1 decode steps. Codes are chosen among
the image-code ids only, greedily or by top-k / temperature sampling; when those ids form one
range and there is no guidance, through the fused constrained sampler (`ops.constrained_sample`:
the range's logits only, greedy without materializing them). Sampling is the Gumbel-max draw of
`sample_logits`, its noise drawn an image row at a time. On the CPU, a frame whose steps run as native
calls runs its loop in one native call (greedy) or one an image row (sampled; `NATIVE_FRAME_LOOP`):
the same steps and choices as the Python loop (guided frames too: their branches' logits then come from
the native kernel in both loops).

Classifier-free guidance (optional): the unconditional branch is the same prompt without
the action block (`BOS, text, image, SEP`), decoded in the same batch, and the code
logits are `u + s (c - u)`. Dropping the action (not the whole context, as Lumina's
image CFG does) makes the guidance push toward what the action changes; without the
current frame the prediction would not be a prediction of the next frame at all.

Multi-step rollouts feed each predicted frame's codes (not re-encoded pixels) back as the
next input, so the VQGAN encodes the first frame once and decodes each frame once.
"""
from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import numpy as np
import torch

from ..model import plain_linear
from ..ops import dispatch
from ..ops.sampling import check_sampling, draw_gumbel, resolve_constrained_sample, sample_logits, scaled_gumbel
from ..tokens.actions import float64_array
from ..tokens.layout import with_release_image_ids
from ..tokens.sequence import WORLD_PROMPT, SequenceBuilder, image_tokens
from .chunk import head_logits, head_sample, sampling_backend
from .engine import InferenceEngine

# A frame on the CPU runs its decode loop in native calls where the steps are native plans and the
# choice is the native sampler's (`_native_frame_loop`); False keeps the loop in Python.
NATIVE_FRAME_LOOP = True
# Frames per VQGAN call when `generate_frames` encodes its images and decodes its rollouts: a decode's peak
# memory grows by about 170 MB a frame at 256 px (float32, measured on the CPU) and four times that at 512 px,
# so N x T frames in one call would take many GB.
VQGAN_BATCH = 8


def frame_cache_slots(h: int, w: int) -> int:
    """Cache slots a frame of h x w codes fills after its prompt (whose header rides in the prefill): every code
    and newline it is fed, which is all but the last code and the last row's newline (nothing follows them)."""
    return h * (w + 1) - 2


class FrameRollout(NamedTuple):
    codes: torch.Tensor   # [T, h, w] (or [N, T, h, w]) int64 VQ codes of the predicted frames
    frames: np.ndarray    # [T, H, W, 3] (or [N, T, H, W, 3]) uint8 decoded pixels


def _unconditional_prompt(builder: SequenceBuilder, codes: torch.Tensor) -> torch.Tensor:
    lay = builder.layout
    text = torch.as_tensor(builder.text.encode(WORLD_PROMPT), dtype=torch.long)
    return torch.cat([torch.tensor([lay.bos]), text, image_tokens(codes, lay), torch.tensor([lay.sep])])


@torch.no_grad()
def generate_frame_codes(model, codes: torch.Tensor, actions, builder: SequenceBuilder, *, temperature: float = 0.0,
                         top_k: int | None = None, cfg_scale: float | None = None, generator=None,
                         backend: str = "auto", engine: InferenceEngine | None = None) -> torch.Tensor:
    """One world-model step for a batch: codes [N, h, w] + actions [N, D] (continuous) -> next codes [N, h, w]."""
    lay = builder.layout
    if codes.dim() != 3:
        raise ValueError(f"codes must be [N, h, w], got shape {tuple(codes.shape)}")
    N, h, w = codes.shape
    if N == 0:
        raise ValueError(f"codes holds no frame (shape {tuple(codes.shape)}); pass at least one")
    D = builder.actions.action_dim
    actions = float64_array(actions)
    if actions.shape != (N, D):
        raise ValueError(f"actions must be [N, D] = [{N}, {D}] (one action per frame), got shape {actions.shape}")
    _check_cfg_scale(cfg_scale)
    check_frame_sampling(temperature, top_k)
    dispatch.check_generator(generator)
    header = image_tokens(codes[0].cpu(), lay)[:3]  # BOI, res(h), res(w): same grid for the next frame
    prompts = [torch.cat([builder.world_prompt(codes[i].cpu(), actions[i]), header]) for i in range(N)]
    guided = cfg_scale is not None and cfg_scale != 1.0
    if guided:
        prompts += [torch.cat([_unconditional_prompt(builder, codes[i].cpu()), header]) for i in range(N)]
    rows = len(prompts)
    n_new = frame_cache_slots(h, w)
    need = max(p.numel() for p in prompts) + n_new
    if engine is None:
        engine = InferenceEngine(model, rows, need, layout=lay, backend=backend)
    elif engine.mismatch(model):
        raise ValueError(engine.mismatch(model))
    elif engine.batch_size != rows:
        raise ValueError(f"the engine holds {engine.batch_size} rows but this step needs {rows}")
    elif need > engine.max_len:
        raise ValueError(f"a prompt of {max(p.numel() for p in prompts)} tokens and a frame of {h} x {w} codes need "
                         f"{need} cache slots; the engine has {engine.max_len}")
    dev = engine.device
    lo, hi = lay.image_id_range
    valid = torch.zeros(hi - lo, dtype=torch.bool, device=dev)
    valid[torch.tensor(lay.image_code_ids, device=dev) - lo] = True
    all_valid = bool(valid.all())
    code_of = torch.full((hi - lo,), -1, dtype=torch.long, device=dev)
    code_of[torch.tensor(lay.image_code_ids, device=dev) - lo] = torch.arange(lay.n_image_codes, device=dev)

    fused = not guided and all_valid  # the code ids are one range: the fused constrained sampler
    sampler = sampling_backend(backend)
    sampled = temperature > 0.0

    P = torch.tensor([p.numel() for p in prompts], dtype=torch.long, device=dev)
    h_last = engine.prefill(prompts)
    engine.set_kv_len((P + n_new).to(torch.int32))  # generated slots carry NO_BLOCK from the prefill
    loop = _native_frame_loop(engine, model, h_last, lo, hi, temperature, sampler) if all_valid else None
    native = loop if NATIVE_FRAME_LOOP else None  # the switch picks the loop, not the choices
    native_logits = loop is not None  # guided frames where the native loop can run: its kernel's logits in either loop

    def choose(hid, gumbel):  # hid [rows, H], gumbel [N, hi - lo] or None -> token ids [N]
        if fused:
            return head_sample(model, hid, lo, hi, temperature, top_k, generator, backend=sampler, gumbel=gumbel)
        if native_logits:  # guided: both branches' logits from the kernel the native loop uses
            from ..ops.native_backend import range_logits_op
            logits = range_logits_op(hid, model.lm_head.weight, lo, hi)
        else:
            logits = head_logits(model, hid, lo, hi).float()
        if guided:
            cond, unc = logits[:N], logits[N:]
            # A code either branch rules out (-inf: a head hook's ban, an overflow) stays out: the formula would
            # give -inf - (-inf) = NaN there, which argmax and top-k take for the largest score.
            banned = torch.isneginf(cond) | torch.isneginf(unc)
            logits = (unc + cfg_scale * (cond - unc)).masked_fill(banned, float("-inf"))
        if not all_valid:
            logits = logits.masked_fill(~valid, float("-inf"))
        return sample_logits(logits, temperature, top_k, generator, gumbel) + lo

    # A sampled frame draws its Gumbel noise an image row at a time ([w, N, hi - lo]: code i takes row
    # i % w), so that the Python loop and the native one consume the generators alike. Each frame of the
    # batch draws from its own generator, seeded from one draw of `generator`, so that a frame's sample
    # does not depend on how many others share its batch.
    item_gens = _item_generators(generator, N, dev) if sampled else ()

    def row_noise():
        if not sampled:
            return None
        return torch.stack([draw_gumbel((w, hi - lo), g, dev) for g in item_gens], dim=1)

    out = torch.empty(N, h * w, dtype=torch.long, device=dev)
    noise = row_noise()
    out[:, 0] = choose(h_last, None if noise is None else noise[0])
    nxt = P.clone()  # position of the next token to feed, per row
    one, two = engine.buffers(1), engine.buffers(2)
    for buf in (one, two):
        buf.q_limit.fill_(-1)
    two.ids[:, 1] = lay.newline
    if native is not None:  # the loop below in native calls: the same steps, the same choices
        steps = engine.step_plan(1).step, engine.step_plan(2).step
        frame = (model.lm_head.weight, lo, hi, out, nxt, h, w, lay.newline)
        scale = float(cfg_scale) if guided else None
        if not sampled:
            native(*steps, *frame, cfg_scale=scale)
        for row in range(h) if sampled else ():  # a call an image row, with that row's noise
            noise = noise if row == 0 else row_noise()
            native(*steps, *frame, first=max(row * w, 1), last=(row + 1) * w,
                   noise=scaled_gumbel(noise, temperature).contiguous(), top_k=top_k, cfg_scale=scale)
        return code_of[out - lo].view(N, h, w)
    offsets = torch.arange(2, device=dev).view(1, 2)
    for i in range(1, h * w):
        tok = out[:, i - 1].repeat(2) if guided else out[:, i - 1]
        if i % w == 0:  # the previous code closes a row: feed it with the row's newline
            two.ids[:, 0] = tok
            two.set_positions(nxt.view(-1, 1) + offsets)
            hid = engine.run(two)[:, 1]
            nxt += 2
            noise = row_noise()
        else:
            one.ids[:, 0] = tok
            one.set_positions(nxt.view(-1, 1))
            hid = engine.run(one)[:, 0]
            nxt += 1
        out[:, i] = choose(hid, None if noise is None else noise[i % w])
    return code_of[out - lo].view(N, h, w)


def _item_generators(generator, n: int, device) -> list:
    """`n` generators on `device`, the i-th seeded from one draw of `generator` (torch's default one
    when None) and i alone."""
    where = generator.device if generator is not None else "cpu"  # a CUDA generator draws on its device
    base = int(torch.randint(0, 2**62, (1,), generator=generator, device=where))
    return [torch.Generator(device=device).manual_seed((base + 0x9E3779B97F4A7C15 * i) % 2**63) for i in range(n)]


def _native_frame_loop(engine, model, hidden, lo, hi, temperature, backend):
    """`ops.native_backend.decode_frame` where it computes what `generate_frame_codes`' loop would
    (the CPU; both step shapes on the engine's native plans; a plain lm_head, which autocast leaves as it
    is, whose choice at this temperature resolves to the native sampler), else None, whatever
    NATIVE_FRAME_LOOP says. On the CPU the loop's Python between steps (buffer writes, the plan lookup, the
    sampler's dispatch) is a sizeable part of a frame."""
    if engine.device.type != "cpu" or not plain_linear(model.lm_head):
        return None
    if engine.step_plan(1) is None or engine.step_plan(2) is None:
        return None
    from ..ops import native_backend
    weight = model.lm_head.weight
    # The native loop reads the steps' hidden states and the weight as they are: where autocast would cast either
    # (a float32 model under bfloat16 autocast), its choices would not be the Python loop's, which take them as
    # `constrained_sample` casts them. Elsewhere autocast leaves them as they are.
    if dispatch.autocast_casts(hidden.device.type, hidden.dtype, weight.dtype):
        return None
    if weight.dtype not in (torch.float32, torch.bfloat16) or resolve_constrained_sample(
            hidden, weight, lo, hi, temperature, backend) is not native_backend.constrained_sample:
        return None
    return native_backend.decode_frame


def check_frame_sampling(temperature, top_k) -> None:
    """Refuse what `policy.imagine` and `worldvla imagine` refuse: a temperature that is not a finite number >= 0
    (below 0 would decode greedily without a word), and a top_k with greedy codes (it would be ignored); then
    what any draw refuses (`check_sampling`: a top_k that is not an integer >= 1)."""
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) or not (
            math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0 (0: greedy codes), got {temperature!r}")
    check_sampling(temperature, top_k)
    if top_k is not None and temperature == 0:
        raise ValueError(f"top_k applies to draws; set temperature above 0 (or top_k=None for greedy codes), got "
                         f"top_k={top_k!r} at temperature 0")


def _check_cfg_scale(cfg_scale) -> None:
    # Checked here, not by math.isfinite alone: it raises a TypeError for a string that names no argument,
    # and takes True as 1.0.
    if cfg_scale is None:
        return
    try:
        finite = not isinstance(cfg_scale, (str, bytes, bool)) and math.isfinite(cfg_scale)
    except TypeError:
        finite = False
    if not finite:
        raise ValueError(f"cfg_scale must be a finite number (1.0 or None: no guidance), got {cfg_scale!r}")


class FrameDtypeError(TypeError, ValueError):
    """Frames that are not uint8. A TypeError (a wrong dtype) that is also a ValueError (a bad frame), so that
    callers catching either, as the policy's and generate_frames' callers did, see it."""


def frame_array(image) -> tuple[np.ndarray, str | None]:
    """A frame tensor (any device) as a NumPy array, with the name of its dtype where the array's differs: NumPy
    has no bfloat16 ("Got unsupported ScalarType BFloat16"), so a bfloat16 tensor comes as float32, its values
    exact, for the errors to name and convert. Anything else through np.asarray."""
    if not isinstance(image, torch.Tensor):
        return np.asarray(image), None
    t = image.detach().cpu()
    if t.dtype == torch.bfloat16:
        return t.float().numpy(), "bfloat16"
    return t.numpy(), None


def mixed_sizes_error(image, what: str, fix: str) -> ValueError:
    """The error for frames given as a list that NumPy cannot stack (its "inhomogeneous shape": frames of different
    sizes), naming their shapes; `fix` says what size to give them."""
    try:
        shapes = sorted({tuple(np.shape(f)) for f in image})
    except (TypeError, ValueError):
        shapes = "different"
    return ValueError(f"{what} must all have one size ([N, H, W, 3]), got frames of shapes {shapes}: {fix}")


def _to_batch_images(image) -> tuple[np.ndarray, bool]:
    tensor = isinstance(image, torch.Tensor)
    try:
        a, dtype_name = frame_array(image)
    except ValueError:
        raise mixed_sizes_error(image, "image", "resize them to one size first") from None
    if a.ndim not in (3, 4) or a.shape[-1] != 3:
        raise ValueError(f"image must be RGB uint8 [H, W, 3] or [N, H, W, 3], got shape {a.shape}"
                         f"{frame_layout_hint(a, tensor)}")
    if a.dtype != np.uint8:
        raise FrameDtypeError(f"image must be uint8 in [0, 255], got {uint8_hint(a, tensor, dtype_name)}")
    return (a[None], True) if a.ndim == 3 else (a, False)


def frame_layout_hint(a: np.ndarray, tensor: bool = False) -> str:
    """"; it looks <layout>: convert with <call>" for a frame (or batch) `a` that is not channels-last RGB, where
    its shape says which layout it is in; else "". `tensor`: the caller passed a torch tensor (its own calls)."""
    if a.ndim in (3, 4) and a.shape[-1] == 4:
        return "; it looks RGBA: convert with x[..., :3]"
    if a.ndim == 2:
        fix = "x[..., None].expand(*x.shape, 3)" if tensor else "np.repeat(x[..., None], 3, axis=-1)"
        return f"; it looks grayscale: convert with {fix}"
    if a.ndim in (3, 4) and a.shape[-1] == 1:
        fix = "x.expand(*x.shape[:-1], 3)" if tensor else "np.repeat(x, 3, axis=-1)"
        return f"; it looks grayscale: convert with {fix}"
    if a.ndim in (3, 4) and a.shape[-3] == 3:  # [3, H, W] or [N, 3, H, W], as torchvision keeps images
        fix = ("x.permute(1, 2, 0)" if a.ndim == 3 else "x.permute(0, 2, 3, 1)") if tensor else "np.moveaxis(x, -3, -1)"
        return f"; it looks channels-first: convert with {fix}"
    return ""


def uint8_hint(a: np.ndarray, tensor: bool = False, dtype_name: str | None = None) -> str:
    """"<dtype> ...; convert with ..." for frames that are not uint8: the conversion that keeps the image, chosen
    from the dtype and the values (`x * 255` would wrap an int64 or 0..255 float frame around mod 256).
    `tensor`: the caller passed a torch tensor, which the NumPy calls would not take. `dtype_name`: the dtype the
    caller's frames have where `a`'s differs (`frame_array`)."""
    if dtype_name is not None:
        return uint8_hint(a, tensor).replace(str(a.dtype), dtype_name, 1)
    if a.dtype.kind not in "biuf":
        return f"{a.dtype}; give RGB pixels as a numeric array, e.g. np.asarray(x, dtype=np.uint8)"
    if a.dtype.kind == "b":
        return f"{a.dtype}; convert with x.{'to(torch.uint8)' if tensor else 'astype(np.uint8)'} * 255"
    finite = a[np.isfinite(a)] if a.dtype.kind == "f" else a
    if finite.size == 0:
        return f"{a.dtype} without a finite value; frames need pixel values in 0..255"
    lo, hi = finite.min().item(), finite.max().item()
    values = f"{a.dtype} with values in [{lo:g}, {hi:g}]" + (" and NaN or inf" if finite.size < a.size else "")
    to_uint8 = ".to(torch.uint8)" if tensor else ".astype(np.uint8)"
    clip = "x.clamp(0, 255)" if tensor else "np.clip(x, 0, 255)"
    if a.dtype.kind == "f" and lo >= 0 and hi <= 1:
        return f"{values}; convert with (x * 255).round(){to_uint8}"
    if a.dtype.kind == "f" and lo >= -1 and hi <= 1:  # the VQGAN's [-1, 1] pixels
        return f"{values}; convert with ((x + 1) * 127.5).round(){to_uint8}"
    if a.dtype.kind == "f":
        return f"{values}; convert with {clip}.round(){to_uint8}"
    return f"{values}; convert with {clip}{to_uint8}"


@torch.no_grad()
def generate_frames(model, vqgan, image, actions, *, layout=None, action_tokenizer, text_tokenizer,
                    temperature: float = 0.0, top_k: int | None = None, cfg_scale: float | None = None,
                    generator=None, backend: str = "auto", progress: bool = False) -> FrameRollout:
    """Roll the world model out from `image` over a sequence of actions.

    image: uint8 [H, W, 3] (or a batch [N, H, W, 3]); actions: [T, D] continuous (or [D] for one
    step; [N, T, D] with a batch, [N, 1, D] for one step each). Each predicted frame's codes are the next
    step's input.
    Returns codes [T, h, w] and decoded frames uint8 [T, H, W, 3] (with a leading N for a batch).
    `progress`: a progress bar over the steps (tqdm).
    """
    if layout is None and getattr(model, "layout", None) is None:
        raise ValueError("the model carries no vocabulary layout: pass the model's VocabLayout (layout=)")
    layout = with_release_image_ids(layout or model.layout, text_tokenizer)
    builder = SequenceBuilder(layout, text_tokenizer, action_tokenizer)
    imgs, single = _to_batch_images(image)
    N = imgs.shape[0]
    if N == 0:
        raise ValueError(f"image holds no frame (shape {imgs.shape}); pass at least one")
    acts = float64_array(actions)
    D = action_tokenizer.action_dim
    if single and acts.ndim in (1, 2):
        acts = acts.reshape(1, -1, D) if acts.shape[-1] == D else acts
    elif acts.ndim == 2:
        # [N, D] for N images reads as one step of each image as well as the same T = N steps for every
        # image: refused rather than guessed.
        raise ValueError(f"actions for a batch of {N} images must be [N, T, {D}] ([{N}, 1, {D}] for one step of "
                         f"each, np.repeat(actions[None], {N}, axis=0) for the same steps from every image); got "
                         f"{acts.shape}")
    if acts.ndim != 3 or acts.shape[0] != N or acts.shape[-1] != D or acts.shape[1] == 0:
        raise ValueError(f"actions must be [T, {D}] (or [{D}]) for one image, [N, T, {D}] for N images, T >= 1; "
                         f"got {np.asarray(actions).shape} for {N} image(s)")
    # All steps' actions checked before the first one runs: a NaN in the last would otherwise be found only
    # after every frame before it was generated.
    bad = np.argwhere(~np.isfinite(acts))
    if len(bad):
        n, t = int(bad[0][0]), int(bad[0][1])
        where = f"step {t}" if single else f"image {n}, step {t}"
        raise ValueError(f"actions must be finite: {where} holds NaN or inf; clean them before imagining")
    _check_cfg_scale(cfg_scale)
    check_frame_sampling(temperature, top_k)  # before the VQGAN and the first frame's work
    codes = torch.cat([vqgan.encode_images(imgs[i:i + VQGAN_BATCH]) for i in range(0, len(imgs), VQGAN_BATCH)])
    if codes.max() >= layout.n_image_codes:
        raise ValueError(f"the VQGAN has more codes than the layout's {layout.n_image_codes} image ids")
    # Every step's prompt has the same length (same grid, same action size): one engine serves all.
    guided = cfg_scale is not None and cfg_scale != 1.0
    h, w = codes.shape[-2:]
    prompt_len = builder.world_prompt(codes[0].cpu(), acts[0, 0]).numel() + 3
    engine = InferenceEngine(model, N * (2 if guided else 1), prompt_len + frame_cache_slots(h, w), layout=layout,
                             backend=backend)
    steps = []
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=acts.shape[1], desc="imagine", unit="frame", dynamic_ncols=True)
    try:
        for t in range(acts.shape[1]):
            codes = generate_frame_codes(model, codes, acts[:, t], builder, temperature=temperature, top_k=top_k,
                                         cfg_scale=cfg_scale, generator=generator, backend=backend, engine=engine)
            steps.append(codes)
            if bar is not None:
                bar.update()
    finally:
        if bar is not None:
            bar.close()
    all_codes = torch.stack(steps, dim=1)                       # [N, T, h, w]
    flat = all_codes.reshape(-1, h, w)
    frames = np.concatenate([vqgan.decode_images(flat[i:i + VQGAN_BATCH]) for i in range(0, len(flat), VQGAN_BATCH)])
    frames = frames.reshape(N, all_codes.shape[1], *frames.shape[-3:])
    all_codes = all_codes.cpu()
    return FrameRollout(all_codes[0], frames[0]) if single else FrameRollout(all_codes, frames)


__all__ = ["generate_frames", "generate_frame_codes", "FrameRollout", "FrameDtypeError", "sample_logits"]
