"""Fixtures for the data tests: one torch thread, a private tokenization cache, the real tokenizer."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread() -> Iterator[None]:
    # Tiny matmuls gain nothing from threads on this shared 2-core machine; spinning threads cost a lot.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
