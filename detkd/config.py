"""Distillation config: plain YAML mapped onto dataclasses, with errors that name the key and the fix.

A documented example is ``configs/distill_example.yaml``; in short::

    distill:
      task_weight: 1.0          # multiplier on the student's own detection loss
      logits:   {method: sigmoid_kd, weight: 4.0, temperature: 1.0}        # kd | sigmoid_kd
      boxes:    {method: ld, weight: 4.0, temperature: 10.0}               # ld | l1_giou | bounded
      features:                                                            # fitnet | cwd | pkd | at | mgd | fgd
        - {student: neck.p3, teacher: neck.p3, method: cwd, weight: 1.0, options: {tau: 1.0}}
        - {student: neck.p4, teacher: neck.p4, method: fgd, adapter: auto}
      # or, with an integration that knows the detection head's inputs (detkd train / DistillTrainer):
      # features: auto          # one tap per detection level, student and teacher
      # feature_method: cwd     # method / weight / options of those taps
      # feature_weight: 0.2
      # feature_options: {}
      stop_epoch: null          # from this epoch on: no distillation, no teacher forward
      stop_when_gap_stalls: null  # {patience: 5, min_delta: 0.0, action: stop_distill | stop_run}; detkd.gap
      teacher_runtime:          # how the frozen teacher runs; see TeacherRuntimeConfig
        {inference_mode: true, channels_last: auto, fuse: auto, half: auto, cache: false}
      unlabeled: null           # {source: PATH, ratio: 0.5, pseudo_conf: 0.5}; UnlabeledConfig (Ultralytics only)
      mode: offline             # offline | online (OnlineConfig: teacher trained alongside) | self (SelfDistillConfig)
      online: null              # mode online: {warmup_epochs: 1, mutual_weight: 1.0}
      self_distill: null        # mode self: {warmup_epochs: 1}

Each term's contribution is ``weight * schedule(epoch, total_epochs) * loss``; ``schedule`` is a
:class:`detkd.schedules.Schedule` mapping (``{kind: cosine, start: 1, end: 0.01, warmup_epochs: 0,
stop_epoch: null}``) or just its kind (``schedule: cosine``). ``logits.temperature_schedule`` replaces the
fixed temperature by a scheduled value. ``options`` are keyword arguments of the loss itself (see
:mod:`detkd.losses.registry` for which function each method calls); they are checked against its signature.

**Defaults have one home: the dataclasses below.** A key left out gets its default from here, in every integration
(``detkd train`` and ``DistillTrainer`` included); ``detkd.integrations.recipes`` only says which terms and methods a
run without a ``distill:`` block turns on, never a number. The dense weights default to 4 (logits 4 / boxes 4 /
features 1 came out best of {1, 4, 8, 16} x {1, 4} on the built-in data, YOLOv8n -> YOLOv8-pico; at 1 the dense
terms were ~5% of Ultralytics' detection loss and barely steered). A feature tap's weight defaults to 0.2: on the
benchmark's femto student (YOLOv8n teacher, 20-epoch probes, val split) CWD at weight 1 cost 0.9 val mAP50-95 against
the baseline (alone) and 1.5 against logits + boxes, while at 0.2 it was level with logits + boxes; the other
feature methods were not measured one by one at 0.2. In your own loop, set weights for your loss scale.

Hard/soft balance: Hinton's ``loss = (1 - alpha) * task + alpha * KD`` with ``alpha`` ~ 0.7 is written
``task_weight: 0.3`` and every KD ``weight`` multiplied by ``0.7``. ``task_weight`` is applied by the
integration (the Distiller only returns the KD terms).

Every problem is a :class:`detkd.errors.ConfigError` whose message starts with the file (when loaded
from one) and the full key path, e.g. ``kd.yaml: distill.features[1].methd: unknown key; did you mean
'method'?``; bad values name the allowed values.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from detkd.errors import ConfigError
from detkd.gap import GAP_ACTIONS, GapStallConfig
from detkd.schedules import KINDS, Schedule

__all__ = ["ADAPTERS", "AUTO", "ScheduleConfig", "LogitConfig", "BoxConfig", "FeatureTapConfig", "TeacherRuntimeConfig",
           "UnlabeledConfig", "DistillConfig", "load_config", "unlabeled_images",
           "resolve_unlabeled_source", "MODES", "OnlineConfig", "SelfDistillConfig"]

ADAPTERS = ("auto", "conv", "conv_bn", "none")
"""``auto``: 1x1 conv + BN only where channels differ (and the method does not align them itself);
``conv``: always a 1x1 conv (with bias); ``conv_bn``: always 1x1 conv + BN; ``none``: never."""

ScheduleConfig = Schedule  # schedules are configured by the Schedule dataclass itself

AUTO = "auto"
"""``features: auto`` / a tap's ``student: auto`` / ``teacher: auto``: module names an integration fills in (the
inputs of the detection head, one tap per level); see :meth:`DistillConfig.with_auto_taps`."""


@dataclass
class LogitConfig:
    """Classification-logit distillation (``distill.logits``)."""

    method: str = "sigmoid_kd"
    weight: float = 4.0
    temperature: float = 1.0
    schedule: Schedule | None = None
    temperature_schedule: Schedule | None = None
    options: dict = field(default_factory=dict)


@dataclass
class BoxConfig:
    """Box-regression distillation (``distill.boxes``); ``temperature`` is used by ``ld`` only."""

    method: str = "ld"
    weight: float = 4.0
    temperature: float = 10.0
    schedule: Schedule | None = None
    options: dict = field(default_factory=dict)


@dataclass
class FeatureTapConfig:
    """One feature pair (``distill.features[i]``): module names from ``model.named_modules()``, optionally
    ``name:0`` / ``name:key`` for one element of a tuple/dict output, or ``auto`` (the i-th input of the detection
    head, filled in by an integration)."""

    student: str = ""
    teacher: str = ""
    method: str = "cwd"
    weight: float = 0.2  # see the module docstring: 1.0 slowed a small student down
    schedule: Schedule | None = None
    options: dict = field(default_factory=dict)
    adapter: str = "auto"


@dataclass
class CrossHeadConfig:
    """CrossKD (``distill.cross_head``; Wang et al., "CrossKD: Cross-Head Knowledge Distillation for Object
    Detection", CVPR 2024): the student's detection-head inputs, each through an adapter to the teacher's channels,
    run through the frozen teacher's head; ``distill.logits`` / ``distill.boxes`` (their method, temperature and
    options, not their weights) compare those outputs with the teacher's own, as the term ``kd_cross`` (``weight``
    times their sum). Gradients reach the student through the teacher's head, so the student's own head learns from
    the labels alone; set ``logits.weight`` / ``boxes.weight`` to 0 for CrossKD as published (no direct mimicking).

    ``student`` / ``teacher``: the head inputs, one module name per level, or ``auto`` (an integration's detection
    head inputs). ``adapter``: ``auto`` (1x1 conv + BN where the channels differ), ``conv``, ``conv_bn``, ``none``.
    """

    weight: float = 1.0
    schedule: Schedule | None = None
    student: list | str = "auto"
    teacher: list | str = "auto"
    adapter: str = "auto"


@dataclass
class TeacherRuntimeConfig:
    """How the frozen teacher runs (``distill.teacher_runtime``). The teacher forward dominates the cost of
    distillation; these options make it cheaper without changing the distillation terms beyond float rounding.

    Attributes:
        inference_mode: run the teacher under ``torch.inference_mode()`` instead of ``torch.no_grad()``. The
            teacher tensors the losses use are cloned out of inference mode where needed (autograd may not
            save inference tensors), so the terms and gradients are unchanged. Default on.
        channels_last: teacher weights and its 4-D input in ``torch.channels_last`` memory format. ``auto``
            (default): on for an ``offline`` teacher on the CPU (oneDNN's convolutions are faster channels-last:
            0.83-0.87x the teacher forward's time for YOLOv8n at 192 px and YOLOv8s at 320 px, 1-2 threads), off
            on CUDA (not measured there) and in ``online`` / ``self`` mode.
        fuse: fold each BatchNorm into the conv feeding it (:func:`detkd.distiller.fuse_conv_bn`): ``nn.Sequential``
            neighbours and ``conv``/``bn`` (``conv1``/``bn1``, ...) attribute pairs whose BN input is that conv's
            output in a probe forward. Tapped module names still resolve (a fused BN becomes ``nn.Identity``); a
            tapped conv is left unfused. Changes the teacher module in place, once: ``fuse: false`` keeps the module
            you pass untouched. ``auto`` (default): on for an ``offline`` teacher without ``cross_head`` (whose
            teacher head runs with gradients), and a teacher whose outputs folding would change beyond float
            rounding is left unfused with a warning instead of an error; ``true`` raises then.
        half: ``auto`` (default): on CUDA, when autocast is on at the teacher forward (AMP training), the
            teacher's weights are cast to the autocast dtype (float16 under Ultralytics' AMP) and stay so;
            otherwise float32 as given. ``true``: float16 on CUDA (an error for a CPU teacher). ``false``: never.
            Never on CPU. The losses always receive float32 tensors.
        cache: ``false`` (default) | ``true`` / ``memory`` | a directory. Per-sample teacher outputs keyed by
            the sample id the caller passes (``teacher_forward(x, keys=...)``; the Ultralytics integration uses
            image file names). ONLY VALID WHEN A SAMPLE'S TEACHER INPUT NEVER CHANGES: no random augmentation.
            A directory keeps entries across runs, under a sub-folder named by a hash of the teacher's weights
            and these settings.
        cache_max_items / cache_max_bytes: bounds (None: unbounded; bytes may be given as ``"8GB"``,
            ``"512MiB"``). Once full, new samples are not stored (no eviction: epochs visit every sample in
            turn, where evicting the oldest entry would evict each one before its next use).
        cache_offload: keep cached tensors in CPU memory (default) instead of on the teacher's device.
        cache_verify: store a fingerprint of each sample's input (its shape and two float64 sums over a
            strided subsample) and treat a changed input as a miss. Default on.
        cache_force: integrations refuse ``cache`` while their random augmentations are on; this overrides.
    """

    inference_mode: bool = True
    channels_last: bool | str = "auto"
    fuse: bool | str = "auto"
    half: str | bool = "auto"
    cache: str | bool = False
    cache_max_items: int | None = None
    cache_max_bytes: int | None = 8 * 2**30
    cache_offload: bool = True
    cache_verify: bool = True
    cache_force: bool = False

    @property
    def cache_enabled(self) -> bool:
        return self.cache is not False


IMAGE_SUFFIXES = frozenset({"avif", "bmp", "dng", "heic", "heif", "jp2", "jpeg", "jpg", "mpo", "png", "tif", "tiff",
                            "webp"})
"""Image files an unlabeled source may hold: Ultralytics' ``IMG_FORMATS`` (= ``detkd.data.formats.IMG_SUFFIXES``,
which this layer may not import)."""


@dataclass
class UnlabeledConfig:
    """Soft-label distillation on unlabeled frames (``distill.unlabeled``); used by the Ultralytics integration
    (``detkd train`` / ``DistillTrainer``), ignored by a plain :class:`~detkd.distiller.Distiller`.

    Every training batch holds labeled frames and unlabeled frames, a share ``ratio`` of them unlabeled. Unlabeled
    frames get only the distillation terms (logits, boxes, features); the detection loss sees the labeled frames
    only. An epoch is one pass over the labeled frames (so it has about ``1 / (1 - ratio)`` times as many steps).

    Attributes:
        source: a folder of images (searched recursively; label files next to them are ignored), a ``.txt`` file
            listing image paths (one per line, relative to the file's folder), or a list of those.
        ratio: the unlabeled share of each batch, ``0 < ratio < 1``. Default 0.5.
        pseudo_conf: teacher confidence (``DenseOutputs.anchor_confidence``; YOLO: max class sigmoid) from which a
            teacher box counts as an object on an unlabeled frame, for the feature methods that need boxes (``fgd``'s
            foreground mask); after class-agnostic NMS (IoU 0.6), at most 100 per frame. Default 0.5.
    """

    source: str | list[str] = ""
    ratio: float = 0.5
    pseudo_conf: float = 0.5

    def images(self) -> list[Path]:
        """The image files of ``source`` (see :func:`unlabeled_images`)."""
        return unlabeled_images(self.source)


MODES = ("offline", "online", "self")
"""``distill.mode``: ``offline`` (default): a pre-trained teacher, frozen. ``online``: teacher and student train
together from the same batches (:class:`OnlineConfig`). ``self``: no other model: a no-grad pass of the student at
twice the resolution teaches its normal pass (:class:`SelfDistillConfig`)."""


@dataclass
class OnlineConfig:
    """Online / mutual distillation (``distill.online``, with ``mode: online``).

    The teacher (``teacher:`` a model yaml to train from scratch, or a ``.pt`` to go on training) is trained with the
    student on every batch: its own detection loss, its parameters in the same optimizer. The configured terms
    (logits, boxes, features) distil it into the student; ``mutual_weight`` > 0 adds the mirror of the logit and box
    terms, student -> teacher (Deep Mutual Learning), as ``kd_mutual``.

    Attributes:
        warmup_epochs: every distillation term is exactly 0 before this epoch (an untrained teacher teaches noise);
            the teacher trains from the first step. Default 1.
        mutual_weight: multiplier on the teacher <- student mirror of the logit and box terms (same methods,
            weights and schedules); 0: one-way online distillation. Default 1.0 (symmetric, as Deep Mutual Learning).
    """

    warmup_epochs: float = 1.0
    mutual_weight: float = 1.0


@dataclass
class SelfDistillConfig:
    """Self-distillation (``distill.self_distill``, with ``mode: self``): no teacher model. Each step the student
    also runs, without gradient, on the batch upsampled 2x; level l + 1 of that pass sees the same grid (stride 2s on
    a 2x image = stride s) and the same object sizes as level l of the normal pass, so it teaches it: P4 -> P3 and
    P5 -> P4 (logits and DFL boxes anchor for anchor, features through 1x1 adapters). The coarsest level has no teacher.

    Attributes:
        warmup_epochs: every distillation term is exactly 0 (and the 2x pass does not run) before this epoch.
            Default 1.
    """

    warmup_epochs: float = 1.0


def _source_list(source: str | Path | list) -> list[Path]:
    return [Path(str(x)).expanduser() for x in (source if isinstance(source, (list, tuple)) else [source])]


def unlabeled_images(source: str | Path | list, *, limit: int | None = None) -> list[Path]:
    """Image files of an unlabeled ``source``: folders recursively (sorted), ``.txt`` lists (paths relative to the
    list's folder), single image files; absolute, each once. ``limit``: stop after that many. Missing paths are
    skipped here (:class:`UnlabeledConfig` validation refuses them)."""
    out: dict[Path, None] = {}
    for p in _source_list(source):
        if p.is_dir():
            found = p.rglob("*") if limit is not None else sorted(p.rglob("*"))  # a check needs no sorted scan
            files = (q for q in found if q.suffix[1:].lower() in IMAGE_SUFFIXES and q.is_file())
        elif p.suffix.lower() == ".txt" and p.is_file():
            lines = (x.strip() for x in p.read_text(encoding="utf-8", errors="replace").splitlines())
            files = (q if q.is_absolute() else p.parent / q for q in (Path(x) for x in lines if x))
            files = (q for q in files if q.suffix[1:].lower() in IMAGE_SUFFIXES and q.is_file())
        elif p.is_file() and p.suffix[1:].lower() in IMAGE_SUFFIXES:
            files = iter([p])
        else:
            continue
        for q in files:
            out[q.resolve()] = None
            if limit is not None and len(out) >= limit:
                return list(out)
    return list(out)


def resolve_unlabeled_source(unlabeled: Any, base: Path) -> Any:
    """``distill.unlabeled`` with a relative ``source`` (or each of a list) made relative to ``base`` (the config
    file's folder) when it exists there; other values unchanged."""
    def fix(x):
        if isinstance(x, str) and x and not Path(x).expanduser().is_absolute() and (base / x).exists():
            return str((base / x).resolve())
        return x

    if isinstance(unlabeled, str):
        return fix(unlabeled)
    if isinstance(unlabeled, dict) and "source" in unlabeled:
        u = dict(unlabeled)
        src = u["source"]
        u["source"] = [fix(x) for x in src] if isinstance(src, list) else fix(src)
        return u
    return unlabeled

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


MIN_TEMPERATURE = 0.01
"""Smallest accepted temperature. As T -> 0 the T²-scaled terms (kd, ld, cwd) shrink like T (at T = 1e-3 a kd term
is 0.1% of its T = 1 value: silently off) and sigmoid_kd (no T² factor) grows like 1/T."""

TEMPERATURE_OPTIONS = ("tau", "temp", "temperature")  # loss options that are temperatures (cwd tau, fgd temp)
_NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)[eE][+-]?\d+")
"""Numbers in exponent form that YAML 1.1 (PyYAML) reads as strings: ``1e30``, ``1e-3``, ``2.5e3`` (it wants a dot
and a signed exponent). They are read as floats; other strings (``"2"``, quoted on purpose) stay errors."""


def _num(v: Any, where: str, src: str, *, minimum: float | None = 0.0, positive: bool = False) -> float:
    if isinstance(v, str) and _NUMBER.fullmatch(v.strip()):
        v = float(v)  # YAML 1.1 reads 1e30 / 1e-3 as strings
    if isinstance(v, str) and v.strip().lower().lstrip("+-.") in ("nan", "inf", "infinity"):
        raise ConfigError(f"{src}{where}: must be a finite number, got {v!r}")
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ConfigError(f"{src}{where}: expected a number, got {type(v).__name__} {v!r}")
    if not math.isfinite(v):
        raise ConfigError(f"{src}{where}: must be a finite number, got {v}")
    if positive and not v > 0:
        raise ConfigError(f"{src}{where}: must be > 0, got {v}")
    if minimum is not None and v < minimum:
        raise ConfigError(f"{src}{where}: must be >= {minimum}, got {v}")
    return float(v)


def _temperature(v: Any, where: str, src: str) -> float:
    t = _num(v, where, src, positive=True)
    if t < MIN_TEMPERATURE:
        raise ConfigError(f"{src}{where}: temperature {t:g} is too small (must be >= {MIN_TEMPERATURE}): as T -> 0 "
                          "the kd / ld / cwd terms vanish (they scale like T) and sigmoid_kd grows like 1/T; "
                          "typical values are 1 to 10")
    return t


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
    for k, v in d.items():  # numbers: finite, numeric strings (YAML 1.1's 1e-3) read as floats, temperatures bounded
        if k in TEMPERATURE_OPTIONS and v is not None:
            d[k] = _temperature(v, f"{where}.{k}", src)
        elif (isinstance(v, float) and not math.isfinite(v)) or (isinstance(v, str) and _NUMBER.fullmatch(v.strip())):
            d[k] = _num(v, f"{where}.{k}", src, minimum=None)
        elif isinstance(v, str) and v.strip().lower().lstrip("+-.") in ("nan", "inf", "infinity"):
            raise ConfigError(f"{src}{where}.{k}: must be a finite number, got {v!r}")
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
    num = _temperature if positive else _num
    start = num(d.get("start", 1.0), f"{where}.start", src)
    end = None if d.get("end") is None else num(d["end"], f"{where}.end", src)
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
    c.temperature = _temperature(d.get("temperature", klass.temperature), f"{where}.temperature", src)
    c.schedule = _schedule(d.get("schedule"), f"{where}.schedule", src)
    if "temperature_schedule" in d:
        c.temperature_schedule = _schedule(d["temperature_schedule"], f"{where}.temperature_schedule", src,
                                           positive=True)
    c.options = _options(d.get("options"), method, f"{where}.options", src)
    return c


def _bool(v: Any, where: str, src: str) -> bool:
    if not isinstance(v, bool):
        raise ConfigError(f"{src}{where}: expected true or false, got {type(v).__name__} {v!r}")
    return v


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def _bytes(v: Any, where: str, src: str) -> int | None:
    """None, a number of bytes, or a string such as ``8GB`` / ``512MiB`` / ``2.5G`` (single letters: binary)."""
    if v is None:
        return None
    if isinstance(v, str):
        import re

        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", v)
        unit = m.group(2).lower() if m else None
        if m is None or unit not in _UNITS:
            raise ConfigError(f"{src}{where}: cannot read {v!r} as a size; give bytes (e.g. 8000000000) or a "
                              "number with a unit: B, KB, MB, GB, TB, KiB, MiB, GiB, TiB")
        return int(float(m.group(1)) * _UNITS[unit])
    return int(_num(v, where, src))


def _teacher_runtime(d: Any, where: str, src: str) -> TeacherRuntimeConfig:
    if isinstance(d, TeacherRuntimeConfig):
        d = dataclasses.asdict(d)
    d = _check_keys({} if d is None else d, TeacherRuntimeConfig, where, src)
    rt = TeacherRuntimeConfig()
    for k in ("inference_mode", "cache_offload", "cache_verify", "cache_force"):
        if k in d:
            setattr(rt, k, _bool(d[k], f"{where}.{k}", src))
    for k in ("channels_last", "fuse"):
        if k in d and d[k] != "auto":
            if not isinstance(d[k], bool):
                raise ConfigError(f"{src}{where}.{k}: expected auto, true or false, got {type(d[k]).__name__} "
                                  f"{d[k]!r}")
            setattr(rt, k, d[k])
    half = d.get("half", rt.half)
    if not (isinstance(half, bool) or half == "auto"):
        raise ConfigError(f"{src}{where}.half: expected auto, true or false, got {half!r} (auto: float16 teacher "
                          "on CUDA under autocast; never on CPU)")
    rt.half = half
    cache = d.get("cache", rt.cache)
    if cache is None or cache is False:
        cache = False
    elif cache is True:
        cache = "memory"
    elif isinstance(cache, str) and cache.strip():
        cache = cache.strip()
        if cache != "memory" and "/" not in cache and difflib.get_close_matches(cache, ["memory"], cutoff=0.6):
            raise ConfigError(f"{src}{where}.cache: {cache!r}: did you mean 'memory'? (a cache directory must "
                              "be written as a path, e.g. ./teacher_cache)")
    else:
        raise ConfigError(f"{src}{where}.cache: expected false, true, memory or a directory path, got "
                          f"{type(cache).__name__} {cache!r}")
    rt.cache = cache
    items = d.get("cache_max_items", rt.cache_max_items)
    if items is not None and (isinstance(items, bool) or not isinstance(items, int) or items < 1):
        raise ConfigError(f"{src}{where}.cache_max_items: expected null or an integer >= 1, got {items!r}")
    rt.cache_max_items = items
    rt.cache_max_bytes = _bytes(d.get("cache_max_bytes", rt.cache_max_bytes), f"{where}.cache_max_bytes", src)
    return rt


def _gap_stall(d: Any, where: str, src: str) -> GapStallConfig | None:
    if d is None or d is False:
        return None
    if isinstance(d, GapStallConfig):
        d = dataclasses.asdict(d)
    d = _check_keys({} if d is True else d, GapStallConfig, where, src)
    g = GapStallConfig()
    p = d.get("patience", g.patience)
    if isinstance(p, bool) or not isinstance(p, int) or p < 1:
        raise ConfigError(f"{src}{where}.patience: expected an integer >= 1 (epochs), got {p!r}")
    g.patience = p
    g.min_delta = _num(d.get("min_delta", g.min_delta), f"{where}.min_delta", src)
    g.action = _choice(d.get("action", g.action), GAP_ACTIONS, f"{where}.action", src, "action")
    return g


def _unlabeled(d: Any, where: str, src: str) -> UnlabeledConfig | None:
    if d is None or d is False:
        return None
    if isinstance(d, UnlabeledConfig):
        d = dataclasses.asdict(d)
    if isinstance(d, (str, Path)):
        d = {"source": str(d)}
    d = _check_keys(d, UnlabeledConfig, where, src)
    u = UnlabeledConfig()
    source = d.get("source")
    items = source if isinstance(source, (list, tuple)) else [source]
    if not items or any(not isinstance(x, (str, Path)) or not str(x).strip() for x in items):
        raise ConfigError(f"{src}{where}.source: give a folder of images (or a .txt list of image paths, or a list "
                          f"of those), got {source!r}")
    for x in items:
        p = Path(str(x)).expanduser()
        if not p.exists():
            raise ConfigError(f"{src}{where}.source: not found: {p}")
        if p.is_file() and p.suffix.lower() != ".txt" and p.suffix[1:].lower() not in IMAGE_SUFFIXES:
            raise ConfigError(f"{src}{where}.source: {p} is neither a folder, an image nor a .txt list of images "
                              "(videos are not read here: extract frames into a folder first, e.g. with ffmpeg)")
        if not unlabeled_images(p, limit=1):
            raise ConfigError(f"{src}{where}.source: {p} holds no image files (looked for "
                              f"{', '.join(sorted(IMAGE_SUFFIXES))})")
    u.source = [str(x) for x in items] if isinstance(source, (list, tuple)) else str(source)
    r = _num(d.get("ratio", u.ratio), f"{where}.ratio", src, minimum=None)
    if not 0.0 < r < 1.0:
        raise ConfigError(f"{src}{where}.ratio: the unlabeled share of each batch must be > 0 and < 1, got {r:g} "
                          "(e.g. 0.5: half of every batch unlabeled)")
    u.ratio = r
    c = _num(d.get("pseudo_conf", u.pseudo_conf), f"{where}.pseudo_conf", src, minimum=None)
    if not 0.0 < c <= 1.0:
        raise ConfigError(f"{src}{where}.pseudo_conf: a teacher score threshold, must be > 0 and <= 1, got {c:g}")
    u.pseudo_conf = c
    return u


def _mode_block(d: Any, klass, where: str, src: str):
    """``distill.online`` / ``distill.self_distill``: a mapping (``null`` / ``true``: every default)."""
    if isinstance(d, klass):
        d = dataclasses.asdict(d)
    d = _check_keys({} if d is None or d is True else d, klass, where, src)
    out = klass()
    for f in dataclasses.fields(klass):
        if f.name in d:
            setattr(out, f.name, _num(d[f.name], f"{where}.{f.name}", src))
    return out


def _check_mode(out: DistillConfig, src: str) -> None:
    """What ``online`` / ``self`` cannot do, refused in one line each."""
    mode = out.mode
    what = "the teacher is trained with the student" if mode == "online" else "the teacher is the student itself"
    rt = out.teacher_runtime
    for key, on in (("cache", rt.cache_enabled), ("fuse", rt.fuse is True),
                    ("channels_last", rt.channels_last is True), ("half", rt.half is True)):
        if on:
            raise ConfigError(f"{src}distill.teacher_runtime.{key}: not with mode: {mode} ({what}, so its outputs "
                              "change every step and its weights must stay as they train); remove it")
    if out.stop_when_gap_stalls is not None:
        raise ConfigError(f"{src}distill.stop_when_gap_stalls: not with mode: {mode} (it compares the student with a "
                          "fixed, pre-trained teacher's val mAP); remove it, or use mode: offline")
    if out.unlabeled is not None:
        raise ConfigError(f"{src}distill.unlabeled: not with mode: {mode} (unlabeled frames need a pre-trained "
                          "teacher's soft labels); remove it, or use mode: offline")
    if mode == "self" and out.boxes is not None and out.boxes.method == "bounded":
        raise ConfigError(f"{src}distill.boxes.method=bounded: not with mode: self (its regression targets are the "
                          "normal pass's own anchors, not the 2x pass's); use ld or l1_giou")


def _tap(d: Any, where: str, src: str) -> FeatureTapConfig:
    from detkd.losses.registry import FEATURE_METHODS

    d = _check_keys(d, FeatureTapConfig, where, src)
    tap = FeatureTapConfig()
    for k in ("student", "teacher"):
        v = d.get(k)
        if not isinstance(v, str) or not v:
            raise ConfigError(f"{src}{where}.{k}: give the module name to tap, a str from model.named_modules(), "
                              f"or auto (an integration's detection-head input) (got {v!r})")
        setattr(tap, k, v)
    method = FEATURE_METHODS[_choice(d.get("method", tap.method), FEATURE_METHODS, f"{where}.method", src, "method")]
    tap.method = method.name
    tap.weight = _num(d.get("weight", tap.weight), f"{where}.weight", src)
    tap.schedule = _schedule(d.get("schedule"), f"{where}.schedule", src)
    tap.options = _options(d.get("options"), method, f"{where}.options", src)
    tap.adapter = _choice(d.get("adapter", tap.adapter), ADAPTERS, f"{where}.adapter", src, "adapter")
    return tap


_OFF = (None, False, "none")  # a term written as null / false / none is off


def _names(v: Any, where: str, src: str) -> list | str:
    if v == AUTO:
        return AUTO
    if not isinstance(v, list) or not v or not all(isinstance(x, str) and x for x in v):
        raise ConfigError(f"{src}{where}: give the head inputs as a list of module names (one per level), or auto "
                          f"(got {v!r})")
    return list(v)


def _cross_head(d: Any, where: str, src: str) -> CrossHeadConfig | None:
    if d in _OFF:
        return None
    d = _check_keys({} if d is True else d, CrossHeadConfig, where, src)
    c = CrossHeadConfig()
    c.weight = _num(d.get("weight", c.weight), f"{where}.weight", src)
    c.schedule = _schedule(d.get("schedule"), f"{where}.schedule", src)
    c.student = _names(d.get("student", c.student), f"{where}.student", src)
    c.teacher = _names(d.get("teacher", c.teacher), f"{where}.teacher", src)
    if AUTO not in (c.student, c.teacher) and len(c.student) != len(c.teacher):
        raise ConfigError(f"{src}{where}: {len(c.student)} student head inputs but {len(c.teacher)} teacher ones; "
                          "give one pair per level")
    c.adapter = _choice(d.get("adapter", c.adapter), ADAPTERS, f"{where}.adapter", src, "adapter")
    return c


def _check_cross_head(out: Any, src: str) -> None:
    if out.logits is None and out.boxes is None:
        raise ConfigError(f"{src}distill.cross_head compares the teacher head's outputs with distill.logits and/or "
                          "distill.boxes (their methods); configure at least one (weight 0 turns its direct term off)")
    if out.mode != "offline":
        raise ConfigError(f"{src}distill.cross_head: with mode offline only (mode is {out.mode})")
    rt = out.teacher_runtime
    if rt.fuse is True or rt.cache_enabled:
        raise ConfigError(f"{src}distill.cross_head runs the teacher's head with gradients every step: turn "
                          "teacher_runtime.fuse and teacher_runtime.cache off")


@dataclass
class DistillConfig:
    """The whole ``distill:`` block. See the module docstring.

    ``features`` is a list of taps, or ``"auto"`` (one tap per detection level, filled in by an integration with
    :meth:`with_auto_taps`; ``feature_method`` / ``feature_weight`` / ``feature_options`` are those taps' method,
    weight and options, defaulting to :class:`FeatureTapConfig`'s).
    """

    logits: LogitConfig | None = None
    boxes: BoxConfig | None = None
    features: list[FeatureTapConfig] | str = field(default_factory=list)
    cross_head: CrossHeadConfig | None = None  # CrossKD; see CrossHeadConfig
    feature_method: str = FeatureTapConfig.method
    feature_weight: float = FeatureTapConfig.weight
    feature_options: dict = field(default_factory=dict)
    stop_epoch: float | None = None
    task_weight: float = 1.0
    teacher_runtime: TeacherRuntimeConfig = field(default_factory=TeacherRuntimeConfig)
    stop_when_gap_stalls: GapStallConfig | None = None  # see detkd.gap; used by the Ultralytics integration
    unlabeled: UnlabeledConfig | None = None  # soft-label KD on unlabeled frames; used by the Ultralytics integration
    mode: str = "offline"  # offline | online | self; see MODES
    online: OnlineConfig | None = None  # set (defaults filled in) when mode is online
    self_distill: SelfDistillConfig | None = None  # set (defaults filled in) when mode is self

    @classmethod
    def from_dict(cls, d: dict | None, source: str | None = None) -> DistillConfig:
        """Parse and check a ``distill`` mapping; ``source`` (a file name) prefixes every error message."""
        from detkd.losses.registry import BOX_METHODS, FEATURE_METHODS, LOGIT_METHODS

        src = f"{source}: " if source else ""
        d = _check_keys({} if d is None else d, cls, "distill", src)
        out = cls()
        out.stop_epoch = _opt_num(d.get("stop_epoch"), "distill.stop_epoch", src)
        out.task_weight = _num(d.get("task_weight", cls.task_weight), "distill.task_weight", src)
        if d.get("logits") not in _OFF:
            out.logits = _head(d["logits"], LogitConfig, LOGIT_METHODS, "distill.logits", src)
        if d.get("boxes") not in _OFF:
            out.boxes = _head(d["boxes"], BoxConfig, BOX_METHODS, "distill.boxes", src)
        feats = d.get("features")
        if feats in _OFF:
            feats = []
        if feats != AUTO and not isinstance(feats, list):
            raise ConfigError(f"{src}distill.features: expected a list of taps "
                              f"({{student: name, teacher: name, method: ...}}) or auto, got {feats!r}")
        out.features = AUTO if feats == AUTO else [_tap(f, f"distill.features[{i}]", src) for i, f in enumerate(feats)]
        out.cross_head = _cross_head(d.get("cross_head"), "distill.cross_head", src)
        method = FEATURE_METHODS[_choice(d.get("feature_method", out.feature_method), FEATURE_METHODS,
                                         "distill.feature_method", src, "method")]
        out.feature_method = method.name
        out.feature_weight = _num(d.get("feature_weight", out.feature_weight), "distill.feature_weight", src)
        out.feature_options = _options(d.get("feature_options"), method, "distill.feature_options", src)
        out.teacher_runtime = _teacher_runtime(d.get("teacher_runtime"), "distill.teacher_runtime", src)
        out.stop_when_gap_stalls = _gap_stall(d.get("stop_when_gap_stalls"), "distill.stop_when_gap_stalls", src)
        out.unlabeled = _unlabeled(d.get("unlabeled"), "distill.unlabeled", src)
        if out.unlabeled is not None and out.boxes is not None and out.boxes.method == "bounded":
            raise ConfigError(f"{src}distill.boxes.method=bounded needs regression targets from ground truth, which "
                              "unlabeled frames (distill.unlabeled) do not have; use ld or l1_giou (teacher-score "
                              "weighted, no ground truth)")
        out.mode = _choice(d.get("mode", out.mode), MODES, "distill.mode", src, "mode")
        for key, klass, mode in (("online", OnlineConfig, "online"), ("self_distill", SelfDistillConfig, "self")):
            if out.mode == mode:
                setattr(out, key, _mode_block(d.get(key), klass, f"distill.{key}", src))
            elif d.get(key) not in (None, False):
                raise ConfigError(f"{src}distill.{key}: set, but distill.mode is {out.mode}; add mode: {mode} (or "
                                  f"remove distill.{key})")
        if out.mode != "offline":
            _check_mode(out, src)
        if out.cross_head is not None:
            _check_cross_head(out, src)
        return out._mark_checked()

    @property
    def kd_start_epoch(self) -> float:
        """Before this epoch every term is 0: ``online.warmup_epochs`` / ``self_distill.warmup_epochs``, else 0."""
        block = self.online if self.mode == "online" else self.self_distill if self.mode == "self" else None
        return float(block.warmup_epochs) if block is not None else 0.0

    @property
    def mutual_weight(self) -> float:
        """``online.mutual_weight`` in mode online, else 0 (no teacher <- student terms)."""
        return float(self.online.mutual_weight) if self.mode == "online" and self.online is not None else 0.0

    def _mark_checked(self) -> DistillConfig:
        self._checked = True  # not a field: from_dict made it, load_config need not parse it again
        return self

    def to_dict(self) -> dict:
        """Plain dicts/lists/numbers (YAML-safe), every default written out; ``from_dict(c.to_dict()) == c``."""
        return dataclasses.asdict(self)

    def validate(self) -> DistillConfig:
        """Check a config built in Python (not through ``from_dict``); returns the checked copy."""
        return DistillConfig.from_dict(self.to_dict())

    @property
    def enabled(self) -> bool:
        """Whether any term is configured."""
        return bool(self.logits or self.boxes or self.features)

    @property
    def has_auto_taps(self) -> bool:
        cross = self.cross_head is not None and AUTO in (self.cross_head.student, self.cross_head.teacher)
        return cross or self.features == AUTO or any(AUTO in (t.student, t.teacher) for t in self.features)

    def with_auto_taps(self, student_inputs: list[str], teacher_inputs: list[str]) -> DistillConfig:
        """A copy with ``auto`` resolved from the detection head's inputs of each model (module names, one per level):
        ``features: auto`` becomes one tap per level (``feature_method`` / ``feature_weight`` /
        ``feature_options``); a tap's ``student: auto`` / ``teacher: auto`` becomes the input of its own index."""
        if self.features == AUTO:
            if len(student_inputs) != len(teacher_inputs):
                raise ConfigError(f"distill.features=auto: teacher has {len(teacher_inputs)} detection levels, "
                                  f"student {len(student_inputs)}; list the feature pairs explicitly")
            taps = [FeatureTapConfig(s, t, self.feature_method, self.feature_weight, None, dict(self.feature_options))
                    for s, t in zip(student_inputs, teacher_inputs)]
        else:
            taps = [dataclasses.replace(t) for t in self.features]
            for i, tap in enumerate(taps):
                for role, names in (("student", student_inputs), ("teacher", teacher_inputs)):
                    if getattr(tap, role) == AUTO:
                        if i >= len(names):
                            raise ConfigError(f"distill.features[{i}].{role}: auto: the {role} has only {len(names)} "
                                              "detection levels; name the module")
                        setattr(tap, role, names[i])
        cross = copy.deepcopy(self.cross_head)
        if cross is not None:
            if cross.student == AUTO:
                cross.student = list(student_inputs)
            if cross.teacher == AUTO:
                cross.teacher = list(teacher_inputs)
            if len(cross.student) != len(cross.teacher):
                raise ConfigError(f"distill.cross_head: the student has {len(cross.student)} detection levels, the "
                                  f"teacher {len(cross.teacher)}; list the head inputs explicitly")
        return dataclasses.replace(copy.deepcopy(self), features=taps, cross_head=cross)._mark_checked()

    def require_module_names(self) -> DistillConfig:
        """``self``, once no tap is ``auto`` (a plain Distiller cannot know a detection head's inputs)."""
        if self.has_auto_taps:
            raise ConfigError("distill.features / cross_head: 'auto' taps the detection head's inputs, which only an "
                              "integration knows (detkd train / DistillTrainer resolve it); with your own loop, list the "
                              "taps by module name (model.named_modules())")
        return self


def load_config(config: DistillConfig | dict | str | Path | None) -> DistillConfig:
    """A checked :class:`DistillConfig` from a DistillConfig, a dict, or a YAML file.

    A file (or dict) may hold the block at its top level or under a ``distill:`` key (then other
    top-level keys, e.g. training settings, are ignored here).
    """
    if isinstance(config, DistillConfig):  # checked by from_dict already: an own copy, not parsed again
        return copy.deepcopy(config) if getattr(config, "_checked", False) else config.validate()
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
        if isinstance(d, dict) and d.get("unlabeled"):  # a relative source is relative to the file
            d = {**d, "unlabeled": resolve_unlabeled_source(d["unlabeled"], p.parent)}
        return DistillConfig.from_dict(d, source=str(p))
    if isinstance(config, dict):
        if "distill" in config:
            config = config["distill"]
        return DistillConfig.from_dict(config)
    raise ConfigError(f"config must be a DistillConfig, a dict or a YAML path, got {type(config).__name__}")
