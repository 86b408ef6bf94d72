"""The command line as a newcomer meets it: help that explains, errors without tracebacks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "120", "NO_COLOR": "1"}
    return subprocess.run([sys.executable, "-m", "loraforge.cli", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=120)


def test_train_help_explains():
    out = run_cli("train", "--help")
    assert out.returncode == 0
    for needle in ("Fine-tune", "CONFIG", "section.key=value", "--resume", "Examples"):
        assert needle in out.stdout


def test_top_level_help_lists_commands():
    out = run_cli("--help")
    assert out.returncode == 0
    for cmd in ("train", "eval", "generate", "chat", "merge", "serve", "demo", "bench", "sweep", "data"):
        assert cmd in out.stdout


def test_misspelt_key_gives_clear_error_and_nonzero_exit(tmp_path: Path):
    cfg = tmp_path / "typo.yaml"
    cfg.write_text("training:\n  learning_rat: 1.0e-4\n")
    out = run_cli("train", str(cfg))
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert "training.learning_rat" in out.stderr and "Did you mean 'learning_rate'" in out.stderr


# long: three CLI subprocesses that import the whole stack (~30 s); config errors are unit-tested
@pytest.mark.long
def test_bad_override_and_missing_data_are_clear(tmp_path: Path):
    out = run_cli("train", "lora.r=-3")
    assert out.returncode == 2 and "lora.r = -3" in out.stderr and "Traceback" not in out.stderr
    out = run_cli("train", f"data.dataset={tmp_path / 'missing.jsonl'}", "model.use_4bit=false",
                  f"training.output_dir={tmp_path / 'run'}")
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert "missing.jsonl" in out.stderr


def test_config_command_lists_every_setting():
    out = run_cli("config")
    assert out.returncode == 0
    assert "training.learning_rate = 0.0002" in out.stdout and "lora.target_modules = 'qv'" in out.stdout


# long: two CLI subprocesses that import the whole stack (~20 s)
@pytest.mark.long
def test_max_context_bench_without_a_gpu_or_with_an_unknown_shape_is_a_clear_error(tmp_path: Path):
    import torch

    r = run_cli("bench", "--max-context", "--shape", "llama-9000")
    assert r.returncode == 2 and "not a benchmark shape" in r.stderr and "Traceback" not in r.stderr, r.stderr
    if not torch.cuda.is_available():
        r = run_cli("bench", "--max-context", "--out", str(tmp_path))
        assert r.returncode == 2 and "needs a CUDA GPU" in r.stderr and "Traceback" not in r.stderr, r.stderr


# Each bench command imports the whole stack (~10 s on 2 cores): the speed bench's two in `make test-long`.
@pytest.mark.long
def test_speed_bench_without_a_gpu_or_with_an_unknown_case_is_a_clear_error():
    import torch

    r = run_cli("bench", "--case", "llama-9000")
    assert r.returncode == 2 and "unknown bench case" in r.stderr and "Traceback" not in r.stderr, r.stderr
    if not torch.cuda.is_available():
        r = run_cli("bench")
        assert r.returncode == 2 and "needs a CUDA GPU" in r.stderr and "Traceback" not in r.stderr, r.stderr
