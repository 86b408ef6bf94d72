"""One parameter count: the memory report's and the trainer's model line both come from memory.parameter_counts,
which must equal the loaded model's own count with its adapter attached."""

from __future__ import annotations

from pathlib import Path

import pytest

from loraforge.config import LoRAConfig, RunConfig
from loraforge.model import lora as lora_module
from loraforge.model.memory import estimate, parameter_counts


@pytest.mark.parametrize("lora", [LoRAConfig(r=4, target_modules="all-linear"),
                                  LoRAConfig(r=8, use_dora=True, modules_to_save=["lm_head"])], ids=["lora", "dora"])
def test_counted_from_the_config_as_the_loaded_model_counts(tiny_model_dir: Path, lora: LoRAConfig) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    counts = parameter_counts(model.config, lora)
    assert counts == lora_module.parameter_counts(lora_module.attach_lora(model, lora))
    est = estimate(model.config, RunConfig(lora=lora))
    assert (est.trainable_params, est.total_params) == counts  # the memory report prints the same numbers
