"""`Distiller`: the façade that ties the parts together (see the package docstring in ``__init__.py``)."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn

from detkd.config import DistillConfig, FeatureTapConfig, load_config
from detkd.distiller import terms
from detkd.distiller.adapters import align, make_adapter, make_tap, probe_channels
from detkd.distiller.dense import DenseOutputs, default_head_extractor, float_outputs, float_tree
from detkd.distiller.taps import MODEL_OUTPUT, Taps
from detkd.distiller.teacher import TeacherRunner
from detkd.distiller.teacher_cache import TeacherCache
from detkd.distiller.util import Transient, image_shape, no_autocast, normal
from detkd.errors import ConfigError
from detkd.losses.registry import BOX_METHODS, FEATURE_METHODS, LOGIT_METHODS

__all__ = ["Distiller"]


class Distiller(nn.Module):
    """Distil a frozen ``teacher`` into ``student``::

        kd = Distiller(student, teacher, "kd.yaml", example_inputs=images)   # + add kd.parameters() to the optimizer
        with kd.record(): loss = student_loss(student(images), targets)
        loss = loss + kd(images, gt_boxes=boxes, gt_valid=valid)["kd_total"]

    Args:
        student: the model being trained (not registered as a submodule; not modified).
        teacher: the frozen teacher (not registered; set to eval mode and ``requires_grad=False``).
        config: a :class:`~detkd.config.DistillConfig`, a dict, or a YAML path.
        example_inputs: one batch (a tensor, or a tuple of positional arguments) used once to size the
            adapters; required when feature taps are configured.
        head: name of the student's dense-head module (None: the student model's own output).
        teacher_head: name of the teacher's dense-head module (default: ``head``).
        head_extractor: ``f(head output) -> DenseOutputs`` for the student (default
            :func:`~detkd.distiller.dense.default_head_extractor`); picklable (a top-level function or object).
        teacher_head_extractor: the same for the teacher (default: ``head_extractor``).
        teacher_head_fn: ``f(teacher, [feature maps]) -> head output`` (what ``teacher_head_extractor`` takes): runs
            the teacher's detection head on given inputs, one map per level; needed by ``cross_head`` (CrossKD).
        teacher_raw_modules: names of frozen-teacher modules run with their own ``training`` flag set (children in
            eval mode), for a head whose eval-mode forward adds an inference decode that ``teacher_head_extractor``
            does not need (the Ultralytics integration names its ``Detect``); only during detkd's teacher forward.

    ``parameters()`` / ``state_dict()`` hold only ``adapters``, ``feature_losses`` (MGD generators, FGD blocks) and
    ``cross_adapters`` (``cross_head``);
    ``kd.to(device)`` moves only those. Losses are float32 with autocast off. ``copy.deepcopy`` shares the frozen
    teacher (and its cache) between copies; ``pickle`` includes the teacher (DDP workers need it). Neither carries
    what a step recorded.

    ``config.mode`` (see :data:`detkd.config.MODES`):

    * ``online``: ``teacher`` is trained alongside (never frozen; its parameters are yours to put in the optimizer,
      its mode yours to set). Call ``out = kd.teacher_forward(images)`` each step (with gradients) and add the
      teacher's own detection loss on ``out``; ``kd(...)`` then reuses that run, detaches what the student <- teacher
      terms take from it and adds ``kd_mutual`` (the teacher <- student mirror of the logit / box terms, gradients
      into the teacher only) when ``online.mutual_weight`` > 0.
    * ``self``: ``teacher`` may be None: the student teaches itself, the teacher pass being the student without
      gradients on the inputs upsampled 2x (:data:`detkd.distiller.teacher.SELF_SCALE`); taps and the teacher head
      extractor say which of that pass's levels teach which of the normal pass's (the Ultralytics integration: level
      l + 1 teaches level l).

    In both, every term is 0 before ``online`` / ``self_distill`` ``warmup_epochs``.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        config: DistillConfig | dict | str,
        *,
        example_inputs: Any = None,
        head: str | None = None,
        teacher_head: str | None = None,
        head_extractor: Callable[[Any], DenseOutputs] | None = None,
        teacher_head_extractor: Callable[[Any], DenseOutputs] | None = None,
        teacher_head_fn: Callable[[nn.Module, list[Tensor]], Any] | None = None,
        teacher_raw_modules: tuple[str, ...] = (),
    ):
        super().__init__()
        self.cfg = load_config(config).require_module_names()
        self.mode = self.cfg.mode
        if self.mode == "self":
            if teacher is not None and teacher is not student:
                raise ConfigError("distill.mode: self: the student is its own teacher; pass teacher=None")
            teacher = student
        elif teacher is None:
            raise ConfigError(f"distill.mode: {self.mode} needs a teacher model")
        self.__dict__["_student"] = student  # a plain attribute: never a submodule
        self.head = head
        self.head_extractor = head_extractor or default_head_extractor
        dense = self.cfg.logits is not None or self.cfg.boxes is not None
        feats, cross = self.cfg.features, self.cfg.cross_head
        if cross is not None and teacher_head_fn is None:
            raise ConfigError("distill.cross_head runs the teacher's head on the student's features: pass "
                              "teacher_head_fn= (f(teacher, [maps]) -> head output) to the Distiller")
        self.teacher_head_fn = teacher_head_fn
        s_names, t_names = [f.student for f in feats], [f.teacher for f in feats]
        if cross is not None:
            s_names, t_names = s_names + list(cross.student), t_names + list(cross.teacher)
        self.student_taps = Taps(s_names + ([head or MODEL_OUTPUT] if dense else []), "student")
        rt = self.cfg.teacher_runtime
        if cross is not None and rt.fuse == "auto":  # the teacher's head runs with gradients on the student's maps
            rt = dataclasses.replace(rt, fuse=False)
        self.teacher_runner = TeacherRunner(teacher, rt, t_names, teacher_head if teacher_head is not None else head,
                                            teacher_head_extractor or self.head_extractor, dense, self.mode,
                                            raw_modules=teacher_raw_modules)
        self.epoch: float = 0.0
        self.total_epochs: float | None = None
        self.last_terms: dict[str, Tensor] = Transient()
        self.student_taps.check(student)  # fail early on bad names
        self.teacher_runner.taps.check(teacher)
        self.adapters = nn.ModuleDict()
        self.feature_losses = nn.ModuleDict()
        self.cross_adapters = nn.ModuleDict()
        if feats or cross is not None:
            if example_inputs is None:
                raise ConfigError("feature distillation needs example_inputs= (one batch) to size the adapters")
            self._build(example_inputs)

    def _build(self, example_inputs: Any) -> None:
        """Probe both models once (eval mode, no grad, the student's mode restored) and build each tap's modules."""
        s, mode = self.student, self.student.training
        t = self.teacher
        t_mode = t.training if t is not None and self.mode == "online" else None
        s.eval()
        if t_mode is not None:
            t.eval()  # a probe batch must not move a trained teacher's BatchNorm statistics
        try:
            feats, cross = self.cfg.features, self.cfg.cross_head
            pairs = [] if cross is None else [FeatureTapConfig(a, b) for a, b in zip(cross.student, cross.teacher)]
            channels = probe_channels(s, self.teacher_runner, list(feats) + pairs, example_inputs)
            for i, (tap, (sc, tc)) in enumerate(zip(feats, channels)):
                self.adapters[str(i)], self.feature_losses[str(i)] = make_tap(i, tap, sc, tc)
            for i, (sc, tc) in enumerate(channels[len(feats):]):
                self.cross_adapters[str(i)] = make_adapter(f"distill.cross_head (level {i})", cross.adapter, sc, tc)
            p = next(iter(s.parameters()), None)
            if p is not None:
                self.to(p.device)
        finally:
            s.train(mode)
            if t_mode is not None:
                t.train(t_mode)
            self.teacher_runner.forwards = 0
            self.reset_step()

    # -- references that are not submodules; copies ---------------------------------------------------------------
    def __setattr__(self, name: str, value: Any) -> None:
        if name in ("student", "teacher"):  # through the properties: nn.Module would register a submodule
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    @property
    def student(self) -> nn.Module:
        return self.__dict__["_student"]

    @student.setter
    def student(self, value: nn.Module) -> None:
        self.__dict__["_student"] = value

    @property
    def teacher(self) -> nn.Module | None:
        return self.teacher_runner.teacher

    @teacher.setter
    def teacher(self, value: nn.Module | None) -> None:
        self.teacher_runner.set_teacher(value)

    @property
    def teacher_head(self) -> str | None:
        return self.teacher_runner.head

    @property
    def teacher_head_extractor(self) -> Callable[[Any], DenseOutputs]:
        return self.teacher_runner.extractor

    @property
    def teacher_cache(self) -> TeacherCache | None:
        return self.teacher_runner.cache

    @property
    def teacher_forwards(self) -> int:
        """How many times the teacher ran (not counting the construction probe)."""
        return self.teacher_runner.forwards

    @property
    def cache_hits(self) -> int:
        return self.teacher_runner.cache_hits

    @property
    def cache_misses(self) -> int:
        return self.teacher_runner.cache_misses

    def train(self, mode: bool = True) -> Distiller:
        super().train(mode)
        self.teacher_runner.freeze()
        return self

    def __deepcopy__(self, memo: dict) -> Distiller:
        t = self.teacher
        if t is not None and self.mode == "offline":
            memo.setdefault(id(t), t)  # the frozen teacher is shared, not copied (a trained one is copied)
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        new.__dict__.update({k: copy.deepcopy(v, memo) for k, v in self.__dict__.items()})
        return new

    # -- progress -------------------------------------------------------------------------------------------------
    def set_progress(self, epoch: float, total_epochs: float | None = None) -> None:
        """Set the training progress used by the schedules (``epoch`` may be fractional)."""
        self.epoch = float(epoch)
        if total_epochs is not None:
            self.total_epochs = float(total_epochs)

    @property
    def stopped(self) -> bool:
        """True from ``config.stop_epoch`` on."""
        return terms.stopped(self.cfg, self.epoch)

    def multipliers(self) -> dict[str, float]:
        """Current ``weight * schedule`` of each term: ``kd_cls``, ``kd_box``, ``kd_feat/<student tap>``."""
        return terms.multipliers(self.cfg, self.epoch, self.total_epochs)

    def temperature(self) -> float:
        """The logit temperature now (``logits.temperature_schedule`` if set, else ``logits.temperature``)."""
        return terms.temperature(self.cfg, self.epoch, self.total_epochs)

    # -- one step: record the student, run the teacher, compute the terms ---------------------------------------
    @contextlib.contextmanager
    def record(self, model: nn.Module | None = None) -> Iterator[Distiller]:
        """Record the student's tapped outputs during the forward passes inside this block.

        ``model`` defaults to the student given at construction; pass the module actually run (an EMA copy, a
        DDP-wrapped student: ``.module`` is unwrapped). The hooks are removed when the block exits.
        """
        with self.student_taps.recording(model if model is not None else self.student):
            yield self

    def teacher_forward(self, inputs: Any, keys: Any = None) -> Any:
        """Run the frozen teacher on ``inputs`` (eval mode, no grad), recording its taps; returns its output.

        Call it yourself to run the teacher at a chosen point (e.g. on other inputs); ``forward`` then uses what it
        recorded instead of running the teacher again; :meth:`teacher_dense` gives its dense outputs. With
        ``teacher_runtime.inference_mode`` (the default) the returned tensors are inference tensors: ``clone()``
        them before any autograd use. If anything fails before ``forward``, call :meth:`reset_step`.

        ``keys``: one id per sample (e.g. image file names), used when ``teacher_runtime.cache`` is on: cached
        samples are not recomputed and the teacher runs only on the missing ones. Returns None when any sample
        came from the cache. Valid only if a key's teacher input never changes (no random augmentation).
        """
        return self.teacher_runner.forward(inputs, keys)

    def teacher_dense(self) -> DenseOutputs | None:
        """This step's teacher :class:`DenseOutputs` (float32, detached) after :meth:`teacher_forward`, from the live
        run or the cache; None when the cache served the step without dense outputs (no logit / box term)."""
        return self.teacher_runner.dense()

    def reset_step(self) -> None:
        """Drop what this step recorded (student taps, teacher run). ``forward`` does it on its way out."""
        self.student_taps.clear()
        self.teacher_runner.clear()

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
        teacher_keys: Any = None,
    ) -> dict[str, Tensor]:
        """The weighted distillation terms of this step.

        Args:
            inputs: the student's batch; the teacher runs on ``teacher_inputs`` (default ``inputs``) unless
                ``teacher_forward`` already ran this step (or ``teacher_output`` is given and no feature tap
                needs the teacher).
            student_output / teacher_output: dense-head outputs, instead of the recorded ones.
            gt_boxes: ``(N, M, 4)`` xyxy input pixels (or a list of ``(n_i, 4)``), with ``gt_valid (N, M)``;
                needed by FGD. ``img_shape (H, W)`` defaults to the size of a 4-D ``inputs`` tensor.
            box_targets: ``(N, A, 4)`` regression targets, for the ``bounded`` box method.
            epoch, total_epochs: shortcut for :meth:`set_progress`.
            teacher_keys: one id per sample for the teacher cache; see :meth:`teacher_forward`.

        Returns:
            ``{'kd_cls', 'kd_box', 'kd_feat'`` (the configured ones) ``, 'kd_total'}``, 0-dim float32 tensors.
            ``self.last_terms`` holds the detached breakdown (``kd_cls``, ``kd_box``, ``kd_feat/<tap>``).
        """
        if epoch is not None:
            self.set_progress(epoch, total_epochs)
        try:
            return self._terms(inputs, teacher_inputs, student_output, teacher_output, gt_boxes, gt_valid,
                               img_shape, box_targets, teacher_keys)
        finally:
            self.reset_step()

    def _terms(self, inputs, teacher_inputs, student_output, teacher_output, gt_boxes, gt_valid, img_shape,
               box_targets, teacher_keys) -> dict[str, Tensor]:
        cfg, mult, runner = self.cfg, self.multipliers(), self.teacher_runner
        keys = terms.term_keys(cfg)
        device = self._device()
        zero = torch.zeros((), dtype=torch.float32, device=device)
        self.last_terms = last = Transient()
        if all(m == 0.0 for m in mult.values()):  # stop_epoch (or all weights 0): exact zeros, no teacher
            last.update({k: zero.clone() for k in mult})
            return {**{k: zero.clone() for k in keys}, "kd_total": zero.clone()}
        needs_taps = cfg.features or cfg.cross_head is not None
        if (needs_taps or (runner.wants_dense and teacher_output is None)) and not runner.ran:
            src = teacher_inputs if teacher_inputs is not None else inputs
            if src is None:
                raise ConfigError("the Distiller needs the batch inputs to run the teacher: kd(images, ...)")
            self.teacher_forward(src, keys=teacher_keys)
        if img_shape is None:
            img_shape = image_shape(inputs) or image_shape(teacher_inputs)
        out: dict[str, Tensor] = {}
        with no_autocast(device):
            if runner.wants_dense:
                s, t = self._student_dense(student_output), runner.dense(teacher_output)
                if cfg.logits:
                    out["kd_cls"] = terms.head_term("kd_cls", LOGIT_METHODS[cfg.logits.method], cfg.logits,
                                                    self.temperature(), s, t, box_targets, mult["kd_cls"], zero)
                if cfg.boxes:
                    out["kd_box"] = terms.head_term("kd_box", BOX_METHODS[cfg.boxes.method], cfg.boxes,
                                                    cfg.boxes.temperature, s, t, box_targets, mult["kd_box"], zero)
                if cfg.cross_head is not None:
                    out["kd_cross"] = self._cross(t, box_targets, mult["kd_cross"], zero)
                if "kd_mutual" in mult:
                    out["kd_mutual"] = self._mutual(s, teacher_output, box_targets, mult, zero)
                last.update({k: out[k].detach() for k in ("kd_cls", "kd_box", "kd_cross", "kd_mutual") if k in out})
            if cfg.features:
                ctx = {"gt_boxes": gt_boxes, "gt_valid": gt_valid, "img_shape": img_shape}
                out["kd_feat"] = zero
                for i, (key, tap) in enumerate(zip(terms.feature_keys(cfg), cfg.features)):
                    v = self._feature_term(i, tap, ctx, mult[key], zero)
                    last[key] = v.detach()
                    out["kd_feat"] = out["kd_feat"] + v
        out["kd_total"] = sum((out[k] for k in keys), zero)
        return out

    def _mutual(self, s: DenseOutputs, teacher_output: Any, box_targets: Tensor | None, mult: dict[str, float],
                zero: Tensor) -> Tensor:
        """``mode: online``: the logit and box terms mirrored (teacher <- student; the student's outputs detached,
        gradients into the teacher only), each with its own multiplier times ``online.mutual_weight``."""
        m = mult["kd_mutual"]
        if m == 0.0:
            return zero
        runner = self.teacher_runner
        t = (float_outputs(runner.extractor(float_tree(teacher_output)), detach=False) if teacher_output is not None
             else runner.live_dense())
        s = float_outputs(s, detach=True)
        return self._head_pair(("kd_cls", "kd_box"), t, s, box_targets, mult.get("kd_cls", 0.0) * m,
                               mult.get("kd_box", 0.0) * m, zero)  # each used only when its term is configured

    def _head_pair(self, keys: tuple[str, str], s: DenseOutputs, t: DenseOutputs, box_targets: Tensor | None,
                   m_cls: float, m_box: float, zero: Tensor) -> Tensor:
        """The configured logit and box methods on ``s`` against ``t`` at multipliers ``m_cls`` / ``m_box``, summed
        (``keys`` name the two terms in errors)."""
        cfg, v = self.cfg, zero
        if cfg.logits:
            v = v + terms.head_term(keys[0], LOGIT_METHODS[cfg.logits.method], cfg.logits, self.temperature(), s, t,
                                    box_targets, m_cls, zero)
        if cfg.boxes:
            v = v + terms.head_term(keys[1], BOX_METHODS[cfg.boxes.method], cfg.boxes, cfg.boxes.temperature, s, t,
                                    box_targets, m_box, zero)
        return v

    def _cross(self, t: DenseOutputs, box_targets: Tensor | None, mult: float, zero: Tensor) -> Tensor:
        """``cross_head`` (CrossKD): the student's head inputs, each through its adapter (and resized to the
        teacher's map), through the teacher's head (frozen, with gradients to its inputs); the logit and box methods
        compare those outputs with the teacher's ``t``, each at multiplier 1, their sum times ``mult``."""
        if mult == 0.0:
            return zero
        cfg, runner = self.cfg, self.teacher_runner
        maps = []
        for i, (sn, tn) in enumerate(zip(cfg.cross_head.student, cfg.cross_head.teacher)):
            if not self.student_taps.has(sn):
                raise ConfigError(f"cross_head: student tap '{sn}' recorded nothing: run the student inside kd.record()")
            maps.append(align(self.cross_adapters[str(i)], self.student_taps.tensor(sn).float(), runner.tap(tn)))
        p = next(iter(self.teacher.parameters()), None)
        if p is not None and p.dtype != torch.float32:  # a half-precision teacher (teacher_runtime.half, CUDA)
            maps = [m.to(p.dtype) for m in maps]
        x = float_outputs(runner.extractor(float_tree(self.teacher_head_fn(self.teacher, maps))), detach=False)
        return self._head_pair(("kd_cross", "kd_cross"), x, t, box_targets, 1.0, 1.0, zero) * mult

    def _device(self) -> torch.device:
        for m in (self, self.student):
            p = next(iter(m.parameters()), None) if m is not None else None
            if p is not None:
                return p.device
        return torch.device("cpu")

    def _student_dense(self, student_output: Any) -> DenseOutputs:
        if student_output is None:
            name = self.head or MODEL_OUTPUT
            if not self.student_taps.has(name):
                raise ConfigError("logit/box distillation found no student head output: run the student inside "
                                  "kd.record(), or pass student_output=")
            student_output = self.student_taps.output(name, self.head or "<model output>")
        return float_outputs(self.head_extractor(student_output), detach=False)

    def _feature_term(self, i: int, tap: FeatureTapConfig, ctx: dict, mult: float, zero: Tensor) -> Tensor:
        if mult == 0.0:
            return zero
        if not self.student_taps.has(tap.student):
            raise ConfigError(f"student tap '{tap.student}' recorded nothing: run the student inside kd.record()")
        if FEATURE_METHODS[tap.method].needs_gt and (ctx["gt_boxes"] is None or ctx["img_shape"] is None):
            raise ConfigError(
                f"distill.features[{i}] ({tap.method} on '{tap.student}') needs the batch's ground-truth boxes: "
                "pass gt_boxes= (N, M, 4) xyxy input pixels (or a list of (n_i, 4)), gt_valid= (N, M) and, unless "
                "inputs is an (N, C, H, W) tensor, img_shape= (H, W)"
            )
        t = normal(self.teacher_runner.tap(tap.teacher).detach().float())
        s = align(self.adapters[str(i)], self.student_taps.tensor(tap.student).float(), t)
        return self.feature_losses[str(i)](s, t, **ctx).float().reshape(()) * mult
