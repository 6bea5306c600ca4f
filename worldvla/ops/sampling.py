"""Constrained decoding: sample a token from a vocabulary range [lo, hi), computing only
that range's logits from the final hidden state."""
from __future__ import annotations

import math
import numbers
import operator

import torch

from . import dispatch
from ..checks import is_count


def check_sampling(temperature, top_k) -> None:
    """Refuse what a draw cannot take: a temperature that is not a finite real number, a top_k that is not None
    or an integer >= 1 (temperature <= 0 decodes greedily, and top_k then has no effect)."""
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) or not math.isfinite(temperature):
        raise ValueError(f"temperature must be a finite number (0 or less: greedy), got {temperature!r}")
    if top_k is not None and not is_count(top_k, 1):
        raise ValueError(f"top_k must be an integer >= 1 (or None for the whole range), got {top_k!r}")


def draw_gumbel(shape, generator=None, device=None) -> torch.Tensor:
    """Standard Gumbel noise, float32: -log(-log(U)) with U uniform from `generator` (torch.rand; about
    6x cheaper than an exponential draw on the CPU). U is kept at least the smallest normal float32, so
    every value is finite: within [-4.5, 16.7] (the 24-bit uniform's range)."""
    u = torch.rand(shape, generator=generator, device=device, dtype=torch.float32)
    return u.clamp_min_(torch.finfo(torch.float32).tiny).log_().neg_().log_().neg_()


def scaled_gumbel(gumbel: torch.Tensor, temperature: float) -> torch.Tensor:
    """The noise `sample_logits` adds to the logits: temperature x standard Gumbel noise."""
    return gumbel * temperature


def draw_noise(shape: tuple, temperature: float, top_k, generator=None, gumbel=None, device=None) -> torch.Tensor:
    """The Gumbel noise of a draw of `shape` at `temperature` (> 0) over the top_k: `gumbel` once
    checked (float32 of `shape` on `device`, the logits' device: a native draw reads it by address), else
    drawn from `generator`; a non-finite temperature or top_k < 1 is refused."""
    check_sampling(temperature, top_k)
    if gumbel is None:
        return draw_gumbel(shape, generator, device)
    if tuple(gumbel.shape) != tuple(shape) or gumbel.dtype != torch.float32:
        raise ValueError(f"gumbel noise must be float32 {tuple(shape)} like the logits, "
                         f"got {gumbel.dtype} {tuple(gumbel.shape)}")
    if device is not None and gumbel.device != torch.device(device):
        raise ValueError(f"gumbel noise is on {gumbel.device} but the logits are on {torch.device(device)}; "
                         f"move it there (gumbel.to({str(torch.device(device))!r}))")
    return gumbel


def sample_logits(logits, temperature=0.0, top_k=None, generator=None, gumbel=None):
    """logits [N, C] -> column indices [N]: argmax when temperature <= 0, else a draw from
    softmax(logits / temperature) restricted to the top_k largest (fp32 math).

    The draw is the Gumbel-max trick: argmax(logits + temperature * G) over the kept columns, G standard
    Gumbel noise [N, C], drawn here from `generator` unless given as `gumbel`. It is exactly a draw from
    that softmax, costs one argmax rather than a softmax and a multinomial draw, and, given G, is a
    deterministic choice that a fused loop can reproduce bit for bit (`generate_frame_codes`). Among
    equal scores the first column wins, as torch.argmax."""
    check_sampling(temperature, top_k)
    if temperature <= 0.0:
        return logits.argmax(dim=-1)
    logits = logits.float()
    gumbel = draw_noise(tuple(logits.shape), temperature, top_k, generator, gumbel, logits.device)
    scores = logits + scaled_gumbel(gumbel, temperature)
    if top_k is not None and top_k < logits.shape[-1]:  # masked after the noise: -inf whatever it adds
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(logits < kth, float("-inf"))
    return scores.argmax(dim=-1)


def constrained_sample_ref(hidden, weight, lo, hi, temperature=0.0, top_k=None, generator=None, gumbel=None):
    """hidden [N, H], lm_head weight [V, H] -> token ids [N] in [lo, hi). Greedy when temperature == 0.
    `gumbel`: standard Gumbel noise [N, hi - lo] to sample with instead of drawing it (`sample_logits`)."""
    logits = (hidden @ weight[lo:hi].t()).float()
    return sample_logits(logits, temperature, top_k, generator, gumbel) + lo


# Choices over ranges of at least this many codes on the CPU (a frame's 8,192 image codes, not the 256
# action bins) take the native sampler under `auto` wherever it is built, where `auto` otherwise keeps
# torch for this op (benchmarks/NOTES.md): it screens with bfloat16 copies of the range's rows and reads
# about half the bytes for the same ids (native_backend.range_argmax_screened, and for a draw
# `_range_sample_cpu`): greedy 2.1x torch's MKL for one row of 8,192 x 256 on the Xeon, a draw about 1.27x
# (the noise included; two rows with top-k 100 0.84-1.08x), and a frame's loop then runs natively
# (inference/frames.py). Choices of bfloat16 models on the CPU take it at any range:
# it streams the bfloat16 rows as they are with float32 sums, where torch's bfloat16 product runs at
# about half its speed (one row of 256 x 256: 35 against 17 us; of 8,192 x 256: 225 against 116 us on
# the Xeon) and rounds the logits to bfloat16 (more ties). Release-mode decoding, which must pick what the
# release picks from those rounded logits, takes torch's product for such models
# (inference/release.py `release_choice`).
SCREEN_MIN_ROWS = 2048


def _auto_backend(hidden, weight, lo, hi, temperature, backend):
    if backend != "auto" or hidden.device.type != "cpu" or hidden.dtype != weight.dtype:
        return backend
    if ((hidden.dtype == torch.float32 and hi - lo >= SCREEN_MIN_ROWS or hidden.dtype == torch.bfloat16)
            and dispatch.supports("constrained_sample", "native", hidden, weight, lo, hi, temperature)):
        return "native"
    return backend


def token_range(lo, hi) -> tuple[int, int]:
    """The vocabulary range's bounds as ints: token ids must be integers (a float would be truncated by the
    native path, and refused by torch's slicing with an error that names neither)."""
    try:
        if isinstance(lo, bool) or isinstance(hi, bool):
            raise TypeError
        return operator.index(lo), operator.index(hi)
    except TypeError:
        raise TypeError(f"constrained_sample: the vocabulary range [lo, hi) must be integer token ids, got "
                        f"{lo!r} and {hi!r}; pass ints (int() or round() a bound computed in floats)") from None


def resolve_constrained_sample(hidden, weight, lo, hi, temperature=0.0, backend="auto"):
    """The implementation `constrained_sample` runs for inputs like these."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"constrained_sample wants hidden [N, H] and weight [V, H]; got {tuple(hidden.shape)}, {tuple(weight.shape)}")
    lo, hi = token_range(lo, hi)
    if not 0 <= lo < hi <= weight.shape[0]:
        raise ValueError(f"vocabulary range [{lo}, {hi}) is empty or outside [0, {weight.shape[0]})")
    dispatch.check_floats("constrained_sample", hidden=hidden, weight=weight)
    dispatch.check_devices("constrained_sample", hidden=hidden, weight=weight)
    backend = _auto_backend(hidden, weight, lo, hi, temperature, backend)
    return dispatch.resolve("constrained_sample", backend, hidden.device.type, hidden, weight, lo, hi, temperature)


def constrained_sample(hidden, weight, lo, hi, temperature=0.0, top_k=None, generator=None, backend="auto",
                       gumbel=None):
    """Token ids [N] in [lo, hi) from final hidden states [N, H] and the lm_head weight [V, H]: greedy at
    temperature 0, else a top-k / temperature draw (`sample_logits`; `gumbel` gives its noise)."""
    check_sampling(temperature, top_k)  # before a backend is chosen: the native binding takes no float top_k
    dispatch.check_generator(generator)
    lo, hi = token_range(lo, hi)
    # Under autocast the range's product takes autocast's dtype, as the reference's matmul would, before a
    # backend is chosen: the native kernels are not seen by autocast, so they computed fp32 logits where the
    # reference computed bf16 ones, and the ids depended on the backend `auto` picked for the machine.
    hidden, weight = dispatch.autocast_floats(hidden.device.type, hidden, weight)
    return resolve_constrained_sample(hidden, weight, lo, hi, temperature, backend)(
        hidden, weight, lo, hi, temperature, top_k, generator, gumbel)


dispatch.register("constrained_sample", "torch", constrained_sample_ref)
