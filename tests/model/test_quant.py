"""bitsandbytes' packed AVX512-BF16 CPU kernel: which layers may use it, and that training never does.

The shape rule is checked against bitsandbytes' own repacking on every machine (it is plain torch); the
kernel itself runs only where the CPU has AVX512-BF16, and those tests say so when they skip.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from model_helpers import eval_logits, fixed_batch

from loraforge.config import LoRAConfig, ModelConfig
from loraforge.model.load import load_base
from loraforge.model.lora import attach_lora
from loraforge.model.quant import cpu_packing_available, is_packed, linear4bit_layers, packable, set_cpu_packing

needs_packed_kernel = pytest.mark.skipif(not cpu_packing_available(),
                                         reason="this CPU has no AVX512-BF16: bitsandbytes' packed kernel cannot run")


def _quantized(out_features: int, in_features: int):
    from bitsandbytes.nn import Linear4bit

    layer = Linear4bit(in_features, out_features, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    torch.manual_seed(0)
    layer.load_state_dict({"weight": torch.randn(out_features, in_features)})
    return layer.to("cpu")  # quantizes


@pytest.mark.parametrize("shape", [(64, 64), (64, 160), (160, 64), (96, 128), (48, 128), (32, 192), (64, 100)])
def test_packable_is_exactly_what_bitsandbytes_can_repack(shape: tuple[int, int]) -> None:
    from bitsandbytes.functional import _convert_weight_packed_for_cpu, _convert_weight_packed_for_cpu_inverse

    layer = _quantized(*shape)
    before = layer.weight.data.clone()
    ours = packable(layer.out_features, layer.in_features, layer.weight.blocksize)
    try:
        packed, state = _convert_weight_packed_for_cpu(layer.weight.data.clone(), layer.weight.quant_state)
    except (RuntimeError, AssertionError):
        assert not ours, f"{shape}: packable() said yes but bitsandbytes cannot repack it"
        return
    assert ours, f"{shape}: bitsandbytes repacks it but packable() said no"
    restored, _ = _convert_weight_packed_for_cpu_inverse(packed, state)
    assert torch.equal(restored, before)


def _tiny_nf4(path: Path):
    model, _ = load_base(ModelConfig(model_name=str(path), use_4bit=True, dtype="float32", device="cpu"))
    return attach_lora(model, LoRAConfig(target_modules="all-linear", lora_dropout=0.0))


def _first_layer_grads(model, batch) -> dict[str, torch.Tensor]:
    model.train()
    model.zero_grad(set_to_none=True)
    model(**batch, use_cache=False).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if "layers.0." in n and p.grad is not None}


def test_a_training_model_keeps_its_gradients_after_an_evaluation(tiny_model_dir: Path) -> None:
    """The bug the guard prevents: an evaluation packs the layers, whose kernel has no backward, and the
    training steps after it send no gradient below them. Layer 0's LoRA grads must not change."""
    model = _tiny_nf4(tiny_model_dir)
    batch = fixed_batch()
    before = _first_layer_grads(model, batch)
    eval_logits(model, batch)
    assert not any(is_packed(layer) for layer in linear4bit_layers(model))
    after = _first_layer_grads(model, batch)
    assert before.keys() == after.keys() and len(before) == 14  # 7 projections x (A, B)
    for name in before:
        torch.testing.assert_close(after[name], before[name], rtol=0, atol=0, msg=name)


@needs_packed_kernel
def test_forbidding_the_kernel_unpacks_layers_an_evaluation_packed(tiny_model_dir: Path) -> None:
    model = _tiny_nf4(tiny_model_dir)
    batch = fixed_batch()
    reference = _first_layer_grads(model, batch)
    counts = set_cpu_packing(model, True)
    eval_logits(model, batch)
    layers = linear4bit_layers(model)
    packed = [is_packed(layer) for layer in layers]
    # The tiny Llama 3's MLP is 160 wide: its down projections cannot pack, everything else does.
    assert counts == {"packed": sum(packed), "unpacked": len(layers) - sum(packed)} and counts["unpacked"] == 2
    assert packed == [packable(x.out_features, x.in_features, x.weight.blocksize) for x in layers]
    set_cpu_packing(model, False)
    assert not any(is_packed(layer) for layer in layers)
    after = _first_layer_grads(model, batch)
    # Packing rounds each block's scale to bf16 and unpacking cannot give those bits back, so the weights
    # (and grads) come back within bf16 rounding, not bit-exact: one more reason training never packs.
    assert after.keys() == reference.keys()
    for name in reference:
        assert _rel_diff(after[name], reference[name]) < 1e-2, name


def _rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def test_inference_models_pack_only_where_the_kernel_is(tiny_model_dir: Path) -> None:
    model, _ = load_base(ModelConfig(model_name=str(tiny_model_dir), use_4bit=True, dtype="float32", device="cpu"),
                         for_training=False)
    eval_logits(model, fixed_batch())  # must not raise on the 160-wide layers, whatever the CPU
    layers = linear4bit_layers(model)
    expected = [cpu_packing_available() and packable(x.out_features, x.in_features, x.weight.blocksize)
                for x in layers]
    assert [is_packed(x) for x in layers] == expected

