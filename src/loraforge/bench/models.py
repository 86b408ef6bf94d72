"""The two models a benchmark compares, with the same LoRA weights, and how their grads are compared.

- the stock QLoRA stack (`build_stock`): peft's `prepare_model_for_kbit_training` (fp32 upcasts of norms,
  embeddings and lm_head), non-reentrant checkpointing, SDPA, NF4 double-quant, exactly the baseline's;
- loraforge (`build_loraforge`): the product's own path, as `LLAMATrainer.setup` runs it — `load_model`
  (bf16, frozen, checkpointing, train mode), `attach_lora`, the fast path (`patch_model`, then CUDA graphs
  where the trainer would turn them on), then `apply_long_context`.

Both load a checkpoint of random bf16 weights of the real shape (`make_checkpoint`), written once.
"""

from __future__ import annotations

import gc
import os
import statistics
from collections.abc import Callable
from typing import Any

import torch

from loraforge.config import LoRAConfig, ModelConfig, RunConfig, TrainingConfig
from loraforge.model.load import load_model, pick_placement, resolve_model_path
from loraforge.model.lora import attach_lora
from loraforge.train.fast_path import apply_fast_path
from loraforge.train.long_context import apply_long_context

SHAPES = {
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                      max_position_embeddings=4096),
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                      rope_theta=500000.0, max_position_embeddings=8192),
    # Mistral-7B-v0.1: Llama's layout with GQA and sliding-window attention
    "mistral-7b": dict(model_type="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, vocab_size=32000, sliding_window=4096,
                       max_position_embeddings=32768),
    # Qwen2.5-7B: GQA with q/k/v biases
    "qwen2.5-7b": dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, vocab_size=152064, rope_theta=1e6,
                       max_position_embeddings=32768),
    # Qwen3-8B: q/k norms, head_dim 128
    "qwen3-8b": dict(model_type="qwen3", hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                     rope_theta=1e6, max_position_embeddings=40960),
    # Gemma-2-9B: GeGLU, four norms per layer, head_dim 256, attention and final logit soft-capping
    "gemma2-9b": dict(model_type="gemma2", hidden_size=3584, intermediate_size=14336, num_hidden_layers=42,
                      num_attention_heads=16, num_key_value_heads=8, head_dim=256, vocab_size=256000,
                      query_pre_attn_scalar=256, sliding_window=4096, max_position_embeddings=8192,
                      tie_word_embeddings=True),
    # Gemma-3-12B (text): q/k norms, local and global RoPE
    "gemma3-12b": dict(model_type="gemma3_text", hidden_size=3840, intermediate_size=15360, num_hidden_layers=48,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=256, vocab_size=262208,
                       query_pre_attn_scalar=256, sliding_window=1024, max_position_embeddings=131072,
                       tie_word_embeddings=True),
    # Phi-3-mini-4k: fused qkv_proj and gate_up_proj
    "phi3-mini": dict(model_type="phi3", hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, vocab_size=32064, sliding_window=2047,
                      max_position_embeddings=4096),
    "tiny": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
                 max_position_embeddings=1024),
}
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
QV = ["q_proj", "v_proj"]
ROOT = os.environ.get("LORAFORGE_BENCH_CKPT", "/dev/shm/loraforge-ckpt")


def make_checkpoint(shape: str, root: str = ROOT, device: str = "cuda", *, layers: int | None = None,
                    tokenizer: str | None = None) -> str:
    """Random bf16 weights of the real shape, written once (the stock baseline does the same).

    `layers`: only that many decoder layers (gradient checks: the per-layer math is the real shape's).
    `tokenizer`: a tokenizer folder saved beside the weights, for `loraforge train`; a vocabulary
    smaller than the tokenizer's is raised to it (the embedded SmolLM2 tokenizer has 49,152 tokens,
    Llama-2's and Mistral's vocabularies 32,000)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = f"{root}/{shape}" + (f"-{layers}l" if layers else "") + ("-tok" if tokenizer else "")
    if os.path.exists(f"{path}/config.json"):
        return path
    spec = dict(SHAPES[shape])
    if layers:
        spec["num_hidden_layers"] = layers
    tok = None
    if tokenizer:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tokenizer)
        spec["vocab_size"] = max(spec["vocab_size"], len(tok))
        spec.update(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    tie = spec.pop("tie_word_embeddings", False)
    cfg = AutoConfig.for_model(spec.pop("model_type", "llama"), **spec, tie_word_embeddings=tie)
    with torch.device(device):
        torch.manual_seed(0)
        m = AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16)
    m.save_pretrained(path, max_shard_size="50GB")
    if tok is not None:
        tok.save_pretrained(path)
    del m
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return path


def bench_run(path: str, r: int, targets: str, *, device: str = "cuda", quant: bool = True,
              long_context: bool = False, cuda_graphs: bool = True, lora_dropout: float = 0.0,
              use_dora: bool = False, offload_activations: bool | None = None) -> RunConfig:
    """The run a benchmark case stands for: bf16 compute, NF4 double-quant (`quant`), LoRA r with alpha 2r
    and `lora_dropout` on q,v (`targets="qv"`) or all linears, batch 1, paged AdamW 32-bit."""
    return RunConfig(
        model=ModelConfig(model_name=path, use_4bit=quant, bnb_4bit_compute_dtype="bfloat16", dtype="bfloat16",
                          attn_implementation="sdpa", device=device, cuda_graphs=cuda_graphs),
        lora=LoRAConfig(r=r, lora_alpha=2 * r, lora_dropout=lora_dropout, use_dora=use_dora,
                        target_modules="qv" if targets == "qv" else "all-linear"),
        training=TrainingConfig(per_device_train_batch_size=1, optim="paged_adamw_32bit", long_context=long_context,
                                offload_activations=offload_activations))


def build_stock(path: str, r: int, targets: str, *, device: str = "cuda", quant: bool = True,
                lora_dropout: float = 0.0, use_dora: bool = False) -> Any:
    """The stock QLoRA stack, as the baseline builds it."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kw = dict(dtype=torch.bfloat16, device_map={"": 0 if device == "cuda" else device},
              attn_implementation="sdpa")
    if quant:
        kw["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(path, **kw)
    ck = {"use_reentrant": False}
    if quant:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                                gradient_checkpointing_kwargs=ck)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=ck)
    model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=lora_dropout, use_dora=use_dora,
                                             target_modules=QV if targets == "qv" else _all_linear(model),
                                             task_type="CAUSAL_LM"))
    model.train()  # from_pretrained returns eval mode, where HF skips gradient checkpointing
    return model


def _all_linear(model: Any) -> list[str]:
    """The seven Llama projections, or Phi-3's four fused ones."""
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    return ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"] if "qkv_proj" in names else ALL


def load_loraforge(run: RunConfig) -> Any:
    """loraforge's model before the fast path: the trainer's `load_base` (minus the tokenizer, which a
    benchmark checkpoint lacks) and `attach_lora`."""
    placement = pick_placement(run.model)
    model = load_model(run.model, resolve_model_path(run.model), placement, for_training=True,
                       gradient_checkpointing=run.training.gradient_checkpointing)
    return attach_lora(model, run.lora)


def build_loraforge(run: RunConfig, *, allow_cpu: bool = False, log: Callable[[str], None] = print,
                    **offload_kwargs: Any) -> tuple[Any, dict[str, Any]]:
    """loraforge's model as `loraforge train` builds it for `run`; (model, {"patch", "long_context"})."""
    model = load_loraforge(run)
    fast = apply_fast_path(model, run, allow_cpu=allow_cpu, log=log)
    lc = apply_long_context(model, run.training, log=log, **offload_kwargs)
    return model, {"patch": fast.report, "long_context": lc}


def build_model(path: str, r: int, targets: str, *, stock: bool, device: str = "cuda", quant: bool = True) -> Any:
    """The stock QLoRA stack (stock=True) or loraforge's build before the fast path (the tests patch it)."""
    if stock:
        return build_stock(path, r, targets, device=device, quant=quant)
    return load_loraforge(bench_run(path, r, targets, device=device, quant=quant))


def lora_params(model: Any) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def sync_lora(src: Any, dst: Any, seed: int = 0) -> None:
    """Same LoRA weights in both models, B drawn nonzero so A's grads are nonzero too."""
    g = torch.Generator().manual_seed(seed)
    ps, pd = lora_params(src), lora_params(dst)
    assert ps.keys() == pd.keys(), "the two models have different LoRA parameters"
    with torch.no_grad():
        for n, p in ps.items():
            if "lora_B" in n:
                p.copy_((torch.randn(p.shape, generator=g) * 0.02).to(p.dtype))
            pd[n].copy_(p)


def one_step_grads(model: Any, batch: dict) -> tuple[float, dict[str, torch.Tensor]]:
    params = lora_params(model)
    for p in params.values():
        p.grad = None
    loss = model(**batch).loss
    loss.backward()
    grads = {n: p.grad.detach().float().clone() for n, p in params.items()}
    for p in params.values():
        p.grad = None
    return float(loss.detach()), grads


def compare(stock_model: Any, fast_model: Any, batch: dict) -> dict:
    """Loss and max over LoRA params of ‖g_fast − g_stock‖/‖g_stock‖ for one batch."""
    ls, gs = one_step_grads(stock_model, batch)
    lf, gf = one_step_grads(fast_model, batch)
    rels = {n: float((gf[n] - g).norm() / g.norm().clamp_min(1e-30)) for n, g in gs.items()}
    worst_name = max(rels, key=rels.get)
    flat_s = torch.cat([g.reshape(-1) for g in gs.values()])
    flat_f = torch.cat([gf[n].reshape(-1) for n in gs])
    return {"stock_loss": ls, "loraforge_loss": lf, "loss_rel_diff": abs(lf - ls) / abs(ls),
            "max_rel_grad_diff": rels[worst_name], "worst_param": worst_name,
            "median_rel_grad_diff": statistics.median(rels.values()),
            "global_rel_grad_diff": float((flat_f - flat_s).norm() / flat_s.norm()),
            "n_lora_params": len(gs)}
