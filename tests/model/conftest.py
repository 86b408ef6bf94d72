"""Fixtures for the model tests: one torch thread, tiny random models of each architecture."""

from __future__ import annotations

from pathlib import Path

import pytest
from tinymodels import ARCHS, make_tiny_model


class _LazyModels(dict):
    """Builds each architecture's model folder the first time a test asks for it (each takes ~1 s)."""

    def __init__(self, root: Path, tokenizer_dir: Path):
        super().__init__()
        self.root, self.tokenizer_dir = root, tokenizer_dir

    def __missing__(self, arch: str) -> Path:
        if arch not in ARCHS:
            raise KeyError(arch)
        self[arch] = make_tiny_model(self.root / arch, arch, tokenizer_dir=self.tokenizer_dir)
        return self[arch]


@pytest.fixture(scope="session")
def arch_dirs(tmp_path_factory: pytest.TempPathFactory, embedded_model_dir: Path) -> dict[str, Path]:
    """Tiny random models of every architecture in tinymodels.ARCHS (2 layers, the embedded tokenizer)."""
    return _LazyModels(tmp_path_factory.mktemp("archs"), embedded_model_dir)
