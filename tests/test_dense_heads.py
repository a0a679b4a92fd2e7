"""The dense-head contract beyond YOLO, through the Distiller.

An anchor-based head in the style of SSD / Faster R-CNN's box head: per location two anchors, classes as one softmax
over K foreground classes plus a background column (index 0), boxes as deltas against the anchors. The head returns
its raw conv maps; the "integration" (a picklable extractor object, as a torchvision integration would write it)
transposes them to anchors first, decodes the deltas with torchvision's ``BoxCoder`` and says the classes are a
softmax with a background column. Expected values are computed here from the raw maps, by hand.
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

from detkd.config import FeatureTapConfig
from detkd.distiller import DenseOutputs, Distiller
from detkd.errors import ConfigError
from detkd.losses import box_kd_loss, fitnet_loss, kd_loss
from detkd.losses.registry import teacher_score

K, APL, IMG, STRIDE = 3, 2, 32, 4  # foreground classes, anchors per location, image size, head stride
GRID = IMG // STRIDE


def anchors_xyxy() -> torch.Tensor:
    """``(GRID * GRID * APL, 4)``: per location (row-major), a small and a wide anchor centred on it."""
    ys, xs = torch.meshgrid(torch.arange(GRID), torch.arange(GRID), indexing="ij")
    c = (torch.stack((xs, ys), -1).reshape(-1, 1, 2).float() + 0.5) * STRIDE  # (L, 1, 2)
    half = torch.tensor([[3.0, 3.0], [6.0, 3.0]])  # (APL, 2)
    return torch.cat((c - half, c + half), -1).reshape(-1, 4)


class AnchorHead(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.cls = nn.Conv2d(c, APL * (K + 1), 1)
        self.reg = nn.Conv2d(c, APL * 4, 1)

    def forward(self, f):
        return self.cls(f), 0.1 * self.reg(f)  # framework layout: (N, APL * (K + 1), H, W), (N, APL * 4, H, W)


class Det(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, c, 3, 2, 1), nn.ReLU(), nn.Conv2d(c, c, 3, 2, 1))
        self.head = AnchorHead(c)

    def forward(self, x):
        return self.head(self.backbone(x).relu())


class DeltaHead:
    """The integration's extractor: raw maps -> anchors-first DenseOutputs, deltas decoded, softmax + background."""

    def __init__(self, anchors: torch.Tensor):
        self.anchors = anchors

    def __call__(self, out) -> DenseOutputs:
        from torchvision.models.detection._utils import BoxCoder

        logits, deltas = out
        n = logits.shape[0]
        cls = logits.permute(0, 2, 3, 1).reshape(n, -1, K + 1)
        d = deltas.permute(0, 2, 3, 1).reshape(n, -1, 4)
        a = self.anchors.to(d).expand(n, -1, -1).reshape(-1, 4)
        boxes = BoxCoder((1.0, 1.0, 1.0, 1.0)).decode_single(d.reshape(-1, 4), a).reshape(n, -1, 4)
        return DenseOutputs(cls=cls, boxes=boxes, cls_activation="softmax", background=0)


def by_hand(out):
    """Anchors-first logits and decoded boxes, written out (centre / size deltas, exp for the sizes)."""
    logits, deltas = out
    n = logits.shape[0]
    cls = logits.permute(0, 2, 3, 1).reshape(n, -1, K + 1)
    d = deltas.permute(0, 2, 3, 1).reshape(n, -1, 4)
    a = anchors_xyxy()
    wa, ha = a[:, 2] - a[:, 0], a[:, 3] - a[:, 1]
    cx, cy = a[:, 0] + 0.5 * wa + d[..., 0] * wa, a[:, 1] + 0.5 * ha + d[..., 1] * ha
    w, h = wa * d[..., 2].exp(), ha * d[..., 3].exp()
    return cls, torch.stack((cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2), -1)


CFG = {"logits": {"method": "kd", "weight": 1.0, "temperature": 2.0},
       "boxes": {"method": "l1_giou", "weight": 0.5},
       "features": [{"student": "backbone.2", "teacher": "backbone.2", "method": "fitnet", "adapter": "conv"}]}


@pytest.fixture()
def models():
    torch.manual_seed(0)
    return Det(4), Det(8), torch.randn(2, 3, IMG, IMG)


def distiller(s, t, x, cfg=CFG) -> Distiller:
    return Distiller(s, t, cfg, example_inputs=x, head="head", head_extractor=DeltaHead(anchors_xyxy()))


def test_anchor_head_with_softmax_classes_and_decoded_deltas(models):
    s, t, x = models
    kd = distiller(s, t, x)
    with kd.record():
        s(x)
    terms = kd(x)
    with torch.no_grad():
        s_cls, s_boxes = by_hand(s.head(s.backbone(x).relu()))
        t_cls, t_boxes = by_hand(t.head(t.backbone(x).relu()))
        conf = t_cls.softmax(-1)[..., 1:].amax(-1)  # teacher confidence: best foreground class, background excluded
        exp_cls = kd_loss(s_cls.transpose(1, 2), t_cls.transpose(1, 2), temperature=2.0)  # over all K + 1 columns
        exp_box = 0.5 * box_kd_loss(s_boxes, t_boxes, conf)
        f_s = kd.adapters["0"](s.backbone(x))
        exp_feat = FeatureTapConfig.weight * fitnet_loss(f_s, t.backbone(x))
    assert not torch.allclose(conf, t_cls.sigmoid().amax(-1))  # not YOLO's max class sigmoid
    torch.testing.assert_close(terms["kd_cls"].detach(), exp_cls, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(terms["kd_box"].detach(), exp_box, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(terms["kd_feat"].detach(), exp_feat, rtol=1e-5, atol=1e-6)
    terms["kd_total"].backward()
    assert s.head.reg.weight.grad is not None and s.head.cls.weight.grad is not None
    assert all(p.grad is None for p in t.parameters())
    # the teacher's dense outputs of a step, as an integration reads them (e.g. for pseudo boxes)
    kd.teacher_forward(x)
    dense = kd.teacher_dense()
    assert dense.cls_activation == "softmax" and dense.background == 0
    torch.testing.assert_close(dense.anchor_confidence(), conf)
    torch.testing.assert_close(teacher_score(dense), conf)
    kd.reset_step()
    assert kd.teacher_dense() is None
    # copies and pickles keep the extractor and give the same terms
    for other in (copy.deepcopy(kd), pickle.loads(pickle.dumps(kd))):
        with other.record():
            other.student(x)
        torch.testing.assert_close(other(x)["kd_total"], terms["kd_total"])


def test_sigmoid_kd_is_refused_for_a_softmax_head(models):
    s, t, x = models
    kd = distiller(s, t, x, {"logits": "sigmoid_kd"})
    with kd.record():
        s(x)
    with pytest.raises(ConfigError, match=r"sigmoid_kd .*softmax.*use method kd"):
        kd(x)


@pytest.mark.parametrize("where", ["memory", "dir"])
def test_teacher_cache_keeps_the_softmax_head_s_confidence(models, tmp_path, where):
    s, t, x = models
    rt = {"cache": "memory" if where == "memory" else str(tmp_path / "cache")}
    kd = distiller(s, t, x, {**CFG, "teacher_runtime": rt})
    keys = ["a", "b"]

    def step(d):
        with d.record():
            s(x)
        return {k: float(v.detach()) for k, v in d(x, teacher_keys=keys).items()}

    first = step(kd)
    assert kd.cache_misses == 2 and kd.teacher_cache.get("a")["meta"] == {"cls_activation": "softmax", "background": 0}
    again = step(kd)
    assert kd.cache_hits == 2 and kd.teacher_forwards == 1 and again == pytest.approx(first, rel=1e-6)
    if where == "dir":  # another run reads the entries back: no live teacher output to learn the activation from
        kd2 = distiller(s, copy.deepcopy(t), x, {**CFG, "teacher_runtime": rt})
        kd2.load_state_dict(kd.state_dict())
        assert step(kd2) == pytest.approx(first, rel=1e-6) and kd2.teacher_forwards == 0


def test_head_supplied_confidence_and_scores():
    """FCOS-style: the head says how confident it is (centerness folded in); that weights the box terms."""
    torch.manual_seed(1)
    cls, ctr = torch.randn(2, 5, 3), torch.randn(2, 5)
    conf = (cls.sigmoid().amax(-1) * ctr.sigmoid()).sqrt()
    d = DenseOutputs(cls=cls, confidence=conf)
    torch.testing.assert_close(teacher_score(d), conf)
    scores = cls.sigmoid() * 0.5
    torch.testing.assert_close(DenseOutputs(cls=cls, scores=scores).anchor_confidence(), scores.amax(-1))
    torch.testing.assert_close(DenseOutputs(cls=cls).anchor_confidence(), cls.sigmoid().amax(-1))  # YOLO default
    soft = DenseOutputs(cls=cls, cls_activation="softmax")  # no background column: every column is a class
    torch.testing.assert_close(soft.anchor_confidence(), cls.softmax(-1).amax(-1))
    boxes = torch.rand(2, 5, 4) * 10
    boxes[..., 2:] += boxes[..., :2] + 1
    s = {"cls": cls + 0.3, "boxes": boxes + 0.5}
    t = {"cls": cls, "boxes": boxes, "confidence": conf}
    kd = Distiller(nn.Identity(), nn.Identity(), {"boxes": {"method": "l1_giou", "weight": 1.0}})
    got = kd(student_output=s, teacher_output=t)["kd_box"]
    torch.testing.assert_close(got, box_kd_loss(s["boxes"], boxes, conf))
    with pytest.raises(ConfigError, match="cls_activation"):
        DenseOutputs(cls=cls, cls_activation="softmx")
    with pytest.raises(ConfigError, match="background column belongs to a softmax head"):
        DenseOutputs(cls=cls, background=0)
    with pytest.raises(ConfigError, match=r"confidence: shape \(2,\), expected \(N, A\)"):
        DenseOutputs(cls=cls, confidence=conf[:, 0]).anchor_confidence()
