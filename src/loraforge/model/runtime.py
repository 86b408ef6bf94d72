"""Where a model's inputs go and the eval-mode switch, shared by evaluation and generation."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


def model_device(model: torch.nn.Module) -> torch.device:
    """The device inputs should go to: HF models say so (the first shard when `device_map` splits them)."""
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


@contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode (dropout off) for the duration, then the previous mode: the trainer evaluates mid-run."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)
