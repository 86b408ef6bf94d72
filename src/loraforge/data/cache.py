"""Tokenized examples on disk: the tokenization cache, and the backing store of memory-mapped mode.

An entry is a folder under `<cache root>/tokenized/<key>/` (cache root: $LORAFORGE_CACHE, else
~/.cache/loraforge) with, per split, `input_ids.bin` and `labels.bin` (int32, all examples back to back)
and `offsets.npy` (int64, example i is [offsets[i], offsets[i+1])), plus `meta.json` (counts, format,
a few records for generation-time evaluation). `TokenStore` reads them through memory maps, so a split
larger than RAM is indexed lazily: only the examples a batch asks for are read.

The key hashes everything the tokens depend on: the source's identity (path, size, mtime), the tokenizer
(name, vocabulary, special tokens, chat template), the data settings, and the source of loraforge's data
package itself, so an edit to the tokenization code never serves stale tokens.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from loraforge.model.embedded import cache_root


def tokenized_root() -> Path:
    return cache_root() / "tokenized"


def _vocab_digest(tokenizer: Any) -> str:
    # Hashing 50k-150k entries takes a moment and a few MB: done once per tokenizer object and size.
    memo = getattr(tokenizer, "_loraforge_vocab_digest", None)
    if memo and memo[0] == len(tokenizer):
        return memo[1]
    h = hashlib.sha256()
    for token, i in sorted(tokenizer.get_vocab().items()):
        h.update(f"{token}\x00{i}\x00".encode())
    digest = h.hexdigest()
    try:
        tokenizer._loraforge_vocab_digest = (len(tokenizer), digest)
    except AttributeError:
        pass
    return digest


def tokenizer_fingerprint(tokenizer: Any) -> str:
    parts = [getattr(tokenizer, "name_or_path", ""), type(tokenizer).__name__, _vocab_digest(tokenizer),
             str(tokenizer.bos_token), str(tokenizer.eos_token), str(tokenizer.pad_token),
             str(getattr(tokenizer, "chat_template", None)), str(getattr(tokenizer, "add_bos_token", None))]
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()


def code_fingerprint() -> str:
    here = Path(__file__).parent
    h = hashlib.sha256()
    for f in sorted(here.glob("*.py")):
        h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()


def cache_key(**parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


class TokenStore(Sequence):
    """A read-only split of tokenized examples, memory-mapped: `store[i]` -> {"input_ids", "labels"}."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.offsets = np.load(self.folder / "offsets.npy")
        n = int(self.offsets[-1])
        if n:
            self._ids = np.memmap(self.folder / "input_ids.bin", dtype=np.int32, mode="r", shape=(n,))
            self._labels = np.memmap(self.folder / "labels.bin", dtype=np.int32, mode="r", shape=(n,))
        else:
            self._ids = self._labels = np.zeros(0, dtype=np.int32)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        return {"input_ids": self._ids[a:b].tolist(), "labels": self._labels[a:b].tolist()}

    def __iter__(self) -> Iterator[dict[str, list[int]]]:
        for i in range(len(self)):
            yield self[i]


class StoreWriter:
    """Append examples to a split folder; only the offsets (8 bytes per example) stay in memory."""

    def __init__(self, folder: Path):
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self._ids = (folder / "input_ids.bin").open("wb")
        self._labels = (folder / "labels.bin").open("wb")
        self.offsets = [0]

    def add(self, example: dict[str, list[int]]) -> None:
        self._ids.write(np.asarray(example["input_ids"], dtype=np.int32).tobytes())
        self._labels.write(np.asarray(example["labels"], dtype=np.int32).tobytes())
        self.offsets.append(self.offsets[-1] + len(example["input_ids"]))

    def close(self) -> None:
        self._ids.close()
        self._labels.close()
        np.save(self.folder / "offsets.npy", np.asarray(self.offsets, dtype=np.int64))


class CacheEntry:
    """Write an entry into a private temporary folder; `commit` renames it into place (atomic), so a crash
    or a concurrent run never leaves a half-written entry that a later run would trust."""

    def __init__(self, key: str):
        self.final = tokenized_root() / key
        self.tmp = tokenized_root() / f".tmp-{key}-{uuid.uuid4().hex[:8]}"
        self.writers = {split: StoreWriter(self.tmp / split) for split in ("train", "validation")}

    def commit(self, meta: dict[str, Any]) -> Path:
        for w in self.writers.values():
            w.close()
        (self.tmp / "meta.json").write_text(json.dumps(meta))
        try:
            os.replace(self.tmp, self.final)
        except OSError:  # another run committed the same key first: theirs is as good as ours
            shutil.rmtree(self.tmp, ignore_errors=True)
        return self.final

    def abort(self) -> None:
        for w in self.writers.values():
            w.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


def lookup(key: str) -> Path | None:
    path = tokenized_root() / key
    return path if (path / "meta.json").is_file() else None
