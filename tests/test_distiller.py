"""Distiller on two tiny framework-free CNN "detectors" with different channels and strides.

Student: backbone.b1 stride 1 (4 ch, 32x32), backbone.b2 stride 4 (8 ch, 8x8).
Teacher: backbone.b1 stride 2 (8 ch, 16x16), backbone.b2 stride 2 (16 ch, 8x8).
Both heads see 8x8 = 64 anchors with K classes and R DFL bins, so dense signals line up.
Expected values are recomputed by hand (adapter conv + batch norm written out, bilinear resize, the loss
functions called directly) on tensors taken from the models themselves.
"""

from __future__ import annotations

import copy
import math
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from detkd.config import BoxConfig, FeatureTapConfig, LogitConfig
from detkd.distiller import DenseOutputs, Distiller
from detkd.errors import ConfigError
from detkd.losses import at_loss, box_kd_loss, cwd_loss, fitnet_loss, kd_loss, ld_loss, sigmoid_kd_loss
from helpers import DenseHead

K, R, IMG = 3, 8, 32


class Backbone(nn.Module):
    def __init__(self, c: int, s1: int, s2: int):
        super().__init__()
        self.b1 = nn.Conv2d(3, c, 3, s1, 1)
        self.b2 = nn.Conv2d(c, 2 * c, 3, s2, 1)
        self.bn = nn.BatchNorm2d(2 * c)

    def forward(self, x):
        f1 = self.b1(x)
        return f1, self.bn(self.b2(f1.relu())).relu()


def Head(c: int, stride: int = 4) -> nn.Module:
    return DenseHead(c, K, R, stride)


class TinyDet(nn.Module):
    def __init__(self, c: int, s1: int, s2: int):
        super().__init__()
        self.backbone = Backbone(c, s1, s2)
        self.head = Head(2 * c)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        self.grad_enabled = torch.is_grad_enabled()
        return self.head(self.backbone(x)[1])


class TupleDet(TinyDet):
    """Returns (head output, features): the model output is not the head output."""

    def forward(self, x):
        f1, f2 = self.backbone(x)
        return self.head(f2), [f1, f2]


def student_model(cls=TinyDet):
    return cls(4, 1, 4)


def teacher_model(cls=TinyDet):
    return cls(8, 2, 2)


CFG = {
    "logits": {"method": "sigmoid_kd", "weight": 2.0},
    "boxes": {"method": "ld", "weight": 0.5, "temperature": 10.0},
    "features": [
        {"student": "backbone.b1", "teacher": "backbone.b1", "method": "cwd", "weight": 3.0, "options": {"tau": 2.0}},
        {"student": "backbone.b2", "teacher": "backbone.b2", "method": "fitnet", "weight": 1.5},
    ],
}


@pytest.fixture()
def pair():
    torch.manual_seed(0)
    return student_model(), teacher_model(), torch.randn(2, 3, IMG, IMG)


def n_hooks(*models) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for model in models for m in model.modules())


def conv_bn_by_hand(adapter: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """The adapter in training mode, written out: 1x1 conv, then batch-statistics batch norm."""
    conv, bn = adapter[0], adapter[1]
    y = torch.einsum("oc,nchw->nohw", conv.weight[:, :, 0, 0], x)
    if conv.bias is not None:
        y = y + conv.bias.view(1, -1, 1, 1)
    mean = y.mean(dim=(0, 2, 3), keepdim=True)
    var = y.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
    return (y - mean) / torch.sqrt(var + bn.eps) * bn.weight.view(1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1)


def test_adapters_parameters_state_and_frozen_teacher(pair):
    s, t, x = pair
    keys_before = {k: v.clone() for k, v in s.state_dict().items()}
    t.train()
    kd = Distiller(s, t, CFG, example_inputs=x)
    # 1x1 conv + BN for the channel mismatch (4 -> 8 at b1, 8 -> 16 at b2); no bias in front of BN
    a0, a1 = kd.adapters["0"], kd.adapters["1"]
    assert [type(m) for m in a0] == [nn.Conv2d, nn.BatchNorm2d] and a0[0].weight.shape == (8, 4, 1, 1)
    assert a0[0].bias is None and a0[1].num_features == 8
    assert a1[0].weight.shape == (16, 8, 1, 1) and a1[1].num_features == 16
    # parameters: the adapters, nothing of the student or the teacher
    ids = {id(p) for p in kd.parameters()}
    assert ids == {id(p) for p in kd.adapters.parameters()} and len(ids) == 6
    assert not ids & {id(p) for p in s.parameters()} and not ids & {id(p) for p in t.parameters()}
    assert all(k.startswith(("adapters.", "feature_losses.")) for k in kd.state_dict())
    assert not any(m is s or m is t for m in kd.modules())
    # the probe ran in eval mode: the student's state (incl. BN running stats) is unchanged, mode restored
    after = s.state_dict()
    assert set(after) == set(keys_before) and all(torch.equal(after[k], v) for k, v in keys_before.items())
    assert s.training and s.calls == 1 and t.calls == 1 and kd.teacher_forwards == 0
    t.train()  # someone flips the teacher to train mode; any train()/eval() on the Distiller (or a parent) undoes it
    nn.Sequential(kd).train()
    assert not t.training and all(not m.training for m in t.modules()) and kd.training
    assert all(not p.requires_grad for p in t.parameters()) and all(p.requires_grad for p in s.parameters())
    assert n_hooks(s, t) == 0
    # a student in eval mode stays in eval mode
    s2 = student_model().eval()
    Distiller(s2, t, CFG, example_inputs=x)
    assert not s2.training
    # replacing the teacher keeps it unregistered and frozen
    t2 = teacher_model().train()
    kd.teacher = t2
    assert kd.teacher is t2 and "teacher" not in kd._modules and not t2.training
    assert all(not p.requires_grad for p in t2.parameters())


def test_terms_equal_independent_weighted_sum(pair):
    s, t, x = pair
    kd = Distiller(s, t, CFG, example_inputs=x)
    with kd.record():
        out = s(x)
    assert n_hooks(s, t) == 0
    terms = kd(x)  # student head = recorded model output; teacher runs here
    assert t.calls == 2 and t.grad_enabled is False and s.grad_enabled is True  # teacher under no_grad
    assert set(terms) == {"kd_cls", "kd_box", "kd_feat", "kd_total"}
    assert all(v.dtype == torch.float32 and v.dim() == 0 for v in terms.values())

    with torch.no_grad():  # independent recomputation on the same tensors
        t_out = t(x)
        t1 = t.backbone.b1(x)
        t2 = t.backbone.b2(t1.relu())
        s1 = s.backbone.b1(x)
        s2 = s.backbone.b2(s1.relu())
        exp_cls = 2.0 * sigmoid_kd_loss(out["cls"], t_out["cls"])
        w = t_out["cls"].sigmoid().amax(-1)  # teacher confidence per anchor, for each of the 4 sides
        w4 = w.unsqueeze(-1).expand(-1, -1, 4).reshape(-1)
        exp_box = 0.5 * ld_loss(out["box_dist"].reshape(-1, R), t_out["box_dist"].reshape(-1, R), 10.0,
                                weight=w4, avg_factor=w4.sum())
        a1 = F.interpolate(conv_bn_by_hand(kd.adapters["0"], s1), size=(16, 16), mode="bilinear", align_corners=False)
        exp_f1 = 3.0 * cwd_loss(a1, t1, tau=2.0)
        exp_f2 = 1.5 * fitnet_loss(conv_bn_by_hand(kd.adapters["1"], s2), t2)
    assert a1.shape == t1.shape == (2, 8, 16, 16)
    torch.testing.assert_close(terms["kd_cls"].detach(), exp_cls, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(terms["kd_box"].detach(), exp_box, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(kd.last_terms["kd_feat/backbone.b1"], exp_f1, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(kd.last_terms["kd_feat/backbone.b2"], exp_f2, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(terms["kd_feat"].detach(), exp_f1 + exp_f2, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(terms["kd_total"].detach(), exp_cls + exp_box + exp_f1 + exp_f2, rtol=1e-4, atol=1e-6)
    assert set(kd.last_terms) == {"kd_cls", "kd_box", "kd_feat/backbone.b1", "kd_feat/backbone.b2"}
    # captured tensors are dropped after forward
    assert not kd.student_taps.out and not kd.teacher_runner.taps.out and not kd.teacher_runner.ran
    # gradients reach the student and the adapters, never the teacher
    terms["kd_total"].backward()
    assert all(p.grad is None for p in t.parameters())
    assert s.backbone.b1.weight.grad is not None and s.head.cls.weight.grad is not None
    assert s.head.box.weight.grad is not None and kd.adapters["0"][0].weight.grad is not None


def test_head_tapped_by_module_name_and_tuple_selection():
    torch.manual_seed(1)
    s, t, x = student_model(TupleDet), teacher_model(TupleDet), torch.randn(2, 3, IMG, IMG)
    cfg = {"logits": {"method": "kd", "temperature": 2.0}, "boxes": {"method": "l1_giou"},
           "features": [{"student": "backbone:1", "teacher": "backbone:1", "method": "at"}]}
    kd = Distiller(s, t, cfg, example_inputs=x, head="head")
    assert isinstance(kd.adapters["0"], nn.Identity)  # attention maps need no channel adapter
    with kd.record():
        out, feats = s(x)
    terms = kd(x)
    with torch.no_grad():
        t_out, t_feats = t(x)
        # no weights given: the defaults of detkd.config (their one home)
        exp_cls = LogitConfig.weight * kd_loss(out["cls"].transpose(1, 2), t_out["cls"].transpose(1, 2), 2.0)
        exp_box = BoxConfig.weight * box_kd_loss(out["boxes"], t_out["boxes"], t_out["cls"].sigmoid().amax(-1))
        exp_feat = FeatureTapConfig.weight * at_loss(feats[1], t_feats[1])  # both 8x8: no resize
    torch.testing.assert_close(terms["kd_cls"].detach(), exp_cls)
    torch.testing.assert_close(terms["kd_box"].detach(), exp_box)
    torch.testing.assert_close(terms["kd_feat"].detach(), exp_feat)
    # the same numbers when the outputs are handed over explicitly
    with kd.record():
        out, _ = s(x)
    again = kd(x, student_output=out)
    torch.testing.assert_close(again["kd_total"], terms["kd_total"])
    # without `head`, the model output (a tuple) is not a dense output: clear error
    kd2 = Distiller(s, t, {"logits": "kd"})
    with kd2.record():
        s(x)
    with pytest.raises(ConfigError, match="head_extractor"):
        kd2(x)
    # a tuple-output module must be tapped with an index
    with pytest.raises(ConfigError, match=r"module output is a tuple.*'backbone:0'"):
        Distiller(s, t, {"features": [{"student": "backbone", "teacher": "backbone:1"}]}, example_inputs=x)


def test_mgd_and_fgd_align_channels_themselves_and_fgd_needs_boxes(pair):
    s, t, x = pair
    cfg = {"features": [{"student": "backbone.b1", "teacher": "backbone.b1", "method": "mgd"},
                        {"student": "backbone.b2", "teacher": "backbone.b2", "method": "fgd"}]}
    kd = Distiller(s, t, cfg, example_inputs=x)
    assert isinstance(kd.adapters["0"], nn.Identity) and isinstance(kd.adapters["1"], nn.Identity)
    ids = {id(p) for p in kd.parameters()}
    assert ids == {id(p) for p in kd.feature_losses.parameters()} and ids
    mgd = kd.feature_losses["0"].loss
    assert (mgd.student_channels, mgd.teacher_channels) == (4, 8)
    with kd.record():
        s(x)
    with pytest.raises(ConfigError, match=r"features\[1\] \(fgd on 'backbone.b2'\) needs the batch's ground-truth"):
        kd(x)
    boxes = torch.tensor([[[2.0, 3.0, 20.0, 25.0], [0.0, 0.0, 0.0, 0.0]], [[5.0, 5.0, 30.0, 12.0], [1, 1, 9, 9]]])
    valid = torch.tensor([[True, False], [True, True]])
    with kd.record():
        s(x)
    torch.manual_seed(5)  # MGD draws a random mask
    terms = kd(x, gt_boxes=boxes, gt_valid=valid)  # img_shape taken from x
    with torch.no_grad():
        s2, t2 = s.backbone.b2(s.backbone.b1(x).relu()), t.backbone.b2(t.backbone.b1(x).relu())
        exp_fgd = kd.feature_losses["1"].loss(s2, t2, boxes, (IMG, IMG), gt_valid=valid)
    torch.testing.assert_close(kd.last_terms["kd_feat/backbone.b2"], FeatureTapConfig.weight * exp_fgd, rtol=1e-4,
                               atol=1e-7)
    assert float(kd.last_terms["kd_feat/backbone.b1"]) > 0 and float(exp_fgd) > 0
    torch.testing.assert_close(terms["kd_feat"].detach(),
                               kd.last_terms["kd_feat/backbone.b1"] + FeatureTapConfig.weight * exp_fgd)


def test_schedules_and_temperature_schedule_in_terms(pair):
    s, t, x = pair
    cfg = {"logits": {"method": "kd", "weight": 2.0, "schedule": "cosine",
                      "temperature_schedule": {"kind": "linear", "start": 4.0, "end": 2.0}},
           "boxes": {"method": "l1_giou", "weight": 0.5, "schedule": {"kind": "constant", "warmup_epochs": 2}}}
    kd = Distiller(s, t, cfg)
    with torch.no_grad():
        out, t_out = s(x), t(x)
    for epoch, total in ((0, 10), (1, 10), (5, 10), (7.5, 10)):
        terms = kd(x, student_output=out, epoch=epoch, total_epochs=total)
        temp = 4.0 + (2.0 - 4.0) * epoch / total
        cos_mult = ((1 - math.cos(epoch * math.pi / total)) / 2) * (0.01 - 1) + 1
        exp_cls = 2.0 * cos_mult * kd_loss(out["cls"].transpose(1, 2), t_out["cls"].transpose(1, 2), temperature=temp)
        warm = min(epoch / 2, 1.0)
        exp_box = 0.5 * warm * box_kd_loss(out["boxes"], t_out["boxes"], t_out["cls"].sigmoid().amax(-1))
        assert kd.temperature() == pytest.approx(temp)
        assert kd.multipliers() == pytest.approx({"kd_cls": 2.0 * cos_mult, "kd_box": 0.5 * warm})
        torch.testing.assert_close(terms["kd_cls"], exp_cls.float(), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(terms["kd_box"], exp_box.float(), rtol=1e-5, atol=1e-7)
        if epoch == 0:
            assert float(terms["kd_box"]) == 0.0  # warm-up starts at 0 (term not even computed)


def test_stop_epoch_gives_exact_zeros_and_skips_teacher(pair):
    s, t, x = pair
    cfg = {**CFG, "stop_epoch": 5,
           "logits": {"method": "sigmoid_kd", "weight": 1.0, "schedule": {"kind": "constant", "stop_epoch": 2}}}
    kd = Distiller(s, t, cfg, example_inputs=x)
    calls = t.calls
    kd.set_progress(1, 10)
    with kd.record():
        s(x)
    assert float(kd(x)["kd_cls"].detach()) > 0 and t.calls == calls + 1 and kd.teacher_forwards == 1
    # epoch 3: the logit term's own schedule stopped at 2 -> exact zero; others go on, teacher runs
    with kd.record():
        s(x)
    terms = kd(x, epoch=3)
    assert float(terms["kd_cls"]) == 0.0 and float(terms["kd_feat"].detach()) > 0 and t.calls == calls + 2
    torch.testing.assert_close(terms["kd_total"], terms["kd_box"] + terms["kd_feat"])
    # from stop_epoch on: every term exactly 0, float32 0-dim, and no teacher forward
    for epoch in (5, 5.5, 9):
        with kd.record():
            s(x)
        terms = kd(x, epoch=epoch)
        assert set(terms) == {"kd_cls", "kd_box", "kd_feat", "kd_total"}
        assert all(v.dtype == torch.float32 and v.dim() == 0 and float(v) == 0.0 for v in terms.values())
    assert t.calls == calls + 2 and kd.teacher_forwards == 2
    assert kd.stopped and all(v == 0.0 for v in kd.multipliers().values())


def test_teacher_forward_called_explicitly_is_not_repeated(pair):
    s, t, x = pair
    kd = Distiller(s, t, CFG, example_inputs=x)
    n = t.calls
    with kd.record():
        s(x)
    kd.teacher_forward(x)
    a = kd(x)["kd_total"]
    assert t.calls == n + 1
    with kd.record():
        s(x)
    b = kd(x)["kd_total"]  # now the Distiller runs it
    assert t.calls == n + 2
    torch.testing.assert_close(a, b)
    with pytest.raises(ConfigError, match="needs the batch inputs"):
        with kd.record():
            s(x)
        kd()


def test_no_hooks_after_record_and_clean_student_copies(pair):
    s, t, x = pair
    kd = Distiller(s, t, CFG, example_inputs=x)
    with pytest.raises(RuntimeError, match="boom"):
        with kd.record():
            assert n_hooks(s) == 3  # backbone.b1, backbone.b2 and the model output
            raise RuntimeError("boom")
    assert n_hooks(s, t) == 0
    with kd.record():
        s(x)
        inside = copy.deepcopy(s)  # e.g. Ultralytics' EMA copy taken mid-step
    kd(x)
    assert n_hooks(s, t) == 0
    assert b"detkd" not in pickle.dumps(s) and b"detkd" not in pickle.dumps(t)
    # a copy taken while recording gets inert hooks: no captured tensors, records nothing into the Distiller
    assert n_hooks(inside) == 3 and b"Distiller" not in pickle.dumps(inside)
    with kd.record():
        inside(x)
        pickle.loads(pickle.dumps(inside))(x)
        assert not kd.student_taps.out


def test_record_other_model_ema_copy_and_data_parallel(pair):
    s, t, x = pair
    kd = Distiller(s, t, CFG, example_inputs=x)
    ema = copy.deepcopy(s)
    with torch.no_grad():
        for p in ema.parameters():
            p.mul_(0.5)
    kd.eval()
    with kd.record(ema):
        ema(x)
    via_ema = kd(x)["kd_total"]
    with kd.record():
        s(x)
    via_student = kd(x)["kd_total"]
    assert float(via_ema.detach()) != pytest.approx(float(via_student.detach()))
    wrapped = nn.DataParallel(ema)  # names need no 'module.' prefix
    with kd.record(wrapped):
        wrapped(x)
    torch.testing.assert_close(kd(x)["kd_total"], via_ema)
    assert n_hooks(ema, s, t) == 0


def test_deepcopy_and_pickle_give_the_same_losses(pair):
    s, t, x = pair
    kd = Distiller(s, t, CFG, example_inputs=x).eval()
    with kd.record():
        s(x)
    ref = {k: float(v.detach()) for k, v in kd(x).items()}
    cp = copy.deepcopy(kd)
    assert cp.teacher is kd.teacher  # the frozen teacher is shared, not duplicated
    assert cp.student is not kd.student and cp.adapters["0"][0].weight is not kd.adapters["0"][0].weight
    pk = pickle.loads(pickle.dumps(kd))
    assert pk.teacher is not kd.teacher and not pk.teacher.training
    for other in (cp, pk):
        assert set(other.state_dict()) == set(kd.state_dict())
        with other.record():
            other.student(x)
        got = {k: float(v.detach()) for k, v in other(x).items()}
        assert got == pytest.approx(ref, rel=1e-6)
        assert n_hooks(other.student, other.teacher) == 0
    # a Distiller copied between record() and forward() starts clean
    with kd.record():
        s(x)
    assert kd.student_taps.out and not copy.deepcopy(kd).student_taps.out
    assert not pickle.loads(pickle.dumps(kd)).student_taps.out
    kd(x)


def test_sgd_step_decreases_kd_loss(pair):
    s, t, x = pair
    kd = Distiller(s, t, CFG, example_inputs=x)
    opt = torch.optim.SGD(list(s.parameters()) + list(kd.parameters()), lr=0.05)
    s.eval()  # fixed BN statistics, so the same batch gives comparable numbers

    def step():
        with kd.record():
            s(x)
        return kd(x)["kd_total"]

    first = step()
    first.backward()
    opt.step()
    assert float(step().detach()) < float(first.detach())


def test_bad_names_and_inputs(pair):
    s, t, x = pair
    with pytest.raises(ConfigError, match=r"student has no module named 'backbone.b3'; close names: .*backbone.b1"):
        Distiller(s, t, {"features": [{"student": "backbone.b3", "teacher": "backbone.b1"}]}, example_inputs=x)
    with pytest.raises(ConfigError, match="teacher has no module named 'neck'"):
        Distiller(s, t, {"features": [{"student": "backbone.b1", "teacher": "neck"}]}, example_inputs=x)
    with pytest.raises(ConfigError, match="teacher has no module named 'heads'; close names: head"):
        Distiller(s, t, {"logits": "kd"}, head="head", teacher_head="heads")
    with pytest.raises(ConfigError, match="example_inputs"):
        Distiller(s, t, CFG)
    with pytest.raises(ConfigError, match=r"adapter 'none' but the student 'backbone.b1' has 4 channels"):
        Distiller(s, t, {"features": [{"student": "backbone.b1", "teacher": "backbone.b1", "adapter": "none"}]},
                  example_inputs=x)
    with pytest.raises(ConfigError, match=r"taps must give \(N, C, H, W\) maps"):
        Distiller(s, t, {"features": [{"student": "head:cls", "teacher": "head:cls"}]}, example_inputs=x)
    kd = Distiller(s, t, {"logits": {"method": "kd"}})
    with pytest.raises(ConfigError, match="head_extractor"):
        kd(x, student_output=torch.zeros(2, 3))
    with pytest.raises(ConfigError, match="found no student head output"):
        kd(x)
    kd = Distiller(s, t, {"features": [{"student": "backbone.b2", "teacher": "backbone.b2"}]}, example_inputs=x)
    with pytest.raises(ConfigError, match="recorded nothing"):
        kd(x)
    assert isinstance(kd.head_extractor({"cls": torch.zeros(1, 2, 3)}), DenseOutputs)


def test_yaml_path_and_adapter_kinds(pair, tmp_path):
    s, t, x = pair
    p = tmp_path / "kd.yaml"
    p.write_text("distill:\n  features:\n"
                 "    - {student: backbone.b2, teacher: backbone.b2, method: pkd, adapter: conv}\n"
                 "    - {student: backbone.b2, teacher: backbone.b2:0, method: cwd}\n")
    with pytest.raises(ConfigError, match=r"tap 'backbone.b2:0': the module output is a Tensor.*drop ':0'"):
        Distiller(s, t, str(p), example_inputs=x)
    p.write_text("features:\n  - {student: 'backbone:2', teacher: 'backbone:1'}\n")
    with pytest.raises(ConfigError, match=r"tap 'backbone:2': cannot take element '2' of a tuple"):
        Distiller(s, t, str(p), example_inputs=x)
    p.write_text("features:\n  - {student: backbone.b2, teacher: backbone.b2, method: pkd, adapter: conv}\n"
                 "  - {student: 'backbone:1', teacher: backbone.bn, method: at, adapter: conv_bn}\n")
    kd = Distiller(s, t, p, example_inputs=x)
    conv = kd.adapters["0"]
    assert len(conv) == 1 and conv[0].bias is not None and conv[0].weight.shape == (16, 8, 1, 1)
    assert [type(m) for m in kd.adapters["1"]] == [nn.Conv2d, nn.BatchNorm2d]  # forced even for 'at'
    with kd.record():
        s(x)
    terms = kd(x)
    assert set(terms) == {"kd_feat", "kd_total"} and float(terms["kd_total"].detach()) > 0


def test_autocast_inputs_give_float32_terms(pair):
    s, t, x = pair
    kd = Distiller(s, t, CFG, example_inputs=x).eval()
    s.eval()
    with kd.record():
        s(x)
    ref = kd(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with kd.record():
            out = s(x)
        assert out["cls"].dtype == torch.bfloat16  # the models really ran in bfloat16
        terms = kd(x)
    assert all(v.dtype == torch.float32 for v in terms.values())
    for k in ref:
        assert float(terms[k].detach()) == pytest.approx(float(ref[k].detach()), rel=0.1)


def l1_feature_loss(s: torch.Tensor, t: torch.Tensor, *, scale: float = 1.0) -> torch.Tensor:
    return scale * (s - t).abs().mean()


class ScaledL1(nn.Module):
    """A learnable method: its own 1x1 conv from the student's channels to the teacher's."""

    def __init__(self, student_channels: int, teacher_channels: int, *, scale: float = 1.0):
        super().__init__()
        self.align, self.scale = nn.Conv2d(student_channels, teacher_channels, 1), scale

    def forward(self, s, t, **ctx):
        return self.scale * (self.align(s) - t).abs().mean()


def test_a_new_feature_method_is_one_decorated_loss(pair):
    from detkd.losses.registry import FEATURE_METHODS, register_feature_method

    s, t, x = pair
    try:
        register_feature_method("test_l1")(l1_feature_loss)
        register_feature_method("test_l1_conv", learnable=True, aligns_channels=True)(ScaledL1)
        with pytest.raises(ValueError, match="already registered"):
            register_feature_method("test_l1")(l1_feature_loss)
        with pytest.raises(ConfigError, match=r"options\.scal: unknown option for method 'test_l1'; did you mean"):
            Distiller(s, t, {"features": [{"student": "backbone.b2", "teacher": "backbone.b2", "method": "test_l1",
                                           "options": {"scal": 2}}]}, example_inputs=x)
        kd = Distiller(s, t, {"features": [
            {"student": "backbone.b2", "teacher": "backbone.b2", "method": "test_l1", "options": {"scale": 2.0},
             "adapter": "conv"},
            {"student": "backbone.b2", "teacher": "backbone.b2", "method": "test_l1_conv"}]}, example_inputs=x)
        assert isinstance(kd.adapters["1"], nn.Identity) and len(list(kd.feature_losses["1"].parameters())) == 2
        with kd.record():
            s(x)
        terms = kd(x)
        with torch.no_grad():
            s2, t2 = s.backbone.b2(s.backbone.b1(x).relu()), t.backbone.b2(t.backbone.b1(x).relu())
            exp0 = l1_feature_loss(kd.adapters["0"](s2), t2, scale=2.0)
            exp1 = kd.feature_losses["1"](s2, t2)
        torch.testing.assert_close(terms["kd_feat"].detach(), FeatureTapConfig.weight * (exp0 + exp1))
        assert b"l1_feature_loss" in pickle.dumps(kd)  # by reference: picklable for DDP
    finally:
        FEATURE_METHODS.pop("test_l1", None)
        FEATURE_METHODS.pop("test_l1_conv", None)
