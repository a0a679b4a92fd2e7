"""`detkd sweep CONFIG.yaml --space KEY=V1,V2 ... --trials N --epochs E`: search distillation knobs with Optuna.

Each trial is a short ``detkd train`` run: the base config with the trial's values and ``epochs=E`` is written to
``OUT/trials/trial_NNN.yaml`` and trained in this process by :func:`detkd.train.train` (so every trial config is one
``detkd train`` accepts as is). After every epoch the student's val mAP50-95 is reported to the Optuna trial from an
Ultralytics ``on_fit_epoch_end`` callback; the pruner (median or successive halving) stops weak trials early by
raising ``optuna.TrialPruned`` out of the trainer.

Search space (``--space``, one item per knob, dotted keys as in ``detkd train`` overrides):

* ``KEY=V1,V2,V3``: these values (YAML-typed: ``1``, ``2.5``, ``true``, ``cwd``); the only form ``grid`` takes.
* ``KEY=LO..HI``: a range, integer when both ends are integers, else float; ``KEY=LO..HI:log`` samples it
  log-uniformly. For ``random`` / ``tpe``.

Samplers: ``grid`` (every combination; the default when every knob is a list), ``random``, ``tpe`` (the default
otherwise). Pruners: ``median`` (Optuna ``MedianPruner``: after ``--startup-trials`` finished trials, a trial whose
best value so far is below the median of the others at the same epoch stops), ``halving`` (``SuccessiveHalvingPruner``)
or ``none``. No trial is pruned before it has run ``--min-epochs`` epochs.

The sweep folder ``OUT`` holds:

* ``study.db``: the Optuna study (SQLite). Rerunning the same command resumes: finished (complete or pruned) trials
  are kept and not redone; a trial that was running when the process ended, or that failed, is retried once per
  rerun with the same values (Optuna's ``RetryFailedTrialCallback``), up to 3 times. A different config, space,
  epochs or metric in an existing folder is refused.
* ``trials/trial_NNN.yaml`` and ``trials/trial_NNN/`` (each trial's config and Ultralytics run).
* ``sweep.md`` / ``sweep.json``: every trial, sorted by val mAP50-95 (best first), rewritten after each trial.
* ``best.yaml``: the base config with the best trial's values (the base config's own epochs, project and name):
  ``detkd train OUT/best.yaml`` trains it.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml

from detkd.errors import ConfigError

__all__ = ["Param", "parse_space", "run_sweep", "SAMPLERS", "PRUNERS", "DEFAULT_METRIC"]

SAMPLERS = ("grid", "random", "tpe")
PRUNERS = ("median", "halving", "none")
DEFAULT_METRIC = "metrics/mAP50-95(B)"
STUDY_NAME = "detkd-sweep"
MAX_RETRY = 3

Report = Callable[[int, float, dict], None]
Runner = Callable[[Path, Report], dict]


# ------------------------------------------------------------------------------------------------------------
# search space
# ------------------------------------------------------------------------------------------------------------
@dataclass
class Param:
    """One knob: ``choices`` (a list) or a ``low..high`` range (``integer`` / ``log``)."""

    name: str
    choices: list | None = None
    low: float | None = None
    high: float | None = None
    integer: bool = False
    log: bool = False

    def suggest(self, trial) -> Any:
        if self.choices is not None:
            return trial.suggest_categorical(self.name, self.choices)
        if self.integer:
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log)
        return trial.suggest_float(self.name, float(self.low), float(self.high), log=self.log)

    def spec(self) -> str:
        if self.choices is not None:
            return f"{self.name}=" + ",".join(_fmt(v) for v in self.choices)
        return f"{self.name}={_fmt(self.low)}..{_fmt(self.high)}" + (":log" if self.log else "")

    def corners(self) -> list:
        """Values to check before the sweep starts (every choice, or both ends of a range)."""
        return list(self.choices) if self.choices is not None else [self.low, self.high]


def _fmt(v: Any) -> str:
    """A value as it would be written in a ``key=value`` override."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def _scalar(text: str, item: str) -> Any:
    try:
        v = yaml.safe_load(text)
    except yaml.YAMLError:
        v = text
    if v is not None and not isinstance(v, (bool, int, float, str)):
        raise ConfigError(f"--space {item}: {text!r} is not a single value (numbers, true/false, null or words)")
    return v


def parse_space(items: list[str]) -> dict[str, Param]:
    """``["distill.logits.weight=1,4,8", "lr0=0.001..0.1:log"]`` -> ``{name: Param}`` (order kept)."""
    space: dict[str, Param] = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--space {item}: expected KEY=V1,V2,... or KEY=LO..HI[:log]")
        name, text = (s.strip() for s in item.split("=", 1))
        if not name or not text:
            raise ConfigError(f"--space {item}: expected KEY=V1,V2,... or KEY=LO..HI[:log]")
        if name in space:
            raise ConfigError(f"--space {item}: '{name}' is given twice")
        if ".." in text:
            log = text.endswith(":log")
            lo_t, _, hi_t = text[: -4 if log else None].partition("..")
            lo, hi = _scalar(lo_t, item), _scalar(hi_t, item)
            if any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in (lo, hi)):
                raise ConfigError(f"--space {item}: a range needs two numbers, LO..HI")
            if not lo < hi:
                raise ConfigError(f"--space {item}: LO must be below HI")
            if log and lo <= 0:
                raise ConfigError(f"--space {item}: a :log range needs LO > 0")
            space[name] = Param(name, low=lo, high=hi, integer=isinstance(lo, int) and isinstance(hi, int), log=log)
        else:
            choices = [_scalar(t.strip(), item) for t in text.split(",")]
            if any(t.strip() == "" for t in text.split(",")):
                raise ConfigError(f"--space {item}: empty value in the list")
            if len(set(map(repr, choices))) != len(choices):
                raise ConfigError(f"--space {item}: a value is listed twice")
            space[name] = Param(name, choices=choices)
    if not space:
        raise ConfigError("--space: give at least one KEY=V1,V2,... to search")
    return space


def _set(cfg: dict, dotted: str, value: Any) -> None:
    """``detkd train`` override semantics (:func:`detkd.train.apply_overrides`) for an already-typed value."""
    parts = dotted.split(".")
    d = cfg
    for p in parts[:-1]:
        if not isinstance(d.get(p), dict):
            d[p] = {}
        d = d[p]
    d[parts[-1]] = value


# ------------------------------------------------------------------------------------------------------------
# the default trial runner: detkd train in this process, val mAP reported from an Ultralytics callback
# ------------------------------------------------------------------------------------------------------------
def train_runner(metric: str = DEFAULT_METRIC) -> Runner:
    """A runner that trains ``cfg_path`` with :func:`detkd.train.train` and reports ``metric`` after every epoch.

    ``report(epoch, value, extra)`` may raise ``optuna.TrialPruned``; it propagates out of Ultralytics' trainer
    (after the data loaders are closed), which ends the run.
    """

    def run(cfg_path: Path, report: Report) -> dict:
        from detkd.train import load_train_config, train

        cfg = load_train_config(cfg_path)
        seen: dict = {}

        def on_train_epoch_end(trainer):
            seen["epoch"] = trainer.epoch

        def on_fit_epoch_end(trainer):
            if seen.pop("epoch", None) != trainer.epoch:  # the final validation of best.pt calls it once more
                return
            m = trainer.metrics or {}
            if metric not in m:
                return
            extra = {"save_dir": str(trainer.save_dir), "epochs": int(trainer.epochs)}
            if m.get("kd/gap") is not None:
                extra["gap"] = float(m["kd/gap"])
            try:
                report(int(trainer.epoch) + 1, float(m[metric]), extra)
            except BaseException:
                for loader in (getattr(trainer, "train_loader", None), getattr(trainer, "test_loader", None)):
                    if hasattr(loader, "close"):
                        loader.close()
                raise

        save_dir = train(cfg, callbacks={"on_train_epoch_end": on_train_epoch_end,
                                         "on_fit_epoch_end": on_fit_epoch_end})
        return {"save_dir": str(save_dir)}

    return run


# ------------------------------------------------------------------------------------------------------------
# the sweep
# ------------------------------------------------------------------------------------------------------------
class _FolderLock:
    """One sweep process per folder (so a trial found RUNNING at start is one whose process has ended)."""

    def __init__(self, path: Path):
        self.path, self.f = path, None

    def __enter__(self):
        self.f = open(self.path, "a+")
        try:
            import fcntl

            fcntl.flock(self.f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # not POSIX: no lock
            pass
        except OSError:
            self.f.close()
            raise ConfigError(f"another detkd sweep is running in {self.path.parent} (lock {self.path})") from None
        return self

    def __exit__(self, *exc):
        self.f.close()


def _abs_paths(cfg: dict) -> dict:
    """Paths that exist relative to where the sweep runs become absolute (trial configs live elsewhere)."""
    for k in ("teacher", "student", "data"):
        v = cfg.get(k)
        if isinstance(v, str) and not Path(v).is_absolute() and Path(v).exists():
            cfg[k] = str(Path(v).resolve())
    return cfg


def _check_point(base: dict, values: dict, what: str) -> None:
    from detkd.train import prepare

    cfg = copy.deepcopy(base)
    for k, v in values.items():
        _set(cfg, k, v)
    cfg["_source"] = what
    try:
        prepare(cfg)
    except ConfigError as e:
        if str(e).startswith(what):
            raise
        raise ConfigError(f"{what}: {e}") from None


def _make_sampler(name: str, space: dict[str, Param], seed: int, n_before: int = 0):
    """The grid keeps ``seed`` (its grid ids must mean the same points on resume); random / TPE continue with
    ``seed + n_before`` (a resumed sweep must not replay the first run's draws)."""
    import optuna

    if name == "grid":
        ranges = [p.spec() for p in space.values() if p.choices is None]
        if ranges:
            raise ConfigError(f"--sampler grid needs a list of values for every knob; {', '.join(ranges)} is a range "
                              "(list the values, or use --sampler random / tpe)")
        return optuna.samplers.GridSampler({p.name: p.choices for p in space.values()}, seed=seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed + n_before)
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed + n_before)
    raise ConfigError(f"--sampler {name!r}: choose from {', '.join(SAMPLERS)}")


def _make_pruner(name: str, min_epochs: int, startup_trials: int):
    import optuna

    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=startup_trials, n_warmup_steps=min_epochs)
    if name == "halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=max(1, min_epochs), reduction_factor=3)
    if name == "none":
        return optuna.pruners.NopPruner()
    raise ConfigError(f"--pruner {name!r}: choose from {', '.join(PRUNERS)}")


def _rows(study, space: dict[str, Param], metric: str) -> list[dict]:
    from optuna.trial import TrialState

    rows = []
    for t in study.get_trials(deepcopy=False):
        iv = t.intermediate_values
        if t.state == TrialState.COMPLETE:
            value = t.value
        else:
            value = max(iv.values()) if iv else None
        best_epoch = max(iv, key=iv.get) if iv else None
        ua = t.user_attrs
        rows.append({
            "trial": t.number,
            "state": t.state.name.lower(),
            "value": None if value is None or not math.isfinite(value) else float(value),
            "best_epoch": best_epoch,
            "epochs_run": max(iv) if iv else 0,
            "epochs": ua.get("epochs"),
            "gap": ua.get("gap"),
            "params": {k: t.params[k] for k in space if k in t.params},
            "seconds": ua.get("seconds"),
            "config": ua.get("config"),
            "run": ua.get("save_dir"),
            "retry_of": t.system_attrs.get("failed_trial"),
            "error": ua.get("error"),
        })
    order = {"complete": 0, "pruned": 1, "running": 2, "waiting": 3, "fail": 4}
    rows.sort(key=lambda r: (r["value"] is None, -(r["value"] or 0.0), order.get(r["state"], 5), r["trial"]))
    return rows


def _label(metric: str) -> str:
    """``metrics/mAP50-95(B)`` -> ``val mAP50-95``."""
    return "val " + metric[8:-3] if metric.startswith("metrics/") and metric.endswith("(B)") else metric


def _markdown(rows: list[dict], space: dict[str, Param], metric: str, header: str) -> str:
    names = list(space)
    cols = ["rank", "trial", "state", _label(metric), "best epoch", "epochs", "gap", *names, "seconds"]
    lines = [header, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for i, r in enumerate(rows, 1):
        state = r["state"]
        if r["retry_of"] is not None:
            state += f" (retry of {r['retry_of']})"
        if r["error"] and r["state"] == "fail":
            state += f": {r['error'][:80]}"
        cells = [str(i), str(r["trial"]), state, "-" if r["value"] is None else f"{r['value']:.4f}",
                 "-" if r["best_epoch"] is None else str(r["best_epoch"]),
                 f"{r['epochs_run']}/{r['epochs'] or '?'}", "-" if r["gap"] is None else f"{r['gap']:+.4f}",
                 *[_fmt(r["params"][n]) if n in r["params"] else "-" for n in names],
                 "-" if r["seconds"] is None else f"{r['seconds']:.0f}"]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def _write_results(out: Path, study, space, metric, info: dict, base: dict) -> dict | None:
    rows = _rows(study, space, metric)
    best = next((r for r in rows if r["value"] is not None and r["state"] == "complete"), None)
    best = best or next((r for r in rows if r["value"] is not None), None)
    header = (f"# detkd sweep: {info['config']}\n\nspace: {' '.join(info['space'])}; {info['epochs']} epochs per "
              f"trial; sampler {info['sampler']}, pruner {info['pruner']}; "
              f"sorted by {_label(metric)} (at its best epoch); "
              f"gap: teacher minus student mAP50-95 at the last epoch run")
    _atomic_write(out / "sweep.md", _markdown(rows, space, metric, header))
    _atomic_write(out / "sweep.json", json.dumps({"sweep": info, "metric": metric, "best": best, "trials": rows},
                                                 indent=1, default=str))
    if best is not None:
        cfg = copy.deepcopy(base)
        cfg.pop("_source", None)
        for k, v in best["params"].items():
            _set(cfg, k, v)
        head = (f"# detkd sweep {out}: best trial {best['trial']} ({best['state']}), "
                f"{_label(metric)} {best['value']:.4f} "
                f"after {best['best_epoch']} of {best['epochs']} epochs.\n# {info['config']} with "
                + " ".join(f"{k}={_fmt(v)}" for k, v in best["params"].items())
                + f"; epochs, project and name are the base config's. Train it: detkd train {out / 'best.yaml'}\n")
        _atomic_write(out / "best.yaml", head + yaml.safe_dump(cfg, sort_keys=False))
    return best


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def run_sweep(config: str | Path, space: dict[str, Param] | list[str], *, overrides: list[str] | None = None,
              trials: int | None = None, epochs: int | None = None, sampler: str | None = None,
              pruner: str = "median", out: str | Path | None = None, seed: int = 0, metric: str = DEFAULT_METRIC,
              min_epochs: int = 1, startup_trials: int = 2, runner: Runner | None = None,
              log: Callable[[str], None] = print) -> dict:
    """Run (or resume) a sweep; returns ``{"out", "best", "trials", "counts"}``. See the module docstring.

    ``runner(cfg_path, report)`` trains one trial config and calls ``report(epoch, value, extra)`` after each
    epoch (default: :func:`train_runner`, a real ``detkd train`` run); tests pass scripted runners.
    """
    try:
        import optuna
    except ImportError:
        raise ConfigError("detkd sweep needs Optuna: pip install -c constraints.txt optuna") from None
    from optuna.storages import RDBStorage
    from optuna.trial import TrialState

    from detkd.train import load_train_config

    if not isinstance(space, dict):
        space = parse_space(list(space))
    if trials is not None and trials < 1:
        raise ConfigError(f"--trials must be >= 1, got {trials}")
    if epochs is not None and epochs < 1:
        raise ConfigError(f"--epochs must be >= 1, got {epochs}")
    if min_epochs < 0 or startup_trials < 0:
        raise ConfigError("--min-epochs and --startup-trials must be >= 0")
    sampler = sampler or ("grid" if all(p.choices is not None for p in space.values()) else "tpe")
    if sampler not in SAMPLERS:
        raise ConfigError(f"--sampler {sampler!r}: choose from {', '.join(SAMPLERS)}")
    if pruner not in PRUNERS:
        raise ConfigError(f"--pruner {pruner!r}: choose from {', '.join(PRUNERS)}")
    _make_sampler(sampler, space, seed)  # validates grid vs. ranges before anything is written
    grid_size = math.prod(len(p.choices) for p in space.values()) if sampler == "grid" else None
    target = trials or grid_size or 20

    base = _abs_paths(load_train_config(config, list(overrides or [])))
    source = base.pop("_source")
    base.pop("resume", None)
    epochs = int(epochs or base.get("epochs") or 100)
    out = Path(out) if out else Path("runs") / "sweep" / Path(str(config)).stem
    info = {"config": str(config), "overrides": list(overrides or []), "space": [p.spec() for p in space.values()],
            "epochs": epochs, "metric": metric}
    identity = json.loads(json.dumps({**info, "base": base}, default=str))

    # Every value of every knob is checked (config keys, methods, teacher, data) before anything trains.
    _check_point(base, {}, source)
    for p in space.values():
        for v in p.corners():
            _check_point(base, {p.name: v}, f"--space {p.name}={_fmt(v)}")

    out.mkdir(parents=True, exist_ok=True)
    trials_dir = (out / "trials").resolve()
    trials_dir.mkdir(exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    runner = runner or train_runner(metric)
    with _FolderLock(out / ".lock"):
        storage = RDBStorage(f"sqlite:///{(out / 'study.db').resolve()}")
        existing = [s for s in optuna.get_all_study_summaries(storage) if s.study_name == STUDY_NAME]
        n_before = existing[0].n_trials if existing else 0
        study = optuna.create_study(study_name=STUDY_NAME, storage=storage, direction="maximize",
                                    sampler=_make_sampler(sampler, space, seed, n_before),
                                    pruner=_make_pruner(pruner, min_epochs, startup_trials), load_if_exists=True)
        saved = study.user_attrs.get("detkd_sweep")
        if saved is None:
            study.set_user_attr("detkd_sweep", identity)
        elif saved != identity:
            diff = [k for k in ("config", "overrides", "space", "epochs", "metric", "base")
                    if saved.get(k) != identity.get(k)]
            raise ConfigError(f"{out} holds a sweep with a different {', '.join(diff)}; rerun the same command to "
                              "resume it, or pass another --out")

        # Resume: a trial still RUNNING belongs to a process that ended (we hold the folder lock): it failed.
        all_trials = study.get_trials(deepcopy=False)
        for t in all_trials:
            if t.state == TrialState.RUNNING:
                storage.set_trial_user_attr(t._trial_id, "error", "interrupted: the sweep process ended during it")
                storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        all_trials = study.get_trials(deepcopy=False)
        retried = {n for t in all_trials for n in t.system_attrs.get("retry_history", [])}
        waiting = sum(t.state == TrialState.WAITING for t in all_trials)
        for t in all_trials:
            if t.state == TrialState.FAIL and t.number not in retried and t.params:
                history = [*t.system_attrs.get("retry_history", []), t.number]
                if len(history) > MAX_RETRY:
                    continue
                # What Optuna's RetryFailedTrialCallback does: the same values (and grid point) as a waiting trial.
                study.add_trial(optuna.trial.create_trial(
                    state=TrialState.WAITING, params=t.params, distributions=t.distributions, user_attrs=t.user_attrs,
                    system_attrs={**t.system_attrs, "failed_trial": t.number, "retry_history": history}))
                log(f"detkd sweep: trial {t.number} did not finish ({t.user_attrs.get('error') or 'failed'}); "
                    f"retrying its values")
        finished = [t for t in study.get_trials(deepcopy=False) if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
        remaining = max(0, target - len(finished))
        if grid_size is not None:
            remaining = min(remaining, max(0, grid_size - len(finished)))
        if n_before:
            log(f"detkd sweep: resuming {out}: {len(finished)} trials finished, {remaining} to run"
                + (f" ({waiting} already queued)" if waiting else ""))
        else:
            log(f"detkd sweep: {out}: {remaining} trials of {epochs} epochs, sampler {sampler}, pruner {pruner}; "
                f"space {' '.join(info['space'])}")
        run_info = {**info, "sampler": sampler, "pruner": pruner, "trials": target, "out": str(out)}
        counter = {"i": 0}

        def objective(trial) -> float:
            counter["i"] += 1
            params = {name: p.suggest(trial) for name, p in space.items()}
            name = f"trial_{trial.number:03d}"
            cfg = copy.deepcopy(base)
            for k, v in params.items():
                _set(cfg, k, v)
            cfg.setdefault("plots", False)
            cfg.update(epochs=epochs, val=True, project=str(trials_dir), name=name, exist_ok=True)
            for k in ("error", "gap", "save_dir", "seconds"):  # a retry inherits the failed trial's attributes
                trial.set_user_attr(k, None)
            path = trials_dir / f"{name}.yaml"
            _atomic_write(path, f"# detkd sweep {out}, trial {trial.number}\n" + yaml.safe_dump(cfg, sort_keys=False))
            trial.set_user_attr("config", str(path))
            trial.set_user_attr("epochs", epochs)
            log(f"detkd sweep: trial {trial.number} ({counter['i']}/{remaining}): "
                + " ".join(f"{k}={_fmt(v)}" for k, v in params.items()))
            t0 = time.time()
            values: dict[int, float] = {}

            def report(epoch: int, value: float, extra: dict) -> None:
                values[epoch] = value
                for k in ("save_dir", "gap"):
                    if k in extra:
                        trial.set_user_attr(k, extra[k])
                trial.report(value, epoch)
                if trial.should_prune():
                    trial.set_user_attr("seconds", time.time() - t0)
                    raise optuna.TrialPruned(f"epoch {epoch}: {metric} {value:.4f} is below the {pruner} pruner's bar")

            try:
                res = runner(path, report)
            except optuna.TrialPruned:
                raise
            except BaseException as e:
                trial.set_user_attr("error", (f"{type(e).__name__}: {e}" if str(e) else type(e).__name__)[:500])
                trial.set_user_attr("seconds", time.time() - t0)
                raise
            trial.set_user_attr("seconds", time.time() - t0)
            if res and res.get("save_dir"):
                trial.set_user_attr("save_dir", res["save_dir"])
            if not values:
                raise ConfigError(f"trial {trial.number}: no {metric} was reported (is validation on?)")
            return max(values.values())

        def after_trial(study_, t) -> None:
            iv = t.intermediate_values
            best_v = (t.value if t.state == TrialState.COMPLETE else max(iv.values()) if iv else None)
            what = {TrialState.COMPLETE: "complete", TrialState.PRUNED: f"pruned after epoch {max(iv) if iv else 0}",
                    TrialState.FAIL: "failed"}.get(t.state, t.state.name.lower())
            best = _write_results(out, study_, space, metric, run_info, base)
            msg = f"detkd sweep: trial {t.number} {what}"
            if best_v is not None:
                msg += f", {_label(metric)} {best_v:.4f}"
            if t.state == TrialState.FAIL and t.user_attrs.get("error"):
                msg += f" ({t.user_attrs['error'][:200]})"
            if best is not None:
                msg += f"; best so far: trial {best['trial']} ({best['value']:.4f})"
            log(msg)

        try:
            if remaining:
                study.optimize(objective, n_trials=remaining, catch=(Exception,), callbacks=[after_trial],
                               gc_after_trial=True)
        finally:
            best = _write_results(out, study, space, metric, run_info, base)
        rows = _rows(study, space, metric)
    counts = {s: sum(r["state"] == s for r in rows) for s in ("complete", "pruned", "fail")}
    log(f"detkd sweep: {len(rows)} trials in {out}: {counts['complete']} complete, {counts['pruned']} pruned, "
        f"{counts['fail']} failed")
    log(_markdown(rows[:10], space, metric, "").strip())
    if best is not None:
        log(f"best: trial {best['trial']}, {_label(metric)} {best['value']:.4f}: "
            + " ".join(f"{k}={_fmt(v)}" for k, v in best["params"].items()))
        log(f"written: {out / 'sweep.md'}, {out / 'sweep.json'}, {out / 'best.yaml'} "
            f"(train it: detkd train {out / 'best.yaml'})")
    return {"out": out, "best": best, "trials": rows, "counts": counts}
