"""The benchmark tools around the kernels: the static SASS report (benchmarks/sass.py: finding the CUDA tools,
reading ptxas and cuobjdump output, the rows, the nvcc version, the printed table and the written report) and the
sanitizer program (benchmarks/sanitize.py: the per-op checks, gap_check, the engine wrapper, which checks run and
the exit code). Everything here runs without a GPU and, but where a test says so, without nvcc."""
from __future__ import annotations

import json
import sys
import subprocess
from pathlib import Path

import pytest
import torch

CPU = torch.device("cpu")


# ------------------------------------------------------------------ sanitize: gap_check
def test_gap_check_allows_twice_torchs_gap_and_no_more():
    """A pick may lose at most twice the score torch's own pick loses: exactly twice passes, more fails."""
    from worldvla.benchmarks import sanitize

    scores = torch.tensor([[10.0, 9.0, 8.0, 7.5]], dtype=torch.float64)  # torch picks column 1: a gap of 1
    torch_pick = torch.tensor([1])
    ok, msg = sanitize.gap_check(torch.tensor([2]), scores, torch_pick)  # a gap of 2 = 2 x 1
    assert ok is True and msg == "gap 2 <= 2 x 1"
    ok, msg = sanitize.gap_check(torch.tensor([3]), scores, torch_pick)  # 2.5 > 2 x 1
    assert ok is False and msg == "gap 2.5 <= 2 x 1"


# ------------------------------------------------------------------ sanitize: the engine wrapper
class _Engines:
    """A stand-in for the extension's prefill-engine switch: which engines each GPU lists, and every switch."""

    def __init__(self, listed):
        self.listed, self.asked, self.set = listed, [], []

    def prefill_engines(self, dev):
        self.asked.append(dev)
        return self.listed

    def set_cuda_prefill_engine(self, engine):
        self.set.append(engine)


@pytest.fixture
def engines(monkeypatch):
    nb = pytest.importorskip("worldvla.ops.native_backend")

    fake = _Engines(["mma", "wgmma"])
    monkeypatch.setattr(nb, "prefill_engines", fake.prefill_engines)
    monkeypatch.setattr(nb, "_C", fake)
    return fake


def test_with_engine_runs_the_check_on_that_engine_then_sets_auto_back(engines):
    """The check runs with its engine set, and the automatic choice is set back after it, also when it raises."""
    from worldvla.benchmarks import sanitize

    seen = []

    def check(backend, dev, g):
        seen.append((backend, dev, list(engines.set)))
        return True, "fine"

    assert sanitize.with_engine(check, "wgmma")("native", torch.device("cuda", 1), None) == (True, "fine")
    assert seen == [("native", torch.device("cuda", 1), ["wgmma"])] and engines.set == ["wgmma", "auto"]
    assert engines.asked == [1]

    def broken(backend, dev, g):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    engines.set.clear()
    with pytest.raises(RuntimeError, match="illegal memory access"):
        sanitize.with_engine(broken, "wgmma")("native", torch.device("cuda", 0), None)
    assert engines.set == ["wgmma", "auto"]


def test_with_engine_asks_the_current_gpu_for_a_device_without_index(engines, monkeypatch):
    """`cuda` without an index is the current GPU: its engines are the ones asked for, not GPU 0's."""
    from worldvla.benchmarks import sanitize

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 2)
    assert sanitize.with_engine(lambda b, d, g: (True, "fine"), "wgmma")("native", torch.device("cuda"), None)[0]
    assert engines.asked == [2]


def test_with_engine_without_that_engine_is_a_skip_not_a_failure(engines):
    """A GPU or build without the engine skips the check (None, saying which engine) and switches nothing."""
    from worldvla.benchmarks import sanitize

    def check(backend, dev, g):
        raise AssertionError("not to be run")

    assert sanitize.with_engine(check, "wgmma128")("native", torch.device("cuda", 0), None) == (
        None, "no wgmma128 engine on this GPU or build")
    assert engines.set == []


# ------------------------------------------------------------------ sanitize: run's choice of checks
@pytest.fixture
def recorded(monkeypatch):
    """Every check replaced by one that records its name and arguments and passes (the native backend built)."""
    from worldvla.benchmarks import sanitize

    pytest.importorskip("worldvla.ops.native_backend")

    calls = []
    for name, (op, _) in list(sanitize.CHECKS.items()):
        def check(backend, dev, g, name=name):
            calls.append((name, backend, dev))
            return True, "fine"
        monkeypatch.setitem(sanitize.CHECKS, name, (op, check))
    return calls


@pytest.mark.parametrize("only, expected", [
    ("3 splits", ["decode_attention 3 splits"]),
    ("fp16", ["masked_attention padded fp16 D=128"]),
    ("decode", ["decode_attention bf16 D=128 GQA", "decode_attention 3 splits"]),
])
def test_run_only_keeps_the_checks_whose_name_contains_the_text(recorded, capsys, only, expected):
    """--only matches anywhere in a check's name, not only at its start."""
    from worldvla.benchmarks import sanitize

    assert sanitize.run("native", "cpu", only=only) == 0
    assert [name for name, _, _ in recorded] == expected
    out = capsys.readouterr().out
    assert out.count("\nok    ") == len(expected) and "sanitize: all passed" in out


def test_run_skips_per_backend_and_device(recorded, capsys):
    """On the CPU: native skips the gradient checks, triton the native-only forced-split one; both skip the CUDA
    engines', each skip saying why."""
    from worldvla.benchmarks import sanitize

    pytest.importorskip("triton")

    assert sanitize.run("native", "cpu") == 0
    assert [n for n, _, _ in recorded] == [n for n in sanitize.CHECKS
                                          if n not in sanitize.NEEDS_GRAD | sanitize.CUDA_ONLY | sanitize.TRITON_ONLY]
    out = capsys.readouterr().out
    assert "skip  masked_attention backward bf16: not on the native backend" in out
    assert "skip  decode_attention bf16 D=80, below the tile: not on the native backend" in out
    assert "skip  masked_attention padded fp16 D=128, wgmma: CUDA only" in out

    recorded.clear()
    assert sanitize.run("triton", "cpu") == 0
    assert [n for n, _, _ in recorded] == [n for n in sanitize.CHECKS if n not in sanitize.NATIVE_ONLY]
    assert set(sanitize.TRITON_ONLY) <= {n for n, _, _ in recorded}  # the tile-edge sizes run on Triton
    assert {b for _, b, _ in recorded} == {"triton"}
    assert "skip  decode_attention 3 splits: not on the triton backend" in capsys.readouterr().out


def test_run_without_a_device_on_a_cpu_only_machine_uses_the_cpu(recorded, monkeypatch, capsys):
    from worldvla.benchmarks import sanitize

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert sanitize.run("native", only="vq_gather") == 0
    assert recorded == [("vq_gather fp32", "native", CPU)]
    assert "sanitize: backend native on cpu" in capsys.readouterr().out


def test_run_a_check_that_raises_any_error_fails_and_the_next_still_runs(recorded, monkeypatch, capsys):
    """Not only RuntimeError: a ValueError or IndexError from a kernel's wrapper is a failed check, named with its
    type, and the checks after it run."""
    from worldvla.benchmarks import sanitize

    def wrong_shape(backend, dev, g):
        raise ValueError("index out of range for the codebook")

    monkeypatch.setitem(sanitize.CHECKS, "vq_quantize fp32", ("vq_quantize", wrong_shape))
    assert sanitize.run("native", "cpu", only="vq_") == 1
    out = capsys.readouterr().out
    assert "FAIL  vq_quantize fp32: ValueError: index out of range for the codebook" in out
    assert [n for n, _, _ in recorded] == ["vq_gather fp32"] and "sanitize: 1 failed" in out


def test_run_a_skipping_check_neither_passes_nor_fails(recorded, monkeypatch, capsys):
    """A check that skips itself is neither a pass nor a failure: beside one that ran, all passed; alone, nothing
    ran, which is no pass either (exit 2)."""
    from worldvla.benchmarks import sanitize

    monkeypatch.setitem(sanitize.CHECKS, "vq_gather fp32", ("vq_gather", lambda b, d, g: (None, "no such engine")))
    assert sanitize.run("native", "cpu", only="vq_") == 0
    out = capsys.readouterr().out
    assert "skip  vq_gather fp32: no such engine" in out and out.count("ok    ") == 1
    assert "sanitize: all passed (1 check, 3 skipped)" in out  # and the two tile-edge sizes, Triton's only
    assert sanitize.run("native", "cpu", only="vq_gather") == 2
    out = capsys.readouterr().out
    assert "skip  vq_gather fp32: no such engine" in out and "ok    " not in out and "all passed" not in out


@pytest.mark.parametrize("only", ["decode_attention bf16x", "masked_attention padded fp16 D=128, wgmma"])
def test_run_where_no_check_runs_says_so_and_exits_2(recorded, capsys, only):
    """--only that names no check, or only checks this backend and device skip, launches no kernel: that is not
    "all passed" (a smoke check under a renamed check would pass without running), but exit 2 naming the cause."""
    from worldvla.benchmarks import sanitize

    assert sanitize.run("native", "cpu", only=only) == 2
    out = capsys.readouterr().out
    assert recorded == [] and "all passed" not in out
    assert f"sanitize: nothing ran: no check whose name contains {only!r} ran on the native backend on cpu" in out


# ------------------------------------------------------------------ sanitize: main's arguments
def test_main_passes_backend_device_and_only_and_exits_with_runs_code(monkeypatch):
    from worldvla.benchmarks import sanitize

    seen = []
    monkeypatch.setattr(sanitize, "run", lambda *a: seen.append(a) or 1)
    with pytest.raises(SystemExit) as exit_:
        sanitize.main(["--backend", "triton", "--device", "cpu", "--only", "vq_"])
    assert exit_.value.code == 1 and seen == [("triton", "cpu", "vq_")]
    seen.clear()
    with pytest.raises(SystemExit) as exit_:
        sanitize.main([])
    assert exit_.value.code == 1 and seen == [("native", None, None)]
    with pytest.raises(SystemExit) as exit_:  # only the two backends whose kernels it launches
        sanitize.main(["--backend", "torch"])
    assert exit_.value.code == 2 and not seen[1:]


# ------------------------------------------------------------------ sanitize: the checks themselves
@pytest.mark.parametrize("offset", [-1, 0])
def test_sample_check_fails_a_token_outside_the_range(monkeypatch, offset):
    """A sampled id at hi (the range's end, excluded) or below lo fails, naming the range."""
    from worldvla.benchmarks import sanitize

    lo, hi = 300, 556
    bad = lo - 1 if offset < 0 else hi
    monkeypatch.setattr(sanitize.ops, "constrained_sample",
                        lambda h, w, lo, hi, backend, **kw: torch.full((h.shape[0],), bad, dtype=torch.long))
    ok, msg = sanitize.check_sample("torch", CPU, torch.Generator().manual_seed(0))
    assert ok is False and msg.startswith(f"tokens outside [{lo}, {hi}): [{bad},")


def test_forced_split_decode_check_asks_for_three_splits(monkeypatch):
    """The `decode_attention 3 splits` check runs the native split-KV decode with the split count forced to 3."""
    from worldvla.benchmarks import sanitize

    native_backend = pytest.importorskip("worldvla.ops.native_backend")
    real, splits = native_backend.decode_attention, []

    def decode(*a, **kw):
        splits.append(kw.get("n_splits"))
        return real(*a, **kw)

    monkeypatch.setattr(native_backend, "decode_attention", decode)
    ok, msg = sanitize.CHECKS["decode_attention 3 splits"][1]("native", CPU, torch.Generator().manual_seed(0))
    assert ok is True and splits == [3], msg


# ------------------------------------------------------------------ sass: finding the CUDA tools
def _tool(folder: Path, name: str, executable: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text("#!/bin/sh\n")
    path.chmod(0o755 if executable else 0o644)
    return path


def _bundled(monkeypatch, tmp_path) -> Path:
    """A stand-in Triton whose bundled CUDA tools are in <tmp>/triton/backends/nvidia/bin."""
    import types

    triton = types.ModuleType("triton")
    triton.__file__ = str(tmp_path / "triton" / "__init__.py")
    monkeypatch.setitem(sys.modules, "triton", triton)
    return tmp_path / "triton" / "backends" / "nvidia" / "bin"


def test_find_tool_takes_only_executables(monkeypatch, tmp_path):
    """A file of the tool's name beside nvcc that cannot be run is not the tool."""
    from worldvla.benchmarks import sass

    _tool(tmp_path / "bin", "nvcc")
    _tool(tmp_path / "bin", "wvla-tool", executable=False)
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    _bundled(monkeypatch, tmp_path)
    assert sass.find_tool("nvcc") == str(tmp_path / "bin" / "nvcc")
    assert sass.find_tool("wvla-tool") is None


def test_find_tool_prefers_path_over_tritons_bundled_copy(monkeypatch, tmp_path):
    """The tool on PATH comes first; Triton's bundled copy is the last resort, found when nothing else is."""
    from worldvla.benchmarks import sass

    bundled = _tool(_bundled(monkeypatch, tmp_path), "wvla-tool")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert sass.find_tool("wvla-tool") == str(bundled)
    on_path = _tool(tmp_path / "bin", "wvla-tool")
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    assert sass.find_tool("wvla-tool") == str(on_path)


# ------------------------------------------------------------------ sass: the nvcc version
NVCC_VERSION = """\
nvcc: NVIDIA (R) Cuda compiler driver
Copyright (c) 2005-2025 NVIDIA Corporation
Built on Wed_Aug_20_01:58:59_PM_PDT_2025
Cuda compilation tools, release 13.0, V13.0.88
Build cuda_13.0.r13.0/compiler.36424714_0
"""


def test_nvcc_version_is_the_release_number(monkeypatch):
    """The release (13.0), not the build's V13.0.88; output without a release line gives its last line; no nvcc,
    no version and nothing run."""
    from worldvla.benchmarks import sass

    outputs, ran = [NVCC_VERSION, "some nvcc\nbuild 42\n"], []

    def fake_run(cmd, *a, **kw):
        ran.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, outputs.pop(0), "")

    monkeypatch.setattr(sass, "find_tool", lambda name: f"/opt/cuda/bin/{name}")
    monkeypatch.setattr(sass.subprocess, "run", fake_run)
    assert sass.nvcc_version() == "13.0" and ran == [["/opt/cuda/bin/nvcc", "--version"]]
    assert sass.nvcc_version() == "build 42"
    monkeypatch.setattr(sass, "find_tool", lambda name: None)
    assert sass.nvcc_version() is None and len(ran) == 2


# ------------------------------------------------------------------ sass: the report's rows from the tools' output
FAKE_PTXAS = """\
ptxas info    : Compiling entry function '_ZN8worldvla12_GLOBAL__N_13fooEPf' for 'sm_80'
ptxas info    : Function properties for _ZN8worldvla12_GLOBAL__N_13fooEPf
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 40 registers, 2048 bytes smem, 380 bytes cmem[0]
ptxas info    : Compiling entry function '_Z3barPf' for 'sm_80'
ptxas info    : Function properties for _Z3barPf
    8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 12 registers, 360 bytes cmem[0]
"""

FAKE_SASS = """\
\t\tFunction : _ZN8worldvla12_GLOBAL__N_13fooEPf
        /*0000*/                   HMMA.16816.F32 R12, R8, R4, R12 ;
        /*0010*/               @P0 BRA 0x0 ;
        /*0020*/                   EXIT ;
"""


def _fake_tools(monkeypatch, nvcc_rc=0, nvcc_stderr=FAKE_PTXAS, cuobjdump_rc=0, cuobjdump_stderr=""):
    """nvcc and cuobjdump stand-ins answering with the given ptxas log and FAKE_SASS (or cuobjdump's exit code and
    error); every command recorded."""
    from worldvla.benchmarks import sass

    real, ran = subprocess.run, []

    def fake_run(cmd, *a, **kw):
        ran.append(cmd)
        if cmd[0].endswith("/nvcc"):
            return subprocess.CompletedProcess(cmd, nvcc_rc, "", nvcc_stderr)
        if cmd[0].endswith("/cuobjdump"):
            if cuobjdump_rc and kw.get("check"):
                raise subprocess.CalledProcessError(cuobjdump_rc, cmd, "", cuobjdump_stderr)
            return subprocess.CompletedProcess(cmd, cuobjdump_rc, "" if cuobjdump_rc else FAKE_SASS, cuobjdump_stderr)
        return real(cmd, *a, **kw)  # c++filt

    monkeypatch.setattr(sass, "find_tool", lambda name: f"/opt/cuda/bin/{name}")
    monkeypatch.setattr(sass.subprocess, "run", fake_run)
    return ran


def test_report_compiles_for_the_arch_and_joins_ptxas_and_sass_per_kernel(monkeypatch, tmp_path):
    """One row per kernel ptxas compiled, named readably, with its SASS counts where the dump has the kernel and
    its ptxas figures alone where not; nvcc compiles for the asked architecture with ptxas' report on."""
    import shutil

    from worldvla.benchmarks import sass

    if not shutil.which("c++filt"):
        pytest.skip("needs c++filt")
    ran = _fake_tools(monkeypatch)
    src = tmp_path / "csrc" / "cuda" / "k.cu"
    rows = sass.report([src], "sm_80")
    nvcc = ran[0]
    assert nvcc[0] == "/opt/cuda/bin/nvcc" and "-gencode=arch=compute_80,code=sm_80" in nvcc
    assert nvcc[nvcc.index("-Xptxas") + 1] == "-v" and nvcc[nvcc.index("-c") + 1] == str(src)
    obj = nvcc[nvcc.index("-o") + 1]
    assert Path(obj).name == "k.o" and ran[1] == ["/opt/cuda/bin/cuobjdump", "--dump-sass", obj]
    bar, foo = rows  # by mangled name: _Z3barPf before _ZN8worldvla...
    assert bar == {"file": "k.cu", "kernel": "bar", "stack_bytes": 8, "spill_store_bytes": 4, "spill_load_bytes": 4,
                   "registers": 12, "smem_bytes": 0}
    assert (foo["file"], foo["kernel"], foo["registers"], foo["smem_bytes"]) == ("k.cu", "foo", 40, 2048)
    assert (foo["sass_instructions"], foo["hmma"], foo["hot_loop_hmma"], foo["instructions_per_hmma"]) == (3, 1, 1, 2.0)


def test_report_of_a_file_nvcc_refuses_gives_nvccs_error(monkeypatch, tmp_path):
    from worldvla.benchmarks import sass

    _fake_tools(monkeypatch, nvcc_rc=1, nvcc_stderr="k.cu(3): error: identifier \"x\" is undefined\n")
    with pytest.raises(RuntimeError, match='nvcc failed on k.cu:\nk.cu\\(3\\): error: identifier "x" is undefined'):
        sass.report([tmp_path / "k.cu"], "sm_80")


def test_a_cuobjdump_that_fails_is_an_error_with_its_own_message(monkeypatch, tmp_path, capsys):
    """cuobjdump refusing the object (a toolkit older than the architecture asked for) gives its error, as nvcc's
    does, and `main` reports it as an error (exit 2), not with a traceback."""
    from worldvla.benchmarks import sass

    _fake_tools(monkeypatch, cuobjdump_rc=1, cuobjdump_stderr="cuobjdump fatal   : unknown architecture sm_120\n")
    with pytest.raises(RuntimeError, match="^cuobjdump failed on k.o:\ncuobjdump fatal   : unknown architecture sm_120"):
        sass.report([tmp_path / "k.cu"], "sm_80")
    assert sass.main([str(tmp_path / "k.cu"), "--arch", "sm_80", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cuobjdump failed on k.o:\n") and "unknown architecture sm_120" in err


def test_report_needs_nvcc_too(monkeypatch, tmp_path):
    """cuobjdump alone (Triton's bundle) cannot compile: the report is unavailable, naming what it found."""
    from worldvla.benchmarks import sass

    monkeypatch.setattr(sass, "find_tool", lambda name: "/opt/triton/bin/cuobjdump" if name == "cuobjdump" else None)
    with pytest.raises(sass.Unavailable, match="found nvcc=None, cuobjdump=/opt/triton/bin/cuobjdump"):
        sass.report([tmp_path / "a.cu"])


# ------------------------------------------------------------------ sass: ptxas lines before any kernel
def test_parse_ptxas_ignores_figures_before_the_first_kernel():
    """ptxas prints properties of device functions before any entry function: they belong to no kernel."""
    from worldvla.benchmarks import sass

    log = ("ptxas info    : Function properties for _Z6helperv\n"
           "    24 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n"
           "ptxas info    : Used 8 registers\n"
           "ptxas info    : Compiling entry function '_Z1kv' for 'sm_90a'\n"
           "ptxas info    : Used 20 registers, 1024 bytes smem\n")
    assert sass.parse_ptxas(log) == {"_Z1kv": {"registers": 20, "smem_bytes": 1024}}


# ------------------------------------------------------------------ sass: the printed table
def test_print_rows_truncates_long_kernel_names_and_dashes_missing_figures(capsys):
    from worldvla.benchmarks import sass

    long = "masked_attention_fwd_kernel<__nv_bfloat16, 128, 64, 64, 1, true, false, 0>"
    sass.print_rows([{"kernel": long, "registers": 168, "smem_bytes": 49152, "spill_store_bytes": 0,
                      "hot_loop_instructions": 300, "hot_loop_hmma": 64, "instructions_per_hmma": 4.69}])
    head, row = capsys.readouterr().out.splitlines()
    assert head.split() == ["kernel", "regs", "smem", "spill", "loop", "HMMA", "/HMMA", "HGMMA", "/HGMMA"]
    assert row == "  ".join([long[:58], "168  ", "49152  ", "0     ", "300   ", "64   ", "4.69  ", "-    ", "-     "])
    assert len(row) == len(head)


# ------------------------------------------------------------------ sass: run and main
def test_run_reports_and_names_the_file_for_the_asked_arch(monkeypatch, tmp_path):
    from worldvla.benchmarks import sass

    asked = []
    monkeypatch.setattr(sass, "report", lambda files, arch="sm_90a": asked.append((files, arch)) or [
        {"file": "a.cu", "kernel": "k"}])
    monkeypatch.setattr(sass, "nvcc_version", lambda: "13.0")
    path = sass.run(out_dir=tmp_path, files=["a.cu"], arch="sm_80")
    assert path == tmp_path / "sass-sm_80.json" and asked == [([Path("a.cu")], "sm_80")]
    doc = json.loads(path.read_text())
    assert (doc["benchmark"], doc["arch"], doc["nvcc"], doc["rows"]) == ("sass", "sm_80", "13.0",
                                                                         [{"file": "a.cu", "kernel": "k"}])


def test_main_passes_its_arguments_and_exits_2_on_an_error(monkeypatch, tmp_path, capsys):
    from worldvla.benchmarks import sass

    seen = []

    def run(**kw):
        seen.append(kw)
        return tmp_path / "sass-sm_80.json"

    monkeypatch.setattr(sass, "run", run)
    assert sass.main(["a.cu", "b.cu", "--arch", "sm_80", "--out", str(tmp_path)]) == 0
    assert seen == [{"out_dir": str(tmp_path), "files": ["a.cu", "b.cu"], "arch": "sm_80"}]
    assert capsys.readouterr().out.strip() == str(tmp_path / "sass-sm_80.json")
    assert sass.main([]) == 0 and seen[1] == {"out_dir": "benchmarks/results", "files": None, "arch": "sm_90a"}

    def unavailable(**kw):
        raise sass.Unavailable("the static report needs nvcc and cuobjdump")

    monkeypatch.setattr(sass, "run", unavailable)
    capsys.readouterr()
    assert sass.main([]) == 2
    out, err = capsys.readouterr()
    assert err == "error: the static report needs nvcc and cuobjdump\n" and out == ""
