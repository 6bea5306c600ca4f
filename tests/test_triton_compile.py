"""Every Triton kernel compiles for an H100 (sm_90) in the configurations the GPU path launches.

The interpreter accepts code that the compiler rejects (non-constexpr globals, branch type
mismatches, dot shapes below the minimum), and machines without a GPU only run the
interpreter, so this compiles ahead of time down to a cubin in a subprocess where
TRITON_INTERPRET is unset. It also checks that shared memory fits the H100's limit.
"""
import inspect
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

H100_SMEM = 232448
FLOAT_SCALARS = {"scale_log2", "scale", "inv_wsum", "z_coef"}


def _specs():
    from worldvla.kernels import attention as A
    from worldvla.kernels import decode_attention as D
    from worldvla.kernels import linear_ce as L
    from worldvla.kernels import sampling as S
    from worldvla.kernels import vq as V

    def attn(dt, d, bd, packed, warps, stages=3):
        prec = "ieee" if dt == "fp32" else "tf32"
        ptr = dict(Q=dt, K=dt, V=dt, O=dt, DO=dt, DQ=dt, DK=dt, DV=dt, LSE="fp32", DELTA="fp32",
                   KVB="i32", QL="i32", CU="i32", FULL_IDX="i32", FULL_CNT="i32", PART_IDX="i32", PART_CNT="i32")
        base = dict(HEAD_DIM=d, BLOCK_D=bd, PACKED=packed)
        opts = dict(num_warps=warps, num_stages=stages)
        return [
            (A._fwd_kernel, ptr, dict(base, BLOCK_M=128, BLOCK_N=64, UPCAST=False, DOT_PREC=prec), opts),
            (A._bwd_delta_kernel, ptr, dict(base, BLOCK_M=64), dict(num_warps=4)),
            (A._bwd_dkdv_kernel, ptr, dict(base, BLOCK_M=64, BLOCK_N=64, UPCAST=False, DOT_PREC=prec), opts),
            (A._bwd_dq_kernel, ptr, dict(base, BLOCK_M=64, BLOCK_N=64, UPCAST=False, DOT_PREC=prec), opts),
        ]

    dec_ptr = dict(Q="bf16", K="bf16", V="bf16", O="bf16", OP="fp32", LSEP="fp32", QPOS="i32", QLIM="i32",
                   KVB="i32", KVLEN="i32")
    dec = dict(HEAD_DIM=128, BLOCK_D=128, BLOCK_N=64, UPCAST=False, DOT_PREC="tf32")
    specs = attn("bf16", 128, 128, True, 8) + attn("fp32", 64, 64, False, 4) + attn("fp16", 96, 128, False, 8)[:1]
    specs += attn("fp32", 128, 128, False, 8, stages=2)[:1]  # the widest fp32 tiles the backend launches
    specs += [
        (D._split_kernel, dec_ptr, dict(dec, BLOCK_R=16, SINGLE=True), dict(num_warps=4, num_stages=2)),
        (D._split_kernel, dec_ptr, dict(dec, BLOCK_R=64, SINGLE=False), dict(num_warps=4, num_stages=2)),
        (D._combine_kernel, dec_ptr, dict(HEAD_DIM=128, BLOCK_D=128, BLOCK_R=16), dict(num_warps=4)),
        (V._argmin_kernel, dict(Z="bf16", E="bf16", ENORM="fp32", OUT="i64"),
         dict(BLOCK_N=64, BLOCK_K=128, BLOCK_C=64, UPCAST=False, DOT_PREC="tf32"), dict(num_warps=8, num_stages=3)),
        (V._argmin_kernel, dict(Z="fp32", E="fp32", ENORM="fp32", OUT="i64"),
         dict(BLOCK_N=64, BLOCK_K=128, BLOCK_C=64, UPCAST=False, DOT_PREC="ieee"), dict(num_warps=8, num_stages=3)),
        (V._gather_kernel, dict(IDX="i64", E="bf16", OUT="bf16"), dict(BLOCK_P=64, BLOCK_C=32, UPCAST=False),
         dict(num_warps=4)),
        (L._ce_rows_kernel, dict(LOGITS="bf16", TARGETS="i32", ROW_W="fp32", CE="fp32", LSE="fp32"),
         dict(HAS_WEIGHT=True, WRITE_GRAD=True, ROWS=1, BLOCK_V=4096), dict(num_warps=8)),
        (S._range_logits_kernel, dict(HID="bf16", W="bf16", LOGITS="fp32", TMAX="fp32", TARG="i32"),
         dict(BLOCK_N=16, BLOCK_V=64, BLOCK_H=128, WRITE_LOGITS=False, UPCAST=False, DOT_PREC="tf32"),
         dict(num_warps=4, num_stages=3)),
        (S._range_logits_kernel, dict(HID="bf16", W="bf16", LOGITS="fp32", TMAX="fp32", TARG="i32"),
         dict(BLOCK_N=16, BLOCK_V=64, BLOCK_H=128, WRITE_LOGITS=True, UPCAST=False, DOT_PREC="tf32"),
         dict(num_warps=4, num_stages=3)),
    ]
    return specs


def _compile_one(i):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel, ptrs, consts, opts = _specs()[i]
    sig = {}
    for n in inspect.signature(kernel.fn).parameters:
        if n in consts:
            sig[n] = "constexpr"
        elif n in ptrs:
            sig[n] = "*" + ptrs[n]
        else:
            sig[n] = "fp32" if n in FLOAT_SCALARS else "i32"
    label = f"{kernel.fn.__name__} {consts}"
    try:
        compiled = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=consts),
                                  target=GPUTarget("cuda", 90, 32), options=opts)
    except Exception as exc:  # report every kernel, not just the first
        return f"{label}: {type(exc).__name__}: {str(exc)[-600:]}"
    if compiled.metadata.shared > H100_SMEM:
        return f"{label}: {compiled.metadata.shared} bytes of shared memory"
    return None


def compile_all():
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
        failures = [f for f in pool.map(_compile_one, range(len(_specs()))) if f]
    if failures:
        print("\n\n".join(failures))
        sys.exit(1)
    print("all kernels compiled")


@pytest.mark.skipif(torch.cuda.is_available(), reason="GPU machines run the kernels themselves")
def test_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    r = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]


if __name__ == "__main__":
    compile_all()
