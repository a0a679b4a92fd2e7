"""Figures for the detkd report (matplotlib, Agg, object API: no pyplot global state, no backend switch).

Every function draws one PNG at ``path`` and returns it. Inputs are plain numbers already picked by
`detkd.report.report`; a *series* is a dict ``{"label", "color", "ls", ...}`` so that one model keeps the
same colour and line style in every figure. Values are fractions (0..1) as pycocotools reports them; the
axes show percentages. NaN means "undefined" and is left out of lines and bars.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

__all__ = ["ROLE_COLORS", "style_for", "pr_curves", "per_class_bars", "tradeoff", "training_curves"]

#: Fixed colours: the teacher is grey (a reference, not a contender), the baseline blue, the distilled orange.
ROLE_COLORS = {"teacher": "#6b7280", "baseline": "#2563eb", "distilled": "#ea580c"}
_OTHER_COLORS = ("#059669", "#7c3aed", "#db2777", "#0891b2", "#ca8a04", "#4b5563")
_ROLE_LS = {"teacher": "--", "baseline": "-", "distilled": "-"}
_DPI = 110


def style_for(roles: Sequence[str]) -> list[dict]:
    """``{"color", "ls"}`` per model, in order: role colours for teacher/baseline/distilled, a palette for
    the rest (a second model with the same role also takes the palette)."""
    out, seen, k = [], set(), 0
    for r in roles:
        if r in ROLE_COLORS and r not in seen:
            out.append({"color": ROLE_COLORS[r], "ls": _ROLE_LS[r]})
            seen.add(r)
        else:
            out.append({"color": _OTHER_COLORS[k % len(_OTHER_COLORS)], "ls": "-."})
            k += 1
    return out


def _figure(w: float, h: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(w, h), dpi=_DPI, layout="constrained")


def _tidy(ax) -> None:
    ax.spines["top"].set_visible(False)
    ax.spines["right"].set_visible(False)
    ax.grid(True, color="#e5e7eb", linewidth=0.6)
    ax.set_axisbelow(True)
    ax.tick_params(labelsize=7.5)


def _legend_cols(fig, labels: Sequence[str], fontsize: float = 8.5) -> int:
    """Legend columns that fit the figure's width (one row when they fit, more rows for many / long labels)."""
    width = [0.55 + 0.0075 * fontsize * len(str(x)) for x in labels]  # inches: marker + text
    for n in range(len(labels), 1, -1):
        rows = [width[i::n] for i in range(n)]  # column i holds labels i, i + n, ...
        if sum(max(c) for c in rows) <= fig.get_figwidth() * 0.95:
            return n
    return 1


def _save(fig, path: str | os.PathLike) -> Path:
    path = Path(path)
    # no "Software: matplotlib ... https://..." text chunk: the page must carry no links at all
    fig.savefig(path, format="png", metadata={"Software": None})
    return path


def pr_curves(path, classes: Sequence[str], rec_thrs: np.ndarray, series: Sequence[Mapping],
              subtitles: Mapping[str, str] | None = None, ncols: int = 4) -> Path:
    """Precision-recall curves at IoU 0.5, one small panel per class, one line per model.

    ``series[i]["precision"]`` maps class name -> precision ``(R,)`` over ``rec_thrs`` (pycocotools'
    101 recall thresholds; entries < 0 or NaN, i.e. no ground truth, are not drawn). The first panel,
    "all classes", is the mean curve over the classes each model defines.
    """
    panels = ["all classes", *classes]
    ncols = max(1, min(ncols, len(panels)))
    nrows = math.ceil(len(panels) / ncols)
    fig = _figure(2.9 * ncols, 2.35 * nrows + 0.35)
    axes = fig.subplots(nrows, ncols, squeeze=False, sharex=True, sharey=True)
    for i, name in enumerate(panels):
        ax = axes[i // ncols][i % ncols]
        _tidy(ax)
        drawn = False
        for s in series:
            if name == "all classes":
                rows = [np.asarray(s["precision"][c], float) for c in classes if s["precision"].get(c) is not None]
                rows = [r for r in rows if np.all(np.isfinite(r)) and np.all(r >= 0)]
                p = np.mean(rows, axis=0) if rows else None
            else:
                p = s["precision"].get(name)
                p = None if p is None else np.asarray(p, float)
                if p is not None and (not np.all(np.isfinite(p)) or np.any(p < 0)):
                    p = None
            if p is None:
                continue
            ax.plot(rec_thrs, p * 100, color=s["color"], ls=s["ls"], lw=1.4, label=s["label"])
            drawn = True
        if not drawn:
            ax.text(0.5, 0.5, "no ground truth", ha="center", va="center", fontsize=8, color="#6b7280",
                    transform=ax.transAxes)
        title = name if name == "all classes" or not subtitles else f"{name}\n{subtitles.get(name, '')}"
        ax.set_title(title, fontsize=8.5, fontweight="bold" if name == "all classes" else "normal")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 102)
        if i % ncols == 0:
            ax.set_ylabel("precision (%)", fontsize=8)
        if i // ncols == nrows - 1 or i + ncols >= len(panels):
            ax.set_xlabel("recall", fontsize=8)
            ax.xaxis.set_tick_params(labelbottom=True)
    for j in range(len(panels), nrows * ncols):
        axes[j // ncols][j % ncols].set_visible(False)
    handles, labels = axes[0][0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside upper center", ncols=_legend_cols(fig, labels), fontsize=8.5,
                   frameon=False)
    return _save(fig, path)


def per_class_bars(path, classes: Sequence[str], series: Sequence[Mapping], xlabel: str = "AP50-95 (%)") -> Path:
    """Grouped horizontal bars: one group per class (top to bottom in the given order), one bar per model.
    ``series[i]["values"]`` is ``(len(classes),)`` fractions; NaN bars are marked "n/a"."""
    n, m = len(classes), len(series)
    fig = _figure(7.6, 0.9 + n * (0.11 * m + 0.16))
    ax = fig.subplots()
    _tidy(ax)
    ax.grid(axis="y", visible=False)
    h = 0.8 / m
    y = np.arange(n)
    for j, s in enumerate(series):
        v = np.asarray(s["values"], float) * 100
        pos = y - 0.4 + h * (j + 0.5)
        ax.barh(pos, np.nan_to_num(v, nan=0.0), height=h * 0.92, color=s["color"], label=s["label"],
                alpha=0.55 if s.get("ls") == "--" else 0.95)
        for yy, vv in zip(pos, v):
            if math.isnan(vv):
                ax.text(0.5, yy, "n/a", va="center", fontsize=6.5, color="#6b7280")
    ax.set_yticks(y, [str(c) for c in classes], fontsize=8)
    ax.set_ylim(n - 0.5, -0.5)  # first class on top, no empty margin
    ax.set_xlabel(xlabel, fontsize=8.5)
    ax.set_xlim(left=0)
    fig.legend(loc="outside upper center", ncols=m, fontsize=8, frameon=False)
    return _save(fig, path)


def tradeoff(path, points: Sequence[Mapping], xlabel: str, arrow: tuple[int, int] | None = None) -> Path:
    """Accuracy-vs-cost scatter: ``points[i]`` has ``label``, ``color``, ``x`` (cost), ``y`` (mAP50-95,
    fraction). ``arrow=(i, j)`` draws the baseline -> distilled gain. Log x-axis when x spans > 20x."""
    fig = _figure(6.4, 3.9)
    ax = fig.subplots()
    _tidy(ax)
    xs = np.array([p["x"] for p in points], float)
    ys = np.array([p["y"] for p in points], float) * 100
    for p, x, yv in zip(points, xs, ys):
        ax.scatter([x], [yv], s=70, color=p["color"], zorder=3, edgecolor="white", linewidth=1.0)
    if arrow is not None:
        i, j = arrow
        ax.annotate("", xy=(xs[j], ys[j]), xytext=(xs[i], ys[i]),
                    arrowprops={"arrowstyle": "->", "color": "#ea580c", "lw": 1.4, "shrinkA": 6, "shrinkB": 6})
    if xs.min() > 0 and xs.max() / xs.min() > 20:
        ax.set_xscale("log")
    else:
        lo, hi = xs.min(), xs.max()
        pad = 0.15 * (hi - lo) if hi > lo else 0.25 * max(abs(hi), 1e-9)
        ax.set_xlim(max(0.0, lo - pad), hi + pad * 1.6)  # room on the right for the labels
    lo, hi = np.nanmin(ys), np.nanmax(ys)
    pad = max(0.12 * (hi - lo), 1.0)
    ax.set_ylim(max(0.0, lo - pad), min(100.0, hi + pad))
    _labels(ax, fig, xs, ys, [p["label"] for p in points])
    ax.set_xlabel(xlabel, fontsize=8.5)
    ax.set_ylabel("mAP50-95 (%)", fontsize=8.5)
    return _save(fig, path)


def _labels(ax, fig, xs: np.ndarray, ys: np.ndarray, labels: Sequence[str]) -> None:
    """Point labels to the right of each point, pushed apart vertically where points of about the same
    x (same model size) would make them overlap."""
    from matplotlib.transforms import offset_copy

    y0, y1 = ax.get_ylim()
    gap = 0.055 * (y1 - y0)
    xr = np.log(xs) if ax.get_xscale() == "log" else xs
    span = max(float(np.ptp(xr)), 1e-9)
    ly = ys.copy()
    order = np.argsort(ys, kind="stable")
    for a, i in enumerate(order):
        for j in order[:a]:  # labels already placed below this one
            if abs(xr[i] - xr[j]) < 0.15 * span and ly[i] - ly[j] < gap:
                ly[i] = ly[j] + gap
    tr = offset_copy(ax.transData, fig=fig, x=7, y=0, units="points")
    for x, y, t in zip(xs, ly, labels):
        ax.text(x, y, t, transform=tr, fontsize=8, color="#111827", va="center")


def _column_title(col: str) -> str:
    if col.startswith("metrics/mAP50-95"):
        return "val mAP50-95 (%)"
    if col.startswith("metrics/mAP50"):
        return "val mAP50 (%)"
    return col


def training_curves(path, logs: Sequence[Mapping], columns: Sequence[str], ncols: int = 3) -> Path:
    """Training logs over epochs, one panel per ``columns`` entry, one line per model.

    ``logs[i]["data"]`` maps a results.csv column -> values; ``"epoch"`` is the x-axis. ``metrics/*``
    columns are shown as percentages.
    """
    ncols = max(1, min(ncols, len(columns)))
    nrows = math.ceil(len(columns) / ncols)
    fig = _figure(3.3 * ncols, 2.4 * nrows + 0.35)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for i, col in enumerate(columns):
        ax = axes[i // ncols][i % ncols]
        _tidy(ax)
        scale = 100.0 if col.startswith("metrics/") else 1.0
        for lg in logs:
            d = lg["data"]
            if col not in d:
                continue
            y = np.asarray(d[col], float) * scale
            x = np.asarray(d.get("epoch", np.arange(1, len(y) + 1)), float)
            ax.plot(x, y, color=lg["color"], ls=lg["ls"], lw=1.4, marker="o", ms=2.2, label=lg["label"])
        ax.set_title(_column_title(col), fontsize=8.5)
        ax.set_xlabel("epoch", fontsize=8)
    for j in range(len(columns), nrows * ncols):
        axes[j // ncols][j % ncols].set_visible(False)
    handles, labels = axes[0][0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside upper center", ncols=_legend_cols(fig, labels), fontsize=8.5,
                   frameon=False)
    return _save(fig, path)
