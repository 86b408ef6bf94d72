"""Tiny random models with the real tokenizer, built in the tests (no downloads).

The tokenizer is the embedded SmolLM2 one (real BPE, real chat template); the model is a random Llama
(or Mistral, Qwen2/3, Gemma 2/3) a few layers deep, saved as a standard Hugging Face folder so every path of loraforge —
loading, quantization, LoRA, training, merge, serving — loads it the way it loads a user's model.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

ARCHS: dict[str, dict[str, Any]] = {
    # Llama 2: multi-head attention (kv heads = heads), no GQA
    "llama2": dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=4),
    # Llama 3.1: grouped-query attention and llama3 rope scaling
    "llama3": dict(model_type="llama", hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, rope_theta=500000.0,
                   rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    # Mistral: GQA and sliding-window attention
    "mistral": dict(model_type="mistral", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, sliding_window=64),
    # Qwen2: GQA with biases on q/k/v
    "qwen2": dict(model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2),
    # Qwen3: GQA, RMSNorm on q and k per head, an explicit head_dim
    "qwen3": dict(model_type="qwen3", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16),
    # Gemma 2: GQA, alternating sliding-window and global layers, logit soft-capping, GeLU-tanh MLP
    "gemma2": dict(model_type="gemma2", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=64,
                   query_pre_attn_scalar=16),
    # Gemma 3 (text): GQA, q/k norms, local layers with their own rope base, one global layer in two here
    "gemma3": dict(model_type="gemma3_text", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=64,
                   query_pre_attn_scalar=16, sliding_window_pattern=2),
}


def embedded_tokenizer_dir() -> Path:
    """The embedded model's folder; or, where its 98 MB package is not installed (the GPU machine, which
    gets the tokenizer files only), the folder LORAFORGE_TEST_TOKENIZER names."""
    if os.environ.get("LORAFORGE_TEST_TOKENIZER"):
        return Path(os.environ["LORAFORGE_TEST_TOKENIZER"])
    from loraforge.model.embedded import resolve_embedded

    return resolve_embedded("smollm2-135m-instruct")


def make_tiny_model(out: Path, arch: str = "llama3", seed: int = 0, tokenizer_dir: Path | None = None) -> Path:
    """Write a random `arch` model + the embedded tokenizer into `out`; return `out`."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir or embedded_tokenizer_dir())
    spec = dict(ARCHS[arch])
    model_type = spec.pop("model_type")
    config = AutoConfig.for_model(model_type, vocab_size=len(tok), max_position_embeddings=1024,
                                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                  pad_token_id=tok.pad_token_id, tie_word_embeddings=False, **spec)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).to(torch.float32)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def write_jsonl(path: Path, records: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def chat_records(n: int = 24) -> list[dict[str, Any]]:
    """Short multi-turn conversations with a learnable pattern (the reply echoes a keyword)."""
    words = ["apple", "river", "cloud", "stone", "green", "music", "paper", "light"]
    out = []
    for i in range(n):
        w = words[i % len(words)]
        out.append({"messages": [{"role": "user", "content": f"Say {w}."},
                                 {"role": "assistant", "content": f"{w} {w} {w}."},
                                 {"role": "user", "content": f"Again {w}?"},
                                 {"role": "assistant", "content": f"Yes, {w}."}]})
    return out


def alpaca_records(n: int = 24) -> list[dict[str, str]]:
    words = ["apple", "river", "cloud", "stone", "green", "music", "paper", "light"]
    return [{"instruction": f"Repeat the word {words[i % 8]}.", "input": "" if i % 2 else "twice",
             "output": f"{words[i % 8]} {words[i % 8]}"} for i in range(n)]


def lm_batch(vocab: int, rows: int, seq: int, *, seed: int = 0, pad_from: int | None = None,
             unlabeled_prefix: int = 0, device: str = "cpu") -> dict[str, torch.Tensor]:
    """A random causal-LM batch (labels = inputs). `pad_from`: the last row is padding from that column
    on (mask 0, label -100); `unlabeled_prefix`: the first row's first tokens carry no label."""
    g = torch.Generator(device=device).manual_seed(seed)
    ids = torch.randint(0, vocab, (rows, seq), device=device, generator=g)
    mask, labels = torch.ones_like(ids), ids.clone()
    if pad_from is not None:
        mask[-1, pad_from:] = 0
        labels[-1, pad_from:] = -100
    labels[0, :unlabeled_prefix] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def run_rows(dec, plan: dict[int, list[tuple[str, list[int], int]]], steps: int) -> dict[str, list[int]]:
    """Steps the decoder `steps` times; before step s the rows in plan[s] (name, prompt, max_new) join.
    Each row leaves once it has its tokens. Returns every row's tokens."""
    got: dict[str, list[int]] = {}
    want: dict[str, int] = {}

    def take(done):
        for step in done:
            for name, tok in step:
                if len(got[name]) < want[name]:
                    got[name].append(tok)
        for name in list(want):
            if len(got[name]) == want[name] and any(r is not None and r.owner == name for r in dec.rows):
                dec.leave(name)

    for s in range(steps):
        for name, prompt, new in plan.get(s, []):
            ids = torch.tensor([prompt])
            got[name], want[name] = [], new
            got[name] += dec.join(ids, torch.ones_like(ids), [name], [new], key="a")
        take(dec.step())
    take(dec.drain())
    return got
