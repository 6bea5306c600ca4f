"""tune_cpu_malloc: glibc keeps freed blocks for reuse (no page faults on the next allocation of the
same size), bad values are refused, the CPU policy applies it by default, and the e2e comparison
runs. The allocator's behaviour is process-wide, so it is measured in fresh processes."""
import json
import platform
import subprocess
import sys
import textwrap
import types

import pytest

from worldvla.inference import malloc

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
needs_glibc = pytest.mark.skipif(not GLIBC, reason="mallopt thresholds are glibc's")


def _run(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout


# The steady state of a script's `rounds(n)`: the fewest minor faults per round over five windows of
# four rounds, after two rounds of warm-up.
STEADY = """
rounds(2)
windows = []
for _ in range(5):
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    rounds(4)
    windows.append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / 4)
print(json.dumps(min(windows)))
"""


def _faults_per_round(tmp_path, script: str, sides) -> dict:
    path = tmp_path / "rounds.py"
    path.write_text(script + STEADY)
    return {side: json.loads(subprocess.run([sys.executable, str(path), side], capture_output=True, text=True,
                                            check=True, timeout=300).stdout) for side in sides}


# A forward's elementwise temporaries: four ops a round, each writing a fresh 1.7 MiB tensor, in
# one thread. glibc's own defaults adapt with the program's history (this pattern faulted 830-1,690
# pages a round in some processes and about 10 in others), so the control fixes both thresholds at
# glibc's starting 128 KiB: every block is a fresh mapping. Tuned, the freed blocks are reused.
ROUNDS = """
import json, resource, sys, torch
from worldvla.inference.malloc import tune_cpu_malloc
torch.set_num_threads(1)
if sys.argv[1] == "128KiB":
    assert tune_cpu_malloc(mmap_threshold=128 << 10, trim_threshold=128 << 10) is not None
else:
    assert tune_cpu_malloc() is not None
x = torch.randn(574, 256)
def rounds(n):
    for _ in range(n):
        a = torch.nn.functional.silu(x.repeat(1, 3))
        b = a * a
        c = b + a
        del a, b, c
"""


@needs_glibc
def test_tuned_malloc_reuses_freed_blocks(tmp_path):
    pages = 4 * 574 * 768 * 4 // 4096  # written per round
    per_round = _faults_per_round(tmp_path, ROUNDS, ("128KiB", "tuned"))
    assert per_round["128KiB"] > 0.9 * pages, per_round  # every page of every block faulted in again
    assert per_round["tuned"] < pages / 100, per_round


@needs_glibc
def test_settings_are_reported_and_changed():
    out = json.loads(_run("""
        import json
        from worldvla.inference.malloc import cpu_malloc_settings, tune_cpu_malloc
        before = cpu_malloc_settings()
        first = tune_cpu_malloc()
        second = tune_cpu_malloc(mmap_threshold=1 << 20, trim_threshold=0)
        print(json.dumps([before, first, second, cpu_malloc_settings()]))
    """))
    assert out[0] is None
    assert out[1] == {"mmap_threshold": malloc.MAX_MMAP_THRESHOLD, "trim_threshold": 1 << 30, "mmap": True}
    assert out[2] == out[3] == {"mmap_threshold": 1 << 20, "trim_threshold": 0, "mmap": True}


@pytest.mark.parametrize("kw", [{"mmap_threshold": -1}, {"mmap_threshold": malloc.MAX_MMAP_THRESHOLD + 1},
                                {"trim_threshold": 2**31}, {"trim_threshold": 1.5}, {"mmap_threshold": True},
                                {"mmap": 0}])
def test_bad_values_are_refused(kw):
    name = next(iter(kw))
    with pytest.raises(ValueError, match=f"{name} must be"):
        malloc.tune_cpu_malloc(**kw)


# Blocks above glibc's 32 MiB ceiling are mapped afresh on every allocation unless mapping is off
# (a 65,536-entry embedding's fp32 gradient is 64 MiB). Where transparent huge pages are "always" on
# (or glibc's hugetlb tunable advises them), the kernel backs such a block with 2 MiB pages: about 20
# faults for 40 MiB instead of 10,240, so the control would not show its fresh mapping. The script
# turns huge pages off for its process (prctl PR_SET_THP_DISABLE, which overrides both), so that every
# fault is one 4 KiB page whatever the machine's setting.
BIG = """
import ctypes, json, resource, sys, torch
from worldvla.inference.malloc import tune_cpu_malloc
assert ctypes.CDLL(None, use_errno=True).prctl(41, 1, 0, 0, 0) == 0, ctypes.get_errno()  # PR_SET_THP_DISABLE
torch.set_num_threads(1)
assert tune_cpu_malloc(mmap=sys.argv[1] == "mmap") is not None
def rounds(n):
    for _ in range(n):
        t = torch.empty(10 << 20).fill_(1.0)  # 40 MiB
        del t
"""


@needs_glibc
def test_mmap_off_reuses_blocks_above_the_threshold_ceiling(tmp_path):
    pages = (40 << 20) // 4096
    per_round = _faults_per_round(tmp_path, BIG, ("mmap", "no-mmap"))
    assert per_round["mmap"] > 0.9 * pages, per_round  # mapped afresh each round: every page faulted in again
    assert per_round["no-mmap"] < per_round["mmap"] / 20 and per_round["no-mmap"] < pages / 100, per_round


def test_policy_tunes_on_cpu_unless_told_not_to(monkeypatch):
    import torch

    from worldvla import ActionTokenizer, VocabLayout
    from worldvla.inference import WorldVLAPolicy, policy
    from worldvla.model import ModelConfig, WorldVLA
    from worldvla.vqgan import VQGAN, VQGANConfig

    calls = []
    monkeypatch.setattr(policy, "tune_cpu_malloc", lambda: calls.append(1))
    layout = VocabLayout.compact(n_image_codes=64)
    model = WorldVLA(ModelConfig.tiny(layout)).eval()
    torch.manual_seed(0)
    vq = VQGAN(VQGANConfig(ch=32, ch_mult=(1, 1, 1, 1, 1), num_res_blocks=1, z_channels=32, embed_dim=32,
                           n_embed=64)).eval()
    at = ActionTokenizer(layout, [-1.0] * 4, [1.0] * 4)
    for kw, expected in (({}, 1), ({"tune_malloc": False}, 0), ({"tune_malloc": True}, 1)):
        calls.clear()
        WorldVLAPolicy(model, vq, at, chunk_size=2, image_size=64, **kw)
        assert len(calls) == expected, kw


@needs_glibc
def test_e2e_malloc_comparison_quick(tmp_path):
    out = _run(f"""
        from worldvla.benchmarks import e2e
        print(e2e.compare_malloc(quick=True, out_dir={str(tmp_path)!r}, grid=2))
    """)
    doc = json.loads(open(out.strip().splitlines()[-1]).read())
    assert doc["benchmark"] == "e2e_malloc" and doc["tuned"]["mmap_threshold"] == malloc.MAX_MMAP_THRESHOLD
    rows = doc["rows"]
    assert {r["impl"] for r in rows} == {"malloc-defaults", "malloc-tuned"} and len(rows) == 6
    for r in rows:
        assert r["tokens_equal"] is True and r["median_ms"] > 0 and r["page_faults_per_call"] >= 0


def test_the_settings_handed_back_are_a_copy(monkeypatch):
    """A caller editing the settings it was given (a report that adds its own keys) does not change what the
    process records as set."""
    monkeypatch.setattr(malloc, "_applied", {"mmap_threshold": 1 << 20, "trim_threshold": 1 << 30, "mmap": True})
    got = malloc.cpu_malloc_settings()
    got["mmap_threshold"] = 0
    assert malloc.cpu_malloc_settings()["mmap_threshold"] == 1 << 20


def _fake_mallopt(monkeypatch, answer=1):
    """`_mallopt` stood in by a function recording its calls and answering `answer` (glibc's 1: accepted, 0:
    refused), so that this test process's allocator is left as it is."""
    calls = []
    monkeypatch.setattr(malloc, "_mallopt", lambda: lambda param, value: calls.append((param, value)) or answer)
    monkeypatch.setattr(malloc, "_applied", None)
    return calls


def test_the_settings_tune_cpu_malloc_returns_are_a_copy(monkeypatch):
    """A caller that edits the settings returned (a report adding its own keys) does not change what the process
    records as set."""
    calls = _fake_mallopt(monkeypatch)
    got = malloc.tune_cpu_malloc(mmap_threshold=1 << 20)
    assert len(calls) == 3
    got["mmap_threshold"], got["device"] = 0, "cpu"
    assert malloc.cpu_malloc_settings() == {"mmap_threshold": 1 << 20, "trim_threshold": 1 << 30, "mmap": True}


def test_nothing_is_changed_where_the_c_library_is_not_glibc(monkeypatch):
    """On Linux with musl (Alpine) mallopt's parameters are not glibc's: tune_cpu_malloc changes nothing there
    and says so with None."""
    monkeypatch.setattr(malloc.platform, "system", lambda: "Linux")
    monkeypatch.setattr(malloc.platform, "libc_ver", lambda *a, **k: ("", ""))  # what musl reports
    monkeypatch.setattr(malloc, "_applied", None)
    assert malloc._mallopt() is None
    assert malloc.tune_cpu_malloc() is None and malloc.cpu_malloc_settings() is None


def test_each_threshold_goes_to_its_own_mallopt_parameter(monkeypatch):
    """The mmap threshold, the trim threshold and the cap on mapped blocks each reach glibc under their own
    mallopt parameter (malloc.h: M_MMAP_THRESHOLD -3, M_TRIM_THRESHOLD -1, M_MMAP_MAX -4)."""
    calls = _fake_mallopt(monkeypatch)
    malloc.tune_cpu_malloc(mmap_threshold=1 << 20, trim_threshold=3 << 20)
    assert sorted(calls) == [(-4, 65536), (-3, 1 << 20), (-1, 3 << 20)]
    calls.clear()
    malloc.tune_cpu_malloc(mmap=False)
    assert sorted(calls) == [(-4, 0), (-3, malloc.MAX_MMAP_THRESHOLD), (-1, 1 << 30)]


def test_bad_values_are_refused_also_where_nothing_would_change(monkeypatch):
    """A script that passes a bad threshold is told so on every machine, not only on those with glibc."""
    monkeypatch.setattr(malloc, "_mallopt", lambda: None)
    assert malloc.tune_cpu_malloc() is None
    for kw in ({"mmap_threshold": -1}, {"trim_threshold": 2**31}, {"mmap": "no"}):
        with pytest.raises(ValueError, match=f"{next(iter(kw))} must be"):
            malloc.tune_cpu_malloc(**kw)


def test_a_setting_glibc_refuses_is_an_error_and_not_recorded(monkeypatch):
    """mallopt answers 0 for a value it does not take: tune_cpu_malloc raises, naming it, and does not report
    the settings as in force."""
    _fake_mallopt(monkeypatch, answer=0)
    with pytest.raises(RuntimeError, match="glibc's mallopt refused mmap_threshold=1048576"):
        malloc.tune_cpu_malloc(mmap_threshold=1 << 20)
    assert malloc.cpu_malloc_settings() is None


def test_e2e_malloc_speed_up_is_the_defaults_median_over_the_rows(monkeypatch, tmp_path):
    """`e2e --malloc`: speedup_vs_defaults is the defaults' median over the row's (4 for calls four times as fast
    once tuned, not 1/4), and tokens_equal compares with the defaults' tokens. mallopt stood in (this process's
    allocator left as it is), the calls by ones that advance a stood-in clock by their case's seconds, a quarter of
    them once tuned (powers of two, so that the medians are exact)."""
    import torch

    from worldvla.benchmarks import e2e

    _fake_mallopt(monkeypatch)
    clock = [0.0]

    def call(seconds):
        def fn():
            tuned = malloc.cpu_malloc_settings() is not None
            clock[0] += seconds / 4 if tuned else seconds
            return torch.tensor([int(tuned and seconds == 2 ** -9)])  # one case's tokens differ once tuned
        return fn
    monkeypatch.setattr(e2e, "_cpu_calls", lambda grid, repeats, model=None: {
        "chunk": (call(2 ** -9), 3), "frame": (call(2 ** -5), 5)})
    monkeypatch.setattr(e2e, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    doc = json.loads(e2e.compare_malloc(quick=True, out_dir=tmp_path, grid=2).read_text())
    assert doc["tuned"] == {"mmap_threshold": malloc.MAX_MMAP_THRESHOLD, "trim_threshold": 1 << 30, "mmap": True}
    assert [(r["case"], r["impl"], r["median_ms"], r["repeats"], r["speedup_vs_defaults"], r["tokens_equal"])
            for r in doc["rows"]] == [
        ("small chunk 32px", "malloc-defaults", 1.953125, 3, 1.0, True),
        ("small chunk 32px", "malloc-tuned", 0.48828125, 3, 4.0, False),
        ("small frame 32px", "malloc-defaults", 31.25, 5, 1.0, True),
        ("small frame 32px", "malloc-tuned", 7.8125, 5, 4.0, True)]


def test_a_c_library_without_mallopt_changes_nothing(monkeypatch):
    """A glibc-like C library that exports no mallopt (a stripped or stand-in libc): tune_cpu_malloc changes
    nothing and says so with None, as where the C library is not glibc, instead of raising AttributeError."""
    monkeypatch.setattr(malloc.platform, "system", lambda: "Linux")
    monkeypatch.setattr(malloc.platform, "libc_ver", lambda *a, **k: ("glibc", "2.35"))
    monkeypatch.setattr(malloc.ctypes, "CDLL", lambda *a, **k: types.SimpleNamespace())
    monkeypatch.setattr(malloc, "_applied", None)
    assert malloc._mallopt() is None
    assert malloc.tune_cpu_malloc() is None and malloc.cpu_malloc_settings() is None


def test_a_refused_cap_on_mapped_blocks_is_named_as_such(monkeypatch):
    """mallopt refusing only M_MMAP_MAX (mmap=False's 0) is reported as that setting, not as a threshold, and
    nothing is recorded as in force."""
    calls = []

    def mallopt(param, value):
        calls.append(param)
        return 0 if param == -4 else 1

    monkeypatch.setattr(malloc, "_mallopt", lambda: mallopt)
    monkeypatch.setattr(malloc, "_applied", None)
    with pytest.raises(RuntimeError, match=r"^glibc's mallopt refused mmap_max=0$"):
        malloc.tune_cpu_malloc(mmap=False)
    assert -4 in calls and malloc.cpu_malloc_settings() is None


def test_a_refused_value_is_told_its_own_limit(monkeypatch):
    """Each threshold's refusal gives that threshold's range: 32 MiB for the mmap threshold, 2**31 - 1 bytes for
    the trim threshold."""
    monkeypatch.setattr(malloc, "_mallopt", lambda: None)
    with pytest.raises(ValueError, match=rf"mmap_threshold must be an int number of bytes in \[0, {32 << 20}\]"):
        malloc.tune_cpu_malloc(mmap_threshold=-1)
    with pytest.raises(ValueError, match=rf"trim_threshold must be an int number of bytes in \[0, {2**31 - 1}\]"):
        malloc.tune_cpu_malloc(trim_threshold=2**31)


def test_a_c_library_that_cannot_be_loaded_changes_nothing(monkeypatch):
    """glibc reported but the C library fails to load (OSError from ctypes): tune_cpu_malloc changes nothing and
    says so with None, instead of raising."""
    def no_libc(*a, **k):
        raise OSError("libc.so.6: cannot open shared object file")

    monkeypatch.setattr(malloc.platform, "system", lambda: "Linux")
    monkeypatch.setattr(malloc.platform, "libc_ver", lambda *a, **k: ("glibc", "2.35"))
    monkeypatch.setattr(malloc.ctypes, "CDLL", no_libc)
    monkeypatch.setattr(malloc, "_applied", None)
    assert malloc._mallopt() is None
    assert malloc.tune_cpu_malloc() is None and malloc.cpu_malloc_settings() is None


def test_a_refused_value_is_quoted_in_the_error(monkeypatch):
    """The error names the value that was given, as the caller wrote it, for each setting."""
    monkeypatch.setattr(malloc, "_mallopt", lambda: None)
    for kw, shown in (({"mmap_threshold": 1.5}, "1.5"), ({"trim_threshold": -2}, "-2"),
                      ({"mmap_threshold": "1M"}, "'1M'"), ({"mmap": "no"}, "'no'"), ({"mmap": 0}, "0")):
        with pytest.raises(ValueError, match=rf"^{next(iter(kw))} must be .*, got {shown}$"):
            malloc.tune_cpu_malloc(**kw)
