"""Evaluation: COCO / VOC metrics of a model or of an existing detections file on a dataset.

* `evaluate_model` -- ``detkd eval MODEL.pt|MODEL.onnx --data DATA``;
* `evaluate_detections` -- ``detkd eval --detections DETS.json --data DATA`` (no model);
* `evaluate_coco` / `evaluate_voc` -- the metrics on in-memory COCO dicts / per-image arrays.
"""

from detkd.eval.coco import evaluate_coco
from detkd.eval.run import evaluate_detections, evaluate_model
from detkd.eval.voc import evaluate_voc

__all__ = ["evaluate_model", "evaluate_detections", "evaluate_coco", "evaluate_voc"]
