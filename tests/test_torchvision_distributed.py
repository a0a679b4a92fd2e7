"""`detkd train` (framework: torchvision) under torch.distributed, as torchrun runs it: 2 CPU ranks with gloo give the
same training as one process on the same global batch (DDP student, a frozen teacher per rank, KD terms reduced like
the detection loss, the distiller's adapter gradients averaged)."""

from __future__ import annotations

import csv
import os
import socket
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml

IMG = 64


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(tmp, name: str) -> dict:
    # RetinaNet: its detection loss is a mean over images, and so is every KD term here (sigmoid_kd per anchor,
    # l1_giou unweighted, fitnet / cwd per element): a mean over ranks of per-rank means is the global-batch mean.
    # GroupNorm students: BatchNorm statistics would be per rank (SyncBatchNorm, used on CUDA, needs a GPU).
    return {"framework": "torchvision", "_source": str(tmp / "kd.yaml"),
            "teacher": {"arch": "retinanet_resnet18_fpn", "checkpoint": str(tmp / "teacher.pt"),
                        "options": {"norm": "group"}},
            "student": {"arch": "retinanet_resnet18_fpn", "options": {"norm": "group"}},
            "data": str(tmp / "data" / "data.yaml"), "epochs": 2, "batch": 4, "imgsz": IMG, "lr": 0.01,
            "optimizer": "sgd", "warmup_epochs": 0, "fliplr": 0.0, "val": False, "threads": 1,
            "project": str(tmp / "runs"), "name": name,
            "distill": {"logits": {"method": "sigmoid_kd", "weight": 1.0},
                        "boxes": {"method": "l1_giou", "weight": 1.0, "options": {"soft_weights": False}},
                        "features": [{"student": "backbone:0", "teacher": "backbone:0", "method": "fitnet",
                                      "adapter": "conv"},  # a learnable adapter outside the student's DDP
                                     {"student": "backbone:1", "teacher": "backbone:1", "method": "cwd"}]}}


def _worker(rank: int, world: int, port: int, tmp: str) -> None:
    from pathlib import Path

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    from detkd.integrations.torchvision_train import train

    train(_config(Path(tmp), "ddp"))  # joins the process group from the environment (as under torchrun) and leaves it
    assert not dist.is_initialized()


@pytest.mark.skipif(not dist.is_available() or sys.platform == "win32", reason="needs torch.distributed (gloo)")
def test_two_gloo_ranks_equal_one_process(tmp_path):
    from detkd.data.synth import generate
    from detkd.integrations import torchvision as tvkd
    from detkd.integrations.torchvision_train import train

    generate(tmp_path / "data", n_train=4, n_val=2, imgsz=IMG, progress=False)
    torch.manual_seed(0)
    torch.save(tvkd.build("retinanet_resnet18_fpn", 5, IMG, norm="group").state_dict(), tmp_path / "teacher.pt")
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(_config(tmp_path, "single"))
    finally:
        torch.set_num_threads(n)
    runs = tmp_path / "runs"
    ddp = torch.load(runs / "ddp" / "weights" / "last.pt", weights_only=True)
    one = torch.load(runs / "single" / "weights" / "last.pt", weights_only=True)
    torch.manual_seed(0)  # train() builds the student first, from seed 0
    init = tvkd.build("retinanet_resnet18_fpn", 5, IMG, norm="group").state_dict()
    moved = 0
    for k, v in one["model"].items():
        torch.testing.assert_close(ddp["model"][k], v, rtol=1e-4, atol=2e-6, msg=k)
        moved += int(v.dtype.is_floating_point and init[k].shape == v.shape and not torch.equal(v, init[k]))
    assert moved > 50  # the two steps did train
    assert ddp["distiller"].keys() == one["distiller"].keys() and any("adapters" in k for k in one["distiller"])
    for k, v in one["distiller"].items():
        torch.testing.assert_close(ddp["distiller"][k], v, rtol=1e-4, atol=2e-6, msg=k)
    rows = {r: list(csv.DictReader((runs / r / "results.csv").open())) for r in ("ddp", "single")}
    assert len(rows["ddp"]) == len(rows["single"]) == 2
    for a, b in zip(rows["ddp"], rows["single"]):
        for col in ("train/loss", "train/kd_cls", "train/kd_box", "train/kd_feat"):
            assert float(a[col]) == pytest.approx(float(b[col]), rel=1e-4), col
    assert yaml.safe_load((runs / "ddp" / "config.yaml").read_text())["batch"] == 4
