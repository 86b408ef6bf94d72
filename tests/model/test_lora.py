"""LoRA options reach peft: rank, alpha, dropout, bias, presets, modules_to_save, rsLoRA, DoRA, LoRA+, init."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from model_helpers import fixed_batch, on_device, train_steps

from loraforge.config import LORA_TARGET_PRESETS, LoRAConfig, ModelConfig, TrainingConfig
from loraforge.errors import ConfigError
from loraforge.model.load import load_base
from loraforge.model.lora import attach_lora, check_compatible, linear_module_names, parameter_counts
from loraforge.train.optim import param_groups


def _base(path: Path, **model_kwargs):
    model, _ = load_base(ModelConfig(model_name=str(path), **{"use_4bit": False, "dtype": "float32", **model_kwargs}))
    return model


def _lora_layers(model) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}


@pytest.mark.parametrize("preset", list(LORA_TARGET_PRESETS))
def test_presets_and_options_reach_peft(preset: str, tiny_model_dir: Path) -> None:
    cfg = LoRAConfig(r=4, lora_alpha=12, lora_dropout=0.1, bias="none", target_modules=preset)
    model = attach_lora(_base(tiny_model_dir), cfg)
    pc = model.peft_config["default"]
    assert (pc.r, pc.lora_alpha, pc.lora_dropout, pc.bias) == (4, 12, 0.1, "none")
    assert pc.task_type == "CAUSAL_LM" and set(pc.target_modules) == set(LORA_TARGET_PRESETS[preset])
    layers = _lora_layers(model)
    assert {n.rsplit(".", 1)[-1] for n in layers} == set(LORA_TARGET_PRESETS[preset])
    assert len(layers) == 2 * len(LORA_TARGET_PRESETS[preset])  # 2 decoder layers
    layer = next(iter(layers.values()))
    assert layer.r["default"] == 4 and layer.scaling["default"] == pytest.approx(12 / 4)
    assert layer.lora_dropout["default"].p == 0.1
    assert layer.lora_A["default"].weight.shape[0] == 4


def test_named_targets_and_unknown_target(tiny_model_dir: Path) -> None:
    base = _base(tiny_model_dir)
    assert set(linear_module_names(base)) == set(LORA_TARGET_PRESETS["all-linear"])
    with pytest.raises(ConfigError, match="not found in this model.*q_proj"):
        attach_lora(base, LoRAConfig(target_modules=["query_key_value"]))
    model = attach_lora(base, LoRAConfig(target_modules=["k_proj", "down_proj"]))
    assert {n.rsplit(".", 1)[-1] for n in _lora_layers(model)} == {"k_proj", "down_proj"}


def test_rslora_scaling(tiny_model_dir: Path) -> None:
    model = attach_lora(_base(tiny_model_dir), LoRAConfig(r=16, lora_alpha=16, use_rslora=True))
    layer = next(iter(_lora_layers(model).values()))
    assert model.peft_config["default"].use_rslora
    assert layer.scaling["default"] == pytest.approx(16 / math.sqrt(16))


def test_dora_adds_magnitude_and_trains(tiny_model_dir: Path) -> None:
    model = attach_lora(_base(tiny_model_dir, use_4bit=True, bnb_4bit_compute_dtype="bfloat16"),
                        LoRAConfig(use_dora=True, lora_dropout=0.0))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("lora_magnitude_vector" in n for n in names)
    losses = train_steps(model, fixed_batch(), steps=3)
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]


def test_gaussian_init(tiny_model_dir: Path) -> None:
    model = attach_lora(_base(tiny_model_dir), LoRAConfig(r=8, init_lora_weights="gaussian"))
    layer = next(iter(_lora_layers(model).values()))
    assert model.peft_config["default"].init_lora_weights == "gaussian"
    a = layer.lora_A["default"].weight
    assert a.std().item() == pytest.approx(1 / 8, rel=0.3)  # peft: normal(0, 1/r); default (kaiming) differs
    assert torch.count_nonzero(layer.lora_B["default"].weight) == 0


def test_pissa_on_unquantized_base_keeps_the_output(tiny_model_dir: Path) -> None:
    base = _base(tiny_model_dir)
    batch = on_device(fixed_batch(), base)
    with torch.no_grad():
        before = base(input_ids=batch["input_ids"]).logits
        q_before = base.model.layers[0].self_attn.q_proj.weight.clone()
    model = attach_lora(base, LoRAConfig(r=4, init_lora_weights="pissa", lora_dropout=0.0))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert model.peft_config["default"].init_lora_weights == "pissa"
    assert not torch.equal(layer.base_layer.weight, q_before)  # the principal part moved into A and B
    assert torch.count_nonzero(layer.lora_B["default"].weight) > 0
    model.eval()
    with torch.no_grad():
        after = model(input_ids=batch["input_ids"]).logits
    torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-4)


def test_pissa_and_loftq_misuse_are_config_errors(tiny_model_dir: Path) -> None:
    quantized = _base(tiny_model_dir, use_4bit=True)
    with pytest.raises(ConfigError, match="load the base unquantized"):
        attach_lora(quantized, LoRAConfig(init_lora_weights="loftq"))
    with pytest.raises(ConfigError, match="pissa"):
        attach_lora(quantized, LoRAConfig(init_lora_weights="pissa"))
    with pytest.raises(ConfigError, match="CUDA GPU only"):  # peft 0.21's LoftQ hard-codes cuda
        check_compatible(LoRAConfig(init_lora_weights="loftq"), quantized=False, device="cpu")
    check_compatible(LoRAConfig(init_lora_weights="pissa"), quantized=False, device="cpu")


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_modules_to_save_train_in_fp32_inside_a_bf16_model(dtype: str, tiny_model_dir: Path) -> None:
    base = _base(tiny_model_dir, dtype=dtype)
    model = attach_lora(base, LoRAConfig(modules_to_save=["lm_head"], lora_dropout=0.0))
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    head = [p for n, p in trained.items() if "lm_head" in n]
    assert head and all(p.dtype == torch.float32 for p in head)
    batch = on_device(fixed_batch(), model)
    out = model(**batch)
    assert out.logits.dtype == getattr(torch, dtype)  # the rest of the model sees the dtype it had
    losses = train_steps(model, batch, steps=3)
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    model.eval()
    with torch.no_grad():  # no autocast: evaluation after training must not hit a dtype mismatch
        model(input_ids=batch["input_ids"])


def test_loraplus_groups_and_counts(tiny_model_dir: Path) -> None:
    model = attach_lora(_base(tiny_model_dir), LoRAConfig(target_modules="all-linear", loraplus_lr_ratio=16))
    tcfg = TrainingConfig(learning_rate=1e-4)
    groups = param_groups(model, tcfg, LoRAConfig(loraplus_lr_ratio=16))
    by_lr: dict[float, list] = {}
    for g in groups:
        by_lr.setdefault(g["lr"], []).extend(g["params"])
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted(by_lr) == [pytest.approx(1e-4), pytest.approx(1.6e-3)]
    slow, fast = by_lr[min(by_lr)], by_lr[max(by_lr)]
    assert fast and all("lora_B" in names[id(p)] for p in fast)
    assert slow and all("lora_A" in names[id(p)] for p in slow)
    assert {g["lr"] for g in param_groups(model, tcfg, None)} == {1e-4}  # no ratio: one learning rate
    trainable, total = parameter_counts(model)
    assert trainable == sum(p.numel() for p in slow + fast) and 0 < trainable < total
