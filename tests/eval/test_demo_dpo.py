"""`loraforge demo --dpo`: honest pairs (held-out prompts never seen in training) and its figures end to end
on a tiny random model."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import yaml

import loraforge.demo as demo


def test_demo_prompts_are_distinct_short_and_seeded():
    picked = demo._prompts(300, seed=42)
    keys = [demo._prompt_key(p[0]["content"]) for p, _ in picked]
    assert len(picked) == 300 and len(set(keys)) == 300, "a repeated prompt could sit on both sides of the split"
    assert all(len(p[0]["content"]) <= demo.MAX_CHARS and len(h) <= demo.MAX_CHARS for p, h in picked)
    assert demo._prompts(50, seed=42) == picked[:50], "the held-out pairs are a prefix: the same for any n_train"
    assert demo._prompt_key("Hello?") == demo._prompt_key("hello!") == demo._prompt_key(" Hello ")


def test_wilson_interval():
    # By hand: centre (0.75 + 1.96²/96) / (1 + 1.96²/48) = 0.7315, half-width 0.1193.
    assert demo.wilson_interval(0.75, 48) == pytest.approx([0.6122, 0.8508], abs=1e-4)
    low, high = demo.wilson_interval(1.0, 48)
    assert high == 1.0 and 0.9 < low < 1.0


def test_shipped_dpo_demo_config_holds_out_its_pairs():
    cfg = yaml.safe_load(demo.dpo_config_path().read_text())
    assert cfg["training"]["objective"] == "dpo" and cfg["training"]["max_steps"] > 0
    assert cfg["model"]["model_name"] == "smollm2-135m-instruct" and not cfg["model"]["use_4bit"]


@pytest.mark.long  # generates 12 replies, trains 2 DPO steps and evaluates twice (~10 s on 2 cores)
def test_dpo_demo_writes_its_figures(tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("LORAFORGE_CACHE", str(tmp_path / "cache"))
    config = tmp_path / "demo-dpo.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"model_name": str(tiny_model_dir), "use_4bit": False, "device": "cpu"},
        "lora": {"r": 4, "lora_alpha": 8, "target_modules": "qv", "lora_dropout": 0.0},
        "data": {"dataset": "chitchat", "max_length": 64, "cache": False},
        "training": {"objective": "dpo", "beta": 0.1, "max_steps": 2, "per_device_train_batch_size": 2,
                     "gradient_accumulation_steps": 1, "gradient_checkpointing": False, "logging_steps": 1},
        "eval": {"eval_batch_size": 4}}))
    monkeypatch.setattr(demo, "dpo_config_path", lambda: config)
    monkeypatch.setattr(demo, "MAX_NEW_TOKENS", 4)
    monkeypatch.setattr(demo, "build_demo_pairs", functools.partial(demo.build_demo_pairs, n_train=8, n_held_out=4))

    results = demo.run_dpo_demo(tmp_path / "run")

    assert results["reward_accuracy_before"] == 0.5, "policy = reference at step 0: every pair a tie"
    assert results["held_out_pairs"] == 4 and results["train_pairs"] == 8 and results["steps"] == 2
    assert 0.0 <= results["reward_accuracy_after"] <= 1.0 and results["wall_s"] >= results["demo_s"] > 0
    assert not results["pairs_cached"] and results["cpu_s"] > 0 and results["device"]
    summary = json.loads(next((tmp_path / "run").glob("dpo-demo-*.json")).read_text())
    assert summary["reward_accuracy_after"] == results["reward_accuracy_after"]
    prompts = {name: {demo._prompt_key(json.loads(line)["prompt"])
                      for line in (Path(results["pairs"]) / f"{name}.jsonl").read_text().splitlines()}
               for name in ("train", "held_out")}
    assert len(prompts["train"]) == 8 and len(prompts["held_out"]) == 4 and not prompts["train"] & prompts["held_out"]
    assert (tmp_path / "run" / "report.html").is_file() and (tmp_path / "run" / "adapter").is_dir()
    again = demo.build_demo_pairs(demo.load_config(config))
    assert again.cached and str(again.train.parent) == results["pairs"]
