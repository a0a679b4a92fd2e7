"""Offline settings for Ultralytics. Import-free of Ultralytics itself: call before `import ultralytics`.

Ultralytics reaches the network in a few places (see shared FACTS): a DNS check at import (skipped with
`YOLO_OFFLINE=1`), pip auto-installs (`YOLO_AUTOINSTALL=False`), and a font download from `check_font`
that ignores `YOLO_OFFLINE` unless `$YOLO_CONFIG_DIR/Ultralytics/Arial.ttf` already exists. detkd sets all
three and copies a local TTF (matplotlib's bundled DejaVuSans) into place.

Two more promises live here because every detkd path that loads a model or an ONNX session calls this first:
- ``ULTRALYTICS_SAFE_LOAD=1``: checkpoints are unpickled with ``weights_only=True`` against Ultralytics' allow-list
  of model classes, so a ``.pt`` carrying a pickled payload does not run it (opt-out: ``DETKD_TRUST_CHECKPOINTS=1``,
  see `detkd.checkpoints`);
- ``ORT_DISABLE_TELEMETRY=1``: onnxruntime's native telemetry (DNS queries from C++ once a session lives a few
  seconds) is off; it is read when onnxruntime is imported, so `detkd/__init__.py` sets it too.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path


def detkd_home() -> Path:
    """detkd's own writable directory (`$DETKD_HOME`, default `~/.config/detkd`)."""
    return Path(os.environ.get("DETKD_HOME", Path.home() / ".config" / "detkd")).expanduser()


def _local_font() -> Path | None:
    try:
        import matplotlib

        p = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
        if p.is_file():
            return p
    except Exception:  # matplotlib is an Ultralytics dependency; tolerate its absence anyway
        pass
    for cand in ("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf", "/usr/share/fonts/TTF/DejaVuSans.ttf"):
        if Path(cand).is_file():
            return Path(cand)
    return None


def ensure_ultralytics_offline() -> Path:
    """Make Ultralytics run with zero network calls. Idempotent; returns the config dir in use.

    Respects a `YOLO_CONFIG_DIR` the user already set. Must run before Ultralytics is first imported for
    the environment variables to take effect; the font copy works at any time.
    """
    import importlib.util

    if "ultralytics" not in sys.modules and importlib.util.find_spec("ultralytics") is None:
        from detkd.errors import DetkdError

        raise DetkdError("this needs Ultralytics, which is an optional extra (AGPL-3.0): "
                         "pip install -c constraints.txt 'detkd[ultralytics]' (or -e '.[ultralytics]' in a checkout)")
    os.environ.setdefault("YOLO_OFFLINE", "1")
    os.environ["ORT_DISABLE_TELEMETRY"] = "1"
    ensure_safe_loading()
    os.environ.setdefault("YOLO_AUTOINSTALL", "False")
    os.environ.setdefault("YOLO_VERBOSE", os.environ.get("YOLO_VERBOSE", "True"))
    cfg = Path(os.environ.setdefault("YOLO_CONFIG_DIR", str(detkd_home() / "ultralytics"))).expanduser()
    fonts_dir = cfg / "Ultralytics"
    fonts_dir.mkdir(parents=True, exist_ok=True)
    src = _local_font()
    if src is not None:
        for name in ("Arial.ttf", "Arial.Unicode.ttf"):
            dst = fonts_dir / name
            if not dst.exists():  # unique temp name: concurrent runs (two trainings at once) must not collide
                tmp = dst.with_name(f".{name}.{os.getpid()}.tmp")
                shutil.copyfile(src, tmp)
                os.replace(tmp, dst)
    if "ultralytics" in sys.modules:  # already imported: make its settings agree where they are read lazily
        try:
            from ultralytics.utils import SETTINGS

            SETTINGS.update({"sync": False})
        except Exception:
            pass
    return cfg


def atomic_dataset_caches() -> None:
    """Make Ultralytics write its labels ``*.cache`` files atomically (a unique temp file, then ``os.replace``).

    Its own writer does ``if path.exists(): path.unlink()`` before writing, so two trainings that scan the same
    labels at once (two stages of ``detkd demo`` / ``kd_benchmark.py --jobs 2``; a file list such as the few-label
    split shares ``labels/train.cache`` with the full split, with another hash, so the cache is rewritten whenever
    they alternate) race: the second ``unlink`` raises ``FileNotFoundError`` and that training dies at its start.
    Idempotent; call after importing Ultralytics."""
    import ultralytics.data.dataset as dataset
    import ultralytics.data.utils as data_utils

    if getattr(data_utils.save_dataset_cache_file, "_detkd_atomic", False):
        return

    def save_dataset_cache_file(prefix: str, path: Path, x: dict, version: str) -> None:
        import threading

        import numpy as np

        x["version"] = version
        path = Path(path)
        if not data_utils.is_dir_writeable(path.parent):
            data_utils.LOGGER.warning(f"{prefix}Cache directory {path.parent} is not writable, cache not saved.")
            return
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            with open(tmp, "wb") as fh:
                np.save(fh, x)
            os.replace(tmp, path)
            data_utils.LOGGER.info(f"{prefix}New cache created: {path}")
        except Exception as e:  # noqa: BLE001 - as Ultralytics: a cache that cannot be written is only a warning
            tmp.unlink(missing_ok=True)
            data_utils.LOGGER.warning(f"{prefix}Failed to save cache to {path}: {e}")

    save_dataset_cache_file._detkd_atomic = True
    data_utils.save_dataset_cache_file = save_dataset_cache_file
    if hasattr(dataset, "save_dataset_cache_file"):  # imported by name there
        dataset.save_dataset_cache_file = save_dataset_cache_file


def ensure_safe_loading() -> bool:
    """Make every Ultralytics checkpoint load ``weights_only`` (unless ``DETKD_TRUST_CHECKPOINTS=1``). Returns the mode.

    Ultralytics reads ``ULTRALYTICS_SAFE_LOAD`` once at import; if it is already imported, its module flags are
    updated too, so the setting holds either way.
    """
    from detkd.checkpoints import trusted

    safe = not trusted()
    os.environ["ULTRALYTICS_SAFE_LOAD"] = "1" if safe else "0"
    for name in ("ultralytics.utils", "ultralytics.nn.tasks"):
        mod = sys.modules.get(name)
        if mod is not None and hasattr(mod, "SAFE_LOAD"):
            mod.SAFE_LOAD = safe
    return safe
