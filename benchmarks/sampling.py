"""Constrained sampling over a vocabulary range (the 256 action bins) vs the full-vocabulary path
(lm_head over all 65,536 ids, fp32 softmax/argmax)."""
from __future__ import annotations

import torch

from worldvla import VocabLayout, ops

from .common import main_for, print_table, time_fn, write_results


def full_vocab_greedy(h, w, lo, hi):
    logits = (h @ w.t()).float()
    return torch.softmax(logits, -1).argmax(-1)


def run(quick=False, device=None, out_dir="benchmarks/results"):
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_gpu = device.type == "cuda"
    dtype = torch.bfloat16 if on_gpu else torch.float32
    L = VocabLayout.chameleon()
    lo, hi = L.bin_range
    Hd, V = (4096, 65536) if on_gpu else (1024 if quick else 4096, 65536)
    rows = []
    for N in (1, 5, 10):
        h = torch.randn(N, Hd, device=device, dtype=dtype)
        w = torch.randn(V, Hd, device=device, dtype=dtype) * 0.02
        impls = {"full-vocab": lambda: full_vocab_greedy(h, w, lo, hi)}
        for b in ops.dispatch.available("constrained_sample"):
            if ops.dispatch.supports("constrained_sample", b, h, w, lo, hi):
                impls[f"worldvla-{b}"] = lambda b=b: ops.constrained_sample(h, w, lo, hi, backend=b)
        base = None
        for name, fn in impls.items():
            t = time_fn(fn, device=device, warmup=2 if quick else 5, repeats=5 if quick else 50)
            base = base or t["median_ms"]
            rows.append({"rows": N, "hidden": Hd, "vocab": V, "range": hi - lo, "impl": name, **t,
                         "speedup_vs_full": base / t["median_ms"]})
    print_table(rows, ["rows", "hidden", "range", "impl", "median_ms", "speedup_vs_full"])
    return write_results("constrained_sampling", rows, device, out_dir, extra={"dtype": str(dtype)},
                         plot=("rows", "speedup_vs_full", "impl"))


def main(argv=None):
    return main_for(run, __doc__, argv)


if __name__ == "__main__":
    main()
