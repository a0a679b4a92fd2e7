"""`detkd eval`: a model (.pt or .onnx) on a dataset (COCO / VOC / YOLO) -> COCO metrics (+ VOC mAP@0.5).

Writes ``detections.json`` (COCO results), ``gt.json`` (the ground truth as evaluated) and ``metrics.json``.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np

from detkd.data.formats import read_dataset, write_coco
from detkd.errors import DataError
from detkd.eval.coco import evaluate_coco, write_metrics_json, write_results_json
from detkd.eval.voc import evaluate_voc


def _voc_inputs(gt: dict, dets: list[dict], nc: int) -> tuple[list[dict], list[dict]]:
    """COCO gt dict + results -> per-image dicts for `evaluate_voc` (labels 0..K-1 from category ids 1..K)."""
    cat_ids = sorted(c["id"] for c in gt["categories"])
    to_label = {c: i for i, c in enumerate(cat_ids)}
    by_img_gt: dict[int, list] = defaultdict(list)
    for a in gt["annotations"]:
        by_img_gt[a["image_id"]].append(a)
    by_img_dt: dict[int, list] = defaultdict(list)
    for d in dets:
        if d["category_id"] in to_label:
            by_img_dt[d["image_id"]].append(d)

    def xyxy(rows):
        b = np.array([r["bbox"] for r in rows], np.float64).reshape(-1, 4)
        b[:, 2:] += b[:, :2]
        return b

    g, p = [], []
    for im in gt["images"]:
        ga, da = by_img_gt[im["id"]], by_img_dt[im["id"]]
        g.append({"boxes": xyxy(ga), "labels": np.array([to_label[a["category_id"]] for a in ga], np.int64),
                  "difficult": np.array([bool(a.get("difficult", 0)) for a in ga], bool)})
        p.append({"boxes": xyxy(da), "scores": np.array([d["score"] for d in da], np.float64),
                  "labels": np.array([to_label[d["category_id"]] for d in da], np.int64)})
    return g, p


def evaluate_model(
    model: str | Path,
    data: str | Path,
    *,
    split: str = "val",
    imgsz: int = 640,
    out_dir: str | Path | None = None,
    conf: float = 0.001,
    iou: float = 0.7,
    batch: int = 16,
    threads: int | None = None,
    voc: bool = True,
    progress: bool = True,
) -> dict:
    """Evaluate ``model`` on ``data``; returns the metrics dict (see `evaluate_coco`) with ``voc`` added."""
    model = Path(model)
    if not model.is_file():
        raise DataError(f"model file not found: {model}")
    ds = read_dataset(data, split)
    if not ds.images:
        raise DataError(f"{data}: split '{split}' has no images")
    out = Path(out_dir) if out_dir else model.parent / f"eval_{model.stem}"
    out.mkdir(parents=True, exist_ok=True)
    gt = write_coco(ds, out / "gt.json")
    import json

    gt_dict = json.loads(Path(gt["json"]).read_text())
    images = [(r.id, r.file) for r in ds.images]
    if model.suffix.lower() == ".onnx":
        from detkd.eval.predict import predict_onnx

        dets = predict_onnx(model, images, imgsz=imgsz, conf=conf, iou=iou, threads=threads, progress=progress)
    elif model.suffix.lower() == ".pt":
        from detkd.eval.predict import predict_ultralytics

        if threads:
            import torch

            torch.set_num_threads(int(threads))
        dets = predict_ultralytics(model, images, imgsz=imgsz, conf=conf, iou=iou, batch=batch, progress=progress)
    else:
        raise DataError(f"{model}: unsupported model file (expected .pt or .onnx)")
    write_results_json(dets, out / "detections.json")
    metrics = evaluate_coco(gt_dict, dets, class_names=ds.names)
    if voc:
        g, p = _voc_inputs(gt_dict, dets, len(ds.names))
        v07 = evaluate_voc(g, p, len(ds.names), use_07_metric=True)
        vauc = evaluate_voc(g, p, len(ds.names), use_07_metric=False)
        metrics["voc"] = {"mAP50_07": v07["mAP"], "mAP50_auc": vauc["mAP"]}
    metrics["model"] = str(model)
    metrics["data"] = str(data)
    metrics["split"] = split
    metrics["imgsz"] = imgsz
    write_metrics_json(metrics, out / "metrics.json")
    metrics["out_dir"] = str(out)
    return metrics
