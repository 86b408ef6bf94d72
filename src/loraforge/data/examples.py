"""Records → tokenized examples: normalize each record, render it with its template, tokenize with label
masks, and count into `DataStats` what happened to it (used, truncated, skipped as invalid, dropped for
having no trainable token). Nothing is dropped without being counted."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from loraforge import progress
from loraforge.config import DataConfig
from loraforge.data.records import InvalidRecord, RawRecord, normalize
from loraforge.data.templates import alpaca_segments, chat_segments, load_user_template
from loraforge.data.tokenize import IGNORE_INDEX, encode_segments
from loraforge.data.types import DataStats
from loraforge.errors import DataError


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
        examples, norm = record_examples(rec, cfg, tokenizer, fmt, stats, column_mapping, user_template)
        for e in examples:
            yield e, norm


def skip_or_raise(e: InvalidRecord, cfg: DataConfig, stats: DataStats) -> None:
    """A bad record: the DataError naming its file, record and field, unless `data.skip_invalid` (then it
    is counted and its message kept for the log)."""
    if not cfg.skip_invalid:
        raise DataError(f"{e} (set data.skip_invalid=true to skip and count such records)") from None
    stats.skipped_invalid += 1
    if len(stats.first_errors) < 5:
        stats.first_errors.append(str(e))


def with_system_prompt(norm: dict, system_prompt: str | None) -> dict:
    """`data.system_prompt` as the first message of a chat record that has no system message of its own."""
    if "messages" in norm and system_prompt and norm["messages"][0]["role"] != "system":
        norm["messages"] = [{"role": "system", "content": system_prompt}, *norm["messages"]]
    return norm


def record_examples(rec: RawRecord, cfg: DataConfig, tokenizer: Any, fmt: str, stats: DataStats,
                    column_mapping: dict[str, str] | None,
                    user_template: str | None) -> tuple[list[dict[str, list[int]]], dict | None]:
    """One raw record → (its tokenized examples, its normalized record), counted into `stats`. No examples
    when it is skipped as invalid or dropped; the streaming path (stream.py) tokenizes with this too."""
    stats.read += 1
    progress.count()  # a step of the dataset's tokenizing bar, when one is open (pipeline.build_datasets)
    try:
        norm = with_system_prompt(normalize(rec.data, fmt, rec.where, column_mapping), cfg.system_prompt)
    except InvalidRecord as e:
        skip_or_raise(e, cfg, stats)
        return [], None
    examples, truncated = encode_record(norm, cfg, tokenizer, user_template)
    stats.truncated += truncated
    # An example with no scored label gives a 0/0 = NaN loss: e.g. a conversation truncated before its
    # first assistant turn. Drop it here and count it, rather than let it poison a batch. (Position 0
    # is never scored: the model predicts token t from the tokens before it.)
    examples = [e for e in examples if any(v != IGNORE_INDEX for v in e["labels"][1:])]
    if not examples:
        stats.dropped_no_labels += 1
        return [], norm
    stats.used += 1
    stats.examples += len(examples)
    return examples, norm


def tokenize_records(raw: Iterable[RawRecord], cfg: DataConfig, tokenizer: Any, fmt: str, stats: DataStats,
                     column_mapping: dict[str, str] | None = None) -> tuple[list[dict], list[dict]]:
    """Normalize and tokenize; returns (tokenized examples, normalized records kept, one per example)."""
    if hasattr(raw, "__len__"):
        progress.expect(len(raw))  # the tokenizing bar's total: one step a record (record_examples)
    out, kept = [], []
    for example, norm in iter_examples(raw, cfg, tokenizer, fmt, stats, column_mapping):
        out.append(example)
        kept.append(norm)
    return out, kept
