"""Combined mode: the mix drawn is what the config asks for, is logged, and trains on the tiny model."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from tinymodels import alpaca_records, write_jsonl

from loraforge.config import DataConfig, SourceConfig
from loraforge.data.mixing import draw, mix_counts
from loraforge.data.pipeline import build_datasets


def dialogue_records(n: int) -> list[dict]:
    return [{"dialog": [f"Hi number {i}.", f"Hello {i}!", "How are you?", "Fine."]} for i in range(n)]


def test_mix_counts_and_draw() -> None:
    assert mix_counts([12, 4], [1, 1], "balanced") == [12, 12]
    assert mix_counts([12, 4], [3, 1], "weighted") == [12, 4]
    assert mix_counts([12, 4], [1, 1], "weighted") == [8, 8]
    d = draw(4, 10, random.Random(0))
    assert len(d) == 10 and sorted(d[:8]) == [0, 0, 1, 1, 2, 2, 3, 3]  # whole copies before the remainder


@pytest.mark.parametrize("mixing, drawn", [("balanced", {"a": 12, "d": 12}), ("weighted", {"a": 8, "d": 8})])
def test_combined_mode_reports_the_mix(tmp_path: Path, tokenizer, mixing: str, drawn: dict) -> None:
    a = write_jsonl(tmp_path / "a.jsonl", alpaca_records(12))
    d = write_jsonl(tmp_path / "d.jsonl", dialogue_records(4))
    cfg = DataConfig(sources=[SourceConfig(path=str(a)), SourceConfig(path=str(d))], mixing=mixing,
                     validation_split=0.0)
    data = build_datasets(cfg, tokenizer, 2)
    mix = data.stats["train"].mix
    assert {k[0]: v["drawn"] for k, v in zip(["a", "d"], mix.values(), strict=True)} == drawn
    assert len(data.train) == sum(drawn.values())
    n_chat = sum(1 for e in data.train if 1 in e["input_ids"])  # <|im_start|> = 1 only in chat renderings
    assert n_chat == drawn["d"]
    assert "mix" in data.stats["train"].line("train") and mixing in data.stats["train"].line("train")


def test_combined_alpaca_and_dialogue_trains(tmp_path: Path, tiny_model_dir: Path) -> None:
    from loraforge.config import EvalConfig, LoRAConfig, ModelConfig, TrainingConfig
    from loraforge.train.trainer import LLAMATrainer

    a = write_jsonl(tmp_path / "a.jsonl", alpaca_records(12))
    d = write_jsonl(tmp_path / "d.jsonl", dialogue_records(6))
    trainer = LLAMATrainer(
        model_config=ModelConfig(model_name=str(tiny_model_dir), use_4bit=False, device="cpu"),
        lora_config=LoRAConfig(),
        data_config=DataConfig(sources=[SourceConfig(path=str(a), weight=1), SourceConfig(path=str(d), weight=1)],
                               mixing="balanced", max_length=64, validation_split=0.2),
        training_config=TrainingConfig(output_dir=str(tmp_path / "run"), max_steps=2, per_device_train_batch_size=2,
                                       gradient_accumulation_steps=1, optim="adamw_torch", logging_steps=1,
                                       gradient_checkpointing=False),
        eval_config=EvalConfig(num_generation_samples=0, eval_batch_size=4), log=lambda m: None)
    result = trainer.train()
    assert result.steps == 2 and result.train_loss is not None and result.eval_loss is not None
    stats = json.loads((tmp_path / "run" / "data_stats.json").read_text())
    assert [m["drawn"] for m in stats["train"]["mix"].values()] == [10, 10]  # 12 - 2 and 6 - 1 held out → 10 each
