"""`detkd train CONFIG.yaml [key=value ...]`: checks everything, then runs Ultralytics' trainer with detkd.

``framework: torchvision`` configs go to :mod:`detkd.integrations.torchvision_train` instead (its own loop; see there).

A config names ``teacher`` (.pt: an Ultralytics checkpoint, or a ``framework: torchvision`` run's ``last.pt`` /
``best.pt``, a cross-family teacher; with ``distill.mode: online`` also a model yaml trained alongside, with
``distill.mode: self`` none), ``student`` (.yaml or .pt), ``data`` (an Ultralytics data yaml, a COCO folder or
``{train: a.json, val: b.json}``, or a VOC root: converted and cached by `detkd.data.resolve`), a
``distill:`` block (see ``configs/``; without one, :data:`detkd.integrations.recipes.DEFAULT_RECIPE`), optional
``threads`` (torch CPU threads), and any Ultralytics train argument (``epochs``, ``imgsz``, ``batch``, ``device``,
``project``, ``name``, ...). ``key=value`` overrides use Ultralytics' style; nested distill keys use dots:
``distill.logits.weight=2`` (on a config without ``distill:``, they change the recipe).

The ``distill:`` block is parsed once (:meth:`detkd.config.DistillConfig.from_dict`, the same schema as a plain
``Distiller``'s, ``features: auto`` included) and handed to ``DistillTrainer`` as it is; the trainer writes it, every
default filled in, to ``<run>/distill.yaml`` beside Ultralytics' ``args.yaml``.

Every check that can fail runs before the first epoch and fails with one clear message: missing or unreadable
teacher, a teacher that is not a detection model, class-count mismatch, unknown keys or methods, a data yaml
pointing at missing folders.
"""

from __future__ import annotations

import copy
import difflib
import os
from pathlib import Path
from typing import Any

import yaml

from detkd.errors import ConfigError, DataError
from detkd.integrations.recipes import DEFAULT_RECIPE
from detkd.integrations.ultralytics_env import ensure_ultralytics_offline

DETKD_KEYS = {"teacher", "student", "distill", "threads", "framework"}


def _parse_value(v: str) -> Any:
    try:
        return yaml.safe_load(v)
    except yaml.YAMLError:
        return v


def apply_overrides(cfg: dict, overrides: list[str]) -> dict:
    """Apply ``key=value`` / ``a.b.c=value`` overrides to a nested dict (in place; returns it)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}': expected key=value")
        key, val = item.split("=", 1)
        parts = key.strip().split(".")
        d = cfg
        for p in parts[:-1]:
            if not isinstance(d.get(p), dict):
                d[p] = {}
            d = d[p]
        d[parts[-1]] = _parse_value(val)
    return cfg


def load_train_config(path: str | Path, overrides: list[str] | None = None) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        cfg = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML ({e})") from e
    if not isinstance(cfg, dict):
        raise ConfigError(f"{p}: expected a mapping of keys at the top level")
    recipe = cfg.get("distill") is None
    if recipe:  # the recipe is the block: overrides change it rather than replace it
        if cfg.get("framework") == "torchvision":
            from detkd.integrations.torchvision_train import default_recipe

            cfg["distill"] = default_recipe(cfg)
        else:
            cfg["distill"] = copy.deepcopy(DEFAULT_RECIPE)
    apply_overrides(cfg, overrides or [])
    base = p.parent.resolve()
    for k in ("teacher", "student", "data"):  # paths relative to the config file, when that file exists
        v = cfg.get(k)
        if isinstance(v, str) and not Path(v).is_absolute() and (base / v).exists():
            cfg[k] = str(base / v)
    if isinstance(cfg.get("data"), dict):  # data: {train: a.json, val: b.json}: relative to the config file too
        cfg["data"] = {s: str(base / v) if isinstance(v, str) and not Path(v).is_absolute() and (base / v).exists()
                       else v for s, v in cfg["data"].items()}
    if isinstance(cfg.get("distill"), dict) and cfg["distill"].get("unlabeled"):  # distill.unlabeled.source too
        from detkd.config import resolve_unlabeled_source

        cfg["distill"]["unlabeled"] = resolve_unlabeled_source(cfg["distill"]["unlabeled"], base)
    if recipe and cfg.get("framework", "ultralytics") == "ultralytics":  # a torchvision teacher: l1_giou, not ld
        from detkd.integrations.cross_family import cross_family_recipe

        cfg["distill"] = cross_family_recipe(cfg.get("teacher"), cfg["distill"])
    cfg["_source"] = str(p)
    return cfg


def _check_keys(cfg: dict, source: str) -> None:
    ensure_ultralytics_offline()
    from ultralytics.utils import DEFAULT_CFG_KEYS

    valid = set(DEFAULT_CFG_KEYS) | DETKD_KEYS
    for k in cfg:
        if k.startswith("_"):
            continue
        if k not in valid:
            close = difflib.get_close_matches(k, sorted(valid), n=1, cutoff=0.6)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"{source}: unknown key '{k}'{hint}")
    self_mode = isinstance(cfg.get("distill"), dict) and cfg["distill"].get("mode") == "self"  # no teacher
    for k in ("student", "data") if self_mode else ("teacher", "student", "data"):
        if not cfg.get(k):
            hint = " (a teacher .pt; distill.mode: online takes a model yaml, distill.mode: self none)" * (k == "teacher")
            raise ConfigError(f"{source}: missing key '{k}'{hint}")
    if cfg.get("distill_model"):
        raise ConfigError(f"{source}: 'distill_model' is set by detkd from 'teacher' and 'distill'; remove it")


def _check_numbers(cfg: dict, source: str) -> None:
    """Top-level (Ultralytics) numbers: numeric strings (YAML 1.1 reads 1e-3 as a string) become floats for float
    arguments; NaN / inf are refused; then Ultralytics' own type and range checks run now, as one ConfigError."""
    import math

    from detkd.config import _NUMBER

    ensure_ultralytics_offline()
    from ultralytics.cfg import CFG_FLOAT_KEYS, CFG_FRACTION_KEYS, get_cfg

    for k, v in list(cfg.items()):
        if k.startswith("_") or k in DETKD_KEYS:
            continue
        if k in CFG_FLOAT_KEYS | CFG_FRACTION_KEYS and isinstance(v, str) and _NUMBER.fullmatch(v.strip()):
            cfg[k] = v = float(v)
        bad = isinstance(v, float) and not math.isfinite(v)
        if bad or (isinstance(v, str) and v.strip().lower().lstrip("+-.") in ("nan", "inf", "infinity")):
            raise ConfigError(f"{source}: {k}: must be a finite number, got {v!r}")
    args = {k: v for k, v in cfg.items() if k not in DETKD_KEYS and not k.startswith("_")}
    try:
        get_cfg(overrides=args)
    except (TypeError, ValueError, SyntaxError) as e:
        raise ConfigError(f"{source}: {' '.join(str(e).split())}") from None


def check_data_yaml(data: str | Path) -> dict:
    """Check an Ultralytics data yaml: file exists, names present, train/val folders exist. Returns it."""
    p = Path(data)
    if p.is_dir():
        raise DataError(f"data: {p} is a folder; give its data yaml (detkd train converts COCO / VOC folders itself)")
    if not p.is_file():
        raise DataError(f"data: file not found: {p}")
    try:
        d = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise DataError(f"data: {p} is not valid YAML ({e})") from e
    if "names" not in d:
        raise DataError(f"data: {p} has no 'names' (class names)")
    root = Path(d.get("path") or p.parent)
    if not root.is_absolute():
        root = (p.parent / root).resolve()
    for split in ("train", "val"):
        if split not in d:
            raise DataError(f"data: {p} has no '{split}' entry")
        entries = d[split] if isinstance(d[split], list) else [d[split]]
        for e in entries:
            q = Path(e) if Path(e).is_absolute() else root / e
            if not q.exists():
                raise DataError(f"data: {p}: {split} path '{e}' resolves to {q}, which does not exist")
    if d.get("download"):
        raise DataError(f"data: {p} has a 'download' key; detkd never downloads. Remove it and provide the files")
    names = d["names"]
    d["_nc"] = len(names)
    return d


def prepare(cfg: dict) -> tuple[str, dict, Any]:
    """Validate a train config. Returns ``(student, train_args, distill)``: ``distill`` is the parsed
    :class:`~detkd.config.DistillConfig`, also in ``train_args['distill_model']`` with the teacher's path."""
    ensure_ultralytics_offline()
    source = cfg.get("_source", "config")
    _check_keys(cfg, source)
    _check_numbers(cfg, source)
    from detkd.config import DistillConfig
    from detkd.integrations import ultralytics as ul

    raw = cfg.get("distill")
    distill = DistillConfig.from_dict(copy.deepcopy(DEFAULT_RECIPE) if raw is None else raw, source=source)
    teacher_path = ul.check_teacher_spec(cfg.get("teacher"), distill.mode)  # distill.mode online / self: see there
    teacher = ul.load_teacher(teacher_path) if teacher_path and not teacher_path.endswith((".yaml", ".yml")) else None
    from detkd.data.resolve import as_ultralytics_data

    data_yaml = as_ultralytics_data(cfg["data"])  # a COCO / VOC source: validated, converted, cached
    data = check_data_yaml(data_yaml)
    t_nc = ul.num_classes(teacher) if teacher is not None else data["_nc"]
    if t_nc != data["_nc"]:
        raise ConfigError(
            f"teacher {teacher_path} predicts {t_nc} classes but data {cfg['data']} has {data['_nc']}; "
            "train the teacher on this dataset (same names, same order)"
        )
    student = str(cfg["student"])
    if student.endswith(".pt") and not Path(student).is_file():
        raise ConfigError(f"student: file not found: {student} (use a model .yaml such as yolov8n.yaml to start from scratch)")
    if student.endswith(".pt"):
        from detkd.checkpoints import check_checkpoint

        check_checkpoint(student, "student")
    ul.check_student(student)  # unloadable, or a segment / pose / obb / classify model: refused now, not after an epoch
    if isinstance(cfg.get("resume"), str) and cfg["resume"].endswith(".pt"):
        from detkd.checkpoints import check_checkpoint

        check_checkpoint(cfg["resume"], "resume")
    if distill.unlabeled is not None and cfg.get("rect"):
        raise ConfigError(f"{source}: distill.unlabeled does not work with rect=True (rectangular batches are "
                          "ordered by image shape, mixed batches by the labeled/unlabeled plan): drop rect")
    args = {k: v for k, v in cfg.items() if k not in DETKD_KEYS and not k.startswith("_")}
    if teacher_path is not None and Path(teacher_path).is_file():
        teacher_path = str(Path(teacher_path).resolve())
    args["distill_model"] = {"teacher": teacher_path, "distill": distill}
    args["data"] = str(data_yaml)
    return student, args, distill


def resolve_resume(args: dict, source: str = "config") -> dict:
    """``resume`` among the train args (in place; returns them). ``True`` resumes the run that ``project`` / ``name``
    name from its ``weights/last.pt``; a path resumes that checkpoint. A missing checkpoint or a finished run is one
    ConfigError, before any run folder is made; a resumable one is said in one line."""
    r = args.get("resume")
    if r is None or r is False or (isinstance(r, str) and r.strip().lower() in ("", "false")):
        return args
    from detkd.integrations import ultralytics as ul

    if r is True or (isinstance(r, str) and r.strip().lower() == "true"):
        from types import SimpleNamespace

        from ultralytics.cfg import get_save_dir

        run = get_save_dir(SimpleNamespace(project=args.get("project"), name=args.get("name"), task="detect",
                                           mode="train", exist_ok=True, save_dir=None))
        last = run / "weights" / "last.pt"
        if not last.is_file():
            raise ConfigError(f"{source}: resume=True: nothing to resume in {run} ({last} not found); set project= "
                              "and name= to the run to resume, pass resume=path/to/last.pt, or drop resume to start a "
                              "new run")
    else:
        last = Path(str(r))
    ckpt = ul.check_resumable(last)
    total = (ckpt.get("train_args") or {}).get("epochs", "?")
    print(f"detkd train: resuming {last.parent.parent} from {last}: epoch {ckpt['epoch'] + 2} of {total}", flush=True)
    args["resume"] = str(last)
    return args


def train(cfg: dict, callbacks: dict | None = None) -> Path:
    """Run distillation training. Returns the run's save directory.

    ``callbacks``: optional ``{event: fn}`` Ultralytics callbacks added to the run (``detkd sweep`` uses
    ``on_train_epoch_end`` / ``on_fit_epoch_end`` to report each epoch's val mAP to its pruner).
    ``framework: torchvision`` runs :func:`detkd.integrations.torchvision_train.train` instead (its own callbacks).
    """
    framework = cfg.get("framework", "ultralytics")
    if framework == "torchvision":
        from detkd.integrations.torchvision_train import train as train_torchvision

        return train_torchvision(cfg, callbacks)
    if framework != "ultralytics":
        raise ConfigError(f"{cfg.get('_source', 'config')}: framework: ultralytics (default) or torchvision, got "
                          f"{framework!r}")
    student, args, _ = prepare(cfg)
    resolve_resume(args, cfg.get("_source", "config"))
    if cfg.get("threads"):
        os.environ["DETKD_THREADS"] = str(int(cfg["threads"]))
    from ultralytics import YOLO

    from detkd.integrations.ultralytics import DistillTrainer

    model = YOLO(student, task="detect")
    for event, fn in (callbacks or {}).items():
        model.add_callback(event, fn)
    model.train(trainer=DistillTrainer, **args)
    return Path(model.trainer.save_dir)
