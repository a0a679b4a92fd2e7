"""`TeacherRunner`: how the frozen teacher runs for the Distiller, and what its last run left for the losses.

It owns the teacher (unregistered, frozen, eval mode), the ``teacher_runtime`` options (applied lazily at the first
forward, in place, once: a model built on CPU and moved to CUDA by a trainer gets them on the right device), the
per-sample :class:`~detkd.distiller.teacher_cache.TeacherCache` and the counters ``forwards`` / ``cache_hits`` /
``cache_misses``. After :meth:`forward` it serves this step's teacher tensors: :meth:`tap` (feature maps) and
:meth:`dense` (the head's :class:`~detkd.distiller.dense.DenseOutputs`), from the live run or from the cache alike.
:meth:`clear` drops them (the Distiller calls it after every step).

``mode`` (``distill.mode``): ``offline`` is all of the above. ``online``: the teacher is trained by its owner (not
frozen, its mode left alone, run with gradients so its owner can back-propagate its own detection loss through
the output :meth:`forward` returns; the losses detach what they take from it). ``self``: the teacher is the student
itself, run without gradients on the inputs upsampled by :data:`SELF_SCALE`, BatchNorm on batch statistics without
updating its running statistics. Neither applies ``teacher_runtime`` (config validation refuses its options there).
"""

from __future__ import annotations

import contextlib
import hashlib
import warnings
from typing import Any, Callable

import torch
from torch import Tensor, nn

from detkd.config import TeacherRuntimeConfig
from detkd.distiller.dense import DenseOutputs, float_outputs, float_tree
from detkd.distiller.fuse import fuse_conv_bn
from detkd.distiller.taps import Taps
from detkd.distiller.teacher_cache import TeacherCache, fingerprint, fingerprint_match, first_tensor, take
from detkd.distiller.util import call
from detkd.errors import ConfigError

__all__ = ["SELF_SCALE", "TeacherRunner", "frozen_norm_stats", "upsample"]

SELF_SCALE = 2
"""``mode: self``: the teacher pass sees the inputs at this many times their size. 2 makes level ``l + 1`` of that
pass (stride ``2 s`` on a 2x image) fall on the grid of level ``l`` of the normal pass, objects at the same size in
its stride units (scale-equivalent, as in Guo et al., "Scale-Equivalent Distillation", CVPR 2022)."""


def upsample(inputs: Any, scale: float = SELF_SCALE) -> Any:
    """4-D floating-point input tensors (or the first of a tuple / list) resized bilinearly by ``scale``."""
    def f(x: Any) -> Any:
        if isinstance(x, Tensor) and x.is_floating_point() and x.dim() == 4:
            return torch.nn.functional.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False)
        return x

    if isinstance(inputs, (tuple, list)) and inputs:
        return type(inputs)([f(inputs[0]), *inputs[1:]])
    return f(inputs)


@contextlib.contextmanager
def frozen_norm_stats(model: nn.Module):
    """Inside: BatchNorm layers in training mode normalise with the batch's statistics but leave their running
    statistics (and counters) as they are (``track_running_stats`` off for the duration)."""
    from torch.nn.modules.batchnorm import _BatchNorm

    mods = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.training and m.track_running_stats]
    for m in mods:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in mods:
            m.track_running_stats = True


class _Run:
    """What the last teacher forward left for this step. Copies and pickles get a fresh one."""

    def __init__(self) -> None:
        self.ran = False  # the teacher ran (or the cache served every sample) for this step
        self.cached = False  # the tensors below came from the cache, not from a live recording
        self.result: Any = None  # the teacher model's output (live run of the whole batch)
        self.taps: dict[str, Tensor] = {}  # tap name -> batch tensor, when served from the cache
        self.dense: DenseOutputs | None = None  # float32, detached; from the cache, or extracted once

    def __deepcopy__(self, memo: dict) -> _Run:
        return _Run()

    def __reduce__(self):
        return _Run, ()


@contextlib.contextmanager
def _raw(model: nn.Module, names: tuple[str, ...]):
    """Inside: the modules ``names`` of ``model`` have ``training = True`` (their own flag only; their children keep
    eval mode), so a head whose eval-mode forward adds an inference decode returns its raw outputs."""
    mods = [(m, m.training) for m in (model.get_submodule(n) for n in names)]
    for m, _ in mods:
        m.training = True
    try:
        yield
    finally:
        for m, was in mods:
            m.training = was


def _cast_inputs(inputs: Any, dtype: torch.dtype | None, channels_last: bool) -> Any:
    """Floating-point input tensors cast to ``dtype`` (when set); 4-D ones made channels-last (when asked)."""
    if not (dtype is not None or channels_last):
        return inputs

    def f(x: Any) -> Any:
        if not isinstance(x, Tensor) or not x.is_floating_point():
            return x
        fmt = torch.channels_last if channels_last and x.dim() == 4 else torch.preserve_format
        return x.to(dtype=dtype or x.dtype, memory_format=fmt)

    return type(inputs)(f(x) for x in inputs) if isinstance(inputs, (tuple, list)) else f(inputs)


class TeacherRunner:
    """Runs ``teacher`` with ``runtime``'s options, records ``feature_taps`` (and ``head`` when ``dense``).

    Args:
        teacher: the frozen teacher (None: dropped, e.g. on an EMA copy).
        runtime: the ``teacher_runtime`` options.
        feature_taps: teacher tap names the feature terms use.
        head: the teacher's head module name (None: the model output is the head output).
        extractor: ``f(head output) -> DenseOutputs``.
        dense: whether logit / box terms need the head's outputs (recorded and cached).
        mode: ``offline`` (frozen teacher), ``online`` (trained by its owner) or ``self`` (the student at 2x).
        raw_modules: ``offline``: names of teacher modules whose own ``training`` flag is set during the forward
            (not their children's), for heads whose eval-mode output adds a decode the extractor does not use
            (Ultralytics' ``Detect``: box decoding, class sigmoid, YOLO26's top-k; ``extractor`` must take the
            training-mode output). Restored afterwards: any other user of the module sees it as it was.
    """

    def __init__(self, teacher: nn.Module | None, runtime: TeacherRuntimeConfig, feature_taps: list[str],
                 head: str | None, extractor: Callable[[Any], DenseOutputs], dense: bool, mode: str = "offline",
                 raw_modules: tuple[str, ...] = ()):
        self.runtime = runtime
        self.mode = mode
        self.raw_modules = tuple(raw_modules)
        self.feature_taps = list(dict.fromkeys(feature_taps))
        self.head, self.extractor, self.wants_dense = head, extractor, dense
        self.taps = Taps(self.feature_taps + ([head] if dense and head else []), "teacher")
        self.forwards = 0  # teacher forwards (not counting the Distiller's construction probe)
        self.cache_hits = self.cache_misses = 0  # samples served from / missing in the cache
        self.run = _Run()
        self._fused: int | None = None  # id() of the teacher already fused
        self.cache = self._new_cache()
        self.teacher = teacher
        self.freeze()

    # -- the teacher model --------------------------------------------------------------------------------------
    def set_teacher(self, teacher: nn.Module | None) -> None:
        """Use ``teacher`` (frozen here). A new teacher gets a new cache (copies may still share the old one) and
        is fused again; None (an EMA copy dropping it) keeps both."""
        if teacher is not None and teacher is not self.teacher:
            self._fused = None
            self.cache = self._new_cache()
        self.teacher = teacher
        self.freeze()

    def _new_cache(self) -> TeacherCache | None:
        rt = self.runtime
        if not rt.cache_enabled or self.mode != "offline":
            return None
        return TeacherCache(rt.cache, rt.cache_max_items, rt.cache_max_bytes, rt.cache_offload)

    def freeze(self) -> None:
        """Eval mode and no gradients, whatever ``train()`` was called on (the Distiller calls this on every
        ``train()`` / ``eval()``). Only a frozen (``offline``) teacher: an online one trains, a ``self`` one is the
        student."""
        t = self.teacher
        if t is not None and self.mode == "offline":
            t.eval()
            for p in t.parameters():
                p.requires_grad_(False)

    # -- running it -----------------------------------------------------------------------------------------------
    def forward(self, inputs: Any, keys: Any = None) -> Any:
        """Run the teacher on ``inputs`` (or serve it from the cache by ``keys``); see ``Distiller.teacher_forward``."""
        t = self.teacher
        if t is None:
            raise ConfigError("this Distiller has no teacher (it was dropped, e.g. on an EMA copy)")
        if self.mode == "offline" and (t.training or any(p.requires_grad for p in t.parameters())):
            self.freeze()  # eval() walks every module: only when something unfroze the teacher
        if keys is None or self.cache is None:
            return self._run(t, inputs)
        return self._cached(t, inputs, keys)

    def _run(self, t: nn.Module, inputs: Any) -> Any:
        if self.mode != "offline":
            return self._run_live(t, inputs)
        rt = self.runtime
        dtype, channels_last = self._prepare(t, inputs)
        x = _cast_inputs(inputs, dtype, channels_last)
        grad = torch.inference_mode() if rt.inference_mode else torch.no_grad()
        amp = torch.autocast("cuda", dtype=dtype) if dtype is not None else contextlib.nullcontext()
        self.run = _Run()
        with grad, amp, self.taps.recording(t), _raw(t, getattr(self, "raw_modules", ())):
            out = call(t, x)
        self.run.result, self.run.ran = out, True
        self.forwards += 1
        return out

    def _run_live(self, t: nn.Module, inputs: Any) -> Any:
        """``online``: the teacher as its owner left it (its train / eval mode, gradients as the caller allows).
        ``self``: the student on the upsampled inputs, no gradients, BatchNorm running statistics untouched."""
        self.run = _Run()
        if self.mode == "self":
            with torch.no_grad(), frozen_norm_stats(t), self.taps.recording(t):
                out = call(t, upsample(inputs))
        else:
            with self.taps.recording(t):
                out = call(t, inputs)
        self.run.result, self.run.ran = out, True
        self.forwards += 1
        return out

    def live_dense(self) -> DenseOutputs:
        """``online``: this step's teacher :class:`DenseOutputs` in float32 *with* gradients (for the mutual,
        teacher <- student terms)."""
        if not self.run.ran or self.run.cached:
            raise ConfigError("no live teacher run this step: call teacher_forward first")
        return float_outputs(self.extractor(float_tree(self.head_output())), detach=False)

    def _prepare(self, t: nn.Module, inputs: Any) -> tuple[torch.dtype | None, bool]:
        """Apply fuse / half / channels_last to the teacher (each only when not yet done); returns the
        reduced-precision dtype it runs in on CUDA (or None) and whether it runs channels-last."""
        rt = self.runtime
        p = next(iter(t.parameters()), None)
        if p is None:
            return None, False
        if rt.fuse is not False and self._fused != id(t):
            low = p.dtype if p.dtype in (torch.float16, torch.bfloat16) else None  # a teacher already in half
            try:
                fuse_conv_bn(t, _cast_inputs(inputs, low, False), keep=self.taps.names)
            except ConfigError as e:
                if rt.fuse is True:
                    raise
                warnings.warn(f"detkd: teacher_runtime.fuse: auto left the teacher unfused: {e}", stacklevel=2)
            self._fused = id(t)
            self.freeze()
        if p.device.type != "cuda":
            if rt.half is True:
                raise ConfigError(f"teacher_runtime.half: true needs the teacher on a CUDA device; it is on "
                                  f"{p.device}. Use half: auto (float16 on CUDA only) or false")
        elif p.dtype == torch.float32:
            if rt.half is True:
                t.half()
            elif rt.half == "auto" and torch.is_autocast_enabled("cuda"):
                t.to(torch.get_autocast_dtype("cuda"))
        channels_last = rt.channels_last is True or (rt.channels_last == "auto" and p.device.type == "cpu")
        if channels_last:
            w = next((q for q in t.parameters() if q.dim() == 4), None)
            if w is not None and not w.is_contiguous(memory_format=torch.channels_last):
                t.to(memory_format=torch.channels_last)
        p = next(iter(t.parameters()))  # as converted
        low = p.dtype in (torch.float16, torch.bfloat16) and p.device.type == "cuda"
        return (p.dtype if low else None), channels_last

    # -- this step's teacher tensors ------------------------------------------------------------------------------
    @property
    def ran(self) -> bool:
        return self.run.ran

    def clear(self) -> None:
        """Drop what the last run recorded."""
        self.run = _Run()
        self.taps.clear()

    def tap(self, name: str) -> Tensor:
        if name in self.run.taps:
            return self.run.taps[name]
        if not self.taps.has(name):
            raise ConfigError(f"teacher tap '{name}' recorded nothing in the teacher forward")
        return self.taps.tensor(name)

    def head_output(self) -> Any:
        if self.head:
            if not self.taps.has(self.head):
                raise ConfigError(f"the teacher's head module '{self.head}' did not run in the teacher forward")
            return self.taps.output(self.head)
        return self.run.result

    def dense(self, teacher_output: Any = None) -> DenseOutputs | None:
        """The teacher's :class:`DenseOutputs` (float32, detached): from ``teacher_output`` when given, else this
        step's (cached, or extracted once from the recorded head output); None before any run, or when the cache
        served a step without dense outputs."""
        if teacher_output is not None:
            return float_outputs(self.extractor(float_tree(teacher_output)), detach=True)
        r = self.run
        if r.dense is None and r.ran and not r.cached:
            r.dense = float_outputs(self.extractor(float_tree(self.head_output())), detach=True)
        return r.dense

    # -- the cache ------------------------------------------------------------------------------------------------
    def _cached(self, t: nn.Module, inputs: Any, keys: Any) -> Any:
        cache, rt = self.cache, self.runtime
        x0 = first_tensor(inputs)
        keys = [str(k) for k in keys]
        if x0 is None or x0.dim() == 0 or len(keys) != x0.shape[0]:
            raise ConfigError(f"teacher_runtime.cache: got {len(keys)} keys for a batch of "
                              f"{'no tensor' if x0 is None or x0.dim() == 0 else x0.shape[0]}; pass one key per "
                              "sample (e.g. its image file name)")
        n, shape = len(keys), list(x0.shape[1:])
        if cache.on_disk and cache.namespace is None:
            self._prepare(t, inputs)  # the namespace hashes the teacher as it will run
            cache.bind(self._namespace(t))
        fps = fingerprint(x0).cpu() if rt.cache_verify else None
        recs: list[dict | None] = []
        meta = None
        for i, k in enumerate(keys):
            e = cache.get(k)
            ok = e is not None and e["shape"] == shape and (
                fps is None or (e["fp"] is not None and fingerprint_match(e["fp"], fps[i])))
            recs.append(e["t"] if ok else None)
            meta = meta or (e.get("meta") if ok else None)
        miss = [i for i, r in enumerate(recs) if r is None]
        self.cache_hits += n - len(miss)
        self.cache_misses += len(miss)
        if miss:
            out = self._run(t, inputs if len(miss) == n else take(inputs, torch.tensor(miss), n))
            per, meta = self._per_sample(len(miss))
            for i, rec in zip(miss, per):
                recs[i] = rec
                cache.put(keys[i], rec, shape, None if fps is None else fps[i], meta)
            if len(miss) == n:  # the live recording is the whole batch: use it as it is
                return out
        self._use_records(recs, meta, next(iter(t.parameters()), x0).device)
        return None

    def _per_sample(self, n: int) -> tuple[list[dict[str, Tensor]], dict | None]:
        """The just-recorded tensors the losses need (feature taps, dense outputs), one dict per sample, each tensor
        an own copy (on the CPU when offloading), and the dense outputs' non-tensor fields."""
        batch = {f"tap:{name}": self.tap(name) for name in self.feature_taps}
        meta = None
        if self.wants_dense:
            d = self.dense()
            batch.update(d.tensors())
            meta = d.meta()
        per: list[dict[str, Tensor]] = [{} for _ in range(n)]
        to_cpu = self.cache.offload or self.cache.on_disk
        for name, v in batch.items():
            if v.dim() == 0 or v.shape[0] != n:
                raise ConfigError(f"teacher_runtime.cache: teacher tensor '{name}' has shape {tuple(v.shape)}, not "
                                  f"batch-first with {n} samples; it cannot be cached per sample (cache: false)")
            v = v.detach().to("cpu") if to_cpu else v.detach()
            for i, row in enumerate(v.unbind(0)):
                per[i][name] = row.clone()
        return per, meta

    def _use_records(self, recs: list[dict[str, Tensor]], meta: dict | None, device: torch.device) -> None:
        names = list(recs[0])
        if any(list(r) != names for r in recs):
            raise ConfigError("teacher_runtime.cache: cached entries hold different tensors than this config needs; "
                              "clear the cache directory")
        stacked = {k: torch.stack([r[k] for r in recs]).to(device, non_blocking=True) for k in names}
        self.clear()
        r = self.run
        r.ran = r.cached = True
        r.taps = {k[4:]: v for k, v in stacked.items() if k.startswith("tap:")}
        if self.wants_dense:
            fields = {k: v for k, v in stacked.items() if not k.startswith("tap:")}
            r.dense = float_outputs(DenseOutputs(**fields, **(meta or {})), detach=True)

    def _namespace(self, t: nn.Module) -> str:
        """Hash of the teacher's state (as it runs), its taps and the settings that change its numbers."""
        h = hashlib.sha1()
        for k, v in t.state_dict().items():
            v = v.detach().cpu().contiguous()
            h.update(f"{k}:{tuple(v.shape)}:{v.dtype}".encode())
            h.update(v.reshape(-1).view(torch.uint8).numpy().tobytes())
        rt = self.runtime
        ext = self.extractor
        h.update(repr((sorted(self.taps.names), self.wants_dense, self.head, type(ext).__qualname__,
                       getattr(ext, "__qualname__", ""), rt.channels_last, rt.fuse, str(rt.half))).encode())
        return h.hexdigest()[:16]
