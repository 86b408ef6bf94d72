"""`fast_path_summary`: one line that says whether a run got the fast path, and if not, what to set."""

import pytest
import torch

pytest.importorskip("peft")

from loraforge.kernels.graphs import enable_graphed_layers  # noqa: E402
from loraforge.kernels.patch import fast_path_summary, is_supported, patch_model  # noqa: E402

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)


def _model(model_type="llama", **lora):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **TINY)).to(torch.bfloat16)
    m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    cfg = dict(r=2, lora_alpha=4, lora_dropout=0.05, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    m = get_peft_model(m, LoraConfig(**{**cfg, **lora}))
    m.train()
    return m


def test_on_names_what_runs():
    m = _model()
    patch_model(m, allow_cpu=True)
    assert fast_path_summary(m) == "fast path: on (fused LoRA with dropout 0.05, no CUDA graphs, chunked loss)"
    runner = enable_graphed_layers(m, emulate=True)
    assert fast_path_summary(m) == "fast path: on (fused LoRA with dropout 0.05, CUDA graphs, chunked loss)"
    runner.disable("capture of layer 0 failed: boom")
    assert "CUDA graphs off: capture of layer 0 failed: boom" in fast_path_summary(m)
    # where packed rows take varlen attention (a CUDA check, packed.py), the line says so
    report = {**m._loraforge_patch_summary, "packed_attention": "on (err 2.0e-03)"}
    assert fast_path_summary(report).endswith(", chunked loss, rows without padding or masks)")


def test_dora_without_dropout_is_on_and_says_so():
    m = _model(use_dora=True, lora_dropout=0.0)
    s = patch_model(m, allow_cpu=True)
    assert s["patched"] and s["dora"] and not s["skipped"]
    assert fast_path_summary(m) == "fast path: on (fused DoRA, no CUDA graphs, chunked loss)"


def test_on_from_a_report():
    report = {"patched": True, "lora_dropout": 0.0, "cross_entropy": False, "skipped": [],
              "triton": {"swiglu": "on (err 1e-3)", "rope": "off (err 3e-1)", "dequant": "on (err 0)"}}
    assert fast_path_summary(report) == ("fast path: on (fused LoRA, stock loss, Triton off: rope "
                                         "(their PyTorch twins run))")
    report["skipped"] = ["layers.1.mlp: unsupported projection"]
    assert fast_path_summary(report).endswith("; 1 module(s) on the stock path, e.g. layers.1.mlp: "
                                              "unsupported projection")


@pytest.mark.parametrize("lora,reason,hint", [
    (dict(use_dora=True), "DoRA with lora_dropout > 0 is not supported",
     "set lora.lora_dropout: 0 (DoRA runs on the fast path without dropout)"),
    (dict(bias="all"), "bias='all' trains biases", "set lora.bias: none"),
])
def test_off_says_which_setting_turns_it_on(lora, reason, hint):
    m = _model(**lora)
    s = patch_model(m, allow_cpu=True)
    assert not s["patched"] and (s["reason"], s["hint"]) == (reason, hint)
    assert fast_path_summary(s) == f"fast path: off for this run because {reason} — {hint}"
    assert fast_path_summary(m) == f"fast path: off for this run because {reason} — {hint}"


def test_off_on_the_cpu_and_for_other_models():
    m = _model()  # never patched, on the CPU: is_supported explains
    assert fast_path_summary(m) == ("fast path: off for this run because the model is on cpu: the fast path "
                                    "is for CUDA GPUs — run on a CUDA GPU (model.device: auto or cuda)")
    line = fast_path_summary(_model("gemma", target_modules=["q_proj"]))
    assert line.startswith("fast path: off for this run because model type 'gemma' is not supported yet — ")
    assert "llama, mistral, qwen2" in line


def test_off_for_8bit_weights_and_foreign_code():
    m = _model()
    layer = m.base_model.model.model.layers[0]
    s = layer.mlp.down_proj.weight
    layer.mlp.down_proj.weight = torch.nn.Parameter(torch.zeros(s.shape, dtype=torch.int8), requires_grad=False)
    ok, why = is_supported(m, allow_cpu=True)
    assert not ok and "8-bit" in why and "model.use_8bit: false" in fast_path_summary(patch_model(m, allow_cpu=True))

    m = _model()
    attn = m.base_model.model.model.layers[0].self_attn
    attn.__class__ = type("RemoteAttention", (type(attn),), {})  # what trust_remote_code could load
    s = patch_model(m, allow_cpu=True)
    assert not s["patched"] and "RemoteAttention" in s["reason"] and "trust_remote_code" in s["hint"]


def test_a_caller_that_did_not_patch_passes_its_reason():
    line = fast_path_summary({"patched": False, "reason": "model.fast_kernels is false",
                              "hint": "set model.fast_kernels: true"})
    assert line == "fast path: off for this run because model.fast_kernels is false — set model.fast_kernels: true"
