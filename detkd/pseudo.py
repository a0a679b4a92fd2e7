"""`detkd pseudo-label`: hard-label distillation. A teacher labels unlabeled images and video frames, and the
result is a dataset that `detkd train` and plain Ultralytics train on.

`pseudo_label(teacher, sources, out_dir, ...)` writes, under ``out_dir``:

* ``images/train/<stem><ext>`` and ``labels/train/<stem>.txt`` (``class xc yc w h``, normalised, 8 significant
  digits; an empty file when the teacher found nothing), ``data.yaml`` (``train``, ``val``, ``names`` in the
  teacher's class order; no ``path`` key, so the folder can move), and with ``fmt='coco'`` also
  ``annotations/instances_train.json`` (and ``instances_val.json``) as `detkd.data.formats.write_coco` writes them;
* ``pseudo_manifest.json``: which labels are pseudo (teacher path and sha256, the per-class thresholds and how they
  were chosen, every pseudo box with its score), which images are real (from ``merge``), what was unreadable;
* ``pseudo_progress.jsonl``: one line per finished image, so a rerun skips it (see Resuming).

Sources: a folder (searched recursively, sorted; image files as Ultralytics loads them, and video files), an image
file, or a video file. A video gives every ``every``-th frame (0, K, 2K, ...) decoded with OpenCV, written as
``<video stem>_f<frame:06d>.jpg`` (JPEG quality 95); the teacher labels the written JPEG, so labels and training
pixels agree. Image files are linked or copied unchanged (stem kept; a repeated stem gets ``_2``, ``_3``, ...).

Thresholds: NMS as in `detkd eval` (`detkd.eval.predict.predict_ultralytics`: conf 0.001, class-aware NMS at
``iou``, ``max_det``, square letterbox at ``imgsz``), then a box of class ``c`` is kept when ``score >= thr[c]``:

* a number: the same threshold for every class;
* ``'auto'``: per class, the threshold at which the teacher's F1 is highest on a labeled val split (`f1_thresholds`:
  predictions matched to ground truth greedily by score, at IoU >= 0.5, per image and class; every distinct
  score is a candidate threshold; ties go to the higher threshold). A class without val boxes gets
  `DEFAULT_CONF`; a class whose val boxes the teacher never finds (best F1 = 0) is not pseudo-labelled at all
  (its threshold is ``None``) and the summary says so.

Splits: ``val`` is the labeled val split (``val_data``, else ``merge``'s val split) written with its real labels
into ``images/val``; without one, ``val`` points at ``images/train`` (Ultralytics needs the key) and the summary
says so. ``merge`` (an Ultralytics data yaml, or COCO / VOC data converted as `detkd train` does) adds its train images with their real label files, unchanged; an
unlabeled image or frame with the same stem as a real one is not pseudo-labelled (the real labels win).

Resuming: an image is skipped when its image and label file exist and ``pseudo_progress.jsonl`` has it from the
same source with the same teacher (sha256) and settings (thresholds, imgsz, NMS); anything else is (re)done.
Images this command wrote earlier that the current sources no longer give are removed; other files found in
``images/train`` are left alone and counted. Unreadable images, videos and frames are counted and listed in the
manifest and the summary, never fatal. Nothing is downloaded.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from detkd.data.formats import IMG_SUFFIXES, PathLike, read_dataset, read_yolo, write_coco, write_yolo
from detkd.errors import DataError
from detkd.eval.predict import predict_ultralytics

__all__ = [
    "DEFAULT_CONF",
    "VIDEO_SUFFIXES",
    "ClassThreshold",
    "PseudoLabelResult",
    "f1_thresholds",
    "pseudo_label",
]

#: Threshold for a class that has no boxes in the val split (Ultralytics' ``predict`` default).
DEFAULT_CONF = 0.25
#: Confidence floor of the teacher's predictions (detkd eval's / Ultralytics validation's).
EVAL_CONF = 0.001
#: Video suffixes (Ultralytics' ``VID_FORMATS``).
VIDEO_SUFFIXES = frozenset({"asf", "avi", "gif", "m4v", "mkv", "mov", "mp4", "mpeg", "mpg", "ts", "wmv", "webm"})
MANIFEST = "pseudo_manifest.json"
PROGRESS = "pseudo_progress.jsonl"
BOX_FIELDS = ("class", "score", "x1", "y1", "x2", "y2")
FRAME_JPEG_QUALITY = 95


# ----------------------------------------------------------------------------------------------------------------
# Per-class thresholds
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class ClassThreshold:
    """A class's score threshold: ``threshold`` (``None``: never labelled), ``source`` ('fixed', 'f1', 'default'
    for no val boxes, 'no_tp' when the teacher found none of them), and the teacher's val counts and F1 /
    precision / recall at that threshold (``None`` without val data)."""

    name: str
    threshold: float | None
    source: str
    f1: float | None = None
    precision: float | None = None
    recall: float | None = None
    n_gt: int | None = None
    n_det: int | None = None

    def describe(self) -> str:
        if self.threshold is None:
            return f"{self.name} never (teacher found 0 of {self.n_gt} val boxes)"
        s = f"{self.name} {self.threshold:.3g}"
        if self.source == "f1":
            s += f" (F1 {self.f1:.3f}, P {self.precision:.3f}, R {self.recall:.3f})"
        elif self.source == "default":
            s += " (default: no val boxes)"
        return s


def _greedy_tp(gt_boxes: np.ndarray, det_boxes: np.ndarray, det_scores: np.ndarray, iou_thr: float) -> np.ndarray:
    """One image, one class: TP flag per detection. Detections in descending score (stable) each take the
    unmatched ground-truth box of highest IoU, a TP when that IoU >= ``iou_thr``."""
    from detkd.eval.voc import iou_matrix

    tp = np.zeros(len(det_boxes), bool)
    if not len(det_boxes) or not len(gt_boxes):
        return tp
    iou = iou_matrix(det_boxes[:, None, :], gt_boxes[None, :, :], legacy_pixel=False)  # (D, G)
    free = np.ones(len(gt_boxes), bool)
    for d in np.argsort(-det_scores, kind="stable"):
        cand = np.where(free, iou[d], -1.0)
        j = int(cand.argmax())
        if cand[j] >= iou_thr:
            tp[d] = True
            free[j] = False
    return tp


def f1_thresholds(
    gt: Sequence[tuple[np.ndarray, np.ndarray]],
    dets: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]],
    names: Sequence[str],
    iou_thr: float = 0.5,
    default: float = DEFAULT_CONF,
) -> list[ClassThreshold]:
    """Per class, the score threshold at which the detector's F1 on a labeled set is highest.

    Args:
        gt: per image ``(boxes (n, 4) xyxy, classes (n,))``.
        dets: per image (same order) ``(boxes (m, 4) xyxy, scores (m,), classes (m,))``.
        names: class names; class ``c`` is ``names[c]``.
        iou_thr: a detection matches a ground-truth box of its class and image at IoU >= this.
        default: threshold of a class without ground-truth boxes.

    Matching is greedy by score, per image and class (`_greedy_tp`); since a higher-scored detection is matched
    first, the detections kept at threshold ``t`` (``score >= t``) are matched exactly as in the full set, so
    TP(t) is a prefix sum over detections sorted by score. Candidate thresholds are the distinct scores;
    ``F1(t) = 2 TP / (n_kept + n_gt)``; the best F1 wins, ties go to the higher threshold.
    """
    if len(gt) != len(dets):
        raise ValueError(f"{len(gt)} ground-truth images but {len(dets)} prediction images")
    out = []
    for c, name in enumerate(names):
        scores, tps, n_gt = [], [], 0
        for (gb, gc), (db, ds, dc) in zip(gt, dets):
            gb, db = np.asarray(gb, np.float64).reshape(-1, 4), np.asarray(db, np.float64).reshape(-1, 4)
            ds, dc, gc = np.asarray(ds, np.float64).reshape(-1), np.asarray(dc).reshape(-1), np.asarray(gc).reshape(-1)
            g, d = gb[gc == c], dc == c
            n_gt += len(g)
            scores.append(ds[d])
            tps.append(_greedy_tp(g, db[d], ds[d], iou_thr))
        s, tp = np.concatenate(scores), np.concatenate(tps)
        if n_gt == 0:
            out.append(ClassThreshold(name, float(default), "default", n_gt=0, n_det=len(s)))
            continue
        order = np.argsort(-s, kind="stable")
        s, tp = s[order], tp[order]
        if not tp.any():
            out.append(ClassThreshold(name, None, "no_tp", 0.0, 0.0, 0.0, n_gt, len(s)))
            continue
        cum = np.cumsum(tp)
        kept = np.arange(1, len(s) + 1)
        last = np.r_[s[1:] != s[:-1], True]  # last detection of each run of equal scores
        f1 = np.where(last, 2 * cum / (kept + n_gt), -1.0)
        i = int(f1.argmax())  # first maximum = highest threshold among ties
        out.append(ClassThreshold(name, float(s[i]), "f1", float(f1[i]), float(cum[i] / kept[i]), float(cum[i] / n_gt),
                                  n_gt, len(s)))  # fmt: skip
    return out


# ----------------------------------------------------------------------------------------------------------------
# Sources
# ----------------------------------------------------------------------------------------------------------------
def _suffix(p: Path | str) -> str:
    return str(p).rpartition(".")[-1].lower() if "." in Path(p).name else ""


def _collect(sources: Sequence[PathLike], exclude: Path) -> tuple[list[Path], list[Path], int]:
    """Image and video files of ``sources`` (folders recursively, sorted; duplicates once; nothing under
    ``exclude``, the output folder) and the number of other files."""
    images, videos, ignored = [], [], 0
    for src in sources:
        p = Path(src).expanduser()
        if p.is_dir():
            files = sorted(q for q in p.rglob("*") if q.is_file() and not q.resolve().is_relative_to(exclude))
            if not files:
                raise DataError(f"source folder {p} has no files")
        elif p.is_file():
            if _suffix(p) not in IMG_SUFFIXES | VIDEO_SUFFIXES:
                raise DataError(f"source {p} is not an image, a video or a folder (image suffixes: "
                                f"{', '.join(sorted(IMG_SUFFIXES))}; videos: {', '.join(sorted(VIDEO_SUFFIXES))})")
            files = [p]
        else:
            raise DataError(f"source not found: {p}")
        for q in files:
            sfx = _suffix(q)
            if sfx in IMG_SUFFIXES:
                images.append(q.resolve())
            elif sfx in VIDEO_SUFFIXES:
                videos.append(q.resolve())
            else:
                ignored += 1
    seen: set[Path] = set()
    images = [q for q in images if not (q in seen or seen.add(q))]
    videos = [q for q in videos if not (q in seen or seen.add(q))]
    return images, videos, ignored


def _unique(stem: str, used: set[str]) -> str:
    if stem not in used:
        return stem
    k = 2
    while f"{stem}_{k}" in used:
        k += 1
    return f"{stem}_{k}"


def _frame_stem(base: str, frame: int) -> str:
    return f"{base}_f{frame:06d}"


# ----------------------------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------------------------
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _link_or_copy(src: Path, dst: Path) -> None:
    if dst.exists():
        if os.path.samefile(src, dst):
            return
        st, dt = src.stat(), dst.stat()
        if st.st_size == dt.st_size and int(st.st_mtime) == int(dt.st_mtime):
            return
        dst.unlink()
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _atomic_write(path: Path, data: str | bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    if isinstance(data, bytes):
        tmp.write_bytes(data)
    else:
        tmp.write_text(data, encoding="utf-8")
    os.replace(tmp, path)


def _label_text(boxes: np.ndarray, classes: np.ndarray, w: int, h: int) -> str:
    if not len(boxes):
        return ""
    b = np.clip(np.asarray(boxes, np.float64) / np.array([w, h, w, h], np.float64), 0.0, 1.0)
    xc, yc, bw, bh = (b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2, b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
    return "".join(f"{int(c)} {x:.8g} {y:.8g} {ww:.8g} {hh:.8g}\n"
                   for c, x, y, ww, hh in zip(classes.tolist(), xc, yc, bw, bh) if ww > 0 and hh > 0)  # fmt: skip


def _read_image(path: Path) -> np.ndarray | None:
    import cv2

    try:
        buf = np.fromfile(str(path), np.uint8)
    except OSError:
        return None
    if not buf.size:
        return None
    return cv2.imdecode(buf, cv2.IMREAD_COLOR)  # as Ultralytics reads it (EXIF rotation applied)


# ----------------------------------------------------------------------------------------------------------------
# Result
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class PseudoLabelResult:
    """What `pseudo_label` did; `summary` is the text the CLI prints."""

    root: str
    data_yaml: str
    manifest: str
    teacher: str
    teacher_sha256: str
    thresholds: list[ClassThreshold]
    conf_mode: str
    counts: dict[str, int]
    boxes_per_class: dict[str, int]
    unreadable: list[dict]
    val: str
    coco_json: list[str] = field(default_factory=list)

    def summary(self) -> str:
        c = self.counts
        files = "data.yaml, " + MANIFEST + "".join(", " + Path(j).relative_to(self.root).as_posix() for j in self.coco_json)
        lines = [f"detkd pseudo-label: wrote {self.root} ({files})",
                 f"  teacher: {self.teacher} (sha256 {self.teacher_sha256[:12]})",
                 f"  thresholds ({self.conf_mode}): " + ("; ".join(t.describe() for t in self.thresholds)
                                                          if len(self.thresholds) <= 6 else
                                                          "".join("\n    " + t.describe() for t in self.thresholds))]
        lines.append(f"  train images: {c['pseudo']} pseudo-labelled ({c['new']} new, {c['skipped']} done earlier)"
                     + (f", {c['real']} real from --merge ({c['replaced_by_real']} unlabeled ones had real labels)"
                        if c["real"] else "")
                     + f", {c['unreadable']} unreadable")  # fmt: skip
        per = ", ".join(f"{k} {v}" for k, v in self.boxes_per_class.items())
        lines.append(f"  pseudo boxes: {sum(self.boxes_per_class.values())} ({per})")
        never = [t.name for t in self.thresholds if t.threshold is None]
        if never:
            lines.append(f"  warning: {len(never)} of {len(self.thresholds)} classes get no pseudo labels "
                         f"({', '.join(never)}): the teacher found none of their val boxes at IoU 0.5; "
                         "give a fixed --conf to label them anyway")  # fmt: skip
        if self.unreadable:
            shown = [u["file"] + (f" frame {u['frame']}" if u.get("frame") is not None else "") + f" ({u['reason']})"
                     for u in self.unreadable[:10]]
            more = f", ... ({len(self.unreadable) - 10} more in {MANIFEST})" if len(self.unreadable) > 10 else ""
            lines.append(f"  unreadable ({len(self.unreadable)}): " + "; ".join(shown) + more)
        if c.get("ignored"):
            lines.append(f"  ignored {c['ignored']} file(s) that are neither images nor videos")
        if c.get("stale_removed") or c.get("foreign"):
            lines.append(f"  removed {c.get('stale_removed', 0)} image(s) an earlier run wrote that no source gives now"
                         + (f"; {c['foreign']} other file(s) in images/train left alone (Ultralytics trains on them)"
                            if c.get("foreign") else ""))  # fmt: skip
        lines.append(f"  val: {self.val}")
        lines.append(f"  train on it: detkd train CONFIG.yaml data={self.data_yaml}  |  yolo train data={self.data_yaml}")
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# Main entry point
# ----------------------------------------------------------------------------------------------------------------
def _dets_by_image(dets: list[dict], n: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """COCO results with image ids 0..n-1 and category ids 1..K -> per image (xyxy, scores, class indices)."""
    rows: list[list[dict]] = [[] for _ in range(n)]
    for d in dets:
        rows[d["image_id"]].append(d)
    out = []
    for r in rows:
        b = np.array([d["bbox"] for d in r], np.float64).reshape(-1, 4)
        b[:, 2:] += b[:, :2]
        out.append((b, np.array([d["score"] for d in r], np.float64), np.array([d["category_id"] - 1 for d in r], np.int64)))
    return out


def _load_labeled(path: PathLike, split: str, names: list[str], what: str):
    """A labeled split, validated (boxes clipped, bad items skipped), with the teacher's class names."""
    from detkd.data.validate import validate_dataset

    ds = validate_dataset(read_dataset(path, split), fix=True).dataset
    if list(ds.names) != names:
        raise DataError(f"{what} {path} has classes {list(ds.names)} but the teacher has {names}; they must match, "
                        "in the same order")  # fmt: skip
    if not ds.images:
        raise DataError(f"{what} {path}: split '{split}' has no usable images")
    return ds


def pseudo_label(
    teacher: PathLike,
    sources: Sequence[PathLike],
    out_dir: PathLike,
    *,
    conf: str | float = "auto",
    val_data: PathLike | None = None,
    merge: PathLike | None = None,
    every: int = 1,
    imgsz: int = 640,
    iou: float = 0.7,
    max_det: int = 300,
    fmt: str = "yolo",
    device: str = "cpu",
    batch: int = 16,
    progress: bool = True,
) -> PseudoLabelResult:
    """Label ``sources`` with ``teacher`` and write a training dataset to ``out_dir`` (see the module docstring).

    Args:
        teacher: an Ultralytics detection ``.pt``.
        sources: folders, image files, video files.
        out_dir: the dataset folder (created; rerun into the same folder to resume).
        conf: ``'auto'`` (per-class F1-best threshold on ``val_data``, else on ``merge``'s val split) or a number.
        val_data: a labeled dataset (any format `read_dataset` reads; its ``val`` split) with the teacher's classes.
        merge: a labeled dataset whose train images (and real labels) are added; its val split is the val split
            unless ``val_data`` is given. An Ultralytics data yaml, or a COCO / VOC source as ``detkd train`` takes
            it (converted and cached by `detkd.data.resolve.as_ultralytics_data`).
        every: take every ``every``-th video frame.
        imgsz, iou, max_det: the teacher's inference size and NMS (as in `detkd eval`).
        fmt: ``'yolo'`` or ``'coco'`` (also COCO jsons under ``annotations/``).
        device, batch: passed to Ultralytics.
        progress: tqdm progress bars.
    """
    import cv2
    import yaml
    from tqdm.auto import tqdm

    from detkd.eval.predict import ensure_ultralytics_offline

    if fmt not in ("yolo", "coco"):
        raise DataError(f"format {fmt!r}: use 'yolo' or 'coco'")
    if int(every) < 1:
        raise DataError(f"--every must be >= 1, got {every}")
    every = int(every)
    auto = isinstance(conf, str) and conf.strip().lower() == "auto"
    if not auto:
        try:
            fixed = float(conf)
        except (TypeError, ValueError):
            raise DataError(f"--conf {conf!r}: give 'auto' or a number in [0, 1]") from None
        if not 0.0 <= fixed <= 1.0:
            raise DataError(f"--conf {fixed}: a score threshold lies in [0, 1]")
    teacher = Path(teacher).expanduser().resolve()
    if not teacher.is_file():
        raise DataError(f"teacher checkpoint not found: {teacher}")
    merge_yaml = None
    if merge is not None:  # a COCO / VOC source is validated and converted (cached) as `detkd train` does
        from detkd.data.resolve import as_ultralytics_data

        merge_yaml = as_ultralytics_data(merge)
    if not sources:
        raise DataError("give at least one source (a folder of images, an image or a video)")
    root = Path(out_dir).expanduser().resolve()
    img_files, video_files, ignored = _collect(sources, root)
    if not img_files and not video_files:
        raise DataError(f"no images or videos found in {', '.join(map(str, sources))}")

    ensure_ultralytics_offline()
    from ultralytics import YOLO

    from detkd.checkpoints import check_checkpoint

    check_checkpoint(teacher, "teacher")  # a pickled payload is refused before anything is unpickled
    model = YOLO(str(teacher), task="detect")
    tn = model.names
    names = [str(tn[i]) for i in range(len(tn))] if isinstance(tn, Mapping) else [str(x) for x in tn]
    sha = _sha256(teacher)

    # ---- labeled data: val split and real train images -------------------------------------------------------
    val_ds = None
    val_from = None
    if val_data is not None:
        val_ds, val_from = _load_labeled(val_data, "val", names, "--val-data"), str(val_data)
    merge_ds = None
    if merge is not None:
        merge_ds = read_yolo(merge_yaml, "train")
        if list(merge_ds.names) != names:
            raise DataError(f"--merge {merge} has classes {list(merge_ds.names)} but the teacher has {names}; "
                            "they must match, in the same order")  # fmt: skip
        if val_ds is None:
            try:
                val_ds, val_from = _load_labeled(merge_yaml, "val", names, "--merge"), f"{merge} (val split)"
            except DataError:
                val_ds = None

    # ---- thresholds -------------------------------------------------------------------------------------------
    if auto:
        if val_ds is None:
            raise DataError("--conf auto picks per-class thresholds on a labeled val split: give --val-data DATA "
                            "(or --merge DATA with a val split), or a fixed --conf such as 0.25")  # fmt: skip
        vd = predict_ultralytics(model, [(k, r.file) for k, r in enumerate(val_ds.images)], imgsz=imgsz, conf=EVAL_CONF,
                                 iou=iou, max_det=max_det, device=device, batch=batch, progress=progress)  # fmt: skip
        thresholds = f1_thresholds([(r.boxes, r.classes) for r in val_ds.images], _dets_by_image(vd, len(val_ds.images)),
                                   names)  # fmt: skip
        conf_mode = f"auto: F1-best on {len(val_ds.images)} images of {val_from}"
    else:
        thresholds = [ClassThreshold(n, fixed, "fixed") for n in names]
        conf_mode = f"fixed {fixed:g}"
    thr = np.array([np.inf if t.threshold is None else t.threshold for t in thresholds], np.float64)
    live = thr[np.isfinite(thr)]
    pred_conf = min(EVAL_CONF, float(live.min())) if live.size else EVAL_CONF
    key = hashlib.sha256(json.dumps({"teacher": sha, "thr": [t.threshold for t in thresholds], "imgsz": int(imgsz),
                                     "iou": float(iou), "max_det": int(max_det), "conf": pred_conf},
                                    sort_keys=True).encode()).hexdigest()[:16]  # fmt: skip

    # ---- output folders, earlier progress --------------------------------------------------------------------
    img_dir, lbl_dir = root / "images" / "train", root / "labels" / "train"
    if (root / "data.yaml").is_file():
        old_names = (yaml.safe_load((root / "data.yaml").read_text(encoding="utf-8")) or {}).get("names")
        old_names = list(old_names.values()) if isinstance(old_names, dict) else old_names
        if old_names is not None and [str(x) for x in old_names] != names:
            raise DataError(f"{root} already holds a dataset with classes {old_names}, the teacher has {names}; "
                            "write to a new folder")  # fmt: skip
    img_dir.mkdir(parents=True, exist_ok=True)
    lbl_dir.mkdir(parents=True, exist_ok=True)
    prog_path = root / PROGRESS
    done: dict[str, dict] = {}
    if prog_path.is_file():
        for ln in prog_path.read_text(encoding="utf-8").splitlines():
            try:
                e = json.loads(ln)
                done[e["stem"]] = e
            except (json.JSONDecodeError, KeyError, TypeError):
                continue  # a line cut short by an interruption
    ours = {f for e in done.values() for f in (e.get("file"), e.get("label")) if f}  # files earlier runs wrote
    old_manifest = root / MANIFEST
    if old_manifest.is_file():
        try:
            old = json.loads(old_manifest.read_text(encoding="utf-8")).get("images", [])
            ours |= {f for e in old for f in (e.get("file"), e.get("label")) if f}
        except (json.JSONDecodeError, AttributeError, TypeError):
            pass

    # ---- names: real stems first, then images, then videos --------------------------------------------------
    used: set[str] = set()
    entries: dict[str, dict] = {}  # stem -> manifest entry of every train image written
    real_stems: set[str] = set()
    if merge_ds is not None:
        for r in merge_ds.images:
            src = Path(r.file)
            stem = _unique(src.stem, used)
            used.add(stem)
            real_stems.add(src.stem)
            dst = img_dir / f"{stem}{src.suffix.lower()}"
            _link_or_copy(src, dst)
            lbl = Path(r.label_file) if r.label_file else None
            text = lbl.read_bytes() if lbl is not None and lbl.is_file() else b""
            lp = lbl_dir / f"{stem}.txt"
            if not lp.is_file() or lp.read_bytes() != text:
                _atomic_write(lp, text)
            entries[stem] = {"file": dst.relative_to(root).as_posix(), "label": lp.relative_to(root).as_posix(),
                             "pseudo": False, "source": str(src)}  # fmt: skip
    replaced: list[str] = []
    img_items: list[tuple[Path, str]] = []
    for q in img_files:
        if q.stem in real_stems:
            replaced.append(str(q))
            continue
        stem = _unique(q.stem, used)
        used.add(stem)
        img_items.append((q, stem))
    image_stems = set(used)  # a frame named like one of these gets a suffix (_unique)
    video_bases: list[tuple[Path, str]] = []
    for v in video_files:
        base = _unique(v.stem, used)
        used.add(base)
        video_bases.append((v, base))

    # ---- the labelling loop -----------------------------------------------------------------------------------
    counts = {"new": 0, "skipped": 0, "unreadable": 0, "real": len(entries), "replaced_by_real": 0, "ignored": ignored}
    unreadable: list[dict] = []
    totals = len(img_items)
    for v, _ in video_bases:
        cap = cv2.VideoCapture(str(v))
        n = int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0) if cap.isOpened() else 0
        cap.release()
        totals += max(0, -(-n // every))
    bar = tqdm(total=totals or None, desc="pseudo-label", unit="img", disable=not progress, dynamic_ncols=True)
    log = open(prog_path, "a", encoding="utf-8")
    pending: list[dict] = []
    chunk = max(4 * int(batch), 32)

    def is_done(stem: str, dst: Path, src: Path, frame: int | None) -> bool:
        e = done.get(stem)
        if e is None or e.get("key") != key or e.get("source") != str(src) or e.get("frame") != frame:
            return False
        if e.get("file") != dst.relative_to(root).as_posix():
            return False
        return dst.is_file() and dst.stat().st_size > 0 and (lbl_dir / f"{stem}.txt").is_file()

    def finish(e: dict) -> None:
        entries[e["stem"]] = {k: v for k, v in e.items() if k not in ("stem", "key")}

    def flush() -> None:
        if not pending:
            return
        dets = predict_ultralytics(model, [(k, p["dst"]) for k, p in enumerate(pending)], imgsz=imgsz, conf=pred_conf,
                                   iou=iou, max_det=max_det, device=device, batch=batch, progress=False)  # fmt: skip
        for p, (b, s, c) in zip(pending, _dets_by_image(dets, len(pending))):
            keep = s >= thr[c] if len(c) else np.zeros(0, bool)
            b, s, c = b[keep], s[keep], c[keep]
            lp = lbl_dir / f"{p['stem']}.txt"
            _atomic_write(lp, _label_text(b, c, p["w"], p["h"]))
            e = {"stem": p["stem"], "key": key, "file": Path(p["dst"]).relative_to(root).as_posix(),
                 "label": lp.relative_to(root).as_posix(), "pseudo": True, "source": p["source"], "frame": p["frame"],
                 "width": p["w"], "height": p["h"],
                 "boxes": [[int(ci), round(float(si), 6), *(round(float(x), 2) for x in bi)]
                           for bi, si, ci in zip(b.tolist(), s.tolist(), c.tolist())]}  # fmt: skip
            log.write(json.dumps(e) + "\n")
            log.flush()
            done[p["stem"]] = e
            finish(e)
            counts["new"] += 1
        bar.update(len(pending))
        pending.clear()

    try:
        for src, stem in img_items:
            dst = img_dir / f"{stem}{src.suffix.lower()}"
            if is_done(stem, dst, src, None):
                finish(done[stem])
                counts["skipped"] += 1
                bar.update(1)
                continue
            im = _read_image(src)
            if im is None:
                unreadable.append({"file": str(src), "frame": None, "reason": "cannot read or decode the image"})
                bar.update(1)
                continue
            if dst.exists():
                dst.unlink()
            _link_or_copy(src, dst)
            pending.append({"stem": stem, "dst": str(dst), "source": str(src), "frame": None,
                            "w": int(im.shape[1]), "h": int(im.shape[0])})  # fmt: skip
            if len(pending) >= chunk:
                flush()
        for src, base in video_bases:
            cap = cv2.VideoCapture(str(src))
            if not cap.isOpened():
                unreadable.append({"file": str(src), "frame": None, "reason": "OpenCV cannot open the video"})
                continue
            idx, got = 0, 0
            try:
                while cap.grab():
                    got += 1
                    if idx % every == 0:
                        stem = _frame_stem(base, idx)
                        real = stem in real_stems
                        stem = _unique(stem, image_stems)
                        dst = img_dir / f"{stem}.jpg"
                        if real:
                            replaced.append(f"{src} frame {idx}")
                            bar.update(1)
                        elif is_done(stem, dst, src, idx):
                            finish(done[stem])
                            counts["skipped"] += 1
                            bar.update(1)
                        else:
                            ok, frame = cap.retrieve()
                            enc_ok, buf = (cv2.imencode(".jpg", frame, [cv2.IMWRITE_JPEG_QUALITY, FRAME_JPEG_QUALITY])
                                           if ok and frame is not None else (False, None))  # fmt: skip
                            if not enc_ok:
                                unreadable.append({"file": str(src), "frame": idx, "reason": "cannot decode the frame"})
                                bar.update(1)
                            else:
                                _atomic_write(dst, buf.tobytes())
                                pending.append({"stem": stem, "dst": str(dst), "source": str(src), "frame": idx,
                                                "w": int(frame.shape[1]), "h": int(frame.shape[0])})  # fmt: skip
                                if len(pending) >= chunk:
                                    flush()
                    idx += 1
            finally:
                cap.release()
            if got == 0:
                unreadable.append({"file": str(src), "frame": None, "reason": "no frame could be read"})
        flush()
    finally:
        log.close()
        bar.close()
    counts["unreadable"] = len(unreadable)
    counts["replaced_by_real"] = len(replaced)
    counts["pseudo"] = sum(1 for e in entries.values() if e["pseudo"])
    if not entries:
        raise DataError(f"nothing to train on: all {len(unreadable)} source item(s) were unreadable "
                        f"(e.g. {unreadable[0]['file'] if unreadable else '?'})")  # fmt: skip

    # ---- stale files, progress log compaction --------------------------------------------------------------
    keep_files = {e["file"] for e in entries.values()} | {e["label"] for e in entries.values()}
    removed = foreign = 0
    for d in (img_dir, lbl_dir):
        for q in sorted(d.rglob("*")):
            if not q.is_file():
                continue
            rel = q.relative_to(root).as_posix()
            if rel in keep_files:
                continue
            if rel in ours or (q.name.startswith(".") and q.name.endswith(".tmp")):
                q.unlink()
                removed += d is img_dir
            elif d is img_dir and _suffix(q) in IMG_SUFFIXES:
                foreign += 1
    counts["stale_removed"], counts["foreign"] = removed, foreign
    _atomic_write(prog_path, "".join(json.dumps({"stem": s, "key": key, **e}) + "\n"
                                     for s, e in sorted(entries.items()) if e["pseudo"]))  # fmt: skip
    for q in (root / "labels").glob("*.cache"):
        q.unlink()

    # ---- val split, data.yaml, COCO, manifest -----------------------------------------------------------------
    if val_ds is not None:
        write_yolo(val_ds, root, split="val", link="hardlink")
        val_entry, val_msg = "images/val", f"images/val ({len(val_ds.images)} labeled images from {val_from})"
    else:
        val_entry = "images/train"
        val_msg = ("images/train (no labeled val split: give --val-data or --merge with a val split for a real "
                   "validation)")  # fmt: skip
    data = {"train": "images/train", "val": val_entry, "names": dict(enumerate(names))}
    header = "# Ultralytics YOLO data file written by detkd pseudo-label (paths relative to this file's folder)\n"
    yml = root / "data.yaml"
    _atomic_write(yml, header + yaml.safe_dump(data, sort_keys=False, allow_unicode=True))

    coco_json = []
    if fmt == "coco":
        from detkd.data.validate import validate_dataset

        for split in ("train", "val") if val_ds is not None else ("train",):
            ds = validate_dataset(read_yolo(yml, split), fix=True).dataset
            w = write_coco(ds, root / "annotations" / f"instances_{split}.json", images_dir=root / "images" / split)
            coco_json.append(w["json"])

    per_class = np.zeros(len(names), np.int64)
    for e in entries.values():
        for row in e.get("boxes", []):
            per_class[row[0]] += 1
    manifest = {
        "format": "detkd-pseudo-labels/1",
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "teacher": {"path": str(teacher), "sha256": sha, "names": names},
        "settings": {"conf": "auto" if auto else fixed, "imgsz": int(imgsz), "iou": float(iou), "max_det": int(max_det),
                     "prediction_conf": pred_conf, "every": every, "match_iou": 0.5, "keep": "score >= threshold",
                     "val_data": None if val_data is None else str(Path(val_data).expanduser().resolve()),
                     "merge": None if merge is None else str(merge) if isinstance(merge, Mapping)
                     else str(Path(merge).expanduser().resolve())},  # fmt: skip
        "thresholds": {t.name: {k: v for k, v in t.__dict__.items() if k != "name"} for t in thresholds},
        "sources": [str(Path(s).expanduser().resolve()) for s in sources],
        "counts": counts,
        "boxes_per_class": dict(zip(names, per_class.tolist())),
        "unreadable": unreadable,
        "replaced_by_real": replaced,
        "box_fields": list(BOX_FIELDS),
    }
    images = ",\n".join("  " + json.dumps(entries[s]) for s in sorted(entries))  # one line per image
    _atomic_write(root / MANIFEST, json.dumps(manifest, indent=1)[:-2] + f',\n "images": [\n{images}\n ]\n}}\n')
    return PseudoLabelResult(
        root=str(root), data_yaml=str(yml), manifest=str(root / MANIFEST), teacher=str(teacher), teacher_sha256=sha,
        thresholds=thresholds, conf_mode=conf_mode, counts=counts, boxes_per_class=dict(zip(names, per_class.tolist())),
        unreadable=unreadable, val=val_msg, coco_json=coco_json,
    )  # fmt: skip
