"""Load a base model and its tokenizer the way a fine-tuning run needs them.

One function, `load_base`, resolves the model name (embedded name, .gguf file, local folder or hub id),
builds the quantization config, loads on the right device, fixes the tokenizer once, and prepares a
k-bit model for training. `attach_lora` (in lora.py) adds the adapter.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from loraforge.config import ModelConfig
from loraforge.errors import ModelLoadError
from loraforge.model.embedded import EMBEDDED_MODELS, embedded_gguf_path, materialize_gguf, resolve_embedded
from loraforge.model.gguf_tokenizer import read_metadata
from loraforge.model.quant import quantization_config, set_cpu_packing
from loraforge.model.tokenizer import _explain_hub_error, hub_token, load_tokenizer

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass
class Placement:
    """Where the model runs and in which dtype its unquantized weights live."""

    device: torch.device
    dtype: torch.dtype


def pick_placement(cfg: ModelConfig) -> Placement:
    """Device and dtype of the frozen weights (for a 4-bit model: its compute dtype)."""
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("model.device = 'cuda' but no CUDA GPU is visible. Use model.device=auto or cpu.")
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
    wanted = cfg.bnb_4bit_compute_dtype if cfg.use_4bit else cfg.dtype
    if wanted != "auto":
        dtype = _DTYPES[wanted]
    elif use_cuda:
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    else:
        dtype = torch.float32  # bf16 matmuls on most CPUs are emulated and slower than fp32
    return Placement(device, dtype)


def _gguf_file(name: str) -> Path | None:
    """The GGUF file `model_name` points at (an embedded model's, or a path ending in .gguf), else None."""
    if name.lower() in EMBEDDED_MODELS:
        return embedded_gguf_path(name.lower())
    return Path(os.path.expanduser(name)) if name.endswith(".gguf") else None


def resolve_model_path(cfg: ModelConfig) -> str:
    """Turn `model_name` into something `from_pretrained` accepts: a local folder or a hub id."""
    name = cfg.model_name
    if name.lower() in EMBEDDED_MODELS:
        return str(resolve_embedded(name.lower(), cfg.cache_dir))
    path = Path(os.path.expanduser(name))
    if name.endswith(".gguf"):
        if not path.is_file():
            raise ModelLoadError(f"model.model_name: GGUF file {name!r} does not exist.")
        try:
            return str(materialize_gguf(path, cfg.cache_dir))
        except torch.OutOfMemoryError:
            raise
        except Exception as e:  # noqa: BLE001 - a truncated or foreign file fails deep inside the GGUF reader
            raise ModelLoadError(f"model.model_name: cannot read the GGUF file {name!r} (truncated or not GGUF?): "
                                 f"{type(e).__name__}: {str(e)[:200]}") from e
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"model.model_name: {name!r} is a folder without config.json — not a Hugging Face "
                                 "model folder. Point at the folder holding config.json and the weights.")
        return str(path)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ModelLoadError(f"model.model_name: {name!r} is neither an existing path nor a hub id (owner/name).")
    return name


# GGUF file types (llama.cpp's LLAMA_FTYPE, without "MOSTLY_") whose weights hold 4 bits or fewer.
_LOW_BIT_PREFIXES = ("Q4_", "Q3_", "Q2_", "Q1_", "IQ", "TQ", "MXFP4", "NVFP4")


def published_low_bit(cfg: ModelConfig) -> str | None:
    """The GGUF file type (e.g. "Q4_1") when a run asks for 4-bit loading of a model published as a GGUF of
    4 bits or fewer a weight, else None. NF4 then rounds weights that already sit on another 4-bit grid: on
    the embedded SmolLM2-135M (Q4_1) that is +21% held-out perplexity before training, +5-6% after it, while
    QLoRA on bf16-origin weights is the QLoRA paper's near-lossless case (bench/NOTES.md, session 14)."""
    if not cfg.use_4bit:
        return None
    path = _gguf_file(cfg.model_name)
    if path is None or not path.is_file():
        return None
    import gguf  # the reader's enum of file types; imported only for GGUF sources

    try:
        kind = gguf.LlamaFileType(read_metadata(path).get("general.file_type")).name.removeprefix("MOSTLY_")
    except (ModelLoadError, ValueError):  # unreadable here (the load reports it) or a type this gguf lacks
        return None
    return kind if kind.startswith(_LOW_BIT_PREFIXES) else None


def load_base(cfg: ModelConfig, *, for_training: bool = True, gradient_checkpointing: bool = True,
              placement: Placement | None = None, sharded: bool = False) -> tuple[Any, Any]:
    """Load (model, tokenizer). For training, the model is prepared (frozen, checkpointing, train mode).

    `sharded`: the model will be wrapped by FSDP, which places and shards it (see load_model)."""
    placement = placement or pick_placement(cfg)
    path = resolve_model_path(cfg)
    tokenizer = load_tokenizer(path, cfg)
    model = load_model(cfg, path, placement, for_training=for_training, gradient_checkpointing=gradient_checkpointing,
                       sharded=sharded)
    return model, tokenizer


def load_model(cfg: ModelConfig, path: str, placement: Placement, *, for_training: bool = True,
               gradient_checkpointing: bool = True, sharded: bool = False) -> Any:
    """The model alone, from a resolved path (a folder without a tokenizer, e.g. a benchmark checkpoint, works).

    `sharded` (FSDP): no device_map, so that with Accelerate's cpu_ram_efficient_loading only rank 0 reads
    the weights and FSDP broadcasts them (sync_module_states) while sharding them onto each GPU.
    """
    # transformers' modeling code adds a few tenths of a second to the import: `data preview` needs only
    # the tokenizer.
    from transformers import AutoModelForCausalLM

    qconf = quantization_config(cfg, placement.dtype, sharded=sharded)
    kwargs: dict[str, Any] = dict(
        dtype=placement.dtype,
        attn_implementation=cfg.attn_implementation,
        cache_dir=cfg.cache_dir, revision=cfg.revision, token=hub_token(),
        trust_remote_code=cfg.trust_remote_code,
    )
    if not sharded:
        kwargs["device_map"] = {"": placement.device}
    if qconf is not None:
        kwargs["quantization_config"] = qconf
    try:
        try:
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        except ValueError as e:
            # Gemma 2 refuses sdpa in transformers 5 (its attention logits are soft-capped, which sdpa cannot
            # do): the default attn_implementation falls back to eager for such models instead of failing.
            if cfg.attn_implementation != "sdpa" or "scaled_dot_product_attention" not in str(e):
                raise
            model = AutoModelForCausalLM.from_pretrained(path, **(kwargs | {"attn_implementation": "eager"}))
    except (OSError, ValueError, RuntimeError, SafetensorError) as e:  # SafetensorError: a truncated weights file
        if isinstance(e, torch.OutOfMemoryError):
            raise
        raise _explain_hub_error(cfg.model_name, e) from e
    if qconf is not None and placement.device.type == "cpu":
        # bitsandbytes' packed CPU kernel has no backward and takes only some shapes (see model/quant.py).
        set_cpu_packing(model, enabled=not for_training)
    if for_training:
        prepare_for_training(model, gradient_checkpointing=gradient_checkpointing)
    else:
        model.eval()
    return model


def prepare_for_training(model: Any, *, gradient_checkpointing: bool) -> None:
    """Freeze the base and enable checkpointing in train mode; done once.

    Unlike peft's `prepare_model_for_kbit_training`, nothing is upcast to fp32: Llama's RMSNorm already
    computes its variance in fp32, while fp32 norm weights would turn the whole residual stream, the
    attention and the lm_head fp32 (23% more GPU time measured on a 7B step, and 2 GiB for a 128K-vocab
    lm_head). Only the LoRA weights are fp32 (attach_lora), as the optimizer needs.
    """
    if getattr(model, "_loraforge_prepared", False):
        return
    for p in model.parameters():
        p.requires_grad_(False)
    if gradient_checkpointing:
        # Non-reentrant checkpointing propagates gradients to the LoRA weights inside a block even when
        # the block's input does not require grad, so no input-embedding hook is needed.
        # transformers 5.2x renamed the method (and its argument); 5.17, on the GPU image, has only the old one.
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    # from_pretrained returns eval mode, and transformers applies checkpointing only in train mode:
    # without this a 7B QLoRA step at 4x512 took 20 GiB instead of 6.
    model.train()
    model._loraforge_prepared = True
