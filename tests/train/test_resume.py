"""Exact resume: a real `loraforge train` process stopped by SIGTERM and resumed logs the same losses,
step for step, as an uninterrupted run (dropout on, so the RNG restore matters)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from trainhelpers import losses

from loraforge.train import checkpoint as ckpt

STEPS = 12


def _cmd(config: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "loraforge.cli", "train", str(config), *extra]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def test_sigterm_then_resume_matches_uninterrupted(make_config, tmp_path):
    full_cfg = make_config("full", max_steps=STEPS, save_steps=1, lora_dropout=0.1)
    cut_cfg = make_config("cut", max_steps=STEPS, save_steps=1, lora_dropout=0.1)
    full_cfg.save(tmp_path / "full.yaml")
    cut_cfg.save(tmp_path / "cut.yaml")
    cut_dir = Path(cut_cfg.training.output_dir)

    full = subprocess.Popen(_cmd(tmp_path / "full.yaml"), env=_env(), stderr=subprocess.PIPE, text=True)
    cut = subprocess.Popen(_cmd(tmp_path / "cut.yaml"), env=_env(), stderr=subprocess.PIPE, text=True)
    # Stop the second run by a real SIGTERM as soon as it has logged step 3.
    deadline = time.monotonic() + 300
    while len(losses(cut_dir) if (cut_dir / "metrics.jsonl").exists() else {}) < 3:
        assert cut.poll() is None, cut.stderr.read()
        assert time.monotonic() < deadline
        time.sleep(0.02)
    cut.send_signal(signal.SIGTERM)
    _, err = cut.communicate(timeout=300)
    assert cut.returncode == 143, err
    assert "checkpoint saved" in err
    _, err_full = full.communicate(timeout=300)
    assert full.returncode == 0, err_full

    latest = ckpt.latest_checkpoint(cut_dir / "checkpoints")
    stopped_at = int(latest.name.split("-")[1])
    assert 3 <= stopped_at < STEPS, "the run finished before the signal landed"
    for name in ("adapter/adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "rng-rank0.pt",
                 "trainer_state.json", ckpt.MARKER):
        assert (latest / name).is_file(), name
    # A checkpoint torn mid-write must be ignored: a temporary folder, and a later step without its marker.
    (cut_dir / "checkpoints" / f".tmp-step-{stopped_at + 1}" / "adapter").mkdir(parents=True)
    torn = cut_dir / "checkpoints" / f"step-{stopped_at + 2}"
    (torn / "adapter").mkdir(parents=True)
    (torn / "trainer_state.json").write_text("{}")

    resumed = subprocess.run(_cmd(tmp_path / "cut.yaml", "--resume"), env=_env(), capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from {latest} at step {stopped_at}" in resumed.stderr

    want, got = losses(full_cfg.training.output_dir), losses(cut_dir)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-5, abs=1e-6), f"step {step}"
