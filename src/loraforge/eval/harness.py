"""`loraforge eval RUN --tasks ...`: EleutherAI's lm-evaluation-harness on the base model and the fine-tuned one.

Both go through lm-eval's own Hugging Face model class (`HFLM`): the base model folder as `pretrained`, and
for the fine-tuned model the same folder plus the run's adapter as `peft`, so the numbers are the ones
lm-eval users get for a peft adapter, not a re-implementation. Both use the adapter folder's tokenizer (the
one the run trained with, pad token fixed). The base is loaded unquantized in `dtype` (a QLoRA run's adapter
is evaluated on the full-precision base, as it is deployed after merging).

Tasks are lm-eval task names (`hellaswag`, `arc_easy`, ...) or tasks defined in YAML files under
`include_path` (a local task over a local JSONL needs no network). lm-eval is an optional extra:
`pip install 'loraforge[eval]'`.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from loraforge.errors import ConfigError, LoraforgeError, ModelLoadError

NUMERIC = (int, float)


def _lm_eval() -> tuple[Any, Any, Any]:
    """lm_eval's entry points; imported here because it is an optional extra and takes seconds to import."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise LoraforgeError("`loraforge eval --tasks` runs EleutherAI's lm-evaluation-harness, which is not "
                             f"installed ({e}). Install it with: pip install 'loraforge[eval]'") from e
    return lm_eval, HFLM, TaskManager


def locate_models(run_or_adapter: str | Path) -> tuple[str, Path]:
    """(base model folder or hub id, adapter folder) of a run folder or an adapter folder."""
    from loraforge.config import ModelConfig
    from loraforge.infer.load import locate
    from loraforge.model.load import resolve_model_path

    run, adapter_dir, _ = locate(run_or_adapter)
    if adapter_dir is None:
        raise ModelLoadError(f"{run_or_adapter}: no adapter here; `loraforge eval --tasks` compares a base model with "
                             "its fine-tuned adapter. Give a run folder (config.yaml + adapter/) or an adapter folder.")
    if run is not None:
        model_cfg = run.model
    else:
        try:
            name = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
            name = name.get("base_model_name_or_path") if isinstance(name, dict) else None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ModelLoadError(f"{adapter_dir / 'adapter_config.json'} is not valid JSON ({e}).") from None
        if not name:
            raise ModelLoadError(f"{adapter_dir / 'adapter_config.json'} names no base_model_name_or_path.")
        model_cfg = ModelConfig(model_name=name, use_4bit=False)
    return resolve_model_path(model_cfg), adapter_dir


def task_manager(tasks: Sequence[str], include_path: Path | None) -> Any:
    """lm-eval's TaskManager: local tasks only when they are all local (indexing lm-eval's thousands of
    bundled task files takes seconds), else local plus bundled; an unknown task name is refused here."""
    _, _, TaskManager = _lm_eval()
    if include_path is not None:
        if not include_path.exists():
            raise ConfigError(f"--include {include_path}: no such file or folder of lm-eval task YAML files.")
        local = TaskManager(include_path=str(include_path), include_defaults=False)
        if all(t in local.all_tasks for t in tasks):
            return local
    manager = TaskManager(include_path=str(include_path) if include_path else None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ConfigError(f"--tasks: lm-eval knows no task {unknown}" + (f" (nor is it defined under {include_path})"
                          if include_path else "") + ". `lm-eval ls tasks` lists them; a task of your own is a YAML "
                          "file in the folder given with --include.")
    return manager


def run_harness(run_or_adapter: str | Path, tasks: Sequence[str], *, include_path: Path | None = None,
                limit: int | float | None = None, num_fewshot: int | None = None, batch_size: int = 8,
                device: str = "auto", dtype: str = "auto", out_dir: Path | None = None,
                log: Callable[[str], None] = print, trust_remote_code: bool = False) -> dict[str, Any]:
    """Run lm-eval's `tasks` on the base and on base + adapter; write and return both models' metrics.

    Returns {"tasks", "base": {task: {metric: value}}, "fine_tuned": {...}, "meta"}; the same goes to
    OUT/lm_eval_results.json (OUT defaults to RUN/eval).
    """
    import torch

    if not tasks:
        raise ConfigError("--tasks: name at least one lm-eval task.")
    lm_eval, HFLM, _ = _lm_eval()
    base_path, adapter_dir = locate_models(run_or_adapter)
    manager = task_manager(tasks, include_path)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    results: dict[str, Any] = {"tasks": list(tasks)}
    for name, peft in (("base", None), ("fine_tuned", str(adapter_dir))):
        log(f"lm-eval {name}: {base_path}" + (f" + adapter {adapter_dir}" if peft else "") + f" on {device}")
        lm = HFLM(pretrained=base_path, peft=peft, tokenizer=str(adapter_dir), device=device, dtype=dtype,
                  batch_size=batch_size, trust_remote_code=trust_remote_code)
        out = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit,
                                      num_fewshot=num_fewshot, log_samples=False, bootstrap_iters=1000)
        results[name] = {task: {k: v for k, v in metrics.items() if isinstance(v, NUMERIC) and k != "alias"}
                         for task, metrics in out["results"].items()}
        del lm
    results["meta"] = {"base": base_path, "adapter": str(adapter_dir), "device": device, "limit": limit,
                       "num_fewshot": num_fewshot, "lm_eval": _version("lm_eval"),
                       "date": datetime.datetime.now().isoformat(timespec="seconds")}
    base = Path(run_or_adapter)
    out = out_dir or ((base if (base / "config.yaml").is_file() else base.parent) / "eval")
    out.mkdir(parents=True, exist_ok=True)
    (out / "lm_eval_results.json").write_text(json.dumps(results, indent=1, default=str))
    results["path"] = str(out / "lm_eval_results.json")
    return results


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "?"


def table(results: dict[str, Any]) -> list[tuple[str, str, float | None, float | None]]:
    """(task, metric, base, fine-tuned) rows for printing; standard errors are left to the JSON."""
    rows = []
    for task, metrics in results.get("fine_tuned", {}).items():
        for metric, value in metrics.items():
            if "stderr" not in metric:
                rows.append((task, metric, results.get("base", {}).get(task, {}).get(metric), value))
    return rows
