"""Helpers shared by the model tests (a fixed batch, a few plain optimizer steps)."""

from __future__ import annotations

import torch


def fixed_batch(vocab: int = 1000, batch: int = 2, seq: int = 16, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(3, vocab, (batch, seq), generator=g)
    return {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x.clone()}


def train_steps(model, batch: dict[str, torch.Tensor], steps: int, lr: float = 1e-2) -> list[float]:
    """Plain AdamW steps on one fixed batch; returns the losses."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
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
    """Base + adapter loaded with stock transformers + peft only (what a user or vLLM would do)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs = {"dtype": dtype}
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
    model.eval()
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    model.train(was)
    return out
