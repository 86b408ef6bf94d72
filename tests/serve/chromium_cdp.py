"""Headless Debian Chromium driven over the DevTools protocol (a websocket), for the chat page tests."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any

import httpx

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def chromium_page() -> Iterator[str]:
    """A fresh Chromium (its own profile folder) with one blank page; yields the page's websocket URL."""
    assert CHROMIUM is not None
    port = _port()
    with tempfile.TemporaryDirectory(prefix="lf-chromium-") as profile:
        proc = subprocess.Popen([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", f"--remote-debugging-port={port}",
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
            yield page["webSocketDebuggerUrl"]
        finally:
            proc.terminate()
            proc.wait(10)


class Page:
    """DevTools calls on one page: `call(method, **params)` and `js(expression)` (awaited, by value)."""

    def __init__(self, ws: Any) -> None:
        self.ws, self._ids = ws, iter(range(1, 1_000_000))

    async def call(self, method: str, **params: Any) -> dict:
        msg_id = next(self._ids)
        await self.ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        while True:
            reply = json.loads(await self.ws.recv())
            if reply.get("id") == msg_id:
                return reply.get("result", {})

    async def js(self, expr: str) -> Any:
        r = await self.call("Runtime.evaluate", expression=expr, awaitPromise=True, returnByValue=True)
        return r.get("result", {}).get("value")

    async def until(self, expr: str, timeout: float = 15.0) -> Any:
        """The value of `expr` once it is truthy (polled every 50 ms), or its last value at the timeout."""
        deadline = time.monotonic() + timeout
        while (value := await self.js(expr)) is None or not value:
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
        return value

    async def press_enter(self) -> None:
        for kind in ("keyDown", "keyUp"):
            await self.call("Input.dispatchKeyEvent", type=kind, key="Enter", code="Enter", windowsVirtualKeyCode=13)


def drive(ws_url: str, script: Callable[[Page], Awaitable[Any]]) -> Any:
    """Runs `script` on the page behind `ws_url` and returns what it returns."""
    import websockets  # a dev extra, imported by the tests that have checked it is installed

    async def run() -> Any:
        async with websockets.connect(ws_url, max_size=50 << 20) as ws:
            page = Page(ws)
            await page.call("Page.enable")
            return await script(page)

    return asyncio.run(run())
