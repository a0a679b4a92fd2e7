"""Dataset problems that used to pass unnoticed (issue 14, section 4): unknown VOC class names, YOLO label files
without their image, and a VOC root without the default split list on the command line."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import yaml

from detkd.cli import main
from detkd.data.convert import convert
from detkd.data.formats import VOC_CLASSES, read_voc
from detkd.data.validate import validate_dataset

W, H = 64, 48


def _img(path: Path, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), np.random.default_rng(seed).integers(0, 255, (H, W, 3), dtype=np.uint8))
    return path


def _voc(root: Path, objects: dict[str, list[str]], lists: dict[str, list[str]] | None = None) -> Path:
    """VOC2007-style folder: one image + xml per stem, each object a 10x10 box; ImageSets/Main lists."""
    (root / "Annotations").mkdir(parents=True)
    for i, (stem, names) in enumerate(objects.items()):
        _img(root / "JPEGImages" / f"{stem}.jpg", seed=i)
        objs = "".join(
            f"<object><name>{n}</name><difficult>0</difficult><bndbox><xmin>{2 + 3 * k}</xmin><ymin>2</ymin>"
            f"<xmax>{12 + 3 * k}</xmax><ymax>12</ymax></bndbox></object>"
            for k, n in enumerate(names)
        )
        (root / "Annotations" / f"{stem}.xml").write_text(
            f"<annotation><filename>{stem}.jpg</filename><size><width>{W}</width><height>{H}</height></size>"
            f"{objs}</annotation>"
        )
    (root / "ImageSets" / "Main").mkdir(parents=True)
    for split, stems in (lists or {"trainval": list(objects)}).items():
        (root / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{s}\n" for s in stems))
    return root


def test_unknown_voc_name_is_reported_not_made_a_class(tmp_path, capsys):
    # six files with the typo 'persn', then one with 'robot': both must show up, and neither becomes a class
    objects = {f"00000{i}": ["dog", "persn"] for i in range(1, 7)} | {"000007": ["person", "robot"]}
    root = _voc(tmp_path / "VOC2007", objects)
    ds = read_voc(root, "trainval")
    assert ds.names == list(VOC_CLASSES)  # before: ["dog", "persn", "person", "robot"], silently
    rep = validate_dataset(ds)
    assert rep.count("unknown_class") == 7 and rep.boxes_per_class["dog"] == 6 and rep.boxes_per_class["person"] == 1
    ex = rep.problems["unknown_class"].examples
    assert ex[0] == (
        "Annotations/000001.xml: class name 'persn' is not one of the 20 VOC classes (did you mean 'person'?); "
        "box skipped (pass --names data, Python names='data', to make every name found a class)"
    )
    assert any("'robot'" in e for e in ex)  # the second unknown name is among the 5 examples

    out = tmp_path / "yolo"
    assert main(["data", "convert", str(root), str(out), "--split", "trainval"]) == 0
    text = capsys.readouterr().out
    assert "WARNING unknown_class" in text and "'persn'" in text
    names = yaml.safe_load((out / "data.yaml").read_text())["names"]
    assert list(names.values()) == list(VOC_CLASSES)
    # the user opts in to the data's own names
    assert main(["data", "convert", str(root), str(tmp_path / "yolo2"), "--split", "trainval", "--names", "data"]) == 0
    capsys.readouterr()
    names = yaml.safe_load((tmp_path / "yolo2" / "data.yaml").read_text())["names"]
    assert list(names.values()) == ["dog", "persn", "person", "robot"]  # sorted
    # a custom dataset (no VOC name at all) still takes its own names
    custom = _voc(tmp_path / "custom" / "VOC2007", {"000001": ["forklift", "pallet"]})
    assert read_voc(custom, "trainval").names == ["forklift", "pallet"]
    # --names on a non-VOC dataset is one clear error
    assert main(["data", "validate", str(out / "data.yaml"), "--names", "a,b"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "applies to VOC data only" in err


def test_yolo_label_without_image_is_reported(tmp_path, capsys):
    im, lb = tmp_path / "images" / "val", tmp_path / "labels" / "val"
    _img(im / "a.jpg")
    lb.mkdir(parents=True)
    (lb / "a.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    (lb / "ghost.txt").write_text("0 0.5 0.5 0.2 0.2\n0 0.2 0.2 0.1 0.1\n")  # its image was deleted
    (im / "anim.gif").write_bytes(b"GIF89a")  # a suffix Ultralytics does not load
    (lb / "anim.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    (tmp_path / "data.yaml").write_text(yaml.safe_dump({"path": str(tmp_path), "train": "images/val",
                                                        "val": "images/val", "names": ["x"]}))  # fmt: skip
    rep = validate_dataset(tmp_path / "data.yaml")
    assert {k: p.count for k, p in rep.problems.items()} == {"orphan_label": 2}  # before: no problem at all
    assert sorted(rep.problems["orphan_label"].examples) == [
        "labels/val/anim.txt: no image Ultralytics loads for this label file (anim.gif has another suffix); "
        "its 1 box(es) are not used",
        "labels/val/ghost.txt: no image for this label file (looked for images/val/ghost.*); "
        "its 2 box(es) are not used",
    ]
    assert main(["data", "validate", str(tmp_path / "data.yaml")]) == 0
    out = capsys.readouterr().out
    assert "WARNING orphan_label             2 label files not used; restore the image or delete the label file" in out


def test_voc_without_val_list_cli_can_read_every_xml(tmp_path, capsys):
    root = _voc(tmp_path / "VOC2007", {"000001": ["dog"], "000002": ["cat"], "000003": ["dog"]},
                lists={"trainval": ["000001", "000002"]})  # fmt: skip
    assert main(["data", "validate", str(root)]) == 2  # default --split val: no val.txt
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert "available: trainval; pass one with --split trainval (Python: split='trainval'), or --split all" in err
    assert main(["data", "validate", str(root), "--split", "all"]) == 0
    assert "images: 3 read, 3 kept" in capsys.readouterr().out
    r = convert(root, tmp_path / "all.json", to="coco", split="all")
    assert r.images == 3 and len(read_voc(root, split=None).images) == 3
