"""`generate`: the synthetic benchmark on disk, Ultralytics and COCO layouts (workers do not change a byte)."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import yaml

from detkd.data.synth.objects import DEFAULT_CLASSES
from detkd.data.synth.render import _check_classes, render_frame



def _render_and_save(task: tuple) -> tuple[int, np.ndarray, np.ndarray]:
    seed, split, index, S, classes, n_cameras, path, cameras = task
    img, boxes, labels, meta = render_frame(seed, split, index, S, classes, n_cameras, cameras=cameras)
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, meta["jpeg_quality"]])
    if not ok:
        raise RuntimeError(f"JPEG encoding failed for {path}")
    with open(path, "wb") as fh:
        fh.write(buf.tobytes())
    return index, boxes, labels


def _worker_init() -> None:
    cv2.setNumThreads(1)


def _clean_stale(d: Path, keep: set[str], suffix: str) -> None:
    """Remove files this generator wrote earlier (numeric stems) that the new run does not write."""
    pat = re.compile(r"^\d+\." + suffix + "$")
    for p in d.iterdir():
        if pat.match(p.name) and p.name not in keep:
            p.unlink()


def generate(
    out_dir: str | os.PathLike,
    *,
    seed: int = 0,
    n_train: int = 2000,
    n_val: int = 500,
    imgsz: int = 320,
    classes: Sequence[str] = DEFAULT_CLASSES,
    workers: int = 1,
    progress: bool = True,
    n_cameras: int = 8,
    n_test: int = 0,
    ood_cameras: int = 0,
    n_test_ood: int | None = None,
) -> dict:
    """Write the synthetic security-camera benchmark to ``out_dir`` in Ultralytics and COCO layouts.

    Args:
        out_dir: dataset root (created). Files from an earlier run that this run does not rewrite (numeric
            stems only) and Ultralytics' ``labels/*.cache`` are removed so the dataset stays consistent.
        seed: everything is a pure function of ``(seed, split, index)``; cameras of ``(seed, camera)``.
        n_train, n_val: number of frames per split (0 allowed).
        imgsz: square frame size in pixels.
        classes: a subset of `DEFAULT_CLASSES`; its order gives the label indices. Objects of other classes
            are not drawn at all (no unlabelled instances).
        workers: processes; results do not depend on it.
        progress: show a tqdm progress bar.
        n_cameras: number of fixed cameras (scenes) shared by train, val and test.
        n_test: frames of an in-distribution ``test`` split (0: none; the default).
        ood_cameras: number of unseen cameras (indices ``n_cameras .. n_cameras + ood_cameras - 1``) for a
            ``test_ood`` split; 0 (default): no such split.
        n_test_ood: frames of the ``test_ood`` split (default: ``n_val``).

        Train and val output does not depend on ``n_test``, ``ood_cameras`` or ``n_test_ood``. A split not asked
        for is not written (files this generator wrote for it earlier are removed) and gets no ``data.yaml`` key.

    Returns:
        ``{"root", "data_yaml", "names", "splits": {split: {"images", "boxes", "per_class", "images_dir",
        "labels_dir", "coco_json"}}}`` with absolute paths and counts; with ``ood_cameras`` also
        ``"ood_cameras"``: the unseen cameras' names.
    """
    classes = _check_classes(classes)
    if imgsz < 64:
        raise ValueError(f"imgsz must be >= 64, got {imgsz}")
    if n_cameras < 1:
        raise ValueError("n_cameras must be >= 1")
    if n_test < 0 or ood_cameras < 0 or (n_test_ood is not None and n_test_ood < 0):
        raise ValueError("n_test, ood_cameras and n_test_ood must be >= 0")
    n_ood = (int(n_val) if n_test_ood is None else int(n_test_ood)) if ood_cameras > 0 else 0
    ood_ids = list(range(int(n_cameras), int(n_cameras) + int(ood_cameras)))
    # (split, frames, cameras or None for range(n_cameras), written even when empty)
    plan = [("train", int(n_train), None, True), ("val", int(n_val), None, True), ("test", int(n_test), None, False),
            ("test_ood", n_ood, ood_ids, False)]
    root = Path(out_dir).expanduser().resolve()
    summary: dict[str, Any] = {"root": str(root), "names": list(classes), "splits": {}}
    pool = None
    if workers > 1:
        import multiprocessing as mp

        pool = mp.get_context().Pool(workers, initializer=_worker_init)
    try:
        for split, n, cams, always in plan:
            img_dir, lbl_dir = root / "images" / split, root / "labels" / split
            if not n and not always:  # not asked for: drop what an earlier run wrote for it
                for d, sfx in ((img_dir, "jpg"), (lbl_dir, "txt")):
                    if d.is_dir():
                        _clean_stale(d, set(), sfx)
                for q in (root / "labels" / f"{split}.cache", root / "annotations" / f"instances_{split}.json"):
                    if q.exists():
                        q.unlink()
                continue
            img_dir.mkdir(parents=True, exist_ok=True)
            lbl_dir.mkdir(parents=True, exist_ok=True)
            (root / "annotations").mkdir(parents=True, exist_ok=True)
            width = max(6, len(str(n)))
            stems = [f"{i + 1:0{width}d}" for i in range(n)]
            _clean_stale(img_dir, {s + ".jpg" for s in stems}, "jpg")
            _clean_stale(lbl_dir, {s + ".txt" for s in stems}, "txt")
            cache = root / "labels" / f"{split}.cache"
            if cache.exists():
                cache.unlink()
            tasks = [(int(seed), split, i, int(imgsz), classes, int(n_cameras), str(img_dir / f"{stems[i]}.jpg"), cams)
                     for i in range(n)]
            it = pool.imap(_render_and_save, tasks, chunksize=8) if pool is not None else map(_render_and_save, tasks)
            if progress:
                from tqdm.auto import tqdm

                it = tqdm(it, total=n, desc=f"synth {split}", unit="img")
            images, annotations = [], []
            per_class = np.zeros(len(classes), np.int64)
            for index, boxes, labels in it:
                S = float(imgsz)
                lines = []
                for (x1, y1, x2, y2), c in zip(boxes.tolist(), labels.tolist()):
                    cx, cy, bw, bh = (x1 + x2) / 2 / S, (y1 + y2) / 2 / S, (x2 - x1) / S, (y2 - y1) / S
                    lines.append(f"{c} {cx:.6f} {cy:.6f} {bw:.6f} {bh:.6f}\n")
                    annotations.append({
                        "id": len(annotations) + 1, "image_id": index + 1, "category_id": c + 1,
                        "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": 0,
                    })
                (lbl_dir / f"{stems[index]}.txt").write_text("".join(lines))
                images.append({"id": index + 1, "file_name": f"{stems[index]}.jpg", "width": int(imgsz),
                               "height": int(imgsz)})
                per_class += np.bincount(labels, minlength=len(classes))
            coco = {
                "info": {"description": f"detkd synthetic security-camera benchmark ({split}, seed {seed})",
                         "version": "1.0"},
                "licenses": [],
                "images": images,
                "annotations": annotations,
                "categories": [{"id": i + 1, "name": c, "supercategory": "object"} for i, c in enumerate(classes)],
            }
            json_path = root / "annotations" / f"instances_{split}.json"
            json_path.write_text(json.dumps(coco))
            summary["splits"][split] = {
                "images": n, "boxes": int(per_class.sum()),
                "per_class": {c: int(v) for c, v in zip(classes, per_class)},
                "images_dir": str(img_dir), "labels_dir": str(lbl_dir), "coco_json": str(json_path),
            }
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    data = {"path": str(root), "train": "images/train", "val": "images/val"}
    data.update({s: f"images/{s}" for s in ("test", "test_ood") if s in summary["splits"]})
    data["names"] = dict(enumerate(classes))
    if ood_ids:
        summary["ood_cameras"] = [f"CAM {c + 1:02d}" for c in ood_ids]
    yaml_path = root / "data.yaml"
    yaml_path.write_text(yaml.safe_dump(data, sort_keys=False))
    summary["data_yaml"] = str(yaml_path)
    return summary
