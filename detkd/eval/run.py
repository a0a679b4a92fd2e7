"""`detkd eval`: a model (.pt or .onnx) on a dataset (COCO / VOC / YOLO) -> COCO metrics (+ VOC mAP@0.5), or an
existing COCO detections file scored against a dataset.

`evaluate_model` writes ``detections.json`` (COCO results, category ids = ``gt.json``'s), ``gt.json`` (the ground
truth as evaluated: categories ``1..K`` in the dataset's class order) and ``metrics.json``. It refuses, with one
line, what would mis-score without a word:

* model classes are matched to dataset classes **by name** (`detkd.eval.classes.match_classes`); names that do
  not match are an error naming them and the ``class_map`` / ``--class-map MODEL=DATASET,...`` to pass;
* the inference size defaults to the one the model was trained / exported at (``train_args['imgsz']`` of an
  Ultralytics checkpoint, the input shape or ``imgsz`` metadata of an ONNX export), not a fixed 640;
* an image that cannot be decoded in full (missing, damaged, a JPEG cut short) is an error naming the file,
  before any prediction: skipping it would change the ground truth, and scoring a partly grey image would
  change the detections.

`evaluate_detections` scores a COCO results list against a dataset without a model.
"""

from __future__ import annotations

import ast
import json
import tempfile
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

from detkd.data.formats import Dataset, detect_format, probe_image, read_dataset, write_coco
from detkd.errors import DataError, EvalError
from detkd.eval.classes import ClassMatch, match_classes
from detkd.eval.coco import _prepare_dets, evaluate_coco, require_engine, write_metrics_json, write_results_json
from detkd.eval.voc import evaluate_voc

__all__ = ["evaluate_model", "evaluate_detections", "DEFAULT_IMGSZ"]

#: Inference size when neither the caller nor the model says one.
DEFAULT_IMGSZ = 640


def _voc_inputs(gt: dict, dets: list[dict], nc: int) -> tuple[list[dict], list[dict]]:
    """COCO gt dict + results -> per-image dicts for `evaluate_voc` (labels 0..K-1 from category ids 1..K)."""
    cat_ids = sorted(c["id"] for c in gt["categories"])
    to_label = {c: i for i, c in enumerate(cat_ids)}
    by_img_gt: dict[int, list] = defaultdict(list)
    for a in gt.get("annotations", []):
        if a["category_id"] in to_label:  # pycocotools ignores annotations of unknown categories too
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


def _boxes_per_class(ds: Dataset) -> list[int]:
    cls = np.concatenate([r.classes for r in ds.images] or [np.zeros(0, np.int64)])
    cls = cls[(cls >= 0) & (cls < len(ds.names))]
    return np.bincount(cls, minlength=len(ds.names)).tolist()


def _square(v) -> int | list[int] | None:
    """An imgsz value as Ultralytics stores it (int, [h, w], "[h, w]") -> int when square, else [h, w]."""
    if v is None:
        return None
    if isinstance(v, str):
        try:
            v = ast.literal_eval(v)
        except (ValueError, SyntaxError):
            return None
    if isinstance(v, (list, tuple)):
        v = [int(x) for x in v]
        if len(v) == 1 or (len(v) == 2 and v[0] == v[1]):
            return v[0]
        return v if len(v) == 2 else None
    return int(v)


def _pt_model(path: Path):
    """(YOLO instance, {index: name}, training imgsz or None) of an Ultralytics checkpoint."""
    from detkd.eval.predict import ensure_ultralytics_offline

    ensure_ultralytics_offline()
    from detkd.checkpoints import check_checkpoint

    check_checkpoint(path, "model")  # a pickled payload is refused before anything is unpickled
    from ultralytics import YOLO

    try:
        y = YOLO(str(path), task="detect")
    except Exception as e:  # a torch.save file that is not an Ultralytics model, a newer format, ...
        msg = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
        raise DataError(
            f"model {path} could not be loaded as an Ultralytics detector ({type(e).__name__}: {msg})"
        ) from None
    train_args = (getattr(y, "ckpt", None) or {}).get("train_args") or {}
    return y, dict(y.names), _square(train_args.get("imgsz"))


def _onnx_info(path: Path) -> dict:
    """Class names, class count, fixed input size and ``imgsz`` metadata of an ONNX export (header only)."""
    import onnx

    try:
        m = onnx.load(str(path), load_external_data=False)
    except Exception as e:
        raise DataError(f"{path}: not a readable ONNX model ({type(e).__name__}: {str(e)[:120]})") from None
    meta = {p.key: p.value for p in m.metadata_props}
    names = None
    if "names" in meta:
        try:
            names = {int(k): str(v) for k, v in ast.literal_eval(meta["names"]).items()}
        except (ValueError, SyntaxError, AttributeError):
            names = None

    def dims(vi):
        return [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]

    inits = {i.name for i in m.graph.initializer}
    inp = [i for i in m.graph.input if i.name not in inits][0]
    d_in, d_out = dims(inp), dims(m.graph.output[0])
    fixed = tuple(d_in[2:4]) if len(d_in) == 4 and None not in d_in[2:4] else None
    nc = d_out[1] - 4 if len(d_out) == 3 and d_out[1] and d_out[1] > 4 and d_out[2] != 6 else None
    return {"names": names, "nc": len(names) if names else nc, "fixed": fixed, "imgsz": _square(meta.get("imgsz"))}


def _decodes_fully(path: str) -> bool:
    from PIL import Image, ImageFile

    old, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, False
    try:
        with Image.open(path) as im:
            im.load()
        return True
    except Exception:
        return False
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = old


def check_decodable(ds: Dataset) -> None:
    """Raise `DataError` naming every image of ``ds`` that is missing or cannot be decoded in full (a damaged
    file, a JPEG cut short). Header reads, plus a full decode of JPEGs without an end marker only."""
    bad: list[str] = []
    for r in ds.images:
        try:
            info = probe_image(r.file)
        except DataError as e:
            bad.append(f"{r.file} ({str(e).replace(f'{r.file}: ', '').replace(f': {r.file}', '')})")
            continue
        if info.truncated and not _decodes_fully(r.file):
            bad.append(f"{r.file} (JPEG cut short: its end marker is missing)")
    if bad:
        shown = "; ".join(bad[:3]) + (f"; +{len(bad) - 3} more" if len(bad) > 3 else "")
        raise DataError(
            f"{len(bad)} image(s) cannot be decoded in full: {shown}. detkd eval does not score them (Ultralytics "
            "fails on them, and skipping or half-decoding them would change the metrics): re-save or restore "
            "them, or remove them from the split; `detkd data validate` lists every damaged image"
        )


def _score(gt: dict, dets: list[dict], names: Sequence[str], engine: str, voc: bool) -> dict:
    metrics = evaluate_coco(gt, dets, class_names=list(names), engine=engine)
    if voc:
        g, p = _voc_inputs(gt, dets, len(names))
        v07 = evaluate_voc(g, p, len(names), use_07_metric=True)
        vauc = evaluate_voc(g, p, len(names), use_07_metric=False)
        metrics["voc"] = {"mAP50_07": v07["mAP"], "mAP50_auc": vauc["mAP"]}
    return metrics


def evaluate_model(
    model: str | Path,
    data: str | Path,
    *,
    split: str = "val",
    imgsz: int | Sequence[int] | None = None,
    out_dir: str | Path | None = None,
    conf: float = 0.001,
    iou: float = 0.7,
    batch: int = 16,
    threads: int | None = None,
    voc: bool = True,
    progress: bool = True,
    engine: str = "pycocotools",
    class_map: str | Mapping | None = None,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Evaluate ``model`` (Ultralytics ``.pt`` or exported ``.onnx``) on ``data``'s ``split``.

    Args:
        imgsz: inference size; default: the model's own (``train_args['imgsz']`` of a ``.pt``; the input shape
            or ``imgsz`` metadata of an ``.onnx``), else `DEFAULT_IMGSZ`. ``metrics['imgsz_source']`` says which.
        engine: ``"pycocotools"`` or ``"faster"`` (faster-coco-eval, identical numbers; optional dependency).
        class_map: renames model classes before they are matched to the dataset's by name:
            ``{model_name_or_index: dataset_name_or_None}`` or ``"model=dataset,..."`` (see
            `detkd.eval.classes`). Without it, the names must match; `ClassMismatchError` otherwise.
        log: called with one line each for the inference size and the class matching (the CLI prints them).
        conf, iou, batch, threads, voc, progress, out_dir: prediction / output settings.

    Returns:
        the metrics dict (see `evaluate_coco`) with ``voc``, ``model``, ``data``, ``split``, ``imgsz``,
        ``imgsz_source``, ``class_match`` and ``out_dir`` added.
    """
    model = Path(model)
    if not model.is_file():
        raise DataError(f"model file not found: {model}")
    kind = model.suffix.lower()
    if kind not in (".pt", ".onnx"):
        raise DataError(f"{model}: unsupported model file (expected .pt or .onnx)")
    require_engine(engine)
    ds = read_dataset(data, split)
    if not ds.images:
        raise DataError(f"{data}: split '{split}' has no images")

    yolo = None
    if kind == ".pt":
        yolo, names, own = _pt_model(model)
        nc, own_src = len(names), "the checkpoint's training size, train_args['imgsz']"
    else:
        info = _onnx_info(model)
        names, nc = info["names"], info["nc"]
        own = _square(list(info["fixed"])) if info["fixed"] else info["imgsz"]
        own_src = "the ONNX model's input shape" if info["fixed"] else "the ONNX export's imgsz metadata"
    match: ClassMatch = match_classes(names, ds.names, class_map, _boxes_per_class(ds), nc=nc)
    if imgsz is not None:
        size, source = _square(imgsz), "--imgsz"
    elif own is not None:
        size, source = own, own_src
    else:
        size, source = DEFAULT_IMGSZ, f"default {DEFAULT_IMGSZ}: the model does not record its training size"
    if log:
        extra = "" if source in ("--imgsz", "the ONNX model's input shape") else "; --imgsz overrides it"
        log(f"imgsz {size} ({source}{extra})")
        log(match.describe())
    check_decodable(ds)

    out = Path(out_dir) if out_dir else model.parent / f"eval_{model.stem}"
    out.mkdir(parents=True, exist_ok=True)
    gt = write_coco(ds, out / "gt.json")
    gt_dict = json.loads(Path(gt["json"]).read_text())
    images = [(r.id, r.file) for r in ds.images]
    if kind == ".onnx":
        from detkd.eval.predict import predict_onnx

        dets = predict_onnx(model, images, imgsz=size, conf=conf, iou=iou, threads=threads,
                            class_map=match.category_of, progress=progress)  # fmt: skip
    else:
        from detkd.eval.predict import predict_ultralytics

        if threads:
            import torch

            torch.set_num_threads(int(threads))
        dets = predict_ultralytics(yolo, images, imgsz=size, conf=conf, iou=iou, batch=batch,
                                   class_map=match.category_of, progress=progress)  # fmt: skip
    write_results_json(dets, out / "detections.json")
    metrics = _score(gt_dict, dets, ds.names, engine, voc)
    metrics["model"] = str(model)
    metrics["data"] = str(data)
    metrics["split"] = split
    metrics["imgsz"] = size
    metrics["imgsz_source"] = source
    metrics["class_match"] = match.to_dict()
    write_metrics_json(metrics, out / "metrics.json")
    metrics["out_dir"] = str(out)
    return metrics


def _load_detections(detections) -> list[dict]:
    if isinstance(detections, (str, Path)):
        p = Path(detections)
        if not p.is_file():
            raise DataError(f"detections file not found: {p}")
        try:
            detections = json.loads(p.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{p}: not valid JSON ({e})") from None
    if isinstance(detections, dict) and "annotations" in detections:
        detections = detections["annotations"]
    if not isinstance(detections, list):
        raise DataError("detections must be a COCO results list [{image_id, category_id, bbox, score}, ...]")
    return detections


def evaluate_detections(
    detections: str | Path | Sequence[Mapping],
    data: str | Path,
    *,
    split: str = "val",
    engine: str = "pycocotools",
    out_dir: str | Path | None = None,
    voc: bool = True,
) -> dict:
    """Score existing COCO-format detections against a dataset's ground truth, without a model.

    ``detkd eval --detections DETS.json --data GT [--engine faster]`` on the command line.

    Args:
        detections: a COCO results json path (or the loaded list): ``[{image_id, category_id, bbox: [x, y, w,
            h], score}, ...]`` in original-image pixels.
        data: the ground truth: a COCO json (or a folder with one) -- ``category_id`` and ``image_id`` are that
            file's own ids and it is evaluated exactly as written, like pycocotools -- or a VOC root / Ultralytics
            data yaml, where category ids are ``1..K`` in the dataset's class order and image ids are detkd's
            (the ids ``detkd eval`` writes in ``detections.json`` / ``gt.json``).
        split: the split to read (YOLO yaml entry, VOC ImageSets list, COCO json name in a folder).
        engine: ``"pycocotools"`` (reference) or ``"faster"`` (faster-coco-eval: identical stats, several times
            faster on large sets; ``pip install faster-coco-eval``).
        out_dir: where ``metrics.json`` (and, for a non-COCO ``data``, ``gt.json``) are written; None: nowhere.
        voc: also compute VOC mAP@0.5 (07 11-point and area under the curve).

    Returns:
        the metrics dict of `detkd.eval.coco.evaluate_coco` plus ``voc``, ``detections``, ``data``, ``split``.

    Raises:
        EvalError: a ``category_id`` that is not a ground-truth category (pycocotools would silently drop those
            detections), or a missing engine. DataError: an unknown ``image_id``, a malformed file.
    """
    require_engine(engine)
    raw = _load_detections(detections)
    ds = read_dataset(data, split)
    out = Path(out_dir) if out_dir is not None else None
    if detect_format(data) == "coco":
        bad = [i for i in ds.issues if i.kind == "bad_label"]
        if bad:
            raise DataError(f"{ds.root}: {len(bad)} malformed annotation(s), e.g. {bad[0].detail}; "
                            "run `detkd data validate` and fix them first")  # fmt: skip
        gt = json.loads(Path(ds.root).read_text(encoding="utf-8"))  # scored as written: the file's own ids
    else:
        with tempfile.TemporaryDirectory() as tmp:
            gt_path = (out or Path(tmp)) / "gt.json"
            write_coco(ds, gt_path)
            gt = json.loads(gt_path.read_text(encoding="utf-8"))
    dets = _prepare_dets(raw, {int(im["id"]) for im in gt["images"]})  # clean copies; unknown image ids raise
    cats = sorted(gt["categories"], key=lambda c: int(c["id"]))
    names = [str(c.get("name", c["id"])) for c in cats]
    known = {int(c["id"]) for c in cats}
    used = {d["category_id"] for d in dets}
    unknown = sorted(used - known)
    if unknown:
        ids = ", ".join(f"{int(c['id'])}={c.get('name', '')}" for c in cats[:12]) + (", ..." if len(cats) > 12 else "")
        raise EvalError(
            f"{len(unknown)} detection category_id(s) are not ground-truth categories: {unknown[:10]}; they would be "
            f"scored as nothing. The ground truth's categories are {ids}"
            + ("" if detect_format(data) == "coco"
               else " (detkd numbers a VOC / YOLO dataset's classes 1..K in its class order)")
        )
    metrics = _score(gt, dets, names, engine, voc)
    metrics["detections"] = str(detections) if isinstance(detections, (str, Path)) else "<in memory>"
    metrics["data"] = str(data)
    metrics["split"] = split
    if out is not None:
        write_metrics_json(metrics, out / "metrics.json")
        metrics["out_dir"] = str(out)
    return metrics
