"""Distillation config: plain YAML mapped onto dataclasses, with errors that name the key and the fix.

A documented example is ``configs/distill_example.yaml``; in short::

    distill:
      task_weight: 1.0          # multiplier on the student's own detection loss
      logits:   {method: sigmoid_kd, weight: 1.0, temperature: 1.0}        # kd | sigmoid_kd
      boxes:    {method: ld, weight: 1.0, temperature: 10.0}               # ld | l1_giou | bounded
      features:                                                            # fitnet | cwd | pkd | at | mgd | fgd
        - {student: neck.p3, teacher: neck.p3, method: cwd, weight: 1.0, options: {tau: 1.0}}
        - {student: neck.p4, teacher: neck.p4, method: fgd, adapter: auto}
      stop_epoch: null          # from this epoch on: no distillation, no teacher forward

Each term's contribution is ``weight * schedule(epoch, total_epochs) * loss``; ``schedule`` is a
:class:`detkd.schedules.Schedule` mapping (``{kind: cosine, start: 1, end: 0.01, warmup_epochs: 0,
stop_epoch: null}``) or just its kind (``schedule: cosine``). ``logits.temperature_schedule`` replaces the
fixed temperature by a scheduled value. ``options`` are keyword arguments of the loss itself (see
:mod:`detkd.losses.registry` for which function each method calls); they are checked against its signature.

Hard/soft balance: Hinton's ``loss = (1 - alpha) * task + alpha * KD`` with ``alpha`` ~ 0.7 is written
``task_weight: 0.3`` and every KD ``weight`` multiplied by ``0.7``. ``task_weight`` is applied by the
integration (the Distiller only returns the KD terms).

Every problem is a :class:`detkd.errors.ConfigError` whose message starts with the file (when loaded
from one) and the full key path, e.g. ``kd.yaml: distill.features[1].methd: unknown key; did you mean
'method'?``; bad values name the allowed values.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from detkd.errors import ConfigError
from detkd.schedules import KINDS, Schedule

__all__ = ["ADAPTERS", "ScheduleConfig", "LogitConfig", "BoxConfig", "FeatureTapConfig", "DistillConfig",
           "load_config"]

ADAPTERS = ("auto", "conv", "conv_bn", "none")
"""``auto``: 1x1 conv + BN only where channels differ (and the method does not align them itself);
``conv``: always a 1x1 conv (with bias); ``conv_bn``: always 1x1 conv + BN; ``none``: never."""

ScheduleConfig = Schedule  # schedules are configured by the Schedule dataclass itself


@dataclass
class LogitConfig:
    """Classification-logit distillation (``distill.logits``)."""

    method: str = "sigmoid_kd"
    weight: float = 1.0
    temperature: float = 1.0
    schedule: Schedule | None = None
    temperature_schedule: Schedule | None = None
    options: dict = field(default_factory=dict)


@dataclass
class BoxConfig:
    """Box-regression distillation (``distill.boxes``); ``temperature`` is used by ``ld`` only."""

    method: str = "ld"
    weight: float = 1.0
    temperature: float = 10.0
    schedule: Schedule | None = None
    options: dict = field(default_factory=dict)


@dataclass
class FeatureTapConfig:
    """One feature pair (``distill.features[i]``): module names from ``model.named_modules()``, optionally
    ``name:0`` / ``name:key`` for one element of a tuple/dict output."""

    student: str = ""
    teacher: str = ""
    method: str = "cwd"
    weight: float = 1.0
    schedule: Schedule | None = None
    options: dict = field(default_factory=dict)
    adapter: str = "auto"


# ------------------------------------------------------------------------------------------------------------
# checking helpers: each raises ConfigError("<file>: <key path>: <problem>")
# ------------------------------------------------------------------------------------------------------------
def _hint(key: str, valid, cutoff: float = 0.5) -> str:
    m = difflib.get_close_matches(str(key), sorted(valid), n=1, cutoff=cutoff)
    return f"; did you mean '{m[0]}'?" if m else f"; valid keys: {', '.join(sorted(valid))}"


def _mapping(d: Any, where: str, src: str) -> dict:
    if not isinstance(d, dict):
        raise ConfigError(f"{src}{where}: expected a mapping, got {type(d).__name__} {d!r}")
    return d


def _check_keys(d: Any, cls, where: str, src: str) -> dict:
    _mapping(d, where, src)
    valid = {f.name for f in dataclasses.fields(cls)}
    for k in d:
        if k not in valid:
            raise ConfigError(f"{src}{where}.{k}: unknown key{_hint(k, valid)}")
    return d


def _num(v: Any, where: str, src: str, *, minimum: float | None = 0.0, positive: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ConfigError(f"{src}{where}: expected a number, got {type(v).__name__} {v!r}")
    if positive and not v > 0:
        raise ConfigError(f"{src}{where}: must be > 0, got {v}")
    if minimum is not None and v < minimum:
        raise ConfigError(f"{src}{where}: must be >= {minimum}, got {v}")
    return float(v)


def _opt_num(v: Any, where: str, src: str) -> float | None:
    return None if v is None else _num(v, where, src)


def _choice(v: Any, allowed, where: str, src: str, what: str) -> str:
    if not isinstance(v, str) or v not in allowed:
        hint = ""
        if isinstance(v, str):
            m = difflib.get_close_matches(v, sorted(allowed), n=1, cutoff=0.4)
            hint = f"; did you mean '{m[0]}'?" if m else ""
        raise ConfigError(f"{src}{where}: unknown {what} {v!r}{hint} (choose from {', '.join(sorted(allowed))})")
    return v


def _options(d: Any, method, where: str, src: str) -> dict:
    d = dict(_mapping(d if d is not None else {}, where, src))
    valid = method.option_names()
    if valid is not None:
        for k in d:
            if k not in valid:
                m = difflib.get_close_matches(str(k), sorted(valid), n=1, cutoff=0.5)
                hint = f"; did you mean '{m[0]}'?" if m else ""
                raise ConfigError(f"{src}{where}.{k}: unknown option for method '{method.name}'{hint} "
                                  f"(valid: {', '.join(sorted(valid)) or 'none'})")
    return d


def _schedule(d: Any, where: str, src: str, *, positive: bool = False) -> Schedule | None:
    if d is None:
        return None
    if isinstance(d, Schedule):
        d = dataclasses.asdict(d)
    if isinstance(d, str):
        d = {"kind": d}
    d = _check_keys(d, Schedule, where, src)
    kind = _choice(d.get("kind", "constant"), KINDS, f"{where}.kind", src, "schedule")
    start = _num(d.get("start", 1.0), f"{where}.start", src, positive=positive)
    end = None if d.get("end") is None else _num(d["end"], f"{where}.end", src, positive=positive)
    warmup = _num(d.get("warmup_epochs", 0.0), f"{where}.warmup_epochs", src)
    stop = _opt_num(d.get("stop_epoch"), f"{where}.stop_epoch", src)
    if positive and (warmup > 0 or stop is not None):  # a temperature must stay > 0
        raise ConfigError(f"{src}{where}: a temperature schedule takes no warmup_epochs or stop_epoch "
                          "(the temperature would reach 0)")
    return Schedule(kind, start, end, warmup, stop)


def _head(d: Any, klass, table: dict, where: str, src: str):
    if isinstance(d, str):
        d = {"method": d}
    d = _check_keys(d, klass, where, src)
    method = table[_choice(d.get("method", klass.method), table, f"{where}.method", src, "method")]
    c = klass(method=method.name)
    c.weight = _num(d.get("weight", klass.weight), f"{where}.weight", src)
    c.temperature = _num(d.get("temperature", klass.temperature), f"{where}.temperature", src, positive=True)
    c.schedule = _schedule(d.get("schedule"), f"{where}.schedule", src)
    if "temperature_schedule" in d:
        c.temperature_schedule = _schedule(d["temperature_schedule"], f"{where}.temperature_schedule", src,
                                           positive=True)
    c.options = _options(d.get("options"), method, f"{where}.options", src)
    return c


def _tap(d: Any, where: str, src: str) -> FeatureTapConfig:
    from detkd.losses.registry import FEATURE_METHODS

    d = _check_keys(d, FeatureTapConfig, where, src)
    tap = FeatureTapConfig()
    for k in ("student", "teacher"):
        v = d.get(k)
        if not isinstance(v, str) or not v:
            raise ConfigError(f"{src}{where}.{k}: give the module name to tap, a str from model.named_modules() "
                              f"(got {v!r})")
        setattr(tap, k, v)
    method = FEATURE_METHODS[_choice(d.get("method", tap.method), FEATURE_METHODS, f"{where}.method", src, "method")]
    tap.method = method.name
    tap.weight = _num(d.get("weight", tap.weight), f"{where}.weight", src)
    tap.schedule = _schedule(d.get("schedule"), f"{where}.schedule", src)
    tap.options = _options(d.get("options"), method, f"{where}.options", src)
    tap.adapter = _choice(d.get("adapter", tap.adapter), ADAPTERS, f"{where}.adapter", src, "adapter")
    return tap


@dataclass
class DistillConfig:
    """The whole ``distill:`` block. See the module docstring."""

    logits: LogitConfig | None = None
    boxes: BoxConfig | None = None
    features: list[FeatureTapConfig] = field(default_factory=list)
    stop_epoch: float | None = None
    task_weight: float = 1.0

    @classmethod
    def from_dict(cls, d: dict | None, source: str | None = None) -> DistillConfig:
        """Parse and check a ``distill`` mapping; ``source`` (a file name) prefixes every error message."""
        from detkd.losses.registry import BOX_METHODS, LOGIT_METHODS

        src = f"{source}: " if source else ""
        d = _check_keys({} if d is None else d, cls, "distill", src)
        out = cls()
        out.stop_epoch = _opt_num(d.get("stop_epoch"), "distill.stop_epoch", src)
        out.task_weight = _num(d.get("task_weight", 1.0), "distill.task_weight", src)
        if d.get("logits") is not None:
            out.logits = _head(d["logits"], LogitConfig, LOGIT_METHODS, "distill.logits", src)
        if d.get("boxes") is not None:
            out.boxes = _head(d["boxes"], BoxConfig, BOX_METHODS, "distill.boxes", src)
        feats = d.get("features")
        if feats is None:
            feats = []
        if not isinstance(feats, list):
            raise ConfigError(f"{src}distill.features: expected a list of taps "
                              f"({{student: name, teacher: name, method: ...}}), got {feats!r}")
        out.features = [_tap(f, f"distill.features[{i}]", src) for i, f in enumerate(feats)]
        return out

    def to_dict(self) -> dict:
        """Plain dicts/lists/numbers (YAML-safe); ``DistillConfig.from_dict(c.to_dict()) == c``."""
        return dataclasses.asdict(self)

    def validate(self) -> DistillConfig:
        """Check a config built in Python (not through ``from_dict``); returns the checked copy."""
        return DistillConfig.from_dict(self.to_dict())

    @property
    def enabled(self) -> bool:
        """Whether any term is configured."""
        return bool(self.logits or self.boxes or self.features)


def load_config(config: DistillConfig | dict | str | Path | None) -> DistillConfig:
    """A checked :class:`DistillConfig` from a DistillConfig, a dict, or a YAML file.

    A file (or dict) may hold the block at its top level or under a ``distill:`` key (then other
    top-level keys, e.g. training settings, are ignored here).
    """
    if isinstance(config, DistillConfig):
        return config.validate()
    if config is None:
        return DistillConfig()
    if isinstance(config, (str, Path)):
        import yaml

        p = Path(config)
        if not p.is_file():
            raise ConfigError(f"distillation config not found: {p}")
        try:
            d = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML ({e})") from e
        if isinstance(d, dict) and "distill" in d:
            d = d["distill"]
        return DistillConfig.from_dict(d, source=str(p))
    if isinstance(config, dict):
        if "distill" in config:
            config = config["distill"]
        return DistillConfig.from_dict(config)
    raise ConfigError(f"config must be a DistillConfig, a dict or a YAML path, got {type(config).__name__}")
