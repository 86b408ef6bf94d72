"""Optimizer and learning-rate schedule."""

from __future__ import annotations

import math
from typing import Any

import torch

from loraforge.config import LoRAConfig, TrainingConfig


def param_groups(model: torch.nn.Module, cfg: TrainingConfig, lora: LoRAConfig | None = None) -> list[dict[str, Any]]:
    """Trainable parameters in groups: no weight decay on biases and norms; LoRA+ raises the B matrices' lr."""
    ratio = lora.loraplus_lr_ratio if lora else None
    groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim < 2 or "bias" in name or "norm" in name
        is_b = bool(ratio) and "lora_B" in name
        groups.setdefault((no_decay, is_b), []).append(p)
    out = []
    for (no_decay, is_b), params in sorted(groups.items()):
        out.append({"params": params, "weight_decay": 0.0 if no_decay else cfg.weight_decay,
                    "lr": cfg.learning_rate * (ratio if is_b else 1.0)})
    return out


def build_optimizer(model: torch.nn.Module, cfg: TrainingConfig, device: torch.device,
                    lora: LoRAConfig | None = None, notice=print) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg, lora)
    if cfg.optim.startswith("paged_") and device.type != "cuda":
        notice(f"optimizer: {cfg.optim} pages state through CUDA unified memory, which a CPU run has not; "
               "using torch AdamW (same update rule).")
        return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(0.9, 0.999), eps=1e-8)
    if cfg.optim == "paged_adamw_32bit":
        # bitsandbytes' PagedAdamW32bit update rule and paged fp32 states, stepped by torch's fused
        # multi-tensor kernel instead of one launch + prefetch + device sync per parameter (kernels/optim.py).
        from loraforge.kernels.optim import fused_paged_adamw_32bit

        return fused_paged_adamw_32bit(groups, lr=cfg.learning_rate)
    if cfg.optim == "paged_adamw_8bit":
        import bitsandbytes as bnb

        return bnb.optim.PagedAdamW8bit(groups, lr=cfg.learning_rate)
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(0.9, 0.999), eps=1e-8,
                             fused=device.type == "cuda")


def lr_lambda(kind: str, warmup_steps: int, total_steps: int):
    """Multiplier of the peak lr at a step: linear warmup, then cosine/linear decay to 0, or constant."""

    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        if kind == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        progress = min(1.0, progress)
        if kind == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainingConfig, total_steps: int):
    warmup = int(math.ceil(cfg.warmup_ratio * total_steps))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.lr_scheduler_type, warmup, total_steps))
