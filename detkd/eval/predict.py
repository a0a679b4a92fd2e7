"""COCO-format detections for a list of images, from an Ultralytics ``.pt`` or an exported ONNX model.

Both paths return a COCO results list ``[{image_id, category_id, bbox: [x, y, w, h], score}, ...]`` in
original-image pixels, ready for `detkd.eval.coco.evaluate_coco` / `write_results_json`. Class index
``i`` becomes category id ``i + 1`` (the ids detkd's COCO files use: 1..K in class order) unless a
``class_map`` is given.

Both paths use the same pre-processing, so the same image gives the same boxes (to float32 round-off):
Ultralytics' ``LetterBox`` with ``auto=False`` — scale by ``r = min(H/h, W/w)`` (up-scaling allowed),
resize with ``cv2.INTER_LINEAR`` to ``(round(w*r), round(h*r))``, pad centred with value 114 to the full
``imgsz`` square (top/left ``round(d/2 - 0.1)``), BGR -> RGB, ``/255``. Ultralytics' own ``predict``
defaults to ``rect=True``, which pads only to a multiple of the stride when all images of a batch have
the same shape — so a box could depend on which images share its batch. `predict_ultralytics` passes
``rect=False`` by default, making results batch-independent and identical in set-up to a fixed-shape
ONNX export. Post-processing follows ``ultralytics.utils.nms.non_max_suppression`` (best class per
anchor, ``score > conf``, at most ``max_nms`` candidates, class-aware NMS at ``iou``, ``max_det``) and
``ultralytics.utils.ops.scale_boxes`` (remove padding, divide by the gain, clip to the image).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from detkd.errors import DataError
from detkd.integrations.ultralytics_env import ensure_ultralytics_offline

__all__ = [
    "ensure_ultralytics_offline",
    "letterbox",
    "scale_boxes",
    "predict_ultralytics",
    "predict_onnx",
    "to_coco_detections",
]

ImageList = Sequence[tuple[int, "str | os.PathLike"]]


# --------------------------------------------------------------------------------------------------
# shared helpers
# --------------------------------------------------------------------------------------------------
def _category_lookup(class_map: Mapping[int, int] | Sequence[int] | None, nc: int) -> np.ndarray:
    """``lut[i]`` = COCO category id of class index ``i`` (``i + 1`` by default); -1 = unmapped (an error when
    that class is detected); a class mapped to ``None`` gets `_DROPPED` (its detections are left out)."""
    if class_map is None:
        return np.arange(1, nc + 1, dtype=np.int64)
    lut = np.full(max(nc, 1), -1, dtype=np.int64)
    items = class_map.items() if isinstance(class_map, Mapping) else enumerate(class_map)
    for i, c in items:
        if 0 <= int(i) < lut.size:
            lut[int(i)] = _DROPPED if c is None else int(c)
    return lut


_DROPPED = -2  # `_category_lookup` value of a class whose detections are dropped


def to_coco_detections(
    image_id: int, xyxy: np.ndarray, scores: np.ndarray, classes: np.ndarray, lut: np.ndarray
) -> list[dict]:
    """One image's detections ``xyxy (n, 4)``, ``scores (n,)``, class indices ``classes (n,)`` -> COCO results
    entries with ``bbox = [x1, y1, x2 - x1, y2 - y1]`` and ``category_id = lut[class]`` (classes whose ``lut``
    entry is `_DROPPED` are left out)."""
    xyxy = np.asarray(xyxy, dtype=np.float64).reshape(-1, 4)
    cls = np.asarray(classes).reshape(-1).astype(np.int64)
    if cls.size and (cls.max() >= lut.size or (lut[cls] == -1).any()):
        missing = sorted(set(cls.tolist()) - set(np.flatnonzero(lut != -1).tolist()))
        raise DataError(f"class index(es) {missing} have no category id in class_map")
    if cls.size and (lut[cls] == _DROPPED).any():  # classes mapped to None: not scored
        keep = lut[cls] != _DROPPED
        xyxy, cls, scores = xyxy[keep], cls[keep], np.asarray(scores, np.float64).reshape(-1)[keep]
    xywh = np.concatenate([xyxy[:, :2], xyxy[:, 2:] - xyxy[:, :2]], axis=1)
    return [
        {"image_id": image_id, "category_id": c, "bbox": b, "score": s}
        for b, s, c in zip(xywh.tolist(), np.asarray(scores, np.float64).reshape(-1).tolist(), lut[cls].tolist())
    ]


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=not enabled, dynamic_ncols=True)


def _check_images(images: ImageList) -> list[tuple[int, str]]:
    out = [(int(i), str(p)) for i, p in images]
    missing = [p for _, p in out if not Path(p).is_file()]
    if missing:
        raise DataError(f"{len(missing)} image file(s) not found, e.g. {missing[:3]}")
    return out


# --------------------------------------------------------------------------------------------------
# Ultralytics .pt
# --------------------------------------------------------------------------------------------------
def predict_ultralytics(
    weights: str | os.PathLike | Any,
    images: ImageList,
    imgsz: int = 640,
    conf: float = 0.001,
    iou: float = 0.7,
    max_det: int = 300,
    device: str = "cpu",
    batch: int = 16,
    class_map: Mapping[int, int] | Sequence[int] | None = None,
    *,
    rect: bool = False,
    half: bool = False,
    progress: bool = True,
) -> list[dict]:
    """Run an Ultralytics detector over ``images`` and return COCO results.

    Uses ``YOLO(weights).predict(source=paths, stream=True, verbose=False, ...)``; boxes are
    ``r.boxes.xyxy`` (already scaled to original-image pixels by Ultralytics).

    Args:
        weights: a ``.pt`` path or an ``ultralytics.YOLO`` instance.
        images: ``[(image_id, path), ...]``; output keeps this order.
        imgsz: inference size (square letterbox). conf, iou, max_det: Ultralytics' NMS settings
            (defaults are its validation ones: 0.001, 0.7, 300).
        device, batch, half: passed to Ultralytics.
        class_map: class index -> COCO category id (mapping or sequence; ``None`` drops that class's
            detections); default ``i -> i + 1``.
        rect: Ultralytics' minimal-padding letterbox for same-shape batches. Default False: full square
            padding, batch-independent and identical to the fixed-shape ONNX path.
        progress: show a tqdm bar.
    """
    ensure_ultralytics_offline()
    from ultralytics import YOLO

    items = _check_images(images)
    if not hasattr(weights, "predict"):
        from detkd.checkpoints import check_checkpoint

        check_checkpoint(weights, "model")  # a pickled payload is refused before anything is unpickled
    model = weights if hasattr(weights, "predict") else YOLO(str(weights), task="detect")
    names = model.names
    lut = _category_lookup(class_map, len(names))
    if not items:
        return []
    extra = {"half": True} if half else {}  # passing half=False still triggers a deprecation warning in 8.4
    stream = model.predict(
        source=[p for _, p in items], stream=True, verbose=False, imgsz=imgsz, conf=conf, iou=iou,
        max_det=max_det, device=device, batch=batch, rect=rect, save=False, **extra,
    )  # fmt: skip
    out: list[dict] = []
    n = 0
    with _progress(len(items), "predict", progress) as bar:
        for r in stream:
            image_id, path = items[n]
            if Path(r.path).resolve() != Path(path).resolve():  # Ultralytics keeps source order; make sure
                raise RuntimeError(f"prediction order mismatch: expected {path}, got {r.path}")
            b = r.boxes
            out += to_coco_detections(image_id, b.xyxy.cpu().numpy(), b.conf.cpu().numpy(), b.cls.cpu().numpy(), lut)
            n += 1
            bar.update(1)
    if n != len(items):
        raise RuntimeError(f"Ultralytics returned {n} results for {len(items)} images")
    return out


# --------------------------------------------------------------------------------------------------
# ONNX
# --------------------------------------------------------------------------------------------------
def letterbox(
    img: np.ndarray, new_shape: int | tuple[int, int], *, auto: bool = False, stride: int = 32,
    scaleup: bool = True, pad_value: int = 114,
) -> np.ndarray:  # fmt: skip
    """Ultralytics ``LetterBox`` (``ultralytics/data/augment.py``), centred, on one HWC uint8 image.

    ``r = min(H/h, W/w)`` (``<= 1`` unless ``scaleup``); resize to ``(max(round(w*r), 1), max(round(h*r), 1))``
    with ``cv2.INTER_LINEAR``; pad ``dw, dh`` (mod ``stride`` when ``auto``) split as
    ``round(d/2 - 0.1)`` before / ``round(d/2 + 0.1)`` after, with ``pad_value``. Returns ``(H', W', C)``.
    """
    import cv2

    h, w = img.shape[:2]
    nh, nw = (new_shape, new_shape) if isinstance(new_shape, int) else new_shape
    r = min(nh / h, nw / w)
    if not scaleup:
        r = min(r, 1.0)
    uw, uh = max(round(w * r), 1), max(round(h * r), 1)
    dw, dh = nw - uw, nh - uh
    if auto:
        dw, dh = dw % stride, dh % stride
    dw, dh = dw / 2, dh / 2
    if (w, h) != (uw, uh):
        img = cv2.resize(img, (uw, uh), interpolation=cv2.INTER_LINEAR)
    top, bottom, left, right = round(dh - 0.1), round(dh + 0.1), round(dw - 0.1), round(dw + 0.1)
    return cv2.copyMakeBorder(img, top, bottom, left, right, cv2.BORDER_CONSTANT, value=(pad_value,) * 3)


def scale_boxes(boxes, input_hw: tuple[int, int], orig_hw: tuple[int, int]):
    """``ultralytics.utils.ops.scale_boxes`` (``ratio_pad=None``) for xyxy ``boxes (n, 4)`` (torch, in place):
    subtract the letterbox padding, divide by the per-axis gain, clip to ``orig_hw``."""
    gain = min(input_hw[0] / orig_hw[0], input_hw[1] / orig_hw[1])
    new_h, new_w = (max(round(x * gain), 1) for x in orig_hw)
    gain_y, gain_x = new_h / orig_hw[0], new_w / orig_hw[1]
    pad_x, pad_y = round((input_hw[1] - new_w) / 2 - 0.1), round((input_hw[0] - new_h) / 2 - 0.1)
    boxes[:, [0, 2]] -= pad_x
    boxes[:, [1, 3]] -= pad_y
    boxes[:, [0, 2]] /= gain_x
    boxes[:, [1, 3]] /= gain_y
    boxes[:, [0, 2]] = boxes[:, [0, 2]].clamp(0, orig_hw[1])
    boxes[:, [1, 3]] = boxes[:, [1, 3]].clamp(0, orig_hw[0])
    return boxes


def _decode_nms(pred, conf: float, iou: float, max_det: int, max_nms: int):
    """One image's raw head output ``(4 + nc, A)`` (xywh in input pixels, sigmoid scores) -> kept
    ``(boxes xyxy (n, 4), scores (n,), classes (n,))``, as Ultralytics' ``non_max_suppression`` with
    ``multi_label=False``; class-aware NMS through ``torchvision.ops.batched_nms``."""
    import torch
    from torchvision.ops import batched_nms

    x = pred.transpose(0, 1)  # (A, 4 + nc)
    scores, cls = x[:, 4:].max(dim=1)
    keep = scores > conf
    x, scores, cls = x[keep], scores[keep], cls[keep]
    if scores.numel() > max_nms:
        top = scores.argsort(descending=True)[:max_nms]
        x, scores, cls = x[top], scores[top], cls[top]
    xy, half_wh = x[:, :2], x[:, 2:4] / 2
    boxes = torch.cat([xy - half_wh, xy + half_wh], dim=1)
    k = batched_nms(boxes, scores, cls, iou)[:max_det]
    return boxes[k], scores[k], cls[k]


def _read_bgr(path: str) -> np.ndarray:
    import cv2

    im = cv2.imdecode(np.fromfile(path, np.uint8), cv2.IMREAD_COLOR)  # BGR, EXIF-rotated; like Ultralytics
    if im is None:
        raise DataError(f"cannot read image {path}")
    return im


def predict_onnx(
    onnx_path: str | os.PathLike,
    images: ImageList,
    imgsz: int | tuple[int, int] | None = None,
    conf: float = 0.001,
    iou: float = 0.7,
    max_det: int = 300,
    class_map: Mapping[int, int] | Sequence[int] | None = None,
    *,
    batch: int = 1,
    threads: int | None = None,
    max_nms: int = 30000,
    progress: bool = True,
) -> list[dict]:
    """Run an Ultralytics-exported ONNX detector with onnxruntime (CPUExecutionProvider) over ``images``.

    Input ``(B, 3, H, W)`` float RGB in [0, 1] after `letterbox` (``auto=False``). Output
    ``(B, 4 + nc, A)`` is decoded and NMS'd by `_decode_nms`; end-to-end exports (``(B, N, 6)``:
    xyxy, score, class, already NMS-free) are only filtered by ``score > conf`` and ``max_det``.
    Boxes are mapped back to original pixels with `scale_boxes`.

    Args:
        onnx_path: the ``.onnx`` file (``YOLO(pt).export(format="onnx", ...)``).
        images: ``[(image_id, path), ...]``; output keeps this order.
        imgsz: for a fixed-shape model defaults to (and must equal) the model's input size; required
            for a dynamic one unless the export metadata has it.
        conf, iou, max_det, max_nms: as Ultralytics' ``non_max_suppression``.
        class_map: class index -> COCO category id (``None`` drops that class); default ``i -> i + 1``.
        batch: images per run when the model's batch dimension is dynamic (1 otherwise).
        threads: onnxruntime intra-op threads (default: onnxruntime's choice).
        progress: show a tqdm bar.
    """
    import ast

    import onnxruntime as ort
    import torch

    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = int(threads)
        so.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(onnx_path), sess_options=so, providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    meta = sess.get_modelmeta().custom_metadata_map or {}
    b_dim, _, h_dim, w_dim = inp.shape
    static_hw = isinstance(h_dim, int) and isinstance(w_dim, int)
    want = None if imgsz is None else ((imgsz, imgsz) if isinstance(imgsz, int) else tuple(imgsz))
    if static_hw:
        if want is not None and want != (h_dim, w_dim):
            raise ValueError(f"{onnx_path} has a fixed input size {(h_dim, w_dim)}; imgsz={imgsz} does not match")
        hw = (h_dim, w_dim)
    elif want is not None:
        hw = want
    elif "imgsz" in meta:
        hw = tuple(ast.literal_eval(meta["imgsz"]))
    else:
        raise ValueError("dynamic ONNX model without imgsz metadata: pass imgsz")
    bs = b_dim if isinstance(b_dim, int) else max(int(batch), 1)
    dtype = np.float16 if "float16" in inp.type else np.float32
    end2end = str(meta.get("end2end", "False")) == "True"

    items = _check_images(images)
    nc = len(ast.literal_eval(meta["names"])) if "names" in meta else None
    out: list[dict] = []
    lut = None
    with _progress(len(items), "predict (onnx)", progress) as bar:
        for s in range(0, len(items), bs):  # batches of images: streaming inference
            chunk = items[s : s + bs]
            origs = [_read_bgr(p) for _, p in chunk]
            x = np.stack([letterbox(im, hw)[..., ::-1].transpose(2, 0, 1) for im in origs])  # BGR->RGB, CHW
            x = np.ascontiguousarray(x).astype(dtype) / dtype(255)
            y = torch.from_numpy(np.asarray(sess.run(None, {inp.name: x})[0], dtype=np.float32))
            if lut is None:
                lut = _category_lookup(class_map, nc or int(y.shape[1] - 4))
            for (image_id, _), im, pred in zip(chunk, origs, y):
                if end2end or pred.shape[-1] == 6:  # (N, 6): xyxy, score, class; no NMS needed
                    pred = pred[pred[:, 4] > conf][:max_det]
                    boxes, scores, cls = pred[:, :4].clone(), pred[:, 4], pred[:, 5].long()
                else:
                    boxes, scores, cls = _decode_nms(pred, conf, iou, max_det, max_nms)
                boxes = scale_boxes(boxes, hw, im.shape[:2])
                out += to_coco_detections(image_id, boxes.numpy(), scores.numpy(), cls.numpy(), lut)
            bar.update(len(chunk))
    return out
