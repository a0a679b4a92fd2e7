"""Drawing primitives of the synthetic benchmark: colour jitter, value noise, glows, premultiplied compositing,
the pinhole ground-plane camera (`_Geom`), supersampled object sprites (`_Sprite`) and the palettes."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

_VIS_THR = 0.25  # alpha above which a pixel counts as belonging to an object

Color = tuple[float, float, float]




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
