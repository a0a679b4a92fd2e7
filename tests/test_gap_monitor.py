"""Teacher-student gap monitor: the stall rule on scripted mAP sequences (pure), its config, and a tiny
DistillTrainer run that writes the gap columns to results.csv and acts on a stall."""

from __future__ import annotations

import csv
import logging
import math
from pathlib import Path

import pytest
import yaml

from detkd.config import DistillConfig
from detkd.errors import ConfigError
from detkd.gap import GapMonitor, GapStallConfig


def _run(teacher: float, students: list[float], **stall) -> list:
    m = GapMonitor(teacher, GapStallConfig(**stall) if stall else None)
    return [m.update(e, s) for e, s in enumerate(students, start=1)]


def test_stall_fires_after_patience_epochs_without_closing():
    # gaps: .30 .20 .15 .149 .151 .148 -> closes until epoch 3; epochs 4-6 close by < 0.01
    st = _run(0.5, [0.20, 0.30, 0.35, 0.351, 0.349, 0.352], patience=3, min_delta=0.01)
    assert [s.stale_epochs for s in st] == [0, 0, 0, 1, 2, 3]
    assert [s.stalled for s in st] == [False] * 5 + [True]
    assert st[-1].stalled_at == 6 and st[-1].best_epoch == 3
    assert st[-1].gap == pytest.approx(0.148) and st[-1].best_gap == pytest.approx(0.15)
    assert st[-1].teacher == 0.5 and st[-1].student == 0.352


def test_progress_resets_patience_and_min_delta_is_strict():
    # closing by more than min_delta resets the count; closing by exactly min_delta does not count
    st = _run(0.6, [0.1, 0.1, 0.1, 0.2, 0.2, 0.2, 0.25], patience=3, min_delta=0.05)
    assert [s.stale_epochs for s in st] == [0, 1, 2, 0, 1, 2, 3]
    assert st[-1].stalled_at == 7 and st[-1].best_epoch == 4
    # min_delta 0: any decrease closes; an equal gap does not
    st = _run(0.6, [0.1, 0.1000001, 0.1000001, 0.1000001], patience=2)
    assert [s.stale_epochs for s in st] == [0, 0, 1, 2] and st[-1].stalled_at == 4


def test_stall_is_reported_once_and_kept():
    st = _run(0.5, [0.3, 0.3, 0.3, 0.3, 0.45], patience=2)
    assert [s.stalled_at for s in st] == [None, None, 3, 3, 3]  # the first firing epoch stays
    assert st[-1].stalled is False and st[-1].stale_epochs == 0  # the gap closed again at epoch 5


def test_no_config_never_stalls_and_nan_counts_as_not_closing():
    st = _run(0.5, [0.3] * 10)
    assert not any(s.stalled for s in st) and st[-1].stalled_at is None and st[-1].gap == pytest.approx(0.2)
    st = _run(0.5, [0.3, math.nan, math.nan], patience=2)
    assert st[-1].stalled_at == 3 and st[-1].best_gap == pytest.approx(0.2)


def test_repeated_epoch_replaces_and_replay_matches():
    m = GapMonitor(0.5, GapStallConfig(patience=2))
    for e, s in enumerate([0.1, 0.2, 0.2], start=1):
        m.update(e, s)
    assert m.status().stale_epochs == 1
    m.update(3, 0.3)  # epoch 3 redone (e.g. NaN recovery): replaces, does not append
    assert m.history == {1: 0.1, 2: 0.2, 3: 0.3} and m.status().stale_epochs == 0
    m.update(2, 0.2)  # a resume from epoch 2 drops later epochs
    assert m.history == {1: 0.1, 2: 0.2}
    with pytest.raises(ValueError):
        GapMonitor(0.5).status()


def test_config_parsing_and_errors():
    c = DistillConfig.from_dict({"stop_when_gap_stalls": {"patience": 2, "min_delta": 0.01, "action": "stop_run"}})
    assert c.stop_when_gap_stalls == GapStallConfig(2, 0.01, "stop_run")
    assert DistillConfig.from_dict(c.to_dict()) == c
    assert DistillConfig.from_dict({}).stop_when_gap_stalls is None
    assert DistillConfig.from_dict({"stop_when_gap_stalls": True}).stop_when_gap_stalls == GapStallConfig()
    for bad, msg in (({"patience": 0}, "patience: expected an integer >= 1"),
                     ({"action": "stop"}, "did you mean 'stop_run'"),
                     ({"patiense": 3}, "did you mean 'patience'"),
                     ({"min_delta": -0.1}, "min_delta: must be >= 0")):
        with pytest.raises(ConfigError, match=msg):
            DistillConfig.from_dict({"stop_when_gap_stalls": bad}, source="kd.yaml")


# --------------------------------------------------------------------------------------------------------------
# tiny integration: DistillTrainer writes kd/teacher_mAP50-95 and kd/gap, and acts on a stall
# --------------------------------------------------------------------------------------------------------------
IMGSZ = 64


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from detkd.integrations.ultralytics_env import ensure_ultralytics_offline

    ensure_ultralytics_offline()
    from helpers import rect_dataset, train_tiny_teacher

    data = rect_dataset(tmp_path_factory.mktemp("rects"), IMGSZ)
    tr = train_tiny_teacher(data, tmp_path_factory.mktemp("teacher"), IMGSZ)
    teacher = Path(tr.best if Path(tr.best).exists() else tr.last)
    return data, teacher


def _rows(run: Path) -> list[dict]:
    with open(run / "results.csv") as f:
        return [{k.strip(): v for k, v in r.items()} for r in csv.DictReader(f)]


def test_gap_columns_and_stop_distill_in_training(tiny, tmp_path):
    from detkd.assets import PICO_YAML
    from detkd.train import load_train_config, train
    from ultralytics.utils import LOGGER

    data, teacher = tiny
    cfg = {"teacher": str(teacher), "student": str(PICO_YAML), "data": str(data), "epochs": 3, "imgsz": IMGSZ,
           "batch": 8, "device": "cpu", "workers": 0, "project": str(tmp_path / "runs"), "name": "gap",
           "plots": False, "seed": 0, "amp": False,
           "distill": {"logits": None, "boxes": None, "features": "auto", "feature_method": "cwd",
                       # min_delta 0.5: a tiny model's gap cannot close that much, so epoch 2 is the stall
                       "stop_when_gap_stalls": {"patience": 1, "min_delta": 0.5, "action": "stop_distill"}}}
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(cfg))
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda r: records.append(r.getMessage())
    level = LOGGER.level
    LOGGER.addHandler(handler)
    LOGGER.setLevel(logging.INFO)
    try:
        run = train(load_train_config(p))
    finally:
        LOGGER.removeHandler(handler)
        LOGGER.setLevel(level)
    rows = _rows(run)
    assert len(rows) == 3
    assert "kd/teacher_mAP50-95" in rows[0] and "kd/gap" in rows[0]
    t = float(rows[0]["kd/teacher_mAP50-95"])
    assert 0.0 <= t <= 1.0 and all(float(r["kd/teacher_mAP50-95"]) == t for r in rows)  # evaluated once
    for r in rows:
        assert float(r["kd/gap"]) == pytest.approx(t - float(r["metrics/mAP50-95(B)"]), abs=2e-5)
    # the stall fired after epoch 2: epoch 3 trained without the KD term
    assert float(rows[1]["train/kd_feat"]) > 0 and float(rows[2]["train/kd_feat"]) == 0.0
    log = "\n".join(records)
    assert "detkd: gap after epoch 1" in log and "teacher mAP50-95" in log
    assert "has not closed by more than 0.5 for 1 epochs" in log and "distillation stops" in log
    # the teacher's value is cached: a second run does not evaluate it again
    records.clear()
    LOGGER.addHandler(handler)
    LOGGER.setLevel(logging.INFO)
    try:
        cfg2 = load_train_config(p, ["name=gap_run", "epochs=3",
                                     "distill.stop_when_gap_stalls.action=stop_run"])
        run2 = train(cfg2)
    finally:
        LOGGER.removeHandler(handler)
        LOGGER.setLevel(level)
    log = "\n".join(records)
    assert "(cached:" in log and "evaluating the teacher" not in log
    assert "stopping the run after this epoch" in log
    rows2 = _rows(run2)
    assert len(rows2) == 2  # stop_run after the stall at epoch 2
    assert float(rows2[0]["kd/teacher_mAP50-95"]) == t


def test_resumed_run_keeps_distillation_off_after_a_stall(tiny, tmp_path):
    """A stop_distill decision survives resume=True: the monitor replays results.csv."""
    from ultralytics import YOLO
    from ultralytics.utils import LOGGER

    from detkd.assets import PICO_YAML
    from detkd.integrations.ultralytics import DistillTrainer
    from detkd.train import load_train_config, train

    data, teacher = tiny
    cfg = {"teacher": str(teacher), "student": str(PICO_YAML), "data": str(data), "epochs": 3, "imgsz": IMGSZ,
           "batch": 8, "device": "cpu", "workers": 0, "project": str(tmp_path / "runs"), "name": "res",
           "plots": False, "seed": 0, "amp": False,
           "distill": {"logits": None, "boxes": None, "features": "auto", "feature_method": "cwd",
                       "stop_when_gap_stalls": {"patience": 1, "min_delta": 0.5}}}
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(cfg))

    class Stop(Exception):
        pass

    def stop_after_epoch_2(trainer):
        if trainer.epoch == 1:
            raise Stop

    with pytest.raises(Stop):
        train(load_train_config(p), callbacks={"on_model_save": stop_after_epoch_2})
    run = tmp_path / "runs" / "res"
    assert len(_rows(run)) == 2
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda r: records.append(r.getMessage())
    level = LOGGER.level
    LOGGER.addHandler(handler)
    LOGGER.setLevel(logging.INFO)
    try:
        YOLO(str(run / "weights" / "last.pt")).train(resume=True, trainer=DistillTrainer)
    finally:
        LOGGER.removeHandler(handler)
        LOGGER.setLevel(level)
    rows = _rows(run)
    assert len(rows) == 3 and float(rows[1]["train/kd_feat"]) > 0 and float(rows[2]["train/kd_feat"]) == 0.0
    assert any("distillation stays off (the gap stalled at epoch 2)" in r for r in records)
