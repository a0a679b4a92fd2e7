"""Detection datasets in memory, with readers and writers for COCO json, PASCAL VOC xml and Ultralytics YOLO txt.

One small representation serves every format:

* `Dataset`: ``names`` (class names; a class's index is its position), ``images`` (a list of `ImageRecord`),
  ``root`` (where it was read from), ``format`` and ``split``, and ``issues``: the problems a reader met and
  could not represent in the data (an unknown class name, a malformed label line, a missing label file, an
  annotation of an unknown image). Readers never raise for those and never drop anything silently: every
  skipped item is an `Issue`, and `detkd.data.validate.validate_dataset` counts and reports them together
  with the problems it finds in the data itself (boxes outside the image, unreadable images, ...).
* `ImageRecord`: ``id`` (int), ``file`` (absolute path), ``width``/``height`` (pixels as the image is
  *displayed*, i.e. after EXIF rotation, which Ultralytics and ``cv2.imread`` apply; 0 when unknown),
  ``boxes`` float32 ``(n, 4)`` xyxy pixels, ``classes`` int64 ``(n,)``, ``difficult`` bool ``(n,)``,
  ``iscrowd`` bool ``(n,)``, ``label_file`` (the file the boxes came from, for messages).

Readers keep the raw values: a box may lie outside the image and a YOLO class id may be out of range; the
validator clips or skips those and says so.

Format conventions:

* COCO: ``bbox`` is ``[x, y, w, h]`` in pixels -> xyxy ``[x, y, x + w, y + h]``. Classes are the categories
  in increasing ``id`` order (the usual mapping of COCO's 80 ids in 1..90 to indices 0..79). An optional
  per-annotation ``difficult`` (0/1) is read and written, so VOC's flag survives VOC -> COCO -> VOC.
  `write_coco` numbers categories 1..K in class order and keeps image ids.
* VOC: ``Annotations/<id>.xml``, ``JPEGImages/``, ``ImageSets/Main/<split>.txt``. Box corners are taken as
  written (``xmin, ymin, xmax, ymax`` as floats), like MMDetection 3's ``VOCDataset``. (Detectron2 subtracts
  1 from ``xmin``/``ymin``; Ultralytics' VOC script shifts all four by -1.) This matches the VOC devkit
  evaluation in `detkd.eval.voc`, which works on the same raw coordinates.
* YOLO (Ultralytics layout): a data yaml with ``names`` (list or ``{index: name}``) or ``nc``, a ``path``
  root and split entries (a folder, a ``.txt`` list of images, or a list of those), resolved the way
  Ultralytics' ``check_det_dataset`` does. Labels live beside the images with the last ``/images/`` folder
  replaced by ``/labels/`` and the extension by ``.txt``; each line is ``class xc yc w h`` normalised by the
  displayed image size (polygon lines ``class x1 y1 x2 y2 ...`` become their bounding box, as in Ultralytics).
  Image ids come from ``ids.json`` in the dataset root (written by `write_yolo`), else from numeric file
  stems, else 1..N in sorted file order. A label file in a split's ``labels/`` folder without its image is
  recorded as ``orphan_label`` (its boxes are not used by Ultralytics either).
"""

from __future__ import annotations

import difflib
import glob
import json
import logging
import os
import shutil
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import yaml

from detkd.errors import DataError

__all__ = [
    "VOC_CLASSES",
    "IMG_SUFFIXES",
    "Issue",
    "ImageRecord",
    "Dataset",
    "ImageInfo",
    "probe_image",
    "read_coco",
    "read_voc",
    "read_yolo",
    "detect_format",
    "read_dataset",
    "write_yolo",
    "write_coco",
    "yolo_label_path",
]

log = logging.getLogger(__name__)

PathLike = str | os.PathLike

#: The 20 PASCAL VOC classes in the devkit's order.
VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
    "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip

#: Image suffixes Ultralytics loads (``ultralytics.data.utils.IMG_FORMATS``), lower case, no dot.
IMG_SUFFIXES = frozenset(
    {"avif", "bmp", "dng", "heic", "heif", "jp2", "jpeg", "jpg", "mpo", "png", "tif", "tiff", "webp"}
)

IDS_FILE = "ids.json"


# ----------------------------------------------------------------------------------------------------------------
# In-memory representation
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Issue:
    """A problem a reader met: ``kind`` (see `detkd.data.validate.KINDS`), the ``file`` concerned, a ``detail``
    a person can act on, and ``count`` (how many items it covers, e.g. boxes)."""

    kind: str
    file: str
    detail: str
    count: int = 1


@dataclass
class ImageRecord:
    """One image and its boxes. Arrays are coerced to their dtypes and shapes on construction:
    ``boxes`` float32 ``(n, 4)`` xyxy pixels, ``classes`` int64 ``(n,)``, ``difficult``/``iscrowd`` bool ``(n,)``
    (all False when omitted)."""

    id: int
    file: str
    width: int = 0
    height: int = 0
    boxes: np.ndarray | None = None
    classes: np.ndarray | None = None
    difficult: np.ndarray | None = None
    iscrowd: np.ndarray | None = None
    label_file: str | None = None

    def __post_init__(self) -> None:
        self.id = int(self.id)
        self.file = str(self.file)
        self.width, self.height = int(self.width), int(self.height)
        self.boxes = np.zeros((0, 4), np.float32) if self.boxes is None else np.asarray(self.boxes, np.float32)
        if self.boxes.size == 0:
            self.boxes = self.boxes.reshape(0, 4)
        if self.boxes.ndim != 2 or self.boxes.shape[1] != 4:
            raise DataError(f"{self.file}: boxes must have shape (n, 4), got {tuple(self.boxes.shape)}")
        n = len(self.boxes)
        self.classes = np.zeros(0, np.int64) if self.classes is None else np.asarray(self.classes, np.int64).reshape(-1)
        self.difficult = np.zeros(n, bool) if self.difficult is None else np.asarray(self.difficult, bool).reshape(-1)
        self.iscrowd = np.zeros(n, bool) if self.iscrowd is None else np.asarray(self.iscrowd, bool).reshape(-1)
        for name in ("classes", "difficult", "iscrowd"):
            if len(getattr(self, name)) != n:
                raise DataError(f"{self.file}: {n} boxes but {len(getattr(self, name))} {name}; give one per box")

    def __len__(self) -> int:
        return len(self.boxes)


@dataclass
class Dataset:
    """A detection dataset in memory (see the module docstring)."""

    names: list[str]
    images: list[ImageRecord]
    root: str = ""
    format: str = ""
    split: str | None = None
    issues: list[Issue] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return len(self.names)

    @property
    def num_boxes(self) -> int:
        return int(sum(len(r) for r in self.images))

    def replace(self, **changes) -> Dataset:
        return replace(self, **changes)


# ----------------------------------------------------------------------------------------------------------------
# Image headers
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ImageInfo:
    """What a header read tells about an image file: stored ``width``/``height``, PIL ``format`` ('JPEG', 'PNG'),
    ``mode`` ('RGB', 'L', ...), EXIF ``orientation`` (1 = none) and ``truncated`` (a JPEG without its end
    marker; decoders show a grey bottom part)."""

    width: int
    height: int
    format: str
    mode: str
    orientation: int = 1
    truncated: bool = False

    @property
    def display_size(self) -> tuple[int, int]:
        """(width, height) after EXIF rotation: swapped for orientations 5-8 (as Ultralytics' ``exif_size``)."""
        return (self.height, self.width) if self.orientation in (5, 6, 7, 8) else (self.width, self.height)

    @property
    def grayscale(self) -> bool:
        return self.mode in ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")


def probe_image(path: PathLike) -> ImageInfo:
    """Read an image's header (PIL, no full decode) and verify it. Raises `DataError` saying why the file is
    unusable (missing, not an image, damaged header)."""
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    if not p.is_file():
        raise DataError(f"image file not found: {p}")
    try:
        with Image.open(p) as im:
            w, h, fmt, mode = im.width, im.height, im.format or "", im.mode
            im.verify()  # must come right after open
        with Image.open(p) as im:
            try:
                orientation = int(im.getexif().get(274, 1) or 1)
            except Exception:  # broken EXIF block: the pixels may still be fine
                orientation = 1
    except (UnidentifiedImageError, ImportError):  # ImportError: a registered opener (e.g. HEIF) lacks its module
        raise DataError(f"{p}: not a readable image (unknown or damaged file)") from None
    except Exception as e:  # PIL raises many types for damaged files (SyntaxError, OSError, struct.error, ...)
        raise DataError(f"{p}: damaged image ({type(e).__name__}: {e})") from None
    truncated = False
    if fmt in ("JPEG", "MPO"):
        with open(p, "rb") as f:
            f.seek(-2, os.SEEK_END)
            truncated = f.read() != b"\xff\xd9"
    return ImageInfo(w, h, fmt, mode, orientation, truncated)


# ----------------------------------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------------------------------
def _load_yaml(p: Path) -> dict:
    if not p.is_file():
        raise DataError(f"data yaml not found: {p}")
    try:
        d = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise DataError(f"{p}: not valid YAML ({e}); fix the syntax") from None
    if not isinstance(d, dict):
        raise DataError(f"{p}: expected a mapping with 'names', 'train' and 'val' keys")
    return d


def _names_from_yaml(d: dict, p: Path) -> list[str]:
    names = d.get("names")
    if names is None:
        nc = d.get("nc")
        if not isinstance(nc, int) or nc < 1:
            raise DataError(f"{p}: needs 'names' (a list or {{index: name}}) or an integer 'nc'")
        return [f"class_{i}" for i in range(nc)]
    if isinstance(names, dict):
        try:
            names = {int(k): str(v) for k, v in names.items()}
        except (TypeError, ValueError):
            raise DataError(f"{p}: 'names' keys must be class indices 0..K-1, got {list(names)[:5]}") from None
        if sorted(names) != list(range(len(names))):
            raise DataError(f"{p}: 'names' indices must be 0..{len(names) - 1} without gaps, got {sorted(names)}")
        names = [names[i] for i in range(len(names))]
    elif isinstance(names, list):
        names = [str(n) for n in names]
    else:
        raise DataError(f"{p}: 'names' must be a list or a {{index: name}} mapping, not {type(names).__name__}")
    if not names:
        raise DataError(f"{p}: 'names' is empty; list at least one class")
    if "nc" in d and d["nc"] != len(names):
        raise DataError(f"{p}: 'names' has {len(names)} entries but 'nc' is {d['nc']}; make them agree")
    return names


def yolo_label_path(image_file: PathLike) -> str:
    """Ultralytics' ``img2label_paths``: the last ``/images/`` folder becomes ``/labels/``, the suffix ``.txt``."""
    sa, sb = f"{os.sep}images{os.sep}", f"{os.sep}labels{os.sep}"
    return sb.join(os.fspath(image_file).rsplit(sa, 1)).rsplit(".", 1)[0] + ".txt"


def _is_image_name(name: str) -> bool:
    return name.rpartition(".")[-1].lower() in IMG_SUFFIXES


def _int_ids(keys: Sequence[str]) -> list[int] | None:
    """Integer ids from names like '000005' or '2008_000008' (underscores dropped) when all are numeric and
    distinct; else None."""
    digits = [k.replace("_", "") for k in keys]
    if not digits or not all(d.isdigit() for d in digits):
        return None
    ids = [int(d) for d in digits]
    return ids if len(set(ids)) == len(ids) else None


def _assign_ids(keys: Sequence[str], known: dict[str, int]) -> list[int]:
    """Ids for files ``keys`` (stems or relative paths): ``known[key]`` where given; the rest from their numeric
    stems when that gives distinct unused ids, else counting up from the largest id in use."""
    out: list[int | None] = [known.get(k) for k in keys]
    rest = [i for i, v in enumerate(out) if v is None]
    if rest:
        used = {v for v in out if v is not None}
        numeric = _int_ids([Path(keys[i]).stem for i in rest])
        if numeric is not None and not used.intersection(numeric):
            vals = numeric
        else:
            start = max(used, default=0) + 1
            vals = list(range(start, start + len(rest)))
        for i, v in zip(rest, vals):
            out[i] = v
    return [int(v) for v in out]  # type: ignore[arg-type]


def _group_rows(image_index: np.ndarray, n_images: int, *arrays: np.ndarray) -> list[list[np.ndarray]]:
    """Split row-aligned ``arrays`` into per-image pieces by ``image_index`` (stable), one list per array."""
    order = np.argsort(image_index, kind="stable")
    cuts = np.cumsum(np.bincount(image_index, minlength=n_images))[:-1]
    return [np.split(a[order], cuts) for a in arrays]


# ----------------------------------------------------------------------------------------------------------------
# COCO
# ----------------------------------------------------------------------------------------------------------------
def _split_from_json_name(p: Path) -> str:
    stem = p.stem
    return stem[len("instances_") :] if stem.startswith("instances_") else stem


def _guess_coco_images_dir(json_path: Path, file_names: list[str]) -> Path:
    """The folder the ``file_name``s are relative to: the first of ``json_dir``, ``json_dir/images``,
    ``json_dir/..``, ``json_dir/../images`` (each also with ``/<split>``, the split taken from the json name
    ``instances_<split>.json``) that holds most of the first 10 listed files; ``json_dir`` when none does (the
    validator then reports the missing images)."""
    jd = json_path.parent
    split = _split_from_json_name(json_path)
    bases = [jd, jd / "images", jd.parent, jd.parent / "images"]
    cands = [c for b in bases for c in (b, b / split)]
    sample = [f for f in file_names[:10] if f]
    if not sample:
        return jd
    for c in cands:
        if sum((c / f).is_file() for f in sample) * 2 > len(sample):
            return c
    return jd


def read_coco(json_path: PathLike, images_dir: PathLike | None = None) -> Dataset:
    """Read a COCO detection json. ``images_dir``: the folder ``file_name`` is relative to (default: guessed,
    see `_guess_coco_images_dir`). Classes are the categories in increasing id order.

    Never raises for bad annotations: an annotation of an unknown image (``orphan_annotation``), of an unknown
    category (``unknown_class``) or without a 4-number ``bbox`` (``bad_label``) is skipped and recorded in
    ``Dataset.issues``. Raises `DataError` for a missing/invalid file or one that is not a COCO detection file.
    """
    p = Path(json_path).resolve()
    if not p.is_file():
        raise DataError(f"COCO annotation file not found: {p}")
    try:
        with open(p, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{p}: not valid JSON ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DataError(f"{p}: not a COCO detection file (expected a top-level 'images' list)")
    cats = data.get("categories")
    if not isinstance(cats, list) or not cats:
        raise DataError(f"{p}: no 'categories' list; COCO files need one entry {{id, name}} per class")
    try:
        cats = sorted(cats, key=lambda c: int(c["id"]))
        names = [str(c["name"]) for c in cats]
        cat_ids = np.array([int(c["id"]) for c in cats], np.int64)
    except (KeyError, TypeError, ValueError):
        raise DataError(f"{p}: every category needs an integer 'id' and a 'name'") from None
    if len(np.unique(cat_ids)) != len(cat_ids):
        raise DataError(f"{p}: category ids repeat ({cat_ids.tolist()}); each category needs its own id")

    ims = data["images"]
    for i, im in enumerate(ims):
        if not isinstance(im, dict) or "id" not in im or "file_name" not in im:
            raise DataError(f"{p}: images[{i}] needs 'id' and 'file_name'")
    try:
        img_ids = np.array([int(im["id"]) for im in ims], np.int64)
    except (TypeError, ValueError):
        bad = next(im["id"] for im in ims if not str(im["id"]).lstrip("-").isdigit())
        raise DataError(f"{p}: image id {bad!r} is not an integer; detkd needs integer image ids") from None
    file_names = [str(im["file_name"]) for im in ims]
    img_dir = Path(images_dir).resolve() if images_dir is not None else _guess_coco_images_dir(p, file_names)
    if images_dir is not None and not img_dir.is_dir():
        raise DataError(f"images folder not found: {img_dir} (given for {p.name})")

    issues: list[Issue] = []
    anns = data.get("annotations") or []
    if not isinstance(anns, list):
        raise DataError(f"{p}: 'annotations' must be a list")
    anns = [a for a in anns if isinstance(a, dict)]

    def bbox_of(a: dict):
        b = a.get("bbox")
        ok = isinstance(b, (list, tuple)) and len(b) == 4 and all(isinstance(v, (int, float)) for v in b)
        return b if ok else None

    raw = [bbox_of(a) for a in anns]
    good = np.array([b is not None for b in raw], bool)
    for a, b in zip(anns, raw):
        if b is None:
            detail = f"annotation id {a.get('id')}: 'bbox' must be 4 numbers, got {a.get('bbox')!r}; skipped"
            issues.append(Issue("bad_label", str(p), detail))
    anns = [a for a, g in zip(anns, good) if g]
    xywh = np.array([b for b in raw if b is not None], np.float64).reshape(-1, 4)
    try:  # a missing id becomes a sentinel that matches nothing (reported below)
        a_img = np.array([a.get("image_id", -(2**62)) for a in anns], np.int64)
        a_cat = np.array([a.get("category_id", -(2**62)) for a in anns], np.int64)
    except (TypeError, ValueError, OverflowError):
        raise DataError(f"{p}: every annotation's 'image_id' and 'category_id' must be integers") from None
    a_crowd = np.array([bool(a.get("iscrowd", 0)) for a in anns], bool)
    a_diff = np.array([bool(a.get("difficult", 0)) for a in anns], bool)

    # image_id -> record index (first record when ids repeat; the validator reports repeats as an error)
    order = np.argsort(img_ids, kind="stable")
    if len(order):
        pos_c = np.minimum(np.searchsorted(img_ids[order], a_img), len(order) - 1)
        known_img = img_ids[order][pos_c] == a_img
    else:
        pos_c, known_img = np.zeros(len(a_img), np.int64), np.zeros(len(a_img), bool)
    cpos = np.minimum(np.searchsorted(cat_ids, a_cat), len(cat_ids) - 1)
    known_cat = cat_ids[cpos] == a_cat
    for j in np.flatnonzero(~known_img):
        detail = f"annotation id {anns[j].get('id')}: image_id {a_img[j]} is not in 'images'; skipped"
        issues.append(Issue("orphan_annotation", str(p), detail))
    for j in np.flatnonzero(known_img & ~known_cat):
        detail = f"category_id {a_cat[j]} is not in 'categories' (annotation id {anns[j].get('id')}); box skipped"
        issues.append(Issue("unknown_class", file_names[order[pos_c[j]]], detail))
    keep = known_img & known_cat
    rec = order[pos_c[keep]] if len(order) else np.zeros(0, np.int64)
    xyxy = np.concatenate([xywh[keep, :2], xywh[keep, :2] + xywh[keep, 2:]], 1)
    boxes, cls, crowd, diff = _group_rows(rec, len(ims), xyxy, cpos[keep], a_crowd[keep], a_diff[keep])

    records = [
        ImageRecord(
            id=img_ids[i],
            file=str(img_dir / fn),
            width=int(im.get("width") or 0),
            height=int(im.get("height") or 0),
            boxes=boxes[i],
            classes=cls[i],
            difficult=diff[i],
            iscrowd=crowd[i],
            label_file=str(p),
        )
        for i, (im, fn) in enumerate(zip(ims, file_names))
    ]
    return _finish(Dataset(names, records, str(p), "coco", _split_from_json_name(p), issues))


def _finish(ds: Dataset) -> Dataset:
    if ds.issues:
        kinds = sorted({i.kind for i in ds.issues})
        msg = "%s: %d problem(s) while reading (%s); run `detkd data validate` for details"
        log.warning(msg, ds.root, len(ds.issues), ", ".join(kinds))
    return ds


# ----------------------------------------------------------------------------------------------------------------
# PASCAL VOC
# ----------------------------------------------------------------------------------------------------------------
def _voc_year_dir(voc_root: Path, year: str | None) -> Path:
    if year:
        d = voc_root / year if (voc_root / year).is_dir() else voc_root / f"VOC{year}"
        if not (d / "Annotations").is_dir():
            raise DataError(f"no Annotations/ folder in {d}; expected a VOC year folder such as VOCdevkit/VOC2007")
        return d
    if (voc_root / "Annotations").is_dir():
        return voc_root
    cands = sorted(d for d in voc_root.glob("*") if (d / "Annotations").is_dir())
    if len(cands) == 1:
        return cands[0]
    if not cands:
        raise DataError(f"{voc_root}: not a VOC folder (no Annotations/ here or in a VOC20xx/ subfolder)")
    years = ", ".join(c.name for c in cands)
    raise DataError(f"{voc_root} holds several VOC years ({years}); pass year='{cands[0].name}'")


def _parse_voc_xml(xml_path: Path):
    """(filename, width, height, objects) with objects a list of (name, difficult, [xmin, ymin, xmax, ymax] or
    None). Raises ET.ParseError / OSError for unreadable files."""
    root = ET.parse(xml_path).getroot()
    size = root.find("size")

    def num(node, tag, default=0.0):
        t = node.findtext(tag) if node is not None else None
        return float(t) if t not in (None, "") else default

    w, h = int(num(size, "width")), int(num(size, "height"))
    objs = []
    for obj in root.iter("object"):
        name = (obj.findtext("name") or "").strip()
        diff = (obj.findtext("difficult") or "0").strip() in ("1", "true", "True")
        bb = obj.find("bndbox")
        try:
            box = [float(bb.findtext(t)) for t in ("xmin", "ymin", "xmax", "ymax")] if bb is not None else None
        except (TypeError, ValueError):
            box = None
        objs.append((name, diff, box))
    return (root.findtext("filename") or "").strip(), w, h, objs


def read_voc(
    voc_root: PathLike,
    split: str | None = "trainval",
    names: Sequence[str] | str | None = None,
    year: str | None = None,
) -> Dataset:
    """Read PASCAL VOC: ``<year>/Annotations/*.xml``, ``<year>/JPEGImages/``, ``<year>/ImageSets/Main/<split>.txt``.

    ``voc_root``: a year folder (``VOCdevkit/VOC2007``) or a folder holding exactly one (else pass ``year``).
    ``split``: the ImageSets list to read (``train``, ``val``, ``trainval``, ``test``); None or ``'all'`` reads
    every xml (``--split all`` on the command line; an ``ImageSets/Main/all.txt``, if there is one, wins).
    ``names``: None -> the 20 VOC classes when the data uses at least one of them (any other name is then
    reported as ``unknown_class`` and its boxes skipped: a typo such as ``persn`` never becomes a class of its
    own), else (no VOC name at all: a custom dataset) the data's names sorted; ``'voc'`` -> the 20 VOC classes;
    ``'data'`` -> the data's names sorted; or an explicit list (``--names a,b,c``). Objects of other classes are
    skipped and recorded (``unknown_class``), the first object of each unknown name first. ``difficult`` is kept
    per box. Image ids: the numeric ids (``000005`` -> 5, ``2008_000008`` -> 2008000008), else 1..N in list order.
    """
    d = _voc_year_dir(Path(voc_root).resolve(), year)
    lists = d / "ImageSets" / "Main"
    if split is None or (split == "all" and not (lists / "all.txt").is_file()):
        stems = sorted(x.stem for x in (d / "Annotations").glob("*.xml"))
    else:
        lst = lists / f"{split}.txt"
        if not lst.is_file():
            have = sorted(x.stem for x in lists.glob("*.txt") if "_" not in x.stem)
            have_s = ", ".join(have) or "none"
            pick = f"pass one with --split {have[0]} (Python: split='{have[0]}'), or" if have else "pass"
            raise DataError(
                f"VOC split list not found: {lst}; available: {have_s}; {pick} --split all to read every xml in "
                f"Annotations/ (Python: split=None)"
            )
        stems = [ln.split()[0] for ln in lst.read_text(encoding="utf-8").splitlines() if ln.strip()]
    if not stems:
        raise DataError(f"{d}: the {split or 'Annotations'} list is empty")

    issues: list[Issue] = []
    parsed = []
    for s in stems:
        xml = d / "Annotations" / f"{s}.xml"
        if not xml.is_file():
            detail = f"no annotation file for image id {s}; image kept as background"
            issues.append(Issue("missing_label", str(xml), detail))
            parsed.append((f"{s}.jpg", 0, 0, [], str(xml)))
            continue
        try:
            fn, w, h, objs = _parse_voc_xml(xml)
        except (ET.ParseError, OSError, ValueError) as e:
            issues.append(Issue("bad_label", str(xml), f"unreadable xml ({e}); image skipped"))
            continue
        parsed.append((fn or f"{s}.jpg", w, h, objs, str(xml)))

    found = sorted({o[0] for *_, objs, _x in parsed for o in objs if o[0]})
    default_voc = names is None and (not found or bool(set(found) & set(VOC_CLASSES)))
    if names is None:
        names = list(VOC_CLASSES) if default_voc else found
    elif names == "voc":
        names = list(VOC_CLASSES)
    elif names == "data":
        names = found
    elif isinstance(names, str):
        raise DataError(f"read_voc names={names!r}: use None, 'voc', 'data' or a list of class names")
    names = [str(n) for n in names]
    if not names:
        raise DataError(f"{d}: no objects found and no class names given")
    index = {n: i for i, n in enumerate(names)}

    ids = _int_ids([Path(fn).stem for fn, *_ in parsed]) or list(range(1, len(parsed) + 1))
    records = []
    first_unknown: dict[str, Issue] = {}  # the first box of each unknown name goes first in the issues, so the
    more_unknown: list[Issue] = []  # report's examples name every unknown name

    def unknown_detail(name: str) -> str:
        close = difflib.get_close_matches(name, names, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        if default_voc:
            return (f"class name '{name}' is not one of the 20 VOC classes{hint}; box skipped (pass --names data, "
                    "Python names='data', to make every name found a class)")  # fmt: skip
        return f"class name '{name}' is not in the class list{hint}; box skipped"

    for rid, (fn, w, h, objs, xml) in zip(ids, parsed):
        img = str(d / "JPEGImages" / fn)
        rows = []
        for name, diff, box in objs:
            if box is None:
                issues.append(Issue("bad_label", xml, f"object '{name}' has no numeric bndbox; skipped"))
            elif name not in index:
                iss = Issue("unknown_class", xml, unknown_detail(name))
                if name in first_unknown:
                    more_unknown.append(iss)
                else:
                    first_unknown[name] = iss
            else:
                rows.append((box, index[name], diff))
        records.append(
            ImageRecord(
                id=rid,
                file=img,
                width=w,
                height=h,
                boxes=np.array([r[0] for r in rows], np.float32).reshape(-1, 4),
                classes=[r[1] for r in rows],
                difficult=[r[2] for r in rows],
                label_file=xml,
            )
        )
    issues += list(first_unknown.values()) + more_unknown
    return _finish(Dataset(names, records, str(d), "voc", split, issues))


# ----------------------------------------------------------------------------------------------------------------
# YOLO (Ultralytics)
# ----------------------------------------------------------------------------------------------------------------
def _yolo_root(d: dict, yaml_path: Path) -> Path:
    """Ultralytics' dataset root: ``path`` (relative: to the working directory if that exists, else to the yaml's
    folder), or the yaml's folder when ``path`` is absent. (Ultralytics would next try its ``datasets_dir``.)"""
    p = d.get("path")
    if not p:
        return yaml_path.parent
    p = Path(str(p))
    if p.is_absolute():
        return p
    for base in (Path.cwd(), yaml_path.parent):
        if (base / p).exists():
            return (base / p).resolve()
    raise DataError(f"{yaml_path}: dataset root path '{p}' not found (relative to {Path.cwd()} or {yaml_path.parent})")


def _yolo_image_files(entry, root: Path, yaml_path: Path, split: str) -> list[str]:
    """Image files of a split entry (a folder, a .txt list, an image, or a list of those), as Ultralytics'
    ``check_det_dataset`` + ``get_img_files`` resolve them."""
    files: list[str] = []
    for e in entry if isinstance(entry, list) else [entry]:
        x = (root / str(e)).resolve()
        if not x.exists() and str(e).startswith("../"):
            x = (root / str(e)[3:]).resolve()
        if x.is_dir():
            files += glob.glob(str(Path(glob.escape(str(x))) / "**" / "*.*"), recursive=True)
        elif x.is_file() and x.suffix.lower() == ".txt":
            for ln in filter(None, (t.strip() for t in x.read_text(encoding="utf-8-sig").splitlines())):
                q = Path(ln)
                if ln.startswith("./"):  # relative to the list file (Ultralytics)
                    q = x.parent / ln[2:]
                elif not q.is_absolute() and not q.exists():
                    q = x.parent / ln  # Ultralytics: relative to the cwd only; detkd also tries the list's folder
                files.append(str(q))
        elif x.is_file():
            files.append(str(x))
        else:
            raise DataError(f"{yaml_path}: '{split}: {e}' -> {x} does not exist; fix the path or the 'path' key")
    return sorted(os.path.abspath(f) for f in files if _is_image_name(f))


def _parse_yolo_label(lbl: Path) -> tuple[np.ndarray, list[Issue]]:
    """Rows ``(cls, xc, yc, w, h)`` float64 from a YOLO label file; polygon rows become their bounding box.
    Malformed lines (wrong column count, not numbers, fractional class) are skipped as ``bad_label``."""
    issues: list[Issue] = []
    lines = [ln.split() for ln in lbl.read_text(encoding="utf-8-sig").splitlines()]
    lines = [(i + 1, t) for i, t in enumerate(lines) if t]
    if lines and all(len(t) == 5 for _, t in lines):
        try:
            rows = np.array([t for _, t in lines], np.float64)
            lines = []
        except ValueError:
            rows = None
    else:
        rows = None
    if rows is None:  # slow path: line by line with messages
        out = []
        for no, t in lines:
            try:
                v = np.array(t, np.float64)
            except ValueError:
                detail = f"line {no}: not numbers ({' '.join(t)[:60]}); line skipped"
                issues.append(Issue("bad_label", str(lbl), detail))
                continue
            if len(v) == 5:
                out.append(v)
            elif len(v) >= 7 and len(v) % 2 == 1:  # polygon: class x1 y1 x2 y2 ...
                xy = v[1:].reshape(-1, 2)
                lo, hi = xy.min(0), xy.max(0)
                out.append(np.array([v[0], *(lo + hi) / 2, *(hi - lo)]))
            else:
                detail = f"line {no}: expected 5 numbers (class xc yc w h), got {len(v)}; line skipped"
                issues.append(Issue("bad_label", str(lbl), detail))
        rows = np.array(out, np.float64).reshape(-1, 5)
    frac = rows[:, 0] != np.round(rows[:, 0])
    for c in rows[frac, 0][:5]:
        issues.append(Issue("bad_label", str(lbl), f"class {c:g} is not an integer; box skipped"))
    if frac.sum() > 5:
        issues.append(Issue("bad_label", str(lbl), "non-integer classes; boxes skipped", int(frac.sum() - 5)))
    return rows[~frac], issues


def read_yolo(data_yaml: PathLike, split: str = "val") -> Dataset:
    """Read an Ultralytics YOLO detection dataset split (see the module docstring for the layout).

    Image sizes come from header reads (EXIF rotation applied, as Ultralytics does); an unreadable image gets
    size 0x0 and its boxes collapse to zeros (the validator skips it with its boxes and says so). A missing label
    file means a background image, as in Ultralytics, and is recorded as ``missing_label``. Class ids are kept as
    written (the validator skips out-of-range ones); coordinates are kept even outside [0, 1] (the validator
    clips them; Ultralytics would drop the whole image).
    """
    yp = Path(data_yaml).resolve()
    d = _load_yaml(yp)
    names = _names_from_yaml(d, yp)
    if split not in d and split == "val" and "validation" in d:
        split = "validation"
    if not d.get(split):
        have = [k for k in ("train", "val", "test", "minival") if d.get(k)]
        raise DataError(f"{yp}: no '{split}:' entry; this yaml has {', '.join(have) or 'no splits'}")
    root = _yolo_root(d, yp)
    files = _yolo_image_files(d[split], root, yp, split)
    if not files:
        sfx = ", ".join(sorted(IMG_SUFFIXES))
        raise DataError(f"{yp}: no images found for '{split}: {d[split]}' (looked for {sfx})")

    known: dict[str, int] = {}
    idf = root / IDS_FILE
    if idf.is_file():
        try:
            known = {str(k): int(v) for k, v in json.loads(idf.read_text(encoding="utf-8")).items()}
        except (json.JSONDecodeError, TypeError, ValueError, AttributeError):
            msg = f"{idf}: expected a JSON object {{relative image path: integer id}}; fix or delete it"
            raise DataError(msg) from None

    def key(f: str) -> str:
        try:
            return Path(f).relative_to(root).as_posix()
        except ValueError:
            return Path(f).as_posix()

    ids = _assign_ids([key(f) for f in files], known)

    issues: list[Issue] = []
    records = []
    for rid, f in zip(ids, files):
        lbl = Path(yolo_label_path(f))
        try:
            w, h = probe_image(f).display_size
        except DataError:
            w = h = 0
        if not lbl.is_file():
            detail = f"no label file for {Path(f).name}; image kept as background"
            issues.append(Issue("missing_label", str(lbl), detail))
            rows = np.zeros((0, 5))
        else:
            try:
                rows, bad = _parse_yolo_label(lbl)
            except (OSError, UnicodeDecodeError) as e:  # labels unknown: not a background image either
                issues.append(Issue("bad_label", str(lbl), f"unreadable label file ({e}); image skipped"))
                continue
            issues += bad
        scale = np.array([w, h, w, h], np.float64)
        xc, yc, bw, bh = rows[:, 1:].T
        xyxy = np.stack([xc - bw / 2, yc - bh / 2, xc + bw / 2, yc + bh / 2], 1) * scale
        records.append(ImageRecord(rid, f, w, h, xyxy, rows[:, 0].astype(np.int64), label_file=str(lbl)))
    issues += _orphan_labels(d[split], root, files)
    return _finish(Dataset(names, records, str(root), "yolo", split, issues))


def _orphan_labels(entry, root: Path, files: list[str]) -> list[Issue]:
    """``orphan_label`` issues: label files in the ``labels/`` folder of a split's image folder that belong to no
    image of the split (the image was deleted or renamed, or has a suffix Ultralytics does not load). Only
    folder entries are checked (a ``.txt`` image list may select part of a folder on purpose), and only when
    the labels live in a separate ``labels/`` tree."""
    expected = {os.path.normcase(os.path.abspath(yolo_label_path(f))) for f in files}
    out: list[Issue] = []
    for e in entry if isinstance(entry, list) else [entry]:
        img_dir = (root / str(e)).resolve()
        if not img_dir.is_dir() and str(e).startswith("../"):
            img_dir = (root / str(e)[3:]).resolve()
        if not img_dir.is_dir():
            continue
        lbl_dir = Path(yolo_label_path(str(img_dir / "x.jpg"))).parent
        if lbl_dir == img_dir or not lbl_dir.is_dir():
            continue
        for lbl in sorted(glob.glob(str(Path(glob.escape(str(lbl_dir))) / "**" / "*.txt"), recursive=True)):
            if os.path.normcase(os.path.abspath(lbl)) in expected or Path(lbl).name == "classes.txt":
                continue
            rel = Path(lbl).relative_to(lbl_dir).with_suffix("")
            others = sorted(p.name for p in (img_dir / rel).parent.glob(glob.escape(rel.name) + ".*"))
            try:
                n = sum(1 for ln in Path(lbl).read_text(encoding="utf-8-sig").splitlines() if ln.strip())
            except (OSError, UnicodeDecodeError):
                n = 0
            try:
                where = (img_dir / rel).relative_to(root).as_posix() + ".*"
            except ValueError:
                where = (img_dir / rel).as_posix() + ".*"
            if others:
                why = f"no image Ultralytics loads for this label file ({', '.join(others)} has another suffix)"
            else:
                why = f"no image for this label file (looked for {where})"
            out.append(Issue("orphan_label", lbl, f"{why}; its {n} box(es) are not used"))
    return out


# ----------------------------------------------------------------------------------------------------------------
# Dispatch
# ----------------------------------------------------------------------------------------------------------------
def detect_format(path: PathLike) -> str:
    """'coco' (a .json file, or a folder with one), 'yolo' (a .yaml file, or a folder with one) or 'voc' (a folder
    with ``Annotations/`` or a ``VOC20xx/Annotations/`` subfolder). Raises `DataError` otherwise."""
    p = Path(path)
    if p.is_file():
        if p.suffix.lower() == ".json":
            return "coco"
        if p.suffix.lower() in (".yaml", ".yml"):
            return "yolo"
        raise DataError(f"{p}: unknown dataset file; give a COCO .json, an Ultralytics data .yaml or a VOC folder")
    if not p.is_dir():
        raise DataError(f"dataset not found: {p}")
    if (p / "Annotations").is_dir() or any((d / "Annotations").is_dir() for d in p.glob("*")):
        return "voc"
    if list(p.glob("*.yaml")) + list(p.glob("*.yml")):
        return "yolo"
    if list(p.glob("*.json")) + list(p.glob("annotations/*.json")):
        return "coco"
    raise DataError(
        f"{p}: cannot tell the dataset format; expected a data .yaml (YOLO), a COCO .json (here or in annotations/) "
        "or Annotations/ + JPEGImages/ (VOC)"
    )


def _pick(cands: list[Path], split: str, what: str, where: Path) -> Path:
    if len(cands) == 1:
        return cands[0]
    for c in cands:
        if split and split in c.stem:
            return c
    if not cands:
        raise DataError(f"{where}: no {what} found")
    raise DataError(f"{where}: several {what} files ({', '.join(c.name for c in cands)}); pass one of them")


def read_dataset(path: PathLike, split: str = "val", **kwargs) -> Dataset:
    """Read a dataset in any supported format (`detect_format`). ``split`` selects the YOLO yaml entry, the VOC
    ImageSets list, or (for a COCO folder with several jsons) the json whose name contains it. ``kwargs`` go to
    the reader (``images_dir`` for COCO, ``names``/``year`` for VOC)."""
    p = Path(path)
    fmt = detect_format(p)
    if fmt != "voc" and kwargs.get("names") is not None:
        where = "its 'categories'" if fmt == "coco" else "the data yaml's 'names'"
        raise DataError(
            f"{p}: a class list (--names) applies to VOC data only; a {fmt.upper()} dataset takes its classes "
            f"from {where}"
        )
    kwargs = {k: v for k, v in kwargs.items() if not (k == "names" and v is None and fmt != "voc")}
    if fmt == "coco":
        if p.is_dir():
            p = _pick(sorted(p.glob("*.json")) + sorted(p.glob("annotations/*.json")), split, "COCO json", p)
        return read_coco(p, **kwargs)
    if fmt == "yolo":
        if p.is_dir():
            p = p / "data.yaml" if (p / "data.yaml").is_file() else _pick(sorted(p.glob("*.y*ml")), "", "data yaml", p)
        return read_yolo(p, split, **kwargs)
    return read_voc(p, split, **kwargs)


# ----------------------------------------------------------------------------------------------------------------
# Writers
# ----------------------------------------------------------------------------------------------------------------
def _place(src: Path, dst: Path, mode: str) -> None:
    """Put ``src`` at ``dst`` by hard link (falling back to a copy across devices), symlink or copy; ``'auto'``: a
    hard link, else a symlink, else a copy."""
    if not src.is_file():
        raise DataError(f"image file not found: {src}; run `detkd data validate` (fix=True) before writing")
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists() or dst.is_symlink():
        if dst.exists() and os.path.samefile(src, dst):
            return
        dst.unlink()
    if mode in ("hardlink", "auto"):
        try:
            os.link(src, dst)
            return
        except OSError:
            pass
    if mode == "auto":
        try:
            os.symlink(src.resolve(), dst)
            return
        except OSError:
            pass
    elif mode == "symlink":
        os.symlink(src.resolve(), dst)
        return
    shutil.copy2(src, dst)


def _relative_paths(files: list[str]) -> list[Path]:
    """Paths relative to the files' common folder (keeps sub-folders, so equal names cannot collide)."""
    if not files:
        return []
    common = os.path.commonpath([os.path.dirname(os.path.abspath(f)) for f in files])
    return [Path(os.path.relpath(os.path.abspath(f), common)) for f in files]


def _check_writable(ds: Dataset) -> None:
    if not ds.images:
        raise DataError("the dataset has no images; nothing to write")
    bad = [r.file for r in ds.images if r.width <= 0 or r.height <= 0]
    if bad:
        msg = f"{len(bad)} image(s) without a known size, e.g. {bad[0]}; run validate_dataset(fix=True) first"
        raise DataError(msg)
    ids = np.array([r.id for r in ds.images])
    if len(np.unique(ids)) != len(ids):
        raise DataError("image ids repeat; run `detkd data validate` to see which")


def write_yolo(
    dataset: Dataset,
    out_dir: PathLike,
    split: str = "train",
    link: str = "hardlink",
    include_crowd: bool = False,
) -> dict:
    """Write an Ultralytics YOLO split: ``out_dir/images/<split>/...`` (hard links, falling back to copies;
    ``link='copy'``, ``'symlink'`` or ``'auto'`` (hard link, else symlink, else copy) to choose),
    ``out_dir/labels/<split>/....txt`` (``class xc yc w h``, normalised, 8 significant digits; an empty file for a
    background image), ``out_dir/data.yaml`` (``names`` in class order, ``train``/``val`` entries; no ``download``
    and no ``path`` key, so Ultralytics resolves paths from the yaml's folder and the folder can move) and
    ``out_dir/ids.json`` (relative image path -> image id, read back by `read_yolo`). Writing a second split into
    the same folder adds it to both files; class names must agree. While only one split exists, ``train`` and
    ``val`` both point at it (Ultralytics requires both keys).

    Boxes are written as they are; run the validator first (it clips boxes to the image, as Ultralytics
    rejects a whole image with a coordinate above 1.01). Crowd boxes are left out unless ``include_crowd``, as
    in Ultralytics' ``convert_coco``; YOLO has no ``difficult`` flag, so difficult boxes are written as
    ordinary boxes. Images already in ``images/<split>`` that are not part of ``dataset`` are left alone and
    counted (``stale_images``, with a logged warning). Returns ``{'data_yaml', 'images', 'boxes', 'crowd_skipped',
    'stale_images'}``.
    """
    if link not in ("hardlink", "copy", "symlink", "auto"):
        raise DataError(f"link={link!r}: use 'hardlink', 'copy', 'symlink' or 'auto'")
    _check_writable(dataset)
    out = Path(out_dir).resolve()
    yml = out / "data.yaml"
    meta = _load_yaml(yml) if yml.is_file() else {}
    if meta and _names_from_yaml(meta, yml) != list(dataset.names):
        other = _names_from_yaml(meta, yml)
        raise DataError(f"{yml} already lists other class names ({other}); write to a new folder")

    rel = _relative_paths([r.file for r in dataset.images])
    n = np.array([len(r) for r in dataset.images])
    boxes = np.concatenate([r.boxes for r in dataset.images]).astype(np.float64)
    cls = np.concatenate([r.classes for r in dataset.images])
    crowd = np.concatenate([r.iscrowd for r in dataset.images])
    size = np.repeat(np.array([[r.width, r.height] for r in dataset.images], np.float64), n, 0)
    xywhn = np.concatenate([(boxes[:, :2] + boxes[:, 2:]) / 2, boxes[:, 2:] - boxes[:, :2]], 1) / np.tile(size, 2)
    keep = ~crowd if not include_crowd else np.ones(len(cls), bool)
    img_idx = np.repeat(np.arange(len(n)), n)
    (xywhn_i, cls_i) = _group_rows(img_idx[keep], len(n), xywhn[keep], cls[keep])

    ids = {}
    for r, rp, xy, c in zip(dataset.images, rel, xywhn_i, cls_i):
        img_dst = out / "images" / split / rp
        _place(Path(r.file), img_dst, link)
        lbl = Path(yolo_label_path(img_dst))
        lbl.parent.mkdir(parents=True, exist_ok=True)
        with open(lbl, "w", encoding="utf-8") as f:
            if len(c):
                np.savetxt(f, np.column_stack([c, xy]), fmt=["%d"] + ["%.8g"] * 4)
        ids[img_dst.relative_to(out).as_posix()] = r.id

    split_dir = out / "images" / split
    stale = sorted(
        q for q in glob.glob(str(split_dir / "**" / "*.*"), recursive=True)
        if _is_image_name(q) and Path(q).relative_to(out).as_posix() not in ids
    )  # fmt: skip
    if stale:  # Ultralytics would train on them too; detkd never deletes files it did not write
        log.warning("%s: %d image(s) not in this dataset, e.g. %s; delete them or write to a new folder",
                    split_dir, len(stale), stale[0])  # fmt: skip

    idf = out / IDS_FILE
    old = json.loads(idf.read_text(encoding="utf-8")) if idf.is_file() else {}
    old = {k: v for k, v in old.items() if not k.startswith(f"images/{split}/")}
    idf.write_text(json.dumps({**old, **ids}, indent=0), encoding="utf-8")

    meta.pop("download", None)
    meta.pop("path", None)
    meta[split] = f"images/{split}"
    meta.setdefault("train", f"images/{split}")
    meta.setdefault("val", f"images/{split}")
    meta["names"] = dict(enumerate(dataset.names))
    meta.pop("nc", None)
    header = "# Ultralytics YOLO data file written by detkd (paths relative to this file's folder)\n"
    yml.write_text(header + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return {
        "data_yaml": str(yml),
        "images": len(ids),
        "boxes": int(keep.sum()),
        "crowd_skipped": int((~keep).sum()),
        "stale_images": len(stale),
    }


def write_coco(dataset: Dataset, json_path: PathLike, images_dir: PathLike | None = None) -> dict:
    """Write a COCO detection json: categories ``1..K`` in class order, image ids kept, annotation ids
    ``1..N``, ``bbox`` ``[x, y, w, h]``, ``area`` ``w*h``, ``iscrowd`` and ``difficult`` (0/1) per annotation.
    ``file_name`` is relative to ``images_dir`` (default: the json's folder) when the image lies under it, else
    the absolute path (which `read_coco` accepts). Returns ``{'json', 'images', 'boxes'}``."""
    _check_writable(dataset)
    jp = Path(json_path).resolve()
    base = Path(images_dir).resolve() if images_dir is not None else jp.parent

    def fname(f: str) -> str:
        try:
            return Path(f).resolve().relative_to(base).as_posix()
        except ValueError:
            return Path(f).resolve().as_posix()

    images = [{"id": r.id, "file_name": fname(r.file), "width": r.width, "height": r.height} for r in dataset.images]
    n = np.array([len(r) for r in dataset.images])
    boxes = np.concatenate([r.boxes for r in dataset.images]).astype(np.float64)
    xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], 1)
    img_id = np.repeat(np.array([r.id for r in dataset.images], np.int64), n)
    cat = np.concatenate([r.classes for r in dataset.images]) + 1
    crowd = np.concatenate([r.iscrowd for r in dataset.images]).astype(int)
    diff = np.concatenate([r.difficult for r in dataset.images]).astype(int)
    area = xywh[:, 2] * xywh[:, 3]
    keys = ("image_id", "category_id", "bbox", "area", "iscrowd", "difficult")
    cols = (img_id, cat, xywh, area, crowd, diff)
    anns = [{"id": i, **dict(zip(keys, row))} for i, row in enumerate(zip(*(c.tolist() for c in cols)), 1)]
    cats = [{"id": i + 1, "name": n_, "supercategory": ""} for i, n_ in enumerate(dataset.names)]
    out = {"info": {"description": "written by detkd"}, "images": images, "annotations": anns, "categories": cats}
    jp.parent.mkdir(parents=True, exist_ok=True)
    tmp = jp.with_name(f".{jp.name}.tmp")
    tmp.write_text(json.dumps(out), encoding="utf-8")
    os.replace(tmp, jp)
    return {"json": str(jp), "images": len(images), "boxes": len(anns)}
