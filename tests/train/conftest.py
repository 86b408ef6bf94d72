"""Helpers for the trainer tests: small runs of the real loop on the 2-layer random Llama."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from trainhelpers import make_records, run_config  # noqa: E402


@pytest.fixture
def data_file(tmp_path: Path) -> Path:
    """Chat records whose replies differ in length, so micro-batches carry different labelled-token counts."""
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in make_records(24)))
    return path


@pytest.fixture
def make_config(tmp_path: Path, tiny_model_dir: Path, data_file: Path):
    def make(name: str = "run", **training: Any):
        return run_config(tiny_model_dir, data_file, tmp_path / name, **training)

    return make
