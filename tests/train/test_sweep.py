"""`loraforge sweep`: a 3-trial Optuna search on the tiny model writes its table, trials and best config."""

from __future__ import annotations

import csv
import json

import pytest
import yaml

from loraforge.config import load_config
from loraforge.errors import ConfigError
from loraforge.train.sweep import run_sweep

pytest.importorskip("optuna")  # the optional [sweep] extra (the dev extras install it)


def test_three_trial_sweep_writes_the_best_config(make_config, tmp_path):
    base = make_config("base", max_steps=4)
    base.save(tmp_path / "base.yaml")
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({
        "training.learning_rate": {"low": 1e-4, "high": 3e-2, "log": True},
        "lora.r": {"choices": [2, 4]},
        "lora.lora_alpha": {"choices": [4, 8]},
        "lora.lora_dropout": {"low": 0.0, "high": 0.1},
        "training.batch_x_accum": {"choices": ["2x2", "4x1"]},
    }))
    out = tmp_path / "sweep"
    run_sweep(tmp_path / "base.yaml", [], trials=2, space=space, out=out, log=lambda m: None)
    assert len(json.loads((out / "trials.json").read_text())) == 2
    # the same sweep again continues its study (study.db): one more trial makes three, none is redone
    result = run_sweep(tmp_path / "base.yaml", [], trials=3, space=space, out=out, log=lambda m: None)

    rows = json.loads((out / "trials.json").read_text())
    assert len(rows) == 3 and {r["state"] for r in rows} <= {"COMPLETE", "PRUNED"}
    assert [r["number"] for r in rows] == [0, 1, 2] and (out / "study.db").is_file()
    assert len(list(csv.DictReader((out / "trials.csv").open()))) == 3
    done = [r for r in rows if r["state"] == "COMPLETE"]
    assert result["best_value"] == min(r["eval_loss"] for r in done)
    best = load_config(out / "best.yaml")  # a valid config, ready for `loraforge train`
    params = result["best_params"]
    assert best.training.learning_rate == params["training.learning_rate"]
    assert best.lora.r == params["lora.r"]
    assert f"{best.training.per_device_train_batch_size}x{best.training.gradient_accumulation_steps}" == \
        params["training.batch_x_accum"]
    # only the best trial's folder is kept; it evaluated during training (eval_steps = max_steps // 4),
    # which pruning relies on
    best_number = min(done, key=lambda r: r["eval_loss"])["number"]
    assert sorted(p.name for p in out.glob("trial-*")) == [f"trial-{best_number:03d}"]
    trial_metrics = (out / f"trial-{best_number:03d}" / "metrics.jsonl").read_text()
    assert trial_metrics.count("eval_loss") == 4
    # another space in the same folder is another sweep: refused, not mixed into this study
    space.write_text(yaml.safe_dump({"lora.r": {"choices": [2, 8]}}))
    with pytest.raises(ConfigError, match="another sweep"):
        run_sweep(tmp_path / "base.yaml", [], trials=4, space=space, out=out, log=lambda m: None)
