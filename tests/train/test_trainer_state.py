"""Two trainers in one Python process: Accelerate's process-wide state must not leak from the first."""

from __future__ import annotations

import math

from trainhelpers import losses

from loraforge.train.trainer import LLAMATrainer


def test_second_trainer_with_another_precision_in_the_same_process(make_config):
    """Accelerate keeps device and mixed precision in singletons; before the fix the second setup() raised
    "AcceleratorState has already been initialized and cannot be changed" (the sweep and notebooks train
    several times in one process; on a GPU machine a CPU run then a GPU run hit the same error)."""
    first = LLAMATrainer.from_config(make_config("fp32", mixed_precision="no"), log=lambda m: None)
    first.setup()
    assert first.accelerator.mixed_precision == "no" and first.accelerator.device.type == "cpu"

    second = LLAMATrainer.from_config(make_config("bf16", mixed_precision="bf16", max_steps=1), log=lambda m: None)
    second.setup()
    assert second.accelerator.mixed_precision == "bf16" and second.accelerator.device.type == "cpu"
    result = second.train()
    assert result.steps == 1 and math.isfinite(losses(result.run_dir)[1])
