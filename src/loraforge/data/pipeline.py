"""From `DataConfig` to tokenized train/validation sets, with an account of every record.

`build_datasets` reads the configured source, splits it (seeded, reproducible), renders each record with
its template, tokenizes with label masks, and counts what happened: read, used, truncated, skipped as
invalid, dropped for having no trainable token. Nothing is dropped without being counted.

One source becomes a `SourceData` through `load_source`, which consults the tokenization cache first
(cache.py). In memory mode the records are read whole, shuffled and split by count; in streaming mode
(`data.streaming`) they are read one at a time, each record goes to validation by a seeded hash of its
index, and the examples are written straight into an on-disk `TokenStore` the trainer indexes lazily.
Combined mode (`data.sources`) loads each source this way and mixes them (mixing.py). Packing
(`data.packing`) is applied to the training split last.
"""

from __future__ import annotations

import dataclasses
import random
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loraforge.config import DataConfig
from loraforge.data import cache, sources
from loraforge.data.records import (
    KIND_OF_FORMAT,
    InvalidRecord,
    RawRecord,
    detect_format,
    normalize,
    oasst_conversations,
)
from loraforge.data.templates import alpaca_segments, chat_segments, load_user_template, prompt_formatter
from loraforge.data.tokenize import IGNORE_INDEX, encode_segments
from loraforge.errors import DataError

EVAL_RECORDS_KEPT = 64  # normalized validation records kept (and cached) for generation-time evaluation


@dataclass
class DataStats:
    read: int = 0
    used: int = 0
    truncated: int = 0
    skipped_invalid: int = 0
    dropped_no_labels: int = 0
    examples: int = 0  # tokenized examples made (a long raw text gives several blocks)
    packed_rows: int | None = None  # rows after packing, when data.packing is on
    cache: str = "off"  # hit | miss | off
    first_errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    sources: dict[str, int] = field(default_factory=dict)  # combined mode: examples drawn per source
    mix: dict[str, dict[str, Any]] = field(default_factory=dict)  # combined mode: the mix actually used

    def line(self, split: str) -> str:
        text = (f"{split}: {self.read} records read, {self.used} used, {self.truncated} truncated, "
                f"{self.skipped_invalid} skipped as invalid, {self.dropped_no_labels} dropped (no trainable token "
                f"within max_length); {self.examples} examples")
        if self.packed_rows is not None:
            text += f" packed into {self.packed_rows} rows"
        text += f"; tokenization cache {self.cache}"
        for name, m in self.mix.items():
            text += (f"\n      mix {name}: {m['records']} examples → {m['drawn']} drawn "
                     f"({100 * m['share']:.1f}% of the split)")
        for note in self.notes:
            text += f"\n      note: {note}"
        return text

    def add(self, other: DataStats) -> None:
        for name in ("read", "used", "truncated", "skipped_invalid", "dropped_no_labels", "examples"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.first_errors += other.first_errors[: max(0, 5 - len(self.first_errors))]
        self.notes += other.notes


@dataclass
class DataBundle:
    """Tokenized examples ({"input_ids", "labels"} dicts; packed rows add "position_ids") plus what
    generation-time evaluation needs. `train`/`validation` are lists, or in streaming mode lazily indexed
    on-disk sequences (`TokenStore`, supporting len, [i] and iteration; `.lengths` gives every length)."""

    train: Sequence[dict[str, list[int]]]
    validation: Sequence[dict[str, list[int]]]
    kind: str  # alpaca | chat | text — decides the prompt formatter used for generation
    eval_pairs: list[tuple[Any, str]]  # held-out (prompt, reference): a str or a list of chat messages
    stats: dict[str, DataStats]
    formatter: Any = None


@dataclass
class SourceData:
    """One source, tokenized and split."""

    train: Sequence[dict[str, list[int]]]
    validation: Sequence[dict[str, list[int]]]
    fmt: str
    kind: str
    stats: dict[str, DataStats]
    eval_records: list[dict[str, Any]]


# ------------------------------------------------------------------------------------------- reading


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


def split_records(raw: list[RawRecord], cfg: DataConfig) -> tuple[list[RawRecord], list[RawRecord]]:
    """Seeded shuffle, then the first `validation_split` share is validation (at least 1 when > 0)."""
    order = list(range(len(raw)))
    random.Random(cfg.seed).shuffle(order)
    n_val = int(round(len(raw) * cfg.validation_split)) if cfg.validation_split > 0 else 0
    if cfg.validation_split > 0 and len(raw) > 1:
        n_val = max(1, n_val)
    val_idx, train_idx = order[:n_val], order[n_val:]
    return [raw[i] for i in train_idx], [raw[i] for i in val_idx]


_split = split_records  # the foundation's name


def in_validation(index: int, cfg: DataConfig) -> bool:
    """Streaming split: a seeded hash of the record's position, so no record list is needed."""
    return zlib.crc32(f"{cfg.seed}:{index}".encode()) / 2**32 < cfg.validation_split


# ------------------------------------------------------------------------------------------- tokenizing


def _segments_for(record: dict[str, Any], tokenizer: Any, user_template: str | None):
    if "messages" in record:
        return chat_segments(record["messages"], tokenizer), False, False
    if "instruction" in record:
        return alpaca_segments(record, user_template), True, True
    return [(record["text"], True)], True, True


def encode_record(norm: dict[str, Any], cfg: DataConfig, tokenizer: Any,
                  user_template: str | None) -> tuple[list[dict[str, list[int]]], bool]:
    """One normalized record → (examples, truncated). Raw text longer than max_length is cut into blocks
    that overlap by one token, so every token after the first is predicted exactly once."""
    segments, special, eos = _segments_for(norm, tokenizer, user_template)
    if "text" in norm:
        enc = encode_segments(segments, tokenizer, 2**62, train_on_inputs=True, add_special_tokens=special,
                              append_eos=eos)
        n, step = len(enc.input_ids), cfg.max_length - 1
        return [{"input_ids": enc.input_ids[s:s + cfg.max_length], "labels": enc.labels[s:s + cfg.max_length]}
                for s in range(0, max(1, n - 1), step)], False
    enc = encode_segments(segments, tokenizer, cfg.max_length, train_on_inputs=cfg.train_on_inputs,
                          add_special_tokens=special, append_eos=eos)
    return [{"input_ids": enc.input_ids, "labels": enc.labels}], enc.truncated


def iter_examples(raw: Iterable[RawRecord], cfg: DataConfig, tokenizer: Any, fmt: str, stats: DataStats,
                  column_mapping: dict[str, str] | None = None) -> Iterator[tuple[dict[str, list[int]], dict]]:
    """Normalize and tokenize lazily, counting into `stats`; yields (example, normalized record)."""
    user_template = load_user_template(cfg.template)
    for rec in raw:
        stats.read += 1
        try:
            norm = normalize(rec.data, fmt, rec.where, column_mapping)
        except InvalidRecord as e:
            if not cfg.skip_invalid:
                raise DataError(f"{e} (set data.skip_invalid=true to skip and count such records)") from None
            stats.skipped_invalid += 1
            if len(stats.first_errors) < 5:
                stats.first_errors.append(str(e))
            continue
        if "messages" in norm and cfg.system_prompt and norm["messages"][0]["role"] != "system":
            norm["messages"] = [{"role": "system", "content": cfg.system_prompt}, *norm["messages"]]
        examples, truncated = encode_record(norm, cfg, tokenizer, user_template)
        stats.truncated += truncated
        # An example with no scored label gives a 0/0 = NaN loss: e.g. a conversation truncated before its
        # first assistant turn. Drop it here and count it, rather than let it poison a batch. (Position 0
        # is never scored: the model predicts token t from the tokens before it.)
        examples = [e for e in examples if any(v != IGNORE_INDEX for v in e["labels"][1:])]
        if not examples:
            stats.dropped_no_labels += 1
            continue
        stats.used += 1
        stats.examples += len(examples)
        for e in examples:
            yield e, norm


def tokenize_records(raw: Iterable[RawRecord], cfg: DataConfig, tokenizer: Any, fmt: str, stats: DataStats,
                     column_mapping: dict[str, str] | None = None) -> tuple[list[dict], list[dict]]:
    """Normalize and tokenize; returns (tokenized examples, normalized records kept, one per example)."""
    out, kept = [], []
    for example, norm in iter_examples(raw, cfg, tokenizer, fmt, stats, column_mapping):
        out.append(example)
        kept.append(norm)
    return out, kept


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
            raise DataError(f"{self.source}: OpenAssistant trees cannot be streamed (a tree needs all its rows); "
                            "set data.streaming=false.")
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


# ------------------------------------------------------------------------------------------- one source


@dataclass(frozen=True)
class SourceSpec:
    path: str
    format: str = "auto"
    column_mapping: dict[str, str] | None = None
    split: str = "train"
    max_samples: int | None = None


def source_cache_key(spec: SourceSpec, cfg: DataConfig, tokenizer: Any) -> str | None:
    ident = sources.identity(spec.path, spec.split)
    if ident is None:
        return None
    val_ident = sources.identity(cfg.validation_dataset, "validation") if cfg.validation_dataset else ""
    if val_ident is None:
        return None
    template = cfg.template
    if load_user_template(template) and Path(template).expanduser().is_file():
        template = Path(template).expanduser().read_text()
    settings = {k: getattr(cfg, k) for k in ("max_length", "train_on_inputs", "system_prompt", "validation_split",
                                              "max_eval_samples", "skip_invalid", "seed", "streaming")}
    return cache.cache_key(source=ident, spec=dataclasses.asdict(spec), validation=val_ident, template=template,
                           settings=settings, tokenizer=cache.tokenizer_fingerprint(tokenizer),
                           code=cache.code_fingerprint())


def load_source(spec: SourceSpec, cfg: DataConfig, tokenizer: Any) -> SourceData:
    """Read, split and tokenize one source, through the tokenization cache when `cfg.cache` is on."""
    use_cache = getattr(cfg, "cache", True) or cfg.streaming
    key = source_cache_key(spec, cfg, tokenizer) if use_cache else None
    if key and getattr(cfg, "cache", True) and (hit := cache.lookup(key)):
        return from_cache(hit, streaming=cfg.streaming)
    if cfg.streaming:
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


def _load_in_memory(spec: SourceSpec, cfg: DataConfig, tokenizer: Any) -> SourceData:
    raw = read_source(spec.path, spec.split)
    if not raw:
        raise DataError(f"data.dataset: {spec.path!r} holds no records.")
    fmt = resolve_format(spec.format, raw, spec.column_mapping)
    notes: list[str] = []
    if spec.path == "chitchat":
        from loraforge.data import chitchat

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
    import json

    meta = json.loads((path / "meta.json").read_text())
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


# ------------------------------------------------------------------------------------------- the bundle


def make_eval_pairs(records: list[dict[str, Any]], n: int, seed: int) -> list[tuple[Any, str]]:
    """Held-out (prompt, reference) pairs: for chat, the conversation up to one assistant turn."""
    rng = random.Random(seed)
    pairs: list[tuple[Any, str]] = []
    for rec in records:
        if len(pairs) >= n:
            break
        if "instruction" in rec:
            pairs.append((rec["instruction"] if not rec["input"] else rec, rec["output"]))
        elif "messages" in rec:
            turns = [i for i, m in enumerate(rec["messages"]) if m["role"] == "assistant" and m["content"].strip()]
            if turns:
                i = rng.choice(turns[:3])  # an early turn keeps the prompt short
                pairs.append((rec["messages"][:i], rec["messages"][i]["content"]))
    return pairs


def finish_train_split(train: Sequence[dict], cfg: DataConfig, stats: DataStats) -> Sequence[dict]:
    """Packing, when on, is the last step (after mixing): rows of whole examples, ≤ max_length each."""
    if not cfg.packing:
        return train
    from loraforge.data.packing import pack_dataset

    lengths = getattr(train, "lengths", None)
    packed = pack_dataset(train, cfg.max_length, lengths)
    stats.packed_rows = len(packed)
    return packed


def build_datasets(cfg: DataConfig, tokenizer: Any, num_eval_pairs: int = 8) -> DataBundle:
    """Read, split, tokenize (or take from the cache), pack. Combined mode is in data/mixing.py."""
    if cfg.sources:
        from loraforge.data.mixing import build_mixed

        return build_mixed(cfg, tokenizer, num_eval_pairs)
    spec = SourceSpec(cfg.dataset, cfg.format, cfg.column_mapping, cfg.split, cfg.max_samples)
    data = load_source(spec, cfg, tokenizer)
    if not len(data.train):
        raise DataError(f"data.dataset: no usable training example in {cfg.dataset!r} "
                        f"({data.stats['train'].line('train')}). Check data.max_length and the records' fields.")
    train = finish_train_split(data.train, cfg, data.stats["train"])
    pairs = make_eval_pairs(data.eval_records, num_eval_pairs, cfg.seed)
    formatter = prompt_formatter(data.kind, tokenizer, load_user_template(cfg.template), cfg.system_prompt)
    return DataBundle(train, data.validation, data.kind, pairs, data.stats, formatter)


def read_counts(records: list[dict[str, Any]]) -> Counter:
    return Counter("messages" if "messages" in r else "instruction" if "instruction" in r else "text" for r in records)
