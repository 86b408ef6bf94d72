"""Merge an adapter into a 16-bit copy of its base and write a standard Hugging Face folder.

The base is always reloaded unquantized: merging LoRA deltas into NF4 weights would round them away
(and a run trained in 4-bit was trained against the dequantized weights anyway, so merging into the
16-bit original is what the adapter expects up to the 4-bit rounding of the base). The folder holds
safetensors, config.json, generation_config.json and the tokenizer with the chat template used in
training, so `AutoModelForCausalLM.from_pretrained(out)` and vLLM/TGI load it with no loraforge code.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from loraforge.errors import ConfigError, ModelLoadError

DTYPES = ("bfloat16", "float16", "float32")


def merge_adapter(run: str | Path, out: str | Path, *, dtype: str = "bfloat16", gguf: bool = False,
                  device: str = "auto") -> Path:
    """Merge the adapter of `run` (run or adapter folder) into its base; write the model to `out`.

    dtype: "bfloat16" or "float16" for deployment; "float32" is allowed (tests compare exactly in it).
    gguf: also write `out/model-<dtype>.gguf` (f16, or f32 when dtype is float32) for llama.cpp.
    """
    from loraforge.infer.load import load, locate

    if dtype not in DTYPES:
        raise ConfigError(f"merge --dtype must be one of {', '.join(DTYPES)}; got {dtype!r}.")
    out = Path(out).expanduser()
    if out.exists() and any(out.iterdir()):
        raise ModelLoadError(f"{out} exists and is not empty; choose a new folder for the merged model.")
    _, adapter_dir, _ = locate(run)
    if adapter_dir is None:
        raise ModelLoadError(f"{run} has no adapter to merge (it is a plain model folder).")

    loaded = load(run, quantize="none", device=device, dtype=dtype)
    model = loaded.model.merge_and_unload()  # W + B·A·(alpha/r), in the base's dtype, LoRA layers removed
    tokenizer = loaded.tokenizer
    # The generation config should stop where training taught the model to stop and pad with our pad.
    gen = model.generation_config
    gen.pad_token_id = tokenizer.pad_token_id
    if gen.eos_token_id is None:
        gen.eos_token_id = tokenizer.eos_token_id
    model.config.pad_token_id = tokenizer.pad_token_id

    out.parent.mkdir(parents=True, exist_ok=True)
    # Written into a temporary sibling and renamed at the end, so a crash never leaves a half model
    # that stock loaders would try to read.
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the model folder is meant to be shared
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.padding_side = "left"  # what a serving stack wants for batched generation
        tokenizer.save_pretrained(tmp)
        (tmp / "loraforge_merge.json").write_text(json.dumps({
            "source": str(Path(run).resolve()), "adapter": str(adapter_dir.resolve()), "dtype": dtype,
            "data_kind": loaded.data_kind,
            "base_model": loaded.run.model.model_name if loaded.run is not None else None}, indent=1))
        if gguf:
            from loraforge.infer.gguf_export import write_gguf

            write_gguf(tmp, tmp / f"model-{'f32' if dtype == 'float32' else 'f16'}.gguf")
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
