"""Where logged numbers go: always a local JSONL file; optionally TensorBoard, Weights & Biases, MLflow."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from loraforge.errors import ConfigError


class MetricsLog:
    """One JSON object per line, appended and flushed at once so a crash loses nothing already logged.

    On resume, lines from steps after the checkpoint being resumed are dropped first, so the file holds
    one consistent history.
    """

    def __init__(self, path: Path, resume_step: int | None = None):
        self.path = path
        if resume_step is not None and path.is_file():
            keep = [ln for ln in path.read_text(encoding="utf-8").splitlines()
                    if ln.strip() and json.loads(ln).get("step", 0) <= resume_step]
            path.write_text("".join(ln + "\n" for ln in keep))
        elif resume_step is None and path.exists():
            path.unlink()

    def write(self, record: dict[str, Any]) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        with self.path.open("a") as f:
            f.write(json.dumps(clean) + "\n")
            f.flush()


class Trackers:
    """Fan-out to the experiment trackers named in training.report_to."""

    def __init__(self, names: list[str], run_dir: Path, run_name: str, config: dict[str, Any]):
        self.tb = self.wandb = self.mlflow = None
        for name in names:
            try:
                if name == "tensorboard":
                    from torch.utils.tensorboard import SummaryWriter

                    self.tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
                elif name == "wandb":
                    import wandb

                    # Offline when asked (WANDB_MODE=offline) or when no API key is configured: the run is
                    # written to run_dir/wandb and can be uploaded later with `wandb sync`.
                    mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
                    self.wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", "loraforge"), name=run_name,
                                            dir=str(run_dir), config=config, mode=mode, reinit=True)
                elif name == "mlflow":
                    import mlflow

                    if not os.environ.get("MLFLOW_TRACKING_URI"):
                        # A file store in the run folder, readable by `mlflow ui --backend-store-uri`. mlflow
                        # 3.x refuses new file stores unless MLFLOW_ALLOW_FILE_STORE is set (it points users
                        # to a database); a local folder is what a run folder wants, so it is allowed here.
                        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
                        mlflow.set_tracking_uri((run_dir / "mlruns").resolve().as_uri())
                    mlflow.set_experiment("loraforge")
                    self.mlflow = mlflow.start_run(run_name=run_name)
                    mlflow.log_params(_flatten(config))
            except ImportError as e:
                raise ConfigError(f"training.report_to includes '{name}' but its package is not installed: "
                                  f"pip install {name if name != 'tensorboard' else 'tensorboard'}") from e

    def log(self, record: dict[str, Any], step: int) -> None:
        numbers = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"
                   and (not isinstance(v, float) or math.isfinite(v))}
        if self.tb:
            for k, v in numbers.items():
                self.tb.add_scalar(k, v, step)
            self.tb.flush()
        if self.wandb:
            self.wandb.log(numbers, step=step)
        if self.mlflow:
            import mlflow

            mlflow.log_metrics(numbers, step=step)

    def close(self) -> None:
        if self.tb:
            self.tb.close()
        if self.wandb:
            self.wandb.finish()
        if self.mlflow:
            import mlflow

            mlflow.end_run()


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = str(v)[:250]
    return out
