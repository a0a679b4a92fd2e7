"""Latency a user can trust: rows timed round-robin until they settle, and a plain verdict when the machine is
too noisy for the figures to mean anything.

On a shared CPU the load changes by the second, so rows measured one after another see different machines (the
same checkpoint's p50 has been seen to vary 100x between runs). `interleave` times every row in turn — one batch
of ``per_round`` runs of each row per round, the starting row rotating from round to round — so that a load change
hits every row alike, and repeats rounds until every row's *spread* is small or a time budget ends.

- spread of a row: interquartile range of its per-round medians divided by their median (`spread`);
- `noise_verdict` calls the measurement noisy when a row's p95/p50 is above ``P95_P50_MAX``, when a row's spread is
  above ``SPREAD_MAX``, or when rows of the same architecture (same parameters and GFLOPs) on the same engine and
  precision — which must run at the same speed — have p50s more than ``SAME_ARCH_MAX`` apart;
- `noise_line` is that verdict as one sentence for the table and the report.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence

import numpy as np

#: Rounds stop once every row's spread (IQR / median of its per-round medians) is at most this ...
STOP_SPREAD = 0.10
#: ... and the measurement is called noisy when a row's spread is still above this at the end,
SPREAD_MAX = 0.25
#: or when a row's p95 / p50 over all its runs is above this,
P95_P50_MAX = 1.5
#: or when same-architecture rows (same engine and precision) differ in p50 by more than this fraction.
SAME_ARCH_MAX = 0.25
#: Verdict sentence fragment used by the table, the report's headline and the demo.
NOISY_TEXT = "machine too noisy: latency figures unreliable"


def spread(values: Sequence[float]) -> float:
    """Interquartile range over median of ``values`` (per-round medians); 0 for fewer than two values."""
    if len(values) < 2:
        return 0.0
    v = np.asarray(values, dtype=np.float64)
    q25, q50, q75 = np.percentile(v, [25, 50, 75])
    return float((q75 - q25) / q50) if q50 > 0 else math.inf


def interleave(timers: Mapping[str, Callable[[int], Sequence[float]]], *, runs: int, per_round: int,
               budget_s: float, stop_spread: float = STOP_SPREAD, min_rounds: int = 3, max_rounds: int | None = None,
               clock: Callable[[], float] = time.monotonic,
               on_round: Callable[[int, dict], None] | None = None) -> dict:
    """Round-robin timing of ``timers`` (key -> ``f(k)`` returning ``k`` times in ms).

    Each round calls every timer once with ``per_round`` (the first timer of round ``i`` is the ``i % n``-th, so no
    row always follows the same one). Rounds stop when (a) at least ``ceil(runs / per_round)`` rounds ran and every
    row's `spread` is at most ``stop_spread`` ("settled"), or (b) at least ``min_rounds`` rounds ran and
    ``budget_s`` seconds have passed since the first round began ("budget"), or (c) ``max_rounds`` rounds ran
    ("max_rounds"; default 10x the rounds ``runs`` needs).

    Returns ``{"times": {key: [ms, ...]}, "round_p50": {key: [median of each round]}, "order": [key per call],
    "rounds", "per_round", "stopped", "seconds", "budget_s", "stop_spread"}``.
    """
    keys = list(timers)
    if not keys:
        raise ValueError("interleave needs at least one timer")
    per_round = max(1, int(per_round))
    need = max(int(min_rounds), math.ceil(max(1, int(runs)) / per_round))
    cap = max(need, int(max_rounds) if max_rounds is not None else 10 * need)
    times: dict[str, list[float]] = {k: [] for k in keys}
    round_p50: dict[str, list[float]] = {k: [] for k in keys}
    order: list[str] = []
    t0 = clock()
    rounds, stopped = 0, "max_rounds"
    while rounds < cap:
        start = rounds % len(keys)
        for k in keys[start:] + keys[:start]:
            ts = [float(t) for t in timers[k](per_round)]
            times[k] += ts
            round_p50[k].append(statistics.median(ts))
            order.append(k)
        rounds += 1
        if on_round is not None:
            on_round(rounds, {k: spread(v) for k, v in round_p50.items()})
        if rounds >= need and all(spread(v) <= stop_spread for v in round_p50.values()):
            stopped = "settled"
            break
        if rounds >= min_rounds and clock() - t0 >= budget_s:
            stopped = "budget"
            break
    return {"times": times, "round_p50": round_p50, "order": order, "rounds": rounds, "per_round": per_round,
            "stopped": stopped, "seconds": clock() - t0, "budget_s": float(budget_s), "stop_spread": stop_spread}


def _label(r: Mapping) -> str:
    eng = "eager" if r["engine"] == "pytorch" else "ORT"
    return f"{eng} {str(r['precision']).upper()}"


def noise_verdict(rows: Sequence[Mapping], *, p95_p50_max: float = P95_P50_MAX, spread_max: float = SPREAD_MAX,
                  same_arch_max: float = SAME_ARCH_MAX) -> dict:
    """Is the latency of ``rows`` (bench rows: ``model``, ``engine``, ``precision``, ``params``, ``gflops`` and
    ``latency_ms`` with ``p50``, ``p95`` and, when timed round-robin, ``spread``) too noisy to mean anything?

    Returns ``{"noisy": bool, "verdict": "noisy" | "quiet", "reasons": [sentence, ...], "thresholds": {...}}``.
    """
    reasons: list[str] = []
    for r in rows:
        lat = r["latency_ms"]
        p50, p95 = float(lat["p50"]), float(lat["p95"])
        ratio = p95 / p50 if p50 > 0 else math.inf
        if ratio > p95_p50_max:
            reasons.append(f"{r['model']} {_label(r)}: p95/p50 = {ratio:.2f} (limit {p95_p50_max:.2f}): "
                           f"{p50:.1f} vs {p95:.1f} ms")
        sp = lat.get("spread")
        if sp is not None and sp > spread_max:
            reasons.append(f"{r['model']} {_label(r)}: per-round medians spread {100 * sp:.0f}% of p50 "
                           f"(limit {100 * spread_max:.0f}%)")
    groups: dict[tuple, list[Mapping]] = {}
    for r in rows:
        g = r.get("gflops")
        key = (r.get("params"), None if g is None else round(float(g), 6), r["engine"], r["precision"])
        if key[0] is not None:
            groups.setdefault(key, []).append(r)
    for grp in groups.values():
        if len({r["model"] for r in grp}) < 2:
            continue
        fast = min(grp, key=lambda r: r["latency_ms"]["p50"])
        slow = max(grp, key=lambda r: r["latency_ms"]["p50"])
        a, b = float(fast["latency_ms"]["p50"]), float(slow["latency_ms"]["p50"])
        if a <= 0 or b / a - 1 > same_arch_max:
            reasons.append(f"{slow['model']} and {fast['model']} have the same architecture on {_label(fast)} but "
                           f"p50 {b:.1f} vs {a:.1f} ms ({b / a if a > 0 else math.inf:.2f}x; limit "
                           f"{1 + same_arch_max:.2f}x)")
    return {"noisy": bool(reasons), "verdict": "noisy" if reasons else "quiet", "reasons": reasons,
            "thresholds": {"p95_p50_max": p95_p50_max, "spread_max": spread_max,
                           "same_arch_p50_max_diff": same_arch_max, "stop_spread": STOP_SPREAD}}


def noise_line(noise: Mapping | None, max_reasons: int = 3) -> str | None:
    """The verdict as one sentence for under the latency table (None for results without a noise check); at most
    ``max_reasons`` reasons are spelled out."""
    if not noise:
        return None
    how = ""
    if noise.get("rounds"):
        why = {"settled": "every row settled", "budget": f"time budget of {noise.get('budget_s', 0):.0f} s reached",
               "max_rounds": "round cap reached"}.get(noise.get("stopped"), noise.get("stopped") or "")
        how = (f"rows timed round-robin, {noise['rounds']} rounds x {noise['per_round']} runs "
               f"({noise['rounds'] * noise['per_round']} runs per row, {noise.get('seconds', 0):.0f} s; {why})")
    th = noise.get("thresholds") or {}
    if noise.get("noisy"):
        reasons = list(noise.get("reasons") or [])
        shown = reasons[:max_reasons] + ([f"{len(reasons) - max_reasons} more in bench.json (noise.reasons)"]
                                         if len(reasons) > max_reasons else [])
        return (f"**{NOISY_TEXT[0].upper() + NOISY_TEXT[1:]}.** " + "; ".join(shown)
                + f". {how[0].upper() + how[1:] + '. ' if how else ''}Re-run on an idle machine, or with a longer "
                "--budget-s, before quoting these latencies or speed-ups.")
    return (f"Latency check: quiet. {how[0].upper() + how[1:] + '; ' if how else ''}every row's p95/p50 <= "
            f"{th.get('p95_p50_max', P95_P50_MAX):.2f} and per-round spread <= "
            f"{100 * th.get('spread_max', SPREAD_MAX):.0f}%, same-architecture rows agree within "
            f"{100 * th.get('same_arch_p50_max_diff', SAME_ARCH_MAX):.0f}%.")
