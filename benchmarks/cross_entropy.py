"""Fused linear cross-entropy vs the naive path (fp32 logits for every labelled row, then weighted CE +
z-loss): time and peak memory of forward + backward. Inputs rotate (common.Rotation) like every
kernel benchmark; at the GPU sizes one set already exceeds L2, so it is one set there.

Both sides are timed the same way (interleaved by `time_interleaved`: one call of each a round, the order
turning, each call the same rotation's next set; device time on CUDA) and neither
synchronizes the host inside the timed call: the naive side's labelled rows are found with each
input set (outside the timer) and taken with `index_select`, as `worldvla train` hands the model
its `label_rows`; `linear_cross_entropy_ref`'s boolean `hidden[valid]` would wait for the device.
"""
from __future__ import annotations

import torch

from worldvla import ops
from worldvla.ops.cross_entropy import float32_or_wider, linear_cross_entropy_ref, logits_cross_entropy

from .common import (Rotation, load_average, main_for, peak_memory, peak_memory_method, print_table,
                     time_interleaved, timed_backends, write_results)

Z_WEIGHT = 1e-5


def naive_linear_cross_entropy(h, w, y, rows, class_weight, z_weight=Z_WEIGHT):
    """`linear_cross_entropy_ref` with the labelled rows given (`rows`: their indices, found beforehand):
    fp32 logits [len(rows), V], then weighted CE + z-loss. No host synchronization."""
    return logits_cross_entropy(float32_or_wider(h.index_select(0, rows) @ w.t()), y.index_select(0, rows),
                                class_weight, z_weight)


def run(quick=False, device=None, out_dir="benchmarks/results"):
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_gpu = device.type == "cuda"
    dtype = torch.bfloat16 if on_gpu else torch.float32
    # (labelled tokens, hidden, vocab): 7B head over the full 65,536 vocabulary; a small config on CPU.
    cases = [(8192, 4096, 65536), (16384, 4096, 65536)] if on_gpu else [(512 if not quick else 128, 256, 8192)]
    rows, load0 = [], load_average()
    for N, Hd, V in cases:
        def make(i, N=N, Hd=Hd, V=V):
            h = (torch.randn(N, Hd, device=device, dtype=dtype) * 0.5).requires_grad_()
            w = (torch.randn(V, Hd, device=device, dtype=dtype) * 0.02).requires_grad_()
            y = torch.randint(0, V, (N,), device=device)
            return h, w, y, (y != -100).nonzero().squeeze(1)  # the labelled rows, found here, untimed

        rot = Rotation(make, device, quick=quick)
        h, w, y, labelled = rot.sets[0]
        cw = torch.ones(V, device=device)
        cw[4:8196] = 0.04
        impls = {"naive": lambda h, w, y, rows: naive_linear_cross_entropy(h, w, y, rows, cw)}
        for b in timed_backends("linear_cross_entropy"):
            if b != "torch" and ops.dispatch.supports("linear_cross_entropy", b, h, w, y, cw, Z_WEIGHT, -100):
                impls[f"worldvla-{b}"] = lambda h, w, y, rows, b=b: ops.linear_cross_entropy(h, w, y, cw, Z_WEIGHT,
                                                                                             backend=b)
        with torch.no_grad():  # the naive side computes the reference's loss
            got, want = impls["naive"](h, w, y, labelled)[0], linear_cross_entropy_ref(h, w, y, cw, Z_WEIGHT)[0]
            torch.testing.assert_close(got, want)
        def step(h, w, y, rows, fn):
            loss, _ = fn(h, w, y, rows)
            torch.autograd.grad(loss, (h, w))

        steps = {name: (lambda h, w, y, rows, fn=fn: step(h, w, y, rows, fn)) for name, fn in impls.items()}
        stats = time_interleaved(steps, device=device, rotation=rot, warmup=1 if quick else 3,
                                 repeats=3 if quick else 20, gpu_time=on_gpu)
        mems = {name: peak_memory(lambda: fn(*rot.next()), device) for name, fn in steps.items()}  # one side at a time
        base_t, base_m = stats["naive"]["median_ms"], mems["naive"]
        for name, t in stats.items():
            mem = mems[name]
            rows.append({"N": N, "hidden": Hd, "vocab": V, "impl": name, **t, "peak_bytes": mem,
                         "time_vs_naive": t["median_ms"] / base_t,
                         "memory_vs_naive": (mem / base_m) if (mem and base_m) else None})
    print_table(rows, ["N", "hidden", "vocab", "impl", "median_ms", "time_vs_naive", "peak_bytes", "memory_vs_naive",
                       "rotated_sets"])
    extra = {"dtype": str(dtype), "peak_memory_method": peak_memory_method(device), "load_average_start": load0,
             "timing": "the sides interleaved (one call of each a round, the order turning), medians; on CUDA device "
                       "time; peak memory afterwards, one side at a time",
             "naive": "fp32 logits of the labelled rows (index_select with indices found outside the timer), "
                      "weighted CE + z-loss, autograd backward"}
    return write_results("linear_cross_entropy", rows, device, out_dir, extra=extra,
                         plot=("N", "median_ms", "impl"), quick=quick)


def main(argv=None):
    return main_for(run, __doc__, argv)


if __name__ == "__main__":
    main()
