"""The memory report: what a run will need, computed from the model's config before anything large loads.

Bytes per parameter (bitsandbytes, blocksize 64): NF4/FP4 stores 0.5 byte plus an fp32 absmax per block
(+0.0625); double quantization stores that absmax in 8 bits with an fp32 scale per 256 blocks (+0.0158).
8-bit stores 1 byte plus an fp32 scale per row. A LoRA parameter costs 16 bytes: fp32 weight, fp32
gradient and two fp32 Adam moments (8-bit Adam: 2 bytes of state instead of 8).
Activations are an estimate for Llama blocks with SDPA attention (no seq² matrix): with checkpointing,
each layer keeps its bf16 input and one layer at a time is recomputed; the logits and their fp32 copies
in the loss (V per token, ~10 bytes each) are often the largest single item.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from loraforge.config import RunConfig
from loraforge.errors import ResourceError

GIB = 2**30


@dataclass
class MemoryEstimate:
    total_params: int
    trainable_params: int
    weights_bytes: float
    lora_bytes: float
    optimizer_bytes: float
    activation_bytes: float
    workspace_bytes: float

    @property
    def total_bytes(self) -> float:
        return self.weights_bytes + self.lora_bytes + self.optimizer_bytes + self.activation_bytes + self.workspace_bytes

    def lines(self) -> list[str]:
        g = lambda b: f"{b / GIB:6.2f} GiB"  # noqa: E731
        return [f"  parameters      {self.total_params / 1e6:,.1f}M total, {self.trainable_params / 1e6:,.2f}M trainable",
                f"  weights         {g(self.weights_bytes)}",
                f"  LoRA + grads    {g(self.lora_bytes)}",
                f"  optimizer state {g(self.optimizer_bytes)}",
                f"  activations     {g(self.activation_bytes)} (estimate)",
                f"  workspace       {g(self.workspace_bytes)}",
                f"  total           {g(self.total_bytes)}"]


def _shapes(config: Any) -> dict[str, int]:
    h = config.hidden_size
    nh = config.num_attention_heads
    d = getattr(config, "head_dim", None) or h // nh
    nkv = getattr(config, "num_key_value_heads", None) or nh
    return {"h": h, "i": config.intermediate_size, "L": config.num_hidden_layers, "V": config.vocab_size,
            "nh": nh, "nkv": nkv, "d": d, "tied": int(bool(getattr(config, "tie_word_embeddings", False)))}


def linear_shapes(config: Any) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each projection in one Llama decoder layer."""
    s = _shapes(config)
    h, i, d = s["h"], s["i"], s["d"]
    return {"q_proj": (h, s["nh"] * d), "k_proj": (h, s["nkv"] * d), "v_proj": (h, s["nkv"] * d),
            "o_proj": (s["nh"] * d, h), "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


def estimate(config: Any, run: RunConfig, dtype_bytes: int = 2) -> MemoryEstimate:
    s = _shapes(config)
    shapes = linear_shapes(config)
    linear_params = s["L"] * sum(a * b for a, b in shapes.values())
    embed_params = s["V"] * s["h"] * (1 if s["tied"] else 2)
    norm_params = (2 * s["L"] + 1) * s["h"]
    m = run.model
    if m.use_4bit:
        per_param = 0.5 + (1 / 64 + 4 / (64 * 256) if m.use_nested_quant else 4 / 64)
    elif m.use_8bit:
        per_param = 1.0 + 4 / max(1, s["h"])
    else:
        per_param = dtype_bytes
    weights = linear_params * per_param + (embed_params + norm_params) * dtype_bytes

    targets = run.lora.resolved_targets()
    lora_params = s["L"] * sum(run.lora.r * (a + b) for name, (a, b) in shapes.items() if name in targets)
    lora_bytes = lora_params * 8  # fp32 weight + fp32 grad
    opt_bytes = lora_params * (2 if run.training.optim == "paged_adamw_8bit" else 8)

    tokens = run.training.per_device_train_batch_size * run.data.max_length
    layer_full = tokens * (18 * s["h"] + 4 * s["i"]) * dtype_bytes  # one block's saved activations
    if run.training.gradient_checkpointing:
        acts = s["L"] * tokens * s["h"] * dtype_bytes + layer_full
    else:
        acts = s["L"] * layer_full
    logits = tokens * s["V"] * 10
    # Dequantized bf16 copy of the largest weight, alive during its matmul.
    workspace = max(a * b for a, b in shapes.values()) * dtype_bytes if (m.use_4bit or m.use_8bit) else 0
    return MemoryEstimate(total_params=linear_params + embed_params + norm_params, trainable_params=lora_params,
                          weights_bytes=weights, lora_bytes=lora_bytes, optimizer_bytes=opt_bytes,
                          activation_bytes=acts + logits, workspace_bytes=workspace)


def free_bytes(device: torch.device) -> float:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return float(free)
    import psutil

    return float(psutil.virtual_memory().available)


def suggestions(run: RunConfig) -> list[str]:
    out = []
    t = run.training
    if t.per_device_train_batch_size > 1:
        out.append(f"training.per_device_train_batch_size={max(1, t.per_device_train_batch_size // 2)} "
                   f"training.gradient_accumulation_steps={t.gradient_accumulation_steps * 2} (same effective batch)")
    if not t.gradient_checkpointing:
        out.append("training.gradient_checkpointing=true")
    if run.data.max_length > 512:
        out.append(f"data.max_length={run.data.max_length // 2}")
    if not run.model.use_4bit:
        out.append("model.use_4bit=true model.use_8bit=false (QLoRA)")
    if t.optim != "paged_adamw_8bit":
        out.append("training.optim=paged_adamw_8bit")
    return out


def check_fits(run: RunConfig, placement: Any, log=print) -> MemoryEstimate | None:
    """Print the memory report; raise ResourceError, before loading, if the run cannot fit."""
    from transformers import AutoConfig

    from loraforge.model.load import resolve_model_path

    try:
        config = AutoConfig.from_pretrained(resolve_model_path(run.model), trust_remote_code=run.model.trust_remote_code)
        est = estimate(config, run, dtype_bytes=torch.finfo(placement.dtype).bits // 8)
    except (AttributeError, OSError, ValueError):
        log("memory report: not available for this model's config")
        return None
    free = free_bytes(placement.device)
    log(f"memory report for {placement.device} (free {free / GIB:.1f} GiB):")
    for line in est.lines():
        log(line)
    if est.total_bytes > 0.95 * free:
        tips = "\n  ".join(suggestions(run)) or "a device with more memory"
        raise ResourceError(f"this run needs about {est.total_bytes / GIB:.1f} GiB but {placement.device} has "
                            f"{free / GIB:.1f} GiB free. Options that lower it:\n  {tips}")
    return est
