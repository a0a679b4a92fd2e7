"""Classification-logit distillation losses: softmax KD (Hinton) and the sigmoid variant for dense detectors.

Conventions shared by both functions:

* The teacher input is detached inside the function: it never receives gradients. Optional ``weight``
  tensors are used as given (detach them yourself if they come out of a network).
* Half-precision inputs (float16 / bfloat16) are upcast to float32 before any arithmetic; float32 /
  float64 inputs keep their dtype (mixed inputs are promoted to the wider one).
* No loss weight is applied: multiply by the method's weight outside.

References: mmrazor 1.x ``KLDivergence`` (``mmrazor/models/losses/kl_divergence.py``) for ``kd_loss``;
PaddleDetection ``DistillPPYOLOELoss.quality_focal_loss`` (``ppdet/slim/distill_loss.py``) for
``sigmoid_kd_loss``. Deviations are listed in each docstring.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from detkd.losses._softmax_kl import softmax_kl_sum

__all__ = ["kd_loss", "sigmoid_kd_loss"]

_KD_REDUCTIONS = ("batchmean", "sum", "mean", "none")
_SIGMOID_REDUCTIONS = ("mean", "sum", "none")


def _upcast_pair(s: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """Upcast float16/bfloat16 to float32, then promote both tensors to a common floating dtype."""
    if s.dtype in (torch.float16, torch.bfloat16):
        s = s.float()
    if t.dtype in (torch.float16, torch.bfloat16):
        t = t.float()
    dtype = torch.promote_types(s.dtype, t.dtype)
    return s.to(dtype), t.to(dtype)


def _check_temperature(name: str, temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"{name}: temperature must be > 0, got {temperature!r}")


def kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 1.0,
    reduction: str = "batchmean",
    weight: Optional[Tensor] = None,
) -> Tensor:
    """Hinton knowledge distillation: temperature-softened KL(teacher || student) over classes (dim 1).

    Reference: Hinton et al., "Distilling the Knowledge in a Neural Network", 2015. Numbers match
    mmrazor ``KLDivergence(tau=temperature, reduction=reduction)`` (teacher detached, ``loss_weight=1``).

    With ``p^T = softmax(t / T, dim=1)`` and ``p^S = softmax(s / T, dim=1)`` the element-wise term is

        l[n, k, ...] = T^2 * w[n, ...] * p^T[n, k, ...] * (log p^T[n, k, ...] - log p^S[n, k, ...])

    (``w = 1`` without ``weight``), reduced as ``F.kl_div`` does:

    * ``"batchmean"`` (default): ``l.sum() / N`` (N = ``student_logits.shape[0]``);
    * ``"sum"``: ``l.sum()``;
    * ``"mean"``: ``l.sum() / l.numel()`` (divides by the number of classes too);
    * ``"none"``: ``l`` itself, same shape as the logits.

    The ``T^2`` factor keeps gradient magnitudes comparable across temperatures: the gradient of the
    summed loss with respect to ``s`` is ``T * (p^S - p^T)``, and for large ``T`` the per-row loss tends
    to ``(1 / (2K)) * sum_k (d_k - mean(d))^2`` with ``d = s - t`` (logit matching, Hinton sec. 2.1).

    Args:
        student_logits: ``(N, K)`` or ``(N, K, *)`` (e.g. ``(N, K, A)``, ``(N, K, H, W)``): classes on dim 1.
            For detkd's anchors-first dense tensors ``(N, A, K)`` pass ``x.transpose(1, 2)``.
        teacher_logits: same shape as ``student_logits``. Detached inside.
        temperature: softmax temperature ``T > 0``. Default 1.0 (mmrazor's default ``tau``).
        reduction: ``"batchmean"`` (default, mmrazor's default), ``"sum"``, ``"mean"`` or ``"none"``.
        weight: optional per-position weights of shape ``(N, *)`` (the logits' shape without dim 1),
            e.g. ``(N,)`` for ``(N, K)`` logits or ``(N, A)`` for ``(N, K, A)``. Multiplies each position's
            KL before the reduction; the normalisation above is unchanged (not divided by ``sum(w)``).

    Returns:
        Scalar loss, or the element-wise tensor for ``reduction="none"``. Zero when the two logits are
        equal (or differ by a per-position constant added to every class).
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"kd_loss: student {tuple(student_logits.shape)} and teacher "
            f"{tuple(teacher_logits.shape)} logits must have the same shape"
        )
    if student_logits.dim() < 2:
        raise ValueError(
            f"kd_loss: expected logits (N, K, *) with classes on dim 1, got {tuple(student_logits.shape)}"
        )
    if reduction not in _KD_REDUCTIONS:
        raise ValueError(f"kd_loss: reduction must be one of {_KD_REDUCTIONS}, got {reduction!r}")
    _check_temperature("kd_loss", temperature)

    s, t = _upcast_pair(student_logits, teacher_logits.detach())
    t2 = temperature * temperature
    if weight is not None:
        expected = s.shape[:1] + s.shape[2:]
        if weight.shape != expected:
            raise ValueError(f"kd_loss: weight must have shape {tuple(expected)}, got {tuple(weight.shape)}")
    if weight is None and reduction != "none":
        # One autograd node; T^2 and the normalisation are applied to the sum (a scalar).
        total = softmax_kl_sum(s, t, temperature, dim=1)
        if reduction == "batchmean":
            return total * t2 / s.shape[0]
        if reduction == "mean":
            return total * t2 / s.numel()
        return total * t2

    log_p_s = F.log_softmax(s / temperature, dim=1)
    log_p_t = F.log_softmax(t / temperature, dim=1)
    loss = F.kl_div(log_p_s, log_p_t, reduction="none", log_target=True)
    if weight is not None:
        loss = loss * weight.to(loss.dtype).unsqueeze(1)
    if reduction == "batchmean":
        return loss.sum() * t2 / s.shape[0]
    if reduction == "sum":
        return loss.sum() * t2
    if reduction == "mean":
        return loss.sum() * t2 / loss.numel()
    return loss * t2


def sigmoid_kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 1.0,
    weight: Optional[Tensor] = None,
    beta: float = 2.0,
    quality_focal: bool = True,
    reduction: str = "mean",
    avg_factor: Optional[Union[float, Tensor]] = None,
) -> Tensor:
    """Per-class sigmoid KD for dense detectors: BCE towards the teacher's scores, optionally QFL-weighted.

    Reference: PP-YOLOE+ distillation, PaddleDetection ``DistillPPYOLOELoss.quality_focal_loss``
    (``ppdet/slim/distill_loss.py``), itself the Quality Focal Loss of Li et al., "Generalized Focal
    Loss", NeurIPS 2020, with the teacher's score as the soft target.

    With ``q = sigmoid(t / T)`` (teacher score, soft target) and ``p = sigmoid(s / T)``, per element

        l[..., k] = w * BCE(p, q) * |p - q|^beta          (the ``|p - q|^beta`` factor only if quality_focal)
        BCE(p, q) = -(q * log p + (1 - q) * log(1 - p))

    reduced as PP-YOLOE does (sum over classes, then over anchors):

    * ``"mean"`` (default): ``l.sum() / avg_factor`` if ``avg_factor`` is given, else
      ``l.sum() / R`` with ``R = l.numel() / K`` rows (anchors), i.e. the per-anchor class sums averaged
      over anchors (PP-YOLOE's ``loss.sum(1).mean()``; *not* divided by ``K``);
    * ``"sum"``: ``l.sum()``;
    * ``"none"``: ``l``, same shape as the logits.

    PP-YOLOE+ calls it on every anchor of the batch with ``beta=2``, no temperature and
    ``avg_factor = max(sum of the student's assigned (TAL) target scores, 1)`` (its ``pos_num``), and
    weights the result by ``logits_loss_weight['class'] = 1.0`` and then ``loss_weight['logits'] = 4.0``.
    Reproduce it with ``4.0 * sigmoid_kd_loss(s, t, avg_factor=assigned_scores.sum().clamp(min=1))``.

    Temperature: logits are divided by ``T`` before the sigmoid; the loss is *not* multiplied by ``T^2``
    (unlike :func:`kd_loss`). Without the focal factor the gradient of the summed loss with respect to
    ``s`` is ``w * (p - q) / T``. With ``T = 1`` this is exactly the PP-YOLOE form.

    Deviation: PP-YOLOE passes probabilities to ``F.binary_cross_entropy`` (log clamped at -100);
    here BCE is computed from logits (``binary_cross_entropy_with_logits``), which is the same value
    wherever the probabilities are not saturated and stays finite where they are.

    Args:
        student_logits: raw logits with classes last, e.g. ``(N, A, K)`` (detkd's dense-head layout)
            or ``(R, K)``.
        teacher_logits: same shape. Detached inside.
        temperature: ``T > 0``. Default 1.0 (PP-YOLOE uses none).
        weight: optional weights, either the logits' shape (per element) or the logits' shape without
            the last dim (per anchor, broadcast over classes).
        beta: focal exponent on ``|p - q|``. Default 2.0 (PP-YOLOE; mmdet's LD repo ``KDQualityFocalLoss``
            uses 1.0).
        quality_focal: multiply by ``|p - q|^beta``. Default True (PP-YOLOE). With False the loss is
            plain soft-target BCE, whose minimum (at ``p = q``) is the teacher's entropy, not zero.
        reduction: ``"mean"`` (default), ``"sum"`` or ``"none"``.
        avg_factor: normaliser for ``"mean"`` (float or 0-d tensor); only allowed with ``"mean"``.

    Returns:
        Scalar loss, or the element-wise tensor for ``reduction="none"``. With ``quality_focal=True``
        it is zero when student and teacher logits are equal.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"sigmoid_kd_loss: student {tuple(student_logits.shape)} and teacher "
            f"{tuple(teacher_logits.shape)} logits must have the same shape"
        )
    if student_logits.dim() < 1:
        raise ValueError("sigmoid_kd_loss: expected logits with classes on the last dim")
    if reduction not in _SIGMOID_REDUCTIONS:
        raise ValueError(
            f"sigmoid_kd_loss: reduction must be one of {_SIGMOID_REDUCTIONS}, got {reduction!r}"
        )
    if avg_factor is not None and reduction != "mean":
        raise ValueError("sigmoid_kd_loss: avg_factor can only be used with reduction='mean'")
    _check_temperature("sigmoid_kd_loss", temperature)

    s, t = _upcast_pair(student_logits, teacher_logits.detach())
    z_s = s / temperature
    q = torch.sigmoid(t / temperature)
    loss = F.binary_cross_entropy_with_logits(z_s, q, reduction="none")
    if quality_focal:
        loss = loss * (torch.sigmoid(z_s) - q).abs().pow(beta)

    if weight is not None:
        w = weight.to(loss.dtype)
        if weight.shape == s.shape[:-1]:
            w = w.unsqueeze(-1)
        elif weight.shape != s.shape:
            raise ValueError(
                f"sigmoid_kd_loss: weight must have shape {tuple(s.shape)} or {tuple(s.shape[:-1])}, "
                f"got {tuple(weight.shape)}"
            )
        loss = loss * w

    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    if avg_factor is not None:
        return loss.sum() / avg_factor
    rows = max(loss.numel() // max(s.shape[-1], 1), 1)
    return loss.sum() / rows
