"""Method names -> losses: the one place the Distiller (and config validation) looks names up.

Each entry is a `Method`: ``build(student_channels, teacher_channels, **options)`` returns a callable
``loss(s, t, **ctx)``; ``learnable`` methods return an ``nn.Module`` whose parameters go to the optimizer;
``aligns_channels`` methods take student and teacher channel counts themselves (no adapter conv needed);
``needs_gt`` methods need the batch's ground-truth boxes (``ctx``: ``gt_boxes``, ``gt_valid``, ``img_shape``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

from torch import nn


@dataclass(frozen=True)
class Method:
    name: str
    build: Callable
    learnable: bool = False
    aligns_channels: bool = False
    needs_gt: bool = False
    channel_free: bool = False  # works whatever the two channel counts (e.g. attention maps)


class _Fn(nn.Module):
    """A stateless loss function with bound options, as a (parameter-free, picklable) module."""

    def __init__(self, fn_name: str, **options):
        super().__init__()
        self.fn_name = fn_name
        self.options = options

    def forward(self, s, t, **ctx):
        from detkd.losses import features

        return getattr(features, self.fn_name)(s, t, **self.options)


def _fn(name: str, sc: int, tc: int, **options) -> nn.Module:
    return _Fn(name, **options)


class _FGD(nn.Module):
    def __init__(self, sc: int, tc: int, **options):
        super().__init__()
        from detkd.losses.fgd import FGDLoss

        self.loss = FGDLoss(sc, tc, **options)

    def forward(self, s, t, gt_boxes=None, gt_valid=None, img_shape=None, **ctx):
        if gt_boxes is None or img_shape is None:
            raise ValueError("fgd needs the batch's gt boxes (xyxy pixels) and the input image size: "
                             "pass gt_boxes=, gt_valid= and img_shape= to the Distiller")
        return self.loss(s, t, gt_boxes, img_shape, gt_valid=gt_valid)


class _MGD(nn.Module):
    def __init__(self, sc: int, tc: int, **options):
        super().__init__()
        from detkd.losses.mgd import MGDLoss

        self.loss = MGDLoss(sc, tc, **options)

    def forward(self, s, t, **ctx):
        return self.loss(s, t)


FEATURE_METHODS: dict[str, Method] = {
    "fitnet": Method("fitnet", functools.partial(_fn, "fitnet_loss")),
    "cwd": Method("cwd", functools.partial(_fn, "cwd_loss")),
    "pkd": Method("pkd", functools.partial(_fn, "pkd_loss")),
    "at": Method("at", functools.partial(_fn, "at_loss"), channel_free=True),
    "mgd": Method("mgd", _MGD, learnable=True, aligns_channels=True),
    "fgd": Method("fgd", _FGD, learnable=True, aligns_channels=True, needs_gt=True),
}

# Dense-head signals. The Distiller calls these with anchors-first tensors; see its `_logit_term`/`_box_term`.
LOGIT_METHODS: dict[str, str] = {
    "sigmoid_kd": "per-class sigmoid/BCE (QFL-weighted) on (N, A, K) logits — dense detectors",
    "kd": "softmax KL over classes, per anchor (Hinton); sum over anchors / N",
}
BOX_METHODS: dict[str, str] = {
    "ld": "localization distillation on (N, A, 4, R) DFL distributions, teacher-score weighted",
    "l1_giou": "GIoU (+ optional L1) of decoded boxes at teacher-confident anchors",
    "bounded": "teacher-bounded L2 regression loss (Chen et al. 2017); needs box_targets",
}
