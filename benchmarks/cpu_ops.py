"""The C++ CPU paths against torch on the CPU: prefill and decode attention, constrained sampling, VQ
search and gather, the few-row linear of decode steps and whole decoder layers of decode steps. These
measurements decide `worldvla.ops.dispatch.AUTO_ORDER` on CPU.

Both sides run through `worldvla.ops` (dispatch, checks and allocation included: what a caller pays),
interleaved call by call (A, B, C; B, C, A; ...: the order turns every round) so that drift in the
machine's speed hits every side alike, on the same kind of random inputs (one `Rotation` shared by the
sides, each call taking its next set, so that no call reads the set the call before it left in the cache;
the sets together past the last-level cache within the rotation budget; each row records the rotation).
The C++ paths use OpenMP over torch's thread count.

Prefill FLOPs count visible pairs only (4 * H * Dh per pair). Decode attention reads K and V once:
bytes = 2 * S * Hkv * Dh * 4 (fp32), the floor at the machine's stream bandwidth. Sampling and VQ are
matmul-shaped: FLOPs = 2 * N * range * H and 2 * N * K * C. The linear is a stream over its weights at
these row counts: bytes = the weights' (the floor at memory bandwidth), FLOPs = 2 * M * weights.
A decoder layer of a decode step is counted as a stream too: bytes = its weights and the K/V cache it reads,
FLOPs = 2 * B * Q * its weights, the projections only (attention over the cache is left out: at B8 Q5 over
574 cached tokens it would add about 37%).

On AVX-512 machines the C++ kernels run 16 floats per vector; `native-w8` is the same kernels forced
to 8 (what AVX2 machines run), timed in the same rounds (not for decode, which is 8 wide everywhere,
nor for the gather, which has no vector kernel).
"""
from __future__ import annotations

from pathlib import Path

import torch

from worldvla import ops

from .attention import decode_meta, packed_batch, visible_pairs
from .common import (Rotation, load_average, main_for, print_table, rotation_count, time_interleaved,
                     write_results)
from .sampling import lm_head_windows

BACKENDS = ("torch", "native")


def _sides(call, widths: bool = True) -> dict:
    """{name: fn(*args)} for torch and the C++ path, and the C++ path at 8 wide where the CPU runs 16
    (`widths`: only for ops whose kernels follow the width; decode and the gather do not)."""
    from worldvla import _C

    fns = {b: (lambda *a, b=b: call(b, *a)) for b in BACKENDS}
    if widths and _C.cpu_vector_width() == 16:
        def narrow(*a):
            _C.set_cpu_vector_width(8)
            try:
                return call("native", *a)
            finally:
                _C.set_cpu_vector_width(16)

        fns["native-w8"] = narrow
    return fns


def interleaved(fns: dict, rotation: Rotation, warmup: int, repeats: int) -> dict:
    """time_interleaved's statistics per backend (median, p10, p90, ...), calls interleaved. Every call takes
    the rotation's next input set, and the sides' order turns every round: handing one set to the sides in
    a fixed order let the later sides read what the first had just pulled into the cache (a decode case
    read 1.6x for the C++ path with torch first, 1.1x with it first)."""
    return time_interleaved(fns, warmup=warmup, repeats=repeats, rotation=rotation)


# A row's repeats and spread, as `common._stats` names them: p10 / p90 from PERCENTILE_MIN_REPEATS repeats on, the
# fastest and slowest below (the quick run's 5- and 10-repeat cases, whose p10 and p90 would be just those).
SPREAD_FIELDS = ("repeats", "p10_ms", "p90_ms", "p90_over_p10", "min_ms", "max_ms", "max_over_min")


def _rows(op, case, stats, work: dict, rotation: Rotation) -> list[dict]:
    rows = []
    for name, st in stats.items():
        ms = st["median_ms"]
        row = {"op": op, "case": case, "impl": f"worldvla-{name}", "median_ms": ms,
               **{k: st[k] for k in SPREAD_FIELDS if k in st},
               "speedup_vs_torch": stats["torch"]["median_ms"] / ms, **rotation.info()}
        if "bytes" in work:
            row["GBps"] = work["bytes"] / (ms * 1e-3) / 1e9
        if "flops" in work:
            row["GFLOPs"] = work["flops"] / (ms * 1e-3) / 1e9
        rows.append(row)
    return rows


def sampling_rotation(N: int, Hd: int, V: int, R: int, gen, quick: bool) -> Rotation:
    """Input sets (hidden [N, Hd], lm_head [V, Hd]) of a choice over the last R ids. A call reads the hidden
    rows and the range's R rows of the lm_head, not all V: the sets are sized by those bytes, each set's
    lm_head a window of one taller weight shifted by R rows (sampling.lm_head_windows), so that every set's
    range is distinct memory without a whole lm_head per set. (Sized by whole lm_heads, 3 sets of 32 MB
    passed for past the cache while the ranges they read, 3 x 1 MB, stayed in it.)"""
    read = (N + R) * Hd * 4
    n = rotation_count(read, "cpu", quick=quick)
    heads = lm_head_windows(V, Hd, R, n, "cpu", torch.float32)
    return Rotation(lambda i: (torch.randn(N, Hd, generator=gen), heads[i]), n=n, bytes_per_set=read)


def gather_rotation(B: int, h: int, K: int, C: int, gen, quick: bool) -> Rotation:
    """Input sets (indices [B, h, h], codebook [K, C]) of a gather. A call reads B*h*h rows of the codebook
    and the indices, not all K rows: the sets are sized by those bytes, each set's codebook a window of one
    taller table shifted by B*h*h rows and its indices a random permutation of the window's last B*h*h codes,
    distinct memory in every set (whole rows of C floats are read, so their order counts, not their spread
    over the table). (Sized by whole codebooks, 12 sets of 8 MB passed for past the cache while the rows they
    read, 12 x 256 KB, stayed in it.) Small sets need more than ROTATION_MAX_SETS to cover the cache."""
    rows = B * h * h
    if rows > K:
        raise ValueError(f"a gather of {rows} distinct rows needs at least as many codes, got K={K}")
    read = rows * (C * 4 + 8)
    n = rotation_count(read, "cpu", quick=quick, max_sets=8192)
    tables = lm_head_windows(K, C, rows, n, "cpu", torch.float32)
    return Rotation(lambda i: ((K - rows + torch.randperm(rows, generator=gen)).view(B, h, h), tables[i]), n=n,
                    bytes_per_set=read)


class Unavailable(ValueError):
    """Asked for on another device than the CPU: `worldvla bench --device cuda` (every benchmark) skips it."""


def run(quick: bool = False, device=None, out_dir="benchmarks/results"):
    if device is not None and torch.device(device).type != "cpu":
        raise Unavailable(f"cpu_ops measures the C++ CPU paths; run it with --device cpu (got {device})")
    if "native" not in ops.dispatch.available("decode_attention"):
        raise RuntimeError("the native backend is not built here (pip install .)")
    gen = torch.Generator().manual_seed(0)
    warmup, repeats = (3, 20) if quick else (10, 200)
    rows, load0 = [], load_average()

    for H, D, T in ([(4, 64, 650)] if quick else [(4, 64, 650), (4, 64, 1300), (32, 128, 650)]):
        _, meta = packed_batch(256, T, gen)  # 620-token action documents, packed
        T = meta.kv_block.shape[0]
        rot = Rotation(lambda i: tuple(torch.randn(T, H, D, generator=gen) for _ in range(3)), quick=quick)
        fns = _sides(lambda b, q, k, v: ops.masked_attention(q, k, v, meta, backend=b))
        st = interleaved(fns, rot, 2, 5 if quick else 20)
        rows += _rows("masked_attention", f"prefill H{H} Dh{D} {T} tokens", st,
                      {"flops": 4 * H * D * visible_pairs(meta)}, rot)

    heads = [(4, 64), (32, 64)] if quick else [(4, 64), (32, 64), (32, 128)]
    for H, D in heads:
        for K in ((5, 1) if quick or H > 4 else (5, 1, None)):  # None: every row, the engine's prefill
            meta = decode_meta(256, K, 1, gen)
            S = meta.kv_block.shape[1]
            K = meta.q_pos.shape[1]
            rot = Rotation(lambda i: (torch.randn(1, K, H, D, generator=gen), torch.randn(1, S, H, D, generator=gen),
                                      torch.randn(1, S, H, D, generator=gen)), quick=quick)
            many = K > 32  # the prefill's tiled kernel, at either vector width
            fns = _sides(lambda b, q, k, v: ops.decode_attention(q, k, v, meta, backend=b), widths=many)
            st = interleaved(fns, rot, warmup, repeats // 4 if many else repeats)
            work = ({"flops": 4 * H * D * int(meta.dense_mask().sum())} if many else {"bytes": 2 * S * H * D * 4})
            rows += _rows("decode_attention", f"decode H{H} Dh{D} K{K} cache{S}", st, work, rot)

    for N, Hd, R in ([(1, 1024, 256), (5, 1024, 256)] if quick else
                     [(1, 1024, 256), (5, 1024, 256), (5, 256, 256), (35, 4096, 256)]):
        V = 8192
        rot = sampling_rotation(N, Hd, V, R, gen, quick)
        fns = _sides(lambda b, h, w: ops.constrained_sample(h, w, V - R, V, backend=b))
        st = interleaved(fns, rot, warmup, repeats)
        rows += _rows("constrained_sample", f"greedy N{N} H{Hd} range{R}", st, {"flops": 2 * N * R * Hd}, rot)

    for N, K, C in ([(16, 512, 64), (256, 2048, 256)] if quick else
                    [(16, 512, 64), (256, 2048, 256), (256, 8192, 256), (1024, 8192, 256)]):
        rot = Rotation(lambda i: (torch.randn(N, C, generator=gen), torch.randn(K, C, generator=gen)), quick=quick)
        fns = _sides(lambda b, z, cb: ops.vq_quantize(z, cb, backend=b))
        st = interleaved(fns, rot, warmup, max(10, repeats // (4 if N * K > 1e6 else 1)))
        rows += _rows("vq_quantize", f"N{N} K{K} C{C}", st, {"flops": 2 * N * K * C}, rot)

    # A decode step's 28 projections (q, k, v, o, gate, up, down of 4 layers; the small config: hidden
    # 256, MLP 688) on M rows (1: one token; 5, 10: a parallel action chunk; 40, 64: the chunks of 8 robots
    # batched by the policy server), the implementation resolved once per step as the model does. The weights cycle as in a real step (12.6 MB, past L2).
    shapes = [(256, 256)] * 4 + [(688, 256)] * 2 + [(256, 688)]
    weights = [torch.randn(N, K, generator=gen) / K ** 0.5 for _ in range(4) for N, K in shapes]
    for M in ([1, 5] if quick else [1, 2, 5, 10, 16, 40, 64]):
        rot = Rotation(lambda i: ({K: torch.randn(M, K, generator=gen) for K in (256, 688)},), n=4)

        def step(b, xs):
            fn = ops.resolve_linear(xs[256], weights[0], b)
            for w in weights:
                fn(xs[w.shape[1]], w)

        st = interleaved(_sides(step), rot, warmup, max(10, repeats // 4))
        rows += _rows("linear", f"decode-step projections M{M} (28, small config)", st,
                      {"bytes": sum(w.numel() * 4 for w in weights), "flops": sum(2 * M * w.numel() for w in weights)},
                      rot)

    # A decode step's 4 decoder layers (small config, random weights) against a 574-token cache (a 256 px
    # action prompt): the layers' modules (each op through worldvla.ops under auto) against the native
    # layer, one C++ call each. Q rows per sequence: 1 (one token), 5 and 10 (parallel action chunks),
    # 8 sequences x 5 (the policy server's batch of 8 robots).
    from worldvla.mask import NO_BLOCK, DecodeMeta
    from worldvla.model import ForwardContext, KVCache, ModelConfig, WorldVLA, rope_cos_sin

    model = WorldVLA(ModelConfig.small()).init_weights(generator=gen).eval()
    cfg, S, P = model.config, 640, 574
    for B, Q in ([(1, 1), (1, 5)] if quick else [(1, 1), (1, 5), (1, 10), (8, 5)]):
        cache = KVCache(cfg, B, S)
        cache.k.normal_(generator=gen)
        cache.v.normal_(generator=gen)
        pos = P + torch.arange(Q).view(1, Q).expand(B, Q).contiguous()
        meta = DecodeMeta(pos.int(), torch.full((B, Q), -1, dtype=torch.int32),
                          torch.full((B, S), NO_BLOCK, dtype=torch.int32), torch.full((B,), P + Q, dtype=torch.int32))
        ctx = ForwardContext(cache=cache, position_ids=pos, decode_meta=meta)
        cos, sin = rope_cos_sin(pos, cfg.head_dim, cfg.rope_theta, torch.float32)
        rot = Rotation(lambda i: (torch.randn(B, Q, cfg.hidden_size, generator=gen),), n=4)

        def layers(b, x):
            fn = ops.resolve_decoder_layer(model.model.layers[0], x, ctx, b)
            for i, layer in enumerate(model.model.layers):
                x = fn(layer, x, cos, sin, ctx, i)
            return x

        with torch.no_grad():
            st = interleaved(_sides(layers), rot, warmup, max(10, repeats // 4))
        n_w = sum(p.numel() for layer in model.model.layers for p in layer.parameters())
        kv = 2 * cfg.num_hidden_layers * B * (P + Q) * cfg.num_key_value_heads * cfg.head_dim
        rows += _rows("decoder_layer", f"decode step B{B} Q{Q} cache{P} (4 layers, small config)", st,
                      {"bytes": 4 * (n_w + kv), "flops": 2 * B * Q * n_w}, rot)

    for B, h, K, C in [(1, 16, 8192, 256), (8, 4, 512, 64)]:
        rot = gather_rotation(B, h, K, C, gen, quick)
        fns = _sides(lambda b, idx, cb: ops.vq_gather(idx, cb, backend=b), widths=False)
        st = interleaved(fns, rot, warmup, repeats)
        rows += _rows("vq_gather", f"B{B} {h}x{h} K{K} C{C}", st, {"bytes": B * h * h * C * 4 * 2}, rot)

    print_table(rows, ["op", "case", "impl", "median_ms", "speedup_vs_torch", "GBps", "GFLOPs"])
    from worldvla import _C

    extra = {"threads": torch.get_num_threads(), "quick": quick, "cpu_vector_width": _C.cpu_vector_width(),
             "load_average_start": load0,
             "method": "interleaved calls through worldvla.ops, the sides' order turning every round, medians; "
                       "each call the next set of one rotation of fresh random sets shared by the sides, sized by "
                       "the bytes a call reads (constrained_sample: the hidden rows and the range's lm_head rows; "
                       "vq_gather: the indices and the codebook rows they name)"}
    path = write_results("cpu_ops", rows, "cpu", out_dir, extra=extra, quick=quick)
    plot_speedups(rows, path.with_suffix(".png"))
    return path


def plot_speedups(rows, path):
    """One horizontal bar per case: the C++ path's speed-up over torch, a line at 1 (parity)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from worldvla.checkpoint import write_atomic

    native = [r for r in rows if r["impl"] == "worldvla-native"]
    fig, ax = plt.subplots(figsize=(8, 0.32 * len(native) + 1.2))
    ys = range(len(native))[::-1]  # first case on top
    colors = ["tab:green" if r["speedup_vs_torch"] >= 1 else "tab:red" for r in native]
    ax.barh(list(ys), [r["speedup_vs_torch"] for r in native], color=colors)
    ax.set_yticks(list(ys), [f"{r['op']}: {r['case']}" for r in native], fontsize=8)
    w8 = {(r["op"], r["case"]): r["speedup_vs_torch"] for r in rows if r["impl"] == "worldvla-native-w8"}
    marks = [(w8[(r["op"], r["case"])], y) for r, y in zip(native, ys) if (r["op"], r["case"]) in w8]
    if marks:
        ax.scatter(*zip(*marks), marker="x", color="black", zorder=3,
                   label="the same kernels at 8 floats per vector (AVX2 width)")
        ax.legend(fontsize=8, loc="lower right")
    ax.axvline(1.0, color="black", linewidth=1)
    ax.set_xlabel("C++ path speed-up over torch (x; right of the line = faster)")
    ax.set_title(f"worldvla C++ CPU paths vs torch ({torch.get_num_threads()} threads)")
    fig.tight_layout()
    try:  # whole or not at all, under a temporary name of its own: a failed save keeps the last good plot
        write_atomic(Path(path), lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    finally:
        plt.close(fig)


def main(argv=None):
    return main_for(run, __doc__, argv)


if __name__ == "__main__":
    main()
