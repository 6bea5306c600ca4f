"""`worldvla info`'s report of the installation and the CPU, `worldvla bench`'s choice of benchmarks and modules,
and the device and dtype names a user may give (devices.torch_device / torch_dtype)."""
import argparse
import importlib
import platform
import sys
import types

import pytest
import torch

from worldvla.cli import main


# ---------------------------------------------------------------------- info
def test_info_reports_the_versions_and_the_cpu_it_runs_on(monkeypatch, capsys):
    """The report names worldvla's, Python's and torch's versions, and the CPU's vendor, torch's intra-op threads
    (the ones an op runs on, not the inter-op pool) and the vector width torch's kernels were picked for."""
    import worldvla
    from worldvla import info
    from worldvla.ops import dispatch

    monkeypatch.setattr(torch, "get_num_threads", lambda: 7)
    monkeypatch.setattr(torch, "get_num_interop_threads", lambda: 3)
    monkeypatch.setattr(dispatch, "cpu_vendor", lambda: "GenuineIntel")
    monkeypatch.setattr(dispatch, "cpu_capability", lambda: "AVX512")
    report = info.collect()
    assert (report["worldvla"], report["python"], report["torch"]) == (
        worldvla.__version__, platform.python_version(), torch.__version__)
    assert report["cpu"] == {"threads": 7, "torch_capability": "AVX512", "vendor": "GenuineIntel"}
    assert info.run(argparse.Namespace(json=False)) == 0
    out = capsys.readouterr().out
    assert f"worldvla {worldvla.__version__}  python {platform.python_version()}  torch {torch.__version__}  " in out
    assert "CPU: GenuineIntel, 7 threads, torch kernels at AVX512\n" in out


def test_info_says_when_the_cpu_vendor_is_unknown(monkeypatch, capsys):
    """A CPU whose vendor cannot be read is said to be of an unknown vendor, not printed as "None"."""
    from worldvla import info
    from worldvla.ops import dispatch

    monkeypatch.setattr(dispatch, "cpu_vendor", lambda: None)
    assert info.collect()["cpu"]["vendor"] is None
    assert info.run(argparse.Namespace(json=False)) == 0
    out = capsys.readouterr().out
    assert "CPU: vendor unknown, " in out and "None" not in out.splitlines()[1]


# ---------------------------------------------------------------------- bench
def test_bench_refuses_an_empty_device_name_before_any_benchmark_runs(monkeypatch, capsys, tmp_path):
    """`bench --device "$DEV"` with DEV unset is one error line (exit 2), not a run of every benchmark on the
    default device."""
    runs = []
    monkeypatch.setitem(sys.modules, "worldvla.benchmarks.vq", types.SimpleNamespace(
        run=lambda quick, device, out_dir: runs.append(device) or f"{out_dir}/vq.json"))
    monkeypatch.delenv("WORLDVLA_TRACEBACK", raising=False)
    assert main(["bench", "vq", "--device", "", "--out", str(tmp_path)]) == 2
    assert "unknown device '' (--device)" in capsys.readouterr().err and runs == []


def test_a_package_without_its_benchmarks_takes_them_from_the_checkout(monkeypatch):
    """An install whose package has no `worldvla.benchmarks` at all (the folder left out of it) runs the source
    checkout's benchmarks/<name>.py; a module missing inside a benchmark is still that benchmark's own error."""
    from worldvla import bench

    real = importlib.import_module
    missing = "worldvla.benchmarks"

    def import_module(name, *a, **kw):
        if name.startswith("worldvla.benchmarks."):
            raise ModuleNotFoundError(f"No module named {missing!r}", name=missing)
        return real(name, *a, **kw)

    here = types.ModuleType("benchmarks.vq")
    monkeypatch.setitem(sys.modules, "benchmarks.vq", here)
    monkeypatch.setattr(importlib, "import_module", import_module)
    assert bench.benchmark_module("vq") is here
    missing = "msgpack"
    with pytest.raises(ModuleNotFoundError, match="msgpack"):
        bench.benchmark_module("vq")


def test_a_run_of_failed_and_skipped_benchmarks_is_a_failure_not_nothing_ran(monkeypatch, capsys, tmp_path):
    """One benchmark that failed beside one that cannot run here: exit 1, and no "nothing ran" line saying every
    benchmark asked for was skipped."""
    class Unavailable(RuntimeError):
        pass

    def stand_in(error):
        def run(quick, device, out_dir):
            raise error
        return types.SimpleNamespace(run=run, Unavailable=Unavailable)

    monkeypatch.setitem(sys.modules, "worldvla.benchmarks.vq", stand_in(RuntimeError("wrong answer")))
    monkeypatch.setitem(sys.modules, "worldvla.benchmarks.sass", stand_in(Unavailable("no nvcc")))
    assert main(["bench", "vq", "sass", "--out", str(tmp_path)]) == 1
    out, err = capsys.readouterr()
    assert "!! vq failed: RuntimeError: wrong answer" in out and "-- sass skipped: no nvcc" in out
    assert "nothing ran" not in err


# ---------------------------------------------------------------------- devices
def test_every_dtype_name_gives_its_own_dtype():
    """Each name the command lines' --dtype offers, long and short, is the dtype it names."""
    from worldvla.devices import DTYPES, torch_dtype

    want = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
            "float16": torch.float16, "fp16": torch.float16}
    assert DTYPES == want
    for name, dtype in want.items():
        assert torch_dtype(name) is dtype and torch_dtype(name.upper()) is dtype and torch_dtype(dtype) is dtype


def test_an_unknown_device_name_is_refused_without_torchs_own_error_chained():
    """A Python caller's traceback for `device="gpu"` is the one ValueError naming the choices, not torch's parse
    error followed by "During handling of the above exception"."""
    from worldvla.devices import torch_device

    for name in ("gpu", 3.5):
        with pytest.raises(ValueError, match="unknown device") as e:
            torch_device(name)
        assert e.value.__cause__ is None and e.value.__suppress_context__


def test_info_reports_the_triton_version_installed(monkeypatch, capsys):
    """With Triton installed, the report and its first line give Triton's version."""
    from worldvla import info

    fake = types.ModuleType("triton")
    fake.__version__ = "3.1.0"
    monkeypatch.setitem(sys.modules, "triton", fake)
    assert info.collect()["triton"] == "3.1.0"
    assert info.run(argparse.Namespace(json=False)) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.endswith("  triton 3.1.0") and "not installed" not in first


def test_info_reports_an_extension_that_fails_to_load_with_the_loaders_error(monkeypatch, capsys):
    """An extension that is there but fails to load (built against another torch: an undefined symbol) raises an
    ImportError, not a missing module's error: the report says it is not importable, with the loader's message,
    instead of failing."""
    import importlib.abc

    import worldvla
    from worldvla import info

    message = "worldvla/_C.so: undefined symbol: _ZN3c106detail14torchCheckFail"

    class Broken(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "worldvla._C":
                raise ImportError(message)
            return None

    monkeypatch.delattr(worldvla, "_C", raising=False)
    monkeypatch.delitem(sys.modules, "worldvla._C", raising=False)
    monkeypatch.setattr(sys, "meta_path", [Broken(), *sys.meta_path])
    report = info.collect()
    assert report["native"] == {"missing": message}
    assert info.run(argparse.Namespace(json=False)) == 0
    assert f"native extension: not importable ({message}); every op runs in torch or Triton" in \
        capsys.readouterr().out
