"""`worldvla bench [--quick] [NAMES]`: run benchmarks and write benchmarks/results/<result>-<device>.json + PNG.

Each benchmark's result file is named after what it measures (`vq` writes
`vq_quantize-<device>.json`, `sampling` `constrained_sampling-...`, `cross_entropy`
`linear_cross_entropy-...`, `sass` `sass-<arch>.json`; the others their own name). A `--quick` run (small
shapes, few repeats: a smoke run, on any device) writes `<result>-<device>-quick.json` in the same folder,
so it never overwrites the full-size results (`sass`, a static report the same either way, writes
`sass-<arch>-quick.json`)."""
from __future__ import annotations

import importlib
import sys
import time

BENCHMARKS = {
    "attention": "chunk-masked prefill attention (forward, forward + backward) vs SDPA (dense mask: whole batch, "
                 "per document), FlexAttention, SDPA causal per document; decode attention (split-KV) vs SDPA",
    "vq": "VQ nearest-code search vs torch.cdist + argmin",
    "cross_entropy": "fused linear cross-entropy vs the naive path (time, peak memory)",
    "sampling": "constrained sampling vs full-vocabulary softmax",
    "e2e": "action-chunk and world-model frame latency vs the release-style baseline",
    "train": "training tokens/s, MFU and peak memory vs the reference-style path",
    "serve_load": "policy server under concurrent load: p50/p99 latency, overhead per request (round trip less the policy's time)",
    "cpu_ops": "C++ CPU paths vs torch on the CPU (prefill and decode attention, sampling, VQ search and gather, "
               "few-row linear, whole decoder layers): the CPU auto order",
    "sass": "static report of the CUDA kernels (registers, spills, hot-loop SASS); needs nvcc, not a GPU",
}


def add_arguments(p):
    p.add_argument("names", nargs="*", metavar="NAME",
                   help="benchmarks to run, each once (default: all): "
                        + ", ".join(f"{k} ({v})" for k, v in BENCHMARKS.items()))
    p.add_argument("--quick", action="store_true",
                   help="small shapes and few repeats (a smoke run, on any device); writes "
                        "<result>-<device>-quick.json")
    p.add_argument("--device", help="cuda, cuda:N or cpu (default: cuda when available)")
    p.add_argument("--out", default="benchmarks/results",
                   help="folder for the JSON results and plots, relative to the current folder (default: %(default)s)")


def benchmark_module(name: str):
    """The benchmark's module: the installed package's, or the source checkout's `benchmarks/` where the
    package has none. A module the benchmark itself imports and cannot find is that error, not this one."""
    try:
        return importlib.import_module(f"worldvla.benchmarks.{name}")
    except ModuleNotFoundError as e:
        if e.name not in ("worldvla.benchmarks", f"worldvla.benchmarks.{name}"):
            raise
    return importlib.import_module(f"benchmarks.{name}")


def run(args) -> int:
    names = list(dict.fromkeys(args.names)) or list(BENCHMARKS)  # a name given twice runs once
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        print(f"worldvla bench: error: unknown benchmark(s) {unknown}; choose from {list(BENCHMARKS)}",
              file=sys.stderr)
        return 2
    if args.device is not None:
        from .devices import torch_device

        torch_device(args.device)  # a GPU that is not here: one line, before any benchmark starts
    failed, skipped = [], []
    # What a Ctrl-C leaves: cli's one line names the benchmarks that finished and the command for the rest.
    args.finished, args.remaining = [], list(names)
    for i, name in enumerate(names):
        args.remaining = names[i:]
        # Flushed at each benchmark's start and end: into a log (a GPU script's), under a time limit whose
        # SIGTERM ends the process unflushed, stdout would otherwise lose every finished benchmark's lines.
        print(f"\n== {name}: {BENCHMARKS[name]}", flush=True)
        t0 = time.time()
        unavailable = ()  # a benchmark's "cannot run here", not a failure
        try:
            mod = benchmark_module(name)
            unavailable = getattr(mod, "Unavailable", ())
            path = mod.run(quick=args.quick, device=args.device, out_dir=args.out)
            print(f"-> {path} ({time.time() - t0:.1f} s)", flush=True)
            args.finished.append(name)
        except Exception as e:  # noqa: BLE001 - one failing benchmark (its import too) must not hide the others
            if unavailable and isinstance(e, unavailable):
                print(f"-- {name} skipped: {e}", flush=True)
                skipped.append(name)
            else:
                print(f"!! {name} failed: {type(e).__name__}: {e}", flush=True)
                failed.append(name)
    if skipped and len(skipped) == len(names):  # not a failure (a benchmark that cannot run here), but say so
        print(f"worldvla bench: nothing ran: every benchmark asked for ({', '.join(skipped)}) cannot run here and "
              f"was skipped, so no result was written; see the reasons above", file=sys.stderr)
    return 1 if failed else 0
