"""Adapters and feature-loss modules, sized by one probe forward of both models.

For each feature tap: a 1x1 conv (+ BN for ``adapter: auto | conv_bn``) when the channels differ and the method
neither aligns channels itself (MGD, FGD) nor is channel-free (AT); then the method's loss module (learnable
ones: MGD's generator, FGD's context blocks). The student map is resized bilinearly to the teacher's ``H, W`` at
loss time (:func:`align`) when strides differ.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detkd.config import FeatureTapConfig
from detkd.distiller.taps import Taps
from detkd.distiller.util import call
from detkd.errors import ConfigError
from detkd.losses.registry import FEATURE_METHODS

__all__ = ["align", "make_adapter", "make_tap", "probe_channels"]


def probe_channels(student: nn.Module, teacher_runner: Any, taps: list[FeatureTapConfig],
                   example_inputs: Any) -> list[tuple[int, int]]:
    """``(student channels, teacher channels)`` of each tap, from one no-grad forward of each model on
    ``example_inputs`` (the caller sets the student's mode and clears the teacher's recording)."""
    s_taps = Taps([t.student for t in taps], "student")
    with torch.no_grad():
        with s_taps.recording(student):
            call(student, example_inputs)
        teacher_runner.forward(example_inputs)
    out = []
    for i, tap in enumerate(taps):
        sf, tf = s_taps.tensor(tap.student), teacher_runner.tap(tap.teacher)
        if sf.dim() != 4 or tf.dim() != 4:
            raise ConfigError(f"distill.features[{i}]: taps must give (N, C, H, W) maps; got {tuple(sf.shape)} "
                              f"(student '{tap.student}') and {tuple(tf.shape)} (teacher '{tap.teacher}')")
        out.append((int(sf.shape[1]), int(tf.shape[1])))
    return out


def make_tap(i: int, tap: FeatureTapConfig, sc: int, tc: int) -> tuple[nn.Module, nn.Module]:
    """The adapter and the loss module of ``distill.features[i]`` for ``sc`` student / ``tc`` teacher channels."""
    method = FEATURE_METHODS[tap.method]
    needs_conv = sc != tc and not method.aligns_channels and not method.channel_free
    if tap.adapter == "none" and needs_conv:
        raise ConfigError(f"distill.features[{i}]: adapter 'none' but the student '{tap.student}' has {sc} "
                          f"channels and the teacher '{tap.teacher}' {tc}; use adapter: auto")
    if tap.adapter in ("conv", "conv_bn") or (tap.adapter == "auto" and needs_conv):
        out_c = sc if method.aligns_channels else tc  # MGD/FGD map channels themselves
        adapter = _conv(sc, out_c, tap.adapter)
        sc = out_c
    else:
        adapter = nn.Identity()
    try:
        loss = method.build(sc, tc, **tap.options)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"distill.features[{i}].options: {e}") from e
    return adapter, loss


def _conv(sc: int, out_c: int, kind: str) -> nn.Module:
    layers: list[nn.Module] = [nn.Conv2d(sc, out_c, 1, bias=kind == "conv")]
    if kind in ("auto", "conv_bn"):
        layers.append(nn.BatchNorm2d(out_c))
    return nn.Sequential(*layers)


def make_adapter(where: str, kind: str, sc: int, tc: int) -> nn.Module:
    """``sc`` -> ``tc`` channels: a 1x1 conv (+ BN for ``auto`` / ``conv_bn``), Identity for ``none`` or for
    ``auto`` when the channels agree."""
    if kind == "none" or (kind == "auto" and sc == tc):
        if sc != tc:
            raise ConfigError(f"{where}: adapter 'none' but the student has {sc} channels and the teacher {tc}; "
                              "use adapter: auto")
        return nn.Identity()
    return _conv(sc, tc, kind)


def align(adapter: nn.Module, s: Tensor, t: Tensor) -> Tensor:
    """The student map through its adapter, resized bilinearly to the teacher's ``H, W`` when they differ."""
    s = adapter(s)
    if s.shape[-2:] != t.shape[-2:]:
        s = F.interpolate(s, size=t.shape[-2:], mode="bilinear", align_corners=False)
    return s
