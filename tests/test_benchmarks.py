"""CPU-sized benchmark cases under pytest-benchmark, a smoke run of the benchmark harness, and the
input rotation that keeps GPU timings out of L2."""
import importlib
import importlib.util
import json
import math
import os

import pytest
import torch

from worldvla import chunk_mask_meta, ops
from worldvla.benchmarks import common

needs_pytest_benchmark = pytest.mark.skipif(importlib.util.find_spec("pytest_benchmark") is None,
                                            reason="needs pytest-benchmark")


@needs_pytest_benchmark
def test_bench_chunk_mask_meta(benchmark):
    from worldvla.benchmarks.attention import LAYOUT, packed_batch

    ids, meta = packed_batch(256, 2000, torch.Generator().manual_seed(0))
    cu = meta.cu_seqlens
    out = benchmark(chunk_mask_meta, ids, LAYOUT, cu)
    assert torch.equal(out.kv_block, meta.kv_block)


@needs_pytest_benchmark
def test_bench_masked_attention_torch(benchmark):
    from worldvla.benchmarks.attention import packed_batch

    ids, meta = packed_batch(256, 650, torch.Generator().manual_seed(1))
    q, k, v = (torch.randn(ids.numel(), 2, 64) for _ in range(3))
    out = benchmark(ops.masked_attention, q, k, v, meta, None, "torch")
    ref = ops.masked_attention_ref(q.double(), k.double(), v.double(), meta)
    assert (out.double() - ref).abs().max() < 1e-4


def test_harness_writes_results(tmp_path):
    from worldvla.benchmarks import vq

    path = vq.run(quick=True, device="cpu", out_dir=tmp_path)
    assert path.name == f"vq_quantize-{common.device_name('cpu')}-quick.json"  # never over a full run's file
    doc = json.loads(path.read_text())
    assert doc["device"].startswith("cpu") and doc["torch"] and doc["date"] and doc["quick"] is True
    assert "l2_cache_bytes" in doc and doc["l2_cache_bytes"] is None
    assert all(r["argmin_agreement"] == 1.0 for r in doc["rows"])
    llc = common.cpu_last_level_cache()
    assert (doc["cpu_cache"], doc["cpu_cache_bytes"]) == (llc or (None, None))
    for r in doc["rows"]:  # CPU inputs rotate past the last-level cache, within the quick budget
        set_bytes = (r["N"] + r["K"]) * r["C"] * 4
        assert r["set_bytes"] == set_bytes and r["cache_bytes"] == (llc and llc[1])
        if llc is None:
            assert r["rotated_sets"] == 1 and r["inputs_rotated"] is False and r["inputs_cache_hot"] is None
            continue
        n = common.rotation_count(set_bytes, "cpu", new_bytes=set_bytes, quick=True)
        assert r["rotated_sets"] == n and r["inputs_rotated"] == (n > 1) and r["cache"] == llc[0]
        assert r["inputs_cache_hot"] == (n * set_bytes <= llc[1])
    assert path.with_suffix(".png").is_file()


def test_quick_results_take_their_own_name(tmp_path):
    full = common.write_results("demo", [{"x": 1, "y": 2.0, "g": "a"}], "cpu", tmp_path)
    quick = common.write_results("demo", [{"x": 1, "y": 3.0, "g": "a"}], "cpu", tmp_path, quick=True,
                                 plot=("x", "y", "g"))
    assert quick != full and quick.name == full.name.replace(".json", "-quick.json")
    assert json.loads(full.read_text())["rows"][0]["y"] == 2.0 and json.loads(full.read_text())["quick"] is False
    assert json.loads(quick.read_text())["quick"] is True and quick.with_suffix(".png").is_file()


def test_vq_baseline_reads_fp32_copies_made_with_each_set():
    from worldvla.benchmarks.vq import make_inputs

    z, cb, z32, cb32 = make_inputs(8, 16, 4, torch.bfloat16, "cpu")(0)
    assert z.dtype == cb.dtype == torch.bfloat16 and z32.dtype == cb32.dtype == torch.float32
    assert torch.equal(z32, z.float()) and torch.equal(cb32, cb.float())
    z, cb, z32, cb32 = make_inputs(8, 16, 4, torch.float32, "cpu")(0)
    assert z32 is z and cb32 is cb  # fp32: no copies


# ------------------------------------------------------------------ input rotation
@pytest.fixture
def fake_l2(monkeypatch):
    """Pretend the device has an L2 of `size` bytes (CPU tensors, so the count logic runs here)."""
    def set_size(size):
        monkeypatch.setattr(common, "cache_info", lambda device="cpu": ("L2", size))
        return size
    return set_size


def test_cpu_ops_compares_both_sides_of_every_case(tmp_path):
    C = pytest.importorskip("worldvla._C")
    from worldvla.benchmarks import cpu_ops

    doc = json.loads(cpu_ops.run(quick=True, out_dir=tmp_path).read_text())
    cases = {(r["op"], r["case"]) for r in doc["rows"]}
    assert {op for op, _ in cases} == {"masked_attention", "decode_attention", "constrained_sample", "vq_quantize",
                                       "vq_gather", "linear", "decoder_layer"}
    for op, case in cases:
        impls = {r["impl"]: r for r in doc["rows"] if (r["op"], r["case"]) == (op, case)}
        follows_width = op not in ("decode_attention", "vq_gather")  # decode is 8 wide everywhere
        wide = {"worldvla-native-w8"} if C.cpu_vector_width() == 16 and follows_width else set()
        assert set(impls) == {"worldvla-torch", "worldvla-native"} | wide, (op, case)
        assert all(r["median_ms"] > 0 for r in impls.values())
        assert impls["worldvla-torch"]["speedup_vs_torch"] == 1.0
    assert list(tmp_path.glob("cpu_ops-*.png")) and doc["cpu_vector_width"] == C.cpu_vector_width()
    with pytest.raises(ValueError, match="--device cpu"):
        cpu_ops.run(quick=True, device="cuda", out_dir=tmp_path)


def test_cpu_rotation_covers_the_last_level_cache(monkeypatch):
    """On the CPU the sets together cover 3x the last-level cache, within the budget (smaller for --quick);
    a rotation the budget cuts short says its inputs stay cache-hot; an unknown cache means one set."""
    llc = 1 << 20
    monkeypatch.setattr(common, "cpu_last_level_cache", lambda: ("L3", llc))
    assert common.cache_info("cpu") == ("L3", llc)
    rot = common.Rotation(lambda i: (torch.randn(64, 64),), "cpu")  # 16 KiB sets
    assert len(rot) == math.ceil(3 * llc / (64 * 64 * 4)) == 192
    info = rot.info()
    assert info == {"rotated_sets": 192, "set_bytes": 64 * 64 * 4, "inputs_rotated": True, "cache": "L3",
                    "cache_bytes": llc, "inputs_cache_hot": False}
    short = common.Rotation(lambda i: (torch.randn(64, 64),), "cpu", budget_bytes=10 * 64 * 64 * 4)
    assert len(short) == 10 and short.info()["inputs_cache_hot"] is True
    assert common.rotation_budget("cpu", quick=True) <= common.QUICK_ROTATION_BUDGET < common.ROTATION_BUDGET
    monkeypatch.setattr(common, "cpu_last_level_cache", lambda: None)
    one = common.Rotation(lambda i: (torch.randn(4, 4),), "cpu")
    assert len(one) == 1 and one.info()["inputs_rotated"] is False and one.info()["inputs_cache_hot"] is None


def test_cpu_last_level_cache_reads_sysfs():
    assert common._cache_size_bytes("491520K\n") == 480 << 20 and common._cache_size_bytes("32M") == 32 << 20
    if not os.path.exists("/sys/devices/system/cpu/cpu0/cache/index3/size"):
        pytest.skip("no L3 in sysfs here")
    level, size = common.cpu_last_level_cache()
    assert level == "L3" and size >= common._cache_size_bytes(
        open("/sys/devices/system/cpu/cpu0/cache/index3/size").read())


def test_rotation_count_covers_l2_within_the_budget(fake_l2):
    l2 = fake_l2(1 << 20)
    n = common.rotation_count(100_000, "cpu", budget_bytes=1 << 40)
    assert n == math.ceil(3 * l2 / 100_000) and (n - 1) * 100_000 < 3 * l2 <= n * 100_000
    assert common.rotation_count(100_000, "cpu", budget_bytes=450_000) == 4           # the memory cap
    assert common.rotation_count(100_000, "cpu", new_bytes=10_000, budget_bytes=450_000) == n
    assert common.rotation_count(100, "cpu", budget_bytes=1 << 40, max_sets=7) == 7
    assert common.rotation_count(10 * l2, "cpu", budget_bytes=1 << 40) == 1           # one set already exceeds L2


def test_cpu_ops_sides_take_their_own_sets_in_turning_order():
    """No side reads the set another side has just read (its data then in the cache), and no side always
    runs first: each call takes the next set, and the sides' order turns every round."""
    from benchmarks import cpu_ops

    Sets = _CountingSets

    calls = []
    fns = {name: (lambda i, name=name: calls.append((name, i))) for name in ("torch", "native", "native-w8")}
    med = cpu_ops.interleaved(fns, Sets(), warmup=2, repeats=6)
    assert set(med) == set(fns) and len(calls) == 3 * 8
    assert len({i for _, i in calls}) == len(calls)  # every call its own set
    firsts = [calls[3 * r][0] for r in range(8)]
    assert firsts[:3] == ["torch", "native", "native-w8"] and firsts[3:6] == firsts[:3]
    for r in range(8):  # each round runs every side once
        assert sorted(n for n, _ in calls[3 * r:3 * r + 3]) == sorted(fns)


def test_rotation_sets_are_distinct_fresh_and_timed_in_turn(fake_l2):
    l2 = fake_l2(8 << 10)
    calls = []
    rot = common.Rotation(lambda i: (torch.randn(16, 32), torch.randn(32)), "cpu", budget_bytes=1 << 30)
    set_bytes = (16 * 32 + 32) * 4
    assert rot.bytes_per_set == set_bytes == common.input_bytes(rot.sets[0])
    n = len(rot)
    assert n == math.ceil(3 * l2 / set_bytes) and n * set_bytes >= 3 * l2
    ptrs = {t.data_ptr() for s in rot.sets for t in s}
    assert len(ptrs) == 2 * n                                          # no set shares memory with another
    for a, b in zip(rot.sets, rot.sets[1:]):
        assert not torch.equal(a[0], b[0]) and not torch.equal(a[1], b[1])  # independent draws
    assert all(bool((t != 0).any()) for s in rot.sets for t in s)
    warmup, repeats = 3, 2 * n
    out = common.time_fn(lambda x, y: calls.append((x, y)), rotation=rot, warmup=warmup, repeats=repeats)
    assert len(calls) == warmup + repeats
    for i, (x, y) in enumerate(calls):                                 # each set in turn, wrapping around
        assert x is rot.sets[i % n][0] and y is rot.sets[i % n][1]
    assert out["rotated_sets"] == n and out["cache_bytes"] == l2 and out["set_bytes"] == set_bytes
    assert out["inputs_rotated"] is True and out["inputs_cache_hot"] is False and out["warmup"] == warmup
    assert out["repeats"] == repeats and out["p10_ms"] <= out["median_ms"] <= out["p90_ms"]


def test_rotation_respects_budget_and_explicit_count(fake_l2):
    fake_l2(1 << 20)
    rot = common.Rotation(lambda i: (torch.randn(64),), "cpu", budget_bytes=5 * 256)
    assert len(rot) == 5
    made = []
    rot = common.Rotation(lambda i: made.append(i) or (torch.full((3,), float(i + 1)),), "cpu", n=4, bytes_per_set=7)
    assert made == [0, 1, 2, 3] and len(rot) == 4 and rot.info()["set_bytes"] == 7
    assert [float(rot.next()[0][0]) for _ in range(6)] == [1, 2, 3, 4, 1, 2]
    with pytest.raises(ValueError, match="at least one"):
        common.Rotation(lambda i: (torch.randn(2),), "cpu", n=0)


def test_input_bytes_counts_shared_storage_once():
    base = torch.randn(10, 8)
    assert common.input_bytes((base, base[2:5], {"a": [base.t()]})) == base.numel() * 4
    assert common.input_bytes((torch.randn(3), torch.zeros(2, dtype=torch.int64), 1.5, None)) == 3 * 4 + 2 * 8


def test_sampling_lm_head_windows_put_each_range_in_distinct_memory():
    from worldvla.benchmarks.sampling import lm_head_windows

    V, R, Hd, n, lo = 40, 8, 4, 5, 16
    heads = lm_head_windows(V, Hd, R, n, "cpu", torch.float32)
    assert len(heads) == n and all(w.shape == (V, Hd) and w.is_contiguous() for w in heads)
    assert all(bool((w != 0).all()) for w in heads)
    starts = [w[lo:lo + R].data_ptr() for w in heads]
    assert all(b - a == R * Hd * 4 for a, b in zip(starts, starts[1:]))  # adjacent, never overlapping
    assert common.input_bytes(tuple(heads)) == (V + (n - 1) * R) * Hd * 4


def test_decode_case_rows_are_the_prefill_masks_rows():
    from worldvla.benchmarks.attention import LAYOUT, action_document, decode_meta

    for n_queries, batch in ((5, 2), (1, 1)):
        meta = decode_meta(64, n_queries, batch, torch.Generator().manual_seed(3))
        ids = torch.tensor(action_document(64, chunk=5, gen=torch.Generator().manual_seed(3)))
        full = chunk_mask_meta(ids, LAYOUT).dense_mask()
        rows = meta.q_pos[0].long()
        assert meta.kv_block.shape == (batch, ids.numel()) and meta.q_pos.shape == (batch, n_queries)
        assert torch.equal(meta.dense_mask(), full[rows].expand(batch, -1, -1))
        if n_queries > 1:  # parallel step 3: a bin of each action
            assert all(int(ids[r]) in range(*LAYOUT.bin_range) for r in rows.tolist())
        else:  # sequential: the chunk's last token
            assert int(ids[rows[0]]) == LAYOUT.eoa


# ------------------------------------------------------------------ sanitizer driver
def test_sanitize_driver_passes_on_cpu(capsys):
    from worldvla.benchmarks import sanitize

    assert sanitize.run("native", "cpu") == 0
    out = capsys.readouterr().out
    assert "all passed" in out and "FAIL" not in out
    assert out.count("\nok    ") == len(sanitize.CHECKS) - len(sanitize.NEEDS_GRAD | sanitize.CUDA_ONLY
                                                                  | sanitize.TRITON_ONLY)


def test_sanitize_tile_edge_checks_pass_on_triton(capsys):
    """The checks at sizes short of the Triton kernels' tiles (head dim 80, 40 channels) pass against the
    reference in Triton's interpreter, as they must before a memory checker runs them on a GPU."""
    pytest.importorskip("triton")
    from worldvla.benchmarks import sanitize

    assert sanitize.run("triton", "cpu", only="below the tile") == 0
    out = capsys.readouterr().out
    assert out.count("\nok    ") == len(sanitize.TRITON_ONLY) == 3 and "FAIL" not in out


def test_sanitize_driver_reports_a_wrong_kernel(monkeypatch, capsys):
    from worldvla.benchmarks import sanitize

    real = sanitize.ops.vq_gather
    monkeypatch.setattr(sanitize.ops, "vq_gather", lambda idx, cb, backend: real(idx, cb, backend=backend).roll(1, 1))
    monkeypatch.setattr(sanitize.ops, "vq_quantize", lambda z, cb, backend: torch.zeros(z.shape[0], dtype=torch.long))
    assert sanitize.run("native", "cpu", only="vq_") == 1
    out = capsys.readouterr().out
    assert "FAIL  vq_gather" in out and "FAIL  vq_quantize" in out and "2 failed" in out


def test_gpu_script_parses_and_names_existing_files():
    """benchmarks/gpu_all.sh runs once, unattended, on a GPU machine: it must parse, name only test
    files and modules that exist, and bring back few files (JSONs, its log, one archive)."""
    import re
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    script = root / "benchmarks" / "gpu_all.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    named = set(re.findall(r"tests/test_[a-z0-9_]+\.py", text))
    assert named and all((root / f).is_file() for f in named), sorted(f for f in named if not (root / f).is_file())
    for glob in re.findall(r"tests/test_[a-z0-9_]*\*\.py", text):
        assert list(root.glob(glob)), glob
    for module in re.findall(r"-m (benchmarks\.[a-z0-9_]+)", text):
        assert (root / (module.replace(".", "/") + ".py")).is_file(), module


# ------------------------------------------------------------------ gpu_all.sh, run with stand-ins
FAKE_PYTHON = r'''#!/bin/bash
# Stands in for the interpreter: answers at once what gpu_all.sh asks. FAKE_FAIL names what fails.
fails() { [[ " ${FAKE_FAIL:-} " == *" $1 "* ]]; }
case "$1" in
  -c) case "$2" in
        *scikit_build_core*|*xdist*|*pytest_timeout*) exit 1 ;;
        *with_cuda*) fails build-on && exit 1 ;;
      esac
      exit 0 ;;
  -) cat > /dev/null; echo "modules: stand-ins"; exit 0 ;;
  -m) ;;
  *) exit 3 ;;
esac
mod=$2; shift 2
out=; words=()
while (( $# )); do
  case $1 in --out) out=$2; shift ;; -*) ;; *) words+=("$1") ;; esac
  shift
done
case $mod in
  pybind11) echo /nowhere ;;
  pytest) if fails pytest; then echo "==== 1 failed in 0.1s ===="; exit 1; fi; echo "==== 3 passed in 0.1s ====" ;;
  benchmarks.sanitize) echo "sanitize: all passed" ;;
  worldvla.cli) [[ ${words[0]} == bench ]] || exit 0
    for n in "${words[@]:1}"; do echo '{}' > "$out/$n-fake.json"; echo "-> $out/$n-fake.json"; done ;;
  benchmarks.e2e) echo '{"partial": true}' > "$out/e2e-fake.json"
    [[ -n ${FAKE_E2E_TARGETS:-} ]] && echo "e2e: target rows written -> $out/e2e-fake.json"
    [[ -n ${FAKE_E2E_RC:-} ]] && exit "$FAKE_E2E_RC"  # 124: as `timeout` reports a stage stopped at its limit
    exec sleep "${FAKE_E2E_S:-0}" ;;
esac
exit 0
'''
FAKE_CMAKE = r'''#!/bin/bash
echo "cmake $*" >> "$FAKE_LOG"
if [[ $1 == --build ]]; then touch "$2/_C.fake.so"; exit 0; fi
[[ " $* " == *" -DWORLDVLA_CUDA=ON "* && " ${FAKE_FAIL:-} " == *" build-on "* ]] && exit 1
mkdir -p "$4"
'''
TOOLS = ("bash", "env", "timeout", "tee", "date", "nproc", "tar", "gzip", "find", "sort", "mv", "rm", "cp", "ln",
         "mkdir", "grep", "awk", "cut", "tr", "tail", "head", "wc", "ls", "sed", "basename", "dirname", "sleep",
         "cat", "touch")


def _gpu_script_sandbox(tmp_path, ninja: bool):
    """A copy of gpu_all.sh in an empty checkout, with a PATH of the system tools it uses and stand-ins for
    python, cmake, nvidia-smi, compute-sanitizer (and ninja, if `ninja`): every stage runs at once, and
    FAKE_FAIL / FAKE_E2E_S make some fail or run long. Returns (script, environment)."""
    import shutil
    from pathlib import Path

    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        pytest.skip(f"needs {missing}")
    repo, bin_dir = tmp_path / "repo", tmp_path / "bin"
    (repo / "benchmarks").mkdir(parents=True)
    (repo / "worldvla").mkdir()
    bin_dir.mkdir()
    script = repo / "benchmarks" / "gpu_all.sh"
    shutil.copy(Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_all.sh", script)
    for tool in TOOLS:
        (bin_dir / tool).symlink_to(shutil.which(tool))
    fakes = {"python": FAKE_PYTHON, "cmake": FAKE_CMAKE, "nvidia-smi": "#!/bin/bash\necho 'Stand-in GPU, 0, 1 MiB'\n",
             "compute-sanitizer": "#!/bin/bash\necho '========= ERROR SUMMARY: 0 errors'\n"}
    if ninja:
        fakes["ninja"] = "#!/bin/bash\n"
    for name, text in fakes.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {"PATH": str(bin_dir), "PY": str(bin_dir / "python"), "HOME": str(tmp_path), "OUT": str(tmp_path / "out"),
           "WORK": str(tmp_path / "work"), "FAKE_LOG": str(tmp_path / "cmake.log"), "BUDGET_S": "600",
           "CHECK_WINDOW_S": "40"}
    return script, env


def _archive(path) -> set:
    import tarfile

    with tarfile.open(path) as t:
        return {m.name for m in t.getmembers() if m.isfile()}


def _summary(env) -> dict:
    from pathlib import Path

    rows = (Path(env["WORK"]) / "logs" / "summary.tsv").read_text().splitlines()
    return {r.split("\t")[0]: r.split("\t")[1] for r in rows}


def test_gpu_script_brings_back_three_files_and_says_what_failed(tmp_path):
    """With OUT set: OUT holds gpu_all.log, results.tgz (every JSON) and logs.tgz, however many benchmarks
    there are (8 files come back at most), exit 0 when every stage passed; with Ninja missing the plain
    CMake build takes CMake's default generator, and a failed CUDA build falls back to a CPU-only one by the
    same path (not pip, which needs scikit-build-core); a failed stage exits 1."""
    import subprocess
    from pathlib import Path

    script, env = _gpu_script_sandbox(tmp_path / "a", ninja=True)
    run = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=120)
    out = Path(env["OUT"])
    assert run.returncode == 0, run.stdout[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["gpu_all.log", "logs.tgz", "results.tgz"]
    assert _archive(out / "results.tgz") == {f"{n}-fake.json" for n in ("attention", "cross_entropy", "vq", "sampling",
                                                                          "train", "e2e")}
    assert "logs/summary.tsv" in _archive(out / "logs.tgz") and "exit status 0" in (out / "gpu_all.log").read_text()
    assert "-G Ninja" in Path(env["FAKE_LOG"]).read_text()
    assert "== correctness window 40s" in run.stdout  # budget enough: CHECK_WINDOW_S whole

    script, env = _gpu_script_sandbox(tmp_path / "c", ninja=False)
    run = subprocess.run(["bash", str(script)], env={**env, "FAKE_FAIL": "build-on pytest"}, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 1, run.stdout[-3000:]
    status = _summary(env)
    assert status["build"].startswith("FAIL") and status["build-cpu-only"] == "ok"
    assert status["tests-native"].startswith("FAIL") and status["bench-e2e"] == "ok"
    configures = [line for line in Path(env["FAKE_LOG"]).read_text().splitlines() if " -S . " in line]
    assert len(configures) == 2 and "-DWORLDVLA_CUDA=OFF" in configures[1]
    assert not any("-G" in line.split() for line in configures)  # no Ninja here: CMake's default generator
    assert "failed: build tests-" in run.stdout and len(_archive(Path(env["OUT"]) / "results.tgz")) == 6


def test_gpu_script_keeps_e2e_first_and_delivers_while_a_stage_runs(tmp_path):
    """A budget too short for every benchmark skips the correctness window and the early groups, not e2e (the
    latency targets), and says so with exit status 2; e2e's partial JSON reaches OUT while the stage still
    runs (a kill then keeps it), and a benchmark stopped at its limit is CUT, not a failure."""
    import subprocess
    import time
    from pathlib import Path

    script, env = _gpu_script_sandbox(tmp_path, ninja=True)
    env.update(BUDGET_S="36", FAKE_E2E_S="300")  # e2e gets about 30 s, the groups before it nothing
    proc = subprocess.Popen(["bash", str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    results, seen_running = Path(env["OUT"]) / "results.tgz", False
    try:
        while proc.poll() is None:
            if results.exists() and "e2e-fake.json" in _archive(results) and "bench-e2e" not in _summary(env):
                seen_running = True
            time.sleep(0.5)
        stdout = proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    status = _summary(env)
    assert proc.returncode == 2, stdout[-3000:]
    assert [status[g] for g in ("bench-attention", "bench-kernels", "bench-train")] == ["SKIPPED"] * 3
    assert [status[s] for s in ("tests-triton-attention", "tests-triton-other", "tests-native")] == ["SKIPPED"] * 3
    assert status["bench-e2e"] == "CUT" and seen_running
    assert "bench-attention bench-kernels bench-train; cut at their limit: bench-e2e" in stdout
    assert "after their target rows" not in stdout
    assert _archive(results) == {"e2e-fake.json"} and len(list(Path(env["OUT"]).iterdir())) == 3


def test_gpu_script_window_leaves_the_benchmarks_their_floors(tmp_path):
    """After a slow build the correctness window shrinks to what is left less the benchmark groups' floors
    (attention 40, kernels 25, train 25, e2e E2E_MIN_S 120, 2 s each for deliveries, 10 s of wrap-up), and its
    stages take that window as their limit."""
    import re
    import subprocess

    script, env = _gpu_script_sandbox(tmp_path, ninja=True)
    env.update(BUDGET_S="300", CHECK_WINDOW_S="130")  # 300 - 10 - 218: 72 s less what the start took
    run = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout[-3000:]
    window = int(re.search(r"== correctness window (\d+)s", run.stdout).group(1))
    assert 60 <= window <= 72, run.stdout[-3000:]
    limits = {m.group(1): int(m.group(2)) for m in re.finditer(r"^== (\S+) \(limit (\d+)s", run.stdout, re.M)}
    assert all(limits[s] == window for s in ("tests-triton-attention", "tests-triton-other", "tests-native"))


def test_gpu_script_e2e_cut_after_its_target_rows_is_not_degraded(tmp_path):
    """e2e stopped at its limit after its log said its target rows were written is PARTIAL, named in the
    summary and not counted in the exit status; stopped before, it is CUT (exit status 2)."""
    import subprocess

    for case, extra, rc, state in (("a", {"FAKE_E2E_TARGETS": "1"}, 0, "PARTIAL"), ("b", {}, 2, "CUT")):
        script, env = _gpu_script_sandbox(tmp_path / case, ninja=True)
        env.update(FAKE_E2E_RC="124", **extra)
        run = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=120)
        assert run.returncode == rc, run.stdout[-3000:]
        assert _summary(env)["bench-e2e"] == state
        if state == "PARTIAL":
            assert "cut at their limit: none" in run.stdout
            assert "after their target rows were written (not counted): bench-e2e" in run.stdout
        else:
            assert "cut at their limit: bench-e2e" in run.stdout and "after their target rows" not in run.stdout


def _in_fresh_process(code: str):
    """The JSON a snippet prints last, run in a fresh process (tests that build a CPU policy tune this one)."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's /proc/self/clear_refs")
def test_cpu_peak_memory_sees_a_large_temporary():
    """A 64 MB temporary freed before the call returns still counts; nothing allocated counts ~0; and
    so it does once malloc is tuned (freed memory kept and reused), as `worldvla train` runs."""
    big, none, tuned, after = _in_fresh_process(
        "import json, torch\n"
        "from worldvla.benchmarks import common\n"
        "from worldvla.inference import tune_cpu_malloc\n"
        "big = common.peak_memory(lambda: float(torch.ones(16 << 20).sum()), 'cpu')\n"
        "none = common.peak_memory(lambda: None, 'cpu')\n"
        "tuned = tune_cpu_malloc(mmap=False) is not None\n"
        "[float(torch.ones(16 << 20).sum()) for _ in range(3)]  # heap blocks now held by the process\n"
        "after = common.peak_memory(lambda: float(torch.ones(16 << 20).sum()), 'cpu')\n"
        "print(json.dumps([big, none, tuned, after]))\n")
    if big is None:
        pytest.skip("needs glibc's malloc_trim and a kernel that lets the process reset its peak resident set")
    assert common.peak_memory_method("cpu") and "malloc_trim" in common.peak_memory_method("cpu")
    assert 60 << 20 <= big <= 100 << 20, big
    assert none < 8 << 20, none
    if tuned:
        assert 60 << 20 <= after <= 100 << 20, after


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's /proc/self/clear_refs")
def test_cpu_peak_memory_counts_blocks_malloc_already_held():
    """After warm-up glibc serves 16 MB blocks from memory it already holds (its mmap threshold has
    risen past them), so the resident set alone would not grow: two such tensors, alive together, must
    still count (32 MB)."""
    two = _in_fresh_process(
        "import json, torch\n"
        "from worldvla.benchmarks import common\n"
        "def two():\n"
        "    a, b = torch.ones(4 << 20), torch.ones(4 << 20)  # 16 MB each\n"
        "    return float(a.sum() + b.sum())\n"
        "for _ in range(5):\n"
        "    two()\n"
        "print(json.dumps(common.peak_memory(two, 'cpu')))\n")
    if two is None:
        pytest.skip("needs glibc's malloc_trim and a kernel that lets the process reset its peak resident set")
    assert 31 << 20 <= two <= 40 << 20, two


def test_sass_report_of_the_vq_kernels(tmp_path):
    """The static report compiles a CUDA file and reads ptxas and the SASS back. For the VQ search it
    also guards what its staging rewrite bought: the aligned kernels keep two CTAs per SM without
    spilling, and their hot loop stays near 6 instructions per tensor-core MMA (the one-value-per-load
    staging it replaced took about 20)."""
    from worldvla.benchmarks import sass

    if sass.find_tool("nvcc") is None or sass.find_tool("cuobjdump") is None:
        pytest.skip("needs nvcc and cuobjdump")
    path = sass.run(out_dir=tmp_path, files=[sass.ROOT / "csrc" / "cuda" / "vq.cu"])
    doc = json.loads(path.read_text())
    assert doc["arch"] == "sm_90a" and doc["nvcc"]
    vq = {r["kernel"]: r for r in doc["rows"] if "vq_quantize_kernel" in r["kernel"]}
    aligned = [r for k, r in vq.items() if k.endswith("true>")]
    assert len(vq) == 8 and len(aligned) == 4
    for r in aligned:
        assert r["registers"] <= 128 and r["spill_store_bytes"] == 0 and r["stack_bytes"] == 0, r
        assert r["hot_loop_hmma"] == 32 and r["hot_loop_ldsm"] == 12 and r["instructions_per_hmma"] < 8, r
    plain = [r for r in doc["rows"] if "gather" in r["kernel"] or "fill" in r["kernel"]]
    assert plain and all(r["hmma"] == 0 and "hot_loop_hmma" not in r for r in plain)


def test_sass_report_of_the_prefill_engines(tmp_path):
    """The sm_90a prefill kernels: the wgmma instantiations issue their Q K^T and P V as HGMMA (D/16
    k-steps of 64x64x16, four of 64xDx16 per key tile) with no HMMA left, and ptxas does not serialize
    them (a wgmma in a branch it cannot prove uniform makes it wait after every one); the mma.sync
    ones only HMMA; none spills."""
    from worldvla.benchmarks import sass

    if sass.find_tool("nvcc") is None or sass.find_tool("cuobjdump") is None:
        pytest.skip("needs nvcc and cuobjdump")
    doc = json.loads(sass.run(out_dir=tmp_path, files=[sass.ROOT / "csrc" / "cuda" / "attention.cu"]).read_text())
    fwd = {r["kernel"]: r for r in doc["rows"] if "masked_attention_fwd_kernel" in r["kernel"]}
    assert len(fwd) == 12  # {bf16, fp16} x {64, 128} x {mma.sync, wgmma 64 rows, wgmma 128 rows}
    for name, r in fwd.items():
        assert r["spill_store_bytes"] == 0 and r["stack_bytes"] == 0 and "wgmma_serialized" not in r, r
        D = 128 if ", 128," in name else 64
        if not name.endswith(", 0>"):
            assert r["hot_loop_hgmma"] == D // 16 + 4 and r["hot_loop_hmma"] == 0, r
        else:
            assert r["hot_loop_hmma"] == D and r["hot_loop_hgmma"] == 0, r  # (D/16)(64/8) + 4(D/8)


def test_bench_reports_missing_cuda_tools_as_skipped(monkeypatch, tmp_path, capsys):
    import argparse

    from worldvla import bench
    from worldvla.benchmarks import sass

    monkeypatch.setattr(sass, "find_tool", lambda name: None)
    p = argparse.ArgumentParser()
    bench.add_arguments(p)
    assert bench.run(p.parse_args(["sass", "--out", str(tmp_path)])) == 0
    assert "sass skipped: the static report needs nvcc and cuobjdump" in capsys.readouterr().out


def test_bench_on_a_gpu_skips_the_cpu_benchmark_instead_of_failing(monkeypatch, tmp_path, capsys):
    """`worldvla bench --device cuda` (every benchmark) failed with exit 1 on a GPU machine: cpu_ops refuses any
    device but the CPU, and that counted as a failure. It is skipped, saying why."""
    import argparse

    import worldvla.devices
    from worldvla import bench

    monkeypatch.setattr(worldvla.devices, "torch_device", lambda *a, **k: None)  # as on a machine with a GPU
    p = argparse.ArgumentParser()
    bench.add_arguments(p)
    assert bench.run(p.parse_args(["cpu_ops", "--device", "cuda", "--out", str(tmp_path)])) == 0
    out = capsys.readouterr().out
    assert "cpu_ops skipped: cpu_ops measures the C++ CPU paths; run it with --device cpu" in out
    assert "failed" not in out and not list(tmp_path.iterdir())

def test_bench_sass_without_the_cuda_sources_is_skipped_not_an_empty_report(monkeypatch, tmp_path, capsys):
    """From an installed wheel (no csrc/) `bench sass` wrote a report with no rows and said it succeeded."""
    import argparse

    from worldvla import bench
    from worldvla.benchmarks import sass

    monkeypatch.setattr(sass, "ROOT", tmp_path / "site-packages" / "worldvla")
    monkeypatch.setattr(sass, "find_tool", lambda name: f"/usr/bin/{name}")  # the tools are there; the sources not
    p = argparse.ArgumentParser()
    bench.add_arguments(p)
    assert bench.run(p.parse_args(["sass", "--out", str(tmp_path / "out")])) == 0
    assert "sass skipped: no CUDA sources in" in capsys.readouterr().out
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_bench_a_benchmark_whose_dependency_is_missing_fails_alone_naming_it(monkeypatch, tmp_path, capsys):
    """A benchmark module that could not import one of its own dependencies was retried as the checkout's
    `benchmarks.<name>`, whose error ("No module named 'benchmarks'") ended the whole run. Now that benchmark
    fails with its real error, and the next one runs."""
    import argparse
    import importlib
    import sys

    from worldvla import bench
    from worldvla.benchmarks import sass

    real = importlib.import_module

    def import_module(name, *a, **kw):
        if name.endswith("benchmarks.serve_load"):
            raise ModuleNotFoundError("No module named 'msgpack'", name="msgpack")
        return real(name, *a, **kw)

    monkeypatch.setattr(importlib, "import_module", import_module)
    monkeypatch.delitem(sys.modules, "worldvla.benchmarks.serve_load", raising=False)
    monkeypatch.setattr(sass, "find_tool", lambda name: None)  # the next benchmark: skipped at once
    p = argparse.ArgumentParser()
    bench.add_arguments(p)
    assert bench.run(p.parse_args(["serve_load", "sass", "--out", str(tmp_path)])) == 1
    out = capsys.readouterr().out
    assert "!! serve_load failed: ModuleNotFoundError: No module named 'msgpack'" in out
    assert "sass skipped: the static report needs nvcc" in out


def test_serve_load_run_gives_back_the_thread_count(monkeypatch):
    """serve_load's in-process policy set torch to one thread for the rest of a `worldvla bench` run, so the
    benchmarks after it (cpu_ops) measured one thread."""
    import torch

    from worldvla.benchmarks import serve_load

    def main(args, out_dir):
        serve_load.build_policy({"kind": "synthetic", "threads": 1, "image_size": 8, "chunk_size": 2,
                                 "action_dim": 3})
        assert torch.get_num_threads() == 1
        return out_dir

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        monkeypatch.setattr(serve_load, "_main", main)
        assert serve_load.run(quick=True, out_dir="x") == "x"
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_sass_compiles_given_sources_against_their_own_csrc(monkeypatch, tmp_path):
    """`python -m worldvla.benchmarks.sass <checkout>/csrc/cuda/vq.cu` from an installed package compiled with
    -I pointing into site-packages, where common.h is not: the folder above the file's is searched too."""
    import subprocess

    from worldvla.benchmarks import sass

    src = tmp_path / "csrc" / "cuda" / "vq.cu"
    src.parent.mkdir(parents=True)
    src.write_text("")
    seen = []

    def fake_run(cmd, *a, **kw):
        seen.append(cmd)
        return subprocess.CompletedProcess(cmd, 1, "", "stop here")

    monkeypatch.setattr(sass, "ROOT", tmp_path / "site-packages" / "worldvla")
    monkeypatch.setattr(sass, "find_tool", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(sass.subprocess, "run", fake_run)
    with pytest.raises(RuntimeError, match="nvcc failed on vq.cu"):
        sass.report([src])
    assert f"-I{tmp_path / 'csrc'}" in seen[0]


def test_usage_lines_name_the_module_as_python_m_takes_it():
    """From an installed package the benchmarks are worldvla.benchmarks.<name>; their usage said
    benchmarks.<name>, a module only a source checkout has."""
    from worldvla.benchmarks import attention, common

    assert common.module_name(attention.run) == attention.__spec__.name == "worldvla.benchmarks.attention"


def test_info_reports_the_auto_order_and_the_build(capsys):
    from worldvla import cli
    from worldvla.ops import dispatch

    assert cli.main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert set(info["ops"]) == set(dispatch.registered_ops()) >= {"masked_attention", "vq_quantize"}
    for op, o in info["ops"].items():
        assert o["auto_order"]["cpu"][-1] == "torch" and set(o["auto_order"]["cpu"]) <= set(o["installed"])
    assert info["cpu"]["torch_capability"] == dispatch.cpu_capability()
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "auto order on CPU" in out and "decode steps:" in out


def test_cpu_results_under_isa_limits_do_not_take_the_real_machines_name(monkeypatch):
    """A run with torch held to AVX2 on an AVX-512 machine stands in for an older CPU: its file is named
    after the machine and the limit, not after a real AVX2 machine's results."""
    monkeypatch.setattr(common, "_hardware_capability", lambda: "avx512")
    monkeypatch.setattr("worldvla.ops.dispatch.cpu_capability", lambda: "AVX2")
    monkeypatch.setattr("worldvla.ops.dispatch.cpu_vendor", lambda: "amd")
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    assert common.device_name("cpu").endswith("core-avx512-amd-limited-to-avx2")
    monkeypatch.delenv("ATEN_CPU_CAPABILITY")
    assert common.device_name("cpu").endswith("core-avx2-amd")
    monkeypatch.setattr("worldvla.ops.dispatch.cpu_capability", lambda: "AVX512")
    monkeypatch.setenv("MKL_ENABLE_INSTRUCTIONS", "AVX2")  # only MKL held back: still not the real machine's name
    assert common.device_name("cpu").endswith("core-avx512-amd-limited-to-avx512")


# ------------------------------------------------------------------ methodology of the baselines
def test_per_document_sdpa_baselines_match_the_rule_and_build_masks_once(monkeypatch):
    """The per-document SDPA baselines (documents of unequal length: the copy path; equal: views) compute
    what their rule says, gradients included; the dense masks are built once, outside the timed calls."""
    from worldvla.benchmarks import attention as A
    from worldvla.mask import ChunkMaskMeta, DecodeMeta, causal_meta

    g = torch.Generator().manual_seed(0)
    docs = [A.action_document(px, gen=g) for px in (64, 128, 32)]
    ids = torch.tensor(sum(docs, []))
    cu = torch.tensor([0] + [len(d) for d in docs]).cumsum(0).to(torch.int32)
    cases = [(chunk_mask_meta(ids, A.LAYOUT, cu_seqlens=cu), False), (causal_meta((len(ids),), cu_seqlens=cu), False),
             (A.packed_batch(64, 500, g)[1], True)]
    for meta, views in cases:
        T = meta.kv_block.numel()
        q, k, v = (torch.randn(T, 2, 16, dtype=torch.float64, requires_grad=True) for _ in range(3))
        d = A.Documents(meta)
        assert d.views == views and d.n == meta.cu_seqlens.numel() - 1 and d.L == meta.max_seqlen
        fns = {"dense": A.sdpa_dense_mask(meta), "dense-doc": A.sdpa_dense_mask_per_document(d),
               "causal-doc": A.sdpa_causal_per_document(d)}
        want = {"dense": ops.masked_attention_ref(q, k, v, meta), "dense-doc": ops.masked_attention_ref(q, k, v, meta),
                "causal-doc": ops.masked_attention_ref(q, k, v, causal_meta((T,), cu_seqlens=meta.cu_seqlens))}
        built = []
        monkeypatch.setattr(ChunkMaskMeta, "dense_mask", lambda self: built.append(1))
        for name, fn in fns.items():
            out = fn(q, k, v)
            torch.testing.assert_close(out, want[name])
            got = torch.autograd.grad(out.square().sum(), (q, k, v))
            ref = torch.autograd.grad(want[name].square().sum(), (q, k, v))
            for a, b in zip(got, ref):
                torch.testing.assert_close(a, b)
        assert not built  # no mask rebuilt inside a call
        monkeypatch.undo()
    meta = A.decode_meta(64, 5, 2, torch.Generator().manual_seed(1))
    S = meta.kv_block.shape[1]
    q, k, v = torch.randn(2, 5, 2, 16), torch.randn(2, S, 2, 16), torch.randn(2, S, 2, 16)
    fn, want = A.sdpa_decode_dense_mask(meta), ops.decode_attention_ref(q, k, v, meta)
    monkeypatch.setattr(DecodeMeta, "dense_mask", lambda self: 1 / 0)  # no mask rebuilt inside a call
    torch.testing.assert_close(fn(q, k, v), want)


def test_attention_rows_record_attended_and_visible_pairs():
    from worldvla.benchmarks import attention as A

    rows = A.run_prefill([("tiny", 32, 300, False)], 2, 16, torch.float32, torch.device("cpu"), True,
                         torch.Generator().manual_seed(0))
    rows = [r for r in rows if "median_ms" in r]
    T = rows[0]["tokens"]
    n = rows[0]["documents"]
    L = T // n  # the tiny case's documents are all one length
    by = {(r["impl"], r["mode"]): r for r in rows}
    assert {"sdpa-dense-mask", "sdpa-dense-mask-per-doc", "sdpa-causal-per-doc"} <= {i for i, _ in by}
    assert "sdpa-causal(floor)" not in {i for i, _ in by}
    for mode in ("fwd", "fwd+bwd"):
        assert by["sdpa-dense-mask", mode]["attended_pairs"] == T * T
        assert by["sdpa-dense-mask-per-doc", mode]["attended_pairs"] == n * L * L
        assert by["sdpa-causal-per-doc", mode]["attended_pairs"] == n * L * (L + 1) // 2
    for r in rows:
        assert r["visible_pairs"] > 0 and "attended_pairs" in r
        if r["attended_pairs"] is not None:
            assert r["attended_over_visible"] == r["attended_pairs"] / r["visible_pairs"] >= 1
    decode = A.run_decode([("d", 32, 5, 2)], 2, 16, torch.float32, torch.device("cpu"), True,
                          torch.Generator().manual_seed(0))
    sdpa = [r for r in decode if r["impl"].startswith("sdpa")]
    assert len(sdpa) == 2 and all(r["attended_pairs"] == 2 * 5 * r["tokens"] > r["visible_pairs"] for r in sdpa)


def test_naive_cross_entropy_takes_precomputed_rows():
    from worldvla.benchmarks.cross_entropy import naive_linear_cross_entropy
    from worldvla.ops.cross_entropy import linear_cross_entropy_ref

    g = torch.Generator().manual_seed(0)
    h = torch.randn(12, 8, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(40, 8, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 40, (12,), generator=g)
    y[::3] = -100
    cw = torch.rand(40, generator=g, dtype=torch.float64) + 0.5
    rows = (y != -100).nonzero().squeeze(1)
    got, want = naive_linear_cross_entropy(h, w, y, rows, cw)[0], linear_cross_entropy_ref(h, w, y, cw, 1e-5)[0]
    torch.testing.assert_close(got, want)
    for a, b in zip(torch.autograd.grad(got, (h, w)), torch.autograd.grad(want, (h, w))):
        torch.testing.assert_close(a, b)


def test_train_flops_count_layers_head_rows_and_visible_pairs():
    from worldvla.benchmarks.train import SIDE_FLOPS, USEFUL_FLOPS, step_flops
    from worldvla.model import ModelConfig, WorldVLA

    with torch.device("meta"):
        model = WorldVLA(ModelConfig.tiny())
    cfg = model.config
    V, H = cfg.vocab_size, cfg.hidden_size
    layer_params = model.num_parameters() - 2 * V * H - H  # less the embedding, the lm_head and the final norm
    attention = 4 * cfg.num_attention_heads * cfg.head_dim * cfg.num_hidden_layers
    assert step_flops(model, 100, 7, 1000) == 6 * layer_params * 100 + 6 * V * H * 7 + 3 * attention * 1000
    assert step_flops(model, 100, 100, 1000) - step_flops(model, 100, 7, 1000) == 6 * V * H * 93
    assert "labelled_rows" in USEFUL_FLOPS and "visible_pairs" in USEFUL_FLOPS and "head_rows" in SIDE_FLOPS


def test_serve_load_plots_its_phases(tmp_path):
    from worldvla.benchmarks import serve_load

    rows = [{"phase": "single-robot", "clients": 1, "p50_ms": 3.0, "p90_ms": 4.0, "p99_ms": 6.0, "inproc_p50_ms": 2.0},
            {"phase": "load", "clients": 8, "p50_ms": 9.0, "p90_ms": 12.0, "p99_ms": None, "inproc_p50_ms": 2.0}]
    serve_load.plot_latencies(rows, tmp_path / "s.png", "serve_load (test)")
    assert (tmp_path / "s.png").stat().st_size > 0
    assert serve_load.parse_args(["--quick"]).clients == 3 and serve_load.parse_args([]).clients == 8


# ------------------------------------------------------------------ timing, noise and checks
def test_cpu_ops_rotations_are_sized_by_the_bytes_a_call_reads(monkeypatch):
    """constrained_sample reads the hidden rows and the range's rows of the lm_head, vq_gather the indices and
    the rows they name: the sets are sized by those bytes, what each set reads is distinct memory, and together
    the sets cover 3x the cache, so `inputs_cache_hot: false` is true (sized by whole tensors, it was not)."""
    from worldvla.benchmarks import cpu_ops

    llc = 4 << 20
    monkeypatch.setattr(common, "cpu_last_level_cache", lambda: ("L3", llc))
    gen = torch.Generator().manual_seed(0)
    N, Hd, V, R = 5, 256, 2048, 64
    rot = cpu_ops.sampling_rotation(N, Hd, V, R, gen, quick=True)
    assert rot.bytes_per_set == (N + R) * Hd * 4 and len(rot) == math.ceil(3 * llc / rot.bytes_per_set)
    ranges = [w[V - R:V] for _, w in rot.sets]
    assert all(w.shape == (V, Hd) for _, w in rot.sets)
    assert len({r.data_ptr() for r in ranges}) == len(rot)
    assert all(b.data_ptr() - a.data_ptr() >= R * Hd * 4 for a, b in zip(ranges, ranges[1:]))  # no overlap
    assert rot.info()["inputs_cache_hot"] is False

    B, h, K, C = 2, 4, 512, 64
    rot = cpu_ops.gather_rotation(B, h, K, C, gen, quick=True)
    assert rot.bytes_per_set == B * h * h * (C * 4 + 8) and len(rot) == math.ceil(3 * llc / rot.bytes_per_set)
    read = set()
    for idx, cb in rot.sets:
        assert idx.shape == (B, h, h) and cb.shape == (K, C) and idx.unique().numel() == B * h * h
        rows = {cb[i].data_ptr() for i in idx.flatten().tolist()}
        assert not rows & read  # no set reads a row another set read
        read |= rows
    assert rot.info()["inputs_cache_hot"] is False
    torch.testing.assert_close(ops.vq_gather(*rot.sets[1], backend="torch"), ops.vq_gather_ref(*rot.sets[1]))


def test_timings_record_their_spread_and_results_the_load(tmp_path, capsys):
    """Every timed row carries p90_over_p10; print_table warns about rows above NOISY_SPREAD, naming them;
    the JSON records the load average at the benchmark's start (its extra) and at the write, and how many
    rows were noisy."""
    one = common.time_fn(lambda: None, warmup=1, repeats=12)
    assert one["p90_over_p10"] == one["p90_ms"] / one["p10_ms"]
    both = common.time_interleaved({"a": lambda: None, "b": lambda: None}, warmup=1, repeats=12)
    assert all(s["p90_over_p10"] == s["p90_ms"] / s["p10_ms"] and s["interleaved"] for s in both.values())
    few = common.time_interleaved({"a": lambda: None}, warmup=1, repeats=5)["a"]
    assert few["max_over_min"] == few["max_ms"] / few["min_ms"] and "p90_over_p10" not in few
    rows = [{"case": "quiet", "impl": "x", "median_ms": 1.0, "p90_over_p10": 1.1},
            {"case": "busy", "impl": "y", "median_ms": 4.0, "p90_over_p10": 3.0}]
    common.print_table(rows, ["case", "impl", "median_ms"])
    out = capsys.readouterr().out
    assert "warning: 1 of 2 rows spread p90/p10 > 1.5" in out and "busy y (3.00x)" in out and "quiet" not in out.split(
        "warning")[1]
    load = common.load_average()
    assert load is None or (len(load) == 3 and all(x >= 0 for x in load))
    path = common.write_results("demo", rows, "cpu", tmp_path, extra={"load_average_start": load})
    doc = json.loads(path.read_text())
    assert doc["load_average_start"] == load and "load_average_end" in doc and doc["noisy_rows"] == 1


def test_kernel_benchmarks_time_their_sides_interleaved(tmp_path):
    """vq, sampling and cross_entropy time the sides of a case in one interleaved run (time_interleaved)
    rather than one after the other, and record the load average."""
    from worldvla.benchmarks import cross_entropy, sampling, vq

    for mod in (vq, sampling, cross_entropy):
        doc = json.loads(mod.run(quick=True, device="cpu", out_dir=tmp_path).read_text())
        assert doc["rows"] and all(r["interleaved"] is True and common.row_spread(r) for r in doc["rows"]), mod
        assert "load_average_start" in doc and "load_average_end" in doc


def test_attention_checks_every_side_against_the_reference(monkeypatch, tmp_path):
    """Every timed side's output (or gradients) is checked against the op's reference under the rule it
    computes and recorded; a side that computes something else is flagged, and run() fails after writing
    the JSON."""
    from worldvla.benchmarks import attention as A

    rows = A.run_prefill([("tiny", 32, 300, False)], 2, 16, torch.float32, torch.device("cpu"), True,
                         torch.Generator().manual_seed(0))
    timed = [r for r in rows if "median_ms" in r]
    assert {(r["impl"], r["mode"]) for r in timed} >= {("sdpa-causal-per-doc", "fwd+bwd"), ("worldvla-torch", "fwd")}
    assert all(r["matches_reference"] is True and r["worst_over_tolerance"] < 1 and r["interleaved"] for r in timed)
    decode = A.run_decode([("d", 32, 5, 2)], 2, 16, torch.float32, torch.device("cpu"), True,
                          torch.Generator().manual_seed(0))
    assert {r["impl"] for r in decode} >= {"sdpa-dense-mask", "sdpa-nomask(floor)"}
    assert all(r["matches_reference"] is True for r in decode)

    # The per-document SDPA baseline made to drop the chunk rule's holes: it no longer matches.
    monkeypatch.setattr(A, "sdpa_dense_mask_per_document", A.sdpa_causal_per_document)
    rows = A.run_prefill([("tiny", 32, 300, False)], 2, 16, torch.float32, torch.device("cpu"), True,
                         torch.Generator().manual_seed(0))
    wrong = {(r["impl"], r["mode"]) for r in rows if r.get("matches_reference") is False}
    assert wrong == {("sdpa-dense-mask-per-doc", "fwd"), ("sdpa-dense-mask-per-doc", "fwd+bwd")}
    assert all(r["median_ms"] > 0 for r in rows if r["impl"] == "sdpa-dense-mask-per-doc")  # still timed

    monkeypatch.setattr(A, "run_decode", lambda *a, **k: [])
    monkeypatch.setattr(A, "run_prefill", lambda cases, *a, **k: [dict(r, case=cases[0][0]) for r in rows])
    with pytest.raises(RuntimeError, match="do not match the reference: 256px sdpa-dense-mask-per-doc fwd"):
        A.run(quick=True, device="cpu", out_dir=tmp_path)
    doc = json.loads(next(tmp_path.glob("attention-*-quick.json")).read_text())  # written before the error
    assert sum(r.get("matches_reference") is False for r in doc["rows"]) == 2 * 2  # 2 cases x 2 modes


def test_flop_conventions_are_named_and_explained():
    """attention.py counts forward + backward at 3.5x the forward (FlashAttention-2's kernel convention),
    train.py's MFU at 3x (model FLOPs, no recomputation); each says so, and names the other."""
    from worldvla.benchmarks import attention as A
    from worldvla.benchmarks import train

    assert A.FWD_BWD_FLOPS == 3.5 and train.TRAIN_OVER_FORWARD == 3
    assert "FlashAttention-2" in A.__doc__ and "train.py" in A.__doc__ and "3x" in A.__doc__
    assert "3.5x" in train.USEFUL_FLOPS and "recomputation" in train.USEFUL_FLOPS
    rows = A.run_prefill([("tiny", 32, 300, False)], 2, 16, torch.float32, torch.device("cpu"), True,
                         torch.Generator().manual_seed(0))
    for r in rows:
        if "median_ms" in r:
            factor = A.FWD_BWD_FLOPS if r["mode"] == "fwd+bwd" else 1
            flops = 4 * r["visible_pairs"] * 2 * 16 * factor  # 2 heads of 16
            assert r["tflops"] == pytest.approx(flops / (r["median_ms"] * 1e-3) / 1e12)


def test_plots_give_every_series_its_own_colour(tmp_path, monkeypatch):
    """The attention plot draws 13 series (backends x modes): matplotlib's 10-colour cycle repeated three."""
    for n in (3, 10, 13, 20, 27):
        colors = common.series_colors(n)
        assert len(colors) == n and len({tuple(c) for c in colors}) == n
    asked = []
    real = common.series_colors
    monkeypatch.setattr(common, "series_colors", lambda n: asked.append(n) or real(n))
    rows = [{"x": "a", "y": 1.0, "g": f"s{i}"} for i in range(13)]
    common.plot_rows(rows, "x", "y", "g", "t", tmp_path / "p.png")
    assert asked == [13] and (tmp_path / "p.png").stat().st_size > 0


def test_serve_load_overhead_is_per_request_and_its_path_printed_once(monkeypatch, tmp_path, capsys):
    """The single robot's overhead: percentiles of each request's round trip less the policy time of the same
    request (never negative here), with no key subtracting percentiles of two distributions; `run` (what
    `worldvla bench` calls, which prints the path) prints no path of its own, `main` prints it once."""
    from pathlib import Path

    from worldvla.benchmarks import serve_load

    lat = [10.0, 12.0, 30.0, 11.0]          # round trips, ms
    policy = [9.0, 10.5, 29.0, 10.0]        # the server's policy time of each of those requests
    inproc = [9.5, 9.6, 9.7, 40.0]          # separate in-process calls: a slow outlier of their own
    row = serve_load.single_robot_row(lat, policy, [9.2] * 4, inproc, 0.063, 0)
    assert not any(k.startswith("overhead") for k in row)
    assert row["rtt_minus_policy_p50_ms"] == pytest.approx(1.0) and row["rtt_minus_policy_p99_ms"] > 0
    assert row["p99_ms"] - row["inproc_p99_ms"] < 0  # what the old overhead_p99_ms reported

    monkeypatch.setattr(serve_load, "_main", lambda args, out_dir: Path(out_dir) / "serve_load-x.json")
    serve_load.run(quick=True, out_dir=str(tmp_path))
    assert "->" not in capsys.readouterr().out
    serve_load.main(["--quick", "--out", str(tmp_path)])
    assert capsys.readouterr().out.count("serve_load-x.json") == 1


def test_attention_rewrites_its_json_after_each_mode_and_runs_causal_second():
    """A prefill case hands its rows over after each mode (fwd, then fwd+bwd), so a run cut short keeps the
    modes measured; on CUDA the causal case (the SDPA-flash comparison) runs second, after 256 px."""
    from worldvla.benchmarks import attention as A

    seen = []
    rows = A.run_prefill([("tiny", 32, 300, False)], 2, 16, torch.float32, torch.device("cpu"), True,
                         torch.Generator().manual_seed(0), done=lambda so_far: seen.append(list(so_far)))
    assert len(seen) == 2 and {r["mode"] for r in seen[0]} == {"fwd"}
    assert [(r["impl"], r["mode"]) for r in seen[1]] == [(r["impl"], r["mode"]) for r in rows]
    assert [c[0] for c in A.prefill_cases(True, False)] == ["256px", "causal", "512px"]
    assert [c[0] for c in A.prefill_cases(False, True)] == ["256px", "causal"]


def test_long_cache_decode_case_and_the_bandwidth_target():
    """The GPU's decode cases start with a 16k-token cache at batch 1 (the target's case); its query rows are
    the document's after a history without action blocks (so they hide what the short case's hide); each
    decode row reads its cache_gbps against the copy bandwidth, and the target is judged on that case."""
    from worldvla.benchmarks import attention as A

    long = A.decode_case_list(True, False)[0]
    assert long[0] == A.LONG_DECODE_CASE and long[1:] == (256, 5, 1, 16384)
    assert all(len(c) == 4 for c in A.decode_case_list(False, False))  # the CPU: as before, no long cache
    short = A.decode_meta(64, 5, 1, torch.Generator().manual_seed(0))
    meta = A.decode_meta(64, 5, 1, torch.Generator().manual_seed(0), tokens=700)
    S = short.kv_block.shape[1]
    assert meta.kv_block.shape == (1, 700) and int(meta.kv_len) == 700
    assert torch.equal(meta.q_pos, short.q_pos + 700 - S) and torch.equal(meta.q_limit, short.q_limit)
    hidden = lambda m: m.q_pos.numel() * m.kv_block.shape[1] - int(m.dense_mask().sum())  # noqa: E731
    assert hidden(meta) == hidden(short)
    with pytest.raises(ValueError, match="cannot hold"):
        A.decode_meta(64, 5, 1, tokens=10)

    rows = A.run_decode([("long", 64, 5, 1, 700)], 2, 16, torch.float32, torch.device("cpu"), True,
                        torch.Generator().manual_seed(0), copy_gbps=1e-3)
    timed = [r for r in rows if "median_ms" in r]
    assert timed and all(r["tokens"] == 700 and r["matches_reference"] for r in timed)
    for r in timed:
        assert r["fraction_of_copy_bandwidth"] == pytest.approx(r["cache_gbps"] / 1e-3)
    target = A.decode_bandwidth_target(rows, 1e-3, case="long")
    fractions = {r["impl"]: r["fraction_of_copy_bandwidth"] for r in timed if r["impl"].startswith("worldvla-")}
    assert target["by_impl"] == fractions
    if fractions:
        assert target["measured"] == max(fractions.values())
        assert target["met"] == (target["measured"] >= A.DECODE_BANDWIDTH_TARGET)
    cpu = A.decode_bandwidth_target(rows, None, case="long")
    assert cpu["measured"] is None and cpu["met"] is None and "CPU" in cpu["note"]

    # Made-up rows (the run above times a worldvla decode backend only where one is built): the best worldvla
    # row of the case is chosen; sdpa rows, other cases' rows and untimed rows are left out.
    made = [{"case": "long", "impl": "worldvla-native", "median_ms": 1.0, "fraction_of_copy_bandwidth": 0.85},
            {"case": "long", "impl": "worldvla-triton", "median_ms": 1.2, "fraction_of_copy_bandwidth": 0.7},
            {"case": "long", "impl": "sdpa-dense-mask", "median_ms": 0.5, "fraction_of_copy_bandwidth": 0.95},
            {"case": "long", "impl": "worldvla-flash", "error": "RuntimeError: no"},
            {"case": "short", "impl": "worldvla-native", "median_ms": 0.1, "fraction_of_copy_bandwidth": 0.99}]
    target = A.decode_bandwidth_target(made, 3000.0, case="long")
    assert target["impl"] == "worldvla-native" and target["measured"] == 0.85 and target["met"] is True
    assert target["by_impl"] == {"worldvla-native": 0.85, "worldvla-triton": 0.7} and "note" not in target
    made[0]["fraction_of_copy_bandwidth"] = 0.6
    target = A.decode_bandwidth_target(made, 3000.0, case="long")
    assert target["impl"] == "worldvla-triton" and target["measured"] == 0.7 and target["met"] is False
    none = A.decode_bandwidth_target(made, 3000.0, case="absent")
    assert none["impl"] is None and none["measured"] is None and none["met"] is None and "absent" in none["note"]


def test_cross_entropy_checks_every_side_against_float64():
    """The float64 reference, taken in row chunks, is linear_cross_entropy_ref's loss and gradients in
    float64; every side is checked against it under the package's rule (2x torch's error at the inputs'
    precision), and a side with wrong gradients is flagged."""
    from worldvla.benchmarks import cross_entropy as CE
    from worldvla.ops.cross_entropy import linear_cross_entropy_ref

    g = torch.Generator().manual_seed(0)
    h = torch.randn(40, 16, generator=g, requires_grad=True)
    w = (torch.randn(50, 16, generator=g) * 0.3).requires_grad_()
    y = torch.randint(0, 50, (40,), generator=g)
    y[::4] = -100
    cw = torch.rand(50, generator=g) + 0.5
    rows = (y != -100).nonzero().squeeze(1)
    h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    want = linear_cross_entropy_ref(h64, w64, y, cw, CE.Z_WEIGHT)[0]
    want = (want.detach(), *torch.autograd.grad(want, (h64, w64)))
    for chunk_bytes in (50 * 8 * 7, 1 << 30):  # 7 rows a chunk, and one chunk
        got = CE.reference64(h, w, y, cw, CE.Z_WEIGHT, chunk_bytes=chunk_bytes)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)

    def wrong(h, w, y, rows):  # the right loss, gradients twice too large
        loss, z = CE.naive_linear_cross_entropy(h, w, y, rows, cw)
        return 2 * loss - loss.detach(), z

    def broken(h, w, y, rows):
        raise ValueError("no kernel")

    out = CE.check_sides({"naive": lambda h, w, y, rows: CE.naive_linear_cross_entropy(h, w, y, rows, cw),
                          "wrong": wrong, "broken": broken}, h, w, y, rows, cw)
    assert out["broken"] == {"error": "ValueError: no kernel"}  # run() leaves it out of the timing
    assert out["naive"]["matches_reference"] is True and out["naive"]["worst_over_tolerance"] <= 1
    assert set(out["naive"]["max_abs_err"]) == set(CE.QUANTITIES)
    assert out["wrong"]["matches_reference"] is False and out["wrong"]["worst_over_tolerance"] > 1


def test_cross_entropy_run_records_the_check(tmp_path):
    from worldvla.benchmarks import cross_entropy as CE

    doc = json.loads(CE.run(quick=True, device="cpu", out_dir=tmp_path).read_text())
    assert doc["rows"] and all(r["matches_reference"] is True for r in doc["rows"])
    assert all(r["torch_max_abs_err"]["loss"] is not None for r in doc["rows"]) and "2x torch's" in doc["check"]


def test_vq_target_is_judged_on_float32_rows_only(tmp_path):
    """bf16 rows' speedup_vs_cdist is over the fp32 cdist: labelled so, and left out of the 1.3x target."""
    from worldvla.benchmarks import vq

    rows = [{"N": 512, "K": 8192, "C": 256, "dtype": dt, "impl": impl, "speedup_vs_cdist": x}
            for dt, impl, x in (("float32", "cdist+argmin", 1.0), ("float32", "worldvla-native", 1.2),
                                ("float32", "worldvla-triton", 1.4), ("bfloat16", "worldvla-native", 5.0))]
    target = vq.speedup_target(rows, on_gpu=True)
    assert target["measured"] == 1.4 and target["met"] is True
    assert target["by_case"] == {"N=512 K=8192 C=256": {"impl": "worldvla-triton", "speedup_vs_cdist": 1.4}}
    rows[2]["speedup_vs_cdist"] = 1.25
    assert vq.speedup_target(rows, on_gpu=True)["met"] is False
    assert vq.speedup_target(rows, on_gpu=False)["met"] is None
    doc = json.loads(vq.run(quick=True, device="cpu", out_dir=tmp_path).read_text())
    assert all(r["cdist_baseline_dtype"] == "float32" for r in doc["rows"]) and doc["target"]["met"] is None


def test_results_record_the_package_version_and_commit(monkeypatch):
    import subprocess
    from pathlib import Path

    import worldvla

    env = common.environment("cpu")
    assert env["worldvla"] == worldvla.__version__ and "git_commit" in env and "nvidia_driver" not in env
    root = Path(worldvla.__file__).resolve().parents[1]
    if (root / ".git").exists():  # a checkout: the commit is its HEAD's
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
        assert env["git_commit"] == head and len(head) == 40

    def raise_(e):
        raise e

    # No nvidia-smi: torch's CUDA driver API version, or None where torch cannot say either.
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: raise_(FileNotFoundError("nvidia-smi")))
    for driver, want in ((lambda: 12040, "cuda driver api 12040"),
                         (lambda: raise_(RuntimeError("no driver")), None)):
        monkeypatch.setattr(torch._C, "_cuda_getDriverVersion", driver, raising=False)
        common.nvidia_driver_version.cache_clear()
        try:
            assert common.nvidia_driver_version() == want
        finally:
            common.nvidia_driver_version.cache_clear()


def test_two_writers_into_one_folder_do_not_collide_and_a_failed_write_leaves_nothing(tmp_path, monkeypatch):
    """Results went through one fixed `<name>.json.tmp`: a second run writing the same result in the same folder
    between the first's write and rename took that file, and the first's rename then failed (its temporary gone).
    Now each write has a temporary name of its own; the JSON and the plot each appear whole, the last writer's,
    and a write that fails leaves neither a temporary nor a result behind."""
    real_replace = os.replace
    nested = []

    def replace(src, dst):
        if not nested:  # the first writer, between its write and its rename: a second writer does all of its own
            nested.append(None)
            nested[0] = common.write_results("demo", [{"x": 1, "y": 2.0, "g": "b"}], "cpu", tmp_path,
                                             plot=("x", "y", "g"))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    path = common.write_results("demo", [{"x": 1, "y": 1.0, "g": "a"}], "cpu", tmp_path, plot=("x", "y", "g"))
    monkeypatch.setattr(os, "replace", real_replace)
    assert nested == [path] and json.loads(path.read_text())["rows"][0]["g"] == "a"
    assert path.with_suffix(".png").stat().st_size > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name, path.with_suffix(".png").name]

    def refuse(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(OSError, match="No space"):
        common.write_results("other", [{"x": 1, "y": 1.0, "g": "a"}], "cpu", tmp_path)
    with pytest.raises(OSError, match="No space"):
        common.plot_rows([{"x": 1, "y": 1.0, "g": "a"}], "x", "y", "g", "t", tmp_path / "p.png")
    monkeypatch.setattr(os, "replace", real_replace)
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name, path.with_suffix(".png").name]


def test_too_few_repeats_report_their_fastest_and_slowest_not_percentiles():
    """By rank, the p90 of 10 times or fewer is the slowest and the p10 of under 10 the fastest: e2e's 7 repeats
    reported their extremes as p10 / p90. Every timing names them min / max there (`_stats`), and keeps
    percentiles where there are enough repeats to tell them from the extremes; noisy_rows and print_table read
    either spread."""
    row = common._stats([float(t) for t in (5, 1, 7, 2, 6, 3, 4)])
    assert row == {"median_ms": 4.0, "min_ms": 1.0, "max_ms": 7.0, "max_over_min": 7.0}
    eleven = common._stats([float(t) for t in range(1, 12)])
    assert (eleven["p10_ms"], eleven["p90_ms"], eleven["median_ms"]) == (2.0, 10.0, 6.0)
    assert not {"min_ms", "max_ms"} & set(eleven)
    assert common.PERCENTILE_MIN_REPEATS == 11
    for n in range(1, 30):  # percentiles from 11 times on, and there they are not the extremes
        ts = [float(t) for t in range(n)]
        st = common._stats(ts)
        assert ("p10_ms" in st) == (n >= common.PERCENTILE_MIN_REPEATS) == ("min_ms" not in st)
        if "p10_ms" in st:
            assert st["p10_ms"] != ts[0] and st["p90_ms"] != ts[-1]
    assert common.noisy_rows([row, eleven]) == [row, eleven]
    assert common.noisy_rows([{**row, "max_over_min": 1.2}]) == []


def test_train_benchmark_times_its_two_sides_interleaved(tmp_path, monkeypatch):
    """benchmarks.train timed its fast side's repeats, then the reference-style side's: a machine that sped up or
    slowed down in between moved one side only. Now one step of each side a round, the order turning, after the
    same warm-up; every row says so, and with so few repeats gives min / max, not p10 / p90."""
    from worldvla.benchmarks import train
    from worldvla.model import ModelConfig

    monkeypatch.setattr(ModelConfig, "small", classmethod(lambda cls, layout=None, **kw: cls.tiny(layout, **kw)))
    order = []
    real = common.time_interleaved

    def record(fns, **kw):
        fns = {name: (lambda name=name, fn=fn: order.append(name) or fn()) for name, fn in fns.items()}
        return real(fns, **kw)

    monkeypatch.setattr(train, "time_interleaved", record)
    doc = json.loads(train.run(quick=True, device="cpu", out_dir=tmp_path).read_text())
    assert order == ["worldvla", "reference-style", "reference-style", "worldvla", "worldvla", "reference-style"]
    assert [r["impl"] for r in doc["rows"]] == ["worldvla", "reference-style"]
    for r in doc["rows"]:
        assert r["interleaved"] is True and (r["warmup"], r["repeats"]) == (1, 2)
        assert r["min_ms"] <= r["median_ms"] <= r["max_ms"] and "p10_ms" not in r and r["peak_bytes"] is not None
    assert doc["rows"][0]["speedup_vs_reference"] == doc["rows"][1]["median_ms"] / doc["rows"][0]["median_ms"]


def test_sass_and_the_cpu_ops_and_serve_load_plots_write_under_names_of_their_own(tmp_path, monkeypatch):
    """sass wrote its report through one fixed `sass-<arch>.json.tmp`: a second run into the same folder took that
    file from under the first, whose rename then failed (and a failed write left the temporary behind). cpu_ops and
    serve_load saved their plots straight to the final name: a save that failed halfway left half a PNG over the
    last good one. Each now writes a temporary name of its own and renames it whole."""
    import matplotlib.figure
    import matplotlib.pyplot as plt

    from worldvla.benchmarks import cpu_ops, sass, serve_load

    monkeypatch.setattr(sass, "report", lambda files, arch: [{"file": "a.cu", "kernel": f"k{len(files)}"}])
    monkeypatch.setattr(sass, "nvcc_version", lambda: "12.4")
    real_replace = os.replace
    nested = []

    def replace(src, dst):
        if not nested:  # the first run, between its write and its rename: a second run does all of its own
            nested.append(None)
            nested[0] = sass.run(out_dir=tmp_path, files=["a.cu", "b.cu"])
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    path = sass.run(out_dir=tmp_path, files=["a.cu"])
    monkeypatch.setattr(os, "replace", real_replace)
    assert nested == [path] and json.loads(path.read_text())["rows"][0]["kernel"] == "k1"  # the last writer's
    assert [p.name for p in tmp_path.iterdir()] == [path.name]

    def refuse(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(OSError, match="No space"):
        sass.run(out_dir=tmp_path, files=["a.cu", "b.cu"])
    monkeypatch.setattr(os, "replace", real_replace)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
    assert json.loads(path.read_text())["rows"][0]["kernel"] == "k1"  # the last good report, untouched

    speedups = [{"op": "vq_quantize", "case": "N1", "impl": impl, "speedup_vs_torch": s}
                for impl, s in (("worldvla-torch", 1.0), ("worldvla-native", 2.0), ("worldvla-native-w8", 1.5))]
    latencies = [{"phase": "single-robot", "clients": 1, "p50_ms": 3.0, "p90_ms": 4.0, "p99_ms": 6.0,
                  "inproc_p50_ms": 2.0}]
    plots = {"cpu_ops.png": lambda p: cpu_ops.plot_speedups(speedups, p),
             "serve_load.png": lambda p: serve_load.plot_latencies(latencies, p, "serve_load (test)")}
    good = {}
    for name, plot in plots.items():
        plot(tmp_path / name)
        good[name] = (tmp_path / name).read_bytes()
        assert good[name].startswith(b"\x89PNG")

    def half_then_fail(self, fname, *args, **kwargs):
        with open(fname, "wb") as f:
            f.write(b"\x89PNG half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", half_then_fail)
    figures = plt.get_fignums()
    for name, plot in plots.items():
        with pytest.raises(OSError, match="No space"):
            plot(tmp_path / name)
        assert (tmp_path / name).read_bytes() == good[name], name  # the last good plot, whole
    assert plt.get_fignums() == figures  # each failed plot's figure closed all the same
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([path.name, *plots])


def test_benchmark_rows_of_few_repeats_report_min_and_max_not_p10_and_p90(tmp_path):
    """vq, sampling, cross_entropy and attention under --quick (3 or 5 repeats) and cpu_ops' cases of 5 or 10 repeats
    reported their fastest and slowest times as p10_ms and p90_ms. Their timings now name them so: min_ms,
    max_ms and max_over_min below PERCENTILE_MIN_REPEATS repeats, the percentiles from there on (full runs' rows)."""
    from worldvla.benchmarks import attention, cpu_ops, cross_entropy, sampling, vq

    percentiles, extremes = {"p10_ms", "p90_ms", "p90_over_p10"}, {"min_ms", "max_ms", "max_over_min"}

    def few(r):
        return (r["repeats"] < common.PERCENTILE_MIN_REPEATS and not percentiles & set(r) and extremes <= set(r)
                and r["min_ms"] <= r["median_ms"] <= r["max_ms"] and r["max_over_min"] == r["max_ms"] / r["min_ms"])

    def many(r):
        return (r["repeats"] >= common.PERCENTILE_MIN_REPEATS and percentiles <= set(r) and not extremes & set(r)
                and r["p10_ms"] <= r["median_ms"] <= r["p90_ms"])

    for mod in (vq, sampling, cross_entropy):
        doc = json.loads(mod.run(quick=True, device="cpu", out_dir=tmp_path).read_text())
        timed = [r for r in doc["rows"] if "median_ms" in r]
        assert timed and all(few(r) for r in timed), (mod.__name__, timed)
    gen = torch.Generator().manual_seed(0)
    for quick, honest in ((True, few), (False, many)):  # quick: 5 repeats; a full run: 100
        rows = attention.run_decode([("d", 32, 5, 1)], 2, 16, torch.float32, torch.device("cpu"), quick, gen)
        timed = [r for r in rows if "median_ms" in r]
        assert timed and all(honest(r) for r in timed), (quick, timed)

    class Sets:
        def next(self):
            return ()

        def info(self):
            return {"inputs_rotated": False}

    fns = {"torch": lambda: None, "native": lambda: None}
    for repeats, honest in ((5, few), (10, few), (11, many), (20, many)):
        stats = cpu_ops.interleaved(fns, Sets(), warmup=1, repeats=repeats)
        rows = cpu_ops._rows("op", "case", stats, {"bytes": 1}, Sets())
        assert [r["impl"] for r in rows] == ["worldvla-torch", "worldvla-native"]
        assert all(honest(r) for r in rows), (repeats, rows)
        assert all(common.row_spread(r) == (r.get("p90_over_p10") or r["max_over_min"]) for r in rows)


def test_a_quick_sass_run_keeps_off_the_full_report(tmp_path, monkeypatch):
    """`bench --quick` runs every benchmark, sass too, which ignored --quick and wrote sass-<arch>.json: from the
    repository root it replaced the committed report. A quick run writes sass-<arch>-quick.json, as every other."""
    from worldvla.benchmarks import sass

    monkeypatch.setattr(sass, "report", lambda files, arch: [{"file": "a.cu", "kernel": "k"}])
    monkeypatch.setattr(sass, "nvcc_version", lambda: "12.4")
    full = sass.run(out_dir=tmp_path, files=["a.cu"])
    quick = sass.run(quick=True, out_dir=tmp_path, files=["a.cu"])
    assert (full.name, quick.name) == ("sass-sm_90a.json", "sass-sm_90a-quick.json")


def test_stats_give_the_median_and_rank_percentiles_of_skewed_times():
    """One slow outlier (a descheduled call) must not move the row's time: the median, not the mean; p10 and p90
    are the sorted times' int(0.1 n)-th and int(0.9 n)-th."""
    few = common._stats([1.0, 1.0, 2.0, 1.0, 100.0])
    assert few["median_ms"] == 1.0 and few["max_ms"] == 100.0
    many = [float(t) for t in range(20)] + [1000.0]  # 21 times
    st = common._stats(many)
    assert st["median_ms"] == 10.0 and (st["p10_ms"], st["p90_ms"]) == (2.0, 18.0)
    st = common._stats([float(t) for t in range(20)])
    assert (st["p10_ms"], st["p90_ms"]) == (2.0, 18.0)


def test_timing_runs_every_warmup_and_repeat_and_times_only_the_call():
    """time_fn: `warmup` untimed calls, then `repeats` timed ones, each after its `setup()`, which stays out of
    the time; time_interleaved: the same calls for every side, one of each a round in a turning order, every
    timed round recorded (the first timed call included)."""
    import time

    calls = []
    st = common.time_fn(lambda: calls.append(1), warmup=3, repeats=5, setup=lambda: time.sleep(0.02))
    assert len(calls) == 3 + 5 and st["median_ms"] < 10  # 20 ms of setup before every call, none of it timed

    order = []

    def side(name):
        def call():
            order.append(name)
            if sum(n == name for n in order) == 2 + 1:  # each side's first timed call is its slow one
                time.sleep(0.03)
        return call

    out = common.time_interleaved({"a": side("a"), "b": side("b"), "c": side("c")}, warmup=2, repeats=3)
    assert order == ["a", "b", "c", "b", "c", "a", "c", "a", "b", "a", "b", "c", "b", "c", "a"]
    for name, s in out.items():
        assert s["max_ms"] >= 30 and s["repeats"] == 3 and s["warmup"] == 2, (name, s)


def test_decode_rows_count_visible_pairs_and_the_whole_cache_of_every_sequence():
    """A decode row's TFLOP/s counts only the visible (query, key) pairs (4*H*Dh each), not the slots the mask
    hides; its cache_gbps reads K and V of every sequence of the batch once."""
    from worldvla.benchmarks import attention as A

    batch, H, Dh = 2, 2, 16
    rows = A.run_decode([("d", 32, 5, batch)], H, Dh, torch.float32, torch.device("cpu"), True,
                        torch.Generator().manual_seed(0))
    timed = [r for r in rows if "median_ms" in r]
    assert timed
    for r in timed:
        assert r["visible_pairs"] < batch * 5 * r["tokens"]  # the chunk rule hides slots
        sec = r["median_ms"] * 1e-3
        assert r["tflops"] == pytest.approx(4 * r["visible_pairs"] * H * Dh / sec / 1e12)
        assert r["cache_gbps"] == pytest.approx(2 * batch * r["tokens"] * H * Dh * 4 / sec / 1e9)


def test_attention_speedups_compare_rows_of_one_case_and_mode():
    """speedup_vs_<baseline> is the baseline's median over the row's, both of the same case and mode: a
    forward row never reads a forward + backward baseline, nor another case's."""
    from worldvla.benchmarks import attention as A

    rows = [{"case": c, "impl": i, "mode": m, "median_ms": ms}
            for c, i, m, ms in (("x", "worldvla-torch", "fwd", 1.0), ("x", "flex", "fwd", 3.0),
                                ("x", "worldvla-torch", "fwd+bwd", 4.0), ("x", "flex", "fwd+bwd", 20.0),
                                ("y", "worldvla-torch", "fwd", 2.0), ("y", "flex", "fwd", 10.0))]
    rows.append({"case": "x", "impl": "worldvla-native", "mode": "fwd+bwd", "error": "forward only"})
    A.add_speedups(rows, refs=("flex",))
    got = {(r["case"], r["impl"], r["mode"]): r.get("speedup_vs_flex") for r in rows}
    assert got == {("x", "worldvla-torch", "fwd"): 3.0, ("x", "flex", "fwd"): 1.0,
                   ("x", "worldvla-torch", "fwd+bwd"): 5.0, ("x", "flex", "fwd+bwd"): 1.0,
                   ("y", "worldvla-torch", "fwd"): 5.0, ("y", "flex", "fwd"): 1.0,
                   ("x", "worldvla-native", "fwd+bwd"): None}


def test_error_bound_refuses_non_finite_outputs_and_adds_its_floor():
    """bound_errors: within 2x the same-precision error plus the floor, and finite: an output with a NaN is never
    within bound, whatever its other elements."""
    ref = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    same = torch.tensor([1.0, 2.0, 3.25])  # error 0.25 (every value here exact in float32)
    ok, err, base = common.bound_errors(torch.tensor([1.0, 2.0, 3.5]), ref, same)
    assert ok and (err, base) == (0.5, 0.25)
    assert not common.bound_errors(torch.tensor([1.0, 2.0, 3.75]), ref, same)[0]
    assert common.bound_errors(torch.tensor([1.0, 2.0, 3.75]), ref, same, floor=0.25)[0]
    assert common.bound_errors(torch.tensor([1.0, 2.0, 3.75]), ref, 0.25, floor=0.25)[0]  # the error given as a float
    assert not common.bound_errors(torch.tensor([1.0, float("nan"), 3.0]), ref, same, floor=1.0)[0]
    assert not common.bound_errors(torch.tensor([1.0, float("inf"), 3.0]), ref, float("inf"))[0]
    ok, line = common.bound_check(torch.tensor([1.0, 2.0, 3.5]), ref, same)
    assert ok and line.startswith("err 0.5 <= 2 x 0.25")


def test_rotation_budget_is_at_most_a_quarter_of_free_memory(monkeypatch):
    monkeypatch.setattr(common, "_available_memory", lambda device: 400 << 20)
    assert common.rotation_budget("cpu") == 100 << 20  # under ROTATION_BUDGET: the free memory decides
    monkeypatch.setattr(common, "_available_memory", lambda device: 64 << 30)
    assert common.rotation_budget("cpu") == common.ROTATION_BUDGET
    assert common.rotation_budget("cpu", quick=True) == common.QUICK_ROTATION_BUDGET
    monkeypatch.setattr(common, "_available_memory", lambda device: 0)  # unknown: no set beyond the first
    monkeypatch.setattr(common, "cache_info", lambda device: ("L3", 32 << 20))
    assert common.rotation_count(1 << 20, "cpu") == 1


def test_cpu_last_level_cache_sums_its_distinct_instances(monkeypatch, tmp_path):
    """A machine with two L3 slices (two sockets, or AMD's core complexes) has twice one slice's cache: the sets
    must overflow both. Each instance counts once however many CPUs share it; instruction caches never count."""
    from pathlib import Path

    def cache(cpu, index, level, size, shared, kind="Unified"):
        d = tmp_path / f"sys/devices/system/cpu/cpu{cpu}/cache/index{index}"
        d.mkdir(parents=True)
        for name, text in (("type", kind), ("level", str(level)), ("size", size), ("shared_cpu_list", shared)):
            (d / name).write_text(text + "\n")

    for cpu in range(4):
        cache(cpu, 0, 1, "32K", str(cpu), "Data")
        cache(cpu, 1, 1, "32K", str(cpu), "Instruction")
        cache(cpu, 2, 2, "1024K", str(cpu))
        cache(cpu, 3, 3, "16384K", "0-1" if cpu < 2 else "2-3")
    monkeypatch.setattr(common, "Path", lambda p: Path(str(tmp_path) + str(p)))
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    common.cpu_last_level_cache.cache_clear()
    try:
        assert common.cpu_last_level_cache() == ("L3", 32 << 20)
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})  # a process held to one slice
        common.cpu_last_level_cache.cache_clear()
        assert common.cpu_last_level_cache() == ("L3", 16 << 20)
    finally:
        common.cpu_last_level_cache.cache_clear()


def test_rotation_counts_what_each_extra_set_allocates_against_the_budget(monkeypatch):
    """Sets sized by what a call reads (1 MiB of a 8 MiB tensor) still allocate the whole tensor each: the
    budget caps the count by what each set allocates, not by what it reads."""
    monkeypatch.setattr(common, "cache_info", lambda device: ("L3", 32 << 20))
    rot = common.Rotation(lambda i: (torch.zeros(2 << 20),), "cpu", bytes_per_set=1 << 20, budget_bytes=64 << 20)
    assert rot.bytes_per_set == 1 << 20 and len(rot) == 8  # 64 MiB / 8 MiB, not the 96 sets 3 x 32 MiB asks for
    assert rot.info()["inputs_cache_hot"] is True  # 8 x 1 MiB read: within the 32 MiB cache


def test_attention_check_reads_every_gradient():
    """A side's q, k and v gradients are all compared: a wrong first one fails the side though the last is right."""
    from worldvla.benchmarks import attention as A

    want = tuple(torch.randn(6, 2, 4, generator=torch.Generator().manual_seed(i), dtype=torch.float64)
                 for i in range(3))
    got = tuple(w.float() for w in want)
    assert A.check(got, want, torch.float32)["matches_reference"] is True
    wrong = (got[0] * 2, got[1], got[2])
    out = A.check(wrong, want, torch.float32)
    assert out["matches_reference"] is False and out["worst_over_tolerance"] > 1
    assert out["max_abs_err"] == pytest.approx(float(want[0].abs().max()), rel=1e-6)


def test_timings_refuse_call_counts_that_give_no_median():
    """No timed call (repeats 0) or a negative warm-up is refused by name, before anything runs."""
    from benchmarks import common

    calls = []
    for kw, name in (({"repeats": 0}, "repeats"), ({"warmup": -1}, "warmup"), ({"repeats": 2.5}, "repeats")):
        with pytest.raises(ValueError, match=f"{name} must be an integer"):
            common.time_fn(lambda: calls.append(1), **kw)
        with pytest.raises(ValueError, match=f"{name} must be an integer"):
            common.time_interleaved({"a": lambda: calls.append(1)}, **kw)
    assert not calls
    assert common.time_fn(lambda: calls.append(1), warmup=0, repeats=1)["median_ms"] >= 0


# ------------------------------------------------------------------ serve_load's traffic and rows
class _StubClient:
    """A PolicyClient's context-manager shell, for stand-ins that script its replies."""

    def __init__(self, url, timeout):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_serve_load_robot_times_only_the_requests_served(monkeypatch):
    """A load-phase robot timed every request, a refused or timed-out one too: a queue that refused fast pulled the
    percentiles down and counted refusals as throughput. Only answered requests with finite float32 actions give a
    latency; the others are failures. Each robot starts an episode before its first request and every
    `steps_per_episode` requests after, and sends at most `max_requests`."""
    import threading
    import time

    import numpy as np

    from worldvla.benchmarks import serve_load

    log = []

    class Client(_StubClient):

        def reset(self, instruction):
            log.append("reset")

        def act(self, frame):
            log.append("act")
            n = log.count("act")
            if n == 2:
                time.sleep(0.3)  # waited, then gave up: no latency, however long
                raise TimeoutError("no reply")
            if n == 3:
                raise serve_load.PolicyServerError("queue full")
            if n == 4:
                return np.full((5, 7), np.nan, dtype=np.float32)
            return np.zeros((5, 7), dtype=np.float32)

    monkeypatch.setattr(serve_load, "PolicyClient", Client)
    lat, failures = [], []
    serve_load._robot("ws://test", np.random.default_rng(0), 8, (12, 16), 3, threading.Event(), 7, lat, failures,
                      threading.Barrier(1), False)
    assert log == ["reset", "act", "act", "act", "reset", "act", "act", "act", "reset", "act"]
    assert [f.split(":")[0].split(" ")[0] for f in failures] == ["TimeoutError", "PolicyServerError", "bad"]
    assert len(lat) == 7 - 3 and max(lat) < 300


def test_serve_load_rows_take_each_percentile_from_its_own_list():
    """A phase's p50 / p90 / p99, max and throughput come from its round trips (requests over the phase's wall
    time); the single robot's in-process floor from the in-process calls, the served policy time from the
    server's policy times, and the overhead pairs each round trip with its own request's policy time (lists of
    different lengths are refused: they could not be paired)."""
    from worldvla.benchmarks import serve_load

    lat = [float(t) for t in range(1, 101)]  # 1..100 ms
    s = serve_load._summary(lat, 4.0)
    assert (s["requests"], s["max_ms"], s["throughput_rps"]) == (100, 100.0, 25.0)
    assert (s["p50_ms"], s["p90_ms"], s["p99_ms"]) == pytest.approx((50.5, 90.1, 99.01))
    assert serve_load._summary([], 1.0) == {"requests": 0, "p50_ms": None, "p90_ms": None, "p99_ms": None,
                                            "max_ms": None, "throughput_rps": 0.0}

    policy = [t - 2.0 for t in lat]
    server = [t - 1.0 for t in lat]
    inproc = [float(t) for t in range(201, 301)]
    row = serve_load.single_robot_row(lat, policy, server, inproc, 5.0, 3)
    assert row["failed_valid"] == 3 and row["throughput_rps"] == 20.0 and row["p99_ms"] == pytest.approx(99.01)
    assert (row["inproc_p50_ms"], row["inproc_p99_ms"]) == pytest.approx((250.5, 299.01))
    assert row["served_policy_p50_ms"] == pytest.approx(48.5) and row["server_side_p50_ms"] == pytest.approx(49.5)
    assert row["rtt_minus_policy_p50_ms"] == row["rtt_minus_policy_p99_ms"] == pytest.approx(2.0)
    with pytest.raises(ValueError):
        serve_load.single_robot_row(lat, policy[:-1], server, inproc, 5.0, 0)


def test_serve_load_in_process_floor_times_its_calls_after_an_untimed_warm_up():
    """The in-process floor: three untimed warm-up calls (the first ones pay for allocation), then `repeats`
    timed calls, each on a batch of `batch` frames and the previous frames, after a reset of as many episodes."""
    import time

    import numpy as np

    from worldvla.benchmarks import serve_load

    calls, resets = [], []

    class Policy:
        def reset(self, instructions):
            resets.append(len(instructions))

        def act(self, images, history=None):
            calls.append((images.shape, None if history is None else history.shape))
            if len(calls) <= 3:
                time.sleep(0.2)  # a cold start: must stay out of the floor
            return np.zeros((len(images), 5, 7), dtype=np.float32)

    out = serve_load.in_process_latency(Policy(), 16, 4, np.random.default_rng(0), batch=3)
    assert len(out) == 4 and max(out) < 200 and resets == [3]
    assert calls == [((3, 16, 16, 3), (3, 16, 16, 3))] * (3 + 4)


def test_serve_load_bad_client_counts_only_real_refusals(monkeypatch):
    """A malformed request counts as refused when the server answers ok: false with an error, or closes with
    1009 (message too big) on the payload over twice the limit; an accepted one, or any other close, counts as
    not refused (and the client reconnects). At most `max_requests` are sent, each counted."""
    import threading
    import types

    import numpy as np

    from worldvla.benchmarks import serve_load

    replies = {"refused": {"ok": False, "error": "bad request"}, "accepted": {"ok": True}}

    class Closed(Exception):
        rcvd = types.SimpleNamespace(code=1009)

    connects, resets = [], []

    class Socket:
        def __init__(self):
            self.last = None

        def send(self, msg):
            self.last = msg

        def recv(self, timeout):
            if self.last in ("closed", "over-2x-limit"):
                raise Closed("message too big")
            if isinstance(self.last, bytes):  # the episode's reset, on every new connection
                assert serve_load.unpackb(self.last)["type"] == "reset"
                resets.append(self)
            return serve_load.packb(replies.get(self.last, {"ok": True}))

        def close(self):
            pass

    def connect(url):
        connects.append(url)
        return Socket()

    kinds = ["refused", "accepted", "closed", "over-2x-limit"]
    monkeypatch.setattr(serve_load, "_connect_raw", connect)
    monkeypatch.setattr(serve_load, "_bad_payloads",
                        lambda rng, size, limit, episode: [(k, lambda k=k: k) for k in kinds])
    record = {"sent": 0, "refused": 0, "not_refused": []}
    serve_load._bad_client("ws://test", np.random.default_rng(0), 8, 1024, threading.Event(), 6, record)
    assert record["sent"] == 6 and record["refused"] == 3  # refused, over-2x-limit, refused
    assert [k.split(":")[0] for k in record["not_refused"]] == ["accepted", "closed", "accepted"]
    assert len(connects) == 1 + 2  # a new connection after each close
    assert len(resets) == 3  # each opens the client's episode again


def test_serve_load_policy_runs_one_torch_thread_on_the_cpu():
    """On the CPU both processes run one torch thread unless --torch-threads says otherwise (a busy machine makes
    multi-threaded timings erratic); on CUDA torch's default."""
    from worldvla.benchmarks import serve_load

    def spec(*argv):
        return serve_load._policy_spec(serve_load.parse_args(["--policy", "synthetic", *argv]), "unused")[0]

    assert spec("--device", "cpu")["threads"] == 1 and spec("--device", "cuda")["threads"] is None
    assert spec("--device", "cpu", "--torch-threads", "3")["threads"] == 3
    assert spec("--device", "cpu")["kind"] == "synthetic"
    quick = serve_load.parse_args(["--quick"])  # as --help says: 3 robots, 1 bad client, 5 s, 40 each, 30 sequential
    assert (quick.clients, quick.bad_clients, quick.duration_s, quick.requests, quick.sequential) == (3, 1, 5.0, 40, 30)


def test_cpu_ops_rows_count_each_cases_work_and_compare_with_torch(tmp_path, monkeypatch):
    """Each cpu_ops row's rate is its case's work over its median: prefill 4 H Dh per visible pair, decode the K
    and V caches read once, sampling 2 N range H, the VQ search 2 N K C, the projections their weights once and
    2 M per weight, the decoder layers their weights and K/V caches, the gather its rows read and written;
    speedup_vs_torch is torch's median over the row's (above 1: faster than torch). Medians fixed here, so the
    rates are exact."""
    pytest.importorskip("worldvla._C")
    import re

    from worldvla.benchmarks import cpu_ops
    from worldvla.model import ModelConfig, WorldVLA

    medians = {"torch": 2.0, "native": 1.0, "native-w8": 4.0}
    monkeypatch.setattr(cpu_ops, "interleaved", lambda fns, rot, warmup, repeats: {
        name: {"median_ms": medians[name], "repeats": repeats} for name in fns})
    pairs = []
    real_pairs = cpu_ops.visible_pairs
    monkeypatch.setattr(cpu_ops, "visible_pairs", lambda meta: pairs.append(real_pairs(meta)) or pairs[-1])
    doc = json.loads(cpu_ops.run(quick=True, out_dir=tmp_path).read_text())
    with torch.device("meta"):
        cfg = ModelConfig.small()
        n_w = sum(p.numel() for layer in WorldVLA(cfg).model.layers for p in layer.parameters())
    weights = 4 * (4 * 256 * 256 + 3 * 688 * 256)
    seen = set()
    for r in doc["rows"]:
        n = [int(x) for x in re.findall(r"\d+", r["case"])]
        sec = medians[r["impl"].removeprefix("worldvla-")] * 1e-3
        assert r["speedup_vs_torch"] == medians["torch"] / r["median_ms"], r
        work = {"masked_attention": lambda H, D, T: {"flops": 4 * H * D * pairs[0]},
                "decode_attention": lambda H, D, K, S: {"bytes": 2 * S * H * D * 4},
                "constrained_sample": lambda N, H, R: {"flops": 2 * N * R * H},
                "vq_quantize": lambda N, K, C: {"flops": 2 * N * K * C},
                "linear": lambda M, _28: {"bytes": weights * 4, "flops": 2 * M * weights},
                "decoder_layer": lambda B, Q, P, _4: {
                    "bytes": 4 * (n_w + 2 * cfg.num_hidden_layers * B * (P + Q) * cfg.num_key_value_heads
                                  * cfg.head_dim), "flops": 2 * B * Q * n_w},
                "vq_gather": lambda B, h, _h, K, C: {"bytes": B * h * h * C * 4 * 2}}[r["op"]](*n)
        assert r.get("GFLOPs") == (work["flops"] / sec / 1e9 if "flops" in work else None), r
        assert r.get("GBps") == (work["bytes"] / sec / 1e9 if "bytes" in work else None), r
        seen.add(r["op"])
    assert len(pairs) == 1 and seen == {"masked_attention", "decode_attention", "constrained_sample", "vq_quantize",
                                        "linear", "decoder_layer", "vq_gather"}


# ------------------------------------------------------------------ the static SASS report, read from text
PTXAS_LOG = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_Z3fooPf' for 'sm_90a'
ptxas info    : Function properties for _Z3fooPf
    16 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 96 registers, used 1 barriers, 16384 bytes smem, 400 bytes cmem[0]
ptxas info    : (C7520) Potential Performance Loss: wgmma.mma_async instructions are serialized due to the presence \
of Extern calls in the function '_Z3fooPf'
ptxas info    : Compiling entry function '_Z3barPf' for 'sm_90a'
ptxas info    : Function properties for _Z3barPf
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 32 registers, 384 bytes cmem[0]
"""

SASS_DUMP = """\
\tcode for sm_90a
\t\tFunction : _Z3fooPf
\t.headerflags\t@"EF_CUDA_SM90 EF_CUDA_VIRTUAL_SM(EF_CUDA_SM90)"
        /*0000*/                   LDC R1, c[0x0][0x28] ;                 /* 0x00000a00ff017b82 */
                                                                          /* 0x000fe40000000800 */
        /*0010*/                   LDG.E R2, desc[UR4][R2.64] ;
        /*0020*/                   LDS.128 R4, [R0] ;
        /*0030*/                   LDSM.16.M88.4 R8, [R0] ;
        /*0040*/                   HMMA.16816.F32 R12, R8, R4, R12 ;
        /*0050*/                   HMMA.16816.F32 R16, R8, R6, R16 ;
        /*0060*/                   LDGSTS.E.128 [R0], desc[UR4][R2.64] ;
        /*0070*/               @P0 BRA 0x30 ;
        /*0080*/                   STS [R0], R12 ;
        /*0090*/               @P1 BRA 0x20 ;
        /*00a0*/                   STG.E desc[UR4][R2.64], R12 ;
        /*00b0*/                   EXIT ;
        /*00c0*/                   BRA 0xc0 ;
\t\t..........
\t\tFunction : _Z3barPf
        /*0000*/                   LDS R2, [R0] ;
        /*0010*/                   FADD R2, R2, 1 ;
        /*0020*/               @P0 BRA 0x0 ;
        /*0030*/                   EXIT ;
\t\t..........
\t\tFunction : _Z3bazPf
        /*0000*/                   HGMMA.64x64x16.F32 R24, gdesc[UR4], RZ, !UPT ;
        /*0010*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;
        /*0020*/               @P0 BRA 0x0 ;
        /*0030*/                   EXIT ;
"""


def test_sass_report_reads_ptxas_and_the_innermost_mma_loop_from_text():
    """Without nvcc: ptxas' registers, shared memory, stack and spills (stores and loads apart) and its wgmma
    serialization warning, per kernel; from the SASS each opcode counted whole (LDS is not LDSM, LDG is not
    LDGSTS), and the hot loop is the innermost backward branch's body that issues HMMA or HGMMA (a loop without
    MMAs is none), head and branch included, its global loads both LDG and LDGSTS."""
    import shutil

    from worldvla.benchmarks import sass

    ptx = sass.parse_ptxas(PTXAS_LOG)
    assert ptx == {"_Z3fooPf": {"stack_bytes": 16, "spill_store_bytes": 8, "spill_load_bytes": 4, "registers": 96,
                                "smem_bytes": 16384, "wgmma_serialized": "the presence of Extern calls"},
                   "_Z3barPf": {"stack_bytes": 0, "spill_store_bytes": 0, "spill_load_bytes": 0, "registers": 32,
                                "smem_bytes": 0}}
    rows = sass.parse_sass(SASS_DUMP)
    foo, bar, baz = rows["_Z3fooPf"], rows["_Z3barPf"], rows["_Z3bazPf"]
    assert foo["sass_instructions"] == 13
    assert {op: foo[op] for op in ("hmma", "hgmma", "ldsm", "lds", "ldgsts", "ldg", "sts", "stg")} == {
        "hmma": 2, "hgmma": 0, "ldsm": 1, "lds": 1, "ldgsts": 1, "ldg": 1, "sts": 1, "stg": 1}
    assert {k: v for k, v in foo.items() if k.startswith(("hot_loop", "instructions_per"))} == {
        "hot_loop_instructions": 5, "hot_loop_hmma": 2, "hot_loop_hgmma": 0, "hot_loop_ldsm": 1,
        "hot_loop_global_loads": 1, "instructions_per_hmma": 2.5}
    assert bar["lds"] == 1 and not any(k.startswith("hot_loop") for k in bar)
    assert (baz["hot_loop_instructions"], baz["hot_loop_hgmma"], baz["hot_loop_hmma"]) == (3, 1, 0)
    assert baz["instructions_per_hgmma"] == 3.0 and "instructions_per_hmma" not in baz
    if shutil.which("c++filt"):
        assert sass.demangle(["_ZN8worldvla12_GLOBAL__N_13fooEPf", "_Z3barPf"]) == {
            "_ZN8worldvla12_GLOBAL__N_13fooEPf": "foo", "_Z3barPf": "bar"}


def test_sass_report_without_cuobjdump_is_unavailable(monkeypatch, tmp_path):
    """nvcc alone cannot give the SASS: the report says what is missing rather than failing on a missing tool."""
    from worldvla.benchmarks import sass

    monkeypatch.setattr(sass, "find_tool", lambda name: f"/no/such/bin/{name}" if name == "nvcc" else None)
    with pytest.raises(sass.Unavailable, match="cuobjdump=None"):
        sass.report([tmp_path / "a.cu"])


def test_cpu_ops_gather_needs_as_many_codes_as_rows():
    """A gather's sets name B*h*h distinct codes: K equal to that is enough, one fewer is refused by name."""
    from worldvla.benchmarks import cpu_ops

    rot = cpu_ops.gather_rotation(1, 4, 16, 8, torch.Generator().manual_seed(0), quick=True)
    assert all(sorted(idx.flatten().tolist()) == list(range(16)) for idx, _ in rot.sets)
    with pytest.raises(ValueError, match="16 distinct rows needs at least as many codes, got K=15"):
        cpu_ops.gather_rotation(1, 4, 15, 8, torch.Generator().manual_seed(0), quick=True)


# ------------------------------------------------------------------ the sanitizer driver's checks
def test_sanitize_gap_check_judges_the_worst_row_and_the_index_dtype():
    """An argmin/argmax kernel is judged by its worst row's score gap (one wrong row among many right ones
    fails) and must return int64 indices, as the ops do."""
    from worldvla.benchmarks import sanitize

    scores = torch.arange(40, dtype=torch.float64).view(10, 4)  # every row's best is its last column
    right = torch.full((10,), 3)
    assert sanitize.gap_check(right, scores, right)[0] is True
    one_wrong = right.clone()
    one_wrong[7] = 1
    ok, msg = sanitize.gap_check(one_wrong, scores, right)
    assert ok is False and msg.startswith("gap 2 <= 2 x 0")
    assert sanitize.gap_check(right.int(), scores, right)[0] is False


def test_sanitize_driver_fails_a_check_that_raises(monkeypatch, capsys):
    """A kernel that raises (a launch error, an illegal address) is a failed check, never a skipped one."""
    from worldvla.benchmarks import sanitize

    def broken(idx, cb, backend):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(sanitize.ops, "vq_gather", broken)
    assert sanitize.run("native", "cpu", only="vq_gather") == 1
    out = capsys.readouterr().out
    assert "FAIL  vq_gather fp32: RuntimeError: CUDA error" in out and "1 failed" in out
    assert "skip  vq_gather fp32:" not in out


def test_sanitize_gradient_checks_fail_on_any_one_wrong_gradient(monkeypatch):
    """The backward checks compare every gradient: dq wrong (dk, dv right) fails the attention check; the
    head's gradient wrong (the loss right) fails the cross-entropy check."""
    from worldvla.benchmarks import sanitize

    def twice_the_grad(x):  # the same value, twice the gradient
        return 2 * x - x.detach()

    real_attention, real_ce = sanitize.ops.masked_attention, sanitize.ops.linear_cross_entropy
    assert sanitize.check_prefill_backward("torch", torch.device("cpu"), torch.Generator().manual_seed(0))[0]
    monkeypatch.setattr(sanitize.ops, "masked_attention",
                        lambda q, k, v, meta, backend: real_attention(twice_the_grad(q), k, v, meta, backend=backend))
    ok, msg = sanitize.check_prefill_backward("torch", torch.device("cpu"), torch.Generator().manual_seed(0))
    assert ok is False and msg.startswith("dq err")

    assert sanitize.check_linear_ce("torch", torch.device("cpu"), torch.Generator().manual_seed(0))[0]
    monkeypatch.setattr(sanitize.ops, "linear_cross_entropy",
                        lambda h, w, *a, **kw: real_ce(h, twice_the_grad(w), *a, **kw))
    assert sanitize.check_linear_ce("torch", torch.device("cpu"), torch.Generator().manual_seed(0))[0] is False


# ------------------------------------------------------------------ kernel benchmarks' rows, medians fixed
def _fixed_medians(medians):
    """A time_interleaved that times nothing: each side's median from `medians`, the rotation's record kept."""
    def fake(fns, **kw):
        rot = kw.get("rotation")
        return {name: {"median_ms": medians[name], "repeats": kw["repeats"], "warmup": kw["warmup"],
                       **(rot.info() if rot is not None else {})} for name in fns}
    return fake


def test_vq_and_sampling_rows_divide_the_baselines_time_by_theirs(tmp_path, monkeypatch):
    """speedup_vs_cdist / speedup_vs_full are the baseline's median over the row's (above 1: faster); the VQ
    rows' tflops are 2 N K C over the median; argmin_agreement and agrees_with_full compare each side's output
    with the baseline's (a side picking the wrong codes or ids shows it), in_range says whether every id is in
    [lo, hi); the sampling sets are sized by the hidden rows and the range's weight rows."""
    from worldvla import VocabLayout
    from worldvla.benchmarks import sampling, vq

    real_quantize, real_sample = ops.vq_quantize, ops.constrained_sample
    monkeypatch.setattr(ops, "vq_quantize", lambda z, cb, backend: (
        torch.zeros(z.shape[0], dtype=torch.long) if backend == "torch" else real_quantize(z, cb, backend=backend)))
    monkeypatch.setattr(ops, "constrained_sample", lambda h, w, lo, hi, backend: (
        torch.full((h.shape[0],), hi) if backend == "torch" else real_sample(h, w, lo, hi, backend=backend)))

    monkeypatch.setattr(vq, "time_interleaved", _fixed_medians(
        {"cdist+argmin": 3.0, "worldvla-torch": 6.0, "worldvla-native": 1.5}))
    rows = json.loads(vq.run(quick=True, device="cpu", out_dir=tmp_path).read_text())["rows"]
    got = {r["impl"]: r for r in rows}
    assert set(got) == {"cdist+argmin", "worldvla-torch", "worldvla-native"}
    assert [got[n]["speedup_vs_cdist"] for n in ("cdist+argmin", "worldvla-torch", "worldvla-native")] == [1, .5, 2]
    for r in rows:
        assert r["tflops"] == 2 * r["N"] * r["K"] * r["C"] / (r["median_ms"] * 1e-3) / 1e12
    assert got["worldvla-native"]["argmin_agreement"] == got["cdist+argmin"]["argmin_agreement"] == 1.0
    assert got["worldvla-torch"]["argmin_agreement"] < 0.1

    monkeypatch.setattr(sampling, "time_interleaved", _fixed_medians(
        {"full-vocab": 2.0, "worldvla-torch": 1.0, "worldvla-native": 0.5}))
    rows = json.loads(sampling.run(quick=True, device="cpu", out_dir=tmp_path).read_text())["rows"]
    lo, hi = VocabLayout.chameleon().bin_range
    assert sorted({r["rows"] for r in rows}) == [1, 5, 10] and len(rows) == 3 * 3
    for r in rows:
        assert r["speedup_vs_full"] == 2.0 / r["median_ms"] and r["range"] == hi - lo
        assert r["set_bytes"] == (r["rows"] + r["range"]) * r["hidden"] * 4
        broken = r["impl"] == "worldvla-torch"  # always answers `hi`: one past the range
        assert r["in_range"] is not broken and r["agrees_with_full"] == (0.0 if broken else 1.0), r


def cross_entropy_case(seed: int = 0):
    """(h, w, y, rows, cw): a small random cross-entropy case for check_sides, 24 rows x hidden 16 x 40 ids, the
    hidden states and head requiring grad, class weights in [0.5, 1.5)."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(24, 16, generator=g, requires_grad=True)
    w = (torch.randn(40, 16, generator=g) * 0.3).requires_grad_()
    y = torch.randint(0, 40, (24,), generator=g)
    cw = torch.rand(40, generator=g) + 0.5
    return h, w, y, torch.arange(24), cw


def test_cross_entropy_check_fails_a_side_with_only_its_hidden_gradient_wrong():
    """Every quantity counts: the right loss and head gradient do not make up for a wrong hidden gradient."""
    from worldvla.benchmarks import cross_entropy as CE

    h, w, y, rows, cw = cross_entropy_case()

    def wrong_hidden(h, w, y, rows):
        return CE.naive_linear_cross_entropy(2 * h - h.detach(), w, y, rows, cw)

    out = CE.check_sides({"wrong": wrong_hidden}, h, w, y, rows, cw)["wrong"]
    assert out["matches_reference"] is False and out["worst_over_tolerance"] > 1
    assert out["max_abs_err"]["grad_hidden"] > 0 and out["max_abs_err"]["loss"] < 1e-5


def test_cross_entropy_rows_compare_time_and_memory_with_the_naive_side(tmp_path, monkeypatch):
    """time_vs_naive and memory_vs_naive are the side's over the naive side's (below 1: faster, smaller); a side
    that does not match the reference fails the run once the JSON is written."""
    import types

    from worldvla.benchmarks import cross_entropy as CE

    real = ops.linear_cross_entropy
    monkeypatch.setattr(CE, "timed_backends", lambda op: ["torch", "fused"])
    monkeypatch.setattr(CE, "ops", types.SimpleNamespace(
        dispatch=types.SimpleNamespace(supports=lambda *a: True),
        linear_cross_entropy=lambda h, w, y, cw, z, backend: real(h, w, y, cw, z, backend="torch")))
    monkeypatch.setattr(CE, "time_interleaved", _fixed_medians({"naive": 4.0, "worldvla-fused": 1.0}))
    peaks = iter([1000, 250])
    monkeypatch.setattr(CE, "peak_memory", lambda fn, device: next(peaks))
    rows = json.loads(CE.run(quick=True, device="cpu", out_dir=tmp_path).read_text())["rows"]
    got = {r["impl"]: (r["time_vs_naive"], r["memory_vs_naive"], r["matches_reference"]) for r in rows}
    assert got == {"naive": (1.0, 1.0, True), "worldvla-fused": (0.25, 0.25, True)}

    checked = CE.check_sides
    monkeypatch.setattr(CE, "check_sides", lambda impls, *a: {
        n: {**f, "matches_reference": n == "naive"} for n, f in checked(impls, *a).items()})
    peaks = iter([1000, 250])
    with pytest.raises(RuntimeError, match="1 side.s. do not match the reference: N=128 worldvla-fused"):
        CE.run(quick=True, device="cpu", out_dir=tmp_path)


def test_train_rows_count_real_tokens_and_each_sides_own_work(tmp_path, monkeypatch):
    """tokens_per_s counts the real tokens (padding excluded) over the median step; useful_flops (the MFU's
    numerator) is the same model work for both sides, side_flops what each side runs: the reference-style side
    its layers and head on every padded position and attention on every pair of each padded sequence. The
    documents' labels start after the prompt's separator."""
    from worldvla.benchmarks import train
    from worldvla.model import ModelConfig, WorldVLA

    samples = train._samples(3, 256, torch.Generator().manual_seed(0))
    for ids, labels in samples:
        sep = int((ids == train.LAYOUT.sep).nonzero()[0])
        assert bool((labels[:sep + 1] == -100).all()) and torch.equal(labels[sep + 1:], ids[sep + 1:])

    monkeypatch.setattr(ModelConfig, "small", classmethod(lambda cls, layout=None, **kw: cls.tiny(layout, **kw)))
    monkeypatch.setattr(train, "time_interleaved", _fixed_medians({"worldvla": 50.0, "reference-style": 200.0}))
    monkeypatch.setattr(train, "peak_memory", lambda fn, device: 1)
    ours, ref = json.loads(train.run(quick=True, device="cpu", out_dir=tmp_path).read_text())["rows"]
    with torch.device("meta"):
        model = WorldVLA(ModelConfig.tiny(train.LAYOUT))
    for r in (ours, ref):
        sec = r["median_ms"] * 1e-3
        assert r["tokens_per_s"] == r["tokens"] / sec and r["useful_tflops_per_s"] == r["useful_flops"] / sec / 1e12
        assert r["useful_flops"] == train.step_flops(model, r["tokens"], r["labelled_rows"], r["visible_pairs"])
    assert ours["useful_flops"] == ref["useful_flops"] == ours["side_flops"] and ours["head_rows"] == ours[
        "labelled_rows"] < ours["tokens"]
    padded = ref["head_rows"]  # two documents, right-padded to the longer
    assert padded >= ref["tokens"] and padded % 2 == 0 and ref["visible_pairs"] < 2 * (padded // 2) ** 2
    assert ref["side_flops"] == train.step_flops(model, padded, padded, 2 * (padded // 2) ** 2)
    assert ours["speedup_vs_reference"] == 4.0 and "speedup_vs_reference" not in ref


def test_sass_report_records_the_package_version_and_commit(tmp_path, monkeypatch):
    """The static report describes the CUDA sources as compiled: like every other result it records the package
    version and the commit, or a report left in benchmarks/results cannot be told from one of other sources."""
    from worldvla.benchmarks import sass

    monkeypatch.setattr(sass, "report", lambda files, arch: [{"file": "a.cu", "kernel": "k"}])
    monkeypatch.setattr(sass, "nvcc_version", lambda: "12.4")
    doc = json.loads(sass.run(out_dir=tmp_path, files=["a.cu"]).read_text())
    assert (doc["worldvla"], doc["git_commit"]) == common.package_version() and doc["worldvla"]
    assert doc["nvcc"] == "12.4" and doc["arch"] == "sm_90a" and doc["date"]


# ------------------------------------------------------------------ work counts of the full-size cases, by hand
def _decode_meta_of(q_pos, q_limit, kv_block, batch):
    """A DecodeMeta: one sequence's query rows (positions, limits) over a full cache of len(kv_block) slots,
    repeated for `batch` sequences."""
    from worldvla.mask import DecodeMeta

    def rep(x):
        return torch.tensor(x, dtype=torch.int32).view(1, -1).expand(batch, -1).contiguous()
    return DecodeMeta(rep(q_pos), rep(q_limit), rep(kv_block), torch.full((batch,), len(kv_block), dtype=torch.int32))


def test_decode_rows_count_the_keys_each_query_row_sees(monkeypatch):
    """Many query rows per sequence (a prompt through the cache) see different numbers of keys. A cache of 7
    slots holding action block 0 (slots 2, 3) and block 1 (slots 5, 6); query rows at positions 3 (in block 0),
    4 (after it), 5 and 6 (in block 1, which hides block 0); 3 sequences. Row 3 sees keys 0-3 (4), row 4 keys 0-4
    (5), row 5 keys 0, 1, 4, 5 (4), row 6 keys 0, 1, 4, 5, 6 (5): 18 a sequence, 54 in all; not 3 x 4 x 7 = 84
    (every row over the whole cache, what the SDPA rows attend), nor 3 x 7 (one row), nor 3 x 22 (causality
    alone)."""
    from worldvla.benchmarks import attention as A
    from worldvla.mask import NO_BLOCK as N

    meta = _decode_meta_of([3, 4, 5, 6], [0, -1, 1, 1], [N, N, 0, 0, N, 1, 1], 3)
    monkeypatch.setattr(A, "decode_meta", lambda px, n_queries, batch, gen=None, tokens=None: meta)
    H, Dh = 2, 16
    rows = A.run_decode([("d", 32, 4, 3)], H, Dh, torch.float32, torch.device("cpu"), True,
                        torch.Generator().manual_seed(0))
    timed = [r for r in rows if "median_ms" in r]
    assert {r["impl"] for r in timed} >= {"sdpa-dense-mask", "sdpa-nomask(floor)"} and len(timed) > 2
    for r in timed:
        sec = r["median_ms"] * 1e-3
        assert r["visible_pairs"] == 54 and r["tokens"] == 7 and r["batch"] == 3, r
        assert r["tflops"] == pytest.approx(4 * 54 * H * Dh / sec / 1e12)
        assert r["attended_pairs"] == (84 if r["impl"].startswith("sdpa") else None)


class _CountingSets:
    """A Rotation whose sets are the numbers 1, 2, 3, ... in the order they are handed out."""

    n = 0

    def next(self):
        self.n += 1
        return (self.n,)

    def info(self):
        return {"inputs_rotated": True}


class _NoSets:
    """A Rotation that makes no input sets (for runs whose timings are fixed)."""

    def __init__(self, *a, **kw):
        pass

    def info(self):
        return {}


def _cpu_ops_full_run(monkeypatch, tmp_path):
    """cpu_ops.run's full case list, nothing timed (medians: torch 2 ms, the C++ path 1 ms, at 8 wide 4 ms), no
    input sets made; the engine's prefill through the cache (decode_meta's None) is 40 rows on a 40-slot cache
    whose slots 30-34 are action block 0 and 35-39 block 1 (rows 35-39 do not see block 0)."""
    pytest.importorskip("worldvla._C")
    from worldvla.benchmarks import cpu_ops
    from worldvla.mask import NO_BLOCK

    medians = {"torch": 2.0, "native": 1.0, "native-w8": 4.0}
    monkeypatch.setattr(cpu_ops, "interleaved", lambda fns, rot, warmup, repeats: {
        name: {"median_ms": medians[name], "repeats": repeats} for name in fns})
    monkeypatch.setattr(cpu_ops, "Rotation", _NoSets)
    monkeypatch.setattr(cpu_ops, "sampling_rotation", lambda *a: _NoSets())
    monkeypatch.setattr(cpu_ops, "gather_rotation", lambda *a: _NoSets())
    monkeypatch.setattr(cpu_ops, "plot_speedups", lambda rows, path: None)
    real_decode_meta = cpu_ops.decode_meta
    prefill = _decode_meta_of(list(range(40)), [-1] * 30 + [0] * 5 + [1] * 5,
                              [NO_BLOCK] * 30 + [0] * 5 + [1] * 5, 1)
    monkeypatch.setattr(cpu_ops, "decode_meta", lambda px, K, batch, gen=None: (
        prefill if K is None else real_decode_meta(px, K, batch, gen)))
    rows = json.loads(cpu_ops.run(quick=False, out_dir=tmp_path).read_text())["rows"]
    return [r for r in rows if r["impl"] == "worldvla-native"]  # 1 ms: GFLOPs = flops / 1e6


def test_cpu_ops_decoder_layer_work_counts_every_sequence_of_the_batch(monkeypatch, tmp_path):
    """The decode step of 8 sequences x 5 rows: the layers' weights run on 8 x 5 = 40 rows, and the K/V caches
    of all 8 sequences are read. The small config's layer: q, k, v, o 256 x 256 each, the q and k norms' weight
    and bias 4 x 64 each, gate and up 688 x 256, down 256 x 688, two RMSNorms of 256: 792,064 weights, 4 layers
    3,168,256. FLOPs 2 x 40 x 3,168,256; bytes 4 x (3,168,256 + K and V of 4 layers x 8 sequences x (574 + 5)
    positions x 4 heads x 64)."""
    layer = 4 * 256 * 256 + 4 * 4 * 64 + 3 * 688 * 256 + 2 * 256
    assert layer == 792_064
    n_w = 4 * layer
    rows = {r["case"]: r for r in _cpu_ops_full_run(monkeypatch, tmp_path) if r["op"] == "decoder_layer"}
    b8 = rows["decode step B8 Q5 cache574 (4 layers, small config)"]
    assert b8["GFLOPs"] == pytest.approx(2 * 8 * 5 * n_w / 1e6)
    assert b8["GBps"] == pytest.approx(4 * (n_w + 2 * 4 * 8 * 579 * 4 * 64) / 1e6)
    b1 = rows["decode step B1 Q5 cache574 (4 layers, small config)"]  # the same rows of one sequence: 1/8 the work
    assert b1["GFLOPs"] == pytest.approx(2 * 1 * 5 * n_w / 1e6)
    assert b1["GBps"] == pytest.approx(4 * (n_w + 2 * 4 * 1 * 579 * 4 * 64) / 1e6)


def test_cpu_ops_prefill_through_the_cache_counts_the_keys_each_row_sees(monkeypatch, tmp_path):
    """The engine's prefill through the cache (40 rows here): row i sees keys 0..i, 820 pairs, less the 5 keys of
    block 0 hidden from each of block 1's 5 rows: 795. FLOPs 4 x H x Dh a pair, H 4, Dh 64; not 40 x 40 (every row
    over the whole cache) nor 40 (one row)."""
    rows = [r for r in _cpu_ops_full_run(monkeypatch, tmp_path) if r["op"] == "decode_attention"]
    prefill = [r for r in rows if r["case"] == "decode H4 Dh64 K40 cache40"]
    assert len(prefill) == 1 and prefill[0]["GFLOPs"] == pytest.approx(4 * 4 * 64 * (820 - 25) / 1e6)
    assert "GBps" not in prefill[0]
    for r in rows:  # the few-row cases: K and V of the cache read once
        if r is not prefill[0]:
            H, D, S = (int(x) for x in (r["case"].split()[1][1:], r["case"].split()[2][2:],
                                        r["case"].split()[4][5:]))
            assert r["GBps"] == pytest.approx(2 * S * H * D * 4 / 1e6) and "GFLOPs" not in r


def test_train_tokens_and_flops_leave_out_the_padding(tmp_path, monkeypatch):
    """Three documents of 5, 9 and 2 tokens (text, no action blocks), their first 2, 4 and 1 tokens the prompt
    (no label): 16 real tokens, 9 labelled rows, 15 + 45 + 3 = 63 causal pairs. The reference-style batch pads
    them to 3 x 9 = 27 positions and 3 x 81 = 243 pairs. tokens/s and the useful FLOPs (MFU) count the 16, 9 and
    63 for both sides; only the reference-style side_flops counts the padding. The tiny config: hidden 64, 2 layers
    of 37,184 weights (q, o 64 x 64; k, v 32 x 64; q norm 2 x 4 x 16; k norm 2 x 2 x 16; gate, up, down 64 x 128;
    two norms of 64), 4 heads of 16, vocabulary 65,536."""
    from worldvla.benchmarks import train
    from worldvla.model import ModelConfig

    def doc(n, prompt):
        ids = torch.arange(20000, 20000 + n)
        labels = ids.clone()
        labels[:prompt] = -100
        return ids, labels

    monkeypatch.setattr(train, "_samples", lambda n_docs, px, gen: [doc(5, 2), doc(9, 4), doc(2, 1)])
    monkeypatch.setattr(ModelConfig, "small", classmethod(lambda cls, layout=None, **kw: cls.tiny(layout, **kw)))
    monkeypatch.setattr(train, "time_interleaved", _fixed_medians({"worldvla": 50.0, "reference-style": 200.0}))
    monkeypatch.setattr(train, "peak_memory", lambda fn, device: 1)
    ours, ref = json.loads(train.run(quick=True, device="cpu", out_dir=tmp_path).read_text())["rows"]

    layer = 2 * 64 * 64 + 2 * 32 * 64 + 2 * 4 * 16 + 2 * 2 * 16 + 3 * 64 * 128 + 2 * 64
    assert layer == 37_184
    w, head, pair = 2 * layer, 65536 * 64, 4 * 4 * 16 * 2  # per row of the layers, of the head; per pair
    useful = 3 * (2 * w * 16 + 2 * head * 9 + pair * 63)
    for r, sec in ((ours, 0.05), (ref, 0.2)):
        assert (r["tokens"], r["labelled_rows"], r["visible_pairs"]) == (16, 9, 63), r
        assert r["tokens_per_s"] == pytest.approx(16 / sec)
        assert r["useful_flops"] == useful and r["useful_tflops_per_s"] == pytest.approx(useful / sec / 1e12)
    assert ours["side_flops"] == useful and ours["head_rows"] == 9
    assert ref["head_rows"] == 27 and ref["side_flops"] == 3 * (2 * w * 27 + 2 * head * 27 + pair * 243)


def test_a_benchmark_refuses_an_empty_out_and_names_itself(tmp_path, monkeypatch, capsys):
    """`python -m benchmarks.vq --out "$DIR"` with DIR unset wrote its results into the current folder; the usage
    line named `__main__.py` instead of the command to run."""
    importlib.import_module("worldvla.benchmarks.vq")  # the module `run` claims: its name is read from sys.modules

    monkeypatch.chdir(tmp_path)
    ran = []

    def run(quick, device, out):
        ran.append(out)

    run.__module__ = "worldvla.benchmarks.vq"  # as if the vq benchmark's own
    with pytest.raises(SystemExit) as e:
        common.main_for(run, "d", ["--quick", "--out", " "])
    assert e.value.code == 2 and not ran and not any(tmp_path.iterdir())
    err = capsys.readouterr().err
    assert "python -m worldvla.benchmarks.vq: error: --out is empty: name a folder" in err, err
    common.main_for(lambda quick, device, out: ran.append(out), "d", ["--out", "r"])
    assert ran == ["r"]


@pytest.mark.parametrize("option, value, says", [("--clients", "0", "must be >= 1"), ("--requests", "-5", "must be >= 1"),
                                                 ("--max-batch", "0", "must be >= 1"),
                                                 ("--duration-s", "0", "must be > 0"),
                                                 ("--bad-clients", "-1", "must be >= 0")])
def test_serve_load_refuses_counts_that_would_measure_nothing(option, value, says, capsys):
    """`--clients 0` or `--requests -5` were taken as given (a load phase without robots or requests);
    `--max-batch 0` failed deep in the policy with "reset got an empty list of instructions"."""
    from worldvla.benchmarks import serve_load

    with pytest.raises(SystemExit) as e:
        serve_load.parse_args([option, value])
    assert e.value.code == 2
    assert f"python -m worldvla.benchmarks.serve_load: error: argument {option}: {says}" in capsys.readouterr().err


def test_bench_lines_reach_a_log_before_a_time_limit_ends_the_run(tmp_path):
    """Run into a log under `timeout` (gpu_all.sh's stages), `worldvla bench` left the log empty when SIGTERM
    ended it: stdout to a file is block-buffered and SIGTERM ends Python unflushed, so every finished
    benchmark's lines (the `-> result` the script's summary reads) were lost with the unfinished one."""
    import signal
    import subprocess
    import sys

    code = ("import os, signal, sys, types\n"
            "from worldvla.cli import main\n"
            "sys.modules['worldvla.benchmarks.vq'] = types.SimpleNamespace(run=lambda quick, device, out_dir: "
            "out_dir + '/vq.json')\n"
            "sys.modules['worldvla.benchmarks.sampling'] = types.SimpleNamespace(run=lambda quick, device, out_dir: "
            "os.kill(os.getpid(), signal.SIGTERM))\n"
            f"main(['bench', 'vq', 'sampling', '--out', {str(tmp_path / 'out')!r}])\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    with open(tmp_path / "log", "w") as log:
        p = subprocess.run([sys.executable, "-c", code], stdout=log, stderr=subprocess.STDOUT, env=env,
                           cwd=tmp_path, timeout=120)
    assert p.returncode == -signal.SIGTERM
    lines = (tmp_path / "log").read_text().splitlines()
    assert f"-> {tmp_path / 'out'}/vq.json" in " ".join(lines), lines
    assert lines[-1].startswith("== sampling: "), lines


# ------------------------------------------------------------------ what every result records, and how it is timed
def test_time_fn_reads_the_clock_on_both_sides_of_the_call():
    """A 20 ms call times at least 20 ms: the clock is read before the call and after it, not twice after it."""
    import time

    st = common.time_fn(lambda: time.sleep(0.02), warmup=0, repeats=3)
    assert st["min_ms"] >= 20 and st["median_ms"] >= 20 and st["repeats"] == 3


def test_bandwidth_counts_the_bytes_read_and_the_bytes_written(monkeypatch):
    """A copy of n bytes reads n and writes n: 2 n bytes over the copy's median time (`BANDWIDTH_METHOD`), timed on
    the device asked for. CUDA faked: the buffers on the CPU, the copy's median fixed at 2 ms."""
    real_empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, device=None, **kw: real_empty(*a, **kw))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    timed = []
    monkeypatch.setattr(common, "time_fn", lambda fn, **kw: (timed.append(kw["device"]), fn(), {"median_ms": 2.0})[-1])
    assert common.measure_bandwidth("cuda", 1000) == pytest.approx(2 * 1000 / 2e-3 / 1e9)
    assert timed == [torch.device("cuda")]
    assert common.measure_bandwidth("cpu") is None


def test_a_gpu_result_is_named_after_the_gpu_and_records_its_own_fields(monkeypatch, tmp_path):
    """A result written for a CUDA device takes that GPU's name (file and `device`), its L2 and the NVIDIA
    driver, and none of the CPU's fields. CUDA faked: an H100 with a 50 MiB L2."""
    import types

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: types.SimpleNamespace(
        L2_cache_size=50 << 20))
    monkeypatch.setattr(common, "nvidia_driver_version", lambda: "550.54.15")
    path = common.write_results("demo", [{"x": 1}], "cuda", tmp_path)
    doc = json.loads(path.read_text())
    assert path.name == "demo-NVIDIA-H100-80GB-HBM3.json" and doc["device"] == "NVIDIA-H100-80GB-HBM3"
    assert doc["l2_cache_bytes"] == 50 << 20 and doc["nvidia_driver"] == "550.54.15"
    assert not {"cpu_model", "cpu_cache", "cpu_capability"} & set(doc)


def test_results_record_torch_cuda_python_and_the_utc_date_of_the_write(tmp_path):
    """`torch` is torch's version, `cuda` the CUDA torch was built with, `python` the interpreter's, and `date`
    the write's time in UTC with its offset (runs on machines in other time zones compare)."""
    import datetime
    import platform

    before = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    doc = json.loads(common.write_results("demo", [], "cpu", tmp_path).read_text())
    after = datetime.datetime.now(datetime.timezone.utc)
    assert (doc["torch"], doc["cuda"], doc["python"]) == (torch.__version__, torch.version.cuda,
                                                          platform.python_version())
    date = datetime.datetime.fromisoformat(doc["date"])
    assert date.utcoffset() == datetime.timedelta(0) and before <= date <= after


def test_a_benchmarks_command_line_reaches_its_run():
    """`python -m benchmarks.<name>` hands run its --quick (a quick run writes its own -quick file), --device, --out
    and the benchmark's own flags, each off unless given."""
    got = []

    def run(quick, device, out, **flags):
        got.append((quick, device, out, flags))

    flags = {"--no-ref": "h", "--other-flag": "h"}
    common.main_for(run, "d", ["--quick", "--device", "cpu", "--out", "r", "--no-ref"], flags=flags)
    common.main_for(run, "d", [], flags=flags)
    assert got == [(True, "cpu", "r", {"no_ref": True, "other_flag": False}),
                   (False, None, "benchmarks/results", {"no_ref": False, "other_flag": False})]


def test_cpu_ops_narrow_side_gives_the_kernels_their_width_back(monkeypatch):
    """On a CPU that runs 16 floats per vector, `native-w8` runs the C++ path at 8 and sets 16 again after every
    call, a failing one too: the `native` calls after it run at 16. The width faked at 16."""
    _C = pytest.importorskip("worldvla._C")
    from worldvla.benchmarks import cpu_ops

    width = [16]
    monkeypatch.setattr(_C, "cpu_vector_width", lambda: width[0])
    monkeypatch.setattr(_C, "set_cpu_vector_width", lambda w: width.__setitem__(0, w))
    seen = []

    def call(backend, x):
        seen.append((backend, width[0]))
        if x == "fail":
            raise RuntimeError("kernel failed")
        return x

    fns = cpu_ops._sides(call)
    assert set(fns) == {"torch", "native", "native-w8"}
    assert fns["native-w8"]("ok") == "ok" and width[0] == 16
    with pytest.raises(RuntimeError, match="kernel failed"):
        fns["native-w8"]("fail")
    assert width[0] == 16
    fns["native"]("ok")
    fns["torch"]("ok")
    assert seen == [("native", 8), ("native", 8), ("native", 16), ("torch", 16)]
    assert set(cpu_ops._sides(call, widths=False)) == {"torch", "native"}


def test_a_quick_cpu_ops_run_keeps_off_the_full_results(monkeypatch, tmp_path):
    """`worldvla bench --quick` runs cpu_ops too: its result is cpu_ops-<device>-quick.json, never the full run's
    file. Nothing timed, no input sets made."""
    pytest.importorskip("worldvla._C")
    from worldvla.benchmarks import cpu_ops

    monkeypatch.setattr(cpu_ops, "interleaved", lambda fns, rot, warmup, repeats: {
        name: {"median_ms": 1.0, "repeats": repeats} for name in fns})
    monkeypatch.setattr(cpu_ops, "Rotation", _NoSets)
    monkeypatch.setattr(cpu_ops, "sampling_rotation", lambda *a: _NoSets())
    monkeypatch.setattr(cpu_ops, "gather_rotation", lambda *a: _NoSets())
    monkeypatch.setattr(cpu_ops, "plot_speedups", lambda rows, path: None)
    path = cpu_ops.run(quick=True, out_dir=tmp_path)
    assert path.name == f"cpu_ops-{common.device_name('cpu')}-quick.json"
    assert json.loads(path.read_text())["quick"] is True and [p.name for p in tmp_path.iterdir()] == [path.name]


# ------------------------------------------------------------------ serve_load's whole run, with its server on a thread
def _serve_load_on_a_thread(monkeypatch, tmp_path, slow_s=0.0, fail_single_at=None):
    """serve_load with its server process replaced by the same PolicyServer on a thread of this process (the child
    process's start, SIGTERM and kill as a `subprocess.Popen` of the child's command would see them), a small MLP on
    both sides; the in-process policy sleeps `slow_s` per call, and the single robot's `fail_single_at`-th request is
    refused (queue full) before it is sent. Returns the processes started, the in-process
    policy's batch sizes, the frames' shapes the clients sent, the limits the bad clients were given and the plots
    asked for (none drawn: plot_latencies has tests of its own)."""
    import io
    import signal
    import subprocess
    import tempfile
    import time

    from worldvla.benchmarks import serve_load

    procs, inproc_batches, sent_shapes, bad_limits, plots = [], [], [], [], []

    def small(spec):
        return serve_load.SyntheticPolicy(image_size=spec["image_size"], chunk_size=spec["chunk_size"],
                                          action_dim=spec["action_dim"], width=32, layers=2, seed=spec["seed"])

    class SlowPolicy(serve_load.SyntheticPolicy):
        def act(self, images, history=None):
            inproc_batches.append(len(images))
            time.sleep(slow_s)
            return super().act(images, history)

    class Proc:
        def __init__(self, cmd, **kwargs):
            self.spec, self.kwargs = json.loads(cmd[-2]), json.loads(cmd[-1])
            self.server = serve_load.PolicyServer(small(self.spec), "127.0.0.1", 0, **self.kwargs)
            self.server.warmup()
            self.server.start_background()
            self.stdout, self.stderr = io.StringIO(f"PORT {self.server.port}\n"), io.StringIO()
            self.returncode, self.signals = None, []
            procs.append(self)

        def send_signal(self, sig):
            self.signals.append(sig)
            self.server.stop_background(30)
            self.returncode = 0 if sig == signal.SIGTERM else -sig

        def kill(self):
            self.send_signal(signal.SIGKILL)

        def poll(self):
            return self.returncode

        def wait(self, timeout=None):
            return self.returncode

    clients = []

    class Client(serve_load.PolicyClient):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.acts = 0
            clients.append(self)

        def act(self, image, previous_image=None):
            self.acts += 1
            if self is clients[0] and self.acts == fail_single_at:
                raise serve_load.PolicyServerError("the server's queue is full")
            sent_shapes.append(image.shape)
            return super().act(image, previous_image)

    real_popen, real_bad_client = subprocess.Popen, serve_load._bad_client

    def bad_client(url, rng, size, limit_bytes, *rest):
        bad_limits.append(limit_bytes)
        return real_bad_client(url, rng, size, limit_bytes, *rest)

    def slow(spec):
        return SlowPolicy(**{k: v for k, v in small(spec).config.items() if k != "kind"})

    monkeypatch.setattr(serve_load, "build_policy", slow)
    monkeypatch.setattr(subprocess, "Popen", lambda cmd, **kw: Proc(cmd, **kw) if "child_main" in cmd[2]
                        else real_popen(cmd, **kw))
    monkeypatch.setattr(serve_load, "PolicyClient", Client)
    monkeypatch.setattr(serve_load, "_bad_client", bad_client)
    monkeypatch.setattr(serve_load, "plot_latencies", lambda rows, path, title: plots.append((rows, path, title)))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    return procs, inproc_batches, sent_shapes, bad_limits, plots


def test_serve_load_run_reports_the_settings_it_ran_and_stops_its_server(monkeypatch, tmp_path):
    """A whole serve_load run, its server on a thread: the server gets --max-batch, --max-wait-ms and
    --max-payload-mb, the robots --requests each (every other one --camera frames), the bad clients the server's
    payload limit in bytes; the single robot's round trips leave out its warm-up request and the in-process calls
    between its blocks; the load row counts the load phase's requests and batches only, under the settings that
    ran; a refused request is a failure, not a latency; the server answers /healthz and ends on SIGTERM (exit 0);
    a --quick run writes the -quick file."""
    import signal
    from collections import Counter

    from worldvla.benchmarks import serve_load

    harness = _serve_load_on_a_thread(monkeypatch, tmp_path, slow_s=0.02, fail_single_at=5)
    procs, inproc_batches, sent_shapes, bad_limits, plots = harness
    args = serve_load.parse_args(["--policy", "synthetic", "--device", "cpu", "--image-size", "16", "--chunk-size", "3",
                                  "--clients", "3", "--bad-clients", "1", "--requests", "4", "--sequential", "10",
                                  "--duration-s", "60", "--camera", "24x32", "--max-batch", "3", "--max-wait-ms", "2",
                                  "--max-payload-mb", "0.05", "--seed", "5"])
    args.quick = True
    path = serve_load._main(args, str(tmp_path / "out"))

    (proc,) = procs
    assert proc.signals == [signal.SIGTERM] and proc.server._thread is None
    assert proc.kwargs == {"max_batch": 3, "max_wait_ms": 2.0, "max_queue": 64, "max_payload_mb": 0.05,
                           "request_timeout_s": 120.0}
    assert proc.spec == {"kind": "synthetic", "image_size": 16, "chunk_size": 3, "action_dim": 7, "seed": 5,
                         "device": "cpu", "threads": 1}
    assert bad_limits == [proc.server.max_payload_bytes] == [int(0.05 * 2**20)]
    # the single robot: a warm-up request, 9 timed and 1 refused; the robots: 4 each, the first and the third at the
    # model's size, the second at the camera's
    assert Counter(sent_shapes) == {(16, 16, 3): 1 + 9 + 2 * 4, (24, 32, 3): 4}
    assert proc.server.stats["act_ok"] == 1 + 9 + 3 * 4
    # the in-process floor: batches of --max-batch first, then one frame at a time between the robot's blocks
    assert inproc_batches == [3] * (3 + 5) + [1] * (3 + 10)
    assert path.name == f"serve_load-{common.device_name('cpu')}-quick.json"
    assert not list((tmp_path / "tmp").iterdir())  # the random policy's folder removed

    doc = json.loads(path.read_text())
    assert doc["quick"] is True and doc["policy"] == "synthetic-mlp" and doc["policy_spec"] == proc.spec
    assert doc["server"] == proc.kwargs and doc["camera_hw"] == [24, 32]
    assert (doc["duration_limit_s"], doc["requests_limit_per_client"]) == (60.0, 4)
    assert doc["server_alive_at_end"] is True and doc["sigterm_exit_code"] == 0
    assert plots == [(doc["rows"], path.with_suffix(".png"), f"serve_load ({common.device_name('cpu')}-quick)")]
    single, load = doc["rows"]
    assert (single["phase"], single["clients"], single["requests"], single["failed_valid"]) == ("single-robot", 1, 9, 1)
    assert single["inproc_p50_ms"] >= 20
    assert single["p50_ms"] < 5 * single["inproc_p50_ms"]  # no in-process call inside a round trip
    assert single["rtt_minus_policy_p50_ms"] > 0 and single["served_policy_p50_ms"] < single["inproc_p50_ms"]
    assert (load["phase"], load["clients"], load["bad_clients"]) == ("load", 3, 1)
    assert (load["requests"], load["failed_valid"]) == (3 * 4, 0)
    assert doc["load_wall_s"] < 30 and load["throughput_rps"] == pytest.approx(12 / doc["load_wall_s"])
    assert load["malformed_sent"] == load["malformed_refused"] >= 1 and load["malformed_not_refused"] == 0
    # the load phase's requests and batches only (the single robot's 10 requests were 10 batches of one)
    assert load["batches"] == proc.server.stats["batches"] - 10
    assert load["mean_batch"] == pytest.approx(12 / load["batches"])
    assert load["policy_calls"] == proc.server.stats["policy_calls"] - 10
    assert 1 <= load["max_batch_seen"] <= 3 and load["inproc_batch3_p50_ms"] >= 20


def test_serve_load_kills_its_server_when_the_run_fails(monkeypatch, tmp_path):
    """A run that fails after the server started (here: the single robot cannot connect) kills the server process
    rather than leave it serving, removes its temporary folder and writes no results; a server that never
    printed its port is reported with what it wrote to stderr."""
    import io
    import signal
    import subprocess

    from worldvla.benchmarks import serve_load

    procs, _, _, _, plots = _serve_load_on_a_thread(monkeypatch, tmp_path)

    def refuse(url, timeout):
        raise ConnectionRefusedError(f"{url} refused")

    monkeypatch.setattr(serve_load, "PolicyClient", refuse)
    argv = ["--policy", "synthetic", "--device", "cpu", "--image-size", "8", "--sequential", "5"]
    with pytest.raises(ConnectionRefusedError, match="refused"):
        serve_load._main(serve_load.parse_args(argv), str(tmp_path / "out"))
    (proc,) = procs
    assert proc.signals == [signal.SIGKILL] and proc.server._thread is None
    assert not (tmp_path / "out").exists() and not list((tmp_path / "tmp").iterdir()) and not plots

    class Died:
        def __init__(self, cmd, **kwargs):
            self.stdout, self.stderr = io.StringIO(""), io.StringIO("Traceback ...\nImportError: no policy here\n")
            self.returncode = 1

        def poll(self):
            return self.returncode

    monkeypatch.setattr(subprocess, "Popen", Died)
    with pytest.raises(RuntimeError, match="(?s)server failed to start: .*ImportError: no policy here"):
        serve_load._main(serve_load.parse_args(argv), str(tmp_path / "out"))


def test_serve_load_run_takes_the_device_and_quick_settings(monkeypatch):
    """`run(quick=True, device=...)` (what `worldvla bench --device` calls) times on that device with --quick's
    counts."""
    from worldvla.benchmarks import serve_load

    seen = []
    monkeypatch.setattr(serve_load, "_main", lambda args, out_dir: seen.append((args, out_dir)) or out_dir)
    assert serve_load.run(quick=True, device="cuda:1", out_dir="o") == "o"
    assert serve_load.run() == "benchmarks/results"
    (quick, _), (full, _) = seen
    assert (quick.device, quick.quick, quick.clients, quick.requests) == ("cuda:1", True, 3, 40)
    assert (full.device, full.quick, full.clients, full.requests) == (None, False, 8, 200)


def test_serve_load_bad_clients_requests_are_each_refused_by_a_real_server(monkeypatch):
    """Every kind of malformed request the bad clients send (garbage, wrong types, dtypes and shapes, an unknown
    episode, over the payload limit and over twice it) is one the server refuses: one it accepted would be counted
    as not refused and fail the benchmark's check. The one over the limit is over it (the server refuses its
    unknown field too, so a payload under the limit would still be refused, testing no limit), and under twice it
    (answered, not closed)."""
    import threading

    import numpy as np

    from worldvla.benchmarks import serve_load

    policy = serve_load.SyntheticPolicy(image_size=8, chunk_size=2, width=16, layers=1)
    with serve_load.PolicyServer(policy, "127.0.0.1", 0, max_batch=2, max_payload_mb=0.05) as server:
        record = {"sent": 0, "refused": 0, "not_refused": []}
        limit = server.max_payload_bytes
        payloads = dict(serve_load._bad_payloads(np.random.default_rng(0), 8, limit, "e"))
        n = len(payloads)
        assert limit < len(payloads["over-limit"]()) < 2 * limit < len(payloads["over-2x-limit"]())
        serve_load._bad_client(server.url, np.random.default_rng(0), 8, limit, threading.Event(), n, record)
        assert n == 13 and record == {"sent": 13, "refused": 13, "not_refused": []}
        # A second round, after the connection the over-2x-limit payload closed: the client's episode is open
        # again on the new connection, so its malformed frames are refused for what they are.
        record, errors = {"sent": 0, "refused": 0, "not_refused": []}, []
        real_unpackb = serve_load.unpackb

        def unpackb(data, *args):
            reply = real_unpackb(data, *args)
            errors.append(str(reply.get("error")))
            return reply

        monkeypatch.setattr(serve_load, "unpackb", unpackb)
        serve_load._bad_client(server.url, np.random.default_rng(0), 8, limit, threading.Event(), 2 * n, record)
    assert record == {"sent": 26, "refused": 26, "not_refused": []}
    assert not [e for e in errors if "unknown episode 'bad-" in e]
    assert sum("'image' must have dtype uint8" in e for e in errors) == 2  # float-image in each round


def test_serve_load_robot_times_the_request_not_the_episode_reset(monkeypatch):
    """A robot's latency is its act request's round trip: starting a new episode (a reset, every
    `steps_per_episode` requests) is not part of it."""
    import threading
    import time

    import numpy as np

    from worldvla.benchmarks import serve_load

    class Client(_StubClient):

        def reset(self, instruction):
            time.sleep(0.2)

        def act(self, frame):
            return np.zeros((5, 7), dtype=np.float32)

    monkeypatch.setattr(serve_load, "PolicyClient", Client)
    lat, failures = [], []
    serve_load._robot("ws://test", np.random.default_rng(0), 8, (12, 16), 2, threading.Event(), 3, lat, failures,
                      threading.Barrier(1), True)
    assert failures == [] and len(lat) == 3 and max(lat) < 100


def test_serve_load_load_phase_ends_at_its_time_limit_with_the_clients_asked_for(monkeypatch, tmp_path):
    """The load phase starts --clients robots (every other one sending camera frames) and --bad-clients bad
    clients, and stops them all at --duration-s, however many requests they still had to send; a server that no
    longer answers ok after the load is reported so."""
    from worldvla.benchmarks import serve_load

    _serve_load_on_a_thread(monkeypatch, tmp_path)
    started = []

    def robot(url, rng, size, camera_hw, steps_per_episode, stop, max_requests, lat, failures, barrier, native):
        started.append(("robot", native, camera_hw, max_requests))
        stop.wait(10)

    def bad_client(url, rng, size, limit_bytes, stop, max_requests, record):
        started.append(("bad", max_requests))
        stop.wait(10)

    monkeypatch.setattr(serve_load, "_robot", robot)
    monkeypatch.setattr(serve_load, "_bad_client", bad_client)
    real_health, healths = serve_load.health, []

    def health(url):
        healths.append(url)
        return {**real_health(url), "status": "draining"} if len(healths) == 3 else real_health(url)

    monkeypatch.setattr(serve_load, "health", health)
    args = serve_load.parse_args(["--policy", "synthetic", "--device", "cpu", "--image-size", "8", "--sequential", "1",
                                  "--clients", "3", "--bad-clients", "2", "--requests", "1000", "--duration-s", "0.3",
                                  "--camera", "12x20", "--max-batch", "1"])
    doc = json.loads(serve_load._main(args, str(tmp_path / "out")).read_text())
    assert 0.3 <= doc["load_wall_s"] < 5 and len(healths) == 3 and doc["server_alive_at_end"] is False
    robots = [("robot", False, (12, 20), 1000)] + [("robot", True, (12, 20), 1000)] * 2
    assert sorted(started) == [("bad", 1000)] * 2 + robots
    assert (doc["rows"][1]["clients"], doc["rows"][1]["bad_clients"], doc["rows"][1]["requests"]) == (3, 2, 0)


@pytest.mark.parametrize("camera", ["480", "abc", "0x640", "480x640x3"])
def test_serve_load_refuses_a_camera_size_that_is_not_h_by_w(camera, capsys):
    """`--camera 480` was taken as given, and every camera robot crashed mid-run ("not enough values to unpack"),
    counted as failed requests; "abc" failed with int()'s message. Each is refused as the options are parsed."""
    from worldvla.benchmarks import serve_load

    with pytest.raises(SystemExit) as e:
        serve_load.parse_args(["--camera", camera])
    assert e.value.code == 2
    assert (f"argument --camera: expected HxW, two integers >= 1 such as 480x640, got {camera!r}"
            in capsys.readouterr().err)
    assert serve_load.parse_args(["--camera", "24X32"]).camera == (24, 32)
    assert serve_load.parse_args([]).camera == (480, 640)


def test_serve_load_quick_counts_give_way_to_the_options_given_beside_it():
    """`--quick --clients 16 --duration-s 60` ran 3 robots for 5 s and reported those: --quick overwrote every
    count. Its counts are defaults now; an option given beside it, before or after, counts."""
    from worldvla.benchmarks import serve_load

    a = serve_load.parse_args(["--quick", "--clients", "16", "--duration-s", "60"])
    assert (a.clients, a.bad_clients, a.duration_s, a.requests, a.sequential, a.quick) == (16, 1, 60.0, 40, 30, True)
    a = serve_load.parse_args(["--requests", "7", "--quick", "--sequential", "9", "--bad-clients", "0"])
    assert (a.clients, a.bad_clients, a.duration_s, a.requests, a.sequential) == (3, 0, 5.0, 7, 9)


def test_serve_load_refuses_camera_frames_larger_than_the_servers_payload_limit(capsys):
    """A camera frame over --max-payload-mb made the server refuse every camera robot's request: the run went on
    and reported them as failures. It is refused as the options are parsed, naming both options; the limit is the
    whole request's, as the server's (a frame that fits alone but not with the request's fields is refused too)."""
    import re

    import numpy as np

    from worldvla.benchmarks import serve_load
    from worldvla.serve.client import PolicyClient

    with pytest.raises(SystemExit) as e:
        serve_load.parse_args(["--camera", "1080x1920", "--max-payload-mb", "2"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--camera 1080x1920 frames make act requests of 6220800 bytes, over --max-payload-mb 2 (2097152 bytes)" in err
    assert "raise --max-payload-mb or give a smaller --camera" in err
    # 1 MiB - 4 bytes: 1048572 = 3 x 349524 bytes of frame fit alone, not with the request's fields
    with pytest.raises(SystemExit):
        serve_load.parse_args(["--camera", "1x349524", "--max-payload-mb", "1"])
    size = int(re.search(r"frames make act requests of (\d+) bytes", capsys.readouterr().err).group(1))
    assert 1048576 < size < 1048576 + 256
    assert serve_load.parse_args(["--camera", "1x349000", "--max-payload-mb", "1"]).camera == (1, 349000)
    assert serve_load.parse_args(["--camera", "1080x1920", "--max-payload-mb", "8"]).camera == (1080, 1920)

    # the size counted is what a PolicyClient sends (its own check names the bytes of the request it refuses)
    import uuid

    client = PolicyClient.__new__(PolicyClient)
    client.url, client.timeout, client._closed, client._ws, client._next_id = "ws://h:1", 5.0, False, object(), 0
    client.client_id, client.episode, client.max_payload_bytes = uuid.uuid4().hex, uuid.uuid4().hex, 1
    with pytest.raises(ValueError, match="more than the server's payload limit") as e:
        client.act(np.zeros((24, 32, 3), np.uint8))
    sent = int(re.search(r"\((\d+) bytes\), more than", str(e.value)).group(1))
    assert sent <= serve_load.act_request_bytes(24, 32) <= sent + 4


# ------------------------------------------------------------------ what each row measures, sides run once
def test_attention_check_flags_an_error_just_past_its_tolerance():
    """A side matches where |got - ref| <= tol * (|ref| + mean |ref|) everywhere: one element 1.1x past that bound
    fails it (float32: tol 1e-3), 0.9x of it passes, and worst_over_tolerance is that ratio; in a side's gradients the
    last one counts as the first does."""
    from worldvla.benchmarks import attention as A

    want = torch.randn(6, 2, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    bound = 1e-3 * (want.abs() + want.abs().mean())
    for factor, ok in ((0.9, True), (1.1, False)):
        got = want.clone()
        got[3, 1, 2] += factor * bound[3, 1, 2]
        out = A.check(got, want, torch.float32)
        assert out["matches_reference"] is ok and out["worst_over_tolerance"] == pytest.approx(factor, rel=1e-6)
        grads = A.check((want, want, got), (want, want, want), torch.float32)  # only the last gradient off
        assert grads["matches_reference"] is ok and grads["worst_over_tolerance"] == pytest.approx(factor, rel=1e-6)


def test_a_quick_attention_run_writes_only_its_quick_results(monkeypatch, tmp_path):
    """`--quick` writes attention-<device>-quick.json (and its plot) after every case and at the end, never the
    full run's file."""
    from worldvla.benchmarks import attention as A

    row = {"impl": "worldvla-torch", "median_ms": 1.0, "matches_reference": True}
    monkeypatch.setattr(A, "run_decode", lambda cases, *a, **k: [dict(row, case=cases[0][0], mode="decode")])
    monkeypatch.setattr(A, "run_prefill", lambda cases, *a, **k: [dict(row, case=cases[0][0], mode="fwd")])
    path = A.run(quick=True, device="cpu", out_dir=tmp_path)
    stem = f"attention-{common.device_name('cpu')}-quick"
    assert path.name == f"{stem}.json" and sorted(p.name for p in tmp_path.iterdir()) == [f"{stem}.json",
                                                                                           f"{stem}.png"]
    assert [r["case"] for r in json.loads(path.read_text())["rows"]] == ["decode 256px K5", "256px", "causal"]


def test_cross_entropy_rows_name_their_shape_and_each_sides_own_memory(tmp_path, monkeypatch):
    """Each row's N, hidden and vocab are its case's (the CPU's quick case: 128 labelled rows, hidden 256, vocabulary
    8192), its peak memory is that of its own side's step (the naive side's steps measured apart from the fused
    side's), both sides weigh the classes alike, and a full run times 20 repeats after 3 warm-ups, a quick one 3
    after 1."""
    import types

    from worldvla.benchmarks import cross_entropy as CE

    ran, timed = [], []
    real_naive, real = CE.naive_linear_cross_entropy, ops.linear_cross_entropy
    weights = set()

    def side(name, cw):  # which side ran, and the class weights it was given
        ran.append(name)
        weights.add((name, None if cw is None else (float(cw[3]), round(float(cw[4]), 6), float(cw[-1]),
                                                    int((cw != 1).sum()))))

    monkeypatch.setattr(CE, "naive_linear_cross_entropy", lambda h, w, y, rows, cw: side("naive", cw)
                        or real_naive(h, w, y, rows, cw))
    monkeypatch.setattr(CE, "timed_backends", lambda op: ["torch", "fused"])
    monkeypatch.setattr(CE, "ops", types.SimpleNamespace(
        dispatch=types.SimpleNamespace(supports=lambda *a: True),
        linear_cross_entropy=lambda h, w, y, cw, z, backend: side("fused", cw) or real(h, w, y, cw, z,
                                                                                      backend="torch")))
    fixed = _fixed_medians({"naive": 4.0, "worldvla-fused": 1.0})
    monkeypatch.setattr(CE, "time_interleaved", lambda fns, **kw: timed.append((kw["warmup"], kw["repeats"]))
                        or fixed(fns, **kw))
    monkeypatch.setattr(CE, "Rotation", lambda make, device, quick: common.Rotation(make, device, n=1))

    def peak(fn, device):
        ran.clear()
        fn()
        return {("naive",): 1000, ("fused",): 250}[tuple(ran)]

    monkeypatch.setattr(CE, "peak_memory", peak)
    rows = json.loads(CE.run(quick=True, device="cpu", out_dir=tmp_path).read_text())["rows"]
    got = {r["impl"]: (r["N"], r["hidden"], r["vocab"], r["peak_bytes"], r["memory_vs_naive"]) for r in rows}
    assert got == {"naive": (128, 256, 8192, 1000, 1.0), "worldvla-fused": (128, 256, 8192, 250, 0.25)}
    # both sides weigh the classes alike, an eighth of the vocabulary (after 4 ids) at the image codes' weight, as
    # the release's 8192 of 65,536: weights that differ between labels (nearly all 0.04 made them a constant)
    assert weights == {("naive", (1.0, 0.04, 1.0, 1024)), ("fused", (1.0, 0.04, 1.0, 1024))}
    monkeypatch.setattr(CE, "check_sides", lambda impls, *a: {name: {"matches_reference": True} for name in impls})
    CE.run(quick=False, device="cpu", out_dir=tmp_path)
    assert timed == [(1, 3), (3, 20)]


def test_cpu_ops_sides_run_the_case_their_row_names(monkeypatch, tmp_path):
    """Each side of a cpu_ops case runs its own backend on the shapes its row names: the last R ids of the
    vocabulary, the whole codebook, M rows through the projections, the decoder layers of B x Q rows. Every side is
    called once on one input set, nothing timed."""
    pytest.importorskip("worldvla._C")
    from worldvla.benchmarks import cpu_ops

    seen, last, got = [], {}, {}

    def interleaved(fns, rot, warmup, repeats):
        last.clear()
        for name, fn in fns.items():
            seen.clear()
            fn(*rot.next())
            last[name] = seen[0] if seen else None
        return {name: {"median_ms": 1.0, "repeats": repeats} for name in fns}

    def record(op, shape):
        real = getattr(ops, op)

        def fn(*a, **kw):
            seen.append((kw.get("backend", a[-1]), shape(*a)))
            return real(*a, **kw)
        monkeypatch.setattr(ops, op, fn)

    record("constrained_sample", lambda h, w, lo, hi: (h.shape[0], w.shape[0] - lo, hi))
    record("vq_quantize", lambda z, cb: (z.shape[0], cb.shape[0]))
    record("resolve_linear", lambda x, w, b: x.shape[0])
    record("resolve_decoder_layer", lambda layer, x, ctx, b: tuple(x.shape[:2]))
    real_rows = cpu_ops._rows

    def rows(op, case, *a):
        got[op, case] = dict(last)
        return real_rows(op, case, *a)

    monkeypatch.setattr(cpu_ops, "_rows", rows)
    monkeypatch.setattr(cpu_ops, "interleaved", interleaved)
    monkeypatch.setattr(cpu_ops, "Rotation", lambda make, *a, **kw: common.Rotation(make, "cpu", n=1))
    monkeypatch.setattr(cpu_ops, "rotation_count", lambda *a, **kw: 1)
    monkeypatch.setattr(cpu_ops, "plot_speedups", lambda rows, path: None)
    cpu_ops.run(quick=True, out_dir=tmp_path)
    for op, case, shape in (("constrained_sample", "greedy N5 H1024 range256", (5, 256, 8192)),
                            ("vq_quantize", "N256 K2048 C256", (256, 2048)),
                            ("linear", "decode-step projections M5 (28, small config)", 5),
                            ("decoder_layer", "decode step B1 Q5 cache574 (4 layers, small config)", (1, 5))):
        sides = got[op, case]
        assert (sides["torch"], sides["native"]) == (("torch", shape), ("native", shape)), (op, sides)


def test_vq_target_is_the_least_case_and_met_at_exactly_the_target(monkeypatch, tmp_path):
    """`measured` is the least of the cases' best worldvla speed-ups (every case must reach 1.3x), the best of each
    case's worldvla rows counts, and exactly 1.3x meets the target. The rows' rotations are sized by z and the
    codebook."""
    from worldvla.benchmarks import vq

    def rows(*cases):
        return [{"N": n, "K": 8192, "C": 256, "dtype": "float32", "impl": impl, "speedup_vs_cdist": x}
                for n, impl, x in cases]

    target = vq.speedup_target(rows((512, "worldvla-native", 1.2), (512, "worldvla-triton", 2.0),
                                    (4096, "worldvla-native", 1.3), (4096, "worldvla-triton", 1.1)), on_gpu=True)
    assert target["measured"] == 1.3 and target["met"] is True
    assert target["by_case"] == {"N=512 K=8192 C=256": {"impl": "worldvla-triton", "speedup_vs_cdist": 2.0},
                                 "N=4096 K=8192 C=256": {"impl": "worldvla-native", "speedup_vs_cdist": 1.3}}
    target = vq.speedup_target(rows((512, "worldvla-native", 2.0), (4096, "worldvla-native", 1.29)), on_gpu=True)
    assert target["measured"] == 1.29 and target["met"] is False
    monkeypatch.setattr(vq, "time_interleaved", _fixed_medians({"cdist+argmin": 3.0, "worldvla-torch": 6.0,
                                                                 "worldvla-native": 1.5}))
    for r in json.loads(vq.run(quick=True, device="cpu", out_dir=tmp_path).read_text())["rows"]:
        assert r["set_bytes"] == (r["N"] + r["K"]) * r["C"] * 4, r


def _train_sides_run(monkeypatch, tmp_path, argv):
    """benchmarks.train's main on the tiny config and two short documents, each side's step run once in the
    timing (worldvla, then reference-style, then worldvla again) and once under peak_memory; returns the rows, the
    attention backend of each worldvla step, the sides peak_memory ran and tune_cpu_malloc's calls."""
    from worldvla.benchmarks import train
    from worldvla.inference import malloc
    from worldvla.model import ModelConfig

    def doc(n, prompt):
        ids = torch.arange(20000, 20000 + n)
        return ids, torch.cat([torch.full((prompt,), -100), ids[prompt:]])

    monkeypatch.setattr(train, "_samples", lambda n_docs, px, gen: [doc(5, 2), doc(9, 4)])
    monkeypatch.setattr(ModelConfig, "small", classmethod(lambda cls, layout=None, **kw: cls.tiny(layout, **kw)))
    ours, measured, tuned = [], [], []
    real = train.micro_batch_loss
    monkeypatch.setattr(train, "micro_batch_loss", lambda model, *a, **kw: ours.append(model.attn_backend)
                        or real(model, *a, **kw))
    fixed = _fixed_medians({"worldvla": 50.0, "reference-style": 200.0})

    def timing(fns, **kw):
        for name in ("worldvla", "reference-style", "worldvla"):
            kw["before"](name)
            fns[name]()
        return fixed(fns, **kw)

    def peak(fn, device):
        n = len(ours)
        fn()
        measured.append("worldvla" if len(ours) > n else "reference-style")
        return 100 if measured[-1] == "worldvla" else 400

    monkeypatch.setattr(train, "time_interleaved", timing)
    monkeypatch.setattr(train, "peak_memory", peak)
    monkeypatch.setattr(malloc, "tune_cpu_malloc", lambda **kw: tuned.append(kw))
    path = train.main([*argv, "--device", "cpu", "--out", str(tmp_path)])
    return json.loads(path.read_text()), ours, measured, tuned


def test_train_sides_each_measure_their_own_step_under_their_own_attention(monkeypatch, tmp_path):
    """The package's side runs its attention under "auto" every time, the reference-style side's "torch" not left
    behind for it; each row's peak memory is its own side's step; `--tune-malloc` reaches the run (glibc's heap
    tuned once, as `worldvla train` does on the CPU), off unless given; a full run times 10 steps of each side after 3
    warm-ups, a quick one 2 after 1."""
    doc, ours, measured, tuned = _train_sides_run(monkeypatch, tmp_path, ["--quick", "--tune-malloc"])
    assert ours == ["auto"] * 3 and measured == ["worldvla", "reference-style"]
    assert [(r["impl"], r["peak_bytes"]) for r in doc["rows"]] == [("worldvla", 100), ("reference-style", 400)]
    assert tuned == [{"mmap": False}] and doc["tune_malloc"] is True and doc["quick"] is True
    assert all((r["warmup"], r["repeats"]) == (1, 2) for r in doc["rows"])
    doc, _, _, tuned = _train_sides_run(monkeypatch, tmp_path, [])
    assert tuned == [] and doc["tune_malloc"] is False and doc["quick"] is False
    assert all((r["warmup"], r["repeats"]) == (3, 10) for r in doc["rows"])  # a full run's


def test_attention_vq_and_cpu_ops_full_runs_time_their_full_repeats(monkeypatch, tmp_path):
    """Without --quick every side is timed with the full run's repeats: attention's prefill 30 and decode 100 after
    5 warm-ups, vq 50 after 5, and cpu_ops' cases theirs (the few-row decode, sampling and the
    gather 200, the prefill through the cache, the projections and the decoder layers 50, the packed prefill 20,
    the VQ search 200 or 50 past a million distances)."""
    from worldvla.benchmarks import attention as A
    from worldvla.benchmarks import vq

    timed = []

    def fixed(fns, **kw):
        timed.append((kw["warmup"], kw["repeats"]))
        return {name: {"median_ms": 1.0, "repeats": kw["repeats"]} for name in fns}

    monkeypatch.setattr(A, "time_interleaved", fixed)
    gen = torch.Generator().manual_seed(0)
    A.run_prefill([("tiny", 32, 300, False)], 2, 16, torch.float32, torch.device("cpu"), False, gen)
    A.run_decode([("d", 32, 5, 1)], 2, 16, torch.float32, torch.device("cpu"), False, gen)
    assert timed == [(5, 30), (5, 30), (5, 100)]  # fwd, fwd+bwd, decode
    timed.clear()
    monkeypatch.setattr(vq, "time_interleaved", fixed)
    monkeypatch.setattr(vq, "Rotation", lambda make, device, quick, bytes_per_set: common.Rotation(make, device, n=1))
    vq.run(quick=False, device="cpu", out_dir=tmp_path)
    assert timed == [(5, 50)]
    rows = _cpu_ops_full_run(monkeypatch, tmp_path)
    repeats = {r["op"]: set() for r in rows}
    for r in rows:
        repeats[r["op"]].add(r["repeats"])
    assert repeats == {"masked_attention": {20}, "decode_attention": {200, 50}, "constrained_sample": {200},
                       "vq_quantize": {200, 50}, "linear": {50}, "decoder_layer": {50}, "vq_gather": {200}}


def test_cross_entropy_side_that_raises_in_its_check_is_left_out_of_the_timing(tmp_path, monkeypatch):
    """A side that raises when checked is not timed (it would raise again there and end the run): its row records
    the error and no time, and the other sides are timed and compared as before."""
    import types

    from worldvla.benchmarks import cross_entropy as CE

    timed = []

    def broken(h, w, y, cw, z, backend):
        raise RuntimeError("no kernel for these shapes")

    monkeypatch.setattr(CE, "timed_backends", lambda op: ["torch", "fused"])
    monkeypatch.setattr(CE, "ops", types.SimpleNamespace(dispatch=types.SimpleNamespace(supports=lambda *a: True),
                                                         linear_cross_entropy=broken))
    fixed = _fixed_medians({"naive": 4.0})
    monkeypatch.setattr(CE, "time_interleaved", lambda fns, **kw: timed.append(sorted(fns)) or fixed(fns, **kw))
    monkeypatch.setattr(CE, "peak_memory", lambda fn, device: 1000)
    rows = {r["impl"]: r for r in json.loads(CE.run(quick=True, device="cpu", out_dir=tmp_path).read_text())["rows"]}
    assert timed == [["naive"]] and set(rows) == {"naive", "worldvla-fused"}
    assert rows["worldvla-fused"]["error"] == "RuntimeError: no kernel for these shapes"
    assert "median_ms" not in rows["worldvla-fused"] and rows["naive"]["time_vs_naive"] == 1.0


def test_a_plot_with_no_measured_values_says_so_without_a_warning(tmp_path, monkeypatch):
    """Rows whose value is missing everywhere (every case skipped or failed) give a plot that says no value was
    measured, not an empty frame with matplotlib's "No artists with labels" warning."""
    import warnings

    import matplotlib.axes

    texts = []
    real = matplotlib.axes.Axes.text
    monkeypatch.setattr(matplotlib.axes.Axes, "text",
                        lambda ax, x, y, s, **kw: texts.append(s) or real(ax, x, y, s, **kw))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        common.plot_rows([{"x": 1, "y": None, "g": "a"}, {"x": 2, "g": "b"}], "x", "y", "g", "t", tmp_path / "p.png")
    assert texts == ["no y measured"] and (tmp_path / "p.png").stat().st_size > 0
    texts.clear()
    common.plot_rows([{"x": 1, "y": 1.0, "g": "a"}], "x", "y", "g", "t", tmp_path / "q.png")
    assert texts == []


# ------------------------------------------------------------------ serve_load's report: maxima, refusals, limits, stats
def test_serve_load_summary_max_is_the_slowest_request_and_a_phase_of_no_time_has_no_throughput():
    """max_ms is the slowest round trip wherever it came in the phase, not the last one; a phase that served
    nothing in no time (every single-robot request refused) reports no throughput instead of dividing by zero."""
    from worldvla.benchmarks import serve_load

    s = serve_load._summary([4.0, 90.0, 7.0, 2.0], 2.0)
    assert (s["requests"], s["max_ms"], s["throughput_rps"]) == (4, 90.0, 2.0)
    row = serve_load.single_robot_row([], [], [], [5.0, 6.0], 0.0, 7)
    assert row["requests"] == 0 and row["throughput_rps"] is None and row["max_ms"] is None
    assert row["failed_valid"] == 7 and row["rtt_minus_policy_p50_ms"] is None


def test_serve_load_bad_client_needs_ok_false_and_an_error_to_count_a_refusal(monkeypatch):
    """A reply counts as a refusal only when it says ok: false and carries an error: ok: false without an error,
    an error without ok: false, or a reply that is no map is a malformed request the server did not refuse."""
    import threading

    import numpy as np

    from worldvla.benchmarks import serve_load

    replies = {"no-error": {"ok": False}, "empty-error": {"ok": False, "error": ""}, "no-ok": {"error": "bad"},
               "ok-none": {"ok": None, "error": "bad"}, "list": [False, "bad"], "refused": {"ok": False, "error": "bad"}}

    class Socket:
        def send(self, msg):
            self.last = msg

        def recv(self, timeout):
            return serve_load.packb(replies.get(self.last, {"ok": True}))  # the reset opening the episode: ok

        def close(self):
            pass

    monkeypatch.setattr(serve_load, "_connect_raw", lambda url: Socket())
    monkeypatch.setattr(serve_load, "_bad_payloads",
                        lambda rng, size, limit, episode: [(k, lambda k=k: k) for k in replies])
    record = {"sent": 0, "refused": 0, "not_refused": []}
    serve_load._bad_client("ws://test", np.random.default_rng(0), 8, 1024, threading.Event(), 6, record)
    assert record["sent"] == 6 and record["refused"] == 1
    assert record["not_refused"] == ["no-error", "empty-error", "no-ok", "ok-none", "list"]


def test_serve_load_takes_a_camera_whose_act_request_is_exactly_the_payload_limit(capsys):
    """The server refuses a request over --max-payload-mb, not one of exactly that many bytes: a camera whose act
    request is exactly the limit is taken, one byte more is refused."""
    from worldvla.benchmarks import serve_load

    size = serve_load.act_request_bytes(1, 40000)
    mb = size / 2**20  # exact in binary, so int(mb * 2**20) == size
    assert serve_load.parse_args(["--camera", "1x40000", "--max-payload-mb", repr(mb)]).camera == (1, 40000)
    with pytest.raises(SystemExit):
        serve_load.parse_args(["--camera", "1x40000", "--max-payload-mb", repr((size - 1) / 2**20)])
    assert f"frames make act requests of {size} bytes, over --max-payload-mb" in capsys.readouterr().err


def test_serve_load_act_request_bytes_counts_the_request_id_at_its_widest():
    """The bytes counted are those of a PolicyClient act request whose id is the widest a uint32 can be (a long
    run's ids grow): an id of 2**32 - 1 takes 4 bytes more than a small one."""
    import re
    import uuid

    import numpy as np

    from worldvla.benchmarks import serve_load
    from worldvla.serve.client import PolicyClient

    client = PolicyClient.__new__(PolicyClient)
    client.url, client.timeout, client._closed, client._ws = "ws://h:1", 5.0, False, object()
    client.client_id, client.episode, client.max_payload_bytes = uuid.uuid4().hex, uuid.uuid4().hex, 1
    client._next_id = 2**32 - 2  # the next request's id: 2**32 - 1
    with pytest.raises(ValueError, match="more than the server's payload limit") as e:
        client.act(np.zeros((24, 32, 3), np.uint8))
    sent = int(re.search(r"\((\d+) bytes\), more than", str(e.value)).group(1))
    assert serve_load.act_request_bytes(24, 32) == sent


def _serve_load_load_phase_stubbed(monkeypatch, tmp_path, robot, bad_client, health_stats=None, timing=None):
    """serve_load's run with its server on a thread, the load phase's robots and bad clients replaced by `robot`
    and `bad_client`; `health_stats` (before, after) replace the server's counts the load row is taken from, and
    `timing` the server's timing of each single-robot request."""
    from worldvla.benchmarks import serve_load

    _serve_load_on_a_thread(monkeypatch, tmp_path)
    monkeypatch.setattr(serve_load, "_robot", robot)
    monkeypatch.setattr(serve_load, "_bad_client", bad_client)
    if health_stats is not None:
        real_health, calls = serve_load.health, []

        def health(url):
            calls.append(url)
            report = real_health(url)
            return {**report, "stats": {**report["stats"], **health_stats[min(len(calls), 2) - 1]}}

        monkeypatch.setattr(serve_load, "health", health)
    if timing is not None:
        Client = serve_load.PolicyClient

        class TimedClient(Client):
            def act(self, image, previous_image=None):
                out = super().act(image, previous_image)
                self.last_timing = dict(timing)
                return out

        monkeypatch.setattr(serve_load, "PolicyClient", TimedClient)
    args = serve_load.parse_args(["--policy", "synthetic", "--device", "cpu", "--image-size", "8", "--sequential", "3",
                                  "--clients", "2", "--bad-clients", "1", "--requests", "5", "--duration-s", "4",
                                  "--camera", "12x20", "--max-batch", "2"])
    return json.loads(serve_load._main(args, str(tmp_path / "out")).read_text())


def test_serve_load_rows_take_the_servers_counts_and_timings_of_their_own_phase(monkeypatch, tmp_path):
    """The load row's batches, mean batch, policy calls and padded rows are the server's counts over the load phase
    (after less before; the mean batch is requests per batch, not per policy call); the single-robot row's served
    policy time is the policy time the server reported, its server-side time the server's whole time."""
    def robot(url, rng, size, camera_hw, steps_per_episode, stop, max_requests, lat, failures, barrier, native):
        pass

    def bad_client(url, rng, size, limit_bytes, stop, max_requests, record):
        pass

    before = {"batches": 10, "batched_requests": 10, "policy_calls": 11, "padded_rows": 2, "max_batch_seen": 1}
    after = {"batches": 14, "batched_requests": 22, "policy_calls": 17, "padded_rows": 5, "max_batch_seen": 2}
    doc = _serve_load_load_phase_stubbed(monkeypatch, tmp_path, robot, bad_client, (before, after),
                                         {"policy_ms": 1.25, "server_ms": 3.5})
    single, load = doc["rows"]
    assert single["served_policy_p50_ms"] == 1.25 and single["server_side_p50_ms"] == 3.5
    assert single["requests"] == 3 and single["rtt_minus_policy_p50_ms"] == pytest.approx(single["p50_ms"] - 1.25)
    assert (load["batches"], load["mean_batch"], load["policy_calls"], load["padded_rows"]) == (4, 3.0, 6, 3)
    assert load["max_batch_seen"] == 2


def test_serve_load_stops_the_bad_clients_once_the_robots_are_done(monkeypatch, tmp_path):
    """The load phase lasts while its robots send: once they are all done the bad clients are told to stop, rather
    than sending until --duration-s."""
    import time

    def robot(url, rng, size, camera_hw, steps_per_episode, stop, max_requests, lat, failures, barrier, native):
        time.sleep(0.05)

    def bad_client(url, rng, size, limit_bytes, stop, max_requests, record):
        record["sent"] += 1
        stop.wait(10)

    doc = _serve_load_load_phase_stubbed(monkeypatch, tmp_path, robot, bad_client)
    assert doc["load_wall_s"] < 2  # --duration-s 4
    assert doc["rows"][1]["malformed_sent"] == 1


def test_serve_load_plot_draws_the_in_process_floor_at_the_in_process_p50(tmp_path, monkeypatch):
    """The dashed floor line is the first row's in-process p50, not a round-trip percentile."""
    from matplotlib.axes import Axes

    from worldvla.benchmarks import serve_load

    lines, real = [], Axes.axhline
    monkeypatch.setattr(Axes, "axhline", lambda self, y=0, *a, **k: lines.append(y) or real(self, y, *a, **k))
    rows = [{"phase": "single-robot", "clients": 1, "p50_ms": 3.0, "p90_ms": 4.0, "p99_ms": 6.0, "inproc_p50_ms": 2.0},
            {"phase": "load", "clients": 8, "p50_ms": 9.0, "p90_ms": 12.0, "p99_ms": 15.0, "inproc_p50_ms": 2.5}]
    serve_load.plot_latencies(rows, tmp_path / "s.png", "serve_load (test)")
    assert lines == [2.0]
    lines.clear()
    serve_load.plot_latencies([{**rows[1], "inproc_p50_ms": None}], tmp_path / "t.png", "serve_load (test)")
    assert lines == []


# ------------------------------------------------------------------ the timing harness's edges and its records
def test_a_row_spread_exactly_at_the_noise_limit_is_not_noisy():
    """noisy_rows takes the rows spread *more* than NOISY_SPREAD: a row at the limit itself is quiet."""
    at = {"median_ms": 1.0, "p90_over_p10": common.NOISY_SPREAD}
    above = {"median_ms": 1.0, "p90_over_p10": common.NOISY_SPREAD + 1e-9}
    assert common.noisy_rows([at, above]) == [above]
    assert common.noisy_rows([{"median_ms": 1.0, "max_over_min": common.NOISY_SPREAD}]) == []


def test_print_table_aligns_its_columns_and_names_the_spread_it_read(capsys):
    """Every column starts where its header does (as wide as its widest value), a missing value prints as "-",
    floats with 4 significant digits; the warning marks a row judged by its max/min (too few repeats for
    percentiles) as such, and a row judged by p90/p10 without the mark."""
    rows = [{"case": "a-long-case-name", "impl": "x", "median_ms": 1.234567, "p90_over_p10": 2.0},
            {"case": "b", "impl": None, "median_ms": 12345.678, "max_over_min": 3.0}]
    common.print_table(rows, ["case", "impl", "median_ms"])
    lines = capsys.readouterr().out.splitlines()
    header, dashes, first, second, warning = lines
    assert dashes.split() == ["-" * len("a-long-case-name"), "----", "-" * len("median_ms")]
    for line in (first, second):
        assert line.index(line.split()[1]) == header.index("impl") and line.index(line.split()[2]) == header.index(
            "median_ms")
    assert first.split() == ["a-long-case-name", "x", "1.235"] and second.split() == ["b", "-", "1.235e+04"]
    assert "a-long-case-name x (2.00x);" in warning and warning.endswith("(3.00x max/min)")


def test_rotation_sets_that_exactly_fill_the_cache_are_cache_hot(monkeypatch):
    """inputs_cache_hot: the sets together fit in the cache, their bytes equal to its size included."""
    monkeypatch.setattr(common, "cache_info", lambda device="cpu": ("L3", 4 * 256))
    exact = common.Rotation(lambda i: (torch.randn(64),), "cpu", n=4)  # 4 x 256 bytes
    assert exact.info()["inputs_cache_hot"] is True
    over = common.Rotation(lambda i: (torch.randn(64),), "cpu", n=5)
    assert over.info()["inputs_cache_hot"] is False


def test_a_quick_rotation_count_takes_the_quick_budget(monkeypatch):
    """rotation_count(quick=True) without a budget of its own is capped by QUICK_ROTATION_BUDGET, a full run's by
    ROTATION_BUDGET (free memory plentiful here)."""
    monkeypatch.setattr(common, "_available_memory", lambda device: 1 << 40)
    monkeypatch.setattr(common, "cache_info", lambda device="cpu": ("L3", 1 << 40))
    assert common.rotation_count(1 << 20, "cpu", quick=True) == common.QUICK_ROTATION_BUDGET >> 20 == 256
    assert common.rotation_count(1 << 20, "cpu", max_sets=1 << 20) == common.ROTATION_BUDGET >> 20


def test_available_memory_reads_memavailable_in_bytes(monkeypatch, tmp_path):
    """The CPU's free memory is /proc/meminfo's MemAvailable (kB, so x 1024), not MemFree, which leaves out the
    page cache the kernel would give back; unreadable, it is 0 (no set beyond the first)."""
    from pathlib import Path

    (tmp_path / "proc").mkdir()
    (tmp_path / "proc/meminfo").write_text("MemTotal:       8000000 kB\nMemFree:         100000 kB\n"
                                           "MemAvailable:   4000000 kB\n")
    monkeypatch.setattr(common, "Path", lambda p: Path(str(tmp_path) + str(p)))
    assert common._available_memory("cpu") == 4000000 * 1024
    (tmp_path / "proc/meminfo").unlink()
    assert common._available_memory("cpu") == 0


def test_timings_without_a_rotation_say_their_inputs_did_not_rotate():
    """A row timed without a rotation records inputs_rotated: false, in time_fn as in time_interleaved."""
    assert common.time_fn(lambda: None, warmup=0, repeats=1)["inputs_rotated"] is False
    assert common.time_interleaved({"a": lambda: None}, warmup=0, repeats=1)["a"]["inputs_rotated"] is False


def test_interleaved_calls_each_take_the_next_input_set():
    """time_interleaved hands every call, warm-up included, the rotation's next set, so that no side reads the
    inputs the side before it just read; each side's row records the rotation."""
    class Sets(_CountingSets):
        def info(self):
            return {"inputs_rotated": True, "rotated_sets": 99}

    seen = []
    out = common.time_interleaved({s: (lambda i, s=s: seen.append(i)) for s in "ab"}, warmup=1, repeats=2,
                                  rotation=Sets())
    assert seen == [1, 2, 3, 4, 5, 6]
    assert all(r["inputs_rotated"] is True and r["rotated_sets"] == 99 for r in out.values())


def test_timings_refuse_a_boolean_call_count():
    """`repeats=True` is not a count (bool is an int subclass): refused by name like any other non-count."""
    for kw, name in (({"repeats": True}, "repeats"), ({"warmup": False}, "warmup")):
        with pytest.raises(ValueError, match=f"{name} must be an integer"):
            common.time_fn(lambda: None, **kw)
        with pytest.raises(ValueError, match=f"{name} must be an integer"):
            common.time_interleaved({"a": lambda: None}, **kw)


def test_package_commit_is_the_checkouts_own_and_none_outside_a_checkout(monkeypatch, tmp_path):
    """The commit is that of the repository whose root holds the package; a copy of the tree without its .git
    records None, even inside another repository (git would answer for that one)."""
    import subprocess

    import worldvla

    def git(*args, cwd):
        return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=cwd, check=True,
                              capture_output=True, text=True).stdout.strip()

    outer = tmp_path / "outer"
    (outer / "copy/worldvla").mkdir(parents=True)
    git("init", "-q", cwd=outer)
    git("commit", "-q", "--allow-empty", "-m", "outer", cwd=outer)
    inner = tmp_path / "checkout"
    (inner / "worldvla").mkdir(parents=True)
    git("init", "-q", cwd=inner)
    git("commit", "-q", "--allow-empty", "-m", "inner", cwd=inner)
    head = git("rev-parse", "HEAD", cwd=inner)
    common.package_version.cache_clear()
    try:
        monkeypatch.setattr(worldvla, "__file__", str(inner / "worldvla/__init__.py"))
        assert common.package_version() == (worldvla.__version__, head)
        common.package_version.cache_clear()
        monkeypatch.setattr(worldvla, "__file__", str(outer / "copy/worldvla/__init__.py"))
        assert common.package_version() == (worldvla.__version__, None)
    finally:
        monkeypatch.undo()
        common.package_version.cache_clear()


def test_driver_version_is_one_line_on_a_machine_of_several_gpus(monkeypatch):
    """nvidia-smi prints a line per GPU: the result records the first, not the list."""
    import subprocess
    import types

    monkeypatch.setattr(subprocess, "run", lambda *a, **k: types.SimpleNamespace(
        returncode=0, stdout="550.54.15\n550.54.15\n"))
    common.nvidia_driver_version.cache_clear()
    try:
        assert common.nvidia_driver_version() == "550.54.15"
    finally:
        common.nvidia_driver_version.cache_clear()


def test_an_empty_isa_setting_is_no_limit(monkeypatch):
    """`ATEN_CPU_CAPABILITY=` (set, empty) caps nothing: no isa_limits, and the machine keeps its own name."""
    for var in common.ISA_LIMIT_VARS:
        monkeypatch.delenv(var, raising=False)
    plain = common.device_name("cpu")
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "")
    assert common.isa_limits() == {} and common.device_name("cpu") == plain
    monkeypatch.setenv("MKL_ENABLE_INSTRUCTIONS", "AVX2")
    assert common.isa_limits() == {"MKL_ENABLE_INSTRUCTIONS": "AVX2"}


def test_hardware_capability_needs_every_avx512_subset(monkeypatch, tmp_path):
    """torch's avx512 kernels need AVX-512 F, BW, VL and DQ: a CPU with F alone (Knights Landing) is an avx2 one."""
    from pathlib import Path

    (tmp_path / "proc").mkdir()
    monkeypatch.setattr(common, "Path", lambda p: Path(str(tmp_path) + str(p)))
    for flags, want in (("fpu avx2 fma avx512f avx512bw avx512vl avx512dq", "avx512"),
                        ("fpu avx2 fma avx512f avx512cd", "avx2"), ("fpu avx2", None)):
        (tmp_path / "proc/cpuinfo").write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
        assert common._hardware_capability() == want, flags


def test_bandwidth_defaults_to_a_2_gib_copy_timed_as_asked(monkeypatch):
    """Without a size the copy is 2 GiB (`BANDWIDTH_METHOD`), and gpu_time and repeats reach the timing. CUDA
    faked: small buffers on the CPU, the sizes asked for recorded, the copy's median fixed at 20 ms."""
    real_empty = torch.empty
    asked, timed = [], []
    monkeypatch.setattr(torch, "empty", lambda n, *a, device=None, **kw: asked.append(n) or real_empty(8, *a, **kw))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(common, "time_fn", lambda fn, **kw: (timed.append(kw), {"median_ms": 20.0})[-1])
    assert common.measure_bandwidth("cuda", gpu_time=True, repeats=4) == pytest.approx(2 * (2 << 30) / 20e-3 / 1e9)
    assert asked == [2 << 30] and timed[0]["gpu_time"] is True and timed[0]["repeats"] == 4


def test_results_are_written_into_a_folder_made_with_its_parents(tmp_path):
    """`--out results/2026/h100`: every missing folder of the path is made."""
    path = common.write_results("demo", [{"x": 1}], "cpu", tmp_path / "a/b/c")
    assert path.parent == tmp_path / "a/b/c" and json.loads(path.read_text())["rows"] == [{"x": 1}]


def test_last_level_cache_of_a_machine_listing_only_l1_counts_its_data_cache(monkeypatch, tmp_path):
    """Instruction caches never count, even where the top level sysfs lists is the first (some VMs)."""
    from pathlib import Path

    for index, kind in ((0, "Data"), (1, "Instruction")):
        d = tmp_path / f"sys/devices/system/cpu/cpu0/cache/index{index}"
        d.mkdir(parents=True)
        for name, text in (("type", kind), ("level", "1"), ("size", "48K" if kind == "Data" else "32K"),
                           ("shared_cpu_list", "0")):
            (d / name).write_text(text + "\n")
    monkeypatch.setattr(common, "Path", lambda p: Path(str(tmp_path) + str(p)))
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    common.cpu_last_level_cache.cache_clear()
    try:
        assert common.cpu_last_level_cache() == ("L1", 48 << 10)
    finally:
        common.cpu_last_level_cache.cache_clear()


def test_cache_sizes_read_every_suffix():
    assert common._cache_size_bytes("2G\n") == 2 << 30 and common._cache_size_bytes("1024") == 1024
    assert common._cache_size_bytes("512k") == 512 << 10


def test_cpu_peak_memory_without_malloc_trim_is_unknown(monkeypatch):
    """Off glibc freed memory cannot be handed back first, so the peak is not measured: None, the call not made,
    and no method recorded."""
    monkeypatch.setattr(common, "_malloc_trim", lambda: None)
    called = []
    assert common.peak_memory(lambda: called.append(1), "cpu") is None and not called
    assert common.peak_memory_method("cpu") is None


def test_an_l2_torch_does_not_report_is_taken_as_an_h100s(monkeypatch):
    """Older torch has no L2_cache_size: the rotation then sizes its sets for a 50 MiB L2, not for no cache."""
    import types

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: types.SimpleNamespace())
    assert common.l2_cache_bytes("cuda") == 50 << 20 and common.cache_info("cuda") == ("L2", 50 << 20)


def test_triton_is_timed_unless_it_runs_in_its_interpreter(monkeypatch):
    monkeypatch.setattr("worldvla.ops.dispatch.available", lambda op: ["torch", "triton", "native"])
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert common.timed_backends("op") == ["torch", "native"]
    for off in ("0", ""):
        monkeypatch.setenv("TRITON_INTERPRET", off)
        assert common.timed_backends("op") == ["torch", "triton", "native"]


def test_plots_order_numeric_labels_by_value_and_warn_of_bars_drawn_over(tmp_path, monkeypatch):
    """x labels "2", "10", "128" read in that order (not "10", "128", "2"); two rows of one series at one x
    would draw one bar over the other: a warning names the series."""
    import warnings

    import matplotlib.axes

    ticks = []
    real = matplotlib.axes.Axes.set_xticks
    monkeypatch.setattr(matplotlib.axes.Axes, "set_xticks",
                        lambda ax, t, labels=None, **kw: ticks.append(list(labels)) or real(ax, t, labels, **kw))
    rows = [{"x": x, "y": 1.0, "g": "a"} for x in (128, 2, 10)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        common.plot_rows(rows, "x", "y", "g", "t", tmp_path / "p.png")
    assert ticks == [["2", "10", "128"]]
    with pytest.warns(UserWarning, match="series 'a' has several y values at one x"):
        common.plot_rows(rows + [{"x": 2, "y": 3.0, "g": "a"}], "x", "y", "g", "t", tmp_path / "q.png")


def test_an_oserror_of_the_measured_call_is_raised_not_taken_for_an_unknown_peak():
    """peak_memory on the CPU returns None where the measurement itself cannot be made; an OSError raised by the
    call it measures (a missing file the benchmark reads) reaches the caller, and the call ran once."""
    from worldvla.benchmarks import common

    if common.peak_memory_method("cpu") is None:
        pytest.skip("no malloc_trim or /proc/self/clear_refs here: peak memory is not measured on this machine")
    calls = []

    def fails():
        calls.append(1)
        open("/nonexistent-folder/x")

    with pytest.raises(FileNotFoundError, match="nonexistent-folder"):
        common.peak_memory(fails, "cpu")
    assert calls == [1]
    assert common.peak_memory(lambda: torch.ones(16 << 20), "cpu") >= 60 << 20  # 64 MiB written


def test_the_noisy_row_warning_names_rows_as_the_table_prints_them(capsys):
    """A noisy row is named in the warning by its cells as the table shows them: an empty cell as "-" (not
    "None"), a float to four significant digits."""
    from worldvla.benchmarks import common

    rows = [{"case": "decode", "impl": None, "scale": 0.123456, "median_ms": 1.0, "p90_over_p10": 3.0}]
    common.print_table(rows, ["case", "impl", "scale", "median_ms"])
    warning = capsys.readouterr().out.splitlines()[-1]
    assert warning.startswith("warning: 1 of 1 rows spread") and warning.endswith(": decode - 0.1235 (3.00x)")


# ------------------------------------------------------------------ timing samples, ratios and result records
def test_time_fn_runs_setup_before_every_call_warm_up_included():
    """time_fn's `setup()` precedes every call, the warm-up calls as well as the timed ones, each with the
    rotation's next set: the calls see setup, call, setup, call, ... from the first on."""
    events = []
    rot = common.Rotation(lambda i: (i,), n=3)
    st = common.time_fn(lambda i: events.append(("call", i)), warmup=2, repeats=4,
                        setup=lambda: events.append("setup"), rotation=rot)
    assert events == [e for i in range(6) for e in ("setup", ("call", i % 3))]
    assert st["repeats"] == 4 and st["warmup"] == 2 and st["rotated_sets"] == 3


def test_stats_median_of_an_even_count_is_the_mean_of_the_middle_two():
    """A row of an even number of repeats takes the mean of its two middle times as its median (neither of
    them alone), below and above PERCENTILE_MIN_REPEATS alike."""
    assert common._stats([4.0, 1.0, 2.0, 3.0])["median_ms"] == 2.5
    twelve = [float(t) for t in (12, 1, 11, 2, 10, 3, 9, 4, 8, 5, 7, 6)]
    st = common._stats(twelve)
    assert st["median_ms"] == 6.5 and (st["p10_ms"], st["p90_ms"]) == (2.0, 11.0)


def test_cross_entropy_run_whose_reference_fails_writes_unknown_matches_and_does_not_fail(tmp_path, monkeypatch):
    """A float64 reference that cannot be computed (out of memory) leaves every row's matches_reference None with
    the reason: the sides are still timed, and the run ends without the mismatch error a False would raise."""
    from worldvla.benchmarks import cross_entropy as CE

    def no_memory(*a, **kw):
        raise MemoryError("float64 logits")

    monkeypatch.setattr(CE, "reference64", no_memory)
    monkeypatch.setattr(CE, "timed_backends", lambda op: [])
    monkeypatch.setattr(CE, "time_interleaved", _fixed_medians({"naive": 2.0}))
    monkeypatch.setattr(CE, "peak_memory", lambda fn, device: 1000)
    path = CE.run(quick=True, device="cpu", out_dir=tmp_path)
    (row,) = json.loads(path.read_text())["rows"]
    assert row["impl"] == "naive" and row["median_ms"] == 2.0 and row["matches_reference"] is None
    assert row["check_error"] == "MemoryError: float64 logits"


def test_results_record_the_threads_torch_runs_not_the_machines_cores(tmp_path, monkeypatch):
    """A result's cpu_threads is torch's thread count for the run (what its CPU times used), not the number of
    cores the machine has."""
    monkeypatch.setattr(common.torch, "get_num_threads", lambda: 7)
    path = common.write_results("t", [{"median_ms": 1.0}], "cpu", tmp_path)
    assert json.loads(path.read_text())["cpu_threads"] == 7 == common.environment("cpu")["cpu_threads"]


def test_a_plotted_value_of_zero_is_drawn_as_a_bar(tmp_path, monkeypatch):
    """plot_rows leaves out only rows whose value is missing (None): a measured 0 (an argmin agreement of 0, a
    time below the clock's resolution) is drawn, and the plot then has no "no ... measured" note."""
    import matplotlib
    import matplotlib.axes

    matplotlib.use("Agg")
    bars, notes = [], []
    real_bar, real_text = matplotlib.axes.Axes.bar, matplotlib.axes.Axes.text
    monkeypatch.setattr(matplotlib.axes.Axes, "bar", lambda self, x, h, *a, **kw: bars.append(
        (kw["label"], list(h))) or real_bar(self, x, h, *a, **kw))
    monkeypatch.setattr(matplotlib.axes.Axes, "text", lambda self, x, y, s, *a, **kw: notes.append(s) or real_text(
        self, x, y, s, *a, **kw))
    rows = [{"x": 1, "y": 0.0, "g": "a"}, {"x": 2, "y": None, "g": "a"}, {"x": 1, "y": 0, "g": "b"}]
    common.plot_rows(rows, "x", "y", "g", "t", tmp_path / "p.png")
    assert sorted(bars) == [("a", [0.0]), ("b", [0])] and notes == []
    bars.clear()
    common.plot_rows([{"x": 1, "y": None, "g": "a"}], "x", "y", "g", "t", tmp_path / "q.png")
    assert bars == [] and notes == ["no y measured"]


def test_vq_and_cross_entropy_tables_print_their_ratio_columns(tmp_path, monkeypatch, capsys):
    """The printed tables carry each benchmark's ratios beside its times: vq its speedup over cdist + argmin and
    the argmin agreement; cross-entropy its time and peak memory over the naive side's."""
    from worldvla.benchmarks import cross_entropy as CE
    from worldvla.benchmarks import vq

    monkeypatch.setattr(vq, "timed_backends", lambda op: [])
    monkeypatch.setattr(vq, "time_interleaved", _fixed_medians({"cdist+argmin": 2.0}))
    vq.run(quick=True, device="cpu", out_dir=tmp_path)
    header = capsys.readouterr().out.splitlines()[0].split()
    assert header == ["N", "K", "C", "dtype", "impl", "median_ms", "tflops", "speedup_vs_cdist", "argmin_agreement",
                      "rotated_sets"]

    monkeypatch.setattr(CE, "timed_backends", lambda op: [])
    monkeypatch.setattr(CE, "time_interleaved", _fixed_medians({"naive": 2.0}))
    monkeypatch.setattr(CE, "check_sides", lambda impls, *a: {name: {"matches_reference": True} for name in impls})
    monkeypatch.setattr(CE, "peak_memory", lambda fn, device: 1000)
    CE.run(quick=True, device="cpu", out_dir=tmp_path)
    header = capsys.readouterr().out.splitlines()[0].split()
    assert header == ["N", "hidden", "vocab", "impl", "median_ms", "time_vs_naive", "peak_bytes", "memory_vs_naive",
                      "rotated_sets", "worst_over_tolerance", "matches_reference"]


def test_vq_run_fails_when_a_worldvla_side_raises(tmp_path, monkeypatch):
    """Only the same-dtype cdist baseline may be missing (a torch without bf16 cdist); a worldvla backend that
    raises in the agreement check fails the run, as the fp32 baseline would."""
    from worldvla.benchmarks import vq

    def broken(z, cb, backend):
        raise RuntimeError("no kernel image")

    monkeypatch.setattr(vq, "timed_backends", lambda op: ["torch"])
    monkeypatch.setattr(vq.ops, "vq_quantize", broken)
    monkeypatch.setattr(vq, "time_interleaved", _fixed_medians({"cdist+argmin": 2.0, "worldvla-torch": 1.0}))
    with pytest.raises(RuntimeError, match="no kernel image"):
        vq.run(quick=True, device="cpu", out_dir=tmp_path)
    assert not list(tmp_path.glob("vq_quantize-*.json"))


class _FakeCudaTimeline:
    """torch.cuda's events, spin kernel and synchronization recorded in order: each event pair's elapsed time is
    the next of `times`, and an event read before its own synchronize is an error."""

    def __init__(self, monkeypatch, times):
        self.log, self.times = [], list(times)
        timeline = self

        class Event:
            def __init__(self, enable_timing=False):
                assert enable_timing
                self.synced = False

            def record(self):
                timeline.log.append("record")

            def synchronize(self):
                self.synced = True
                timeline.log.append("event-sync")

            def elapsed_time(self, end):
                assert end.synced, "an event read before the device reached it"
                return timeline.times.pop(0)

        monkeypatch.setattr(torch.cuda, "Event", Event)
        monkeypatch.setattr(torch.cuda, "_sleep", lambda cycles: self.log.append("spin"), raising=False)
        monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: self.log.append("sync"))

    def call(self, name):
        return lambda *a: self.log.append(name)


def test_cuda_timing_queues_the_spin_before_the_start_event_and_times_only_the_repeats(monkeypatch):
    """On CUDA, time_fn times each repeat by an event pair around the call, read after the end event is reached;
    with gpu_time the spin kernel is queued before the start event (so the events time the device's work, not the
    spin), the row says "device", without it "wall"; the warm-up calls are not timed."""
    cuda = _FakeCudaTimeline(monkeypatch, [5.0, 9.0, 7.0])
    st = common.time_fn(cuda.call("fn"), warmup=2, repeats=3, device="cuda", gpu_time=True)
    timed = ["spin", "record", "fn", "record", "event-sync"]
    assert cuda.log == ["fn", "fn", "sync"] + timed * 3
    assert st["median_ms"] == 7.0 and (st["min_ms"], st["max_ms"]) == (5.0, 9.0) and st["timed"] == "device"

    cuda = _FakeCudaTimeline(monkeypatch, [4.0])
    st = common.time_fn(cuda.call("fn"), warmup=0, repeats=1, device="cuda")
    assert cuda.log == ["sync", "record", "fn", "record", "event-sync"] and st["timed"] == "wall"


def test_cuda_interleaved_timing_spins_before_each_start_event_and_reads_each_end_after_it(monkeypatch):
    """time_interleaved on CUDA: every call between its own event pair, the spin kernel (gpu_time) queued before
    the start event, each elapsed time read once its end event is reached; the rows say "device" with the spin
    and "wall" without it (gpu_time not asked, or a torch without the spin kernel); the warm-up round's times are
    left out."""
    cuda = _FakeCudaTimeline(monkeypatch, [100.0, 100.0, 1.0, 2.0, 3.0, 10.0])
    out = common.time_interleaved({"a": cuda.call("a"), "b": cuda.call("b")}, warmup=1, repeats=2, device="cuda",
                                  gpu_time=True)
    assert cuda.log == ["sync"] + [e for n in "abbaab" for e in ("spin", "record", n, "record", "event-sync")]
    assert (out["a"]["median_ms"], out["b"]["median_ms"]) == (2.5, 5.5)  # b 1 and a 2, then a 3 and b 10
    assert out["a"]["timed"] == out["b"]["timed"] == "device"

    cuda = _FakeCudaTimeline(monkeypatch, [1.0, 2.0])
    out = common.time_interleaved({"a": cuda.call("a"), "b": cuda.call("b")}, warmup=0, repeats=1, device="cuda")
    assert "spin" not in cuda.log and out["a"]["timed"] == out["b"]["timed"] == "wall"

    cuda = _FakeCudaTimeline(monkeypatch, [1.0, 2.0])
    monkeypatch.delattr(torch.cuda, "_sleep")
    out = common.time_interleaved({"a": cuda.call("a"), "b": cuda.call("b")}, warmup=0, repeats=1, device="cuda",
                                  gpu_time=True)
    assert "spin" not in cuda.log and out["a"]["timed"] == out["b"]["timed"] == "wall"


def test_a_quick_vq_run_searches_a_smaller_codebook_and_names_each_series_by_side_and_dtype(tmp_path, monkeypatch):
    """--quick on the CPU searches 256 vectors in a 2048 x 256 codebook (the full run the release's 8192 codes).
    Each VQ row's `series` (the plot's bars) is its side and dtype, so that a GPU run's float32 and bfloat16
    rows of one side are two series, not one drawn over the other."""
    from worldvla.benchmarks import vq

    monkeypatch.setattr(vq, "timed_backends", lambda op: ["torch"])
    monkeypatch.setattr(vq, "time_interleaved", _fixed_medians({"cdist+argmin": 2.0, "worldvla-torch": 1.0}))
    rows = json.loads(vq.run(quick=True, device="cpu", out_dir=tmp_path).read_text())["rows"]
    assert [(r["N"], r["K"], r["C"]) for r in rows] == [(256, 2048, 256)] * 2
    assert {r["impl"]: r["series"] for r in rows} == {"cdist+argmin": "cdist+argmin float32",
                                                       "worldvla-torch": "worldvla-torch float32"}


def test_vq_bfloat16_rows_compare_with_both_cdist_baselines(tmp_path, monkeypatch):
    """On a GPU every case runs in float32 and bfloat16: a bfloat16 row's speedup_vs_cdist is the float32 cdist's
    median over its own (and says so), its speedup_vs_cdist_same_dtype the bfloat16 cdist's median over its own;
    float32 rows have no same-dtype side. (CUDA's parts stood in for by small CPU tensors, the timing fixed.)"""
    from worldvla.benchmarks import vq

    real_make, real_cdist = vq.make_inputs, torch.cdist
    monkeypatch.setattr(vq, "make_inputs", lambda N, K, C, dtype, device: real_make(8, 16, 4, dtype, "cpu"))
    monkeypatch.setattr(vq, "Rotation", lambda make, device, quick, bytes_per_set: common.Rotation(make, "cpu", n=1))
    monkeypatch.setattr(torch, "cdist", lambda a, b: real_cdist(a.float(), b.float()))  # bf16 cdist, as CUDA runs it
    monkeypatch.setattr(vq, "timed_backends", lambda op: ["torch"])
    monkeypatch.setattr(vq, "time_interleaved", _fixed_medians(
        {"cdist+argmin": 6.0, "cdist+argmin same-dtype": 4.0, "worldvla-torch": 2.0}))
    written = []
    monkeypatch.setattr(vq, "write_results", lambda name, rows, *a, **kw: written.append(rows))
    vq.run(quick=True, device="cuda", out_dir=tmp_path)
    (rows,) = written
    got = {(r["N"], r["dtype"], r["impl"]): r for r in rows}
    assert len(rows) == 3 * (2 + 3)
    for N in (2 * 256, 4 * 1024, 64 * 256):
        assert (N, "float32", "cdist+argmin same-dtype") not in got
        assert "speedup_vs_cdist_same_dtype" not in got[N, "float32", "worldvla-torch"]
        bf16 = got[N, "bfloat16", "worldvla-torch"]
        assert bf16["speedup_vs_cdist"] == 3.0 and bf16["speedup_vs_cdist_same_dtype"] == 2.0
        assert bf16["cdist_baseline_dtype"] == "float32" and "float32 cdist baseline" in bf16["speedup_vs_cdist_note"]
        same = got[N, "bfloat16", "cdist+argmin same-dtype"]
        assert same["speedup_vs_cdist"] == 1.5 and same["speedup_vs_cdist_same_dtype"] == 1.0


def test_attention_check_passes_an_error_exactly_at_its_tolerance():
    """The bound is inclusive: an error equal to tol * (|ref| + mean |ref|) still matches (worst_over_tolerance
    exactly 1), one a hair past it does not. A zero reference element makes the bound tol * mean |ref| exactly."""
    from worldvla.benchmarks import attention as A

    want = torch.tensor([0.0, 2.0, -2.0, 0.0], dtype=torch.float64)  # mean |want| = 1
    bound = A.CHECK_TOLERANCE[torch.float32] * 1.0
    got = want.clone()
    got[0] = bound
    out = A.check(got, want, torch.float32)
    assert out["worst_over_tolerance"] == 1.0 and out["matches_reference"] is True
    got[0] = bound * (1 + 1e-9)
    assert A.check(got, want, torch.float32)["matches_reference"] is False


def test_attention_run_fails_only_for_a_side_that_does_not_match(monkeypatch, tmp_path):
    """A side whose reference could not be computed (matches_reference None) or that did not run (an error row)
    does not fail the run; one that does not match fails it after the JSON is written, naming that side only."""
    from worldvla.benchmarks import attention as A

    decode = [{"impl": "worldvla-torch", "median_ms": 1.0, "matches_reference": None, "check_error": "out of memory"},
              {"impl": "worldvla-triton", "error": "no GPU"}]
    monkeypatch.setattr(A, "run_decode", lambda cases, *a, **k: [dict(r, case=cases[0][0], mode="decode")
                                                                 for r in decode])
    prefill = [{"impl": "flex", "median_ms": 2.0, "matches_reference": True}]
    monkeypatch.setattr(A, "run_prefill", lambda cases, *a, **k: [dict(r, case=cases[0][0], mode="fwd")
                                                                  for r in prefill])
    path = A.run(quick=True, device="cpu", out_dir=tmp_path)
    assert len(json.loads(path.read_text())["rows"]) == 4
    prefill[0]["matches_reference"] = False
    with pytest.raises(RuntimeError, match=r"attention: 2 side\(s\) do not match the reference: 256px flex fwd, "
                                           r"causal flex fwd \(see "):
        A.run(quick=True, device="cpu", out_dir=tmp_path / "again")
    assert len(json.loads(next((tmp_path / "again").glob("*.json")).read_text())["rows"]) == 4


def test_serve_load_batched_floor_takes_a_quarter_of_the_sequential_requests_and_its_own_times(monkeypatch, tmp_path):
    """The in-process batched floor (a batch of --max-batch frames) is timed max(5, --sequential / 4) times, the
    single-frame floor 10 times per block of the single robot's requests; the load row's inproc_batch<N>_p50_ms is
    the batched floor's median, inproc_p50_ms the single frame's."""
    from worldvla.benchmarks import serve_load

    _serve_load_on_a_thread(monkeypatch, tmp_path)
    monkeypatch.setattr(serve_load, "_robot", lambda *a: None)
    monkeypatch.setattr(serve_load, "_bad_client", lambda *a: None)
    calls = []

    def in_process_latency(policy, size, repeats, rng, batch=1):
        calls.append((batch, repeats))
        return [10.0 * batch] * repeats

    monkeypatch.setattr(serve_load, "in_process_latency", in_process_latency)
    args = serve_load.parse_args(["--policy", "synthetic", "--device", "cpu", "--image-size", "8", "--sequential", "40",
                                  "--clients", "1", "--bad-clients", "0", "--requests", "1", "--duration-s", "4",
                                  "--max-batch", "3"])
    single, load = json.loads(serve_load._main(args, str(tmp_path / "out")).read_text())["rows"]
    assert calls == [(3, 10)] + [(1, 10)] * 4
    assert single["inproc_p50_ms"] == load["inproc_p50_ms"] == 10.0 and load["inproc_batch3_p50_ms"] == 30.0


def test_serve_load_robots_start_a_new_episode_every_25_requests_and_the_row_takes_the_servers_largest_batch(
        monkeypatch, tmp_path):
    """Each load-phase robot is handed --requests and a new episode every 25 requests (the first at the model's
    size, the second at the camera's); the load row's max_batch_seen is the largest batch the server ran, not
    --max-batch; the JSON records the machine's CPU count."""
    import os

    handed = []

    def robot(url, rng, size, camera_hw, steps_per_episode, stop, max_requests, lat, failures, barrier, native):
        handed.append((size, tuple(camera_hw), steps_per_episode, max_requests, native))

    def bad_client(url, rng, size, limit_bytes, stop, max_requests, record):
        pass

    before = {"batches": 3, "batched_requests": 3, "policy_calls": 3, "padded_rows": 0, "max_batch_seen": 1}
    after = {"batches": 4, "batched_requests": 4, "policy_calls": 4, "padded_rows": 0, "max_batch_seen": 1}
    doc = _serve_load_load_phase_stubbed(monkeypatch, tmp_path, robot, bad_client, (before, after))
    assert sorted(handed, key=lambda h: not h[-1]) == [(8, (12, 20), 25, 5, True), (8, (12, 20), 25, 5, False)]
    assert doc["rows"][1]["max_batch_seen"] == 1  # --max-batch 2
    assert doc["cpu_count"] == os.cpu_count()
