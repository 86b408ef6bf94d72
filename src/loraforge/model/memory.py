"""The memory report: what a run will need, computed from the model's config before anything large loads.

The estimate is of the peak that `torch.cuda.max_memory_allocated` reports for one training step of
loraforge's own path (bf16 frozen weights, fp32 LoRA weights, autocast, non-reentrant checkpointing; no
fp32 upcast of embeddings, norms or lm_head — see `load.prepare_for_training`). The allocator's cache
and the CUDA context come on top; `check_fits` leaves room for them.

peak = persistent + checkpointed layer inputs + max(logits phase, one layer's recompute + backward)

**Persistent.** Bytes per parameter (bitsandbytes, blocksize 64): NF4/FP4 stores 0.5 byte plus an fp32
absmax per block (+4/64); double quantization stores that absmax in 8 bits with an fp32 scale per 256
blocks (+1/64 + 4/16384). 8-bit stores 1 byte plus an fp32 scale per output row. Embeddings, norms and
lm_head stay in the compute dtype. A LoRA parameter costs 16 bytes: fp32 weight, fp32 gradient and two
fp32 Adam moments (8-bit Adam: 2 bytes of state instead of 8). bitsandbytes' paged optimizers put the
state of tensors with >= 1e5 elements in CUDA unified memory, which `max_memory_allocated` does not see
(about 0.13 GiB of the 0.3 GiB of state at 7B r=16 all-linear); it is real device memory, so we count it.

**Checkpointed inputs.** With checkpointing each decoder layer keeps its input, tokens x hidden in the
residual stream's dtype (bf16 here, fp32 on the stock path, whose fp32 norms and embeddings turn the
whole stream fp32), until its backward has run: all L of them are alive at the start of backward.

**Logits phase.** The lm_head output, its fp32 copy in transformers' loss, the log-softmax and, in
backward, its gradient: about 12 bytes per token per vocabulary entry. Calibrated on the stock path's
measured peaks (H100, SPEC.md; the stock path's persistent bytes are exact from the shapes, and its
checkpoints are fp32):
  7B r16 all 4x512: 6.25 GiB - 4.56 persistent - 1.00 checkpoints = 0.69 GiB = 11.3 B x 2048 x 32000
  7B r8 q,v 4x512:  5.97 - 4.14 - 1.00 = 0.83 GiB = 13.6 B x 2048 x 32000
  7B r16 all 2x2048: 8.01 - 4.56 - 2.00 = 1.45 GiB = 11.9 B x 4096 x 32000
  8B r16 all 4x512: 11.6 - 7.72 - 1.00 = 2.88 GiB = 11.8 B x 2048 x 128256
The r8 q,v and r16 all-linear cases differ by their LoRA bytes only, so at 4x512 the stock peak is the
logits phase, not a layer's backward. loraforge's fast path computes the loss in chunks and measured
5.23 / 6.05 / 4.82 / 7.16 GiB for the same cases; this estimate is for the non-fast path (no chunking),
so it lies between the two: about the fast path plus 12 x tokens x vocab, less than stock by the fp32
upcast of embeddings/lm_head (0.49 GiB at 7B, 1.96 at 8B) and by the halved checkpoints.

**One layer's recompute + backward** (per token, act = bytes of the activation dtype): RMSNorm keeps an
fp32 copy of its input (2 x 4h); q, k, v, their rotary versions, attention output, o_proj output and the
residual (act x (6h + 3 kv)); MLP gate, up, SiLU and product (act x 4i) and its output and residual
(act x 4h with the norm's output); gradients of the widest tensors in flight (act x (2h + 2i)); and each
LoRA target's own dropout copy of its input plus a 1-byte mask ((act + 1) x in_features) when dropout > 0.
The dequantized bf16 weight of the largest matrix, twice (forward recompute and backward), is workspace.
At 7B 4x512 this phase (0.95 GiB) and the logits phase (0.73 GiB) are close; the estimate takes the larger.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from loraforge.config import RunConfig
from loraforge.errors import ResourceError

GIB = 2**30
LOGIT_BYTES = 12  # per token per vocabulary entry; calibration above
PAGED_MIN_NUMEL = 100_000  # bitsandbytes pages optimizer state only for tensors at least this large


@dataclass
class MemoryEstimate:
    total_params: int
    trainable_params: int
    weights_bytes: float
    lora_bytes: float
    optimizer_bytes: float
    activation_bytes: float
    workspace_bytes: float
    peak_phase: str = ""

    @property
    def total_bytes(self) -> float:
        return (self.weights_bytes + self.lora_bytes + self.optimizer_bytes + self.activation_bytes
                + self.workspace_bytes)

    def lines(self) -> list[str]:
        g = lambda b: f"{b / GIB:6.2f} GiB"  # noqa: E731
        return [f"  parameters      {self.total_params / 1e6:,.1f}M total, "
                f"{self.trainable_params / 1e6:,.2f}M trainable",
                f"  weights         {g(self.weights_bytes)}",
                f"  trained + grads {g(self.lora_bytes)}",
                f"  optimizer state {g(self.optimizer_bytes)}",
                f"  activations     {g(self.activation_bytes)} (estimate; peak in the {self.peak_phase})",
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


def bytes_per_quantized_param(run: RunConfig, hidden: int) -> float | None:
    m = run.model
    if m.use_4bit:
        return 0.5 + (1 / 64 + 4 / (64 * 256) if m.use_nested_quant else 4 / 64)
    if m.use_8bit:
        return 1.0 + 4 / max(1, hidden)
    return None


def estimate(config: Any, run: RunConfig, dtype_bytes: int = 2) -> MemoryEstimate:
    """Peak memory of one training step; `dtype_bytes` is the compute/activation dtype (2 = bf16/fp16)."""
    s = _shapes(config)
    h, i, L, V = s["h"], s["i"], s["L"], s["V"]
    kv = s["nkv"] * s["d"]
    shapes = linear_shapes(config)
    act = dtype_bytes
    lora = run.lora

    linear_params = L * sum(a * b for a, b in shapes.values())
    embed_params = V * h * (1 if s["tied"] else 2)
    norm_params = (2 * L + 1) * h
    per_param = bytes_per_quantized_param(run, h)
    quantized = per_param is not None
    weights = linear_params * (per_param if quantized else act) + (embed_params + norm_params) * act

    # Trained tensors: LoRA A and B per target (+ DoRA's magnitude), and full copies of modules_to_save.
    targets = lora.resolved_targets()
    trained: list[int] = []
    for name, (a, b) in shapes.items():
        if name in targets:
            trained += [lora.r * a, b * lora.r] * L + ([b] * L if lora.use_dora else [])
    saved_copies = [V * h for m in (lora.modules_to_save or []) if m in ("lm_head", "embed_tokens")]
    trained += saved_copies
    trainable = sum(trained)
    lora_bytes = trainable * 8 + sum(saved_copies) * act  # fp32 weight + grad; the copy keeps a frozen original
    opt_bytes = trainable * (2 if run.training.optim == "paged_adamw_8bit" else 8)

    tokens = run.training.per_device_train_batch_size * run.data.max_length
    saved_layer = 8 * h + act * (10 * h + 3 * kv + 4 * i)  # bytes per token kept by one layer for backward
    grads_in_flight = act * (2 * h + 2 * i)
    dropout = sum((act + 1) * a for name, (a, _) in shapes.items() if name in targets) if lora.lora_dropout else 0
    layer = tokens * (saved_layer + grads_in_flight + dropout)
    logits = tokens * V * LOGIT_BYTES
    workspace = 2 * max(a * b for a, b in shapes.values()) * act if quantized else 0
    if lora.use_dora:
        # DoRA recomputes the norm of W + BA every forward: a dequantized fp32 copy of the largest weight.
        workspace += max(a * b for a, b in shapes.values()) * 4
    if run.training.gradient_checkpointing:
        checkpoints = L * tokens * h * act
        if logits >= layer + workspace:
            acts, workspace, phase = checkpoints + logits, 0, "logits and loss"
        else:
            acts, phase = checkpoints + layer, "first layer's backward"
    else:
        acts = L * tokens * (saved_layer + dropout) + tokens * (grads_in_flight) + logits
        phase = "logits and loss"
    return MemoryEstimate(total_params=linear_params + embed_params + norm_params, trainable_params=trainable,
                          weights_bytes=weights, lora_bytes=lora_bytes, optimizer_bytes=opt_bytes,
                          activation_bytes=acts, workspace_bytes=workspace, peak_phase=phase)


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
    elif not run.model.use_nested_quant:
        out.append("model.use_nested_quant=true")
    if run.lora.modules_to_save:
        out.append("lora.modules_to_save=null (full copies of large modules are trained otherwise)")
    if t.optim != "paged_adamw_8bit":
        out.append("training.optim=paged_adamw_8bit")
    return out


# Allocator cache and fragmentation: reserved/allocated was 1.17-1.76 on the H100 bench runs. Refuse a run
# whose estimated peak exceeds 95% of free memory; warn above 80%.
REFUSE_SHARE, WARN_SHARE = 0.95, 0.80


def check_fits(run: RunConfig, placement: Any, log=print) -> MemoryEstimate | None:
    """Print the memory report; raise ResourceError, before loading, if the run cannot fit."""
    from transformers import AutoConfig

    from loraforge.model.load import resolve_model_path

    try:
        config = AutoConfig.from_pretrained(resolve_model_path(run.model),
                                            trust_remote_code=run.model.trust_remote_code)
        est = estimate(config, run, dtype_bytes=torch.finfo(placement.dtype).bits // 8)
    except (AttributeError, OSError, ValueError):
        log("memory report: not available for this model's config")
        return None
    free = free_bytes(placement.device)
    log(f"memory report for {placement.device} (free {free / GIB:.1f} GiB), batch "
        f"{run.training.per_device_train_batch_size} x {run.data.max_length} tokens:")
    for line in est.lines():
        log(line)
    tips = "\n  ".join(suggestions(run)) or "a device with more memory"
    if est.total_bytes > REFUSE_SHARE * free:
        raise ResourceError(f"this run needs about {est.total_bytes / GIB:.1f} GiB but {placement.device} has "
                            f"{free / GIB:.1f} GiB free. Options that lower it:\n  {tips}")
    if est.total_bytes > WARN_SHARE * free:
        log(f"memory report: the estimate is {100 * est.total_bytes / free:.0f}% of free memory; allocator "
            "fragmentation may push it over (PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True helps). "
            f"Options that lower it:\n  {tips}")
    return est

