"""Bounded load tests: many concurrent streaming and non-streaming requests, no errors allowed."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import pytest
from conftest import API_KEY, Server, start_server, stop_server
from lora_runs import make_lora_run

sys.path.insert(0, str(Path(__file__).parents[2] / "bench"))
from load_test import run_load_test  # noqa: E402


def test_short_load_on_the_tiny_model(server: Server) -> None:
    result = asyncio.run(run_load_test(server.url, "tiny-chat", requests=16, concurrency=4, max_tokens=8,
                                       api_key=API_KEY))
    assert result["errors"] == 0, result["first_errors"]


@pytest.mark.long
def test_load_64_requests_8_concurrent_on_the_embedded_model(embedded_model_dir: Path, tmp_path: Path) -> None:
    run = make_lora_run(tmp_path / "smollm2-chat", "smollm2-135m-instruct", scale=0.002)
    s = start_server([run], tmp_path / "serve.log", "--max-concurrency", "8", api_key=None)
    try:
        result = asyncio.run(run_load_test(s.url, "smollm2-chat", requests=64, concurrency=8, max_tokens=32))
    finally:
        stop_server(s)
    print("\nLOAD TEST " + json.dumps(result))
    assert result["errors"] == 0, result["first_errors"]
