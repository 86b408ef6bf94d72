"""Streaming mode (`data.streaming: true`): training examples read, tokenized and packed as training goes.

The source's records are numbered 0, 1, 2, ... in the order it yields them, and the numbering goes on
over passes (when the source ends, it is read again from its start). `RecordStream` is a torch
IterableDataset: in DataLoader worker w of n it tokenizes records w, w+n, w+2n, ... (from the start
position on) and yields one item per record, an empty list for a record held out, skipped as invalid or
dropped. The DataLoader takes its workers' items round-robin, so the main process receives the records
in their order whatever the worker count. There `TrainStream.micro_batches` cuts the examples into rows
— a record's examples as they are, or with `data.packing` the examples of a window of records packed by
the cached path's best-fit (packing.py) — and the rows into micro-batches.

The position a run is at is `StreamPosition(record, row)`: the first record of the current window and
the rows of that window already used. It is a pure function of how far training got, saved in every
checkpoint; resuming reads (without tokenizing) the records before it, rebuilds that one window, and
skips its used rows, so the resumed run sees exactly the batches the uninterrupted run saw.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import IterableDataset, get_worker_info

from loraforge.config import DataConfig
from loraforge.data.examples import record_examples
from loraforge.data.packing import pack_examples, pack_groups
from loraforge.data.records import RawRecord, oasst_trees
from loraforge.data.sources import iter_source
from loraforge.data.split import in_validation
from loraforge.data.templates import load_user_template
from loraforge.data.types import DataStats
from loraforge.errors import DataError, LoraforgeError

# Examples gathered before a window is packed: enough for best-fit to fill rows well (as the cached path's
# whole-set packing does), few enough to re-tokenize in a moment on resume (one window) and to hold.
PACK_WINDOW = 512

Example = dict[str, list[int]]


@dataclass(frozen=True)
class StreamPosition:
    record: int = 0  # number of the first record of the current window (counted on over passes)
    row: int = 0  # rows of that window already used


@dataclass(frozen=True)
class _Item:
    """One record as a worker hands it on: its number, its index in the source, its examples; or, last, the
    error that stopped the worker (a bad record, an unreadable source), which the main process raises."""

    number: int
    index: int
    examples: list[Example]
    error: LoraforgeError | None = None


def source_records(source: str, split: str, oasst: bool = False) -> Iterator[RawRecord]:
    """The source's records in order; OpenAssistant message rows become one conversation per tree
    (records.oasst_trees), so a record is a conversation there too."""
    rows = iter_source(source, split, streaming=True)
    return oasst_trees(rows) if oasst else rows


def training_records(source: str, split: str, cfg: DataConfig, start: int = 0,
                     oasst: bool = False) -> Iterator[tuple[int, int, Any]]:
    """(number, index in the source, RawRecord or None) from record number `start` on, forever: the source is
    read again from its start when it ends. None stands for a record that is not for training (held out by
    split.py's streaming rule). A pass ends early after `data.max_samples` training records."""
    number, length = 0, None  # records in one pass, once a pass has been read
    while True:
        if length is not None and start - number >= length:
            number += (start - number) // length * length  # whole passes before `start`: not read again
        in_pass, used = 0, 0
        for index, rec in enumerate(source_records(source, split, oasst)):
            held_out = not cfg.validation_dataset and in_validation(index, cfg)
            if not held_out and cfg.max_samples and used >= cfg.max_samples:
                break
            used += not held_out
            if number >= start:
                yield number, index, None if held_out else rec
            number, in_pass = number + 1, index + 1
        if in_pass == 0:
            raise DataError(f"data.dataset: {source!r} holds no records.")
        length = in_pass


class RecordStream(IterableDataset):
    """The tokenized training records from record number `start` on, sharded over DataLoader workers by
    record (see the module's docstring): an endless stream of `_Item`s."""

    def __init__(self, train: TrainStream, start: int):
        self.train, self.start = train, start

    def __iter__(self) -> Iterator[_Item]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        t = self.train
        user_template = load_user_template(t.cfg.template)
        stats = DataStats()  # the counts of a stream are not reported (they would need the whole stream)
        try:
            for number, index, rec in training_records(t.source, t.split, t.cfg, self.start, t.oasst):
                if (number - self.start) % workers != worker:
                    continue
                examples: list[Example] = []
                if rec is not None:
                    examples, _ = record_examples(rec, t.cfg, t.tokenizer, t.fmt, stats, t.column_mapping,
                                                  user_template)
                yield _Item(number, index, examples)
        except LoraforgeError as e:
            # Handed on as data: raised in a DataLoader worker, torch would re-raise it in the main process
            # wrapped in the worker's traceback text, and the user would read a traceback, not the message.
            yield _Item(-1, -1, [], e)


def as_is(item: Any) -> Any:
    """The DataLoader's collate_fn for `RecordStream`: items go to the main process unchanged."""
    return item


@dataclass
class TrainStream:
    """The training split of a streamed source: what to read and how to tokenize it. It has no length;
    `micro_batches` is what the trainer iterates."""

    source: str
    split: str
    fmt: str
    column_mapping: dict[str, str] | None
    cfg: DataConfig
    tokenizer: Any
    oasst: bool = False  # OpenAssistant message rows, streamed a tree at a time (fmt is then "chat")

    def records(self, start: int) -> RecordStream:
        return RecordStream(self, start)

    def rows(self, position: StreamPosition,
             load: Callable[[RecordStream], Iterable[_Item]] = iter) -> Iterator[tuple[Example, StreamPosition]]:
        """(row, position after it) from `position` on. `load` turns the record stream into the items in order
        (a DataLoader with workers; plain iteration without)."""
        items = iter(load(self.records(position.record)))
        window_start, skip = position.record, position.row
        pass_has_examples, seen_pass_start = False, False
        while True:
            window: list[Example] = []
            next_start = window_start
            while not window or (self.cfg.packing and len(window) < PACK_WINDOW):
                item = next(items)
                if item.error is not None:
                    raise item.error
                if item.index == 0:  # a pass begins: the one before must have given something to train on
                    if seen_pass_start and not pass_has_examples:
                        raise DataError(f"data.dataset: no usable training example in {self.source!r} (every record "
                                        "was held out, skipped or dropped). Check data.max_length and the fields.")
                    seen_pass_start, pass_has_examples = True, False
                pass_has_examples = pass_has_examples or bool(item.examples)
                window += item.examples
                next_start = item.number + 1
            rows = window
            if self.cfg.packing:
                groups = pack_groups([len(e["input_ids"]) for e in window], self.cfg.max_length)
                rows = [pack_examples([window[j] for j in g]) for g in groups]
            for k in range(skip, len(rows)):
                yield rows[k], StreamPosition(window_start, k + 1)
            window_start, skip = next_start, 0

    def micro_batches(self, position: StreamPosition, batch_size: int, collate: Callable[[list[Example]], Any], *,
                      load: Callable[[RecordStream], Iterable[_Item]] = iter, world_size: int = 1,
                      rank: int = 0) -> Iterator[tuple[dict[str, torch.Tensor], StreamPosition]]:
        """(collated micro-batch, position after it), forever. Every process reads the same rows; micro-batch m is
        rows [m·B·W, (m+1)·B·W) of them, of which process `rank` takes its B."""
        rows = self.rows(position, load)
        per_step = batch_size * world_size
        while True:
            taken = [next(rows) for _ in range(per_step)]
            mine = [row for row, _ in taken[rank * batch_size:(rank + 1) * batch_size]]
            yield collate(mine), taken[-1][1]


def held_out(source: str, split: str, fmt: str, column_mapping: dict[str, str] | None, cfg: DataConfig,
             tokenizer: Any, limit: int, oasst: bool = False) -> tuple[list[Example], list[dict], DataStats]:
    """The validation examples of a streamed source: its first `limit` held-out records (split.py's streaming
    rule), or the first `limit` records of `data.validation_dataset`; (examples, normalized records, stats)."""
    stats = DataStats()
    user_template = load_user_template(cfg.template)
    examples: list[Example] = []
    records: list[dict] = []
    if cfg.validation_dataset:
        raw: Iterator[RawRecord] = iter_source(cfg.validation_dataset, "validation", streaming=True)
    elif cfg.validation_split > 0:
        raw = (r for i, r in enumerate(source_records(source, split, oasst)) if in_validation(i, cfg))
    else:
        return examples, records, stats
    for n, rec in enumerate(raw):
        if n >= limit:
            break
        found, norm = record_examples(rec, cfg, tokenizer, fmt, stats, column_mapping, user_template)
        examples += found
        if found:
            records.append(norm)
    return examples, records, stats


def stream_config(cfg: DataConfig, max_samples: int | None) -> DataConfig:
    return dataclasses.replace(cfg, max_samples=max_samples, sources=[])
