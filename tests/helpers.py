"""Small models and datasets shared by several test files (not a test module itself)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn


class DenseHead(nn.Module):
    """Anchors-first dense head: cls (N, A, k), DFL logits (N, A, 4, r), decoded xyxy boxes (N, A, 4)."""

    def __init__(self, c: int, k: int, r: int, stride: int = 4):
        super().__init__()
        self.stride, self.r = stride, r
        self.cls = nn.Conv2d(c, k, 1)
        self.box = nn.Conv2d(c, 4 * r, 1)

    def forward(self, f):
        n, _, h, w = f.shape
        cls = self.cls(f).flatten(2).transpose(1, 2)
        dist = self.box(f).flatten(2).transpose(1, 2).reshape(n, h * w, 4, self.r)
        ltrb = dist.softmax(-1) @ torch.arange(self.r, dtype=f.dtype) * self.stride
        ys, xs = torch.meshgrid(torch.arange(h, dtype=f.dtype), torch.arange(w, dtype=f.dtype), indexing="ij")
        centre = (torch.stack((xs, ys), -1).reshape(-1, 2) + 0.5) * self.stride
        return {"cls": cls, "box_dist": dist, "boxes": torch.cat((centre - ltrb[..., :2], centre + ltrb[..., 2:]), -1)}


def rect_dataset(root: Path, imgsz: int, n_train: int = 16, n_val: int = 8) -> Path:
    """``n_train`` + ``n_val`` images of coloured rectangles (3 classes) in the Ultralytics layout; returns data.yaml."""
    import cv2
    import numpy as np
    import yaml

    rng = np.random.default_rng(0)
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    for split, n in (("train", n_train), ("val", n_val)):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        for i in range(n):
            im = np.full((imgsz, imgsz, 3), 90, np.uint8)
            lines = []
            for _ in range(int(rng.integers(1, 4))):
                c = int(rng.integers(0, 3))
                w, h = (int(v) for v in rng.integers(8, 30, 2))
                x, y = int(rng.integers(0, imgsz - w)), int(rng.integers(0, imgsz - h))
                cv2.rectangle(im, (x, y), (x + w, y + h), colours[c], -1)
                lines.append(f"{c} {(x + w / 2) / imgsz:.5f} {(y + h / 2) / imgsz:.5f} {w / imgsz:.5f} {h / imgsz:.5f}")
            cv2.imwrite(str(root / "images" / split / f"{i}.jpg"), im)
            (root / "labels" / split / f"{i}.txt").write_text("\n".join(lines))
    p = root / "data.yaml"
    p.write_text(yaml.safe_dump({"path": str(root), "train": "images/train", "val": "images/val",
                                 "names": {0: "red", 1: "green", 2: "blue"}}))
    return p


def train_tiny_teacher(data_yaml: Path, project: Path, imgsz: int):
    """A plain Ultralytics YOLOv8n trained 1 epoch on tiny data (quality does not matter); returns its trainer."""
    from ultralytics import YOLO

    m = YOLO("yolov8n.yaml")
    m.train(data=str(data_yaml), epochs=1, imgsz=imgsz, batch=8, device="cpu", workers=0, project=str(project),
            name="t", plots=False, val=False, verbose=False, seed=0, amp=False)
    return m.trainer


def untrained_checkpoint(path: Path, names: dict[int, str], cfg: str = "yolov8n.yaml") -> Path:
    """An untrained detection model with ``names`` saved in Ultralytics' own checkpoint format."""
    from ultralytics import YOLO
    from ultralytics.nn.tasks import DetectionModel

    m = YOLO(cfg)
    m.model = DetectionModel(cfg, nc=len(names), verbose=False)
    m.model.names = dict(names)
    m.save(str(path))
    return path


class StopTraining(Exception):
    """Raised by :func:`stop_after_first_save`: ends a training as if its process had died there."""


def stop_after_first_save(trainer) -> None:
    """Ultralytics ``on_model_save`` callback: stop the run right after epoch 1's checkpoint is written."""
    if trainer.epoch == 0:
        raise StopTraining


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Autouse in a module that imports it: one torch thread (two on a busy 2-core machine are several times slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def no_downloads(monkeypatch):
    """Autouse in a module that imports it: any torch.hub download fails the test."""
    def refuse(*a, **k):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
