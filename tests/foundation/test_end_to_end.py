"""One short real training run on a tiny random Llama: the loss falls, nothing is NaN, and the saved
adapter reloads in stock peft to the same logits."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from peft import PeftModel
from tinymodels import chat_records, write_jsonl
from transformers import AutoModelForCausalLM

from loraforge.config import DataConfig, EvalConfig, LoRAConfig, ModelConfig, TrainingConfig
from loraforge.train.trainer import LLAMATrainer


def test_train_loss_falls_and_adapter_reloads_in_stock_peft(tmp_path: Path, tiny_model_dir: Path):
    torch.set_num_threads(1)
    records = chat_records(16)
    # A conversation whose first assistant turn lies beyond max_length: no trainable token. It must be
    # dropped at tokenization and counted, not turn a batch's loss into 0/0 = NaN.
    records.append({"messages": [{"role": "user", "content": "word " * 200},
                                 {"role": "assistant", "content": "late reply"}]})
    data = write_jsonl(tmp_path / "chat.jsonl", records)
    run = tmp_path / "run"
    trainer = LLAMATrainer(
        # On the CPU on any machine: the trained logits are compared at 1e-4 with fp32 stock models on the
        # CPU (device=auto would train on a GPU in bf16).
        ModelConfig(model_name=str(tiny_model_dir), use_4bit=False, device="cpu"),
        LoRAConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0),
        DataConfig(dataset=str(data), max_length=64, validation_split=0.0),
        TrainingConfig(output_dir=str(run), max_steps=12, per_device_train_batch_size=4,
                       gradient_accumulation_steps=1, learning_rate=1e-2, warmup_ratio=0.0, logging_steps=1,
                       lr_scheduler_type="constant", gradient_checkpointing=True),
        EvalConfig(num_generation_samples=0))
    result = trainer.train()

    stats = result.data_stats["train"]
    assert stats["dropped_no_labels"] == 1 and stats["used"] == 16 and stats["read"] == 17
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert len(losses) == 12 and all(math.isfinite(v) for v in losses)
    # ln(49152) = 10.8 at the start; LoRA alone must move a random 49K-token head, so the fall is modest
    # but unmistakable (a broken update would leave it flat within ~0.05).
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.4, losses

    for name in ("config.yaml", "environment.json", "loss_curve.png", "adapter/adapter_model.safetensors",
                 "adapter/adapter_config.json"):
        assert (run / name).is_file(), name

    # The adapter in stock peft gives the logits the trained model gives.
    model = trainer.accelerator.unwrap_model(trainer.model).eval()
    ids = torch.tensor([trainer.data.train[0]["input_ids"]])
    with torch.no_grad():
        trained = model(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        reloaded = PeftModel.from_pretrained(base, str(run / "adapter")).eval()(input_ids=ids).logits
        plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)(input_ids=ids).logits
    torch.testing.assert_close(reloaded, trained, rtol=1e-4, atol=1e-4)
    assert (reloaded - plain).abs().max() > 1e-2  # the adapter really changed the model
