"""detkd.eval.predict: Ultralytics .pt and ONNX paths on a tiny untrained YOLOv8n (nc=3), 64 px images."""

from __future__ import annotations

import json

import numpy as np
import pytest

from detkd.eval.predict import (
    ensure_ultralytics_offline,
    letterbox,
    predict_onnx,
    predict_ultralytics,
    scale_boxes,
)

ensure_ultralytics_offline()  # before Ultralytics is first imported

torch = pytest.importorskip("torch")
cv2 = pytest.importorskip("cv2")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

# (h, w): square, wide (padded top/bottom), tall and down-scaled (resized + padded left/right)
SHAPES = [(64, 64), (48, 64), (96, 40)]
CONF = 1e-4


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from ultralytics import YOLO
    from ultralytics.nn.tasks import DetectionModel

    d = tmp_path_factory.mktemp("predict")
    torch.manual_seed(0)
    dm = DetectionModel("yolov8n.yaml", nc=3, verbose=False)  # packaged yaml: no download
    head = dm.model[-1]
    with torch.no_grad():
        # An untrained net's activations fade layer by layer (default init, SiLU), so every anchor would
        # give the same box and score and NMS would be decided by ties. Recalibrate BatchNorm on random
        # images (momentum 1: running stats = this batch's) so outputs depend on the input, and bias the
        # DFL bins towards short distances so boxes are not all clipped to the 64 px image.
        for m in dm.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.momentum = 1.0
        for conv in head.cv2:
            conv[-1].bias.copy_(-0.4 * torch.arange(head.reg_max).repeat(4).float())
        dm.train()
        dm(torch.rand(4, 3, 64, 64))
        dm.eval()
    dm.names = {0: "a", 1: "b", 2: "c"}
    y = YOLO("yolov8n.yaml")
    y.model = dm
    pt = d / "tiny.pt"
    y.save(pt)  # Ultralytics' own checkpoint format (fp16 module under "model")
    onnx_path = YOLO(str(pt)).export(format="onnx", imgsz=64, simplify=False, dynamic=False, verbose=False)
    rng = np.random.default_rng(0)
    images = []
    for i, (h, w) in enumerate(SHAPES):
        im = cv2.GaussianBlur((rng.random((h, w, 3)) * 255).astype(np.uint8), (5, 5), 0)
        p = d / f"im{i}.png"
        cv2.imwrite(str(p), im)
        images.append((1000 + i, str(p)))
    return pt, onnx_path, images


def _by_image(dets):
    out = {}
    for x in dets:
        out.setdefault(x["image_id"], []).append(x)
    return out


def test_letterbox_and_scale_boxes_match_ultralytics():
    from ultralytics.data.augment import LetterBox
    from ultralytics.utils import ops

    rng = np.random.default_rng(1)
    for h, w, size in [(64, 64, 64), (48, 64, 64), (96, 40, 64), (37, 101, 64), (480, 640, 320), (7, 9, 32)]:
        im = (rng.random((h, w, 3)) * 255).astype(np.uint8)
        ref = LetterBox((size, size), auto=False, stride=32)(image=im)
        np.testing.assert_array_equal(letterbox(im, size), ref)
        boxes = torch.tensor(rng.uniform(-5, size + 5, (20, 4)), dtype=torch.float32)
        boxes[:, 2:] = boxes[:, :2] + boxes[:, 2:].abs()
        np.testing.assert_array_equal(
            scale_boxes(boxes.clone(), (size, size), (h, w)).numpy(),
            ops.scale_boxes((size, size), boxes.clone(), (h, w)).numpy(),
        )
    assert letterbox(np.zeros((48, 64, 3), np.uint8), 64)[0, 0, 0] == 114  # pad value


def test_predict_ultralytics_format_and_ids(assets, tmp_path):
    from detkd.eval.coco import evaluate_coco, write_results_json

    pt, _, images = assets
    dets = predict_ultralytics(pt, images, imgsz=64, conf=CONF, batch=2, progress=False)
    assert dets, "the perturbed tiny model must produce boxes at conf=1e-4"
    per = _by_image(dets)
    assert set(per) <= {i for i, _ in images} and len(per) >= 2
    for x in dets:
        assert set(x) == {"image_id", "category_id", "bbox", "score"}
        assert type(x["image_id"]) is int and type(x["category_id"]) is int
        assert all(type(v) is float for v in x["bbox"]) and type(x["score"]) is float
        assert x["category_id"] in (1, 2, 3) and x["score"] > CONF
    h_w = {i: SHAPES[k] for k, (i, _) in enumerate(images)}
    for i, xs in per.items():
        b = np.array([x["bbox"] for x in xs])
        h, w = h_w[i]
        assert (b[:, 2:] >= 0).all() and (b[:, 0] + b[:, 2] <= w + 1e-3).all() and (b[:, 1] + b[:, 3] <= h + 1e-3).all()
        assert len(xs) <= 300
    boxes = np.array([x["bbox"] for x in dets])
    assert np.unique(boxes.round(1), axis=0).shape[0] > 5  # geometry is really exercised, not all clipped

    # same predictions as calling Ultralytics directly (xyxy -> xywh, class i -> id i + 1)
    from ultralytics import YOLO

    r = next(iter(YOLO(str(pt)).predict(images[1][1], imgsz=64, conf=CONF, rect=False, verbose=False)))
    xyxy = r.boxes.xyxy.numpy().astype(np.float64)
    mine = np.array([x["bbox"] for x in per[images[1][0]]])
    np.testing.assert_allclose(mine, np.c_[xyxy[:, :2], xyxy[:, 2:] - xyxy[:, :2]], rtol=0, atol=1e-2)  # batch 2 vs 1
    assert [x["category_id"] for x in per[images[1][0]]] == (r.boxes.cls.numpy().astype(int) + 1).tolist()

    # class_map, batch independence (rect=False), and a results file pycocotools accepts
    mapped = predict_ultralytics(pt, images, imgsz=64, conf=CONF, batch=1, class_map={0: 7, 1: 9, 2: 11},
                                 progress=False)  # fmt: skip
    assert len(mapped) == len(dets)
    lut = {1: 7, 2: 9, 3: 11}
    assert [x["category_id"] for x in mapped] == [lut[x["category_id"]] for x in dets]
    np.testing.assert_allclose([x["bbox"] for x in mapped], boxes, atol=1e-4)
    path = write_results_json(dets, tmp_path / "dets.json")
    assert json.loads(path.read_text()) == dets  # Python floats round-trip exactly
    gt = {"images": [{"id": i, "width": w, "height": h} for (i, _), (h, w) in zip(images, SHAPES)],
          "categories": [{"id": k, "name": n} for k, n in [(1, "a"), (2, "b"), (3, "c")]],
          "annotations": [{"id": 1, "image_id": images[0][0], "category_id": 1, "bbox": [5, 5, 20, 20],
                           "area": 400, "iscrowd": 0}]}  # fmt: skip
    assert 0.0 <= evaluate_coco(gt, path)["AP50"] <= 1.0


def test_onnx_matches_pt_within_a_pixel(assets):
    pt, onnx_path, images = assets
    a = _by_image(predict_ultralytics(pt, images, imgsz=64, conf=CONF, progress=False))
    b = _by_image(predict_onnx(onnx_path, images, imgsz=64, conf=CONF, threads=1, progress=False))
    assert set(a) == set(b)
    n_total = 0
    for i in a:
        xa, xb = a[i], b[i]
        assert abs(len(xa) - len(xb)) <= max(1, len(xa) // 50), (i, len(xa), len(xb))  # borderline NMS ties only
        bb = np.array([x["bbox"] for x in xb])
        sb = np.array([x["score"] for x in xb])
        cb = np.array([x["category_id"] for x in xb])
        used = np.zeros(len(xb), bool)
        matched = 0
        for x in xa:  # one-to-one: every .pt box has its own ONNX box of the same class, within 1 px, same score
            ok = (~used) & (cb == x["category_id"]) & (np.abs(bb - np.array(x["bbox"])).max(1) < 1.0)
            ok &= np.abs(sb - x["score"]) < 1e-3 * max(x["score"], 1e-3)
            if ok.any():
                used[np.flatnonzero(ok)[0]] = True
                matched += 1
        assert matched >= len(xa) - max(1, len(xa) // 50), (i, matched, len(xa))
        n_total += len(xa)
    assert n_total > 10


def test_onnx_class_map_and_imgsz_check(assets):
    _, onnx_path, images = assets
    base = predict_onnx(onnx_path, images[:1], conf=CONF, progress=False)  # imgsz taken from the model
    mapped = predict_onnx(onnx_path, images[:1], conf=CONF, class_map=[10, 20, 30], progress=False)
    assert [x["category_id"] for x in mapped] == [10 * x["category_id"] for x in base]
    with pytest.raises(ValueError, match="fixed input size"):
        predict_onnx(onnx_path, images[:1], imgsz=128, progress=False)
