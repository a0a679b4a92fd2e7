"""Dataset validation: each problem kind counted exactly, fixed / skipped / raised as documented."""

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml
from PIL import Image

from detkd.data.formats import Dataset, ImageRecord, read_voc
from detkd.data.validate import KINDS, validate_dataset
from detkd.errors import DataError

W, H = 64, 48


def _img(path: Path, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 255, (H, W, 3), dtype=np.uint8)
    assert cv2.imwrite(str(path), arr)
    return path


def _exif_rotated_jpeg(path: Path) -> Path:
    """Stored 64x48 with EXIF Orientation 6 (rotate 90 deg clockwise to display): displayed 48x64."""
    path.parent.mkdir(parents=True, exist_ok=True)
    exif = Image.Exif()
    exif[274] = 6
    Image.fromarray(np.full((H, W, 3), 128, np.uint8)).save(path, exif=exif)
    return path


def _gray_png(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), np.full((H, W), 77, np.uint8))
    return path


def _corrupt(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(np.random.default_rng(1).integers(0, 256, 500, dtype=np.uint8).tobytes())
    return path


@pytest.fixture
def yolo_ds(tmp_path) -> Path:
    """One YOLO val split with one image per problem kind. Classes: 0 cat, 1 dog."""
    im, lb = tmp_path / "images" / "val", tmp_path / "labels" / "val"
    lb.mkdir(parents=True)
    labels = {
        "a.jpg": "0 0.5 0.5 0.25 0.25\n",  # fine
        "b.jpg": "1 0.95 0.5 0.2 0.2\n",  # x2 = 1.05 * 64 = 67.2 -> clipped to 64
        "c.jpg": "5 0.5 0.5 0.1 0.1\n0 0.25 0.25 0.1 0.1\nnot a line\n",  # class 5 of 2; one malformed line
        "d.jpg": "0 0.5 0.5 0 0.1\n",  # zero width
        "e.jpg": "0 0.5 0.5 0.2 0.2\n",  # the image is random bytes
        "f.png": "",  # grayscale PNG, empty label = background
        "g.jpg": "0 0.5 0.5 0.5 0.5\n",  # EXIF-rotated: labels in the displayed 48x64 frame
        # h.jpg: no label file at all
    }
    for i, name in enumerate("abcdh"):
        _img(im / f"{name}.jpg", seed=i)
    _corrupt(im / "e.jpg")
    _gray_png(im / "f.png")
    _exif_rotated_jpeg(im / "g.jpg")
    for name, text in labels.items():
        (lb / f"{Path(name).stem}.txt").write_text(text)
    cfg = {"train": "images/val", "val": "images/val", "names": ["cat", "dog"]}
    (tmp_path / "data.yaml").write_text(yaml.safe_dump(cfg))
    return tmp_path / "data.yaml"


EXPECTED_YOLO = {
    "corrupt_image": 1,
    "missing_label": 1,
    "bad_label": 1,
    "class_out_of_range": 1,
    "zero_area": 1,
    "box_outside": 1,
    "empty_label": 1,
    "grayscale": 1,
    "png": 1,
    "exif_rotated": 1,
}


def test_yolo_every_problem_counted_and_fixed(yolo_ds):
    rep = validate_dataset(yolo_ds, split="val")
    assert {k: p.count for k, p in rep.problems.items()} == EXPECTED_YOLO
    assert rep.images_read == 8 and rep.boxes_read == 7
    assert len(rep.dataset.images) == 7 and rep.ok
    assert rep.boxes_per_class == {"cat": 3, "dog": 1}  # a, c (2nd line), g; b

    by = {Path(r.file).name: r for r in rep.dataset.images}
    assert "e.jpg" not in by
    np.testing.assert_allclose(by["b.jpg"].boxes, [[54.4, 19.2, 64.0, 28.8]], atol=1e-4)  # clipped
    assert by["c.jpg"].classes.tolist() == [0] and len(by["d.jpg"]) == 0
    # EXIF: size is the displayed one (what cv2 loads), boxes placed in that frame
    g = by["g.jpg"]
    assert (g.width, g.height) == (48, 64) == cv2.imread(g.file).shape[1::-1]
    np.testing.assert_allclose(g.boxes, [[12, 16, 36, 48]], atol=1e-4)
    assert (by["h.jpg"].width, len(by["h.jpg"])) == (W, 0)  # missing label: background image

    ex = rep.problems["exif_rotated"].examples
    assert ex == [
        "images/val/g.jpg: EXIF orientation 6: stored 64x48, displayed 48x64 (Ultralytics and cv2.imread use the "
        "displayed image; labels must be in that frame)"
    ]
    assert rep.problems["box_outside"].examples == [
        "images/val/b.jpg: box [54.4, 19.2, 67.2, 28.8] clipped to [54.4, 19.2, 64, 28.8] (image 64x48)"
    ]
    assert rep.problems["class_out_of_range"].examples == [
        "images/val/c.jpg: class 5 but the dataset has 2 classes (0..1); box skipped"
    ]
    assert rep.problems["bad_label"].examples[0].startswith("labels/val/c.txt: line 3: not numbers (not a line)")
    assert rep.problems["missing_label"].examples[0].startswith("labels/val/h.txt: no label file for h.jpg")
    assert rep.problems["corrupt_image"].examples == [
        "images/val/e.jpg: not a readable image (unknown or damaged file); image and its 1 box(es) skipped"
    ]

    s = rep.summary()
    assert "images: 8 read, 7 kept | boxes: 7 read, 4 usable | fixes applied" in s
    assert "problems: 0 error(s), 6 warning(s), 4 note(s)" in s
    for kind in EXPECTED_YOLO:
        assert kind in s
    lines = s.splitlines()
    assert any(ln.split()[:3] == ["WARNING", "box_outside", "1"] and "clipped to the image" in ln for ln in lines)
    assert any(ln.split()[:3] == ["NOTE", "empty_label", "1"] for ln in lines)
    assert lines.index(next(ln for ln in lines if "cat" in ln and ln.split()[-1] == "3")) < lines.index(
        next(ln for ln in lines if ln.startswith("problems:"))
    )


def test_fix_false_reports_the_same_and_changes_nothing(yolo_ds):
    rep = validate_dataset(yolo_ds, fix=False)
    assert {k: p.count for k, p in rep.problems.items()} == EXPECTED_YOLO
    b = next(r for r in rep.dataset.images if r.file.endswith("b.jpg"))
    assert b.boxes[0, 2] == pytest.approx(67.2, abs=1e-4)  # not clipped
    assert len(rep.dataset.images) == 8
    assert "would be: clipped to the image (fix=False)" in rep.summary()


def test_strict_turns_warnings_into_one_error_listing_them(yolo_ds):
    with pytest.raises(DataError) as e:
        validate_dataset(yolo_ds, strict=True)
    msg = str(e.value)
    assert msg.startswith(f"strict mode: 6 warning(s) treated as errors in {yolo_ds.parent}:\n")
    for kind in ("corrupt_image", "missing_label", "bad_label", "class_out_of_range", "zero_area", "box_outside"):
        assert kind in msg
    for note in ("empty_label", "grayscale", "png", "exif_rotated"):
        assert note not in msg  # notes never fail strict mode
    assert "images/val/b.jpg: box [54.4, 19.2, 67.2, 28.8]" in msg
    assert msg.rstrip().endswith("Fix the data, or validate without strict to apply the actions listed.")
    assert e.value.report.count("box_outside") == 1


def _coco(tmp_path: Path, images: list, anns: list) -> Path:
    gt = {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]}
    p = tmp_path / "gt.json"
    p.write_text(json.dumps(gt))
    return p


def test_coco_missing_image_unknown_category_orphans_boxes_and_exif_size(tmp_path):
    _img(tmp_path / "a.jpg")
    _exif_rotated_jpeg(tmp_path / "r.jpg")
    images = [
        {"id": 1, "file_name": "a.jpg", "width": W, "height": H},
        {"id": 2, "file_name": "gone.jpg", "width": W, "height": H},
        {"id": 3, "file_name": "r.jpg", "width": W, "height": H},  # stored size; displayed is 48x64
    ]
    anns = [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 2, 10, 10]},  # fine
        {"id": 2, "image_id": 1, "category_id": 7, "bbox": [1, 2, 10, 10]},  # unknown category
        {"id": 3, "image_id": 99, "category_id": 1, "bbox": [1, 2, 10, 10]},  # unknown image
        {"id": 4, "image_id": 1, "category_id": 2, "bbox": [70, 50, 5, 5]},  # entirely outside
        {"id": 5, "image_id": 1, "category_id": 2, "bbox": [5, 5, -3, 4]},  # negative width
        {"id": 6, "image_id": 1, "category_id": 2, "bbox": [-4, -2, 10, 10]},  # partly outside
        {"id": 7, "image_id": 2, "category_id": 1, "bbox": [1, 2, 10, 10]},  # its image is missing
        {"id": 8, "image_id": 3, "category_id": 1, "bbox": [1, 2, 10, 10]},
        {"id": 9, "image_id": 3, "category_id": 1, "bbox": "oops"},  # malformed
    ]
    rep = validate_dataset(_coco(tmp_path, images, anns))
    assert {k: p.count for k, p in rep.problems.items()} == {
        "missing_image": 1,
        "unknown_class": 1,
        "orphan_annotation": 1,
        "bad_label": 1,
        "zero_area": 2,
        "box_outside": 1,
        "size_mismatch": 1,
        "exif_rotated": 1,
    }
    assert rep.problems["size_mismatch"].examples == [
        "r.jpg: annotation says 64x48, image displays as 48x64 (stored 64x48, EXIF orientation 6); "
        "boxes kept as annotated"
    ]
    zs = rep.problems["zero_area"].examples
    assert zs == ["a.jpg: box [70, 50, 75, 55] lies outside the 64x48 image; skipped (+1 more in this file)"]
    assert [r.id for r in rep.dataset.images] == [1, 3]
    np.testing.assert_allclose(rep.dataset.images[0].boxes, [[1, 2, 11, 12], [0, 0, 6, 8]])
    assert rep.dataset.images[0].classes.tolist() == [0, 1]
    assert "gone.jpg: file not found; image and its 1 box(es) skipped" in rep.summary()


def test_duplicate_image_id_is_an_error_with_the_report_attached(tmp_path):
    _img(tmp_path / "a.jpg")
    _img(tmp_path / "b.jpg", seed=3)
    images = [{"id": 4, "file_name": f, "width": W, "height": H} for f in ("a.jpg", "b.jpg")]
    with pytest.raises(DataError) as e:
        validate_dataset(_coco(tmp_path, images, []))
    assert "ERROR   duplicate_id             1 image" in str(e.value)
    assert "b.jpg: id 4 is also used by a.jpg" in str(e.value)
    assert e.value.report.count("duplicate_id") == 1 and not e.value.report.ok


def test_voc_missing_xml_unknown_name_and_difficult_kept(tmp_path):
    root = tmp_path / "VOC2007"
    _img(root / "JPEGImages" / "000001.jpg")
    _img(root / "JPEGImages" / "000002.jpg")
    (root / "Annotations").mkdir(parents=True)
    (root / "Annotations" / "000001.xml").write_text(
        "<annotation><filename>000001.jpg</filename><size><width>64</width><height>48</height></size>"
        + "".join(
            f"<object><name>{n}</name><difficult>{d}</difficult><bndbox><xmin>2</xmin><ymin>3</ymin><xmax>20</xmax>"
            "<ymax>30</ymax></bndbox></object>"
            for n, d in (("dog", 1), ("unicorn", 0))
        )
        + "</annotation>"
    )
    (root / "ImageSets" / "Main").mkdir(parents=True)
    (root / "ImageSets" / "Main" / "val.txt").write_text("000001\n000002\n")
    rep = validate_dataset(read_voc(root, "val", names="voc"))
    assert {k: p.count for k, p in rep.problems.items()} == {"unknown_class": 1, "missing_label": 1}
    assert rep.problems["unknown_class"].examples == [
        "Annotations/000001.xml: class name 'unicorn' is not in the class list; box skipped"
    ]
    r1, r2 = rep.dataset.images
    assert r1.difficult.tolist() == [True] and (r2.width, r2.height, len(r2)) == (W, H, 0)  # size read from the image


def test_in_memory_nan_box_empty_dataset_and_decode(tmp_path):
    a = _img(tmp_path / "a.jpg")
    ds = Dataset(["x"], [ImageRecord(1, a, W, H, [[np.nan, 0, 5, 5], [0, 0, 5, 5]], [0, 0])])
    rep = validate_dataset(ds, decode=True)
    assert rep.count("invalid_box") == 1 and rep.boxes_per_class == {"x": 1}
    with pytest.raises(DataError, match="empty_dataset"):
        validate_dataset(Dataset(["x"], [ImageRecord(1, tmp_path / "nope.jpg", W, H)]))
    # float noise below the tolerance is clipped without a warning
    rep = validate_dataset(Dataset(["x"], [ImageRecord(1, a, W, H, [[0, 0, 64.0004, 48]], [0])]))
    assert rep.problems == {} and rep.dataset.images[0].boxes[0, 2] == 64.0


def test_truncated_jpeg_kept_with_warning_and_unsupported_suffix_skipped(tmp_path):
    a = _img(tmp_path / "a.jpg")
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(a.read_bytes()[:-300])  # header intact, end marker gone
    gif = tmp_path / "g.gif"
    Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(gif)
    recs = [ImageRecord(i, f, W, H, [[1, 1, 9, 9]], [0]) for i, f in enumerate([a, cut, gif])]
    rep = validate_dataset(Dataset(["x"], recs, str(tmp_path)), decode=True)
    assert {k: p.count for k, p in rep.problems.items()} == {"truncated_jpeg": 1, "unsupported_format": 1}
    assert rep.problems["truncated_jpeg"].examples == ["cut.jpg: JPEG end marker missing (file cut short); kept"]
    assert [r.id for r in rep.dataset.images] == [0, 1] and rep.boxes_per_class == {"x": 2}


def test_every_kind_has_a_known_severity():
    assert {k.severity for k in KINDS.values()} == {"error", "warning", "note"}
    assert {n for n, k in KINDS.items() if k.severity == "error"} == {"duplicate_id", "empty_dataset"}
