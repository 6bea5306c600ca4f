"""Action-chunk decoding: K actions of D bins, each `[BOA, bin_1..bin_D, EOA]`, then the separator.

Under the chunk rule (spec 3) a block that starts after the last image sees only the
prompt and its own tokens. Block k therefore depends on nothing but the prompt and its
RoPE offset P + k(D+2), and all K blocks can be decoded side by side as K query rows
sharing the prompt's cache:

    step 0:  the K forced BOAs at positions P + k(D+2)        -> bin 1 of every block
    step d:  the K bins d at positions P + k(D+2) + d          -> bin d+1 of every block

That is D forward passes after the prefill instead of K(D+2). The slots of block k
(written or not yet) carry block k's ordinal in `kv_block` and block k's queries carry
it as `q_limit`, so the rule hides every other block from them; slots ahead of a query
are hidden by causality. Bins are the greedy choice over the bin ids only; BOA, EOA and
the closing separator are forced. The sequential mode feeds one token at a time under
the same constraints and is the reference the parallel mode must reproduce exactly.

The "causal" mode decodes one token at a time with nothing hidden from the generated
tokens: every action sees the actions generated before it. It is how a model trained
without the chunk mask (`ModelConfig.attention == "causal"`, the paper's ablation) must be
decoded, and applied to a chunk-trained model it is the inference-only ablation. The prompt
itself is prefilled as the model was trained, so for a chunk-trained model action blocks
inside the prompt after its last image (not in the release's prompts) keep the chunk rule.
"""
from __future__ import annotations


import torch

from .. import ops
from ..checks import is_integer
from ..model import plain_linear
from ..ops.sampling import sample_logits
from ..tokens.layout import VocabLayout
from .engine import InferenceEngine, engine_for

MODES = ("parallel", "sequential", "causal")


def _as_prompts(input_ids) -> tuple[list[torch.Tensor], bool]:
    """-> (list of 1-D prompts, whether the caller passed one unbatched prompt)."""
    if isinstance(input_ids, (list, tuple)):
        if not input_ids:
            raise ValueError("got an empty list of prompts")
        prompts = [torch.as_tensor(p) for p in input_ids]
        if all(p.dim() == 0 for p in prompts):  # one prompt's ids as a Python list (`ids.tolist()`)
            raise ValueError(f"input_ids is a list of {len(prompts)} numbers: one prompt's ids go in a 1-D tensor, "
                             f"torch.tensor(ids); a list is of several prompts, each a 1-D tensor")
        if any(p.dim() != 1 for p in prompts):
            raise ValueError("a list of prompts must hold 1-D id tensors (lengths may differ)")
        return prompts, False
    t = torch.as_tensor(input_ids)
    if t.dim() == 1:
        return [t], True
    if t.dim() == 2:
        if t.shape[0] == 0:
            raise ValueError(f"input_ids holds no prompt (shape {tuple(t.shape)}); pass at least one")
        return list(t.unbind(0)), False
    raise ValueError(f"input_ids must be [P], [B, P] or a list of 1-D prompts, got shape {tuple(t.shape)}")


def chunk_length(n_actions: int, action_dim: int) -> int:
    """Tokens of a chunk including the closing separator."""
    return n_actions * (action_dim + 2) + 1


def _check(prompts, layout: VocabLayout, n_actions: int, action_dim: int, mode: str):
    if mode not in MODES:
        hint = (": the release's own decoding (free greedy over the whole vocabulary) is "
                "worldvla.inference.generate_release_actions" if mode == "release" else "")
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}{hint}")
    if not all(is_integer(n) for n in (n_actions, action_dim)):
        raise TypeError(f"n_actions and action_dim must be integers, got {n_actions!r} and {action_dim!r}")
    if n_actions < 1 or action_dim < 1:
        raise ValueError(f"n_actions and action_dim must be >= 1, got {n_actions} and {action_dim}")
    for b, p in enumerate(prompts):  # a bool prompt too, which would fail below as one not ending with SEP
        ops.dispatch.require_integers(p, f"prompt {b}: token ids must be integers")
        if p.numel() == 0 or int(p[-1]) != layout.sep:
            raise ValueError(f"prompt {b} must end with the separator id {layout.sep} (the human turn's end); "
                             f"build it with SequenceBuilder.action_prompt")


def make_engine(model, prompts, n_actions: int, action_dim: int, layout: VocabLayout, backend: str = "auto",
                cuda_graphs: bool | None = None) -> InferenceEngine:
    return engine_for(model, prompts, chunk_length(n_actions, action_dim), layout=layout, backend=backend,
                      cuda_graphs=cuda_graphs)


def sampling_backend(backend: str) -> str:
    """`backend` for constrained sampling when it implements it, else "auto"."""
    return backend if backend in ops.dispatch.available("constrained_sample") else "auto"


def head_logits(model, hidden: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """The logits of vocabulary ids [lo, hi) from final hidden states [N, H]: that slice of lm_head's
    weight only, unless the head is more than its weight (an adapter, a subclass, a bias, a forward
    hook), which then runs as a module over the whole vocabulary."""
    head = model.lm_head
    if plain_linear(head):
        return hidden @ head.weight[lo:hi].t()
    return head(hidden)[:, lo:hi]


def head_sample(model, hidden: torch.Tensor, lo: int, hi: int, temperature: float = 0.0, top_k=None,
                generator=None, backend: str = "auto", gumbel=None) -> torch.Tensor:
    """Token ids [N] in [lo, hi) from final hidden states [N, H] (greedy at temperature 0): the fused
    constrained sampler on lm_head's weight, or, for a head that is more than its weight, the module's
    logits restricted to the range (`head_logits`). `gumbel`: the draw's noise [N, hi - lo] (`sample_logits`)."""
    if plain_linear(model.lm_head):
        return ops.constrained_sample(hidden, model.lm_head.weight, lo, hi, temperature, top_k, generator,
                                      backend=backend, gumbel=gumbel)
    return sample_logits(head_logits(model, hidden, lo, hi).float(), temperature, top_k, generator, gumbel) + lo


def _prepare(engine: InferenceEngine, prompts, skip, n_actions, action_dim):
    """Prefill and set the chunk region's block ordinals. Returns (P [B] long, base [B] int32) on device."""
    layout, dev = engine.layout, engine.device
    B, T = len(prompts), action_dim + 2
    if engine.batch_size != B:
        raise ValueError(f"the engine holds {engine.batch_size} sequences but got {B} prompts")
    lens = [int(p.numel()) for p in prompts]
    need = max(lens) + chunk_length(n_actions, action_dim)
    if need > engine.max_len:
        raise ValueError(f"prompt + chunk need {need} cache slots but the engine has {engine.max_len}")
    engine.prefill(prompts, skip)
    P = torch.tensor(lens, dtype=torch.long, device=dev)
    # Ordinal of the first generated block = number of blocks already in the prompt.
    base = torch.tensor([int((p == layout.boa).sum()) for p in prompts], dtype=torch.int32, device=dev)
    slots = P.view(B, 1) + torch.arange(n_actions * T, device=dev).view(1, -1)
    ordinal = base.view(B, 1) + (torch.arange(n_actions * T, device=dev) // T).to(torch.int32).view(1, -1)
    engine.kv_block.scatter_(1, slots, ordinal)  # the prefill set every later slot (the separator's) to NO_BLOCK
    engine.set_kv_len((P + n_actions * T + 1).to(torch.int32))
    return P, base


def _decode_parallel(engine, P, base, n_actions, action_dim, backend):
    layout, dev = engine.layout, engine.device
    B, K, D, T = engine.batch_size, n_actions, action_dim, action_dim + 2
    lo, hi = layout.bin_range
    # Blocks are independent within a step (each hides the others), so a chunk may run as groups of
    # blocks: groups no bigger than the one-row step's path takes keep the sequential tokens exactly.
    group = engine.max_step_rows() or K
    ks = torch.arange(K, device=dev)
    starts = P.view(B, 1) + T * ks.view(1, K)                     # each block's BOA position
    limits = base.view(B, 1) + ks.to(torch.int32).view(1, K)       # each block hides the blocks before it
    bins = torch.empty(B, K, D, dtype=torch.long, device=dev)
    if group >= K:  # one group: its buffers set once, then moved on a token a step
        buf = engine.buffers(K)
        buf.ids.fill_(layout.boa)
        buf.set_positions(starts)
        buf.q_limit.copy_(limits)
    for d in range(D):
        for k0 in range(0, K, group):
            k1 = min(K, k0 + group)
            if group < K:  # several groups share one buffer size: each step sets its group's rows
                buf = engine.buffers(k1 - k0)
                if d == 0:
                    buf.ids.fill_(layout.boa)
                else:
                    buf.ids.copy_(bins[:, k0:k1, d - 1])
                buf.set_positions(starts[:, k0:k1] + d)
                buf.q_limit.copy_(limits[:, k0:k1])
            h = engine.run(buf)
            tok = head_sample(engine.model, h.reshape(B * (k1 - k0), -1), lo, hi, backend=backend)
            bins[:, k0:k1, d] = tok.view(B, k1 - k0)
        if group >= K and d + 1 < D:
            buf.ids.copy_(bins[:, :, d])
            buf.advance(1)
    return bins


def _decode_sequential(engine, P, base, n_actions, action_dim, backend, chunk_rule: bool = True):
    layout, dev = engine.layout, engine.device
    B, K, T = engine.batch_size, n_actions, action_dim + 2
    lo, hi = layout.bin_range
    n = K * T
    t = torch.arange(n)
    is_bin = ((t % T) != 0) & ((t % T) != T - 1)
    if chunk_rule:  # token i of the chunk belongs to block base + i // T and hides the blocks before it
        q_limits = (base.view(B, 1) + (torch.arange(n, device=dev) // T).to(torch.int32).view(1, n)).contiguous()
    else:  # plain causal: no query restricted
        q_limits = torch.full((B, n), -1, dtype=torch.int32, device=dev)
    out = torch.empty(B, n, dtype=torch.long, device=dev)
    out[:, 0] = layout.boa
    buf = engine.buffers(1)
    buf.set_positions(P.view(B, 1))
    # Feeding token i predicts token i + 1; the pass that would feed the last EOA is skipped
    # because the separator after it is forced.
    for i in range(n - 1):
        buf.ids.copy_(out[:, i:i + 1])
        buf.q_limit.copy_(q_limits[:, i:i + 1])
        h = engine.run(buf)
        j = i + 1
        if is_bin[j]:
            out[:, j] = head_sample(engine.model, h[:, 0], lo, hi, backend=backend)
        else:
            out[:, j] = layout.boa if j % T == 0 else layout.eoa
        buf.advance(1)
    return out.view(B, K, T)[:, :, 1:-1]


def decoding_layout(model, layout: VocabLayout | None) -> VocabLayout:
    """`layout`, or the model's own when None; refused when neither is given, or when its vocabulary is not the
    model's (its ids would index past the head, or mean other tokens)."""
    layout = layout or model.layout
    if layout is None:
        raise ValueError("pass the model's VocabLayout (layout=)")
    if layout.vocab_size != model.config.vocab_size:
        raise ValueError(f"the layout {layout.name!r} has {layout.vocab_size} ids but the model "
                         f"{model.config.vocab_size}: pass the model's own layout (layout=None takes model.layout)")
    return layout


@torch.no_grad()
def generate_action_chunk(model, input_ids, layout: VocabLayout | None, n_actions: int, action_dim: int,
                          mode: str = "parallel", backend: str = "auto", *, engine: InferenceEngine | None = None,
                          skip=None) -> torch.Tensor:
    """Decode K = `n_actions` actions of `action_dim` bins after each prompt.

    mode: "parallel" (all K actions per forward pass), "sequential" (one token at a time, the
    reference), both under the chunk mask; or "causal" (one token at a time, nothing hidden).

    input_ids: one prompt [P], a batch [B, P], or a list of 1-D prompts of different lengths;
    every prompt ends with the separator. Returns [K, D+2] for one prompt, else [B, K, D+2]
    ([BOA, bins..., EOA] per action; the closing separator is implied), on the CPU.
    `engine`: reuse a preallocated engine (its batch size must match); `skip[b]`: leading
    tokens of prompt b whose keys/values the engine already holds (`set_row_prefix` a row, `restore_prefix` every row).
    `backend` picks the attention and sampling implementations ("auto" = fastest available); a given
    engine keeps the attention backend it was built with.
    """
    layout = decoding_layout(model, layout)
    prompts, single = _as_prompts(input_ids)
    _check(prompts, layout, n_actions, action_dim, mode)
    if mode != "causal" and model.config.attention == "causal":  # before a given engine's cache is touched
        raise ValueError("this model was trained with plain causal attention (config.attention='causal'); "
                         "decode its chunks with mode='causal'")
    if engine is None:
        if skip is not None and any(skip):
            raise ValueError("skip= names prefixes an engine already holds: pass that engine (engine=)")
        engine = make_engine(model, prompts, n_actions, action_dim, layout, backend)
    engine.check_serves(model)
    P, base = _prepare(engine, prompts, skip, n_actions, action_dim)
    if mode == "parallel":
        bins = _decode_parallel(engine, P, base, n_actions, action_dim, sampling_backend(backend))
    else:
        bins = _decode_sequential(engine, P, base, n_actions, action_dim, sampling_backend(backend),
                                  chunk_rule=mode == "sequential")
    B = len(prompts)
    ids = torch.cat([torch.full((B, n_actions, 1), layout.boa, dtype=torch.long, device=bins.device), bins,
                     torch.full((B, n_actions, 1), layout.eoa, dtype=torch.long, device=bins.device)], dim=-1).cpu()
    return ids[0] if single else ids


__all__ = ["generate_action_chunk", "chunk_length", "make_engine", "MODES"]
