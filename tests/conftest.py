import importlib
import importlib.metadata
import os
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode


def _import_the_kernels_distribution():
    """The repository's `kernels/` folder (installed as `worldvla.kernels`) is importable as a top-level
    `kernels` while the repository root is on sys.path (`python -m pytest` puts the working directory
    there), where it would shadow the `kernels` distribution that transformers imports (its hub kernels, a
    dependency of transformers since 5.25): import that one first, with the root off the path."""
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        return
    root = Path(__file__).resolve().parents[1]
    saved = sys.path[:]
    sys.path[:] = [p for p in sys.path if Path(p or os.getcwd()).resolve() != root]
    try:
        importlib.import_module("kernels")
    finally:
        sys.path[:] = saved


# Triton reads TRITON_INTERPRET when a @triton.jit function is defined: set it
# before any kernel module is imported, so that CPU-only machines run the kernels
# in Triton's interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
_import_the_kernels_distribution()


def pytest_sessionstart(session):
    # Triton's LLVM must load before MuJoCo's software renderer (Mesa's LLVM) or the process crashes; the demo
    # does the same (worldvla.demo.load_kernels_first). Without it a file that renders first, run alone, crashed.
    from worldvla.demo import load_kernels_first

    load_kernels_first()


# Tiny models run faster on one intra-op thread, and it keeps timings steady when other jobs share the cores.
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def rng():
    """A fresh generator per test, seeded from the test's name for reproducibility."""
    # crc32, not hash(): str hashes change with every interpreter (PYTHONHASHSEED), so a failure
    # seen once could not be reproduced.
    g = torch.Generator().manual_seed(zlib.crc32(os.environ.get("PYTEST_CURRENT_TEST", "").encode()))
    return g


@pytest.fixture
def np_rng():
    """A fresh NumPy generator per test, drawn from the OS: inputs differ from run to run."""
    return np.random.default_rng(int.from_bytes(os.urandom(4), "little"))


class LoRA(torch.nn.Module):
    """A low-rank adapter around a linear layer, as fine-tuning libraries wrap projections and heads:
    base(x) + (x A^T) B^T, with the base's `weight` still reachable."""

    def __init__(self, base, gen, rank=4, scale=1.0):
        super().__init__()
        self.base = base
        self.a = torch.nn.Parameter(scale * torch.randn(rank, base.in_features, generator=gen))
        self.b = torch.nn.Parameter(scale * torch.randn(base.out_features, rank, generator=gen))

    @property
    def weight(self):
        return self.base.weight

    def forward(self, x):
        return self.base(x) + (x @ self.a.t()) @ self.b.t()


@pytest.fixture
def lora():
    """The LoRA adapter class: `lora(base_linear, generator, rank=4, scale=1.0)`."""
    return LoRA


@pytest.fixture(params=[8, 16], ids=["w8", "w16"])
def cpu_width(request):
    """Runs a test with the C++ CPU kernels at 8 and at 16 floats per vector (16 only on AVX-512
    machines; elsewhere that case skips), then restores the machine's default."""
    C = pytest.importorskip("worldvla._C")
    default = C.cpu_vector_width()
    try:
        C.set_cpu_vector_width(request.param)
    except ValueError:
        pytest.skip("this CPU has no 16-wide (AVX-512) path")
    yield request.param
    C.set_cpu_vector_width(default)


@pytest.fixture
def poison_empty(monkeypatch):
    """Every float buffer made with torch.empty starts as NaN, so unwritten kernel outputs show up."""
    real_empty = torch.empty

    def nan_empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        if t.dtype.is_floating_point:
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(torch, "empty", nan_empty)
    yield


def poison(t):
    """Fill `t` in place with a value no kernel should leave: NaN for floats (and complex), the most
    negative value for signed integers (never a valid index, id or code), the largest for unsigned ones;
    bool tensors are left as they are. Returns `t`."""
    with torch.no_grad():  # (a buffer made with requires_grad=True too)
        if t.dtype.is_floating_point or t.dtype.is_complex:
            t.fill_(float("nan"))
        elif t.dtype != torch.bool:
            info = torch.iinfo(t.dtype)
            t.fill_(info.min if info.min < 0 else info.max)
    return t


@pytest.fixture
def poison_outputs(monkeypatch):
    """Like `poison_empty`, for every buffer a kernel's wrapper may allocate: torch.empty, torch.empty_like
    and Tensor.new_empty results all start poisoned (`poison`: NaN for floats, a sentinel for integers),
    so an output element a kernel never writes fails the test instead of passing on leftover bytes."""
    real_empty, real_like, real_new = torch.empty, torch.empty_like, torch.Tensor.new_empty
    # torch.device(...) as a context manager recognizes constructors from a set it builds once, at its first
    # use: built while torch.empty is the poisoning wrapper (torch.compile in a test can be that first
    # use), it would leave the real torch.empty out for the rest of the session, and `with
    # torch.device("meta")` would then allocate for real. Build it now, from the real functions.
    try:
        from torch.utils._device import _device_constructors
    except ImportError:  # a torch without it
        pass
    else:
        _device_constructors()
    monkeypatch.setattr(torch, "empty", lambda *a, **kw: poison(real_empty(*a, **kw)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **kw: poison(real_like(*a, **kw)))
    monkeypatch.setattr(torch.Tensor, "new_empty", lambda self, *a, **kw: poison(real_new(self, *a, **kw)))
    yield poison


class NoHostReads(TorchDispatchMode):
    """Fails on any aten op that reads tensor values on the host or has a data-dependent shape, and on
    `Tensor.tolist` / `Tensor.numpy` (on CPU tensors they read memory without dispatching an op)."""
    FORBIDDEN = ("_local_scalar_dense", "nonzero", "masked_select", "is_nonzero", "equal", "unique",
                 "repeat_interleave", "_assert_async")
    METHODS = ("tolist", "numpy")

    def __enter__(self):
        self._saved = {n: torch.Tensor.__dict__.get(n) for n in self.METHODS}
        for n in self.METHODS:
            def forbidden(*args, _name=n, **kwargs):
                raise AssertionError(f"host read: Tensor.{_name}")
            setattr(torch.Tensor, n, forbidden)
        return super().__enter__()

    def __exit__(self, *exc):
        for n, f in self._saved.items():
            if f is None:
                delattr(torch.Tensor, n)
            else:
                setattr(torch.Tensor, n, f)
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if any(name.startswith(f) for f in self.FORBIDDEN):
            raise AssertionError(f"host read or data-dependent shape: {func}")
        if name == "index" and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1]):
            raise AssertionError(f"boolean-mask indexing: {func}")
        return func(*args, **(kwargs or {}))


@pytest.fixture
def no_host_reads():
    """The `NoHostReads` mode: `with no_host_reads(): ...` fails on any host read."""
    return NoHostReads


@pytest.fixture
def native_step_runs(monkeypatch):
    """A list that gains an entry each time a native decode step (`worldvla._C.DecodeStep`, the CPU
    engine's one-call step) runs during the test, alone or in a frame's native loop (a step a code)."""
    nb = pytest.importorskip("worldvla.ops.native_backend")
    runs, real, frame_loop = [], nb._C.DecodeStep, nb._C.decode_frame

    class Counted:
        def __init__(self, *args):
            self.step = real(*args)

        def run(self):
            runs.append(1)
            self.step.run()

    def counted_frame(one, two, rows, h, w, *rest):  # rest[-6:-4]: the call's codes [first, last)
        runs.extend([1] * (rest[-5] - rest[-6]))
        return frame_loop(one.step, two.step, rows, h, w, *rest)

    monkeypatch.setattr(nb._C, "DecodeStep", Counted)
    monkeypatch.setattr(nb._C, "decode_frame", counted_frame)
    return runs


@pytest.fixture
def interrupt_cli():
    """interrupt_cli(args, ready) -> (exit code, stderr): runs `python -m worldvla.cli *args` in its own process
    group and, once `ready()` holds, sends SIGINT to the whole group, as a terminal's Ctrl-C does."""
    import signal
    import subprocess
    import time

    def run(args, ready, timeout=180):
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("WORLDVLA_TRACEBACK", None)
        # SIGINT as a terminal's shell leaves it: a test run started in the background of a non-interactive shell
        # ignores SIGINT, its children inherit that, and Python then keeps ignoring it (no Ctrl-C to test).
        proc = subprocess.Popen([sys.executable, "-m", "worldvla.cli", *map(str, args)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=env, start_new_session=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        try:
            deadline = time.time() + timeout
            while not ready():
                if proc.poll() is not None or time.time() >= deadline:
                    if proc.poll() is None:  # not ready in time: stopped, so that its output can be read
                        os.killpg(proc.pid, signal.SIGKILL)
                    out, err = proc.communicate(timeout=60)
                    raise AssertionError(f"{args}: not ready after {timeout} s or ended (exit code "
                                         f"{proc.returncode})\n{out}\n{err}")
                time.sleep(0.1)
            os.killpg(proc.pid, signal.SIGINT)
            _, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        return proc.returncode, err

    return run
