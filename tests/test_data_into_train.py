"""COCO and VOC straight into `detkd train`: `detkd.data.resolve` validates, converts into a content-keyed cache
(reused while the source is unchanged, rebuilt when an annotation changes), keeps class names and order (VOC's 20
in the devkit's order), and refuses a missing val split or a dataset with errors in one clear line.

Tiny data at 64 px and untrained pico teachers: the two `detkd train` runs take 1 epoch each.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from detkd.integrations.ultralytics_env import ensure_ultralytics_offline

ensure_ultralytics_offline()

from detkd.assets import PICO_YAML  # noqa: E402
from detkd.cli import main  # noqa: E402
from detkd.data.convert import convert  # noqa: E402
from detkd.data.formats import VOC_CLASSES, read_yolo  # noqa: E402
from detkd.data.resolve import resolve_data  # noqa: E402
from detkd.data.validate import validate_dataset  # noqa: E402
from detkd.errors import DataError  # noqa: E402
from detkd.train import check_data_yaml, load_train_config  # noqa: E402
from helpers import rect_dataset  # noqa: E402

IMGSZ = 64
RECT_NAMES = ["red", "green", "blue"]


def _teacher(path: Path, names: list[str]) -> Path:
    """An untrained pico detector with these class names, saved as an Ultralytics checkpoint (a stand-in teacher)."""
    from ultralytics import YOLO
    from ultralytics.nn.tasks import DetectionModel

    m = YOLO(str(PICO_YAML))
    m.model = DetectionModel(str(PICO_YAML), nc=len(names), verbose=False)
    m.model.names = dict(enumerate(names))
    m.save(str(path))
    return path


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory) -> Path:
    """A COCO folder: annotations/instances_{train,val}.json + images/{train,val} (from the rectangles dataset)."""
    base = tmp_path_factory.mktemp("coco")
    y = rect_dataset(base / "rects", IMGSZ, n_train=8, n_val=4)
    for split in ("train", "val"):
        convert(y, base / "coco", to="coco", split=split, link="copy")
    return base / "coco"


def _voc_year(root: Path, year: str, lists: dict[str, list[tuple[str, list[tuple[str, list[int]]]]]]) -> None:
    """Write VOC``year`` under ``root``: for each list name, images (stem, [(class, [x1, y1, x2, y2])])."""
    d = root / f"VOC{year}"
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    for name, items in lists.items():
        for stem, objs in items:
            im = np.full((IMGSZ, IMGSZ, 3), 90, np.uint8)
            xml = [f"<annotation><filename>{stem}.jpg</filename><size><width>{IMGSZ}</width><height>{IMGSZ}</height>"
                   "<depth>3</depth></size>"]
            for c, (x1, y1, x2, y2) in objs:
                cv2.rectangle(im, (x1, y1), (x2, y2), (40 * (len(c) % 6), 200, 60), -1)
                xml.append(f"<object><name>{c}</name><difficult>0</difficult><bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin>"
                           f"<xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>")
            cv2.imwrite(str(d / "JPEGImages" / f"{stem}.jpg"), im)
            (d / "Annotations" / f"{stem}.xml").write_text("".join(xml) + "</annotation>")
        (d / "ImageSets" / "Main" / f"{name}.txt").write_text("".join(f"{s}\n" for s, _ in items))


@pytest.fixture(scope="module")
def voc_root(tmp_path_factory) -> Path:
    """VOCdevkit with VOC2007 (trainval 4 images, an annotated test list of 2) and VOC2012 (train 2 + val 1, and their
    trainval). Classes used: dog, person, car (VOC order: car 6, dog 11, person 14)."""
    dev = tmp_path_factory.mktemp("voc") / "VOCdevkit"
    boxes = [("dog", [4, 4, 30, 30]), ("person", [30, 20, 60, 60]), ("car", [10, 36, 40, 58])]
    tv07 = [(f"00000{i}", [boxes[i % 3], boxes[(i + 1) % 3]]) for i in range(1, 5)]
    test07 = [(f"00001{i}", [boxes[i % 3]]) for i in range(2)]
    _voc_year(dev, "2007", {"trainval": tv07, "test": test07})
    tr12 = [(f"2008_00000{i}", [boxes[i % 3]]) for i in range(2)]
    va12 = [("2008_000009", [boxes[2]])]
    _voc_year(dev, "2012", {"train": tr12, "val": va12, "trainval": tr12 + va12})
    return dev


def _train_cfg(tmp_path: Path, teacher: Path, data, name: str) -> Path:
    cfg = {"teacher": str(teacher), "student": str(PICO_YAML), "data": data, "epochs": 1, "imgsz": IMGSZ, "batch": 4,
           "device": "cpu", "workers": 0, "project": str(tmp_path / "runs"), "name": name, "plots": False,
           "threads": 1, "distill": {"logits": {"method": "sigmoid_kd", "weight": 1.0}, "boxes": None,
                                     "features": None}}
    p = tmp_path / f"{name}.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def test_coco_folder_straight_into_detkd_train_and_cache_reused(coco_root, tmp_path, capsys):
    teacher = _teacher(tmp_path / "t3.pt", RECT_NAMES)
    cfg = _train_cfg(tmp_path, teacher, str(coco_root), "coco")
    assert main(["train", str(cfg)]) == 0, capsys.readouterr().err[-3000:]
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if ln.startswith("detkd data: "))
    assert f"converted COCO {coco_root} -> " in line and "train: 8 images, val: 4 images, 3 classes" in line
    assert (tmp_path / "runs" / "coco" / "weights" / "best.pt").is_file()
    yml = Path(line.split(" -> ")[1].split(" (")[0])
    assert read_yolo(yml, "train").names == RECT_NAMES  # class names and order kept
    assert len(read_yolo(yml, "val").images) == 4
    stamp = yml.stat().st_mtime_ns, (yml.parent / "detkd_source.json").stat().st_mtime_ns

    # second `detkd train` on the same source: the same cache folder, nothing rewritten
    from detkd.train import prepare

    _, args, _ = prepare(load_train_config(cfg))
    assert args["data"] == str(yml)
    assert (yml.stat().st_mtime_ns, (yml.parent / "detkd_source.json").stat().st_mtime_ns) == stamp
    r = resolve_data(str(coco_root))
    assert r.action == "reused" and r.data_yaml == yml
    assert "converted" not in capsys.readouterr().out


def test_voc_root_straight_into_detkd_train_standard_class_order(voc_root, tmp_path, capsys):
    teacher = _teacher(tmp_path / "t20.pt", list(VOC_CLASSES))
    cfg = _train_cfg(tmp_path, teacher, str(voc_root), "voc")
    rc = main(["train", str(cfg)])
    cap = capsys.readouterr()
    assert rc == 0, cap.err[-3000:]
    assert "file not found" not in cap.err  # the old message for an existing VOC folder
    line = next(ln for ln in cap.out.splitlines() if ln.startswith("detkd data: "))
    # the rule: an annotated VOC2007 test list -> train = trainval of every year, val = VOC2007 test
    assert f"converted VOC {voc_root} -> " in line
    assert "train: 7 images (VOC2007 trainval + VOC2012 trainval), val: 2 images (VOC2007 test), 20 classes" in line
    yml = Path(line.split(" -> ")[1].split(" (")[0])
    assert check_data_yaml(yml)["_nc"] == 20
    tr = read_yolo(yml, "train")
    assert tr.names == list(VOC_CLASSES)  # the devkit's order, not the order names appear in, not sorted
    cls = {tr.names[c] for r in tr.images for c in r.classes}
    assert cls == {"dog", "person", "car"}
    assert (tmp_path / "runs" / "voc" / "weights" / "best.pt").is_file()

    # without an annotated test list: train = train lists, val = val lists (trainval would hold the val images)
    r = resolve_data(voc_root / "VOC2012", cache_dir=tmp_path / "cache")
    assert r.action == "converted" and r.format == "voc"
    assert len(read_yolo(r.data_yaml, "train").images) == 2 and len(read_yolo(r.data_yaml, "val").images) == 1
    assert read_yolo(r.data_yaml, "val").names == list(VOC_CLASSES)


def test_cache_reused_then_rebuilt_when_an_annotation_changes(coco_root, tmp_path, capsys):
    src = tmp_path / "coco"
    shutil.copytree(coco_root, src)
    cache = tmp_path / "cache"
    r1 = resolve_data(src, cache_dir=cache)
    assert r1.action == "converted" and r1.cache.parent == cache.resolve()
    assert f"detkd data: converted COCO {src}" in capsys.readouterr().out
    stamp = r1.data_yaml.stat().st_mtime_ns
    r2 = resolve_data(src, cache_dir=cache)
    assert r2.action == "reused" and r2.data_yaml == r1.data_yaml and r2.data_yaml.stat().st_mtime_ns == stamp
    assert not list(cache.glob(".tmp-*"))  # built under a temporary name, renamed into place

    # an annotation changes: a new key, a new folder, the new box in its labels; the old folder is left alone
    jp = src / "annotations" / "instances_train.json"
    d = json.loads(jp.read_text())
    d["annotations"][0]["bbox"] = [1.0, 2.0, 20.0, 30.0]
    jp.write_text(json.dumps(d))
    r3 = resolve_data(src, cache_dir=cache)
    assert r3.action == "converted" and r3.key != r1.key and r1.data_yaml.is_file()
    first = next(r for r in read_yolo(r3.data_yaml, "train").images if r.id == d["annotations"][0]["image_id"])
    assert np.allclose(first.boxes[0], [1.0, 2.0, 21.0, 32.0], atol=1e-3)
    assert resolve_data(src, cache_dir=cache).action == "reused"

    # an image replaced (size / mtime change) also rebuilds
    img = sorted((src / "images" / "val").glob("*.jpg"))[0]
    cv2.imwrite(str(img), np.zeros((IMGSZ, IMGSZ, 3), np.uint8))
    assert resolve_data(src, cache_dir=cache).action == "converted"

    # an Ultralytics data yaml is used as it is
    yml = next(Path(coco_root).parent.glob("rects/data.yaml"))
    r = resolve_data(yml, cache_dir=cache)
    assert r.action == "as_is" and r.data_yaml == yml


def test_missing_val_split_is_one_clear_error(coco_root, tmp_path, capsys):
    train_json = coco_root / "annotations" / "instances_train.json"
    lone = tmp_path / "mine.json"
    shutil.copy(train_json, lone)
    with pytest.raises(DataError) as e:
        resolve_data(lone, cache_dir=tmp_path / "c")
    msg = str(e.value)
    assert str(lone) in msg and "val split" in msg and "instances_val.json" in msg and "{train:" in msg
    only_train = tmp_path / "only_train"
    (only_train / "annotations").mkdir(parents=True)
    shutil.copy(train_json, only_train / "annotations" / "instances_train.json")
    with pytest.raises(DataError, match="no val split"):
        resolve_data(only_train, cache_dir=tmp_path / "c")
    with pytest.raises(DataError, match=r"\{train: \.\.\., val: \.\.\.\}"):
        resolve_data({"train": str(train_json)}, cache_dir=tmp_path / "c")

    # the same through `detkd train`: exit 2, one line naming the json, no traceback, nothing trained
    teacher = _teacher(tmp_path / "t3.pt", RECT_NAMES)
    cfg = _train_cfg(tmp_path, teacher, str(lone), "noval")
    assert main(["train", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("detkd train: error: data: ") and str(lone) in err and "val split" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "runs").exists()

    # a mapping {train, val}, relative to the config file, works
    rel = Path(os.path.relpath(coco_root / "annotations", tmp_path))
    c = tmp_path / "map.yaml"
    c.write_text(yaml.safe_dump({"teacher": str(teacher), "student": "x.yaml",
                                 "data": {"train": str(rel / "instances_train.json"),
                                          "val": str(rel / "instances_val.json")}}))
    cfg_map = load_train_config(c)
    assert Path(cfg_map["data"]["train"]).resolve() == train_json.resolve()
    r = resolve_data(cfg_map["data"], cache_dir=tmp_path / "c")
    assert r.action == "converted" and r.format == "coco" and read_yolo(r.data_yaml, "val").names == RECT_NAMES
    assert len(read_yolo(r.data_yaml, "train").images) == 8


def test_voc_and_folder_errors_name_the_path_and_what_is_expected(voc_root, tmp_path):
    # an existing VOC folder never reads "file not found": it is converted, or refused saying which list is missing
    y = tmp_path / "VOC2099"
    shutil.copytree(voc_root / "VOC2012", y)
    for n in ("train", "val"):
        (y / "ImageSets" / "Main" / f"{n}.txt").unlink()
    with pytest.raises(DataError) as e:
        resolve_data(y, cache_dir=tmp_path / "c")
    msg = str(e.value)
    assert "file not found" not in msg and str(y) in msg and "ImageSets/Main/train.txt" in msg and "trainval" in msg
    # custom class names (none of VOC's): every name found in any year or list, sorted, the same for both splits
    _voc_year(tmp_path / "custom", "1", {"train": [("1", [("zebra", [2, 2, 20, 20]), ("apple", [30, 30, 50, 50])])],
                                         "val": [("2", [("apple", [5, 5, 25, 25])])]})
    r = resolve_data(tmp_path / "custom", cache_dir=tmp_path / "c")
    assert read_yolo(r.data_yaml, "val").names == read_yolo(r.data_yaml, "train").names == ["apple", "zebra"]
    with pytest.raises(DataError, match="is a folder"):
        check_data_yaml(voc_root)  # the yaml checker alone says what it got, not "file not found"
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=f"data: {empty} is a folder but not a dataset detkd knows; expected"):
        resolve_data(empty)
    with pytest.raises(DataError, match="data: not found: .*nowhere; expected an Ultralytics data yaml, a COCO"):
        resolve_data(tmp_path / "nowhere")


def test_problems_print_the_validate_summary_and_errors_refuse(coco_root, tmp_path, capsys):
    src = tmp_path / "coco"
    shutil.copytree(coco_root, src)
    jp = src / "annotations" / "instances_train.json"
    d = json.loads(jp.read_text())
    d["annotations"][0]["bbox"] = [50.0, 50.0, 40.0, 40.0]  # beyond the 64 px image: clipped, a warning
    jp.write_text(json.dumps(d))
    r = resolve_data(src, cache_dir=tmp_path / "c")
    out = capsys.readouterr().out
    assert r.action == "converted" and "box_outside" in out
    assert validate_dataset(src, split="train").summary() in out  # the text `detkd data validate` prints
    assert f"`detkd data validate {jp}` prints the same summary" in out
    assert (r.cache / "validation.txt").is_file()

    d["images"][1]["id"] = d["images"][0]["id"]  # repeated image id: an error, nothing written
    jp.write_text(json.dumps(d))
    with pytest.raises(DataError) as e:
        resolve_data(src, cache_dir=tmp_path / "c3")
    assert "duplicate_id" in str(e.value) and "\n" not in str(e.value) and str(jp) in str(e.value)
    err = capsys.readouterr().err
    assert "duplicate_id" in err and "problems: 1 error(s)" in err
    assert not (tmp_path / "c3").exists() or not any((tmp_path / "c3").iterdir())


def test_labels_cache_written_atomically_when_another_training_removed_it(tmp_path, monkeypatch):
    """Two trainings scanning the same labels at once: Ultralytics' writer checks ``exists()`` then ``unlink()``s,
    and the second unlink of one file raised FileNotFoundError, killing a benchmark stage at its start. detkd's
    writer (installed by importing the integration) replaces the file atomically instead."""
    from pathlib import Path

    import numpy as np

    import detkd.integrations.ultralytics  # noqa: F401 - installs the writer
    import ultralytics.data.dataset as dataset

    path = tmp_path / "labels" / "train.cache"
    path.parent.mkdir()
    monkeypatch.setattr(Path, "exists", lambda self, *a, **k: True)  # another process saw it, then removed it
    dataset.save_dataset_cache_file("t: ", path, {"labels": [1, 2]}, "1.0.3")
    monkeypatch.undo()
    x = np.load(str(path), allow_pickle=True).item()
    assert x == {"labels": [1, 2], "version": "1.0.3"} and [p.name for p in path.parent.iterdir()] == ["train.cache"]
