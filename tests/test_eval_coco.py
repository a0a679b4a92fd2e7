"""detkd.eval.coco against pycocotools' COCOeval called directly (and faster-coco-eval)."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math

import numpy as np
import pytest

from detkd.errors import DataError
from detkd.eval.coco import STAT_NAMES, evaluate_coco, write_metrics_json, write_results_json

CATS = [{"id": 1, "name": "car"}, {"id": 2, "name": "person"}, {"id": 5, "name": "dog"}, {"id": 7, "name": "kite"}]
# car, person: gt + detections; dog: gt but no detections (AP 0); kite: no gt, a few detections (AP undefined)


def _make_data(seed: int = 0, n_images: int = 20):
    rng = np.random.default_rng(seed)
    images = [{"id": 100 + i, "width": 640, "height": 480, "file_name": f"{i}.jpg"} for i in range(n_images)]
    anns, dets = [], []
    for im in images:
        if im["id"] == 103:  # an image with no ground truth: its detections are all false positives
            dets += [
                {"image_id": 103, "category_id": 1, "bbox": [10.0, 10.0, 50.0, 40.0], "score": 0.9},
                {"image_id": 103, "category_id": 2, "bbox": [200.0, 100.0, 20.0, 20.0], "score": 0.4},
            ]
            continue
        for _ in range(int(rng.integers(1, 7))):
            cat = int(rng.choice([1, 2, 5]))
            side = float(rng.choice([12.0, 50.0, 180.0]))  # small / medium / large
            w, h = side * rng.uniform(0.6, 1.4), side * rng.uniform(0.6, 1.4)
            x, y = rng.uniform(0, 640 - w), rng.uniform(0, 480 - h)
            crowd = int(rng.random() < 0.1)
            anns.append({"id": len(anns) + 1, "image_id": im["id"], "category_id": cat, "bbox": [x, y, w, h],
                         "area": w * h, "iscrowd": crowd})  # fmt: skip
            if cat == 5:
                continue
            for _ in range(int(rng.integers(0, 4))):  # 0..3 detections per object: misses and duplicates
                j = rng.normal(0.0, 0.12 * side, 4)
                dets.append({"image_id": im["id"], "category_id": cat,
                             "bbox": [x + j[0], y + j[1], max(1.0, w + j[2]), max(1.0, h + j[3])],
                             "score": float(rng.random())})  # fmt: skip
        for _ in range(int(rng.integers(0, 3))):  # background false positives, some in class "kite"
            dets.append({"image_id": im["id"], "category_id": int(rng.choice([1, 2, 7])),
                         "bbox": [*rng.uniform(0, 400, 2).tolist(), *rng.uniform(5, 150, 2).tolist()],
                         "score": float(rng.random())})  # fmt: skip
    gt = {"images": images, "annotations": anns, "categories": CATS}
    return gt, dets


def _pycocotools_direct(gt_path, dets):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(str(gt_path))
        coco_dt = coco_gt.loadRes(copy.deepcopy(dets))
        ev = COCOeval(coco_gt, coco_dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    gt, dets = _make_data()
    path = tmp_path_factory.mktemp("coco") / "gt.json"
    path.write_text(json.dumps(gt))
    anns = gt["annotations"]
    areas = np.array([a["area"] for a in anns])
    # the fixture covers what it claims to
    assert (areas < 32**2).any() and ((areas >= 32**2) & (areas < 96**2)).any() and (areas >= 96**2).any()
    assert any(a["iscrowd"] for a in anns)
    assert not any(d["category_id"] == 5 for d in dets) and any(a["category_id"] == 5 for a in anns)
    assert not any(a["category_id"] == 7 for a in anns) and any(d["category_id"] == 7 for d in dets)
    return gt, dets, path, _pycocotools_direct(path, dets)


def test_stats_identical_to_pycocotools(data, capsys):
    gt, dets, path, ref = data
    gt0, dets0 = copy.deepcopy(gt), copy.deepcopy(dets)
    m = evaluate_coco(gt, dets)
    assert capsys.readouterr().out == ""  # pycocotools' prints are captured
    assert gt == gt0 and dets == dets0  # inputs are not mutated (pycocotools mutates what it is given)
    assert m["stats"] == [float(s) for s in ref.stats]  # exact
    for i, name in enumerate(STAT_NAMES):
        assert m[name] == float(ref.stats[i])
    assert 0 < m["AP"] < m["AP50"] < 1
    assert len(m["summary"].strip().splitlines()) == 12 and "Average Precision" in m["summary"]
    # json paths in, same numbers out
    dpath = write_results_json(dets, path.parent / "dets.json")
    assert evaluate_coco(path, dpath)["stats"] == m["stats"]


def test_per_class_ap_and_pr_arrays(data):
    gt, dets, _, ref = data
    m = evaluate_coco(gt, dets)
    prec = ref.eval["precision"]  # [T, R, K, A, M]
    assert list(ref.params.catIds) == [1, 2, 5, 7]
    for k, name in enumerate(["car", "person", "dog", "kite"]):
        p = prec[:, :, k, 0, -1]
        ap = np.mean(p[p > -1]) if (p > -1).any() else float("nan")
        p50 = prec[0, :, k, 0, -1]
        ap50 = np.mean(p50[p50 > -1]) if (p50 > -1).any() else float("nan")
        got = m["per_class"][name]
        assert got["AP"] == ap or (math.isnan(got["AP"]) and math.isnan(ap))  # exact
        assert got["AP50"] == ap50 or (math.isnan(got["AP50"]) and math.isnan(ap50))
        np.testing.assert_array_equal(m["pr"]["precision"][:, k, :], p)
        np.testing.assert_array_equal(m["pr"]["precision50"][k], p50)
    assert m["per_class"]["dog"]["AP"] == 0.0 and math.isnan(m["per_class"]["kite"]["AP"])
    assert m["per_class"]["car"]["AP"] > 0
    # overall AP is the mean of the defined per-class APs (pycocotools averages over the same entries)
    defined = [v["AP"] for v in m["per_class"].values() if not math.isnan(v["AP"])]
    assert m["AP"] == pytest.approx(np.mean(defined), rel=1e-12)
    assert m["pr"]["precision"].shape == (10, 4, 101) and m["pr"]["rec_thrs"].shape == (101,)
    assert m["pr"]["category_ids"] == [1, 2, 5, 7]
    np.testing.assert_allclose(m["pr"]["precision50_95"][0], prec[:, :, 0, 0, -1].mean(0), rtol=1e-12)


def test_faster_engine_identical(data):
    gt, dets, _, ref = data
    m = evaluate_coco(gt, dets, engine="faster")
    assert m["stats"] == [float(s) for s in ref.stats]  # exact
    base = evaluate_coco(gt, dets)
    for name, v in base["per_class"].items():
        assert m["per_class"][name]["AP"] == pytest.approx(v["AP"], rel=1e-12, abs=1e-15, nan_ok=True)
        assert m["per_class"][name]["AP50"] == pytest.approx(v["AP50"], rel=1e-12, abs=1e-15, nan_ok=True)
    np.testing.assert_allclose(m["pr"]["precision"], base["pr"]["precision"], rtol=0, atol=1e-12)
    assert len(m["summary"].strip().splitlines()) == 12


@pytest.mark.parametrize("engine", ["pycocotools", "faster"])
def test_empty_detections(data, engine):
    gt, _, _, _ = data
    m = evaluate_coco(gt, [], engine=engine)  # pycocotools' loadRes([]) would raise IndexError
    assert m["stats"] == [0.0] * 12  # every area range has gt here, so every stat is a real 0
    assert m["num_detections"] == 0
    assert m["per_class"]["car"] == {"AP": 0.0, "AP50": 0.0}
    assert math.isnan(m["per_class"]["kite"]["AP"])


def test_missing_area_and_iscrowd_default_to_coco_definitions(data):
    gt, dets, _, ref = data
    slim = copy.deepcopy(gt)
    for a in slim["annotations"]:
        del a["area"]  # the fixture's area is w * h
        if not a["iscrowd"]:
            del a["iscrowd"]
    assert evaluate_coco(slim, dets)["stats"] == [float(s) for s in ref.stats]


def test_class_names_and_errors(data):
    gt, dets, _, _ = data
    m = evaluate_coco(gt, dets, class_names=["a", "b", "c", "d"])
    assert list(m["per_class"]) == ["a", "b", "c", "d"]
    m2 = evaluate_coco(gt, dets, class_names={1: "A", 2: "B", 5: "C", 7: "D"})
    assert list(m2["per_class"]) == ["A", "B", "C", "D"]
    with pytest.raises(DataError):
        evaluate_coco(gt, dets, class_names=["a"])
    with pytest.raises(DataError, match="not in the ground truth"):
        evaluate_coco(gt, [{"image_id": 99999, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 1.0}])
    with pytest.raises(ValueError):
        evaluate_coco(gt, dets, engine="nope")


def test_write_json_atomic_roundtrip(data, tmp_path):
    gt, dets, _, _ = data
    m = evaluate_coco(gt, dets)
    p = write_metrics_json(m, tmp_path / "out" / "metrics.json")
    back = json.loads(p.read_text())  # strict JSON: NaN became null
    assert back["AP"] == m["AP"] and back["stats"] == m["stats"]
    assert back["per_class"]["kite"]["AP"] is None
    assert np.array_equal(np.array(back["pr"]["precision"]), m["pr"]["precision"])
    r = write_results_json([{**dets[0], "score": np.float32(0.5), "image_id": np.int64(dets[0]["image_id"])}],
                           tmp_path / "out" / "res.json")  # fmt: skip
    assert json.loads(r.read_text())[0]["score"] == 0.5
    assert sorted(x.name for x in (tmp_path / "out").iterdir()) == ["metrics.json", "res.json"]  # no tmp left
