"""loraforge's fast training path for LoRA/QLoRA Llama models on CUDA GPUs.

    from loraforge.kernels import patch_model
    summary = patch_model(peft_model)   # in place; summary["patched"] says whether it took

Importing this package is cheap and works without a GPU or Triton: the modules that need
transformers, bitsandbytes or Triton load on first use.
"""

from __future__ import annotations


def patch_model(model, *, fast_cross_entropy: bool = True, allow_cpu: bool = False) -> dict:
    from .patch import patch_model as _patch

    return _patch(model, fast_cross_entropy=fast_cross_entropy, allow_cpu=allow_cpu)


def is_supported(model, *, allow_cpu: bool = False) -> tuple[bool, str]:
    from .patch import is_supported as _is_supported

    return _is_supported(model, allow_cpu=allow_cpu)


__all__ = ["is_supported", "patch_model"]
