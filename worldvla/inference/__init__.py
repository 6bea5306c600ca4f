"""Fast inference: a static-cache engine (CUDA graphs on GPU), parallel action-chunk decoding,
world-model frame rollouts, the closed-loop policy, the release's free action decoding on the engine,
and the release's decoder as a baseline."""
from .baseline import baseline_generate_action_chunk
from .chunk import generate_action_chunk
from .engine import InferenceEngine
from .frames import FrameRollout, generate_frame_codes, generate_frames
from .malloc import cpu_malloc_settings, tune_cpu_malloc
from .policy import WorldVLAPolicy, save_policy
from .release import generate_release_actions

__all__ = ["generate_action_chunk", "generate_frames", "generate_frame_codes", "FrameRollout", "WorldVLAPolicy",
           "save_policy", "InferenceEngine", "baseline_generate_action_chunk", "tune_cpu_malloc",
           "cpu_malloc_settings", "generate_release_actions"]
