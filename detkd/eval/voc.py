"""PASCAL VOC mAP@0.5: the VOC07 11-point and the VOC2010+ area-under-curve methods.

Follows ``voc_eval.py`` of py-faster-rcnn (R. Girshick), itself a port of the VOC devkit's
``VOCevaldet.m``, and reproduces its numbers:

* Per class, detections from all images are sorted by score (descending). Each detection takes the
  ground-truth box of its image with the highest IoU (``argmax`` over *all* that image's gts of the
  class, difficult or already matched ones included). If that IoU is ``> iou_thr`` (strict) and the gt
  is not difficult: a true positive if the gt is still unmatched (it becomes matched), else a false
  positive (duplicate). If the gt is difficult the detection counts as neither (it stays on the
  returned PR curve as a point where nothing changes, as in ``voc_eval.py``; AP is unaffected).
  IoU ``<= iou_thr``: false positive.
* ``recall = cumTP / npos`` with ``npos`` the number of non-difficult gts of the class;
  ``precision = cumTP / max(cumTP + cumFP, eps)``.
* VOC07 (``use_07_metric=True``): ``AP = mean_{t in 0, .1, ..., 1} max(precision[recall >= t])``
  (0 where no recall reaches t). VOC2010+: precision is made monotone (running max from the right)
  and integrated over the recall steps, with sentinels recall 0 -> 1 and precision 0 at the end.

IoU pixel convention (``legacy_pixel``): the devkit treats boxes as inclusive integer pixel ranges,
so widths, heights and intersections are ``x2 - x1 + 1``. ``legacy_pixel=True`` (default) does this,
as ``voc_eval.py`` does; ``legacy_pixel=False`` uses continuous coordinates (``x2 - x1``), as
COCO and most modern code do. With large boxes the difference is tiny; on small boxes it is not.

Vectorisation: the only order dependence in the greedy match is "was this gt already taken by a
higher-scoring detection". Because every detection's candidate gt is its plain argmax (not the best
*unmatched* gt), a detection is a TP exactly when it is the first, in score order, of the candidate
detections pointing at the same (image, gt) pair. That is a `np.unique(..., return_index=True)` on
the sorted pair keys, so the per-class work is numpy only. Ties in score are broken by input order
(stable sort), like MATLAB's ``sort`` in the devkit; py-faster-rcnn's ``np.argsort`` (quicksort) leaves
tie order unspecified.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

__all__ = ["evaluate_voc", "voc_ap", "iou_matrix"]


def iou_matrix(a: np.ndarray, b: np.ndarray, legacy_pixel: bool = True) -> np.ndarray:
    """IoU of boxes ``a (..., 4)`` against ``b (..., 4)`` (xyxy), broadcast over leading dims.

    ``legacy_pixel=True`` adds 1 to widths, heights and intersection sides (VOC devkit convention).
    """
    one = 1.0 if legacy_pixel else 0.0
    iw = np.maximum(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]) + one, 0.0)
    ih = np.maximum(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]) + one, 0.0)
    inter = iw * ih
    area_a = (a[..., 2] - a[..., 0] + one) * (a[..., 3] - a[..., 1] + one)
    area_b = (b[..., 2] - b[..., 0] + one) * (b[..., 3] - b[..., 1] + one)
    union = area_a + area_b - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def voc_ap(recall: np.ndarray, precision: np.ndarray, use_07_metric: bool = False) -> float:
    """Average precision from a PR curve ``recall (D,)`` (non-decreasing) and ``precision (D,)``.

    ``use_07_metric``: 11-point interpolation (VOC2007); otherwise the area under the monotone
    precision envelope (VOC2010+). See the module docstring for the formulas.
    """
    recall = np.asarray(recall, dtype=np.float64)
    precision = np.asarray(precision, dtype=np.float64)
    if use_07_metric:
        if recall.size == 0:
            return 0.0
        env = np.maximum.accumulate(precision[::-1])[::-1]  # env[i] = max(precision[i:])
        # thresholds exactly as voc_eval.py builds them (np.arange: 0.30000000000000004, ...)
        first = np.searchsorted(recall, np.arange(0.0, 1.1, 0.1), side="left")  # first i with recall >= t
        p = np.where(first < recall.size, env[np.minimum(first, recall.size - 1)], 0.0)
        return float(p.sum() / 11.0)
    mrec = np.concatenate(([0.0], recall, [1.0]))
    mpre = np.concatenate(([0.0], precision, [0.0]))
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    i = np.flatnonzero(mrec[1:] != mrec[:-1])
    return float(np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1]))


def _concat(per_image: Sequence[Mapping], key: str, shape_tail: tuple, dtype) -> np.ndarray:
    arrs = [np.asarray(d.get(key, np.zeros((0, *shape_tail))), dtype=dtype).reshape(-1, *shape_tail) for d in per_image]
    return np.concatenate(arrs) if arrs else np.zeros((0, *shape_tail), dtype=dtype)


def _class_pr(gt_img, gt_boxes, gt_diff, det_img, det_boxes, det_scores, num_images, iou_thr, legacy_pixel):
    """TP/FP flags in score order for one class. Returns (tp (D,), fp (D,), npos)."""
    npos = int((~gt_diff).sum())
    order = np.argsort(-det_scores, kind="stable")
    det_img, det_boxes = det_img[order], det_boxes[order]
    d = det_img.size
    if d == 0:
        return np.zeros(0), np.zeros(0), npos
    # Pad this class's gts per image: (num_images, M, 4); slot j keeps each image's gt order.
    counts = np.bincount(gt_img, minlength=num_images)
    m = max(int(counts.max()) if counts.size else 0, 1)
    g_order = np.argsort(gt_img, kind="stable")
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    slot = np.arange(gt_img.size) - starts[gt_img[g_order]]
    pad_boxes = np.zeros((num_images, m, 4))
    pad_diff = np.zeros((num_images, m), dtype=bool)
    pad_valid = np.zeros((num_images, m), dtype=bool)
    pad_boxes[gt_img[g_order], slot] = gt_boxes[g_order]
    pad_diff[gt_img[g_order], slot] = gt_diff[g_order]
    pad_valid[gt_img[g_order], slot] = True

    ious = iou_matrix(det_boxes[:, None, :], pad_boxes[det_img], legacy_pixel)  # (D, M)
    ious = np.where(pad_valid[det_img], ious, -np.inf)
    jmax = ious.argmax(axis=1)
    ovmax = ious[np.arange(d), jmax]
    hit = ovmax > iou_thr
    hit_difficult = hit & pad_diff[det_img, jmax]
    cand = hit & ~hit_difficult
    key = det_img[cand].astype(np.int64) * m + jmax[cand]
    first = np.zeros(int(cand.sum()), dtype=bool)
    first[np.unique(key, return_index=True)[1]] = True
    tp = np.zeros(d)
    tp[np.flatnonzero(cand)[first]] = 1.0
    fp = (~hit).astype(np.float64)
    fp[np.flatnonzero(cand)[~first]] = 1.0
    return tp, fp, npos


def evaluate_voc(
    gt: Sequence[Mapping],
    dets: Sequence[Mapping],
    num_classes: int,
    iou_thr: float = 0.5,
    use_07_metric: bool = False,
    legacy_pixel: bool = True,
) -> dict:
    """PASCAL VOC detection AP per class and their mean.

    Args:
        gt: one dict per image: ``boxes (n, 4)`` xyxy, ``labels (n,)`` in ``[0, num_classes)``, optional
            ``difficult (n,)`` bool (default all False).
        dets: one dict per image, same order and length as ``gt``: ``boxes (d, 4)`` xyxy, ``scores (d,)``,
            ``labels (d,)``.
        num_classes: number of classes K.
        iou_thr: a detection matches when IoU ``> iou_thr`` (strict, as in the devkit). Default 0.5.
        use_07_metric: VOC2007 11-point AP instead of the VOC2010+ area under the curve. Default False.
        legacy_pixel: +1 pixel convention in IoU (devkit / py-faster-rcnn). Default True.

    Returns:
        dict: ``mAP`` (mean over classes with at least one non-difficult gt; NaN if none), ``ap (K,)``
        (NaN for classes without non-difficult gt), ``num_pos (K,)``, ``num_dets (K,)``, and for PR
        curves ``recall`` / ``precision``: lists of K arrays in score order; plus the settings used.
    """
    if len(gt) != len(dets):
        raise ValueError(f"gt has {len(gt)} images but dets has {len(dets)}")
    n_img = len(gt)
    gt_n = [len(np.asarray(g["labels"]).reshape(-1)) for g in gt]
    dt_n = [len(np.asarray(d["labels"]).reshape(-1)) for d in dets]
    gt_img = np.repeat(np.arange(n_img), gt_n)
    det_img = np.repeat(np.arange(n_img), dt_n)
    gt_boxes = _concat(gt, "boxes", (4,), np.float64)
    gt_labels = _concat(gt, "labels", (), np.int64)
    gt_diff = np.concatenate(
        [np.asarray(g.get("difficult", np.zeros(n, bool)), dtype=bool).reshape(-1) for g, n in zip(gt, gt_n)]
        or [np.zeros(0, bool)]
    )
    det_boxes = _concat(dets, "boxes", (4,), np.float64)
    det_scores = _concat(dets, "scores", (), np.float64)
    det_labels = _concat(dets, "labels", (), np.int64)
    if gt_boxes.shape[0] != gt_labels.size or gt_diff.size != gt_labels.size:
        raise ValueError("each gt image needs as many boxes (and difficult flags) as labels")
    if det_boxes.shape[0] != det_labels.size or det_scores.size != det_labels.size:
        raise ValueError("each det image needs as many boxes and scores as labels")

    ap = np.full(num_classes, np.nan)
    num_pos = np.zeros(num_classes, dtype=np.int64)
    num_dets = np.zeros(num_classes, dtype=np.int64)
    recalls: list[np.ndarray] = []
    precisions: list[np.ndarray] = []
    eps = np.finfo(np.float64).eps
    for c in range(num_classes):  # classes, not images/boxes: each class is one vectorised pass
        g, dm = gt_labels == c, det_labels == c
        tp, fp, npos = _class_pr(
            gt_img[g], gt_boxes[g], gt_diff[g], det_img[dm], det_boxes[dm], det_scores[dm], n_img, iou_thr, legacy_pixel
        )
        tp, fp = np.cumsum(tp), np.cumsum(fp)
        rec = tp / npos if npos > 0 else np.zeros_like(tp)
        prec = tp / np.maximum(tp + fp, eps)
        num_pos[c], num_dets[c] = npos, tp.size
        recalls.append(rec)
        precisions.append(prec)
        if npos > 0:
            ap[c] = voc_ap(rec, prec, use_07_metric)
    valid = num_pos > 0
    return {
        "mAP": float(ap[valid].mean()) if valid.any() else float("nan"),
        "ap": ap,
        "num_pos": num_pos,
        "num_dets": num_dets,
        "recall": recalls,
        "precision": precisions,
        "iou_thr": iou_thr,
        "use_07_metric": use_07_metric,
        "legacy_pixel": legacy_pixel,
    }
