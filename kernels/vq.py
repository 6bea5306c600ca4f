"""VQ nearest-code search and codebook gather in Triton.

`vq_quantize`: argmin_c ||z_n - e_c||^2 = argmin_c (||e_c||^2 - 2 z_n . e_c) without the
[N, K] distance matrix: a program owns a tile of rows and one split of the codebook, walks
it in tiles, accumulates the dot products over the channel dimension and keeps a running
(min, argmin). The programs of a row tile merge through an int64 atomic_min on (order-
preserving distance bits, code); ties go to the lowest code index and a NaN distance (NaN or
inf inputs) is below every number, so the first NaN wins, as torch.argmin does.
Splitting the codebook keeps the GPU busy when a few frames give only a few row tiles.

`vq_gather`: codes [B, h, w] -> embeddings [B, C, h, w], written straight into the
decoder's channel-first layout.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (BIG, INTERPRET, check_device, check_dtype, dot_precision, grid_limit_problem, load_f32,
                      store_dtype)


@triton.jit
def _argmin_kernel(Z, E, ENORM, OUT, N, K, C, s_zn, s_ek, SPLIT,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr,
                   UPCAST: tl.constexpr, DOT_PREC: tl.constexpr):
    """OUT: int64 merge keys [N], preset to the int64 maximum; SPLIT codes per program."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    r_valid = rows < N
    k_begin = tl.program_id(1) * SPLIT
    k_end = tl.minimum(K, k_begin + SPLIT)
    offs_c = tl.arange(0, BLOCK_C)
    best = tl.full([BLOCK_N], float("inf"), tl.float32)
    best_idx = tl.zeros([BLOCK_N], tl.int32)
    z_rows = Z + rows.to(tl.int64)[:, None] * s_zn
    for k0 in range(k_begin, k_end, BLOCK_K):
        codes = k0 + tl.arange(0, BLOCK_K)
        k_valid = codes < k_end
        dots = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + offs_c
            c_valid = cols < C
            z = load_f32(z_rows + cols[None, :], r_valid[:, None] & c_valid[None, :], UPCAST)
            e = load_f32(E + codes.to(tl.int64)[:, None] * s_ek + cols[None, :], k_valid[:, None] & c_valid[None, :],
                         UPCAST)
            dots += tl.dot(z, tl.trans(e), input_precision=DOT_PREC)
        e_norm = tl.load(ENORM + codes, mask=k_valid, other=float("inf"))
        d = e_norm[None, :] - 2.0 * dots
        # A NaN distance is below every number, as in torch.argmin, but tl.min skips NaN (minnumf,
        # compiled and interpreted). So the minimum is taken over the numbers only, and one
        # min-reduction finds the tile's first NaN if it has one (its code as it is) or else its
        # first minimum (code + BIG).
        valid = k_valid[None, :]
        nan = valid & (d != d)
        d = tl.where(valid & ~nan, d, float("inf"))
        tile_min = tl.min(d, 1)
        first_min = tl.where(d == tile_min[:, None], codes[None, :] + BIG, 2147483647)
        pick = tl.min(tl.where(nan, codes[None, :], first_min), 1)
        tile_nan = pick < BIG
        tile_arg = tl.where(tile_nan, pick, pick - BIG)
        # A row's first NaN stays: its best turns NaN, and best == best fails from then on.
        better = ((tile_min < best) | tile_nan) & (best == best)
        best_idx = tl.where(better, tile_arg, best_idx)
        best = tl.where(better, tl.where(tile_nan, float("nan"), tile_min), best)
    # float bits -> an int32 with the same order (negative floats: magnitude bits flipped),
    # then (order, code) as one int64: the smallest distance wins, then the lowest code. A NaN
    # takes the lowest order of all, below -inf's.
    bits = (best + 0.0).to(tl.int32, bitcast=True)  # -0 -> +0
    order = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    order = tl.where(best != best, -2147483648, order)
    key = (order.to(tl.int64) << 32) | best_idx.to(tl.int64)
    tl.atomic_min(OUT + rows, key, mask=r_valid)


@triton.jit
def _gather_kernel(IDX, E, OUT, HW, C, K, s_ek, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, UPCAST: tl.constexpr):
    pid_p = tl.program_id(0)
    pid_c = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    p_valid = p < HW
    mask = p_valid[:, None] & (c < C)[None, :]
    idx = tl.load(IDX + b * HW + p, mask=p_valid, other=0).to(tl.int64)
    # A code outside [0, K) reads no memory and gives zeros (as the native gather): the entry point refuses
    # such codes, but not inside torch.compile, where it cannot read them.
    in_range = (idx >= 0) & (idx < K)
    vals = tl.load(E + idx[:, None] * s_ek + c[None, :], mask=mask & in_range[:, None], other=0.0)
    if UPCAST:
        vals = vals.to(tl.float32)
    tl.store(OUT + b * C * HW + c[None, :].to(tl.int64) * HW + p[:, None], vals.to(OUT.dtype.element_ty), mask=mask)


def argmin_gpu_launch(dtype: torch.dtype, C: int) -> dict:
    """Blocks and compiler options of the argmin on the GPU. fp32 dots (input_precision="ieee") are FMA
    loops holding their operands in registers: 64 channels a step spilled there on sm_90, 32 do not."""
    max_c = 32 if dtype == torch.float32 else 64
    return dict(BLOCK_N=64, BLOCK_K=128, BLOCK_C=min(max_c, max(16, triton.next_power_of_2(C))), num_warps=8,
                num_stages=3)


# (BLOCK_P, BLOCK_C) of the gather: positions by channels
GATHER_BLOCKS = (64, 64) if INTERPRET else (64, 32)


def gather_grid(B: int, hw: int, C: int) -> tuple[int, int, int]:
    return triton.cdiv(hw, GATHER_BLOCKS[0]), triton.cdiv(C, GATHER_BLOCKS[1]), B


def gather_grid_problem(indices_shape, C: int) -> str | None:
    """Why the gather cannot launch for indices [B, h, w] and C channels, or None."""
    B, h, w = indices_shape
    return grid_limit_problem(gather_grid(B, h * w, C), ("position tiles", "channel tiles", "batch"))


def code_splits(N: int, K: int, block_n: int, block_k: int, device: torch.device,
                n_splits: int | None = None) -> tuple[int, int]:
    """(programs per row tile, codes per program): `n_splits` if given, else about two programs
    per SM in all."""
    if n_splits is None:
        sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
        n_splits = triton.cdiv(2 * sms, triton.cdiv(N, block_n))
    splits = max(1, min(int(n_splits), triton.cdiv(K, block_k), 65535))
    split = triton.cdiv(triton.cdiv(K, splits), block_k) * block_k
    return triton.cdiv(K, split), split


def vq_quantize(z: torch.Tensor, codebook: torch.Tensor, n_splits: int | None = None) -> torch.Tensor:
    """z [N, C], codebook [K, C] -> int64 [N] nearest-code indices (fp32 distances). `n_splits`
    overrides how many programs share a row tile's codebook (default: `code_splits`)."""
    if z.dim() != 2 or codebook.dim() != 2 or z.shape[1] != codebook.shape[1]:
        raise ValueError(f"vq_quantize wants z [N, C] and codebook [K, C]; got {tuple(z.shape)}, {tuple(codebook.shape)}")
    check_dtype("vq_quantize", z, codebook)
    check_device("vq_quantize", z, codebook)
    N, C = z.shape
    K = codebook.shape[0]
    if K == 0:
        raise ValueError("vq_quantize: the codebook is empty")
    if K + 128 > BIG.value:  # the argmin offsets code indices by BIG within int32
        raise ValueError(f"vq_quantize: a codebook of {K} codes is too large for the Triton kernel (< 2^30)")
    # tl.dot wants one dtype: mixed inputs meet in the wider one (fp16 x bf16 -> fp32). fp16/bf16
    # products are exact in the fp32 accumulator, so this matches the reference's fp32 distances.
    common = torch.promote_types(z.dtype, codebook.dtype)
    z = z.to(common)
    z = z if z.stride(1) == 1 else z.contiguous()
    e = codebook.to(common)
    e = e if e.stride(1) == 1 else e.contiguous()
    e_norm = e.float().pow(2).sum(1)
    out = torch.full((N,), torch.iinfo(torch.int64).max, dtype=torch.int64, device=z.device)
    if N == 0:
        return out
    if INTERPRET:
        cfg = dict(BLOCK_N=64, BLOCK_K=128, BLOCK_C=min(128, max(16, triton.next_power_of_2(C))))
    else:
        cfg = argmin_gpu_launch(z.dtype, C)
    splits, split = code_splits(N, K, cfg["BLOCK_N"], cfg["BLOCK_K"], z.device, n_splits)
    _argmin_kernel[(triton.cdiv(N, cfg["BLOCK_N"]), splits)](
        z, e, e_norm, out, N, K, C, z.stride(0), e.stride(0), split, **cfg,
        UPCAST=INTERPRET, DOT_PREC=dot_precision(z.dtype))
    return out.bitwise_and_(0xFFFFFFFF)  # the key's low half: the code


def vq_gather(indices: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """indices [B, h, w] -> embeddings [B, C, h, w] in the codebook's dtype."""
    if indices.dim() != 3 or codebook.dim() != 2:
        raise ValueError(f"vq_gather wants indices [B, h, w] and codebook [K, C]; got {tuple(indices.shape)}, "
                         f"{tuple(codebook.shape)}")
    if indices.dtype.is_floating_point or indices.dtype.is_complex or indices.dtype == torch.bool:
        raise TypeError(f"vq_gather: indices must hold integer codes, got {indices.dtype}")
    check_device("vq_gather", indices, codebook)
    B, h, w = indices.shape
    K, C = codebook.shape
    why = gather_grid_problem(indices.shape, C)
    if why is not None:
        raise ValueError(f"vq_gather: {why}; split the batch")
    idx = indices.contiguous()
    e = codebook if codebook.stride(1) == 1 else codebook.contiguous()
    out = torch.empty((B, C, h, w), dtype=store_dtype(codebook.dtype), device=codebook.device)
    if out.numel():
        BP, BC = GATHER_BLOCKS
        _gather_kernel[gather_grid(B, h * w, C)](
            # UPCAST: the interpreter's bf16 pitfall; other dtypes copy as they are
            idx, e, out, h * w, C, e.shape[0], e.stride(0), BLOCK_P=BP, BLOCK_C=BC,
            UPCAST=INTERPRET and e.dtype == torch.bfloat16)
    return out.to(codebook.dtype)
