"""Fixtures for the eval tests; the components themselves are in eval_components.py."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from eval_components import TinyRun, build_tokenizer, run_tiny_finetune
from transformers import PreTrainedTokenizerFast


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread() -> Iterator[None]:
    # Tiny matmuls gain nothing from threads, and on a busy 2-core machine two spinning threads made
    # this folder 50x slower (33 s vs 0.6 s for the fine-tune below).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    return build_tokenizer()


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> TinyRun:
    return run_tiny_finetune(tmp_path_factory.mktemp("tiny_run"))
