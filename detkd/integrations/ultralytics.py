"""Ultralytics YOLO integration: distil logits, boxes and neck features inside Ultralytics' own trainer.

Two ways in:

* CLI: ``detkd train CONFIG.yaml [key=value ...]`` (see ``detkd/train.py``).
* Python, in an existing Ultralytics project::

      from ultralytics import YOLO
      from detkd.integrations.ultralytics import DistillTrainer
      YOLO("yolo11n.yaml").train(data="data.yaml", epochs=100, trainer=DistillTrainer,
                                 distill_model="kd.yaml")   # or distill_model="teacher.pt" for the default recipe

The channel for detkd's settings is Ultralytics' own ``distill_model`` argument (its ``get_cfg`` rejects unknown
keys): a detkd YAML with ``teacher:`` and a ``distill:`` block, a teacher ``.pt`` (default recipe), or that mapping
itself (``detkd train`` passes its parsed config). The trainer parses it once, writes it to ``<run>/distill.yaml``
beside ``args.yaml`` and points ``distill_model`` there, so ``args.yaml``, checkpoints' ``train_args`` and
``resume=True`` name the run's own copy. DDP workers rebuild the trainer from its class and args; because
Ultralytics deletes the run folder before starting them, they get the settings inline and rank 0 writes the file
again.

How it hooks in: ``DistillTrainer.get_model`` returns a :class:`KDDetectionModel`, a subclass of Ultralytics'
``DistillationModel`` so that every place Ultralytics special-cases distillation (frozen teacher, EMA without the
teacher, class weights on the student, resume) treats it as one. Its ``loss()`` runs the student with detkd's
feature taps recording, the frozen teacher without gradients, Ultralytics' detection loss, and the
:class:`~detkd.distiller.Distiller`, and returns each distillation term as its own loss item (``kd_cls``,
``kd_box``, ``kd_feat``), so they show in the progress bar and ``results.csv``.

Teacher cost options (``distill.teacher_runtime``: inference_mode, channels_last, fuse, half, cache) are applied by
the Distiller; here the image file names (``batch['im_file']``) are the cache keys, and :func:`check_teacher_cache`
refuses the cache while random augmentations are on.

Gap monitor (``detkd/integrations/ultralytics_gap.py``): the teacher is evaluated once on the val split at the start
of training (cached); every epoch ``kd/teacher_mAP50-95`` and ``kd/gap`` go into ``results.csv`` and the log, and
``distill.stop_when_gap_stalls`` stops distillation or the run when the gap stops closing.

Unlabeled frames (``detkd/integrations/ultralytics_unlabeled.py``): with ``distill.unlabeled: {source, ratio}`` the
train loader mixes unlabeled images into every batch (``batch['unlabeled']``); ``loss()`` gives Ultralytics' detection
loss of the labeled frames only and the distillation terms of all frames (FGD gets teacher boxes on unlabeled ones).

Online and self-distillation (``distill.mode``): ``online`` builds the teacher from ``teacher:`` (a model yaml, fresh
weights, or a ``.pt``), registers it in the wrapper (so it is in the optimizer), adds its own detection loss
(``t_det``) and the teacher <- student mirror of the logit / box terms (``kd_mutual``); its state goes to
``last.kd.pt`` (resume) and, at the end, to ``weights/online_teacher.pt``. ``self`` has no teacher: the student at 2x
resolution, without gradient, teaches its normal pass one pyramid level down (:class:`UltralyticsHead` ``levels`` /
``scale``). Neither has a teacher-student gap monitor.

Cross-family teacher (``detkd/integrations/cross_family.py``): ``teacher:`` may be a detkd torchvision run's
``last.pt`` / ``best.pt``; :func:`load_teacher` then returns a ``TorchvisionTeacher`` (run on the student's batch, no
resize), ``features: auto`` pairs the Detect inputs with the teacher's FPN levels of the same stride, and its detections
reach ``sigmoid_kd`` / ``l1_giou`` as soft pseudo-labels on the student's anchors.

Checkpoints (``last.pt``, ``best.pt``) hold the plain student ``DetectionModel`` only: they load with plain
Ultralytics (``yolo predict``, ``yolo export``) where detkd is not installed. The distillation state needed to
resume (adapter weights, their EMA) goes to ``weights/last.kd.pt`` beside them. Both are written atomically.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

from detkd.integrations.ultralytics_env import atomic_dataset_caches, ensure_ultralytics_offline

ensure_ultralytics_offline()

import torch  # noqa: E402
import yaml  # noqa: E402
from torch import nn  # noqa: E402
from ultralytics.models.yolo.detect import DetectionTrainer  # noqa: E402
from ultralytics.nn.distill_model import DistillationModel  # noqa: E402
from ultralytics.nn.modules.head import Detect  # noqa: E402
from ultralytics.nn.tasks import DetectionModel, load_checkpoint  # noqa: E402
from ultralytics.utils import LOGGER, RANK, YAML  # noqa: E402
from ultralytics.utils.tal import make_anchors  # noqa: E402
from ultralytics.utils.torch_utils import ModelEMA, unwrap_model  # noqa: E402

atomic_dataset_caches()  # trainings started together (detkd demo, kd_benchmark --jobs 2) scan the same labels

from detkd.checkpoints import check_checkpoint  # noqa: E402
from detkd.config import DistillConfig, load_config, resolve_unlabeled_source  # noqa: E402
from detkd.distiller import DenseOutputs, Distiller  # noqa: E402
from detkd.distiller.teacher import SELF_SCALE  # noqa: E402
from detkd.distiller.terms import term_keys  # noqa: E402
from detkd.errors import ConfigError, DetkdError  # noqa: E402
from detkd.integrations.recipes import DEFAULT_RECIPE  # noqa: E402
from detkd.integrations.ultralytics_unlabeled import labeled_loss, pseudo_boxes  # noqa: E402

__all__ = [
    "DistillTrainer",
    "KDDetectionModel",
    "UltralyticsHead",
    "load_teacher",
    "load_kd_settings",
    "write_settings",
    "detect_inputs",
    "expand_taps",
    "check_compatible",
    "check_classes",
    "num_classes",
    "detect_layer",
    "yolo_gt_boxes",
    "check_teacher_cache",
    "check_teacher_spec",
    "build_online_teacher",
]

KD_TERMS = ("kd_cls", "kd_box", "kd_feat", "kd_cross", "kd_mutual")
TEACHER_ITEM = "t_det"  # mode online: the teacher's own detection loss (sum of its box / cls / dfl items)


# ----------------------------------------------------------------------------------------------------------------
# Models: loading, inspection, compatibility
# ----------------------------------------------------------------------------------------------------------------
def detect_layer(model: nn.Module) -> Detect:
    """The model's Detect head (the last layer of an Ultralytics detection model)."""
    model = getattr(model, "student_model", model)
    layers = getattr(model, "model", None)
    if layers is not None and len(layers) and isinstance(layers[-1], Detect):
        return layers[-1]
    for m in model.modules():
        if isinstance(m, Detect):
            return m
    raise ConfigError(f"{type(model).__name__} has no Ultralytics Detect head: it is not a detection model")


def head_kind(model: nn.Module) -> str:
    """'dfl' for YOLOv8/YOLO11-style heads (reg_max > 1), 'e2e' for YOLO26-style (reg_max 1, one2one branch)."""
    d = detect_layer(model)
    if d.reg_max > 1:
        return "dfl"
    return "e2e" if getattr(d, "one2one_cv2", None) is not None else "direct"


def load_teacher(path: str | Path) -> nn.Module:
    """Load a teacher checkpoint as a frozen FP32 Ultralytics detection model, with clear errors. A detkd torchvision
    run's ``last.pt`` / ``best.pt`` gives a cross-family teacher instead
    (:class:`~detkd.integrations.cross_family.TorchvisionTeacher`)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"teacher: file not found: {p}. Train a teacher first or point 'teacher' at a .pt file")
    check_checkpoint(p, "teacher")  # refuses a pickled payload before anything is unpickled
    from detkd.integrations import cross_family

    if cross_family.is_torchvision_checkpoint(p):
        model = cross_family.load_torchvision_teacher(p)
        model.float().eval()
        for q in model.parameters():
            q.requires_grad_(False)
        return model
    try:
        model, _ = load_checkpoint(str(p))
    except Exception as e:  # torch/pickle/zip errors, Ultralytics format errors
        raise ConfigError(f"teacher: {p} could not be loaded as an Ultralytics checkpoint ({type(e).__name__}: {e})") from e
    if getattr(model, "task", "detect") != "detect" or not isinstance(model, DetectionModel):
        raise ConfigError(
            f"teacher: {p} is a {getattr(model, 'task', type(model).__name__)} model, not a detection model"
        )
    detect_layer(model)
    model.float().eval()
    for q in model.parameters():
        q.requires_grad_(False)
    return model


def check_teacher_spec(teacher: Any, mode: str) -> str | None:
    """The ``teacher:`` value for ``distill.mode``, checked: ``offline``: an existing ``.pt``; ``online``: a ``.pt``
    (goes on training) or a detection model yaml (``yolov8n.yaml``: Ultralytics' own names resolve; trained from
    scratch); ``self``: none. Returns it as a string (None for ``self``); one ConfigError otherwise."""
    given = teacher not in (None, "", False)
    if mode == "self":
        if given:
            raise ConfigError(f"teacher: {teacher}: distill.mode is self (the student teaches itself); remove teacher")
        return None
    if not given:
        hint = " or a model yaml such as yolov8n.yaml (trained alongside)" if mode == "online" else ""
        raise ConfigError(f"teacher: missing; give a teacher .pt{hint}")
    t = str(teacher)
    if mode == "online" and t.endswith((".yaml", ".yml")):
        from ultralytics.nn.tasks import guess_model_task, yaml_model_load

        try:
            task = guess_model_task(yaml_model_load(t))
        except Exception as e:  # missing file, bad YAML, no 'head'
            raise ConfigError(f"teacher: {t} is not a readable Ultralytics model yaml ({type(e).__name__}: "
                              f"{' '.join(str(e).split())[:300]})") from None
        if task != "detect":
            raise ConfigError(f"teacher: {t} is a {task} model yaml; mode online trains a detection teacher")
        return str(Path(t).resolve()) if Path(t).is_file() else t
    if not Path(t).is_file():
        hint = (" (mode online also takes a model yaml, e.g. yolov8n.yaml)" if mode == "online" else
                ". Train a teacher first, or use distill.mode: online (teacher trained alongside, e.g. "
                "teacher: yolov8n.yaml) or self (no teacher)")
        raise ConfigError(f"teacher: file not found: {t}{hint}")
    return t


def build_online_teacher(teacher: str, nc: int, names: Any, ch: int = 3) -> DetectionModel:
    """``mode: online``: a trainable detection teacher from a model yaml (fresh weights, ``nc`` classes) or a
    ``.pt`` (its weights; its classes must match), in train mode with gradients on."""
    if str(teacher).endswith((".yaml", ".yml")):
        model = DetectionModel(str(teacher), nc=nc, ch=ch, verbose=False)
    else:
        model = load_teacher(teacher)
        if not isinstance(model, DetectionModel):
            raise ConfigError(f"teacher: {teacher} is a torchvision checkpoint; distill.mode: online trains an "
                              "Ultralytics teacher (a model yaml or an Ultralytics .pt). Use mode offline")
        if detect_layer(model).nc != nc:
            raise ConfigError(f"teacher: {teacher} predicts {detect_layer(model).nc} classes but the data has {nc}; "
                              "give a model yaml to train it from scratch on this data")
    model.names = names if isinstance(names, dict) else dict(enumerate(names))
    model.float().train()
    for q in model.parameters():
        q.requires_grad_(True)
    return model


def not_detection(model: nn.Module) -> str | None:
    """None for a detection model; else what it is, e.g. ``"a segment model (Segment head)"``."""
    from ultralytics.nn.modules.head import OBB, Pose, Segment, YOLOESegment

    model = getattr(model, "student_model", model)
    layers = getattr(model, "model", None)
    head = layers[-1] if isinstance(layers, (nn.Sequential, nn.ModuleList)) and len(layers) else None
    task = getattr(model, "task", None) or "detect"
    if task == "detect" and isinstance(head, Detect) and not isinstance(head, (Segment, Pose, OBB, YOLOESegment)):
        return None
    from ultralytics.nn.tasks import guess_model_task

    if task == "detect":
        task = guess_model_task(model)
    return f"a {task} model ({type(head).__name__ if head is not None else type(model).__name__} head)"


def check_student(student: str | Path) -> None:
    """Refuse, before any training, a student that cannot be built or is not a detection model (one ConfigError).

    ``student`` is a model ``.yaml`` (from scratch; Ultralytics' own names such as ``yolov8n.yaml`` resolve) or an
    Ultralytics ``.pt`` (fine-tuning).
    """
    import re

    s = str(student)
    fix = re.sub(r"-(seg|pose|obb|cls|sem)(?=[.-]|$)", "", Path(s).name)
    hint = f" such as {fix}" if fix != Path(s).name else " (a model yaml whose head is Detect)"
    if s.endswith(".pt"):
        check_checkpoint(s, "student")
        try:
            model, _ = load_checkpoint(s)
        except Exception as e:  # torch/pickle/zip errors, Ultralytics format errors
            msg = " ".join(str(e).split())[:300]
            raise ConfigError(f"student: {s} could not be loaded as an Ultralytics checkpoint ({type(e).__name__}: "
                              f"{msg})") from None
        what = not_detection(model)
    elif s.endswith((".yaml", ".yml")):
        from ultralytics.nn.tasks import guess_model_task, yaml_model_load

        try:
            d = yaml_model_load(s)
            task = guess_model_task(d)
        except Exception as e:  # missing file, bad YAML, no 'head'
            raise ConfigError(f"student: {s} is not a readable Ultralytics model yaml ({type(e).__name__}: "
                              f"{' '.join(str(e).split())[:300]})") from None
        what = None if task == "detect" else f"a {task} model ({d['head'][-1][-2]} head)"
    else:
        raise ConfigError(f"student: {s}: expected a model .yaml (e.g. yolov8n.yaml, from scratch) or an Ultralytics "
                          ".pt checkpoint")
    if what is not None:
        raise ConfigError(f"student: {s} is {what}; detkd distils detection models only. Use a detection "
                          f"student{hint}")


def check_resumable(path: str | Path) -> dict:
    """The checkpoint dict of ``path`` when it can resume a run; else one ConfigError saying what to do instead."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"resume: checkpoint not found: {p}")
    check_checkpoint(p, "resume")
    try:
        _, ckpt = load_checkpoint(str(p))
    except Exception as e:
        raise ConfigError(f"resume: {p} could not be loaded as an Ultralytics checkpoint ({type(e).__name__}: "
                          f"{' '.join(str(e).split())[:300]})") from None
    args = ckpt.get("train_args") or {}
    run = Path(args.get("save_dir") or p.parent.parent)
    done = len((ckpt.get("train_results") or {}).get("epoch") or []) or (ckpt.get("epoch", -1) + 1)
    total = args.get("epochs")
    if ckpt.get("epoch", -1) < 0 or ckpt.get("optimizer") is None or (total and ckpt["epoch"] + 1 >= total):
        n = done or total
        raise ConfigError(
            f"run {run} already finished {n} epoch{'s' if n != 1 else ''}; nothing to resume. To train longer, start a "
            f"new run from its weights: student={p} epochs=<more> with a new name= and without resume"
        )
    return ckpt


def lock_run_dir(save_dir: str | Path):
    """Hold ``<save_dir>/.detkd.lock`` (an fcntl lock, released when the process ends); one ConfigError when another
    live process holds it. Returns the open lock file (close it to release), or None where fcntl is missing."""
    try:
        import fcntl
    except ImportError:  # Windows: no lock
        return None
    d = Path(save_dir)
    d.mkdir(parents=True, exist_ok=True)
    f = open(d / ".detkd.lock", "a+")  # noqa: SIM115 - held open for the run
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        who = " ".join(f.read().split())
        f.close()
        raise ConfigError(f"run folder {d} is in use by another training run{f' ({who})' if who else ''}: two runs "
                          "would interleave results.csv and checkpoints. Give this run another name= (or drop "
                          "exist_ok), or wait for that run to finish") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()}\n")
    f.flush()
    return f


def _names(model: nn.Module) -> list[str]:
    names = getattr(model, "names", None)
    if isinstance(names, dict):
        return [names[k] for k in sorted(names)]
    return list(names or [])


def num_classes(model: nn.Module) -> int:
    """Classes a model predicts: its Detect head's ``nc`` (a cross-family teacher: its own ``nc``)."""
    if isinstance(getattr(model, "student_model", model), DetectionModel) or getattr(model, "nc", None) is None:
        return detect_layer(model).nc
    return int(model.nc)


def check_classes(student: nn.Module, teacher: nn.Module, key: str) -> None:
    """One ConfigError when teacher and student predict other classes (number, or names / order); ``key`` is the
    ``distill.<key>`` that needs them to agree."""
    s_nc, t_nc = num_classes(student), num_classes(teacher)
    if s_nc != t_nc:
        raise ConfigError(
            f"distill.{key}: teacher has {t_nc} classes, student {s_nc}; dense logit/box distillation "
            "needs the same classes. Retrain the teacher on the student's data or disable distill.logits/boxes"
        )
    sn, tn = _names(student), _names(teacher)
    if sn and tn and sn != tn:
        raise ConfigError(
            f"distill.{key}: class names/order differ: teacher {tn} vs student {sn}. Train both on the same data yaml"
        )


def check_compatible(student: nn.Module, teacher: nn.Module, cfg: DistillConfig) -> None:
    """Raise one clear ConfigError if a configured signal cannot be used between these two models."""
    s_det, t_det = detect_layer(student), detect_layer(teacher)
    dense = [k for k, v in (("logits", cfg.logits), ("boxes", cfg.boxes)) if v is not None]
    if dense:
        check_classes(student, teacher, dense[0])
        s_str, t_str = [float(x) for x in s_det.stride], [float(x) for x in t_det.stride]
        if s_str != t_str:
            raise ConfigError(
                f"distill.{dense[0]}: teacher strides {t_str} differ from student strides {s_str}; per-anchor signals "
                "need the same levels. Use feature distillation only (remove distill.logits and distill.boxes)"
            )
    if cfg.boxes is not None and cfg.boxes.method == "ld" and s_det.reg_max != t_det.reg_max:
        raise ConfigError(
            f"distill.boxes.method=ld: teacher reg_max {t_det.reg_max} != student reg_max {s_det.reg_max} "
            "(e.g. a YOLOv8/11 teacher and a YOLO26 student); use distill.boxes.method=l1_giou instead"
        )
    if cfg.boxes is not None and cfg.boxes.method == "ld" and s_det.reg_max <= 1:
        raise ConfigError("distill.boxes.method=ld needs a DFL head (reg_max > 1); this student has reg_max 1: use l1_giou")


# Ultralytics train arguments that change a sample's pixels at random (or the batch's size), with their "off" value.
RANDOM_AUGMENTATIONS = {"mosaic": 0.0, "mixup": 0.0, "cutmix": 0.0, "copy_paste": 0.0, "hsv_h": 0.0, "hsv_s": 0.0,
                        "hsv_v": 0.0, "degrees": 0.0, "translate": 0.0, "scale": 0.0, "shear": 0.0, "perspective": 0.0,
                        "flipud": 0.0, "fliplr": 0.0, "bgr": 0.0, "multi_scale": 0.0}


def check_teacher_cache(args: Any, cfg: DistillConfig) -> None:
    """Refuse ``teacher_runtime.cache`` while Ultralytics' random augmentations are on (one clear ConfigError).

    Cached teacher outputs are only valid when an image's teacher input never changes. ``cache_force: true``
    accepts anyway (with ``cache_verify``, changed inputs are then recomputed; without it they are served
    stale). Ultralytics also applies Albumentations blur / gray / CLAHE at p=0.01 each when that package is
    installed and no ``augmentations=[]`` is given; ``cache_verify`` (default on) catches those images, so it
    must stay on unless ``cache_force`` is set.
    """
    rt = cfg.teacher_runtime
    if not rt.cache_enabled or rt.cache_force:
        return
    on = []
    for k, off in RANDOM_AUGMENTATIONS.items():
        v = getattr(args, k, off)
        if k == "scale" and isinstance(v, (list, tuple)):
            if tuple(float(x) for x in v) != (1.0, 1.0):
                on.append(f"{k}={tuple(v)}")
        elif v not in (None, False) and float(v) != off:
            on.append(f"{k}={v}")
    if on:
        raise ConfigError(
            "distill.teacher_runtime.cache: cached teacher outputs are only valid when an image's teacher input never "
            f"changes, but these random augmentations are on: {', '.join(on)}. Set them to 0 (e.g. "
            f"{' '.join(x.split('=')[0] + '=0' for x in on)}), or set distill.teacher_runtime.cache_force: true to "
            "cache anyway"
        )
    import importlib.util

    albu = importlib.util.find_spec("albumentations") is not None and getattr(args, "augmentations", None) != []
    if albu and not rt.cache_verify:
        raise ConfigError(
            "distill.teacher_runtime.cache_verify: false, but Ultralytics applies random Albumentations (blur, gray, "
            "CLAHE at p=0.01) to training images; keep cache_verify: true (changed images are recomputed), pass "
            "augmentations=[], or set cache_force: true"
        )


class UltralyticsHead:
    """Picklable head extractor: Detect's raw output -> :class:`DenseOutputs` (anchors first).

    Detect in training mode returns ``{'boxes': (N, 4R, A), 'scores': (N, K, A), 'feats': [P3, P4, P5]}``
    (YOLO26: that dict under 'one2many' and 'one2one'); in eval mode ``(decoded, raw)``. ``box_dist`` is the
    (N, A, 4, R) DFL logits when R > 1; ``boxes`` are decoded xyxy in input pixels.

    ``levels=(a, b)`` keeps the anchors of detection levels ``a .. b-1`` only; ``boxes`` are divided by ``scale`` (the
    input's size relative to the normal pass). ``distill.mode: self`` uses both: the student's levels (0, L-1) and
    the 2x pass's levels (1, L) at scale 2, so anchor i of one is anchor i of the other.
    """

    def __init__(self, stride: list[float], reg_max: int, branch: str = "one2many",
                 levels: tuple[int, int] | None = None, scale: float = 1.0):
        self.stride = torch.tensor([float(s) for s in stride])
        self.reg_max = int(reg_max)
        self.branch = branch
        self.levels = tuple(levels) if levels is not None else None
        self.scale = float(scale)

    def _anchors(self, feats: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """``make_anchors`` of these level sizes, made once per sizes / dtype / device (every step asks again)."""
        if torch.is_inference_mode_enabled():  # inference tensors could not be saved for a later backward
            return make_anchors(feats, self.stride.to(feats[0].device), 0.5)
        key = (tuple(f.shape[-2:] for f in feats), feats[0].dtype, feats[0].device)
        cache = self.__dict__.setdefault("_anchor_cache", {})
        if key not in cache:
            cache.clear()
            cache[key] = make_anchors(feats, self.stride.to(feats[0].device), 0.5)
        return cache[key]

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_anchor_cache"}

    def __call__(self, out: Any) -> DenseOutputs:
        if isinstance(out, (tuple, list)):
            out = out[1]
        if "one2many" in out:
            out = out[self.branch]
        scores, raw = out["scores"], out["boxes"]
        n, _, a = scores.shape
        cls = scores.transpose(1, 2)
        anchors, strides = self._anchors(out["feats"])  # (A, 2), (A, 1)
        if self.reg_max > 1:
            bins = raw.view(n, 4, self.reg_max, a)  # the head's own layout: softmax along dim 2 needs no copy
            dist = bins.permute(0, 3, 1, 2)  # (N, A, 4, R), a view
            proj = torch.arange(self.reg_max, device=raw.device, dtype=raw.dtype).view(1, 1, -1, 1)
            ltrb = (bins.softmax(2) * proj).sum(2).transpose(1, 2)  # (N, A, 4)
        else:
            dist = None
            ltrb = raw.view(n, 4, a).transpose(1, 2)
        lt, rb = ltrb.chunk(2, -1)
        boxes = torch.cat((anchors - lt, anchors + rb), -1) * strides
        levels, scale = getattr(self, "levels", None), getattr(self, "scale", 1.0)  # older pickles have neither
        if scale != 1.0:
            boxes = boxes / scale
        if levels is not None:
            sizes = [f.shape[-2] * f.shape[-1] for f in out["feats"]]
            a0, a1 = sum(sizes[:levels[0]]), sum(sizes[:levels[1]])
            cls, boxes = cls[:, a0:a1], boxes[:, a0:a1]
            dist = dist[:, a0:a1] if dist is not None else None
        return DenseOutputs(cls=cls, box_dist=dist, boxes=boxes)


def yolo_gt_boxes(batch: dict, img_shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Ultralytics batch labels -> padded ``(N, M, 4)`` xyxy pixel boxes and ``(N, M)`` validity, vectorised."""
    n = batch["img"].shape[0]
    device = batch["img"].device
    bidx = batch["batch_idx"].to(device).long().view(-1)
    xywh = batch["bboxes"].to(device).float().view(-1, 4)
    h, w = img_shape
    if bidx.numel() == 0:
        return torch.zeros(n, 0, 4, device=device), torch.zeros(n, 0, dtype=torch.bool, device=device)
    counts = torch.bincount(bidx, minlength=n)
    m = int(counts.max())
    order = torch.argsort(bidx, stable=True)
    bidx, xywh = bidx[order], xywh[order]
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(bidx.numel(), device=device) - starts[bidx]
    scale = torch.tensor([w, h, w, h], device=device, dtype=xywh.dtype)
    c, s = xywh[:, :2], xywh[:, 2:]
    xyxy = torch.cat((c - s / 2, c + s / 2), 1) * scale
    boxes = torch.zeros(n, m, 4, device=device)
    valid = torch.zeros(n, m, dtype=torch.bool, device=device)
    boxes[bidx, slot] = xyxy
    valid[bidx, slot] = True
    return boxes, valid


# ----------------------------------------------------------------------------------------------------------------
# Settings: the `distill_model` channel
# ----------------------------------------------------------------------------------------------------------------


def load_kd_settings(source: Any) -> tuple[Path | None, DistillConfig]:
    """Resolve Ultralytics' ``distill_model`` value to ``(teacher_path, checked DistillConfig)``; ``teacher_path`` is
    None with ``distill.mode: self`` (and may name a model yaml with ``mode: online``; see :func:`check_teacher_spec`).

    ``source`` is a teacher ``.pt`` (the default recipe, :data:`~detkd.integrations.recipes.DEFAULT_RECIPE`), a detkd
    YAML with ``teacher`` and an optional ``distill`` block (other keys, e.g. the Ultralytics settings of a ``detkd
    train`` config, are ignored here; relative paths are relative to the file), or the mapping ``{"teacher": path,
    "distill": DistillConfig | dict}`` itself (``detkd train`` hands its parsed config over this way: not parsed again).
    """
    if isinstance(source, dict):
        if "teacher" not in source:
            raise ConfigError("distill_model: a mapping needs 'teacher' (path to the teacher .pt) and 'distill'")
        distill = source.get("distill")
        cfg = load_config(copy.deepcopy(DEFAULT_RECIPE) if distill is None else distill)
        t = source["teacher"]
        return (None if t in (None, "") else Path(str(t))), cfg
    p = Path(str(source))
    if p.suffix.lower() == ".pt":
        from detkd.integrations.cross_family import cross_family_recipe

        return p, load_config(cross_family_recipe(p, copy.deepcopy(DEFAULT_RECIPE)))
    if not p.is_file():
        raise ConfigError(f"distill_model: file not found: {p} (expected a detkd YAML or a teacher .pt)")
    try:
        data = YAML.load(p) or {}
    except Exception as e:
        raise ConfigError(f"{p}: not valid YAML ({e})") from e
    distill = data.get("distill")
    self_mode = isinstance(distill, dict) and distill.get("mode") == "self"
    if "teacher" not in data and not self_mode:
        raise ConfigError(f"{p}: missing key 'teacher' (path to the teacher .pt)")
    teacher = None if data.get("teacher") in (None, "") else Path(str(data["teacher"]))
    if teacher is not None and not teacher.is_absolute():
        teacher = (p.parent / teacher) if (p.parent / teacher).exists() else teacher
    if isinstance(distill, dict) and distill.get("unlabeled"):
        distill = {**distill, "unlabeled": resolve_unlabeled_source(distill["unlabeled"], p.parent)}
    distill = copy.deepcopy(DEFAULT_RECIPE) if distill is None else distill
    return teacher, DistillConfig.from_dict(distill, source=str(p))


SETTINGS_FILE = "distill.yaml"


def write_settings(run_dir: str | Path, teacher: Path | None, cfg: DistillConfig) -> Path:
    """Write ``<run_dir>/distill.yaml`` (atomically): the teacher (absolute) and the parsed ``distill:`` block with
    every default written out and unlabeled sources absolute. ``distill_model`` points here, so ``args.yaml``, checkpoints and
    ``resume`` find the settings in the run folder itself."""
    d = cfg.to_dict()
    if cfg.unlabeled is not None:
        src = cfg.unlabeled.source
        d["unlabeled"]["source"] = ([str(Path(x).expanduser().resolve()) for x in src] if isinstance(src, list)
                                    else str(Path(src).expanduser().resolve()))
    if teacher is not None:  # absolute when it is a file (an Ultralytics model name such as yolov8n.yaml stays one)
        teacher = str(Path(teacher).resolve()) if Path(teacher).exists() else str(teacher)
    text = ("# detkd: the distillation settings of this run (parsed; every default written out). args.yaml's "
            "distill_model points here.\n" + yaml.safe_dump({"teacher": teacher, "distill": d}, sort_keys=False))
    out = Path(run_dir) / SETTINGS_FILE
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, out)
    return out


def yolo_teacher_head(teacher: nn.Module, maps: list[torch.Tensor]) -> dict:
    """The teacher's Detect head (its one-to-many branch) on ``maps``, one per level: ``{'boxes', 'scores', 'feats'}``
    as in training mode, whatever the teacher's mode (``distill.cross_head``)."""
    det = detect_layer(teacher)
    return det.forward_head(maps, **det.one2many)


def detect_inputs(model: nn.Module) -> list[str]:
    """Module names of the layers feeding the Detect head (``Detect.f``), one per level: what ``auto`` taps."""
    return [f"model.{i}" for i in detect_layer(model).f]


def expand_taps(cfg: DistillConfig, student: nn.Module, teacher: nn.Module) -> DistillConfig:
    """``cfg`` with ``features: auto`` / per-tap ``auto`` names resolved to each model's Detect inputs."""
    return cfg.with_auto_taps(detect_inputs(student), detect_inputs(teacher)) if cfg.has_auto_taps else cfg


# ----------------------------------------------------------------------------------------------------------------
# The model wrapper
# ----------------------------------------------------------------------------------------------------------------
class KDDetectionModel(DistillationModel):
    """Student + frozen teacher + :class:`Distiller`, shaped like Ultralytics' ``DistillationModel``.

    Registered submodules: ``student_model`` and ``distiller`` (adapters / MGD / FGD modules only). The teacher
    lives inside the distiller, unregistered, so it is neither in ``parameters()`` (hence not in the optimizer)
    nor in ``state_dict()``; ``teacher_model`` is a property for Ultralytics' code, and setting it to None (what
    ``ModelEMA`` does to its copy) drops the teacher from that copy.

    ``distill.mode: online``: the teacher trains, so it is also registered, as ``online_teacher``: its parameters are
    in ``parameters()`` (Ultralytics' optimizer builder puts them in the optimizer) and its own detection loss is a
    loss item (``t_det``); the EMA copy drops it like a frozen one. ``distill.mode: self``: ``teacher`` is None; the
    Distiller's teacher pass is the student at 2x, level l + 1 teaching level l (``features: auto`` taps and the head
    extractors are shifted by one level; the coarsest level has no teacher).
    """

    def __init__(self, student: DetectionModel, teacher: DetectionModel | None, distill: DistillConfig | dict,
                 imgsz: int = 640):
        nn.Module.__init__(self)
        cfg = load_config(distill)
        self.mode = cfg.mode
        s_det = detect_layer(student)
        ch = student.yaml.get("channels", 3) if isinstance(getattr(student, "yaml", None), dict) else 3
        device = next(student.parameters()).device
        example = torch.zeros(1, ch, imgsz, imgsz, device=device)
        stride, n = s_det.stride.tolist(), len(s_det.stride)
        if self.mode == "self":
            if teacher is not None and teacher is not student:
                raise ConfigError("distill.mode: self: the student is its own teacher; pass teacher=None")
            if n < 2:
                raise ConfigError(f"distill.mode: self needs a detection head with at least 2 levels; this one has {n}")
            inputs = detect_inputs(student)
            cfg = cfg.with_auto_taps(inputs[:-1], inputs[1:]) if cfg.has_auto_taps else cfg  # 2x level l+1 -> l
            check_compatible(student, student, cfg)
            teacher = None
            s_head = UltralyticsHead(stride, s_det.reg_max, levels=(0, n - 1))
            t_head = UltralyticsHead(stride, s_det.reg_max, levels=(1, n), scale=SELF_SCALE)
        else:
            if teacher is None:
                raise ConfigError(f"distill.mode: {self.mode} needs a teacher model")
            if isinstance(teacher, DetectionModel):
                cfg = expand_taps(cfg, student, teacher)
                check_compatible(student, teacher, cfg)
                t_head = UltralyticsHead(detect_layer(teacher).stride.tolist(), detect_layer(teacher).reg_max)
            else:  # a torchvision teacher (integrations/cross_family.py): FPN levels by stride, pseudo-labels
                from detkd.integrations.cross_family import prepare_pair

                cfg, t_head = prepare_pair(student, teacher, cfg, imgsz)
            teacher = teacher.to(device)
            s_head = UltralyticsHead(stride, s_det.reg_max)
        self.student_model = student
        yolo_t, raw = isinstance(teacher, DetectionModel), ()
        if yolo_t and self.mode == "offline":  # the frozen teacher's Detect skips its eval-mode decode (detkd decodes)
            det = detect_layer(teacher)
            raw = (next(n for n, m in teacher.named_modules() if m is det),)
        self.distiller = Distiller(student, teacher, cfg, example_inputs=example, head_extractor=s_head,
                                   teacher_head_extractor=t_head, teacher_head_fn=yolo_teacher_head if yolo_t else None,
                                   teacher_raw_modules=raw)
        if self.mode == "online":
            self.online_teacher = teacher  # registered: in parameters() (the optimizer) and in train() / to()
        keys = term_keys(self.distiller.cfg)
        self.kd_terms = tuple(k for k in KD_TERMS if k in keys)
        self.extra_items = (TEACHER_ITEM,) if self.mode == "online" else ()
        self.task_weight = float(cfg.task_weight)
        for k in ("yaml", "nc", "names", "stride", "args", "task", "pt_path"):
            if hasattr(student, k):
                setattr(self, k, getattr(student, k))

    # --- teacher plumbing -------------------------------------------------------------------------------------
    @property
    def teacher_model(self):  # noqa: D401 - property used by Ultralytics
        d = self.__dict__.get("_modules", {}).get("distiller")
        return d.teacher if d is not None else None

    @teacher_model.setter
    def teacher_model(self, value):
        if "_modules" in self.__dict__ and "distiller" in self._modules:
            self.distiller.teacher = value
            if value is None:
                self._modules.pop("online_teacher", None)  # ModelEMA's copy: no trained teacher either

    @property
    def frozen_teacher(self) -> bool:
        """Whether the teacher is a frozen, unregistered one (``mode: offline``) that this wrapper moves itself."""
        return getattr(self, "mode", "offline") == "offline"

    def _freeze_teacher(self):
        t = self.teacher_model
        if t is not None and self.frozen_teacher:
            t.eval()
            for q in t.parameters():
                q.requires_grad_(False)

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        t = self.teacher_model
        if t is not None and self.frozen_teacher:  # online: a registered submodule; self: the student
            t._apply(fn)
        return self

    def __getstate__(self):
        return self.__dict__.copy()

    def __setstate__(self, state):
        nn.Module.__setstate__(self, state)

    def _remove_feature_hooks(self) -> None:  # detkd registers hooks only while recording
        return None

    def _register_feature_hooks(self) -> None:
        return None

    # --- Ultralytics model API delegated to the student --------------------------------------------------------
    def set_head_attr(self, **kwargs):
        return self.student_model.set_head_attr(**kwargs)

    def fuse(self, verbose: bool = True, imgsz: int | list[int] = 640):
        return self.student_model.fuse(verbose=verbose)

    def train(self, mode: bool = True):
        nn.Module.train(self, mode)
        self._freeze_teacher()
        return self

    # --- loss ----------------------------------------------------------------------------------------------------
    def loss(self, batch: dict, preds=None):
        """Detection loss of the student plus the distillation terms, each its own loss item."""
        student = self.student_model
        unl = _unlabeled_mask(batch)
        extra = getattr(self, "extra_items", ())
        if not self.training or self.teacher_model is None:  # validation on the EMA copy (no teacher)
            if preds is None:
                preds = student(batch["img"])
            regular, items = student.loss(batch, preds) if unl is None else labeled_loss(student, batch, preds, ~unl)
            zero = torch.zeros(len(self.kd_terms) + len(extra), device=regular.device)
            items.update({k: zero[i] for i, k in enumerate(self.kd_terms + extra)})
            return torch.cat([regular, zero]), items
        img = batch["img"]
        with self.distiller.record(student):
            preds = student(img)
        # distill.unlabeled: the detection loss sees the labeled frames only; the KD terms below see every frame
        regular, items = student.loss(batch, preds) if unl is None else labeled_loss(student, batch, preds, ~unl)
        gt_boxes, gt_valid = yolo_gt_boxes(batch, tuple(img.shape[-2:]))
        keys = batch.get("im_file") if self.distiller.teacher_cache is not None else None  # teacher_runtime.cache
        own = []  # mode online: the teacher's own detection loss
        try:
            if self.mode == "online":
                own, t_items = self._teacher_step(batch)
            if unl is not None and bool(unl.any()) and self._needs_boxes():
                gt_boxes, gt_valid = self._with_pseudo_boxes(img, keys, unl, gt_boxes, gt_valid)
            terms = self.distiller(img, student_output=preds, gt_boxes=gt_boxes, gt_valid=gt_valid,
                                   img_shape=tuple(img.shape[-2:]), teacher_keys=keys)
        except BaseException:
            self.distiller.reset_step()  # a teacher run by _with_pseudo_boxes / _teacher_step must not linger
            raise
        kd = torch.stack([terms.get(k, torch.zeros((), device=img.device)).float() for k in self.kd_terms])
        for i, k in enumerate(self.kd_terms):
            items[k] = kd[i].detach()
        if own:
            items[TEACHER_ITEM] = t_items
        bs = img.shape[0]
        return torch.cat([regular * self.task_weight, kd * bs, *own]), items

    def _teacher_step(self, batch: dict) -> tuple[list[torch.Tensor], torch.Tensor]:
        """``mode: online``: run the trained teacher on the batch (with gradients; the Distiller then uses this run)
        and its own Ultralytics detection loss. Returns ``([its loss summed, shape (1,)], its items summed)``."""
        out = self.distiller.teacher_forward(batch["img"])
        loss, items = self.online_teacher.loss(batch, out)
        return [loss.sum().reshape(1)], sum(v.detach().float() for v in items.values())

    # --- distill.unlabeled: teacher boxes for the feature methods that need boxes (fgd) ---------------------------
    def _needs_boxes(self) -> bool:
        from detkd.losses.registry import FEATURE_METHODS

        d = self.distiller
        if not any(FEATURE_METHODS[t.method].needs_gt for t in d.cfg.features):
            return False
        return not all(m == 0.0 for m in d.multipliers().values())  # distillation stopped: no teacher run

    def _with_pseudo_boxes(self, img, keys, unl, gt_boxes, gt_valid):
        """``gt_boxes`` / ``gt_valid`` with the teacher's confident boxes added for the unlabeled frames (see
        :func:`~detkd.integrations.ultralytics_unlabeled.pseudo_boxes`). Runs the teacher now; the Distiller then
        uses that run instead of running it again."""
        d = self.distiller
        d.teacher_forward(img, keys=keys)
        dense = d.teacher_dense()  # from the live run, or from the teacher cache when logits / boxes are distilled
        if dense is None or dense.boxes is None:
            if not getattr(self, "_warned_pseudo", False):
                LOGGER.warning("detkd: distill.unlabeled: no teacher boxes for this batch (teacher outputs served from "
                               "teacher_runtime.cache without dense outputs); fgd treats its unlabeled frames as "
                               "background. Turn distill.logits or distill.boxes on, or the cache off")
                self._warned_pseudo = True
            return gt_boxes, gt_valid
        conf = d.cfg.unlabeled.pseudo_conf if d.cfg.unlabeled is not None else 0.5
        pb, pv = pseudo_boxes(dense.anchor_confidence(), dense.boxes, unl, conf, tuple(img.shape[-2:]))
        return torch.cat([gt_boxes, pb.to(gt_boxes.device)], 1), torch.cat([gt_valid, pv.to(gt_valid.device)], 1)


def _unlabeled_mask(batch: dict) -> torch.Tensor | None:
    """``batch['unlabeled']`` as a bool ``(N,)`` tensor on the images' device, or None when absent."""
    u = batch.get("unlabeled")
    if u is None:
        return None
    u = torch.as_tensor(u, dtype=torch.bool).view(-1).to(batch["img"].device)
    return u


class DiskFullError(DetkdError, OSError):
    """A checkpoint could not be written because the disk (or quota) is full; the previous checkpoints are intact."""


def _disk_full(e: BaseException, path: Path, last: Path, epoch: int | None) -> BaseException:
    """``e`` as a one-line :class:`DiskFullError` when it is a full disk (ENOSPC / EDQUOT, or torch's failed file
    write on a nearly full disk); else ``e`` itself."""
    import errno
    import shutil

    if isinstance(e, DetkdError):
        return e
    full = isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)
    if not full and isinstance(e, RuntimeError) and "write" in str(e).lower():
        try:
            full = shutil.disk_usage(path.parent).free < 64 * 2**20
        except OSError:
            full = False
    if not full:
        return e
    good = f"{last}{f' (epoch {epoch + 1})' if epoch is not None else ''}" if last.exists() else "none yet"
    hint = f"; free some space, then resume with resume={last}" if last.exists() else ""
    return DiskFullError(f"no space left on device writing {path}; last good checkpoint: {good}{hint}")


def _resync_nonfinite(ema: nn.Module, live: nn.Module) -> None:
    """Copy each non-finite EMA tensor from the live model where that one is finite (Ultralytics' save_model does
    this with the student's keys, which the wrapper's state dict does not have)."""
    live_sd = live.state_dict()
    for k, v in ema.state_dict().items():
        if v.is_floating_point() and not torch.isfinite(v).all() and k in live_sd and torch.isfinite(live_sd[k]).all():
            v.copy_(live_sd[k])


class DistillTrainer(DetectionTrainer):
    """Ultralytics ``DetectionTrainer`` that trains a :class:`KDDetectionModel`.

    Reads detkd settings from the ``distill_model`` train argument (a detkd YAML, a teacher ``.pt``, or the mapping
    ``{"teacher": ..., "distill": ...}``; see :func:`load_kd_settings`), parses them once, writes them to
    ``<run>/distill.yaml`` beside ``args.yaml`` and points ``distill_model`` there, so ``args.yaml``, the checkpoints'
    ``train_args`` and ``resume`` name the run's own copy.
    """

    def __init__(self, cfg=None, overrides: dict | None = None, _callbacks=None):
        from ultralytics.utils import DEFAULT_CFG

        try:
            super().__init__(cfg or DEFAULT_CFG, overrides, _callbacks)
            if os.environ.get("DETKD_THREADS"):  # Ultralytics sets 1 CPU thread on a 2-core machine; let users choose
                torch.set_num_threads(int(os.environ["DETKD_THREADS"]))
            self.kd_state_path = self.wdir / "last.kd.pt"
        except BaseException:
            self._release_run_lock()
            raise

    # --- run folder: settings, resumable check, one run at a time ------------------------------------------------
    def check_resume(self, overrides):
        """Ultralytics' resume check, after detkd's: a finished run is refused before any folder is made. Then the
        settings are read (errors before any folder is made too), the run folder is locked (``.detkd.lock``) so that
        a second run into it is refused instead of interleaving, and ``<run>/distill.yaml`` is written. Runs inside
        BaseTrainer's ``__init__``, before it saves ``args.yaml``."""
        r = self.args.resume
        if isinstance(r, (str, Path)) and str(r) not in ("True", "False", "") and Path(r).is_file():
            check_resumable(r)
        super().check_resume(overrides)
        self._load_settings()
        from ultralytics.cfg import get_save_dir

        if RANK == -1:  # DDP workers (RANK >= 0) run under their launching process's lock
            self.args.save_dir = str(get_save_dir(self.args))  # pinned: the folder locked is the folder used
            self._run_lock = lock_run_dir(self.args.save_dir)
        if RANK in {-1, 0}:
            self.args.distill_model = str(write_settings(get_save_dir(self.args), self.teacher_path, self.distill_cfg))

    def _load_settings(self) -> None:
        if not self.args.distill_model:
            raise ConfigError("DistillTrainer needs distill_model=<detkd YAML or teacher .pt>")
        self.teacher_path, self.distill_cfg = load_kd_settings(self.args.distill_model)
        spec = check_teacher_spec(self.teacher_path, self.distill_cfg.mode)
        self.teacher_path = None if spec is None else Path(spec)
        self.unlabeled = self.distill_cfg.unlabeled
        if self.unlabeled is not None and self.args.rect:
            raise ConfigError("distill.unlabeled does not work with rect=True (rectangular batches are ordered by "
                              "image shape, mixed batches by the labeled/unlabeled plan): drop rect")

    def _release_run_lock(self):
        f = self.__dict__.pop("_run_lock", None)
        if f is not None:
            f.close()

    def train(self):
        try:
            path = self.args.distill_model
            if self.ddp and not self.resume:  # Ultralytics' DDP launch deletes the run folder (distill.yaml with it)
                self.args.distill_model = self.settings()  # before the workers start: they get the settings inline
            try:
                return super().train()
            finally:
                self.args.distill_model = path
        finally:
            self._release_run_lock()

    def settings(self) -> dict:
        """The parsed settings as a ``distill_model`` mapping (see :func:`load_kd_settings`)."""
        return {"teacher": None if self.teacher_path is None else str(self.teacher_path), "distill": self.distill_cfg}

    # --- data: distill.unlabeled mixes unlabeled frames into the training batches (ultralytics_unlabeled.py) -------
    def build_dataset(self, img_path, mode="train", batch=None):
        if mode != "train" or getattr(self, "unlabeled", None) is None:
            return super().build_dataset(img_path, mode, batch)
        from ultralytics.data.utils import get_split_fraction
        from ultralytics.utils import colorstr

        from detkd.integrations.ultralytics_unlabeled import MixedDataset

        a = self.args
        fraction = 1.0 if self.data.get("complete") else get_split_fraction(a.fraction, "train")
        return MixedDataset(
            img_path=img_path, imgsz=a.imgsz, batch_size=batch, augment=True, hyp=a, rect=False,
            cache=a.cache or None, single_cls=a.single_cls or False,
            stride=max(int(unwrap_model(self.model).stride.max()), 32), pad=0.0, prefix=colorstr("train: "),
            task=a.task, classes=a.classes, data=self.data, fraction=fraction, unlabeled_files=self.unlabeled.images(),
        )

    def get_dataloader(self, dataset_path, batch_size=16, rank=0, mode="train"):
        if mode != "train" or getattr(self, "unlabeled", None) is None:
            return super().get_dataloader(dataset_path, batch_size, rank, mode)
        from ultralytics.utils.torch_utils import torch_distributed_zero_first

        from detkd.integrations.ultralytics_unlabeled import build_mixed_loader, describe

        with torch_distributed_zero_first(rank):
            dataset = self.build_dataset(dataset_path, mode, batch_size)
        loader = build_mixed_loader(dataset, batch_size, self.args.workers, self.unlabeled.ratio,
                                    seed=int(self.args.seed or 0), rank=rank, device=self.device)
        if RANK in {-1, 0}:
            LOGGER.info(describe(dataset, loader.sampler, self.unlabeled))
        return loader

    # --- model ---------------------------------------------------------------------------------------------------
    def get_model(self, cfg=None, weights=None, verbose=True):
        student = super().get_model(cfg=cfg, weights=weights, verbose=verbose)
        what = not_detection(student)
        if what is not None:
            raise ConfigError(f"student: {self.args.model} is {what}; detkd distils detection models only")
        student.args = self.args
        mode = self.distill_cfg.mode
        if mode == "offline":
            teacher = load_teacher(self.teacher_path)
        elif mode == "online":
            teacher = build_online_teacher(str(self.teacher_path), self.data["nc"], self.data["names"],
                                           self.data.get("channels", 3))
            teacher.args = self.args
        else:
            teacher = None
        imgsz = self.args.imgsz if isinstance(self.args.imgsz, int) else max(self.args.imgsz)
        model = KDDetectionModel(student, teacher, self.distill_cfg, imgsz=int(imgsz))
        check_teacher_cache(self.args, model.distiller.cfg)
        if RANK in {-1, 0} and verbose:
            d = model.distiller
            n_kd = sum(p.numel() for p in d.parameters())
            start = d.cfg.kd_start_epoch
            when = f"; distillation from epoch {int(start) + 1} (warmup_epochs {start:g})" if start else ""
            if mode == "online":
                n_t = sum(p.numel() for p in teacher.parameters())
                LOGGER.info(f"detkd: online distillation: teacher {self.teacher_path} ({n_t:,} parameters, "
                            f"{'fresh weights' if str(self.teacher_path).endswith(('.yaml', '.yml')) else 'its weights'}"
                            f") trains with the student on every batch (its detection loss: {TEACHER_ITEM}); terms "
                            f"{list(model.kd_terms)}, mutual weight {d.cfg.mutual_weight:g}{when}; "
                            f"{n_kd} distillation parameters")
            elif mode == "self":
                LOGGER.info(f"detkd: self-distillation: a no-grad pass of the student at {SELF_SCALE}x resolution "
                            f"teaches its normal pass, level l+1 -> level l; terms {list(model.kd_terms)}{when}; "
                            f"{n_kd} distillation parameters")
            else:
                LOGGER.info(f"detkd: teacher {self.teacher_path} -> student; terms {list(model.kd_terms)}; "
                            f"{n_kd} distillation parameters")
        return model

    def set_model_attributes(self):
        super().set_model_attributes()
        m = unwrap_model(self.model)
        for k in ("nc", "names", "args"):
            setattr(m.student_model, k, getattr(m, k))
            if "online_teacher" in m._modules:
                setattr(m.online_teacher, k, getattr(m, k))

    def set_class_weights(self):
        super().set_class_weights()
        m = unwrap_model(self.model)
        w = getattr(m.student_model, "class_weights", None)
        if w is not None and "online_teacher" in m._modules:  # the trained teacher's loss weighs classes alike
            m.online_teacher.class_weights = w

    def _model_train(self):
        super()._model_train()
        unwrap_model(self.model).distiller.set_progress(self.epoch, self.epochs)

    # --- teacher-student gap (detkd/integrations/ultralytics_gap.py) -------------------------------------------------
    def _setup_train(self):
        super()._setup_train()
        from detkd.integrations.ultralytics_gap import TrainerGapMonitor

        if self.distill_cfg.mode == "offline":  # a teacher in training (online) or none (self): no fixed gap
            self.gap_monitor = TrainerGapMonitor(self)  # evaluates the teacher once (cached), replays a resumed run

    def validate(self):
        metrics, fitness = super().validate()
        gm = getattr(self, "gap_monitor", None)
        return (gm.after_validate(metrics) if gm is not None else metrics), fitness

    def run_callbacks(self, event: str):
        super().run_callbacks(event)
        gm = getattr(self, "gap_monitor", None)
        if event == "on_fit_epoch_end" and gm is not None:  # not add_callback: the callbacks dict is the YOLO object's
            gm.on_fit_epoch_end(self)

    # --- checkpoints ---------------------------------------------------------------------------------------------
    def save_model(self):
        """Write plain-student checkpoints (loadable without detkd) plus ``last.kd.pt``; all writes atomic.

        Every file is written to ``<name>.tmp`` first and renamed over the old one only once all are written, so a
        failed write (a full disk) leaves the previous checkpoints intact and no ``.tmp`` behind; a full disk is
        reported as one :class:`DiskFullError` line naming the file and the last good checkpoint.
        """
        wrapper_ema, live = self.ema.ema, self.model
        model = unwrap_model(live)
        _resync_nonfinite(wrapper_ema, model)  # a NaN step poisons the EMA: Ultralytics' resync, with wrapper keys
        last, best, kd_path = self.last, self.best, self.kd_state_path
        tmp = {f: f.with_name(f.name + ".tmp") for f in (kd_path, last, best)}
        period = self.wdir / f"epoch{self.epoch}.pt"  # save_period copies (written by Ultralytics, not renamed)
        period_new = not period.exists()
        writing = kd_path
        try:
            self.wdir.mkdir(parents=True, exist_ok=True)
            import io

            buf = io.BytesIO()  # serialise first: a failing file write is then an OSError (ENOSPC), not torch's
            state = {"epoch": self.epoch, "distiller": model.distiller.state_dict(),
                     "distiller_ema": wrapper_ema.distiller.state_dict(), "distill_model": str(self.args.distill_model)}
            if "online_teacher" in model._modules:  # mode online: the teacher being trained (no EMA of it)
                state["online_teacher"] = model.online_teacher.state_dict()
            torch.save(state, buf)
            tmp[kd_path].write_bytes(buf.getvalue())
            writing = last
            self.ema.ema, self.model = wrapper_ema.student_model, model.student_model
            self.last, self.best = tmp[last], tmp[best]
            try:
                ok = super().save_model()
            finally:
                self.ema.ema, self.model, self.last, self.best = wrapper_ema, live, last, best
            for f in (last, best, kd_path):
                if tmp[f].exists():
                    writing = f
                    os.replace(tmp[f], f)
        except BaseException as e:  # nothing half-written stays behind; a full disk becomes one clear line
            if writing is last and tmp[best].exists():
                writing = best
            if writing is last and period_new and period.exists():
                writing = period
            for f in tmp.values():
                f.unlink(missing_ok=True)
            if period_new:
                period.unlink(missing_ok=True)
            err = _disk_full(e, writing, last, getattr(self, "_saved_epoch", None))
            if err is e:
                raise
            raise err from e
        self._saved_epoch = self.epoch
        return ok

    def final_eval(self):
        """Ultralytics' final validation, with its in-place optimizer stripping of last.pt / best.pt made atomic."""
        import ultralytics.engine.trainer as engine

        strip = engine.strip_optimizer

        def atomic_strip(f, s="", updates=None):
            dst = Path(s or f)
            tmp = dst.with_name(dst.name + ".tmp")
            try:
                out = strip(f, str(tmp), updates)
                if tmp.exists():
                    os.replace(tmp, dst)
                return out
            except BaseException as e:
                err = _disk_full(e, dst, self.last, getattr(self, "_saved_epoch", None))
                if err is e:
                    raise
                raise err from e
            finally:
                tmp.unlink(missing_ok=True)

        engine.strip_optimizer = atomic_strip
        try:
            out = super().final_eval()
        finally:
            engine.strip_optimizer = strip
        self._save_online_teacher()
        return out

    def _save_online_teacher(self) -> Path | None:
        """``mode: online``: the trained teacher (its last weights; no EMA) as a plain Ultralytics checkpoint,
        ``weights/online_teacher.pt`` (atomic), loadable like best.pt (``detkd eval``, ``yolo predict``, a teacher of
        a later offline run)."""
        m = unwrap_model(self.model)
        if "online_teacher" not in m._modules:
            return None
        from datetime import datetime

        from ultralytics import __version__

        t = copy.deepcopy(m.online_teacher)
        t.criterion = None
        ckpt = {"epoch": self.epoch, "model": None, "ema": t.half(), "updates": None, "optimizer": None,
                "train_args": {**vars(self.args), "distill_model": str(self.args.distill_model)},
                "date": datetime.now().isoformat(), "version": __version__}
        out = self.wdir / "online_teacher.pt"
        tmp = out.with_name(out.name + ".tmp")
        try:
            torch.save(ckpt, tmp)
            os.replace(tmp, out)
        except BaseException as e:
            tmp.unlink(missing_ok=True)
            err = _disk_full(e, out, self.last, getattr(self, "_saved_epoch", None))
            if err is e:
                raise
            raise err from e
        LOGGER.info(f"detkd: the online teacher's weights: {out}")
        return out

    def _handle_nan_recovery(self, epoch):
        """Ultralytics' NaN/Inf rollback to last.pt, for detkd's checkpoints (plain student in last.pt, distiller
        state in last.kd.pt): the upstream version expects a ``DistillationModel`` EMA with a projector."""
        import numpy as np

        loss_nan = self.loss is not None and not self.loss.isfinite()
        fitness_nan = self.fitness is not None and not np.isfinite(self.fitness)
        corrupted = RANK in {-1, 0} and bool(loss_nan or fitness_nan)
        reason = "Loss NaN/Inf" if loss_nan else "Fitness NaN/Inf"
        if RANK != -1:  # DDP: rank 0 decides for all
            import torch.distributed as dist

            flag = [corrupted if RANK == 0 else None]
            dist.broadcast_object_list(flag, 0)
            corrupted = flag[0]
        if not corrupted:
            return False
        if epoch == self.start_epoch or not self.last.exists():
            LOGGER.warning(f"{reason} detected in epoch {epoch + 1} but no earlier last.pt to roll back to; continuing")
            return False
        self.nan_recovery_attempts += 1
        if self.nan_recovery_attempts > 3:
            raise DetkdError(f"training diverged: {reason} in {self.nan_recovery_attempts} epochs in a row, each after "
                             f"rolling back to {self.last}; lower lr0 or the distillation weights, then resume")
        LOGGER.warning(f"{reason} detected (attempt {self.nan_recovery_attempts}/3), rolling back to {self.last} "
                       f"and {self.kd_state_path}...")
        self._model_train()
        _, ckpt = load_checkpoint(self.last)
        ema = ckpt["ema"].float()
        if not all(torch.isfinite(v).all() for v in ema.state_dict().values() if v.is_floating_point()):
            raise RuntimeError(f"Checkpoint {self.last} is corrupted with NaN/Inf weights")
        unwrap_model(self.model).student_model.load_state_dict(ema.state_dict())
        self._load_checkpoint_state(ckpt)  # distiller (last.kd.pt), optimizer, scaler, EMA, best fitness
        del ckpt, ema
        self.scheduler.last_epoch = epoch - 1
        return True

    def _load_checkpoint_state(self, ckpt):
        """Ultralytics' resume state, with the EMA split into plain student (last.pt) and distiller (last.kd.pt)."""
        kd = None
        if self.kd_state_path.exists():
            kd = torch.load(self.kd_state_path, map_location="cpu", weights_only=True)
            if kd.get("epoch") != ckpt.get("epoch"):
                LOGGER.warning(f"detkd: {self.kd_state_path} is from epoch {kd.get('epoch')}, last.pt from "
                               f"{ckpt.get('epoch')}; resuming with the distillation state as saved")
        else:
            LOGGER.warning(f"detkd: {self.kd_state_path} not found; resuming with freshly initialised adapters")
        model = unwrap_model(self.model)
        if kd is not None:
            model.distiller.load_state_dict(kd["distiller"])
        if "online_teacher" in model._modules:
            if kd is not None and kd.get("online_teacher") is not None:
                model.online_teacher.load_state_dict(kd["online_teacher"])
            else:
                LOGGER.warning("detkd: no online teacher state in the distillation checkpoint; the teacher starts "
                               "again from its initial weights")
        if ckpt.get("optimizer") is not None:
            for saved, group in zip(ckpt["optimizer"]["param_groups"], self.optimizer.param_groups):
                saved["fused"] = group.get("fused")
            self.optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        if self.ema and ckpt.get("ema"):
            self.ema = ModelEMA(self.model)
            self.ema.ema.student_model.load_state_dict(ckpt["ema"].float().state_dict())
            if kd is not None:
                self.ema.ema.distiller.load_state_dict(kd["distiller_ema"])
            self.ema.updates = ckpt["updates"]
        self.best_fitness = ckpt.get("best_fitness")
        self.stopper.__dict__.update(ckpt.get("stopper") or {})
