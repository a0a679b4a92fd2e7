"""`data:` for training: an Ultralytics data yaml, a COCO json / folder or a VOC root, as an Ultralytics data yaml.

`as_ultralytics_data(source)` is what `detkd train` (and so `detkd sweep`) and `detkd pseudo-label --merge` call on
their ``data``. It accepts:

* an Ultralytics data yaml (``.yaml`` / ``.yml``), or a folder holding ``data.yaml``: returned as it is (the trainer
  checks it);
* COCO: a folder with ``annotations/instances_train*.json`` and ``annotations/instances_val*.json`` (or the two jsons
  in the folder itself; ``instances_train2017.json`` counts); a json named ``instances_train*.json`` whose
  ``instances_val*`` sibling exists; or the mapping ``{train: TRAIN.json, val: VAL.json}`` (each value may be any
  dataset `detkd.data.formats.read_dataset` reads; its split of that name is used). A single json without a val
  split is refused, saying how to give one;
* PASCAL VOC: a year folder (``VOCdevkit/VOC2007``: ``Annotations/``, ``JPEGImages/``, ``ImageSets/Main/``), a
  ``VOCdevkit`` holding several years, or the folder above ``VOCdevkit``. The split rule: when a year has an
  annotated ``test`` list (VOC2007 with its test set), train = the ``trainval`` list of every year and val = that
  ``test`` list (the usual "07+12 trainval, 07 test" protocol); otherwise train = the ``train`` list of every year
  and val = the ``val`` list of every year (``trainval`` is ``train`` + ``val``, so taking it would put the val
  images in training). Classes: the 20 VOC classes in the devkit's order when the data uses any of them (other
  names are reported and skipped, as `detkd data validate` does), else every name found, sorted.

A COCO / VOC source is read, validated (``fix=True``: boxes clipped, bad items skipped, each counted; the same
`detkd.data.validate.ValidationReport` and summary text as ``detkd data validate``) and written in the Ultralytics
layout (`detkd.data.formats.write_yolo`: class order and image ids kept; images hard-linked, else symlinked, else
copied) to ``$DETKD_HOME/data_cache/<key>/``. The key hashes the annotation files' bytes (the COCO jsons, the VOC
xml files and ImageSets lists), the class list, and each image's path, size and mtime (not its pixels). The folder
is built under a temporary name and renamed into place, so a folder under its final name is always complete; it is
reused while the key is unchanged. One line says whether it was converted or reused, and where; problems print the
validation summary; errors (or no usable image) refuse with a `DataError`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from detkd.data.formats import VOC_CLASSES, Dataset, PathLike, read_coco, read_dataset, read_voc, write_yolo
from detkd.errors import DataError

__all__ = ["Resolved", "as_ultralytics_data", "resolve_data", "default_cache_dir"]

#: Bumped when the cache layout or the conversion changes, so older cache folders are not reused.
CACHE_VERSION = 1
SOURCE_FILE = "detkd_source.json"
EXPECTED = ("an Ultralytics data yaml, a COCO folder with annotations/instances_train.json and instances_val.json "
            "(or data: {train: TRAIN.json, val: VAL.json}), or a VOC folder (VOCdevkit, VOCdevkit/VOC2007, ...)")
_SPLITS = ("train", "val", "test")
_announced: set[str] = set()  # cache keys whose "reused" line this process has printed (sweeps check many times)


@dataclass
class _Part:
    """One split piece to read: a COCO json, a VOC year folder + list, or any dataset + split name."""

    split: str  # the output split: train / val / test
    kind: str  # coco | voc | any
    path: Path
    list_name: str = ""  # VOC ImageSets list, or the split read from a generic dataset
    dataset: Dataset | None = None

    def describe(self) -> str:
        if self.kind == "voc":
            return f"{self.path} ({self.list_name})"
        return str(self.path)

    def validate_cmd(self) -> str:
        if self.kind == "coco":
            return f"detkd data validate {self.path}"
        return f"detkd data validate {self.path} --split {self.list_name}"


@dataclass
class Resolved:
    """The outcome of `resolve_data`: ``data_yaml`` to train on; ``action`` is ``'as_is'`` (an Ultralytics yaml),
    ``'converted'`` or ``'reused'``; ``cache`` the cache folder (None for ``as_is``); ``format`` of the source;
    ``summaries`` the validation summaries of the parts with problems (on reuse: those found when converted)."""

    data_yaml: Path
    action: str
    format: str
    cache: Path | None = None
    key: str = ""
    summaries: list[str] = field(default_factory=list)


def default_cache_dir() -> Path:
    """``$DETKD_HOME/data_cache``."""
    from detkd.integrations.ultralytics_env import detkd_home

    return detkd_home() / "data_cache"


# ----------------------------------------------------------------------------------------------------------------
# What the source is
# ----------------------------------------------------------------------------------------------------------------
def _find_json(folders: list[Path], split: str) -> list[Path]:
    for f in folders:
        hits = sorted(f.glob(f"instances_{split}*.json"))
        if hits:
            return hits
    return []


def _coco_parts(train: Path, val: Path | None, where: Path) -> list[_Part]:
    if val is None:
        raise DataError(
            f"data: {where}: COCO train annotations found ({train.name}) but no val split; detkd trains on the train "
            f"json and validates on a val json: put annotations/instances_val.json beside it, or give "
            f"data: {{train: {train}, val: VAL.json}}"
        )
    return [_Part("train", "coco", train), _Part("val", "coco", val)]


def _coco_folder(p: Path) -> list[_Part] | None:
    folders = [p / "annotations", p]
    train, val = _find_json(folders, "train"), _find_json(folders, "val")
    if not train and not val:
        return None
    for split, hits in (("train", train), ("val", val)):
        if len(hits) > 1:
            raise DataError(
                f"data: {p}: several COCO {split} jsons ({', '.join(h.name for h in hits)}); choose with "
                f"data: {{train: TRAIN.json, val: VAL.json}}"
            )
    if not train:
        raise DataError(f"data: {p}: COCO val annotations found ({val[0].name}) but no train json "
                        "(annotations/instances_train.json); give data: {train: TRAIN.json, val: VAL.json}")
    return _coco_parts(train[0], val[0] if val else None, p)


def _coco_json(p: Path) -> list[_Part]:
    stem = p.stem
    if stem.startswith("instances_train"):
        sib = p.with_name(p.name.replace("instances_train", "instances_val", 1))
        if sib.is_file():
            return _coco_parts(p, sib, p)
    raise DataError(
        f"data: {p} is a single COCO json: detkd would train on it, but training also needs a val split; give a "
        f"folder with annotations/instances_train.json and annotations/instances_val.json, or "
        f"data: {{train: {p}, val: VAL.json}} in the config"
    )


def _voc_years(p: Path) -> list[Path] | None:
    if (p / "Annotations").is_dir():
        return [p]
    for root in (p, p / "VOCdevkit"):
        years = sorted(d for d in root.glob("*") if d.is_dir() and (d / "Annotations").is_dir())
        if years:
            return years
    return None


def _has_list(year: Path, name: str) -> bool:
    return (year / "ImageSets" / "Main" / f"{name}.txt").is_file()


def _annotated_test(year: Path) -> bool:
    """An ImageSets/Main/test.txt whose images have annotation files (VOC2012's public test set has none)."""
    if not _has_list(year, "test"):
        return False
    lines = (year / "ImageSets" / "Main" / "test.txt").read_text(encoding="utf-8").split("\n")
    stems = [ln.split()[0] for ln in lines if ln.strip()][:20]
    return any((year / "Annotations" / f"{s}.xml").is_file() for s in stems)


def _voc_parts(p: Path, years: list[Path]) -> list[_Part]:
    test_years = [y for y in years if _annotated_test(y)]
    parts: list[_Part] = []
    if test_years:
        for y in years:
            lst = "trainval" if _has_list(y, "trainval") else "train" if _has_list(y, "train") else ""
            if not lst:
                if y in test_years:
                    continue  # a test-only year folder (VOC2007 test unpacked apart) adds val only
                raise DataError(f"data: VOC {y} has no ImageSets/Main/trainval.txt (or train.txt) to train on")
            parts.append(_Part("train", "voc", y, lst))
        parts += [_Part("val", "voc", y, "test") for y in test_years]
        if not any(q.split == "train" for q in parts):
            raise DataError(f"data: VOC {p}: only test lists found; add a year with ImageSets/Main/trainval.txt")
        return parts
    for y in years:
        missing = [s for s in ("train", "val") if not _has_list(y, s)]
        if missing:
            have = sorted(x.stem for x in (y / "ImageSets" / "Main").glob("*.txt") if "_" not in x.stem)
            raise DataError(
                f"data: VOC {y}: no ImageSets/Main/{missing[0]}.txt (lists found: {', '.join(have) or 'none'}); detkd "
                "trains on trainval and validates on an annotated test list (VOC2007 test) when one exists, else "
                "trains on train and validates on val: add the missing list, or give data: {train: ..., val: ...}"
            )
        parts += [_Part("train", "voc", y, "train"), _Part("val", "voc", y, "val")]
    return parts


def _plan(source) -> tuple[str, list[_Part]] | Path:
    """The parts to read, or the data yaml to use as it is."""
    if isinstance(source, Mapping):
        unknown = sorted(str(k) for k in source if k not in _SPLITS)
        if unknown or "train" not in source or "val" not in source:
            raise DataError(
                f"data: a mapping must be {{train: ..., val: ...}} (optional test:) naming COCO jsons or dataset "
                f"folders; got keys {sorted(map(str, source))}. For an Ultralytics dataset give its data yaml's path"
            )
        parts = []
        for split in _SPLITS:
            if source.get(split) is None:
                continue
            v = Path(str(source[split])).expanduser()
            if not v.exists():
                raise DataError(f"data: {split}: not found: {v} (expected a COCO json or a dataset folder)")
            kind = "coco" if v.is_file() and v.suffix.lower() == ".json" else "any"
            parts.append(_Part(split, kind, v.resolve(), split))
        fmt = "coco" if all(q.kind == "coco" for q in parts) else "mapping"
        return fmt, parts
    if not isinstance(source, (str, os.PathLike)) or not str(source).strip():
        raise DataError(f"data: expected a path, got {source!r}; give {EXPECTED}")
    p = Path(source).expanduser()
    if not p.exists():
        raise DataError(f"data: not found: {p}; expected {EXPECTED}")
    if p.is_file():
        if p.suffix.lower() in (".yaml", ".yml"):
            return p
        if p.suffix.lower() == ".json":
            return "coco", _coco_json(p.resolve())
        raise DataError(f"data: {p}: not a dataset file; expected {EXPECTED}")
    p = p.resolve()
    years = _voc_years(p)
    if years:
        return "voc", _voc_parts(p, years)
    if (p / "data.yaml").is_file():
        return p / "data.yaml"
    parts = _coco_folder(p)
    if parts:
        return "coco", parts
    ymls = sorted(p.glob("*.yaml")) + sorted(p.glob("*.yml"))
    if len(ymls) == 1:
        return ymls[0]
    raise DataError(f"data: {p} is a folder but not a dataset detkd knows; expected {EXPECTED}")


# ----------------------------------------------------------------------------------------------------------------
# Reading, hashing, writing
# ----------------------------------------------------------------------------------------------------------------
def _read(parts: list[_Part], fmt: str) -> list[str]:
    """Read every part (reader warnings muted: the validation summary lists them). Returns the class names."""
    reader_log = logging.getLogger("detkd.data.formats")
    level = reader_log.level
    reader_log.setLevel(logging.ERROR)
    try:
        for q in parts:
            if q.kind == "coco":
                q.dataset = read_coco(q.path)
            elif q.kind == "voc":
                q.dataset = read_voc(q.path, q.list_name)
            else:
                q.dataset = read_dataset(q.path, q.list_name)
        if fmt == "voc":  # one class list for every year and split: VOC's 20 if any part uses them
            names = [list(q.dataset.names) for q in parts]
            want = list(VOC_CLASSES) if list(VOC_CLASSES) in names else sorted({n for ns in names for n in ns})
            for q in parts:
                if list(q.dataset.names) != want:
                    q.dataset = read_voc(q.path, q.list_name, names=want)
    finally:
        reader_log.setLevel(level)
    names = list(parts[0].dataset.names)
    for q in parts[1:]:
        if list(q.dataset.names) != names:
            raise DataError(
                f"data: {q.describe()} has classes {list(q.dataset.names)} but {parts[0].describe()} has {names}; "
                "every split needs the same class names in the same order"
            )
    return names


def _key(fmt: str, parts: list[_Part], names: list[str]) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"v": CACHE_VERSION, "format": fmt, "names": names}).encode())
    seen: set[str] = set()

    def add_file(f: str) -> None:
        if f in seen:
            return
        seen.add(f)
        h.update(f"\0file {f}\0".encode())
        try:
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
        except OSError:
            h.update(b"<missing>")

    for q in parts:
        h.update(f"\0part {q.split} {q.kind} {q.path} {q.list_name}\0".encode())
        if q.kind == "voc":
            add_file(str(q.path / "ImageSets" / "Main" / f"{q.list_name}.txt"))
        elif q.path.is_file():
            add_file(str(q.path))
        for r in q.dataset.images:
            if r.label_file:
                add_file(r.label_file)
            try:
                st = os.stat(r.file)
                h.update(f"\0img {r.file} {st.st_size} {st.st_mtime_ns}".encode())
            except OSError:
                h.update(f"\0img {r.file} <missing>".encode())
    return h.hexdigest()[:20]


def _validate(parts: list[_Part], err) -> list[str]:
    """Validate each part (fix=True); print the summary of any part with problems; refuse on errors."""
    from detkd.data.validate import validate_dataset

    summaries = []
    for q in parts:
        try:
            report = validate_dataset(q.dataset, fix=True)
        except DataError as e:
            rep = getattr(e, "report", None)
            text = rep.summary() if rep is not None else str(e)
            err(f"detkd data: {q.describe()} ({q.split} split): `{q.validate_cmd()}` says:\n{text}")
            n = sum(p.count for p in rep.errors) if rep is not None else 1
            kinds = ", ".join(p.kind for p in rep.errors) if rep is not None else "error"
            raise DataError(f"data: {q.describe()}: {n} error(s) ({kinds}) in the {q.split} split; fix them (the "
                            f"summary above lists them; `{q.validate_cmd()}` shows the same)") from None
        q.dataset = report.dataset
        if report.errors or report.warnings:
            summaries.append(f"detkd data: {q.split} split {q.describe()}: problems found, fixed as listed "
                             f"(`{q.validate_cmd()}` prints the same summary):\n{report.summary()}")
    return summaries


def _merge(parts: list[_Part], split: str, names: list[str], root: str, fmt: str) -> Dataset | None:
    ps = [q for q in parts if q.split == split]
    if not ps:
        return None
    images = [r for q in ps for r in q.dataset.images]
    ids = [r.id for r in images]
    if len(set(ids)) != len(ids):  # ids repeat across years / lists: number them 1..N (ids only matter to eval)
        from dataclasses import replace

        images = [replace(r, id=i) for i, r in enumerate(images, 1)]
    if not images:
        raise DataError(f"data: the {split} split ({', '.join(q.describe() for q in ps)}) has no usable image")
    return Dataset(names, images, root, fmt, split)


def _write(parts: list[_Part], names: list[str], final: Path, info: dict) -> dict:
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    counts = {}
    try:
        for split in _SPLITS:
            ds = _merge(parts, split, names, info["source"], info["format"])
            if ds is None:
                continue
            w = write_yolo(ds, tmp, split=split, link="auto")
            counts[split] = {"images": w["images"], "boxes": w["boxes"], "crowd_skipped": w["crowd_skipped"]}
        info = {**info, "splits": counts}
        (tmp / SOURCE_FILE).write_text(json.dumps(info, indent=1), encoding="utf-8")
        if info["summaries"]:
            (tmp / "validation.txt").write_text("\n\n".join(info["summaries"]) + "\n", encoding="utf-8")
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "data.yaml").is_file():  # not another process finishing the same key first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return info


def _describe_source(source, parts: list[_Part]) -> str:
    if isinstance(source, Mapping):
        return "{" + ", ".join(f"{q.split}: {q.path}" for q in parts) + "}"
    return str(source)


def resolve_data(
    source,
    cache_dir: PathLike | None = None,
    log: Callable[[str], None] | None = None,
    err: Callable[[str], None] | None = None,
) -> Resolved:
    """Resolve a ``data:`` value (see the module docstring) to an Ultralytics data yaml.

    Args:
        source: a path (data yaml, COCO json or folder, VOC folder) or a ``{train: ..., val: ...}`` mapping.
        cache_dir: where converted datasets go (default ``$DETKD_HOME/data_cache``); one sub-folder per source
            content key.
        log: receives the one-line "converted" / "reused" message and the summaries of warnings (default: print).
        err: receives the validation summary before an error is raised (default: print to stderr).
    """
    log = log or (lambda s: print(s, flush=True))
    err = err or (lambda s: print(s, file=sys.stderr, flush=True))
    plan = _plan(source)
    if isinstance(plan, Path):
        return Resolved(plan, "as_is", "yolo")
    fmt, parts = plan
    names = _read(parts, fmt)
    key = _key(fmt, parts, names)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    final = (root / key).resolve()
    src = _describe_source(source, parts)
    what = {"coco": "COCO", "voc": "VOC"}.get(fmt, "dataset")
    if (final / "data.yaml").is_file() and (final / SOURCE_FILE).is_file():
        info = json.loads((final / SOURCE_FILE).read_text(encoding="utf-8"))
        if key not in _announced:
            _announced.add(key)
            warn = f"; its validation found problems: {final / 'validation.txt'}" if info.get("summaries") else ""
            log(f"detkd data: reused {final / 'data.yaml'} ({what} {src}, unchanged since it was converted on "
                f"{info.get('created', '?')}{warn})")
        return Resolved(final / "data.yaml", "reused", fmt, final, key, list(info.get("summaries") or []))
    summaries = _validate(parts, err)
    for s in summaries:
        log(s)
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists():  # not complete (no data.yaml / source record): never a finished conversion; rebuild it
        shutil.rmtree(final, ignore_errors=True)
    info = {"source": src, "format": fmt, "key": key, "names": names, "created": time.strftime("%Y-%m-%d %H:%M:%S"),
            "parts": [{"split": q.split, "path": str(q.path), "list": q.list_name} for q in parts],
            "summaries": summaries, "cache_version": CACHE_VERSION}
    info = _write(parts, names, final, info)
    _announced.add(key)
    def made_of(split: str) -> str:  # VOC: which years and lists went into the split (the rule, made visible)
        return " (" + " + ".join(f"{q.path.name} {q.list_name}" for q in parts if q.split == split) + ")"

    counts = ", ".join(f"{s}: {c['images']} images" + (made_of(s) if fmt == "voc" else "")
                       for s, c in info["splits"].items())
    log(f"detkd data: converted {what} {src} -> {final / 'data.yaml'} ({counts}, {len(names)} classes; reused "
        "while the source is unchanged)")
    return Resolved(final / "data.yaml", "converted", fmt, final, key, summaries)


def as_ultralytics_data(source, cache_dir: PathLike | None = None, **kwargs) -> Path:
    """The Ultralytics data yaml for ``source`` (an Ultralytics yaml as it is; COCO / VOC converted and cached).
    See `resolve_data`."""
    return resolve_data(source, cache_dir, **kwargs).data_yaml
