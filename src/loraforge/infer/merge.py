"""Merge an adapter into a 16-bit copy of its base and write a standard Hugging Face folder.

The base is always reloaded unquantized: merging LoRA deltas into NF4 weights would round them away
(and a run trained in 4-bit was trained against the dequantized weights anyway, so merging into the
16-bit original is what the adapter expects up to the 4-bit rounding of the base). The folder holds
safetensors, config.json, generation_config.json and the tokenizer with the chat template used in
training, so `AutoModelForCausalLM.from_pretrained(out)` and vLLM/TGI load it with no loraforge code,
under transformers 4.4x-4.5x as under 5.x (see `make_portable`). Unless told not to, the merged folder
is then checked against base + adapter (merge_check.py) before it is put in place.
"""

from __future__ import annotations

import gc
import json
import shutil
import tempfile
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from loraforge.errors import ConfigError, ModelLoadError
from loraforge.infer.merge_check import TOLERANCE, ParityResult, answers, compare
from loraforge.progress import track

DTYPES = ("bfloat16", "float16", "float32")
QUANTS = ("q8_0", "q4_k_m")  # q8_0: written by loraforge; q4_k_m: by llama.cpp's llama-quantize


@dataclass
class MergeResult:
    path: Path
    gguf_file: Path | None
    parity: ParityResult | None  # None with check=False


def make_portable(folder: Path) -> None:
    """Make a folder saved by transformers 5.x read the same under 4.4x-4.5x (and still under 5.x).

    - 5.x writes the RoPE base only inside `rope_parameters`; 4.x does not know that key and would
      silently use its default base (10000). A top-level `rope_theta` (and `rope_scaling` for scaled
      RoPE) is what 4.x reads, and 5.x reads it the same way.
    - `torch_dtype` beside `dtype` (4.5x before 4.56 know only the former).
    - The tokenizer class `TokenizersBackend` exists only in 5.x; `PreTrainedTokenizerFast` is the
      plain tokenizer.json tokenizer in 4.x and an alias of TokenizersBackend in 5.x (a model-specific
      class such as GPT2Tokenizer would make 5.x rebuild the pre-tokenizer its own way).
    - The chat template also goes into tokenizer_config.json: 4.4x do not read chat_template.jinja.
    """
    config_file = folder / "config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    rope = config.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" in rope:
        config.setdefault("rope_theta", rope["rope_theta"])
        scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
        if scaling.get("rope_type", scaling.get("type", "default")) != "default":
            config.setdefault("rope_scaling", scaling)
    if "dtype" in config:
        config.setdefault("torch_dtype", config["dtype"])
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")

    tok_file = folder / "tokenizer_config.json"
    if not tok_file.is_file():
        return
    tok = json.loads(tok_file.read_text(encoding="utf-8"))
    if tok.get("tokenizer_class") == "TokenizersBackend":
        tok["tokenizer_class"] = "PreTrainedTokenizerFast"
    template = folder / "chat_template.jinja"
    if template.is_file() and "chat_template" not in tok:
        tok["chat_template"] = template.read_text(encoding="utf-8")
    tok_file.write_text(json.dumps(tok, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _check_options(dtype: str, quant: str | None) -> None:
    if dtype not in DTYPES:
        raise ConfigError(f"merge --dtype must be one of {', '.join(DTYPES)}; got {dtype!r}.")
    if quant is not None and quant not in QUANTS:
        raise ConfigError(f"merge --quant must be one of {', '.join(QUANTS)}; got {quant!r}.")
    if quant == "q4_k_m":
        from loraforge.infer.gguf_export import llama_quantize_binary  # imports gguf: only when asked for

        if llama_quantize_binary() is None:
            raise ConfigError("merge --quant q4_k_m needs llama.cpp's quantizer: the k-quants are not in the gguf "
                              "package, and llama-quantize is not on PATH. Build llama.cpp (or install a package "
                              "that ships llama-quantize), or use --quant q8_0, which loraforge writes itself.")


def _write_gguf(folder: Path, tokenizer: Any, name: str, dtype: str, quant: str | None) -> Path:
    """The GGUF file of the merged folder: f16 (f32 for float32), q8_0, or q4_k_m via llama-quantize."""
    from loraforge.infer.gguf_export import quantize_gguf, write_gguf  # gguf and safetensors: only for GGUF

    plain = "f32" if dtype == "float32" else "f16"
    if quant in (None, "q8_0"):
        return write_gguf(folder, folder / f"model-{quant or plain}.gguf", name=name, outtype=quant or plain,
                          tokenizer=tokenizer)
    unquantized = write_gguf(folder, folder / f".model-{plain}.gguf", name=name, outtype=plain, tokenizer=tokenizer)
    try:
        return quantize_gguf(unquantized, folder / f"model-{quant}.gguf", quant)
    finally:
        unquantized.unlink(missing_ok=True)


def merge_layers(model: Any) -> Any:
    """peft's `merge_and_unload` (W + B·A·(alpha/r), in the base's dtype, LoRA layers removed), one LoRA layer
    at a time under a progress bar: each layer merges itself first, and `merge_and_unload` then finds them
    merged (peft says so in a warning per layer, silenced here) and does the rest as it always does: swap each
    LoRA layer for its base layer, drop the peft config, keep tied embeddings tied."""
    from peft.tuners.tuners_utils import BaseTunerLayer, onload_layer  # peft: only when merging

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    for layer in track(layers, "merging the adapter"):
        with onload_layer(layer):  # a layer accelerate offloaded to CPU or disk is brought back to merge
            layer.merge()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="All adapters are already merged")
        return model.merge_and_unload()


def merge_adapter(run: str | Path, out: str | Path, *, dtype: str = "bfloat16", gguf: bool = False,
                  quant: str | None = None, check: bool = True, device: str = "auto",
                  trust_remote_code: bool = False) -> MergeResult:
    """Merge the adapter of `run` (run or adapter folder) into its base; write the model to `out`.

    dtype: "bfloat16" or "float16" for deployment; "float32" is allowed (tests compare exactly in it).
    gguf: also write `out/model-<type>.gguf` for llama.cpp: f16 (f32 when dtype is float32), or `quant`.
    quant: "q8_0" or "q4_k_m" (implies gguf); q4_k_m needs llama.cpp's llama-quantize on PATH.
    check: compare the written folder with base + adapter (merge_check.py); a failed check writes nothing.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from loraforge.infer.load import load, locate

    _check_options(dtype, quant)
    out = Path(out).expanduser()
    if out.exists() and any(out.iterdir()):
        raise ModelLoadError(f"{out} exists and is not empty; choose a new folder for the merged model.")
    run_cfg, adapter_dir, _ = locate(run)
    if adapter_dir is None:
        raise ModelLoadError(f"{run} has no adapter to merge (it is a plain model folder).")
    # What llama.cpp shows as the model's name: the run folder's name (or the adapter folder's).
    name = (adapter_dir.resolve().parent if run_cfg is not None else adapter_dir.resolve()).name

    loaded = load(run, quantize="none", device=device, dtype=dtype, trust_remote_code=trust_remote_code)
    tokenizer = loaded.tokenizer
    reference = answers(loaded.model, tokenizer, loaded.formatter) if check else None
    model = merge_layers(loaded.model)
    loaded.model = None
    placed_on = next(model.parameters()).device
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
        make_portable(tmp)
        del model  # before the check loads the folder: never two merged copies in memory
        gc.collect()
        parity = None
        if reference is not None:
            merged = AutoModelForCausalLM.from_pretrained(tmp, dtype=getattr(torch, dtype),
                                                          device_map={"": placed_on}).eval()
            parity = compare(merged, tokenizer, reference, TOLERANCE[dtype])
            del merged
            if not parity.ok:
                raise ModelLoadError(f"the merged model does not answer like base + adapter, so nothing was written "
                                     f"to {out}: {parity.line()}. `merge --no-check` writes it anyway.")
        gguf_file = _write_gguf(tmp, tokenizer, name, dtype, quant) if gguf or quant else None
        (tmp / "loraforge_merge.json").write_text(json.dumps({
            "source": str(Path(run).resolve()), "adapter": str(adapter_dir.resolve()), "dtype": dtype,
            "data_kind": loaded.data_kind, "gguf": gguf_file.name if gguf_file else None,
            "base_model": loaded.run.model.model_name if loaded.run is not None else None,
            "parity": asdict(parity) if parity else None}, indent=1))
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return MergeResult(out, out / gguf_file.name if gguf_file else None, parity)
