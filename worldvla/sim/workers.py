"""Meta-World envs that live in worker processes and step side by side.

MuJoCo's software renderer draws a 64-px frame in about 13 ms on one core, and a closed-loop
evaluation steps its envs one after the other: half of a 2-core machine idles. `EnvWorkers`
spreads `n_envs` envs of one task over `workers` processes; each env is reached through an
`RemoteEnv` handle with the `MetaWorldEnv` interface (`reset`, `step`, `success`,
`instruction`, `can_skip_render`) plus `step_async` / `step_wait`, so that a caller can
start every env's step before it waits for the first. An env's frames, rewards and
successes are those of the same env in the calling process: same seed, same physics.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import signal
import sys
import threading
import time
import traceback
from collections import deque
from multiprocessing.connection import wait as wait_ready

import numpy as np

from .metaworld_env import DEFAULT_MAX_STEPS
from ..checks import is_integer


def mp_context(preload=("worldvla.sim.metaworld_env",)):
    """The multiprocessing context of simulator workers (collection, evaluation). They must not
    inherit an OpenGL context or threads from the parent: forkserver (spawn off Linux), with
    `preload` imported once in the server."""
    method = "forkserver" if sys.platform.startswith("linux") else "spawn"
    ctx = mp.get_context(method)
    if method == "forkserver":
        ctx.set_forkserver_preload(list(preload))
        _start_forkserver_ignoring_sigint()
    return ctx


def _start_forkserver_ignoring_sigint() -> None:
    """Start the forkserver with SIGINT ignored. Ctrl-C is the parent's to handle, and the forkserver ignores it
    itself only once its preload modules (torch, MuJoCo: seconds) are imported, so a Ctrl-C in those seconds
    printed its traceback under the command's one line. An ignored SIGINT survives the exec, and Python then
    leaves it ignored. Only the main thread may set handlers; elsewhere the server starts as before, on use."""
    from multiprocessing import forkserver

    if threading.current_thread() is not threading.main_thread():
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        forkserver.ensure_running()
    finally:
        signal.signal(signal.SIGINT, previous)


# Errors of these kinds (a bad action, a bad setting) are raised in the caller as the same kind, so that a
# command reports them in its one line as it reports the same error of an env in its own process.
_RERAISED = (ValueError, TypeError)
# A reply (a worker's start-up, an env step, a whole expert episode: seconds) that has not come in this long is
# taken for a hung worker (a renderer deadlock) rather than waited for without end.
REPLY_TIMEOUT_S = 600.0


class WorkerTraceback(Exception):
    """The traceback of an error in an env worker, as text: the cause of the error raised in the caller, so that
    an uncaught error shows it and a command's one-line report does not."""


def _error_reply(e: Exception) -> tuple:
    """(kind raised again in the caller or None, the error's type name, message, traceback text) of an error in a
    worker."""
    kind = next((k.__name__ for k in _RERAISED if isinstance(e, k)), None)
    return kind, type(e).__name__, str(e), traceback.format_exc()


def _serve(conn, task: str, n_envs: int, image_size: int, max_steps: int, kwargs: dict) -> None:
    """Worker loop: build `n_envs` envs, then answer (command, env index, args) messages."""
    from .metaworld_env import expert_episode, make_env

    # Ctrl-C (SIGINT to the terminal's whole process group) is the parent's to handle: it closes the workers.
    # Here it printed a traceback per worker.
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    envs = []
    try:
        envs = [make_env(task, seed=0, image_size=image_size, max_steps=max_steps, **kwargs) for _ in range(n_envs)]
        conn.send(("ok", envs[0].instruction if envs else None))
        while True:
            cmd, i, args = conn.recv()
            if cmd == "close":
                break
            try:
                env = envs[i]
                if cmd == "reset":
                    frame = env.reset(**args)
                    conn.send(("ok", (frame, env.success)))
                elif cmd == "step":
                    frame, reward, success, done = env.step(*args[:1], **args[1])
                    conn.send(("ok", (frame, reward, success, done, env.success)))
                elif cmd == "expert":
                    conn.send(("ok", expert_episode(env, **args)))
                else:
                    raise ValueError(f"unknown command {cmd!r}; the commands are reset, step and expert")
            except Exception as e:  # noqa: BLE001  (reported to the caller, who raises it)
                conn.send(("error", _error_reply(e)))
    except Exception as e:  # noqa: BLE001
        try:
            conn.send(("error", _error_reply(e)))
        except (BrokenPipeError, OSError):
            pass
    finally:
        for env in envs:
            env.close()
        conn.close()


class _Worker:
    interrupted = False  # a wait for a reply was cut short (Ctrl-C): that reply is still in the pipe
    overdue = False  # a wait for a reply timed out: it may still come, and is the next one read
    closed = False  # its pool closed it: its envs take no more commands
    spawned = False  # its process was started here: closed when the worker is collected

    def __init__(self, ctx, task, n_envs, image_size, max_steps, kwargs, rank: int = 0, stride: int = 1):
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(child, task, n_envs, image_size, max_steps, kwargs), daemon=True)
        self.proc.start()
        self.spawned = True
        child.close()
        self.rank, self.stride = rank, stride  # its env i is the pool's env i * stride + rank
        self.pending: deque[int] = deque()  # env indices whose replies are still to be read, in order
        self.started = False  # its start-up reply came: it imported the main module and built its envs

    def send(self, cmd: str, i: int, args) -> None:
        self._check_in_step()
        if self.overdue:  # the next reply read would be the overdue one, taken for this command's
            raise RuntimeError(
                f"env worker process {self.proc.pid}: its reply to an earlier command (env "
                f"{self._env(self.pending[0])}) timed out and has not been read, and would be read as "
                "this command's; wait for it again (step_wait, expert_wait) or close this pool (EnvWorkers.close)")
        try:
            self.conn.send((cmd, i, args))
        except (EOFError, OSError):  # the process is gone: BrokenPipeError, ConnectionResetError
            raise self._died() from None
        self.pending.append(i)

    def recv(self, i: int):
        self._check_in_step()
        env = self._env(i)  # the pool's numbering, the one the caller knows
        if not self.pending:
            raise RuntimeError(f"env {env}: no command of it awaits a reply; call step_async (expert_async) before "
                               "step_wait (expert_wait)")
        if self.pending[0] != i:
            raise RuntimeError(f"env {env}: replies are read in the order the commands were sent; env "
                               f"{self._env(self.pending[0])} (on the same worker) was sent one before: wait for it "
                               "first")
        try:
            out = self.reply(i)
        except TimeoutError:  # the command stays pending: a later wait for it reads its reply when it comes
            self.overdue = True
            raise
        except BaseException:
            self.pending.popleft()  # its reply was read (an error reply) or the worker is gone
            raise
        self.overdue = False
        self.pending.popleft()
        return out

    def _env(self, i: int) -> int:
        """The pool's index of this worker's env `i`."""
        return i * self.stride + self.rank

    def _check_in_step(self) -> None:
        if self.closed:  # its process is gone on purpose: not a death with a traceback to look for
            raise RuntimeError(f"env worker process {self.proc.pid} was closed with its pool (EnvWorkers.close); "
                               "its envs take no more commands: make a new EnvWorkers")
        if self.interrupted:
            raise RuntimeError(
                f"env worker process {self.proc.pid}: a wait for one of its replies was interrupted, and that reply "
                "would be read as the next one; close this pool (EnvWorkers.close) and make a new one")

    def reply(self, i: int | None = None):
        """The next reply; `i`: the env it is from (None: the worker's start). A worker's ValueError or TypeError
        is raised as one here, other errors as RuntimeError; the worker's traceback is the cause of either."""
        try:
            ready = self.conn.poll(REPLY_TIMEOUT_S)
            if ready:
                status, value = self.conn.recv()
        except (EOFError, OSError):
            raise self._died() from None
        except BaseException:  # Ctrl-C: the reply (or what is left of it) stays in the pipe, for the next read
            self.interrupted = True
            raise
        if not ready:  # outside the try: TimeoutError is an OSError
            raise TimeoutError(
                f"env worker process {self.proc.pid} sent no reply in {REPLY_TIMEOUT_S:.0f} s: it hangs (a simulator "
                f"or renderer deadlock; MUJOCO_GL={os.environ.get('MUJOCO_GL', 'unset')}); run one process "
                "(env_workers=1, --env-workers 1) to see where, or check the OpenGL (EGL/OSMesa) install")
        self.started = True
        if status != "ok":
            kind, name, message, tb = value
            where = f"env worker process {self.proc.pid}"
            if i is not None:
                where = f"env {self._env(i)} (in {where})"
            err = {k.__name__: k for k in _RERAISED}.get(kind)
            if err is not None:
                raise err(f"{where}: {message}") from WorkerTraceback(tb)
            raise RuntimeError(f"{where} failed: {name}: {message}") from WorkerTraceback(tb)
        return value

    def __del__(self):
        # The pool's envs keep their worker: it is closed once neither the pool nor any of them is left.
        if self.spawned:
            _close_workers([self])

    def _died(self) -> ChildProcessError:
        # An OSError, which the command line reports in one line: the cause lies outside the program (memory, the
        # renderer, the user's script), and the message says what to do.
        self.proc.join(timeout=1.0)
        code = self.proc.exitcode
        if not self.started:  # it died importing the main module or building its envs
            return ChildProcessError(
                f"env worker process {self.proc.pid} died (exit code {code}) before it started; a traceback it "
                "printed is above. Workers start by importing the main module: a script that evaluates at its top "
                "level needs `if __name__ == \"__main__\":` around that code (or use one process: env_workers=1, "
                "--env-workers 1)")
        return ChildProcessError(f"env worker process {self.proc.pid} died ({_exit_cause(code)})")

    def drain(self) -> bool:
        """Read and drop what the worker has written; False once its end is closed. A reply left unread (Ctrl-C
        while waiting for it: an expert episode's frames are more than a pipe holds) blocks the worker in its send,
        where it never reads "close". Raw bytes, not messages: an interrupted `recv` may have read part of one."""
        try:
            while self.conn.poll(0):
                if not os.read(self.conn.fileno(), 1 << 20):
                    return False
        except (EOFError, OSError):
            return False
        return True


def _exit_cause(code: int | None) -> str:
    """What a worker's exit code says, and what to do about it."""
    if code is None:
        return "it closed its connection but is still running"
    if code >= 0:
        return f"exit code {code}; a traceback it printed is above"
    try:
        name = signal.Signals(-code).name
    except ValueError:
        name = f"signal {-code}"
    if name == "SIGKILL":
        return (f"exit code {code}, killed by SIGKILL: often the out-of-memory killer; free memory or use fewer "
                "worker processes")
    if name in ("SIGSEGV", "SIGBUS", "SIGABRT", "SIGILL", "SIGFPE"):
        return (f"exit code {code}, killed by {name}: a crash in the simulator or its renderer (MUJOCO_GL="
                f"{os.environ.get('MUJOCO_GL', 'unset')}); check the MuJoCo, Meta-World and OpenGL (EGL/OSMesa) "
                "installs, or run one process (env_workers=1, --env-workers 1) to see where it crashes")
    return f"exit code {code}, killed by {name}, sent by another process"


class RemoteEnv:
    """Handle on one env of an `EnvWorkers` pool, with the `MetaWorldEnv` interface."""

    can_skip_render = True

    def __init__(self, worker: _Worker, index: int, task: str, instruction: str):
        self._worker, self._index = worker, index
        self.task, self.instruction = task, instruction
        self.success = False

    def reset(self, seed: int | None = None, render: bool = True):
        self._worker.send("reset", self._index, {"seed": seed, "render": render})
        frame, self.success = self._worker.recv(self._index)
        return frame

    def step_async(self, action, render: bool = True) -> None:
        self._worker.send("step", self._index, (np.asarray(action, dtype=np.float64), {"render": render}))

    def step_wait(self):
        frame, reward, success, done, self.success = self._worker.recv(self._index)
        return frame, reward, success, done

    def step(self, action, render: bool = True):
        self.step_async(action, render)
        return self.step_wait()

    def expert_async(self, seed: int) -> None:
        """Start a scripted-expert episode from layout `seed` (see `expert_episode`)."""
        self._worker.send("expert", self._index, {"seed": seed})

    def expert_wait(self) -> dict:
        out = self._worker.recv(self._index)
        self.success = out["success"]
        return out

    def close(self) -> None:
        """The pool owns the worker processes: `EnvWorkers.close` ends them."""


class EnvWorkers:
    """`n_envs` envs of `task` spread round-robin over `workers` processes (`.envs`)."""

    def __init__(self, task: str, n_envs: int, image_size: int = 64, max_steps: int = DEFAULT_MAX_STEPS,
                 workers: int = 2, **env_kwargs):
        from .metaworld_env import _check_task

        _check_task(task)
        whole = all(is_integer(n) for n in (n_envs, workers))
        if not whole or n_envs < 1 or workers < 1:  # a bool or a fraction is no count of envs or processes
            raise ValueError(f"need n_envs >= 1 and workers >= 1, got n_envs={n_envs!r}, workers={workers!r}"
                             + ("" if whole else "; give whole numbers"))
        workers = min(workers, n_envs)
        ctx = mp_context()
        share = [len(range(w, n_envs, workers)) for w in range(workers)]
        self._workers = [_Worker(ctx, task, share[w], image_size, max_steps, env_kwargs, w, workers)
                         for w in range(workers)]
        try:
            instruction = [w.reply() for w in self._workers][0]  # every worker has built its envs
        except BaseException:
            self.close()
            raise
        # env j lives on worker j % workers, as that worker's env j // workers
        self.envs = [RemoteEnv(self._workers[j % workers], j // workers, task, instruction) for j in range(n_envs)]

    def close(self, timeout: float = 10.0) -> None:
        """Ask each worker to close, read what it still sends (replies left unread after an error or a Ctrl-C, which
        would block it in its send), and kill one still running after `timeout` seconds. Its envs then refuse
        commands."""
        _close_workers(getattr(self, "_workers", []), timeout)
        self._workers = []

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _close_workers(workers: list, timeout: float = 10.0) -> None:
    """`EnvWorkers.close` of `workers` (those not closed yet), side by side."""
    workers = [w for w in workers if not w.closed]
    for w in workers:
        w.closed = True
        if w.proc.is_alive():
            try:
                w.conn.send(("close", -1, None))
            except (BrokenPipeError, OSError):
                pass
    deadline = time.monotonic() + timeout
    reading = [w for w in workers if w.proc.is_alive()]  # until each has exited or closed its end
    while reading and time.monotonic() < deadline:
        ready = wait_ready([w.conn for w in reading] + [w.proc.sentinel for w in reading],
                           timeout=max(0.0, deadline - time.monotonic()))
        reading = [w for w in reading if (w.conn not in ready or w.drain()) and w.proc.is_alive()]
    for w in workers:
        w.proc.join(timeout=max(0.0, deadline - time.monotonic()))
        if w.proc.is_alive():
            w.proc.kill()
            w.proc.join(timeout=5)
        w.conn.close()
