"""Preference pairs: records of a prompt with a chosen and a rejected answer, tokenized for DPO / ORPO.

Layouts read (the first record's fields decide nothing: each record is read by the fields it has):
  strings:  {"prompt": str, "chosen": str, "rejected": str}                   (Anthropic-HH / UltraFeedback)
  chat:     {"chosen": [messages], "rejected": [messages]}, the two lists sharing their prompt messages and
            each ending in one assistant reply; or "prompt" as a message list with the answers as strings
            (or one-message lists)
  alpaca:   {"instruction": str, "input": str (optional), "chosen": str, "rejected": str}
The answers are always called `chosen` and `rejected` (`data.column_mapping` renames other columns, e.g.
{output_chosen: chosen, output_rejected: rejected}).

Each side is rendered with the templates supervised training uses (templates.py), so a DPO run after an SFT
run sees exactly SFT's prompt: the model's chat template for chat and string prompts (the Alpaca template
when `data.template: alpaca`, or a user template), the Alpaca template for instruction records. Labels mask
the prompt: only the final answer's tokens (with the end-of-turn marker or EOS that SFT also trains) count.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from loraforge import progress
from loraforge.config import DataConfig
from loraforge.data import chitchat
from loraforge.data.collate import PadCollator
from loraforge.data.examples import skip_or_raise, with_system_prompt
from loraforge.data.records import InvalidRecord, RawRecord, normalize_messages
from loraforge.data.sources import iter_source
from loraforge.data.split import split_records
from loraforge.data.templates import alpaca_segments, chat_segments, load_user_template, prompt_formatter
from loraforge.data.tokenize import IGNORE_INDEX, encode_segments
from loraforge.data.types import DataStats
from loraforge.errors import ConfigError, DataError

Pair = dict[str, dict[str, list[int]]]  # {"chosen": {"input_ids", "labels"}, "rejected": {...}}


class PairSet(list):
    """Tokenized pairs; `lengths` (the longer side of each pair) lets the batch sampler group by length."""

    @property
    def lengths(self) -> list[int]:
        return [max(len(p["chosen"]["input_ids"]), len(p["rejected"]["input_ids"])) for p in self]


@dataclass
class PreferenceData:
    """What the trainer reads from a data bundle (see types.DataBundle), for pairs."""

    train: PairSet
    validation: PairSet
    kind: str  # alpaca | chat: the prompt formatter used for generation
    stats: dict[str, DataStats]
    formatter: Any = None
    eval_pairs: list[tuple[Any, str]] = field(default_factory=list)  # no generation metrics for pairs
    validation_records: list[dict[str, Any]] = field(default_factory=list)  # normalized, for the demo's report


class PairCollator:
    """A batch of pairs as ONE padded batch of 2B rows: rows 0..B-1 the chosen sides, B..2B-1 the rejected
    ones, so both go through the model in one forward."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None):
        self.pad = PadCollator(pad_token_id, pad_to_multiple_of)

    def __call__(self, pairs: list[Pair]) -> dict[str, Any]:
        return self.pad([p["chosen"] for p in pairs] + [p["rejected"] for p in pairs])


# ------------------------------------------------------------------------------------------- normalizing


def _answer(value: Any, where: str, name: str) -> str:
    """An answer as text: a string, or a list holding one assistant message."""
    if value is None:
        raise InvalidRecord(f"{where}: missing field '{name}' (a preference pair needs 'chosen' and 'rejected').")
    if isinstance(value, list):
        messages = normalize_messages(value, where, name)
        if len(messages) != 1 or messages[0]["role"] != "assistant":
            raise InvalidRecord(f"{where}: field '{name}' must end in one assistant reply after the prompt.")
        value = messages[0]["content"]
    if not isinstance(value, str):
        raise InvalidRecord(f"{where}: field '{name}' must be a string or a message list, got {type(value).__name__}.")
    if not value.strip():
        raise InvalidRecord(f"{where}: field '{name}' is empty.")
    return value


def _split_chat(chosen: list, rejected: list, where: str) -> tuple[list[dict[str, str]], Any, Any]:
    """Two message lists → (their shared prompt messages, chosen tail, rejected tail)."""
    c, r = normalize_messages(chosen, where, "chosen"), normalize_messages(rejected, where, "rejected")
    n = 0
    while n < min(len(c), len(r)) and c[n] == r[n]:
        n += 1
    return c[:n], c[n:], r[n:]


def normalize_pair(record: Any, where: str, template: str, column_mapping: dict[str, str] | None = None
                   ) -> dict[str, Any]:
    """Raw record → {"instruction", "input", "chosen", "rejected"} (alpaca) or {"messages", "chosen",
    "rejected"} (chat: `messages` is the prompt). Raises InvalidRecord naming the record and field."""
    if isinstance(record, InvalidRecord):
        raise record
    if not isinstance(record, dict):
        raise InvalidRecord(f"{where}: a preference record must be a JSON object, got {type(record).__name__}.")
    if column_mapping:
        record = {column_mapping.get(k, k): v for k, v in record.items()}
    for name in ("chosen", "rejected"):
        if record.get(name) is None:
            raise InvalidRecord(f"{where}: missing field '{name}' (a preference pair needs a prompt, 'chosen' and "
                                f"'rejected'; fields found: {sorted(record)}).")
    chosen, rejected, prompt = record["chosen"], record["rejected"], record.get("prompt")
    if "instruction" in record:
        instruction, inp = record["instruction"], record.get("input") or ""
        if not isinstance(instruction, str) or not instruction.strip():
            raise InvalidRecord(f"{where}: field 'instruction' must be a non-empty string.")
        if not isinstance(inp, str):
            raise InvalidRecord(f"{where}: field 'input' must be a string, got {type(inp).__name__}.")
        norm: dict[str, Any] = {"instruction": instruction, "input": inp}
    elif isinstance(chosen, list) and isinstance(rejected, list) and (prompt is None or len(chosen) > 1):
        shared, chosen, rejected = _split_chat(chosen, rejected, where)
        if not shared and isinstance(prompt, str) and prompt.strip():
            shared = [{"role": "user", "content": prompt}]
        elif not shared and prompt is not None:
            shared = normalize_messages(prompt, where, "prompt", need_answer=False)
        if not chosen or not rejected:
            raise InvalidRecord(f"{where}: fields 'chosen' and 'rejected' are identical: a pair needs two "
                                "different answers.")
        if not shared:
            raise InvalidRecord(f"{where}: fields 'chosen' and 'rejected' share no prompt message (give the prompt "
                                "as their common first messages, or as field 'prompt').")
        norm = {"messages": shared}
    elif prompt is None:
        raise InvalidRecord(f"{where}: missing field 'prompt' (or 'instruction').")
    elif isinstance(prompt, str):
        if not prompt.strip():
            raise InvalidRecord(f"{where}: field 'prompt' is empty.")
        if template in ("auto", "chat"):
            norm = {"messages": [{"role": "user", "content": prompt}]}
        else:  # data.template: alpaca, or a user template written for Alpaca's fields
            norm = {"instruction": prompt, "input": ""}
    else:
        norm = {"messages": normalize_messages(prompt, where, "prompt", need_answer=False)}
    if "messages" in norm and norm["messages"][-1]["role"] == "assistant":
        raise InvalidRecord(f"{where}: field 'prompt' ends with an assistant message; it must end with the turn "
                            "the answers reply to.")
    norm["chosen"], norm["rejected"] = _answer(chosen, where, "chosen"), _answer(rejected, where, "rejected")
    if norm["chosen"].strip() == norm["rejected"].strip():
        raise InvalidRecord(f"{where}: fields 'chosen' and 'rejected' are identical: a pair needs two different "
                            "answers.")
    return norm


# ------------------------------------------------------------------------------------------- tokenizing


def _side(norm: dict[str, Any], answer: str, tokenizer: Any, user_template: str | None):
    """(segments, add special tokens, append EOS) of one side, as SFT renders the same example."""
    if "messages" in norm:
        segments = chat_segments(norm["messages"] + [{"role": "assistant", "content": answer}], tokenizer)
        # Only the last reply is the answer: earlier assistant turns in the prompt are context here.
        last = max(i for i, (_, trained) in enumerate(segments) if trained)
        return [(text, trained and i == last) for i, (text, trained) in enumerate(segments)], False, False
    example = {"instruction": norm["instruction"], "input": norm["input"], "output": answer}
    return alpaca_segments(example, user_template), True, True


def encode_pair(norm: dict[str, Any], cfg: DataConfig, tokenizer: Any, user_template: str | None,
                where: str) -> tuple[Pair, bool]:
    """Both sides tokenized, cut to `data.max_length`; returns (pair, whether an answer was truncated)."""
    pair: Pair = {}
    truncated = False
    for name in ("chosen", "rejected"):
        segments, special, eos = _side(norm, norm[name], tokenizer, user_template)
        enc = encode_segments(segments, tokenizer, 2**62, add_special_tokens=special, append_eos=eos)
        prompt_len = next((i for i, v in enumerate(enc.labels) if v != IGNORE_INDEX), len(enc.labels))
        # Token 0 is never scored, and an answer needs one scored token within max_length.
        if max(prompt_len, 1) >= cfg.max_length:
            raise InvalidRecord(f"{where}: field 'prompt' is {prompt_len} tokens and leaves no room for the "
                                f"'{name}' answer within data.max_length={cfg.max_length}; raise data.max_length "
                                "or shorten the prompt.")
        truncated |= len(enc.input_ids) > cfg.max_length
        pair[name] = {"input_ids": enc.input_ids[:cfg.max_length], "labels": enc.labels[:cfg.max_length]}
    if pair["chosen"] == pair["rejected"]:
        raise InvalidRecord(f"{where}: fields 'chosen' and 'rejected' are identical within data.max_length="
                            f"{cfg.max_length} tokens; raise data.max_length.")
    return pair, truncated


def tokenize_pairs(raw: list[RawRecord], cfg: DataConfig, tokenizer: Any, stats: DataStats,
                   user_template: str | None, bar: progress.Task | None = None) -> tuple[PairSet, list[dict[str, Any]]]:
    """Normalize and tokenize every record, counting into `stats` (and a step of `bar` each); a bad record
    stops the run unless `data.skip_invalid` (then it is counted and its message kept)."""
    pairs, kept = PairSet(), []
    for rec in raw:
        if bar is not None:
            bar.advance()
        stats.read += 1
        try:
            norm = with_system_prompt(normalize_pair(rec.data, rec.where, cfg.template, cfg.column_mapping),
                                      cfg.system_prompt)
            pair, truncated = encode_pair(norm, cfg, tokenizer, user_template, rec.where)
        except InvalidRecord as e:
            skip_or_raise(e, cfg, stats)
            continue
        stats.truncated += truncated
        stats.used += 1
        stats.examples += 1
        pairs.append(pair)
        kept.append(norm)
    return pairs, kept


def build_preference_datasets(cfg: DataConfig, tokenizer: Any, num_eval_pairs: int = 0) -> PreferenceData:
    """Read, split and tokenize preference pairs (the DPO / ORPO counterpart of pipeline.build_datasets)."""
    for name, on in (("sources", bool(cfg.sources)), ("packing", cfg.packing), ("streaming", cfg.streaming),
                     ("memory_map", cfg.memory_map)):
        if on:
            raise ConfigError(f"data.{name} is not supported with preference training (training.objective dpo or "
                              f"orpo): a pair's two sides must stay whole and side by side. Unset data.{name}.")
    if cfg.dataset == chitchat.NAME:
        raise DataError("data.dataset 'chitchat' holds conversations, not preference pairs: `loraforge demo --dpo` "
                        "builds pairs from it (the human's reply chosen, the base model's own reply rejected).")
    raw = list(iter_source(cfg.dataset, cfg.split))
    if cfg.validation_dataset:
        train_raw, val_raw = raw, list(iter_source(cfg.validation_dataset, cfg.split))
    else:
        train_raw, val_raw = split_records(raw, cfg)
    train_raw = train_raw[:cfg.max_samples] if cfg.max_samples else train_raw
    val_raw = val_raw[:cfg.max_eval_samples] if cfg.max_eval_samples else val_raw
    user_template = load_user_template(cfg.template)
    stats = {"train": DataStats(), "validation": DataStats()}
    # A bar with ETA once tokenizing takes over 2 s (thousands of pairs); a small set draws nothing.
    with progress.task("tokenizing the preference pairs", len(train_raw) + len(val_raw), show_after_s=2.0) as bar:
        train, _ = tokenize_pairs(train_raw, cfg, tokenizer, stats["train"], user_template, bar)
        validation, val_records = tokenize_pairs(val_raw, cfg, tokenizer, stats["validation"], user_template, bar)
    if not train:
        raise DataError(f"data.dataset: no usable preference pair in {cfg.dataset!r} "
                        f"({stats['train'].line('train')}).")
    kind = "chat" if ("messages" in val_records[0] if val_records else cfg.template in ("auto", "chat")) else "alpaca"
    formatter = prompt_formatter(kind, tokenizer, user_template, cfg.system_prompt)
    return PreferenceData(train, validation, kind, stats, formatter, validation_records=val_records)
