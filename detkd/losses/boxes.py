"""Box-regression distillation losses: localization distillation (LD), decoded-box KD and the
teacher-bounded regression loss, plus a vectorised element-wise GIoU.

Conventions shared by every function here:

* Teacher inputs (and regression targets) are detached inside the function: they never receive
  gradients. Optional ``weight`` tensors are used as given; weights derived inside from teacher scores
  are detached with the teacher.
* Half-precision inputs (float16 / bfloat16) are upcast to float32 before any arithmetic; float32 /
  float64 inputs keep their dtype (mixed inputs are promoted to the widest).
* Boxes are ``xyxy``. No loss weight is applied: multiply by the method's weight outside.

References: mmdetection 3.x ``KnowledgeDistillationKLDivLoss`` / ``LDHead`` for :func:`ld_loss`;
PaddleDetection ``DistillPPYOLOELoss.bbox_loss`` and ``GIoULoss`` (``ppdet/slim/distill_loss.py``,
``ppdet/modeling/losses/iou_loss.py``) for :func:`box_kd_loss` and :func:`giou`; Chen et al., NeurIPS
2017 for :func:`bounded_regression_loss`.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from detkd.losses._softmax_kl import softmax_kl_sum

__all__ = ["giou", "ld_loss", "box_kd_loss", "bounded_regression_loss"]

_REDUCTIONS = ("mean", "sum", "none")
# mmdet's weight_reduce_loss adds this to avg_factor before dividing.
_MMDET_AVG_EPS = torch.finfo(torch.float32).eps

Number = Union[float, Tensor]


def _upcast(*xs: Tensor) -> list[Tensor]:
    """Upcast float16/bfloat16 to float32, then promote all tensors to one common floating dtype."""
    xs = [x.float() if x.dtype in (torch.float16, torch.bfloat16) else x for x in xs]
    dtype = xs[0].dtype
    for x in xs[1:]:
        dtype = torch.promote_types(dtype, x.dtype)
    return [x.to(dtype) for x in xs]


def _check_reduction(name: str, reduction: str, avg_factor: Optional[Number]) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{name}: reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if avg_factor is not None and reduction == "sum":
        raise ValueError(f"{name}: avg_factor can not be used with reduction='sum'")


def _apply_row_weight(name: str, loss: Tensor, weight: Optional[Tensor]) -> Tensor:
    if weight is None:
        return loss
    if weight.shape != loss.shape:
        raise ValueError(f"{name}: weight must have shape {tuple(loss.shape)}, got {tuple(weight.shape)}")
    return loss * weight.to(loss.dtype)


def giou(boxes1: Tensor, boxes2: Tensor, eps: float = 1e-10) -> Tensor:
    """Element-wise generalized IoU of two aligned sets of ``xyxy`` boxes.

    Reference: Rezatofighi et al., "Generalized Intersection over Union", CVPR 2019; the ``eps``
    placement follows PaddleDetection ``GIoULoss`` (used by PP-YOLOE and its distillation):

        I = max(0, min(x2, x2') - max(x1, x1')) * max(0, min(y2, y2') - max(y1, y1'))
        U = area + area' - I + eps
        C = (max(x2, x2') - min(x1, x1')) * (max(y2, y2') - min(y1, y1')) + eps
        GIoU = I / U - (C - U) / C

    Args:
        boxes1: ``(..., 4)`` boxes ``x1, y1, x2, y2`` with ``x2 >= x1``, ``y2 >= y1``.
        boxes2: same shape as ``boxes1``.
        eps: stabiliser added to union and enclosing area. Default 1e-10 (PaddleDetection).

    Returns:
        ``(...)`` GIoU in ``[-1, 1]``; 1 for identical non-empty boxes. Differentiable in both inputs.
    """
    if boxes1.shape != boxes2.shape or boxes1.shape[-1:] != (4,):
        raise ValueError(
            f"giou: expected two (..., 4) tensors of the same shape, got {tuple(boxes1.shape)} and "
            f"{tuple(boxes2.shape)}"
        )
    a, b = _upcast(boxes1, boxes2)
    ax1, ay1, ax2, ay2 = a.unbind(-1)
    bx1, by1, bx2, by2 = b.unbind(-1)
    inter_w = (torch.minimum(ax2, bx2) - torch.maximum(ax1, bx1)).clamp(min=0)
    inter_h = (torch.minimum(ay2, by2) - torch.maximum(ay1, by1)).clamp(min=0)
    inter = inter_w * inter_h
    union = (ax2 - ax1) * (ay2 - ay1) + (bx2 - bx1) * (by2 - by1) - inter + eps
    enclose = (torch.maximum(ax2, bx2) - torch.minimum(ax1, bx1)) * (
        torch.maximum(ay2, by2) - torch.minimum(ay1, by1)
    ) + eps
    return inter / union - (enclose - union) / enclose


def ld_loss(
    student_bins: Tensor,
    teacher_bins: Tensor,
    temperature: float = 10.0,
    weight: Optional[Tensor] = None,
    avg_factor: Optional[Number] = None,
    reduction: str = "mean",
    bin_reduction: str = "mean",
    dim: int = -1,
) -> Tensor:
    """Localization distillation: temperature KL between teacher and student box-side distributions.

    Reference: Zheng et al., "Localization Distillation for Dense Object Detection", CVPR 2022. Numbers
    match mmdetection 3.x ``KnowledgeDistillationKLDivLoss(T=temperature, loss_weight=1)`` called with
    ``(pred, soft_label, weight, avg_factor)`` (``mmdet/models/losses/kd_loss.py`` + ``weighted_loss``).

    Each row is one box side's distribution over the ``B`` integral bins (``B = reg_max + 1`` for
    GFL/mmdet, ``B = reg_max`` for Ultralytics/PP-YOLOE), logits before softmax. With
    ``p^T = softmax(t / T)``, ``p^S = softmax(s / T)`` over the bins:

        row_loss[r] = T^2 * w[r] * mean_b p^T[r, b] * (log p^T[r, b] - log p^S[r, b])

    (``bin_reduction="sum"`` uses ``sum_b`` instead; mmdet averages over bins, so ``sum`` is ``B`` times
    larger), then

    * ``"mean"`` (default): ``row_loss.sum() / (avg_factor + eps32)`` if ``avg_factor`` is given
      (``eps32 = torch.finfo(torch.float32).eps``, as mmdet adds), else ``row_loss.mean()``;
    * ``"sum"``: ``row_loss.sum()`` (no ``avg_factor`` allowed);
    * ``"none"``: ``row_loss`` of shape ``student_bins.shape[:-1]``.

    How mmdet's ``LDHead.loss_by_feat_single`` (``mmdet/models/dense_heads/ld_head.py``) calls it, per
    FPN level, so an integration can reproduce GFL-LD numbers:

    * rows: the *positive* anchors only (ATSS assignment), ``bbox_pred[pos]`` reshaped from
      ``(P, 4 * (reg_max + 1))`` to ``(4P, reg_max + 1)``; the teacher's ``soft_targets`` the same way;
    * ``weight``: ``weight_targets[:, None].expand(-1, 4).reshape(-1)`` where ``weight_targets`` is the
      *student's own* detached classification score, ``cls_score.detach().sigmoid().max(dim=1)`` at the
      positives (the same weights as its GIoU and DFL terms);
    * ``avg_factor=4.0`` (averages the four sides; the loss is *not* divided by the number of positives
      or by ``sum(weight_targets)``, unlike ``loss_bbox`` / ``loss_dfl``);
    * config ``loss_ld=dict(type='KnowledgeDistillationKLDivLoss', loss_weight=0.25, T=10)``; the level
      losses are summed. I.e. per level: ``0.25 * ld_loss(s_pos, t_pos, 10.0, w4, avg_factor=4.0)``.

    PP-YOLOE+'s distillation instead uses a soft-label DFL term (``distribution_focal_loss``: cross
    entropy to ``softmax(t)``, ``T = 1``, weighted by the assigned-score weight, divided by its sum and
    by 4, weight 0.5); that equals ``ld_loss(s, t, 1.0, w4, avg_factor=w4.sum(), bin_reduction="sum")``
    plus the teacher's entropy term, which is constant in the student (same gradients).

    Args:
        student_bins: ``(R, B)`` or any ``(..., B)`` bin logits, bins last (or along ``dim``).
        teacher_bins: same shape. Detached inside.
        temperature: ``T > 0``. Default 10.0 (mmdet ``T=10``).
        weight: optional per-row weights, the shape of ``student_bins`` without the bins' dimension (constants: no
            gradient flows into them, as with mmdet's detached LD weights).
        avg_factor: normaliser for ``"mean"`` (float or 0-d tensor).
        reduction: ``"mean"`` (default), ``"sum"`` or ``"none"``.
        bin_reduction: ``"mean"`` (default, mmdet) or ``"sum"`` over bins.
        dim: the bins' dimension (default last). Another one (e.g. 2 of Ultralytics' raw ``(N, 4, R, A)`` layout)
            avoids a copy and takes the softmax along a strided dimension, which PyTorch's CPU kernels do about twice
            as fast for ``R = 16`` bins.

    Returns:
        Scalar loss, or per-row loss for ``reduction="none"``. Zero when student == teacher.
    """
    if student_bins.shape != teacher_bins.shape or student_bins.dim() < 1:
        raise ValueError(
            f"ld_loss: student {tuple(student_bins.shape)} and teacher {tuple(teacher_bins.shape)} "
            "bin logits must have the same (..., B) shape"
        )
    _check_reduction("ld_loss", reduction, avg_factor)
    if bin_reduction not in ("mean", "sum"):
        raise ValueError(f"ld_loss: bin_reduction must be 'mean' or 'sum', got {bin_reduction!r}")
    if not temperature > 0:
        raise ValueError(f"ld_loss: temperature must be > 0, got {temperature!r}")

    s, t = _upcast(student_bins, teacher_bins.detach())
    t2 = temperature * temperature
    dim = dim % s.dim()
    rows = s.shape[:dim] + s.shape[dim + 1:]
    if weight is not None and weight.shape != rows:
        raise ValueError(f"ld_loss: weight must have shape {tuple(rows)}, got {tuple(weight.shape)}")
    if reduction != "none":
        # One autograd node (row weights folded in); the bin mean, T^2 and the row reduction are applied to the sum.
        total = softmax_kl_sum(s, t, temperature, dim=dim, weight=weight)
        bins = s.shape[dim]
        scale = t2 / bins if bin_reduction == "mean" else t2
        if reduction == "sum":
            return total * scale
        if avg_factor is not None:
            return total * scale / (avg_factor + _MMDET_AVG_EPS)
        return total * scale / (s.numel() // bins if bins else 0)
    log_p_s = F.log_softmax(s / temperature, dim=dim)
    log_p_t = F.log_softmax(t / temperature, dim=dim)
    kl = F.kl_div(log_p_s, log_p_t, reduction="none", log_target=True)
    row = kl.mean(dim) if bin_reduction == "mean" else kl.sum(dim)
    row = _apply_row_weight("ld_loss", row * (temperature * temperature), weight)

    if reduction == "none":
        return row
    if reduction == "sum":
        return row.sum()
    if avg_factor is not None:
        return row.sum() / (avg_factor + _MMDET_AVG_EPS)
    return row.mean()


def box_kd_loss(
    student_boxes: Tensor,
    teacher_boxes: Tensor,
    teacher_scores: Optional[Tensor] = None,
    giou_weight: float = 2.5,
    l1_weight: float = 0.0,
    score_threshold: Optional[float] = None,
    soft_weights: bool = True,
    weight: Optional[Tensor] = None,
    avg_factor: Optional[Number] = None,
    reduction: str = "mean",
    eps: float = 1e-10,
) -> Tensor:
    """Decoded-box distillation: weighted GIoU (+ optional L1) of student boxes to teacher boxes.

    Reference: PP-YOLOE+ distillation, PaddleDetection ``DistillPPYOLOELoss.bbox_loss`` with
    ``logits_loss_weight['iou'] = 2.5`` (the default ``giou_weight``). PP-YOLOE's box distillation has
    no L1 term, hence ``l1_weight=0.0``.

    Per anchor ``a`` (``S``/``T`` = student/teacher ``xyxy`` box):

        l[a] = giou_weight * (1 - GIoU(S_a, T_a)) + l1_weight * sum_{c=1..4} |S_a,c - T_a,c|
        w[a] = f(score[a]) * weight[a]

    with ``score = teacher_scores.max(-1)`` (or ``teacher_scores`` itself if already per anchor) and
    ``f(x) = x`` (``soft_weights=True``) or ``1`` (``False``), times ``[x >= score_threshold]`` when a
    threshold is given. Without ``teacher_scores``, ``f = 1``. Then

    * ``"mean"`` (default): ``sum_a w[a] * l[a] / avg_factor``, ``avg_factor`` defaulting to ``sum_a w[a]``
      (a weighted average, as PP-YOLOE's ``loss.sum() / weight_targets.sum()``; 0 if all weights are 0);
    * ``"sum"``: ``sum_a w[a] * l[a]``;
    * ``"none"``: ``w * l`` of shape ``(N, A)``.

    PP-YOLOE+ evaluates it only at the student's *positive* anchors (TAL assignment) with ``w`` =
    the sum over classes of the student's assigned target scores (not the teacher's score), and scales
    the result by 2.5 and then by ``loss_weight['logits'] = 4.0``. Reproduce with
    ``4.0 * box_kd_loss(s, t, None, weight=assigned_scores.sum(-1) * positive_mask)``. The default here,
    teacher-max-score soft weights over all anchors, needs no assignment.

    Units: GIoU is scale-free; L1 is in the boxes' units, so with ``l1_weight > 0`` pass boxes in
    stride or normalised units (PP-YOLOE's own detection L1 uses stride units) rather than pixels.

    Args:
        student_boxes: ``(N, A, 4)`` (or any ``(..., 4)``) decoded ``xyxy`` boxes.
        teacher_boxes: same shape. Detached inside.
        teacher_scores: ``(N, A, K)`` class probabilities (apply ``sigmoid`` to logits first) or
            ``(N, A)`` per-anchor scores, or None. Detached inside.
        giou_weight: weight of ``1 - GIoU``. Default 2.5 (PP-YOLOE+ distill).
        l1_weight: weight of the L1 term. Default 0.0 (PP-YOLOE+ distill has none).
        score_threshold: keep only anchors whose teacher score is ``>=`` this. Default None (all).
        soft_weights: weight kept anchors by the teacher score (True, default) or by 1 (False).
        weight: optional extra per-anchor weights ``(N, A)`` (e.g. a positive mask).
        avg_factor: normaliser for ``"mean"``; default the sum of the weights.
        reduction: ``"mean"`` (default), ``"sum"`` or ``"none"``.
        eps: GIoU stabiliser. Default 1e-10 (PaddleDetection ``GIoULoss``).

    Returns:
        Scalar loss, or per-anchor weighted loss for ``reduction="none"``. Zero when the boxes match.
    """
    if student_boxes.shape != teacher_boxes.shape or student_boxes.shape[-1:] != (4,):
        raise ValueError(
            f"box_kd_loss: student {tuple(student_boxes.shape)} and teacher {tuple(teacher_boxes.shape)} "
            "boxes must have the same (..., 4) shape"
        )
    _check_reduction("box_kd_loss", reduction, avg_factor)
    row_shape = student_boxes.shape[:-1]
    s, t = _upcast(student_boxes, teacher_boxes.detach())

    loss = giou_weight * (1.0 - giou(s, t, eps=eps))
    if l1_weight != 0.0:
        loss = loss + l1_weight * (s - t).abs().sum(-1)

    w: Optional[Tensor] = None
    if teacher_scores is not None:
        score = teacher_scores.detach()
        if score.shape[:-1] == row_shape and score.dim() == student_boxes.dim():
            score = score.max(dim=-1).values
        elif score.shape != row_shape:
            raise ValueError(
                f"box_kd_loss: teacher_scores must be (..., K) or {tuple(row_shape)}, got "
                f"{tuple(teacher_scores.shape)}"
            )
        score = score.to(loss.dtype)
        w = score if soft_weights else torch.ones_like(score)
        if score_threshold is not None:
            w = w * (score >= score_threshold).to(loss.dtype)
    if weight is not None:
        if weight.shape != row_shape:
            raise ValueError(
                f"box_kd_loss: weight must have shape {tuple(row_shape)}, got {tuple(weight.shape)}"
            )
        w = weight.to(loss.dtype) if w is None else w * weight.to(loss.dtype)
    if w is not None:
        loss = loss * w

    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    if avg_factor is not None:
        return loss.sum() / avg_factor
    denom = w.sum() if w is not None else loss.new_tensor(float(loss.numel()))
    # All-zero weights give a zero numerator; the clamp only avoids 0/0.
    return loss.sum() / denom.clamp(min=torch.finfo(loss.dtype).tiny)


def bounded_regression_loss(
    student_reg: Tensor,
    teacher_reg: Tensor,
    target_reg: Tensor,
    margin: float = 0.0,
    weight: Optional[Tensor] = None,
    avg_factor: Optional[Number] = None,
    reduction: str = "mean",
) -> Tensor:
    """Teacher-bounded regression loss: squared error to the target where the student trails the teacher.

    Reference: Chen et al., "Learning Efficient Object Detection Models with Knowledge Distillation",
    NeurIPS 2017, eq. (4). Per row ``r`` (one box's regression vector):

        L_b[r] = ||R_s[r] - y[r]||^2   if ||R_s[r] - y[r]||^2 + m > ||R_t[r] - y[r]||^2
               = 0                     otherwise

    The teacher only sets the bound (no gradient); the target ``y`` is the ground-truth regression
    target (also detached). In the paper the full regression loss is ``L_sL1(R_s, y) + nu * L_b`` with
    ``nu = 0.5``, applied to the foreground proposals: pass a foreground mask as ``weight`` and the number
    of foreground rows as ``avg_factor``, and multiply by ``nu`` outside. Reduction (the paper does not
    spell it out; this is the usual per-box average):

    * ``"mean"`` (default): ``sum_r w[r] * L_b[r] / avg_factor``, ``avg_factor`` defaulting to the
      number of rows (``prod(shape[:-1])``);
    * ``"sum"``: ``sum_r w[r] * L_b[r]``;
    * ``"none"``: ``w * L_b`` of shape ``student_reg.shape[:-1]``.

    Args:
        student_reg: ``(R, D)`` or ``(..., D)`` regression outputs (``D = 4`` for box deltas).
        teacher_reg: same shape. Detached inside.
        target_reg: same shape, ground-truth regression targets. Detached inside.
        margin: ``m``. Default 0.0 (the loss is active iff the student's error is strictly larger
            than the teacher's).
        weight: optional per-row weights, shape ``student_reg.shape[:-1]``.
        avg_factor: normaliser for ``"mean"``.
        reduction: ``"mean"`` (default), ``"sum"`` or ``"none"``.

    Returns:
        Scalar loss, or per-row loss for ``reduction="none"``.
    """
    if not (student_reg.shape == teacher_reg.shape == target_reg.shape) or student_reg.dim() < 1:
        raise ValueError(
            f"bounded_regression_loss: student {tuple(student_reg.shape)}, teacher "
            f"{tuple(teacher_reg.shape)} and target {tuple(target_reg.shape)} must have the same "
            "(..., D) shape"
        )
    _check_reduction("bounded_regression_loss", reduction, avg_factor)
    s, t, y = _upcast(student_reg, teacher_reg.detach(), target_reg.detach())

    err_s = (s - y).pow(2).sum(-1)
    err_t = (t - y).pow(2).sum(-1)
    active = (err_s.detach() + margin > err_t).to(err_s.dtype)
    row = _apply_row_weight("bounded_regression_loss", err_s * active, weight)

    if reduction == "none":
        return row
    if reduction == "sum":
        return row.sum()
    if avg_factor is not None:
        return row.sum() / avg_factor
    return row.sum() / max(row.numel(), 1)
