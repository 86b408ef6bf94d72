"""Configs, readers and fault injectors shared by tests/train and tests/distributed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from loraforge.config import DataConfig, EvalConfig, LoRAConfig, ModelConfig, RunConfig, TrainingConfig
from loraforge.errors import TrainingError

WORDS = ["apple", "river", "cloud", "stone", "green", "music", "paper", "light"]


def make_records(n: int) -> list[dict[str, Any]]:
    """Conversations whose assistant replies repeat a word 1..7 times: labelled-token counts vary."""
    out = []
    for i in range(n):
        w = WORDS[i % len(WORDS)]
        out.append({"messages": [{"role": "user", "content": f"Say {w}, {1 + i % 7} times."},
                                 {"role": "assistant", "content": " ".join([w] * (1 + (i * 5) % 7)) + "."}]})
    return out


def token_examples(lengths: list[int], vocab: int, seed: int = 0) -> list[dict[str, Any]]:
    """Tokenized examples of these lengths (random ids from 3 on), their first two labels masked."""
    import torch

    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(3, vocab, (n,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] * 2 + ids[2:]})
    return out


def run_config(model_dir: Path, data_file: Path, out: Path, *, lora_dropout: float = 0.0,
               **training: Any) -> RunConfig:
    t = dict(output_dir=str(out), max_steps=3, per_device_train_batch_size=2, gradient_accumulation_steps=2,
             learning_rate=1e-2, warmup_ratio=0.0, optim="adamw_torch", gradient_checkpointing=False,
             logging_steps=1, save_steps=0, seed=7)
    t.update(training)
    return RunConfig(
        model=ModelConfig(model_name=str(model_dir), use_4bit=False, dtype="float32", device="cpu"),
        lora=LoRAConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=lora_dropout),
        data=DataConfig(dataset=str(data_file), max_length=64, validation_split=0.2, seed=1),
        training=TrainingConfig(**t),
        eval=EvalConfig(num_generation_samples=0, eval_batch_size=8))


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(ln) for ln in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if ln.strip()]


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


def nan_losses(steps: set[int], accum: int):
    """A `LLAMATrainer._micro_step_loss` whose loss is NaN on the given optimizer steps (1-based)."""
    from loraforge.train.trainer import LLAMATrainer  # the trainer loads torch and transformers: only when used

    real = LLAMATrainer._micro_step_loss
    calls = {"n": 0}

    def loss(self, model, batch, n_tokens):
        step = calls["n"] // accum + 1
        calls["n"] += 1
        out = real(self, model, batch, n_tokens)
        return out * float("nan") if step in steps else out

    return loss


def stop_on_nonfinite(cfg: RunConfig, message: str) -> tuple[str, dict[str, Any]]:
    """Train `cfg` until it stops on too many non-finite losses in a row (its error must match `message`):
    the name of the checkpoint it left last and that checkpoint's trainer state."""
    import pytest

    from loraforge.train import checkpoint as ckpt
    from loraforge.train.trainer import LLAMATrainer

    with pytest.raises(TrainingError, match=message):
        LLAMATrainer.from_config(cfg, log=lambda m: None).train()
    latest = ckpt.latest_checkpoint(Path(cfg.training.output_dir) / "checkpoints")
    assert latest is not None, "the stop left no checkpoint"
    return latest.name, json.loads((latest / "trainer_state.json").read_text())
