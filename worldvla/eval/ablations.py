"""Inference-time ablation of the chunk attention mask (paper section on action chunking).

With the chunk mask (the release), action k of a chunk sees the prompt and its own
block only. Without it, a chunk is decoded with plain causal attention: every action
sees the actions generated before it, so early errors propagate through the chunk.
`CausalChunkPolicy` takes the same trained weights and decodes its chunks that way,
one token at a time (greedy over the bin ids, BOA / EOA forced as in the release's
structure), which isolates the effect of the mask at inference.
"""
from __future__ import annotations

import torch

from .. import ops
from ..inference.chunk import _prepare, make_engine
from ..inference.policy import WorldVLAPolicy


@torch.no_grad()
def generate_action_chunk_causal(model, prompts: list[torch.Tensor], layout, n_actions: int, action_dim: int,
                                 backend: str = "auto") -> torch.Tensor:
    """Greedy sequential chunk decoding under plain causal attention -> ids [B, K, D+2]."""
    engine = make_engine(model, prompts, n_actions, action_dim, layout)
    P, _ = _prepare(engine, prompts, None, n_actions, action_dim)
    B, K, T = len(prompts), n_actions, action_dim + 2
    lo, hi = layout.bin_range
    W = model.lm_head.weight
    n = K * T
    out = torch.empty(B, n, dtype=torch.long, device=engine.device)
    out[:, 0] = layout.boa
    buf = engine.buffers(1)
    buf.set_positions(P.view(B, 1))
    buf.q_limit.fill_(-1)  # no query is restricted: every earlier block stays visible
    for i in range(n - 1):
        buf.ids.copy_(out[:, i:i + 1])
        h = engine.run(buf)
        j = i + 1
        if j % T in (0, T - 1):
            out[:, j] = layout.boa if j % T == 0 else layout.eoa
        else:
            out[:, j] = ops.constrained_sample(h[:, 0], W, lo, hi, backend=backend)
        buf.advance(1)
    return out.view(B, K, T).cpu()


class CausalChunkPolicy(WorldVLAPolicy):
    """A `WorldVLAPolicy` that decodes its chunks without the chunk mask (plain causal)."""

    @classmethod
    def from_policy(cls, policy: WorldVLAPolicy) -> "CausalChunkPolicy":
        return cls(policy.model, policy.vqgan, policy.action_tokenizer, chunk_size=policy.chunk_size,
                   image_size=policy.image_size, history=policy.history, text_tokenizer=policy.text_tokenizer,
                   mode="sequential", extra=policy.extra)

    def _query(self, instructions, hist) -> torch.Tensor:
        prompts = [self.builder.action_prompt(ins, h) for ins, h in zip(instructions, hist)]
        return generate_action_chunk_causal(self.model, prompts, self.layout, self.chunk_size, self.action_dim)

    def metadata(self) -> dict:
        return {**super().metadata(), "mode": "causal (no chunk mask)"}


__all__ = ["CausalChunkPolicy", "generate_action_chunk_causal"]
