"""Static props of the synthetic scenes (lamps, trees, benches, bins, bollards, hydrants, signs, fences, hedges, racks,
cones): occluders and distractors, drawn once per camera into its background."""

from __future__ import annotations

import numpy as np

from detkd.data.synth.draw import _GREENS, _c, _pick, _shade, _Sprite



def _prop(rng: np.random.Generator, kind: str, **kw) -> dict:
    d = {"kind": kind, "flip": bool(rng.random() < 0.5)}
    if kind == "lamp":
        d.update(H=rng.uniform(4.5, 7.0), col=_c(rng, (60, 60, 65), 15), arm=kw.get("arm", 1.0))
    elif kind == "tree":
        d.update(H=rng.uniform(2.0, 3.2), R=rng.uniform(1.1, 2.3), blobs=rng.uniform(-1, 1, (6, 3)),
                 green=_c(rng, _pick(rng, _GREENS), 10), trunk=_c(rng, (40, 60, 85), 10))
    elif kind == "bench":
        d.update(col=_c(rng, _pick(rng, [(50, 90, 130), (60, 60, 60), (40, 80, 40)]), 10))
    elif kind == "bin":
        d.update(col=_c(rng, _pick(rng, [(40, 90, 40), (60, 60, 60), (30, 30, 30), (40, 60, 150)]), 10))
    elif kind == "hydrant":
        d.update(col=_c(rng, _pick(rng, [(30, 30, 190), (20, 180, 220)]), 10))
    elif kind == "sign":
        d.update(col=_c(rng, _pick(rng, [(170, 90, 20), (30, 30, 190), (230, 230, 230)]), 10),
                 round=bool(rng.random() < 0.5))
    elif kind == "fence":
        d.update(len=kw["len"], col=_c(rng, _pick(rng, [(40, 40, 40), (40, 70, 40), (120, 120, 120)]), 10),
                 mesh=bool(rng.random() < 0.5), H=rng.uniform(0.9, 1.3))
    elif kind == "hedge":
        d.update(len=rng.uniform(2, 6), green=_c(rng, _pick(rng, _GREENS), 10), bumps=rng.uniform(-1, 1, 8))
    elif kind == "rack":
        d.update(n=int(rng.integers(2, 5)))
    elif kind == "bollard":
        d.update(col=_c(rng, _pick(rng, [(40, 40, 40), (130, 130, 130)]), 10))
    elif kind == "cone":
        pass
    return d


def _prop_ext(p: dict) -> tuple[float, float, float, float]:
    k = p["kind"]
    if k == "lamp":
        return (-0.3, -p["H"] - 0.4, p["arm"] + 0.5, 0.02)
    if k == "tree":
        return (-2.3 * p["R"], -p["H"] - 2.6 * p["R"], 2.3 * p["R"], 0.02)
    if k in ("fence", "hedge"):
        return (-p["len"] / 2 - 0.1, -1.5, p["len"] / 2 + 0.1, 0.02)
    if k == "bench":
        return (-0.95, -1.0, 0.95, 0.02)
    if k == "rack":
        return (-0.5 * p["n"] - 0.2, -1.0, 0.5 * p["n"] + 0.2, 0.02)
    if k == "sign":
        return (-0.45, -3.0, 0.45, 0.02)
    return (-0.45, -1.2, 0.45, 0.02)


def _draw_prop(sp: _Sprite, p: dict) -> None:
    k = p["kind"]
    if k == "lamp":
        H, a = p["H"], p["arm"]
        sp.rect(-0.1, -0.5, 0.1, 0, _shade(p["col"], 0.8))
        sp.line([(0, 0), (0, -H)], 0.13, p["col"])
        sp.line([(0, -H), (0.1, -H - 0.2), (a, -H - 0.15)], 0.07, p["col"])
        sp.ellipse((a, -H - 0.08), (0.3, 0.1), (200, 200, 195))
    elif k == "tree":
        H, R = p["H"], p["R"]
        sp.poly([(-0.16, 0), (0.16, 0), (0.1, -H - R * 0.5), (-0.1, -H - R * 0.5)], p["trunk"])
        g = p["green"]
        for i, (dx, dy, dr) in enumerate(p["blobs"]):
            shade = 0.75 + 0.1 * i
            sp.ellipse((dx * R, -H - R * (1.1 + 0.45 * dy)), (R * (0.75 + 0.2 * dr), R * (0.65 + 0.15 * dr)),
                       _shade(g, shade))
    elif k == "bench":
        c = p["col"]
        for x in (-0.7, 0.7):
            sp.line([(x, 0), (x, -0.45)], 0.06, (40, 40, 40))
        sp.rect(-0.85, -0.42, 0.85, -0.49, c)
        sp.rect(-0.85, -0.6, 0.85, -0.86, c)
        sp.rect(-0.85, -0.69, 0.85, -0.75, _shade(c, 0.6))
    elif k == "bin":
        sp.rect(-0.25, -0.95, 0.25, 0, p["col"])
        sp.rect(-0.29, -1.02, 0.29, -0.92, _shade(p["col"], 0.7))
    elif k == "hydrant":
        c = p["col"]
        sp.rect(-0.11, -0.58, 0.11, 0, c)
        sp.ellipse((0, -0.58), (0.11, 0.08), c, a0=180, a1=360)
        sp.rect(-0.2, -0.42, 0.2, -0.34, _shade(c, 0.8))
        sp.rect(-0.16, -0.05, 0.16, 0, _shade(c, 0.7))
    elif k == "sign":
        sp.line([(0, 0), (0, -2.3)], 0.06, (130, 130, 130))
        if p["round"]:
            sp.ellipse((0, -2.55), (0.32, 0.32), (240, 240, 240))
            sp.ellipse((0, -2.55), (0.28, 0.28), p["col"])
        else:
            sp.rect(-0.35, -2.95, 0.35, -2.25, p["col"])
            sp.rect(-0.3, -2.65, 0.3, -2.55, (240, 240, 240))
    elif k == "fence":
        L, H, c = p["len"], p["H"], p["col"]
        n = max(2, int(L / 2.0) + 1)
        for x in np.linspace(-L / 2, L / 2, n):
            sp.line([(x, 0), (x, -H)], 0.06, c)
        for y in (-0.15, -H + 0.05):
            sp.line([(-L / 2, y), (L / 2, y)], 0.05, c)
        if p["mesh"]:
            for x in np.arange(-L / 2, L / 2, 0.18):
                sp.line([(x, -0.15), (x, -H + 0.05)], 0.02, c)
    elif k == "hedge":
        L = p["len"]
        g = p["green"]
        sp.rect(-L / 2, -0.75, L / 2, 0, _shade(g, 0.8))
        for i, b in enumerate(p["bumps"]):
            x = -L / 2 + (i + 0.5) * L / len(p["bumps"])
            sp.ellipse((x, -0.75), (L / len(p["bumps"]) * 0.7, 0.18 + 0.06 * b), g)
    elif k == "rack":
        for i in range(p["n"]):
            x = (i - (p["n"] - 1) / 2) * 0.8
            sp.line([(x - 0.3, 0), (x - 0.3, -0.55)], 0.04, (150, 150, 155))
            sp.line([(x + 0.3, 0), (x + 0.3, -0.55)], 0.04, (150, 150, 155))
            sp.ellipse((x, -0.55), (0.3, 0.3), (150, 150, 155), a0=180, a1=360, t=0.04)
    elif k == "bollard":
        sp.rect(-0.08, -0.85, 0.08, 0, p["col"])
        sp.rect(-0.085, -0.72, 0.085, -0.64, (200, 210, 210))
    elif k == "cone":
        sp.poly([(-0.2, 0), (0.2, 0), (0.2, -0.04), (0.06, -0.04), (0.02, -0.7), (-0.02, -0.7), (-0.06, -0.04),
                 (-0.2, -0.04)], (20, 100, 235))
        sp.poly([(-0.045, -0.3), (0.045, -0.3), (0.035, -0.42), (-0.035, -0.42)], (235, 235, 235))
