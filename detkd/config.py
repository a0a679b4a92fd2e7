"""Distillation config: plain YAML mapped onto dataclasses, with errors that name the key and the fix.

Example (``configs/distill_example.yaml``)::

    task_weight: 1.0          # multiplier on the student's own detection loss
    logits:   {method: sigmoid_kd, weight: 1.0, temperature: 1.0}
    boxes:    {method: ld, weight: 1.0, temperature: 10.0}
    features:
      - {student: neck.p3, teacher: neck.p3, method: cwd, weight: 1.0, options: {tau: 1.0}}
      - {student: neck.p4, teacher: neck.p4, method: fgd}
    stop_epoch: null          # from this epoch on: no distillation, no teacher forward

Hard/soft balance: Hinton's ``alpha`` (≈ 0.7 in practice) is ``task_weight = 1 - alpha`` with the KD weights
multiplied by ``alpha``. Any unknown key is a `ConfigError` naming its full path and the closest valid key.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from detkd.errors import ConfigError
from detkd.schedules import KINDS, Schedule

ADAPTERS = ("auto", "conv", "conv_bn", "none")


def _closest(key: str, valid) -> str:
    m = difflib.get_close_matches(key, sorted(valid), n=1, cutoff=0.5)
    return f"; did you mean '{m[0]}'?" if m else f"; valid keys: {', '.join(sorted(valid))}"


def _check_keys(d: dict, cls, where: str, src: str) -> None:
    if not isinstance(d, dict):
        raise ConfigError(f"{src}{where}: expected a mapping, got {type(d).__name__} {d!r}")
    valid = {f.name for f in dataclasses.fields(cls)}
    for k in d:
        if k not in valid:
            raise ConfigError(f"{src}{where}.{k}: unknown key{_closest(str(k), valid)}")


def _num(v: Any, where: str, src: str, *, minimum: float | None = 0.0, positive: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ConfigError(f"{src}{where}: expected a number, got {v!r}")
    if positive and v <= 0:
        raise ConfigError(f"{src}{where}: must be > 0, got {v}")
    if minimum is not None and v < minimum:
        raise ConfigError(f"{src}{where}: must be >= {minimum}, got {v}")
    return float(v)


def _method(v: Any, table: dict, where: str, src: str) -> str:
    if v not in table:
        m = difflib.get_close_matches(str(v), sorted(table), n=1, cutoff=0.4)
        hint = f"; did you mean '{m[0]}'?" if m else ""
        raise ConfigError(f"{src}{where}: unknown method {v!r}{hint} (choose from {', '.join(sorted(table))})")
    return v


@dataclass
class ScheduleConfig:
    kind: str = "constant"
    start: float = 1.0
    end: float | None = None
    warmup_epochs: float = 0.0
    stop_epoch: float | None = None

    def build(self) -> Schedule:
        return Schedule(self.kind, self.start, self.end, self.warmup_epochs, self.stop_epoch)

    @classmethod
    def parse(cls, d: Any, where: str, src: str) -> ScheduleConfig | None:
        if d is None:
            return None
        if isinstance(d, str):
            d = {"kind": d}
        _check_keys(d, cls, where, src)
        if d.get("kind", "constant") not in KINDS:
            raise ConfigError(f"{src}{where}.kind: unknown schedule {d['kind']!r} (choose from {', '.join(KINDS)})")
        out = cls(**d)
        for k in ("start", "warmup_epochs"):
            _num(getattr(out, k), f"{where}.{k}", src)
        for k in ("end", "stop_epoch"):
            if getattr(out, k) is not None:
                _num(getattr(out, k), f"{where}.{k}", src)
        return out


@dataclass
class LogitConfig:
    method: str = "sigmoid_kd"
    weight: float = 1.0
    temperature: float = 1.0
    schedule: ScheduleConfig | None = None
    temperature_schedule: ScheduleConfig | None = None
    options: dict = field(default_factory=dict)


@dataclass
class BoxConfig:
    method: str = "ld"
    weight: float = 1.0
    temperature: float = 10.0
    schedule: ScheduleConfig | None = None
    options: dict = field(default_factory=dict)


@dataclass
class FeatureTapConfig:
    student: str = ""
    teacher: str = ""
    method: str = "cwd"
    weight: float = 1.0
    schedule: ScheduleConfig | None = None
    options: dict = field(default_factory=dict)
    adapter: str = "auto"


@dataclass
class DistillConfig:
    logits: LogitConfig | None = None
    boxes: BoxConfig | None = None
    features: list[FeatureTapConfig] = field(default_factory=list)
    stop_epoch: float | None = None
    task_weight: float = 1.0

    # -- parsing ------------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict | None, source: str | None = None) -> DistillConfig:
        from detkd.losses.registry import BOX_METHODS, FEATURE_METHODS, LOGIT_METHODS

        src = f"{source}: " if source else ""
        d = dict(d or {})
        _check_keys(d, cls, "distill", src)
        out = cls()
        if d.get("stop_epoch") is not None:
            out.stop_epoch = _num(d["stop_epoch"], "distill.stop_epoch", src)
        out.task_weight = _num(d.get("task_weight", 1.0), "distill.task_weight", src)
        if d.get("logits") is not None:
            out.logits = cls._head(d["logits"], LogitConfig, LOGIT_METHODS, "distill.logits", src)
            out.logits.temperature_schedule = ScheduleConfig.parse(
                out.logits.temperature_schedule, "distill.logits.temperature_schedule", src
            )
        if d.get("boxes") is not None:
            out.boxes = cls._head(d["boxes"], BoxConfig, BOX_METHODS, "distill.boxes", src)
        feats = d.get("features") or []
        if not isinstance(feats, list):
            raise ConfigError(f"{src}distill.features: expected a list of taps, got {feats!r}")
        for i, f in enumerate(feats):
            where = f"distill.features[{i}]"
            _check_keys(f, FeatureTapConfig, where, src)
            tap = FeatureTapConfig(**f)
            for k in ("student", "teacher"):
                if not isinstance(getattr(tap, k), str) or not getattr(tap, k):
                    raise ConfigError(f"{src}{where}.{k}: give the module name to tap (a str from named_modules())")
            _method(tap.method, FEATURE_METHODS, f"{where}.method", src)
            tap.weight = _num(tap.weight, f"{where}.weight", src)
            tap.schedule = ScheduleConfig.parse(tap.schedule, f"{where}.schedule", src)
            if tap.adapter not in ADAPTERS:
                raise ConfigError(f"{src}{where}.adapter: {tap.adapter!r} is not one of {', '.join(ADAPTERS)}")
            if not isinstance(tap.options, dict):
                raise ConfigError(f"{src}{where}.options: expected a mapping of keyword arguments")
            out.features.append(tap)
        return out

    @staticmethod
    def _head(d: Any, klass, table: dict, where: str, src: str):
        if isinstance(d, str):
            d = {"method": d}
        _check_keys(d, klass, where, src)
        c = klass(**d)
        _method(c.method, table, f"{where}.method", src)
        c.weight = _num(c.weight, f"{where}.weight", src)
        c.temperature = _num(c.temperature, f"{where}.temperature", src, positive=True)
        c.schedule = ScheduleConfig.parse(c.schedule, f"{where}.schedule", src)
        if not isinstance(c.options, dict):
            raise ConfigError(f"{src}{where}.options: expected a mapping of keyword arguments")
        return c

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def load_config(config: DistillConfig | dict | str | Path | None) -> DistillConfig:
    """A DistillConfig from a DistillConfig, a dict, or a YAML path (its top level or its ``distill:`` block)."""
    if isinstance(config, DistillConfig):
        return config
    if config is None:
        return DistillConfig()
    if isinstance(config, (str, Path)):
        p = Path(config)
        if not p.is_file():
            raise ConfigError(f"distillation config not found: {p}")
        try:
            d = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML ({e})") from e
        if isinstance(d, dict) and "distill" in d:
            d = d["distill"] or {}
        return DistillConfig.from_dict(d, source=str(p))
    if isinstance(config, dict):
        return DistillConfig.from_dict(config)
    raise ConfigError(f"config must be a DistillConfig, dict or YAML path, got {type(config).__name__}")
