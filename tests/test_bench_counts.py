"""The kernel benchmarks' work counts, shapes and inputs, each checked against a count worked out here by hand
or by brute force over a small case (never with the benchmark's own formula): a wrong count makes every
TFLOP/s or GB/s figure of a report wrong without failing anything else."""
import json
import re

import pytest
import torch

from worldvla import VocabLayout, chunk_mask_meta
from worldvla.benchmarks import common

from test_benchmarks import cross_entropy_case  # (pytest puts tests/ on sys.path)

LAYOUT = VocabLayout.chameleon()


def _fixed_medians(medians, timed=None):
    """A time_interleaved that times nothing: each side's median from `medians` (1 ms for a side not named)."""
    def fake(fns, **kw):
        if timed is not None:
            timed.append(sorted(fns))
        return {name: {"median_ms": medians.get(name, 1.0), "repeats": kw.get("repeats", 1)} for name in fns}
    return fake


def _random(t: torch.Tensor) -> bool:
    """A random input, not zeros, ones or a constant: hardly any element zero (a float32 normal draw of millions may
    hold one) and many distinct values."""
    t = t.detach().float()
    return float((t == 0).float().mean()) < 1e-3 and t.unique().numel() > min(t.numel() // 4, 100)


def _recorded_rotations(monkeypatch, module, n: int) -> list:
    """Replace `module`'s Rotation with real ones of `n` sets on the CPU; returns the list their sets are added to."""
    sets = []

    def rotation(make, *args, **kwargs):
        rot = common.Rotation(make, "cpu", n=n)
        sets.extend(rot.sets)
        return rot

    monkeypatch.setattr(module, "Rotation", rotation)
    return sets


def _brute_force_visible_pairs(ids: list[int], cu: list[int]) -> int:
    """Visible (query, key) pairs by the chunk rule, read from the ids themselves: within a document, key <= query,
    except that a query in an action block (BOA .. EOA) starting after the document's last EOI sees no key of an
    earlier action block."""
    n = 0
    for a, b in zip(cu[:-1], cu[1:]):
        doc = ids[a:b]
        last_eoi = max((i for i, t in enumerate(doc) if t == LAYOUT.eoi), default=-1)
        block = [None] * len(doc)
        ordinal, open_at = -1, None
        for i, t in enumerate(doc):
            if t == LAYOUT.boa:
                ordinal, open_at = ordinal + 1, i
            if open_at is not None:
                block[i] = (ordinal, open_at)
            if t == LAYOUT.eoa:
                open_at = None
        for q in range(len(doc)):
            for k in range(q + 1):
                hidden = (block[q] is not None and block[q][1] > last_eoi and block[k] is not None
                          and block[k][0] < block[q][0])
                n += not hidden
    return n


# ------------------------------------------------------------------ prefill: visible pairs and attended pairs
def test_visible_pairs_of_a_packed_batch_are_its_documents_causal_pairs_less_the_hidden_actions():
    """An action document at 32 px is 88 tokens: 42 of prompt, 5 actions of 9 tokens (BOA, 7 bins, EOA), a SEP.
    Causal pairs 88 x 89 / 2 = 3916, less 9 x 9 keys for each earlier action of each action's tokens:
    81 x (0 + 1 + 2 + 3 + 4) = 810; 3106 a document. Documents of unequal length packed together: every
    document counts (the last too), each by its own holes; the same by brute force over the ids."""
    from worldvla.benchmarks import attention as A

    g = torch.Generator().manual_seed(0)
    assert len(A.action_document(32, gen=g)) == 88
    ids, meta = A.packed_batch(32, 300, g)
    assert meta.cu_seqlens.tolist() == [0, 88, 176, 264]  # 3 whole documents fit in 300 tokens
    assert A.visible_pairs(meta) == 3 * (88 * 89 // 2 - 810) == 9318
    docs = [A.action_document(px, gen=g) for px in (32, 64, 32, 48)]
    cu = [0]
    for d in docs:
        cu.append(cu[-1] + len(d))
    flat = sum(docs, [])
    meta = chunk_mask_meta(torch.tensor(flat), LAYOUT, cu_seqlens=torch.tensor(cu, dtype=torch.int32))
    want = sum(len(d) * (len(d) + 1) // 2 - 810 for d in docs)
    assert A.visible_pairs(meta) == want == _brute_force_visible_pairs(flat, cu)


def test_packed_batch_takes_a_document_that_fills_the_budget_exactly():
    """A budget of exactly two documents packs both (T is the budget); one token fewer packs one."""
    from worldvla.benchmarks import attention as A

    ids, meta = A.packed_batch(32, 2 * 88, torch.Generator().manual_seed(0))
    assert ids.numel() == 176 and meta.cu_seqlens.tolist() == [0, 88, 176]
    ids, meta = A.packed_batch(32, 2 * 88 - 1, torch.Generator().manual_seed(0))
    assert ids.numel() == 88 and meta.cu_seqlens.tolist() == [0, 88]


def _prefill_rows(monkeypatch, tokens):
    from worldvla.benchmarks import attention as A

    monkeypatch.setattr(A, "time_interleaved", _fixed_medians({}))
    rows = A.run_prefill([("tiny", 32, tokens, False)], 2, 16, torch.float32, torch.device("cpu"), True,
                         torch.Generator().manual_seed(0))
    return {(r["impl"], r["mode"]): r for r in rows if "median_ms" in r}


def test_prefill_rows_count_hand_worked_visible_and_attended_pairs(monkeypatch):
    """The tiny case: three 88-token documents, T = 264. Visible pairs 9318 (3 x 3106), forward FLOPs 4 x 2 heads
    x 16 x 9318 (1 ms here), 3.5x that forward + backward. worldvla's torch backend runs the documents apart
    (3 x 88^2 = 23,232 at least halves 264^2 = 69,696) and attends those; SDPA with the whole mask 69,696; eager
    FlexAttention on the CPU materializes the whole 264 x 264 grid."""
    by = _prefill_rows(monkeypatch, 300)
    fwd = 4 * 2 * 16 * 9318
    assert by["sdpa-dense-mask", "fwd"]["tokens"] == 264 and by["sdpa-dense-mask", "fwd"]["documents"] == 3
    for (impl, mode), r in by.items():
        assert r["visible_pairs"] == 9318, (impl, mode)
        assert r["tflops"] == pytest.approx(fwd * (3.5 if mode == "fwd+bwd" else 1) / 1e-3 / 1e12), (impl, mode)
    for mode in ("fwd", "fwd+bwd"):
        assert by["worldvla-torch", mode]["attended_pairs"] == 23232
        assert by["sdpa-dense-mask", mode]["attended_pairs"] == 69696
        assert by["sdpa-dense-mask-per-doc", mode]["attended_pairs"] == 23232
        assert by["sdpa-causal-per-doc", mode]["attended_pairs"] == 3 * 88 * 89 // 2
    if ("flex", "fwd") in by:
        assert by["flex", "fwd"]["attended_pairs"] == 69696


def test_prefill_of_one_document_counts_the_torch_backends_whole_grid(monkeypatch):
    """One document (60 tokens, cut from an 88-token one): splitting it would not halve the grid, so worldvla's
    torch backend attends all 60 x 60 pairs."""
    by = _prefill_rows(monkeypatch, 60)
    assert by["worldvla-torch", "fwd"]["tokens"] == 60 and by["worldvla-torch", "fwd"]["documents"] == 1
    assert by["worldvla-torch", "fwd"]["attended_pairs"] == 3600


def test_prefill_inputs_are_random_and_distinct(monkeypatch):
    """q, k, v and the output gradient of a prefill case are random draws (never zeros or ones), each its own."""
    from worldvla.benchmarks import attention as A

    sets = _recorded_rotations(monkeypatch, A, 2)
    monkeypatch.setattr(A, "time_interleaved", _fixed_medians({}))
    monkeypatch.setattr(A, "flex_fn", lambda meta, device: 1 / 0)  # left out: reported, not timed
    A.run_prefill([("tiny", 32, 300, False)], 2, 16, torch.float32, torch.device("cpu"), True,
                  torch.Generator().manual_seed(0))
    assert len(sets) == 2
    for s in sets:
        assert len(s) == 4 and all(t.shape == (264, 2, 16) and _random(t) for t in s)
        assert all(not torch.equal(a, b) for i, a in enumerate(s) for b in s[i + 1:])
    assert not torch.equal(sets[0][0], sets[1][0])


# ------------------------------------------------------------------ decode
def test_decode_queries_are_the_third_token_of_each_action():
    """Parallel decoding's step 3: the query rows are BOA + 3 of actions 0..K-1 of the cached document."""
    from worldvla.benchmarks import attention as A

    ids = torch.tensor(A.action_document(64, chunk=5, gen=torch.Generator().manual_seed(4)))
    boas = (ids == LAYOUT.boa).nonzero().flatten().tolist()
    for K in (2, 5):
        meta = A.decode_meta(64, K, 1, torch.Generator().manual_seed(4))
        assert meta.q_pos[0].tolist() == [b + 3 for b in boas[:K]]


def test_decode_bytes_count_the_cache_at_its_own_element_size(monkeypatch):
    """cache_gbps reads K and V once at the inputs' element size: bf16 is 2 bytes an element, not float32's 4.
    Batch 2, 2 heads of 16, the 32 px document's 88-token cache: 2 x 2 x 88 x 2 x 16 x 2 bytes = 22,528 in 1 ms."""
    from worldvla.benchmarks import attention as A

    monkeypatch.setattr(A, "time_interleaved", _fixed_medians({}))
    rows = A.run_decode([("d", 32, 5, 2)], 2, 16, torch.bfloat16, torch.device("cpu"), True,
                        torch.Generator().manual_seed(0))
    timed = [r for r in rows if "median_ms" in r]
    assert timed
    for r in timed:
        assert r["tokens"] == 88 and r["cache_gbps"] == pytest.approx(22528 / 1e-3 / 1e9), r


def test_decode_inputs_are_random(monkeypatch):
    """A decode case's query rows and its K and V caches are random draws, not zeros."""
    from worldvla.benchmarks import attention as A

    sets = _recorded_rotations(monkeypatch, A, 2)
    monkeypatch.setattr(A, "time_interleaved", _fixed_medians({}))
    A.run_decode([("d", 32, 5, 2)], 2, 16, torch.float32, torch.device("cpu"), True, torch.Generator().manual_seed(0))
    assert len(sets) == 2
    for q, k, v in sets:
        assert q.shape == (2, 5, 2, 16) and k.shape == v.shape == (2, 88, 2, 16)
        assert _random(q) and _random(k) and _random(v) and not torch.equal(k, v)


def test_decode_rows_leave_out_the_torch_backend_that_sdpa_dense_mask_already_times(monkeypatch):
    """worldvla's torch decode backend is SDPA under the dense mask, the sdpa-dense-mask baseline itself: it gets no
    worldvla row of its own, which the decode bandwidth target (judged on worldvla rows) would otherwise read."""
    from worldvla.benchmarks import attention as A

    timed = []
    monkeypatch.setattr(A, "time_interleaved", _fixed_medians({}, timed))
    rows = A.run_decode([("d", 32, 5, 1)], 2, 16, torch.float32, torch.device("cpu"), True,
                        torch.Generator().manual_seed(0))
    impls = {r["impl"] for r in rows}
    assert {"sdpa-dense-mask", "sdpa-nomask(floor)"} <= impls and "worldvla-torch" not in impls
    assert timed and all("worldvla-torch" not in names for names in timed)


def test_decode_bandwidth_target_is_met_at_exactly_its_fraction():
    """The decode target is "at least 0.8 of the copy bandwidth": exactly 0.8 meets it, just under does not."""
    from worldvla.benchmarks import attention as A

    rows = [{"case": "c", "impl": "worldvla-native", "median_ms": 1.0, "fraction_of_copy_bandwidth": 0.8}]
    assert A.decode_bandwidth_target(rows, 1000.0, case="c")["met"] is True
    rows[0]["fraction_of_copy_bandwidth"] = 0.79
    assert A.decode_bandwidth_target(rows, 1000.0, case="c")["met"] is False


def test_case_names_say_the_shapes_they_run():
    """A case's name is what a report shows: its image size, query rows, batch and cache length are those it runs
    (512px: 512 px documents; K5: 5 rows; step: 1 row; B8: 8 sequences; 16k: a 16,384-token cache)."""
    from worldvla.benchmarks import attention as A

    decode = A.decode_case_list(True, False) + A.decode_case_list(False, False)
    assert decode
    for name, px, n_queries, batch, *tokens in decode:
        m = re.search(r"(\d+)px", name)
        assert px == (int(m.group(1)) if m else 256), name
        assert n_queries == (1 if "step" in name else int(re.search(r"K(\d+)", name).group(1))), name
        m = re.search(r"B(\d+)", name)
        assert batch == (int(m.group(1)) if m else 1), name
        assert tokens == ([16384] if "16k" in name else []), name
    prefill = A.prefill_cases(True, False) + A.prefill_cases(False, False) + A.prefill_cases(False, True)
    for name, px, tokens, causal in prefill:
        m = re.search(r"(\d+)px", name)
        assert px == (int(m.group(1)) if m else 256) and causal == (name == "causal"), name


# ------------------------------------------------------------------ cross-entropy, VQ, sampling: shapes and inputs
def test_cross_entropy_inputs_are_random_and_labels_vary(monkeypatch, tmp_path):
    """The hidden rows and the head are random draws, and the labels spread over the vocabulary (not one id)."""
    from worldvla.benchmarks import cross_entropy as CE

    sets = _recorded_rotations(monkeypatch, CE, 1)
    monkeypatch.setattr(CE, "timed_backends", lambda op: [])
    monkeypatch.setattr(CE, "time_interleaved", _fixed_medians({}))
    monkeypatch.setattr(CE, "peak_memory", lambda fn, device: 1000)
    CE.run(quick=True, device="cpu", out_dir=tmp_path)
    (h, w, y, rows), = sets
    assert h.shape == (128, 256) and w.shape == (8192, 256) and _random(h) and _random(w)
    assert y.shape == (128,) and bool(((y >= 0) & (y < 8192)).all()) and y.unique().numel() > 100
    assert rows.tolist() == list(range(128))


def test_cross_entropy_float32_results_get_a_few_eps_of_slack():
    """A float32 side may be off by 2x torch's own error plus 4 float32 eps of the reference's largest magnitude:
    a loss 2 eps past twice torch's error still matches; 6 eps past it does not. The side's gradients are the
    float64 ones rounded to float32."""
    from worldvla.benchmarks import cross_entropy as CE
    from worldvla.ops.cross_entropy import linear_cross_entropy_ref

    h, w, y, rows, cw = cross_entropy_case()
    h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    loss64 = linear_cross_entropy_ref(h64, w64, y, cw, CE.Z_WEIGHT)[0]
    gh, gw = (t.float() for t in torch.autograd.grad(loss64, (h64, w64)))
    loss64 = loss64.detach()
    torch_err = abs(float(linear_cross_entropy_ref(h, w, y, cw, CE.Z_WEIGHT)[0].detach().double() - loss64))
    eps = torch.finfo(torch.float32).eps * abs(float(loss64))

    def side(extra):
        def fn(h, w, y, rows):
            part = (h * gh).sum() + (w * gw).sum()  # the float64 gradients, rounded
            value = float(loss64) + 2 * torch_err + extra * eps
            return part + (torch.tensor(value, dtype=torch.float64) - part.detach().double()).float(), None
        return fn

    out = CE.check_sides({"slack": side(2), "past": side(6)}, h, w, y, rows, cw)
    assert out["slack"]["matches_reference"] is True and out["slack"]["worst_over_tolerance"] <= 1
    assert out["past"]["matches_reference"] is False and out["past"]["worst_over_tolerance"] > 1


def test_full_runs_take_their_full_cpu_shapes(monkeypatch, tmp_path):
    """Without --quick the CPU cases are the full ones: cross-entropy 512 labelled rows x hidden 256 x vocabulary
    8192; the VQ search 256 vectors against the release's 8192 x 256 codebook; constrained sampling a hidden
    size of 4096 over the 65,536-id vocabulary."""
    from worldvla.benchmarks import cross_entropy as CE
    from worldvla.benchmarks import sampling, vq

    one = lambda make, device, quick=False, **kw: common.Rotation(make, device, n=1)  # noqa: E731
    for mod in (CE, vq, sampling):
        monkeypatch.setattr(mod, "time_interleaved", _fixed_medians({}))
        monkeypatch.setattr(mod, "Rotation", one)
    monkeypatch.setattr(CE, "check_sides", lambda impls, *a: {name: {"matches_reference": True} for name in impls})
    monkeypatch.setattr(CE, "timed_backends", lambda op: [])
    monkeypatch.setattr(CE, "peak_memory", lambda fn, device: 1000)
    rows = json.loads(CE.run(quick=False, device="cpu", out_dir=tmp_path).read_text())["rows"]
    assert [(r["N"], r["hidden"], r["vocab"]) for r in rows] == [(512, 256, 8192)]
    monkeypatch.setattr(vq, "timed_backends", lambda op: [])
    rows = json.loads(vq.run(quick=False, device="cpu", out_dir=tmp_path).read_text())["rows"]
    assert [(r["N"], r["K"], r["C"]) for r in rows] == [(256, 8192, 256)]

    heads = []

    def windows(V, Hd, R, n, device, dtype):  # stand-ins of the lm_head's shape, no 1 GiB weight made
        heads.append((V, Hd, R, n))
        return [torch.zeros(1).expand(V, Hd)] * n

    monkeypatch.setattr(sampling, "lm_head_windows", windows)
    monkeypatch.setattr(sampling, "rotation_count", lambda *a, **kw: 1)
    monkeypatch.setattr(sampling, "timed_backends", lambda op: [])
    monkeypatch.setattr(sampling, "full_vocab_greedy", lambda h, w, lo, hi: torch.full((h.shape[0],), lo))
    rows = json.loads(sampling.run(quick=False, device="cpu", out_dir=tmp_path).read_text())["rows"]
    assert [(r["rows"], r["hidden"], r["vocab"]) for r in rows] == [(1, 4096, 65536), (5, 4096, 65536),
                                                                    (10, 4096, 65536)]
    assert heads == [(65536, 4096, 256, 1)] * 3


def test_vq_and_sampling_inputs_are_random(monkeypatch, tmp_path):
    """The VQ search's vectors and codebook, and the sampling hidden rows, are random draws."""
    from worldvla.benchmarks import sampling, vq

    for dtype in (torch.float32, torch.bfloat16):
        z, cb, z32, cb32 = vq.make_inputs(64, 128, 16, dtype, "cpu")(0)
        assert z.shape == (64, 16) and cb.shape == (128, 16) and _random(z) and _random(cb)
    sets = _recorded_rotations(monkeypatch, sampling, 1)
    monkeypatch.setattr(sampling, "rotation_count", lambda *a, **kw: 1)
    monkeypatch.setattr(sampling, "timed_backends", lambda op: [])
    monkeypatch.setattr(sampling, "time_interleaved", _fixed_medians({}))
    sampling.run(quick=True, device="cpu", out_dir=tmp_path)
    assert [h.shape[0] for h, _ in sets] == [1, 5, 10]
    for h, w in sets:
        assert h.shape[1] == 1024 and _random(h) and _random(w[:512])


# ------------------------------------------------------------------ cpu_ops: inputs
def test_cpu_ops_inputs_and_decode_caches_are_random(monkeypatch, tmp_path):
    """Every input of every cpu_ops case (prefill q, k, v; decode rows and caches; sampling hidden rows; VQ vectors
    and codebook; the projections' rows) is a random draw of its own, and the decoder layers read a random K/V
    cache."""
    pytest.importorskip("worldvla._C")
    from worldvla import ops
    from worldvla.benchmarks import cpu_ops

    caches = []
    sets = _recorded_rotations(monkeypatch, cpu_ops, 1)

    def interleaved(fns, rot, warmup, repeats):
        for fn in fns.values():
            fn(*rot.next())
        return {name: {"median_ms": 1.0, "repeats": repeats} for name in fns}

    real = ops.resolve_decoder_layer
    monkeypatch.setattr(ops, "resolve_decoder_layer", lambda layer, x, ctx, b: caches.append(ctx.cache)
                        or real(layer, x, ctx, b))
    monkeypatch.setattr(cpu_ops, "rotation_count", lambda *a, **kw: 1)
    monkeypatch.setattr(cpu_ops, "interleaved", interleaved)
    monkeypatch.setattr(cpu_ops, "plot_speedups", lambda rows, path: None)
    cpu_ops.run(quick=True, out_dir=tmp_path)
    floats = []
    for s in sets:
        tensors = [t for x in s for t in (x.values() if isinstance(x, dict) else [x]) if t.is_floating_point()]
        for i, a in enumerate(tensors):  # each input of a set its own draw (q, k, v; K and V; ...)
            assert all(a.data_ptr() != b.data_ptr() and not torch.equal(a, b) for b in tensors[i + 1:]), a.shape
        floats += tensors
    assert len(floats) > 20
    for t in floats:
        assert _random(t if t.shape[0] < 4096 else t[-512:]), t.shape
    assert caches
    for c in caches:
        assert _random(c.k) and _random(c.v) and not torch.equal(c.k, c.v)


def test_prefill_of_two_documents_that_exactly_halve_the_grid_counts_them_apart(monkeypatch):
    """Two 88-token documents (T = 176): 2 x 88^2 = 15,488 is exactly half of 176^2, which the torch backend's
    rule ("at least halves") still runs apart, so its row counts 15,488 pairs, not the whole 30,976."""
    by = _prefill_rows(monkeypatch, 176)
    assert by["worldvla-torch", "fwd"]["tokens"] == 176 and by["worldvla-torch", "fwd"]["documents"] == 2
    for mode in ("fwd", "fwd+bwd"):
        assert by["worldvla-torch", mode]["attended_pairs"] == 2 * 88 * 88
        assert by["sdpa-dense-mask", mode]["attended_pairs"] == 176 * 176


def test_prefill_cases_take_the_token_budget_of_their_device_and_quick():
    """The CPU's prefill cases pack 1,300 tokens, 650 under --quick; CUDA's pack 16,384 either way."""
    from worldvla.benchmarks import attention as A

    assert [(name, tokens) for name, _, tokens, _ in A.prefill_cases(False, False)] == [("256px", 1300),
                                                                                        ("causal", 1300)]
    assert [(name, tokens) for name, _, tokens, _ in A.prefill_cases(False, True)] == [("256px", 650),
                                                                                       ("causal", 650)]
    for quick in (False, True):
        assert [(name, tokens) for name, _, tokens, _ in A.prefill_cases(True, quick)] == [
            ("256px", 16384), ("causal", 16384), ("512px", 16384)]


def test_decode_cache_of_exactly_the_documents_length_holds_the_document_alone():
    """`tokens` equal to the document's length is a cache of that document and no history: the same rows, limits
    and cache as without `tokens`; one token fewer is refused, naming both lengths."""
    from worldvla.benchmarks import attention as A

    n = len(A.action_document(32, gen=torch.Generator().manual_seed(0)))
    plain = A.decode_meta(32, 5, 1, torch.Generator().manual_seed(0))
    exact = A.decode_meta(32, 5, 1, torch.Generator().manual_seed(0), tokens=n)
    assert exact.kv_block.shape == (1, n) and exact.kv_len.tolist() == [n]
    for a, b in zip((plain.q_pos, plain.q_limit, plain.kv_block), (exact.q_pos, exact.q_limit, exact.kv_block)):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match=f"a {n - 1}-token cache cannot hold the {n}-token document"):
        A.decode_meta(32, 5, 1, torch.Generator().manual_seed(0), tokens=n - 1)


def test_cpu_attention_run_times_four_heads_of_64_in_float32(monkeypatch, tmp_path):
    """On the CPU every case runs 4 heads of head dim 64 in float32, and the JSON says so."""
    from worldvla.benchmarks import attention as A

    shapes = []
    row = {"impl": "worldvla-torch", "median_ms": 1.0, "matches_reference": True}

    def fake(mode):
        return lambda cases, H, Dh, dtype, *a, **k: shapes.append((H, Dh, dtype)) or [
            dict(row, case=cases[0][0], mode=mode)]

    monkeypatch.setattr(A, "run_decode", fake("decode"))
    monkeypatch.setattr(A, "run_prefill", fake("fwd"))
    doc = json.loads(A.run(quick=True, device="cpu", out_dir=tmp_path).read_text())
    assert shapes == [(4, 64, torch.float32)] * 3
    assert (doc["heads"], doc["head_dim"], doc["dtype"]) == (4, 64, "torch.float32")
