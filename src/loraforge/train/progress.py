"""What a person watching a run sees: a progress bar with loss, lr, speed and ETA (rich), and a log
line per logged step when the output is not a terminal (CI, a log file).

The bar's loss is the logged loss (the token-weighted mean over the logging window, as in metrics.jsonl),
not the last step's, which jumps from batch to batch. Its ETA is computed here from the steps this process
has run and their time: rich's own estimate looks at the last 30 s only, so it stays blank when a step takes
longer than that (any CPU run, a large model) and counts a resumed run's first step as instant.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from loraforge.progress import console


class TrainProgress:
    def __init__(self, total_steps: int, enabled: bool = True):
        self.total = total_steps
        self.enabled = enabled
        self.console = console()
        self.live = enabled and self.console.is_terminal
        self.progress: Progress | None = None
        self.task: Any = None
        self.tokens_per_s = 0.0
        self.loss: float | None = None  # the last logged loss
        self._start: tuple[int, float] | None = None  # (step, time) this process started from

    def start(self, step: int) -> None:
        self._start = (step, time.perf_counter())
        if not self.live:
            return
        self.progress = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss [cyan]{task.fields[loss]}"), TextColumn("lr {task.fields[lr]}"),
            TextColumn("{task.fields[speed]} tok/s"), TimeElapsedColumn(), TextColumn("ETA {task.fields[eta]}"),
            console=self.console, transient=False)
        self.task = self.progress.add_task("train", total=self.total, completed=step, loss="-", lr="-", speed="-",
                                           eta="-")
        self.progress.start()

    def eta_seconds(self, step: int, now: float | None = None) -> float | None:
        """Seconds left at `step`, from the mean time of the steps run since `start`; None before the first."""
        if self._start is None or step <= self._start[0]:
            return None
        first, t0 = self._start
        per_step = ((now if now is not None else time.perf_counter()) - t0) / (step - first)
        return per_step * max(0, self.total - step)

    def update(self, step: int, loss: float | None, lr: float) -> None:
        """After an optimizer step. `loss` (the step's own) is shown only until the first logged loss."""
        if self.progress is not None:
            shown = self.loss if self.loss is not None else loss
            self.progress.update(self.task, completed=step, loss=f"{shown:.4f}" if shown is not None else "nan",
                                 lr=f"{lr:.2e}", speed=f"{self.tokens_per_s:,.0f}",
                                 eta=_clock(self.eta_seconds(step)))

    def log_line(self, record: dict[str, Any]) -> None:
        if "tokens_per_s" in record:
            self.tokens_per_s = record["tokens_per_s"]
        if record.get("loss") is not None:
            self.loss = float(record["loss"])
            if self.progress is not None:
                self.progress.update(self.task, loss=f"{self.loss:.4f}")
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


def _clock(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:,.0f}"
    return str(v)
