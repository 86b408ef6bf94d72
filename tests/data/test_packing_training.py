"""Packing through the real training loop: packed rows (no attention mask) train, and see every token."""

from __future__ import annotations

import json
import math
from pathlib import Path

from tinymodels import chat_records, write_jsonl

from loraforge.config import DataConfig, EvalConfig, LoRAConfig, ModelConfig, TrainingConfig
from loraforge.train.trainer import LLAMATrainer


def _train(tmp: Path, model_dir: Path, data: Path, packing: bool) -> list[dict]:
    trainer = LLAMATrainer(
        ModelConfig(model_name=str(model_dir), use_4bit=False),
        LoRAConfig(r=4, lora_alpha=8, target_modules="qv", lora_dropout=0.0),
        DataConfig(dataset=str(data), max_length=128, validation_split=0.0, packing=packing, cache=False),
        TrainingConfig(output_dir=str(tmp / f"run-{packing}"), max_steps=3, per_device_train_batch_size=2,
                       gradient_accumulation_steps=1, learning_rate=1e-2, logging_steps=1),
        EvalConfig(num_generation_samples=0))
    trainer.train()
    lines = (tmp / f"run-{packing}" / "metrics.jsonl").read_text().splitlines()
    return [json.loads(x) for x in lines if "loss" in json.loads(x)], trainer


def test_packed_training_runs_and_counts_real_tokens(tmp_path: Path, tiny_model_dir: Path):
    data = write_jsonl(tmp_path / "chat.jsonl", chat_records(24))
    packed, trainer = _train(tmp_path, tiny_model_dir, data, packing=True)
    assert len(packed) == 3 and all(math.isfinite(r["loss"]) for r in packed)
    rows = trainer.data.train
    assert "position_ids" in rows[0] and len(rows) < 24  # several conversations share a row
    assert all(r["tokens_per_s"] > 0 for r in packed)
