"""Hyperparameter search: Optuna (TPE sampler, median pruner) over a declared space.

Each trial is a short run of the same `LLAMATrainer` loop in its own folder, judged on validation loss.
The loop reports every evaluation through its `on_eval` argument; a trial whose intermediate eval loss
is worse than the median of earlier trials at the same step is pruned. Writes to the sweep folder:
study.db (the Optuna study, SQLite), trials.csv and trials.json (every trial: params, value, state),
best.yaml (the full config of the best trial, ready for `loraforge train best.yaml`), and prints a
summary table.

The study lives in study.db, so a sweep stopped part way (Ctrl-C, a lost machine) continues when the same
command runs again: `--trials` is the study's total, and only the missing trials run (a trial that was
running when the sweep died is marked failed). The folder remembers what it sweeps (base config,
overrides, space); another sweep is refused it rather than mixed in. Only the best trial's folder is
kept: each finished trial deletes the others (a 3-trial sweep of a 1B model left 303 MB of folders).

A space file maps `section.key` to a distribution:

    training.learning_rate: {low: 1.0e-5, high: 1.0e-3, log: true}
    lora.r: {choices: [4, 8, 16, 32]}
    lora.lora_dropout: {low: 0.0, high: 0.2}
    training.per_device_train_batch_size: {choices: [2, 4]}
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import shutil
from pathlib import Path
from typing import Any

import yaml

from loraforge.config import load_config
from loraforge.errors import ConfigError

DEFAULT_SPACE: dict[str, dict[str, Any]] = {
    "training.learning_rate": {"low": 1e-5, "high": 1e-3, "log": True},
    "lora.r": {"choices": [4, 8, 16, 32]},
    "lora.lora_alpha": {"choices": [8, 16, 32, 64]},
    "lora.lora_dropout": {"low": 0.0, "high": 0.2},
    # batch x accumulation pairs keep the choice of effective batch explicit
    "training.batch_x_accum": {"choices": ["4x4", "8x2", "2x8"]},
}


def load_space(path: Path | None) -> dict[str, dict[str, Any]]:
    if path is None:
        return DEFAULT_SPACE
    try:
        space = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"--space {path}: cannot read it ({e}).") from e
    if not isinstance(space, dict) or not space:
        raise ConfigError(f"--space {path}: expected a mapping of section.key to a distribution.")
    for key, dist in space.items():
        if not isinstance(dist, dict) or not ("choices" in dist or {"low", "high"} <= dist.keys()):
            raise ConfigError(f"--space {path}: {key} must be {{choices: [...]}} or {{low: .., high: .., log: ..}}.")
    return space


def suggest(trial: Any, space: dict[str, dict[str, Any]]) -> list[str]:
    """Draw one point of the space; return it as `section.key=value` overrides."""
    params = {}
    for key, dist in space.items():
        if "choices" in dist:
            params[key] = trial.suggest_categorical(key, dist["choices"])
        elif all(isinstance(dist[k], int) and not isinstance(dist[k], bool) for k in ("low", "high")):
            params[key] = trial.suggest_int(key, dist["low"], dist["high"], log=bool(dist.get("log")))
        else:
            params[key] = trial.suggest_float(key, float(dist["low"]), float(dist["high"]), log=bool(dist.get("log")))
    return as_overrides(params)


def as_overrides(params: dict[str, Any]) -> list[str]:
    """A point of the space (a trial's params) as `section.key=value` overrides."""
    overrides = []
    for key, value in params.items():
        if key == "training.batch_x_accum":
            batch, accum = str(value).split("x")
            overrides += [f"training.per_device_train_batch_size={batch}",
                          f"training.gradient_accumulation_steps={accum}"]
        else:
            overrides.append(f"{key}={value}")
    return overrides


def run_sweep(config: Path | None, overrides: list[str], *, trials: int = 10, space: Path | None = None,
              out: Path = Path("runs/sweep"), seed: int = 0, log=None) -> dict[str, Any]:
    """Run `trials` Optuna trials; return {"best_value", "best_params", "best_config", "trials"}."""
    try:
        import optuna
    except ImportError as e:
        raise ConfigError("loraforge sweep needs Optuna: pip install 'loraforge[sweep]'") from e
    from loraforge.train.trainer import LLAMATrainer

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dist = load_space(space)
    base = load_config(config, overrides)  # fail on a bad base config before any trial starts
    if not base.data.validation_split and not base.data.validation_dataset:
        raise ConfigError("loraforge sweep judges trials on validation loss: set data.validation_split > 0 "
                          "or data.validation_dataset.")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = _open_study(optuna, out, _fingerprint(config, overrides, dist), seed)
    todo = max(0, trials - sum(t.state.is_finished() for t in study.trials))
    # Pruning needs intermediate evaluations: without eval_steps, evaluate four times per trial.
    # A trial folder is the sweep's own: a trial of an earlier sweep in it is moved aside, never mixed in.
    fixed = [*overrides, "training.resume_from_checkpoint=null", "training.overwrite_output_dir=true",
             "eval.num_generation_samples=0"]
    if base.training.eval_steps == 0 and base.training.max_steps >= 4:
        fixed.append(f"training.eval_steps={base.training.max_steps // 4}")

    def objective(trial: optuna.Trial) -> float:
        trial_dir = out / f"trial-{trial.number:03d}"
        cfg = load_config(config, [*fixed, *suggest(trial, dist), f"training.output_dir={trial_dir}"])

        def on_eval(step: int, metrics: dict[str, float]) -> None:
            trial.report(metrics["eval_loss"], step)
            if trial.should_prune():
                raise optuna.TrialPruned(f"eval_loss {metrics['eval_loss']:.4f} at step {step}")

        result = LLAMATrainer.from_config(cfg, log=log).train(on_eval=on_eval)
        if result.eval_loss is None or not math.isfinite(result.eval_loss):
            raise optuna.TrialPruned("no finite validation loss")
        return result.eval_loss

    study.optimize(objective, n_trials=todo, catch=(), callbacks=[_keep_best_folder(optuna, out)])
    rows = [{"number": t.number, "state": t.state.name, "eval_loss": t.value, **t.params,
             "duration_s": round(t.duration.total_seconds(), 1) if t.duration else None} for t in study.trials]
    (out / "trials.json").write_text(json.dumps(rows, indent=1))
    with (out / "trials.csv").open("w", newline="") as f:
        keys = list(dict.fromkeys(k for r in rows for k in r))
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not done:
        raise ConfigError(f"no trial completed (see {out}/trials.csv); widen the space or run more steps.")
    best = study.best_trial
    best_cfg = load_config(config, [*overrides, *as_overrides(best.params), f"training.output_dir={out / 'best-run'}",
                                    "training.overwrite_output_dir=false"])
    best_cfg.save(out / "best.yaml")
    _print_table(rows, best.number, out)
    return {"best_value": best.value, "best_params": best.params, "best_config": out / "best.yaml", "trials": rows}


def _fingerprint(config: Path | None, overrides: list[str], space: dict[str, dict[str, Any]]) -> str:
    """What makes two sweeps the same: the base config's text, the overrides and the space."""
    text = Path(config).read_text(encoding="utf-8") if config is not None else ""
    blob = json.dumps([text, overrides, space], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _open_study(optuna: Any, out: Path, fingerprint: str, seed: int) -> Any:
    """The sweep folder's study (study.db), created or continued; another sweep's study is refused."""
    db = out / "study.db"
    storage = optuna.storages.RDBStorage(f"sqlite:///{db.resolve()}")
    study = optuna.create_study(study_name="sweep", storage=storage, load_if_exists=True,
                                direction="minimize", sampler=optuna.samplers.TPESampler(seed=seed),
                                pruner=optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0))
    known = study.user_attrs.get("fingerprint")
    if known is None:
        study.set_user_attr("fingerprint", fingerprint)
    elif known != fingerprint:
        raise ConfigError(f"{out} holds the study of another sweep (its base config, overrides or space differ): "
                          "give this sweep its own --out, or delete that folder to start over.")
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        # one sweep per folder at a time: a trial still "running" is one whose process died
        storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL)  # FrozenTrial's storage id
    if len(study.trials) > 0:
        # a continued TPE sampler restarts its random stream; offset it so that it does not redraw old points
        study.sampler = optuna.samplers.TPESampler(seed=seed + len(study.trials))
    return study


def _keep_best_folder(optuna: Any, out: Path) -> Any:
    """An Optuna callback: after each trial, delete every trial folder but the best complete trial's."""
    def callback(study: Any, trial: Any) -> None:
        complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
        keep = f"trial-{min(complete, key=lambda t: t.value).number:03d}" if complete else None
        for folder in out.glob("trial-*"):
            if folder.is_dir() and folder.name != keep:
                shutil.rmtree(folder, ignore_errors=True)

    return callback


def _print_table(rows: list[dict[str, Any]], best: int, out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    params = [k for k in dict.fromkeys(k for r in rows for k in r) if k not in ("number", "state", "eval_loss",
                                                                                 "duration_s")]
    table = Table(title=f"sweep: {len(rows)} trials (best: #{best})")
    for col in ["#", "state", "eval_loss", *params, "s"]:
        table.add_column(col, justify="right")
    for r in sorted(rows, key=lambda r: (r["eval_loss"] is None, r["eval_loss"] or 0.0)):
        style = "bold green" if r["number"] == best else None
        table.add_row(str(r["number"]), r["state"].lower(), f"{r['eval_loss']:.4f}" if r["eval_loss"] else "-",
                      *[_fmt(r.get(p)) for p in params], str(r["duration_s"]), style=style)
    console = Console(stderr=True)
    console.print(table)
    console.print(f"best config: {out / 'best.yaml'}  (train it with: loraforge train {out / 'best.yaml'})")


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    return "-" if v is None else str(v)
