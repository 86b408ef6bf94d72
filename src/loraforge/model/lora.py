"""Attach a LoRA adapter through peft, and report what is trained."""

from __future__ import annotations

import importlib.util
from typing import Any

import torch
from peft import LoftQConfig, LoraConfig, get_peft_model
from peft.utils.other import ModulesToSaveWrapper

from loraforge.config import LoRAConfig
from loraforge.errors import ConfigError


def linear_module_names(model: Any) -> list[str]:
    """Leaf names of the linear layers LoRA can target (e.g. q_proj), excluding the output head."""
    names = set()
    for full, module in model.named_modules():
        leaf = full.rsplit(".", 1)[-1]
        if leaf == "lm_head":
            continue
        if isinstance(module, torch.nn.Linear) or "Linear" in type(module).__name__ and hasattr(module, "weight"):
            names.add(leaf)
    return sorted(names)


def peft_config(cfg: LoRAConfig, model: Any) -> Any:
    targets = cfg.resolved_targets()
    available = linear_module_names(model)
    missing = [t for t in targets if t not in available]
    if missing:
        raise ConfigError(f"lora.target_modules: {missing} not found in this model. "
                          f"Its linear layers are: {', '.join(available)}.")
    # peft skips a modules_to_save name that matches nothing, so a typo would silently train nothing extra.
    names = [full for full, _ in model.named_modules()]
    unknown = [m for m in cfg.modules_to_save or [] if not any(n == m or n.endswith("." + m) for n in names)]
    if unknown:
        raise ConfigError(f"lora.modules_to_save: {unknown} not found in this model (e.g. lm_head, embed_tokens).")
    init: Any = {"default": True, "gaussian": "gaussian", "pissa": "pissa", "loftq": "loftq"}[cfg.init_lora_weights]
    kwargs: dict[str, Any] = {}
    if cfg.init_lora_weights == "loftq":
        kwargs["loftq_config"] = LoftQConfig(loftq_bits=4)
    return LoraConfig(
        r=cfg.r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, target_modules=targets,
        bias=cfg.bias, task_type=cfg.task_type, modules_to_save=cfg.modules_to_save,
        use_rslora=cfg.use_rslora, use_dora=cfg.use_dora, init_lora_weights=init, **kwargs,
    )


def check_compatible(lora: LoRAConfig, *, quantized: bool, device: torch.device | str) -> None:
    """Refuse LoRA options the loaded base cannot support, with a message that says what to change.

    Cheap and config-only, so a caller can run it before loading a large model; attach_lora runs it too.
    """
    device = torch.device(device)
    if lora.init_lora_weights == "loftq":
        if quantized:
            raise ConfigError("lora.init_lora_weights = 'loftq' quantizes the base itself (it replaces each target "
                              "weight by its NF4 round-trip and puts the error into A and B): load the base "
                              "unquantized (model.use_4bit=false model.use_8bit=false).")
        if device.type != "cuda":
            # peft 0.21's loftq_init moves every weight to "cuda" (or "xpu") unconditionally.
            raise ConfigError("lora.init_lora_weights = 'loftq' runs on a CUDA GPU only (peft's LoftQ quantizes "
                              "with bitsandbytes on the GPU); on this device use 'default', 'gaussian' or 'pissa'.")
        if importlib.util.find_spec("scipy") is None:
            raise ConfigError("lora.init_lora_weights = 'loftq' needs scipy (peft imports it for LoftQ): "
                              "pip install scipy.")
    if lora.init_lora_weights == "pissa" and quantized:
        raise ConfigError("lora.init_lora_weights = 'pissa' needs the full-precision base to take its singular "
                          "vectors; set model.use_4bit=false model.use_8bit=false, or use 'loftq' for a "
                          "quantization-aware start.")


def attach_lora(model: Any, cfg: LoRAConfig) -> Any:
    """Wrap `model` in a peft LoRA model; the trained weights are fp32 (the optimizer's precision)."""
    quantized = bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))
    check_compatible(cfg, quantized=quantized, device=next(model.parameters()).device)
    peft_model = get_peft_model(model, peft_config(cfg, model))
    for p in peft_model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    _keep_saved_modules_dtype(peft_model)
    return peft_model


def _keep_saved_modules_dtype(peft_model: Any) -> None:
    """Make each `modules_to_save` copy behave, dtype-wise, like the frozen module it replaces.

    Its weights are fp32 (for the optimizer) while the model around it runs in bf16/fp16; without
    autocast (CPU, evaluation after training, generation) an fp32 lm_head would meet bf16 hidden states
    and matmul would refuse the mix. The copy casts its input to its own dtype and its output back to
    the base dtype, so the rest of the model sees what it saw before.
    """
    for wrapper in peft_model.modules():
        if not isinstance(wrapper, ModulesToSaveWrapper):
            continue
        base_dtype = next(wrapper.original_module.parameters()).dtype
        for copy in wrapper.modules_to_save.values():
            own = next(copy.parameters()).dtype
            if own == base_dtype:
                continue

            def cast_in(module: Any, args: tuple, own: torch.dtype = own) -> tuple:
                return tuple(a.to(own) if torch.is_tensor(a) and a.is_floating_point() else a for a in args)

            def cast_out(module: Any, args: tuple, out: Any, base: torch.dtype = base_dtype) -> Any:
                return out.to(base) if torch.is_tensor(out) and out.is_floating_point() else out

            copy.register_forward_pre_hook(cast_in)
            copy.register_forward_hook(cast_out)


def parameter_counts(model: Any) -> tuple[int, int]:
    """(trainable, total) parameters; 4-bit weights are counted as the parameters they represent."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel()
        if p.__class__.__name__ == "Params4bit":
            n *= 2  # two 4-bit values per stored byte
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total
