"""The embedded SmolLM2-135M (real weights): QLoRA NF4 + double quant learns, and the adapter reloads in stock peft.

Kept short for the shared CPU: a fixed 2 x 64-token batch of real text, repeated, so the loss must fall.
On the CPU on any machine (model.device=cpu): the 4-bit and 8-bit paths are bitsandbytes' CPU backend, and
the logits are compared with a stock reload on the CPU.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from model_helpers import eval_logits, stock_reload, train_steps

from loraforge.config import LoRAConfig, ModelConfig
from loraforge.model.load import load_base
from loraforge.model.lora import attach_lora
from loraforge.model.quant import set_cpu_packing

TEXT = ("The lighthouse keeper climbed the stairs every evening, lit the lamp, and wrote the weather in a "
        "small book. Ships passed in the night and the light turned until morning came over the sea. ")


def text_batch(tok, batch: int = 2, seq: int = 64) -> dict[str, torch.Tensor]:
    ids = tok(TEXT * 4, add_special_tokens=False)["input_ids"]
    rows = [ids[i * 7:i * 7 + seq] for i in range(batch)]
    x = torch.tensor(rows)
    return {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x.clone()}


def test_qlora_nf4_double_quant_learns_and_reloads_in_stock_peft(embedded_model_dir: Path, tmp_path: Path) -> None:
    model, tok = load_base(ModelConfig(use_4bit=True, bnb_4bit_quant_type="nf4", use_nested_quant=True, device="cpu"))
    q = model.model.layers[0].self_attn.q_proj
    assert type(q).__name__ == "Linear4bit" and q.weight.quant_state.nested and q.weight.quant_state.quant_type == "nf4"
    model = attach_lora(model, LoRAConfig())  # the defaults: r 8, alpha 16, dropout 0.05, q_proj + v_proj
    batch = text_batch(tok)
    losses = train_steps(model, batch, steps=4, lr=2e-3)
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0] - 0.1, losses

    trained = eval_logits(model, batch)
    model.save_pretrained(tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["r"] == 8 and set(saved["target_modules"]) == {"q_proj", "v_proj"}
    assert Path(saved["base_model_name_or_path"]) == embedded_model_dir
    reloaded = stock_reload(embedded_model_dir, tmp_path / "adapter", quant="nf4")
    # The kernel our training model uses (a CPU with AVX512-BF16 would otherwise pack the stock model's
    # layers into bf16 for inference); tests/model/test_architectures.py compares the packed one too.
    set_cpu_packing(reloaded, False)
    torch.testing.assert_close(eval_logits(reloaded, batch), trained, atol=2e-3, rtol=1e-3)
    # the adapter matters: without it the logits differ
    with reloaded.disable_adapter():
        assert (eval_logits(reloaded, batch) - trained).abs().max() > 1e-2


# bf16 matmuls are emulated on most CPUs (37 s here for one step of 135M); the tiny-model tests cover bf16 quickly.
@pytest.mark.parametrize("kind", ["int8", pytest.param("bf16", marks=pytest.mark.long), "fp32"])
def test_8bit_bf16_fp32_load_and_step(kind: str, embedded_model_dir: Path, tmp_path: Path) -> None:
    cfg = {"int8": ModelConfig(use_4bit=False, use_8bit=True, device="cpu"),
           "bf16": ModelConfig(use_4bit=False, dtype="bfloat16", device="cpu"),
           "fp32": ModelConfig(use_4bit=False, dtype="float32", device="cpu")}[kind]
    model, tok = load_base(cfg)
    model = attach_lora(model, LoRAConfig(lora_dropout=0.0))
    batch = text_batch(tok, seq=32)
    losses = train_steps(model, batch, steps=1, lr=2e-3)
    assert math.isfinite(losses[0])
    assert all(p.grad is None for p in model.parameters())  # zero_grad(set_to_none) ran after a real step
    if kind == "fp32":  # fp32 also reloads in stock peft with the same logits
        trained = eval_logits(model, batch)
        model.save_pretrained(tmp_path / "adapter")
        reloaded = stock_reload(embedded_model_dir, tmp_path / "adapter", quant="none")
        torch.testing.assert_close(eval_logits(reloaded, batch), trained, atol=1e-4, rtol=1e-4)
