"""The fixed cameras of the synthetic benchmark: one scene per camera index (geometry, layout, background, props,
light maps), a pure function of ``(seed, camera)``, built once per process and cached."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import cv2
import numpy as np

from detkd.data.synth.draw import _FACADES, Color, _add_glow, _c, _composite, _Geom, _noise2d, _pick, _shade, _Sprite
from detkd.data.synth.props import _draw_prop, _prop, _prop_ext

_KINDS = ("street", "crossing", "plaza", "parking")




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


@dataclass
class _Layout:
    """A camera's kind, geometry and ground plan (world metres; roads and walkable areas are ground rectangles)."""

    kind: str
    g: _Geom
    z_bot: float  # depth of the ground at the bottom image row
    z_near: float
    roads: list  # (X0, X1, Z0, Z1, traffic axis 'z' | 'x' | 'any')
    walk: list  # (X0, X1, Z0, Z1)
    c: float  # X of the street's centre line (street, crossing)
    rw: float  # road half width
    pw: float  # pavement width
    zc: float  # near edge of the cross street
    zc_w: float  # its width
    z_back: float | None  # depth of the back wall (plaza, parking)


@dataclass
class _Canvas:
    """The background at 2x while it is painted: colour, lit windows (night), ground texture, the untouched sky."""

    G: _Geom  # the geometry at 2x
    C: np.ndarray  # (2S, 2S, 3) float32
    night_add: np.ndarray  # (2S, 2S, 3) float32
    rows: np.ndarray  # (2S, 1) row indices
    sky0: np.ndarray  # C after the sky gradient, before anything else
    sky_hor: np.ndarray  # sky colour at the horizon (also the haze colour)
    tex: np.ndarray  # (2S, 2S) ground texture, faded with depth


def _build_camera(seed: int, cam: int, S: int) -> _Camera:
    """Camera ``cam`` of ``seed`` at ``S`` px: one random stream, drawn in this order (the order is the output)."""
    rng = np.random.default_rng([seed, 0xCA, cam])
    lay = _layout(rng, _KINDS[(cam + seed) % len(_KINDS)], S)
    cv = _ground(rng, lay)
    _buildings(rng, lay, cv)
    day, night_add, sky = _downsample(rng, lay, cv)
    layers, lamps = _place_props(rng, lay, day)
    return _lights(rng, lay, f"CAM {cam + 1:02d}", day, night_add, sky, cv.sky_hor, layers, lamps)


def _layout(rng: np.random.Generator, kind: str, S: int) -> _Layout:
    """Camera geometry (field of view, height, horizon, vanishing point) and the roads / walkable areas of ``kind``."""
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
    return _Layout(kind, g, z_bot, z_near, roads, walk, c, rw, pw, zc, zc_w, z_back)


def _ground(rng: np.random.Generator, lay: _Layout) -> _Canvas:
    """Sky, far skyline and tree line, grass / paving / asphalt with their texture, then :func:`_markings`, at 2x."""
    kind, g, S, walk, z_near, z_back = lay.kind, lay.g, lay.g.S, lay.walk, lay.z_near, lay.z_back
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
    cv = _Canvas(G, C, night_add, rows, sky0, sky_hor, tex)
    _markings(rng, lay, cv, paving if ground_kind == "paving" else None, asphalt)
    return cv


def _markings(rng: np.random.Generator, lay: _Layout, cv: _Canvas, paving: Color | None, asphalt: Color) -> None:
    """Paving tiles (when the walkable ground is ``paving``), roads with curbs and lane markings, zebra crossings,
    parking bays."""
    kind, roads, walk, z_back, z_bot, zc = lay.kind, lay.roads, lay.walk, lay.z_back, lay.z_bot, lay.zc
    G, C, tex = cv.G, cv.C, cv.tex
    if paving is not None:
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


def _facade_windows(rng: np.random.Generator, cv: _Canvas, Xw: np.ndarray, Zw: np.ndarray, Yw: np.ndarray,
                    glass_base: Color) -> None:
    polys = list(_quad(cv.G, Xw, Zw, Yw))
    n = len(polys)
    shades = rng.uniform(0.7, 1.25, n)
    for i in range(0, n, max(1, n // 6)):  # a few shade groups; one fillPoly each
        grp = polys[i : i + max(1, n // 6)]
        cv2.fillPoly(cv.C, grp, tuple(float(v) * shades[i] for v in glass_base), cv2.LINE_8, 3)
    lit = rng.random(n) < 0.3
    if lit.any():
        cv2.fillPoly(cv.night_add, [p for p, l in zip(polys, lit) if l], (90, 170, 230), cv2.LINE_8, 3)


def _side_facade(rng: np.random.Generator, cv: _Canvas, xf: float, z0: float, z1: float, side: int) -> None:
    hb = rng.uniform(5.0, 18.0)
    col = _c(rng, _pick(rng, _FACADES), 12)
    Xq = np.array([[xf, xf, xf, xf]])
    Zq = np.array([[z0, z0, z1, z1]])
    Yq = np.array([[0.0, hb, hb, 0.0]])
    _fill(cv.C, [_quad(cv.G, Xq, Zq, Yq)[0]], col, cv.tex, 0.06)
    # near end wall
    Xe = np.array([[xf, xf, xf + side * 12, xf + side * 12]])
    Ze = np.full((1, 4), z0)
    Ye = np.array([[0.0, hb, hb, 0.0]])
    _fill(cv.C, [_quad(cv.G, Xe, Ze, Ye)[0]], _shade(col, 0.8), cv.tex, 0.05)
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
        _facade_windows(rng, cv, Xw, Zw, Yw, _c(rng, (80, 70, 60), 12))
    Xc = np.array([[xf, xf, xf, xf]])
    cv2.fillPoly(cv.C, [_quad(cv.G, Xc, np.array([[z0, z0, z1, z1]]), np.array([[hb - 0.4, hb, hb, hb - 0.4]]))[0]],
                 tuple(float(v) * 0.7 for v in col), cv2.LINE_8, 3)


def _front_facade(rng: np.random.Generator, cv: _Canvas, X0: float, X1: float, zb: float) -> None:
    hb = rng.uniform(6.0, 25.0)
    col = _c(rng, _pick(rng, _FACADES), 12)
    Xq = np.array([[X0, X1, X1, X0]])
    Zq = np.full((1, 4), zb)
    Yq = np.array([[0.0, 0.0, hb, hb]])
    _fill(cv.C, [_quad(cv.G, Xq, Zq, Yq)[0]], col, cv.tex, 0.06)
    floors = np.arange(1.0, hb - 1.5, 3.0)
    span = rng.uniform(2.5, 4.0)
    cols = np.arange(X0 + 0.8, X1 - 1.5, span)
    if len(floors) and len(cols):
        F, Xc = np.meshgrid(floors, cols, indexing="ij")
        F, Xc = F.ravel(), Xc.ravel()
        ww = min(1.4, span * 0.55)
        Xw = np.stack([Xc, Xc + ww, Xc + ww, Xc], 1)
        Yw = np.stack([F, F, F + 1.5, F + 1.5], 1)
        _facade_windows(rng, cv, Xw, np.full_like(Xw, zb - 0.01), Yw, _c(rng, (80, 70, 60), 12))


def _buildings(rng: np.random.Generator, lay: _Layout, cv: _Canvas) -> None:
    """Building facades with windows: a row of fronts behind a plaza / parking lot, else sides along the street
    (gaps for a cross street) and sometimes one front far away."""
    kind, c, rw, pw, z_near, z_bot = lay.kind, lay.c, lay.rw, lay.pw, lay.z_near, lay.z_bot
    z_back, zc, zc_w = lay.z_back, lay.zc, lay.zc_w
    if z_back is not None:
        xs_ = np.sort(rng.uniform(-80, 80, 5))
        edges = np.concatenate([[-120.0], xs_, [120.0]])
        for X0, X1 in zip(edges[:-1], edges[1:]):
            if rng.random() < 0.8:
                _front_facade(rng, cv, float(X0), float(X1), float(z_back + rng.uniform(0, 6)))
    else:
        if rng.random() < 0.5:
            _front_facade(rng, cv, c - 60.0, c + 60.0, float(rng.uniform(90, 160)))
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
                    _side_facade(rng, cv, xf, z0, z1, side)


def _downsample(rng: np.random.Generator, lay: _Layout, cv: _Canvas) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The untouched-sky mask, low-frequency grime, and everything back at ``S``: ``(day, night_add, sky)``."""
    S, S2, C, rows, yh2 = lay.g.S, cv.C.shape[0], cv.C, cv.rows, cv.G.yh
    sky = (np.all(C == cv.sky0, axis=2) & (rows < yh2)).astype(np.float32)  # untouched sky pixels
    sky = cv2.resize(sky, (S, S), interpolation=cv2.INTER_AREA)
    # low-frequency grime/illumination
    C *= (1.0 + 0.06 * _noise2d(rng, S2, S2, (64,), (1.0,)))[..., None]
    day = cv2.resize(C, (S, S), interpolation=cv2.INTER_AREA)
    night_add = cv2.resize(cv.night_add, (S, S), interpolation=cv2.INTER_AREA)
    return day, night_add, sky


def _zs_along(rng: np.random.Generator, z0: float, step: tuple[float, float], zmax: float = 90.0) -> list[float]:
    out, z = [], z0
    while z < zmax:
        out.append(z)
        z += rng.uniform(*step)
    return out


def _place_props(rng: np.random.Generator, lay: _Layout, day: np.ndarray) -> tuple[list[_Layer], list]:
    """Lamps, trees and street furniture along the street or across the plaza / lot, drawn as sprites and baked into
    ``day`` far to near; returns the layers (they occlude objects behind them) and the lamp heads ``(x, y, ppm)``."""
    kind, g, S, c, rw, pw = lay.kind, lay.g, lay.g.S, lay.c, lay.rw, lay.pw
    z_bot, z_back, vx, f = lay.z_bot, lay.z_back, lay.g.vx, lay.g.f
    plist: list[tuple[float, float, dict]] = []  # (X, Z, prop)
    zmin_big = max(1.4 * z_bot, 3.0)
    if kind in ("street", "crossing"):
        for side in (-1, 1):
            edge = c + side * (rw + 0.5)
            if rng.random() < 0.8:
                for z in _zs_along(rng, z_bot * rng.uniform(0.9, 2.0), (14, 26)):
                    plist.append((edge, z, _prop(rng, "lamp", arm=1.2) | {"flip": side > 0}))
            if rng.random() < 0.6:
                for z in _zs_along(rng, zmin_big * rng.uniform(1.0, 2.0), (8, 18), 70):
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
    return layers, lamps


def _lights(rng: np.random.Generator, lay: _Layout, name: str, day: np.ndarray, night_add: np.ndarray,
            sky: np.ndarray, sky_hor: np.ndarray, layers: list[_Layer], lamps: list) -> _Camera:
    """Night light maps (lamp pools, horizon glow), haze and vignetting, and the camera's per-frame switches."""
    g, S, kind = lay.g, lay.g.S, lay.kind
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
        name=name, kind=kind, g=g, day=day.astype(np.float32), props=layers, roads=lay.roads, walk=lay.walk,
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
