"""Teacher-student gap monitor inside Ultralytics' trainer (used by ``DistillTrainer``).

* At the start of training the teacher is evaluated once on the val split by Ultralytics' own ``DetectionValidator``
  (same data loader, image size and thresholds as the student's validation); a torchvision teacher (cross-family)
  by detkd's COCO evaluation of its own run (its transform and size, ``<run>/teacher_val/``). The value is cached under
  ``$DETKD_HOME/cache/teacher_map/`` keyed by the teacher's bytes, the data yaml and the validation settings, so
  later runs with the same teacher and data (a sweep's trials, a resume) do not evaluate it again.
* After each validation, ``kd/teacher_mAP50-95`` and ``kd/gap`` (teacher minus student mAP50-95) join the metrics,
  hence ``results.csv``, and one ``detkd: gap ...`` line goes to the log.
* ``distill.stop_when_gap_stalls`` (:class:`detkd.gap.GapStallConfig`) switches the KD terms off from the next
  epoch (``stop_distill``) or ends the run after this epoch (``stop_run``) once the gap has not closed by more than
  ``min_delta`` for ``patience`` epochs, and says so in the log. A resumed run replays ``results.csv``.

Needs ``val=True`` (Ultralytics' default); with ``val=False`` the monitor is off.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
from copy import copy, deepcopy
from pathlib import Path

import torch
from ultralytics.utils import LOGGER, RANK
from ultralytics.utils.torch_utils import unwrap_model

from detkd.gap import GapMonitor, GapStallConfig
from detkd.integrations.ultralytics_env import detkd_home

__all__ = ["TEACHER_COL", "GAP_COL", "MAP_KEY", "teacher_val_map", "TrainerGapMonitor"]

TEACHER_COL = "kd/teacher_mAP50-95"
GAP_COL = "kd/gap"
MAP_KEY = "metrics/mAP50-95(B)"


def _file_sha1(path: Path) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _cache_path(trainer) -> tuple[Path, dict]:
    import ultralytics

    a = trainer.args
    data = Path(str(a.data))
    key = {
        "teacher": _file_sha1(Path(trainer.teacher_path)),
        "data": str(data.resolve()) if data.is_file() else str(a.data),
        "data_text": data.read_text() if data.is_file() else "",
        "val": str(trainer.data.get("val") or trainer.data.get("test")),
        "ultralytics": ultralytics.__version__,
        "loader_batch": getattr(trainer.test_loader, "batch_size", None),
        **{k: getattr(a, k, None) for k in ("imgsz", "batch", "conf", "iou", "max_det", "single_cls", "classes",
                                            "agnostic_nms", "rect", "half", "fraction")},
    }
    digest = hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return detkd_home() / "cache" / "teacher_map" / f"{digest}.json", key


def teacher_val_map(trainer) -> float:
    """The teacher's val mAP50-95 by Ultralytics' ``DetectionValidator`` on the trainer's val loader (cached)."""
    from ultralytics.models.yolo.detect import DetectionValidator

    path, key = _cache_path(trainer)
    if path.is_file():
        try:
            v = float(json.loads(path.read_text())[MAP_KEY])
            LOGGER.info(f"detkd: teacher mAP50-95 {v:.4f} on the val split (cached: {path})")
            return v
        except (OSError, ValueError, KeyError, TypeError):
            pass  # unreadable cache entry: evaluate again
    LOGGER.info(f"detkd: evaluating the teacher {trainer.teacher_path} on the val split (once; the value is cached)")
    args = copy(trainer.args)
    for k in ("plots", "save_json", "save_txt", "save_conf", "compile"):
        setattr(args, k, False)
    threads = torch.get_num_threads()  # Ultralytics' select_device resets CPU threads
    teacher = unwrap_model(trainer.model).teacher_model
    try:
        if hasattr(teacher, "val_map"):  # a torchvision teacher (cross_family.py): detkd's COCO eval at its own size
            stats = teacher.val_map(trainer.args.data, Path(trainer.save_dir) / "teacher_val", int(trainer.args.batch))
        else:
            v = DetectionValidator(trainer.test_loader, save_dir=trainer.save_dir, args=args)
            stats = v(model=ultralytics_fusable(teacher))
    finally:
        torch.set_num_threads(threads)
    value = float(stats[MAP_KEY])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({**{k: float(x) for k, x in stats.items()}, "key": key}, indent=1, default=str))
    os.replace(tmp, path)
    LOGGER.info(f"detkd: teacher mAP50-95 {value:.4f} on the val split")
    return value


def ultralytics_fusable(model: torch.nn.Module) -> torch.nn.Module:
    """``model``, or where detkd's ``teacher_runtime.fuse`` folded BatchNorms (an ``nn.Identity`` left under the name
    ``bn``, so taps still resolve), a copy in Ultralytics' own fused form (``bn`` deleted, ``forward_fuse``): its
    validator fuses whatever still has a ``bn`` and would fail on the Identity."""
    def folded(m):
        return isinstance(getattr(m, "bn", None), torch.nn.Identity) and hasattr(m, "forward_fuse")

    if not any(folded(m) for m in model.modules()):
        return model
    model = deepcopy(model)
    for m in model.modules():
        if folded(m):
            delattr(m, "bn")
            m.forward = m.forward_fuse
    return model


class TrainerGapMonitor:
    """Per-trainer wiring of :class:`detkd.gap.GapMonitor` (create it after ``_setup_train``)."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.cfg: GapStallConfig | None = unwrap_model(trainer.model).distiller.cfg.stop_when_gap_stalls
        self.monitor: GapMonitor | None = None
        self.pending_stop = False
        if not trainer.args.val:
            if self.cfg is not None:
                LOGGER.warning("detkd: distill.stop_when_gap_stalls needs validation every epoch (val=True); "
                               "with val=False the gap monitor is off")
            return
        if RANK in {-1, 0}:
            try:
                teacher = teacher_val_map(trainer)
            except Exception as e:  # a measurement must not end the training it watches
                LOGGER.warning(f"detkd: the teacher could not be evaluated on the val split ({type(e).__name__}: {e}); "
                               "the gap monitor is off" + (" and stop_when_gap_stalls never fires" if self.cfg else ""))
                return
            self.monitor = GapMonitor(teacher, self.cfg)
            if trainer.start_epoch > 0:
                self._replay()

    def _replay(self) -> None:
        """Resume: feed the epochs already in results.csv back in, and re-apply a stop_distill decision."""
        csv_path = Path(self.trainer.csv)
        if not csv_path.is_file():
            return
        with open(csv_path, encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        for row in rows:
            row = {k.strip(): v for k, v in row.items() if k}
            try:
                epoch, value = int(float(row["epoch"])), float(row[MAP_KEY])
            except (KeyError, ValueError, TypeError):
                continue
            if epoch <= self.trainer.start_epoch:
                self.monitor.update(epoch, value)
        if self.monitor.history:
            st = self.monitor.status()
            if st.stalled_at is not None and self.cfg is not None and self.cfg.action == "stop_distill":
                self._stop_distill(st.stalled_at)
                LOGGER.info(f"detkd: resumed run: distillation stays off (the gap stalled at epoch {st.stalled_at})")

    def _stop_distill(self, epoch: int) -> None:
        """KD terms off from 1-based epoch ``epoch + 1`` (0-based ``epoch``) on: the Distiller's stop_epoch."""
        for m in (unwrap_model(self.trainer.model), getattr(getattr(self.trainer, "ema", None), "ema", None)):
            d = getattr(m, "distiller", None)
            if d is not None:
                d.cfg.stop_epoch = float(epoch) if d.cfg.stop_epoch is None else min(d.cfg.stop_epoch, float(epoch))

    def after_validate(self, metrics: dict | None) -> dict | None:
        """Add the gap columns to this epoch's metrics, log the line, act on a stall (all ranks call this)."""
        t = self.trainer
        epoch = t.epoch + 1
        action = None
        if metrics is not None and self.monitor is not None:
            value = metrics.get(MAP_KEY, math.nan)
            st = self.monitor.update(epoch, float(value))
            metrics[TEACHER_COL] = round(st.teacher, 5)
            metrics[GAP_COL] = round(st.gap, 5)
            LOGGER.info(f"detkd: gap after epoch {epoch}: {st.line(self.cfg)}")
            if self.cfg is not None and st.stalled_at == epoch:
                action = self.cfg.action
                LOGGER.warning(
                    f"detkd: the teacher-student gap has not closed by more than {self.cfg.min_delta:g} for "
                    f"{self.cfg.patience} epochs (best {st.best_gap:+.4f} at epoch {st.best_epoch}, now "
                    f"{st.gap:+.4f}): "
                    + ("distillation stops: the KD terms are off from the next epoch on (distill.stop_when_gap_"
                       "stalls.action=stop_distill)" if action == "stop_distill" else
                       "stopping the run after this epoch (distill.stop_when_gap_stalls.action=stop_run)"))
        if getattr(t, "world_size", 1) > 1:  # DDP: rank 0 decides, every rank applies
            import torch.distributed as dist

            box = [action if RANK == 0 else None]
            dist.broadcast_object_list(box, 0)
            action = box[0]
        if action == "stop_distill":
            self._stop_distill(epoch)
        elif action == "stop_run":
            self.pending_stop = True
        return metrics

    def on_fit_epoch_end(self, trainer) -> None:
        """Apply a ``stop_run`` decision (after this epoch's metrics and checkpoint are written)."""
        if self.pending_stop:
            trainer.stop = True
            self.pending_stop = False
