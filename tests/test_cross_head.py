"""distill.cross_head (CrossKD): the student's Detect inputs through adapters and the frozen teacher's Detect head,
compared with the teacher's own outputs by the logit / box methods. Checked against a hand computation (sigmoid QFL
towards the teacher's scores, LD on the DFL bins), for its gradients (the student's own head gets none from it, the
teacher none at all), its configuration errors, and one epoch inside Ultralytics' trainer with a plain best.pt.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from detkd.integrations.ultralytics_env import ensure_ultralytics_offline

ensure_ultralytics_offline()

from ultralytics import YOLO  # noqa: E402
from ultralytics.cfg import get_cfg  # noqa: E402
from ultralytics.nn.tasks import DetectionModel  # noqa: E402

from detkd.assets import FEMTO_YAML  # noqa: E402
from detkd.config import DistillConfig  # noqa: E402
from detkd.errors import ConfigError  # noqa: E402
from detkd.integrations import ultralytics as ul  # noqa: E402
from helpers import rect_dataset  # noqa: E402

IMGSZ, NC = 64, 3
CROSS = {"logits": {"method": "sigmoid_kd", "weight": 0.0, "options": {"avg_factor": "teacher_score"}},
         "boxes": {"method": "ld", "weight": 0.0, "temperature": 10.0}, "cross_head": {"weight": 2.5}}


def _model(cfg: str, seed: int) -> DetectionModel:
    torch.manual_seed(seed)
    m = DetectionModel(cfg, nc=NC, verbose=False)
    m.names = {i: str(i) for i in range(NC)}
    m.args = get_cfg(overrides={"imgsz": IMGSZ})
    return m


def _pair():
    teacher = _model("yolov8n.yaml", 1).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    with torch.no_grad():  # an untrained head scores everything ~0.01: spread the teacher's outputs
        for p in ul.detect_layer(teacher).parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return _model(str(FEMTO_YAML), 0).train(), teacher


def _batch(n: int = 2) -> dict:
    torch.manual_seed(0)
    return {"img": torch.rand(n, 3, IMGSZ, IMGSZ), "batch_idx": torch.tensor([0.0, 0.0, 1.0]),
            "cls": torch.tensor([[0.0], [1.0], [2.0]]),
            "bboxes": torch.tensor([[0.3, 0.3, 0.2, 0.3], [0.6, 0.5, 0.3, 0.2], [0.5, 0.5, 0.4, 0.4]])}


def _detect_inputs(model, img):
    """The maps feeding ``model``'s Detect head, recorded by hooks on its input layers."""
    out = {}
    hooks = [model.model[i].register_forward_hook(lambda m, a, o, i=i: out.__setitem__(i, o))
             for i in ul.detect_layer(model).f]
    try:
        res = model(img)
    finally:
        for h in hooks:
            h.remove()
    return [out[i] for i in ul.detect_layer(model).f], res


def test_kd_cross_matches_a_hand_computation():
    student, teacher = _pair()
    m = ul.KDDetectionModel(student, teacher, CROSS, imgsz=IMGSZ).train()
    batch = _batch()
    _, items = m.loss(batch)
    assert float(items["kd_cls"]) == 0.0 and float(items["kd_box"]) == 0.0  # weight 0: no direct mimicking

    img = batch["img"]
    maps, _ = _detect_inputs(student, img)
    with torch.no_grad():
        _, (_, t_raw) = _detect_inputs(teacher, img)
        cross = [m.distiller.cross_adapters[str(i)](x) for i, x in enumerate(maps)]
        det = ul.detect_layer(teacher)
        c_box = torch.cat([det.cv2[i](x).flatten(2) for i, x in enumerate(cross)], -1)  # (N, 4R, A)
        c_cls = torch.cat([det.cv3[i](x).flatten(2) for i, x in enumerate(cross)], -1)  # (N, K, A)
    t_cls, t_box = t_raw["scores"], t_raw["boxes"]
    n, _, a = t_cls.shape
    # sigmoid KD (quality focal, beta 2) towards the teacher's scores, / max(1, sum over anchors of max score)
    q, p = t_cls.sigmoid(), c_cls.sigmoid()
    bce = F.binary_cross_entropy(p.double(), q.double(), reduction="none")
    score = q.amax(1)  # (N, A)
    cls_term = (bce * (p - q).abs().double() ** 2).sum() / score.sum().clamp(min=1).double()
    # LD: T^2 * mean over bins of KL(teacher || cross) at T 10 per box side, weighted by the teacher's max score
    tb = t_box.view(n, 4, 16, a).double() / 10.0
    cb = c_box.view(n, 4, 16, a).double() / 10.0
    kl = (tb.softmax(2) * (tb.log_softmax(2) - cb.log_softmax(2))).mean(2) * 100.0  # (N, 4, A)
    w = score.double().unsqueeze(1)
    box_term = (kl * w).sum() / (w.expand_as(kl).sum().clamp(min=1) + torch.finfo(torch.float32).eps)
    want = 2.5 * (cls_term + box_term)
    assert float(items["kd_cross"]) == pytest.approx(float(want), rel=1e-4)
    assert float(items["kd_cross"]) > 1e-3  # not a trivial zero


def test_kd_cross_gradients_reach_the_student_body_not_its_head_nor_the_teacher():
    student, teacher = _pair()
    m = ul.KDDetectionModel(student, teacher, CROSS, imgsz=IMGSZ).train()
    d, img = m.distiller, _batch()["img"]
    with d.record(student):
        preds = student(img)
    terms = d(img, student_output=preds)
    terms["kd_cross"].backward()
    head = {id(p) for p in ul.detect_layer(student).parameters()}
    body = [p for p in student.parameters() if id(p) not in head]
    assert all(p.grad is None or not p.grad.any() for p in ul.detect_layer(student).parameters())
    assert sum(float(p.grad.abs().sum()) for p in body if p.grad is not None) > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in d.cross_adapters.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    assert not any(p.requires_grad for p in teacher.parameters())


def test_kd_cross_adapters_in_the_distiller_state_and_the_default_recipe_unchanged():
    student, teacher = _pair()
    m = ul.KDDetectionModel(student, teacher, CROSS, imgsz=IMGSZ)
    keys = m.distiller.state_dict().keys()
    assert any(k.startswith("cross_adapters.2.") for k in keys)
    assert m.kd_terms == ("kd_cls", "kd_box", "kd_cross")
    plain = ul.KDDetectionModel(_model(str(FEMTO_YAML), 0), teacher, {"logits": "sigmoid_kd"}, imgsz=IMGSZ)
    assert "kd_cross" not in plain.kd_terms and not any("cross" in k for k in plain.distiller.state_dict())


@pytest.mark.parametrize("distill, needle", [
    ({"cross_head": {"weight": 1}}, "configure at least one"),
    ({"logits": "sigmoid_kd", "cross_head": {"wieght": 1}}, "did you mean 'weight'"),
    ({"logits": "sigmoid_kd", "cross_head": {"student": ["a"], "teacher": ["b", "c"]}}, "1 student head inputs but 2"),
    ({"logits": "sigmoid_kd", "cross_head": {"adapter": "mlp"}}, "unknown adapter 'mlp'"),
    ({"logits": "sigmoid_kd", "cross_head": True, "teacher_runtime": {"fuse": True}}, "teacher_runtime.fuse"),
    ({"logits": "sigmoid_kd", "cross_head": True, "mode": "online"}, "mode offline only"),
])
def test_cross_head_config_errors(distill, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(")):
        DistillConfig.from_dict(distill)


def test_cross_head_roundtrips_and_resolves_auto():
    c = DistillConfig.from_dict({"logits": "sigmoid_kd", "cross_head": True})
    assert c.cross_head.weight == 1.0 and c.cross_head.student == "auto" and c.has_auto_taps
    r = c.with_auto_taps(["s.1", "s.2"], ["t.1", "t.2"])
    assert (r.cross_head.student, r.cross_head.teacher) == (["s.1", "s.2"], ["t.1", "t.2"])
    assert DistillConfig.from_dict(r.to_dict()) == r
    with pytest.raises(ConfigError, match="cross_head"):
        c.require_module_names()


def test_cross_head_trains_one_epoch_in_ultralytics(tmp_path):
    data = rect_dataset(tmp_path / "rects", IMGSZ)
    t = YOLO("yolov8n.yaml")
    t.train(data=str(data), epochs=1, imgsz=IMGSZ, batch=8, device="cpu", workers=0, project=str(tmp_path),
            name="t", plots=False, val=False, verbose=False, seed=0, amp=False)
    kd = tmp_path / "kd.yaml"
    kd.write_text(yaml.safe_dump({"teacher": str(t.trainer.last), "distill": CROSS}))
    s = YOLO(str(FEMTO_YAML))
    s.train(data=str(data), epochs=1, imgsz=IMGSZ, batch=8, device="cpu", workers=0, trainer=ul.DistillTrainer,
            distill_model=str(kd), project=str(tmp_path), name="kd", plots=False, verbose=False, seed=0, amp=False)
    run = Path(s.trainer.save_dir)
    with open(run / "results.csv") as f:
        row = next(csv.DictReader(f))
    assert float(row["train/kd_cross"]) > 0 and float(row["train/kd_cls"]) == 0.0
    ck = torch.load(run / "weights" / "best.pt", weights_only=False)
    assert type(ck["model"]).__name__ == "DetectionModel"
    assert not any("cross" in k for k in ck["model"].state_dict())
    assert "cross_head" in yaml.safe_load((run / "distill.yaml").read_text())["distill"]
