"""Constrained sampling over a vocabulary range (the 256 action bins) vs the full-vocabulary path
(lm_head over all 65,536 ids, fp32 softmax/argmax).

The range kernels read only the range's rows of the lm_head (2 MB at 4096 x 256 in bf16), which
would stay in L2 across repeats. Input sets rotate (common.Rotation) sized by what the range path
reads: each set's lm_head is a window of one taller weight, shifted by the range's height, so
every set's range rows are distinct memory while the full path still reads a whole vocabulary.
The sides of a case are timed interleaved (common.time_interleaved: one call of each a round, the order
turning, each call the rotation's next set), so a machine that speeds up or slows down moves them alike.
"""
from __future__ import annotations

import torch

from worldvla import VocabLayout, ops

from .common import (Rotation, load_average, main_for, print_table, rotation_count, time_interleaved,
                     timed_backends, write_results)


def full_vocab_greedy(h, w, lo, hi):
    """Logits and softmax over the whole vocabulary, then the most likely id in [lo, hi)."""
    probs = torch.softmax((h @ w.t()).float(), -1)
    return probs[:, lo:hi].argmax(-1) + lo


def lm_head_windows(V: int, Hd: int, R: int, n: int, device, dtype) -> list[torch.Tensor]:
    """n lm_heads [V, Hd], windows of one random [V + (n-1) R, Hd] weight shifted by R rows each:
    any R-row range sits at distinct memory in every window, for (n-1) R extra rows, not n copies."""
    tall = torch.randn(V + (n - 1) * R, Hd, device=device, dtype=dtype) * 0.02
    return [tall[i * R:i * R + V] for i in range(n)]


def run(quick=False, device=None, out_dir="benchmarks/results"):
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_gpu = device.type == "cuda"
    dtype = torch.bfloat16 if on_gpu else torch.float32
    L = VocabLayout.chameleon()
    lo, hi = L.bin_range
    Hd, V = (4096, 65536) if on_gpu else (1024 if quick else 4096, 65536)
    R, elt = hi - lo, torch.finfo(dtype).bits // 8
    rows, load0 = [], load_average()
    for N in (1, 5, 10):
        read = (N + R) * Hd * elt  # hidden rows + the range's weight rows
        n = rotation_count(read, device, quick=quick)
        heads = lm_head_windows(V, Hd, R, n, device, dtype)
        rot = Rotation(lambda i: (torch.randn(N, Hd, device=device, dtype=dtype), heads[i]), device, n=n,
                       bytes_per_set=read)
        h, w = rot.sets[0]
        impls = {"full-vocab": lambda h, w: full_vocab_greedy(h, w, lo, hi)}
        for b in timed_backends("constrained_sample"):
            if ops.dispatch.supports("constrained_sample", b, h, w, lo, hi):
                impls[f"worldvla-{b}"] = lambda h, w, b=b: ops.constrained_sample(h, w, lo, hi, backend=b)
        ref = full_vocab_greedy(h, w, lo, hi)
        outs = {name: fn(h, w) for name, fn in impls.items()}
        stats = time_interleaved(impls, device=device, rotation=rot, warmup=2 if quick else 5,
                                 repeats=5 if quick else 50, gpu_time=on_gpu)
        base = stats["full-vocab"]["median_ms"]
        for name, t in stats.items():
            out = outs[name]
            rows.append({"rows": N, "hidden": Hd, "vocab": V, "range": R, "impl": name, **t,
                         "speedup_vs_full": base / t["median_ms"], "in_range": bool(((out >= lo) & (out < hi)).all()),
                         "agrees_with_full": float((out == ref).float().mean())})
    print_table(rows, ["rows", "hidden", "range", "impl", "median_ms", "speedup_vs_full", "rotated_sets"])
    extra = {"dtype": str(dtype), "load_average_start": load0,
             "timing": "the sides of a case interleaved (one call of each a round, the order turning), medians; "
                       "on CUDA device time"}
    return write_results("constrained_sampling", rows, device, out_dir, extra=extra,
                         plot=("rows", "speedup_vs_full", "impl"), quick=quick)


def main(argv=None):
    return main_for(run, __doc__, argv)


if __name__ == "__main__":
    main()
