"""`loraforge data preview`: examples exactly as training sees them, trained-on tokens highlighted,
plus token-length statistics and the record counts.

A preview answers in seconds whatever the source's size: it reads the source lazily, renders the first
`n` usable records, and measures lengths on the first `SAMPLE_RECORDS` records (fewer when they take over
`SAMPLE_SECONDS`: long conversations render slowly). The whole set is measured
only when a run already tokenized it with the same settings (the tokenization cache) or when asked to
(`whole=True`, which tokenizes everything and leaves it in the cache for the run). The screen says which.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from itertools import islice
from typing import Any

import numpy as np
from rich.console import Console
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from loraforge.config import DataConfig, ModelConfig
from loraforge.data import cache, sources
from loraforge.data.examples import iter_examples
from loraforge.data.load import first_records, from_cache, load_source, resolve_format, source_cache_key
from loraforge.data.tokenize import IGNORE_INDEX
from loraforge.data.types import DataStats, SourceSpec
from loraforge.model.tokenizer import gguf_tokenizer_dir, load_tokenizer

TRAINED_STYLE = "black on green3"
SAMPLE_RECORDS = 200  # enough for a median and a p95
SAMPLE_SECONDS = 1.5  # chitchat's long conversations tokenize at ~35 a second on one core


@dataclasses.dataclass
class Lengths:
    """Token lengths of the examples measured, and where they come from."""

    lengths: list[int]
    stats: DataStats
    scope: str  # "sample" | "cache" | "all"
    timed_out: bool = False  # the sample stopped at SAMPLE_SECONDS, before SAMPLE_RECORDS


def length_stats(lengths: list[int], max_length: int, truncated: int) -> dict[str, float]:
    a = np.asarray(lengths, dtype=np.int64)
    return {"examples": len(a), "min": int(a.min()), "median": float(np.median(a)),
            "p95": float(np.percentile(a, 95)), "max": int(a.max()), "max_length": max_length,
            "truncated": truncated}


def render_example(example: dict[str, list[int]], tokenizer: Any):
    """A rich Text of the decoded tokens; labelled ones in TRAINED_STYLE.

    Tokens are decoded one at a time, except that a byte-level token holding part of a character (an accent,
    an emoji) waits for the tokens completing it: decoded alone it would show as U+FFFD."""
    text = Text()
    pending: list[int] = []
    trained = False
    for tok, lab in zip(example["input_ids"], example["labels"], strict=True):
        pending.append(tok)
        trained = trained or lab != IGNORE_INDEX
        piece = tokenizer.decode(pending, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if piece.endswith("\ufffd") and len(pending) < 4:  # a UTF-8 character is at most 4 bytes
            continue
        text.append(piece, style=TRAINED_STYLE if trained else None)
        pending, trained = [], False
    if pending:
        text.append(tokenizer.decode(pending, skip_special_tokens=False, clean_up_tokenization_spaces=False),
                    style=TRAINED_STYLE if trained else None)
    return text


def measure(cfg: DataConfig, tokenizer: Any, *, whole: bool = False) -> tuple[list[dict[str, list[int]]], Lengths, str]:
    """(the first examples, the lengths measured, the format).

    Lengths come from the tokenization cache when a run with exactly these settings tokenized the source
    (its training split), from the whole source when `whole` (which leaves it in the cache), else from
    the first SAMPLE_RECORDS records, read lazily. Invalid records are counted, never a stop.
    """
    spec = SourceSpec(cfg.dataset, cfg.format, cfg.column_mapping, cfg.split, cfg.max_samples)
    key = source_cache_key(spec, cfg, tokenizer) if cfg.cache and not whole else None
    lenient = dataclasses.replace(cfg, skip_invalid=True)
    if key and (hit := cache.lookup(key)):
        data = from_cache(hit, streaming=True)
        train = data.train
        return ([train[i] for i in range(min(len(train), 64))],
                Lengths([int(x) for x in train.lengths], data.stats["train"], "cache"), data.fmt)
    fmt = resolve_format(cfg.format, first_records(sources.iter_source(cfg.dataset, cfg.split), 50),
                         cfg.column_mapping)
    if whole or fmt == "oasst":  # an OpenAssistant tree needs all its rows
        data = load_source(spec, lenient, tokenizer)
        return (list(data.train[:64]), Lengths([len(e["input_ids"]) for e in data.train], data.stats["train"], "all"),
                data.fmt)
    stats = DataStats()
    stopped: list[bool] = []
    raw = _until(islice(sources.iter_source(cfg.dataset, cfg.split), SAMPLE_RECORDS),
                 time.monotonic() + SAMPLE_SECONDS, stopped)
    examples = [e for e, _ in iter_examples(raw, lenient, tokenizer, fmt, stats, cfg.column_mapping)]
    return examples, Lengths([len(e["input_ids"]) for e in examples], stats, "sample", bool(stopped)), fmt


def _until(records: Iterator[Any], deadline: float, stopped: list[bool], at_least: int = 20) -> Iterator[Any]:
    """The records, ending early once `deadline` has passed (after `at_least` of them); `stopped` says so."""
    for i, r in enumerate(records):
        if i >= at_least and time.monotonic() > deadline:
            stopped.append(True)
            return
        yield r


def _scope_line(lengths: Lengths, whole_flag: str) -> str:
    if lengths.scope == "cache":
        return "every training record (from the tokenization cache of a run with these settings)"
    if lengths.scope == "all":
        return "every training record"
    if lengths.stats.read < SAMPLE_RECORDS and not lengths.timed_out:
        return f"every record (all {lengths.stats.read})"
    return f"a sample: the first {lengths.stats.read} records ({whole_flag} measures every record)"


def _tokenizer_path(model: ModelConfig) -> str:
    """An embedded or GGUF model's tokenizer folder (made without dequantizing the weights), else the
    model's folder or hub id."""
    folder = gguf_tokenizer_dir(model)
    if folder is not None:
        return str(folder)
    # Imported here: model/load.py imports torch (2-3 s), which a GGUF model's tokenizer does not need.
    from loraforge.model.load import resolve_model_path

    return resolve_model_path(model)


def preview(cfg: DataConfig, model: ModelConfig, *, n: int = 3, whole: bool = False,
            console: Any = None) -> dict[str, Any]:
    """Print `n` rendered examples of `cfg.dataset` and length statistics; return the statistics."""
    console = console or Console()
    tokenizer = load_tokenizer(_tokenizer_path(model), model)
    examples, lengths, fmt = measure(cfg, tokenizer, whole=whole)
    stats = lengths.stats
    console.print(f"[bold]{cfg.dataset}[/] · format {fmt} · tokenizer {model.model_name} · max_length "
                  f"{cfg.max_length} · [{TRAINED_STYLE}] trained-on tokens [/]")
    for i, ex in enumerate(examples[:n]):
        n_lab = sum(1 for v in ex["labels"] if v != IGNORE_INDEX)
        console.print(Panel(render_example(ex, tokenizer), title=f"example {i}",
                            subtitle=f"{len(ex['input_ids'])} tokens, {n_lab} trained on", title_align="left"))
    if not lengths.lengths:
        console.print("[red]no usable example[/]")
        return {"counts": stats, "scope": lengths.scope}
    ls = length_stats(lengths.lengths, cfg.max_length, stats.truncated)
    table = Table(title=f"token lengths of {_scope_line(lengths, '--all')}", title_justify="left")
    for col in ("examples", "min", "median", "p95", "max", f"truncated at {cfg.max_length}"):
        table.add_column(col, justify="right")
    table.add_row(str(ls["examples"]), str(ls["min"]), f"{ls['median']:.0f}", f"{ls['p95']:.0f}", str(ls["max"]),
                  f"{ls['truncated']} ({100 * ls['truncated'] / max(1, stats.used):.1f}%)")
    console.print(table)
    console.print(stats.line("records"), markup=False, highlight=False)
    for err in stats.first_errors:
        console.print(f"  skipped: {err}", markup=False, highlight=False)
    return {"lengths": ls, "counts": stats, "scope": lengths.scope}
