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
    from detkd.integrations.ultralytics import expand_taps

    root = Path(__file__).resolve().parents[1]
    cfg = load_train_config(root / "configs" / name)
    _check_keys(cfg, name)
    s = DetectionModel(str(root / "detkd" / "assets" / "yolov8-pico.yaml"), nc=5, verbose=False)
    t = DetectionModel("yolov8n.yaml", nc=5, verbose=False)
    c = expand_taps(DistillConfig.from_dict(cfg["distill"], source=name), s, t)
    assert [f.student for f in c.features] == ["model.15", "model.18", "model.21"]


def test_shipped_distiller_example_config():
    from detkd.config import load_config

    c = load_config(Path(__file__).resolve().parents[1] / "configs" / "distill_example.yaml")
    assert [f.method for f in c.features] == ["cwd", "pkd", "fgd"] and c.logits.method == "sigmoid_kd"


def test_recipe_is_the_block_of_a_config_without_one_and_overrides_change_it(tmp_path):
    from detkd.config import DistillConfig, FeatureTapConfig
    from detkd.integrations.recipes import DEFAULT_RECIPE

    c = tmp_path / "run.yaml"
    c.write_text(yaml.safe_dump({"teacher": "t.pt", "student": "yolov8n.yaml", "data": "d.yaml"}))
    cfg = load_train_config(c, ["distill.logits.temperature=2", "distill.feature_method=pkd"])
    d = DistillConfig.from_dict(cfg["distill"])
    # the override changed the recipe; boxes and auto features stay on, weights come from the schema's defaults
    assert d.logits.temperature == 2.0 and d.logits.weight == 4.0
    assert d.logits.options == {"avg_factor": "teacher_score"}
    assert d.boxes.method == "ld" and d.boxes.weight == 4.0 and d.boxes.temperature == 10.0
    assert d.features == "auto" and d.feature_method == "pkd" and d.feature_weight == FeatureTapConfig.weight == 0.2
    # one home per default: the recipe names terms, methods and options, never a number
    flat = yaml.safe_dump(DEFAULT_RECIPE)
    assert not any(k in flat for k in ("weight", "temperature"))


def test_ultralytics_keys_are_in_the_schema():
    from detkd.config import DistillConfig

    def err(d):
        with pytest.raises(ConfigError) as e:
            DistillConfig.from_dict(d, source="kd.yaml")
        return str(e.value)

    assert err({"feature_methd": "cwd"}) == ("kd.yaml: distill.feature_methd: unknown key; did you mean "
                                             "'feature_method'?")
    assert "distill.feature_method: unknown method 'cwdd'; did you mean 'cwd'?" in err({"feature_method": "cwdd"})
    assert "distill.feature_options.tua: unknown option for method 'cwd'; did you mean 'tau'?" in err(
        {"features": "auto", "feature_options": {"tua": 2}})
    assert "distill.feature_weight: must be >= 0" in err({"feature_weight": -1})
    assert "distill.features: expected a list of taps" in err({"features": "all"})
    c = DistillConfig.from_dict({"features": [{"student": "auto", "teacher": "neck.2"}], "logits": "none",
                                 "boxes": False})
    assert c.logits is None and c.boxes is None and c.has_auto_taps
    r = c.with_auto_taps(["model.15", "model.18"], ["model.5", "model.8"])
    assert [(t.student, t.teacher) for t in r.features] == [("model.15", "neck.2")] and c.features[0].student == "auto"
    with pytest.raises(ConfigError, match="teacher has 3 detection levels, student 2"):
        DistillConfig.from_dict({"features": "auto"}).with_auto_taps(["a", "b"], ["x", "y", "z"])
    with pytest.raises(ConfigError, match="only an integration knows"):
        DistillConfig.from_dict({"features": "auto"}).require_module_names()
