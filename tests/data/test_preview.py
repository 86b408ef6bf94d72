"""`loraforge data preview`: rendered examples, trained-on tokens marked, length statistics, counts."""

from __future__ import annotations

from pathlib import Path

from tinymodels import alpaca_records, write_jsonl
from typer.testing import CliRunner

from loraforge.cli import app


def test_preview_command(tmp_path: Path, embedded_model_dir: Path) -> None:
    path = write_jsonl(tmp_path / "a.jsonl", [*alpaca_records(5), {"instruction": "broken"}])
    result = CliRunner().invoke(app, ["data", "preview", str(path), "-n", "2", "--max-length", "24",
                                      "--model", str(embedded_model_dir)], terminal_width=120)
    assert result.exit_code == 0, result.output
    out = result.output
    assert "example 0" in out and "example 1" in out and "example 2" not in out
    assert "### Instruction:" in out and "trained on" in out
    for word in ("min", "median", "p95", "max", "truncated at 24"):
        assert word in out
    assert "6 records read, 5 used" in out and "1 skipped as invalid" in out and "missing field 'output'" in out


def test_preview_highlights_trained_tokens(tmp_path: Path, tokenizer) -> None:
    from loraforge.data.preview import TRAINED_STYLE, render_example

    ex = {"input_ids": tokenizer("Q: hi A: yo")["input_ids"], "labels": []}
    ex["labels"] = [-100] * (len(ex["input_ids"]) - 1) + ex["input_ids"][-1:]
    text = render_example(ex, tokenizer)
    styled = [text.plain[s.start:s.end] for s in text.spans if s.style == TRAINED_STYLE]
    assert styled == [tokenizer.decode(ex["input_ids"][-1:])]


def test_preview_shows_characters_split_across_byte_level_tokens(tokenizer) -> None:
    from loraforge.data.preview import render_example

    ids = tokenizer("Ça va ✓ — naïve café 🙂", add_special_tokens=False)["input_ids"]
    assert "\ufffd" in "".join(tokenizer.decode([i]) for i in ids)  # decoded one by one, characters break
    text = render_example({"input_ids": ids, "labels": ids}, tokenizer)
    assert text.plain == "Ça va ✓ — naïve café 🙂"
