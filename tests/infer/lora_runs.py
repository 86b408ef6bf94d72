"""Real run folders for the inference and serving tests: a few training steps, then a louder adapter."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tinymodels import chat_records, write_jsonl


def make_lora_run(out: Path, model: str, *, steps: int = 2, seed: int = 0, scale: float = 0.05) -> Path:
    """Train `steps` steps of LoRA (r=4, all linear layers) on `model`; return the run folder.

    Two steps at a small learning rate barely move LoRA B away from its zero init, which would make
    every merge/adapter comparison pass vacuously; so B is then replaced by N(0, scale²) noise, enough
    to change greedy output while keeping the logits finite.
    """
    from loraforge.config import DataConfig, EvalConfig, LoRAConfig, ModelConfig, TrainingConfig
    from loraforge.train.trainer import LLAMATrainer

    out.parent.mkdir(parents=True, exist_ok=True)
    data = write_jsonl(out.parent / f"{out.name}-chat.jsonl", chat_records(16))
    # device=cpu on any machine: the runs' config.yaml and adapters are the same as on the CPU CI.
    LLAMATrainer(ModelConfig(model_name=model, use_4bit=False, device="cpu"),
                 LoRAConfig(r=4, target_modules="all-linear"),
                 DataConfig(dataset=str(data), max_length=64),
                 TrainingConfig(output_dir=str(out), max_steps=steps, per_device_train_batch_size=2,
                                gradient_accumulation_steps=1, logging_steps=1, learning_rate=1e-2),
                 EvalConfig(num_generation_samples=0)).train()
    perturb_adapter(out / "adapter", seed=seed, scale=scale)
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    return out


_CACHE: dict[tuple[str, str], Path] = {}


def shared_lora_run(root: Path, model: str) -> Path:
    """One run per model and test session, shared by tests/infer and tests/serve (training is the slow part)."""
    key = (str(root), model)
    if key not in _CACHE:
        _CACHE[key] = make_lora_run(root / "tiny-chat", model)
    return _CACHE[key]


def perturb_adapter(adapter_dir: Path, *, seed: int, scale: float) -> None:
    file = adapter_dir / "adapter_model.safetensors"
    tensors = load_file(str(file))
    gen = torch.Generator().manual_seed(seed)
    for name, t in tensors.items():
        if "lora_B" in name:
            tensors[name] = (torch.randn(t.shape, generator=gen) * scale).to(t.dtype)
    save_file(tensors, str(file), metadata={"format": "pt"})


def copy_run(run: Path, out: Path, *, seed: int) -> Path:
    """A second run over the same base with different adapter weights (for multi-adapter serving)."""
    shutil.copytree(run, out)
    perturb_adapter(out / "adapter", seed=seed, scale=0.05)
    return out
