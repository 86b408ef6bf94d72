from __future__ import annotations

import shutil

import pytest

from loraforge.eval import screenshot, write_report
from loraforge.eval.screenshot import BrowserNotFoundError, screenshot_html


@pytest.mark.skipif(not any(shutil.which(c) for c in screenshot.CANDIDATES), reason="Chromium not installed")
def test_screenshot_of_the_report(tiny_run, tmp_path):
    paths = write_report(tmp_path, tiny_run.results, tiny_run.metrics_jsonl, tiny_run.samples)
    png = screenshot_html(paths["html"], tmp_path / "report.png", width=800, height=600)
    assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert png.stat().st_size > 10_000  # a rendered page, not a blank image


def test_missing_browser_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(screenshot, "CANDIDATES", ("no-such-chromium",))
    page = tmp_path / "page.html"
    page.write_text("<p>hi</p>")
    with pytest.raises(BrowserNotFoundError, match="apt-get install -y chromium"):
        screenshot_html(page, tmp_path / "page.png")
