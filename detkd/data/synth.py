"""Built-in benchmark: synthetic fixed security-camera footage with boxes, in Ultralytics and COCO layouts.

`generate(out_dir)` writes a detection dataset that looks like square ``imgsz`` x ``imgsz`` frames from
``n_cameras`` (default 8) fixed CCTV cameras. Everything is drawn procedurally with numpy/cv2 (no asset files,
nothing downloaded) and is a pure function of ``(seed, split, index)``: the same seed gives byte-identical
label files and identical images, whatever the number of worker processes. `render_frame` renders one frame in
memory (image, boxes, labels).

Scene model (one per camera, built once per process and cached):

* A pinhole camera at height ``hc`` metres over a flat ground plane, image rows measured from the horizon
  ``yh`` (which may lie above the frame for steep cameras) and a vanishing point ``vx``. A ground point at
  depth ``Z`` and lateral offset ``X`` projects to ``x = vx + f X / Z``, ``y = yh + f hc / Z``; an object of
  height ``H`` metres standing at image row ``y`` is ``H (y - yh) / hc`` pixels tall, so size follows the
  perspective (a few pixels near the horizon, > 100 px at the bottom of a low camera).
* Layouts ``street`` / ``crossing`` / ``plaza`` / ``parking``: textured asphalt, paving and grass, lane
  markings, zebra crossings, parking bays, building facades with windows, a far skyline, and static props
  (lamp posts, trees, bins, bollards, benches, hydrants, signs, fences, hedges, bike racks). Props stand on
  the ground and occlude whatever stands behind them.
* Lighting per frame: day (gain, white balance, sun shadows, haze toward the horizon) or night (dark blue
  ambient light, lamp light pools and glare, lit windows, car head/tail lights; some cameras switch to
  grey IR mode), then vignetting, sensor noise, sometimes a low-resolution stream, an on-screen timestamp,
  and JPEG compression at quality 30-95.

Objects (``DEFAULT_CLASSES``): people (front/back/side views, walking stride, clothes, children, cyclists),
cars (sedan/hatchback/SUV/van, side, front and rear views), bicycles (thin frames, side or end-on, parked
or ridden), dogs, and bags (handbags, shopping bags, suitcases, backpacks, duffels; often carried by or
standing next to a person). Each frame holds 0-15 objects, drawn far-to-near together with the props, so
they occlude one another. Some moving objects get motion blur.

Boxes are the tight extents of each object's *visible* pixels (coverage > 25 % after anti-aliasing),
clipped to the image, in integer pixels. An object is dropped when more than 80 % of its drawn area is
hidden (by nearer objects, props, the on-screen text or the image border) or when its visible box is less
than 4 px wide or high, so no zero-area box is ever written.

Layouts written under ``out_dir``:

* Ultralytics: ``images/{train,val}/NNNNNN.jpg``, ``labels/{train,val}/NNNNNN.txt`` (``class cx cy w h``,
  normalised, 6 decimals; empty file for an empty frame) and ``data.yaml`` (``path`` absolute, ``train``,
  ``val``, ``names`` as ``{index: name}``; no ``download`` key).
* COCO: ``annotations/instances_{train,val}.json``: image ids 1..N (the file stem), ``file_name`` relative
  to ``images/{split}/``, ``bbox`` ``[x, y, w, h]`` pixels, ``area = w * h``, ``iscrowd = 0``, category ids
  1..K in class order.

Optional held-out splits, written the same way (``images/<split>``, ``labels/<split>``,
``annotations/instances_<split>.json`` and a ``<split>:`` key in ``data.yaml``) only when asked for, so train
and val output stays byte-identical whether or not they are:

* ``test`` (``n_test`` frames): in-distribution, the same ``n_cameras`` cameras as train and val.
* ``test_ood`` (``n_test_ood`` frames, ``ood_cameras`` > 0): unseen cameras, indices ``n_cameras`` ..
  ``n_cameras + ood_cameras - 1`` (named ``CAM <index + 1>``), which never appear in train, val or test. A
  camera is a pure function of ``(seed, camera index)``, so these are new scenes (geometry, layout, props,
  lighting), not new frames of known ones.

Speed: each camera's background, props and light maps are built once per process (about 0.1 s each); a
320 px frame then costs about 10 ms of one CPU core including JPEG encoding (2,000 frames: about 25 s). Object
sprites are drawn supersampled (2-4x for small objects) on small local canvases; every full-frame operation is
a single numpy/cv2 call.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import yaml

__all__ = ["DEFAULT_CLASSES", "generate", "render_frame"]

#: Classes of the built-in benchmark, in label-index order.
DEFAULT_CLASSES: tuple[str, ...] = ("person", "car", "bicycle", "dog", "bag")

_SPLIT_IDS = {"train": 0, "val": 1, "test": 2, "test_ood": 3}
_KINDS = ("street", "crossing", "plaza", "parking")
_VIS_THR = 0.25  # alpha above which a pixel counts as belonging to an object
_MIN_VISIBLE = 0.2  # keep an object only if at least this fraction of its drawn area is visible
_MIN_SIDE = 4  # px; smaller visible boxes are dropped
_MAX_OBJECTS = 15
_NIGHT_P = 0.35

# Primary actor weights (bags also come with people, riders with bicycles).
_ACTOR_WEIGHTS = {"person": 0.34, "car": 0.24, "bicycle": 0.15, "dog": 0.12, "bag": 0.15}

Color = tuple[float, float, float]


# ----------------------------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------------------------


def _c(rng: np.random.Generator, base: Sequence[float], jitter: float = 12.0) -> Color:
    """``base`` (BGR) plus uniform jitter, clipped to 0..255."""
    v = np.clip(np.asarray(base, np.float64) + rng.uniform(-jitter, jitter, 3), 0, 255)
    return (float(v[0]), float(v[1]), float(v[2]))


def _pick(rng: np.random.Generator, seq: Sequence[Any]) -> Any:
    return seq[int(rng.integers(len(seq)))]


def _shade(col: Color, k: float) -> Color:
    return tuple(float(min(255.0, v * k)) for v in col)  # type: ignore[return-value]


def _noise2d(rng: np.random.Generator, h: int, w: int, cells: Sequence[int], weights: Sequence[float]) -> np.ndarray:
    """Value noise: sum of bicubically upsampled uniform grids with cell sizes ``cells`` px. float32 (h, w)."""
    out = np.zeros((h, w), np.float32)
    for cell, wt in zip(cells, weights):
        g = rng.uniform(-1, 1, (h // cell + 3, w // cell + 3)).astype(np.float32)
        big = cv2.resize(g, ((w // cell + 3) * cell, (h // cell + 3) * cell), interpolation=cv2.INTER_CUBIC)
        out += wt * big[cell : cell + h, cell : cell + w]
    return out


def _gauss_sprite(n: int = 41) -> np.ndarray:
    r = np.linspace(-1, 1, n, dtype=np.float32)
    d2 = r[None] ** 2 + r[:, None] ** 2
    return np.exp(-d2 / (2 * 0.28**2)).astype(np.float32)


_GLOW = _gauss_sprite()


def _add_glow(img: np.ndarray, x: float, y: float, r: float, color: Color, strength: float,
              ry: float | None = None) -> None:
    """Add a Gaussian glow of radius ``r`` px (``ry`` vertically; about 3 sigma) and peak ``strength * color / 255``
    in place; ``img`` is (H, W, 3) or (H, W) (then ``color[0]`` is used)."""
    r = max(1.0, r)
    ry = r if ry is None else max(1.0, ry)
    n, m = 2 * int(math.ceil(r)) + 1, 2 * int(math.ceil(ry)) + 1
    x0, y0 = int(round(x)) - n // 2, int(round(y)) - m // 2
    H, W = img.shape[:2]
    xa, ya, xb, yb = max(x0, 0), max(y0, 0), min(x0 + n, W), min(y0 + m, H)
    if xa >= xb or ya >= yb:
        return
    g = cv2.resize(_GLOW, (n, m), interpolation=cv2.INTER_LINEAR)[ya - y0 : yb - y0, xa - x0 : xb - x0]
    if img.ndim == 2:
        img[ya:yb, xa:xb] += g * np.float32(color[0] * strength / 255.0)
    else:
        img[ya:yb, xa:xb] += g[..., None] * (np.asarray(color, np.float32) * (strength / 255.0))


def _composite(img: np.ndarray, idmap: np.ndarray, x0: int, y0: int, pm: np.ndarray, a: np.ndarray, k: int) -> None:
    """Premultiplied-alpha 'over' of ``pm``/``a`` at ``(x0, y0)`` into ``img``; ``idmap`` gets ``k`` where
    ``a > _VIS_THR`` (k = 0 for props: they hide what is behind)."""
    H, W = idmap.shape
    h, w = a.shape
    xa, ya, xb, yb = max(x0, 0), max(y0, 0), min(x0 + w, W), min(y0 + h, H)
    if xa >= xb or ya >= yb:
        return
    sa = a[ya - y0 : yb - y0, xa - x0 : xb - x0]
    roi = img[ya:yb, xa:xb]
    inv = 1.0 - sa
    cv2.multiply(roi, cv2.merge((inv, inv, inv)), dst=roi)
    cv2.add(roi, pm[ya - y0 : yb - y0, xa - x0 : xb - x0], dst=roi)
    idmap[ya:yb, xa:xb][sa > _VIS_THR] = k


# ----------------------------------------------------------------------------------------------------------
# Camera geometry and sprites
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Geom:
    """Level pinhole camera with a shifted principal point: verticals stay vertical, ground lines meet at
    ``(vx, yh)``. Units: pixels for ``S, f, vx, yh``; metres for ``hc`` (camera height)."""

    S: int
    f: float
    vx: float
    yh: float
    hc: float

    def img(self, X, Z, Y=0.0) -> tuple[np.ndarray, np.ndarray]:
        """World (X right, Y up, Z depth; metres) -> image (x, y) pixels."""
        Z = np.maximum(np.asarray(Z, np.float64), 0.05)
        return self.vx + self.f * np.asarray(X, np.float64) / Z, self.yh + self.f * (self.hc - np.asarray(Y)) / Z

    def depth(self, y) -> np.ndarray:
        """Depth Z of the ground at image row y (rows below the horizon)."""
        return self.f * self.hc / np.maximum(np.asarray(y, np.float64) - self.yh, 1e-6)

    def ppm(self, y: float) -> float:
        """Pixels per metre for an object standing at row y."""
        return (y - self.yh) / self.hc

    def scaled(self, k: int) -> _Geom:
        return _Geom(self.S * k, self.f * k, self.vx * k, self.yh * k, self.hc)


class _Sprite:
    """A supersampled local canvas for one object, drawn in metres around its ground anchor.

    Coordinates: x right (mirrored when ``flip``), y down (negative = above the ground), metres; ``ppm``
    pixels per metre. `finish` returns the premultiplied colour ``(h, w, 3)`` float32 and the coverage
    ``(h, w)`` float32 in 0..1 at image resolution, placed at integer ``(ix0, iy0)``.
    """

    def __init__(self, fx: float, fy: float, ppm: float, ext: Sequence[float], flip: bool = False):
        xmin, ymin, xmax, ymax = ext
        if flip:
            xmin, xmax = -xmax, -xmin
        hp = max((ymax - ymin), (xmax - xmin)) * ppm
        self.ss = ss = 4 if hp < 48 else (2 if hp < 160 else 1)
        self.ix0 = int(math.floor(fx + xmin * ppm)) - 1
        self.iy0 = int(math.floor(fy + ymin * ppm)) - 1
        self.w = int(math.ceil(fx + xmax * ppm)) + 2 - self.ix0
        self.h = int(math.ceil(fy + ymax * ppm)) + 2 - self.iy0
        self.ox, self.oy = fx - self.ix0, fy - self.iy0
        self.k, self.sx = ppm, (-1.0 if flip else 1.0)
        self.can = np.zeros((self.h * ss, self.w * ss, 4), np.uint8)  # BGR + coverage, drawn in one pass

    def _xy(self, pts) -> np.ndarray:
        # plain Python: point lists are short, numpy call overhead would dominate
        a, b = self.sx * self.k * self.ss * 16, self.ox * self.ss * 16
        c, d = self.k * self.ss * 16, self.oy * self.ss * 16
        return np.array([(round(x * a + b), round(y * c + d)) for x, y in pts], np.int32)

    def _t(self, t: float) -> int:
        return max(1, int(round(t * self.k * self.ss)))

    def poly(self, pts, c: Color) -> None:
        cv2.fillPoly(self.can, [self._xy(pts)], (*c, 255), cv2.LINE_AA, 4)

    def rect(self, x0: float, y0: float, x1: float, y1: float, c: Color) -> None:
        self.poly([(x0, y0), (x1, y0), (x1, y1), (x0, y1)], c)

    def line(self, pts, t: float, c: Color) -> None:
        cv2.polylines(self.can, [self._xy(pts)], False, (*c, 255), self._t(t), cv2.LINE_AA, 4)

    def ellipse(self, c, ax, col: Color, angle: float = 0.0, a0: float = 0.0, a1: float = 360.0,
                t: float = 0.0) -> None:
        """Filled ellipse (``t > 0``: outline of thickness ``t`` m); angles in degrees as in cv2.ellipse."""
        ctr = tuple(int(v) for v in self._xy([c])[0])  # noqa: C409
        axes = (max(1, int(round(ax[0] * self.k * self.ss * 16))), max(1, int(round(ax[1] * self.k * self.ss * 16))))
        if self.sx < 0:
            angle, a0, a1 = -angle, 180.0 - a1, 180.0 - a0
        th = -1 if t <= 0 else self._t(t)
        cv2.ellipse(self.can, ctr, axes, angle, a0, a1, (*col, 255), th, cv2.LINE_AA, 4)

    def finish(self, blur: int = 0) -> tuple[int, int, np.ndarray, np.ndarray]:
        can = self.can
        if self.ss > 1:
            can = cv2.resize(can, (self.w, self.h), interpolation=cv2.INTER_AREA)
        pm = can[..., :3].astype(np.float32)
        a = can[..., 3].astype(np.float32) * np.float32(1.0 / 255.0)
        ix0 = self.ix0
        if blur > 1:  # horizontal motion blur; pad so the streak is not cut off
            p = blur // 2 + 1
            pm = cv2.blur(cv2.copyMakeBorder(pm, 0, 0, p, p, cv2.BORDER_CONSTANT, value=0), (blur, 1))
            a = cv2.blur(cv2.copyMakeBorder(a, 0, 0, p, p, cv2.BORDER_CONSTANT, value=0), (blur, 1))
            ix0 -= p
        return ix0, self.iy0, pm, a


# ----------------------------------------------------------------------------------------------------------
# Palettes
# ----------------------------------------------------------------------------------------------------------

_SKIN = [(170, 200, 240), (140, 175, 225), (110, 150, 200), (80, 115, 165), (55, 80, 120), (45, 60, 90)]
_HAIR = [(20, 20, 25), (30, 40, 60), (40, 70, 110), (90, 140, 190), (150, 150, 150), (60, 60, 160)]
_CLOTHES = [
    (30, 30, 30), (45, 40, 35), (90, 60, 30), (120, 80, 40), (130, 130, 130), (200, 200, 200), (235, 235, 235),
    (40, 40, 170), (30, 60, 200), (40, 170, 220), (60, 130, 60), (30, 80, 40), (150, 100, 60), (170, 60, 120),
    (60, 90, 140), (180, 150, 110), (80, 80, 110), (20, 120, 240), (200, 120, 40), (110, 60, 130),
]
_CAR_COLORS = [
    (235, 235, 235), (25, 25, 28), (170, 170, 170), (110, 110, 115), (40, 40, 180), (150, 70, 20), (40, 80, 40),
    (20, 180, 235), (60, 40, 30), (210, 210, 200), (90, 100, 120), (30, 30, 120), (140, 40, 40),
]
_DOG_COLORS = [(40, 70, 120), (25, 25, 30), (220, 225, 230), (80, 160, 210), (100, 110, 120), (60, 100, 160)]
_BAG_COLORS = [(25, 25, 30), (40, 60, 100), (70, 120, 170), (40, 40, 150), (150, 90, 40), (200, 200, 205),
               (90, 150, 200), (60, 100, 60), (130, 60, 120), (30, 140, 220)]
_FACADES = [(70, 90, 150), (160, 190, 210), (150, 150, 150), (210, 215, 215), (90, 90, 100), (140, 200, 225),
            (195, 180, 150), (120, 140, 130), (60, 70, 110), (175, 175, 185)]
_GREENS = [(40, 90, 50), (30, 75, 40), (50, 110, 70), (35, 95, 80), (45, 85, 60)]


# ----------------------------------------------------------------------------------------------------------
# Objects (drawn facing +x, metres, origin on the ground under the object)
# ----------------------------------------------------------------------------------------------------------


def _person_look(rng: np.random.Generator) -> dict:
    child = rng.random() < 0.1
    return {
        "H": rng.uniform(1.0, 1.4) if child else rng.uniform(1.55, 1.92),
        "skin": _c(rng, _pick(rng, _SKIN), 8),
        "hair": _c(rng, _pick(rng, _HAIR), 8),
        "top": _c(rng, _pick(rng, _CLOTHES), 18),
        "bottom": _c(rng, _pick(rng, _CLOTHES[:9] + _CLOTHES[14:17]), 14),
        "shoes": _c(rng, (30, 30, 35), 20),
        "style": _pick(rng, ("pants", "pants", "pants", "coat", "dress", "shorts")),
        "bulk": rng.uniform(0.9, 1.25),
        "hat": rng.random() < 0.12,
        "long_hair": rng.random() < 0.3,
        "view": _pick(rng, ("front", "back", "side", "side")),
        "stride": rng.uniform(0.0, 0.2) if rng.random() < 0.8 else 0.0,
        "phase": rng.uniform(0, 2 * math.pi),
        "phone": rng.random() < 0.1,
    }


def _person_ext(look: dict) -> tuple[float, float, float, float]:
    H = look["H"]
    return (-0.42 * H, -1.04 * H, 0.42 * H, 0.03 * H)


def _draw_person(sp: _Sprite, L: dict) -> list:
    """Standing or walking person of height L['H'] metres; front/back view or side view (facing +x)."""
    s, b = L["H"], L["bulk"]
    y_sh, y_hip, y_knee, y_ank = -0.815 * s, -0.53 * s, -0.29 * s, -0.035 * s
    leg_t, arm_t = 0.078 * s * b, 0.056 * s * b
    low_leg = L["skin"] if L["style"] == "shorts" else L["bottom"]
    hand = []
    if L["view"] in ("front", "back"):
        hw, hh = 0.125 * s * b, 0.095 * s * b
        st = 0.02 * s * math.sin(L["phase"])
        for sg in (-1, 1):
            hip = (sg * 0.05 * s, y_hip)
            knee, ank = (sg * 0.055 * s, y_knee + sg * st), (sg * 0.06 * s, y_ank + sg * st)
            sp.line([hip, knee], leg_t, L["bottom"])
            sp.line([knee, ank], leg_t * 0.9, low_leg)
            sp.ellipse((ank[0], ank[1] + 0.015 * s), (0.045 * s, 0.022 * s), L["shoes"])
        sp.rect(-hh, y_hip - 0.03 * s, hh, y_hip + 0.06 * s, L["bottom"])
        if L["style"] == "dress":
            skirt = [(-0.09, -0.6), (0.09, -0.6), (0.17, -0.3), (-0.17, -0.3)]
            sp.poly([(u * s, v * s) for u, v in skirt], L["top"])
        bottom_y = -0.36 * s if L["style"] == "coat" else y_hip + 0.02 * s
        flare = 0.03 * s if L["style"] == "coat" else 0.0
        sp.poly([(-hw, y_sh), (hw, y_sh), (hh + flare, bottom_y), (-hh - flare, bottom_y)], L["top"])
        for sg in (-1, 1):
            sh = (sg * (hw - 0.02 * s), y_sh + 0.025 * s)
            if L["phone"] and sg > 0:
                el, hd = (sg * (hw + 0.03 * s), -0.66 * s), (sg * 0.07 * s, -0.86 * s)
            else:
                el, hd = (sg * (hw + 0.015 * s), -0.665 * s), (sg * (hw + 0.01 * s), -0.505 * s)
            sp.line([sh, el, hd], arm_t, L["top"])
            sp.ellipse(hd, (0.026 * s, 0.028 * s), L["skin"])
            hand.append(hd)
        sp.rect(-0.028 * s, -0.87 * s, 0.028 * s, y_sh + 0.01 * s, L["skin"])
        face = L["hair"] if L["view"] == "back" else L["skin"]
        sp.ellipse((0, -0.925 * s), (0.062 * s, 0.075 * s), face)
        if L["long_hair"]:
            sp.rect(-0.066 * s, -0.93 * s, 0.066 * s, -0.8 * s if L["view"] == "back" else -0.86 * s, L["hair"])
        sp.ellipse((0, -0.94 * s), (0.066 * s, 0.066 * s), L["hair"], a0=180, a1=360)
    else:  # side view, facing +x
        a = L["stride"] * s * math.sin(L["phase"])
        far_b, far_t = _shade(L["bottom"], 0.75), _shade(L["top"], 0.75)
        for sg, cb in ((-1, far_b), (1, L["bottom"])):
            foot = sg * a
            knee = (0.5 * foot + 0.03 * s * (1 if sg * a < 0 else 0.4), y_knee)
            ank = (foot, y_ank)
            sp.line([(0, y_hip), knee], leg_t, cb)
            sp.line([knee, ank], leg_t * 0.9, _shade(low_leg, 0.75) if sg < 0 else low_leg)
            sp.ellipse((foot + 0.03 * s, -0.018 * s), (0.055 * s, 0.02 * s), L["shoes"])
            if sg < 0:  # far arm behind the torso
                sp.line([(0, y_sh + 0.03 * s), (0.3 * a, -0.66 * s), (0.7 * a, -0.51 * s)], arm_t, far_t)
        if L["style"] == "dress":
            skirt = [(-0.06, -0.6), (0.06, -0.6), (0.12, -0.3), (-0.11, -0.3)]
            sp.poly([(u * s, v * s) for u, v in skirt], L["top"])
        bottom_y = -0.36 * s if L["style"] == "coat" else y_hip + 0.02 * s
        sp.poly([(-0.065 * s, y_sh), (0.07 * s, y_sh), (0.065 * s, bottom_y), (-0.07 * s, bottom_y)], L["top"])
        sp.rect(-0.025 * s, -0.87 * s, 0.03 * s, y_sh + 0.01 * s, L["skin"])
        sp.ellipse((0.012 * s, -0.925 * s), (0.058 * s, 0.075 * s), L["skin"])
        sp.ellipse((0.066 * s, -0.915 * s), (0.014 * s, 0.012 * s), L["skin"])  # nose
        sp.ellipse((-0.005 * s, -0.94 * s), (0.062 * s, 0.066 * s), L["hair"], a0=150, a1=360)
        if L["long_hair"]:
            sp.rect(-0.06 * s, -0.93 * s, 0.0, -0.82 * s, L["hair"])
        hd = (-0.7 * a, -0.51 * s)
        sp.line([(0, y_sh + 0.03 * s), (-0.3 * a, -0.66 * s), hd], arm_t, L["top"])
        sp.ellipse(hd, (0.026 * s, 0.028 * s), L["skin"])
        hand.append(hd)
    if L["hat"]:
        sp.ellipse((0, -0.975 * s), (0.07 * s, 0.04 * s), _shade(L["top"], 0.6), a0=180, a1=360)
        sp.rect(-0.08 * s, -0.978 * s, 0.08 * s, -0.965 * s, _shade(L["top"], 0.6))
    return hand


# Bicycle side-view geometry (metres, facing +x).
_BIKE = {"r": 0.34, "rear": (-0.52, -0.34), "front": (0.52, -0.34), "bb": (-0.04, -0.29), "seat": (-0.21, -0.86),
         "head_top": (0.36, -0.84), "head_bot": (0.40, -0.70), "saddle": (-0.23, -0.92), "bar": (0.27, -1.0)}


def _bike_look(rng: np.random.Generator) -> dict:
    return {
        "frame": _c(rng, _pick(rng, _CAR_COLORS + [(20, 20, 200), (200, 60, 20), (30, 200, 30)]), 20),
        "tyre": _c(rng, (25, 25, 25), 8),
        "view": "side" if rng.random() < 0.85 else "end",
        "crank": rng.uniform(0, 2 * math.pi),
        "rider": False,
        "scale": rng.uniform(0.85, 1.1),
    }


def _bike_ext(look: dict) -> tuple[float, float, float, float]:
    k = look["scale"]
    if look["rider"]:
        return (-0.95 * k, -1.85 * k, 0.95 * k, 0.03)
    return (-0.92 * k, -1.08 * k, 0.92 * k, 0.03)


def _draw_bicycle(sp: _Sprite, L: dict) -> list:
    k, G = L["scale"], _BIKE
    P = {n: (v[0] * k, v[1] * k) for n, v in G.items() if n != "r"}
    r, fr, ty = G["r"] * k, L["frame"], L["tyre"]
    if L["view"] == "end":  # seen from front/back: a thin vertical sliver with a handlebar
        sp.ellipse((0, -r), (0.03 * k, r), ty)
        sp.line([(0, -0.3 * k), (0, -0.95 * k)], 0.04 * k, fr)
        sp.line([(-0.3 * k, -0.98 * k), (0.3 * k, -0.98 * k)], 0.03 * k, _shade(fr, 0.5))
        sp.ellipse((0, -0.9 * k), (0.06 * k, 0.03 * k), (30, 30, 30))
        return []
    for hub in (P["rear"], P["front"]):
        sp.ellipse(hub, (r, r), ty, t=0.045 * k)
        sp.ellipse(hub, (r * 0.86, r * 0.86), (150, 150, 150), t=0.012 * k)
        for ang in np.arange(0, math.pi, math.pi / 4):
            dx, dy = 0.85 * r * math.cos(ang), 0.85 * r * math.sin(ang)
            sp.line([(hub[0] - dx, hub[1] - dy), (hub[0] + dx, hub[1] + dy)], 0.006 * k, (170, 170, 170))
    t = 0.032 * k
    sp.line([P["rear"], P["bb"], P["seat"], P["rear"]], t, fr)
    sp.line([P["bb"], P["head_bot"], P["front"]], t, fr)
    sp.line([P["seat"], P["head_top"], P["head_bot"]], t, fr)
    sp.line([P["seat"], P["saddle"]], 0.025 * k, (60, 60, 60))
    sp.ellipse(P["saddle"], (0.1 * k, 0.025 * k), (30, 30, 30))
    sp.line([P["head_top"], P["bar"], (P["bar"][0] - 0.08 * k, P["bar"][1] + 0.02 * k)], 0.025 * k, (50, 50, 50))
    c = L["crank"]
    for sg in (-1, 1):
        p = (P["bb"][0] + sg * 0.17 * k * math.cos(c), P["bb"][1] + sg * 0.17 * k * math.sin(c))
        sp.line([P["bb"], p], 0.02 * k, (80, 80, 80))
    return []


def _draw_rider(sp: _Sprite, L: dict) -> list:
    """A person sitting on `_BIKE` (same anchor and facing as the bicycle)."""
    k, P = L["scale"], L["person"]
    B = {n: (v[0] * k, v[1] * k) for n, v in _BIKE.items() if n != "r"}
    hip = (B["saddle"][0] + 0.02 * k, B["saddle"][1] - 0.04 * k)
    sh = (hip[0] + 0.22 * k, hip[1] - 0.5 * k)
    c = L["crank"]
    for sg, shade in ((-1, 0.75), (1, 1.0)):
        ped = (B["bb"][0] + sg * 0.17 * k * math.cos(c), B["bb"][1] + sg * 0.17 * k * math.sin(c))
        dx, dy = ped[0] - hip[0], ped[1] - hip[1]
        d = min(math.hypot(dx, dy), 0.88 * k)
        lt = 0.45 * k
        h = math.sqrt(max(lt * lt - (d / 2) ** 2, 0.0))
        mx, my = hip[0] + dx / 2, hip[1] + dy / 2
        nx, ny = -dy / max(math.hypot(dx, dy), 1e-6), dx / max(math.hypot(dx, dy), 1e-6)
        knee = (mx - nx * h, my - ny * h) if nx < 0 else (mx + nx * h, my + ny * h)
        if knee[1] > hip[1] + 0.2 * k and knee[0] < hip[0]:
            knee = (mx + abs(nx) * h, my - abs(ny) * h)
        sp.line([hip, knee], 0.085 * k, _shade(P["bottom"], shade))
        sp.line([knee, ped], 0.075 * k, _shade(P["bottom"] if P["style"] != "shorts" else P["skin"], shade))
        sp.ellipse((ped[0] + 0.03 * k, ped[1]), (0.06 * k, 0.025 * k), P["shoes"])
    sp.line([hip, sh], 0.2 * k, P["top"])
    sp.ellipse((sh[0] + 0.05 * k, sh[1] - 0.17 * k), (0.1 * k, 0.12 * k), P["skin"])
    helmet = P["hat"] or P["long_hair"]
    sp.ellipse((sh[0] + 0.04 * k, sh[1] - 0.2 * k), (0.11 * k, 0.1 * k), P["top"] if helmet else P["hair"],
               a0=170, a1=370)
    el = ((sh[0] + B["bar"][0]) / 2 + 0.02 * k, (sh[1] + B["bar"][1]) / 2 + 0.06 * k)
    sp.line([sh, el, B["bar"]], 0.06 * k, P["top"])
    sp.ellipse(B["bar"], (0.03 * k, 0.03 * k), P["skin"])
    return []


def _car_look(rng: np.random.Generator) -> dict:
    body = _pick(rng, ("sedan", "sedan", "hatch", "suv", "van"))
    Hc = {"sedan": (1.38, 1.5), "hatch": (1.42, 1.55), "suv": (1.62, 1.8), "van": (1.9, 2.2)}[body]
    Lc = {"sedan": (4.3, 4.9), "hatch": (3.8, 4.2), "suv": (4.4, 4.9), "van": (4.8, 5.4)}[body]
    return {
        "body": body, "H": rng.uniform(*Hc), "L": rng.uniform(*Lc), "W": rng.uniform(1.72, 1.95),
        "color": _c(rng, _pick(rng, _CAR_COLORS), 15), "glass": _c(rng, (70, 60, 50), 15),
        "view": "side", "lights_on": True,
    }


def _car_ext(look: dict) -> tuple[float, float, float, float]:
    half = look["L"] / 2 if look["view"] == "side" else look["W"] / 2 + 0.12
    return (-half - 0.05, -look["H"] - 0.05, half + 0.05, 0.02)


def _draw_car(sp: _Sprite, L: dict) -> list:
    """Car in side view (facing +x) or front/rear view. Returns its lights [(x, y, size_m, kind), ...]."""
    H, col, glass = L["H"], L["color"], L["glass"]
    dark, trim = _shade(col, 0.7), (35, 35, 38)
    belt, roof = -(0.56 if L["body"] != "van" else 0.5) * H, -H
    if L["view"] == "side":
        hl = L["L"] / 2
        rw = 0.36 if L["body"] in ("suv", "van") else 0.32
        wx = hl - (0.8 if L["body"] != "hatch" else 0.7)
        nose = 0.35 if L["body"] != "van" else 0.15
        sp.poly([(-hl, -0.22), (-hl, belt + 0.06), (-hl + 0.12, belt), (hl - nose, belt + 0.02),
                 (hl - 0.04, belt + 0.14), (hl, -0.38), (hl - 0.05, -0.22)], col)
        sp.rect(-hl + 0.05, -0.3, hl - 0.08, -0.2, dark)
        cab = {"sedan": [(-0.78, 0), (-0.45, 1), (0.18, 1), (0.5, 0)],
               "hatch": [(-0.96, 0), (-0.86, 1), (0.14, 1), (0.5, 0)],
               "suv": [(-0.97, 0), (-0.94, 1), (0.3, 1), (0.56, 0)],
               "van": [(-1.0, 0), (-1.0, 1), (0.55, 1), (0.8, 0)]}[L["body"]]  # (x / half length, height fraction)
        cabin = [(u * hl, belt + v * (roof - belt)) for u, v in cab]
        sp.poly(cabin, col)
        cx = sum(p[0] for p in cabin) / 4
        cy = belt + 0.5 * (roof - belt)
        win = [(cx + (x - cx) * 0.88, cy + (y - cy) * 0.78) for x, y in cabin]
        sp.poly(win, glass)
        glare = [win[0], win[1], ((win[1][0] + win[2][0]) / 2, win[1][1]),
                 ((win[0][0] + win[3][0]) / 2 - 0.3, win[0][1])]  # a lighter reflection on the glass
        sp.poly(glare, _shade(glass, 1.35))
        sp.line([(cx + 0.1, belt), (cx + 0.05, roof + 0.05)], 0.07, col)  # B-pillar
        for x in (cx - 0.55, cx + 0.55):
            sp.line([(x, belt + 0.03), (x, -0.3)], 0.015, dark)
        for x in (-wx, wx):
            sp.ellipse((x, -rw), (rw * 1.13, rw * 1.13), (20, 20, 22), a0=180, a1=360)
            sp.ellipse((x, -rw), (rw, rw), (28, 28, 30))
            sp.ellipse((x, -rw), (rw * 0.55, rw * 0.55), (140, 140, 145) if L["body"] != "van" else (60, 60, 60))
        sp.poly([(hl - 0.02, belt + 0.16), (hl - 0.22, belt + 0.08), (hl - 0.06, belt + 0.06)], (200, 225, 235))
        sp.rect(-hl, belt + 0.07, -hl + 0.1, belt + 0.2, (30, 30, 170))
        return [(hl - 0.05, belt + 0.12, 0.25, "head"), (-hl + 0.03, belt + 0.14, 0.15, "tail")]
    hw = L["W"] / 2
    front = L["view"] == "front"
    for sg in (-1, 1):
        sp.rect(sg * (hw - 0.32), -0.45, sg * (hw - 0.07), 0.0, (25, 25, 28))
    sp.poly([(-hw, -0.22), (-hw, belt + 0.06), (-hw + 0.08, belt), (hw - 0.08, belt), (hw, belt + 0.06), (hw, -0.22)],
            col)
    top = 0.72 if L["body"] != "van" else 0.86
    sp.poly([(-hw * 0.88, belt), (-hw * top, roof), (hw * top, roof), (hw * 0.88, belt)], col)
    wl, wr = (-hw * 0.8, belt - 0.03), (-hw * (top - 0.05), roof + 0.07)
    sp.poly([wl, wr, (hw * (top - 0.05), roof + 0.07), (hw * 0.8, belt - 0.03)], glass if front else _shade(glass, 0.8))
    sp.poly([wl, wr, (-hw * 0.2, roof + 0.07), (-hw * 0.5, belt - 0.03)], _shade(glass, 1.3))
    for sg in (-1, 1):
        sp.rect(sg * hw, belt - 0.05, sg * (hw + 0.1), belt - 0.17, dark)  # mirrors
    sp.rect(-hw, -0.2, hw, -0.34, trim)
    sp.rect(-0.26, -0.26, 0.26, -0.37, (225, 225, 225))
    lights = []
    for sg in (-1, 1):
        if front:
            sp.ellipse((sg * hw * 0.72, belt + 0.13), (0.17, 0.065), (215, 235, 240))
            lights.append((sg * hw * 0.72, belt + 0.13, 0.3, "head"))
        else:
            sp.rect(sg * hw * 0.95, belt + 0.06, sg * hw * 0.62, belt + 0.2, (25, 25, 185))
            lights.append((sg * hw * 0.8, belt + 0.13, 0.18, "tail"))
    if front:
        sp.rect(-hw * 0.42, belt + 0.1, hw * 0.42, belt + 0.28, trim)
    return lights


def _dog_look(rng: np.random.Generator) -> dict:
    h = rng.uniform(0.28, 0.7)
    return {
        "H": h, "L": h * rng.uniform(1.2, 1.6) + 0.1, "color": _c(rng, _pick(rng, _DOG_COLORS), 15),
        "patch": rng.random() < 0.35, "ears": _pick(rng, ("up", "down")), "tail": rng.uniform(-0.6, 1.0),
        "phase": rng.uniform(0, 2 * math.pi),
    }


def _dog_ext(look: dict) -> tuple[float, float, float, float]:
    return (-0.7 * look["L"] - 0.1, -1.5 * look["H"] - 0.05, 0.75 * look["L"] + 0.05, 0.02)


def _draw_dog(sp: _Sprite, L: dict) -> list:
    h, l, col = L["H"], L["L"], L["color"]
    T = 0.36 * h
    by = -(h - T / 2)
    legt = max(0.1 * h, 0.035)
    sw = 0.07 * l * math.sin(L["phase"])
    far = _shade(col, 0.7)
    for x, dx, c in ((0.3 * l, -sw, far), (-0.3 * l, sw, far)):
        sp.line([(x, by + 0.2 * T), (x + dx, -0.01)], legt, c)
    tail_end = (-0.62 * l, by - 0.45 * h * L["tail"])
    sp.line([(-0.38 * l, by - 0.2 * T), (-0.52 * l, by - 0.3 * h * L["tail"]), tail_end], 0.055 * h + 0.015, col)
    sp.ellipse((0, by), (0.42 * l, T / 2), col)
    if L["patch"]:
        sp.ellipse((0.2 * l, by + 0.15 * T), (0.14 * l, 0.3 * T), (225, 230, 235))
    head = (0.5 * l, by - 0.33 * h)
    sp.line([(0.33 * l, by - 0.1 * T), head], 0.6 * T, col)
    sp.ellipse(head, (0.17 * h + 0.03, 0.14 * h + 0.025), col)
    sp.ellipse((head[0] + 0.16 * h + 0.04, head[1] + 0.05 * h), (0.1 * h + 0.02, 0.065 * h + 0.015), col)
    sp.ellipse((head[0] + 0.26 * h + 0.055, head[1] + 0.03 * h), (0.025 * h + 0.006, 0.022 * h + 0.006), (20, 20, 20))
    if L["ears"] == "up":
        sp.poly([(head[0] - 0.08 * h, head[1] - 0.08 * h), (head[0] - 0.02 * h, head[1] - 0.3 * h),
                 (head[0] + 0.05 * h, head[1] - 0.1 * h)], _shade(col, 0.85))
    else:
        sp.ellipse((head[0] - 0.06 * h, head[1] + 0.04 * h), (0.05 * h + 0.01, 0.12 * h + 0.015), _shade(col, 0.6),
                   angle=15)
    for x, dx in ((0.3 * l, sw), (-0.3 * l, -sw)):
        sp.line([(x, by + 0.2 * T), (x + dx, -0.01)], legt, col)
    return []


def _bag_look(rng: np.random.Generator) -> dict:
    kind = _pick(rng, ("handbag", "shopping", "suitcase", "backpack", "duffel"))
    return {"kind": kind, "color": _c(rng, _pick(rng, _BAG_COLORS), 18), "s": rng.uniform(0.85, 1.2)}


def _bag_ext(look: dict) -> tuple[float, float, float, float]:
    s = look["s"]
    return (-0.34 * s, -0.95 * s, 0.34 * s, 0.02)


def _draw_bag(sp: _Sprite, L: dict) -> list:
    s, col, k = L["s"], L["color"], L["kind"]
    dark = _shade(col, 0.6)
    if k == "handbag":
        sp.ellipse((0, -0.25 * s), (0.1 * s, 0.1 * s), dark, a0=180, a1=360, t=0.02 * s)
        sp.poly([(-0.13 * s, -0.23 * s), (0.13 * s, -0.23 * s), (0.17 * s, 0), (-0.17 * s, 0)], col)
        sp.rect(-0.15 * s, -0.16 * s, 0.15 * s, -0.13 * s, dark)
    elif k == "shopping":
        for x in (-0.07, 0.07):
            sp.ellipse((x * s, -0.36 * s), (0.045 * s, 0.09 * s), dark, a0=180, a1=360, t=0.012 * s)
        sp.rect(-0.15 * s, -0.36 * s, 0.15 * s, 0, col)
        sp.rect(-0.15 * s, -0.36 * s, 0.15 * s, -0.32 * s, _shade(col, 0.85))
    elif k == "suitcase":
        handle = [(-0.07, -0.6), (-0.07, -0.9), (0.07, -0.9), (0.07, -0.6)]
        sp.line([(u * s, v * s) for u, v in handle], 0.02 * s, (60, 60, 60))
        sp.rect(-0.22 * s, -0.65 * s, 0.22 * s, -0.04 * s, col)
        for x in (-0.08, 0.0, 0.08):
            sp.line([(x * s, -0.62 * s), (x * s, -0.07 * s)], 0.012 * s, dark)
        for x in (-0.17, 0.17):
            sp.ellipse((x * s, -0.03 * s), (0.03 * s, 0.03 * s), (25, 25, 25))
    elif k == "backpack":
        sp.ellipse((0, -0.36 * s), (0.08 * s, 0.06 * s), dark, a0=180, a1=360, t=0.025 * s)
        sp.ellipse((0, -0.2 * s), (0.16 * s, 0.2 * s), col)
        sp.rect(-0.11 * s, -0.14 * s, 0.11 * s, -0.02 * s, dark)
    else:  # duffel
        sp.ellipse((0, -0.24 * s), (0.14 * s, 0.08 * s), dark, a0=180, a1=360, t=0.02 * s)
        sp.ellipse((0, -0.12 * s), (0.28 * s, 0.13 * s), col)
        sp.line([(-0.22 * s, -0.18 * s), (0.22 * s, -0.18 * s)], 0.012 * s, dark)
    return []


_LOOK = {"person": _person_look, "car": _car_look, "bicycle": _bike_look, "dog": _dog_look, "bag": _bag_look}
_EXT = {"person": _person_ext, "car": _car_ext, "bicycle": _bike_ext, "dog": _dog_ext, "bag": _bag_ext}
_DRAW = {"person": _draw_person, "car": _draw_car, "bicycle": _draw_bicycle, "dog": _draw_dog, "bag": _draw_bag,
         "rider": _draw_rider}


# ----------------------------------------------------------------------------------------------------------
# Static props (occluders and distractors)
# ----------------------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------------------
# Cameras
# ----------------------------------------------------------------------------------------------------------


@dataclass
class _Layer:
    """A pre-rendered prop: sort key (foot row), placement and premultiplied colour/coverage."""

    key: float
    x0: int
    y0: int
    pm: np.ndarray
    a: np.ndarray


@dataclass
class _Camera:
    name: str
    kind: str
    g: _Geom
    day: np.ndarray  # (S, S, 3) float32 background with props baked in
    props: list[_Layer]
    roads: list[tuple[float, float, float, float, str]]  # (X0, X1, Z0, Z1, traffic axis 'z' | 'x' | 'any')
    walk: list[tuple[float, float, float, float]]
    lamps: list[tuple[float, float, float]]  # image (x, y, ppm) of lamp heads
    night_mul: np.ndarray  # (S, S) float32 extra light from lamps (multiplies the scene)
    night_mul3: np.ndarray  # (S, S, 3) the same, three channels
    night_sky: np.ndarray  # (S, S, 3) float32 darkening of the open sky at night
    ir_falloff: np.ndarray  # (S, S) float32 IR illuminator fall-off
    night_add: np.ndarray  # (S, S, 3) float32 lit windows, sky glow
    day_mul: np.ndarray  # (S, S, 1) float32: (1 - haze) * vignette
    day_add: np.ndarray  # (S, S, 3) float32: haze * haze colour * vignette
    vignette: np.ndarray  # (S, S, 3) float32
    sun: tuple[float, float]  # shadow direction (dx, dy) per unit object width
    ir: bool  # switches to grey IR at night
    lamp_color: Color
    osd: bool
    extra: dict = field(default_factory=dict)


def _quad(g: _Geom, X, Z, Y=None) -> np.ndarray:
    """Project polygons given as arrays (..., n) of world X, Z (and Y) to cv2 points with 3 fractional bits."""
    x, y = g.img(X, Z, 0.0 if Y is None else Y)
    return np.round(np.stack([x, y], -1) * 8).astype(np.int32)


def _fill(C: np.ndarray, polys: list[np.ndarray], color, tex: np.ndarray | None = None, amp: float = 0.0) -> np.ndarray:
    """Paint polygons (cv2 points, shift 3) on float canvas ``C`` with ``color * (1 + amp * tex)``."""
    m = np.zeros(C.shape[:2], np.uint8)
    cv2.fillPoly(m, polys, 255, cv2.LINE_8, 3)
    sel = m > 0
    col = np.asarray(color, np.float32)
    if tex is None:
        C[sel] = col
    else:
        C[sel] = col * (1.0 + amp * tex[sel])[:, None]
    return sel


def _rects(X0, X1, Z0, Z1) -> tuple[np.ndarray, np.ndarray]:
    """Corner arrays (n, 4) of ground rectangles."""
    X0, X1, Z0, Z1 = (np.atleast_1d(np.asarray(v, np.float64)) for v in (X0, X1, Z0, Z1))
    X0, X1, Z0, Z1 = np.broadcast_arrays(X0, X1, Z0, Z1)
    return np.stack([X0, X1, X1, X0], 1), np.stack([Z0, Z0, Z1, Z1], 1)


def _build_camera(seed: int, cam: int, S: int) -> _Camera:
    rng = np.random.default_rng([seed, 0xCA, cam])
    kind = _KINDS[(cam + seed) % len(_KINDS)]
    fov = rng.uniform(55, 80)
    f = S / 2 / math.tan(math.radians(fov) / 2)
    hc = rng.uniform(2.8, 7.5)
    yh = S * (rng.uniform(-0.15, 0.42) if kind in ("plaza", "parking") else rng.uniform(0.0, 0.42))
    vx = S * rng.uniform(0.3, 0.7)
    g = _Geom(S, f, vx, yh, hc)
    z_bot = float(g.depth(S))
    z_near = max(0.3, 0.6 * z_bot)

    roads: list = []
    walk: list = []
    rw = rng.uniform(3.0, 6.5)
    c = (S * rng.uniform(0.3, 0.7) - vx) * z_bot / f if kind in ("street", "crossing") else 0.0
    pw = rng.uniform(2.0, 4.5)
    zc = rng.uniform(max(10.0, 2 * z_bot), max(14.0, 3 * z_bot) + 20.0)
    zc_w = rng.uniform(5.0, 9.0)
    z_back = None
    if kind == "street":
        roads.append((c - rw, c + rw, z_near, 150.0, "z"))
        walk.append((c - rw - pw, c + rw + pw, z_near, 150.0))
        if rng.random() < 0.5:
            roads.append((-80.0, 80.0, zc, zc + zc_w, "x"))
    elif kind == "crossing":
        roads.append((c - rw, c + rw, z_near, 150.0, "z"))
        roads.append((-80.0, 80.0, zc, zc + zc_w, "x"))
        walk.append((c - rw - pw, c + rw + pw, z_near, 150.0))
        walk.append((-60.0, 60.0, zc - pw, zc + zc_w + pw))
    elif kind == "plaza":
        z_back = rng.uniform(30.0, 60.0) + z_bot
        roads.append((-90.0, 90.0, z_back - 9.0, z_back - 2.5, "x"))
        walk.append((-60.0, 60.0, z_near, z_back - 0.5))
    else:  # parking
        z_back = rng.uniform(35.0, 70.0) + z_bot
        roads.append((-40.0, 40.0, z_near, z_back - 3.0, "any"))
        walk.append((-45.0, 45.0, z_near, z_back - 0.5))

    # ---- background at 2x ----
    k2 = 2
    G = g.scaled(k2)
    S2 = S * k2
    C = np.zeros((S2, S2, 3), np.float32)
    night_add = np.zeros((S2, S2, 3), np.float32)
    rows = np.arange(S2, dtype=np.float32)[:, None]
    overcast = rng.random() < 0.35
    sky_top = np.asarray(_c(rng, (190, 180, 170) if overcast else (225, 175, 120), 15), np.float32)
    sky_hor = np.asarray(_c(rng, (205, 205, 200) if overcast else (230, 215, 195), 10), np.float32)
    t = np.clip(rows / max(G.yh, 1.0), 0, 1)[..., None]
    C[:] = sky_top * (1 - t) + sky_hor * t
    sky0 = C.copy()
    yh2 = G.yh
    # far skyline and tree line
    if yh2 > 4:
        xs = np.sort(rng.uniform(-0.1, 1.1, 24)) * S2
        for x0, x1 in zip(xs[:-1], xs[1:]):
            if rng.random() < 0.7:
                h = rng.uniform(0.03, 0.35) * yh2
                col = np.asarray(sky_hor) * rng.uniform(0.55, 0.85)
                cv2.rectangle(C, (int(x0), int(yh2 - h)), (int(x1), int(yh2 + 1)), tuple(float(v) for v in col), -1)
        for x in rng.uniform(0, S2, 14):
            r = rng.uniform(0.02, 0.06) * S2
            cv2.ellipse(C, (int(x), int(yh2)), (int(r), int(r * 0.6)), 0, 180, 360,
                        tuple(float(v) for v in _c(rng, (55, 85, 65), 10)), -1)
    # ground
    gy = max(int(math.ceil(yh2)), 0)
    tex_f = _noise2d(rng, S2, S2, (2, 6, 24, 96), (0.35, 0.3, 0.25, 0.3))
    depthfade = np.clip((rows - yh2) / (0.35 * S2), 0.15, 1.0)
    tex = tex_f * depthfade
    ground_kind = {"street": "paving", "crossing": "paving", "plaza": "paving", "parking": "asphalt"}[kind]
    grass = _c(rng, (60, 120, 95), 12)
    asphalt = _c(rng, (95, 95, 98), 12)
    paving = _c(rng, _pick(rng, [(150, 160, 165), (140, 150, 170), (125, 130, 135), (165, 175, 185)]), 8)
    has_ground = gy < S2
    if has_ground:
        C[gy:] = np.asarray(grass, np.float32) * (1.0 + 0.25 * tex[gy:, :, None])
    for X0, X1, Z0, Z1 in walk if ground_kind == "paving" else []:
        Xr, Zr = _rects(X0, X1, Z0, Z1)
        _fill(C, [_quad(G, Xr, Zr)[0]], paving, tex, 0.12)
    if ground_kind == "asphalt" and has_ground:
        Xr, Zr = _rects(-45.0, 45.0, z_near, z_back)
        _fill(C, [_quad(G, Xr, Zr)[0]], asphalt, tex, 0.18)
    # paving tiles
    if ground_kind == "paving":
        tile = rng.uniform(0.5, 1.2)
        segs = []
        for X0, X1, Z0, Z1 in walk:
            xs_ = np.arange(math.ceil(X0 / tile), math.floor(X1 / tile) + 1) * tile
            Xs, Zs = np.stack([xs_, xs_], 1), np.tile([[Z0, min(Z1, 80.0)]], (len(xs_), 1))
            segs += list(_quad(G, Xs, Zs))
            zs = np.arange(math.ceil(Z0 / tile), math.floor(min(Z1, 80.0) / tile) + 1) * tile
            ys = G.img(0, zs)[1]
            keep = np.abs(np.diff(np.concatenate([ys, [ys[-1]]]))) > 3 if len(ys) else []
            zs = zs[keep] if len(zs) else zs
            Xs, Zs = np.tile([[X0, X1]], (len(zs), 1)), np.stack([zs, zs], 1)
            segs += list(_quad(G, Xs, Zs))
        cv2.polylines(C, segs, False, tuple(float(v) * 0.82 for v in paving), 1, cv2.LINE_8, 3)
    # roads, curbs, markings
    curb = _c(rng, (175, 180, 180), 8)
    white = (215, 220, 220)
    for X0, X1, Z0, Z1, ax in roads:
        if kind == "parking":
            continue
        Xr, Zr = _rects(X0, X1, Z0, Z1)
        _fill(C, [_quad(G, Xr, Zr)[0]], asphalt, tex, 0.18)
        if ax == "z":
            for xe in (X0, X1):
                Xr, Zr = _rects(xe - 0.15, xe + 0.15, Z0, Z1)
                _fill(C, [_quad(G, Xr, Zr)[0]], curb)
            zs = np.arange(Z0 + rng.uniform(0, 9), min(Z1, 120.0), 9.0)
            Xr, Zr = _rects((X0 + X1) / 2 - 0.08, (X0 + X1) / 2 + 0.08, zs, zs + 3.0)
            cv2.fillPoly(C, list(_quad(G, Xr, Zr)), white, cv2.LINE_8, 3)
            for xe in (X0 + 0.4, X1 - 0.4):
                Xr, Zr = _rects(xe - 0.07, xe + 0.07, Z0, Z1)
                cv2.fillPoly(C, list(_quad(G, Xr, Zr)), white, cv2.LINE_8, 3)
        else:
            for ze in (Z0, Z1):
                Xr, Zr = _rects(X0, X1, ze - 0.12, ze + 0.12)
                _fill(C, [_quad(G, Xr, Zr)[0]], curb)
            xs_ = np.arange(X0 + rng.uniform(0, 9), X1, 9.0)
            zm = (Z0 + Z1) / 2
            Xr, Zr = _rects(xs_, xs_ + 3.0, zm - 0.08, zm + 0.08)
            cv2.fillPoly(C, list(_quad(G, Xr, Zr)), white, cv2.LINE_8, 3)
    if kind == "crossing" or (kind == "street" and len(roads) > 1):
        X0, X1 = roads[0][0], roads[0][1]
        xs_ = np.arange(X0 + 0.3, X1 - 0.3, 1.0)
        Xr, Zr = _rects(xs_, xs_ + 0.5, zc - 4.0, zc - 1.0)
        cv2.fillPoly(C, list(_quad(G, Xr, Zr)), white, cv2.LINE_8, 3)
    if kind == "parking":
        for zr in np.arange(z_bot + rng.uniform(2, 6), z_back - 6, rng.uniform(11, 14)):
            xs_ = np.arange(-40.0, 40.0, 2.6)
            Xr, Zr = _rects(xs_ - 0.06, xs_ + 0.06, zr, zr + 5.0)
            cv2.fillPoly(C, list(_quad(G, Xr, Zr)), white, cv2.LINE_8, 3)
    # buildings
    windows_all: list[np.ndarray] = []

    def facade_windows(Xw: np.ndarray, Zw: np.ndarray, Yw: np.ndarray, glass_base: Color) -> None:
        polys = list(_quad(G, Xw, Zw, Yw))
        n = len(polys)
        shades = rng.uniform(0.7, 1.25, n)
        for i in range(0, n, max(1, n // 6)):  # a few shade groups; one fillPoly each
            grp = polys[i : i + max(1, n // 6)]
            cv2.fillPoly(C, grp, tuple(float(v) * shades[i] for v in glass_base), cv2.LINE_8, 3)
        lit = rng.random(n) < 0.3
        if lit.any():
            cv2.fillPoly(night_add, [p for p, l in zip(polys, lit) if l], (90, 170, 230), cv2.LINE_8, 3)

    def side_facade(xf: float, z0: float, z1: float, side: int) -> None:
        hb = rng.uniform(5.0, 18.0)
        col = _c(rng, _pick(rng, _FACADES), 12)
        Xq = np.array([[xf, xf, xf, xf]])
        Zq = np.array([[z0, z0, z1, z1]])
        Yq = np.array([[0.0, hb, hb, 0.0]])
        _fill(C, [_quad(G, Xq, Zq, Yq)[0]], col, tex, 0.06)
        # near end wall
        Xe = np.array([[xf, xf, xf + side * 12, xf + side * 12]])
        Ze = np.full((1, 4), z0)
        Ye = np.array([[0.0, hb, hb, 0.0]])
        _fill(C, [_quad(G, Xe, Ze, Ye)[0]], _shade(col, 0.8), tex, 0.05)
        floors = np.arange(1.0 if rng.random() < 0.5 else 3.0, hb - 1.5, 3.0)
        span = rng.uniform(2.5, 4.0)
        cols = np.arange(z0 + 0.8, z1 - 1.2, span)
        if len(floors) and len(cols):
            F, Zc = np.meshgrid(floors, cols, indexing="ij")
            F, Zc = F.ravel(), Zc.ravel()
            ww = min(1.4, span * 0.55)
            Xw = np.full((len(F), 4), xf - side * 0.01)
            Zw = np.stack([Zc, Zc + ww, Zc + ww, Zc], 1)
            Yw = np.stack([F, F, F + 1.5, F + 1.5], 1)
            facade_windows(Xw, Zw, Yw, _c(rng, (80, 70, 60), 12))
        Xc = np.array([[xf, xf, xf, xf]])
        cv2.fillPoly(C, [_quad(G, Xc, np.array([[z0, z0, z1, z1]]), np.array([[hb - 0.4, hb, hb, hb - 0.4]]))[0]],
                     tuple(float(v) * 0.7 for v in col), cv2.LINE_8, 3)

    def front_facade(X0: float, X1: float, zb: float) -> None:
        hb = rng.uniform(6.0, 25.0)
        col = _c(rng, _pick(rng, _FACADES), 12)
        Xq = np.array([[X0, X1, X1, X0]])
        Zq = np.full((1, 4), zb)
        Yq = np.array([[0.0, 0.0, hb, hb]])
        _fill(C, [_quad(G, Xq, Zq, Yq)[0]], col, tex, 0.06)
        floors = np.arange(1.0, hb - 1.5, 3.0)
        span = rng.uniform(2.5, 4.0)
        cols = np.arange(X0 + 0.8, X1 - 1.5, span)
        if len(floors) and len(cols):
            F, Xc = np.meshgrid(floors, cols, indexing="ij")
            F, Xc = F.ravel(), Xc.ravel()
            ww = min(1.4, span * 0.55)
            Xw = np.stack([Xc, Xc + ww, Xc + ww, Xc], 1)
            Yw = np.stack([F, F, F + 1.5, F + 1.5], 1)
            facade_windows(Xw, np.full_like(Xw, zb - 0.01), Yw, _c(rng, (80, 70, 60), 12))

    if z_back is not None:
        xs_ = np.sort(rng.uniform(-80, 80, 5))
        edges = np.concatenate([[-120.0], xs_, [120.0]])
        for X0, X1 in zip(edges[:-1], edges[1:]):
            if rng.random() < 0.8:
                front_facade(float(X0), float(X1), float(z_back + rng.uniform(0, 6)))
    else:
        if rng.random() < 0.5:
            front_facade(c - 60.0, c + 60.0, float(rng.uniform(90, 160)))
        for side in (-1, 1):
            if rng.random() < 0.85:
                xf = c + side * (rw + pw)
                z = rng.uniform(0.0, 8.0) + (z_near if rng.random() < 0.6 else z_bot * 1.5)
                segs = []
                while z < 140:
                    ln = rng.uniform(8.0, 30.0)
                    if kind == "crossing" and z < zc + zc_w + pw and z + ln > zc - pw:
                        if z < zc - pw - 2:
                            segs.append((z, zc - pw))
                        z = zc + zc_w + pw + rng.uniform(0, 3)
                        continue
                    if rng.random() < 0.85:
                        segs.append((z, z + ln))
                    z += ln + (rng.uniform(2.0, 12.0) if rng.random() < 0.3 else 0.0)
                for z0, z1 in reversed(segs):
                    side_facade(xf, z0, z1, side)
    sky = (np.all(C == sky0, axis=2) & (rows < yh2)).astype(np.float32)  # untouched sky pixels
    sky = cv2.resize(sky, (S, S), interpolation=cv2.INTER_AREA)
    # low-frequency grime/illumination
    C *= (1.0 + 0.06 * _noise2d(rng, S2, S2, (64,), (1.0,)))[..., None]
    day = cv2.resize(C, (S, S), interpolation=cv2.INTER_AREA)
    night_add = cv2.resize(night_add, (S, S), interpolation=cv2.INTER_AREA)

    # ---- props ----
    plist: list[tuple[float, float, dict]] = []  # (X, Z, prop)

    def zs_along(z0: float, step: tuple[float, float], zmax: float = 90.0) -> list[float]:
        out, z = [], z0
        while z < zmax:
            out.append(z)
            z += rng.uniform(*step)
        return out

    zmin_big = max(1.4 * z_bot, 3.0)
    if kind in ("street", "crossing"):
        for side in (-1, 1):
            edge = c + side * (rw + 0.5)
            if rng.random() < 0.8:
                for z in zs_along(z_bot * rng.uniform(0.9, 2.0), (14, 26)):
                    plist.append((edge, z, _prop(rng, "lamp", arm=1.2) | {"flip": side > 0}))
            if rng.random() < 0.6:
                for z in zs_along(zmin_big * rng.uniform(1.0, 2.0), (8, 18), 70):
                    plist.append((c + side * (rw + pw * rng.uniform(0.5, 0.8)), z, _prop(rng, "tree")))
            for _ in range(int(rng.integers(0, 4))):
                kind_p = _pick(rng, ("bin", "bollard", "bollard", "hydrant", "sign", "rack", "bench"))
                Xp = c + side * (rw + rng.uniform(0.3, pw - 0.3))
                plist.append((Xp, rng.uniform(z_bot * 1.1, 50), _prop(rng, kind_p)))
    else:
        zb = z_back or 60.0
        for _ in range(int(rng.integers(2, 6))):
            plist.append((rng.uniform(-25, 25), rng.uniform(z_bot * 1.1, zb - 3), _prop(rng, "lamp", arm=0.6)))
        n_tree = int(rng.integers(3, 8)) if kind == "plaza" else int(rng.integers(0, 4))
        for _ in range(n_tree):
            plist.append((rng.uniform(-25, 25), rng.uniform(zmin_big, zb - 3), _prop(rng, "tree")))
        for _ in range(int(rng.integers(2, 7))):
            kind_p = _pick(rng, ("bench", "bin", "hedge", "bollard", "rack", "sign") if kind == "plaza" else
                           ("bollard", "bin", "sign", "cone"))
            plist.append((rng.uniform(-20, 20), rng.uniform(z_bot * 1.1, zb - 3), _prop(rng, kind_p)))
    if rng.random() < (0.6 if kind in ("plaza", "parking") else 0.3):
        zf = rng.uniform(1.4 * z_bot, 3.0 * z_bot + 6)
        Xv = (rng.uniform(0.1, 0.6) * S - vx) * zf / f
        ln = rng.uniform(4.0, 14.0)
        plist.append((Xv + ln / 2, zf, _prop(rng, "fence", len=ln)))

    layers: list[_Layer] = []
    lamps: list[tuple[float, float, float]] = []
    for X, Z, p in plist:
        x, y = (float(v) for v in g.img(X, Z))
        ppm = g.ppm(y)
        if not (-0.5 * S < x < 1.5 * S) or ppm <= 0.3:
            continue
        sp = _Sprite(x, y, ppm, _prop_ext(p), flip=p["flip"])
        _draw_prop(sp, p)
        x0, y0, pm, a = sp.finish()
        if x0 >= S or y0 >= S or x0 + a.shape[1] <= 0 or y0 + a.shape[0] <= 0:
            continue
        layers.append(_Layer(y, x0, y0, pm, a))
        if p["kind"] == "lamp":
            lx = x + (-1 if p["flip"] else 1) * p["arm"] * ppm
            lamps.append((lx, y - (p["H"] + 0.05) * ppm, ppm))
    layers.sort(key=lambda L: L.key)
    dummy = np.zeros((S, S), np.int16)
    for L in layers:
        _composite(day, dummy, L.x0, L.y0, L.pm, L.a, 0)

    # ---- night light maps ----
    lamp_color = _c(rng, _pick(rng, [(120, 190, 255), (235, 235, 225)]), 10)
    night_mul = np.zeros((S, S), np.float32)
    for lx, ly, ppm in lamps:  # a soft pool of light on the ground under each lamp head, ~10 m across
        foot_y = g.yh + ppm * g.hc
        Zl = float(g.depth(foot_y))
        ry = 0.5 * (float(g.img(0, max(Zl - 5.0, 0.5))[1]) - float(g.img(0, Zl + 5.0)[1]))
        _add_glow(night_mul, lx, foot_y, min(10.0 * ppm, 2.0 * S), (1.6, 0, 0), 255.0, min(max(2.0, ry), 2.0 * S))
    rws = np.arange(S, dtype=np.float32)[:, None]
    if g.yh > 0:
        glow = np.clip(1.0 - np.abs(rws - g.yh) / (0.25 * S), 0, 1) ** 2
        night_add += glow[..., None] * np.asarray((60, 50, 45), np.float32) * 0.6

    # haze: strongest at the horizon (far away), fading toward the camera and, more slowly, up the buildings
    d = rws - g.yh
    hz = np.where(d >= 0, np.exp(-d / (0.12 * S)), np.exp(d / (0.3 * S)))
    haze = np.broadcast_to(hz, (S, S)).astype(np.float32)[..., None] * rng.uniform(0.15, 0.5)
    yy, xx = np.mgrid[0:S, 0:S].astype(np.float32) / S - 0.5
    vig = (1.0 - rng.uniform(0.15, 0.45) * (xx**2 + yy**2) * 2).astype(np.float32)[..., None]
    return _Camera(
        name=f"CAM {cam + 1:02d}", kind=kind, g=g, day=day.astype(np.float32), props=layers, roads=roads, walk=walk,
        lamps=lamps, night_mul=night_mul.astype(np.float32), night_add=night_add.astype(np.float32),
        night_mul3=np.repeat(night_mul[..., None], 3, 2).astype(np.float32),
        night_sky=np.repeat(1.0 - 0.7 * sky[..., None], 3, 2).astype(np.float32),
        ir_falloff=(0.35 + 0.65 * vig[..., 0] ** 3).astype(np.float32),
        day_mul=np.repeat((1.0 - haze) * vig, 3, 2).astype(np.float32),
        day_add=(haze * sky_hor * vig).astype(np.float32),
        vignette=np.repeat(vig, 3, 2).astype(np.float32),
        sun=(float(rng.uniform(-1.2, 1.2)), float(rng.uniform(0.05, 0.3))), ir=bool(rng.random() < 0.4),
        lamp_color=lamp_color, osd=bool(rng.random() < 0.85),
    )


_CAMERA_CACHE: dict[tuple[int, int, int], _Camera] = {}


def _camera(seed: int, cam: int, S: int) -> _Camera:
    key = (seed, cam, S)
    if key not in _CAMERA_CACHE:
        if len(_CAMERA_CACHE) > 64:
            _CAMERA_CACHE.clear()
        _CAMERA_CACHE[key] = _build_camera(seed, cam, S)
    return _CAMERA_CACHE[key]


_NOISE_CACHE: dict[int, np.ndarray] = {}


def _noise_bank(S: int) -> np.ndarray:
    if S not in _NOISE_CACHE:
        _NOISE_CACHE[S] = np.random.default_rng(0x5EED).standard_normal((S + 64, S + 64, 3), dtype=np.float32)
    return _NOISE_CACHE[S]


# ----------------------------------------------------------------------------------------------------------
# Frames
# ----------------------------------------------------------------------------------------------------------


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


def _osd_masks(S: int, lines: Sequence[tuple[str, tuple[int, int]]]) -> tuple[np.ndarray, np.ndarray]:
    """Outline and text masks (uint8) of the on-screen display lines [(text, (x, y_baseline))]."""
    outline = np.zeros((S, S), np.uint8)
    text = np.zeros((S, S), np.uint8)
    scale = S / 900
    for s, org in lines:
        cv2.putText(outline, s, org, cv2.FONT_HERSHEY_SIMPLEX, scale, 255, 2 + S // 640, cv2.LINE_AA)
        cv2.putText(text, s, org, cv2.FONT_HERSHEY_SIMPLEX, scale, 255, 1, cv2.LINE_AA)
    return outline, text


def _split_id(split: str | int) -> int:
    if isinstance(split, (int, np.integer)):
        return int(split)
    if split not in _SPLIT_IDS:
        raise ValueError(f"split must be one of {sorted(_SPLIT_IDS)} or an int, got {split!r}")
    return _SPLIT_IDS[split]


def _check_classes(classes: Sequence[str]) -> tuple[str, ...]:
    classes = tuple(classes)
    bad = [c for c in classes if c not in DEFAULT_CLASSES]
    if not classes or bad or len(set(classes)) != len(classes):
        raise ValueError(f"classes must be distinct names from {DEFAULT_CLASSES}, got {classes!r}")
    return classes


def render_frame(seed: int, split: str | int, index: int, imgsz: int = 320, classes: Sequence[str] = DEFAULT_CLASSES,
                 n_cameras: int = 8, draw_objects: bool = True, cameras: Sequence[int] | None = None,
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """Render one frame, a pure function of ``(seed, split, index)`` and the settings.

    The frame's camera is drawn uniformly from ``cameras`` (camera indices; default ``range(n_cameras)``), e.g.
    ``range(n_cameras, n_cameras + k)`` for cameras never seen in training (the ``test_ood`` split).

    Returns ``image`` uint8 ``(imgsz, imgsz, 3)`` BGR (before JPEG), ``boxes`` float32 ``(n, 4)`` xyxy pixels
    (integer-valued: tight extents of the visible pixels, ``x2``/``y2`` exclusive), ``labels`` int64 ``(n,)``
    (indices into ``classes``) and ``meta`` (camera name and ``camera_id``, night, ir, jpeg_quality, counts of
    dropped objects).
    ``draw_objects=False`` renders the same frame with the objects left out (same lighting, noise and text;
    the boxes are still returned), which lets tests check that boxes hug the drawn pixels.
    """
    classes = _check_classes(classes)
    S = int(imgsz)
    rng = np.random.default_rng([int(seed), 0xF, _split_id(split), int(index)])
    if cameras is None:
        cam_id = int(rng.integers(n_cameras))
    else:
        cameras = [int(c) for c in cameras]
        if not cameras or min(cameras) < 0:
            raise ValueError(f"cameras must be non-empty camera indices >= 0, got {cameras!r}")
        cam_id = cameras[int(rng.integers(len(cameras)))]
    cam = _camera(int(seed), cam_id, S)
    g = cam.g
    night = bool(rng.random() < _NIGHT_P)
    ir = night and cam.ir
    actors = _sample_actors(cam, rng, classes, night)

    # Render object sprites.
    layers = []  # (key, x0, y0, pm, a, actor index or -1 for props)
    lights = []  # (x, y, r_px, kind)
    shadows = []
    for i, act in enumerate(actors):
        look = act.look
        ext = _EXT["bicycle" if act.cls == "rider" else act.cls](look)
        sp = _Sprite(act.x, act.y, act.ppm, ext, flip=act.flip)
        out = _DRAW[act.cls](sp, look)
        x0, y0, pm, a = sp.finish(act.blur)
        layers.append((act.key, x0, y0, pm, a, i))
        if act.cls == "car" and look["lights_on"]:
            sgn = -1.0 if act.flip else 1.0
            for lx, ly, size, kind in out:
                lights.append((act.x + sgn * lx * act.ppm, act.y + ly * act.ppm, size * act.ppm, kind))
        if act.cls in ("person", "car", "bicycle", "dog") or (act.cls == "bag" and act.y > 0):
            wpx = (ext[2] - ext[0]) * act.ppm * 0.45
            shadows.append((act.key - 1e-4, act.x, act.y, wpx))
    totals = np.asarray([(L[4] > _VIS_THR).sum() for L in layers], np.int64)

    img = cam.day.copy()
    idmap = np.zeros((S, S), np.int16)
    sun_k = 0.0 if night else rng.uniform(0.0, 0.45)
    order = sorted(range(len(layers)), key=lambda j: layers[j][0])
    props = cam.props
    pi = 0
    drawn: list[tuple[int, int, int, int]] = []
    sh_i = sorted(shadows)
    si = 0
    for j in order:
        key, x0, y0, pm, a, i = layers[j]
        while pi < len(props) and props[pi].key < key:  # props in front of what is drawn so far
            P = props[pi]
            px1, py1 = P.x0 + P.a.shape[1], P.y0 + P.a.shape[0]
            if any(x0_ < px1 and P.x0 < x1_ and y0_ < py1 and P.y0 < y1_ for x0_, y0_, x1_, y1_ in drawn):
                _composite(img, idmap, P.x0, P.y0, P.pm, P.a, 0)
            pi += 1
        while si < len(sh_i) and sh_i[si][0] < key:
            _, sx, sy, wpx = sh_i[si]
            if sun_k > 0.02 and wpx > 1.0:
                cx, cy = sx + cam.sun[0] * wpx, sy + cam.sun[1] * wpx * 0.3
                rx, ry = wpx * (0.9 + abs(cam.sun[0]) * 0.5), max(1.0, wpx * 0.2)
                xa, ya = int(max(cx - rx - 2, 0)), int(max(cy - ry - 2, 0))
                xb, yb = int(min(cx + rx + 3, S)), int(min(cy + ry + 3, S))
                if xa < xb and ya < yb:
                    m = np.zeros((yb - ya, xb - xa), np.float32)
                    cv2.ellipse(m, (int(round((cx - xa) * 4)), int(round((cy - ya) * 4))),
                                (max(1, int(rx * 4)), max(1, int(ry * 4))), 0, 0, 360, 1.0, -1, cv2.LINE_8, 2)
                    m = cv2.blur(m, (3, 3))
                    img[ya:yb, xa:xb] *= (1.0 - sun_k * m)[..., None]
            si += 1
        if draw_objects:
            _composite(img, idmap, x0, y0, pm, a, i + 1)
        else:  # keep the occlusion bookkeeping identical, without painting
            _composite(np.zeros_like(img), idmap, x0, y0, pm, a, i + 1)
        drawn.append((x0, y0, x0 + a.shape[1], y0 + a.shape[0]))

    # On-screen display (it hides what is under it).
    when = _dt.datetime(2024, 1, 1) + _dt.timedelta(days=int(rng.integers(0, 700)))
    hour = int(rng.choice([20, 21, 22, 23, 0, 1, 2, 3, 4, 5])) if night else int(rng.integers(7, 19))
    stamp = f"{when:%Y-%m-%d} {hour:02d}:{int(rng.integers(60)):02d}:{int(rng.integers(60)):02d}"
    osd = None
    if cam.osd and S >= 128:  # too small to carry a readable overlay
        dy = max(8, int(S * 0.035))
        osd = _osd_masks(S, [(stamp, (int(S * 0.02), dy + 2)), (cam.name, (int(S * 0.02), S - int(S * 0.02)))])
        idmap[osd[0] > 0] = 0

    # Lighting (cv2 element-wise ops: numpy broadcasting over channels is several times slower here).
    if not night:
        gain = rng.uniform(0.75, 1.15)
        wb = rng.uniform(0.92, 1.08, 3)
        if rng.random() < 0.1:  # dusk
            gain *= rng.uniform(0.5, 0.75)
            wb = wb * np.asarray([0.85, 0.95, 1.1])
        cv2.multiply(img, cam.day_mul, dst=img)  # haze and vignetting folded into one multiply-add
        cv2.add(img, cam.day_add, dst=img)
        img = cv2.transform(img, np.diag(gain * wb).astype(np.float32))
        sigma = rng.uniform(1.5, 5.0)
    elif ir:
        gray = cv2.cvtColor(np.clip(img, 0, 255).astype(np.uint8), cv2.COLOR_BGR2GRAY).astype(np.float32)
        img = gray * np.float32(rng.uniform(0.75, 1.1))
        cv2.multiply(img, cam.ir_falloff, dst=img)
        cv2.scaleAdd(cam.night_mul, 25.0, img, dst=img)
        for lx, ly, ppm in cam.lamps:
            _add_glow(img, lx, ly, float(np.clip(1.2 * ppm, 3.0, 0.06 * S)), (255, 255, 255), 200)
        sigma = rng.uniform(5.0, 11.0)
    else:
        amb = rng.uniform(0.3, 0.55)
        lamp = np.asarray(cam.lamp_color) / 255.0 * rng.uniform(0.7, 1.0)
        light = np.concatenate([np.diag(lamp), (np.asarray([1.3, 1.0, 0.72]) * amb)[:, None]], 1).astype(np.float32)
        cv2.multiply(img, cv2.multiply(cv2.transform(cam.night_mul3, light), cam.night_sky), dst=img)  # ambient + lamps
        cv2.scaleAdd(cam.night_add, rng.uniform(0.6, 1.0), img, dst=img)
        for lx, ly, ppm in cam.lamps:
            _add_glow(img, lx, ly, float(np.clip(3.0 * ppm, 4.0, 0.1 * S)), cam.lamp_color, 255)
            _add_glow(img, lx, ly, float(np.clip(0.6 * ppm, 2.0, 0.03 * S)), (255, 255, 255), 255)
        sigma = rng.uniform(5.0, 12.0)
    if night:
        for lx, ly, r, kind in lights:
            col = (230, 245, 255) if kind == "head" else (40, 40, 255)
            big = 3.5 if kind == "head" else 2.0
            _add_glow(img, lx, ly, float(np.clip(big * r, 2.0, 0.15 * S)), col, 230 if kind == "head" else 180)
            _add_glow(img, lx, ly, max(1.5, 0.8 * r), (255, 255, 255) if kind == "head" else (90, 90, 255), 255)
        if not ir:
            cv2.multiply(img, cam.vignette, dst=img)

    # Sensor: optional low-resolution stream, noise.
    if rng.random() < 0.2:
        f = rng.uniform(0.4, 0.75)
        small = cv2.resize(img, (max(8, int(S * f)), max(8, int(S * f))), interpolation=cv2.INTER_AREA)
        img = cv2.resize(small, (S, S), interpolation=cv2.INTER_LINEAR)
    nb = _noise_bank(S)
    ox, oy = (int(v) for v in rng.integers(0, 64, 2))
    noise = nb[oy : oy + S, ox : ox + S]
    cv2.scaleAdd(noise[..., 0] if ir else noise, sigma, img, dst=img)
    out = np.clip(img, 0, 255, out=img).astype(np.uint8)
    if ir:
        out = cv2.cvtColor(out, cv2.COLOR_GRAY2BGR)
    if osd is not None:
        out[osd[0] > 0] = (out[osd[0] > 0] * 0.25).astype(np.uint8)
        t = osd[1] > 0
        out[t] = np.maximum(out[t], osd[1][t, None])
    quality = int(rng.integers(30, 96))

    # Boxes from the id map.
    n = len(actors)
    boxes = np.zeros((0, 4), np.float32)
    labels = np.zeros((0,), np.int64)
    dropped = 0
    if n:
        counts = np.bincount(idmap.ravel(), minlength=n + 1)[1 : n + 1]
        onehot = idmap[None] == np.arange(1, n + 1, dtype=np.int16)[:, None, None]  # (n, S, S)
        rows, cols = onehot.any(2), onehot.any(1)  # rows[k, r]: object k+1 has a visible pixel in row r
        y1 = rows.argmax(1)
        y2 = S - rows[:, ::-1].argmax(1)
        x1 = cols.argmax(1)
        x2 = S - cols[:, ::-1].argmax(1)
        ok = (counts > 0) & (counts >= _MIN_VISIBLE * totals) & (x2 - x1 >= _MIN_SIDE) & (y2 - y1 >= _MIN_SIDE)
        boxes = np.stack([x1, y1, x2, y2], 1)[ok].astype(np.float32)
        cls_index = {c: i for i, c in enumerate(classes)}
        labels = np.asarray([cls_index[a.label] for a in actors], np.int64)[ok]
        dropped = int(n - ok.sum())
    meta = {"camera": cam.name, "camera_id": cam_id, "kind": cam.kind, "night": night, "ir": ir, "jpeg_quality": quality, "dropped": dropped}
    return out, boxes, labels, meta


# ----------------------------------------------------------------------------------------------------------
# Dataset writer
# ----------------------------------------------------------------------------------------------------------


def _render_and_save(task: tuple) -> tuple[int, np.ndarray, np.ndarray]:
    seed, split, index, S, classes, n_cameras, path, cameras = task
    img, boxes, labels, meta = render_frame(seed, split, index, S, classes, n_cameras, cameras=cameras)
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, meta["jpeg_quality"]])
    if not ok:
        raise RuntimeError(f"JPEG encoding failed for {path}")
    with open(path, "wb") as fh:
        fh.write(buf.tobytes())
    return index, boxes, labels


def _worker_init() -> None:
    cv2.setNumThreads(1)


def _clean_stale(d: Path, keep: set[str], suffix: str) -> None:
    """Remove files this generator wrote earlier (numeric stems) that the new run does not write."""
    pat = re.compile(r"^\d+\." + suffix + "$")
    for p in d.iterdir():
        if pat.match(p.name) and p.name not in keep:
            p.unlink()


def generate(
    out_dir: str | os.PathLike,
    *,
    seed: int = 0,
    n_train: int = 2000,
    n_val: int = 500,
    imgsz: int = 320,
    classes: Sequence[str] = DEFAULT_CLASSES,
    workers: int = 1,
    progress: bool = True,
    n_cameras: int = 8,
    n_test: int = 0,
    ood_cameras: int = 0,
    n_test_ood: int | None = None,
) -> dict:
    """Write the synthetic security-camera benchmark to ``out_dir`` in Ultralytics and COCO layouts.

    Args:
        out_dir: dataset root (created). Files from an earlier run that this run does not rewrite (numeric
            stems only) and Ultralytics' ``labels/*.cache`` are removed so the dataset stays consistent.
        seed: everything is a pure function of ``(seed, split, index)``; cameras of ``(seed, camera)``.
        n_train, n_val: number of frames per split (0 allowed).
        imgsz: square frame size in pixels.
        classes: a subset of `DEFAULT_CLASSES`; its order gives the label indices. Objects of other classes
            are not drawn at all (no unlabelled instances).
        workers: processes; results do not depend on it.
        progress: show a tqdm progress bar.
        n_cameras: number of fixed cameras (scenes) shared by train, val and test.
        n_test: frames of an in-distribution ``test`` split (0: none; the default).
        ood_cameras: number of unseen cameras (indices ``n_cameras .. n_cameras + ood_cameras - 1``) for a
            ``test_ood`` split; 0 (default): no such split.
        n_test_ood: frames of the ``test_ood`` split (default: ``n_val``).

        Train and val output does not depend on ``n_test``, ``ood_cameras`` or ``n_test_ood``. A split not asked
        for is not written (files this generator wrote for it earlier are removed) and gets no ``data.yaml`` key.

    Returns:
        ``{"root", "data_yaml", "names", "splits": {split: {"images", "boxes", "per_class", "images_dir",
        "labels_dir", "coco_json"}}}`` with absolute paths and counts; with ``ood_cameras`` also
        ``"ood_cameras"``: the unseen cameras' names.
    """
    classes = _check_classes(classes)
    if imgsz < 64:
        raise ValueError(f"imgsz must be >= 64, got {imgsz}")
    if n_cameras < 1:
        raise ValueError("n_cameras must be >= 1")
    if n_test < 0 or ood_cameras < 0 or (n_test_ood is not None and n_test_ood < 0):
        raise ValueError("n_test, ood_cameras and n_test_ood must be >= 0")
    n_ood = (int(n_val) if n_test_ood is None else int(n_test_ood)) if ood_cameras > 0 else 0
    ood_ids = list(range(int(n_cameras), int(n_cameras) + int(ood_cameras)))
    # (split, frames, cameras or None for range(n_cameras), written even when empty)
    plan = [("train", int(n_train), None, True), ("val", int(n_val), None, True), ("test", int(n_test), None, False),
            ("test_ood", n_ood, ood_ids, False)]
    root = Path(out_dir).expanduser().resolve()
    summary: dict[str, Any] = {"root": str(root), "names": list(classes), "splits": {}}
    pool = None
    if workers > 1:
        import multiprocessing as mp

        pool = mp.get_context().Pool(workers, initializer=_worker_init)
    try:
        for split, n, cams, always in plan:
            img_dir, lbl_dir = root / "images" / split, root / "labels" / split
            if not n and not always:  # not asked for: drop what an earlier run wrote for it
                for d, sfx in ((img_dir, "jpg"), (lbl_dir, "txt")):
                    if d.is_dir():
                        _clean_stale(d, set(), sfx)
                for q in (root / "labels" / f"{split}.cache", root / "annotations" / f"instances_{split}.json"):
                    if q.exists():
                        q.unlink()
                continue
            img_dir.mkdir(parents=True, exist_ok=True)
            lbl_dir.mkdir(parents=True, exist_ok=True)
            (root / "annotations").mkdir(parents=True, exist_ok=True)
            width = max(6, len(str(n)))
            stems = [f"{i + 1:0{width}d}" for i in range(n)]
            _clean_stale(img_dir, {s + ".jpg" for s in stems}, "jpg")
            _clean_stale(lbl_dir, {s + ".txt" for s in stems}, "txt")
            cache = root / "labels" / f"{split}.cache"
            if cache.exists():
                cache.unlink()
            tasks = [(int(seed), split, i, int(imgsz), classes, int(n_cameras), str(img_dir / f"{stems[i]}.jpg"), cams)
                     for i in range(n)]
            it = pool.imap(_render_and_save, tasks, chunksize=8) if pool is not None else map(_render_and_save, tasks)
            if progress:
                from tqdm.auto import tqdm

                it = tqdm(it, total=n, desc=f"synth {split}", unit="img")
            images, annotations = [], []
            per_class = np.zeros(len(classes), np.int64)
            for index, boxes, labels in it:
                S = float(imgsz)
                lines = []
                for (x1, y1, x2, y2), c in zip(boxes.tolist(), labels.tolist()):
                    cx, cy, bw, bh = (x1 + x2) / 2 / S, (y1 + y2) / 2 / S, (x2 - x1) / S, (y2 - y1) / S
                    lines.append(f"{c} {cx:.6f} {cy:.6f} {bw:.6f} {bh:.6f}\n")
                    annotations.append({
                        "id": len(annotations) + 1, "image_id": index + 1, "category_id": c + 1,
                        "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": 0,
                    })
                (lbl_dir / f"{stems[index]}.txt").write_text("".join(lines))
                images.append({"id": index + 1, "file_name": f"{stems[index]}.jpg", "width": int(imgsz),
                               "height": int(imgsz)})
                per_class += np.bincount(labels, minlength=len(classes))
            coco = {
                "info": {"description": f"detkd synthetic security-camera benchmark ({split}, seed {seed})",
                         "version": "1.0"},
                "licenses": [],
                "images": images,
                "annotations": annotations,
                "categories": [{"id": i + 1, "name": c, "supercategory": "object"} for i, c in enumerate(classes)],
            }
            json_path = root / "annotations" / f"instances_{split}.json"
            json_path.write_text(json.dumps(coco))
            summary["splits"][split] = {
                "images": n, "boxes": int(per_class.sum()),
                "per_class": {c: int(v) for c, v in zip(classes, per_class)},
                "images_dir": str(img_dir), "labels_dir": str(lbl_dir), "coco_json": str(json_path),
            }
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    data = {"path": str(root), "train": "images/train", "val": "images/val"}
    data.update({s: f"images/{s}" for s in ("test", "test_ood") if s in summary["splits"]})
    data["names"] = dict(enumerate(classes))
    if ood_ids:
        summary["ood_cameras"] = [f"CAM {c + 1:02d}" for c in ood_ids]
    yaml_path = root / "data.yaml"
    yaml_path.write_text(yaml.safe_dump(data, sort_keys=False))
    summary["data_yaml"] = str(yaml_path)
    return summary
