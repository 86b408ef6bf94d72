"""A model's tokenizer, loaded the way a fine-tuning run and `data preview` need it, without torch.

`load_tokenizer` loads it and fixes it once (`fix_tokenizer`); an embedded or GGUF model's comes from a
folder made from the GGUF file (`gguf_tokenizer_dir`). Hub errors become messages that say what to do
(`_explain_hub_error`, also used for the model's weights by `load.py`). Nothing here imports torch: a
preview of an embedded or GGUF model answers seconds sooner without it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerFast

from loraforge.config import ModelConfig
from loraforge.errors import ModelLoadError
from loraforge.model.embedded import (
    EMBEDDED_MODELS,
    embedded_gguf_path,
    made_from_gguf,
    materialize_gguf_tokenizer,
    materialized,
)


def gguf_tokenizer_dir(cfg: ModelConfig) -> Path | None:
    """For an embedded model or a .gguf file, the folder of its tokenizer: the materialized model folder once
    an earlier run made it (the tokenizer a run sees), else the tokenizer converted alone, without
    dequantizing the weights (what `data preview` needs on a cold cache). None for any other model, and for
    a .gguf path that is no file (`load.resolve_model_path` says so)."""
    name = cfg.model_name
    gguf = embedded_gguf_path(name.lower()) if name.lower() in EMBEDDED_MODELS else Path(os.path.expanduser(name))
    if gguf.suffix != ".gguf" or not gguf.is_file():
        return None
    return materialized(gguf, cfg.cache_dir) or materialize_gguf_tokenizer(gguf, cfg.cache_dir)


def hub_token() -> str | None:
    """The user's Hugging Face token: HF_TOKEN / HUGGING_FACE_HUB_TOKEN, or the hub's login file."""
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        if os.environ.get(var):
            return os.environ[var]
    # Where `huggingface-cli login` writes it: $HF_TOKEN_PATH, else $HF_HOME/token, HF_HOME defaulting to
    # $XDG_CACHE_HOME/huggingface (huggingface_hub's rules).
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    login = Path(os.environ.get("HF_TOKEN_PATH") or os.path.join(home, "token")).expanduser()
    return (login.read_text(encoding="utf-8").strip() or None) if login.is_file() else None


def _http_status(err: BaseException) -> int | None:
    """The HTTP status of a hub error anywhere in the exception chain (transformers wraps hub errors in OSError)."""
    seen: set[int] = set()
    e: BaseException | None = err
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        response = getattr(e, "response", None)
        status = getattr(response, "status_code", None)
        if isinstance(status, int):
            return status
        e = e.__cause__ or e.__context__
    return None


def _chain_text(err: BaseException) -> str:
    parts, seen, e = [], set(), err
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        parts.append(f"{type(e).__name__}: {e}")
        e = e.__cause__ or e.__context__
    return "\n".join(parts)


def _explain_hub_error(name: str, err: BaseException) -> ModelLoadError:
    """Turn a hub/loading failure into a message that says what to do (401/403, no network, no such model)."""
    text = _chain_text(err)
    status = _http_status(err)
    if status in (401, 403) or any(s in text for s in ("GatedRepoError", "gated", "401 Client", "403 Client",
                                                        "Unauthorized", "restricted")):
        have = "a token was sent (HF_TOKEN or the hub login file), so " if hub_token() else "no token was found, and "
        return ModelLoadError(
            f"the hub refused access to '{name}' (HTTP {status or '401/403'}: gated or private model); {have}"
            "you need access: accept the licence on the model's hub page with your account, then "
            "`huggingface-cli login` or set HF_TOKEN=hf_..., and run again.")
    if status == 404 or "RepositoryNotFoundError" in text:
        return ModelLoadError(f"the hub has no model '{name}' (or it is private and your token cannot see it). "
                              "Check the spelling of model.model_name.")
    if any(s in text for s in ("offline", "Offline", "Connection", "resolve", "Max retries", "LocalEntryNotFound",
                               "couldn't connect", "not a local folder", "does not appear to have")):
        why = " (HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes") else ""
        return ModelLoadError(
            f"cannot load '{name}': it is not a local folder and the hub cannot be reached{why} (or has no such "
            "model in the local cache). Download it on a machine with network access "
            "(`huggingface-cli download NAME --local-dir DIR`) and point model.model_name at the folder, "
            "or use the embedded model 'smollm2-135m-instruct'.")
    return ModelLoadError(f"cannot load '{name}': {text.splitlines()[0][:300]}")


def load_tokenizer(path: str, cfg: ModelConfig) -> Any:
    """The tokenizer of a resolved model path (a folder or a hub id), fixed once (`fix_tokenizer`)."""
    try:
        if _generic_gguf_tokenizer(path, cfg):
            tok = PreTrainedTokenizerFast.from_pretrained(path)
        else:
            from transformers import AutoTokenizer  # imports torch (seconds): see _generic_gguf_tokenizer

            tok = AutoTokenizer.from_pretrained(path, cache_dir=cfg.cache_dir, revision=cfg.revision,
                                                token=hub_token(), trust_remote_code=cfg.trust_remote_code)
    except Exception as e:  # noqa: BLE001 - turned into a message that says what to do
        raise _explain_hub_error(cfg.model_name, e) from e
    return fix_tokenizer(tok)


def _generic_gguf_tokenizer(path: str, cfg: ModelConfig) -> bool:
    """Whether `path` is a folder that `materialize_gguf` or `materialize_gguf_tokenizer` wrote, holding a
    tokenizer of the generic class (tokenizer.json alone). It is loaded by that class, the one AutoTokenizer
    picks for it too: AutoTokenizer imports torch (2-3 s), which a `data preview` of an embedded or GGUF
    model does not need."""
    if not made_from_gguf(path, cfg.cache_dir):
        return False
    try:
        config = json.loads((Path(path) / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    # transformers 5 names the class TokenizersBackend, 4.x PreTrainedTokenizerFast
    return config.get("tokenizer_class") in ("TokenizersBackend", "PreTrainedTokenizerFast")


# Unused special tokens that make a safe pad, by tokenizer family: Llama 3.1 reserves one for exactly this,
# Llama 3.0 has reserved tokens, Llama 2 / Mistral have <unk>, SmolLM2 / GPT-style have <|endoftext|>.
PAD_CANDIDATES = ("<|finetune_right_pad_id|>", "<|reserved_special_token_0|>", "<pad>", "<|endoftext|>", "<unk>")


def fix_tokenizer(tok: Any) -> Any:
    """The tokenizer fixes users trip on, done once.

    A pad token is required for batching. Reusing EOS as pad is what most guides do, and it silently
    stops the model from learning to end its answers wherever labels are derived from the pad id
    (labels = input_ids with pad positions masked); our labels come from explicit masks, but other tools
    that see this tokenizer (and the saved adapter folder) may not, so we prefer a distinct token that
    the vocabulary already has (no embedding resize, which a 4-bit model cannot do). EOS is the last resort.
    Padding is on the right for training; batched generation switches to left padding locally.
    """
    if tok.pad_token is None or tok.pad_token == tok.eos_token:
        vocab = tok.get_vocab()
        special = {tok.eos_token, tok.bos_token}
        for candidate in PAD_CANDIDATES:
            if candidate in vocab and candidate not in special:
                tok.pad_token = candidate
                break
        else:
            if tok.pad_token is None:
                tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok
