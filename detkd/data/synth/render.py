"""`render_frame`: one frame of a camera, a pure function of ``(seed, split, index)``: objects composited with the
props in depth order, shadows, on-screen text, day / night / IR lighting, sensor noise; boxes from the id map."""

from __future__ import annotations

import datetime as _dt
from collections.abc import Sequence

import cv2
import numpy as np

from detkd.data.synth.camera import _camera
from detkd.data.synth.draw import _VIS_THR, _add_glow, _composite, _Sprite
from detkd.data.synth.objects import _DRAW, _EXT, DEFAULT_CLASSES
from detkd.data.synth.scene import _sample_actors

_SPLIT_IDS = {"train": 0, "val": 1, "test": 2, "test_ood": 3}

_MIN_VISIBLE = 0.2  # keep an object only if at least this fraction of its drawn area is visible
_MIN_SIDE = 4  # px; smaller visible boxes are dropped

_NIGHT_P = 0.35


_NOISE_CACHE: dict[int, np.ndarray] = {}


def _noise_bank(S: int) -> np.ndarray:
    if S not in _NOISE_CACHE:
        _NOISE_CACHE[S] = np.random.default_rng(0x5EED).standard_normal((S + 64, S + 64, 3), dtype=np.float32)
    return _NOISE_CACHE[S]


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
