"""Which records are held out for validation: in memory, a seeded shuffle cut by count; when streaming,
a seeded hash of each record's position (no record list needed). Both reproduce with `data.seed`."""

from __future__ import annotations

import random
import zlib

from loraforge.config import DataConfig
from loraforge.data.records import RawRecord


def split_records(raw: list[RawRecord], cfg: DataConfig) -> tuple[list[RawRecord], list[RawRecord]]:
    """Seeded shuffle, then the first `validation_split` share is validation (at least 1 when > 0)."""
    order = list(range(len(raw)))
    random.Random(cfg.seed).shuffle(order)
    n_val = int(round(len(raw) * cfg.validation_split)) if cfg.validation_split > 0 else 0
    if cfg.validation_split > 0 and len(raw) > 1:
        n_val = max(1, n_val)
    val_idx, train_idx = order[:n_val], order[n_val:]
    return [raw[i] for i in train_idx], [raw[i] for i in val_idx]


def in_validation(index: int, cfg: DataConfig) -> bool:
    """Streaming split: a seeded hash of the record's position, so no record list is needed."""
    return zlib.crc32(f"{cfg.seed}:{index}".encode()) / 2**32 < cfg.validation_split
