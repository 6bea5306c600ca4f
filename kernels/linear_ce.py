"""Fused linear cross-entropy with per-target-class weights and z-loss (spec section 2.5).

    loss = sum_i w[y_i] CE_i / sum_i w[y_i]  +  z_weight * mean_i lse_i^2     (labelled rows only)

The [N, V] logits are never held for all rows: labelled rows are processed in chunks
(of at most ~256 MiB of fp32-sized logits). For each chunk, logits = h_c @ W^T (one
matmul), then one Triton program per row (per 32 rows in the interpreter) makes
an online max/sum-exp pass over the vocabulary, writes CE_i and lse_i, and, when a
gradient is wanted, overwrites the chunk's logits in place with dloss/dlogits:

    dlogits_ij = (a_i + z_i) softmax_ij - a_i [j == y_i],   a_i = w[y_i] / sum w,  z_i = 2 z_weight lse_i / n

(both normalizers are known before the first chunk). grad_hidden and grad_weight then
come from two matmuls per chunk, so the forward already holds the gradients and the
backward only scales them by the incoming gradient. grad_weight is summed over chunks in
fp32 ([V, H] fp32: 1 GiB for Chameleon-7B's head), far less than [N, V] fp32 logits.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, check_device, check_dtype, store_dtype


@triton.jit
def _ce_rows_kernel(LOGITS, s_row, TARGETS, ROW_W, CE, LSE, n_rows, V, row0, inv_wsum, z_coef,
                    HAS_WEIGHT: tl.constexpr, WRITE_GRAD: tl.constexpr, ROWS: tl.constexpr, BLOCK_V: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    r_valid = rows < n_rows
    base = LOGITS + rows.to(tl.int64)[:, None] * s_row
    y = tl.load(TARGETS + row0 + rows, mask=r_valid, other=0)
    offs = tl.arange(0, BLOCK_V)
    m = tl.full([ROWS], -1.0e30, tl.float32)
    l = tl.zeros([ROWS], tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + offs
        x = tl.load(base + cols[None, :], mask=r_valid[:, None] & (cols < V)[None, :], other=float("-inf"))
        x = x.to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, 1))
        l = l * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new[:, None]), 1)
        m = m_new
    lse = m + tl.log(tl.where(r_valid, l, 1.0))
    x_y = tl.load(LOGITS + rows.to(tl.int64) * s_row + y, mask=r_valid, other=0.0).to(tl.float32)
    tl.store(CE + row0 + rows, lse - x_y, mask=r_valid)
    tl.store(LSE + row0 + rows, lse, mask=r_valid)
    if WRITE_GRAD:
        if HAS_WEIGHT:
            a = tl.load(ROW_W + row0 + rows, mask=r_valid, other=0.0) * inv_wsum
        else:
            a = tl.full([ROWS], 1.0, tl.float32) * inv_wsum
        c = a + z_coef * lse
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + offs
            mask = r_valid[:, None] & (cols < V)[None, :]
            x = tl.load(base + cols[None, :], mask=mask, other=float("-inf")).to(tl.float32)
            g = c[:, None] * tl.exp(x - lse[:, None]) - tl.where(cols[None, :] == y[:, None], a[:, None], 0.0)
            tl.store(base + cols[None, :], g.to(LOGITS.dtype.element_ty), mask=mask)


def _chunk_rows(n: int, vocab: int, elem_bytes: int, chunk_size: int | None) -> int:
    if chunk_size is not None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        return chunk_size
    # Chunks of at most ~256 MiB of logits, balanced so the last one is not a sliver.
    rows = max(1, min(n, (256 << 20) // (vocab * elem_bytes)))
    n_chunks = triton.cdiv(n, rows)
    return triton.cdiv(n, n_chunks)


def linear_ce_forward(hidden, weight, targets, class_weight=None, z_weight=1e-5, ignore_index=-100,
                      need_grad_hidden=False, need_grad_weight=False, chunk_size=None):
    """Returns (loss, z_mean, grad_hidden or None, grad_weight or None); gradients for d loss = 1."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1] or targets.shape != hidden.shape[:1]:
        raise ValueError(f"linear_cross_entropy wants hidden [N, H], weight [V, H], targets [N]; got "
                         f"{tuple(hidden.shape)}, {tuple(weight.shape)}, {tuple(targets.shape)}")
    if hidden.dtype != weight.dtype:
        raise TypeError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must share a dtype")
    check_dtype("linear_cross_entropy", hidden)
    check_device("linear_cross_entropy", hidden, weight, targets, class_weight)
    V, Hd = weight.shape
    valid = targets != ignore_index
    rows = valid.nonzero().squeeze(1)
    n = rows.numel()
    if n == 0:
        zero = hidden.sum() * 0.0
        return zero.float(), zero.float().detach(), None, None
    y = targets[rows]
    if bool(((y < 0) | (y >= V)).any()):
        raise ValueError(f"targets must be {ignore_index} (ignored) or lie in [0, {V}); got values outside")
    h = hidden[rows]
    y32 = y.to(torch.int32).contiguous()
    if class_weight is not None:
        if class_weight.dim() != 1 or class_weight.numel() != V:
            raise ValueError(f"class_weight must be [V={V}], got {tuple(class_weight.shape)}")
        row_w = class_weight.to(torch.float32)[y]
        wsum = row_w.sum()
        inv_wsum = 1.0 / wsum
    else:
        row_w = y32  # unused placeholder pointer
        wsum = torch.tensor(float(n), device=hidden.device)
        inv_wsum = 1.0 / n
    # The kernel takes the normalizer as a scalar argument: one host sync for class weights.
    inv_wsum_f = float(inv_wsum)
    write_grad = need_grad_hidden or need_grad_weight
    ce = torch.empty(n, dtype=torch.float32, device=hidden.device)
    lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
    grad_h = torch.zeros_like(hidden) if need_grad_hidden else None
    grad_w = None
    if need_grad_weight:
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
    # One row per program on GPUs; the interpreter pays per program, so there a program takes 32 rows.
    rows_per_prog = 32 if INTERPRET else 1
    block_v = min(triton.next_power_of_2(V), 1024 if INTERPRET else 4096)
    step = _chunk_rows(n, V, 4, chunk_size)
    for r0 in range(0, n, step):
        h_c = h[r0:r0 + step]
        logits = h_c @ weight.t()  # [rows, V] in the input dtype; overwritten by its gradient
        if store_dtype(logits.dtype) != logits.dtype:
            logits = logits.float()
        _ce_rows_kernel[(triton.cdiv(h_c.shape[0], rows_per_prog),)](
            logits, logits.stride(0), y32, row_w, ce, lse, h_c.shape[0], V, r0, inv_wsum_f, 2.0 * z_weight / n,
            HAS_WEIGHT=class_weight is not None, WRITE_GRAD=write_grad, ROWS=rows_per_prog, BLOCK_V=block_v,
            **({} if INTERPRET else dict(num_warps=8)))
        if not write_grad:
            continue
        dlogits = logits.to(weight.dtype)
        if need_grad_hidden:
            grad_h[rows[r0:r0 + step]] = dlogits @ weight
        if need_grad_weight:
            # Each chunk's product is rounded once to the input dtype, the sum over chunks is kept in fp32.
            grad_w += dlogits.t() @ h_c
    if class_weight is not None:
        ce_mean = (row_w * ce).sum() / wsum
    else:
        ce_mean = ce.mean()
    z = (lse * lse).mean()
    loss = ce_mean + z_weight * z
    if grad_w is not None:
        grad_w = grad_w.to(weight.dtype)
    return loss, z.detach(), grad_h, grad_w


class LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, class_weight, z_weight, ignore_index, chunk_size):
        loss, z, gh, gw = linear_ce_forward(hidden, weight, targets, class_weight, z_weight, ignore_index,
                                            need_grad_hidden=ctx.needs_input_grad[0],
                                            need_grad_weight=ctx.needs_input_grad[1], chunk_size=chunk_size)
        ctx.save_for_backward(gh, gw)
        ctx.mark_non_differentiable(z)
        return loss, z

    @staticmethod
    def backward(ctx, grad_loss, grad_z):
        gh, gw = ctx.saved_tensors
        if gh is not None:
            gh = gh * grad_loss.to(gh.dtype)
        if gw is not None:
            gw = gw * grad_loss.to(gw.dtype)
        return gh, gw, None, None, None, None, None


def linear_cross_entropy(hidden, weight, targets, class_weight=None, z_weight=1e-5, ignore_index=-100, chunk_size=None):
    """Same contract as worldvla.ops.linear_cross_entropy: returns (loss, z_mean)."""
    if not torch.is_grad_enabled() or not (hidden.requires_grad or weight.requires_grad):
        loss, z, _, _ = linear_ce_forward(hidden, weight, targets, class_weight, z_weight, ignore_index,
                                          chunk_size=chunk_size)
        return loss, z
    return LinearCrossEntropy.apply(hidden, weight, targets, class_weight, z_weight, ignore_index, chunk_size)
