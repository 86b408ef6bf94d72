"""User-written data loaders: subclass `CustomDatasetLoader`, or register a plain function.

A config file is data, never code: YAML can name a loader (`data.dataset: custom:my_loader`) only after
Python code the user runs has registered it; an import path in YAML is never executed.

    from loraforge import CustomDatasetLoader, register_loader

    @register_loader("support_tickets")
    def support_tickets():
        for t in my_db.tickets():
            yield {"instruction": t.question, "input": "", "output": t.answer}

    class Tickets(CustomDatasetLoader):
        def records(self):
            return support_tickets()

    dsets = Tickets(tokenizer, max_length=512).load()   # DatasetDict: train / validation
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from loraforge.config import DataConfig
from loraforge.data.examples import tokenize_records
from loraforge.data.records import RawRecord
from loraforge.data.split import split_records
from loraforge.data.types import DataStats
from loraforge.errors import DataError

_LOADERS: dict[str, Callable[[], Any]] = {}


def register_loader(name: str) -> Callable[[Callable[[], Any]], Callable[[], Any]]:
    """Register `fn() -> records` (an iterable of dicts in any supported layout, or a `datasets.Dataset`)
    under `name`, usable as `data.dataset: custom:NAME` in a config."""
    if not name or ":" in name:
        raise ValueError(f"register_loader: invalid name {name!r} (non-empty, no ':').")

    def decorate(fn: Callable[[], Any]) -> Callable[[], Any]:
        _LOADERS[name] = fn
        return fn

    return decorate


def registered_loaders() -> list[str]:
    return sorted(_LOADERS)


def _as_raw(records: Any, source: str) -> Iterator[RawRecord]:
    import datasets  # seconds to import; loraforge.register_loader (this module) must stay instant

    if isinstance(records, datasets.DatasetDict):
        raise DataError(f"{source}: returned a DatasetDict; return one split (a Dataset) or records.")
    if isinstance(records, dict) or isinstance(records, (str, bytes)) or not isinstance(records, Iterable):
        raise DataError(f"{source}: must return an iterable of records (dicts), got {type(records).__name__}.")
    for i, rec in enumerate(records):
        yield RawRecord(rec, source, i)


def read_registered(name: str) -> Iterator[RawRecord]:
    if name not in _LOADERS:
        known = ", ".join(registered_loaders()) or "none"
        raise DataError(f"data.dataset: no loader registered as 'custom:{name}' (registered: {known}). Register "
                        "it with @loraforge.register_loader(name) in the Python code that starts the run.")
    yield from _as_raw(_LOADERS[name](), f"custom:{name}")


class CustomDatasetLoader:
    """Base class for a loader written in Python. Override `records()` (an iterable of dicts in any layout
    loraforge reads: alpaca, chat messages, dialogue, text) or `load_raw()` (a `datasets.Dataset`, or a
    `DatasetDict` with train/validation). `load()` renders, tokenizes and masks them exactly as training
    does, returning a `DatasetDict` with `train` and `validation` splits of `input_ids`/`labels`.
    """

    def __init__(self, tokenizer: Any, max_length: int = 512, *, data_config: Any = None):
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.config = dataclasses.replace(data_config or DataConfig(), max_length=max_length, sources=[])
        self.stats: dict[str, Any] = {}

    @property
    def name(self) -> str:
        return type(self).__name__

    def records(self) -> Iterable[dict[str, Any]]:
        raise NotImplementedError(f"{self.name}: override records() or load_raw().")

    def load_raw(self) -> Any:
        return self.records()

    def load(self) -> Any:
        import datasets  # seconds to import: only a loader that is used pays for it

        raw = self.load_raw()
        if isinstance(raw, datasets.DatasetDict):
            missing = {"train", "validation"} - set(raw)
            if missing:
                raise DataError(f"{self.name}.load_raw(): the DatasetDict lacks {sorted(missing)}.")
            parts = {k: list(_as_raw(raw[k], f"{self.name}[{k}]")) for k in ("train", "validation")}
        else:
            parts = dict(zip(("train", "validation"),
                             split_records(list(_as_raw(raw, self.name)), self.config), strict=True))
        out = {}
        for split, recs in parts.items():
            self.stats[split] = DataStats()
            examples, _ = tokenize_records(recs, self.config, self.tokenizer, self.config.format, self.stats[split],
                                           self.config.column_mapping)
            out[split] = datasets.Dataset.from_dict(
                {"input_ids": [e["input_ids"] for e in examples], "labels": [e["labels"] for e in examples]})
        return datasets.DatasetDict(out)
