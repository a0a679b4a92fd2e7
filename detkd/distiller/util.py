"""Small helpers shared by the Distiller's parts (torch only)."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["Transient", "call", "image_shape", "no_autocast", "normal", "split_name"]


class Transient(dict):
    """A dict of one step's values. Copies and pickles of it are empty, so an object copied (Ultralytics' EMA) or
    pickled (DDP) between ``record()`` and ``kd(...)`` starts clean and never ships captured tensors."""

    def __deepcopy__(self, memo: dict) -> Transient:
        return type(self)()

    def __reduce__(self):
        return type(self), ()


def split_name(name: str) -> tuple[str, str | None]:
    """``'neck.p3:0'`` -> ``('neck.p3', '0')``; ``'neck.p3'`` -> ``('neck.p3', None)``."""
    mod, _, sel = name.partition(":")
    return mod, (sel or None)


def call(model: nn.Module, inputs: Any) -> Any:
    """``model(inputs)``, or ``model(*inputs)`` for a tuple / list of positional arguments."""
    return model(*inputs) if isinstance(inputs, (tuple, list)) else model(inputs)


def no_autocast(device: torch.device):
    """Autocast off for ``device`` (the losses run in float32)."""
    try:
        return torch.autocast(device_type=device.type, enabled=False)
    except RuntimeError:  # a device type autocast does not know
        return contextlib.nullcontext()


def normal(x: Tensor) -> Tensor:
    """``x``, or a clone of it when it is an inference tensor (autograd may not save those for backward)."""
    return x.clone() if x.is_inference() else x


def image_shape(inputs: Any) -> tuple[int, int] | None:
    """``(H, W)`` of a 4-D input tensor (or of the first positional argument), else None."""
    if isinstance(inputs, (tuple, list)) and inputs:
        inputs = inputs[0]
    if isinstance(inputs, Tensor) and inputs.dim() == 4:
        return int(inputs.shape[-2]), int(inputs.shape[-1])
    return None
