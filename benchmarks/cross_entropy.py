"""Fused linear cross-entropy vs the naive path (fp32 logits for every labelled row, then weighted CE +
z-loss): time and peak memory of forward + backward. Inputs rotate (common.Rotation) like every
kernel benchmark; at the GPU sizes one set already exceeds L2, so it is one set there.

Both sides are timed the same way (interleaved by `time_interleaved`: one call of each a round, the order
turning, each call the same rotation's next set; device time on CUDA) and neither
synchronizes the host inside the timed call: the naive side's labelled rows are found with each
input set (outside the timer) and taken with `index_select`, as `worldvla train` hands the model
its `label_rows`; `linear_cross_entropy_ref`'s boolean `hidden[valid]` would wait for the device.

Before the timing, every side's loss and gradients (hidden, head) on the first input set are checked against
the loss computed in float64 (`reference64`, in row chunks so that its logits stay near 1 GiB) under the
package's rule (tests/test_triton_losses.py): each error at most 2x the error of the same computation in
PyTorch at the inputs' precision (`linear_cross_entropy_ref` on them), plus a few float32 eps of the
reference's largest magnitude for float32 results (`matches_reference`, `max_abs_err`, `torch_max_abs_err`,
`worst_over_tolerance` in each row). A side that does not match is still timed and recorded, and the run
fails once its JSON is written; a side that raises in the check is not timed, its row recording the error
(`error`).
"""
from __future__ import annotations

import math

import torch

from worldvla import ops
from worldvla.ops.cross_entropy import float32_or_wider, linear_cross_entropy_ref, logits_cross_entropy

from .common import (Rotation, bound_errors, load_average, main_for, peak_memory, peak_memory_method,
                     print_table, time_interleaved, timed_backends, write_results)

Z_WEIGHT = 1e-5
F32_EPS = torch.finfo(torch.float32).eps
FP32_FLOOR_EPS = 4  # float32 results: slack of a few float32 eps of the reference's largest magnitude
QUANTITIES = ("loss", "grad_hidden", "grad_weight")


def naive_linear_cross_entropy(h, w, y, rows, class_weight, z_weight=Z_WEIGHT):
    """`linear_cross_entropy_ref` with the labelled rows given (`rows`: their indices, found beforehand):
    fp32 logits [len(rows), V], then weighted CE + z-loss. No host synchronization."""
    return logits_cross_entropy(float32_or_wider(h.index_select(0, rows) @ w.t()), y.index_select(0, rows),
                                class_weight, z_weight)


def reference64(h, w, y, class_weight, z_weight=Z_WEIGHT, ignore_index=-100, chunk_bytes=1 << 30):
    """linear_cross_entropy_ref's loss in float64 and its gradients (hidden, weight), the labelled rows taken a
    chunk at a time (logits [chunk, V] of about `chunk_bytes`): the loss is a sum over rows once the class
    weights' total and the row count are known, so the chunks' gradients add up to the whole one's."""
    h64, w64 = h.detach().double(), w.detach().double().requires_grad_()
    y = y.long()
    valid = (y != ignore_index).nonzero().squeeze(1)
    n, V = valid.numel(), w64.shape[0]
    wt = class_weight.double()[y[valid]] if class_weight is not None else torch.ones(n, dtype=torch.float64,
                                                                                    device=h64.device)
    w_sum = wt.sum()
    w_sum = torch.where(w_sum > 0, w_sum, torch.ones_like(w_sum))  # as the reference: no label weighs -> CE term 0
    loss, gh, gw = torch.zeros((), dtype=torch.float64, device=h64.device), torch.zeros_like(h64), torch.zeros_like(w64)
    step = max(1, chunk_bytes // (V * 8))
    for a in range(0, n, step):
        rows = valid[a:a + step]
        with torch.enable_grad():
            hc = h64.index_select(0, rows).requires_grad_()
            logits = hc @ w64.t()
            lse = torch.logsumexp(logits, dim=-1)
            ce = lse - logits.gather(1, y[rows].unsqueeze(1)).squeeze(1)
            part = (wt[a:a + step] * ce).sum() / w_sum + z_weight * (lse * lse).sum() / n
            dh, dw = torch.autograd.grad(part, (hc, w64))
        gh.index_copy_(0, rows, dh)
        gw += dw
        loss += part.detach()
        del logits, lse, ce, part, dh, dw
    return loss, gh, gw


def _loss_and_grads(fn, h, w, y, rows):
    with torch.enable_grad():
        loss, _ = fn(h, w, y, rows)
        return (loss.detach(), *torch.autograd.grad(loss, (h, w)))


def check_sides(impls, h, w, y, rows, class_weight) -> dict:
    """Each side's loss and gradients against `reference64` under the package's rule: error vs float64 at most
    2x the error of the same computation in PyTorch at the inputs' precision (linear_cross_entropy_ref on them),
    plus FP32_FLOOR_EPS float32 eps of the reference's largest magnitude for float32 results (common.bound_errors,
    which also wants every value finite). name -> the row's fields (`matches_reference` False for a side that does
    not match, None where the reference itself could not be computed; {"error": ...} for a side that raised,
    which the caller then leaves out of the timing)."""
    try:
        ref = reference64(h, w, y, class_weight)
        same = _loss_and_grads(lambda h, w, y, rows: linear_cross_entropy_ref(h, w, y, class_weight, Z_WEIGHT), h, w,
                               y, rows)
        base = [float((s.double() - r).abs().max()) for s, r in zip(same, ref)]
        del same
    except Exception as e:  # noqa: BLE001 - the reference (not the sides) failed, e.g. out of memory
        ref, failed = None, {"matches_reference": None, "check_error": f"{type(e).__name__}: {e}"[:200]}
    finite = lambda x: x if math.isfinite(x) else None  # noqa: E731 - JSON has no NaN or infinity
    out = {}
    for name, fn in impls.items():
        try:
            got = _loss_and_grads(fn, h, w, y, rows)
        except Exception as e:  # noqa: BLE001 - report, do not hide
            out[name] = {"error": f"{type(e).__name__}: {e}"[:200]}
            continue
        if ref is None:
            out[name] = dict(failed)
            continue
        errs, worst, ok = {}, 0.0, True
        for q, g, r, b in zip(QUANTITIES, got, ref, base):
            floor = FP32_FLOOR_EPS * F32_EPS * float(r.abs().max()) if g.dtype == torch.float32 else 0.0
            within, err, _ = bound_errors(g, r, b, floor)
            allowed = 2 * b + floor
            ok = ok and within
            worst = max(worst, err / allowed if allowed > 0 else (0.0 if err == 0 else math.inf))
            errs[q] = finite(err)
        del got
        out[name] = {"matches_reference": ok, "max_abs_err": errs,
                     "torch_max_abs_err": dict(zip(QUANTITIES, map(finite, base))),
                     "worst_over_tolerance": finite(worst)}
        if not ok:
            print(f"!! linear_cross_entropy {name}: does not match the reference ({out[name]})")
    return out


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
        # The release's image-code weight on an eighth of the vocabulary after 4 ids (its 8192 codes of 65,536 at
        # ids 4..8195), so that the weights differ between labels on the CPU's smaller vocabulary too.
        cw = torch.ones(V, device=device)
        cw[4:4 + V // 8] = 0.04
        impls = {"naive": lambda h, w, y, rows: naive_linear_cross_entropy(h, w, y, rows, cw)}
        for b in timed_backends("linear_cross_entropy"):
            if b != "torch" and ops.dispatch.supports("linear_cross_entropy", b, h, w, y, cw, Z_WEIGHT, -100):
                impls[f"worldvla-{b}"] = lambda h, w, y, rows, b=b: ops.linear_cross_entropy(h, w, y, cw, Z_WEIGHT,
                                                                                             backend=b)
        checked = check_sides(impls, h, w, y, labelled, cw)  # on the first input set, before the timing
        for name, fields in checked.items():
            if "error" in fields:  # it raised: not timed (it would raise again there), its row says why
                print(f"!! linear_cross_entropy {name}: {fields['error']}")
                del impls[name]
        if on_gpu:
            torch.cuda.empty_cache()

        def step(h, w, y, rows, fn):
            loss, _ = fn(h, w, y, rows)
            torch.autograd.grad(loss, (h, w))

        steps = {name: (lambda h, w, y, rows, fn=fn: step(h, w, y, rows, fn)) for name, fn in impls.items()}
        stats = time_interleaved(steps, device=device, rotation=rot, warmup=1 if quick else 3,
                                 repeats=3 if quick else 20, gpu_time=on_gpu) if steps else {}
        mems = {name: peak_memory(lambda: fn(*rot.next()), device) for name, fn in steps.items()}  # one side at a time
        base_t, base_m = stats.get("naive", {}).get("median_ms"), mems.get("naive")
        for name, fields in checked.items():
            if name not in stats:  # raised in its check: the row says why, nothing timed
                rows.append({"N": N, "hidden": Hd, "vocab": V, "impl": name, **fields})
                continue
            t, mem = stats[name], mems[name]
            rows.append({"N": N, "hidden": Hd, "vocab": V, "impl": name, **t, "peak_bytes": mem,
                         "time_vs_naive": t["median_ms"] / base_t if base_t else None,
                         "memory_vs_naive": (mem / base_m) if (mem and base_m) else None, **fields})
    print_table(rows, ["N", "hidden", "vocab", "impl", "median_ms", "time_vs_naive", "peak_bytes", "memory_vs_naive",
                       "rotated_sets", "worst_over_tolerance", "matches_reference"])
    extra = {"dtype": str(dtype), "peak_memory_method": peak_memory_method(device), "load_average_start": load0,
             "timing": "the sides interleaved (one call of each a round, the order turning), medians; on CUDA device "
                       "time; peak memory afterwards, one side at a time",
             "naive": "fp32 logits of the labelled rows (index_select with indices found outside the timer), "
                      "weighted CE + z-loss, autograd backward",
             "check": "before timing, each side's loss and gradients (hidden, head) on the first input set against "
                      "the loss in float64 (reference64): matches_reference when every error is finite and at most "
                      "2x torch's (linear_cross_entropy_ref at the inputs' precision, torch_max_abs_err), plus "
                      f"{FP32_FLOOR_EPS} float32 eps of the reference's largest magnitude for float32 results; "
                      "worst_over_tolerance: the largest error over what the rule allows"}
    path = write_results("linear_cross_entropy", rows, device, out_dir, extra=extra,
                         plot=("N", "median_ms", "impl"), quick=quick)
    wrong = [f"N={r['N']} {r['impl']}" for r in rows if r.get("matches_reference") is False]
    if wrong:  # after the JSON is written: its rows say by how much
        raise RuntimeError(f"linear_cross_entropy: {len(wrong)} side(s) do not match the reference: "
                           f"{', '.join(wrong)} (see {path})")
    return path


def main(argv=None):
    return main_for(run, __doc__, argv)


if __name__ == "__main__":
    main()
