"""Loss-weight and temperature schedules as a function of training progress.

A schedule maps ``(epoch, total_epochs)`` — epoch as a float, so fractions of an epoch work — to a number:
a multiplier for a loss weight, or a value for a temperature. Pure Python.

Kinds:

* ``constant``: ``start`` throughout.
* ``linear``: ``start + (end - start) * p`` with progress ``p = epoch / total_epochs`` clipped to [0, 1].
* ``cosine``: YOLOv6's distillation-weight decay,
  ``start + (end - start) * (1 - cos(pi * p)) / 2`` — with YOLOv6's numbers ``start=1, end=0.01`` this is
  exactly ``((1 - cos(epoch * pi / max_epoch)) / 2) * (0.01 - 1) + 1`` (``yolov6/models/losses/loss_distill.py``).

Modifiers on any kind: ``warmup_epochs`` ramps the value linearly from 0 over the first epochs (multiplied
in), and ``stop_epoch`` makes it exactly 0 from that epoch on ("stop distilling at epoch E").
Seeds from practice: temperature 2–5 for softmax KD; hard/soft balance alpha ≈ 0.7 (see `detkd.config`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

KINDS = ("constant", "linear", "cosine")


@dataclass
class Schedule:
    """A schedule; see the module docstring. ``end`` defaults to ``start`` (``cosine``: 0.01·start, YOLOv6)."""

    kind: str = "constant"
    start: float = 1.0
    end: float | None = None
    warmup_epochs: float = 0.0
    stop_epoch: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"schedule kind must be one of {KINDS}, got {self.kind!r}")
        if self.warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be >= 0, got {self.warmup_epochs}")

    @property
    def end_value(self) -> float:
        if self.end is not None:
            return float(self.end)
        return 0.01 * self.start if self.kind == "cosine" else float(self.start)

    def stopped(self, epoch: float) -> bool:
        return self.stop_epoch is not None and epoch >= self.stop_epoch

    def __call__(self, epoch: float, total_epochs: float | None = None) -> float:
        if self.stopped(epoch):
            return 0.0
        p = 0.0 if not total_epochs else min(max(epoch / float(total_epochs), 0.0), 1.0)
        a, b = float(self.start), self.end_value
        if self.kind == "constant":
            v = a
        elif self.kind == "linear":
            v = a + (b - a) * p
        else:
            v = a + (b - a) * (1.0 - math.cos(math.pi * p)) / 2.0
        if self.warmup_epochs > 0 and epoch < self.warmup_epochs:
            v *= max(epoch, 0.0) / self.warmup_epochs
        return v


CONSTANT = Schedule()
