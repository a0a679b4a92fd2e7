"""The `Distiller`: teacher -> student distillation for any PyTorch detector, framework-free.

Three lines in a training loop::

    kd = Distiller(student, teacher, "kd.yaml", example_inputs=images)   # + add kd.parameters() to the optimizer
    with kd.record(): loss = student_loss(student(images), targets)       # taps the student's named modules
    loss = loss + kd(images, gt_boxes=boxes, gt_valid=valid)["kd_total"]  # teacher forward + weighted terms

What it owns:

* **Feature taps** by module name (``dict(model.named_modules())``). Forward hooks exist only inside
  ``record()`` (student) and ``teacher_forward()`` (teacher), so deep copies and pickles of the student never
  carry hooks or detkd objects. ``name:0`` / ``name:key`` picks one element of a tuple/dict output.
* **Adapters**, built at construction by probing both models once on ``example_inputs`` (eval mode,
  no grad, modes restored): a 1x1 conv (+BN for ``adapter: auto|conv_bn``) when channels differ (not for
  methods that align channels themselves: MGD, FGD; not for channel-free AT), and bilinear resizing of the
  student map to the teacher's size when strides differ.
* **Dense-head signals**: the student's head output (``student_output=`` or a tap named ``head``) and the
  teacher's model output go through a ``head_extractor`` into :class:`DenseOutputs` (anchors first).
* **Weights and schedules** per term, ``stop_epoch`` (terms become exact zeros and the teacher is skipped).

The teacher is frozen (``requires_grad=False``), kept in eval mode whatever ``train()`` is called, run under
``torch.no_grad()``, and held unregistered: ``parameters()`` / ``state_dict()`` contain only adapters and
learnable loss modules (MGD generators, FGD's relation blocks). ``copy.deepcopy`` shares the frozen teacher
between copies (Ultralytics' EMA deep-copies models every run); ``pickle`` includes it (DDP workers need it).
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detkd.config import DistillConfig, FeatureTapConfig, load_config
from detkd.errors import ConfigError
from detkd.losses.boxes import box_kd_loss, bounded_regression_loss, ld_loss
from detkd.losses.logits import kd_loss, sigmoid_kd_loss
from detkd.losses.registry import FEATURE_METHODS
from detkd.schedules import Schedule

__all__ = ["Distiller", "DenseOutputs", "default_head_extractor"]


@dataclass
class DenseOutputs:
    """A dense head's outputs, anchors first: ``cls (N, A, K)`` raw logits, ``box_dist (N, A, 4, R)`` DFL
    logits or None, ``boxes (N, A, 4)`` decoded xyxy input pixels or None."""

    cls: Tensor
    box_dist: Tensor | None = None
    boxes: Tensor | None = None


def default_head_extractor(out: Any) -> DenseOutputs:
    """Accepts a `DenseOutputs` or a dict with keys ``cls`` and optional ``box_dist`` / ``boxes``."""
    if isinstance(out, DenseOutputs):
        return out
    if isinstance(out, dict) and "cls" in out:
        return DenseOutputs(out["cls"], out.get("box_dist"), out.get("boxes"))
    raise ConfigError(
        "head output is not understood: pass head_extractor= (a picklable function returning DenseOutputs) "
        f"for outputs of type {type(out).__name__}"
    )


class _Recorder:
    """Picklable forward hook: stores a module's output in a dict under a key."""

    def __init__(self, store: dict, key: str):
        self.store, self.key = store, key

    def __call__(self, module, inputs, output):
        self.store[self.key] = output


def _unwrap(model: nn.Module) -> nn.Module:
    while hasattr(model, "module") and isinstance(model.module, nn.Module):  # DDP / DataParallel
        model = model.module
    return model


def _split_name(name: str) -> tuple[str, str | None]:
    mod, _, sel = name.partition(":")
    return mod, (sel or None)


def _select(out: Any, sel: str | None, name: str) -> Tensor:
    if sel is not None:
        out = out[int(sel)] if isinstance(out, (list, tuple)) else out[sel]
    if not isinstance(out, Tensor):
        raise ConfigError(f"tap '{name}': module output is a {type(out).__name__}; name an element with '{name}:0'")
    return out


def _find_module(model: nn.Module, name: str, role: str) -> nn.Module:
    mods = dict(_unwrap(model).named_modules())
    if name not in mods:
        import difflib

        close = difflib.get_close_matches(name, list(mods), n=3, cutoff=0.5)
        hint = f"; close names: {', '.join(close)}" if close else ""
        raise ConfigError(f"{role} has no module named '{name}'{hint} (names come from model.named_modules())")
    return mods[name]


class Distiller(nn.Module):
    """Distil ``teacher`` into ``student``. See the module docstring."""

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        config: DistillConfig | dict | str,
        *,
        example_inputs: Any = None,
        head: str | None = None,
        head_extractor: Callable[[Any], DenseOutputs] | None = None,
        teacher_head_extractor: Callable[[Any], DenseOutputs] | None = None,
    ):
        super().__init__()
        self.cfg = load_config(config)
        self.__dict__["_student"] = student
        self.__dict__["_teacher"] = teacher
        self.head = head
        self.head_extractor = head_extractor or default_head_extractor
        self.teacher_head_extractor = teacher_head_extractor or self.head_extractor
        self.epoch, self.total_epochs = 0.0, None
        self._s_out: dict[str, Any] = {}
        self._t_out: dict[str, Any] = {}
        self._t_result: Any = None
        self._t_ran = False
        self.last_terms: dict[str, Tensor] = {}
        self.teacher_forwards = 0
        self._freeze_teacher()
        for tap in self.cfg.features:  # fail early on bad names
            _find_module(student, _split_name(tap.student)[0], "student")
            _find_module(teacher, _split_name(tap.teacher)[0], "teacher")
        self.adapters = nn.ModuleDict()
        self.feature_losses = nn.ModuleDict()
        if self.cfg.features:
            if example_inputs is None:
                raise ConfigError("feature distillation needs example_inputs= (one batch) to size the adapters")
            self._build(example_inputs)

    # -- references that are not submodules -------------------------------------------------------------------
    @property
    def student(self) -> nn.Module:
        return self.__dict__["_student"]

    @property
    def teacher(self) -> nn.Module | None:
        return self.__dict__["_teacher"]

    @teacher.setter
    def teacher(self, value: nn.Module | None) -> None:
        self.__dict__["_teacher"] = value
        self._freeze_teacher()

    def _freeze_teacher(self) -> None:
        t = self.teacher
        if t is not None:
            t.eval()
            for p in t.parameters():
                p.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        self._freeze_teacher()
        return self

    def __deepcopy__(self, memo):
        t = self.teacher
        if t is not None:
            memo.setdefault(id(t), t)  # the frozen teacher is shared, not copied
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        for k, v in self.__dict__.items():
            if k in ("_s_out", "_t_out"):
                new.__dict__[k] = {}
            elif k in ("_t_result", "last_terms"):
                new.__dict__[k] = None if k == "_t_result" else {}
            else:
                new.__dict__[k] = copy.deepcopy(v, memo)
        return new

    def __getstate__(self):
        state = self.__dict__.copy()
        state.update(_s_out={}, _t_out={}, _t_result=None, last_terms={}, _t_ran=False)
        return state

    # -- progress -----------------------------------------------------------------------------------------------
    def set_progress(self, epoch: float, total_epochs: float | None = None) -> None:
        self.epoch = float(epoch)
        if total_epochs is not None:
            self.total_epochs = float(total_epochs)

    @property
    def stopped(self) -> bool:
        return self.cfg.stop_epoch is not None and self.epoch >= self.cfg.stop_epoch

    def _mult(self, sched, weight: float) -> float:
        if sched is None:
            return float(weight)
        return float(weight) * Schedule(sched.kind, sched.start, sched.end, sched.warmup_epochs, sched.stop_epoch)(
            self.epoch, self.total_epochs
        )

    # -- recording ----------------------------------------------------------------------------------------------
    def _student_names(self) -> list[str]:
        names = [t.student for t in self.cfg.features]
        if self.head and (self.cfg.logits or self.cfg.boxes):
            names.append(self.head)
        return names

    @contextlib.contextmanager
    def _hooks(self, model: nn.Module, names: list[str], store: dict, role: str):
        handles = []
        try:
            for name in dict.fromkeys(names):
                mod = _find_module(model, _split_name(name)[0], role)
                handles.append(mod.register_forward_hook(_Recorder(store, _split_name(name)[0])))
            yield
        finally:
            for h in handles:
                h.remove()

    @contextlib.contextmanager
    def record(self, model: nn.Module | None = None):
        """Record the student's tapped outputs during the forward passes inside this block.

        ``model`` defaults to the student given at construction; pass the module actually run (an EMA copy, a
        DDP-wrapped student — ``.module`` is unwrapped, so names never need a ``module.`` prefix)."""
        self._s_out.clear()
        with self._hooks(model if model is not None else self.student, self._student_names(), self._s_out, "student"):
            yield self

    def teacher_forward(self, inputs: Any) -> Any:
        """Run the frozen teacher on ``inputs`` (no grad, eval mode), recording its taps; returns its output."""
        t = self.teacher
        if t is None:
            raise ConfigError("this Distiller has no teacher (it was dropped, e.g. on an EMA copy)")
        self._freeze_teacher()
        self._t_out.clear()
        with torch.no_grad(), self._hooks(t, [x.teacher for x in self.cfg.features], self._t_out, "teacher"):
            out = t(*inputs) if isinstance(inputs, (tuple, list)) else t(inputs)
        self._t_result, self._t_ran = out, True
        self.teacher_forwards += 1
        return out

    # -- construction ------------------------------------------------------------------------------------------
    def _build(self, example_inputs: Any) -> None:
        s, t = self.student, self.teacher
        s_mode, t_mode = s.training, t.training
        s.eval()
        try:
            with torch.no_grad():
                with self._hooks(s, [x.student for x in self.cfg.features], self._s_out, "student"):
                    s(*example_inputs) if isinstance(example_inputs, (tuple, list)) else s(example_inputs)
                self.teacher_forward(example_inputs)
            self.teacher_forwards = 0
            device = next(iter(s.parameters())).device if any(True for _ in s.parameters()) else None
            for i, tap in enumerate(self.cfg.features):
                sf = _select(self._s_out[_split_name(tap.student)[0]], _split_name(tap.student)[1], tap.student)
                tf = _select(self._t_out[_split_name(tap.teacher)[0]], _split_name(tap.teacher)[1], tap.teacher)
                if sf.dim() != 4 or tf.dim() != 4:
                    raise ConfigError(f"distill.features[{i}]: taps must give (N, C, H, W) maps; got "
                                      f"{tuple(sf.shape)} (student) and {tuple(tf.shape)} (teacher)")
                self.adapters[str(i)], self.feature_losses[str(i)] = self._make_tap(i, tap, sf.shape[1], tf.shape[1])
            if device is not None:
                self.to(device)
        finally:
            s.train(s_mode)
            self._s_out.clear()
            self._t_out.clear()
            self._t_result, self._t_ran = None, False
        del t_mode  # the teacher stays in eval mode

    def _make_tap(self, i: int, tap: FeatureTapConfig, sc: int, tc: int) -> tuple[nn.Module, nn.Module]:
        method = FEATURE_METHODS[tap.method]
        needs_conv = sc != tc and not method.aligns_channels and not method.channel_free
        if tap.adapter == "none" and needs_conv:
            raise ConfigError(f"distill.features[{i}]: adapter 'none' but student has {sc} channels and teacher {tc}; "
                              f"use adapter: auto")
        if tap.adapter in ("conv", "conv_bn") or (tap.adapter == "auto" and needs_conv):
            out_c = sc if method.aligns_channels else tc
            layers: list[nn.Module] = [nn.Conv2d(sc, out_c, 1, bias=tap.adapter == "conv")]
            if tap.adapter in ("auto", "conv_bn"):
                layers.append(nn.BatchNorm2d(out_c))
            adapter = nn.Sequential(*layers)
            sc = out_c
        else:
            adapter = nn.Identity()
        try:
            loss = method.build(sc, tc, **tap.options)
        except TypeError as e:
            raise ConfigError(f"distill.features[{i}].options: {e}") from e
        return adapter, loss

    # -- the terms ------------------------------------------------------------------------------------------
    def forward(
        self,
        inputs: Any = None,
        *,
        teacher_inputs: Any = None,
        student_output: Any = None,
        teacher_output: Any = None,
        gt_boxes: Tensor | None = None,
        gt_valid: Tensor | None = None,
        img_shape: tuple[int, int] | None = None,
        box_targets: Tensor | None = None,
        epoch: float | None = None,
        total_epochs: float | None = None,
    ) -> dict[str, Tensor]:
        """Weighted distillation terms ``kd_cls`` / ``kd_box`` / ``kd_feat`` (configured ones) and ``kd_total``.

        Runs the teacher on ``teacher_inputs`` (default ``inputs``) unless ``teacher_forward`` already ran this
        step or ``teacher_output`` is given. ``gt_boxes (N, M, 4)`` xyxy pixels + ``gt_valid (N, M)`` and
        ``img_shape (H, W)`` are needed by FGD; ``box_targets (N, A, 4)`` by the ``bounded`` box method.
        """
        if epoch is not None:
            self.set_progress(epoch, total_epochs)
        try:
            return self._terms(inputs, teacher_inputs, student_output, teacher_output, gt_boxes, gt_valid,
                               img_shape, box_targets)
        finally:
            self._s_out.clear()
            self._t_out.clear()
            self._t_result, self._t_ran = None, False

    def _zero(self) -> Tensor:
        p = next(iter(self.parameters()), None)
        if p is None and self.student is not None:
            p = next(iter(self.student.parameters()), None)
        return torch.zeros((), device=p.device if p is not None else None)

    def _terms(self, inputs, teacher_inputs, student_output, teacher_output, gt_boxes, gt_valid, img_shape,
               box_targets) -> dict[str, Tensor]:
        keys = [k for k, on in (("kd_cls", self.cfg.logits), ("kd_box", self.cfg.boxes),
                                ("kd_feat", self.cfg.features)) if on]
        self.last_terms = {}
        if self.stopped:
            z = self._zero()
            out = {k: z.clone() for k in keys}
            out["kd_total"] = z.clone()
            return out
        if teacher_output is None:
            if not self._t_ran:
                src = teacher_inputs if teacher_inputs is not None else inputs
                if src is None:
                    raise ConfigError("the Distiller needs the batch inputs to run the teacher: kd(images, ...)")
                self.teacher_forward(src)
            teacher_output = self._t_result
        out: dict[str, Tensor] = {}
        if self.cfg.logits or self.cfg.boxes:
            if student_output is None:
                if not self.head or self.head not in self._s_out:
                    raise ConfigError("logit/box distillation needs student_output= or a recorded 'head' module")
                student_output = self._s_out[self.head]
            s_head = self.head_extractor(student_output)
            t_head = self.teacher_head_extractor(teacher_output)
            if self.cfg.logits:
                out["kd_cls"] = self._logit_term(s_head, t_head)
            if self.cfg.boxes:
                out["kd_box"] = self._box_term(s_head, t_head, box_targets)
        if self.cfg.features:
            ctx = {"gt_boxes": gt_boxes, "gt_valid": gt_valid, "img_shape": img_shape}
            total = None
            for i, tap in enumerate(self.cfg.features):
                v = self._feature_term(i, tap, ctx)
                self.last_terms[f"kd_feat/{tap.student}"] = v.detach()
                total = v if total is None else total + v
            out["kd_feat"] = total
        out = {k: v.float().reshape(()) for k, v in out.items()}
        out["kd_total"] = sum(out.values()) if out else self._zero()
        return out

    def _feature_term(self, i: int, tap: FeatureTapConfig, ctx: dict) -> Tensor:
        s_name, s_sel = _split_name(tap.student)
        t_name, t_sel = _split_name(tap.teacher)
        if s_name not in self._s_out:
            raise ConfigError(f"student tap '{tap.student}' recorded nothing: run the student inside kd.record()")
        s = _select(self._s_out[s_name], s_sel, tap.student).float()
        t = _select(self._t_out[t_name], t_sel, tap.teacher).float().detach()
        s = self.adapters[str(i)](s)
        if s.shape[-2:] != t.shape[-2:]:
            s = F.interpolate(s, size=t.shape[-2:], mode="bilinear", align_corners=False)
        w = self._mult(tap.schedule, tap.weight)
        return self.feature_losses[str(i)](s, t, **ctx) * w

    def _logit_term(self, s: DenseOutputs, t: DenseOutputs) -> Tensor:
        c = self.cfg.logits
        temp = c.temperature
        if c.temperature_schedule is not None:
            ts = c.temperature_schedule
            temp = Schedule(ts.kind, ts.start, ts.end, ts.warmup_epochs, ts.stop_epoch)(self.epoch, self.total_epochs)
        sc, tc = s.cls.float(), t.cls.float().detach()
        if sc.shape != tc.shape:
            raise ConfigError(f"distill.logits: student logits {tuple(sc.shape)} vs teacher {tuple(tc.shape)}; "
                              "they must have the same anchors and classes")
        opts = dict(c.options)
        if opts.get("avg_factor") == "teacher_score":  # normalise like a detection loss: by the teacher's mass
            opts["avg_factor"] = tc.sigmoid().amax(-1).sum().clamp(min=1.0)
        if c.method == "kd":
            v = kd_loss(sc.transpose(1, 2), tc.transpose(1, 2), temperature=temp, **opts)
        else:
            v = sigmoid_kd_loss(sc, tc, temperature=temp, **opts)
        return v * self._mult(c.schedule, c.weight)

    def _box_term(self, s: DenseOutputs, t: DenseOutputs, box_targets: Tensor | None) -> Tensor:
        c = self.cfg.boxes
        score = t.cls.detach().float().sigmoid().amax(-1)  # (N, A) teacher confidence
        if c.method == "ld":
            if s.box_dist is None or t.box_dist is None:
                raise ConfigError("distill.boxes.method=ld needs DFL box distributions from both heads; use l1_giou")
            sd, td = s.box_dist.float(), t.box_dist.float().detach()
            if sd.shape != td.shape:
                raise ConfigError(f"distill.boxes: student box distributions {tuple(sd.shape)} vs teacher "
                                  f"{tuple(td.shape)} (reg_max or anchors differ); use l1_giou")
            r = sd.shape[-1]
            w = score.unsqueeze(-1).expand(*score.shape, 4).reshape(-1)
            opts = {"avg_factor": w.sum().clamp(min=1.0), **c.options}
            v = ld_loss(sd.reshape(-1, r), td.reshape(-1, r), temperature=c.temperature, weight=w, **opts)
        elif c.method == "l1_giou":
            if s.boxes is None or t.boxes is None:
                raise ConfigError("distill.boxes.method=l1_giou needs decoded boxes from both heads")
            v = box_kd_loss(s.boxes.float(), t.boxes.float().detach(), score, **c.options)
        else:
            if box_targets is None or s.boxes is None or t.boxes is None:
                raise ConfigError("distill.boxes.method=bounded needs decoded boxes and box_targets= (N, A, 4)")
            v = bounded_regression_loss(s.boxes.float(), t.boxes.float().detach(), box_targets.float(), **c.options)
        return v * self._mult(c.schedule, c.weight)
