"""torchvision detectors through the Distiller (detkd.integrations.torchvision) and `detkd train` with
``framework: torchvision`` (detkd.integrations.torchvision_train). Tiny images (64 px), 2-4 of them, offline."""

from __future__ import annotations

import csv
import subprocess
import sys
import textwrap

import pytest
import torch
import yaml

from detkd.errors import ConfigError
from detkd.integrations import torchvision as tvkd
from helpers import no_downloads, one_thread  # noqa: F401 (autouse fixtures)

IMG = 64
PAIRS = {  # family: (teacher, student)
    "retinanet": ("retinanet_resnet50_fpn", "retinanet_mobilenet_v3_large_fpn"),
    "fcos": ("fcos_resnet50_fpn", "fcos_resnet18_fpn"),
    "ssd": ("ssdlite320_mobilenet_v3_large", "ssdlite_mobilenet_v3_large"),
    "rcnn": ("fasterrcnn_resnet50_fpn", "fasterrcnn_mobilenet_v3_large_fpn"),
}


def batch(offset: int):
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, IMG, IMG, generator=g) for _ in range(2)]
    targets = [{"boxes": torch.tensor([[5.0, 6.0, 30.0, 40.0]]), "labels": torch.tensor([1 + offset])},
               {"boxes": torch.tensor([[10.0, 10.0, 50.0, 30.0], [1.0, 1.0, 12.0, 9.0]]),
                "labels": torch.tensor([0, 2]) + offset}]
    return images, targets


@pytest.mark.parametrize("family", list(PAIRS))
def test_family_distils_offline(family):
    torch.manual_seed(0)
    tname, sname = PAIRS[family]
    teacher, student = tvkd.build(tname, 3, IMG), tvkd.build(sname, 3, IMG)
    assert tvkd.family_of(teacher) == tvkd.family_of(student) == family
    softmax = family in ("ssd", "rcnn")
    cfg = {"logits": {"method": "kd" if softmax else "sigmoid_kd"}, "boxes": {"method": "l1_giou"}, "features": "auto"}
    images, targets = batch(tvkd.label_offset(family))
    kd = tvkd.make_distiller(student, teacher, cfg, images)
    taps = [(f.student, f.teacher) for f in kd.cfg.features]
    assert taps and all(s.startswith("backbone:") and t.startswith("backbone:") for s, t in taps)
    if family == "rcnn":  # MobileNet FPN (strides 32, 32, 64) against ResNet-50 FPN (4 ... 64): paired by size
        assert taps == [("backbone:0", "backbone:3"), ("backbone:pool", "backbone:pool")]
    student.train()
    seen = {}
    real = kd.head_extractor

    def spy(out):
        seen["s"] = real(out)
        return seen["s"]

    kd.head_extractor = spy
    losses, terms = tvkd.distill_step(kd, student, images, targets)
    s = seen["s"]
    k = tvkd.num_classes_of(student)
    if family == "rcnn":  # one row per sampled RoI, K + 1 softmax columns, the boxes of the teacher's top class
        assert s.cls.dim() == 3 and s.cls.shape[0] == 1 and s.cls.shape[2] == k
        assert s.boxes.shape == (*s.cls.shape[:2], 4)
        assert s.cls_activation == "softmax" and s.background == 0
    else:
        n_anchors = s.cls.shape[1]
        assert s.cls.shape == (2, n_anchors, k) and s.boxes.shape == (2, n_anchors, 4)
        assert s.cls_activation == ("softmax" if softmax else "sigmoid")
        if family == "fcos":
            assert s.confidence.shape == (2, n_anchors)
    for key in ("kd_cls", "kd_box", "kd_feat"):
        assert torch.isfinite(terms[key]) and terms[key].item() > 0, key
    (sum(losses.values()) + terms["kd_total"]).backward()
    head = student.roi_heads.box_predictor if family == "rcnn" else student.head
    grads = [p.grad for p in head.parameters()]
    assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0
    assert all(p.grad is None for p in teacher.parameters())
    # the KD terms alone reach the student's head (logits / boxes) and backbone (features)
    student.zero_grad()
    _, terms = tvkd.distill_step(kd, student, images, targets)
    (terms["kd_cls"] + terms["kd_box"]).backward()
    assert sum(p.grad.abs().sum() for p in head.parameters() if p.grad is not None) > 0


def test_anchor_mismatch_is_named():
    from torchvision.models.detection.anchor_utils import AnchorGenerator

    images, _ = batch(0)
    teacher = tvkd.build("retinanet_resnet18_fpn", 3, IMG)
    dense = {"logits": {"method": "sigmoid_kd"}, "boxes": {"method": "l1_giou"}}
    with pytest.raises(ConfigError, match=r"anchors differ: the teacher is retinanet, the student fcos"):
        tvkd.make_distiller(tvkd.build("fcos_resnet18_fpn", 3, IMG), teacher, dense, images)
    other = tvkd.build("retinanet_resnet18_fpn", 3, IMG)
    other.anchor_generator = AnchorGenerator(((16,), (32,), (64,), (128,), (256,)), ((0.5, 1.0, 2.0),) * 5)
    with pytest.raises(ConfigError, match=r"anchor_generator.sizes: teacher \(\(32, 40, 50\).* vs student \(\(16,\)"):
        tvkd.make_distiller(other, teacher, dense, images)
    from torchvision.models.detection import RetinaNet
    from torchvision.models.detection.backbone_utils import mobilenet_backbone
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7

    mobile = RetinaNet(mobilenet_backbone(backbone_name="mobilenet_v3_large", fpn=True, weights=None,  # strides 32, 32
                                          extra_blocks=LastLevelP6P7(256, 256)), 3, min_size=IMG, max_size=IMG)
    with pytest.raises(ConfigError, match=r"feature levels on a 64x64 batch: teacher 5 levels 8x8, 4x4, 2x2, 1x1, 1x1; "
                                          r"student 4 levels 2x2, 2x2, 1x1, 1x1"):
        tvkd.make_distiller(mobile, teacher, dense, images)
    with pytest.raises(ConfigError, match="dense head with a dense head or Faster R-CNN"):
        tvkd.make_distiller(tvkd.build("fasterrcnn_resnet18_fpn", 3, IMG), teacher, dense, images)
    kd = tvkd.make_distiller(tvkd.build("fcos_resnet18_fpn", 3, IMG), teacher, {"features": "auto"}, images)
    assert len(kd.cfg.features) == 5  # features only: any two FPNs with levels of equal size


def test_teacher_sees_the_student_batch_in_its_own_normalisation():
    images, _ = batch(1)
    teacher = tvkd.build("ssdlite320_mobilenet_v3_large", 3, IMG)  # mean / std 0.5
    student = tvkd.build("fasterrcnn_mobilenet_v3_large_fpn", 3, IMG)  # ImageNet mean / std
    x = tvkd.transformed(student, images)
    view = tvkd.TeacherView(teacher, student).eval()
    assert view.renorm and dict(view.state_dict()).keys() == {k for k in teacher.state_dict()}
    with torch.no_grad():
        got = view.backbone(x * view.scale + view.shift)["0"]
        want = teacher.eval().backbone(tvkd.transformed(teacher, images))["0"]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_unknown_arch_and_options_are_refused():
    with pytest.raises(ConfigError, match="did you mean retinanet_resnet18_fpn"):
        tvkd.build("retinanet_resnet18", 3, IMG)
    with pytest.raises(ConfigError, match="options.norm applies to the ResNet / MobileNet FPN students"):
        tvkd.build("retinanet_resnet50_fpn", 3, IMG, norm="group")


# -- detkd train, framework: torchvision -------------------------------------------------------------------------------
BLOCK_DETKD = textwrap.dedent("""
    import runpy, sys
    class Block:
        def find_spec(self, name, path=None, target=None):
            if name == "detkd" or name.startswith("detkd."):
                raise ImportError("detkd is blocked in this process")
    sys.meta_path.insert(0, Block())
    try:
        import detkd
        raise SystemExit("detkd was importable")
    except ImportError:
        pass
    ns = runpy.run_path(sys.argv[1])
    model = ns["model"]
    assert type(model).__module__.startswith("torchvision."), type(model)
    out = model([__import__("torch").rand(3, 64, 64)])
    assert {"boxes", "scores", "labels"} <= set(out[0])
    print("plain torchvision OK", type(model).__name__)
""")


def test_detkd_train_torchvision_resume_and_plain_checkpoint(tmp_path):
    from detkd.cli import main
    from detkd.data.synth import generate
    from detkd.train import load_train_config, train

    generate(tmp_path / "data", n_train=4, n_val=2, imgsz=IMG, progress=False)
    torch.save(tvkd.build("ssdlite320_mobilenet_v3_large", 5, IMG).state_dict(), tmp_path / "teacher.pt")
    cfg_file = tmp_path / "kd.yaml"
    cfg_file.write_text(yaml.safe_dump({
        "framework": "torchvision", "teacher": {"arch": "ssdlite320_mobilenet_v3_large", "checkpoint": "teacher.pt"},
        "student": {"arch": "ssdlite_mobilenet_v3_large"}, "data": "data/data.yaml", "epochs": 2, "batch": 4,
        "imgsz": IMG, "project": str(tmp_path / "runs"), "name": "kd", "threads": 1}))

    class Killed(Exception):
        pass

    def kill(epoch, row, run):
        if epoch == 0:
            raise Killed  # as if the process died right after epoch 1's checkpoint

    with pytest.raises(Killed):
        train(load_train_config(cfg_file), callbacks={"on_epoch_end": kill})
    run = tmp_path / "runs" / "kd"
    rows = list(csv.DictReader((run / "results.csv").open()))
    assert [r["epoch"] for r in rows] == ["1"]
    for col in ("train/kd_cls", "train/kd_box", "train/kd_feat", "train/classification", "metrics/mAP50-95"):
        assert col in rows[0] and rows[0][col] != "", col
    assert float(rows[0]["train/kd_cls"]) > 0
    assert torch.load(run / "weights" / "last.pt", weights_only=True)["epoch"] == 0
    assert yaml.safe_load((run / "distill.yaml").read_text())["features"][0]["student"] == "backbone:0"
    # resume after the "kill": the CLI, as a user runs it
    assert main(["train", str(cfg_file), "resume=True"]) == 0
    rows = list(csv.DictReader((run / "results.csv").open()))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert torch.load(run / "weights" / "last.pt", weights_only=True)["epoch"] == 1
    assert not (tmp_path / "runs" / "kd2").exists()
    # the detections are what detkd eval --detections scores
    from detkd.eval import evaluate_detections

    m = evaluate_detections(run / "val" / "detections.json", tmp_path / "data" / "data.yaml")
    assert m["AP"] == pytest.approx(float(rows[-1]["metrics/mAP50-95"]), abs=1e-5)
    # the student-only checkpoint loads with plain torchvision where `import detkd` fails
    script = tmp_path / "block.py"
    script.write_text(BLOCK_DETKD)
    r = subprocess.run([sys.executable, str(script), str(run / "weights" / "build_student.py")], capture_output=True,
                       text=True, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "plain torchvision OK SSD" in r.stdout
    with pytest.raises(ConfigError, match="finished all 2 epochs"):
        train(load_train_config(cfg_file, ["resume=True"]))


def test_torchvision_config_errors(tmp_path):
    from detkd.train import load_train_config, train

    base = {"framework": "torchvision", "student": {"arch": "retinanet_resnet18_fpn"}, "data": "d.yaml"}
    for extra, msg in (({"epoch": 3}, "unknown key 'epoch' for framework: torchvision; did you mean 'epochs'"),
                       ({"teacher": {"arch": "retinanet_resnet50_fpn"}}, "teacher.checkpoint: a teacher needs"),
                       ({"teacher": "t.pt"}, r"teacher: expected \{arch: NAME, checkpoint: FILE\}"),
                       ({"student": {"arch": "retinanet_resnet18_fpn", "weights": "x"}},
                        r"unknown key\(s\) \['weights'\]")):
        f = tmp_path / "c.yaml"
        f.write_text(yaml.safe_dump({**base, **extra}))
        with pytest.raises(ConfigError, match=msg):
            train(load_train_config(f))
    f.write_text(yaml.safe_dump({**base, "teacher": {"arch": "retinanet_resnet50_fpn", "checkpoint": "t.pt"}}))
    (tmp_path / "t.pt").write_bytes(b"")
    cfg = load_train_config(f)
    assert cfg["distill"]["logits"]["method"] == "sigmoid_kd" and cfg["distill"]["boxes"]["method"] == "l1_giou"
    f.write_text(yaml.safe_dump({**base, "student": {"arch": "ssdlite_mobilenet_v3_large"}}))
    assert load_train_config(f)["distill"]["logits"]["method"] == "kd"  # softmax head
    # online / self distillation exist for Ultralytics models only: refused, not silently run with a frozen teacher
    f.write_text(yaml.safe_dump({**base, "teacher": {"arch": "retinanet_resnet50_fpn", "checkpoint": "t.pt"},
                                 "distill": {"mode": "online", "logits": {"method": "sigmoid_kd"}}}))
    with pytest.raises(ConfigError, match="distill.mode: online is supported with Ultralytics models only"):
        train(load_train_config(f))


def test_shipped_torchvision_config_is_valid():
    from pathlib import Path

    from detkd.config import DistillConfig
    from detkd.integrations.torchvision_train import settings
    from detkd.train import load_train_config

    path = Path(__file__).resolve().parents[1] / "configs" / "synth_torchvision.yaml"
    cfg = load_train_config(path, ["teacher=null", "student.arch=ssdlite320_mobilenet_v3_large"])  # the teacher run
    s = settings(cfg)
    assert s["teacher"] is None and s["distill"] is None and s["student"]["arch"] == "ssdlite320_mobilenet_v3_large"
    tvkd.build_code(s["student"]["arch"], 5, s["imgsz"], **s["student"]["options"])
    cfg = load_train_config(path)
    assert cfg["framework"] == "torchvision" and cfg["teacher"]["arch"] == "ssdlite320_mobilenet_v3_large"
    d = DistillConfig.from_dict(cfg["distill"])
    assert d.logits.method == "kd" and d.boxes.method == "l1_giou" and d.features == "auto"
