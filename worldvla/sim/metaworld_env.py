"""Meta-World as an embedded simulator: 4-D actions in, upright RGB frames out.

A thin layer over `gym.make("Meta-World/MT1", ...)` (metaworld 3.x, gymnasium 1.x,
mujoco 3.x) that adds what a world-model pipeline needs and Meta-World does not
give directly: a language instruction per task, seeded object layouts, fast small
frames, and the scripted expert for each task.
"""
from __future__ import annotations

import atexit
import difflib
import os
import sys
import warnings
import weakref
from pathlib import Path
from typing import Any

import numpy as np

from ..checks import is_count, is_integer

# MuJoCo picks its OpenGL backend when it is first imported; headless Linux needs
# EGL (Mesa renders it on CPU when there is no GPU).
if sys.platform.startswith("linux"):
    os.environ.setdefault("MUJOCO_GL", "egl")

# Task name -> the instruction given to the model. All 50 Meta-World v3 tasks have
# a scripted expert in `metaworld.policies.ENV_POLICY_MAP`.
TASKS: dict[str, str] = {
    "assembly-v3": "put the ring onto the peg",
    "basketball-v3": "dunk the basketball into the basket",
    "bin-picking-v3": "pick the cube from one bin and place it in the other bin",
    "box-close-v3": "grasp the lid and close the box",
    "button-press-topdown-v3": "press the button from the top",
    "button-press-topdown-wall-v3": "press the button from the top behind the wall",
    "button-press-v3": "press the button",
    "button-press-wall-v3": "press the button behind the wall",
    "coffee-button-v3": "push the button on the coffee machine",
    "coffee-pull-v3": "pull the mug away from the coffee machine",
    "coffee-push-v3": "push the mug under the coffee machine",
    "dial-turn-v3": "rotate the dial",
    "disassemble-v3": "pick the ring off the peg",
    "door-close-v3": "close the door",
    "door-lock-v3": "lock the door by rotating the lock",
    "door-open-v3": "open the door",
    "door-unlock-v3": "unlock the door by rotating the lock",
    "drawer-close-v3": "push the drawer closed",
    "drawer-open-v3": "open the drawer",
    "faucet-close-v3": "turn the faucet handle to close it",
    "faucet-open-v3": "turn the faucet handle to open it",
    "hammer-v3": "hammer the nail into the wall",
    "hand-insert-v3": "insert the gripper into the hole",
    "handle-press-side-v3": "press the handle down from the side",
    "handle-press-v3": "press the handle down",
    "handle-pull-side-v3": "pull the handle up from the side",
    "handle-pull-v3": "pull the handle up",
    "lever-pull-v3": "pull the lever up",
    "peg-insert-side-v3": "insert the peg into the hole from the side",
    "peg-unplug-side-v3": "unplug the peg from the side",
    "pick-out-of-hole-v3": "pick the peg out of the hole",
    "pick-place-v3": "pick up the puck and place it at the goal",
    "pick-place-wall-v3": "pick up the puck and place it at the goal behind the wall",
    "plate-slide-back-side-v3": "slide the plate back into the cabinet from the side",
    "plate-slide-back-v3": "slide the plate back into the cabinet",
    "plate-slide-side-v3": "slide the plate into the cabinet from the side",
    "plate-slide-v3": "slide the plate into the cabinet",
    "push-back-v3": "push the puck back to the goal",
    "push-v3": "push the puck to the goal",
    "push-wall-v3": "push the puck to the goal around the wall",
    "reach-v3": "reach the goal position",
    "reach-wall-v3": "reach the goal position over the wall",
    "shelf-place-v3": "pick up the puck and place it on the shelf",
    "soccer-v3": "kick the soccer ball into the goal",
    "stick-pull-v3": "grasp the stick and pull the box with it",
    "stick-push-v3": "grasp the stick and push the box with it",
    "sweep-into-v3": "sweep the puck into the hole",
    "sweep-v3": "sweep the puck off the table",
    "window-close-v3": "push the window closed",
    "window-open-v3": "push the window open",
}

ACTION_DIM = 4  # xyz end-effector delta + gripper effort, each in [-1, 1]
STATE_DIM = 39  # Meta-World v3's observation (`MetaWorldEnv.state`)
MAX_EPISODE_STEPS = 500  # Meta-World's own episode limit
# The scripted experts finish the tasks they solve well before 200 steps (see `expert_episode`),
# and shorter episodes mean smaller demos.
DEFAULT_MAX_STEPS = 200
CAMERAS = ("corner", "corner2", "corner3", "corner4", "topview", "behindGripper", "gripperPOV")
# The `corner` camera is declared with its up axis pointing at the floor
# (xyaxes="-1 1 0 -0.2 -0.2 -1"), so its frames come out rotated by 180 degrees.
# Rotating back (not just flipping rows, which would mirror the scene) gives the
# view a physical camera at that spot would see. The other cameras are returned as
# Meta-World defines them (corner2-4 are tilted by their euler angles).
_ROTATE_180 = frozenset({"corner"})

_INSTALL_HINT = 'Meta-World is not installed; install the simulator extra with: pip install "worldvla[sim]"'


# MUJOCO_GL -> (its library, the Debian/Ubuntu packages that provide it)
_GL_LIBRARIES = {"egl": ("EGL", "libegl1 libgl1-mesa-dri"), "osmesa": ("OSMesa", "libosmesa6"),
                 "glx": ("GLX", "libgl1 libglx-mesa0")}


def _require_metaworld():
    try:
        import gymnasium
        import metaworld  # noqa: F401  (registers the Meta-World/* env ids)
        import mujoco
    except ImportError as e:
        raise ImportError(f"{_INSTALL_HINT} ({e})") from e
    except AttributeError as e:
        if not _raised_in_opengl(e):
            raise
        # MuJoCo sets up the OpenGL backend MUJOCO_GL names when it is imported; PyOpenGL, not finding that
        # backend's library, leaves its platform None: "'NoneType' object has no attribute 'glGetError'".
        gl = os.environ.get("MUJOCO_GL", "")
        name, packages = _GL_LIBRARIES.get(gl.lower(), ("OpenGL", "libegl1 libgl1-mesa-dri"))
        raise ImportError(
            f"MuJoCo cannot set up its OpenGL backend MUJOCO_GL={gl or '(unset)'}: the {name} library was not found "
            f"({e}). Install it (apt-get install {packages}), or set MUJOCO_GL to a backend this machine has: egl "
            "(headless; Mesa renders on the CPU where there is no GPU), osmesa, or glx with a display") from e
    return gymnasium, metaworld, mujoco


def _raised_in_opengl(e: BaseException) -> bool:
    """Whether `e` was raised inside PyOpenGL (the module MuJoCo renders through)."""
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and "OpenGL" in Path(tb.tb_frame.f_code.co_filename).parts


def check_tasks(tasks, fix: str = "--tasks") -> None:
    """Refuse names that are not Meta-World tasks (`TASKS`), all of them in one error with the closest valid
    names: before any work starts, not when the task's turn comes after the others ran. `fix` names what the
    user should change (an option such as "--tasks"); the full task list is added only when some name has
    no close match."""
    unknown = [t for t in dict.fromkeys(tasks) if t not in TASKS]
    if not unknown:
        return
    close = {t: difflib.get_close_matches(t, list(TASKS), n=3) if isinstance(t, str) else [] for t in unknown}
    named = ", ".join(f"{t!r} (did you mean {' or '.join(filter(None, [', '.join(c[:-1]), c[-1]]))}?)" if c
                      else repr(t) for t, c in close.items())  # 'raech-v3' (did you mean a, b or c?)
    msg = f"unknown Meta-World task{'s' * (len(unknown) > 1)} {named}; nothing was run: fix {fix}"
    if not all(close.values()):
        msg += f"; the tasks are {', '.join(sorted(TASKS))}"
    raise ValueError(msg)


def task_list(tasks, fix: str = "--tasks") -> list[str]:
    """`tasks` (names, or one string of names separated by commas as --tasks takes them; `all` names every task)
    as a list of Meta-World tasks, each once, in the order given. Refused when it names none, or an unknown task
    (`check_tasks`). A string is never iterated: its letters would be taken for task names."""
    if isinstance(tasks, str):
        tasks = [t.strip() for t in tasks.split(",") if t.strip()]
    if not hasattr(tasks, "__iter__"):  # None, a number
        raise ValueError(f"tasks must be Meta-World task names like ['reach-v3', 'push-v3'] or 'all' ({fix}), "
                         f"got {tasks!r}")
    tasks = list(dict.fromkeys(x for t in tasks for x in (TASKS if t == "all" else [t])))
    if not tasks:
        raise ValueError(f"no tasks given; pass Meta-World task names like 'reach-v3,push-v3' or 'all' ({fix})")
    check_tasks(tasks, fix=fix)
    return tasks


def check_max_steps(max_steps: int, name: str = "max_steps") -> None:
    """Refuse an episode limit Meta-World does not run (`name`: the option or argument to fix). A fraction is
    refused, not cut to the whole steps below it."""
    whole = is_integer(max_steps)
    if not whole or not 1 <= max_steps <= MAX_EPISODE_STEPS:
        got = max_steps if whole else f"{max_steps!r}; give a whole number of steps"
        raise ValueError(f"{name} must be in [1, {MAX_EPISODE_STEPS}] (Meta-World's own episode limit), got {got}")


def _check_task(task: str) -> None:
    check_tasks([task], fix="the task name")


def _layout_seed(seed, limit: int | None = None) -> int:
    """`seed` as a layout seed: a whole number >= 0 (below `limit` where given). Meta-World's own refusals name
    no argument (and of another error kind), and a fraction would be cut to another seed's layout."""
    if not is_count(seed) or (limit is not None and seed >= limit):
        below = f" and below {limit}" if limit is not None else ""
        raise ValueError(f"seed must be a whole number >= 0{below} (it names one object layout), got {seed!r}")
    return int(seed)


class ExpertPolicy:
    """Meta-World's scripted expert for one task: `policy(state) -> action [4]` in [-1, 1].

    `state` is `MetaWorldEnv.state`. The experts are proportional controllers whose
    raw output can leave [-1, 1] (they warn about it on every call); the env clips
    anyway, so the action is clipped here and the warning silenced.
    """

    def __init__(self, task: str):
        _check_task(task)
        _require_metaworld()
        from metaworld.policies import ENV_POLICY_MAP

        self.task = task
        self._policy = ENV_POLICY_MAP[task]()

    def __call__(self, state) -> np.ndarray:
        # The experts slice the observation by position: a shorter one (a frame, part of the state) gave zero or
        # wrong actions without an error.
        state = np.asarray(state, dtype=np.float64)
        if state.size != STATE_DIM:
            raise ValueError(f"the {self.task} expert reads the {STATE_DIM}-D state of MetaWorldEnv.state, got shape "
                             f"{state.shape}; pass env.state")
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Constant", category=UserWarning)
            action = self._policy.get_action(state.reshape(-1))
        return np.clip(np.asarray(action, dtype=np.float64), -1.0, 1.0)

    get_action = __call__


def expert_policy(task: str) -> ExpertPolicy:
    """The scripted expert of `task` (from `metaworld.policies.ENV_POLICY_MAP`)."""
    return ExpertPolicy(task)


def _make_gym_env(task: str, seed: int, image_size: int, camera: str):
    gym, metaworld, _ = _require_metaworld()
    # MT1 builds one env just to sample `num_goals` fixed layouts (one reset per goal).
    # Layouts here are drawn per reset seed instead, so one goal is enough; `num_goals`
    # is stored in a module global by Meta-World, so put it back for other callers.
    saved_goals = getattr(metaworld, "_N_GOALS", None)
    try:
        env = gym.make(
            "Meta-World/MT1",
            env_name=task,
            seed=seed,
            num_goals=1,
            render_mode="rgb_array",
            width=image_size,
            height=image_size,
            camera_name=camera,
            disable_env_checker=True,
        )
    finally:
        if saved_goals is not None:
            metaworld._N_GOALS = saved_goals
    return env


class MetaWorldEnv:
    """One Meta-World task with seeded layouts and small RGB frames.

    reset(seed) -> frame uint8 [H, W, 3]
    step(action [4]) -> (frame, reward, success, done)

    `done` is true once the task succeeds (when `terminate_on_success`) or after
    `max_steps` steps. `state` is the low-dimensional observation the scripted
    expert reads. Each `reset(seed)` draws the object and goal positions from the
    task's own random reset space with a generator seeded by `seed`, so a seed
    names one layout for good; Meta-World's MT1 would instead cycle through a
    fixed set of 50 layouts.

    Rendering: shadows, reflections, skybox and multisampling are off by default
    (about 5 ms a 64x64 frame through Mesa on CPU instead of 50-70 ms);
    `antialias=True` turns 4x multisampling back on (~3x slower at 64x64).
    """

    def __init__(
        self,
        task: str,
        seed: int = 0,
        image_size: int = 64,
        camera: str = "corner",
        max_steps: int = DEFAULT_MAX_STEPS,
        terminate_on_success: bool = True,
        antialias: bool = False,
    ):
        _check_task(task)
        if not isinstance(image_size, (int, np.integer)) or image_size < 8:
            raise ValueError(f"image_size must be an integer >= 8, got {image_size!r}")
        if camera not in CAMERAS:
            raise ValueError(f"unknown camera {camera!r}; Meta-World cameras: {', '.join(CAMERAS)}")
        check_max_steps(max_steps)
        # MT1 seeds numpy's legacy generator with it, which takes only 32-bit seeds.
        self.seed = _layout_seed(seed, limit=1 << 32)
        self.task = task
        self.instruction = TASKS[task]
        self.image_size = int(image_size)
        self.camera = camera
        self.max_steps = int(max_steps)
        self.terminate_on_success = terminate_on_success
        _, _, self._mujoco = _require_metaworld()

        self._env = _make_gym_env(task, self.seed, self.image_size, camera)
        self._raw = self._env.unwrapped
        if not antialias:
            self._raw.model.vis.quality.offsamples = 0  # read when the GL context is made
        # The first reset lets Meta-World's task wrapper install the MT1 task data
        # (goal made observable, task kwargs); after that the wrapper must stop
        # swapping tasks so our own seeded layouts stick.
        self._env.reset()
        self._task_wrapper().toggle_sample_tasks_on_reset(False)
        self._viewer = self._raw.mujoco_renderer._get_viewer("rgb_array")
        _close_at_exit(self)
        flags = self._viewer.scn.flags
        rnd = self._mujoco.mjtRndFlag
        for flag in (rnd.mjRND_SHADOW, rnd.mjRND_REFLECTION, rnd.mjRND_SKYBOX):
            flags[flag] = 0
        self._state: np.ndarray | None = None
        self.t = 0
        self.success = False

    def _task_wrapper(self):
        env = self._env
        while not hasattr(env, "toggle_sample_tasks_on_reset"):
            if not hasattr(env, "env"):
                raise RuntimeError("Meta-World's task-selection wrapper was not found; unsupported metaworld version")
            env = env.env
        return env

    @property
    def action_dim(self) -> int:
        return ACTION_DIM

    @property
    def state(self) -> np.ndarray:
        """The 39-D observation (hand, gripper, objects, previous frame, goal) the expert reads."""
        if self._state is None:
            raise RuntimeError("call reset() before reading the state")
        return self._state

    def _check_open(self) -> None:
        if self._env is None:
            raise RuntimeError(f"this {self.task} env is closed (close() was called); make a new one with make_env")

    def render(self) -> np.ndarray:
        self._check_open()
        # Each env owns an OpenGL context, and gymnasium only makes it current when
        # the context is created: after another env in this process was created or
        # closed, rendering would go to the wrong (or no) context and come out black.
        self._viewer.make_context_current()
        frame = self._raw.render()
        if self.camera in _ROTATE_180:
            frame = frame[::-1, ::-1]
        return np.ascontiguousarray(frame)

    can_skip_render = True  # reset/step take render=False (closed_loop's blind policies)

    def reset(self, seed: int | None = None, render: bool = True) -> np.ndarray | None:
        """Start an episode; `seed` fixes the layout (default: the env's seed). `render=False`
        returns no frame (for policies that do not look, such as the random baseline)."""
        self._check_open()
        seed = self.seed if seed is None else _layout_seed(seed)
        raw = self._raw
        # Meta-World's reset ignores its seed argument; seeding the env's generator
        # and letting reset_model draw (with its own rejection of bad layouts) keeps
        # the layout a pure function of the seed.
        raw.seed(seed)
        raw._freeze_rand_vec = False
        raw.seeded_rand_vec = True
        state, _ = self._env.reset()
        self._state = np.asarray(state, dtype=np.float64)
        self.t = 0
        self.success = False
        return self.render() if render else None

    def step(self, action, render: bool = True) -> tuple[np.ndarray | None, float, bool, bool]:
        self._check_open()
        if self._state is None:
            raise RuntimeError("call reset() before step()")
        if self.t >= self.max_steps:
            raise RuntimeError(f"episode is over ({self.max_steps} steps); call reset()")
        a = np.asarray(action, dtype=np.float64).reshape(-1)
        if a.shape != (ACTION_DIM,):
            raise ValueError(f"Meta-World actions are {ACTION_DIM}-D (dx, dy, dz, gripper), got shape {np.shape(action)}")
        if not np.all(np.isfinite(a)):
            raise ValueError(f"action contains NaN or inf: {a}")
        a = np.clip(a, -1.0, 1.0)
        state, reward, _, _, info = self._env.step(a)
        self._state = np.asarray(state, dtype=np.float64)
        self.t += 1
        self.success = self.success or bool(info["success"])
        done = (self.success and self.terminate_on_success) or self.t >= self.max_steps
        return (self.render() if render else None), float(reward), bool(info["success"]), done

    def close(self) -> None:
        """Free the simulator and its OpenGL context (also done when the env is collected)."""
        env, self._env = getattr(self, "_env", None), None
        if env is None:
            return
        viewer, self._viewer = getattr(self, "_viewer", None), None
        # Free MuJoCo's GL objects inside our own context. Left to the garbage
        # collector, they are deleted in whatever context is current then, which
        # can be another env's, whose framebuffers share the same object ids.
        if viewer is not None:
            try:
                viewer.make_context_current()
                viewer.con.free()
            except Exception:  # noqa: BLE001  (already torn down: nothing left to protect)
                pass
        env.close()

    def __del__(self):
        self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


_LIVE_ENVS: weakref.WeakSet = weakref.WeakSet()


def _close_live_envs() -> None:
    for env in list(_LIVE_ENVS):
        env.close()


def _close_at_exit(env: MetaWorldEnv) -> None:
    """Envs still open when Python exits are closed while EGL is still up: left to the interpreter's
    final collection, their viewers are freed after EGL's teardown and print EGLError tracebacks.
    (Registered after MuJoCo's import, so it runs before MuJoCo's own exit handlers.)"""
    atexit.unregister(_close_live_envs)
    atexit.register(_close_live_envs)
    _LIVE_ENVS.add(env)


def expert_episode(env: MetaWorldEnv, seed: int) -> dict:
    """One scripted-expert episode of `env` from layout `seed`, until success or the step limit:
    {"seed", "frames" uint8 [T+1, H, W, 3], "actions" [T, 4], "success"}."""
    expert = expert_policy(env.task)
    frames, actions, done = [env.reset(seed=seed)], [], False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        while not done:
            a = np.clip(np.asarray(expert.get_action(env.state), dtype=np.float64), -1.0, 1.0)
            frame, _, _, done = env.step(a)
            frames.append(frame)
            actions.append(a)
    return {"seed": int(seed), "frames": np.stack(frames), "actions": np.stack(actions), "success": env.success}


def make_env(task: str, seed: int = 0, image_size: int = 64, camera: str = "corner", **kwargs) -> MetaWorldEnv:
    """A `MetaWorldEnv` for `task` (see TASKS), frames `image_size` square from `camera`."""
    return MetaWorldEnv(task, seed=seed, image_size=image_size, camera=camera, **kwargs)
