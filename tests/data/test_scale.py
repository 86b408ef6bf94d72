"""Memory-mapped mode (data.memory_map) reads a file without loading it whole; a second run hits the cache."""

from __future__ import annotations

import json
import os
import tracemalloc
from pathlib import Path

import pytest
from tinymodels import alpaca_records, write_jsonl

from loraforge.config import DataConfig
from loraforge.data import examples
from loraforge.data.cache import TokenStore
from loraforge.data.load import StreamingExamples
from loraforge.data.pipeline import build_datasets


def big_jsonl(path: Path, n: int) -> Path:
    # Short examples, fat records: an unused 6 kB field makes the file large while tokenizing stays cheap.
    filler = "x" * 6000
    with path.open("w") as f:
        for i, r in enumerate(alpaca_records(n)):
            f.write(json.dumps({**r, "instruction": f"{r['instruction']} #{i}", "notes": filler}) + "\n")
    return path


def test_streaming_never_holds_the_file(tmp_path: Path, tokenizer) -> None:
    path = big_jsonl(tmp_path / "big.jsonl", 600)
    size = os.path.getsize(path)
    cfg = DataConfig(dataset=str(path), memory_map=True, validation_split=0.1, max_length=64)
    # warm up once on a small file: the tokenizer's fingerprint and lazy imports are fixed costs, not the file
    build_datasets(DataConfig(dataset=str(write_jsonl(tmp_path / "s.jsonl", alpaca_records(4))), memory_map=True),
                   tokenizer)
    tracemalloc.start()
    try:
        data = build_datasets(cfg, tokenizer, 2)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert size > 3_500_000 and peak < size / 5, (size, peak)
    assert isinstance(data.train, TokenStore) and isinstance(data.validation, TokenStore)
    assert len(data.train) + len(data.validation) == 600 and 30 < len(data.validation) < 90
    assert data.stats["train"].read == len(data.train)
    # the same examples as the in-memory pipeline, only split differently
    plain = build_datasets(DataConfig(dataset=str(path), validation_split=0.0, max_length=64, cache=False), tokenizer)
    streamed = sorted(json.dumps(e) for part in (data.train, data.validation) for e in part)
    assert streamed == sorted(json.dumps(e) for e in plain.train)
    assert list(data.train.lengths) == [len(e["input_ids"]) for e in data.train]


def test_streaming_examples_iterable_is_lazy(tmp_path: Path, tokenizer) -> None:
    path = big_jsonl(tmp_path / "big.jsonl", 400)
    stream = StreamingExamples(str(path), DataConfig(dataset=str(path), validation_split=0.0), tokenizer)
    tracemalloc.start()
    try:
        first = [e for _, e in zip(range(3), stream, strict=False)]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(first) == 3 and peak < os.path.getsize(path) / 5
    assert stream.stats.read == 3  # only what was asked for was read


@pytest.mark.parametrize("memory_map", [False, True])
def test_second_run_is_a_cache_hit(tmp_path: Path, tokenizer, monkeypatch, private_cache: Path,
                                   memory_map: bool) -> None:
    path = write_jsonl(tmp_path / "a.jsonl", alpaca_records(10))
    cfg = DataConfig(dataset=str(path), memory_map=memory_map, validation_split=0.2)
    first = build_datasets(cfg, tokenizer, 2)
    assert first.stats["train"].cache == "miss"
    assert any((private_cache / "tokenized").iterdir())

    def no_tokenizing(*a, **k):
        raise AssertionError("tokenized again")

    monkeypatch.setattr(examples, "encode_record", no_tokenizing)
    second = build_datasets(cfg, tokenizer, 2)
    assert second.stats["train"].cache == "hit"
    assert list(second.train) == list(first.train) and list(second.validation) == list(first.validation)
    assert second.eval_pairs == first.eval_pairs
    assert second.stats["train"].used == first.stats["train"].used
    # other settings, or changed data, miss the cache
    with pytest.raises(AssertionError, match="tokenized again"):
        build_datasets(DataConfig(dataset=str(path), memory_map=memory_map, validation_split=0.2, max_length=100),
                       tokenizer)
    write_jsonl(path, alpaca_records(11))
    with pytest.raises(AssertionError, match="tokenized again"):
        build_datasets(cfg, tokenizer)
