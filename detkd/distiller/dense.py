"""The dense-head contract: what an integration hands the logit / box losses, anchors first.

A head extractor (``head_extractor=`` / ``teacher_head_extractor=`` of the Distiller, a picklable top-level function
or object) turns a head's raw output into :class:`DenseOutputs`. It does everything framework-specific: transposes
to ``(N, A, ...)``, decodes boxes (DFL distances, anchor deltas, FCOS ltrb) into ``xyxy`` input pixels, and says
how its classes are activated and what "the teacher is confident here" means. The defaults are YOLO's (one sigmoid
per class, confidence = max class sigmoid); other heads set them:

=============================  ==============  ===========  ===================================================
head                           cls_activation  background   confidence
=============================  ==============  ===========  ===================================================
YOLOv8/11/26 (Ultralytics)     sigmoid         None         default: max_k sigmoid(cls)
RetinaNet                      sigmoid         None         default
SSD, Faster R-CNN box head     softmax         0            default: max over foreground of softmax(cls)
FCOS                           sigmoid         None         ``sqrt(sigmoid(cls).max * sigmoid(centerness))``,
                                                            or ``scores`` with the centerness folded in
=============================  ==============  ===========  ===================================================

The teacher's confidence weights ``ld`` / ``l1_giou`` per anchor, normalises ``sigmoid_kd`` with
``avg_factor: teacher_score`` and picks the pseudo boxes of unlabeled frames (see
:func:`detkd.losses.registry.teacher_score`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from detkd.distiller.util import normal
from detkd.errors import ConfigError

__all__ = ["CLS_ACTIVATIONS", "DENSE_TENSORS", "DenseOutputs", "default_head_extractor", "float_outputs", "float_tree"]

CLS_ACTIVATIONS = ("sigmoid", "softmax")
DENSE_TENSORS = ("cls", "box_dist", "boxes", "scores", "confidence")  # the tensor fields, in order


@dataclass
class DenseOutputs:
    """A dense head's outputs, anchors first (``N`` images, ``A`` anchors / locations, ``K`` class columns).

    Attributes:
        cls: ``(N, A, K)`` raw class logits (softmax heads: including the background column).
        box_dist: ``(N, A, 4, R)`` DFL bin logits (ltrb sides), or None (heads without DFL).
        boxes: ``(N, A, 4)`` decoded ``xyxy`` boxes in input pixels, or None. Anchor-based heads decode their deltas
            against their anchors in the extractor.
        scores: ``(N, A, C)`` foreground class probabilities as the head scores detections (e.g. FCOS with the
            centerness folded in), or None: derived from ``cls`` by ``cls_activation`` (background column dropped).
        confidence: ``(N, A)`` how sure the head is that an anchor holds an object, or None: the max of the class
            probabilities (:meth:`anchor_confidence`).
        cls_activation: ``"sigmoid"`` (one independent sigmoid per class: YOLO, RetinaNet, FCOS) or ``"softmax"``
            (one distribution over the classes of an anchor: SSD, Faster R-CNN).
        background: the background column of ``cls`` for a softmax head that has one (torchvision SSD: 0), or None.
    """

    cls: Tensor
    box_dist: Tensor | None = None
    boxes: Tensor | None = None
    scores: Tensor | None = None
    confidence: Tensor | None = None
    cls_activation: str = "sigmoid"
    background: int | None = None

    def __post_init__(self) -> None:
        if self.cls_activation not in CLS_ACTIVATIONS:
            raise ConfigError(f"DenseOutputs.cls_activation: {self.cls_activation!r}; expected one of "
                              f"{', '.join(CLS_ACTIVATIONS)}")
        if self.background is not None and self.cls_activation != "softmax":
            raise ConfigError("DenseOutputs.background: a background column belongs to a softmax head "
                              "(cls_activation='softmax'); sigmoid heads have none")

    def class_scores(self) -> Tensor:
        """``(N, A, C)`` foreground class probabilities: ``scores``, else ``sigmoid(cls)`` or ``softmax(cls)``
        without the background column."""
        if self.scores is not None:
            return self.scores
        if self.cls_activation == "sigmoid":
            return self.cls.sigmoid()
        p = self.cls.softmax(-1)
        b = self.background
        if b is None:
            return p
        b = b % p.shape[-1]
        return torch.cat((p[..., :b], p[..., b + 1:]), -1)

    def anchor_confidence(self) -> Tensor:
        """``(N, A)`` confidence per anchor, without gradient: ``confidence``, else the max of
        :meth:`class_scores` (YOLO: the max class sigmoid)."""
        with torch.no_grad():
            c = self.confidence if self.confidence is not None else self.class_scores().amax(-1)
        if c.shape != self.cls.shape[:2]:
            raise ConfigError(f"DenseOutputs.confidence: shape {tuple(c.shape)}, expected (N, A) = "
                              f"{tuple(self.cls.shape[:2])}")
        return c.detach()

    def tensors(self) -> dict[str, Tensor]:
        """The tensor fields that are set, by name."""
        return {k: getattr(self, k) for k in DENSE_TENSORS if getattr(self, k) is not None}

    def meta(self) -> dict | None:
        """The non-tensor fields when they differ from the defaults (kept beside cached teacher tensors), else None."""
        if self.cls_activation == "sigmoid" and self.background is None:
            return None
        return {"cls_activation": self.cls_activation, "background": self.background}


def default_head_extractor(out: Any) -> DenseOutputs:
    """Accepts a :class:`DenseOutputs`, or a dict with key ``cls`` and any of its other fields."""
    if isinstance(out, DenseOutputs):
        return out
    if isinstance(out, dict) and "cls" in out:
        return DenseOutputs(**{f.name: out[f.name] for f in dataclasses.fields(DenseOutputs) if f.name in out})
    raise ConfigError(
        f"head output of type {type(out).__name__} is not understood: pass head_extractor= (a picklable "
        "top-level function returning DenseOutputs), or have the head return a dict with 'cls' (N, A, K) "
        "and optional 'box_dist' (N, A, 4, R) / 'boxes' (N, A, 4) / 'scores' / 'confidence' (N, A)"
    )


def float_outputs(d: DenseOutputs, detach: bool) -> DenseOutputs:
    """``d`` with every tensor float32 (and detached, for the teacher), inference tensors cloned out."""

    def f(x: Tensor | None) -> Tensor | None:
        if x is None:
            return None
        x = x.detach() if detach else x
        return normal(x.float())

    return dataclasses.replace(d, **{k: f(getattr(d, k)) for k in DENSE_TENSORS})


def float_tree(x: Any) -> Any:
    """float16 / bfloat16 tensors of a (tuple / list / dict) output as float32, so a head extractor decodes a
    half-precision teacher's output in float32 (box coordinates in float16 have 0.5 px steps above 512 px)."""
    if isinstance(x, Tensor):
        return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    if isinstance(x, dict):
        return {k: float_tree(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)) and not hasattr(x, "_fields"):
        return type(x)(float_tree(v) for v in x)
    return x
