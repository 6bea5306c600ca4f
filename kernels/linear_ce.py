"""Fused linear cross-entropy with per-target-class weights and z-loss (spec section 2.5).

    loss = sum_i w[y_i] CE_i / sum_i w[y_i]  +  z_weight * mean_i lse_i^2     (labelled rows only)

The [N, V] logits are never held for all rows: rows are processed in chunks (of at most
~256 MiB of fp32-sized logits). For each chunk, logits = h_c @ W^T (one matmul), then one
Triton program per row (per 32 rows in the interpreter) makes an online max/sum-exp pass
over the vocabulary, writes CE_i and lse_i, and, when a gradient is wanted, overwrites the
chunk's logits in place with dloss/dlogits:

    dlogits_ij = (a_i + z_i) softmax_ij - a_i [j == y_i],   a_i = w[y_i] / sum w,  z_i = 2 z_weight lse_i / n

grad_hidden and grad_weight then come from two matmuls per chunk, so the forward already
holds the gradients and the backward only scales them by the incoming gradient. grad_weight
is summed over chunks in fp32 ([V, H] fp32: 1 GiB for Chameleon-7B's head), far less than
[N, V] fp32 logits.

Both gradients are kept in fp32 until the backward, which multiplies them by the incoming
gradient and then rounds them once to the inputs' dtype, as autograd does: a loss scale
(torch.amp.GradScaler's 65536, itself above fp16's largest value) is applied before the rounding
it exists for. (That holds [N, H] + [V, H] fp32 between forward and backward, twice the
inputs' dtype.) In fp16 the dlogits for d loss = 1 are ~1/n of a softmax: subnormals or zeros
from a few thousand labelled rows on. The kernel then writes them times a power of two,
`g_scale`, that brings the largest row weight into [1, 2); grad_hidden's product (a row of
dlogits sums to at most ~4 there) takes them so, grad_weight's, where the rows add up, takes
them scaled down by a further power of two where a bound of its entries (sum_i max_j
|dlogits_ij| |h_ik|) would come near fp16's largest value. The scales come off in fp32, exactly.

No host synchronization: every row is processed, and ignored rows (target == ignore_index)
have their hidden state zeroed and carry zero weight, so they add nothing to the loss or the
gradients. The normalizers (sum of weights, number of labelled rows) stay on the device, in
per-row weights the kernel reads. Shapes and launches depend on N and V only, so the
forward is capturable in a CUDA graph. A labelled target outside [0, V) makes the loss NaN
(raising would need the targets on the host; CPU inputs, and `check_targets=True`, raise).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, check_device, check_dtype, store_dtype


# Not specialized on the chunk's rows and offset (divisible by 16, equal to 1): they change from chunk to
# chunk, and each specialization would compile the kernel anew for the same sm_90 code.
@triton.jit(do_not_specialize=["n_rows", "row0", "n_total"])
def _ce_rows_kernel(LOGITS, s_row, TARGETS, ROW_W, CE, LSE, n_rows, V, row0, n_total, z_coef,
                    HAS_WEIGHT: tl.constexpr, WRITE_GRAD: tl.constexpr, ROWS: tl.constexpr, BLOCK_V: tl.constexpr):
    """ROW_W is fp32 [2 * n_total + 1]: the CE weight a_i (row 0, read when HAS_WEIGHT; otherwise
    a_i equals row 1), the z-loss weight (row 1: 1/n on labelled rows, 0 on ignored ones), then the
    gradient's scale: the gradient written is dloss/dlogits times it (a power of two)."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    r_valid = rows < n_rows
    base = LOGITS + rows.to(tl.int64)[:, None] * s_row
    y = tl.load(TARGETS + row0 + rows, mask=r_valid, other=0)
    y_ok = (y >= 0) & (y < V)
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
    # A target outside [0, V) is never read: its CE is NaN, which makes the loss NaN.
    x_y = tl.load(LOGITS + rows.to(tl.int64) * s_row + y, mask=r_valid & y_ok, other=float("nan")).to(tl.float32)
    tl.store(CE + row0 + rows, lse - x_y, mask=r_valid)
    tl.store(LSE + row0 + rows, lse, mask=r_valid)
    if WRITE_GRAD:
        zw = tl.load(ROW_W + n_total + row0 + rows, mask=r_valid, other=0.0)
        if HAS_WEIGHT:
            a = tl.load(ROW_W + row0 + rows, mask=r_valid, other=0.0)
        else:
            a = zw
        g_scale = tl.load(ROW_W + 2 * n_total)
        c = (a + z_coef * zw * lse) * g_scale
        a = a * g_scale
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + offs
            mask = r_valid[:, None] & (cols < V)[None, :]
            x = tl.load(base + cols[None, :], mask=mask, other=float("-inf")).to(tl.float32)
            g = c[:, None] * tl.exp(x - lse[:, None]) - tl.where(cols[None, :] == y[:, None], a[:, None], 0.0)
            tl.store(base + cols[None, :], g.to(LOGITS.dtype.element_ty), mask=mask)


def gpu_launch(V: int):
    """(ROWS, BLOCK_V, compiler options) of the row kernel on the GPU: one row a program."""
    return 1, min(triton.next_power_of_2(V), 4096), dict(num_warps=8)


def _chunk_rows(n: int, vocab: int, elem_bytes: int, chunk_size: int | None) -> int:
    """Rows per chunk: `chunk_size` if given, else chunks of at most ~256 MiB of logits,
    balanced so the last one is not a sliver. Depends on shapes only."""
    if chunk_size is not None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        return chunk_size
    rows = max(1, min(n, (256 << 20) // (vocab * elem_bytes)))
    n_chunks = max(1, triton.cdiv(n, rows))  # no row (a micro-batch without a label): one empty chunk
    return max(1, triton.cdiv(n, n_chunks))


def check_inputs(hidden, weight, targets, class_weight=None):
    """Shape, dtype and device checks (no tensor values are read)."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1] or targets.shape != hidden.shape[:1]:
        raise ValueError(f"linear_cross_entropy wants hidden [N, H], weight [V, H], targets [N]; got "
                         f"{tuple(hidden.shape)}, {tuple(weight.shape)}, {tuple(targets.shape)}")
    if hidden.dtype != weight.dtype:
        raise TypeError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must share a dtype")
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise TypeError(f"linear_cross_entropy: targets must be integer class ids, got {targets.dtype}")
    check_dtype("linear_cross_entropy", hidden)
    check_device("linear_cross_entropy", hidden, weight, targets, class_weight)
    V = weight.shape[0]
    if V == 0:
        raise ValueError(f"linear_cross_entropy: the vocabulary is empty (weight {tuple(weight.shape)}); "
                         "pass the output head's weight [V, H] with V >= 1")
    if class_weight is not None and (class_weight.dim() != 1 or class_weight.numel() != V):
        raise ValueError(f"class_weight must be [V={V}], got {tuple(class_weight.shape)}")


def linear_ce_forward(hidden, weight, targets, class_weight=None, z_weight=1e-5, ignore_index=-100,
                      need_grad_hidden=False, need_grad_weight=False, chunk_size=None, check_targets=None):
    """Returns (loss, z_mean, grad_hidden or None, grad_weight or None); gradients for d loss = 1, in fp32
    (the backward scales them, then rounds them to the inputs' dtype).

    `check_targets`: raise ValueError on a labelled target outside [0, V). None checks CPU
    inputs only (reading CUDA targets on the host would synchronize); elsewhere such a target
    makes the loss NaN."""
    check_inputs(hidden, weight, targets, class_weight)
    V, N = weight.shape[0], hidden.shape[0]
    dev = hidden.device
    # int64 first: in a narrower dtype the range checks and the clamp below wrap (uint8's -1 is 255, and
    # int8 cannot hold V), which made good targets out of range and wrote NaN losses or false errors.
    targets = targets.long()
    valid = targets != ignore_index
    if check_targets or (check_targets is None and targets.device.type == "cpu"):
        if bool((valid & ((targets < 0) | (targets >= V))).any()):
            raise ValueError(f"linear_cross_entropy: targets must be {ignore_index} (ignored) or lie in [0, {V}); "
                             "got values outside")
    # Clamped to [-1, V] before the int32 narrowing: an int64 target out of range stays out of range (2^32 + 5
    # would wrap to class 5 and be trained on) and so still makes the loss NaN.
    y = torch.where(valid, targets.clamp(-1, V), torch.zeros_like(targets))
    y32 = y.to(torch.int32).contiguous()
    # Per-row weights, normalizers kept on the device: row 0 the CE weight, row 1 the z-loss weight.
    n_valid = valid.sum(dtype=torch.float32)
    # [2, N] row weights and, last, the gradient's scale (g_scale below): one buffer for the kernel
    row_buf = torch.zeros(2 * N + 1, dtype=torch.float32, device=dev)
    row_w = row_buf[:2 * N].view(2, N)
    row_w[1] = valid.float() / n_valid.clamp(min=1.0)
    if class_weight is not None:
        # clamped: an out-of-range target must not index out of bounds (the kernel makes its CE NaN)
        w = torch.where(valid, class_weight.to(torch.float32)[y.clamp(0, V - 1)], torch.zeros((), device=dev))
        w_sum = w.sum()  # all rows weighing zero: a CE term of 0, not 0 / 0 (the z-loss still counts)
        row_w[0] = torch.where(valid, w / torch.where(w_sum > 0, w_sum, torch.ones_like(w_sum)),
                               torch.zeros((), device=dev))
    else:
        row_w[0] = row_w[1]
    write_grad = need_grad_hidden or need_grad_weight
    ce = torch.empty(N, dtype=torch.float32, device=dev)
    lse = torch.empty(N, dtype=torch.float32, device=dev)
    grad_h = torch.empty(hidden.shape, dtype=torch.float32, device=dev) if need_grad_hidden else None
    grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=dev) if need_grad_weight else None
    # fp16: dlogits times a power of two that brings the largest row weight into [1, 2) (module docstring);
    # every row's dlogits then sum to at most ~4 in magnitude. On the device: no host read.
    scaled = write_grad and N > 0 and hidden.dtype == torch.float16
    g_scale = row_buf[2 * N]
    if scaled:
        g_scale.copy_(torch.exp2(-torch.floor(torch.log2(row_w.amax().clamp(min=2.0 ** -100)))))
    else:
        g_scale.fill_(1.0)
    # The interpreter pays per program, so there a program takes 32 rows.
    rows_per_prog, block_v, opts = (32, min(triton.next_power_of_2(V), 1024), {}) if INTERPRET else gpu_launch(V)
    step = _chunk_rows(N, V, 4, chunk_size)
    zero = torch.zeros((), dtype=hidden.dtype, device=dev)
    for r0 in range(0, N, step):
        # Ignored rows are zeroed: finite logits, and nothing reaches the gradients.
        h_c = torch.where(valid[r0:r0 + step, None], hidden[r0:r0 + step], zero)
        logits = h_c @ weight.t()  # [rows, V] in the input dtype; overwritten by its gradient
        if store_dtype(logits.dtype) != logits.dtype:
            logits = logits.float()
        _ce_rows_kernel[(triton.cdiv(h_c.shape[0], rows_per_prog),)](
            logits, logits.stride(0), y32, row_buf, ce, lse, h_c.shape[0], V, r0, N, 2.0 * z_weight,
            HAS_WEIGHT=class_weight is not None, WRITE_GRAD=write_grad, ROWS=rows_per_prog, BLOCK_V=block_v, **opts)
        if not write_grad:
            continue
        dlogits = logits.to(weight.dtype)
        if need_grad_hidden:
            if grad_h.dtype == dlogits.dtype:
                torch.matmul(dlogits, weight, out=grad_h[r0:r0 + step])
            else:
                grad_h[r0:r0 + step] = dlogits @ weight
        if need_grad_weight:
            # Each chunk's product is rounded once to the input dtype, the sum over chunks is kept in fp32.
            if scaled:
                down = _fp16_sum_scale(g_scale, row_w, lse, h_c, r0, z_weight, class_weight is not None)
                dlogits.mul_(down)  # a power of two: exact but for new subnormals
                grad_w.addcmul_(dlogits.t() @ h_c, 1.0 / down)
            else:
                grad_w += dlogits.t() @ h_c
    # Ignored rows have finite ce and lse (their logits are 0) and zero weight.
    z = (row_w[1] * lse * lse).sum()
    loss = (row_w[0] * ce).sum() + z_weight * z
    if scaled:
        for g in (grad_h, grad_w):
            if g is not None:
                g.mul_(1.0 / g_scale)
    return loss, z.detach(), grad_h, grad_w


# Largest magnitude grad_weight's fp16 product of a chunk may reach (fp16's largest is 65504).
_FP16_SUM_LIMIT = 2.0 ** 14


def _fp16_sum_scale(g_scale, row_w, lse, h_c, r0, z_weight, has_weight):
    """A power of two <= 1 (a device scalar) that keeps grad_weight's fp16 product of one chunk of scaled
    dlogits below _FP16_SUM_LIMIT: its entries are at most sum_i rho_i |h_ik|, rho_i = g_scale (|c_i| + a_i)
    bounding row i's |dlogits| (c_i, a_i as in the kernel)."""
    rows = slice(r0, r0 + h_c.shape[0])
    zw = row_w[1, rows]
    a = row_w[0, rows] if has_weight else zw
    rho = g_scale * ((a + 2.0 * z_weight * zw * lse[rows]).abs() + a)
    bound = (rho @ h_c.abs().float()).amax() if h_c.numel() else rho.new_zeros(())  # no rows, or hidden size 0
    return torch.exp2(-torch.ceil(torch.log2(bound / _FP16_SUM_LIMIT)).clamp(min=0.0))


class LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, class_weight, z_weight, ignore_index, chunk_size, check_targets):
        loss, z, gh, gw = linear_ce_forward(hidden, weight, targets, class_weight, z_weight, ignore_index,
                                            need_grad_hidden=ctx.needs_input_grad[0],
                                            need_grad_weight=ctx.needs_input_grad[1], chunk_size=chunk_size,
                                            check_targets=check_targets)
        ctx.save_for_backward(gh, gw)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        ctx.mark_non_differentiable(z)
        return loss, z

    @staticmethod
    def backward(ctx, grad_loss, grad_z):
        gh, gw = ctx.saved_tensors
        return (scale_grad(gh, grad_loss, ctx.dtypes[0]), scale_grad(gw, grad_loss, ctx.dtypes[1]),
                None, None, None, None, None, None)


def scale_grad(grad, grad_loss, dtype):
    """An fp32 gradient for d loss = 1 times the incoming gradient, rounded once to `dtype` (None stays None)."""
    if grad is None:
        return None
    out = torch.empty(grad.shape, dtype=dtype, device=grad.device)
    return torch.mul(grad, grad_loss.to(torch.float32), out=out)  # computed in fp32, rounded on the store


def linear_cross_entropy(hidden, weight, targets, class_weight=None, z_weight=1e-5, ignore_index=-100, chunk_size=None,
                         check_targets=True):
    """Same contract as worldvla.ops.linear_cross_entropy: returns (loss, z_mean). With
    `check_targets` an out-of-range target raises, which reads CUDA targets on the host (one
    sync); pass False (or use the registered op) for a sync-free call. The gradients are hidden's and
    weight's: a class_weight that needs one is refused (worldvla.ops' `auto` takes the reference for it)."""
    if torch.is_grad_enabled() and class_weight is not None and class_weight.requires_grad:
        raise ValueError("linear_cross_entropy (Triton): class_weight needs a gradient and the Triton kernel gives "
                         "none; detach it (class_weight.detach()) or use worldvla.ops.linear_cross_entropy, whose "
                         "reference differentiates through it")
    if not torch.is_grad_enabled() or not (hidden.requires_grad or weight.requires_grad):
        loss, z, _, _ = linear_ce_forward(hidden, weight, targets, class_weight, z_weight, ignore_index,
                                          chunk_size=chunk_size, check_targets=check_targets)
        return loss, z
    return LinearCrossEntropy.apply(hidden, weight, targets, class_weight, z_weight, ignore_index, chunk_size,
                                    check_targets)
