"""`detkd eval` cannot silently mis-score: classes matched by name, the model's own image size, existing
detections scored with either engine, damaged images named (issue 14, section 4)."""

from __future__ import annotations

import copy
import json
import shutil
import sys

import numpy as np
import pytest
import yaml

from detkd.eval.predict import ensure_ultralytics_offline

ensure_ultralytics_offline()  # before Ultralytics is first imported

from helpers import rect_dataset  # noqa: E402
from test_eval_coco import _make_data, _pycocotools_direct  # noqa: E402

from detkd.cli import main  # noqa: E402
from detkd.data.formats import read_dataset, write_coco  # noqa: E402
from detkd.errors import ClassMismatchError, DataError, EvalError  # noqa: E402
from detkd.eval import evaluate_detections, evaluate_model  # noqa: E402
from detkd.eval.classes import match_classes  # noqa: E402
from detkd.eval.coco import evaluate_coco  # noqa: E402

torch = pytest.importorskip("torch")
IMGSZ = 64
DS_NAMES = ["red", "green", "blue"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tiny YOLOv8n (nc=3) saved three times with different class names, trained-at size 64 in its
    ``train_args`` (as Ultralytics' trainer writes it); its ONNX export; a 64 px rectangle dataset."""
    from ultralytics import YOLO
    from ultralytics.nn.tasks import DetectionModel

    d = tmp_path_factory.mktemp("evalsafety")
    data = rect_dataset(d / "ds", IMGSZ, n_train=1, n_val=4)
    torch.manual_seed(0)
    dm = DetectionModel("yolov8n.yaml", nc=3, verbose=False)
    with torch.no_grad():  # make outputs depend on the input (see tests/test_predict.py)
        for m in dm.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.momentum = 1.0
        dm.train()
        dm(torch.rand(4, 3, IMGSZ, IMGSZ))
        dm.eval()
    pts = {}
    for tag, names in (("same", DS_NAMES), ("permuted", ["blue", "red", "green"]),
                       ("other", ["person", "bicycle", "car"])):  # fmt: skip
        dm.names = dict(enumerate(names))
        y = YOLO("yolov8n.yaml")
        y.model = dm
        y.ckpt = {"train_args": {"imgsz": IMGSZ, "epochs": 1}}
        pts[tag] = d / f"{tag}.pt"
        y.save(pts[tag])
    onnx = YOLO(str(pts["same"])).export(format="onnx", imgsz=IMGSZ, simplify=False, dynamic=False, verbose=False)
    return {"dir": d, "data": data, "pt": pts, "onnx": onnx}


def _perfect_predictor(monkeypatch, ds, model_index_of):
    """Replace the Ultralytics predictor by one that finds every ground-truth box exactly (score 1), reporting
    dataset class ``c`` as model class index ``model_index_of[c]`` -- what a perfect model with those class
    names outputs. Category ids still go through detkd's real class-index -> category-id lookup."""
    import detkd.eval.predict as P

    by_id = {r.id: r for r in ds.images}
    calls = []

    def fake(weights, images, imgsz=640, conf=0.001, iou=0.7, max_det=300, device="cpu", batch=16, class_map=None,
             **kw):  # fmt: skip
        calls.append(imgsz)
        lut = P._category_lookup(class_map, 3)
        out = []
        for image_id, _ in images:
            r = by_id[image_id]
            cls = np.array([model_index_of[c] for c in r.classes.tolist()], np.int64)
            out += P.to_coco_detections(image_id, r.boxes, np.ones(len(cls)), cls, lut)
        return out

    monkeypatch.setattr(P, "predict_ultralytics", fake)
    return calls


def test_model_classes_are_matched_to_dataset_classes_by_name(assets, monkeypatch, tmp_path):
    ds = read_dataset(assets["data"], "val")
    assert len({c for r in ds.images for c in r.classes.tolist()}) == 3  # every class has boxes
    model_names = ["blue", "red", "green"]  # the same classes, listed in another order
    _perfect_predictor(monkeypatch, ds, {c: model_names.index(n) for c, n in enumerate(DS_NAMES)})
    m = evaluate_model(assets["pt"]["permuted"], assets["data"], out_dir=tmp_path, progress=False)
    # a perfect detector scores 1.0; scoring model class i as dataset category i + 1 gave ~0
    assert m["AP"] == 1.0 and m["AP50"] == 1.0
    assert {k: v["AP"] for k, v in m["per_class"].items()} == {"red": 1.0, "green": 1.0, "blue": 1.0}
    assert m["class_match"]["model_to_dataset"] == {"blue": "blue", "red": "red", "green": "green"}
    dets = json.loads((tmp_path / "detections.json").read_text())
    gt = json.loads((tmp_path / "gt.json").read_text())
    assert {c["name"]: c["id"] for c in gt["categories"]} == {"red": 1, "green": 2, "blue": 3}
    assert evaluate_coco(gt, dets)["AP"] == 1.0  # the written files agree on their own


def test_names_that_do_not_match_are_refused_with_the_remap_to_pass(assets, capsys):
    with pytest.raises(ClassMismatchError) as e:
        evaluate_model(assets["pt"]["other"], assets["data"], progress=False)
    msg = str(e.value)
    assert "dataset class(es) with boxes but no model class of that name: 'red', 'green', 'blue'" in msg
    assert "model class(es) not in the dataset: 'person', 'bicycle', 'car'" in msg
    assert "--class-map person=red,bicycle=green,car=blue" in msg
    rc = main(["eval", str(assets["pt"]["other"]), "--data", str(assets["data"])])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith("detkd eval: error: the model's class names do not match the dataset's")


def test_class_map_remaps_and_rejects_unknown_names(assets, monkeypatch, tmp_path):
    ds = read_dataset(assets["data"], "val")
    # the "other" model's person / bicycle / car are, in truth, blue / red / green
    truth = {"person": "blue", "bicycle": "red", "car": "green"}
    model_names = ["person", "bicycle", "car"]
    _perfect_predictor(monkeypatch, ds, {DS_NAMES.index(v): model_names.index(k) for k, v in truth.items()})
    cmap = ",".join(f"{k}={v}" for k, v in truth.items())
    m = evaluate_model(assets["pt"]["other"], assets["data"], out_dir=tmp_path, progress=False, class_map=cmap)
    assert m["AP"] == 1.0 and m["class_match"]["model_to_dataset"] == truth
    with pytest.raises(ClassMismatchError, match=r"--class-map persn=blue: 'persn' is not a model class "
                                                 r"\(model classes: 'person', 'bicycle', 'car'\)"):  # fmt: skip
        evaluate_model(assets["pt"]["other"], assets["data"], progress=False, class_map="persn=blue")
    with pytest.raises(ClassMismatchError, match="'bleu' is not a dataset class"):
        evaluate_model(assets["pt"]["other"], assets["data"], progress=False, class_map="person=bleu")
    with pytest.raises(ClassMismatchError, match="'green'"):  # dropping the class that is green leaves it unscored
        evaluate_model(assets["pt"]["other"], assets["data"], progress=False, class_map="person=blue,bicycle=red,car=-")


def test_match_classes_superset_order_empty_classes_and_nameless_models():
    m = match_classes({0: "person", 1: "bicycle", 2: "car"}, ["car", "person"])
    assert m.category_of == {0: 2, 1: None, 2: 1} and m.ignored == ["bicycle"] and m.reordered
    assert "detections dropped: 'bicycle'" in m.describe()
    # a dataset class without boxes in this split needs no model class (its AP is undefined either way)
    m = match_classes(["a"], ["a", "b"], boxes_per_class=[5, 0])
    assert m.category_of == {0: 1} and m.unmatched_empty == ["b"]
    with pytest.raises(ClassMismatchError, match="'b'"):
        match_classes(["a"], ["a", "b"], boxes_per_class=[5, 1])
    with pytest.raises(ClassMismatchError, match="no class names .* --class-map 0=x,1=y"):
        match_classes(None, ["x", "y"], nc=2)
    assert match_classes(None, ["x", "y"], "0=y,1=x", nc=2).category_of == {0: 2, 1: 1}


def test_default_imgsz_is_the_models_own_and_printed(assets, tmp_path, capsys):
    from detkd.eval.predict import predict_onnx, predict_ultralytics

    ds = read_dataset(assets["data"], "val")
    images = [(r.id, r.file) for r in ds.images]
    rc = main(["eval", str(assets["pt"]["same"]), "--data", str(assets["data"]), "--out", str(tmp_path / "pt"),
               "--no-voc"])  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 0
    assert "detkd eval: imgsz 64 (the checkpoint's training size, train_args['imgsz']; --imgsz overrides it)" in out
    assert "detkd eval: classes: 3 model class(es) scored as dataset classes, matched by name" in out
    m = json.loads((tmp_path / "pt" / "metrics.json").read_text())
    assert m["imgsz"] == 64 and "train_args" in m["imgsz_source"]
    dets = json.loads((tmp_path / "pt" / "detections.json").read_text())
    ref = predict_ultralytics(assets["pt"]["same"], images, imgsz=64, progress=False)  # independent run at 64
    assert len(dets) == len(ref) > 0
    np.testing.assert_allclose([d["bbox"] for d in dets], [d["bbox"] for d in ref], atol=1e-3)
    assert [d["category_id"] for d in dets] == [d["category_id"] for d in ref]
    assert predict_ultralytics(assets["pt"]["same"], images, imgsz=640, progress=False) != ref  # 640 differs

    # an ONNX export (fixed 64 px input): evaluated at 64, not refused as "imgsz=640 does not match"
    mo = evaluate_model(assets["onnx"], assets["data"], out_dir=tmp_path / "onnx", progress=False, voc=False)
    assert mo["imgsz"] == 64 and mo["imgsz_source"] == "the ONNX model's input shape"
    ro = predict_onnx(assets["onnx"], images, progress=False)
    assert mo["num_detections"] == len(ro) and mo["stats"] == evaluate_coco(tmp_path / "onnx" / "gt.json", ro)["stats"]


def test_truncated_jpeg_is_flagged_by_convert_and_named_by_eval(assets, tmp_path, capsys):
    from detkd.data.convert import convert

    src = tmp_path / "ds"
    shutil.copytree(assets["dir"] / "ds", src)
    y = yaml.safe_load((src / "data.yaml").read_text())
    y["path"] = str(src)
    (src / "data.yaml").write_text(yaml.safe_dump(y))
    cut = src / "images" / "val" / "2.jpg"
    cut.write_bytes(cut.read_bytes()[:-40])  # header intact, end marker gone: PIL's load() raises OSError
    r = convert(src / "data.yaml", tmp_path / "coco.json", to="coco", split="val")
    assert r.report.count("truncated_jpeg") == 1 and r.images == 4
    assert "truncated_jpeg" in r.summary() and "`detkd eval` refuses it" in r.summary()
    with pytest.raises(DataError) as e:  # before: a raw OSError from inside Ultralytics' loader
        evaluate_model(assets["pt"]["same"], tmp_path / "coco.json", split="val", progress=False)
    assert f"1 image(s) cannot be decoded in full: {cut} (JPEG cut short: its end marker is missing)" in str(e.value)
    rc = main(["eval", str(assets["pt"]["same"]), "--data", str(tmp_path / "coco.json")])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and str(cut) in err


# ---- existing detections, no model -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def coco_files(tmp_path_factory):
    gt, dets = _make_data()  # category ids 1, 2, 5, 7 (not 1..K)
    d = tmp_path_factory.mktemp("dets")
    (d / "gt.json").write_text(json.dumps(gt))
    (d / "dets.json").write_text(json.dumps(dets))
    return d, gt, dets, _pycocotools_direct(d / "gt.json", dets)


def test_detections_file_scored_like_pycocotools_with_either_engine(coco_files, capsys):
    d, gt, dets, ref = coco_files
    for engine in ("pycocotools", "faster"):
        m = evaluate_detections(d / "dets.json", d / "gt.json", engine=engine)
        assert m["stats"] == [float(s) for s in ref.stats], engine  # the file's own category ids, exactly
        assert list(m["per_class"]) == ["car", "person", "dog", "kite"] and m["engine"] == engine
    rc = main(["eval", "--detections", str(d / "dets.json"), "--data", str(d / "gt.json"), "--engine", "faster"])
    out = capsys.readouterr().out
    assert rc == 0 and f"written: {d / 'eval_dets'}/metrics.json" in out
    assert json.loads((d / "eval_dets" / "metrics.json").read_text())["stats"] == [float(s) for s in ref.stats]


def test_detections_with_unknown_category_or_image_are_refused(coco_files, capsys):
    d, gt, dets, _ = coco_files
    bad = copy.deepcopy(dets) + [{"image_id": 100, "category_id": 3, "bbox": [1, 1, 5, 5], "score": 0.5}]
    with pytest.raises(EvalError, match=r"1 detection category_id\(s\) are not ground-truth categories: \[3\].*"
                                        r"1=car, 2=person, 5=dog, 7=kite"):  # fmt: skip
        evaluate_detections(bad, d / "gt.json")
    with pytest.raises(DataError, match="not in the ground truth"):
        evaluate_detections([{**dets[0], "image_id": 5}], d / "gt.json")
    with pytest.raises(DataError, match=r"detection #0 is not a COCO result"):
        evaluate_detections([{"image_id": 100, "bbox": [1, 1, 2, 2], "score": 1}], d / "gt.json")
    assert main(["eval", "--data", str(d / "gt.json")]) == 2  # neither a model nor --detections
    assert "give a model file" in capsys.readouterr().err


def test_missing_faster_engine_is_one_clear_error(coco_files, monkeypatch):
    d, *_ = coco_files
    monkeypatch.setitem(sys.modules, "faster_coco_eval", None)  # import now raises ImportError
    with pytest.raises(EvalError, match=r"engine 'faster' needs faster-coco-eval, which is not installed: "
                                        r"pip install faster-coco-eval"):  # fmt: skip
        evaluate_detections(d / "dets.json", d / "gt.json", engine="faster")


def test_detections_on_yolo_data_use_class_order_ids(assets):
    ds = read_dataset(assets["data"], "val")
    rng = np.random.default_rng(0)
    dets = []
    for r in ds.images:
        for b, c in zip(r.boxes.tolist(), r.classes.tolist()):
            j = rng.normal(0, 1.0, 4)
            dets.append({"image_id": r.id, "category_id": c + 1, "score": float(rng.random()),
                         "bbox": [b[0] + j[0], b[1] + j[1], b[2] - b[0] + j[2], b[3] - b[1] + j[3]]})  # fmt: skip
    m = evaluate_detections(dets, assets["data"], voc=False)
    gt = write_coco(ds, assets["dir"] / "gt_ref.json")["json"]
    assert m["stats"] == [float(s) for s in _pycocotools_direct(gt, dets).stats]
    assert list(m["per_class"]) == DS_NAMES and 0 < m["AP"] < 1
