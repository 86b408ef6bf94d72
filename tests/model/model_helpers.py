"""Helpers shared by the model tests (a fixed batch, a few plain optimizer steps).

Batches are built on the CPU; `train_steps` and `eval_logits` move them to the model's device, so a test
that loads with model.device=auto (a GPU when there is one) runs the same way on either machine.
"""

from __future__ import annotations

import torch


def fixed_batch(vocab: int = 1000, batch: int = 2, seq: int = 16, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(3, vocab, (batch, seq), generator=g)
    return {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x.clone()}


def on_device(batch: dict[str, torch.Tensor], model) -> dict[str, torch.Tensor]:
    """`batch` on the device of the model's first parameter."""
    device = next(model.parameters()).device
    return {k: v.to(device) for k, v in batch.items()}


def train_steps(model, batch: dict[str, torch.Tensor], steps: int, lr: float = 1e-2) -> list[float]:
    """Plain AdamW steps on one fixed batch; returns the losses."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    batch = on_device(batch, model)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(**batch, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def stock_reload(base_dir, adapter_dir, *, quant: str = "none", dtype: torch.dtype = torch.float32):
    """Base + adapter loaded with stock transformers + peft only (what a user or vLLM would do), on the CPU.

    device_map is explicit: without it bitsandbytes' quantizer puts a 4-bit model on the GPU when there is
    one, and the CPU-trained logits it is compared with would then come from another backend.
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs = {"dtype": dtype, "device_map": {"": "cpu"}}
    if quant == "nf4":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype)
    elif quant == "int8":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
    base = AutoModelForCausalLM.from_pretrained(base_dir, **kwargs)
    return PeftModel.from_pretrained(base, str(adapter_dir)).eval()


def eval_logits(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    was = model.training
    batch = on_device(batch, model)
    model.eval()
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float().cpu()
    model.train(was)
    return out
