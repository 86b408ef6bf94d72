"""Progress bars (rich, with ETA) for the passes a person waits on: evaluation, generation, tokenizing a
dataset, merging an adapter, writing a GGUF file, the merge's parity check.

Layer 0 (it imports nothing of loraforge) so that data/ and infer/ can draw bars as well as eval/ and train/.

One console on stderr is shared by every bar, so a validation pass inside training nests under the training
bar instead of fighting it for the cursor. When stderr is not a terminal (CI, a log file, a pipe) no bar is
drawn at all: logs get the results, not a line per refresh. The counts are kept either way, and `recorded`
hands them to tests.

Three ways in: `track(items)` for a loop over a collection; `task(description, total)` for a loop whose
steps are not one collection; `counting(description)` around a pass whose steps happen deep in code that
should not take a bar as an argument (the tokenizer, called per record from the data loaders), which calls
`count()` at each step.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

T = TypeVar("T")

_console: Console | None = None
_recorders: list[list[Task]] = []  # open `recorded` blocks, innermost last
_counting: list[Task] = []  # open `counting` blocks, innermost last


def console() -> Console:
    """The stderr console every progress display shares (made on first use: tests swap sys.stderr)."""
    global _console
    if _console is None or _console.file is not sys.stderr:
        _console = Console(file=sys.stderr)
    return _console


class Task:
    """One pass: `done` steps of `total` (None: not known in advance), drawn on a terminal.

    The bar appears only once the pass has run `show_after_s` seconds, so a pass that is over in a moment
    (a cached dataset, a tiny model) draws nothing.
    """

    def __init__(self, description: str, total: int | None, show_after_s: float = 0.0):
        self.description = description
        self.total = total
        self.done = 0
        self.show_after_s = show_after_s
        self._out = console()
        self._started = time.perf_counter()
        self._bar: Progress | None = None
        self._id: TaskID | None = None
        self._maybe_show()

    def advance(self, n: int = 1) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(self._id, completed=self.done)
        else:
            self._maybe_show()

    def grow(self, n: int) -> None:
        """n more steps to come: the total (None until now) grows by n."""
        self.total = (self.total or 0) + n
        if self._bar is not None:
            self._bar.update(self._id, total=self.total)

    def _maybe_show(self) -> None:
        if not self._out.is_terminal or time.perf_counter() - self._started < self.show_after_s:
            return
        self._bar = Progress(TextColumn(f"[bold]{self.description}"), BarColumn(), MofNCompleteColumn(),
                             TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=self._out,
                             transient=True)
        self._id = self._bar.add_task(self.description, total=self.total, completed=self.done)
        self._bar.start()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


@contextmanager
def task(description: str, total: int | None, *, show_after_s: float = 0.0) -> Iterator[Task]:
    """A `Task` for the block: `.advance()` it at each step; the bar goes away at the end."""
    t = Task(description, total, show_after_s)
    for seen in _recorders:
        seen.append(t)
    try:
        yield t
    finally:
        t.close()


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Yield `items`, drawing a transient bar with count, elapsed time and ETA on a terminal."""
    if total is None:
        try:
            total = len(items)  # type: ignore[arg-type]
        except TypeError:
            total = None
    with task(description, total) as t:
        for item in items:
            yield item
            t.advance()


@contextmanager
def counting(description: str, *, show_after_s: float = 2.0) -> Iterator[Task]:
    """A pass of unknown length whose steps call `count()` from wherever they are; shown after 2 s by default
    (tokenizing a few hundred records takes less, and a cache hit tokenizes nothing)."""
    with task(description, None, show_after_s=show_after_s) as t:
        _counting.append(t)
        try:
            yield t
        finally:
            _counting.remove(t)


def count(n: int = 1) -> None:
    """One more step of the innermost `counting` pass; nothing outside one."""
    if _counting:
        _counting[-1].advance(n)


def expect(n: int) -> None:
    """n more steps to come in the innermost `counting` pass (a total, hence an ETA); nothing outside one."""
    if _counting:
        _counting[-1].grow(n)


@contextmanager
def recorded() -> Iterator[list[Task]]:
    """Every task begun inside the block, in order, with its `done` and `total` (for tests: a pass that
    reaches its total really reported each step)."""
    seen: list[Task] = []
    _recorders.append(seen)
    try:
        yield seen
    finally:
        _recorders.remove(seen)
