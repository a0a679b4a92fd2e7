"""Box-safe augmentation: boxes follow the image exactly and never leave it; config errors are clear."""

import numpy as np
import pytest
import yaml

from detkd.data.augment import Augmenter, build_transform, load_augment_config
from detkd.errors import DataError

W, H = 64, 48
BOXES = np.array([[0, 0, 8, 8], [28, 20, 36, 28], [4, 4, 20, 20], [50.5, 30.25, 63.0, 47.5]], np.float32)
CLASSES = np.array([3, 1, 2, 0])


def _image(seed=0):
    return np.random.default_rng(seed).integers(0, 255, (H, W, 3), dtype=np.uint8)


def test_hflip_moves_boxes_exactly():
    img = _image()
    out, boxes, classes, keep = Augmenter({"hflip": 1.0})(img, BOXES, CLASSES)
    np.testing.assert_array_equal(out, img[:, ::-1])
    expect = np.stack([W - BOXES[:, 2], BOXES[:, 1], W - BOXES[:, 0], BOXES[:, 3]], 1)  # x1' = W - x2, x2' = W - x1
    np.testing.assert_allclose(boxes, expect, atol=1e-4)
    assert keep.tolist() == [0, 1, 2, 3] and classes.tolist() == CLASSES.tolist()
    assert boxes.dtype == np.float32 and classes.dtype == np.int64


def test_letterbox_scales_and_pads_like_ultralytics():
    img = _image(1)
    out, boxes, _, keep = Augmenter({"imgsz": 32})(img, BOXES, CLASSES)
    assert out.shape == (32, 32, 3)
    # 64x48 -> 32x24 (gain 0.5), centred: 4 rows of padding above and below, value 114
    np.testing.assert_allclose(boxes, BOXES * 0.5 + np.array([0, 4, 0, 4]), atol=1e-4)
    assert (out[:4] == 114).all() and (out[28:] == 114).all() and not (out[4:28] == 114).all()
    assert keep.tolist() == [0, 1, 2, 3]


def test_zoom_clips_boxes_and_drops_by_min_visibility():
    img = _image(2)
    # zoom x2 about the centre (32, 24): x' = 32 + 2 (x - 32), y' = 24 + 2 (y - 24)
    out, boxes, classes, keep = Augmenter({"scale": [2, 2], "min_visibility": 0.1})(img, BOXES, CLASSES)
    assert out.shape == img.shape
    # box 0 -> entirely outside: dropped; box 1 -> (24, 16, 40, 32); box 2 -> (-24, -16, 8, 16) clipped to
    # (0, 0, 8, 16), visible 8*16 / (32*32) = 0.125 >= 0.1: kept; box 3 -> (69, 36.5, 94, 71) outside: dropped
    assert keep.tolist() == [1, 2] and classes.tolist() == [1, 2]
    np.testing.assert_allclose(boxes, [[24, 16, 40, 32], [0, 0, 8, 16]], atol=1e-3)
    _, boxes, _, keep = Augmenter({"scale": [2, 2], "min_visibility": 0.2})(img, BOXES, CLASSES)
    assert keep.tolist() == [1]


def test_random_pipeline_keeps_every_box_inside_the_image():
    cfg = {
        "imgsz": 64, "scale": [0.5, 1.5], "translate": 0.2, "rotate": 15, "hflip": 0.5, "vflip": 0.2,
        "hsv": [0.015, 0.7, 0.4], "brightness_contrast": 0.2, "blur": 0.3, "gray": 0.1,
    }  # fmt: skip
    aug = Augmenter(cfg)
    kept = 0
    for i in range(25):
        out, boxes, classes, keep = aug(_image(i), BOXES, CLASSES)
        h, w = out.shape[:2]
        assert (h, w) == (64, 64)
        assert ((boxes >= 0) & (boxes <= np.array([w, h, w, h]))).all()
        assert ((boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])).all()
        assert classes.tolist() == CLASSES[keep].tolist() and len(set(keep.tolist())) == len(keep)
        kept += len(keep)
    assert kept > 0


def test_photometric_only_leaves_boxes_alone_and_input_boxes_are_clipped(tmp_path):
    p = tmp_path / "aug.yaml"
    p.write_text(yaml.safe_dump({"augment": {"hsv": 0.3, "blur": 1.0, "brightness_contrast": 0.3}}))
    img = _image(3)
    out, boxes, _, keep = Augmenter(p)(img, BOXES, CLASSES)
    np.testing.assert_allclose(boxes, BOXES, atol=1e-4)
    assert not np.array_equal(out, img)
    _, boxes, _, keep = Augmenter(None)(img, [[-5, -5, 10, 10], [3, 3, 3, 9]], [0, 1])
    np.testing.assert_allclose(boxes, [[0, 0, 10, 10]], atol=1e-4)  # clipped; the zero-width box is not passed on
    assert keep.tolist() == [0]


def test_config_errors_name_the_key():
    with pytest.raises(DataError, match=r"unknown key 'hflp'; did you mean 'hflip'\?"):
        build_transform({"hflp": 0.5})
    with pytest.raises(DataError, match=r"unknown key 'brightnes'; did you mean 'brightness_contrast'\?"):
        load_augment_config({"brightnes": 0.2})
    with pytest.raises(DataError, match=r"'hflip: 1.5' must be a number in \[0, 1\]"):
        load_augment_config({"hflip": 1.5})
    with pytest.raises(DataError, match=r"'scale: \[1.5, 0.5\]' must be \[lo, hi\]"):
        load_augment_config({"scale": [1.5, 0.5]})
    with pytest.raises(DataError, match=r"'imgsz: 'big'' must be a positive integer"):
        load_augment_config({"imgsz": "big"})
    with pytest.raises(DataError, match=r"'hsv: 0.7' must be a number in \[0, 0.5\]"):
        load_augment_config({"hsv": [0.7, 0.5, 0.5]})
    c = load_augment_config({"scale": 0.25, "hsv": {"h": 0.1}})
    assert c["scale"] == (0.75, 1.25) and c["hsv"] == (0.1, 0.0, 0.0) and c["min_visibility"] == 0.1
