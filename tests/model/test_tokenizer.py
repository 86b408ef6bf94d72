"""Tokenizers: hub errors and tokens, the fixes done once, and an embedded or GGUF model's tokenizer
loaded without torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import transformers
from huggingface_hub.errors import GatedRepoError, HfHubHTTPError

from loraforge.config import ModelConfig
from loraforge.model import embedded, tokenizer


def _http(status: int) -> httpx.Response:
    url = "https://huggingface.co/meta-llama/Llama-2-7b-hf/resolve/main/config.json"
    return httpx.Response(status, request=httpx.Request("GET", url))


# ---------------------------------------------------------------------------------------------- hub

def test_wrapped_status_is_found_through_the_cause_chain() -> None:
    try:
        try:
            raise GatedRepoError("restricted", response=_http(403))
        except GatedRepoError as inner:
            raise OSError("wrapped by transformers") from inner
    except OSError as outer:
        assert "HTTP 403" in str(tokenizer._explain_hub_error("x/y", outer))
    assert "no model 'x/y'" in str(tokenizer._explain_hub_error("x/y", HfHubHTTPError("nope", response=_http(404))))


def test_token_from_env_then_login_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.delenv("HF_TOKEN_PATH", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    assert tokenizer.hub_token() is None
    (tmp_path / "token").write_text("hf_from_login_file\n")
    assert tokenizer.hub_token() == "hf_from_login_file"
    monkeypatch.setenv("HF_TOKEN_PATH", str(tmp_path / "elsewhere"))
    (tmp_path / "elsewhere").write_text("hf_token_path")
    assert tokenizer.hub_token() == "hf_token_path"
    monkeypatch.setenv("HUGGING_FACE_HUB_TOKEN", "hf_legacy")
    assert tokenizer.hub_token() == "hf_legacy"
    monkeypatch.setenv("HF_TOKEN", "hf_env")
    assert tokenizer.hub_token() == "hf_env"


# ---------------------------------------------------------------------------------------------- tokenizer

def _fresh_tokenizer(path: Path):
    return transformers.AutoTokenizer.from_pretrained(path)


def test_pad_token_added_distinct_from_eos(embedded_model_dir: Path) -> None:
    tok = _fresh_tokenizer(embedded_model_dir)
    tok.pad_token = None
    tok.padding_side = "left"
    tokenizer.fix_tokenizer(tok)
    assert tok.pad_token is not None and tok.pad_token_id != tok.eos_token_id
    assert tok.padding_side == "right"
    # pad == eos (what many guides do) is also replaced by an unused token
    tok.pad_token = tok.eos_token
    tokenizer.fix_tokenizer(tok)
    assert tok.pad_token_id != tok.eos_token_id
    # the fixes keep EOS in the labels of a padded batch
    batch = tok(["hi" + tok.eos_token, "a longer line" + tok.eos_token], padding=True, add_special_tokens=False)
    assert all(tok.eos_token_id in ids for ids in batch["input_ids"])


def test_pad_falls_back_to_eos_when_no_candidate(embedded_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tok = _fresh_tokenizer(embedded_model_dir)
    tok.pad_token = None
    monkeypatch.setattr(tokenizer, "PAD_CANDIDATES", ("<no-such-token>",))
    tokenizer.fix_tokenizer(tok)
    assert tok.pad_token == tok.eos_token


def test_load_tokenizer_fixes_once(tiny_model_dir: Path) -> None:
    tok = tokenizer.load_tokenizer(str(tiny_model_dir), ModelConfig(model_name=str(tiny_model_dir)))
    assert tok.padding_side == "right" and tok.pad_token_id != tok.eos_token_id


# ---------------------------------------------------------------------------------------------- GGUF models

def test_gguf_tokenizer_dir_converts_the_tokenizer_alone(tmp_path: Path, embedded_model_dir: Path) -> None:
    cfg = ModelConfig(model_name="smollm2-135m-instruct", cache_dir=str(tmp_path))
    folder = tokenizer.gguf_tokenizer_dir(cfg)
    assert folder is not None and folder.parent == tmp_path / "tokenizers" and not (tmp_path / "models").exists()
    gguf = embedded.embedded_gguf_path("smollm2-135m-instruct")
    assert tokenizer.gguf_tokenizer_dir(ModelConfig(model_name=str(gguf), cache_dir=str(tmp_path))) == folder
    # once the model folder exists, its tokenizer: the one a run sees
    assert tokenizer.gguf_tokenizer_dir(ModelConfig(model_name="smollm2-135m-instruct")) == embedded_model_dir
    for other in (str(embedded_model_dir), "meta-llama/Llama-2-7b-hf", str(tmp_path / "missing.gguf")):
        assert tokenizer.gguf_tokenizer_dir(ModelConfig(model_name=other)) is None


def test_a_gguf_made_folder_loads_like_auto_tokenizer_without_it(embedded_model_dir: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    expected = tokenizer.fix_tokenizer(transformers.AutoTokenizer.from_pretrained(embedded_model_dir))

    def refuse(*args, **kwargs):
        raise AssertionError("AutoTokenizer (and with it torch) is not needed here")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", refuse)
    tok = tokenizer.load_tokenizer(str(embedded_model_dir), ModelConfig(model_name="smollm2-135m-instruct"))
    assert type(tok) is type(expected)
    assert tok.special_tokens_map == expected.special_tokens_map and tok.chat_template == expected.chat_template
    assert (tok.padding_side, tok.model_max_length) == (expected.padding_side, expected.model_max_length)
    messages = [{"role": "user", "content": "Ça va? 🙂 2024"}, {"role": "assistant", "content": "Oui.\n\n  Merci"}]
    assert tok.apply_chat_template(messages) == expected.apply_chat_template(messages)


def test_the_preview_path_imports_no_torch() -> None:
    code = ("import sys, loraforge.data.preview, loraforge.model.tokenizer; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
