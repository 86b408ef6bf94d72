"""A real `loraforge serve` subprocess on 127.0.0.1 (free port) over two adapters of the tiny model."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "infer"))
from lora_runs import copy_run, shared_lora_run  # noqa: E402

API_KEY = "test-key-123"


@dataclass
class Server:
    url: str
    proc: subprocess.Popen
    models: list[str]
    log: Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(runs: list[Path], log: Path, *extra: str, api_key: str | None = API_KEY,
                 wait_s: float = 120.0) -> Server:
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "LORAFORGE_API_KEY": api_key or ""}
    cmd = [sys.executable, "-m", "loraforge.cli", "serve", *map(str, runs), "--port", str(port), *extra]
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            r = httpx.get(f"{url}/health", headers={"Authorization": f"Bearer {api_key}"}, timeout=2)
            if r.status_code == 200:
                return Server(url, proc, r.json()["models"], log)
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise RuntimeError(f"server did not come up in {wait_s}s:\n{log.read_text()[-3000:]}")


def stop_server(server: Server, timeout: float = 30.0) -> int:
    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGTERM)
        try:
            return server.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait()
    return server.proc.returncode


@pytest.fixture(scope="session")
def served_runs(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> list[Path]:
    first = shared_lora_run(tmp_path_factory.getbasetemp() / "shared-runs", str(tiny_model_dir))
    return [first, copy_run(first, tmp_path_factory.mktemp("serve-runs") / "tiny-chat-b", seed=7)]


@pytest.fixture(scope="session")
def server(served_runs: list[Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = start_server(served_runs, tmp_path_factory.mktemp("logs") / "serve.log", "--max-prompt-tokens", "300",
                     "--max-tokens-limit", "64", "--max-concurrency", "4")
    yield s
    # uvicorn re-raises the SIGTERM it handled after a graceful shutdown, hence -15 rather than 0.
    assert stop_server(s) in (0, -15), s.log.read_text()[-2000:]
