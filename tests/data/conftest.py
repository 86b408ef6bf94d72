"""Fixtures for the data tests: one torch thread, a private tokenization cache, the real tokenizer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest


@pytest.fixture(autouse=True)
def private_cache(embedded_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test gets its own tokenization cache (after the embedded model is materialized in the real one)."""
    root = tmp_path / "lf-cache"
    monkeypatch.setenv("LORAFORGE_CACHE", str(root))
    return root


@pytest.fixture(scope="session")
def tokenizer(embedded_model_dir: Path) -> Any:
    from loraforge.config import ModelConfig
    from loraforge.model.load import load_tokenizer

    return load_tokenizer(str(embedded_model_dir), ModelConfig(model_name=str(embedded_model_dir), use_4bit=False))
