"""detkd.data.synth held-out splits: ``test`` (same cameras) and ``test_ood`` (unseen cameras), without changing a
byte of the train / val output."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from detkd.data.synth import _camera, generate, render_frame

KW = dict(seed=5, n_train=8, n_val=4, imgsz=96, n_cameras=3, progress=False)
#: The last commit before the held-out splits existed; its generator is the reference for train/val bytes.
REFERENCE_COMMIT = "0a96090"


def _digest(root: Path, splits=("train", "val")) -> dict[str, str]:
    """sha256 of every file of ``splits`` (images, labels, COCO json), by relative path."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and any(f"/{s}/" in f"/{rel}" or rel.endswith(f"instances_{s}.json") for s in splits):
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _yaml_without_path(root: Path) -> dict:
    d = yaml.safe_load((root / "data.yaml").read_text())
    d.pop("path")
    return d


def test_train_val_bytes_do_not_depend_on_the_held_out_splits(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    generate(a, **KW)
    s = generate(b, n_test=3, ood_cameras=2, n_test_ood=5, **KW)
    da = _digest(a)
    assert len(da) == 2 * (8 + 4) + 2 and da == _digest(b)
    ya, yb = _yaml_without_path(a), _yaml_without_path(b)
    assert list(ya) == ["train", "val", "names"]
    assert list(yb) == ["train", "val", "test", "test_ood", "names"]
    assert yb["test"] == "images/test" and yb["test_ood"] == "images/test_ood"
    assert {k: yb[k] for k in ya} == ya
    assert s["ood_cameras"] == ["CAM 04", "CAM 05"]
    assert {k: v["images"] for k, v in s["splits"].items()} == {"train": 8, "val": 4, "test": 3, "test_ood": 5}


def test_train_val_bytes_match_the_generator_before_held_out_splits(tmp_path):
    """The generator at REFERENCE_COMMIT (loaded from git into a temp module) writes the same train/val bytes."""
    repo = Path(__file__).resolve().parents[1]
    if shutil.which("git") is None:
        pytest.skip("git not available")
    r = subprocess.run(["git", "show", f"{REFERENCE_COMMIT}:detkd/data/synth.py"], cwd=repo, capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"reference commit {REFERENCE_COMMIT} not in this checkout")
    src = tmp_path / "synth_reference.py"
    src.write_bytes(r.stdout)
    spec = importlib.util.spec_from_file_location("detkd_synth_reference", src)
    ref = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = ref  # dataclasses look their module up
    try:
        spec.loader.exec_module(ref)
        ref.generate(tmp_path / "ref", **KW)
    finally:
        del sys.modules[spec.name]
    generate(tmp_path / "new", ood_cameras=2, n_test=2, **KW)
    assert _digest(tmp_path / "ref") == _digest(tmp_path / "new")
    ynew = _yaml_without_path(tmp_path / "new")
    del ynew["test"], ynew["test_ood"]
    assert _yaml_without_path(tmp_path / "ref") == ynew


def test_ood_cameras_never_appear_in_train_val_or_test(tmp_path):
    seen = {s: set() for s in ("train", "val", "test", "test_ood")}
    for split in seen:
        cams = [3, 4] if split == "test_ood" else None
        for i in range(40):
            seen[split].add(render_frame(5, split, i, 96, n_cameras=3, cameras=cams)[3]["camera_id"])
    assert seen["train"] == seen["val"] == seen["test"] == {0, 1, 2}
    assert seen["test_ood"] == {3, 4}
    # unseen cameras are new scenes: their empty backgrounds differ from every training camera's
    for c in (3, 4):
        for k in (0, 1, 2):
            assert not np.allclose(_camera(5, c, 96).day, _camera(5, k, 96).day)

    # the written test_ood split is exactly those frames (labels), and the in-distribution test split differs
    s = generate(tmp_path, n_test=4, ood_cameras=2, n_test_ood=6, **KW)
    for i in range(6):
        _, boxes, labels, meta = render_frame(5, "test_ood", i, 96, n_cameras=3, cameras=[3, 4])
        assert meta["camera_id"] in (3, 4)
        rows = [ln.split() for ln in (tmp_path / "labels/test_ood" / f"{i + 1:06d}.txt").read_text().splitlines()]
        assert [int(r[0]) for r in rows] == labels.tolist()
        xyxy = np.array([[float(v) for v in r[1:]] for r in rows]).reshape(-1, 4) * 96
        np.testing.assert_allclose(xyxy[:, :2] - xyxy[:, 2:] / 2, boxes[:, :2], atol=1e-3)
    coco = json.loads((tmp_path / "annotations/instances_test_ood.json").read_text())
    assert len(coco["images"]) == 6 and s["splits"]["test_ood"]["boxes"] == len(coco["annotations"])
    assert (tmp_path / "labels/test").is_dir() and len(list((tmp_path / "images/test").glob("*.jpg"))) == 4


def test_held_out_splits_read_validate_and_disappear_when_not_asked(tmp_path):
    from detkd.data.formats import read_dataset
    from detkd.data.validate import validate_dataset

    generate(tmp_path, ood_cameras=1, **KW)  # n_test_ood defaults to n_val; no test split
    data = yaml.safe_load((tmp_path / "data.yaml").read_text())
    assert "test" not in data and data["test_ood"] == "images/test_ood"
    assert not (tmp_path / "images/test").exists()
    ds = read_dataset(tmp_path / "data.yaml", split="test_ood")
    assert len(ds.images) == 4
    assert validate_dataset(tmp_path / "data.yaml", split="test_ood", strict=True).images_read == 4

    generate(tmp_path, **KW)  # rerun without it: its files, json and yaml key are gone
    assert "test_ood" not in yaml.safe_load((tmp_path / "data.yaml").read_text())
    assert not list((tmp_path / "images/test_ood").glob("*")) and not list((tmp_path / "labels/test_ood").glob("*"))
    assert not (tmp_path / "annotations/instances_test_ood.json").exists()
    with pytest.raises(ValueError):
        generate(tmp_path, ood_cameras=-1, **KW)


def test_cli_flags(tmp_path, capsys):
    from detkd.cli import main

    rc = main(["data", "synth", "--out", str(tmp_path), "--train", "3", "--val", "2", "--imgsz", "96", "--cameras", "2",
               "--test", "2", "--ood-cameras", "2", "--test-ood", "3"])
    out = capsys.readouterr().out
    assert rc == 0 and "instances_{train,val,test,test_ood}.json" in out and "CAM 03" in out
    data = yaml.safe_load((tmp_path / "data.yaml").read_text())
    assert [k for k in data if k.startswith(("train", "val", "test"))] == ["train", "val", "test", "test_ood"]
    assert len(list((tmp_path / "images/test_ood").glob("*.jpg"))) == 3
