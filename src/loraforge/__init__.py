"""loraforge: fine-tune Llama-family models with LoRA and QLoRA.

The public names (LLAMATrainer, the config sections, load, pipeline, ...) are imported lazily, so `import loraforge` is
cheap and the command line starts fast.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_PUBLIC = {
    "ModelConfig": "loraforge.config",
    "LoRAConfig": "loraforge.config",
    "DataConfig": "loraforge.config",
    "TrainingConfig": "loraforge.config",
    "EvalConfig": "loraforge.config",
    "RunConfig": "loraforge.config",
    "SourceConfig": "loraforge.config",
    "load_config": "loraforge.config",
    "LLAMATrainer": "loraforge.train.trainer",
    "PerplexityEvaluator": "loraforge.eval.perplexity",
    "QualitativeEvaluator": "loraforge.eval.qualitative",
    "CustomDatasetLoader": "loraforge.data.custom",
    "register_loader": "loraforge.data.custom",
    "load": "loraforge.infer.load",
    "pipeline": "loraforge.infer.load",
    "LoraforgeError": "loraforge.errors",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'loraforge' has no attribute {name!r}")
