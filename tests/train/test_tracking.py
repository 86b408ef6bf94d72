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


# Long: a 3-step run of the loop plus mlflow's import (~10-30 s on 2 shared cores).
@pytest.mark.long
def test_mlflow_file_store_holds_the_loss_of_metrics_jsonl(make_config, monkeypatch, tmp_path):
    pytest.importorskip("mlflow", reason="mlflow is not installed (pip install -e '.[dev]' or '.[track]')")
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the default: a file store in the run folder
    cfg = make_config(max_steps=3, report_to=["mlflow"], run_name="mlflow-run")
    result = LLAMATrainer.from_config(cfg, log=lambda m: None).train()
    logged = losses(result.run_dir)
    assert sorted(logged) == [1, 2, 3]

    store = result.run_dir / "mlruns"
    assert store.is_dir()
    client = MlflowClient(tracking_uri=store.resolve().as_uri())
    (experiment,) = [e for e in client.search_experiments() if e.name == "loraforge"]
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "mlflow-run" and run.info.status == "FINISHED"
    assert {m.step: m.value for m in client.get_metric_history(run.info.run_id, "loss")} == \
        pytest.approx(logged, rel=1e-6)
    assert "eval_loss" in run.data.metrics
    assert run.data.params["training.max_steps"] == "3" and run.data.params["lora.r"] == "4"
