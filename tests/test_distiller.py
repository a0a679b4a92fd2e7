"""Distiller, config and schedules on tiny framework-free detectors."""

from __future__ import annotations

import copy
import math
import pickle

import pytest
import torch
from torch import nn

from detkd.config import DistillConfig, load_config
from detkd.distiller import DenseOutputs, Distiller
from detkd.errors import ConfigError
from detkd.losses import cwd_loss, fitnet_loss, ld_loss, sigmoid_kd_loss
from detkd.schedules import Schedule

K, R = 3, 8


class TinyDet(nn.Module):
    """Two-level backbone + dense head returning anchors-first cls logits and DFL box distributions."""

    def __init__(self, c: int, stride2: int = 2):
        super().__init__()
        self.b1 = nn.Conv2d(3, c, 3, 2, 1)
        self.b2 = nn.Conv2d(c, 2 * c, 3, stride2, 1)
        self.bn = nn.BatchNorm2d(2 * c)
        self.cls = nn.Conv2d(2 * c, K, 1)
        self.box = nn.Conv2d(2 * c, 4 * R, 1)

    def forward(self, x):
        f2 = self.bn(self.b2(self.b1(x).relu())).relu()
        n = x.shape[0]
        return {"cls": self.cls(f2).flatten(2).transpose(1, 2),
                "box_dist": self.box(f2).flatten(2).transpose(1, 2).reshape(n, -1, 4, R)}


CFG = {
    "logits": {"method": "sigmoid_kd", "weight": 2.0},
    "boxes": {"method": "ld", "weight": 0.5, "temperature": 10.0},
    "features": [
        {"student": "b1", "teacher": "b1", "method": "cwd", "weight": 3.0, "options": {"tau": 2.0}},
        {"student": "b2", "teacher": "b2", "method": "fitnet", "weight": 1.5},
    ],
}


@pytest.fixture()
def pair():
    torch.manual_seed(0)
    return TinyDet(4), TinyDet(8), torch.randn(2, 3, 32, 32)


def _hooks(*models):
    return sum(len(m._forward_hooks) for model in models for m in model.modules())


def test_adapters_params_state_and_teacher_frozen(pair):
    s, t, x = pair
    keys_before = set(s.state_dict())
    kd = Distiller(s, t, CFG, example_inputs=x)
    # 1x1 conv + BN adapters for the channel mismatch (4->8 and 8->16)
    a0, a1 = kd.adapters["0"], kd.adapters["1"]
    assert isinstance(a0[0], nn.Conv2d) and a0[0].weight.shape == (8, 4, 1, 1) and isinstance(a0[1], nn.BatchNorm2d)
    assert a1[0].weight.shape == (16, 8, 1, 1)
    ids = {id(p) for p in kd.parameters()}
    assert ids == {id(p) for p in kd.adapters.parameters()}
    assert not ids & {id(p) for p in s.parameters()} and not ids & {id(p) for p in t.parameters()}
    assert set(s.state_dict()) == keys_before
    assert all(k.startswith(("adapters.", "feature_losses.")) for k in kd.state_dict())
    kd.train()
    assert not t.training and all(not p.requires_grad for p in t.parameters())
    assert s.training  # probing restored the student's mode
    assert _hooks(s, t) == 0


def test_terms_equal_independent_sum_and_no_teacher_grad(pair):
    s, t, x = pair
    kd = Distiller(s, t, CFG, example_inputs=x)
    with kd.record():
        out = s(x)
    assert _hooks(s) == 0
    # independent recomputation on the same tensors
    with torch.no_grad():
        t_out = t(x)
        t1 = t.b1(x)
        t2 = t.b2(t1.relu())  # the taps are the conv outputs themselves
        s1 = s.b1(x)
        s2 = s.b2(s1.relu())
    terms = kd(x, student_output=out)
    exp_cls = 2.0 * sigmoid_kd_loss(out["cls"].detach(), t_out["cls"])
    w = t_out["cls"].sigmoid().amax(-1).unsqueeze(-1).expand(-1, -1, 4).reshape(-1)
    exp_box = 0.5 * ld_loss(out["box_dist"].detach().reshape(-1, R), t_out["box_dist"].reshape(-1, R), 10.0,
                            weight=w, avg_factor=w.sum().clamp(min=1))
    with torch.no_grad():
        exp_feat = 3.0 * cwd_loss(kd.adapters["0"](s1), t1, tau=2.0) + 1.5 * fitnet_loss(kd.adapters["1"](s2), t2)
    assert set(terms) == {"kd_cls", "kd_box", "kd_feat", "kd_total"}
    torch.testing.assert_close(terms["kd_cls"].detach(), exp_cls, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(terms["kd_box"].detach(), exp_box, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(terms["kd_feat"].detach(), exp_feat, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(terms["kd_total"], terms["kd_cls"] + terms["kd_box"] + terms["kd_feat"])
    assert set(kd.last_terms) == {"kd_cls", "kd_box", "kd_feat/b1", "kd_feat/b2"}
    terms["kd_total"].backward()
    assert all(p.grad is None for p in t.parameters())
    assert s.b1.weight.grad is not None and s.cls.weight.grad is not None
    assert kd.adapters["0"][0].weight.grad is not None
    assert _hooks(s, t) == 0


def test_spatial_mismatch_interpolates(pair):
    _, t, x = pair
    s = TinyDet(4, stride2=1)  # student level 2 is twice the teacher's size
    kd = Distiller(s, t, {"features": [{"student": "b2", "teacher": "b2", "method": "at"}]}, example_inputs=x)
    assert isinstance(kd.adapters["0"], nn.Identity)  # attention maps are channel-free
    with kd.record():
        s(x)
    v = kd(x)["kd_feat"]
    assert v.ndim == 0 and v > 0


def test_schedules_values():
    c = Schedule("cosine")  # YOLOv6: 1 -> 0.01
    for e, total in ((0, 10), (3, 10), (10, 10)):
        assert c(e, total) == pytest.approx(((1 - math.cos(e * math.pi / total)) / 2) * (0.01 - 1) + 1)
    lin = Schedule("linear", start=2.0, end=0.0)
    assert lin(5, 10) == pytest.approx(1.0) and lin(20, 10) == 0.0
    w = Schedule("constant", start=1.0, warmup_epochs=2)
    assert w(0.5, 10) == pytest.approx(0.25) and w(2, 10) == 1.0
    st = Schedule("constant", stop_epoch=3)
    assert st(2.99, 10) == 1.0 and st(3, 10) == 0.0
    with pytest.raises(ValueError):
        Schedule("exp")


def test_schedule_weights_and_stop_epoch_skip_teacher(pair):
    s, t, x = pair
    cfg = {"logits": {"method": "kd", "weight": 1.0, "temperature": 2.0,
                      "schedule": {"kind": "linear", "start": 1.0, "end": 0.0}},
           "stop_epoch": 5}
    kd = Distiller(s, t, cfg)
    out = s(x)
    full = kd(x, student_output=out, epoch=0, total_epochs=10)["kd_cls"]
    half = kd(x, student_output=out, epoch=5 - 1e-9, total_epochs=10)["kd_cls"]
    assert float(half.detach()) == pytest.approx(float(full.detach()) * 0.5, rel=1e-5)
    n = kd.teacher_forwards
    stopped = kd(x, student_output=out, epoch=5, total_epochs=10)
    assert kd.teacher_forwards == n  # no teacher forward once distillation stops
    assert all(float(v) == 0.0 for v in stopped.values())


def test_deepcopy_pickle_same_losses(pair):
    s, t, x = pair
    kd = Distiller(s, t, CFG, example_inputs=x).eval()
    with kd.record():
        out = s(x)
    ref = {k: float(v) for k, v in kd(x, student_output=out).items()}
    cp = copy.deepcopy(kd)
    assert cp.teacher is kd.teacher  # frozen teacher shared, not duplicated
    pk = pickle.loads(pickle.dumps(kd))
    for other in (cp, pk):
        with other.record():
            o = other.student(x)
        got = {k: float(v) for k, v in other(x, student_output=o).items()}
        assert got == pytest.approx(ref, rel=1e-6)


def test_sgd_step_decreases_kd_loss(pair):
    s, t, x = pair
    kd = Distiller(s, t, CFG, example_inputs=x)
    opt = torch.optim.SGD(list(s.parameters()) + list(kd.parameters()), lr=0.05)

    def step():
        with kd.record():
            out = s(x)
        return kd(x, student_output=out)["kd_total"]

    s.eval()  # fixed BN statistics, so the same batch gives comparable numbers
    first = step()
    first.backward()
    opt.step()
    assert float(step()) < float(first)


def test_config_errors_name_key_and_closest():
    with pytest.raises(ConfigError) as e:
        DistillConfig.from_dict({"features": [{"student": "a", "teacher": "b"}, {"student": "a", "teacher": "b",
                                                                                  "methd": "cwd"}]})
    assert "distill.features[1].methd: unknown key; did you mean 'method'?" in str(e.value)
    with pytest.raises(ConfigError, match=r"distill.logits.method: unknown method 'sigmoid_kdd'; did you mean 'sigmoid_kd'"):
        DistillConfig.from_dict({"logits": {"method": "sigmoid_kdd"}})
    with pytest.raises(ConfigError, match=r"distill.boxes.weight: must be >= 0"):
        DistillConfig.from_dict({"boxes": {"weight": -1}})
    with pytest.raises(ConfigError, match="stop_epochs: unknown key; did you mean 'stop_epoch'"):
        DistillConfig.from_dict({"stop_epochs": 3})
    with pytest.raises(ConfigError, match="schedule.kind: unknown schedule 'cosin'"):
        DistillConfig.from_dict({"logits": {"schedule": {"kind": "cosin"}}})


def test_config_yaml_roundtrip(tmp_path):
    p = tmp_path / "kd.yaml"
    import yaml

    p.write_text(yaml.safe_dump({"distill": CFG}))
    c = load_config(p)
    assert c.logits.weight == 2.0 and c.features[0].options == {"tau": 2.0}
    again = DistillConfig.from_dict(c.to_dict())
    assert again == c


def test_missing_module_and_bad_head(pair):
    s, t, x = pair
    with pytest.raises(ConfigError, match="student has no module named 'b3'; close names: .*b1"):
        Distiller(s, t, {"features": [{"student": "b3", "teacher": "b1"}]}, example_inputs=x)
    kd = Distiller(s, t, {"logits": {"method": "kd"}})
    with pytest.raises(ConfigError, match="head_extractor"):
        kd(x, student_output=torch.zeros(2, 3))
    assert isinstance(kd.head_extractor({"cls": torch.zeros(1, 2, 3)}), DenseOutputs)
