"""Distillation under torch.distributed (gloo, 2 CPU processes) and Ultralytics' DDP rebuild path.

Ultralytics' own DDP launcher needs CUDA devices; on CPU we show the generic path it uses underneath: the
KDDetectionModel wrapped in DistributedDataParallel, one training step per rank, gradients all-reduced (ranks
end with identical student and adapter weights), KD terms non-zero, and state_dict keys free of 'module.'.
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from detkd.integrations.ultralytics_env import ensure_ultralytics_offline

ensure_ultralytics_offline()

IMGSZ = 64
RECIPE = {"logits": {"method": "sigmoid_kd"}, "boxes": {"method": "ld"}, "features": "auto", "feature_method": "cwd"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _models():
    from ultralytics.cfg import get_cfg
    from ultralytics.nn.tasks import DetectionModel

    from detkd.assets import PICO_YAML

    torch.manual_seed(0)
    teacher = DetectionModel("yolov8n.yaml", nc=3, verbose=False)
    student = DetectionModel(str(PICO_YAML), nc=3, verbose=False)
    for m in (teacher, student):
        m.names = {0: "a", 1: "b", 2: "c"}
        m.args = get_cfg(overrides={"imgsz": IMGSZ})
    return student, teacher


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from torch.nn.parallel import DistributedDataParallel as DDP

    from detkd.integrations.ultralytics import KDDetectionModel

    student, teacher = _models()
    model = KDDetectionModel(student, teacher, dict(RECIPE), imgsz=IMGSZ).train()
    ddp = DDP(model, find_unused_parameters=True)
    g = torch.Generator().manual_seed(100 + rank)  # each rank sees different data
    batch = {"img": torch.rand(2, 3, IMGSZ, IMGSZ, generator=g), "batch_idx": torch.tensor([0.0, 1.0]),
             "cls": torch.tensor([[0.0], [2.0]]), "bboxes": torch.tensor([[0.4, 0.4, 0.3, 0.3], [0.6, 0.5, 0.2, 0.4]])}
    opt = torch.optim.SGD([p for p in ddp.parameters() if p.requires_grad], lr=0.01)
    loss, items = ddp(batch)
    loss.sum().backward()
    opt.step()
    sd = ddp.module.state_dict()
    params = [n for n, _ in ddp.module.named_parameters()]
    torch.save({"items": {k: float(v) for k, v in items.items()}, "state": sd, "params": params},
               os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available() or sys.platform == "win32", reason="needs torch.distributed (gloo)")
def test_ddp_gloo_two_ranks(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    for r in (r0, r1):
        assert all(r["items"][k] > 0 for k in ("kd_cls", "kd_box", "kd_feat"))
    assert r0["items"]["kd_feat"] != r1["items"]["kd_feat"]  # different data per rank ...
    assert r0["state"].keys() == r1["state"].keys()
    assert not any(k.startswith("module.") for k in r0["state"])
    assert any(k.startswith("distiller.adapters.") for k in r0["state"])  # adapters are trained under DDP too
    assert len(r0["params"]) > 100
    for k in r0["params"]:  # ... yet identical weights after the all-reduced step (BN statistics stay per rank)
        torch.testing.assert_close(r0["state"][k], r1["state"][k], msg=k)


def test_trainer_rebuilt_from_class_and_args_keeps_settings(tmp_path):
    """Ultralytics' DDP file rebuilds `Trainer(cfg, overrides=vars(args))` in a worker: nothing may be lost."""
    import yaml
    from ultralytics.utils import DEFAULT_CFG_DICT

    from detkd.integrations.ultralytics import DistillTrainer

    student, teacher = _models()
    tpt = tmp_path / "teacher.pt"
    torch.save({"model": teacher, "train_args": {}}, tpt)
    (tmp_path / "images" / "train").mkdir(parents=True)
    (tmp_path / "images" / "val").mkdir(parents=True)
    data = tmp_path / "data.yaml"
    data.write_text(yaml.safe_dump({"path": str(tmp_path), "train": "images/train", "val": "images/val",
                                    "names": {0: "a", 1: "b", 2: "c"}}))
    kd = tmp_path / "kd.yaml"
    kd.write_text(yaml.safe_dump({"teacher": str(tpt), "distill": {**RECIPE, "stop_epoch": 7}}))
    t1 = DistillTrainer(overrides={"model": "yolov8n.yaml", "data": str(data), "distill_model": str(kd),
                                   "project": str(tmp_path / "runs"), "imgsz": IMGSZ, "device": "cpu"})
    cfg = DEFAULT_CFG_DICT.copy()
    cfg.update(save_dir="")
    t1._release_run_lock()  # a worker is another process (and, with RANK >= 0, takes no lock); here it is this one
    t2 = type(t1)(cfg=cfg, overrides=vars(t1.args))  # what ultralytics/utils/dist.py's generated file does
    assert t2.teacher_path == t1.teacher_path and t2.distill_cfg == t1.distill_cfg
    assert t2.distill_cfg.stop_epoch == 7
    # the settings live in the run folder, beside args.yaml, which points there (so do checkpoints and resume)
    run = Path(t1.save_dir)
    assert t1.args.distill_model == str(run / "distill.yaml")
    assert yaml.safe_load((run / "args.yaml").read_text())["distill_model"] == str(run / "distill.yaml")
    written = yaml.safe_load((run / "distill.yaml").read_text())
    assert written["teacher"] == str(tpt.resolve()) and written["distill"]["stop_epoch"] == 7
    assert written["distill"]["logits"]["weight"] == 4.0  # every default written out
    # DDP: Ultralytics deletes the run folder before starting the workers; they get the settings inline
    t1.args.distill_model = t1.settings()  # what DistillTrainer.train() does before handing over
    args = vars(t1.args).copy()
    t1.args.distill_model = str(run / "distill.yaml")
    t2._release_run_lock()
    shutil.rmtree(run)
    t3 = type(t1)(cfg=cfg, overrides=args)
    assert t3.distill_cfg == t1.distill_cfg and t3.args.distill_model == str(run / "distill.yaml")
    assert yaml.safe_load((run / "distill.yaml").read_text()) == written
