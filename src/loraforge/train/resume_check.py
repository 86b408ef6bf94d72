"""Resuming with other settings: what may change between a run's checkpoint and its continuation.

A checkpoint holds an adapter shaped by the LoRA settings, optimizer state for those parameters, a schedule
and a position in a particular tokenized data order. Continuing it with another rank, model, quantization or
data would fail deep inside peft/torch or, worse, continue silently as a different run. So a resumed run's
settings are compared with the `config.yaml` the run wrote, before anything is loaded (and so before that
file is rewritten): settings that only say how long to go on, how often to log/evaluate/save, how to
evaluate, or how fast/memory-hungry the same computation is may change; any other difference is refused.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

from loraforge.config import RunConfig, load_config
from loraforge.errors import ConfigError
from loraforge.train import checkpoint as ckpt

# Settings a resumed run may change, grouped by why that is safe. Everything else must match the checkpoint.
MAY_CHANGE: dict[str, tuple[str, ...]] = {
    # The schedule is laid over the new length (its position is the step count, kept).
    "length": ("training.num_train_epochs", "training.max_steps"),
    "cadence": ("training.logging_steps", "training.eval_steps", "training.save_steps", "training.save_total_limit",
                "training.early_stopping_patience", "training.max_nonfinite_steps"),
    "tracking": ("training.report_to", "training.run_name"),
    # The same computation, faster or in less memory (numerics within rounding).
    "speed and memory": ("training.gradient_checkpointing", "training.dataloader_num_workers",
                         "training.long_context", "training.offload_activations", "training.chunked_cross_entropy",
                         "model.fast_kernels", "model.cuda_graphs", "model.attn_implementation"),
    "evaluation": tuple(f"eval.{f.name}" for f in dataclasses.fields(RunConfig().eval)),
    "folders and caches": ("training.output_dir", "model.cache_dir", "data.cache"),
}
_ALLOWED = frozenset(key for keys in MAY_CHANGE.values() for key in keys)


def config_changes(saved: RunConfig, new: RunConfig) -> dict[str, tuple[Any, Any]]:
    """`section.key -> (saved value, new value)` for every setting that differs."""
    changes = {}
    for section in ("model", "lora", "data", "training", "eval"):
        old_part, new_part = getattr(saved, section), getattr(new, section)
        for f in dataclasses.fields(old_part):
            before, after = getattr(old_part, f.name), getattr(new_part, f.name)
            if section == "lora" and f.name == "target_modules":  # "qv" and [q_proj, v_proj] are the same
                before, after = old_part.resolved_targets(), new_part.resolved_targets()
            if dataclasses.is_dataclass(before) or isinstance(before, list):
                before, after = _plain(before), _plain(after)
            if before != after:
                changes[f"{section}.{f.name}"] = (getattr(old_part, f.name), getattr(new_part, f.name))
    return changes


def _plain(value: Any) -> Any:
    return [_plain(v) for v in value] if isinstance(value, list) else \
        dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value


def saved_config_path(run_dir: Path, resume_from: str) -> Path | None:
    """The config.yaml of the run a resume continues, or None when there is no checkpoint to continue."""
    if resume_from == "latest":
        return run_dir / "config.yaml" if ckpt.list_checkpoints(run_dir / "checkpoints") else None
    own = Path(resume_from).parent.parent / "config.yaml"  # RUN/checkpoints/step-N -> RUN/config.yaml
    return own if own.is_file() else run_dir / "config.yaml"


def check_resume_config(config: RunConfig, run_dir: Path, log: Callable[[str], None]) -> None:
    """Refuse (ConfigError, exit 2) a resume whose settings differ from the run's saved config.yaml in what the
    checkpoint depends on; log the differences that are allowed. Does nothing when not resuming a checkpoint."""
    resume_from = config.training.resume_from_checkpoint
    saved_path = saved_config_path(run_dir, resume_from) if resume_from else None
    if saved_path is None:
        return
    if not saved_path.is_file():
        log(f"resume: no {saved_path} to compare this run's settings with; continuing with the ones given")
        return
    try:
        saved = load_config(saved_path)
    except ConfigError as e:
        raise ConfigError(f"resume: cannot read the settings the run was trained with ({e}). Fix or restore "
                          f"{saved_path}, or start afresh with --overwrite.") from None
    changes = config_changes(saved, config)
    for key in ("training.resume_from_checkpoint", "training.overwrite_output_dir"):  # what to do, not the run
        changes.pop(key, None)
    refused = {k: v for k, v in changes.items() if k not in _ALLOWED}
    if refused:
        raise ConfigError(
            f"resume: these settings differ from the run's {saved_path} and cannot change when resuming (the "
            f"checkpoint's adapter, optimizer state and data position depend on them): {_show(refused)}. "
            f"Resume with the saved values, or start a new run (--output-dir, or --overwrite to move this one "
            f"aside). May change on resume: {_allowed_summary()}. "
            f"{saved_path.name} was left unchanged.")
    if changes:
        log(f"resume: continuing with changed settings: {_show(changes)}")


def _allowed_summary() -> str:
    eval_keys = MAY_CHANGE["evaluation"]
    return "; ".join(f"{why}: {'eval.*' if keys == eval_keys else ', '.join(keys)}" for why, keys in MAY_CHANGE.items())


def _show(changes: dict[str, tuple[Any, Any]]) -> str:
    return "; ".join(f"{key} {before!r} -> {after!r}" for key, (before, after) in changes.items())
