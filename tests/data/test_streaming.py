"""Streaming mode (data.streaming): every format streams the tokens the cached path makes, a JSON array is read
incrementally, the worker count does not change the batches, and a stream restarted at a saved position
goes on exactly as the uninterrupted one."""

from __future__ import annotations

import csv
import json
from itertools import islice
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tinymodels import alpaca_records, chat_records, write_jsonl
from torch.utils.data import DataLoader

from loraforge.config import DataConfig, SourceConfig
from loraforge.data import stream as stream_module
from loraforge.data.collate import PadCollator
from loraforge.data.load import load_source
from loraforge.data.pipeline import build_datasets
from loraforge.data.records import iter_json_array
from loraforge.data.stream import StreamPosition, TrainStream, as_is
from loraforge.data.types import SourceSpec
from loraforge.errors import DataError


def _records(n: int) -> list[dict[str, str]]:
    return [{**r, "instruction": f"{r['instruction']} (#{i})"} for i, r in enumerate(alpaca_records(n))]


def _write(fmt: str, folder: Path, recs: list[dict[str, str]]) -> Path:
    """The records as a file of `fmt`, or as a folder in the Hugging Face hub layout (two shards)."""
    folder.mkdir(parents=True, exist_ok=True)
    if fmt == "jsonl":
        return write_jsonl(folder / "a.jsonl", recs)
    if fmt == "json":
        (folder / "a.json").write_text(json.dumps(recs, indent=1))
        return folder / "a.json"
    if fmt == "csv":
        with (folder / "a.csv").open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["instruction", "input", "output"])
            w.writeheader()
            w.writerows(recs)
        return folder / "a.csv"
    if fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(recs), folder / "a.parquet", row_group_size=5)
        return folder / "a.parquet"
    hub = folder / "hub"
    (hub / "data").mkdir(parents=True)
    half = len(recs) // 2
    for k, part in enumerate((recs[:half], recs[half:])):
        if fmt == "hub-parquet":
            pq.write_table(pa.Table.from_pylist(part), hub / "data" / f"train-0000{k}-of-00002.parquet")
        else:
            write_jsonl(hub / "data" / f"train-0000{k}-of-00002.jsonl", part)
    return hub


def _rows(stream: TrainStream, n: int, position: StreamPosition = StreamPosition(), **kw) -> list:
    return list(islice(stream.rows(position, **kw), n))


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "parquet", "hub-parquet", "hub-jsonl"])
def test_each_format_streams_the_cached_paths_tokens(tmp_path: Path, tokenizer, fmt: str) -> None:
    recs = _records(12)
    path = _write(fmt, tmp_path / "d", recs)
    cfg = DataConfig(dataset=str(path), validation_split=0.0, max_length=64, streaming=True)
    data = build_datasets(cfg, tokenizer)
    assert isinstance(data.train, TrainStream) and data.validation == []
    streamed = [row for row, _ in _rows(data.train, 12)]
    cached = load_source(SourceSpec(str(path)), DataConfig(dataset=str(path), validation_split=0.0, max_length=64),
                         tokenizer)
    assert sorted(map(json.dumps, streamed)) == sorted(map(json.dumps, cached.train))
    # in the source's order: record i is the one that names #i
    assert [f"(#{i})" in tokenizer.decode(r["input_ids"]) for i, r in enumerate(streamed)] == [True] * 12
    # the source is read again when it ends: record 12 is record 0 again
    again = _rows(data.train, 13)[12]
    assert again == (streamed[0], StreamPosition(12, 1))


def test_held_out_records_follow_the_memory_mapped_rule(tmp_path: Path, tokenizer) -> None:
    path = write_jsonl(tmp_path / "a.jsonl", _records(40))
    base = dict(dataset=str(path), validation_split=0.25, max_length=64)
    streamed = build_datasets(DataConfig(**base, streaming=True), tokenizer, 2)
    mapped = build_datasets(DataConfig(**base, memory_map=True), tokenizer, 2)
    assert list(streamed.validation) == list(mapped.validation) and len(streamed.validation) > 3
    # training never sees a held-out record
    train = [json.dumps(r) for r, _ in _rows(streamed.train, 40 - len(streamed.validation))]
    assert sorted(train) == sorted(json.dumps(e) for e in mapped.train)
    assert streamed.eval_pairs == mapped.eval_pairs


def test_a_json_array_is_read_incrementally(tmp_path: Path) -> None:
    # An array much larger than the read chunk, broken at its very end: its records come out before the
    # end is parsed (a reader that parsed the whole file first would fail before yielding any).
    path = tmp_path / "big.json"
    recs = _records(200)
    path.write_text(json.dumps(recs, indent=1)[:-1] + ', {"instruction": }')
    got = []
    with pytest.raises(DataError, match=r"big\.json: invalid JSON at line \d+, column \d+"):
        for rec in iter_json_array(path, chunk_chars=64):
            got.append(rec)
    assert got == recs and path.stat().st_size > 100 * 64
    # a number, string or literal cut by a chunk's end is read whole
    path.write_text('[12345.5e1, "abcdefgh", true, null, {"a": [1, -2]}]')
    assert list(iter_json_array(path, chunk_chars=3)) == [123455.0, "abcdefgh", True, None, {"a": [1, -2]}]
    path.write_text("[ ]")
    assert list(iter_json_array(path, chunk_chars=1)) == []


def _packing_stream(tmp_path: Path, tokenizer) -> TrainStream:
    # chat, alpaca and long texts (cut into several blocks each): records give 1 or several examples
    texts = [{"text": " ".join(["word"] * (30 + 40 * (i % 3)))} for i in range(10)]
    path = write_jsonl(tmp_path / "t.jsonl", texts)
    cfg = DataConfig(dataset=str(path), validation_split=0.0, max_length=48, packing=True, streaming=True)
    return build_datasets(cfg, tokenizer).train


def test_workers_give_the_same_batches(tmp_path: Path, tokenizer) -> None:
    stream = build_datasets(DataConfig(dataset=str(write_jsonl(tmp_path / "c.jsonl", chat_records(24))),
                                       validation_split=0.1, max_length=64, streaming=True), tokenizer).train
    collate = PadCollator(tokenizer.pad_token_id)

    def batches(workers: int) -> list:
        def load(records):
            return DataLoader(records, batch_size=None, num_workers=workers, collate_fn=as_is)
        got = list(islice(stream.micro_batches(StreamPosition(), 3, collate, load=load), 12))
        return [({k: v.tolist() for k, v in b.items()}, pos) for b, pos in got]

    assert batches(0) == batches(2)


def test_a_bad_record_met_in_a_worker_is_the_plain_data_error(tmp_path: Path, tokenizer) -> None:
    """Raised in a DataLoader worker, a DataError would reach the user wrapped in the worker's traceback
    text; the stream hands it to the main process as data and raises it there unchanged."""
    recs = _records(20)
    recs[13] = {"instruction": 5, "output": "x"}
    stream = build_datasets(DataConfig(dataset=str(write_jsonl(tmp_path / "b.jsonl", recs)), validation_split=0.0,
                                       max_length=64, streaming=True), tokenizer).train

    def load(records):
        return DataLoader(records, batch_size=None, num_workers=2, collate_fn=as_is)

    with pytest.raises(DataError, match=r"b\.jsonl, line 14: field 'instruction'") as e:
        _rows(stream, 20, load=load)
    assert "Traceback" not in str(e.value)


def test_a_stream_resumed_at_its_position_goes_on_unchanged(tmp_path: Path, tokenizer, monkeypatch) -> None:
    monkeypatch.setattr(stream_module, "PACK_WINDOW", 8)  # several packing windows within 20 rows
    stream = _packing_stream(tmp_path, tokenizer)
    full = _rows(stream, 20)
    assert len({pos.record for _, pos in full}) >= 3
    assert all("position_ids" in r and len(r["input_ids"]) <= 48 for r, _ in full)
    for cut in (0, 3, 7, 15):
        assert _rows(stream, 20 - cut - 1, full[cut][1]) == full[cut + 1:]
    # the same with several micro-batches' worth of rows per window
    for stride in (2, 5):
        _, pos = full[stride * 2 - 1]
        assert _rows(stream, 4, pos) == full[stride * 2:stride * 2 + 4]


def _oasst_rows(trees: int) -> list[dict]:
    """oasst1-style message rows, each tree's rows together: a prompt, two ranked replies, a follow-up."""
    rows = []
    for t in range(trees):
        tid = f"t{t}"
        rows += [{"message_id": f"{tid}-p", "parent_id": None, "message_tree_id": tid, "role": "prompter",
                  "text": f"question {t}?"},
                 {"message_id": f"{tid}-a2", "parent_id": f"{tid}-p", "message_tree_id": tid, "role": "assistant",
                  "text": f"worse answer {t}", "rank": 1},
                 {"message_id": f"{tid}-a1", "parent_id": f"{tid}-p", "message_tree_id": tid, "role": "assistant",
                  "text": f"best answer {t}", "rank": 0},
                 {"message_id": f"{tid}-q", "parent_id": f"{tid}-a1", "message_tree_id": tid, "role": "prompter",
                  "text": f"and then {t}?"}]
    return rows


def test_openassistant_rows_stream_a_tree_at_a_time(tmp_path: Path, tokenizer) -> None:
    path = write_jsonl(tmp_path / "o.jsonl", _oasst_rows(6))
    cfg = dict(dataset=str(path), validation_split=0.0, max_length=64)
    streamed = [row for row, _ in _rows(build_datasets(DataConfig(**cfg, streaming=True), tokenizer).train, 6)]
    cached = build_datasets(DataConfig(**cfg), tokenizer).train
    # one conversation per tree, along the best-ranked reply, as the in-memory path builds it; in tree order
    assert sorted(map(json.dumps, streamed)) == sorted(map(json.dumps, cached))
    texts = [tokenizer.decode(r["input_ids"]) for r in streamed]
    assert all(f"best answer {t}" in x and "worse answer" not in x for t, x in enumerate(texts))
    # a tree whose rows come back after another tree began cannot be streamed: said, with the row
    rows = _oasst_rows(2)
    mixed = write_jsonl(tmp_path / "m.jsonl", rows[:2] + rows[4:] + rows[2:4])
    stream = build_datasets(DataConfig(dataset=str(mixed), validation_split=0.0, max_length=64, streaming=True),
                            tokenizer).train
    with pytest.raises(DataError, match="tree 't0' goes on after other trees began"):
        _rows(stream, 3)


def test_streaming_refuses_what_it_cannot_do(tmp_path: Path, tokenizer) -> None:
    a = write_jsonl(tmp_path / "a.jsonl", _records(4))
    with pytest.raises(DataError, match="combined mode"):
        build_datasets(DataConfig(sources=[SourceConfig(path=str(a))], streaming=True), tokenizer)
    # a source with nothing to train on stops with a message instead of reading for ever
    empty = write_jsonl(tmp_path / "e.jsonl", [{"instruction": "x", "output": ""}] * 3)
    stream = build_datasets(DataConfig(dataset=str(empty), streaming=True, validation_split=0.0, skip_invalid=True),
                            tokenizer).train
    with pytest.raises(DataError, match="no usable training example"):
        _rows(stream, 1)
