"""Shared fixtures: the embedded model folder and a tiny random Llama with the real tokenizer."""

from __future__ import annotations

import io
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub
os.environ.setdefault("WANDB_MODE", "offline")

from tinymodels import embedded_tokenizer_dir, make_tiny_model  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread() -> Iterator[None]:
    # The tiny models gain nothing from threads, and on a 2-core machine shared with other work two
    # spinning OpenMP threads made single steps up to 50x slower (33 s instead of 0.6 s, measured).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def embedded_model_dir() -> Path:
    """The embedded SmolLM2-135M-Instruct as a cached Hugging Face folder (materialized once)."""
    return embedded_tokenizer_dir()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, embedded_model_dir: Path) -> Path:
    """A 2-layer random Llama-3-style model (GQA, rope scaling) with the SmolLM2 tokenizer."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama3", tokenizer_dir=embedded_model_dir)


@pytest.fixture
def terminal(monkeypatch: pytest.MonkeyPatch) -> io.StringIO:
    """Progress bars drawn as on a terminal, into the returned buffer (loraforge.progress's console)."""
    from rich.console import Console

    from loraforge import progress

    screen = io.StringIO()
    monkeypatch.setattr(progress, "console", lambda: Console(file=screen, force_terminal=True, width=200))
    return screen
