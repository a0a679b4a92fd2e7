"""Loss-weight and temperature schedules as a function of training progress. Pure Python.

A :class:`Schedule` maps ``(epoch, total_epochs)`` to a number: a *multiplier* on a loss weight, or the
*value* of a temperature. ``epoch`` is a float, so fractions of an epoch work (``epoch + i / iters``);
progress is ``p = clip(epoch / total_epochs, 0, 1)`` (``p = 0`` when ``total_epochs`` is unknown).

Kinds (``a = start``, ``b = end``):

* ``constant``: ``a``.
* ``linear``:   ``a + (b - a) * p``.
* ``cosine``:   ``a + (b - a) * (1 - cos(pi * p)) / 2``, YOLOv6's distillation-weight decay. YOLOv6
  (``yolov6/models/losses/loss_distill.py``, ``ComputeLoss.forward``) multiplies its class, DFL and CWD
  distillation terms by ``((1 - cos(epoch_num * pi / max_epoch)) / 2) * (0.01 - 1) + 1``, i.e. this
  form with ``a = 1, b = 0.01`` (the default ``end`` of a cosine schedule is ``0.01 * start``), with
  ``epoch_num`` the 0-based epoch and ``max_epoch`` the number of epochs.

Modifiers, applied to any kind in this order:

* ``warmup_epochs = W > 0``: the value is multiplied by ``epoch / W`` while ``epoch < W`` (a linear ramp
  from 0).
* ``stop_epoch = E``: the value is exactly ``0.0`` for ``epoch >= E`` ("stop distilling at epoch E").

Starting points from practice: temperature 2-5 for softmax KD, 1 for sigmoid KD, 10 for LD; hard/soft
balance alpha ~ 0.7 (see :mod:`detkd.config`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["KINDS", "Schedule", "CONSTANT", "progress"]

KINDS = ("constant", "linear", "cosine")


def progress(epoch: float, total_epochs: float | None) -> float:
    """``clip(epoch / total_epochs, 0, 1)``; 0 when ``total_epochs`` is None or 0."""
    if not total_epochs:
        return 0.0
    return min(max(float(epoch) / float(total_epochs), 0.0), 1.0)


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclass
class Schedule:
    """One schedule (see the module docstring).

    Args:
        kind: ``"constant"`` (default), ``"linear"`` or ``"cosine"``.
        start: value at progress 0. Default 1.0.
        end: value at progress 1. Default: ``start`` (``constant``/``linear``), ``0.01 * start``
            (``cosine``, YOLOv6).
        warmup_epochs: linear ramp from 0 over the first ``warmup_epochs`` epochs. Default 0 (none).
        stop_epoch: from this epoch on the value is exactly 0. Default None (never).
    """

    kind: str = "constant"
    start: float = 1.0
    end: float | None = None
    warmup_epochs: float = 0.0
    stop_epoch: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"schedule kind must be one of {', '.join(KINDS)}; got {self.kind!r}")
        for name in ("start", "end", "warmup_epochs", "stop_epoch"):
            v = getattr(self, name)
            if v is not None and not _is_number(v):
                raise ValueError(f"schedule {name} must be a number, got {v!r}")
        if self.warmup_epochs < 0:
            raise ValueError(f"schedule warmup_epochs must be >= 0, got {self.warmup_epochs}")

    @property
    def end_value(self) -> float:
        """The value at progress 1 (``end`` with its default filled in)."""
        if self.end is not None:
            return float(self.end)
        return 0.01 * float(self.start) if self.kind == "cosine" else float(self.start)

    def stopped(self, epoch: float) -> bool:
        """True from ``stop_epoch`` on."""
        return self.stop_epoch is not None and epoch >= self.stop_epoch

    def __call__(self, epoch: float, total_epochs: float | None = None) -> float:
        """The value at ``epoch`` (float) of ``total_epochs``."""
        if self.stopped(epoch):
            return 0.0
        p = progress(epoch, total_epochs)
        a, b = float(self.start), self.end_value
        if self.kind == "constant":
            v = a
        elif self.kind == "linear":
            v = a + (b - a) * p
        else:
            v = a + (b - a) * (1.0 - math.cos(math.pi * p)) / 2.0
        if self.warmup_epochs > 0 and epoch < self.warmup_epochs:
            v *= max(float(epoch), 0.0) / float(self.warmup_epochs)
        return v


CONSTANT = Schedule()
"""The constant-1 multiplier (what a term without a schedule uses)."""
