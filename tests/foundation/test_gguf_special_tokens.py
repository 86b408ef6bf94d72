"""The materialized embedded model has SmolLM2's true special tokens on every transformers version.

(transformers 5.17's GGUF Llama tokenizer converter made EOS = BOS = <|im_start|>; 5.23's gets it right.)
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import AutoTokenizer, GenerationConfig

from loraforge.model.embedded import embedded_gguf_path, gguf_special_tokens


def test_gguf_metadata_declares_smollm2_special_tokens() -> None:
    declared = gguf_special_tokens(embedded_gguf_path("smollm2-135m-instruct"))
    assert declared == {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "unk_token": "<|endoftext|>",
                        "pad_token": "<|im_end|>"}


def test_materialized_tokenizer_config_and_generation_config_agree(embedded_model_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(embedded_model_dir)
    assert (tok.bos_token, tok.eos_token, tok.unk_token, tok.pad_token) == (
        "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|endoftext|>")
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 0)
    config = json.loads((embedded_model_dir / "config.json").read_text())
    gen = GenerationConfig.from_pretrained(embedded_model_dir)
    for ids in ((config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]),
                (gen.bos_token_id, gen.eos_token_id, gen.pad_token_id)):
        assert ids == (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
