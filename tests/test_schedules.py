"""Schedules against hand-computed numbers and YOLOv6's distillation weight decay written out."""

from __future__ import annotations

import math

import pytest

from detkd.schedules import CONSTANT, KINDS, Schedule, progress


def yolov6_distill_weightdecay(epoch_num: int, max_epoch: int) -> float:
    """YOLOv6 ``loss_distill.py``: ``((1 - cos(epoch_num * pi / max_epoch)) / 2) * (0.01 - 1) + 1``."""
    return ((1 - math.cos(epoch_num * math.pi / max_epoch)) / 2) * (0.01 - 1) + 1


def test_cosine_matches_yolov6_every_epoch():
    s = Schedule("cosine")  # defaults: start 1, end 0.01 * start
    for max_epoch in (1, 7, 300):
        for e in range(max_epoch + 1):
            assert s(e, max_epoch) == pytest.approx(yolov6_distill_weightdecay(e, max_epoch), abs=1e-12)


def test_cosine_hand_values():
    s = Schedule("cosine")
    assert s(0, 10) == 1.0
    assert s(5, 10) == pytest.approx(0.505)  # (1 - cos(pi/2)) / 2 = 0.5 -> 1 - 0.99 * 0.5
    assert s(2.5, 10) == pytest.approx(1 - 0.99 * (1 - math.sqrt(0.5)) / 2)  # 0.8550178...
    assert s(2.5, 10) == pytest.approx(0.85501786, abs=1e-8)
    assert s(10, 10) == pytest.approx(0.01)
    assert s(12, 10) == pytest.approx(0.01)  # progress clipped at 1
    custom = Schedule("cosine", start=2.0, end=0.5)
    assert custom(5, 10) == pytest.approx(1.25)  # 2 + (0.5 - 2) * 0.5
    assert Schedule("cosine", start=4.0).end_value == pytest.approx(0.04)


def test_linear_and_constant():
    lin = Schedule("linear", start=2.0, end=0.0)
    assert lin(0, 10) == 2.0
    assert lin(2.5, 10) == pytest.approx(1.5)  # fractional epochs
    assert lin(5, 10) == pytest.approx(1.0)
    assert lin(20, 10) == 0.0 and lin(-1, 10) == 2.0  # clipped progress
    assert lin(5, None) == 2.0  # unknown length: progress 0
    up = Schedule("linear", start=0.5, end=4.5)
    assert up(3, 8) == pytest.approx(0.5 + 4.0 * 3 / 8)
    assert Schedule("linear", start=3.0)(7, 10) == 3.0  # end defaults to start
    assert Schedule("constant", start=0.7)(123.4, 10) == 0.7
    assert CONSTANT(0, 1) == 1.0 and CONSTANT(99, 1) == 1.0


def test_warmup_ramps_from_zero():
    w = Schedule("constant", start=1.0, warmup_epochs=2)
    assert w(0, 10) == 0.0
    assert w(0.5, 10) == pytest.approx(0.25)
    assert w(1.5, 10) == pytest.approx(0.75)
    assert w(2, 10) == 1.0 and w(9, 10) == 1.0
    # combined with a decay: the ramp multiplies the decayed value
    wl = Schedule("linear", start=1.0, end=0.0, warmup_epochs=4)
    assert wl(2, 10) == pytest.approx((1 - 0.2) * 2 / 4)  # 0.4
    wc = Schedule("cosine", warmup_epochs=3)
    assert wc(1, 10) == pytest.approx(yolov6_distill_weightdecay(1, 10) / 3)


def test_stop_epoch_is_exact_zero():
    st = Schedule("constant", stop_epoch=3)
    assert st(2.999, 10) == 1.0
    for e in (3, 3.5, 100):
        v = st(e, 10)
        assert v == 0.0 and isinstance(v, float)
    assert Schedule("cosine", warmup_epochs=5, stop_epoch=2)(2, 10) == 0.0
    assert not Schedule().stopped(1e9) and Schedule(stop_epoch=0).stopped(0)


def test_progress_and_validation():
    assert progress(3, 12) == 0.25 and progress(5, None) == 0.0 and progress(5, 0) == 0.0 and progress(30, 12) == 1.0
    assert KINDS == ("constant", "linear", "cosine")
    with pytest.raises(ValueError, match="constant, linear, cosine"):
        Schedule("exp")
    with pytest.raises(ValueError, match="warmup_epochs"):
        Schedule(warmup_epochs=-1)
    with pytest.raises(ValueError, match="start must be a number"):
        Schedule(start="1")
