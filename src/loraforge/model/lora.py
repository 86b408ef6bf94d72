"""Attach a LoRA adapter through peft, and report what is trained."""

from __future__ import annotations

from typing import Any

import torch

from loraforge.config import LoRAConfig
from loraforge.errors import ConfigError


def linear_module_names(model: Any) -> list[str]:
    """Leaf names of the linear layers LoRA can target (e.g. q_proj), excluding the output head."""
    names = set()
    for full, module in model.named_modules():
        leaf = full.rsplit(".", 1)[-1]
        if leaf == "lm_head":
            continue
        if isinstance(module, torch.nn.Linear) or "Linear" in type(module).__name__ and hasattr(module, "weight"):
            names.add(leaf)
    return sorted(names)


def peft_config(cfg: LoRAConfig, model: Any) -> Any:
    from peft import LoraConfig

    targets = cfg.resolved_targets()
    available = linear_module_names(model)
    missing = [t for t in targets if t not in available]
    if missing:
        raise ConfigError(f"lora.target_modules: {missing} not found in this model. "
                          f"Its linear layers are: {', '.join(available)}.")
    init: Any = {"default": True, "gaussian": "gaussian", "pissa": "pissa", "loftq": "loftq"}[cfg.init_lora_weights]
    kwargs: dict[str, Any] = {}
    if cfg.init_lora_weights == "loftq":
        from peft import LoftQConfig

        kwargs["loftq_config"] = LoftQConfig(loftq_bits=4)
    return LoraConfig(
        r=cfg.r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, target_modules=targets,
        bias=cfg.bias, task_type=cfg.task_type, modules_to_save=cfg.modules_to_save,
        use_rslora=cfg.use_rslora, use_dora=cfg.use_dora, init_lora_weights=init, **kwargs,
    )


def attach_lora(model: Any, cfg: LoRAConfig) -> Any:
    """Wrap `model` in a peft LoRA model; the adapter weights are fp32 (the optimizer's precision)."""
    from peft import get_peft_model

    quantized = getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)
    if cfg.init_lora_weights == "loftq" and quantized:
        raise ConfigError("lora.init_lora_weights = 'loftq' quantizes the base itself: load it unquantized "
                          "(model.use_4bit=false model.use_8bit=false).")
    if cfg.init_lora_weights == "pissa" and quantized:
        raise ConfigError("lora.init_lora_weights = 'pissa' needs the full-precision base to take its singular "
                          "vectors; set model.use_4bit=false, or use 'loftq' for a quantized start.")
    peft_model = get_peft_model(model, peft_config(cfg, model))
    for p in peft_model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    return peft_model


def parameter_counts(model: Any) -> tuple[int, int]:
    """(trainable, total) parameters; 4-bit weights are counted as the parameters they represent."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel()
        if p.__class__.__name__ == "Params4bit":
            n *= 2  # two 4-bit values per stored byte
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total
