"""bitsandbytes quantization: the config a run asks for, and which CPU kernel each 4-bit layer may use.

On a CPU with AVX512-BF16 (recent Xeons and EPYCs), bitsandbytes 0.50 repacks a 4-bit layer's weight
into a blocked layout the first time the layer runs in eval mode without gradients, and from then on
computes it with a bf16 kernel. Two things make that unsafe to leave to chance:

- The repacking assumes the layer's input width is a multiple of the quantization block size and its
  output width a multiple of 32 (`_convert_weight_packed_for_cpu`); any other shape raises a RuntimeError
  in the middle of an evaluation (a tiny model's 160-wide MLP did, on the first such CPU CI met).
- The packed kernel has no backward. A layer packed during an evaluation inside a training run stays
  packed when training resumes, and from then on no gradient flows through its frozen weight to the
  layers below (torch warns "an autograd kernel was not registered"; the input's grad is None): a
  QLoRA run on such a CPU would go on training silently wrong after its first evaluation.

So a model loaded for training never packs, and a model loaded for inference packs only the layers whose
shapes the kernel takes. `set_cpu_packing` is the one switch; tests force it both ways on every machine.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from loraforge.config import ModelConfig
from loraforge.errors import ModelLoadError

# The packed layout groups 32 output rows (bitsandbytes' block_n) and pairs input columns.
_PACK_ROWS = 32

log = logging.getLogger(__name__)
BNB_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"  # where bitsandbytes warns that `kernels` is missing


_kernel_note_said = False  # the held `kernels` warning (loraforge/__init__.py) is said once


def quantization_config(cfg: ModelConfig, compute_dtype: torch.dtype, *, sharded: bool = False) -> Any | None:
    """bitsandbytes settings. `sharded` (FSDP): store the packed 4-bit weights in the compute dtype, so FSDP
    can flatten them into one parameter with the bf16 norms and embeddings; the bytes are the same."""
    if not (cfg.use_4bit or cfg.use_8bit):
        return None
    try:  # bitsandbytes is optional at run time (a platform without a build): checked only when asked for
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError as e:
        raise ModelLoadError("4-bit/8-bit loading needs bitsandbytes: pip install 'bitsandbytes>=0.50' "
                             "(or set model.use_4bit=false).") from e
    if cfg.use_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=cfg.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=cfg.use_nested_quant,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_quant_storage=compute_dtype if sharded else torch.uint8,
    )


def cpu_packing_available() -> bool:
    """Whether this CPU and bitsandbytes build have the packed AVX512-BF16 4-bit kernel."""
    try:
        from bitsandbytes.functional import has_avx512bf16
    except ImportError:  # no bitsandbytes, or a version without the packed CPU kernel
        return False
    return bool(has_avx512bf16())


def packable(out_features: int, in_features: int, blocksize: int) -> bool:
    """Whether bitsandbytes' CPU repacking can take a [out, in] 4-bit weight quantized in `blocksize` blocks."""
    return out_features % _PACK_ROWS == 0 and in_features % 2 == 0 and in_features % blocksize == 0


def linear4bit_layers(model: torch.nn.Module) -> list[Any]:
    """The bitsandbytes 4-bit linear layers of `model` (inside LoRA wrappers too)."""
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:  # no bitsandbytes here: no 4-bit layer either
        return []
    return [m for m in model.modules() if isinstance(m, Linear4bit)]


def set_cpu_packing(model: torch.nn.Module, enabled: bool) -> dict[str, int]:
    """Allow (for layers whose shapes take it) or forbid the packed CPU kernel on every 4-bit layer.

    A layer already packed is unpacked when the kernel is forbidden, so a model switched back to training
    computes gradients again. Returns how many layers may pack and how many may not.
    """
    counts = {"packed": 0, "unpacked": 0}
    hardware = cpu_packing_available()
    for layer in linear4bit_layers(model):
        ok = enabled and hardware and packable(layer.out_features, layer.in_features, layer.weight.blocksize)
        if not ok:
            _unpack(layer)
        layer.support_avx512bf16_for_cpu = ok
        counts["packed" if ok else "unpacked"] += 1
    if counts["packed"]:
        _say_kernel_note()
    return counts


def _say_kernel_note() -> None:
    """bitsandbytes' warning that its faster packed-layer CPU kernel is missing, now that a layer would use it."""
    global _kernel_note_said
    # Found through the logger, which the filter is installed on: model/ may not import the package's __init__.
    held = next((f.held for f in logging.getLogger(BNB_CPU_LOGGER).filters if getattr(f, "held", None)), None)
    if held and not _kernel_note_said:
        _kernel_note_said = True
        log.warning("note: packed 4-bit layers on this CPU run bitsandbytes' own bf16 kernel; bitsandbytes said: %s",
                    held)


def is_packed(layer: Any) -> bool:
    state = getattr(layer.weight, "quant_state", None)
    return bool(getattr(state, "packing_format_for_cpu", False))


def _unpack(layer: Any) -> None:
    if is_packed(layer):
        # bitsandbytes is imported only where 4-bit layers exist (it is optional on some platforms).
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        layer.weight.data, layer.weight.quant_state = _convert_weight_packed_for_cpu_inverse(
            layer.weight.data, layer.weight.quant_state)
