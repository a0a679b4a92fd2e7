"""Distillation config (YAML -> dataclasses, errors naming key path, file and closest key) and the registry."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from detkd.config import BoxConfig, DistillConfig, FeatureTapConfig, LogitConfig, load_config
from detkd.errors import ConfigError
from detkd.losses import at_loss, cwd_loss, fitnet_loss, kd_loss, pkd_loss, sigmoid_kd_loss
from detkd.losses import registry
from detkd.losses.registry import BOX_METHODS, FEATURE_METHODS, LOGIT_METHODS
from detkd.schedules import Schedule

ROOT = Path(__file__).resolve().parents[1]
FULL = {
    "task_weight": 0.3,
    "stop_epoch": 40,
    "logits": {"method": "kd", "weight": 0.7, "temperature": 4.0,
               "schedule": {"kind": "cosine", "start": 1.0, "end": 0.01, "warmup_epochs": 1},
               "temperature_schedule": {"kind": "linear", "start": 4.0, "end": 1.0},
               "options": {"reduction": "sum"}},
    "boxes": {"method": "l1_giou", "weight": 0.35, "options": {"l1_weight": 1.0}},
    "features": [
        {"student": "neck.0", "teacher": "neck.0", "method": "cwd", "weight": 2.0, "options": {"tau": 2.0}},
        {"student": "neck.1:0", "teacher": "neck.1:feat", "method": "fgd", "adapter": "none",
         "schedule": "linear"},
    ],
}


def _yaml(tmp_path, data, name="kd.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data))
    return p


def _err(config) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(config)
    return str(e.value)


def test_full_config_parsed_into_dataclasses():
    c = DistillConfig.from_dict(FULL)
    assert c.task_weight == 0.3 and c.stop_epoch == 40.0
    assert isinstance(c.logits, LogitConfig) and c.logits.method == "kd" and c.logits.temperature == 4.0
    assert c.logits.schedule == Schedule("cosine", 1.0, 0.01, 1.0, None)
    assert c.logits.temperature_schedule == Schedule("linear", 4.0, 1.0)
    assert c.logits.options == {"reduction": "sum"}
    assert isinstance(c.boxes, BoxConfig) and c.boxes.method == "l1_giou" and c.boxes.temperature == 10.0
    assert c.boxes.schedule is None
    f0, f1 = c.features
    assert isinstance(f0, FeatureTapConfig) and (f0.student, f0.teacher, f0.method, f0.weight) == ("neck.0", "neck.0",
                                                                                                 "cwd", 2.0)
    assert f0.adapter == "auto" and f0.options == {"tau": 2.0}
    assert f1.schedule == Schedule("linear") and f1.adapter == "none" and f1.weight == 0.2
    # shorthands: a method name alone, a schedule kind alone
    s = DistillConfig.from_dict({"logits": "kd", "boxes": "ld"})
    assert s.logits == LogitConfig(method="kd") and s.boxes == BoxConfig(method="ld") and s.features == []
    assert DistillConfig.from_dict(None) == DistillConfig() and not DistillConfig().enabled


def test_roundtrip_dict_and_yaml(tmp_path):
    c = DistillConfig.from_dict(FULL)
    d = c.to_dict()
    assert DistillConfig.from_dict(d) == c
    assert d["features"][1]["schedule"] == {"kind": "linear", "start": 1.0, "end": None, "warmup_epochs": 0.0,
                                            "stop_epoch": None}
    # to_dict is plain YAML: dump, load (top level and under `distill:`), equal again
    assert load_config(_yaml(tmp_path, d)) == c
    assert load_config(_yaml(tmp_path, {"teacher": "t.pt", "epochs": 3, "distill": d}, "train.yaml")) == c
    assert load_config({"distill": FULL}) == c and load_config(c) == c


def test_shipped_example_config_loads():
    c = load_config(ROOT / "configs" / "distill_example.yaml")
    assert c.logits.method == "sigmoid_kd" and c.logits.options == {"avg_factor": "teacher_score"}
    assert c.boxes is None and [f.method for f in c.features] == ["cwd", "pkd", "fgd"]
    assert c.features[2].schedule == Schedule("cosine", 1.0, 0.01)


@pytest.mark.parametrize(
    "data, where, closest",
    [
        ({"stop_epochs": 3}, "distill.stop_epochs", "stop_epoch"),
        ({"logits": {"temprature": 2.0}}, "distill.logits.temprature", "temperature"),
        ({"boxes": {"wieght": 1.0}}, "distill.boxes.wieght", "weight"),
        ({"features": [{"student": "a", "teacher": "b"}, {"student": "a", "teacher": "b", "methd": "cwd"}]},
         "distill.features[1].methd", "method"),
        ({"features": [{"student": "a", "teacher": "b", "schedule": {"kind": "cosine", "strat": 1}}]},
         "distill.features[0].schedule.strat", "start"),
        ({"logits": {"temperature_schedule": {"kind": "linear", "ends": 1.0}}},
         "distill.logits.temperature_schedule.ends", "end"),
    ],
)
def test_unknown_key_names_path_file_and_closest(tmp_path, data, where, closest):
    p = _yaml(tmp_path, {"distill": data})
    assert _err(p) == f"{p}: {where}: unknown key; did you mean '{closest}'?"
    assert _err(data) == f"{where}: unknown key; did you mean '{closest}'?"  # no file: no file prefix


def test_unknown_key_without_close_match_lists_valid_keys():
    msg = _err({"zzz": 1})
    assert msg.startswith("distill.zzz: unknown key; valid keys: ")
    for k in ("boxes", "features", "logits", "stop_epoch", "task_weight"):
        assert k in msg


@pytest.mark.parametrize(
    "data, pattern",
    [
        ({"logits": {"method": "sigmoid_kdd"}},
         r"^distill\.logits\.method: unknown method 'sigmoid_kdd'; did you mean 'sigmoid_kd'\? \(choose from kd, sigmoid_kd\)$"),
        ({"boxes": {"method": "giou"}}, r"distill\.boxes\.method: unknown method 'giou'.*\(choose from bounded, l1_giou, ld\)"),
        ({"features": [{"student": "a", "teacher": "b", "method": "cdw"}]},
         r"distill\.features\[0\]\.method: unknown method 'cdw'; did you mean 'cwd'\? \(choose from at, cwd, fgd, fitnet, mgd, pkd\)"),
        ({"features": [{"student": "a", "teacher": "b", "method": ["cwd"]}]}, r"features\[0\]\.method: unknown method \['cwd'\]"),
        ({"boxes": {"weight": -1}}, r"^distill\.boxes\.weight: must be >= 0.0, got -1$"),
        ({"logits": {"weight": "2"}}, r"^distill\.logits\.weight: expected a number, got str '2'$"),
        ({"logits": {"weight": True}}, r"distill\.logits\.weight: expected a number, got bool"),
        ({"logits": {"temperature": 0}}, r"^distill\.logits\.temperature: must be > 0, got 0$"),
        ({"task_weight": -0.5}, r"distill\.task_weight: must be >= 0"),
        ({"stop_epoch": "ten"}, r"distill\.stop_epoch: expected a number"),
        ({"logits": 3}, r"^distill\.logits: expected a mapping, got int 3$"),
        ({"logits": {"options": [1]}}, r"distill\.logits\.options: expected a mapping"),
        ({"logits": {"options": {"bta": 1.0}}},
         r"distill\.logits\.options\.bta: unknown option for method 'sigmoid_kd'; did you mean 'beta'\? \(valid: avg_factor, beta, quality_focal, reduction\)"),
        ({"features": [{"student": "a", "teacher": "b", "options": {"tua": 1.0}}]},
         r"distill\.features\[0\]\.options\.tua: unknown option for method 'cwd'; did you mean 'tau'\?"),
        ({"features": [{"student": "a", "teacher": "b", "method": "mgd", "options": {"alpha": 1.0}}]},
         r"options\.alpha: unknown option for method 'mgd'.*alpha_mgd"),
        ({"features": [{"student": "a", "teacher": "b", "adapter": "conv1x1"}]},
         r"distill\.features\[0\]\.adapter: unknown adapter 'conv1x1'.*\(choose from auto, conv, conv_bn, none\)"),
        ({"features": [{"teacher": "b"}]}, r"distill\.features\[0\]\.student: give the module name"),
        ({"features": [{"student": 3, "teacher": "b"}]}, r"distill\.features\[0\]\.student: give the module name.*got 3"),
        ({"features": {"student": "a"}}, r"distill\.features: expected a list of taps"),
        ({"features": ["cwd"]}, r"distill\.features\[0\]: expected a mapping, got str"),
        ({"logits": {"schedule": {"kind": "cosin"}}},
         r"distill\.logits\.schedule\.kind: unknown schedule 'cosin'; did you mean 'cosine'\? \(choose from constant, cosine, linear\)"),
        ({"logits": {"schedule": "exp"}}, r"distill\.logits\.schedule\.kind: unknown schedule 'exp'"),
        ({"logits": {"schedule": {"warmup_epochs": -2}}}, r"distill\.logits\.schedule\.warmup_epochs: must be >= 0"),
        ({"logits": {"temperature_schedule": {"kind": "linear", "start": 4, "end": 0}}},
         r"distill\.logits\.temperature_schedule\.end: must be > 0"),
        ({"logits": {"temperature_schedule": {"kind": "constant", "warmup_epochs": 2}}},
         r"distill\.logits\.temperature_schedule: a temperature schedule takes no warmup_epochs"),
        ([1, 2], r"^distill: expected a mapping, got list"),
    ],
)
def test_bad_values_name_key_and_allowed_values(data, pattern):
    with pytest.raises(ConfigError, match=pattern):
        DistillConfig.from_dict(data)


def test_file_errors(tmp_path):
    assert "not found" in _err(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("logits: [unclosed\n")
    assert _err(bad).startswith(f"{bad}: not valid YAML")
    p = _yaml(tmp_path, {"logits": {"method": "kd", "weight": -3}})
    assert _err(p) == f"{p}: distill.logits.weight: must be >= 0.0, got -3"
    assert "config must be a DistillConfig" in _err(42)


def test_python_built_config_is_checked():
    with pytest.raises(ConfigError, match="distill.logits.method: unknown method 'soft'"):
        load_config(DistillConfig(logits=LogitConfig(method="soft")))


def test_methods_are_checked_against_the_registry(monkeypatch):
    assert set(FEATURE_METHODS) == {"fitnet", "cwd", "pkd", "at", "mgd", "fgd"}
    assert set(LOGIT_METHODS) == {"kd", "sigmoid_kd"} and set(BOX_METHODS) == {"ld", "l1_giou", "bounded"}
    tap = {"student": "a", "teacher": "b", "method": "mine"}
    with pytest.raises(ConfigError, match="unknown method 'mine'"):
        DistillConfig.from_dict({"features": [tap]})
    monkeypatch.setitem(FEATURE_METHODS, "mine", registry.FeatureMethod("mine", lambda sc, tc: None,
                                                                       "detkd.losses.features:at_loss"))
    assert DistillConfig.from_dict({"features": [tap]}).features[0].method == "mine"


def test_registry_flags_and_options():
    learnable = {k for k, m in FEATURE_METHODS.items() if m.learnable}
    aligns = {k for k, m in FEATURE_METHODS.items() if m.aligns_channels}
    assert learnable == aligns == {"mgd", "fgd"}
    assert {k for k, m in FEATURE_METHODS.items() if m.channel_free} == {"at"}
    assert {k for k, m in FEATURE_METHODS.items() if m.needs_gt} == {"fgd"}
    assert FEATURE_METHODS["cwd"].option_names() == {"tau"}
    assert FEATURE_METHODS["at"].option_names() == set()
    assert FEATURE_METHODS["fitnet"].option_names() == {"reduction", "normalize"}
    assert {"alpha_mgd", "lambda_mgd"} <= FEATURE_METHODS["mgd"].option_names()
    assert "student_channels" not in FEATURE_METHODS["fgd"].option_names()
    assert LOGIT_METHODS["kd"].option_names() == {"reduction"}
    assert BOX_METHODS["ld"].option_names() == {"avg_factor", "reduction", "bin_reduction"}
    assert "weight" not in BOX_METHODS["l1_giou"].option_names()


def test_registry_builders_compute_the_named_losses():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 6, 5, 7, generator=g), torch.randn(2, 6, 5, 7, generator=g)
    expected = {"fitnet": fitnet_loss(s, t), "cwd": cwd_loss(s, t, tau=3.0), "pkd": pkd_loss(s, t), "at": at_loss(s, t)}
    opts = {"cwd": {"tau": 3.0}}
    for name, value in expected.items():
        m = FEATURE_METHODS[name].build(6, 6, **opts.get(name, {}))
        assert isinstance(m, torch.nn.Module) and not list(m.parameters())
        torch.testing.assert_close(m(s, t, gt_boxes=None, gt_valid=None, img_shape=None), value)
    for name in ("mgd", "fgd"):
        m = FEATURE_METHODS[name].build(4, 6)
        assert sum(p.numel() for p in m.parameters()) > 0
    with pytest.raises(ConfigError, match="fgd needs the batch's ground-truth boxes"):
        FEATURE_METHODS["fgd"].build(6, 6)(s, t)

    class Head:  # anything with .cls / .box_dist / .boxes
        def __init__(self, cls):
            self.cls, self.box_dist, self.boxes = cls, None, None

    sc, tc = torch.randn(2, 9, 3, generator=g), torch.randn(2, 9, 3, generator=g)
    torch.testing.assert_close(LOGIT_METHODS["kd"].loss(Head(sc), Head(tc), temperature=2.0),
                               kd_loss(sc.transpose(1, 2), tc.transpose(1, 2), temperature=2.0))
    torch.testing.assert_close(LOGIT_METHODS["sigmoid_kd"].loss(Head(sc), Head(tc), temperature=1.0),
                               sigmoid_kd_loss(sc, tc))
    mass = tc.sigmoid().amax(-1).sum()
    torch.testing.assert_close(
        LOGIT_METHODS["sigmoid_kd"].loss(Head(sc), Head(tc), temperature=1.0, avg_factor="teacher_score"),
        sigmoid_kd_loss(sc, tc, reduction="sum") / mass)
    with pytest.raises(ConfigError, match="same anchors and classes"):
        LOGIT_METHODS["kd"].loss(Head(sc), Head(tc[:, :4]), temperature=1.0)
    with pytest.raises(ConfigError, match="needs DFL box distributions"):
        BOX_METHODS["ld"].loss(Head(sc), Head(tc), temperature=10.0)
