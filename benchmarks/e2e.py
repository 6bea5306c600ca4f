"""End-to-end latency at batch size 1: an action chunk and a world-model frame, the package's
decoders vs the release-style baseline, on random weights and random prompts.

Action chunks (K actions of D=7 bins after a prompt of BOS, text, two history images, SEP):
  parallel    `generate_action_chunk(mode="parallel")`: prefill + D steps of K query rows
  sequential  `generate_action_chunk(mode="sequential")`: prefill + one token a step, constrained
  baseline    `baseline_generate_action_chunk`: the release's decoder (full-vocabulary fp32 logits at
              every prompt position, growing cache, dense mask row rebuilt from all ids each step)
  release-engine  `generate_release_actions`: the release's choices (free greedy over the whole
              vocabulary, no structure forced) on the engine, as many tokens; its tokens are checked
              against the baseline's (`tokens_equal_release`)
World-model frame (h x w codes after BOS, text, image, action, SEP and the forced image header):
  package     `generate_frame_codes`: codes only over the image ids, newlines ride with a row's last code
  baseline    the same release-style decoder generating the frame's h*(w+1) codes and newlines one
              token a step (baseline.py has no frame decoder of its own; see `frame_baseline`)

Both sides run in the same process, their calls interleaved (one call of each side a round, the
order turning every round); every side of every ratio gets the same warm-up (2 calls, 1 with
--quick) and the same repeats (7, 3 with --quick); times are medians and include the
prefill of the whole prompt (no prefix cache). So few repeats have no 10th and 90th percentiles of their
own: each row gives the fastest and slowest (min_ms, max_ms, max_over_min) instead. The package's engines
are built once and reused, as `WorldVLAPolicy` does. Forward passes are counted on an eager run
(CUDA-graph replays bypass Python). The weight-streaming floor of a row is passes x parameter bytes /
HBM bandwidth, with the bandwidth measured here by a large device-to-device copy.

Order (GPU): Chameleon-7B's 5-action chunk at 256 px and its 256 px frame first (the latency targets'
rows), then its other chunk sizes and the 512 px prompts, then the small config; the JSON is rewritten
after each chunk size and the frame, `target_rows_written` saying whether it holds the targets' rows, and
the line TARGET_ROWS_LINE is printed (flushed) once it does. The targets are an H100's: `met` is judged
only on a device whose name contains H100, None with a note elsewhere (an H200's bandwidth would meet a
latency an H100 misses).
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import numpy as np
import torch

import worldvla
from worldvla import ActionTokenizer, SequenceBuilder, VocabLayout
from worldvla.cli import positive_int
from worldvla.inference import baseline_generate_action_chunk, generate_action_chunk, generate_frame_codes
from worldvla.inference.release import generate_release_actions, release_engine
from worldvla.inference.chunk import make_engine
from worldvla.inference.engine import InferenceEngine
from worldvla.inference.malloc import tune_cpu_malloc
from worldvla.model import ModelConfig, WorldVLA
from worldvla.ops.decoder import DecodeStepPlan
from worldvla.tokens import image_tokens

from .attention import action_document
from .common import BANDWIDTH_METHOD, device_name, load_average, measure_bandwidth, print_table, time_interleaved, \
    write_results

LAYOUT = VocabLayout.chameleon()
ACTION_DIM = 7
# Issue targets for Chameleon-7B in bf16 on one H100 (judged there only: a faster GPU, an H200's bandwidth,
# would meet a latency an H100 misses). TARGET_CHUNK actions at TARGET_GRID codes a side (256 px).
TARGETS = {"chunk5_256px_parallel_ms": ("<=", 60.0), "frame_256px_ms": ("<=", 1400.0),
           "chunk5_256px_speedup_vs_baseline": (">=", 20.0)}
TARGET_GPU = "H100"
TARGET_CHUNK, TARGET_GRID = 5, 16
# Printed (flushed) when the JSON first holds every target row: gpu_all.sh reads it in e2e's log.
TARGET_ROWS_LINE = "e2e: target rows written"


class RandomText:
    """Stands in for the release's BPE tokenizer (not needed for timing): every text becomes the same
    `n` random ids from the text range."""

    def __init__(self, n: int = 20, gen=None):
        self.ids = torch.randint(20000, 60000, (n,), generator=gen).tolist()

    def encode(self, text: str) -> list[int]:
        return list(self.ids)


def action_prompt(grid: int, gen=None) -> torch.Tensor:
    """BOS, ~20 text ids, two random images of grid x grid codes, SEP (the release's 'his_2' prompt)."""
    doc = action_document(grid * 16, chunk=0, action_dim=ACTION_DIM, gen=gen)
    return torch.tensor(doc[:-1])  # with no actions the document ends with two separators


def build_model(name: str, device, dtype, seed: int = 0) -> WorldVLA:
    """Random weights, allocated directly on `device` in `dtype` (no fp32 copy of 7B on the host)."""
    if name == "chameleon_7b":
        cfg = ModelConfig.chameleon_7b()
    elif name == "small":
        cfg = ModelConfig.small(LAYOUT, max_position_embeddings=4096)  # 512 px prompts + a chunk exceed 2048
    else:
        raise ValueError(f"unknown model config {name!r}; use 'chameleon_7b' or 'small'")
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = WorldVLA(cfg)
    finally:
        torch.set_default_dtype(prev)
    torch.manual_seed(seed)  # init_weights draws from the default generator of the parameters' device
    return model.init_weights(0.02).eval()


@contextlib.contextmanager
def count_passes(model):
    """Counts forward passes of `model` while active: `with ... as n: ...; n[0]`. Calls of its
    `hidden_states` (every prefill, module-run step and baseline pass), the engine's native steps
    (DecodeStepPlan, which run no module) and the h*w - 1 steps of a frame's native loop. Not a forward
    hook: a hooked model keeps its modules."""
    n = [0]
    hidden_states = model.hidden_states  # the bound method, shadowed on the instance while counting
    run_step = DecodeStepPlan.__call__
    try:
        from worldvla.ops import native_backend
    except ImportError:
        native_backend = None
    frame_loop = getattr(native_backend, "decode_frame", None)

    def counted_forward(*args, **kwargs):
        n[0] += 1
        return hidden_states(*args, **kwargs)

    def counted(plan):
        n[0] += 1
        return run_step(plan)

    def counted_frame(one, two, weight, lo, hi, codes, next_pos, h, w, newline, first=1, last=None, **kw):
        n[0] += (h * w if last is None else last) - first
        return frame_loop(one, two, weight, lo, hi, codes, next_pos, h, w, newline, first, last, **kw)

    model.hidden_states = counted_forward
    DecodeStepPlan.__call__ = counted
    if frame_loop is not None:
        native_backend.decode_frame = counted_frame
    try:
        yield n
    finally:
        del model.hidden_states
        DecodeStepPlan.__call__ = run_step
        if frame_loop is not None:
            native_backend.decode_frame = frame_loop


def no_stop(layout: VocabLayout):
    """Logits processor that bans the separator, so the baseline decodes exactly `max_new_tokens`
    (a random model would otherwise stop at an arbitrary point, or never)."""
    def process(seq, logits):
        logits[layout.sep] = float("-inf")
        return logits
    return process


def _timing(quick: bool) -> dict:
    """Warm-up / repeats, the same for every side of every ratio (fast decoders and slow baselines alike)."""
    return {"warmup": 1, "repeats": 3} if quick else {"warmup": 2, "repeats": 7}


def bench_chunks(model, cfg_name, grid, chunks, device, quick, gen, done=None, prompt=None) -> list[dict]:
    """Each chunk size's four sides (parallel, sequential, the release-style baseline, release mode on the
    engine) timed interleaved (`time_interleaved`), each engine built once beforehand. `done(rows)`, if
    given, is called with each chunk size's rows as soon as they are measured (the caller writes them).
    `prompt`: the action prompt (default: a new random one of `grid`)."""
    prompt = action_prompt(grid, gen) if prompt is None else prompt
    rows = []
    for K in chunks:
        T = ACTION_DIM + 2
        nb = K * T  # the release stops at the separator after K blocks: K(D+2) generated tokens, 1 + K(D+2) passes
        case = {"task": "action_chunk", "config": cfg_name, "px": grid * 16, "grid": grid,
                "prompt_tokens": int(prompt.numel()), "chunk": K, "action_dim": ACTION_DIM}
        tokens = {}
        engines = {mode: make_engine(model, [prompt], K, ACTION_DIM, LAYOUT) for mode in ("parallel", "sequential")}
        rel_engine = release_engine(model, [prompt], nb, LAYOUT)

        def chunk_call(mode):
            def call():
                tokens[mode] = generate_action_chunk(model, prompt, LAYOUT, K, ACTION_DIM, mode=mode,
                                                     engine=engines[mode])
            return call

        base_call = lambda: baseline_generate_action_chunk(model, prompt, LAYOUT, K, ACTION_DIM, max_new_tokens=nb,
                                                           logits_processor=no_stop(LAYOUT))
        # The release's choices (free greedy over the whole vocabulary, blocks where the model writes them)
        # on the engine: the same nb tokens, checked against the release's procedure itself.
        rel_call = lambda: generate_release_actions(model, prompt, LAYOUT, ACTION_DIM, nb, engine=rel_engine)[0]
        stats = time_interleaved({"parallel": chunk_call("parallel"), "sequential": chunk_call("sequential"),
                                  "baseline": base_call, "release-engine": rel_call}, device=device, **_timing(quick))
        del engines, rel_engine
        case_rows = []
        for mode in ("parallel", "sequential"):
            eager = make_engine(model, [prompt], K, ACTION_DIM, LAYOUT, cuda_graphs=False)
            with count_passes(model) as n:  # counted eagerly: graph replays bypass Python
                generate_action_chunk(model, prompt, LAYOUT, K, ACTION_DIM, mode=mode, engine=eager)
            case_rows.append({**case, "impl": mode, "new_tokens": K * T + 1, **stats[mode], "forward_passes": n[0]})
        with count_passes(model) as n:
            base_call()
        case_rows.append({**case, "impl": "baseline", "new_tokens": nb + 1, **stats["baseline"], "forward_passes": n[0]})
        eager = InferenceEngine(model, 1, int(prompt.numel()) + nb, layout=LAYOUT, cuda_graphs=False)
        with count_passes(model) as n:
            got = generate_release_actions(model, prompt, LAYOUT, ACTION_DIM, nb, engine=eager)[0]
        want = baseline_generate_action_chunk(model, prompt, LAYOUT, K, ACTION_DIM, max_new_tokens=nb)
        case_rows.append({**case, "impl": "release-engine", "new_tokens": int(got.tokens.numel()) + 1,
                          **stats["release-engine"], "forward_passes": n[0],
                          "tokens_equal_release": bool(torch.equal(got.tokens, want.tokens)),
                          "tokens_agreement_release": agreement(got.tokens, want.tokens),
                          # fewer tokens than the baseline's nb (a separator or a malformed block): not its work
                          "stopped_early": int(got.tokens.numel()) < nb})
        del eager
        equal = bool(torch.equal(tokens["parallel"], tokens["sequential"]))
        agree = agreement(tokens["parallel"], tokens["sequential"])
        base_ms = stats["baseline"]["median_ms"]
        for r in case_rows:
            r["speedup_vs_baseline"] = None if r.get("stopped_early") else base_ms / r["median_ms"]
            r["ms_per_action"] = r["median_ms"] / K
            if r["impl"] in ("parallel", "sequential"):
                r["tokens_equal"], r["tokens_agreement"] = equal, agree
        rows += case_rows
        if done is not None:
            done(case_rows)
    return rows


def agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fraction of positions where two token sequences agree (a length difference counts as disagreement).
    Exact equality is the float32 claim (the tests); in bfloat16 the two sides' different reduction orders
    (a five-row against a one-row GEMM, SDPA against a fused kernel) can flip a near-tie."""
    a, b = a.flatten().cpu(), b.flatten().cpu()
    n = max(a.numel(), b.numel())
    m = min(a.numel(), b.numel())
    return float((a[:m] == b[:m]).sum()) / n if n else 1.0


def frame_baseline(model, prompt: torch.Tensor, grid: int):
    """Release-style decoding of a frame's h*(w+1) codes and newlines, one token per pass, through
    baseline.py's decoder (full-vocabulary fp32 logits, growing cache, mask row rebuilt each step).
    `max_new_tokens` = h*(w+1) - 1: the pass fed with the last one computes the final newline's
    logits, so the frame's h*(w+1) tokens cost h*(w+1) passes, prefill included."""
    return baseline_generate_action_chunk(model, prompt, LAYOUT, 1, ACTION_DIM, max_new_tokens=grid * (grid + 1) - 1,
                                          logits_processor=no_stop(LAYOUT))


def bench_frame(model, cfg_name, grid, device, quick, gen) -> list[dict]:
    builder = SequenceBuilder(LAYOUT, RandomText(gen=gen), ActionTokenizer(LAYOUT))
    codes = torch.randint(0, LAYOUT.n_image_codes, (1, grid, grid), generator=gen)
    action = np.random.default_rng(int(torch.randint(0, 2**31, (1,), generator=gen))).uniform(-0.3, 0.3, (1, ACTION_DIM))
    prompt = torch.cat([builder.world_prompt(codes[0], action[0]), image_tokens(codes[0], LAYOUT)[:3]])
    max_len = prompt.numel() + grid * (grid + 1)
    case = {"task": "frame", "config": cfg_name, "px": grid * 16, "grid": grid, "prompt_tokens": int(prompt.numel()),
            "chunk": None, "action_dim": ACTION_DIM, "new_tokens": grid * (grid + 1)}
    engine = InferenceEngine(model, 1, max_len, layout=LAYOUT)
    stats = time_interleaved({"package": lambda: generate_frame_codes(model, codes, action, builder, engine=engine).cpu(),
                              "baseline": lambda: frame_baseline(model, prompt, grid)}, device=device, **_timing(quick))
    eager = InferenceEngine(model, 1, max_len, layout=LAYOUT, cuda_graphs=False)
    with count_passes(model) as n:
        generate_frame_codes(model, codes, action, builder, engine=eager)
    del engine, eager
    rows = [{**case, "impl": "package", **stats["package"], "forward_passes": n[0]}]
    with count_passes(model) as n:
        frame_baseline(model, prompt, grid)
    rows.append({**case, "impl": "baseline", **stats["baseline"], "forward_passes": n[0]})
    for r in rows:
        r["speedup_vs_baseline"] = rows[-1]["median_ms"] / r["median_ms"]
        r["ms_per_token"] = r["median_ms"] / r["new_tokens"]
    return rows


def _find(rows, **kw):
    for r in rows:
        if all(r.get(k) == v for k, v in kw.items()):
            return r
    return None


def _target_rows(rows):
    """The rows the targets are read from: 7B's parallel 5-action chunk and its frame at 256 px (None if not yet)."""
    px = TARGET_GRID * 16
    return (_find(rows, task="action_chunk", config="chameleon_7b", px=px, chunk=TARGET_CHUNK, impl="parallel"),
            _find(rows, task="frame", config="chameleon_7b", px=px, impl="package"))


def target_rows_written(rows) -> bool:
    """Whether `rows` hold every row the targets are read from."""
    return all(r is not None for r in _target_rows(rows))


def check_targets(rows, on_gpu: bool, device: str | None = None) -> dict:
    """The issue's 7B targets, which are an H100's: measured on any GPU (None on the CPU), `met` judged only
    where `device` (its name) contains TARGET_GPU, None elsewhere with a note saying why."""
    chunk, frame = _target_rows(rows) if on_gpu else (None, None)
    measured = {"chunk5_256px_parallel_ms": chunk and chunk["median_ms"],
                "frame_256px_ms": frame and frame["median_ms"],
                "chunk5_256px_speedup_vs_baseline": chunk and chunk["speedup_vs_baseline"]}
    judged = on_gpu and TARGET_GPU in (device or "")
    out = {}
    for name, (op, target) in TARGETS.items():
        m = measured[name]
        met = None if m is None or not judged else (m <= target if op == "<=" else m >= target)
        out[name] = {"target": f"{op} {target:g}", "measured": m, "met": met}
        if not judged:
            out[name]["note"] = (f"the targets are an {TARGET_GPU}'s (7B in bf16): not judged on "
                                 f"{device or 'this device'}" + ("" if on_gpu else " (CPU: not measured)"))
    return out


def param_bytes(cfg_name: str, dtype) -> int:
    with torch.device("meta"):
        cfg = ModelConfig.chameleon_7b() if cfg_name == "chameleon_7b" else ModelConfig.small(LAYOUT)
        n = WorldVLA(cfg).num_parameters()
    return n * torch.empty((), dtype=dtype).element_size()


def run(quick: bool = False, device=None, out_dir="benchmarks/results", *, grid: int | None = None,
        chunks: tuple[int, ...] | None = None, frame: bool = True, threads: int | None = None,
        tune_malloc: bool = False):
    """`grid`: codes per image side (px = 16 x grid); default 4 (64 px) with `quick`, else 16 and 32.
    `threads`: CPU intra-op threads while measuring (default 1 with `quick` on CPU: a small model at
    batch 1 gains nothing from more, and loses a lot when other jobs share the cores).
    `tune_malloc`: on the CPU, `tune_cpu_malloc()` first, as `WorldVLAPolicy` does (for the whole
    process: off by default, so that later benchmarks' CPU peak-memory figures stay meaningful)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if threads is None and quick and device.type == "cpu":
        threads = 1
    saved_threads = torch.get_num_threads()
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    try:
        return _run(quick, device, out_dir, grid, chunks, frame, tune_malloc)
    finally:
        torch.set_num_threads(saved_threads)


def _run(quick, device, out_dir, grid, chunks, frame, tune_malloc):
    on_gpu = device.type == "cuda"
    if grid is not None and (int(grid) != grid or grid < 2 or grid % 2):
        raise ValueError(f"grid must be an even number of codes per side >= 2 (px = 16 x grid), got {grid}")
    dtype = torch.bfloat16 if on_gpu else torch.float32
    grids = [grid] if grid is not None else ([4] if quick else [16, 32])
    frame_grid = grid if grid is not None else (4 if quick else 16)
    chunks = tuple(chunks or (5, 10))
    configs = ["chameleon_7b", "small"] if on_gpu and not quick else ["small"]
    if tune_malloc and not on_gpu:
        tune_cpu_malloc()  # as WorldVLAPolicy does on the CPU (compare_malloc measures what it changes)
    load0 = load_average()
    bandwidth = measure_bandwidth(device)
    dev_name = device_name(device)
    gen = torch.Generator().manual_seed(0)
    pbytes = {name: param_bytes(name, torch.bfloat16 if name == "chameleon_7b" else dtype)
              for name in ("chameleon_7b", *configs)}
    rows = []

    def label(new_rows):
        for r in new_rows:
            r["case"] = f"{r['config']} {r['task']} {r['px']}px" + (f" K{r['chunk']}" if r["chunk"] else "")
            r["weight_floor_ms"] = (r["forward_passes"] * pbytes[r["config"]] / (bandwidth * 1e9) * 1e3 if bandwidth
                                    else None)

    def partial(new_rows):
        # What is measured so far, written as each chunk size (and the frame) ends, so a run cut short keeps it:
        # on a GPU the first two, 7B at 256 px with 5 actions and its 256 px frame, hold the latency targets.
        # Rewritten whole below.
        had = target_rows_written(rows)
        label(new_rows)
        rows.extend(new_rows)
        path = write_results("e2e", rows, device, out_dir, quick=quick,
                             extra={"dtype": str(dtype), "partial": True, "load_average_start": load0,
                                    "targets": check_targets(rows, on_gpu, dev_name),
                                    "target_rows_written": target_rows_written(rows)})
        if target_rows_written(rows) and not had:
            print(f"{TARGET_ROWS_LINE} -> {path}", flush=True)

    # The target rows first: the first grid's TARGET_CHUNK chunk (or its first chunk size), its frame, then the
    # rest (its other chunk sizes, the larger prompts).
    first = (TARGET_CHUNK,) if TARGET_CHUNK in chunks else chunks[:1]
    rest = tuple(c for c in chunks if c not in first)
    with torch.no_grad():
        for name in configs:
            model = build_model(name, device, dtype)
            for i, g in enumerate(grids):
                prompt = action_prompt(g, gen)
                if i > 0:
                    bench_chunks(model, name, g, chunks, device, quick, gen, done=partial, prompt=prompt)
                    continue
                bench_chunks(model, name, g, first, device, quick, gen, done=partial, prompt=prompt)
                if frame:  # the frame (a latency target at 256 px) before the other chunks and prompts
                    partial(bench_frame(model, name, frame_grid, device, quick, gen))
                bench_chunks(model, name, g, rest, device, quick, gen, done=partial, prompt=prompt)
            del model
            if on_gpu:
                torch.cuda.empty_cache()
    pairs = [r["tokens_equal"] for r in rows if "tokens_equal" in r]
    extra = {
        "dtype": str(dtype), "quick": quick, "batch_size": 1, "load_average_start": load0,
        "worldvla": worldvla.__version__,
        "tokens_equal": all(pairs) if pairs else None,
        "tokens_equal_note": "parallel against sequential tokens per chunk case; exact equality is the float32 "
                             "claim, a bfloat16 run may flip near-ties (tokens_agreement gives the fraction equal)",
        "targets": check_targets(rows, on_gpu, dev_name),
        "target_rows_written": target_rows_written(rows),
        "weight_streaming_floor": {
            "formula": "forward_passes x parameter bytes / HBM bandwidth (every weight read once per pass; "
                       "ignores the compute-bound prefill and the KV cache, counts the full embedding and lm_head)",
            "hbm_bandwidth_GBps": bandwidth,
            "bandwidth_method": BANDWIDTH_METHOD if on_gpu else None,
            "param_bytes": pbytes,
            "ms_per_pass_7b": pbytes["chameleon_7b"] / (bandwidth * 1e9) * 1e3 if bandwidth else None,
            "chameleon_7b": {r["case"] + " " + r["impl"]: {"forward_passes": r["forward_passes"],
                                                             "floor_ms": r["weight_floor_ms"]}
                             for r in rows if r["config"] == "chameleon_7b"} or None,
        },
        "frame_baseline": "baseline.py has no frame decoder: the frame baseline is baseline_generate_action_chunk "
                          "generating the frame's h*(w+1) tokens (separator banned) after the same prompt + header",
        "notes": "random weights and prompts; batch 1; latency includes the full prefill (no prefix cache) and the "
                 "copy of the result to the host; engines reused across calls; baseline runs SDPA with a dense mask",
    }
    print_table(rows, ["case", "prompt_tokens", "impl", "median_ms", "forward_passes", "speedup_vs_baseline",
                       "tokens_equal", "weight_floor_ms"])
    if on_gpu:
        for k, v in extra["targets"].items():
            print(f"target {k}: {v['target']} measured {v['measured']} met {v['met']}"
                  + (f" ({v['note']})" if "note" in v else ""))
    return write_results("e2e", rows, device, out_dir, extra=extra, plot=("case", "speedup_vs_baseline", "impl"),
                         quick=quick)


def _cpu_calls(grid: int, repeats: int, model=None) -> dict:
    """The small config's CPU calls the comparisons below time: a 5-action chunk (parallel and
    sequential) and a world-model frame, each with its engine built once; name -> (call, repeats).
    `model`: the small config's random model unless given."""
    gen = torch.Generator().manual_seed(0)
    model = model or build_model("small", torch.device("cpu"), torch.float32)
    prompt = action_prompt(grid, gen)
    calls = {}
    for mode in ("parallel", "sequential"):
        engine = make_engine(model, [prompt], 5, ACTION_DIM, LAYOUT)
        calls[f"action_chunk K5 {mode}"] = (lambda mode=mode, engine=engine: generate_action_chunk(
            model, prompt, LAYOUT, 5, ACTION_DIM, mode=mode, engine=engine), repeats)
    builder = SequenceBuilder(LAYOUT, RandomText(gen=gen), ActionTokenizer(LAYOUT))
    codes = torch.randint(0, LAYOUT.n_image_codes, (1, grid, grid), generator=gen)
    action = np.random.default_rng(0).uniform(-0.3, 0.3, (1, ACTION_DIM))
    n_frame = builder.world_prompt(codes[0], action[0]).numel() + 3 + grid * (grid + 1)
    frame_engine = InferenceEngine(model, 1, n_frame, layout=LAYOUT)
    calls["frame"] = (lambda: generate_frame_codes(model, codes, action, builder, engine=frame_engine),
                      max(3, repeats // 3))
    return calls


# The CPU decode paths `compare_decode_paths` switches between: (decoder_layer order, linear order,
# ops.decoder.NATIVE_PREFILL, ops.decoder.NATIVE_STEP, inference.frames.NATIVE_FRAME_LOOP).
DECODE_PATHS = {
    "modules-torch-linear": (("torch",), ("torch",), False, False, False),  # the layers' modules, torch's sgemm
    "modules-native-linear": (("torch",), ("native", "torch"), False, False, False),  # the few-row C++ linear
    "native-layer": (("native", "torch"), ("torch",), False, False, False),  # decode steps: one C++ call a layer
    "native-layer+prefill": (("native", "torch"), ("torch",), True, False, False),  # and the prefill's GEMM route
    "native-step+prefill": (("native", "torch"), ("torch",), True, True, False),  # decode steps: one call a step
    "native-frame-loop": (("native", "torch"), ("torch",), True, True, True),  # a frame's loop: one call a frame
}


def compare_decode_paths(quick: bool = False, out_dir="benchmarks/results", grid: int | None = None,
                         repeats: int | None = None):
    """CPU: the same engines with the cached forwards run six ways (DECODE_PATHS), switched call by
    call (A, B, C, ..., A, ...), medians; the tokens of all six must be equal. The first three keep
    the modules and torch's GEMM for the prompt's prefill (more than NATIVE_MAX_ROWS rows) and differ
    in the decode steps; the fourth also runs the prefill on the native layer's GEMM route, the fifth
    runs each decode step in one native call (the engine's DecodeStepPlan), and the last (the default)
    also a frame's whole greedy loop (chunks are decoded as in the fifth)."""
    from worldvla.inference import frames as frames_mod
    from worldvla.ops import decoder as decoder_op
    from worldvla.ops import dispatch

    if "native" not in dispatch.available("decoder_layer"):
        raise RuntimeError("the native backend is not built here (pip install .)")
    tune_cpu_malloc()  # as WorldVLAPolicy does on the CPU
    grid = grid or (4 if quick else 16)
    calls = _cpu_calls(grid, repeats or (3 if quick else 10))
    keys = [("decoder_layer", "cpu"), ("linear", "cpu")]
    saved = {k: dispatch.AUTO_ORDER.get(k) for k in keys}
    saved_flags = decoder_op.NATIVE_PREFILL, decoder_op.NATIVE_STEP, frames_mod.NATIVE_FRAME_LOOP

    def use(path):
        *orders, decoder_op.NATIVE_PREFILL, decoder_op.NATIVE_STEP, frames_mod.NATIVE_FRAME_LOOP = DECODE_PATHS[path]
        for key, order in zip(keys, orders):
            dispatch.AUTO_ORDER[key] = order

    base = next(iter(DECODE_PATHS))
    rows = []
    try:
        with torch.no_grad():
            for case, (fn, n) in calls.items():
                out = {}
                for path in DECODE_PATHS:  # warm-up, and the tokens of each
                    use(path)
                    out[path] = fn()
                med = _interleaved(dict.fromkeys(DECODE_PATHS, fn), n, before=use)
                for path in DECODE_PATHS:
                    rows.append({"case": f"small {case} {grid * 16}px", "impl": path, "median_ms": med[path],
                                 "repeats": n, "speedup_vs_modules": med[base] / med[path],
                                 "tokens_equal": bool(torch.equal(out[path], out[base]))})
    finally:
        decoder_op.NATIVE_PREFILL, decoder_op.NATIVE_STEP, frames_mod.NATIVE_FRAME_LOOP = saved_flags
        for key, order in saved.items():
            if order is None:
                dispatch.AUTO_ORDER.pop(key, None)
            else:
                dispatch.AUTO_ORDER[key] = order
    print_table(rows, ["case", "impl", "median_ms", "speedup_vs_modules", "tokens_equal"])
    extra = {"threads": torch.get_num_threads(), "quick": quick,
             "paths": {k: {"decoder_layer": list(v[0]), "linear": list(v[1]), "native_prefill": v[2],
                           "native_step": v[3], "native_frame_loop": v[4]}
                       for k, v in DECODE_PATHS.items()},
             "method": "one model and engine per case; the path switched call by call (interleaved), medians; "
                       "prefills on the modules and torch's GEMM except in the +prefill paths"}
    return write_results("e2e_decode_paths", rows, "cpu", out_dir, extra=extra,
                         plot=("case", "speedup_vs_modules", "impl"), quick=quick)


def compare_malloc(quick: bool = False, out_dir="benchmarks/results", grid: int | None = None,
                   repeats: int | None = None):
    """CPU: the same engines and calls under glibc's default malloc thresholds, then after
    `tune_cpu_malloc` (what `WorldVLAPolicy` does on the CPU), in one process: medians and minor
    page faults per call; the tokens must be equal. The two sides cannot alternate (glibc's
    adaptive defaults cannot be restored once fixed), so the defaults go first; both get the same
    warm-up. Run it in a fresh process."""
    import resource

    from worldvla.inference.malloc import cpu_malloc_settings

    if cpu_malloc_settings() is not None:
        raise RuntimeError("tune_cpu_malloc already ran in this process; compare in a fresh one "
                           "(python -m benchmarks.e2e --malloc)")
    grid = grid or (4 if quick else 16)
    calls = _cpu_calls(grid, repeats or (3 if quick else 15))
    faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    measured = {}
    with torch.no_grad():
        for side in ("defaults", "tuned"):
            if side == "tuned" and tune_cpu_malloc() is None:
                raise RuntimeError("the C library is not glibc: tune_cpu_malloc changes nothing here")
            for case, (fn, n) in calls.items():
                out = [fn() for _ in range(2)][-1]  # warm-up
                f0, times = faults(), []
                for _ in range(n):
                    t0 = time.perf_counter()
                    fn()
                    times.append((time.perf_counter() - t0) * 1e3)
                measured[case, side] = (out, statistics.median(times), (faults() - f0) / n, n)
    rows = []
    for case in calls:
        ref_ms = measured[case, "defaults"][1]
        for side in ("defaults", "tuned"):
            out, ms, nf, n = measured[case, side]
            rows.append({"case": f"small {case} {grid * 16}px", "impl": f"malloc-{side}", "median_ms": ms,
                         "repeats": n, "page_faults_per_call": nf, "speedup_vs_defaults": ref_ms / ms,
                         "tokens_equal": bool(torch.equal(out, measured[case, "defaults"][0]))})
    print_table(rows, ["case", "impl", "median_ms", "page_faults_per_call", "speedup_vs_defaults", "tokens_equal"])
    extra = {"threads": torch.get_num_threads(), "quick": quick, "tuned": cpu_malloc_settings(),
             "method": "one process, one model and engine per case; glibc's default malloc thresholds first, "
                       "then tune_cpu_malloc; medians after 2 warm-up calls per side; minor page faults from "
                       "getrusage over the timed calls"}
    return write_results("e2e_malloc", rows, "cpu", out_dir, extra=extra,
                         plot=("case", "speedup_vs_defaults", "impl"), quick=quick)


def _interleaved(calls: dict, n: int, before=None) -> dict:
    """Median ms of each of `calls` (name -> call), called in turn n times, the order turning every round
    (A, B, C; B, C, A; ...) so that no side always runs after the same one (and reads what it left in the
    cache); `before(name)`, if given, runs untimed before each call."""
    return {name: st["median_ms"] for name, st in time_interleaved(calls, warmup=0, repeats=n, before=before).items()}


def _side_rows(calls: dict, out: dict, grid: int, base: str, ref: str, speedup: str, equal: str,
               before=None) -> list[dict]:
    """Rows of a comparison of sides (`calls`: side -> `_cpu_calls`; `out`: side -> case -> the tokens of
    its first call): each case's sides timed in turn (`_interleaved`), medians; column `speedup` against
    side `base`, column `equal` whether the tokens equal side `ref`'s."""
    rows = []
    for case, (_, n) in calls[base].items():
        med = _interleaved({side: calls[side][case][0] for side in calls}, n, before=before)
        for side in calls:
            rows.append({"case": f"small {case} {grid * 16}px", "impl": side, "median_ms": med[side], "repeats": n,
                         speedup: med[base] / med[side], equal: bool(torch.equal(out[side][case], out[ref][case]))})
    return rows


def compare_bf16_model(quick: bool = False, out_dir="benchmarks/results", grid: int | None = None,
                       repeats: int | None = None):
    """CPU: the small config as a bfloat16 model, its decode steps through its modules (bfloat16
    arithmetic; ops.decoder.NATIVE_STEP off) and through the native step (the default: bfloat16 weights
    and cache read as they are, float32 sums), and the same weights as a float32 model on its native
    step; one engine per case and side, called in turn, medians. The bfloat16 model's two sides compute
    differently, so their tokens may differ; the native step's parallel chunk must equal its sequential
    one."""
    from worldvla.ops import decoder as decoder_op

    tune_cpu_malloc()  # as WorldVLAPolicy does on the CPU
    grid = grid or (4 if quick else 16)
    half = build_model("small", torch.device("cpu"), torch.bfloat16)
    full = build_model("small", torch.device("cpu"), torch.float32)
    full.load_state_dict(half.state_dict())  # the same (bfloat16) values
    n_rep = repeats or (3 if quick else 10)
    sides = {"bf16-modules": (half, False), "bf16-native-step": (half, True), "float32-native-step": (full, True)}
    calls = {side: _cpu_calls(grid, n_rep, model) for side, (model, _) in sides.items()}
    saved, rows = decoder_op.NATIVE_STEP, []

    def use(side):
        decoder_op.NATIVE_STEP = sides[side][1]

    try:
        with torch.no_grad():
            out = {}
            for side in sides:
                use(side)
                out[side] = {case: fn() for case, (fn, _) in calls[side].items()}
            seq, par = "action_chunk K5 sequential", "action_chunk K5 parallel"
            if not torch.equal(out["bf16-native-step"][seq], out["bf16-native-step"][par]):
                raise RuntimeError("the bfloat16 model's parallel chunk differs from its sequential one")
            rows = _side_rows(calls, out, grid, "bf16-modules", "float32-native-step", "speedup_vs_bf16_modules",
                              "tokens_equal_float32", before=use)
    finally:
        decoder_op.NATIVE_STEP = saved
    print_table(rows, ["case", "impl", "median_ms", "speedup_vs_bf16_modules", "tokens_equal_float32"])
    extra = {"threads": torch.get_num_threads(), "quick": quick,
             "method": "the small config in bfloat16 with its decode steps on its modules or on the native step, "
                       "and its values as a float32 model; one engine per case and side, called in turn, medians; "
                       "prefills on the modules (bfloat16 GEMMs) for the bfloat16 model"}
    return write_results("e2e_bf16_model", rows, "cpu", out_dir, extra=extra,
                         plot=("case", "speedup_vs_bf16_modules", "impl"), quick=quick)


def compare_bf16_steps(config: str = "chameleon_7b", quick: bool = False, out_dir="benchmarks/results",
                       grid: int | None = None, repeats: int | None = None):
    """CPU: one decode step of 1, 2 and 5 rows of a bfloat16 model after a prompt's prefill, on the native
    step and on the modules (ops.decoder.NATIVE_STEP), called in turn, medians; with the prefill's time
    and the rate at which each side reads the projection weights. For configs too large to decode whole
    chunks in a benchmark's time here (the 7B model in bfloat16 needs about 15 GB of memory)."""
    from worldvla.ops import decoder as decoder_op

    tune_cpu_malloc()  # as WorldVLAPolicy does on the CPU
    grid = grid or (4 if quick else 16)
    n_rep = repeats or (3 if quick else 5)
    t0 = time.perf_counter()
    model = build_model(config, torch.device("cpu"), torch.bfloat16)
    built_s = time.perf_counter() - t0
    gen = torch.Generator().manual_seed(0)
    prompt = action_prompt(grid, gen)
    P = prompt.numel()
    proj_bytes = sum(p.numel() * p.element_size() for n, p in model.model.layers.named_parameters()
                     if n.endswith("proj.weight"))
    saved, rows = decoder_op.NATIVE_STEP, []
    try:
        with torch.no_grad():
            engine = make_engine(model, [prompt], 5, ACTION_DIM, LAYOUT)
            t0 = time.perf_counter()
            engine.prefill([prompt])
            prefill_s = time.perf_counter() - t0
            for q in (1, 2, 5):
                buf = engine.buffers(q)
                buf.ids.copy_(torch.randint(LAYOUT.text_base, LAYOUT.vocab_size, (1, q), generator=gen))
                buf.set_positions(torch.arange(P, P + q).view(1, q))
                engine.set_kv_len([P + q])  # the step rewrites the same slots each time
                sides = {"native-step": True, "modules": False}

                def use(side):
                    decoder_op.NATIVE_STEP = sides[side]

                out = {}
                for side in sides:  # warm-up (the plan is made), and each side's hidden states
                    use(side)
                    out[side] = engine.run(buf).float().clone()
                if engine.buffers(q).plan is None or engine.buffers(q).plan.step is None:
                    raise RuntimeError("the native step did not take the bfloat16 model: "
                                       f"{getattr(engine.buffers(q).plan, 'reason', None)}")
                med = _interleaved(dict.fromkeys(sides, lambda: engine.run(buf)), n_rep, before=use)
                diff = (out["native-step"] - out["modules"]).norm() / out["modules"].norm()
                for side in sides:
                    rows.append({"case": f"{config} bf16 step {q} row{'s' * (q > 1)}", "impl": side,
                                 "median_ms": med[side], "repeats": n_rep,
                                 "speedup_vs_modules": med["modules"] / med[side],
                                 "weights_GB_per_s": proj_bytes / med[side] / 1e6,
                                 "relative_difference": float(diff)})
    finally:
        decoder_op.NATIVE_STEP = saved
    print(f"{config} in bfloat16: built in {built_s:.0f} s, the {P}-token prompt's prefill {prefill_s:.2f} s")
    print_table(rows, ["case", "impl", "median_ms", "speedup_vs_modules", "weights_GB_per_s", "relative_difference"])
    extra = {"threads": torch.get_num_threads(), "quick": quick, "config": config, "prompt_tokens": P,
             "prefill_s": prefill_s, "projection_bytes": proj_bytes,
             "method": "random bfloat16 weights; one engine, one prefill; a decode step of q rows after the prompt "
                       "(the same slots rewritten) on the native step and on the modules, called in turn, medians; "
                       "relative_difference: |native - modules| / |modules| of the step's hidden states"}
    return write_results(f"e2e_bf16_steps_{config}", rows, "cpu", out_dir, extra=extra,
                         plot=("case", "speedup_vs_modules", "impl"), quick=quick)


def compare_bf16_weights(quick: bool = False, out_dir="benchmarks/results", grid: int | None = None,
                         repeats: int | None = None):
    """CPU: the small config with every weight rounded to bfloat16 (as a bfloat16 checkpoint loaded as
    float32), its decode steps' native plans made with and without bfloat16 copies of the projections
    (ops.decoder.BF16_EXACT_WEIGHTS), on separate engines called alternately; medians, and the tokens,
    which must be equal."""
    from worldvla.ops import decoder as decoder_op
    from worldvla.ops import native_backend

    tune_cpu_malloc()  # as WorldVLAPolicy does on the CPU
    grid = grid or (4 if quick else 16)
    model = build_model("small", torch.device("cpu"), torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.bfloat16().float())
    n_rep = repeats or (3 if quick else 10)
    sides = {"float32-weights": False, "bf16-weights": True}
    calls = {side: _cpu_calls(grid, n_rep, model) for side in sides}
    saved, rows = decoder_op.BF16_EXACT_WEIGHTS, []
    try:
        with torch.no_grad():
            out = {}
            for side, flag in sides.items():  # the plans are made (with the flag as it is then) at the first call
                decoder_op.BF16_EXACT_WEIGHTS = flag
                out[side] = {case: fn() for case, (fn, _) in calls[side].items()}
            if native_backend.bf16_projections(model) is None:
                raise RuntimeError("the plans did not take bfloat16 copies of the rounded weights")
            rows = _side_rows(calls, out, grid, "float32-weights", "float32-weights", "speedup_vs_float32",
                              "tokens_equal")
    finally:
        decoder_op.BF16_EXACT_WEIGHTS = saved
    print_table(rows, ["case", "impl", "median_ms", "speedup_vs_float32", "tokens_equal"])
    extra = {"threads": torch.get_num_threads(), "quick": quick,
             "method": "the small config's weights rounded to bfloat16 and kept as float32; one engine per case "
                       "and side, the sides' plans made with and without bfloat16 copies of the projections; "
                       "called alternately, medians"}
    return write_results("e2e_bf16_weights", rows, "cpu", out_dir, extra=extra,
                         plot=("case", "speedup_vs_float32", "impl"), quick=quick)


def compare_sampled_frames(quick: bool = False, out_dir="benchmarks/results", grid: int | None = None,
                           repeats: int | None = None):
    """CPU: a world-model frame of the small config drawn (top-k 100 at temperature 1; temperature 1 over
    every code), greedy, and greedy with classifier-free guidance (scale 3), its loop in native calls (one a frame when greedy, one an image row when
    drawn) or in Python (`inference.frames.NATIVE_FRAME_LOOP`), on one engine, the two sides called in
    turn, medians after two warm-up calls each. Every call draws from a generator seeded alike, so the
    two sides' codes must be equal."""
    from worldvla.inference import frames

    grid = grid or (4 if quick else 16)
    n = repeats or (3 if quick else 7)
    gen = torch.Generator().manual_seed(0)
    model = build_model("small", torch.device("cpu"), torch.float32)
    builder = SequenceBuilder(LAYOUT, RandomText(gen=gen), ActionTokenizer(LAYOUT))
    codes = torch.randint(0, LAYOUT.n_image_codes, (1, grid, grid), generator=gen)
    action = np.random.default_rng(0).uniform(-0.3, 0.3, (1, ACTION_DIM))
    n_frame = builder.world_prompt(codes[0], action[0]).numel() + 3 + grid * (grid + 1)
    engines = {rows: InferenceEngine(model, rows, n_frame, layout=LAYOUT) for rows in (1, 2)}  # 2: guided
    cases = {"greedy": {}, "top-k 100 T1": dict(temperature=1.0, top_k=100), "T1 all codes": dict(temperature=1.0),
             "greedy guided 3": dict(cfg_scale=3.0)}
    sides = {"native-frame-loop": True, "python-loop": False}
    saved, rows = frames.NATIVE_FRAME_LOOP, []

    def call(loop, kw):
        frames.NATIVE_FRAME_LOOP = loop
        return generate_frame_codes(model, codes, action, builder, engine=engines[2 if kw.get("cfg_scale") else 1],
                                    generator=torch.Generator().manual_seed(1), **kw)

    try:
        with torch.no_grad():
            for case, kw in cases.items():
                out = {side: [call(loop, kw) for _ in range(2)][-1] for side, loop in sides.items()}  # warm-up
                med = _interleaved({side: (lambda loop=loop, kw=kw: call(loop, kw)) for side, loop in sides.items()}, n)
                for side in sides:
                    rows.append({"case": f"small frame {case} {grid * 16}px", "impl": side, "median_ms": med[side],
                                 "repeats": n, "speedup_vs_python_loop": med["python-loop"] / med[side],
                                 "tokens_equal": bool(torch.equal(out[side], out["python-loop"]))})
    finally:
        frames.NATIVE_FRAME_LOOP = saved
    print_table(rows, ["case", "impl", "median_ms", "speedup_vs_python_loop", "tokens_equal"])
    extra = {"threads": torch.get_num_threads(), "quick": quick, "grid": grid,
             "method": "one process, one model and engine; the frame's loop in native calls or in Python, called "
                       "in turn (A, B, A, B, ...) after two warm-up calls each, medians; each call's generator "
                       "seeded alike (the Gumbel-max draw, its noise drawn an image row at a time)"}
    return write_results("e2e_sampled_frames", rows, "cpu", out_dir, extra=extra,
                         plot=("case", "speedup_vs_python_loop", "impl"), quick=quick)


def main(argv=None):
    p = argparse.ArgumentParser(prog=f"python -m {__spec__.name if __spec__ else 'benchmarks.e2e'}", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="small config, 64 px-equivalent prompts, few repeats; writes <name>-<device>-quick.json")
    p.add_argument("--device", help="cuda, cuda:N or cpu (default: cuda when available)")
    p.add_argument("--out", default="benchmarks/results",
                   help="folder for the JSON results and plots (default: %(default)s)")
    p.add_argument("--grid", type=positive_int, help="codes per image side (px = 16 x grid); default 4 quick, else 16 and 32")
    p.add_argument("--threads", type=positive_int, help="CPU intra-op threads (default: 1 with --quick, else torch's)")
    p.add_argument("--chunks", type=positive_int, nargs="+", help="actions per chunk (default: 5 10)")
    p.add_argument("--decode-paths", action="store_true",
                   help="CPU only: instead, a 5-action chunk (parallel, sequential) and a frame with the decode "
                        "steps through the layers' modules (torch's or the native few-row linear), the native "
                        "decoder layer, one native call a step or (frames) a whole loop, with the prefill on the "
                        "modules or also on the native layer, interleaved")
    p.add_argument("--tune-malloc", action="store_true",
                   help="CPU: tune glibc's malloc first (tune_cpu_malloc), as WorldVLAPolicy does")
    p.add_argument("--malloc", action="store_true",
                   help="CPU only: instead, the same 5-action chunks and frame under glibc's default malloc "
                        "thresholds, then tuned (tune_cpu_malloc, as WorldVLAPolicy does): latency and page faults")
    p.add_argument("--bf16-weights", action="store_true",
                   help="CPU only: instead, the same calls with the model's weights rounded to bfloat16 (a bfloat16 "
                        "checkpoint loaded as float32), decode steps streaming float32 or bfloat16 copies")
    p.add_argument("--bf16-model", action="store_true",
                   help="CPU only: instead, the same calls on a bfloat16 model with its decode steps through its "
                        "modules or the native step, and on the same values as a float32 model")
    p.add_argument("--sampled-frames", action="store_true",
                   help="CPU only: instead, a frame drawn (top-k 100; temperature 1 over every code), greedy and guided, "
                        "its loop in native calls or in Python, interleaved; the codes must be equal")
    p.add_argument("--bf16-steps", metavar="CONFIG", choices=("chameleon_7b", "small"),
                   help="CPU only: instead, single decode steps (1, 2, 5 rows) of CONFIG in bfloat16 after a prefill, "
                        "on the native step and on the modules (chameleon_7b: about 15 GB of memory, minutes)")
    a = p.parse_args(argv)
    if a.bf16_steps:
        if a.device not in (None, "cpu"):
            p.error("--bf16-steps compares CPU settings; leave --device unset or cpu")
        if a.threads:
            torch.set_num_threads(a.threads)
        print(compare_bf16_steps(a.bf16_steps, a.quick, a.out, grid=a.grid))
        return
    for flag, compare in (("malloc", compare_malloc), ("decode_paths", compare_decode_paths),
                          ("bf16_weights", compare_bf16_weights), ("bf16_model", compare_bf16_model),
                          ("sampled_frames", compare_sampled_frames)):
        if getattr(a, flag):  # CPU comparisons instead of the latency table
            if a.device not in (None, "cpu"):
                p.error(f"--{flag.replace('_', '-')} compares CPU settings; leave --device unset or cpu")
            if a.threads:
                torch.set_num_threads(a.threads)
            print(compare(a.quick, a.out, grid=a.grid))
            return
    print(run(a.quick, a.device, a.out, grid=a.grid, chunks=tuple(a.chunks) if a.chunks else None, threads=a.threads,
              tune_malloc=a.tune_malloc))


if __name__ == "__main__":
    main()
