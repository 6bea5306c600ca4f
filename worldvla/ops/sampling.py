"""Constrained decoding: sample a token from a vocabulary range [lo, hi), computing only
that range's logits from the final hidden state."""
from __future__ import annotations

import torch

from . import dispatch


def sample_logits(logits, temperature=0.0, top_k=None, generator=None):
    """logits [N, C] -> column indices [N]: argmax when temperature <= 0, else a draw from
    softmax(logits / temperature) restricted to the top_k largest (fp32 math)."""
    if temperature <= 0.0:
        return logits.argmax(dim=-1)
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 (or None for the whole range), got {top_k}")
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def constrained_sample_ref(hidden, weight, lo, hi, temperature=0.0, top_k=None, generator=None):
    """hidden [N, H], lm_head weight [V, H] -> token ids [N] in [lo, hi). Greedy when temperature == 0."""
    logits = (hidden @ weight[lo:hi].t()).float()
    return sample_logits(logits, temperature, top_k, generator) + lo


def constrained_sample(hidden, weight, lo, hi, temperature=0.0, top_k=None, generator=None, backend="auto"):
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"constrained_sample wants hidden [N, H] and weight [V, H]; got {tuple(hidden.shape)}, {tuple(weight.shape)}")
    if not 0 <= lo < hi <= weight.shape[0]:
        raise ValueError(f"vocabulary range [{lo}, {hi}) is empty or outside [0, {weight.shape[0]})")
    return dispatch.call("constrained_sample", backend, hidden.device.type, hidden, weight, lo, hi,
                         temperature, top_k, generator)


dispatch.register("constrained_sample", "torch", constrained_sample_ref)
