"""Weighted cross-entropy + z-loss straight from hidden states (spec section 2.5).

    loss = sum_i w[y_i] CE_i / sum_i w[y_i]  +  z_weight * mean_i logsumexp_i^2

over positions with a label (!= ignore_index). Hidden states and labels come
already shifted: hidden[i] predicts targets[i]. When the labelled positions all weigh
zero (e.g. only image codes under an image weight of 0) the CE term is 0, not 0 / 0:
a micro-batch of such samples adds its z-loss alone to a training step.
"""
from __future__ import annotations

import math
import numbers
import operator

import torch

from . import dispatch


def linear_cross_entropy_ref(hidden, weight, targets, class_weight=None, z_weight=1e-5, ignore_index=-100):
    """Materializes fp32 (float64 for float64 inputs) logits for the labelled rows only. Returns (loss, z_mean).
    Selecting those rows synchronizes a GPU anyway; the targets' range is checked here too (one more read),
    so that a target out of range is refused by name, not by torch's gather (on a GPU, a device-side assert)."""
    targets = targets.long()  # compared in int64: in uint8 a target of 156 would equal ignore_index -100
    valid = targets != ignore_index
    _check_target_range(targets, valid, weight.shape[0], ignore_index)
    _check_class_weight_values("linear_cross_entropy", class_weight)
    h = hidden[valid]
    y = targets[valid]
    if y.numel() == 0:  # zero, reaching both inputs: the weight's gradient is zeros, not None (as the fused
        # kernels give), so that a rank whose micro-batch has no label joins FSDP's gradient reduction. Sums of
        # empty slices, not (sum) * 0: an inf in an ignored row made that NaN; float64 inputs keep float64.
        zero = float32_or_wider(hidden[:0].sum() + weight[:0].sum())
        return zero, zero.detach()
    return _cross_entropy(float32_or_wider(h @ weight.t()), y, class_weight, z_weight)


def float32_or_wider(logits: torch.Tensor) -> torch.Tensor:
    """The loss's logits in float32, or float64 for float64 inputs (gradcheck)."""
    return logits if logits.dtype == torch.float64 else logits.float()


def _check_class_weight(class_weight, vocab: int):
    """One weight per class: a [V, 1] one would broadcast against the per-row losses into a wrong loss."""
    if class_weight is not None and (class_weight.dim() != 1 or class_weight.numel() != vocab):
        raise ValueError(f"class_weight must be [V={vocab}], got {tuple(class_weight.shape)}")


def _check_class_weight_values(op: str, class_weight) -> None:
    """Weights >= 0 and finite: a negative one makes the loss no mean (a weight sum <= 0 skips the division and
    rewards the rows' CE). Read by the paths that read the targets (the reference, `logits_cross_entropy`), and only
    on the CPU, where it is free: a GPU tensor's read would sync every step, and the fused path reads nothing on
    the host. The weights `loss_class_weights` builds (the model's and the trainer's) are refused there, on the
    CPU, before."""
    if class_weight is None or class_weight.device.type != "cpu" or class_weight.is_complex() \
            or not dispatch.values_readable(class_weight):
        return
    bad = (~(torch.isfinite(class_weight) & (class_weight >= 0))).nonzero().flatten()
    if bad.numel():
        i = int(bad[0])
        more = f" and {bad.numel() - 1} more" if bad.numel() > 1 else ""
        raise ValueError(f"{op}: class_weight must hold finite weights >= 0 (0 leaves a class out of the loss, 1 "
                         f"weighs it as usual), got {class_weight[i].item()} for class {i}{more}; the loss is the "
                         "targets' CE averaged with these weights")


def _check_z_weight(op: str, z_weight) -> float:
    """The z-loss weight as a float. A string was taken by the Triton path (its float()) and refused by the
    reference deep inside torch; a NaN or an infinity would make every loss non-finite."""
    if isinstance(z_weight, bool) or not isinstance(z_weight, numbers.Real) or not math.isfinite(z_weight):
        raise TypeError(f"{op}: z_weight must be a finite number (0: no z-loss; a one-element tensor: its "
                        f".item()), got {z_weight!r} ({type(z_weight).__name__})")
    return float(z_weight)


def _check_ignore_index(ignore_index) -> int:
    """The ignored label as an int. A float was truncated by the Triton path (-100.5 ignored the -100 rows) and
    compared as it is by the reference (which then refused them as out of range)."""
    try:
        if isinstance(ignore_index, bool):
            raise TypeError
        return operator.index(ignore_index)
    except TypeError:
        raise TypeError(f"linear_cross_entropy: ignore_index must be an integer label (-100 by default), got "
                        f"{ignore_index!r} ({type(ignore_index).__name__})") from None


def logits_cross_entropy(logits, targets, class_weight=None, z_weight=1e-5):
    """The same loss from logits [n, V] of labelled rows (targets [n], none ignored), computed in fp32 (fp64
    logits stay fp64): for a head that is more than its weight (an adapter), run as a module. Returns
    (loss, z_mean); no rows give 0 for both, as `linear_cross_entropy` does. The targets' range is read, as
    the reference reads it (a target out of range is refused by name, not by torch's gather)."""
    if logits.dim() != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(f"logits_cross_entropy wants logits [n, V] and targets [n]; got {tuple(logits.shape)}, "
                         f"{tuple(targets.shape)}")
    dispatch.check_floats("logits_cross_entropy", logits=logits)
    dispatch.require_integers(targets, "logits_cross_entropy: targets must be integer class ids")
    dispatch.check_devices("logits_cross_entropy", logits=logits, targets=targets, class_weight=class_weight)
    _check_class_weight(class_weight, logits.shape[1])
    _check_class_weight_values("logits_cross_entropy", class_weight)
    z_weight = _check_z_weight("logits_cross_entropy", z_weight)
    targets = targets.long()
    vocab = logits.shape[1]
    if targets.numel() and dispatch.values_readable(targets) and bool(((targets < 0) | (targets >= vocab)).any()):
        raise ValueError(f"logits_cross_entropy: targets must lie in [0, {vocab}) (labelled rows only: leave out "
                         "the ignored ones, e.g. -100); got values outside")
    if targets.numel() == 0:  # zero, not the NaN of an empty mean, reaching the logits (zeros for their gradient)
        zero = float32_or_wider(logits[:0].sum())
        return zero, zero.detach()
    return _cross_entropy(float32_or_wider(logits), targets, class_weight, z_weight)


def _cross_entropy(logits, targets, class_weight, z_weight):
    """The loss from fp32 (or fp64) logits [n >= 1, V] and int64 targets [n] in range."""
    _check_class_weight(class_weight, logits.shape[-1])
    lse = torch.logsumexp(logits, dim=-1)
    ce = lse - logits.gather(1, targets.unsqueeze(1)).squeeze(1)
    if class_weight is not None:
        w = class_weight.to(ce.dtype)[targets]
        w_sum = w.sum()  # rows that all weigh zero give a CE term of 0 (not 0 / 0), and still their z-loss
        ce_mean = (w * ce).sum() / torch.where(w_sum > 0, w_sum, torch.ones_like(w_sum))
    else:
        ce_mean = ce.mean()
    z = (lse * lse).mean()
    return ce_mean + z_weight * z, z.detach()


def _check_target_range(targets, valid, vocab: int, ignore_index: int):
    """Every target (int64) in [0, V) or ignore_index (`valid` marks the others). It reads the values: the
    reference does, which selects the labelled rows on the host anyway; the Triton path checks CPU targets in
    its op (kernels/linear_ce.py), and on a GPU makes a target out of range a NaN loss rather than sync. Not
    where values cannot be read (torch.compile, fake and meta tensors)."""
    if targets.numel() and dispatch.values_readable(targets):
        if bool((valid & ((targets < 0) | (targets >= vocab))).any()):
            raise ValueError(f"linear_cross_entropy: targets must be {ignore_index} (ignored) or lie in "
                             f"[0, {vocab}); got values outside")


def linear_cross_entropy(hidden, weight, targets, class_weight=None, z_weight=1e-5, ignore_index=-100, backend="auto"):
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1] or targets.shape != hidden.shape[:1]:
        raise ValueError(f"linear_cross_entropy wants hidden [N, H], weight [V, H], targets [N]; got "
                         f"{tuple(hidden.shape)}, {tuple(weight.shape)}, {tuple(targets.shape)}")
    if weight.shape[0] == 0:
        raise ValueError(f"linear_cross_entropy: the vocabulary is empty (weight {tuple(weight.shape)}); "
                         "pass the output head's weight [V, H] with V >= 1")
    dispatch.check_floats("linear_cross_entropy", hidden=hidden, weight=weight)
    dispatch.check_devices("linear_cross_entropy", hidden=hidden, weight=weight, targets=targets,
                           class_weight=class_weight)
    dispatch.require_integers(targets, "linear_cross_entropy: targets must be integer class ids")
    _check_class_weight(class_weight, weight.shape[0])
    z_weight = _check_z_weight("linear_cross_entropy", z_weight)
    ignore_index = _check_ignore_index(ignore_index)
    # Under autocast the logits' product takes autocast's dtype, as the reference's matmul would: the fused
    # kernels then get one dtype (training's bf16 hidden and fp32 head were refused by Triton, and fell back to
    # the reference's full logits) and compute what the reference does.
    hidden, weight = dispatch.autocast_floats(hidden.device.type, hidden, weight)
    return dispatch.call("linear_cross_entropy", backend, hidden.device.type, hidden, weight, targets,
                         class_weight, z_weight, ignore_index)


dispatch.register("linear_cross_entropy", "torch", linear_cross_entropy_ref)
