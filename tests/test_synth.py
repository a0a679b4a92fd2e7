"""The built-in security-camera data: deterministic, consistent layouts, valid boxes, real variety."""

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from detkd.data.synth import DEFAULT_CLASSES, generate


@pytest.fixture(scope="module")
def ds(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    generate(out, seed=7, n_train=160, n_val=40, imgsz=160, progress=False)
    return out


def _labels(root: Path, split: str) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted((root / "labels" / split).glob("*.txt"))}


def test_deterministic_and_worker_independent(ds, tmp_path):
    again = tmp_path / "again"
    generate(again, seed=7, n_train=160, n_val=40, imgsz=160, progress=False, workers=2)
    assert _labels(ds, "train") == _labels(again, "train") and _labels(ds, "val") == _labels(again, "val")
    for name in ("train_000000.jpg", "train_000123.jpg", "val_000010.jpg"):
        split = name.split("_")[0]
        a = cv2.imread(str(ds / "images" / split / name))
        b = cv2.imread(str(again / "images" / split / name))
        assert np.array_equal(a, b)
    other = tmp_path / "other"
    generate(other, seed=8, n_train=20, n_val=1, imgsz=160, progress=False)
    assert list(_labels(other, "train").values()) != list(_labels(ds, "train").values())[:20]


def test_coco_matches_yolo_labels_and_boxes_valid(ds):
    data = yaml.safe_load((ds / "data.yaml").read_text())
    assert "download" not in data and data["names"] == dict(enumerate(DEFAULT_CLASSES))
    for split in ("train", "val"):
        coco = json.loads((ds / "annotations" / f"instances_{split}.json").read_text())
        assert [c["name"] for c in sorted(coco["categories"], key=lambda c: c["id"])] == list(DEFAULT_CLASSES)
        by_img: dict[int, list] = {}
        for a in coco["annotations"]:
            by_img.setdefault(a["image_id"], []).append(a)
        for im in coco["images"]:
            w, h = im["width"], im["height"]
            img = cv2.imread(str(ds / "images" / split / im["file_name"]))
            assert img.shape[:2] == (h, w) == (120, 160)
            rows = [r.split() for r in (ds / "labels" / split / im["file_name"].replace(".jpg", ".txt")).read_text().split("\n") if r]
            anns = by_img.get(im["id"], [])
            assert len(rows) == len(anns)
            for r, a in zip(rows, anns):
                c, cx, cy, bw, bh = int(r[0]), *map(float, r[1:])
                x, y, bw_px, bh_px = a["bbox"]
                assert a["category_id"] == c + 1
                assert bw_px > 0 and bh_px > 0 and x >= 0 and y >= 0 and x + bw_px <= w and y + bh_px <= h
                np.testing.assert_allclose([cx * w, cy * h, bw * w, bh * h],
                                           [x + bw_px / 2, y + bh_px / 2, bw_px, bh_px], atol=1e-3)


def test_variety_classes_sizes_and_lighting(ds):
    coco = json.loads((ds / "annotations" / "instances_train.json").read_text())
    cats = {a["category_id"] for a in coco["annotations"]}
    assert cats == set(range(1, len(DEFAULT_CLASSES) + 1))
    sizes = np.array([max(a["bbox"][2], a["bbox"][3]) for a in coco["annotations"]])
    assert (sizes < 16).sum() > 10 and (sizes > 64).sum() > 10  # far (tiny) and near (large) objects at 160 px
    means = np.array([cv2.imread(str(p)).mean() for p in sorted((ds / "images" / "train").glob("*.jpg"))[:80]])
    assert (means < 50).sum() >= 5 and (means > 90).sum() >= 20  # night and day frames
