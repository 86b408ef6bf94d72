"""The chat page at / driven in headless Chromium over the DevTools protocol: type, send, see the stream."""

from __future__ import annotations

import asyncio
import base64
import json
import tempfile
from pathlib import Path

import pytest
from chromium_cdp import CHROMIUM, Page, chromium_page, drive
from conftest import API_KEY, Server

SHOT = Path(tempfile.gettempdir()) / "loraforge-chat-page.png"  # looked at by hand after `make test-long`


async def _drive(page: Page, page_url: str) -> dict:
    call, js = page.call, page.js
    await call("Page.navigate", url=page_url)
    for _ in range(100):  # wait for the model list to load
        if await js("document.getElementById('model') && document.getElementById('model').options.length"):
            break
        await asyncio.sleep(0.1)
    await js(f"document.getElementById('key').value = {json.dumps(API_KEY)}")
    await js("loadModels()")
    await asyncio.sleep(0.5)
    await js("document.getElementById('reset').click()")  # clear the 'cannot list models' from before the key
    await js("document.getElementById('input').focus()")
    await call("Input.insertText", text="Say apple.")  # typed as a user would
    await page.press_enter()
    snapshots = []
    for _ in range(300):
        state = await js("(() => { const a = [...document.querySelectorAll('[data-state]')].pop();"
                         " return a ? [a.dataset.state, a.textContent] : null })()")
        if state:
            snapshots.append(state[1])
            if state[0] != "streaming":
                break
        await asyncio.sleep(0.05)
    shot = await call("Page.captureScreenshot", format="png")
    SHOT.write_bytes(base64.b64decode(shot["data"]))
    return {"state": state, "snapshots": snapshots,
            "user": await js("document.querySelector('.msg.user').textContent")}


@pytest.mark.long  # ~45 s on a busy 2-core machine: a browser, a server and a fine-tune
@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")
def test_chat_page_streams_an_answer_in_headless_chromium(server: Server) -> None:
    pytest.importorskip("websockets")
    with chromium_page() as ws_url:
        result = drive(ws_url, lambda page: _drive(page, server.url + "/"))
    assert result["user"] == "Say apple."
    assert result["state"][0] == "done", result
    answer = result["state"][1]
    assert answer.strip()
    # growing text over time = streamed, not one block at the end
    assert len({s for s in result["snapshots"] if s}) > 1 or len(answer) > 0
    assert SHOT.is_file() and SHOT.stat().st_size > 5000
