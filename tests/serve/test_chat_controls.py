"""The chat page's sampling controls and its error display, in headless Chromium against a real uvicorn
server over a tiny random model: what the page sets is what the engine is asked for."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn
from chromium_cdp import CHROMIUM, Page, chromium_page, drive

from loraforge.serve.app import Limits, create_app
from loraforge.serve.engine import Engine, Request

KEY = "page-key"


@pytest.fixture(scope="module")
def live(tiny_model_dir: Path) -> Iterator[tuple[str, list[Request]]]:
    """A real HTTP server on a free port; the list collects every request the engine was handed."""
    engine = Engine([tiny_model_dir], max_batch=2, batch_wait_s=0.001)
    received: list[Request] = []
    submit = engine.submit
    engine.submit = lambda req: (received.append(req), submit(req))[1]
    config = uvicorn.Config(create_app(engine, Limits(api_key=KEY, max_tokens_limit=64)), host="127.0.0.1",
                            port=0, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}/", received
    server.should_exit = True
    thread.join(30)


async def _session(page: Page, url: str) -> dict:
    await page.call("Page.navigate", url=url)
    await page.until("document.getElementById('temperature') !== null")
    defaults = await page.js("['temperature', 'top_p', 'max_tokens'].map(i => document.getElementById(i).value)")
    await page.js(f"document.getElementById('key').value = {json.dumps(KEY)}; loadModels()")
    await page.until("document.getElementById('model').options.length")
    capped = await page.until("document.getElementById('max_tokens').max")
    await page.js("document.getElementById('temperature').value = '0.3';"
                  "document.getElementById('top_p').value = '0.8';"
                  "document.getElementById('max_tokens').value = '5'")
    await page.js("document.getElementById('input').focus()")
    await page.call("Input.insertText", text="Say apple.")
    await page.press_enter()
    done = await page.until("(() => { const a = document.querySelector('.msg.assistant');"
                            " return a && a.dataset.state !== 'streaming' ? a.dataset.state : null })()")
    # a wrong key: the pending bubble goes, the error shows, the text comes back to the box
    await page.js("document.getElementById('key').value = 'wrong'")
    await page.call("Input.insertText", text="Again?")
    await page.press_enter()
    error = await page.until("(() => { const e = document.querySelector('.msg.error');"
                             " return e ? e.textContent : null })()")
    return {"defaults": defaults, "capped": capped, "done": done, "error": error,
            "bubbles": await page.js("[...document.querySelectorAll('.msg')].map(m => m.className)"),
            "streaming": await page.js("document.querySelectorAll('[data-state=streaming]').length"),
            "input": await page.js("document.getElementById('input').value")}


@pytest.mark.long  # ~10 s: a browser and a server
@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium)")
def test_the_page_sends_its_sampling_controls_and_shows_a_failed_request(live) -> None:
    pytest.importorskip("websockets")
    url, received = live
    with chromium_page() as ws_url:
        result = drive(ws_url, lambda page: _session(page, url))
    assert result["defaults"] == ["0.7", "0.9", "256"]  # chat defaults, not the API's 1.0 / 1.0
    assert result["capped"] == "64"  # the server's --max-tokens-limit
    assert result["done"] == "done", result
    assert len(received) == 1  # the wrong key never reached the engine
    assert (received[0].temperature, received[0].top_p, received[0].max_tokens) == (0.3, 0.8, 5)
    assert "Invalid or missing API key" in result["error"]
    assert result["streaming"] == 0  # no bubble left waiting
    assert result["bubbles"] == ["msg user", "msg assistant", "msg error"]  # the unanswered question is gone
    assert result["input"] == "Again?"
