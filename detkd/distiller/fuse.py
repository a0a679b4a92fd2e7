"""Conv + BatchNorm folding for the frozen teacher (``teacher_runtime.fuse``); framework-free (torch only)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from detkd.distiller.util import call as _call
from detkd.distiller.util import no_autocast as _no_autocast
from detkd.distiller.util import split_name as _split_name
from detkd.errors import ConfigError

__all__ = ["fuse_conv_bn"]


def _is_running_bn(m: nn.Module) -> bool:
    """A 2-D batch norm that normalises with stored statistics in eval mode (incl. torchvision's frozen BN)."""
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        return m.running_mean is not None and m.running_var is not None and not isinstance(m, nn.BatchNorm1d)
    return type(m).__name__ == "FrozenBatchNorm2d" and hasattr(m, "running_mean") and hasattr(m, "running_var")


def _conv_bn_candidates(model: nn.Module, keep: set[str]) -> list[tuple[nn.Module, str, str]]:
    """``(parent, conv_name, bn_name)`` for Conv2d -> BN pairs: neighbours in a plain ``nn.Sequential``, or
    children ``conv<s>`` / ``bn<s>`` (same suffix) of one module. Convs named in ``keep`` are skipped."""
    out = []
    for pname, parent in model.named_modules():
        kids = dict(parent.named_children())
        if isinstance(parent, nn.Sequential) and type(parent).forward is nn.Sequential.forward:
            names = list(kids)
            pairs = list(zip(names, names[1:]))
        else:
            pairs = [(c, "bn" + c[4:]) for c in kids if c.startswith("conv") and "bn" + c[4:] in kids]
        for c, b in pairs:
            conv, bn = kids[c], kids[b]
            full = f"{pname}.{c}" if pname else c
            if (type(conv) is nn.Conv2d and _is_running_bn(bn) and bn.running_mean.numel() == conv.out_channels
                    and full not in keep):
                out.append((parent, c, b))
    # a conv or BN shared by several pairs: leave it alone
    count: dict[int, int] = {}
    for parent, c, b in out:
        for m in (getattr(parent, c), getattr(parent, b)):
            count[id(m)] = count.get(id(m), 0) + 1
    return [(p, c, b) for p, c, b in out if count[id(getattr(p, c))] == 1 and count[id(getattr(p, b))] == 1]


def _leaves(x: Any) -> list[Tensor]:
    if isinstance(x, Tensor):
        return [x]
    if isinstance(x, dict):
        x = list(x.values())
    if isinstance(x, (list, tuple)):
        return [t for v in x for t in _leaves(v)]
    return [t for v in vars(x).values() for t in _leaves(v)] if hasattr(x, "__dataclass_fields__") else []


@torch.no_grad()
def fuse_conv_bn(model: nn.Module, example_inputs: Any, keep: Any = (), rtol: float = 1e-3) -> int:
    """Fold eval-mode BatchNorm into the Conv2d feeding it, in place; returns the number of pairs fused.

    For a conv ``y = W * x + b`` followed by BN with statistics ``mu, var`` and affine ``gamma, beta``
    (eps ``e``): ``s = gamma / sqrt(var + e)``, ``W' = W * s`` (per output channel), ``b' = (b - mu) * s + beta``;
    the BN is replaced by ``nn.Identity`` under the same name, so module names (and taps on the BN) still
    resolve and give the same output. Computed in float64, stored in the conv's dtype.

    Candidates are Conv2d -> BN neighbours of a plain ``nn.Sequential`` and ``conv``/``bn`` (``conv1``/``bn1``,
    ...) children of one module (Ultralytics' ``Conv``: ``act(bn(conv(x)))``; torchvision's ResNet blocks).
    A pair is fused only if, in a probe forward on ``example_inputs``, every input of the BN was an output of
    its conv (so ``Conv2``-style ``bn(conv(x) + cv2(x))`` is left alone); convs named in ``keep`` (tapped
    modules, whose own output would change) are skipped. After fusing, the model's outputs are compared with
    the probe's (max abs difference <= ``max(rtol, 8 * eps of the dtype)`` * max abs value, per tensor); on a
    mismatch everything is restored and a :class:`ConfigError` raised. Both forwards run with autocast off.
    The model should be in eval mode. Framework-free: no Ultralytics import (its own ``model.fuse()`` deletes
    the ``bn`` attributes, which would break taps).
    """
    keep = {_split_name(k)[0] for k in keep}
    cands = _conv_bn_candidates(model, keep)
    if not cands:
        return 0
    p0 = next(iter(model.parameters()))
    with _no_autocast(p0.device):
        return _fuse(model, example_inputs, cands, rtol)


def _fuse(model: nn.Module, example_inputs: Any, cands: list[tuple[nn.Module, str, str]], rtol: float) -> int:
    outs: dict[int, list[int]] = {}
    ok: dict[int, bool] = {}
    conv_of = {id(getattr(p, b)): getattr(p, c) for p, c, b in cands}
    kept: list[Any] = []  # conv outputs stay alive during the probe, so their ids stay unique

    def conv_hook(m: nn.Module, inputs: Any, output: Any) -> None:
        kept.append(output)
        outs.setdefault(id(m), []).append(id(output))

    def bn_hook(m: nn.Module, inputs: Any) -> None:
        good = bool(inputs) and id(inputs[0]) in outs.get(id(conv_of[id(m)]), [])
        ok[id(m)] = ok.get(id(m), True) and good

    handles = []
    try:
        for p, c, b in cands:
            handles.append(getattr(p, c).register_forward_hook(conv_hook))
            handles.append(getattr(p, b).register_forward_pre_hook(bn_hook))
        ref = _call(model, example_inputs)
    finally:
        for h in handles:
            h.remove()
    ref = [t.detach().clone() for t in _leaves(ref)]
    kept.clear()
    saved = []
    for p, c, b in cands:
        conv, bn = getattr(p, c), getattr(p, b)
        if not ok.get(id(bn), False):
            continue
        w = conv.weight
        scale = (bn.weight.double() if getattr(bn, "weight", None) is not None else 1.0) / torch.sqrt(
            bn.running_var.double() + bn.eps)
        shift = bn.bias.double() if getattr(bn, "bias", None) is not None else 0.0
        bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(scale)
        saved.append((p, c, b, bn, w.data, None if conv.bias is None else conv.bias.data))
        w.data = (w.double() * scale.view(-1, 1, 1, 1)).to(w.dtype)
        new_bias = ((bias - bn.running_mean.double()) * scale + shift).to(w.dtype)
        if conv.bias is None:
            conv.bias = nn.Parameter(new_bias, requires_grad=False)
        else:
            conv.bias.data = new_bias
        setattr(p, b, nn.Identity())
    if not saved:
        return 0
    new = [t.detach() for t in _leaves(_call(model, example_inputs))]

    def tol(a: Tensor) -> float:
        eps = torch.finfo(a.dtype).eps if a.is_floating_point() else 0.0
        return max(rtol, 8 * eps) * max(float(a.abs().max()), 1e-6)

    def differs(a: Tensor, n: Tensor) -> bool:
        if a.shape != n.shape:
            return True
        if not a.is_floating_point():  # masks, labels, indices: exactly
            return not torch.equal(a, n)
        return float((a.double() - n.double()).abs().max()) > tol(a)

    bad = len(new) != len(ref) or any(differs(a, n) for a, n in zip(ref, new) if a.numel())
    if bad:
        for p, c, b, bn, w, bias in saved:
            conv = getattr(p, c)
            conv.weight.data = w
            if bias is None:
                conv.bias = None
            else:
                conv.bias.data = bias
            setattr(p, b, bn)
        raise ConfigError("teacher_runtime.fuse: folding BatchNorm into the convs changed the teacher's outputs "
                          "(a conv output is also used elsewhere?); the teacher was restored. Set "
                          "teacher_runtime.fuse: false")
    return len(saved)
