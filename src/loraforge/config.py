"""Typed run configuration: closed schemas, validated before anything heavy is loaded.

A config file is data: YAML with the sections `model`, `lora`, `data`, `training`, `eval`. Every field
can be overridden on the command line as `section.key=value` (the value is parsed as YAML, so
`training.learning_rate=1e-4`, `lora.target_modules=[q_proj,k_proj]` and `data.packing=true` all work).
Unknown keys, wrong types and out-of-range values are refused with a message that names the key, the
value and what is allowed, plus a close match for a misspelt key.

The names and defaults of `ModelConfig`, `LoRAConfig`, `DataConfig`, `TrainingConfig` and `EvalConfig`
follow the names peft and transformers users know; fields beyond them have defaults that keep the specified behaviour.
"""

from __future__ import annotations

import codecs
import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

from loraforge.errors import ConfigError

# ----------------------------------------------------------------------------------------------------------
# Field helper: every field carries a one-line help text and its allowed range, used by the validator,
# by `loraforge train --help-config` and by the error messages.


def opt(default: Any, help: str, *, ge: float | None = None, gt: float | None = None,
        le: float | None = None, lt: float | None = None) -> Any:
    meta = {"help": help, "ge": ge, "gt": gt, "le": le, "lt": lt}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


# Seeds reach numpy and torch generators, which take 0..2**32-1 (numpy) and 64-bit ints (torch).
SEED_MAX = 2**32 - 1
# Every integer setting ends up in a torch or numpy int64 somewhere; a larger one would overflow there.
INT_MAX = 2**63 - 1


class _Section:
    """Validates on construction, so `ModelConfig(use_4bit="yes")` fails as clearly as a bad YAML file."""

    def __post_init__(self) -> None:
        validate(self, type(self).__name__)


LORA_TARGET_PRESETS: dict[str, list[str]] = {
    "qv": ["q_proj", "v_proj"],
    "attention": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "all-linear": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}


@dataclass
class ModelConfig(_Section):
    """Which model to load and how to quantize it."""

    model_name: str = opt("smollm2-135m-instruct",
                          "Hugging Face id, local folder, .gguf file, or the embedded 'smollm2-135m-instruct'.")
    use_4bit: bool = opt(True, "Load the frozen base in 4-bit through bitsandbytes (QLoRA).")
    use_8bit: bool = opt(False, "Load the frozen base in 8-bit through bitsandbytes (exclusive with use_4bit).")
    bnb_4bit_compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = opt(
        "auto", "Dtype of the 4-bit matmuls; auto = bf16 on a GPU that has it, fp16 on other GPUs, fp32 on CPU.")
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = opt("nf4", "4-bit data type: NormalFloat4 or FP4.")
    use_nested_quant: bool = opt(True, "Double ('nested') quantization of the 4-bit scales (saves ~0.4 bit/param).")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = opt(
        "auto", "Dtype of unquantized weights; auto = bf16 on a GPU that has it, fp16 on other GPUs, fp32 on CPU.")
    cache_dir: str | None = opt(None, "Where hub downloads and materialized GGUF models are cached.")
    revision: str | None = opt(None, "Hub revision (branch, tag or commit) to load.")
    trust_remote_code: bool = opt(False, "Allow model code from the hub to run. Off unless you trust the repo.")
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = opt(
        "sdpa", "Attention kernel.")
    device: Literal["auto", "cpu", "cuda"] = opt("auto", "Where to train: auto = the GPU if there is one.")
    fast_kernels: bool = opt(True, "Use loraforge's fused GPU kernels where the hardware supports them.")
    cuda_graphs: bool = opt(True, "With the fast kernels: replay each checkpointed layer as CUDA graphs once a batch "
                                  "shape repeats (packing gives one shape). Off: every kernel launched from Python.")


@dataclass
class LoRAConfig(_Section):
    """The low-rank adapter: where it goes and how it is shaped."""

    r: int = opt(8, "LoRA rank.", ge=1, le=4096)
    lora_alpha: int = opt(16, "Scaling numerator: the update is scaled by alpha / r (alpha / sqrt(r) with rsLoRA).",
                          ge=1, le=65536)
    target_modules: list[str] | str = opt(
        "qv", "Modules to adapt: a list of names, or a preset: qv, attention, all-linear.")
    lora_dropout: float = opt(0.05, "Dropout on the adapter's input.", ge=0.0, lt=1.0)
    bias: Literal["none", "all", "lora_only"] = opt("none", "Which biases to train.")
    task_type: Literal["CAUSAL_LM"] = opt("CAUSAL_LM", "PEFT task type.")
    modules_to_save: list[str] | None = opt(None, "Extra modules trained in full and saved (e.g. [lm_head]).")
    use_rslora: bool = opt(False, "Rank-stabilized LoRA: scale by alpha / sqrt(r).")
    use_dora: bool = opt(False, "Weight-decomposed LoRA (DoRA).")
    loraplus_lr_ratio: float | None = opt(None, "LoRA+: learning rate of B = ratio x that of A (16 is typical).",
                                          gt=0.0)
    init_lora_weights: Literal["default", "gaussian", "pissa", "loftq"] = opt(
        "default", "Adapter initialisation (PiSSA and LoftQ start from the base's singular vectors).")

    def resolved_targets(self) -> list[str]:
        if isinstance(self.target_modules, str):
            return list(LORA_TARGET_PRESETS[self.target_modules])
        return list(self.target_modules)


@dataclass
class SourceConfig(_Section):
    """One data source in combined mode."""

    path: str = opt("chitchat", "File, folder, Hugging Face dataset id, or 'chitchat'.")
    format: Literal["auto", "alpaca", "dialogue", "chat", "oasst", "text"] = opt("auto", "Record layout.")
    weight: float = opt(1.0, "Relative share of this source in the mix (ignored by balanced sampling).", gt=0.0)
    column_mapping: dict[str, str] | None = opt(None, "Rename columns: {their_name: our_name}.")
    split: str = opt("train", "Split to read from a dataset id or folder.")
    max_samples: int | None = opt(None, "Use at most this many records from the source.", ge=1)


@dataclass
class DataConfig(_Section):
    """Where the examples come from and how they become tokens."""

    dataset: str = opt("chitchat", "File (json/jsonl/csv/parquet/txt), folder, dataset id, or 'chitchat'.")
    format: Literal["auto", "alpaca", "dialogue", "chat", "oasst", "text"] = opt(
        "auto", "Record layout; auto detects it from the first record.")
    column_mapping: dict[str, str] | None = opt(None, "Rename columns: {their_name: our_name}.")
    sources: list[SourceConfig] = opt([], "Several sources mixed into one training set (combined mode).")
    mixing: Literal["weighted", "balanced"] = opt(
        "weighted", "Combined mode: 'weighted' by each source's weight; 'balanced' oversamples every source to "
        "the size of the largest, so each contributes equally per epoch.")
    split: str = opt("train", "Split to read from a dataset id or folder.")
    template: Literal["auto", "alpaca", "chat"] | str = opt(
        "auto", "Prompt template: auto (alpaca for instruction data, the model's chat template for chat), "
        "or a Jinja template string / .jinja file.")
    system_prompt: str | None = opt(None, "System message prepended to chat conversations.")
    max_length: int = opt(512, "Maximum tokens per example; longer ones are truncated.", ge=8)
    train_on_inputs: bool = opt(False, "Train on prompt tokens too (by default only responses carry labels).")
    validation_split: float = opt(0.05, "Share of records held out for validation.", ge=0.0, lt=1.0)
    validation_dataset: str | None = opt(None, "A separate validation file/dataset instead of a split.")
    max_samples: int | None = opt(None, "Use at most this many training records.", ge=1)
    max_eval_samples: int | None = opt(None, "Use at most this many validation records.", ge=1)
    packing: bool = opt(False, "Pack several examples into one sequence (no attention across examples).")
    group_by_length: bool = opt(False, "Batch examples of similar length to waste less on padding.")
    streaming: bool = opt(False, "Stream the training data: records are read, tokenized (in the DataLoader's "
                          "workers) and packed as training goes, in the source's order, never held whole; needs "
                          "training.max_steps. Validation: the first max_eval_samples (else 256) held-out records. "
                          "See docs/data.md.")
    memory_map: bool = opt(False, "Tokenize once into an on-disk store read through memory maps (data larger than "
                           "memory, still shuffled by epoch); streaming=false only.")
    skip_invalid: bool = opt(False, "Skip malformed records (counted in the log) instead of stopping.")
    cache: bool = opt(True, "Reuse tokenized data from the cache ($LORAFORGE_CACHE or ~/.cache/loraforge/tokenized) "
                      "when data, tokenizer and settings are unchanged.")
    seed: int = opt(42, "Seed of the train/validation split and of shuffling.", ge=0, le=SEED_MAX)


@dataclass
class TrainingConfig(_Section):
    """The optimization and the run's bookkeeping."""

    output_dir: str = opt("runs/latest", "Run folder: config, logs, checkpoints, adapter, plots.")
    num_train_epochs: float = opt(3.0, "Epochs over the training set (ignored when max_steps > 0).", gt=0.0)
    max_steps: int = opt(-1, "Stop after this many optimizer steps; -1 = use epochs.", ge=-1)
    per_device_train_batch_size: int = opt(4, "Examples per micro-batch on each device.", ge=1)
    gradient_accumulation_steps: int = opt(4, "Micro-batches per optimizer step.", ge=1)
    learning_rate: float = opt(2e-4, "Peak learning rate.", gt=0.0, lt=1.0)
    weight_decay: float = opt(0.01, "Decoupled weight decay (not applied to biases and norms).", ge=0.0)
    warmup_ratio: float = opt(0.03, "Share of steps spent warming the learning rate up.", ge=0.0, lt=1.0)
    lr_scheduler_type: Literal["cosine", "linear", "constant"] = opt("cosine", "Learning-rate schedule after warmup.")
    max_grad_norm: float = opt(0.3, "Gradient clipping norm; 0 disables clipping.", ge=0.0)
    optim: Literal["paged_adamw_32bit", "paged_adamw_8bit", "adamw_torch"] = opt(
        "paged_adamw_32bit", "Optimizer (paged ones fall back to torch AdamW on the CPU).")
    mixed_precision: Literal["auto", "bf16", "fp16", "no"] = opt(
        "auto", "auto = bf16 where the GPU supports it, else fp16 on GPU, none on CPU.")
    gradient_checkpointing: bool = opt(True, "Recompute activations in backward to save memory.")
    long_context: bool = opt(False, "Long sequences: offload_activations + chunked_cross_entropy, and attention "
                             "without a materialized mask (batch 1 / unpadded runs SDPA's flash kernel).")
    offload_activations: bool | None = opt(None, "Keep the checkpointed layer inputs in pinned host memory "
                                           "(copied asynchronously; as fast at 4x512 on an H200); null = on "
                                           "for a run on one CUDA GPU and with long_context, off otherwise.")
    chunked_cross_entropy: bool | None = opt(None, "Loss through lm_head in chunks, never the full [tokens, vocab] "
                                             "logits (the GPU fast path always does); null = follow long_context.")
    logging_steps: int = opt(10, "Log every N optimizer steps.", ge=1)
    eval_steps: int = opt(0, "Evaluate every N steps; 0 = only at the end.", ge=0)
    save_steps: int = opt(0, "Checkpoint every N steps; 0 = only at the end.", ge=0)
    save_total_limit: int = opt(2, "Keep the last K checkpoints (plus the best).", ge=1)
    early_stopping_patience: int = opt(0, "Stop after N evaluations without improvement; 0 = never.", ge=0)
    max_nonfinite_steps: int = opt(5, "Stop (with a checkpoint) after this many non-finite losses in a row.", ge=1)
    seed: int = opt(42, "Seed for weights init, dropout and data order.", ge=0, le=SEED_MAX)
    resume_from_checkpoint: str | None = opt(None, "'latest' or a checkpoint folder to continue from.")
    overwrite_output_dir: bool = opt(False, "Start afresh in an output_dir that holds an earlier run, moving that "
                                     "run aside to <output_dir>.old-<time> (without this or resume_from_checkpoint "
                                     "such a folder is refused).")
    report_to: list[Literal["wandb", "tensorboard", "mlflow"]] = opt(
        [], "Experiment trackers beside the local JSONL log.")
    run_name: str | None = opt(None, "Name shown in trackers.")
    dataloader_num_workers: int = opt(0, "Processes that read and collate the training and evaluation batches; "
                                      "0 = the training process does it.", ge=0)
    objective: Literal["sft", "dpo", "orpo"] = opt(
        "sft", "sft = next-token loss on the responses; dpo / orpo = preference pairs (prompt, chosen, rejected), "
        "see docs/preference.md.")
    beta: float = opt(0.1, "DPO: strength of the pull to the reference (the base with the adapter off); larger = "
                      "stays closer to it.", gt=0.0)
    label_smoothing: float = opt(0.0, "DPO: assumed share of pairs whose labels are flipped (conservative DPO); 0 = "
                                 "plain DPO.", ge=0.0, lt=0.5)
    orpo_lambda: float = opt(0.1, "ORPO: weight of the odds-ratio term beside the chosen answers' NLL.", ge=0.0)
    distributed_strategy: Literal["auto", "ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3"] = opt(
        "auto", "Several processes: auto = what `accelerate launch --config_file` set, else DDP; fsdp = full "
        "shard (QLoRA-compatible); deepspeed_zero2/3 through Accelerate's DeepSpeed plugin.")

    def long_context_switches(self, *, one_gpu: bool = False) -> dict[str, bool]:
        """The long-context switches as the run resolves them: each individual one, if set, wins over
        `long_context`. The one rule train/long_context.py applies and model/memory.py predicts from.
        `one_gpu`: the run trains on a single CUDA GPU, where offloading is on unless set off (it costs
        no speed there: bench/results/peers-2026-12-03-h200-s10-step.json)."""
        def pick(v: bool | None, default: bool = False) -> bool:
            return self.long_context or default if v is None else bool(v)

        return {"offload_activations": pick(self.offload_activations, one_gpu),
                "chunked_cross_entropy": pick(self.chunked_cross_entropy),
                "drop_full_attention_mask": self.long_context}


@dataclass
class EvalConfig(_Section):
    """Evaluation and generation settings."""

    eval_batch_size: int = opt(8, "Batch size for perplexity and generation.", ge=1)
    max_new_tokens: int = opt(256, "Maximum tokens to generate.", ge=1)
    decoding: Literal["beam", "greedy", "sample"] = opt("beam", "Beam search, greedy, or sampling.")
    num_beams: int = opt(4, "Beam width for beam search.", ge=1)
    temperature: float = opt(0.7, "Sampling temperature (sampling only).", gt=0.0)
    top_p: float = opt(0.9, "Nucleus sampling mass (sampling only).", gt=0.0, le=1.0)
    num_generation_samples: int = opt(8, "Held-out prompts generated and scored with BLEU/ROUGE.", ge=0)
    repetition_penalty: float = opt(1.0, "Penalty on repeated tokens (1 = none).", gt=0.0)


@dataclass
class RunConfig:
    """Everything a run needs; the YAML file's top level."""

    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


SECTIONS: dict[str, type] = {"model": ModelConfig, "lora": LoRAConfig, "data": DataConfig,
                             "training": TrainingConfig, "eval": EvalConfig}


# ----------------------------------------------------------------------------------------------------------
# Validation: turn raw YAML values into typed dataclasses, or say precisely what is wrong.


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_describe(typing.get_args(tp)[0])}"
    if origin is dict:
        return "a mapping"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return f"a mapping of {tp.__name__} fields"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


class _Mismatch(Exception):
    pass


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Return `value` as type `tp`, or raise _Mismatch."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise _Mismatch
    if origin in (typing.Union, types.UnionType):
        # Literal members first so that "qv" matches the preset before the free string.
        for arg in sorted(typing.get_args(tp), key=lambda a: typing.get_origin(a) is not Literal):
            try:
                return _coerce(value, arg, where)
            except (_Mismatch, ConfigError):
                continue
        raise _Mismatch
    if tp is type(None):
        if value is None:
            return None
        raise _Mismatch
    if origin is list:
        if not isinstance(value, list):
            raise _Mismatch
        (item,) = typing.get_args(tp)
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise _Mismatch
        _, vt = typing.get_args(tp)
        return {str(k): _coerce(v, vt, f"{where}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise _Mismatch
        return build(tp, value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise _Mismatch
    if tp is float:
        try:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
            if isinstance(value, str):  # PyYAML reads 1e-4 (no dot) as a string
                return float(value)
        except (ValueError, OverflowError):  # OverflowError: an integer beyond float's range
            raise _Mismatch from None
        raise _Mismatch
    if tp is str:
        if isinstance(value, str):
            return value
        raise _Mismatch
    raise _Mismatch


def _show(value: Any) -> str:
    """A value for an error message, cut short: it may be a 400-digit number or a whole pasted document."""
    if isinstance(value, int) and abs(value) >= 10**60:
        return f"{str(value)[:20]}... ({len(str(value))} digits)"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _check_range(value: Any, meta: typing.Mapping[str, Any], where: str) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{where} = {value!r} is not allowed: it must be a finite number.")
    bounds = [("ge", lambda v, b: v >= b, ">="), ("gt", lambda v, b: v > b, ">"),
              ("le", lambda v, b: v <= b, "<="), ("lt", lambda v, b: v < b, "<")]
    for key, ok, _sym in bounds:
        bound = meta.get(key)
        if bound is not None and not ok(value, bound):
            allowed = " and ".join(f"{s} {meta[k]}" for k, _, s in bounds if meta.get(k) is not None)
            raise ConfigError(f"{where} = {_show(value)} is out of range: it must be {allowed}.")
    if isinstance(value, int) and abs(value) > INT_MAX:
        raise ConfigError(f"{where} = {_show(value)} is out of range: an integer setting must be within ±(2**63-1).")


def validate(obj: Any, where: str) -> None:
    """Check every field of a dataclass instance (types, ranges, cross-field rules)."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        key = f"{where}.{f.name}" if where else f.name
        value = getattr(obj, f.name)
        try:
            setattr(obj, f.name, _coerce(value, hints[f.name], key))
        except _Mismatch:
            raise ConfigError(f"{key} = {_show(value)} is not allowed: expected {_describe(hints[f.name])}.") from None
        _check_range(getattr(obj, f.name), f.metadata, key)
    check = getattr(obj, "_cross_check", None)
    if check:
        check(where)


def build(cls: type, raw: dict[str, Any] | None, where: str) -> Any:
    """Build dataclass `cls` from a mapping, refusing unknown keys with a suggestion."""
    if raw is not None and not isinstance(raw, dict):  # e.g. `model: [1, 2]` or `lora: 8` in the YAML
        raise ConfigError(f"{where} must be a mapping of {cls.__name__} fields (key: value), "
                          f"not {type(raw).__name__} {str(raw)[:60]!r}.")
    raw = dict(raw or {})
    names = [f.name for f in dataclasses.fields(cls)]
    for key in raw:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.6)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"{where}.{key}: unknown key.{hint} Keys allowed in '{where}': {', '.join(names)}.")
    obj = cls.__new__(cls)
    for f in dataclasses.fields(cls):
        if f.name in raw:
            value = raw[f.name]
        elif f.default is not dataclasses.MISSING:
            value = f.default
        else:
            value = f.default_factory()  # type: ignore[misc]
        object.__setattr__(obj, f.name, value)
    validate(obj, where)
    return obj


# Cross-field rules, attached here to keep the dataclasses above readable as a table of settings.

def _model_cross(self: ModelConfig, where: str) -> None:
    if self.use_4bit and self.use_8bit:
        raise ConfigError(f"{where}.use_4bit and {where}.use_8bit are both true: choose one "
                          "(set model.use_8bit=false for QLoRA 4-bit, or model.use_4bit=false for 8-bit).")
    if self.model_name.lower().endswith((".safetensors", ".bin", ".pt", ".pth", ".ckpt")):
        raise ConfigError(f"{where}.model_name = {self.model_name!r} is a weights file, not a model: point it at the "
                          "folder holding config.json, the tokenizer and the weights (or at a .gguf file).")


def _training_cross(self: TrainingConfig, where: str) -> None:
    out = Path(self.output_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{where}.output_dir = {self.output_dir!r} is an existing file, not a folder: "
                          "choose a folder for the run (it is created if missing).")
    if self.overwrite_output_dir and self.resume_from_checkpoint:
        raise ConfigError(f"{where}.overwrite_output_dir and {where}.resume_from_checkpoint are both set: "
                          "choose one (--overwrite starts afresh, --resume continues the run in the folder).")


def _lora_cross(self: LoRAConfig, where: str) -> None:
    tm = self.target_modules
    if isinstance(tm, str) and tm not in LORA_TARGET_PRESETS:
        raise ConfigError(f"{where}.target_modules = {tm!r} is not a preset: use one of "
                          f"{', '.join(LORA_TARGET_PRESETS)} or a list of module names such as [q_proj, v_proj].")
    if isinstance(tm, list) and not tm:
        raise ConfigError(f"{where}.target_modules is empty: name at least one module, or a preset.")


ModelConfig._cross_check = _model_cross  # type: ignore[attr-defined]
LoRAConfig._cross_check = _lora_cross  # type: ignore[attr-defined]
TrainingConfig._cross_check = _training_cross  # type: ignore[attr-defined]


# ----------------------------------------------------------------------------------------------------------
# Loading from YAML and command-line overrides.


# A config may come from someone else (a run folder's config.yaml is read by generate, eval and serve). YAML
# aliases are references that a reader expands: nine levels of nine aliases each ("billion laughs") made a
# 1 KiB file take 4.76 GB and 87 s to print in an error message. With at most 16 aliases the largest
# possible expansion is 3**4 * 2**2 = 324 copies of a value; real configs use a few anchors at most.
MAX_YAML_ALIASES = 16
MAX_CONFIG_BYTES = 1 << 20  # 1 MiB: a config is a page of settings; the shipped ones are under 4 KiB
_MERGE_TAG = "tag:yaml.org,2002:merge"


class _ConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader that also refuses duplicate keys (the last one silently won) and bounds aliases."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._aliases = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            self._aliases += 1
            if self._aliases > MAX_YAML_ALIASES:
                raise yaml.composer.ComposerError(
                    None, None, f"more than {MAX_YAML_ALIASES} aliases (*name); write the values out instead",
                    self.peek_event().start_mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        first: dict[Any, int] = {}
        for key_node, _ in node.value if isinstance(node, yaml.MappingNode) else []:
            if key_node.tag == _MERGE_TAG or not isinstance(key_node, yaml.ScalarNode):
                continue  # merged keys may be overridden; a non-scalar key fails in the base class
            key = self.construct_object(key_node)
            line = key_node.start_mark.line + 1
            if key in first:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first on line {first[key]}); keep one of them",
                    key_node.start_mark)
            first[key] = line
        return super().construct_mapping(node, deep)


def _parse_yaml(text: str) -> Any:
    loader = _ConfigLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def _read_yaml(p: Path) -> Any:
    """The YAML document in file `p`, or a ConfigError naming the file and, where known, the line."""
    if p.stat().st_size > MAX_CONFIG_BYTES:
        raise ConfigError(f"{p}: {p.stat().st_size} bytes is too large for a config file "
                          f"(at most {MAX_CONFIG_BYTES}); is it really a config?")
    data = p.read_bytes()
    # Editors on Windows save UTF-16 with a byte-order mark; utf-8-sig reads UTF-8 with or without one.
    encoding = "utf-16" if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)) else "utf-8-sig"
    try:
        return _parse_yaml(data.decode(encoding))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}).") from None
    except RecursionError:
        raise ConfigError(f"{p}: the YAML is nested too deeply to be a config.") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{p}:{line}: not valid YAML ({getattr(e, 'problem', e)}).") from None


def parse_overrides(overrides: list[str]) -> dict[str, dict[str, Any]]:
    """`["training.learning_rate=1e-4", "lora.r=16"]` → nested dict, values parsed as YAML."""
    nested: dict[str, dict[str, Any]] = {}
    for item in overrides:
        item = item.removeprefix("--")
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value, e.g. training.learning_rate=1e-4.")
        key, _, text = item.partition("=")
        section, dot, name = key.partition(".")
        if not dot or not name:
            raise ConfigError(f"override {item!r}: name the section too, e.g. training.{key}={text} "
                              f"(sections: {', '.join(SECTIONS)}).")
        try:
            value = _parse_yaml(text) if text else ""
        except (yaml.YAMLError, RecursionError):
            value = text
        nested.setdefault(section, {})[name] = value
    return nested


def config_from_dict(raw: dict[str, Any] | None, source: str = "config") -> RunConfig:
    raw = raw or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping with sections {', '.join(SECTIONS)}.")
    for key in raw:
        if key not in SECTIONS:
            close = difflib.get_close_matches(str(key), list(SECTIONS), n=1, cutoff=0.6)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"{source}: unknown section '{key}'.{hint} Sections: {', '.join(SECTIONS)}.")
    try:
        parts = {name: build(cls, raw.get(name), name) for name, cls in SECTIONS.items()}
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    return RunConfig(**parts)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML config (or start from the defaults), apply `section.key=value` overrides, validate."""
    raw: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        p = _ready_made(Path(path))
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist. Ready-made configs are in configs/.")
        raw = _read_yaml(p) or {}
        source = str(p)
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping with sections {', '.join(SECTIONS)}.")
    for section, values in parse_overrides(overrides or []).items():
        if section in raw and not isinstance(raw[section], dict):
            raise ConfigError(f"{source}: section '{section}' must be a mapping.")
        raw.setdefault(section, {})
        if isinstance(raw[section], dict):
            raw[section].update(values)
    return config_from_dict(raw, source if not overrides else f"{source} (+ command-line overrides)")


def shipped_config(relative: str | Path) -> Path:
    """A ready-made config shipped inside the package (src/loraforge/configs/, the same files as the
    repository's configs/, a test keeps them equal), so a wheel install has them too."""
    return Path(str(resources.files("loraforge") / "configs")) / relative


def _ready_made(p: Path) -> Path:
    # `loraforge train configs/demo.yaml`, as the README says, also works outside a source checkout.
    if not p.exists() and not p.is_absolute() and p.parts[:1] == ("configs",):
        shipped = shipped_config(Path(*p.parts[1:]))
        return shipped if shipped.is_file() else p
    return p


def describe_fields() -> str:
    """A plain-text table of every setting, its default and its help; for `--help` output."""
    lines = []
    for name, cls in SECTIONS.items():
        lines.append(f"{name}:")
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            lines.append(f"  {name}.{f.name} = {default!r}\n      {f.metadata.get('help', '')}")
    return "\n".join(lines)
