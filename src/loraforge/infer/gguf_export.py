"""A minimal GGUF writer for Llama-architecture models (f16 or f32), for llama.cpp users.

Neither transformers (it only reads GGUF) nor the `gguf` package (it has the writer but the converter
lives in llama.cpp's repository, not in the wheel) turns a Hugging Face folder into GGUF, so this module
does the part we need: the llama.cpp tensor names, the Q/K row permutation, the hyperparameters, and
the tokenizer (via `gguf.vocab`). Quantize the result with llama.cpp's `llama-quantize` if wanted.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from loraforge.errors import ModelLoadError

# Hugging Face Llama parameter name (after "model.layers.N.") -> llama.cpp name (after "blk.N.")
LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
TOP_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}


def permute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF rotary layout (two halves) -> Meta/llama.cpp layout (interleaved pairs), per head.

    transformers' conversion script applied the inverse when the weights came from Meta's checkpoint;
    llama.cpp's `convert_hf_to_gguf.py` undoes it the same way.
    """
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_name(hf_name: str) -> str | None:
    if hf_name in TOP_NAMES:
        return TOP_NAMES[hf_name]
    parts = hf_name.split(".")
    if parts[:2] == ["model", "layers"] and ".".join(parts[3:]) in LAYER_NAMES:
        return f"blk.{parts[2]}.{LAYER_NAMES['.'.join(parts[3:])]}"
    return None


def rope_settings(config: dict) -> dict:
    """Rope theta and scaling: transformers 5.x writes `rope_parameters`; 4.x wrote `rope_theta` + `rope_scaling`."""
    return {"rope_theta": config.get("rope_theta", 10000.0), **(config.get("rope_scaling") or {}),
            **(config.get("rope_parameters") or {})}


def llama3_rope_factors(rs: dict, head_dim: int) -> np.ndarray:
    """Per-frequency divisors of Llama 3.1 rope scaling, stored as `rope_freqs.weight` (as llama.cpp does)."""
    base = rs["rope_theta"]
    factor, low, high = rs.get("factor", 8.0), rs.get("low_freq_factor", 1.0), rs.get("high_freq_factor", 4.0)
    old_len = rs.get("original_max_position_embeddings", 8192)
    freqs = 1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old_len / high:
            out.append(1.0)
        elif wavelen > old_len / low:
            out.append(factor)
        else:
            smooth = (old_len / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


def _vocab(model_dir: Path):
    from gguf.vocab import BpeVocab, LlamaHfVocab, SentencePieceVocab

    for cls in (BpeVocab, LlamaHfVocab, SentencePieceVocab):
        try:
            return cls(model_dir)
        except (FileNotFoundError, TypeError):
            continue
    raise ModelLoadError(f"{model_dir}: no tokenizer the GGUF writer understands (tokenizer.json with a "
                         "byte-level or Llama BPE model, or tokenizer.model).")


def write_gguf(model_dir: str | Path, out_file: str | Path) -> Path:
    """Write the Llama model in `model_dir` (a HF folder) as one GGUF file; f32 if the folder is f32, else f16."""
    import gguf
    from safetensors import safe_open

    model_dir, out_file = Path(model_dir), Path(out_file)
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    if config.get("model_type") not in ("llama", "mistral"):
        raise ModelLoadError(f"GGUF export supports Llama-architecture models; {model_dir} is "
                             f"{config.get('model_type')!r}. Use llama.cpp's convert_hf_to_gguf.py.")
    if config.get("model_type") == "mistral" and config.get("sliding_window"):
        raise ModelLoadError("GGUF export of sliding-window (Mistral) models is not supported; use llama.cpp's "
                             "convert_hf_to_gguf.py.")
    f32 = config.get("dtype", config.get("torch_dtype")) == "float32"
    np_dtype = np.float32 if f32 else np.float16
    n_head, n_kv = config["num_attention_heads"], config.get("num_key_value_heads", config["num_attention_heads"])
    head_dim = config.get("head_dim") or config["hidden_size"] // n_head

    w = gguf.GGUFWriter(str(out_file), "llama")
    w.add_name(model_dir.name)
    w.add_context_length(config.get("max_position_embeddings", 4096))
    w.add_embedding_length(config["hidden_size"])
    w.add_block_count(config["num_hidden_layers"])
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_rope_dimension_count(head_dim)
    if head_dim != config["hidden_size"] // n_head:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    rope = rope_settings(config)
    w.add_rope_freq_base(float(rope["rope_theta"]))
    w.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-5)))
    w.add_vocab_size(config["vocab_size"])
    w.add_file_type(gguf.LlamaFileType.ALL_F32 if f32 else gguf.LlamaFileType.MOSTLY_F16)

    vocab = _vocab(model_dir)
    tokens, scores, types = [], [], []
    for text, score, ttype in vocab.all_tokens():
        tokens.append(text)
        scores.append(score)
        types.append(ttype)
    for i in range(len(tokens), config["vocab_size"]):  # embedding rows beyond the tokenizer (padding)
        tokens.append(f"[PAD{i}]")
        scores.append(-1000.0)
        types.append(gguf.TokenType.UNUSED)
    w.add_tokenizer_model(vocab.tokenizer_model)
    if vocab.tokenizer_model == "gpt2":
        # llama.cpp picks its pre-tokenizer regex by name; "default" is the GPT-2 one. Models with their
        # own regex (Llama 3, SmolLM) tokenize a few edge cases differently until re-converted by llama.cpp.
        w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    gguf.SpecialVocab(model_dir, load_merges=vocab.tokenizer_model == "gpt2",
                      n_vocab=len(tokens)).add_to_gguf(w, quiet=True)

    if rope.get("rope_type", rope.get("type")) == "llama3":
        w.add_tensor("rope_freqs.weight", llama3_rope_factors(rope, head_dim))
    elif rope.get("rope_type", rope.get("type")) == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rope["factor"]))

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{model_dir}: no .safetensors weights to convert.")
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                target = gguf_name(name)
                if target is None:
                    continue
                t = f.get_tensor(name).to(torch.float32)
                if target.endswith("attn_q.weight"):
                    t = permute_qk(t, n_head)
                elif target.endswith("attn_k.weight"):
                    t = permute_qk(t, n_kv)
                # 1-D tensors (norms) stay f32, as llama.cpp expects and as its converter writes them.
                w.add_tensor(target, t.numpy().astype(np.float32 if t.ndim == 1 else np_dtype))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out_file
