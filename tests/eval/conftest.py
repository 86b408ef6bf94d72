"""Fixtures for the eval tests; the components themselves are in eval_components.py."""

from __future__ import annotations

import pytest
from eval_components import TinyRun, build_tokenizer, run_tiny_finetune
from transformers import PreTrainedTokenizerFast


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    return build_tokenizer()


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> TinyRun:
    return run_tiny_finetune(tmp_path_factory.mktemp("tiny_run"))
