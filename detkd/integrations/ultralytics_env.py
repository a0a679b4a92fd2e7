"""Offline settings for Ultralytics. Import-free of Ultralytics itself: call before `import ultralytics`.

Ultralytics reaches the network in a few places (see shared FACTS): a DNS check at import (skipped with
`YOLO_OFFLINE=1`), pip auto-installs (`YOLO_AUTOINSTALL=False`), and a font download from `check_font`
that ignores `YOLO_OFFLINE` unless `$YOLO_CONFIG_DIR/Ultralytics/Arial.ttf` already exists. detkd sets all
three and copies a local TTF (matplotlib's bundled DejaVuSans) into place.
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
    os.environ.setdefault("YOLO_OFFLINE", "1")
    os.environ.setdefault("YOLO_AUTOINSTALL", "False")
    os.environ.setdefault("YOLO_VERBOSE", os.environ.get("YOLO_VERBOSE", "True"))
    cfg = Path(os.environ.setdefault("YOLO_CONFIG_DIR", str(detkd_home() / "ultralytics"))).expanduser()
    fonts_dir = cfg / "Ultralytics"
    fonts_dir.mkdir(parents=True, exist_ok=True)
    src = _local_font()
    if src is not None:
        for name in ("Arial.ttf", "Arial.Unicode.ttf"):
            dst = fonts_dir / name
            if not dst.exists():
                tmp = dst.with_suffix(".tmp")
                shutil.copyfile(src, tmp)
                os.replace(tmp, dst)
    if "ultralytics" in sys.modules:  # already imported: make its settings agree where they are read lazily
        try:
            from ultralytics.utils import SETTINGS

            SETTINGS.update({"sync": False})
        except Exception:
            pass
    return cfg
