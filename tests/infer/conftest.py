from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from lora_runs import shared_lora_run  # noqa: E402


@pytest.fixture(scope="session")
def lora_run(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """A run folder (config.yaml, loraforge_run.json, adapter/) on the tiny Llama, chat data, non-zero LoRA B."""
    return shared_lora_run(tmp_path_factory.getbasetemp() / "shared-runs", str(tiny_model_dir))
