"""The built-in security-camera benchmark (detkd.data.synth): determinism, the two layouts agree, boxes are
valid and hug the drawn pixels, class and size coverage, perspective, data.yaml, image decoding."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from detkd.data.synth import DEFAULT_CLASSES, generate, render_frame

S = 320


@pytest.fixture(scope="module")
def ds(tmp_path_factory) -> tuple[Path, dict]:
    """200 train + 30 val frames at 320 px (about 3-5 s)."""
    out = tmp_path_factory.mktemp("synth")
    summary = generate(out, seed=3, n_train=200, n_val=30, imgsz=S, progress=False)
    return out, summary


def _label_files(root: Path, split: str) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((root / "labels" / split).glob("*.txt"))}


def _yolo_rows(path: Path) -> list[list[float]]:
    rows = []
    for line in path.read_text().splitlines():
        parts = line.split()
        assert len(parts) == 5, line
        rows.append([int(parts[0])] + [float(v) for v in parts[1:]])
    return rows


def test_same_seed_identical_other_seed_different_any_worker_count(tmp_path):
    kw = dict(n_train=10, n_val=4, imgsz=160, progress=False)
    a, b, c, d = (tmp_path / n for n in "abcd")
    generate(a, seed=11, **kw)
    generate(b, seed=11, **kw)
    generate(c, seed=11, workers=2, **kw)
    generate(d, seed=12, **kw)
    for split in ("train", "val"):
        la = _label_files(a, split)
        assert len(la) == kw["n_" + split] and any(la.values())
        assert la == _label_files(b, split) == _label_files(c, split)
        assert (a / "annotations" / f"instances_{split}.json").read_bytes() == \
            (c / "annotations" / f"instances_{split}.json").read_bytes()
        for name in la:
            jpg = name.replace(".txt", ".jpg")
            ia = cv2.imread(str(a / "images" / split / jpg))
            for other in (b, c):
                assert np.array_equal(ia, cv2.imread(str(other / "images" / split / jpg)))
    # a different seed gives different labels and pixels
    assert _label_files(a, "train") != _label_files(d, "train")
    first = "images/train/000001.jpg"
    assert not np.array_equal(cv2.imread(str(a / first)), cv2.imread(str(d / first)))
    # the same frame rendered in memory is identical too, and differs across splits and indices
    f1, b1, l1, _ = render_frame(11, "val", 2, 160)
    f2, b2, l2, _ = render_frame(11, "val", 2, 160)
    assert np.array_equal(f1, f2) and np.array_equal(b1, b2) and np.array_equal(l1, l2)
    assert not np.array_equal(f1, render_frame(11, "train", 2, 160)[0])
    assert not np.array_equal(f1, render_frame(11, "val", 3, 160)[0])


def test_rerun_with_fewer_images_removes_stale_files(tmp_path):
    generate(tmp_path, seed=0, n_train=6, n_val=2, imgsz=96, progress=False)
    generate(tmp_path, seed=0, n_train=3, n_val=1, imgsz=96, progress=False)
    assert sorted(p.name for p in (tmp_path / "images/train").iterdir()) == ["000001.jpg", "000002.jpg", "000003.jpg"]
    assert sorted(p.name for p in (tmp_path / "labels/val").iterdir()) == ["000001.txt"]


def test_coco_and_yolo_layouts_agree_and_boxes_are_valid(ds):
    root, summary = ds
    for split, n in (("train", 200), ("val", 30)):
        coco = json.loads((root / "annotations" / f"instances_{split}.json").read_text())
        cats = sorted(coco["categories"], key=lambda c: c["id"])
        assert [c["id"] for c in cats] == list(range(1, len(DEFAULT_CLASSES) + 1))
        assert [c["name"] for c in cats] == list(DEFAULT_CLASSES)
        assert len(coco["images"]) == n == summary["splits"][split]["images"]
        assert len({im["id"] for im in coco["images"]}) == n
        assert len({a["id"] for a in coco["annotations"]}) == len(coco["annotations"])
        by_image: dict[int, list[dict]] = {im["id"]: [] for im in coco["images"]}
        for a in coco["annotations"]:
            by_image[a["image_id"]].append(a)
        label_files = sorted((root / "labels" / split).glob("*.txt"))
        assert len(label_files) == n
        n_boxes = 0
        for im in coco["images"]:
            assert (im["width"], im["height"]) == (S, S)
            assert (root / "images" / split / im["file_name"]).is_file()
            rows = _yolo_rows(root / "labels" / split / (Path(im["file_name"]).stem + ".txt"))
            anns = by_image[im["id"]]
            assert len(rows) == len(anns)
            yolo = sorted((r[0], round((r[1] - r[3] / 2) * S, 3), round((r[2] - r[4] / 2) * S, 3),
                           round(r[3] * S, 3), round(r[4] * S, 3)) for r in rows)
            cocob = sorted((a["category_id"] - 1, *(round(v, 3) for v in a["bbox"])) for a in anns)
            np.testing.assert_allclose(np.array(yolo, float).reshape(-1, 5), np.array(cocob, float).reshape(-1, 5),
                                       atol=2e-3)
            for a in anns:
                x, y, w, h = a["bbox"]
                assert a["iscrowd"] == 0 and a["area"] == pytest.approx(w * h)
                assert w >= 4 and h >= 4  # dropped below 4 px: never a zero-area box
                assert 0 <= x and 0 <= y and x + w <= S and y + h <= S
            for r in rows:
                assert 0 <= r[0] < len(DEFAULT_CLASSES)
                assert 0 < r[3] <= 1 and 0 < r[4] <= 1
                assert r[1] - r[3] / 2 >= -1e-6 and r[1] + r[3] / 2 <= 1 + 1e-6
                assert r[2] - r[4] / 2 >= -1e-6 and r[2] + r[4] / 2 <= 1 + 1e-6
            n_boxes += len(anns)
        assert n_boxes == summary["splits"][split]["boxes"] == sum(summary["splits"][split]["per_class"].values())


def test_class_coverage_and_object_counts(ds):
    root, summary = ds
    per_image = [len(_yolo_rows(p)) for p in sorted((root / "labels" / "train").glob("*.txt"))]
    classes = np.concatenate([np.array([r[0] for r in _yolo_rows(p)], int)
                              for p in sorted((root / "labels" / "train").glob("*.txt"))])
    counts = np.bincount(classes, minlength=len(DEFAULT_CLASSES))
    assert (counts >= 20).all(), dict(zip(DEFAULT_CLASSES, counts))  # every class well represented
    assert counts.tolist() == [summary["splits"]["train"]["per_class"][c] for c in DEFAULT_CLASSES]
    assert max(per_image) <= 15 and min(per_image) == 0
    assert 3 <= np.mean(per_image) <= 10


def test_size_distribution_spans_small_to_large(ds):
    root, _ = ds
    coco = json.loads((root / "annotations" / "instances_train.json").read_text())
    longest = np.array([max(a["bbox"][2], a["bbox"][3]) for a in coco["annotations"]])
    assert (longest < 16).mean() > 0.15  # many far-away objects
    assert (longest > 96).mean() > 0.03  # and some close to the camera
    assert ((longest >= 16) & (longest <= 96)).mean() > 0.3


def test_object_size_follows_perspective():
    """Within one camera, a person's box height grows with the row of its feet (bottom edge)."""
    ys, hs, cams = [], [], []
    for i in range(120):
        _, boxes, labels, meta = render_frame(5, "train", i, S, n_cameras=2)
        keep = (labels == 0) & (boxes[:, 3] < S - 1)
        ys += boxes[keep, 3].tolist()
        hs += (boxes[keep, 3] - boxes[keep, 1]).tolist()
        cams += [meta["camera"]] * int(keep.sum())
    ys, hs, cams = np.array(ys), np.array(hs), np.array(cams)
    for cam in np.unique(cams):
        m = cams == cam
        assert m.sum() > 30
        assert np.corrcoef(ys[m], hs[m])[0, 1] > 0.6, cam


def test_boxes_hug_the_drawn_pixels():
    """Render frames with and without the objects (same lighting, noise, text): every box edge row and column
    holds a pixel the objects changed, and the pixels just outside a box are not all object pixels."""
    checked = 0
    for i in range(40):
        with_obj, boxes, labels, meta = render_frame(9, "val", i, S)
        if meta["night"]:  # very dark objects may round to the background value at night
            continue
        without, boxes2, labels2, _ = render_frame(9, "val", i, S, draw_objects=False)
        assert np.array_equal(boxes, boxes2) and np.array_equal(labels, labels2)
        changed = (with_obj.astype(int) - without.astype(int)).any(2)
        for x1, y1, x2, y2 in boxes.astype(int):
            sub = changed[y1:y2, x1:x2]
            assert sub[0].any() and sub[-1].any() and sub[:, 0].any() and sub[:, -1].any(), (i, x1, y1, x2, y2)
            checked += 1
    assert checked > 50


def test_heavily_occluded_objects_are_dropped():
    """The dropping rule is applied: some drawn objects are dropped, and no box is smaller than 4 px."""
    dropped = 0
    for i in range(60):
        _, boxes, _, meta = render_frame(1, "train", i, S)
        dropped += meta["dropped"]
        if len(boxes):
            assert ((boxes[:, 2:] - boxes[:, :2]) >= 4).all()
    assert dropped > 0


def test_class_subset_and_bad_classes(tmp_path):
    s = generate(tmp_path, seed=0, n_train=12, n_val=0, imgsz=128, classes=("car", "person"), progress=False)
    assert s["names"] == ["car", "person"]
    data = yaml.safe_load((tmp_path / "data.yaml").read_text())
    assert data["names"] == {0: "car", 1: "person"}
    rows = [r for p in (tmp_path / "labels/train").glob("*.txt") for r in _yolo_rows(p)]
    assert rows and {r[0] for r in rows} <= {0, 1}
    coco = json.loads((tmp_path / "annotations/instances_val.json").read_text())
    assert coco["images"] == [] and [c["name"] for c in coco["categories"]] == ["car", "person"]
    with pytest.raises(ValueError):
        generate(tmp_path, n_train=1, n_val=1, classes=("person", "horse"), progress=False)


def test_data_yaml(ds):
    root, summary = ds
    data = yaml.safe_load((root / "data.yaml").read_text())
    assert "download" not in data
    assert Path(data["path"]).is_absolute() and Path(data["path"]) == root.resolve()
    assert data["train"] == "images/train" and data["val"] == "images/val"
    assert data["names"] == dict(enumerate(DEFAULT_CLASSES))
    assert summary["data_yaml"] == str(root.resolve() / "data.yaml")
    assert (Path(data["path"]) / data["train"]).is_dir() and (Path(data["path"]) / data["val"]).is_dir()


@pytest.mark.parametrize("size", [96, 200])
def test_image_decodes_to_requested_size(tmp_path, size):
    generate(tmp_path, seed=2, n_train=2, n_val=1, imgsz=size, progress=False)
    for p in [tmp_path / "images/train/000001.jpg", tmp_path / "images/val/000001.jpg"]:
        im = cv2.imread(str(p))
        assert im is not None and im.shape == (size, size, 3) and im.dtype == np.uint8
        assert im.std() > 5  # a real picture, not a flat fill


def test_day_and_night_frames(ds):
    root, _ = ds
    means = np.array([cv2.imread(str(p)).mean() for p in sorted((root / "images" / "train").glob("*.jpg"))[:100]])
    assert (means < 70).sum() >= 15 and (means > 90).sum() >= 40
