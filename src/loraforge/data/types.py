"""What the data layer hands out: per-split counts (`DataStats`), one loaded source (`SourceData`, named by a
`SourceSpec`), and the finished train/validation sets with what evaluation needs (`DataBundle`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


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
    generation-time evaluation needs. `train`/`validation` are lists, or in memory-mapped mode lazily indexed
    on-disk sequences (`TokenStore`, supporting len, [i] and iteration; `.lengths` gives every length); in
    streaming mode `train` is a `TrainStream` (stream.py), with no length."""

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


@dataclass(frozen=True)
class SourceSpec:
    path: str
    format: str = "auto"
    column_mapping: dict[str, str] | None = None
    split: str = "train"
    max_samples: int | None = None
