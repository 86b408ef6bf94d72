"""Progress bars (rich, with ETA) for the passes a person waits on: evaluation and generation.

One console on stderr is shared by every bar, so a validation pass inside training nests under the training
bar instead of fighting it for the cursor. When stderr is not a terminal (CI, a log file, a pipe) no bar is
drawn at all: logs get the results, not a line per refresh.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

T = TypeVar("T")

_console: Console | None = None


def console() -> Console:
    """The stderr console every progress display shares (made on first use: tests swap sys.stderr)."""
    global _console
    if _console is None or _console.file is not sys.stderr:
        _console = Console(file=sys.stderr)
    return _console


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Yield `items`, drawing a transient bar with count, elapsed time and ETA on a terminal."""
    if total is None:
        try:
            total = len(items)  # type: ignore[arg-type]
        except TypeError:
            total = None
    out = console()
    if not out.is_terminal:
        yield from items
        return
    with Progress(TextColumn(f"[bold]{description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("ETA"), TimeRemainingColumn(), console=out, transient=True) as bar:
        task = bar.add_task(description, total=total)
        for item in items:
            yield item
            bar.advance(task)
