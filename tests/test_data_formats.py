"""Readers, writers and conversion: COCO / VOC / YOLO on tiny datasets written in tmp_path."""

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from detkd.data.convert import convert
from detkd.data.formats import (
    VOC_CLASSES,
    Dataset,
    ImageRecord,
    detect_format,
    read_coco,
    read_dataset,
    read_voc,
    read_yolo,
    write_coco,
    write_yolo,
    yolo_label_path,
)
from detkd.errors import DataError

W, H = 64, 48


def _img(path: Path, w: int = W, h: int = H, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)
    assert cv2.imwrite(str(path), arr)
    return path


def _coco_dataset(tmp_path: Path) -> Path:
    """3 images (ids 7, 42, 1001), categories with non-contiguous ids 3 'cat' and 9 'dog' (listed out of order)."""
    img_dir = tmp_path / "coco" / "images"
    for i, name in enumerate(["a.jpg", "b.jpg", "c.jpg"]):
        _img(img_dir / name, seed=i)
    gt = {
        "images": [
            {"id": 42, "file_name": "b.jpg", "width": W, "height": H},
            {"id": 7, "file_name": "a.jpg", "width": W, "height": H},
            {"id": 1001, "file_name": "c.jpg", "width": W, "height": H},  # background image
        ],
        "categories": [{"id": 9, "name": "dog"}, {"id": 3, "name": "cat"}],
        "annotations": [
            {"id": 1, "image_id": 7, "category_id": 9, "bbox": [10.25, 5.5, 20.125, 12.75], "iscrowd": 0},
            {"id": 2, "image_id": 7, "category_id": 3, "bbox": [0.0, 0.0, 64.0, 48.0], "iscrowd": 0},
            {"id": 3, "image_id": 42, "category_id": 3, "bbox": [33.3, 17.7, 11.1, 22.2], "iscrowd": 0},
        ],
    }
    jp = tmp_path / "coco" / "annotations" / "instances_val.json"
    jp.parent.mkdir(parents=True)
    jp.write_text(json.dumps(gt))
    return jp


def _boxes_by_file(gt: dict) -> dict:
    """{basename: sorted list of (category name, x, y, w, h, difficult)} from a COCO dict (independent of detkd)."""
    names = {c["id"]: c["name"] for c in gt["categories"]}
    files = {im["id"]: Path(im["file_name"]).name for im in gt["images"]}
    out = {f: [] for f in files.values()}
    for a in gt["annotations"]:
        out[files[a["image_id"]]].append((names[a["category_id"]], *a["bbox"], a.get("difficult", 0)))
    return {k: sorted(v) for k, v in out.items()}


def test_read_coco_maps_categories_in_id_order_and_converts_boxes(tmp_path):
    ds = read_coco(_coco_dataset(tmp_path))  # images dir guessed: annotations/../images
    assert ds.names == ["cat", "dog"]  # category id 3 before 9
    assert [r.id for r in ds.images] == [42, 7, 1001]
    a = ds.images[1]
    assert Path(a.file) == (tmp_path / "coco" / "images" / "a.jpg").resolve() and Path(a.file).is_file()
    assert a.boxes.dtype == np.float32 and a.classes.dtype == np.int64 and a.difficult.dtype == bool
    np.testing.assert_allclose(a.boxes, [[10.25, 5.5, 30.375, 18.25], [0, 0, 64, 48]], atol=1e-6)
    assert a.classes.tolist() == [1, 0]
    assert len(ds.images[2]) == 0 and ds.issues == []


def test_coco_yolo_coco_round_trip_keeps_ids_names_and_boxes(tmp_path):
    src = _coco_dataset(tmp_path)
    yolo_dir = tmp_path / "yolo"
    r1 = convert(src, yolo_dir, to="yolo", split="val")
    assert (r1.images, r1.boxes) == (3, 3)
    assert r1.summary().endswith(f"wrote {yolo_dir.resolve() / 'data.yaml'}: 3 images, 3 boxes")

    meta = yaml.safe_load((yolo_dir / "data.yaml").read_text())
    assert meta["names"] == {0: "cat", 1: "dog"} and meta["val"] == "images/val" and meta["train"] == "images/val"
    assert "download" not in meta and "path" not in meta
    ids = json.loads((yolo_dir / "ids.json").read_text())
    assert ids == {"images/val/a.jpg": 7, "images/val/b.jpg": 42, "images/val/c.jpg": 1001}
    # label of a.jpg, computed by hand: dog (1) x 10.25..30.375, y 5.5..18.25 ; cat full image
    rows = np.loadtxt(yolo_dir / "labels" / "val" / "a.txt")
    expect = [[1, (10.25 + 30.375) / 2 / W, (5.5 + 18.25) / 2 / H, 20.125 / W, 12.75 / H], [0, 0.5, 0.5, 1, 1]]
    np.testing.assert_allclose(rows, expect, atol=1e-7)
    assert (yolo_dir / "labels" / "val" / "c.txt").read_text() == ""  # background image: empty label
    linked, original = yolo_dir / "images" / "val" / "a.jpg", src.parent.parent / "images" / "a.jpg"
    assert linked.stat().st_ino == original.stat().st_ino  # hard link, not a copy

    out = tmp_path / "back" / "val.json"
    r2 = convert(yolo_dir, out, to="coco", split="val")
    assert {k: p.count for k, p in r2.report.problems.items()} == {"empty_label": 1}  # c.jpg: background
    gt0, gt1 = json.loads(src.read_text()), json.loads(out.read_text())
    assert [(c["id"], c["name"]) for c in gt1["categories"]] == [(1, "cat"), (2, "dog")]
    assert {(Path(i["file_name"]).name, i["id"], i["width"], i["height"]) for i in gt1["images"]} == {
        (Path(i["file_name"]).name, i["id"], i["width"], i["height"]) for i in gt0["images"]
    }
    b0, b1 = _boxes_by_file(gt0), _boxes_by_file(gt1)
    assert b0.keys() == b1.keys()
    for f in b0:
        assert [b[0] for b in b0[f]] == [b[0] for b in b1[f]]
        np.testing.assert_allclose([b[1:5] for b in b1[f]], [b[1:5] for b in b0[f]], atol=1e-3)
    # and the json reads back (file names relative to the json, or absolute)
    back = read_coco(out)
    assert all(Path(r.file).is_file() for r in back.images)


def test_write_coco_then_read_coco_is_identity(tmp_path):
    img = _img(tmp_path / "x" / "p.jpg")
    ds = Dataset(
        ["a", "b", "c"],
        [ImageRecord(5, img, W, H, [[1, 2, 3, 4], [5.5, 6.5, 60, 40]], [2, 0], [True, False], [False, True])],
        str(tmp_path),
    )
    jp = tmp_path / "x" / "gt.json"
    write_coco(ds, jp)
    gt = json.loads(jp.read_text())
    assert gt["images"] == [{"id": 5, "file_name": "p.jpg", "width": W, "height": H}]
    assert [a["category_id"] for a in gt["annotations"]] == [3, 1]
    assert [a["difficult"] for a in gt["annotations"]] == [1, 0] and [a["iscrowd"] for a in gt["annotations"]] == [0, 1]
    np.testing.assert_allclose(gt["annotations"][1]["bbox"], [5.5, 6.5, 54.5, 33.5])
    assert gt["annotations"][1]["area"] == pytest.approx(54.5 * 33.5)
    r = read_coco(jp).images[0]
    np.testing.assert_allclose(r.boxes, ds.images[0].boxes)
    assert r.classes.tolist() == [2, 0] and r.difficult.tolist() == [True, False]
    assert r.iscrowd.tolist() == [False, True]


def _voc_xml(fn: str, objs: list, w: int = W, h: int = H) -> str:
    o = "".join(
        f"<object><name>{n}</name><difficult>{int(d)}</difficult><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin>"
        f"<xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
        for n, d, b in objs
    )
    size = f"<size><width>{w}</width><height>{h}</height><depth>3</depth></size>"
    return f"<annotation><filename>{fn}</filename>{size}{o}</annotation>"


def _voc_dataset(tmp_path: Path, extra_obj=None) -> Path:
    root = tmp_path / "VOCdevkit" / "VOC2007"
    objs = {
        "000005": [("dog", False, (10, 12, 30, 40)), ("person", True, (1, 1, 64, 48))],
        "000012": [("person", False, (20, 5, 50, 25))] + ([extra_obj] if extra_obj else []),
    }
    for i, (stem, o) in enumerate(objs.items()):
        _img(root / "JPEGImages" / f"{stem}.jpg", seed=i)
        (root / "Annotations").mkdir(parents=True, exist_ok=True)
        (root / "Annotations" / f"{stem}.xml").write_text(_voc_xml(f"{stem}.jpg", o))
    (root / "ImageSets" / "Main").mkdir(parents=True)
    (root / "ImageSets" / "Main" / "trainval.txt").write_text("000005\n000012\n")
    return root


def test_read_voc_keeps_difficult_and_voc_class_order(tmp_path):
    _voc_dataset(tmp_path)
    ds = read_voc(tmp_path / "VOCdevkit", split="trainval")  # one year folder inside: found
    assert ds.names == list(VOC_CLASSES)
    assert [r.id for r in ds.images] == [5, 12]
    r = ds.images[0]
    np.testing.assert_array_equal(r.boxes, [[10, 12, 30, 40], [1, 1, 64, 48]])
    assert r.classes.tolist() == [VOC_CLASSES.index("dog"), VOC_CLASSES.index("person")]
    assert r.difficult.tolist() == [False, True]
    assert (r.width, r.height) == (W, H)
    assert read_voc(tmp_path / "VOCdevkit" / "VOC2007", names="data").names == ["dog", "person"]
    with pytest.raises(DataError, match=r"VOC split list not found: .*test\.txt; available: trainval"):
        read_voc(tmp_path / "VOCdevkit", split="test")


def test_read_voc_unknown_name_is_an_issue_and_default_names_stay_voc(tmp_path):
    _voc_dataset(tmp_path, extra_obj=("robot", False, (2, 2, 9, 9)))
    ds = read_voc(tmp_path / "VOCdevkit" / "VOC2007", names=["dog", "person"])
    assert [len(r) for r in ds.images] == [2, 1]
    assert [(i.kind, Path(i.file).name) for i in ds.issues] == [("unknown_class", "000012.xml")]
    assert "'robot'" in ds.issues[0].detail
    # default: the data uses VOC names, so a name outside the 20 VOC classes is reported, not made a class
    ds = read_voc(tmp_path / "VOCdevkit" / "VOC2007")
    assert ds.names == list(VOC_CLASSES) and [i.kind for i in ds.issues] == ["unknown_class"]
    assert read_voc(tmp_path / "VOCdevkit" / "VOC2007", names="data").names == ["dog", "person", "robot"]


def test_voc_to_coco_keeps_difficult_boxes_and_ids(tmp_path):
    _voc_dataset(tmp_path)
    out = tmp_path / "voc.json"
    convert(tmp_path / "VOCdevkit", out, to="coco", split="trainval")
    gt = json.loads(out.read_text())
    assert [c["name"] for c in gt["categories"]] == list(VOC_CLASSES)
    assert sorted(i["id"] for i in gt["images"]) == [5, 12]
    by = _boxes_by_file(gt)
    assert by["000005.jpg"] == sorted([("dog", 10, 12, 20, 28, 0), ("person", 1, 1, 63, 47, 1)])
    assert by["000012.jpg"] == [("person", 20, 5, 30, 20, 0)]
    voc, coco = read_voc(tmp_path / "VOCdevkit"), read_coco(out)
    for a, b in zip(voc.images, coco.images):
        assert a.id == b.id and Path(a.file) == Path(b.file)
        np.testing.assert_allclose(a.boxes, b.boxes)
        assert a.classes.tolist() == b.classes.tolist() and a.difficult.tolist() == b.difficult.tolist()


def test_read_yolo_layout_names_polygons_and_ids(tmp_path):
    root = tmp_path / "ds"
    for stem in ("10", "3"):
        _img(root / "images" / "val" / f"{stem}.jpg")
    (root / "labels" / "val").mkdir(parents=True)
    (root / "labels" / "val" / "10.txt").write_text("1 0.5 0.5 0.25 0.5\n\n")
    (root / "labels" / "val" / "3.txt").write_text("0 0.1 0.2 0.3 0.2 0.3 0.6 0.1 0.6\n")  # polygon -> its box
    cfg = {"path": "ds", "train": "images/val", "val": "images/val", "names": {"1": "b", "0": "a"}}
    (tmp_path / "data.yaml").write_text(yaml.safe_dump(cfg))
    ds = read_yolo(tmp_path / "data.yaml", "val")  # 'path' relative: resolved against the yaml's folder
    assert ds.names == ["a", "b"]
    assert [Path(r.file).name for r in ds.images] == ["10.jpg", "3.jpg"]  # Ultralytics' string sort
    assert [r.id for r in ds.images] == [10, 3]  # numeric stems
    np.testing.assert_allclose(ds.images[0].boxes, [[24, 12, 40, 36]], atol=1e-5)
    np.testing.assert_allclose(ds.images[1].boxes, [[0.1 * W, 0.2 * H, 0.3 * W, 0.6 * H]], atol=1e-5)
    assert Path(ds.images[0].label_file) == root / "labels" / "val" / "10.txt"
    assert yolo_label_path("/d/images/x/images/a.b.png") == "/d/images/x/labels/a.b.txt"

    # a .txt list with ./ paths (relative to the list) is a valid split entry too
    (root / "val.txt").write_text("./images/val/3.jpg\n")
    cfg2 = {"path": str(root), "train": "val.txt", "val": "val.txt", "names": ["a", "b"]}
    (tmp_path / "d2.yaml").write_text(yaml.safe_dump(cfg2))
    assert [Path(r.file).name for r in read_yolo(tmp_path / "d2.yaml", "val").images] == ["3.jpg"]
    with pytest.raises(DataError, match="no 'test:' entry"):
        read_yolo(tmp_path / "d2.yaml", "test")


def test_write_yolo_second_split_merges_and_rejects_other_names(tmp_path):
    a, b = _img(tmp_path / "src" / "a.jpg"), _img(tmp_path / "src" / "sub" / "b.jpg")
    ds = Dataset(["x"], [ImageRecord(1, a, W, H, [[0, 0, 32, 24]], [0]), ImageRecord(2, b, W, H)])
    out = tmp_path / "y"
    write_yolo(ds, out, "train", link="copy")
    write_yolo(ds, out, "val", link="copy")
    meta = yaml.safe_load((out / "data.yaml").read_text())
    assert (meta["train"], meta["val"]) == ("images/train", "images/val")
    assert (out / "labels" / "val" / "sub" / "b.txt").is_file()  # sub-folders kept
    ids = json.loads((out / "ids.json").read_text())
    assert ids["images/train/a.jpg"] == 1 and ids["images/val/sub/b.jpg"] == 2
    back = read_yolo(out / "data.yaml", "train")
    assert [r.id for r in back.images] == [1, 2]
    np.testing.assert_allclose(back.images[0].boxes, [[0, 0, 32, 24]], atol=1e-4)
    with pytest.raises(DataError, match="already lists other class names"):
        write_yolo(ds.replace(names=["y"]), out, "test")
    res = write_yolo(ds.replace(images=ds.images[:1]), out, "val", link="copy")  # b.jpg is now stale
    assert (res["images"], res["stale_images"]) == (1, 1)


def test_crowd_boxes_left_out_of_yolo_and_counted(tmp_path):
    a = _img(tmp_path / "a.jpg")
    ds = Dataset(["x"], [ImageRecord(1, a, W, H, [[0, 0, 10, 10], [5, 5, 20, 20]], [0, 0], iscrowd=[False, True])])
    res = write_yolo(ds, tmp_path / "y", "val")
    assert (res["boxes"], res["crowd_skipped"]) == (1, 1)
    assert len((tmp_path / "y" / "labels" / "val" / "a.txt").read_text().splitlines()) == 1


def test_detect_format_and_read_dataset_dispatch(tmp_path):
    jp = _coco_dataset(tmp_path)
    _voc_dataset(tmp_path)
    convert(jp, tmp_path / "yolo", to="yolo")
    assert detect_format(jp) == "coco" and detect_format(tmp_path / "coco") == "coco"
    assert detect_format(tmp_path / "VOCdevkit") == "voc"
    assert detect_format(tmp_path / "yolo") == "yolo" and detect_format(tmp_path / "yolo" / "data.yaml") == "yolo"
    assert read_dataset(tmp_path / "coco", "val").format == "coco"
    assert read_dataset(tmp_path / "yolo", "val").format == "yolo"
    assert len(read_dataset(tmp_path / "VOCdevkit", "trainval").images) == 2
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="cannot tell the dataset format"):
        detect_format(tmp_path / "empty")
    with pytest.raises(DataError, match="dataset not found"):
        read_dataset(tmp_path / "nope")
    with pytest.raises(DataError, match="did you mean 'yolo'"):
        convert(jp, tmp_path / "z", to="yoloo")
    # COCO written as a folder: images placed under images/<split>, json under annotations/; reads back
    res = convert(tmp_path / "yolo", tmp_path / "coco2", to="coco", split="val")
    assert res.output == tmp_path / "coco2" / "annotations" / "instances_val.json"
    back = read_dataset(tmp_path / "coco2", "val")
    assert sorted(Path(r.file).relative_to(tmp_path / "coco2").as_posix() for r in back.images) == [
        "images/val/a.jpg", "images/val/b.jpg", "images/val/c.jpg",
    ]  # fmt: skip
    assert sorted(r.id for r in back.images) == [7, 42, 1001]


def test_bad_files_give_one_clear_error(tmp_path):
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DataError, match=r"bad\.json: not valid JSON"):
        read_coco(tmp_path / "bad.json")
    (tmp_path / "nocat.json").write_text(json.dumps({"images": [], "annotations": []}))
    with pytest.raises(DataError, match="no 'categories' list"):
        read_coco(tmp_path / "nocat.json")
    (tmp_path / "d.yaml").write_text(yaml.safe_dump({"train": "x", "val": "x", "names": {0: "a", 2: "c"}}))
    with pytest.raises(DataError, match=r"'names' indices must be 0\.\.1 without gaps"):
        read_yolo(tmp_path / "d.yaml")
    with pytest.raises(DataError, match="boxes but 1 classes"):
        ImageRecord(1, "x.jpg", 1, 1, [[0, 0, 1, 1], [0, 0, 1, 1]], [0])
