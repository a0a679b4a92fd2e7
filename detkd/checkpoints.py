"""Checkpoints from others are loaded without running their code.

A ``.pt`` file is a pickle: loading it with ``torch.load(weights_only=False)`` (Ultralytics' default) runs any
``__reduce__`` payload inside it. detkd therefore

1. sets ``ULTRALYTICS_SAFE_LOAD=1`` for every load that goes through Ultralytics (teacher, student, eval, bench,
   resume; see `detkd.integrations.ultralytics_env.ensure_ultralytics_offline`): ``weights_only=True`` against
   Ultralytics' allow-list of model classes, so a payload never runs;
2. scans a checkpoint *before* loading it (`check_checkpoint`), without unpickling anything, and refuses with one
   clear line naming the file and the globals it references that are not model classes.

Opt-out for a file you trust (e.g. a checkpoint whose model uses your own module classes):
``DETKD_TRUST_CHECKPOINTS=1`` in the environment, or ``--trust-checkpoints`` on any ``detkd`` command. Then
Ultralytics' default loader is used, which runs the file's pickled code.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

from detkd.errors import DataError

TRUST_ENV = "DETKD_TRUST_CHECKPOINTS"

# Globals an Ultralytics / torchvision checkpoint legitimately references beyond torch's own weights_only set.
_NAMES = {
    "ultralytics.utils.IterableSimpleNamespace",
    "ultralytics.yolo.utils.IterableSimpleNamespace",
    "numpy.dtype",
    "numpy.core.multiarray.scalar",
    "numpy._core.multiarray.scalar",
    "torch.nn.parameter.Parameter", "torch.nn.parameter.UninitializedParameter",  # tensor subclasses
    "torch.nn.parameter.Buffer", "torch.nn.parameter.UninitializedBuffer",
    "builtins.getattr",  # Ultralytics' safe loader restricts it to nn.Module attributes
    "pathlib.PosixPath", "pathlib.WindowsPath", "pathlib._local.PosixPath", "pathlib._local.WindowsPath",
}
_MODULE_NAMESPACES = ("torch.nn.modules", "ultralytics.nn.modules", "ultralytics.nn.tasks", "torchvision.models",
                      "torchvision.ops")
_CLASS_MODULES = ("ultralytics.utils.loss", "ultralytics.utils.tal", "ultralytics.nn.distill_model")


class CheckpointError(DataError):
    """A checkpoint that is missing, unreadable or refused as unsafe."""


def trusted() -> bool:
    """True when the user opted out of safe loading (``DETKD_TRUST_CHECKPOINTS=1``)."""
    return os.environ.get(TRUST_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def _allowed(name: str) -> bool:
    if name in _NAMES or name.startswith("numpy.dtypes."):
        return True
    module, _, attr = name.rpartition(".")
    in_ns = any(module == ns or module.startswith(ns + ".") for ns in _MODULE_NAMESPACES)
    if not (in_ns or module in _CLASS_MODULES):
        return False
    if module.startswith("ultralytics"):
        from detkd.integrations.ultralytics_env import ensure_ultralytics_offline

        ensure_ultralytics_offline()
    try:  # only modules inside the namespaces above are imported: never a module the file names freely
        obj = getattr(importlib.import_module(module), attr, None)
    except Exception:
        return False
    if not isinstance(obj, type):
        return False
    if module in _CLASS_MODULES:
        return obj.__module__ == module
    import torch.nn as nn

    return issubclass(obj, nn.Module)


def unsafe_globals(path: str | os.PathLike) -> list[str]:
    """Globals referenced by the pickle inside ``path`` that are neither torch-safe nor model classes.

    Reads the archive's pickle opcodes only (``torch.serialization.get_unsafe_globals_in_checkpoint``); nothing
    is unpickled. Raises `CheckpointError` when the file is not a ``torch.save`` zip archive.
    """
    import torch

    p = Path(path)
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(str(p))
    except Exception as e:  # not a zip archive (random bytes, truncated, legacy pickle, TorchScript...)
        raise CheckpointError(
            f"{p}: not a PyTorch checkpoint detkd can read safely ({type(e).__name__}: {str(e).splitlines()[0][:160]}). "
            f"Expected a .pt written by Ultralytics or torch.save; if it is one, the file is damaged.") from None
    return sorted(n for n in names if not _allowed(n))


def check_checkpoint(path: str | os.PathLike, role: str = "checkpoint") -> Path:
    """Refuse a checkpoint that is missing, unreadable, or would run code when loaded (unless trusted).

    Returns the path. ``role`` names the file in messages (``"teacher"``, ``"student"``, ``"model"``...).
    """
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{role} checkpoint not found: {p}")
    if p.suffix.lower() != ".pt" or trusted():
        return p
    bad = unsafe_globals(p)
    if bad:
        shown = ", ".join(bad[:5]) + (f" (+{len(bad) - 5} more)" if len(bad) > 5 else "")
        raise CheckpointError(
            f"{role} {p}: refused to load: it references {shown}, which is not a model class and would run code "
            f"when unpickled. If you trust this file, rerun with --trust-checkpoints (or {TRUST_ENV}=1).")
    return p
