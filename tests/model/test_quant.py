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


def _gguf_with_file_type(path: Path, file_type: int) -> Path:
    """A GGUF file holding only metadata: enough for the file-type check, which reads no tensor."""
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_file_type(file_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    return path


def test_a_4bit_load_of_a_model_published_at_4_bits_is_named(tmp_path: Path) -> None:
    import gguf

    from loraforge.model.quant import published_low_bit

    assert published_low_bit(ModelConfig()) == "Q4_1"  # the embedded SmolLM2-135M-Instruct, 4-bit by default
    assert published_low_bit(ModelConfig(use_4bit=False)) is None
    assert published_low_bit(ModelConfig(model_name="meta-llama/Llama-2-7b-hf")) is None  # no GGUF: not read
    types = gguf.LlamaFileType
    for ftype, want in [(types.MOSTLY_Q4_K_M, "Q4_K_M"), (types.MOSTLY_IQ3_S, "IQ3_S"), (types.MOSTLY_Q8_0, None),
                        (types.MOSTLY_BF16, None), (types.MOSTLY_Q6_K, None)]:
        path = _gguf_with_file_type(tmp_path / f"{ftype.name}.gguf", int(ftype))
        assert published_low_bit(ModelConfig(model_name=str(path))) == want, ftype.name


def test_a_run_warns_before_it_rounds_a_4bit_model_again(tmp_path: Path) -> None:
    """The warning is a line of the run's own log, before the model loads (what a user reads first)."""
    from tinymodels import chat_records, write_jsonl

    from loraforge.config import DataConfig
    from loraforge.train.trainer import LLAMATrainer

    data = write_jsonl(tmp_path / "chat.jsonl", chat_records(8))
    logged: list[str] = []
    trainer = LLAMATrainer(ModelConfig(device="cpu"), LoRAConfig(r=4, target_modules="qv"),
                           DataConfig(dataset=str(data), max_length=64), log=logged.append)
    trainer.setup()
    [warning] = [line for line in logged if "NF4" in line]
    assert warning.startswith("warning: smollm2-135m-instruct was published as Q4_1 GGUF")
    assert "model.use_4bit=false" in warning
    assert logged.index(warning) < next(i for i, line in enumerate(logged) if line.startswith("model "))
