"""Screenshot a detkd report page with headless Chromium, to check how it reads.

    python tools/render_report.py REPORT_HTML OUT_PNG [--width 1280] [--height 2400]

Needs a local Chromium (Debian: ``apt-get install chromium``). Runs fully offline: no GPU, no network
features, a throwaway profile directory.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


def find_chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        exe = shutil.which(name)
        if exe:
            return exe
    raise SystemExit("render_report: no chromium found (Debian: apt-get install -y chromium)")


def render(html: Path, out_png: Path, width: int = 1280, height: int = 2400, timeout: float = 120) -> Path:
    html, out_png = Path(html).resolve(), Path(out_png).resolve()
    if not html.is_file():
        raise SystemExit(f"render_report: {html} not found")
    out_png.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="detkd-chromium-") as profile:
        cmd = [find_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--hide-scrollbars", f"--user-data-dir={profile}", f"--screenshot={out_png}",
               f"--window-size={width},{height}", html.as_uri()]  # fmt: skip
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0 or not out_png.is_file():
        raise SystemExit(f"render_report: chromium failed (exit {r.returncode}):\n{r.stderr[-2000:]}")
    return out_png


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("html", type=Path)
    ap.add_argument("out_png", type=Path)
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--height", type=int, default=2400)
    a = ap.parse_args(argv)
    print(render(a.html, a.out_png, a.width, a.height))
    return 0


if __name__ == "__main__":
    sys.exit(main())
