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
