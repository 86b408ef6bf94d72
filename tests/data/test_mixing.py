"""Combined mode: the mix drawn is what the config asks for, is logged, and trains on the tiny model."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from tinymodels import alpaca_records, write_jsonl

from loraforge.config import DataConfig, SourceConfig
from loraforge.data.mixing import draw, mix_counts, source_config
from loraforge.data.pipeline import build_datasets


def dialogue_records(n: int) -> list[dict]:
    return [{"dialog": [f"Hi number {i}.", f"Hello {i}!", "How are you?", "Fine."]} for i in range(n)]


def test_mix_counts_and_draw() -> None:
    assert mix_counts([12, 4], [1, 1], "balanced") == [12, 12]
    assert mix_counts([12, 4], [3, 1], "weighted") == [12, 4]
    assert mix_counts([12, 4], [1, 1], "weighted") == [8, 8]
    d = draw(4, 10, random.Random(0))
    assert len(d) == 10 and sorted(d[:8]) == [0, 0, 1, 1, 2, 2, 3, 3]  # whole copies before the remainder


@pytest.mark.parametrize("mixing, drawn", [("balanced", {"a": 12, "d": 12}), ("weighted", {"a": 8, "d": 8})])
def test_combined_mode_reports_the_mix(tmp_path: Path, tokenizer, mixing: str, drawn: dict) -> None:
    a = write_jsonl(tmp_path / "a.jsonl", alpaca_records(12))
    d = write_jsonl(tmp_path / "d.jsonl", dialogue_records(4))
    cfg = DataConfig(sources=[SourceConfig(path=str(a)), SourceConfig(path=str(d))], mixing=mixing,
                     validation_split=0.0)
    data = build_datasets(cfg, tokenizer, 2)
    mix = data.stats["train"].mix
    assert {k[0]: v["drawn"] for k, v in zip(["a", "d"], mix.values(), strict=True)} == drawn
    assert len(data.train) == sum(drawn.values())
    n_chat = sum(1 for e in data.train if 1 in e["input_ids"])  # <|im_start|> = 1 only in chat renderings
    assert n_chat == drawn["d"]
    assert "mix" in data.stats["train"].line("train") and mixing in data.stats["train"].line("train")


def test_combined_alpaca_and_dialogue_trains(tmp_path: Path, tiny_model_dir: Path) -> None:
    from loraforge.config import EvalConfig, LoRAConfig, ModelConfig, TrainingConfig
    from loraforge.train.trainer import LLAMATrainer

    a = write_jsonl(tmp_path / "a.jsonl", alpaca_records(12))
    d = write_jsonl(tmp_path / "d.jsonl", dialogue_records(6))
    trainer = LLAMATrainer(
        model_config=ModelConfig(model_name=str(tiny_model_dir), use_4bit=False, device="cpu"),
        lora_config=LoRAConfig(),
        data_config=DataConfig(sources=[SourceConfig(path=str(a), weight=1), SourceConfig(path=str(d), weight=1)],
                               mixing="balanced", max_length=64, validation_split=0.2),
        training_config=TrainingConfig(output_dir=str(tmp_path / "run"), max_steps=2, per_device_train_batch_size=2,
                                       gradient_accumulation_steps=1, optim="adamw_torch", logging_steps=1,
                                       gradient_checkpointing=False),
        eval_config=EvalConfig(num_generation_samples=0, eval_batch_size=4), log=lambda m: None)
    result = trainer.train()
    assert result.steps == 2 and result.train_loss is not None and result.eval_loss is not None
    stats = json.loads((tmp_path / "run" / "data_stats.json").read_text())
    assert [m["drawn"] for m in stats["train"]["mix"].values()] == [10, 10]  # 12 - 2 and 6 - 1 held out → 10 each


def _three_formats(tmp_path: Path) -> list[SourceConfig]:
    """An Alpaca JSONL, a chat JSONL and a CSV with its own column names, each recognisable by its words."""
    a = write_jsonl(tmp_path / "a.jsonl", [{"instruction": f"Alpaca task {i}.", "input": "", "output": f"done {i}"}
                                           for i in range(6)])
    c = write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": f"Chat hello {i}."},
                                                         {"role": "assistant", "content": f"hi {i}"}]}
                                           for i in range(6)])
    q = tmp_path / "q.csv"
    q.write_text("question,answer\n" + "".join(f"Csv question {i}?,answer {i}\n" for i in range(6)))
    return [SourceConfig(path=str(a)), SourceConfig(path=str(c), format="auto"),
            SourceConfig(path=str(q), column_mapping={"question": "instruction", "answer": "output"})]


@pytest.mark.parametrize("memory_map", [False, True])
def test_each_source_keeps_its_own_format(tmp_path: Path, tokenizer, memory_map: bool) -> None:
    cfg = DataConfig(sources=_three_formats(tmp_path), validation_split=0.0, memory_map=memory_map, format="alpaca",
                     max_length=128)
    data = build_datasets(cfg, tokenizer, 0)
    rendered = [tokenizer.decode(data.train[i]["input_ids"]) for i in range(len(data.train))]
    chat = [t for t in rendered if "Chat hello" in t]
    alpaca = [t for t in rendered if "Alpaca task" in t or "Csv question" in t]
    assert len(chat) == 6 and len(alpaca) == 12
    assert all("<|im_start|>user" in t and "### Instruction" not in t for t in chat)
    assert all("### Instruction" in t and "<|im_start|>" not in t for t in alpaca)
    # Inference (chat, generate, serve, eval) renders prompts one way: the log says which, and why.
    note = " ".join(data.stats["train"].notes)
    assert "prompt formats" in note and "chat" in note and "alpaca" in note, note


def test_preview_of_a_combined_config_shows_each_source_in_its_own_format(
        tmp_path: Path, embedded_model_dir: Path, tokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from loraforge.cli import app
    from loraforge.config import RunConfig
    from loraforge.data import preview as preview_module

    monkeypatch.setattr(preview_module, "load_tokenizer", lambda *a, **k: tokenizer)  # loaded once per session
    monkeypatch.setenv("COLUMNS", "200")  # rich's width, so that headers are not wrapped

    sources = _three_formats(tmp_path)
    cfg = RunConfig()
    cfg.model.model_name = str(embedded_model_dir)
    cfg.data = DataConfig(sources=sources, max_length=40, max_samples=3)
    cfg.save(tmp_path / "run.yaml")
    assert source_config(cfg.data, 2).column_mapping == {"question": "instruction", "answer": "output"}
    assert source_config(cfg.data, 2).max_length == 40 and source_config(cfg.data, 2).max_samples == 3

    def preview(*args: str) -> str:
        result = CliRunner().invoke(app, ["data", "preview", *args, "-c", str(tmp_path / "run.yaml"), "-n", "1"],
                                    terminal_width=200)
        assert result.exit_code == 0, result.output
        return result.output

    out = preview()
    blocks = {s.path: out[out.index(s.path):] for s in sources}  # each source's header, then its examples
    assert "format alpaca" in blocks[sources[0].path] and "Alpaca task" in blocks[sources[0].path]
    assert "format chat" in blocks[sources[1].path] and "<|im_start|>user" in blocks[sources[1].path]
    csv_part = blocks[sources[2].path]
    assert "format alpaca" in csv_part and "### Instruction:" in csv_part and "Csv question" in csv_part
    assert "max_length 40" in csv_part  # the run's settings, not the defaults
    only = preview(sources[2].path)  # one source named: still read with its own column mapping
    assert "Csv question" in only and "Alpaca task" not in only and "Chat hello" not in only
