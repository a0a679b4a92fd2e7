"""distill.mode online / self: online (mutual) distillation and self-distillation inside Ultralytics' trainer.

Config validation (closest-key errors, what each mode refuses); online: both models' parameters change after an
optimizer step, the teacher's detection loss is a loss item, the KD terms wait for the warm-up, the student <- teacher
terms reach only the student and the mutual terms only the teacher, the EMA copy carries no teacher, best.pt is a plain
student, resume restores the teacher; self: the KD terms are non-zero with gradients into the student only, the teacher
pass is the student itself at 2x without touching its BatchNorm statistics, and no other model runs; a tiny
``detkd train`` end to end for each mode.
"""

from __future__ import annotations

import copy
import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from detkd.integrations.ultralytics_env import ensure_ultralytics_offline

ensure_ultralytics_offline()

from ultralytics import YOLO  # noqa: E402
from ultralytics.cfg import get_cfg  # noqa: E402
from ultralytics.nn.tasks import DetectionModel, load_checkpoint  # noqa: E402
from ultralytics.utils.torch_utils import ModelEMA, unwrap_model  # noqa: E402

from detkd.assets import PICO_YAML  # noqa: E402
from detkd.config import DistillConfig, load_config  # noqa: E402
from detkd.distiller import Distiller  # noqa: E402
from detkd.distiller.terms import term_keys  # noqa: E402
from detkd.errors import ConfigError  # noqa: E402
from detkd.integrations import ultralytics as ul  # noqa: E402
from detkd.train import _check_keys  # noqa: E402
from helpers import StopTraining, rect_dataset, stop_after_first_save  # noqa: E402

IMGSZ = 64
NAMES = {0: "red", 1: "green", 2: "blue"}
RECIPE = {"logits": {"method": "sigmoid_kd", "options": {"avg_factor": "teacher_score"}}, "boxes": {"method": "ld"},
          "features": "auto"}


@pytest.fixture(scope="module")
def data_yaml(tmp_path_factory) -> Path:
    return rect_dataset(tmp_path_factory.mktemp("rects"), IMGSZ)


def _student() -> DetectionModel:
    s = DetectionModel(str(PICO_YAML), nc=3, verbose=False)
    s.names, s.args = dict(NAMES), get_cfg()
    return s


def _online_teacher() -> DetectionModel:
    t = ul.build_online_teacher("yolov8n.yaml", 3, NAMES)
    t.args = get_cfg()
    return t


def _batch(n: int = 2) -> dict:
    torch.manual_seed(0)
    return {"img": torch.rand(n, 3, IMGSZ, IMGSZ), "batch_idx": torch.tensor([0.0, 0.0, 1.0]),
            "cls": torch.tensor([[0.0], [1.0], [2.0]]),
            "bboxes": torch.tensor([[0.3, 0.3, 0.2, 0.3], [0.6, 0.5, 0.3, 0.2], [0.5, 0.5, 0.4, 0.4]])}


def _cols(run: Path) -> dict[str, list[str]]:
    with open(run / "results.csv") as f:
        rows = list(csv.reader(f))
    return {c.strip(): [r[i] for r in rows[1:]] for i, c in enumerate(rows[0])}


# ------------------------------------------------------------------------------------------------------------
# config
# ------------------------------------------------------------------------------------------------------------
def test_config_modes_validated():
    c = load_config({"mode": "online"})
    assert c.mode == "online" and c.online.warmup_epochs == 1.0 and c.online.mutual_weight == 1.0
    assert c.self_distill is None and c.kd_start_epoch == 1.0
    assert load_config({}).mode == "offline" and load_config({}).online is None and load_config({}).kd_start_epoch == 0
    s = load_config({"mode": "self", "self_distill": {"warmup_epochs": 2}})
    assert s.kd_start_epoch == 2.0 and s.mutual_weight == 0.0
    for c in (load_config({**RECIPE, "mode": "online", "online": {"mutual_weight": 0.5}}), s):
        assert DistillConfig.from_dict(c.to_dict()) == c  # round trip, as written to <run>/distill.yaml
    cases = [
        ({"mode": "onlin"}, "distill.mode: unknown mode 'onlin'; did you mean 'online'?"),
        ({"mode": "online", "online": {"mutual_weigth": 1}}, "distill.online.mutual_weigth: unknown key; did you "
                                                            "mean 'mutual_weight'?"),
        ({"mode": "self", "self_distill": {"warmup": 1}}, "distill.self_distill.warmup: unknown key; did you mean "
                                                          "'warmup_epochs'?"),
        ({"mode": "online", "online": {"warmup_epochs": -1}}, "distill.online.warmup_epochs: must be >= 0"),
        ({"online": {"warmup_epochs": 1}}, "distill.online: set, but distill.mode is offline; add mode: online"),
        ({"mode": "online", "self_distill": {}}, "distill.self_distill: set, but distill.mode is online"),
        ({"mode": "online", "teacher_runtime": {"fuse": True}}, "distill.teacher_runtime.fuse: not with mode: online"),
        ({"mode": "self", "teacher_runtime": {"cache": "memory"}}, "distill.teacher_runtime.cache: not with mode: self"),
        ({"mode": "self", "stop_when_gap_stalls": {"patience": 2}}, "distill.stop_when_gap_stalls: not with mode"),
        ({"mode": "self", "boxes": {"method": "bounded"}}, "bounded: not with mode: self"),
    ]
    for d, msg in cases:
        with pytest.raises(ConfigError) as e:
            DistillConfig.from_dict(d, source="kd.yaml")
        assert str(e.value).startswith("kd.yaml: ") and msg in str(e.value), (d, str(e.value))
    # which terms: the mirror term only with a teacher <- student weight and a dense term
    assert term_keys(load_config({**RECIPE, "mode": "online"}))[-1] == "kd_mutual"
    assert "kd_mutual" not in term_keys(load_config({**RECIPE, "mode": "online", "online": {"mutual_weight": 0}}))
    assert "kd_mutual" not in term_keys(load_config({"features": [{"student": "a", "teacher": "b"}], "mode": "online"}))


def test_teacher_spec_per_mode(tmp_path):
    assert ul.check_teacher_spec(None, "self") is None
    with pytest.raises(ConfigError, match="distill.mode is self .* remove teacher"):
        ul.check_teacher_spec("t.pt", "self")
    assert ul.check_teacher_spec("yolov8n.yaml", "online") == "yolov8n.yaml"  # Ultralytics' own model name
    with pytest.raises(ConfigError, match="is a segment model yaml"):
        ul.check_teacher_spec("yolov8n-seg.yaml", "online")
    with pytest.raises(ConfigError, match="file not found: .*use distill.mode: online"):
        ul.check_teacher_spec(str(tmp_path / "t.pt"), "offline")
    with pytest.raises(ConfigError, match="teacher: missing"):
        ul.check_teacher_spec(None, "online")
    # detkd train: no teacher key needed with mode self only
    _check_keys({"student": "s.yaml", "data": "d.yaml", "distill": {"mode": "self"}}, "my.yaml")
    with pytest.raises(ConfigError, match="missing key 'teacher'"):
        _check_keys({"student": "s.yaml", "data": "d.yaml", "distill": {"mode": "online"}}, "my.yaml")


# ------------------------------------------------------------------------------------------------------------
# online
# ------------------------------------------------------------------------------------------------------------
def test_online_step_trains_both_and_warmup():
    s, t = _student(), _online_teacher()
    m = ul.KDDetectionModel(s, t, {**RECIPE, "mode": "online", "online": {"warmup_epochs": 1}}, imgsz=IMGSZ).train()
    assert m.kd_terms == ("kd_cls", "kd_box", "kd_feat", "kd_mutual") and m.extra_items == ("t_det",)
    assert t.training and all(p.requires_grad for p in t.parameters())
    names = [n for n, _ in m.named_parameters()]
    assert any(n.startswith("online_teacher.") for n in names)  # Ultralytics' optimizer builder takes it from here
    # warm-up (epoch 0): KD terms exactly 0, the teacher still trains on its own detection loss
    loss, items = m.loss(_batch())
    assert float(items["t_det"]) > 0 and all(float(items[k]) == 0 for k in m.kd_terms), items
    assert loss.shape == (3 + len(m.kd_terms) + 1,)
    before_s = [p.detach().clone() for p in s.parameters()]
    before_t = [p.detach().clone() for p in t.parameters()]
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.01)
    m.distiller.set_progress(1, 10)  # warm-up over
    loss, items = m.loss(_batch())
    for k in ("kd_box", "kd_feat", "kd_mutual", "t_det"):
        assert float(items[k]) > 0, (k, items)
    loss.sum().backward()
    opt.step()
    assert any(not torch.equal(a, b) for a, b in zip(before_s, s.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(before_t, t.parameters()))
    # student <- teacher terms reach the student only; the mirror (kd_mutual) reaches the teacher only
    n_kd = len(m.kd_terms)
    for i, k in enumerate(m.kd_terms):
        m.zero_grad(set_to_none=True)
        loss, _ = m.loss(_batch())
        loss[3 + i].backward()
        g_s = sum(float(p.grad.abs().sum()) for p in s.parameters() if p.grad is not None)
        g_t = sum(float(p.grad.abs().sum()) for p in t.parameters() if p.grad is not None)
        if k == "kd_mutual":
            assert g_s == 0 and g_t > 0, k
        else:
            assert g_t == 0 and (g_s > 0 or k == "kd_cls"), (k, g_s)
    m.zero_grad(set_to_none=True)
    loss, _ = m.loss(_batch())
    loss[3 + n_kd].backward()  # the teacher's detection loss
    assert sum(float(p.grad.abs().sum()) for p in s.parameters() if p.grad is not None) == 0
    assert sum(float(p.grad.abs().sum()) for p in t.parameters() if p.grad is not None) > 0
    # Ultralytics' EMA copy: no teacher (registered or not), same loss items in validation
    ema = ModelEMA(m)
    assert "online_teacher" not in ema.ema._modules and ema.ema.teacher_model is None
    assert not any(k.startswith("online_teacher.") for k in ema.ema.state_dict())
    ema.update(m)
    _, items_v = ema.ema.loss(_batch())
    assert set(items_v) == set(items) and float(items_v["t_det"]) == 0


def test_online_plain_distiller_api():
    """The framework-free Distiller in mode online: teacher_forward with gradients, kd_mutual into the teacher."""
    s, t = _student(), _online_teacher()
    cfg = load_config({"logits": {"method": "sigmoid_kd"}, "mode": "online", "online": {"warmup_epochs": 0}})
    kd = Distiller(s, t, cfg, head_extractor=ul.UltralyticsHead([8, 16, 32], 16),
                   teacher_head_extractor=ul.UltralyticsHead([8, 16, 32], 16))
    x = torch.rand(2, 3, IMGSZ, IMGSZ)
    with kd.record():
        s(x)
    out = kd.teacher_forward(x)
    assert out["scores"].requires_grad  # the teacher's own loss can back-propagate
    terms = kd(x)
    assert set(terms) == {"kd_cls", "kd_mutual", "kd_total"} and terms["kd_mutual"].requires_grad
    assert copy.deepcopy(kd).teacher is not t  # a trained teacher is copied, not shared


def test_online_train_resume_and_plain_checkpoints(data_yaml, tmp_path):
    kd = tmp_path / "kd.yaml"
    kd.write_text(yaml.safe_dump({"teacher": "yolov8n.yaml", "distill": {
        **RECIPE, "mode": "online", "online": {"warmup_epochs": 1, "mutual_weight": 0.5}}}))

    m = YOLO(str(PICO_YAML))
    m.add_callback("on_model_save", stop_after_first_save)
    with pytest.raises(StopTraining):
        m.train(data=str(data_yaml), epochs=2, imgsz=IMGSZ, batch=8, device="cpu", workers=0,
                trainer=ul.DistillTrainer, distill_model=str(kd), project=str(tmp_path / "runs"), name="online",
                plots=False, verbose=False, seed=0, amp=False)
    run = Path(m.trainer.save_dir)
    wdir = run / "weights"
    # the optimizer holds both models' parameters
    n_opt = sum(p.numel() for g in m.trainer.optimizer.param_groups for p in g["params"])
    wrapper = unwrap_model(m.trainer.model)
    assert n_opt >= sum(p.numel() for p in wrapper.online_teacher.parameters()) + sum(
        p.numel() for p in wrapper.student_model.parameters() if p.requires_grad)
    saved = torch.load(wdir / "last.kd.pt", weights_only=True)
    assert saved["online_teacher"] and saved["epoch"] == 0
    settings = yaml.safe_load((run / "distill.yaml").read_text())
    assert settings["teacher"] == "yolov8n.yaml" and settings["distill"]["mode"] == "online"
    cols = _cols(run)
    assert "train/t_det" in cols and "train/kd_mutual" in cols and float(cols["train/t_det"][0]) > 0
    assert float(cols["train/kd_box"][0]) == 0  # epoch 1 is the warm-up

    restored = {}

    def grab(trainer):  # after _setup_train: resume state loaded
        restored.update({k: v.detach().clone() for k, v in unwrap_model(trainer.model).online_teacher.state_dict().items()})

    r = YOLO(str(wdir / "last.pt"))
    r.add_callback("on_pretrain_routine_end", grab)
    r.train(resume=True, trainer=ul.DistillTrainer)
    assert r.trainer.start_epoch == 1
    for k, v in saved["online_teacher"].items():
        assert torch.equal(restored[k].cpu(), v), k
    cols = _cols(run)
    assert len(cols["epoch"]) == 2 and float(cols["train/kd_box"][1]) > 0  # KD on after the warm-up
    # best.pt / last.pt: plain students; the teacher is a plain checkpoint of its own
    for f in ("best.pt", "last.pt"):
        model, ckpt = load_checkpoint(str(wdir / f))
        assert type(model) is DetectionModel and not any("teacher" in k for k in model.state_dict())
        assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in _student().parameters())
    teacher, _ = load_checkpoint(str(wdir / "online_teacher.pt"))
    assert type(teacher) is DetectionModel and teacher.yaml["yaml_file"].endswith("yolov8n.yaml")
    assert teacher.nc == 3


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    m = ul.KDDetectionModel(_student(), _online_teacher(), {**RECIPE, "mode": "online", "online": {"warmup_epochs": 0}},
                            imgsz=IMGSZ).train()
    init = {k: v.clone() for k, v in m.online_teacher.state_dict().items()}
    ddp = DDP(m, find_unused_parameters=True)
    g = torch.Generator().manual_seed(100 + rank)  # each rank sees different data
    batch = {**_batch(), "img": torch.rand(2, 3, IMGSZ, IMGSZ, generator=g)}
    opt = torch.optim.SGD([p for p in ddp.parameters() if p.requires_grad], lr=0.01)
    loss, items = ddp(batch)
    loss.sum().backward()
    opt.step()
    torch.save({"items": {k: float(v) for k, v in items.items()}, "teacher": m.online_teacher.state_dict(),
                "init": init, "params": [n for n, _ in m.online_teacher.named_parameters() if _.requires_grad]},
               os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.skipif(sys.platform == "win32", reason="needs torch.distributed (gloo)")
def test_online_ddp_gloo_two_ranks_and_rebuilt_trainer(data_yaml, tmp_path):
    """DDP: the trained teacher's gradients are all-reduced like the student's; Ultralytics' DDP rebuild of the
    trainer from its args keeps the online settings (teacher given as a model yaml name)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        port = sk.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{i}.pt", weights_only=True) for i in (0, 1))
    assert r0["items"]["t_det"] != r1["items"]["t_det"]  # different data per rank ...
    assert any(not torch.equal(r0["teacher"][k], r0["init"][k]) for k in r0["params"])
    for k in r0["params"]:  # ... yet the same teacher weights after the step
        torch.testing.assert_close(r0["teacher"][k], r1["teacher"][k], msg=k)
    from ultralytics.utils import DEFAULT_CFG_DICT

    kd = tmp_path / "kd.yaml"
    kd.write_text(yaml.safe_dump({"teacher": "yolov8n.yaml", "distill": {"mode": "online"}}))
    t1 = ul.DistillTrainer(overrides={"model": str(PICO_YAML), "data": str(data_yaml), "distill_model": str(kd),
                                      "project": str(tmp_path / "runs"), "imgsz": IMGSZ, "device": "cpu"})
    t1._release_run_lock()
    t1.args.distill_model = t1.settings()
    t2 = type(t1)(cfg={**DEFAULT_CFG_DICT, "save_dir": ""}, overrides=vars(t1.args))
    t2._release_run_lock()
    assert str(t2.teacher_path) == "yolov8n.yaml" and t2.distill_cfg == t1.distill_cfg
    assert t2.distill_cfg.online.mutual_weight == 1.0


# ------------------------------------------------------------------------------------------------------------
# self
# ------------------------------------------------------------------------------------------------------------
def test_self_terms_gradients_student_only():
    s = _student()
    m = ul.KDDetectionModel(s, None, {**RECIPE, "mode": "self", "self_distill": {"warmup_epochs": 0}},
                            imgsz=IMGSZ).train()
    d = m.distiller
    assert m.teacher_model is s and d.teacher is s  # no other model
    assert [(t.student, t.teacher) for t in d.cfg.features] == [("model.15", "model.18"), ("model.18", "model.21")]
    assert not any("teacher" in n for n, _ in m.named_parameters())
    seen = []
    hook = s.model[0].register_forward_hook(lambda mod, i, o: seen.append(tuple(i[0].shape[-2:])))
    bns = [b for b in s.modules() if isinstance(b, torch.nn.BatchNorm2d)]
    loss, items = m.loss(_batch())
    hook.remove()
    assert seen == [(IMGSZ, IMGSZ), (2 * IMGSZ, 2 * IMGSZ)]  # the normal pass, then the teacher pass at 2x
    for k in ("kd_cls", "kd_box", "kd_feat"):
        assert float(items[k]) > 0, (k, items)
    # the 2x pass (no grad) leaves BatchNorm running statistics to the normal pass
    stats = [(b.running_mean.clone(), int(b.num_batches_tracked)) for b in bns]
    with torch.no_grad():
        d.teacher_forward(_batch()["img"])
    d.reset_step()
    assert all(torch.equal(b.running_mean, rm) and int(b.num_batches_tracked) == n for b, (rm, n) in zip(bns, stats))
    for i, k in enumerate(m.kd_terms):
        m.zero_grad(set_to_none=True)
        loss, _ = m.loss(_batch())
        assert loss[3 + i].requires_grad
        loss[3 + i].backward()
        g = [p.grad for p in s.parameters() if p.grad is not None]
        assert g and any(float(x.abs().sum()) > 0 for x in g), k
    assert d.teacher_forwards == 1 + len(m.kd_terms) + 1  # one 2x pass per step (and the explicit one above)
    # warm-up: no terms and no 2x pass
    m2 = ul.KDDetectionModel(_student(), None, {**RECIPE, "mode": "self"}, imgsz=IMGSZ).train()
    _, items = m2.loss(_batch())
    assert all(float(items[k]) == 0 for k in m2.kd_terms) and m2.distiller.teacher_forwards == 0
    ema = copy.deepcopy(m).eval()
    ema.teacher_model = None
    _, items_v = ema.loss(_batch())
    assert set(items_v) == set(items)
    with pytest.raises(ConfigError, match="pass teacher=None"):
        ul.KDDetectionModel(_student(), _student(), {"mode": "self"}, imgsz=IMGSZ)


def test_self_level_shift_is_exact():
    """Level l+1 of the 2x pass has level l's grid: the teacher head extractor drops the finest level and halves the
    boxes, the student's drops the coarsest; on a 2x image made of 2x2 blocks the shifted anchors line up."""
    s = _student().eval()
    head = ul.detect_layer(s)
    sh = ul.UltralyticsHead(head.stride.tolist(), head.reg_max, levels=(0, 2))
    th = ul.UltralyticsHead(head.stride.tolist(), head.reg_max, levels=(1, 3), scale=2)
    s.train()
    with torch.no_grad():
        a = sh(s(torch.rand(1, 3, IMGSZ, IMGSZ)))
        b = th(s(torch.rand(1, 3, 2 * IMGSZ, 2 * IMGSZ)))
    n = (IMGSZ // 8) ** 2 + (IMGSZ // 16) ** 2
    assert a.cls.shape == b.cls.shape == (1, n, 3) and a.box_dist.shape == b.box_dist.shape
    # anchor centres of the two coincide (boxes decoded at distance 0 = the centre itself)
    feats_a = [torch.zeros(1, 1, IMGSZ // st, IMGSZ // st) for st in (8, 16, 32)]
    feats_b = [torch.zeros(1, 1, 2 * IMGSZ // st, 2 * IMGSZ // st) for st in (8, 16, 32)]

    def centres(h, feats):
        a_n = sum(f.shape[-1] * f.shape[-2] for f in feats)
        out = {"scores": torch.zeros(1, 3, a_n), "boxes": torch.full((1, 64, a_n), -1e4), "feats": feats}
        out["boxes"].view(1, 4, 16, a_n)[:, :, 0] = 0  # all mass on bin 0: the box is the anchor point
        return h(out).boxes[0, :, :2]

    assert torch.allclose(centres(sh, feats_a), centres(th, feats_b))


# ------------------------------------------------------------------------------------------------------------
# detkd train, end to end
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["online", "self"])
def test_detkd_train_cli_modes(mode, data_yaml, tmp_path):
    cfg = {"student": str(PICO_YAML), "data": str(data_yaml), "epochs": 2, "imgsz": IMGSZ, "batch": 8,
           "device": "cpu", "workers": 0, "project": str(tmp_path / "runs"), "name": mode, "plots": False,
           "threads": 2, "distill": {**RECIPE, "mode": mode}}
    if mode == "online":
        cfg["teacher"] = "yolov8n.yaml"
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(cfg))
    r = subprocess.run([sys.executable, "-m", "detkd", "train", str(p)], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "YOLO_VERBOSE": "True"})
    assert r.returncode == 0, r.stderr[-3000:]
    log = r.stdout + r.stderr
    assert ("online distillation: teacher yolov8n.yaml" if mode == "online" else "self-distillation") in log
    assert "distillation from epoch 2 (warmup_epochs 1)" in log and "gap after epoch" not in log
    run = tmp_path / "runs" / mode
    cols = _cols(run)
    assert float(cols["train/kd_feat"][0]) == 0 and float(cols["train/kd_feat"][1]) > 0
    assert ("train/t_det" in cols) == (mode == "online") and "kd/gap" not in cols
    model, _ = load_checkpoint(str(run / "weights" / "best.pt"))
    assert type(model) is DetectionModel
    assert (run / "weights" / "online_teacher.pt").is_file() == (mode == "online")
    # a self run without a teacher key; a teacher given to a self run is refused in one line
    if mode == "self":
        p.write_text(yaml.safe_dump({**cfg, "teacher": "t.pt", "name": "x"}))
        r = subprocess.run([sys.executable, "-m", "detkd", "train", str(p)], capture_output=True, text=True,
                           timeout=300, env={**os.environ})
        assert r.returncode == 2 and "distill.mode is self" in r.stderr and "Traceback" not in r.stderr
