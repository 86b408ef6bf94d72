"""Load base + adapter for generation in one call, from a run folder or an adapter folder.

A run folder (written by `loraforge train`) holds `config.yaml`, `loraforge_run.json` and `adapter/`; the
base model and the prompt template are taken from there. A plain adapter folder (PEFT layout) names its
base in `adapter_config.json`; the template is then the tokenizer's chat template.

A folder loaded here may come from someone else, so nothing in it decides whether code runs: a run's
`model.trust_remote_code: true` is ignored unless the caller allows remote code (the `trust_remote_code`
argument of `load`, which each command passes from its `--trust-remote-code` flag).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loraforge.config import ModelConfig, RunConfig, load_config
from loraforge.errors import ModelLoadError

log = logging.getLogger(__name__)


@dataclass
class Loaded:
    """A model ready for generation, with the facts needed to prompt it the way it was trained."""

    model: Any
    tokenizer: Any
    run: RunConfig | None
    adapter_dir: Path | None
    data_kind: str  # alpaca | chat | text
    formatter: Any  # prompt -> model input text

    def __iter__(self):  # allows `model, tokenizer = loraforge.load(...)[:2]`-style unpacking
        yield self.model
        yield self.tokenizer


def locate(run_or_adapter: str | Path) -> tuple[RunConfig | None, Path | None, dict[str, Any]]:
    """(run config or None, adapter folder or None, run facts) for a run folder, adapter folder or model."""
    path = Path(run_or_adapter).expanduser()
    if (path / "config.yaml").is_file() and (path / "adapter" / "adapter_config.json").is_file():
        return load_config(path / "config.yaml"), path / "adapter", _run_facts(path / "loraforge_run.json")
    if (path / "adapter_config.json").is_file():
        parent = path.parent
        if (parent / "config.yaml").is_file() and path.name == "adapter":
            return locate(parent)
        return None, path, {}
    if path.is_dir() and (path / "config.json").is_file():
        return None, None, {}  # a plain model folder: no adapter
    if path.exists():
        raise ModelLoadError(f"{str(path)!r} is neither a run folder (config.yaml + adapter/), an adapter folder "
                             "(adapter_config.json) nor a model folder (config.json).")
    raise ModelLoadError(f"{str(path)!r} does not exist. Give a run folder (e.g. runs/demo), an adapter folder, "
                         "or a model.")


def _run_facts(file: Path) -> dict[str, Any]:
    """`loraforge_run.json`: facts about the run (data kind, template); absent = none known."""
    if not file.is_file():
        return {}
    try:
        facts = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise ModelLoadError(f"{file} is not valid JSON ({type(e).__name__}: {str(e)[:200]}).") from None
    if not isinstance(facts, dict) or facts.get("data_kind", "chat") not in ("alpaca", "chat", "text"):
        raise ModelLoadError(f"{file} must hold a JSON object whose data_kind is alpaca, chat or text.")
    return facts


def load(run_or_adapter: str | Path, *, quantize: str | None = None, device: str = "auto",
         base_model: str | None = None, dtype: str | None = None, trust_remote_code: bool = False) -> Loaded:
    """Load base + adapter for generation.

    quantize: None = as trained (4-bit stays 4-bit), "none", "4bit" or "8bit".
    base_model: override the base (e.g. a local copy of the hub model the adapter was trained on).
    dtype: dtype of the unquantized weights ("bfloat16", "float16", "float32"); None = the run's setting.
    trust_remote_code: let transformers run model code from the hub (the commands' `--trust-remote-code`);
    a run folder's own `model.trust_remote_code` never turns it on.
    """
    import torch
    from peft import PeftModel

    from loraforge.data.templates import load_user_template, prompt_formatter
    from loraforge.model.load import load_base

    run, adapter_dir, facts = locate(run_or_adapter)
    if run is not None:
        mcfg = ModelConfig(**{**run.model.__dict__, "device": device})
    elif adapter_dir is not None:
        try:
            cfg = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ModelLoadError(f"{adapter_dir / 'adapter_config.json'} is not valid JSON ({e}).") from None
        if not isinstance(cfg, dict):
            raise ModelLoadError(f"{adapter_dir / 'adapter_config.json'} must hold a JSON object.")
        mcfg = ModelConfig(model_name=cfg.get("base_model_name_or_path") or "", use_4bit=False, device=device)
    else:
        mcfg = ModelConfig(model_name=str(run_or_adapter), use_4bit=False, device=device)
    if base_model:
        mcfg.model_name = base_model
    if dtype is not None:
        mcfg.dtype = dtype
    if quantize is not None:
        mcfg.use_4bit, mcfg.use_8bit = quantize == "4bit", quantize == "8bit"
    allowed = trust_remote_code
    if run is not None and run.model.trust_remote_code and not allowed:
        log.warning("%s asks for model.trust_remote_code; loading it with remote code off. If you trust the "
                    "folder and the hub repository %r, add --trust-remote-code.", run_or_adapter, mcfg.model_name)
    mcfg.trust_remote_code = allowed
    model, tokenizer = load_base(mcfg, for_training=False)
    if adapter_dir is not None:
        if not (adapter_dir / "adapter_model.safetensors").is_file():
            raise ModelLoadError(f"{adapter_dir}: no adapter_model.safetensors (only safetensors adapters are loaded).")
        try:
            model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)
        except Exception as e:  # noqa: BLE001 - corrupt or mismatched adapters get one clear message
            raise ModelLoadError(f"cannot load the adapter in {adapter_dir}: {type(e).__name__}: "
                                 f"{str(e).splitlines()[0][:300]}. Was it trained on this base model "
                                 f"({mcfg.model_name})?") from e
    model.eval()
    if getattr(model, "generation_config", None) is not None and tokenizer.pad_token_id is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    torch.set_grad_enabled(True)  # leave global state as we found it; generation uses its own no_grad
    kind = facts.get("data_kind", "chat")
    template = load_user_template(run.data.template) if run is not None else None
    system = run.data.system_prompt if run is not None else None
    return Loaded(model, tokenizer, run, adapter_dir, kind, prompt_formatter(kind, tokenizer, template, system))


def pipeline(run_or_adapter: str | Path, **kwargs: Any) -> Any:
    """A transformers text-generation pipeline over base + adapter (the seed's "pipeline API" deployment)."""
    from transformers import pipeline as hf_pipeline

    loaded = load(run_or_adapter, **kwargs)
    return hf_pipeline("text-generation", model=loaded.model, tokenizer=loaded.tokenizer)
