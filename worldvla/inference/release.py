"""The release's action decoding, on the engine: free greedy generation over the whole vocabulary.

The release (spec 5.3, 6.3) does not constrain its decoder: it takes the greedy argmax over all
65,536 ids until the separator or `max_new_tokens` (300), then decodes every BOA ... EOA block it
finds, however many there are, each id to its clipped bin centre (`baseline.parse_release_actions`:
the first D ids of a longer block, one id broadcast to D; a shorter block fails the episode when
executed, `Generated.fails_after`). `generate_action_chunk` instead
forces the structure and picks bins among the bin ids only, which gives the same actions wherever the
model's argmax already follows the structure (a trained model's usually does), and never anything
else. This module reproduces the release's choices exactly but runs them on the static-cache
engine (batched, native or CUDA-graph steps) instead of a growing cache and a dense mask rebuilt
at every token (`baseline.baseline_generate_action_chunk`, the release's procedure as a baseline):
the chunk rule's metadata of each new token comes from `mask.GrowingBlockMeta`, which the
rebuilt mask's last row equals. The release prefills a prompt under its mask's last row at every
position, and so does the engine here (`InferenceEngine.prefill(..., release=True)`): that differs from the
chunk rule row by row where a prompt holds an action block after the last image with an earlier block.

The blocks, of the prompt as of the output, are paired as the release's mask pairs them (`chunk_mask_meta(...,
release_pairing=True)`): one EOA closing no block after a closed block is a token outside any block, and
generation goes on.
A sequence whose generated blocks become malformed stops there (`Generated.malformed`): a BOA inside
an open block or a second EOA closing no block (the release's mask raises: the episode fails), an
EOA before any block (the release's mask drops it, but its parser raises afterwards: the episode
fails), a BOI or EOI that leaves the image counts two apart (the release's mask raises), or a BOA after a
stray EOA (the release goes on, pairing it with an earlier EOA, out of order: blocks the chunk rule cannot
express; the one case where this module and the release part). A generated BOI or EOI moves the last image's
end as the release's pairing moves it (an open image lifts the chunk rule until it closes). The
`max_new_tokens`-th token is never fed to the model, so it is never malformed: only the parser reads it.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from ..mask import NO_BLOCK, GrowingBlockMeta
from ..ops import dispatch
from ..tokens.layout import VocabLayout
from .baseline import check_count, parse_release_actions
from .chunk import _as_prompts, decoding_layout, head_sample, sampling_backend
from .engine import InferenceEngine, engine_for

RELEASE_MAX_NEW_TOKENS = 300  # the release's cap (action_steps 25 x 12)


class Generated(NamedTuple):
    tokens: torch.Tensor   # [n_new] every generated id (the separator included if reached)
    actions: torch.Tensor  # [n, D+2] the actions the release executes from `tokens` (parse_release_actions)
    malformed: bool        # generation stopped at a malformed block (the release fails the episode)
    fails_after: bool = False  # after `actions`, the release fails the episode (a block of 0 or 2..D-1 ids)


def release_engine(model, prompts, max_new_tokens: int = RELEASE_MAX_NEW_TOKENS, layout: VocabLayout | None = None,
                   backend: str = "auto") -> InferenceEngine:
    """An engine sized for `prompts` (as `generate_release_actions` takes them) and `max_new_tokens` generated
    tokens each."""
    check_count("max_new_tokens", max_new_tokens, 1)
    # One prompt [P] is one row: read as a sequence it made an engine of P rows of one token.
    prompts, _ = _as_prompts(prompts)
    # The engine's prefill finds the prompts' blocks by its layout's ids: another vocabulary's misplaced them.
    layout = decoding_layout(model, layout)
    return engine_for(model, prompts, max_new_tokens, layout=layout, backend=backend)


def release_choice(model, h: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """The release's greedy choice over the whole vocabulary from final hidden states [B, H]: the argmax
    (first of equals) of the head's logits as the model's dtype rounds them. A float32 head goes through
    the fused sampler; a bfloat16 or float16 one through torch's product in that dtype, as the release
    computes it: the fused samplers sum in float32 without rounding, so logits that round to equals
    (common at 8 significant bits) could pick another id than the release's first one."""
    if model.lm_head.weight.dtype != torch.float32:
        backend = "torch"
    return head_sample(model, h, 0, model.config.vocab_size, backend=backend)


@torch.no_grad()
def generate_release_actions(model, input_ids, layout: VocabLayout | None, action_dim: int,
                             max_new_tokens: int = RELEASE_MAX_NEW_TOKENS, backend: str = "auto", *,
                             engine: InferenceEngine | None = None, skip=None,
                             logits_processor: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
                             ) -> list[Generated]:
    """Greedy generation over the whole vocabulary after each prompt, as the release decodes actions:
    until the separator (its `eos_token_id`) or `max_new_tokens`, under the chunk rule applied to the
    blocks as the model writes them. One `Generated` per prompt (a list for a batch or one prompt).

    input_ids: one prompt [P], a batch [B, P] or a list of 1-D prompts. `engine`, `skip`: as in
    `generate_action_chunk` (the engine needs room for the longest prompt plus `max_new_tokens`).
    `logits_processor(ids_so_far [L], logits [V]) -> logits`, applied before each argmax as in the
    baseline, takes the slow path (full logits on the host) and is for tests and experiments."""
    layout = decoding_layout(model, layout)
    if model.config.attention != "chunk":
        raise ValueError("the release's decoding applies the chunk rule; this model was trained with plain causal "
                         "attention (decode it with generate_action_chunk(mode='causal'))")
    # An action_dim below 1 parsed blocks of no value, and a float one failed in torch after the whole generation.
    check_count("action_dim", action_dim, 1)
    check_count("max_new_tokens", max_new_tokens, 1)
    prompts, _ = _as_prompts(input_ids)
    for b, p in enumerate(prompts):  # before the cast, which would truncate fractions and make bools ids 0 and 1
        dispatch.require_integers(p, f"prompt {b}: token ids must be integers")
    prompts = [p.long().cpu() for p in prompts]
    B = len(prompts)
    if skip is not None and torch.as_tensor(skip).dim() != 1:  # a bare count failed as "'int' object is not iterable"
        raise ValueError(f"skip must give one count of cached prefix tokens per prompt ({B}), got {skip!r}")
    if engine is None and skip is not None and any(skip):
        raise ValueError("skip= names prefixes an engine already holds: pass that engine (engine=)")
    engine = engine or release_engine(model, prompts, max_new_tokens, layout, backend)
    engine.check_serves(model)
    if engine.layout != layout:  # its prefill would place the prompts' blocks by other ids than the decoding's
        raise ValueError(f"the engine was built with the layout {engine.layout.name!r} but the decoding uses "
                         f"{layout.name!r}: build the engine with the same layout (release_engine(..., layout=))")
    lens = [int(p.numel()) for p in prompts]
    if engine.batch_size != B:
        raise ValueError(f"the engine holds {engine.batch_size} sequences but got {B} prompts")
    if max(lens) + max_new_tokens > engine.max_len:
        raise ValueError(f"prompts of up to {max(lens)} tokens and {max_new_tokens} new ones need "
                         f"{max(lens) + max_new_tokens} cache slots; the engine has {engine.max_len}")
    tracks = [GrowingBlockMeta(p, layout, release_pairing=True) for p in prompts]
    dev = engine.device
    h = engine.prefill(prompts, skip, release=True)  # every row under the mask's last row, as the release
    engine.set_kv_len([L + max_new_tokens for L in lens])  # slots ahead of a query stay hidden by causality
    buf = engine.buffers(1)
    buf.set_positions(torch.tensor(lens, device=dev).view(B, 1))
    out: list[list[int]] = [[] for _ in range(B)]
    done, malformed = [False] * B, [False] * B
    sample = sampling_backend(backend)
    rows = torch.arange(B, device=dev)
    for step in range(max_new_tokens):
        if logits_processor is None:
            tok = release_choice(model, h, sample).tolist()
        else:
            logits = model.lm_head(h).float()
            tok = [int(logits_processor(torch.cat([prompts[b], torch.tensor(out[b], dtype=torch.long)]),
                                        logits[b]).argmax()) for b in range(B)]
        kv, ql = [NO_BLOCK] * B, [-1] * B  # finished rows keep stepping, unused, outside any block
        for b, t in enumerate(tok):
            if done[b]:
                continue
            try:
                kv[b], ql[b] = tracks[b].push(t)
            except ValueError:
                # The last token is never fed, so no mask refuses it (the release's parser alone reads it).
                if step + 1 < max_new_tokens:
                    done[b] = malformed[b] = True
                    continue
            out[b].append(t)
            done[b] = t == layout.sep
        if all(done) or step + 1 == max_new_tokens:
            break
        # The next step's inputs go over in one host-to-device copy (after the one sync of the choice).
        ids = [t if not d else layout.sep for t, d in zip(tok, done)]
        kv_ids_ql = torch.tensor([kv, ids, ql], dtype=torch.long).to(dev)
        engine.kv_block[rows, buf.pos[:, 0]] = kv_ids_ql[0].int()
        buf.ids.copy_(kv_ids_ql[1].view(B, 1))
        buf.q_limit.copy_(kv_ids_ql[2].view(B, 1))
        h = engine.run(buf)[:, 0]
        buf.advance(1)
    results = []
    for b in range(B):
        tokens = torch.tensor(out[b], dtype=torch.long)
        actions, fails_after = parse_release_actions(tokens, layout, action_dim)
        results.append(Generated(tokens, actions, malformed[b], fails_after))
    return results


__all__ = ["generate_release_actions", "release_engine", "Generated", "RELEASE_MAX_NEW_TOKENS"]
