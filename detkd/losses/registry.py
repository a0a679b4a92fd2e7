"""Method names -> losses: the one place the Distiller and config validation look names up.

Three tables, each ``name -> entry`` with a uniform calling convention:

* ``FEATURE_METHODS[name]`` is a :class:`FeatureMethod`. ``build(student_channels, teacher_channels,
  **options)`` returns an ``nn.Module`` whose ``forward(s, t, *, gt_boxes=None, gt_valid=None,
  img_shape=None)`` gives a 0-dim loss for ``(N, C, H, W)`` maps ``s`` (student, already through its
  adapter and resized to the teacher's ``H, W``) and ``t`` (teacher). Flags:

  ========  =========  ===============  ==============  ========
  name      learnable  aligns_channels  channel_free    needs_gt
  ========  =========  ===============  ==============  ========
  fitnet    no         no (adapter)     no              no
  cwd       no         no (adapter)     no              no
  pkd       no         no (adapter)     no              no
  at        no         --               yes (no conv)   no
  mgd       yes        yes (own conv)   --              no
  fgd       yes        yes (own conv)   --              yes
  ========  =========  ===============  ==============  ========

  ``learnable``: the module has parameters that go to the optimizer (MGD's generator, FGD's context
  blocks); ``aligns_channels``: it takes both channel counts and maps the student itself, so the Distiller
  adds no 1x1 conv adapter; ``channel_free``: the loss works whatever the two channel counts (attention
  maps); ``needs_gt``: it needs the batch's ``gt_boxes (N, M, 4)`` xyxy pixels, ``gt_valid (N, M)`` and
  ``img_shape (H, W)``.

* ``LOGIT_METHODS[name]`` / ``BOX_METHODS[name]`` are :class:`HeadMethod`\\ s. ``loss(s, t, *,
  temperature, box_targets=None, **options)`` takes the student's and teacher's dense-head outputs
  (anything with ``cls (N, A, K)`` raw logits, ``box_dist (N, A, 4, R)`` DFL logits or None, ``boxes
  (N, A, 4)`` decoded xyxy or None, e.g. :class:`detkd.distiller.DenseOutputs`) and returns a 0-dim loss.

A new feature method is one file in ``detkd/losses/`` holding the loss with :func:`register_feature_method` on it,
imported by ``detkd/losses/__init__.py``; the entries below predate it.

Every entry knows which ``options`` (YAML ``options:`` mapping) its loss accepts: ``option_names()`` reads
the keyword arguments of the underlying loss (``target``) minus the ones the Distiller fills itself.
Losses are imported lazily, inside the builders.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from dataclasses import dataclass
from typing import Any, Callable

from torch import Tensor, nn

from detkd.errors import ConfigError

__all__ = ["FeatureMethod", "HeadMethod", "Method", "FEATURE_METHODS", "LOGIT_METHODS", "BOX_METHODS",
           "register_feature_method"]


def _option_names(target: str, fixed: tuple[str, ...]) -> frozenset[str] | None:
    """Keyword arguments of ``module:attr`` minus ``fixed``; None when it takes ``**kwargs`` (no check)."""
    mod, _, attr = target.partition(":")
    fn = getattr(importlib.import_module(mod), attr)
    params = inspect.signature(fn).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    ok = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return frozenset(p.name for p in params if p.kind in ok and p.name not in fixed)


@dataclass(frozen=True)
class FeatureMethod:
    """A feature-map distillation method; see the module docstring."""

    name: str
    build: Callable[..., nn.Module]
    target: str
    fixed: tuple[str, ...] = ("s", "t")
    learnable: bool = False
    aligns_channels: bool = False
    channel_free: bool = False
    needs_gt: bool = False
    extra_options: tuple[str, ...] = ()

    def option_names(self) -> frozenset[str] | None:
        names = _option_names(self.target, self.fixed)
        return None if names is None else names | frozenset(self.extra_options)


Method = FeatureMethod  # older name


@dataclass(frozen=True)
class HeadMethod:
    """A dense-head (logit or box) distillation method; see the module docstring."""

    name: str
    loss: Callable[..., Tensor]
    target: str
    fixed: tuple[str, ...]
    description: str = ""
    uses_temperature: bool = True

    def option_names(self) -> frozenset[str] | None:
        return _option_names(self.target, self.fixed)


# ------------------------------------------------------------------------------------------------------------
# Feature methods
# ------------------------------------------------------------------------------------------------------------
class FeatureFn(nn.Module):
    """A stateless feature loss from ``detkd.losses.features`` with bound options (no parameters)."""

    def __init__(self, fn_name: str, **options: Any):
        super().__init__()
        self.fn_name = fn_name
        self.options = options

    def forward(self, s: Tensor, t: Tensor, **ctx: Any) -> Tensor:
        from detkd.losses import features

        return getattr(features, self.fn_name)(s, t, **self.options)

    def extra_repr(self) -> str:
        return f"{self.fn_name}, options={self.options}"


def _feature_fn(fn_name: str, student_channels: int, teacher_channels: int, **options: Any) -> nn.Module:
    return FeatureFn(fn_name, **options)


class MGDTerm(nn.Module):
    """:class:`detkd.losses.mgd.MGDLoss` (its own 1x1 align conv + generator) as a feature term."""

    def __init__(self, student_channels: int, teacher_channels: int, **options: Any):
        super().__init__()
        from detkd.losses.mgd import MGDLoss

        self.loss = MGDLoss(student_channels, teacher_channels, **options)

    def forward(self, s: Tensor, t: Tensor, **ctx: Any) -> Tensor:
        return self.loss(s, t)


class FGDTerm(nn.Module):
    """:class:`detkd.losses.fgd.FGDLoss` as a feature term; needs ``gt_boxes`` and ``img_shape``."""

    def __init__(self, student_channels: int, teacher_channels: int, **options: Any):
        super().__init__()
        from detkd.losses.fgd import FGDLoss

        self.loss = FGDLoss(student_channels, teacher_channels, **options)

    def forward(self, s: Tensor, t: Tensor, *, gt_boxes=None, gt_valid=None, img_shape=None, **ctx: Any) -> Tensor:
        if gt_boxes is None or img_shape is None:
            raise ConfigError(
                "fgd needs the batch's ground-truth boxes (xyxy input pixels) and the input image size: pass "
                "gt_boxes= (N, M, 4) (or a list of (n_i, 4)), gt_valid= (N, M) and img_shape= (H, W)"
            )
        return self.loss(s, t, gt_boxes, img_shape, gt_valid=gt_valid)


FEATURE_METHODS: dict[str, FeatureMethod] = {
    "fitnet": FeatureMethod("fitnet", functools.partial(_feature_fn, "fitnet_loss"),
                            "detkd.losses.features:fitnet_loss"),
    "cwd": FeatureMethod("cwd", functools.partial(_feature_fn, "cwd_loss"), "detkd.losses.features:cwd_loss"),
    "pkd": FeatureMethod("pkd", functools.partial(_feature_fn, "pkd_loss"), "detkd.losses.features:pkd_loss"),
    "at": FeatureMethod("at", functools.partial(_feature_fn, "at_loss"), "detkd.losses.features:at_loss",
                        channel_free=True),
    "mgd": FeatureMethod("mgd", MGDTerm, "detkd.losses.mgd:MGDLoss", ("student_channels", "teacher_channels"),
                         learnable=True, aligns_channels=True),
    "fgd": FeatureMethod("fgd", FGDTerm, "detkd.losses.fgd:FGDLoss", ("student_channels", "teacher_channels"),
                         learnable=True, aligns_channels=True, needs_gt=True),
}



class FunctionTerm(nn.Module):
    """A stateless feature loss ``fn(s, t, **options)`` with bound options, as a feature term (no parameters)."""

    def __init__(self, fn: Callable[..., Tensor], **options: Any):
        super().__init__()
        self.fn, self.options = fn, options

    def forward(self, s: Tensor, t: Tensor, **ctx: Any) -> Tensor:
        return self.fn(s, t, **self.options)

    def extra_repr(self) -> str:
        return f"{getattr(self.fn, '__name__', self.fn)}, options={self.options}"


def register_feature_method(name: str, *, learnable: bool = False, aligns_channels: bool = False,
                            channel_free: bool = False, needs_gt: bool = False, extra_options: tuple[str, ...] = ()):
    """Decorator: make a feature loss available as ``method: <name>``, written next to the loss in its own file.

    On a function ``fn(s, t, *, opt=...)`` (stateless; its keyword arguments are the YAML ``options``)::

        @register_feature_method("mine", channel_free=True)
        def mine_loss(s: Tensor, t: Tensor, *, alpha: float = 1.0) -> Tensor: ...

    On an ``nn.Module`` class built as ``cls(student_channels, teacher_channels, **options)`` whose
    ``forward(s, t, *, gt_boxes=None, gt_valid=None, img_shape=None, **ctx)`` returns the 0-dim loss (learnable
    methods; set ``learnable`` / ``aligns_channels`` / ``needs_gt`` as in the module docstring's table). The module
    holding it must be imported by ``detkd/losses/__init__.py`` (config validation looks names up when
    ``detkd.losses`` is imported). Returns the decorated object unchanged.
    """

    def register(obj):
        if name in FEATURE_METHODS:
            raise ValueError(f"feature method {name!r} is already registered")
        target = f"{obj.__module__}:{obj.__qualname__}"
        if isinstance(obj, type) and issubclass(obj, nn.Module):
            build, fixed = obj, ("student_channels", "teacher_channels")
        else:
            build, fixed = functools.partial(_function_term, obj), ("s", "t")
        FEATURE_METHODS[name] = FeatureMethod(name, build, target, fixed, learnable, aligns_channels, channel_free,
                                              needs_gt, tuple(extra_options))
        return obj

    return register


def _function_term(fn: Callable[..., Tensor], student_channels: int, teacher_channels: int,
                   **options: Any) -> nn.Module:
    return FunctionTerm(fn, **options)


# ------------------------------------------------------------------------------------------------------------
# Dense-head methods: s, t have .cls (N, A, K), .box_dist (N, A, 4, R) | None, .boxes (N, A, 4) | None
# ------------------------------------------------------------------------------------------------------------
def teacher_score(t: Any) -> Tensor:
    """``(N, A)`` teacher confidence, no gradient: ``t.anchor_confidence()`` when ``t`` has it
    (:class:`detkd.distiller.DenseOutputs`: the head's own ``confidence``, else the max of its foreground class
    probabilities, sigmoid or softmax), else the max over classes of ``sigmoid(t.cls)`` (YOLO)."""
    conf = getattr(t, "anchor_confidence", None)
    return conf().detach() if callable(conf) else t.cls.detach().sigmoid().amax(-1)


def _check_cls(s: Any, t: Any, method: str) -> None:
    if s.cls.shape != t.cls.shape:
        raise ConfigError(
            f"distill.logits.method={method}: student logits {tuple(s.cls.shape)} vs teacher {tuple(t.cls.shape)}; "
            "they must have the same anchors and classes (N, A, K)"
        )


def sigmoid_kd_term(s: Any, t: Any, *, temperature: float = 1.0, box_targets: Tensor | None = None,
                    avg_factor: Any = None, **options: Any) -> Tensor:
    """:func:`detkd.losses.logits.sigmoid_kd_loss` on ``(N, A, K)`` logits (per class, all anchors).

    ``options.avg_factor`` may be a number, or ``"teacher_score"``: ``max(1, sum over anchors of the
    teacher's max class score)``, a batch-size-free normaliser like a detection loss's positive count.
    """
    from detkd.losses.logits import sigmoid_kd_loss

    _check_cls(s, t, "sigmoid_kd")
    if "softmax" in (getattr(s, "cls_activation", "sigmoid"), getattr(t, "cls_activation", "sigmoid")):
        raise ConfigError("distill.logits.method=sigmoid_kd treats every class as its own sigmoid, but this head's "
                          "classes are one softmax (cls_activation: softmax); use method kd")
    if avg_factor == "teacher_score":
        avg_factor = teacher_score(t).sum().clamp(min=1.0)
    return sigmoid_kd_loss(s.cls, t.cls, temperature=temperature, avg_factor=avg_factor, **options)


def softmax_kd_term(s: Any, t: Any, *, temperature: float = 1.0, box_targets: Tensor | None = None,
                    **options: Any) -> Tensor:
    """:func:`detkd.losses.logits.kd_loss` over the classes of each anchor: ``(N, A, K)`` is passed as
    ``(N, K, A)``, so the default ``batchmean`` is ``T^2 * sum over anchors of KL / N``."""
    from detkd.losses.logits import kd_loss

    _check_cls(s, t, "kd")
    return kd_loss(s.cls.transpose(1, 2), t.cls.transpose(1, 2), temperature=temperature, **options)


def ld_term(s: Any, t: Any, *, temperature: float = 10.0, box_targets: Tensor | None = None,
            **options: Any) -> Tensor:
    """:func:`detkd.losses.boxes.ld_loss` on the ``(N, A, 4, R)`` DFL logits of every anchor, each of the four
    sides weighted by the teacher's confidence at that anchor (:func:`teacher_score`); default
    ``avg_factor = max(1, sum of those weights)``."""
    from detkd.losses.boxes import ld_loss

    if s.box_dist is None or t.box_dist is None:
        raise ConfigError("distill.boxes.method=ld needs DFL box distributions (box_dist) from both heads; "
                          "use method l1_giou for heads without them")
    if s.box_dist.shape != t.box_dist.shape:
        raise ConfigError(f"distill.boxes.method=ld: student box distributions {tuple(s.box_dist.shape)} vs "
                          f"teacher {tuple(t.box_dist.shape)} (reg_max or anchors differ); use method l1_giou")
    score = teacher_score(t)  # (N, A)
    w = score.unsqueeze(1).expand(score.shape[0], 4, score.shape[1])  # (N, 4, A): each side of an anchor
    options.setdefault("avg_factor", w.sum().clamp(min=1.0))
    # (N, A, 4, R) -> (N, 4, R, A): a view of a YOLO head's raw output, bins along dim 2 (no copy; see ld_loss's dim)
    return ld_loss(s.box_dist.permute(0, 2, 3, 1), t.box_dist.permute(0, 2, 3, 1), temperature=temperature,
                   weight=w, dim=2, **options)


def l1_giou_term(s: Any, t: Any, *, temperature: float = 1.0, box_targets: Tensor | None = None,
                 **options: Any) -> Tensor:
    """:func:`detkd.losses.boxes.box_kd_loss` (GIoU, optional L1) of decoded ``(N, A, 4)`` xyxy boxes,
    weighted by the teacher's confidence (:func:`teacher_score`)."""
    from detkd.losses.boxes import box_kd_loss

    if s.boxes is None or t.boxes is None:
        raise ConfigError("distill.boxes.method=l1_giou needs decoded boxes (N, A, 4) from both heads")
    return box_kd_loss(s.boxes, t.boxes, teacher_score(t), **options)


def bounded_term(s: Any, t: Any, *, temperature: float = 1.0, box_targets: Tensor | None = None,
                 **options: Any) -> Tensor:
    """:func:`detkd.losses.boxes.bounded_regression_loss` of decoded boxes against ``box_targets (N, A, 4)``."""
    from detkd.losses.boxes import bounded_regression_loss

    if s.boxes is None or t.boxes is None or box_targets is None:
        raise ConfigError("distill.boxes.method=bounded needs decoded boxes from both heads and "
                          "box_targets= (N, A, 4) (the regression targets of the student's assigned anchors)")
    return bounded_regression_loss(s.boxes, t.boxes, box_targets.to(s.boxes.dtype), **options)


_CLS_FIXED = ("student_logits", "teacher_logits", "temperature", "weight")
LOGIT_METHODS: dict[str, HeadMethod] = {
    "sigmoid_kd": HeadMethod("sigmoid_kd", sigmoid_kd_term, "detkd.losses.logits:sigmoid_kd_loss", _CLS_FIXED,
                             "per-class sigmoid/BCE (QFL-weighted, PP-YOLOE) on (N, A, K) logits"),
    "kd": HeadMethod("kd", softmax_kd_term, "detkd.losses.logits:kd_loss", _CLS_FIXED,
                     "softmax KL over the classes of each anchor (Hinton); sum over anchors / N"),
}
BOX_METHODS: dict[str, HeadMethod] = {
    "ld": HeadMethod("ld", ld_term, "detkd.losses.boxes:ld_loss",
                     ("student_bins", "teacher_bins", "temperature", "weight", "dim"),
                     "localization distillation on (N, A, 4, R) DFL distributions, teacher-score weighted"),
    "l1_giou": HeadMethod("l1_giou", l1_giou_term, "detkd.losses.boxes:box_kd_loss",
                          ("student_boxes", "teacher_boxes", "teacher_scores", "weight"),
                          "GIoU (+ optional L1) of decoded boxes, teacher-score weighted", uses_temperature=False),
    "bounded": HeadMethod("bounded", bounded_term, "detkd.losses.boxes:bounded_regression_loss",
                          ("student_reg", "teacher_reg", "target_reg", "weight"),
                          "teacher-bounded L2 regression loss (Chen et al. 2017); needs box_targets",
                          uses_temperature=False),
}

__all__ += ["teacher_score", "sigmoid_kd_term", "softmax_kd_term", "ld_term", "l1_giou_term", "bounded_term"]
