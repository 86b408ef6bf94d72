"""One source, read, split and tokenized — through the tokenization cache (cache.py) when it is on.

`load_source` turns a `SourceSpec` into a `SourceData`. In memory mode the records are read whole, shuffled
and split by count; in memory-mapped mode (`data.memory_map`) they are read one at a time, each record goes
to validation by a seeded hash of its index (split.py), and the examples are written straight into an
on-disk `TokenStore` the trainer indexes lazily. `load_stream` (`data.streaming`) tokenizes nothing up front
but the held-out records: the training split is a `TrainStream` (stream.py). The file readers are in
sources.py; tokenizing is in examples.py.
"""

from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from loraforge.config import DataConfig
from loraforge.data import cache, chitchat, sources
from loraforge.data.examples import iter_examples, tokenize_records
from loraforge.data.records import KIND_OF_FORMAT, InvalidRecord, RawRecord, detect_format, oasst_conversations
from loraforge.data.split import in_validation, split_records
from loraforge.data.templates import load_user_template
from loraforge.data.types import DataStats, SourceData, SourceSpec
from loraforge.errors import DataError

EVAL_RECORDS_KEPT = 64  # normalized validation records kept (and cached) for generation-time evaluation
STREAM_EVAL_RECORDS = 256  # held-out records of a streamed source when data.max_eval_samples is not set


def read_source(path: str, split: str = "train") -> list[RawRecord]:
    """Read all raw records of a source (streaming mode iterates `sources.iter_source` instead)."""
    return list(sources.iter_source(path, split))


def resolve_format(fmt: str, records: Iterable[RawRecord], column_mapping: dict[str, str] | None = None) -> str:
    """`auto` → the format of the first record whose fields tell it (after renaming its columns). Records
    that tell nothing (a number, a list, unknown fields) are passed over: they are counted as invalid
    later. When no record tells, the first one's reason is the error."""
    if fmt != "auto":
        return fmt
    first_error: DataError | None = None
    for r in records:
        if isinstance(r.data, InvalidRecord):
            continue
        data = r.data
        if column_mapping and isinstance(data, dict):
            data = {column_mapping.get(k, k): v for k, v in data.items()}
        try:
            return detect_format(data, r.where)
        except DataError as e:
            first_error = first_error or e
    if first_error is not None:
        raise first_error
    return "auto"


class StreamingExamples:
    """An iterable over the tokenized examples of one split of a source, reading and tokenizing one record
    at a time (JSONL, text, CSV and Parquet never held whole). Iterate it as often as you like; `stats`
    describes the last complete pass."""

    def __init__(self, source: str, cfg: DataConfig, tokenizer: Any, split: str = "train", *,
                 fmt: str | None = None, column_mapping: dict[str, str] | None = None, data_split: str = "train"):
        self.source, self.cfg, self.tokenizer, self.split = source, cfg, tokenizer, split
        self.fmt = fmt or cfg.format
        self.column_mapping = column_mapping if column_mapping is not None else cfg.column_mapping
        self.data_split = data_split
        self.stats = DataStats()

    def raw(self) -> Iterator[RawRecord]:
        taken = 0
        limit = self.cfg.max_samples if self.split == "train" else self.cfg.max_eval_samples
        for i, rec in enumerate(sources.iter_source(self.source, self.data_split)):
            if (self.split == "validation") != in_validation(i, self.cfg):
                continue
            if limit and taken >= limit:
                return
            taken += 1
            yield rec

    def __iter__(self) -> Iterator[dict[str, list[int]]]:
        fmt = self.fmt
        if fmt == "auto":
            fmt = resolve_format("auto", first_records(sources.iter_source(self.source, self.data_split), 50),
                                 self.column_mapping)
        if fmt == "oasst":
            raise DataError(f"{self.source}: OpenAssistant trees cannot be read one record at a time (a tree needs "
                            "all its rows); set data.memory_map=false.")
        self.stats = stats = DataStats()
        for example, _ in iter_examples(self.raw(), self.cfg, self.tokenizer, fmt, stats, self.column_mapping):
            yield example


def first_records(it: Iterator[RawRecord], n: int) -> list[RawRecord]:
    out = []
    for r in it:
        out.append(r)
        if len(out) >= n:
            break
    return out


def source_cache_key(spec: SourceSpec, cfg: DataConfig, tokenizer: Any) -> str | None:
    ident = sources.identity(spec.path, spec.split)
    if ident is None:
        return None
    val_ident = sources.identity(cfg.validation_dataset, "validation") if cfg.validation_dataset else ""
    if val_ident is None:
        return None
    template = cfg.template
    if load_user_template(template) and Path(template).expanduser().is_file():
        template = Path(template).expanduser().read_text(encoding="utf-8")
    settings = {k: getattr(cfg, k) for k in ("max_length", "train_on_inputs", "system_prompt", "validation_split",
                                              "max_eval_samples", "skip_invalid", "seed", "memory_map")}
    return cache.cache_key(source=ident, spec=dataclasses.asdict(spec), validation=val_ident, template=template,
                           settings=settings, tokenizer=cache.tokenizer_fingerprint(tokenizer),
                           code=cache.code_fingerprint())


def load_source(spec: SourceSpec, cfg: DataConfig, tokenizer: Any) -> SourceData:
    """Read, split and tokenize one source, through the tokenization cache when `cfg.cache` is on."""
    use_cache = getattr(cfg, "cache", True) or cfg.memory_map
    key = source_cache_key(spec, cfg, tokenizer) if use_cache else None
    if key and getattr(cfg, "cache", True) and (hit := cache.lookup(key)):
        return from_cache(hit, streaming=cfg.memory_map)
    if cfg.memory_map:
        # The store is the streaming backing; with an uncachable source (custom:) it is a one-off entry.
        key = key or cache.cache_key(once=random.random())
        return _stream_into_store(spec, cfg, tokenizer, key, cached=getattr(cfg, "cache", True))
    data = _load_in_memory(spec, cfg, tokenizer)
    if key:
        entry = cache.CacheEntry(key)
        try:
            for split, examples in (("train", data.train), ("validation", data.validation)):
                for e in examples:
                    entry.writers[split].add(e)
            entry.commit(_meta(data))
        except OSError:  # a full or read-only disk must not stop training: run uncached
            entry.abort()
        for s in data.stats.values():
            s.cache = "miss"
    return data


def load_stream(spec: SourceSpec, cfg: DataConfig, tokenizer: Any) -> SourceData:
    """Streaming mode: the training split as a `TrainStream`, read as training goes; the held-out examples
    (split.py's streaming rule, at most max_eval_samples or STREAM_EVAL_RECORDS records) tokenized now."""
    # Imported here: stream.py builds on torch's IterableDataset, and the preview and cached paths, which
    # import this module, answer in seconds because they never import torch.
    from loraforge.data.stream import TrainStream, held_out, stream_config

    fmt = resolve_format(spec.format, first_records(sources.iter_source(spec.path, spec.split, streaming=True), 50),
                         spec.column_mapping)
    oasst = fmt == "oasst"  # message rows: streamed a tree at a time, as conversations
    fmt = "chat" if oasst else fmt
    if fmt == "auto":
        raise DataError(f"data.dataset: {spec.path!r}: no readable record among its first 50 tells the format; "
                        "set data.format, or check the records.")
    scfg = stream_config(cfg, spec.max_samples or cfg.max_samples)
    train = TrainStream(spec.path, spec.split, fmt, spec.column_mapping, scfg, tokenizer, oasst)
    limit = cfg.max_eval_samples or STREAM_EVAL_RECORDS
    validation, val_records, val_stats = held_out(spec.path, spec.split, fmt, spec.column_mapping, scfg, tokenizer,
                                                  limit, oasst)
    note = ("streaming: training records are read and tokenized as training goes, so they are not counted up "
            "front; packing (when on) happens in the stream")
    stats = {"train": DataStats(notes=[note]), "validation": val_stats}
    return SourceData(train, validation, fmt, _kind(fmt), stats, _dedupe(val_records)[:EVAL_RECORDS_KEPT])


def _load_in_memory(spec: SourceSpec, cfg: DataConfig, tokenizer: Any) -> SourceData:
    raw = read_source(spec.path, spec.split)
    if not raw:
        raise DataError(f"data.dataset: {spec.path!r} holds no records.")
    fmt = resolve_format(spec.format, raw, spec.column_mapping)
    notes: list[str] = []
    if spec.path == chitchat.NAME:
        notes.append(chitchat.coverage_note())
    if fmt == "oasst":
        raw, notes = oasst_conversations(raw)
        fmt = "chat"
    if cfg.validation_dataset:
        train_raw = raw
        val_raw = read_source(cfg.validation_dataset, "validation")
        if spec.format == "oasst" or resolve_format("auto", val_raw[:1]) == "oasst":
            val_raw, _ = oasst_conversations(val_raw)
    else:
        train_raw, val_raw = split_records(raw, cfg)
    max_train = spec.max_samples or cfg.max_samples
    if max_train and len(train_raw) > max_train:
        notes.append(f"data.max_samples: used the first {max_train} of {len(train_raw)} training records")
        train_raw = train_raw[:max_train]
    if cfg.max_eval_samples and len(val_raw) > cfg.max_eval_samples:
        val_raw = val_raw[: cfg.max_eval_samples]
    stats = {"train": DataStats(notes=notes), "validation": DataStats()}
    train, _ = tokenize_records(train_raw, cfg, tokenizer, fmt, stats["train"], spec.column_mapping)
    validation, val_records = tokenize_records(val_raw, cfg, tokenizer, fmt, stats["validation"],
                                               spec.column_mapping)
    eval_records = _dedupe(val_records)[:EVAL_RECORDS_KEPT]
    return SourceData(train, validation, fmt, _kind(fmt), stats, eval_records)


def _stream_into_store(spec: SourceSpec, cfg: DataConfig, tokenizer: Any, key: str, cached: bool) -> SourceData:
    entry = cache.CacheEntry(key)
    fmt = spec.format
    if fmt == "auto":
        fmt = resolve_format("auto", first_records(sources.iter_source(spec.path, spec.split), 50), spec.column_mapping)
    scfg = dataclasses.replace(cfg, max_samples=spec.max_samples or cfg.max_samples, sources=[])
    stats = {}
    eval_records: list[dict[str, Any]] = []
    try:
        for split in ("train", "validation"):
            if split == "validation" and cfg.validation_dataset:
                stream = StreamingExamples(cfg.validation_dataset, dataclasses.replace(scfg, validation_split=1.0),
                                           tokenizer, "validation", fmt=fmt, column_mapping=spec.column_mapping,
                                           data_split="validation")
            else:
                train_cfg = dataclasses.replace(scfg, validation_split=0.0) if cfg.validation_dataset else scfg
                stream = StreamingExamples(spec.path, train_cfg, tokenizer, split, fmt=fmt,
                                           column_mapping=spec.column_mapping, data_split=spec.split)
            for example, norm in iter_examples(stream.raw(), stream.cfg, tokenizer, fmt, stream.stats,
                                               spec.column_mapping):
                entry.writers[split].add(example)
                if split == "validation" and len(eval_records) < EVAL_RECORDS_KEPT:
                    if not eval_records or eval_records[-1] is not norm:
                        eval_records.append(norm)
            stats[split] = stream.stats
    except BaseException:
        entry.abort()
        raise
    data = SourceData([], [], fmt, _kind(fmt), stats, eval_records)
    path = entry.commit(_meta(data))
    result = from_cache(path, streaming=True)
    for s in result.stats.values():
        s.cache = "miss" if cached else "off"
    return result


def _meta(data: SourceData) -> dict[str, Any]:
    return {"fmt": data.fmt, "kind": data.kind, "eval_records": data.eval_records,
            "stats": {k: dataclasses.asdict(v) for k, v in data.stats.items()}}


def from_cache(path: Path, streaming: bool) -> SourceData:
    meta = json.loads((path / "meta.json").read_text(encoding="utf-8"))
    splits = {s: cache.TokenStore(path / s) for s in ("train", "validation")}
    stats = {k: DataStats(**v) for k, v in meta["stats"].items()}
    for s in stats.values():
        s.cache = "hit"
    if not streaming:
        splits = {k: list(v) for k, v in splits.items()}
    return SourceData(splits["train"], splits["validation"], meta["fmt"], meta["kind"], stats, meta["eval_records"])


def _kind(fmt: str) -> str:
    return KIND_OF_FORMAT.get(fmt, "chat") if fmt != "auto" else "chat"


def _dedupe(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for r in records:  # a text split into blocks repeats its record; keep one
        if not out or out[-1] is not r:
            out.append(r)
    return out
