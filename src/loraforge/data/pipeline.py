"""From `DataConfig` to tokenized train/validation sets, with an account of every record.

`build_datasets` reads the configured source, splits it (seeded, reproducible), renders each record with
its template, tokenizes with label masks, and counts what happened: read, used, truncated, skipped as
invalid, dropped for having no trainable token. Nothing is dropped without being counted.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loraforge.config import DataConfig
from loraforge.data import chitchat
from loraforge.data.records import KIND_OF_FORMAT, InvalidRecord, RawRecord, detect_format, normalize, read_json_file
from loraforge.data.templates import alpaca_segments, chat_segments, load_user_template, prompt_formatter
from loraforge.data.tokenize import encode_segments
from loraforge.errors import DataError


@dataclass
class DataStats:
    read: int = 0
    used: int = 0
    truncated: int = 0
    skipped_invalid: int = 0
    dropped_no_labels: int = 0
    first_errors: list[str] = field(default_factory=list)
    sources: dict[str, int] = field(default_factory=dict)

    def line(self, split: str) -> str:
        return (f"{split}: {self.read} records read, {self.used} used, {self.truncated} truncated, "
                f"{self.skipped_invalid} skipped as invalid, {self.dropped_no_labels} dropped (no trainable token "
                "within max_length)")


@dataclass
class DataBundle:
    """Tokenized examples ({"input_ids", "labels"} dicts) plus what generation-time evaluation needs."""

    train: list[dict[str, list[int]]]
    validation: list[dict[str, list[int]]]
    kind: str  # alpaca | chat | text — decides the prompt formatter used for generation
    eval_pairs: list[tuple[Any, str]]  # held-out (prompt, reference): a str or a list of chat messages
    stats: dict[str, DataStats]
    formatter: Any = None


def read_source(path: str, split: str = "train") -> list[RawRecord]:
    """Read all raw records of a source. (Streaming sources do not pass through here.)"""
    if path == chitchat.NAME:
        return [RawRecord({"messages": m}, f"chitchat:{cid}", i) for i, (cid, m) in enumerate(chitchat.load_chitchat())]
    p = Path(path).expanduser()
    if p.is_file():
        if p.suffix in (".json", ".jsonl"):
            return list(read_json_file(p))
        if p.suffix == ".txt":
            return [RawRecord({"text": p.read_text(encoding="utf-8")}, str(p), 1)]
        from loraforge.data import sources  # csv / parquet / others

        return list(sources.read_file(p))
    from loraforge.data import sources

    return list(sources.read_dataset(path, split))


def _segments_for(record: dict[str, Any], tokenizer: Any, user_template: str | None):
    if "messages" in record:
        return chat_segments(record["messages"], tokenizer), False, False
    if "instruction" in record:
        return alpaca_segments(record, user_template), True, True
    return [(record["text"], True)], True, True


def tokenize_records(raw: list[RawRecord], cfg: DataConfig, tokenizer: Any, fmt: str, stats: DataStats,
                     column_mapping: dict[str, str] | None = None) -> tuple[list[dict], list[dict]]:
    """Normalize and tokenize; returns (tokenized examples, normalized records kept)."""
    user_template = load_user_template(cfg.template)
    out, kept = [], []
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
        segments, special, eos = _segments_for(norm, tokenizer, user_template)
        enc = encode_segments(segments, tokenizer, cfg.max_length, train_on_inputs=cfg.train_on_inputs,
                              add_special_tokens=special, append_eos=eos)
        stats.truncated += enc.truncated
        # An example with no labelled token gives a 0/0 = NaN loss: e.g. a conversation truncated before
        # its first assistant turn. Drop it here and count it, rather than let it poison a batch.
        if enc.num_labels == 0:
            stats.dropped_no_labels += 1
            continue
        stats.used += 1
        out.append({"input_ids": enc.input_ids, "labels": enc.labels})
        kept.append(norm)
    return out, kept


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


def _split(raw: list[RawRecord], cfg: DataConfig) -> tuple[list[RawRecord], list[RawRecord]]:
    order = list(range(len(raw)))
    random.Random(cfg.seed).shuffle(order)
    n_val = int(round(len(raw) * cfg.validation_split)) if cfg.validation_split > 0 else 0
    if cfg.validation_split > 0 and len(raw) > 1:
        n_val = max(1, n_val)
    val_idx, train_idx = order[:n_val], order[n_val:]
    return [raw[i] for i in train_idx], [raw[i] for i in val_idx]


def build_datasets(cfg: DataConfig, tokenizer: Any, num_eval_pairs: int = 8) -> DataBundle:
    """Read, split, tokenize. Combined mode (cfg.sources) is handled by data/mixing.py."""
    if cfg.sources:
        from loraforge.data.mixing import build_mixed

        return build_mixed(cfg, tokenizer, num_eval_pairs)
    raw = read_source(cfg.dataset, cfg.split)
    if not raw:
        raise DataError(f"data.dataset: {cfg.dataset!r} holds no records.")
    fmt = cfg.format
    if fmt == "auto":
        first = next((r for r in raw if not isinstance(r.data, InvalidRecord)), raw[0])
        fmt = detect_format(first.data, first.where) if not isinstance(first.data, InvalidRecord) else "auto"
    if cfg.validation_dataset:
        train_raw, val_raw = raw, read_source(cfg.validation_dataset, "validation")
    else:
        train_raw, val_raw = _split(raw, cfg)
    if cfg.max_samples:
        train_raw = train_raw[: cfg.max_samples]
    if cfg.max_eval_samples:
        val_raw = val_raw[: cfg.max_eval_samples]
    stats = {"train": DataStats(), "validation": DataStats()}
    train, _ = tokenize_records(train_raw, cfg, tokenizer, fmt, stats["train"], cfg.column_mapping)
    validation, val_records = tokenize_records(val_raw, cfg, tokenizer, fmt, stats["validation"], cfg.column_mapping)
    if not train:
        raise DataError(f"data.dataset: no usable training example in {cfg.dataset!r} "
                        f"({stats['train'].line('train')}). Check data.max_length and the records' fields.")
    kind = KIND_OF_FORMAT.get(fmt, "chat") if fmt != "auto" else "chat"
    pairs = make_eval_pairs(val_records, num_eval_pairs, cfg.seed)
    formatter = prompt_formatter(kind, tokenizer, load_user_template(cfg.template), cfg.system_prompt)
    return DataBundle(train, validation, kind, pairs, stats, formatter)


def read_counts(records: list[dict[str, Any]]) -> Counter:
    return Counter("messages" if "messages" in r else "instruction" if "instruction" in r else "text" for r in records)
