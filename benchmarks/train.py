"""Training throughput: the package's path (packed documents, chunk-masked attention through
worldvla.ops, fused linear cross-entropy on the labelled rows only, the mask metadata and the
labelled rows found on the host inside the timed step, as `worldvla train` does) vs the reference-style path
of the release (right-padded batch, dense mask, full-vocabulary fp32 logits at every position).

Reports tokens/s (real tokens, padding excluded), peak memory and model FLOPs. Both sides' MFU
divides the same useful work, the model's (`USEFUL_FLOPS`), by the side's step time and the GPU's
peak (GPU only); `side_flops` is what the side's own method runs (`SIDE_FLOPS`). The two sides' steps
are timed interleaved (`common.time_interleaved`) after the same warm-up."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from worldvla.data.store import pack
from worldvla.model import ModelConfig, WorldVLA, loss_class_weights
from worldvla.train.trainer import micro_batch_loss

from .attention import LAYOUT, action_document, visible_pairs
from .common import (load_average, main_for, peak_memory, peak_memory_method, print_table,
                     time_interleaved, write_results)

# Dense bf16 tensor-core FLOP/s by the device name's part, the first match winning: the PCIe and NVL
# boards run lower clocks and power than the SXM ones the plain names are.
PEAK_BF16 = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H200 NVL": 835e12, "H100": 989e12, "H200": 989e12}

# A training step's FLOPs over its forward's: 3 (a backward of twice the forward's work), for attention too.
# MFU counts model FLOPs (PaLM's definition): no recomputation, so not attention.py's 3.5x, which follows
# FlashAttention-2's kernel count (its backward recomputes Q K^T) to compare kernels with published numbers.
# The same visible pairs give 3/3.5 = 6/7 of attention.py's fwd+bwd FLOPs here.
TRAIN_OVER_FORWARD = 3

USEFUL_FLOPS = ("useful_flops = 6 * decoder_layer_params * tokens + 6 * vocab * hidden * labelled_rows "
                "+ 3 * 4 * visible_pairs * heads * head_dim * layers: a training step (forward, and a backward of "
                "twice its work) of the decoder layers over the real tokens, of the lm_head over the rows that "
                "have a label, and of attention over the (query, key) pairs the chunk rule lets see each other; "
                "embedding lookups, norms, the loss's elementwise work and padding not counted. The same for both "
                "sides. Model FLOPs, as MFU is defined: attention's backward counted at 2x its forward, without the "
                "recomputation of Q K^T that FlashAttention-style kernels add (benchmarks/attention.py counts that, "
                "3.5x, to compare kernels with published numbers). mfu = useful_flops / median step time / peak "
                "dense bf16 FLOP/s (GPU only)")
SIDE_FLOPS = ("side_flops = 6 * decoder_layer_params * rows_run + 6 * vocab * hidden * head_rows "
              "+ 3 * 4 * pairs_run * heads * head_dim * layers: as useful_flops, with the rows the side runs "
              "its layers on (padding included), its head on (worldvla: the labelled rows; reference-style: "
              "every position of the padded batch) and the (query, key) pairs its attention computes "
              "(worldvla: the visible ones; reference-style: every pair of each padded sequence, B * L^2, "
              "as SDPA with a dense mask computes them)")


def one_b_config() -> ModelConfig:
    return ModelConfig(hidden_size=2048, intermediate_size=5504, num_hidden_layers=16, num_attention_heads=16,
                       num_key_value_heads=16, max_position_embeddings=4096)


def step_flops(model: WorldVLA, layer_rows: int, head_rows: int, pairs: int) -> int:
    """FLOPs of a training step (forward + backward, TRAIN_OVER_FORWARD = 3x the forward) with the decoder
    layers run on `layer_rows` rows, the lm_head on `head_rows` rows, and attention over `pairs` (query, key)
    pairs."""
    cfg = model.config
    layer_params = sum(p.numel() for p in model.model.layers.parameters())
    attention = 4 * pairs * cfg.num_attention_heads * cfg.head_dim * cfg.num_hidden_layers
    return TRAIN_OVER_FORWARD * (2 * layer_params * layer_rows + 2 * cfg.vocab_size * cfg.hidden_size * head_rows
                                 + attention)


def _samples(n_docs, px, gen):
    out = []
    for i in range(n_docs):
        ids = torch.tensor(action_document(px, gen=gen))
        labels = ids.clone()
        prompt = int((ids == LAYOUT.sep).nonzero()[0])
        labels[: prompt + 1] = -100
        out.append((ids, labels))
    return out


def run(quick=False, device=None, out_dir="benchmarks/results", tune_malloc: bool = False):
    """`tune_malloc`: on the CPU, `tune_cpu_malloc(mmap=False)` first, as `worldvla train` does there
    (for the whole process; peak memory is still measured, see `common.peak_memory`)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_gpu = device.type == "cuda"
    gen = torch.Generator().manual_seed(0)
    configs = {"small": ModelConfig.small(LAYOUT)}
    if on_gpu:
        configs["1b"] = one_b_config()
    n_docs = 8 if on_gpu else (2 if quick else 4)
    if tune_malloc and not on_gpu:
        from worldvla.inference.malloc import tune_cpu_malloc

        tune_cpu_malloc(mmap=False)  # as `worldvla train` does on the CPU
    px = 256
    peak = next((v for k, v in PEAK_BF16.items() if on_gpu and k in torch.cuda.get_device_name(device)), None)
    extra = {"dtype": "bfloat16 autocast, float32 weights" if on_gpu else "float32", "quick": quick,
             "load_average_start": load_average(),
             "tune_malloc": tune_malloc and not on_gpu, "n_docs": n_docs, "px": px,
             "peak_flops": peak, "mfu_formula": USEFUL_FLOPS, "side_flops_formula": SIDE_FLOPS,
             "peak_memory_method": peak_memory_method(device),
             "peak_memory": "one step (forward + backward) from no gradients held (zero_grad(set_to_none=True))"}
    rows = []
    for cname, cfg in configs.items():
        model = WorldVLA(cfg).init_weights(generator=gen).to(device)
        n_params = model.num_parameters()
        samples = _samples(n_docs, px, gen)
        tokens = sum(len(s[0]) for s in samples)
        ids_host, lab_host, cu_host = pack(samples, tokens)
        label_rows = (lab_host[1:] != -100).nonzero().squeeze(1)
        pairs = visible_pairs(model.attention_meta(ids_host, cu_host))
        Lmax = max(len(s[0]) for s in samples)
        ids_b = torch.stack([F.pad(s[0], (0, Lmax - len(s[0])), value=0) for s in samples])
        lab_b = torch.stack([F.pad(s[1], (0, Lmax - len(s[1])), value=-100) for s in samples])
        cw = loss_class_weights(LAYOUT).to(device)
        amp = torch.autocast("cuda", torch.bfloat16) if on_gpu else torch.autocast("cpu", enabled=False)

        def ours():
            # A micro-step as `worldvla train` runs it, its host work (the labelled rows, the ids' range check,
            # the mask metadata) and the moves to the device timed with it. The whole batch is one micro-batch
            # on one rank, so the trainer's rescaling of the loss (by share_w * world) is by 1 and left out,
            # and its z weight is model.loss's default (z_weight * share_n / share_w = 1e-5).
            loss, _ = micro_batch_loss(model, LAYOUT, ids_host, lab_host, cu_host, device, amp, class_weight=cw)
            loss.backward()

        def reference():
            model.attn_backend = "torch"
            with amp:
                # the padded batch moved to the device in the step, as ours moves its packed one
                logits = model(ids_b.to(device))[:, :-1].reshape(-1, cfg.vocab_size)
                y = lab_b.to(device)[:, 1:].reshape(-1)
                ce = F.cross_entropy(logits, y, weight=cw, ignore_index=-100)
                lse = torch.logsumexp(logits[y != -100], -1)
                loss = ce + 1e-5 * (lse ** 2).mean()
            loss.backward()
            model.attn_backend = "auto"

        useful = step_flops(model, tokens, label_rows.numel(), pairs)
        padded = ids_b.numel()  # the reference runs its layers and its head on every position
        dense_pairs = ids_b.shape[0] * Lmax * Lmax  # SDPA with a dense mask computes every pair
        sides = (("worldvla", ours, step_flops(model, tokens, label_rows.numel(), pairs), label_rows.numel()),
                 ("reference-style", reference, step_flops(model, padded, padded, dense_pairs), padded))
        # Interleaved (one step of each side a round, the order turning), so that a machine that speeds up or
        # slows down during the run moves both sides alike; each step starts from no gradients held.
        stats = time_interleaved({name: fn for name, fn, *_ in sides}, device=device, warmup=1 if quick else 3,
                                 repeats=2 if quick else 10, before=lambda name: model.zero_grad(set_to_none=True))
        for name, fn, side_flops, head_rows in sides:
            t = stats[name]  # 10 repeats or fewer: the fastest and slowest, not percentiles (`common._stats`)
            model.zero_grad(set_to_none=True)  # the timed repeats' gradients must not count as held memory
            mem = peak_memory(fn, device)
            model.zero_grad(set_to_none=True)
            sec = t["median_ms"] * 1e-3
            rows.append({"config": cname, "params": n_params,
                         "decoder_layer_params": sum(p.numel() for p in model.model.layers.parameters()),
                         "impl": name, "tokens": tokens, "labelled_rows": label_rows.numel(), "head_rows": head_rows,
                         "visible_pairs": pairs, **t, "tokens_per_s": tokens / sec,
                         "useful_flops": useful, "side_flops": side_flops, "useful_tflops_per_s": useful / sec / 1e12,
                         "mfu": useful / sec / peak if peak else None, "peak_bytes": mem})
        base = rows[-1]["median_ms"]
        rows[-2]["speedup_vs_reference"] = base / rows[-2]["median_ms"]
        del model
        if on_gpu:
            torch.cuda.empty_cache()
        # What is measured so far, in case the run is cut short; rewritten whole below.
        write_results("train", rows, device, out_dir, extra={**extra, "partial": True}, quick=quick)
    print_table(rows, ["config", "params", "impl", "tokens", "median_ms", "tokens_per_s", "useful_tflops_per_s", "mfu",
                       "peak_bytes", "speedup_vs_reference"])
    return write_results("train", rows, device, out_dir, extra=extra, plot=("config", "tokens_per_s", "impl"),
                         quick=quick)


def main(argv=None):
    return main_for(run, __doc__, argv, flags={
        "--tune-malloc": "CPU: every block from glibc's heap, as `worldvla train` does there"})

if __name__ == "__main__":
    main()
