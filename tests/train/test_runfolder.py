"""runfolder.py: what counts as a run, the refusal, moving a run aside, the lock (one process, no training)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from loraforge.config import load_config
from loraforge.demo import demo_config_path
from loraforge.errors import ConfigError, RunFolderError
from loraforge.train.runfolder import FolderLock, claim, held_run


def _a_run(run_dir: Path) -> Path:
    (run_dir / "checkpoints" / "step-2").mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text('{"step": 1}\n')
    return run_dir


def test_what_counts_as_a_run(tmp_path: Path):
    run = tmp_path / "run"
    run.mkdir()
    # What a run writes before its first step does not count: a run that failed on bad data is just rerun.
    for name in ("config.yaml", "environment.json", "data_stats.json", ".lock", "metrics.jsonl"):
        (run / name).write_text("")
    (run / "checkpoints").mkdir()
    (run / "adapter").mkdir()
    assert held_run(run) == []
    (run / "checkpoints" / ".tmp-step-2").mkdir()  # a torn first checkpoint is a run's
    (run / "adapter" / "adapter_config.json").write_text("{}")
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    (run / "loraforge_run.json").write_text("{}")
    assert held_run(run) == ["checkpoints/", "adapter/", "metrics.jsonl", "loraforge_run.json"]


def test_a_run_is_refused_resumed_or_moved_aside(tmp_path: Path):
    run = _a_run(tmp_path / "run")
    logs: list[str] = []
    with pytest.raises(RunFolderError) as info, claim(run, resume=False, overwrite=False, log=logs.append):
        pass
    assert f"{run} holds another run (checkpoints/, metrics.jsonl)" in str(info.value)
    with claim(run, resume=True, overwrite=False, log=logs.append):
        assert (run / "checkpoints" / "step-2").is_dir()
    with claim(run, resume=False, overwrite=True, log=logs.append):
        assert held_run(run) == []
        with pytest.raises(RunFolderError, match="is in use"):  # the new folder is locked, not the old one
            FolderLock(run)
    (aside,) = tmp_path.glob("run.old-*")
    assert (aside / "checkpoints" / "step-2").is_dir() and logs == [f"moved the earlier run in {run} to {aside}"]
    FolderLock(aside).release()  # the moved run's lock was let go


def test_the_lock_names_its_holder_and_is_released_on_an_exception(tmp_path: Path):
    run = tmp_path / "run"
    with pytest.raises(KeyError), claim(run, resume=False, overwrite=False, log=print):
        held = json.loads((run / ".lock").read_text())
        assert held["pid"] == os.getpid()
        with pytest.raises(RunFolderError) as info:
            FolderLock(run)
        assert f"{run} is in use: another loraforge run (pid {os.getpid()} on {held['host']}" in str(info.value)
        raise KeyError("boom")
    FolderLock(run).release()


def test_overwrite_and_resume_together_are_refused(tmp_path: Path):
    with pytest.raises(ConfigError, match="overwrite_output_dir and .*resume_from_checkpoint"):
        load_config(None, [f"training.output_dir={tmp_path}", "training.overwrite_output_dir=true",
                           "training.resume_from_checkpoint=latest"])


def test_the_demo_overwrites_its_own_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """run_demo asks for overwrite explicitly (and never resumes), whatever the shipped config says."""
    import loraforge.demo as demo

    seen = {}

    class Stop(Exception):
        pass

    def fake_from_config(cfg, **kw):
        seen["training"] = cfg.training
        raise Stop

    monkeypatch.setattr("loraforge.train.trainer.LLAMATrainer.from_config", fake_from_config)
    with pytest.raises(Stop):
        demo.run_demo(tmp_path / "demo", steps=1)
    assert seen["training"].overwrite_output_dir and not seen["training"].resume_from_checkpoint
    assert load_config(demo_config_path()).training.output_dir == "runs/demo"
