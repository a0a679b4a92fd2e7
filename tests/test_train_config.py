"""`detkd train` config handling: overrides, key checks, data-yaml checks (fast, no training)."""

from pathlib import Path

import pytest
import yaml

from detkd.errors import ConfigError, DataError
from detkd.train import _check_keys, apply_overrides, check_data_yaml, load_train_config


def test_overrides_nested_and_typed():
    cfg = {"epochs": 3, "distill": {"logits": {"weight": 1.0}}}
    apply_overrides(cfg, ["epochs=10", "distill.logits.weight=2.5", "distill.boxes.method=ld", "amp=false", "name=a=b"])
    assert cfg["epochs"] == 10 and isinstance(cfg["epochs"], int)
    assert cfg["distill"]["logits"]["weight"] == 2.5
    assert cfg["distill"]["boxes"] == {"method": "ld"}
    assert cfg["amp"] is False
    assert cfg["name"] == "a=b"
    with pytest.raises(ConfigError, match="expected key=value"):
        apply_overrides(cfg, ["epochs"])


def test_unknown_top_level_key_names_closest(tmp_path):
    cfg = {"teacher": "t.pt", "student": "yolov8n.yaml", "data": "d.yaml", "epocs": 3}
    with pytest.raises(ConfigError) as e:
        _check_keys(cfg, "my.yaml")
    assert "my.yaml: unknown key 'epocs'; did you mean 'epochs'?" in str(e.value)
    with pytest.raises(ConfigError, match="missing key 'teacher'"):
        _check_keys({"student": "s", "data": "d"}, "my.yaml")


def _data_yaml(tmp_path: Path, **extra) -> Path:
    (tmp_path / "images" / "train").mkdir(parents=True)
    (tmp_path / "images" / "val").mkdir(parents=True)
    d = {"path": str(tmp_path), "train": "images/train", "val": "images/val", "names": {0: "a", 1: "b"}, **extra}
    p = tmp_path / "data.yaml"
    p.write_text(yaml.safe_dump(d))
    return p


def test_data_yaml_ok_and_errors(tmp_path):
    p = _data_yaml(tmp_path)
    assert check_data_yaml(p)["_nc"] == 2
    with pytest.raises(DataError, match="file not found"):
        check_data_yaml(tmp_path / "nope.yaml")
    d = yaml.safe_load(p.read_text())
    d["val"] = "images/missing"
    p.write_text(yaml.safe_dump(d))
    with pytest.raises(DataError) as e:
        check_data_yaml(p)
    assert "val path 'images/missing'" in str(e.value) and "does not exist" in str(e.value)


def test_data_yaml_download_key_refused(tmp_path):
    p = _data_yaml(tmp_path, download="https://example.invalid/x.zip")
    with pytest.raises(DataError, match="never downloads"):
        check_data_yaml(p)


def test_config_paths_resolved_relative_to_file(tmp_path):
    (tmp_path / "t.pt").write_bytes(b"x")
    c = tmp_path / "run.yaml"
    c.write_text(yaml.safe_dump({"teacher": "t.pt", "student": "yolov8n.yaml", "data": "d.yaml"}))
    cfg = load_train_config(c, ["epochs=2"])
    assert cfg["teacher"] == str(tmp_path.resolve() / "t.pt")
    assert cfg["student"] == "yolov8n.yaml"  # not a file beside the config: left for Ultralytics to resolve
    assert cfg["epochs"] == 2
    with pytest.raises(ConfigError, match="config file not found"):
        load_train_config(tmp_path / "missing.yaml")


@pytest.mark.parametrize("name", ["synth_yolov8.yaml", "coco_yolov8l_to_yolov8n.yaml"])
def test_shipped_train_configs_are_valid(name):
    """Every key of the shipped configs is known, and the distill block validates against real YOLO layers."""
    from ultralytics.nn.tasks import DetectionModel

    from detkd.config import DistillConfig
    from detkd.integrations.ultralytics import _expand_features

    root = Path(__file__).resolve().parents[1]
    cfg = load_train_config(root / "configs" / name)
    _check_keys(cfg, name)
    s = DetectionModel(str(root / "detkd" / "assets" / "yolov8-pico.yaml"), nc=5, verbose=False)
    t = DetectionModel("yolov8n.yaml", nc=5, verbose=False)
    c = DistillConfig.from_dict(_expand_features(cfg["distill"], s, t))
    assert [f.student for f in c.features] == ["model.15", "model.18", "model.21"]


def test_shipped_distiller_example_config():
    from detkd.config import load_config

    c = load_config(Path(__file__).resolve().parents[1] / "configs" / "distill_example.yaml")
    assert [f.method for f in c.features] == ["cwd", "pkd", "fgd"] and c.logits.method == "sigmoid_kd"
