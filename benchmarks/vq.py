"""VQ nearest-code search: worldvla backends vs torch.cdist + argmin (the usual PyTorch path).

Work: N*K*C multiply-adds for the distances; bytes: z (N*C) + codebook (K*C) read once, N int64 written.
Inputs rotate (common.Rotation): a frame's z and the 8 MB codebook would otherwise sit in L2.
On GPU each case runs in fp32 (the release's VQGAN dtype; the CUDA kernel's two-pass bf16 tensor-core
search with exact recomputation) and in bf16 (one tensor-core pass); the baseline is always fp32 cdist.
"""
from __future__ import annotations

import torch

from worldvla import ops

from .common import Rotation, main_for, print_table, time_fn, timed_backends, write_results


def cdist_argmin(z, codebook):
    return torch.cdist(z.float(), codebook.float()).argmin(dim=1)


def run(quick=False, device=None, out_dir="benchmarks/results"):
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_gpu = device.type == "cuda"
    # 256 px frames -> 16x16 codes, 512 px -> 32x32; a few frames; the release's 8192 x 256 codebook.
    cases = [(2 * 256, 8192, 256), (4 * 1024, 8192, 256), (64 * 256, 8192, 256)] if on_gpu else \
        [(256, 8192 if not quick else 2048, 256)]
    rows = []
    for (N, K, C), dtype in [(c, d) for c in cases for d in ((torch.float32, torch.bfloat16) if on_gpu else
                                                              (torch.float32,))]:
        dt = str(dtype).replace("torch.", "")
        rot = Rotation(lambda i: (torch.randn(N, C, device=device).to(dtype),
                                  torch.randn(K, C, device=device).to(dtype)), device)
        z, cb = rot.sets[0]
        impls = {"cdist+argmin": cdist_argmin}
        for b in timed_backends("vq_quantize"):
            if ops.dispatch.supports("vq_quantize", b, z, cb):
                impls[f"worldvla-{b}"] = lambda z, cb, b=b: ops.vq_quantize(z, cb, backend=b)
        ref = cdist_argmin(z, cb)
        base = None
        for name, fn in impls.items():
            agree = float((fn(z, cb) == ref).float().mean())
            t = time_fn(fn, device=device, rotation=rot, warmup=2 if quick else 5, repeats=5 if quick else 50,
                        gpu_time=on_gpu)
            if name == "cdist+argmin":
                base = t["median_ms"]
            rows.append({"N": N, "K": K, "C": C, "dtype": dt, "impl": name, "series": f"{name} {dt}", **t,
                         "argmin_agreement": agree,
                         "tflops": 2 * N * K * C / (t["median_ms"] * 1e-3) / 1e12})
        for r in rows:
            if r["N"] == N and r["K"] == K and r["dtype"] == dt:
                r["speedup_vs_cdist"] = base / r["median_ms"]
    print_table(rows, ["N", "K", "C", "dtype", "impl", "median_ms", "tflops", "speedup_vs_cdist", "argmin_agreement",
                       "rotated_sets"])
    return write_results("vq_quantize", rows, device, out_dir, plot=("N", "speedup_vs_cdist", "series"))


def main(argv=None):
    return main_for(run, __doc__, argv)


if __name__ == "__main__":
    main()
