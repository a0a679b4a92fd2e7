"""Teacher-student gap monitor: is distillation still closing the gap? Pure Python (no torch, no Ultralytics).

The *gap* after an epoch is ``teacher_mAP - student_mAP`` (both on the same val split; the teacher is evaluated
once, the student every epoch). It *closes* in an epoch when it drops more than ``min_delta`` below the smallest gap
seen so far. ``distill.stop_when_gap_stalls: {patience: P, min_delta: D, action: A}`` acts once the gap has not
closed for ``P`` epochs in a row (the same rule as Keras' / Ultralytics' early stopping, on the gap instead of the
fitness):

* ``stop_distill`` (default): the distillation terms switch off from the next epoch on (the teacher no longer
  runs); training continues on the task loss alone.
* ``stop_run``: training ends after this epoch (Ultralytics then validates ``best.pt`` as usual).

:class:`GapMonitor` keeps the whole history and recomputes its state from it on every update, so an epoch that is
reported twice (a redone epoch) replaces its earlier value, and a resumed run can replay its ``results.csv``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

__all__ = ["GAP_ACTIONS", "GapStallConfig", "GapStatus", "GapMonitor"]

GAP_ACTIONS = ("stop_distill", "stop_run")


@dataclass
class GapStallConfig:
    """``distill.stop_when_gap_stalls``.

    Attributes:
        patience: epochs in a row without the gap closing by more than ``min_delta`` before ``action``. Default 5.
        min_delta: how much (in mAP, 0-1) the gap must drop below its best value to count as closing. Default 0.
        action: ``stop_distill`` (KD terms off, training goes on) or ``stop_run`` (training ends).
    """

    patience: int = 5
    min_delta: float = 0.0
    action: str = "stop_distill"


@dataclass
class GapStatus:
    """The monitor's state after one epoch (``epoch`` is 1-based, as in ``results.csv``)."""

    epoch: int
    teacher: float
    student: float
    gap: float
    best_gap: float
    best_epoch: int
    stale_epochs: int  # epochs in a row without closing by more than min_delta
    stalled: bool  # stale_epochs >= patience (always False without a stall config)
    stalled_at: int | None = None  # the first epoch at which the stall rule fired (None: never)

    def line(self, cfg: GapStallConfig | None = None) -> str:
        """One human-readable line for the training log."""
        s = (f"teacher mAP50-95 {self.teacher:.4f}, student {self.student:.4f}, gap {self.gap:+.4f} "
             f"(best {self.best_gap:+.4f} at epoch {self.best_epoch})")
        if cfg is not None and self.stalled_at is not None and self.stalled_at < self.epoch:
            s += f", stalled at epoch {self.stalled_at} ({cfg.action})"
        elif cfg is not None:
            s += f", {self.stale_epochs}/{cfg.patience} epochs without closing by > {cfg.min_delta:g}"
        return s


@dataclass
class GapMonitor:
    """Track ``teacher_map - student_map`` per epoch and decide when it has stalled.

    >>> m = GapMonitor(0.5, GapStallConfig(patience=2, min_delta=0.01))
    >>> [m.update(e, s).stalled for e, s in enumerate([0.30, 0.35, 0.355, 0.358], start=1)]
    [False, False, False, True]
    """

    teacher_map: float
    stall: GapStallConfig | None = None
    history: dict[int, float] = field(default_factory=dict)  # epoch -> student mAP

    def update(self, epoch: int, student_map: float) -> GapStatus:
        """Record the student's mAP after ``epoch`` (1-based; a repeated epoch replaces its value, later epochs are
        dropped) and return the state after it."""
        epoch = int(epoch)
        self.history = {e: v for e, v in self.history.items() if e < epoch}
        self.history[epoch] = float(student_map)
        return self.status()

    def status(self) -> GapStatus:
        """The state after the last recorded epoch (recomputed from the whole history)."""
        if not self.history:
            raise ValueError("GapMonitor.status(): no epoch recorded yet")
        best, best_epoch, stale, stalled_at = math.inf, 0, 0, None
        min_delta = self.stall.min_delta if self.stall else 0.0
        for e in sorted(self.history):
            gap = self.teacher_map - self.history[e]
            if math.isfinite(gap) and (best_epoch == 0 or best - gap > min_delta):
                best, best_epoch, stale = gap, e, 0
            else:
                stale += 1
            if self.stall is not None and stalled_at is None and stale >= self.stall.patience:
                stalled_at = e
        last = max(self.history)
        gap = self.teacher_map - self.history[last]
        return GapStatus(epoch=last, teacher=self.teacher_map, student=self.history[last], gap=gap,
                         best_gap=best if best_epoch else gap, best_epoch=best_epoch, stale_epochs=stale,
                         stalled=self.stall is not None and stale >= self.stall.patience, stalled_at=stalled_at)
