"""The training bar: its loss is the logged loss, its ETA is known from the second step on whatever a step takes;
the evaluation and generation bars; nothing drawn when stderr is not a terminal."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from loraforge import progress
from loraforge.train.progress import TrainProgress


def test_eta_from_the_steps_run_even_when_a_step_takes_minutes() -> None:
    bar = TrainProgress(total_steps=10, enabled=False)
    bar.start(step=4)  # resumed at step 4: the steps before took no time of this process
    t0 = bar._start[1]
    assert bar.eta_seconds(4, now=t0 + 5) is None
    assert bar.eta_seconds(6, now=t0 + 240) == pytest.approx(4 * 120)  # 2 steps in 4 minutes, 4 to go


def test_the_bar_shows_the_logged_loss_and_an_eta(terminal: io.StringIO, monkeypatch) -> None:
    import loraforge.train.progress as train_progress

    monkeypatch.setattr(train_progress, "console", progress.console)
    bar = TrainProgress(total_steps=4)
    assert bar.live
    bar.start(0)
    bar.update(1, 9.0, 1e-4)
    bar.update(2, 1.0, 1e-4)
    bar.log_line({"step": 2, "loss": 5.0, "lr": 1e-4, "tokens_per_s": 100.0})  # mean of the window: 5.0
    bar.update(3, 2.0, 1e-4)
    fields = bar.progress.tasks[0].fields
    assert fields["loss"] == "5.0000" and fields["eta"] != "-"
    bar.stop()


def test_track_draws_on_a_terminal_and_stays_silent_in_a_log(terminal: io.StringIO, monkeypatch) -> None:
    assert list(progress.track(range(3), "perplexity")) == [0, 1, 2]
    assert "perplexity" in terminal.getvalue()
    log = io.StringIO()
    monkeypatch.setattr(progress, "console", lambda: Console(file=log))  # not a terminal
    assert list(progress.track(iter(range(3)), "perplexity")) == [0, 1, 2]
    assert log.getvalue() == ""
