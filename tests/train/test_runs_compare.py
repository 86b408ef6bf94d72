"""`loraforge runs compare`: the settings that differ, the final metrics, and an HTML page of loss curves."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from loraforge.cli import app
from loraforge.errors import ConfigError
from loraforge.train.compare import compare_runs
from loraforge.train.tracking import MetricsLog


def _run(make_config, name: str, lr: float, losses: list[float], evals: dict[int, float]) -> Path:
    cfg = make_config(name, max_steps=len(losses), learning_rate=lr)
    run_dir = Path(cfg.training.output_dir)
    run_dir.mkdir(parents=True)
    cfg.save(run_dir / "config.yaml")
    log = MetricsLog(run_dir / "metrics.jsonl")
    for step, loss in enumerate(losses, 1):
        log.write({"step": step, "loss": loss, "lr": lr})
        if step in evals:
            log.write({"step": step, "eval_loss": evals[step]})
    return run_dir


def test_compare_lists_differences_and_final_metrics_and_draws_the_curves(make_config, tmp_path: Path) -> None:
    a = _run(make_config, "run-a", 1e-4, [3.0, 2.5, 2.0, 1.5], {2: 2.6, 4: 2.1})
    b = _run(make_config, "run-b", 3e-4, [3.0, 2.0, 1.2], {2: 2.2, 3: 2.4})
    page = tmp_path / "cmp.html"
    diffs, finals = compare_runs([a, b], page)
    assert diffs == {"training.learning_rate": [1e-4, 3e-4], "training.max_steps": [4, 3]}  # not output_dir
    assert finals == {"steps": [4, 3], "final loss": [1.5, 1.2], "final eval_loss": [2.1, 2.4],
                      "best eval_loss": [2.1, 2.2]}
    text = page.read_text()
    assert text.count("<svg") == 2  # train loss and eval loss
    curves = re.findall(r'data-run="([^"]+)"[^>]* points="([^"]+)"', text)
    assert [(run, len(points.split())) for run, points in curves] == [("run-a", 4), ("run-b", 3), ("run-a", 2),
                                                                      ("run-b", 2)]


def test_the_cli_prints_the_table_and_refuses_a_folder_without_metrics(make_config, tmp_path: Path) -> None:
    a = _run(make_config, "run-a", 1e-4, [3.0, 2.0], {})
    b = _run(make_config, "run-b", 2e-4, [3.0, 1.0], {})
    result = CliRunner().invoke(app, ["runs", "compare", str(a), str(b), "--html", str(tmp_path / "p.html")])
    assert result.exit_code == 0, result.output
    assert "training.learning_rate" in result.output and "final loss" in result.output
    assert (tmp_path / "p.html").is_file()
    with pytest.raises(ConfigError, match="no metrics.jsonl"):
        compare_runs([a, tmp_path], None)
    (b / "metrics.jsonl").write_text('{"step": 1, "loss": 2}\n{oops\n')
    with pytest.raises(ConfigError, match=r"metrics.jsonl, line 2"):
        compare_runs([a, b], None)
