"""k-bit preparation: frozen base, no fp32 upcast, checkpointing really active in train mode, done once."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from model_helpers import fixed_batch, on_device, train_steps

from loraforge.config import LoRAConfig, ModelConfig
from loraforge.model.load import load_base, prepare_for_training
from loraforge.model.lora import attach_lora


def _count_forwards(module: torch.nn.Module) -> list[int]:
    calls = [0]
    module.register_forward_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize("checkpointing, expected", [(True, 2), (False, 1)])
def test_gradient_checkpointing_recomputes_in_backward(checkpointing: bool, expected: int,
                                                       tiny_model_dir: Path) -> None:
    model, _ = load_base(ModelConfig(model_name=str(tiny_model_dir)), gradient_checkpointing=checkpointing)
    model = attach_lora(model, LoRAConfig())
    assert model.training  # transformers checkpoints only in train mode (the 20 GiB trap)
    # Attention, not the MLP: non-reentrant checkpointing stops the recompute as soon as the last saved
    # tensor is back, inside down_proj, so the MLP module's forward hook never fires a second time.
    attn_calls = _count_forwards(model.base_model.model.model.layers[0].self_attn)
    loss = model(**on_device(fixed_batch(), model), use_cache=False).loss
    assert attn_calls[0] == 1
    loss.backward()
    assert attn_calls[0] == expected  # the layer ran again during backward: activations were recomputed
    grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_prepare_freezes_does_not_upcast_and_runs_once(tiny_model_dir: Path) -> None:
    model, _ = load_base(ModelConfig(model_name=str(tiny_model_dir), bnb_4bit_compute_dtype="bfloat16"))
    assert model.training and model._loraforge_prepared
    assert not any(p.requires_grad for p in model.parameters())
    # peft's prepare_model_for_kbit_training would make these fp32; we keep the compute dtype
    floats = {p.dtype for n, p in model.named_parameters() if p.dtype.is_floating_point}
    assert floats == {torch.bfloat16}, floats
    assert model.config.use_cache is False
    model.eval()
    prepare_for_training(model, gradient_checkpointing=True)  # a second call is a no-op
    assert not model.training
    peft_model = attach_lora(model, LoRAConfig(target_modules="all-linear"))
    trained = [p for p in peft_model.parameters() if p.requires_grad]
    assert trained and all(p.dtype == torch.float32 for p in trained)


def test_qlora_with_bf16_compute_learns_on_cpu(tiny_model_dir: Path) -> None:
    """No fp32 upcast of norms/embeddings is numerically fine: loss finite and falling with bf16 compute."""
    model, _ = load_base(ModelConfig(model_name=str(tiny_model_dir), bnb_4bit_compute_dtype="bfloat16", device="cpu"))
    model = attach_lora(model, LoRAConfig(target_modules="all-linear", lora_dropout=0.0))
    losses = train_steps(model, fixed_batch(), steps=6, lr=1e-2)
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0] - 0.05, losses
