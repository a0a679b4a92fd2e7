"""Cross-family teacher: a torchvision detector (a ``framework: torchvision`` run's checkpoint) teaching a YOLO
student inside Ultralytics' trainer (``DistillTrainer``, ``detkd train``).

The glue between the two integrations; the losses are the core's (``sigmoid_kd``, ``l1_giou``, the feature methods).

* **Loading** (:func:`read_torchvision_checkpoint`, :func:`load_torchvision_teacher`): ``teacher:`` is the ``last.pt``
  or ``best.pt`` of a torchvision run. The architecture (arch, options, imgsz) and the class names come from the run
  itself: ``last.pt`` records them (``settings``, ``names``); a ``best.pt`` (a bare ``state_dict``) is read with its
  run's ``weights/last.pt`` beside it. Both are scanned by :func:`~detkd.checkpoints.check_checkpoint` and loaded
  ``weights_only``; nothing is downloaded (``weights=None, weights_backbone=None``).
* **One batch, two families** (:class:`TorchvisionTeacher`): the teacher runs on Ultralytics' ``batch['img']`` (RGB,
  0..1, letterboxed square) with its own ``GeneralizedRCNNTransform`` mean / std but *no resize*, so its FPN maps lie
  on the student's grids: backbone + FPN (taps ``backbone:<level>``), then its head and its own postprocess (score
  threshold, NMS) -> padded decoded detections, no grad.
* **Features** (:func:`pair_levels`): ``features: auto`` pairs each of the student's Detect inputs (P3/P4/P5) with
  the teacher FPN level of the same stride (measured from the map sizes on a probe batch); channels differ, so the
  core's 1x1 conv + BN adapters map them. A student level without a partner is one :class:`ConfigError`.
* **Predictions** (:class:`PseudoLabels`, :func:`match_to_anchors`): the teacher's detections become soft
  pseudo-labels on the student's anchor points. A point inside a teacher box and within ``radius`` strides of its
  centre (FCOS / YOLOX centre sampling; the smallest box when several qualify) gets that box's score in its class
  column and that box as its target; every other point gets 0 (background). They reach the student through the
  dense-head contract as the teacher's :class:`~detkd.distiller.DenseOutputs`: ``scores`` / ``confidence`` are the
  soft map, ``cls = logit(scores)`` (exact: ``-inf`` where the target is 0, so ``sigmoid(cls)`` is the map itself).
  Hence ``sigmoid_kd`` with ``avg_factor: teacher_score`` is a per-class (QFL-weighted) BCE against the map,
  normalised by the sum of target scores, and ``l1_giou`` is the GIoU (+ optional L1) of the student's decoded boxes
  to the matched teacher boxes weighted by the target score (0 on background points).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor, nn

from detkd.checkpoints import check_checkpoint
from detkd.config import DistillConfig
from detkd.distiller import DenseOutputs
from detkd.errors import ConfigError
from detkd.integrations import torchvision as tvkd

__all__ = ["RADIUS", "MIN_SCORE", "TorchvisionRun", "read_torchvision_checkpoint", "is_torchvision_checkpoint",
           "load_torchvision_teacher", "TorchvisionTeacher", "pad_detections", "anchor_grid", "match_to_anchors",
           "PseudoLabels", "pair_levels", "check_cross_pair", "prepare_pair", "cross_family_recipe"]

RADIUS = 2.5
"""Centre-sampling radius in strides: a student anchor point further than this from a teacher box's centre (per axis)
gets no pseudo-label from that box (YOLOX's 2.5; FCOS uses 1.5)."""
MIN_SCORE = 0.05
"""Teacher detections scoring below this are not pseudo-labels (their points stay background); the teacher's own
postprocess score threshold is set to it."""


# -- the checkpoint ---------------------------------------------------------------------------------------------------
@dataclass
class TorchvisionRun:
    """What a torchvision run's checkpoint says about its model: ``arch``, constructor ``options``, ``imgsz`` (its
    ``min_size = max_size``), class ``names`` (dataset order) and the weights (``state``)."""

    arch: str
    options: dict
    imgsz: int
    names: list[str]
    state: dict
    path: Path


def _load(path: Path) -> Any:
    """``torch.load`` weights-only on the CPU (memory-mapped: the tensors are read only when used)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # not a weights-only file (an Ultralytics checkpoint pickles model classes)
        return None


def _is_state_dict(obj: Any) -> bool:
    return (isinstance(obj, dict) and bool(obj) and all(isinstance(v, Tensor) for v in obj.values())
            and any(str(k).startswith("backbone.") for k in obj))


def _run_record(obj: Any) -> bool:
    return isinstance(obj, dict) and isinstance(obj.get("model"), dict) and isinstance(obj.get("settings"), str)


def is_torchvision_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a detkd torchvision run's checkpoint (``last.pt``: a dict with ``model`` and ``settings``;
    ``best.pt``: a detector ``state_dict``), not an Ultralytics one. Reads the pickle's globals first (an Ultralytics
    checkpoint names its model classes) and loads nothing that is not weights-only."""
    p = Path(path)
    if p.suffix.lower() != ".pt" or not p.is_file():
        return False
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(str(p))
    except Exception:
        return False
    if any(n.startswith("ultralytics") for n in names):
        return False
    obj = _load(p)
    return _run_record(obj) or _is_state_dict(obj)


def _names_of_data(data: Any) -> list[str] | None:
    """Class names of the data a run trained on (None when it cannot be read any more)."""
    try:
        from detkd.data.resolve import as_ultralytics_data

        d = yaml.safe_load(Path(as_ultralytics_data(data)).read_text()) or {}
    except Exception:
        return None
    names = d.get("names")
    if isinstance(names, dict):
        return [str(names[k]) for k in sorted(names)]
    return [str(n) for n in names] if isinstance(names, (list, tuple)) else None


def read_torchvision_checkpoint(path: str | Path) -> TorchvisionRun:
    """The model a torchvision run's ``last.pt`` / ``best.pt`` holds (see the module docstring); one ConfigError when
    the architecture or the classes cannot be found."""
    p = Path(path)
    check_checkpoint(p, "teacher")
    obj = _load(p)
    if _run_record(obj):
        record, state = obj, obj["model"]
    elif _is_state_dict(obj):
        last = p.parent / "last.pt"
        record = None
        if last.is_file() and last.resolve() != p.resolve():
            check_checkpoint(last, "teacher")
            record = _load(last)
        if not _run_record(record):
            raise ConfigError(f"teacher: {p} is a torchvision state_dict without its run: the architecture is recorded "
                              f"in the run's weights/last.pt, which is not beside it. Give that last.pt as teacher, or "
                              f"keep best.pt in its run folder")
        state = obj
    else:
        raise ConfigError(f"teacher: {p} is neither an Ultralytics checkpoint nor a detkd torchvision run's "
                          "last.pt / best.pt")
    try:
        s = yaml.safe_load(record["settings"]) or {}
        arch, imgsz = s["student"]["arch"], int(s["imgsz"])
        options = dict(s["student"].get("options") or {})
    except (yaml.YAMLError, KeyError, TypeError, ValueError):
        raise ConfigError(f"teacher: {p}: its run's settings do not name the architecture (student.arch, imgsz)")
    names = record.get("names")
    names = [str(n) for n in names] if names else _names_of_data(s.get("data"))
    if not names:
        raise ConfigError(f"teacher: {p}: the class names of its run are not recorded and its data ({s.get('data')}) "
                          "cannot be read; they are needed to check them against the student's")
    tvkd.arch_family(arch)  # an arch this detkd does not know: one named error
    return TorchvisionRun(arch, options, imgsz, names, state, p)


def load_torchvision_teacher(path: str | Path) -> TorchvisionTeacher:
    """A frozen :class:`TorchvisionTeacher` from a torchvision run's checkpoint (built offline, loaded strictly)."""
    run = read_torchvision_checkpoint(path)
    model = tvkd.build(run.arch, len(run.names), run.imgsz, **run.options)
    try:
        model.load_state_dict(run.state)
    except RuntimeError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()][1:3]
        raise ConfigError(f"teacher: {run.path} does not fit its recorded arch {run.arch} with {len(run.names)} "
                          f"classes: {' '.join(lines)[:300]}") from None
    return TorchvisionTeacher(model, run.names, run.arch, run.imgsz)


# -- the teacher on the student's batch -------------------------------------------------------------------------------
class TorchvisionTeacher(nn.Module):
    """A torchvision detector run on an Ultralytics batch: ``forward(img (N, 3, H, W) RGB 0..1) -> dict``.

    Its modules are registered under their own names (``backbone``, ``head``, ``anchor_generator``; Faster R-CNN:
    ``rpn``, ``roi_heads``), so teacher taps are ``backbone:<FPN level>`` and ``state_dict`` keys are the detector's.
    The image is normalised with the detector's ``image_mean`` / ``image_std`` and not resized. Returns
    ``{"boxes" (N, M, 4) xyxy input pixels, "scores" (N, M), "labels" (N, M) dataset class index, "valid" (N, M),
    "image_size" (H, W)}``: the detector's own postprocess (NMS, ``detections_per_img``; score threshold
    :data:`MIN_SCORE`), padded.

    ``names`` (dict index -> name) and ``nc`` are the dataset classes, for the class check against the student.
    """

    def __init__(self, model: nn.Module, names: list[str], arch: str, imgsz: int):
        super().__init__()
        self.family = tvkd.family_of(model)
        self.arch, self.imgsz = arch, int(imgsz)
        self.names = dict(enumerate(names))
        self.nc = len(names)
        self.offset = tvkd.label_offset(self.family)
        self.__dict__["detector"] = model  # the whole model, unregistered: its postprocess methods and val_map
        post = model.roi_heads if self.family == "rcnn" else model
        post.score_thresh = MIN_SCORE  # the pseudo-labels' floor (torchvision's FCOS keeps >= 0.2, SSDlite >= 0.001)
        for name, child in model.named_children():
            if name != "transform":
                self.add_module(name, child)
        t = model.transform
        self.register_buffer("mean", torch.tensor(t.image_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(t.image_std).view(1, 3, 1, 1), persistent=False)

    def extra_repr(self) -> str:
        return f"arch={self.arch}, imgsz={self.imgsz}, nc={self.nc}"

    def train(self, mode: bool = True) -> TorchvisionTeacher:
        super().train(mode)
        self.detector.training = mode  # the same modules: val_map's evaluate restores the detector's mode to this
        return self

    def features(self, img: Tensor) -> OrderedDict:
        """The backbone (+ FPN) maps of ``img``, by level key."""
        x = (img - self.mean.to(img.dtype)) / self.std.to(img.dtype)
        f = self.backbone(x)
        return OrderedDict([("0", f)]) if isinstance(f, Tensor) else f

    def forward(self, img: Tensor) -> dict:
        from torchvision.models.detection.image_list import ImageList

        feats = self.features(img)
        size = (int(img.shape[-2]), int(img.shape[-1]))
        images = ImageList(img, [size] * img.shape[0])
        if self.family == "rcnn":
            proposals, _ = self.rpn(images, feats)
            dets, _ = self.roi_heads(feats, proposals, images.image_sizes)
        else:
            dets = self._dense(images, list(feats.values()))
        out = pad_detections(dets, self.offset, self.nc)
        out["image_size"] = size
        return out

    def _dense(self, images: Any, levels: list[Tensor]) -> list[dict]:
        """RetinaNet / FCOS / SSD: head, anchors, the detector's own postprocess (in float32)."""
        head = {k: v.float() for k, v in self.head(levels).items()}
        anchors = [a.float() for a in self.anchor_generator(images, levels)]
        m = self.detector
        if self.family == "ssd":
            return m.postprocess_detections(head, anchors, images.image_sizes)
        hw = [f.shape[-2] * f.shape[-1] for f in levels]
        per_level = [n * (head["cls_logits"].shape[1] // sum(hw)) for n in hw]  # anchors per location: RetinaNet 9
        split = {k: list(v.split(per_level, dim=1)) for k, v in head.items()}
        return m.postprocess_detections(split, [list(a.split(per_level)) for a in anchors], images.image_sizes)

    @torch.no_grad()
    def val_map(self, data: Any, out_dir: Path, batch: int = 8) -> dict:
        """The teacher's COCO mAP on ``data``'s val split as its own run measures it (its transform, its imgsz):
        ``{"metrics/mAP50-95(B)": AP, "metrics/mAP50(B)": AP50}``; writes ``out_dir/detections.json``."""
        from detkd.integrations.torchvision_train import Frames, evaluate, read_splits

        y, _, va = read_splits(data)
        dev = self.mean.device
        m = evaluate(self.detector, Frames(va.images, self.nc, self.offset), y, Path(out_dir), batch, dev)
        return {"metrics/mAP50-95(B)": m["metrics/mAP50-95"], "metrics/mAP50(B)": m["metrics/mAP50"]}


def pad_detections(dets: list[dict], offset: int, nc: int) -> dict:
    """torchvision detections (one dict per image) as padded tensors: ``boxes (N, M, 4)``, ``scores (N, M)``,
    ``labels (N, M)`` (dataset class index: ``offset`` removed), ``valid (N, M)`` (a real detection of a class in
    ``0 .. nc - 1``); ``M`` = the most detections of any image."""
    from torch.nn.utils.rnn import pad_sequence

    boxes = pad_sequence([d["boxes"].float().reshape(-1, 4) for d in dets], batch_first=True)
    scores = pad_sequence([d["scores"].float().reshape(-1) for d in dets], batch_first=True)
    labels = pad_sequence([d["labels"].long().reshape(-1) - offset for d in dets], batch_first=True, padding_value=-1)
    valid = (labels >= 0) & (labels < nc)
    return {"boxes": boxes, "scores": scores, "labels": labels.clamp(0, max(nc - 1, 0)), "valid": valid}


# -- pseudo-labels on the student's anchor points ---------------------------------------------------------------------
def anchor_grid(image_size: tuple[int, int], strides: list[float], device: Any = None) -> tuple[Tensor, Tensor]:
    """The student's anchor points in input pixels, as Ultralytics orders them (level by level, row-major):
    ``points (A, 2)`` = ``((x + 0.5) s, (y + 0.5) s)`` on each level's ``ceil(H / s) x ceil(W / s)`` grid, and
    ``strides (A,)``."""
    h, w = image_size
    pts, st = [], []
    for s in strides:
        gh, gw = math.ceil(h / s), math.ceil(w / s)
        ys, xs = torch.meshgrid(torch.arange(gh, device=device, dtype=torch.float32),
                                torch.arange(gw, device=device, dtype=torch.float32), indexing="ij")
        pts.append((torch.stack((xs, ys), -1).reshape(-1, 2) + 0.5) * float(s))
        st.append(torch.full((gh * gw,), float(s), device=device))
    return torch.cat(pts), torch.cat(st)


def match_to_anchors(points: Tensor, strides: Tensor, boxes: Tensor, scores: Tensor, labels: Tensor, valid: Tensor,
                     nc: int, radius: float = RADIUS, min_score: float = MIN_SCORE) -> tuple[Tensor, Tensor]:
    """Soft pseudo-labels of padded teacher detections on anchor points (vectorised; no loop over boxes or points).

    A point ``p`` (stride ``s``) is a candidate of box ``b`` when it lies strictly inside ``b`` and
    ``max(|p - centre(b)|) < radius * s``, and ``b`` is valid with ``score >= min_score``. A point with candidates
    takes the smallest-area one (the first, i.e. the higher-scoring, on equal areas).

    Args: ``points (A, 2)``, ``strides (A,)`` px; ``boxes (N, M, 4)`` xyxy px, ``scores (N, M)``, ``labels (N, M)``
    (class index), ``valid (N, M)`` bool.

    Returns: ``target_scores (N, A, nc)``: the matched box's score in its class column, 0 elsewhere and on unmatched
    points; ``target_boxes (N, A, 4)``: the matched box, or the point's own ``s x s`` cell where unmatched (a finite
    placeholder: its target score, hence its box weight, is 0).
    """
    n, m = scores.shape
    a = points.shape[0]
    cell = torch.cat((points - strides[:, None] / 2, points + strides[:, None] / 2), -1)  # (A, 4)
    if m == 0:
        return points.new_zeros(n, a, nc), cell.expand(n, a, 4).clone()
    px, py = points[:, 0].view(1, 1, a), points[:, 1].view(1, 1, a)
    x1, y1, x2, y2 = (boxes[..., i, None] for i in range(4))  # (N, M, 1) each
    inside = (px > x1) & (px < x2) & (py > y1) & (py < y2)
    r = radius * strides.view(1, 1, a)
    near = ((px - (x1 + x2) / 2).abs() < r) & ((py - (y1 + y2) / 2).abs() < r)
    cand = inside & near & (valid & (scores >= min_score))[..., None]  # (N, M, A)
    area = ((x2 - x1) * (y2 - y1)).expand(n, m, a)
    best = torch.where(cand, area, torch.full_like(area, math.inf)).argmin(1)  # (N, A)
    hit = cand.any(1)  # (N, A)
    score = scores.gather(1, best) * hit
    target = points.new_zeros(n, a, nc)
    target.scatter_(2, labels.gather(1, best).clamp(0, nc - 1)[..., None], score[..., None])
    tb = boxes.gather(1, best[..., None].expand(n, a, 4))
    return target, torch.where(hit[..., None], tb, cell.expand(n, a, 4))


class PseudoLabels:
    """Teacher head extractor (picklable): :class:`TorchvisionTeacher`'s padded detections -> the student-layout
    :class:`~detkd.distiller.DenseOutputs` of :func:`match_to_anchors` on the student's ``strides``.

    ``scores (N, A, nc)`` and ``confidence (N, A)`` are the soft map, ``boxes (N, A, 4)`` the matched boxes and
    ``cls = logit(scores)`` (``-inf`` on zeros), so ``sigmoid(cls)`` is the map exactly."""

    def __init__(self, strides: list[float], nc: int, radius: float = RADIUS, min_score: float = MIN_SCORE):
        self.strides = [float(s) for s in strides]
        self.nc, self.radius, self.min_score = int(nc), float(radius), float(min_score)

    def __call__(self, out: dict) -> DenseOutputs:
        boxes = out["boxes"].float()
        points, strides = anchor_grid(out["image_size"], self.strides, boxes.device)
        scores, target_boxes = match_to_anchors(points, strides, boxes, out["scores"].float(), out["labels"],
                                                out["valid"], self.nc, self.radius, self.min_score)
        return DenseOutputs(cls=torch.logit(scores), boxes=target_boxes, scores=scores, confidence=scores.amax(-1))


# -- the pair: feature levels, checks, recipe -------------------------------------------------------------------------
def _fmt(levels: list[tuple[str, tuple[int, int], float]]) -> str:
    return ", ".join(f"'{k}' stride {s:g} ({h}x{w})" for k, (h, w), s in levels)


def pair_levels(student: nn.Module, teacher: TorchvisionTeacher, imgsz: int) -> tuple[list[str], list[str]]:
    """``features: auto`` across families: each student Detect input (``model.<i>``, stride ``s``) with the teacher
    FPN level (``backbone:<key>``) of the same stride, measured from the teacher's map sizes on an ``imgsz`` probe.
    One ConfigError naming the student level, its stride and the teacher's levels when one has no partner."""
    from detkd.integrations.ultralytics import detect_inputs, detect_layer

    dev = next(iter(teacher.parameters())).device
    with torch.no_grad():
        feats = teacher.features(torch.zeros(1, 3, imgsz, imgsz, device=dev))
    levels = [(k, (int(v.shape[-2]), int(v.shape[-1])), imgsz / v.shape[-2]) for k, v in feats.items()]
    s_names, t_names, used = [], [], set()
    for name, s in zip(detect_inputs(student), (float(x) for x in detect_layer(student).stride)):
        size = (math.ceil(imgsz / s), math.ceil(imgsz / s))
        key = next((k for k, hw, _ in levels if hw == size and k not in used), None)
        if key is None:
            raise ConfigError(
                f"distill.features: auto: the student's Detect input {name} (stride {s:g}, {size[0]}x{size[1]} on a "
                f"{imgsz} px batch) has no teacher level of the same stride; teacher {teacher.arch} levels: "
                f"{_fmt(levels)}. List the feature pairs by name (features: [{{student: {name}, teacher: "
                f"'backbone:{levels[0][0]}'}}, ...]; other strides are resized) or use a teacher with an FPN of the "
                f"student's strides")
        used.add(key)
        s_names.append(name)
        t_names.append(f"backbone:{key}")
    return s_names, t_names


def check_cross_pair(student: nn.Module, teacher: TorchvisionTeacher, cfg: DistillConfig) -> None:
    """One ConfigError for what a torchvision teacher cannot give a YOLO student: another mode than offline, logit /
    box methods that need the teacher's own head outputs (``kd``, ``ld``, ``bounded``), or other classes."""
    from detkd.integrations.ultralytics import check_classes

    if cfg.mode != "offline":
        raise ConfigError(f"distill.mode: {cfg.mode}: a torchvision teacher distils offline only (a trained, frozen "
                          "checkpoint)")
    if cfg.logits is not None and cfg.logits.method != "sigmoid_kd":
        raise ConfigError(f"distill.logits.method={cfg.logits.method}: a torchvision teacher's predictions reach a "
                          "YOLO student as soft pseudo-labels (a score per class on each student anchor); use "
                          "sigmoid_kd")
    if cfg.boxes is not None and cfg.boxes.method != "l1_giou":
        raise ConfigError(f"distill.boxes.method={cfg.boxes.method}: a torchvision teacher's boxes reach a YOLO "
                          "student as the decoded detections matched to its anchors (no DFL bins, no regression "
                          "targets); use l1_giou")
    if cfg.logits is not None or cfg.boxes is not None:
        check_classes(student, teacher, "logits" if cfg.logits is not None else "boxes")


def prepare_pair(student: nn.Module, teacher: TorchvisionTeacher, cfg: DistillConfig,
                 imgsz: int) -> tuple[DistillConfig, PseudoLabels]:
    """``(cfg with auto taps resolved, the teacher head extractor)`` for a YOLO student and a torchvision teacher,
    the pair checked (:func:`check_cross_pair`, :func:`pair_levels`)."""
    from detkd.integrations.ultralytics import detect_layer

    check_cross_pair(student, teacher, cfg)
    if cfg.cross_head is not None:
        raise ConfigError("distill.cross_head runs the student's features through the teacher's YOLO Detect head; a "
                          "torchvision teacher has none: remove cross_head (or use a YOLO teacher)")
    if cfg.has_auto_taps:
        cfg = cfg.with_auto_taps(*pair_levels(student, teacher, imgsz))
    if imgsz != teacher.imgsz:
        import warnings

        warnings.warn(f"teacher {teacher.arch} was trained at {teacher.imgsz} px and sees the student's {imgsz} px "
                      "batches without a resize (objects at another scale than it learned)", stacklevel=2)
    return cfg, PseudoLabels(detect_layer(student).stride.tolist(), teacher.nc)


def cross_family_recipe(teacher: Any, distill: dict) -> dict:
    """The ``distill:`` block a config without one gets: ``distill`` (the default recipe) as it is for an Ultralytics
    teacher; for a torchvision teacher its box term is ``l1_giou`` (the default ``ld`` needs the teacher's DFL bins)."""
    if isinstance(distill, dict) and isinstance(distill.get("boxes"), dict) and distill["boxes"].get("method") == "ld" \
            and teacher and is_torchvision_checkpoint(str(teacher)):
        distill = {**distill, "boxes": {**distill["boxes"], "method": "l1_giou"}}
    return distill
