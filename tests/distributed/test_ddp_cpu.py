"""`loraforge train` under `torchrun --nproc_per_node 2` on the CPU (gloo): the same loss curve as one
process with the doubled per-device batch, only rank 0 writes, and a 2-process resume is exact."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from trainhelpers import losses, make_records, run_config

from loraforge.train import checkpoint as ckpt

STEPS = 4


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def _train(config: Path, nproc: int, *extra: str) -> subprocess.CompletedProcess:
    if nproc == 1:
        cmd = [sys.executable, "-m", "loraforge.cli", "train", str(config), *extra]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               "-m", "loraforge.cli", "train", str(config), *extra]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.fixture
def data_file(tmp_path: Path) -> Path:
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in make_records(24)))
    return path


def test_two_processes_match_one_with_double_batch(tiny_model_dir, data_file, tmp_path):
    one = run_config(tiny_model_dir, data_file, tmp_path / "one", max_steps=STEPS, per_device_train_batch_size=4)
    two = run_config(tiny_model_dir, data_file, tmp_path / "two", max_steps=STEPS, per_device_train_batch_size=2)
    one.save(tmp_path / "one.yaml")
    two.save(tmp_path / "two.yaml")
    _train(tmp_path / "one.yaml", 1)
    proc = _train(tmp_path / "two.yaml", 2)

    want, got = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in want:  # gradients are synchronized: the curves would drift apart after step 1 otherwise
        assert got[step] == pytest.approx(want[step], rel=1e-4), f"step {step}"
    env = json.loads((tmp_path / "two" / "environment.json").read_text())
    assert env["world_size"] == 2
    assert proc.stderr.count("step=1 ") == 1  # only rank 0 logs
    assert (tmp_path / "two" / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.long
def test_two_process_resume_is_exact(tiny_model_dir, data_file, tmp_path):
    cfg = run_config(tiny_model_dir, data_file, tmp_path / "full", max_steps=STEPS, save_steps=2,
                     save_total_limit=3, lora_dropout=0.1)
    cfg.save(tmp_path / "full.yaml")
    _train(tmp_path / "full.yaml", 2)
    full = tmp_path / "full"
    # The same run cut after step 2: its folder as a preempted run would leave it.
    cut = tmp_path / "cut"
    shutil.copytree(full, cut)
    for p in ckpt.list_checkpoints(cut / "checkpoints"):
        if p.name != "step-2":
            shutil.rmtree(p)
    shutil.rmtree(cut / "adapter")
    for name in ("rng-rank0.pt", "rng-rank1.pt"):  # every rank's own RNG state is saved
        assert (cut / "checkpoints" / "step-2" / name).is_file()
    _train(tmp_path / "full.yaml", 2, "--resume", "--output-dir", str(cut))
    want, got = losses(full), losses(cut)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-5, abs=1e-6), f"step {step}"
