"""Probe steps (bench/probe.py): backward stops after the layers under test, and only inside the probe."""

import pytest
import torch
from tinymodels import lm_batch

from loraforge.bench.probe import ProbeStop, probing
from loraforge.kernels.offload import enable_offloaded_checkpointing

pytest.importorskip("peft")


def _offloaded(model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    for p in m.parameters():
        p.requires_grad_(False)
    m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    m = get_peft_model(m, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "down_proj"]))
    m.train()
    return m, enable_offloaded_checkpointing(m, force_copy=True, min_bytes=0)


def test_probe_stops_backward(tiny_model_dir):
    m, off = _offloaded(tiny_model_dir)
    batch = lm_batch(m.config.vocab_size, 2, 19, seed=1)
    with probing(off, 0), pytest.raises(ProbeStop):
        m(**batch).loss.backward()
    assert off.on_backward_layer is None
    with probing(off, 1):  # 2 layers: a probe of 1 would stop below layer 0, so backward runs to its end
        m(**batch).loss.backward()
    m(**batch).loss.backward()  # and a full backward after the probes
