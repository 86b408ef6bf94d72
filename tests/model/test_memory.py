"""The memory report: estimates from the config alone, calibrated against the H100 measurements (SPEC.md)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig

from loraforge.config import DataConfig, LoRAConfig, ModelConfig, RunConfig, TrainingConfig
from loraforge.errors import ResourceError
from loraforge.model import memory
from loraforge.model.load import Placement
from loraforge.model.memory import GIB, estimate

LLAMA2_7B = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                        num_key_value_heads=32, vocab_size=32000)
LLAMA3_8B = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                        num_key_value_heads=8, vocab_size=128256)


def run(r=16, targets="all-linear", batch=4, seq=512, **model) -> RunConfig:
    return RunConfig(model=ModelConfig(**model), lora=LoRAConfig(r=r, lora_alpha=2 * r, target_modules=targets),
                     data=DataConfig(max_length=seq), training=TrainingConfig(per_device_train_batch_size=batch))


# (config, run) -> (loraforge fast path measured GiB, stock measured GiB), H100, SPEC.md / bench/results.
CALIBRATION = [
    (LLAMA2_7B, dict(), 5.23, 6.25),
    (LLAMA2_7B, dict(batch=2, seq=2048), 6.05, 8.01),
    (LLAMA2_7B, dict(r=8, targets="qv"), 4.82, 5.97),
    (LLAMA3_8B, dict(), 7.16, 11.6),
]


@pytest.mark.parametrize("config, kw, fast, stock", CALIBRATION)
def test_estimate_between_fast_path_and_stock(config, kw, fast: float, stock: float) -> None:
    # The non-fast path keeps bf16 checkpoints and embeddings (less than stock) but no chunked loss (more than fast).
    est = estimate(config, run(**kw)).total_bytes / GIB
    assert fast * 0.95 <= est <= stock * 1.02, est


def test_7b_parts_match_the_shapes() -> None:
    e = estimate(LLAMA2_7B, run())
    assert e.trainable_params == 39_976_960  # r=16 on q,k,v,o,gate,up,down of 32 layers
    assert 6.7e9 < e.total_params < 6.8e9
    assert e.weights_bytes / GIB == pytest.approx(3.11 + 0.49, abs=0.02)  # NF4 + dq linears, bf16 embed + head
    assert e.lora_bytes == e.trainable_params * 8 and e.optimizer_bytes == e.trainable_params * 8


def test_estimate_moves_the_right_way() -> None:
    base = estimate(LLAMA2_7B, run()).total_bytes
    assert estimate(LLAMA2_7B, run(use_4bit=False, use_8bit=True)).total_bytes > base
    assert estimate(LLAMA2_7B, run(use_4bit=False)).total_bytes > estimate(
        LLAMA2_7B, run(use_4bit=False, use_8bit=True)).total_bytes
    assert estimate(LLAMA2_7B, run(use_nested_quant=False)).total_bytes > base
    assert estimate(LLAMA2_7B, run(batch=8)).total_bytes > base
    no_ckpt = run()
    no_ckpt.training.gradient_checkpointing = False
    assert estimate(LLAMA2_7B, no_ckpt).total_bytes > base + 5 * GIB  # 32 layers of activations
    save_head = run()
    save_head.lora.modules_to_save = ["lm_head"]
    assert estimate(LLAMA2_7B, save_head).trainable_params > estimate(LLAMA2_7B, run()).trainable_params


def test_check_fits_refuses_with_options_before_loading(tiny_model_dir: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = run(batch=8, seq=1024, model_name=str(tiny_model_dir), use_4bit=False)
    placement = Placement(torch.device("cpu"), torch.float32)
    logged: list[str] = []
    est = memory.check_fits(cfg, placement, logged.append)
    assert est is not None and any("total" in line for line in logged)
    monkeypatch.setattr(memory, "free_bytes", lambda device: est.total_bytes * 0.5)
    with pytest.raises(ResourceError) as e:
        memory.check_fits(cfg, placement, logged.append)
    msg = str(e.value)
    assert "per_device_train_batch_size=4" in msg and "gradient_accumulation_steps=8" in msg
    assert "data.max_length=512" in msg and "model.use_4bit=true" in msg
    monkeypatch.setattr(memory, "free_bytes", lambda device: est.total_bytes * 1.1)
    logged.clear()
    memory.check_fits(cfg, placement, logged.append)  # fits, with a fragmentation warning
    assert any("fragmentation" in line for line in logged)
