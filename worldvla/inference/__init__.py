"""Fast inference: static-cache engine, parallel action-chunk decoding, world-model rollouts, the policy."""
from .chunk import generate_action_chunk
from .engine import InferenceEngine

__all__ = ["generate_action_chunk", "InferenceEngine"]
