"""The progress helper: counts reach their totals whether or not a bar is drawn, a slow pass shows its bar only
once it has taken a moment, and `count` reaches the innermost `counting` pass from any depth."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from loraforge import progress


def test_track_and_task_record_their_counts_without_a_terminal() -> None:
    with progress.recorded() as bars:
        assert list(progress.track(iter("abc"), "letters", total=3)) == ["a", "b", "c"]
        with progress.task("steps", 2) as t:
            t.advance()
            t.advance()
    assert [(b.description, b.done, b.total) for b in bars] == [("letters", 3, 3), ("steps", 2, 2)]


def test_count_reaches_the_innermost_counting_pass_and_nothing_outside_one() -> None:
    progress.count()  # no pass open: a no-op
    with progress.recorded() as bars:
        with progress.counting("outer") as outer:
            progress.count()
            with progress.counting("inner"):
                progress.count(5)
            progress.count()
    assert [(b.description, b.done) for b in bars] == [("outer", 2), ("inner", 5)] and outer.total is None


def test_a_bar_shows_only_once_the_pass_has_taken_a_moment(terminal: io.StringIO) -> None:
    with progress.counting("quick", show_after_s=3600) as bar:
        progress.count(1000)
        assert bar._bar is None
    assert terminal.getvalue() == ""
    with progress.counting("slow", show_after_s=0) as bar:
        progress.count()
        assert bar._bar is not None
    assert "slow" in terminal.getvalue()


def test_nothing_is_drawn_when_stderr_is_not_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    log = io.StringIO()
    monkeypatch.setattr(progress, "console", lambda: Console(file=log))
    with progress.counting("tokenizing", show_after_s=0) as bar:
        progress.count(3)
    assert bar.done == 3 and log.getvalue() == ""
