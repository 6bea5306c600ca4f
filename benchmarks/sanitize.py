"""Every GPU op of one backend once, at small shapes, against the PyTorch reference: the program
gpu_all.sh runs under compute-sanitizer (memcheck, racecheck, synccheck, initcheck).

Small and quick on purpose: a sanitizer slows every kernel by orders of magnitude, so the inputs
are drawn and the references computed on the host (float64, and at the inputs' precision for
the error bound), and the device runs little besides the kernels under test.
Error rule (as in the tests; common.bound_check): max |out - ref64| <= 2 x that of torch at the inputs'
precision, and finite.

    python -m benchmarks.sanitize [--backend native|triton] [--device cuda|cpu] [--only TEXT]

Prints one line per check and exits 1 if any failed, 2 if none ran (an --only that names no check, or checks
this backend and device skip), 0 when all that ran passed.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

if not torch.cuda.is_available():  # Triton runs its interpreter on CPU-only machines
    os.environ.setdefault("TRITON_INTERPRET", "1")

from worldvla import VocabLayout, chunk_mask_meta, ops  # noqa: E402
from worldvla.mask import NO_BLOCK, DecodeMeta  # noqa: E402

from .attention import action_document  # noqa: E402
from .common import bound_check  # noqa: E402

LAYOUT = VocabLayout.chameleon()


def gap_check(chosen, scores64, same_chosen) -> tuple[bool, str]:
    """Argmax/argmin picks judged by score: the float64 gap to the best may be at most 2x torch's."""
    rows = torch.arange(scores64.shape[0])
    best = scores64.max(1).values
    gap = (best - scores64[rows, chosen.cpu()]).max().item()
    torch_gap = (best - scores64[rows, same_chosen.cpu()]).max().item()
    ok = chosen.dtype == torch.int64 and gap <= 2 * torch_gap + 1e-9 * best.abs().max().item()
    return ok, f"gap {gap:.3g} <= 2 x {torch_gap:.3g}"


def _rand(g, *shape, dtype=torch.float32):
    return torch.randn(*shape, generator=g).to(dtype)


def check_prefill_packed(backend, dev, g):
    docs = [torch.tensor(action_document(64, gen=g)) for _ in range(2)]
    cu = torch.tensor([0] + [d.numel() for d in docs]).cumsum(0).to(torch.int32)
    meta = chunk_mask_meta(torch.cat(docs), LAYOUT, cu_seqlens=cu)
    T = int(cu[-1])
    q, k, v = _rand(g, T, 4, 64, dtype=torch.bfloat16), _rand(g, T, 2, 64, dtype=torch.bfloat16), \
        _rand(g, T, 2, 64, dtype=torch.bfloat16)
    out = ops.masked_attention(q.to(dev), k.to(dev), v.to(dev), meta.to(dev), backend=backend)
    ref = ops.masked_attention_ref(q.double(), k.double(), v.double(), meta)
    return bound_check(out, ref, ops.masked_attention_ref(q, k, v, meta, upcast=False))


def check_prefill_padded(backend, dev, g):
    ids = torch.stack([torch.tensor(action_document(64, gen=g)) for _ in range(2)])
    ids[1, -30:] = LAYOUT.pad
    meta = chunk_mask_meta(ids, LAYOUT)
    q, k, v = (_rand(g, *ids.shape, 4, 128, dtype=torch.float16) for _ in range(3))
    out = ops.masked_attention(q.to(dev), k.to(dev), v.to(dev), meta.to(dev), backend=backend)
    ref = ops.masked_attention_ref(q.double(), k.double(), v.double(), meta)
    return bound_check(out, ref, ops.masked_attention_ref(q, k, v, meta, upcast=False))


def check_prefill_backward(backend, dev, g):
    ids = torch.tensor(action_document(64, gen=g)).view(1, -1)
    meta = chunk_mask_meta(ids, LAYOUT)
    q, k, v = (_rand(g, *ids.shape, 2, 64, dtype=torch.bfloat16) for _ in range(3))
    do = _rand(g, *ids.shape, 2, 64, dtype=torch.bfloat16)

    def grads(fn, *xs):
        xs = [x.detach().requires_grad_() for x in xs]
        return torch.autograd.grad(fn(*xs), xs, do.to(xs[0].device, xs[0].dtype))

    out = grads(lambda *x: ops.masked_attention(*x, meta.to(dev), backend=backend), q.to(dev), k.to(dev), v.to(dev))
    ref = grads(lambda *x: ops.masked_attention_ref(*x, meta), q.double(), k.double(), v.double())
    same = grads(lambda *x: ops.masked_attention_ref(*x, meta, upcast=False), q, k, v)
    results = [bound_check(o, r, s) for o, r, s in zip(out, ref, same)]
    return all(ok for ok, _ in results), "; ".join(f"d{n} {m}" for n, (_, m) in zip("qkv", results))


def check_decode(backend, dev, g, n_splits=None, D=128):
    B, Q, H, Hkv, S = 2, 3, 4, 2, 150
    q, k, v = _rand(g, B, Q, H, D, dtype=torch.bfloat16), _rand(g, B, S, Hkv, D, dtype=torch.bfloat16), \
        _rand(g, B, S, Hkv, D, dtype=torch.bfloat16)
    kv_len = torch.tensor([S, 77], dtype=torch.int32)
    q_pos = torch.minimum(torch.randint(0, S, (B, Q), generator=g), (kv_len - 1).view(B, 1)).int()
    kv_block = torch.where(torch.rand(B, S, generator=g) < 0.5, torch.randint(0, 4, (B, S), generator=g),
                           torch.full((B, S), NO_BLOCK)).int()
    kv_block[torch.arange(B).view(B, 1), q_pos.long()] = NO_BLOCK  # every row sees its own key
    meta = DecodeMeta(q_pos, torch.randint(-1, 4, (B, Q), generator=g).int(), kv_block, kv_len)
    dmeta = DecodeMeta(*(t.to(dev) for t in (meta.q_pos, meta.q_limit, meta.kv_block, meta.kv_len)))
    if n_splits is None:
        out = ops.decode_attention(q.to(dev), k.to(dev), v.to(dev), dmeta, backend=backend)
    else:  # the native split-KV path with a forced split count
        from worldvla.ops import native_backend

        out = native_backend.decode_attention(q.to(dev), k.to(dev), v.to(dev), dmeta, n_splits=n_splits)
    ref = ops.decode_attention_ref(q.double(), k.double(), v.double(), meta)
    return bound_check(out, ref, ops.decode_attention_ref(q, k, v, meta, upcast=False))


def check_vq_quantize(backend, dev, g, C=64):
    z, cb = _rand(g, 300, C), _rand(g, 1000, C)
    idx = ops.vq_quantize(z.to(dev), cb.to(dev), backend=backend)
    zd, ed = z.double(), cb.double()
    neg_dist = -((zd * zd).sum(1, keepdim=True) + (ed * ed).sum(1) - 2.0 * zd @ ed.t())
    return gap_check(idx, neg_dist, ops.vq_quantize_ref(z, cb))


def check_vq_gather(backend, dev, g, C=64):
    cb = _rand(g, 1000, C)
    idx = torch.randint(0, 1000, (2, 5, 7), generator=g)
    out = ops.vq_gather(idx.to(dev), cb.to(dev), backend=backend)
    ok = torch.equal(out.cpu(), ops.vq_gather_ref(idx, cb))
    return ok, "exact" if ok else "differs from codebook[indices]"


def check_sample(backend, dev, g, sampled=False):
    """Greedy: the fused range argmax. Sampled with top_k=1: the range-logits kernel, then a draw
    that can only pick the logits' maximum."""
    lo, hi = 300, 556
    h, w = _rand(g, 5, 256, dtype=torch.bfloat16), _rand(g, 1000, 256, dtype=torch.bfloat16) * 0.05
    kw = {"temperature": 1.0, "top_k": 1, "generator": torch.Generator(dev).manual_seed(0)} if sampled else {}
    tok = ops.constrained_sample(h.to(dev), w.to(dev), lo, hi, backend=backend, **kw)
    if not bool(((tok >= lo) & (tok < hi)).all()):
        return False, f"tokens outside [{lo}, {hi}): {tok.tolist()}"
    scores = h.double() @ w[lo:hi].double().t()
    return gap_check(tok.cpu() - lo, scores, ops.constrained_sample_ref(h, w, lo, hi) - lo)


def check_linear_ce(backend, dev, g):
    N, Hd, V = 64, 128, 1000
    h, w = _rand(g, N, Hd, dtype=torch.bfloat16), _rand(g, V, Hd, dtype=torch.bfloat16) * 0.05
    y = torch.randint(0, V, (N,), generator=g)
    y[::7] = -100
    cw = torch.rand(V, generator=g) + 0.5

    def run(fn, h, w, cw):
        h, w = h.detach().requires_grad_(), w.detach().requires_grad_()
        loss, _ = fn(h, w, cw)
        return (loss.reshape(1), *torch.autograd.grad(loss, (h, w)))

    out = run(lambda h, w, cw: ops.linear_cross_entropy(h, w, y.to(dev), cw, 1e-4, backend=backend),
              h.to(dev), w.to(dev), cw.to(dev))
    ref = run(lambda h, w, cw: ops.linear_cross_entropy_ref(h, w, y, cw, 1e-4), h.double(), w.double(), cw.double())
    same = run(lambda h, w, cw: ops.linear_cross_entropy_ref(h, w, y, cw, 1e-4), h, w, cw)
    results = [bound_check(o, r, s) for o, r, s in zip(out, ref, same)]
    return all(ok for ok, _ in results), "; ".join(f"{n} {m}" for n, (_, m) in zip(("loss", "dh", "dw"), results))


def with_engine(check, engine):
    """`check` with the native CUDA prefill on one of its wgmma engines (sm_90 GPUs, sm_90a builds)."""
    def run(backend, dev, g):
        from worldvla.ops import native_backend as nb

        if engine not in nb.prefill_engines(dev.index if dev.index is not None else torch.cuda.current_device()):
            return None, f"no {engine} engine on this GPU or build"
        nb._C.set_cuda_prefill_engine(engine)
        try:
            return check(backend, dev, g)
        finally:
            nb._C.set_cuda_prefill_engine("auto")
    return run


CHECKS = {
    "masked_attention packed bf16 D=64 GQA": ("masked_attention", check_prefill_packed),
    "masked_attention padded fp16 D=128": ("masked_attention", check_prefill_padded),
    "masked_attention packed bf16 D=64 GQA, wgmma": ("masked_attention", with_engine(check_prefill_packed, "wgmma")),
    "masked_attention padded fp16 D=128, wgmma": ("masked_attention", with_engine(check_prefill_padded, "wgmma")),
    "masked_attention packed bf16 D=64 GQA, wgmma128": ("masked_attention",
                                                       with_engine(check_prefill_packed, "wgmma128")),
    "masked_attention padded fp16 D=128, wgmma128": ("masked_attention",
                                                    with_engine(check_prefill_padded, "wgmma128")),
    "masked_attention backward bf16": ("masked_attention", check_prefill_backward),
    "decode_attention bf16 D=128 GQA": ("decode_attention", check_decode),
    "decode_attention 3 splits": ("decode_attention", lambda b, d, g: check_decode(b, d, g, n_splits=3)),
    "vq_quantize fp32": ("vq_quantize", check_vq_quantize),
    "vq_gather fp32": ("vq_gather", check_vq_gather),
    # Sizes short of the Triton kernels' power-of-two tiles: their loads and stores past the last head-dim column or
    # channel are masked off, which only a memory checker sees (in range, a missing mask reads padding or writes
    # into the next row; the CPU interpreter stops only accesses past the whole buffer).
    "decode_attention bf16 D=80, below the tile": ("decode_attention", lambda b, d, g: check_decode(b, d, g, D=80)),
    "vq_quantize fp32 C=40, below the tile": ("vq_quantize", lambda b, d, g: check_vq_quantize(b, d, g, C=40)),
    "vq_gather fp32 C=40, below the tile": ("vq_gather", lambda b, d, g: check_vq_gather(b, d, g, C=40)),
    "constrained_sample greedy bf16": ("constrained_sample", check_sample),
    "constrained_sample sampled bf16": ("constrained_sample", lambda b, d, g: check_sample(b, d, g, sampled=True)),
    "linear_cross_entropy bf16": ("linear_cross_entropy", check_linear_ce),
}
CUDA_ONLY = {name for name in CHECKS if ", wgmma" in name}  # the native CUDA prefill's wgmma engines
NATIVE_ONLY = {"decode_attention 3 splits"} | CUDA_ONLY
TRITON_ONLY = {name for name in CHECKS if name.endswith("below the tile")}  # the native CUDA decode: D 64 or 128
NEEDS_GRAD = {"masked_attention backward bf16", "linear_cross_entropy bf16"}  # the native kernels are forward only


def run(backend: str = "native", device: str | None = None, only: str | None = None) -> int:
    """Run the checks (those whose name contains `only`); 1 if any failed, 2 if none ran, else 0."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    print(f"sanitize: backend {backend} on {dev} (torch {torch.__version__})", flush=True)
    failed = ran = skipped = 0
    for name, (op, check) in CHECKS.items():
        if only and only not in name:
            continue
        if backend not in ops.dispatch.available(op) or (name in NATIVE_ONLY and backend != "native") \
                or (name in NEEDS_GRAD | TRITON_ONLY and backend == "native"):
            print(f"skip  {name}: not on the {backend} backend", flush=True)
            skipped += 1
            continue
        if name in CUDA_ONLY and dev.type != "cuda":
            print(f"skip  {name}: CUDA only", flush=True)
            skipped += 1
            continue
        g = torch.Generator().manual_seed(len(name))
        try:
            ok, msg = check(backend, dev, g)
        except Exception as e:  # noqa: BLE001 - one failing op must not hide the others
            ok, msg = False, f"{type(e).__name__}: {e}"
        if ok is None:
            print(f"skip  {name}: {msg}", flush=True)
            skipped += 1
            continue
        ran += 1
        failed += not ok
        print(f"{'ok  ' if ok else 'FAIL'}  {name}: {msg}", flush=True)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    if not ran:  # no kernel launched: a smoke check whose check was renamed must not pass
        which = f"no check whose name contains {only!r}" if only else "no check"
        print(f"sanitize: nothing ran: {which} ran on the {backend} backend on {dev}", flush=True)
        return 2
    counts = f"{ran} check{'s' if ran != 1 else ''}" + (f", {skipped} skipped" if skipped else "")
    print(f"sanitize: {f'all passed ({counts})' if not failed else f'{failed} failed ({counts})'}", flush=True)
    return 1 if failed else 0


def main(argv=None):
    p = argparse.ArgumentParser(prog=f"python -m {__spec__.name if __spec__ else 'benchmarks.sanitize'}", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", default="native", choices=["native", "triton"],
                   help="whose kernels the checks launch: the compiled extension's or Triton's (default: %(default)s)")
    p.add_argument("--device", help="cuda (default when available) or cpu")
    p.add_argument("--only", help="run only the checks whose name contains this text")
    a = p.parse_args(argv)
    sys.exit(run(a.backend, a.device, a.only))


if __name__ == "__main__":
    main()
