"""Embedded simulators for data collection and closed-loop evaluation."""
from .metaworld_env import (ACTION_DIM, TASKS, ExpertPolicy, MetaWorldEnv, check_tasks, expert_policy, make_env,
                            task_list)

__all__ = ["ACTION_DIM", "TASKS", "ExpertPolicy", "MetaWorldEnv", "check_tasks", "expert_policy", "make_env",
           "task_list"]
