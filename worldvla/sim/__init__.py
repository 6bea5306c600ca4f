"""Embedded simulators for data collection and closed-loop evaluation."""
from .metaworld_env import ACTION_DIM, TASKS, MetaWorldEnv, expert_policy, make_env

__all__ = ["ACTION_DIM", "TASKS", "MetaWorldEnv", "expert_policy", "make_env"]
