"""The release's action generation, kept as a baseline for benchmarks and tests (spec 3.3, 5.3).

What it reproduces (`generate_dis_ma` inside Hugging Face `generate`):
* batch size 1, greedy argmax over the **full vocabulary**, fp32 logits;
* at prefill, logits for **every** prompt position (only the last one is used);
* a **growing** KV cache: each layer's keys/values are concatenated with the new token's
  at every step, like transformers' DynamicCache (no preallocation, no CUDA graphs);
* at every step the **dense L x L chunk mask is rebuilt from all ids so far**
  (`worldvla.chunk_attention_mask`) and only its last row is used as the attention mask,
  applied through SDPA with a dense boolean mask (the "torch" attention backend);
  at prefill that last row is broadcast over the causal mask, as the release does;
* generation stops at the separator (the release's `eos_token_id`) or after
  `max_new_tokens`; the actions are parsed as the release parses and executes them
  (`parse_release_actions`: `generate_dis_ma`'s loop, then `unnorm_min_max`'s shapes).

The mask is the chunk rule with the release's pairing of BOA and EOA (`chunk_mask_meta(...,
release_pairing=True)`): one EOA closing no block after a closed block is a token outside any
block, as the release's mask drops it. What the release's mask refuses (a second such EOA, a BOA
inside an open block) raises ValueError here too, and so do an EOA before any block (the release's
mask drops it, but its parser raises afterwards: the episode fails either way) and a BOA after a
stray EOA (the release pairs it with an earlier EOA and goes on with blocks out of order, which the
chunk rule cannot express). The `max_new_tokens`-th token is never fed to the release's model (its
generation stops before that pass), so no mask refuses it: only the parser reads it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch

from ..mask import DecodeMeta, chunk_attention_mask
from ..ops import dispatch
from ..tokens.layout import VocabLayout
from .chunk import decoding_layout
from ..checks import is_count


class GrowingKVCache:
    """Per-layer key/value tensors [B, L, Hkv, Dh] that grow by concatenation."""

    def __init__(self, n_layers: int):
        self.k: list[torch.Tensor | None] = [None] * n_layers
        self.v: list[torch.Tensor | None] = [None] * n_layers

    def __len__(self) -> int:
        return 0 if self.k[0] is None else self.k[0].shape[1]

    def write(self, layer: int, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        # Tokens always arrive in order here, so position == current length.
        if self.k[layer] is None:
            self.k[layer], self.v[layer] = k, v
        else:
            self.k[layer] = torch.cat([self.k[layer], k], dim=1)
            self.v[layer] = torch.cat([self.v[layer], v], dim=1)


@dataclass
class DenseRowMeta(DecodeMeta):
    """Decode metadata carrying an explicit dense mask [B, Q, S] (True = may attend)."""
    mask: torch.Tensor | None = None

    def dense_mask(self) -> torch.Tensor:
        return self.mask


class BaselineOutput(NamedTuple):
    tokens: torch.Tensor   # [n_new] every generated id (separator included if reached)
    actions: torch.Tensor  # [n, D+2] the actions the release executes, as `parse_release_actions` gives them
    fails_after: bool = False  # the release fails the episode after these (`parse_release_actions`)


def check_count(name: str, n, least: int) -> None:
    """Refuse a count that is not an integer >= `least` (a bool, a float, None)."""
    if not is_count(n, least):
        raise ValueError(f"{name} must be an integer >= {least}, got {n!r}")


def _generated_ids(tokens, action_dim) -> list[int]:
    """The ids of one generated sequence [n] as a list, after checking the parsers' inputs: rows [B, n] would be
    compared whole with BOA and EOA, which no row equals (no action, without a word), and an action_dim below 1
    would parse blocks of no value (of -2, one that never advances)."""
    check_count("action_dim", action_dim, 1)
    t = torch.as_tensor(tokens)
    if t.numel():  # torch.tensor([]), no tokens, is float
        dispatch.require_integers(t, "tokens: generated ids must be integers")
    if t.dim() != 1:
        raise ValueError(f"tokens must be one generated sequence [n], got shape {tuple(t.shape)}; parse a batch "
                         f"row by row")
    return t.tolist()


def parse_action_blocks(tokens: torch.Tensor, layout: VocabLayout, action_dim: int) -> torch.Tensor:
    """Every well-formed `[BOA, D tokens, EOA]` run in `tokens` (no BOA or EOA among the D) -> [n, D+2]; other
    tokens are skipped.
    A strict parser: the release's own parsing of free output is `parse_release_actions`."""
    t = _generated_ids(tokens, action_dim)
    blocks, i, T = [], 0, action_dim + 2
    while i + T <= len(t):
        inner = t[i + 1:i + T - 1]  # a BOA or EOA among the D values would be a shorter or nested block
        if t[i] == layout.boa and t[i + T - 1] == layout.eoa and layout.boa not in inner and layout.eoa not in inner:
            blocks.append(t[i:i + T])
            i += T
        else:
            i += 1
    return torch.tensor(blocks, dtype=torch.long).view(-1, T)


def parse_release_actions(tokens: torch.Tensor, layout: VocabLayout, action_dim: int) -> tuple[torch.Tensor, bool]:
    """The actions the release executes from generated `tokens`: (blocks [n, D+2], fails_after).

    As the release's `generate_dis_ma`: each EOA closes the block of the latest BOA (a BOA inside an open
    block restarts it), whatever its length; an EOA with no open block after a closed one is skipped; an
    EOA before any BOA raises there (the episode fails before any action). Then, as its `unnorm_min_max`
    de-normalizes each action when it is executed: a block of more than D ids keeps its first D; a block of
    exactly 1 id is broadcast to all D dimensions (the id repeated D times here: ids decode one by one);
    a block of 0 or 2..D-1 ids raises when executed. The blocks kept are those before the first such block
    (or before an EOA preceding every BOA), and `fails_after` says the release fails the episode after
    executing them. Each row is [BOA, D ids, EOA]."""
    t = _generated_ids(tokens, action_dim)
    blocks, start, seen_boa, D = [], None, False, action_dim
    fails = False
    for i, x in enumerate(t):
        if x == layout.boa:
            start, seen_boa = i, True
        elif x == layout.eoa:
            if not seen_boa:       # start_index unset: UnboundLocalError in the release's parser
                fails = True
                break
            if start is None:      # no open block: skipped
                continue
            body = t[start + 1:i]
            start = None
            if len(body) == 1:
                body = body * D
            elif len(body) < D:    # 0 or 2..D-1 values: unnorm_min_max raises on this action
                fails = True
                break
            blocks.append([layout.boa, *body[:D], layout.eoa])
    return torch.tensor(blocks, dtype=torch.long).view(-1, D + 2), fails


def _mask_row(ids_so_far, layout):
    """The last row [1, L] of the mask of the full sequence so far [1, L] (rebuilt from scratch with the release's
    pairing, as the release does); ValueError where the release's mask refuses the blocks."""
    return chunk_attention_mask(ids_so_far[0], layout, release_pairing=True)[-1:]


def _step(model, ids_so_far, new_ids, cache, layout, row=None):
    """Hidden states of `new_ids` [1, Q] appended after the cached tokens, with the mask row
    of the full sequence so far (`_mask_row`, or `row` when the caller built it)."""
    L, Q = ids_so_far.shape[-1], new_ids.shape[-1]
    row = _mask_row(ids_so_far, layout) if row is None else row
    causal = torch.ones(Q, L, dtype=torch.bool, device=row.device).tril(L - Q)
    mask = (causal & row).unsqueeze(0)                                        # [1, Q, L]
    pos = torch.arange(L - Q, L, device=new_ids.device).view(1, Q)
    z = torch.zeros(1, L, dtype=torch.int32, device=new_ids.device)
    meta = DenseRowMeta(pos.to(torch.int32), z[:, :Q], z, z[:, 0], mask=mask)
    return model.hidden_states(new_ids, cache=cache, position_ids=pos, decode_meta=meta)


@torch.no_grad()
def release_prefill(model, prompt: torch.Tensor, layout: VocabLayout) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One prompt [P] prefilled as the release prefills it, every position under the causal mask and the prompt's
    last mask row (`_step`, as `baseline_generate_action_chunk`): its keys and values [layers, P, Hkv, Dh] and
    the final hidden state of its last token [H]."""
    ids = torch.as_tensor(prompt).long().to(model.lm_head.weight.device).view(1, -1)
    cache = GrowingKVCache(model.config.num_hidden_layers)
    saved = model.attn_backend
    model.attn_backend = "torch"  # SDPA with the dense mask row, as the release
    try:
        h = _step(model, ids, ids, cache, layout)
    finally:
        model.attn_backend = saved
    return torch.stack(cache.k)[:, 0], torch.stack(cache.v)[:, 0], h[0, -1]


@torch.no_grad()
def baseline_generate_action_chunk(model, input_ids, layout: VocabLayout | None, n_actions: int, action_dim: int,
                                   max_new_tokens: int | None = None,
                                   logits_processor: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
                                   ) -> BaselineOutput:
    """The release's greedy decoding of one prompt [P] (or [1, P]).

    `max_new_tokens` defaults to a well-formed chunk's length K(D+2)+1 (the release caps at
    300 and stops at the separator); the prompt and `max_new_tokens` must fit the model's
    `max_position_embeddings`, as `generate_release_actions` requires.
    `logits_processor(ids_so_far [L], logits [V]) -> logits` is applied before the argmax, like a
    transformers LogitsProcessor (the release passes none).
    Output whose blocks the chunk rule cannot take (see the module's docstring) raises ValueError.
    """
    # A layout of another vocabulary decoded the model's ids as other tokens (its BOA, EOA and bins elsewhere).
    layout = decoding_layout(model, layout)
    # A negative count decoded nothing and returned an empty chunk, as if the model had written none.
    for name, n, least in (("n_actions", n_actions, 1), ("action_dim", action_dim, 1),
                           ("max_new_tokens", 0 if max_new_tokens is None else max_new_tokens, 0)):
        check_count(name, n, least)
    ids = torch.as_tensor(input_ids)
    # before the cast, which would truncate fractions and make bools the ids 0 and 1
    dispatch.require_integers(ids, "input_ids: token ids must be integers")
    ids = ids.long()
    if ids.dim() == 2:
        if ids.shape[0] != 1:
            raise ValueError(f"the release's decoder runs batch size 1 only, got {ids.shape[0]} prompts")
        ids = ids[0]
    if ids.dim() != 1 or ids.numel() == 0:
        raise ValueError(f"input_ids must be one prompt [P] or [1, P], got shape {tuple(ids.shape)}")
    layout.check_ids(ids)
    if max_new_tokens is None:
        max_new_tokens = n_actions * (action_dim + 2) + 1
    # Refused as `generate_release_actions` refuses it (`engine_for`): past the model's positions it decoded on.
    limit = model.config.max_position_embeddings
    if ids.numel() + max_new_tokens > limit:
        raise ValueError(f"the prompt ({ids.numel()} tokens) and the {max_new_tokens} tokens to generate need "
                         f"{ids.numel() + max_new_tokens} positions, more than the model's max_position_embeddings "
                         f"{limit}; generate fewer tokens (fewer actions, a smaller max_new_tokens) or shorten the "
                         "prompt")
    dev = model.lm_head.weight.device
    ids = ids.to(dev)
    cache = GrowingKVCache(model.config.num_hidden_layers)
    saved = model.attn_backend
    model.attn_backend = "torch"  # SDPA with the dense mask row, as the release
    try:
        h = _step(model, ids.view(1, -1), ids.view(1, -1), cache, layout)
        logits = model.lm_head(h).float()[0]                                 # every prompt position
        out = []
        seq = ids
        for i in range(max_new_tokens):
            last = logits[-1]
            if logits_processor is not None:
                last = logits_processor(seq, last)
            tok = int(last.argmax())
            out.append(tok)
            if tok == layout.sep:
                break
            seq = torch.cat([seq, torch.tensor([tok], device=dev)])
            try:
                row = _mask_row(seq.view(1, -1), layout)
            except ValueError:
                # The release's generate stops before a pass of its last token, so no mask of the release refuses
                # it. (Its pass runs here otherwise, unused: the one that would give the separator.)
                if i + 1 < max_new_tokens:
                    raise
                break
            h = _step(model, seq.view(1, -1), seq[-1:].view(1, 1), cache, layout, row)
            logits = model.lm_head(h).float()[0]
    finally:
        model.attn_backend = saved
    tokens = torch.tensor(out, dtype=torch.long)
    return BaselineOutput(tokens, *parse_release_actions(tokens, layout, action_dim))


def chunk_structure_processor(layout: VocabLayout, prompt_len: int, n_actions: int, action_dim: int):
    """A logits processor that forces the chunk structure: bins restricted to the bin ids,
    BOA / EOA / separator forced by position. With it the baseline must produce exactly the
    tokens of the constrained sequential decoder (used by the tests)."""
    T = action_dim + 2
    lo, hi = layout.bin_range

    def process(seq: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        j = seq.numel() - prompt_len  # index of the token being chosen within the chunk
        out = torch.full_like(logits, float("-inf"))
        if j >= n_actions * T:
            out[layout.sep] = 0.0
        elif j % T == 0:
            out[layout.boa] = 0.0
        elif j % T == T - 1:
            out[layout.eoa] = 0.0
        else:
            out[lo:hi] = logits[lo:hi]
        return out

    return process


__all__ = ["baseline_generate_action_chunk", "BaselineOutput", "GrowingKVCache", "parse_action_blocks",
           "parse_release_actions", "chunk_structure_processor", "check_count", "release_prefill"]
