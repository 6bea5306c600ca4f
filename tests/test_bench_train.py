"""benchmarks.train: the run's settings, rows and writes on the tiny config and short documents (CPU), its
steps' timings stood in where only what the run records from them is checked."""
import json

import torch

from worldvla.benchmarks import train
from worldvla.model import ModelConfig, WorldVLA


def _doc(n, prompt):
    ids = torch.arange(20000, 20000 + n)
    return ids, torch.cat([torch.full((prompt,), -100), ids[prompt:]])


def _tiny_run(monkeypatch, tmp_path, quick=True, peak=None, writes=None):
    """train.run on the tiny config and two short documents; every side's median 50 ms (worldvla) or 200 ms
    (reference-style). Returns the final JSON and the `n_docs` the sample builder was asked for."""
    asked = []
    monkeypatch.setattr(ModelConfig, "small", classmethod(lambda cls, layout=None, **kw: cls.tiny(layout, **kw)))
    monkeypatch.setattr(train, "_samples", lambda n_docs, px, gen: asked.append((n_docs, px)) or [_doc(5, 2),
                                                                                                 _doc(9, 4)])
    medians = {"worldvla": 50.0, "reference-style": 200.0}

    def timing(fns, **kw):  # each side's step run once, as the run asks (gradients left behind), not timed
        for name, fn in fns.items():
            kw["before"](name)
            fn()
        return {name: {"median_ms": medians[name], "min_ms": medians[name], "max_ms": medians[name],
                       "warmup": kw["warmup"], "repeats": kw["repeats"]} for name in fns}
    monkeypatch.setattr(train, "time_interleaved", timing)
    monkeypatch.setattr(train, "peak_memory", peak or (lambda fn, device: 1))
    if writes is not None:
        real = train.write_results

        def spy(name, rows, device, out_dir, extra=None, **kw):
            writes.append((name, [dict(r) for r in rows], dict(extra or {})))
            return real(name, rows, device, out_dir, extra=extra, **kw)
        monkeypatch.setattr(train, "write_results", spy)
    path = train.run(quick=quick, device="cpu", out_dir=tmp_path)
    return json.loads(path.read_text()), asked


def test_a_cpu_run_packs_two_documents_quick_and_four_in_full(monkeypatch, tmp_path):
    """The documents a step trains on: 2 with --quick, 4 in a full CPU run, each of 256 px images; the JSON
    records how many."""
    doc, asked = _tiny_run(monkeypatch, tmp_path, quick=True)
    assert asked == [(2, 256)] and doc["n_docs"] == 2 and doc["px"] == 256
    doc, asked = _tiny_run(monkeypatch, tmp_path, quick=False)
    assert asked == [(4, 256)] and doc["n_docs"] == 4 and doc["quick"] is False


def test_cpu_rows_have_no_mfu_and_no_peak_flops(monkeypatch, tmp_path):
    """MFU divides by a GPU's dense bf16 peak: a CPU run has none, so its rows' mfu is None (not 0, which would
    read as a measured utilisation of nothing)."""
    doc, _ = _tiny_run(monkeypatch, tmp_path)
    assert doc["peak_flops"] is None
    assert [r["mfu"] for r in doc["rows"]] == [None, None]
    assert all(r["useful_tflops_per_s"] > 0 for r in doc["rows"])


def test_each_sides_peak_memory_is_measured_from_no_gradients_held(monkeypatch, tmp_path):
    """peak_bytes is one step from zero_grad(set_to_none=True), as the JSON says: the timed repeats' gradients
    are dropped before each side's measured step, and again after it."""
    held, models = [], []

    class Recorded(WorldVLA):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            models.append(self)

    def peak(fn, device):
        grads = lambda: sum(p.grad is not None for p in models[-1].parameters())
        held.append(grads())
        fn()
        held.append(grads())
        return 7
    monkeypatch.setattr(train, "WorldVLA", Recorded)
    doc, _ = _tiny_run(monkeypatch, tmp_path, peak=peak)  # the timed steps leave gradients behind
    assert "no gradients held" in doc["peak_memory"]
    assert held[0] == 0 and held[2] == 0 and held[1] > 0 and held[3] > 0
    assert [r["peak_bytes"] for r in doc["rows"]] == [7, 7]


def test_rows_count_the_decoder_layers_parameters_apart_from_the_whole_models(monkeypatch, tmp_path):
    """decoder_layer_params (the FLOP count's per-row weight) is the decoder layers' parameters only: the tiny
    config's 2 layers of 37,184; params is the whole model's, embedding and lm_head included."""
    doc, _ = _tiny_run(monkeypatch, tmp_path)
    with torch.device("meta"):
        n = WorldVLA(ModelConfig.tiny(train.LAYOUT)).num_parameters()
    for r in doc["rows"]:
        assert r["decoder_layer_params"] == 2 * 37_184 and r["params"] == n > r["decoder_layer_params"]


def test_the_gpu_config_is_a_1b_model():
    """The "1b" row's config: 16 layers of hidden 2048 (16 heads of 128), about 1.08 billion parameters."""
    cfg = train.one_b_config()
    with torch.device("meta"):
        n = WorldVLA(cfg).num_parameters()
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim) == (16, 2048, 16, 128)
    assert 1.0e9 < n < 1.2e9


def test_each_config_is_written_as_it_ends_then_the_whole_run(monkeypatch, tmp_path):
    """A run cut short keeps the configs measured so far: after each config a partial JSON with its rows, then
    the final one (not partial) with every row and the plot."""
    writes = []
    doc, _ = _tiny_run(monkeypatch, tmp_path, writes=writes)
    assert [(name, len(rows), extra.get("partial")) for name, rows, extra in writes] == [
        ("train", 2, True), ("train", 2, None)]
    assert "partial" not in doc and [r["impl"] for r in doc["rows"]] == ["worldvla", "reference-style"]


def test_samples_label_every_token_after_the_first_separator_only():
    """Each document's prompt (through its first separator) is unlabelled and the rest, its action blocks and the
    closing separator, labelled with its own ids; the ids are left as drawn."""
    gen = torch.Generator().manual_seed(0)
    samples = train._samples(2, 64, gen)
    assert len(samples) == 2
    for ids, labels in samples:
        seps = (ids == train.LAYOUT.sep).nonzero().squeeze(1).tolist()
        assert len(seps) == 2 and seps[-1] == len(ids) - 1
        assert int(ids[0]) == train.LAYOUT.bos and bool((ids >= 0).all())
        assert bool((labels[:seps[0] + 1] == -100).all()) and torch.equal(labels[seps[0] + 1:], ids[seps[0] + 1:])
        # 5 actions of 7 bins, each between BOA and EOA, and the final separator
        assert len(ids) - seps[0] - 1 == 5 * 9 + 1


def test_step_flops_scale_with_each_count_alone():
    """A training step's FLOPs: 3 x (2 x layer weights per row + 2 x vocab x hidden per head row + 4 x heads x
    head_dim x layers per visible pair), each term linear in its own count."""
    with torch.device("meta"):
        model = WorldVLA(ModelConfig.tiny())
    cfg = model.config
    layer = sum(p.numel() for p in model.model.layers.parameters())
    assert train.step_flops(model, 0, 0, 0) == 0
    assert train.step_flops(model, 1, 0, 0) == 6 * layer
    assert train.step_flops(model, 0, 1, 0) == 6 * cfg.vocab_size * cfg.hidden_size
    assert train.step_flops(model, 0, 0, 1) == 12 * cfg.num_attention_heads * cfg.head_dim * cfg.num_hidden_layers
