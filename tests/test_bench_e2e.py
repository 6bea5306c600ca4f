"""Smoke run of the end-to-end latency benchmark on a tiny grid (CPU, small config, chameleon ids)."""
import json
import re

import pytest
import torch

from worldvla.benchmarks import e2e

D = e2e.ACTION_DIM


def test_quick_run_writes_rows_and_parallel_matches_sequential(tmp_path):
    grid = 2
    path = e2e.run(quick=True, device="cpu", out_dir=tmp_path, grid=grid, chunks=(3, 5))
    assert path.name.endswith("-quick.json")  # a quick run never overwrites the full results
    doc = json.loads(path.read_text())
    assert doc["benchmark"] == "e2e" and doc["quick"] is True
    assert doc["device"].startswith("cpu") and doc["torch"] and doc["python"] and doc["date"] and doc["worldvla"]
    assert path.with_suffix(".png").is_file()
    rows = doc["rows"]
    chunk_rows = [r for r in rows if r["task"] == "action_chunk"]
    assert {(r["chunk"], r["impl"]) for r in chunk_rows} == {(k, m) for k in (3, 5)
                                                             for m in ("parallel", "sequential", "baseline",
                                                                       "release-engine")}
    for r in rows:
        assert r["config"] == "small" and r["grid"] == grid and r["px"] == 16 * grid
        # 3 repeats (7 in a full run) have no 10th and 90th percentiles of their own: the extremes, named so
        assert r["median_ms"] > 0 and r["min_ms"] <= r["median_ms"] <= r["max_ms"]
        assert r["max_over_min"] == r["max_ms"] / r["min_ms"] and not {"p10_ms", "p90_ms", "p90_over_p10"} & set(r)
        assert (r["warmup"], r["repeats"]) == (1, 3)  # every side of every ratio timed alike
        assert r["weight_floor_ms"] is None  # no HBM bandwidth on CPU
    # Prompt: BOS, 20 text ids, two images of 3 + grid*(grid+1) + 1 tokens, SEP.
    assert all(r["prompt_tokens"] == 22 + 2 * (4 + grid * (grid + 1)) for r in chunk_rows)
    for r in chunk_rows:
        K, T = r["chunk"], D + 2
        if r["impl"] == "release-engine":  # free generation: the release's tokens (K*T unless it wrote a separator)
            assert r["tokens_equal_release"] is True and r["forward_passes"] == r["new_tokens"] - 1 <= K * T
            continue
        expected = {"parallel": 1 + D, "sequential": K * T, "baseline": 1 + K * T}[r["impl"]]
        assert r["forward_passes"] == expected, r
        if r["impl"] == "baseline":
            assert r["speedup_vs_baseline"] == pytest.approx(1.0)
        else:
            assert r["tokens_equal"] is True
    assert doc["tokens_equal"] is True
    frame = {r["impl"]: r for r in rows if r["task"] == "frame"}
    assert set(frame) == {"package", "baseline"}
    assert frame["package"]["forward_passes"] == grid * grid          # prefill + h*w - 1 steps
    assert frame["baseline"]["forward_passes"] == grid * (grid + 1)   # one pass per code and newline
    # Targets are for 7B on an H100: recorded, not judged, on CPU.
    assert set(doc["targets"]) == set(e2e.TARGETS)
    assert all(t["measured"] is None and t["met"] is None and "H100" in t["note"] for t in doc["targets"].values())
    assert doc["target_rows_written"] is False
    # The first grid's rows in order: the target chunk size (5), the frame, then the other chunk sizes.
    assert [(r["task"], r["chunk"]) for r in rows][::2] == [("action_chunk", 5), ("action_chunk", 5),
                                                             ("frame", None), ("action_chunk", 3), ("action_chunk", 3)]
    floor = doc["weight_streaming_floor"]
    assert floor["hbm_bandwidth_GBps"] is None and floor["param_bytes"]["chameleon_7b"] > 13e9


def test_bad_grid_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="even number of codes"):
        e2e.run(quick=True, device="cpu", out_dir=tmp_path, grid=3)


def test_action_prompt_layout():
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,))))
    p = e2e.action_prompt(16, g)
    L = e2e.LAYOUT
    assert p[0] == L.bos and p[-1] == L.sep and int((p == L.sep).sum()) == 1
    assert int((p == L.boi).sum()) == 2 and int((p == L.newline).sum()) == 32
    assert p.numel() == 22 + 2 * (4 + 16 * 17)  # 574 tokens: the release's ~620-token document less its chunk


def test_decode_paths_comparison_keeps_the_tokens(tmp_path, monkeypatch, native_step_runs):
    """`e2e --decode-paths`: each case timed through the modules (torch's and the native linear), the
    native decoder layer (decode steps, then also the prefill), the native step and a frame's native
    loop, each path really taken, the same tokens, the dispatch order and switches as they were afterwards."""
    pytest.importorskip("worldvla._C")
    from worldvla.ops import decoder, dispatch
    from worldvla.ops import native_backend as nb

    from worldvla.inference import frames

    calls = {"linear": 0, "decoder_layer": 0, "decoder_attention_block": 0, "decode_frame": 0}
    for name in calls:
        def spy(*a, name=name, f=getattr(nb._C, name)):
            calls[name] += 1
            return f(*a)
        monkeypatch.setattr(nb._C, name, spy)
    before = dict(dispatch.AUTO_ORDER)
    # grid 4: a 70-token prompt, more than NATIVE_MAX_ROWS rows, so the prefill route runs too
    doc = json.loads(e2e.compare_decode_paths(quick=True, out_dir=tmp_path, grid=4, repeats=1).read_text())
    assert dispatch.AUTO_ORDER == before and decoder.NATIVE_PREFILL is True and decoder.NATIVE_STEP is True
    assert frames.NATIVE_FRAME_LOOP is True
    assert all(calls.values()) and native_step_runs, calls
    cases = {r["case"] for r in doc["rows"]}
    assert len(cases) == 3 and all(r["tokens_equal"] for r in doc["rows"])
    for case in cases:
        assert {r["impl"] for r in doc["rows"] if r["case"] == case} == set(e2e.DECODE_PATHS)
    with pytest.raises(SystemExit):
        e2e.main(["--decode-paths", "--device", "cuda"])


def test_bf16_weights_comparison_keeps_the_tokens(tmp_path, monkeypatch):
    """`e2e --bf16-weights`: the rounded model's steps made both ways (float32 and bfloat16 projections,
    both really built), the same tokens, the switch as it was afterwards."""
    nb = pytest.importorskip("worldvla.ops.native_backend")
    from worldvla.ops import decoder, dispatch

    monkeypatch.setitem(dispatch.AUTO_ORDER, ("decoder_layer", "cpu"), ("native", "torch"))
    made, real = [], nb._C.DecodeStep
    monkeypatch.setattr(nb._C, "DecodeStep", lambda *args: made.append(args[-2]) or real(*args))
    doc = json.loads(e2e.compare_bf16_weights(quick=True, out_dir=tmp_path, grid=4, repeats=1).read_text())
    assert decoder.BF16_EXACT_WEIGHTS is True
    assert True in made and False in made  # the last but one argument: bfloat16 projections
    assert len(doc["rows"]) == 6 and all(r["tokens_equal"] for r in doc["rows"])
    assert {r["impl"] for r in doc["rows"]} == {"float32-weights", "bf16-weights"}


def test_bf16_model_comparison(tmp_path, monkeypatch):
    """`e2e --bf16-model`: the bfloat16 model's steps really on the native step (a DecodeStep made for a
    bfloat16 model) and on its modules, the float32 side's tokens its own, the switch as it was."""
    nb = pytest.importorskip("worldvla.ops.native_backend")
    from worldvla.ops import decoder, dispatch

    monkeypatch.setitem(dispatch.AUTO_ORDER, ("decoder_layer", "cpu"), ("native", "torch"))
    made, real = [], nb._C.DecodeStep
    monkeypatch.setattr(nb._C, "DecodeStep", lambda *args: made.append(args[-1]) or real(*args))
    doc = json.loads(e2e.compare_bf16_model(quick=True, out_dir=tmp_path, grid=4, repeats=1).read_text())
    assert decoder.NATIVE_STEP is True
    assert 2 in made and 0 in made  # the last argument: the model's dtype code (bfloat16, float32)
    assert len(doc["rows"]) == 9
    assert {r["impl"] for r in doc["rows"]} == {"bf16-modules", "bf16-native-step", "float32-native-step"}
    assert all(r["tokens_equal_float32"] for r in doc["rows"] if r["impl"] == "float32-native-step")


def test_bf16_steps_comparison(tmp_path, monkeypatch, capsys):
    """`e2e --bf16-steps small`: both sides time a step that really ran on its path (the native one a
    DecodeStep made for a bfloat16 model), their hidden states close, the switch as it was."""
    nb = pytest.importorskip("worldvla.ops.native_backend")
    from worldvla.ops import decoder, dispatch

    monkeypatch.setitem(dispatch.AUTO_ORDER, ("decoder_layer", "cpu"), ("native", "torch"))
    made, real = [], nb._C.DecodeStep
    monkeypatch.setattr(nb._C, "DecodeStep", lambda *args: made.append(args[-1]) or real(*args))
    e2e.main(["--bf16-steps", "small", "--quick", "--out", str(tmp_path)])
    doc = json.loads(next(tmp_path.glob("e2e_bf16_steps_small-*-quick.json")).read_text())
    assert decoder.NATIVE_STEP is True and made == [2, 2, 2]  # one plan per step shape, each for bfloat16
    assert [r["impl"] for r in doc["rows"]] == ["native-step", "modules"] * 3
    assert all(0 < r["relative_difference"] < 0.05 for r in doc["rows"])
    assert doc["prefill_s"] > 0 and "prefill" in capsys.readouterr().out


def test_sampled_frames_comparison(tmp_path, monkeypatch):
    """`e2e --sampled-frames`: each case's frame with its loop in native calls (really taken: one call a
    greedy or guided frame, one an image row when drawn) and in Python, the same codes, the switch as it was."""
    nb = pytest.importorskip("worldvla.ops.native_backend")
    from worldvla.inference import frames
    from worldvla.ops import decoder, dispatch

    monkeypatch.setitem(dispatch.AUTO_ORDER, ("decoder_layer", "cpu"), ("native", "torch"))
    monkeypatch.setattr(decoder, "NATIVE_STEP", True)
    calls, real = [], nb._C.decode_frame
    monkeypatch.setattr(nb._C, "decode_frame", lambda *a: calls.append(a[-4] != 0) or real(*a))  # noise given
    doc = json.loads(e2e.compare_sampled_frames(quick=True, out_dir=tmp_path, grid=4, repeats=1).read_text())
    assert frames.NATIVE_FRAME_LOOP is True
    assert calls.count(False) == 2 * 3 and calls.count(True) == 2 * 3 * 4  # greedy, guided: 3 frames; drawn: 3 x 4 rows
    assert len(doc["rows"]) == 8 and all(r["tokens_equal"] for r in doc["rows"])


def test_each_chunk_size_is_written_as_it_ends(tmp_path, monkeypatch):
    """A run cut short keeps every chunk size measured so far: the JSON is rewritten after each one (on a GPU
    the first, 7B at 256 px with 5 actions, holds the latency targets), not only after all of a prompt size."""
    writes = []
    real = e2e.write_results

    def spy(name, rows, *args, **kwargs):
        writes.append(sorted({(r["chunk"], r["impl"]) for r in rows}))
        assert all("case" in r for r in rows)  # partial rows are labelled too
        return real(name, rows, *args, **kwargs)

    monkeypatch.setattr(e2e, "write_results", spy)
    e2e.run(quick=True, device="cpu", out_dir=tmp_path, grid=2, chunks=(3, 5), frame=False)
    sides = ("baseline", "parallel", "release-engine", "sequential")
    assert writes[0] == [(5, s) for s in sides]  # the targets' chunk size first
    assert writes[1] == [(k, s) for k in (3, 5) for s in sides] == writes[-1]


def test_targets_are_judged_on_an_h100_only():
    """The latency targets are an H100's: measured on any GPU, `met` only where the device is an H100 (an
    H200's bandwidth would meet what an H100 misses), None with a note elsewhere; the JSON says when it
    holds every row the targets are read from."""
    chunk = {"task": "action_chunk", "config": "chameleon_7b", "px": 256, "chunk": 5, "impl": "parallel",
             "median_ms": 50.0, "speedup_vs_baseline": 25.0}
    frame = {"task": "frame", "config": "chameleon_7b", "px": 256, "chunk": None, "impl": "package",
             "median_ms": 1500.0}
    assert not e2e.target_rows_written([chunk]) and e2e.target_rows_written([chunk, frame])
    h100 = e2e.check_targets([chunk, frame], True, "NVIDIA-H100-80GB-HBM3")
    assert {k: v["met"] for k, v in h100.items()} == {"chunk5_256px_parallel_ms": True, "frame_256px_ms": False,
                                                     "chunk5_256px_speedup_vs_baseline": True}
    assert not any("note" in v for v in h100.values())
    h200 = e2e.check_targets([chunk, frame], True, "NVIDIA-H200")
    assert all(v["met"] is None and v["measured"] is not None and "H100" in v["note"] for v in h200.values())


def test_ratios_floors_and_threads_of_a_run_are_read_from_its_own_rows(tmp_path, monkeypatch):
    """Each row's speedup_vs_baseline is the baseline's median over its own (the chunk's baseline, the frame's
    baseline), ms_per_action divides by the chunk's actions, the weight-streaming floor is the row's passes over
    its own config's parameter bytes at the measured bandwidth, and the caller's thread count is restored."""
    monkeypatch.setattr(e2e, "measure_bandwidth", lambda device: 100.0)  # GB/s: the CPU measures none
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        path = e2e.run(quick=True, device="cpu", out_dir=tmp_path, grid=2, chunks=(3,))
        assert torch.get_num_threads() == 2  # a quick CPU run measures on one thread, then gives them back
    finally:
        torch.set_num_threads(threads)
    doc = json.loads(path.read_text())
    rows = doc["rows"]
    pbytes = doc["weight_streaming_floor"]["param_bytes"]
    chunk = {r["impl"]: r for r in rows if r["task"] == "action_chunk"}
    frame = {r["impl"]: r for r in rows if r["task"] == "frame"}
    assert chunk["release-engine"]["stopped_early"] is False  # the release's own tokens, all of them
    for group in (chunk, frame):
        base = group["baseline"]["median_ms"]
        for r in group.values():
            assert r["speedup_vs_baseline"] == pytest.approx(base / r["median_ms"]), r["impl"]
            assert r["weight_floor_ms"] == pytest.approx(r["forward_passes"] * pbytes["small"] / 100e9 * 1e3)
    for r in chunk.values():
        assert r["ms_per_action"] == pytest.approx(r["median_ms"] / 3)
    assert frame["package"]["ms_per_token"] == pytest.approx(frame["package"]["median_ms"] / (2 * 3))


def test_token_agreement_counts_a_length_difference_as_disagreement():
    a = torch.tensor([1, 2, 3, 4])
    assert e2e.agreement(a, a.clone()) == 1.0
    assert e2e.agreement(a, torch.tensor([1, 2])) == 0.5  # two of four positions, not two of two
    assert e2e.agreement(a, torch.tensor([1, 9, 3, 9])) == 0.5
    assert e2e.agreement(torch.tensor([]), torch.tensor([])) == 1.0


def test_targets_are_read_from_the_7b_parallel_5_action_rows_only():
    """Rows of other chunk sizes, decoders, configs and grids sit beside the target rows in the JSON (in any
    order); the targets read 7B's parallel 5-action chunk and its package frame at 256 px, nothing else."""
    def chunk(**kw):
        return {"task": "action_chunk", "config": "chameleon_7b", "px": 256, "chunk": 5, "impl": "parallel",
                "median_ms": 50.0, "speedup_vs_baseline": 25.0, **kw}

    def frame(**kw):
        return {"task": "frame", "config": "chameleon_7b", "px": 256, "chunk": None, "impl": "package",
                "median_ms": 1300.0, **kw}

    others = [chunk(chunk=10, median_ms=90.0, speedup_vs_baseline=30.0),
              chunk(impl="sequential", median_ms=400.0, speedup_vs_baseline=3.0),
              chunk(config="small", median_ms=5.0, speedup_vs_baseline=9.0),
              chunk(px=512, median_ms=80.0, speedup_vs_baseline=22.0),
              frame(config="small", median_ms=10.0), frame(impl="baseline", median_ms=9000.0),
              frame(px=512, median_ms=5000.0)]
    for rows in (others + [chunk(), frame()], [chunk(), frame()] + others):
        out = e2e.check_targets(rows, True, "NVIDIA-H100-80GB-HBM3")
        assert {k: v["measured"] for k, v in out.items()} == {
            "chunk5_256px_parallel_ms": 50.0, "frame_256px_ms": 1300.0, "chunk5_256px_speedup_vs_baseline": 25.0}
        assert all(v["met"] is True for v in out.values())
    assert not e2e.target_rows_written(others)
    # A target met exactly is met.
    edge = e2e.check_targets([chunk(median_ms=60.0, speedup_vs_baseline=20.0), frame(median_ms=1400.0)], True,
                             "NVIDIA-H100")
    assert all(v["met"] is True for v in edge.values())


# ------------------------------------------------------------------ the release-style baseline it times
def _tiny_model(seed=3):
    from worldvla.model import ModelConfig, WorldVLA

    g = torch.Generator().manual_seed(seed)
    return WorldVLA(ModelConfig.tiny(e2e.LAYOUT)).init_weights(0.5, generator=g).eval()


def test_structure_processor_keeps_every_value_inside_the_bins():
    """The baseline's forced chunk structure picks a value among the bin ids only: an id just past either end of
    the bins (a BOA-side or image id) stays refused even when the model's logits favour it most."""
    from worldvla.inference.baseline import chunk_structure_processor

    L = e2e.LAYOUT
    lo, hi = L.bin_range
    proc = chunk_structure_processor(L, prompt_len=4, n_actions=2, action_dim=3)
    for favoured in (lo - 1, hi, lo, hi - 1):
        logits = torch.zeros(65536)
        logits[favoured] = 10.0
        logits[lo + 7] = 5.0
        out = proc(torch.zeros(4 + 1, dtype=torch.long), logits)  # the first value of the first block
        want = favoured if lo <= favoured < hi else lo + 7
        assert int(out.argmax()) == want, favoured
        assert torch.isinf(out[:lo]).all() and torch.isinf(out[hi:]).all()


def test_baseline_stops_at_max_new_tokens_even_when_zero_or_one():
    """`max_new_tokens` is the release's cap on new tokens: 1 gives the first greedy token, 0 gives none (not the
    default cap)."""
    from worldvla.inference import baseline_generate_action_chunk

    model = _tiny_model()
    prompt = e2e.action_prompt(2, torch.Generator().manual_seed(0))
    one = baseline_generate_action_chunk(model, prompt, e2e.LAYOUT, 2, D, max_new_tokens=1)
    assert one.tokens.shape == (1,) and int(one.tokens[0]) == int(model(prompt)[-1].argmax())
    none = baseline_generate_action_chunk(model, prompt, e2e.LAYOUT, 2, D, max_new_tokens=0)
    assert none.tokens.shape == (0,) and none.actions.shape == (0, D + 2) and not none.fails_after


def test_baseline_refuses_counts_that_decode_nothing():
    """A negative max_new_tokens or n_actions, or an action_dim of 0, decoded no token and returned an empty chunk, as
    if the model had written none; a count that is not an integer was taken too. Each is refused by name."""
    from worldvla.inference import baseline_generate_action_chunk

    model = _tiny_model()
    prompt = e2e.action_prompt(2, torch.Generator().manual_seed(0))
    for kw, msg in ((dict(max_new_tokens=-1), "max_new_tokens must be an integer >= 0, got -1"),
                    (dict(max_new_tokens=2.5), "max_new_tokens must be an integer >= 0, got 2.5"),
                    (dict(n_actions=-2), "n_actions must be an integer >= 1, got -2"),
                    (dict(n_actions=True), "n_actions must be an integer >= 1, got True"),
                    (dict(action_dim=0), "action_dim must be an integer >= 1, got 0")):
        args = {"n_actions": 2, "action_dim": D, **kw}
        with pytest.raises(ValueError, match=re.escape(msg)):
            baseline_generate_action_chunk(model, prompt, e2e.LAYOUT, **args)


def test_baseline_without_a_layout_uses_the_models():
    """layout=None decodes with the model's own vocabulary layout, the same tokens as naming it."""
    from worldvla.inference import baseline_generate_action_chunk

    model = _tiny_model()
    prompt = e2e.action_prompt(2, torch.Generator().manual_seed(1))
    want = baseline_generate_action_chunk(model, prompt, e2e.LAYOUT, 1, D, max_new_tokens=4)
    got = baseline_generate_action_chunk(model, prompt, None, 1, D, max_new_tokens=4)
    assert torch.equal(got.tokens, want.tokens) and got.tokens.shape == (4,)


# ------------------------------------------------------------------ how the sides are timed and compared
def test_every_side_gets_the_documented_warm_up_and_repeats():
    """Full runs: 2 warm-up calls and 7 timed ones per side; --quick 1 and 3 (the module's docstring)."""
    assert e2e._timing(False) == {"warmup": 2, "repeats": 7}
    assert e2e._timing(True) == {"warmup": 1, "repeats": 3}


def test_comparisons_call_each_side_n_times_in_a_turning_order():
    """The CPU comparisons' `_interleaved`: n timed calls of each side, the order turning every round, `before(side)`
    before each call; their callers make the warm-up calls themselves."""
    order, befores = [], []
    med = e2e._interleaved({s: (lambda s=s: order.append(s)) for s in "abc"}, 4, before=befores.append)
    assert order == list("abcbcacababc") and befores == order
    assert set(med) == set("abc") and all(m >= 0 for m in med.values())


def test_side_rows_divide_the_base_sides_median_by_each_sides(monkeypatch):
    """A comparison's speed-up column is the base side's median over the row's (above 1: faster than the base),
    and its tokens column compares each side's tokens with the reference side's. Medians fixed."""
    medians = {"slow": 6.0, "fast": 2.0}
    monkeypatch.setattr(e2e, "time_interleaved", lambda calls, warmup, repeats, before: {
        side: {"median_ms": medians[side]} for side in calls})
    calls = {side: {"frame": (lambda: None, 3)} for side in medians}
    out = {"slow": {"frame": torch.tensor([1, 2])}, "fast": {"frame": torch.tensor([1, 3])}}
    rows = e2e._side_rows(calls, out, 4, "slow", "slow", "speedup_vs_slow", "tokens_equal")
    assert rows == [{"case": "small frame 64px", "impl": "slow", "median_ms": 6.0, "repeats": 3,
                     "speedup_vs_slow": 1.0, "tokens_equal": True},
                    {"case": "small frame 64px", "impl": "fast", "median_ms": 2.0, "repeats": 3,
                     "speedup_vs_slow": 3.0, "tokens_equal": False}]


# ------------------------------------------------------------------ which side each row's numbers come from
def _fixed_timing(monkeypatch, medians, seen):
    """`time_interleaved` stood in: each side called once (its tokens are kept) and given the median of the decoder
    it really ran (`medians`: "parallel", "sequential", "baseline", "release-engine", "package"), so a side timing
    another's call shows; the device, warm-up and repeats it was asked for recorded in `seen`."""
    ran = []
    for name, tag in (("generate_action_chunk", None), ("baseline_generate_action_chunk", "baseline"),
                      ("generate_release_actions", "release-engine"), ("generate_frame_codes", "package")):
        real = getattr(e2e, name)
        monkeypatch.setattr(e2e, name, lambda *a, real=real, tag=tag, **kw: ran.append(tag or kw["mode"]) or
                            real(*a, **kw))

    def fake(fns, *, warmup, repeats, device=None):
        seen.append((sorted(fns), device, warmup, repeats))
        out = {}
        for side, fn in fns.items():
            ran.clear()
            fn()
            out[side] = {"median_ms": medians[ran[0]], "warmup": warmup, "repeats": repeats}
        return out
    monkeypatch.setattr(e2e, "time_interleaved", fake)


def test_each_row_holds_its_own_sides_times_and_ratio(monkeypatch):
    """Medians fixed per side: every chunk and frame row carries its own side's median (not a neighbour's), its
    speed-up is its baseline's median over its own, and every side was timed on the run's device with the quick
    warm-up and repeats."""
    medians = {"parallel": 2.0, "sequential": 8.0, "baseline": 40.0, "release-engine": 5.0, "package": 10.0}
    seen = []
    _fixed_timing(monkeypatch, medians, seen)
    model, cpu = _tiny_model(), torch.device("cpu")
    with torch.no_grad():
        rows = e2e.bench_chunks(model, "tiny", 2, (1,), cpu, True, torch.Generator().manual_seed(0))
        rows += e2e.bench_frame(model, "tiny", 2, cpu, True, torch.Generator().manual_seed(0))
    assert [(r["task"], r["impl"], r["median_ms"], r["speedup_vs_baseline"]) for r in rows] == [
        ("action_chunk", "parallel", 2.0, 20.0), ("action_chunk", "sequential", 8.0, 5.0),
        ("action_chunk", "baseline", 40.0, 1.0), ("action_chunk", "release-engine", 5.0, 8.0),
        ("frame", "package", 10.0, 4.0), ("frame", "baseline", 40.0, 1.0)]
    assert seen == [(["baseline", "parallel", "release-engine", "sequential"], cpu, 1, 3),
                    (["baseline", "package"], cpu, 1, 3)]
    assert rows[3]["tokens_equal_release"] is True and rows[3]["stopped_early"] is False


def test_tokens_that_differ_are_reported_as_differing(monkeypatch):
    """The sequential chunk differing from the parallel one, and the release-engine's tokens short of the
    baseline's (a separator written early): tokens_equal and tokens_equal_release are False, the agreements below
    1, the release row counts its own tokens and gets no speed-up (it did less work than the baseline)."""
    medians = {"parallel": 2.0, "sequential": 8.0, "baseline": 40.0, "release-engine": 5.0}
    _fixed_timing(monkeypatch, medians, [])
    chunk, release = e2e.generate_action_chunk, e2e.generate_release_actions
    monkeypatch.setattr(e2e, "generate_action_chunk", lambda *a, mode, **kw: chunk(*a, mode=mode, **kw) + (
        mode == "sequential"))
    monkeypatch.setattr(e2e, "generate_release_actions", lambda *a, **kw: [
        g._replace(tokens=g.tokens[:-2]) for g in release(*a, **kw)])
    with torch.no_grad():
        rows = e2e.bench_chunks(_tiny_model(), "tiny", 2, (1,), torch.device("cpu"), True,
                                torch.Generator().manual_seed(0))
    par, seq, base, rel = rows
    assert par["tokens_equal"] is False and seq["tokens_equal"] is False and par["tokens_agreement"] < 1
    assert rel["tokens_equal_release"] is False and rel["tokens_agreement_release"] == pytest.approx(D / (D + 2))
    assert rel["stopped_early"] is True and rel["speedup_vs_baseline"] is None
    assert rel["new_tokens"] == D + 1 and base["new_tokens"] == D + 2 + 1  # one block of D + 2, less the 2 cut


def _fake_benches(monkeypatch, calls, threads):
    """The run's model and measurements stood in (no model is built, nothing timed): `calls` records each model
    built and each chunk size's and frame's measurement in order, `threads` the CPU threads each ran on. Parallel
    rows 2 ms against a 40 ms baseline (their tokens equal the sequential ones' except at 10 actions), frames 300
    against 900 ms, parameter bytes 7e9 (7B) and 4e7 (small) parameters at the dtype's size."""
    def chunks(model, cfg_name, grid, chunks, device, quick, gen, done=None, prompt=None):
        calls.append(("chunks", cfg_name, grid, tuple(chunks)))
        threads.append(torch.get_num_threads())
        rows = []
        for K in chunks:
            new = [{"task": "action_chunk", "config": cfg_name, "px": grid * 16, "grid": grid, "chunk": K,
                    "impl": impl, "median_ms": ms, "speedup_vs_baseline": 40.0 / ms, "forward_passes": 8,
                    "tokens_equal": K != 10} for impl, ms in (("parallel", 2.0), ("baseline", 40.0))]
            rows += new
            done(new)
        return rows

    def frame(model, cfg_name, grid, device, quick, gen):
        calls.append(("frame", cfg_name, grid))
        return [{"task": "frame", "config": cfg_name, "px": grid * 16, "grid": grid, "chunk": None, "impl": impl,
                 "median_ms": ms, "speedup_vs_baseline": 900.0 / ms, "forward_passes": 256}
                for impl, ms in (("package", 300.0), ("baseline", 900.0))]

    monkeypatch.setattr(e2e, "bench_chunks", chunks)
    monkeypatch.setattr(e2e, "bench_frame", frame)
    monkeypatch.setattr(e2e, "build_model", lambda name, device, dtype: calls.append(("model", name, dtype)) or name)
    monkeypatch.setattr(e2e, "param_bytes", lambda name, dtype: int({"chameleon_7b": 7e9, "small": 4e7}[name])
                        * torch.empty((), dtype=dtype).element_size())


def test_a_gpu_run_measures_the_target_rows_first_and_labels_its_json(monkeypatch, tmp_path, capsys):
    """A full GPU run (its measurements stood in): 7B's 5-action chunk at 256 px, then its frame, then its other
    chunk sizes, then the 512 px prompts (no second frame), then the small config; the target line printed once,
    when the JSON first holds the target rows; every write for the run's device and not quick; the final JSON's
    dtype, judged targets (an H100), per-pass floor and 7B floors from the 7B rows, labelled by case."""
    calls, writes = [], []
    _fake_benches(monkeypatch, calls, [])
    monkeypatch.setattr(e2e, "measure_bandwidth", lambda device: 2000.0)
    monkeypatch.setattr(e2e, "device_name", lambda device: "NVIDIA-H100-80GB-HBM3")
    monkeypatch.setattr(e2e, "write_results", lambda name, rows, device, out_dir, extra=None, plot=None, quick=False:
                        writes.append((name, len(rows), device, quick, extra)) or tmp_path / "e2e.json")
    e2e.run(device="cuda", out_dir=tmp_path)
    bf16 = torch.bfloat16
    assert calls == [("model", "chameleon_7b", bf16), ("chunks", "chameleon_7b", 16, (5,)),
                     ("frame", "chameleon_7b", 16), ("chunks", "chameleon_7b", 16, (10,)),
                     ("chunks", "chameleon_7b", 32, (5, 10)),
                     ("model", "small", bf16), ("chunks", "small", 16, (5,)), ("frame", "small", 16),
                     ("chunks", "small", 16, (10,)), ("chunks", "small", 32, (5, 10))]
    assert capsys.readouterr().out.count(e2e.TARGET_ROWS_LINE) == 1
    assert [w[4]["target_rows_written"] for w in writes[:3]] == [False, True, True]
    assert all(w[0] == "e2e" and w[2] == torch.device("cuda") and w[3] is False for w in writes)
    assert len(writes) == 11 and writes[-1][1] == 20 and "partial" not in writes[-1][4]
    extra = writes[-1][4]
    assert extra["dtype"] == "torch.bfloat16" and extra["tokens_equal"] is False  # one chunk size's differ
    assert {k: (v["measured"], v["met"]) for k, v in extra["targets"].items()} == {
        "chunk5_256px_parallel_ms": (2.0, True), "frame_256px_ms": (300.0, True),
        "chunk5_256px_speedup_vs_baseline": (20.0, True)}
    floor = extra["weight_streaming_floor"]
    assert floor["param_bytes"] == {"chameleon_7b": 14_000_000_000, "small": 80_000_000}
    assert floor["ms_per_pass_7b"] == pytest.approx(7.0)  # 14 GB at 2000 GB/s
    assert floor["chameleon_7b"]["chameleon_7b action_chunk 256px K5 parallel"] == {
        "forward_passes": 8, "floor_ms": pytest.approx(56.0)}
    assert floor["chameleon_7b"]["chameleon_7b frame 256px package"]["floor_ms"] == pytest.approx(256 * 7.0)
    assert len(floor["chameleon_7b"]) == 10 and all(k.startswith("chameleon_7b ") for k in floor["chameleon_7b"])


def test_a_quick_cpu_run_writes_only_quick_results_measured_on_one_thread(monkeypatch, tmp_path):
    """A quick CPU run (measurements stood in) never writes the full results' file, not even while partial; it
    measures on one thread and says so; 7B's floor bytes are bfloat16's whatever the run's dtype; without the
    target chunk size the first one given goes first, then the frame, then the rest, each once."""
    calls, threads = [], []
    _fake_benches(monkeypatch, calls, threads)
    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        path = e2e.run(quick=True, device="cpu", out_dir=tmp_path, grid=2, chunks=(10, 3))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(saved)
    assert calls == [("model", "small", torch.float32), ("chunks", "small", 2, (10,)), ("frame", "small", 2),
                     ("chunks", "small", 2, (3,))]
    assert threads == [1, 1]
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name, path.with_suffix(".png").name]
    doc = json.loads(path.read_text())
    assert path.name.endswith("-quick.json") and doc["quick"] is True and doc["cpu_threads"] == 1
    assert doc["dtype"] == "torch.float32"
    assert doc["weight_streaming_floor"]["param_bytes"] == {"chameleon_7b": 14_000_000_000, "small": 160_000_000}


def test_run_refuses_thread_counts_and_grids_that_measure_nothing(tmp_path):
    """0 threads (torch's own error otherwise) and a grid of 0 codes a side are refused by name, nothing written."""
    for kw, msg in ((dict(threads=0), "threads must be >= 1, got 0"),
                    (dict(grid=0), "grid must be an even number of codes per side >= 2 (px = 16 x grid), got 0")):
        with pytest.raises(ValueError, match=re.escape(msg)):
            e2e.run(quick=True, device="cpu", out_dir=tmp_path, **kw)
    assert not any(tmp_path.iterdir())


def test_the_command_line_hands_every_option_to_the_run(monkeypatch, tmp_path):
    """`python -m benchmarks.e2e ...`: every option reaches run(); a dropped --threads or --tune-malloc would time
    other settings than the ones asked for."""
    got = []
    monkeypatch.setattr(e2e, "run", lambda *a, **kw: got.append((a, kw)) or "done")
    e2e.main(["--quick", "--device", "cpu", "--out", str(tmp_path), "--grid", "2", "--chunks", "3", "5",
              "--threads", "2", "--tune-malloc"])
    assert got == [((True, "cpu", str(tmp_path)), dict(grid=2, chunks=(3, 5), threads=2, tune_malloc=True))]


def test_random_weights_are_the_seeds_whatever_the_callers_generator(monkeypatch):
    """Two runs time the same random model: build_model draws its weights from `seed`, not from wherever the
    default generator stands (the small config stood in by the tiny one)."""
    from worldvla.model import ModelConfig

    monkeypatch.setattr(e2e.ModelConfig, "small", staticmethod(lambda layout, **kw: ModelConfig.tiny(layout)))
    cpu = torch.device("cpu")
    torch.manual_seed(1)
    a = e2e.build_model("small", cpu, torch.float32).state_dict()
    torch.manual_seed(2)
    b = e2e.build_model("small", cpu, torch.float32).state_dict()
    c = e2e.build_model("small", cpu, torch.float32, seed=1).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a) and not all(torch.equal(a[k], c[k]) for k in a)
    assert torch.get_default_dtype() == torch.float32


def test_counting_passes_leaves_the_model_and_the_step_plan_as_they_were():
    """count_passes counts a forward pass and then puts back what it shadowed: the model's own hidden_states and
    DecodeStepPlan's call (left wrapped, every later step would count into a finished count)."""
    from worldvla.ops.decoder import DecodeStepPlan

    model, call = _tiny_model(), DecodeStepPlan.__call__
    with torch.no_grad(), e2e.count_passes(model) as n:
        model(e2e.action_prompt(2, torch.Generator().manual_seed(0)))
    assert n == [1] and "hidden_states" not in vars(model) and DecodeStepPlan.__call__ is call


def test_bf16_steps_ratio_and_weight_rate_come_from_each_sides_median(monkeypatch, tmp_path):
    """`e2e --bf16-steps`: speedup_vs_modules is the modules' median over the row's, and weights_GB_per_s the
    projection bytes read in the row's median (bytes / ms / 1e6 = GB/s). Medians fixed."""
    monkeypatch.setattr(e2e, "_interleaved", lambda calls, n, before=None: {"native-step": 0.5, "modules": 2.0})
    doc = json.loads(e2e.compare_bf16_steps("small", quick=True, out_dir=tmp_path, grid=2, repeats=1).read_text())
    rows = {(r["case"], r["impl"]): r for r in doc["rows"]}
    assert len(rows) == 6
    for (case, impl), r in rows.items():
        ms = {"native-step": 0.5, "modules": 2.0}[impl]
        assert r["median_ms"] == ms and r["speedup_vs_modules"] == 2.0 / ms
        assert r["weights_GB_per_s"] == pytest.approx(doc["projection_bytes"] / ms / 1e6)


def test_decode_paths_speed_up_is_each_paths_against_the_modules_path(monkeypatch, tmp_path):
    """`e2e --decode-paths`: speedup_vs_modules is the first path's (modules-torch-linear) median over the row's
    path's, not the last path's, and tokens_equal compares with that first path's tokens. Calls and medians stood
    in (no model built): each side's median is that of the path really switched to when it ran."""
    from worldvla.inference import frames
    from worldvla.ops import decoder, dispatch

    medians = dict(zip(e2e.DECODE_PATHS, (12.0, 6.0, 4.0, 3.0, 2.0, 1.5)))
    ran = []

    def call():
        state = (dispatch.AUTO_ORDER[("decoder_layer", "cpu")], dispatch.AUTO_ORDER[("linear", "cpu")],
                 decoder.NATIVE_PREFILL, decoder.NATIVE_STEP, frames.NATIVE_FRAME_LOOP)
        ran.append(next(p for p, v in e2e.DECODE_PATHS.items() if v == state))
        return torch.tensor([1, 2, int(ran[-1] == "native-layer")])  # one path's tokens differ

    def fake(calls, n, before=None):
        out = {}
        for side, fn in calls.items():
            before(side)
            fn()
            out[side] = medians[ran[-1]] * n  # n: 3 (chunk) or 5 (frame), so each case's medians differ
        return out
    monkeypatch.setattr(e2e, "tune_cpu_malloc", lambda: None)
    monkeypatch.setattr(e2e, "_cpu_calls", lambda grid, repeats, model=None: {"chunk": (call, 3), "frame": (call, 5)})
    monkeypatch.setattr(e2e, "_interleaved", fake)
    doc = json.loads(e2e.compare_decode_paths(quick=True, out_dir=tmp_path, grid=2, repeats=3).read_text())
    assert [(r["case"], r["impl"], r["median_ms"], r["speedup_vs_modules"], r["tokens_equal"]) for r in doc["rows"]] == [
        (f"small {case} 32px", path, ms * n, 12.0 / ms, path != "native-layer")
        for case, n in (("chunk", 3), ("frame", 5)) for path, ms in medians.items()]


def test_sampled_frames_speed_up_is_the_python_loops_median_over_the_rows(monkeypatch, tmp_path):
    """`e2e --sampled-frames`: speedup_vs_python_loop is the Python loop's median over the row's (4 for a native
    loop four times as fast, not 1/4), and tokens_equal compares with the Python loop's codes. The small config
    stood in by the tiny one and the frames by their keywords (nothing decoded); each side's median is that of the
    loop really switched to when it ran, scaled by the case's keyword count so that each case's medians differ."""
    from worldvla.inference import frames

    ran = []

    def frame(*a, engine, generator, **kw):
        ran.append((frames.NATIVE_FRAME_LOOP, len(kw)))
        return torch.tensor([len(kw), int(frames.NATIVE_FRAME_LOOP and "cfg_scale" in kw)])  # guided: codes differ
    monkeypatch.setattr(e2e, "generate_frame_codes", frame)

    def fake(calls, n, before=None):
        out = {}
        for side, fn in calls.items():
            fn()
            loop, n_kw = ran[-1]
            out[side] = (2.0 if loop else 8.0) * (1 + n_kw)
        return out
    monkeypatch.setattr(e2e, "build_model", lambda name, device, dtype: _tiny_model())
    monkeypatch.setattr(e2e, "_interleaved", fake)
    doc = json.loads(e2e.compare_sampled_frames(quick=True, out_dir=tmp_path, grid=2, repeats=1).read_text())
    assert frames.NATIVE_FRAME_LOOP is True
    assert [(r["case"], r["impl"], r["median_ms"], r["speedup_vs_python_loop"]) for r in doc["rows"]] == [
        (f"small frame {case} 32px", impl, ms * (1 + n_kw), speedup)
        for case, n_kw in (("greedy", 0), ("top-k 100 T1", 2), ("T1 all codes", 1), ("greedy guided 3", 1))
        for impl, ms, speedup in (("native-frame-loop", 2.0, 4.0), ("python-loop", 8.0, 1.0))]
    assert [r["tokens_equal"] for r in doc["rows"]] == [True] * 6 + [False, True]


# ------------------------------------------------------------------ targets, counts and settings pinned further
def _target_rows(chunk_ms, speedup, frame_ms):
    return [{"task": "action_chunk", "config": "chameleon_7b", "px": 256, "chunk": 5, "impl": "parallel",
             "median_ms": chunk_ms, "speedup_vs_baseline": speedup},
            {"task": "frame", "config": "chameleon_7b", "px": 256, "chunk": None, "impl": "package",
             "median_ms": frame_ms}]


def test_targets_just_missed_are_missed():
    """The issue's bounds: a 5-action chunk in at most 60 ms, 20 times the baseline's speed at least, a frame in at
    most 1400 ms; a measurement just past each bound is not met, and each target states its bound."""
    out = e2e.check_targets(_target_rows(60.5, 19.9, 1400.5), True, "NVIDIA-H100-80GB-HBM3")
    assert {k: (v["target"], v["met"]) for k, v in out.items()} == {
        "chunk5_256px_parallel_ms": ("<= 60", False), "frame_256px_ms": ("<= 1400", False),
        "chunk5_256px_speedup_vs_baseline": (">= 20", False)}
    inside = e2e.check_targets(_target_rows(59.5, 20.5, 1399.5), True, "NVIDIA-H100-80GB-HBM3")
    assert all(v["met"] is True for v in inside.values())


def test_target_notes_say_the_cpu_measured_nothing_and_a_gpu_was_not_an_h100():
    """Off an H100 the note names the device; on the CPU it adds that nothing was measured, which a GPU's note
    (its rows measured) does not say."""
    cpu = e2e.check_targets(_target_rows(50.0, 25.0, 1300.0), False, "cpu-x86")
    assert all(v["measured"] is None and v["note"].endswith("not judged on cpu-x86 (CPU: not measured)")
               for v in cpu.values())
    gpu = e2e.check_targets(_target_rows(50.0, 25.0, 1300.0), True, "NVIDIA-H200")
    assert all(v["note"].endswith("not judged on NVIDIA-H200") and "CPU" not in v["note"] for v in gpu.values())


def test_chunk_rows_count_their_tokens_and_compare_only_the_package_decoders(monkeypatch):
    """A K-action chunk's parallel and sequential rows count K blocks of D + 2 tokens and the prompt's next token
    (K(D+2) + 1), as the baseline's does; tokens_equal and tokens_agreement compare the parallel and sequential
    decoders with each other and sit on their two rows only (the baseline and release rows have their own)."""
    medians = {"parallel": 2.0, "sequential": 8.0, "baseline": 40.0, "release-engine": 5.0}
    _fixed_timing(monkeypatch, medians, [])
    with torch.no_grad():
        rows = e2e.bench_chunks(_tiny_model(), "tiny", 2, (2,), torch.device("cpu"), True,
                                torch.Generator().manual_seed(0))
    by = {r["impl"]: r for r in rows}
    assert [by[i]["new_tokens"] for i in ("parallel", "sequential", "baseline")] == [2 * (D + 2) + 1] * 3
    for impl in ("parallel", "sequential"):
        assert by[impl]["tokens_equal"] is True and by[impl]["tokens_agreement"] == 1.0
    for impl in ("baseline", "release-engine"):
        assert "tokens_equal" not in by[impl] and "tokens_agreement" not in by[impl]


def test_pass_counter_counts_a_frame_loops_codes_from_first_to_last(monkeypatch):
    """A native frame loop run an image row at a time (a drawn frame) is counted by the codes each call decodes,
    [first, last), not as a whole frame per call; a call without them decodes every code but the first."""
    nb = pytest.importorskip("worldvla.ops.native_backend")
    seen = []
    monkeypatch.setattr(nb, "decode_frame", lambda *a, **kw: seen.append((a[7:], kw)))
    model = _tiny_model()
    with e2e.count_passes(model) as n:
        for row in range(4):  # a 4 x 4 frame, a call a row
            nb.decode_frame(None, None, None, 0, 0, None, None, 4, 4, 0, first=max(row * 4, 1), last=(row + 1) * 4,
                            noise=None)
    assert n == [15] and len(seen) == 4
    with e2e.count_passes(model) as n:
        nb.decode_frame(None, None, None, 0, 0, None, None, 4, 4, 0)
        nb.decode_frame(None, None, None, 0, 0, None, None, 4, 4, 0, 5, 9)
    assert n == [15 + 4]


def test_a_quick_gpu_run_measures_the_small_config_only(monkeypatch, tmp_path):
    """--quick on a GPU: the small config's 64 px rows only (7B's would take minutes), in bfloat16, on the threads
    as they were."""
    calls, threads = [], []
    _fake_benches(monkeypatch, calls, threads)
    monkeypatch.setattr(e2e, "measure_bandwidth", lambda device: 2000.0)
    monkeypatch.setattr(e2e, "device_name", lambda device: "NVIDIA-H100-80GB-HBM3")
    monkeypatch.setattr(e2e, "write_results", lambda name, rows, device, out_dir, extra=None, plot=None, quick=False:
                        tmp_path / "e2e.json")
    before = torch.get_num_threads()
    e2e.run(quick=True, device="cuda", out_dir=tmp_path)
    assert calls == [("model", "small", torch.bfloat16), ("chunks", "small", 4, (5,)), ("frame", "small", 4),
                     ("chunks", "small", 4, (10,))]
    assert threads == [before, before]


def test_a_full_cpu_run_keeps_the_callers_threads(monkeypatch, tmp_path):
    """Only --quick pins a CPU run to one thread: a full CPU run measures on the threads the caller set (or the
    ones asked for), at 256 and 512 px, then gives them back."""
    saved = torch.get_num_threads()
    try:
        for threads, want in ((None, 2), (1, 1)):
            calls, seen = [], []
            _fake_benches(monkeypatch, calls, seen)
            torch.set_num_threads(2)
            e2e.run(device="cpu", out_dir=tmp_path, threads=threads)
            assert seen == [want] * 3 and torch.get_num_threads() == 2
            assert [c[2] for c in calls if c[0] == "chunks"] == [16, 16, 32]
    finally:
        torch.set_num_threads(saved)


def test_side_rows_compare_tokens_with_the_reference_side_not_the_base(monkeypatch):
    """The bfloat16 model comparison's speed-ups are against its modules side but its tokens against the float32
    side: with the base and reference sides apart, `equal` follows the reference side's tokens."""
    medians = {"base": 4.0, "other": 2.0, "ref": 1.0}
    monkeypatch.setattr(e2e, "time_interleaved", lambda calls, warmup, repeats, before: {
        side: {"median_ms": medians[side]} for side in calls})
    calls = {side: {"frame": (lambda: None, 3)} for side in medians}
    out = {"base": {"frame": torch.tensor([1, 2])}, "other": {"frame": torch.tensor([1, 3])},
           "ref": {"frame": torch.tensor([1, 3])}}
    rows = e2e._side_rows(calls, out, 2, "base", "ref", "speedup", "equal_ref")
    assert [(r["impl"], r["speedup"], r["equal_ref"]) for r in rows] == [
        ("base", 1.0, False), ("other", 2.0, True), ("ref", 4.0, True)]


def test_bf16_steps_count_the_projection_weights_bytes_only(monkeypatch, tmp_path):
    """weights_GB_per_s is the rate of the projections a decode step streams: projection_bytes is the q, k, v, o,
    gate, up and down weights of every layer in bfloat16, not the norms' weights."""
    monkeypatch.setattr(e2e, "_interleaved", lambda calls, n, before=None: {"native-step": 1.0, "modules": 1.0})
    doc = json.loads(e2e.compare_bf16_steps("small", quick=True, out_dir=tmp_path, grid=2, repeats=1).read_text())
    cfg = e2e.ModelConfig.small(e2e.LAYOUT)
    H, kv = cfg.hidden_size, cfg.num_key_value_heads * cfg.head_dim
    per_layer = 2 * H * cfg.num_attention_heads * cfg.head_dim + 2 * H * kv + 3 * H * cfg.intermediate_size
    assert doc["projection_bytes"] == 2 * per_layer * cfg.num_hidden_layers


def test_the_command_line_hands_threads_and_grid_to_the_cpu_comparisons(monkeypatch, tmp_path):
    """`--malloc`, `--decode-paths`, `--bf16-weights`, `--bf16-model`, `--sampled-frames` and `--bf16-steps` run
    at the --grid and on the --threads asked for."""
    got = []

    def stub(name):
        return lambda *a, **kw: got.append((name, a, kw, torch.get_num_threads())) or "done"

    flags = {"malloc": "compare_malloc", "decode-paths": "compare_decode_paths", "bf16-weights": "compare_bf16_weights",
             "bf16-model": "compare_bf16_model", "sampled-frames": "compare_sampled_frames"}
    for fn in (*flags.values(), "compare_bf16_steps"):
        monkeypatch.setattr(e2e, fn, stub(fn))
    saved = torch.get_num_threads()
    try:
        for flag, fn in flags.items():
            torch.set_num_threads(2)
            e2e.main([f"--{flag}", "--quick", "--out", str(tmp_path), "--grid", "6", "--threads", "1"])
            assert got.pop() == (fn, (True, str(tmp_path)), {"grid": 6}, 1)
        torch.set_num_threads(2)
        e2e.main(["--bf16-steps", "small", "--out", str(tmp_path), "--grid", "6", "--threads", "1"])
        assert got.pop() == ("compare_bf16_steps", ("small", False, str(tmp_path)), {"grid": 6}, 1)
    finally:
        torch.set_num_threads(saved)


def test_the_small_config_holds_a_512px_prompt_and_its_longest_chunk(monkeypatch):
    """The small model's positions cover the largest prompt a full run decodes (two 512 px images) and a
    10-action chunk after it, past the 2048 of the small config's default; an unknown config is refused by name.
    The model class stood in (only the config it is built from is read)."""
    from worldvla.model import ModelConfig

    built = []

    class Model:
        def __init__(self, cfg):
            built.append(cfg)

        def init_weights(self, std):
            return self

        def eval(self):
            return self

    monkeypatch.setattr(e2e, "WorldVLA", Model)
    e2e.build_model("small", torch.device("cpu"), torch.float32)
    e2e.build_model("chameleon_7b", torch.device("cpu"), torch.float32)
    longest = e2e.action_prompt(32, torch.Generator().manual_seed(0)).numel() + 10 * (D + 2) + 1
    assert ModelConfig.small(e2e.LAYOUT).max_position_embeddings < longest
    assert built[0].max_position_embeddings >= longest and built[1].max_position_embeddings >= longest
    with pytest.raises(ValueError, match="unknown model config 'tiny'"):
        e2e.build_model("tiny", torch.device("cpu"), torch.float32)


def test_cpu_calls_time_a_frame_at_least_three_times():
    """The CPU comparisons' calls: both 5-action chunk modes with the repeats asked for, the frame (many times
    slower) with a third of them but never fewer than 3."""
    model = _tiny_model()
    for repeats, frame in ((3, 3), (1, 3), (15, 5)):
        calls = e2e._cpu_calls(2, repeats, model)
        assert {k: n for k, (_, n) in calls.items()} == {
            "action_chunk K5 parallel": repeats, "action_chunk K5 sequential": repeats, "frame": frame}


def test_the_baselines_decode_their_whole_length_whatever_the_model_favours():
    """The release-style baselines ban the separator (the release's stop), so a random model that favours it still
    decodes every token the timing assumes: the frame's h*(w+1) - 1 (h*(w+1) passes), the chunk's K(D+2); nothing
    else is banned."""
    L = e2e.LAYOUT
    logits = torch.zeros(L.vocab_size)
    out = e2e.no_stop(L)(torch.zeros(3, dtype=torch.long), logits.clone())
    assert torch.isneginf(out[L.sep]) and int(torch.isinf(out).sum()) == 1

    class FavourSeparator(torch.nn.Module):
        def __init__(self, head):
            super().__init__()
            self.head, self.weight = head, head.weight

        def forward(self, h):
            out = self.head(h)
            out[..., L.sep] += 1e4
            return out

    model = _tiny_model()
    model.lm_head = FavourSeparator(model.lm_head)
    prompt = e2e.action_prompt(2, torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert e2e.baseline_generate_action_chunk(model, prompt, L, 1, D, max_new_tokens=6).tokens.tolist() == [L.sep]
        assert e2e.frame_baseline(model, prompt, 2).tokens.numel() == 2 * 3 - 1  # the last pass's token unused
        chunk = e2e.baseline_generate_action_chunk(model, prompt, L, 2, D, max_new_tokens=2 * (D + 2),
                                                   logits_processor=e2e.no_stop(L))
    assert chunk.tokens.numel() == 2 * (D + 2) and L.sep not in chunk.tokens.tolist()
