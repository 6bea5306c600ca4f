"""Constrained decoding in Triton: only the logits of the vocabulary range [lo, hi) are computed.

Greedy: a fused matvec + argmax. Each program computes the logits of a tile of the range
for a tile of rows (fp32 accumulation) and keeps only their (max, first argmax); a tiny
torch reduction over the tiles picks the winner (ties go to the lowest id and the first NaN
wins, as torch.argmax).
Sampling: the same kernel writes the range's fp32 logits, then top-k and the Gumbel-max draw
are torch's (`worldvla.ops.sampling.sample_logits`, as in the reference).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import BIG, INTERPRET, check_device, check_dtype, dot_precision, grid_limit_problem, load_f32


@triton.jit
def _range_logits_kernel(HID, W, LOGITS, TMAX, TARG, N, Hd, lo, n_range, n_tiles, s_hn, s_wv, s_ln,
                         BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                         WRITE_LOGITS: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr):
    pid_v = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    r_valid = rows < N
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)  # offsets inside the range
    c_valid = cols < n_range
    offs_h = tl.arange(0, BLOCK_H)
    acc = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
    for h0 in range(0, Hd, BLOCK_H):
        hh = h0 + offs_h
        h_valid = hh < Hd
        x = load_f32(HID + rows.to(tl.int64)[:, None] * s_hn + hh[None, :], r_valid[:, None] & h_valid[None, :], UPCAST)
        w = load_f32(W + (lo + cols).to(tl.int64)[:, None] * s_wv + hh[None, :], c_valid[:, None] & h_valid[None, :],
                     UPCAST)
        acc += tl.dot(x, tl.trans(w), input_precision=DOT_PREC)
    if WRITE_LOGITS:
        tl.store(LOGITS + rows.to(tl.int64)[:, None] * s_ln + cols[None, :], acc,
                 mask=r_valid[:, None] & c_valid[None, :])
    else:
        # A NaN logit ranks above every number, as in torch.argmax, but tl.max skips NaN (maxnumf,
        # compiled and interpreted). So the maximum is taken over the numbers only, and one
        # min-reduction finds the tile's first NaN if it has one (its column as it is) or else its
        # first maximum (column + BIG); a tile holding a NaN reports NaN, which torch's argmax over
        # the tiles then takes first.
        valid = c_valid[None, :]
        nan = valid & (acc != acc)
        acc = tl.where(valid & ~nan, acc, float("-inf"))
        tmax = tl.max(acc, 1)
        pick = tl.min(tl.where(nan, cols[None, :], tl.where(acc == tmax[:, None], cols[None, :] + BIG, 2147483647)), 1)
        has_nan = pick < BIG
        tl.store(TMAX + rows * n_tiles + pid_v, tl.where(has_nan, float("nan"), tmax), mask=r_valid)
        tl.store(TARG + rows * n_tiles + pid_v, tl.where(has_nan, pick, pick - BIG), mask=r_valid)


# Rows a program takes (decoding samples a few rows at a time)
BLOCK_ROWS = 16


def gpu_launch(dtype: torch.dtype):
    """(BLOCK_V, BLOCK_H, compiler options) on the GPU. fp32 dots (input_precision="ieee") are FMA loops
    holding their operands in registers: 128 hidden channels a step spilled there on sm_90 (about 420
    bytes a thread), 32 over 8 warps do not."""
    if dtype == torch.float32:
        return 64, 32, dict(num_warps=8, num_stages=3)
    return 64, 128, dict(num_warps=4, num_stages=3)


def grid_problem(N: int) -> str | None:
    """Why the kernel cannot launch for N rows, or None: its grid is (vocabulary tiles, row tiles)."""
    return grid_limit_problem((1, triton.cdiv(N, BLOCK_ROWS)), ("vocabulary tiles", "row tiles"))


def _launch(hidden, weight, lo, hi, write_logits):
    N, Hd = hidden.shape
    n_range = hi - lo
    if n_range + 128 > BIG.value:  # the greedy pick offsets column indices by BIG within int32
        raise ValueError(f"a vocabulary range of {n_range} ids is too large for the Triton kernel (< 2^30)")
    why = grid_problem(N)
    if why is not None:
        raise ValueError(f"constrained_sample: {why}; split the rows")
    bn = BLOCK_ROWS
    if INTERPRET:
        bv, bh, warps = 128, min(128, max(16, triton.next_power_of_2(Hd))), {}
    else:
        bv, bh, warps = gpu_launch(hidden.dtype)
    n_tiles = triton.cdiv(n_range, bv)
    dev = hidden.device
    if write_logits:
        logits = torch.empty((N, n_range), dtype=torch.float32, device=dev)
        tmax = targ = logits  # unused
    else:
        logits = None
        tmax = torch.empty((N, n_tiles), dtype=torch.float32, device=dev)
        targ = torch.empty((N, n_tiles), dtype=torch.int32, device=dev)
    _range_logits_kernel[(n_tiles, triton.cdiv(N, bn))](
        hidden, weight, logits if write_logits else tmax, tmax, targ, N, Hd, lo, n_range, n_tiles,
        hidden.stride(0), weight.stride(0), logits.stride(0) if write_logits else 0,
        BLOCK_N=bn, BLOCK_V=bv, BLOCK_H=bh, WRITE_LOGITS=write_logits, UPCAST=INTERPRET,
        DOT_PREC=dot_precision(hidden.dtype), **warps)
    return logits if write_logits else (tmax, targ)


def range_logits(hidden, weight, lo, hi):
    """fp32 logits [N, hi - lo] of the vocabulary range [lo, hi)."""
    hidden, weight = _check(hidden, weight, lo, hi)
    return _launch(hidden, weight, lo, hi, True)


def _check(hidden, weight, lo, hi):
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"constrained_sample wants hidden [N, H] and weight [V, H]; got {tuple(hidden.shape)}, "
                         f"{tuple(weight.shape)}")
    if not 0 <= lo < hi <= weight.shape[0]:
        raise ValueError(f"vocabulary range [{lo}, {hi}) is empty or outside [0, {weight.shape[0]})")
    if hidden.dtype != weight.dtype:
        raise TypeError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must share a dtype")
    check_dtype("constrained_sample", hidden)
    check_device("constrained_sample", hidden, weight)
    hidden = hidden if hidden.stride(1) == 1 else hidden.contiguous()
    weight = weight if weight.stride(1) == 1 else weight.contiguous()
    return hidden, weight


def constrained_sample(hidden, weight, lo, hi, temperature=0.0, top_k=None, generator=None, gumbel=None):
    """Same contract as worldvla.ops.constrained_sample: token ids [N] in [lo, hi)."""
    hidden, weight = _check(hidden, weight, lo, hi)
    if hidden.shape[0] == 0:
        return torch.empty(0, dtype=torch.int64, device=hidden.device)
    if temperature <= 0.0:
        tmax, targ = _launch(hidden, weight, lo, hi, False)
        best_tile = tmax.argmax(dim=1, keepdim=True)  # first tile holding the maximum
        return targ.gather(1, best_tile).squeeze(1).long() + lo
    from worldvla.ops.sampling import sample_logits  # here, not at import: worldvla.ops loads this module

    return sample_logits(_launch(hidden, weight, lo, hi, True), temperature, top_k, generator, gumbel) + lo
