"""The before/after report of a distillation run: teacher, baseline student, distilled student.

`build_report` takes one `ModelEntry` per model (its `evaluate_coco` metrics, size, speed and training
log) and writes into ``out_dir``:

* ``report.md`` and ``report.html`` (self-contained: inline CSS, PNGs as base64 ``data:`` URIs, no
  scripts, fonts or links), in this order: title, the headline in a callout, the model table, the
  per-class AP table, the plots, the method and setup notes;
* ``report.json``: every number shown (fractions, as pycocotools reports them; NaN is ``null``);
* the PNGs: PR curves at IoU 0.5 per class, per-class AP bars, mAP vs CPU latency (vs parameters when no
  latency is given) and the training curves read from Ultralytics ``results.csv`` files.

Headline: ``student mAP50-95 X -> Y (+d), teacher Z, gap closed P%`` with mAP in percent (one decimal)
and ``d`` the difference of the two shown values, plus the CPU latency of the student and the teacher
when given. Gap closed is ``(AP_distilled - AP_baseline) / (AP_teacher - AP_baseline)`` on mAP50-95;
it is undefined ("n/a", ``null``) when the teacher is not better than the baseline.

Per-class deltas are ``distilled - baseline``; a class that a model leaves undefined (NaN: no ground
truth) shows as "n/a" and gets no delta.
"""

from __future__ import annotations

import base64
import csv
import datetime as _dt
import html
import json
import math
import os
import platform
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from detkd.bench.info import _count_gflops, model_info  # noqa: F401  (re-exported: report users import it here)
from detkd.bench.info import format_gflops
from detkd.bench.noise import NOISY_TEXT, noise_line
from detkd.errors import ConfigError, DataError
from detkd.eval.coco import STAT_NAMES, _jsonable

__all__ = ["ROLES", "ModelEntry", "build_report", "report_from_spec", "load_metrics", "read_results_csv", "model_info",
           "gap_closed"]

#: Roles a model can play; "other" is for extra recipes shown next to the three main models.
ROLES: tuple[str, ...] = ("teacher", "baseline", "distilled", "other")

PathLike = str | os.PathLike
NA = "n/a"  # undefined number (NaN, or pycocotools' -1 "no ground truth in this area range")
MISSING = "–"  # not provided


@dataclass
class ModelEntry:
    """One model of the report.

    Attributes:
        role: "teacher", "baseline", "distilled" or "other".
        name: label used in tables and plots (unique within a report).
        metrics: an `evaluate_coco` dict, or the path of the JSON `write_metrics_json` wrote from one.
        weights: the checkpoint path; its file size is reported (MB, 10^6 bytes).
        params: parameter count. gflops: GFLOPs at the evaluation image size.
        latency_ms: ``detkd bench`` output, e.g. ``{"p50", "p95", "threads", "cpu", "imgsz", "engine"}``.
        results_csv: the Ultralytics training log (``results.csv``) for the training-curve plot.
        size_mb: file size when there is no ``weights`` file to measure.
    """

    role: str
    name: str
    metrics: Mapping[str, Any] | PathLike
    weights: PathLike | None = None
    params: int | None = None
    gflops: float | None = None
    latency_ms: Mapping[str, Any] | None = None
    results_csv: PathLike | None = None
    size_mb: float | None = None

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ConfigError(f"ModelEntry role must be one of {ROLES}, got {self.role!r} (model {self.name!r})")
        if not str(self.name).strip():
            raise ConfigError("ModelEntry needs a non-empty name")


# ----------------------------------------------------------------------------------------------- inputs


def _num(x: Any) -> float:
    """A metric as a float; None (JSON null) and non-numbers become NaN."""
    if x is None or isinstance(x, bool):
        return float("nan")
    try:
        return float(x)
    except (TypeError, ValueError):
        return float("nan")


def _defined(x: float | None) -> bool:
    """pycocotools marks "no ground truth" with -1; NaN is "undefined" too."""
    return x is not None and math.isfinite(x) and x >= 0


def load_metrics(src: Mapping[str, Any] | PathLike) -> dict:
    """An `evaluate_coco` dict, from memory or from its JSON, in one form: the 12 stats as floats (NaN for
    null), ``per_class`` ``{name: {"AP", "AP50"}}`` and ``pr`` with numpy arrays (``None`` when absent or
    inconsistent), plus ``engine``, ``num_images``, ``num_detections`` when present."""
    if isinstance(src, (str, os.PathLike)):
        p = Path(src)
        if not p.is_file():
            raise DataError(f"metrics json not found: {p}")
        try:
            d = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise DataError(f"metrics json {p} is not valid JSON: {e}") from e
    elif isinstance(src, Mapping):
        d = src
    else:
        raise DataError(f"metrics must be an evaluate_coco dict or a JSON path, got {type(src).__name__}")
    if "AP" not in d:
        raise DataError("metrics has no 'AP': expected the dict evaluate_coco returns (or its JSON)")
    out: dict[str, Any] = {k: _num(d.get(k)) for k in STAT_NAMES}
    out["per_class"] = {
        str(n): {"AP": _num(v.get("AP")), "AP50": _num(v.get("AP50"))} for n, v in (d.get("per_class") or {}).items()
    }
    out["pr"] = None
    pr = d.get("pr")
    if isinstance(pr, Mapping) and pr.get("precision50") is not None and pr.get("class_names") is not None:
        names = [str(n) for n in pr["class_names"]]
        rec = np.asarray(pr.get("rec_thrs", np.linspace(0, 1, 101)), dtype=np.float64)
        p50 = np.asarray(pr["precision50"], dtype=np.float64)  # JSON nulls -> NaN
        if p50.ndim == 2 and p50.shape == (len(names), rec.size):
            out["pr"] = {"class_names": names, "rec_thrs": rec, "precision50": p50}
    for k in ("engine", "num_images", "num_detections"):
        if k in d:
            out[k] = d[k]
    return out


def read_results_csv(path: PathLike) -> dict[str, np.ndarray]:
    """An Ultralytics ``results.csv`` as ``{column: float array}``. Header and cells are stripped of the
    padding older Ultralytics versions wrote (8.4 writes none); empty cells are NaN."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        raise DataError(f"{path} is empty")
    header = [h.strip() for h in rows[0]]
    cols: dict[str, list[float]] = {h: [] for h in header if h}
    for r in rows[1:]:
        if not any(c.strip() for c in r):
            continue
        for h, c in zip(header, r):
            if h:
                cols[h].append(_num(c.strip()) if c.strip() else float("nan"))
    return {h: np.asarray(v, dtype=np.float64) for h, v in cols.items()}


def gap_closed(baseline: float, distilled: float, teacher: float) -> float:
    """``(distilled - baseline) / (teacher - baseline)``; NaN when the teacher is not better than the
    baseline or a value is undefined."""
    if not all(_defined(v) for v in (baseline, distilled, teacher)) or teacher <= baseline:
        return float("nan")
    return (distilled - baseline) / (teacher - baseline)


# ------------------------------------------------------------------------------------------- formatting


def _pct(x: float | None) -> str:
    return f"{100 * x:.1f}" if _defined(x) else NA


def _pct_delta(a: float, b: float) -> str:
    """``b - a`` in points, as the difference of the two values shown (each rounded to one decimal)."""
    if not (_defined(a) and _defined(b)):
        return NA
    d = round(100 * b, 1) - round(100 * a, 1)
    return f"{d:+.1f}" if abs(d) >= 0.05 else "+0.0"


def _fmt(x: float | None, spec: str) -> str:
    if x is None:
        return MISSING
    return format(x, spec) if math.isfinite(x) else NA


def _params_m(n: int | None) -> str:
    return MISSING if n is None else f"{n / 1e6:.2f}"


# ---------------------------------------------------------------------------------------------- content


@dataclass
class _Model:
    entry: ModelEntry
    m: dict
    size_mb: float | None
    log: dict[str, np.ndarray] | None
    style: dict

    @property
    def name(self) -> str:
        return self.entry.name

    @property
    def role(self) -> str:
        return self.entry.role

    def p50(self) -> float | None:
        lat = self.entry.latency_ms or {}
        return _num(lat["p50"]) if lat.get("p50") is not None else None

    def p95(self) -> float | None:
        lat = self.entry.latency_ms or {}
        return _num(lat["p95"]) if lat.get("p95") is not None else None


def _map_col(log: Mapping[str, Any]) -> str | None:
    return next((c for c in log if c.replace(" ", "") == "metrics/mAP50-95(B)"), None)


def _first(models: Sequence[_Model], role: str) -> _Model | None:
    return next((m for m in models if m.role == role), None)


def _headline(models: Sequence[_Model], noise: Mapping[str, Any] | None = None) -> dict:
    """``noise``: the bench's noise verdict; when it (or a latency entry's ``noisy``) says the machine was too
    noisy, the latency part of the headline says so."""
    t, b, k = (_first(models, r) for r in ("teacher", "baseline", "distilled"))
    tv, bv, kv = (m.m["AP"] if m else float("nan") for m in (t, b, k))
    gap = gap_closed(bv, kv, tv)
    parts = []
    if b and k:
        parts.append(f"student mAP50-95 {_pct(bv)} -> {_pct(kv)} ({_pct_delta(bv, kv)})")
    elif k or b:
        parts.append(f"student mAP50-95 {_pct(kv if k else bv)}")
    if t:
        parts.append(f"teacher {_pct(tv)}")
    parts.append(f"gap closed {NA if math.isnan(gap) else f'{100 * gap:.0f}%'}")
    student = k if (k and k.p50() is not None) else b if (b and b.p50() is not None) else None
    lat = None
    if student is not None:
        s_ms = student.p50()
        t_ms = t.p50() if t else None
        threads = (student.entry.latency_ms or {}).get("threads")
        how = "p50" + (f", {threads} thread{'s' if threads != 1 else ''}" if threads is not None else "")
        txt = f"CPU latency ({how}) {s_ms:.1f} ms (student)"
        if t_ms is not None:
            txt += f" vs {t_ms:.1f} ms (teacher)"
        noisy = bool((noise or {}).get("noisy")) or any(
            (m.entry.latency_ms or {}).get("noisy") for m in (student, t) if m is not None)
        if noisy:
            txt += f" ({NOISY_TEXT})"
        parts.append(txt)
        lat = {"student_p50_ms": s_ms, "teacher_p50_ms": t_ms, "threads": threads, "noisy": noisy}
    return {
        "text": ", ".join(parts),
        "baseline_AP": bv if b else None, "distilled_AP": kv if k else None, "teacher_AP": tv if t else None,
        "delta_AP": kv - bv if (b and k) else None, "gap_closed": gap,
        "latency": lat,
    }  # fmt: skip


def _per_class(models: Sequence[_Model]) -> list[dict]:
    """One row per class (union over the models, first-seen order), sorted by delta AP50-95 (distilled -
    baseline) descending, undefined deltas last; ``rank`` marks the best and worst defined delta."""
    names: list[str] = []
    for m in models:
        names += [n for n in m.m["per_class"] if n not in names]
    b, k = _first(models, "baseline"), _first(models, "distilled")
    rows = []
    for n in names:
        ap = {m.name: m.m["per_class"].get(n, {}).get("AP", float("nan")) for m in models}
        ap50 = {m.name: m.m["per_class"].get(n, {}).get("AP50", float("nan")) for m in models}
        d = d50 = float("nan")
        if b and k:
            if _defined(ap[b.name]) and _defined(ap[k.name]):
                d = ap[k.name] - ap[b.name]
            if _defined(ap50[b.name]) and _defined(ap50[k.name]):
                d50 = ap50[k.name] - ap50[b.name]
        rows.append({"class": n, "AP": ap, "AP50": ap50, "delta_AP": d, "delta_AP50": d50, "rank": None})
    if b and k:
        rows.sort(key=lambda r: (math.isnan(r["delta_AP"]), -r["delta_AP"] if not math.isnan(r["delta_AP"]) else 0))
        defined = [r for r in rows if not math.isnan(r["delta_AP"])]
        if len(defined) >= 2:
            defined[0]["rank"], defined[-1]["rank"] = "best", "worst"
    return rows


def _plot_classes(rows: Sequence[dict], limit: int) -> list[str]:
    """All classes when there are at most ``limit``; else the ``limit`` with the largest |delta| (any AP
    when no delta), kept in table order."""
    if len(rows) <= limit:
        return [r["class"] for r in rows]
    score = [abs(r["delta_AP"]) if not math.isnan(r["delta_AP"]) else -1.0 for r in rows]
    keep = set(np.argsort(score, kind="stable")[::-1][:limit].tolist())
    return [r["class"] for i, r in enumerate(rows) if i in keep]


def _make_plots(models: Sequence[_Model], rows: Sequence[dict], out: Path, limit: int) -> list[dict]:
    from detkd.report import plots

    made: list[dict] = []
    classes = _plot_classes(rows, limit)
    shown = f"the {len(classes)} of {len(rows)} classes whose AP changed most" if len(classes) < len(rows) else ""
    b, k = _first(models, "baseline"), _first(models, "distilled")

    # PR curves at IoU 0.5
    with_pr = [m for m in models if m.m["pr"] is not None]
    if with_pr and classes:
        rec = with_pr[0].m["pr"]["rec_thrs"]
        series = [{"label": m.name, **m.style,
                   "precision": dict(zip(m.m["pr"]["class_names"], m.m["pr"]["precision50"]))} for m in with_pr]
        subt = {}
        if b and k:
            for r in rows:
                subt[r["class"]] = f"AP50 {_pct(r['AP50'][b.name])} → {_pct(r['AP50'][k.name])}"
        p = plots.pr_curves(out / "pr_curves.png", classes, rec, series, subtitles=subt)
        cap = "One panel per class" + (f" ({shown})" if shown else "") + "; the first panel is the mean curve."
        if _first(with_pr, "teacher"):
            cap += " Dashed grey: teacher."
        if subt:
            cap += " Panel titles give AP50 baseline → distilled."
        made.append({"key": "pr_curves", "file": p.name, "title": "Precision-recall at IoU 0.5, per class",
                     "caption": cap})

    # per-class AP bars
    if classes:
        by = {r["class"]: r for r in rows}
        series = [{"label": m.name, **m.style, "values": [by[c]["AP"][m.name] for c in classes]} for m in models]
        p = plots.per_class_bars(out / "per_class_ap.png", classes, series)
        made.append({"key": "per_class_ap", "file": p.name, "title": "Per-class AP50-95",
                     "caption": "Classes in the order of the table above" + (f" ({shown})" if shown else "") + "."})

    # accuracy vs cost
    lat = [m for m in models if m.p50() is not None and _defined(m.m["AP"])]
    par = [m for m in models if m.entry.params is not None and _defined(m.m["AP"])]
    use, xkey, xlabel = (lat, "latency_p50_ms", "CPU latency p50 (ms)") if len(lat) >= 2 else \
                        (par, "params_M", "parameters (M)")  # fmt: skip
    if len(use) >= 2:
        pts = [{"label": m.name, **m.style, "y": m.m["AP"],
                "x": m.p50() if xkey == "latency_p50_ms" else m.entry.params / 1e6} for m in use]
        arrow = None
        if b in use and k in use:
            arrow = (use.index(b), use.index(k))
        p = plots.tradeoff(out / "tradeoff.png", pts, xlabel, arrow=arrow)
        title = "mAP50-95 vs CPU latency" if xkey == "latency_p50_ms" else "mAP50-95 vs parameters"
        made.append({"key": "tradeoff", "file": p.name, "title": title, "x": xkey,
                     "caption": "Up and to the left is better. The arrow is what distillation bought the student"
                     + (" at the same latency." if xkey == "latency_p50_ms" else " at the same size.")
                     + ("" if xkey == "latency_p50_ms" else " (No latency was given.)")})  # fmt: skip

    # learning curves: val mAP of every model with a log (teacher included) on one panel, and each student's
    # gap to the teacher's final val mAP per epoch (how much of the gap distillation closed, epoch by epoch)
    with_map = [m for m in models if m.log is not None and _map_col(m.log)]
    if len(with_map) >= 2:
        t = _first(with_map, "teacher")
        data = []
        for m in with_map:
            d = {"epoch": m.log.get("epoch", np.arange(1, len(m.log[_map_col(m.log)]) + 1)),
                 "metrics/mAP50-95(B)": m.log[_map_col(m.log)]}
            if t is not None and m is not t:
                d["gap to the teacher (mAP50-95 points)"] = 100 * (t.log[_map_col(t.log)][-1] - d["metrics/mAP50-95(B)"])
            data.append({"label": m.name, **m.style, "data": d})
        cols = ["metrics/mAP50-95(B)"] + (["gap to the teacher (mAP50-95 points)"] if t is not None else [])
        p = plots.training_curves(out / "learning_curves.png", data, cols, ncols=2)
        made.append({"key": "learning_curves", "file": p.name, "title": "Learning curves: teacher, baseline, distilled",
                     "caption": "Validation mAP50-95 per epoch from each run's results.csv (Ultralytics' validator on "
                     "the val split)" + ("; right: each student's gap to the teacher's final val mAP50-95 (points), "
                     "per epoch" if t is not None else "") + "."})

    # training curves of the students (and any other model with a log)
    logs = [m for m in models if m.log is not None and m.role != "teacher"]
    if logs:
        cols: list[str] = []
        map_col = next((c for lg in logs for c in lg.log if c.replace(" ", "") == "metrics/mAP50-95(B)"), None)
        if map_col:
            cols.append(map_col)
        for lg in logs:
            cols += [c for c in lg.log if c.startswith("train/") and c not in cols]
        cols.sort(key=lambda c: (not c.startswith("metrics/"), c.startswith("train/kd_")))  # mAP, losses, kd_*
        if cols:
            p = plots.training_curves(out / "training_curves.png",
                                      [{"label": m.name, **m.style, "data": m.log} for m in logs], cols)
            made.append({"key": "training_curves", "file": p.name, "title": "Training curves", "columns": cols,
                         "caption": "From each run's results.csv. kd_* are the distillation terms (distilled run "
                         "only); the other losses are Ultralytics' own."})  # fmt: skip
    return made


def _setup(models: Sequence[_Model], dataset: str | None, notes: str | None) -> list[tuple[str, str]]:
    from detkd import __version__

    items: list[tuple[str, str]] = []
    if dataset:
        items.append(("Dataset", dataset))
    ev = next((m.m for m in models if "num_images" in m.m or "engine" in m.m), None)
    if ev is not None:
        txt = "COCO box mAP (" + str(ev.get("engine", "pycocotools")) + "), area all, max 100 detections"
        if "num_images" in ev:
            txt += f", {ev['num_images']} images"
        items.append(("Evaluation", txt))
    lats = [(m.name, m.entry.latency_ms) for m in models if m.entry.latency_ms]
    if lats:
        keys = ("engine", "threads", "imgsz", "runs")
        settings = {tuple(str(lat.get(k2)) for k2 in keys) for _, lat in lats}
        lat0 = lats[0][1]
        desc = ", ".join(
            x for x in (
                str(lat0.get("engine")) if lat0.get("engine") else "",
                f"{lat0['threads']} threads" if lat0.get("threads") is not None else "",
                f"{lat0['imgsz']} px" if lat0.get("imgsz") is not None else "",
                f"{lat0['runs']} timed runs" if lat0.get("runs") is not None else "",
            ) if x
        )  # fmt: skip
        items.append(("Latency", f"batch 1, one image per run; p50 / p95 over the timed runs; {desc}"
                      if desc else "batch 1; p50 / p95 per image"))
        if len(settings) > 1:
            items.append(("Warning", "latencies were measured with different settings: "
                          + "; ".join(f"{n}: {', '.join(f'{k2} {lat.get(k2)}' for k2 in keys)}" for n, lat in lats)))
        cpus = sorted({str(lat["cpu"]) for _, lat in lats if lat.get("cpu")})
        if cpus:
            items.append(("Machine", "; ".join(cpus)))
    items.append(("Definitions", "mAP50-95: COCO AP averaged over IoU 0.50:0.95; mAP50: AP at IoU 0.5; "
                  "APs/APm/APl: small/medium/large objects; gap closed = (distilled − baseline) / (teacher − "
                  "baseline) on mAP50-95; n/a: undefined (no ground truth, or teacher not better than baseline)."))
    if notes:
        items.append(("Notes", notes))
    items.append(("Generated", f"{_dt.datetime.now().strftime('%Y-%m-%d %H:%M')} by detkd {__version__}, "
                  f"Python {platform.python_version()}, {platform.system()} {platform.machine()}"))
    return items


# ----------------------------------------------------------------------------------------------- output

_MODEL_COLS = ("Model", "Role", "mAP50-95", "mAP50", "AP75", "APs", "APm", "APl", "Params (M)", "GFLOPs",
               "Size (MB)", "CPU p50 (ms)", "CPU p95 (ms)")  # fmt: skip


def _model_rows(models: Sequence[_Model]) -> list[list[str]]:
    return [[m.name, m.role, *(_pct(m.m[k]) for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")),
             _params_m(m.entry.params), format_gflops(m.entry.gflops, MISSING, NA), _fmt(m.size_mb, ".1f"),
             _fmt(m.p50(), ".1f"), _fmt(m.p95(), ".1f")] for m in models]  # fmt: skip


def _class_cols(models: Sequence[_Model], has_delta: bool) -> list[str]:
    return ["Class", *(m.name for m in models), *(("Δ AP50-95", "Δ AP50") if has_delta else ())]


def _class_rows(models: Sequence[_Model], rows: Sequence[dict], has_delta: bool) -> list[list[str]]:
    b, k = _first(models, "baseline"), _first(models, "distilled")
    out = []
    for r in rows:
        cells = [r["class"], *(_pct(r["AP"][m.name]) for m in models)]
        if has_delta:
            cells += [_pct_delta(r["AP"][b.name], r["AP"][k.name]), _pct_delta(r["AP50"][b.name], r["AP50"][k.name])]
        out.append(cells)
    return out


def _md_table(cols: Sequence[str], rows: Sequence[Sequence[str]], left: int = 1) -> str:
    esc = [[c.replace("|", "\\|") for c in r] for r in [list(cols), *rows]]
    align = ["---" if i < left else "---:" for i in range(len(cols))]
    lines = ["| " + " | ".join(esc[0]) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in esc[1:]]
    return "\n".join(lines)


def _bench_caption(bench: Mapping[str, Any]) -> str:
    v = bench.get("versions") or {}
    return (f"CPU: {bench['cpu']}, {bench['threads']} thread{'s' if bench['threads'] != 1 else ''}, imgsz "
            f"{bench['imgsz']}, median (p50) and p95 of {bench['runs']} runs after {bench['warmup']} warm-up; "
            f"{bench.get('what', '')}; torch {v.get('torch')}, onnxruntime {v.get('onnxruntime')}. "
            "Eager: PyTorch FP32 (fused Conv+BN); ORT: onnxruntime; mAP in % on the validation set. "
            f"Speed-up vs {bench['rows'][0]['model'] if bench.get('rows') else 'the first model'}: p50 ratio "
            "against that model's row of the same engine and precision (eager FP32 with eager FP32, ORT INT8 with "
            "ORT INT8), never across engines or precisions. Spread: interquartile range of a row's per-round "
            "medians, % of its p50 (rows timed round-robin).")


def _where(split: str | None) -> str:
    """Which images the models table's mAP is on."""
    return f"the '{split}' split" if split else "each model's evaluation split (its metrics.json)"


def _markdown(title, head, models, rows, has_delta, figs, setup, bench=None, split=None) -> str:
    out = [f"# {title}", "", f"> **{head['text']}**", ""]
    out += ["## Models", "", _md_table(_MODEL_COLS, _model_rows(models), left=2), "",
            f"mAP columns in %, COCO box AP on {_where(split)}. Size: checkpoint file, MB.", ""]  # fmt: skip
    if bench:
        from detkd.bench.run import table_rows

        bh, br = table_rows(bench)
        out += ["## CPU deployment (detkd bench)", "", _md_table(bh, br, left=3), ""]
        verdict = noise_line(bench.get("noise"))
        out += ([verdict, ""] if verdict else []) + [_bench_caption(bench), ""]
        out += [f"- {n}" for n in bench.get("notes", [])] + ([""] if bench.get("notes") else [])
    if rows:
        crow = _class_rows(models, rows, has_delta)
        for cells, r in zip(crow, rows):
            if r["rank"]:
                cells[0] = f"**{cells[0]}** ({r['rank']})"
        out += ["## Per-class AP50-95 (%)", "", _md_table(_class_cols(models, has_delta), crow), ""]
        if has_delta:
            out += ["Sorted by Δ = distilled − baseline (points); best and worst class in bold.", ""]
    if figs:
        out += ["## Plots", ""]
        for f in figs:
            out += [f"### {f['title']}", "", f"![{f['title']}]({f['file']})", "", f["caption"], ""]
    out += ["## Method and setup", ""] + [f"- **{k}:** {v}" for k, v in setup] + [""]
    return "\n".join(out)


_CSS = """
:root { --ink:#111827; --muted:#6b7280; --line:#e5e7eb; --accent:#ea580c; --blue:#2563eb; --bg:#ffffff; }
* { box-sizing: border-box; }
body { margin:0; background:#f3f4f6; color:var(--ink);
  font: 15px/1.5 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, "Liberation Sans", sans-serif; }
main { max-width: 1120px; margin: 24px auto; background: var(--bg); padding: 28px 40px 32px;
  border: 1px solid var(--line); border-radius: 10px; }
h1 { font-size: 26px; margin: 0 0 4px; letter-spacing: -0.01em; }
h2 { font-size: 18px; margin: 34px 0 10px; padding-bottom: 4px; border-bottom: 1px solid var(--line); }
h3 { font-size: 15px; margin: 18px 0 6px; }
.meta { color: var(--muted); margin: 0 0 18px; font-size: 14px; }
.callout { border-left: 5px solid var(--accent); background: #fff7ed; padding: 16px 20px; border-radius: 6px; }
.headline { font-size: 18px; font-weight: 600; margin: 0 0 12px; }
.cards { display: flex; flex-wrap: wrap; gap: 12px; }
.card { background: #fff; border: 1px solid #fed7aa; border-radius: 6px; padding: 8px 14px; min-width: 150px; }
.card .k { color: var(--muted); font-size: 12.5px; font-weight: 600; }
.card .v { font-size: 20px; font-weight: 650; font-variant-numeric: tabular-nums; }
.card .s { color: var(--muted); font-size: 12.5px; }
.fine { color: var(--muted); font-size: 13px; margin: 6px 0 0; }
.noisy { color: #991b1b; background: #fef2f2; border-left: 4px solid #b91c1c; padding: 6px 10px; font-size: 13.5px; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; font-size: 13.5px; width: 100%; }
table.compact { width: auto; min-width: 60%; }
th, td { padding: 5px 9px; border-bottom: 1px solid var(--line); white-space: nowrap; }
th { text-align: left; background: #f9fafb; font-weight: 600; color: #374151; }
td.n, th.n { text-align: right; font-variant-numeric: tabular-nums; }
tr.role-distilled td { background: #fff7ed; }
tr.role-teacher td { color: #4b5563; }
td.pos { color: #15803d; font-weight: 600; }
td.neg { color: #b91c1c; font-weight: 600; }
tr.best td { background: #ecfdf5; }
tr.worst td { background: #fef2f2; }
.tag { display: inline-block; font-size: 11px; font-weight: 600; border-radius: 3px; padding: 0 5px;
  margin-left: 6px; vertical-align: 1px; }
.tag.best { background: #bbf7d0; color: #14532d; }
.tag.worst { background: #fecaca; color: #7f1d1d; }
.na { color: var(--muted); }
figure { margin: 18px 0 26px; }
figure img { max-width: 100%; height: auto; display: block; margin: 0 auto; border: 1px solid var(--line);
  border-radius: 4px; }
figcaption { color: var(--muted); font-size: 13px; margin-top: 6px; }
dl { display: grid; grid-template-columns: max-content 1fr; gap: 6px 18px; margin: 0; font-size: 14px; }
dt { font-weight: 600; color: #374151; }
dd { margin: 0; }
footer { color: var(--muted); font-size: 12px; margin-top: 28px; }
"""


def _h(s: Any) -> str:
    return html.escape(str(s), quote=True)


def _td(cell: str, numeric: bool, extra: str = "") -> str:
    cls = ["n"] if numeric else []
    if cell in (NA, MISSING):
        cls.append("na")
    if extra:
        cls.append(extra)
    return f'<td class="{" ".join(cls)}">{_h(cell)}</td>' if cls else f"<td>{_h(cell)}</td>"


def _html_table(cols: Sequence[str], rows: Sequence[Sequence[str]], left: int, row_cls: Sequence[str] = (),
                cell_cls=None, table_cls: str = "") -> str:
    head = "".join(f'<th class="{"n" if i >= left else ""}">{_h(c)}</th>' for i, c in enumerate(cols))
    body = []
    for ri, r in enumerate(rows):
        rc = row_cls[ri] if ri < len(row_cls) else ""
        tds = "".join(_td(c, i >= left, cell_cls(ri, i, c) if cell_cls else "") for i, c in enumerate(r))
        body.append(f'<tr class="{rc}">{tds}</tr>' if rc else f"<tr>{tds}</tr>")
    tc = f' class="{table_cls}"' if table_cls else ""
    return f'<div class="scroll"><table{tc}><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>'


def _cards(head: dict, models: Sequence[_Model]) -> str:
    cards = []
    b, k, t = (head[x] for x in ("baseline_AP", "distilled_AP", "teacher_AP"))
    if b is not None and k is not None:
        cards.append(("Student mAP50-95", f"{_pct(b)} → {_pct(k)}", f"{_pct_delta(b, k)} points"))
    if t is not None:
        cards.append(("Teacher mAP50-95", _pct(t), "upper reference"))
    g = head["gap_closed"]
    cards.append(("Gap closed", NA if math.isnan(g) else f"{100 * g:.0f}%", "of the teacher − baseline gap"))
    lat = head["latency"]
    if lat:
        v = f"{lat['student_p50_ms']:.1f} ms"
        s = "student, p50"
        if lat["teacher_p50_ms"] is not None:
            s = f"student; teacher {lat['teacher_p50_ms']:.1f} ms"
            if lat["student_p50_ms"] > 0:
                s += f" ({lat['teacher_p50_ms'] / lat['student_p50_ms']:.1f}× slower)"
        if lat.get("noisy"):
            s = f"{NOISY_TEXT}; {s}"
        cards.append(("CPU latency p50", v, s))
    return '<div class="cards">' + "".join(
        f'<div class="card"><div class="k">{_h(a)}</div><div class="v">{_h(v)}</div><div class="s">{_h(s)}</div></div>'
        for a, v, s in cards) + "</div>"  # fmt: skip


def _html(title, dataset, head, models, rows, has_delta, figs, setup, out: Path, bench=None, split=None) -> str:
    parts = [f"<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
             f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
             f"<title>{_h(title)}</title><style>{_CSS}</style></head><body><main>"]  # fmt: skip
    parts.append(f"<header><h1>{_h(title)}</h1>")
    meta = " · ".join(x for x in (dataset or "", _dt.date.today().isoformat()) if x)
    parts.append(f'<p class="meta">{_h(meta)}</p></header>')
    parts.append(f'<section class="callout"><p class="headline">{_h(head["text"].replace(" -> ", " → "))}</p>'
                 f"{_cards(head, models)}</section>")  # fmt: skip

    parts.append("<section><h2>Models</h2>")
    parts.append(_html_table(_MODEL_COLS, _model_rows(models), left=2, row_cls=[f"role-{m.role}" for m in models]))
    parts.append(f'<p class="fine">mAP columns in %, COCO box AP on {_h(_where(split))}; n/a: no ground truth in '
                 "that size range. Size: checkpoint file in MB. Latency: CPU, batch 1, per image.</p></section>")
    if bench:
        from detkd.bench.run import table_rows

        bh, br = table_rows(bench)
        parts.append('<section><h2>CPU deployment</h2><div class="scroll">' + _html_table(bh, br, left=3) + "</div>")
        verdict = noise_line(bench.get("noise"))
        if verdict:
            noisy = bool(bench["noise"].get("noisy"))
            parts.append(f'<p class="{"noisy" if noisy else "fine"}">{_h(verdict.replace("**", ""))}</p>')
        parts.append(f'<p class="fine">{_h(_bench_caption(bench))}</p>')
        if bench.get("notes"):
            parts.append("<ul>" + "".join(f"<li>{_h(n)}</li>" for n in bench["notes"]) + "</ul>")
        parts.append("</section>")

    if rows:
        crow = _class_rows(models, rows, has_delta)
        nmod = len(models)

        def cell_cls(ri, ci, c):
            if has_delta and ci > nmod and c not in (NA, MISSING):
                return "pos" if c.startswith("+") and c != "+0.0" else "neg" if c.startswith("-") else ""
            return ""

        table = _html_table(_class_cols(models, has_delta), crow, left=1, row_cls=[r["rank"] or "" for r in rows],
                            cell_cls=cell_cls, table_cls="compact")
        # badges on the best / worst rows (added after escaping, so the markup survives)
        for r in rows:
            if r["rank"]:
                name = _h(r["class"])
                table = table.replace(f'<tr class="{r["rank"]}"><td>{name}</td>',
                                      f'<tr class="{r["rank"]}"><td>{name}<span class="tag {r["rank"]}">'
                                      f'{r["rank"]}</span></td>', 1)  # fmt: skip
        parts.append("<section><h2>Per-class AP50-95 (%)</h2>" + table)
        if has_delta:
            parts.append('<p class="fine">Sorted by Δ = distilled − baseline, in points (green: distillation '
                         "helped, red: it hurt).</p>")
        parts.append("</section>")

    if figs:
        parts.append("<section><h2>Plots</h2>")
        for f in figs:
            data = base64.b64encode((out / f["file"]).read_bytes()).decode("ascii")
            parts.append(f'<figure><h3>{_h(f["title"])}</h3><img alt="{_h(f["title"])}" '
                         f'src="data:image/png;base64,{data}"><figcaption>{_h(f["caption"])}</figcaption></figure>')
        parts.append("</section>")

    parts.append("<section><h2>Method and setup</h2><dl>")
    parts += [f"<dt>{_h(k)}</dt><dd>{_h(v)}</dd>" for k, v in setup]
    parts.append("</dl></section>")
    parts.append('<footer>Generated by detkd. Every number on this page is also in report.json.</footer>')
    parts.append("</main></body></html>\n")
    return "".join(parts)


def report_from_spec(spec: PathLike, out_dir: PathLike | None = None) -> dict[str, Path]:
    """`build_report` driven by a YAML file (the form a ``detkd report SPEC.yaml`` command line can take)::

        title: "yolov8s -> yolov8n, CWD"        # optional, like dataset, notes, imgsz
        dataset: "COCO val2017, 5,000 images"
        split: val                              # optional: the split the metrics are on (named under the table)
        out: report/                            # default: report/ next to the spec
        models:
          - {role: teacher, name: yolov8s, metrics: eval/t/metrics.json, weights: t.pt}
          - {role: baseline, name: yolov8n, metrics: eval/b/metrics.json, results_csv: runs/b/results.csv,
             latency_ms: bench/b.json}          # a dict or a JSON file holding one
          - {role: distilled, name: yolov8n + KD, metrics: ..., params: 3157200, gflops: 8.7}
        bench: bench/bench.json                 # optional: `detkd bench` output -> "CPU deployment" table

    Relative paths are taken from the spec's folder. Unknown keys are errors (with the valid ones listed).
    """
    import yaml

    spec = Path(spec)
    if not spec.is_file():
        raise ConfigError(f"report spec not found: {spec}")
    try:
        d = yaml.safe_load(spec.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{spec}: not valid YAML ({' '.join(str(e).split())})") from None
    top = {"title", "dataset", "notes", "imgsz", "out", "models", "max_plot_classes", "bench", "split"}
    fields = {"role", "name", "metrics", "weights", "params", "gflops", "latency_ms", "results_csv", "size_mb"}
    expected = ("expected a mapping with a 'models:' list, e.g. 'models: [{role: teacher, name: t, metrics: "
                "t/metrics.json}, {role: distilled, name: s, metrics: s/metrics.json}]' (optional keys: title, "
                "dataset, notes, imgsz, out, bench, split)")
    if isinstance(d, list):
        raise ConfigError(f"{spec}: the spec is a plain YAML list; {expected}. Put the list under 'models:'")
    if not isinstance(d, dict):
        raise ConfigError(f"{spec}: got {type(d).__name__} {d!r}; {expected}")
    bad = set(d) - top
    if bad:
        raise ConfigError(f"{spec}: unknown key(s) {sorted(bad)}; valid: {sorted(top)}")
    if not isinstance(d.get("models"), list) or not d["models"]:
        raise ConfigError(f"{spec}: 'models' must be a non-empty list of {{role, name, metrics, ...}}")
    root = spec.parent

    def path(v):
        return None if v is None else str(v if Path(v).is_absolute() else root / v)

    entries = []
    for i, m in enumerate(d["models"]):
        if not isinstance(m, dict):
            raise ConfigError(f"{spec}: models[{i}] is {type(m).__name__} {m!r}; each model is a mapping such as "
                              "{role: teacher, name: t, metrics: t/metrics.json}")
        bad = set(m) - fields
        if bad:
            raise ConfigError(f"{spec}: models[{i}] has unknown key(s) {sorted(bad)}; valid: {sorted(fields)}")
        lat = m.get("latency_ms")
        if isinstance(lat, str):
            lp = Path(path(lat))
            if not lp.is_file():
                raise DataError(f"{spec}: models[{i}] latency file not found: {lp}")
            lat = json.loads(lp.read_text())
        metrics = m.get("metrics")
        entries.append(ModelEntry(role=m.get("role", ""), name=str(m.get("name", "")),
                                  metrics=path(metrics) if isinstance(metrics, str) else metrics,
                                  weights=path(m.get("weights")), params=m.get("params"), gflops=m.get("gflops"),
                                  latency_ms=lat, results_csv=path(m.get("results_csv")), size_mb=m.get("size_mb")))
    out = Path(out_dir) if out_dir is not None else Path(path(d.get("out", "report")))
    kw = {k: d[k] for k in ("title", "dataset", "notes", "imgsz", "max_plot_classes", "split") if k in d}
    if d.get("bench") is not None:
        kw["bench"] = path(d["bench"])
    return build_report(entries, out, **kw)


def build_report(models: Sequence[ModelEntry], out_dir: PathLike, *, title: str = "detkd report",
                 dataset: str | None = None, notes: str | None = None, imgsz: int | None = None,
                 max_plot_classes: int = 24, bench: Mapping[str, Any] | PathLike | None = None,
                 smoke: bool = False, headline_extra: str | None = None, split: str | None = None) -> dict[str, Path]:
    """Write the before/after report for ``models`` into ``out_dir``.

    Args:
        models: one `ModelEntry` per model; normally one teacher, one baseline and one distilled student
            (the headline, deltas and gap closed need the baseline and the distilled; extra models with
            role "other" appear in tables and plots). Names must be unique.
        out_dir: created if needed; existing report files are overwritten.
        title, dataset, notes: shown at the top and in "Method and setup".
        imgsz: when given, models with ``.pt`` weights but no ``params`` / ``gflops`` are measured with
            `model_info` at this size (imports Ultralytics).
        max_plot_classes: the PR and bar plots show at most this many classes (those whose AP changed
            most); the table always lists every class.
        bench: a `detkd bench` result (dict or ``bench.json`` path): shown as the "CPU deployment" table
            (eager / ORT FP32 / ORT INT8 latency, throughput, memory, size, mAP) and stored in report.json.
            Models without ``latency_ms`` take their PyTorch-eager latency from it (matched by weights path).
        smoke: the models were trained for a smoke test (e.g. `detkd demo --quick`): the headline says its
            numbers mean nothing instead of presenting them as a result.
        headline_extra: a sentence appended to the headline (e.g. the demo's few-labels result).
        split: the split the models' metrics were computed on (e.g. ``"test"``), named under the model table;
            without it the table says the mAP is on each model's evaluation split.

    Returns:
        ``{"md", "html", "json", <plot key>: png path, ...}``. Missing optional inputs (latency, logs,
        weights, PR arrays) only drop the parts that need them.
    """
    if not models:
        raise ConfigError("build_report needs at least one ModelEntry")
    names = [m.name for m in models]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"model names must be unique in a report; repeated: {dup}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if bench is not None and not isinstance(bench, Mapping):
        bp = Path(bench)
        if not bp.is_file():
            raise DataError(f"bench result not found: {bp} (write one with `detkd bench ... --out DIR`)")
        bench = json.loads(bp.read_text())
    if bench is not None and not (isinstance(bench.get("rows"), list) and "cpu" in bench):
        raise DataError("bench: not a `detkd bench` result (expected keys 'rows' and 'cpu')")
    if bench is not None:
        from detkd.bench.run import latency_entry

        models = [m if m.latency_ms or not m.weights else
                  ModelEntry(**{**m.__dict__, "latency_ms": latency_entry(bench, str(m.weights))}) for m in models]

    loaded: list[_Model] = []
    missing_logs: list[str] = []
    from detkd.report.plots import style_for

    styles = style_for([m.role for m in models])
    for e, st in zip(models, styles):
        if imgsz is not None and e.weights and Path(e.weights).suffix == ".pt" and Path(e.weights).is_file() \
                and (e.params is None or e.gflops is None):  # fmt: skip
            info = model_info(e.weights, imgsz)
            e = ModelEntry(**{**e.__dict__, "params": e.params if e.params is not None else info["params"],
                              "gflops": e.gflops if e.gflops is not None else info["gflops"]})  # fmt: skip
        size = e.size_mb
        if e.weights and Path(e.weights).is_file():
            size = Path(e.weights).stat().st_size / 1e6
        log = None
        if e.results_csv:
            if Path(e.results_csv).is_file():
                log = read_results_csv(e.results_csv)
            else:
                missing_logs.append(f"{e.name}: {e.results_csv}")
        loaded.append(_Model(e, load_metrics(e.metrics), size, log, st))

    head = _headline(loaded, bench.get("noise") if bench else None)
    if smoke:
        head["text"] = ("SMOKE TEST (a few epochs on a few frames: these numbers mean nothing; run without --quick "
                        "for a real comparison): " + head["text"])
        head["smoke"] = True
    if headline_extra:
        head["text"] += f"; {headline_extra}"
    rows = _per_class(loaded)
    has_delta = _first(loaded, "baseline") is not None and _first(loaded, "distilled") is not None
    figs = _make_plots(loaded, rows, out, max_plot_classes)
    setup = _setup(loaded, dataset, notes)
    if missing_logs:
        setup.insert(-1, ("Missing", "training logs not found: " + "; ".join(missing_logs)))

    md = _markdown(title, head, loaded, rows, has_delta, figs, setup, bench, split)
    page = _html(title, dataset, head, loaded, rows, has_delta, figs, setup, out, bench, split)
    report = {
        "title": title, "dataset": dataset, "notes": notes, "split": split,
        "headline": head,
        "models": [{"name": m.name, "role": m.role, **{k: m.m[k] for k in STAT_NAMES},
                    "params": m.entry.params, "gflops": m.entry.gflops, "size_mb": m.size_mb,
                    "latency_ms": dict(m.entry.latency_ms) if m.entry.latency_ms else None,
                    "weights": str(m.entry.weights) if m.entry.weights else None,
                    "results_csv": str(m.entry.results_csv) if m.entry.results_csv else None,
                    "engine": m.m.get("engine"), "num_images": m.m.get("num_images")} for m in loaded],
        "per_class": rows,
        "plots": figs,
        "setup": dict(setup),
        "bench": bench,
    }  # fmt: skip
    paths: dict[str, Path] = {}
    for key, name, text in (("md", "report.md", md), ("html", "report.html", page),
                            ("json", "report.json", json.dumps(_jsonable(report), indent=2, allow_nan=False))):
        p = out / name
        tmp = p.with_name(f".{name}.tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, p)
        paths[key] = p
    for f in figs:
        paths[f["key"]] = out / f["file"]
    return paths
