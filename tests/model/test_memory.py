"""The memory model: the pre-flight report and the longest trainable sequence, from the config alone,
calibrated against the H100 measurements (SPEC.md)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig

from loraforge.config import DataConfig, LoRAConfig, ModelConfig, RunConfig, TrainingConfig
from loraforge.errors import ResourceError
from loraforge.model import memory
from loraforge.model.load import Placement
from loraforge.model.memory import GIB, estimate, max_trainable_length, memory_model, peak_bytes

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


# ---------------------------------------------------------------------- longest trainable sequence (batch 1)


def _bs1_run(long_context=False) -> RunConfig:
    run = RunConfig()
    run.lora.r, run.lora.lora_alpha, run.lora.lora_dropout = 16, 32, 0.0
    run.lora.target_modules = "all-linear"
    run.training.long_context = long_context
    return run


def test_memory_model_matches_the_stock_measurements():
    cfg, run = LLAMA3_8B, _bs1_run()
    assert abs(peak_bytes(cfg, run, 8192, stack="stock") / GIB - 44.0) < 0.05 * 44.0
    assert abs(peak_bytes(cfg, run, 11264, stack="stock") / GIB - 74.5) < 0.02 * 74.5
    assert max_trainable_length(cfg, run, 78.6 * GIB, stack="stock") == 11264  # measured maximum


def test_max_length_is_monotone_and_long_context_is_longer():
    cfg = LLAMA3_8B
    prev = {}
    for free in (8, 16, 24, 40, 60, 79):
        for stack, lc in (("stock", False), ("loraforge", False), ("loraforge", True)):
            n = max_trainable_length(cfg, _bs1_run(lc), free * GIB, stack=stack)
            assert n % 1024 == 0 and n >= prev.get((stack, lc), 0)
            prev[(stack, lc)] = n
    assert max_trainable_length(cfg, _bs1_run(), 5 * GIB, stack="stock") == 0
    lc = max_trainable_length(cfg, _bs1_run(True), 78.6 * GIB)
    on_gpu = _bs1_run(False)
    offloaded = max_trainable_length(cfg, on_gpu, 78.6 * GIB)  # a one-GPU run offloads by default
    on_gpu.training.offload_activations = False
    assert lc >= 8 * 11264 and lc > offloaded > max_trainable_length(cfg, on_gpu, 78.6 * GIB)
    # long context tiles the MLP: its six [tokens, 14336] tensors (172 KiB a token) are one tile's
    assert lc > 2 * offloaded
    # offloaded checkpoints need host memory: (L-1) x h x 2 bytes per token
    host = 20 * GIB
    assert max_trainable_length(cfg, _bs1_run(True), 78.6 * GIB, host_free_bytes=host) <= host / (31 * 4096 * 2)
    mm = memory_model(cfg, _bs1_run(True))
    assert mm["checkpoints"] == 3 * 4096 * 2 and mm["quadratic"] == 0
    for s in (1024, 65536, 200000):
        assert peak_bytes(cfg, _bs1_run(True), s) < peak_bytes(cfg, _bs1_run(True), s + 1024)


def test_logits_chunks_fit_the_budget_in_whole_tiles() -> None:
    from loraforge.model.memory import LOGITS_CHUNK_BYTES, logits_chunk_rows

    for vocab in (32000, 49152, 128256):
        rows = logits_chunk_rows(vocab)
        assert rows % 64 == 0 and 4 * vocab * rows <= LOGITS_CHUNK_BYTES < 4 * vocab * (rows + 64)
    assert logits_chunk_rows(32000) == 512 and logits_chunk_rows(128256) == 128
    assert logits_chunk_rows(256000, copies=2) == 128  # Gemma 2's soft-capped loss: the row floor, not 32 rows
    assert logits_chunk_rows(11, budget=4 * 11 * 5, min_rows=1) == 5  # below one tile: as many as fit
    assert logits_chunk_rows(10**9, min_rows=1) == 1
