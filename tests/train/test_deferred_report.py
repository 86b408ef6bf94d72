"""A step's report (progress bar, metrics record, console line) is made while the next step's backward runs,
so the GPU never waits for it; a checkpoint, an evaluation and the end still find every record written."""

from __future__ import annotations

from pathlib import Path

import pytest
from trainhelpers import read_metrics

from loraforge.train.trainer import LLAMATrainer


def _watch(monkeypatch, run_dir: Path) -> tuple[list[int], dict[int, list[int]]]:
    """(steps whose record was written while an optimizer step ran, {saved step: records written by then})."""
    inside: list[int] = []
    written_at_save: dict[int, list[int]] = {}
    where = {"in_step": False}
    orig_step, orig_emit, orig_save = (LLAMATrainer._optimizer_step, LLAMATrainer._emit, LLAMATrainer._save)

    def step(self, run, inputs, ahead):
        where["in_step"] = True
        try:
            return orig_step(self, run, inputs, ahead)
        finally:
            where["in_step"] = False

    def emit(self, run, record):
        if where["in_step"] and "loss" in record:
            inside.append(record["step"])
        return orig_emit(self, run, record)

    def save(self, run):
        written_at_save[run.state.step] = [r["step"] for r in read_metrics(run_dir) if "loss" in r]
        return orig_save(self, run)

    monkeypatch.setattr(LLAMATrainer, "_optimizer_step", step)
    monkeypatch.setattr(LLAMATrainer, "_emit", emit)
    monkeypatch.setattr(LLAMATrainer, "_save", save)
    return inside, written_at_save


def test_a_step_is_reported_while_the_next_step_runs(make_config, monkeypatch):
    cfg = make_config(max_steps=3, save_steps=0, eval_steps=0)
    inside, _ = _watch(monkeypatch, Path(cfg.training.output_dir))
    LLAMATrainer.from_config(cfg, log=lambda m: None).train()
    assert inside == [1, 2]  # the last step's record is written at once, after it
    records = [r for r in read_metrics(Path(cfg.training.output_dir)) if "loss" in r]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(isinstance(r["grad_norm"], float) and r["grad_norm"] > 0 for r in records)


# Long: five steps with three checkpoints and an evaluation (~10 s on 2 shared cores).
@pytest.mark.long
def test_every_record_is_written_before_a_checkpoint(make_config, monkeypatch):
    cfg = make_config(max_steps=5, save_steps=2, eval_steps=0)
    inside, written_at_save = _watch(monkeypatch, Path(cfg.training.output_dir))
    LLAMATrainer.from_config(cfg, log=lambda m: None).train()
    # Steps 1 and 3 are neither saved nor last: their records are written inside steps 2 and 4.
    assert inside == [1, 3]
    # Steps 2, 4 (save_steps) and 5 (the last) are checkpointed with their own record already written.
    assert written_at_save == {2: [1, 2], 4: [1, 2, 3, 4], 5: [1, 2, 3, 4, 5]}


def test_the_last_record_is_written_when_training_fails(make_config, monkeypatch):
    cfg = make_config(max_steps=4, save_steps=0, eval_steps=0)
    orig_step = LLAMATrainer._optimizer_step
    calls = {"n": 0}

    def step(self, run, inputs, ahead):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("device lost")
        return orig_step(self, run, inputs, ahead)

    monkeypatch.setattr(LLAMATrainer, "_optimizer_step", step)
    with pytest.raises(RuntimeError, match="device lost"):
        LLAMATrainer.from_config(cfg, log=lambda m: None).train()
    assert [r["step"] for r in read_metrics(Path(cfg.training.output_dir)) if "loss" in r] == [1, 2]
