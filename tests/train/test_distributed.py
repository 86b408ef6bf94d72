"""The Accelerate set-up in distributed.py, as one process sees it (several processes: tests/distributed)."""

from __future__ import annotations

import torch

from loraforge.train.distributed import resolve_mixed_precision


def test_mixed_precision_auto_is_off_on_cpu():
    # fp16 with a loss scaler needs a CUDA device (torch's GradScaler on CPU is not used by Accelerate's
    # CPU path); it is exercised by the GPU tests, not here.
    assert resolve_mixed_precision("auto", torch.device("cpu")) == "no"
    assert resolve_mixed_precision("bf16", torch.device("cpu")) == "bf16"
