"""Decode attention against a KV cache with split-KV (flash-decoding), in Triton.

q [B, Q, H, Dh] (Q = 1 for plain decode, Q = K rows for parallel chunk decoding) against
caches [B, S, Hkv, Dh] under a DecodeMeta (worldvla.mask):

    key s visible to query i  iff  s <= q_pos[i]  and  s < kv_len  and  not kv_block[s] < q_limit[i]

Decode has few query rows, so one program takes the rows that share a KV head (the Q rows
times the H/Hkv query heads of the group, up to a cap, `gpu_launch`: each cache tile is read
once per group when they fit; steps of up to DECODE_PLAN_QUERIES rows take a one-row step's
tile, so that each row comes out as in a one-row step) and a slice of the cache; a second
kernel merges the slices through their log-sum-exps. Decode is memory-bound: every tile of a slice up to the last
visible key is loaded unconditionally (so loads pipeline) and masked elementwise; keys past
max(q_pos) and kv_len are never read.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from worldvla.mask import DECODE_PLAN_QUERIES

from ._common import (BIG, INTERPRET, check_device, check_dtype, chunk_visible, dot_precision,
                      grid_limit_problem, head_block, last_dim_contiguous, load_f32, online_softmax_step, store_dtype)

LOG2E = 1.4426950408889634


@triton.jit
def _rows(pid_r, n_rows, group, BLOCK_R: tl.constexpr):
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    return rows, rows < n_rows, rows // group, rows % group


@triton.jit
def _split_kernel(Q, K, V, O, OP, LSEP, QPOS, QLIM, KVB, KVLEN,
                  s_qb, s_qq, s_qh, s_kb, s_ks, s_kh, s_vb, s_vs, s_vh, s_ob, s_oq, s_oh,
                  n_q, S, n_kv_heads, group, split_len, n_splits, scale_log2,
                  HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
                  SINGLE: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr):
    pid_s = tl.program_id(0)
    pid_r = tl.program_id(1)
    pid_bh = tl.program_id(2)
    b = pid_bh // n_kv_heads
    hk = pid_bh % n_kv_heads
    n_rows = n_q * group
    rows, r_valid, qi, g = _rows(pid_r, n_rows, group, BLOCK_R)
    h = hk * group + g
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < HEAD_DIM
    b64 = b.to(tl.int64)
    q = load_f32(Q + b64 * s_qb + qi[:, None] * s_qq + h[:, None] * s_qh + offs_d[None, :],
                 r_valid[:, None] & d_valid[None, :], UPCAST)
    qpos = tl.load(QPOS + b * n_q + qi, mask=r_valid, other=-1)
    qlim = tl.load(QLIM + b * n_q + qi, mask=r_valid, other=-1)
    kv_len = tl.minimum(tl.load(KVLEN + b), S)

    lo = pid_s * split_len
    hi = tl.minimum(tl.minimum(lo + split_len, kv_len), tl.max(qpos, 0) + 1)
    k_base = K + b64 * s_kb + hk * s_kh
    v_base = V + b64 * s_vb + hk * s_vh
    m_i = tl.full([BLOCK_R], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_valid = offs_n < hi
        kv_mask = n_valid[:, None] & d_valid[None, :]
        k = load_f32(k_base + offs_n[:, None] * s_ks + offs_d[None, :], kv_mask, UPCAST)
        v = load_f32(v_base + offs_n[:, None] * s_vs + offs_d[None, :], kv_mask, UPCAST)
        kvb = tl.load(KVB + b64 * S + offs_n, mask=n_valid, other=BIG)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * scale_log2
        allowed = chunk_visible(qpos[:, None], offs_n[None, :], n_valid[None, :], kvb[None, :], qlim[:, None])
        s = tl.where(allowed, s, float("-inf"))
        m_i, l_i, acc = online_softmax_step(s, v, m_i, l_i, acc, DOT_PREC)
    has = l_i > 0.0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    if SINGLE:
        tl.store(O + b64 * s_ob + qi[:, None] * s_oq + h[:, None] * s_oh + offs_d[None, :],
                 out.to(O.dtype.element_ty), mask=r_valid[:, None] & d_valid[None, :])
    else:
        # Partials [B * Hkv, n_splits, rows, BLOCK_D]; an empty slice has lse = -1e30 (weight 0 when merged).
        part = (pid_bh.to(tl.int64) * n_splits + pid_s) * n_rows + rows
        tl.store(OP + part[:, None] * BLOCK_D + offs_d[None, :], out, mask=r_valid[:, None])
        lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), -1.0e30)
        tl.store(LSEP + part, lse, mask=r_valid)


@triton.jit
def _combine_kernel(O, OP, LSEP, s_ob, s_oq, s_oh, n_q, n_kv_heads, group, n_splits,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr):
    pid_r = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // n_kv_heads
    hk = pid_bh % n_kv_heads
    n_rows = n_q * group
    rows, r_valid, qi, g = _rows(pid_r, n_rows, group, BLOCK_R)
    h = hk * group + g
    offs_d = tl.arange(0, BLOCK_D)
    m = tl.full([BLOCK_R], -1.0e30, tl.float32)
    w_sum = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    for sp in range(0, n_splits):
        part = (pid_bh.to(tl.int64) * n_splits + sp) * n_rows + rows
        lse = tl.load(LSEP + part, mask=r_valid, other=-1.0e30)
        o = tl.load(OP + part[:, None] * BLOCK_D + offs_d[None, :], mask=r_valid[:, None], other=0.0)
        m_new = tl.maximum(m, lse)
        alpha = tl.exp2(m - m_new)
        w = tl.exp2(lse - m_new)
        w_sum = w_sum * alpha + w
        acc = acc * alpha[:, None] + w[:, None] * o
        m = m_new
    # Rows with no visible key anywhere: every slice holds zeros, so the merge gives zeros.
    out = acc / w_sum[:, None]
    tl.store(O + b.to(tl.int64) * s_ob + qi[:, None] * s_oq + h[:, None] * s_oh + offs_d[None, :],
             out.to(O.dtype.element_ty), mask=r_valid[:, None] & (offs_d < HEAD_DIM)[None, :])


def gpu_launch(dtype: torch.dtype, block_d: int, n_rows: int):
    """(BLOCK_R, BLOCK_N, compiler options of the split kernel, of the merge) for `n_rows` rows a KV
    group. A program takes all of them, at least 16 (tl.dot's minimum), up to a cap that, with the key
    tile and the warps, keeps the kernels free of register spills on sm_90 (tests/test_triton_compile.py
    checks it). fp32 dots (input_precision="ieee") are FMA loops holding q [BLOCK_R, BLOCK_D] and the key
    tile in registers: fp32 takes at most 32 rows, and 16 rows with 32-key tiles from head dim 128 on.
    16-bit inputs take up to 64 rows (32 at head dim 256), over 8 warps where BLOCK_R x BLOCK_D reaches
    32 x 128 (4 warps spilled 0.1-1.4 KB a thread there). The merge holds BLOCK_R x BLOCK_D fp32 values a
    program: 8 warps from 4096 on."""
    fp32 = dtype == torch.float32
    if fp32:
        max_rows, block_n = (32, 64) if block_d <= 64 else (16, 32)
    else:
        max_rows, block_n = (64 if block_d <= 128 else 32), 64
    block_r = max(16, min(max_rows, triton.next_power_of_2(n_rows)))
    wide = block_d >= 128 and block_r * block_d >= 4096
    return (block_r, block_n, dict(num_warps=8 if fp32 or wide else 4, num_stages=2),
            dict(num_warps=8 if block_r * block_d >= 4096 else 4))


def launch_plan(q, k_cache):
    """(plan, problem) for q [B, Q, H, Dh] and caches [B, S, Hkv, Dh]: plan is (rows per KV group, BLOCK_D)
    followed by `gpu_launch`'s answer, problem why the kernels cannot launch, or None. The split kernel's
    grid is (splits, query row tiles, B x Hkv), the merge's (query row tiles, B x Hkv). Steps of up to
    DECODE_PLAN_QUERIES query rows take a one-row step's row tile (worldvla.mask): K rows of a parallel
    chunk step then fill several tiles (each tile's K/V read once more) where one might hold them."""
    B, n_q, H, D = q.shape
    Hkv = k_cache.shape[2]
    n_rows, block_d = n_q * (H // Hkv), head_block(D)
    plan = (n_rows, block_d, *gpu_launch(q.dtype, block_d, _planned_rows(n_q, H // Hkv)))
    problem = grid_limit_problem((1, triton.cdiv(n_rows, plan[2]), B * Hkv),
                                 ("splits", "query row tiles", "batch x kv heads"))
    return plan, problem


def _planned_rows(n_q: int, group: int) -> int:
    """The rows per KV group a step of `n_q` query rows is planned for (row tile, splits)."""
    return group if n_q <= DECODE_PLAN_QUERIES else n_q * group


def grid_problem(q, k_cache) -> str | None:
    """Why the kernels cannot launch for q [B, Q, H, Dh] and caches [B, S, Hkv, Dh], or None."""
    return launch_plan(q, k_cache)[1]


def _default_splits(n_tiles: int, n_programs: int, device: torch.device) -> int:
    if INTERPRET or device.type != "cuda":
        return min(n_tiles, 2)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(n_tiles, triton.cdiv(2 * sms, n_programs)))


def decode_attention(q, k_cache, v_cache, meta, softmax_scale=None, num_splits=None, block_n=None):
    """Same contract as worldvla.ops.decode_attention. `num_splits` slices the cache (default:
    enough programs for two waves on the GPU; depends on shapes only, so it is CUDA-graph safe)."""
    if q.dim() != 4 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"decode_attention wants q [B, Q, H, Dh] and caches [B, S, Hkv, Dh]; got "
                         f"{tuple(q.shape)}, {tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
    B, n_q, H, D = q.shape
    S, Hkv = k_cache.shape[1], k_cache.shape[2]
    if k_cache.shape[0] != B or k_cache.shape[3] != D or H % Hkv:
        raise ValueError(f"q {tuple(q.shape)} and cache {tuple(k_cache.shape)} disagree on batch, head dim or heads")
    if not (q.dtype == k_cache.dtype == v_cache.dtype):
        raise TypeError(f"q and the caches must share a dtype, got {q.dtype}, {k_cache.dtype}, {v_cache.dtype}")
    check_dtype("decode_attention", q)
    check_device("decode_attention", q, k_cache, v_cache, meta.q_pos, meta.q_limit, meta.kv_block, meta.kv_len)
    if D > 256:
        raise ValueError(f"head dim {D} is larger than the Triton kernel's 256; use backend='torch'")
    if tuple(meta.q_pos.shape) != (B, n_q) or tuple(meta.q_limit.shape) != (B, n_q):
        raise ValueError(f"meta.q_pos / q_limit must be [B={B}, Q={n_q}], got {tuple(meta.q_pos.shape)}, "
                         f"{tuple(meta.q_limit.shape)}")
    if tuple(meta.kv_block.shape) != (B, S) or tuple(meta.kv_len.shape) != (B,):
        raise ValueError(f"meta.kv_block must be [B={B}, S={S}] and kv_len [B], got {tuple(meta.kv_block.shape)}, "
                         f"{tuple(meta.kv_len.shape)}")
    plan, why = launch_plan(q, k_cache)
    if why is not None:
        raise ValueError(f"decode_attention: {why}; split the batch")
    q, k_cache, v_cache = last_dim_contiguous(q), last_dim_contiguous(k_cache), last_dim_contiguous(v_cache)
    qpos, qlim = meta.q_pos.to(torch.int32).contiguous(), meta.q_limit.to(torch.int32).contiguous()
    kvb, kvlen = meta.kv_block.to(torch.int32).contiguous(), meta.kv_len.to(torch.int32).contiguous()
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)

    group = H // Hkv
    # The interpreter takes the GPU's row tiles too, so its tests cover their split over programs.
    n_rows, block_d, block_r, gpu_block_n, split_opts, merge_opts = plan
    block_n = block_n or (128 if INTERPRET else gpu_block_n)
    n_row_tiles = triton.cdiv(n_rows, block_r)
    n_tiles = max(1, triton.cdiv(S, block_n))
    if num_splits is None:
        planned_tiles = triton.cdiv(_planned_rows(n_q, group), block_r)
        num_splits = _default_splits(n_tiles, B * Hkv * planned_tiles, q.device)
    num_splits = max(1, min(int(num_splits), n_tiles))
    split_len = triton.cdiv(n_tiles, num_splits) * block_n
    num_splits = max(1, triton.cdiv(S, split_len))

    out = torch.empty(q.shape, dtype=store_dtype(q.dtype), device=q.device)
    if out.numel() == 0:
        return out.to(q.dtype)
    single = num_splits == 1
    if single:
        o_part = lse_part = out  # unused
    else:
        o_part = torch.empty((B * Hkv, num_splits, n_rows, block_d), dtype=torch.float32, device=q.device)
        lse_part = torch.empty((B * Hkv, num_splits, n_rows), dtype=torch.float32, device=q.device)
    _split_kernel[(num_splits, n_row_tiles, B * Hkv)](
        q, k_cache, v_cache, out, o_part, lse_part, qpos, qlim, kvb, kvlen,
        q.stride(0), q.stride(1), q.stride(2), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), out.stride(0), out.stride(1), out.stride(2),
        n_q, S, Hkv, group, split_len, num_splits, scale * LOG2E,
        HEAD_DIM=D, BLOCK_D=block_d, BLOCK_R=block_r, BLOCK_N=block_n, SINGLE=single,
        UPCAST=INTERPRET, DOT_PREC=dot_precision(q.dtype), **({} if INTERPRET else split_opts))
    if not single:
        _combine_kernel[(n_row_tiles, B * Hkv)](
            out, o_part, lse_part, out.stride(0), out.stride(1), out.stride(2), n_q, Hkv, group, num_splits,
            HEAD_DIM=D, BLOCK_D=block_d, BLOCK_R=block_r, **({} if INTERPRET else merge_opts))
    return out.to(q.dtype)
