"""Tokenizing a dataset counts each record on the progress helper's `counting` pass, whose total is known up front,
and a cache hit counts none;
preference pairs advance a bar of known total, one step a pair."""

from __future__ import annotations

from pathlib import Path

from tinymodels import alpaca_records, write_jsonl

from loraforge import progress
from loraforge.config import DataConfig
from loraforge.data.pipeline import build_datasets
from loraforge.data.preference import build_preference_datasets


def test_build_datasets_counts_every_record_it_tokenizes(tmp_path: Path, tokenizer) -> None:
    cfg = DataConfig(dataset=str(write_jsonl(tmp_path / "a.jsonl", alpaca_records(12))), validation_split=0.25)
    with progress.recorded() as bars:
        data = build_datasets(cfg, tokenizer)
    (bar,) = bars
    assert bar.description == "tokenizing the dataset"
    assert bar.done == data.stats["train"].used + data.stats["validation"].used == 12
    assert bar.total == 12  # known before the first record: the bar has an ETA
    with progress.recorded() as bars:
        build_datasets(cfg, tokenizer)  # from the cache: nothing to tokenize
    assert [b.done for b in bars] == [0]


def test_preference_pairs_advance_one_step_per_pair_to_the_total(tmp_path: Path, tokenizer) -> None:
    pairs = [{"prompt": f"Say {i}.", "chosen": f"{i}", "rejected": "no"} for i in range(10)]
    cfg = DataConfig(dataset=str(write_jsonl(tmp_path / "p.jsonl", pairs)), validation_split=0.2)
    with progress.recorded() as bars:
        build_preference_datasets(cfg, tokenizer)
    (bar,) = bars
    assert (bar.description, bar.done, bar.total) == ("tokenizing the preference pairs", 10, 10)
