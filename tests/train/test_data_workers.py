"""training.dataloader_num_workers: worker processes collate the same batches, and a signal to the whole
process group (Ctrl-C, a scheduler's scancel) still ends in a saved checkpoint."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from trainhelpers import losses, read_metrics

from loraforge.train import checkpoint as ckpt
from loraforge.train.trainer import LLAMATrainer


def test_workers_give_the_same_run(make_config):
    """Same batches in the same order, and the dropout masks untouched (the loader seeds its workers from its
    own generator, not from the global RNG): the losses and the evaluation agree exactly."""
    runs = {}
    for workers in (0, 2):
        cfg = make_config(f"w{workers}", max_steps=3, eval_steps=3, lora_dropout=0.1,
                          dataloader_num_workers=workers)
        LLAMATrainer.from_config(cfg, log=lambda m: None).train()
        runs[workers] = read_metrics(cfg.training.output_dir)
    assert [r.get("loss") for r in runs[0]] == [r.get("loss") for r in runs[2]]
    evals = {w: [r["eval_loss"] for r in recs if "eval_loss" in r] for w, recs in runs.items()}
    assert evals[0] and evals[0] == evals[2]


def test_sigterm_to_the_process_group_with_workers_saves_a_checkpoint(make_config, tmp_path):
    cfg = make_config("group", max_steps=50, dataloader_num_workers=2)
    cfg.save(tmp_path / "group.yaml")
    run_dir = Path(cfg.training.output_dir)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen([sys.executable, "-m", "loraforge.cli", "train", str(tmp_path / "group.yaml")], env=env,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 300
    while len(losses(run_dir) if (run_dir / "metrics.jsonl").exists() else {}) < 2:
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGTERM)  # the trainer and its loader workers alike
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err
    assert "checkpoint saved" in err
    latest = ckpt.latest_checkpoint(run_dir / "checkpoints")
    assert latest is not None and 2 <= int(latest.name.split("-")[1]) < 50
