"""Fixtures for the model tests: one torch thread, tiny random models of each architecture."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from tinymodels import make_tiny_model


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread() -> Iterator[None]:
    # Tiny matmuls gain nothing from threads on this shared 2-core machine; spinning threads cost a lot.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def arch_dirs(tmp_path_factory: pytest.TempPathFactory, embedded_model_dir: Path) -> dict[str, Path]:
    """llama2 / llama3 / mistral tiny random models (2 layers, the embedded tokenizer)."""
    root = tmp_path_factory.mktemp("archs")
    return {arch: make_tiny_model(root / arch, arch, tokenizer_dir=embedded_model_dir)
            for arch in ("llama2", "llama3", "mistral")}
