"""GPU checks (skipped without CUDA; CI has none): AMP distillation training through Ultralytics' trainer on device 0,
a float16 teacher handing float32 terms to the losses, and the teacher cache moving entries between GPU and CPU.
"""

from __future__ import annotations

import copy
import csv
import math
from pathlib import Path

import pytest
import torch
import yaml
from helpers import rect_dataset

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CI has none)")

IMGSZ = 64
RECIPE = {"logits": {"method": "sigmoid_kd"}, "boxes": {"method": "ld"}, "features": "auto", "feature_method": "cwd"}


@pytest.fixture(scope="module")
def ul():
    from detkd.integrations.ultralytics_env import ensure_ultralytics_offline

    ensure_ultralytics_offline()
    from detkd.integrations import ultralytics as ul

    return ul


@pytest.fixture(scope="module")
def no_amp_check():
    """Ultralytics' AMP check downloads a checkpoint; offline it would only warn, but never try."""
    with pytest.MonkeyPatch.context() as mp:
        import ultralytics.engine.trainer as tr

        mp.setattr(tr, "check_amp", lambda *a, **k: True)
        yield


@pytest.fixture(scope="module")
def data_yaml(tmp_path_factory) -> Path:
    """16 + 8 images of coloured rectangles (3 classes) in the Ultralytics layout."""
    return rect_dataset(tmp_path_factory.mktemp("rects"), IMGSZ)


@pytest.fixture(scope="module")
def teacher_pt(ul, data_yaml, no_amp_check, tmp_path_factory) -> Path:
    from ultralytics import YOLO

    proj = tmp_path_factory.mktemp("teacher")
    m = YOLO("yolov8n.yaml")
    m.train(data=str(data_yaml), epochs=1, imgsz=IMGSZ, batch=8, device=0, workers=0, project=str(proj), name="t",
            plots=False, verbose=False, seed=0, amp=True)
    return Path(m.trainer.best if Path(m.trainer.best).exists() else m.trainer.last)


def test_amp_distill_trainer_one_epoch_on_gpu(ul, data_yaml, teacher_pt, no_amp_check, tmp_path):
    from ultralytics import YOLO
    from ultralytics.utils.torch_utils import unwrap_model

    from detkd.assets import PICO_YAML

    kd = tmp_path / "kd.yaml"
    kd.write_text(yaml.safe_dump({"teacher": str(teacher_pt), "distill": {**RECIPE, "teacher_runtime": {"fuse": True}}}))
    m = YOLO(str(PICO_YAML))
    m.train(data=str(data_yaml), epochs=1, imgsz=IMGSZ, batch=8, device=0, workers=0, trainer=ul.DistillTrainer,
            distill_model=str(kd), project=str(tmp_path / "runs"), name="kd", plots=False, verbose=False, seed=0,
            amp=True)
    t = m.trainer
    assert t.amp is True and t.device.type == "cuda"
    d = unwrap_model(t.model).distiller
    assert d.teacher_forwards >= 2  # 16 images, batch 8
    teacher_p = next(d.teacher.parameters())
    assert teacher_p.is_cuda and teacher_p.dtype == torch.float16  # half: auto under AMP
    assert not any(isinstance(q, torch.nn.BatchNorm2d) for q in d.teacher.modules())  # fuse: true
    with open(Path(t.save_dir) / "results.csv") as f:
        rows = list(csv.reader(f))
    cols = [c.strip() for c in rows[0]]
    row = dict(zip(cols, rows[1]))
    for k in ("train/kd_cls", "train/kd_box", "train/kd_feat"):
        assert k in cols and math.isfinite(float(row[k])) and float(row[k]) > 0, (k, row.get(k))
    assert math.isfinite(float(row["train/box_loss"]))


def _models(ul, teacher_runtime: dict):
    from ultralytics.cfg import get_cfg
    from ultralytics.nn.tasks import DetectionModel

    from detkd.assets import PICO_YAML

    def build(cfg, seed):
        torch.manual_seed(seed)
        m = DetectionModel(cfg, nc=3, verbose=False)
        m.names, m.args = {0: "a", 1: "b", 2: "c"}, get_cfg()
        return m.cuda()

    teacher = build("yolov8n.yaml", 1).eval()
    model = ul.KDDetectionModel(build(str(PICO_YAML), 0), teacher,
                                {**RECIPE, "teacher_runtime": teacher_runtime}, imgsz=IMGSZ).train()
    model.student_model.eval()  # fixed BN statistics: comparable outputs across models
    return model


def _batch() -> dict:
    g = torch.Generator().manual_seed(0)
    return {"img": torch.rand(4, 3, IMGSZ, IMGSZ, generator=g).cuda(), "batch_idx": torch.tensor([0.0, 1, 2, 3]).cuda(),
            "cls": torch.tensor([[0.0], [1], [2], [0]]).cuda(),
            "bboxes": torch.tensor([[0.3, 0.3, 0.2, 0.3], [0.6, 0.5, 0.3, 0.2], [0.5, 0.5, 0.4, 0.4],
                                    [0.2, 0.7, 0.2, 0.2]]).cuda(),
            "im_file": ("0.jpg", "1.jpg", "2.jpg", "3.jpg")}


def _terms(ul, model, batch) -> dict[str, torch.Tensor]:
    """The Distiller's terms (and per-tap feature terms) for one batch, the student recorded as in training."""
    d = model.distiller
    with d.record(model.student_model):
        preds = model.student_model(batch["img"])
    boxes, valid = ul.yolo_gt_boxes(batch, (IMGSZ, IMGSZ))
    terms = d(batch["img"], student_output=preds, gt_boxes=boxes, gt_valid=valid, img_shape=(IMGSZ, IMGSZ),
              teacher_keys=batch.get("im_file"))
    return {**terms, **{k: v for k, v in d.last_terms.items() if k.startswith("kd_feat/")}}


def test_half_teacher_on_cuda_gives_float32_terms(ul):
    batch = _batch()
    ref_model = _models(ul, {"half": False})
    ref = _terms(ul, ref_model, batch)
    assert next(ref_model.distiller.teacher.parameters()).dtype == torch.float32
    half_model = _models(ul, {"half": True})
    half_model.load_state_dict(ref_model.state_dict())
    half_model.distiller.teacher_forward(batch["img"])
    tap = half_model.distiller.cfg.features[0].teacher  # a neck layer feeding Detect
    assert half_model.distiller.teacher_runner.tap(tap).dtype == torch.float16  # the teacher ran in float16 ...
    got = _terms(ul, half_model, batch)
    assert next(half_model.distiller.teacher.parameters()).dtype == torch.float16
    for k, v in got.items():  # ... and the losses still got float32, close to the float32 teacher's terms
        assert v.dtype == torch.float32 and torch.isfinite(v).all(), k
        torch.testing.assert_close(v.detach(), ref[k].detach(), rtol=5e-2, atol=1e-4, msg=k)
    got["kd_total"].backward()
    # half: auto -> float16 only when the teacher runs under CUDA autocast (AMP training)
    auto = _models(ul, {})
    _terms(ul, auto, batch)
    assert next(auto.distiller.teacher.parameters()).dtype == torch.float32
    with torch.autocast("cuda", dtype=torch.float16):
        terms = _terms(ul, auto, batch)
    assert next(auto.distiller.teacher.parameters()).dtype == torch.float16
    assert all(v.dtype == torch.float32 for v in terms.values())


@pytest.mark.parametrize("offload", [True, False])
def test_cache_on_cuda_offload_and_hits(ul, offload):
    batch = _batch()
    model = _models(ul, {"cache": "memory", "cache_offload": offload, "half": True, "fuse": True})
    d = model.distiller
    first = _terms(ul, model, batch)
    e = d.teacher_cache.get("2.jpg")
    assert all(v.is_cuda is not offload for v in e["t"].values())
    again = _terms(ul, model, batch)
    assert d.teacher_forwards == 1 and d.cache_hits == 4
    for k in first:
        assert again[k].is_cuda and again[k].dtype == torch.float32
        torch.testing.assert_close(again[k], first[k], rtol=1e-4, atol=1e-7, msg=k)
    plain = _models(ul, {"half": True, "fuse": True})
    plain.load_state_dict(model.state_dict())
    ref = _terms(ul, plain, {k: v for k, v in batch.items() if k != "im_file"})
    for k in first:
        torch.testing.assert_close(first[k], ref[k], rtol=1e-3, atol=1e-6, msg=k)
    assert copy.deepcopy(d).teacher_cache is d.teacher_cache
