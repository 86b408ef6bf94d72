from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from lora_runs import shared_lora_run  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread() -> Iterator[None]:
    # A 2-layer model gains nothing from threads, and on a shared 2-core machine they only contend.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def lora_run(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """A run folder (config.yaml, loraforge_run.json, adapter/) on the tiny Llama, chat data, non-zero LoRA B."""
    return shared_lora_run(tmp_path_factory.getbasetemp() / "shared-runs", str(tiny_model_dir))
