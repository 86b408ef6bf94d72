"""The fast-path decision a run gets (train/fast_path.py): one line saying on or off, why, and what to set."""

from __future__ import annotations

import json
from pathlib import Path

from tinymodels import chat_records, write_jsonl

from loraforge.config import DataConfig, EvalConfig, LoRAConfig, ModelConfig, RunConfig, TrainingConfig
from loraforge.model.load import load_base
from loraforge.model.lora import attach_lora
from loraforge.train.fast_path import apply_fast_path


def _tiny(path: Path, **lora):
    run = RunConfig(model=ModelConfig(model_name=str(path), use_4bit=False, dtype="float32", device="cpu"),
                    lora=LoRAConfig(r=4, target_modules="all-linear", **lora), data=DataConfig(),
                    training=TrainingConfig(), eval=EvalConfig())
    model, _ = load_base(run.model)
    return attach_lora(model, run.lora), run


def test_a_cpu_run_says_the_fast_path_is_off_and_why(tiny_model_dir: Path) -> None:
    model, run = _tiny(tiny_model_dir)
    lines: list[str] = []
    fast = apply_fast_path(model, run, log=lines.append)
    assert not fast.report["patched"] and fast.graphs is None
    assert lines == [fast.line] and fast.line.startswith("fast path: off for this run because the model is on the CPU")
    assert "CUDA GPU" in fast.line
    off = apply_fast_path(model, RunConfig(**{**run.__dict__, "model": ModelConfig(
        model_name=str(tiny_model_dir), device="cpu", fast_kernels=False)}), log=lines.append)
    assert "model.fast_kernels is false" in off.line and "set model.fast_kernels: true" in off.line


def test_dropout_runs_on_the_fast_path(tiny_model_dir: Path) -> None:
    model, run = _tiny(tiny_model_dir, lora_dropout=0.05)
    fast = apply_fast_path(model, run, allow_cpu=True, log=lambda _: None)
    assert fast.report["patched"] and fast.report["lora_dropout"] == 0.05
    assert fast.line.startswith("fast path: on (fused LoRA with dropout 0.05")


def test_the_run_record_carries_the_line(tmp_path: Path, tiny_model_dir: Path) -> None:
    from loraforge.train.trainer import LLAMATrainer

    data = write_jsonl(tmp_path / "chat.jsonl", chat_records(8))
    logged: list[str] = []
    LLAMATrainer(ModelConfig(model_name=str(tiny_model_dir), use_4bit=False, device="cpu"),
                 LoRAConfig(r=4, target_modules="qv"), DataConfig(dataset=str(data), max_length=64),
                 TrainingConfig(output_dir=str(tmp_path / "run"), max_steps=1, per_device_train_batch_size=2,
                                gradient_accumulation_steps=1),
                 EvalConfig(num_generation_samples=0), log=logged.append).train()
    record = json.loads((tmp_path / "run" / "loraforge_run.json").read_text())
    assert record["fast_path"].startswith("fast path: off for this run because the model is on the CPU")
    assert record["fast_path"] in logged
