"""Shared set-up of the reliability suite: one tiny-model training recipe run through the real CLI."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from relharness import TrainRecipe  # noqa: E402


@pytest.fixture(scope="module")
def recipe(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> TrainRecipe:
    """12 steps of LoRA with dropout on the tiny Llama, a checkpoint every 2 steps."""
    return TrainRecipe.make(tmp_path_factory.mktemp("recipe"), tiny_model_dir)


API_KEY = "reliability-key-7c1e"
# The strict server: one request generates at a time (4 may wait), short timeout, tight caps.
STRICT = {"max_tokens": 4000, "prompt_tokens": 64, "timeout": 5.0, "concurrency": 1}
# The load server: enough room that well-formed traffic never needs a 429 or a 504.
LOAD = {"max_tokens": 256, "prompt_tokens": 200, "timeout": 60.0, "concurrency": 4}


def _server_args(limits: dict) -> list[str]:
    return ["--max-concurrency", str(limits["concurrency"]), "--max-tokens-limit", str(limits["max_tokens"]),
            "--max-prompt-tokens", str(limits["prompt_tokens"]), "--timeout", str(limits["timeout"])]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    sys.path.insert(0, str(Path(__file__).parents[1] / "infer"))
    from lora_runs import make_lora_run

    return make_lora_run(tmp_path_factory.mktemp("rel-runs") / "tiny-chat", str(tiny_model_dir))


@pytest.fixture(scope="session")
def servers(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory):
    """The strict and the load server over the tiny run, started side by side (each takes ~20 s to load)."""
    from concurrent.futures import ThreadPoolExecutor

    from relserver import start_server, stop_server

    logs = tmp_path_factory.mktemp("serve-logs")
    with ThreadPoolExecutor(2) as pool:
        futures = {name: pool.submit(start_server, [tiny_run], logs / f"{name}.log", *_server_args(limits),
                                     api_key=API_KEY)
                   for name, limits in (("strict", STRICT), ("load", LOAD))}
        started = {}
        try:
            for name, fut in futures.items():
                started[name] = fut.result()
        finally:
            if len(started) < len(futures):
                for s in started.values():
                    stop_server(s.proc)
    yield started
    for s in started.values():
        code = stop_server(s.proc)
        assert code in (0, -15), s.log.read_text()[-2000:]  # uvicorn re-raises the SIGTERM it handled


@pytest.fixture
def strict_server(servers):
    return servers["strict"]


@pytest.fixture
def load_server(servers):
    return servers["load"]
