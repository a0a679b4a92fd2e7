#!/usr/bin/env python
"""Time detkd's distillation losses against the published reference implementations (CPU).

Sizes: batch 16, a 640x640 input -> levels 80/40/20 (8400 anchors), C=256 features, 80 classes,
30 ground-truth boxes per image. Each case is one forward+backward (feature losses summed over the three
levels, one module per level for MGD / FGD), timed in interleaved rounds: every round runs each
implementation once (reference, detkd, reference, detkd, ..., the first one alternating between
rounds), so a busy machine slows both alike; medians, their ratio and the median of the per-round
ratios are printed. Peak memory is the resident-set peak of one forward+backward above the resident set
before it (``/proc/self/status`` VmHWM after resetting it through ``/proc/self/clear_refs``, freed heap
given back with ``malloc_trim`` first); ``kept`` is what is still resident after the call once the loss
and the gradients are gone (memory a module keeps between calls).

    python tools/bench_losses.py --refs ~/src/kd-refs            # every case, 1 thread
    python tools/bench_losses.py --refs ~/src/kd-refs --only fgd30,fgd1 --threads 2 --rounds 15

``--refs DIR`` holds local checkouts of the reference repositories (nothing is downloaded, nothing of
theirs is copied into detkd); the loss files are imported by path, with minimal stand-ins for their
registries and mmcv helpers when those packages are not installed:

    DIR/FGD/mmdet/distillation/losses/fgd.py          github.com/yzd-v/FGD       FeatureLoss
    DIR/MGD/det/mmdet/distillation/losses/mgd.py      github.com/yzd-v/MGD       FeatureLoss
    DIR/mmrazor/mmrazor/models/losses/{cwd,pkd_loss,at_loss,kl_divergence}.py
                                                      github.com/open-mmlab/mmrazor
    DIR/mmdetection/mmdet/models/losses/kd_loss.py    github.com/open-mmlab/mmdetection
                                                      KnowledgeDistillationKLDivLoss (LD)

Without ``--refs`` (or for a reference that is missing) each loss is compared with a plain version
written in this script from the published formula (marked ``naive``), and the script says so. Before
timing, each pair is run once on the same inputs and the relative difference of the loss values and of
the student gradients (L2 norm of the difference over L2 norm) is printed (MGD: same random mask, drawn
from the same seed; a ReLU in its generator makes float32 gradients differ at the rare positions where
the two implementations round a pre-activation to opposite signs).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import importlib
import importlib.util
import os
import statistics
import sys
import time
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


# ----------------------------------------------------------------------------------------------------
# Memory: resident-set peak of one call (Linux)
# ----------------------------------------------------------------------------------------------------
_LIBC = None


def _malloc_trim() -> None:
    global _LIBC
    try:
        if _LIBC is None:
            _LIBC = ctypes.CDLL("libc.so.6")
        _LIBC.malloc_trim(0)
    except Exception:  # noqa: BLE001 - not glibc: nothing to trim
        pass


def _status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def measure_memory(fn: Callable[[], torch.Tensor], leaves: list[torch.Tensor]) -> tuple[float, float] | None:
    """(peak MiB above the resident set before the call, MiB still resident after it) of fwd+bwd."""
    for p in leaves:
        p.grad = None
    gc.collect()
    _malloc_trim()
    base = _status_kib("VmRSS")
    if base is None or not _reset_peak():
        return None
    loss = fn()
    loss.backward()
    peak = _status_kib("VmHWM")
    del loss
    for p in leaves:
        p.grad = None
    gc.collect()
    _malloc_trim()
    after = _status_kib("VmRSS")
    if peak is None or after is None:
        return None
    return (peak - base) / 1024, max(after - base, 0) / 1024


# ----------------------------------------------------------------------------------------------------
# Reference implementations, imported by file path from local checkouts
# ----------------------------------------------------------------------------------------------------
class _Registry:
    """Stand-in for an mm* ``Registry``: ``@X.register_module()`` returns the class unchanged."""

    def register_module(self, *args, **kwargs):
        if len(args) == 1 and isinstance(args[0], type) and not kwargs:
            return args[0]
        return lambda obj: obj


def _stub(name: str, **attrs) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__dict__.update(attrs)
    sys.modules[name] = mod
    return mod


def _package(name: str, path: Path | None = None, **attrs) -> types.ModuleType:
    mod = _stub(name, **attrs)
    mod.__path__ = [str(path)] if path is not None else []
    return mod


def _ensure_importable(name: str, make: Callable[[], None]) -> None:
    try:
        importlib.import_module(name)
    except Exception:  # noqa: BLE001 - not installed (or broken): use the stand-in
        make()


def _mmcv_stubs() -> None:
    """``mmcv.cnn.kaiming_init / constant_init`` (mmcv 1.x semantics) and a no-op ``mmcv.jit``."""

    def kaiming_init(module, a=0, mode="fan_out", nonlinearity="relu", bias=0, distribution="normal"):
        init = nn.init.kaiming_uniform_ if distribution == "uniform" else nn.init.kaiming_normal_
        init(module.weight, a=a, mode=mode, nonlinearity=nonlinearity)
        if getattr(module, "bias", None) is not None:
            nn.init.constant_(module.bias, bias)

    def constant_init(module, val, bias=0):
        if getattr(module, "weight", None) is not None:
            nn.init.constant_(module.weight, val)
        if getattr(module, "bias", None) is not None:
            nn.init.constant_(module.bias, bias)

    def jit(*args, **kwargs):
        return lambda fn: fn

    mmcv = _package("mmcv", jit=jit)
    mmcv.cnn = _stub("mmcv.cnn", kaiming_init=kaiming_init, constant_init=constant_init)


def _load_file(path: Path, name: str) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def _load_in_fake_package(path: Path, pkg: str, **builder_attrs) -> types.ModuleType:
    """Import ``path`` as ``pkg.losses.<stem>``; ``from ..builder import X`` finds ``builder_attrs``."""
    _package(pkg)
    _stub(f"{pkg}.builder", **builder_attrs)
    _package(f"{pkg}.losses", path.parent)
    return _load_file(path, f"{pkg}.losses.{path.stem}")


@dataclass
class Refs:
    """What was found under ``--refs``: name -> module attribute (or the reason it is missing)."""

    objs: dict[str, object] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)

    def get(self, key: str):
        return self.objs.get(key)


def load_refs(root: Path | None) -> Refs:
    refs = Refs()
    if root is None:
        return refs
    _ensure_importable("mmcv.cnn", _mmcv_stubs)
    if "mmcv" in sys.modules and not hasattr(sys.modules["mmcv"], "jit"):
        sys.modules["mmcv"].jit = lambda *a, **k: (lambda fn: fn)

    def attempt(key: str, rel: str, load: Callable[[Path], object]) -> None:
        path = root / rel
        if not path.is_file():
            refs.missing[key] = f"{path} not found"
            return
        try:
            refs.objs[key] = load(path)
        except Exception as exc:  # noqa: BLE001
            refs.missing[key] = f"{path}: {type(exc).__name__}: {str(exc).splitlines()[0][:80] if str(exc) else ''}"

    attempt(
        "fgd", "FGD/mmdet/distillation/losses/fgd.py",
        lambda p: _load_in_fake_package(p, "_kdref_fgd", DISTILL_LOSSES=_Registry()).FeatureLoss,
    )
    attempt(
        "mgd", "MGD/det/mmdet/distillation/losses/mgd.py",
        lambda p: _load_in_fake_package(p, "_kdref_mgd", DISTILL_LOSSES=_Registry()).FeatureLoss,
    )

    def mmrazor(p: Path, attr: str):
        _ensure_importable(
            "mmrazor.registry", lambda: (_package("mmrazor"), _stub("mmrazor.registry", MODELS=_Registry()))
        )
        return getattr(_load_file(p, f"_kdref_mmrazor_{p.stem}"), attr)

    for key, stem, attr in (
        ("cwd", "cwd", "ChannelWiseDivergence"),
        ("pkd", "pkd_loss", "PKDLoss"),
        ("at", "at_loss", "ATLoss"),
        ("kd", "kl_divergence", "KLDivergence"),
    ):
        attempt(key, f"mmrazor/mmrazor/models/losses/{stem}.py", lambda p, attr=attr: mmrazor(p, attr))

    def mmdet_ld(p: Path):
        _ensure_importable("mmdet.registry", lambda: (_package("mmdet"), _stub("mmdet.registry", MODELS=_Registry())))
        return _load_in_fake_package(p, "_kdref_mmdet", LOSSES=_Registry()).KnowledgeDistillationKLDivLoss

    attempt("ld", "mmdetection/mmdet/models/losses/kd_loss.py", mmdet_ld)
    return refs


# ----------------------------------------------------------------------------------------------------
# Plain versions of each loss, written from the published formulas (used without --refs)
# ----------------------------------------------------------------------------------------------------
def naive_kd(s, t, tau):
    p_t = F.softmax(t / tau, dim=1)
    return tau * tau * F.kl_div(F.log_softmax(s / tau, dim=1), p_t, reduction="batchmean")


def naive_cwd(s, t, tau):
    n, c, h, w = s.shape
    p_t = F.softmax(t.reshape(-1, h * w) / tau, dim=1)
    kl = p_t * (F.log_softmax(t.reshape(-1, h * w) / tau, dim=1) - F.log_softmax(s.reshape(-1, h * w) / tau, dim=1))
    return kl.sum() * tau * tau / (n * c)


def naive_pkd(levels_s, levels_t):
    def norm(x):
        c = x.shape[1]
        flat = x.transpose(0, 1).reshape(c, -1)
        return (flat - flat.mean(1, keepdim=True)) / (flat.std(1, keepdim=True) + 1e-6)

    return sum(F.mse_loss(norm(s), norm(t)) / 2 for s, t in zip(levels_s, levels_t))


def naive_at(s, t):
    def att(x):
        return F.normalize(x.pow(2).mean(1).reshape(x.shape[0], -1))

    return (att(s) - att(t)).pow(2).mean()


def naive_ld(s, t, tau):
    p_t = F.softmax(t / tau, dim=1)
    return (F.kl_div(F.log_softmax(s / tau, dim=1), p_t, reduction="none").mean(1) * tau * tau).mean()


def naive_mgd(mod, s, t):
    """Reference algorithm with the parameters of a detkd ``MGDLoss``: dense convolutions on the masked map."""
    n, _, h, w = t.shape
    keep = torch.where(torch.rand((n, 1, h, w)) > 1 - mod.lambda_mgd, 0.0, 1.0)
    g1, g2 = mod.generation[0], mod.generation[2]
    new = F.conv2d(F.relu(F.conv2d(s * keep, g1.weight, g1.bias, padding=1)), g2.weight, g2.bias, padding=1)
    return F.mse_loss(new, t, reduction="sum") / n * mod.alpha_mgd


def naive_fgd(mod, preds_s, preds_t, boxes_list, img_hw):
    """Reference-style FGD on one level (per-image / per-box loops, separate fg / bg passes)."""
    s = mod.align(preds_s) if mod.align is not None else preds_s
    t = preds_t.detach()
    n, c, h, w = s.shape

    def attention(x):
        v = x.abs()
        s_att = h * w * F.softmax((v.mean(dim=1, keepdim=True) / mod.temp).view(n, -1), dim=1)
        c_att = c * F.softmax(v.mean(dim=2).mean(dim=2) / mod.temp, dim=1)
        return s_att.view(n, h, w), c_att

    s_att_t, c_att_t = attention(t)
    s_att_s, c_att_s = attention(s)
    mask_fg = torch.zeros_like(s_att_t)
    mask_bg = torch.ones_like(s_att_t)
    img_h, img_w = img_hw
    for i in range(n):
        b = boxes_list[i]
        x1 = torch.floor(b[:, 0] / img_w * w).int()
        x2 = torch.ceil(b[:, 2] / img_w * w).int()
        y1 = torch.floor(b[:, 1] / img_h * h).int()
        y2 = torch.ceil(b[:, 3] / img_h * h).int()
        area = 1.0 / (y2 + 1 - y1) / (x2 + 1 - x1)
        for j in range(b.shape[0]):
            sl = (i, slice(int(y1[j]), int(y2[j]) + 1), slice(int(x1[j]), int(x2[j]) + 1))
            mask_fg[sl] = torch.maximum(mask_fg[sl], area[j])
        mask_bg[i] = torch.where(mask_fg[i] > 0, 0.0, 1.0)
        if mask_bg[i].sum():
            mask_bg[i] /= mask_bg[i].sum()
    st = torch.sqrt(s_att_t).unsqueeze(1)
    ct = torch.sqrt(c_att_t)[:, :, None, None]
    fea_t, fea_s = t * st * ct, s * st * ct
    sfg, sbg = torch.sqrt(mask_fg).unsqueeze(1), torch.sqrt(mask_bg).unsqueeze(1)
    fg = F.mse_loss(fea_s * sfg, fea_t * sfg, reduction="sum") / n
    bg = F.mse_loss(fea_s * sbg, fea_t * sbg, reduction="sum") / n
    mask = (c_att_s - c_att_t).abs().sum() / n + (s_att_s - s_att_t).abs().sum() / n

    def gc_out(x, conv_mask, add):
        logits = F.softmax(conv_mask(x).view(n, 1, h * w), dim=2).unsqueeze(-1)
        context = torch.matmul(x.view(n, c, h * w).unsqueeze(1), logits).view(n, c, 1, 1)
        return x + add(context)

    rela = F.mse_loss(
        gc_out(s, mod.conv_mask_s, mod.channel_add_conv_s), gc_out(t, mod.conv_mask_t, mod.channel_add_conv_t),
        reduction="sum",
    ) / n
    return mod.alpha_fgd * fg + mod.beta_fgd * bg + mod.gamma_fgd * mask + mod.lambda_fgd * rela


def naive_fitnet(s, t):
    return (s - t).pow(2).mean()


def naive_sigmoid_kd(s, t):
    q = torch.sigmoid(t)
    p = torch.sigmoid(s)
    bce = -(q * torch.log(p) + (1 - q) * torch.log(1 - p))
    return (bce * (p - q).abs().pow(2)).sum(-1).mean()


def naive_box_kd(s, t, scores):
    from detkd.losses.boxes import giou  # the element-wise GIoU is shared; only the reduction is naive

    w = scores.max(-1).values
    return (2.5 * (1 - giou(s, t)) * w).sum() / w.sum()


# ----------------------------------------------------------------------------------------------------
def random_boxes(n_img, n_box, img, gen):
    """``n_img`` tensors of ``n_box`` xyxy pixel boxes inside an ``img x img`` image."""
    out = []
    for _ in range(n_img):
        xy = torch.rand(n_box, 2, generator=gen) * img * 0.8
        wh = 4 + torch.rand(n_box, 2, generator=gen) * img * 0.4
        out.append(torch.cat([xy, (xy + wh).clamp(max=img)], 1))
    return out


@dataclass
class Case:
    key: str
    title: str
    detkd: Callable[[], torch.Tensor] | Exception
    other: Callable[[], torch.Tensor] | Exception | None
    other_kind: str  # "ref" or "naive"
    leaves: list[torch.Tensor]
    other_leaves: list[torch.Tensor]
    grad_of: torch.Tensor | None  # the student input whose gradient the check compares
    seeded: bool = False  # reseed torch before each call (MGD: same random mask for both)


def _import(module: str, name: str):
    try:
        return getattr(importlib.import_module(module), name)
    except Exception as exc:  # noqa: BLE001 - any import problem means "unavailable"
        return exc


def build_cases(args, refs: Refs) -> list[Case]:
    n, c, k, img = args.batch, args.channels, args.classes, args.img
    levels = [img // 8, img // 16, img // 32]
    a = sum(x * x for x in levels)
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    cases: list[Case] = []

    def add(key, title, detkd_fn, ref_key, ref_fn, naive_fn, leaves, other_leaves=None, grad_of=None, seeded=False):
        ref_obj = refs.get(ref_key) if ref_key else None
        if ref_obj is not None and ref_fn is not None:
            try:
                other, kind = ref_fn(ref_obj), "ref"
            except Exception as exc:  # noqa: BLE001
                other, kind = exc, "ref"
        else:
            other, kind = naive_fn, "naive"
        cases.append(Case(key, title, detkd_fn, other, kind, leaves,
                          leaves if other_leaves is None else other_leaves, grad_of, seeded))

    feat_s = [torch.randn(n, c, h, h, generator=gen).requires_grad_(True) for h in levels]
    feat_t = [torch.randn(n, c, h, h, generator=gen) for h in levels]

    def levelwise(fn):
        return lambda: sum(fn(s, t) for s, t in zip(feat_s, feat_t))

    # --- FGD
    FGDLoss = _import("detkd.losses.fgd", "FGDLoss")
    for key, n_box in (("fgd30", args.boxes), ("fgd1", 1)):
        title = f"FGD, {n_box} box{'es' if n_box != 1 else ''}/img"
        if isinstance(FGDLoss, Exception):
            cases.append(Case(key, title, FGDLoss, None, "naive", [], [], None))
            continue
        gt = random_boxes(n, n_box, img, gen)
        torch.manual_seed(1)
        fgd = nn.ModuleList([FGDLoss(c, c) for _ in levels])
        with torch.no_grad():  # non-trivial relation branch (the reference init zeros its last conv)
            for m in fgd:
                for blk in (m.channel_add_conv_s, m.channel_add_conv_t):
                    blk[-1].weight.normal_(0, 0.01)
        detkd_fn = lambda fgd=fgd, gt=gt: sum(  # noqa: E731
            m(s, t, gt, (img, img)) for m, s, t in zip(fgd, feat_s, feat_t)
        )

        def ref_fgd(cls, fgd=fgd, gt=gt):
            mods = nn.ModuleList([cls(c, c, name=f"fgd_{i}") for i in range(len(levels))])
            mods.load_state_dict(fgd.state_dict())
            metas = [{"img_shape": (img, img, 3)} for _ in range(n)]
            return mods, lambda: sum(m(s, t, gt, metas) for m, s, t in zip(mods, feat_s, feat_t))

        naive = lambda fgd=fgd, gt=gt: sum(  # noqa: E731
            naive_fgd(m, s, t, gt, (img, img)) for m, s, t in zip(fgd, feat_s, feat_t)
        )
        ref_mods = None
        if refs.get("fgd") is not None:
            try:
                ref_mods, ref_call = ref_fgd(refs.get("fgd"))
            except Exception as exc:  # noqa: BLE001
                ref_mods, ref_call = None, exc
        add(key, title, detkd_fn, "fgd", (lambda _o, rc=ref_call: rc) if ref_mods is not None else None, naive,
            list(feat_s) + list(fgd.parameters()),
            list(feat_s) + list(ref_mods.parameters() if ref_mods is not None else fgd.parameters()),
            grad_of=feat_s[0])

    # --- MGD
    MGDLoss = _import("detkd.losses.mgd", "MGDLoss")
    if isinstance(MGDLoss, Exception):
        cases.append(Case("mgd", "MGD", MGDLoss, None, "naive", [], [], None))
    else:
        torch.manual_seed(2)
        mgd = nn.ModuleList([MGDLoss(c, c) for _ in levels])
        detkd_fn = lambda: sum(m(s, t) for m, s, t in zip(mgd, feat_s, feat_t))  # noqa: E731
        ref_mods = None
        if refs.get("mgd") is not None:
            ref_mods = nn.ModuleList([refs.get("mgd")(c, c, name=f"mgd_{i}") for i in range(len(levels))])
            ref_mods.load_state_dict(mgd.state_dict())
        ref_call = (lambda: sum(m(s, t) for m, s, t in zip(ref_mods, feat_s, feat_t))) if ref_mods is not None else None
        add("mgd", "MGD", detkd_fn, "mgd", (lambda _o: ref_call) if ref_call else None,
            lambda: sum(naive_mgd(m, s, t) for m, s, t in zip(mgd, feat_s, feat_t)),
            list(feat_s) + list(mgd.parameters()),
            list(feat_s) + list(ref_mods.parameters() if ref_mods is not None else mgd.parameters()),
            grad_of=feat_s[0], seeded=True)

    # --- CWD, PKD, AT
    cwd_loss = _import("detkd.losses.features", "cwd_loss")
    for tau in (1.0, 4.0):
        fn = cwd_loss if isinstance(cwd_loss, Exception) else levelwise(lambda s, t, tau=tau: cwd_loss(s, t, tau=tau))
        add(f"cwd{int(tau)}", f"CWD tau {tau:g}", fn, "cwd",
            lambda cls, tau=tau: levelwise(cls(tau=tau)), levelwise(lambda s, t, tau=tau: naive_cwd(s, t, tau)),
            list(feat_s), grad_of=feat_s[0])
    pkd_loss = _import("detkd.losses.features", "pkd_loss")
    add("pkd", "PKD", pkd_loss if isinstance(pkd_loss, Exception) else (lambda: pkd_loss(feat_s, feat_t)), "pkd",
        lambda cls: (lambda m=cls(): m(tuple(feat_s), tuple(feat_t))), lambda: naive_pkd(feat_s, feat_t),
        list(feat_s), grad_of=feat_s[0])
    at_loss = _import("detkd.losses.features", "at_loss")
    add("at", "AT", at_loss if isinstance(at_loss, Exception) else levelwise(at_loss), "at",
        lambda cls: levelwise(cls()), levelwise(naive_at), list(feat_s), grad_of=feat_s[0])
    fitnet_loss = _import("detkd.losses.features", "fitnet_loss")
    add("fitnet", "FitNets (MSE)", fitnet_loss if isinstance(fitnet_loss, Exception) else levelwise(fitnet_loss),
        None, None, levelwise(naive_fitnet), list(feat_s), grad_of=feat_s[0])

    # --- logits: (N, K, A) classes on dim 1, as the reference takes them
    kd_loss = _import("detkd.losses.logits", "kd_loss")
    logit_s = torch.randn(n, k, a, generator=gen).mul_(3).requires_grad_(True)
    logit_t = torch.randn(n, k, a, generator=gen).mul_(3)
    add("kd", f"Hinton KD, dense logits ({n}, {k}, {a}), T=4",
        kd_loss if isinstance(kd_loss, Exception) else (lambda: kd_loss(logit_s, logit_t, temperature=4.0)), "kd",
        lambda cls: (lambda m=cls(tau=4.0): m(logit_s, logit_t)), lambda: naive_kd(logit_s, logit_t, 4.0),
        [logit_s], grad_of=logit_s)
    sigmoid_kd_loss = _import("detkd.losses.logits", "sigmoid_kd_loss")
    sig_s = torch.randn(n, a, k, generator=gen).requires_grad_(True)
    sig_t = torch.randn(n, a, k, generator=gen)
    add("sigmoid_kd", f"sigmoid KD (QFL), ({n}, {a}, {k})",
        sigmoid_kd_loss if isinstance(sigmoid_kd_loss, Exception) else (lambda: sigmoid_kd_loss(sig_s, sig_t)),
        None, None, lambda: naive_sigmoid_kd(sig_s, sig_t), [sig_s], grad_of=sig_s)

    # --- boxes
    ld_loss = _import("detkd.losses.boxes", "ld_loss")
    rows, bins = n * a * 4, args.bins
    bins_s = torch.randn(rows, bins, generator=gen).mul_(3).requires_grad_(True)
    bins_t = torch.randn(rows, bins, generator=gen).mul_(3)
    add("ld", f"LD, {rows:,} rows x {bins} bins, T=10",
        ld_loss if isinstance(ld_loss, Exception) else (lambda: ld_loss(bins_s, bins_t, temperature=10.0)), "ld",
        lambda cls: (lambda m=cls(T=10): m(bins_s, bins_t)), lambda: naive_ld(bins_s, bins_t, 10.0),
        [bins_s], grad_of=bins_s)
    box_kd_loss = _import("detkd.losses.boxes", "box_kd_loss")
    xy = torch.rand(n, a, 2, generator=gen) * img
    wh = 2 + torch.rand(n, a, 2, generator=gen) * img / 4
    box_t = torch.cat([xy, xy + wh], -1)
    box_s = (box_t + torch.randn(n, a, 4, generator=gen) * 3).requires_grad_(True)
    scores_t = torch.rand(n, a, k, generator=gen)
    add("box_kd", f"box KD (GIoU), ({n}, {a}, 4)",
        box_kd_loss if isinstance(box_kd_loss, Exception) else (lambda: box_kd_loss(box_s, box_t, scores_t)),
        None, None, lambda: naive_box_kd(box_s, box_t, scores_t), [box_s], grad_of=box_s)
    return cases


# ----------------------------------------------------------------------------------------------------
def _call(fn, leaves, seeded):
    for p in leaves:
        p.grad = None
    if seeded:
        torch.manual_seed(1234)
    t0 = time.perf_counter()
    loss = fn()
    loss.backward()
    dt = time.perf_counter() - t0
    del loss
    return dt


def check(case: Case) -> str:
    """Loss values and student gradients of the pair on the same inputs."""
    out = []
    for fn, leaves in ((case.detkd, case.leaves), (case.other, case.other_leaves)):
        for p in leaves:
            p.grad = None
        if case.seeded:
            torch.manual_seed(1234)
        loss = fn()
        loss.backward()
        out.append((loss.detach().double(), None if case.grad_of is None else case.grad_of.grad.detach().double()))
    (va, ga), (vb, gb) = out
    rel_v = ((va - vb).abs() / vb.abs().clamp(min=1e-30)).item()
    msg = f"value rel diff {rel_v:.1e}"
    if ga is not None and gb is not None:
        rel_g = ((ga - gb).norm() / gb.norm().clamp(min=1e-30)).item()
        msg += f", student grad rel diff (L2) {rel_g:.1e}"
    for p in case.leaves + case.other_leaves:
        p.grad = None
    return msg


def interleaved(case: Case, rounds: int, warmup: int, budget_s: float) -> tuple[list[float], list[float]]:
    """Per-round fwd+bwd seconds of (detkd, other), each round running both, first one alternating."""
    pair = [(case.detkd, case.leaves), (case.other, case.other_leaves)]
    for _ in range(warmup):
        for fn, leaves in pair:
            _call(fn, leaves, case.seeded)
    times: tuple[list[float], list[float]] = ([], [])
    start = time.perf_counter()
    for r in range(rounds):
        order = (1, 0) if r % 2 == 0 else (0, 1)  # reference first on even rounds
        for i in order:
            times[i].append(_call(pair[i][0], pair[i][1], case.seeded))
        if time.perf_counter() - start > budget_s and r >= 2:
            break
    for _, leaves in pair:
        for p in leaves:
            p.grad = None
    return times


def _spread(xs: list[float]) -> float:
    if len(xs) < 4:
        return float("nan")
    q = statistics.quantiles(xs, n=4)
    return (q[2] - q[0]) / statistics.median(xs)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--refs", type=Path, default=None,
                    help="folder with local checkouts of the reference repositories (see above)")
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    ap.add_argument("--rounds", type=int, default=9, help="interleaved rounds per case (default 9)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed calls of each implementation first (default 1)")
    ap.add_argument("--budget-s", type=float, default=300.0,
                    help="stop a case's rounds after this many seconds (at least 3 rounds; default 300)")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--channels", type=int, default=256)
    ap.add_argument("--img", type=int, default=640, help="input size; levels are img/8, img/16, img/32")
    ap.add_argument("--boxes", type=int, default=30, help="gt boxes per image (FGD; a 1-box case is also run)")
    ap.add_argument("--classes", type=int, default=80)
    ap.add_argument("--bins", type=int, default=17, help="LD bins per box side (mmdet reg_max 16 -> 17)")
    ap.add_argument("--only", default="", help="comma-separated case keys: fgd30,fgd1,mgd,cwd1,cwd4,pkd,at,"
                                              "fitnet,kd,sigmoid_kd,ld,box_kd (default all)")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    refs = load_refs(args.refs.expanduser() if args.refs else None)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, batch {args.batch}, C {args.channels}, "
          f"levels {[args.img // 8, args.img // 16, args.img // 32]}, classes {args.classes}, "
          f"boxes/img {args.boxes}; up to {args.rounds} interleaved rounds (+{args.warmup} warmup) per case")
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs")
    if args.refs is None:
        print("no --refs: comparing with the plain versions in this script (naive), not the published code")
    else:
        for key, why in sorted(refs.missing.items()):
            print(f"reference {key}: unavailable ({why}); that case uses the naive version")

    only = {x.strip() for x in args.only.split(",") if x.strip()}
    cases = [cs for cs in build_cases(args, refs) if not only or cs.key in only]
    header = (f"{'case':<44} {'vs':<5} {'other ms':>9} {'detkd ms':>9} {'ratio':>6} {'paired':>12} "
              f"{'spread o/d':>11} {'peak MiB o / d (kept)':>24}")
    rows = []
    for case in cases:
        if isinstance(case.detkd, Exception) or isinstance(case.other, Exception) or case.other is None:
            bad = case.detkd if isinstance(case.detkd, Exception) else case.other
            rows.append(f"{case.title:<44} unavailable ({type(bad).__name__}: {str(bad).splitlines()[0][:60]})")
            print(rows[-1], flush=True)
            continue
        try:
            mem_d = mem_o = None
            if not args.no_memory:
                mem_d = measure_memory(case.detkd, case.leaves)
                mem_o = measure_memory(case.other, case.other_leaves)
            print(f"{case.title}: {check(case)}", flush=True)
            t_d, t_o = interleaved(case, args.rounds, args.warmup, args.budget_s)
        except Exception as exc:  # noqa: BLE001
            rows.append(f"{case.title:<44} failed ({type(exc).__name__}: {str(exc).splitlines()[0][:70]})")
            print(rows[-1], flush=True)
            continue
        med_d, med_o = statistics.median(t_d), statistics.median(t_o)
        paired = sorted(o / d for o, d in zip(t_o, t_d))
        lo = paired[len(paired) // 4]
        hi = paired[(3 * len(paired)) // 4]
        mem = "n/a"
        if mem_d is not None and mem_o is not None:
            mem = f"{mem_o[0]:.0f} / {mem_d[0]:.0f} ({mem_o[1]:.0f} / {mem_d[1]:.0f})"
        rows.append(
            f"{case.title:<44} {case.other_kind:<5} {med_o * 1e3:9.0f} {med_d * 1e3:9.0f} {med_o / med_d:5.2f}x "
            f"{lo:5.2f}-{hi:4.2f}x {_spread(t_o):5.2f}/{_spread(t_d):4.2f} {mem:>24}   n={len(t_d)}"
        )
        print(rows[-1], flush=True)
    print()
    print("fwd+bwd, medians of interleaved rounds; ratio = other / detkd (>1: detkd faster); paired = "
          "interquartile range of the per-round ratios; spread = IQR / median")
    print(header)
    print("-" * len(header))
    for row in rows:
        print(row)
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
