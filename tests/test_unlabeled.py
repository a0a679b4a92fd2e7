"""distill.unlabeled: soft-label distillation on unlabeled frames inside Ultralytics' trainer.

Config validation; the batch plan / sampler (per-batch share, every labeled frame once per epoch, DDP shards);
the mixed dataset (empty labels for unlabeled frames even with label files beside them, mosaic within a pool, the
``unlabeled`` flag in the batch); the loss (detection loss of a mixed batch == Ultralytics' criterion on the
labeled frames alone, zero detection gradient and non-zero KD gradient on unlabeled frames; teacher pseudo boxes
for FGD); and a tiny ``detkd train`` end to end: interrupted, resumed from the CLI, kd columns, plain best.pt.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from detkd.integrations.ultralytics_env import ensure_ultralytics_offline

ensure_ultralytics_offline()

from ultralytics.cfg import get_cfg  # noqa: E402
from ultralytics.nn.tasks import DetectionModel  # noqa: E402
from ultralytics.utils.loss import v8DetectionLoss  # noqa: E402

from detkd.assets import PICO_YAML  # noqa: E402
from detkd.config import DistillConfig, UnlabeledConfig, load_config  # noqa: E402
from detkd.errors import ConfigError  # noqa: E402
from detkd.integrations import ultralytics as ul  # noqa: E402
from detkd.integrations.ultralytics_unlabeled import (  # noqa: E402
    MixedDataset,
    MixedSampler,
    batch_plan,
    pseudo_boxes,
)
from helpers import rect_dataset, train_tiny_teacher  # noqa: E402

IMGSZ = 64


@pytest.fixture(scope="module")
def data_yaml(tmp_path_factory) -> Path:
    return rect_dataset(tmp_path_factory.mktemp("rects"), IMGSZ)


@pytest.fixture(scope="module")
def unlabeled_dir(data_yaml) -> Path:
    """The val images of the tiny dataset, used as unlabeled frames (their labels/val files must be ignored)."""
    return data_yaml.parent / "images" / "val"


@pytest.fixture(scope="module")
def teacher_pt(data_yaml, tmp_path_factory) -> Path:
    tr = train_tiny_teacher(data_yaml, tmp_path_factory.mktemp("teacher"), IMGSZ)
    return Path(tr.best if Path(tr.best).exists() else tr.last)


# ----------------------------------------------------------------------------------------------------------------
# config
# ----------------------------------------------------------------------------------------------------------------
def _err(d) -> str:
    with pytest.raises(ConfigError) as e:
        DistillConfig.from_dict(d)
    return str(e.value)


def test_config_validation_names_the_key(tmp_path, unlabeled_dir):
    c = DistillConfig.from_dict({"unlabeled": {"source": str(unlabeled_dir), "ratio": 0.25}})
    assert c.unlabeled == UnlabeledConfig(source=str(unlabeled_dir), ratio=0.25, pseudo_conf=0.5)
    assert DistillConfig.from_dict(c.to_dict()) == c  # round trip
    assert len(c.unlabeled.images()) == 8
    assert DistillConfig.from_dict({"unlabeled": str(unlabeled_dir)}).unlabeled.ratio == 0.5  # shorthand
    assert DistillConfig.from_dict({"unlabeled": None}).unlabeled is None

    assert "distill.unlabeled.source: not found" in _err({"unlabeled": {"source": str(tmp_path / "nope")}})
    assert "distill.unlabeled.source" in _err({"unlabeled": {"ratio": 0.5}})
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    assert "holds no image files" in _err({"unlabeled": {"source": str(tmp_path / "empty")}})
    video = tmp_path / "clip.mp4"
    video.write_bytes(b"\0")
    assert "videos are not read here" in _err({"unlabeled": {"source": str(video)}})
    for r in (0, 1, 1.5, -0.1):
        msg = _err({"unlabeled": {"source": str(unlabeled_dir), "ratio": r}})
        assert msg.startswith("distill.unlabeled.ratio: ") and "> 0 and < 1" in msg, msg
    assert _err({"unlabeled": {"source": str(unlabeled_dir), "ratio": "half"}}).startswith("distill.unlabeled.ratio:")
    assert "did you mean 'ratio'" in _err({"unlabeled": {"source": str(unlabeled_dir), "ration": 0.5}})
    assert _err({"unlabeled": {"source": str(unlabeled_dir), "pseudo_conf": 0}}).startswith(
        "distill.unlabeled.pseudo_conf:")
    assert "bounded" in _err({"boxes": "bounded", "unlabeled": {"source": str(unlabeled_dir)}})

    # a relative source is relative to the config file; a .txt list of images works too
    lst = tmp_path / "list.txt"
    lst.write_text("\n".join(str(p) for p in sorted(unlabeled_dir.glob("*.jpg"))[:3]))
    (tmp_path / "kd.yaml").write_text(yaml.safe_dump({"distill": {"unlabeled": {"source": "list.txt"}}}))
    c = load_config(tmp_path / "kd.yaml")
    assert Path(c.unlabeled.source) == lst.resolve() and len(c.unlabeled.images()) == 3
    # the suffix set the config layer uses is detkd's (= Ultralytics') image suffix set
    from ultralytics.data.utils import IMG_FORMATS

    from detkd.config import IMAGE_SUFFIXES
    from detkd.data.formats import IMG_SUFFIXES

    assert IMAGE_SUFFIXES == IMG_SUFFIXES == frozenset(IMG_FORMATS)


# ----------------------------------------------------------------------------------------------------------------
# batch plan and sampler
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n, b, r", [(16, 8, 0.5), (16, 8, 0.3), (17, 4, 0.25), (10, 2, 0.9), (5, 1, 0.5),
                                     (3, 8, 0.5)])
def test_batch_plan_share_and_epoch(n, b, r):
    plan = batch_plan(n, b, r)
    assert sum(lab for lab, _ in plan) == n  # an epoch = every labeled frame once
    assert all(lab + u == b for lab, u in plan[:-1]) and 0 < sum(plan[-1]) <= b  # only the last is partial
    if b >= 2:
        assert all(lab >= 1 for lab, _ in plan)  # never a batch without labeled frames
    full = [u for lab, u in plan if lab + u == b]
    if len(full) >= 4:
        cap = r if b == 1 else min(r, (b - 1) / b)  # batch 1: some batches are all unlabeled
        assert abs(sum(full) / (len(full) * b) - cap) <= 1 / len(full)


def test_sampler_batches_and_ddp_shards():
    n_l, n_u, b, r = 16, 8, 8, 0.5
    s = MixedSampler(n_l, n_u, b, r, seed=3)
    idx = list(s)
    assert len(idx) == len(s) == 32 and s.num_batches == 4
    for k in range(4):
        chunk = idx[k * b:(k + 1) * b]
        assert sum(i >= n_l for i in chunk) == 4  # exactly R of every batch unlabeled
    assert sorted(i for i in idx if i < n_l) == list(range(n_l))  # each labeled frame once
    unl = [i for i in idx if i >= n_l]  # 16 needed per epoch, 8 exist: each twice
    assert sorted(unl) == sorted(list(range(n_l, n_l + n_u)) * 2)
    second = list(s)
    assert second != idx  # a new epoch, a new order
    # DDP: disjoint labeled shards covering the pool, the same number of batches on every rank
    shards = [MixedSampler(n_l, n_u, 4, r, seed=3, rank=k, world=2) for k in range(2)]
    out = [list(x) for x in shards]
    assert shards[0].num_batches == shards[1].num_batches
    lab = [sorted(i for i in o if i < n_l) for o in out]
    assert not set(lab[0]) & set(lab[1]) and sorted(lab[0] + lab[1]) == list(range(n_l))


# ----------------------------------------------------------------------------------------------------------------
# dataset
# ----------------------------------------------------------------------------------------------------------------
def _dataset(data_yaml, unlabeled, **hyp) -> MixedDataset:
    from ultralytics.data.utils import check_det_dataset

    data = check_det_dataset(str(data_yaml))
    cfg = get_cfg(overrides={"imgsz": IMGSZ, **hyp})
    return MixedDataset(img_path=data["train"], imgsz=IMGSZ, batch_size=4, augment=True, hyp=cfg, rect=False,
                        cache=None, stride=32, pad=0.0, data=data, task="detect", unlabeled_files=unlabeled)


def test_mixed_dataset_flags_empty_labels_and_pools(data_yaml, unlabeled_dir):
    train_img = sorted((data_yaml.parent / "images" / "train").glob("*.jpg"))[0]
    files = sorted(unlabeled_dir.glob("*.jpg")) + [train_img]  # a labeled train image in the source: left out
    assert (data_yaml.parent / "labels" / "val" / "0.txt").read_text().strip()  # the val images do have labels
    ds = _dataset(data_yaml, files, mosaic=1.0, mixup=0.5)
    assert ds.n_labeled == 16 and ds.n_unlabeled == 8 and ds.unlabeled_already_labeled == 1
    assert all(len(lb["cls"]) == 0 for lb in ds.labels[16:]) and all(len(lb["cls"]) for lb in ds.labels[:16])

    loaded = []
    orig = MixedDataset.get_image_and_label

    def spy(self, index):
        out = orig(self, index)
        loaded.append(self.im_files.index(out["im_file"]))
        return out

    MixedDataset.get_image_and_label = spy
    try:
        for i in list(range(0, 16, 3)) + list(range(16, 24, 2)):
            for _ in range(3):  # mosaic / mixup draw their extra images at random
                loaded.clear()
                item = ds[i]
                assert item["unlabeled"] is (i >= 16)
                assert len(loaded) >= 4  # a mosaic (4 tiles), sometimes a mixup on top
                assert all((j >= 16) == (i >= 16) for j in loaded), (i, loaded)  # never across pools
                if i >= 16:
                    assert item["cls"].numel() == 0 and item["bboxes"].numel() == 0
    finally:
        MixedDataset.get_image_and_label = orig
    batch = MixedDataset.collate_fn([ds[0], ds[20], ds[1]])
    assert batch["unlabeled"].dtype == torch.bool and batch["unlabeled"].tolist() == [False, True, False]
    assert not (batch["batch_idx"] == 1).any()  # the unlabeled frame has no targets


# ----------------------------------------------------------------------------------------------------------------
# loss
# ----------------------------------------------------------------------------------------------------------------
RECIPE = {"logits": {"method": "sigmoid_kd", "weight": 1.0}, "boxes": {"method": "ld", "weight": 1.0},
          "features": "auto", "feature_method": "cwd"}


def _model(teacher_pt, recipe):
    teacher = ul.load_teacher(teacher_pt)
    s = DetectionModel(str(PICO_YAML), nc=teacher.nc, verbose=False)
    s.names, s.args = teacher.names, get_cfg()
    model = ul.KDDetectionModel(s, teacher, recipe, imgsz=IMGSZ).train()
    for m in model.student_model.modules():  # BN from running stats: frames independent, so a subset is comparable
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eval()
    return model


def _mixed_batch():
    torch.manual_seed(0)
    img = torch.rand(4, 3, IMGSZ, IMGSZ)
    # frames 0 and 2 labeled, 1 and 3 unlabeled (no targets)
    return {"img": img, "batch_idx": torch.tensor([0.0, 0.0, 2.0]), "cls": torch.tensor([[0.0], [1.0], [2.0]]),
            "bboxes": torch.tensor([[0.3, 0.3, 0.2, 0.3], [0.6, 0.5, 0.3, 0.2], [0.5, 0.5, 0.4, 0.4]]),
            "unlabeled": torch.tensor([False, True, False, True])}


def test_detection_loss_sees_labeled_frames_only_kd_sees_all(teacher_pt):
    model = _model(teacher_pt, dict(RECIPE))
    batch = _mixed_batch()
    loss, items = model.loss(batch)
    nk = len(model.kd_terms)
    det = loss[:-nk]

    # independent: Ultralytics' criterion on a batch of the labeled frames alone
    lab = {"img": batch["img"][[0, 2]], "batch_idx": torch.tensor([0.0, 0.0, 1.0]), "cls": batch["cls"],
           "bboxes": batch["bboxes"]}
    with torch.no_grad():
        ref, ref_items = v8DetectionLoss(model.student_model)(model.student_model(lab["img"]), lab)
    assert torch.allclose(det.detach(), ref, rtol=1e-4, atol=1e-6), (det, ref)
    for k, v in ref_items.items():
        assert torch.allclose(items[k], v, rtol=1e-4, atol=1e-6), k
    # the EMA copy (no teacher; Ultralytics' validation path) masks the same way
    import copy

    ema = copy.deepcopy(model)
    ema.teacher_model = None
    with torch.no_grad():
        v_loss, v_items = ema.loss(batch)
    assert torch.allclose(v_loss[:-nk], ref, rtol=1e-4, atol=1e-6) and all(float(v_items[k]) == 0
                                                                           for k in model.kd_terms)
    # without the flag, the unlabeled frames would count as pure background for the detection loss
    plain, _ = model.loss({k: v for k, v in batch.items() if k != "unlabeled"})
    assert not torch.allclose(plain[:-nk].detach(), ref, rtol=1e-3)
    for k in model.kd_terms:
        assert float(items[k]) > 0, k

    # gradients: the detection loss never reaches an unlabeled frame; every KD term does
    img = batch["img"].clone().requires_grad_(True)
    loss, _ = model.loss({**batch, "img": img})
    (g_det,) = torch.autograd.grad(loss[:-nk].sum(), img, retain_graph=True)
    assert float(g_det[[1, 3]].abs().sum()) == 0.0 and float(g_det[[0, 2]].abs().sum()) > 0
    for i, k in enumerate(model.kd_terms):
        (g,) = torch.autograd.grad(loss[len(loss) - nk + i], img, retain_graph=True)
        assert float(g[1].abs().sum()) > 0 and float(g[3].abs().sum()) > 0, k

    # a batch of unlabeled frames only: zero detection loss, KD terms as usual
    only = {**batch, "batch_idx": torch.zeros(0), "cls": torch.zeros(0, 1), "bboxes": torch.zeros(0, 4),
            "unlabeled": torch.ones(4, dtype=torch.bool)}
    loss, items = model.loss(only)
    assert float(loss[:-nk].detach().abs().sum()) == 0.0
    assert all(float(items[k]) == 0 for k in ("box_loss", "cls_loss", "dfl_loss"))
    assert all(float(items[k]) > 0 for k in model.kd_terms)


def test_pseudo_boxes_conf_nms_clip_cap():
    cls = torch.full((2, 5, 3), -10.0)
    cls[0, 0, 1] = 3.0  # 0.95
    cls[0, 1, 2] = 2.0  # 0.88, overlaps anchor 0 -> suppressed (class-agnostic)
    cls[0, 2, 0] = 1.0  # 0.73, elsewhere -> kept
    cls[0, 3, 0] = -1.0  # 0.27 -> below conf
    cls[1, 0, 0] = 5.0  # frame 1 is labeled: never pseudo boxes
    boxes = torch.tensor([[0, 0, 20, 20], [1, 1, 21, 21], [30, 30, 80, 50], [5, 5, 9, 9], [0, 0, 5, 5]]).float()
    boxes = boxes.expand(2, 5, 4).clone()
    cls = cls.sigmoid().amax(-1)  # the teacher's confidence per anchor (YOLO: max class sigmoid)
    b, v = pseudo_boxes(cls, boxes, torch.tensor([True, False]), 0.5, (40, 64))
    assert v.tolist() == [[True, True], [False, False]]
    assert b[0, 0].tolist() == [0, 0, 20, 20] and b[0, 1].tolist() == [30, 30, 64, 40]  # clipped to the image
    b, v = pseudo_boxes(cls, boxes, torch.tensor([True, False]), 0.5, (40, 64), max_det=1)
    assert v.sum() == 1 and b[0, 0].tolist() == [0, 0, 20, 20]
    b, v = pseudo_boxes(cls, boxes, torch.tensor([False, False]), 0.5, (40, 64))
    assert b.shape == (2, 0, 4) and v.shape == (2, 0)


def test_fgd_gets_teacher_boxes_on_unlabeled_frames(teacher_pt, unlabeled_dir):
    # a 1-epoch teacher scores about 0.004 everywhere: a low pseudo_conf gives it boxes to find
    recipe = {"logits": {"method": "sigmoid_kd"}, "features": "auto", "feature_method": "fgd",
              "unlabeled": {"source": str(unlabeled_dir), "ratio": 0.5, "pseudo_conf": 0.001}}
    model = _model(teacher_pt, recipe)
    assert model.distiller.cfg.unlabeled.pseudo_conf == 0.001
    seen = {}
    forward = model.distiller.forward

    def spy(*a, **k):
        seen.update(gt_boxes=k["gt_boxes"], gt_valid=k["gt_valid"])
        return forward(*a, **k)

    model.distiller.forward = spy
    runs = model.distiller.teacher_forwards
    batch = _mixed_batch()
    loss, items = model.loss(batch)
    assert model.distiller.teacher_forwards == runs + 1  # the pseudo boxes' teacher run is the KD teacher run
    valid = seen["gt_valid"]
    assert valid[0].sum() == 2 and valid[2].sum() == 1  # labeled frames: their ground truth only
    assert valid[1].sum() > 0 and valid[3].sum() > 0  # unlabeled frames: the teacher's boxes
    assert float(items["kd_feat"]) > 0
    # stop_epoch reached: no teacher run at all, zero terms
    model.distiller.cfg.stop_epoch = 0
    model.distiller.set_progress(1, 2)
    runs = model.distiller.teacher_forwards
    _, items = model.loss(_mixed_batch())
    assert model.distiller.teacher_forwards == runs and float(items["kd_feat"]) == 0


# ----------------------------------------------------------------------------------------------------------------
# end to end: detkd train with distill.unlabeled, interrupted, resumed from the CLI
# ----------------------------------------------------------------------------------------------------------------
def _cols(run: Path) -> tuple[list[str], list[list[str]]]:
    with open(run / "results.csv") as f:
        rows = list(csv.reader(f))
    return [c.strip() for c in rows[0]], rows[1:]


def test_detkd_train_unlabeled_resume_and_plain_best(teacher_pt, data_yaml, unlabeled_dir, tmp_path):
    from detkd import train as tr
    from detkd.integrations.ultralytics_unlabeled import MixedSampler as Sampler

    root = data_yaml.parent
    cfg = {"teacher": str(teacher_pt), "student": str(PICO_YAML), "data": str(data_yaml), "epochs": 2,
           "imgsz": IMGSZ, "batch": 8, "device": "cpu", "workers": 0, "project": str(tmp_path / "runs"),
           "name": "unl", "plots": False, "seed": 0, "amp": False,
           "distill": {"logits": {"method": "kd", "temperature": 2.0}, "boxes": {"method": "ld"}, "features": "auto",
                       "feature_method": "fgd",
                       "unlabeled": {"source": os.path.relpath(unlabeled_dir, root), "ratio": 0.5}}}
    p = root / "unl.yaml"  # the source is relative to the config file
    p.write_text(yaml.safe_dump(cfg))

    class Stop(Exception):
        pass

    seen = {}

    def stop_after_first_save(trainer):
        seen["sampler"] = trainer.train_loader.sampler
        seen["dataset"] = trainer.train_loader.dataset
        if trainer.epoch == 0:
            raise Stop

    with pytest.raises(Stop):
        tr.train(tr.load_train_config(p), callbacks={"on_model_save": stop_after_first_save})
    s, ds = seen["sampler"], seen["dataset"]
    assert isinstance(s, Sampler) and ds.n_labeled == 16 and ds.n_unlabeled == 8
    assert s.plan == [(4, 4)] * 4  # 16 labeled frames, 4 + 4 per batch of 8
    run = tmp_path / "runs" / "unl"
    assert (run / "weights" / "last.pt").is_file() and (run / "weights" / "last.kd.pt").is_file()

    r = subprocess.run([sys.executable, "-m", "detkd", "train", str(p), "resume=True"], capture_output=True,
                       text=True, timeout=600, env={**os.environ, "YOLO_VERBOSE": "True"})
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout + r.stderr
    assert "resuming" in out and "detkd: unlabeled: 8 images" in out, out[-3000:]
    cols, rows = _cols(run)
    assert len(rows) == 2  # epoch 1 (interrupted run) + epoch 2 (resumed)
    for k in ("train/kd_cls", "train/kd_box", "train/kd_feat"):
        assert k in cols
        assert all(float(row[cols.index(k)]) > 0 for row in rows), k
    best = run / "weights" / "best.pt"
    script = textwrap.dedent(f"""
        import sys
        sys.modules['detkd'] = None  # any import of detkd fails
        import numpy as np
        from ultralytics import YOLO
        m = YOLO({str(best)!r})
        r = m.predict(source=[np.zeros(({IMGSZ}, {IMGSZ}, 3), 'uint8')], imgsz={IMGSZ}, verbose=False)
        print('OK', type(m.model).__name__, len(r))
    """)
    q = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "YOLO_OFFLINE": "1"})
    assert q.returncode == 0 and "OK DetectionModel 1" in q.stdout, q.stderr[-2000:]
