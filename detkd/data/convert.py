"""`detkd data convert`: read a COCO / VOC / YOLO dataset, validate it (fixing what can be fixed), write YOLO or COCO.

Class names and their order, image ids, boxes and the ``difficult`` / ``iscrowd`` flags are kept:

* COCO -> YOLO -> COCO gives the same image ids (through ``ids.json``, see `write_yolo`), the same class
  order (categories renumbered ``1..K`` in that order) and the same boxes to float precision (labels are
  written with 8 significant digits, well under 1e-3 px for images up to 10k px).
* VOC -> COCO keeps each box's ``difficult`` flag (as a ``difficult`` 0/1 key per annotation).
* YOLO has no ``difficult`` flag, so difficult boxes become ordinary boxes there; crowd boxes are left out
  of YOLO labels (as Ultralytics' ``convert_coco`` does) and counted in the result.

Conversion always validates first with ``fix=True`` (boxes clipped to the image, bad items skipped, each
counted in ``result.report``); errors (e.g. repeated image ids) stop it with a `DataError`, and so do
warnings with ``strict=True``.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, replace
from pathlib import Path

from detkd.data.formats import PathLike, _place, _relative_paths, write_coco, write_yolo
from detkd.data.validate import ValidationReport, validate_dataset
from detkd.errors import DataError

__all__ = ["FORMATS", "ConvertResult", "convert"]

#: Formats `convert` writes.
FORMATS = ("yolo", "coco")


@dataclass
class ConvertResult:
    """``output``: the data.yaml or json written; ``report``: the validation of the source; counts written."""

    output: Path
    report: ValidationReport
    images: int
    boxes: int
    crowd_skipped: int = 0
    stale_images: int = 0

    def summary(self) -> str:
        extra = f", {self.crowd_skipped} crowd box(es) left out (YOLO has no crowd flag)" if self.crowd_skipped else ""
        if self.stale_images:
            extra += f"; {self.stale_images} older image(s) in the output split are not part of this dataset"
        return f"{self.report.summary()}\nwrote {self.output}: {self.images} images, {self.boxes} boxes{extra}"


def convert(
    src: PathLike,
    dst: PathLike,
    to: str = "yolo",
    split: str = "val",
    out_split: str | None = None,
    strict: bool = False,
    link: str = "hardlink",
    **read_kwargs,
) -> ConvertResult:
    """Convert a dataset split.

    Args:
        src: anything `read_dataset` reads (COCO json or folder, VOC folder, YOLO data yaml or folder), or a
            `Dataset`.
        dst: ``to='yolo'``: the output folder (``images/``, ``labels/``, ``data.yaml``, ``ids.json``).
            ``to='coco'``: a ``.json`` path (images stay where they are; ``file_name`` relative to the json's
            folder when possible), or a folder that receives ``annotations/instances_<split>.json`` and the
            images under ``images/<split>/``.
        to: ``'yolo'`` or ``'coco'``.
        split: the source split (YOLO yaml entry, VOC ImageSets list, COCO json name in a folder).
        out_split: the split name written (default: ``split``).
        strict: stop on validation warnings too.
        link: how images are placed: ``'hardlink'`` (falls back to a copy), ``'copy'`` or ``'symlink'``.
        read_kwargs: passed to the reader (``images_dir`` for COCO; ``names``, ``year`` for VOC).
    """
    to = str(to).lower()
    if to not in FORMATS:
        close = difflib.get_close_matches(to, FORMATS, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise DataError(f"convert to={to!r}: unknown format{hint} (choose from {', '.join(FORMATS)})")
    out_split = out_split or split
    report = validate_dataset(src, strict=strict, fix=True, split=split, **read_kwargs)
    clean = report.dataset
    dst = Path(dst)
    if to == "yolo":
        w = write_yolo(clean, dst, split=out_split, link=link)
        return ConvertResult(
            Path(w["data_yaml"]), report, w["images"], w["boxes"], w["crowd_skipped"], w["stale_images"]
        )
    if dst.suffix.lower() == ".json":
        w = write_coco(clean, dst)
    else:
        img_dir = (dst / "images" / out_split).resolve()
        rel = _relative_paths([r.file for r in clean.images])
        images = []
        for r, rp in zip(clean.images, rel):
            _place(Path(r.file), img_dir / rp, link)
            images.append(replace(r, file=str(img_dir / rp)))
        json_path = dst / "annotations" / f"instances_{out_split}.json"
        w = write_coco(clean.replace(images=images), json_path, images_dir=img_dir)
    return ConvertResult(Path(w["json"]), report, w["images"], w["boxes"])
