"""Cross-family teacher (detkd/integrations/cross_family.py): a torchvision detector teaching a YOLO student.

Pseudo-label matching against a hand-built case and a brute-force reference, the anchor layout against Ultralytics'
own, both losses against independent formulas, the teacher's forward against torchvision's own, FPN pairing by
stride, the errors, and one epoch of `detkd train` from a torchvision run's checkpoint. Tiny images (64 px), offline.
"""

from __future__ import annotations

import csv
import math

import pytest
import torch
import yaml

from detkd.integrations.ultralytics_env import ensure_ultralytics_offline

ensure_ultralytics_offline()

from ultralytics.nn.tasks import DetectionModel  # noqa: E402

from detkd.assets import PICO_YAML  # noqa: E402
from detkd.errors import ConfigError  # noqa: E402
from detkd.integrations import cross_family as cf  # noqa: E402
from detkd.integrations import torchvision as tvkd  # noqa: E402
from helpers import no_downloads, one_thread  # noqa: E402, F401 (autouse fixtures)

IMG = 64
NAMES = ["red", "green", "blue"]


def student(names=NAMES) -> DetectionModel:
    torch.manual_seed(0)
    m = DetectionModel(str(PICO_YAML), nc=len(names), verbose=False)
    m.names = dict(enumerate(names))
    return m


def teacher(arch="fcos_resnet18_fpn", names=NAMES) -> cf.TorchvisionTeacher:
    torch.manual_seed(0)
    return cf.TorchvisionTeacher(tvkd.build(arch, len(names), IMG), names, arch, IMG).eval()


def write_run(root, arch="fcos_resnet18_fpn", names=NAMES):
    """A torchvision run's weights folder as torchvision_train writes it: last.pt (settings, names) and best.pt."""
    w = root / "weights"
    w.mkdir(parents=True)
    state = tvkd.build(arch, len(names), IMG).state_dict()
    settings = {"student": {"arch": arch, "checkpoint": None, "options": {}}, "imgsz": IMG, "data": "gone.yaml"}
    torch.save({"epoch": 0, "model": state, "settings": yaml.safe_dump(settings), "names": names}, w / "last.pt")
    torch.save(state, w / "best.pt")
    return w


# -- pseudo-labels ----------------------------------------------------------------------------------------------------
def test_match_to_anchors_hand_built():
    points, strides = cf.anchor_grid((32, 32), [8, 16])  # P3: 4x4 points at 4, 12, 20, 28; P4: 2x2 at 8, 24
    assert points.shape == (20, 2) and points[:4].tolist() == [[4, 4], [12, 4], [20, 4], [28, 4]]
    assert points[16:].tolist() == [[8, 8], [24, 8], [8, 24], [24, 24]]
    boxes = torch.tensor([[[0, 0, 32, 32], [2, 2, 14, 14], [18, 18, 22, 22], [0, 0, 0, 0]],
                          [[0, 0, 32, 32], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]], dtype=torch.float32)
    scores = torch.tensor([[0.9, 0.6, 0.03, 0.0], [0.7, 0, 0, 0]])
    labels = torch.tensor([[1, 3, 0, 0], [2, 0, 0, 0]])
    valid = torch.tensor([[True, True, True, False], [True, False, False, False]])
    target, tb = cf.match_to_anchors(points, strides, boxes, scores, labels, valid, nc=4, radius=2.5, min_score=0.05)
    # image 0: the small box (class 3) owns the points inside it; the tiny box is below min_score; the rest: big box
    small = {0, 1, 4, 5, 16}  # P3 (4,4) (12,4) (4,12) (12,12) and P4 (8,8)
    want = torch.zeros(2, 20, 4)
    for a in range(20):
        want[0, a, 3 if a in small else 1] = 0.6 if a in small else 0.9
    # image 1 at radius 2.5: every point is within 2.5 strides of the centre (16, 16)
    want[1, :, 2] = 0.7
    torch.testing.assert_close(target, want)
    assert tb[0, 0].tolist() == [2, 2, 14, 14] and tb[0, 10].tolist() == [0, 0, 32, 32]
    # radius: 0.4 strides reaches no point (P3's nearest are 4 px away, 0.5 strides); 0.6 the 4 central P3 + all P4
    t04, tb04 = cf.match_to_anchors(points, strides, boxes[1:], scores[1:], labels[1:], valid[1:], 4, radius=0.4)
    assert t04.sum() == 0 and tb04[0, 0].tolist() == [0, 0, 8, 8]  # unmatched: the point's own cell
    t06, _ = cf.match_to_anchors(points, strides, boxes[1:], scores[1:], labels[1:], valid[1:], 4, radius=0.6)
    assert t06[0, :, 2].nonzero().flatten().tolist() == [5, 6, 9, 10, 16, 17, 18, 19]


def reference_match(points, strides, boxes, scores, labels, valid, nc, radius, min_score):
    """The rule written out with loops, point by point and box by box."""
    n, m = scores.shape
    target, tb = torch.zeros(n, len(points), nc), torch.zeros(n, len(points), 4)
    for i in range(n):
        for a, ((px, py), s) in enumerate(zip(points.tolist(), strides.tolist())):
            best, best_area = None, math.inf
            for j in range(m):
                x1, y1, x2, y2 = boxes[i, j].tolist()
                ok = bool(valid[i, j]) and float(scores[i, j]) >= min_score
                ok = ok and x1 < px < x2 and y1 < py < y2
                ok = ok and abs(px - (x1 + x2) / 2) < radius * s and abs(py - (y1 + y2) / 2) < radius * s
                area = (x2 - x1) * (y2 - y1)
                if ok and area < best_area:
                    best, best_area = j, area
            if best is None:
                tb[i, a] = torch.tensor([px - s / 2, py - s / 2, px + s / 2, py + s / 2])
            else:
                target[i, a, labels[i, best]] = scores[i, best]
                tb[i, a] = boxes[i, best]
    return target, tb


def test_match_to_anchors_equals_a_loop_reference():
    g = torch.Generator().manual_seed(3)
    points, strides = cf.anchor_grid((48, 64), [8, 16, 32])
    xy = torch.rand(3, 7, 2, generator=g) * 56
    wh = torch.rand(3, 7, 2, generator=g) * 40 + 2
    boxes = torch.cat((xy, xy + wh), -1)
    scores = torch.rand(3, 7, generator=g)
    labels = torch.randint(0, 5, (3, 7), generator=g)
    valid = torch.rand(3, 7, generator=g) > 0.2
    got = cf.match_to_anchors(points, strides, boxes, scores, labels, valid, 5, radius=1.5, min_score=0.2)
    want = reference_match(points, strides, boxes, scores, labels, valid, 5, 1.5, 0.2)
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])
    assert got[0].count_nonzero() > 20  # the case is not trivial


@pytest.mark.parametrize("hw", [(IMG, IMG), (64, 96)])
def test_anchor_grid_is_ultralytics_anchor_order(hw):
    from ultralytics.utils.tal import make_anchors

    s = student().train()
    out = s(torch.zeros(1, 3, *hw))  # Detect in training mode: {'boxes', 'scores', 'feats'}
    anchors, st = make_anchors(out["feats"], s.stride, 0.5)
    points, strides = cf.anchor_grid(hw, s.stride.tolist())
    torch.testing.assert_close(points, anchors * st)
    torch.testing.assert_close(strides, st.flatten())


def test_pseudo_labels_through_the_distillation_losses():
    """sigmoid_kd (avg_factor teacher_score) and l1_giou on the pseudo-labels equal the formulas written out."""
    from torchvision.ops import generalized_box_iou

    from detkd.distiller import DenseOutputs
    from detkd.losses.registry import BOX_METHODS, LOGIT_METHODS

    g = torch.Generator().manual_seed(0)
    out = {"boxes": torch.tensor([[[4.0, 6.0, 40.0, 50.0], [30.0, 30.0, 60.0, 62.0]]]),
           "scores": torch.tensor([[0.8, 0.4]]), "labels": torch.tensor([[2, 0]]),
           "valid": torch.tensor([[True, True]]), "image_size": (IMG, IMG)}
    t = cf.PseudoLabels([8, 16, 32], nc=3)(out)
    assert torch.equal(t.cls.sigmoid(), t.scores) and torch.isinf(t.cls).any()
    assert torch.equal(t.anchor_confidence(), t.scores.amax(-1))
    a = t.cls.shape[1]
    s_cls = torch.randn(1, a, 3, generator=g)
    xy = torch.rand(1, a, 2, generator=g) * 50
    s = DenseOutputs(cls=s_cls, boxes=torch.cat((xy, xy + 4 + torch.rand(1, a, 2, generator=g) * 20), -1))
    q, p = t.scores, s_cls.sigmoid()
    bce = -(q * p.log() + (1 - q) * (1 - p).log())
    want_cls = (bce * (p - q).abs() ** 2).sum() / q.sum().clamp(min=1)
    got_cls = LOGIT_METHODS["sigmoid_kd"].loss(s, t, temperature=1.0, avg_factor="teacher_score")
    torch.testing.assert_close(got_cls, want_cls)
    w = q.amax(-1)[0]
    gi = generalized_box_iou(s.boxes[0], t.boxes[0]).diagonal()
    want_box = (w * 2.5 * (1 - gi)).sum() / w.sum()
    torch.testing.assert_close(BOX_METHODS["l1_giou"].loss(s, t, temperature=1.0), want_box)
    assert w.count_nonzero() > 0 and (w == 0).any()  # objects and background both present


# -- the teacher on the student's batch ------------------------------------------------------------------------------
def test_teacher_forward_equals_torchvision_at_its_own_size():
    t = teacher("retinanet_resnet18_fpn")
    t.detector.score_thresh = 0.001  # an untrained head scores about 0.01: keep its detections for the comparison
    img = torch.rand(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = t(img)
        want = t.detector.eval()(list(img))  # torchvision: normalise, resize (none at its own size), postprocess
    ref = cf.pad_detections(want, 0, 3)
    assert got["boxes"].shape[1] > 10 and got["image_size"] == (IMG, IMG)
    for k in ("boxes", "scores", "labels", "valid"):
        torch.testing.assert_close(got[k], ref[k])


def test_softmax_families_drop_the_background_label():
    t = teacher("ssdlite_mobilenet_v3_large")
    assert t.offset == 1 and t.detector.score_thresh == cf.MIN_SCORE
    dets = [{"boxes": torch.tensor([[1.0, 1, 5, 5], [2, 2, 9, 9]]), "scores": torch.tensor([0.9, 0.5]),
             "labels": torch.tensor([3, 1])}, {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0),
                                               "labels": torch.zeros(0, dtype=torch.long)}]
    out = cf.pad_detections(dets, 1, 3)
    assert out["labels"].tolist() == [[2, 0], [0, 0]] and out["valid"].tolist() == [[True, True], [False, False]]


# -- the pair: features, checks ---------------------------------------------------------------------------------------
def test_features_pair_by_stride_with_adapters():
    from detkd.integrations.recipes import TORCHVISION_RECIPE
    from detkd.integrations.ultralytics import KDDetectionModel

    s, t = student(), teacher()
    assert cf.pair_levels(s, t, IMG) == (["model.15", "model.18", "model.21"], ["backbone:0", "backbone:1",
                                                                                 "backbone:2"])
    kd = KDDetectionModel(s, t, TORCHVISION_RECIPE, imgsz=IMG)
    d = kd.distiller
    assert [(f.student, f.teacher) for f in d.cfg.features] == list(zip(*cf.pair_levels(s, t, IMG)))
    with torch.no_grad():
        feats = t.features(torch.zeros(1, 3, IMG, IMG))
    assert [IMG / feats[k].shape[-1] for k in ("0", "1", "2")] == [8, 16, 32] == s.stride.tolist()
    channels = [m[0].weight.shape[:2] for m in d.adapters.values()]  # 1x1 conv: student channels -> FPN's 256
    assert channels == [(256, 32), (256, 64), (256, 128)]
    kd.train()
    img = torch.rand(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(0))
    with d.record(s):
        preds = s(img)
    terms = d(img, student_output=preds)
    assert set(terms) == {"kd_cls", "kd_box", "kd_feat", "kd_total"} and terms["kd_feat"] > 0
    terms["kd_total"].backward()
    assert s.model[15].cv2.conv.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in t.parameters())


def test_a_student_level_without_partner_is_one_message():
    from detkd.integrations.recipes import TORCHVISION_RECIPE
    from detkd.integrations.ultralytics import KDDetectionModel

    t = teacher("fasterrcnn_mobilenet_v3_large_fpn")  # MobileNet FPN: strides 32, 32, 64
    with pytest.raises(ConfigError, match=r"the student's Detect input model.15 \(stride 8, 8x8 on a 64 px batch\) has "
                                          r"no teacher level of the same stride; teacher "
                                          r"fasterrcnn_mobilenet_v3_large_fpn levels: '0' stride 32 \(2x2\), '1' "
                                          r"stride 32 \(2x2\), 'pool' stride 64 \(1x1\)\. List the feature pairs"):
        KDDetectionModel(student(), t, TORCHVISION_RECIPE, imgsz=IMG)
    # named taps at another stride are fine (the student map is resized); a Faster R-CNN teacher's detections too
    cfg = {"logits": {"method": "sigmoid_kd"}, "boxes": {"method": "l1_giou"},
           "features": [{"student": "model.18", "teacher": "backbone:0", "method": "cwd"}]}
    kd = KDDetectionModel(student(), t, cfg, imgsz=IMG)
    assert len(kd.distiller.adapters) == 1 and kd.distiller.cfg.logits.method == "sigmoid_kd"
    kd.train()
    img = torch.rand(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(0))
    with kd.distiller.record(kd.student_model):
        preds = kd.student_model(img)
    terms = kd.distiller(img, student_output=preds)
    assert all(torch.isfinite(v) for v in terms.values()) and terms["kd_feat"] > 0


@pytest.mark.parametrize("distill, msg", [
    ({"logits": {"method": "kd"}}, "logits.method=kd: .* use sigmoid_kd"),
    ({"boxes": {"method": "ld"}}, "boxes.method=ld: .* use l1_giou"),
    ({"logits": {"method": "sigmoid_kd"}}, r"class names/order differ: teacher \['blue', 'green', 'red'\] vs student "
                                           r"\['red', 'green', 'blue'\]"),
])
def test_cross_pair_errors(distill, msg):
    from detkd.integrations.ultralytics import KDDetectionModel

    t = teacher(names=NAMES[::-1]) if "sigmoid_kd" in str(distill) else teacher()
    with pytest.raises(ConfigError, match=msg):
        KDDetectionModel(student(), t, distill, imgsz=IMG)


# -- checkpoints -----------------------------------------------------------------------------------------------------
def test_checkpoint_reading(tmp_path):
    from detkd.integrations.ultralytics import load_teacher
    from helpers import untrained_checkpoint

    w = write_run(tmp_path / "run")
    for f in ("last.pt", "best.pt"):
        assert cf.is_torchvision_checkpoint(w / f)
        t = load_teacher(w / f)
        assert isinstance(t, cf.TorchvisionTeacher) and t.arch == "fcos_resnet18_fpn" and t.names == dict(
            enumerate(NAMES))
        assert not any(p.requires_grad for p in t.parameters()) and not t.training
    alone = tmp_path / "alone.pt"
    alone.write_bytes((w / "best.pt").read_bytes())
    with pytest.raises(ConfigError, match="a torchvision state_dict without its run"):
        load_teacher(alone)
    yolo = untrained_checkpoint(tmp_path / "yolo.pt", dict(enumerate(NAMES)))
    assert not cf.is_torchvision_checkpoint(yolo)
    recipe = {"logits": {"method": "sigmoid_kd"}, "boxes": {"method": "ld"}, "features": "auto"}
    assert cf.cross_family_recipe(w / "best.pt", recipe)["boxes"]["method"] == "l1_giou"
    assert cf.cross_family_recipe(yolo, recipe) is recipe


# -- detkd train ------------------------------------------------------------------------------------------------------
def test_detkd_train_yolo_student_from_torchvision_teacher(tmp_path):
    from ultralytics.nn.tasks import load_checkpoint

    from detkd.checkpoints import unsafe_globals
    from detkd.cli import main
    from detkd.data.synth import generate

    generate(tmp_path / "data", n_train=8, n_val=4, imgsz=IMG, progress=False)
    (tmp_path / "tv.yaml").write_text(yaml.safe_dump({
        "framework": "torchvision", "student": {"arch": "fcos_resnet18_fpn"}, "data": "data/data.yaml", "epochs": 1,
        "batch": 4, "imgsz": IMG, "project": str(tmp_path / "runs"), "name": "teacher", "threads": 1, "val": False}))
    assert main(["train", str(tmp_path / "tv.yaml")]) == 0
    (tmp_path / "kd.yaml").write_text(yaml.safe_dump({  # no distill block: the default recipe, boxes l1_giou
        "teacher": "runs/teacher/weights/best.pt", "student": str(PICO_YAML), "data": "data/data.yaml", "epochs": 1,
        "imgsz": IMG, "batch": 4, "device": "cpu", "workers": 0, "plots": False, "project": str(tmp_path / "runs"),
        "name": "kd"}))
    assert main(["train", str(tmp_path / "kd.yaml")]) == 0
    run = tmp_path / "runs" / "kd"
    row = list(csv.DictReader((run / "results.csv").open()))[-1]
    for col in ("train/kd_cls", "train/kd_box", "train/kd_feat", "kd/teacher_mAP50-95", "kd/gap"):
        assert row.get(col, "").strip() != "", col
    assert float(row["train/kd_feat"]) > 0
    d = yaml.safe_load((run / "distill.yaml").read_text())
    assert d["teacher"].endswith("runs/teacher/weights/best.pt") and d["distill"]["boxes"]["method"] == "l1_giou"
    assert d["distill"]["features"] == "auto"  # resolved when the model is built (test_features_pair_by_stride...)
    best = run / "weights" / "best.pt"
    assert not [n for n in torch.serialization.get_unsafe_globals_in_checkpoint(str(best)) if "detkd" in n]
    assert unsafe_globals(best) == []
    model, _ = load_checkpoint(str(best))
    assert type(model) is DetectionModel and model.names == dict(enumerate(
        yaml.safe_load((tmp_path / "data" / "data.yaml").read_text())["names"].values()))
