"""The `Distiller`: teacher -> student distillation for any PyTorch detector, framework-free.

Three lines in a training loop::

    kd = Distiller(student, teacher, "kd.yaml", example_inputs=images)   # + add kd.parameters() to the optimizer
    with kd.record(): loss = student_loss(student(images), targets)
    loss = loss + kd(images, gt_boxes=boxes, gt_valid=valid)["kd_total"]

``record()`` captures the student's tapped outputs during its forward; ``kd(images, ...)`` runs the frozen
teacher on the same images and returns the weighted terms ``kd_cls`` / ``kd_box`` / ``kd_feat`` (those
configured) and their sum ``kd_total``, each a 0-dim float32 tensor. ``config.task_weight`` is for the
caller to apply to its own detection loss.

What the Distiller owns:

* **Feature taps** by module name (``dict(model.named_modules())``, ``.module`` of DDP/DataParallel
  unwrapped). Forward hooks exist only inside ``record()`` (student) and ``teacher_forward()`` (teacher), so
  deep copies and pickles of the student never carry hooks or detkd objects. ``name:0`` / ``name:key``
  picks one element of a tuple/list/dict output. Captured tensors are dropped after each ``forward``.
* **Adapters**, built at construction by probing both models once on ``example_inputs`` (eval mode, no
  grad, each model's mode restored): a 1x1 conv (+ BN for ``adapter: auto | conv_bn``) when channels differ
  and the method neither aligns channels itself (MGD, FGD) nor is channel-free (AT); the student map is
  resized bilinearly to the teacher's ``H, W`` when strides differ. They live in ``self.adapters``.
* **Dense-head signals** (``logits`` / ``boxes``): the student's head output is ``student_output=``, else
  the recorded module ``head``, else the recorded output of the student model itself; the teacher's is
  ``teacher_output=``, else its module ``teacher_head`` (default: ``head``), else the teacher model's output.
  ``head_extractor`` / ``teacher_head_extractor`` turn them into :class:`DenseOutputs` (anchors first);
  they must be picklable (top-level functions or objects), never lambdas.
* **Weights and schedules**: each term is ``weight * schedule(epoch, total_epochs) * loss``. A term whose
  multiplier is 0 is not computed (an exact zero); when every multiplier is 0 (e.g. from ``stop_epoch``
  on) the teacher forward is skipped too.

The teacher is frozen (``requires_grad=False``), kept in eval mode whatever ``train()`` is called, run under
``torch.inference_mode()`` (``torch.no_grad()`` with ``teacher_runtime.inference_mode: false``), and held
unregistered: ``parameters()`` / ``state_dict()`` contain only the adapters and learnable loss modules (MGD
generators, FGD blocks); ``kd.to(device)`` moves only those. Losses are computed in float32 with autocast
disabled. ``copy.deepcopy`` shares the frozen teacher between copies (Ultralytics' EMA deep-copies models);
``pickle`` includes it (DDP workers need it).

**Teacher cost** (``config.teacher_runtime``, :class:`~detkd.config.TeacherRuntimeConfig`): ``inference_mode``,
``channels_last``, ``fuse`` (:func:`fuse_conv_bn`, once, in place), ``half`` (CUDA only) change how the teacher
runs, not what the losses see (float32, equal up to rounding). ``cache`` keeps each sample's teacher tensors
(the selected teacher taps and the teacher's :class:`DenseOutputs`) in a :class:`TeacherCache` keyed by the ids
passed as ``teacher_forward(x, keys=...)`` / ``kd(x, teacher_keys=...)``: when every sample of a batch is cached
the teacher does not run; otherwise it runs on the missing samples only. This is only valid when a sample's
teacher input never changes (no random augmentation); ``cache_verify`` (default on) fingerprints each input
and treats a changed one as a miss. ``teacher_forwards``, ``cache_hits`` and ``cache_misses`` count the work.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detkd.config import DistillConfig, FeatureTapConfig, load_config
from detkd.errors import ConfigError
from detkd.losses.registry import BOX_METHODS, FEATURE_METHODS, LOGIT_METHODS
from detkd.schedules import Schedule
from detkd.teacher_runtime import (  # noqa: F401  (fuse_conv_bn, TeacherCache: re-exported)
    TeacherCache,
    _call,
    _first_tensor,
    _fingerprint,
    _fp_match,
    _no_autocast,
    _split_name,
    _take,
    _teacher_inputs,
    fuse_conv_bn,
)

__all__ = ["Distiller", "DenseOutputs", "default_head_extractor", "fuse_conv_bn", "TeacherCache"]

MODEL_OUTPUT = ""  # the root module's name in named_modules(): its hook records the model output


@dataclass
class DenseOutputs:
    """A dense head's outputs, anchors first.

    Attributes:
        cls: ``(N, A, K)`` raw class logits.
        box_dist: ``(N, A, 4, R)`` DFL bin logits (ltrb sides), or None.
        boxes: ``(N, A, 4)`` decoded ``xyxy`` boxes in input pixels, or None.
    """

    cls: Tensor
    box_dist: Tensor | None = None
    boxes: Tensor | None = None


def default_head_extractor(out: Any) -> DenseOutputs:
    """Accepts a :class:`DenseOutputs`, or a dict with key ``cls`` and optional ``box_dist`` / ``boxes``."""
    if isinstance(out, DenseOutputs):
        return out
    if isinstance(out, dict) and "cls" in out:
        return DenseOutputs(out["cls"], out.get("box_dist"), out.get("boxes"))
    raise ConfigError(
        f"head output of type {type(out).__name__} is not understood: pass head_extractor= (a picklable "
        "top-level function returning DenseOutputs), or have the head return a dict with 'cls' (N, A, K) "
        "and optional 'box_dist' (N, A, 4, R) / 'boxes' (N, A, 4)"
    )


def _normal(x: Tensor) -> Tensor:
    """``x``, or a clone of it when it is an inference tensor (autograd may not save those for backward)."""
    return x.clone() if x.is_inference() else x


def _float_outputs(d: DenseOutputs, detach: bool) -> DenseOutputs:
    def f(x: Tensor | None) -> Tensor | None:
        if x is None:
            return None
        x = x.detach() if detach else x
        return _normal(x.float())

    return DenseOutputs(f(d.cls), f(d.box_dist), f(d.boxes))


_DENSE_FIELDS = ("cls", "box_dist", "boxes")


def _float_tree(x: Any) -> Any:
    """float16 / bfloat16 tensors of a (tuple / list / dict) output as float32, so a head extractor decodes a
    half-precision teacher's output in float32 (box coordinates in float16 have 0.5 px steps above 512 px)."""
    if isinstance(x, Tensor):
        return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    if isinstance(x, dict):
        return {k: _float_tree(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)) and not hasattr(x, "_fields"):
        return type(x)(_float_tree(v) for v in x)
    return x


class _Recorder:
    """Forward hook storing a module's output in ``store[key]``.

    It exists only inside ``record()`` / ``teacher_forward()``. A copy or pickle of a model taken while it is
    registered (e.g. a deep copy inside the ``record()`` block) gets an inert recorder: no store, no captured
    tensors, nothing recorded.
    """

    def __init__(self, store: dict | None, key: str):
        self.store, self.key = store, key

    def __call__(self, module: nn.Module, inputs: Any, output: Any) -> None:
        if self.store is not None:
            self.store[self.key] = output

    def __deepcopy__(self, memo: dict) -> _Recorder:
        return _Recorder(None, self.key)

    def __reduce__(self):
        return _Recorder, (None, self.key)


def _unwrap(model: nn.Module) -> nn.Module:
    """The module inside DDP / DataParallel (``.module``) or ``torch.compile`` (``._orig_mod``) wrappers."""
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def _pick(out: Any, sel: str | None, name: str) -> Any:
    if sel is None:
        return out
    if not isinstance(out, (list, tuple, dict)):
        raise ConfigError(f"tap '{name}': the module output is a {type(out).__name__}, not a tuple/list/dict; "
                          f"drop ':{sel}'")
    try:
        if isinstance(out, dict):
            return out[sel] if sel in out or not sel.isdigit() else out[int(sel)]
        return out[int(sel)]
    except (IndexError, KeyError, ValueError, TypeError) as e:
        raise ConfigError(f"tap '{name}': cannot take element {sel!r} of a {type(out).__name__} output ({e})") from e


def _select(out: Any, sel: str | None, name: str) -> Tensor:
    out = _pick(out, sel, name)
    if not isinstance(out, Tensor):
        hint = f"'{name}:0'" if isinstance(out, (list, tuple)) else f"'{name}:<key>'"
        raise ConfigError(f"tap '{name}': module output is a {type(out).__name__}, not a tensor; name one element "
                          f"with {hint}")
    return out


def _find_module(model: nn.Module, name: str, role: str) -> nn.Module:
    mods = dict(_unwrap(model).named_modules())
    if name not in mods:
        import difflib

        close = difflib.get_close_matches(name, [m for m in mods if m], n=3, cutoff=0.5)
        hint = f"; close names: {', '.join(close)}" if close else ""
        raise ConfigError(f"{role} has no module named '{name}'{hint} (names come from model.named_modules())")
    return mods[name]


def _image_shape(inputs: Any) -> tuple[int, int] | None:
    if isinstance(inputs, (tuple, list)) and inputs:
        inputs = inputs[0]
    if isinstance(inputs, Tensor) and inputs.dim() == 4:
        return int(inputs.shape[-2]), int(inputs.shape[-1])
    return None


class Distiller(nn.Module):
    """Distil a frozen ``teacher`` into ``student``; see the module docstring.

    Args:
        student: the model being trained (not registered as a submodule; not modified).
        teacher: the frozen teacher (not registered; set to eval mode and ``requires_grad=False``).
        config: a :class:`~detkd.config.DistillConfig`, a dict, or a YAML path.
        example_inputs: one batch (a tensor, or a tuple of positional arguments) used once to size the
            adapters; required when feature taps are configured.
        head: name of the student's dense-head module (None: the student model's own output).
        teacher_head: name of the teacher's dense-head module (default: ``head``).
        head_extractor: ``f(head output) -> DenseOutputs`` for the student (default
            :func:`default_head_extractor`).
        teacher_head_extractor: the same for the teacher (default: ``head_extractor``).
    """

    _TRANSIENT = ("_s_out", "_t_out", "_t_result", "_t_ran", "_t_taps", "_t_dense", "last_terms")

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
    ):
        super().__init__()
        self.cfg = load_config(config)
        self.__dict__["_student"] = student  # plain attributes: never submodules
        self.__dict__["_teacher"] = teacher
        self.head = head
        self.teacher_head = teacher_head if teacher_head is not None else head
        self.head_extractor = head_extractor or default_head_extractor
        self.teacher_head_extractor = teacher_head_extractor or self.head_extractor
        self.epoch: float = 0.0
        self.total_epochs: float | None = None
        self.teacher_forwards = 0  # how many times the teacher ran (not counting the construction probe)
        self.cache_hits = self.cache_misses = 0  # samples served from / missing in the teacher cache
        self._fused_teacher: int | None = None  # id() of the teacher already fused (teacher_runtime.fuse)
        self.teacher_cache = self._new_cache()
        self._reset()
        self.last_terms: dict[str, Tensor] = {}
        self._freeze_teacher()
        for name in self._student_names():  # fail early on bad names
            _find_module(student, _split_name(name)[0], "student")
        for name in self._teacher_names():
            _find_module(teacher, _split_name(name)[0], "teacher")
        self.adapters = nn.ModuleDict()
        self.feature_losses = nn.ModuleDict()
        if self.cfg.features:
            if example_inputs is None:
                raise ConfigError("feature distillation needs example_inputs= (one batch) to size the adapters")
            self._build(example_inputs)

    # -- references that are not submodules ------------------------------------------------------------------
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
        return self.__dict__["_teacher"]

    @teacher.setter
    def teacher(self, value: nn.Module | None) -> None:
        if value is not None and value is not self.__dict__.get("_teacher"):
            self._fused_teacher = None
            self.teacher_cache = self._new_cache()  # a new cache: copies may still share the old one
        self.__dict__["_teacher"] = value
        self._freeze_teacher()

    def _new_cache(self) -> TeacherCache | None:
        rt = self.cfg.teacher_runtime
        if not rt.cache_enabled:
            return None
        return TeacherCache(rt.cache, rt.cache_max_items, rt.cache_max_bytes, rt.cache_offload)

    def _freeze_teacher(self) -> None:
        t = self.teacher
        if t is not None:
            t.eval()
            for p in t.parameters():
                p.requires_grad_(False)

    def train(self, mode: bool = True) -> Distiller:
        super().train(mode)
        self._freeze_teacher()
        return self

    def _reset(self) -> None:
        self._s_out: dict[str, Any] = {}
        self._t_out: dict[str, Any] = {}
        self._t_result: Any = None
        self._t_ran = False
        self._t_taps: dict[str, Tensor] = {}  # teacher taps by tap name, when they came through the cache
        self._t_dense: DenseOutputs | None = None  # the teacher's dense outputs, likewise

    def __deepcopy__(self, memo: dict) -> Distiller:
        t = self.teacher
        if t is not None:
            memo.setdefault(id(t), t)  # the frozen teacher is shared, not copied
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        for k, v in self.__dict__.items():
            if k not in self._TRANSIENT:
                new.__dict__[k] = copy.deepcopy(v, memo)
        new._reset()
        new.last_terms = {}
        return new

    def __getstate__(self) -> dict:
        state = {k: v for k, v in self.__dict__.items() if k not in self._TRANSIENT}
        state.update(_s_out={}, _t_out={}, _t_result=None, _t_ran=False, _t_taps={}, _t_dense=None, last_terms={})
        return state

    # -- progress ----------------------------------------------------------------------------------------------
    def set_progress(self, epoch: float, total_epochs: float | None = None) -> None:
        """Set the training progress used by the schedules (``epoch`` may be fractional)."""
        self.epoch = float(epoch)
        if total_epochs is not None:
            self.total_epochs = float(total_epochs)

    @property
    def stopped(self) -> bool:
        """True from ``config.stop_epoch`` on."""
        return self.cfg.stop_epoch is not None and self.epoch >= self.cfg.stop_epoch

    def _mult(self, sched: Schedule | None, weight: float) -> float:
        if self.stopped:
            return 0.0
        return float(weight) * (sched(self.epoch, self.total_epochs) if sched is not None else 1.0)

    def multipliers(self) -> dict[str, float]:
        """Current ``weight * schedule`` of each term: ``kd_cls``, ``kd_box``, ``kd_feat/<student tap>``."""
        out: dict[str, float] = {}
        if self.cfg.logits:
            out["kd_cls"] = self._mult(self.cfg.logits.schedule, self.cfg.logits.weight)
        if self.cfg.boxes:
            out["kd_box"] = self._mult(self.cfg.boxes.schedule, self.cfg.boxes.weight)
        for key, tap in zip(self._feature_keys(), self.cfg.features):
            out[key] = self._mult(tap.schedule, tap.weight)
        return out

    def temperature(self) -> float:
        """The logit temperature now (``logits.temperature_schedule`` if set, else ``logits.temperature``)."""
        c = self.cfg.logits
        if c is None:
            raise ConfigError("no distill.logits configured")
        if c.temperature_schedule is not None:
            return c.temperature_schedule(self.epoch, self.total_epochs)
        return c.temperature

    def _feature_keys(self) -> list[str]:
        keys: list[str] = []
        for i, tap in enumerate(self.cfg.features):
            k = f"kd_feat/{tap.student}"
            keys.append(k if k not in keys else f"{k}#{i}")
        return keys

    # -- recording -------------------------------------------------------------------------------------------
    @property
    def _dense(self) -> bool:
        return self.cfg.logits is not None or self.cfg.boxes is not None

    def _student_names(self) -> list[str]:
        names = [t.student for t in self.cfg.features]
        if self._dense:
            names.append(self.head or MODEL_OUTPUT)
        return names

    def _teacher_names(self) -> list[str]:
        names = [t.teacher for t in self.cfg.features]
        if self._dense and self.teacher_head:
            names.append(self.teacher_head)
        return names

    @contextlib.contextmanager
    def _hooks(self, model: nn.Module, names: list[str], store: dict, role: str) -> Iterator[None]:
        handles = []
        try:
            for mod_name in dict.fromkeys(_split_name(n)[0] for n in names):
                mod = _find_module(model, mod_name, role)
                handles.append(mod.register_forward_hook(_Recorder(store, mod_name)))
            yield
        finally:
            for h in handles:
                h.remove()

    @contextlib.contextmanager
    def record(self, model: nn.Module | None = None) -> Iterator[Distiller]:
        """Record the student's tapped outputs during the forward passes inside this block.

        ``model`` defaults to the student given at construction; pass the module actually run (an EMA copy, a
        DDP-wrapped student: ``.module`` is unwrapped, so names never need a ``module.`` prefix). The hooks
        are removed when the block exits, also on an exception.
        """
        self._s_out.clear()
        with self._hooks(model if model is not None else self.student, self._student_names(), self._s_out,
                         "student"):
            yield self

    def teacher_forward(self, inputs: Any, keys: Any = None) -> Any:
        """Run the frozen teacher on ``inputs`` (eval mode, no grad), recording its taps; returns its output.

        Call it yourself to run the teacher at a chosen point (e.g. on other inputs); ``forward`` then uses
        what it recorded instead of running the teacher again. With ``teacher_runtime.inference_mode`` (the
        default) the returned tensors are inference tensors: ``clone()`` them before any autograd use.

        ``keys``: one id per sample (e.g. image file names), used when ``teacher_runtime.cache`` is on: cached
        samples are not recomputed and the teacher runs only on the missing ones. Returns None when any sample
        came from the cache. Valid only if a key's teacher input never changes (see the module docstring).
        """
        t = self.teacher
        if t is None:
            raise ConfigError("this Distiller has no teacher (it was dropped, e.g. on an EMA copy)")
        self._freeze_teacher()
        if keys is None or self.teacher_cache is None:
            return self._run_teacher(t, inputs)
        return self._cached_teacher_forward(t, inputs, keys)

    def _run_teacher(self, t: nn.Module, inputs: Any) -> Any:
        rt = self.cfg.teacher_runtime
        dtype = self._prepare_teacher(t, inputs)
        x = _teacher_inputs(inputs, dtype, rt.channels_last)
        grad = torch.inference_mode() if rt.inference_mode else torch.no_grad()
        amp = torch.autocast("cuda", dtype=dtype) if dtype is not None else contextlib.nullcontext()
        self._t_out.clear()
        self._t_taps, self._t_dense = {}, None
        with grad, amp, self._hooks(t, self._teacher_names(), self._t_out, "teacher"):
            out = _call(t, x)
        self._t_result, self._t_ran = out, True
        self.teacher_forwards += 1
        return out

    def _prepare_teacher(self, t: nn.Module, inputs: Any) -> torch.dtype | None:
        """Apply fuse / half / channels_last to the teacher (each only when not yet done); returns the
        reduced-precision dtype it runs in on CUDA, or None."""
        rt = self.cfg.teacher_runtime
        p = next(iter(t.parameters()), None)
        if p is None:
            return None
        if rt.fuse and self._fused_teacher != id(t):
            low = p.dtype if p.dtype in (torch.float16, torch.bfloat16) else None  # a teacher already in half
            fuse_conv_bn(t, _teacher_inputs(inputs, low, False), keep=self._teacher_names())
            self._fused_teacher = id(t)
            self._freeze_teacher()
        if p.device.type != "cuda":
            if rt.half is True:
                raise ConfigError(f"teacher_runtime.half: true needs the teacher on a CUDA device; it is on "
                                  f"{p.device}. Use half: auto (float16 on CUDA only) or false")
        elif p.dtype == torch.float32:
            if rt.half is True:
                t.half()
            elif rt.half == "auto" and torch.is_autocast_enabled("cuda"):
                t.to(torch.get_autocast_dtype("cuda"))
        if rt.channels_last:
            w = next((q for q in t.parameters() if q.dim() == 4), None)
            if w is not None and not w.is_contiguous(memory_format=torch.channels_last):
                t.to(memory_format=torch.channels_last)
        p = next(iter(t.parameters()))  # as converted
        low = p.dtype in (torch.float16, torch.bfloat16) and p.device.type == "cuda"
        return p.dtype if low else None

    # -- the teacher cache -------------------------------------------------------------------------------------
    def _cached_teacher_forward(self, t: nn.Module, inputs: Any, keys: Any) -> Any:
        cache, rt = self.teacher_cache, self.cfg.teacher_runtime
        x0 = _first_tensor(inputs)
        keys = [str(k) for k in keys]
        if x0 is None or x0.dim() == 0 or len(keys) != x0.shape[0]:
            raise ConfigError(f"teacher_runtime.cache: got {len(keys)} keys for a batch of "
                              f"{'no tensor' if x0 is None or x0.dim() == 0 else x0.shape[0]}; pass one key per "
                              "sample (e.g. its image file name)")
        n, shape = len(keys), list(x0.shape[1:])
        if cache.on_disk and cache.namespace is None:
            self._prepare_teacher(t, inputs)  # the namespace hashes the teacher as it will run
            cache.bind(self._cache_namespace(t))
        fps = _fingerprint(x0).cpu() if rt.cache_verify else None
        recs: list[dict | None] = []
        for i, k in enumerate(keys):
            e = cache.get(k)
            ok = e is not None and e["shape"] == shape and (fps is None or (e["fp"] is not None
                                                                         and _fp_match(e["fp"], fps[i])))
            recs.append(e["t"] if ok else None)
        miss = [i for i, r in enumerate(recs) if r is None]
        self.cache_hits += n - len(miss)
        self.cache_misses += len(miss)
        out = None
        if miss:
            sub = inputs if len(miss) == n else _take(inputs, torch.tensor(miss), n)
            out = self._run_teacher(t, sub)
            for i, rec in zip(miss, self._split_record(len(miss))):
                recs[i] = rec
                cache.put(keys[i], rec, shape, None if fps is None else fps[i])
            if len(miss) == n:  # the live recording is the whole batch: use it as it is
                return out
        self._use_records(recs, next(iter(t.parameters()), x0).device)
        return None

    def _teacher_tap(self, name: str) -> Tensor:
        if name in self._t_taps:
            return self._t_taps[name]
        mod, sel = _split_name(name)
        if mod not in self._t_out:
            raise ConfigError(f"teacher tap '{name}' recorded nothing in the teacher forward")
        return _select(self._t_out[mod], sel, name)

    def _teacher_head_output(self) -> Any:
        if self.teacher_head:
            name, sel = _split_name(self.teacher_head)
            if name not in self._t_out:
                raise ConfigError(f"the teacher's head module '{name}' did not run in the teacher forward")
            return _pick(self._t_out[name], sel, self.teacher_head)
        return self._t_result

    def _split_record(self, n: int) -> list[dict[str, Tensor]]:
        """The just-recorded teacher tensors the losses need (selected taps, dense outputs), one dict per
        sample, each tensor an own copy (CPU when offloading)."""
        batch = {f"tap:{name}": self._teacher_tap(name) for name in dict.fromkeys(x.teacher for x in self.cfg.features)}
        if self._dense:
            d = self.teacher_head_extractor(_float_tree(self._teacher_head_output()))
            batch.update({f: getattr(d, f) for f in _DENSE_FIELDS if getattr(d, f) is not None})
        per: list[dict[str, Tensor]] = [{} for _ in range(n)]
        to_cpu = self.teacher_cache.offload or self.teacher_cache.on_disk
        for name, v in batch.items():
            if v.dim() == 0 or v.shape[0] != n:
                raise ConfigError(f"teacher_runtime.cache: teacher tensor '{name}' has shape {tuple(v.shape)}, not "
                                  f"batch-first with {n} samples; it cannot be cached per sample (cache: false)")
            v = v.detach().to("cpu") if to_cpu else v.detach()
            for i, row in enumerate(v.unbind(0)):
                per[i][name] = row.clone()
        return per

    def _use_records(self, recs: list[dict[str, Tensor]], device: torch.device) -> None:
        names = list(recs[0])
        if any(list(r) != names for r in recs):
            raise ConfigError("teacher_runtime.cache: cached entries hold different tensors than this config needs; "
                              "clear the cache directory")
        stacked = {k: torch.stack([r[k] for r in recs]).to(device, non_blocking=True) for k in names}
        self._t_out.clear()
        self._t_result = None
        self._t_taps = {k[4:]: v for k, v in stacked.items() if k.startswith("tap:")}
        self._t_dense = DenseOutputs(**{f: stacked[f] for f in _DENSE_FIELDS if f in stacked}) if self._dense else None
        self._t_ran = True

    def _cache_namespace(self, t: nn.Module) -> str:
        """Hash of the teacher's state (as it runs), its taps and the settings that change its numbers."""
        h = hashlib.sha1()
        for k, v in t.state_dict().items():
            v = v.detach().cpu().contiguous()
            h.update(f"{k}:{tuple(v.shape)}:{v.dtype}".encode())
            h.update(v.reshape(-1).view(torch.uint8).numpy().tobytes())
        rt = self.cfg.teacher_runtime
        ext = self.teacher_head_extractor
        h.update(repr((sorted(self._teacher_names()), self._dense, self.teacher_head, type(ext).__qualname__,
                       getattr(ext, "__qualname__", ""), rt.channels_last, rt.fuse, str(rt.half))).encode())
        return h.hexdigest()[:16]

    # -- construction ----------------------------------------------------------------------------------------
    def _build(self, example_inputs: Any) -> None:
        """Probe both models once on ``example_inputs`` and build one adapter + loss module per tap."""
        s = self.student
        s_mode = s.training
        s.eval()
        try:
            with torch.no_grad():
                with self._hooks(s, [x.student for x in self.cfg.features], self._s_out, "student"):
                    _call(s, example_inputs)
                self.teacher_forward(example_inputs)
            for i, tap in enumerate(self.cfg.features):
                sf = _select(self._s_out[_split_name(tap.student)[0]], _split_name(tap.student)[1], tap.student)
                tf = _select(self._t_out[_split_name(tap.teacher)[0]], _split_name(tap.teacher)[1], tap.teacher)
                if sf.dim() != 4 or tf.dim() != 4:
                    raise ConfigError(f"distill.features[{i}]: taps must give (N, C, H, W) maps; got "
                                      f"{tuple(sf.shape)} (student '{tap.student}') and {tuple(tf.shape)} "
                                      f"(teacher '{tap.teacher}')")
                self.adapters[str(i)], self.feature_losses[str(i)] = self._make_tap(
                    i, tap, int(sf.shape[1]), int(tf.shape[1])
                )
            p = next(iter(s.parameters()), None)
            if p is not None:
                self.to(p.device)
        finally:
            s.train(s_mode)
            self.teacher_forwards = 0
            self._reset()

    def _make_tap(self, i: int, tap: FeatureTapConfig, sc: int, tc: int) -> tuple[nn.Module, nn.Module]:
        method = FEATURE_METHODS[tap.method]
        needs_conv = sc != tc and not method.aligns_channels and not method.channel_free
        if tap.adapter == "none" and needs_conv:
            raise ConfigError(f"distill.features[{i}]: adapter 'none' but the student '{tap.student}' has {sc} "
                              f"channels and the teacher '{tap.teacher}' {tc}; use adapter: auto")
        if tap.adapter in ("conv", "conv_bn") or (tap.adapter == "auto" and needs_conv):
            out_c = sc if method.aligns_channels else tc  # MGD/FGD map channels themselves
            layers: list[nn.Module] = [nn.Conv2d(sc, out_c, 1, bias=tap.adapter == "conv")]
            if tap.adapter in ("auto", "conv_bn"):
                layers.append(nn.BatchNorm2d(out_c))
            adapter: nn.Module = nn.Sequential(*layers)
            sc = out_c
        else:
            adapter = nn.Identity()
        try:
            loss = method.build(sc, tc, **tap.options)
        except (TypeError, ValueError) as e:
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
            teacher_keys: one id per sample for the teacher cache (``teacher_runtime.cache``); see
                :meth:`teacher_forward`.

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
            self._reset()

    def _device(self) -> torch.device:
        for m in (self, self.student):
            p = next(iter(m.parameters()), None) if m is not None else None
            if p is not None:
                return p.device
        return torch.device("cpu")

    def _terms(self, inputs, teacher_inputs, student_output, teacher_output, gt_boxes, gt_valid, img_shape,
               box_targets, teacher_keys=None) -> dict[str, Tensor]:
        mult = self.multipliers()
        keys = [k for k, on in (("kd_cls", self.cfg.logits), ("kd_box", self.cfg.boxes),
                                ("kd_feat", self.cfg.features)) if on]
        device = self._device()
        zero = torch.zeros((), dtype=torch.float32, device=device)
        self.last_terms = {}
        if all(m == 0.0 for m in mult.values()):  # stop_epoch (or all weights 0): exact zeros, no teacher
            self.last_terms = {k: zero.clone() for k in mult}
            out = {k: zero.clone() for k in keys}
            out["kd_total"] = zero.clone()
            return out

        need_teacher = bool(self.cfg.features) or (self._dense and teacher_output is None)
        if need_teacher and not self._t_ran:
            src = teacher_inputs if teacher_inputs is not None else inputs
            if src is None:
                raise ConfigError("the Distiller needs the batch inputs to run the teacher: kd(images, ...)")
            self.teacher_forward(src, keys=teacher_keys)
        if img_shape is None:
            img_shape = _image_shape(inputs) or _image_shape(teacher_inputs)

        out: dict[str, Tensor] = {}
        with _no_autocast(device):
            if self._dense:
                s_head, t_head = self._dense_outputs(student_output, teacher_output)
                if self.cfg.logits:
                    out["kd_cls"] = self._head_term("kd_cls", LOGIT_METHODS[self.cfg.logits.method],
                                                    self.cfg.logits, self.temperature(), s_head, t_head,
                                                    box_targets, mult["kd_cls"], zero)
                if self.cfg.boxes:
                    out["kd_box"] = self._head_term("kd_box", BOX_METHODS[self.cfg.boxes.method], self.cfg.boxes,
                                                    self.cfg.boxes.temperature, s_head, t_head, box_targets,
                                                    mult["kd_box"], zero)
            if self.cfg.features:
                ctx = {"gt_boxes": gt_boxes, "gt_valid": gt_valid, "img_shape": img_shape}
                total = zero
                for i, (key, tap) in enumerate(zip(self._feature_keys(), self.cfg.features)):
                    v = self._feature_term(i, tap, ctx, mult[key], zero)
                    self.last_terms[key] = v.detach()
                    total = total + v
                out["kd_feat"] = total
        total = zero
        for k in keys:
            total = total + out[k]
        out["kd_total"] = total
        return out

    def _dense_outputs(self, student_output: Any, teacher_output: Any) -> tuple[DenseOutputs, DenseOutputs]:
        if student_output is None:
            name, sel = _split_name(self.head or MODEL_OUTPUT)
            if name not in self._s_out:
                raise ConfigError("logit/box distillation found no student head output: run the student inside "
                                  "kd.record(), or pass student_output=")
            student_output = _pick(self._s_out[name], sel, self.head or "<model output>")
        s = _float_outputs(self.head_extractor(student_output), detach=False)
        if teacher_output is None and self._t_dense is not None:  # from the teacher cache
            return s, _float_outputs(self._t_dense, detach=True)
        if teacher_output is None:
            teacher_output = self._teacher_head_output()
        t = _float_outputs(self.teacher_head_extractor(_float_tree(teacher_output)), detach=True)
        return s, t

    def _head_term(self, key: str, method, c, temperature: float, s: DenseOutputs, t: DenseOutputs,
                   box_targets: Tensor | None, mult: float, zero: Tensor) -> Tensor:
        if mult == 0.0:
            v = zero
        else:
            v = method.loss(s, t, temperature=temperature, box_targets=box_targets, **c.options)
            if v.numel() != 1:
                raise ConfigError(f"distill.{'logits' if key == 'kd_cls' else 'boxes'}: the loss is not a scalar "
                                  f"(shape {tuple(v.shape)}); do not set options.reduction to 'none'")
            v = v.float().reshape(()) * mult
        self.last_terms[key] = v.detach()
        return v

    def _feature_term(self, i: int, tap: FeatureTapConfig, ctx: dict, mult: float, zero: Tensor) -> Tensor:
        if mult == 0.0:
            return zero
        s_name, s_sel = _split_name(tap.student)
        if s_name not in self._s_out:
            raise ConfigError(f"student tap '{tap.student}' recorded nothing: run the student inside kd.record()")
        if FEATURE_METHODS[tap.method].needs_gt and (ctx["gt_boxes"] is None or ctx["img_shape"] is None):
            raise ConfigError(
                f"distill.features[{i}] ({tap.method} on '{tap.student}') needs the batch's ground-truth boxes: "
                "pass gt_boxes= (N, M, 4) xyxy input pixels (or a list of (n_i, 4)), gt_valid= (N, M) and, unless "
                "inputs is an (N, C, H, W) tensor, img_shape= (H, W)"
            )
        s = _select(self._s_out[s_name], s_sel, tap.student).float()
        t = _normal(self._teacher_tap(tap.teacher).detach().float())
        s = self.adapters[str(i)](s)
        if s.shape[-2:] != t.shape[-2:]:
            s = F.interpolate(s, size=t.shape[-2:], mode="bilinear", align_corners=False)
        return self.feature_losses[str(i)](s, t, **ctx).float().reshape(()) * mult
