"""Process groups in tests: a few ranks spawned on this machine, each joined through a file (Gloo), with a
deadline that turns a hang into a failure that says where every rank was."""
import faulthandler
import os
import signal
import sys
import time
from pathlib import Path

import pytest


def gloo_threads():
    """The names of this process's Gloo threads (Linux names its threads in /proc)."""
    tasks = Path("/proc/self/task")
    return [name for t in tasks.iterdir() if "gloo" in (name := (t / "comm").read_text().strip())]


def _traced_rank(rank, fn, *args):
    """A rank that prints every thread's Python stack if it dies by a signal (a native abort says nothing else
    about where it happened) or when `spawn` gives up on it (SIGUSR1), and that checks, once `fn` has left the
    group (`dist_utils.shutdown`), that the group went with its Gloo threads: one left running into the
    interpreter's exit could abort the process there, now and then, after everything had passed."""
    faulthandler.enable(all_threads=True)
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    fn(rank, *args)
    assert not gloo_threads(), gloo_threads()


def native_threads(pid):
    """Every thread of process `pid` as the kernel sees it, Python's or not: its name, state and what it waits in
    (Linux's /proc; the stack dump above names only threads that hold a Python thread state, and by address)."""
    lines = [f"threads of {pid} (tid, name, state, waiting in):"]
    for task in sorted(Path(f"/proc/{pid}/task").iterdir(), key=lambda t: int(t.name)):
        try:
            name = (task / "comm").read_text().strip()
            state = (task / "stat").read_text().rsplit(")", 1)[1].split()[0]
            wchan = (task / "wchan").read_text().strip() or "-"
        except OSError:  # the thread ended meanwhile
            continue
        lines.append(f"  {task.name} {name} {state} {wchan}")
    return "\n".join(lines)


def spawn(fn, world, args, timeout_s=100):
    """Run `fn(rank, world, *args)` in `world` processes and wait for them all. A rank still running after
    `timeout_s` prints its threads' stacks to stderr before it is ended, and the test fails: a hang that shows
    once in many runs then leaves the place it hung in the log."""
    import torch.multiprocessing as mp

    ctx = mp.spawn(_traced_rank, args=(fn, world, *args), nprocs=world, join=False)
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=2):
        if time.monotonic() > deadline:
            for rank, p in enumerate(ctx.processes):  # one at a time, for their lines not to interleave
                if p.is_alive():
                    print(f"rank {rank} (pid {p.pid}) still running:", file=sys.stderr, flush=True)
                    os.kill(p.pid, signal.SIGUSR1)
                    time.sleep(1)
                    print(native_threads(p.pid), file=sys.stderr, flush=True)
            for p in ctx.processes:
                if p.is_alive():
                    p.terminate()
            pytest.fail(f"distributed workers still running after {timeout_s} s (their stacks: captured stderr)")
