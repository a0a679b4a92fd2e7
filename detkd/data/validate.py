"""Dataset validation: every problem counted, fixed or skipped with a warning, or a clear error; never silent.

`validate_dataset(dataset_or_path)` checks a `Dataset` (or reads one with `read_dataset`) and returns a
`ValidationReport`: counts of images and boxes per class, and every problem found, counted by kind with up to
5 example files each (`report.summary()` is the text a user reads). With ``fix=True`` (default)
``report.dataset`` is a cleaned copy ready for the writers and for training; the input is never modified.

Problem kinds (`KINDS`), what ``fix=True`` does, and their severity:

=====================  ========  ======================================================================
kind                   severity  action
=====================  ========  ======================================================================
duplicate_id           error     none: two images share an id (COCO evaluation would mix them up)
empty_dataset          error     none: no usable image left
missing_image          warning   image skipped (with its boxes)
corrupt_image          warning   image skipped (with its boxes): not an image, or a damaged header
unsupported_format     warning   image skipped: a suffix Ultralytics does not load
truncated_jpeg         warning   kept: a JPEG without its end marker (decoders grey out the rest; PIL, and so
                                 Ultralytics' predict, raises OSError; `detkd eval` refuses it, naming the file)
missing_label          warning   kept as a background image (Ultralytics does the same)
orphan_label           warning   not used: a YOLO label file whose image is missing (or has a suffix
                                 Ultralytics does not load)
bad_label              warning   the malformed line / annotation / xml skipped
orphan_annotation      warning   skipped: a COCO annotation of an image id not in ``images``
unknown_class          warning   box skipped: a class name / category id not in the class list
class_out_of_range     warning   box skipped: a class index outside ``0..K-1``
invalid_box            warning   box skipped: NaN or infinite coordinates
zero_area              warning   box skipped: ``x2 <= x1`` or ``y2 <= y1``, or nothing left inside the image
box_outside            warning   box clipped to the image (beyond a 1e-3 px tolerance for float noise)
size_mismatch          warning   kept: the annotated width/height differ from the displayed image
empty_label            note      kept as a background image
grayscale              note      kept (cv2 / Ultralytics load it as 3 channels)
png                    note      kept (noted: PNG decodes slower, and alpha is dropped)
exif_rotated           note      kept: EXIF orientation; stored and displayed sizes reported (Ultralytics
                                 and ``cv2.imread`` apply the rotation, so labels must be in that frame)
=====================  ========  ======================================================================

Errors raise `DataError` (its message is the summary; the report is on ``error.report``). ``strict=True``
also raises for warnings, listing them. Notes never raise.

Box checks run on all boxes at once (numpy); only the per-file work (existence, header read) loops over
images. Header reads use PIL without decoding pixels; ``decode=True`` also decodes each image with
``cv2.imread`` to catch damage past the header.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from detkd.data.formats import (
    Dataset,
    ImageRecord,
    PathLike,
    _group_rows,
    _is_image_name,
    probe_image,
    read_dataset,
)
from detkd.errors import DataError

__all__ = ["KINDS", "Kind", "Problem", "ValidationReport", "validate_dataset"]

#: Box coordinates beyond the image by at most this many pixels are clipped without a warning (float noise).
CLIP_TOLERANCE = 1e-3
MAX_EXAMPLES = 5


@dataclass(frozen=True)
class Kind:
    severity: str  # "error" | "warning" | "note"
    unit: str  # what `count` counts
    action: str  # what fix=True does
    hint: str = ""  # what the user can do


KINDS: dict[str, Kind] = {
    "duplicate_id": Kind("error", "image", "not fixed", "give every image its own id"),
    "empty_dataset": Kind("error", "dataset", "not fixed", "check the paths and the split"),
    "missing_image": Kind("warning", "image", "image skipped", "restore the file or drop it from the annotations"),
    "corrupt_image": Kind("warning", "image", "image skipped", "re-export or delete the file"),
    "unsupported_format": Kind("warning", "image", "image skipped", "convert it to JPEG or PNG"),
    "truncated_jpeg": Kind("warning", "image", "kept", "re-save the file (`detkd eval` refuses it)"),
    "missing_label": Kind(
        "warning", "image", "kept as a background image", "add the label (an empty file for a true background)"
    ),
    "orphan_label": Kind("warning", "label file", "not used", "restore the image or delete the label file"),
    "bad_label": Kind("warning", "item", "skipped", "fix the annotation"),
    "orphan_annotation": Kind("warning", "annotation", "skipped", "add the image or remove the annotation"),
    "unknown_class": Kind("warning", "box", "box skipped", "add the class to the class list or fix the name"),
    "class_out_of_range": Kind("warning", "box", "box skipped", "class indices must be 0..K-1"),
    "invalid_box": Kind("warning", "box", "box skipped", "fix the coordinates"),
    "zero_area": Kind("warning", "box", "box skipped", "fix or remove the box"),
    "box_outside": Kind("warning", "box", "clipped to the image", "fix the coordinates"),
    "size_mismatch": Kind("warning", "image", "kept", "fix width/height in the annotation"),
    "empty_label": Kind("note", "image", "kept as a background image"),
    "grayscale": Kind("note", "image", "kept; loaded as 3 channels"),
    "png": Kind("note", "image", "kept"),
    "exif_rotated": Kind("note", "image", "kept; Ultralytics and cv2.imread apply the rotation"),
}
_SEVERITY_ORDER = {"error": 0, "warning": 1, "note": 2}
#: Kinds the readers handle while reading (the item never enters the `Dataset`), whatever ``fix`` says.
_READER_KINDS = frozenset({"bad_label", "orphan_annotation", "unknown_class", "missing_label", "orphan_label"})


@dataclass
class Problem:
    """One kind of problem: ``count`` occurrences (in `Kind.unit`s), up to 5 ``examples`` ('file: detail')
    from distinct files."""

    kind: str
    severity: str
    count: int = 0
    examples: list[str] = field(default_factory=list)
    _files: set = field(default_factory=set, repr=False)

    def line(self, fixed: bool) -> str:
        k = KINDS.get(self.kind, Kind(self.severity, "item", "kept"))
        unit = k.unit + ("" if self.count == 1 else "s")
        done = fixed or k.severity == "note" or self.kind in _READER_KINDS
        action = k.action if done else f"would be: {k.action} (fix=False)"
        hint = f"; {k.hint}" if k.hint else ""
        return f"{self.severity.upper():8s}{self.kind:20s}{self.count:6d} {unit:12s}{action}{hint}"


class _Tally:
    def __init__(self, root: str):
        self.root = str(Path(root).parent) if root and Path(root).is_file() else root  # a COCO json: its folder
        self.problems: dict[str, Problem] = {}

    def short(self, f: str) -> str:
        if self.root:
            try:
                return Path(f).relative_to(self.root).as_posix()
            except ValueError:
                pass
        return str(f)

    def add(self, kind: str, file: str, detail: str, n: int = 1) -> None:
        sev = KINDS[kind].severity if kind in KINDS else "warning"
        p = self.problems.setdefault(kind, Problem(kind, sev))
        p.count += int(n)
        if len(p.examples) < MAX_EXAMPLES and file not in p._files:
            p._files.add(file)
            p.examples.append(f"{self.short(file)}: {detail}")


@dataclass
class ValidationReport:
    """The outcome of `validate_dataset`. ``dataset`` is the cleaned copy (``fix=True``) or the input."""

    dataset: Dataset
    problems: dict[str, Problem]
    fixed: bool
    images_read: int
    boxes_read: int
    boxes_per_class: dict[str, int]

    def count(self, kind: str) -> int:
        """Occurrences of a problem kind (0 when absent)."""
        return self.problems[kind].count if kind in self.problems else 0

    def _by(self, severity: str) -> list[Problem]:
        return [p for p in self.problems.values() if p.severity == severity]

    @property
    def errors(self) -> list[Problem]:
        return self._by("error")

    @property
    def warnings(self) -> list[Problem]:
        return self._by("warning")

    @property
    def notes(self) -> list[Problem]:
        return self._by("note")

    @property
    def ok(self) -> bool:
        return not self.errors

    def _problem_lines(self, problems: Iterable[Problem]) -> list[str]:
        order = list(KINDS)
        key = lambda p: (_SEVERITY_ORDER.get(p.severity, 1), order.index(p.kind) if p.kind in order else len(order))
        lines = []
        for p in sorted(problems, key=key):
            lines.append("  " + p.line(self.fixed))
            lines += [f"      {e}" for e in p.examples]
        return lines

    def summary(self) -> str:
        ds = self.dataset
        where = f"{ds.root} ({ds.format or 'in memory'}" + (f", split '{ds.split}')" if ds.split else ")")
        state = "fixes applied" if self.fixed else "nothing changed (fix=False)"
        kept_boxes = sum(self.boxes_per_class.values())
        lines = [
            f"dataset: {where}",
            f"images: {self.images_read} read, {len(ds.images)} kept | "
            f"boxes: {self.boxes_read} read, {kept_boxes} usable | {state}",
            f"classes: {len(ds.names)}; boxes per class:",
        ]
        w = max([len(n) for n in ds.names] + [5])
        lines += [f"  {n:{w}s} {c:8d}" for n, c in self.boxes_per_class.items()]
        ne, nw, nn = (sum(p.count for p in self._by(s)) for s in ("error", "warning", "note"))
        if not self.problems:
            lines.append("problems: none")
        else:
            lines.append(f"problems: {ne} error(s), {nw} warning(s), {nn} note(s)")
            lines += self._problem_lines(self.problems.values())
        return "\n".join(lines)

    def check(self, strict: bool = False) -> ValidationReport:
        """Raise `DataError` if there are errors, or (``strict``) warnings; return self otherwise."""
        if self.errors:
            err = DataError(f"dataset has errors:\n{self.summary()}")
            err.report = self  # type: ignore[attr-defined]
            raise err
        if strict and self.warnings:
            n = sum(p.count for p in self.warnings)
            body = "\n".join(self._problem_lines(self.warnings))
            err = DataError(
                f"strict mode: {n} warning(s) treated as errors in {self.dataset.root}:\n{body}\n"
                "Fix the data, or validate without strict to apply the actions listed."
            )
            err.report = self  # type: ignore[attr-defined]
            raise err
        return self


def _fmt_box(b: np.ndarray) -> str:
    return "[" + ", ".join(f"{v:.4g}" for v in b) + "]"


def _fmt_size(wh: np.ndarray) -> str:
    return f"{int(wh[0])}x{int(wh[1])}"


def _check_images(ds: Dataset, t: _Tally, decode: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per-file checks. Returns ``keep (N,)`` bool and ``size (N, 2)`` int (width, height) to use."""
    n = len(ds.images)
    keep = np.ones(n, bool)
    size = np.array([[r.width, r.height] for r in ds.images], np.int64).reshape(n, 2)
    if decode:
        import cv2
    for i, r in enumerate(ds.images):
        nb = f" and its {len(r)} box(es)" if len(r) else ""
        if not os.path.isfile(r.file):
            t.add("missing_image", r.file, f"file not found; image{nb} skipped")
            keep[i] = False
            continue
        if not _is_image_name(r.file):
            t.add("unsupported_format", r.file, f"suffix '{Path(r.file).suffix}' is not loaded by Ultralytics; skipped")
            keep[i] = False
            continue
        try:
            info = probe_image(r.file)
            if decode and cv2.imread(r.file, cv2.IMREAD_COLOR) is None:
                raise DataError(f"{r.file}: cv2.imread cannot decode it")
        except DataError as e:
            t.add("corrupt_image", r.file, str(e).replace(f"{r.file}: ", "") + f"; image{nb} skipped")
            keep[i] = False
            continue
        if info.truncated:
            t.add("truncated_jpeg", r.file, "JPEG end marker missing (file cut short); kept")
        if info.grayscale:
            t.add("grayscale", r.file, f"mode {info.mode}")
        if info.format == "PNG":
            t.add("png", r.file, f"PNG, mode {info.mode}")
        dw, dh = info.display_size
        if info.orientation != 1:
            t.add(
                "exif_rotated",
                r.file,
                f"EXIF orientation {info.orientation}: stored {info.width}x{info.height}, displayed {dw}x{dh}"
                " (Ultralytics and cv2.imread use the displayed image; labels must be in that frame)",
            )
        if r.width <= 0 or r.height <= 0:
            size[i] = (dw, dh)  # size not in the annotation: take it from the image
        elif (r.width, r.height) != (dw, dh):
            stored = f" (stored {info.width}x{info.height}, EXIF orientation {info.orientation})"
            detail = f"annotation says {r.width}x{r.height}, image displays as {dw}x{dh}"
            detail += (stored if info.orientation != 1 else "") + "; boxes kept as annotated"
            t.add("size_mismatch", r.file, detail)
    return keep, size


def validate_dataset(
    dataset_or_path: Dataset | PathLike,
    strict: bool = False,
    fix: bool = True,
    split: str = "val",
    decode: bool = False,
    **read_kwargs,
) -> ValidationReport:
    """Check a dataset and report every problem (see the module docstring for the kinds and actions).

    Args:
        dataset_or_path: a `Dataset`, or a path `read_dataset` understands (``split`` and ``read_kwargs``
            go to it).
        strict: raise `DataError` for warnings as well as errors.
        fix: build ``report.dataset`` with the fixes applied (boxes clipped, bad items skipped, unknown
            sizes filled in); with False the report says what would change and ``report.dataset`` is the input.
        decode: also decode every image with ``cv2.imread`` (slow; header reads catch most damage).

    Returns:
        `ValidationReport`. Raises `DataError` (message = summary, ``.report`` attached) on errors, or on
        warnings with ``strict``.
    """
    if isinstance(dataset_or_path, Dataset):
        ds = dataset_or_path
    else:  # the reader's "problems while reading" log line is redundant here: the report lists them
        reader_log = logging.getLogger("detkd.data.formats")
        level = reader_log.level
        reader_log.setLevel(logging.ERROR)
        try:
            ds = read_dataset(dataset_or_path, split, **read_kwargs)
        finally:
            reader_log.setLevel(level)
    t = _Tally(ds.root)
    for iss in ds.issues:
        t.add(iss.kind, iss.file, iss.detail, iss.count)
    files = [r.file for r in ds.images]
    n_img, K = len(ds.images), len(ds.names)

    # duplicate ids (error)
    ids = np.array([r.id for r in ds.images], np.int64)
    _, first, inverse = np.unique(ids, return_index=True, return_inverse=True)
    first_of = first[inverse.reshape(-1)]  # the first image using each image's id
    for i in np.flatnonzero(first_of != np.arange(n_img)):
        t.add("duplicate_id", files[i], f"id {ids[i]} is also used by {t.short(files[first_of[i]])}")

    keep_img, size = _check_images(ds, t, decode)

    # ---- box checks, all boxes at once -------------------------------------------------------------------
    counts = np.array([len(r) for r in ds.images], np.int64)
    boxes = np.concatenate([r.boxes for r in ds.images] or [np.zeros((0, 4), np.float32)]).astype(np.float64)
    cls = np.concatenate([r.classes for r in ds.images] or [np.zeros(0, np.int64)])
    img_idx = np.repeat(np.arange(n_img), counts)
    live = keep_img[img_idx]  # boxes of skipped images are covered by the image's own problem
    wh = size[img_idx].astype(np.float64)
    lim = np.concatenate([wh, wh], 1)

    invalid = live & ~np.isfinite(boxes).all(1)
    bad_cls = live & ~invalid & ((cls < 0) | (cls >= K))
    ok = live & ~invalid & ~bad_cls
    with np.errstate(invalid="ignore"):
        zero = ok & ((boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1]))
        clipped = np.clip(boxes, 0.0, lim)
        moved = ok & ~zero & (np.abs(clipped - boxes) > CLIP_TOLERANCE).any(1)
        gone = ok & ~zero & ((clipped[:, 2] <= clipped[:, 0]) | (clipped[:, 3] <= clipped[:, 1]))
    outside = moved & ~gone

    missing_lbl = {iss.file for iss in ds.issues if iss.kind == "missing_label"}
    for i in np.flatnonzero((counts == 0) & keep_img):
        r = ds.images[i]
        if r.label_file is None or r.label_file not in missing_lbl:
            t.add("empty_label", r.file, "no boxes (background image)")

    _box_problem(
        t, "invalid_box", invalid, img_idx, files, lambda j: f"box {_fmt_box(boxes[j])} is not finite; skipped"
    )  # fmt: skip
    _box_problem(
        t, "class_out_of_range", bad_cls, img_idx, files,
        lambda j: f"class {cls[j]} but the dataset has {K} classes (0..{K - 1}); box skipped",
    )  # fmt: skip
    _box_problem(
        t, "zero_area", zero | gone, img_idx, files,
        lambda j: f"box {_fmt_box(boxes[j])} "
        + ("has zero or negative width/height" if zero[j] else f"lies outside the {_fmt_size(wh[j])} image")
        + "; skipped",
    )  # fmt: skip
    _box_problem(
        t, "box_outside", outside, img_idx, files,
        lambda j: f"box {_fmt_box(boxes[j])} clipped to {_fmt_box(clipped[j])} (image {_fmt_size(wh[j])})",
    )  # fmt: skip

    usable = ok & ~zero & ~gone  # (only boxes of kept images)
    if fix:
        new_boxes = np.where(ok[:, None], clipped, boxes).astype(np.float32)  # clips float noise too
        diff = np.concatenate([r.difficult for r in ds.images] or [np.zeros(0, bool)])
        crowd = np.concatenate([r.iscrowd for r in ds.images] or [np.zeros(0, bool)])
        b, c, d, cr = _group_rows(img_idx[usable], n_img, new_boxes[usable], cls[usable], diff[usable], crowd[usable])
        images = [
            ImageRecord(r.id, r.file, int(size[i, 0]), int(size[i, 1]), b[i], c[i], d[i], cr[i], r.label_file)
            for i, r in enumerate(ds.images)
            if keep_img[i]
        ]
        out = ds.replace(images=images, issues=[])
    else:
        out = ds
    per_class = np.bincount(cls[usable], minlength=K) if K else np.zeros(0, np.int64)
    if not keep_img.any():
        detail = "no usable image" + (" (every image was skipped)" if n_img else "")
        t.add("empty_dataset", ds.root or "<memory>", detail)

    report = ValidationReport(
        dataset=out,
        problems=t.problems,
        fixed=fix,
        images_read=n_img,
        boxes_read=int(counts.sum()),
        boxes_per_class={n: int(c) for n, c in zip(ds.names, per_class)},
    )
    return report.check(strict)


def _box_problem(t: _Tally, kind: str, mask: np.ndarray, img_idx: np.ndarray, files: list[str], detail) -> None:
    """Count ``mask.sum()`` boxes of ``kind``; examples from the first box of up to 5 distinct images."""
    idx = np.flatnonzero(mask)
    if not len(idx):
        return
    per_img = np.bincount(img_idx[idx], minlength=len(files))
    _, first = np.unique(img_idx[idx], return_index=True)
    for j in idx[np.sort(first)[:MAX_EXAMPLES]]:
        more = per_img[img_idx[j]] - 1
        t.add(kind, files[img_idx[j]], detail(j) + (f" (+{more} more in this file)" if more else ""), 0)
    p = t.problems.setdefault(kind, Problem(kind, KINDS[kind].severity))
    p.count += len(idx)
