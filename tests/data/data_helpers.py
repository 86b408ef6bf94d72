"""Small helpers shared by the data tests."""

from __future__ import annotations

from typing import Any

from loraforge.data.tokenize import IGNORE_INDEX


def trained_text(example: dict[str, list[int]], tokenizer: Any) -> str:
    """Decode the labelled tokens (what the loss trains on)."""
    ids = [t for t, lab in zip(example["input_ids"], example["labels"], strict=True) if lab != IGNORE_INDEX]
    return tokenizer.decode(ids, skip_special_tokens=False)


def full_text(example: dict[str, list[int]], tokenizer: Any) -> str:
    return tokenizer.decode(example["input_ids"], skip_special_tokens=False)
