"""Inference-time ablation of the chunk attention mask (paper section on action chunking).

With the chunk mask (the release), action k of a chunk sees the prompt and its own
block only. Without it, a chunk is decoded with plain causal attention: every action
sees the actions generated before it, so early errors propagate through the chunk.
`CausalChunkPolicy` takes the same trained weights and decodes its chunks that way
(`generate_action_chunk(..., mode="causal")`), which isolates the effect of the mask at
inference. The training-time ablation is a model trained with `worldvla train
--attention causal`, whose policy decodes causally by itself.
"""
from __future__ import annotations

from ..inference.policy import WorldVLAPolicy


class CausalChunkPolicy(WorldVLAPolicy):
    """A `WorldVLAPolicy` that decodes its chunks without the chunk mask (plain causal)."""

    @classmethod
    def from_policy(cls, policy: WorldVLAPolicy) -> "CausalChunkPolicy":
        # tune_malloc=False: the process's malloc settings are what `policy` (or its caller) left them; a copy
        # of it must not put back the defaults over settings chosen since.
        causal = cls(policy.model, policy.vqgan, policy.action_tokenizer, chunk_size=policy.chunk_size,
                     image_size=policy.image_size, history=policy.history, text_tokenizer=policy.text_tokenizer,
                     mode="causal", extra=policy.extra, layout=policy.layout, max_new_tokens=policy.max_new_tokens,
                     code_cache_size=policy.code_cache_size, tune_malloc=False)
        # The limits a caller (a PolicyServer) set on the policy's caches and engines, not constructor arguments
        for name in ("max_prefixes", "max_engines", "engine_headroom"):
            setattr(causal, name, getattr(policy, name))
        return causal

    def metadata(self) -> dict:
        return {**super().metadata(), "mode": "causal (no chunk mask)"}


__all__ = ["CausalChunkPolicy"]
