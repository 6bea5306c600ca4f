"""Every Triton kernel compiles for an H100 (sm_90) in the configurations the GPU path launches, within
shared memory and without spilling registers.

The interpreter accepts code that the compiler rejects (non-constexpr globals, branch type
mismatches, dot shapes below the minimum), and machines without a GPU only run the interpreter,
so this compiles ahead of time down to a cubin, in subprocesses where TRITON_INTERPRET is unset.
The configurations come from the launchers' own choices (each kernel module's `gpu_launch` and
the like) over dtype, head dim and the other launch-time switches, so a new choice is compiled
here without editing this file. Each cubin is checked for shared memory (sm_90's 232,448 bytes a
block) and for its stack frame a thread (cuobjdump -res-usage; Triton's kernels call no functions,
so the stack holds register spills), against MAX_STACK.

The "main" set (every kernel in bf16 and fp32 at head dims that are powers of two: packed attention
from 16, split decode from 64, the loss at a large vocabulary) runs by default; the "heavy" set (fp16,
ragged head dims 40 and 96, padded attention, decode at 16 and 32 and in one pass, small vocabularies,
other gather dtypes) is marked slow. On 2 CPU cores with an empty Triton cache they take about 30 s
and 110 s (Triton 3.9; a few seconds once cached).
"""
import inspect
import os
import re
import subprocess
import sys
import tempfile

import pytest
import torch

pytest.importorskip("triton")

H100_SMEM = 232448
# Stack bytes a thread allowed. With Triton 3.9 the main set compiles with none and the heavy set with
# at most 8 bytes; Triton 3.6 (the oldest supported) leaves up to 16 and 40 bytes, a few registers that
# ptxas trades for occupancy. 64 bytes (16 registers) leave room for that, while the spills this test
# exists to catch are far larger: 48 bytes to 1.4 KB for 16-bit tiles one step too large, 0.4 to 22 KB
# for fp32 FMA dots on tensor-core tiles, every spilled access a trip to local memory.
MAX_STACK = 64
FLOAT_SCALARS = {"scale_log2", "scale", "z_coef"}
# Integer arguments a real launch hints as multiples of 16 (and pointers, all aligned): strides when the
# rows are (head dims, channel and vocabulary sizes that are multiples of 16), and the cache and codebook
# slices of decode and VQ, multiples of their tiles by construction. Per-call sizes (sequence lengths,
# token, row and tile counts) get none: the compiled code must also serve the calls where they are not.
ALWAYS_ALIGNED = {"split_len", "SPLIT"}
TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _spec(kernel, ptrs, consts, opts, aligned_rows, heavy):
    return dict(kernel=kernel, ptrs=ptrs, consts=consts, opts=opts, aligned_rows=aligned_rows, heavy=heavy)


def _attention_specs(A, dt, head_dim, packed, heavy):
    ptr = dict(Q=dt, K=dt, V=dt, O=dt, DO=dt, DQ=dt, DK=dt, DV=dt, LSE="fp32", DELTA="fp32",
               KVB="i32", QL="i32", CU="i32", FULL_IDX="i32", FULL_CNT="i32", PART_IDX="i32", PART_CNT="i32")
    dtype = TORCH_DTYPES[dt]
    block_d = A.head_block(head_dim)
    (fwd, fwd_opts), (bwd, bwd_opts) = A.gpu_launch(dtype, block_d)
    base = dict(HEAD_DIM=head_dim, BLOCK_D=block_d, PACKED=packed)
    dot = dict(UPCAST=False, DOT_PREC=A.dot_precision(dtype))
    aligned = head_dim % 16 == 0
    return [
        _spec(A._fwd_kernel, ptr, dict(base, BLOCK_M=fwd[0], BLOCK_N=fwd[1], **dot), fwd_opts, aligned, heavy),
        _spec(A._bwd_delta_kernel, ptr, dict(base, BLOCK_M=bwd[0]), {}, aligned, heavy),
        _spec(A._bwd_dkdv_kernel, ptr, dict(base, BLOCK_M=bwd[0], BLOCK_N=bwd[1], **dot), bwd_opts, aligned, heavy),
        _spec(A._bwd_dq_kernel, ptr, dict(base, BLOCK_M=bwd[0], BLOCK_N=bwd[1], **dot), bwd_opts, aligned, heavy),
    ]


def _decode_specs(D, dt, head_dim, heavy):
    ptr = dict(Q=dt, K=dt, V=dt, O=dt, OP="fp32", LSEP="fp32", QPOS="i32", QLIM="i32", KVB="i32", KVLEN="i32")
    dtype = TORCH_DTYPES[dt]
    block_d = D.head_block(head_dim)
    aligned = head_dim % 16 == 0
    out = []
    for n_rows in (1, 17, 33):  # one row tile of each size the launcher picks (16, 32, 64 rows, capped)
        block_r, block_n, split_opts, merge_opts = D.gpu_launch(dtype, block_d, n_rows)
        for single in (False, True):
            consts = dict(HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_R=block_r, BLOCK_N=block_n, SINGLE=single,
                          UPCAST=False, DOT_PREC=D.dot_precision(dtype))
            out.append(_spec(D._split_kernel, ptr, consts, split_opts, aligned, heavy or single))
        out.append(_spec(D._combine_kernel, ptr, dict(HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_R=block_r),
                         merge_opts, aligned, heavy))
    return out


def _specs():
    from worldvla.kernels import attention as A
    from worldvla.kernels import decode_attention as D
    from worldvla.kernels import linear_ce as L
    from worldvla.kernels import sampling as S
    from worldvla.kernels import vq as V

    specs = []
    for dt in ("bf16", "fp32", "fp16"):
        dtype = TORCH_DTYPES[dt]
        fp16 = dt == "fp16"  # the same choices as bf16
        for head_dim in (16, 32, 64, 128, 256, 40, 96):
            ragged = head_dim & (head_dim - 1) != 0
            if head_dim <= A.MAX_HEAD_DIM:
                for packed in (True, False):
                    specs += _attention_specs(A, dt, head_dim, packed, fp16 or ragged or not packed)
            specs += _decode_specs(D, dt, head_dim, fp16 or ragged or head_dim < 64)

        logits = dict(LOGITS=dt, TARGETS="i32", ROW_W="fp32", CE="fp32", LSE="fp32")
        for vocab in (65536, 100, 1):
            rows, block_v, opts = L.gpu_launch(vocab)
            for has_weight in (False, True):
                for write_grad in (False, True):
                    specs.append(_spec(L._ce_rows_kernel, logits, dict(HAS_WEIGHT=has_weight, WRITE_GRAD=write_grad,
                                                                      ROWS=rows, BLOCK_V=block_v), opts,
                                       vocab % 16 == 0, fp16 or vocab < 65536))

        block_v, block_h, opts = S.gpu_launch(dtype)
        for write_logits in (False, True):
            specs.append(_spec(S._range_logits_kernel, dict(HID=dt, W=dt, LOGITS="fp32", TMAX="fp32", TARG="i32"),
                               dict(BLOCK_N=S.BLOCK_ROWS, BLOCK_V=block_v, BLOCK_H=block_h, WRITE_LOGITS=write_logits,
                                    UPCAST=False, DOT_PREC=S.dot_precision(dtype)), opts, True, fp16))

        for channels in (16, 32, 256):
            cfg = V.argmin_gpu_launch(dtype, channels)
            opts = {k: cfg.pop(k) for k in ("num_warps", "num_stages")}
            specs.append(_spec(V._argmin_kernel, dict(Z=dt, E=dt, ENORM="fp32", OUT="i64"),
                               dict(cfg, UPCAST=False, DOT_PREC=V.dot_precision(dtype)), opts, channels % 16 == 0,
                               fp16))

    # The gather copies codebooks of any dtype, indexed by codes of any integer dtype.
    BP, BC = V.GATHER_BLOCKS
    for idx, e in (("i64", "bf16"), ("i64", "fp32"), ("i64", "fp16"), ("i32", "fp64"), ("i16", "i1"), ("u8", "i32")):
        specs.append(_spec(V._gather_kernel, dict(IDX=idx, E=e, OUT=e), dict(BLOCK_P=BP, BLOCK_C=BC, UPCAST=False), {},
                           True, e not in ("bf16", "fp32")))

    unique = {}
    for s in specs:  # launch choices may coincide (e.g. the row tiles of fp32 decode at head dim 256)
        key = (s["kernel"].fn.__name__, repr(sorted(s["ptrs"].items())), repr(sorted(s["consts"].items())),
               repr(sorted(s["opts"].items())), s["aligned_rows"])
        unique[key] = dict(s, heavy=s["heavy"] and unique.get(key, s)["heavy"])
    return list(unique.values())


def _label(s):
    dtypes = sorted({v for k, v in s["ptrs"].items() if k in ("Q", "LOGITS", "HID", "Z", "E")})
    return f"{s['kernel'].fn.__name__} {'/'.join(dtypes)} {s['consts']} {s['opts']}"


def _cuobjdump():
    import triton

    tool = getattr(getattr(getattr(triton, "knobs", None), "nvidia", None), "cuobjdump", None)
    path = getattr(tool, "path", None)
    if not path:
        path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return path


def _compile_one(i, group):
    """(failure message or None, report line) of configuration i of the group."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    s = [x for x in _specs() if x["heavy"] == (group == "heavy")][i]
    kernel, ptrs, consts = s["kernel"], s["ptrs"], s["consts"]
    sig, attrs = {}, {}
    for j, n in enumerate(inspect.signature(kernel.fn).parameters):
        if n in consts:
            sig[n] = "constexpr"
        elif n in ptrs:
            sig[n] = "*" + ptrs[n]
            attrs[(j,)] = [["tt.divisibility", 16]]  # torch's allocations are aligned
        else:
            sig[n] = "fp32" if n in FLOAT_SCALARS else "i32"
            if n in ALWAYS_ALIGNED or (s["aligned_rows"] and n.startswith("s_")):
                attrs[(j,)] = [["tt.divisibility", 16]]
    label = _label(s)
    try:
        compiled = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=consts, attrs=attrs),
                                  target=GPUTarget("cuda", 90, 32), options=s["opts"])
    except Exception as exc:  # report every kernel, not just the first
        return f"{label}: {type(exc).__name__}: {str(exc)[-600:]}", label
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        usage = subprocess.run([_cuobjdump(), "-res-usage", path], capture_output=True, text=True).stdout
    regs, stack = re.search(r"REG:(\d+)", usage), re.search(r"STACK:(\d+)", usage)
    if regs is None or stack is None:
        return f"{label}: cuobjdump gave no resource usage: {usage[-300:]}", label
    regs, stack, smem = int(regs.group(1)), int(stack.group(1)), compiled.metadata.shared
    line = f"smem={smem:6d} regs={regs:3d} stack={stack:5d}  {label}"
    if smem > H100_SMEM:
        return f"{label}: {smem} bytes of shared memory", line
    if stack > MAX_STACK:
        return f"{label}: {stack} bytes of stack a thread (register spills; at most {MAX_STACK})", line
    return None, line


def compile_all(group):
    from concurrent.futures import ProcessPoolExecutor

    n = sum(s["heavy"] == (group == "heavy") for s in _specs())
    with ProcessPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
        results = list(pool.map(_compile_one, range(n), [group] * n))
    print("\n".join(line for _, line in results))
    failures = [f for f, _ in results if f]
    if failures:
        print("\nFAILED:\n" + "\n\n".join(failures))
        sys.exit(1)
    print(f"all {n} {group} configurations compiled")


def _run(group):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    r = subprocess.run([sys.executable, __file__, group], env=env, capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stdout[-8000:] + r.stderr[-3000:]


@pytest.mark.skipif(torch.cuda.is_available(), reason="GPU machines run the kernels themselves")
def test_kernels_compile_for_sm90():
    _run("main")


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="GPU machines run the kernels themselves")
def test_kernels_compile_for_sm90_heavy():
    _run("heavy")


def test_every_launch_choice_is_listed():
    """The spec list holds what the launchers pick for every dtype, head dim and row count they accept
    (it samples head dims and row counts: a new rule between the samples fails here)."""
    from worldvla.kernels import attention as A
    from worldvla.kernels import decode_attention as D

    have = {(s["kernel"].fn.__name__, s["ptrs"].get("Q"), s["consts"].get("BLOCK_D"), s["consts"].get("BLOCK_M"),
             s["consts"].get("BLOCK_N"), s["consts"].get("BLOCK_R"), repr(s["opts"])) for s in _specs()}
    for dt, dtype in TORCH_DTYPES.items():
        for head_dim in range(1, A.MAX_HEAD_DIM + 1):
            block_d = A.head_block(head_dim)
            (fwd, fwd_opts), (bwd, bwd_opts) = A.gpu_launch(dtype, block_d)
            assert ("_fwd_kernel", dt, block_d, *fwd, None, repr(fwd_opts)) in have, (dt, head_dim)
            assert ("_bwd_dkdv_kernel", dt, block_d, *bwd, None, repr(bwd_opts)) in have, (dt, head_dim)
        for block_d in (16, 32, 64, 128, 256):
            for n_rows in range(1, 200):
                block_r, block_n, split_opts, merge_opts = D.gpu_launch(dtype, block_d, n_rows)
                assert ("_split_kernel", dt, block_d, None, block_n, block_r, repr(split_opts)) in have, \
                    (dt, block_d, n_rows)
                assert ("_combine_kernel", dt, block_d, None, None, block_r, repr(merge_opts)) in have, \
                    (dt, block_d, n_rows)


if __name__ == "__main__":
    compile_all(sys.argv[1] if len(sys.argv) > 1 else "main")
