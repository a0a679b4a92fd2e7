"""Box-safe augmentation from a small config (albumentations), for the torchvision and plain-loop paths.

Ultralytics training uses its own augmentation; this module serves the other integrations. A config is a dict
(or a YAML file holding one, optionally under an ``augment:`` key); every key is optional and ``None`` /
``False`` / 0 turns a transform off:

==========================  ==========================================================================
key                         meaning (albumentations transform)
==========================  ==========================================================================
``imgsz: 320``              letterbox to a square: longest side resized to imgsz, then padded with ``fill``
                            (``LongestMaxSize`` + ``PadIfNeeded``, centred, as Ultralytics' letterbox)
``scale: [0.5, 1.5]``       random zoom about the centre, canvas size kept (``Affine(scale=...)``);
                            a number ``s`` means ``[1 - s, 1 + s]``
``translate: 0.1``          random shift up to this fraction of width/height (``Affine``)
``rotate: 10``              random rotation up to this many degrees (``Affine``)
``hflip: 0.5``              probability of a horizontal flip (``HorizontalFlip``)
``vflip: 0.0``              probability of a vertical flip (``VerticalFlip``)
``hsv: [0.015, 0.7, 0.4]``  Ultralytics' ``hsv_h/hsv_s/hsv_v``: hue shift up to h of the colour circle,
                            saturation and value factors in ``1 ± s`` / ``1 ± v`` (``ColorJitter``, p=1);
                            a number sets all three; a dict ``{h:, s:, v:}`` also works
``brightness_contrast: 0.2``  brightness and contrast change up to this fraction, with p=0.5
                            (``RandomBrightnessContrast``)
``blur: 0.1``               probability of a 3-7 px box blur (``Blur``)
``gray: 0.0``               probability of turning the image grey, 3 channels kept (``ToGray``)
``min_visibility: 0.1``     a box is dropped when less than this fraction of its area stays inside the image
``min_area: 1.0``           a box is dropped when its clipped area falls below this many pixels²
``fill: 114``               value of padded / uncovered pixels
==========================  ==========================================================================

Geometric transforms run first (letterbox, affine, flips), then photometric ones. Boxes are ``pascal_voc``
(xyxy pixels) with the class labels and box indices as ``label_fields``, so classes and any per-box flags
(``difficult``, ``iscrowd``) follow the boxes; boxes are clipped to the image (``BboxParams(clip=True)``) and
dropped by ``min_visibility`` / ``min_area``. An unknown key raises `DataError` naming the closest key.
"""

from __future__ import annotations

import difflib
import inspect
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from detkd.errors import DataError

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # no version check over the network at import
import albumentations as A  # noqa: E402
import cv2  # noqa: E402

__all__ = ["AUGMENT_KEYS", "DEFAULTS", "load_augment_config", "build_transform", "Augmenter"]

#: Every key a config may hold, with a one-line description (used in error messages).
AUGMENT_KEYS: dict[str, str] = {
    "imgsz": "letterbox size in pixels (int)",
    "scale": "zoom range [lo, hi] or s for [1-s, 1+s]",
    "translate": "max shift, fraction of the size (0..1)",
    "rotate": "max rotation in degrees (0..180)",
    "hflip": "probability (0..1)",
    "vflip": "probability (0..1)",
    "hsv": "[h, s, v] gains (h 0..0.5)",
    "brightness_contrast": "max change, fraction (0..1)",
    "blur": "probability (0..1)",
    "gray": "probability (0..1)",
    "min_visibility": "fraction of a box that must stay visible (0..1)",
    "min_area": "smallest box area kept, pixels^2",
    "fill": "padding value (0..255)",
}

#: Values used for keys a config leaves out.
DEFAULTS: dict[str, Any] = {"min_visibility": 0.1, "min_area": 1.0, "fill": 114}


def _num(key: str, v: Any, lo: float, hi: float) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
        raise DataError(f"augment config: '{key}: {v!r}' must be a number in [{lo:g}, {hi:g}] ({AUGMENT_KEYS[key]})")
    return float(v)


def _check_value(key: str, v: Any) -> Any:
    if v is None or v is False:
        return None
    if key in ("hflip", "vflip", "blur", "gray", "min_visibility", "brightness_contrast"):
        return _num(key, v, 0.0, 1.0)
    if key == "translate":
        return _num(key, v, 0.0, 0.99)
    if key == "rotate":
        return _num(key, v, 0.0, 180.0)
    if key == "min_area":
        return _num(key, v, 0.0, float("inf"))
    if key == "fill":
        return _num(key, v, 0.0, 255.0)
    if key == "imgsz":
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise DataError(f"augment config: 'imgsz: {v!r}' must be a positive integer (pixels)")
        return v
    if key == "scale":
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            s = _num(key, v, 0.0, 0.99)
            return (1.0 - s, 1.0 + s)
        numbers = isinstance(v, (list, tuple)) and all(type(x) in (int, float) for x in v)
        if numbers and len(v) == 2 and 0 < v[0] <= v[1]:
            return (float(v[0]), float(v[1]))
        raise DataError(
            f"augment config: 'scale: {v!r}' must be [lo, hi] with 0 < lo <= hi, or a number s in [0, 1) for [1-s, 1+s]"
        )
    if key == "hsv":
        if isinstance(v, Mapping):
            extra = set(v) - {"h", "s", "v"}
            if extra:
                raise DataError(f"augment config: 'hsv' keys are h, s, v; got {sorted(extra)}")
            v = [v.get("h", 0.0), v.get("s", 0.0), v.get("v", 0.0)]
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            v = [v, v, v]
        if not isinstance(v, (list, tuple)) or len(v) != 3:
            raise DataError(f"augment config: 'hsv: {v!r}' must be [h, s, v], a number, or {{h:, s:, v:}}")
        h = _num("hsv", v[0], 0.0, 0.5)
        s, val = _num("hsv", v[1], 0.0, 1.0), _num("hsv", v[2], 0.0, 1.0)
        return (h, s, val)
    raise AssertionError(key)


def load_augment_config(config: Mapping | str | os.PathLike | None) -> dict[str, Any]:
    """A checked config: every known key present (None = off), values normalised (``scale`` -> (lo, hi),
    ``hsv`` -> (h, s, v)). ``config``: a dict, a YAML file path, or None (only the defaults: no augmentation
    beyond box clipping). Raises `DataError` for an unknown key (naming the closest one) or a bad value."""
    if config is None:
        config = {}
    elif isinstance(config, (str, os.PathLike)):
        p = Path(config)
        if not p.is_file():
            raise DataError(f"augment config file not found: {p}")
        try:
            config = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise DataError(f"{p}: not valid YAML ({e})") from None
        if isinstance(config, Mapping) and set(config) == {"augment"}:
            config = config["augment"] or {}
    if not isinstance(config, Mapping):
        raise DataError(f"augment config must be a mapping of keys, got {type(config).__name__}")
    for k in config:
        if k not in AUGMENT_KEYS:
            close = difflib.get_close_matches(str(k), list(AUGMENT_KEYS), n=1, cutoff=0.5)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise DataError(f"augment config: unknown key '{k}'{hint} (known keys: {', '.join(AUGMENT_KEYS)})")
    merged = {**DEFAULTS, **config}
    return {k: _check_value(k, merged.get(k)) for k in AUGMENT_KEYS}


def _make(cls, **kw):
    """Build an albumentations transform, mapping 2.x argument names to 1.4's where needed."""
    params = inspect.signature(cls.__init__).parameters
    if "fill" in kw and "fill" not in params:
        kw["value" if "value" in params else "cval"] = kw.pop("fill")
    if "border_mode" in kw and "border_mode" not in params and "mode" in params:
        kw["mode"] = kw.pop("border_mode")
    return cls(**kw)


def build_transform(config: Mapping | str | os.PathLike | None) -> A.Compose:
    """The albumentations pipeline for a config (see the module docstring). Call it as
    ``t(image=img, bboxes=boxes_xyxy, class_labels=classes, box_ids=np.arange(n))``."""
    c = load_augment_config(config)
    fill = c["fill"] if c["fill"] is not None else 0.0
    t: list = []
    if c["imgsz"]:
        s = c["imgsz"]
        t += [
            A.LongestMaxSize(max_size=s, p=1.0),
            _make(A.PadIfNeeded, min_height=s, min_width=s, border_mode=cv2.BORDER_CONSTANT, fill=fill, p=1.0),
        ]
    if c["scale"] or c["translate"] or c["rotate"]:
        tr = c["translate"] or 0.0
        t.append(
            _make(
                A.Affine,
                scale=c["scale"] or (1.0, 1.0),
                keep_ratio=True,  # one zoom factor for x and y, as Ultralytics
                translate_percent=(-tr, tr) if tr else None,
                rotate=(-(c["rotate"] or 0.0), c["rotate"] or 0.0),
                border_mode=cv2.BORDER_CONSTANT,
                fill=fill,
                p=1.0,
            )
        )
    if c["hflip"]:
        t.append(A.HorizontalFlip(p=c["hflip"]))
    if c["vflip"]:
        t.append(A.VerticalFlip(p=c["vflip"]))
    if c["hsv"]:
        h, s, v = c["hsv"]
        t.append(A.ColorJitter(brightness=v, contrast=0.0, saturation=s, hue=h, p=1.0))
    if c["brightness_contrast"]:
        bc = c["brightness_contrast"]
        t.append(A.RandomBrightnessContrast(brightness_limit=bc, contrast_limit=bc, p=0.5))
    if c["blur"]:
        t.append(A.Blur(blur_limit=(3, 7), p=c["blur"]))
    if c["gray"]:
        t.append(A.ToGray(p=c["gray"]))
    bp = dict(
        format="pascal_voc",
        label_fields=["class_labels", "box_ids"],
        min_visibility=c["min_visibility"] or 0.0,
        min_area=c["min_area"] or 0.0,
    )
    if "clip" in inspect.signature(A.BboxParams.__init__).parameters:
        bp["clip"] = True
    with warnings.catch_warnings():  # an empty pipeline still clips and filters boxes; albumentations warns
        warnings.filterwarnings("ignore", message="Got processor for bboxes, but no transform to process it")
        return A.Compose(t, bbox_params=A.BboxParams(**bp))


class Augmenter:
    """``Augmenter(config)(image, boxes, classes) -> (image, boxes, classes, keep)``.

    ``image`` ``(H, W, C)`` uint8; ``boxes`` ``(n, 4)`` xyxy pixels; ``classes`` ``(n,)``. Returns the new image,
    ``boxes`` float32 ``(m, 4)`` inside the new image, ``classes`` int64 ``(m,)`` and ``keep`` int64 ``(m,)``:
    the input index of each kept box (use it for ``difficult`` / ``iscrowd``). Input boxes are clipped to the
    image first (albumentations rejects boxes outside it otherwise); zero-area boxes are not passed on (their
    indices are absent from ``keep``; validate the data first to have them counted).
    """

    def __init__(self, config: Mapping | str | os.PathLike | None = None):
        self.config = load_augment_config(config)
        self.transform = build_transform(config)

    def __call__(self, image: np.ndarray, boxes, classes) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        h, w = image.shape[:2]
        b = np.asarray(boxes, np.float32).reshape(-1, 4)
        b = np.clip(b, 0, np.array([w, h, w, h], np.float32))
        c = np.asarray(classes, np.int64).reshape(-1)
        if len(c) != len(b):
            raise DataError(f"augment: {len(b)} boxes but {len(c)} classes")
        ok = (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])  # zero-area boxes would make albumentations raise
        idx = np.flatnonzero(ok)
        out = self.transform(image=image, bboxes=b[ok], class_labels=c[ok], box_ids=idx)
        keep = np.asarray(out["box_ids"], np.int64).reshape(-1)
        ob = np.asarray(out["bboxes"], np.float32).reshape(-1, 4)
        return out["image"], ob, c[keep], keep
