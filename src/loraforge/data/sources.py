"""Where records come from: files (JSON/JSONL/CSV/Parquet/text), dataset folders and ids, the embedded
chitchat data, and loaders registered in Python (`custom:NAME`).

Every reader is a generator of `RawRecord`s, so a JSONL, JSON array, text, CSV or Parquet file is read piece
by piece (streaming and memory-mapped modes rely on this); only a JSON file holding one object and an
OpenAssistant tree need the whole source.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from loraforge.data import chitchat
from loraforge.data.records import (
    InvalidRecord,
    RawRecord,
    data_suffix,
    read_json_file,
    read_text_documents,
    strict_lines,
)
from loraforge.errors import DataError

CUSTOM_PREFIX = "custom:"
HUB_PREFIX = "hf:"  # hf:NAME is always a Hugging Face dataset id, even when a local file or folder is called NAME
DATA_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet", ".txt")


def iter_source(path: str, split: str = "train", *, streaming: bool = False) -> Iterator[RawRecord]:
    """Yield the raw records of any source, lazily where the format allows. `streaming`: read dataset folders and
    ids through `datasets`' streaming mode (no Arrow copy of the whole dataset is built first)."""
    if path == chitchat.NAME:
        for i, (cid, messages) in enumerate(chitchat.load_chitchat()):
            yield RawRecord({"messages": messages}, f"chitchat:{cid}", i)
        return
    if path.startswith(CUSTOM_PREFIX):
        from loraforge.data.custom import read_registered

        yield from read_registered(path[len(CUSTOM_PREFIX):])
        return
    if path.startswith(HUB_PREFIX):
        yield from read_dataset(path[len(HUB_PREFIX):], split, streaming=streaming, hub=True)
        return
    p = Path(path).expanduser()
    if p.is_file():
        yield from read_file(p)
        return
    yield from read_dataset(path, split, streaming=streaming)


def read_file(path: Path) -> Iterator[RawRecord]:
    """One data file, chosen by its suffix (a trailing .gz is read through gzip: train.jsonl.gz)."""
    path = Path(path)
    suffix = data_suffix(path)
    if suffix in (".json", ".jsonl"):
        yield from read_json_file(path)
    elif suffix == ".txt":
        yield from read_text_documents(path)
    elif suffix == ".csv":
        yield from read_csv(path)
    elif suffix == ".parquet":
        yield from read_parquet(path)
    else:
        raise DataError(f"{path}: unsupported file type {suffix!r}; use one of {', '.join(DATA_SUFFIXES)} (each "
                        "optionally gzip-compressed, e.g. .jsonl.gz), or a dataset folder.")


# csv refuses fields over 131,072 characters by default; one long document is a legitimate field, so the
# limit is raised to a size no training example needs, and a field beyond it is named by its line.
CSV_FIELD_LIMIT = 16 * 1024 * 1024


def read_csv(path: Path) -> Iterator[RawRecord]:
    """A CSV file with a header row; line numbers count the header as line 1, as a spreadsheet shows them."""
    csv.field_size_limit(max(csv.field_size_limit(), CSV_FIELD_LIMIT))  # process-wide; only ever raised
    at = 0  # the last line handed to csv: its own line_num lags behind when a row fails

    def lines() -> Iterator[str]:
        nonlocal at
        for lineno, line in strict_lines(path):
            at = lineno
            yield line

    reader = csv.DictReader(lines())
    try:
        for i, row in enumerate(reader):
            where = f"{path}, line {i + 2}"
            if None in row:  # DictReader's key for the values beyond the header's columns
                yield RawRecord(InvalidRecord(f"{where}: {len(reader.fieldnames or []) + len(row[None])} fields, "
                                              f"but the header has {len(reader.fieldnames or [])}."), where, i + 2)
                continue
            yield RawRecord(dict(row), where, i + 2)
    except csv.Error as e:
        raise DataError(f"{path}, line {at}: not valid CSV: {e}.") from None


def read_parquet(path: Path) -> Iterator[RawRecord]:
    """A Parquet file, a batch of rows at a time."""
    import pyarrow as pa  # lazy: pyarrow takes ~0.3 s to import and only Parquet needs it here
    import pyarrow.parquet as pq

    i = 0
    try:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            for row in batch.to_pylist():
                yield RawRecord(row, str(path), i)
                i += 1
    except (pa.ArrowException, OSError, ValueError) as e:
        where = f"{path}" if i == 0 else f"{path}, after record {i - 1}"
        raise DataError(f"{where}: not a readable Parquet file ({type(e).__name__}: {str(e)[:200]}).") from None


def read_dataset(path: str, split: str = "train", *, streaming: bool = False, hub: bool = False) -> Iterator[RawRecord]:
    """A folder saved with `save_to_disk`, a folder of data files, or a Hugging Face dataset id (`hub`: it is
    one, whatever the local files). `streaming`: data files and ids are read by `datasets`' streaming mode, a
    batch of rows at a time (a saved folder is memory-mapped Arrow, lazy already)."""
    import datasets

    p = Path("/nonexistent/hub-id") if hub else Path(path).expanduser()
    saved = p.is_dir() and ((p / "dataset_dict.json").is_file() or (p / "state.json").is_file())
    if p.is_dir() and not saved:
        _one_format(p)
    try:
        if p.is_dir() and ((p / "dataset_dict.json").is_file() or (p / "state.json").is_file()):
            ds: Any = datasets.load_from_disk(str(p))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise DataError(f"{path}: no split {split!r}; the folder has {sorted(ds)}. Set data.split.")
                ds = ds[split]
        else:
            ds = datasets.load_dataset(str(p) if p.is_dir() else path, split=split, streaming=streaming)
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - datasets raises many types; all mean "cannot read this source"
        hint = ("it is not a file or folder here, and as a Hugging Face dataset id it could not be loaded "
                "(offline, misspelt, or private?)" if not p.exists() else f"datasets could not read it ({e})")
        raise DataError(f"data.dataset: {path!r}: {hint}. Point data.dataset at a .json/.jsonl/.csv/.parquet/"
                        ".txt file, a dataset folder, or 'chitchat'.") from e
    where = f"{path}[{split}]"
    if isinstance(ds, datasets.IterableDataset):
        yield from _streamed_rows(ds, where, path)
        return
    for i, row in enumerate(ds):
        yield RawRecord(row, where, i)


def _streamed_rows(ds: Any, where: str, path: str) -> Iterator[RawRecord]:
    # `.iter(batch_size)`, not `iter(ds)`: inside a DataLoader worker, iterating a datasets 5.x IterableDataset
    # hands the worker only its share of the shard files, and stream.py shards by record itself.
    i = 0
    try:
        for batch in ds.iter(batch_size=64):  # rows may be large (long documents): few at a time
            for values in zip(*batch.values(), strict=True):
                yield RawRecord(dict(zip(batch, values, strict=True)), where, i)
                i += 1
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - datasets/pyarrow raise many types; all mean "cannot read on"
        raise DataError(f"data.dataset: {path!r}: datasets could not stream it after record {i} "
                        f"({type(e).__name__}: {str(e)[:200]}).") from e


_DATASET_METADATA = {"dataset_info.json", "dataset_infos.json", "state.json", "dataset_dict.json"}


def _one_format(folder: Path) -> None:
    """A folder of data files must hold one format: `datasets` reads only the most common one and drops the
    others without a word (a folder with a .jsonl and a .csv gave the .jsonl's records alone)."""
    found: dict[str, int] = {}
    for f in folder.rglob("*"):
        suffix = "".join(f.suffixes[-2:]) if f.suffix == ".gz" else f.suffix
        if (f.is_file() and not f.name.startswith(".") and f.name not in _DATASET_METADATA
                and suffix.removesuffix(".gz") in DATA_SUFFIXES):
            found[suffix] = found.get(suffix, 0) + 1
    if len(found) > 1:
        kinds = ", ".join(f"{n} {s} file{'s' * (n > 1)}" for s, n in sorted(found.items()))
        raise DataError(f"data.dataset: the folder {folder} mixes data formats ({kinds}); a folder is read as one "
                        "format. Point data.dataset at one file or one format's folder, or list each in data.sources.")


def identity(path: str, split: str = "train") -> str | None:
    """A fingerprint that changes when the source's content may have changed (cache key); None = uncachable."""
    if path.startswith(CUSTOM_PREFIX):
        return None  # user code: we cannot know when its output changes
    if path.startswith(HUB_PREFIX):
        return f"hub:{path[len(HUB_PREFIX):]}:{split}"
    if path == chitchat.NAME:
        p = chitchat.chitchat_path()
        return f"chitchat:{_stat(p)}"
    p = Path(path).expanduser()
    if p.is_file():
        return _stat(p.resolve())
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))
        digest = hashlib.sha256("\n".join(_stat(f) for f in files).encode()).hexdigest()
        return f"{p.resolve()}:{split}:{digest}"
    return f"hub:{path}:{split}"  # a hub id: datasets' own cache pins its content


def _stat(p: Path) -> str:
    st = p.stat()
    return json.dumps([str(p), st.st_size, st.st_mtime_ns])
