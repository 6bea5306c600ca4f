"""worldvla: a fast, faithful WorldVLA (autoregressive action world model)."""
__version__ = "0.1.0"

# Every name is imported on first use, so that `import worldvla` (and the command line's start) does not
# import torch before it is needed.
_LAZY = {
    "ChunkMaskMeta": "worldvla.mask",
    "DecodeMeta": "worldvla.mask",
    "causal_meta": "worldvla.mask",
    "chunk_attention_mask": "worldvla.mask",
    "chunk_mask_meta": "worldvla.mask",
    "ActionTokenizer": "worldvla.tokens",
    "SequenceBuilder": "worldvla.tokens",
    "VocabLayout": "worldvla.tokens",
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


__all__ = list(_LAZY)
