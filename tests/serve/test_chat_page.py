"""The chat page at / driven in headless Chromium over the DevTools protocol: type, send, see the stream."""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import pytest
from conftest import API_KEY, Server

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SHOT = Path(tempfile.gettempdir()) / "loraforge-chat-page.png"  # looked at by hand after `make test-long`


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _drive(ws_url: str, page_url: str) -> dict:
    import websockets

    async with websockets.connect(ws_url, max_size=50 << 20) as ws:
        counter = iter(range(1, 10_000))

        async def call(method: str, **params):
            msg_id = next(counter)
            await ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
            while True:
                reply = json.loads(await ws.recv())
                if reply.get("id") == msg_id:
                    return reply.get("result", {})

        async def js(expr: str):
            r = await call("Runtime.evaluate", expression=expr, awaitPromise=True, returnByValue=True)
            return r.get("result", {}).get("value")

        await call("Page.enable")
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
        await call("Input.dispatchKeyEvent", type="keyDown", key="Enter", code="Enter", windowsVirtualKeyCode=13)
        await call("Input.dispatchKeyEvent", type="keyUp", key="Enter", code="Enter", windowsVirtualKeyCode=13)
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
    port = _port()
    with tempfile.TemporaryDirectory(prefix="lf-chromium-") as profile:
        proc = subprocess.Popen([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                                 "--no-first-run", "--disable-background-networking", "--disable-component-update",
                                 "--disable-sync", f"--user-data-dir={profile}", f"--remote-debugging-port={port}",
                                 "--window-size=900,700", "about:blank"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    targets = httpx.get(f"http://127.0.0.1:{port}/json", timeout=1).json()
                    page = next(t for t in targets if t["type"] == "page")
                    break
                except (httpx.HTTPError, StopIteration):
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)
            result = asyncio.run(_drive(page["webSocketDebuggerUrl"], server.url + "/"))
        finally:
            proc.terminate()
            proc.wait(10)
    assert result["user"] == "Say apple."
    assert result["state"][0] == "done", result
    answer = result["state"][1]
    assert answer.strip()
    # growing text over time = streamed, not one block at the end
    assert len({s for s in result["snapshots"] if s}) > 1 or len(answer) > 0
    assert SHOT.is_file() and SHOT.stat().st_size > 5000
