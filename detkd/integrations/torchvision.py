"""torchvision detectors with the Distiller: RetinaNet, FCOS, SSD / SSDlite and Faster R-CNN (framework facts only).

What this module knows, and nothing else (the loop is ``torchvision_train.py``, the losses are the core's):

* **Models** (:data:`ARCHS`, :func:`build`): each arch is a few lines of plain torchvision code (:func:`build_code`),
  always ``weights=None, weights_backbone=None`` (no download) and ``min_size = max_size = imgsz`` (torchvision's
  default 800 px resize makes CPU training ~10x slower). The same text is written beside a run's weights as
  ``build_student.py``, so a student loads without detkd.
* **One batch, two models**: the student runs as usual (``model(images, targets)``, DDP or not); :class:`Capture`
  records, with hooks that live only for that forward, the batch its ``transform`` made and its head outputs (dense
  heads: ``cls_logits`` / ``bbox_regression`` and the anchors; Faster R-CNN: the sampled proposals and the box
  predictor's outputs). The teacher runs as :class:`TeacherView` (its own modules, same names) on *that* tensor
  (re-normalised when the two normalise differently), so both see the same pixels and feature taps
  (``backbone:<level>``, the FPN maps) line up.
* **Dense heads** (RetinaNet, FCOS, SSD): :class:`HeadOutputs` turns ``{cls_logits, bbox_regression, anchors}`` into
  :class:`~detkd.distiller.DenseOutputs` (deltas decoded against the anchors; SSD: softmax with background 0; FCOS:
  confidence with the centerness). Terms are anchor by anchor, so the two anchor sets must be the same:
  :func:`check_pair` compares generators and level sizes and names the difference.
* **Faster R-CNN**: the student's sampled proposals go through the teacher's ``box_roi_pool -> box_head ->
  box_predictor``; logits (K + 1 columns, softmax) and the boxes of the teacher's top class are compared per RoI.
"""

from __future__ import annotations

import contextlib
import warnings
from collections import OrderedDict
from typing import Any, Iterator

import torch
from torch import Tensor, nn

from detkd.config import DistillConfig, load_config
from detkd.distiller import DenseOutputs, Distiller
from detkd.distiller.taps import unwrap
from detkd.errors import ConfigError

__all__ = ["ARCHS", "build", "build_code", "family_of", "label_offset", "num_classes_of", "TeacherView",
           "HeadOutputs", "Capture", "check_pair", "auto_taps", "make_distiller", "distill_step", "predict_coco",
           "transformed"]

# -- models -----------------------------------------------------------------------------------------------------------
_IMPORTS = ("import torch\nfrom functools import partial\nfrom torch import nn\nimport torchvision\n"
            "from torchvision.models.detection import FCOS, FasterRCNN, RetinaNet\n"
            "from torchvision.models.detection.ssd import SSD\n"
            "from torchvision.models.detection.backbone_utils import mobilenet_backbone, resnet_fpn_backbone\n"
            "from torchvision.ops.feature_pyramid_network import LastLevelP6P7\n"
            "from torchvision.ops.misc import FrozenBatchNorm2d\n")
_TV = ("model = torchvision.models.detection.{arch}(weights=None, weights_backbone=None, num_classes={nc}, "
       "min_size={size}, max_size={size}{kw})\n")
_P6P7 = "returned_layers=[2, 3, 4], extra_blocks=LastLevelP6P7(256, 256), "
_RES = ("backbone = resnet_fpn_backbone(backbone_name='{depth}', weights=None, trainable_layers=5, "
        "{p67}norm_layer={norm})\n")
_MOB = ("backbone = mobilenet_backbone(backbone_name='mobilenet_v3_large', fpn=True, weights=None, trainable_layers=6, "
        "{p67}norm_layer={norm})\n")
_OWN = "model = {cls}(backbone, num_classes={nc}, min_size={size}, max_size={size}{kw})\n"
_SSDLITE = (
    "from torchvision.models.detection.anchor_utils import DefaultBoxGenerator\n"
    "from torchvision.models.detection import _utils as det_utils\n"
    "from torchvision.models.detection.ssdlite import SSDLiteHead, _mobilenet_extractor, _normal_init\n"
    "norm = partial(nn.BatchNorm2d, eps=0.001, momentum=0.03)\n"
    "net = torchvision.models.mobilenet_v3_large(weights=None, norm_layer=norm, reduced_tail=True, "
    "width_mult={width})\n"
    "_normal_init(net)\n"
    "backbone = _mobilenet_extractor(net, 6, norm)\n"
    "anchors = DefaultBoxGenerator([[2, 3] for _ in range(6)], min_ratio=0.2, max_ratio=0.95)\n"
    "channels = det_utils.retrieve_out_channels(backbone, ({size}, {size}))\n"
    "model = SSD(backbone, anchors, ({size}, {size}), {nc}, "
    "head=SSDLiteHead(channels, anchors.num_anchors_per_location(), {nc}, norm), image_mean=[0.5, 0.5, 0.5], "
    "image_std=[0.5, 0.5, 0.5], score_thresh=0.001, nms_thresh=0.55, detections_per_img=300, "
    "topk_candidates=300{kw})\n")
_SSD_SIZE = ("from torchvision.models.detection.transform import GeneralizedRCNNTransform\n"
             "model.transform = GeneralizedRCNNTransform({size}, {size}, model.transform.image_mean, "
             "model.transform.image_std, size_divisible=1, fixed_size=({size}, {size}))\n")

#: arch -> (family, code template). torchvision's own builders, and smaller students made of torchvision parts whose
#: anchors (generator and FPN strides P3-P7) equal the ResNet-50 teachers', so dense terms align anchor by anchor.
ARCHS: dict[str, tuple[str, str]] = {
    "retinanet_resnet50_fpn": ("retinanet", _TV),
    "retinanet_resnet50_fpn_v2": ("retinanet", _TV),
    "retinanet_resnet18_fpn": ("retinanet", _RES.replace("{depth}", "resnet18") + _OWN.replace("{cls}", "RetinaNet")),
    "retinanet_resnet34_fpn": ("retinanet", _RES.replace("{depth}", "resnet34") + _OWN.replace("{cls}", "RetinaNet")),
    "retinanet_mobilenet_v3_large_fpn": ("retinanet", _MOB + _OWN.replace("{cls}", "RetinaNet")),
    "fcos_resnet50_fpn": ("fcos", _TV),
    "fcos_resnet18_fpn": ("fcos", _RES.replace("{depth}", "resnet18") + _OWN.replace("{cls}", "FCOS")),
    "fcos_mobilenet_v3_large_fpn": ("fcos", _MOB + _OWN.replace("{cls}", "FCOS")),
    "ssdlite320_mobilenet_v3_large": ("ssd", _TV.replace(", min_size={size}, max_size={size}", "") + _SSD_SIZE),
    "ssdlite_mobilenet_v3_large": ("ssd", _SSDLITE),  # options: width_mult (default 0.5): a student for the above
    "fasterrcnn_resnet50_fpn": ("rcnn", _TV),
    "fasterrcnn_resnet50_fpn_v2": ("rcnn", _TV),
    "fasterrcnn_mobilenet_v3_large_fpn": ("rcnn", _TV),
    "fasterrcnn_mobilenet_v3_large_320_fpn": ("rcnn", _TV),
    "fasterrcnn_resnet18_fpn": ("rcnn", _RES.replace("{depth}", "resnet18").replace("{p67}", "")
                                + _OWN.replace("{cls}", "FasterRCNN")),
}
_NORMS = {"batch": "nn.BatchNorm2d", "frozen": "FrozenBatchNorm2d", "group": "partial(nn.GroupNorm, 32)"}
FAMILIES = ("retinanet", "fcos", "ssd", "rcnn")


def _arch(arch: str) -> tuple[str, str]:
    if arch not in ARCHS:
        import difflib

        close = difflib.get_close_matches(str(arch), list(ARCHS), n=2, cutoff=0.5)
        raise ConfigError(f"torchvision arch '{arch}' is not known" + (f"; did you mean {' or '.join(close)}?" if close
                          else "") + f" (known: {', '.join(ARCHS)})")
    return ARCHS[arch]


def arch_family(arch: str) -> str:
    """``retinanet`` | ``fcos`` | ``ssd`` | ``rcnn`` of an arch name."""
    return _arch(arch)[0]


def label_offset(family: str) -> int:
    """torchvision label of class 0: SSD and Faster R-CNN keep label 0 for the background, RetinaNet / FCOS do not."""
    return 1 if family in ("ssd", "rcnn") else 0


def build_code(arch: str, num_classes: int, imgsz: int, **options: Any) -> str:
    """Plain torchvision code (no detkd) that builds ``arch`` for ``num_classes`` dataset classes at ``imgsz`` into
    ``model``. ``options``: ``norm`` (``batch`` | ``frozen`` | ``group``; ResNet / MobileNet FPN students built from
    parts), ``width_mult`` (``ssdlite_mobilenet_v3_large``), anything else is a keyword of the model's constructor
    (e.g. ``detections_per_img``)."""
    fam, code = _arch(arch)
    opts = dict(options)
    norm = opts.pop("norm", "batch")
    width = float(opts.pop("width_mult", 0.5))
    if norm not in _NORMS:
        raise ConfigError(f"torchvision {arch}: options.norm must be one of {', '.join(_NORMS)}, got {norm!r}")
    if norm != "batch" and "{norm}" not in code:
        raise ConfigError(f"torchvision {arch}: options.norm applies to the ResNet / MobileNet FPN students built "
                          "from parts (e.g. retinanet_resnet18_fpn), not to torchvision's own builder")
    if "width_mult" in options and "{width}" not in code:
        raise ConfigError(f"torchvision {arch}: options.width_mult applies to ssdlite_mobilenet_v3_large only")
    for k, v in opts.items():
        if not k.isidentifier() or not isinstance(v, (int, float, str, bool, type(None), list, tuple)):
            raise ConfigError(f"torchvision {arch}: options.{k}: {v!r} is not a constructor keyword with a plain value")
    kw = "".join(f", {k}={v!r}" for k, v in opts.items())
    nc = int(num_classes) + label_offset(fam)
    body = code.format(arch=arch, nc=nc, size=int(imgsz), kw=kw, norm=_NORMS[norm], width=width, p67=_P6P7)
    return _IMPORTS + body


def build(arch: str, num_classes: int, imgsz: int, **options: Any) -> nn.Module:
    """``arch`` for ``num_classes`` dataset classes (the background column, where the family has one, is added),
    resizing to ``imgsz``; never downloads. Runs exactly :func:`build_code`'s text."""
    code = build_code(arch, num_classes, imgsz, **options)
    ns: dict[str, Any] = {}
    try:
        exec(compile(code, f"<detkd torchvision {arch}>", "exec"), ns)  # our own template, not user input
    except TypeError as e:
        raise ConfigError(f"torchvision {arch}: {e}") from None
    return ns["model"]


def family_of(model: nn.Module) -> str:
    from torchvision.models.detection import FCOS, RetinaNet
    from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
    from torchvision.models.detection.ssd import SSD

    m = unwrap(model)
    if isinstance(m, TeacherView):
        return m.family
    for cls, fam in ((RetinaNet, "retinanet"), (FCOS, "fcos"), (SSD, "ssd"), (GeneralizedRCNN, "rcnn")):
        if isinstance(m, cls):
            return fam
    raise ConfigError(f"torchvision: {type(m).__name__} is not a RetinaNet, FCOS, SSD or Faster R-CNN model")


def num_classes_of(model: nn.Module) -> int:
    """Class columns of the model's classifier (background included where the family has one)."""
    m, fam = unwrap(model), family_of(model)
    if fam == "rcnn":
        return int(m.roi_heads.box_predictor.cls_score.out_features)
    head = m.head.classification_head
    return int(getattr(head, "num_classes", None) or head.num_columns)


def _coder(m: nn.Module) -> Any:
    return m.roi_heads.box_coder if family_of(m) == "rcnn" else m.box_coder


# -- the teacher on the student's batch -----------------------------------------------------------------------------
class TeacherView(nn.Module):
    """The teacher's modules (same names: ``backbone``, ``head``, ``anchor_generator``, ``rpn``, ``roi_heads``) run on
    the student's transformed batch ``x``: ``forward(x, image_sizes=None, proposals=None)``.

    Dense families return ``{cls_logits, bbox_regression[, bbox_ctrness], anchors (N, A, 4)}``; Faster R-CNN returns,
    given the student's ``proposals`` (a list of ``(R_i, 4)``), ``{class_logits, box_regression, proposals (R, 4),
    labels (R,)}`` (``labels``: the teacher's top foreground class per RoI), else ``{}`` (features only). ``x`` is
    mapped from the student's normalisation to the teacher's (exact: both are per-channel affine)."""

    def __init__(self, teacher: nn.Module, student: nn.Module | None = None):
        super().__init__()
        teacher = unwrap(teacher)
        self.family = family_of(teacher)
        for name, child in teacher.named_children():
            if name != "transform":
                self.add_module(name, child)
        tt = teacher.transform
        st = unwrap(student).transform if student is not None else tt
        s_mean, s_std = torch.tensor(st.image_mean), torch.tensor(st.image_std)
        t_mean, t_std = torch.tensor(tt.image_mean), torch.tensor(tt.image_std)
        self.renorm = not (torch.equal(s_mean, t_mean) and torch.equal(s_std, t_std))
        self.register_buffer("scale", (s_std / t_std).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("shift", ((s_mean - t_mean) / t_std).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: Tensor, image_sizes: list | None = None, proposals: list | None = None) -> dict:
        from torchvision.models.detection.image_list import ImageList

        if self.renorm:
            x = x * self.scale.to(x.dtype) + self.shift.to(x.dtype)
        sizes = [tuple(int(v) for v in s) for s in image_sizes] if image_sizes is not None else \
            [tuple(x.shape[-2:])] * x.shape[0]
        feats = self.backbone(x)
        if isinstance(feats, Tensor):
            feats = OrderedDict([("0", feats)])
        if self.family == "rcnn":
            if proposals is None:
                return {}
            rh = self.roi_heads
            proposals = [p.to(x.dtype) for p in proposals]
            cls, reg = rh.box_predictor(rh.box_head(rh.box_roi_pool(feats, proposals, sizes)))
            return {"class_logits": cls, "box_regression": reg, "proposals": torch.cat(proposals),
                    "labels": cls[:, 1:].argmax(-1) + 1}
        levels = list(feats.values())
        out = dict(self.head(levels))
        out["anchors"] = torch.stack(self.anchor_generator(ImageList(x, sizes), levels))
        return out


# -- head outputs -> DenseOutputs --------------------------------------------------------------------------------------
class HeadOutputs:
    """Head extractor for one torchvision model (picklable): raw head outputs (plus anchors / proposals) ->
    :class:`~detkd.distiller.DenseOutputs`, anchors first, boxes decoded with the model's own box coder."""

    def __init__(self, model: nn.Module):
        self.family = family_of(model)
        self.coder = _coder(unwrap(model))

    def __call__(self, out: dict) -> DenseOutputs:
        if self.family == "rcnn":
            cls, props = out["class_logits"], out["proposals"].float()
            reg = out["box_regression"].float()  # decoded in float32, also under AMP
            labels = out.get("labels")
            labels = cls[:, 1:].argmax(-1) + 1 if labels is None else labels.long()
            boxes = self.coder.decode(reg, [props])[torch.arange(len(props), device=props.device), labels]
            return DenseOutputs(cls=cls[None], boxes=boxes[None], cls_activation="softmax", background=0)
        cls, reg, anchors = out["cls_logits"], out["bbox_regression"].float(), out["anchors"].float()
        n, a = reg.shape[:2]
        if self.family == "fcos":
            boxes = self.coder.decode(reg, anchors)
            conf = (cls.detach().sigmoid().amax(-1) * out["bbox_ctrness"].detach().sigmoid().squeeze(-1)).sqrt()
            return DenseOutputs(cls=cls, boxes=boxes, confidence=conf)
        boxes = self.coder.decode_single(reg.reshape(-1, 4), anchors.reshape(-1, 4)).reshape(n, a, 4)
        if self.family == "ssd":
            return DenseOutputs(cls=cls, boxes=boxes, cls_activation="softmax", background=0)
        return DenseOutputs(cls=cls, boxes=boxes)


# -- the student's forward, recorded -----------------------------------------------------------------------------------
class Capture:
    """Hooks on a torchvision detector for the forward passes inside ``with Capture(model) as cap:`` (removed on exit):
    ``cap.images`` (the ``ImageList`` its transform made), ``cap.targets`` (boxes in those pixels), and ``cap.head``
    + ``cap.anchors`` (dense families) or ``cap.proposals`` / ``cap.image_sizes`` / ``cap.roi`` (Faster R-CNN: the
    sampled proposals and ``(class_logits, box_regression)`` of the box predictor)."""

    def __init__(self, model: nn.Module):
        self.model = unwrap(model)
        self.family = family_of(self.model)
        self.images = self.targets = self.head = self.anchors = self.proposals = self.image_sizes = self.roi = None
        self._handles: list = []

    def _set(self, **kw: Any) -> None:
        self.__dict__.update(kw)

    def __enter__(self) -> Capture:
        m, hooks = self.model, []
        hooks.append((m.transform, lambda mod, i, o: self._set(images=o[0], targets=o[1])))
        if self.family == "rcnn":
            rh = m.roi_heads
            hooks.append((rh.box_roi_pool, lambda mod, i, o: self._set(proposals=i[1], image_sizes=i[2])))
            hooks.append((rh.box_predictor, lambda mod, i, o: self._set(roi=o)))
        else:
            hooks.append((m.head, lambda mod, i, o: self._set(head=o)))
            hooks.append((m.anchor_generator, lambda mod, i, o: self._set(anchors=o)))
        self._handles = [mod.register_forward_hook(fn) for mod, fn in hooks]
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def teacher_inputs(self, rois: bool = True) -> tuple:
        """``(x, image_sizes[, proposals])`` for :class:`TeacherView` (``rois``: the proposals, for RoI terms)."""
        x, sizes = self.images.tensors, list(self.images.image_sizes)
        if self.family == "rcnn" and rois:
            return x, sizes, [p.detach() for p in self.proposals]
        return x, sizes

    def student_output(self, teacher_labels: Tensor | None = None) -> dict:
        """The student's head outputs in :class:`HeadOutputs`' format (RoIs: boxes of ``teacher_labels``)."""
        if self.family == "rcnn":
            cls, reg = self.roi
            props = torch.cat([p.detach() for p in self.proposals])
            out = {"class_logits": cls, "box_regression": reg, "proposals": props}
            if teacher_labels is not None:
                out["labels"] = teacher_labels.clone()
            return out
        return {**self.head, "anchors": torch.stack(self.anchors).detach()}


def transformed(model: nn.Module, images: Any) -> Tensor:
    """The batch tensor ``model``'s transform makes of ``images`` (eval-mode resize), e.g. for ``example_inputs``."""
    m = unwrap(model)
    mode = m.transform.training
    m.transform.eval()
    try:
        with torch.no_grad():
            return m.transform(list(images))[0].tensors
    finally:
        m.transform.train(mode)


# -- a pair: checks, taps ---------------------------------------------------------------------------------------------
def _levels(model: nn.Module, x: Tensor) -> list[tuple[str, tuple[int, int], int]]:
    """``(key, (h, w), channels)`` of each backbone output level on ``x``."""
    with torch.no_grad():
        f = unwrap(model).backbone(x)
    if isinstance(f, Tensor):
        f = OrderedDict([("0", f)])
    return [(k, tuple(v.shape[-2:]), int(v.shape[1])) for k, v in f.items()]


def _fmt_levels(lv: list) -> str:
    return f"{len(lv)} levels " + ", ".join(f"{h}x{w}" for _, (h, w), _ in lv)


def _anchor_desc(model: nn.Module) -> tuple[str, dict]:
    g = unwrap(model).anchor_generator
    keys = ("sizes", "aspect_ratios", "scales", "steps", "clip")
    return type(g).__name__, {k: getattr(g, k) for k in keys if hasattr(g, k)}


def _anchor_mismatch(student: nn.Module, teacher: nn.Module, x: Tensor) -> str | None:
    """What differs between the two models' anchors on ``x`` (None: the same anchors, in the same order)."""
    sf, tf = family_of(student), family_of(teacher)
    if sf != tf:
        return f"the teacher is {tf}, the student {sf}"
    (sn, sd), (tn, td) = _anchor_desc(student), _anchor_desc(teacher)
    if sn != tn:
        return f"anchor_generator: teacher {tn}, student {sn}"
    for k in td:
        if sd.get(k) != td[k]:
            return f"anchor_generator.{k}: teacher {td[k]} vs student {sd.get(k)}"
    sl, tl = _levels(student, x), _levels(teacher, x)
    if [s for _, s, _ in sl] != [s for _, s, _ in tl]:
        return (f"feature levels on a {x.shape[-2]}x{x.shape[-1]} batch: teacher {_fmt_levels(tl)}; "
                f"student {_fmt_levels(sl)}")
    return None


def check_pair(student: nn.Module, teacher: nn.Module, x: Tensor, cfg: DistillConfig) -> None:
    """Refuse, naming the difference, a pair whose logit / box terms cannot be compared; warn when the teacher was
    built for another input size (it sees the student's batch)."""
    sf, tf = family_of(student), family_of(teacher)
    dense = cfg.logits is not None or cfg.boxes is not None
    if dense:
        if (sf == "rcnn") != (tf == "rcnn"):
            raise ConfigError(f"torchvision: logit / box distillation pairs a dense head with a dense head or Faster "
                              f"R-CNN with Faster R-CNN; the teacher is {tf}, the student {sf}. Distil features only "
                              "(distill.logits: null, distill.boxes: null)")
        sc, tc = num_classes_of(student), num_classes_of(teacher)
        if sc != tc:
            raise ConfigError(f"torchvision: the teacher has {tc} class columns, the student {sc}; both must be built "
                              "for the dataset's classes")
        if sf != "rcnn":
            why = _anchor_mismatch(student, teacher, x)
            if why:
                raise ConfigError(
                    f"torchvision: logits / boxes are distilled anchor by anchor, but the teacher's and student's "
                    f"anchors differ: {why}. Use a student with the teacher's anchor generator and FPN strides (e.g. "
                    "retinanet_resnet50_fpn -> retinanet_resnet18_fpn / retinanet_mobilenet_v3_large_fpn, "
                    "fcos_resnet50_fpn -> fcos_resnet18_fpn, ssdlite320_mobilenet_v3_large -> "
                    "ssdlite_mobilenet_v3_large), or distil features only (distill.logits: null, distill.boxes: null)")
    st, tt = unwrap(student).transform, unwrap(teacher).transform
    if (st.min_size, st.max_size) != (tt.min_size, tt.max_size):
        warnings.warn(f"torchvision: the teacher resizes to min_size {tt.min_size} / max_size {tt.max_size}, the "
                      f"student to {st.min_size} / {st.max_size}; the teacher sees the student's batch", stacklevel=2)


def auto_taps(student: nn.Module, teacher: nn.Module, x: Tensor) -> tuple[list[str], list[str]]:
    """``features: auto``: the backbone (FPN) levels of the two models paired by size on ``x`` (by index when all
    sizes agree), as ``backbone:<key>`` tap names."""
    sl, tl = _levels(student, x), _levels(teacher, x)
    if [s for _, s, _ in sl] == [s for _, s, _ in tl]:
        pairs = list(zip(sl, tl))
    else:
        pairs, used = [], set()
        for s in sl:
            t = next((t for t in tl if t[1] == s[1] and t[0] not in used), None)
            if t is not None:
                used.add(t[0])
                pairs.append((s, t))
    if not pairs:
        raise ConfigError(f"distill.features: auto: no backbone level of the student has the size of a teacher level "
                          f"(teacher {_fmt_levels(tl)}; student {_fmt_levels(sl)}); list the taps by name")
    return [f"backbone:{s[0]}" for s, _ in pairs], [f"backbone:{t[0]}" for _, t in pairs]


def make_distiller(student: nn.Module, teacher: nn.Module, config: DistillConfig | dict | str,
                   example_images: Any) -> Distiller:
    """A :class:`~detkd.distiller.Distiller` for a torchvision pair: the teacher as :class:`TeacherView`, each model's
    :class:`HeadOutputs`, ``features: auto`` as the FPN levels (:func:`auto_taps`), the pair checked
    (:func:`check_pair`). ``example_images``: a few training images (a list of ``(3, H, W)`` or a batch tensor)."""
    cfg = load_config(config)
    if cfg.cross_head is not None:
        raise ConfigError("distill.cross_head (CrossKD) is for YOLO pairs (the student's features through the "
                          "teacher's Detect head); with torchvision detectors, remove it")
    x = transformed(student, example_images)
    check_pair(student, teacher, x, cfg)
    if cfg.has_auto_taps:
        cfg = cfg.with_auto_taps(*auto_taps(student, teacher, x))
    view = TeacherView(teacher, student)
    return Distiller(student, view, cfg, example_inputs=x, head_extractor=HeadOutputs(student),
                     teacher_head_extractor=HeadOutputs(teacher))


def distill_step(kd: Distiller, model: nn.Module, images: list, targets: list) -> tuple[dict, dict]:
    """One training forward: the student ``model`` (the detector, or DDP around it) on ``images`` / ``targets`` as
    torchvision trains it, then the teacher on the same transformed batch, then the distillation terms.

    Returns ``(detection losses dict, kd terms dict)``; back-propagate ``sum(losses) * task_weight + kd_total``."""
    from detkd.losses.fgd import pad_boxes

    cap = Capture(model)
    with kd.record(model), cap:
        losses = model(images, targets)
    dense = kd.cfg.logits is not None or kd.cfg.boxes is not None
    live = any(m != 0.0 for m in kd.multipliers().values())
    inputs = cap.teacher_inputs(rois=dense)
    gt_boxes, gt_valid = pad_boxes([t["boxes"] for t in cap.targets])
    s_out = None
    if dense and live:
        t_out = kd.teacher_forward(inputs)
        if cap.family == "rcnn":
            s_out = cap.student_output(t_out["labels"])
        else:
            s_out = cap.student_output()
            ta = t_out["anchors"]
            sa = s_out["anchors"]
            if ta.shape != sa.shape or not torch.allclose(ta.float(), sa.float(), rtol=1e-3, atol=1e-2):
                kd.reset_step()
                why = _anchor_mismatch(model, kd.teacher, inputs[0]) or "same generators, other values"
                raise ConfigError(f"torchvision: the teacher's anchors on this batch differ from the student's "
                                  f"({tuple(ta.shape)} vs {tuple(sa.shape)}); {why}")
    terms = kd(inputs, student_output=s_out, gt_boxes=gt_boxes, gt_valid=gt_valid,
               img_shape=tuple(inputs[0].shape[-2:]))
    return losses, terms


# -- evaluation -------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _eval_thresholds(model: nn.Module, score: float = 0.001, max_det: int = 100) -> Iterator[None]:
    """Low score threshold and COCO's 100 detections per image for mAP; the model's own values restored after."""
    m = unwrap(model)
    obj = m.roi_heads if family_of(m) == "rcnn" else m
    old = (obj.score_thresh, obj.detections_per_img)
    obj.score_thresh, obj.detections_per_img = score, max_det
    try:
        yield
    finally:
        obj.score_thresh, obj.detections_per_img = old


@torch.no_grad()
def predict_coco(model: nn.Module, images: list[Tensor], image_ids: list[int]) -> list[dict]:
    """COCO results (category ids ``1..K`` in class order, boxes in the images' own pixels) of ``model`` in eval mode
    on a list of ``(3, H, W)`` float images."""
    import numpy as np

    from detkd.eval.predict import to_coco_detections

    m = unwrap(model)
    off = label_offset(family_of(m))
    k = num_classes_of(m) - off
    lut = np.arange(1, k + 1, dtype=np.int64)
    with _eval_thresholds(m):
        outs = m(images)
    dets: list[dict] = []
    for iid, o in zip(image_ids, outs):
        keep = o["labels"] >= off
        dets += to_coco_detections(int(iid), o["boxes"][keep].float().cpu().numpy(),
                                   o["scores"][keep].float().cpu().numpy(),
                                   (o["labels"][keep] - off).cpu().numpy(), lut)
    return dets

