"""detkd.eval.voc against a plain-loop re-implementation of py-faster-rcnn's voc_eval.py."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from detkd.eval.voc import evaluate_voc, voc_ap


# ---- independent reference: py-faster-rcnn lib/datasets/voc_eval.py, loops as in the original ----------
def ref_voc_ap(rec, prec, use_07_metric):
    if use_07_metric:
        ap = 0.0
        for t in np.arange(0.0, 1.1, 0.1):
            p = 0 if np.sum(rec >= t) == 0 else np.max(prec[rec >= t])
            ap = ap + p / 11.0
        return ap
    mrec = np.concatenate(([0.0], rec, [1.0]))
    mpre = np.concatenate(([0.0], prec, [0.0]))
    for i in range(mpre.size - 1, 0, -1):
        mpre[i - 1] = max(mpre[i - 1], mpre[i])
    i = np.where(mrec[1:] != mrec[:-1])[0]
    return np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1])


def ref_voc_eval(gt, dets, cls, ovthresh, use_07_metric, one):
    class_recs, npos = {}, 0
    for img, g in enumerate(gt):
        m = np.asarray(g["labels"]) == cls
        diff = np.asarray(g["difficult"], bool)[m]
        class_recs[img] = {"bbox": np.asarray(g["boxes"], float).reshape(-1, 4)[m], "difficult": diff,
                           "det": [False] * int(m.sum())}  # fmt: skip
        npos += int((~diff).sum())
    image_ids, confidence, BB = [], [], []
    for img, d in enumerate(dets):
        for b, s, lab in zip(np.asarray(d["boxes"]).reshape(-1, 4), d["scores"], d["labels"]):
            if lab == cls:
                image_ids.append(img), confidence.append(s), BB.append(b)
    if not BB:
        return 0.0 if npos else float("nan")
    confidence, BB = np.array(confidence), np.array(BB, float)
    sorted_ind = np.argsort(-confidence)
    BB = BB[sorted_ind, :]
    image_ids = [image_ids[x] for x in sorted_ind]
    nd = len(image_ids)
    tp, fp = np.zeros(nd), np.zeros(nd)
    for d in range(nd):
        R = class_recs[image_ids[d]]
        bb = BB[d, :]
        ovmax = -np.inf
        BBGT = R["bbox"]
        if BBGT.size > 0:
            ixmin = np.maximum(BBGT[:, 0], bb[0])
            iymin = np.maximum(BBGT[:, 1], bb[1])
            ixmax = np.minimum(BBGT[:, 2], bb[2])
            iymax = np.minimum(BBGT[:, 3], bb[3])
            iw = np.maximum(ixmax - ixmin + one, 0.0)
            ih = np.maximum(iymax - iymin + one, 0.0)
            inters = iw * ih
            uni = (bb[2] - bb[0] + one) * (bb[3] - bb[1] + one) + (BBGT[:, 2] - BBGT[:, 0] + one) * (
                BBGT[:, 3] - BBGT[:, 1] + one
            ) - inters
            overlaps = inters / uni
            ovmax = np.max(overlaps)
            jmax = np.argmax(overlaps)
        if ovmax > ovthresh:
            if not R["difficult"][jmax]:
                if not R["det"][jmax]:
                    tp[d] = 1.0
                    R["det"][jmax] = 1
                else:
                    fp[d] = 1.0
        else:
            fp[d] = 1.0
    if npos == 0:
        return float("nan")
    fp, tp = np.cumsum(fp), np.cumsum(tp)
    rec = tp / float(npos)
    prec = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    return ref_voc_ap(rec, prec, use_07_metric)


# ---- data -------------------------------------------------------------------------------------------------
def _random_data(seed=0, n_images=30, num_classes=4):
    """gts with ~20% difficult; detections: jittered copies (1..3 per gt: duplicates), random false
    positives, class 3 without any gt (only false positives), continuous scores (no ties)."""
    rng = np.random.default_rng(seed)
    gt, dets = [], []
    for img in range(n_images):
        n = int(rng.integers(0, 6)) if img else 0  # image 0 has no gt
        xy = rng.uniform(0, 300, (n, 2))
        wh = rng.uniform(4, 120, (n, 2))
        boxes = np.concatenate([xy, xy + wh], 1)
        labels = rng.integers(0, num_classes - 1, n)
        gt.append({"boxes": boxes, "labels": labels, "difficult": rng.random(n) < 0.2})
        db, dl = [], []
        for b, lab, s in zip(boxes, labels, wh):
            for _ in range(int(rng.integers(0, 4))):
                db.append(b + rng.normal(0, 0.15, 4) * np.r_[s, s])
                dl.append(lab)
        for _ in range(int(rng.integers(0, 4))):
            p = rng.uniform(0, 300, 2)
            db.append(np.r_[p, p + rng.uniform(4, 120, 2)])
            dl.append(int(rng.integers(0, num_classes)))
        db = np.array(db).reshape(-1, 4)
        dets.append({"boxes": db, "labels": np.array(dl, dtype=int), "scores": rng.random(len(dl))})
    return gt, dets


@pytest.mark.parametrize("use_07", [False, True])
@pytest.mark.parametrize("legacy", [True, False])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_reference_voc_eval(seed, use_07, legacy):
    gt, dets = _random_data(seed)
    r = evaluate_voc(gt, dets, num_classes=4, use_07_metric=use_07, legacy_pixel=legacy)
    ref = [ref_voc_eval(gt, dets, c, 0.5, use_07, 1.0 if legacy else 0.0) for c in range(4)]
    np.testing.assert_allclose(r["ap"][:3], ref[:3], rtol=1e-12, atol=1e-15)
    assert math.isnan(r["ap"][3]) and math.isnan(ref[3])  # no gt: undefined, not in the mean
    assert r["mAP"] == pytest.approx(np.mean(ref[:3]), rel=1e-12)
    assert 0.05 < r["mAP"] < 0.99  # a non-degenerate case
    npos = [sum(int(((g["labels"] == c) & ~g["difficult"]).sum()) for g in gt) for c in range(4)]
    assert r["num_pos"].tolist() == npos


def test_other_iou_threshold_matches_reference():
    gt, dets = _random_data(5)
    r = evaluate_voc(gt, dets, num_classes=4, iou_thr=0.7)
    ref = [ref_voc_eval(gt, dets, c, 0.7, False, 1.0) for c in range(3)]
    np.testing.assert_allclose(r["ap"][:3], ref, rtol=1e-12, atol=1e-15)


def test_hand_computed_case():
    # class 0: gts A, B and a difficult gt C. dets: C-hit .95 (ignored), A .9 (TP), A-dup .8 (FP), B .7 (TP)
    gt = [{"boxes": [[0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50]], "labels": [0, 0, 0],
           "difficult": [False, False, True]}]  # fmt: skip
    dets = [{"boxes": [[40, 40, 50, 50], [0, 0, 10, 10], [0, 0, 10, 10], [20, 20, 30, 30]],
             "scores": [0.95, 0.9, 0.8, 0.7], "labels": [0, 0, 0, 0]}]  # fmt: skip
    # the ignored detection stays on the curve as a no-change point (cumTP = cumFP = 0 -> precision 0), as in
    # voc_eval.py; then recall (.5, .5, 1), precision (1, .5, 2/3)
    auc = evaluate_voc(gt, dets, num_classes=1)
    np.testing.assert_allclose(auc["recall"][0], [0.0, 0.5, 0.5, 1.0])
    np.testing.assert_allclose(auc["precision"][0], [0.0, 1.0, 0.5, 2 / 3])
    assert auc["mAP"] == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)  # 0.8333
    v07 = evaluate_voc(gt, dets, num_classes=1, use_07_metric=True)
    assert v07["mAP"] == pytest.approx((6 * 1 + 5 * 2 / 3) / 11)  # t=0..0.5 -> 1, t=0.6..1 -> 2/3
    # without the difficult flag, C is a real gt and its detection a TP
    gt[0]["difficult"] = [False, False, False]
    r = evaluate_voc(gt, dets, num_classes=1)
    np.testing.assert_allclose(r["recall"][0], [1 / 3, 2 / 3, 2 / 3, 1.0])


def test_iou_threshold_is_strict_and_pixel_convention():
    gt = [{"boxes": [[0, 0, 10, 10]], "labels": [0]}]
    dets = [{"boxes": [[0, 0, 10, 20]], "scores": [1.0], "labels": [0]}]
    # continuous: IoU = 100 / 200 = 0.5 exactly -> not > 0.5 -> FP
    assert evaluate_voc(gt, dets, 1, legacy_pixel=False)["mAP"] == 0.0
    # devkit +1: IoU = 121 / 231 = 0.524 -> TP
    assert evaluate_voc(gt, dets, 1, legacy_pixel=True)["mAP"] == 1.0


def test_empty_and_missing_classes(tmp_path):
    gt = [{"boxes": np.zeros((0, 4)), "labels": np.zeros(0, int)}, {"boxes": [[0, 0, 5, 5]], "labels": [1]}]
    dets = [{"boxes": np.zeros((0, 4)), "scores": np.zeros(0), "labels": np.zeros(0, int)}] * 2
    r = evaluate_voc(gt, dets, num_classes=3)
    assert math.isnan(r["ap"][0]) and r["ap"][1] == 0.0 and math.isnan(r["ap"][2])
    assert r["mAP"] == 0.0
    from detkd.eval.coco import write_metrics_json

    back = json.loads(write_metrics_json(r, tmp_path / "voc.json").read_text())
    assert back["ap"] == [None, 0.0, None] and back["num_pos"] == [0, 1, 0] and back["mAP"] == 0.0
    with pytest.raises(ValueError):
        evaluate_voc(gt, dets[:1], num_classes=3)


def test_voc_ap_against_reference_random_curves():
    rng = np.random.default_rng(3)
    for _ in range(20):
        n = int(rng.integers(1, 40))
        tp = rng.random(n) < 0.6
        rec = np.cumsum(tp) / max(int(tp.sum()) + int(rng.integers(0, 5)), 1)
        prec = np.cumsum(tp) / np.arange(1, n + 1)
        for use_07 in (False, True):
            assert voc_ap(rec, prec, use_07) == pytest.approx(ref_voc_ap(rec, prec, use_07), rel=1e-12, abs=1e-15)
