"""COCO box mAP: pycocotools' `COCOeval` (or faster-coco-eval) behind one call, with clear metric names.

`evaluate_coco` runs the official COCO protocol on a ground-truth file and a COCO results list and
returns a plain dict:

* the 12 `COCOeval.stats` under names — ``AP`` (IoU .50:.95), ``AP50``, ``AP75``, ``APs``, ``APm``,
  ``APl``, ``AR1``, ``AR10``, ``AR100``, ``ARs``, ``ARm``, ``ARl`` — exactly pycocotools' numbers
  (-1 where pycocotools reports -1: no ground truth in that area range);
* ``per_class``: ``{name: {"AP": ..., "AP50": ...}}`` from ``COCOeval.eval["precision"]`` the standard
  way (Detectron2 / MMDetection): the mean of ``precision[:, :, k, area=all, maxDets=100]`` over entries
  ``> -1``; NaN for a category with no ground truth (undefined);
* ``pr``: precision arrays for PR curves at area "all", maxDets 100 — ``precision`` ``(T=10, K, R=101)``
  over the IoU thresholds ``iou_thrs`` and recall thresholds ``rec_thrs``, plus ``precision50`` ``(K, R)``
  at IoU 0.5 and ``precision50_95`` ``(K, R)`` (mean over the 10 IoU thresholds; -1 rows for categories
  without ground truth, as in pycocotools);
* ``summary``: the 12-line text pycocotools prints (its stdout is captured, never shown).

Engines: ``"pycocotools"`` (default, the reference) or ``"faster"`` (faster-coco-eval's C++
`COCOeval_faster`, about 5x faster on large sets; tests check its stats are identical).
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from detkd.errors import DataError, EvalError

__all__ = ["STAT_NAMES", "ENGINES", "evaluate_coco", "require_engine", "write_results_json", "write_metrics_json"]

#: Names of the 12 `COCOeval.stats` entries, in pycocotools' order.
STAT_NAMES: tuple[str, ...] = (
    "AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl",
)  # fmt: skip

PathLike = str | os.PathLike


def _load_json(src: PathLike | Mapping | Sequence, copy_obj: bool = True) -> Any:
    if isinstance(src, (str, os.PathLike)):
        p = Path(src)
        if not p.is_file():
            raise DataError(f"COCO json not found: {p}")
        with open(p) as f:
            return json.load(f)
    # pycocotools mutates what it is given; never touch the caller's objects
    return copy.deepcopy(src) if copy_obj else src


def _prepare_gt(gt: PathLike | Mapping) -> dict:
    """A private copy of the gt dict with the keys COCOeval needs (``area`` = w*h and ``iscrowd`` = 0 when
    missing, as the COCO format defines them)."""
    d = _load_json(gt)
    if not isinstance(d, dict) or "images" not in d or "categories" not in d:
        raise DataError("ground truth must be a COCO dict/json with 'images', 'annotations' and 'categories'")
    d.setdefault("annotations", [])
    for a in d["annotations"]:
        a.setdefault("iscrowd", 0)
        if "area" not in a:
            a["area"] = float(a["bbox"][2]) * float(a["bbox"][3])
    return d


def _prepare_dets(dets: PathLike | Sequence[Mapping], img_ids: set) -> list[dict]:
    d = _load_json(dets, copy_obj=False)  # read only: the entries are rebuilt below
    if isinstance(d, dict) and "annotations" in d:  # a full COCO dict given as "results"
        d = d["annotations"]
    if not isinstance(d, list):
        raise DataError("detections must be a COCO results list [{image_id, category_id, bbox, score}, ...]")
    out = []
    for i, x in enumerate(d):
        try:
            out.append({
                "image_id": int(x["image_id"]),
                "category_id": int(x["category_id"]),
                "bbox": [float(v) for v in x["bbox"]],
                "score": float(x["score"]),
            })  # fmt: skip
            if len(out[-1]["bbox"]) != 4:
                raise ValueError
        except (KeyError, TypeError, ValueError):
            raise DataError(
                f"detection #{i} is not a COCO result {{image_id, category_id, bbox: [x, y, w, h], score}}: "
                f"{str(x)[:120]}"
            ) from None
    unknown = {x["image_id"] for x in out} - img_ids
    if unknown:
        some = sorted(unknown)[:5]
        raise DataError(f"{len(unknown)} detection image_id(s) are not in the ground truth (e.g. {some})")
    return out


def _class_names(gt: dict, cat_ids: list[int], class_names) -> list[str]:
    if class_names is None:
        by_id = {c["id"]: str(c.get("name", c["id"])) for c in gt["categories"]}
        return [by_id[c] for c in cat_ids]
    if isinstance(class_names, Mapping):  # {category_id: name}
        return [str(class_names.get(c, c)) for c in cat_ids]
    names = list(class_names)
    if len(names) != len(cat_ids):
        raise DataError(f"class_names has {len(names)} names but the ground truth has {len(cat_ids)} categories")
    return [str(n) for n in names]


def _mean_defined(p: np.ndarray) -> float:
    """Mean of the entries ``> -1`` (pycocotools' "undefined" marker); NaN when there are none."""
    v = p[p > -1]
    return float(np.mean(v)) if v.size else float("nan")


def _run_pycocotools(gt: dict, dets: list[dict]):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        if dets:
            coco_dt = coco_gt.loadRes(dets)
        else:  # loadRes([]) raises IndexError; an empty result set is still a valid evaluation
            coco_dt = COCO()
            coco_dt.dataset = {"images": list(gt["images"]), "categories": copy.deepcopy(gt["categories"]),
                               "annotations": []}  # fmt: skip
            coco_dt.createIndex()
        ev = COCOeval(coco_gt, coco_dt, iouType="bbox")
        ev.evaluate()
        ev.accumulate()
    summary = io.StringIO()
    with contextlib.redirect_stdout(summary):
        ev.summarize()
    return ev, summary.getvalue(), buf.getvalue()


ENGINES = ("pycocotools", "faster")


def require_engine(engine: str) -> None:
    """Raise `EvalError` (one line, saying what to install) unless ``engine`` is known and importable."""
    if engine not in ENGINES:
        raise EvalError(f"engine must be 'pycocotools' or 'faster', got {engine!r}")
    module, dist = ("faster_coco_eval", "faster-coco-eval") if engine == "faster" else ("pycocotools", "pycocotools")
    try:
        __import__(module)
    except ImportError:
        extra = " (or pip install 'detkd[fast-eval]'), or use --engine pycocotools" if engine == "faster" else ""
        raise EvalError(f"engine '{engine}' needs {dist}, which is not installed: pip install {dist}{extra}") from None


def _run_faster(gt: dict, dets: list[dict]):
    require_engine("faster")
    from faster_coco_eval import COCO, COCOeval_faster

    log: list[str] = []
    lines: list[str] = []
    coco_gt = COCO(gt, print_function=lambda *a: log.append(" ".join(map(str, a))))
    coco_dt = coco_gt.loadRes(dets)  # copes with an empty list itself
    ev = COCOeval_faster(coco_gt, coco_dt, iouType="bbox", print_function=lambda *a: log.append(" ".join(map(str, a))))
    ev.evaluate()
    ev.accumulate()
    ev.print_function = lambda *a: lines.append(" ".join(map(str, a)))
    ev.summarize()
    # faster-coco-eval also prints AR50 / AR75; keep the 12 lines pycocotools prints
    return ev, "\n".join(lines[:12]) + "\n", "\n".join(log)


def evaluate_coco(
    gt_json_or_dict: PathLike | Mapping,
    detections: PathLike | Sequence[Mapping],
    *,
    engine: str = "pycocotools",
    class_names: Sequence[str] | Mapping[int, str] | None = None,
) -> dict:
    """COCO bbox evaluation of ``detections`` against ``gt_json_or_dict``.

    Args:
        gt_json_or_dict: a COCO instances json path or the loaded dict (never modified). Annotations
            without ``area`` get ``w*h`` and without ``iscrowd`` get 0. Images with no annotations are
            fine: detections on them are false positives.
        detections: a COCO results list or json path: ``[{image_id, category_id, bbox: [x, y, w, h],
            score}, ...]`` in original-image pixels. An empty list gives all-zero AP/AR (-1 where an area
            range has no ground truth, as pycocotools reports). Detections whose ``category_id`` is not in
            the ground truth are ignored (pycocotools behaviour); an unknown ``image_id`` is an error.
        engine: ``"pycocotools"`` (reference) or ``"faster"`` (faster-coco-eval, identical numbers; an optional
            dependency, ``pip install faster-coco-eval``: `EvalError` saying so when it is missing).
        class_names: names in ascending category-id order, or ``{category_id: name}``; default: the gt
            categories' ``name``.

    Returns:
        dict with the 12 named stats (``STAT_NAMES``), ``stats`` (the same 12 as a list), ``per_class``,
        ``pr``, ``summary``, ``engine``, ``num_images``, ``num_detections``. Numbers are Python floats;
        ``pr`` holds numpy arrays (`write_metrics_json` turns them into lists).
    """
    if engine not in ENGINES:
        raise ValueError(f"engine must be 'pycocotools' or 'faster', got {engine!r}")
    gt = _prepare_gt(gt_json_or_dict)
    dets = _prepare_dets(detections, {int(im["id"]) for im in gt["images"]})
    if engine == "pycocotools":
        ev, summary, _ = _run_pycocotools(gt, dets)
    else:
        ev, summary, _ = _run_faster(gt, dets)

    stats = [float(s) for s in ev.stats[:12]]
    params = ev.params
    cat_ids = [int(c) for c in params.catIds]
    names = _class_names(gt, cat_ids, class_names)

    # precision: [T, R, K, A, M]; area "all" is index 0, maxDets=100 the last.
    prec = np.asarray(ev.eval["precision"], dtype=np.float64)[:, :, :, 0, -1]  # (T, R, K)
    prec = np.ascontiguousarray(prec.transpose(0, 2, 1))  # (T, K, R)
    # per class: mean over the defined entries, exactly as Detectron2 / MMDetection compute it
    ap = [_mean_defined(prec[:, k]) for k in range(len(cat_ids))]
    ap50 = [_mean_defined(prec[0, k]) for k in range(len(cat_ids))]

    out: dict[str, Any] = dict(zip(STAT_NAMES, stats))
    out["stats"] = stats
    out["per_class"] = {n: {"AP": float(a), "AP50": float(b)} for n, a, b in zip(names, ap, ap50)}
    out["pr"] = {
        "class_names": names,
        "category_ids": cat_ids,
        "iou_thrs": np.asarray(params.iouThrs, dtype=np.float64),
        "rec_thrs": np.asarray(params.recThrs, dtype=np.float64),
        "precision": prec,
        "precision50": prec[0].copy(),
        "precision50_95": prec.mean(axis=0),
    }
    out["summary"] = summary
    out["engine"] = engine
    out["num_images"] = len(gt["images"])
    out["num_detections"] = len(dets)
    return out


def _atomic_write_json(obj: Any, path: PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, allow_nan=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def _jsonable(x: Any) -> Any:
    """numpy -> Python; NaN/inf -> None (strict JSON has no NaN)."""
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return float(x) if math.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    if isinstance(x, os.PathLike):
        return os.fspath(x)
    return x


def write_results_json(detections: Sequence[Mapping], path: PathLike) -> Path:
    """Write a COCO results list (``[{image_id, category_id, bbox, score}]``) to ``path`` atomically
    (temporary file in the same folder, then `os.replace`). Returns the path."""
    return _atomic_write_json(_jsonable(list(detections)), path)


def write_metrics_json(metrics: Mapping, path: PathLike) -> Path:
    """Write an `evaluate_coco` / `evaluate_voc` dict to ``path`` atomically; numpy arrays become lists and
    NaN becomes ``null``. Returns the path."""
    return _atomic_write_json(_jsonable(metrics), path)
