"""What a person watching a run sees: a progress bar with loss, lr, speed and ETA (rich), and a log
line per logged step when the output is not a terminal (CI, a log file)."""

from __future__ import annotations

import sys
import time
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class TrainProgress:
    def __init__(self, total_steps: int, enabled: bool = True):
        self.total = total_steps
        self.enabled = enabled
        self.console = Console(file=sys.stderr)
        self.live = enabled and self.console.is_terminal
        self.progress: Progress | None = None
        self.task: Any = None
        self.tokens_per_s = 0.0
        self._t_last = time.perf_counter()

    def start(self, step: int) -> None:
        if not self.live:
            return
        self.progress = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss [cyan]{task.fields[loss]}"), TextColumn("lr {task.fields[lr]}"),
            TextColumn("{task.fields[speed]} tok/s"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
            console=self.console, transient=False)
        self.task = self.progress.add_task("train", total=self.total, completed=step, loss="-", lr="-", speed="-")
        self.progress.start()

    def update(self, step: int, loss: float | None, lr: float) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=step, loss=f"{loss:.4f}" if loss is not None else "nan",
                                 lr=f"{lr:.2e}", speed=f"{self.tokens_per_s:,.0f}")

    def log_line(self, record: dict[str, Any]) -> None:
        if "tokens_per_s" in record:
            self.tokens_per_s = record["tokens_per_s"]
        if not self.enabled:
            return
        text = "  ".join(f"{k}={_fmt(v)}" for k, v in record.items() if v is not None)
        if self.progress is not None:
            self.progress.console.print(f"[dim]{text}")
        else:
            print(text, file=sys.stderr, flush=True)

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:,.0f}"
    return str(v)
