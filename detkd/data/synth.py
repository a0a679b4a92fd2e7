"""The built-in security-camera benchmark: procedural, deterministic, offline.

`generate(out_dir, seed=...)` draws frames from a handful of fixed cameras: each camera has its own static scene
(a ground plane seen in perspective with a horizon and vanishing point, road with lane markings, pavement,
buildings with windows, poles and a fence as occluders, low-frequency texture). Frames vary by day/night
lighting (night: dark, blue, street lamps and headlight glare), sensor noise, occasional motion blur and JPEG
artefacts. Objects of five classes — person, car, bicycle, dog, bag — are drawn procedurally with cv2 in
varied colours, poses and views; their size follows the perspective (about 8 px near the horizon up to a large
share of the frame near the camera), they occlude each other (drawn far to near) and are occluded by poles.
Boxes are the tight *visible* extents (from a per-pixel instance map); objects less than 20% visible or
under 4 px are dropped, so no zero-area box is ever written.

Written twice: the Ultralytics layout (``images/{train,val}``, ``labels/{train,val}``, ``data.yaml``) and COCO
json (``annotations/instances_{train,val}.json``; category ids 1..K in class order). Every image is seeded from
``(seed, split, index)``, so the output does not depend on ``workers``.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import yaml

DEFAULT_CLASSES = ("person", "car", "bicycle", "dog", "bag")
N_CAMERAS = 8
_SPLIT_ID = {"train": 1, "val": 2}
# object height at the bottom edge of the frame, as a fraction of the frame height (before jitter)
_BASE_H = {"person": 0.55, "car": 0.42, "bicycle": 0.38, "dog": 0.2, "bag": 0.13}
_CLASS_P = {"person": 0.36, "car": 0.28, "bicycle": 0.13, "dog": 0.11, "bag": 0.12}


@dataclass
class Camera:
    background: np.ndarray  # (H, W, 3) uint8, day
    horizon: int
    vp_x: int
    poles: list  # (x, width) of poles in front of everything
    lamps: list  # (x, y) of street lamps for night glow
    road: tuple  # (x_left_bottom, x_right_bottom)


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([int(k) & 0xFFFFFFFF for k in key])


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cells: int, amp: float) -> np.ndarray:
    small = rng.normal(0, 1, (max(2, cells * h // w), cells)).astype(np.float32)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC) * amp


def _camera(seed: int, cam: int, w: int, h: int) -> Camera:
    rng = _rng(seed, 99, cam)
    img = np.zeros((h, w, 3), np.float32)
    horizon = int(h * rng.uniform(0.22, 0.42))
    vp_x = int(w * rng.uniform(0.3, 0.7))
    sky = np.array(rng.uniform([150, 120, 90], [230, 210, 190]), np.float32)  # BGR
    ground = np.array(rng.uniform([60, 70, 60], [130, 140, 130]), np.float32)
    img[:horizon] = sky
    img[horizon:] = ground
    # buildings along the horizon
    x = 0
    while x < w:
        bw = int(rng.uniform(0.08, 0.25) * w)
        bh = int(rng.uniform(0.05, 0.9) * horizon)
        col = rng.uniform(50, 180, 3)
        cv2.rectangle(img, (x, horizon - bh), (x + bw, horizon), col.tolist(), -1)
        for wy in range(horizon - bh + 4, horizon - 4, max(6, bh // 6 or 6)):  # window rows (few per building)
            for wx in range(x + 3, x + bw - 4, max(6, bw // 5 or 6)):
                cv2.rectangle(img, (wx, wy), (wx + 2, wy + 2), (col * 0.5).tolist(), -1)
        x += bw + int(rng.uniform(0, 0.05) * w)
    # road: a trapezoid from the vanishing point, with pavement on both sides and lane markings
    half = rng.uniform(0.25, 0.45) * w
    xl, xr = vp_x - half - rng.uniform(0, 0.3) * w, vp_x + half + rng.uniform(0, 0.3) * w
    road_col = rng.uniform(55, 95, 3)
    pave_col = rng.uniform(120, 170, 3)
    pts = lambda a, b: np.array([[vp_x - 2, horizon], [vp_x + 2, horizon], [b, h], [a, h]], np.int32)  # noqa: E731
    cv2.fillPoly(img, [pts(xl - 0.15 * w, xr + 0.15 * w)], pave_col.tolist())
    cv2.fillPoly(img, [pts(xl, xr)], road_col.tolist())
    for k in range(12):  # dashed centre line in perspective
        t0, t1 = (k / 12) ** 1.6, ((k + 0.5) / 12) ** 1.6
        y0, y1 = horizon + t0 * (h - horizon), horizon + t1 * (h - horizon)
        cv2.line(img, (vp_x, int(y0)), (vp_x, int(y1)), (200, 200, 200), max(1, int(1 + 3 * t1)))
    # texture and vignetting
    img += _smooth_noise(rng, h, w, 24, 10)[..., None]
    img += _smooth_noise(rng, h, w, 6, 14)[..., None]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    vign = 1 - 0.35 * (((xx - w / 2) / w) ** 2 + ((yy - h / 2) / h) ** 2)
    img *= vign[..., None]
    # a fence across part of the ground
    if rng.random() < 0.5:
        fy = int(horizon + rng.uniform(0.15, 0.4) * (h - horizon))
        for fx in range(0, w, 7):
            cv2.line(img, (fx, fy - 10), (fx, fy), (80, 80, 80), 1)
        cv2.line(img, (0, fy - 8), (w, fy - 8), (90, 90, 90), 1)
    poles = [(int(rng.uniform(0, w)), int(rng.uniform(0.01, 0.03) * w) + 1) for _ in range(int(rng.integers(0, 3)))]
    lamps = [(int(rng.uniform(0, w)), int(rng.uniform(0.05, 0.8) * horizon + 2)) for _ in range(int(rng.integers(1, 4)))]
    return Camera(np.clip(img, 0, 255).astype(np.uint8), horizon, vp_x, poles, lamps, (int(xl), int(xr)))


# ---------------------------------------------------------------------------------------------------------------
# Objects: each draws onto the image and writes its instance id into `ids` where it paints.
# ---------------------------------------------------------------------------------------------------------------
def _paint(img, ids, oid, draw):
    """Run `draw(canvas, colour_or_none)` on the image and, with colour oid, on the id map."""
    draw(img, None)
    draw(ids, oid)


def _person(img, ids, oid, x, yb, hgt, rng):
    shirt = rng.uniform(20, 235, 3).tolist()
    pants = rng.uniform(10, 160, 3).tolist()
    skin = [float(v) for v in np.array([60, 110, 170]) * rng.uniform(0.5, 1.2)]
    head = max(1, int(hgt * 0.11))
    torso_h = int(hgt * 0.36)
    leg = hgt - 2 * head - torso_h
    wdt = max(1, int(hgt * rng.uniform(0.18, 0.26)))
    stride = rng.uniform(-0.25, 0.25) * hgt  # walking pose
    arm = rng.uniform(-0.2, 0.2) * hgt
    top = yb - hgt
    th = max(1, hgt // 12)

    def draw(c, col):
        cv2.line(c, (x, yb - leg), (int(x - stride / 2), yb), col or pants, th + 1)
        cv2.line(c, (x, yb - leg), (int(x + stride / 2), yb), col or pants, th + 1)
        cv2.rectangle(c, (x - wdt // 2, top + 2 * head), (x + wdt // 2, yb - leg), col or shirt, -1)
        cv2.line(c, (x - wdt // 2, top + 2 * head + 1), (int(x - wdt // 2 - arm / 3), int(yb - leg + arm / 4)), col or shirt, th)
        cv2.line(c, (x + wdt // 2, top + 2 * head + 1), (int(x + wdt // 2 + arm / 3), int(yb - leg - arm / 4)), col or shirt, th)
        cv2.circle(c, (x, top + head), head, col or skin, -1)

    _paint(img, ids, oid, draw)


def _car(img, ids, oid, x, yb, hgt, rng):
    body = rng.uniform(10, 240, 3).tolist()
    side = rng.random() < 0.6
    wdt = int(hgt * (rng.uniform(2.0, 2.6) if side else rng.uniform(1.1, 1.4)))
    x0, x1 = x - wdt // 2, x + wdt // 2
    roof = yb - hgt
    mid = yb - int(hgt * 0.55)
    wheel = max(1, int(hgt * 0.18))
    glass = [v * 0.35 for v in body]

    def draw(c, col):
        cv2.rectangle(c, (x0, mid), (x1, yb - wheel // 2), col or body, -1)
        inset = int(wdt * (0.2 if side else 0.08))
        cv2.fillPoly(c, [np.array([[x0 + inset // 2, mid], [x1 - inset // 2, mid], [x1 - inset, roof], [x0 + inset, roof]], np.int32)], col or body)
        if col is None:
            cv2.fillPoly(c, [np.array([[x0 + inset // 2 + 2, mid - 1], [x1 - inset // 2 - 2, mid - 1], [x1 - inset - 1, roof + 2], [x0 + inset + 1, roof + 2]], np.int32)], glass)
        if side:
            for wx in (x0 + wdt // 5, x1 - wdt // 5):
                cv2.circle(c, (wx, yb - wheel), wheel, col or (20, 20, 20), -1)
        else:
            cv2.rectangle(c, (x0 + 1, yb - wheel), (x0 + wheel, yb), col or (20, 20, 20), -1)
            cv2.rectangle(c, (x1 - wheel, yb - wheel), (x1 - 1, yb), col or (20, 20, 20), -1)

    _paint(img, ids, oid, draw)
    return (x0, x1, yb - int(hgt * 0.45))  # headlight row, for night glare


def _bicycle(img, ids, oid, x, yb, hgt, rng):
    col_f = rng.uniform(20, 235, 3).tolist()
    r = max(2, int(hgt * 0.3))
    gap = int(r * rng.uniform(1.7, 2.1))
    c1, c2 = (x - gap // 2, yb - r), (x + gap // 2, yb - r)
    th = max(1, hgt // 25)
    seat = (x - gap // 6, yb - int(hgt * 0.85))
    bar = (x + gap // 3, yb - hgt)

    def draw(c, col):
        cv2.circle(c, c1, r, col or (30, 30, 30), th)
        cv2.circle(c, c2, r, col or (30, 30, 30), th)
        for a, b in ((c1, seat), (seat, c2), (c1, (x, yb - r)), ((x, yb - r), seat), ((x, yb - r), bar), (bar, c2)):
            cv2.line(c, a, b, col or col_f, th)
        cv2.line(c, (bar[0] - r // 3, bar[1]), (bar[0] + r // 3, bar[1]), col or col_f, th)

    _paint(img, ids, oid, draw)


def _dog(img, ids, oid, x, yb, hgt, rng):
    fur = [float(v) for v in rng.choice([[40, 60, 90], [20, 20, 25], [200, 210, 220], [60, 110, 160]]) * rng.uniform(0.7, 1.2)]
    length = int(hgt * rng.uniform(1.3, 1.8))
    d = 1 if rng.random() < 0.5 else -1
    body_c = (x, yb - int(hgt * 0.6))
    th = max(1, hgt // 8)

    def draw(c, col):
        cv2.ellipse(c, body_c, (length // 2, max(1, hgt // 4)), 0, 0, 360, col or fur, -1)
        for lx in (x - length // 3, x - length // 5, x + length // 5, x + length // 3):
            cv2.line(c, (lx, body_c[1]), (lx, yb), col or fur, th)
        hx = x + d * length // 2
        cv2.circle(c, (hx, yb - int(hgt * 0.85)), max(1, hgt // 5), col or fur, -1)
        cv2.line(c, (x - d * length // 2, body_c[1]), (x - d * int(length * 0.7), yb - hgt), col or fur, max(1, th // 2))

    _paint(img, ids, oid, draw)


def _bag(img, ids, oid, x, yb, hgt, rng):
    colr = rng.uniform(10, 200, 3).tolist()
    wdt = int(hgt * rng.uniform(0.9, 1.4))
    th = max(1, hgt // 10)

    def draw(c, col):
        cv2.rectangle(c, (x - wdt // 2, yb - int(hgt * 0.7)), (x + wdt // 2, yb), col or colr, -1)
        cv2.ellipse(c, (x, yb - int(hgt * 0.7)), (max(1, wdt // 4), max(1, int(hgt * 0.3))), 0, 180, 360, col or colr, th)

    _paint(img, ids, oid, draw)


_DRAW = {"person": _person, "car": _car, "bicycle": _bicycle, "dog": _dog, "bag": _bag}


def render(seed: int, split: str, index: int, w: int, h: int, classes=DEFAULT_CLASSES, cameras=None):
    """One frame: returns (jpeg bytes, boxes (n, 4) float32 xyxy, class ids (n,) int64)."""
    rng = _rng(seed, _SPLIT_ID.get(split, 7), index)
    cam_id = int(rng.integers(0, N_CAMERAS))
    cam = cameras[cam_id] if cameras is not None else _camera(seed, cam_id, w, h)
    img = cam.background.copy()
    ids = np.zeros((h, w), np.int32)
    night = rng.random() < 0.3
    names = [c for c in classes if c in _DRAW]
    p = np.array([_CLASS_P.get(c, 0.2) for c in names])
    n = int(min(15, rng.poisson(5.0)))
    objs = []
    for _ in range(n):
        cls = names[int(rng.choice(len(names), p=p / p.sum()))]
        depth = rng.uniform(0.02, 1.08) ** 1.3  # 0 = horizon, 1 = bottom of the frame
        yb = int(cam.horizon + depth * (h - cam.horizon))
        hgt = int(_BASE_H[cls] * h * depth * rng.uniform(0.8, 1.2))
        if hgt < 5:
            continue
        lo, hi = -0.1 * w, 1.1 * w
        if cls == "car":  # cars mostly on the road
            t = (yb - cam.horizon) / max(1, h - cam.horizon)
            lo = cam.vp_x + (cam.road[0] - cam.vp_x) * t
            hi = cam.vp_x + (cam.road[1] - cam.vp_x) * t
        objs.append((yb, cls, int(rng.uniform(lo, hi)), hgt))
    objs.sort(key=lambda o: o[0])  # far to near: near objects occlude far ones
    full_area, headlights = [], []
    for k, (yb, cls, x, hgt) in enumerate(objs, start=1):
        solo = np.zeros((h, w), np.int32)
        draw = _DRAW[cls]
        sub = _rng(seed, _SPLIT_ID.get(split, 7), index, k)
        draw(np.zeros((h, w, 3), np.uint8), solo, 1, x, yb, hgt, _rng(seed, _SPLIT_ID.get(split, 7), index, k))
        full_area.append(int((solo > 0).sum()))
        cv2.ellipse(img, (x, yb), (max(1, hgt // 3), max(1, hgt // 14)), 0, 0, 360, (40, 40, 40), -1)  # shadow
        r = draw(img, ids, k, x, yb, hgt, sub)
        if cls == "car" and r is not None:
            headlights.append(r)
    for px, pw in cam.poles:  # occluders in front of everything
        cv2.rectangle(img, (px, 0), (px + pw, h), (70, 70, 75), -1)
        ids[:, px: px + pw + 1] = 0
    # lighting
    f = img.astype(np.float32)
    if night:
        f *= rng.uniform(0.18, 0.35)
        f[..., 0] *= 1.35  # blue tint (BGR)
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        for lx, ly in cam.lamps:
            f += (120 * np.exp(-(((xx - lx) ** 2 + (yy - ly) ** 2) / (2 * (0.08 * w) ** 2))))[..., None] * [0.6, 0.9, 1.0]
        for x0, x1, yl in headlights:
            for hx in (x0 + 2, x1 - 2):
                f += (200 * np.exp(-(((xx - hx) ** 2 + (yy - yl) ** 2) / (2 * (0.02 * w + 1) ** 2))))[..., None]
    else:
        f *= rng.uniform(0.75, 1.25)
    f += rng.normal(0, rng.uniform(2, 9 if night else 5), f.shape).astype(np.float32)
    out = np.clip(f, 0, 255).astype(np.uint8)
    if rng.random() < 0.15:  # motion blur
        k = int(rng.integers(3, 8))
        ker = np.zeros((k, k), np.float32)
        ker[k // 2] = 1.0 / k
        out = cv2.filter2D(out, -1, ker)
    ok, jpg = cv2.imencode(".jpg", out, [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(35, 92))])
    assert ok
    # visible boxes from the instance map
    boxes, cls_ids = [], []
    if objs:
        ys, xs = np.nonzero(ids)
        lab = ids[ys, xs]
        counts = np.bincount(lab, minlength=len(objs) + 1)
        for k, (yb, cls, x, hgt) in enumerate(objs, start=1):
            if counts[k] == 0 or counts[k] < 0.2 * max(1, full_area[k - 1]):
                continue
            sel = lab == k
            x0, x1, y0, y1 = xs[sel].min(), xs[sel].max() + 1, ys[sel].min(), ys[sel].max() + 1
            if x1 - x0 < 4 or y1 - y0 < 4:
                continue
            boxes.append([x0, y0, x1, y1])
            cls_ids.append(classes.index(cls))
    return jpg.tobytes(), np.array(boxes, np.float32).reshape(-1, 4), np.array(cls_ids, np.int64)


def _work(args):
    seed, split, i, w, h, classes = args
    global _CAMS
    key = (seed, w, h)
    if _CAMS.get("key") != key:
        _CAMS = {"key": key, "cams": [_camera(seed, c, w, h) for c in range(N_CAMERAS)]}
    return render(seed, split, i, w, h, classes, _CAMS["cams"])


_CAMS: dict = {}


def generate(out_dir, *, seed: int = 0, n_train: int = 2000, n_val: int = 500, imgsz: int = 320,
             classes=DEFAULT_CLASSES, workers: int = 1, progress: bool = True) -> dict:
    """Write the dataset (both layouts) to ``out_dir``; returns a summary (counts per split and class, paths).

    Frames are ``imgsz`` wide and ``3/4 * imgsz`` high (a 4:3 camera), rounded to even pixels."""
    from tqdm import tqdm

    classes = tuple(classes)
    out = Path(out_dir).resolve()
    w, h = int(imgsz), int(round(imgsz * 0.75 / 2) * 2)
    summary: dict = {"images": {}, "boxes": {}, "paths": {}}
    for split, n in (("train", n_train), ("val", n_val)):
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
        (out / "labels" / split).mkdir(parents=True, exist_ok=True)
        tasks = [(seed, split, i, w, h, classes) for i in range(n)]
        if workers > 1:
            import multiprocessing as mp

            pool = mp.get_context("fork").Pool(workers)
            it = pool.imap(_work, tasks, chunksize=16)
        else:
            pool, it = None, map(_work, tasks)
        images, anns = [], []
        per_class = dict.fromkeys(classes, 0)
        for i, (jpg, boxes, cls_ids) in enumerate(tqdm(it, total=n, desc=f"synth {split}", disable=not progress)):
            name = f"{split}_{i:06d}.jpg"
            (out / "images" / split / name).write_bytes(jpg)
            cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2 / w, (boxes[:, 1] + boxes[:, 3]) / 2 / h
            bw, bh = (boxes[:, 2] - boxes[:, 0]) / w, (boxes[:, 3] - boxes[:, 1]) / h
            lines = [f"{c} {a:.6f} {b:.6f} {d:.6f} {e:.6f}" for c, a, b, d, e in zip(cls_ids, cx, cy, bw, bh)]
            (out / "labels" / split / name.replace(".jpg", ".txt")).write_text("\n".join(lines) + ("\n" if lines else ""))
            img_id = i + 1
            images.append({"id": img_id, "file_name": name, "width": w, "height": h})
            for b, c in zip(boxes.tolist(), cls_ids.tolist()):
                anns.append({"id": len(anns) + 1, "image_id": img_id, "category_id": c + 1,
                             "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]], "area": (b[2] - b[0]) * (b[3] - b[1]),
                             "iscrowd": 0})
                per_class[classes[c]] += 1
        if pool is not None:
            pool.close()
            pool.join()
        (out / "annotations").mkdir(exist_ok=True)
        coco = {"images": images, "annotations": anns,
                "categories": [{"id": i + 1, "name": c, "supercategory": "object"} for i, c in enumerate(classes)]}
        jp = out / "annotations" / f"instances_{split}.json"
        tmp = jp.with_suffix(".tmp")
        tmp.write_text(json.dumps(coco))
        os.replace(tmp, jp)
        summary["images"][split] = n
        summary["boxes"][split] = per_class
        summary["paths"][f"coco_{split}"] = str(jp)
    data = {"path": str(out), "train": "images/train", "val": "images/val",
            "names": {i: c for i, c in enumerate(classes)}}
    (out / "data.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    summary["paths"]["data_yaml"] = str(out / "data.yaml")
    summary["imgsz"] = [w, h]
    return summary
