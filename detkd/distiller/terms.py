"""The terms: each is ``weight * schedule(epoch, total_epochs) * loss``; a term whose multiplier is 0 is not
computed (an exact zero), and when every multiplier is 0 the Distiller skips the teacher too.

Keys: ``kd_cls`` (logits), ``kd_box`` (boxes), ``kd_feat/<student tap>`` per feature tap (``#i`` appended to a
repeated tap), summed into ``kd_feat``; ``kd_cross`` (``cross_head``: the student's head inputs through the teacher's
head); ``kd_mutual`` (``mode: online`` with ``online.mutual_weight`` > 0: the
teacher <- student mirror of the logit and box terms); ``kd_total`` is the sum of the configured terms.
Before ``cfg.kd_start_epoch`` (``online`` / ``self_distill`` ``warmup_epochs``) every multiplier is 0.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from detkd.config import DistillConfig
from detkd.distiller.dense import DenseOutputs
from detkd.errors import ConfigError
from detkd.schedules import Schedule

__all__ = ["feature_keys", "head_term", "multipliers", "stopped", "temperature", "term_keys"]


def term_keys(cfg: DistillConfig) -> list[str]:
    """The configured terms, in the order they are reported."""
    mutual = cfg.mutual_weight > 0 and bool(cfg.logits or cfg.boxes)
    return [k for k, on in (("kd_cls", cfg.logits), ("kd_box", cfg.boxes), ("kd_feat", cfg.features),
                            ("kd_cross", cfg.cross_head), ("kd_mutual", mutual)) if on]


def feature_keys(cfg: DistillConfig) -> list[str]:
    keys: list[str] = []
    for i, tap in enumerate(cfg.features):
        k = f"kd_feat/{tap.student}"
        keys.append(k if k not in keys else f"{k}#{i}")
    return keys


def stopped(cfg: DistillConfig, epoch: float) -> bool:
    """True from ``cfg.stop_epoch`` on."""
    return cfg.stop_epoch is not None and epoch >= cfg.stop_epoch


def _mult(cfg: DistillConfig, sched: Schedule | None, weight: float, epoch: float, total: float | None) -> float:
    if stopped(cfg, epoch) or epoch < cfg.kd_start_epoch:
        return 0.0
    return float(weight) * (sched(epoch, total) if sched is not None else 1.0)


def multipliers(cfg: DistillConfig, epoch: float, total: float | None) -> dict[str, float]:
    """``weight * schedule`` of each term now: ``kd_cls``, ``kd_box``, ``kd_feat/<student tap>``."""
    out: dict[str, float] = {}
    if cfg.logits:
        out["kd_cls"] = _mult(cfg, cfg.logits.schedule, cfg.logits.weight, epoch, total)
    if cfg.boxes:
        out["kd_box"] = _mult(cfg, cfg.boxes.schedule, cfg.boxes.weight, epoch, total)
    for key, tap in zip(feature_keys(cfg), cfg.features):
        out[key] = _mult(cfg, tap.schedule, tap.weight, epoch, total)
    if cfg.cross_head is not None:
        out["kd_cross"] = _mult(cfg, cfg.cross_head.schedule, cfg.cross_head.weight, epoch, total)
    if "kd_mutual" in term_keys(cfg):  # a factor on the mirrored kd_cls / kd_box multipliers
        out["kd_mutual"] = _mult(cfg, None, cfg.mutual_weight, epoch, total)
    return out


def temperature(cfg: DistillConfig, epoch: float, total: float | None) -> float:
    """The logit temperature now (``logits.temperature_schedule`` if set, else ``logits.temperature``)."""
    c = cfg.logits
    if c is None:
        raise ConfigError("no distill.logits configured")
    if c.temperature_schedule is not None:
        return c.temperature_schedule(epoch, total)
    return c.temperature


def head_term(key: str, method: Any, c: Any, temperature: float, s: DenseOutputs, t: DenseOutputs,
              box_targets: Tensor | None, mult: float, zero: Tensor) -> Tensor:
    """One dense-head term (``kd_cls`` / ``kd_box``): the registry method's loss times ``mult``, float32 0-dim."""
    if mult == 0.0:
        return zero
    v = method.loss(s, t, temperature=temperature, box_targets=box_targets, **c.options)
    if v.numel() != 1:
        raise ConfigError(f"distill.{'logits' if key == 'kd_cls' else 'boxes'}: the loss is not a scalar "
                          f"(shape {tuple(v.shape)}); do not set options.reduction to 'none'")
    return v.float().reshape(()) * mult
