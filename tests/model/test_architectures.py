"""Llama 2, Llama 3.1 (GQA, llama3 rope scaling), Mistral, Qwen2/Qwen3 and Gemma 2/3, as tiny random models:
4-bit and fp32, LoRA on `all-linear`."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from model_helpers import eval_logits, fixed_batch, stock_reload, train_steps

from loraforge.config import LoRAConfig, ModelConfig
from loraforge.model.load import load_base
from loraforge.model.lora import attach_lora
from loraforge.model.quant import cpu_packing_available, set_cpu_packing

# 4-bit on the CPU runs one of two bitsandbytes kernels: the packed AVX512-BF16 one (inference only, some
# shapes) or the plain one. Both are forced here, so a CPU of either kind cannot surprise CI.
QUANTS = ["nf4-plain", pytest.param("nf4-packed", marks=pytest.mark.skipif(
    not cpu_packing_available(), reason="this CPU has no AVX512-BF16: the packed kernel cannot run")), "none"]


# The newer families are long (~2-4 s a case on 2 shared cores, 12 cases) except one fp32 case of each:
# Qwen3 and Gemma 2 (whose sdpa refusal exercises the loader's eager fallback) stay in `make test`.
NEWER = ["qwen2", "qwen3", "gemma2", "gemma3"]
QUICK = {("qwen3", "none"), ("gemma2", "none")}
ALL_LINEAR = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def _cases() -> list:
    out = []
    for quant in QUANTS:
        q = quant if isinstance(quant, str) else quant.values[0]
        for arch in ["llama2", "llama3", "mistral", *NEWER]:
            long = arch in NEWER and (arch, q) not in QUICK
            marks = list(getattr(quant, "marks", ())) + ([pytest.mark.long] if long else [])
            out.append(pytest.param(arch, q, marks=marks, id=f"{q}-{arch}"))
    return out


@pytest.mark.parametrize("arch, quant", _cases())
def test_load_step_save_reload(arch: str, quant: str, arch_dirs: dict[str, Path], tmp_path: Path) -> None:
    path = arch_dirs[arch]
    # On the CPU on any machine: nf4 goes through bitsandbytes' CPU backend, and the trained logits are
    # compared at 1e-4 with a stock reload on the CPU (stock_reload) running the same kernel.
    quant, _, kernel = quant.partition("-")
    model, tok = load_base(ModelConfig(model_name=str(path), use_4bit=quant == "nf4", dtype="float32", device="cpu"))
    cfg = model.config
    if arch == "llama3":
        assert cfg.num_key_value_heads < cfg.num_attention_heads
        assert (cfg.rope_parameters or {}).get("rope_type") == "llama3"
    if arch == "mistral":
        assert cfg.model_type == "mistral" and cfg.sliding_window == 64
    if arch.startswith("gemma"):
        assert cfg.model_type in ("gemma2", "gemma3_text") and cfg.sliding_window == 64
    model = attach_lora(model, LoRAConfig(target_modules="all-linear", lora_dropout=0.0))
    # all-linear: every projection of every layer, never the lm_head
    wrapped = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if hasattr(m, "lora_A")}
    assert wrapped == ALL_LINEAR, wrapped
    batch = fixed_batch()
    losses = train_steps(model, batch, steps=2, lr=1e-2)
    assert all(math.isfinite(x) for x in losses) and losses[1] < losses[0]
    set_cpu_packing(model, kernel == "packed")
    trained = eval_logits(model, batch)
    model.save_pretrained(tmp_path / "adapter")
    reloaded = stock_reload(path, tmp_path / "adapter", quant=quant)
    set_cpu_packing(reloaded, kernel == "packed")
    torch.testing.assert_close(eval_logits(reloaded, batch), trained, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", ["int8", "bf16", "fp16"])
def test_int8_and_16bit_paths_step(kind: str, arch_dirs: dict[str, Path]) -> None:
    # device=auto: the GPU when there is one (train_steps moves the batch to the model's device).
    cfg = {"int8": ModelConfig(model_name=str(arch_dirs["llama3"]), use_4bit=False, use_8bit=True),
           "bf16": ModelConfig(model_name=str(arch_dirs["llama3"]), use_4bit=False, dtype="bfloat16"),
           "fp16": ModelConfig(model_name=str(arch_dirs["llama3"]), use_4bit=False, dtype="float16")}[kind]
    model, _ = load_base(cfg)
    model = attach_lora(model, LoRAConfig(target_modules="all-linear", lora_dropout=0.0))
    losses = train_steps(model, fixed_batch(), steps=3, lr=1e-2)
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
