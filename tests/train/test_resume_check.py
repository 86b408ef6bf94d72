"""Resuming with changed settings: allowed ones are named and kept, the others refused before anything loads,
with config.yaml left as the run wrote it."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from loraforge.config import RunConfig, load_config
from loraforge.errors import ConfigError
from loraforge.train import checkpoint as ckpt
from loraforge.train.resume_check import check_resume_config, config_changes
from loraforge.train.trainer import LLAMATrainer


def _run_folder(tmp_path: Path) -> tuple[Path, RunConfig]:
    """A run folder as training leaves it, as far as the check looks: config.yaml and a complete checkpoint."""
    run_dir = tmp_path / "run"
    cfg = load_config(None, [f"training.output_dir={run_dir}", "lora.r=8", "training.max_steps=10"])
    run_dir.mkdir()
    cfg.save(run_dir / "config.yaml")
    step = run_dir / "checkpoints" / "step-4"
    step.mkdir(parents=True)
    (step / ckpt.MARKER).write_text("")
    return run_dir, cfg


def _resumed(cfg: RunConfig, *overrides: str) -> RunConfig:
    path = Path(cfg.training.output_dir) / "config.yaml"
    return load_config(path, ["training.resume_from_checkpoint=latest", *overrides])


def test_changes_are_listed_and_presets_equal_their_modules() -> None:
    saved = RunConfig()
    new = load_config(None, ["lora.target_modules=[q_proj,v_proj]", "lora.r=16", "training.max_steps=5"])
    assert config_changes(saved, new) == {"lora.r": (8, 16), "training.max_steps": (-1, 5)}


def test_a_changed_rank_is_refused_naming_it_and_config_yaml_is_untouched(tmp_path: Path) -> None:
    run_dir, cfg = _run_folder(tmp_path)
    before = (run_dir / "config.yaml").read_bytes()
    new = _resumed(cfg, "lora.r=16", "model.use_4bit=false", "training.max_steps=20")
    with pytest.raises(ConfigError) as info:
        LLAMATrainer.from_config(new, log=lambda _: None).train()  # refused before the model loads
    msg = str(info.value)
    assert "lora.r 8 -> 16" in msg and "model.use_4bit True -> False" in msg
    assert "training.max_steps" not in msg.split("May change")[0]  # allowed, so not among the refused
    assert "training.max_steps" in msg.split("May change")[1]  # ... and named as what may change
    assert (run_dir / "config.yaml").read_bytes() == before


def test_allowed_changes_are_named_in_the_log(tmp_path: Path) -> None:
    run_dir, cfg = _run_folder(tmp_path)
    logs: list[str] = []
    check_resume_config(_resumed(cfg, "training.max_steps=20", "training.logging_steps=5", "eval.max_new_tokens=9"),
                        run_dir, logs.append)
    assert logs == ["resume: continuing with changed settings: training.max_steps 10 -> 20; "
                    "training.logging_steps 10 -> 5; eval.max_new_tokens 256 -> 9"]
    logs.clear()
    check_resume_config(_resumed(cfg), run_dir, logs.append)  # same settings: nothing to say
    assert logs == []


def test_no_checkpoint_yet_means_nothing_to_compare(tmp_path: Path) -> None:
    run_dir, cfg = _run_folder(tmp_path)
    (run_dir / "checkpoints" / "step-4" / ckpt.MARKER).unlink()  # torn: resume starts from the beginning
    check_resume_config(_resumed(cfg, "lora.r=32"), run_dir, lambda _: None)


def test_a_named_checkpoint_is_compared_with_its_own_runs_config(tmp_path: Path) -> None:
    run_dir, cfg = _run_folder(tmp_path)
    other = dataclasses.replace(cfg, training=dataclasses.replace(cfg.training, output_dir=str(tmp_path / "new"),
                                resume_from_checkpoint=str(run_dir / "checkpoints" / "step-4")))
    check_resume_config(other, tmp_path / "new", lambda _: None)  # another folder: allowed
    bad = dataclasses.replace(other, lora=dataclasses.replace(other.lora, lora_alpha=64))
    with pytest.raises(ConfigError, match=r"lora\.lora_alpha 16 -> 64"):
        check_resume_config(bad, tmp_path / "new", lambda _: None)


def test_a_damaged_saved_config_is_a_clear_error(tmp_path: Path) -> None:
    run_dir, cfg = _run_folder(tmp_path)
    new = _resumed(cfg)
    (run_dir / "config.yaml").write_text("lora:\n  rank: 8\n")
    with pytest.raises(ConfigError, match=r"cannot read the settings the run was trained with .*config\.yaml"):
        check_resume_config(new, run_dir, lambda _: None)


@pytest.mark.long  # a real `loraforge train` process: ~15 s of imports on 2 cores
def test_cli_refuses_with_exit_2_and_one_message(tmp_path: Path) -> None:
    run_dir, _ = _run_folder(tmp_path)
    before = (run_dir / "config.yaml").read_bytes()
    env = {**os.environ, "NO_COLOR": "1", "COLUMNS": "200"}
    out = subprocess.run([sys.executable, "-m", "loraforge.cli", "train", str(run_dir / "config.yaml"), "lora.r=16",
                          "--resume"], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr and "lora.r 8 -> 16" in out.stderr
    assert (run_dir / "config.yaml").read_bytes() == before
