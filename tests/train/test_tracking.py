"""Trackers: TensorBoard event files and an offline Weights & Biases run hold the logged loss."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from trainhelpers import losses

from loraforge.train.trainer import LLAMATrainer


def test_tensorboard_and_offline_wandb_hold_the_loss(make_config, monkeypatch):
    pytest.importorskip("tensorboard")
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = make_config(max_steps=3, report_to=["tensorboard", "wandb"])
    result = LLAMATrainer.from_config(cfg, log=lambda m: None).train()
    logged = losses(result.run_dir)
    assert sorted(logged) == [1, 2, 3]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(result.run_dir / "tensorboard"))
    acc.Reload()
    tb = {e.step: e.value for e in acc.Scalars("loss")}
    assert tb == pytest.approx(logged, rel=1e-6)
    assert "eval_loss" in acc.Tags()["scalars"]

    files = list(Path(result.run_dir, "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1
    # wandb 0.31 writes the .wandb file from its Go core and ships no Python reader for it (the old
    # wandb.sdk.internal.datastore is gone); history records hold each value as JSON text, so look for it.
    blob = files[0].read_bytes()
    assert b"loss" in blob
    for step, value in logged.items():
        assert json.dumps(value).encode() in blob, f"step {step} loss {value} not in {files[0]}"
