"""Shared fixtures: the embedded model folder and a tiny random Llama with the real tokenizer."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub
os.environ.setdefault("WANDB_MODE", "offline")

from tinymodels import embedded_tokenizer_dir, make_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def embedded_model_dir() -> Path:
    """The embedded SmolLM2-135M-Instruct as a cached Hugging Face folder (materialized once)."""
    return embedded_tokenizer_dir()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, embedded_model_dir: Path) -> Path:
    """A 2-layer random Llama-3-style model (GQA, rope scaling) with the SmolLM2 tokenizer."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama3", tokenizer_dir=embedded_model_dir)
