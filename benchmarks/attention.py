"""Chunk-masked attention: worldvla backends vs SDPA with a dense boolean mask (over the whole packed
batch, as the release does, and per document), FlexAttention (same rule as a mask_mod) and SDPA's
causal path per document, forward and forward+backward; and decode attention (a few query rows
against a KV cache) vs SDPA with the dense mask and SDPA over the whole cache without one.

Documents are the release's action-model samples (about 620 tokens at 256 px, 2,200 at 512 px:
BOS, text, two images, a chunk of actions), packed into one batch of `tokens` tokens. Decode
cases cache one whole document per sequence and query the chunk's rows of one parallel decoding
step (K=5 rows) or the chunk's last token (one row, sequential decoding).
FLOPs count only visible (query, key) pairs: 4*H*Dh per pair forward, 2.5x that backward, for every
row (the useful work; `tflops` compares rows by it). Forward + backward is thus 3.5x the forward,
FlashAttention-2's convention (its backward recomputes Q K^T: five matrix products to the forward's
two), so the TFLOP/s compare with published kernel numbers; `benchmarks/train.py`'s MFU counts
attention at 3x instead (model FLOPs, no recomputation, as MFU is defined), so its attention share is
6/7 of what the same pairs give here. Each row also records `attended_pairs`, the
(query, key) pairs its method computes (the dense grid of a mask, a block mask's blocks, ...; None
where a kernel's tiling decides), and `attended_over_visible`. Masks, block masks and the per-document
index maps are built once per case, outside the timed calls. Decode rows also give the cache's bytes
over the time (K and V read once, `cache_gbps`) and, on CUDA, that over the device's copy bandwidth measured
once in the same process (`fraction_of_copy_bandwidth`); the decode target (at least 0.8 of it) is judged on
a 16k-token cache (batch 1, 5 query rows), the short caches being a matter of launch overhead. Decode cases
run first, then the prefill cases (on CUDA 256 px, causal, 512 px), the JSON rewritten after every decode
case and every mode of a prefill case, so a run cut short keeps what it measured. Inputs rotate (common.Rotation),
so small cases, decode above all, are not timed out of L2. The sides of a case and mode are timed
interleaved (common.time_interleaved: one call of each a round, the order turning), so a machine that
speeds up or slows down moves them alike. Before the timing, every side's output (forward, decode) or
gradients (forward + backward) are checked against the op's reference (`ops.masked_attention_ref`,
`decode_attention_ref`; float32, float64 on the CPU) under the rule the side computes
(`matches_reference`, `max_abs_err`, `worst_over_tolerance` in its row); a side that does not match is
still timed and recorded, and the run fails once its JSON is written. On sm_90 GPUs the native prefill is also
timed with each of its matrix engines forced (worldvla-native-mma, -wgmma, -wgmma128; the mma row
repeats what "auto" runs, under the same per-call engine switch as the other two).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from worldvla import VocabLayout, chunk_mask_meta, ops
from worldvla.mask import NO_BLOCK, DecodeMeta, causal_meta

from .common import (BANDWIDTH_METHOD, Rotation, load_average, main_for, measure_bandwidth, print_table,
                     time_interleaved, timed_backends, write_results)

LAYOUT = VocabLayout.chameleon()
# Forward + backward FLOPs over the forward's: FlashAttention-2's count (backward 2.5x: it recomputes Q K^T).
# train.py's MFU counts 3x (PaLM's model FLOPs: no recomputation); see the module docstring.
FWD_BWD_FLOPS = 3.5
# A side matches the reference where |got - want| <= tol * (|want| + mean |want|) for every element (the mean:
# a floor at the tensor's own scale, for elements near zero). Rounding stays inside (on the CPU, 1,300 tokens:
# SDPA's bf16 math at 0.2-0.4x the bf16 tolerance forward, 0.5-0.7x for the gradients; float32 at 0.003x), a
# wrong rule does not (SDPA causal per document against the chunk rule: 9-28x forward, 20-43x gradients).
CHECK_TOLERANCE = {torch.float32: 1e-3, torch.float16: 2e-2, torch.bfloat16: 1e-1}


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
    """FlexAttention under the chunk rule, its block mask built here (outside the timed call). Returns
    (fn, attended pairs): compiled (CUDA), the pairs of the blocks it computes (None where this torch's
    BlockMask does not say); eager (CPU), the whole [T, T] grid, which the unfused path materializes."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    kv, ql = meta.kv_block.to(device), meta.q_limit.to(device)
    doc = meta.doc_ids().to(device)

    def mask_mod(b, h, q, k):
        return (k <= q) & (doc[q] == doc[k]) & ~(kv[k] < ql[q])

    T = kv.numel()
    bm = create_block_mask(mask_mod, None, None, T, T, device=device)
    compiled = device.type == "cuda"
    # Static shapes: T changes from case to case, and dynamo's automatic dynamic shapes would otherwise
    # compile the second case's kernel for any T (and time that one); each case gets its own kernel.
    fa = torch.compile(flex_attention, dynamic=False) if compiled else flex_attention
    try:
        full = bm.full_kv_num_blocks
        blocks = int(bm.kv_num_blocks.sum()) + (int(full.sum()) if full is not None else 0)
        attended = blocks * bm.BLOCK_SIZE[0] * bm.BLOCK_SIZE[1] if compiled else T * T
    except (AttributeError, TypeError, IndexError):
        attended = None
    return (lambda q, k, v: fa(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                               block_mask=bm)[0].transpose(0, 1)), attended


class Documents:
    """A packed batch's documents as a padded batch [n_docs, H, Lmax, Dh] for the per-document SDPA
    baselines; the index maps and the documents' own chunk masks [n_docs, Lmax, Lmax] are built once,
    here. Documents all Lmax long (the action documents of a case) are views of the packed tensors;
    otherwise `pad` copies in and `unpad` gathers out (a pad query row sees key 0 only: no empty row)."""

    def __init__(self, meta):
        from worldvla.ops.attention import _documents_padded

        _, self.dst, self.mask = _documents_padded(meta)
        self.n, self.L = self.mask.shape[:2]
        self.views = self.n * self.L == meta.kv_block.numel()

    def pad(self, x):
        if not self.views:
            x = x.new_zeros(self.n * self.L, *x.shape[1:]).index_copy(0, self.dst, x)
        return x.view(self.n, self.L, *x.shape[1:]).transpose(1, 2)

    def unpad(self, o):
        n, H, L, Dh = o.shape
        o = o.transpose(1, 2).reshape(n * L, H, Dh)
        return o if self.views else o.index_select(0, self.dst)


def sdpa_causal_per_document(docs: Documents):
    """SDPA's causal path on each document of the batch (one padded call, `is_causal`): the documents
    kept apart, the chunk rule's holes ignored (it attends every causal pair of each document). On
    CUDA the flash kernel is asked for by name (the issues' "SDPA-flash" reference; left to itself
    torch may take cuDNN's or the memory-efficient kernel); where it cannot run, torch's own choice
    (recorded in the results' `sdpa_causal_backend`)."""
    def call(q, k, v):
        return docs.unpad(F.scaled_dot_product_attention(docs.pad(q), docs.pad(k), docs.pad(v), is_causal=True))

    def fn(q, k, v):
        if q.is_cuda and SDPA_CAUSAL["backend"] == "flash":
            try:
                with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                    return call(q, k, v)
            except RuntimeError:  # no flash kernel for these inputs: torch's choice from now on
                SDPA_CAUSAL["backend"] = "torch's choice (flash refused)"
        return call(q, k, v)
    return fn


SDPA_CAUSAL = {"backend": "flash"}  # what sdpa-causal-per-doc runs on CUDA


def sdpa_dense_mask_per_document(docs: Documents):
    """SDPA on each document of the batch (one padded call) under its own dense chunk mask, built once."""
    mask = docs.mask.unsqueeze(1)

    def fn(q, k, v):
        return docs.unpad(F.scaled_dot_product_attention(docs.pad(q), docs.pad(k), docs.pad(v), attn_mask=mask))
    return fn


def decode_meta(px: int, n_queries: int | None, batch: int, gen=None, tokens: int | None = None) -> DecodeMeta:
    """A cache holding one whole action document (prompt and a chunk of 5 actions) per sequence.
    K > 1 queries: parallel decoding's step 3 (token 3 of actions 0..K-1); one query: the chunk's
    last token (sequential decoding's longest read); None: every token of the document (a prefill
    through the cache, as the engine runs its prompts). `tokens`: a cache of exactly that many tokens,
    the document after a history of earlier prompts (text and two images each, no action blocks) and
    text ids: a long context whose only action blocks are the document's, so that its rows hide what
    the short cache's do; the query rows in that document."""
    doc = action_document(px, chunk=5, gen=gen)
    history = []
    if tokens is not None:
        if tokens < len(doc):
            raise ValueError(f"a {tokens}-token cache cannot hold the {len(doc)}-token document")
        prompt_len = len(action_document(px, chunk=0, gen=gen))
        while len(history) + prompt_len + len(doc) <= tokens:
            history += action_document(px, chunk=0, gen=gen)
        history += torch.randint(20000, 60000, (tokens - len(history) - len(doc),), generator=gen).tolist()
    ids = torch.tensor(history + doc)
    meta = chunk_mask_meta(ids, LAYOUT)
    start = len(history)
    if n_queries is None:
        rows = torch.arange(start, ids.numel())
    elif n_queries == 1:
        rows = torch.tensor([ids.numel() - 2])
    else:
        rows = start + (ids[start:] == LAYOUT.boa).nonzero().flatten()[:n_queries] + 3
    S = ids.numel()
    rep = lambda t: t.reshape(1, -1).expand(batch, -1).contiguous().to(torch.int32)  # noqa: E731
    kv_len = torch.full((batch,), S, dtype=torch.int32)
    return DecodeMeta(rep(rows), rep(meta.q_limit[rows]), rep(meta.kv_block), kv_len)


def sdpa_dense_mask(meta):
    """The release's way: SDPA over the whole packed batch under the dense [T, T] boolean mask, built
    once here (outside the timed call, as FlexAttention's block mask is). It attends all T^2 pairs.
    (worldvla's own "torch" backend runs each document on its own.)"""
    mask = meta.dense_mask()[None, None]

    def fn(q, k, v):
        o = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                           attn_mask=mask)
        return o[0].transpose(0, 1)
    return fn


def sdpa_decode_dense_mask(meta: DecodeMeta):
    """SDPA of the decode rows over the whole cache under the dense [B, Q, S] mask, built once here."""
    mask = meta.dense_mask().unsqueeze(1)

    def fn(q, k, v):
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                              attn_mask=mask).transpose(1, 2)
    return fn


def sdpa_nomask(q, k, v):
    """SDPA of the decode rows over the whole cache, no mask (a speed floor)."""
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


def check(got, want, dtype) -> dict:
    """How a side's output, or tuple of gradients, compares with the reference (CHECK_TOLERANCE)."""
    got = got if isinstance(got, (tuple, list)) else (got,)
    want = want if isinstance(want, (tuple, list)) else (want,)
    err = worst = 0.0
    for g, w in zip(got, want, strict=True):
        d = (g.to(w.dtype) - w).abs()
        err = max(err, float(d.max()))
        worst = max(worst, float((d / (CHECK_TOLERANCE[dtype] * (w.abs() + w.abs().mean()))).max()))
    nan_to_none = lambda x: x if x == x else None  # noqa: E731 - JSON has no NaN
    return {"matches_reference": worst <= 1.0, "max_abs_err": nan_to_none(err),  # NaN <= 1 is False
            "worst_over_tolerance": nan_to_none(worst)}


def _wide_dtype(device) -> torch.dtype:
    """A reference's precision: float64 on the CPU, float32 on a GPU (where the dense [T, T] scores of a
    16k-token batch would not fit in float64 beside the benchmark's tensors)."""
    return torch.float64 if torch.device(device).type == "cpu" else torch.float32


def _wide(t):
    return t.detach().to(_wide_dtype(t.device))


def prefill_reference(meta, q, k, v, do=None):
    """`ops.masked_attention_ref` of packed q, k, v [T, H, Dh] in a wide dtype (`_wide`), a few heads at a
    time so that its dense [heads, T, T] scores stay near 1 GiB; with `do`, the gradients of q, k and v
    (the heads are independent, so per-head gradients are the whole ones) instead of the output."""
    T, H = q.shape[0], q.shape[1]
    step = max(1, (1 << 30) // (T * T * _wide_dtype(q.device).itemsize))
    parts = []
    for h in range(0, H, step):
        qs, ks, vs = (_wide(t[:, h:h + step]).requires_grad_(do is not None) for t in (q, k, v))
        with torch.enable_grad() if do is not None else torch.no_grad():
            o = ops.masked_attention_ref(qs, ks, vs, meta)
            parts.append(o if do is None else torch.autograd.grad(o, (qs, ks, vs), _wide(do[:, h:h + step])))
    if do is None:
        return torch.cat(parts, 1)
    return tuple(torch.cat([p[i] for p in parts], 1) for i in range(3))


def decode_reference(meta: DecodeMeta | None, q, k, v):
    """`ops.decode_attention_ref` in a wide dtype; `meta` None: every cache slot visible to every row (what
    sdpa-nomask(floor) computes)."""
    if meta is None:
        B, Q, S = q.shape[0], q.shape[1], k.shape[1]
        full = lambda x: torch.full(x, 0, dtype=torch.int32, device=q.device)  # noqa: E731
        meta = DecodeMeta(full((B, Q)) + (S - 1), full((B, Q)) - 1, full((B, S)) + NO_BLOCK, full((B,)) + S)
    return ops.decode_attention_ref(_wide(q), _wide(k), _wide(v), meta)


def _timing(quick: bool, on_gpu: bool, many: int) -> dict:
    return {"warmup": 2 if quick else 5, "repeats": 5 if quick else many, "gpu_time": on_gpu}


def _check_and_time(calls: dict, rule_of, reference, dtype, device, rot, ctx, timing: dict, label: str) -> dict:
    """Each of `calls` (name -> fn(*input set)) run once on the rotation's first set and checked against
    `reference(rule_of(name))`, the reference of the rule it computes (each computed once, and dropped
    before the timing); then the ones that ran, timed interleaved. Returns name -> the row's fields:
    time_interleaved's statistics and the check's (`matches_reference` None where the reference itself
    could not be computed), or {"error": ...} for a side that does not run."""
    refs, out = {}, {}
    for name, call in list(calls.items()):
        try:
            with ctx():
                got = call(*rot.sets[0])
        except Exception as e:  # noqa: BLE001 - report, do not hide
            out[name] = {"error": str(e)[:200]}
            del calls[name]
            continue
        try:
            rule = rule_of(name)
            if rule not in refs:
                refs[rule] = reference(rule)
            out[name] = check(got, refs[rule], dtype)
        except Exception as e:  # noqa: BLE001 - the reference (not the side) failed, e.g. out of memory
            out[name] = {"matches_reference": None, "check_error": str(e)[:200]}
        if out[name]["matches_reference"] is False:
            print(f"!! {label} {name}: does not match the reference ({out[name]})")
    got = None
    refs.clear()  # the references' memory back before the timing
    try:
        with ctx():
            stats = time_interleaved(calls, device=device, rotation=rot, **timing)
    except Exception as e:  # noqa: BLE001 - one side failing mid-run: the case's rows say so
        stats = {name: {"error": str(e)[:200]} for name in calls}
    return {name: {**stats.get(name, {}), **fields} for name, fields in out.items()}


def _prefill_engines(device) -> list[str]:
    """The CUDA prefill engines to time side by side ("mma", "wgmma", "wgmma128" on sm_90), else []."""
    if device.type != "cuda" or "native" not in timed_backends("masked_attention"):
        return []
    from worldvla.ops import native_backend
    return native_backend.prefill_engines(device.index if device.index is not None else torch.cuda.current_device())


def _with_engine(engine: str, fn):
    """fn() with the native prefill forced to `engine` (two host calls of about a microsecond)."""
    from worldvla.ops import native_backend
    native_backend._C.set_cuda_prefill_engine(engine)
    try:
        return fn()
    finally:
        native_backend._C.set_cuda_prefill_engine("auto")


def run_prefill(cases, H, Dh, dtype, device, quick, gen, done=None) -> list[dict]:
    """The prefill cases' rows. `done(rows)`, if given, is called after each mode (fwd, then fwd+bwd) of each
    case with every row measured so far (the caller rewrites its JSON: a run cut short keeps each mode)."""
    on_gpu = device.type == "cuda"
    rows = []
    for name, px, tokens, causal in cases:
        ids, meta = packed_batch(px, tokens, gen, causal)
        meta = meta.to(device)
        T = ids.numel()
        pairs = visible_pairs(meta.to("cpu"))
        fwd_flops = 4 * pairs * H * Dh
        docs = Documents(meta)
        n, L = docs.n, docs.L

        def make(i, T=T):
            q, k, v = (torch.randn(T, H, Dh, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
            return q, k, v, torch.randn(T, H, Dh, device=device, dtype=dtype)

        rot = Rotation(make, device, quick=quick)
        q, k, v, _ = rot.sets[0]
        backends = {f"worldvla-{b}": b for b in timed_backends("masked_attention")}
        # The pairs each method computes: the torch backend runs the documents apart when that at least
        # halves the [T, T] grid (ops.attention.masked_attention_sdpa); the others' tiles are theirs.
        attended = {"worldvla-torch": n * L * L if 2 * n * L * L <= T * T else T * T,
                    "sdpa-dense-mask": T * T, "sdpa-dense-mask-per-doc": n * L * L,
                    "sdpa-causal-per-doc": n * L * (L + 1) // 2}
        impls = {impl: (lambda q, k, v, b=b: ops.masked_attention(q, k, v, meta, backend=b))
                 for impl, b in backends.items()}
        engines = _prefill_engines(device)
        if len(engines) > 1:  # sm_90: each of the native prefill's matrix engines, forced per call
            for engine in engines:
                backends[f"worldvla-native-{engine}"] = "native"
                impls[f"worldvla-native-{engine}"] = (
                    lambda q, k, v, e=engine: _with_engine(e, lambda: ops.masked_attention(q, k, v, meta,
                                                                                              backend="native")))
        impls["sdpa-dense-mask"] = sdpa_dense_mask(meta)
        impls["sdpa-dense-mask-per-doc"] = sdpa_dense_mask_per_document(docs)
        impls["sdpa-causal-per-doc"] = sdpa_causal_per_document(docs)
        try:  # last: it compiles (forward and backward) for every case, the slowest part of a short run
            impls["flex"], attended["flex"] = flex_fn(meta, device)
        except Exception as e:  # noqa: BLE001 - report, do not hide
            print(f"flex attention unavailable: {e}")
        # The reference of each rule, computed once per case and mode on the first input set: the chunk rule
        # (or plain causal, in the causal case) for every side, causal within documents for sdpa-causal-per-doc.
        rules = {"case": meta, "causal": causal_meta((T,), device, cu_seqlens=meta.cu_seqlens)}
        fields = {}
        for mode in ("fwd", "fwd+bwd"):
            ctx = torch.no_grad if mode == "fwd" else torch.enable_grad
            calls = {}
            for impl, fn in impls.items():
                if mode == "fwd+bwd" and not on_gpu and impl == "flex":
                    continue  # FlexAttention has no CPU backward
                if impl in backends:
                    with ctx():
                        args = (q.detach(), k.detach(), v.detach()) if mode == "fwd" else (q, k, v)
                        if not ops.dispatch.supports("masked_attention", backends[impl], *args, meta):
                            continue  # e.g. the native kernels are forward only
                if mode == "fwd":
                    calls[impl] = lambda q, k, v, do, fn=fn: fn(q.detach(), k.detach(), v.detach())
                else:
                    calls[impl] = lambda q, k, v, do, fn=fn: torch.autograd.grad(fn(q, k, v), (q, k, v), do)
            q0, k0, v0, do0 = rot.sets[0]
            got = _check_and_time(
                calls, lambda impl: "causal" if impl == "sdpa-causal-per-doc" and not causal else "case",
                lambda rule, mode=mode: prefill_reference(rules[rule], q0, k0, v0, None if mode == "fwd" else do0),
                dtype, device, rot, ctx, _timing(quick, on_gpu, 30), f"{name} {mode}")
            fields.update({(impl, mode): f for impl, f in got.items()})
            case_rows = _prefill_rows(name, T, n, impls, fields, fwd_flops, pairs, attended)
            if done is not None:
                done(rows + case_rows)
        rows += case_rows
    return rows


def _prefill_rows(name, T, n, impls, fields, fwd_flops, pairs, attended) -> list[dict]:
    """A prefill case's rows from the fields measured so far ((impl, mode) -> fields): each side's rows
    together, in the order of impls."""
    rows = []
    for impl in impls:
        for mode in ("fwd", "fwd+bwd"):
            t = fields.get((impl, mode))
            if t is None:
                continue
            if "median_ms" not in t:
                rows.append({"case": name, "impl": impl, "mode": mode, **t})
                continue
            flops = fwd_flops * (1 if mode == "fwd" else FWD_BWD_FLOPS)
            done = attended.get(impl)
            rows.append({"case": name, "tokens": T, "documents": n, "impl": impl, "mode": mode, **t,
                         "tflops": flops / (t["median_ms"] * 1e-3) / 1e12, "visible_pairs": pairs,
                         "attended_pairs": done, "attended_over_visible": done / pairs if done else None})
    return rows


def run_decode(cases, H, Dh, dtype, device, quick, gen, copy_gbps: float | None = None) -> list[dict]:
    """The decode cases' rows: (name, image px, query rows per sequence, sequences[, cache tokens]).
    `copy_gbps`: the device's copy bandwidth measured in this process (common.measure_bandwidth), against
    which each row's `fraction_of_copy_bandwidth` is read (None where not measured: the CPU)."""
    on_gpu = device.type == "cuda"
    rows = []
    for name, px, n_queries, batch, *tokens in cases:
        meta = decode_meta(px, n_queries, batch, gen, tokens=tokens[0] if tokens else None)
        pairs = int(meta.dense_mask().sum())
        meta = DecodeMeta(*(t.to(device) for t in (meta.q_pos, meta.q_limit, meta.kv_block, meta.kv_len)))
        S = meta.kv_block.shape[1]
        cache_bytes = 2 * batch * S * H * Dh * torch.finfo(dtype).bits // 8

        def make(i, S=S):
            return (torch.randn(batch, n_queries, H, Dh, device=device, dtype=dtype),
                    torch.randn(batch, S, H, Dh, device=device, dtype=dtype),
                    torch.randn(batch, S, H, Dh, device=device, dtype=dtype))

        rot = Rotation(make, device, quick=quick)
        q, k, v = rot.sets[0]
        impls = {f"worldvla-{b}": (lambda q, k, v, b=b: ops.decode_attention(q, k, v, meta, backend=b))
                 for b in timed_backends("decode_attention")
                 if b != "torch" and ops.dispatch.supports("decode_attention", b, q, k, v, meta)}
        impls["sdpa-dense-mask"] = sdpa_decode_dense_mask(meta)
        impls["sdpa-nomask(floor)"] = sdpa_nomask
        grid = batch * n_queries * S  # what both SDPA rows compute
        got = _check_and_time(dict(impls), lambda impl: impl == "sdpa-nomask(floor)",  # the floor sees every slot
                              lambda floor, meta=meta: decode_reference(None if floor else meta, *rot.sets[0]),
                              dtype, device, rot, torch.no_grad, _timing(quick, on_gpu, 100), name)
        for impl, t in got.items():
            if "median_ms" not in t:
                rows.append({"case": name, "impl": impl, "mode": "decode", **t})
                continue
            sec = t["median_ms"] * 1e-3
            done = grid if impl.startswith("sdpa") else None
            gbps = cache_bytes / sec / 1e9
            rows.append({"case": name, "tokens": S, "queries": n_queries, "batch": batch, "impl": impl,
                         "mode": "decode", **t, "tflops": 4 * pairs * H * Dh / sec / 1e12,
                         "cache_gbps": gbps, "fraction_of_copy_bandwidth": gbps / copy_gbps if copy_gbps else None,
                         "visible_pairs": pairs, "attended_pairs": done,
                         "attended_over_visible": done / pairs if done else None})
    return rows


# The decode target: a long cache's K and V read at this fraction of the device's copy bandwidth or more.
DECODE_BANDWIDTH_TARGET = 0.8
LONG_DECODE_CASE = "decode 16k K5"  # the case the target is judged on (GPU: 16,384 tokens, batch 1, 32 x 128, bf16)


def decode_bandwidth_target(rows, copy_gbps: float | None, case: str = LONG_DECODE_CASE) -> dict:
    """The decode target, judged on `case`'s worldvla rows: the best of them (`impl`) and each one's fraction of
    the copy bandwidth measured in the same process; measured / met None where the case did not run or no
    bandwidth was measured (the CPU)."""
    fractions = {r["impl"]: r.get("fraction_of_copy_bandwidth") for r in rows
                 if r.get("case") == case and r["impl"].startswith("worldvla-") and "median_ms" in r}
    fractions = {impl: f for impl, f in fractions.items() if f is not None and copy_gbps}
    best = max(fractions, key=fractions.get) if fractions else None
    measured = fractions[best] if best else None
    out = {"target": f">= {DECODE_BANDWIDTH_TARGET:g} x the copy bandwidth measured in this process", "case": case,
           "copy_bandwidth_GBps": copy_gbps, "impl": best, "measured": measured,
           "met": None if measured is None else measured >= DECODE_BANDWIDTH_TARGET, "by_impl": fractions}
    if measured is None:
        out["note"] = ("not judged: no copy bandwidth measured (CPU)" if copy_gbps is None
                       else f"not judged: no timed worldvla row of {case!r}")
    return out


BASELINES = ("flex", "sdpa-dense-mask", "sdpa-dense-mask-per-doc", "sdpa-causal-per-doc", "sdpa-nomask(floor)")


def add_speedups(rows, refs=BASELINES):
    """speedup_vs_<ref> = ref's median / the row's median, within one case and mode."""
    base = {(r["case"], r["impl"], r["mode"]): r["median_ms"] for r in rows if "median_ms" in r}
    for r in rows:
        if "median_ms" in r:
            for ref in refs:
                if (r["case"], ref, r["mode"]) in base:
                    r[f"speedup_vs_{ref}"] = base[(r["case"], ref, r["mode"])] / r["median_ms"]


def prefill_cases(on_gpu: bool, quick: bool) -> list[tuple]:
    """(name, image px, tokens, causal). The causal case (the SDPA-flash comparison) second on CUDA: a run cut
    short keeps it before the 512 px case."""
    if on_gpu:
        return [("256px", 256, 16384, False), ("causal", 256, 16384, True), ("512px", 512, 16384, False)]
    n = 1300 if not quick else 650
    return [("256px", 256, n, False), ("causal", 256, n, True)]


def decode_case_list(on_gpu: bool, quick: bool) -> list[tuple]:
    """(name, image px, query rows per sequence, sequences[, cache tokens]): batch 1 is the robot's step. On
    CUDA the 16k-token cache (268 MB at 32 x 128 in bf16) first: the one read long enough to judge the
    bandwidth target on; the others (10-81 MB) are a matter of launch overhead."""
    if on_gpu:
        return [(LONG_DECODE_CASE, 256, 5, 1, 16384), ("decode 256px K5", 256, 5, 1), ("decode 256px step", 256, 1, 1),
                ("decode 512px K5", 512, 5, 1), ("decode 256px K5 B8", 256, 5, 8)]
    return [("decode 256px K5", 256, 5, 1)] + ([] if quick else [("decode 256px step", 256, 1, 1)])


def run(quick: bool = False, device=None, out_dir="benchmarks/results"):
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_gpu = device.type == "cuda"
    dtype = torch.bfloat16 if on_gpu else torch.float32
    H, Dh = (32, 128) if on_gpu else (4, 64)
    cases, decode_cases = prefill_cases(on_gpu, quick), decode_case_list(on_gpu, quick)
    gen = torch.Generator().manual_seed(0)
    copy_gbps = measure_bandwidth(device, gpu_time=True, repeats=20)  # once, in this process; None on the CPU
    extra = {"heads": H, "head_dim": Dh, "dtype": str(dtype), "load_average_start": load_average(),
             "copy_bandwidth_GBps": copy_gbps,
             "copy_bandwidth_method": BANDWIDTH_METHOD + ", device time, once per run before the cases" if on_gpu
                                      else None,
             "decode_bandwidth": "cache_gbps: K and V of every sequence read once, over the median time; "
                                 "fraction_of_copy_bandwidth: cache_gbps / copy_bandwidth_GBps (None on the CPU)",
             "tflops": f"useful FLOPs / time for every row: 4*H*Dh per visible (query, key) pair forward, "
                       f"{FWD_BWD_FLOPS:g}x that forward+backward (FlashAttention-2's count: its backward, 2.5x the "
                       f"forward, recomputes Q K^T; train.py's MFU counts attention at 3x, without recomputation)",
             "timing": "the sides of a case and mode interleaved (one call of each a round, the order turning), "
                       "medians; on CUDA device time (a spin kernel holds the stream while the host launches)",
             "check": "before timing, each side's output (fwd, decode) or q/k/v gradients (fwd+bwd) on the first "
                      "input set against ops.masked_attention_ref / decode_attention_ref in float32 (float64 on the "
                      "CPU) under the rule the side computes (causal per document for sdpa-causal-per-doc, no mask "
                      "for sdpa-nomask(floor)): matches_reference when |got - ref| <= tol * (|ref| + mean|ref|) "
                      f"everywhere, tol {dict((str(k).replace('torch.', ''), v) for k, v in CHECK_TOLERANCE.items())}",
             "attended_pairs": "(query, key) pairs the row's method computes: T^2 for sdpa-dense-mask (the whole "
                               "packed batch), n_docs*Lmax^2 per document under a mask, n_docs*Lmax*(Lmax+1)/2 for "
                               "sdpa-causal-per-doc, the computed 128x128 blocks for compiled flex (T^2 eager, on "
                               "the CPU), batch*queries*cache for decode's SDPA rows; None where a kernel's tiling "
                               "decides (worldvla native, triton)",
             "baselines": "masks, block masks and per-document index maps built once per case, outside the timed "
                          "calls",
             "sdpa_causal_backend": SDPA_CAUSAL["backend"] if on_gpu else "torch's choice (CPU)"}
    rows = []

    def partial(new_rows, before=()):
        # The JSON rewritten with `before` and `new_rows` (every row measured so far), so a run cut short keeps
        # what it measured.
        rows[:] = [*before, *new_rows]
        if on_gpu:
            extra["sdpa_causal_backend"] = SDPA_CAUSAL["backend"]
        extra["decode_bandwidth_target"] = decode_bandwidth_target(rows, copy_gbps)
        add_speedups(rows)
        write_results("attention", rows, device, out_dir, extra=extra, quick=quick)

    # The JSON is rewritten after every decode case and after each mode of every prefill case; the decode
    # cases (quick, no compilation) come first.
    for case in decode_cases:
        partial(run_decode([case], H, Dh, dtype, device, quick, gen, copy_gbps=copy_gbps), before=list(rows))
    for case in cases:
        before = list(rows)
        partial(run_prefill([case], H, Dh, dtype, device, quick, gen,
                            done=lambda so_far, before=before: partial(so_far, before)), before)
    print_table(rows, ["case", "tokens", "impl", "mode", "median_ms", "tflops", "attended_over_visible", "cache_gbps",
                       "rotated_sets", "speedup_vs_flex", "speedup_vs_sdpa-dense-mask", "matches_reference"])
    target = extra["decode_bandwidth_target"]
    print(f"decode target ({target['case']}): {target['target']}: measured {target['measured']} ({target['impl']}), "
          f"met {target['met']}" + (f" ({target['note']})" if "note" in target else ""))
    path = write_results("attention", rows, device, out_dir, extra=extra, plot=("case", "tflops", ("impl", "mode")),
                         quick=quick)
    wrong = [f"{r['case']} {r['impl']} {r['mode']}" for r in rows if r.get("matches_reference") is False]
    if wrong:  # after the JSON is written: its rows say by how much
        raise RuntimeError(f"attention: {len(wrong)} side(s) do not match the reference: {', '.join(wrong)} "
                           f"(see {path})")
    return path


def main(argv=None):
    return main_for(run, __doc__, argv)


if __name__ == "__main__":
    main()
