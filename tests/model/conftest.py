"""Fixtures for the model tests: one torch thread, tiny random models of each architecture."""

from __future__ import annotations

from pathlib import Path

import pytest
from tinymodels import make_tiny_model


@pytest.fixture(scope="session")
def arch_dirs(tmp_path_factory: pytest.TempPathFactory, embedded_model_dir: Path) -> dict[str, Path]:
    """llama2 / llama3 / mistral tiny random models (2 layers, the embedded tokenizer)."""
    root = tmp_path_factory.mktemp("archs")
    return {arch: make_tiny_model(root / arch, arch, tokenizer_dir=embedded_model_dir)
            for arch in ("llama2", "llama3", "mistral")}
