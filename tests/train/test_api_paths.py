"""The seed's Python API end to end on the tiny model: streamed data through the real loop, and
`LLAMATrainer.evaluate(test_prompts=, test_references=)` scoring generated answers."""

from __future__ import annotations

import math
from pathlib import Path

import sacrebleu
from tinymodels import chat_records, write_jsonl

from loraforge.config import DataConfig, EvalConfig, LoRAConfig, ModelConfig, TrainingConfig
from loraforge.train.trainer import LLAMATrainer


def _trainer(tmp: Path, model_dir: Path, **data) -> LLAMATrainer:
    path = write_jsonl(tmp / "chat.jsonl", chat_records(24))
    return LLAMATrainer(
        model_config=ModelConfig(model_name=str(model_dir), use_4bit=False, device="cpu"),
        lora_config=LoRAConfig(r=4, lora_alpha=8, lora_dropout=0.0),
        data_config=DataConfig(dataset=str(path), max_length=64, validation_split=0.2, cache=False, **data),
        training_config=TrainingConfig(output_dir=str(tmp / "run"), max_steps=3, per_device_train_batch_size=2,
                                       gradient_accumulation_steps=1, logging_steps=1, learning_rate=1e-2),
        eval_config=EvalConfig(decoding="greedy", max_new_tokens=8, num_generation_samples=2))


def test_streaming_data_trains_through_the_loop(tmp_path: Path, tiny_model_dir: Path):
    trainer = _trainer(tmp_path, tiny_model_dir, memory_map=True)
    result = trainer.train()
    assert result.steps == 3 and math.isfinite(result.train_loss)
    # streamed examples live in the on-disk store, read lazily, not as an in-memory list
    assert not isinstance(trainer.data.train, list) and len(trainer.data.train) > 0


def test_evaluate_scores_the_given_prompts(tmp_path: Path, tiny_model_dir: Path):
    trainer = _trainer(tmp_path, tiny_model_dir)
    trainer.train()
    refs = ["apple apple apple.", "Yes, river."]
    out = trainer.evaluate(test_prompts=["Say apple.", "Again river?"], test_references=refs)
    for key in ("eval_perplexity", "bleu", "rouge1", "rouge2", "rougeL", "exact_match"):
        assert key in out, key
    assert math.isfinite(out["eval_perplexity"]) and len(out["generations"]) == 2
    expected = sacrebleu.corpus_bleu(out["generations"], [refs]).score / 100
    assert abs(out["bleu"] - expected) < 1e-9
