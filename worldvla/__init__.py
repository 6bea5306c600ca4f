"""worldvla: a fast, faithful WorldVLA (autoregressive action world model)."""
from .mask import ChunkMaskMeta, DecodeMeta, causal_meta, chunk_attention_mask, chunk_mask_meta
from .tokens import ActionTokenizer, SequenceBuilder, VocabLayout

__version__ = "0.1.0"

_LAZY = {
    "ModelConfig": "worldvla.model",
    "WorldVLA": "worldvla.model",
    "VQGAN": "worldvla.vqgan",
    "VQGANConfig": "worldvla.vqgan",
    "generate_action_chunk": "worldvla.inference",
    "generate_frames": "worldvla.inference",
    "WorldVLAPolicy": "worldvla.inference",
    "tune_cpu_malloc": "worldvla.inference",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'worldvla' has no attribute {name!r}")


__all__ = ["VocabLayout", "ActionTokenizer", "SequenceBuilder", "ChunkMaskMeta", "DecodeMeta",
           "chunk_mask_meta", "chunk_attention_mask", "causal_meta", *_LAZY]
