"""Batching: right padding, with labels masked on padding; packed rows keep their position ids."""

from __future__ import annotations

from typing import Any

import torch

from loraforge.data.tokenize import IGNORE_INDEX


class PadCollator:
    """Pad a list of {"input_ids", "labels"} examples to the longest in the batch (right padding).

    `pad_to_multiple_of` rounds the length up (8 helps tensor cores on a GPU).

    Packed rows (examples with `position_ids`, see packing.py) are batched without an `attention_mask`:
    transformers derives the per-example block-diagonal mask from the restarting position ids only when
    the mask is None. The padding gets position ids 0, 1, 2, ... of its own, so it forms a separate block
    that no real token attends to (and its labels are -100).
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None):
        self.pad_token_id = pad_token_id
        self.multiple = pad_to_multiple_of

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        length = max(len(e["input_ids"]) for e in examples)
        if self.multiple:
            length = -(-length // self.multiple) * self.multiple
        n = len(examples)
        packed = "position_ids" in examples[0]
        input_ids = torch.full((n, length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((n, length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((n, length), dtype=torch.long)
        position_ids = torch.arange(length, dtype=torch.long).repeat(n, 1)
        for i, e in enumerate(examples):
            k = len(e["input_ids"])
            input_ids[i, :k] = torch.as_tensor(e["input_ids"])
            labels[i, :k] = torch.as_tensor(e["labels"])
            attention_mask[i, :k] = 1
            if packed:
                position_ids[i, :k] = torch.as_tensor(e["position_ids"])
                position_ids[i, k:] = torch.arange(length - k)
        if packed:
            return {"input_ids": input_ids, "position_ids": position_ids, "labels": labels}
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
