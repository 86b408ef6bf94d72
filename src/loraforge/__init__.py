"""loraforge: fine-tune Llama-family models with LoRA and QLoRA.

The public names (LLAMATrainer, the config sections, load, pipeline, ...) are imported lazily, so `import loraforge` is
cheap and the command line starts fast.
"""

from __future__ import annotations

import logging
from importlib import import_module
from typing import Any

__version__ = "0.1.0"


class HeldWarning(logging.Filter):
    """Holds back the log records that mention `word`, keeping the last one's text in `held`."""

    def __init__(self, word: str) -> None:
        super().__init__()
        self.word, self.held = word, None

    def filter(self, record: logging.LogRecord) -> bool:
        if self.word in str(record.msg):
            self.held = record.getMessage()
            return False
        return True


# bitsandbytes 0.50, imported on an AVX512-BF16 CPU (peft imports it too), warns when the optional `kernels` package
# is missing: on every command, though that kernel only serves packed 4-bit CPU layers. Held here, before any
# import of bitsandbytes, and said by model/quant.py when such a layer exists.
KERNELS_WARNING = HeldWarning("kernels")
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(KERNELS_WARNING)

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
