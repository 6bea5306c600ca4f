"""Training throughput: the package's path (packed documents, chunk-masked attention through
worldvla.ops, fused linear cross-entropy on labelled rows only) vs the reference-style path of the
release (right-padded batch, dense mask, full-vocabulary fp32 logits at every position).

Reports tokens/s (real tokens, padding excluded), MFU (6 * params * tokens / time / peak; GPU only)
and peak memory."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from worldvla.model import ModelConfig, WorldVLA, loss_class_weights

from .attention import LAYOUT, action_document
from .common import main_for, peak_memory, print_table, time_fn, write_results

PEAK_BF16 = {"H100": 989e12, "H200": 989e12}


def one_b_config() -> ModelConfig:
    return ModelConfig(hidden_size=2048, intermediate_size=5504, num_hidden_layers=16, num_attention_heads=16,
                       num_key_value_heads=16, max_position_embeddings=4096)


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
    (for the whole process; the CPU peak-memory column is then None: reused heap hides it)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_gpu = device.type == "cuda"
    gen = torch.Generator().manual_seed(0)
    configs = {"small": ModelConfig.small(LAYOUT)}
    if on_gpu:
        configs["1b"] = one_b_config()
    n_docs = 8 if on_gpu else (2 if quick else 4)
    if tune_malloc and not on_gpu:
        from worldvla.inference.malloc import tune_cpu_malloc

        tune_cpu_malloc(mmap=False)  # as `worldvla train` does on the CPU (peak memory then unmeasured)
    px = 256
    rows = []
    for cname, cfg in configs.items():
        model = WorldVLA(cfg).init_weights(generator=gen).to(device)
        n_params = model.num_parameters()
        samples = _samples(n_docs, px, gen)
        tokens = sum(len(s[0]) for s in samples)
        ids_p = torch.cat([s[0] for s in samples]).to(device)
        lab_p = torch.cat([s[1] for s in samples]).to(device)
        cu = torch.tensor([0] + [len(s[0]) for s in samples]).cumsum(0).to(torch.int32).to(device)
        Lmax = max(len(s[0]) for s in samples)
        ids_b = torch.stack([F.pad(s[0], (0, Lmax - len(s[0])), value=0) for s in samples]).to(device)
        lab_b = torch.stack([F.pad(s[1], (0, Lmax - len(s[1])), value=-100) for s in samples]).to(device)
        cw = loss_class_weights(LAYOUT).to(device)
        amp = torch.autocast("cuda", torch.bfloat16) if on_gpu else torch.autocast("cpu", enabled=False)

        def ours():
            with amp:
                loss, _ = model.loss(ids_p, lab_p, cu_seqlens=cu)
            loss.backward()

        def reference():
            model.attn_backend = "torch"
            with amp:
                logits = model(ids_b)[:, :-1].reshape(-1, cfg.vocab_size)
                y = lab_b[:, 1:].reshape(-1)
                ce = F.cross_entropy(logits, y, weight=cw, ignore_index=-100)
                lse = torch.logsumexp(logits[y != -100], -1)
                loss = ce + 1e-5 * (lse ** 2).mean()
            loss.backward()
            model.attn_backend = "auto"

        for name, fn in (("worldvla", ours), ("reference-style", reference)):
            t = time_fn(fn, device=device, warmup=1 if quick else 3, repeats=2 if quick else 10,
                        setup=lambda: model.zero_grad(set_to_none=True))
            mem = peak_memory(fn, device)
            tps = tokens / (t["median_ms"] * 1e-3)
            peak = next((v for k, v in PEAK_BF16.items() if on_gpu and k in torch.cuda.get_device_name(device)), None)
            rows.append({"config": cname, "params": n_params, "impl": name, "tokens": tokens, **t,
                         "tokens_per_s": tps, "mfu": (6 * n_params * tps / peak) if peak else None, "peak_bytes": mem})
        base = rows[-1]["median_ms"]
        rows[-2]["speedup_vs_reference"] = base / rows[-2]["median_ms"]
        del model
    print_table(rows, ["config", "params", "impl", "tokens", "median_ms", "tokens_per_s", "mfu", "peak_bytes", "speedup_vs_reference"])
    return write_results("train", rows, device, out_dir, plot=("config", "tokens_per_s", "impl"))


def main(argv=None):
    return main_for(run, __doc__, argv, flags={
        "--tune-malloc": "CPU: every block from glibc's heap, as `worldvla train` does there (peak memory unmeasured)"})

if __name__ == "__main__":
    main()
