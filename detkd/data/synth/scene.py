"""The objects of one frame: what stands where (riders on bicycles, bags carried or set down, dogs on a lead)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from detkd.data.synth.camera import _Camera
from detkd.data.synth.draw import _pick
from detkd.data.synth.objects import _LOOK, _bag_look, _dog_look, _person_look

_MAX_OBJECTS = 15


# Primary actor weights (bags also come with people, riders with bicycles).
_ACTOR_WEIGHTS = {"person": 0.34, "car": 0.24, "bicycle": 0.15, "dog": 0.12, "bag": 0.15}




@dataclass
class _Actor:
    cls: str  # drawing kind: person / car / bicycle / dog / bag / rider
    label: str | None  # class name written to the labels (rider -> person)
    x: float
    y: float
    ppm: float
    look: dict
    flip: bool
    key: float
    blur: int = 0


def _sample_ground(cam: _Camera, rng: np.random.Generator, regions: Sequence[tuple], height_m: float,
                   min_px: float, ymax_frac: float) -> tuple[float, float] | None:
    """A foot point (x, y) in the image, uniform in image rows over ``regions`` (world rectangles), with the
    object at least ``min_px`` pixels tall. 24 vectorised candidates; None if none fits."""
    g, S = cam.g, cam.g.S
    n = 24
    reg = np.asarray([r[:4] for r in regions], np.float64)[rng.integers(len(regions), size=n)]
    y_lo = np.maximum(np.asarray(g.img(0, reg[:, 3])[1]), g.yh + min_px * g.hc / height_m)
    y_hi = np.minimum(np.asarray(g.img(0, reg[:, 2])[1]), ymax_frac * S)
    y = y_lo + rng.random(n) * (y_hi - y_lo)
    Z = g.depth(y)
    X_lo = np.maximum(reg[:, 0], (-0.08 * S - g.vx) * Z / g.f)
    X_hi = np.minimum(reg[:, 1], (1.08 * S - g.vx) * Z / g.f)
    X = X_lo + rng.random(n) * (X_hi - X_lo)
    ok = (y_hi > y_lo) & (X_hi > X_lo) & (y > g.yh + 0.5)
    if not ok.any():
        return None
    i = int(np.argmax(ok))
    return float(g.vx + g.f * X[i] / Z[i]), float(y[i])


def _sample_actors(cam: _Camera, rng: np.random.Generator, enabled: Sequence[str], night: bool) -> list[_Actor]:
    """0-15 labelled objects for one frame (with riders and carried bags attached to their hosts)."""
    g = cam.g
    n_target = int(rng.integers(0, _MAX_OBJECTS + 1))
    kinds = [k for k in _ACTOR_WEIGHTS if k in enabled]
    w = np.asarray([_ACTOR_WEIGHTS[k] for k in kinds])
    w /= w.sum()
    actors: list[_Actor] = []
    tries = 0
    while len(actors) < n_target and tries < 3 * _MAX_OBJECTS:
        tries += 1
        kind = kinds[int(rng.choice(len(kinds), p=w))]
        look = _LOOK[kind](rng)
        min_px = rng.uniform(4.0, 9.0)
        if kind == "car":
            regs = cam.roads
            reg_i = int(rng.integers(len(regs)))
            ax = regs[reg_i][4]
            pos = _sample_ground(cam, rng, [regs[reg_i]], look["H"], min_px, 1.08)
            if pos is None:
                continue
            X = (pos[0] - g.vx) * float(g.depth(pos[1])) / g.f
            if ax == "z":
                mid = (regs[reg_i][0] + regs[reg_i][1]) / 2
                look["view"] = "front" if (X < mid) != (rng.random() < 0.15) else "rear"
            elif ax == "x":
                look["view"] = "side"
            else:
                look["view"] = _pick(rng, ("side", "side", "front", "rear"))
            look["lights_on"] = night or rng.random() < 0.1
            height = look["H"]
        else:
            height = {"person": look.get("H", 1.7), "bicycle": 1.05, "dog": 1.4 * look.get("H", 0.5), "bag": 0.5}[kind]
            regs = cam.walk if (kind != "bicycle" or rng.random() < 0.6) else [r[:4] for r in cam.roads]
            pos = _sample_ground(cam, rng, regs, height, min_px, 1.12)
            if pos is None:
                continue
        x, y = pos
        ppm = g.ppm(y)
        flip = bool(rng.random() < 0.5)
        key = y + rng.uniform(-1e-3, 1e-3)
        blur = 0
        moving_px = {"car": 0.6, "bicycle": 0.35, "person": 0.08, "dog": 0.15}.get(kind, 0.0) * ppm
        if kind != "bag" and (look.get("view") == "side" or kind in ("bicycle", "dog")) and rng.random() < 0.3:
            blur = int(min(moving_px * rng.uniform(0.3, 1.0), 0.12 * ppm * 4.0))
        label = kind
        if kind == "bicycle" and "person" in enabled and look["view"] == "side" and rng.random() < 0.45 \
                and len(actors) + 2 <= n_target:
            look["rider"] = True
            look["person"] = _person_look(rng)
            actors.append(_Actor("bicycle", "bicycle", x, y, ppm, look, flip, key, blur))
            actors.append(_Actor("rider", "person", x, y, ppm, look, flip, key + 2e-3, blur))
            continue
        actors.append(_Actor(kind, label, x, y, ppm, look, flip, key, blur))
        if kind == "person" and "bag" in enabled and len(actors) < n_target and rng.random() < 0.35:
            bl = _bag_look(rng)
            H = look["H"]
            if bl["kind"] in ("suitcase", "duffel", "backpack") or rng.random() < 0.3:  # next to the person
                dx = rng.choice([-1, 1]) * rng.uniform(0.3, 0.6)
                actors.append(_Actor("bag", "bag", x + dx * ppm, y + rng.uniform(-0.3, 0.6), ppm, bl, flip,
                                     key + rng.choice([-2e-3, 2e-3])))
            else:  # carried: bag handle at the hand
                if look["view"] in ("front", "back"):
                    hx = rng.choice([-1, 1]) * (0.125 * look["bulk"] + 0.01) * H
                else:
                    hx = -0.7 * look["stride"] * H * math.sin(look["phase"])
                    hx = -hx if flip else hx
                top = 0.3 * bl["s"] if bl["kind"] == "handbag" else 0.45 * bl["s"]
                by = y + (-0.5 * H + top) * ppm
                actors.append(_Actor("bag", "bag", x + hx * ppm, by, ppm, bl, flip, key + 1e-3))
        if kind == "person" and "dog" in enabled and len(actors) < n_target and rng.random() < 0.12:
            dl = _dog_look(rng)
            dx = rng.choice([-1, 1]) * rng.uniform(0.8, 1.6)
            actors.append(_Actor("dog", "dog", x + dx * ppm, y + rng.uniform(-0.5, 1.5), ppm, dl, flip, key + 3e-3))
    return actors
