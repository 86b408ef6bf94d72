"""Long-context training: which switches a run turns on, and turning them on in a peft LoRA/QLoRA Llama model.

What long-context mode changes (`apply_long_context`):
- offloaded checkpointing (kernels/offload.py): the decoder layers' checkpointed inputs go to pinned
  host memory during forward and come back, prefetched a layer ahead, for the recompute;
- a chunked linear cross-entropy (kernels/cross_entropy.py): the [tokens, vocab] logits never exist
  at once. The GPU fast path (`patch_model`) already installs it; without the fast path (CPU,
  `model.fast_kernels=false`, an unsupported model) the same loss is installed here on its own;
- the fused MLP runs over the tokens in tiles (kernels/lora.TiledMLP, on the fast path): its
  [tokens, intermediate] tensors, most of a layer's backward, exist for one tile at a time;
- attention stays O(tokens): an all-ones 2-D attention mask is dropped before the model builds a 4-D
  mask, so SDPA gets `attn_mask=None, is_causal=True` and can pick the flash or memory-efficient
  kernel (a materialized mask is tokens² and forces a masked kernel). transformers 5.2x already does
  this itself for SDPA; the hook makes it independent of the version.

model/memory.py predicts what these switches save (`memory_model`, `max_trainable_length`).
"""

from __future__ import annotations

import os
import types
from collections.abc import Callable
from typing import Any

import psutil
import torch

from loraforge.config import TrainingConfig
from loraforge.kernels.offload import enable_offloaded_checkpointing
from loraforge.kernels.patch import _lm_forward_factory, _unwrap, tile_mlps
from loraforge.model.memory import MLP_TILE_TOKENS


def _on_cuda(model: Any) -> bool:
    return next(model.parameters()).device.type == "cuda"


def _causal_lm(model: Any) -> Any:
    return _unwrap(model)[1]


def enable_chunked_cross_entropy(model: Any) -> bool:
    """Install the chunked linear cross-entropy in the causal-LM head (training steps with labels).

    Returns whether it is in place. The fast path's own installation counts; a head that is not a
    plain frozen Linear keeps the stock loss.
    """
    summary = getattr(model, "_loraforge_patch_summary", None) or {}
    base = _causal_lm(model)
    if summary.get("cross_entropy") or getattr(base, "_loraforge_chunked_ce", False):
        return True
    head = getattr(base, "lm_head", None)
    if not isinstance(head, torch.nn.Linear) or head.bias is not None or head.weight.requires_grad:
        return False
    base.forward = types.MethodType(_lm_forward_factory(base.forward), base)
    base._loraforge_chunked_ce = True
    return True


def _drop_full_mask_hook(module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    mask = kwargs.get("attention_mask")
    if torch.is_tensor(mask) and mask.dim() == 2 and kwargs.get("past_key_values") is None \
            and bool(mask.all()):
        kwargs["attention_mask"] = None
        return args, kwargs
    return None


def drop_full_attention_mask(model: Any) -> bool:
    base = _causal_lm(model)
    if getattr(base, "_loraforge_mask_hook", None) is None:
        base._loraforge_mask_hook = base.register_forward_pre_hook(_drop_full_mask_hook, with_kwargs=True)
    return True


def apply_long_context(model: Any, training: TrainingConfig, log: Callable[[str], None] = print,
                       processes: int = 1, **offload_kwargs: Any) -> dict[str, Any]:
    """Turn on what `training.long_context` and the individual switches ask for; idempotent. A run on one
    CUDA GPU offloads its checkpoints unless `training.offload_activations` is false (one line says so).

    `offload_kwargs` go to `enable_offloaded_checkpointing` (e.g. `host_limit_bytes`)."""
    one_gpu = processes == 1 and _on_cuda(model)
    sw = training.long_context_switches(one_gpu=one_gpu)
    out: dict[str, Any] = {}
    if not any(sw.values()):
        return out
    if not (training.long_context or training.chunked_cross_entropy or training.offload_activations):
        if training.gradient_checkpointing:  # only the default offloading: no long-context advice
            # Asked for by no one, it takes at most half the host memory free now; past that, checkpoints
            # stay on the GPU as they would without it (the offloader's pool limit).
            offload_kwargs.setdefault("host_limit_bytes", 0.5 * psutil.virtual_memory().available)
            enable_offloaded_checkpointing(model, **offload_kwargs)
            log("activations: checkpoints offloaded to pinned host memory "
                "(training.offload_activations: false keeps them on the GPU)")
            out["offload_activations"] = True
        return out
    if sw["offload_activations"]:
        if not training.gradient_checkpointing:
            log("long context: offload_activations needs training.gradient_checkpointing=true; not offloading")
            out["offload_activations"] = False
        else:
            enable_offloaded_checkpointing(model, **offload_kwargs)
            out["offload_activations"] = True
    if sw["chunked_cross_entropy"]:
        out["chunked_cross_entropy"] = enable_chunked_cross_entropy(model)
    if sw["drop_full_attention_mask"]:
        out["drop_full_attention_mask"] = drop_full_attention_mask(model)
        # the part of a layer's backward that grows fastest with length, in tiles (model/memory.py)
        if tiled := tile_mlps(model, MLP_TILE_TOKENS):
            out["tiled_mlp_layers"] = tiled
    base = _causal_lm(model)
    impl = getattr(getattr(base, "config", None), "_attn_implementation", None)
    if impl not in ("sdpa", "flash_attention_2", "flash_attention_3", "flex_attention"):
        log(f"long context: attention implementation is {impl!r}; eager attention is tokens² in memory "
            "(use model.attn_implementation=sdpa)")
    if torch.cuda.is_available() and "expandable_segments:True" not in os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""):
        log("long context: PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True (set before the run starts) "
            "reduces fragmentation at long sequence lengths")
    log(f"long context: {out}")
    return out
