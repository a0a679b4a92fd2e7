"""Ultralytics integration: KDDetectionModel terms and gradients, DistillTrainer end to end (tiny), resume,
plain-Ultralytics loading of the result without detkd, zero network calls, and clear errors on bad input.

Uses the built-in synthetic data at 64 px and untrained-or-barely-trained tiny YOLOs: minutes, not hours.
"""

from __future__ import annotations

import csv
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from detkd.integrations.ultralytics_env import ensure_ultralytics_offline

ensure_ultralytics_offline()

from ultralytics import YOLO  # noqa: E402
from ultralytics.nn.tasks import DetectionModel  # noqa: E402

from detkd.assets import PICO_YAML  # noqa: E402
from detkd.errors import ConfigError  # noqa: E402
from detkd.integrations import ultralytics as ul  # noqa: E402
from helpers import StopTraining, rect_dataset, stop_after_first_save, train_tiny_teacher  # noqa: E402

IMGSZ = 64


@pytest.fixture(scope="module")
def data_yaml(tmp_path_factory) -> Path:
    """16 + 8 images of coloured rectangles (3 classes) in the Ultralytics layout."""
    return rect_dataset(tmp_path_factory.mktemp("rects"), IMGSZ)


@pytest.fixture(scope="module")
def teacher_pt(data_yaml, tmp_path_factory) -> Path:
    """A plain Ultralytics YOLOv8n trained 1 epoch on the tiny data (the teacher; quality does not matter)."""
    tr = train_tiny_teacher(data_yaml, tmp_path_factory.mktemp("teacher"), IMGSZ)
    return Path(tr.best if Path(tr.best).exists() else tr.last)


def _kd_yaml(tmp_path: Path, teacher: Path, distill: dict | None = None) -> Path:
    p = tmp_path / "kd.yaml"
    d = {"teacher": str(teacher)}
    if distill is not None:
        d["distill"] = distill
    p.write_text(yaml.safe_dump(d))
    return p


def _batch(data_yaml: Path, n: int = 2):
    """A real Ultralytics training batch (img float 0-1, batch_idx, cls, bboxes normalised xywh)."""
    torch.manual_seed(0)
    img = torch.rand(n, 3, IMGSZ, IMGSZ)
    bboxes = torch.tensor([[0.3, 0.3, 0.2, 0.3], [0.6, 0.5, 0.3, 0.2], [0.5, 0.5, 0.4, 0.4]])
    return {"img": img, "batch_idx": torch.tensor([0.0, 0.0, 1.0]), "cls": torch.tensor([[0.0], [1.0], [2.0]]),
            "bboxes": bboxes}


RECIPE = {
    "logits": {"method": "sigmoid_kd", "weight": 1.0},
    "boxes": {"method": "ld", "weight": 1.0, "temperature": 10.0},
    "features": "auto",
    "feature_method": "cwd",
}


def _student(nc: int, names) -> DetectionModel:
    from ultralytics.cfg import get_cfg

    s = DetectionModel(str(PICO_YAML), nc=nc, verbose=False)
    s.names = names
    s.args = get_cfg()
    return s


def test_kd_model_terms_nonzero_and_gradients(teacher_pt, data_yaml):
    teacher = ul.load_teacher(teacher_pt)
    student = _student(teacher.nc if hasattr(teacher, "nc") else 5, teacher.names)
    model = ul.KDDetectionModel(student, teacher, dict(RECIPE), imgsz=IMGSZ).train()
    assert model.kd_terms == ("kd_cls", "kd_box", "kd_feat")
    # the teacher is in neither parameters() nor state_dict(); adapters are
    names = [n for n, _ in model.named_parameters()]
    assert not any("teacher" in n for n in names)
    assert any(n.startswith("distiller.") for n in names)
    assert all(k.startswith(("student_model.", "distiller.")) for k in model.state_dict())
    batch = _batch(data_yaml)
    loss, items = model.loss(batch)
    for k in ("kd_cls", "kd_box", "kd_feat"):
        assert k in items and float(items[k]) > 0, (k, items)
    # each term alone reaches the student (and, for features, the adapters) but never the teacher
    for k_i, k in enumerate(model.kd_terms):
        model.zero_grad(set_to_none=True)
        loss, _ = model.loss(batch)
        loss[len(loss) - len(model.kd_terms) + k_i].backward()
        g = [p.grad for p in model.student_model.parameters() if p.grad is not None]
        assert g and any(float(x.abs().sum()) > 0 for x in g), k
        assert all(p.grad is None for p in teacher.parameters())
    # EMA-style deep copy drops nothing from the student and shares/drops the teacher
    import copy

    ema = copy.deepcopy(model).eval()
    ema.teacher_model = None
    loss_v, items_v = ema.loss(batch)
    assert set(items_v) == set(items) and all(float(items_v[k]) == 0 for k in model.kd_terms)


def test_check_compatible_errors(teacher_pt):
    teacher = ul.load_teacher(teacher_pt)
    wrong_nc = _student(teacher.nc + 2, {i: str(i) for i in range(teacher.nc + 2)})
    with pytest.raises(ConfigError, match="classes"):
        ul.KDDetectionModel(wrong_nc, teacher, dict(RECIPE), imgsz=IMGSZ)
    renamed = _student(teacher.nc, {i: f"x{i}" for i in range(teacher.nc)})
    with pytest.raises(ConfigError, match="class names"):
        ul.KDDetectionModel(renamed, teacher, dict(RECIPE), imgsz=IMGSZ)


def test_gt_boxes_padded_vectorised():
    batch = {"img": torch.zeros(3, 3, 32, 64), "batch_idx": torch.tensor([2.0, 0.0, 2.0]),
             "bboxes": torch.tensor([[0.5, 0.5, 0.5, 0.5], [0.25, 0.5, 0.5, 1.0], [0.1, 0.1, 0.2, 0.2]])}
    boxes, valid = ul.yolo_gt_boxes(batch, (32, 64))
    assert boxes.shape == (3, 2, 4) and valid.tolist() == [[True, False], [False, False], [True, True]]
    assert torch.allclose(boxes[0, 0], torch.tensor([0.0, 0.0, 32.0, 32.0]))
    assert torch.allclose(boxes[2, 0], torch.tensor([16.0, 8.0, 48.0, 24.0]))
    assert torch.allclose(boxes[2, 1], torch.tensor([0.0, 0.0, 12.8, 6.4]))


def _results_cols(save_dir: Path) -> list[str]:
    with open(save_dir / "results.csv") as f:
        return [c.strip() for c in next(csv.reader(f))]


def test_train_end_to_end_resume_and_plain_loading(teacher_pt, data_yaml, tmp_path, monkeypatch):
    kd = _kd_yaml(tmp_path, teacher_pt, RECIPE)
    # Any socket connection or DNS lookup during training fails the test.
    calls = []

    def deny(*a, **k):
        calls.append(a)
        raise OSError("network disabled in test")

    monkeypatch.setattr(socket.socket, "connect", deny)
    monkeypatch.setattr(socket, "getaddrinfo", deny)
    monkeypatch.setattr(socket, "create_connection", deny)

    m = YOLO(str(PICO_YAML))
    m.add_callback("on_model_save", stop_after_first_save)
    with pytest.raises(StopTraining):
        m.train(data=str(data_yaml), epochs=2, imgsz=IMGSZ, batch=8, device="cpu", workers=0, trainer=ul.DistillTrainer,
                distill_model=str(kd), project=str(tmp_path / "runs"), name="kd", plots=False, verbose=False, seed=0,
                amp=False)
    save_dir = Path(m.trainer.save_dir)
    wdir = save_dir / "weights"
    assert (wdir / "last.pt").is_file() and (wdir / "last.kd.pt").is_file()
    assert not list(wdir.glob("*.tmp"))
    kd_state = torch.load(wdir / "last.kd.pt", weights_only=True)
    assert kd_state["epoch"] == 0 and kd_state["distiller"]
    cols = _results_cols(save_dir)
    for k in ("train/kd_cls", "train/kd_box", "train/kd_feat"):
        assert k in cols, cols

    # resume: continues at epoch 2 with the saved adapter state
    r = YOLO(str(wdir / "last.pt"))
    r.train(resume=True, trainer=ul.DistillTrainer)
    t = r.trainer
    assert t.start_epoch == 1
    with open(save_dir / "results.csv") as f:
        assert len(list(csv.reader(f))) == 3  # header + 2 epochs
    assert calls == [], f"network calls attempted: {calls[:3]}"

    # plain Ultralytics, detkd not importable, loads and predicts with best.pt
    best = wdir / "best.pt"
    script = textwrap.dedent(f"""
        import sys, os
        sys.modules['detkd'] = None  # any import of detkd fails
        from ultralytics import YOLO
        m = YOLO({str(best)!r})
        r = m.predict(source=[__import__('numpy').zeros(({IMGSZ}, {IMGSZ}, 3), 'uint8')], imgsz={IMGSZ}, verbose=False)
        print('OK', type(m.model).__name__, len(r))
    """)
    env = {**os.environ, "YOLO_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "OK DetectionModel 1" in out.stdout


def test_detkd_train_cli_bad_inputs(teacher_pt, data_yaml, tmp_path):
    def run(cfg: dict, *over) -> tuple[int, str]:
        p = tmp_path / "cfg.yaml"
        p.write_text(yaml.safe_dump(cfg))
        r = subprocess.run([sys.executable, "-m", "detkd", "train", str(p), *over], capture_output=True, text=True,
                           timeout=300, env={**os.environ})
        return r.returncode, r.stderr

    base = {"teacher": str(teacher_pt), "student": str(PICO_YAML), "data": str(data_yaml), "epochs": 1,
            "imgsz": IMGSZ, "device": "cpu", "project": str(tmp_path / "runs")}
    rc, err = run({**base, "teacher": str(tmp_path / "missing.pt")})
    assert rc == 2 and "teacher: file not found" in err and "Traceback" not in err
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    rc, err = run({**base, "teacher": str(garbage)})
    assert rc == 2 and "not a PyTorch checkpoint" in err and str(garbage) in err and "Traceback" not in err
    rc, err = run(base, "epocs=3")
    assert rc == 2 and "did you mean 'epochs'" in err
    rc, err = run({**base, "distill": {"logits": {"method": "softmaxx"}}})
    assert rc == 2 and "softmaxx" in err and "Traceback" not in err
    bad = yaml.safe_load(Path(data_yaml).read_text())
    bad["val"] = "images/nowhere"
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text(yaml.safe_dump(bad))
    rc, err = run({**base, "data": str(bad_yaml)})
    assert rc == 2 and "images/nowhere" in err
    names = yaml.safe_load(Path(data_yaml).read_text())
    names["names"] = {0: "only"}
    one = tmp_path / "one.yaml"
    one.write_text(yaml.safe_dump(names))
    rc, err = run({**base, "data": str(one)})
    assert rc == 2 and "classes" in err
    # a classification model is not a detection teacher
    cls = YOLO("yolov8n-cls.yaml")
    cls_pt = tmp_path / "cls.pt"
    cls.save(str(cls_pt))
    rc, err = run({**base, "teacher": str(cls_pt)})
    assert rc == 2 and "not a detection model" in err


def test_detkd_train_cli_runs(teacher_pt, data_yaml, tmp_path):
    cfg = {"teacher": str(teacher_pt), "student": str(PICO_YAML), "data": str(data_yaml), "epochs": 1, "imgsz": IMGSZ,
           "batch": 8, "device": "cpu", "workers": 0, "project": str(tmp_path / "runs"), "name": "cli", "plots": False,
           "threads": 2, "distill": {"logits": {"method": "kd", "temperature": 2.0}, "boxes": None,
                                     "features": "auto", "feature_method": "fgd"}}
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(cfg))
    r = subprocess.run([sys.executable, "-m", "detkd", "train", str(p), "distill.logits.weight=0.5"],
                       capture_output=True, text=True, timeout=600, env={**os.environ})
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "runs" / "cli"
    assert (run / "weights" / "best.pt").is_file()
    cols = _results_cols(run)
    assert "train/kd_cls" in cols and "train/kd_feat" in cols and "train/kd_box" not in cols
    with open(run / "results.csv") as f:
        row = dict(zip(cols, list(csv.reader(f))[1]))
    assert float(row["train/kd_feat"]) > 0 and float(row["train/kd_cls"]) > 0


def test_cross_family_v8_teacher_to_yolo11_and_yolo26(teacher_pt, data_yaml):
    """Head type is detected, never assumed: v8 -> 11 keeps LD; v8 -> 26 (reg_max 1, one2one) needs l1_giou."""
    from ultralytics.cfg import get_cfg

    teacher = ul.load_teacher(teacher_pt)
    batch = _batch(data_yaml)

    def student(cfg):
        s = DetectionModel(cfg, nc=teacher.nc, verbose=False)
        s.names, s.args = teacher.names, get_cfg()
        return s

    m11 = ul.KDDetectionModel(student("yolo11n.yaml"), teacher, dict(RECIPE), imgsz=IMGSZ).train()
    assert [t.student for t in m11.distiller.cfg.features] == ["model.16", "model.19", "model.22"]
    assert [t.teacher for t in m11.distiller.cfg.features] == ["model.15", "model.18", "model.21"]
    _, items = m11.loss(batch)
    assert all(float(items[k]) > 0 for k in ("kd_cls", "kd_box", "kd_feat"))

    s26 = student("yolo26n.yaml")
    assert ul.head_kind(s26) == "e2e"
    with pytest.raises(ConfigError, match="reg_max"):
        ul.KDDetectionModel(s26, teacher, dict(RECIPE), imgsz=IMGSZ)
    recipe = {**RECIPE, "boxes": {"method": "l1_giou", "options": {"l1_weight": 1.0}}}
    m26 = ul.KDDetectionModel(student("yolo26n.yaml"), teacher, recipe, imgsz=IMGSZ).train()
    loss, items = m26.loss(batch)
    assert all(float(items[k]) > 0 for k in ("kd_cls", "kd_box", "kd_feat"))
    loss[-2].backward()  # kd_box reaches the YOLO26 student's one2many box branch
    assert any(p.grad is not None and float(p.grad.abs().sum()) > 0
               for n, p in m26.student_model.named_parameters() if ".cv2." in n)
