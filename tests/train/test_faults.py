"""Non-finite losses, out-of-memory, torn checkpoints, early stopping and checkpoint rotation."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from trainhelpers import losses, nan_losses, read_metrics, stop_on_nonfinite

from loraforge.errors import ResourceError
from loraforge.train import checkpoint as ckpt
from loraforge.train.trainer import LLAMATrainer


def test_nonfinite_step_is_skipped_and_counted(make_config, monkeypatch):
    monkeypatch.setattr(LLAMATrainer, "_micro_step_loss", nan_losses({2}, accum=2))
    cfg = make_config(max_steps=4)
    result = LLAMATrainer.from_config(cfg, log=lambda m: None).train()
    logged = losses(cfg.training.output_dir)
    assert sorted(logged) == [1, 3, 4]  # step 2 dropped, the run went on
    assert all(torch.isfinite(torch.tensor(v)) for v in logged.values())
    assert read_metrics(cfg.training.output_dir)[-2]["nonfinite_steps"] == 1
    assert result.steps == 4
    state = json.loads((result.best_checkpoint / "trainer_state.json").read_text())
    assert state["nonfinite_total"] == 1 and state["nonfinite_in_a_row"] == 0


def test_too_many_nonfinite_steps_stop_with_a_checkpoint(make_config, monkeypatch):
    monkeypatch.setattr(LLAMATrainer, "_micro_step_loss", nan_losses({2, 3, 4, 5, 6}, accum=2))
    cfg = make_config(max_steps=8, max_nonfinite_steps=3)
    name, state = stop_on_nonfinite(cfg, "3 non-finite losses in a row at step 4")
    assert name == "step-4" and state["nonfinite_total"] == 3


def test_out_of_memory_names_the_settings_to_change(make_config, monkeypatch):
    def oom(self, model, batch, n_tokens):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(LLAMATrainer, "_micro_step_loss", oom)
    with pytest.raises(ResourceError) as e:
        LLAMATrainer.from_config(make_config(), log=lambda m: None).train()
    msg = str(e.value)
    for setting in ("per_device_train_batch_size", "gradient_accumulation_steps", "gradient_checkpointing",
                    "max_length"):
        assert setting in msg
    assert isinstance(e.value.__cause__, torch.OutOfMemoryError)


def test_torn_checkpoints_are_ignored(tmp_path):
    root = tmp_path / "checkpoints"
    good = root / "step-2"
    (good / "adapter").mkdir(parents=True)
    (good / "trainer_state.json").write_text("{}")
    (good / ckpt.MARKER).write_text("ok\n")
    (root / ".tmp-step-3" / "adapter").mkdir(parents=True)  # crash mid-write: never renamed
    shutil.copytree(good, root / "step-4")
    (root / "step-4" / ckpt.MARKER).unlink()  # renamed but marker missing (e.g. copied by hand mid-save)
    assert ckpt.latest_checkpoint(root) == good
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["step-2"]


def test_early_stopping_keeps_last_k_plus_best(make_config, monkeypatch):
    scripted = iter([3.0, 2.0, 2.5, 2.6, 2.7, 2.8])
    monkeypatch.setattr(LLAMATrainer, "_evaluate_during_training",
                        lambda self, model, collate: {"eval_loss": (v := next(scripted)), "eval_perplexity": 2.0 ** v})
    cfg = make_config(max_steps=6, eval_steps=1, save_steps=1, save_total_limit=1, early_stopping_patience=2)
    seen = []
    result = LLAMATrainer.from_config(cfg, log=lambda m: None).train(on_eval=lambda step, m: seen.append(step))
    assert result.stopped_early and result.steps == 4
    assert seen == [1, 2, 3, 4]
    kept = [p.name for p in ckpt.list_checkpoints(result.run_dir / "checkpoints")]
    assert kept == ["step-2", "step-4"]  # the best (eval 2.0 at step 2) plus the last one
    assert result.best_checkpoint.name == "step-2"
