"""Chunk-masked attention: worldvla backends vs SDPA (dense mask), FlexAttention (same rule as a
mask_mod) and SDPA's causal path, forward and forward+backward.

Documents are the release's action-model samples (about 620 tokens at 256 px, 2,200 at 512 px:
BOS, text, two images, a chunk of actions), packed into one batch of `tokens` tokens.
FLOPs count only visible (query, key) pairs: 4*H*Dh per pair forward, 2.5x that backward.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from worldvla import VocabLayout, chunk_mask_meta, ops
from worldvla.mask import causal_meta

from .common import main_for, print_table, time_fn, write_results

LAYOUT = VocabLayout.chameleon()


def action_document(image_px: int, chunk: int = 5, action_dim: int = 7, gen=None) -> list[int]:
    L = LAYOUT
    g = image_px // 16
    img = [L.boi, L.res_token(image_px // 32), L.res_token(image_px // 32)]
    for _ in range(g):
        img += torch.randint(4, 8196, (g,), generator=gen).tolist() + [L.newline]
    img += [L.eoi]
    ids = [L.bos] + torch.randint(20000, 60000, (20,), generator=gen).tolist() + img + img + [L.sep]
    for _ in range(chunk):
        ids += [L.boa] + torch.randint(L.bin_base, L.bin_base + 256, (action_dim,), generator=gen).tolist() + [L.eoa]
    return ids + [L.sep]


def packed_batch(doc_len_px: int, tokens: int, gen=None, causal: bool = False):
    docs, total = [], 0
    while True:
        d = action_document(doc_len_px, gen=gen)
        if total + len(d) > tokens:
            break
        docs.append(d)
        total += len(d)
    if not docs:  # a single document truncated to the budget
        docs, total = [action_document(doc_len_px, gen=gen)[:tokens]], tokens
    ids = torch.tensor(sum(docs, []))
    cu = torch.tensor([0] + [len(d) for d in docs]).cumsum(0).to(torch.int32)
    meta = causal_meta((len(ids),), cu_seqlens=cu) if causal else chunk_mask_meta(ids, LAYOUT, cu_seqlens=cu)
    return ids, meta


def visible_pairs(meta) -> int:
    """Exact count of visible (query, key) pairs, document by document."""
    n = 0
    cu = meta.cu_seqlens.tolist()
    for a, b in zip(cu[:-1], cu[1:]):
        sub = type(meta)(meta.kv_block[a:b], meta.q_limit[a:b], meta.position_ids[a:b])
        n += int(sub.dense_mask().sum())
    return n


def flex_fn(meta, device):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    kv, ql = meta.kv_block.to(device), meta.q_limit.to(device)
    doc = meta.doc_ids().to(device)

    def mask_mod(b, h, q, k):
        return (k <= q) & (doc[q] == doc[k]) & ~(kv[k] < ql[q])

    T = kv.numel()
    bm = create_block_mask(mask_mod, None, None, T, T, device=device)
    fa = torch.compile(flex_attention) if device.type == "cuda" else flex_attention
    return lambda q, k, v: fa(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                              block_mask=bm)[0].transpose(0, 1)


def sdpa_causal(q, k, v):
    """SDPA's flash path on one causal sequence (ignores documents and holes: a speed floor)."""
    o = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], is_causal=True)
    return o[0].transpose(0, 1)


def run(quick: bool = False, device=None, out_dir="benchmarks/results"):
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_gpu = device.type == "cuda"
    dtype = torch.bfloat16 if on_gpu else torch.float32
    H, Dh = (32, 128) if on_gpu else (4, 64)
    cases = [("256px", 256, 16384, False), ("512px", 512, 16384, False), ("causal", 256, 16384, True)] if on_gpu \
        else [("256px", 256, 1300 if not quick else 650, False), ("causal", 256, 1300 if not quick else 650, True)]
    gen = torch.Generator().manual_seed(0)
    rows = []
    for name, px, tokens, causal in cases:
        ids, meta = packed_batch(px, tokens, gen, causal)
        meta = meta.to(device)
        T = ids.numel()
        pairs = visible_pairs(meta.to("cpu"))
        fwd_flops = 4 * pairs * H * Dh
        q, k, v = (torch.randn(T, H, Dh, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
        do = torch.randn(T, H, Dh, device=device, dtype=dtype)
        impls = {f"worldvla-{b}": (lambda q, k, v, b=b: ops.masked_attention(q, k, v, meta, backend=b))
                 for b in ops.dispatch.available("masked_attention")
                 if b != "torch" and ops.dispatch.supports("masked_attention", b, q, k, v, meta)}
        impls["sdpa-dense-mask"] = lambda q, k, v: ops.masked_attention(q, k, v, meta, backend="torch")
        try:
            impls["flex"] = flex_fn(meta, device)
        except Exception as e:  # noqa: BLE001 - report, do not hide
            print(f"flex attention unavailable: {e}")
        impls["sdpa-causal(floor)"] = sdpa_causal
        base = {}
        for impl, fn in impls.items():
            for mode in ("fwd", "fwd+bwd"):
                if mode == "fwd+bwd" and not on_gpu and impl == "flex":
                    continue  # FlexAttention has no CPU backward
                try:
                    if mode == "fwd":
                        qd, kd, vd = q.detach(), k.detach(), v.detach()
                        call = lambda: fn(qd, kd, vd)
                        ctx = torch.no_grad
                    else:
                        call = lambda: torch.autograd.grad(fn(q, k, v), (q, k, v), do)
                        ctx = torch.enable_grad
                    with ctx():
                        t = time_fn(call, device=device, warmup=2 if quick else 5, repeats=5 if quick else 30)
                except Exception as e:  # noqa: BLE001
                    rows.append({"case": name, "impl": impl, "mode": mode, "error": str(e)[:200]})
                    continue
                flops = fwd_flops * (1 if mode == "fwd" else 3.5)
                row = {"case": name, "tokens": T, "impl": impl, "mode": mode, **t,
                       "tflops": flops / (t["median_ms"] * 1e-3) / 1e12, "visible_pairs": pairs}
                rows.append(row)
                base[(impl, mode)] = t["median_ms"]
        for r in rows:
            if r["case"] == name and "median_ms" in r:
                for ref in ("flex", "sdpa-dense-mask", "sdpa-causal(floor)"):
                    if (ref, r["mode"]) in base:
                        r[f"speedup_vs_{ref}"] = base[(ref, r["mode"])] / r["median_ms"]
    print_table(rows, ["case", "tokens", "impl", "mode", "median_ms", "tflops", "speedup_vs_flex", "speedup_vs_sdpa-dense-mask"])
    return write_results("attention", rows, device, out_dir, extra={"heads": H, "head_dim": Dh, "dtype": str(dtype)},
                         plot=("case", "tflops", "impl"))


def main(argv=None):
    return main_for(run, __doc__, argv)


if __name__ == "__main__":
    main()
