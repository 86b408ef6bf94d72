"""`loraforge demo`'s figures end to end on a tiny random model: both tasks' tables, the intervals and
demo-<date>.json."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml
from tinymodels import chat_records, write_jsonl


@pytest.mark.long  # trains 2 steps and generates twice (~10 s on 2 cores)
def test_demo_writes_its_summary_with_intervals(tmp_path: Path, tiny_model_dir: Path,
                                                monkeypatch: pytest.MonkeyPatch):
    import loraforge.demo as demo

    # Conversations with a 2-line message holding one question give the question task its examples.
    questions = [{"messages": [{"role": "user", "content": "Hello"},
                               {"role": "assistant", "content": f"Day {i} was fine\nWhat did you do on day {i}?"}]}
                 for i in range(16)]
    data = write_jsonl(tmp_path / "chat.jsonl", chat_records(40) + questions)
    monkeypatch.setenv("LORAFORGE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(demo, "QUESTION_HELD_OUT", 4)
    config = tmp_path / "demo.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"model_name": str(tiny_model_dir), "use_4bit": False, "device": "cpu"},
        "lora": {"r": 4, "lora_alpha": 8, "target_modules": "qv"},
        "data": {"dataset": str(data), "max_length": 64, "validation_split": 0.25, "cache": False},
        "training": {"max_steps": 2, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 1,
                     "gradient_checkpointing": False, "logging_steps": 1},
        "eval": {"decoding": "greedy", "max_new_tokens": 4, "num_generation_samples": 6, "eval_batch_size": 4}}))
    monkeypatch.setattr(demo, "demo_config_path", lambda: config)

    results = demo.run_demo(tmp_path / "run")

    summary = json.loads(Path(results["summary"]).read_text())
    chitchat = summary["chitchat"]
    assert chitchat["n_replies"] == 6 and chitchat["n_conversations"] == 14 and summary["wall_s"] > 0
    assert summary["n_replies"] == 4 and summary["n_conversations"] == 4  # the question task's held-out examples
    for name, ppl in (("base", results["base_perplexity"]), ("fine_tuned", results["finetuned_perplexity"])):
        assert chitchat[name]["perplexity"] == pytest.approx(ppl)
        for part in (chitchat[name], summary[name]):
            assert set(part["intervals"]) == {"perplexity", "bleu", "rouge1", "rouge2", "rougeL"}
            low, high = part["intervals"]["perplexity"]
            assert low <= part["perplexity"] <= high and math.isfinite(high)
    for part in (summary, chitchat):
        assert set(part["fine_tuned_minus_base"]) == {"bleu", "rouge1", "rouge2", "rougeL"}
    for report in (tmp_path / "run" / "report.md", tmp_path / "run" / "question-task" / "report.md"):
        text = report.read_text()
        assert "95% bootstrap interval" in text and "## What this measures" in text
    question_report = (tmp_path / "run" / "question-task" / "report.md").read_text()
    assert demo.QUESTION_PROMPT in question_report
    # The facts say what each report's data is, not the training source ("Dataset: <the chitchat file>").
    assert "- **Data:** the question task, built from " in question_report and "**Dataset:**" not in question_report
    assert "conversations held out from training" in (tmp_path / "run" / "report.md").read_text()
