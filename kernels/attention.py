"""Chunk-masked FlashAttention (forward and backward) in Triton.

The mask is the WorldVLA chunk rule carried by two int32 vectors (worldvla.mask):

    may_attend(i, j) = j <= i  and  same document  and  not kv_block[j] < q_limit[i]

Layouts: padded q, k, v [B, L, H, Dh] with meta tensors [B, L], or packed [T, H, Dh]
with meta tensors [T] and meta.cu_seqlens marking the documents. K/V may have fewer
heads than Q (GQA). A program owns a tile of one document's rows for one head, so the
same-document condition is the program's row/column range.

Tiles fall in three classes, decided from a few integers per tile (`tile_plan`):
  skipped    beyond the diagonal, or max(kv_block) < min(q_limit): every key lies in an
             earlier action block than every query's block;
  mask-free  all keys at or before the first query and min(kv_block) >= max(q_limit);
  partial    the rule is evaluated per element.
The plan lists, per query tile, its mask-free and its partial key tiles (and per key tile
its query tiles, for dK/dV). Kernels loop over those lists, so skipped tiles cost nothing
and every loop body loads unconditionally (which the GPU pipeliner needs to prefetch).

The forward keeps the log-sum-exp (base 2, in units of scale*log2(e)) for the backward, the
FA2 scheme: delta = rowsum(dO * O), one kernel over key tiles for dK/dV (looping over the
query heads of its KV group, so no atomics) and one over query tiles for dQ.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._common import (BIG, INTERPRET, check_device, check_dtype, chunk_visible, dot_precision, head_block,
                      last_dim_contiguous, load_f32, online_softmax_step, store_dtype)

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


# --------------------------------------------------------------------------- tile plan
class TilePlan:
    """Index lists of the non-skipped tiles for block sizes (block_m, block_n).

    q-major (forward, dQ):  full_q / part_q [docs, n_qt, n_kt] key-tile ids, first cnt valid
    k-major (dK/dV):        full_k / part_k [docs, n_kt, n_qt] query-tile ids
    """

    def __init__(self, full: torch.Tensor, part: torch.Tensor):
        self.full, self.part = full, part  # bool [docs, n_qt, n_kt]
        self.full_q, self.full_q_cnt = self._lists(full)
        self.part_q, self.part_q_cnt = self._lists(part)
        self._k = None

    @staticmethod
    def _lists(mask):
        cnt = mask.sum(-1, dtype=torch.int32).contiguous()
        # stable sort of "not in class" puts the class's tile ids first, in ascending order
        idx = torch.sort((~mask).to(torch.int8), dim=-1, stable=True).indices.to(torch.int32).contiguous()
        return idx, cnt

    def k_major(self):
        if self._k is None:
            self._k = (*self._lists(self.full.transpose(1, 2)), *self._lists(self.part.transpose(1, 2)))
        return self._k

    def counts(self) -> dict:
        n_full, n_part = int(self.full.sum()), int(self.part.sum())
        return {"mask_free": n_full, "partial": n_part}


def _tile_stats(x, valid, n_tiles, block, fill_max, fill_min):
    """Per-tile (max, min) of x [docs, Lp] over valid positions."""
    x = x[:, :n_tiles * block]
    v = valid[:, :n_tiles * block]
    mx = torch.where(v, x, torch.full_like(x, fill_max)).view(x.shape[0], n_tiles, block).amax(-1)
    mn = torch.where(v, x, torch.full_like(x, fill_min)).view(x.shape[0], n_tiles, block).amin(-1)
    return mx, mn


def build_tile_plan(kv_block, q_limit, cu_seqlens, max_seqlen: int, block_m: int, block_n: int) -> TilePlan:
    """Classify every (query tile, key tile) pair of every document; all on the metadata's device."""
    dev = kv_block.device
    n_qt, n_kt = triton.cdiv(max_seqlen, block_m), triton.cdiv(max_seqlen, block_n)
    Lp = max(n_qt * block_m, n_kt * block_n)
    t = torch.arange(Lp, device=dev)
    if cu_seqlens is not None:
        # Each document clamped to the T tokens, as the kernels do (_doc_range).
        cu, T = cu_seqlens.long(), kv_block.shape[0]
        starts = cu[:-1].clamp(0, T)
        lens = torch.maximum(cu[1:].clamp(max=T), starts) - starts
        valid = t[None, :] < lens[:, None]
        pos = torch.where(valid, starts[:, None] + t[None, :], torch.zeros_like(t)[None, :])
        kvb, ql = kv_block.long()[pos], q_limit.long()[pos]
    else:
        B, L = kv_block.shape
        lens = torch.full((B,), L, device=dev, dtype=torch.long)
        valid = (t < L)[None, :].expand(B, Lp)
        kvb, ql = F.pad(kv_block.long(), (0, Lp - L)), F.pad(q_limit.long(), (0, Lp - L))
    kv_max, kv_min = _tile_stats(kvb, valid, n_kt, block_n, -1, BIG.value)
    ql_max, ql_min = _tile_stats(ql, valid, n_qt, block_m, -1, BIG.value)
    m0 = (torch.arange(n_qt, device=dev) * block_m)[None, :, None]
    n0 = (torch.arange(n_kt, device=dev) * block_n)[None, None, :]
    lens3 = lens[:, None, None]
    live = (n0 < torch.minimum(lens3, m0 + block_m)) & (m0 < lens3)
    live &= kv_max[:, None, :] >= ql_min[:, :, None]
    full = live & (n0 + block_n - 1 <= m0) & (n0 + block_n <= lens3) & (kv_min[:, None, :] >= ql_max[:, :, None])
    return TilePlan(full, live & ~full)


def _plan(meta, kv_block, q_limit, cu, max_seqlen, block_m, block_n) -> TilePlan:
    """Plans are cached on the metadata object, so every layer of a forward shares one. An entry
    is reused only for the very same tensors (held by the entry) at the same version counters,
    so in-place edits or replaced tensors rebuild the plan. Inference tensors (made under
    torch.inference_mode) have no version counter: their plans are built at every call."""
    sources = (meta.kv_block, meta.q_limit, meta.cu_seqlens)
    if any(x is not None and x.is_inference() for x in sources):
        return build_tile_plan(kv_block, q_limit, cu, max_seqlen, block_m, block_n)
    versions = tuple(None if x is None else x._version for x in sources)
    cache = meta.__dict__.setdefault("_triton_tile_plans", {})
    key = (block_m, block_n, max_seqlen)
    hit = cache.get(key)
    if hit is not None and all(a is b for a, b in zip(hit[0], sources)) and hit[1] == versions:
        return hit[2]
    plan = build_tile_plan(kv_block, q_limit, cu, max_seqlen, block_m, block_n)
    cache[key] = (sources, versions, plan)
    return plan


# --------------------------------------------------------------------------- kernels
# Sizes that change from call to call (sequence length, tokens, tile counts) are not specialized on
# (divisible by 16, equal to 1): each specialization compiles the kernels anew, and it bought nothing
# (the sm_90 code loads and stores the same way with and without these hints).
PER_CALL = ["L", "n_tok", "n_qt", "n_kt"]


@triton.jit
def _doc_range(CU, z, L, n_tok, PACKED: tl.constexpr):
    """(first token of document z in the flattened meta/lse index, its length,
    batch index for batch strides, token offset for token strides). A packed document is clamped to
    the n_tok tokens, as in build_tile_plan: boundaries left unchecked on CUDA stay inside the tensors."""
    if PACKED:
        start = tl.minimum(tl.maximum(tl.load(CU + z), 0), n_tok)
        seqlen = tl.minimum(tl.maximum(tl.load(CU + z + 1), start), n_tok) - start
        zb = z.to(tl.int64) * 0
        tok0 = start.to(tl.int64)
    else:
        start = z * L
        seqlen = L
        zb = z.to(tl.int64)
        tok0 = zb * 0
    return start, seqlen, zb, tok0


@triton.jit
def _fwd_tile(q, ql, offs_m, m_i, l_i, acc, k_base, v_base, s_kt, s_vt, KVB, start, seqlen, n0, offs_d, d_valid,
              scale_log2, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr):
    offs_n = n0 + tl.arange(0, BLOCK_N)
    n_valid = offs_n < seqlen
    kv_mask = n_valid[:, None] & d_valid[None, :]
    k = load_f32(k_base + offs_n[:, None] * s_kt + offs_d[None, :], kv_mask, UPCAST)
    v = load_f32(v_base + offs_n[:, None] * s_vt + offs_d[None, :], kv_mask, UPCAST)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * scale_log2
    if MASKED:
        kvb = tl.load(KVB + start + offs_n, mask=n_valid, other=BIG)
        allowed = chunk_visible(offs_m[:, None], offs_n[None, :], n_valid[None, :], kvb[None, :], ql[:, None])
        s = tl.where(allowed, s, float("-inf"))
    return online_softmax_step(s, v, m_i, l_i, acc, DOT_PREC)


@triton.jit(do_not_specialize=PER_CALL)
def _fwd_kernel(Q, K, V, O, LSE, KVB, QL, CU, FULL_IDX, FULL_CNT, PART_IDX, PART_CNT,
                s_qb, s_qt, s_qh, s_kb, s_kt, s_kh, s_vb, s_vt, s_vh, s_ob, s_ot, s_oh,
                L, n_tok, n_heads, group, n_qt, n_kt, scale_log2,
                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                PACKED: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_zh = tl.program_id(1)
    z = pid_zh // n_heads
    h = pid_zh % n_heads
    hk = h // group
    start, seqlen, zb, tok0 = _doc_range(CU, z, L, n_tok, PACKED)
    m0 = pid_m * BLOCK_M
    if m0 >= seqlen:
        return
    # Padded layouts address batch z by its batch stride; packed ones by the document start.
    q_base = Q + zb * s_qb + tok0 * s_qt + h * s_qh
    k_base = K + zb * s_kb + tok0 * s_kt + hk * s_kh
    v_base = V + zb * s_vb + tok0 * s_vt + hk * s_vh
    o_base = O + zb * s_ob + tok0 * s_ot + h * s_oh

    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_valid = offs_m < seqlen
    d_valid = offs_d < HEAD_DIM
    q = load_f32(q_base + offs_m[:, None] * s_qt + offs_d[None, :], m_valid[:, None] & d_valid[None, :], UPCAST)
    ql = tl.load(QL + start + offs_m, mask=m_valid, other=-1)

    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)  # finite: a fully masked row gives alpha = 1, p = 0
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    tile = z * n_qt + pid_m
    n_full = tl.load(FULL_CNT + tile)
    for t in range(0, n_full):
        n0 = tl.load(FULL_IDX + tile * n_kt + t) * BLOCK_N
        m_i, l_i, acc = _fwd_tile(q, ql, offs_m, m_i, l_i, acc, k_base, v_base, s_kt, s_vt, KVB, start, seqlen,
                                  n0, offs_d, d_valid, scale_log2, BLOCK_N, False, UPCAST, DOT_PREC)
    n_part = tl.load(PART_CNT + tile)
    for t in range(0, n_part):
        n0 = tl.load(PART_IDX + tile * n_kt + t) * BLOCK_N
        m_i, l_i, acc = _fwd_tile(q, ql, offs_m, m_i, l_i, acc, k_base, v_base, s_kt, s_vt, KVB, start, seqlen,
                                  n0, offs_d, d_valid, scale_log2, BLOCK_N, True, UPCAST, DOT_PREC)

    has = l_i > 0.0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    tl.store(o_base + offs_m[:, None] * s_ot + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=m_valid[:, None] & d_valid[None, :])
    # A row that sees no key gets lse = +inf so that the backward's exp2(s - lse) is 0.
    lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("inf"))
    tl.store(LSE + h.to(tl.int64) * n_tok + start + offs_m, lse, mask=m_valid)


@triton.jit(do_not_specialize=["L", "n_tok"])
def _bwd_delta_kernel(O, DO, DELTA, CU, s_ob, s_ot, s_oh, s_db, s_dt, s_dh, L, n_tok, n_heads,
                      HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, PACKED: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_zh = tl.program_id(1)
    z = pid_zh // n_heads
    h = pid_zh % n_heads
    start, seqlen, zb, tok0 = _doc_range(CU, z, L, n_tok, PACKED)
    m0 = pid_m * BLOCK_M
    if m0 >= seqlen:
        return
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < seqlen)[:, None] & (offs_d < HEAD_DIM)[None, :]
    o = load_f32(O + zb * s_ob + tok0 * s_ot + h * s_oh + offs_m[:, None] * s_ot + offs_d[None, :], mask, True)
    do = load_f32(DO + zb * s_db + tok0 * s_dt + h * s_dh + offs_m[:, None] * s_dt + offs_d[None, :], mask, True)
    tl.store(DELTA + h.to(tl.int64) * n_tok + start + offs_m, tl.sum(o * do, 1), mask=offs_m < seqlen)


@triton.jit
def _dkdv_tile(k, v, kvb, offs_n, n_valid, dk, dv, q_base, do_base, s_qt, s_dt, LSE, DELTA, QL, row_base, start,
               seqlen, m0, offs_d, d_valid, scale_log2, BLOCK_M: tl.constexpr, MASKED: tl.constexpr,
               UPCAST: tl.constexpr, DOT_PREC: tl.constexpr):
    offs_m = m0 + tl.arange(0, BLOCK_M)
    m_valid = offs_m < seqlen
    q_mask = m_valid[:, None] & d_valid[None, :]
    q = load_f32(q_base + offs_m[:, None] * s_qt + offs_d[None, :], q_mask, UPCAST)
    do = load_f32(do_base + offs_m[:, None] * s_dt + offs_d[None, :], q_mask, UPCAST)
    # Rows past the document end: lse = +inf and delta = 0 make their p and ds vanish.
    lse = tl.load(LSE + row_base + offs_m, mask=m_valid, other=float("inf"))
    delta = tl.load(DELTA + row_base + offs_m, mask=m_valid, other=0.0)
    p_t = tl.exp2(tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * scale_log2 - lse[None, :])  # [N, M]
    if MASKED:
        ql = tl.load(QL + start + offs_m, mask=m_valid, other=-1)
        allowed = chunk_visible(offs_m[None, :], offs_n[:, None], n_valid[:, None], kvb[:, None], ql[None, :])
        p_t = tl.where(allowed, p_t, 0.0)
    dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PREC)
    dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
    ds_t = p_t * (dp_t - delta[None, :])
    dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PREC)
    return dk, dv


@triton.jit(do_not_specialize=PER_CALL)
def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, KVB, QL, CU, FULL_IDX, FULL_CNT, PART_IDX, PART_CNT,
                     s_qb, s_qt, s_qh, s_kb, s_kt, s_kh, s_vb, s_vt, s_vh, s_db, s_dt, s_dh,
                     s_dkb, s_dkt, s_dkh, s_dvb, s_dvt, s_dvh,
                     L, n_tok, n_kv_heads, group, n_qt, n_kt, scale, scale_log2,
                     HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     PACKED: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_zh = tl.program_id(1)
    z = pid_zh // n_kv_heads
    hk = pid_zh % n_kv_heads
    start, seqlen, zb, tok0 = _doc_range(CU, z, L, n_tok, PACKED)
    n0 = pid_n * BLOCK_N
    if n0 >= seqlen:
        return
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_valid = offs_n < seqlen
    d_valid = offs_d < HEAD_DIM
    kv_mask = n_valid[:, None] & d_valid[None, :]
    k = load_f32(K + zb * s_kb + tok0 * s_kt + hk * s_kh + offs_n[:, None] * s_kt + offs_d[None, :], kv_mask, UPCAST)
    v = load_f32(V + zb * s_vb + tok0 * s_vt + hk * s_vh + offs_n[:, None] * s_vt + offs_d[None, :], kv_mask, UPCAST)
    kvb = tl.load(KVB + start + offs_n, mask=n_valid, other=BIG)

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    tile = z * n_kt + pid_n
    n_full = tl.load(FULL_CNT + tile)
    n_part = tl.load(PART_CNT + tile)
    for g in range(0, group):
        h = hk * group + g
        q_base = Q + zb * s_qb + tok0 * s_qt + h * s_qh
        do_base = DO + zb * s_db + tok0 * s_dt + h * s_dh
        row_base = h.to(tl.int64) * n_tok + start
        for t in range(0, n_full):
            m0 = tl.load(FULL_IDX + tile * n_qt + t) * BLOCK_M
            dk, dv = _dkdv_tile(k, v, kvb, offs_n, n_valid, dk, dv, q_base, do_base, s_qt, s_dt, LSE, DELTA, QL,
                                row_base, start, seqlen, m0, offs_d, d_valid, scale_log2, BLOCK_M, False, UPCAST,
                                DOT_PREC)
        for t in range(0, n_part):
            m0 = tl.load(PART_IDX + tile * n_qt + t) * BLOCK_M
            dk, dv = _dkdv_tile(k, v, kvb, offs_n, n_valid, dk, dv, q_base, do_base, s_qt, s_dt, LSE, DELTA, QL,
                                row_base, start, seqlen, m0, offs_d, d_valid, scale_log2, BLOCK_M, True, UPCAST,
                                DOT_PREC)
    dk = dk * scale
    tl.store(DK + zb * s_dkb + tok0 * s_dkt + hk * s_dkh + offs_n[:, None] * s_dkt + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + zb * s_dvb + tok0 * s_dvt + hk * s_dvh + offs_n[:, None] * s_dvt + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _dq_tile(q, do, lse, delta, ql, offs_m, dq, k_base, v_base, s_kt, s_vt, KVB, start, seqlen, n0, offs_d, d_valid,
             scale_log2, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr):
    offs_n = n0 + tl.arange(0, BLOCK_N)
    n_valid = offs_n < seqlen
    kv_mask = n_valid[:, None] & d_valid[None, :]
    k = load_f32(k_base + offs_n[:, None] * s_kt + offs_d[None, :], kv_mask, UPCAST)
    v = load_f32(v_base + offs_n[:, None] * s_vt + offs_d[None, :], kv_mask, UPCAST)
    p = tl.exp2(tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * scale_log2 - lse[:, None])
    if MASKED:
        kvb = tl.load(KVB + start + offs_n, mask=n_valid, other=BIG)
        allowed = chunk_visible(offs_m[:, None], offs_n[None, :], n_valid[None, :], kvb[None, :], ql[:, None])
        p = tl.where(allowed, p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
    ds = p * (dp - delta[:, None])
    dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC)
    return dq


@triton.jit(do_not_specialize=PER_CALL)
def _bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, KVB, QL, CU, FULL_IDX, FULL_CNT, PART_IDX, PART_CNT,
                   s_qb, s_qt, s_qh, s_kb, s_kt, s_kh, s_vb, s_vt, s_vh, s_db, s_dt, s_dh, s_dqb, s_dqt, s_dqh,
                   L, n_tok, n_heads, group, n_qt, n_kt, scale, scale_log2,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   PACKED: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_zh = tl.program_id(1)
    z = pid_zh // n_heads
    h = pid_zh % n_heads
    hk = h // group
    start, seqlen, zb, tok0 = _doc_range(CU, z, L, n_tok, PACKED)
    m0 = pid_m * BLOCK_M
    if m0 >= seqlen:
        return
    k_base = K + zb * s_kb + tok0 * s_kt + hk * s_kh
    v_base = V + zb * s_vb + tok0 * s_vt + hk * s_vh
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_valid = offs_m < seqlen
    d_valid = offs_d < HEAD_DIM
    q_mask = m_valid[:, None] & d_valid[None, :]
    q = load_f32(Q + zb * s_qb + tok0 * s_qt + h * s_qh + offs_m[:, None] * s_qt + offs_d[None, :], q_mask, UPCAST)
    do = load_f32(DO + zb * s_db + tok0 * s_dt + h * s_dh + offs_m[:, None] * s_dt + offs_d[None, :], q_mask, UPCAST)
    row_base = h.to(tl.int64) * n_tok + start
    lse = tl.load(LSE + row_base + offs_m, mask=m_valid, other=float("inf"))
    delta = tl.load(DELTA + row_base + offs_m, mask=m_valid, other=0.0)
    ql = tl.load(QL + start + offs_m, mask=m_valid, other=-1)

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    tile = z * n_qt + pid_m
    n_full = tl.load(FULL_CNT + tile)
    for t in range(0, n_full):
        n0 = tl.load(FULL_IDX + tile * n_kt + t) * BLOCK_N
        dq = _dq_tile(q, do, lse, delta, ql, offs_m, dq, k_base, v_base, s_kt, s_vt, KVB, start, seqlen, n0, offs_d,
                      d_valid, scale_log2, BLOCK_N, False, UPCAST, DOT_PREC)
    n_part = tl.load(PART_CNT + tile)
    for t in range(0, n_part):
        n0 = tl.load(PART_IDX + tile * n_kt + t) * BLOCK_N
        dq = _dq_tile(q, do, lse, delta, ql, offs_m, dq, k_base, v_base, s_kt, s_vt, KVB, start, seqlen, n0, offs_d,
                      d_valid, scale_log2, BLOCK_N, True, UPCAST, DOT_PREC)
    dq = dq * scale
    tl.store(DQ + zb * s_dqb + tok0 * s_dqt + h * s_dqh + offs_m[:, None] * s_dqt + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=q_mask)


# --------------------------------------------------------------------------- launch helpers
def _strides(x: torch.Tensor, packed: bool):
    """(batch, token, head) strides; packed tensors have no batch stride."""
    return (0, x.stride(0), x.stride(1)) if packed else (x.stride(0), x.stride(1), x.stride(2))


# Head dims pad to a power of two up to 256; wider heads are declined (no WorldVLA config has them).
MAX_HEAD_DIM = 256

# GPU tiles by padded head dim: ((BLOCK_M, BLOCK_N, num_warps) of the forward, the same of the backward),
# dK/dV and dQ sharing the backward's blocks (one tile plan). Chosen so that every kernel compiles for
# sm_90 without spilling registers (tests/test_triton_compile.py checks it). 16-bit dots run on tensor
# cores; from head dim 128 on the backward's key tiles narrow (dK/dV spilled 48-1,280 bytes a thread at
# 64 x 64), and at 256 the forward's tiles too. fp32 dots (input_precision="ieee") are FMA loops holding
# both operands in registers, where the 16-bit tiles spilled up to 15 KB a thread: fp32 takes small tiles
# over 8 warps, 16 x 32 at head dim 256 (at 16-bit sizes its tiles overflowed shared memory, about 280 KB).
_TILES_16 = {d: ((128, 64, 4), (64, 64, 4)) for d in (16, 32, 64)}
_TILES_16.update({128: ((128, 64, 8), (64, 32, 8)), 256: ((64, 32, 8), (32, 32, 8))})
GPU_TILES = {torch.float16: _TILES_16, torch.bfloat16: _TILES_16,
             torch.float32: {d: ((32, 64, 8), (16, 64, 8)) for d in (16, 32, 64, 128)}}
GPU_TILES[torch.float32][256] = ((16, 32, 8), (16, 32, 8))


def gpu_launch(dtype: torch.dtype, block_d: int):
    """((BLOCK_M, BLOCK_N), compiler options) of the forward and of the backward on the GPU."""
    fwd, bwd = GPU_TILES[dtype][block_d]
    # Shared memory on sm_90 (227 KB a block): rows wider than 256 bytes (fp32 at D 128, 16-bit at D 256)
    # take two stages.
    stages = 2 if block_d * dtype.itemsize > 256 else 3
    return tuple(((m, n), dict(num_warps=w, num_stages=stages)) for m, n, w in (fwd, bwd))


class _Problem:
    """Shapes, metadata and launch constants shared by the forward and the backward."""

    def __init__(self, q, k, v, meta, softmax_scale, block_m, block_n):
        if q.dim() not in (3, 4) or k.dim() != q.dim() or v.dim() != q.dim():
            raise ValueError(f"q, k, v must all be [B, L, H, Dh] or [T, H, Dh]; got {tuple(q.shape)}, "
                             f"{tuple(k.shape)}, {tuple(v.shape)}")
        if k.shape != v.shape or q.shape[-1] != k.shape[-1] or q.shape[:-2] != k.shape[:-2]:
            raise ValueError(f"k and v must match and share q's tokens and head dim; got {tuple(q.shape)}, "
                             f"{tuple(k.shape)}, {tuple(v.shape)}")
        if q.shape[-2] % k.shape[-2]:
            raise ValueError(f"kv heads ({k.shape[-2]}) must divide q heads ({q.shape[-2]})")
        if not (q.dtype == k.dtype == v.dtype):
            raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
        check_dtype("masked_attention", q)
        check_device("masked_attention", q, k, v, meta.kv_block, meta.q_limit, meta.cu_seqlens)
        self.packed = q.dim() == 3
        if self.packed != meta.packed:
            raise ValueError("packed q/k/v [T, H, Dh] need meta.cu_seqlens, padded [B, L, H, Dh] need meta without it; "
                             "build the metadata with chunk_mask_meta(..., cu_seqlens=...) accordingly")
        if tuple(meta.kv_block.shape) != tuple(q.shape[:-2]) or tuple(meta.q_limit.shape) != tuple(q.shape[:-2]):
            raise ValueError(f"meta covers tokens {tuple(meta.kv_block.shape)} but q has {tuple(q.shape[:-2])}")
        self.head_dim = q.shape[-1]
        if self.head_dim > MAX_HEAD_DIM:
            raise ValueError(f"head dim {self.head_dim} is larger than the Triton kernel's {MAX_HEAD_DIM}; "
                             f"use backend='torch'")
        self.meta = meta
        self.n_heads, self.n_kv_heads = q.shape[-2], k.shape[-2]
        self.kv_block = meta.kv_block.to(torch.int32).contiguous()
        self.q_limit = meta.q_limit.to(torch.int32).contiguous()
        if self.packed:
            self.cu = meta.cu_seqlens.to(torch.int32).contiguous()
            self.n_docs = self.cu.numel() - 1
            self.n_tok = q.shape[0]
            self.L = 0
            self.max_seqlen = int(meta.max_seqlen)
            if self.max_seqlen <= 0 or not self.cu.is_cuda:
                lens = self.cu[1:] - self.cu[:-1]
                true_max = int(lens.max()) if lens.numel() else 0
                if self.max_seqlen > 0 and self.max_seqlen < true_max:
                    raise ValueError(f"meta.max_seqlen={self.max_seqlen} is smaller than the longest document "
                                     f"({true_max}); rebuild the metadata")
                self.max_seqlen = max(self.max_seqlen, true_max)
        else:
            self.cu = None
            self.n_docs, self.L = q.shape[0], q.shape[1]
            self.n_tok = self.n_docs * self.L
            self.max_seqlen = self.L
        self.scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(self.head_dim)
        self.block_d = head_block(self.head_dim)
        self.dot_prec = dot_precision(q.dtype)
        self.upcast = INTERPRET
        if INTERPRET:
            # The interpreter's cost grows with the number of programs and block ops: few, wide tiles.
            (fwd, self.fwd_opts), (bwd, self.bwd_opts) = ((64, 64), {}), ((64, 64), {})
        else:
            (fwd, self.fwd_opts), (bwd, self.bwd_opts) = gpu_launch(q.dtype, self.block_d)
        self.fwd_blocks = (block_m or fwd[0], block_n or fwd[1])
        self.bwd_blocks = (block_m or bwd[0], block_n or bwd[1])
        for b in (*self.fwd_blocks, *self.bwd_blocks):
            if b < 16 or b & (b - 1):
                raise ValueError(f"block sizes must be powers of two >= 16, got {b}")

    def plan(self, blocks) -> TilePlan:
        return _plan(self.meta, self.kv_block, self.q_limit, self.cu, self.max_seqlen, *blocks)

    @property
    def cu_ptr(self):
        return self.cu if self.cu is not None else self.kv_block  # unused when padded

    def consts(self, blocks, opts):
        return dict(HEAD_DIM=self.head_dim, BLOCK_D=self.block_d, BLOCK_M=blocks[0], BLOCK_N=blocks[1],
                    PACKED=self.packed, UPCAST=self.upcast, DOT_PREC=self.dot_prec, **opts)


def attention_forward(q, k, v, meta, softmax_scale=None, block_m=None, block_n=None):
    """Returns (out like q, lse2 [H, n_tok] fp32 base-2 log-sum-exp of scale*log2(e)*scores, problem)."""
    pb = _Problem(q, k, v, meta, softmax_scale, block_m, block_n)
    q, k, v = last_dim_contiguous(q), last_dim_contiguous(k), last_dim_contiguous(v)
    out = torch.empty(q.shape, dtype=store_dtype(q.dtype), device=q.device)
    lse2 = torch.empty((pb.n_heads, pb.n_tok), dtype=torch.float32, device=q.device)
    if pb.n_tok and pb.max_seqlen:
        bm, bn = pb.fwd_blocks
        plan = pb.plan(pb.fwd_blocks)
        n_qt, n_kt = plan.full.shape[1], plan.full.shape[2]
        _fwd_kernel[(n_qt, pb.n_docs * pb.n_heads)](
            q, k, v, out, lse2, pb.kv_block, pb.q_limit, pb.cu_ptr,
            plan.full_q, plan.full_q_cnt, plan.part_q, plan.part_q_cnt,
            *_strides(q, pb.packed), *_strides(k, pb.packed), *_strides(v, pb.packed), *_strides(out, pb.packed),
            pb.L, pb.n_tok, pb.n_heads, pb.n_heads // pb.n_kv_heads, n_qt, n_kt, pb.scale * LOG2E,
            **pb.consts(pb.fwd_blocks, pb.fwd_opts))
    return out.to(q.dtype), lse2, pb


def attention_backward(do, q, k, v, out, lse2, pb: _Problem):
    # The kernels address the head dim with unit stride: the forward made q, k, v so, and callers hand the
    # backward the tensors they saved (the forward's inputs), which need the same copies.
    q, k, v, out, do = (last_dim_contiguous(t) for t in (q, k, v, out, do))
    dq = torch.empty(q.shape, dtype=store_dtype(q.dtype), device=q.device)
    dk = torch.empty(k.shape, dtype=store_dtype(k.dtype), device=q.device)
    dv = torch.empty(v.shape, dtype=store_dtype(v.dtype), device=q.device)
    if not (pb.n_tok and pb.max_seqlen):
        return dq.zero_().to(q.dtype), dk.zero_().to(k.dtype), dv.zero_().to(v.dtype)
    bm, bn = pb.bwd_blocks
    group = pb.n_heads // pb.n_kv_heads
    plan = pb.plan(pb.bwd_blocks)
    n_qt, n_kt = plan.full.shape[1], plan.full.shape[2]
    delta = torch.empty_like(lse2)
    _bwd_delta_kernel[(n_qt, pb.n_docs * pb.n_heads)](
        out, do, delta, pb.cu_ptr, *_strides(out, pb.packed), *_strides(do, pb.packed), pb.L, pb.n_tok, pb.n_heads,
        HEAD_DIM=pb.head_dim, BLOCK_D=pb.block_d, BLOCK_M=bm, PACKED=pb.packed)
    full_k, full_k_cnt, part_k, part_k_cnt = plan.k_major()
    _bwd_dkdv_kernel[(n_kt, pb.n_docs * pb.n_kv_heads)](
        q, k, v, do, lse2, delta, dk, dv, pb.kv_block, pb.q_limit, pb.cu_ptr, full_k, full_k_cnt, part_k, part_k_cnt,
        *_strides(q, pb.packed), *_strides(k, pb.packed), *_strides(v, pb.packed), *_strides(do, pb.packed),
        *_strides(dk, pb.packed), *_strides(dv, pb.packed),
        pb.L, pb.n_tok, pb.n_kv_heads, group, n_qt, n_kt, pb.scale, pb.scale * LOG2E,
        **pb.consts(pb.bwd_blocks, pb.bwd_opts))
    _bwd_dq_kernel[(n_qt, pb.n_docs * pb.n_heads)](
        q, k, v, do, lse2, delta, dq, pb.kv_block, pb.q_limit, pb.cu_ptr,
        plan.full_q, plan.full_q_cnt, plan.part_q, plan.part_q_cnt,
        *_strides(q, pb.packed), *_strides(k, pb.packed), *_strides(v, pb.packed), *_strides(do, pb.packed),
        *_strides(dq, pb.packed),
        pb.L, pb.n_tok, pb.n_heads, group, n_qt, n_kt, pb.scale, pb.scale * LOG2E,
        **pb.consts(pb.bwd_blocks, pb.bwd_opts))
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class ChunkAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, meta, softmax_scale, block_m, block_n):
        out, lse2, pb = attention_forward(q, k, v, meta, softmax_scale, block_m, block_n)
        ctx.save_for_backward(q, k, v, out, lse2)
        ctx.pb = pb
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, out, lse2 = ctx.saved_tensors
        dq, dk, dv = attention_backward(do, q, k, v, out, lse2, ctx.pb)
        return dq, dk, dv, None, None, None, None


def chunk_attention(q, k, v, meta, softmax_scale=None, block_m=None, block_n=None):
    """Chunk-masked attention (differentiable). Same contract as worldvla.ops.masked_attention."""
    return ChunkAttention.apply(q, k, v, meta, softmax_scale, block_m, block_n)


def chunk_attention_with_lse(q, k, v, meta, softmax_scale=None, block_m=None, block_n=None):
    """Forward only: (out, lse) with lse [B, L, H] (padded) or [T, H] (packed), natural log, +inf for empty rows."""
    out, lse2, pb = attention_forward(q, k, v, meta, softmax_scale, block_m, block_n)
    lse = (lse2 * LN2).t()
    return out, (lse if pb.packed else lse.reshape(pb.n_docs, pb.L, pb.n_heads))


def tile_plan(meta, block_m: int, block_n: int) -> TilePlan:
    """The tile classification the kernels use for `meta` (tests, tuning)."""
    kvb, ql = meta.kv_block.to(torch.int32), meta.q_limit.to(torch.int32)
    if meta.cu_seqlens is None:
        kvb, ql = kvb.reshape(-1, kvb.shape[-1]), ql.reshape(-1, ql.shape[-1])
        return build_tile_plan(kvb, ql, None, kvb.shape[-1], block_m, block_n)
    cu = meta.cu_seqlens.to(torch.int32)
    return build_tile_plan(kvb, ql, cu, int((cu[1:] - cu[:-1]).max()), block_m, block_n)
