"""PNG screenshots of a report page with headless Chromium, to look at a report without a browser."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

from loraforge.errors import LoraforgeError

CANDIDATES = ("chromium", "chromium-browser", "/usr/bin/chromium", "/usr/bin/chromium-browser")


class BrowserNotFoundError(LoraforgeError):
    """No Chromium executable to take the screenshot with."""


def find_chromium() -> str:
    """Path of a Chromium executable on PATH or in /usr/bin."""
    for name in CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    raise BrowserNotFoundError("Chromium is needed for screenshots and was not found (looked for "
                               f"{', '.join(CANDIDATES)}). Install it, e.g. `apt-get install -y chromium`.")


def screenshot_html(html_path: str | Path, png_path: str | Path, width: int = 1280, height: int = 1600,
                    timeout_s: float = 120.0) -> Path:
    """Render `html_path` in headless Chromium and save a `width` x `height` PNG to `png_path`."""
    html_path = Path(html_path).resolve()
    png_path = Path(png_path).resolve()
    if not html_path.is_file():
        raise FileNotFoundError(f"No HTML file at {html_path}.")
    png_path.parent.mkdir(parents=True, exist_ok=True)
    png_path.unlink(missing_ok=True)
    # A throwaway profile and no background services: the report is self-contained, nothing needs the network.
    with tempfile.TemporaryDirectory(prefix="loraforge-chromium-") as profile:
        cmd = [find_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--hide-scrollbars", f"--user-data-dir={profile}", f"--screenshot={png_path}",
               f"--window-size={width},{height}", html_path.as_uri()]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
    if proc.returncode != 0 or not png_path.is_file():
        raise LoraforgeError(f"Chromium could not screenshot {html_path} (exit {proc.returncode}): "
                             f"{proc.stderr.strip()[-800:]}")
    return png_path
