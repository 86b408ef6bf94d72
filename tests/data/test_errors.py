"""Bad data: errors name the file, the line or record, and the field; skip_invalid counts instead."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loraforge.config import DataConfig
from loraforge.data.pipeline import build_datasets
from loraforge.errors import DataError

GOOD = {"instruction": "Say hi.", "input": "", "output": "Hi."}


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("bad, expected", [
    (json.dumps({"instruction": "x"}), "line 2: missing field 'output'"),
    (json.dumps({"instruction": "x", "output": 5}), "line 2: field 'output' must be a string, got int"),
    (json.dumps({"instruction": "x", "output": "  "}), "line 2: field 'output' is empty"),
    ('{"instruction": "x", "output": ', "line 2: invalid JSON"),
])
def test_bad_alpaca_record_names_file_line_field(tmp_path: Path, tokenizer, bad: str, expected: str) -> None:
    path = write_lines(tmp_path / "bad.jsonl", [json.dumps(GOOD), bad, json.dumps(GOOD)])
    with pytest.raises(DataError) as err:
        build_datasets(DataConfig(dataset=str(path), validation_split=0.0), tokenizer)
    assert str(path) in str(err.value) and expected in str(err.value)
    assert "data.skip_invalid=true" in str(err.value)


def test_unknown_role_names_message(tmp_path: Path, tokenizer) -> None:
    recs = [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
            {"messages": [{"role": "user", "content": "a"}, {"role": "wizard", "content": "b"}]}]
    path = write_lines(tmp_path / "chat.jsonl", [json.dumps(r) for r in recs])
    with pytest.raises(DataError, match=r"chat\.jsonl, line 2, messages\[1\]: unknown role 'wizard'"):
        build_datasets(DataConfig(dataset=str(path), validation_split=0.0), tokenizer)


def test_bad_record_in_json_array_names_record_index(tmp_path: Path, tokenizer) -> None:
    path = tmp_path / "a.json"
    path.write_text(json.dumps([GOOD, GOOD, {"instruction": "x", "output": ["list"]}]))
    with pytest.raises(DataError, match=r"a\.json, record 2: field 'output' must be a string"):
        build_datasets(DataConfig(dataset=str(path), validation_split=0.0), tokenizer)


def test_skip_invalid_counts_every_record(tmp_path: Path, tokenizer) -> None:
    lines = [json.dumps(GOOD), json.dumps({"instruction": "x"}), "not json", json.dumps(GOOD),
             json.dumps({"instruction": "x", "output": ""}), json.dumps({"instruction": 3, "output": "y"})]
    path = write_lines(tmp_path / "mixed.jsonl", lines)
    data = build_datasets(DataConfig(dataset=str(path), validation_split=0.0, skip_invalid=True), tokenizer)
    s = data.stats["train"]
    assert (s.read, s.used, s.skipped_invalid) == (6, 2, 4)
    assert len(s.first_errors) == 4 and "line 3: invalid JSON" in s.first_errors[1]
    assert "6 records read, 2 used, 0 truncated, 4 skipped as invalid" in s.line("train")


def test_csv_missing_column_value(tmp_path: Path, tokenizer) -> None:
    (tmp_path / "t.csv").write_text("instruction,output\nA,B\nC,\n")
    with pytest.raises(DataError, match=r"t\.csv, line 3: field 'output' is empty"):
        build_datasets(DataConfig(dataset=str(tmp_path / "t.csv"), validation_split=0.0), tokenizer)
